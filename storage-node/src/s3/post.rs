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

use futures::{Stream, TryStreamExt};
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
pub fn is_form_post(parts: &http::request::Parts) -> bool {
    parts.method == http::Method::POST
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

/// Handles a form upload to `bucket`. `Ok` is the success answer; a model error comes
/// back as the S3 error it maps to.
pub async fn handle(
    s3: &GranaryS3,
    parts: &http::request::Parts,
    bucket: &str,
    body: s3s::Body,
) -> Result<http::Response<s3s::Body>, Refusal> {
    let ct = parts
        .headers
        .get(http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default();
    let boundary = multer::parse_boundary(ct)
        .map_err(|_| bad("MalformedPOSTRequest", "the multipart boundary is missing"))?;
    let stream = body.map_err(|e| std::io::Error::other(e.to_string()));
    let mut form = multer::Multipart::new(stream, boundary);

    // The fields before the file, bounded.
    let mut fields: BTreeMap<String, String> = BTreeMap::new();
    let mut held = 0usize;
    let file = loop {
        let Some(mut field) = form.next_field().await.map_err(malformed)? else {
            return Err(bad(
                "InvalidArgument",
                "POST requires exactly one file upload per request.",
            ));
        };
        let name = field.name().unwrap_or_default().to_ascii_lowercase();
        if name == "file" {
            break field;
        }
        let mut value = Vec::new();
        while let Some(chunk) = field.chunk().await.map_err(malformed)? {
            held += chunk.len();
            if value.len() + chunk.len() > FIELD_MAX || held > FIELDS_MAX {
                return Err(bad(
                    "MaxPostPreDataLengthExceeded",
                    "Your POST request fields preceding the upload file were too large.",
                ));
            }
            value.extend_from_slice(&chunk);
        }
        let value = String::from_utf8(value)
            .map_err(|_| bad("MalformedPOSTRequest", format!("field {name} is not UTF-8")))?;
        fields.insert(name, value);
    };

    let tenant = authenticate(s3, &fields).await?;
    admit(s3, tenant, super::declared_body(&parts.headers)).await?;
    let (min, max) = check_policy(&fields, bucket)?;

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
    // Read the rest of the form (what follows the file is ignored, as in S3), so that
    // the connection holds no unread bytes.
    while let Ok(Some(mut f)) = form.next_field().await {
        while let Ok(Some(_)) = f.chunk().await {}
    }
    tracing::Span::current().record("bytes", out.size);
    Ok(success(&fields, bucket, &key, &out.etag))
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
async fn admit(s3: &GranaryS3, tenant: crate::types::TenantId, bytes: u64) -> Result<(), Refusal> {
    s3.auth.limits().admit(tenant, bytes).await.map_err(|th| {
        Refusal(
            http::StatusCode::SERVICE_UNAVAILABLE,
            "SlowDown",
            format!(
                "the tenant's {} rate limit is reached; retry after {} s",
                th.limit,
                th.retry_after_secs()
            ),
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
    let mut b = http::Response::builder()
        .header(http::header::ETAG, etag_q.as_str())
        .header(http::header::LOCATION, location.as_str());
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
        b = b
            .status(http::StatusCode::SEE_OTHER)
            .header(http::header::LOCATION, to);
        return b.body(s3s::Body::empty()).unwrap_or_default();
    }
    match f.get("success_action_status").map(String::as_str) {
        Some("200") => b.status(http::StatusCode::OK).body(s3s::Body::empty()),
        Some("201") => {
            let esc = |s: &str| {
                s.replace('&', "&amp;")
                    .replace('<', "&lt;")
                    .replace('>', "&gt;")
                    .replace('"', "&quot;")
            };
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
