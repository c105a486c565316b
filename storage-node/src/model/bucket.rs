//! Buckets: per-tenant names mapped to bucket incarnations (catalog) whose objects live
//! in one partition of the engine.

use std::sync::atomic::Ordering;

use redb::ReadableTable;

use super::{Error, PartitionSet, Result, Store};
use crate::catalog::{Bucket, CatalogError};
use crate::engine::{DEAD_BUCKETS, EngineError, OBJECTS, UPLOADS, keys, usage};
use crate::types::{PartitionId, TenantId};

impl Store {
    /// The bucket named `name` of `tenant`, or `NoSuchBucket`.
    pub async fn bucket(&self, tenant: TenantId, name: &str) -> Result<Bucket> {
        let cache_key = (tenant, name.to_string());
        if let Some(b) = self.inner.buckets.read().await.get(&cache_key) {
            return Ok(b.clone());
        }
        let epoch = self.inner.bucket_epoch.load(Ordering::SeqCst);
        let b = self
            .inner
            .catalog
            .bucket(tenant, name)
            .await?
            .ok_or(Error::NoSuchBucket)?;
        let mut cache = self.inner.buckets.write().await;
        if self.inner.bucket_epoch.load(Ordering::SeqCst) == epoch {
            cache.insert(cache_key, b.clone());
        }
        Ok(b)
    }

    /// Records a create or delete of `name` in the cache (the catalog already has it).
    async fn bucket_changed(&self, tenant: TenantId, name: &str, now: Option<Bucket>) {
        let mut cache = self.inner.buckets.write().await;
        self.inner.bucket_epoch.fetch_add(1, Ordering::SeqCst);
        match now {
            Some(b) => cache.insert((tenant, name.to_string()), b),
            None => cache.remove(&(tenant, name.to_string())),
        };
    }

