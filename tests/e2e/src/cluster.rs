//! A multi-node cluster for tests: `n` `granary-node serve` processes, each in its own
//! network namespace with its own address (see [`crate::netns`]), one zone each, on one
//! real Postgres catalog reachable from every namespace. Everything is stopped and
//! removed when the [`TestCluster`] is dropped (nodes first, then Postgres, then the
//! namespaces).

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use serde_json::Value;

use crate::netns::Net;
use crate::{NodeProc, PgServer, node_binary};

pub const TOKEN: &str = "cluster-test-admin-token-0123456789";
pub const SECRET: &str = "cluster-test-peer-secret-0123456789";
/// The cluster's region (the KV API checks it in every signature's scope).
pub const REGION: &str = "us-east-1";

pub struct Member {
    pub id: String,
    pub proc: NodeProc,
    pub rpc: String,
}

/// Settings every node of a [`TestCluster`] shares.
#[derive(Clone, Debug)]
pub struct Settings {
    pub partitions: u16,
    pub replication_factor: u8,
    pub heartbeat_interval_ms: u64,
    pub suspect_after_ms: u64,
    pub fail_after_ms: u64,
    /// Nodes that must join before partitions are assigned (0: all of the cluster's).
    pub bootstrap_expect: usize,
    /// Port of an OTLP collector listening on every address of the test's host: the
    /// nodes export traces to it through the bridge.
    pub otlp_port: Option<u16>,
    /// Nodes started by [`TestCluster::start`] (0: all); the others have their
    /// namespace and start later with [`TestCluster::add_node`].
    pub start_nodes: usize,
    /// More lines for every node's config file.
    pub extra_config: String,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            partitions: 64,
            replication_factor: 3,
            heartbeat_interval_ms: 300,
            suspect_after_ms: 2000,
            fail_after_ms: 6000,
            bootstrap_expect: 0,
            otlp_port: None,
            start_nodes: 0,
            extra_config: String::new(),
        }
    }
}

pub struct TestCluster {
    // Field order is drop order: nodes, then the catalog, then the network.
    pub nodes: Vec<Member>,
    pub pg: PgServer,
    pub net: Net,
    pub dir: tempfile::TempDir,
    pub url: String,
    master: String,
    settings: Settings,
}

impl TestCluster {
    /// Starts `n` nodes in zones "a", "b", "c", ... and waits until each serves.
    pub fn start(n: usize, mut settings: Settings) -> Result<Self> {
        let net = Net::create(n).context("network namespaces for the cluster test")?;
        println!(
            "network: {n} namespaces on {} (catalog at {})",
            net.subnet(),
            net.catalog_addr()
        );
        let pg = PgServer::start_listening(Some((net.catalog_addr(), &net.subnet())))?;
        pg.create_db("granary_cluster")?;
        let url = pg.url_at(net.catalog_addr(), "granary_cluster");
        let out = std::process::Command::new(node_binary())
            .arg("gen-master-key")
            .output()?;
        let master = String::from_utf8(out.stdout)?.trim().to_string();
        if settings.bootstrap_expect == 0 {
            settings.bootstrap_expect = match settings.start_nodes {
                0 => n,
                k => k.min(n),
            };
        }
        let mut c = Self {
            nodes: Vec::new(),
            pg,
            net,
            dir: tempfile::tempdir()?,
            url,
            master,
            settings,
        };
        let start = match c.settings.start_nodes {
            0 => n,
            k => k.min(n),
        };
        for _ in 0..start {
            c.add_node()?;
        }
        Ok(c)
    }

    /// Starts the next node that has a namespace but no process yet.
    pub fn add_node(&mut self) -> Result<()> {
        let m = self.start_node(self.nodes.len())?;
        self.nodes.push(m);
        Ok(())
    }

    fn config_path(&self, i: usize) -> PathBuf {
        self.dir.path().join(format!("n{}.toml", i + 1))
    }

    pub fn data_dir(&self, i: usize) -> PathBuf {
        self.dir.path().join(format!("n{}", i + 1))
    }

