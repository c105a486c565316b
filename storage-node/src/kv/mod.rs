//! The KV front end: HTTP/JSON over the model's KV namespaces, authenticated with
//! AWS SigV4 using the tenant's access keys. API reference: docs/kv-api.md; the
//! OpenAPI document is served at `/kv/v1/openapi.json`.

use std::time::Instant;

use axum::Router;
use axum::body::{Body, to_bytes};
use axum::extract::{Request, State};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use base64::Engine as _;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use serde::Deserialize;
use serde_json::json;
use tracing::Instrument;

use crate::cluster::forward::{Decision, Forwarded, Forwarder, NOT_PRIMARY};
use crate::jsonapi::ApiError;
use crate::model::Store;
use crate::model::kv::{Entry, KvCondition, MAX_PAGE_BYTES, MAX_VALUE, entry_cost};
use crate::telemetry::{Metrics, OpSlot};
use crate::tenancy::Authenticator;
use crate::tenancy::budget::{MemoryBudget, Reservation};
use crate::tenancy::sigv4::{self, SigError, SignedRequest};
use crate::types::TenantId;

pub const OPENAPI: &str = include_str!("openapi.json");

#[derive(Clone)]
pub struct KvState {
    /// The cluster's region: the credential scope of every request must name it.
    pub region: String,
    pub store: Store,
    pub auth: Authenticator,
    pub metrics: std::sync::Arc<Metrics>,
    /// The node's memory budget: every body, value and page held reserves from it.
    pub budget: MemoryBudget,
    /// Sends requests for namespaces another node leads to that node.
    pub forwarder: Forwarder,
    /// Answers wait until the writes they follow are durable on the in-sync replicas.
    pub replication: (crate::cluster::replication::Replicator, std::time::Duration),
}

pub fn router(state: KvState) -> Router {
    Router::new()
        .route(
            "/kv/v1/openapi.json",
            get(|| async { ([("content-type", "application/json")], OPENAPI) }),
        )
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(|| async { "ok" }))
        .fallback(handle)
        .with_state(state)
}

fn sig_error(e: SigError) -> ApiError {
    match e {
        SigError::Missing => ApiError::new(
            StatusCode::UNAUTHORIZED,
            "MissingAuthentication",
            e.to_string(),
        ),
        SigError::Malformed(_) => ApiError::new(
            StatusCode::BAD_REQUEST,
            "AuthorizationHeaderMalformed",
            e.to_string(),
        ),
        SigError::TimeTooSkewed => {
            ApiError::new(StatusCode::FORBIDDEN, "RequestTimeTooSkewed", e.to_string())
        }
        SigError::Mismatch => ApiError::new(
            StatusCode::FORBIDDEN,
            "SignatureDoesNotMatch",
            e.to_string(),
        ),
        SigError::ContentSha256Mismatch => ApiError::new(
            StatusCode::BAD_REQUEST,
            "XAmzContentSHA256Mismatch",
            e.to_string(),
        ),
        SigError::UnsignedHeader(_) => ApiError::new(
            StatusCode::FORBIDDEN,
            "SignatureDoesNotMatch",
            e.to_string(),
        ),
    }
}

/// The namespace a KV path names (`/kv/v1/{ns}[/{key}]`), if it is well formed; a
/// malformed one is served locally, where it gets its error.
fn namespace(path: &str) -> Option<String> {
    let rest = path.strip_prefix("/kv/v1/")?;
    let ns = rest.split('/').next()?;
    String::from_utf8(decode(ns).ok()?)
        .ok()
        .filter(|n| !n.is_empty())
}

/// Percent-decodes a path segment or query value into raw bytes (binary-safe keys).
fn decode(s: &str) -> Result<Vec<u8>, ApiError> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'%' => {
                let hex = b
                    .get(i + 1..i + 3)
                    .ok_or_else(|| ApiError::bad_request("truncated percent-encoding"))?;
                let v = std::str::from_utf8(hex)
                    .ok()
                    .and_then(|h| u8::from_str_radix(h, 16).ok())
                    .ok_or_else(|| ApiError::bad_request("bad percent-encoding"))?;
                out.push(v);
                i += 3;
            }
            c => {
                out.push(c);
                i += 1;
            }
        }
    }
    Ok(out)
}

