//! Harness for Granary's end-to-end tests: real `granary-node` processes (killed for
//! real, and given power cuts on the FUSE power-loss file system of
//! `tests/powerloss-fs`), a private Postgres server, and signing helpers for real
//! clients.
//!
//! Every process a test starts is owned by a guard that kills it (by pid) on drop.

use std::io::{BufRead, BufReader};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

pub mod cluster;
pub mod control_plane;
pub mod kubelet;
pub mod netns;
pub mod otlp;

/// The workspace root (two levels above this crate).
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .canonicalize()
        .expect("workspace root")
}

/// `$env` if set, else `bin` of `package` built (debug) by cargo, once per process.
fn cargo_binary(cell: &'static OnceLock<PathBuf>, env: &str, package: &str, bin: &str) -> PathBuf {
    cell.get_or_init(|| {
        if let Ok(p) = std::env::var(env) {
            // Relative to where we were started: children run in other directories.
            let p = PathBuf::from(p);
            let p = std::path::absolute(&p).unwrap_or(p);
            assert!(
                p.is_file(),
                "{env}={} does not exist; build it first",
                p.display()
            );
            return p;
        }
        let root = workspace_root();
        let status = Command::new(env!("CARGO"))
            .args(["build", "-q", "-p", package, "--bin", bin])
            .current_dir(&root)
            .status()
            .expect("running cargo build");
        assert!(status.success(), "building {bin} failed");
        let target = std::env::var("CARGO_TARGET_DIR")
            .map(PathBuf::from)
            .unwrap_or_else(|_| root.join("target"));
        target.join("debug").join(bin)
    })
    .clone()
}

/// Path to `granary-node` (`$GRANARY_NODE_BIN`, or built once per process).
pub fn node_binary() -> PathBuf {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    cargo_binary(
        &BIN,
        "GRANARY_NODE_BIN",
        "granary-storage-node",
        "granary-node",
    )
}

/// Path to `granary-operator` (`$GRANARY_OPERATOR_BIN`, or built once per process).
pub fn operator_binary() -> PathBuf {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    cargo_binary(
        &BIN,
        "GRANARY_OPERATOR_BIN",
        "granary-operator",
        "granary-operator",
    )
}

/// Path to `granary-powerloss-fs` (`$GRANARY_POWERLOSS_FS_BIN`, or built once per
/// process).
pub fn powerloss_fs_binary() -> PathBuf {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    cargo_binary(
        &BIN,
        "GRANARY_POWERLOSS_FS_BIN",
        "granary-powerloss-fs",
        "granary-powerloss-fs",
    )
}

pub use granary_powerloss_fs::{Mode as PowerLossMode, PowerLossFs};

/// Mounts the power-loss file system on `dir/mnt` (sync log in `dir/sync.log`).
pub fn mount_powerloss(dir: &Path, mode: PowerLossMode) -> Result<PowerLossFs> {
    PowerLossFs::mount(
        &powerloss_fs_binary(),
        &dir.join("mnt"),
        mode,
        &dir.join("sync.log"),
    )
}

/// Runs the build script `tests/e2e/tools/<script>` (which builds test tools from
/// pinned Go modules into a cache outside the repository, once) and returns the path it
/// prints last. Scripts run under a file lock in the cache, so parallel test processes
/// never build at once.
pub fn build_tool(script: &str) -> Result<PathBuf> {
    let root = workspace_root();
    let path = root.join("tests/e2e/tools").join(script);
    let cache = std::env::var("GRANARY_TOOLS_CACHE")
        .map(PathBuf::from)
        .unwrap_or_else(|_| {
            PathBuf::from(std::env::var("HOME").unwrap_or_else(|_| "/root".into()))
                .join(".cache/granary-tools")
        });
    std::fs::create_dir_all(&cache).with_context(|| format!("creating {}", cache.display()))?;
    let lock = cache.join(format!("{script}.lock"));
    let mut cmd = if which("flock").is_some() {
        let mut c = Command::new("flock");
        c.arg(&lock).arg("bash").arg(&path);
        c
    } else {
        let mut c = Command::new("bash");
        c.arg(&path);
        c
    };
    let out = cmd
        .current_dir(&root)
        .stdin(Stdio::null())
        .stderr(Stdio::inherit())
        .output()
        .with_context(|| format!("running {}", path.display()))?;
    if !out.status.success() {
        bail!(
            "{} failed ({}); its progress and errors are above",
            path.display(),
            out.status
        );
    }
    let stdout = String::from_utf8_lossy(&out.stdout);
    Ok(PathBuf::from(
        stdout
            .lines()
            .rev()
            .find(|l| !l.trim().is_empty())
            .with_context(|| format!("{script} printed no path"))?
            .trim(),
    ))
}

