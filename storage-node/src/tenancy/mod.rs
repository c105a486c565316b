//! Tenancy: who a request acts for. Resolves access keys to tenants (cached, with
//! revocation taking effect at once on this node and within [`KEY_CACHE_TTL`] on
//! others). Quotas, rate limits and I/O scheduling will live here as well.

pub mod budget;
pub mod quota;
pub mod rate;
pub mod sched;
pub mod sigv4;

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use tokio::sync::RwLock;

use crate::catalog::{Catalog, CatalogError, Credentials};
use crate::types::TenantId;

pub const KEY_CACHE_TTL: Duration = Duration::from_secs(5);

/// Unknown access key ids remembered (for [`KEY_CACHE_TTL`]), so a client repeating a
/// wrong or made-up key costs one catalog read per TTL, not one per request. Bounded: a
/// flood of distinct made-up keys evicts the oldest.
const UNKNOWN_KEYS_MAX: usize = 10_000;

#[derive(Clone)]
pub struct Authenticator {
    catalog: Arc<dyn Catalog>,
    cache: Arc<RwLock<HashMap<String, (Credentials, Instant)>>>,
    /// Bumped (under the `cache` write lock) by every invalidation: a lookup that read
    /// the catalog before a revocation does not cache what it read, so a revoked key
    /// is refused on this node from the next request (as the bucket cache does).
    epoch: Arc<AtomicU64>,
    /// Access key ids the catalog did not know, with when it was asked.
    unknown: Arc<std::sync::Mutex<HashMap<String, Instant>>>,
    /// The tenants' rate limits, checked once a request's tenant is known.
    limits: rate::RateLimits,
}

impl Authenticator {
    pub fn new(catalog: Arc<dyn Catalog>) -> Self {
        Self {
            limits: rate::RateLimits::new(catalog.clone()),
            catalog,
            cache: Arc::default(),
            epoch: Arc::default(),
            unknown: Arc::default(),
        }
    }

    /// The tenants' rate limits (see [`rate`]).
    pub fn limits(&self) -> &rate::RateLimits {
        &self.limits
    }

    /// The live credentials for an access key id, or None if unknown or revoked.
    pub async fn lookup(&self, access_key_id: &str) -> Result<Option<Credentials>, CatalogError> {
        if let Some((c, at)) = self.cache.read().await.get(access_key_id)
            && at.elapsed() < KEY_CACHE_TTL
        {
            return Ok(Some(c.clone()));
        }
        if self
            .unknown
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .get(access_key_id)
            .is_some_and(|at| at.elapsed() < KEY_CACHE_TTL)
        {
            return Ok(None);
        }
        let epoch = self.epoch.load(Ordering::SeqCst);
        let found = self.catalog.lookup_access_key(access_key_id).await?;
        let mut cache = self.cache.write().await;
        match &found {
            Some(c) if self.epoch.load(Ordering::SeqCst) == epoch => {
                cache.insert(access_key_id.to_string(), (c.clone(), Instant::now()));
            }
            Some(_) => {}
            None => {
                cache.remove(access_key_id);
                self.remember_unknown(access_key_id);
            }
        }
        Ok(found)
    }

    pub async fn tenant_of(&self, access_key_id: &str) -> Result<Option<TenantId>, CatalogError> {
        Ok(self.lookup(access_key_id).await?.map(|c| c.tenant_id))
    }

    fn remember_unknown(&self, access_key_id: &str) {
        let mut unknown = self
            .unknown
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if unknown.len() >= UNKNOWN_KEYS_MAX {
            unknown.retain(|_, at| at.elapsed() < KEY_CACHE_TTL);
            if unknown.len() >= UNKNOWN_KEYS_MAX {
                // All recent: keep the newer half.
                let mut ages: Vec<Instant> = unknown.values().copied().collect();
                ages.sort_unstable();
                let cut = ages[ages.len() / 2];
                unknown.retain(|_, at| *at >= cut);
            }
        }
        unknown.insert(access_key_id.to_string(), Instant::now());
    }

    /// Forgets a key at once (after revocation or tenant deletion, or its creation: an
    /// id asked for before it existed is not "unknown" any more).
    pub async fn invalidate(&self, access_key_id: &str) {
        let mut cache = self.cache.write().await;
        self.epoch.fetch_add(1, Ordering::SeqCst);
        cache.remove(access_key_id);
        self.unknown
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .remove(access_key_id);
    }

