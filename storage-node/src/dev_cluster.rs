//! `granary-node dev --nodes N` (part of the binary): a cluster of N `serve` processes on
//! this machine, so a newcomer can watch routing, replication and a failover on a laptop.
//!
//! The parent creates the shared secrets and the SQLite catalog (schema and the dev
//! tenant) before any node starts, writes one config file per node (mode 0600: it holds
//! the secrets) under `DATA_DIR/n<i>/node.toml`, starts the nodes, waits until every
//! partition has a primary, and prints the endpoints and credentials. It then watches
//! its children: a node that exits is reported with the command that restarts it (it is
//! not restarted, so its failover can be watched); Ctrl-C or SIGTERM stops them all.
//! `DATA_DIR/cluster.json` lists the nodes, their endpoints and pids for scripts.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use granary_node::catalog::{MasterKey, SqlCatalog};
use granary_node::config::NodeConfig;
use granary_node::engine::dirs::{create_dir_all_durable, write_file_durable};
use granary_node::server::shutdown_on_signals;
use serde_json::{Value, json};

use crate::{dev_tenant, random_token, read_or_create_secret};

/// Failure detection of a dev cluster: a killed node is failed over in about 10 s.
const HEARTBEAT_MS: u64 = 500;
const SUSPECT_AFTER_MS: u64 = 2500;
const FAIL_AFTER_MS: u64 = 8000;

struct DevNode {
    id: String,
    config: PathBuf,
    dir: PathBuf,
    child: Child,
    exited: bool,
    endpoints: Value,
}

/// `addr` with its port moved up by `i`.
fn shifted(addr: SocketAddr, i: u16) -> anyhow::Result<SocketAddr> {
    let port = addr
        .port()
        .checked_add(i)
        .filter(|_| addr.port() != 0)
        .with_context(|| {
            format!("--nodes needs fixed listen ports with room above them (got {addr})")
        })?;
    Ok(SocketAddr::new(addr.ip(), port))
}

fn node_config(
    base: &NodeConfig,
    i: u16,
    n: u16,
    dir: &Path,
    secrets: (&str, &str, &str),
    catalog_url: &str,
) -> anyhow::Result<String> {
    let (master, token, cluster_secret) = secrets;
    let replication_factor = n.min(3);
    let min_in_sync = if replication_factor >= 3 { 2 } else { 1 };
    let mut t = toml::Table::new();
    let mut s = |k: &str, v: String| t.insert(k.into(), toml::Value::String(v));
    s("node_id", format!("n{}", i + 1));
    s("zone", format!("zone-{}", (b'a' + (i % 26) as u8) as char));
    s("region", base.region.clone());
    s("data_dir", dir.display().to_string());
    s("catalog_url", catalog_url.into());
    s("s3_listen", shifted(base.s3_listen, i)?.to_string());
    s("kv_listen", shifted(base.kv_listen, i)?.to_string());
    s("admin_listen", shifted(base.admin_listen, i)?.to_string());
    s("rpc_listen", shifted(base.rpc_listen, i)?.to_string());
    s("master_key", master.into());
    s("admin_token", token.into());
    s("cluster_secret", cluster_secret.into());
    let mut int = |k: &str, v: u64| t.insert(k.into(), toml::Value::Integer(v as i64));
    int("replication_factor", replication_factor.into());
    int("min_in_sync", min_in_sync);
    int("bootstrap_expect", n.into());
    int("memory_budget", base.memory_budget);
    int("heartbeat_interval_ms", HEARTBEAT_MS);
    int("suspect_after_ms", SUSPECT_AFTER_MS);
    int("fail_after_ms", FAIL_AFTER_MS);
    t.insert("direct_io".into(), toml::Value::Boolean(base.direct_io));
    Ok(format!(
        "# Written by `granary-node dev --nodes {n}` on each start; holds secrets.\n{}",
        toml::to_string(&t)?
    ))
}

/// The last lines of a node's log, for an error message.
fn log_tail(dir: &Path) -> String {
    let log = std::fs::read_to_string(dir.join("node.log")).unwrap_or_default();
    let lines: Vec<&str> = log.lines().collect();
    lines[lines.len().saturating_sub(20)..].join("\n")
}

