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
