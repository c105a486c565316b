//! `tenant_bench`: applies N Tenants at once against a real kube-apiserver with the
//! operator and a storage node running, and reports the time until every Tenant is
//! Ready and the operator's peak RSS.
//!
//!   cargo run --release -p granary-e2e --bin tenant_bench -- [N]    (default 200)

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use base64::Engine as _;
use granary_e2e::control_plane::ControlPlane;
use granary_e2e::{ChildGuard, NodeProc, free_port, operator_binary};

fn secret(cp: &ControlPlane, ns: &str, name: &str, key: &str) -> Option<String> {
    let out = cp
        .kubectl(&[
            "get",
            "secret",
            name,
            "-n",
            ns,
            "-o",
            &format!("jsonpath={{.data.{key}}}"),
        ])
        .ok()?;
    let raw = base64::engine::general_purpose::STANDARD
        .decode(out.trim())
        .ok()?;
    String::from_utf8(raw).ok().filter(|s| !s.is_empty())
}

fn peak_rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find(|l| l.starts_with("VmHWM:"))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

fn main() -> Result<()> {
    let n: usize = std::env::args()
        .nth(1)
        .map(|a| a.parse())
        .transpose()?
        .unwrap_or(200);
    eprintln!("starting etcd and kube-apiserver");
    let cp = ControlPlane::start()?;
    cp.install_crds()?;
    cp.kubectl(&["create", "namespace", "granary-system"])?;
    cp.kubectl(&["create", "namespace", "bench"])?;
    cp.kubectl(&["label", "namespace", "bench", "granary.dev/storage=allowed"])?;
    cp.kubectl(&[
        "create",
        "secret",
        "generic",
        "granary-catalog",
        "-n",
        "granary-system",
        "--from-literal=url=unused",
    ])?;

    let dir = tempfile::tempdir()?;
    let op = ChildGuard::new(
        Command::new(operator_binary())
            .args([
                "run",
                "--no-leader-election",
                "--lease-namespace",
                "granary-system",
                "--metrics-addr",
                "127.0.0.1:0",
            ])
            .env("KUBECONFIG", &cp.kubeconfig)
            .env(
                "RUST_LOG",
                std::env::var("BENCH_OPERATOR_LOG").unwrap_or_else(|_| "warn".into()),
            )
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.path().join("operator.log"))?)
            .spawn()
            .with_context(|| format!("starting {}", operator_binary().display()))?,
    );
    let (s3p, kvp, adp) = (free_port(), free_port(), free_port());
    let cluster = format!(
        "apiVersion: granary.dev/v1alpha1\nkind: StorageCluster\nmetadata:\n  name: main\n  namespace: granary-system\n  annotations:\n    granary.dev/admin-endpoint: http://127.0.0.1:{adp}\n    granary.dev/s3-endpoint: http://127.0.0.1:{s3p}\n    granary.dev/kv-endpoint: http://127.0.0.1:{kvp}\nspec:\n  region: us-east-1\n  replication: {{factor: 1, minInSync: 1}}\n  zones: [{{name: a, pools: [{{name: p, replicas: 1, storage: {{size: 1Gi}}}}]}}]\n  catalog: {{postgresSecretRef: {{name: granary-catalog, key: url}}}}\n  tenants: {{namespaceSelector: {{matchLabels: {{granary.dev/storage: allowed}}}}}}\n"
    );
    cp.kubectl_stdin(&["apply", "-f", "-"], &cluster)?;
    let deadline = Instant::now() + Duration::from_secs(60);
    let (token, master) = loop {
        if let (Some(t), Some(m)) = (
            secret(&cp, "granary-system", "main-admin-token", "token"),
            secret(&cp, "granary-system", "main-master-key", "masterKey"),
        ) {
            break (t, m);
        }
        if Instant::now() > deadline {
            bail!("the operator did not create the cluster secrets");
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    let node_dir = dir.path().join("node");
    let config = dir.path().join("node.toml");
    std::fs::write(
        &config,
        format!(
            "data_dir = \"{}\"\ns3_listen = \"127.0.0.1:{s3p}\"\nkv_listen = \"127.0.0.1:{kvp}\"\nadmin_listen = \"127.0.0.1:{adp}\"\nrpc_listen = \"127.0.0.1:0\"\n",
            node_dir.display()
        ),
    )?;
    let _node = NodeProc::serve(
        &node_dir,
        &config,
        &[
            ("GRANARY_ADMIN_TOKEN", &token),
            ("GRANARY_MASTER_KEY", &master),
        ],
        &token,
    )?;

    let mut yaml = String::new();
    for i in 0..n {
        yaml.push_str(&format!(
            "---\napiVersion: granary.dev/v1alpha1\nkind: Tenant\nmetadata: {{name: t{i:04}, namespace: bench}}\nspec:\n  clusterRef: {{name: main, namespace: granary-system}}\n  quotas: {{storage: 10Gi, objects: 1000}}\n  credentialsSecret: t{i:04}-creds\n"
        ));
    }
    eprintln!("applying {n} Tenants");
    let started = Instant::now();
    cp.kubectl_stdin(&["apply", "-f", "-"], &yaml)?;
    let applied = started.elapsed();
    let deadline = started + Duration::from_secs(600);
    let mut last_report = Instant::now();
    let ready = loop {
        let out = cp.kubectl(&["get", "tenants", "-n", "bench", "-o", "jsonpath={range .items[*]}{.status.conditions[?(@.type==\"Ready\")].status}{\"\\n\"}{end}"])?;
        let ready = out.lines().filter(|l| *l == "True").count();
        if ready == n {
            break started.elapsed();
        }
        if last_report.elapsed() > Duration::from_secs(5) {
            eprintln!(
                "{:>6.1} s: {ready}/{n} Ready",
                started.elapsed().as_secs_f64()
            );
            if ready == 0 && started.elapsed() > Duration::from_secs(20) {
                let t = cp
                    .kubectl(&[
                        "get",
                        "tenant",
                        "t0000",
                        "-n",
                        "bench",
                        "-o",
                        "jsonpath={.status}",
                    ])
                    .unwrap_or_default();
                let log =
                    std::fs::read_to_string(dir.path().join("operator.log")).unwrap_or_default();
                let tail: Vec<&str> = log.lines().rev().take(5).collect();
                eprintln!("t0000 status: {t}\noperator log tail:\n{}", tail.join("\n"));
            }
            last_report = Instant::now();
        }
        if Instant::now() > deadline {
            let log = std::fs::read_to_string(dir.path().join("operator.log")).unwrap_or_default();
            let tail: Vec<&str> = log.lines().rev().take(20).collect();
            bail!(
                "only {ready}/{n} Tenants Ready after 600 s; operator log tail:\n{}",
                tail.join("\n")
            );
        }
        std::thread::sleep(Duration::from_millis(250));
    };
    let rss = op
        .id()
        .and_then(peak_rss_kib)
        .context("reading the operator's peak RSS")?;
    drop(op);
    println!("tenants: {n}");
    println!(
        "kubectl apply returned after: {:.2} s",
        applied.as_secs_f64()
    );
    println!(
        "all Ready after: {:.2} s  (target < 30 s)",
        ready.as_secs_f64()
    );
    println!(
        "operator peak RSS: {:.1} MiB  (target < 100 MiB)",
        rss as f64 / 1024.0
    );
    Ok(())
}
