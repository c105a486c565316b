//! Two operator replicas: exactly one holds the Lease and reconciles; when it is killed
//! the other takes over and reconciles. Reconciles are traced over OTLP. SIGTERM stops an
//! operator promptly and cleanly, also when its API server cannot be reached.

use std::net::TcpStream;
use std::process::{Command, Stdio};
use std::time::Duration;

use granary_e2e::control_plane::{ControlPlane, poll_until};
use granary_e2e::otlp::{collector, traces_contain};
use granary_e2e::{ChildGuard, free_port, operator_binary};

fn start(cp: &ControlPlane, name: &str, otlp: &str, metrics: u16) -> ChildGuard {
    ChildGuard::new(
        Command::new(operator_binary())
            .env("OTEL_EXPORTER_OTLP_ENDPOINT", otlp)
            .env("OTEL_BSP_SCHEDULE_DELAY", "200")
            .args([
                "run",
                "--lease-namespace",
                "granary-system",
                "--lease-name",
                "granary-operator",
                "--metrics-addr",
                &format!("127.0.0.1:{metrics}"),
            ])
            .env("KUBECONFIG", &cp.kubeconfig)
            .env("POD_NAME", name)
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    )
}

/// GET `path` from an operator's metrics port: status code and body.
fn http_get(port: u16, path: &str) -> std::io::Result<(u16, String)> {
    use std::io::{Read, Write};
    let mut s = TcpStream::connect(("127.0.0.1", port))?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nhost: 127.0.0.1\r\nconnection: close\r\n\r\n"
    )?;
    let mut text = String::new();
    s.read_to_string(&mut text)?;
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = text.split_once("\r\n\r\n").map(|(_, b)| b).unwrap_or("");
    Ok((status, body.to_string()))
}

/// The operator Lease, or None if it cannot be read.
fn lease(cp: &ControlPlane) -> Option<serde_json::Value> {
    let out = cp
        .kubectl(&[
            "get",
            "lease",
            "granary-operator",
            "-n",
            "granary-system",
            "-o",
            "json",
        ])
        .ok()?;
    serde_json::from_str(&out).ok()
}

fn holder(cp: &ControlPlane) -> Option<String> {
    lease(cp)?["spec"]["holderIdentity"]
        .as_str()
        .filter(|s| !s.is_empty())
        .map(str::to_string)
}

fn cluster(name: &str) -> String {
    format!(
        "apiVersion: granary.dev/v1alpha1\nkind: StorageCluster\nmetadata: {{name: {name}, namespace: granary-system}}\nspec:\n  region: r\n  replication: {{factor: 1, minInSync: 1}}\n  zones: [{{name: a, pools: [{{name: p, replicas: 1, storage: {{size: 1Gi}}}}]}}]\n  catalog: {{postgresSecretRef: {{name: c, key: url}}}}\n"
    )
}

#[test]
fn one_replica_leads_and_the_other_takes_over_when_it_dies() {
    let cp = ControlPlane::start().unwrap();
    cp.install_crds().unwrap();
    cp.kubectl(&["create", "namespace", "granary-system"])
        .unwrap();
    let (otlp, spans) = collector();
    let ports = [("op-a", free_port()), ("op-b", free_port())];
    let mut a = Some(start(&cp, "op-a", &otlp, ports[0].1));
    let mut b = Some(start(&cp, "op-b", &otlp, ports[1].1));
    let first = poll_until(Duration::from_secs(60), "a lease holder", || {
        Ok(holder(&cp))
    })
    .unwrap();
    assert!(first == "op-a" || first == "op-b", "{first}");
    // Both replicas are Ready, the standby too (a rolling update of the Deployment waits
    // for the new pod's readiness while the old pod holds the Lease); only the holder
    // reports itself the leader.
    for (name, port) in ports {
        let (status, body) = poll_until(Duration::from_secs(30), "readiness", || {
            Ok(http_get(port, "/readyz").ok().filter(|(s, _)| *s == 200))
        })
        .unwrap();
        assert_eq!(status, 200, "{name} /readyz: {body}");
        let leader = if name == first { 1 } else { 0 };
        let want = format!("granary_operator_leader {leader}");
        poll_until(Duration::from_secs(30), "the leader gauge", || {
            let (_, page) = http_get(port, "/metrics")?;
            Ok(page.contains(&want).then_some(()))
        })
        .unwrap_or_else(|e| panic!("{name} (holder {first}) should report {want}: {e:#}"));
    }
    // The leader reconciles.
    cp.kubectl_stdin(&["apply", "-f", "-"], &cluster("one"))
        .unwrap();
    poll_until(Duration::from_secs(60), "cluster one reconciled", || {
        Ok(cp
            .kubectl(&["get", "secret", "one-admin-token", "-n", "granary-system"])
            .ok())
    })
    .unwrap();
    // Stays with the same holder while it lives.
    std::thread::sleep(Duration::from_secs(6));
    assert_eq!(holder(&cp).as_deref(), Some(first.as_str()));
    // Kill the leader for real; the other one takes over once the lease expires.
    if first == "op-a" {
        a.take()
    } else {
        b.take()
    };
    let second = poll_until(Duration::from_secs(60), "a new lease holder", || {
        Ok(holder(&cp).filter(|h| *h != first))
    })
    .unwrap();
    assert_ne!(second, first);
    let transitions = lease(&cp).expect("the lease")["spec"]["leaseTransitions"].clone();
    assert!(transitions.as_i64().unwrap_or(0) >= 1, "{transitions}");
    cp.kubectl_stdin(&["apply", "-f", "-"], &cluster("two"))
        .unwrap();
    poll_until(
        Duration::from_secs(60),
        "cluster two reconciled by the new leader",
        || {
            Ok(cp
                .kubectl(&["get", "secret", "two-admin-token", "-n", "granary-system"])
                .ok())
        },
    )
    .unwrap();
    // Reconciles are traced over OTLP.
    poll_until(Duration::from_secs(30), "operator spans over OTLP", || {
        Ok(traces_contain(&spans, &[b"granary-operator", b"reconciling object"]).then_some(()))
    })
    .unwrap();
    // SIGTERM: the leader stops its controllers and exits 0, promptly.
    let leader = if second == "op-a" { a.take() } else { b.take() };
    let status = leader
        .expect("the new leader is still running")
        .terminate(Duration::from_secs(20));
    assert!(
        status.is_some_and(|s| s.success()),
        "leader did not exit cleanly within 20 s of SIGTERM: {status:?}"
    );
    // ... and gave the Lease up, so a standby would not wait for it to expire.
    let lease = lease(&cp).expect("the lease is still there");
    assert!(
        lease["spec"]["holderIdentity"]
            .as_str()
            .is_none_or(str::is_empty),
        "the stopped leader still holds the lease: {}",
        lease["spec"]
    );
    drop((a, b));
}

