//! The internal RPC port (9300): what peers ask of each other. HTTP with bearer
//! authentication by the cluster secret; every route refuses a request without it, and
//! every route refuses everything when the node has no secret configured.
//!
//! Routes: probes (`GET /rpc/v1/ping`), partition snapshots
//! (`GET /rpc/v1/partitions/{p}/snapshot`, streamed, for catch-up and partition moves),
//! forwarded client requests (`/rpc/v1/forward/{s3|kv}`, any method, see [`super::forward`])
//! and a tenant's share of cluster-wide work in the partitions a node leads
//! (`POST /rpc/v1/tenants/{id}/{usage|purge|has-kv}`), quota admissions asked of a
//! tenant's quota authority (`POST /rpc/v1/quota/{id}`), and replication: a partition's
//! log position and digest, shipped log entries and chunk files, and resync requests
//! (`/rpc/v1/partitions/{p}/{position|digest|log|chunks|resync}`; docs/cluster.md).

use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::extract::{Path, Request, State};
use axum::http::StatusCode;
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{any, get, post};
use axum::{Json, Router};
use serde_json::json;

use super::Cluster;
use crate::engine::{Engine, EngineError, Imported};
use crate::jsonapi::{ApiError, check_bearer};
use crate::types::PartitionId;

#[derive(Clone)]
pub struct RpcState {
    pub cluster: Cluster,
    pub engine: Engine,
    /// Snapshot exports running at once (each holds a read transaction and a thread).
    pub exports: Arc<tokio::sync::Semaphore>,
    /// The node's front ends and model, for forwarded requests and tenant-wide work
    /// (absent in tests that exercise the RPC port alone).
    pub fronts: Option<Fronts>,
    /// Applies shipments for the partitions this node replicates (absent in tests of
    /// the RPC port alone).
    pub replicator: Option<super::replication::Replicator>,
}

#[derive(Clone)]
pub struct Fronts {
    pub s3: crate::s3::front::S3Front,
    pub kv: crate::kv::KvState,
    pub store: crate::model::Store,
}

impl RpcState {
    pub fn new(cluster: Cluster, engine: Engine) -> Self {
        Self {
            cluster,
            engine,
            exports: Arc::new(tokio::sync::Semaphore::new(MAX_EXPORTS)),
            fronts: None,
            replicator: None,
        }
    }

    pub fn with_replicator(mut self, r: super::replication::Replicator) -> Self {
        self.replicator = Some(r);
        self
    }

    pub fn with_fronts(
        mut self,
        s3: crate::s3::front::S3Front,
        kv: crate::kv::KvState,
        store: crate::model::Store,
    ) -> Self {
        self.fronts = Some(Fronts { s3, kv, store });
        self
    }
}

/// Most snapshot exports a node serves at once; more are refused with 503.
const MAX_EXPORTS: usize = 2;

pub fn router(state: RpcState) -> Router {
    Router::new()
        .route("/rpc/v1/ping", get(ping))
        .route("/rpc/v1/partitions/{p}/snapshot", get(snapshot))
        .route("/rpc/v1/forward/{front}", any(forward_in))
        .route("/rpc/v1/partitions/{p}/position", get(position))
        .route("/rpc/v1/partitions/{p}/digest", get(digest))
        .route(
            "/rpc/v1/partitions/{p}/log",
            post(receive_log).layer(axum::extract::DefaultBodyLimit::max(MAX_SHIPMENT)),
        )
        .route(
            "/rpc/v1/partitions/{p}/chunks",
            axum::routing::put(receive_chunk),
        )
        .route("/rpc/v1/partitions/{p}/resync", post(resync))
        .route("/rpc/v1/tenants/{id}/{work}", post(tenant_work))
        .route("/rpc/v1/tenants/{id}/object", get(object))
        .route("/rpc/v1/quota/{id}", post(quota_admit))
        .fallback(|| async {
            ApiError::new(StatusCode::NOT_FOUND, "NoSuchRoute", "unknown RPC route")
        })
        .layer(middleware::from_fn_with_state(
            state.cluster.clone(),
            require_peer,
        ))
        .with_state(state)
}

async fn ping(State(s): State<RpcState>) -> Json<serde_json::Value> {
    let c = &s.cluster;
    Json(json!({
        "nodeId": c.me().0,
        "incarnation": c.incarnation(),
        "layoutVersion": c.layout().map(|l| l.version),
        // Rate-limited tenants' requests per second here (tenancy::rate).
        "demand": *c.local_demand(),
    }))
}

