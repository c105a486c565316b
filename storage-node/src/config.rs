//! The node's one typed configuration. Sources, later ones winning: built-in defaults
//! (documented on each field and in docs/operations.md), the TOML file given with
//! `--config`, then `GRANARY_*` environment variables, then command-line flags.

use std::net::SocketAddr;
use std::path::PathBuf;

use serde::Deserialize;

#[derive(Clone, Debug, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields, default)]
pub struct NodeConfig {
    /// Stable node name in the cluster. Default `node-0`.
    pub node_id: String,
    /// Region this node's cluster serves; S3 clients sign with it. Default `us-east-1`.
    pub region: String,
    /// Failure domain within the region. Default `local`.
    pub zone: String,
    /// Where the engine keeps its files. Default `./granary-data`.
    pub data_dir: PathBuf,
    /// `postgres://...` or `sqlite:PATH`. Default `sqlite:<data_dir>/catalog.db`.
    pub catalog_url: Option<String>,
    /// Listeners. Defaults 127.0.0.1:9000 (S3), :9100 (KV), :9200 (admin, metrics).
    pub s3_listen: SocketAddr,
    pub kv_listen: SocketAddr,
    pub admin_listen: SocketAddr,
    /// Addresses other nodes and clients use; default to the listen addresses.
    pub advertise_s3: Option<String>,
    pub advertise_kv: Option<String>,
    pub advertise_admin: Option<String>,
    /// Base domains for virtual-host style S3 (`bucket.<domain>`). Default `localhost`.
    pub s3_domains: Vec<String>,
    /// Bearer token of the admin API. Required by `serve`; `dev` generates one.
    pub admin_token: Option<String>,
    /// Base64 32-byte key sealing secrets in the catalog (or `master_key_file`).
    /// Required by `serve`; `dev` generates one under the data directory.
    pub master_key: Option<String>,
    pub master_key_file: Option<PathBuf>,
    /// Number of partitions of the cluster; fixed at first start. Default 1024.
    pub partitions: u16,
    /// Bytes of request bodies and responses the node holds in memory at once, over
    /// all requests (KV bodies, values, scan pages, batch answers). A request that
    /// would exceed it is refused with `SlowDown` (HTTP 503). Default 256 MiB; at
    /// least 8 MiB (one largest KV request).
    pub memory_budget: u64,
    /// Multipart uploads initiated longer ago than this many seconds are aborted and
    /// their parts freed. Default 604800 (7 days); 0 never expires them.
    pub multipart_upload_max_age_secs: u64,
    /// Internal RPC listener (peer probes; replication and forwarding to come).
    /// Default 127.0.0.1:9300.
    pub rpc_listen: SocketAddr,
    /// Address other nodes reach this node's RPC listener at; default `rpc_listen`.
    pub advertise_rpc: Option<String>,
    /// Shared secret peers present to each other on the RPC port (at least 16
    /// characters). Without it the RPC port refuses every request and peers are judged
    /// by their catalog heartbeats alone. `dev` generates one under the data directory.
    pub cluster_secret: Option<String>,
    /// Replicas per partition the layout aims for. Default 3 (fewer while the cluster
    /// has fewer nodes; such partitions are reported under-replicated).
    pub replication_factor: u8,
    /// How many nodes must have joined before partitions get their first primaries
    /// (cluster creation only; later joins do not wait). Until then requests for data
    /// answer 503. Default 1; the operator sets the StorageCluster's node count, so a
    /// new cluster does not put every partition on the first node to start.
    pub bootstrap_expect: u16,
    /// In-sync replicas (the primary included) a write needs before it is acknowledged;
    /// with fewer, writes are refused before they start (503 `NotEnoughReplicas`), or,
    /// when the in-sync set shrank while they ran, answered 500 `NotDurable` (outcome
    /// unknown). A write always waits for every in-sync replica;
    /// this bounds how few there may be. Default 1 (as Kafka's `min.insync.replicas`),
    /// so a lone node serves; the operator sets the StorageCluster's `minInSync`.
    pub min_in_sync: Option<u8>,
    /// This node's weight in partition placement (e.g. GiB of data volume). Default 100.
    pub capacity: u64,
    /// Requests this node forwards to one peer at once (each counts until its answer
    /// has streamed back). More are refused with 503 `SlowDown` (nothing sent), so a
    /// slow or overloaded primary cannot pile up unbounded work here. Default 512.
    pub max_forwards_per_peer: u32,
    /// An S3 or KV client connection whose reads or writes wait this long without a
    /// byte going through is closed (a client that stops reading its answer, or stops
    /// sending its body); so is one that takes longer to send a request's head, idle
    /// keep-alive connections included. Default 60.
    pub client_stall_timeout_secs: u64,
    /// Pieces of object-body I/O (up to 1 MiB each) the node runs at once; more wait in
    /// the fair scheduler's order (tenancy/sched.rs). Default 2.
    pub io_slots: u32,
    /// Write chunk files (and read them for replicas) around the page cache with
    /// `O_DIRECT` (engine/direct.rs): much less CPU per byte for large writes, but on a
    /// three-node cluster a flooding tenant's writes then reach the disk at once and
    /// another tenant's tail latency suffers (docs/benchmarks.md). Default false.
    pub direct_io: bool,
    /// Heartbeat, probe and layout-poll period in milliseconds. Default 1000.
    pub heartbeat_interval_ms: u64,
    /// A node is suspected after this long without a heartbeat or an answered probe.
    /// Default 5000.
    pub suspect_after_ms: u64,
    /// A node is declared failed (and left out of the next layout) after this long
    /// without a heartbeat in the catalog. Default 30000.
    pub fail_after_ms: u64,
    /// Cold tier object store URL (`file:///dir`, `s3://bucket/prefix`,
    /// `gs://bucket/prefix`, `az://container/prefix`); none: no cold tier. Credentials
    /// come from the cloud's standard environment variables (`AWS_ACCESS_KEY_ID`, ...)
    /// or [`NodeConfig::cold_tier_options`].
    pub cold_tier: Option<String>,
    /// `object_store` options of the cold tier (e.g. `aws_endpoint`, `aws_region`,
    /// `aws_allow_http`, `aws_access_key_id`, `aws_secret_access_key`).
    pub cold_tier_options: std::collections::BTreeMap<String, String>,
    /// Seconds between passes of the mover. Default 60.
    pub cold_tier_period_secs: u64,
    /// Deadline of one cold-store call, in seconds: a read of a cold object answers 503
    /// after it when the store does not answer. Default 10.
    pub cold_tier_timeout_secs: u64,
    /// Cold copies no record names are deleted once they are this many seconds old
    /// (a move in progress writes younger ones). Default 3600.
    pub cold_tier_orphan_grace_secs: u64,
    /// Bytes per second the mover copies at most (background I/O on top). Default
    /// 134217728 (128 MiB/s); 0: no limit.
    pub cold_tier_rate: u64,
}

