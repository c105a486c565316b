//! A real Kubernetes control plane for end-to-end tests, started the way
//! controller-runtime's envtest starts one: `etcd` and `kube-apiserver` (and, on request,
//! `kube-controller-manager`) as plain processes on loopback ports, with certificates made
//! by the `openssl` CLI in a temporary directory. No kubelet and no container runtime exist,
//! so Pods are created as objects and stay `Pending`.
//!
//! The binaries come from `tests/e2e/tools/k8s-tools.sh` (built once from pinned Go
//! modules into a cache outside the repository); `GRANARY_K8S_BIN_DIR` overrides it.
//!
//! Every process is killed on drop (SIGTERM, then SIGKILL after 5 s). Each one also has a
//! watchdog shell reading a pipe held by the test process: if the test process dies without
//! running `Drop` (SIGKILL, abort), the pipe closes and the watchdog SIGKILLs the process.

use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

/// How long the apiserver may take to become ready.
const APISERVER_READY_TIMEOUT: Duration = Duration::from_secs(120);
/// How long etcd may take to answer `/health`.
const ETCD_READY_TIMEOUT: Duration = Duration::from_secs(60);
/// How long the controller manager may take to create the `default` ServiceAccount.
const CONTROLLER_MANAGER_READY_TIMEOUT: Duration = Duration::from_secs(90);
/// Grace between SIGTERM and SIGKILL on drop.
const STOP_GRACE: Duration = Duration::from_secs(5);

/// The directory holding `kube-apiserver`, `kube-controller-manager`, `kubectl`, `etcd`
/// and `helm`: `$GRANARY_K8S_BIN_DIR`, or the output of `tests/e2e/tools/k8s-tools.sh`
/// (run at most once per test process, under a file lock so that parallel test
/// processes never build twice at once).
pub fn k8s_bin_dir() -> Result<PathBuf> {
    static DIR: OnceLock<std::result::Result<PathBuf, String>> = OnceLock::new();
    DIR.get_or_init(|| find_bin_dir().map_err(|e| format!("{e:#}")))
        .clone()
        .map_err(|e| anyhow::anyhow!("{e}"))
}

fn find_bin_dir() -> Result<PathBuf> {
    if let Ok(dir) = std::env::var("GRANARY_K8S_BIN_DIR") {
        return Ok(PathBuf::from(dir));
    }
    let dir = crate::build_tool("k8s-tools.sh")?;
    for bin in [
        "etcd",
        "kube-apiserver",
        "kube-controller-manager",
        "kubectl",
    ] {
        if !dir.join(bin).is_file() {
            bail!(
                "k8s-tools.sh printed {} but {bin} is not in it",
                dir.display()
            );
        }
    }
    Ok(dir)
}