/// Buffer between the snapshot reader and the response body: the export runs at the
/// pace the peer reads, holding at most this much of the stream in memory.
const SNAPSHOT_PIPE: usize = 256 * 1024;

/// Streams a snapshot of partition `p` (format: `engine::snapshot`).
async fn snapshot(State(s): State<RpcState>, Path(p): Path<u16>) -> Result<Response, ApiError> {
    let p = partition(&s, p)?.0;
    let Ok(permit) = s.exports.clone().try_acquire_owned() else {
        return Err(ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "SlowDown",
            format!("{MAX_EXPORTS} partition snapshots are already being sent; retry later"),
        ));
    };
    let (mut w, r) = tokio::io::duplex(SNAPSHOT_PIPE);
    tokio::spawn(async move {
        let _permit = permit;
        // An error ends the body early; the receiver sees a stream without its End
        // frame and refuses it.
        if let Err(e) = s.engine.export_partition(PartitionId(p), &mut w).await {
            tracing::warn!(partition = p, error = %e, "partition snapshot export failed");
        }
    });
    // Streamed as background work: each piece waits for its turn in the node's I/O
    // scheduler at the background weight, and the export (which writes into a small
    // pipe) follows at that pace, so a replica's reinstall does not crowd out tenants.
    let sched = s.fronts.as_ref().map(|f| f.store.io_scheduler().clone());
    let pieces = tokio_util::io::ReaderStream::with_capacity(r, SNAPSHOT_PIPE);
    let body = Body::from_stream(futures::StreamExt::then(pieces, move |piece| {
        let sched = sched.clone();
        async move {
            if let (Some(sched), Ok(b)) = (&sched, &piece) {
                // At a default tenant's weight, not the background one: a reinstall restores
                // a lost copy, and must not starve behind tenants (its read transaction
                // stays open while it streams).
                use crate::tenancy::sched::{Class, DEFAULT_WEIGHT};
                drop(
                    sched
                        .slot(Class::Background, DEFAULT_WEIGHT, b.len() as u64)
                        .await,
                );
            }
            piece
        }
    }));
    Ok(([("content-type", "application/octet-stream")], body).into_response())
}

/// Largest shipment of log entries accepted (a shipment holds at most about 8 MiB of
/// entries, plus one entry that may be larger).
const MAX_SHIPMENT: usize = 64 << 20;

fn partition(s: &RpcState, p: u16) -> Result<PartitionId, ApiError> {
    let partitions = s.cluster.partitions();
    if p >= partitions {
        return Err(ApiError::bad_request(format!(
            "partition {p} does not exist (the cluster has {partitions})"
        )));
    }
    Ok(PartitionId(p))
}

fn replicator(s: &RpcState) -> Result<&super::replication::Replicator, ApiError> {
    s.replicator
        .as_ref()
        .ok_or_else(|| ApiError::unavailable("this node does not replicate"))
}

/// Where this node's log of partition `p` stands.
async fn position(
    State(s): State<RpcState>,
    Path(p): Path<u16>,
) -> Result<Json<crate::engine::LogPosition>, ApiError> {
    let p = partition(&s, p)?;
    Ok(Json(s.engine.log_position(p).await.map_err(internal)?))
}

/// What this node holds of partition `p`: record count, digest and log position (for
/// comparing replicas).
async fn digest(
    State(s): State<RpcState>,
    Path(p): Path<u16>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let p = partition(&s, p)?;
    let (records, sha256) = s.engine.partition_digest(p).await.map_err(internal)?;
    let at = s.engine.log_position(p).await.map_err(internal)?;
    Ok(Json(
        json!({"records": records, "sha256": sha256, "lsn": at.lsn, "epoch": at.epoch}),
    ))
}

fn internal(e: EngineError) -> ApiError {
    ApiError::new(
        StatusCode::INTERNAL_SERVER_ERROR,
        "InternalError",
        e.to_string(),
    )
}

