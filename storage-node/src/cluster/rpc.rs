//! The internal RPC port (9300): what peers ask of each other. HTTP with bearer
//! authentication by the cluster secret; every route refuses a request without it, and
//! every route refuses everything when the node has no secret configured.
//!
//! Today it answers probes (`GET /rpc/v1/ping`); replication and request forwarding
//! will be served here too (docs/cluster.md).

use axum::extract::{Request, State};
use axum::http::StatusCode;
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde_json::json;

use super::Cluster;
use crate::jsonapi::{ApiError, check_bearer};

pub fn router(cluster: Cluster) -> Router {
    Router::new()
        .route("/rpc/v1/ping", get(ping))
        .fallback(|| async {
            ApiError::new(StatusCode::NOT_FOUND, "NoSuchRoute", "unknown RPC route")
        })
        .layer(middleware::from_fn_with_state(
            cluster.clone(),
            require_peer,
        ))
        .with_state(cluster)
}

async fn ping(State(c): State<Cluster>) -> Json<serde_json::Value> {
    Json(json!({
        "nodeId": c.me().0,
        "layoutVersion": c.layout().map(|l| l.version),
    }))
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
