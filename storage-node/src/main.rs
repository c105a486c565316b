//! `granary-node`: run a storage node (`dev`, `serve`) or administer one
//! (`tenant`, `key`) through its admin API.

use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use clap::{Parser, Subcommand};
use granary_node::catalog::{Catalog, MasterKey, TenantSpec};
use granary_node::config::NodeConfig;
use granary_node::engine::dirs::{create_dir_all_durable, create_new_durable};
use granary_node::server::{Node, load_master_key, shutdown_on_signals};
use rand::RngCore;

mod dev_cluster;

#[derive(Parser)]
#[command(name = "granary-node", version, about = "Granary storage node")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run a complete single-machine Granary: SQLite catalog, local data, one default
    /// tenant whose credentials are printed (and reused on the next start).
    Dev {
        #[arg(long, env = "GRANARY_DATA_DIR", default_value = "./granary-data")]
        data_dir: PathBuf,
        #[arg(long, env = "GRANARY_S3_LISTEN", default_value = "127.0.0.1:9000")]
        s3_listen: std::net::SocketAddr,
        #[arg(long, env = "GRANARY_KV_LISTEN", default_value = "127.0.0.1:9100")]
        kv_listen: std::net::SocketAddr,
        #[arg(long, env = "GRANARY_ADMIN_LISTEN", default_value = "127.0.0.1:9200")]
        admin_listen: std::net::SocketAddr,
        /// Bytes of request and response data held in memory at once (see NodeConfig).
        #[arg(long, env = "GRANARY_MEMORY_BUDGET", default_value_t = NodeConfig::default().memory_budget)]
        memory_budget: u64,
        #[arg(long, env = "GRANARY_RPC_LISTEN", default_value = "127.0.0.1:9300")]
        rpc_listen: std::net::SocketAddr,
        /// Seconds an S3 or KV client may take to send a request's head (idle
        /// connections included) or leave a write of its answer unread before it is
        /// disconnected.
        #[arg(long, env = "GRANARY_CLIENT_STALL_TIMEOUT_SECS", default_value_t = NodeConfig::default().client_stall_timeout_secs, value_parser = clap::value_parser!(u64).range(1..))]
        client_stall_timeout_secs: u64,
        /// Write chunk files around the page cache (O_DIRECT); see docs/operations.md.
        #[arg(long, env = "GRANARY_DIRECT_IO", default_value_t = false, action = clap::ArgAction::Set)]
        direct_io: bool,
        /// Run a cluster of this many node processes on this machine instead of one
        /// node: node i listens on each port above plus i-1, keeps its data under
        /// DATA_DIR/n<i>, and all share one SQLite catalog (replication factor
        /// min(3, N), minInSync 2 from 3 nodes). Kill one to watch a failover.
        #[arg(long, env = "GRANARY_DEV_NODES", default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..=9))]
        nodes: u16,
        /// Cold tier URL (`file:///dir`, or `s3://bucket/prefix` with `AWS_*`
        /// variables, say another `granary-node dev`): objects the tenant's `tiering`
        /// policy or the bucket's lifecycle rules make cold move there.
        #[arg(long, env = "GRANARY_COLD_TIER")]
        cold_tier: Option<String>,
        /// Seconds between passes of the cold-tier mover (short for trying it out).
        #[arg(long, env = "GRANARY_COLD_TIER_PERIOD_SECS", default_value_t = 5)]
        cold_tier_period_secs: u64,
        /// Deadline of one cold-store call in seconds.
        #[arg(long, env = "GRANARY_COLD_TIER_TIMEOUT_SECS", default_value_t = NodeConfig::default().cold_tier_timeout_secs)]
        cold_tier_timeout_secs: u64,
        /// Cold copies no object names are deleted once this many seconds old.
        #[arg(
            long,
            env = "GRANARY_COLD_TIER_ORPHAN_GRACE_SECS",
            default_value_t = 60
        )]
        cold_tier_orphan_grace_secs: u64,
        /// Bytes per second the mover copies at most (0: no limit).
        #[arg(long, env = "GRANARY_COLD_TIER_RATE", default_value_t = NodeConfig::default().cold_tier_rate)]
        cold_tier_rate: u64,
    },
    /// Run a node from a configuration file (TOML), with GRANARY_* overrides.
    Serve {
        #[arg(long, env = "GRANARY_CONFIG")]
        config: PathBuf,
    },
    /// Manage tenants of a running node.
    Tenant {
        #[command(flatten)]
        admin: AdminArgs,
        #[command(subcommand)]
        cmd: TenantCmd,
    },
    /// Manage access keys of a tenant.
    Key {
        #[command(flatten)]
        admin: AdminArgs,
        #[command(subcommand)]
        cmd: KeyCmd,
    },
    /// Print a new random master key (base64), for `master_key` in a config.
    GenMasterKey,
}