/// Where `tool` is on `PATH`.
pub fn which(tool: &str) -> Option<PathBuf> {
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|p| p.join(tool))
            .find(|p| p.is_file())
    })
}

/// A running `granary-node dev` process on loopback ports chosen by the OS.
pub struct NodeProc {
    child: Option<Child>,
    /// SIGKILLs the node if the test process dies without stopping it.
    watchdog: Option<Watchdog>,
    pub data_dir: PathBuf,
    pub s3: String,
    pub kv: String,
    pub admin: String,
    pub admin_token: String,
    pub access_key: String,
    pub secret_key: String,
}

impl NodeProc {
    /// Starts (or restarts) a dev node on `data_dir` and waits until it serves.
    pub fn start(data_dir: &Path) -> Result<Self> {
        Self::spawn(data_dir, &Self::dev_args(data_dir), &[])
    }

    /// Like [`NodeProc::start`], but the node creates `data_dir` itself and its logs go
    /// to `log_dir` (for data directories on a power-loss mount, where unsynced logs
    /// would vanish with the power cut).
    pub fn start_logged(data_dir: &Path, log_dir: &Path) -> Result<Self> {
        Self::spawn_in(
            None,
            data_dir,
            log_dir,
            &Self::dev_args(data_dir),
            &[],
            false,
        )
    }

    /// The arguments of `granary-node dev` on `data_dir` with OS-chosen ports.
    pub fn dev_args(data_dir: &Path) -> Vec<std::ffi::OsString> {
        let mut args: Vec<std::ffi::OsString> =
            vec!["dev".into(), "--data-dir".into(), data_dir.into()];
        for flag in [
            "--s3-listen",
            "--kv-listen",
            "--admin-listen",
            "--rpc-listen",
        ] {
            args.push(flag.into());
            args.push("127.0.0.1:0".into());
        }
        args
    }

    /// Like [`NodeProc::start`] with extra environment for the node process.
    pub fn start_with_env(data_dir: &Path, env: &[(&str, &str)]) -> Result<Self> {
        Self::spawn(data_dir, &Self::dev_args(data_dir), env)
    }

    /// Starts `granary-node serve --config FILE` (with extra environment) whose
    /// `data_dir` is `data_dir`; the admin token comes from the config or environment.
    pub fn serve(
        data_dir: &Path,
        config: &Path,
        env: &[(&str, &str)],
        admin_token: &str,
    ) -> Result<Self> {
        Self::serve_in(None, data_dir, config, env, admin_token)
    }

    /// [`NodeProc::serve`] inside network namespace `netns` (see [`netns::Net`]).
    pub fn serve_in(
        netns: Option<&str>,
        data_dir: &Path,
        config: &Path,
        env: &[(&str, &str)],
        admin_token: &str,
    ) -> Result<Self> {
        let args: Vec<std::ffi::OsString> = vec!["serve".into(), "--config".into(), config.into()];
        let mut node = Self::spawn_in(netns, data_dir, data_dir, &args, env, true)?;
        node.admin_token = admin_token.to_string();
        Ok(node)
    }

    fn spawn(data_dir: &Path, args: &[std::ffi::OsString], env: &[(&str, &str)]) -> Result<Self> {
        Self::spawn_in(None, data_dir, data_dir, args, env, true)
    }

