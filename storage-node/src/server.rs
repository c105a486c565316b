//! Wires a node together: engine, catalog, model, front ends and listeners, and
//! shuts it down gracefully (stop accepting, finish in-flight requests, flush).

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use s3s::service::S3ServiceBuilder;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tracing::Instrument;

use crate::catalog::{Catalog, MasterKey, NodeRecord, SqlCatalog};
use crate::config::NodeConfig;
use crate::engine::Engine;
use crate::model::Store;
use crate::s3::{GranaryS3, TenantKeys};
use crate::telemetry::{Metrics, OpSlot};
use crate::tenancy::Authenticator;
use crate::types::{NodeId, now_millis};
use crate::{admin, kv};

/// How long in-flight requests get to finish after a shutdown signal.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(30);
/// Largest request head (request line and headers) accepted by the S3 listener.
const MAX_HEAD_BYTES: usize = 64 * 1024;

pub struct Endpoints {
    pub s3: SocketAddr,
    pub kv: SocketAddr,
    pub admin: SocketAddr,
}

/// A node whose listeners are bound; `run` serves until `shutdown` flips to true.
pub struct Node {
    pub config: NodeConfig,
    pub store: Store,
    pub catalog: Arc<SqlCatalog>,
    pub endpoints: Endpoints,
    listeners: (TcpListener, TcpListener, TcpListener),
    metrics: Arc<Metrics>,
    auth: Authenticator,
    admin_token: String,
}

pub fn load_master_key(c: &NodeConfig) -> anyhow::Result<MasterKey> {
    if let Some(k) = &c.master_key {
        return MasterKey::from_base64(k).context("master_key");
    }
    if let Some(p) = &c.master_key_file {
        let text = std::fs::read_to_string(p)
            .with_context(|| format!("reading master key file {}", p.display()))?;
        return MasterKey::from_base64(&text)
            .with_context(|| format!("master key file {}", p.display()));
    }
    anyhow::bail!(
        "no master key: set master_key or master_key_file (GRANARY_MASTER_KEY / GRANARY_MASTER_KEY_FILE)"
    )
}

