//! Objects: put, get, head, copy, delete and ordered listing.

use std::collections::BTreeMap;
use std::ops::{Bound, Range};

use redb::ReadableTable;
use serde::{Deserialize, Serialize};

use super::data::{self, ByteStream, ObjectBody, ObjectData, Written};
use super::{Error, Result, Store};
use crate::engine::{EngineError, OBJECTS, keys, record};
use crate::types::{PartitionId, TenantId, now_millis};

/// Metadata a client sets on an object and gets back on every read.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ObjectMeta {
    pub content_type: Option<String>,
    pub cache_control: Option<String>,
    pub content_disposition: Option<String>,
    pub content_encoding: Option<String>,
    pub content_language: Option<String>,
    /// Unix milliseconds of the `Expires` header, if set.
    pub expires: Option<i64>,
    pub user: BTreeMap<String, String>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ObjectRecord {
    pub size: u64,
    /// Hex MD5 for single-part objects, `<hex>-<parts>` for multipart ones; no quotes.
    pub etag: String,
    pub last_modified: i64,
    /// Engine sequence number of the write that created this version.
    pub version: u64,
    pub meta: ObjectMeta,
    pub data: ObjectData,
    /// Fields added after record version 1 (see [`Extended`]).
    #[serde(skip)]
    pub ext: ObjectExt,
}

/// An object's fields added after record version 1.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ObjectExt {
    /// S3 object tags, in the order they were given (at most 10).
    pub tags: Vec<(String, String)>,
    /// The size of each part of a multipart object, in part order (GET by
    /// `partNumber`, GetObjectAttributes); empty for an object stored in one part.
    pub part_sizes: Vec<u64>,
    /// The flexible checksum the object was uploaded with, verified on upload.
    pub checksum: Option<Checksum>,
    /// When the object's data was last brought back from the cold tier (restore on
    /// read), in Unix milliseconds: lifecycle ages count from it as from a write.
    /// Encoded after the extension (see [`Extended::trailer`]).
    #[serde(skip)]
    pub restored_at: Option<i64>,
}

/// A flexible checksum (`x-amz-checksum-*`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Checksum {
    pub algorithm: ChecksumAlgorithm,
    /// Base64 of the digest; a composite checksum of a multipart object ends in `-N`.
    pub value: String,
    /// Whether it covers the whole object (`FULL_OBJECT`) or is a checksum of the
    /// parts' checksums (`COMPOSITE`).
    pub full_object: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum ChecksumAlgorithm {
    Crc32,
    Crc32c,
    Sha1,
    Sha256,
    Crc64Nvme,
}

/// A record with fields added after record version 1: they are encoded after the
/// version-1 body under record version 2, and only when set (see
/// [`crate::engine::record::EXTENDED_VERSION`]). The record type marks them
/// `#[serde(skip)]`; [`encode_ext`] and [`decode_ext`] carry them.
pub(crate) trait Extended: Serialize + serde::de::DeserializeOwned {
    type Ext: Serialize + serde::de::DeserializeOwned + Default + PartialEq;
    fn ext(&self) -> &Self::Ext;
    fn set_ext(&mut self, ext: Self::Ext);
    /// Fields added after the extension: encoded after it, only when set. A binary
    /// that predates them decodes the extension and leaves the tail unread.
    fn trailer(&self) -> Option<Vec<u8>> {
        None
    }
    /// Takes the fields [`Extended::trailer`] encoded (a tail it does not know is
    /// ignored, as a newer binary may have written more).
    fn set_trailer(&mut self, _tail: &[u8]) {}
}

impl Extended for ObjectRecord {
    type Ext = ObjectExt;
    fn ext(&self) -> &ObjectExt {
        &self.ext
    }
    fn set_ext(&mut self, ext: ObjectExt) {
        self.ext = ext;
    }
    /// The restore time as an `Option`, so a field added later can follow it whether
    /// or not it is set.
    fn trailer(&self) -> Option<Vec<u8>> {
        self.ext
            .restored_at
            .and_then(|t| postcard::to_allocvec(&Some(t)).ok())
    }
    fn set_trailer(&mut self, tail: &[u8]) {
        self.ext.restored_at = postcard::take_from_bytes::<Option<i64>>(tail)
            .ok()
            .and_then(|(t, _)| t);
    }
}

/// Encodes an [`Extended`] record: version 1 without extension fields, else version 2.
pub(crate) fn encode_ext<T: Extended>(v: &T) -> Result<Vec<u8>, EngineError> {
    let err = |e: postcard::Error| EngineError::Db(format!("encode: {e}"));
    let mut body = postcard::to_allocvec(v).map_err(err)?;
    if *v.ext() == T::Ext::default() {
        return Ok(record::seal(&body));
    }
    body.extend_from_slice(&postcard::to_allocvec(v.ext()).map_err(err)?);
    if let Some(tail) = v.trailer() {
        body.extend_from_slice(&tail);
    }
    Ok(record::seal_version(record::EXTENDED_VERSION, &body))
}

