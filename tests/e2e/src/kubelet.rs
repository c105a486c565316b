//! A real Kubernetes node for end-to-end tests: containerd (overlayfs snapshotter,
//! Debian's runc), a kubelet, kube-scheduler, kube-proxy (iptables mode), the CNI
//! `bridge` + `host-local` + `loopback` plugins and CoreDNS, all as plain processes
//! started and stopped by the harness, next to a [`ControlPlane`] started with
//! [`ControlPlane::start_for_node`].
//!
//! Layout on the host (one node per machine: the kubelet and containerd write some fixed
//! host paths, cgroups and iptables chains, so two at once would collide):
//! - the node address [`NODE_IP`] sits alone on an otherwise empty bridge [`NODE_BRIDGE`]
//!   (the kubelet refuses a loopback node IP and this kernel has no `dummy` links); the
//!   apiserver, CoreDNS (port 53) and the kubelet listen on it;
//! - pods get addresses in [`POD_SUBNET`] on the bridge [`POD_BRIDGE`] that the CNI
//!   `bridge` plugin creates; the host routes to them directly;
//! - kube-proxy routes ClusterIP Services (from pods and from the host) with
//!   `masqueradeAll`, so a pod reaching a Service backed by a pod on the same bridge gets
//!   its answer back through the host;
//! - CoreDNS serves `cluster.local` from the apiserver (Services, StatefulSet pod names).
//!
//! Everything is recorded before the start ([`Baseline`]) and removed afterwards:
//! processes, containers and their shims, mounts, network namespaces, links, iptables
//! rules and chains, cgroups, the fixed host paths and the sysctls the kubelet and the
//! harness change. [`RealNode::shutdown`] returns whatever it could not remove, so a test
//! asserts that nothing is left behind.

use std::collections::BTreeSet;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use crate::control_plane::{ControlPlane, Proc, poll_until, run};

/// The node's name (its `kubernetes.io/hostname` label).
pub const NODE_NAME: &str = "granary-e2e-node";
/// The node's InternalIP, on [`NODE_BRIDGE`].
pub const NODE_IP: Ipv4Addr = Ipv4Addr::new(10, 253, 255, 1);
/// The empty bridge holding [`NODE_IP`].
pub const NODE_BRIDGE: &str = "grknode0";
/// The pods' bridge (made by the CNI `bridge` plugin).
pub const POD_BRIDGE: &str = "grkcni0";
/// The pods' addresses.
pub const POD_SUBNET: &str = "10.254.0.0/24";
/// The image the CRI runs every pod sandbox from (built by `node-tools.sh`).
const PAUSE_IMAGE: &str = "localhost/pause:3.10-granary1";
/// How long the node may take to report Ready.
const NODE_READY_TIMEOUT: Duration = Duration::from_secs(180);

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

