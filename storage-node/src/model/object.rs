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
                return Err(Error::NotModified);
            }
        } else if let Some(t) = self.if_modified_since
            && lm <= t / 1000
        {
            return Err(Error::NotModified);
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
}

impl ByteRange {
    pub fn resolve(self, size: u64) -> Result<Range<u64>> {
        let invalid = Error::InvalidRange { size };
        match self {
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
    decode_stored("object", bytes).map_err(Error::Corrupt)
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
}

impl Store {
    async fn object_location(
        &self,
        tenant: TenantId,
        bucket: &str,
    ) -> Result<(PartitionId, Vec<u8>)> {
        let p = self.led_partition(tenant, bucket)?;
        let b = self.bucket(tenant, bucket).await?;
        Ok((p, keys::bucket_prefix(p, b.id)))
    }

    /// Commits freshly written data as the new version of `key`, if `cond` allows.
    /// Replaced data is discarded; refused data is removed.
    pub(crate) async fn commit_object(
        &self,
        key_bytes: Vec<u8>,
        written: Written,
        etag: String,
        meta: ObjectMeta,
        cond: Conditions,
    ) -> Result<PutOutcome> {
        let size = written.size;
        let data = written.data.clone();
        let etag2 = etag.clone();
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
                let version = ctx.next_seq();
                let rec = ObjectRecord {
                    size,
                    etag: etag2,
                    last_modified: now_millis(),
                    version,
                    meta,
                    data,
                };
                t.insert(key_bytes.as_slice(), encode(&rec)?.as_slice())?;
                drop(t);
                ctx.ship_chunks(rec.data.chunks());
                Ok(Ok((
                    version,
                    current.map(|c| c.data.into_chunks()).unwrap_or_default(),
                )))
            })
            .await;
        match r {
            Ok(Ok((version, replaced))) => {
                self.discard_chunks(replaced);
                Ok(PutOutcome {
                    etag,
                    size,
                    version,
                })
            }
            Ok(Err(e)) => {
                data::abandon(self.engine().chunks(), written.data).await;
                Err(e)
            }
            Err(e) => {
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
        check_key(key)?;
        let (p, prefix) = self.object_location(tenant, bucket).await?;
        let conditional = self.precheck_write(tenant, bucket, key, &cond).await?;
        let written = data::write_body(self.engine().chunks(), p, body).await?;
        if let Some(expected) = content_md5
            && expected != written.md5
        {
            data::abandon(self.engine().chunks(), written.data).await;
            return Err(Error::BadDigest);
        }
        let etag = hex::encode(written.md5);
        let mut k = prefix;
        k.extend_from_slice(key.as_bytes());
        self.commit_object(k, written, etag, meta, cond)
            .await
            .map_err(|e| conflict_if(conditional, e))
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
            Err(Error::NoSuchKey) if cond.if_match.is_some() => return Err(Error::NoSuchKey),
            Err(Error::NoSuchKey) => None,
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
        let rec = self.head_object(tenant, bucket, key).await?;
        cond.check_read(&rec)?;
        let r = match range {
            Some(r) => r.resolve(rec.size)?,
            None => 0..rec.size,
        };
        let body = data::read_body(self.engine().chunks(), &rec.data, r.clone()).await?;
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
            self.discard_chunks(decode_record(&old)?.data.into_chunks());
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
    ) -> Result<(ObjectRecord, PutOutcome)> {
        check_key(dst_key)?;
        let (src, _, body) = self
            .get_copy_source(tenant, src_bucket, src_key, None, src_cond)
            .await?;
        let (p, mut k) = self.object_location(tenant, dst_bucket).await?;
        k.extend_from_slice(dst_key.as_bytes());
        let written = data::write_body(self.engine().chunks(), p, body.stream).await?;
        // A multipart source keeps its ETag only when the data is unchanged; a copy is
        // stored as one part, so its ETag is the MD5 of the bytes.
        let etag = hex::encode(written.md5);
        let meta = meta.unwrap_or_else(|| src.meta.clone());
        let out = self
            .commit_object(k, written, etag, meta, Conditions::default())
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
        };
        let bytes = encode(&rec).unwrap();
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
    }
}