/// Log entries of partition `p` from its primary (postcard [`super::replication::Shipment`]).
async fn receive_log(
    State(s): State<RpcState>,
    Path(p): Path<u16>,
    headers: axum::http::HeaderMap,
    body: axum::body::Bytes,
) -> Result<Response, ApiError> {
    let p = partition(&s, p)?;
    let shipment: super::replication::Shipment = postcard::from_bytes(&body)
        .map_err(|e| ApiError::bad_request(format!("malformed shipment: {e}")))?;
    // Sent by primaries that name the chunks they skip (older ones do not: nothing is
    // checked for them).
    let skipped = match headers.get(super::replication::SKIPPED_HEADER) {
        None => None,
        Some(v) => Some(
            v.to_str()
                .ok()
                .map(|v| {
                    v.split(',')
                        .filter(|id| !id.is_empty())
                        .map(|id| uuid::Uuid::parse_str(id).map(crate::types::ChunkId))
                        .collect::<Result<std::collections::HashSet<_>, _>>()
                })
                .and_then(Result::ok)
                .ok_or_else(|| ApiError::bad_request("malformed list of skipped chunks"))?,
        ),
    };
    let checked = skipped.is_some();
    let mut resp = match replicator(&s)?.receive(p, shipment, skipped).await {
        Ok(lsn) => Json(json!({"lsn": lsn})).into_response(),
        Err(refusal) => (StatusCode::CONFLICT, Json(refusal)).into_response(),
    };
    if checked {
        // Tells the primary this node checks that chunks have arrived, so a chunk sent
        // ahead of its entry need not be sent again.
        resp.headers_mut().insert(
            super::replication::CHECKED_HEADER,
            axum::http::HeaderValue::from_static("1"),
        );
    }
    Ok(resp)
}

/// One chunk file of partition `p`, streamed by its primary before the entry that
/// references it.
async fn receive_chunk(
    State(s): State<RpcState>,
    Path(p): Path<u16>,
    body: Body,
) -> Result<StatusCode, ApiError> {
    use futures::TryStreamExt;
    let p = partition(&s, p)?;
    let stream = body.into_data_stream().map_err(std::io::Error::other);
    let mut reader = tokio_util::io::StreamReader::new(stream);
    s.engine
        .receive_sent_chunk(p, &mut reader)
        .await
        .map_err(|e| ApiError::bad_request(format!("chunk refused: {e}")))?;
    Ok(StatusCode::NO_CONTENT)
}

#[derive(serde::Deserialize)]
struct Resync {
    epoch: u64,
    primary: String,
}

/// The primary asks this node to reinstall partition `p` from its snapshot.
async fn resync(
    State(s): State<RpcState>,
    Path(p): Path<u16>,
    Json(r): Json<Resync>,
) -> Result<Json<crate::engine::LogPosition>, ApiError> {
    let p = partition(&s, p)?;
    replicator(&s)?
        .resync(p, r.epoch, &super::NodeId(r.primary))
        .await
        .map(Json)
        .map_err(|e| ApiError::new(StatusCode::CONFLICT, "ResyncFailed", e))
}

/// Replaces local partition `p` with a snapshot pulled from the peer at `rpc_addr`,
/// streamed straight into the engine (memory stays bounded by the frame size).
pub async fn pull_partition(
    http: &reqwest::Client,
    rpc_addr: &str,
    secret: &str,
    p: PartitionId,
    engine: &Engine,
    timeout: Duration,
) -> Result<Imported, EngineError> {
    use futures::TryStreamExt;
    let url = format!("http://{rpc_addr}/rpc/v1/partitions/{}/snapshot", p.0);
    let fail = |e: String| EngineError::Io(std::io::Error::other(e));
    let resp = http
        .get(&url)
        .bearer_auth(secret)
        .timeout(timeout)
        .send()
        .await
        .map_err(|e| fail(format!("snapshot request to {rpc_addr}: {e}")))?;
    if !resp.status().is_success() {
        return Err(fail(format!(
            "snapshot of partition {} from {rpc_addr}: HTTP {}",
            p.0,
            resp.status()
        )));
    }
    let stream = resp.bytes_stream().map_err(std::io::Error::other);
    let mut reader = tokio_util::io::StreamReader::new(stream);
    engine.import_partition(p, &mut reader).await
}

fn fronts(s: &RpcState) -> Result<&Fronts, ApiError> {
    s.fronts
        .as_ref()
        .ok_or_else(|| ApiError::unavailable("this node serves no clients"))
}

/// A client request another node sent on because this node leads its partition.
async fn forward_in(
    State(s): State<RpcState>,
    Path(front): Path<String>,
    req: Request,
) -> Result<Response, ApiError> {
    let (mut parts, body) = req.into_parts();
    // Wrapped first, so that even a refusal below leaves the body drained.
    let body = Body::new(DrainOnDrop(Some(body)));
    let f = fronts(&s)?;
    super::forward::restore(&mut parts).map_err(ApiError::bad_request)?;
    let mut answer = match front.as_str() {
        "s3" => {
            let req = http::Request::from_parts(parts, s3s::Body::http_body_unsync(body));
            f.s3.handle(req).await.map(Body::new)
        }
        "kv" => crate::kv::handle(State(f.kv.clone()), Request::from_parts(parts, body)).await,
        _ => {
            return Err(ApiError::new(
                StatusCode::NOT_FOUND,
                "NoSuchRoute",
                "forwarded requests go to s3 or kv",
            ));
        }
    };
    // `Connection: close` is for the client's connection (the forwarding node passes
    // the answer on); this one, between the nodes, stays open while the rest of a
    // refused body drains.
    answer.headers_mut().remove(http::header::CONNECTION);
    Ok(answer)
}

