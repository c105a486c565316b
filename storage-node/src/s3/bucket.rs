//! Bucket operations and listings.

use s3s::dto::*;
use s3s::{S3Request, S3Response, S3Result};

use super::convert::{self, note, timestamp};
use super::{GranaryS3, to_s3};
use crate::model::tiering::{LIFECYCLE, Lifecycle};

pub async fn list_buckets(
    s: &GranaryS3,
    req: S3Request<ListBucketsInput>,
) -> S3Result<S3Response<ListBucketsOutput>> {
    note(&req, "ListBuckets", None);
    let t = s.tenant(&req).await?;
    let i = req.input;
    let prefix = i.prefix.unwrap_or_default();
    // Paged by name: `max-buckets` (1–10000) per page, the token names the last bucket
    // of the page before.
    let max = match i.max_buckets {
        None => usize::MAX,
        Some(n @ 1..=10000) => n as usize,
        Some(_) => {
            return Err(s3s::s3_error!(
                InvalidArgument,
                "max-buckets must be between 1 and 10000"
            ));
        }
    };
    let after = i
        .continuation_token
        .as_deref()
        .map(convert::token_decode)
        .transpose()?;
    let mut buckets = s.store.list_buckets(t).await.map_err(to_s3)?;
    buckets.sort_by(|a, b| a.name.cmp(&b.name));
    let mut page: Vec<Bucket> = buckets
        .into_iter()
        .filter(|b| b.name.starts_with(&prefix))
        .filter(|b| after.as_deref().is_none_or(|a| b.name.as_str() > a))
        .take(max.saturating_add(1))
        .map(|b| Bucket {
            name: Some(b.name),
            creation_date: Some(timestamp(b.created_at)),
            bucket_region: Some(s.region.clone()),
        })
        .collect();
    let next = if page.len() > max {
        page.truncate(max);
        page.last()
            .and_then(|b| b.name.as_deref())
            .map(convert::token_encode)
    } else {
        None
    };
    Ok(S3Response::new(ListBucketsOutput {
        buckets: Some(page),
        owner: Some(owner(t)),
        continuation_token: next,
        prefix: (!prefix.is_empty()).then_some(prefix),
    }))
}

/// The owner S3 reports for a tenant's buckets and objects: the tenant.
fn owner(t: crate::types::TenantId) -> Owner {
    Owner {
        id: Some(t.to_string()),
        display_name: None,
    }
}

pub async fn create_bucket(
    s: &GranaryS3,
    req: S3Request<CreateBucketInput>,
) -> S3Result<S3Response<CreateBucketOutput>> {
    note(&req, "CreateBucket", Some(&req.input.bucket));
    let t = s.tenant(&req).await?;
    s.store
        .create_bucket(t, &req.input.bucket)
        .await
        .map_err(to_s3)?;
    Ok(S3Response::new(CreateBucketOutput {
        location: Some(format!("/{}", req.input.bucket)),
    }))
}

pub async fn head_bucket(
    s: &GranaryS3,
    req: S3Request<HeadBucketInput>,
) -> S3Result<S3Response<HeadBucketOutput>> {
    note(&req, "HeadBucket", Some(&req.input.bucket));
    let t = s.tenant(&req).await?;
    s.store.bucket(t, &req.input.bucket).await.map_err(to_s3)?;
    Ok(S3Response::new(HeadBucketOutput {
        bucket_region: Some(s.region.clone()),
        ..Default::default()
    }))
}

pub async fn delete_bucket(
    s: &GranaryS3,
    req: S3Request<DeleteBucketInput>,
) -> S3Result<S3Response<DeleteBucketOutput>> {
    note(&req, "DeleteBucket", Some(&req.input.bucket));
    let t = s.tenant(&req).await?;
    s.store
        .delete_bucket(t, &req.input.bucket)
        .await
        .map_err(to_s3)?;
    Ok(S3Response::new(DeleteBucketOutput {}))
}