#[derive(Deserialize, Default)]
struct ScanQuery {
    prefix: Option<String>,
    start: Option<String>,
    end: Option<String>,
    cursor: Option<String>,
    limit: Option<usize>,
}

fn query_bytes(q: &Option<String>) -> Result<Option<Vec<u8>>, ApiError> {
    q.as_deref().map(decode).transpose()
}

/// One entry as JSON: `{"key", "keyText", "version", "value", "expiresAt"}` (and
/// `"found": true` in batch answers), written straight into bytes: the value is
/// base64-encoded once, with no intermediate JSON tree.
fn entry_json(e: &Entry, found: bool) -> bytes::Bytes {
    let mut out = String::with_capacity(e.value.len() * 4 / 3 + e.key.len() * 3 + 128);
    out.push_str("{\"key\":\"");
    STANDARD.encode_string(&e.key, &mut out);
    out.push_str("\",\"keyText\":");
    out.push_str(&serde_json::to_string(&std::str::from_utf8(&e.key).ok()).unwrap_or_default());
    out.push_str(&format!(",\"version\":{},\"value\":\"", e.version));
    STANDARD.encode_string(&e.value, &mut out);
    out.push_str("\",\"expiresAt\":");
    out.push_str(&e.expires_at.map_or("null".into(), |t| t.to_string()));
    if found {
        out.push_str(",\"found\":true");
    }
    out.push('}');
    bytes::Bytes::from(out)
}

/// Bytes to reserve for a page of raw size `raw` while it is sent: the page itself
/// plus the JSON of its largest entry (entries are rendered one at a time).
fn page_reservation(raw: usize, largest: usize) -> usize {
    raw + largest * 4 / 3 + 4096
}

/// What a scan page or batch answer reserves before it is read: the most it can be.
const PAGE_RESERVE: usize = MAX_PAGE_BYTES + (MAX_VALUE + 2048) * 4 / 3 + 4096;
/// The largest single entry's cost ([`entry_cost`] of a 1 KiB key and a 1 MiB value).
const MAX_ENTRY_COST: usize = MAX_VALUE + 1024 + 64;
/// What a page of one entry at most reserves.
const SMALL_PAGE_RESERVE: usize = MAX_ENTRY_COST + (MAX_VALUE + 2048) * 4 / 3 + 4096;

/// Reserves memory for a scan page or batch answer and returns the byte cap to read it
/// with: a full page when the budget allows, else (under pressure) a page of one entry,
/// so reads shrink before they are refused.
fn reserve_page(st: &KvState) -> Result<(Reservation, usize), ApiError> {
    if let Some(r) = st.budget.try_reserve(PAGE_RESERVE) {
        return Ok((r, MAX_PAGE_BYTES));
    }
    Ok((reserve(st, SMALL_PAGE_RESERVE)?, MAX_ENTRY_COST))
}

fn slow_down() -> ApiError {
    ApiError::new(
        StatusCode::SERVICE_UNAVAILABLE,
        "SlowDown",
        "the node's memory budget for requests in flight is exhausted; retry shortly",
    )
}

fn reserve(st: &KvState, bytes: usize) -> Result<Reservation, ApiError> {
    st.budget.try_reserve(bytes).ok_or_else(slow_down)
}

/// A JSON response streamed piece by piece: `head`, the rendered items separated by
/// commas, then `tail`. Each item is rendered when the client is ready for it and
/// dropped once sent; `hold` (the memory reservation) lives until the body is done.
fn streamed_json<T: Send + 'static>(
    head: String,
    items: Vec<T>,
    render: fn(T) -> bytes::Bytes,
    tail: String,
    hold: Reservation,
) -> Response {
    use futures::StreamExt;
    let pieces = std::iter::once(bytes::Bytes::from(head))
        .chain(items.into_iter().enumerate().flat_map(move |(i, item)| {
            let sep = (i > 0).then(|| bytes::Bytes::from_static(b","));
            sep.into_iter().chain(std::iter::once(render(item)))
        }))
        .chain(std::iter::once(bytes::Bytes::from(tail)));
    let stream = futures::stream::iter(pieces).map(move |b| {
        let _held = &hold;
        Ok::<_, std::convert::Infallible>(b)
    });
    let mut r = Response::new(Body::from_stream(stream));
    r.headers_mut()
        .insert("content-type", HeaderValue::from_static("application/json"));
    r
}

