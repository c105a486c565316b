//! Smoke test of the envtest-style control plane: a real etcd + kube-apiserver that stores
//! objects, enforces RBAC on ServiceAccount tokens, and (with kube-controller-manager)
//! turns a StatefulSet into Pod objects. Every process is gone once it is dropped.

use std::time::{Duration, Instant};

use granary_e2e::control_plane::{ControlPlane, poll_until};

const CONFIGMAP: &str = r#"
apiVersion: v1
kind: ConfigMap
metadata:
  name: greeting
  namespace: demo
data:
  message: hello from granary
"#;

const STATEFULSET: &str = r#"
apiVersion: apps/v1
kind: StatefulSet
metadata:
  name: web
  namespace: demo
spec:
  serviceName: web
  replicas: 2
  selector:
    matchLabels: {app: web}
  template:
    metadata:
      labels: {app: web}
    spec:
      containers:
      - name: web
        image: registry.invalid/granary/none:1
"#;

#[test]
fn control_plane_stores_objects_enforces_rbac_and_runs_statefulsets() {
    let t0 = Instant::now();
    let mut cp = ControlPlane::start().unwrap_or_else(|e| panic!("{e:#}"));
    eprintln!("control plane at {} ready in {:?}", cp.server, t0.elapsed());
    let pids = cp.pids();
    assert_eq!(pids.len(), 2, "etcd and kube-apiserver");

    // Objects round-trip through the apiserver and etcd.
    cp.kubectl(&["create", "namespace", "demo"]).unwrap();
    let applied = cp.kubectl_stdin(&["apply", "-f", "-"], CONFIGMAP).unwrap();
    assert!(applied.contains("configmap/greeting"), "{applied}");
    let message = cp
        .kubectl(&[
            "get",
            "configmap",
            "greeting",
            "-n",
            "demo",
            "-o",
            "jsonpath={.data.message}",
        ])
        .unwrap();
    assert_eq!(message, "hello from granary");

    // A ServiceAccount without any RBAC: its token authenticates, but may not read.
    cp.kubectl(&["create", "serviceaccount", "nobody", "-n", "demo"])
        .unwrap();
    let token = cp.token_for_service_account("demo", "nobody").unwrap();
    let as_nobody = cp.kubeconfig_for_token(&token);
    let whoami = cp
        .kubectl_with(
            &as_nobody,
            &[
                "auth",
                "whoami",
                "-o",
                "jsonpath={.status.userInfo.username}",
            ],
            None,
        )
        .unwrap();
    assert_eq!(whoami, "system:serviceaccount:demo:nobody");
    let denied = cp
        .kubectl_with(&as_nobody, &["get", "configmaps", "-n", "demo"], None)
        .expect_err("a ServiceAccount without RBAC must not list ConfigMaps");
    let denied = format!("{denied:#}");
    assert!(denied.contains("(Forbidden)"), "{denied}");
    assert!(
        denied.contains("system:serviceaccount:demo:nobody"),
        "{denied}"
    );

    // Granting a Role makes the same token work, in that namespace only: RBAC decides.
    cp.kubectl(&[
        "create",
        "role",
        "cm-reader",
        "-n",
        "demo",
        "--verb=get,list",
        "--resource=configmaps",
    ])
    .unwrap();
    cp.kubectl(&[
        "create",
        "rolebinding",
        "cm-reader",
        "-n",
        "demo",
        "--role=cm-reader",
        "--serviceaccount=demo:nobody",
    ])
    .unwrap();
    let listed = poll_until(
        Duration::from_secs(30),
        "the RoleBinding to take effect",
        || {
            Ok(Some(cp.kubectl_with(
                &as_nobody,
                &["get", "configmaps", "-n", "demo", "-o", "name"],
                None,
            )?))
        },
    )
    .unwrap();
    assert!(listed.contains("configmap/greeting"), "{listed}");
    let elsewhere = cp
        .kubectl_with(&as_nobody, &["get", "configmaps", "-n", "default"], None)
        .expect_err("the Role is namespaced");
    assert!(
        format!("{elsewhere:#}").contains("(Forbidden)"),
        "{elsewhere:#}"
    );

    // With the controller manager, a StatefulSet gets Pods (which stay Pending: no nodes).
    let t1 = Instant::now();
    cp.start_controller_manager()
        .unwrap_or_else(|e| panic!("{e:#}"));
    eprintln!("controller manager ready in {:?}", t1.elapsed());
    cp.kubectl_stdin(&["apply", "-f", "-"], STATEFULSET)
        .unwrap();
    let pod: serde_json::Value = poll_until(Duration::from_secs(60), "Pod demo/web-0", || {
        let json = cp.kubectl(&["get", "pod", "web-0", "-n", "demo", "-o", "json"])?;
        Ok(Some(serde_json::from_str(&json)?))
    })
    .unwrap();
    let owner = &pod["metadata"]["ownerReferences"][0];
    assert_eq!(owner["kind"], "StatefulSet", "{pod:#}");
    assert_eq!(owner["name"], "web", "{pod:#}");
    assert_eq!(owner["controller"], true, "{pod:#}");
    assert_eq!(pod["status"]["phase"], "Pending", "{pod:#}");
    assert_eq!(pod["spec"]["serviceAccountName"], "default", "{pod:#}");

    // Drop stops everything it started.
    let pids = cp.pids();
    assert_eq!(
        pids.len(),
        3,
        "etcd, kube-apiserver, kube-controller-manager"
    );
    let t2 = Instant::now();
    drop(cp);
    eprintln!("stopped in {:?}", t2.elapsed());
    for pid in pids {
        assert!(
            !std::path::Path::new(&format!("/proc/{pid}")).exists(),
            "process {pid} outlived the control plane"
        );
    }
    eprintln!("total {:?}", t0.elapsed());
}
