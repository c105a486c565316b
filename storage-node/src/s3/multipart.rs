//! Multipart uploads.

use s3s::dto::*;
use s3s::{S3Error, S3ErrorCode, S3Request, S3Response, S3Result};

use super::convert::{self, note, timestamp};
use super::object::body_stream;
use super::{GranaryS3, to_s3};
use crate::types::UploadId;

fn upload_id(s: &str) -> S3Result<UploadId> {
    s.parse()
        .map_err(|_| S3Error::new(S3ErrorCode::NoSuchUpload))
}

fn part_number(n: i32) -> S3Result<u32> {
    u32::try_from(n)
        .ok()
        .filter(|n| (1..=crate::model::multipart::MAX_PART_NUMBER).contains(n))
        .ok_or_else(|| {
            S3Error::with_message(
                S3ErrorCode::InvalidArgument,
                "Part number must be an integer between 1 and 10000, inclusive",
            )
        })
}

pub async fn create(
    s: &GranaryS3,
    req: S3Request<CreateMultipartUploadInput>,
) -> S3Result<S3Response<CreateMultipartUploadOutput>> {
    note(&req, "CreateMultipartUpload", Some(&req.input.bucket));
    let t = s.tenant(&req).await?;
    let i = req.input;
    let checksum = match &i.checksum_algorithm {
        None => None,
        Some(a) => {
            let a = convert::algorithm_named(a.as_str())?;
            // FULL_OBJECT by default for CRC64NVME (as S3), COMPOSITE for the others.
            let full = match &i.checksum_type {
                Some(k) => k.as_str().eq_ignore_ascii_case(ChecksumType::FULL_OBJECT),
                None => a == crate::model::object::ChecksumAlgorithm::Crc64Nvme,
            };
            if full && !a.combines() {
                return Err(S3Error::with_message(
                    S3ErrorCode::InvalidRequest,
                    format!(
                        "The FULL_OBJECT checksum type cannot be used with the {} checksum algorithm.",
                        a.name()
                    ),
                ));
            }
            Some((a, full))
        }
    };
    let ext = crate::model::multipart::UploadExt {
        tags: convert::tags_header(i.tagging.as_deref())?,
        checksum,
    };
    let meta = convert::meta(
        i.content_type,
        i.cache_control,
        i.content_disposition,
        i.content_encoding,
        i.content_language,
        i.expires,
        i.metadata,
    );
    let id = s
        .store
        .create_upload_ext(t, &i.bucket, &i.key, meta, ext)
        .await
        .map_err(to_s3)?;
    Ok(S3Response::new(CreateMultipartUploadOutput {
        bucket: Some(i.bucket),
        key: Some(i.key),
        upload_id: Some(id.to_string()),
        checksum_algorithm: i.checksum_algorithm,
        checksum_type: checksum.map(|(_, full)| convert::checksum_type(full)),
        ..Default::default()
    }))
}

pub async fn upload_part(
    s: &GranaryS3,
    req: S3Request<UploadPartInput>,
) -> S3Result<S3Response<UploadPartOutput>> {
    note(&req, "UploadPart", Some(&req.input.bucket));
    let t = s.tenant(&req).await?;
    let checksum = convert::checksum_check(&req)?;
    let declared = super::declared_len(&req.headers);
    let i = req.input;
    let md5 = convert::content_md5(i.content_md5.as_deref())?;
    let part = part_number(i.part_number)?;
    let rec = s
        .store
        .upload_part_ext(
            t,
            &i.bucket,
            &i.key,
            upload_id(&i.upload_id)?,
            part,
            body_stream(i.body),
            md5,
            checksum,
            declared,
        )
        .await
        .map_err(to_s3)?;
    tracing::Span::current().record("bytes", rec.size);
    let mut out = UploadPartOutput {
        e_tag: Some(convert::etag(&rec.etag())),
        ..Default::default()
    };
    convert::set_checksums!(@sums out, convert::sums(rec.ext.checksum.as_ref()));
    Ok(S3Response::new(out))
}