fn parse_version(h: &HeaderValue) -> Result<u64, ApiError> {
    h.to_str()
        .ok()
        .map(|s| s.trim().trim_matches('"'))
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| ApiError::bad_request("If-Match must be a version number"))
}

fn condition(h: &HeaderMap) -> Result<KvCondition, ApiError> {
    match (h.get("if-match"), h.get("if-none-match")) {
        (Some(_), Some(_)) => Err(ApiError::bad_request(
            "use If-Match or If-None-Match, not both",
        )),
        (Some(v), None) => Ok(KvCondition::IfVersion(parse_version(v)?)),
        (None, Some(v)) if v.as_bytes() == b"*" => Ok(KvCondition::IfAbsent),
        (None, Some(_)) => Err(ApiError::bad_request("If-None-Match supports only *")),
        (None, None) => Ok(KvCondition::None),
    }
}

/// Largest request body the KV API reads: a value plus room for a batch request.
const MAX_BODY: usize = MAX_VALUE + 64 * 1024;

fn too_large() -> ApiError {
    ApiError::new(
        StatusCode::PAYLOAD_TOO_LARGE,
        "EntityTooLarge",
        format!("request bodies are at most {MAX_VALUE} bytes"),
    )
}

/// Authenticates the request and only then reads its body (at most [`MAX_BODY`]).
///
/// Everything that needs no body is checked first: the Authorization header, date,
/// credential scope, signed headers and the access key, so a request without valid
/// credentials is refused before a single body byte is read. When the client sends
/// `x-amz-content-sha256` (as S3 clients do), the signature itself is verified before
/// the body is read, and the body is then checked against that hash. Without it the
/// signature covers the body's hash, so the body (bounded) is read first.
async fn authenticate(
    st: &KvState,
    parts: &axum::http::request::Parts,
    body: Body,
) -> Result<(TenantId, bytes::Bytes, Reservation), ApiError> {
    let h = parts
        .headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .ok_or_else(|| sig_error(SigError::Missing))?;
    let a = sigv4::parse_authorization(h).map_err(sig_error)?;
    let mut req = SignedRequest {
        region: &st.region,
        service: "kv",
        method: parts.method.as_str(),
        raw_path: parts.uri.path(),
        query: parts.uri.query(),
        headers: &parts.headers,
        body: &[],
        now_unix: crate::types::now_millis() / 1000,
    };
    sigv4::check_head(&req, &a).map_err(sig_error)?;
    let creds = st.auth.lookup(a.access_key_id).await?.ok_or_else(|| {
        ApiError::new(
            StatusCode::FORBIDDEN,
            "InvalidAccessKeyId",
            "the access key does not exist or was revoked",
        )
    })?;
    let declared_len = parts
        .headers
        .get(axum::http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared_len.is_some_and(|n| n > MAX_BODY as u64) {
        return Err(too_large());
    }
    let claimed = parts
        .headers
        .get("x-amz-content-sha256")
        .and_then(|v| v.to_str().ok());
    if let Some(hash) = claimed {
        sigv4::verify_with_payload_hash(&req, &a, &creds.secret_access_key, hash)
            .map_err(sig_error)?;
    }
    // Reserve what the body may take before reading it.
    let chunked = parts
        .headers
        .contains_key(axum::http::header::TRANSFER_ENCODING);
    let expect = match declared_len {
        Some(n) => n as usize,
        None if chunked => MAX_BODY,
        None => 0,
    };
    let hold = reserve(st, expect)?;
    let body = to_bytes(body, expect.max(if chunked { MAX_BODY } else { 0 }))
        .await
        .map_err(|_| too_large())?;
    req.body = &body;
    // With a claimed hash this checks the body against it; without, the signature.
    sigv4::verify(&req, &a, &creds.secret_access_key).map_err(sig_error)?;
    Ok((creds.tenant_id, body, hold))
}

/// Answers one KV request, from a client or forwarded by a peer ([`Forwarded`]).
pub(crate) async fn handle(State(st): State<KvState>, req: Request) -> Response {
    let started = Instant::now();
    let slot = OpSlot::default();
    let hold = crate::tenancy::rate::HoldSlot::default();
    let forwarded = req.extensions().get::<Forwarded>().is_some();
    let span = tracing::info_span!(
        "kv",
        front = "kv",
        forwarded,
        operation = tracing::field::Empty,
        tenant = tracing::field::Empty,
        bucket = tracing::field::Empty,
        status = tracing::field::Empty,
        bytes = tracing::field::Empty,
        primary = tracing::field::Empty
    );
    crate::cluster::forward::continue_trace(&span, &req);
    let resp = async {
        let (parts, body) = req.into_parts();
        let container = namespace(parts.uri.path()).map(|ns| crate::model::kv::kv_container(&ns));
        match st.forwarder.route("kv", &parts, container.as_deref()).await {
            Ok(Decision::Local) => {}
            Err(answer) => {
                slot.set("Forward");
                return forwarded_answer(answer);
            }
            Ok(Decision::Refuse {
                message,
                not_primary,
            }) => {
                slot.set(Decision::refusal_name(not_primary));
                let mut r = ApiError::unavailable(message).into_response();
                if not_primary {
                    r.headers_mut()
                        .insert(NOT_PRIMARY, HeaderValue::from_static("1"));
                }
                return r;
            }
            Ok(Decision::Forward { node, rpc_addr }) => {
                slot.set("Forward");
                tracing::Span::current().record("primary", node.0.as_str());
                let body = reqwest::Body::wrap_stream(body.into_data_stream());
                return forwarded_answer(
                    st.forwarder
                        .forward("kv", &node, &rpc_addr, &parts, body)
                        .await,
                );
            }
        }
        // Puts, deletes and batch writes must find their partition able to take a write
        // (checked after authentication); reads (GET, HEAD, batchGet) never are refused so.
        let write = match parts.method {
            Method::GET | Method::HEAD => false,
            Method::POST => parts.uri.query() != Some("batchGet"),
            _ => true,
        };
        let req = Request::from_parts(parts, body);
        let (resp, touched) =
            crate::model::tracking_partitions(write, dispatch(&st, req, &slot, &hold)).await;
        let (replicator, wait) = &st.replication;
        if let Err(why) = replicator.barrier(&touched, *wait).await {
            // A read changed nothing: it may simply be retried (503). A write's outcome is
            // unknown: 500, not 503 (503 always means nothing took effect).
            if !write {
                slot.set("NotServable");
                tracing::debug!(%why, "read not released");
                return ApiError::unavailable(crate::cluster::READ_NOT_CONFIRMED).into_response();
            }
            slot.set("NotDurable");
            return ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "NotDurable", why)
                .into_response();
        }
        match resp {
            Ok(r) => r,
            Err(e) => e.into_response(),
        }
    }
    .instrument(span.clone())
    .await;
    // The tenant's concurrent request ends with its response body.
    let resp = match hold.take() {
        Some(held) => resp.map(|b| Body::new(crate::tenancy::rate::Held::new(b, held))),
        None => resp,
    };
    span.record("status", resp.status().as_u16());
    st.metrics
        .observe("kv", slot.get(), resp.status().as_u16(), started);
    resp
}

