//! Multipart uploads: parts are written as chunk files under an upload record and
//! stitched into one object, without copying data, when the upload completes.

use md5::{Digest, Md5};
use redb::ReadableTable;
use serde::{Deserialize, Serialize};

use super::data::{self, ByteStream, ObjectData};
use super::object::{
    Conditions, ObjectMeta, ObjectRecord, check_key, decode_record, decode_stored, encode,
};
use super::{Error, Result, Store};
use crate::engine::{ChunkRef, EngineError, OBJECTS, PARTS, UPLOADS, keys};
use crate::types::{TenantId, UploadId, now_millis};

/// Every part but the last must be at least this large (S3 rule).
pub const MIN_PART_SIZE: u64 = 5 * 1024 * 1024;
pub const MAX_PART_NUMBER: u32 = 10_000;

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct UploadRecord {
    pub key: String,
    pub meta: ObjectMeta,
    pub initiated: i64,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct PartRecord {
    pub size: u64,
    pub md5: [u8; 16],
    pub last_modified: i64,
    pub chunks: Vec<ChunkRef>,
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

fn decode_upload(b: &[u8]) -> Result<UploadRecord, EngineError> {
    decode_stored("upload", b).map_err(EngineError::Db)
}

fn decode_part(b: &[u8]) -> Result<PartRecord, EngineError> {
    decode_stored("part", b).map_err(EngineError::Db)
}

impl Store {
    async fn upload_key(
        &self,
        tenant: TenantId,
        bucket: &str,
        upload: UploadId,
    ) -> Result<(crate::types::PartitionId, crate::types::BucketId, Vec<u8>)> {
        let b = self.bucket(tenant, bucket).await?;
        let p = self.partition(tenant, bucket);
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
        check_key(key)?;
        let id = UploadId::random();
        let (_, _, ukey) = self.upload_key(tenant, bucket, id).await?;
        let rec = UploadRecord {
            key: key.to_string(),
            meta,
            initiated: now_millis(),
        };
        self.engine()
            .write(vec![], move |ctx| {
                if super::bucket::bucket_is_dead(ctx.txn, &ukey)? {
                    return Ok(Err(Error::NoSuchBucket));
                }
                ctx.txn
                    .open_table(UPLOADS)?
                    .insert(ukey.as_slice(), encode(&rec)?.as_slice())?;
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
        if !(1..=MAX_PART_NUMBER).contains(&part) {
            return Err(Error::Invalid(format!(
                "part numbers must be 1 to {MAX_PART_NUMBER}"
            )));
        }
        let (p, bid, ukey) = self.upload_key(tenant, bucket, upload).await?;
        self.load_upload(ukey.clone(), key).await?;
        let written = data::write_body_chunked(self.engine().chunks(), p, body).await?;
        if let Some(expected) = content_md5
            && expected != written.md5
        {
            data::abandon(self.engine().chunks(), written.data).await;
            return Err(Error::BadDigest);
        }
        let rec = PartRecord {
            size: written.size,
            md5: written.md5,
            last_modified: now_millis(),
            chunks: written.data.chunks().to_vec(),
        };
        let pkey = keys::part_key(p, bid, upload, part);
        let rec2 = rec.clone();
        let r = self
            .engine()
            .write(written.dirs, move |ctx| {
                // The upload may have been completed or aborted while the data streamed in.
                if ctx.txn.open_table(UPLOADS)?.get(ukey.as_slice())?.is_none() {
                    return Ok(None);
                }
                let mut t = ctx.txn.open_table(PARTS)?;
                let old = t
                    .insert(pkey.as_slice(), encode(&rec2)?.as_slice())?
                    .map(|v| v.value().to_vec());
                Ok(Some(old))
            })
            .await;
        match r {
            Ok(Some(old)) => {
                if let Some(old) = old {
                    self.discard_chunks(decode_part(&old)?.chunks);
                }
                Ok(rec)
            }
            Ok(None) => {
                data::abandon(self.engine().chunks(), written.data).await;
                Err(Error::NoSuchUpload)
            }
            Err(e) => {
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
        if parts.is_empty() {
            return Err(Error::Invalid("you must specify at least one part".into()));
        }
        if parts.windows(2).any(|w| w[0].0 >= w[1].0) {
            return Err(Error::InvalidPartOrder);
        }
        let (p, bid, ukey) = self.upload_key(tenant, bucket, upload).await?;
        let okey = keys::object_key(p, bid, key);
        let key = key.to_string();
        let r = self
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
                    chunks.extend(part.chunks.iter().cloned());
                }
                let mut objects = ctx.txn.open_table(OBJECTS)?;
                let current = match objects.get(okey.as_slice())? {
                    Some(v) => {
                        Some(decode_record(v.value()).map_err(|e| EngineError::Db(e.to_string()))?)
                    }
                    None => None,
                };
                if let Err(e) = cond.check_write(current.as_ref()) {
                    return Ok(Err(e));
                }
                let etag = format!("{}-{}", hex::encode(md5s.finalize()), parts.len());
                let used: std::collections::HashSet<_> = parts.iter().map(|(n, _)| *n).collect();
                let mut garbage: Vec<ChunkRef> = stored
                    .into_iter()
                    .filter(|(n, _)| !used.contains(n))
                    .flat_map(|(_, p)| p.chunks)
                    .collect();
                if let Some(c) = current {
                    garbage.extend(c.data.into_chunks());
                }
                let version = ctx.next_seq();
                let rec = ObjectRecord {
                    size,
                    etag: etag.clone(),
                    last_modified: now_millis(),
                    version,
                    meta: up.meta,
                    data: ObjectData::Chunks(chunks),
                };
                objects.insert(okey.as_slice(), encode(&rec)?.as_slice())?;
                ctx.txn.open_table(UPLOADS)?.remove(ukey.as_slice())?;
                let mut pt = ctx.txn.open_table(PARTS)?;
                let end = keys::prefix_end(&ukey).unwrap_or_default();
                pt.retain_in(ukey.as_slice()..end.as_slice(), |_, _| false)?;
                Ok(Ok((etag, size, garbage)))
            })
            .await??;
        let (etag, size, garbage) = r;
        self.discard_chunks(garbage);
        Ok((etag, size))
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
                let mut ut = ctx.txn.open_table(UPLOADS)?;
                let Some(up) = ut.get(ukey.as_slice())?.map(|v| v.value().to_vec()) else {
                    return Ok(Err(Error::NoSuchUpload));
                };
                if decode_upload(&up)?.key != key {
                    return Ok(Err(Error::NoSuchUpload));
                }
                ut.remove(ukey.as_slice())?;
                let mut pt = ctx.txn.open_table(PARTS)?;
                let end = keys::prefix_end(&ukey).unwrap_or_default();
                let mut garbage = Vec::new();
                for e in pt.range(ukey.as_slice()..end.as_slice())? {
                    let (_, v) = e?;
                    garbage.extend(decode_part(v.value())?.chunks);
                }
                pt.retain_in(ukey.as_slice()..end.as_slice(), |_, _| false)?;
                Ok(Ok(garbage))
            })
            .await??;
        self.discard_chunks(garbage);
        Ok(())
    }

    /// Uploads in progress in a bucket, ordered by key, then by initiation time.
    pub async fn list_uploads(&self, tenant: TenantId, bucket: &str) -> Result<Vec<UploadInfo>> {
        let b = self.bucket(tenant, bucket).await?;
        let prefix = keys::bucket_prefix(self.partition(tenant, bucket), b.id);
        let mut out = self
            .engine()
            .read(move |txn| {
                let t = txn.open_table(UPLOADS)?;
                let end = keys::prefix_end(&prefix).unwrap_or_default();
                let mut out = Vec::new();
                for e in t.range(prefix.as_slice()..end.as_slice())? {
                    let (k, v) = e?;
                    let id: [u8; 16] = k.value()[prefix.len()..]
                        .try_into()
                        .map_err(|_| EngineError::Db("bad upload key".into()))?;
                    let rec = decode_upload(v.value())?;
                    out.push(UploadInfo {
                        key: rec.key,
                        upload_id: UploadId(uuid::Uuid::from_bytes(id)),
                        initiated: rec.initiated,
                    });
                }
                Ok(out)
            })
            .await?;
        out.sort_by(|a, b| {
            (&a.key, a.initiated, a.upload_id).cmp(&(&b.key, b.initiated, b.upload_id))
        });
        Ok(out)
    }
}
