//! The S3 listener's per-request path: refusals decided from the head alone, then
//! routing (serve here, or forward to the partition's primary), then s3s.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tracing::Instrument;

use crate::cluster::forward::{Decision, Forwarded, Forwarder, NOT_PRIMARY};
use crate::cluster::replication::Replicator;
use crate::telemetry::{Metrics, OpSlot};
use crate::tenancy::budget::MemoryBudget;

/// Everything one S3 request needs; cheap to clone.
#[derive(Clone)]
pub struct S3Front {
    s3: Arc<s3s::service::S3Service>,
    metrics: Arc<Metrics>,
    forwarder: Forwarder,
    domains: Arc<super::Domains>,
    /// Answers wait until the writes they follow are durable on the in-sync replicas.
    replication: (Replicator, Duration),
    /// The node's memory budget (shared with the KV API): XML request bodies, which
    /// s3s reads whole (up to 4 MiB), reserve from it first.
    budget: MemoryBudget,
    /// Random per process: the opaque part of each answer's `x-amz-id-2`.
    host_token: [u8; 12],
    /// Form uploads (POST Object) bypass s3s, which would buffer the file.
    post: super::GranaryS3,
}

/// Largest XML request body s3s reads (`s3_limits` in server.rs).
pub const XML_MAX: usize = 4 * 1024 * 1024;
/// What one object upload (PutObject, UploadPart, a form's file) holds in memory at
/// most while its body streams to disk: the piece being gathered and the one being
/// written (`model::data`, 1 MiB each). Reserved from the memory budget for the time of
/// the request, so that clients that send part of a body and stall cannot pile up
/// pieces past the budget.
pub const UPLOAD_HOLD: usize = 2 * 1024 * 1024;

impl S3Front {
    pub fn new(
        s3: Arc<s3s::service::S3Service>,
        metrics: Arc<Metrics>,
        forwarder: Forwarder,
        domains: Vec<String>,
        replication: (Replicator, Duration),
        budget: MemoryBudget,
        post: super::GranaryS3,
    ) -> Self {
        Self {
            s3,
            metrics,
            forwarder,
            domains: Arc::new(super::Domains(domains)),
            replication,
            budget,
            host_token: rand::random(),
            post,
        }
    }

