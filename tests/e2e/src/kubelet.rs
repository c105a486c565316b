//! Real Kubernetes nodes for end-to-end tests: per node containerd (overlayfs
//! snapshotter, Debian's runc), a kubelet and kube-proxy (iptables mode), with the CNI
//! `bridge` + `host-local` + `loopback` plugins; one kube-scheduler and one CoreDNS; all
//! plain processes started and stopped by the harness, next to a [`ControlPlane`]
//! started with [`ControlPlane::start_for_node`].
//!
//! Layout (one set of nodes per machine: the kubelets and containerds write some fixed
//! host paths and the kubelet's sysctls, so two harnesses at once would collide):
//! - each node's network is a namespace of its own (`grknode-<zone>`): containerd, its
//!   kubelet and its kube-proxy run in it (`nsenter --net`; their files and mounts stay
//!   the host's), so its pods' bridge [`POD_BRIDGE`], its routes and every iptables rule
//!   kube-proxy and the CNI plugins write live there and go with it; the host's own
//!   tables are never touched, and its `ip_forward` stays as it is;
//! - the nodes and the host meet on one Ethernet segment: a bridge in a namespace of its
//!   own ([`HUB_NETNS`]), one veth from each node's namespace and one from the host
//!   ([`HOST_VETH`], [`HOST_IP`]); node `k` is `10.253.255.<k+1>` ([`NODE_IP`] for the
//!   first). So node-to-node traffic is switched, not routed through the host;
//! - the apiserver and the catalog's Postgres listen on [`HOST_IP`];
//! - node `k`'s pods get addresses in `10.254.<k>.0/24` (all in [`POD_SUBNET`]); every
//!   node routes the other nodes' pod subnets to them, and the host routes each pod
//!   subnet to its node and the Service range to the first node;
//! - kube-proxy routes ClusterIP Services (from pods and from the host) with
//!   `masqueradeAll`, so a pod reaching a Service backed by a pod on the same bridge gets
//!   its answer back through its node;
//! - one CoreDNS, in the first node's namespace, serves `cluster.local` from the
//!   apiserver (Services, StatefulSet pod names) to every node's pods;
//! - each node carries the label `topology.kubernetes.io/zone` (`a`, `b`, ...).
//!
//! Everything the nodes make is found by name and removed afterwards: processes in the
//! harness's cgroup root and containerd's shims, mounts in its directories, its network
//! namespaces (with every iptables rule of the nodes) and the host end of the link, its
//! cgroups, the fixed host paths it created and the sysctls the kubelet changes
//! (recorded in a state file first, so a run that was killed is cleaned up by the next
//! one). Nothing else on the host is touched. [`RealNode::shutdown`] returns whatever it
//! could not remove, so a test asserts that nothing is left behind. One harness runs per
//! machine (a lock).

use std::collections::BTreeSet;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use crate::control_plane::{ControlPlane, Proc, poll_until, run};

/// The first node's InternalIP (node `k` is `10.253.255.<k+1>`).
pub const NODE_IP: Ipv4Addr = Ipv4Addr::new(10, 253, 255, 1);
/// The host's address on the nodes' segment (the apiserver and Postgres listen on it).
pub const HOST_IP: Ipv4Addr = Ipv4Addr::new(10, 253, 255, 254);
/// Prefix of the nodes' network namespaces (`grknode-<zone>`).
const NODE_NETNS_PREFIX: &str = "grknode-";
/// The namespace of the nodes' segment (its bridge [`HUB_BRIDGE`]).
pub const HUB_NETNS: &str = "grkhub";
const HUB_BRIDGE: &str = "grkbr0";
/// The host's end of the veth pair into [`HUB_NETNS`].
pub const HOST_VETH: &str = "grkh0";
/// The Service range (the apiserver's `--service-cluster-ip-range`).
const SERVICE_RANGE: &str = "10.0.0.0/24";
/// Each node's pods' bridge (made by the CNI `bridge` plugin in the node's namespace).
pub const POD_BRIDGE: &str = "grkcni0";
/// Every pod's address (node `k`'s pods are in `10.254.<k>.0/24`).
pub const POD_SUBNET: &str = "10.254.0.0/16";
/// At most this many nodes (zones `a`...).
pub const MAX_NODES: usize = 8;
/// The image the CRI runs every pod sandbox from (built by `node-tools.sh`).
const PAUSE_IMAGE: &str = "localhost/pause:3.10-granary1";
/// Its archive in the `node-tools.sh` directory (named by the tag).
const PAUSE_ARCHIVE: &str = "pause-3.10-granary1.tar";
/// How long the node may take to report Ready.
const NODE_READY_TIMEOUT: Duration = Duration::from_secs(180);
/// The kubelet's cgroup root (`cgroupRoot`): every pod's cgroup is below it in each
/// hierarchy, so the harness finds (and kills) exactly its own containers.
const CGROUP_ROOT: &str = "granary-e2e";
/// The harness's lock (one real node per machine) and its record of what to restore.
const STATE_DIR: &str = "/run/granary-e2e-realnode";
/// Temporary directories of real nodes (`/tmp/grk*`).
const TMP_PREFIX: &str = "/tmp/grk";
/// Deadline of one helper command (`ctr`, `ip`, `iptables-save`, `umount`).
const COMMAND_TIMEOUT: Duration = Duration::from_secs(30);

/// Host paths the kubelet, containerd and the CNI plugins write whatever their
/// configuration says; removed afterwards when they did not exist before.
const FIXED_PATHS: &[&str] = &[
    "/var/lib/kubelet",
    "/var/log/pods",
    "/var/log/containers",
    "/var/lib/cni",
    "/run/containerd",
    "/var/lib/containerd",
    "/etc/cni",
    "/opt/cni",
    "/opt/containerd",
    "/run/nri",
];

/// Sysctls the kubelet sets (its "kernel defaults", global: not per network namespace);
/// restored afterwards. While the node runs, the kubelet's `kernel.panic=10` and
/// `kernel.panic_on_oops=1` make the machine reboot on a kernel oops.
const SYSCTLS: &[&str] = &[
    "kernel/panic",
    "kernel/panic_on_oops",
    "kernel/keys/root_maxkeys",
    "kernel/keys/root_maxbytes",
    "vm/overcommit_memory",
    "vm/panic_on_oom",
];

