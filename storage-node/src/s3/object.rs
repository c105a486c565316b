//! Object operations: put, get, head, delete (one and many), copy.

use futures::TryStreamExt;
use s3s::dto::*;
use s3s::{S3Error, S3ErrorCode, S3Request, S3Response, S3Result};

use super::convert::{self, note, timestamp};
use super::{GranaryS3, to_s3};
use crate::model::{ByteStream, Conditions, ObjectMeta, ObjectRecord};

pub(super) fn body_stream(b: Option<StreamingBlob>) -> ByteStream {
    match b {
        Some(b) => Box::pin(b.map_err(|e| std::io::Error::other(e.to_string()))),
        None => Box::pin(futures::stream::empty()),
    }
}

pub async fn put_object(
    s: &GranaryS3,
    req: S3Request<PutObjectInput>,
) -> S3Result<S3Response<PutObjectOutput>> {
    note(&req, "PutObject", Some(&req.input.bucket));
    let t = s.tenant(&req).await?;
    let i = req.input;
    let md5 = convert::content_md5(i.content_md5.as_deref())?;
    let meta = convert::meta(
        i.content_type,
        i.cache_control,
        i.content_disposition,
        i.content_encoding,
        i.content_language,
        i.expires,
        i.metadata,
    );
    let cond = convert::conditions(i.if_match, i.if_none_match, None, None);
    let out = s
        .store
        .put_object(t, &i.bucket, &i.key, body_stream(i.body), md5, meta, cond)
        .await
        .map_err(to_s3)?;
    tracing::Span::current().record("bytes", out.size);
    Ok(S3Response::new(PutObjectOutput {
        e_tag: Some(convert::etag(&out.etag)),
        ..Default::default()
    }))
}

/// 304 Not Modified with the object's `ETag` and `Last-Modified`, which clients use to
/// keep their cached copy current.
fn not_modified(o: &ObjectRecord) -> S3Error {
    let mut e = S3Error::new(S3ErrorCode::NotModified);
    let mut h = http::HeaderMap::new();
    if let Ok(v) = http::HeaderValue::from_str(&format!("\"{}\"", o.etag)) {
        h.insert(http::header::ETAG, v);
    }
    let lm = std::time::UNIX_EPOCH
        + std::time::Duration::from_millis(u64::try_from(o.last_modified).unwrap_or(0));
    if let Ok(v) = http::HeaderValue::from_str(&httpdate::fmt_http_date(lm)) {
        h.insert(http::header::LAST_MODIFIED, v);
    }
    e.set_headers(h);
    e
}

fn parts_count(o: &ObjectRecord) -> Option<i32> {
    o.etag.split_once('-').and_then(|(_, n)| n.parse().ok())
}

pub async fn get_object(
    s: &GranaryS3,
    req: S3Request<GetObjectInput>,
) -> S3Result<S3Response<GetObjectOutput>> {
    note(&req, "GetObject", Some(&req.input.bucket));
    let t = s.tenant(&req).await?;
    let i = req.input;
    if i.part_number.is_some() {
        return Err(S3Error::with_message(
            S3ErrorCode::NotImplemented,
            "GET by partNumber is not supported yet",
        ));
    }
    let cond = convert::conditions(
        i.if_match,
        i.if_none_match,
        i.if_modified_since,
        i.if_unmodified_since,
    );
    let ranged = i.range.is_some();
    let got = s
        .store
        .get_object(t, &i.bucket, &i.key, convert::range(i.range), &cond)
        .await;
    let (o, r, body) = match got {
        Err(crate::model::Error::NotModified) => {
            // A 304 carries the validators (RFC 9110 15.4.5): read them once more.
            let o = s
                .store
                .head_object(t, &i.bucket, &i.key)
                .await
                .map_err(to_s3)?;
            return Err(not_modified(&o));
        }
        r => r.map_err(to_s3)?,
    };
    tracing::Span::current().record("bytes", body.len);
    let m = &o.meta;
    Ok(S3Response::new(GetObjectOutput {
        body: Some(StreamingBlob::wrap(body.stream)),
        content_length: Some(body.len as i64),
        content_range: ranged
            .then(|| format!("bytes {}-{}/{}", r.start, r.end.saturating_sub(1), o.size)),
        accept_ranges: Some("bytes".to_string()),
        e_tag: Some(convert::etag(&o.etag)),
        last_modified: Some(timestamp(o.last_modified)),
        content_type: i.response_content_type.or_else(|| m.content_type.clone()),
        cache_control: i.response_cache_control.or_else(|| m.cache_control.clone()),
        content_disposition: i
            .response_content_disposition
            .or_else(|| m.content_disposition.clone()),
        content_encoding: i
            .response_content_encoding
            .or_else(|| m.content_encoding.clone()),
        content_language: i
            .response_content_language
            .or_else(|| m.content_language.clone()),
        expires: i.response_expires.or_else(|| m.expires.map(timestamp)),
        metadata: convert::user_metadata(m),
        parts_count: parts_count(&o),
        ..Default::default()
    }))
}

