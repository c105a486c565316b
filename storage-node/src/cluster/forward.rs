//! Request forwarding: any node accepts any S3 or KV request; one whose partition
//! another node leads is sent on, as it came, to that node's RPC port
//! (`/rpc/v1/forward/{s3|kv}`), and the answer comes back the same way. Bodies stream
//! in both directions at the pace of the slower side, so a node forwarding a large
//! object holds only what is in flight.
//!
//! The forwarding node verifies nothing but the access key's existence (it needs the
//! tenant to find the partition): the primary authenticates the request exactly as if
//! the client had sent it there, with the original method, path, query, `Host` and
//! `Authorization`. A forwarded request is never forwarded again: a node that gets one
//! for a partition it does not lead answers 503 [`NOT_PRIMARY`]; the forwarding node
//! refreshes its view of the partition table and, for a request without a body (nothing
//! to replay), decides again and resends it; a request with a body gets the 503 and the
//! client retries.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use http::{HeaderMap, HeaderName, HeaderValue, header};

use super::{Cluster, Route};
use crate::telemetry::{ForwardLabels, Metrics};
use crate::tenancy::Authenticator;
use crate::types::{NodeId, PartitionId};

/// Every header this module adds to a forwarded request starts with this; a client's own
/// headers with this prefix are dropped before forwarding.
const PREFIX: &str = "x-granary-fwd-";
const FWD_HOST: &str = "x-granary-fwd-host";
const FWD_AUTHORIZATION: &str = "x-granary-fwd-authorization";
const FWD_URI: &str = "x-granary-fwd-uri";
const FWD_EXPECT: &str = "x-granary-fwd-expect";
/// On a 503 from a node that does not lead the partition a forwarded request was for.
pub const NOT_PRIMARY: &str = "x-granary-not-primary";

/// How often a request without a body is resent after a [`NOT_PRIMARY`] answer.
pub const NOT_PRIMARY_RETRIES: u32 = 4;
/// How long, at most, a resend waits for this node's partition table to change.
pub const NOT_PRIMARY_WAIT: Duration = Duration::from_millis(500);
/// How long, at least, a resend waits.
const NOT_PRIMARY_MIN_GAP: Duration = Duration::from_millis(100);

/// A forwarded request that got no answer from the primary.
#[derive(Debug)]
pub struct ForwardError {
    /// 503 when nothing can have happened (the primary was not reached, or the request
    /// only reads); 502 when the primary may have acted on it before failing.
    pub status: u16,
    pub message: String,
    /// Not sent because too many requests to that peer are in flight (503 `SlowDown`).
    pub busy: bool,
}

impl ForwardError {
    /// Whether the request may have taken effect.
    pub fn outcome_unknown(&self) -> bool {
        self.status == 502
    }
}

/// Request extension: this request arrived through the forward route.
#[derive(Clone, Copy, Debug)]
pub struct Forwarded;

/// Request extension: the trace context of the forwarding node's span (the request's
/// span here continues it, so one client request is one trace across nodes).
#[derive(Clone, Debug, Default)]
pub struct ForwardedTrace(pub Vec<(String, String)>);

/// Makes `span` (a request's) continue the trace the request carries: the forwarding
/// node's when it was forwarded, else the client's own `traceparent`, if any.
pub fn continue_trace<B>(span: &tracing::Span, req: &http::Request<B>) {
    let forwarded = req.extensions().get::<ForwardedTrace>();
    granary_telemetry::propagation::continue_trace(span, |field| match forwarded {
        Some(t) => t.0.iter().find(|(k, _)| k == field).map(|(_, v)| v.clone()),
        None => req
            .headers()
            .get(field)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string),
    });
}

/// Connection-level headers, meaningful for one hop only (RFC 9110 §7.6.1), plus `Host`
/// and `Expect`, which the forwarding hop sets itself.
fn hop_by_hop(name: &HeaderName) -> bool {
    matches!(
        name.as_str(),
        "connection"
            | "keep-alive"
            | "proxy-connection"
            | "proxy-authenticate"
            | "proxy-authorization"
            | "te"
            | "trailer"
            | "transfer-encoding"
            | "upgrade"
            | "expect"
            | "host"
    )
}