/// A forwarded request's body. If the front answers without reading all of it (a
/// refusal such as SlowDown or AccessDenied, given before the body), the rest is read
/// and dropped in the background, for at most [`DRAIN_FOR`] and [`DRAIN_BYTES`],
/// instead of being left unread: the peer is still sending it, and a connection closed
/// on unread data is reset, which can destroy the answer before the peer reads it (it
/// would then tell its client that the outcome is unknown, a 502, instead of passing
/// the refusal on). By the end of the drain the peer has read the answer; a reset then
/// only stops the rest of the upload.
struct DrainOnDrop(Option<Body>);

const DRAIN_FOR: Duration = Duration::from_secs(5);
const DRAIN_BYTES: u64 = 8 << 20;

impl http_body::Body for DrainOnDrop {
    type Data = bytes::Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<Self::Data>, Self::Error>>> {
        let Some(b) = self.0.as_mut() else {
            return std::task::Poll::Ready(None);
        };
        let polled = std::pin::Pin::new(b).poll_frame(cx);
        // Ended (or failed): nothing is left to drain.
        if matches!(polled, std::task::Poll::Ready(None | Some(Err(_)))) {
            self.0 = None;
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.0.as_ref().is_none_or(http_body::Body::is_end_stream)
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.0.as_ref().map_or_else(
            || http_body::SizeHint::with_exact(0),
            http_body::Body::size_hint,
        )
    }
}

impl Drop for DrainOnDrop {
    fn drop(&mut self) {
        let Some(body) = self.0.take() else { return };
        if http_body::Body::is_end_stream(&body) {
            return;
        }
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            rt.spawn(async move {
                let drain = async {
                    let (mut body, mut read) = (body, 0u64);
                    while read < DRAIN_BYTES
                        && let Some(Ok(frame)) = http_body_util::BodyExt::frame(&mut body).await
                    {
                        read += frame.data_ref().map_or(0, |d| d.len() as u64);
                    }
                };
                let _ = tokio::time::timeout(DRAIN_FOR, drain).await;
            });
        }
    }
}

/// The partitions a peer asks this node to do a tenant's work in.
#[derive(serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct TenantWork {
    pub partitions: Vec<u16>,
}

/// A tenant's share of cluster-wide work: usage, purge or "has KV keys", over exactly
/// the partitions named, each of which this node must lead (else 503: the asker's
/// partition table is stale and it must not count or purge anything twice or never).
async fn tenant_work(
    State(s): State<RpcState>,
    Path((id, work)): Path<(uuid::Uuid, String)>,
    Json(w): Json<TenantWork>,
) -> Result<Response, ApiError> {
    let f = fronts(&s)?;
    let tenant = crate::types::TenantId(id);
    let mut set = crate::model::PartitionSet::none(s.cluster.partitions());
    for p in w.partitions {
        if s.cluster.route(PartitionId(p)) != super::Route::Local {
            s.cluster.refresh_soon();
            return Err(ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "NotPrimary",
                format!("this node does not lead partition {p}"),
            ));
        }
        set.insert(PartitionId(p));
    }
    Ok(Json(do_tenant_work(&f.store, tenant, &work, &set).await?).into_response())
}

async fn do_tenant_work(
    store: &crate::model::Store,
    tenant: crate::types::TenantId,
    work: &str,
    set: &crate::model::PartitionSet,
) -> Result<serde_json::Value, ApiError> {
    Ok(match work {
        "usage" => json!(store.tenant_usage_in(tenant, set).await?),
        "purge" => {
            store.purge_tenant_in(tenant, set).await?;
            json!({})
        }
        "has-kv" => json!({"hasKv": store.tenant_has_kv_in(tenant, set).await?}),
        _ => {
            return Err(ApiError::new(
                StatusCode::NOT_FOUND,
                "NoSuchRoute",
                "tenant work is usage, purge or has-kv",
            ));
        }
    })
}

