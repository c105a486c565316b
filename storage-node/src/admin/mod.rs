//! The admin API (`/admin/v1/...`): tenants and their access keys. Used by the
//! operator and by `granary-node tenant|key ...`; authenticated with the node's admin
//! token (`Authorization: Bearer <token>`). Reference: docs/admin-api.md.
//! Also serves `/metrics`, `/healthz` and `/readyz` (unauthenticated).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use axum::extract::{Path, Query, Request, State};
use axum::http::StatusCode;
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::json;

use crate::catalog::{Tenant, TenantSpec};
use crate::cluster::rpc::tenant_work_everywhere;
use crate::cluster::{Cluster, NodeState};
use crate::jsonapi::ApiError;
use crate::model::Store;
use crate::telemetry::Metrics;
use crate::tenancy::Authenticator;

#[derive(Clone)]
pub struct AdminState {
    pub store: Store,
    pub auth: Authenticator,
    pub metrics: Arc<Metrics>,
    pub token: Arc<str>,
    pub ready: Arc<AtomicBool>,
    pub node: Arc<serde_json::Value>,
    pub cluster: Cluster,
    pub replicator: crate::cluster::replication::Replicator,
}

pub fn router(state: AdminState) -> Router {
    let api = Router::new()
        .route("/admin/v1/node", get(node))
        .route("/admin/v1/nodes", get(nodes))
        .route("/admin/v1/layout", get(layout))
        .route("/admin/v1/tenants", get(list_tenants).post(create_tenant))
        .route(
            "/admin/v1/tenants/{name}",
            get(get_tenant).put(update_tenant).delete(delete_tenant),
        )
        .route("/admin/v1/tenants/{name}/usage", get(usage))
        .route(
            "/admin/v1/tenants/{name}/suspended",
            axum::routing::put(set_suspended),
        )
        .route(
            "/admin/v1/tenants/{name}/keys",
            get(list_keys).post(create_key),
        )
        .route(
            "/admin/v1/tenants/{name}/keys/{key}",
            axum::routing::delete(revoke_key),
        )
        .route_layer(middleware::from_fn_with_state(state.clone(), require_token));
    Router::new()
        .merge(api)
        .route(
            "/metrics",
            get(|State(s): State<AdminState>| async move {
                (
                    [(
                        "content-type",
                        "application/openmetrics-text; version=1.0.0; charset=utf-8",
                    )],
                    s.metrics.render(),
                )
            }),
        )
        .route("/healthz", get(|| async { "ok" }))
        .route(
            "/readyz",
            get(|State(s): State<AdminState>| async move {
                if s.ready.load(Ordering::Relaxed) {
                    (StatusCode::OK, "ready")
                } else {
                    (StatusCode::SERVICE_UNAVAILABLE, "starting")
                }
            }),
        )
        .fallback(|| async {
            ApiError::new(
                StatusCode::NOT_FOUND,
                "NoSuchRoute",
                "see docs/admin-api.md",
            )
        })
        .with_state(state)
}

async fn require_token(State(s): State<AdminState>, req: Request, next: Next) -> Response {
    match crate::jsonapi::check_bearer(
        req.headers(),
        Some(&s.token),
        "a valid admin bearer token is required",
    ) {
        Ok(()) => next.run(req).await,
        Err(e) => e.into_response(),
    }
}

pub fn check_tenant_name(name: &str) -> Result<(), ApiError> {
    let ok = !name.is_empty()
        && name.len() <= 128
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"-_.".contains(&b))
        && name.as_bytes()[0].is_ascii_alphanumeric();
    if ok {
        Ok(())
    } else {
        Err(ApiError::bad_request(
            "tenant names are 1 to 128 characters of [a-z0-9._-], starting with a letter or digit",
        ))
    }
}

async fn tenant(s: &AdminState, name: &str) -> Result<Tenant, ApiError> {
    s.store
        .catalog()
        .tenant_by_name(name)
        .await?
        .ok_or_else(|| {
            ApiError::new(
                StatusCode::NOT_FOUND,
                "NoSuchTenant",
                format!("tenant {name:?} does not exist"),
            )
        })
}

fn json_rejection(e: axum::extract::rejection::JsonRejection) -> ApiError {
    ApiError::new(StatusCode::BAD_REQUEST, "MalformedJSON", e.body_text())
}