    /// Starts (or restarts) node `i` on its data directory. Each node has an address of
    /// its own, so its ports are fixed (S3 9000, KV 9100, admin 9200, RPC 9300): a
    /// restarted node answers where its clients already point.
    pub fn start_node(&self, i: usize) -> Result<Member> {
        let id = format!("n{}", i + 1);
        let addr = self.net.addr(i);
        let zone = (b'a' + i as u8) as char;
        let data = self.data_dir(i);
        let s = &self.settings;
        std::fs::write(
            self.config_path(i),
            format!(
                "node_id = \"{id}\"\nregion = \"{REGION}\"\nzone = \"{zone}\"\ndata_dir = \"{}\"\n\
                 s3_listen = \"{addr}:9000\"\nkv_listen = \"{addr}:9100\"\n\
                 admin_listen = \"{addr}:9200\"\nrpc_listen = \"{addr}:9300\"\npartitions = {}\nreplication_factor = {}\n\
                 heartbeat_interval_ms = {}\nsuspect_after_ms = {}\nfail_after_ms = {}\n\
                 bootstrap_expect = {}\nmin_in_sync = {}\n{}\n",
                data.display(),
                s.partitions,
                s.replication_factor,
                s.heartbeat_interval_ms,
                s.suspect_after_ms,
                s.fail_after_ms,
                s.bootstrap_expect,
                s.replication_factor.min(2),
                s.extra_config,
            ),
        )?;
        let otlp = s
            .otlp_port
            .map(|port| format!("http://{}:{port}", self.net.bridge_addr()));
        let mut env = vec![
            ("GRANARY_CATALOG_URL", self.url.as_str()),
            ("GRANARY_MASTER_KEY", self.master.as_str()),
            ("GRANARY_ADMIN_TOKEN", TOKEN),
            ("GRANARY_CLUSTER_SECRET", SECRET),
        ];
        if let Some(o) = &otlp {
            env.push(("OTEL_EXPORTER_OTLP_ENDPOINT", o.as_str()));
            env.push(("OTEL_BSP_SCHEDULE_DELAY", "200"));
        }
        let proc = NodeProc::serve_in(
            Some(self.net.namespace(i)),
            &data,
            &self.config_path(i),
            &env,
            TOKEN,
        )?;
        let endpoints: Value =
            serde_json::from_str(&std::fs::read_to_string(data.join("endpoints.json"))?)?;
        let rpc = endpoints["rpc"]
            .as_str()
            .context("no rpc endpoint")?
            .to_string();
        Ok(Member { id, proc, rpc })
    }
}

impl TestCluster {
    /// Waits until every node knows a primary for every partition, and every partition
    /// has its full in-sync set; returns the first node's `/layout?partitions=true`.
    pub async fn wait_ready(&self) -> Value {
        let mut first = Value::Null;
        for m in &self.nodes {
            let l = eventually(
                &format!("{} knows every partition's primary", m.id),
                30,
                || async {
                    let l = try_admin(&m.proc, "/layout?partitions=true").await?;
                    (l["members"].as_array().map_or(0, Vec::len) == self.nodes.len()
                        && l["partitionsWithoutPrimary"] == 0
                        && l["partitionsOutOfSync"] == 0)
                        .then_some(l)
                },
            )
            .await;
            if first.is_null() {
                first = l;
            }
        }
        // And every partition is served by its primary (taken up and checked).
        eventually("every partition served by its primary", 30, || async {
            self.all_served().await.then_some(())
        })
        .await;
        first
    }
}

impl TestCluster {
    /// Whether the nodes' `partitionsServedHere` add up to every partition (false while
    /// any node does not answer).
    async fn all_served(&self) -> bool {
        let mut served = 0;
        for m in &self.nodes {
            match try_admin(&m.proc, "/layout").await {
                Some(l) => served += l["partitionsServedHere"].as_u64().unwrap_or(0),
                None => return false,
            }
        }
        served == u64::from(self.settings.partitions)
    }

