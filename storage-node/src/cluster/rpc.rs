//! The internal RPC port (9300): what peers ask of each other. HTTP with bearer
//! authentication by the cluster secret; every route refuses a request without it, and
//! every route refuses everything when the node has no secret configured.
//!
//! Routes: probes (`GET /rpc/v1/ping`), partition snapshots
//! (`GET /rpc/v1/partitions/{p}/snapshot`, streamed, for catch-up and partition moves),
//! forwarded client requests (`/rpc/v1/forward/{s3|kv}`, any method, see [`super::forward`])
//! and a tenant's share of cluster-wide work in the partitions a node leads
//! (`POST /rpc/v1/tenants/{id}/{usage|purge|has-kv}`), and replication: a partition's
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
    let body = Body::from_stream(tokio_util::io::ReaderStream::new(r));
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
    body: axum::body::Bytes,
) -> Result<Response, ApiError> {
    let p = partition(&s, p)?;
    let shipment: super::replication::Shipment = postcard::from_bytes(&body)
        .map_err(|e| ApiError::bad_request(format!("malformed shipment: {e}")))?;
    match replicator(&s)?.receive(p, shipment).await {
        Ok(lsn) => Ok(Json(json!({"lsn": lsn})).into_response()),
        Err(refusal) => Ok((StatusCode::CONFLICT, Json(refusal)).into_response()),
    }
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
    let f = fronts(&s)?;
    let (mut parts, body) = req.into_parts();
    super::forward::restore(&mut parts).map_err(ApiError::bad_request)?;
    match front.as_str() {
        "s3" => {
            let req = http::Request::from_parts(parts, s3s::Body::http_body_unsync(body));
            Ok(f.s3.handle(req).await.map(Body::new))
        }
        "kv" => Ok(crate::kv::handle(State(f.kv.clone()), Request::from_parts(parts, body)).await),
        _ => Err(ApiError::new(
            StatusCode::NOT_FOUND,
            "NoSuchRoute",
            "forwarded requests go to s3 or kv",
        )),
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
