//! The user's path on a real node: the chart, the operator and the storage nodes run as
//! real containers (the images `scripts/images.sh` builds, imported into containerd) on
//! a real kubelet, with cluster DNS, Services routed by kube-proxy and data on
//! PersistentVolumes. `helm install`, `kubectl apply` of a three-zone StorageCluster and
//! a Tenant, an object and a key written and read back through the endpoints in the
//! Tenant's Secret, a storage pod deleted and back with its data, a StatefulSet change
//! rolled out, a `helm upgrade` to two operator replicas with leader election; and
//! afterwards nothing of the node is left on the host. See docs/operations.md ("The
//! real-node stage").

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use granary_e2e::control_plane::{ControlPlane, poll_until};
use granary_e2e::kubelet::{HOST_IP, POD_SUBNET, RealNode};
use granary_e2e::{KvClient, PgServer, s3_client, workspace_root};
use serde_json::Value;

const NS: &str = "granary-system";
const TEAM: &str = "team-k8s";
const STORAGE_CLASS: &str = "granary-e2e-hostpath";

fn images_dir() -> PathBuf {
    std::env::var("GRANARY_IMAGES_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|_| workspace_root().join("target/images"))
}

fn wait_for<T>(what: &str, secs: u64, f: impl FnMut() -> Result<Option<T>>) -> Result<T> {
    poll_until(Duration::from_secs(secs), what, f)
}

fn helm(cp: &ControlPlane, args: &[&str]) -> Result<String> {
    let out = std::process::Command::new(cp.bin_dir.join("helm"))
        .args(args)
        .env("KUBECONFIG", &cp.kubeconfig)
        .env("HELM_CACHE_HOME", cp.dir().join("helm/cache"))
        .env("HELM_CONFIG_HOME", cp.dir().join("helm/config"))
        .env("HELM_DATA_HOME", cp.dir().join("helm/data"))
        .output()
        .context("running helm")?;
    if !out.status.success() {
        bail!(
            "helm {} failed: {}{}",
            args.join(" "),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The pods of the StorageCluster `main` (`kubectl get pods -o json`).
fn storage_pods(cp: &ControlPlane) -> Result<Value> {
    cp.kubectl_json(&[
        "get",
        "pods",
        "-n",
        NS,
        "-l",
        "app.kubernetes.io/instance=main",
    ])
}

/// Pods of the StorageCluster `main` that are Ready, by name.
fn ready_storage_pods(cp: &ControlPlane) -> Result<Vec<(String, String)>> {
    let pods = storage_pods(cp)?;
    let mut out = Vec::new();
    for p in pods["items"].as_array().into_iter().flatten() {
        let ready = p["status"]["conditions"]
            .as_array()
            .into_iter()
            .flatten()
            .any(|c| c["type"] == "Ready" && c["status"] == "True");
        if ready && p["metadata"]["deletionTimestamp"].is_null() {
            out.push((
                p["metadata"]["name"]
                    .as_str()
                    .unwrap_or_default()
                    .to_string(),
                p["metadata"]["uid"]
                    .as_str()
                    .unwrap_or_default()
                    .to_string(),
            ));
        }
    }
    out.sort();
    Ok(out)
}

/// Everything a failing step needs to be understood: pods, events, the operator's log.
fn diagnostics(cp: &ControlPlane) -> String {
    let mut s = String::new();
    for args in [
        &["get", "pods", "-A", "-o", "wide"][..],
        &["get", "storageclusters,tenants", "-A", "-o", "yaml"][..],
        &["get", "events", "-A", "--sort-by=.lastTimestamp"][..],
        &[
            "logs",
            "-n",
            NS,
            "-l",
            "app.kubernetes.io/name=granary",
            "--tail=40",
            "--all-containers",
        ][..],
        &[
            "logs",
            "-n",
            NS,
            "-l",
            "app.kubernetes.io/instance=main",
            "--tail=20",
        ][..],
    ] {
        s.push_str(&format!("\n--- kubectl {} ---\n", args.join(" ")));
        match cp.kubectl(args) {
            Ok(o) => s.push_str(
                &o.chars()
                    .rev()
                    .take(6000)
                    .collect::<String>()
                    .chars()
                    .rev()
                    .collect::<String>(),
            ),
            Err(e) => s.push_str(&format!("{e:#}")),
        }
    }
    s
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_chart_operator_and_storage_pods_run_on_a_real_kubelet() {
    // Three nodes, one per zone, each kubelet and containerd in a network namespace of
    // its own.
    let mut node = RealNode::prepare(3).expect("preparing the real nodes");
    let mut cp = ControlPlane::start_for_node(HOST_IP).expect("control plane");
    let result = run(&mut node, &mut cp).await;
    if result.is_err() {
        eprintln!("{}", diagnostics(&cp));
    }
    let t0 = Instant::now();
    let left = node.shutdown(&cp);
    eprintln!("real node: teardown took {:.1?}", t0.elapsed());
    if let Err(e) = result {
        panic!("{e:#}\n(teardown left: {left:#?})");
    }
    assert!(
        left.is_empty(),
        "the real node left these behind: {left:#?}"
    );
}

async fn run(node: &mut RealNode, cp: &mut ControlPlane) -> Result<()> {
    cp.start_controller_manager()?;
    let images = images_dir();
    let t0 = Instant::now();
    node.start(
        cp,
        &[
            images.join("granary-node.docker.tar"),
            images.join("granary-operator.docker.tar"),
        ],
    )?;
    eprintln!(
        "real node: started (images imported) in {:.1?}",
        t0.elapsed()
    );

    // The catalog: the harness's Postgres, on the node address, open to the pods.
    let pg = PgServer::start_listening(Some((HOST_IP, POD_SUBNET)))?;
    pg.create_db("granary_k8s")?;
    let catalog_url = pg.url_at(HOST_IP, "granary_k8s");
    cp.kubectl(&["create", "namespace", NS])?;
    cp.kubectl(&[
        "create",
        "secret",
        "generic",
        "granary-catalog",
        "-n",
        NS,
        &format!("--from-literal=url={catalog_url}"),
    ])?;

    // Volumes: local PersistentVolumes, two per node (one for its storage pod, a
    // spare), pinned to it, in root-owned directories: the pod's fsGroup must make them
    // writable for the image's non-root user, as on a cloud disk.
    cp.kubectl_stdin(
        &["apply", "-f", "-"],
        &format!(
            "apiVersion: storage.k8s.io/v1\nkind: StorageClass\nmetadata: {{name: {STORAGE_CLASS}}}\nprovisioner: kubernetes.io/no-provisioner\nvolumeBindingMode: WaitForFirstConsumer\n"
        ),
    )?;
    let nodes = node.nodes.clone();
    for i in 0..2 * nodes.len() {
        let host = &nodes[i % nodes.len()].name;
        let path = cp.dir().join(format!("pv{i}"));
        std::fs::create_dir_all(&path)?;
        cp.kubectl_stdin(
            &["apply", "-f", "-"],
            &format!(
                "apiVersion: v1\nkind: PersistentVolume\nmetadata: {{name: granary-e2e-pv{i}}}\nspec:\n  capacity: {{storage: 2Gi}}\n  accessModes: [ReadWriteOnce]\n  persistentVolumeReclaimPolicy: Retain\n  storageClassName: {STORAGE_CLASS}\n  local: {{path: {}}}\n  nodeAffinity:\n    required:\n      nodeSelectorTerms: [{{matchExpressions: [{{key: kubernetes.io/hostname, operator: In, values: [{host}]}}]}}]\n",
                path.display()
            ),
        )?;
    }

    // helm install, as a user would (the image is already on the node).
    let chart = workspace_root().join("helm/granary");
    let t0 = Instant::now();
    helm(
        cp,
        &[
            "install",
            "granary",
            &chart.display().to_string(),
            "-n",
            NS,
            "--wait",
            "--timeout",
            "180s",
        ],
    )?;
    eprintln!(
        "real node: helm install (operator Ready) in {:.1?}",
        t0.elapsed()
    );

    // A three-zone cluster: one storage pod per zone, three copies of every partition.
    let t0 = Instant::now();
    cp.kubectl_stdin(
        &["apply", "-f", "-"],
        &format!(
            "apiVersion: granary.dev/v1alpha1\nkind: StorageCluster\nmetadata: {{name: main, namespace: {NS}}}\nspec:\n  region: us-east-1\n  replication: {{factor: 3, minInSync: 2}}\n  zones:\n{}  catalog: {{postgresSecretRef: {{name: granary-catalog, key: url}}}}\n  tenants:\n    namespaceSelector: {{matchLabels: {{granary.dev/storage: allowed}}}}\n",
            ["a", "b", "c"]
                .iter()
                .map(|z| format!("    - {{name: {z}, nodeSelector: {{topology.kubernetes.io/zone: {z}}}, pools: [{{name: default, replicas: 1, storage: {{size: 1Gi, storageClassName: {STORAGE_CLASS}}}, resources: {{requests: {{cpu: 50m, memory: 64Mi}}, limits: {{memory: 1Gi}}}}}}]}}\n"))
                .collect::<String>()
        ),
    )?;
    let pods = wait_for("three Ready storage pods", 300, || {
        let ready = ready_storage_pods(cp)?;
        Ok((ready.len() == 3).then_some(ready))
    })?;
    let first_ready = t0.elapsed();
    // Each zone's pod runs on that zone's node: three kubelets, one storage pod each.
    let placed = storage_pods(cp)?;
    for n in &nodes {
        let on: Vec<&str> = placed["items"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|p| p["spec"]["nodeName"] == n.name.as_str())
            .filter_map(|p| p["metadata"]["name"].as_str())
            .collect();
        ensure!(
            on.len() == 1 && on[0].starts_with(&format!("main-{}-", n.zone)),
            "node {} (zone {}) runs {on:?}, not its zone's storage pod",
            n.name,
            n.zone
        );
    }
    wait_for("the StorageCluster to be Ready", 180, || {
        let sc = cp.kubectl_json(&["get", "storagecluster", "main", "-n", NS])?;
        Ok(condition_true(&sc, "Ready").then_some(()))
    })?;
    eprintln!(
        "real node: StorageCluster applied -> 3 storage pods Ready in {first_ready:.1?}, cluster Ready in {:.1?}",
        t0.elapsed()
    );
    // The kubelet serves logs to the apiserver (`kubectl logs` reaches it by its
    // InternalIP with the apiserver's client certificate).
    let logs = cp.kubectl(&["logs", "-n", NS, &pods[0].0, "--tail=50"])?;
    ensure!(
        !logs.trim().is_empty(),
        "kubectl logs {} printed nothing",
        pods[0].0
    );
    // One cluster: every pod is a registered member.
    wait_for("the three members in the catalog", 120, || {
        let n: i64 = pg_count(&pg, "SELECT count(*) FROM nodes")?;
        Ok((n == 3).then_some(n))
    })?;
    // ... and they form one store: through the internal Service, every member is alive
    // and every partition has its three copies in sync.
    let token = secret_field(cp, NS, "main-admin-token", "token")?;
    let admin = via_cluster_ip(cp, &format!("http://main-internal.{NS}.svc:9200"))?;
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()?;
    let t1 = Instant::now();
    let layout = loop {
        let get = |path: &str| {
            http.get(format!("{admin}{path}"))
                .bearer_auth(&token)
                .send()
        };
        // Until kube-proxy routes the new Service, a request may fail: retried.
        let nodes: Value = match get("/admin/v1/nodes").await {
            Ok(r) => r.json().await.unwrap_or_default(),
            Err(_) => Value::Null,
        };
        let layout: Value = match get("/admin/v1/layout").await {
            Ok(r) => r.json().await.unwrap_or_default(),
            Err(_) => Value::Null,
        };
        let partitions = layout["partitions"].as_u64().unwrap_or(0);
        let full = layout["partitionsByReplicaCount"][3].as_u64() == Some(partitions);
        if nodes["alive"] == 3 && partitions > 0 && full && layout["partitionsOutOfSync"] == 0 {
            break layout;
        }
        if t1.elapsed() > Duration::from_secs(180) {
            bail!("the storage pods did not form one cluster: nodes {nodes}, layout {layout}");
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    eprintln!(
        "real node: one cluster of 3 pods, {} partitions x 3 copies in sync, {:.1?} after Ready",
        layout["partitions"],
        t1.elapsed()
    );

    // A Tenant in a team namespace: Ready, with a Secret naming its endpoints.
    cp.kubectl(&["create", "namespace", TEAM])?;
    cp.kubectl(&["label", "namespace", TEAM, "granary.dev/storage=allowed"])?;
    cp.kubectl_stdin(
        &["apply", "-f", "-"],
        &format!(
            "apiVersion: granary.dev/v1alpha1\nkind: Tenant\nmetadata: {{name: web, namespace: {TEAM}}}\nspec:\n  clusterRef: {{name: main, namespace: {NS}}}\n  quotas: {{storage: 1Gi}}\n  credentialsSecret: web-granary\n"
        ),
    )?;
    wait_for("the Tenant to be Ready", 180, || {
        let t = cp.kubectl_json(&["get", "tenant", "web", "-n", TEAM])?;
        Ok(condition_true(&t, "Ready").then_some(()))
    })?;
    let field = |k: &str| secret_field(cp, TEAM, "web-granary", k);
    let (s3_ep, kv_ep) = (field("S3_ENDPOINT")?, field("KV_ENDPOINT")?);
    let (ak, sk) = (field("AWS_ACCESS_KEY_ID")?, field("AWS_SECRET_ACCESS_KEY")?);
    // The endpoints are Service names only the cluster's DNS knows: the host goes to
    // the same Service by its ClusterIP (routed by kube-proxy like the pods' traffic).
    let s3 = s3_client(&via_cluster_ip(cp, &s3_ep)?, &ak, &sk);
    let kv = KvClient::new(&via_cluster_ip(cp, &kv_ep)?, &ak, &sk);
    // The first request may reach the Services before kube-proxy routes them: the
    // bucket creation is retried until one answers.
    let t1 = Instant::now();
    loop {
        let last = match s3.create_bucket().bucket("photos").send().await {
            Ok(_) => break,
            Err(e) => format!("{e:?}"),
        };
        ensure!(
            t1.elapsed() < Duration::from_secs(60),
            "the S3 Service never answered CreateBucket: {last}"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let body: Vec<u8> = (0..3_000_000u32).map(|i| (i % 251) as u8).collect();
    s3.put_object()
        .bucket("photos")
        .key("cat.jpg")
        .body(body.clone().into())
        .send()
        .await?;
    ensure!(
        read_object(&s3).await? == body,
        "the object read back through the Service differs"
    );
    let t1 = Instant::now();
    loop {
        match kv
            .send("PUT", "/kv/v1/app/greeting", &[], b"hello".to_vec())
            .await
        {
            Ok(r) if r.status() == 200 => break,
            Ok(r) => bail!(
                "KV put answered {}: {}",
                r.status(),
                r.text().await.unwrap_or_default()
            ),
            Err(e) => ensure!(
                t1.elapsed() < Duration::from_secs(60),
                "the KV Service never answered: {e:#}"
            ),
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    ensure!(
        kv_value(&kv).await? == b"hello",
        "the KV value read back through the Service differs"
    );

    // A storage pod deleted comes back on its volume, with its data.
    let (victim, old_uid) = pods[0].clone();
    let claim_of = |pod: &str| -> Result<(String, String)> {
        let pvc = cp.kubectl_json(&["get", "pvc", &format!("data-{pod}"), "-n", NS])?;
        Ok((
            pvc["metadata"]["uid"]
                .as_str()
                .unwrap_or_default()
                .to_string(),
            pvc["spec"]["volumeName"]
                .as_str()
                .unwrap_or_default()
                .to_string(),
        ))
    };
    let claim_before = claim_of(&victim)?;
    let members_before = pg_count(&pg, "SELECT count(*) FROM nodes")?;
    let t0 = Instant::now();
    cp.kubectl(&["delete", "pod", &victim, "-n", NS, "--wait=false"])?;
    wait_for(&format!("{victim} back and Ready"), 240, || {
        let ready = ready_storage_pods(cp)?;
        Ok(
            (ready.len() == 3 && ready.iter().any(|(n, u)| *n == victim && *u != old_uid))
                .then_some(()),
        )
    })?;
    eprintln!(
        "real node: deleted storage pod {victim} Ready again in {:.1?}",
        t0.elapsed()
    );
    // The same claim on the same volume, and the node came back as the same member
    // (its identity is on that volume): no fourth member registered.
    let claim_after = claim_of(&victim)?;
    ensure!(
        claim_after == claim_before && !claim_after.1.is_empty(),
        "the pod's claim changed: {claim_before:?} -> {claim_after:?}"
    );
    let members_after = pg_count(&pg, "SELECT count(*) FROM nodes")?;
    ensure!(
        members_after == members_before,
        "the restarted pod registered as a new member ({members_before} -> {members_after})"
    );
    let got = wait_for("the object readable after the restart", 120, || {
        let s3 = s3.clone();
        Ok(futures_block(async move { read_object(&s3).await }).ok())
    })?;
    ensure!(got == body, "the object differs after the pod came back");
    ensure!(
        kv_value(&kv).await? == b"hello",
        "the KV value differs after the pod came back"
    );

    // A StatefulSet change (a resource request) rolls the storage pods.
    let t0 = Instant::now();
    let before = ready_storage_pods(cp)?;
    cp.kubectl(&[
        "patch",
        "storagecluster",
        "main",
        "-n",
        NS,
        "--type=json",
        "-p",
        r#"[{"op":"replace","path":"/spec/zones/0/pools/0/resources/requests/cpu","value":"60m"}]"#,
    ])?;
    wait_for(
        "the zone-a StatefulSet to carry the new request",
        120,
        || {
            let sts = cp.kubectl_json(&["get", "statefulset", "main-a-default", "-n", NS])?;
            Ok(
                (sts["spec"]["template"]["spec"]["containers"][0]["resources"]["requests"]["cpu"]
                    == "60m")
                    .then_some(()),
            )
        },
    )?;
    cp.kubectl(&[
        "rollout",
        "status",
        "statefulset/main-a-default",
        "-n",
        NS,
        "--timeout=240s",
    ])?;
    let after = ready_storage_pods(cp)?;
    let rolled = after.iter().find(|(n, _)| n.starts_with("main-a-default-"));
    let was = before
        .iter()
        .find(|(n, _)| n.starts_with("main-a-default-"));
    ensure!(
        rolled.is_some() && rolled.map(|r| &r.1) != was.map(|w| &w.1),
        "the zone-a pod was not replaced: before {before:?}, after {after:?}"
    );
    eprintln!(
        "real node: StatefulSet change rolled out in {:.1?}",
        t0.elapsed()
    );

    // helm upgrade to a changed chart version, two operator replicas, leader election.
    let t0 = Instant::now();
    let lease_before = cp.kubectl_json(&["get", "lease", "granary-operator", "-n", NS])?;
    let upgraded = cp.dir().join("chart-upgraded");
    copy_dir(&chart, &upgraded)?;
    let chart_yaml = std::fs::read_to_string(upgraded.join("Chart.yaml"))?;
    let version = chart_yaml
        .lines()
        .find_map(|l| l.strip_prefix("version:"))
        .context("Chart.yaml has no version")?
        .trim()
        .to_string();
    std::fs::write(
        upgraded.join("Chart.yaml"),
        chart_yaml.replace(
            &format!("version: {version}"),
            &format!("version: {version}-upgrade.1"),
        ),
    )?;
    helm(
        cp,
        &[
            "upgrade",
            "granary",
            &upgraded.display().to_string(),
            "-n",
            NS,
            "--set",
            "replicaCount=2",
            "--set",
            "leaderElection.enabled=true",
            "--wait",
            "--timeout",
            "180s",
        ],
    )?;
    let deploy = cp.kubectl(&["get", "deployments", "-n", NS, "-o", "name"])?;
    let deploy = deploy
        .lines()
        .next()
        .context("no operator Deployment")?
        .to_string();
    cp.kubectl(&["rollout", "status", &deploy, "-n", NS, "--timeout=180s"])?;
    let d = cp.kubectl_json(&["get", &deploy, "-n", NS])?;
    ensure!(
        d["status"]["readyReplicas"] == 2,
        "two operator replicas Ready: {d}"
    );
    ensure!(
        d["metadata"]["labels"]["helm.sh/chart"] == format!("granary-{version}-upgrade.1"),
        "the Deployment is not from the upgraded chart: {}",
        d["metadata"]["labels"]
    );
    // One of the new pods leads (holds the Lease and renews it); the other is a Ready
    // standby.
    let operators: Vec<String> = cp.kubectl_json(&[
        "get",
        "pods",
        "-n",
        NS,
        "-l",
        "app.kubernetes.io/name=granary",
        "--field-selector=status.phase=Running",
    ])?["items"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|p| p["metadata"]["name"].as_str().map(str::to_string))
        .collect();
    let holder = wait_for(
        "a current operator pod to hold and renew the Lease",
        120,
        || {
            let lease = cp.kubectl_json(&["get", "lease", "granary-operator", "-n", NS])?;
            let holder = lease["spec"]["holderIdentity"]
                .as_str()
                .unwrap_or_default()
                .to_string();
            let renewed = lease["spec"]["renewTime"] != lease_before["spec"]["renewTime"];
            Ok((operators.contains(&holder) && renewed).then_some(holder))
        },
    )?;
    // The cluster still answers after the operator changed hands.
    ensure!(
        kv_value(&kv).await? == b"hello",
        "the KV value differs after the upgrade"
    );
    eprintln!(
        "real node: helm upgrade (2 replicas, leader {holder}) rolled out in {:.1?}",
        t0.elapsed()
    );
    drop(pg);
    Ok(())
}

/// The test object, read through the S3 Service.
async fn read_object(s3: &aws_sdk_s3::Client) -> Result<Vec<u8>> {
    let r = s3
        .get_object()
        .bucket("photos")
        .key("cat.jpg")
        .send()
        .await?;
    Ok(r.body.collect().await?.into_bytes().to_vec())
}

/// The test key's value, read through the KV Service.
async fn kv_value(kv: &KvClient) -> Result<Vec<u8>> {
    let r = kv.send("GET", "/kv/v1/app/greeting", &[], vec![]).await?;
    ensure!(r.status() == 200, "KV get answered {}", r.status());
    Ok(r.bytes().await?.to_vec())
}

fn secret_field(cp: &ControlPlane, ns: &str, name: &str, key: &str) -> Result<String> {
    cp.secret_value(ns, name, key)?
        .with_context(|| format!("Secret {ns}/{name} has no {key}"))
}

fn condition_true(obj: &Value, type_: &str) -> bool {
    obj["status"]["conditions"]
        .as_array()
        .into_iter()
        .flatten()
        .any(|c| c["type"] == type_ && c["status"] == "True")
}

/// `http://NAME.NS.svc:PORT` -> `http://CLUSTER-IP:PORT` of that Service.
fn via_cluster_ip(cp: &ControlPlane, endpoint: &str) -> Result<String> {
    let rest = endpoint
        .strip_prefix("http://")
        .with_context(|| format!("endpoint {endpoint} is not http://"))?;
    let (host, port) = rest
        .trim_end_matches('/')
        .rsplit_once(':')
        .with_context(|| format!("endpoint {endpoint} has no port"))?;
    let mut parts = host.split('.');
    let (name, ns) = (
        parts.next().context("no Service name")?,
        parts.next().context("no namespace")?,
    );
    let ip = cp.kubectl(&[
        "get",
        "service",
        name,
        "-n",
        ns,
        "-o",
        "jsonpath={.spec.clusterIP}",
    ])?;
    Ok(format!("http://{}:{port}", ip.trim()))
}

fn pg_count(pg: &PgServer, sql: &str) -> Result<i64> {
    let out = std::process::Command::new("psql")
        .args([
            "-h",
            "127.0.0.1",
            "-p",
            &pg.port.to_string(),
            "-U",
            "granary",
            "-d",
            "granary_k8s",
            "-tAc",
            sql,
        ])
        .output()?;
    if !out.status.success() {
        bail!("psql: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().parse()?)
}

fn copy_dir(from: &std::path::Path, to: &std::path::Path) -> Result<()> {
    std::fs::create_dir_all(to)?;
    for e in std::fs::read_dir(from)? {
        let e = e?;
        let dest = to.join(e.file_name());
        if e.file_type()?.is_dir() {
            copy_dir(&e.path(), &dest)?;
        } else {
            std::fs::copy(e.path(), dest)?;
        }
    }
    Ok(())
}

/// Runs a future to completion from inside a poll loop on this multi-threaded runtime.
fn futures_block<T>(f: impl std::future::Future<Output = T>) -> T {
    tokio::task::block_in_place(|| tokio::runtime::Handle::current().block_on(f))
}