/// Decodes an [`Extended`] record of either version; `what` names it in errors.
pub(crate) fn decode_ext<T: Extended>(what: &str, bytes: &[u8]) -> std::result::Result<T, String> {
    let (version, body) =
        record::open_versioned(bytes).map_err(|e| format!("{what} record: {e}"))?;
    let (mut v, rest): (T, _) =
        postcard::take_from_bytes(body).map_err(|e| format!("{what} record: {e}"))?;
    if version == record::EXTENDED_VERSION {
        let (ext, tail) =
            postcard::take_from_bytes(rest).map_err(|e| format!("{what} record extension: {e}"))?;
        v.set_ext(ext);
        if !tail.is_empty() {
            v.set_trailer(tail);
        }
    }
    Ok(v)
}

/// What a listing shows of an object: the leading fields of [`ObjectRecord`], decoded
/// without its metadata or inline data (up to 64 KiB per object), so a page of 1000
/// entries costs kilobytes, not megabytes.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
pub struct ObjectSummary {
    pub size: u64,
    pub etag: String,
    pub last_modified: i64,
    pub version: u64,
}

/// Decodes the [`ObjectSummary`] at the head of a stored object record. postcard
/// encodes fields in order, so the summary is a prefix of the record.
pub fn decode_summary(bytes: &[u8]) -> Result<ObjectSummary> {
    let body = record::open(bytes).map_err(|e| Error::Corrupt(format!("object record: {e}")))?;
    postcard::take_from_bytes::<ObjectSummary>(body)
        .map(|(s, _)| s)
        .map_err(|e| Error::Corrupt(format!("object record: {e}")))
}

/// Whether the body of a stored object record (after its version byte, before its
/// checksum) names data in the cold tier; None if its head cannot be read. Reads the
/// fields up to the data's variant only; the usage counters (`engine::usage`) call it
/// for every object they count.
pub(crate) fn body_is_cold(body: &[u8]) -> Option<bool> {
    /// The head of [`ObjectRecord`] up to [`ObjectData`]'s variant index (postcard
    /// writes an enum's variant as a varint before its fields).
    #[derive(Deserialize)]
    struct Head<'a> {
        _size: u64,
        #[serde(borrow)]
        _etag: &'a str,
        _last_modified: i64,
        _version: u64,
        _meta: ObjectMeta,
        data_variant: u32,
    }
    /// [`ObjectData::Cold`]'s variant index (pinned by a test).
    const COLD_VARIANT: u32 = 2;
    postcard::take_from_bytes::<Head<'_>>(body)
        .ok()
        .map(|(h, _)| h.data_variant == COLD_VARIANT)
}

/// Preconditions of a read or a write, already parsed.
#[derive(Clone, Debug, Default)]
pub struct Conditions {
    pub if_match: Option<Vec<String>>,
    pub if_none_match: Option<Vec<String>>,
    pub if_modified_since: Option<i64>,
    pub if_unmodified_since: Option<i64>,
}

fn etag_matches(list: &[String], etag: &str) -> bool {
    list.iter().any(|e| e == "*" || e.trim_matches('"') == etag)
}

/// A conditional write whose conditions held before its body was read (see
/// `Store::precheck_write`) but not at its commit met a concurrent write: S3 answers
/// that with 409 `ConditionalRequestConflict` (retry), not 412.
pub(crate) fn conflict_if(conditional: bool, e: Error) -> Error {
    match e {
        Error::PreconditionFailed if conditional => Error::ConditionalRequestConflict,
        e => e,
    }
}

impl Conditions {
    /// RFC 9110 section 13.2.2 order of evaluation, for reads (GET/HEAD).
    pub fn check_read(&self, obj: &ObjectRecord) -> Result<()> {
        // Compare at second granularity: HTTP dates carry no milliseconds.
        let lm = obj.last_modified / 1000;
        if let Some(m) = &self.if_match {
            if !etag_matches(m, &obj.etag) {
                return Err(Error::PreconditionFailed);
            }
        } else if let Some(t) = self.if_unmodified_since
            && lm > t / 1000
        {
            return Err(Error::PreconditionFailed);
        }
        if let Some(m) = &self.if_none_match {
            if etag_matches(m, &obj.etag) {
                return Err(Error::NotModified {
                    etag: obj.etag.clone(),
                    last_modified: obj.last_modified,
                });
            }
        } else if let Some(t) = self.if_modified_since
            && lm <= t / 1000
        {
            return Err(Error::NotModified {
                etag: obj.etag.clone(),
                last_modified: obj.last_modified,
            });
        }
        Ok(())
    }