/// What to do with a request.
#[derive(Debug)]
pub enum Decision {
    Local,
    Forward {
        node: NodeId,
        rpc_addr: String,
    },
    /// Answer 503 with this message; `not_primary`: the request was forwarded here, but
    /// this node does not lead its partition (the answer carries [`NOT_PRIMARY`]).
    Refuse {
        message: String,
        not_primary: bool,
    },
}

impl Decision {
    /// The operation name a refusal is counted under.
    pub fn refusal_name(not_primary: bool) -> &'static str {
        if not_primary {
            "NotPrimary"
        } else {
            "Unavailable"
        }
    }
}

/// Decides where requests go and sends them there.
#[derive(Clone)]
pub struct Forwarder {
    cluster: Cluster,
    auth: Authenticator,
    metrics: Arc<Metrics>,
    http: reqwest::Client,
    /// Requests in flight to each peer, bounded (`max_forwards_per_peer`).
    in_flight: Arc<std::sync::Mutex<HashMap<NodeId, Arc<tokio::sync::Semaphore>>>>,
    max_in_flight: usize,
}

impl Forwarder {
    pub fn new(
        cluster: Cluster,
        auth: Authenticator,
        metrics: Arc<Metrics>,
        max_in_flight: usize,
    ) -> Self {
        // No overall or read timeout: a large object streams for as long as the client
        // takes, and a slow client slows the primary down rather than failing. A primary
        // that stops answering (hung, stopped, or cut off) is suspected within
        // `suspect_after`: requests waiting on it, and answers streaming from it, then
        // fail. A client that gives up drops the forwarded request with its own.
        let http = super::peer_client(Duration::from_secs(2), |b| {
            b.tcp_keepalive(Duration::from_secs(15))
                .pool_idle_timeout(Duration::from_secs(30))
        });
        Self {
            cluster,
            auth,
            metrics,
            http,
            in_flight: Arc::default(),
            max_in_flight,
        }
    }

    /// A slot for one more request to `node`, or None when `max_forwards_per_peer` are
    /// in flight already.
    fn slot(&self, node: &NodeId) -> Option<tokio::sync::OwnedSemaphorePermit> {
        let sem = self
            .in_flight
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .entry(node.clone())
            .or_insert_with(|| Arc::new(tokio::sync::Semaphore::new(self.max_in_flight)))
            .clone();
        sem.try_acquire_owned().ok()
    }

    pub fn cluster(&self) -> &Cluster {
        &self.cluster
    }

    /// Where a request for `container` (bucket or KV namespace, as placed) is served.
    /// Anything that cannot be placed (no container, no or unknown access key, catalog
    /// trouble) is served here, where it gets its proper answer or error. A request that
    /// was already forwarded is served here or refused, never forwarded again.
    pub async fn decide(&self, parts: &http::request::Parts, container: Option<&str>) -> Decision {
        let decision = self.place(access_key(parts).as_deref(), container).await;
        match decision {
            Decision::Forward { .. } | Decision::Refuse { .. }
                if parts.extensions.get::<Forwarded>().is_some() =>
            {
                self.cluster.refresh_soon();
                Decision::Refuse {
                    message: "this node does not lead the partition the request was forwarded \
                              for; retry"
                        .into(),
                    not_primary: true,
                }
            }
            d => d,
        }
    }

    async fn place(&self, access_key: Option<&str>, container: Option<&str>) -> Decision {
        let (Some(key), Some(container)) = (access_key, container) else {
            return Decision::Local;
        };
        let tenant = match self.auth.tenant_of(key).await {
            Ok(Some(t)) => t,
            _ => return Decision::Local,
        };
        self.place_tenant(tenant, container)
    }

    /// Where a request of `tenant` for its bucket or namespace `container` is served,
    /// once the tenant is known (a form upload's comes from its fields).
    pub fn place_tenant(&self, tenant: crate::types::TenantId, container: &str) -> Decision {
        let p = PartitionId::of(tenant, container.as_bytes(), self.cluster.partitions());
        match self.cluster.route(p) {
            Route::Local => Decision::Local,
            Route::Remote { node, rpc_addr } => Decision::Forward { node, rpc_addr },
            Route::Unavailable(message) => Decision::Refuse {
                message,
                not_primary: false,
            },
        }
    }

