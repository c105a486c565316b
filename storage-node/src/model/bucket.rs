//! Buckets: per-tenant names mapped to bucket incarnations (catalog) whose objects live
//! in one partition of the engine.

use super::{Error, Result, Store};
use crate::catalog::{Bucket, CatalogError};
use crate::engine::{EngineError, OBJECTS, UPLOADS, keys};
use crate::types::TenantId;

impl Store {
    /// The bucket named `name` of `tenant`, or `NoSuchBucket`.
    pub async fn bucket(&self, tenant: TenantId, name: &str) -> Result<Bucket> {
        let cache_key = (tenant, name.to_string());
        if let Some(b) = self.inner.buckets.read().await.get(&cache_key) {
            return Ok(b.clone());
        }
        let b = self
            .inner
            .catalog
            .bucket(tenant, name)
            .await?
            .ok_or(Error::NoSuchBucket)?;
        self.inner
            .buckets
            .write()
            .await
            .insert(cache_key, b.clone());
        Ok(b)
    }

    pub async fn create_bucket(&self, tenant: TenantId, name: &str) -> Result<Bucket> {
        let _ddl = self.inner.bucket_ddl.lock().await;
        match self.inner.catalog.create_bucket(tenant, name).await {
            Ok(b) => Ok(b),
            Err(CatalogError::Conflict(_)) => Err(Error::BucketAlreadyOwnedByYou),
            Err(e) => Err(e.into()),
        }
    }

    pub async fn list_buckets(&self, tenant: TenantId) -> Result<Vec<Bucket>> {
        Ok(self.inner.catalog.list_buckets(tenant).await?)
    }

    /// Deletes an empty bucket (no objects and no multipart uploads in progress).
    pub async fn delete_bucket(&self, tenant: TenantId, name: &str) -> Result<()> {
        let _ddl = self.inner.bucket_ddl.lock().await;
        let b = self.bucket(tenant, name).await?;
        let prefix = keys::bucket_prefix(self.partition(tenant, name), b.id);
        let empty = self
            .inner
            .engine
            .read(move |txn| {
                for table in [OBJECTS, UPLOADS] {
                    let t = txn.open_table(table).map_err(EngineError::from)?;
                    if let Some(first) = t
                        .range(prefix.as_slice()..)
                        .map_err(EngineError::from)?
                        .next()
                    {
                        let (k, _) = first.map_err(EngineError::from)?;
                        if k.value().starts_with(&prefix) {
                            return Ok(false);
                        }
                    }
                }
                Ok(true)
            })
            .await?;
        if !empty {
            return Err(Error::BucketNotEmpty);
        }
        self.inner.catalog.delete_bucket(tenant, b.id).await?;
        self.inner
            .buckets
            .write()
            .await
            .remove(&(tenant, name.to_string()));
        Ok(())
    }

    /// Deletes every bucket, object and KV key of a tenant (admin purge).
    pub async fn purge_tenant(&self, tenant: TenantId) -> Result<()> {
        for b in self.list_buckets(tenant).await? {
            loop {
                let page = self
                    .list_objects(tenant, &b.name, "", None, None, 1000)
                    .await?;
                for (key, _) in &page.objects {
                    self.delete_object(tenant, &b.name, key).await?;
                }
                if !page.is_truncated {
                    break;
                }
            }
            for u in self.list_uploads(tenant, &b.name).await? {
                self.abort_upload(tenant, &b.name, &u.key, u.upload_id)
                    .await?;
            }
            self.delete_bucket(tenant, &b.name).await?;
        }
        self.purge_kv(tenant).await?;
        Ok(())
    }
}

/// What a tenant stores, for the admin API's usage report.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Usage {
    pub buckets: u64,
    pub objects: u64,
    pub storage_bytes: u64,
    pub kv_keys: u64,
}

impl Store {
    /// Counts a tenant's buckets, objects, bytes and KV keys by scanning its ranges.
    /// Exact but proportional to the tenant's size; quota enforcement will keep running
    /// counters instead (see docs/design.md).
    pub async fn tenant_usage(&self, tenant: TenantId) -> Result<Usage> {
        let buckets = self.list_buckets(tenant).await?;
        let prefixes: Vec<Vec<u8>> = buckets
            .iter()
            .map(|b| keys::bucket_prefix(self.partition(tenant, &b.name), b.id))
            .collect();
        let n = buckets.len() as u64;
        let usage = self
            .engine()
            .read(move |txn| {
                use redb::ReadableTable;
                let mut u = Usage {
                    buckets: n,
                    ..Default::default()
                };
                let t = txn.open_table(OBJECTS)?;
                for p in &prefixes {
                    let end = keys::prefix_end(p).unwrap_or_default();
                    for e in t.range(p.as_slice()..end.as_slice())? {
                        let (_, v) = e?;
                        u.objects += 1;
                        u.storage_bytes += super::object::decode_record(v.value())
                            .map(|r| r.size)
                            .unwrap_or(0);
                    }
                }
                let kv = txn.open_table(crate::engine::KV)?;
                for e in kv.iter()? {
                    let (k, _) = e?;
                    let k = k.value();
                    if k.len() >= 18 && &k[2..18] == tenant.as_bytes() {
                        u.kv_keys += 1;
                    }
                }
                Ok(u)
            })
            .await?;
        Ok(usage)
    }
}