    /// For writes: `If-Match` needs a current version with that ETag, `If-None-Match: *`
    /// needs no current version. Evaluated inside the commit, so it cannot race.
    pub fn check_write(&self, current: Option<&ObjectRecord>) -> Result<()> {
        if let Some(m) = &self.if_match {
            match current {
                Some(o) if etag_matches(m, &o.etag) => {}
                _ => return Err(Error::PreconditionFailed),
            }
        }
        if let Some(m) = &self.if_none_match
            && let Some(o) = current
            && etag_matches(m, &o.etag)
        {
            return Err(Error::PreconditionFailed);
        }
        Ok(())
    }

    pub fn is_empty(&self) -> bool {
        self.if_match.is_none()
            && self.if_none_match.is_none()
            && self.if_modified_since.is_none()
            && self.if_unmodified_since.is_none()
    }
}

/// Reads `(tenant, bucket, key, range)` from the node that leads the bucket: the record
/// (its data left out), the resolved range and the body, streamed.
pub type RemoteReader = std::sync::Arc<
    dyn Fn(
            TenantId,
            String,
            String,
            Option<ByteRange>,
        )
            -> futures::future::BoxFuture<'static, Result<(ObjectRecord, Range<u64>, ObjectBody)>>
        + Send
        + Sync,
>;

/// A requested byte range, before it is checked against the object size.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum ByteRange {
    /// Inclusive first, optional inclusive last.
    FromTo(u64, Option<u64>),
    Suffix(u64),
    /// Part `n` of a multipart object (GET with `partNumber`); see [`part_range`].
    Part(u32),
}

/// The bytes of part `n` (from 1): of a multipart object, from its part sizes; of an
/// object stored in one part, part 1 is all of it.
pub fn part_range(rec: &ObjectRecord, n: u32) -> Result<Range<u64>> {
    let idx = usize::try_from(n).unwrap_or(usize::MAX);
    if n == 0 {
        return Err(Error::InvalidPartNumber(n));
    }
    if rec.ext.part_sizes.is_empty() {
        if rec.etag.contains('-') {
            return Err(Error::Invalid(
                "this multipart object was completed before part sizes were recorded; \
                 read it with a Range instead of partNumber"
                    .into(),
            ));
        }
        return if n == 1 {
            Ok(0..rec.size)
        } else {
            Err(Error::InvalidPartNumber(n))
        };
    }
    let Some(size) = rec.ext.part_sizes.get(idx - 1) else {
        return Err(Error::InvalidPartNumber(n));
    };
    let start: u64 = rec.ext.part_sizes[..idx - 1].iter().sum();
    Ok(start..start + size)
}

/// The bytes a read of `rec` asks for: a Range, a part, or all of it.
pub fn range_of(rec: &ObjectRecord, r: Option<ByteRange>) -> Result<Range<u64>> {
    match r {
        Some(ByteRange::Part(n)) => part_range(rec, n),
        Some(r) => r.resolve(rec.size),
        None => Ok(0..rec.size),
    }
}

impl ByteRange {
    pub fn resolve(self, size: u64) -> Result<Range<u64>> {
        let invalid = Error::InvalidRange { size };
        match self {
            ByteRange::Part(_) => Err(invalid),
            ByteRange::FromTo(first, last) => {
                if first >= size {
                    return Err(invalid);
                }
                let end = last.map_or(size, |l| l.saturating_add(1).min(size));
                if end <= first {
                    return Err(invalid);
                }
                Ok(first..end)
            }
            ByteRange::Suffix(n) => {
                if n == 0 || size == 0 {
                    return Err(invalid);
                }
                Ok(size.saturating_sub(n)..size)
            }
        }
    }
}

pub fn decode_record(bytes: &[u8]) -> Result<ObjectRecord> {
    decode_ext("object", bytes).map_err(Error::Corrupt)
}

/// Decodes a stored record (see [`crate::engine::record`]); `what` names it in errors.
pub(crate) fn decode_stored<T: serde::de::DeserializeOwned>(
    what: &str,
    bytes: &[u8],
) -> std::result::Result<T, String> {
    let body = record::open(bytes).map_err(|e| format!("{what} record: {e}"))?;
    postcard::from_bytes(body).map_err(|e| format!("{what} record: {e}"))
}

/// Encodes a record for storage, with the current record version.
pub(crate) fn encode<T: Serialize>(v: &T) -> Result<Vec<u8>, EngineError> {
    postcard::to_allocvec(v)
        .map(|b| record::seal(&b))
        .map_err(|e| EngineError::Db(format!("encode: {e}")))
}

/// One page of a listing.
#[derive(Debug, Default)]
pub struct ListPage {
    pub objects: Vec<(String, ObjectSummary)>,
    pub common_prefixes: Vec<String>,
    pub is_truncated: bool,
    /// The last key or common prefix returned; listing again after it continues the page.
    pub last: Option<String>,
}

pub const MAX_KEY_LEN: usize = 1024;