#[derive(clap::Args)]
struct AdminArgs {
    /// Admin API base URL.
    #[arg(
        long,
        env = "GRANARY_ADMIN_URL",
        default_value = "http://127.0.0.1:9200",
        global = true
    )]
    admin_url: String,
    /// Admin token; default: the one `dev` wrote to ./granary-data/admin.token.
    #[arg(
        long,
        env = "GRANARY_ADMIN_TOKEN",
        global = true,
        hide_env_values = true
    )]
    admin_token: Option<String>,
}

#[derive(Subcommand)]
enum TenantCmd {
    /// Create a tenant; SPEC is JSON like {"quotas":{"storageBytes":1000000}}.
    Create {
        name: String,
        #[arg(long)]
        spec: Option<String>,
    },
    List,
    Get {
        name: String,
    },
    /// Replace a tenant's settings with SPEC (JSON).
    Update {
        name: String,
        #[arg(long)]
        spec: String,
    },
    /// Delete a tenant; with --purge also all its buckets, objects and KV keys.
    Delete {
        name: String,
        #[arg(long)]
        purge: bool,
    },
}

#[derive(Subcommand)]
enum KeyCmd {
    Create {
        tenant: String,
        #[arg(long, default_value = "")]
        description: String,
    },
    List {
        tenant: String,
    },
    Revoke {
        tenant: String,
        access_key_id: String,
    },
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    rt.block_on(async move {
        match cli.cmd {
            Cmd::Dev { data_dir, s3_listen, kv_listen, admin_listen, rpc_listen, memory_budget, client_stall_timeout_secs, direct_io, nodes, cold_tier, cold_tier_period_secs, cold_tier_timeout_secs, cold_tier_orphan_grace_secs, cold_tier_rate } => {
                let _t = granary_node::telemetry::init("granary-node");
                let config = NodeConfig {
                    data_dir,
                    s3_listen,
                    kv_listen,
                    admin_listen,
                    rpc_listen,
                    memory_budget,
                    client_stall_timeout_secs,
                    direct_io,
                    cold_tier,
                    cold_tier_period_secs,
                    cold_tier_timeout_secs,
                    cold_tier_orphan_grace_secs,
                    cold_tier_rate,
                    ..NodeConfig::default()
                };
                if nodes > 1 {
                    dev_cluster::run(config, nodes).await
                } else {
                    dev(config).await
                }
            }
            Cmd::Serve { config } => {
                let _t = granary_node::telemetry::init("granary-node");
                let config = NodeConfig::load(Some(&config))?;
                let master = load_master_key(&config)?;
                let token = config.admin_token.clone().context("admin_token is required (GRANARY_ADMIN_TOKEN)")?;
                let node = Node::open(config, master, token).await?;
                node.write_endpoints_file()?;
                tracing::info!(s3 = %node.endpoints.s3, kv = %node.endpoints.kv, admin = %node.endpoints.admin, "node serving");
                node.run(shutdown_on_signals()).await
            }
            Cmd::Tenant { admin, cmd } => tenant_cmd(admin, cmd).await,
            Cmd::Key { admin, cmd } => key_cmd(admin, cmd).await,
            Cmd::GenMasterKey => {
                println!("{}", MasterKey::generate().to_base64());
                Ok(())
            }
        }
    })
}