pub async fn get_bucket_location(
    s: &GranaryS3,
    req: S3Request<GetBucketLocationInput>,
) -> S3Result<S3Response<GetBucketLocationOutput>> {
    note(&req, "GetBucketLocation", Some(&req.input.bucket));
    let t = s.tenant(&req).await?;
    s.store.bucket(t, &req.input.bucket).await.map_err(to_s3)?;
    // us-east-1 is spelled as an empty constraint in S3.
    let loc = (s.region != "us-east-1").then(|| BucketLocationConstraint::from(s.region.clone()));
    Ok(S3Response::new(GetBucketLocationOutput {
        location_constraint: loc,
    }))
}

/// Keys as the client asked for them: `encoding-type=url` percent-encodes every byte
/// but the unreserved ones and `/` (what AWS does; SDKs decode it again).
struct Enc(bool);

impl Enc {
    fn of(e: &Option<EncodingType>) -> Self {
        Enc(e.as_ref().is_some_and(|e| e.as_str() == EncodingType::URL))
    }

    fn s(&self, v: String) -> String {
        if !self.0 {
            return v;
        }
        let mut out = String::with_capacity(v.len());
        for b in v.bytes() {
            if b.is_ascii_alphanumeric() || b"-_.~/".contains(&b) {
                out.push(b as char);
            } else {
                out.push_str(&format!("%{b:02X}"));
            }
        }
        out
    }

    fn o(&self, v: Option<String>) -> Option<String> {
        v.map(|v| self.s(v))
    }
}

fn contents(
    enc: &Enc,
    objects: Vec<(String, crate::model::object::ObjectSummary)>,
    owner: Option<Owner>,
) -> Vec<Object> {
    objects
        .into_iter()
        .map(|(k, o)| Object {
            key: Some(enc.s(k)),
            owner: owner.clone(),
            e_tag: Some(convert::etag(&o.etag)),
            last_modified: Some(timestamp(o.last_modified)),
            size: Some(o.size as i64),
            storage_class: Some(ObjectStorageClass::from_static(
                ObjectStorageClass::STANDARD,
            )),
            ..Default::default()
        })
        .collect()
}

/// The delimiter of a listing: an empty one is none (and is not echoed back).
fn delimiter(d: &Option<String>) -> Option<String> {
    d.clone().filter(|d| !d.is_empty())
}

fn prefixes(enc: &Enc, p: Vec<String>) -> Vec<CommonPrefix> {
    p.into_iter()
        .map(|p| CommonPrefix {
            prefix: Some(enc.s(p)),
        })
        .collect()
}

pub async fn list_objects_v2(
    s: &GranaryS3,
    req: S3Request<ListObjectsV2Input>,
) -> S3Result<S3Response<ListObjectsV2Output>> {
    note(&req, "ListObjectsV2", Some(&req.input.bucket));
    let t = s.tenant(&req).await?;
    let i = &req.input;
    let max = convert::max_keys(i.max_keys, 1000)?;
    let after = match &i.continuation_token {
        Some(tok) => Some(convert::token_decode(tok)?),
        None => i.start_after.clone(),
    };
    let prefix = i.prefix.clone().unwrap_or_default();
    let delimiter = delimiter(&i.delimiter);
    let page = s
        .store
        .list_objects(
            t,
            &i.bucket,
            &prefix,
            delimiter.as_deref(),
            after.as_deref(),
            max,
        )
        .await
        .map_err(to_s3)?;
    let key_count = (page.objects.len() + page.common_prefixes.len()) as i32;
    let enc = Enc::of(&i.encoding_type);
    let next = if page.is_truncated {
        page.last.as_deref().map(convert::token_encode)
    } else {
        None
    };
    Ok(S3Response::new(ListObjectsV2Output {
        name: Some(i.bucket.clone()),
        prefix: Some(enc.s(prefix)),
        max_keys: Some(max as i32),
        key_count: Some(key_count),
        continuation_token: i.continuation_token.clone(),
        is_truncated: Some(page.is_truncated),
        next_continuation_token: next,
        contents: Some(contents(
            &enc,
            page.objects,
            (i.fetch_owner == Some(true)).then(|| owner(t)),
        )),
        common_prefixes: Some(prefixes(&enc, page.common_prefixes)),
        delimiter: enc.o(delimiter),
        encoding_type: i.encoding_type.clone(),
        start_after: enc.o(i.start_after.clone()),
        request_charged: None,
    }))
}