pub fn check_key(key: &str) -> Result<()> {
    if key.is_empty() || key.len() > MAX_KEY_LEN {
        return Err(Error::Invalid(format!(
            "object keys must be 1 to {MAX_KEY_LEN} bytes"
        )));
    }
    Ok(())
}

#[derive(Debug)]
pub struct PutOutcome {
    pub etag: String,
    pub size: u64,
    pub version: u64,
    pub checksum: Option<Checksum>,
}

/// What a PUT may carry beyond its data, metadata and conditions.
#[derive(Default)]
pub struct PutExtra {
    pub tags: Vec<(String, String)>,
    pub checksum: Option<super::checksum::ChecksumCheck>,
    /// The body size the request announced: a write that cannot fit the tenant's
    /// quotas is refused before its body is read.
    pub declared_size: Option<u64>,
}

/// At most this many tags per object (S3 rule).
pub const MAX_TAGS: usize = 10;

/// Checks a tag set against S3's rules: at most 10 tags, keys of 1–128 characters,
/// values of at most 256, no key twice, no `aws:` prefix.
pub fn check_tags(tags: &[(String, String)]) -> Result<()> {
    check_tag_set(tags, MAX_TAGS)
}

/// [`check_tags`] with at most `max` tags (a bucket may have 50).
pub fn check_tag_set(tags: &[(String, String)], max: usize) -> Result<()> {
    if tags.len() > max {
        return Err(Error::InvalidTag(format!("at most {max} tags are allowed")));
    }
    let mut seen = std::collections::HashSet::new();
    for (k, v) in tags {
        if k.is_empty() || k.chars().count() > 128 {
            return Err(Error::InvalidTag(
                "tag keys must be 1 to 128 characters".into(),
            ));
        }
        if v.chars().count() > 256 {
            return Err(Error::InvalidTag(
                "tag values must be at most 256 characters".into(),
            ));
        }
        if k.to_ascii_lowercase().starts_with("aws:") {
            return Err(Error::InvalidTag("tag keys may not start with aws:".into()));
        }
        if !seen.insert(k.as_str()) {
            return Err(Error::InvalidTag(format!(
                "the tag key {k:?} appears twice"
            )));
        }
    }
    Ok(())
}

impl Store {
    pub(crate) async fn object_location(
        &self,
        tenant: TenantId,
        bucket: &str,
    ) -> Result<(PartitionId, Vec<u8>)> {
        let p = self.led_partition(tenant, bucket)?;
        let b = self.bucket(tenant, bucket).await?;
        Ok((p, keys::bucket_prefix(p, b.id)))
    }

    /// Commits freshly written data as the new version of `key`, if `cond` allows and
    /// the tenant's quotas admit it. Replaced data is discarded; refused data is removed.
    #[allow(clippy::too_many_arguments)]
    pub(crate) async fn commit_object(
        &self,
        tenant: TenantId,
        key_bytes: Vec<u8>,
        written: Written,
        etag: String,
        meta: ObjectMeta,
        ext: ObjectExt,
        cond: Conditions,
    ) -> Result<PutOutcome> {
        let size = written.size;
        let admitted = match self
            .admit_record(tenant, super::quota::RecordKind::Object, &key_bytes, size)
            .await
        {
            Ok(r) => r,
            Err(e) => {
                data::abandon(self.engine().chunks(), written.data).await;
                return Err(e);
            }
        };
        let guard = admitted.guard();
        let data = written.data.clone();
        let etag2 = etag.clone();
        let checksum = ext.checksum.clone();
        let r = self
            .inner
            .engine
            .write(written.dirs, move |ctx| {
                if super::bucket::bucket_is_dead(&ctx.txn, &key_bytes)? {
                    return Ok(Err(Error::NoSuchBucket));
                }
                let mut t = ctx.txn.open_table(OBJECTS)?;
                let current = match t.get(key_bytes.as_slice())? {
                    Some(v) => {
                        Some(decode_record(v.value()).map_err(|e| EngineError::Db(e.to_string()))?)
                    }
                    None => None,
                };
                if let Err(e) = cond.check_write(current.as_ref()) {
                    return Ok(Err(e));
                }
                if let Err(m) = guard.check(current.as_ref().map(|c| c.size)) {
                    return Ok(Err(Error::QuotaUndecided(m)));
                }
                let version = ctx.next_seq();
                let rec = ObjectRecord {
                    size,
                    etag: etag2,
                    last_modified: now_millis(),
                    version,
                    meta,
                    data,
                    ext,
                };
                t.insert(key_bytes.as_slice(), encode_ext(&rec)?.as_slice())?;
                drop(t);
                ctx.ship_chunks(rec.data.chunks());
                Ok(Ok((version, current.map(|c| c.data))))
            })
            .await;
        match r {
            Ok(Ok((version, replaced))) => {
                admitted.committed();
                if let Some(d) = replaced {
                    self.discard_data(d);
                }
                Ok(PutOutcome {
                    etag,
                    size,
                    version,
                    checksum,
                })
            }
            Ok(Err(e)) => {
                admitted.release();
                data::abandon(self.engine().chunks(), written.data).await;
                Err(e)
            }
            Err(e) => {
                admitted.release();
                data::abandon(self.engine().chunks(), written.data).await;
                Err(e.into())
            }
        }
    }

