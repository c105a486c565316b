//! Two operator replicas: exactly one holds the Lease and reconciles; when it is killed
//! the other takes over and reconciles. Reconciles are traced over OTLP.

use std::process::{Child, Command, Stdio};
use std::time::Duration;

use granary_e2e::control_plane::{ControlPlane, poll_until};
use granary_e2e::otlp::{collector, traces_contain};
use granary_e2e::{operator_binary, workspace_root};

struct Operator(Child);

impl Drop for Operator {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn start(cp: &ControlPlane, name: &str, otlp: &str) -> Operator {
    Operator(
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
                "127.0.0.1:0",
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

fn holder(cp: &ControlPlane) -> Option<String> {
    cp.kubectl(&[
        "get",
        "lease",
        "granary-operator",
        "-n",
        "granary-system",
        "-o",
        "jsonpath={.spec.holderIdentity}",
    ])
    .ok()
    .map(|s| s.trim().to_string())
    .filter(|s| !s.is_empty())
}

fn cluster(name: &str) -> String {
    format!(
        "apiVersion: granary.dev/v1alpha1\nkind: StorageCluster\nmetadata: {{name: {name}, namespace: granary-system}}\nspec:\n  region: r\n  replication: {{factor: 1, minInSync: 1}}\n  zones: [{{name: a, pools: [{{name: p, replicas: 1, storage: {{size: 1Gi}}}}]}}]\n  catalog: {{postgresSecretRef: {{name: c, key: url}}}}\n"
    )
}

#[test]
fn one_replica_leads_and_the_other_takes_over_when_it_dies() {
    let cp = ControlPlane::start().unwrap();
    cp.kubectl(&[
        "apply",
        "--server-side",
        "-f",
        &workspace_root()
            .join("crds/granary.dev.yaml")
            .display()
            .to_string(),
    ])
    .unwrap();
    cp.kubectl(&[
        "wait",
        "--for=condition=Established",
        "crd/storageclusters.granary.dev",
        "--timeout=60s",
    ])
    .unwrap();
    cp.kubectl(&["create", "namespace", "granary-system"])
        .unwrap();
    let (otlp, spans) = collector();
    let mut a = Some(start(&cp, "op-a", &otlp));
    let mut b = Some(start(&cp, "op-b", &otlp));
    let first = poll_until(Duration::from_secs(60), "a lease holder", || {
        Ok(holder(&cp))
    })
    .unwrap();
    assert!(first == "op-a" || first == "op-b", "{first}");
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
    let transitions = cp
        .kubectl(&[
            "get",
            "lease",
            "granary-operator",
            "-n",
            "granary-system",
            "-o",
            "jsonpath={.spec.leaseTransitions}",
        ])
        .unwrap();
    assert!(
        transitions.trim().parse::<i32>().unwrap_or(0) >= 1,
        "{transitions}"
    );
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
    drop((a, b));
}