/// Sysctls the harness (forwarding, bridged traffic through iptables) and the kubelet
/// (its "kernel defaults") set; restored afterwards.
const SYSCTLS: &[&str] = &[
    "net/ipv4/ip_forward",
    "net/bridge/bridge-nf-call-iptables",
    "kernel/panic",
    "kernel/panic_on_oops",
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

/// What the host looked like before the node started.
#[derive(Debug, Default)]
struct Baseline {
    sysctls: Vec<(String, String)>,
    mounts: BTreeSet<String>,
    netns: BTreeSet<String>,
    links: BTreeSet<String>,
    iptables: Vec<(&'static str, String)>,
    cgroups: BTreeSet<PathBuf>,
    paths: BTreeSet<String>,
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
fn mounts() -> BTreeSet<String> {
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

fn netns() -> BTreeSet<String> {
    names_in("/run/netns")
}

fn links() -> BTreeSet<String> {
    names_in("/sys/class/net")
}

/// `iptables-save` / `ip6tables-save` without counters or comments: tables, chains and rules.
fn iptables_save(tool: &str) -> String {
    Command::new(tool)
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .output()
        .map(|o| {
            String::from_utf8_lossy(&o.stdout)
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
                .join("\n")
        })
        .unwrap_or_default()
}

/// First-level cgroup directories of every v1 hierarchy.
fn cgroups() -> BTreeSet<PathBuf> {
    let mut out = BTreeSet::new();
    for ctrl in std::fs::read_dir("/sys/fs/cgroup")
        .into_iter()
        .flatten()
        .flatten()
    {
        for d in std::fs::read_dir(ctrl.path())
            .into_iter()
            .flatten()
            .flatten()
        {
            if d.file_type().is_ok_and(|t| t.is_dir()) {
                out.insert(d.path());
            }
        }
    }
    out
}

impl Baseline {
    fn take() -> Baseline {
        Baseline {
            sysctls: SYSCTLS
                .iter()
                .filter_map(|s| read_sysctl(s).map(|v| (s.to_string(), v)))
                .collect(),
            mounts: mounts(),
            netns: netns(),
            links: links(),
            iptables: ["iptables-save", "ip6tables-save"]
                .into_iter()
                .map(|t| (t, iptables_save(t)))
                .collect(),
            cgroups: cgroups(),
            paths: FIXED_PATHS
                .iter()
                .filter(|p| Path::new(p).exists())
                .map(|p| p.to_string())
                .collect(),
        }
    }
}

/// A running node. Create the network with [`RealNode::prepare`] before the control
/// plane (the apiserver listens on [`NODE_IP`]), then [`RealNode::start`] it.
pub struct RealNode {
    baseline: Baseline,
    dir: PathBuf,
    tools: PathBuf,
    k8s_bin: PathBuf,
    socket: PathBuf,
    kubeconfig: PathBuf,
    procs: Vec<Proc>,
    down: bool,
    // Last: removed after everything else.
    _tmp: tempfile::TempDir,
}

impl RealNode {
    /// Records the host's state, builds (once) the runtime tools, and puts [`NODE_IP`]
    /// on [`NODE_BRIDGE`]. Needs root.
    pub fn prepare() -> Result<RealNode> {
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
        // Leftovers of a run that was killed before its cleanup (its processes were
        // killed by their watchdogs): its bridge gives it away; its shims and
        // containers, mounts in its directory and kube-proxy's rules go first.
        if links().contains(NODE_BRIDGE) {
            eprintln!("real node: cleaning up after a run that was killed");
            for pid in processes_matching(|cmdline, cgroup| {
                cmdline.contains("/tmp/grk") || cgroup.contains("/kubepods")
            }) {
                let _ = Command::new("kill")
                    .args(["-KILL", &pid.to_string()])
                    .status();
            }
            let mut stale: Vec<String> = mounts()
                .into_iter()
                .filter(|m| m.starts_with("/tmp/grk"))
                .collect();
            stale.sort_by_key(|m| std::cmp::Reverse(m.len()));
            for m in stale {
                let _ = Command::new("umount").arg("-l").arg(&m).status();
            }
            let _ = Command::new(k8s_bin.join("kube-proxy"))
                .arg("--cleanup")
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status();
        }
        for l in [NODE_BRIDGE, POD_BRIDGE] {
            if links().contains(l) {
                let _ = run(Command::new("ip").args(["link", "del", l]));
            }
        }
        let baseline = Baseline::take();
        // Short: containerd's socket path must stay under 108 bytes.
        let tmp = tempfile::Builder::new().prefix("grk").tempdir_in("/tmp")?;
        let dir = tmp.path().to_path_buf();
        let node = RealNode {
            baseline,
            socket: dir.join("containerd.sock"),
            kubeconfig: PathBuf::new(),
            dir,
            tools,
            k8s_bin,
            procs: Vec::new(),
            down: false,
            _tmp: tmp,
        };
        run(Command::new("ip").args(["link", "add", NODE_BRIDGE, "type", "bridge"]))
            .context("creating the node bridge (the real-node stage needs root)")?;
        run(Command::new("ip").args([
            "addr",
            "add",
            &format!("{NODE_IP}/32"),
            "dev",
            NODE_BRIDGE,
        ]))?;
        run(Command::new("ip").args(["link", "set", NODE_BRIDGE, "up"]))?;
        // Routed traffic: pod -> Service -> pod on the same bridge comes back through
        // the host; bridged traffic must pass iptables for kube-proxy's rules.
        write_sysctl("net/ipv4/ip_forward", "1")?;
        if Path::new("/proc/sys/net/bridge").exists() {
            write_sysctl("net/bridge/bridge-nf-call-iptables", "1")?;
        }
        Ok(node)
    }

    /// Starts CoreDNS, containerd (and imports the pause image and `images`, archives
    /// `ctr images import` reads), the kubelet, kube-scheduler and kube-proxy, and waits
    /// until the node is Ready and schedulable.
    pub fn start(&mut self, cp: &ControlPlane, images: &[PathBuf]) -> Result<()> {
        if cp.node_ip != Some(NODE_IP) {
            bail!("the control plane must be started with ControlPlane::start_for_node(NODE_IP)");
        }
        self.kubeconfig = cp.kubeconfig.clone();
        self.start_coredns()?;
        self.start_containerd()?;
        let pause = self.tools.join("pause.tar");
        self.import_image(&pause)?;
        for image in images {
            self.import_image(image)?;
        }
        self.start_kubelet(cp)?;
        self.start_scheduler()?;
        self.start_kube_proxy()?;
        let t0 = Instant::now();
        let mut last = String::new();
        let res = poll_until(NODE_READY_TIMEOUT, "the node to be Ready", || {
            for p in &mut self.procs {
                if let Ok(Some(status)) = p.child.try_wait() {
                    bail!("{} exited ({status}):\n{}", p.name, p.log_tail(40));
                }
            }
            let out = cp.kubectl(&[
                "get",
                "node",
                NODE_NAME,
                "-o",
                "jsonpath={.status.conditions[?(@.type==\"Ready\")].status} {.spec.taints}",
            ])?;
            last = out.clone();
            Ok((out.starts_with("True") && !out.contains("not-ready")).then_some(()))
        });
        if let Err(e) = res {
            let kubelet = self.procs.iter().find(|p| p.name == "kubelet");
            bail!(
                "{e:#} (last: {last})\n--- kubelet log tail ---\n{}",
                kubelet.map(|p| p.log_tail(60)).unwrap_or_default()
            );
        }
        eprintln!(
            "real node: Ready {:.1?} after the kubelet started",
            t0.elapsed()
        );
        Ok(())
    }

    fn spawn(&mut self, name: &'static str, cmd: Command) -> Result<&mut Proc> {
        let log = self.dir.join(format!("{name}.log"));
        let proc = Proc::spawn(name, cmd, log)?;
        self.procs.push(proc);
        Ok(self.procs.last_mut().expect("just pushed"))
    }

    /// The log file of a node process (`containerd`, `kubelet`, `kube-proxy`, ...).
    pub fn log_path(&self, process: &str) -> PathBuf {
        self.dir.join(format!("{process}.log"))
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
        let mut cmd = Command::new(self.tools.join("bin/coredns"));
        cmd.arg("-conf").arg(&corefile);
        let proc = self.spawn("coredns", cmd)?;
        proc.wait_ready(Duration::from_secs(30), "port 53", || {
            std::net::UdpSocket::bind((NODE_IP, 53)).is_err()
        })
        .map_err(|e| anyhow::anyhow!("{e:#}\n{}", proc.log_tail(30)))
    }

    fn ctr(&self) -> Command {
        let mut c = Command::new(self.tools.join("bin/ctr"));
        c.arg("--address")
            .arg(&self.socket)
            .args(["--namespace", "k8s.io"]);
        c
    }

    fn start_containerd(&mut self) -> Result<()> {
        let cni_conf = self.dir.join("cni/net.d");
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
                    "ranges": [[{"subnet": POD_SUBNET}]],
                    "routes": [{"dst": "0.0.0.0/0"}],
                    "dataDir": self.dir.join("cni/ipam"),
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
            root = self.dir.join("containerd/root").display(),
            state = self.dir.join("containerd/state").display(),
            socket = self.socket.display(),
            cni_bin = self.tools.join("cni").display(),
            cni_conf = cni_conf.display(),
            runc = which("runc")
                .unwrap_or_else(|| PathBuf::from("/usr/sbin/runc"))
                .display(),
            pause = PAUSE_IMAGE,
        );
        let config_path = self.dir.join("containerd.toml");
        std::fs::write(&config_path, config)?;
        let mut cmd = Command::new(self.tools.join("bin/containerd"));
        // The shim is found on PATH.
        let path = format!(
            "{}:{}",
            self.tools.join("bin").display(),
            std::env::var("PATH").unwrap_or_else(|_| "/usr/sbin:/usr/bin:/sbin:/bin".into())
        );
        cmd.arg("--config").arg(&config_path).env("PATH", &path);
        let socket = self.socket.clone();
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
        let proc = self.spawn("containerd", cmd)?;
        proc.wait_ready(Duration::from_secs(60), "its socket", ctr_ok)
            .map_err(|e| anyhow::anyhow!("{e:#}\n{}", proc.log_tail(40)))
    }

    /// `ctr images import` of a docker or OCI archive into the CRI's namespace.
    pub fn import_image(&self, archive: &Path) -> Result<()> {
        run(self
            .ctr()
            .args(["images", "import", "--snapshotter", "overlayfs"])
            .arg(archive))
        .with_context(|| format!("importing {}", archive.display()))
    }

    fn start_kubelet(&mut self, cp: &ControlPlane) -> Result<()> {
        let resolv = self.dir.join("resolv.conf");
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
            "containerRuntimeEndpoint": format!("unix://{}", self.socket.display()),
            "address": NODE_IP.to_string(),
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
            "podLogsDir": self.dir.join("pod-logs"),
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
            // Secrets and ConfigMaps reach running pods sooner than the default minute.
            "syncFrequency": "10s",
            "nodeStatusUpdateFrequency": "5s",
        });
        let config_path = self.dir.join("kubelet.json");
        std::fs::write(&config_path, serde_json::to_vec_pretty(&config)?)?;
        let mut cmd = Command::new(self.k8s_bin.join("kubelet"));
        cmd.arg(format!("--config={}", config_path.display()))
            .arg(format!("--kubeconfig={}", self.kubeconfig.display()))
            .arg(format!("--root-dir={}", self.dir.join("kubelet").display()))
            .arg(format!(
                "--cert-dir={}",
                self.dir.join("kubelet-pki").display()
            ))
            .arg(format!("--hostname-override={NODE_NAME}"))
            .arg(format!("--node-ip={NODE_IP}"))
            .arg("--v=1");
        self.spawn("kubelet", cmd)?;
        Ok(())
    }

    fn start_scheduler(&mut self) -> Result<()> {
        let mut cmd = Command::new(self.k8s_bin.join("kube-scheduler"));
        cmd.arg(format!("--kubeconfig={}", self.kubeconfig.display()))
            .arg("--leader-elect=false")
            // No HTTPS endpoint: nothing scrapes it, no port to collide on.
            .arg("--secure-port=0");
        self.spawn("kube-scheduler", cmd)?;
        Ok(())
    }

    fn start_kube_proxy(&mut self) -> Result<()> {
        let config = serde_json::json!({
            "apiVersion": "kubeproxy.config.k8s.io/v1alpha1",
            "kind": "KubeProxyConfiguration",
            "clientConnection": {"kubeconfig": self.kubeconfig},
            "hostnameOverride": NODE_NAME,
            "mode": "iptables",
            "clusterCIDR": POD_SUBNET,
            "bindAddress": NODE_IP.to_string(),
            "healthzBindAddress": format!("127.0.0.1:{}", crate::free_port()),
            "metricsBindAddress": format!("127.0.0.1:{}", crate::free_port()),
            "nodePortAddresses": [format!("{NODE_IP}/32")],
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
        let config_path = self.dir.join("kube-proxy.json");
        std::fs::write(&config_path, serde_json::to_vec_pretty(&config)?)?;
        let mut cmd = Command::new(self.k8s_bin.join("kube-proxy"));
        cmd.arg(format!("--config={}", config_path.display()));
        self.spawn("kube-proxy", cmd)?;
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
        while Instant::now() < deadline && self.tasks().iter().any(|(_, running)| *running) {
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

    /// Containerd's tasks (containers with a process, stopped ones too until their
    /// sandbox is removed): id and whether it runs.
    fn tasks(&self) -> Vec<(String, bool)> {
        self.ctr()
            .args(["tasks", "ls"])
            .stdin(Stdio::null())
            .stderr(Stdio::null())
            .output()
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

    /// Stops everything and removes what is left, without the apiserver.
    fn teardown(&mut self) -> Vec<String> {
        self.down = true;
        // kube-proxy, scheduler, kubelet: no more changes to containers or rules.
        let mut containerd = None;
        let mut coredns = None;
        while let Some(mut p) = self.procs.pop() {
            match p.name {
                "containerd" => containerd = Some(p),
                "coredns" => coredns = Some(p),
                _ => p.stop(),
            }
        }
        if let Some(mut p) = coredns {
            p.stop();
        }
        if containerd.is_some() {
            // Whatever still runs: killed, then its container record removed.
            for (id, _) in self.tasks() {
                let _ = self
                    .ctr()
                    .args(["tasks", "kill", "-s", "SIGKILL", &id])
                    .output();
            }
            let deadline = Instant::now() + Duration::from_secs(20);
            loop {
                for (id, _) in self.tasks() {
                    let _ = self.ctr().args(["tasks", "delete", "-f", &id]).output();
                }
                if self.tasks().is_empty() || Instant::now() > deadline {
                    break;
                }
                std::thread::sleep(Duration::from_millis(300));
            }
            if let Ok(o) = self.ctr().args(["containers", "ls", "-q"]).output() {
                for id in String::from_utf8_lossy(&o.stdout).split_whitespace() {
                    let _ = self.ctr().args(["containers", "delete", id]).output();
                }
            }
        }
        if let Some(mut p) = containerd {
            p.stop();
        }
        // Shims whose containerd is gone, and anything left in the pods' cgroups.
        let dir = self.dir.display().to_string();
        for pid in processes_matching(|cmdline, cgroup| {
            cmdline.contains(&dir) || cgroup.contains("/kubepods")
        }) {
            let _ = Command::new("kill")
                .args(["-KILL", &pid.to_string()])
                .status();
        }
        std::thread::sleep(Duration::from_millis(300));
        // kube-proxy's chains (its own cleanup), then any other new rule and chain.
        let _ = Command::new(self.k8s_bin.join("kube-proxy"))
            .arg("--cleanup")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
        for (tool, before) in &self.baseline.iptables {
            restore_iptables(tool, before);
        }
        // Mounts made since the start, deepest first.
        let mut new_mounts: Vec<String> = mounts()
            .difference(&self.baseline.mounts)
            .cloned()
            .collect();
        new_mounts.sort_by_key(|m| std::cmp::Reverse(m.len()));
        for m in new_mounts {
            let ok = Command::new("umount")
                .arg(&m)
                .status()
                .is_ok_and(|s| s.success());
            if !ok {
                let _ = Command::new("umount").arg("-l").arg(&m).status();
            }
        }
        for ns in netns().difference(&self.baseline.netns) {
            let _ = Command::new("ip").args(["netns", "del", ns]).status();
        }
        for l in links().difference(&self.baseline.links) {
            let _ = Command::new("ip")
                .args(["link", "del", l])
                .stderr(Stdio::null())
                .status();
        }
        for cg in cgroups().difference(&self.baseline.cgroups) {
            remove_cgroup(cg);
        }
        for p in FIXED_PATHS {
            if !self.baseline.paths.contains(*p) && Path::new(p).exists() {
                let _ = std::fs::remove_dir_all(p);
            }
        }
        for (name, value) in &self.baseline.sysctls {
            let _ = write_sysctl(name, value);
        }
        self.leftovers()
    }

    /// What differs from the baseline.
    fn leftovers(&self) -> Vec<String> {
        let mut left = Vec::new();
        let dir = self.dir.display().to_string();
        for pid in processes_matching(|cmdline, cgroup| {
            cmdline.contains(&dir) || cgroup.contains("/kubepods")
        }) {
            left.push(format!("process {pid}"));
        }
        for m in mounts().difference(&self.baseline.mounts) {
            left.push(format!("mount {m}"));
        }
        for ns in netns().difference(&self.baseline.netns) {
            left.push(format!("network namespace {ns}"));
        }
        for l in links().difference(&self.baseline.links) {
            left.push(format!("link {l}"));
        }
        for (tool, before) in &self.baseline.iptables {
            let now = iptables_save(tool);
            let before: BTreeSet<&str> = before.lines().collect();
            // Tables and built-in chains appear when a table is first used: only rules
            // and user-defined chains (policy "-") count.
            let counts =
                |l: &&str| l.starts_with("-A ") || (l.starts_with(':') && l.ends_with(" -"));
            for line in now.lines().filter(counts).filter(|l| !before.contains(l)) {
                left.push(format!("{tool}: {line}"));
            }
        }
        for cg in cgroups().difference(&self.baseline.cgroups) {
            left.push(format!("cgroup {}", cg.display()));
        }
        for p in FIXED_PATHS {
            if !self.baseline.paths.contains(*p) && Path::new(p).exists() {
                left.push(format!("path {p}"));
            }
        }
        for (name, value) in &self.baseline.sysctls {
            if read_sysctl(name).as_deref() != Some(value.as_str()) {
                left.push(format!("sysctl {name} (was {value})"));
            }
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

fn which(tool: &str) -> Option<PathBuf> {
    std::env::var_os("PATH")
        .and_then(|paths| {
            std::env::split_paths(&paths)
                .map(|p| p.join(tool))
                .find(|p| p.is_file())
        })
        .or_else(|| {
            ["/usr/sbin", "/sbin"]
                .iter()
                .map(|d| Path::new(d).join(tool))
                .find(|p| p.is_file())
        })
}

/// Pids (other than ours) whose command line or cgroup file matches.
fn processes_matching(f: impl Fn(&str, &str) -> bool) -> Vec<u32> {
    let me = std::process::id();
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
        if !cmdline.is_empty() && f(&cmdline, &cgroup) {
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

/// Deletes the rules and chains that are not in `before` (an [`iptables_save`] of the
/// same tool): rules first (`-D` of each new `-A` line), then the new chains.
fn restore_iptables(tool: &str, before: &str) {
    let cli = tool.trim_end_matches("-save");
    let before: BTreeSet<&str> = before.lines().collect();
    let now = iptables_save(tool);
    let mut table = "";
    let mut new_chains: Vec<(String, String)> = Vec::new();
    for line in now.lines() {
        if let Some(t) = line.strip_prefix('*') {
            table = t;
            continue;
        }
        if before.contains(line) {
            continue;
        }
        if let Some(chain) = line.strip_prefix(':') {
            let name = chain.split(' ').next().unwrap_or_default();
            // A chain whose line differs only by its policy is not new.
            if !before.iter().any(|b| b.starts_with(&format!(":{name} "))) {
                new_chains.push((table.to_string(), name.to_string()));
            }
        } else if let Some(rule) = line.strip_prefix("-A ") {
            // iptables-save quotes what needs it for a shell.
            let _ = Command::new("sh")
                .arg("-c")
                .arg(format!("{cli} -w -t {table} -D {rule}"))
                .stderr(Stdio::null())
                .status();
        }
    }
    for (table, chain) in &new_chains {
        let _ = Command::new(cli)
            .args(["-w", "-t", table, "-F", chain])
            .stderr(Stdio::null())
            .status();
    }
    for (table, chain) in &new_chains {
        let _ = Command::new(cli)
            .args(["-w", "-t", table, "-X", chain])
            .stderr(Stdio::null())
            .status();
    }
}