    pub async fn invalidate_tenant(&self, tenant: TenantId) {
        let mut cache = self.cache.write().await;
        self.epoch.fetch_add(1, Ordering::SeqCst);
        cache.retain(|_, (c, _)| c.tenant_id != tenant);
    }

    /// Forgets every access key id remembered as unknown: after a tenant's suspension
    /// ends, its keys (refused as unknown meanwhile) work from the next request.
    pub fn forget_unknown(&self) {
        self.unknown
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clear();
    }
}

#[cfg(test)]
mod tests {
    use async_trait::async_trait;
    use tokio::sync::Notify;

    use super::*;
    use crate::catalog::{
        AccessKey, Bucket, MasterKey, NodeRecord, PartitionState, Result, SqlCatalog, StoredLayout,
        Tenant, TenantSpec,
    };
    use crate::types::{BucketId, Epoch, NodeId};

    /// A real catalog whose key lookups can be held after they have read, to replay
    /// the interleaving of a lookup and a revocation deterministically.
    struct HeldLookups {
        inner: SqlCatalog,
        hold: std::sync::atomic::AtomicBool,
        read_done: Notify,
        release: Notify,
        lookups: AtomicU64,
    }

    #[async_trait]
    impl Catalog for HeldLookups {
        async fn create_tenant(&self, name: &str, spec: &TenantSpec) -> Result<Tenant> {
            self.inner.create_tenant(name, spec).await
        }
        async fn tenant_by_name(&self, name: &str) -> Result<Option<Tenant>> {
            self.inner.tenant_by_name(name).await
        }
        async fn tenant_by_id(&self, id: TenantId) -> Result<Option<Tenant>> {
            self.inner.tenant_by_id(id).await
        }
        async fn list_tenants(&self) -> Result<Vec<Tenant>> {
            self.inner.list_tenants().await
        }
        async fn update_tenant(&self, name: &str, spec: &TenantSpec) -> Result<Tenant> {
            self.inner.update_tenant(name, spec).await
        }
        async fn delete_tenant(&self, id: TenantId) -> Result<()> {
            self.inner.delete_tenant(id).await
        }
        async fn create_access_key(&self, t: TenantId, d: &str) -> Result<Credentials> {
            self.inner.create_access_key(t, d).await
        }
        async fn list_access_keys(&self, t: TenantId) -> Result<Vec<AccessKey>> {
            self.inner.list_access_keys(t).await
        }
        async fn revoke_access_key(&self, t: TenantId, k: &str) -> Result<bool> {
            self.inner.revoke_access_key(t, k).await
        }
        async fn lookup_access_key(&self, k: &str) -> Result<Option<Credentials>> {
            self.lookups.fetch_add(1, Ordering::SeqCst);
            let found = self.inner.lookup_access_key(k).await;
            if self.hold.swap(false, std::sync::atomic::Ordering::SeqCst) {
                self.read_done.notify_one();
                self.release.notified().await;
            }
            found
        }
        async fn create_bucket(&self, t: TenantId, name: &str) -> Result<Bucket> {
            self.inner.create_bucket(t, name).await
        }
        async fn bucket(&self, t: TenantId, name: &str) -> Result<Option<Bucket>> {
            self.inner.bucket(t, name).await
        }
        async fn list_buckets(&self, t: TenantId) -> Result<Vec<Bucket>> {
            self.inner.list_buckets(t).await
        }
        async fn delete_bucket(&self, t: TenantId, id: BucketId) -> Result<()> {
            self.inner.delete_bucket(t, id).await
        }
        async fn bucket_setting(&self, b: BucketId, kind: &str) -> Result<Option<String>> {
            self.inner.bucket_setting(b, kind).await
        }
        async fn set_bucket_setting(&self, b: BucketId, k: &str, v: Option<&str>) -> Result<()> {
            self.inner.set_bucket_setting(b, k, v).await
        }
        async fn upsert_node(&self, n: &NodeRecord) -> Result<()> {
            self.inner.upsert_node(n).await
        }
        async fn list_nodes(&self) -> Result<Vec<NodeRecord>> {
            self.inner.list_nodes().await
        }
        async fn heartbeat(&self, id: &NodeId) -> Result<bool> {
            self.inner.heartbeat(id).await
        }
        async fn now_millis(&self) -> Result<i64> {
            self.inner.now_millis().await
        }
        async fn latest_layout(&self) -> Result<Option<StoredLayout>> {
            self.inner.latest_layout().await
        }
        async fn latest_layout_version(&self) -> Result<Option<u64>> {
            self.inner.latest_layout_version().await
        }
        async fn insert_layout(&self, layout: &StoredLayout, partitions: u16) -> Result<bool> {
            self.inner.insert_layout(layout, partitions).await
        }
        async fn partition_states(&self) -> Result<Vec<PartitionState>> {
            self.inner.partition_states().await
        }
        async fn cas_partition_state(
            &self,
            expected: Option<Epoch>,
            next: &PartitionState,
        ) -> Result<bool> {
            self.inner.cas_partition_state(expected, next).await
        }
        async fn init_partition_states(&self, initial: &[PartitionState]) -> Result<u64> {
            self.inner.init_partition_states(initial).await
        }
        async fn setting_or_init(&self, k: &str, d: &str) -> Result<String> {
            self.inner.setting_or_init(k, d).await
        }
    }

