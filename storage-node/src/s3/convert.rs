//! Conversions between s3s DTO fields and model types.

use base64::Engine as _;
use s3s::dto::{ETag, ETagCondition, Metadata, Timestamp};
use s3s::{S3Error, S3ErrorCode, S3Request, S3Result};
use time::OffsetDateTime;

use crate::model::checksum::{ChecksumCheck, Expected};
use crate::model::object::{ByteRange, Checksum, ChecksumAlgorithm};
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
    if !e.to_ascii_lowercase().contains("aws-chunked") {
        return (!e.trim().is_empty()).then(|| e.to_string());
    }
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

/// The tags of an `x-amz-tagging` header: a URL-encoded query string (`k1=v1&k2=v2`).
pub fn tags_header(v: Option<&str>) -> S3Result<Vec<(String, String)>> {
    let Some(v) = v.filter(|v| !v.is_empty()) else {
        return Ok(Vec::new());
    };
    let dec = |s: &str| {
        percent_encoding::percent_decode_str(&s.replace('+', " "))
            .decode_utf8()
            .map(|c| c.into_owned())
            .map_err(|_| {
                S3Error::with_message(S3ErrorCode::InvalidTag, "x-amz-tagging is not valid UTF-8")
            })
    };
    v.split('&')
        .filter(|p| !p.is_empty())
        .map(|p| {
            let (k, v) = p.split_once('=').unwrap_or((p, ""));
            Ok((dec(k)?, dec(v)?))
        })
        .collect()
}

/// A tag set of the XML API.
pub fn tags_from(t: s3s::dto::Tagging) -> Vec<(String, String)> {
    t.tag_set
        .into_iter()
        .map(|t| (t.key.unwrap_or_default(), t.value.unwrap_or_default()))
        .collect()
}

pub fn tag_set(tags: Vec<(String, String)>) -> Vec<s3s::dto::Tag> {
    tags.into_iter()
        .map(|(k, v)| s3s::dto::Tag {
            key: Some(k),
            value: Some(v),
        })
        .collect()
}

/// `x-amz-tagging-directive: REPLACE` on a copy: the copy gets the request's tags
/// (`Some`); else (`COPY`, the default) the source's (`None`).
pub fn copy_tags(
    directive: Option<&s3s::dto::TaggingDirective>,
    tagging: Option<&str>,
) -> S3Result<Option<Vec<(String, String)>>> {
    match directive.map(|d| d.as_str()) {
        Some(d) if d.eq_ignore_ascii_case("REPLACE") => Ok(Some(tags_header(tagging)?)),
        _ => Ok(None),
    }
}

const CHECKSUM_HEADERS: [(&str, ChecksumAlgorithm); 5] = [
    ("x-amz-checksum-crc32", ChecksumAlgorithm::Crc32),
    ("x-amz-checksum-crc32c", ChecksumAlgorithm::Crc32c),
    ("x-amz-checksum-crc64nvme", ChecksumAlgorithm::Crc64Nvme),
    ("x-amz-checksum-sha1", ChecksumAlgorithm::Sha1),
    ("x-amz-checksum-sha256", ChecksumAlgorithm::Sha256),
];