    #[allow(clippy::too_many_arguments)]
    pub async fn put_object(
        &self,
        tenant: TenantId,
        bucket: &str,
        key: &str,
        body: ByteStream,
        content_md5: Option<[u8; 16]>,
        meta: ObjectMeta,
        cond: Conditions,
    ) -> Result<PutOutcome> {
        self.put_object_ext(
            tenant,
            bucket,
            key,
            body,
            content_md5,
            meta,
            cond,
            PutExtra::default(),
        )
        .await
    }

    /// [`Store::put_object`] with tags and a flexible checksum to verify and store.
    #[allow(clippy::too_many_arguments)]
    pub async fn put_object_ext(
        &self,
        tenant: TenantId,
        bucket: &str,
        key: &str,
        body: ByteStream,
        content_md5: Option<[u8; 16]>,
        meta: ObjectMeta,
        cond: Conditions,
        extra: PutExtra,
    ) -> Result<PutOutcome> {
        check_key(key)?;
        check_tags(&extra.tags)?;
        let (p, prefix) = self.object_location(tenant, bucket).await?;
        let conditional = self.precheck_write(tenant, bucket, key, &cond).await?;
        let mut k = prefix;
        k.extend_from_slice(key.as_bytes());
        if let Some(n) = extra.declared_size {
            self.precheck_record(tenant, super::quota::RecordKind::Object, &k, n)
                .await?;
        }
        let (body, running) = super::checksum::hashing(body, extra.checksum);
        let written =
            data::write_body(self.engine().chunks(), p, body, &self.io(tenant).await).await?;
        let checksum = self.verify_written(&written, running, content_md5).await?;
        let etag = hex::encode(written.md5);
        let ext = ObjectExt {
            tags: extra.tags,
            part_sizes: Vec::new(),
            checksum,
            restored_at: None,
        };
        self.commit_object(tenant, k, written, etag, meta, ext, cond)
            .await
            .map_err(|e| conflict_if(conditional, e))
    }

    /// Checks data just written against the flexible checksum computed while it
    /// streamed in and the `Content-MD5` the client sent; on a mismatch the data is
    /// removed. Returns the checksum to store.
    pub(crate) async fn verify_written(
        &self,
        written: &Written,
        running: Option<super::checksum::Running>,
        content_md5: Option<[u8; 16]>,
    ) -> Result<Option<Checksum>> {
        let verdict = running
            .map(|r| r.finish())
            .transpose()
            .and_then(|c| match content_md5 {
                Some(expected) if expected != written.md5 => Err(Error::BadDigest),
                _ => Ok(c),
            });
        if verdict.is_err() {
            data::abandon(self.engine().chunks(), written.data.clone()).await;
        }
        verdict
    }

    /// The object's tags.
    pub async fn object_tags(
        &self,
        tenant: TenantId,
        bucket: &str,
        key: &str,
    ) -> Result<Vec<(String, String)>> {
        Ok(self.head_object(tenant, bucket, key).await?.ext.tags)
    }

    /// Replaces the object's tags (an empty set removes them); its data, ETag and
    /// Last-Modified stay, as in S3.
    pub async fn set_object_tags(
        &self,
        tenant: TenantId,
        bucket: &str,
        key: &str,
        tags: Vec<(String, String)>,
    ) -> Result<()> {
        check_key(key)?;
        check_tags(&tags)?;
        let (_, mut k) = self.object_location(tenant, bucket).await?;
        k.extend_from_slice(key.as_bytes());
        self.engine()
            .write(vec![], move |ctx| {
                let mut t = ctx.txn.open_table(OBJECTS)?;
                let Some(old) = t.get(k.as_slice())?.map(|v| v.value().to_vec()) else {
                    return Ok(Err(Error::NoSuchKey));
                };
                let mut rec = decode_record(&old).map_err(|e| EngineError::Db(e.to_string()))?;
                rec.ext.tags = tags;
                t.insert(k.as_slice(), encode_ext(&rec)?.as_slice())?;
                Ok(Ok(()))
            })
            .await?
    }

    /// Checks a write's conditions (`If-Match`, `If-None-Match`) against the current
    /// object before any of its body is read, as S3 does: a condition that fails here
    /// is a 412 (`If-Match` on a missing key: 404 `NoSuchKey`) and nothing is uploaded.
    /// The commit checks them again atomically; see [`conflict_if`]. Returns whether
    /// the write is conditional.
    pub(crate) async fn precheck_write(
        &self,
        tenant: TenantId,
        bucket: &str,
        key: &str,
        cond: &Conditions,
    ) -> Result<bool> {
        if cond.if_match.is_none() && cond.if_none_match.is_none() {
            return Ok(false);
        }
        let current = match self.head_object(tenant, bucket, key).await {
            Ok(o) => Some(o),
            Err(Error::NoSuchKey) if cond.if_match.is_none() => None,
            Err(e) => return Err(e),
        };
        cond.check_write(current.as_ref())?;
        Ok(true)
    }

