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
    let checksum = convert::checksum_check(&req)?;
    let declared = super::declared_len(&req.headers);
    let i = req.input;
    let tags = convert::tags_header(i.tagging.as_deref())?;
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
    let extra = crate::model::object::PutExtra {
        tags,
        checksum,
        declared_size: declared,
    };
    let out = s
        .store
        .put_object_ext(
            t,
            &i.bucket,
            &i.key,
            body_stream(i.body),
            md5,
            meta,
            cond,
            extra,
        )
        .await
        .map_err(to_s3)?;
    tracing::Span::current().record("bytes", out.size);
    let mut o = PutObjectOutput {
        e_tag: Some(convert::etag(&out.etag)),
        ..Default::default()
    };
    convert::set_checksums!(o, out.checksum.as_ref());
    Ok(S3Response::new(o))
}

/// The byte range a GET or HEAD asks for: `Range`, or `partNumber` (not both).
fn requested_range(
    range: Option<s3s::dto::Range>,
    part_number: Option<i32>,
) -> S3Result<Option<crate::model::object::ByteRange>> {
    match (range, part_number) {
        (Some(_), Some(_)) => Err(S3Error::with_message(
            S3ErrorCode::InvalidRequest,
            "Cannot specify both Range header and partNumber query parameter",
        )),
        (None, Some(n)) => {
            let n = u32::try_from(n)
                .ok()
                .filter(|n| (1..=10_000).contains(n))
                .ok_or_else(|| {
                    S3Error::with_message(
                        S3ErrorCode::InvalidArgument,
                        "Part number must be an integer between 1 and 10000, inclusive",
                    )
                })?;
            Ok(Some(crate::model::object::ByteRange::Part(n)))
        }
        (r, None) => Ok(convert::range(r)),
    }
}

fn checksum_mode(m: &Option<ChecksumMode>) -> bool {
    m.as_ref()
        .is_some_and(|m| m.as_str().eq_ignore_ascii_case(ChecksumMode::ENABLED))
}

/// The checksum a read answers with (`x-amz-checksum-mode: ENABLED`): the object's, for
/// the whole object; the part's is not kept for a GET by part, so none then.
fn read_checksum(
    o: &ObjectRecord,
    mode: bool,
    whole: bool,
) -> Option<&crate::model::object::Checksum> {
    o.ext.checksum.as_ref().filter(|_| mode && whole)
}

/// Whether an answer carries the whole object, so that the object's checksum describes
/// it: no Range, or part 1 of an object stored in one part (a part of a multipart
/// object is not described by the object's checksum, whatever its range).
fn answers_whole(o: &ObjectRecord, ranged: bool, by_part: bool, r: &std::ops::Range<u64>) -> bool {
    !ranged || (by_part && o.ext.part_sizes.is_empty() && r.start == 0 && r.end == o.size)
}

fn tag_count(o: &ObjectRecord) -> Option<i32> {
    (!o.ext.tags.is_empty()).then_some(o.ext.tags.len() as i32)
}