/// Smallest accepted [`NodeConfig::memory_budget`].
pub const MIN_MEMORY_BUDGET: u64 = 8 * 1024 * 1024;

impl Default for NodeConfig {
    fn default() -> Self {
        Self {
            node_id: "node-0".into(),
            region: "us-east-1".into(),
            zone: "local".into(),
            data_dir: PathBuf::from("./granary-data"),
            catalog_url: None,
            s3_listen: ([127, 0, 0, 1], 9000).into(),
            kv_listen: ([127, 0, 0, 1], 9100).into(),
            admin_listen: ([127, 0, 0, 1], 9200).into(),
            advertise_s3: None,
            advertise_kv: None,
            advertise_admin: None,
            s3_domains: vec!["localhost".into()],
            admin_token: None,
            master_key: None,
            master_key_file: None,
            partitions: 1024,
            memory_budget: 256 * 1024 * 1024,
            multipart_upload_max_age_secs: 7 * 24 * 3600,
            rpc_listen: ([127, 0, 0, 1], 9300).into(),
            advertise_rpc: None,
            cluster_secret: None,
            replication_factor: 3,
            bootstrap_expect: 1,
            min_in_sync: None,
            capacity: 100,
            max_forwards_per_peer: 512,
            client_stall_timeout_secs: 60,
            io_slots: crate::tenancy::sched::DEFAULT_SLOTS as u32,
            direct_io: false,
            heartbeat_interval_ms: 1000,
            suspect_after_ms: 5000,
            fail_after_ms: 30_000,
            cold_tier: None,
            cold_tier_options: Default::default(),
            cold_tier_period_secs: 60,
            cold_tier_timeout_secs: 10,
            cold_tier_orphan_grace_secs: 3600,
            cold_tier_rate: 128 * 1024 * 1024,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: {source}")]
    Parse {
        path: PathBuf,
        source: toml::de::Error,
    },
    #[error("environment variable {name}: {message}")]
    Env { name: String, message: String },
    #[error("{0}")]
    Invalid(String),
}

impl NodeConfig {
    pub fn load(file: Option<&std::path::Path>) -> Result<Self, ConfigError> {
        let mut c = match file {
            Some(p) => {
                let text = std::fs::read_to_string(p).map_err(|source| ConfigError::Read {
                    path: p.into(),
                    source,
                })?;
                toml::from_str(&text).map_err(|source| ConfigError::Parse {
                    path: p.into(),
                    source,
                })?
            }
            None => NodeConfig::default(),
        };
        c.apply_env(|k| std::env::var(k).ok())?;
        Ok(c)
    }

    /// Applies `GRANARY_<FIELD>` overrides (e.g. `GRANARY_CATALOG_URL`).
    pub fn apply_env(&mut self, get: impl Fn(&str) -> Option<String>) -> Result<(), ConfigError> {
        fn parse<T: std::str::FromStr>(name: &str, v: &str) -> Result<T, ConfigError> {
            v.parse().map_err(|_| ConfigError::Env {
                name: name.into(),
                message: format!("cannot parse {v:?}"),
            })
        }
        let g = |k: &str| get(&format!("GRANARY_{k}"));
        if let Some(v) = g("NODE_ID") {
            self.node_id = v;
        }
        if let Some(v) = g("REGION") {
            self.region = v;
        }
        if let Some(v) = g("ZONE") {
            self.zone = v;
        }
        if let Some(v) = g("DATA_DIR") {
            self.data_dir = v.into();
        }
        if let Some(v) = g("CATALOG_URL") {
            self.catalog_url = Some(v);
        }
        if let Some(v) = g("S3_LISTEN") {
            self.s3_listen = parse("GRANARY_S3_LISTEN", &v)?;
        }
        if let Some(v) = g("KV_LISTEN") {
            self.kv_listen = parse("GRANARY_KV_LISTEN", &v)?;
        }
        if let Some(v) = g("ADMIN_LISTEN") {
            self.admin_listen = parse("GRANARY_ADMIN_LISTEN", &v)?;
        }
        if let Some(v) = g("ADVERTISE_S3") {
            self.advertise_s3 = Some(v);
        }
        if let Some(v) = g("ADVERTISE_KV") {
            self.advertise_kv = Some(v);
        }
        if let Some(v) = g("ADVERTISE_ADMIN") {
            self.advertise_admin = Some(v);
        }
        if let Some(v) = g("S3_DOMAINS") {
            self.s3_domains = v
                .split(',')
                .map(|s| s.trim().to_string())
                .filter(|s| !s.is_empty())
                .collect();
        }
        if let Some(v) = g("ADMIN_TOKEN") {
            self.admin_token = Some(v);
        }
        if let Some(v) = g("MASTER_KEY") {
            self.master_key = Some(v);
        }
        if let Some(v) = g("MASTER_KEY_FILE") {
            self.master_key_file = Some(v.into());
        }
        if let Some(v) = g("PARTITIONS") {
            self.partitions = parse("GRANARY_PARTITIONS", &v)?;
        }
        if let Some(v) = g("MULTIPART_UPLOAD_MAX_AGE_SECS") {
            self.multipart_upload_max_age_secs =
                parse("GRANARY_MULTIPART_UPLOAD_MAX_AGE_SECS", &v)?;
        }
        if let Some(v) = g("MEMORY_BUDGET") {
            self.memory_budget = parse("GRANARY_MEMORY_BUDGET", &v)?;
        }
        if let Some(v) = g("MAX_FORWARDS_PER_PEER") {
            self.max_forwards_per_peer = parse("GRANARY_MAX_FORWARDS_PER_PEER", &v)?;
        }
        if let Some(v) = g("CLIENT_STALL_TIMEOUT_SECS") {
            self.client_stall_timeout_secs = parse("GRANARY_CLIENT_STALL_TIMEOUT_SECS", &v)?;
        }
        if let Some(v) = g("IO_SLOTS") {
            self.io_slots = parse("GRANARY_IO_SLOTS", &v)?;
        }
        if let Some(v) = g("DIRECT_IO") {
            self.direct_io = parse("GRANARY_DIRECT_IO", &v)?;
        }
        if let Some(v) = g("RPC_LISTEN") {
            self.rpc_listen = parse("GRANARY_RPC_LISTEN", &v)?;
        }
        if let Some(v) = g("ADVERTISE_RPC") {
            self.advertise_rpc = Some(v);
        }
        if let Some(v) = g("CLUSTER_SECRET") {
            self.cluster_secret = Some(v);
        }
        if let Some(v) = g("REPLICATION_FACTOR") {
            self.replication_factor = parse("GRANARY_REPLICATION_FACTOR", &v)?;
        }
        if let Some(v) = g("MIN_IN_SYNC") {
            self.min_in_sync = Some(parse("GRANARY_MIN_IN_SYNC", &v)?);
        }
        if let Some(v) = g("BOOTSTRAP_EXPECT") {
            self.bootstrap_expect = parse("GRANARY_BOOTSTRAP_EXPECT", &v)?;
        }
        if let Some(v) = g("CAPACITY") {
            self.capacity = parse("GRANARY_CAPACITY", &v)?;
        }
        if let Some(v) = g("HEARTBEAT_INTERVAL_MS") {
            self.heartbeat_interval_ms = parse("GRANARY_HEARTBEAT_INTERVAL_MS", &v)?;
        }
        if let Some(v) = g("SUSPECT_AFTER_MS") {
            self.suspect_after_ms = parse("GRANARY_SUSPECT_AFTER_MS", &v)?;
        }
        if let Some(v) = g("FAIL_AFTER_MS") {
            self.fail_after_ms = parse("GRANARY_FAIL_AFTER_MS", &v)?;
        }
        if let Some(v) = g("COLD_TIER") {
            self.cold_tier = (!v.is_empty()).then_some(v);
        }
        if let Some(v) = g("COLD_TIER_PERIOD_SECS") {
            self.cold_tier_period_secs = parse("GRANARY_COLD_TIER_PERIOD_SECS", &v)?;
        }
        if let Some(v) = g("COLD_TIER_TIMEOUT_SECS") {
            self.cold_tier_timeout_secs = parse("GRANARY_COLD_TIER_TIMEOUT_SECS", &v)?;
        }
        if let Some(v) = g("COLD_TIER_ORPHAN_GRACE_SECS") {
            self.cold_tier_orphan_grace_secs = parse("GRANARY_COLD_TIER_ORPHAN_GRACE_SECS", &v)?;
        }
        if let Some(v) = g("COLD_TIER_RATE") {
            self.cold_tier_rate = parse("GRANARY_COLD_TIER_RATE", &v)?;
        }
        Ok(())
    }

    pub fn catalog_url(&self) -> String {
        self.catalog_url
            .clone()
            .unwrap_or_else(|| format!("sqlite:{}", self.data_dir.join("catalog.db").display()))
    }

    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.partitions == 0 {
            return Err(ConfigError::Invalid("partitions must be at least 1".into()));
        }
        if self.cold_tier.is_some()
            && (self.cold_tier_period_secs == 0
                || self.cold_tier_timeout_secs == 0
                || self.cold_tier_orphan_grace_secs == 0)
        {
            return Err(ConfigError::Invalid(
                "cold_tier_period_secs, cold_tier_timeout_secs and cold_tier_orphan_grace_secs \
                 must be at least 1"
                    .into(),
            ));
        }
        if self.client_stall_timeout_secs == 0 {
            return Err(ConfigError::Invalid(
                "client_stall_timeout_secs must be at least 1".into(),
            ));
        }
        if self.memory_budget < MIN_MEMORY_BUDGET {
            return Err(ConfigError::Invalid(format!(
                "memory_budget must be at least {MIN_MEMORY_BUDGET} bytes"
            )));
        }
        if self.admin_token.as_deref().is_some_and(|t| t.len() < 16) {
            return Err(ConfigError::Invalid(
                "admin_token must be at least 16 characters".into(),
            ));
        }
        if self.cluster_secret.as_deref().is_some_and(|t| t.len() < 16) {
            return Err(ConfigError::Invalid(
                "cluster_secret must be at least 16 characters".into(),
            ));
        }
        if self.replication_factor == 0 {
            return Err(ConfigError::Invalid(
                "replication_factor must be at least 1".into(),
            ));
        }
        if let Some(m) = self.min_in_sync
            && (m == 0 || m > self.replication_factor)
        {
            return Err(ConfigError::Invalid(format!(
                "min_in_sync ({m}) must be between 1 and replication_factor ({})",
                self.replication_factor
            )));
        }
        if self.bootstrap_expect == 0 {
            return Err(ConfigError::Invalid(
                "bootstrap_expect must be at least 1".into(),
            ));
        }
        if self.io_slots == 0 {
            return Err(ConfigError::Invalid("io_slots must be at least 1".into()));
        }
        if self.heartbeat_interval_ms == 0
            || self.suspect_after_ms <= self.heartbeat_interval_ms
            || self.fail_after_ms <= self.suspect_after_ms
        {
            return Err(ConfigError::Invalid(format!(
                "need 0 < heartbeat_interval_ms ({}) < suspect_after_ms ({}) < fail_after_ms ({})",
                self.heartbeat_interval_ms, self.suspect_after_ms, self.fail_after_ms
            )));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn env_overrides_file_values_and_rejects_garbage() {
        let mut c: NodeConfig =
            toml::from_str("node_id = \"a\"\nregion = \"eu-west-1\"\n").unwrap();
        assert_eq!(c.region, "eu-west-1");
        c.apply_env(|k| (k == "GRANARY_NODE_ID").then(|| "b".to_string()))
            .unwrap();
        assert_eq!(c.node_id, "b");
        assert_eq!(c.region, "eu-west-1");
        let bad = c.apply_env(|k| (k == "GRANARY_S3_LISTEN").then(|| "nope".to_string()));
        assert!(matches!(bad, Err(ConfigError::Env { .. })));
        assert!(toml::from_str::<NodeConfig>("unknown_field = 1").is_err());
    }
}