impl Node {
    pub async fn open(
        config: NodeConfig,
        master: MasterKey,
        admin_token: String,
    ) -> anyhow::Result<Self> {
        config.validate()?;
        crate::engine::dirs::create_dir_all_durable(&config.data_dir)
            .with_context(|| format!("creating data directory {}", config.data_dir.display()))?;
        let engine =
            Engine::open(&config.data_dir.join("engine")).context("opening the storage engine")?;
        let catalog = Arc::new(
            SqlCatalog::connect(&config.catalog_url(), master)
                .await
                .context("opening the catalog")?,
        );
        // The partition count is the cluster's, fixed at first start.
        let partitions: u16 = catalog
            .setting_or_init("partitions", &config.partitions.to_string())
            .await?
            .parse()
            .context("stored partition count")?;
        if partitions != config.partitions {
            tracing::warn!(
                configured = config.partitions,
                stored = partitions,
                "partition count is fixed at cluster creation; using the stored value"
            );
        }
        let dyn_catalog: Arc<dyn Catalog> = catalog.clone();
        let store = Store::new(engine, dyn_catalog.clone(), partitions);
        let indexed = store.kv_backfill_expiry_index().await?;
        if indexed > 0 {
            tracing::info!(
                keys = indexed,
                "indexed KV values with a TTL for the expiry sweep"
            );
        }
        let swept = store.sweep_orphan_chunks().await?;
        if swept > 0 {
            tracing::info!(
                files = swept,
                "removed unreferenced chunk files left by an earlier stop"
            );
        }
        let bind = |a: SocketAddr, what: &'static str| async move {
            TcpListener::bind(a)
                .await
                .with_context(|| format!("binding the {what} listener on {a}"))
        };
        let s3 = bind(config.s3_listen, "S3").await?;
        let kvl = bind(config.kv_listen, "KV").await?;
        let adm = bind(config.admin_listen, "admin").await?;
        let endpoints = Endpoints {
            s3: s3.local_addr()?,
            kv: kvl.local_addr()?,
            admin: adm.local_addr()?,
        };
        let node = NodeRecord {
            id: NodeId(config.node_id.clone()),
            region: config.region.clone(),
            zone: config.zone.clone(),
            s3_addr: config
                .advertise_s3
                .clone()
                .unwrap_or_else(|| endpoints.s3.to_string()),
            kv_addr: config
                .advertise_kv
                .clone()
                .unwrap_or_else(|| endpoints.kv.to_string()),
            admin_addr: config
                .advertise_admin
                .clone()
                .unwrap_or_else(|| endpoints.admin.to_string()),
            rpc_addr: String::new(),
            heartbeat_at: now_millis(),
        };
        catalog.upsert_node(&node).await?;
        let auth = Authenticator::new(dyn_catalog);
        Ok(Self {
            config,
            store,
            catalog,
            endpoints,
            listeners: (s3, kvl, adm),
            metrics: Arc::new(Metrics::default()),
            auth,
            admin_token,
        })
    }

    /// Writes `endpoints.json` into the data directory (for scripts and tests).
    pub fn write_endpoints_file(&self) -> anyhow::Result<()> {
        let e = &self.endpoints;
        let body = serde_json::json!({
            "s3": format!("http://{}", e.s3),
            "kv": format!("http://{}", e.kv),
            "admin": format!("http://{}", e.admin),
            "pid": std::process::id(),
        });
        // Temporary file, fsync, rename, directory fsync: after a power cut the file
        // names this run, not an older one.
        crate::engine::dirs::write_file_durable(
            &self.config.data_dir.join("endpoints.json"),
            &serde_json::to_vec_pretty(&body)?,
            0o644,
        )?;
        Ok(())
    }

    pub async fn run(self, shutdown: watch::Receiver<bool>) -> anyhow::Result<()> {
        let Node {
            config,
            store,
            catalog,
            listeners,
            metrics,
            auth,
            admin_token,
            ..
        } = self;
        let ready = Arc::new(AtomicBool::new(false));

        let mut builder = S3ServiceBuilder::new(GranaryS3::new(
            store.clone(),
            auth.clone(),
            config.region.clone(),
        ));
        builder.set_auth(TenantKeys(auth.clone()));
        builder.set_host(crate::s3::Domains(config.s3_domains.clone()));
        let s3 = Arc::new(builder.build());

        let kv_router = kv::router(kv::KvState {
            store: store.clone(),
            auth: auth.clone(),
            metrics: metrics.clone(),
        });
        let node_info = serde_json::json!({
            "nodeId": config.node_id, "region": config.region, "zone": config.zone,
            "version": env!("CARGO_PKG_VERSION"), "apiVersion": "v1",
        });
        let admin_router = admin::router(admin::AdminState {
            store: store.clone(),
            auth,
            metrics: metrics.clone(),
            token: admin_token.into(),
            ready: ready.clone(),
            node: Arc::new(node_info),
        });

        let signal = |mut rx: watch::Receiver<bool>| async move {
            let _ = rx.wait_for(|v| *v).await;
        };
        let kv_task = tokio::spawn(
            axum::serve(listeners.1, kv_router)
                .with_graceful_shutdown(signal(shutdown.clone()))
                .into_future(),
        );
        let admin_task = tokio::spawn(
            axum::serve(listeners.2, admin_router)
                .with_graceful_shutdown(signal(shutdown.clone()))
                .into_future(),
        );
        let sweeper = tokio::spawn(housekeeping(store.clone(), shutdown.clone()));
        ready.store(true, Ordering::Relaxed);
        serve_s3(listeners.0, s3, metrics, shutdown.clone()).await;
        let _ = tokio::time::timeout(DRAIN_TIMEOUT, async {
            let _ = kv_task.await;
            let _ = admin_task.await;
            let _ = sweeper.await;
        })
        .await;
        store.engine().shutdown().await;
        catalog.close().await;
        tracing::info!("node stopped");
        Ok(())
    }
}

