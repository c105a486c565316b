//! Multipart uploads: parts are written as chunk files under an upload record and
//! stitched into one object, without copying data, when the upload completes.

use md5::{Digest, Md5};
use redb::ReadableTable;
use serde::{Deserialize, Serialize};

use super::checksum::{ChecksumCheck, Expected};
use super::data::{self, ByteStream, ObjectData};
use super::object::{
    Checksum, ChecksumAlgorithm, Conditions, Extended, ObjectExt, ObjectMeta, ObjectRecord,
    check_key, check_tags, decode_ext, decode_record, encode_ext,
};
use super::{Error, Result, Store};
use crate::engine::{
    ChunkRef, EngineError, META, OBJECTS, PARTS, UPLOADS, UPLOADS_BY_AGE, UPLOADS_BY_KEY, keys,
};
use crate::types::{TenantId, UploadId, now_millis};

/// Every part but the last must be at least this large (S3 rule).
pub const MIN_PART_SIZE: u64 = 5 * 1024 * 1024;
pub const MAX_PART_NUMBER: u32 = 10_000;

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct UploadRecord {
    pub key: String,
    pub meta: ObjectMeta,
    pub initiated: i64,
    /// Fields added after record version 1.
    #[serde(skip)]
    pub ext: UploadExt,
}

/// An upload's fields added after record version 1: what the completed object gets.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct UploadExt {
    pub tags: Vec<(String, String)>,
    /// The checksum algorithm of CreateMultipartUpload: every part must carry it.
    pub checksum: Option<(ChecksumAlgorithm, bool)>,
}

impl Extended for UploadRecord {
    type Ext = UploadExt;
    fn ext(&self) -> &UploadExt {
        &self.ext
    }
    fn set_ext(&mut self, ext: UploadExt) {
        self.ext = ext;
    }
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct PartRecord {
    pub size: u64,
    pub md5: [u8; 16],
    pub last_modified: i64,
    pub chunks: Vec<ChunkRef>,
    /// Fields added after record version 1.
    #[serde(skip)]
    pub ext: PartExt,
}

/// A part's fields added after record version 1.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PartExt {
    /// The part's flexible checksum, verified on upload.
    pub checksum: Option<Checksum>,
}

impl Extended for PartRecord {
    type Ext = PartExt;
    fn ext(&self) -> &PartExt {
        &self.ext
    }
    fn set_ext(&mut self, ext: PartExt) {
        self.ext = ext;
    }
}

impl PartRecord {
    pub fn etag(&self) -> String {
        hex::encode(self.md5)
    }
}

#[derive(Clone, Debug)]
pub struct UploadInfo {
    pub key: String,
    pub upload_id: UploadId,
    pub initiated: i64,
}

pub(super) fn decode_upload(b: &[u8]) -> Result<UploadRecord, EngineError> {
    decode_ext("upload", b).map_err(EngineError::Db)
}

fn decode_part(b: &[u8]) -> Result<PartRecord, EngineError> {
    decode_ext("part", b).map_err(EngineError::Db)
}

/// Adds the index entries of upload `ukey`.
fn index_upload(
    txn: &crate::engine::replog::TrackedTxn<'_>,
    ukey: &[u8],
    up: &UploadRecord,
) -> Result<(), EngineError> {
    txn.open_table(UPLOADS_BY_KEY)?.insert(
        keys::upload_index_key(ukey, &up.key, up.initiated).as_slice(),
        (),
    )?;
    txn.open_table(UPLOADS_BY_AGE)?
        .insert(keys::upload_age_key(up.initiated, ukey).as_slice(), ())?;
    Ok(())
}

/// Removes upload `ukey` (its record, parts and index entries); returns the chunks of
/// its parts. `up` is its record, already read.
pub(super) fn remove_upload(
    txn: &crate::engine::replog::TrackedTxn<'_>,
    ukey: &[u8],
    up: &UploadRecord,
) -> Result<Vec<ChunkRef>, EngineError> {
    txn.open_table(UPLOADS)?.remove(ukey)?;
    txn.open_table(UPLOADS_BY_KEY)?
        .remove(keys::upload_index_key(ukey, &up.key, up.initiated).as_slice())?;
    txn.open_table(UPLOADS_BY_AGE)?
        .remove(keys::upload_age_key(up.initiated, ukey).as_slice())?;
    let mut pt = txn.open_table(PARTS)?;
    let end = keys::prefix_end(ukey).unwrap_or_default();
    let mut garbage = Vec::new();
    for e in pt.range(ukey..end.as_slice())? {
        let (_, v) = e?;
        garbage.extend(decode_part(v.value())?.chunks);
    }
    pt.retain_in(ukey..end.as_slice(), |_, _| false)?;
    Ok(garbage)
}

/// Marks that every upload has its index entries (uploads created before the index
/// existed are indexed once, at open).
const UPLOAD_INDEX_MARK: &str = "uploads_indexed";

/// One page of ListMultipartUploads.
#[derive(Debug, Default)]
pub struct UploadPage {
    pub uploads: Vec<UploadInfo>,
    pub is_truncated: bool,
}

impl Store {
    async fn upload_key(
        &self,
        tenant: TenantId,
        bucket: &str,
        upload: UploadId,
    ) -> Result<(crate::types::PartitionId, crate::types::BucketId, Vec<u8>)> {
        let p = self.led_partition(tenant, bucket)?;
        let b = self.bucket(tenant, bucket).await?;
        Ok((p, b.id, keys::upload_key(p, b.id, upload)))
    }