    pub async fn head_object(
        &self,
        tenant: TenantId,
        bucket: &str,
        key: &str,
    ) -> Result<ObjectRecord> {
        check_key(key)?;
        let (_, mut k) = self.object_location(tenant, bucket).await?;
        k.extend_from_slice(key.as_bytes());
        self.record_at(k).await
    }

    /// The record stored under the engine key `k`.
    pub(crate) async fn record_at(&self, k: Vec<u8>) -> Result<ObjectRecord> {
        let rec = self
            .engine()
            .read(move |txn| {
                let t = txn.open_table(OBJECTS)?;
                Ok(t.get(k.as_slice())?.map(|v| v.value().to_vec()))
            })
            .await?
            .ok_or(Error::NoSuchKey)?;
        decode_record(&rec)
    }

    /// Reads an object (or a range of it) after checking the read preconditions.
    pub async fn get_object(
        &self,
        tenant: TenantId,
        bucket: &str,
        key: &str,
        range: Option<ByteRange>,
        cond: &Conditions,
    ) -> Result<(ObjectRecord, Range<u64>, ObjectBody)> {
        check_key(key)?;
        let (_, mut k) = self.object_location(tenant, bucket).await?;
        k.extend_from_slice(key.as_bytes());
        let rec = self.record_at(k.clone()).await?;
        cond.check_read(&rec)?;
        let r = range_of(&rec, range)?;
        let body = match &rec.data {
            data::ObjectData::Cold(c) => {
                let body = self.read_cold(c, r.clone(), self.io(tenant).await).await?;
                self.count_cold_read(tenant, k, rec.version);
                body
            }
            d => {
                data::read_body(self.engine().chunks(), d, r.clone(), &self.io(tenant).await)
                    .await?
            }
        };
        Ok((rec, r, body))
    }

    /// Deletes `key`; deleting a missing key succeeds (S3 semantics).
    pub async fn delete_object(&self, tenant: TenantId, bucket: &str, key: &str) -> Result<()> {
        check_key(key)?;
        let (_, mut k) = self.object_location(tenant, bucket).await?;
        k.extend_from_slice(key.as_bytes());
        let removed = self
            .engine()
            .write(vec![], move |ctx| {
                let mut t = ctx.txn.open_table(OBJECTS)?;
                let old = t.remove(k.as_slice())?.map(|v| v.value().to_vec());
                Ok(old)
            })
            .await?;
        if let Some(old) = removed {
            self.quotas().freed(tenant);
            self.discard_data(decode_record(&old)?.data);
        }
        Ok(())
    }

    /// A copy's source: read here when this node leads its bucket, else from the node
    /// that does (the remote reader), with `cond` checked either way. A remote source's
    /// record comes without its data (`data` is empty inline): use its size, ETag and
    /// metadata, and read the bytes from the body.
    pub async fn get_copy_source(
        &self,
        tenant: TenantId,
        bucket: &str,
        key: &str,
        range: Option<ByteRange>,
        cond: &Conditions,
    ) -> Result<(ObjectRecord, Range<u64>, ObjectBody)> {
        match self.get_object(tenant, bucket, key, range, cond).await {
            Err(Error::NotPrimary(why)) => match self.inner.remote_reader.get() {
                Some(read) => {
                    let (rec, r, body) = read(tenant, bucket.into(), key.into(), range).await?;
                    cond.check_read(&rec)?;
                    Ok((rec, r, body))
                }
                None => Err(Error::NotPrimary(why).for_copy_source()),
            },
            other => other,
        }
    }

