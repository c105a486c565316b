//! Wires a node together: engine, catalog, model, front ends and listeners, and
//! shuts it down gracefully (stop accepting, finish in-flight requests, flush).

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::Context as _;
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use s3s::service::S3ServiceBuilder;
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::catalog::{Backend, Catalog, MasterKey, NodeRecord, SqlCatalog};
use crate::cluster::forward::Forwarder;
use crate::cluster::{Cluster, ClusterConfig, Thresholds};
use crate::config::NodeConfig;
use crate::engine::Engine;
use crate::model::{Store, SweepOutcome};
use crate::s3::{GranaryS3, TenantKeys};
use crate::telemetry::Metrics;
use crate::tenancy::Authenticator;
use crate::types::{NodeId, now_millis};
use crate::{admin, kv};

mod stall;

/// How long in-flight requests get to finish after a shutdown signal.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(30);
/// Largest request head (request line and headers) accepted by the S3 listener.
const MAX_HEAD_BYTES: usize = 64 * 1024;

pub struct Endpoints {
    pub s3: SocketAddr,
    pub kv: SocketAddr,
    pub admin: SocketAddr,
    pub rpc: SocketAddr,
}

/// A node whose listeners are bound; `run` serves until `shutdown` flips to true.
pub struct Node {
    pub config: NodeConfig,
    pub store: Store,
    pub catalog: Arc<SqlCatalog>,
    pub endpoints: Endpoints,
    pub cluster: Cluster,
    listeners: (TcpListener, TcpListener, TcpListener, TcpListener),
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
        if let Some(url) = &config.cold_tier {
            let cold = crate::cold::ColdTier::open(&crate::cold::ColdConfig {
                url: url.clone(),
                options: config
                    .cold_tier_options
                    .iter()
                    .map(|(k, v)| (k.clone(), v.clone()))
                    .collect(),
                timeout: Duration::from_secs(config.cold_tier_timeout_secs),
                delete_grace: Duration::from_secs(config.cold_tier_orphan_grace_secs.min(60)),
                retire_grace: Duration::from_secs(config.cold_tier_orphan_grace_secs),
            })
            .map_err(|e| anyhow::anyhow!(e))?;
            tracing::info!(url = %cold.url, "cold tier configured");
            store.set_cold_tier(Arc::new(cold));
        }
        let indexed = store.kv_backfill_expiry_index().await?;
        if indexed > 0 {
            tracing::info!(
                keys = indexed,
                "indexed KV values with a TTL for the expiry sweep"
            );
        }
        let indexed = store.index_uploads().await?;
        if indexed > 0 {
            tracing::info!(
                uploads = indexed,
                "indexed multipart uploads for listing and expiry"
            );
        }
        let metrics = Arc::new(Metrics::default());
        let incomplete = store.engine().partitions_importing().await?;
        if !incomplete.is_empty() {
            tracing::error!(
                partitions = ?incomplete.iter().map(|p| p.0).collect::<Vec<_>>(),
                "partitions whose snapshot import did not finish: their data here is incomplete \
                 and must be fetched again from a replica"
            );
        }
        match store.sweep_orphan_chunks().await? {
            SweepOutcome::Removed(0) => {}
            SweepOutcome::Removed(n) => tracing::info!(
                files = n,
                "removed unreferenced chunk files left by an earlier stop"
            ),
            SweepOutcome::Aborted { table, key, reason } => {
                metrics.orphan_sweep_aborted.inc();
                tracing::error!(
                    table,
                    key = %key,
                    reason = %reason,
                    "orphan chunk sweep aborted, no file removed: a metadata record cannot be \
                     read, so which chunk files it references is unknown. The node serves; \
                     reads of that record fail. Restore the record (or delete the object) and \
                     restart to reclaim orphaned space"
                );
            }
        }
        let bind = |a: SocketAddr, what: &'static str| async move {
            TcpListener::bind(a)
                .await
                .with_context(|| format!("binding the {what} listener on {a}"))
        };
        let s3 = bind(config.s3_listen, "S3").await?;
        let kvl = bind(config.kv_listen, "KV").await?;
        let adm = bind(config.admin_listen, "admin").await?;
        let rpc = bind(config.rpc_listen, "RPC").await?;
        let endpoints = Endpoints {
            s3: s3.local_addr()?,
            kv: kvl.local_addr()?,
            admin: adm.local_addr()?,
            rpc: rpc.local_addr()?,
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
            rpc_addr: config
                .advertise_rpc
                .clone()
                .unwrap_or_else(|| endpoints.rpc.to_string()),
            heartbeat_at: now_millis(),
            capacity: config.capacity.max(1),
        };
        if config.advertise_rpc.is_none() && endpoints.rpc.ip().is_unspecified() {
            anyhow::bail!(
                "rpc_listen {} is a wildcard address: set advertise_rpc to the address peers \
                 reach this node at",
                config.rpc_listen
            );
        }
        if config.cluster_secret.is_none() {
            tracing::warn!(
                "no cluster_secret: the RPC port refuses every peer and peers are judged by \
                 catalog heartbeats alone"
            );
        }
        let catalog_url = config.catalog_url();
        let cluster = Cluster::new(
            ClusterConfig {
                me: node,
                partitions,
                replication_factor: config.replication_factor,
                bootstrap_expect: config.bootstrap_expect,
                interval: Duration::from_millis(config.heartbeat_interval_ms),
                thresholds: Thresholds {
                    suspect_after: Duration::from_millis(config.suspect_after_ms),
                    fail_after: Duration::from_millis(config.fail_after_ms),
                },
                secret: config.cluster_secret.as_deref().map(Arc::from),
                listen_url: (catalog.backend() == Backend::Postgres).then_some(catalog_url),
            },
            dyn_catalog.clone(),
            metrics.clone(),
        );
        let auth = Authenticator::new(dyn_catalog);
        {
            let t = &auth.limits().metrics;
            let mut r = metrics
                .registry
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            r.register(
                "tenant_requests",
                "Requests admitted, by tenant",
                t.requests.clone(),
            );
            r.register(
                "tenant_bytes",
                "Body bytes written and answered, by tenant",
                t.bytes.clone(),
            );
            r.register(
                "tenant_throttled",
                "Requests refused for a tenant rate limit, by tenant and limit",
                t.throttled.clone(),
            );
            r.register(
                "tenant_quota_refused",
                "Writes refused for a tenant quota, by tenant and quota",
                store.quotas().refused.clone(),
            );
            r.register(
                "tenant_queue_wait_seconds",
                "Time spent waiting for the I/O scheduler, by tenant",
                store.io_scheduler().waited.clone(),
            );
            r.register(
                "background_io_bytes",
                "Background work admitted by the I/O scheduler at its low weight: bytes of \
                 partition snapshots streamed to replicas, and a cost per record for the \
                 expiry sweeps",
                store.io_scheduler().background.clone(),
            );
        }
        Ok(Self {
            config,
            store,
            catalog,
            endpoints,
            cluster,
            listeners: (s3, kvl, adm, rpc),
            metrics,
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
            "rpc": format!("http://{}", e.rpc),
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
            cluster,
            listeners,
            metrics,
            auth,
            admin_token,
            ..
        } = self;
        // Registered, heartbeating and holding a layout before any listener answers.
        let cluster_task = cluster.start(shutdown.clone()).await?;
        // The nodes share every tenant's rate limits by demand (tenancy::rate): each
        // heartbeat interval this node's counts go out with its probe answers, and the
        // peers' come in from theirs; N is the nodes not failed.
        tokio::spawn({
            let (cluster, limits, mut shutdown) =
                (cluster.clone(), auth.limits().clone(), shutdown.clone());
            let every = Duration::from_millis(config.heartbeat_interval_ms.max(100));
            async move {
                loop {
                    let serving = cluster
                        .nodes()
                        .iter()
                        .filter(|v| v.state != crate::cluster::NodeState::Failed)
                        .count();
                    limits.set_nodes(u32::try_from(serving).unwrap_or(u32::MAX));
                    // The demand travels in the probe answers (`Demand::to_wire`).
                    cluster.set_local_demand(crate::tenancy::rate::Demand::to_wire(
                        limits.roll_demand(),
                    ));
                    let (peers, known) = cluster.peer_demand();
                    let demand = crate::tenancy::rate::Demand::from_wire(peers);
                    limits.set_peer_demand(demand, known);
                    tokio::select! {
                        _ = tokio::time::sleep(every) => {}
                        _ = shutdown.wait_for(|v| *v) => return,
                    }
                }
            }
        });
        let replicator = crate::cluster::replication::Replicator::new(
            cluster.clone(),
            store.engine().clone(),
            config.min_in_sync.unwrap_or(1) as usize,
            Duration::from_millis(config.suspect_after_ms),
        );
        replicator.take_up(Duration::from_secs(5)).await;
        let replication_task = tokio::spawn(replicator.clone().run(shutdown.clone()));
        // From now on a bucket or namespace is served only by its partition's primary.
        {
            let cluster = cluster.clone();
            let replicator = replicator.clone();
            store.set_partition_guard(Arc::new(move |p| match cluster.route(p) {
                crate::cluster::Route::Local if replicator.serving(p) => None,
                crate::cluster::Route::Local => Some(format!(
                    "partition {p} is being taken up by this node (checked against its \
                     replicas first); retry"
                )),
                crate::cluster::Route::Remote { node, .. } => Some(format!(
                    "partition {p} is led by node {}, not this one; retry",
                    node.0
                )),
                crate::cluster::Route::Unavailable(why) => Some(why),
            }));
        }
        {
            let replicator = replicator.clone();
            store.set_write_guard(Arc::new(move |p| replicator.refuse_write(p)));
        }
        // Chunk files reach the replicas while their upload still runs.
        store.set_chunk_hook(replicator.chunk_hook());
        store.set_barrier({
            let replicator = replicator.clone();
            Arc::new(move |at| {
                let replicator = replicator.clone();
                Box::pin(async move { replicator.barrier(&at, Duration::from_secs(600)).await })
            })
        });
        store.set_remote_reader(crate::cluster::rpc::remote_reader(cluster.clone()));
        store.io_scheduler().set_slots(config.io_slots as usize);
        crate::engine::set_direct_io(config.direct_io);
        // Quotas are decided by each tenant's authority, against cluster-wide usage.
        store
            .quotas()
            .set_measure(crate::cluster::rpc::quota_measure(
                cluster.clone(),
                store.downgrade(),
            ));
        store
            .quotas()
            .set_authority(crate::cluster::rpc::quota_authority(cluster.clone()));

        let ready = Arc::new(AtomicBool::new(false));

        let granary_s3 = GranaryS3::new(store.clone(), auth.clone(), config.region.clone());
        let mut builder = S3ServiceBuilder::new(granary_s3.clone());
        builder.set_auth(TenantKeys(auth.clone()));
        builder.set_host(crate::s3::Domains(config.s3_domains.clone()));
        builder.set_config(Arc::new(s3s::config::StaticConfigProvider::new(Arc::new(
            s3_limits(),
        ))));
        let s3 = Arc::new(builder.build());
        let forwarder = Forwarder::new(
            cluster.clone(),
            auth.clone(),
            metrics.clone(),
            config.max_forwards_per_peer.max(1) as usize,
        );
        // Longest a request waits for its writes to reach the in-sync replicas (a replica
        // that stops answering leaves the in-sync set within suspect_after, which ends
        // the wait sooner; this bounds a slow one).
        let barrier_wait = Duration::from_secs(600);
        // One memory budget for the whole node: KV bodies, values and pages, and the S3
        // XML bodies s3s reads whole.
        let budget = crate::tenancy::budget::MemoryBudget::new(config.memory_budget);
        let s3_front = crate::s3::front::S3Front::new(
            s3,
            metrics.clone(),
            forwarder.clone(),
            config.s3_domains.clone(),
            (replicator.clone(), barrier_wait),
            budget.clone(),
            granary_s3,
        );

        let kv_state = kv::KvState {
            region: config.region.clone(),
            store: store.clone(),
            auth: auth.clone(),
            metrics: metrics.clone(),
            budget,
            forwarder: forwarder.clone(),
            replication: (replicator.clone(), barrier_wait),
        };
        let kv_router = kv::router(kv_state.clone());
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
            cluster: cluster.clone(),
            replicator: replicator.clone(),
        });

        let signal = |mut rx: watch::Receiver<bool>| async move {
            let _ = rx.wait_for(|v| *v).await;
        };
        // Small answers go out at once: without TCP_NODELAY, Nagle's algorithm holds a
        // response's second write until the first is acknowledged, and the client's
        // delayed ACK makes that 40 ms (seen on every forwarded KV request).
        use axum::serve::ListenerExt;
        let nodelay = |l: TcpListener| {
            l.tap_io(|tcp| {
                let _ = tcp.set_nodelay(true);
            })
        };
        // The client-facing ports: a client that stops sending its request's head, or
        // stops reading its answer, is disconnected (server/stall.rs).
        let stall = Duration::from_secs(config.client_stall_timeout_secs);
        let kv_task = tokio::spawn(serve_http(
            "KV",
            listeners.1,
            move || hyper_util::service::TowerToHyperService::new(kv_router.clone()),
            stall,
            shutdown.clone(),
        ));
        let admin_task = tokio::spawn(
            axum::serve(nodelay(listeners.2), admin_router)
                .with_graceful_shutdown(signal(shutdown.clone()))
                .into_future(),
        );
        let rpc_task = tokio::spawn(
            axum::serve(
                nodelay(listeners.3),
                crate::cluster::rpc::router(
                    crate::cluster::rpc::RpcState::new(cluster, store.engine().clone())
                        .with_fronts(s3_front.clone(), kv_state, store.clone())
                        .with_replicator(replicator),
                ),
            )
            .with_graceful_shutdown(signal(shutdown.clone()))
            .into_future(),
        );
        let upload_max_age = (config.multipart_upload_max_age_secs > 0)
            .then(|| Duration::from_secs(config.multipart_upload_max_age_secs));
        let sweeper = tokio::spawn(housekeeping(
            store.clone(),
            metrics.clone(),
            upload_max_age,
            shutdown.clone(),
        ));
        let mover = tokio::spawn(cold_mover(
            store.clone(),
            metrics.clone(),
            ColdSchedule::of(&config),
            shutdown.clone(),
        ));
        ready.store(true, Ordering::Relaxed);
        let s3 = move || {
            let front = s3_front.clone();
            hyper::service::service_fn(move |req: http::Request<stall::Body<Incoming>>| {
                let front = front.clone();
                async move {
                    let (parts, body) = req.into_parts();
                    let req = http::Request::from_parts(parts, s3s::Body::http_body_unsync(body));
                    Ok::<_, std::convert::Infallible>(front.handle(req).await)
                }
            })
        };
        serve_http("S3", listeners.0, s3, stall, shutdown.clone()).await;
        let _ = tokio::time::timeout(DRAIN_TIMEOUT, async {
            let _ = kv_task.await;
            let _ = admin_task.await;
            let _ = rpc_task.await;
            let _ = sweeper.await;
            let _ = mover.await;
            let _ = cluster_task.await;
            let _ = replication_task.await;
        })
        .await;
        store.engine().shutdown().await;
        catalog.close().await;
        tracing::info!("node stopped");
        Ok(())
    }
}