async fn serve_s3(
    listener: TcpListener,
    s3: Arc<s3s::service::S3Service>,
    metrics: Arc<Metrics>,
    mut shutdown: watch::Receiver<bool>,
) {
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    let mut http = hyper::server::conn::http1::Builder::new();
    http.max_buf_size(MAX_HEAD_BYTES).keep_alive(true);
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let stream = match accepted {
                    Ok((s, _)) => s,
                    Err(e) => {
                        tracing::warn!(error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                };
                let _ = stream.set_nodelay(true);
                let (s3, metrics) = (s3.clone(), metrics.clone());
                let service = hyper::service::service_fn(move |req: http::Request<Incoming>| {
                    let (s3, metrics) = (s3.clone(), metrics.clone());
                    async move {
                        let started = Instant::now();
                        let slot = OpSlot::default();
                        let span = tracing::info_span!("s3", front = "s3", method = %req.method(),
                            operation = tracing::field::Empty, tenant = tracing::field::Empty,
                            bucket = tracing::field::Empty, status = tracing::field::Empty, bytes = tracing::field::Empty);
                        let (parts, body) = req.into_parts();
                        let mut req = http::Request::from_parts(parts, s3s::Body::from(body));
                        req.extensions_mut().insert(slot.clone());
                        let resp = s3.call(req).instrument(span.clone()).await;
                        let status = resp.as_ref().map(|r| r.status().as_u16()).unwrap_or(500);
                        span.record("status", status);
                        metrics.observe("s3", slot.get(), status, started);
                        resp
                    }
                });
                let conn = http.serve_connection(TokioIo::new(stream), service);
                let fut = graceful.watch(conn);
                tokio::spawn(async move {
                    if let Err(e) = fut.await {
                        tracing::debug!(error = %e, "S3 connection ended with an error");
                    }
                });
            }
            _ = shutdown.wait_for(|v| *v) => break,
        }
    }
    drop(listener);
    if tokio::time::timeout(DRAIN_TIMEOUT, graceful.shutdown())
        .await
        .is_err()
    {
        tracing::warn!("in-flight S3 requests did not finish within {DRAIN_TIMEOUT:?}");
    }
}

/// How often the node's housekeeping runs.
const HOUSEKEEPING_EVERY: Duration = Duration::from_secs(5);

/// Longest a read may keep replaced or deleted object data on disk. A client that stops
/// reading a response would otherwise hold that space for as long as it keeps the
/// connection open.
const MAX_READ_PIN: Duration = Duration::from_secs(30 * 60);

/// Every [`HOUSEKEEPING_EVERY`] until shutdown: removes expired KV values (they read as
/// absent at once) and data that stalled readers have held for [`MAX_READ_PIN`].
async fn housekeeping(store: Store, mut shutdown: watch::Receiver<bool>) {
    let mut tick = tokio::time::interval(HOUSEKEEPING_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = shutdown.wait_for(|v| *v) => return,
        }
        match store.kv_sweep_expired().await {
            Ok(0) => {}
            Ok(n) => tracing::debug!(keys = n, "removed expired KV values"),
            Err(e) => tracing::warn!(error = %e, "KV expiry sweep failed; retrying later"),
        }
        let n = store.engine().chunks().remove_long_pinned(MAX_READ_PIN);
        if n > 0 {
            tracing::warn!(
                files = n,
                "removed replaced object data that stalled reads held for over 30 minutes"
            );
        }
    }
}

/// A watch channel that flips to true on SIGINT or SIGTERM.
pub fn shutdown_on_signals() -> watch::Receiver<bool> {
    let (tx, rx) = watch::channel(false);
    tokio::spawn(async move {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(s) => s,
                Err(e) => {
                    tracing::error!(error = %e, "cannot listen for SIGTERM");
                    return;
                }
            };
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
        tracing::info!("shutdown requested; finishing in-flight requests");
        let _ = tx.send(true);
    });
    rx
}
