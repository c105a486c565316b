//! The operator against a real kube-apiserver + etcd (+ kube-controller-manager):
//! chart install, CRD validation, reconcile of a StorageCluster and Tenants into
//! objects, registration with a real storage node, updates, deletion policies, and the
//! chart's RBAC as the operator's only permissions.

use std::process::{Command, Stdio};
use std::time::Duration;

use anyhow::{Context, Result};
use aws_sdk_s3::primitives::ByteStream;
use granary_e2e::control_plane::{ControlPlane, poll_until};
use granary_e2e::{ChildGuard, NodeProc, free_port, operator_binary, s3_client, workspace_root};
use serde_json::Value;

fn condition(obj: &Value, type_: &str) -> Option<(String, String, String)> {
    obj["status"]["conditions"]
        .as_array()?
        .iter()
        .find(|c| c["type"] == type_)
        .map(|c| {
            (
                c["status"].as_str().unwrap_or("").to_string(),
                c["reason"].as_str().unwrap_or("").to_string(),
                c["message"].as_str().unwrap_or("").to_string(),
            )
        })
}

fn wait_for<T>(what: &str, secs: u64, f: impl FnMut() -> Result<Option<T>>) -> T {
    poll_until(Duration::from_secs(secs), what, f).unwrap_or_else(|e| panic!("{e:#}"))
}

/// `kubectl apply` must fail with a message containing `expect`.
fn assert_rejected(cp: &ControlPlane, yaml: &str, expect: &str) {
    let err = cp
        .kubectl_stdin(&["apply", "-f", "-"], yaml)
        .expect_err(&format!(
            "accepted invalid resource; wanted {expect:?}:\n{yaml}"
        ));
    let msg = format!("{err:#}");
    assert!(
        msg.contains(expect),
        "rejection message {msg:?} lacks {expect:?}"
    );
}

/// The StatefulSets of the StorageCluster `main` in `ns` (`kubectl get -o json`).
fn main_statefulsets(cp: &ControlPlane, ns: &str) -> Result<Value> {
    cp.kubectl_json(&[
        "get",
        "statefulsets",
        "-n",
        ns,
        "-l",
        "app.kubernetes.io/instance=main",
    ])
}

fn cluster_yaml(name: &str, ns: &str, spec: &str) -> String {
    format!(
        "apiVersion: granary.dev/v1alpha1\nkind: StorageCluster\nmetadata: {{name: {name}, namespace: {ns}}}\nspec:\n{spec}"
    )
}

const ZONES3: &str = "  zones:\n    - {name: a, pools: [{name: p, replicas: 1, storage: {size: 1Gi}}]}\n    - {name: b, pools: [{name: p, replicas: 1, storage: {size: 1Gi}}]}\n    - {name: c, pools: [{name: p, replicas: 1, storage: {size: 1Gi}}]}\n";
const CATALOG: &str = "  catalog: {postgresSecretRef: {name: granary-catalog, key: url}}\n";