    /// Where a client's request goes: [`Self::decide`] for one with a body (Ok), and
    /// [`Self::decide_bodiless`], which also forwards it, for one without.
    pub async fn route(
        &self,
        front: &'static str,
        parts: &http::request::Parts,
        container: Option<&str>,
    ) -> Result<Decision, Result<http::Response<reqwest::Body>, ForwardError>> {
        if declares_body(&parts.headers) {
            Ok(self.decide(parts, container).await)
        } else {
            self.decide_bodiless(front, parts, container).await
        }
    }

    /// [`Self::decide`] for a request without a body, which is also forwarded here when
    /// another node leads its partition: Ok is a decision other than `Forward`, Err the
    /// primary's answer (or why none came). A primary that answers it does not lead the
    /// partition refused the request before acting on it, so, the request having no body
    /// to replay, it is decided again and resent, up to [`NOT_PRIMARY_RETRIES`] times,
    /// each once this node's partition table has changed or [`NOT_PRIMARY_WAIT`] has
    /// passed. The client sees a handover (this node's table or the primary's behind
    /// the catalog's) as a slower answer rather than a 503.
    pub async fn decide_bodiless(
        &self,
        front: &'static str,
        parts: &http::request::Parts,
        container: Option<&str>,
    ) -> Result<Decision, Result<http::Response<reqwest::Body>, ForwardError>> {
        let mut retries = 0;
        loop {
            // Subscribed before sending, so a table read while the request is out counts.
            let mut states = self.cluster.watch_states();
            states.borrow_and_update();
            let (node, rpc_addr) = match self.decide(parts, container).await {
                Decision::Forward { node, rpc_addr } => (node, rpc_addr),
                d => return Ok(d),
            };
            tracing::Span::current().record("primary", node.0.as_str());
            let body = reqwest::Body::from(bytes::Bytes::new());
            let answer = self.forward(front, &node, &rpc_addr, parts, body).await;
            let refused = matches!(&answer, Ok(r) if r.headers().contains_key(NOT_PRIMARY));
            if !refused || retries == NOT_PRIMARY_RETRIES {
                return Err(answer);
            }
            retries += 1;
            drop(answer);
            // Any partition's change ends the wait; the minimum gap keeps a mass
            // handover from using the resends up back to back.
            let waited = tokio::time::Instant::now();
            let _ = tokio::time::timeout(NOT_PRIMARY_WAIT, states.changed()).await;
            tokio::time::sleep_until(waited + NOT_PRIMARY_MIN_GAP).await;
        }
    }

    /// Sends the request to `rpc_addr`'s forward route for `front` ("s3" or "kv") and
    /// returns the primary's answer with its body still streaming. Err: the primary
    /// could not be reached (nothing of the answer arrived).
    pub async fn forward(
        &self,
        front: &'static str,
        node: &NodeId,
        rpc_addr: &str,
        parts: &http::request::Parts,
        body: reqwest::Body,
    ) -> Result<http::Response<reqwest::Body>, ForwardError> {
        let r = self.send(front, node, rpc_addr, parts, body).await;
        let outcome = match &r {
            Ok(resp) if resp.headers().contains_key(NOT_PRIMARY) => "not_primary",
            Ok(_) => "ok",
            Err(e) if e.outcome_unknown() => "failed",
            Err(e) if e.busy => "busy",
            Err(_) => "unreachable",
        };
        self.metrics
            .forwarded
            .get_or_create(&ForwardLabels { front, outcome })
            .inc();
        if let Err(e) = &r {
            tracing::warn!(error = %e.message, status = e.status, "forwarding to the partition's primary failed");
        }
        r
    }

