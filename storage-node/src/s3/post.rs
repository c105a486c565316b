//! POST Object: the browser form upload (`multipart/form-data` with a signed policy).
//!
//! The form's fields before the file are read with a bound (`FIELDS_MAX` in all,
//! `FIELD_MAX` each); the policy's signature (SigV4), expiry and conditions are checked
//! before any byte of the file is read; the file then streams into the store like a
//! PutObject body, its size held to the policy's `content-length-range` (and
//! `MAX_OBJECT`) as it arrives. s3s would buffer the whole file in memory, so this path
//! does not go through it.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU8, Ordering};

use futures::{Stream, StreamExt, TryStreamExt};
use serde_json::Value;

use super::GranaryS3;
use crate::model::object::{Conditions, ObjectMeta, PutExtra};
use crate::model::{ByteStream, Error};

/// The form fields before the file, in all: held in memory before authentication.
pub const FIELDS_MAX: usize = 256 * 1024;
/// One form field (a policy document is at most 20 KiB in S3).
const FIELD_MAX: usize = 64 * 1024;
/// The largest object a form may upload (S3: 5 GiB).
const MAX_OBJECT: u64 = 5 << 30;

/// An answer that is not a success: status, S3 code, message.
pub struct Refusal(pub http::StatusCode, pub &'static str, pub String);

fn bad(code: &'static str, msg: impl Into<String>) -> Refusal {
    Refusal(http::StatusCode::BAD_REQUEST, code, msg.into())
}

fn denied(msg: impl Into<String>) -> Refusal {
    Refusal(http::StatusCode::FORBIDDEN, "AccessDenied", msg.into())
}

/// Whether a request is a form upload (POST with `multipart/form-data`).
/// (A POST with a query, such as `?uploads` or `?delete`, or to an object path, is an
/// API call whatever its body's content type.)
pub fn is_form_post(parts: &http::request::Parts) -> bool {
    let to_bucket = parts.uri.query().is_none_or(str::is_empty) && {
        let path = parts.uri.path().trim_matches('/');
        !path.contains('/')
    };
    parts.method == http::Method::POST
        && to_bucket
        && parts
            .headers
            .get(http::header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| {
                v.trim_start()
                    .to_ascii_lowercase()
                    .starts_with("multipart/form-data")
            })
}

/// At most this many fields before the file.
const FIELDS_COUNT_MAX: usize = 64;
/// The fields before the file must arrive within this time.
const FIELDS_DEADLINE: std::time::Duration = std::time::Duration::from_secs(30);
/// User metadata (`x-amz-meta-*` names and values) at most (S3: 2 KiB).
const USER_META_MAX: usize = 2048;
/// The body bytes the form parser may pull before the file starts: the fields, their
/// part headers and the parser's read-ahead.
const PRE_FILE_MAX: usize = FIELDS_MAX + 64 * 1024;

/// The request body as the form parser pulls it: counted (and recorded, to forward the
/// form to its bucket's primary) until the file starts, and ended with an error past
/// [`PRE_FILE_MAX`]. The rest of the body can be taken back once the fields are read.
struct Source {
    body: Option<std::pin::Pin<Box<s3s::Body>>>,
    recorded: Vec<u8>,
    file_started: bool,
    too_large: bool,
}

type Shared = Arc<std::sync::Mutex<Source>>;

fn lock(s: &Shared) -> std::sync::MutexGuard<'_, Source> {
    s.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn pulled(shared: Shared) -> impl Stream<Item = std::io::Result<bytes::Bytes>> + Send {
    futures::stream::poll_fn(move |cx| {
        use std::task::Poll;
        let mut s = lock(&shared);
        let Some(body) = s.body.as_mut() else {
            return Poll::Ready(None);
        };
        match body.as_mut().poll_next(cx) {
            Poll::Ready(Some(Ok(b))) => {
                if !s.file_started {
                    if s.recorded.len() + b.len() > PRE_FILE_MAX {
                        s.too_large = true;
                        return Poll::Ready(Some(Err(std::io::Error::other(
                            "the fields before the file are too large",
                        ))));
                    }
                    s.recorded.extend_from_slice(&b);
                }
                Poll::Ready(Some(Ok(b)))
            }
            Poll::Ready(Some(Err(e))) => {
                Poll::Ready(Some(Err(std::io::Error::other(e.to_string()))))
            }
            Poll::Ready(None) => Poll::Ready(None),
            Poll::Pending => Poll::Pending,
        }
    })
}

fn too_large_fields() -> Refusal {
    bad(
        "MaxPostPreDataLengthExceeded",
        "Your POST request fields preceding the upload file were too large.",
    )
}

/// Handles a form upload to `bucket`. `hold` (the memory reserved for the fields and
/// the file's pieces) shrinks to what the pieces hold once the fields are read. On a cluster, a form for a bucket another node leads is
/// forwarded there whole, once its policy has been verified here.
pub async fn handle(
    s3: &GranaryS3,
    forwarder: &crate::cluster::forward::Forwarder,
    parts: &http::request::Parts,
    bucket: &str,
    body: s3s::Body,
    hold: Option<crate::tenancy::budget::Reservation>,
) -> Result<http::Response<s3s::Body>, Refusal> {
    let ct = parts
        .headers
        .get(http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default();
    let boundary = multer::parse_boundary(ct)
        .map_err(|_| bad("MalformedPOSTRequest", "the multipart boundary is missing"))?;
    let shared: Shared = Arc::new(std::sync::Mutex::new(Source {
        body: Some(Box::pin(body)),
        recorded: Vec::new(),
        file_started: false,
        too_large: false,
    }));
    let mut form = multer::Multipart::new(pulled(shared.clone()), boundary);
    let failed = |e: multer::Error| {
        if lock(&shared).too_large {
            too_large_fields()
        } else {
            malformed(e)
        }
    };

    // The fields before the file: bounded in bytes, count and time.
    let read_fields = async {
        let mut fields: BTreeMap<String, String> = BTreeMap::new();
        let mut held = 0usize;
        loop {
            let Some(mut field) = form.next_field().await.map_err(failed)? else {
                return Err(bad(
                    "InvalidArgument",
                    "POST requires exactly one file upload per request.",
                ));
            };
            let name = field.name().unwrap_or_default().to_ascii_lowercase();
            if name == "file" {
                lock(&shared).file_started = true;
                return Ok((fields, field));
            }
            if fields.len() >= FIELDS_COUNT_MAX {
                return Err(too_large_fields());
            }
            held += name.len() + 64;
            let mut value = Vec::new();
            while let Some(chunk) = field.chunk().await.map_err(failed)? {
                held += chunk.len();
                if value.len() + chunk.len() > FIELD_MAX || held > FIELDS_MAX {
                    return Err(too_large_fields());
                }
                value.extend_from_slice(&chunk);
            }
            let value = String::from_utf8(value)
                .map_err(|_| bad("MalformedPOSTRequest", format!("field {name} is not UTF-8")))?;
            fields.insert(name, value);
        }
    };
    let (fields, file) = tokio::time::timeout(FIELDS_DEADLINE, read_fields)
        .await
        .map_err(|_| {
            Refusal(
                http::StatusCode::BAD_REQUEST,
                "RequestTimeout",
                "the form's fields did not arrive in time".into(),
            )
        })??;
    // The fields are parsed: what stays reserved is what the file's pieces hold.
    let mut hold = hold;
    if let Some(h) = &mut hold {
        h.shrink_to(super::front::UPLOAD_HOLD);
    }

    let tenant = authenticate(s3, &fields).await?;
    let (min, max) = check_policy(&fields, bucket)?;

    // A bucket another node leads: the whole form goes there (what was read, then the
    // rest of the body), where it is verified again and stored.
    use crate::cluster::forward::{Decision, Forwarded};
    match forwarder.place_tenant(tenant, bucket) {
        Decision::Local => {}
        Decision::Refuse { message, .. } => {
            return Err(Refusal(
                http::StatusCode::SERVICE_UNAVAILABLE,
                "ServiceUnavailable",
                message,
            ));
        }
        Decision::Forward { .. } if parts.extensions.get::<Forwarded>().is_some() => {
            return Err(Refusal(
                http::StatusCode::SERVICE_UNAVAILABLE,
                "ServiceUnavailable",
                "this node does not lead the bucket's partition any more; retry".into(),
            ));
        }
        Decision::Forward { node, rpc_addr } => {
            drop(file);
            drop(form);
            let (prefix, rest) = {
                let mut s = lock(&shared);
                (std::mem::take(&mut s.recorded), s.body.take())
            };
            let rest = futures::stream::iter(rest)
                .flatten()
                .map_err(|e| std::io::Error::other(e.to_string()));
            let whole = futures::stream::once(async move {
                Ok::<_, std::io::Error>(bytes::Bytes::from(prefix))
            })
            .chain(rest);
            return match forwarder
                .forward(
                    "s3",
                    &node,
                    &rpc_addr,
                    parts,
                    reqwest::Body::wrap_stream(whole),
                )
                .await
            {
                Ok(resp) => Ok(resp.map(s3s::Body::http_body_unsync)),
                Err(e) if e.outcome_unknown() => Err(Refusal(
                    http::StatusCode::BAD_GATEWAY,
                    "InternalError",
                    "the node holding this bucket failed while handling the upload; whether \
                     it took effect is unknown"
                        .into(),
                )),
                Err(_) => Err(Refusal(
                    http::StatusCode::SERVICE_UNAVAILABLE,
                    "ServiceUnavailable",
                    "the node holding this bucket cannot be reached; retry".into(),
                )),
            };
        }
    }
    lock(&shared).recorded = Vec::new();
    // Admitted where it is stored (a forwarded form is admitted by the primary).
    let _held = admit(s3, tenant, super::declared_body(&parts.headers)).await?;

    let file_name = file.file_name().unwrap_or_default().to_string();
    let key = fields
        .get("key")
        .ok_or_else(|| {
            bad(
                "InvalidArgument",
                "Bucket POST must contain a field named 'key'.",
            )
        })?
        .replace("${filename}", &file_name);
    // Stored fields come back as headers: they must be valid header names and values,
    // and the user metadata stays within S3's 2 KiB.
    for (k, v) in &fields {
        let stored = k.starts_with("x-amz-meta-")
            || matches!(
                k.as_str(),
                "content-type" | "cache-control" | "content-disposition" | "content-encoding"
            );
        if stored
            && (http::HeaderValue::from_str(v).is_err()
                || http::HeaderName::from_bytes(k.as_bytes()).is_err())
        {
            return Err(bad(
                "InvalidArgument",
                format!("field {k} is not a valid header"),
            ));
        }
    }
    let user_bytes: usize = fields
        .iter()
        .filter_map(|(k, v)| Some(k.strip_prefix("x-amz-meta-")?.len() + v.len()))
        .sum();
    if user_bytes > USER_META_MAX {
        return Err(bad(
            "MetadataTooLarge",
            format!(
                "Your metadata headers exceed the maximum allowed metadata size \
                 ({USER_META_MAX} bytes)."
            ),
        ));
    }
    let meta = ObjectMeta {
        content_type: fields.get("content-type").cloned(),

        cache_control: fields.get("cache-control").cloned(),
        content_disposition: fields.get("content-disposition").cloned(),
        content_encoding: fields.get("content-encoding").cloned(),
        content_language: None,
        expires: None,
        user: fields
            .iter()
            .filter_map(|(k, v)| Some((k.strip_prefix("x-amz-meta-")?.to_string(), v.clone())))
            .collect(),
    };

    // The file streams in, held to the size range as it arrives.
    const OK: u8 = 0;
    const TOO_LARGE: u8 = 1;
    const TOO_SMALL: u8 = 2;
    let verdict = Arc::new(AtomicU8::new(OK));
    let v = verdict.clone();
    let mut file = Box::pin(file);
    let mut seen = 0u64;
    let mut ended = false;
    let body: ByteStream = Box::pin(futures::stream::poll_fn(move |cx| {
        use std::task::Poll;
        if ended {
            return Poll::Ready(None);
        }
        match file.as_mut().poll_next(cx) {
            Poll::Ready(Some(Ok(c))) => {
                seen += c.len() as u64;
                if seen > max {
                    v.store(TOO_LARGE, Ordering::SeqCst);
                    ended = true;
                    return Poll::Ready(Some(Err(std::io::Error::other(
                        "the file exceeds the allowed size",
                    ))));
                }
                Poll::Ready(Some(Ok(c)))
            }
            Poll::Ready(Some(Err(e))) => {
                ended = true;
                Poll::Ready(Some(Err(std::io::Error::other(e.to_string()))))
            }
            Poll::Ready(None) => {
                ended = true;
                if seen < min {
                    v.store(TOO_SMALL, Ordering::SeqCst);
                    return Poll::Ready(Some(Err(std::io::Error::other(
                        "the file is below the allowed size",
                    ))));
                }
                Poll::Ready(None)
            }
            Poll::Pending => Poll::Pending,
        }
    }));
    let put = s3
        .store
        .put_object_ext(
            tenant,
            bucket,
            &key,
            body,
            None,
            meta,
            Conditions::default(),
            PutExtra::default(),
        )
        .await;
    let out = match (put, verdict.load(Ordering::SeqCst)) {
        (Err(_), TOO_LARGE) => {
            return Err(bad(
                "EntityTooLarge",
                format!("Your proposed upload exceeds the maximum allowed size ({max} bytes)"),
            ));
        }
        (Err(_), TOO_SMALL) => {
            return Err(bad(
                "EntityTooSmall",
                format!(
                    "Your proposed upload is smaller than the minimum allowed size ({min} bytes)"
                ),
            ));
        }
        (Err(e), _) => return Err(model_refusal(e)),
        (Ok(out), _) => out,
    };
    // What follows the file is ignored (as in S3) and not read: the connection closes
    // after the answer rather than carry unread bytes into another request.
    drop(form);
    tracing::Span::current().record("bytes", out.size);
    let mut r = success(&fields, bucket, &key, &out.etag);
    r.headers_mut().insert(
        http::header::CONNECTION,
        http::HeaderValue::from_static("close"),
    );
    Ok(r)
}

fn malformed(e: multer::Error) -> Refusal {
    bad(
        "MalformedPOSTRequest",
        format!("the form could not be read: {e}"),
    )
}

fn model_refusal(e: Error) -> Refusal {
    let e = super::to_s3(e);
    let status = e
        .status_code()
        .unwrap_or(http::StatusCode::INTERNAL_SERVER_ERROR);
    let code: &'static str = match e.code().as_str() {
        "NoSuchBucket" => "NoSuchBucket",
        "InvalidArgument" => "InvalidArgument",
        "IncompleteBody" => "IncompleteBody",
        "ServiceUnavailable" => "ServiceUnavailable",
        "SlowDown" => "SlowDown",
        "QuotaExceeded" => "QuotaExceeded",
        _ => "InternalError",
    };
    Refusal(status, code, e.message().unwrap_or("").to_string())
}

/// The tenant whose key signed the form's policy (SigV4 only).
async fn authenticate(
    s3: &GranaryS3,
    f: &BTreeMap<String, String>,
) -> Result<crate::types::TenantId, Refusal> {
    let Some(policy) = f.get("policy") else {
        return Err(denied(
            "Granary serves no anonymous uploads: the form needs a signed policy",
        ));
    };
    if f.contains_key("awsaccesskeyid") {
        return Err(Refusal(
            http::StatusCode::NOT_IMPLEMENTED,
            "NotImplemented",
            "signature version 2 form uploads are not supported; sign the policy with AWS4-HMAC-SHA256".into(),
        ));
    }
    if f.get("x-amz-algorithm").map(String::as_str) != Some("AWS4-HMAC-SHA256") {
        return Err(bad(
            "InvalidArgument",
            "x-amz-algorithm must be AWS4-HMAC-SHA256",
        ));
    }
    let (Some(credential), Some(signature)) = (f.get("x-amz-credential"), f.get("x-amz-signature"))
    else {
        return Err(bad(
            "InvalidArgument",
            "the form needs x-amz-credential and x-amz-signature",
        ));
    };
    let scope: Vec<&str> = credential.split('/').collect();
    let [access_key, date, region, service, "aws4_request"] = scope[..] else {
        return Err(bad(
            "InvalidArgument",
            "x-amz-credential must be KEY/DATE/REGION/SERVICE/aws4_request",
        ));
    };
    if service != "s3" || region != s3.region {
        return Err(bad(
            "AuthorizationQueryParametersError",
            format!(
                "the credential scope must name service s3 and region {}",
                s3.region
            ),
        ));
    }
    if !f
        .get("x-amz-date")
        .is_some_and(|d| d.len() >= 8 && d.get(..8) == Some(date))
    {
        return Err(bad(
            "InvalidArgument",
            "x-amz-date is required and must fall on the credential scope's date",
        ));
    }
    let creds = s3
        .auth
        .lookup(access_key)
        .await
        .map_err(|e| {
            tracing::error!(error = %e, "key lookup");
            Refusal(
                http::StatusCode::SERVICE_UNAVAILABLE,
                "ServiceUnavailable",
                "the key could not be looked up; retry".into(),
            )
        })?
        .ok_or_else(|| {
            Refusal(
                http::StatusCode::FORBIDDEN,
                "InvalidAccessKeyId",
                "The AWS Access Key Id you provided does not exist in our records.".into(),
            )
        })?;
    if !crate::tenancy::sigv4::verify_policy(
        &creds.secret_access_key,
        date,
        region,
        service,
        policy,
        signature,
    ) {
        return Err(Refusal(
            http::StatusCode::FORBIDDEN,
            "SignatureDoesNotMatch",
            "The request signature we calculated does not match the signature you provided.".into(),
        ));
    }
    tracing::Span::current().record("tenant", tracing::field::display(creds.tenant_id));
    Ok(creds.tenant_id)
}

/// The tenant's rate limits, for a form of `bytes`.
async fn admit(
    s3: &GranaryS3,
    tenant: crate::types::TenantId,
    bytes: u64,
) -> Result<crate::tenancy::rate::InFlight, Refusal> {
    s3.auth.limits().admit(tenant, bytes).await.map_err(|th| {
        Refusal(
            http::StatusCode::SERVICE_UNAVAILABLE,
            "SlowDown",
            th.to_string(),
        )
    })
}

/// Checks the policy's expiry and conditions against the form; answers the allowed size
/// range of the file.
fn check_policy(f: &BTreeMap<String, String>, bucket: &str) -> Result<(u64, u64), Refusal> {
    use base64::Engine as _;
    let invalid = |why: String| denied(format!("Invalid according to Policy: {why}"));
    let raw = base64::engine::general_purpose::STANDARD
        .decode(
            f.get("policy")
                .map(String::as_str)
                .unwrap_or_default()
                .trim(),
        )
        .map_err(|_| bad("InvalidPolicyDocument", "the policy is not base64"))?;
    let doc: Value = serde_json::from_slice(&raw)
        .map_err(|_| bad("InvalidPolicyDocument", "the policy is not JSON"))?;
    let expiration = doc
        .get("expiration")
        .and_then(Value::as_str)
        .ok_or_else(|| bad("InvalidPolicyDocument", "the policy has no expiration"))?;
    let expires =
        time::OffsetDateTime::parse(expiration, &time::format_description::well_known::Rfc3339)
            .map_err(|_| {
                bad(
                    "InvalidPolicyDocument",
                    "the policy's expiration is not a date",
                )
            })?;
    if time::OffsetDateTime::now_utc() >= expires {
        return Err(invalid("Policy expired.".into()));
    }
    let conditions = doc
        .get("conditions")
        .and_then(Value::as_array)
        .ok_or_else(|| bad("InvalidPolicyDocument", "the policy has no conditions"))?;
    // The value a condition checks: the bucket is the URL's.
    let value_of = |name: &str| -> String {
        let name = name.trim_start_matches('$').to_ascii_lowercase();
        if name == "bucket" {
            return bucket.to_string();
        }
        f.get(&name).cloned().unwrap_or_default()
    };
    let mut covered = std::collections::HashSet::new();
    let (mut min, mut max) = (0u64, MAX_OBJECT);
    for c in conditions {
        match c {
            Value::Object(m) => {
                for (k, v) in m {
                    let want = v.as_str().unwrap_or_default();
                    let k = k.trim_start_matches('$').to_ascii_lowercase();
                    if value_of(&k) != want {
                        return Err(invalid(format!(
                            "Policy Condition failed: [\"eq\", \"${k}\", \"{want}\"]"
                        )));
                    }
                    covered.insert(k);
                }
            }
            Value::Array(a) => {
                let op = a
                    .first()
                    .and_then(Value::as_str)
                    .unwrap_or_default()
                    .to_ascii_lowercase();
                if op == "content-length-range" {
                    let n = |i: usize| a.get(i).and_then(Value::as_u64);
                    let (Some(lo), Some(hi)) = (n(1), n(2)) else {
                        return Err(bad(
                            "InvalidPolicyDocument",
                            "content-length-range needs two sizes",
                        ));
                    };
                    min = min.max(lo);
                    max = max.min(hi);
                    continue;
                }
                let (Some(field), Some(want)) = (
                    a.get(1).and_then(Value::as_str),
                    a.get(2).and_then(Value::as_str),
                ) else {
                    return Err(bad(
                        "InvalidPolicyDocument",
                        format!("a condition is malformed: {c}"),
                    ));
                };
                let k = field.trim_start_matches('$').to_ascii_lowercase();
                let got = value_of(&k);
                let holds = match op.as_str() {
                    "eq" => got == want,
                    "starts-with" => got.starts_with(want),
                    _ => {
                        return Err(bad(
                            "InvalidPolicyDocument",
                            format!("unknown condition {op:?}"),
                        ));
                    }
                };
                if !holds {
                    return Err(invalid(format!(
                        "Policy Condition failed: [\"{op}\", \"${k}\", \"{want}\"]"
                    )));
                }
                covered.insert(k);
            }
            _ => {
                return Err(bad(
                    "InvalidPolicyDocument",
                    format!("a condition is malformed: {c}"),
                ));
            }
        }
    }
    // Every field the form sends must be covered by a condition, but these.
    let exempt = |k: &str| {
        matches!(k, "policy" | "x-amz-signature" | "file" | "bucket") || k.starts_with("x-ignore-")
    };
    if let Some(extra) = f
        .keys()
        .find(|k| !exempt(k) && !covered.contains(k.as_str()))
    {
        return Err(invalid(format!("Extra input fields: {extra}")));
    }
    if f.get("bucket").is_some_and(|b| b != bucket) {
        return Err(invalid(
            "the bucket field differs from the bucket of the URL".into(),
        ));
    }
    if min > max {
        return Err(bad(
            "InvalidPolicyDocument",
            "content-length-range is empty",
        ));
    }
    Ok((min, max))
}

/// The answer to a stored upload: a redirect, or `success_action_status` (204 by
/// default; 201 with a PostResponse document).
fn success(
    f: &BTreeMap<String, String>,
    bucket: &str,
    key: &str,
    etag: &str,
) -> http::Response<s3s::Body> {
    let etag_q = format!("\"{etag}\"");
    let enc = |s: &str| {
        percent_encoding::utf8_percent_encode(s, percent_encoding::NON_ALPHANUMERIC).to_string()
    };
    let location = format!("/{bucket}/{}", enc(key).replace("%2F", "/"));
    let b = http::Response::builder().header(http::header::ETAG, etag_q.as_str());
    if let Some(r) = f
        .get("success_action_redirect")
        .or_else(|| f.get("redirect"))
        && (r.starts_with("http://") || r.starts_with("https://"))
    {
        let sep = if r.contains('?') { '&' } else { '?' };
        let to = format!(
            "{r}{sep}bucket={}&key={}&etag={}",
            enc(bucket),
            enc(key),
            enc(&etag_q)
        );
        if let Ok(to) = http::HeaderValue::from_str(&to) {
            return b
                .status(http::StatusCode::SEE_OTHER)
                .header(http::header::LOCATION, to)
                .body(s3s::Body::empty())
                .unwrap_or_default();
        }
        // A redirect that is no valid header: answered as without one (the object is
        // stored).
    }
    let b = b.header(http::header::LOCATION, location.as_str());
    match f.get("success_action_status").map(String::as_str) {
        Some("200") => b.status(http::StatusCode::OK).body(s3s::Body::empty()),
        Some("201") => {
            let esc = |s: &str| super::front::xml_escape(s).replace('"', "&quot;");
            let xml = format!(
                "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<PostResponse><Location>{}</Location>\
                 <Bucket>{}</Bucket><Key>{}</Key><ETag>{}</ETag></PostResponse>",
                esc(&location),
                esc(bucket),
                esc(key),
                esc(&etag_q)
            );
            b.status(http::StatusCode::CREATED)
                .header(http::header::CONTENT_TYPE, "application/xml")
                .body(s3s::Body::from(xml))
        }
        _ => b
            .status(http::StatusCode::NO_CONTENT)
            .body(s3s::Body::empty()),
    }
    .unwrap_or_default()
}