/// Runs a tenant's `work` ("usage", "purge" or "has-kv") over every partition of the
/// cluster: each primary does it for the partitions it leads (this node directly, the
/// others over the RPC port, all at once). Every partition is covered exactly once or
/// the whole call fails with 503: a partition without a reachable primary makes the
/// answer unknown, never silently partial.
pub async fn tenant_work_everywhere(
    cluster: &Cluster,
    store: &crate::model::Store,
    tenant: crate::types::TenantId,
    work: &'static str,
    timeout: Duration,
) -> Result<Vec<serde_json::Value>, ApiError> {
    let mut local = crate::model::PartitionSet::none(cluster.partitions());
    let mut remote: std::collections::BTreeMap<String, (super::NodeId, Vec<u16>)> =
        Default::default();
    for p in 0..cluster.partitions() {
        match cluster.route(PartitionId(p)) {
            super::Route::Local => {
                local.insert(PartitionId(p));
            }
            super::Route::Remote { node, rpc_addr } => remote
                .entry(rpc_addr)
                .or_insert((node, Vec::new()))
                .1
                .push(p),
            super::Route::Unavailable(why) => return Err(ApiError::unavailable(why)),
        }
    }
    let secret = cluster.secret().cloned();
    let asks = remote.into_iter().map(|(addr, (node, partitions))| {
        let (http, secret) = (cluster.http().clone(), secret.clone());
        async move {
            let fail = |e: String| format!("node {} ({addr}): {e}", node.0);
            let secret = secret.ok_or_else(|| fail("this node has no cluster secret".into()))?;
            let r = http
                .post(format!("http://{addr}/rpc/v1/tenants/{}/{work}", tenant.0))
                .bearer_auth(&*secret)
                .timeout(timeout)
                .json(&TenantWork { partitions })
                .send()
                .await
                .map_err(|e| fail(e.to_string()))?;
            if !r.status().is_success() {
                let status = r.status();
                let why = r.text().await.unwrap_or_default();
                return Err(fail(format!("HTTP {status}: {}", why.trim())));
            }
            r.json::<serde_json::Value>()
                .await
                .map_err(|e| fail(e.to_string()))
        }
    });
    let (mine, theirs) = futures::join!(
        do_tenant_work(store, tenant, work, &local),
        futures::future::join_all(asks)
    );
    let mut out = vec![mine?];
    for r in theirs {
        out.push(r.map_err(|e| {
            ApiError::unavailable(format!("{work} needs every partition's primary: {e}"))
        })?);
    }
    Ok(out)
}

async fn require_peer(State(c): State<Cluster>, req: Request, next: Next) -> Response {
    let secret = c.secret().map(|s| &**s);
    match check_bearer(
        req.headers(),
        secret,
        "peers must present the cluster secret",
    ) {
        Ok(()) => next.run(req).await,
        Err(e) => e.into_response(),
    }
}

// ---- quotas ----

/// Admits an amount for a tenant whose quota authority this node is (it leads the
/// tenant's authority partition): 200 admitted (and counted at once), 403 with the
/// quota refused, 503 when this node is not the authority or cannot decide.
/// A quota question for a tenant's authority.
#[derive(serde::Serialize, serde::Deserialize)]
struct QuotaAsk {
    amount: crate::tenancy::quota::Amount,
    /// Only whether it fits now (an early check before a body is read): nothing counted.
    #[serde(default)]
    probe: bool,
}

async fn quota_admit(
    State(s): State<RpcState>,
    Path(id): Path<uuid::Uuid>,
    Json(QuotaAsk { amount, probe }): Json<QuotaAsk>,
) -> Result<Response, ApiError> {
    let f = fronts(&s)?;
    let tenant = crate::types::TenantId(id);
    let p = crate::tenancy::quota::authority_partition(tenant, s.cluster.partitions());
    if s.cluster.route(p) != super::Route::Local {
        s.cluster.refresh_soon();
        return Err(ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "NotPrimary",
            format!("this node does not lead partition {p}, the tenant's quota authority"),
        ));
    }
    match f.store.quotas().admit_here(tenant, amount).await {
        Ok(r) => {
            // The asker commits after this answer, within GRANT_TTL or not at all:
            // counted until a measurement that begins after that. A probe counts
            // nothing.
            if probe {
                r.release();
            } else {
                r.granted();
            }
            Ok(Json(json!({})).into_response())
        }
        Err(Ok(q)) => Ok((StatusCode::FORBIDDEN, Json(q)).into_response()),
        Err(Err(m)) => Err(ApiError::unavailable(m)),
    }
}

/// What a client hears when its tenant's quota authority does not answer.
const QUOTA_UNAVAILABLE: &str = "the tenant's quota could not be checked now (the cluster \
     is moving the node that decides it); nothing was written; retry";