    /// Loads an upload and checks that it belongs to `key`.
    async fn load_upload(&self, ukey: Vec<u8>, key: &str) -> Result<UploadRecord> {
        let rec = self
            .engine()
            .read(move |txn| {
                let t = txn.open_table(UPLOADS)?;
                t.get(ukey.as_slice())?
                    .map(|v| decode_upload(v.value()))
                    .transpose()
            })
            .await?
            .ok_or(Error::NoSuchUpload)?;
        if rec.key != key {
            return Err(Error::NoSuchUpload);
        }
        Ok(rec)
    }

    pub async fn create_upload(
        &self,
        tenant: TenantId,
        bucket: &str,
        key: &str,
        meta: ObjectMeta,
    ) -> Result<UploadId> {
        self.create_upload_ext(tenant, bucket, key, meta, UploadExt::default())
            .await
    }

    /// [`Store::create_upload`] with the tags and checksum algorithm of the object to be.
    pub async fn create_upload_ext(
        &self,
        tenant: TenantId,
        bucket: &str,
        key: &str,
        meta: ObjectMeta,
        ext: UploadExt,
    ) -> Result<UploadId> {
        check_key(key)?;
        check_tags(&ext.tags)?;
        let id = UploadId::random();
        let (_, _, ukey) = self.upload_key(tenant, bucket, id).await?;
        let rec = UploadRecord {
            key: key.to_string(),
            meta,
            initiated: now_millis(),
            ext,
        };
        self.engine()
            .write(vec![], move |ctx| {
                if super::bucket::bucket_is_dead(&ctx.txn, &ukey)? {
                    return Ok(Err(Error::NoSuchBucket));
                }
                let bytes = encode_ext(&rec)?;
                ctx.txn
                    .open_table(UPLOADS)?
                    .insert(ukey.as_slice(), bytes.as_slice())?;
                index_upload(&ctx.txn, &ukey, &rec)?;
                Ok(Ok(()))
            })
            .await??;
        Ok(id)
    }

    /// Stores one part; replaces an earlier part with the same number.
    #[allow(clippy::too_many_arguments)]
    pub async fn upload_part(
        &self,
        tenant: TenantId,
        bucket: &str,
        key: &str,
        upload: UploadId,
        part: u32,
        body: ByteStream,
        content_md5: Option<[u8; 16]>,
    ) -> Result<PartRecord> {
        self.upload_part_ext(
            tenant,
            bucket,
            key,
            upload,
            part,
            body,
            content_md5,
            None,
            None,
        )
        .await
    }