/// The directories of `node-tools.sh`: containerd, shim and ctr, CoreDNS, the CNI
/// plugins, the pause image archive.
pub fn node_tools_dir() -> Result<PathBuf> {
    if let Ok(dir) = std::env::var("GRANARY_NODE_TOOLS_DIR") {
        return Ok(PathBuf::from(dir));
    }
    crate::build_tool("node-tools.sh")
}

/// What the harness must give back, recorded in [`STATE_DIR`] before it changes
/// anything: a run that was killed is cleaned up by the next one from this record.
#[derive(Debug, Default, serde::Serialize, serde::Deserialize)]
struct State {
    /// Sysctl values before the run.
    sysctls: Vec<(String, String)>,
    /// [`FIXED_PATHS`] that did not exist before the run.
    created: Vec<String>,
}

fn read_sysctl(name: &str) -> Option<String> {
    std::fs::read_to_string(Path::new("/proc/sys").join(name))
        .ok()
        .map(|s| s.trim().to_string())
}

fn write_sysctl(name: &str, value: &str) -> Result<()> {
    std::fs::write(Path::new("/proc/sys").join(name), value)
        .with_context(|| format!("setting sysctl {name}={value}"))
}

/// Mount points (field 5 of mountinfo).
fn mounts() -> Vec<String> {
    std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.split(' ').nth(4).map(str::to_string))
        .collect()
}

/// Names in a directory (none if it cannot be read).
fn names_in(dir: &str) -> BTreeSet<String> {
    std::fs::read_dir(dir)
        .map(|d| {
            d.filter_map(|e| e.ok().map(|e| e.file_name().to_string_lossy().into_owned()))
                .collect()
        })
        .unwrap_or_default()
}

fn links() -> BTreeSet<String> {
    names_in("/sys/class/net")
}