    /// Starts a node (in network namespace `netns`, if given) with its logs in
    /// `log_dir`; `create_data_dir` false leaves creating the data directory to the node.
    fn spawn_in(
        netns: Option<&str>,
        data_dir: &Path,
        log_dir: &Path,
        args: &[std::ffi::OsString],
        env: &[(&str, &str)],
        create_data_dir: bool,
    ) -> Result<Self> {
        let dev = args.first().is_some_and(|a| a == "dev");
        if create_data_dir {
            std::fs::create_dir_all(data_dir)?;
        }
        std::fs::create_dir_all(log_dir)?;
        let _ = std::fs::remove_file(data_dir.join("endpoints.json"));
        let out = std::fs::File::create(log_dir.join("stdout.log"))?;
        let err = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log_dir.join("stderr.log"))?;
        // `ip netns exec` enters the namespace and execs the node: the pid stays the node's.
        let mut cmd = match netns {
            Some(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns]).arg(node_binary());
                c
            }
            None => Command::new(node_binary()),
        };
        let child = cmd
            .args(args)
            .envs(env.iter().copied())
            .env(
                "RUST_LOG",
                std::env::var("GRANARY_TEST_LOG").unwrap_or_else(|_| "warn".into()),
            )
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .context("spawning granary-node")?;
        let watchdog = Watchdog::watch(child.id(), "KILL", None);
        let mut node = NodeProc {
            child: Some(child),
            watchdog: None,
            data_dir: data_dir.to_path_buf(),
            s3: String::new(),
            kv: String::new(),
            admin: String::new(),
            admin_token: String::new(),
            access_key: String::new(),
            secret_key: String::new(),
        };
        // On an error, dropping `node` kills the child.
        node.watchdog = Some(watchdog?);
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Some(c) = node.child.as_mut()
                && let Some(status) = c.try_wait()?
            {
                let log = std::fs::read_to_string(log_dir.join("stderr.log")).unwrap_or_default();
                bail!("granary-node exited early ({status}):\n{log}");
            }
            if let Ok(text) = std::fs::read_to_string(data_dir.join("endpoints.json")) {
                let v: serde_json::Value = serde_json::from_str(&text)?;
                let s = |k: &str| v[k].as_str().unwrap_or_default().to_string();
                node.s3 = s("s3");
                node.kv = s("kv");
                node.admin = s("admin");
                break;
            }
            if Instant::now() > deadline {
                bail!("granary-node did not start within 60 s");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        if !dev {
            return Ok(node);
        }
        node.admin_token = std::fs::read_to_string(data_dir.join("admin.token"))?
            .trim()
            .to_string();
        // The banner follows the endpoints file; wait for the credentials in it.
        let deadline = Instant::now() + Duration::from_secs(10);
        while node.secret_key.is_empty() {
            let f = std::fs::File::open(log_dir.join("stdout.log"))?;
            for line in BufReader::new(f).lines() {
                let line = line?;
                let line = line.trim();
                if let Some(v) = line.strip_prefix("Access key id") {
                    node.access_key = v.trim().to_string();
                }
                if let Some(v) = line.strip_prefix("Secret key") {
                    node.secret_key = v.trim().to_string();
                }
            }
            if Instant::now() > deadline {
                bail!("no credentials in the dev banner");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(node)
    }

    /// The node's Prometheus metrics page.
    pub async fn metrics(&self) -> Result<String> {
        Ok(reqwest::get(format!("{}/metrics", self.admin))
            .await?
            .error_for_status()?
            .text()
            .await?)
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// SIGKILL. The page cache survives it, so a missing fsync does not show; for power
    /// loss put the data directory on a [`PowerLossFs`] and cut before the kill.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            // Disarmed before the child is reaped: until then its pid cannot be reused.
            if let Some(mut w) = self.watchdog.take() {
                w.release();
            }
            let _ = c.wait();
        }
        if let Some(mut w) = self.watchdog.take() {
            w.release();
        }
    }

    /// SIGTERM and wait for a graceful exit; returns whether it exited cleanly.
    pub fn stop(&mut self) -> bool {
        let Some(c) = self.child.take() else {
            return true;
        };
        let clean = terminate(c, Duration::from_secs(30)).is_some_and(|s| s.success());
        if let Some(mut w) = self.watchdog.take() {
            w.release();
        }
        clean
    }
}

