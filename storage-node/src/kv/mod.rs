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

use crate::jsonapi::ApiError;
use crate::model::Store;
use crate::model::kv::{Entry, KvCondition, MAX_VALUE};
use crate::telemetry::{Metrics, OpSlot};
use crate::tenancy::Authenticator;
use crate::tenancy::sigv4::{self, SigError, SignedRequest};
use crate::types::TenantId;

pub const OPENAPI: &str = include_str!("openapi.json");

#[derive(Clone)]
pub struct KvState {
    pub store: Store,
    pub auth: Authenticator,
    pub metrics: std::sync::Arc<Metrics>,
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
    }
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

fn entry_json(e: &Entry) -> serde_json::Value {
    json!({
        "key": STANDARD.encode(&e.key),
        "keyText": std::str::from_utf8(&e.key).ok(),
        "version": e.version,
        "value": STANDARD.encode(&e.value),
        "expiresAt": e.expires_at,
    })
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

async fn authenticate(
    st: &KvState,
    parts: &axum::http::request::Parts,
    body: &[u8],
) -> Result<TenantId, ApiError> {
    let h = parts
        .headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .ok_or_else(|| sig_error(SigError::Missing))?;
    let a = sigv4::parse_authorization(h).map_err(sig_error)?;
    let creds = st.auth.lookup(a.access_key_id).await?.ok_or_else(|| {
        ApiError::new(
            StatusCode::FORBIDDEN,
            "InvalidAccessKeyId",
            "the access key does not exist or was revoked",
        )
    })?;
    let req = SignedRequest {
        method: parts.method.as_str(),
        raw_path: parts.uri.path(),
        query: parts.uri.query(),
        headers: &parts.headers,
        body,
        now_unix: crate::types::now_millis() / 1000,
    };
    sigv4::verify(&req, &a, &creds.secret_access_key).map_err(sig_error)?;
    Ok(creds.tenant_id)
}

async fn handle(State(st): State<KvState>, req: Request) -> Response {
    let started = Instant::now();
    let slot = OpSlot::default();
    let span = tracing::info_span!(
        "kv",
        front = "kv",
        operation = tracing::field::Empty,
        tenant = tracing::field::Empty,
        bucket = tracing::field::Empty,
        status = tracing::field::Empty,
        bytes = tracing::field::Empty
    );
    let resp = async {
        match dispatch(&st, req, &slot).await {
            Ok(r) => r,
            Err(e) => e.into_response(),
        }
    }
    .instrument(span.clone())
    .await;
    span.record("status", resp.status().as_u16());
    st.metrics
        .observe("kv", slot.get(), resp.status().as_u16(), started);
    resp
}

async fn dispatch(st: &KvState, req: Request, slot: &OpSlot) -> Result<Response, ApiError> {
    let (parts, body) = req.into_parts();
    let body = to_bytes(body, MAX_VALUE + 64 * 1024).await.map_err(|_| {
        ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "EntityTooLarge",
            format!("request bodies are at most {MAX_VALUE} bytes"),
        )
    })?;
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
    let tenant = authenticate(st, &parts, &body).await?;
    let span = tracing::Span::current();
    span.record("tenant", tracing::field::display(tenant));
    span.record("bucket", ns.as_str());
    let key = key.filter(|k| !k.is_empty());
    match (parts.method.clone(), key) {
        (Method::GET | Method::HEAD, Some(key)) => {
            slot.set("Get");
            let e = st
                .store
                .kv_get(tenant, &ns, &key)
                .await?
                .ok_or_else(|| ApiError::from(crate::model::Error::NoSuchKey))?;
            span.record("bytes", e.value.len());
            let mut r = Response::new(if parts.method == Method::HEAD {
                Body::empty()
            } else {
                Body::from(e.value)
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
                .kv_put(tenant, &ns, &key, body.to_vec(), cond, ttl)
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
                )
                .await?;
            Ok(axum::Json(json!({
                "entries": page.entries.iter().map(entry_json).collect::<Vec<_>>(),
                "cursor": page.next_after.map(|k| URL_SAFE_NO_PAD.encode(k)),
            }))
            .into_response())
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
            let found = st.store.kv_get_many(tenant, &ns, keys.clone()).await?;
            let out: Vec<_> = keys
                .iter()
                .zip(found)
                .map(|(k, e)| match e {
                    Some(e) => {
                        let mut j = entry_json(&e);
                        j["found"] = json!(true);
                        j
                    }
                    None => json!({"key": STANDARD.encode(k), "found": false}),
                })
                .collect();
            Ok(axum::Json(json!({"entries": out})).into_response())
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