    /// Copies an object's data and (unless `meta` is given) its metadata to a new key.
    #[allow(clippy::too_many_arguments)]
    pub async fn copy_object(
        &self,
        tenant: TenantId,
        src_bucket: &str,
        src_key: &str,
        src_cond: &Conditions,
        dst_bucket: &str,
        dst_key: &str,
        meta: Option<ObjectMeta>,
        tags: Option<Vec<(String, String)>>,
    ) -> Result<(ObjectRecord, PutOutcome)> {
        check_key(dst_key)?;
        if let Some(t) = &tags {
            check_tags(t)?;
        }
        let (src, _, body) = self
            .get_copy_source(tenant, src_bucket, src_key, None, src_cond)
            .await?;
        let (p, mut k) = self.object_location(tenant, dst_bucket).await?;
        k.extend_from_slice(dst_key.as_bytes());
        // The copy gets a whole-object checksum of the source's algorithm, computed
        // over the bytes as they are copied.
        let check = src
            .ext
            .checksum
            .as_ref()
            .map(|c| super::checksum::ChecksumCheck {
                algorithm: c.algorithm,
                expected: super::checksum::Expected::Compute,
            });
        let (stream, running) = super::checksum::hashing(body.stream, check);
        let written =
            data::write_body(self.engine().chunks(), p, stream, &self.io(tenant).await).await?;
        let checksum = self.verify_written(&written, running, None).await?;
        // A multipart source keeps its ETag only when the data is unchanged; a copy is
        // stored as one part, so its ETag is the MD5 of the bytes.
        let etag = hex::encode(written.md5);
        let meta = meta.unwrap_or_else(|| src.meta.clone());
        let ext = ObjectExt {
            tags: tags.unwrap_or_else(|| src.ext.tags.clone()),
            part_sizes: Vec::new(),
            checksum,
            restored_at: None,
        };
        let out = self
            .commit_object(tenant, k, written, etag, meta, ext, Conditions::default())
            .await?;
        Ok((src, out))
    }

    /// Lists keys in order, starting after `after` (exclusive), grouping keys that
    /// contain `delimiter` after `prefix` into common prefixes. `max` counts both.
    pub async fn list_objects(
        &self,
        tenant: TenantId,
        bucket: &str,
        prefix: &str,
        delimiter: Option<&str>,
        after: Option<&str>,
        max: usize,
    ) -> Result<ListPage> {
        let (_, bprefix) = self.object_location(tenant, bucket).await?;
        let prefix = prefix.to_string();
        let delimiter = delimiter.filter(|d| !d.is_empty()).map(str::to_string);
        let after = after.map(str::to_string);
        self.engine()
            .read(move |txn| {
                let t = txn.open_table(OBJECTS)?;
                let mut page = ListPage::default();
                if max == 0 {
                    return Ok(Ok(page));
                }
                let full = |s: &str| {
                    let mut k = bprefix.clone();
                    k.extend_from_slice(s.as_bytes());
                    k
                };
                let scan_prefix = full(&prefix);
                let mut start: Bound<Vec<u8>> = Bound::Included(scan_prefix.clone());
                if let Some(a) = &after
                    && a.as_str() >= prefix.as_str()
                {
                    start = Bound::Excluded(full(a));
                }
                let end: Bound<Vec<u8>> = match keys::prefix_end(&scan_prefix) {
                    Some(e) => Bound::Excluded(e),
                    None => Bound::Unbounded,
                };
                'scan: loop {
                    let range = t.range::<&[u8]>((
                        start.as_ref().map(Vec::as_slice),
                        end.as_ref().map(Vec::as_slice),
                    ))?;
                    for entry in range {
                        let (k, v) = entry?;
                        let Ok(key) = std::str::from_utf8(&k.value()[bprefix.len()..]) else {
                            continue;
                        };
                        if page.objects.len() + page.common_prefixes.len() >= max {
                            page.is_truncated = true;
                            break 'scan;
                        }
                        if let Some(d) = &delimiter
                            && let Some(pos) = key[prefix.len()..].find(d.as_str())
                        {
                            let cp = key[..prefix.len() + pos + d.len()].to_string();
                            let skip_to = keys::prefix_end(&full(&cp));
                            if after.as_deref().is_none_or(|a| cp.as_str() > a) {
                                page.last = Some(cp.clone());
                                page.common_prefixes.push(cp);
                            }
                            // Jump past every key under this common prefix.
                            match skip_to {
                                Some(s) => {
                                    start = Bound::Included(s);
                                    continue 'scan;
                                }
                                None => break 'scan,
                            }
                        }
                        let rec = match decode_summary(v.value()) {
                            Ok(r) => r,
                            Err(e) => return Ok(Err(e)),
                        };
                        page.last = Some(key.to_string());
                        page.objects.push((key.to_string(), rec));
                    }
                    break;
                }
                Ok(Ok(page))
            })
            .await?
    }
}

#[cfg(test)]
mod properties {
    use proptest::prelude::*;

    use super::ByteRange;