async fn node(State(s): State<AdminState>) -> Json<serde_json::Value> {
    Json((*s.node).clone())
}

/// The cluster's members as this node judges them.
async fn nodes(State(s): State<AdminState>) -> Json<serde_json::Value> {
    let nodes = s.cluster.nodes();
    let count = |st: NodeState| nodes.iter().filter(|n| n.state == st).count();
    let mut v = json!({
        "alive": count(NodeState::Alive),
        "suspected": count(NodeState::Suspected),
        "failed": count(NodeState::Failed),
        "nodes": nodes,
    });
    // The cold tier as this node last found it (the operator's ColdTierReachable).
    if let Some(cold) = s.store.cold_tier() {
        v["coldTier"] = json!({"url": cold.url, "reachable": cold.reachable()});
    }
    Json(v)
}

/// A summary of the current partition layout; `?partitions=true` adds every
/// partition's replica set (primary first).
async fn layout(
    State(s): State<AdminState>,
    Query(q): Query<LayoutQuery>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let Some(l) = s.cluster.layout() else {
        return Err(ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "NoLayout",
            "no partition layout is known yet",
        ));
    };
    let load = l.load();
    // Who acts as primary (the catalog's partition states), next to the layout's plan.
    let states = s.cluster.partition_states();
    let leading = |id: &crate::types::NodeId| {
        states
            .iter()
            .flatten()
            .filter(|st| st.primary == *id)
            .count()
    };
    let members: Vec<serde_json::Value> = l
        .members
        .iter()
        .zip(load)
        .map(|(m, (primary, held))| {
            json!({"id": m.id.0, "zone": m.zone, "capacity": m.capacity,
                   "primaryPartitions": primary, "partitions": held,
                   "actingPrimaryPartitions": leading(&m.id)})
        })
        .collect();
    // Index n: how many partitions have n replicas (lets a caller count those below
    // its own minimum, such as the operator with minInSync).
    let mut by_count = vec![0u32; l.factor as usize + 1];
    for set in &l.replicas {
        if let Some(c) = by_count.get_mut(set.len()) {
            *c += 1;
        }
    }
    let mut body = json!({
        "version": l.version,
        "partitions": l.partitions,
        "replicationFactor": l.factor,
        "underReplicatedPartitions": l.under_replicated(),
        "partitionsByReplicaCount": by_count,
        "partitionsWithoutPrimary": states.iter().filter(|st| st.is_none()).count(),
        // Partitions whose in-sync set is smaller than the factor (a replica is behind).
        "partitionsOutOfSync": states
            .iter()
            .flatten()
            .filter(|st| st.in_sync.len() < l.factor as usize)
            .count(),
        "members": members,
        // Partitions this node leads and serves now (checked against their replicas).
        "partitionsServedHere": (0..l.partitions)
            .filter(|&p| s.replicator.serving(crate::types::PartitionId(p)))
            .count(),
    });
    if q.partitions {
        body["replicaSets"] = json!(
            (0..l.partitions)
                .map(|p| l
                    .replicas(crate::types::PartitionId(p))
                    .map(|m| m.id.0.as_str())
                    .collect::<Vec<_>>())
                .collect::<Vec<_>>()
        );
        body["inSync"] = json!(
            states
                .iter()
                .map(|st| st.as_ref().map(|st| st
                    .in_sync
                    .iter()
                    .map(|n| n.0.as_str())
                    .collect::<Vec<_>>()))
                .collect::<Vec<_>>()
        );
        body["actingPrimaries"] = json!(
            states
                .iter()
                .map(|st| st.as_ref().map(|st| st.primary.0.as_str()))
                .collect::<Vec<_>>()
        );
    }
    Ok(Json(body))
}

#[derive(Deserialize)]
struct LayoutQuery {
    #[serde(default)]
    partitions: bool,
}

async fn list_tenants(State(s): State<AdminState>) -> Result<Json<serde_json::Value>, ApiError> {
    Ok(Json(
        json!({"tenants": s.store.catalog().list_tenants().await?}),
    ))
}

