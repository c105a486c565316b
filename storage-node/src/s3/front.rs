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
}

/// Largest XML request body s3s reads (`s3_limits` in server.rs).
pub const XML_MAX: usize = 4 * 1024 * 1024;

impl S3Front {
    pub fn new(
        s3: Arc<s3s::service::S3Service>,
        metrics: Arc<Metrics>,
        forwarder: Forwarder,
        domains: Vec<String>,
        replication: (Replicator, Duration),
        budget: MemoryBudget,
    ) -> Self {
        Self {
            s3,
            metrics,
            forwarder,
            domains: Arc::new(super::Domains(domains)),
            replication,
            budget,
        }
    }

    /// Answers one request, from a client or forwarded by a peer ([`Forwarded`]).
    pub async fn handle(&self, req: http::Request<s3s::Body>) -> http::Response<s3s::Body> {
        let started = Instant::now();
        let slot = OpSlot::default();
        let forwarded = req.extensions().get::<Forwarded>().is_some();
        let span = tracing::info_span!("s3", front = "s3", method = %req.method(), forwarded,
            operation = tracing::field::Empty, tenant = tracing::field::Empty,
            bucket = tracing::field::Empty, status = tracing::field::Empty,
            bytes = tracing::field::Empty, primary = tracing::field::Empty);
        crate::cluster::forward::continue_trace(&span, &req);
        let (parts, body) = req.into_parts();
        let resp = async {
            if let Some(refusal) = refuse_before_body(&parts) {
                slot.set("Refused");
                // The body is never read: dropping it closes the connection.
                drop(body);
                return refusal;
            }
            let bucket = self.bucket(&parts);
            match self.forwarder.decide(&parts, bucket.as_deref()).await {
                Decision::Local => {}
                Decision::Refuse {
                    message,
                    not_primary,
                } => {
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
                Decision::Forward { node, rpc_addr } => {
                    slot.set("Forward");
                    tracing::Span::current().record("primary", node.0.as_str());
                    let body = reqwest::Body::wrap_stream(body);
                    return match self
                        .forwarder
                        .forward("s3", &node, &rpc_addr, &parts, body)
                        .await
                    {
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
                    };
                }
            }
            // An XML body is read whole by s3s (once the head's signature checks out): it
            // reserves its bytes first, and is refused at once when they are not there.
            let xml_hold = if self.xml_body(&parts) {
                let declared = parts
                    .headers
                    .get(http::header::CONTENT_LENGTH)
                    .and_then(|v| v.to_str().ok()?.parse::<usize>().ok())
                    .unwrap_or(XML_MAX);
                match self.budget.try_reserve(declared.min(XML_MAX)) {
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
            let mut req = http::Request::from_parts(parts, body);
            req.extensions_mut().insert(slot.clone());
            // Anything but a read may write: the partitions it reaches must accept writes
            // (checked after authentication, on each bucket the request touches).
            let write = !matches!(method, http::Method::GET | http::Method::HEAD);
            let (resp, touched) = crate::model::tracking_partitions(write, self.s3.call(req)).await;
            // s3s is done with the body: its bytes go back before the barrier's wait.
            drop(xml_hold);
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

/// Refusals decided from the request head alone, before any body byte is read:
/// - POST Object (an HTML-form upload, `multipart/form-data`): not supported yet, and
///   s3s would buffer the file part before any authorization check.
/// - Requests without any signature (no `Authorization` header, no presigned-URL
///   signature): Granary serves no anonymous S3 access, so nothing is read for them.
fn refuse_before_body(parts: &http::request::Parts) -> Option<http::Response<s3s::Body>> {
    let is_form = parts
        .headers
        .get(http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| {
            v.trim_start()
                .to_ascii_lowercase()
                .starts_with("multipart/form-data")
        });
    if parts.method == http::Method::POST && is_form {
        return Some(s3_error_response(
            http::StatusCode::NOT_IMPLEMENTED,
            "NotImplemented",
            "POST Object (HTML form upload) is not supported; use PUT Object or a presigned PUT URL",
        ));
    }
    let presigned = parts.uri.query().is_some_and(|q| {
        q.split('&').any(|p| {
            let name = p.split_once('=').map_or(p, |(k, _)| k);
            name == "X-Amz-Signature" || name == "Signature"
        })
    });
    if !presigned && !parts.headers.contains_key(http::header::AUTHORIZATION) {
        return Some(s3_error_response(
            http::StatusCode::FORBIDDEN,
            "AccessDenied",
            "Signature is required: Granary serves no anonymous requests",
        ));
    }
    None
}

fn s3_error_response(
    status: http::StatusCode,
    code: &str,
    message: &str,
) -> http::Response<s3s::Body> {
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