    proptest! {
        /// A resolved range is never empty and never leaves the object.
        #[test]
        fn resolved_ranges_stay_inside_the_object(size in 0u64..10_000, first in 0u64..12_000, last in proptest::option::of(0u64..12_000), suffix in 0u64..12_000) {
            for r in [ByteRange::FromTo(first, last), ByteRange::Suffix(suffix)] {
                if let Ok(r) = r.resolve(size) {
                    prop_assert!(r.start < r.end && r.end <= size);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A listing decodes only the summary, and it agrees with the full record, for
    /// inline and chunked objects alike.
    #[test]
    fn the_summary_is_the_head_of_the_record() {
        let rec = ObjectRecord {
            size: 65536,
            etag: "abc".into(),
            last_modified: 17,
            version: 9,
            meta: ObjectMeta {
                content_type: Some("text/plain".into()),
                ..Default::default()
            },
            data: data::ObjectData::inline(vec![7; 65536]),
            ext: ObjectExt::default(),
        };
        let bytes = encode_ext(&rec).unwrap();
        assert_eq!(bytes[0], record::RECORD_VERSION, "no extension: version 1");
        assert_eq!(
            decode_summary(&bytes).unwrap(),
            ObjectSummary {
                size: 65536,
                etag: "abc".into(),
                last_modified: 17,
                version: 9
            }
        );
        assert!(decode_summary(&bytes[..3]).is_err());
        assert_eq!(decode_record(&bytes).unwrap(), rec);
    }

    /// The usage counters tell cold objects from hot ones by the head of the record
    /// (`body_is_cold`), with user metadata and under both record versions.
    #[test]
    fn the_cold_probe_reads_the_data_variant() {
        let cold = data::ObjectData::Cold(crate::cold::ColdRef {
            key: "p/1".into(),
            len: 3,
            piece: 1 << 20,
            crcs: vec![1],
        });
        let chunks = data::ObjectData::Chunks(Vec::new());
        for (d, want) in [
            (data::ObjectData::inline(b"abc".to_vec()), false),
            (chunks, false),
            (cold, true),
        ] {
            for tags in [vec![], vec![("k".to_string(), "v".to_string())]] {
                let rec = ObjectRecord {
                    size: 3,
                    etag: "e".into(),
                    last_modified: 1,
                    version: 2,
                    meta: ObjectMeta {
                        content_type: Some("a/b".into()),
                        user: [("x".to_string(), "y".to_string())].into(),
                        expires: Some(-5),
                        ..Default::default()
                    },
                    data: d.clone(),
                    ext: ObjectExt {
                        tags,
                        ..Default::default()
                    },
                };
                let bytes = encode_ext(&rec).unwrap();
                assert_eq!(
                    crate::engine::usage::cold_size(&bytes),
                    want.then_some(3),
                    "{d:?}"
                );
            }
        }
    }

    /// Extension fields are written under record version 2 after the version-1 body:
    /// the summary and a version-1 reader of the body still decode it, and the full
    /// decode gets them back.
    #[test]
    fn extension_fields_round_trip_under_version_2() {
        let rec = ObjectRecord {
            size: 5,
            etag: "e-2".into(),
            last_modified: 1,
            version: 2,
            meta: ObjectMeta::default(),
            data: data::ObjectData::inline(b"hello".to_vec()),
            ext: ObjectExt {
                tags: vec![("k".into(), "v".into())],
                part_sizes: vec![3, 2],
                checksum: Some(Checksum {
                    algorithm: ChecksumAlgorithm::Crc32,
                    value: "AAAAAA==".into(),
                    full_object: true,
                }),
                restored_at: Some(1_700_000_000_000),
            },
        };
        let bytes = encode_ext(&rec).unwrap();
        assert_eq!(bytes[0], record::EXTENDED_VERSION);
        assert_eq!(decode_record(&bytes).unwrap(), rec);
        assert_eq!(decode_summary(&bytes).unwrap().etag, "e-2");
        // What a version-1 decoder of the same body sees: everything but the extension.
        let v1: ObjectRecord = decode_stored("object", &bytes).unwrap();
        assert_eq!(v1.ext, ObjectExt::default());
        assert_eq!(v1.data, rec.data);
        // What a binary from before the restore stamp decodes (postcard's `from_bytes`
        // leaves the tail unread): the extension, without the stamp.
        let (_, body) = record::open_versioned(&bytes).unwrap();
        let (_, rest): (ObjectRecord, _) = postcard::take_from_bytes(body).unwrap();
        let old: ObjectExt = postcard::from_bytes(rest).unwrap();
        assert_eq!(
            old,
            ObjectExt {
                restored_at: None,
                ..rec.ext.clone()
            }
        );
        // The stamp alone is enough to write version 2, and it comes back.
        let stamped = ObjectRecord {
            ext: ObjectExt {
                restored_at: Some(7),
                ..Default::default()
            },
            ..rec.clone()
        };
        let bytes = encode_ext(&stamped).unwrap();
        assert_eq!(bytes[0], record::EXTENDED_VERSION);
        assert_eq!(decode_record(&bytes).unwrap().ext.restored_at, Some(7));
        check_tags(&rec.ext.tags).unwrap();
        let many: Vec<_> = (0..11).map(|i| (format!("k{i}"), String::new())).collect();
        assert!(matches!(check_tags(&many), Err(Error::InvalidTag(_))));
        let dup = vec![
            ("a".to_string(), "1".to_string()),
            ("a".to_string(), "2".to_string()),
        ];
        assert!(matches!(check_tags(&dup), Err(Error::InvalidTag(_))));
    }
}