    async fn held_lookups() -> Arc<HeldLookups> {
        let inner = SqlCatalog::connect("sqlite::memory:", MasterKey::generate())
            .await
            .unwrap();
        Arc::new(HeldLookups {
            inner,
            hold: false.into(),
            read_done: Notify::new(),
            release: Notify::new(),
            lookups: AtomicU64::new(0),
        })
    }

    /// A lookup that read the catalog before a revocation finishes after the cache was
    /// invalidated: the revoked key must not come back into the cache.
    #[tokio::test]
    async fn a_lookup_racing_a_revocation_does_not_recache_the_key() {
        let catalog = held_lookups().await;
        let tenant = catalog
            .create_tenant("t", &TenantSpec::default())
            .await
            .unwrap()
            .id;
        let key = catalog.create_access_key(tenant, "k").await.unwrap();
        let auth = Authenticator::new(catalog.clone());

        catalog
            .hold
            .store(true, std::sync::atomic::Ordering::SeqCst);
        let racing = tokio::spawn({
            let auth = auth.clone();
            let id = key.access_key_id.clone();
            async move { auth.lookup(&id).await }
        });
        catalog.read_done.notified().await;
        // The lookup has read the live key; now the key is revoked and evicted.
        assert!(
            catalog
                .revoke_access_key(tenant, &key.access_key_id)
                .await
                .unwrap()
        );
        auth.invalidate(&key.access_key_id).await;
        catalog.release.notify_one();
        let in_flight = racing.await.unwrap().unwrap();
        assert!(
            in_flight.is_some(),
            "the in-flight lookup predates the revoke"
        );
        assert!(
            auth.lookup(&key.access_key_id).await.unwrap().is_none(),
            "the revoked key is still accepted on this node"
        );
    }

    /// A made-up key repeated costs one catalog read per TTL; a key created after it was
    /// asked for works at once on the node that created it (invalidate); a flood of
    /// distinct made-up keys stays bounded in memory.
    #[tokio::test]
    async fn unknown_keys_are_remembered_briefly_and_boundedly() {
        let catalog = held_lookups().await;
        let auth = Authenticator::new(catalog.clone());
        for _ in 0..100 {
            assert!(auth.lookup("GKMADEUP").await.unwrap().is_none());
        }
        assert_eq!(catalog.lookups.load(Ordering::SeqCst), 1);

        let tenant = catalog
            .create_tenant("t", &TenantSpec::default())
            .await
            .unwrap()
            .id;
        let key = catalog.create_access_key(tenant, "k").await.unwrap();
        assert!(auth.lookup(&key.access_key_id).await.unwrap().is_some());
        let id = key.access_key_id.clone();
        // Asked for before it existed (as a client configured too early would):
        let fresh = Authenticator::new(catalog.clone());
        fresh.remember_unknown(&id);
        assert!(fresh.lookup(&id).await.unwrap().is_none());
        fresh.invalidate(&id).await;
        assert!(fresh.lookup(&id).await.unwrap().is_some());

        for i in 0..(UNKNOWN_KEYS_MAX + 5_000) {
            auth.remember_unknown(&format!("GKFLOOD{i}"));
        }
        let held = auth.unknown.lock().unwrap().len();
        assert!(held <= UNKNOWN_KEYS_MAX, "{held}");
        assert!(
            auth.unknown
                .lock()
                .unwrap()
                .contains_key(&format!("GKFLOOD{}", UNKNOWN_KEYS_MAX + 4_999))
        );
    }
}