/// Serves HTTP/1.1 on `listener` with a service from `service` per connection until
/// `shutdown`, then lets the requests in flight finish (at most [`DRAIN_TIMEOUT`]). A
/// request head must arrive whole within `stall` of the connection being idle (so idle
/// keep-alive connections and heads that trickle in are closed), a body whose next piece
/// is awaited for `stall` fails, and a write that waits `stall` for the client to read
/// ends the connection.
async fn serve_http<S, B>(
    what: &'static str,
    listener: TcpListener,
    service: impl Fn() -> S + Send,
    stall: Duration,
    mut shutdown: watch::Receiver<bool>,
) where
    S: hyper::service::Service<http::Request<stall::Body<Incoming>>, Response = http::Response<B>>
        + Send
        + 'static,
    S::Future: Send + 'static,
    S::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    B: http_body::Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    let mut http = hyper::server::conn::http1::Builder::new();
    http.max_buf_size(MAX_HEAD_BYTES)
        .keep_alive(true)
        .timer(hyper_util::rt::TokioTimer::new())
        .header_read_timeout(stall);
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let stream = match accepted {
                    Ok((s, _)) => s,
                    Err(e) => {
                        // Out of file descriptors, say: wait rather than spin.
                        tracing::warn!(error = %e, "{what} accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                };
                // Small answers go out at once (no Nagle delay behind the client's
                // delayed ACK).
                let _ = stream.set_nodelay(true);
                stall::limit_unsent(&stream);
                let stream = stall::Guarded::new(stream, stall);
                let svc = service();
                // Bodies whose client goes quiet fail after `stall` (stall::Body).
                let svc = hyper::service::service_fn(move |req: http::Request<Incoming>| {
                    svc.call(req.map(|b| stall::Body::new(b, stall)))
                });
                let conn = http.serve_connection(TokioIo::new(stream), svc);
                let fut = graceful.watch(conn);
                tokio::spawn(async move {
                    if let Err(e) = fut.await {
                        tracing::debug!(error = %e, "{what} connection ended with an error");
                    }
                });
            }
            () = async {
                let _ = shutdown.wait_for(|v| *v).await;
            } => break,
        }
    }
    drop(listener);
    if tokio::time::timeout(DRAIN_TIMEOUT, graceful.shutdown())
        .await
        .is_err()
    {
        tracing::warn!("in-flight {what} requests did not finish within {DRAIN_TIMEOUT:?}");
    }
}

