//! The S3 front end: s3s does the protocol (routing, SigV4 incl. presigned URLs and
//! `aws-chunked` payloads, XML, error bodies); this module maps each operation onto
//! the model and nothing more. One file per operation family.

mod bucket;
pub mod convert;
mod error;
pub mod front;
mod multipart;
mod object;
pub mod post;

use async_trait::async_trait;
use s3s::auth::{S3Auth, SecretKey};
use s3s::dto::*;
use s3s::{S3, S3Request, S3Response, S3Result, s3_error};

pub use error::to_s3;

use crate::model::Store;
use crate::tenancy::Authenticator;
use crate::types::TenantId;

/// The S3 service of a node.
#[derive(Clone)]
pub struct GranaryS3 {
    pub(crate) store: Store,
    pub(crate) auth: Authenticator,
    pub(crate) region: String,
}

impl GranaryS3 {
    pub fn new(store: Store, auth: Authenticator, region: String) -> Self {
        Self {
            store,
            auth,
            region,
        }
    }

    /// The tenant the request's (already verified) access key belongs to.
    pub(crate) async fn tenant<T>(&self, req: &S3Request<T>) -> S3Result<TenantId> {
        let Some(c) = &req.credentials else {
            return Err(s3_error!(AccessDenied, "Signature is required"));
        };
        let t = self
            .auth
            .tenant_of(&c.access_key)
            .await
            .map_err(|e| to_s3(e.into()))?
            .ok_or_else(|| s3_error!(InvalidAccessKeyId))?;
        tracing::Span::current().record("tenant", tracing::field::display(t));
        let body = if matches!(req.method, http::Method::PUT | http::Method::POST) {
            declared_body(&req.headers)
        } else {
            0
        };
        let held = self
            .auth
            .limits()
            .admit(t, body)
            .await
            .map_err(|th| slow_down(&th))?;
        // Held until the response is done (see s3/front.rs).
        if let Some(slot) = req.extensions.get::<crate::tenancy::rate::HoldSlot>() {
            slot.put(held);
        }
        // The request's fair turn at the node's I/O scheduler: with every slot taken, a
        // quiet tenant's request goes before a flooding tenant's queued pieces.
        self.store
            .io_scheduler()
            .turn(crate::tenancy::sched::Class::Tenant(t), 0)
            .await;
        Ok(t)
    }
}

/// The body bytes a request announces (`x-amz-decoded-content-length` for an
/// `aws-chunked` body, else `Content-Length`), 0 when it announces none.
pub(crate) fn declared_body(h: &http::HeaderMap) -> u64 {
    declared_len(h).unwrap_or(0)
}

/// [`declared_body`], None when the request announces no length.
pub(crate) fn declared_len(h: &http::HeaderMap) -> Option<u64> {
    ["x-amz-decoded-content-length", "content-length"]
        .iter()
        .find_map(|n| h.get(*n)?.to_str().ok()?.parse().ok())
}

/// 503 `SlowDown` with `Retry-After`, for a request over its tenant's rate limit.
pub(crate) fn slow_down(th: &crate::tenancy::rate::Throttled) -> s3s::S3Error {
    let mut e = s3s::S3Error::with_message(s3s::S3ErrorCode::SlowDown, th.to_string());
    let mut h = http::HeaderMap::new();
    h.insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/xml"),
    );
    h.insert(
        http::header::RETRY_AFTER,
        http::HeaderValue::from(th.retry_after_secs()),
    );
    e.set_headers(h);
    e
}

/// Verifies signatures with the tenants' access keys from the catalog.
pub struct TenantKeys(pub Authenticator);

#[async_trait]
impl S3Auth for TenantKeys {
    async fn get_secret_key(&self, access_key: &str) -> S3Result<SecretKey> {
        match self.0.lookup(access_key).await {
            Ok(Some(c)) => Ok(SecretKey::from(c.secret_access_key)),
            Ok(None) => Err(s3_error!(InvalidAccessKeyId)),
            Err(e) => Err(to_s3(e.into())),
        }
    }
}