pub async fn list_objects(
    s: &GranaryS3,
    req: S3Request<ListObjectsInput>,
) -> S3Result<S3Response<ListObjectsOutput>> {
    note(&req, "ListObjects", Some(&req.input.bucket));
    let t = s.tenant(&req).await?;
    let i = &req.input;
    let max = convert::max_keys(i.max_keys, 1000)?;
    let prefix = i.prefix.clone().unwrap_or_default();
    let delimiter = delimiter(&i.delimiter);
    let page = s
        .store
        .list_objects(
            t,
            &i.bucket,
            &prefix,
            delimiter.as_deref(),
            i.marker.as_deref().filter(|m| !m.is_empty()),
            max,
        )
        .await
        .map_err(to_s3)?;
    // V1 returns NextMarker only with a delimiter (the last key or common prefix of the
    // page); without one, clients continue from the last key.
    let next_marker = if page.is_truncated && delimiter.is_some() {
        page.last.clone()
    } else {
        None
    };
    let enc = Enc::of(&i.encoding_type);
    Ok(S3Response::new(ListObjectsOutput {
        name: Some(i.bucket.clone()),
        prefix: Some(enc.s(prefix)),
        // Always present in V1, empty when the request had none.
        marker: Some(enc.s(i.marker.clone().unwrap_or_default())),
        max_keys: Some(max as i32),
        is_truncated: Some(page.is_truncated),
        // V1 lists each object's owner by default.
        contents: Some(contents(&enc, page.objects, Some(owner(t)))),
        common_prefixes: Some(prefixes(&enc, page.common_prefixes)),
        delimiter: enc.o(delimiter),
        next_marker: enc.o(next_marker),
        encoding_type: i.encoding_type.clone(),
        request_charged: None,
    }))
}

/// The `bucket_settings` kinds.
const TAGGING: &str = "tagging";
const PUBLIC_ACCESS_BLOCK: &str = "public_access_block";

/// At most this many tags per bucket (S3 rule).
const MAX_BUCKET_TAGS: usize = 50;

fn json_err(e: serde_json::Error) -> s3s::S3Error {
    tracing::error!(error = %e, "bucket setting");
    s3s::s3_error!(InternalError, "a stored bucket setting could not be read")
}

pub async fn put_bucket_tagging(
    s: &GranaryS3,
    req: S3Request<PutBucketTaggingInput>,
) -> S3Result<S3Response<PutBucketTaggingOutput>> {
    note(&req, "PutBucketTagging", Some(&req.input.bucket));
    let t = s.tenant(&req).await?;
    let i = req.input;
    let tags = convert::tags_from(i.tagging);
    crate::model::object::check_tag_set(&tags, MAX_BUCKET_TAGS).map_err(to_s3)?;
    let v = serde_json::to_string(&tags).map_err(json_err)?;
    s.store
        .set_bucket_setting(t, &i.bucket, TAGGING, Some(&v))
        .await
        .map_err(to_s3)?;
    Ok(S3Response::new(PutBucketTaggingOutput {}))
}

pub async fn get_bucket_tagging(
    s: &GranaryS3,
    req: S3Request<GetBucketTaggingInput>,
) -> S3Result<S3Response<GetBucketTaggingOutput>> {
    note(&req, "GetBucketTagging", Some(&req.input.bucket));
    let t = s.tenant(&req).await?;
    let v = s
        .store
        .bucket_setting(t, &req.input.bucket, TAGGING)
        .await
        .map_err(to_s3)?
        .ok_or_else(|| s3s::s3_error!(NoSuchTagSet, "The TagSet does not exist"))?;
    let tags: Vec<(String, String)> = serde_json::from_str(&v).map_err(json_err)?;
    Ok(S3Response::new(GetBucketTaggingOutput {
        tag_set: convert::tag_set(tags),
    }))
}

pub async fn delete_bucket_tagging(
    s: &GranaryS3,
    req: S3Request<DeleteBucketTaggingInput>,
) -> S3Result<S3Response<DeleteBucketTaggingOutput>> {
    note(&req, "DeleteBucketTagging", Some(&req.input.bucket));
    let t = s.tenant(&req).await?;
    s.store
        .set_bucket_setting(t, &req.input.bucket, TAGGING, None)
        .await
        .map_err(to_s3)?;
    let mut r = S3Response::new(DeleteBucketTaggingOutput {});
    r.status = Some(http::StatusCode::NO_CONTENT);
    Ok(r)
}