/// Reads `path`, or creates it (mode 0600) with `make()` on first start. The new file
/// is complete and durable (data and name) before the secret is used: a power cut
/// leaves either no file (a new secret next time, none was handed out) or this one. Two
/// starts racing on one data directory agree on one secret: the second reads the first's.
pub(crate) fn read_or_create_secret(
    path: &Path,
    make: impl FnOnce() -> String,
) -> anyhow::Result<String> {
    let read = |path: &Path| {
        std::fs::read_to_string(path)
            .map(|s| s.trim().to_string())
            .with_context(|| format!("reading {}", path.display()))
    };
    match std::fs::read_to_string(path) {
        Ok(s) => Ok(s.trim().to_string()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let v = make();
            match create_new_durable(path, v.as_bytes(), 0o600) {
                Ok(()) => Ok(v),
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => read(path),
                Err(e) => Err(e).with_context(|| format!("writing {}", path.display())),
            }
        }
        Err(e) => Err(e).with_context(|| format!("reading {}", path.display())),
    }
}

/// 24 random bytes, hex: an admin token or a cluster secret.
pub(crate) fn random_token() -> String {
    let mut b = [0u8; 24];
    rand::rng().fill_bytes(&mut b);
    hex::encode(b)
}

async fn dev(mut config: NodeConfig) -> anyhow::Result<()> {
    // The data directory's own name must survive a power cut, or the next start mints
    // new credentials in an empty directory.
    create_dir_all_durable(&config.data_dir)
        .with_context(|| format!("creating data directory {}", config.data_dir.display()))?;
    let master = MasterKey::from_base64(&read_or_create_secret(
        &config.data_dir.join("master.key"),
        || MasterKey::generate().to_base64(),
    )?)?;
    let token = read_or_create_secret(&config.data_dir.join("admin.token"), random_token)?;
    config.admin_token = Some(token.clone());
    config.cluster_secret = Some(read_or_create_secret(
        &config.data_dir.join("cluster.secret"),
        random_token,
    )?);
    // One node: every partition has one replica, and that is all there can be.
    config.replication_factor = 1;
    let node = Node::open(config, master, token).await?;
    let (tenant, key, secret) = dev_tenant(node.catalog.as_ref()).await?;
    node.write_endpoints_file()?;
    let e = &node.endpoints;
    println!(
        "Granary dev node is running (data in {dir}).\n\
         \n  S3 endpoint     http://{s3}   (region {region}; virtual-host style: http://BUCKET.localhost:{port})\
         \n  KV endpoint     http://{kv}/kv/v1/\
         \n  Admin API       http://{admin}/admin/v1/   (token in {dir}/admin.token)\
         \n  Tenant          {tenant}\
         \n  Access key id   {key}\
         \n  Secret key      {secret}\
         \n\nTry:\n  export AWS_ACCESS_KEY_ID={key} AWS_SECRET_ACCESS_KEY='{secret}' AWS_DEFAULT_REGION={region}\
         \n  aws --endpoint-url http://{s3} s3 mb s3://demo\n",
        dir = node.config.data_dir.display(),
        s3 = e.s3,
        port = e.s3.port(),
        kv = e.kv,
        admin = e.admin,
        region = node.config.region,
    );
    node.run(shutdown_on_signals()).await
}

/// The dev tenant and a live key of it, created on first start and reused after.
pub(crate) async fn dev_tenant(catalog: &dyn Catalog) -> anyhow::Result<(String, String, String)> {
    let name = "default";
    let t = match catalog.tenant_by_name(name).await? {
        Some(t) => t,
        None => catalog.create_tenant(name, &TenantSpec::default()).await?,
    };
    for k in catalog.list_access_keys(t.id).await? {
        if k.revoked_at.is_none()
            && let Some(c) = catalog.lookup_access_key(&k.access_key_id).await?
        {
            return Ok((t.name, c.access_key_id, c.secret_access_key));
        }
    }
    let c = catalog.create_access_key(t.id, "dev default key").await?;
    Ok((t.name, c.access_key_id, c.secret_access_key))
}