async fn create_tenant(
    State(s): State<AdminState>,
    body: Result<Json<serde_json::Value>, axum::extract::rejection::JsonRejection>,
) -> Result<Response, ApiError> {
    let Json(v) = body.map_err(json_rejection)?;
    // The name is not part of the spec: split it off by hand.
    let mut obj = v
        .as_object()
        .cloned()
        .ok_or_else(|| ApiError::bad_request("expected a JSON object"))?;
    let name = obj
        .remove("name")
        .and_then(|n| n.as_str().map(str::to_string))
        .ok_or_else(|| ApiError::bad_request("name is required"))?;
    let spec = TenantSpec::from_input(serde_json::Value::Object(obj))
        .map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, "MalformedJSON", e))?;
    check_tenant_name(&name)?;
    check_spec(&spec)?;
    let t = s.store.catalog().create_tenant(&name, &spec).await?;
    tracing::info!(tenant = %t.name, id = %t.id, "tenant created");
    Ok((StatusCode::CREATED, Json(t)).into_response())
}

/// Refuses settings outside their documented ranges (the Tenant CRD's bounds).
fn check_spec(spec: &TenantSpec) -> Result<(), ApiError> {
    if let Some(w) = spec.qos.weight
        && !(1..=10_000).contains(&w)
    {
        return Err(ApiError::bad_request(format!(
            "qos.weight must be between 1 and 10000, not {w}"
        )));
    }
    if let Some(b) = spec
        .tiering
        .buckets
        .iter()
        .find(|b| !(3..=63).contains(&b.len()))
    {
        return Err(ApiError::bad_request(format!(
            "tiering.buckets: {b:?} is not a bucket name (3 to 63 characters)"
        )));
    }
    if spec.tiering.prefix.len() > 1024 {
        return Err(ApiError::bad_request(
            "tiering.prefix is longer than an object key can be (1024 bytes)",
        ));
    }
    if spec.tiering.restore_after_reads == Some(0) {
        return Err(ApiError::bad_request(
            "tiering.restoreAfterReads must be at least 1 (leave it out to never restore)",
        ));
    }
    Ok(())
}

async fn get_tenant(
    State(s): State<AdminState>,
    Path(name): Path<String>,
) -> Result<Json<Tenant>, ApiError> {
    Ok(Json(tenant(&s, &name).await?))
}

async fn update_tenant(
    State(s): State<AdminState>,
    Path(name): Path<String>,
    body: Result<Json<serde_json::Value>, axum::extract::rejection::JsonRejection>,
) -> Result<Json<Tenant>, ApiError> {
    let Json(v) = body.map_err(json_rejection)?;
    let spec = TenantSpec::from_input(v)
        .map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, "MalformedJSON", e))?;
    check_spec(&spec)?;
    let was_suspended = tenant(&s, &name).await?.spec.suspended;
    let t = s.store.catalog().update_tenant(&name, &spec).await?;
    changed(&s, &t, was_suspended).await;
    Ok(Json(t))
}

