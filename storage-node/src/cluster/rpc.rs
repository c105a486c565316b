//! The internal RPC port (9300): what peers ask of each other. HTTP with bearer
//! authentication by the cluster secret; every route refuses a request without it, and
//! every route refuses everything when the node has no secret configured.
//!
//! Routes: probes (`GET /rpc/v1/ping`) and partition snapshots
//! (`GET /rpc/v1/partitions/{p}/snapshot`, streamed, for catch-up and partition moves);
//! replication and request forwarding will be served here too (docs/cluster.md).

use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::extract::{Path, Request, State};
use axum::http::StatusCode;
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
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
}

impl RpcState {
    pub fn new(cluster: Cluster, engine: Engine) -> Self {
        Self {
            cluster,
            engine,
            exports: Arc::new(tokio::sync::Semaphore::new(MAX_EXPORTS)),
        }
    }
}

/// Most snapshot exports a node serves at once; more are refused with 503.
const MAX_EXPORTS: usize = 2;

pub fn router(state: RpcState) -> Router {
    Router::new()
        .route("/rpc/v1/ping", get(ping))
        .route("/rpc/v1/partitions/{p}/snapshot", get(snapshot))
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
        "layoutVersion": c.layout().map(|l| l.version),
    }))
}

/// Buffer between the snapshot reader and the response body: the export runs at the
/// pace the peer reads, holding at most this much of the stream in memory.
const SNAPSHOT_PIPE: usize = 256 * 1024;

/// Streams a snapshot of partition `p` (format: `engine::snapshot`).
async fn snapshot(State(s): State<RpcState>, Path(p): Path<u16>) -> Result<Response, ApiError> {
    let partitions = s.cluster.partitions();
    if p >= partitions {
        return Err(ApiError::bad_request(format!(
            "partition {p} does not exist (the cluster has {partitions})"
        )));
    }
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