    /// Waits until every partition is led by the layout's preferred primary, with its full
    /// in-sync set, and served (hand-overs after a join or a return are over).
    pub async fn wait_balanced(&self, secs: u64) -> Value {
        eventually(
            "every partition with its preferred primary, served",
            secs,
            || async {
                let l = try_admin(&self.nodes[0].proc, "/layout?partitions=true").await?;
                let balanced = l["members"].as_array()?.len() == self.nodes.len()
                    && l["partitionsOutOfSync"] == 0
                    && l["replicaSets"]
                        .as_array()?
                        .iter()
                        .zip(l["actingPrimaries"].as_array()?)
                        .all(|(set, primary)| set[0] == *primary);
                (balanced && self.all_served().await).then_some(l)
            },
        )
        .await
    }
}

impl TestCluster {
    /// Node `i`'s digest of every partition (records, SHA-256 and log position).
    pub async fn digests(&self, i: usize) -> Vec<Value> {
        let http = reqwest::Client::new();
        let mut out = Vec::new();
        for p in 0..self.settings.partitions {
            let d: Value = http
                .get(format!(
                    "{}/rpc/v1/partitions/{p}/digest",
                    self.nodes[i].rpc
                ))
                .bearer_auth(SECRET)
                .timeout(Duration::from_secs(10))
                .send()
                .await
                .unwrap()
                .json()
                .await
                .unwrap();
            out.push(d);
        }
        out
    }

    /// Partitions on which the nodes at `idx` do not all hold the same.
    pub async fn differing(&self, idx: &[usize]) -> Vec<u16> {
        let mut d = Vec::new();
        for &i in idx {
            d.push(self.digests(i).await);
        }
        (0..self.settings.partitions)
            .filter(|&p| d.windows(2).any(|w| w[0][p as usize] != w[1][p as usize]))
            .collect()
    }

    /// The last lines of every node's log (printed when a wait fails).
    pub fn print_logs(&self) {
        for m in &self.nodes {
            let log =
                std::fs::read_to_string(m.proc.data_dir.join("stderr.log")).unwrap_or_default();
            let lines: Vec<&str> = log.lines().collect();
            println!("--- {} (last 30 lines)", m.id);
            for l in &lines[lines.len().saturating_sub(30)..] {
                println!("{l}");
            }
        }
    }