async fn dispatch(
    st: &KvState,
    req: Request,
    slot: &OpSlot,
    hold: &crate::tenancy::rate::HoldSlot,
) -> Result<Response, ApiError> {
    let (parts, body) = req.into_parts();
    let path = parts.uri.path().to_string();
    let rest = path.strip_prefix("/kv/v1/").ok_or_else(|| {
        ApiError::new(
            StatusCode::NOT_FOUND,
            "NoSuchRoute",
            "KV paths start with /kv/v1/",
        )
    })?;
    let (ns, key) = match rest.split_once('/') {
        Some((ns, key)) => (ns.to_string(), Some(decode(key)?)),
        None => (rest.to_string(), None),
    };
    let ns = String::from_utf8(decode(&ns)?)
        .map_err(|_| ApiError::bad_request("namespace must be UTF-8"))?;
    let (tenant, body, _body_hold) = authenticate(st, &parts, body).await?;
    let held = st
        .auth
        .limits()
        .admit(tenant, body.len() as u64)
        .await
        .map_err(|th| ApiError::slow_down(&th))?;
    // Held until the response body is done (see `handle`).
    hold.put(held);
    // The request's fair turn at the node's I/O scheduler.
    st.store
        .io_scheduler()
        .turn(
            crate::tenancy::sched::Class::Tenant(tenant),
            body.len() as u64,
        )
        .await;
    let span = tracing::Span::current();
    span.record("tenant", tracing::field::display(tenant));
    span.record("bucket", ns.as_str());
    let key = key.filter(|k| !k.is_empty());
    match (parts.method.clone(), key) {
        (Method::GET | Method::HEAD, Some(key)) => {
            slot.set("Get");
            let mut hold = reserve(st, MAX_VALUE + 1024)?;
            let e = st
                .store
                .kv_get(tenant, &ns, &key)
                .await?
                .ok_or_else(|| ApiError::from(crate::model::Error::NoSuchKey))?;
            span.record("bytes", e.value.len());
            if parts.method == Method::GET {
                st.auth.limits().charge(tenant, e.value.len() as u64);
            }
            let mut r = Response::new(if parts.method == Method::HEAD {
                Body::empty()
            } else {
                use futures::StreamExt;
                hold.shrink_to(e.value.len());
                let value = bytes::Bytes::from(e.value);
                Body::from_stream(futures::stream::once(async move { value }).map(move |b| {
                    let _held = &hold;
                    Ok::<_, std::convert::Infallible>(b)
                }))
            });
            let h = r.headers_mut();
            h.insert(
                "content-type",
                HeaderValue::from_static("application/octet-stream"),
            );
            h.insert(
                "etag",
                HeaderValue::from_str(&format!("\"{}\"", e.version))
                    .unwrap_or(HeaderValue::from_static("\"0\"")),
            );
            h.insert("x-granary-version", HeaderValue::from(e.version));
            if let Some(t) = e.expires_at {
                h.insert("x-granary-expires-at", HeaderValue::from(t));
            }
            Ok(r)
        }
        (Method::PUT, Some(key)) => {
            slot.set("Put");
            let cond = condition(&parts.headers)?;
            let ttl = match parts.headers.get("x-granary-ttl") {
                Some(v) => Some(
                    v.to_str()
                        .ok()
                        .and_then(|s| s.trim().parse::<u64>().ok())
                        .filter(|s| *s > 0)
                        .ok_or_else(|| {
                            ApiError::bad_request(
                                "X-Granary-TTL must be a positive number of seconds",
                            )
                        })?
                        .saturating_mul(1000),
                ),
                None => None,
            };
            span.record("bytes", body.len());
            let version = st
                .store
                .kv_put(tenant, &ns, &key, Vec::from(body), cond, ttl)
                .await?;
            let mut r = axum::Json(json!({"version": version})).into_response();
            r.headers_mut().insert(
                "etag",
                HeaderValue::from_str(&format!("\"{version}\""))
                    .unwrap_or(HeaderValue::from_static("\"0\"")),
            );
            Ok(r)
        }
        (Method::DELETE, Some(key)) => {
            slot.set("Delete");
            let cond = condition(&parts.headers)?;
            match st.store.kv_delete(tenant, &ns, &key, cond).await? {
                Some(v) => Ok(axum::Json(json!({"deletedVersion": v})).into_response()),
                None => Err(crate::model::Error::NoSuchKey.into()),
            }
        }
        (Method::GET, None) => {
            slot.set("Scan");
            let q: ScanQuery = match parts.uri.query() {
                Some(q) => serde_urlencoded_lite(q)?,
                None => ScanQuery::default(),
            };
            let after = match &q.cursor {
                Some(c) => Some(
                    URL_SAFE_NO_PAD
                        .decode(c)
                        .map_err(|_| ApiError::bad_request("bad cursor"))?,
                ),
                None => None,
            };
            let (mut hold, cap) = reserve_page(st)?;
            let page = st
                .store
                .kv_scan(
                    tenant,
                    &ns,
                    &query_bytes(&q.prefix)?.unwrap_or_default(),
                    query_bytes(&q.start)?,
                    query_bytes(&q.end)?,
                    after,
                    q.limit.unwrap_or(100),
                    cap,
                )
                .await?;
            let raw: usize = page
                .entries
                .iter()
                .map(|e| entry_cost(&e.key, &e.value))
                .sum();
            let largest = page
                .entries
                .iter()
                .map(|e| e.value.len())
                .max()
                .unwrap_or(0);
            hold.shrink_to(page_reservation(raw, largest));
            let cursor = page.next_after.map(|k| URL_SAFE_NO_PAD.encode(k));
            Ok(streamed_json(
                "{\"entries\":[".into(),
                page.entries,
                |e| entry_json(&e, false),
                format!("],\"cursor\":{}}}", json!(cursor)),
                hold,
            ))
        }
        (Method::POST, None) if parts.uri.query() == Some("batchGet") => {
            slot.set("BatchGet");
            #[derive(Deserialize)]
            struct Batch {
                keys: Vec<String>,
            }
            let b: Batch = serde_json::from_slice(&body).map_err(|e| {
                ApiError::new(StatusCode::BAD_REQUEST, "MalformedJSON", e.to_string())
            })?;
            let keys = b
                .keys
                .iter()
                .map(|k| {
                    STANDARD
                        .decode(k)
                        .map_err(|_| ApiError::bad_request("keys are base64"))
                })
                .collect::<Result<Vec<_>, _>>()?;
            drop(b);
            let (mut hold, cap) = reserve_page(st)?;
            let page = st.store.kv_get_many(tenant, &ns, keys, cap).await?;
            let raw: usize = page
                .read
                .iter()
                .map(|(k, e)| e.as_ref().map_or(k.len() + 64, |e| entry_cost(k, &e.value)))
                .sum();
            let largest = page
                .read
                .iter()
                .filter_map(|(_, e)| e.as_ref().map(|e| e.value.len()))
                .max()
                .unwrap_or(0);
            hold.shrink_to(page_reservation(raw, largest));
            let unprocessed: Vec<String> = page
                .unprocessed
                .iter()
                .map(|k| STANDARD.encode(k))
                .collect();
            Ok(streamed_json(
                "{\"entries\":[".into(),
                page.read,
                |(k, e)| match e {
                    Some(e) => entry_json(&e, true),
                    None => bytes::Bytes::from(
                        json!({"key": STANDARD.encode(k), "found": false}).to_string(),
                    ),
                },
                format!("],\"unprocessedKeys\":{}}}", json!(unprocessed)),
                hold,
            ))
        }
        _ => Err(ApiError::new(
            StatusCode::METHOD_NOT_ALLOWED,
            "MethodNotAllowed",
            "see docs/kv-api.md for the routes",
        )),
    }
}