/// A child process that is SIGKILLed (and reaped) on drop unless it was stopped before,
/// so a failing test or an early error never leaves it running.
pub struct ChildGuard(Option<Child>);

impl ChildGuard {
    pub fn new(child: Child) -> Self {
        Self(Some(child))
    }

    pub fn id(&self) -> Option<u32> {
        self.0.as_ref().map(Child::id)
    }

    /// Its exit status if it has exited (without waiting).
    pub fn try_wait(&mut self) -> std::io::Result<Option<std::process::ExitStatus>> {
        match self.0.as_mut() {
            Some(c) => c.try_wait(),
            None => Ok(None),
        }
    }

    /// SIGTERM; its exit status if it exits within `within` (see [`terminate`]).
    pub fn terminate(mut self, within: Duration) -> Option<std::process::ExitStatus> {
        terminate(self.0.take()?, within)
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        if let Some(mut c) = self.0.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// SIGTERM a process and wait up to `within` for it to exit. Returns its exit status, or
/// None when it did not exit in time (it is then SIGKILLed, so nothing is left running).
pub fn terminate(mut c: Child, within: Duration) -> Option<std::process::ExitStatus> {
    let _ = Command::new("kill")
        .args(["-TERM", &c.id().to_string()])
        .status();
    let deadline = Instant::now() + within;
    loop {
        if let Ok(Some(s)) = c.try_wait() {
            return Some(s);
        }
        if Instant::now() > deadline {
            let _ = c.kill();
            let _ = c.wait();
            return None;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

impl Drop for NodeProc {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// Every chunk file under a node's data directory `dir` (`engine/chunks/...`).
pub fn chunk_files(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.join("engine/chunks")];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(d).into_iter().flatten().flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p)
            } else {
                out.push(p)
            }
        }
    }
    out
}

/// A port free right now, for a server a test starts a little later. Chosen below the
/// kernel's ephemeral range (32768 and up by default): a port the kernel hands out for
/// `:0` is also what it gives outgoing connections (kubectl, clients), which could take
/// it before the server binds (a test failed so: "Address already in use").
pub fn free_port() -> u16 {
    // Never the same port twice in one test process (three calls in a row for one node's
    // listeners must not collide).
    static GIVEN: std::sync::Mutex<Vec<u16>> = std::sync::Mutex::new(Vec::new());
    let mut given = GIVEN
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    for _ in 0..1000 {
        let p: u16 = 20_000 + rand::random::<u16>() % 12_000;
        if !given.contains(&p) && TcpListener::bind(("127.0.0.1", p)).is_ok() {
            given.push(p);
            return p;
        }
    }
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}

/// A shell that kills a process if the test process dies without cleaning up (SIGKILL,
/// abort): it reads a pipe only the test process holds; "stop" releases it, EOF (the test
/// process is gone) fires it.
pub(crate) struct Watchdog {
    pipe: Option<std::process::ChildStdin>,
    shell: Option<std::process::Child>,
}

impl Watchdog {
    /// Watches `pid`: sends it `signal` if the test process dies, waits up to 10 s for it
    /// to exit, then removes `dir` (if any: a temporary directory `Drop` would have
    /// removed).
    pub(crate) fn watch(pid: u32, signal: &str, dir: Option<&Path>) -> Result<Watchdog> {
        Self::on_exit(
            r#"kill "-$2" "$1" 2>/dev/null
i=0; while kill -0 "$1" 2>/dev/null && [ $i -lt 100 ]; do sleep 0.1; i=$((i+1)); done
[ -n "$3" ] && rm -rf "$3""#,
            &[
                &pid.to_string(),
                signal,
                &dir.map(|d| d.display().to_string()).unwrap_or_default(),
            ],
        )
    }