/// Applies a tenant's changed settings on this node at once (on the others within
/// quota::SPEC_TTL and the access-key cache's bound).
async fn changed(s: &AdminState, t: &Tenant, was_suspended: bool) {
    s.store.quotas().invalidate(t.id);
    // A suspension (or its end) applies on this node from the next request.
    if was_suspended != t.spec.suspended {
        s.auth.invalidate_tenant(t.id).await;
        if !t.spec.suspended {
            s.auth.forget_unknown();
        }
    }
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct Suspension {
    suspended: bool,
}

/// `PUT /admin/v1/tenants/{name}/suspended {"suspended": bool}`: suspends a tenant (or
/// ends it) without rewriting the rest of its settings, so fields a newer node stored
/// survive (a read, change and `PUT /tenants/{name}` through this node would drop them).
async fn set_suspended(
    State(s): State<AdminState>,
    Path(name): Path<String>,
    body: Result<Json<Suspension>, axum::extract::rejection::JsonRejection>,
) -> Result<Json<Tenant>, ApiError> {
    let Json(Suspension { suspended }) = body.map_err(json_rejection)?;
    let t = match s.store.catalog().set_suspended(&name, suspended).await {
        Ok(t) => t,
        Err(crate::catalog::CatalogError::NotFound(_)) => {
            return Err(ApiError::new(
                StatusCode::NOT_FOUND,
                "NoSuchTenant",
                format!("tenant {name:?} does not exist"),
            ));
        }
        Err(crate::catalog::CatalogError::Invalid(m)) => {
            // The spec kept changing under the compare-and-set: nothing was written.
            return Err(ApiError::new(StatusCode::CONFLICT, "Conflict", m));
        }
        Err(e) => return Err(e.into()),
    };
    // Applied here at once whatever the flag was before (a concurrent change may have
    // set it already): the caches forget the tenant either way.
    changed(&s, &t, !suspended).await;
    Ok(Json(t))
}

#[derive(Deserialize)]
struct DeleteQuery {
    #[serde(default)]
    purge: bool,
}

async fn delete_tenant(
    State(s): State<AdminState>,
    Path(name): Path<String>,
    Query(q): Query<DeleteQuery>,
) -> Result<StatusCode, ApiError> {
    let t = tenant(&s, &name).await?;
    let everywhere =
        |work| tenant_work_everywhere(&s.cluster, &s.store, t.id, work, CLUSTER_WORK_TIMEOUT);
    if q.purge {
        everywhere("purge").await?;
    } else if !s.store.list_buckets(t.id).await?.is_empty()
        || everywhere("has-kv")
            .await?
            .iter()
            .any(|a| a["hasKv"].as_bool() == Some(true))
    {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            "TenantNotEmpty",
            "the tenant still has buckets or KV keys; delete them first or pass ?purge=true",
        ));
    }
    s.store.catalog().delete_tenant(t.id).await?;
    s.auth.invalidate_tenant(t.id).await;
    tracing::info!(tenant = %name, purge = q.purge, "tenant deleted");
    Ok(StatusCode::NO_CONTENT)
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct CreateKey {
    #[serde(default)]
    description: String,
}

async fn create_key(
    State(s): State<AdminState>,
    Path(name): Path<String>,
    body: Option<Json<CreateKey>>,
) -> Result<Response, ApiError> {
    let t = tenant(&s, &name).await?;
    let desc = body.map(|b| b.0.description).unwrap_or_default();
    let c = s.store.catalog().create_access_key(t.id, &desc).await?;
    // Usable at once here even if the id was tried (and remembered as unknown) before.
    s.auth.invalidate(&c.access_key_id).await;
    tracing::info!(tenant = %name, access_key_id = %c.access_key_id, "access key issued");
    Ok((
        StatusCode::CREATED,
        Json(json!({"accessKeyId": c.access_key_id, "secretAccessKey": c.secret_access_key, "tenant": name})),
    )
        .into_response())
}

async fn list_keys(
    State(s): State<AdminState>,
    Path(name): Path<String>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let t = tenant(&s, &name).await?;
    Ok(Json(
        json!({"keys": s.store.catalog().list_access_keys(t.id).await?}),
    ))
}

async fn revoke_key(
    State(s): State<AdminState>,
    Path((name, key)): Path<(String, String)>,
) -> Result<StatusCode, ApiError> {
    let t = tenant(&s, &name).await?;
    if !s.store.catalog().revoke_access_key(t.id, &key).await? {
        return Err(ApiError::new(
            StatusCode::NOT_FOUND,
            "NoSuchKey",
            "no live access key with that id for this tenant",
        ));
    }
    s.auth.invalidate(&key).await;
    tracing::info!(tenant = %name, access_key_id = %key, "access key revoked");
    Ok(StatusCode::NO_CONTENT)
}

async fn usage(
    State(s): State<AdminState>,
    Path(name): Path<String>,
) -> Result<Json<crate::model::bucket::Usage>, ApiError> {
    let t = tenant(&s, &name).await?;
    let mut total = crate::model::bucket::Usage::default();
    for share in
        tenant_work_everywhere(&s.cluster, &s.store, t.id, "usage", CLUSTER_WORK_TIMEOUT).await?
    {
        let u: crate::model::bucket::Usage = serde_json::from_value(share).map_err(|e| {
            ApiError::new(
                StatusCode::BAD_GATEWAY,
                "BadPeerAnswer",
                format!("a peer's usage report is malformed: {e}"),
            )
        })?;
        total.add(&u);
    }
    Ok(Json(total))
}

/// How long a peer gets for its share of a tenant-wide usage report or purge.
const CLUSTER_WORK_TIMEOUT: Duration = Duration::from_secs(600);