fn spawn(exe: &Path, config: &Path, dir: &Path) -> anyhow::Result<Child> {
    use std::os::unix::process::CommandExt;
    let _ = std::fs::remove_file(dir.join("endpoints.json"));
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(dir.join("node.log"))
        .with_context(|| format!("opening {}", dir.join("node.log").display()))?;
    let mut cmd = Command::new(exe);
    cmd.arg("serve")
        .arg("--config")
        .arg(config)
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log);
    // The nodes stop with this process, even when it is killed.
    // SAFETY: prctl is async-signal-safe and touches no memory of the parent.
    unsafe {
        cmd.pre_exec(|| {
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM);
            Ok(())
        });
    }
    cmd.spawn()
        .with_context(|| format!("starting {} serve", exe.display()))
}

/// Waits until every node has written its endpoints and one of them knows a primary
/// for every partition; fails with the node's log when one exits first.
async fn wait_ready(nodes: &mut [DevNode], token: &str, partitions: u16) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(120);
    let http = reqwest::Client::new();
    loop {
        for n in nodes.iter_mut() {
            if let Some(status) = n.child.try_wait()? {
                bail!(
                    "node {} exited during start-up ({status}); its log ({}):\n{}",
                    n.id,
                    n.dir.join("node.log").display(),
                    log_tail(&n.dir)
                );
            }
            if n.endpoints.is_null()
                && let Ok(text) = std::fs::read_to_string(n.dir.join("endpoints.json"))
            {
                n.endpoints = serde_json::from_str(&text)?;
            }
        }
        if nodes.iter().all(|n| !n.endpoints.is_null()) {
            // Ready when every node knows every partition's primary and each partition
            // is served by its primary (taken up and checked against its replicas).
            let mut served = 0;
            let mut complete = true;
            for n in nodes.iter() {
                let admin = n.endpoints["admin"].as_str().unwrap_or_default();
                let layout = http
                    .get(format!("{admin}/admin/v1/layout"))
                    .bearer_auth(token)
                    .timeout(Duration::from_secs(2))
                    .send()
                    .await;
                match layout {
                    Ok(r) => match r.json::<Value>().await {
                        Ok(l) if l["partitionsWithoutPrimary"] == 0 => {
                            served += l["partitionsServedHere"].as_u64().unwrap_or(0);
                        }
                        _ => complete = false,
                    },
                    Err(_) => complete = false,
                }
            }
            if complete && served == u64::from(partitions) {
                return Ok(());
            }
        }
        if Instant::now() > deadline {
            bail!(
                "the dev cluster did not form within 120 s; node logs are in node.log under each node's directory"
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

fn stop_all(nodes: &mut [DevNode]) {
    for n in nodes.iter().filter(|n| !n.exited) {
        // SAFETY: sending a signal to our own child.
        unsafe {
            libc::kill(n.child.id() as libc::pid_t, libc::SIGTERM);
        }
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    for n in nodes.iter_mut() {
        while !n.exited && Instant::now() < deadline {
            if n.child.try_wait().ok().flatten().is_some() {
                n.exited = true;
            } else {
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        if !n.exited {
            let _ = n.child.kill();
            let _ = n.child.wait();
        }
    }
}

pub async fn run(base: NodeConfig, n: u16) -> anyhow::Result<()> {
    let root = base.data_dir.clone();
    create_dir_all_durable(&root)
        .with_context(|| format!("creating data directory {}", root.display()))?;
    let master = read_or_create_secret(&root.join("master.key"), || {
        MasterKey::generate().to_base64()
    })?;
    let token = read_or_create_secret(&root.join("admin.token"), random_token)?;
    let cluster_secret = read_or_create_secret(&root.join("cluster.secret"), random_token)?;
    let root_abs = std::fs::canonicalize(&root)?;
    let catalog_url = format!("sqlite:{}", root_abs.join("catalog.db").display());
    // The schema and the dev tenant exist before any node starts (the nodes would
    // otherwise race to migrate one SQLite file).
    let (tenant, key, secret) = {
        let catalog = SqlCatalog::connect(&catalog_url, MasterKey::from_base64(&master)?)
            .await
            .context("opening the dev cluster's catalog")?;
        dev_tenant(&catalog).await?
    };
    let exe = std::env::current_exe().context("locating granary-node")?;
    let mut nodes = Vec::new();
    for i in 0..n {
        let id = format!("n{}", i + 1);
        let dir = root_abs.join(&id);
        create_dir_all_durable(&dir)?;
        let config = dir.join("node.toml");
        let text = node_config(
            &base,
            i,
            n,
            &dir,
            (&master, &token, &cluster_secret),
            &catalog_url,
        )?;
        // Readable by its owner only: it holds the secrets.
        write_file_durable(&config, text.as_bytes(), 0o600)
            .with_context(|| format!("writing {}", config.display()))?;
        let child = match spawn(&exe, &config, &dir) {
            Ok(c) => c,
            Err(e) => {
                stop_all(&mut nodes);
                return Err(e);
            }
        };
        nodes.push(DevNode {
            id,
            config,
            dir,
            child,
            exited: false,
            endpoints: Value::Null,
        });
    }
    println!(
        "Starting a {n}-node Granary dev cluster (data in {}) ...",
        root.display()
    );
    if let Err(e) = wait_ready(&mut nodes, &token, base.partitions).await {
        stop_all(&mut nodes);
        return Err(e);
    }
    let listing: Vec<Value> = nodes
        .iter()
        .map(|d| {
            json!({
                "id": d.id, "pid": d.child.id(), "config": d.config,
                "s3": d.endpoints["s3"], "kv": d.endpoints["kv"],
                "admin": d.endpoints["admin"], "rpc": d.endpoints["rpc"],
            })
        })
        .collect();
    std::fs::write(
        root.join("cluster.json"),
        serde_json::to_string_pretty(&json!({ "nodes": listing }))?,
    )?;
    let rf = n.min(3);
    let mut table = String::new();
    for d in &nodes {
        let e = |k: &str| d.endpoints[k].as_str().unwrap_or_default().to_string();
        table.push_str(&format!(
            "\n  {:<4} {:<24} {:<24} {:<24} {}",
            d.id,
            e("s3"),
            e("kv"),
            e("admin"),
            d.child.id()
        ));
    }
    let first = &nodes[0];
    let other_admin = nodes[1].endpoints["admin"].as_str().unwrap_or_default();
    println!(
        "Granary dev cluster is running: {n} nodes, one SQLite catalog, replication factor \
         {rf}, minInSync {min}.\n\
         \n  node S3 endpoint              KV endpoint              admin API                pid{table}\
         \n\n  Region          {region}\
         \n  Tenant          {tenant}\
         \n  Access key id   {key}\
         \n  Secret key      {secret}\
         \n  Admin token     in {dir}/admin.token\
         \n\nAny node serves any request: it forwards to the partition's primary.\
         \nTry:\n  export AWS_ACCESS_KEY_ID={key} AWS_SECRET_ACCESS_KEY='{secret}' AWS_DEFAULT_REGION={region}\
         \n  aws --endpoint-url {s3} s3 mb s3://demo\
         \nWatch a failover: kill -9 {pid} (n1); within about {fail} s its partitions get new primaries:\
         \n  curl -s -H \"Authorization: Bearer $(cat {dir}/admin.token)\" {other_admin}/admin/v1/nodes\
         \nLogs: {dir}/n<i>/node.log. Ctrl-C stops every node.\n",
        min = if rf >= 3 { 2 } else { 1 },
        region = base.region,
        dir = root.display(),
        s3 = first.endpoints["s3"].as_str().unwrap_or_default(),
        pid = first.child.id(),
        fail = (FAIL_AFTER_MS + 2 * SUSPECT_AFTER_MS) / 1000,
    );

    let mut shutdown = shutdown_on_signals();
    let mut tick = tokio::time::interval(Duration::from_millis(500));
    loop {
        tokio::select! {
            _ = shutdown.changed() => break,
            _ = tick.tick() => {}
        }
        for d in nodes.iter_mut().filter(|d| !d.exited) {
            if let Ok(Some(status)) = d.child.try_wait() {
                d.exited = true;
                println!(
                    "{} exited ({status}); the other nodes go on. Restart it with:\n  {} serve --config {}",
                    d.id,
                    exe.display(),
                    d.config.display()
                );
            }
        }
        if nodes.iter().all(|d| d.exited) {
            bail!("every node of the dev cluster has exited");
        }
    }
    println!("stopping the dev cluster ...");
    tokio::task::block_in_place(|| stop_all(&mut nodes));
    Ok(())
}