/// The way a node reaches its tenants' quota authorities: None (decide here) when it
/// leads the tenant's authority partition, else the authority's verdict over the RPC
/// port (undecided when there is no reachable authority: the write is refused with 503
/// and nothing is stored).
pub fn quota_authority(cluster: Cluster) -> crate::tenancy::quota::Authority {
    Arc::new(move |tenant, amount, probe| {
        let cluster = cluster.clone();
        Box::pin(async move {
            let p = crate::tenancy::quota::authority_partition(tenant, cluster.partitions());
            let (node, addr) = match cluster.route(p) {
                super::Route::Local => return None,
                super::Route::Remote { node, rpc_addr } => (node, rpc_addr),
                super::Route::Unavailable(why) => {
                    tracing::warn!(%tenant, partition = %p, why, "no quota authority for the tenant");
                    return Some(Err(Err(QUOTA_UNAVAILABLE.into())));
                }
            };
            // The details go to the log; the client learns that nothing was written.
            let fail = |e: String| {
                tracing::warn!(%tenant, authority = %node.0, %addr, error = %e, "the tenant's quota authority did not decide");
                Some(Err(Err(QUOTA_UNAVAILABLE.into())))
            };
            let Some(secret) = cluster.secret().cloned() else {
                return fail("this node has no cluster secret".into());
            };
            let r = match cluster
                .http()
                .post(format!("http://{addr}/rpc/v1/quota/{}", tenant.0))
                .bearer_auth(&*secret)
                .timeout(crate::tenancy::quota::GRANT_USE)
                .json(&QuotaAsk { amount, probe })
                .send()
                .await
            {
                Ok(r) => r,
                Err(e) => return fail(e.to_string()),
            };
            match r.status() {
                s if s.is_success() => Some(Ok(())),
                StatusCode::FORBIDDEN => {
                    match r.json::<crate::tenancy::quota::QuotaExceeded>().await {
                        Ok(q) => Some(Err(Ok(q))),
                        Err(e) => fail(format!("unreadable refusal: {e}")),
                    }
                }
                s => {
                    if s == StatusCode::SERVICE_UNAVAILABLE {
                        cluster.refresh_soon();
                    }
                    let why = r.text().await.unwrap_or_default();
                    fail(format!("HTTP {s}: {}", why.trim()))
                }
            }
        })
    })
}

/// A tenant's usage over the whole cluster (every partition's primary counts its
/// share), for the quota authority's measurements.
pub fn quota_measure(
    cluster: Cluster,
    store: crate::model::WeakStore,
) -> crate::tenancy::quota::Measure {
    Arc::new(move |tenant| {
        let (cluster, store) = (cluster.clone(), store.clone());
        Box::pin(async move {
            let store = store.upgrade().ok_or("the node is shutting down")?;
            let shares =
                tenant_work_everywhere(&cluster, &store, tenant, "usage", Duration::from_secs(3))
                    .await
                    .map_err(|e| e.message)?;
            let mut total = crate::model::bucket::Usage::default();
            for share in shares {
                let u: crate::model::bucket::Usage = serde_json::from_value(share)
                    .map_err(|e| format!("a peer's usage report is malformed: {e}"))?;
                total.add(&u);
            }
            Ok(total)
        })
    })
}

// ---- copy sources on another node ----

const OBJECT_HEAD: &str = "x-granary-object";

/// A copy source's record as it travels between nodes: the record's JSON with its
/// extension fields (tags, part sizes, checksum) beside it, as they are not part of the
/// record's serde form. A peer from before them ignores `ext`; one without it sends none.
#[derive(serde::Serialize, serde::Deserialize)]
struct RemoteHead {
    #[serde(flatten)]
    rec: crate::model::object::ObjectRecord,
    #[serde(default)]
    ext: crate::model::object::ObjectExt,
}
const OBJECT_RANGE: &str = "x-granary-range";
const OBJECT_ERROR: &str = "x-granary-error";
const OBJECT_SIZE: &str = "x-granary-size";

#[derive(serde::Deserialize)]
struct ObjectQuery {
    bucket: String,
    key: String,
    /// A `ByteRange` as JSON.
    range: Option<String>,
}