    /// Answers one request, from a client or forwarded by a peer ([`Forwarded`]).
    pub async fn handle(&self, req: http::Request<s3s::Body>) -> http::Response<s3s::Body> {
        let started = Instant::now();
        let slot = OpSlot::default();
        let hold = crate::tenancy::rate::HoldSlot::default();
        let forwarded = req.extensions().get::<Forwarded>().is_some();
        let ids = RequestIds::new(&self.host_token);
        let span = tracing::info_span!("s3", front = "s3", method = %req.method(), forwarded,
            request_id = %ids.request_id, operation = tracing::field::Empty, tenant = tracing::field::Empty,
            bucket = tracing::field::Empty, status = tracing::field::Empty,
            bytes = tracing::field::Empty, primary = tracing::field::Empty);
        crate::cluster::forward::continue_trace(&span, &req);
        let (parts, body) = req.into_parts();
        let has_body = crate::cluster::forward::declares_body(&parts.headers);
        let resp = async {
            if let Some(refusal) = refuse_before_body(&parts) {
                slot.set("Refused");
                // The body is never read: dropping it closes a client's connection
                // (lingering briefly, see server::stall); a forwarded one is drained by
                // the RPC hop (cluster::rpc::DrainOnDrop).
                drop(body);
                return refusal;
            }
            let bucket = self.bucket(&parts);
            match self.forwarder.route("s3", &parts, bucket.as_deref()).await {
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
                    let mut r = s3_error_response(
                        http::StatusCode::SERVICE_UNAVAILABLE,
                        "ServiceUnavailable",
                        &message,
                    );
                    if not_primary {
                        r.headers_mut()
                            .insert(NOT_PRIMARY, http::HeaderValue::from_static("1"));
                    }
                    return r;
                }
                Ok(Decision::Forward { node, rpc_addr }) => {
                    slot.set("Forward");
                    tracing::Span::current().record("primary", node.0.as_str());
                    let body = reqwest::Body::wrap_stream(body);
                    return forwarded_answer(
                        self.forwarder
                            .forward("s3", &node, &rpc_addr, &parts, body)
                            .await,
                    );
                }
            }
            // An XML body is read whole by s3s (once the head's signature checks out): it
            // reserves its bytes first, and is refused at once when they are not there.
            // So do a form upload's fields, read before its policy can be checked, and
            // its file's pieces after them. An object upload reserves what its pieces
            // hold (`UPLOAD_HOLD`, or its whole body when smaller).
            let form = super::post::is_form_post(&parts);
            let xml = !form && self.xml_body(&parts);
            let upload = !form && !xml && parts.method == http::Method::PUT && has_body;
            let mut body_hold = if form || xml || upload {
                let declared = |name: &str| {
                    parts
                        .headers
                        .get(name)
                        .and_then(|v| v.to_str().ok()?.parse::<usize>().ok())
                };
                let want = if form {
                    super::post::FIELDS_MAX + UPLOAD_HOLD
                } else if xml {
                    declared("content-length").unwrap_or(XML_MAX).min(XML_MAX)
                } else {
                    // An aws-chunked body's length counts its chunk signatures too.
                    declared("x-amz-decoded-content-length")
                        .or_else(|| declared("content-length"))
                        .unwrap_or(UPLOAD_HOLD)
                        .min(UPLOAD_HOLD)
                };
                match self.budget.try_reserve(want) {
                    Some(r) => Some(r),
                    None => {
                        slot.set("SlowDown");
                        drop(body);
                        return s3_error_response(
                            http::StatusCode::SERVICE_UNAVAILABLE,
                            "SlowDown",
                            "the node's memory budget for requests in flight is exhausted; \
                             retry shortly",
                        );
                    }
                }
            } else {
                None
            };
            let method = parts.method.clone();
            // Anything but a read may write: the partitions it reaches must accept writes
            // (checked after authentication, on each bucket the request touches).
            let write = !matches!(method, http::Method::GET | http::Method::HEAD);
            let (resp, touched) = if form {
                slot.set("PostObject");
                let span = tracing::Span::current();
                span.record("operation", "PostObject");
                let bucket = bucket.unwrap_or_default();
                span.record("bucket", bucket.as_str());
                let post = async {
                    Ok(
                        match super::post::handle(
                            &self.post,
                            &self.forwarder,
                            &parts,
                            &bucket,
                            body,
                            body_hold.take(),
                        )
                        .await
                        {
                            Ok(r) => r,
                            Err(super::post::Refusal(status, code, message)) => {
                                s3_error_response(status, code, &message)
                            }
                        },
                    )
                };
                crate::model::tracking_partitions(true, post).await
            } else {
                let mut req = http::Request::from_parts(parts, body);
                req.extensions_mut().insert(slot.clone());
                req.extensions_mut().insert(hold.clone());
                crate::model::tracking_partitions(write, self.s3.call(req)).await
            };
            // s3s is done with the body: its bytes go back before the barrier's wait.
            drop(body_hold);
            let (replicator, wait) = &self.replication;
            if let Err(why) = replicator.barrier(&touched, *wait).await {
                // A read changed nothing: it may simply be retried (503). A write's
                // outcome is unknown: 500, not 503 (503 always means nothing took effect).
                if !write {
                    slot.set("NotServable");
                    tracing::debug!(%why, "read not released");
                    return s3_error_response(
                        http::StatusCode::SERVICE_UNAVAILABLE,
                        "ServiceUnavailable",
                        crate::cluster::READ_NOT_CONFIRMED,
                    );
                }
                slot.set("NotDurable");
                return s3_error_response(
                    http::StatusCode::INTERNAL_SERVER_ERROR,
                    "InternalError",
                    &why,
                );
            }
            match resp {
                Ok(r) => r,
                Err(e) => {
                    tracing::error!(error = ?e, "S3 request failed inside s3s");
                    s3_error_response(
                        http::StatusCode::INTERNAL_SERVER_ERROR,
                        "InternalError",
                        "the request could not be processed",
                    )
                }
            }
        }
        .instrument(span.clone())
        .await;
        let mut resp = ids.stamp(resp);
        // An error may come before the request body was read (a failed precondition, a
        // refused upload): the connection closes after it rather than being reused
        // with unread body bytes in it.
        // (Not on the hop from a forwarding node: that node closes its client's
        // connection itself, and keeps its pooled connection to this one.)
        if has_body && !forwarded && resp.status().as_u16() >= 400 {
            resp.headers_mut().insert(
                http::header::CONNECTION,
                http::HeaderValue::from_static("close"),
            );
        }
        // The tenant's concurrent request ends with its response body.
        let resp = match hold.take() {
            Some(held) => {
                resp.map(|b| s3s::Body::http_body_unsync(crate::tenancy::rate::Held::new(b, held)))
            }
            None => resp,
        };
        let status = resp.status().as_u16();
        span.record("status", status);
        self.metrics.observe("s3", slot.get(), status, started);
        resp
    }

    /// Whether s3s reads this request's body whole as XML: every POST (DeleteObjects,
    /// CompleteMultipartUpload; form uploads are refused earlier), a PUT of a
    /// subresource (`?tagging`, `?acl`, `?lifecycle`, ...) and a bucket-level PUT
    /// (CreateBucket's configuration). Object data (PutObject, UploadPart) streams.
    fn xml_body(&self, parts: &http::request::Parts) -> bool {
        use s3s::host::S3Host;
        match parts.method {
            http::Method::POST => true,
            http::Method::PUT => {
                let subresource = parts.uri.query().is_some_and(|q| {
                    q.split('&').any(|p| {
                        let name = p.split_once('=').map_or(p, |(k, _)| k);
                        !name.is_empty()
                            && !matches!(
                                name,
                                // and the query of a signature version 2 presigned URL
                                "partNumber"
                                    | "uploadId"
                                    | "x-id"
                                    | "AWSAccessKeyId"
                                    | "Expires"
                                    | "Signature"
                            )
                            && !name.to_ascii_lowercase().starts_with("x-amz-")
                    })
                });
                let path = parts.uri.path().trim_start_matches('/');
                let virtual_host = parts
                    .headers
                    .get(http::header::HOST)
                    .and_then(|h| h.to_str().ok())
                    .and_then(|h| self.domains.parse_host_header(h).ok())
                    .is_some_and(|v| v.bucket().is_some());
                let key = if virtual_host {
                    path
                } else {
                    path.split_once('/').map_or("", |(_, k)| k)
                };
                subresource || key.is_empty()
            }
            _ => false,
        }
    }

    /// The bucket a request addresses: from a virtual host under a known domain, else the
    /// first path segment.
    fn bucket(&self, parts: &http::request::Parts) -> Option<String> {
        use s3s::host::S3Host;
        let host = parts
            .headers
            .get(http::header::HOST)
            .and_then(|h| h.to_str().ok())
            .or_else(|| parts.uri.authority().map(|a| a.as_str()));
        if let Some(h) = host
            && let Ok(v) = self.domains.parse_host_header(h)
            && let Some(b) = v.bucket()
        {
            return Some(b.to_string());
        }
        let first = parts.uri.path().trim_start_matches('/').split('/').next()?;
        let b = percent_encoding::percent_decode_str(first)
            .decode_utf8()
            .ok()?;
        (!b.is_empty()).then(|| b.into_owned())
    }
}