    /// Runs shell `script` (with positional `args`) if the test process dies before
    /// [`Watchdog::release`].
    pub(crate) fn on_exit(script: &str, args: &[&str]) -> Result<Watchdog> {
        // Rust opens pipes close-on-exec, so only this process holds the write end. The
        // shell is a process group of its own and ignores the terminal's and a timeout's
        // signals: a Ctrl-C or a group kill that ends the test must still fire it.
        use std::os::unix::process::CommandExt;
        let mut shell = Command::new("sh")
            .process_group(0)
            .arg("-c")
            .arg(format!(
                "trap '' INT TERM HUP\nread line; [ \"$line\" = stop ] && exit 0\n{script}\nexit 0"
            ))
            .arg("granary-watchdog")
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("spawning a watchdog shell")?;
        Ok(Watchdog {
            pipe: shell.stdin.take(),
            shell: Some(shell),
        })
    }

    /// Releases the watchdog (the process was stopped) and reaps it.
    pub(crate) fn release(&mut self) {
        if let Some(mut pipe) = self.pipe.take() {
            let _ = std::io::Write::write_all(&mut pipe, b"stop\n");
        }
        if let Some(mut w) = self.shell.take() {
            let _ = w.wait();
        }
    }
}

/// A private Postgres server in a temporary directory, stopped on drop.
pub struct PgServer {
    dir: tempfile::TempDir,
    bin: PathBuf,
    pub port: u16,
    /// Stops the server (and removes its directory) if the test process is killed.
    watchdog: Watchdog,
}

fn pg_bin_dir() -> Result<PathBuf> {
    if let Ok(p) = std::env::var("PG_BIN_DIR") {
        return Ok(PathBuf::from(p));
    }
    let mut versions: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .context(
            "Postgres is not installed (apt-get install postgresql); the test command installs it",
        )?
        .filter_map(|e| e.ok().map(|e| e.path().join("bin")))
        .filter(|p| p.join("initdb").exists())
        .collect();
    versions.sort();
    versions
        .pop()
        .context("no initdb under /usr/lib/postgresql/*/bin")
}

/// Runs a Postgres tool, as the `postgres` user when we are root (initdb refuses root).
fn pg_command(bin: &Path, tool: &str) -> Command {
    let is_root =
        std::env::var("USER").map(|u| u == "root").unwrap_or(false) || unsafe_geteuid_is_root();
    if is_root {
        let mut c = Command::new("runuser");
        c.args(["-u", "postgres", "--"]).arg(bin.join(tool));
        c
    } else {
        Command::new(bin.join(tool))
    }
}

fn unsafe_geteuid_is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .map(|o| o.stdout.starts_with(b"0"))
        .unwrap_or(false)
}

impl PgServer {
    pub fn start() -> Result<Self> {
        Self::start_listening(None)
    }

    /// Starts a server that also accepts TLS, with a certificate for `localhost` and
    /// 127.0.0.1 signed by a CA of its own ([`PgServer::ca_cert`]).
    pub fn start_tls() -> Result<Self> {
        Self::start_with(None, true)
    }

    /// The CA certificate of a [`PgServer::start_tls`] server.
    pub fn ca_cert(&self) -> Option<PathBuf> {
        let p = self.dir.path().join("ca.crt");
        p.exists().then_some(p)
    }

    /// Starts a server that also listens on `extra.0` and admits clients from the subnet
    /// `extra.1` (for nodes in network namespaces).
    pub fn start_listening(extra: Option<(std::net::Ipv4Addr, &str)>) -> Result<Self> {
        Self::start_with(extra, false)
    }

