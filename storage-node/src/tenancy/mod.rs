//! Tenancy: who a request acts for. Resolves access keys to tenants (cached, with
//! revocation taking effect at once on this node and within [`KEY_CACHE_TTL`] on
//! others). Quotas, rate limits and I/O scheduling will live here as well.

pub mod sigv4;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::RwLock;

use crate::catalog::{Catalog, CatalogError, Credentials};
use crate::types::TenantId;

pub const KEY_CACHE_TTL: Duration = Duration::from_secs(5);

#[derive(Clone)]
pub struct Authenticator {
    catalog: Arc<dyn Catalog>,
    cache: Arc<RwLock<HashMap<String, (Credentials, Instant)>>>,
}

impl Authenticator {
    pub fn new(catalog: Arc<dyn Catalog>) -> Self {
        Self {
            catalog,
            cache: Arc::default(),
        }
    }

    /// The live credentials for an access key id, or None if unknown or revoked.
    pub async fn lookup(&self, access_key_id: &str) -> Result<Option<Credentials>, CatalogError> {
        if let Some((c, at)) = self.cache.read().await.get(access_key_id)
            && at.elapsed() < KEY_CACHE_TTL
        {
            return Ok(Some(c.clone()));
        }
        let found = self.catalog.lookup_access_key(access_key_id).await?;
        let mut cache = self.cache.write().await;
        match &found {
            Some(c) => {
                cache.insert(access_key_id.to_string(), (c.clone(), Instant::now()));
            }
            None => {
                cache.remove(access_key_id);
            }
        }
        Ok(found)
    }

    pub async fn tenant_of(&self, access_key_id: &str) -> Result<Option<TenantId>, CatalogError> {
        Ok(self.lookup(access_key_id).await?.map(|c| c.tenant_id))
    }

    /// Forgets a key at once (after revocation or tenant deletion).
    pub async fn invalidate(&self, access_key_id: &str) {
        self.cache.write().await.remove(access_key_id);
    }

    pub async fn invalidate_tenant(&self, tenant: TenantId) {
        self.cache
            .write()
            .await
            .retain(|_, (c, _)| c.tenant_id != tenant);
    }
}