/// The identifiers of one answer: `x-amz-request-id` and `x-amz-id-2` on every
/// response, and the same values as `RequestId` and `HostId` in an error's XML, so a
/// client's error report names the request in the node's traces.
struct RequestIds {
    request_id: String,
    host_id: String,
}

const REQUEST_ID: &str = "x-amz-request-id";
const HOST_ID: &str = "x-amz-id-2";

impl RequestIds {
    fn new(host_token: &[u8; 12]) -> Self {
        use base64::Engine as _;
        let id: [u8; 8] = rand::random();
        let mut host = host_token.to_vec();
        host.extend_from_slice(&id);
        Self {
            request_id: hex::encode_upper(id),
            host_id: base64::engine::general_purpose::STANDARD.encode(host),
        }
    }

    /// Adds the identifiers to `resp`, unless it already has them: an answer forwarded
    /// from a partition's primary keeps the primary's, which its body already names.
    fn stamp(&self, mut resp: http::Response<s3s::Body>) -> http::Response<s3s::Body> {
        if resp.headers().contains_key(REQUEST_ID) {
            return resp;
        }
        let h = resp.headers_mut();
        if let Ok(v) = http::HeaderValue::from_str(&self.request_id) {
            h.insert(REQUEST_ID, v);
        }
        if let Ok(v) = http::HeaderValue::from_str(&self.host_id) {
            h.insert(HOST_ID, v);
        }
        if resp.status().as_u16() < 400 {
            return resp;
        }
        // Error bodies are small and whole (never a stream): name the request in them.
        let Some(body) = resp.body().bytes() else {
            return resp;
        };
        let Some(xml) = std::str::from_utf8(&body)
            .ok()
            .filter(|x| !x.contains("<RequestId>"))
        else {
            return resp;
        };
        let Some(end) = xml.rfind("</Error>") else {
            return resp;
        };
        // Both values are hex and base64: nothing in them needs XML escaping.
        let xml = format!(
            "{}<RequestId>{}</RequestId><HostId>{}</HostId>{}",
            &xml[..end],
            self.request_id,
            self.host_id,
            &xml[end..]
        );
        resp.headers_mut().remove(http::header::CONTENT_LENGTH);
        *resp.body_mut() = s3s::Body::from(xml);
        resp
    }
}