/// One object of a bucket this node leads, for a copy running on another node: the
/// record (without its data) in a header, the resolved range, and the bytes streamed.
/// Answered only once what was read is durable on the partition's in-sync replicas.
async fn object(
    State(s): State<RpcState>,
    Path(id): Path<uuid::Uuid>,
    axum::extract::Query(q): axum::extract::Query<ObjectQuery>,
) -> Response {
    use crate::model::Error as E;
    let fail = |status: StatusCode, kind: &str, message: String| {
        let mut r = (status, message).into_response();
        if let Ok(v) = axum::http::HeaderValue::from_str(kind) {
            r.headers_mut().insert(OBJECT_ERROR, v);
        }
        r
    };
    let f = match fronts(&s) {
        Ok(f) => f,
        Err(e) => return e.into_response(),
    };
    let range: Option<crate::model::object::ByteRange> =
        match q.range.as_deref().map(serde_json::from_str).transpose() {
            Ok(r) => r,
            Err(_) => return ApiError::bad_request("malformed range").into_response(),
        };
    let tenant = crate::types::TenantId(id);
    let (read, touched) = crate::model::tracking_partitions(
        false,
        f.store.get_object(
            tenant,
            &q.bucket,
            &q.key,
            range,
            &crate::model::object::Conditions::default(),
        ),
    )
    .await;
    let (mut rec, r, body) = match read {
        Ok(v) => v,
        Err(E::NoSuchKey) => return fail(StatusCode::NOT_FOUND, "NoSuchKey", String::new()),
        Err(E::NoSuchBucket) => {
            return fail(StatusCode::NOT_FOUND, "NoSuchBucket", String::new());
        }
        Err(E::InvalidRange { size }) => {
            let mut r = fail(
                StatusCode::RANGE_NOT_SATISFIABLE,
                "InvalidRange",
                String::new(),
            );
            r.headers_mut().insert(OBJECT_SIZE, size.into());
            return r;
        }
        Err(E::NotPrimary(m)) => {
            s.cluster.refresh_soon();
            return fail(StatusCode::SERVICE_UNAVAILABLE, "NotPrimary", m);
        }
        Err(e) => {
            tracing::warn!(error = %e, "reading a copy source for another node failed");
            return fail(StatusCode::INTERNAL_SERVER_ERROR, "Internal", e.to_string());
        }
    };
    if let Some(rep) = &s.replicator
        && let Err(why) = rep.barrier(&touched, Duration::from_secs(60)).await
    {
        return fail(StatusCode::SERVICE_UNAVAILABLE, "NotPrimary", why);
    }
    rec.data = crate::model::data::ObjectData::Inline {
        bytes: Vec::new(),
        crc: 0,
    };
    // A copy keeps the source's tags and checksum, not its part sizes.
    let mut ext = std::mem::take(&mut rec.ext);
    ext.part_sizes.clear();
    let head = match serde_json::to_vec(&RemoteHead { ext, rec }) {
        Ok(j) => base64::Engine::encode(&base64::engine::general_purpose::URL_SAFE_NO_PAD, j),
        Err(e) => return fail(StatusCode::INTERNAL_SERVER_ERROR, "Internal", e.to_string()),
    };
    let mut resp = Response::new(Body::from_stream(body.stream));
    let h = resp.headers_mut();
    let header = |v: String| axum::http::HeaderValue::from_str(&v).ok();
    if let (Some(head), Some(range)) = (header(head), header(format!("{}-{}", r.start, r.end))) {
        h.insert(OBJECT_HEAD, head);
        h.insert(OBJECT_RANGE, range);
    }
    h.insert(axum::http::header::CONTENT_LENGTH, (r.end - r.start).into());
    resp
}

/// The copy-source reader a node installs in its model: asks the primary of the source
/// bucket for the object (`GET /rpc/v1/tenants/{id}/object`) and streams its answer,
/// at most a few pieces ahead of the copy.
pub fn remote_reader(cluster: Cluster) -> crate::model::object::RemoteReader {
    // No overall timeout (a large source streams for as long as the copy takes); a
    // source node that stops answering is caught by the failure detector instead.
    let http = super::peer_client(Duration::from_secs(2), |b| {
        b.tcp_keepalive(Duration::from_secs(15))
            .pool_idle_timeout(Duration::from_secs(30))
    });
    Arc::new(move |tenant, bucket, key, range| {
        let (cluster, http) = (cluster.clone(), http.clone());
        Box::pin(async move { read_remote(&cluster, &http, tenant, &bucket, &key, range).await })
    })
}