/// Limits on what s3s buffers in memory. XML bodies (DeleteObjects: 1000 keys of up
/// to 1 KiB; CompleteMultipartUpload: 10 000 parts with checksums) stay well under
/// 4 MiB; POST Object is refused before s3s sees it ([`refuse_before_body`]), and its
/// limits are set low in case a request ever gets through.
fn s3_limits() -> s3s::config::S3Config {
    let mut c = s3s::config::S3Config::default();
    c.xml_max_body_size = crate::s3::front::XML_MAX;
    c.post_object_max_file_size = 0;
    c.form_max_field_size = 16 * 1024;
    c.form_max_fields_size = 64 * 1024;
    c.form_max_parts = 32;
    c
}

/// How often the node's housekeeping runs.
const HOUSEKEEPING_EVERY: Duration = Duration::from_secs(5);

/// Longest a read may keep replaced or deleted object data on disk. A client that stops
/// reading a response would otherwise hold that space for as long as it keeps the
/// connection open.
const MAX_READ_PIN: Duration = Duration::from_secs(30 * 60);

/// Every [`HOUSEKEEPING_EVERY`] until shutdown: removes expired KV values (they read as
/// absent at once), aborts multipart uploads older than `upload_max_age` (freeing their
/// parts) and removes data that stalled readers have held for [`MAX_READ_PIN`].
async fn housekeeping(
    store: Store,
    metrics: Arc<Metrics>,
    upload_max_age: Option<Duration>,
    mut shutdown: watch::Receiver<bool>,
) {
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
        if let Some(age) = upload_max_age {
            let cutoff = now_millis().saturating_sub(age.as_millis() as i64);
            match store.expire_uploads(cutoff, 1000).await {
                Ok(0) => {}
                Ok(n) => tracing::info!(uploads = n, "aborted abandoned multipart uploads"),
                Err(e) => {
                    tracing::warn!(error = %e, "multipart upload expiry failed; retrying later")
                }
            }
        }
        // The stored-bytes gauges: a read of every counter row, here rather than at each
        // scrape (anyone who reaches the admin port may scrape).
        match store.engine().usage_total().await {
            Ok(c) => metrics.set_stored(&c),
            Err(e) => tracing::warn!(error = %e, "reading the usage counters for the metrics"),
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

/// When the cold-tier mover runs.
#[derive(Clone, Debug)]
struct ColdSchedule {
    period: Duration,
    orphan_grace: Duration,
    /// Bytes per second at most (0: no limit).
    rate: u64,
}

impl ColdSchedule {
    fn of(c: &NodeConfig) -> Self {
        Self {
            period: Duration::from_secs(c.cold_tier_period_secs.max(1)),
            orphan_grace: Duration::from_secs(c.cold_tier_orphan_grace_secs),
            rate: c.cold_tier_rate,
        }
    }
}

/// How many passes of the mover run between two sweeps of unnamed cold copies (and the
/// first pass sweeps): a sweep lists the whole cold tier.
const COLD_SWEEP_EVERY: u64 = 10;

/// Every period until shutdown (with a cold tier): moves what the lifecycle rules make
/// cold, paced to the configured rate, and now and then deletes cold copies no object
/// names. While the cold tier does not answer, passes back off (up to 16 periods).
async fn cold_mover(
    store: Store,
    metrics: Arc<crate::telemetry::Metrics>,
    schedule: ColdSchedule,
    mut shutdown: watch::Receiver<bool>,
) {
    let Some(cold) = store.cold_tier().cloned() else {
        return;
    };
    match cold.probe().await {
        Ok(()) => {
            tracing::info!(url = %cold.url, "cold tier reachable (a probe object was written, read and deleted)")
        }
        Err(e) => tracing::error!(
            url = %cold.url,
            error = %e,
            "the cold tier failed its start-up probe: check the URL, the bucket and the \
             credentials (cold reads answer 503 and transitions wait until it works)"
        ),
    }
    metrics.cold_tier_reachable.set(i64::from(cold.reachable()));
    let mut pass = 0u64;
    let mut backoff = 1u32;
    let mut last_pass = schedule.period;
    loop {
        // A pass that took the whole period (a full budget) starts the next at once.
        let wait = (schedule.period * backoff).saturating_sub(last_pass.min(schedule.period));
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            _ = shutdown.wait_for(|v| *v) => return,
        }
        let started = tokio::time::Instant::now();
        let budget = match schedule.rate {
            0 => u64::MAX,
            r => r.saturating_mul(schedule.period.as_secs().max(1)),
        };
        let moved = tokio::select! {
            r = store.tier_pass(budget) => r,
            _ = shutdown.wait_for(|v| *v) => return,
        };
        match moved {
            Ok(o) => {
                metrics.cold_moved_objects.inc_by(o.moved);
                metrics.cold_moved_bytes.inc_by(o.moved_bytes);
                metrics.cold_move_failures.inc_by(o.failed);
                metrics.cold_restored_objects.inc_by(o.restored);
                metrics.cold_restored_bytes.inc_by(o.restored_bytes);
                metrics.cold_restore_failures.inc_by(o.restore_failed);
                if o.restored > 0 {
                    tracing::info!(
                        objects = o.restored,
                        bytes = o.restored_bytes,
                        "restored often-read object data from the cold tier"
                    );
                }
                if o.moved > 0 {
                    tracing::info!(
                        objects = o.moved,
                        bytes = o.moved_bytes,
                        "moved object data to the cold tier"
                    );
                }
                // Pace: a pass that moved `budget` bytes early waits out its share.
                let done = o.moved_bytes + o.restored_bytes;
                if schedule.rate > 0 && done > 0 {
                    let due = Duration::from_secs_f64(done as f64 / schedule.rate as f64);
                    if let Some(rest) = due.checked_sub(started.elapsed()) {
                        tokio::time::sleep(rest).await;
                    }
                }
            }
            Err(e) => tracing::warn!(error = %e, "cold-tier pass failed; retrying later"),
        }
        if pass.is_multiple_of(COLD_SWEEP_EVERY) && cold.reachable() {
            match store.sweep_cold_orphans(&cold, schedule.orphan_grace).await {
                Ok(n) => {
                    metrics.cold_orphans_deleted.inc_by(n);
                }
                Err(e) => {
                    tracing::warn!(error = %e, "cold-tier orphan sweep failed; retrying later")
                }
            }
        }
        pass += 1;
        last_pass = started.elapsed();
        let up = cold.reachable();
        metrics.cold_tier_reachable.set(i64::from(up));
        backoff = if up { 1 } else { (backoff * 2).min(16) };
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

#[cfg(test)]
mod tests {
    use bytes::Bytes;
    use redb::ReadableTable;

    use super::*;
    use crate::catalog::TenantSpec;
    use crate::model::{ByteStream, Conditions, ObjectMeta};

    /// Idle connections and heads that never end are closed after the stall timeout,
    /// and a connection that sends its request in time is answered.
    #[tokio::test]
    async fn client_connections_that_send_nothing_are_closed() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (stop, shutdown) = watch::channel(false);
        let service = || {
            hyper::service::service_fn(|_req: http::Request<stall::Body<Incoming>>| async {
                Ok::<_, std::convert::Infallible>(http::Response::new(http_body_util::Full::new(
                    Bytes::from_static(b"hello"),
                )))
            })
        };
        let server = tokio::spawn(serve_http(
            "test",
            listener,
            service,
            Duration::from_millis(300),
            shutdown,
        ));
        let closed_within = |mut c: tokio::net::TcpStream| async move {
            let mut buf = vec![0u8; 1024];
            let mut got = Vec::new();
            loop {
                match tokio::time::timeout(Duration::from_secs(5), c.read(&mut buf)).await {
                    Ok(Ok(0)) | Ok(Err(_)) => return got,
                    Ok(Ok(n)) => got.extend_from_slice(&buf[..n]),
                    Err(_) => panic!("still open: {}", String::from_utf8_lossy(&got)),
                }
            }
        };
        let idle = tokio::net::TcpStream::connect(addr).await.unwrap();
        closed_within(idle).await;
        let mut partial = tokio::net::TcpStream::connect(addr).await.unwrap();
        partial
            .write_all(b"GET / HTTP/1.1\r\nHost: x\r\n")
            .await
            .unwrap();
        closed_within(partial).await;
        // Answered, then idle: closed as well.
        let mut good = tokio::net::TcpStream::connect(addr).await.unwrap();
        good.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .unwrap();
        let answer = closed_within(good).await;
        assert!(
            answer.starts_with(b"HTTP/1.1 200") && answer.ends_with(b"hello"),
            "{}",
            String::from_utf8_lossy(&answer)
        );
        stop.send(true).unwrap();
        server.await.unwrap();
    }

    /// A node on loopback over `dir` with tenant `t` and its bucket `b`, and what it
    /// takes to open it again.
    async fn test_node(
        dir: &std::path::Path,
    ) -> (NodeConfig, MasterKey, String, Node, crate::types::TenantId) {
        let any: SocketAddr = ([127, 0, 0, 1], 0).into();
        let config = NodeConfig {
            data_dir: dir.to_path_buf(),
            s3_listen: any,
            kv_listen: any,
            admin_listen: any,
            rpc_listen: any,
            partitions: 16,
            ..NodeConfig::default()
        };
        let master = MasterKey::generate();
        let token = "t".repeat(16);
        let node = Node::open(config.clone(), master.clone(), token.clone())
            .await
            .unwrap();
        let tenant = node
            .catalog
            .create_tenant("t", &TenantSpec::default())
            .await
            .unwrap()
            .id;
        node.store.create_bucket(tenant, "b").await.unwrap();
        (config, master, token, node, tenant)
    }

    fn chunk_files(node: &Node) -> usize {
        node.store.engine().chunks().list_all().unwrap().len()
    }

    /// Acceptance of the orphan-sweep fix at the level of a whole node: over a store
    /// with one corrupt record, the node starts, deletes no chunk file, counts the
    /// aborted sweep in its metrics, and every other object still reads.
    #[tokio::test]
    async fn a_node_starts_over_a_corrupt_record_and_deletes_no_data() {
        let dir = tempfile::tempdir().unwrap();
        let (config, master, token, node, tenant) = test_node(dir.path()).await;
        for (k, fill) in [("a", 1u8), ("b", 2), ("c", 3)] {
            let body: ByteStream = Box::pin(futures::stream::iter([Ok(Bytes::from(vec![
                fill;
                300_000
            ]))]));
            node.store
                .put_object(
                    tenant,
                    "b",
                    k,
                    body,
                    None,
                    ObjectMeta::default(),
                    Conditions::default(),
                )
                .await
                .unwrap();
        }
        let files = chunk_files(&node);
        assert_eq!(files, 3);
        let b = node.store.bucket(tenant, "b").await.unwrap();
        let key = crate::engine::keys::object_key(node.store.partition(tenant, "b"), b.id, "a");
        node.store
            .engine()
            .write(vec![], move |ctx| {
                let mut t = ctx.txn.open_table(crate::engine::OBJECTS)?;
                let mut v = t.get(key.as_slice())?.map(|v| v.value().to_vec()).unwrap();
                v.truncate(v.len() / 2);
                t.insert(key.as_slice(), v.as_slice())?;
                Ok(())
            })
            .await
            .unwrap();
        node.store.engine().shutdown().await;
        node.catalog.close().await;
        drop(node);

        let node = Node::open(config, master, token).await.unwrap();
        assert_eq!(chunk_files(&node), files, "the sweep deleted data");
        assert_eq!(node.metrics.orphan_sweep_aborted.get(), 1);
        assert!(
            node.metrics
                .render()
                .contains("granary_orphan_sweep_aborted_total 1")
        );
        for (k, fill) in [("b", 2u8), ("c", 3)] {
            let (rec, _, body) = node
                .store
                .get_object(tenant, "b", k, None, &Conditions::default())
                .await
                .unwrap();
            let got: Vec<u8> = futures::StreamExt::collect::<Vec<_>>(body.stream)
                .await
                .into_iter()
                .flat_map(|b| b.unwrap().to_vec())
                .collect();
            assert_eq!(got.len() as u64, rec.size);
            assert!(got.iter().all(|b| *b == fill));
        }
        assert!(node.store.head_object(tenant, "b", "a").await.is_err());
        node.store.engine().shutdown().await;
    }

    /// A data directory as binaries from before record versioning left it (record
    /// tables typed `&[u8]`, bare postcard records): a node opens it, migrates it once,
    /// and every object, upload and KV value reads as before.
    #[tokio::test]
    async fn a_store_from_before_versioning_opens_and_reads() {
        use crate::engine::{KV, OBJECTS, PARTS, UPLOADS};
        use crate::model::kv::KvCondition;
        let dir = tempfile::tempdir().unwrap();
        let (config, master, token, node, tenant) = test_node(dir.path()).await;
        for (k, len) in [("inline", 100usize), ("chunked", 300_000)] {
            let body: ByteStream =
                Box::pin(futures::stream::iter([Ok(Bytes::from(vec![9u8; len]))]));
            node.store
                .put_object(
                    tenant,
                    "b",
                    k,
                    body,
                    None,
                    ObjectMeta::default(),
                    Conditions::default(),
                )
                .await
                .unwrap();
        }
        let up = node
            .store
            .create_upload(tenant, "b", "mp", ObjectMeta::default())
            .await
            .unwrap();
        node.store
            .kv_put(tenant, "ns", b"k", b"v".to_vec(), KvCondition::None, None)
            .await
            .unwrap();
        node.store.engine().shutdown().await;
        node.catalog.close().await;
        drop(node);

        // Rewrite the record tables in the unversioned layout: the version-1 body
        // without its version byte and checksum, under the legacy table type.
        {
            let db = redb::Database::create(dir.path().join("engine").join("meta.redb")).unwrap();
            let txn = db.begin_write().unwrap();
            for def in [OBJECTS, UPLOADS, PARTS, KV] {
                let rows: Vec<(Vec<u8>, Vec<u8>)> = txn
                    .open_table(def)
                    .unwrap()
                    .iter()
                    .unwrap()
                    .map(|e| {
                        let (k, v) = e.unwrap();
                        let body = crate::engine::record::open(v.value()).unwrap().to_vec();
                        (k.value().to_vec(), body)
                    })
                    .collect();
                let name = redb::TableHandle::name(&def).to_string();
                txn.delete_table(def).unwrap();
                let legacy: redb::TableDefinition<&[u8], &[u8]> = redb::TableDefinition::new(&name);
                let mut t = txn.open_table(legacy).unwrap();
                for (k, v) in rows {
                    t.insert(k.as_slice(), v.as_slice()).unwrap();
                }
            }
            // Nor did those binaries have the upload indexes.
            txn.delete_table(crate::engine::UPLOADS_BY_KEY).unwrap();
            txn.delete_table(crate::engine::UPLOADS_BY_AGE).unwrap();
            txn.open_table(crate::engine::META)
                .unwrap()
                .remove("uploads_indexed")
                .unwrap();
            txn.commit().unwrap();
        }

        let node = Node::open(config, master, token).await.unwrap();
        assert_eq!(node.metrics.orphan_sweep_aborted.get(), 0);
        assert_eq!(chunk_files(&node), 1, "the sweep removed live data");
        for (k, len) in [("inline", 100u64), ("chunked", 300_000)] {
            let (rec, _, body) = node
                .store
                .get_object(tenant, "b", k, None, &Conditions::default())
                .await
                .unwrap();
            assert_eq!(rec.size, len);
            let got: Vec<u8> = futures::StreamExt::collect::<Vec<_>>(body.stream)
                .await
                .into_iter()
                .flat_map(|b| b.unwrap().to_vec())
                .collect();
            assert_eq!(got.len() as u64, len);
        }
        let page = node
            .store
            .list_uploads_page(tenant, "b", "", None, None, 10)
            .await
            .unwrap();
        assert_eq!(page.uploads.len(), 1);
        assert_eq!(page.uploads[0].upload_id, up);
        assert_eq!(
            node.store
                .kv_get(tenant, "ns", b"k")
                .await
                .unwrap()
                .unwrap()
                .value,
            b"v"
        );
        node.store.engine().shutdown().await;
    }
}