    async fn send(
        &self,
        front: &'static str,
        node: &NodeId,
        rpc_addr: &str,
        parts: &http::request::Parts,
        body: reqwest::Body,
    ) -> Result<http::Response<reqwest::Body>, ForwardError> {
        let refuse = |message: String| ForwardError {
            status: 503,
            message,
            busy: false,
        };
        // Held until the answer has streamed back (or the request fails).
        let permit = self.slot(node).ok_or_else(|| ForwardError {
            status: 503,
            message: format!(
                "{} requests from this node to node {} (which holds this bucket or namespace) \
                 are in flight already; retry",
                self.max_in_flight, node.0
            ),
            busy: true,
        })?;
        let secret = self.cluster.secret().ok_or_else(|| {
            refuse("this node has no cluster secret, so it cannot forward".into())
        })?;
        let headers = outgoing_headers(parts).map_err(|e| refuse(e.into()))?;
        // Reads are safe to retry whatever happened; anything else may have taken effect
        // once the primary got it.
        let reads = matches!(parts.method, http::Method::GET | http::Method::HEAD);
        let failed = |message: String, connected: bool| ForwardError {
            status: if connected && !reads { 502 } else { 503 },
            message,
            busy: false,
        };
        // Keep the client's framing: a request that declared no body is sent without one
        // (a streamed body would go out chunked, and S3 refuses e.g. a chunked DELETE).
        let has_body = parts.headers.contains_key(header::CONTENT_LENGTH)
            || parts.headers.contains_key(header::TRANSFER_ENCODING);
        let body = if has_body {
            body
        } else {
            reqwest::Body::from(bytes::Bytes::new())
        };
        let url = format!("http://{rpc_addr}/rpc/v1/forward/{front}");
        let send = self
            .http
            .request(parts.method.clone(), url)
            .headers(headers)
            .bearer_auth(&**secret)
            .body(body)
            .send();
        // A primary that stops answering (it hangs, or the link to it is cut) is
        // suspected within `suspect_after`; a request still waiting for its answer then
        // fails rather than waiting for as long as the client does.
        let resp = tokio::select! {
            r = send => r.map_err(|e| {
                failed(format!("forwarding to {} at {rpc_addr}: {e}", node.0), !e.is_connect())
            })?,
            () = self.cluster.until_not_alive(node) => {
                return Err(failed(
                    format!("the primary {} at {rpc_addr} stopped answering before it replied", node.0),
                    true,
                ));
            }
        };
        if resp.headers().contains_key(NOT_PRIMARY) {
            self.cluster.refresh_soon();
        }
        let mut resp: http::Response<reqwest::Body> = resp.into();
        // The answer's body streams from the primary: it, too, ends (with an error) if
        // the primary stops answering half-way.
        let (cluster, node) = (self.cluster.clone(), node.clone());
        let stop = async move {
            let _permit = permit;
            cluster.until_not_alive(&node).await
        };
        let body = std::mem::replace(resp.body_mut(), reqwest::Body::from(bytes::Bytes::new()));
        *resp.body_mut() = guarded(body, stop);
        let drop: Vec<HeaderName> = resp
            .headers()
            .keys()
            .filter(|n| hop_by_hop(n))
            .cloned()
            .collect();
        for n in drop {
            resp.headers_mut().remove(n);
        }
        Ok(resp)
    }
}

/// `body`, ended by an error as soon as `stop` completes.
fn guarded(
    body: reqwest::Body,
    stop: impl std::future::Future<Output = ()> + Send + 'static,
) -> reqwest::Body {
    use futures::StreamExt;
    use std::task::Poll;
    let mut data = http_body_util::BodyExt::into_data_stream(body);
    let mut stop = Box::pin(stop);
    let mut done = false;
    let stream = futures::stream::poll_fn(move |cx| {
        if done {
            return Poll::Ready(None);
        }
        if let Poll::Ready(item) = data.poll_next_unpin(cx) {
            done = item.is_none();
            return Poll::Ready(item.map(|r| r.map_err(std::io::Error::other)));
        }
        if stop.as_mut().poll(cx).is_ready() {
            done = true;
            return Poll::Ready(Some(Err(std::io::Error::other(
                "the primary stopped answering while sending the response",
            ))));
        }
        Poll::Pending
    });
    reqwest::Body::wrap_stream(stream)
}

/// Whether a request's head announces a body: chunked, or a length other than 0.
pub fn declares_body(headers: &HeaderMap) -> bool {
    headers.contains_key(header::TRANSFER_ENCODING)
        || headers
            .get(header::CONTENT_LENGTH)
            .is_some_and(|v| v.as_bytes() != b"0")
}