    /// [`Store::upload_part`] with a flexible checksum to verify and store. A part of
    /// an upload created with a checksum algorithm gets that algorithm's checksum
    /// whether or not the client sent one; one of another algorithm is refused.
    #[allow(clippy::too_many_arguments)]
    pub async fn upload_part_ext(
        &self,
        tenant: TenantId,
        bucket: &str,
        key: &str,
        upload: UploadId,
        part: u32,
        body: ByteStream,
        content_md5: Option<[u8; 16]>,
        checksum: Option<ChecksumCheck>,
        declared_size: Option<u64>,
    ) -> Result<PartRecord> {
        if !(1..=MAX_PART_NUMBER).contains(&part) {
            return Err(Error::Invalid(format!(
                "part numbers must be 1 to {MAX_PART_NUMBER}"
            )));
        }
        let (p, bid, ukey) = self.upload_key(tenant, bucket, upload).await?;
        let up = self.load_upload(ukey.clone(), key).await?;
        let checksum = match (up.ext.checksum, checksum) {
            (Some((a, _)), Some(c)) if c.algorithm != a => {
                return Err(Error::Invalid(format!(
                    "this upload was created with checksum algorithm {}; the part carries {}",
                    a.name(),
                    c.algorithm.name()
                )));
            }
            (Some((a, _)), None) => Some(ChecksumCheck {
                algorithm: a,
                expected: Expected::Compute,
            }),
            (_, c) => c,
        };
        let pkey = keys::part_key(p, bid, upload, part);
        if let Some(n) = declared_size {
            self.precheck_record(tenant, super::quota::RecordKind::Part, &pkey, n)
                .await?;
        }
        let (body, running) = super::checksum::hashing(body, checksum);
        let written =
            data::write_body_chunked(self.engine().chunks(), p, body, &self.io(tenant).await)
                .await?;
        let checksum = self.verify_written(&written, running, content_md5).await?;
        let rec = PartRecord {
            size: written.size,
            md5: written.md5,
            last_modified: now_millis(),
            chunks: written.data.chunks().to_vec(),
            ext: PartExt { checksum },
        };
        let admitted = match self
            .admit_record(tenant, super::quota::RecordKind::Part, &pkey, written.size)
            .await
        {
            Ok(r) => r,
            Err(e) => {
                data::abandon(self.engine().chunks(), written.data).await;
                return Err(e);
            }
        };
        let guard = admitted.guard();
        let rec2 = rec.clone();
        let r = self
            .engine()
            .write(written.dirs, move |ctx| {
                // The upload may have been completed or aborted while the data streamed in.
                if ctx.txn.open_table(UPLOADS)?.get(ukey.as_slice())?.is_none() {
                    return Ok(Err(Error::NoSuchUpload));
                }
                let mut t = ctx.txn.open_table(PARTS)?;
                let replaced = t
                    .get(pkey.as_slice())?
                    .map(|v| crate::engine::usage::leading_size(v.value()).unwrap_or(0));
                if let Err(m) = guard.check(replaced) {
                    return Ok(Err(Error::QuotaUndecided(m)));
                }
                let old = t
                    .insert(pkey.as_slice(), encode_ext(&rec2)?.as_slice())?
                    .map(|v| v.value().to_vec());
                drop(t);
                ctx.ship_chunks(&rec2.chunks);
                Ok(Ok(old))
            })
            .await;
        match r {
            Ok(Ok(old)) => {
                admitted.committed();
                if let Some(old) = old {
                    self.discard_chunks(decode_part(&old)?.chunks);
                }
                Ok(rec)
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

    pub async fn list_parts(
        &self,
        tenant: TenantId,
        bucket: &str,
        key: &str,
        upload: UploadId,
    ) -> Result<Vec<(u32, PartRecord)>> {
        let (_, _, ukey) = self.upload_key(tenant, bucket, upload).await?;
        self.load_upload(ukey.clone(), key).await?;
        Ok(self
            .engine()
            .read(move |txn| {
                let t = txn.open_table(PARTS)?;
                let end = keys::prefix_end(&ukey).unwrap_or_default();
                let mut out = Vec::new();
                for e in t.range(ukey.as_slice()..end.as_slice())? {
                    let (k, v) = e?;
                    let k = k.value();
                    let n = u32::from_be_bytes([
                        k[k.len() - 4],
                        k[k.len() - 3],
                        k[k.len() - 2],
                        k[k.len() - 1],
                    ]);
                    out.push((n, decode_part(v.value())?));
                }
                Ok(out)
            })
            .await?)
    }

    /// Completes an upload from the listed `(part number, ETag)` pairs.
    pub async fn complete_upload(
        &self,
        tenant: TenantId,
        bucket: &str,
        key: &str,
        upload: UploadId,
        parts: Vec<(u32, String)>,
        cond: Conditions,
    ) -> Result<(String, u64)> {
        let (etag, size, _) = self
            .complete_upload_ext(tenant, bucket, key, upload, parts, cond, None)
            .await?;
        Ok((etag, size))
    }

    /// [`Store::complete_upload`], also answering the object's checksum (composed from
    /// its parts', see [`super::checksum::of_parts`]) after comparing it with the
    /// whole-object value the client declared, if any.
    #[allow(clippy::too_many_arguments)]
    pub async fn complete_upload_ext(
        &self,
        tenant: TenantId,
        bucket: &str,
        key: &str,
        upload: UploadId,
        parts: Vec<(u32, String)>,
        cond: Conditions,
        declared_checksum: Option<String>,
    ) -> Result<(String, u64, Option<Checksum>)> {
        if parts.is_empty() {
            return Err(Error::Invalid("you must specify at least one part".into()));
        }
        if parts.windows(2).any(|w| w[0].0 >= w[1].0) {
            return Err(Error::InvalidPartOrder);
        }
        let (p, bid, ukey) = self.upload_key(tenant, bucket, upload).await?;
        // A missing upload is NoSuchUpload whatever the conditions say (the commit finds
        // it missing too; only a conditional request needs to know before).
        let conditional = if cond.if_match.is_some() || cond.if_none_match.is_some() {
            self.load_upload(ukey.clone(), key).await?;
            self.precheck_write(tenant, bucket, key, &cond).await?
        } else {
            false
        };
        let okey = keys::object_key(p, bid, key);
        // The parts become the object's data: only a new key adds (an object).
        let admitted = self
            .admit_record(tenant, super::quota::RecordKind::Object, &okey, 0)
            .await?;
        let guard = admitted.guard();
        let key = key.to_string();
        let r = self
            .engine()
            .write(vec![], move |ctx| {
                if super::bucket::bucket_is_dead(&ctx.txn, &ukey)? {
                    return Ok(Err(Error::NoSuchBucket));
                }
                let Some(up) = ctx
                    .txn
                    .open_table(UPLOADS)?
                    .get(ukey.as_slice())?
                    .map(|v| v.value().to_vec())
                else {
                    return Ok(Err(Error::NoSuchUpload));
                };
                let up = decode_upload(&up)?;
                if up.key != key {
                    return Ok(Err(Error::NoSuchUpload));
                }
                let up_index = up.clone();
                let mut stored = std::collections::BTreeMap::new();
                {
                    let t = ctx.txn.open_table(PARTS)?;
                    let end = keys::prefix_end(&ukey).unwrap_or_default();
                    for e in t.range(ukey.as_slice()..end.as_slice())? {
                        let (k, v) = e?;
                        let k = k.value();
                        let n = u32::from_be_bytes([
                            k[k.len() - 4],
                            k[k.len() - 3],
                            k[k.len() - 2],
                            k[k.len() - 1],
                        ]);
                        stored.insert(n, decode_part(v.value())?);
                    }
                }
                let mut chunks = Vec::new();
                let mut md5s = Md5::new();
                let mut size = 0u64;
                let mut part_sizes = Vec::with_capacity(parts.len());
                let mut part_sums = Vec::with_capacity(parts.len());
                let last = parts.len() - 1;
                for (i, (n, etag)) in parts.iter().enumerate() {
                    let Some(part) = stored.get(n) else {
                        return Ok(Err(Error::InvalidPart(*n)));
                    };
                    if etag.trim_matches('"') != part.etag() {
                        return Ok(Err(Error::InvalidPart(*n)));
                    }
                    if i != last && part.size < MIN_PART_SIZE {
                        return Ok(Err(Error::EntityTooSmall {
                            part: *n,
                            size: part.size,
                        }));
                    }
                    md5s.update(part.md5);
                    size += part.size;
                    part_sizes.push(part.size);
                    part_sums.push((part.ext.checksum.as_ref(), part.size));
                    chunks.extend(part.chunks.iter().cloned());
                }
                let checksum = match up.ext.checksum {
                    Some((algorithm, full_object)) => {
                        match super::checksum::of_parts(algorithm, full_object, &part_sums) {
                            Ok(c) => c,
                            Err(e) => return Ok(Err(e)),
                        }
                    }
                    None => None,
                };
                drop(part_sums);
                match (&declared_checksum, &checksum) {
                    (Some(_), None) => {
                        return Ok(Err(Error::Invalid(
                            "a checksum was sent for an upload created without a checksum \
                             algorithm (or whose parts have none)"
                                .into(),
                        )));
                    }
                    // A COMPOSITE value may be sent with or without its `-N`.
                    (Some(declared), Some(c))
                        if declared.trim() != c.value
                            && c.value.rsplit_once('-').map(|(v, _)| v)
                                != Some(declared.trim()) =>
                    {
                        return Ok(Err(Error::BadChecksum(c.algorithm.name())));
                    }
                    _ => {}
                }
                let mut objects = ctx.txn.open_table(OBJECTS)?;
                let current = match objects.get(okey.as_slice())? {
                    Some(v) => {
                        Some(decode_record(v.value()).map_err(|e| EngineError::Db(e.to_string()))?)
                    }
                    None => None,
                };
                if let Err(e) = cond.check_write(current.as_ref()) {
                    return Ok(Err(super::object::conflict_if(conditional, e)));
                }
                if let Err(m) = guard.check(current.as_ref().map(|c| c.size)) {
                    return Ok(Err(Error::QuotaUndecided(m)));
                }
                let etag = format!("{}-{}", hex::encode(md5s.finalize()), parts.len());
                let used: std::collections::HashSet<_> = parts.iter().map(|(n, _)| *n).collect();
                let mut garbage: Vec<ChunkRef> = stored
                    .into_iter()
                    .filter(|(n, _)| !used.contains(n))
                    .flat_map(|(_, p)| p.chunks)
                    .collect();
                let replaced_cold = match current.map(|c| c.data) {
                    Some(d @ ObjectData::Cold(_)) => Some(d),
                    Some(d) => {
                        garbage.extend(d.into_chunks());
                        None
                    }
                    None => None,
                };
                let version = ctx.next_seq();
                let rec = ObjectRecord {
                    size,
                    etag: etag.clone(),
                    last_modified: now_millis(),
                    version,
                    meta: up.meta,
                    data: ObjectData::Chunks(chunks),
                    ext: ObjectExt {
                        tags: up.ext.tags,
                        part_sizes,
                        checksum: checksum.clone(),
                        restored_at: None,
                    },
                };
                objects.insert(okey.as_slice(), encode_ext(&rec)?.as_slice())?;
                drop(objects);
                // The parts' chunks now belong to the object (or are in `garbage`).
                remove_upload(&ctx.txn, &ukey, &up_index)?;
                Ok(Ok((etag, size, checksum, garbage, replaced_cold)))
            })
            .await;
        let r = match r {
            Ok(Ok(r)) => r,
            Ok(Err(e)) => {
                admitted.release();
                return Err(e);
            }
            Err(e) => {
                admitted.release();
                return Err(e.into());
            }
        };
        admitted.committed();
        let (etag, size, checksum, garbage, replaced_cold) = r;
        self.discard_chunks(garbage);
        if let Some(d) = replaced_cold {
            self.discard_data(d);
        }
        Ok((etag, size, checksum))
    }

    pub async fn abort_upload(
        &self,
        tenant: TenantId,
        bucket: &str,
        key: &str,
        upload: UploadId,
    ) -> Result<()> {
        let (_, _, ukey) = self.upload_key(tenant, bucket, upload).await?;
        let key = key.to_string();
        let garbage = self
            .engine()
            .write(vec![], move |ctx| {
                let Some(up) = ctx
                    .txn
                    .open_table(UPLOADS)?
                    .get(ukey.as_slice())?
                    .map(|v| v.value().to_vec())
                else {
                    return Ok(Err(Error::NoSuchUpload));
                };
                let up = decode_upload(&up)?;
                if up.key != key {
                    return Ok(Err(Error::NoSuchUpload));
                }
                Ok(Ok(remove_upload(&ctx.txn, &ukey, &up)?))
            })
            .await??;
        self.quotas().freed(tenant);
        self.discard_chunks(garbage);
        Ok(())
    }

    /// One page of the uploads in progress in a bucket whose key starts with `prefix`,
    /// ordered by key, then initiation time (then id), starting after `key_marker`
    /// (all of its uploads, or with `upload_id_marker` those after that upload). Reads
    /// the ordered index: the cost is the page's, not the bucket's.
    pub async fn list_uploads_page(
        &self,
        tenant: TenantId,
        bucket: &str,
        prefix: &str,
        key_marker: Option<&str>,
        upload_id_marker: Option<UploadId>,
        max: usize,
    ) -> Result<UploadPage> {
        let p = self.led_partition(tenant, bucket)?;
        let b = self.bucket(tenant, bucket).await?;
        let bprefix = keys::bucket_prefix(p, b.id);
        let scan_prefix = keys::upload_index_prefix(&bprefix, prefix);
        let key_marker = key_marker.filter(|k| !k.is_empty()).map(str::to_string);
        Ok(self
            .engine()
            .read(move |txn| {
                use std::ops::Bound;
                let mut start = Bound::Included(scan_prefix.clone());
                if let Some(km) = &key_marker {
                    // After the marker upload if it still exists, else after the key.
                    let marker = upload_id_marker.and_then(|id| {
                        let ukey = keys::upload_key(p, b.id, id);
                        let t = txn.open_table(UPLOADS).ok()?;
                        let v = t.get(ukey.as_slice()).ok()??;
                        let up = decode_upload(v.value()).ok()?;
                        (up.key == *km).then(|| keys::upload_index_key(&ukey, km, up.initiated))
                    });
                    let after = match marker {
                        Some(m) => Bound::Excluded(m),
                        None if upload_id_marker.is_some() => {
                            // The marker upload is gone: start at the key's first upload
                            // (an upload may be listed twice, none is skipped).
                            Bound::Included(keys::upload_index_prefix(&bprefix, km))
                        }
                        None => Bound::Excluded(keys::upload_index_after_key(&bprefix, km)),
                    };
                    let later = match (&after, &start) {
                        (Bound::Excluded(a) | Bound::Included(a), Bound::Included(s)) => a >= s,
                        _ => true,
                    };
                    if later {
                        start = after;
                    }
                }
                let end = match keys::prefix_end(&scan_prefix) {
                    Some(e) => Bound::Excluded(e),
                    None => Bound::Unbounded,
                };
                let t = txn.open_table(UPLOADS_BY_KEY)?;
                let mut page = UploadPage::default();
                if max == 0 {
                    return Ok(page);
                }
                let range = t.range::<&[u8]>((
                    start.as_ref().map(Vec::as_slice),
                    end.as_ref().map(Vec::as_slice),
                ))?;
                for e in range {
                    let (k, _) = e?;
                    if page.uploads.len() == max {
                        page.is_truncated = true;
                        break;
                    }
                    let Some((key, initiated, upload_id)) = k
                        .value()
                        .get(bprefix.len()..)
                        .and_then(keys::parse_upload_index)
                    else {
                        return Err(EngineError::Db("bad upload index entry".into()));
                    };
                    let key = String::from_utf8(key)
                        .map_err(|_| EngineError::Db("upload key is not UTF-8".into()))?;
                    page.uploads.push(UploadInfo {
                        key,
                        upload_id,
                        initiated,
                    });
                }
                Ok(page)
            })
            .await?)
    }

    /// Aborts uploads initiated before `cutoff` (Unix ms), at most `limit` of them, and
    /// frees their parts' data. Returns how many were aborted.
    pub async fn expire_uploads(&self, cutoff: i64, limit: usize) -> Result<usize> {
        let led = self.led_partitions();
        let due = self
            .engine()
            .read(move |txn| {
                let t = txn.open_table(UPLOADS_BY_AGE)?;
                let end = (cutoff.max(0) as u64).to_be_bytes();
                let mut due = Vec::new();
                for e in t.range::<&[u8]>(..&end[..])? {
                    let (k, _) = e?;
                    let ukey = &k.value()[8..];
                    let Some(pb) = ukey.get(..2) else {
                        continue;
                    };
                    let p = crate::types::PartitionId(u16::from_be_bytes([pb[0], pb[1]]));
                    if !led.contains(p) {
                        continue;
                    }
                    due.push(ukey.to_vec());
                    if due.len() == limit {
                        break;
                    }
                }
                Ok(due)
            })
            .await?;
        if due.is_empty() {
            return Ok(0);
        }
        // Background work: the batch waits for its turn behind tenants' I/O; what this
        // node no longer leads after the wait is left to its new primary.
        self.background_turn(due.len()).await;
        let led_now = self.led_partitions();
        let mut due = due;
        due.retain(|ukey: &Vec<u8>| {
            ukey.get(..2).is_some_and(|b| {
                led_now.contains(crate::types::PartitionId(u16::from_be_bytes([b[0], b[1]])))
            })
        });
        let (n, garbage) = self
            .engine()
            .write(vec![], move |ctx| {
                let mut n = 0;
                let mut garbage = Vec::new();
                for ukey in due {
                    let up = ctx
                        .txn
                        .open_table(UPLOADS)?
                        .get(ukey.as_slice())?
                        .map(|v| decode_upload(v.value()));
                    // Completed or aborted since the snapshot: nothing to do. A record
                    // that cannot be read is left alone (and its data with it).
                    let Some(Ok(up)) = up else { continue };
                    garbage.extend(remove_upload(&ctx.txn, &ukey, &up)?);
                    n += 1;
                }
                Ok((n, garbage))
            })
            .await?;
        self.discard_chunks(garbage);
        Ok(n)
    }

    /// Indexes uploads created before the upload indexes existed (once per store).
    pub async fn index_uploads(&self) -> Result<usize> {
        Ok(self
            .engine()
            .write(vec![], |ctx| {
                let mut meta = ctx.txn.open_table(META)?;
                if meta.get(UPLOAD_INDEX_MARK)?.is_some() {
                    return Ok(0);
                }
                let mut all = Vec::new();
                for e in ctx.txn.open_table(UPLOADS)?.iter()? {
                    let (k, v) = e?;
                    // An unreadable record stays unindexed (reads of it report it).
                    if let Ok(up) = decode_upload(v.value()) {
                        all.push((k.value().to_vec(), up));
                    }
                }
                for (k, up) in &all {
                    index_upload(&ctx.txn, k, up)?;
                }
                meta.insert(UPLOAD_INDEX_MARK, 1)?;
                Ok(all.len())
            })
            .await?)
    }
}

#[cfg(test)]
mod tests {
    use bytes::Bytes;

    use super::*;
    use crate::catalog::TenantSpec;
    use crate::model::test_store;

    async fn setup(dir: &std::path::Path) -> (Store, TenantId) {
        let s = test_store(dir).await;
        let t = s
            .catalog()
            .create_tenant("t", &TenantSpec::default())
            .await
            .unwrap()
            .id;
        s.create_bucket(t, "b").await.unwrap();
        (s, t)
    }

    async fn all_pages(s: &Store, t: TenantId, prefix: &str, max: usize) -> Vec<UploadInfo> {
        let mut out: Vec<UploadInfo> = Vec::new();
        let mut marker: Option<(String, UploadId)> = None;
        loop {
            let page = s
                .list_uploads_page(
                    t,
                    "b",
                    prefix,
                    marker.as_ref().map(|(k, _)| k.as_str()),
                    marker.as_ref().map(|(_, id)| *id),
                    max,
                )
                .await
                .unwrap();
            assert!(page.uploads.len() <= max);
            out.extend(page.uploads.iter().cloned());
            if !page.is_truncated {
                return out;
            }
            let last = page.uploads.last().unwrap();
            marker = Some((last.key.clone(), last.upload_id));
        }
    }

    /// Pages come from the ordered index: following the markers lists every upload once,
    /// ordered by key then initiation time, and a page never reads upload records (a
    /// corrupt record elsewhere in the bucket does not disturb it).
    #[tokio::test]
    async fn uploads_page_in_order_from_the_index() {
        let dir = tempfile::tempdir().unwrap();
        let (s, t) = setup(dir.path()).await;
        let mut made = Vec::new();
        for i in 0..40 {
            let key = format!("k{}", i % 7);
            let id = s
                .create_upload(t, "b", &key, ObjectMeta::default())
                .await
                .unwrap();
            made.push((key, id));
        }
        // Corrupt one upload record: listings read only the index.
        let (ck, cid) = made[3].clone();
        let (_, _, ukey) = s.upload_key(t, "b", cid).await.unwrap();
        s.engine()
            .write(vec![], move |ctx| {
                ctx.txn
                    .open_table(UPLOADS)?
                    .insert(ukey.as_slice(), &b"junk"[..])?;
                Ok(())
            })
            .await
            .unwrap();
        let listed = all_pages(&s, t, "", 6).await;
        assert_eq!(listed.len(), 40);
        let mut want = listed.clone();
        want.sort_by(|a, b| {
            (&a.key, a.initiated, a.upload_id).cmp(&(&b.key, b.initiated, b.upload_id))
        });
        let ids = |v: &[UploadInfo]| v.iter().map(|u| u.upload_id).collect::<Vec<_>>();
        assert_eq!(ids(&listed), ids(&want));
        let mut made_ids: Vec<_> = made.iter().map(|(_, id)| *id).collect();
        made_ids.sort();
        let mut got = ids(&listed);
        got.sort();
        assert_eq!(got, made_ids);
        assert!(listed.iter().any(|u| u.upload_id == cid && u.key == ck));

        // Prefix, and a key marker alone (after every upload of that key).
        assert_eq!(all_pages(&s, t, "k3", 2).await.len(), 40 / 7 + 1);
        let after = s
            .list_uploads_page(t, "b", "", Some("k5"), None, 100)
            .await
            .unwrap();
        assert!(after.uploads.iter().all(|u| u.key.as_str() > "k5"));
        assert_eq!(after.uploads.len(), 40 / 7);

        // A marker upload aborted between pages: nothing after it is skipped.
        let k1: Vec<_> = listed.iter().filter(|u| u.key == "k1").cloned().collect();
        s.abort_upload(t, "b", "k1", k1[1].upload_id).await.unwrap();
        let page = s
            .list_uploads_page(t, "b", "", Some("k1"), Some(k1[1].upload_id), 100)
            .await
            .unwrap();
        for u in &k1[2..] {
            assert!(page.uploads.iter().any(|p| p.upload_id == u.upload_id));
        }
    }

    /// Uploads older than the cutoff are aborted with their parts' data freed; newer
    /// ones stay. Uploads from before the index existed are indexed once at open.
    #[tokio::test]
    async fn abandoned_uploads_expire_and_free_their_parts() {
        let dir = tempfile::tempdir().unwrap();
        let (s, t) = setup(dir.path()).await;
        let old = s
            .create_upload(t, "b", "old", ObjectMeta::default())
            .await
            .unwrap();
        let body: ByteStream =
            Box::pin(futures::stream::iter([Ok(Bytes::from(vec![1u8; 200_000]))]));
        s.upload_part(t, "b", "old", old, 1, body, None)
            .await
            .unwrap();
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        let cutoff = now_millis();
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        let young = s
            .create_upload(t, "b", "young", ObjectMeta::default())
            .await
            .unwrap();
        let chunks = s.engine().chunks().clone();
        let count = move || chunks.list_all().unwrap().len();
        assert_eq!(count(), 1);

        // Forget the index (as a store from before it), then index again.
        s.engine()
            .write(vec![], |ctx| {
                ctx.txn.open_table(META)?.remove(UPLOAD_INDEX_MARK)?;
                ctx.txn.open_table(UPLOADS_BY_KEY)?.retain(|_, _| false)?;
                ctx.txn.open_table(UPLOADS_BY_AGE)?.retain(|_, _| false)?;
                Ok(())
            })
            .await
            .unwrap();
        assert_eq!(s.index_uploads().await.unwrap(), 2);
        assert_eq!(s.index_uploads().await.unwrap(), 0, "only once");

        assert_eq!(s.expire_uploads(cutoff, 1000).await.unwrap(), 1);
        assert_eq!(s.expire_uploads(cutoff, 1000).await.unwrap(), 0);
        assert!(matches!(
            s.list_parts(t, "b", "old", old).await,
            Err(Error::NoSuchUpload)
        ));
        let left = s
            .list_uploads_page(t, "b", "", None, None, 10)
            .await
            .unwrap();
        assert_eq!(left.uploads.len(), 1);
        assert_eq!(left.uploads[0].upload_id, young);
        // The part's chunk goes once the removal grace has passed.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while count() > 0 && std::time::Instant::now() < deadline {
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        }
        assert_eq!(count(), 0, "the expired upload's data was not freed");
        // The bucket can be deleted once the remaining upload is aborted.
        s.abort_upload(t, "b", "young", young).await.unwrap();
        s.delete_bucket(t, "b").await.unwrap();
    }

    /// DeleteBucket aborts the uploads in progress (in batches: more than one commit's
    /// worth here) and frees their parts; with an object in the bucket it is refused
    /// and aborts nothing.
    #[tokio::test]
    async fn delete_bucket_aborts_uploads_in_progress() {
        let dir = tempfile::tempdir().unwrap();
        let (s, t) = setup(dir.path()).await;
        let chunks = s.engine().chunks().clone();
        let count = move || chunks.list_all().unwrap().len();
        let mut ids = Vec::new();
        for i in 0..150 {
            let key = format!("k{i:03}");
            let up = s
                .create_upload(t, "b", &key, ObjectMeta::default())
                .await
                .unwrap();
            if i % 50 == 0 {
                let body: ByteStream =
                    Box::pin(futures::stream::iter([Ok(Bytes::from(vec![7u8; 10_000]))]));
                s.upload_part(t, "b", &key, up, 1, body, None)
                    .await
                    .unwrap();
            }
            ids.push((key, up));
        }
        assert_eq!(count(), 3);
        let one: ByteStream = Box::pin(futures::stream::iter([Ok(Bytes::from_static(b"x"))]));
        s.put_object(
            t,
            "b",
            "obj",
            one,
            None,
            ObjectMeta::default(),
            Conditions::default(),
        )
        .await
        .unwrap();
        assert!(matches!(
            s.delete_bucket(t, "b").await,
            Err(Error::BucketNotEmpty)
        ));
        let page = s
            .list_uploads_page(t, "b", "", None, None, 1000)
            .await
            .unwrap();
        assert_eq!(
            page.uploads.len(),
            150,
            "a refused DeleteBucket aborted uploads"
        );
        s.delete_object(t, "b", "obj").await.unwrap();
        s.delete_bucket(t, "b").await.unwrap();
        assert!(matches!(s.bucket(t, "b").await, Err(Error::NoSuchBucket)));
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while count() > 0 && std::time::Instant::now() < deadline {
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        }
        assert_eq!(count(), 0, "the aborted uploads' parts were not freed");
        // A bucket of the same name starts without them.
        s.create_bucket(t, "b").await.unwrap();
        let page = s
            .list_uploads_page(t, "b", "", None, None, 1000)
            .await
            .unwrap();
        assert!(page.uploads.is_empty());
        let (key, up) = &ids[0];
        assert!(matches!(
            s.list_parts(t, "b", key, *up).await,
            Err(Error::NoSuchUpload)
        ));
    }

    /// A conditional PUT whose condition held when it started (checked before its body
    /// is read) but that another write overtook while its body streamed in is a
    /// conflict (409), not a failed precondition, and leaves no data behind.
    #[tokio::test]
    async fn a_conditional_put_overtaken_during_its_upload_is_a_conflict() {
        use futures::{SinkExt, StreamExt};
        let dir = tempfile::tempdir().unwrap();
        let (s, t) = setup(dir.path()).await;
        let (mut tx, mut rx) = futures::channel::mpsc::channel::<std::io::Result<Bytes>>(1);
        let (polled_tx, polled_rx) = futures::channel::oneshot::channel::<()>();
        let mut polled = Some(polled_tx);
        // Signals its first poll: the condition has been checked by then.
        let body: ByteStream = Box::pin(futures::stream::poll_fn(move |cx| {
            if let Some(p) = polled.take() {
                let _ = p.send(());
            }
            rx.poll_next_unpin(cx)
        }));
        let cond = Conditions {
            if_none_match: Some(vec!["*".into()]),
            ..Default::default()
        };
        let put = tokio::spawn({
            let s = s.clone();
            async move {
                s.put_object(t, "b", "k", body, None, ObjectMeta::default(), cond)
                    .await
            }
        });
        polled_rx.await.unwrap();
        let chunks = s.engine().chunks().clone();
        let one: ByteStream = Box::pin(futures::stream::iter([Ok(Bytes::from_static(b"w"))]));
        s.put_object(
            t,
            "b",
            "k",
            one,
            None,
            ObjectMeta::default(),
            Conditions::default(),
        )
        .await
        .unwrap();
        tx.send(Ok(Bytes::from(vec![1u8; 200_000]))).await.unwrap();
        drop(tx);
        let r = put.await.unwrap();
        assert!(matches!(r, Err(Error::ConditionalRequestConflict)), "{r:?}");
        let (rec, _, _) = s
            .get_object(t, "b", "k", None, &Conditions::default())
            .await
            .unwrap();
        assert_eq!(rec.size, 1, "the winner's object stays");
        assert_eq!(
            chunks.list_all().unwrap().len(),
            0,
            "the loser's data is gone"
        );
        // Checked before the body: a condition that already fails is a plain 412.
        let cond = Conditions {
            if_none_match: Some(vec!["*".into()]),
            ..Default::default()
        };
        let two: ByteStream = Box::pin(futures::stream::iter([Ok(Bytes::from_static(b"x"))]));
        let r = s
            .put_object(t, "b", "k", two, None, ObjectMeta::default(), cond)
            .await;
        assert!(matches!(r, Err(Error::PreconditionFailed)), "{r:?}");
    }

    /// Tags and a checksum declared at CreateMultipartUpload reach the completed
    /// object, with its part sizes; a part whose checksum is wrong is refused.
    #[tokio::test]
    async fn multipart_objects_keep_tags_part_sizes_and_checksums() {
        use crate::model::checksum::{ChecksumCheck, Expected};
        let dir = tempfile::tempdir().unwrap();
        let (s, t) = setup(dir.path()).await;
        let ext = UploadExt {
            tags: vec![("team".into(), "web".into())],
            checksum: Some((ChecksumAlgorithm::Crc32, true)),
        };
        let up = s
            .create_upload_ext(t, "b", "mp", ObjectMeta::default(), ext)
            .await
            .unwrap();
        let p1 = vec![3u8; MIN_PART_SIZE as usize];
        let body =
            |b: Vec<u8>| -> ByteStream { Box::pin(futures::stream::iter([Ok(Bytes::from(b))])) };
        let bad = s
            .upload_part_ext(
                t,
                "b",
                "mp",
                up,
                1,
                body(p1.clone()),
                None,
                Some(ChecksumCheck {
                    algorithm: ChecksumAlgorithm::Crc32,
                    expected: Expected::Value("AAAAAA==".into()),
                }),
                None,
            )
            .await;
        assert!(matches!(bad, Err(Error::BadChecksum("CRC32"))), "{bad:?}");
        let r1 = s
            .upload_part_ext(t, "b", "mp", up, 1, body(p1.clone()), None, None, None)
            .await
            .unwrap();
        assert!(
            r1.ext.checksum.is_some(),
            "computed for the upload's algorithm"
        );
        let r2 = s
            .upload_part_ext(
                t,
                "b",
                "mp",
                up,
                2,
                body(b"tail".to_vec()),
                None,
                None,
                None,
            )
            .await
            .unwrap();
        let parts = vec![(1, r1.etag()), (2, r2.etag())];
        let (_, size, sum) = s
            .complete_upload_ext(t, "b", "mp", up, parts, Conditions::default(), None)
            .await
            .unwrap();
        assert_eq!(size, MIN_PART_SIZE + 4);
        let mut whole = p1.clone();
        whole.extend_from_slice(b"tail");
        let expect = base64::Engine::encode(
            &base64::engine::general_purpose::STANDARD,
            &crc_fast::checksum(crc_fast::CrcAlgorithm::Crc32IsoHdlc, &whole).to_be_bytes()[4..],
        );
        assert_eq!(
            sum.unwrap().value,
            expect,
            "FULL_OBJECT = CRC32 of all the bytes"
        );
        let o = s.head_object(t, "b", "mp").await.unwrap();
        assert_eq!(o.ext.tags, vec![("team".to_string(), "web".to_string())]);
        assert_eq!(o.ext.part_sizes, vec![MIN_PART_SIZE, 4]);
        let r = crate::model::object::part_range(&o, 2).unwrap();
        assert_eq!(r, MIN_PART_SIZE..MIN_PART_SIZE + 4);
        assert!(matches!(
            crate::model::object::part_range(&o, 3),
            Err(Error::InvalidPartNumber(3))
        ));
        s.set_object_tags(t, "b", "mp", vec![]).await.unwrap();
        let o2 = s.head_object(t, "b", "mp").await.unwrap();
        assert!(o2.ext.tags.is_empty());
        assert_eq!((o2.etag, o2.last_modified), (o.etag, o.last_modified));
    }
}