    /// Waits up to `secs` until, for every partition, the nodes of its replica set in
    /// the current layout hold the same (records, SHA-256 and log position).
    pub async fn replicas_agree(&self, secs: u64) {
        let started = Instant::now();
        loop {
            let l = admin(&self.nodes[0].proc, "/layout?partitions=true").await;
            let mut digests = Vec::new();
            for i in 0..self.nodes.len() {
                digests.push(self.digests(i).await);
            }
            let index = |id: &Value| self.nodes.iter().position(|m| *id == m.id.as_str());
            let differing: Vec<usize> = l["replicaSets"]
                .as_array()
                .unwrap()
                .iter()
                .enumerate()
                .filter(|(p, set)| {
                    let ds: Vec<&Value> = set
                        .as_array()
                        .unwrap()
                        .iter()
                        .filter_map(index)
                        .map(|i| &digests[i][*p])
                        .collect();
                    ds.windows(2).any(|w| w[0] != w[1])
                })
                .map(|(p, _)| p)
                .collect();
            if differing.is_empty() {
                println!(
                    "every replica set agrees: {:.1} s",
                    started.elapsed().as_secs_f64()
                );
                return;
            }
            if started.elapsed() > Duration::from_secs(secs) {
                self.print_logs();
                panic!("partitions {differing:?} differ within their replica sets after {secs} s");
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }

    /// Waits up to `secs` until the nodes at `idx` hold the same of every partition.
    pub async fn converge(&self, idx: &[usize], secs: u64, what: &str) {
        let started = Instant::now();
        loop {
            let d = self.differing(idx).await;
            if d.is_empty() {
                println!("{what}: {:.1} s", started.elapsed().as_secs_f64());
                return;
            }
            if started.elapsed() > Duration::from_secs(secs) {
                self.print_logs();
                panic!("{what}: partitions {d:?} still differ after {secs} s");
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }
}

impl TestCluster {
    /// The acting primary (as an index into `nodes`) of `partition` (for a bucket, or
    /// `kv:<namespace>`: `PartitionId::of(tenant, container, partitions)`), asked of
    /// any node that answers.
    pub async fn acting_primary(&self, partition: u16) -> Option<usize> {
        for m in &self.nodes {
            let Some(l) = try_admin(&m.proc, "/layout?partitions=true").await else {
                continue;
            };
            if let Some(id) = l["actingPrimaries"][usize::from(partition)].as_str() {
                return self.nodes.iter().position(|m| m.id == id);
            }
        }
        None
    }

    /// Creates tenant `name` with a key through node 1; returns its access key, secret
    /// and id.
    pub async fn tenant(&self, name: &str) -> (String, String, String) {
        let adm = crate::Admin::new(&self.nodes[0].proc);
        let (ak, sk) = adm.tenant_with_key(name).await.unwrap();
        let (_, t) = adm
            .call(reqwest::Method::GET, &format!("/tenants/{name}"), None)
            .await
            .unwrap();
        (ak, sk, t["id"].as_str().unwrap().to_string())
    }
}

/// A metric's value on a Prometheus page: the first line starting with `series` (a full
/// series name with its labels); 0 when absent.
pub fn metric(page: &str, series: &str) -> f64 {
    page.lines()
        .find_map(|l| l.strip_prefix(series)?.trim().parse().ok())
        .unwrap_or(0.0)
}

/// GET `/admin/v1{path}` on `node`; panics unless it succeeds within 10 s.
pub async fn admin(node: &NodeProc, path: &str) -> Value {
    match admin_get(node, path, 10).await {
        Ok(v) => v,
        Err(e) => panic!("{path}: {e}"),
    }
}

async fn admin_get(node: &NodeProc, path: &str, secs: u64) -> Result<Value> {
    let r = reqwest::Client::new()
        .get(format!("{}/admin/v1{path}", node.admin))
        .bearer_auth(TOKEN)
        .timeout(Duration::from_secs(secs))
        .send()
        .await?;
    anyhow::ensure!(r.status().is_success(), "{}", r.status());
    Ok(r.json().await?)
}

/// Like [`admin`], but None on any failure (for polling a node that may be starting).
pub async fn try_admin(node: &NodeProc, path: &str) -> Option<Value> {
    admin_get(node, path, 5).await.ok()
}

/// Polls `f` until it returns Some, or panics after `secs` naming `what`; prints how long
/// it took.
pub async fn eventually<T, F, Fut>(what: &str, secs: u64, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let started = Instant::now();
    let deadline = started + Duration::from_secs(secs);
    loop {
        if let Some(v) = f().await {
            println!("{what}: {:.1} s", started.elapsed().as_secs_f64());
            return v;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A member's state in an `/admin/v1/nodes` answer ("" when absent).
pub fn state_of(nodes: &Value, id: &str) -> String {
    nodes["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|n| n["id"] == id)
        .map(|n| n["state"].as_str().unwrap().to_string())
        .unwrap_or_default()
}

/// Sends `sig` (such as "-STOP") to the node's process.
pub fn signal(node: &NodeProc, sig: &str) {
    let pid = node.pid().unwrap().to_string();
    let ok = std::process::Command::new("kill")
        .args([sig, &pid])
        .status()
        .unwrap()
        .success();
    assert!(ok, "kill {sig} {pid}");
}

/// Peak resident memory of a process (VmHWM), in bytes.
pub fn peak_rss(pid: u32) -> Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let line = status
        .lines()
        .find(|l| l.starts_with("VmHWM:"))
        .context("no VmHWM")?;
    let kib: u64 = line
        .split_whitespace()
        .nth(1)
        .context("malformed VmHWM")?
        .parse()?;
    Ok(kib * 1024)
}