#[async_trait]
impl S3 for GranaryS3 {
    async fn list_buckets(
        &self,
        req: S3Request<ListBucketsInput>,
    ) -> S3Result<S3Response<ListBucketsOutput>> {
        bucket::list_buckets(self, req).await
    }
    async fn create_bucket(
        &self,
        req: S3Request<CreateBucketInput>,
    ) -> S3Result<S3Response<CreateBucketOutput>> {
        bucket::create_bucket(self, req).await
    }
    async fn head_bucket(
        &self,
        req: S3Request<HeadBucketInput>,
    ) -> S3Result<S3Response<HeadBucketOutput>> {
        bucket::head_bucket(self, req).await
    }
    async fn delete_bucket(
        &self,
        req: S3Request<DeleteBucketInput>,
    ) -> S3Result<S3Response<DeleteBucketOutput>> {
        bucket::delete_bucket(self, req).await
    }
    async fn get_bucket_location(
        &self,
        req: S3Request<GetBucketLocationInput>,
    ) -> S3Result<S3Response<GetBucketLocationOutput>> {
        bucket::get_bucket_location(self, req).await
    }
    async fn list_objects_v2(
        &self,
        req: S3Request<ListObjectsV2Input>,
    ) -> S3Result<S3Response<ListObjectsV2Output>> {
        bucket::list_objects_v2(self, req).await
    }
    async fn list_objects(
        &self,
        req: S3Request<ListObjectsInput>,
    ) -> S3Result<S3Response<ListObjectsOutput>> {
        bucket::list_objects(self, req).await
    }
    async fn put_object(
        &self,
        req: S3Request<PutObjectInput>,
    ) -> S3Result<S3Response<PutObjectOutput>> {
        object::put_object(self, req).await
    }
    async fn get_object(
        &self,
        req: S3Request<GetObjectInput>,
    ) -> S3Result<S3Response<GetObjectOutput>> {
        object::get_object(self, req).await
    }
    async fn head_object(
        &self,
        req: S3Request<HeadObjectInput>,
    ) -> S3Result<S3Response<HeadObjectOutput>> {
        object::head_object(self, req).await
    }
    async fn delete_object(
        &self,
        req: S3Request<DeleteObjectInput>,
    ) -> S3Result<S3Response<DeleteObjectOutput>> {
        object::delete_object(self, req).await
    }
    async fn delete_objects(
        &self,
        req: S3Request<DeleteObjectsInput>,
    ) -> S3Result<S3Response<DeleteObjectsOutput>> {
        object::delete_objects(self, req).await
    }
    async fn put_bucket_tagging(
        &self,
        req: S3Request<PutBucketTaggingInput>,
    ) -> S3Result<S3Response<PutBucketTaggingOutput>> {
        bucket::put_bucket_tagging(self, req).await
    }
    async fn get_bucket_tagging(
        &self,
        req: S3Request<GetBucketTaggingInput>,
    ) -> S3Result<S3Response<GetBucketTaggingOutput>> {
        bucket::get_bucket_tagging(self, req).await
    }
    async fn delete_bucket_tagging(
        &self,
        req: S3Request<DeleteBucketTaggingInput>,
    ) -> S3Result<S3Response<DeleteBucketTaggingOutput>> {
        bucket::delete_bucket_tagging(self, req).await
    }
    async fn put_bucket_lifecycle_configuration(
        &self,
        req: S3Request<PutBucketLifecycleConfigurationInput>,
    ) -> S3Result<S3Response<PutBucketLifecycleConfigurationOutput>> {
        bucket::put_bucket_lifecycle_configuration(self, req).await
    }
    async fn get_bucket_lifecycle_configuration(
        &self,
        req: S3Request<GetBucketLifecycleConfigurationInput>,
    ) -> S3Result<S3Response<GetBucketLifecycleConfigurationOutput>> {
        bucket::get_bucket_lifecycle_configuration(self, req).await
    }
    async fn delete_bucket_lifecycle(
        &self,
        req: S3Request<DeleteBucketLifecycleInput>,
    ) -> S3Result<S3Response<DeleteBucketLifecycleOutput>> {
        bucket::delete_bucket_lifecycle(self, req).await
    }
    async fn put_public_access_block(
        &self,
        req: S3Request<PutPublicAccessBlockInput>,
    ) -> S3Result<S3Response<PutPublicAccessBlockOutput>> {
        bucket::put_public_access_block(self, req).await
    }
    async fn get_public_access_block(
        &self,
        req: S3Request<GetPublicAccessBlockInput>,
    ) -> S3Result<S3Response<GetPublicAccessBlockOutput>> {
        bucket::get_public_access_block(self, req).await
    }
    async fn delete_public_access_block(
        &self,
        req: S3Request<DeletePublicAccessBlockInput>,
    ) -> S3Result<S3Response<DeletePublicAccessBlockOutput>> {
        bucket::delete_public_access_block(self, req).await
    }
    async fn get_object_tagging(
        &self,
        req: S3Request<GetObjectTaggingInput>,
    ) -> S3Result<S3Response<GetObjectTaggingOutput>> {
        object::get_object_tagging(self, req).await
    }
    async fn put_object_tagging(
        &self,
        req: S3Request<PutObjectTaggingInput>,
    ) -> S3Result<S3Response<PutObjectTaggingOutput>> {
        object::put_object_tagging(self, req).await
    }
    async fn delete_object_tagging(
        &self,
        req: S3Request<DeleteObjectTaggingInput>,
    ) -> S3Result<S3Response<DeleteObjectTaggingOutput>> {
        object::delete_object_tagging(self, req).await
    }
    async fn get_object_attributes(
        &self,
        req: S3Request<GetObjectAttributesInput>,
    ) -> S3Result<S3Response<GetObjectAttributesOutput>> {
        object::get_object_attributes(self, req).await
    }
    async fn copy_object(
        &self,
        req: S3Request<CopyObjectInput>,
    ) -> S3Result<S3Response<CopyObjectOutput>> {
        object::copy_object(self, req).await
    }
    async fn create_multipart_upload(
        &self,
        req: S3Request<CreateMultipartUploadInput>,
    ) -> S3Result<S3Response<CreateMultipartUploadOutput>> {
        multipart::create(self, req).await
    }
    async fn upload_part(
        &self,
        req: S3Request<UploadPartInput>,
    ) -> S3Result<S3Response<UploadPartOutput>> {
        multipart::upload_part(self, req).await
    }
    async fn upload_part_copy(
        &self,
        req: S3Request<UploadPartCopyInput>,
    ) -> S3Result<S3Response<UploadPartCopyOutput>> {
        multipart::upload_part_copy(self, req).await
    }
    async fn complete_multipart_upload(
        &self,
        req: S3Request<CompleteMultipartUploadInput>,
    ) -> S3Result<S3Response<CompleteMultipartUploadOutput>> {
        multipart::complete(self, req).await
    }
    async fn abort_multipart_upload(
        &self,
        req: S3Request<AbortMultipartUploadInput>,
    ) -> S3Result<S3Response<AbortMultipartUploadOutput>> {
        multipart::abort(self, req).await
    }
    async fn list_parts(
        &self,
        req: S3Request<ListPartsInput>,
    ) -> S3Result<S3Response<ListPartsOutput>> {
        multipart::list_parts(self, req).await
    }
    async fn list_multipart_uploads(
        &self,
        req: S3Request<ListMultipartUploadsInput>,
    ) -> S3Result<S3Response<ListMultipartUploadsOutput>> {
        multipart::list_uploads(self, req).await
    }
}