/// 304 Not Modified with the object's `ETag` and `Last-Modified`, which clients use to
/// keep their cached copy current.
pub(super) fn not_modified(etag: &str, last_modified: i64) -> S3Error {
    let mut e = S3Error::new(S3ErrorCode::NotModified);
    let mut h = http::HeaderMap::new();
    if let Ok(v) = http::HeaderValue::from_str(&format!("\"{etag}\"")) {
        h.insert(http::header::ETAG, v);
    }
    let lm = std::time::UNIX_EPOCH
        + std::time::Duration::from_millis(u64::try_from(last_modified).unwrap_or(0));
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
    let by_part = i.part_number.is_some();
    let range = requested_range(i.range, i.part_number)?;
    let cond = convert::conditions(
        i.if_match,
        i.if_none_match,
        i.if_modified_since,
        i.if_unmodified_since,
    );
    let ranged = range.is_some();
    let (o, r, body) = s
        .store
        .get_object(t, &i.bucket, &i.key, range, &cond)
        .await
        .map_err(to_s3)?;
    tracing::Span::current().record("bytes", body.len);
    s.auth.limits().charge(t, body.len);
    let m = &o.meta;
    let mut out = GetObjectOutput {
        body: Some(StreamingBlob::wrap(body.stream)),
        content_length: Some(body.len as i64),
        // An empty part (or empty object) has no byte range to name: 200, not 206.
        content_range: (ranged && r.end > r.start)
            .then(|| format!("bytes {}-{}/{}", r.start, r.end - 1, o.size)),
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
        tag_count: tag_count(&o),
        storage_class: storage_class(&o),
        ..Default::default()
    };
    let whole = answers_whole(&o, ranged, by_part, &r);
    convert::set_checksums!(
        out,
        read_checksum(&o, checksum_mode(&i.checksum_mode), whole)
    );
    Ok(S3Response::new(out))
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
    cond.check_read(&o).map_err(to_s3)?;
    let by_part = i.part_number.is_some();
    let range = requested_range(i.range, i.part_number)?;
    let ranged = range.is_some();
    let r = crate::model::object::range_of(&o, range).map_err(to_s3)?;
    let len = r.end - r.start;
    let content_range =
        (ranged && len > 0).then(|| format!("bytes {}-{}/{}", r.start, r.end - 1, o.size));
    let m = &o.meta;
    let mut out = HeadObjectOutput {
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
        storage_class: storage_class(&o),
        ..Default::default()
    };
    let whole = answers_whole(&o, ranged, by_part, &r);
    let partial = out.content_range.is_some();
    convert::set_checksums!(
        out,
        read_checksum(&o, checksum_mode(&i.checksum_mode), whole)
    );
    let mut resp = S3Response::new(out);
    if partial {
        resp.status = Some(http::StatusCode::PARTIAL_CONTENT);
    }
    Ok(resp)
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
    let tags = convert::copy_tags(i.tagging_directive.as_ref(), i.tagging.as_deref())?;
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
        .copy_object(
            t,
            &src_bucket,
            &src_key,
            &cond,
            &i.bucket,
            &i.key,
            meta,
            tags,
        )
        .await
        .map_err(|e| match e {
            // A failed copy-source condition is a 412 even when it is If-None-Match.
            crate::model::Error::NotModified { .. } => {
                to_s3(crate::model::Error::PreconditionFailed)
            }
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

pub async fn get_object_tagging(
    s: &GranaryS3,
    req: S3Request<GetObjectTaggingInput>,
) -> S3Result<S3Response<GetObjectTaggingOutput>> {
    note(&req, "GetObjectTagging", Some(&req.input.bucket));
    let t = s.tenant(&req).await?;
    let i = &req.input;
    let tags = s
        .store
        .object_tags(t, &i.bucket, &i.key)
        .await
        .map_err(to_s3)?;
    Ok(S3Response::new(GetObjectTaggingOutput {
        tag_set: convert::tag_set(tags),
        version_id: None,
    }))
}

pub async fn put_object_tagging(
    s: &GranaryS3,
    req: S3Request<PutObjectTaggingInput>,
) -> S3Result<S3Response<PutObjectTaggingOutput>> {
    note(&req, "PutObjectTagging", Some(&req.input.bucket));
    let t = s.tenant(&req).await?;
    let i = req.input;
    s.store
        .set_object_tags(t, &i.bucket, &i.key, convert::tags_from(i.tagging))
        .await
        .map_err(to_s3)?;
    Ok(S3Response::new(PutObjectTaggingOutput { version_id: None }))
}

pub async fn delete_object_tagging(
    s: &GranaryS3,
    req: S3Request<DeleteObjectTaggingInput>,
) -> S3Result<S3Response<DeleteObjectTaggingOutput>> {
    note(&req, "DeleteObjectTagging", Some(&req.input.bucket));
    let t = s.tenant(&req).await?;
    let i = &req.input;
    s.store
        .set_object_tags(t, &i.bucket, &i.key, Vec::new())
        .await
        .map_err(to_s3)?;
    let mut resp = S3Response::new(DeleteObjectTaggingOutput { version_id: None });
    resp.status = Some(http::StatusCode::NO_CONTENT);
    Ok(resp)
}

/// GetObjectAttributes: the attributes asked for (ETag, Checksum, ObjectParts,
/// StorageClass, ObjectSize), parts paged by `max-parts` and `part-number-marker`.
pub async fn get_object_attributes(
    s: &GranaryS3,
    req: S3Request<GetObjectAttributesInput>,
) -> S3Result<S3Response<GetObjectAttributesOutput>> {
    note(&req, "GetObjectAttributes", Some(&req.input.bucket));
    let t = s.tenant(&req).await?;
    let i = &req.input;
    let o = s
        .store
        .head_object(t, &i.bucket, &i.key)
        .await
        .map_err(to_s3)?;
    // One header, `x-amz-object-attributes: ETag,ObjectSize`, may arrive as one item.
    let want = |a: &str| {
        i.object_attributes
            .iter()
            .flat_map(|x| x.as_str().split(','))
            .any(|x| x.trim().eq_ignore_ascii_case(a))
    };
    let mut out = GetObjectAttributesOutput {
        last_modified: Some(timestamp(o.last_modified)),
        ..Default::default()
    };
    if want(ObjectAttributes::ETAG) {
        out.e_tag = Some(convert::etag(&o.etag));
    }
    if want(ObjectAttributes::OBJECT_SIZE) {
        out.object_size = Some(o.size as i64);
    }
    if want(ObjectAttributes::STORAGE_CLASS) {
        out.storage_class = Some(StorageClass::from_static(StorageClass::STANDARD));
    }
    if want(ObjectAttributes::CHECKSUM)
        && let Some(c) = &o.ext.checksum
    {
        let mut sum = s3s::dto::Checksum::default();
        convert::set_checksums!(sum, Some(c));
        out.checksum = Some(sum);
    }
    if want(ObjectAttributes::OBJECT_PARTS) && !o.ext.part_sizes.is_empty() {
        // max-parts=0 would answer a truncated page with no marker to continue from.
        let max = convert::max_keys(i.max_parts.filter(|n| *n != 0), 1000)?;
        let marker = i.part_number_marker.unwrap_or(0).max(0) as usize;
        let total = o.ext.part_sizes.len();
        let parts: Vec<ObjectPart> = o
            .ext
            .part_sizes
            .iter()
            .enumerate()
            .skip(marker)
            .take(max)
            .map(|(n, size)| ObjectPart {
                part_number: Some(n as i32 + 1),
                size: Some(*size as i64),
                ..Default::default()
            })
            .collect();
        let last = parts.last().and_then(|p| p.part_number);
        let truncated = marker + parts.len() < total;
        out.object_parts = Some(GetObjectAttributesParts {
            is_truncated: Some(truncated),
            max_parts: Some(max as i32),
            next_part_number_marker: truncated.then_some(last).flatten(),
            part_number_marker: i.part_number_marker,
            parts: Some(parts),
            total_parts_count: Some(total as i32),
        });
    }
    Ok(S3Response::new(out))
}

/// `x-amz-storage-class`: only a cold object reports one (S3 omits STANDARD).
fn storage_class(o: &crate::model::ObjectRecord) -> Option<StorageClass> {
    o.data
        .is_cold()
        .then(|| StorageClass::from(crate::model::tiering::COLD_CLASS.to_string()))
}