fn tenant_yaml(name: &str, ns: &str, spec_extra: &str) -> String {
    format!(
        "apiVersion: granary.dev/v1alpha1\nkind: Tenant\nmetadata: {{name: {name}, namespace: {ns}}}\nspec:\n  clusterRef: {{name: main, namespace: granary-system}}\n  credentialsSecret: {name}-creds\n{spec_extra}"
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operator_reconciles_clusters_and_tenants_against_a_real_apiserver() {
    let mut cp = ControlPlane::start().expect("control plane");
    cp.start_controller_manager().expect("controller manager");
    let helm = cp.bin_dir.join("helm");
    let chart = workspace_root().join("helm/granary");

    // helm install; the CRDs become Established.
    let helm_release = |verb: &str, sets: &[&str]| {
        let mut c = Command::new(&helm);
        c.args([verb, "granary"]).arg(&chart);
        c.args(["-n", "granary-system", "--create-namespace"]);
        for s in sets {
            c.args(["--set", s]);
        }
        let out = c.arg("--kubeconfig").arg(&cp.kubeconfig).output().unwrap();
        assert!(
            out.status.success(),
            "helm {verb}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    helm_release("install", &["test.cluster=main"]);
    cp.kubectl(&[
        "wait",
        "--for=condition=Established",
        "crd/storageclusters.granary.dev",
        "crd/tenants.granary.dev",
        "--timeout=60s",
    ])
    .unwrap();

    // helm upgrade with changed values goes through, and with leader election on the
    // Deployment rolls (RollingUpdate: the new pod turns Ready as a standby while the
    // old one holds the Lease, see leader_election.rs), not Recreate.
    helm_release("upgrade", &["shutdownGraceSeconds=12", "test.cluster=main"]);
    let deploy = cp
        .kubectl_json(&[
            "get",
            "deployments",
            "-n",
            "granary-system",
            "-l",
            "app.kubernetes.io/instance=granary",
        ])
        .unwrap();
    let d = &deploy["items"][0];
    assert!(
        d["spec"]["template"]["spec"]["containers"][0]["args"]
            .as_array()
            .unwrap()
            .contains(&serde_json::json!("12s"))
    );
    assert_eq!(d["spec"]["strategy"]["type"], "RollingUpdate", "{d}");
    assert_eq!(
        d["metadata"]["generation"], 2,
        "the upgrade changed the pod template"
    );

    // The apiserver rejects invalid resources with clear messages.
    let ns = "granary-system";
    assert_rejected(
        &cp,
        &cluster_yaml(
            "bad1",
            ns,
            &format!(
                "  region: r\n  replication: {{factor: 3, minInSync: 2}}\n  zones:\n    - {{name: a, pools: [{{name: p, replicas: 1, storage: {{size: 1Gi}}}}]}}\n{CATALOG}"
            ),
        ),
        "replication.factor must not exceed the number of zones",
    );
    assert_rejected(
        &cp,
        &cluster_yaml(
            "bad2",
            ns,
            &format!("  region: r\n  replication: {{factor: 2, minInSync: 3}}\n{ZONES3}{CATALOG}"),
        ),
        "minInSync must not exceed replication.factor",
    );
    assert_rejected(
        &cp,
        &cluster_yaml(
            "bad3",
            ns,
            &format!(
                "  region: r\n  replication: {{factor: 1, minInSync: 1}}\n  zones:\n    - {{name: a, pools: [{{name: p, replicas: 1, storage: {{size: 1Gi}}}}]}}\n    - {{name: a, pools: [{{name: q, replicas: 1, storage: {{size: 1Gi}}}}]}}\n{CATALOG}"
            ),
        ),
        "zone names must be unique",
    );
    assert_rejected(
        &cp,
        &cluster_yaml(
            "bad4",
            ns,
            &format!(
                "  region: r\n  replication: {{factor: 1, minInSync: 1}}\n  partitions: 0\n{ZONES3}{CATALOG}"
            ),
        ),
        "partitions",
    );
    assert_rejected(
        &cp,
        &cluster_yaml(
            "bad5",
            ns,
            &format!("  region: r\n  replication: {{factor: 9, minInSync: 1}}\n{ZONES3}{CATALOG}"),
        ),
        "factor",
    );
    cp.kubectl(&["create", "namespace", "team-analytics"])
        .unwrap();
    cp.kubectl(&["create", "namespace", "team-web"]).unwrap();
    cp.kubectl(&["create", "namespace", "team-denied"]).unwrap();
    for n in ["team-analytics", "team-web"] {
        cp.kubectl(&["label", "namespace", n, "granary.dev/storage=allowed"])
            .unwrap();
    }
    assert_rejected(
        &cp,
        &tenant_yaml("t1", "team-web", "  quotas: {objects: -1}\n"),
        "quotas.objects",
    );
    assert_rejected(
        &cp,
        &tenant_yaml("t2", "team-web", "  quotas: {storage: \"-5Gi\"}\n"),
        "quotas.storage must not be negative",
    );
    assert_rejected(
        &cp,
        &tenant_yaml("t3", "team-web", "  qos: {weight: 0}\n"),
        "qos.weight",
    );
    assert_rejected(
        &cp,
        &tenant_yaml("t4", "team-web", "  placement: {zones: [a, a]}\n"),
        "placement zones must be unique",
    );
    assert_rejected(
        &cp,
        &tenant_yaml("t5", "team-web", "  deletionPolicy: Destroy\n"),
        "deletionPolicy",
    );
    assert_rejected(
        &cp,
        &tenant_yaml("t6", "team-web", "  tiering: {coldAfter: \"30 days\"}\n"),
        "coldAfter",
    );
    assert_rejected(
        &cp,
        &tenant_yaml("t6r", "team-web", "  tiering: {restoreAfterReads: 0}\n"),
        "restoreAfterReads",
    );

    // The operator runs with exactly the chart's ServiceAccount.
    let sa = cp
        .kubectl_json(&[
            "get",
            "serviceaccounts",
            "-n",
            ns,
            "-l",
            "app.kubernetes.io/instance=granary,app.kubernetes.io/name=granary",
        ])
        .unwrap()["items"][0]["metadata"]["name"]
        .as_str()
        .expect("chart ServiceAccount")
        .to_string();
    let token = cp.token_for_service_account(ns, &sa).unwrap();
    let kubeconfig = cp.kubeconfig_for_token(&token);
    let dir = tempfile::tempdir().unwrap();
    let op_log = dir.path().join("operator.log");
    // ... and with the args and env of the chart's Deployment (only the metrics address
    // moves to loopback, and the downward-API values are filled in by hand).
    let deploy = cp
        .kubectl_json(&[
            "get",
            "deployments",
            "-n",
            ns,
            "-l",
            "app.kubernetes.io/instance=granary",
        ])
        .unwrap();
    let container = &deploy["items"][0]["spec"]["template"]["spec"]["containers"][0];
    let mut args: Vec<String> = container["args"]
        .as_array()
        .expect("chart Deployment args")
        .iter()
        .map(|a| a.as_str().unwrap().to_string())
        .collect();
    let at = args
        .iter()
        .position(|a| a == "--metrics-addr")
        .expect("--metrics-addr in the chart's args");
    let metrics_port = free_port();
    args[at + 1] = format!("127.0.0.1:{metrics_port}");
    let mut operator = Command::new(operator_binary());
    operator.args(&args);
    for e in container["env"].as_array().expect("chart Deployment env") {
        if let Some(v) = e["value"].as_str() {
            operator.env(e["name"].as_str().unwrap(), v);
        }
    }
    let _op = ChildGuard::new(
        operator
            .env("KUBECONFIG", &kubeconfig)
            .env("POD_NAMESPACE", ns)
            .env("POD_NAME", "granary-operator-0")
            .env("RUST_LOG", "info,kube=warn")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&op_log).unwrap())
            .spawn()
            .unwrap(),
    );

    // A storage node process stands in for the pods (no kubelet here). Its ports are
    // fixed before the cluster exists so the cluster can point at them.
    let (s3p, kvp, adp) = (free_port(), free_port(), free_port());
    let create_catalog_secret = || {
        cp.kubectl(&[
            "create",
            "secret",
            "generic",
            "granary-catalog",
            "-n",
            ns,
            "--from-literal=url=sqlite::memory:",
        ])
        .unwrap();
    };
    create_catalog_secret();
    let mut sc: Value = serde_yaml_to_json(
        &std::fs::read_to_string(workspace_root().join("examples/storagecluster.yaml")).unwrap(),
    );
    sc["metadata"]["annotations"] = serde_json::json!({
        "granary.dev/admin-endpoint": format!("http://127.0.0.1:{adp}"),
        "granary.dev/s3-endpoint": format!("http://127.0.0.1:{s3p}"),
        "granary.dev/kv-endpoint": format!("http://127.0.0.1:{kvp}"),
    });
    cp.kubectl_stdin(&["apply", "-f", "-"], &sc.to_string())
        .unwrap();

    let token = wait_for("admin token Secret", 60, || {
        cp.secret_value(ns, "main-admin-token", "token")
    });
    let master = wait_for("master key Secret", 60, || {
        cp.secret_value(ns, "main-master-key", "masterKey")
    });
    let node_dir = dir.path().join("node");
    let config = dir.path().join("node.toml");
    std::fs::write(
        &config,
        format!(
            "region = \"eu-west-1\"\ndata_dir = \"{}\"\ns3_listen = \"127.0.0.1:{s3p}\"\nkv_listen = \"127.0.0.1:{kvp}\"\nadmin_listen = \"127.0.0.1:{adp}\"\nrpc_listen = \"127.0.0.1:0\"\n",
            node_dir.display()
        ),
    )
    .unwrap();
    let _node = NodeProc::serve(
        &node_dir,
        &config,
        &[
            ("GRANARY_ADMIN_TOKEN", &token),
            ("GRANARY_MASTER_KEY", &master),
        ],
        &token,
    )
    .unwrap();

    // Objects, field by field.
    let stss = wait_for("4 StatefulSets", 60, || {
        let v = main_statefulsets(&cp, ns)?;
        Ok((v["items"].as_array().map_or(0, Vec::len) == 4).then_some(v))
    });
    let names: Vec<_> = stss["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["metadata"]["name"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(
        names,
        ["main-a-fast", "main-b-fast", "main-c-bulk", "main-c-fast"]
    );
    let a = &stss["items"][0];
    assert_eq!(a["spec"]["replicas"], 2);
    assert_eq!(
        a["spec"]["template"]["spec"]["nodeSelector"]["topology.kubernetes.io/zone"],
        "eu-west-1a"
    );
    assert_eq!(
        a["spec"]["volumeClaimTemplates"][0]["spec"]["resources"]["requests"]["storage"],
        "500Gi"
    );
    assert_eq!(
        a["metadata"]["ownerReferences"][0]["kind"],
        "StorageCluster"
    );
    // One budget over all the cluster's storage nodes.
    let pdb = wait_for("the cluster-wide PDB", 30, || {
        Ok(cp
            .kubectl_json(&["get", "pdb", "main-storage", "-n", ns])
            .ok())
    });
    assert_eq!(pdb["spec"]["maxUnavailable"], 1);
    assert_eq!(
        pdb["spec"]["selector"]["matchLabels"],
        serde_json::json!({"app.kubernetes.io/name": "granary-node", "app.kubernetes.io/instance": "main"})
    );
    // A per-pool budget as an earlier operator version applied it (owned by the cluster)
    // goes at the next reconcile, since a pod matched by two budgets cannot be evicted;
    // a budget with the same labels that the cluster does not own is left alone.
    let uid = cp
        .kubectl_json(&["get", "storagecluster", "main", "-n", ns])
        .unwrap()["metadata"]["uid"]
        .as_str()
        .unwrap()
        .to_string();
    let labels = "{app.kubernetes.io/name: granary-node, app.kubernetes.io/instance: main, app.kubernetes.io/managed-by: granary-operator}";
    let selector = "{matchLabels: {app.kubernetes.io/name: granary-node, app.kubernetes.io/instance: main, granary.dev/zone: a, granary.dev/pool: fast}}";
    cp.kubectl_stdin(
        &["apply", "-f", "-"],
        &format!(
            "apiVersion: policy/v1\nkind: PodDisruptionBudget\nmetadata:\n  name: main-a-fast\n  namespace: {ns}\n  labels: {labels}\n  ownerReferences: [{{apiVersion: granary.dev/v1alpha1, kind: StorageCluster, name: main, uid: {uid}, controller: true}}]\nspec:\n  maxUnavailable: 1\n  selector: {selector}\n---\napiVersion: policy/v1\nkind: PodDisruptionBudget\nmetadata:\n  name: someone-elses\n  namespace: {ns}\n  labels: {labels}\nspec:\n  maxUnavailable: 1\n  selector: {selector}\n"
        ),
    )
    .unwrap();
    poke(&cp, ns, "granary.dev/test-touch");
    wait_for("the superseded per-pool PDB deleted", 60, || {
        Ok(cp
            .kubectl_json(&["get", "pdb", "main-a-fast", "-n", ns])
            .is_err()
            .then_some(()))
    });
    cp.kubectl_json(&["get", "pdb", "someone-elses", "-n", ns])
        .expect("a PDB the cluster does not own is kept");
    cp.kubectl(&["delete", "pdb", "someone-elses", "-n", ns])
        .unwrap();
    for svc in ["main-s3", "main-kv", "main-internal", "main-a-fast"] {
        cp.kubectl_json(&["get", "service", svc, "-n", ns])
            .unwrap_or_else(|e| panic!("service {svc}: {e}"));
    }
    let np = cp
        .kubectl_json(&["get", "networkpolicy", "main-node", "-n", ns])
        .unwrap();
    assert_eq!(np["spec"]["ingress"].as_array().unwrap().len(), 3);
    // The controller manager creates Pods from the StatefulSets (they stay Pending).
    wait_for("pod main-a-fast-0", 60, || {
        Ok(cp
            .kubectl_json(&["get", "pod", "main-a-fast-0", "-n", ns])
            .ok())
    });
    let cluster = wait_for("cluster status", 60, || {
        let v = cp.kubectl_json(&["get", "storagecluster", "main", "-n", ns])?;
        Ok(condition(&v, "Ready").map(|_| v))
    });
    assert_eq!(
        condition(&cluster, "Ready").unwrap().0,
        "False",
        "no pod can become ready without kubelets"
    );
    assert_eq!(condition(&cluster, "Progressing").unwrap().0, "True");
    assert_eq!(
        cluster["status"]["observedGeneration"],
        cluster["metadata"]["generation"]
    );
    // Replication health from the nodes' admin API: one node for factor 3 and
    // minInSync 2 leaves every partition below minInSync, which Degraded says.
    let cluster = wait_for("replication health in status", 60, || {
        let v = cp.kubectl_json(&["get", "storagecluster", "main", "-n", ns])?;
        Ok(v["status"]["layoutVersion"].as_i64().map(|_| v))
    });
    let st = &cluster["status"];
    assert_eq!(st["members"]["alive"], 1, "{st}");
    assert_eq!(st["members"]["failed"], 0);
    assert_eq!(st["underReplicatedPartitions"], 1024);
    assert_eq!(st["belowMinInSyncPartitions"], 1024);
    let degraded = condition(&cluster, "Degraded").unwrap();
    assert_eq!(
        (degraded.0.as_str(), degraded.1.as_str()),
        ("True", "BelowMinInSync")
    );

    // partitions is immutable once set.
    let err = cp
        .kubectl(&[
            "patch",
            "storagecluster",
            "main",
            "-n",
            ns,
            "--type=merge",
            "-p",
            r#"{"spec":{"partitions":2048}}"#,
        ])
        .expect_err("changing partitions must be refused");
    assert!(
        format!("{err:#}").contains("partitions is immutable"),
        "{err:#}"
    );

    // Tenants: two allowed namespaces and one that is not.
    cp.kubectl_stdin(
        &["apply", "-f", "-"],
        &std::fs::read_to_string(workspace_root().join("examples/tenants.yaml")).unwrap(),
    )
    .unwrap();
    cp.kubectl_stdin(
        &["apply", "-f", "-"],
        &tenant_yaml("intruder", "team-denied", ""),
    )
    .unwrap();
    let ak = wait_for("analytics credentials", 90, || {
        cp.secret_value("team-analytics", "analytics-granary", "AWS_ACCESS_KEY_ID")
    });
    let sk = cp
        .secret_value(
            "team-analytics",
            "analytics-granary",
            "AWS_SECRET_ACCESS_KEY",
        )
        .unwrap()
        .unwrap();
    let s3 = cp
        .secret_value("team-analytics", "analytics-granary", "S3_ENDPOINT")
        .unwrap()
        .unwrap();
    assert_eq!(s3, format!("http://127.0.0.1:{s3p}"));
    assert_eq!(
        cp.secret_value("team-analytics", "analytics-granary", "AWS_REGION")
            .unwrap()
            .as_deref(),
        Some("eu-west-1")
    );
    assert!(
        cp.secret_value("team-analytics", "analytics-granary", "KV_ENDPOINT")
            .unwrap()
            .is_some()
    );
    let denied = wait_for("intruder condition", 60, || {
        let v = cp.kubectl_json(&["get", "tenant", "intruder", "-n", "team-denied"])?;
        Ok(condition(&v, "Ready"))
    });
    assert_eq!(
        (denied.0.as_str(), denied.1.as_str()),
        ("False", "NamespaceNotAllowed"),
        "{denied:?}"
    );
    assert!(
        cp.secret_value("team-denied", "intruder-creds", "AWS_ACCESS_KEY_ID")
            .unwrap()
            .is_none()
    );

    // clusterRef is immutable: a tenant's data, keys and cleanup live on its cluster.
    let err = cp
        .kubectl(&[
            "patch",
            "tenant",
            "web",
            "-n",
            "team-web",
            "--type=merge",
            "-p",
            r#"{"spec":{"clusterRef":{"name":"elsewhere","namespace":"granary-system"}}}"#,
        ])
        .expect_err("changing clusterRef must be refused");
    assert!(
        format!("{err:#}").contains("clusterRef is immutable"),
        "{err:#}"
    );

    // Registered, but not Ready while its cluster is not (no kubelets, no ready nodes).
    let ready = wait_for("analytics Ready condition", 60, || {
        let v = cp.kubectl_json(&["get", "tenant", "analytics", "-n", "team-analytics"])?;
        Ok(condition(&v, "Ready"))
    });
    assert_eq!(
        (ready.0.as_str(), ready.1.as_str()),
        ("False", "ClusterNotReady"),
        "{ready:?}"
    );
    assert!(
        ready
            .2
            .contains("StorageCluster granary-system/main is not Ready"),
        "{ready:?}"
    );

    // The generated credentials work against the node with a real S3 client.
    let c = s3_client(&s3, &ak, &sk);
    c.create_bucket().bucket("reports").send().await.unwrap();
    c.put_object()
        .bucket("reports")
        .key("k")
        .body(ByteStream::from_static(b"from kubernetes"))
        .send()
        .await
        .unwrap();
    let got = c
        .get_object()
        .bucket("reports")
        .key("k")
        .send()
        .await
        .unwrap()
        .body
        .collect()
        .await
        .unwrap()
        .into_bytes();
    assert_eq!(got.as_ref(), b"from kubernetes");

    // A namespace that loses its permission: its tenant is suspended (keys refused, data
    // kept) and resumes when the permission is back.
    cp.kubectl(&[
        "label",
        "namespace",
        "team-analytics",
        "granary.dev/storage-",
    ])
    .unwrap();
    let suspended = wait_for("analytics suspended", 60, || {
        let v = cp.kubectl_json(&["get", "tenant", "analytics", "-n", "team-analytics"])?;
        Ok(condition(&v, "Ready").filter(|c| c.1 == "NamespaceNotAllowed"))
    });
    assert!(suspended.2.contains("suspended"), "{suspended:?}");
    let refused = c.list_buckets().send().await;
    let err = format!(
        "{:?}",
        refused.expect_err("a suspended tenant's key is refused")
    );
    assert!(err.contains("InvalidAccessKeyId"), "{err}");
    cp.kubectl(&[
        "label",
        "namespace",
        "team-analytics",
        "granary.dev/storage=allowed",
    ])
    .unwrap();
    let mut resumed = None;
    for _ in 0..150 {
        if let Ok(r) = c.get_object().bucket("reports").key("k").send().await {
            resumed = Some(r.body.collect().await.unwrap().into_bytes());
            break;
        }
        tokio::time::sleep(Duration::from_millis(400)).await;
    }
    assert_eq!(
        resumed.as_deref(),
        Some(&b"from kubernetes"[..]),
        "the same key and data after the namespace is allowed again"
    );

    // What `helm test` runs: a throwaway tenant writes and reads a KV entry through the
    // cluster, with the test's own ServiceAccount (it may read only that cluster and its
    // admin-token Secret), and is removed again.
    let test_token = cp
        .token_for_service_account(ns, "granary-smoke-test")
        .unwrap();
    let test_kubeconfig = cp.kubeconfig_for_token(&test_token);
    let out = Command::new(operator_binary())
        .args(["smoke-test", "--cluster", "main", "--namespace", ns])
        .env("KUBECONFIG", &test_kubeconfig)
        .output()
        .unwrap();
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "smoke-test failed:\n{said}");
    assert!(
        said.contains("ok: wrote and read back a KV entry"),
        "{said}"
    );
    let tenants = reqwest::Client::new()
        .get(format!("http://127.0.0.1:{adp}/admin/v1/tenants"))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        !tenants.contains("helm-test-"),
        "the smoke test's tenant stays: {tenants}"
    );

    // A Secret the operator did not create is never written over (or deleted).
    cp.kubectl(&[
        "create",
        "secret",
        "generic",
        "precious",
        "-n",
        "team-web",
        "--from-literal=password=hunter2",
    ])
    .unwrap();
    cp.kubectl_stdin(
        &["apply", "-f", "-"],
        &tenant_yaml("squatter", "team-web", "").replace("squatter-creds", "precious"),
    )
    .unwrap();
    let conflict = wait_for("SecretConflict", 60, || {
        let v = cp.kubectl_json(&["get", "tenant", "squatter", "-n", "team-web"])?;
        Ok(condition(&v, "Ready").filter(|c| c.1 == "SecretConflict"))
    });
    assert!(conflict.2.contains("team-web/precious"), "{conflict:?}");
    cp.kubectl(&[
        "delete",
        "tenant",
        "squatter",
        "-n",
        "team-web",
        "--wait=true",
        "--timeout=60s",
    ])
    .unwrap();
    let precious = cp
        .kubectl_json(&["get", "secret", "precious", "-n", "team-web"])
        .unwrap();
    assert_eq!(precious["data"].as_object().unwrap().len(), 1, "{precious}");
    assert!(
        precious["metadata"]["ownerReferences"].is_null(),
        "{precious}"
    );

    // Updates propagate: a quota, and a pool scaled out; scale-in is refused visibly.
    let admin = reqwest::Client::new();
    let node_tenant = |name: &'static str| {
        let admin = admin.clone();
        let token = token.clone();
        async move {
            let r = admin
                .get(format!("http://127.0.0.1:{adp}/admin/v1/tenants/{name}"))
                .bearer_auth(&token)
                .send()
                .await
                .unwrap();
            (
                r.status().as_u16(),
                r.json::<Value>().await.unwrap_or(Value::Null),
            )
        }
    };
    let (s, t) = node_tenant("team-analytics.analytics").await;
    assert_eq!(s, 200);
    assert_eq!(t["spec"]["quotas"]["storageBytes"], 2u64 * 1024u64.pow(4));
    // The Tenant's tiering policy reaches the node (what its cold-tier mover acts on).
    assert_eq!(t["spec"]["tiering"]["coldAfterSeconds"], 720 * 3600, "{t}");
    assert_eq!(t["spec"]["tiering"]["minObjectSize"], 1024 * 1024, "{t}");
    assert_eq!(t["spec"]["tiering"]["restoreAfterReads"], 3, "{t}");
    assert_eq!(
        t["spec"]["tiering"]["buckets"],
        serde_json::json!(["events"]),
        "{t}"
    );
    assert_eq!(t["spec"]["tiering"]["prefix"], "raw/", "{t}");

    // A cold tier on the StorageCluster reaches the node configuration (under the
    // cluster's own prefix) and its Secret the storage pods' environment.
    cp.kubectl(&[
        "patch",
        "storagecluster",
        "main",
        "-n",
        ns,
        "--type=merge",
        "-p",
        r#"{"spec":{"coldTier":{"url":"s3://archive/granary","secretRef":{"name":"cold-creds"}}}}"#,
    ])
    .unwrap();
    let want = format!("cold_tier = \"s3://archive/granary/{ns}/main\"");
    wait_for(
        "the cold tier in the node ConfigMap and the pods' environment",
        60,
        || {
            let cm = cp.kubectl_json(&["get", "configmap", "main-config", "-n", ns])?;
            let in_config = cm["data"]["node.toml"]
                .as_str()
                .is_some_and(|t| t.contains(&want));
            let sts = main_statefulsets(&cp, ns)?;
            let from_secret = sts["items"].as_array().is_some_and(|items| {
                !items.is_empty()
                    && items.iter().all(|s| {
                        let from = &s["spec"]["template"]["spec"]["containers"][0]["envFrom"][0];
                        // Under the node's credential prefix (accepted by the apiserver).
                        from["secretRef"]["name"] == "cold-creds"
                            && from["prefix"] == "GRANARY_COLD_CREDENTIAL_"
                    })
            });
            // The node here runs without a cold tier: the condition says so.
            let sc = cp.kubectl_json(&["get", "storagecluster", "main", "-n", ns])?;
            let cond = condition(&sc, "ColdTierReachable")
                .is_some_and(|c| c.0 == "False" && c.1 == "NotConfigured");
            Ok((in_config && from_secret && cond).then_some(()))
        },
    );
    let quota = |objects: u32| {
        cp.kubectl(&[
            "patch",
            "tenant",
            "analytics",
            "-n",
            "team-analytics",
            "--type=merge",
            "-p",
            &format!(r#"{{"spec":{{"quotas":{{"objects":{objects}}}}}}}"#),
        ])
        .unwrap();
    };
    quota(7);
    let mut updated = false;
    for _ in 0..150 {
        let (_, t) = node_tenant("team-analytics.analytics").await;
        if t["spec"]["quotas"]["objects"] == 7 {
            updated = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(updated, "quota change did not reach the node");
    // The reconcile that followed reports usage from the node.
    let usage = wait_for("usage in Tenant status", 60, || {
        let v = cp.kubectl_json(&["get", "tenant", "analytics", "-n", "team-analytics"])?;
        Ok((v["status"]["usage"]["objects"] == 1).then(|| v["status"]["usage"].clone()))
    });
    assert_eq!(usage["buckets"], 1);
    assert_eq!(usage["storage"], "15");
    // Split by tier: this node has no cold tier, so every byte is hot.
    assert_eq!(usage["hotStorage"], "15", "{usage}");
    assert_eq!(usage["coldStorage"], "0", "{usage}");
    // The node enforces the Tenant's quotas: a write accepted under 7 objects is refused
    // once the quota is lowered to what the tenant holds.
    c.put_object()
        .bucket("reports")
        .key("second")
        .body(ByteStream::from_static(b"x"))
        .send()
        .await
        .unwrap();
    quota(2);
    let mut refused = None;
    for _ in 0..150 {
        let r = c
            .put_object()
            .bucket("reports")
            .key("third")
            .body(ByteStream::from_static(b"y"))
            .send()
            .await;
        match r {
            Err(e) if e.raw_response().map(|r| r.status().as_u16()) == Some(403) => {
                refused = Some(e);
                break;
            }
            Err(_) => {
                tokio::time::sleep(Duration::from_millis(200)).await;
                continue;
            }
            Ok(_) => {}
        }
        // Accepted before the change reached the node: take it back and try again.
        c.delete_object()
            .bucket("reports")
            .key("third")
            .send()
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let e = refused.expect("the lowered quota was never enforced");
    assert_eq!(
        e.raw_response().map(|r| r.status().as_u16()),
        Some(403),
        "{e:?}"
    );
    assert_eq!(
        aws_sdk_s3::error::ProvideErrorMetadata::code(&e),
        Some("QuotaExceeded"),
        "{e:?}"
    );
    // Usage above a quota shows as QuotaExceeded (with a Warning event), and clears.
    let quota_condition = |want: &'static str| {
        wait_for("QuotaExceeded condition", 60, || {
            let v = cp.kubectl_json(&["get", "tenant", "analytics", "-n", "team-analytics"])?;
            Ok(condition(&v, "QuotaExceeded").filter(|(status, _, _)| status == want))
        })
    };
    quota(0);
    let (_, reason, message) = quota_condition("True");
    assert_eq!(reason, "OverQuota");
    assert!(message.contains("objects 2 > 0"), "{message}");
    let events = cp
        .kubectl_json(&[
            "get",
            "events",
            "-n",
            "team-analytics",
            "--field-selector",
            "reason=QuotaExceeded",
        ])
        .unwrap();
    assert!(
        events["items"]
            .as_array()
            .unwrap()
            .iter()
            .any(|e| e["type"] == "Warning"
                && e["message"]
                    .as_str()
                    .unwrap_or("")
                    .contains("objects 2 > 0")),
        "no Warning event: {events}"
    );
    quota(7);
    let (_, reason, _) = quota_condition("False");
    assert_eq!(reason, "WithinQuota");

    // Status-only updates trigger no reconcile (the operator's own status writes would
    // otherwise make each reconcile trigger the next): 20 status patches in 4 s cost at
    // most the periodic reconciles of the three tenants.
    let tenant_reconciles = || async {
        let page = reqwest::get(format!("http://127.0.0.1:{metrics_port}/metrics"))
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        page.lines()
            .filter(|l| l.starts_with("granary_operator_reconciles_total{controller=\"tenant\""))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum::<f64>()
    };
    let before = tenant_reconciles().await;
    for i in 0..20 {
        cp.kubectl(&[
            "patch",
            "tenant",
            "web",
            "-n",
            "team-web",
            "--subresource=status",
            "--type=merge",
            "-p",
            &format!(r#"{{"status":{{"usage":{{"buckets":{i}}}}}}}"#),
        ])
        .unwrap();
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let during = tenant_reconciles().await - before;
    assert!(
        during <= 6.0,
        "{during} tenant reconciles during 20 status-only updates"
    );
    cp.kubectl(&[
        "patch",
        "storagecluster",
        "main",
        "-n",
        ns,
        "--type=json",
        "-p",
        r#"[{"op":"replace","path":"/spec/zones/0/pools/0/replicas","value":3}]"#,
    ])
    .unwrap();
    wait_for("scale out to 3", 60, || {
        Ok(
            (cp.kubectl_json(&["get", "sts", "main-a-fast", "-n", ns])?["spec"]["replicas"] == 3)
                .then_some(()),
        )
    });
    cp.kubectl(&[
        "patch",
        "storagecluster",
        "main",
        "-n",
        ns,
        "--type=json",
        "-p",
        r#"[{"op":"replace","path":"/spec/zones/0/pools/0/replicas","value":1}]"#,
    ])
    .unwrap();
    // The refusal joins the Degraded message; the reason stays BelowMinInSync (one node
    // for minInSync 2 is the more urgent problem) and an event names the refusal.
    let degraded = wait_for("scale-in refused", 60, || {
        let v = cp.kubectl_json(&["get", "storagecluster", "main", "-n", ns])?;
        Ok(condition(&v, "Degraded").filter(|c| c.2.contains("scale-in refused")))
    });
    assert_eq!(degraded.1, "BelowMinInSync", "{degraded:?}");
    assert!(degraded.2.contains("main-a-fast: 3 -> 1"), "{degraded:?}");
    let events = cp
        .kubectl(&[
            "get",
            "events",
            "-n",
            ns,
            "--field-selector",
            "reason=ScaleInRefused",
            "-o",
            "name",
        ])
        .unwrap();
    assert!(!events.trim().is_empty(), "a ScaleInRefused event");
    assert_eq!(
        cp.kubectl_json(&["get", "sts", "main-a-fast", "-n", ns])
            .unwrap()["spec"]["replicas"],
        3,
        "never shrunk"
    );

    // Volumes. volumeClaimTemplates cannot change: a larger size expands the pool's bound
    // claims in place (their class allows it), another class is refused, and neither
    // stops the rest of the spec (here minInSync, which the PDB reflects) or the status.
    cp.kubectl_stdin(
        &["apply", "-f", "-"],
        "apiVersion: storage.k8s.io/v1\nkind: StorageClass\nmetadata: {name: nvme}\nprovisioner: kubernetes.io/no-provisioner\nallowVolumeExpansion: true\nvolumeBindingMode: Immediate\n",
    )
    .unwrap();
    wait_for("claim data-main-a-fast-0", 60, || {
        Ok(cp
            .kubectl_json(&["get", "pvc", "data-main-a-fast-0", "-n", ns])
            .ok())
    });
    cp.kubectl_stdin(
        &["apply", "-f", "-"],
        &format!(
            "apiVersion: v1\nkind: PersistentVolume\nmetadata: {{name: pv-a-fast-0}}\nspec:\n  capacity: {{storage: 500Gi}}\n  accessModes: [ReadWriteOnce]\n  storageClassName: nvme\n  hostPath: {{path: /nonexistent/granary-e2e}}\n  claimRef: {{namespace: {ns}, name: data-main-a-fast-0}}\n"
        ),
    )
    .unwrap();
    wait_for("claim data-main-a-fast-0 bound", 60, || {
        let v = cp.kubectl_json(&["get", "pvc", "data-main-a-fast-0", "-n", ns])?;
        Ok((v["status"]["phase"] == "Bound").then_some(()))
    });
    let generation = |cp: &ControlPlane| {
        cp.kubectl_json(&["get", "storagecluster", "main", "-n", ns])
            .unwrap()["metadata"]["generation"]
            .clone()
    };
    cp.kubectl(&[
        "patch",
        "storagecluster",
        "main",
        "-n",
        ns,
        "--type=json",
        "-p",
        r#"[{"op":"replace","path":"/spec/zones/0/pools/0/storage/size","value":"600Gi"},
            {"op":"replace","path":"/spec/zones/2/pools/0/storage/size","value":"600Gi"},
            {"op":"replace","path":"/spec/zones/1/pools/0/storage/storageClassName","value":"other"},
            {"op":"replace","path":"/spec/replication/minInSync","value":1}]"#,
    ])
    .unwrap();
    let want_generation = generation(&cp);
    wait_for("claim data-main-a-fast-0 expanded", 60, || {
        let v = cp.kubectl_json(&["get", "pvc", "data-main-a-fast-0", "-n", ns])?;
        Ok((v["spec"]["resources"]["requests"]["storage"] == "600Gi").then_some(()))
    });
    let degraded = wait_for("volume change refused", 60, || {
        let v = cp.kubectl_json(&["get", "storagecluster", "main", "-n", ns])?;
        Ok(condition(&v, "Degraded").filter(|c| c.2.contains("volume change refused")))
    });
    assert!(
        degraded
            .2
            .contains("main-b-fast: storageClassName cannot change in place (nvme -> other)"),
        "{degraded:?}"
    );
    wait_for("the PDB follows minInSync despite the refusal", 60, || {
        let v = cp.kubectl_json(&["get", "pdb", "main-storage", "-n", ns])?;
        Ok((v["spec"]["maxUnavailable"] == 2).then_some(()))
    });
    let cluster = cp
        .kubectl_json(&["get", "storagecluster", "main", "-n", ns])
        .unwrap();
    assert_eq!(cluster["status"]["observedGeneration"], want_generation);
    let vct = |sts: &str| {
        cp.kubectl_json(&["get", "sts", sts, "-n", ns]).unwrap()["spec"]["volumeClaimTemplates"][0]
            ["spec"]
            .clone()
    };
    assert_eq!(vct("main-b-fast")["storageClassName"], "nvme", "class kept");
    assert_eq!(
        vct("main-a-fast")["resources"]["requests"]["storage"],
        "500Gi",
        "the template keeps its size (the claims grow)"
    );
    let unbound = cp
        .kubectl_json(&["get", "pvc", "data-main-c-fast-0", "-n", ns])
        .unwrap();
    assert_eq!(
        unbound["spec"]["resources"]["requests"]["storage"], "500Gi",
        "an unbound claim cannot be resized (it is on a later pass, once bound)"
    );
    // Shrinking is refused too; undoing the class change clears the refusal.
    cp.kubectl(&[
        "patch",
        "storagecluster",
        "main",
        "-n",
        ns,
        "--type=json",
        "-p",
        r#"[{"op":"replace","path":"/spec/zones/0/pools/0/storage/size","value":"400Gi"},
            {"op":"replace","path":"/spec/zones/1/pools/0/storage/storageClassName","value":"nvme"}]"#,
    ])
    .unwrap();
    let degraded = wait_for("shrink refused", 60, || {
        let v = cp.kubectl_json(&["get", "storagecluster", "main", "-n", ns])?;
        Ok(condition(&v, "Degraded").filter(|c| c.2.contains("cannot shrink")))
    });
    assert!(!degraded.2.contains("main-b-fast"), "{degraded:?}");
    cp.kubectl(&[
        "patch",
        "storagecluster",
        "main",
        "-n",
        ns,
        "--type=json",
        "-p",
        r#"[{"op":"replace","path":"/spec/zones/0/pools/0/storage/size","value":"600Gi"},
            {"op":"replace","path":"/spec/replication/minInSync","value":2}]"#,
    ])
    .unwrap();
    wait_for("volume refusals cleared", 60, || {
        let v = cp.kubectl_json(&["get", "storagecluster", "main", "-n", ns])?;
        Ok(condition(&v, "Degraded").filter(|c| !c.2.contains("volume change refused")))
    });

    // A pool removed from the spec keeps running (its nodes hold data) and is reported.
    cp.kubectl(&[
        "patch",
        "storagecluster",
        "main",
        "-n",
        ns,
        "--type=json",
        "-p",
        r#"[{"op":"remove","path":"/spec/zones/2/pools/1"}]"#,
    ])
    .unwrap();
    let degraded = wait_for("removed pool reported", 60, || {
        let v = cp.kubectl_json(&["get", "storagecluster", "main", "-n", ns])?;
        Ok(condition(&v, "Degraded").filter(|c| c.2.contains("pools removed from the spec")))
    });
    assert!(degraded.2.contains("main-c-bulk (1 nodes)"), "{degraded:?}");
    assert!(
        cp.kubectl_json(&["get", "sts", "main-c-bulk", "-n", ns])
            .is_ok()
    );

    // A missing catalog Secret is named in the Ready condition, not just "0/N ready".
    cp.kubectl(&["delete", "secret", "granary-catalog", "-n", ns])
        .unwrap();
    let ready = wait_for("CatalogSecretMissing", 60, || {
        let v = cp.kubectl_json(&["get", "storagecluster", "main", "-n", ns])?;
        Ok(condition(&v, "Ready").filter(|c| c.1 == "CatalogSecretMissing"))
    });
    assert!(
        ready
            .2
            .contains("granary-system/granary-catalog does not exist"),
        "{ready:?}"
    );
    create_catalog_secret();
    wait_for("catalog Secret back", 60, || {
        let v = cp.kubectl_json(&["get", "storagecluster", "main", "-n", ns])?;
        Ok(condition(&v, "Ready").filter(|c| c.1 == "NodesNotReady"))
    });

    // Deletion: Delete removes the tenant and its data; Retain keeps them.
    let (s, _) = node_tenant("team-web.web").await;
    assert_eq!(s, 200);
    cp.kubectl(&[
        "delete",
        "tenant",
        "web",
        "-n",
        "team-web",
        "--wait=true",
        "--timeout=60s",
    ])
    .unwrap();
    assert_eq!(
        node_tenant("team-web.web").await.0,
        404,
        "deletionPolicy Delete removes the tenant"
    );
    cp.kubectl(&[
        "delete",
        "tenant",
        "analytics",
        "-n",
        "team-analytics",
        "--wait=true",
        "--timeout=60s",
    ])
    .unwrap();
    assert_eq!(
        node_tenant("team-analytics.analytics").await.0,
        200,
        "deletionPolicy Retain keeps the tenant"
    );
    assert!(
        c.list_buckets().send().await.is_err(),
        "the Retained tenant's Kubernetes key is revoked"
    );

    // RBAC: without the PodDisruptionBudget rule the cluster reconcile fails visibly.
    let role = cp
        .kubectl_json(&[
            "get",
            "clusterroles",
            "-l",
            "app.kubernetes.io/instance=granary",
        ])
        .unwrap()["items"][0]["metadata"]["name"]
        .as_str()
        .expect("the chart's ClusterRole")
        .to_string();
    let cr = cp.kubectl_json(&["get", "clusterrole", &role]).unwrap();
    let rules: Vec<Value> = cr["rules"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|r| {
            !r["resources"]
                .as_array()
                .unwrap()
                .iter()
                .any(|x| x == "poddisruptionbudgets")
        })
        .cloned()
        .collect();
    assert!(
        rules.len() < cr["rules"].as_array().unwrap().len(),
        "the chart has a PodDisruptionBudget rule"
    );
    let patch =
        serde_json::json!([{"op": "replace", "path": "/rules", "value": rules}]).to_string();
    cp.kubectl(&["patch", "clusterrole", &role, "--type=json", "-p", &patch])
        .unwrap();
    poke(&cp, ns, "test/poke");
    let failed = wait_for("forbidden reconcile reported", 90, || {
        let v = cp.kubectl_json(&["get", "storagecluster", "main", "-n", ns])?;
        Ok(condition(&v, "Ready").filter(|c| c.1 == "ApplyFailed"))
    });
    assert!(
        failed.2.contains("forbidden") || failed.2.contains("Forbidden"),
        "{failed:?}"
    );
    let events = cp
        .kubectl_json(&[
            "get",
            "events",
            "-n",
            ns,
            "--field-selector",
            "reason=ReconcileFailed",
        ])
        .unwrap();
    assert!(
        !events["items"].as_array().unwrap().is_empty(),
        "a Warning event is published"
    );
    let _ = std::fs::read_to_string(&op_log).context("operator log");
}

/// Annotates the StorageCluster `main`, which makes the operator reconcile it again.
fn poke(cp: &ControlPlane, ns: &str, key: &str) {
    cp.kubectl(&[
        "annotate",
        "storagecluster",
        "main",
        "-n",
        ns,
        &format!("{key}=1"),
        "--overwrite",
    ])
    .unwrap();
}

fn serde_yaml_to_json(yaml: &str) -> Value {
    serde_yaml::from_str(yaml).expect("example YAML parses")
}
