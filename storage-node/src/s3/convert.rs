//! Conversions between s3s DTO fields and model types.

use base64::Engine as _;
use s3s::dto::{ETag, ETagCondition, Metadata, Timestamp};
use s3s::{S3Error, S3ErrorCode, S3Request, S3Result};
use time::OffsetDateTime;

use crate::model::object::ByteRange;
use crate::model::{Conditions, ObjectMeta};

pub fn timestamp(ms: i64) -> Timestamp {
    let t = OffsetDateTime::from_unix_timestamp_nanos(i128::from(ms) * 1_000_000)
        .unwrap_or(OffsetDateTime::UNIX_EPOCH);
    Timestamp::from(t)
}

pub fn millis(t: Timestamp) -> i64 {
    let t: OffsetDateTime = t.into();
    i64::try_from(t.unix_timestamp_nanos() / 1_000_000).unwrap_or(0)
}

pub fn etag(s: &str) -> ETag {
    ETag::Strong(s.to_string())
}

fn etag_list(c: Option<ETagCondition>) -> Option<Vec<String>> {
    c.map(|c| match c {
        ETagCondition::Any => vec!["*".to_string()],
        ETagCondition::ETag(e) => vec![e.into_value()],
    })
}

pub fn conditions(
    if_match: Option<ETagCondition>,
    if_none_match: Option<ETagCondition>,
    if_modified_since: Option<Timestamp>,
    if_unmodified_since: Option<Timestamp>,
) -> Conditions {
    Conditions {
        if_match: etag_list(if_match),
        if_none_match: etag_list(if_none_match),
        if_modified_since: if_modified_since.map(millis),
        if_unmodified_since: if_unmodified_since.map(millis),
    }
}

/// Parses `Content-MD5` (base64 of 16 bytes).
pub fn content_md5(v: Option<&str>) -> S3Result<Option<[u8; 16]>> {
    let Some(v) = v else { return Ok(None) };
    let raw = base64::engine::general_purpose::STANDARD
        .decode(v.trim())
        .map_err(|_| {
            S3Error::with_message(
                S3ErrorCode::InvalidDigest,
                "Content-MD5 is not valid base64",
            )
        })?;
    let d: [u8; 16] = raw.try_into().map_err(|_| {
        S3Error::with_message(S3ErrorCode::InvalidDigest, "Content-MD5 must be 16 bytes")
    })?;
    Ok(Some(d))
}

#[allow(clippy::too_many_arguments)]
pub fn meta(
    content_type: Option<String>,
    cache_control: Option<String>,
    content_disposition: Option<String>,
    content_encoding: Option<String>,
    content_language: Option<String>,
    expires: Option<Timestamp>,
    user: Option<Metadata>,
) -> ObjectMeta {
    ObjectMeta {
        content_type,
        cache_control,
        content_disposition,
        content_encoding: content_encoding.and_then(|e| stored_encoding(&e)),
        content_language,
        expires: expires.map(millis),
        user: user
            .unwrap_or_default()
            .into_iter()
            .map(|(k, v)| (k.to_ascii_lowercase(), v))
            .collect(),
    }
}

/// The `Content-Encoding` to store: `aws-chunked` describes how the request body was
/// framed, not the object, so it is dropped (`gzip, aws-chunked` is stored as `gzip`;
/// `aws-chunked` alone stores none), as S3 does.
pub fn stored_encoding(e: &str) -> Option<String> {
    let kept: Vec<&str> = e
        .split(',')
        .map(str::trim)
        .filter(|c| !c.is_empty() && !c.eq_ignore_ascii_case("aws-chunked"))
        .collect();
    (!kept.is_empty()).then(|| kept.join(", "))
}

pub fn user_metadata(m: &ObjectMeta) -> Option<Metadata> {
    (!m.user.is_empty()).then(|| m.user.iter().map(|(k, v)| (k.clone(), v.clone())).collect())
}

pub fn range(r: Option<s3s::dto::Range>) -> Option<ByteRange> {
    r.map(|r| match r {
        s3s::dto::Range::Int { first, last } => ByteRange::FromTo(first, last),
        s3s::dto::Range::Suffix { length } => ByteRange::Suffix(length),
    })
}

/// `x-amz-copy-source-range: bytes=first-last`.
pub fn copy_range(v: Option<&str>) -> S3Result<Option<ByteRange>> {
    let Some(v) = v else { return Ok(None) };
    let bad = || {
        S3Error::with_message(
            S3ErrorCode::InvalidArgument,
            "x-amz-copy-source-range must be bytes=first-last",
        )
    };
    let spec = v.strip_prefix("bytes=").ok_or_else(bad)?;
    let (a, b) = spec.split_once('-').ok_or_else(bad)?;
    let first: u64 = a.parse().map_err(|_| bad())?;
    let last: u64 = b.parse().map_err(|_| bad())?;
    if last < first {
        return Err(bad());
    }
    Ok(Some(ByteRange::FromTo(first, Some(last))))
}

pub fn token_encode(last: &str) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(last.as_bytes())
}

pub fn token_decode(t: &str) -> S3Result<String> {
    base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(t)
        .ok()
        .and_then(|b| String::from_utf8(b).ok())
        .ok_or_else(|| {
            S3Error::with_message(
                S3ErrorCode::InvalidArgument,
                "The continuation token provided is incorrect",
            )
        })
}

pub fn max_keys(v: Option<i32>, default: usize) -> S3Result<usize> {
    match v {
        None => Ok(default),
        Some(n) if n < 0 => Err(S3Error::with_message(
            S3ErrorCode::InvalidArgument,
            "max-keys must be non-negative",
        )),
        Some(n) => Ok((n as usize).min(default)),
    }
}

/// The source of a copy, as `(bucket, key)`.
pub fn copy_source(c: &s3s::dto::CopySource) -> S3Result<(String, String)> {
    match c {
        s3s::dto::CopySource::Bucket { bucket, key, .. } => {
            Ok((bucket.to_string(), key.to_string()))
        }
        _ => Err(S3Error::with_message(
            S3ErrorCode::NotImplemented,
            "access point copy sources are not supported",
        )),
    }
}

/// Marks the request's operation in the current span (for traces and metrics).
pub fn note<T>(req: &S3Request<T>, op: &'static str, bucket: Option<&str>) {
    let span = tracing::Span::current();
    span.record("operation", op);
    if let Some(b) = bucket {
        span.record("bucket", b);
    }
    if let Some(slot) = req.extensions.get::<crate::telemetry::OpSlot>() {
        slot.set(op);
    }
}

#[cfg(test)]
mod tests {
    use super::stored_encoding;

    #[test]
    fn aws_chunked_is_not_stored_as_a_content_encoding() {
        assert_eq!(
            stored_encoding("gzip, aws-chunked").as_deref(),
            Some("gzip")
        );
        assert_eq!(stored_encoding("aws-chunked,gzip").as_deref(), Some("gzip"));
        assert_eq!(stored_encoding("AWS-Chunked"), None);
        assert_eq!(stored_encoding("aws-chunked"), None);
        assert_eq!(stored_encoding("gzip, br").as_deref(), Some("gzip, br"));
        assert_eq!(stored_encoding(" "), None);
    }
}