    pub async fn create_bucket(&self, tenant: TenantId, name: &str) -> Result<Bucket> {
        // Admitted before the node-wide DDL lock: a quota check (perhaps an RPC or a
        // measurement) must not hold up other tenants' bucket changes.
        let one = crate::tenancy::quota::Amount {
            buckets: 1,
            ..Default::default()
        };
        let admitted = match self.admit(tenant, one).await {
            // Creating a bucket the tenant already has is no new bucket.
            Err(Error::QuotaExceeded(_)) if self.bucket(tenant, name).await.is_ok() => {
                return Err(Error::BucketAlreadyOwnedByYou);
            }
            r => r?,
        };
        let _ddl = self.inner.bucket_ddl.lock().await;
        match self.inner.catalog.create_bucket(tenant, name).await {
            Ok(b) => {
                admitted.committed();
                self.bucket_changed(tenant, name, Some(b.clone())).await;
                Ok(b)
            }
            Err(CatalogError::Conflict(_)) => {
                admitted.release();
                Err(Error::BucketAlreadyOwnedByYou)
            }
            // The catalog may or may not have created it: counted (the safe side).
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
        let prefix = keys::bucket_prefix(self.led_partition(tenant, name)?, b.id);
        let gone = prefix.clone();
        // The emptiness check and the tombstone in one group commit: a PUT or upload
        // committed before it makes the bucket non-empty, one committed after it is
        // refused (see `bucket_is_dead`). Only this commit can refuse the delete.
        let empty = self
            .inner
            .engine
            .write(vec![], move |ctx| {
                let t = ctx.txn.open_table(OBJECTS)?;
                if let Some(first) = t.range(prefix.as_slice()..)?.next() {
                    let (k, _) = first?;
                    if k.value().starts_with(&prefix) {
                        return Ok(false);
                    }
                }
                drop(t);
                ctx.txn
                    .open_table(DEAD_BUCKETS)?
                    .insert(prefix.as_slice(), ())?;
                Ok(true)
            })
            .await?;
        if !empty {
            return Err(Error::BucketNotEmpty);
        }
        // S3 aborts a bucket's multipart uploads in progress with the bucket: no new
        // one can start now, so this ends. If it fails (an upload record that does not
        // decode), the bucket takes writes again and the error is answered; a crash
        // here leaves a dead bucket that a retried DeleteBucket finishes.
        if let Err(e) = self.abort_uploads_under(gone.clone()).await {
            self.lift_tombstone(gone).await;
            return Err(e);
        }
        if let Err(e) = self.inner.catalog.delete_bucket(tenant, b.id).await {
            // The bucket stays: writes into it are allowed again.
            self.lift_tombstone(gone).await;
            return Err(e.into());
        }
        self.quotas().freed(tenant);
        self.bucket_changed(tenant, name, None).await;
        Ok(())
    }

    /// A bucket setting of `kind` (JSON), if set; `NoSuchBucket` for a missing bucket.
    pub async fn bucket_setting(
        &self,
        tenant: TenantId,
        name: &str,
        kind: &str,
    ) -> Result<Option<String>> {
        let b = self.bucket(tenant, name).await?;
        Ok(self.inner.catalog.bucket_setting(b.id, kind).await?)
    }

    /// Sets or removes a bucket setting of `kind`.
    pub async fn set_bucket_setting(
        &self,
        tenant: TenantId,
        name: &str,
        kind: &str,
        value: Option<&str>,
    ) -> Result<()> {
        let b = self.bucket(tenant, name).await?;
        Ok(self
            .inner
            .catalog
            .set_bucket_setting(b.id, kind, value)
            .await?)
    }

    /// Removes the tombstone of the bucket `prefix` (a delete that did not finish).
    async fn lift_tombstone(&self, prefix: Vec<u8>) {
        let r = self
            .inner
            .engine
            .write(vec![], move |ctx| {
                ctx.txn
                    .open_table(DEAD_BUCKETS)?
                    .remove(prefix.as_slice())?;
                Ok(())
            })
            .await;
        if let Err(e) = r {
            tracing::error!(error = %e, "a failed DeleteBucket could not lift its tombstone");
        }
    }

    /// Aborts every upload under the bucket `prefix`, freeing their parts, in group
    /// commits of at most `ROWS_PER_COMMIT` removed part rows (and at least one
    /// upload), so that neither a commit nor its replication log entry grows with the
    /// number of uploads or parts.
    async fn abort_uploads_under(&self, prefix: Vec<u8>) -> Result<()> {
        const ROWS_PER_COMMIT: usize = 10_000;
        loop {
            let prefix = prefix.clone();
            let (garbage, more) = self
                .inner
                .engine
                .write(vec![], move |ctx| {
                    let mut garbage = Vec::new();
                    let mut rows = 0usize;
                    loop {
                        let next = {
                            let t = ctx.txn.open_table(UPLOADS)?;
                            let mut r = t.range(prefix.as_slice()..)?;
                            match r.next() {
                                Some(e) => {
                                    let (k, v) = e?;
                                    k.value()
                                        .starts_with(&prefix)
                                        .then(|| (k.value().to_vec(), v.value().to_vec()))
                                }
                                None => None,
                            }
                        };
                        let Some((k, v)) = next else {
                            return Ok((garbage, false));
                        };
                        if rows >= ROWS_PER_COMMIT {
                            return Ok((garbage, true));
                        }
                        let up = super::multipart::decode_upload(&v)?;
                        let freed = super::multipart::remove_upload(&ctx.txn, &k, &up)?;
                        rows += 3 + freed.len();
                        garbage.extend(freed);
                    }
                })
                .await?;
            self.discard_chunks(garbage);
            if !more {
                return Ok(());
            }
        }
    }

    /// Deletes the tenant's buckets (with their objects and uploads) and KV keys that
    /// live in the partitions of `set`: this node's share of a cluster-wide purge.
    pub async fn purge_tenant_in(&self, tenant: TenantId, set: &PartitionSet) -> Result<()> {
        for b in self.list_buckets(tenant).await? {
            if !set.contains(self.partition(tenant, &b.name)) {
                continue;
            }
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
            // DeleteBucket aborts the uploads in progress itself.
            self.delete_bucket(tenant, &b.name).await?;
        }
        self.purge_kv_in(tenant, set).await?;
        Ok(())
    }
}

/// What a tenant stores, for the admin API's usage report and quota checks.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Usage {
    pub buckets: u64,
    pub objects: u64,
    /// Every stored byte: objects, parts of multipart uploads in progress, KV entries
    /// (what the `storageBytes` quota limits).
    pub storage_bytes: u64,
    pub kv_keys: u64,
    #[serde(default)]
    pub object_bytes: u64,
    #[serde(default)]
    pub multipart_uploads: u64,
    #[serde(default)]
    pub multipart_bytes: u64,
    /// Namespace, key and value bytes of KV entries.
    #[serde(default)]
    pub kv_bytes: u64,
    /// The part of `storage_bytes` kept on the nodes' disks (counted once, whatever the
    /// replication factor).
    #[serde(default)]
    pub hot_bytes: u64,
    /// The part of `storage_bytes` whose data is in the cold tier (objects only).
    #[serde(default)]
    pub cold_bytes: u64,
}

impl Usage {
    /// Adds another share (saturating: shares come from peers).
    pub fn add(&mut self, o: &Usage) {
        for (a, b) in [
            (&mut self.buckets, o.buckets),
            (&mut self.objects, o.objects),
            (&mut self.storage_bytes, o.storage_bytes),
            (&mut self.kv_keys, o.kv_keys),
            (&mut self.object_bytes, o.object_bytes),
            (&mut self.multipart_uploads, o.multipart_uploads),
            (&mut self.multipart_bytes, o.multipart_bytes),
            (&mut self.kv_bytes, o.kv_bytes),
            (&mut self.cold_bytes, o.cold_bytes),
        ] {
            *a = a.saturating_add(b);
        }
        // Derived, not summed: a peer older than the split reports neither (its bytes
        // count as hot), and the two always add up to the total.
        self.hot_bytes = self.storage_bytes.saturating_sub(self.cold_bytes);
    }
}