/// Polls `f` every 200 ms until it yields `Some`, failing after `timeout` with `what` and
/// the last error `f` returned (errors from `f` count as "not yet").
pub fn poll_until<T>(
    timeout: Duration,
    what: &str,
    mut f: impl FnMut() -> Result<Option<T>>,
) -> Result<T> {
    let deadline = Instant::now() + timeout;
    let mut last_err = None;
    loop {
        match f() {
            Ok(Some(v)) => return Ok(v),
            Ok(None) => {}
            Err(e) => last_err = Some(e),
        }
        if Instant::now() > deadline {
            match last_err {
                Some(e) => {
                    bail!("timed out after {timeout:?} waiting for {what}; last error: {e:#}")
                }
                None => bail!("timed out after {timeout:?} waiting for {what}"),
            }
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// A process started by the control plane, with its log file and its watchdog.
pub(crate) struct Proc {
    pub(crate) name: &'static str,
    pub(crate) child: Child,
    pub(crate) log: PathBuf,
    /// SIGKILLs the process if the test process dies without stopping it.
    watchdog: Option<crate::Watchdog>,
}

impl Proc {
    pub(crate) fn spawn(name: &'static str, mut cmd: Command, log: PathBuf) -> Result<Proc> {
        let out =
            std::fs::File::create(&log).with_context(|| format!("creating {}", log.display()))?;
        let child = cmd
            .stdin(Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out)
            .spawn()
            .with_context(|| format!("spawning {name} ({:?})", cmd.get_program()))?;
        let watchdog = crate::Watchdog::watch(child.id(), "KILL", None);
        let mut proc = Proc {
            name,
            child,
            log,
            watchdog: None,
        };
        // On an error, dropping `proc` kills the child.
        proc.watchdog = Some(watchdog?);
        Ok(proc)
    }

    /// Polls `ready` every 200 ms until it holds; fails at once if the process exits, or
    /// after `timeout`.
    pub(crate) fn wait_ready(
        &mut self,
        timeout: Duration,
        what: &str,
        mut ready: impl FnMut() -> bool,
    ) -> Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                bail!("{} exited ({status}) before {what} was ready", self.name);
            }
            if ready() {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!("{}: {what} not ready after {timeout:?}", self.name);
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    pub(crate) fn log_tail(&self, lines: usize) -> String {
        log_tail(&self.log, lines)
    }

    /// SIGTERM, wait up to `STOP_GRACE`, then SIGKILL; reaps the process and its watchdog.
    pub(crate) fn stop(&mut self) {
        if self.child.try_wait().ok().flatten().is_none() {
            let _ = Command::new("kill")
                .args(["-TERM", &self.child.id().to_string()])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status();
            let deadline = Instant::now() + STOP_GRACE;
            loop {
                if let Ok(Some(_)) = self.child.try_wait() {
                    break;
                }
                if Instant::now() > deadline {
                    let _ = self.child.kill();
                    let _ = self.child.wait();
                    break;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        if let Some(mut w) = self.watchdog.take() {
            w.release();
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.stop();
    }
}

fn log_tail(path: &Path, lines: usize) -> String {
    let Ok(mut f) = std::fs::File::open(path) else {
        return format!("(no log at {})", path.display());
    };
    // The last 64 KiB is plenty for `lines` lines of any of these logs.
    let len = f.metadata().map(|m| m.len()).unwrap_or(0);
    let _ = f.seek(SeekFrom::Start(len.saturating_sub(64 * 1024)));
    let mut buf = Vec::new();
    let _ = f.read_to_end(&mut buf);
    let text = String::from_utf8_lossy(&buf);
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

pub(crate) fn run(cmd: &mut Command) -> Result<()> {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("running {:?}", cmd.get_program()))?;
    if !out.status.success() {
        bail!(
            "{:?} {:?} failed ({}):\n{}{}",
            cmd.get_program(),
            cmd.get_args().collect::<Vec<_>>(),
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(())
}

/// Paths of the certificates and keys of one control plane.
#[derive(Debug, Clone)]
pub struct Pki {
    pub ca_cert: PathBuf,
    pub ca_key: PathBuf,
    pub server_cert: PathBuf,
    pub server_key: PathBuf,
    pub admin_cert: PathBuf,
    pub admin_key: PathBuf,
    /// RSA private key that signs ServiceAccount tokens.
    pub sa_key: PathBuf,
    /// Its public half, which verifies them.
    pub sa_pub: PathBuf,
}

impl Pki {
    /// A CA, an apiserver serving certificate, an admin client certificate
    /// (`CN=admin, O=system:masters`) and a ServiceAccount key pair, made with `openssl`.
    fn generate(dir: &Path, node_ip: Option<std::net::Ipv4Addr>) -> Result<Pki> {
        std::fs::create_dir_all(dir)?;
        let p = |f: &str| dir.join(f);
        let pki = Pki {
            ca_cert: p("ca.crt"),
            ca_key: p("ca.key"),
            server_cert: p("apiserver.crt"),
            server_key: p("apiserver.key"),
            admin_cert: p("admin.crt"),
            admin_key: p("admin.key"),
            sa_key: p("sa.key"),
            sa_pub: p("sa.pub"),
        };
        let openssl = || {
            let mut c = Command::new("openssl");
            c.current_dir(dir);
            c
        };
        run(openssl()
            .args([
                "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-sha256", "-days", "3",
            ])
            .args(["-subj", "/CN=granary-test-ca"])
            .args(["-addext", "basicConstraints=critical,CA:TRUE"])
            .args([
                "-addext",
                "keyUsage=critical,keyCertSign,cRLSign,digitalSignature",
            ])
            .arg("-keyout")
            .arg(&pki.ca_key)
            .arg("-out")
            .arg(&pki.ca_cert))
        .context("making the CA")?;

        let sign = |name: &str, subj: &str, ext: &str, key: &Path, cert: &Path| -> Result<()> {
            let csr = dir.join(format!("{name}.csr"));
            let extfile = dir.join(format!("{name}.ext"));
            std::fs::write(&extfile, ext)?;
            run(openssl()
                .args(["req", "-new", "-newkey", "rsa:2048", "-nodes", "-sha256"])
                .args(["-subj", subj])
                .arg("-keyout")
                .arg(key)
                .arg("-out")
                .arg(&csr))
            .with_context(|| format!("making the {name} key and CSR"))?;
            run(openssl()
                .args(["x509", "-req", "-sha256", "-days", "3", "-set_serial"])
                .arg(format!("0x{:016x}", rand::random::<u64>() >> 1))
                .arg("-in")
                .arg(&csr)
                .arg("-CA")
                .arg(&pki.ca_cert)
                .arg("-CAkey")
                .arg(&pki.ca_key)
                .arg("-extfile")
                .arg(&extfile)
                .arg("-out")
                .arg(cert))
            .with_context(|| format!("signing the {name} certificate"))
        };
        let node_san = node_ip.map(|ip| format!(",IP:{ip}")).unwrap_or_default();
        sign(
            "apiserver",
            "/CN=kube-apiserver",
            &format!(
                "basicConstraints=critical,CA:FALSE\n\
                 keyUsage=critical,digitalSignature,keyEncipherment\n\
                 extendedKeyUsage=serverAuth\n\
                 subjectAltName=IP:127.0.0.1,DNS:localhost,IP:10.0.0.1,DNS:kubernetes,\
                 DNS:kubernetes.default,DNS:kubernetes.default.svc,\
                 DNS:kubernetes.default.svc.cluster.local{node_san}\n"
            ),
            &pki.server_key,
            &pki.server_cert,
        )?;
        sign(
            "admin",
            "/O=system:masters/CN=admin",
            "basicConstraints=critical,CA:FALSE\n\
             keyUsage=critical,digitalSignature,keyEncipherment\n\
             extendedKeyUsage=clientAuth\n",
            &pki.admin_key,
            &pki.admin_cert,
        )?;
        run(openssl()
            .args([
                "genpkey",
                "-algorithm",
                "RSA",
                "-pkeyopt",
                "rsa_keygen_bits:2048",
            ])
            .arg("-out")
            .arg(&pki.sa_key))
        .context("making the ServiceAccount signing key")?;
        run(openssl()
            .args(["pkey", "-pubout", "-in"])
            .arg(&pki.sa_key)
            .arg("-out")
            .arg(&pki.sa_pub))
        .context("extracting the ServiceAccount public key")?;
        Ok(pki)
    }
}

/// A running etcd + kube-apiserver (+ optionally kube-controller-manager) on loopback.
pub struct ControlPlane {
    /// Admin kubeconfig (client certificate `CN=admin, O=system:masters`).
    pub kubeconfig: PathBuf,
    /// `https://127.0.0.1:PORT`.
    pub server: String,
    /// Where `kubectl`, `helm` and the control-plane binaries are.
    pub bin_dir: PathBuf,
    /// `http://127.0.0.1:PORT` of etcd.
    pub etcd_url: String,
    pub pki: Pki,
    /// The address of the real node ([`ControlPlane::start_for_node`]): the apiserver
    /// listens on it and advertises it (the `kubernetes` Service routes there).
    pub node_ip: Option<std::net::Ipv4Addr>,
    /// Running processes, in start order (stopped in reverse).
    procs: Vec<Proc>,
    kubeconfigs_written: AtomicUsize,
    // Last field: removed after the processes are gone.
    dir: tempfile::TempDir,
}

impl ControlPlane {
    /// Makes certificates, starts etcd and kube-apiserver, waits until the apiserver's
    /// `/readyz` answers `ok` to the admin client, and writes the admin kubeconfig.
    pub fn start() -> Result<ControlPlane> {
        Self::start_inner(None)
    }

    /// A control plane for a real node ([`crate::kubelet`]): the apiserver listens on
    /// `node_ip` (which must already be a local address) instead of loopback, so that
    /// pods reach it through the `kubernetes` Service, and it reaches the kubelet with the
    /// admin client certificate.
    pub fn start_for_node(node_ip: std::net::Ipv4Addr) -> Result<ControlPlane> {
        Self::start_inner(Some(node_ip))
    }

    fn start_inner(node_ip: Option<std::net::Ipv4Addr>) -> Result<ControlPlane> {
        let bin_dir = k8s_bin_dir()?;
        let dir = tempfile::Builder::new().prefix("granary-k8s").tempdir()?;
        let pki = Pki::generate(&dir.path().join("pki"), node_ip)?;
        let mut cp = ControlPlane {
            kubeconfig: dir.path().join("admin.kubeconfig"),
            server: String::new(),
            bin_dir,
            etcd_url: String::new(),
            pki,
            node_ip,
            procs: Vec::new(),
            kubeconfigs_written: AtomicUsize::new(0),
            dir,
        };
        cp.start_etcd()?;
        cp.start_apiserver()?;
        let kubeconfig = serde_json::json!({
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [{"name": "granary-test", "cluster": {
                "server": cp.server,
                "certificate-authority": cp.pki.ca_cert,
            }}],
            "users": [{"name": "admin", "user": {
                "client-certificate": cp.pki.admin_cert,
                "client-key": cp.pki.admin_key,
            }}],
            "contexts": [{"name": "admin", "context": {"cluster": "granary-test", "user": "admin"}}],
            "current-context": "admin",
        });
        std::fs::write(&cp.kubeconfig, serde_json::to_vec_pretty(&kubeconfig)?)?;
        Ok(cp)
    }

    /// The temporary directory holding certificates, data and logs.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    fn start_etcd(&mut self) -> Result<()> {
        let mut last = String::new();
        // Ports are picked by binding and releasing; retry if another process took one.
        for _ in 0..3 {
            let client = crate::free_port();
            let peer = crate::free_port();
            let data = self.dir.path().join("etcd");
            let _ = std::fs::remove_dir_all(&data);
            let client_url = format!("http://127.0.0.1:{client}");
            let peer_url = format!("http://127.0.0.1:{peer}");
            let mut cmd = Command::new(self.bin_dir.join("etcd"));
            cmd.args(["--name", "default"])
                .arg("--data-dir")
                .arg(&data)
                .args(["--listen-client-urls", &client_url])
                .args(["--advertise-client-urls", &client_url])
                .args(["--listen-peer-urls", &peer_url])
                .args(["--initial-advertise-peer-urls", &peer_url])
                .args(["--initial-cluster", &format!("default={peer_url}")])
                .args(["--unsafe-no-fsync", "--log-level", "warn"]);
            let mut proc = Proc::spawn("etcd", cmd, self.dir.path().join("etcd.log"))?;
            let health = format!("{client_url}/health");
            let res = proc.wait_ready(ETCD_READY_TIMEOUT, "/health", || {
                curl(&["--max-time", "2", &health])
                    .is_ok_and(|body| body.contains("\"health\":\"true\""))
            });
            match res {
                Ok(()) => {
                    self.etcd_url = client_url;
                    self.procs.push(proc);
                    return Ok(());
                }
                Err(e) => {
                    last = format!("{e:#}\n--- etcd log tail ---\n{}", proc.log_tail(40));
                    let in_use = last.contains("address already in use");
                    drop(proc);
                    if !in_use {
                        break;
                    }
                }
            }
        }
        bail!("etcd did not start: {last}")
    }

    fn start_apiserver(&mut self) -> Result<()> {
        let mut last = String::new();
        for _ in 0..3 {
            let port = crate::free_port();
            let host = self
                .node_ip
                .map_or_else(|| "127.0.0.1".to_string(), |ip| ip.to_string());
            let server = format!("https://{host}:{port}");
            let cert_dir = self.dir.path().join("apiserver-certs");
            std::fs::create_dir_all(&cert_dir)?;
            let pki = &self.pki;
            let mut cmd = Command::new(self.bin_dir.join("kube-apiserver"));
            cmd.arg(format!("--etcd-servers={}", self.etcd_url))
                .arg(format!("--secure-port={port}"))
                .arg(format!("--bind-address={host}"))
                .arg(format!("--advertise-address={host}"));
            if self.node_ip.is_some() {
                // Pods reach the apiserver through the `kubernetes` Service, whose
                // endpoint is the advertised address; `kubectl logs` reaches the kubelet
                // on its InternalIP (not its name, which no DNS resolves) as the admin.
                cmd.arg("--kubelet-preferred-address-types=InternalIP")
                    .arg(path_flag("--kubelet-client-certificate", &pki.admin_cert))
                    .arg(path_flag("--kubelet-client-key", &pki.admin_key));
            } else {
                // The lease reconciler refuses a loopback address for the `kubernetes`
                // Service's endpoints; nothing here runs in a Pod, so keep none.
                cmd.arg("--endpoint-reconciler-type=none");
            }
            cmd.arg(path_flag("--cert-dir", &cert_dir))
                .arg(path_flag("--tls-cert-file", &pki.server_cert))
                .arg(path_flag("--tls-private-key-file", &pki.server_key))
                .arg(path_flag("--client-ca-file", &pki.ca_cert))
                .arg("--service-account-issuer=https://kubernetes.default.svc")
                .arg(path_flag("--service-account-key-file", &pki.sa_pub))
                .arg(path_flag("--service-account-signing-key-file", &pki.sa_key))
                .arg("--service-cluster-ip-range=10.0.0.0/24")
                .arg("--authorization-mode=RBAC")
                .arg("--allow-privileged=true")
                .arg("--profiling=false");
            let mut proc = Proc::spawn(
                "kube-apiserver",
                cmd,
                self.dir.path().join("kube-apiserver.log"),
            )?;
            let readyz = format!("{server}/readyz");
            let (ca, cert, key) = (
                path_str(&pki.ca_cert)?,
                path_str(&pki.admin_cert)?,
                path_str(&pki.admin_key)?,
            );
            let res = proc.wait_ready(APISERVER_READY_TIMEOUT, "/readyz", || {
                curl(&[
                    "--max-time",
                    "5",
                    "--cacert",
                    ca,
                    "--cert",
                    cert,
                    "--key",
                    key,
                    &readyz,
                ])
                .is_ok_and(|body| body.trim() == "ok")
            });
            match res {
                Ok(()) => {
                    self.server = server;
                    self.procs.push(proc);
                    return Ok(());
                }
                Err(e) => {
                    last = format!(
                        "{e:#}\n--- kube-apiserver log tail ---\n{}",
                        proc.log_tail(60)
                    );
                    let in_use = last.contains("address already in use");
                    drop(proc);
                    if !in_use {
                        break;
                    }
                }
            }
        }
        bail!("kube-apiserver did not become ready: {last}")
    }

    /// Starts kube-controller-manager with the controllers that work without nodes or a
    /// cloud (StatefulSets, ReplicaSets, Deployments, Jobs, garbage collection, namespace
    /// deletion, ServiceAccounts and their tokens, ...), and waits until it has created
    /// the `default` ServiceAccount in the `default` namespace.
    pub fn start_controller_manager(&mut self) -> Result<()> {
        if self
            .procs
            .iter()
            .any(|p| p.name == "kube-controller-manager")
        {
            return Ok(());
        }
        let pki = &self.pki;
        let mut cmd = Command::new(self.bin_dir.join("kube-controller-manager"));
        let mut controllers = CONTROLLERS.to_vec();
        if self.node_ip.is_some() {
            // Takes the not-ready taint off the node once its kubelet reports Ready.
            controllers.push("node-lifecycle-controller");
        }
        cmd.arg(path_flag("--kubeconfig", &self.kubeconfig))
            .arg(format!("--controllers={}", controllers.join(",")))
            .arg(path_flag("--service-account-private-key-file", &pki.sa_key))
            .arg(path_flag("--root-ca-file", &pki.ca_cert))
            .arg("--leader-elect=false")
            .arg("--use-service-account-credentials=false")
            // No HTTPS endpoint (no port to collide on, no delegated authn to set up).
            .arg("--secure-port=0");
        let mut proc = Proc::spawn(
            "kube-controller-manager",
            cmd,
            self.dir.path().join("kube-controller-manager.log"),
        )?;
        let res = proc.wait_ready(
            CONTROLLER_MANAGER_READY_TIMEOUT,
            "the ServiceAccount default/default (made by its serviceaccount controller)",
            || {
                self.kubectl(&["get", "serviceaccount", "default", "-n", "default"])
                    .is_ok()
            },
        );
        if let Err(e) = res {
            bail!(
                "kube-controller-manager did not start: {e:#}\n--- its log tail ({}) ---\n{}",
                proc.log.display(),
                proc.log_tail(60)
            );
        }
        self.procs.push(proc);
        Ok(())
    }

    /// Runs `kubectl` as the admin; returns stdout, or an error with stderr.
    /// Applies the Granary CRDs (`crds/granary.dev.yaml`) and waits until both are
    /// Established.
    pub fn install_crds(&self) -> Result<()> {
        let crds = crate::workspace_root().join("crds/granary.dev.yaml");
        self.kubectl(&["apply", "--server-side", "-f", &crds.display().to_string()])?;
        self.kubectl(&[
            "wait",
            "--for=condition=Established",
            "crd/storageclusters.granary.dev",
            "crd/tenants.granary.dev",
            "--timeout=60s",
        ])?;
        Ok(())
    }

    pub fn kubectl(&self, args: &[&str]) -> Result<String> {
        self.kubectl_with(&self.kubeconfig, args, None)
    }

    /// Runs `kubectl ARGS -o json` as the admin and parses its output.
    pub fn kubectl_json(&self, args: &[&str]) -> Result<serde_json::Value> {
        let mut a = args.to_vec();
        a.extend(["-o", "json"]);
        Ok(serde_json::from_str(&self.kubectl(&a)?)?)
    }

    /// The decoded value of `key` in Secret `ns/name`; None when the Secret or the key
    /// does not exist (yet).
    pub fn secret_value(&self, ns: &str, name: &str, key: &str) -> Result<Option<String>> {
        use base64::Engine;
        let Ok(v) = self.kubectl_json(&["get", "secret", name, "-n", ns]) else {
            return Ok(None);
        };
        let Some(b64) = v["data"][key].as_str() else {
            return Ok(None);
        };
        Ok(Some(String::from_utf8(
            base64::engine::general_purpose::STANDARD.decode(b64)?,
        )?))
    }

    /// Runs `kubectl` as the admin with `input` on stdin (e.g. `apply -f -`).
    pub fn kubectl_stdin(&self, args: &[&str], input: &str) -> Result<String> {
        self.kubectl_with(&self.kubeconfig, args, Some(input))
    }

    /// Runs `kubectl` with another kubeconfig (e.g. from [`Self::kubeconfig_for_token`]).
    pub fn kubectl_with(
        &self,
        kubeconfig: &Path,
        args: &[&str],
        input: Option<&str>,
    ) -> Result<String> {
        let mut cmd = self.kubectl_command(kubeconfig);
        cmd.args(args)
            .stdin(if input.is_some() {
                Stdio::piped()
            } else {
                Stdio::null()
            })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = cmd.spawn().context("spawning kubectl")?;
        let writer = match (input, child.stdin.take()) {
            (Some(text), Some(mut stdin)) => {
                let text = text.to_string();
                Some(std::thread::spawn(move || stdin.write_all(text.as_bytes())))
            }
            _ => None,
        };
        let out = child.wait_with_output().context("waiting for kubectl")?;
        if let Some(w) = writer {
            let _ = w.join();
        }
        if !out.status.success() {
            bail!(
                "kubectl {} failed ({}): {}",
                args.join(" "),
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// A `kubectl` command with `--kubeconfig` set and its discovery cache kept in the
    /// control plane's directory (not in `~/.kube`). Add arguments and run it.
    pub fn kubectl_command(&self, kubeconfig: &Path) -> Command {
        let mut cmd = Command::new(self.bin_dir.join("kubectl"));
        cmd.env_remove("KUBECONFIG")
            .arg(path_flag("--kubeconfig", kubeconfig))
            .arg(path_flag(
                "--cache-dir",
                &self.dir.path().join("kubectl-cache"),
            ));
        cmd
    }

    /// A one-hour token for the ServiceAccount `namespace/name` (TokenRequest API, through
    /// `kubectl create token`).
    pub fn token_for_service_account(&self, namespace: &str, name: &str) -> Result<String> {
        let token = self.kubectl(&["create", "token", name, "-n", namespace, "--duration=1h"])?;
        let token = token.trim().to_string();
        if token.is_empty() {
            bail!("kubectl create token {name} -n {namespace} printed nothing");
        }
        Ok(token)
    }

    /// Writes a kubeconfig that authenticates with the bearer `token` only (no client
    /// certificate), so whatever uses it has exactly that identity's RBAC.
    ///
    /// Panics if the file cannot be written (a broken temporary directory).
    pub fn kubeconfig_for_token(&self, token: &str) -> PathBuf {
        let n = self.kubeconfigs_written.fetch_add(1, Ordering::Relaxed);
        let path = self.dir.path().join(format!("token-{n}.kubeconfig"));
        let config = serde_json::json!({
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [{"name": "granary-test", "cluster": {
                "server": self.server,
                "certificate-authority": self.pki.ca_cert,
            }}],
            "users": [{"name": "token", "user": {"token": token}}],
            "contexts": [{"name": "token", "context": {"cluster": "granary-test", "user": "token"}}],
            "current-context": "token",
        });
        std::fs::write(&path, serde_json::to_vec_pretty(&config).expect("json"))
            .unwrap_or_else(|e| panic!("writing {}: {e}", path.display()));
        path
    }

    /// The log file of a process started by this control plane (`etcd`, `kube-apiserver`,
    /// `kube-controller-manager`).
    pub fn log_path(&self, process: &str) -> PathBuf {
        self.dir.path().join(format!("{process}.log"))
    }

    /// Pids of the running control-plane processes, in start order.
    pub fn pids(&self) -> Vec<u32> {
        self.procs.iter().map(|p| p.child.id()).collect()
    }
}

impl Drop for ControlPlane {
    fn drop(&mut self) {
        // Controller manager first, etcd last.
        while let Some(mut p) = self.procs.pop() {
            p.stop();
        }
    }
}

/// Controllers of kube-controller-manager that need neither nodes nor a cloud provider
/// (canonical names; v1.37 still accepts the old short ones as aliases).
const CONTROLLERS: &[&str] = &[
    "serviceaccount-controller",
    "serviceaccount-token-controller",
    "namespace-controller",
    "garbage-collector-controller",
    "statefulset-controller",
    "replicaset-controller",
    "deployment-controller",
    "job-controller",
    "cronjob-controller",
    "disruption-controller",
    "endpointslice-controller",
    "root-ca-certificate-publisher-controller",
    "clusterrole-aggregation-controller",
    "resourcequota-controller",
    "ttl-after-finished-controller",
    "persistentvolume-binder-controller",
    "persistentvolume-expander-controller",
    "persistentvolumeclaim-protection-controller",
    "persistentvolume-protection-controller",
];

fn path_flag(flag: &str, path: &Path) -> std::ffi::OsString {
    let mut s = std::ffi::OsString::from(format!("{flag}="));
    s.push(path);
    s
}

fn path_str(path: &Path) -> Result<&str> {
    path.to_str()
        .with_context(|| format!("non-UTF-8 path {}", path.display()))
}

/// `curl -sS --fail --noproxy '*' ARGS`, returning the body.
fn curl(args: &[&str]) -> Result<String> {
    let out = Command::new("curl")
        .args(["-sS", "--fail", "--noproxy", "*"])
        .args(args)
        .stdin(Stdio::null())
        .output()
        .context("running curl")?;
    if !out.status.success() {
        bail!("curl: {}", String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}