struct AdminClient {
    base: String,
    token: String,
    http: reqwest::Client,
}

impl AdminClient {
    fn new(a: AdminArgs) -> anyhow::Result<Self> {
        let token = match a.admin_token {
            Some(t) => t,
            None => std::fs::read_to_string("./granary-data/admin.token")
                .map(|s| s.trim().to_string())
                .context("no admin token: pass --admin-token or set GRANARY_ADMIN_TOKEN")?,
        };
        Ok(Self {
            base: a.admin_url.trim_end_matches('/').to_string(),
            token,
            http: reqwest::Client::new(),
        })
    }

    async fn call(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<serde_json::Value>,
    ) -> anyhow::Result<()> {
        let mut req = self
            .http
            .request(method, format!("{}/admin/v1{path}", self.base))
            .bearer_auth(&self.token);
        if let Some(b) = body {
            req = req.json(&b);
        }
        let resp = req
            .send()
            .await
            .with_context(|| format!("cannot reach the admin API at {}", self.base))?;
        let status = resp.status();
        let text = resp.text().await?;
        if !status.is_success() {
            bail!("{status}: {text}");
        }
        if !text.is_empty() {
            let v: serde_json::Value = serde_json::from_str(&text)?;
            println!("{}", serde_json::to_string_pretty(&v)?);
        }
        Ok(())
    }
}

fn parse_spec(s: Option<&str>) -> anyhow::Result<serde_json::Value> {
    let v: serde_json::Value = match s {
        Some(s) => serde_json::from_str(s).context("--spec must be JSON")?,
        None => serde_json::json!({}),
    };
    // Types are checked here, for a clearer message than the server's; fields this
    // binary does not know are left to the server, which may be newer and refuses the
    // ones it does not know either.
    serde_json::from_value::<TenantSpec>(v.clone()).context("--spec")?;
    Ok(v)
}

async fn tenant_cmd(a: AdminArgs, cmd: TenantCmd) -> anyhow::Result<()> {
    use reqwest::Method;
    let c = AdminClient::new(a)?;
    match cmd {
        TenantCmd::Create { name, spec } => {
            let mut body = parse_spec(spec.as_deref())?;
            body["name"] = serde_json::json!(name);
            c.call(Method::POST, "/tenants", Some(body)).await
        }
        TenantCmd::List => c.call(Method::GET, "/tenants", None).await,
        TenantCmd::Get { name } => c.call(Method::GET, &format!("/tenants/{name}"), None).await,
        TenantCmd::Update { name, spec } => {
            c.call(
                Method::PUT,
                &format!("/tenants/{name}"),
                Some(parse_spec(Some(&spec))?),
            )
            .await
        }
        TenantCmd::Delete { name, purge } => {
            c.call(
                Method::DELETE,
                &format!("/tenants/{name}?purge={purge}"),
                None,
            )
            .await
        }
    }
}

async fn key_cmd(a: AdminArgs, cmd: KeyCmd) -> anyhow::Result<()> {
    use reqwest::Method;
    let c = AdminClient::new(a)?;
    match cmd {
        KeyCmd::Create {
            tenant,
            description,
        } => {
            c.call(
                Method::POST,
                &format!("/tenants/{tenant}/keys"),
                Some(serde_json::json!({"description": description})),
            )
            .await
        }
        KeyCmd::List { tenant } => {
            c.call(Method::GET, &format!("/tenants/{tenant}/keys"), None)
                .await
        }
        KeyCmd::Revoke {
            tenant,
            access_key_id,
        } => {
            c.call(
                Method::DELETE,
                &format!("/tenants/{tenant}/keys/{access_key_id}"),
                None,
            )
            .await
        }
    }
}