pub async fn head_object(
    s: &GranaryS3,
    req: S3Request<HeadObjectInput>,
) -> S3Result<S3Response<HeadObjectOutput>> {
    note(&req, "HeadObject", Some(&req.input.bucket));
    let t = s.tenant(&req).await?;
    let i = req.input;
    let cond = convert::conditions(
        i.if_match,
        i.if_none_match,
        i.if_modified_since,
        i.if_unmodified_since,
    );
    let o = s
        .store
        .head_object(t, &i.bucket, &i.key)
        .await
        .map_err(to_s3)?;
    cond.check_read(&o).map_err(|e| match e {
        crate::model::Error::NotModified => not_modified(&o),
        e => to_s3(e),
    })?;
    let (len, content_range) = match convert::range(i.range) {
        Some(r) => {
            let r = r.resolve(o.size).map_err(to_s3)?;
            (
                r.end - r.start,
                Some(format!(
                    "bytes {}-{}/{}",
                    r.start,
                    r.end.saturating_sub(1),
                    o.size
                )),
            )
        }
        None => (o.size, None),
    };
    let m = &o.meta;
    Ok(S3Response::new(HeadObjectOutput {
        content_length: Some(len as i64),
        content_range,
        accept_ranges: Some("bytes".to_string()),
        e_tag: Some(convert::etag(&o.etag)),
        last_modified: Some(timestamp(o.last_modified)),
        content_type: m.content_type.clone(),
        cache_control: m.cache_control.clone(),
        content_disposition: m.content_disposition.clone(),
        content_encoding: m.content_encoding.clone(),
        content_language: m.content_language.clone(),
        expires: m.expires.map(timestamp),
        metadata: convert::user_metadata(m),
        parts_count: parts_count(&o),
        ..Default::default()
    }))
}

pub async fn delete_object(
    s: &GranaryS3,
    req: S3Request<DeleteObjectInput>,
) -> S3Result<S3Response<DeleteObjectOutput>> {
    note(&req, "DeleteObject", Some(&req.input.bucket));
    let t = s.tenant(&req).await?;
    s.store
        .delete_object(t, &req.input.bucket, &req.input.key)
        .await
        .map_err(to_s3)?;
    Ok(S3Response::new(DeleteObjectOutput::default()))
}

pub async fn delete_objects(
    s: &GranaryS3,
    req: S3Request<DeleteObjectsInput>,
) -> S3Result<S3Response<DeleteObjectsOutput>> {
    note(&req, "DeleteObjects", Some(&req.input.bucket));
    let t = s.tenant(&req).await?;
    let i = req.input;
    if i.delete.objects.len() > 1000 {
        return Err(S3Error::with_message(
            S3ErrorCode::MalformedXML,
            "at most 1000 keys per DeleteObjects request",
        ));
    }
    // Fail the whole request for a missing bucket, like S3.
    s.store.bucket(t, &i.bucket).await.map_err(to_s3)?;
    let quiet = i.delete.quiet.unwrap_or(false);
    let mut deleted = Vec::new();
    let mut errors = Vec::new();
    for obj in i.delete.objects {
        match s.store.delete_object(t, &i.bucket, &obj.key).await {
            Ok(()) => {
                if !quiet {
                    deleted.push(DeletedObject {
                        key: Some(obj.key),
                        ..Default::default()
                    });
                }
            }
            Err(e) => {
                let e = to_s3(e);
                errors.push(Error {
                    code: Some(e.code().as_str().to_string()),
                    key: Some(obj.key),
                    message: e.message().map(str::to_string),
                    version_id: None,
                });
            }
        }
    }
    Ok(S3Response::new(DeleteObjectsOutput {
        deleted: Some(deleted),
        errors: Some(errors),
        ..Default::default()
    }))
}

pub async fn copy_object(
    s: &GranaryS3,
    req: S3Request<CopyObjectInput>,
) -> S3Result<S3Response<CopyObjectOutput>> {
    note(&req, "CopyObject", Some(&req.input.bucket));
    let t = s.tenant(&req).await?;
    let i = req.input;
    let (src_bucket, src_key) = convert::copy_source(&i.copy_source)?;
    let replace = i
        .metadata_directive
        .as_ref()
        .is_some_and(|d| d.as_str() == MetadataDirective::REPLACE);
    if !replace && src_bucket == i.bucket && src_key == i.key {
        return Err(S3Error::with_message(
            S3ErrorCode::InvalidRequest,
            "This copy request is illegal because it is trying to copy an object to itself without changing the object's metadata.",
        ));
    }
    let meta: Option<ObjectMeta> = replace.then(|| {
        convert::meta(
            i.content_type,
            i.cache_control,
            i.content_disposition,
            i.content_encoding,
            i.content_language,
            i.expires,
            i.metadata,
        )
    });
    let cond: Conditions = convert::conditions(
        i.copy_source_if_match,
        i.copy_source_if_none_match,
        i.copy_source_if_modified_since,
        i.copy_source_if_unmodified_since,
    );
    let (_, out) = s
        .store
        .copy_object(t, &src_bucket, &src_key, &cond, &i.bucket, &i.key, meta)
        .await
        .map_err(|e| match e {
            // A failed copy-source condition is a 412 even when it is If-None-Match.
            crate::model::Error::NotModified => to_s3(crate::model::Error::PreconditionFailed),
            e => to_s3(e),
        })?;
    Ok(S3Response::new(CopyObjectOutput {
        copy_object_result: Some(CopyObjectResult {
            e_tag: Some(convert::etag(&out.etag)),
            last_modified: Some(timestamp(crate::types::now_millis())),
            ..Default::default()
        }),
        ..Default::default()
    }))
}