/// Parses the scan query string; values stay percent-encoded for [`decode`].
fn serde_urlencoded_lite(q: &str) -> Result<ScanQuery, ApiError> {
    let mut s = ScanQuery::default();
    for pair in q.split('&').filter(|p| !p.is_empty()) {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        let v = Some(v.to_string());
        match k {
            "prefix" => s.prefix = v,
            "start" => s.start = v,
            "end" => s.end = v,
            "cursor" => s.cursor = v,
            "limit" => {
                s.limit = Some(
                    v.as_deref()
                        .and_then(|l| l.parse().ok())
                        .ok_or_else(|| ApiError::bad_request("limit must be a number"))?,
                )
            }
            _ => {
                return Err(ApiError::bad_request(format!(
                    "unknown query parameter {k:?}"
                )));
            }
        }
    }
    Ok(s)
}

/// The answer to a request forwarded to its namespace's primary: the primary's own, or
/// the error telling the client why none came.
fn forwarded_answer(
    answer: Result<http::Response<reqwest::Body>, crate::cluster::forward::ForwardError>,
) -> Response {
    match answer {
        Ok(r) => r.map(Body::new),
        Err(e) if e.outcome_unknown() => ApiError::new(
            StatusCode::BAD_GATEWAY,
            "OutcomeUnknown",
            "the node holding this namespace failed while handling the request; \
         whether it took effect is unknown",
        )
        .into_response(),
        Err(e) if e.busy => {
            ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "SlowDown", e.message).into_response()
        }
        Err(_) => ApiError::unavailable("the node holding this namespace cannot be reached; retry")
            .into_response(),
    }
}