    fn start_with(extra: Option<(std::net::Ipv4Addr, &str)>, tls: bool) -> Result<Self> {
        let bin = pg_bin_dir()?;
        let dir = tempfile::Builder::new().prefix("granary-pg").tempdir()?;
        let _ = Command::new("chown")
            .args(["-R", "postgres:postgres"])
            .arg(dir.path())
            .status();
        let data = dir.path().join("data");
        let st = pg_command(&bin, "initdb")
            .args(["-D"])
            .arg(&data)
            .args(["-U", "granary", "--auth=trust", "-E", "UTF8", "--no-sync"])
            .stdout(Stdio::null())
            .status()?;
        if !st.success() {
            bail!("initdb failed");
        }
        let port = free_port();
        let mut listen = "127.0.0.1".to_string();
        if let Some((addr, subnet)) = extra {
            listen = format!("127.0.0.1,{addr}");
            let mut hba = std::fs::OpenOptions::new()
                .append(true)
                .open(data.join("pg_hba.conf"))?;
            std::io::Write::write_all(
                &mut hba,
                format!("host all all {subnet} trust\n").as_bytes(),
            )?;
        }
        let mut opts = format!(
            "-p {port} -k {} -c listen_addresses={listen} -c fsync=off",
            dir.path().display()
        );
        if tls {
            make_tls_certs(dir.path())?;
            opts.push_str(&format!(
                " -c ssl=on -c ssl_cert_file={0}/server.crt -c ssl_key_file={0}/server.key",
                dir.path().display()
            ));
        }
        let st = pg_command(&bin, "pg_ctl")
            .args(["-D"])
            .arg(&data)
            .args(["-o", &opts, "-l"])
            .arg(dir.path().join("pg.log"))
            .args(["-w", "start"])
            .stdout(Stdio::null())
            .status()?;
        if !st.success() {
            let log = std::fs::read_to_string(dir.path().join("pg.log")).unwrap_or_default();
            bail!("pg_ctl start failed:\n{log}");
        }
        // The postmaster's pid is the first line of its pid file; SIGQUIT is its
        // immediate shutdown.
        let watchdog = std::fs::read_to_string(data.join("postmaster.pid"))
            .context("reading postmaster.pid")
            .and_then(|text| {
                text.lines()
                    .next()
                    .and_then(|l| l.trim().parse::<u32>().ok())
                    .context("postmaster.pid has no pid")
            })
            .and_then(|pid| Watchdog::watch(pid, "QUIT", Some(dir.path())));
        let watchdog = match watchdog {
            Ok(w) => w,
            Err(e) => {
                // Not left running without a watchdog.
                let _ = pg_command(&bin, "pg_ctl")
                    .args(["-D"])
                    .arg(&data)
                    .args(["-m", "immediate", "-w", "stop"])
                    .stdout(Stdio::null())
                    .status();
                return Err(e);
            }
        };
        Ok(Self {
            dir,
            bin,
            port,
            watchdog,
        })
    }

    pub fn url(&self, db: &str) -> String {
        format!("postgres://granary@127.0.0.1:{}/{db}", self.port)
    }

    /// The URL of `db` through another of the server's addresses.
    pub fn url_at(&self, host: std::net::Ipv4Addr, db: &str) -> String {
        format!("postgres://granary@{host}:{}/{db}", self.port)
    }

    /// Creates a fresh database and returns its URL.
    pub fn create_db(&self, name: &str) -> Result<String> {
        let st = pg_command(&self.bin, "createdb")
            .args([
                "-h",
                "127.0.0.1",
                "-p",
                &self.port.to_string(),
                "-U",
                "granary",
                name,
            ])
            .status()?;
        if !st.success() {
            bail!("createdb {name} failed");
        }
        Ok(self.url(name))
    }
}

