//! The Helm chart: `helm lint --strict` is clean, it renders for every documented
//! toggle, and every RBAC rule says why it exists.

use std::process::Command;

use granary_e2e::control_plane::k8s_bin_dir;
use granary_e2e::workspace_root;

fn helm(args: &[&str]) -> (bool, String) {
    let out = Command::new(k8s_bin_dir().unwrap().join("helm"))
        .args(args)
        .current_dir(workspace_root())
        .output()
        .unwrap();
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

#[test]
fn chart_lints_renders_and_documents_its_rbac() {
    let (ok, out) = helm(&[
        "lint",
        "--strict",
        "helm/granary",
        "--set",
        "exampleCluster.enabled=true",
    ]);
    assert!(ok, "{out}");
    assert!(out.contains("0 chart(s) failed"), "{out}");
    for set in [
        "leaderElection.enabled=true",
        "leaderElection.enabled=false",
        "exampleCluster.enabled=true",
        "otlpEndpoint=http://c:4318",
    ] {
        let (ok, out) = helm(&[
            "template",
            "t",
            "helm/granary",
            "--kube-version",
            "1.37.2",
            "--set",
            set,
        ]);
        assert!(ok, "{set}: {out}");
        assert!(out.contains("kind: Deployment"), "{set}");
    }
    let (ok, out) = helm(&[
        "template",
        "t",
        "helm/granary",
        "--kube-version",
        "1.37.2",
        "--set",
        "replicaCount=2",
        "--set",
        "leaderElection.enabled=false",
    ]);
    assert!(
        !ok && out.contains("leader"),
        "two replicas without leader election must be refused: {out}"
    );
    // Metrics: a Service by default; monitors and Prometheus' namespace on request.
    let render = |sets: &[&str]| {
        let mut args = vec!["template", "t", "helm/granary", "--kube-version", "1.37.2"];
        for s in sets {
            args.extend(["--set", s]);
        }
        helm(&args)
    };
    let (ok, out) = render(&[]);
    assert!(ok, "{out}");
    assert!(
        out.contains("name: t-granary-metrics"),
        "metrics Service by default"
    );
    assert!(!out.contains("ServiceMonitor") && !out.contains("--prometheus-namespace"));
    let (ok, out) = render(&[
        "metrics.serviceMonitor.enabled=true",
        "metrics.podMonitor.enabled=true",
        "metrics.prometheusNamespace=monitoring",
    ]);
    assert!(ok, "{out}");
    for want in [
        "kind: ServiceMonitor",
        "kind: PodMonitor",
        "app.kubernetes.io/name: granary-node",
        "- --prometheus-namespace\n            - \"monitoring\"",
    ] {
        assert!(out.contains(want), "{want:?} missing:\n{out}");
    }
    // The PodMonitor follows watchNamespaces, and needs Prometheus' namespace.
    let (ok, out) = render(&[
        "metrics.podMonitor.enabled=true",
        "metrics.prometheusNamespace=monitoring",
        "watchNamespaces={team-a}",
    ]);
    assert!(ok && out.contains("matchNames:\n      - team-a"), "{out}");
    let (ok, out) = render(&["metrics.podMonitor.enabled=true"]);
    assert!(
        !ok && out.contains("needs metrics.prometheusNamespace"),
        "{out}"
    );

    // `helm test` has a Pod when there is a cluster to test.
    let (ok, out) = render(&[]);
    assert!(
        ok && !out.contains("helm.sh/hook: test"),
        "no cluster, no test"
    );
    let (ok, out) = render(&["test.cluster=main"]);
    assert!(ok, "{out}");
    assert!(
        out.contains("helm.sh/hook: test") && out.contains("- smoke-test"),
        "{out}"
    );

    // rbac.namespaced: Roles in the watched namespaces, only cluster-scoped reads in the
    // ClusterRole; refused without watchNamespaces.
    let (ok, out) = render(&["rbac.namespaced=true", "watchNamespaces={team-a,team-b}"]);
    assert!(ok, "{out}");
    let docs: Vec<&str> = out.split("\n---").collect();
    let cluster_role = docs
        .iter()
        .find(|d| d.contains("\nkind: ClusterRole\n"))
        .expect("a ClusterRole");
    assert!(!cluster_role.contains("secrets") && cluster_role.contains("namespaces"));
    for ns in ["team-a", "team-b"] {
        assert!(
            docs.iter().any(|d| d.contains("\nkind: Role\n")
                && d.contains(&format!("namespace: {ns}"))
                && d.contains("\"secrets\"")),
            "no Role with the namespaced rules in {ns}"
        );
    }
    let (ok, out) = render(&["rbac.namespaced=true"]);
    assert!(
        !ok && out.contains("rbac.namespaced needs watchNamespaces"),
        "{out}"
    );

    // values.schema.json refuses what the templates cannot use.
    for (set, why) in [
        ("logFormat=xml", "logFormat"),
        ("image.pullPolicy=Sometimes", "pullPolicy"),
        ("metrics.serviceMonitor.interval=soon", "interval"),
        ("unknownValue=1", "unknownValue"),
    ] {
        let (ok, out) = render(&[set]);
        assert!(!ok && out.contains(why), "{set} must be refused: {out}");
    }

    // Each rule of the ClusterRole and Role is preceded by a comment saying why.
    for file in [
        "helm/granary/templates/clusterrole.yaml",
        "helm/granary/templates/role-leader-election.yaml",
    ] {
        let text = std::fs::read_to_string(workspace_root().join(file)).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        for (i, l) in lines.iter().enumerate() {
            if l.trim_start().starts_with("- apiGroups:") {
                let prev = lines[..i]
                    .iter()
                    .rev()
                    .find(|p| !p.trim().is_empty())
                    .unwrap_or(&"");
                assert!(
                    prev.trim_start().starts_with('#'),
                    "{file}:{}: RBAC rule without a comment saying why",
                    i + 1
                );
            }
        }
    }
}