/// Virtual-host addressing: `BUCKET.<domain>[:port]` names the bucket; any other host
/// (an IP, `localhost`, a load balancer name) means path-style. Ports are ignored, so
/// `http://bucket.localhost:9000` works as clients expect.
pub struct Domains(pub Vec<String>);

impl s3s::host::S3Host for Domains {
    fn parse_host_header<'a>(&'a self, host: &'a str) -> S3Result<s3s::host::VirtualHost<'a>> {
        let name = match host.rsplit_once(':') {
            Some((h, port)) if !h.ends_with(']') && port.bytes().all(|b| b.is_ascii_digit()) => h,
            _ => host,
        };
        for d in &self.0 {
            if let Some(bucket) = name
                .strip_suffix(d.as_str())
                .and_then(|b| b.strip_suffix('.'))
                && !bucket.is_empty()
            {
                return Ok(s3s::host::VirtualHost::new(d.as_str()).with_bucket(bucket));
            }
        }
        Ok(s3s::host::VirtualHost::new(name))
    }
}

#[cfg(test)]
mod tests {
    use s3s::host::S3Host;

    use super::Domains;

    #[test]
    fn bucket_comes_from_the_host_only_under_a_known_domain() {
        let d = Domains(vec!["localhost".into(), "s3.example.com".into()]);
        assert_eq!(
            d.parse_host_header("logs.localhost:9000").unwrap().bucket(),
            Some("logs")
        );
        assert_eq!(
            d.parse_host_header("a.b.s3.example.com").unwrap().bucket(),
            Some("a.b")
        );
        assert_eq!(
            d.parse_host_header("localhost:9000").unwrap().bucket(),
            None
        );
        assert_eq!(
            d.parse_host_header("127.0.0.1:9000").unwrap().bucket(),
            None
        );
        assert_eq!(
            d.parse_host_header("other.example.org").unwrap().bucket(),
            None
        );
    }
}