impl Store {
    /// A tenant's buckets, objects, bytes and KV keys in the partitions of `set`
    /// (buckets count where their data lives): this node's share of a cluster-wide
    /// report. Read from the usage counters (`engine::usage`): one row per bucket and
    /// per partition, whatever the tenant stores.
    pub async fn tenant_usage_in(&self, tenant: TenantId, set: &PartitionSet) -> Result<Usage> {
        let mut rows: Vec<[u8; 19]> = self
            .list_buckets(tenant)
            .await?
            .iter()
            .map(|b| (self.partition(tenant, &b.name), b.id))
            .filter(|(p, _)| set.contains(*p))
            .map(|(p, id)| usage::bucket_row(p, id))
            .collect();
        let buckets = rows.len() as u64;
        rows.extend(
            (0..self.inner.partitions)
                .map(PartitionId)
                .filter(|p| set.contains(*p))
                .map(|p| usage::kv_row(p, tenant)),
        );
        let c = self.engine().usage_of(rows).await?;
        Ok(Usage {
            buckets,
            objects: c.objects,
            storage_bytes: c.bytes(),
            kv_keys: c.kv_keys,
            object_bytes: c.object_bytes,
            multipart_uploads: c.uploads,
            multipart_bytes: c.part_bytes,
            kv_bytes: c.kv_bytes,
            hot_bytes: c.hot_bytes(),
            cold_bytes: c.cold_bytes,
        })
    }
}

/// Whether the bucket incarnation that engine key `key` (object or upload) lives under
/// was deleted. Called inside the write transaction that would store under it.
pub(super) fn bucket_is_dead(
    txn: &crate::engine::replog::TrackedTxn<'_>,
    key: &[u8],
) -> Result<bool, EngineError> {
    let Some(prefix) = key.get(..keys::BUCKET_PREFIX_LEN) else {
        return Ok(false);
    };
    Ok(txn.open_table(DEAD_BUCKETS)?.get(prefix)?.is_some())
}

#[cfg(test)]
mod tests {
    use bytes::Bytes;
    use futures::SinkExt;

    use super::*;
    use crate::catalog::TenantSpec;
    use crate::model::{ByteStream, Conditions, ObjectMeta, test_store};

    fn files_under(p: &std::path::Path) -> usize {
        std::fs::read_dir(p)
            .into_iter()
            .flatten()
            .flatten()
            .map(|e| {
                let p = e.path();
                if p.is_dir() { files_under(&p) } else { 1 }
            })
            .sum()
    }

    /// The PUT resolved the bucket and is still receiving its body when the bucket is
    /// deleted (it was empty): the PUT must fail and leave no data behind.
    #[tokio::test]
    async fn a_put_racing_delete_bucket_is_refused_and_leaves_no_data() {
        let dir = tempfile::tempdir().unwrap();
        let s = test_store(dir.path()).await;
        let tenant = s
            .catalog()
            .create_tenant("t", &TenantSpec::default())
            .await
            .unwrap()
            .id;
        s.create_bucket(tenant, "b").await.unwrap();
        let (mut tx, rx) = futures::channel::mpsc::channel::<std::io::Result<Bytes>>(1);
        let body: ByteStream = Box::pin(rx);
        let put = tokio::spawn({
            let s = s.clone();
            async move {
                s.put_object(
                    tenant,
                    "b",
                    "k",
                    body,
                    None,
                    ObjectMeta::default(),
                    Conditions::default(),
                )
                .await
            }
        });
        tx.send(Ok(Bytes::from(vec![1u8; 3 << 20]))).await.unwrap();
        tx.send(Ok(Bytes::from(vec![2u8; 1 << 20]))).await.unwrap();
        s.delete_bucket(tenant, "b").await.unwrap();
        tx.send(Ok(Bytes::from(vec![3u8; 1 << 20]))).await.unwrap();
        drop(tx);
        let r = put.await.unwrap();
        assert!(matches!(r, Err(Error::NoSuchBucket)), "{r:?}");
        assert_eq!(
            files_under(&dir.path().join("chunks")),
            0,
            "data left behind"
        );
        // A new bucket of the same name starts empty and takes writes.
        s.create_bucket(tenant, "b").await.unwrap();
        let page = s
            .list_objects(tenant, "b", "", None, None, 10)
            .await
            .unwrap();
        assert!(page.objects.is_empty());
        let one: ByteStream = Box::pin(futures::stream::iter([Ok(Bytes::from_static(b"x"))]));
        s.put_object(
            tenant,
            "b",
            "k",
            one,
            None,
            ObjectMeta::default(),
            Conditions::default(),
        )
        .await
        .unwrap();
    }
}