/// The public access block as stored: the four flags.
#[derive(serde::Serialize, serde::Deserialize)]
struct AccessBlock {
    block_public_acls: Option<bool>,
    ignore_public_acls: Option<bool>,
    block_public_policy: Option<bool>,
    restrict_public_buckets: Option<bool>,
}

/// PutPublicAccessBlock: stored and reported back. Granary grants no public access of
/// any kind (no ACLs, no bucket policies, no anonymous requests), so every bucket is
/// private whatever the flags say; they are kept for the tools that set and audit them.
pub async fn put_public_access_block(
    s: &GranaryS3,
    req: S3Request<PutPublicAccessBlockInput>,
) -> S3Result<S3Response<PutPublicAccessBlockOutput>> {
    note(&req, "PutPublicAccessBlock", Some(&req.input.bucket));
    let t = s.tenant(&req).await?;
    let c = req.input.public_access_block_configuration;
    let v = serde_json::to_string(&AccessBlock {
        block_public_acls: c.block_public_acls,
        ignore_public_acls: c.ignore_public_acls,
        block_public_policy: c.block_public_policy,
        restrict_public_buckets: c.restrict_public_buckets,
    })
    .map_err(json_err)?;
    s.store
        .set_bucket_setting(t, &req.input.bucket, PUBLIC_ACCESS_BLOCK, Some(&v))
        .await
        .map_err(to_s3)?;
    Ok(S3Response::new(PutPublicAccessBlockOutput {}))
}

pub async fn get_public_access_block(
    s: &GranaryS3,
    req: S3Request<GetPublicAccessBlockInput>,
) -> S3Result<S3Response<GetPublicAccessBlockOutput>> {
    note(&req, "GetPublicAccessBlock", Some(&req.input.bucket));
    let t = s.tenant(&req).await?;
    let Some(v) = s
        .store
        .bucket_setting(t, &req.input.bucket, PUBLIC_ACCESS_BLOCK)
        .await
        .map_err(to_s3)?
    else {
        let mut e = s3s::S3Error::with_message(
            s3s::S3ErrorCode::Custom("NoSuchPublicAccessBlockConfiguration".into()),
            "The public access block configuration was not found",
        );
        e.set_status_code(http::StatusCode::NOT_FOUND);
        return Err(e);
    };
    let b: AccessBlock = serde_json::from_str(&v).map_err(json_err)?;
    Ok(S3Response::new(GetPublicAccessBlockOutput {
        public_access_block_configuration: Some(PublicAccessBlockConfiguration {
            block_public_acls: b.block_public_acls,
            ignore_public_acls: b.ignore_public_acls,
            block_public_policy: b.block_public_policy,
            restrict_public_buckets: b.restrict_public_buckets,
        }),
    }))
}

pub async fn delete_public_access_block(
    s: &GranaryS3,
    req: S3Request<DeletePublicAccessBlockInput>,
) -> S3Result<S3Response<DeletePublicAccessBlockOutput>> {
    note(&req, "DeletePublicAccessBlock", Some(&req.input.bucket));
    let t = s.tenant(&req).await?;
    s.store
        .set_bucket_setting(t, &req.input.bucket, PUBLIC_ACCESS_BLOCK, None)
        .await
        .map_err(to_s3)?;
    let mut r = S3Response::new(DeletePublicAccessBlockOutput {});
    r.status = Some(http::StatusCode::NO_CONTENT);
    Ok(r)
}