/// The client's headers as the forward route carries them: hop-by-hop ones dropped,
/// `Host`, `Authorization` and the path with its query moved into `x-granary-fwd-*`
/// headers (the RPC hop authenticates with its own `Authorization`).
fn outgoing_headers(parts: &http::request::Parts) -> Result<HeaderMap, &'static str> {
    // Headers the client named in `Connection` are for the first hop only, too.
    let listed: Vec<String> = parts
        .headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|n| n.trim().to_ascii_lowercase())
        .collect();
    let mut out = HeaderMap::with_capacity(parts.headers.len() + 4);
    for (name, value) in &parts.headers {
        if hop_by_hop(name)
            || name == header::AUTHORIZATION
            || name.as_str().starts_with(PREFIX)
            || listed.iter().any(|l| l == name.as_str())
        {
            continue;
        }
        out.append(name.clone(), value.clone());
    }
    // A signature may cover `Expect`; the primary sees it as the client sent it.
    if let Some(e) = parts.headers.get(header::EXPECT) {
        out.insert(FWD_EXPECT, e.clone());
    }
    if let Some(a) = parts.headers.get(header::AUTHORIZATION) {
        out.insert(FWD_AUTHORIZATION, a.clone());
    }
    // This node's span goes along in our own headers: the client's `traceparent` (which
    // a signature may cover) travels untouched.
    for (k, v) in granary_telemetry::propagation::context_of(&tracing::Span::current()) {
        if let (Ok(name), Ok(value)) = (
            HeaderName::from_bytes(format!("{PREFIX}{k}").as_bytes()),
            HeaderValue::from_str(&v),
        ) {
            out.insert(name, value);
        }
    }
    let host = match parts.headers.get(header::HOST) {
        Some(h) => Some(h.clone()),
        None => parts
            .uri
            .authority()
            .and_then(|a| HeaderValue::from_str(a.as_str()).ok()),
    };
    if let Some(h) = host {
        out.insert(FWD_HOST, h);
    }
    let uri = parts.uri.path_and_query().map_or("/", |p| p.as_str());
    out.insert(
        FWD_URI,
        HeaderValue::from_str(uri).map_err(|_| "the request URI cannot be forwarded")?,
    );
    Ok(out)
}

/// Turns a request that came through the forward route back into the client's request:
/// its URI, `Host` and `Authorization` restored, the forwarding headers removed and the
/// [`Forwarded`] mark set.
pub fn restore(parts: &mut http::request::Parts) -> Result<(), String> {
    let h = &mut parts.headers;
    let uri = h
        .get(FWD_URI)
        .and_then(|v| v.to_str().ok())
        .ok_or("a forwarded request must carry its URI")?;
    parts.uri = uri
        .parse()
        .map_err(|_| "the forwarded URI is malformed".to_string())?;
    h.remove(header::AUTHORIZATION);
    if let Some(a) = h.remove(FWD_AUTHORIZATION) {
        h.insert(header::AUTHORIZATION, a);
    }
    h.remove(header::HOST);
    if let Some(host) = h.remove(FWD_HOST) {
        h.insert(header::HOST, host);
    }
    h.remove(header::EXPECT);
    if let Some(e) = h.remove(FWD_EXPECT) {
        h.insert(header::EXPECT, e);
    }
    let trace: Vec<(String, String)> = granary_telemetry::propagation::FIELDS
        .iter()
        .filter_map(|f| {
            let v = h.get(format!("{PREFIX}{f}"))?.to_str().ok()?;
            Some((f.to_string(), v.to_string()))
        })
        .collect();
    if !trace.is_empty() {
        parts.extensions.insert(ForwardedTrace(trace));
    }
    let h = &mut parts.headers;
    let ours: Vec<HeaderName> = h
        .keys()
        .filter(|n| n.as_str().starts_with(PREFIX))
        .cloned()
        .collect();
    for n in ours {
        h.remove(n);
    }
    parts.extensions.insert(Forwarded);
    Ok(())
}