pub async fn upload_part_copy(
    s: &GranaryS3,
    req: S3Request<UploadPartCopyInput>,
) -> S3Result<S3Response<UploadPartCopyOutput>> {
    note(&req, "UploadPartCopy", Some(&req.input.bucket));
    let t = s.tenant(&req).await?;
    let i = req.input;
    let part = part_number(i.part_number)?;
    let upload = upload_id(&i.upload_id)?;
    let (src_bucket, src_key) = convert::copy_source(&i.copy_source)?;
    let range = convert::copy_range(i.copy_source_range.as_deref())?;
    let cond = convert::conditions(
        i.copy_source_if_match,
        i.copy_source_if_none_match,
        i.copy_source_if_modified_since,
        i.copy_source_if_unmodified_since,
    );
    let (_, _, body) = s
        .store
        .get_copy_source(t, &src_bucket, &src_key, range, &cond)
        .await
        .map_err(|e| match e {
            crate::model::Error::NotModified { .. } => {
                to_s3(crate::model::Error::PreconditionFailed)
            }
            e => to_s3(e),
        })?;
    let rec = s
        .store
        .upload_part(t, &i.bucket, &i.key, upload, part, body.stream, None)
        .await
        .map_err(to_s3)?;
    Ok(S3Response::new(UploadPartCopyOutput {
        copy_part_result: Some(CopyPartResult {
            e_tag: Some(convert::etag(&rec.etag())),
            last_modified: Some(timestamp(rec.last_modified)),
            ..Default::default()
        }),
        ..Default::default()
    }))
}

pub async fn complete(
    s: &GranaryS3,
    req: S3Request<CompleteMultipartUploadInput>,
) -> S3Result<S3Response<CompleteMultipartUploadOutput>> {
    note(&req, "CompleteMultipartUpload", Some(&req.input.bucket));
    let t = s.tenant(&req).await?;
    let i = req.input;
    let upload = upload_id(&i.upload_id)?;
    let parts = i.multipart_upload.and_then(|m| m.parts).ok_or_else(|| {
        S3Error::with_message(
            S3ErrorCode::MalformedXML,
            "The XML must list at least one part",
        )
    })?;
    let mut list = Vec::with_capacity(parts.len());
    for p in parts {
        let (Some(n), Some(e)) = (p.part_number, p.e_tag) else {
            return Err(S3Error::with_message(
                S3ErrorCode::MalformedXML,
                "Every part needs a PartNumber and an ETag",
            ));
        };
        list.push((part_number(n)?, e.into_value()));
    }
    let cond = convert::conditions(i.if_match, i.if_none_match, None, None);
    let declared = i
        .checksum_crc32
        .or(i.checksum_crc32c)
        .or(i.checksum_crc64nvme)
        .or(i.checksum_sha1)
        .or(i.checksum_sha256);
    let (etag, size, checksum) = s
        .store
        .complete_upload_ext(t, &i.bucket, &i.key, upload, list, cond, declared)
        .await
        .map_err(to_s3)?;
    tracing::Span::current().record("bytes", size);
    let mut out = CompleteMultipartUploadOutput {
        bucket: Some(i.bucket.clone()),
        key: Some(i.key.clone()),
        e_tag: Some(convert::etag(&etag)),
        location: Some(format!("/{}/{}", i.bucket, i.key)),
        ..Default::default()
    };
    convert::set_checksums!(out, checksum.as_ref());
    Ok(S3Response::new(out))
}

pub async fn abort(
    s: &GranaryS3,
    req: S3Request<AbortMultipartUploadInput>,
) -> S3Result<S3Response<AbortMultipartUploadOutput>> {
    note(&req, "AbortMultipartUpload", Some(&req.input.bucket));
    let t = s.tenant(&req).await?;
    let i = req.input;
    s.store
        .abort_upload(t, &i.bucket, &i.key, upload_id(&i.upload_id)?)
        .await
        .map_err(to_s3)?;
    Ok(S3Response::new(AbortMultipartUploadOutput::default()))
}