/// PutBucketLifecycleConfiguration: `Transition` rules (after `Days`, to a cold storage
/// class) with `Prefix` / `ObjectSizeGreaterThan` / `ObjectSizeLessThan` filters move
/// objects to the node's cold tier (docs/s3-compatibility.md). Elements Granary does not
/// act on are refused rather than silently ignored.
pub async fn put_bucket_lifecycle_configuration(
    s: &GranaryS3,
    req: S3Request<PutBucketLifecycleConfigurationInput>,
) -> S3Result<S3Response<PutBucketLifecycleConfigurationOutput>> {
    note(
        &req,
        "PutBucketLifecycleConfiguration",
        Some(&req.input.bucket),
    );
    let t = s.tenant(&req).await?;
    let i = req.input;
    let rules = i
        .lifecycle_configuration
        .map(|c| c.rules)
        .unwrap_or_default();
    let lc = lifecycle_from(rules)?;
    let v = serde_json::to_string(&lc).map_err(json_err)?;
    s.store
        .set_bucket_setting(t, &i.bucket, LIFECYCLE, Some(&v))
        .await
        .map_err(to_s3)?;
    Ok(S3Response::new(
        PutBucketLifecycleConfigurationOutput::default(),
    ))
}

fn lifecycle_from(rules: Vec<LifecycleRule>) -> S3Result<Lifecycle> {
    use crate::model::tiering::{COLD_CLASSES, LifecycleRule as Rule};
    let unsupported = |what: &str| {
        s3s::S3Error::with_message(
            s3s::S3ErrorCode::NotImplemented,
            format!(
                "lifecycle {what} is not supported; Granary supports Transition rules with Days (docs/s3-compatibility.md)"
            ),
        )
    };
    let malformed = |m: String| s3s::S3Error::with_message(s3s::S3ErrorCode::MalformedXML, m);
    if rules.is_empty() {
        return Err(malformed(
            "a lifecycle configuration needs at least one rule".into(),
        ));
    }
    if rules.len() > 1000 {
        return Err(malformed(
            "a lifecycle configuration has at most 1000 rules".into(),
        ));
    }
    let mut out = Vec::new();
    let mut ids = std::collections::HashSet::new();
    for r in rules {
        if let Some(id) = &r.id {
            if id.len() > 255 {
                return Err(malformed("a rule ID is at most 255 characters".into()));
            }
            if !ids.insert(id.clone()) {
                return Err(s3s::S3Error::with_message(
                    s3s::S3ErrorCode::InvalidArgument,
                    format!("the rule ID {id:?} appears twice"),
                ));
            }
        }
        if r.expiration.is_some() {
            return Err(unsupported("Expiration"));
        }
        if r.noncurrent_version_expiration.is_some() || r.noncurrent_version_transitions.is_some() {
            return Err(unsupported("NoncurrentVersion actions"));
        }
        if r.abort_incomplete_multipart_upload.is_some() {
            return Err(unsupported(
                "AbortIncompleteMultipartUpload (uploads expire after multipart_upload_max_age_secs)",
            ));
        }
        let (mut prefix, mut gt, mut lt) = (r.prefix.clone().unwrap_or_default(), None, None);
        if let Some(f) = &r.filter {
            if f.tag.is_some() || f.and.as_ref().is_some_and(|a| a.tags.is_some()) {
                return Err(unsupported("filtering by tag"));
            }
            let and = f.and.as_ref();
            if let Some(p) = f
                .prefix
                .clone()
                .or_else(|| and.and_then(|a| a.prefix.clone()))
            {
                prefix = p;
            }
            gt = f
                .object_size_greater_than
                .or_else(|| and.and_then(|a| a.object_size_greater_than));
            lt = f
                .object_size_less_than
                .or_else(|| and.and_then(|a| a.object_size_less_than));
        }
        let size = |v: Option<i64>, what: &str| -> S3Result<Option<u64>> {
            v.map(|n| {
                u64::try_from(n).map_err(|_| malformed(format!("{what} must not be negative")))
            })
            .transpose()
        };
        let (gt, lt) = (
            size(gt, "ObjectSizeGreaterThan")?,
            size(lt, "ObjectSizeLessThan")?,
        );
        if let (Some(g), Some(l)) = (gt, lt)
            && g >= l
        {
            return Err(s3s::S3Error::with_message(
                s3s::S3ErrorCode::InvalidArgument,
                "ObjectSizeGreaterThan must be less than ObjectSizeLessThan",
            ));
        }
        if prefix.len() > 1024 {
            return Err(malformed("a rule prefix is at most 1024 bytes".into()));
        }
        let transitions = r.transitions.unwrap_or_default();
        if transitions.is_empty() {
            return Err(unsupported("a rule without a Transition"));
        }
        if transitions.len() > 1 {
            return Err(unsupported("more than one Transition per rule"));
        }
        let tr = &transitions[0];
        if tr.date.is_some() {
            return Err(unsupported("Transition by Date"));
        }
        let days = tr
            .days
            .ok_or_else(|| malformed("a Transition needs Days".into()))?;
        let days = u32::try_from(days).map_err(|_| {
            s3s::S3Error::with_message(
                s3s::S3ErrorCode::InvalidArgument,
                "Days must not be negative",
            )
        })?;
        let class = tr
            .storage_class
            .as_ref()
            .map(|c| c.as_str().to_string())
            .unwrap_or_default();
        if !COLD_CLASSES.contains(&class.as_str()) {
            return Err(s3s::S3Error::with_message(
                s3s::S3ErrorCode::InvalidStorageClass,
                format!(
                    "the transition storage class {class:?} is not one of {}",
                    COLD_CLASSES.join(", ")
                ),
            ));
        }
        let enabled = match r.status.as_str() {
            "Enabled" => true,
            "Disabled" => false,
            other => {
                return Err(malformed(format!(
                    "rule Status {other:?} is neither Enabled nor Disabled"
                )));
            }
        };
        out.push(Rule {
            id: r.id,
            enabled,
            prefix,
            size_greater_than: gt,
            size_less_than: lt,
            days,
            storage_class: class,
        });
    }
    Ok(Lifecycle { rules: out })
}