async fn read_remote(
    cluster: &Cluster,
    http: &reqwest::Client,
    tenant: crate::types::TenantId,
    bucket: &str,
    key: &str,
    range: Option<crate::model::object::ByteRange>,
) -> crate::model::Result<(
    crate::model::object::ObjectRecord,
    std::ops::Range<u64>,
    crate::model::data::ObjectBody,
)> {
    use crate::model::Error as E;
    let unavailable = |m: String| E::NotPrimary(m);
    let p = PartitionId::of(tenant, bucket.as_bytes(), cluster.partitions());
    let super::Route::Remote { node, rpc_addr } = cluster.route(p) else {
        return Err(unavailable(format!(
            "the copy source bucket's partition {p} has no reachable primary; retry"
        )));
    };
    let secret = cluster
        .secret()
        .ok_or_else(|| unavailable("this node has no cluster secret".into()))?;
    let mut query = vec![("bucket", bucket.to_string()), ("key", key.to_string())];
    if let Some(r) = range {
        query.push((
            "range",
            serde_json::to_string(&r).map_err(|e| E::Invalid(e.to_string()))?,
        ));
    }
    // The source's primary checks nothing of the client: the tenant comes from the
    // signature this node verified, and any holder of the cluster secret may read any
    // partition (as snapshots do).
    let send = http
        .get(format!(
            "http://{rpc_addr}/rpc/v1/tenants/{}/object",
            tenant.0
        ))
        .query(&query)
        .bearer_auth(&**secret)
        .send();
    let resp = tokio::select! {
        r = send => r.map_err(|e| {
            unavailable(format!("reading the copy source from node {}: {e}", node.0))
        })?,
        () = cluster.until_not_alive(&node) => {
            return Err(unavailable(format!(
                "node {} (the copy source's primary) stopped answering; retry",
                node.0
            )));
        }
    };
    let text = |name: &str| {
        resp.headers()
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string)
    };
    match (resp.status().as_u16(), text(OBJECT_ERROR).as_deref()) {
        (200, _) => {}
        (_, Some("NoSuchKey")) => return Err(E::NoSuchKey),
        (_, Some("NoSuchBucket")) => return Err(E::NoSuchBucket),
        (_, Some("InvalidRange")) => {
            let size = text(OBJECT_SIZE).and_then(|s| s.parse().ok()).unwrap_or(0);
            return Err(E::InvalidRange { size });
        }
        (503, _) => {
            cluster.refresh_soon();
            return Err(unavailable(format!(
                "node {} could not serve the copy source now; retry",
                node.0
            )));
        }
        (status, _) => {
            return Err(E::Engine(EngineError::Io(std::io::Error::other(format!(
                "node {} answered {status} for the copy source",
                node.0
            )))));
        }
    }
    let head: RemoteHead = text(OBJECT_HEAD)
        .and_then(|h| {
            base64::Engine::decode(&base64::engine::general_purpose::URL_SAFE_NO_PAD, h).ok()
        })
        .and_then(|j| serde_json::from_slice(&j).ok())
        .ok_or_else(|| unavailable("the copy source's record did not decode".into()))?;
    let mut rec = head.rec;
    rec.ext = head.ext;
    let r = text(OBJECT_RANGE)
        .and_then(|r| {
            let (a, b) = r.split_once('-')?;
            Some(a.parse::<u64>().ok()?..b.parse::<u64>().ok()?)
        })
        .ok_or_else(|| unavailable("the copy source's range did not decode".into()))?;
    // The answer streams through a small channel (the model's streams must be Sync).
    let (tx, rx) = tokio::sync::mpsc::channel::<std::io::Result<bytes::Bytes>>(4);
    let expected = r.end - r.start;
    let cluster = cluster.clone();
    tokio::spawn(async move {
        use futures::StreamExt;
        let failed =
            |why: String| Err(std::io::Error::other(crate::model::data::SourceFailed(why)));
        let mut got = 0u64;
        let mut stream = resp.bytes_stream();
        loop {
            // Ends when the copy is dropped, and when the source node stops answering.
            let piece = tokio::select! {
                p = stream.next() => p.map(|p| p.map_err(std::io::Error::other)),
                () = tx.closed() => return,
                () = cluster.until_not_alive(&node) => Some(failed(format!(
                    "node {} (the copy source's primary) stopped answering mid-copy; retry",
                    node.0
                ))),
            };
            let Some(piece) = piece else { break };
            let piece = piece.or_else(|e| {
                if e.get_ref()
                    .is_some_and(|i| i.is::<crate::model::data::SourceFailed>())
                {
                    return Err(e);
                }
                failed(format!(
                    "reading the copy source from node {} failed: {e}; retry",
                    node.0
                ))
            });
            if let Ok(p) = &piece {
                got += p.len() as u64;
            }
            let stop = piece.is_err();
            if tx.send(piece).await.is_err() || stop {
                return;
            }
        }
        if got != expected {
            let _ = tx
                .send(failed(format!(
                    "the copy source ended after {got} of {expected} bytes; retry"
                )))
                .await;
        }
    });
    let stream = futures::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|item| (item, rx))
    });
    Ok((
        rec,
        r,
        crate::model::data::ObjectBody {
            len: expected,
            stream: Box::pin(stream),
        },
    ))
}