/// The access key id a request is signed with, read without verifying anything: from a
/// SigV4 or SigV2 `Authorization` header, or a presigned URL's query.
pub fn access_key(parts: &http::request::Parts) -> Option<String> {
    if let Some(a) = parts
        .headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
    {
        if let Some(rest) = a.strip_prefix("AWS4-HMAC-SHA256") {
            let cred = rest
                .split(',')
                .find_map(|p| p.trim().strip_prefix("Credential="))?;
            return cred.split('/').next().map(str::to_string);
        }
        let rest = a.strip_prefix("AWS ")?;
        return rest.split(':').next().map(str::to_string);
    }
    for pair in parts.uri.query()?.split('&') {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        let v = percent_encoding::percent_decode_str(v).decode_utf8().ok()?;
        match k {
            "X-Amz-Credential" => return v.split('/').next().map(str::to_string),
            "AWSAccessKeyId" => return Some(v.into_owned()),
            _ => {}
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parts(req: http::Request<()>) -> http::request::Parts {
        req.into_parts().0
    }

    #[test]
    fn the_access_key_is_read_from_every_signature_form() {
        let v4 = parts(
            http::Request::get("/b/k")
                .header(
                    "authorization",
                    "AWS4-HMAC-SHA256 Credential=GKABC/20261127/us-east-1/s3/aws4_request, \
                     SignedHeaders=host, Signature=00",
                )
                .body(())
                .unwrap(),
        );
        assert_eq!(access_key(&v4).as_deref(), Some("GKABC"));
        let v2 = parts(
            http::Request::get("/b/k")
                .header("authorization", "AWS GKDEF:c2ln")
                .body(())
                .unwrap(),
        );
        assert_eq!(access_key(&v2).as_deref(), Some("GKDEF"));
        let presigned = parts(
            http::Request::get(
                "/b/k?X-Amz-Algorithm=AWS4-HMAC-SHA256&X-Amz-Credential=GKXYZ%2F20261127%2Fus-east-1%2Fs3%2Faws4_request",
            )
            .body(())
            .unwrap(),
        );
        assert_eq!(access_key(&presigned).as_deref(), Some("GKXYZ"));
        let anonymous = parts(http::Request::get("/b/k").body(()).unwrap());
        assert_eq!(access_key(&anonymous), None);
    }

    #[test]
    fn a_forwarded_request_is_restored_to_what_the_client_sent() {
        let client = parts(
            http::Request::put("/bucket/a%20key?partNumber=2&uploadId=u")
                .header("host", "bucket.s3.example.com:9000")
                .header("authorization", "AWS4-HMAC-SHA256 Credential=GK/x")
                .header("x-amz-content-sha256", "UNSIGNED-PAYLOAD")
                .header("content-length", "5")
                .header("transfer-encoding", "chunked")
                .header("connection", "keep-alive, x-hop")
                .header("x-hop", "1")
                .header("expect", "100-continue")
                .header("x-granary-fwd-uri", "/other/bucket")
                .body(())
                .unwrap(),
        );
        let mut sent = outgoing_headers(&client).unwrap();
        assert!(!sent.contains_key("transfer-encoding"));
        assert!(!sent.contains_key("connection"));
        assert!(!sent.contains_key("authorization"));
        assert!(!sent.contains_key("x-hop"), "named in Connection");
        assert!(!sent.contains_key("expect"));
        // What the RPC hop adds, and what an attacker between would have to forge.
        sent.insert("authorization", HeaderValue::from_static("Bearer secret"));
        sent.insert("host", HeaderValue::from_static("10.0.0.2:9300"));
        let mut req = http::Request::put("/rpc/v1/forward/s3").body(()).unwrap();
        *req.headers_mut() = sent;
        let mut got = parts(req);
        restore(&mut got).unwrap();
        assert_eq!(got.uri, client.uri);
        assert_eq!(got.headers["host"], "bucket.s3.example.com:9000");
        assert_eq!(
            got.headers["authorization"],
            "AWS4-HMAC-SHA256 Credential=GK/x"
        );
        assert_eq!(got.headers["x-amz-content-sha256"], "UNSIGNED-PAYLOAD");
        assert_eq!(got.headers["content-length"], "5");
        assert_eq!(
            got.headers["expect"], "100-continue",
            "signed headers survive"
        );
        assert!(got.headers.keys().all(|k| !k.as_str().starts_with(PREFIX)));
        assert!(got.extensions.get::<Forwarded>().is_some());
    }

    #[test]
    fn a_request_without_its_uri_is_not_restored() {
        let mut p = parts(http::Request::get("/rpc/v1/forward/s3").body(()).unwrap());
        assert!(restore(&mut p).is_err());
    }
}