/// The flexible checksum a body must match: from an `x-amz-checksum-*` header, else
/// from the `aws-chunked` trailer `x-amz-trailer` names, else computed only when
/// `x-amz-sdk-checksum-algorithm` (or the upload, for a part) asks for one.
pub fn checksum_check<T>(req: &S3Request<T>) -> S3Result<Option<ChecksumCheck>> {
    let h = &req.headers;
    let mut values = Vec::new();
    for (name, a) in CHECKSUM_HEADERS {
        if let Some(v) = h.get(name) {
            let v = v.to_str().map_err(|_| {
                S3Error::with_message(S3ErrorCode::InvalidRequest, format!("{name} is not valid"))
            })?;
            values.push((a, v.to_string()));
        }
    }
    let mut given = values.into_iter();
    if let Some((algorithm, value)) = given.next() {
        if given.next().is_some() {
            return Err(S3Error::with_message(
                S3ErrorCode::InvalidRequest,
                "Expecting a single x-amz-checksum- header. Multiple checksum Types are not allowed.",
            ));
        }
        return Ok(Some(ChecksumCheck {
            algorithm,
            expected: Expected::Value(value),
        }));
    }
    if let Some(trailer) = h.get("x-amz-trailer").and_then(|v| v.to_str().ok()) {
        let name = trailer.trim().to_ascii_lowercase();
        if let Some((_, algorithm)) = CHECKSUM_HEADERS.iter().find(|(n, _)| *n == name) {
            let Some(trailers) = req.trailing_headers.clone() else {
                return Err(S3Error::with_message(
                    S3ErrorCode::InvalidRequest,
                    "x-amz-trailer needs an aws-chunked body",
                ));
            };
            return Ok(Some(ChecksumCheck {
                algorithm: *algorithm,
                expected: Expected::Trailer(Box::new(move || {
                    trailers
                        .read(|t| {
                            t.get(name.as_str())
                                .and_then(|v| v.to_str().ok())
                                .map(str::to_string)
                        })
                        .flatten()
                })),
            }));
        }
    }
    let asked = h
        .get("x-amz-sdk-checksum-algorithm")
        .or_else(|| h.get("x-amz-checksum-algorithm"))
        .and_then(|v| v.to_str().ok());
    match asked {
        None => Ok(None),
        Some(a) => Ok(Some(ChecksumCheck {
            algorithm: algorithm_named(a)?,
            expected: Expected::Compute,
        })),
    }
}

pub fn algorithm_named(a: &str) -> S3Result<ChecksumAlgorithm> {
    ChecksumAlgorithm::from_name(a).ok_or_else(|| {
        S3Error::with_message(
            S3ErrorCode::InvalidRequest,
            format!("Checksum algorithm {a:?} is not supported"),
        )
    })
}

/// The checksum fields of an answer: the one of `c`'s algorithm set.
#[derive(Default)]
pub struct Sums {
    pub crc32: Option<String>,
    pub crc32c: Option<String>,
    pub crc64nvme: Option<String>,
    pub sha1: Option<String>,
    pub sha256: Option<String>,
    pub kind: Option<s3s::dto::ChecksumType>,
}

/// `FULL_OBJECT` or `COMPOSITE`.
pub fn checksum_type(full_object: bool) -> s3s::dto::ChecksumType {
    s3s::dto::ChecksumType::from_static(if full_object {
        s3s::dto::ChecksumType::FULL_OBJECT
    } else {
        s3s::dto::ChecksumType::COMPOSITE
    })
}

pub fn sums(c: Option<&Checksum>) -> Sums {
    let Some(c) = c else {
        return Sums::default();
    };
    let mut s = Sums {
        kind: Some(checksum_type(c.full_object)),
        ..Default::default()
    };
    let v = Some(c.value.clone());
    match c.algorithm {
        ChecksumAlgorithm::Crc32 => s.crc32 = v,
        ChecksumAlgorithm::Crc32c => s.crc32c = v,
        ChecksumAlgorithm::Crc64Nvme => s.crc64nvme = v,
        ChecksumAlgorithm::Sha1 => s.sha1 = v,
        ChecksumAlgorithm::Sha256 => s.sha256 = v,
    }
    s
}

/// Sets the `checksum_*` fields (and `checksum_type`) of an output from [`Sums`].
/// `@sums` sets only the five values (for outputs without a `checksum_type`).
macro_rules! set_checksums {
    (@sums $out:expr, $s:expr) => {{
        let s = $s;
        $out.checksum_crc32 = s.crc32;
        $out.checksum_crc32c = s.crc32c;
        $out.checksum_crc64nvme = s.crc64nvme;
        $out.checksum_sha1 = s.sha1;
        $out.checksum_sha256 = s.sha256;
        s.kind
    }};
    ($out:expr, $c:expr) => {{
        $out.checksum_type =
            $crate::s3::convert::set_checksums!(@sums $out, $crate::s3::convert::sums($c));
    }};
}
pub(crate) use set_checksums;

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
        assert_eq!(stored_encoding("gzip,br").as_deref(), Some("gzip,br"));
        assert_eq!(stored_encoding(" "), None);
    }
}