/// A CA and a server certificate for `localhost` / 127.0.0.1 in `dir` (openssl), the key
/// readable by the `postgres` user only, as the server demands.
fn make_tls_certs(dir: &Path) -> Result<()> {
    let run = |args: &[&str]| -> Result<()> {
        let out = Command::new("openssl")
            .args(args)
            .current_dir(dir)
            .output()
            .context("running openssl (the test command installs it)")?;
        if !out.status.success() {
            bail!(
                "openssl {}: {}",
                args.join(" "),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(())
    };
    run(&[
        "req",
        "-x509",
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:P-256",
        "-nodes",
        "-days",
        "2",
        "-subj",
        "/CN=granary test CA",
        "-keyout",
        "ca.key",
        "-out",
        "ca.crt",
    ])?;
    run(&[
        "req",
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:P-256",
        "-nodes",
        "-subj",
        "/CN=localhost",
        "-keyout",
        "server.key",
        "-out",
        "server.csr",
    ])?;
    std::fs::write(
        dir.join("san.ext"),
        "subjectAltName=DNS:localhost,IP:127.0.0.1\nextendedKeyUsage=serverAuth\n",
    )?;
    run(&[
        "x509",
        "-req",
        "-in",
        "server.csr",
        "-CA",
        "ca.crt",
        "-CAkey",
        "ca.key",
        "-CAcreateserial",
        "-days",
        "2",
        "-extfile",
        "san.ext",
        "-out",
        "server.crt",
    ])?;
    let _ = Command::new("chown")
        .args(["postgres:postgres", "server.key", "server.crt"])
        .current_dir(dir)
        .status();
    std::fs::set_permissions(
        dir.join("server.key"),
        std::os::unix::fs::PermissionsExt::from_mode(0o600),
    )?;
    Ok(())
}

impl Drop for PgServer {
    fn drop(&mut self) {
        let _ = pg_command(&self.bin, "pg_ctl")
            .args(["-D"])
            .arg(self.dir.path().join("data"))
            .args(["-m", "immediate", "-w", "stop"])
            .stdout(Stdio::null())
            .status();
        self.watchdog.release();
    }
}

/// A SigV4-signing raw HTTP client (signed with the AWS SDK's signer), for the KV API
/// and for hand-made S3 requests no SDK would send.
#[derive(Clone)]
pub struct KvClient {
    /// Service name in the signature scope; `s3` also sends `x-amz-content-sha256`.
    pub service: &'static str,
    /// Region in the signature scope. Default `us-east-1` (the dev node's region).
    pub region: String,
    pub base: String,
    pub access_key: String,
    pub secret_key: String,
    http: reqwest::Client,
}

impl KvClient {
    pub fn new(base: &str, access_key: &str, secret_key: &str) -> Self {
        Self {
            service: "kv",
            region: "us-east-1".into(),
            base: base.trim_end_matches('/').to_string(),
            access_key: access_key.into(),
            secret_key: secret_key.into(),
            http: reqwest::Client::new(),
        }
    }

    /// GETs `path` and asserts it answers 200 with `expected` (`what` names it in a
    /// failure).
    pub async fn assert_value(&self, path: &str, expected: &[u8], what: &str) {
        let r = self.send("GET", path, &[], vec![]).await.unwrap();
        assert_eq!(r.status(), 200, "{what}");
        assert_eq!(r.bytes().await.unwrap().as_ref(), expected, "{what}");
    }

    /// Sends a signed request; `path` starts with `/kv/v1/`.
    pub async fn send(
        &self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: Vec<u8>,
    ) -> Result<reqwest::Response> {
        self.send_with_unsigned(method, path, headers, &[], body)
            .await
    }

    /// The headers of a signed request (the given ones, plus the signature's), without
    /// sending it: for tests that send the request by hand (say, a body that stalls).
    pub fn signed_headers(
        &self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: &[u8],
    ) -> Result<Vec<(String, String)>> {
        use aws_sigv4::http_request::{SignableBody, SignableRequest, SigningSettings, sign};
        let url = format!("{}{}", self.base, path);
        let mut req = http::Request::builder().method(method).uri(&url);
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        let mut req = req.body(())?;
        let identity = aws_credential_types::Credentials::new(
            &self.access_key,
            &self.secret_key,
            None,
            None,
            "test",
        )
        .into();
        let params = aws_sigv4::sign::v4::SigningParams::builder()
            .identity(&identity)
            .region(&self.region)
            .name(self.service)
            .time(std::time::SystemTime::now())
            .settings({
                let mut s = SigningSettings::default();
                if self.service == "s3" {
                    s.payload_checksum_kind =
                        aws_sigv4::http_request::PayloadChecksumKind::XAmzSha256;
                    s.percent_encoding_mode = aws_sigv4::http_request::PercentEncodingMode::Single;
                }
                s
            })
            .build()?
            .into();
        let hdrs: Vec<(String, String)> = req
            .headers()
            .iter()
            .map(|(k, v)| {
                (
                    k.as_str().to_string(),
                    v.to_str().unwrap_or_default().to_string(),
                )
            })
            .collect();
        let signable = SignableRequest::new(
            method,
            &url,
            hdrs.iter().map(|(k, v)| (k.as_str(), v.as_str())),
            SignableBody::Bytes(body),
        )?;
        let (instructions, _) = sign(signable, &params)?.into_parts();
        instructions.apply_to_request_http1x(&mut req);
        Ok(req
            .headers()
            .iter()
            .map(|(k, v)| {
                (
                    k.as_str().to_string(),
                    String::from_utf8_lossy(v.as_bytes()).into_owned(),
                )
            })
            .collect())
    }

    /// Like [`KvClient::send`], then adds `unsigned` headers after signing (what an
    /// attacker replaying a captured request can do).
    pub async fn send_with_unsigned(
        &self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        unsigned: &[(&str, &str)],
        body: Vec<u8>,
    ) -> Result<reqwest::Response> {
        let url = format!("{}{}", self.base, path);
        let signed = self.signed_headers(method, path, headers, &body)?;
        let mut r = self
            .http
            .request(reqwest::Method::from_bytes(method.as_bytes())?, &url);
        for (k, v) in &signed {
            r = r.header(k.as_str(), v.as_str());
        }
        for (k, v) in unsigned {
            r = r.header(*k, *v);
        }
        Ok(r.body(body).send().await?)
    }
}

/// An admin API client for tests.
pub struct Admin {
    pub base: String,
    pub token: String,
    pub http: reqwest::Client,
}

impl Admin {
    pub fn new(node: &NodeProc) -> Self {
        Self {
            base: node.admin.clone(),
            token: node.admin_token.clone(),
            http: reqwest::Client::new(),
        }
    }

    pub async fn call(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<serde_json::Value>,
    ) -> Result<(u16, serde_json::Value)> {
        let mut r = self
            .http
            .request(method, format!("{}/admin/v1{path}", self.base))
            .bearer_auth(&self.token);
        if let Some(b) = body {
            r = r.json(&b);
        }
        let resp = r.send().await?;
        let status = resp.status().as_u16();
        let text = resp.text().await?;
        let v = if text.is_empty() {
            serde_json::Value::Null
        } else {
            serde_json::from_str(&text)?
        };
        Ok((status, v))
    }

    /// Creates a tenant with one key; returns (access key, secret).
    pub async fn tenant_with_key(&self, name: &str) -> Result<(String, String)> {
        self.tenant_with_spec(name, serde_json::json!({})).await
    }

    /// Creates a tenant with `spec` (quotas, qos, ...) and one key; returns (access key,
    /// secret).
    pub async fn tenant_with_spec(
        &self,
        name: &str,
        spec: serde_json::Value,
    ) -> Result<(String, String)> {
        let mut body = spec;
        body["name"] = serde_json::json!(name);
        let (s, v) = self
            .call(reqwest::Method::POST, "/tenants", Some(body))
            .await?;
        anyhow::ensure!(s == 201, "create tenant: {s} {v}");
        let (s, v) = self
            .call(
                reqwest::Method::POST,
                &format!("/tenants/{name}/keys"),
                None,
            )
            .await?;
        anyhow::ensure!(s == 201, "create key: {s} {v}");
        Ok((
            v["accessKeyId"].as_str().unwrap_or_default().into(),
            v["secretAccessKey"].as_str().unwrap_or_default().into(),
        ))
    }
}

/// An AWS SDK S3 client for a node, path-style, without retries (a failed request
/// must stay failed in crash tests).
pub fn s3_client(endpoint: &str, access_key: &str, secret_key: &str) -> aws_sdk_s3::Client {
    use aws_sdk_s3::config::{Credentials, Region};
    let conf = aws_sdk_s3::Config::builder()
        .behavior_version_latest()
        .region(Region::new("us-east-1"))
        .endpoint_url(endpoint)
        .credentials_provider(Credentials::new(access_key, secret_key, None, None, "test"))
        .force_path_style(true)
        .retry_config(aws_sdk_s3::config::retry::RetryConfig::disabled())
        .build();
    aws_sdk_s3::Client::from_conf(conf)
}

/// Gregorian (year, month, day) of a day count since 1970-01-01.
pub fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (yoe + era * 400 + i64::from(m <= 2), m, d)
}