/// Runs `cmd` with its output captured, killing it after `limit`.
fn output_within(cmd: &mut Command, limit: Duration) -> Result<std::process::Output> {
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("running {:?}", cmd.get_program()))?;
    let deadline = Instant::now() + limit;
    loop {
        if child.try_wait()?.is_some() {
            return Ok(child.wait_with_output()?);
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            bail!("{:?} did not finish within {limit:?}", cmd.get_program());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// `iptables-save` / `ip6tables-save` without counters or comments.
fn iptables_save(tool: &str) -> Result<String> {
    let out = output_within(&mut Command::new(tool), COMMAND_TIMEOUT)?;
    if !out.status.success() {
        bail!(
            "{tool} failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| !l.starts_with('#'))
        .map(|l| {
            // ":CHAIN POLICY [p:b]" -> ":CHAIN POLICY"
            if l.starts_with(':') {
                l.rsplit_once(' ').map_or(l, |(a, _)| a).to_string()
            } else {
                l.to_string()
            }
        })
        .collect::<Vec<_>>()
        .join("\n"))
}

/// Whether an `iptables-save` line is Kubernetes networking: kube-proxy's and the
/// kubelet's `KUBE-*` chains, the CNI plugins' `CNI-*` chains, and jumps to them. The
/// node's live in its namespace; on the host there must be none.
fn owned_rule(line: &str) -> bool {
    line.starts_with(":KUBE-")
        || line.starts_with(":CNI-")
        || line.starts_with("-A KUBE-")
        || line.starts_with("-A CNI-")
        || line.contains(" -j KUBE-")
        || line.contains(" -j CNI-")
        || line.contains(" -g KUBE-")
        || line.contains(" -g CNI-")
}

/// The cgroup directories of [`CGROUP_ROOT`], one per hierarchy.
fn own_cgroups() -> Vec<PathBuf> {
    let mut out = Vec::new();
    for ctrl in std::fs::read_dir("/sys/fs/cgroup")
        .into_iter()
        .flatten()
        .flatten()
    {
        let p = ctrl.path().join(CGROUP_ROOT);
        if p.is_dir() && !out.contains(&p) {
            out.push(p);
        }
    }
    out
}

/// Pids (other than ours) in the node's cgroups or started from a real node's
/// temporary directory (containerd's shims).
fn own_processes() -> Vec<u32> {
    let me = std::process::id();
    let cg = format!("/{CGROUP_ROOT}/");
    let cg_end = format!("/{CGROUP_ROOT}\n");
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        if pid == me {
            continue;
        }
        let cmdline = std::fs::read(e.path().join("cmdline"))
            .map(|b| String::from_utf8_lossy(&b).replace('\0', " "))
            .unwrap_or_default();
        let cgroup = std::fs::read_to_string(e.path().join("cgroup")).unwrap_or_default();
        if cmdline.is_empty() {
            continue;
        }
        if cmdline.contains(TMP_PREFIX) || cgroup.contains(&cg) || cgroup.contains(&cg_end) {
            out.push(pid);
        }
    }
    out
}

/// Removes a cgroup directory tree, children first.
fn remove_cgroup(dir: &Path) {
    for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        if e.file_type().is_ok_and(|t| t.is_dir()) {
            remove_cgroup(&e.path());
        }
    }
    let _ = std::fs::remove_dir(dir);
}

/// Removes everything a real node owns on the host, by name (the kubelet and
/// containerd may change other things; nothing else of the host is touched), and gives
/// back what `state` recorded. Used after a run and, for a run that was killed, before
/// the next one.
fn clean_owned(state: &State) {
    // Processes: its containers, shims and any of its daemons a killed run left.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let pids = own_processes();
        if pids.is_empty() || Instant::now() > deadline {
            break;
        }
        for pid in pids {
            let _ = Command::new("kill")
                .args(["-KILL", &pid.to_string()])
                .status();
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    // Mounts in its directories (rootfs, shm, pod volumes, pinned network namespaces),
    // deepest first; lazily, so a stuck one never blocks.
    let mut own: Vec<String> = mounts()
        .into_iter()
        .filter(|m| {
            m.starts_with(TMP_PREFIX) || state.created.iter().any(|c| m.starts_with(c.as_str()))
        })
        .collect();
    own.sort_by_key(|m| std::cmp::Reverse(m.len()));
    own.dedup();
    for m in own {
        let _ = output_within(
            Command::new("umount")
                .args(["-l", "--no-canonicalize"])
                .arg(&m),
            COMMAND_TIMEOUT,
        );
    }
    // The nodes' and the hub's namespaces (their bridges, veths, routes and iptables
    // rules with them), then the host's end of the link.
    for ns in names_in("/run/netns") {
        if ns.starts_with(NODE_NETNS_PREFIX) || ns == HUB_NETNS {
            let _ = output_within(
                Command::new("ip").args(["netns", "del", &ns]),
                COMMAND_TIMEOUT,
            );
        }
    }
    if links().contains(HOST_VETH) {
        let _ = output_within(
            Command::new("ip").args(["link", "del", HOST_VETH]),
            COMMAND_TIMEOUT,
        );
    }
    for cg in own_cgroups() {
        remove_cgroup(&cg);
    }
    for p in &state.created {
        let _ = std::fs::remove_dir_all(p);
    }
    for (name, value) in &state.sysctls {
        let _ = write_sysctl(name, value);
    }
}

/// What is left of a real node on the host after [`clean_owned`].
fn leftovers_of(state: &State) -> Vec<String> {
    let mut left = Vec::new();
    for pid in own_processes() {
        let cmd = std::fs::read(format!("/proc/{pid}/cmdline"))
            .map(|b| String::from_utf8_lossy(&b).replace('\0', " "))
            .unwrap_or_default();
        left.push(format!("process {pid}: {cmd}"));
    }
    for m in mounts() {
        if m.starts_with(TMP_PREFIX) || state.created.iter().any(|c| m.starts_with(c.as_str())) {
            left.push(format!("mount {m}"));
        }
    }
    for ns in names_in("/run/netns") {
        if ns.starts_with("cni-") || ns.starts_with(NODE_NETNS_PREFIX) || ns == HUB_NETNS {
            left.push(format!("network namespace {ns}"));
        }
    }
    for l in links() {
        if l == HOST_VETH || l == POD_BRIDGE {
            left.push(format!("link {l}"));
        }
    }
    for tool in ["iptables-save", "ip6tables-save"] {
        match iptables_save(tool) {
            Ok(s) => {
                for line in s.lines().filter(|l| owned_rule(l)) {
                    left.push(format!("{tool}: {line}"));
                }
            }
            Err(e) => left.push(format!("{tool} could not be read: {e:#}")),
        }
    }
    for cg in own_cgroups() {
        left.push(format!("cgroup {}", cg.display()));
    }
    for p in &state.created {
        if Path::new(p).exists() {
            left.push(format!("path {p}"));
        }
    }
    for (name, value) in &state.sysctls {
        if read_sysctl(name).as_deref() != Some(value.as_str()) {
            left.push(format!("sysctl {name} (was {value})"));
        }
    }
    left
}

/// One node of a [`RealNode`] set.
#[derive(Clone, Debug)]
pub struct NodeInfo {
    /// Its name (its `kubernetes.io/hostname` label): `granary-e2e-<zone>`.
    pub name: String,
    /// Its `topology.kubernetes.io/zone` label: `a`, `b`, ...
    pub zone: String,
    /// Its InternalIP, in its namespace.
    pub ip: Ipv4Addr,
    /// Its pods' addresses.
    pub pod_subnet: String,
    netns: String,
    /// The hub's end of its veth pair.
    hub_veth: String,
    dir: PathBuf,
    socket: PathBuf,
}

impl NodeInfo {
    fn new(k: usize, root: &Path) -> NodeInfo {
        let zone = ((b'a' + k as u8) as char).to_string();
        let dir = root.join(&zone);
        NodeInfo {
            name: format!("granary-e2e-{zone}"),
            ip: Ipv4Addr::new(10, 253, 255, k as u8 + 1),
            pod_subnet: format!("10.254.{k}.0/24"),
            netns: format!("{NODE_NETNS_PREFIX}{zone}"),
            hub_veth: format!("grkn{k}"),
            // Short: containerd's socket path must stay under 108 bytes.
            socket: dir.join("containerd.sock"),
            dir,
            zone,
        }
    }

    /// Its pods' cgroup root, below the harness's.
    fn cgroup_root(&self) -> String {
        format!("/{CGROUP_ROOT}/{}", self.zone)
    }
}

/// Running nodes. Create the network with [`RealNode::prepare`] before the control
/// plane (the apiserver listens on [`HOST_IP`]), then [`RealNode::start`] them.
pub struct RealNode {
    state: State,
    dir: PathBuf,
    tools: PathBuf,
    k8s_bin: PathBuf,
    kubeconfig: PathBuf,
    /// The nodes, zone `a` first.
    pub nodes: Vec<NodeInfo>,
    /// Processes and the node each belongs to (None: the scheduler).
    procs: Vec<(Option<usize>, Proc)>,
    down: bool,
    /// Gives the kubelets' sysctls back if the test process dies without its cleanup
    /// (the next run would, but `kernel.panic_on_oops` must not outlive the run).
    restore: Option<crate::Watchdog>,
    /// Held for the nodes' life: one harness per machine.
    _lock: std::fs::File,
    // Last: removed after everything else.
    _tmp: tempfile::TempDir,
}

/// Fails if the addresses the stage uses are already routed on this machine.
fn check_addresses_free() -> Result<()> {
    let out = output_within(
        Command::new("ip").args(["-4", "route", "show", "table", "all"]),
        COMMAND_TIMEOUT,
    )?;
    let routes = String::from_utf8_lossy(&out.stdout);
    for (prefix, what) in [
        ("10.0.0.", "the Service range 10.0.0.0/24"),
        ("10.253.255.", "the nodes' segment 10.253.255.0/24"),
        ("10.254.", "the pod subnets 10.254.0.0/16"),
    ] {
        if let Some(r) = routes
            .lines()
            .find(|l| l.split_whitespace().any(|w| w.starts_with(prefix)) && !l.contains(HOST_VETH))
        {
            bail!("{what} is already in use on this machine ({r}); the real-node stage needs it");
        }
    }
    Ok(())
}

impl RealNode {
    /// Takes the machine's real-node lock, cleans up after a run that was killed,
    /// records what to restore, builds (once) the runtime tools, and makes the network
    /// of `count` nodes (zones `a`, `b`, ...): their namespaces, the hub and the link to
    /// the host. Needs root.
    pub fn prepare(count: usize) -> Result<RealNode> {
        if count == 0 || count > MAX_NODES {
            bail!("between 1 and {MAX_NODES} real nodes, not {count}");
        }
        let tools = node_tools_dir()?;
        for bin in [
            "bin/containerd",
            "bin/containerd-shim-runc-v2",
            "bin/ctr",
            "bin/coredns",
        ] {
            if !tools.join(bin).is_file() {
                bail!(
                    "node-tools.sh printed {} but {bin} is not in it",
                    tools.display()
                );
            }
        }
        if Command::new("runc").arg("--version").output().is_err() {
            bail!("runc is not installed (apt-get install runc; the test command installs it)");
        }
        let k8s_bin = crate::control_plane::k8s_bin_dir()?;
        for bin in ["kubelet", "kube-scheduler", "kube-proxy"] {
            if !k8s_bin.join(bin).is_file() {
                bail!(
                    "{bin} is not in {} (k8s-tools.sh builds it)",
                    k8s_bin.display()
                );
            }
        }
        std::fs::create_dir_all(STATE_DIR)
            .with_context(|| format!("creating {STATE_DIR} (the real-node stage needs root)"))?;
        let lock = std::fs::File::create(Path::new(STATE_DIR).join("lock"))?;
        if lock.try_lock().is_err() {
            eprintln!("real node: another real-node run holds {STATE_DIR}/lock; waiting for it");
            lock.lock()?;
        }
        let state_file = Path::new(STATE_DIR).join("state.json");
        if let Ok(text) = std::fs::read_to_string(&state_file) {
            // A run that was killed before its cleanup: its record says what to give
            // back; its processes, mounts, rules and directories go by name.
            eprintln!("real node: cleaning up after a run that was killed");
            let old: State = serde_json::from_str(&text).unwrap_or_default();
            clean_owned(&old);
            for d in std::fs::read_dir("/tmp").into_iter().flatten().flatten() {
                if d.path().to_string_lossy().starts_with(TMP_PREFIX) {
                    let _ = std::fs::remove_dir_all(d.path());
                }
            }
            let _ = std::fs::remove_file(&state_file);
        }
        for tool in ["iptables-save", "ip6tables-save"] {
            if iptables_save(tool)?.lines().any(owned_rule) {
                bail!(
                    "{tool} already shows KUBE-* or CNI-* rules: this machine runs Kubernetes \
                     networking of its own; the real-node stage needs a machine without it"
                );
            }
        }
        if !own_processes().is_empty() || !own_cgroups().is_empty() {
            bail!(
                "processes or cgroups of a real node ({CGROUP_ROOT}) exist and could not be removed"
            );
        }
        check_addresses_free()?;
        let state = State {
            sysctls: SYSCTLS
                .iter()
                .filter_map(|s| read_sysctl(s).map(|v| (s.to_string(), v)))
                .collect(),
            created: FIXED_PATHS
                .iter()
                .filter(|p| !Path::new(p).exists())
                .map(|p| p.to_string())
                .collect(),
        };
        std::fs::write(&state_file, serde_json::to_vec(&state)?)?;
        // After the processes' own watchdogs killed them (a kubelet sets these at start).
        let pairs: Vec<&str> = state
            .sysctls
            .iter()
            .flat_map(|(n, v)| [n.as_str(), v.as_str()])
            .collect();
        let restore = crate::Watchdog::on_exit(
            r#"sleep 2; while [ $# -gt 1 ]; do printf '%s\n' "$2" > "/proc/sys/$1"; shift 2; done"#,
            &pairs,
        )?;
        let tmp = tempfile::Builder::new().prefix("grk").tempdir_in("/tmp")?;
        let dir = tmp.path().to_path_buf();
        let nodes: Vec<NodeInfo> = (0..count).map(|k| NodeInfo::new(k, &dir)).collect();
        for n in &nodes {
            std::fs::create_dir_all(&n.dir)?;
        }
        let node = RealNode {
            state,
            kubeconfig: PathBuf::new(),
            dir,
            tools,
            k8s_bin,
            nodes,
            procs: Vec::new(),
            down: false,
            restore: Some(restore),
            _lock: lock,
            _tmp: tmp,
        };
        // The segment: a bridge in the hub's namespace, the host's veth on it.
        let ip = |args: &[&str]| run(Command::new("ip").args(args));
        let in_ns = |ns: &str, args: &[&str]| {
            run(Command::new("ip").args(["netns", "exec", ns]).args(args))
        };
        ip(&["netns", "add", HUB_NETNS])
            .context("creating the nodes' network namespaces (the real-node stage needs root)")?;
        in_ns(HUB_NETNS, &["ip", "link", "set", "lo", "up"])?;
        in_ns(
            HUB_NETNS,
            &["ip", "link", "add", HUB_BRIDGE, "type", "bridge"],
        )?;
        in_ns(HUB_NETNS, &["ip", "link", "set", HUB_BRIDGE, "up"])?;
        // The host's end stays in the host; its peer joins the bridge.
        ip(&[
            "link", "add", HOST_VETH, "type", "veth", "peer", "name", "grkup", "netns", HUB_NETNS,
        ])?;
        in_ns(
            HUB_NETNS,
            &["ip", "link", "set", "grkup", "master", HUB_BRIDGE, "up"],
        )?;
        ip(&["addr", "add", &format!("{HOST_IP}/24"), "dev", HOST_VETH])?;
        ip(&["link", "set", HOST_VETH, "up"])?;
        for n in &node.nodes {
            ip(&["netns", "add", &n.netns])?;
            // The node's end (eth0) in its namespace; the other end moves to the hub.
            ip(&[
                "link",
                "add",
                &n.hub_veth,
                "type",
                "veth",
                "peer",
                "name",
                "eth0",
                "netns",
                &n.netns,
            ])?;
            ip(&["link", "set", &n.hub_veth, "netns", HUB_NETNS])?;
            in_ns(
                HUB_NETNS,
                &["ip", "link", "set", &n.hub_veth, "master", HUB_BRIDGE, "up"],
            )?;
            in_ns(&n.netns, &["ip", "link", "set", "lo", "up"])?;
            in_ns(
                &n.netns,
                &["ip", "addr", "add", &format!("{}/24", n.ip), "dev", "eth0"],
            )?;
            in_ns(&n.netns, &["ip", "link", "set", "eth0", "up"])?;
            in_ns(
                &n.netns,
                &["ip", "route", "add", "default", "via", &HOST_IP.to_string()],
            )?;
            // Inside the node's namespace only: its pods' traffic passes through it.
            in_ns(&n.netns, &["sysctl", "-qw", "net.ipv4.ip_forward=1"])?;
            // The other nodes' pods, straight over the segment.
            for other in node.nodes.iter().filter(|o| o.name != n.name) {
                in_ns(
                    &n.netns,
                    &[
                        "ip",
                        "route",
                        "add",
                        &other.pod_subnet,
                        "via",
                        &other.ip.to_string(),
                    ],
                )?;
            }
            // The host reaches each node's pods through that node, as a router would.
            ip(&[
                "route",
                "add",
                &n.pod_subnet,
                "via",
                &n.ip.to_string(),
                "dev",
                HOST_VETH,
            ])?;
        }
        // ... and the Services through the first node (any node's kube-proxy routes
        // them).
        ip(&[
            "route",
            "add",
            SERVICE_RANGE,
            "via",
            &NODE_IP.to_string(),
            "dev",
            HOST_VETH,
        ])?;
        // The harness's cgroup root and each node's below it, in every hierarchy; cpuset
        // needs its CPUs and memory nodes before anything can join it.
        let mut roots = vec![CGROUP_ROOT.to_string()];
        roots.extend(node.nodes.iter().map(|n| n.cgroup_root()[1..].to_string()));
        for root in &roots {
            for ctrl in std::fs::read_dir("/sys/fs/cgroup")?.flatten() {
                let p = ctrl.path().join(root);
                match std::fs::create_dir(&p) {
                    Ok(()) => {}
                    Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
                    Err(e) => eprintln!("real node: cannot create {}: {e}", p.display()),
                }
            }
            for f in ["cpuset.cpus", "cpuset.mems"] {
                let cpuset = Path::new("/sys/fs/cgroup/cpuset");
                if let Ok(v) = std::fs::read_to_string(cpuset.join(f)) {
                    std::fs::write(cpuset.join(root).join(f), v.trim())
                        .with_context(|| format!("initialising {f} of the cgroup {root}"))?;
                }
            }
        }
        Ok(node)
    }

    /// Starts CoreDNS (on the first node), per node containerd (importing the pause
    /// image and `images`, archives `ctr images import` reads), its kubelet and its
    /// kube-proxy, and kube-scheduler; waits until every node is Ready and schedulable.
    pub fn start(&mut self, cp: &ControlPlane, images: &[PathBuf]) -> Result<()> {
        if cp.node_ip != Some(HOST_IP) {
            bail!("the control plane must be started with ControlPlane::start_for_node(HOST_IP)");
        }
        self.kubeconfig = cp.kubeconfig.clone();
        self.start_coredns()?;
        let pause = self.tools.join(PAUSE_ARCHIVE);
        for k in 0..self.nodes.len() {
            self.start_containerd(k)?;
        }
        for k in 0..self.nodes.len() {
            self.import_image(k, &pause)?;
            for image in images {
                self.import_image(k, image)?;
            }
            if !self.images(k)?.iter().any(|i| i == PAUSE_IMAGE) {
                bail!(
                    "{} does not hold the sandbox image {PAUSE_IMAGE} (rebuild it: remove it and run node-tools.sh)",
                    pause.display()
                );
            }
        }
        for k in 0..self.nodes.len() {
            self.start_kubelet(k, cp)?;
        }
        self.start_scheduler()?;
        for k in 0..self.nodes.len() {
            self.start_kube_proxy(k)?;
        }
        let t0 = Instant::now();
        let mut last = String::new();
        let names: Vec<String> = self.nodes.iter().map(|n| n.name.clone()).collect();
        let res = poll_until(NODE_READY_TIMEOUT, "every node to be Ready", || {
            for (k, p) in &mut self.procs {
                if let Ok(Some(status)) = p.child.try_wait() {
                    bail!(
                        "{} of node {k:?} exited ({status}):\n{}",
                        p.name,
                        p.log_tail(40)
                    );
                }
            }
            let mut all = true;
            last.clear();
            for name in &names {
                let out = cp.kubectl(&[
                    "get",
                    "node",
                    name,
                    "-o",
                    "jsonpath={.status.conditions[?(@.type==\"Ready\")].status} {.spec.taints}",
                ])?;
                last.push_str(&format!("{name}: {out}; "));
                all &= out.starts_with("True") && !out.contains("not-ready");
            }
            Ok(all.then_some(()))
        });
        if let Err(e) = res {
            let tails: String = self
                .procs
                .iter()
                .filter(|(_, p)| p.name == "kubelet")
                .map(|(k, p)| format!("--- kubelet of node {k:?} ---\n{}\n", p.log_tail(40)))
                .collect();
            bail!("{e:#} (last: {last})\n{tails}");
        }
        eprintln!(
            "real node: {} node(s) Ready {:.1?} after their kubelets started",
            self.nodes.len(),
            t0.elapsed()
        );
        Ok(())
    }

    /// A command run in node `k`'s network namespace (its mounts and files are the
    /// host's: `nsenter --net` only, unlike `ip netns exec`).
    fn in_node(&self, k: usize, program: &Path) -> Command {
        let mut c = Command::new("nsenter");
        c.arg(format!("--net=/run/netns/{}", self.nodes[k].netns))
            .arg("--")
            .arg(program);
        c
    }

    fn spawn(
        &mut self,
        name: &'static str,
        node: Option<usize>,
        cmd: Command,
    ) -> Result<&mut Proc> {
        let log = self.log_path(name, node);
        let proc = Proc::spawn(name, cmd, log)?;
        self.procs.push((node, proc));
        Ok(&mut self.procs.last_mut().expect("just pushed").1)
    }

    /// The log file of a process (`containerd`, `kubelet`, `kube-proxy`, ... of node
    /// `node`; `kube-scheduler` and `coredns` with None).
    pub fn log_path(&self, process: &str, node: Option<usize>) -> PathBuf {
        match node {
            Some(k) => self.nodes[k].dir.join(format!("{process}.log")),
            None => self.dir.join(format!("{process}.log")),
        }
    }

    fn start_coredns(&mut self) -> Result<()> {
        let corefile = self.dir.join("Corefile");
        std::fs::write(
            &corefile,
            format!(
                "cluster.local:53 {{\n    bind {NODE_IP}\n    errors\n    kubernetes cluster.local {{\n        kubeconfig {} admin\n    }}\n}}\n",
                self.kubeconfig.display()
            ),
        )?;
        // In the first node's namespace, on its address: every node's pods reach it over
        // the segment.
        let mut cmd = self.in_node(0, &self.tools.join("bin/coredns"));
        cmd.arg("-conf").arg(&corefile);
        let proc = self.spawn("coredns", None, cmd)?;
        proc.wait_ready(Duration::from_secs(30), "answers for cluster.local", || {
            dns_answers(NODE_IP)
        })
        .map_err(|e| anyhow::anyhow!("{e:#}\n{}", proc.log_tail(30)))
    }

    /// `ctr` against node `k`'s containerd.
    fn ctr(&self, k: usize) -> Command {
        let mut c = Command::new(self.tools.join("bin/ctr"));
        c.arg("--address")
            .arg(&self.nodes[k].socket)
            .args(["--namespace", "k8s.io"]);
        c
    }

    fn start_containerd(&mut self, k: usize) -> Result<()> {
        let node = self.nodes[k].clone();
        let cni_conf = node.dir.join("cni/net.d");
        std::fs::create_dir_all(&cni_conf)?;
        let conflist = serde_json::json!({
            "cniVersion": "1.0.0",
            "name": "granary-e2e",
            "plugins": [{
                "type": "bridge",
                "bridge": POD_BRIDGE,
                "isGateway": true,
                // No NAT: pods only talk to each other and to the node address.
                "ipMasq": false,
                "hairpinMode": true,
                "ipam": {
                    "type": "host-local",
                    "ranges": [[{"subnet": node.pod_subnet}]],
                    "routes": [{"dst": "0.0.0.0/0"}],
                    "dataDir": node.dir.join("cni/ipam"),
                },
            }],
        });
        std::fs::write(
            cni_conf.join("10-granary.conflist"),
            serde_json::to_vec_pretty(&conflist)?,
        )?;
        let config = format!(
            r#"version = 3
root = "{root}"
state = "{state}"

[grpc]
  address = "{socket}"

[plugins."io.containerd.cri.v1.runtime"]
  enable_selinux = false
  # runc cannot set a sandbox's oom_score_adj here (no CAP_SYS_RESOURCE): every sandbox
  # would fail with "can't get final child's PID from pipe: EOF".
  restrict_oom_score_adj = true
  # Pod network namespaces under the state directory, not /var/run/netns.
  netns_mounts_under_state_dir = true
  [plugins."io.containerd.cri.v1.runtime".cni]
    bin_dirs = ["{cni_bin}"]
    conf_dir = "{cni_conf}"
  [plugins."io.containerd.cri.v1.runtime".containerd]
    default_runtime_name = "runc"
    [plugins."io.containerd.cri.v1.runtime".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.cri.v1.runtime".containerd.runtimes.runc.options]
        BinaryName = "{runc}"
        SystemdCgroup = false

[plugins."io.containerd.cri.v1.images"]
  snapshotter = "overlayfs"
  # Nothing is pulled: every image is imported, the sandbox image too.
  [plugins."io.containerd.cri.v1.images".pinned_images]
    sandbox = "{pause}"

# No NRI socket in /var/run/nri: nothing here plugs into it.
[plugins."io.containerd.nri.v1.nri"]
  disable = true

[plugins."io.containerd.grpc.v1.cri"]
  stream_server_address = "127.0.0.1"
  stream_server_port = "0"
"#,
            root = node.dir.join("containerd/root").display(),
            state = node.dir.join("containerd/state").display(),
            socket = node.socket.display(),
            cni_bin = self.tools.join("cni").display(),
            cni_conf = cni_conf.display(),
            runc = crate::which("runc")
                .unwrap_or_else(|| PathBuf::from("/usr/sbin/runc"))
                .display(),
            pause = PAUSE_IMAGE,
        );
        let config_path = node.dir.join("containerd.toml");
        std::fs::write(&config_path, config)?;
        let mut cmd = self.in_node(k, &self.tools.join("bin/containerd"));
        // The shim is found on PATH.
        let path = format!(
            "{}:{}",
            self.tools.join("bin").display(),
            std::env::var("PATH").unwrap_or_else(|_| "/usr/sbin:/usr/bin:/sbin:/bin".into())
        );
        cmd.arg("--config").arg(&config_path).env("PATH", &path);
        let socket = node.socket.clone();
        let ctr_ok = {
            let tools = self.tools.clone();
            move || {
                socket.exists()
                    && Command::new(tools.join("bin/ctr"))
                        .arg("--address")
                        .arg(&socket)
                        .arg("version")
                        .stdout(Stdio::null())
                        .stderr(Stdio::null())
                        .status()
                        .is_ok_and(|s| s.success())
            }
        };
        let proc = self.spawn("containerd", Some(k), cmd)?;
        proc.wait_ready(Duration::from_secs(60), "its socket", ctr_ok)
            .map_err(|e| anyhow::anyhow!("{e:#}\n{}", proc.log_tail(40)))
    }

    /// `ctr images import` of a docker or OCI archive into node `k`'s CRI namespace.
    pub fn import_image(&self, k: usize, archive: &Path) -> Result<()> {
        let out = output_within(
            self.ctr(k)
                .args(["images", "import", "--snapshotter", "overlayfs"])
                .arg(archive),
            Duration::from_secs(300),
        )
        .with_context(|| format!("importing {}", archive.display()))?;
        if !out.status.success() {
            bail!(
                "importing {}: {}",
                archive.display(),
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(())
    }

    /// References of the images node `k`'s containerd holds for the CRI.
    fn images(&self, k: usize) -> Result<Vec<String>> {
        let out = output_within(self.ctr(k).args(["images", "ls", "-q"]), COMMAND_TIMEOUT)?;
        Ok(String::from_utf8_lossy(&out.stdout)
            .split_whitespace()
            .map(str::to_string)
            .collect())
    }

    fn start_kubelet(&mut self, k: usize, cp: &ControlPlane) -> Result<()> {
        let node = self.nodes[k].clone();
        let resolv = node.dir.join("resolv.conf");
        // Pods get only the cluster DNS (the host's resolvers are not for the pods).
        std::fs::write(&resolv, "")?;
        let config = serde_json::json!({
            "apiVersion": "kubelet.config.k8s.io/v1beta1",
            "kind": "KubeletConfiguration",
            // This machine has the cgroup v1 (hybrid) hierarchy, which v1.35+ refuses by
            // default; systemd does not manage these cgroups, so the cgroupfs driver.
            "failCgroupV1": false,
            "cgroupDriver": "cgroupfs",
            // Test machines may have swap.
            "failSwapOn": false,
            "containerRuntimeEndpoint": format!("unix://{}", node.socket.display()),
            "address": node.ip.to_string(),
            "port": 10250,
            "readOnlyPort": 0,
            "healthzBindAddress": "127.0.0.1",
            "healthzPort": 0,
            // The apiserver authenticates with the test CA's admin certificate.
            "authentication": {
                "anonymous": {"enabled": false},
                "webhook": {"enabled": false},
                "x509": {"clientCAFile": cp.pki.ca_cert},
            },
            "authorization": {"mode": "AlwaysAllow"},
            "clusterDNS": [NODE_IP.to_string()],
            "clusterDomain": "cluster.local",
            "resolvConf": resolv,
            // The field is podLogsDir (an unknown field would be silently ignored).
            "podLogsDir": node.dir.join("pod-logs"),
            // Test disks are small and shared: evict only when nearly full, never
            // garbage-collect the imported images (they cannot be pulled again).
            "evictionHard": {
                "memory.available": "100Mi",
                "nodefs.available": "1%",
                "nodefs.inodesFree": "1%",
                "imagefs.available": "1%",
            },
            "imageGCHighThresholdPercent": 100,
            "imageGCLowThresholdPercent": 99,
            "serializeImagePulls": false,
            "maxPods": 30,
            // Pods' cgroups under a root of their own (the harness finds them there).
            "cgroupRoot": node.cgroup_root(),
            // Secrets and ConfigMaps reach running pods sooner than the default minute.
            "syncFrequency": "10s",
            "nodeStatusUpdateFrequency": "5s",
        });
        let config_path = node.dir.join("kubelet.json");
        std::fs::write(&config_path, serde_json::to_vec_pretty(&config)?)?;
        let mut cmd = self.in_node(k, &self.k8s_bin.join("kubelet"));
        cmd.arg(format!("--config={}", config_path.display()))
            .arg(format!("--kubeconfig={}", self.kubeconfig.display()))
            .arg(format!("--root-dir={}", node.dir.join("kubelet").display()))
            .arg(format!(
                "--cert-dir={}",
                node.dir.join("kubelet-pki").display()
            ))
            .arg(format!("--hostname-override={}", node.name))
            .arg(format!("--node-ip={}", node.ip))
            .arg(format!(
                "--node-labels=topology.kubernetes.io/zone={}",
                node.zone
            ))
            .arg("--v=1");
        self.spawn("kubelet", Some(k), cmd)?;
        Ok(())
    }

    fn start_scheduler(&mut self) -> Result<()> {
        let mut cmd = Command::new(self.k8s_bin.join("kube-scheduler"));
        cmd.arg(format!("--kubeconfig={}", self.kubeconfig.display()))
            .arg("--leader-elect=false")
            // No HTTPS endpoint: nothing scrapes it, no port to collide on.
            .arg("--secure-port=0");
        self.spawn("kube-scheduler", None, cmd)?;
        Ok(())
    }

    fn start_kube_proxy(&mut self, k: usize) -> Result<()> {
        let node = self.nodes[k].clone();
        let config = serde_json::json!({
            "apiVersion": "kubeproxy.config.k8s.io/v1alpha1",
            "kind": "KubeProxyConfiguration",
            "clientConnection": {"kubeconfig": self.kubeconfig},
            "hostnameOverride": node.name,
            "mode": "iptables",
            "clusterCIDR": POD_SUBNET,
            "bindAddress": node.ip.to_string(),
            "healthzBindAddress": format!("127.0.0.1:{}", crate::free_port()),
            "metricsBindAddress": format!("127.0.0.1:{}", crate::free_port()),
            "nodePortAddresses": [format!("{}/32", node.ip)],
            "iptables": {
                // Pod -> Service -> pod on the same bridge: without SNAT the answer
                // would go pod to pod and skip the reverse NAT.
                "masqueradeAll": true,
                // Do not set route_localnet on the host.
                "localhostNodePorts": false,
                "syncPeriod": "10s",
                "minSyncPeriod": "0s",
            },
            // Leave the host's conntrack sysctls alone (0 = do not set).
            "conntrack": {
                "maxPerCore": 0,
                "min": 0,
                "tcpEstablishedTimeout": "0s",
                "tcpCloseWaitTimeout": "0s",
            },
        });
        let config_path = node.dir.join("kube-proxy.json");
        std::fs::write(&config_path, serde_json::to_vec_pretty(&config)?)?;
        let mut cmd = self.in_node(k, &self.k8s_bin.join("kube-proxy"));
        cmd.arg(format!("--config={}", config_path.display()));
        self.spawn("kube-proxy", Some(k), cmd)?;
        Ok(())
    }

    /// Deletes every workload and pod, stops the node's processes, removes everything
    /// the node created on the host and restores the sysctls. Returns what is left
    /// behind (empty when the host is as it was). `cp` must still be running.
    pub fn shutdown(&mut self, cp: &ControlPlane) -> Vec<String> {
        if self.down {
            return Vec::new();
        }
        // Controllers first (they would recreate pods), then the pods, with a grace the
        // kubelet honours while it still runs.
        let t0 = Instant::now();
        // Deployments (the operator, which would recreate its StatefulSets) before the
        // rest; foreground deletion waits for their pods.
        for kinds in ["deployments", "statefulsets,replicasets,daemonsets,jobs"] {
            let _ = cp.kubectl(&[
                "delete",
                kinds,
                "--all",
                "-A",
                "--cascade=foreground",
                "--timeout=90s",
            ]);
        }
        let _ = cp.kubectl(&[
            "delete",
            "pods",
            "--all",
            "-A",
            "--grace-period=10",
            "--timeout=60s",
        ]);
        let pods_gone = t0.elapsed();
        let deadline = Instant::now() + Duration::from_secs(60);
        while Instant::now() < deadline
            && (0..self.nodes.len()).any(|k| self.tasks(k).iter().any(|(_, running)| *running))
        {
            std::thread::sleep(Duration::from_millis(500));
        }
        let tasks_gone = t0.elapsed();
        let left = self.teardown();
        eprintln!(
            "real node: shutdown: pods deleted {pods_gone:.1?}, containers stopped {tasks_gone:.1?}, host cleaned {:.1?}",
            t0.elapsed()
        );
        left
    }

    /// Node `k`'s containerd's tasks (containers with a process, stopped ones too until
    /// their sandbox is removed): id and whether it runs.
    fn tasks(&self, k: usize) -> Vec<(String, bool)> {
        output_within(self.ctr(k).args(["tasks", "ls"]), COMMAND_TIMEOUT)
            .map(|o| {
                String::from_utf8_lossy(&o.stdout)
                    .lines()
                    .skip(1)
                    .filter_map(|l| {
                        let mut f = l.split_whitespace();
                        let id = f.next()?.to_string();
                        let status = f.nth(1).unwrap_or_default();
                        Some((id, status == "RUNNING"))
                    })
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Kills node `k`'s containers that still run and removes their records, through its
    /// containerd (still running).
    fn remove_containers(&self, k: usize) {
        for (id, _) in self.tasks(k) {
            let _ = output_within(
                self.ctr(k).args(["tasks", "kill", "-s", "SIGKILL", &id]),
                COMMAND_TIMEOUT,
            );
        }
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            for (id, _) in self.tasks(k) {
                let _ = output_within(
                    self.ctr(k).args(["tasks", "delete", "-f", &id]),
                    COMMAND_TIMEOUT,
                );
            }
            if self.tasks(k).is_empty() || Instant::now() > deadline {
                break;
            }
            std::thread::sleep(Duration::from_millis(300));
        }
        if let Ok(o) = output_within(
            self.ctr(k).args(["containers", "ls", "-q"]),
            COMMAND_TIMEOUT,
        ) {
            for id in String::from_utf8_lossy(&o.stdout).split_whitespace() {
                let _ = output_within(
                    self.ctr(k).args(["containers", "delete", id]),
                    COMMAND_TIMEOUT,
                );
            }
        }
    }

    /// Stops everything and removes what is left, without the apiserver.
    fn teardown(&mut self) -> Vec<String> {
        self.down = true;
        // kube-proxy, scheduler, kubelets: no more changes to containers or rules.
        let mut containerds = Vec::new();
        let mut coredns = None;
        while let Some((k, mut p)) = self.procs.pop() {
            match p.name {
                "containerd" => containerds.push((k, p)),
                "coredns" => coredns = Some(p),
                _ => p.stop(),
            }
        }
        if let Some(mut p) = coredns {
            p.stop();
        }
        for (k, mut p) in containerds {
            if let Some(k) = k {
                self.remove_containers(k);
            }
            p.stop();
        }
        clean_owned(&self.state);
        if let Some(mut w) = self.restore.take() {
            w.release();
        }
        let left = leftovers_of(&self.state);
        if left.is_empty() {
            let _ = std::fs::remove_file(Path::new(STATE_DIR).join("state.json"));
        }
        left
    }
}

impl Drop for RealNode {
    fn drop(&mut self) {
        if !self.down {
            let left = self.teardown();
            if !left.is_empty() {
                eprintln!("real node: left behind after teardown: {left:#?}");
            }
        }
    }
}

/// Asks CoreDNS at `server` for the `kubernetes` Service's A record; true once it
/// answers with at least one address.
fn dns_answers(server: Ipv4Addr) -> bool {
    let name = "kubernetes.default.svc.cluster.local";
    let mut q = vec![0x47, 0x52, 0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0];
    for label in name.split('.') {
        q.push(label.len() as u8);
        q.extend_from_slice(label.as_bytes());
    }
    q.extend_from_slice(&[0, 0, 1, 0, 1]);
    let Ok(sock) = std::net::UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0)) else {
        return false;
    };
    let _ = sock.set_read_timeout(Some(Duration::from_millis(500)));
    if sock.send_to(&q, (server, 53)).is_err() {
        return false;
    }
    let mut buf = [0u8; 512];
    match sock.recv(&mut buf) {
        // Same id, a response, RCODE 0, at least one answer.
        Ok(n) if n >= 12 => {
            buf[0..2] == [0x47, 0x52]
                && buf[2] & 0x80 != 0
                && buf[3] & 0x0f == 0
                && u16::from_be_bytes([buf[6], buf[7]]) > 0
        }
        _ => false,
    }
}