pub async fn get_bucket_lifecycle_configuration(
    s: &GranaryS3,
    req: S3Request<GetBucketLifecycleConfigurationInput>,
) -> S3Result<S3Response<GetBucketLifecycleConfigurationOutput>> {
    note(
        &req,
        "GetBucketLifecycleConfiguration",
        Some(&req.input.bucket),
    );
    let t = s.tenant(&req).await?;
    let v = s
        .store
        .bucket_setting(t, &req.input.bucket, LIFECYCLE)
        .await
        .map_err(to_s3)?
        .ok_or_else(|| {
            s3s::s3_error!(
                NoSuchLifecycleConfiguration,
                "The lifecycle configuration does not exist"
            )
        })?;
    let lc: Lifecycle = serde_json::from_str(&v).map_err(json_err)?;
    let rules = lc
        .rules
        .into_iter()
        .map(|r| {
            let mut and = LifecycleRuleAndOperator {
                prefix: Some(r.prefix),
                object_size_greater_than: r.size_greater_than.map(|n| n as i64),
                object_size_less_than: r.size_less_than.map(|n| n as i64),
                ..Default::default()
            };
            let mut filter = LifecycleRuleFilter::default();
            if and.object_size_greater_than.is_none() && and.object_size_less_than.is_none() {
                filter.prefix = and.prefix.take();
            } else {
                filter.and = Some(and);
            }
            let tr = Transition {
                days: Some(r.days as i32),
                storage_class: Some(TransitionStorageClass::from(r.storage_class)),
                ..Default::default()
            };
            LifecycleRule {
                abort_incomplete_multipart_upload: None,
                expiration: None,
                filter: Some(filter),
                id: r.id,
                noncurrent_version_expiration: None,
                noncurrent_version_transitions: None,
                prefix: None,
                status: ExpirationStatus::from(
                    if r.enabled { "Enabled" } else { "Disabled" }.to_string(),
                ),
                transitions: Some(vec![tr]),
            }
        })
        .collect();
    Ok(S3Response::new(GetBucketLifecycleConfigurationOutput {
        rules: Some(rules),
        ..Default::default()
    }))
}

pub async fn delete_bucket_lifecycle(
    s: &GranaryS3,
    req: S3Request<DeleteBucketLifecycleInput>,
) -> S3Result<S3Response<DeleteBucketLifecycleOutput>> {
    note(&req, "DeleteBucketLifecycle", Some(&req.input.bucket));
    let t = s.tenant(&req).await?;
    s.store
        .set_bucket_setting(t, &req.input.bucket, LIFECYCLE, None)
        .await
        .map_err(to_s3)?;
    let mut r = S3Response::new(DeleteBucketLifecycleOutput {});
    r.status = Some(http::StatusCode::NO_CONTENT);
    Ok(r)
}