/// With the API server unreachable, kube's watchers retry forever; SIGTERM must still end
/// the process within the shutdown deadline, with and without leader election (which then
/// never acquires the Lease).
#[test]
fn sigterm_stops_the_operator_when_the_api_server_is_unreachable() {
    let dir = tempfile::tempdir().unwrap();
    let kubeconfig = dir.path().join("kubeconfig");
    // A port nothing listens on.
    let dead = free_port();
    std::fs::write(
        &kubeconfig,
        format!(
            "apiVersion: v1\nkind: Config\nclusters: [{{name: c, cluster: {{server: 'https://127.0.0.1:{dead}', insecure-skip-tls-verify: true}}}}]\nusers: [{{name: u, user: {{token: t}}}}]\ncontexts: [{{name: x, context: {{cluster: c, user: u}}}}]\ncurrent-context: x\n"
        ),
    )
    .unwrap();
    for leader_election in [false, true] {
        let metrics = free_port();
        let mut args = vec![
            "run".to_string(),
            "--metrics-addr".into(),
            format!("127.0.0.1:{metrics}"),
            "--shutdown-grace".into(),
            "5s".into(),
        ];
        if !leader_election {
            args.push("--no-leader-election".into());
        }
        // The second run also checks the JSON log format, line by line.
        let log = dir.path().join(format!("operator-{leader_election}.log"));
        let op = ChildGuard::new(
            Command::new(operator_binary())
                .args(&args)
                .env("KUBECONFIG", &kubeconfig)
                .env("RUST_LOG", "info")
                .env(
                    "GRANARY_LOG_FORMAT",
                    if leader_election { "json" } else { "" },
                )
                .stdout(Stdio::null())
                .stderr(std::fs::File::create(&log).unwrap())
                .spawn()
                .unwrap(),
        );
        // The metrics listener opens after the signal handlers are installed.
        poll_until(Duration::from_secs(30), "operator metrics listener", || {
            Ok(TcpStream::connect(("127.0.0.1", metrics)).ok())
        })
        .unwrap();
        // Let the watchers (or the Lease loop) fail and back off a few times.
        std::thread::sleep(Duration::from_secs(3));
        let status = op.terminate(Duration::from_secs(20));
        assert!(
            status.is_some_and(|s| s.success()),
            "leader election {leader_election}: no clean exit within 20 s of SIGTERM: {status:?}"
        );
        let log = std::fs::read_to_string(&log).unwrap();
        assert!(log.contains("SIGTERM received"), "{log}");
        if leader_election {
            for line in log.lines().filter(|l| !l.trim().is_empty()) {
                let v: serde_json::Value = serde_json::from_str(line)
                    .unwrap_or_else(|e| panic!("not a JSON log line ({e}): {line}"));
                assert!(
                    v["level"].is_string() && v["timestamp"].is_string(),
                    "{line}"
                );
            }
        } else {
            assert!(!log.contains('\u{1b}'), "colour codes in a log file: {log}");
        }
    }
}