/// The longest validity a presigned URL may ask for (`X-Amz-Expires`): 7 days, as S3.
const PRESIGN_MAX_SECS: i64 = 604_800;

/// A presigned URL's validity, checked from its query before anything else (as S3 does;
/// its signature is verified later by s3s): an expiry beyond 7 days is refused (400
/// `AuthorizationQueryParametersError`), an expired URL is 403 `AccessDenied` whatever
/// the method, for signature version 4 (`X-Amz-Date` + `X-Amz-Expires`) and 2
/// (`Expires`, seconds since the epoch).
fn presign_refusal(query: &str, now: i64) -> Option<(http::StatusCode, &'static str, String)> {
    // Decoded as s3s decodes the query it verifies (so `X-Amz-%45xpires` is
    // `X-Amz-Expires` here too).
    let decode = |s: &str| {
        percent_encoding::percent_decode_str(&s.replace('+', " "))
            .decode_utf8_lossy()
            .into_owned()
    };
    let params: Vec<(String, String)> = query
        .split('&')
        .map(|p| {
            let (k, v) = p.split_once('=').unwrap_or((p, ""));
            (decode(k), decode(v))
        })
        .collect();
    let param = |name: &str| {
        params
            .iter()
            .find_map(|(k, v)| (k == name).then_some(v.as_str()))
    };
    let expired = || {
        Some((
            http::StatusCode::FORBIDDEN,
            "AccessDenied",
            "Request has expired".to_string(),
        ))
    };
    if param("X-Amz-Signature").is_some() {
        let expires: i64 = param("X-Amz-Expires")?.parse().ok()?;
        if !(0..=PRESIGN_MAX_SECS).contains(&expires) {
            return Some((
                http::StatusCode::BAD_REQUEST,
                "AuthorizationQueryParametersError",
                format!(
                    "X-Amz-Expires must be between 0 and a week (in seconds), that is \
                     {PRESIGN_MAX_SECS}; it is {expires}"
                ),
            ));
        }
        let signed = crate::tenancy::sigv4::parse_amz_date(param("X-Amz-Date")?)?;
        if now > signed.saturating_add(expires) {
            return expired();
        }
    } else if param("Signature").is_some() {
        let until: i64 = param("Expires")?.parse().ok()?;
        if now > until {
            return expired();
        }
    }
    None
}

/// Refusals decided from the request head alone, before any body byte is read:
/// requests without any signature (no `Authorization` header, no presigned-URL
/// signature, and not a form upload, whose signature is in its fields): Granary serves
/// no anonymous S3 access, so nothing is read for them.
fn refuse_before_body(parts: &http::request::Parts) -> Option<http::Response<s3s::Body>> {
    let is_form = super::post::is_form_post(parts);
    let presigned = parts.uri.query().is_some_and(|q| {
        q.split('&').any(|p| {
            let name = p.split_once('=').map_or(p, |(k, _)| k);
            let name = percent_encoding::percent_decode_str(name).decode_utf8_lossy();
            name == "X-Amz-Signature" || name == "Signature"
        })
    });
    if !presigned && !is_form && !parts.headers.contains_key(http::header::AUTHORIZATION) {
        return Some(s3_error_response(
            http::StatusCode::FORBIDDEN,
            "AccessDenied",
            "Signature is required: Granary serves no anonymous requests",
        ));
    }
    if presigned
        && let Some((status, code, message)) = presign_refusal(
            parts.uri.query().unwrap_or_default(),
            time::OffsetDateTime::now_utc().unix_timestamp(),
        )
    {
        return Some(s3_error_response(status, code, &message));
    }
    // An empty Content-MD5 is a malformed digest, not an absent one.
    if parts
        .headers
        .get("content-md5")
        .is_some_and(|v| v.as_bytes().iter().all(u8::is_ascii_whitespace))
    {
        return Some(s3_error_response(
            http::StatusCode::BAD_REQUEST,
            "InvalidDigest",
            "The Content-MD5 you specified is not valid (it is empty)",
        ));
    }
    None
}

/// `s` as XML text (`&`, `<`, `>` escaped).
pub(super) fn xml_escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