pub async fn list_parts(
    s: &GranaryS3,
    req: S3Request<ListPartsInput>,
) -> S3Result<S3Response<ListPartsOutput>> {
    note(&req, "ListParts", Some(&req.input.bucket));
    let t = s.tenant(&req).await?;
    let i = req.input;
    let max = convert::max_keys(i.max_parts, 1000)?;
    let marker = i.part_number_marker.unwrap_or(0).max(0) as u32;
    let all = s
        .store
        .list_parts(t, &i.bucket, &i.key, upload_id(&i.upload_id)?)
        .await
        .map_err(to_s3)?;
    let mut rest = all.into_iter().filter(|(n, _)| *n > marker).peekable();
    let mut parts = Vec::new();
    while parts.len() < max {
        let Some((n, p)) = rest.next() else { break };
        // Each part's flexible checksum, as the clients that compose a multipart
        // object's checksum themselves read it back.
        let mut part = Part {
            part_number: Some(n as i32),
            e_tag: Some(convert::etag(&p.etag())),
            size: Some(p.size as i64),
            last_modified: Some(timestamp(p.last_modified)),
            ..Default::default()
        };
        convert::set_checksums!(@sums part, convert::sums(p.ext.checksum.as_ref()));
        parts.push(part);
    }
    let truncated = rest.peek().is_some();
    Ok(S3Response::new(ListPartsOutput {
        bucket: Some(i.bucket),
        key: Some(i.key),
        upload_id: Some(i.upload_id),
        max_parts: Some(max as i32),
        part_number_marker: i.part_number_marker,
        next_part_number_marker: if truncated {
            parts.last().and_then(|p| p.part_number)
        } else {
            None
        },
        is_truncated: Some(truncated),
        parts: Some(parts),
        ..Default::default()
    }))
}

pub async fn list_uploads(
    s: &GranaryS3,
    req: S3Request<ListMultipartUploadsInput>,
) -> S3Result<S3Response<ListMultipartUploadsOutput>> {
    note(&req, "ListMultipartUploads", Some(&req.input.bucket));
    let t = s.tenant(&req).await?;
    let i = req.input;
    let max = convert::max_keys(i.max_uploads, 1000)?;
    let prefix = i.prefix.clone().unwrap_or_default();
    // An upload-id-marker that is no upload id cannot name an existing upload: the
    // listing then starts at the key marker's first upload.
    let id_marker = i
        .upload_id_marker
        .as_deref()
        .filter(|m| !m.is_empty())
        .map(|m| {
            m.parse::<crate::types::UploadId>()
                .unwrap_or(crate::types::UploadId(uuid::Uuid::nil()))
        });
    let page = s
        .store
        .list_uploads_page(
            t,
            &i.bucket,
            &prefix,
            i.key_marker.as_deref(),
            id_marker,
            max,
        )
        .await
        .map_err(to_s3)?;
    let truncated = page.is_truncated;
    let uploads: Vec<MultipartUpload> = page
        .uploads
        .into_iter()
        .map(|u| MultipartUpload {
            key: Some(u.key),
            upload_id: Some(u.upload_id.to_string()),
            initiated: Some(timestamp(u.initiated)),
            ..Default::default()
        })
        .collect();
    let last = uploads.last().cloned();
    Ok(S3Response::new(ListMultipartUploadsOutput {
        bucket: Some(i.bucket),
        prefix: i.prefix,
        key_marker: i.key_marker,
        upload_id_marker: i.upload_id_marker,
        max_uploads: Some(max as i32),
        is_truncated: Some(truncated),
        next_key_marker: if truncated {
            last.as_ref().and_then(|u| u.key.clone())
        } else {
            None
        },
        next_upload_id_marker: if truncated {
            last.and_then(|u| u.upload_id)
        } else {
            None
        },
        uploads: Some(uploads),
        ..Default::default()
    }))
}