fn s3_error_response(
    status: http::StatusCode,
    code: &str,
    message: &str,
) -> http::Response<s3s::Body> {
    let message = xml_escape(message);
    let body = format!(
        "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<Error><Code>{code}</Code><Message>{message}</Message></Error>"
    );
    let mut r = http::Response::new(s3s::Body::from(body));
    *r.status_mut() = status;
    let h = r.headers_mut();
    h.insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/xml"),
    );
    h.insert(
        http::header::CONNECTION,
        http::HeaderValue::from_static("close"),
    );
    r
}

/// The answer to a request forwarded to its partition's primary: the primary's own, or
/// the error telling the client why none came.
fn forwarded_answer(
    answer: Result<http::Response<reqwest::Body>, crate::cluster::forward::ForwardError>,
) -> http::Response<s3s::Body> {
    match answer {
        Ok(resp) => resp.map(s3s::Body::http_body_unsync),
        Err(e) if e.outcome_unknown() => s3_error_response(
            http::StatusCode::BAD_GATEWAY,
            "InternalError",
            "the node holding this bucket failed while handling the request; \
         whether it took effect is unknown",
        ),
        Err(e) if e.busy => s3_error_response(
            http::StatusCode::SERVICE_UNAVAILABLE,
            "SlowDown",
            &e.message,
        ),
        Err(_) => s3_error_response(
            http::StatusCode::SERVICE_UNAVAILABLE,
            "ServiceUnavailable",
            "the node holding this bucket cannot be reached; retry",
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn q(date: &str, expires: &str) -> String {
        format!(
            "X-Amz-Algorithm=AWS4-HMAC-SHA256&X-Amz-Date={date}&X-Amz-Expires={expires}\
             &X-Amz-SignedHeaders=host&X-Amz-Signature=ab"
        )
    }

    #[test]
    fn presigned_urls_expire_and_are_capped_at_a_week() {
        // 2026-01-01T00:00:00Z
        let signed = 1_767_225_600;
        let d = "20260101T000000Z";
        assert!(presign_refusal(&q(d, "60"), signed + 60).is_none());
        let (st, code, _) = presign_refusal(&q(d, "60"), signed + 61).unwrap();
        assert_eq!((st.as_u16(), code), (403, "AccessDenied"));
        assert!(presign_refusal(&q(d, "604800"), signed).is_none());
        let (st, code, _) = presign_refusal(&q(d, "604801"), signed).unwrap();
        assert_eq!(
            (st.as_u16(), code),
            (400, "AuthorizationQueryParametersError")
        );
        let (st, _, _) = presign_refusal(&q(d, "-1"), signed).unwrap();
        assert_eq!(st.as_u16(), 400);
        // Percent-encoded names and values are what s3s verifies: decoded here too.
        let sneaky = "X-Amz-Algorithm=AWS4-HMAC-SHA256&X-Amz-Date=20260101T000000Z\
                      &X-Amz-%45xpires=%36%30%34%38%30%31&X-Amz-SignedHeaders=host\
                      &X-Amz-Signature=ab";
        assert_eq!(presign_refusal(sneaky, signed).unwrap().0.as_u16(), 400);
        // Malformed values are left to the signature check.
        assert!(presign_refusal(&q("yesterday", "60"), signed).is_none());
        // Signature version 2.
        let v2 = |until: i64| format!("AWSAccessKeyId=a&Expires={until}&Signature=x");
        assert!(presign_refusal(&v2(signed), signed).is_none());
        assert_eq!(
            presign_refusal(&v2(signed), signed + 1).unwrap().0.as_u16(),
            403
        );
    }

    #[test]
    fn error_bodies_name_the_request() {
        let ids = RequestIds::new(&[7; 12]);
        let r = ids.stamp(s3_error_response(
            http::StatusCode::NOT_FOUND,
            "NoSuchKey",
            "a <b>",
        ));
        assert_eq!(r.headers()[REQUEST_ID], ids.request_id.as_str());
        assert_eq!(r.headers()[HOST_ID], ids.host_id.as_str());
        let body = String::from_utf8(r.body().bytes().unwrap().to_vec()).unwrap();
        assert!(
            body.ends_with(&format!(
                "<Message>a &lt;b&gt;</Message><RequestId>{}</RequestId><HostId>{}</HostId></Error>",
                ids.request_id, ids.host_id
            )),
            "{body}"
        );
        // A forwarded answer keeps the primary's identifiers.
        let again = RequestIds::new(&[8; 12]).stamp(r);
        assert_eq!(again.headers()[REQUEST_ID], ids.request_id.as_str());
    }
}
