//! KV namespaces: per-tenant, binary-safe keys with versioned values.
//!
//! Every write gets a version from the engine's sequence counter, so versions are
//! strictly increasing per key, also across delete and re-create and across restarts.
//! Conditional writes are evaluated inside the group commit: compare-and-set cannot
//! lose an update. Expired values (TTL) read as absent and are removed lazily.

use std::ops::Bound;

use redb::ReadableTable;
use serde::{Deserialize, Serialize};

use super::object::encode;
use super::{Error, Result, Store};
use crate::engine::{EngineError, KV, keys};
use crate::types::{TenantId, now_millis};

pub const MAX_KEY: usize = 1024;
pub const MAX_VALUE: usize = 1024 * 1024;
pub const MAX_NAMESPACE: usize = 63;
pub const MAX_SCAN: usize = 1000;
pub const MAX_BATCH: usize = 100;

#[derive(Clone, Debug, Serialize, Deserialize)]
struct Stored {
    version: u64,
    expires_at: Option<i64>,
    #[serde(with = "serde_bytes")]
    value: Vec<u8>,
    crc: u32,
}

impl Stored {
    fn live(&self, now: i64) -> bool {
        self.expires_at.is_none_or(|t| t > now)
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Entry {
    pub key: Vec<u8>,
    pub version: u64,
    pub expires_at: Option<i64>,
    pub value: Vec<u8>,
}

/// The precondition of a KV write.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum KvCondition {
    #[default]
    None,
    /// Only if the key's current version is this one.
    IfVersion(u64),
    /// Only if the key does not exist.
    IfAbsent,
}

#[derive(Debug, Default)]
pub struct ScanPage {
    pub entries: Vec<Entry>,
    /// Resume after this key to continue; None when the scan is complete.
    pub next_after: Option<Vec<u8>>,
}

pub fn check_namespace(ns: &str) -> Result<()> {
    let ok = !ns.is_empty()
        && ns.len() <= MAX_NAMESPACE
        && ns
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.');
    if ok {
        Ok(())
    } else {
        Err(Error::Invalid(format!(
            "namespace names are 1 to {MAX_NAMESPACE} characters of [A-Za-z0-9._-]"
        )))
    }
}

fn check_key(key: &[u8]) -> Result<()> {
    if key.is_empty() || key.len() > MAX_KEY {
        return Err(Error::Invalid(format!("keys must be 1 to {MAX_KEY} bytes")));
    }
    Ok(())
}

fn decode(b: &[u8]) -> Result<Stored, EngineError> {
    let s: Stored =
        postcard::from_bytes(b).map_err(|e| EngineError::Db(format!("kv record: {e}")))?;
    if crc32c::crc32c(&s.value) != s.crc {
        return Err(EngineError::Db("kv value fails its checksum".into()));
    }
    Ok(s)
}

fn check(cond: KvCondition, current: Option<&Stored>) -> Result<()> {
    match (cond, current) {
        (KvCondition::None, _) => Ok(()),
        (KvCondition::IfVersion(v), Some(c)) if c.version == v => Ok(()),
        (KvCondition::IfAbsent, None) => Ok(()),
        (_, c) => Err(Error::VersionMismatch {
            current: c.map(|c| c.version),
        }),
    }
}

impl Store {
    fn kv_prefix(&self, tenant: TenantId, ns: &str) -> Vec<u8> {
        keys::kv_namespace_prefix(self.partition(tenant, &format!("kv:{ns}")), tenant, ns)
    }

    pub async fn kv_get(&self, tenant: TenantId, ns: &str, key: &[u8]) -> Result<Option<Entry>> {
        let mut many = self.kv_get_many(tenant, ns, vec![key.to_vec()]).await?;
        Ok(many.pop().flatten())
    }

    /// Reads several keys from one consistent snapshot.
    pub async fn kv_get_many(
        &self,
        tenant: TenantId,
        ns: &str,
        keys: Vec<Vec<u8>>,
    ) -> Result<Vec<Option<Entry>>> {
        check_namespace(ns)?;
        if keys.len() > MAX_BATCH {
            return Err(Error::Invalid(format!(
                "at most {MAX_BATCH} keys per batch"
            )));
        }
        for k in &keys {
            check_key(k)?;
        }
        let prefix = self.kv_prefix(tenant, ns);
        let now = now_millis();
        Ok(self
            .engine()
            .read(move |txn| {
                let t = txn.open_table(KV)?;
                let mut out = Vec::with_capacity(keys.len());
                for key in keys {
                    let mut full = prefix.clone();
                    full.extend_from_slice(&key);
                    let e = match t.get(full.as_slice())? {
                        Some(v) => {
                            let s = decode(v.value())?;
                            s.live(now).then_some(Entry {
                                key,
                                version: s.version,
                                expires_at: s.expires_at,
                                value: s.value,
                            })
                        }
                        None => None,
                    };
                    out.push(e);
                }
                Ok(out)
            })
            .await?)
    }

    /// Writes a value; returns its new version.
    pub async fn kv_put(
        &self,
        tenant: TenantId,
        ns: &str,
        key: &[u8],
        value: Vec<u8>,
        cond: KvCondition,
        ttl_ms: Option<u64>,
    ) -> Result<u64> {
        check_namespace(ns)?;
        check_key(key)?;
        if value.len() > MAX_VALUE {
            return Err(Error::Invalid(format!(
                "values are at most {MAX_VALUE} bytes"
            )));
        }
        let mut full = self.kv_prefix(tenant, ns);
        full.extend_from_slice(key);
        let now = now_millis();
        let expires_at = ttl_ms.map(|t| now.saturating_add(i64::try_from(t).unwrap_or(i64::MAX)));
        self.engine()
            .write(vec![], move |ctx| {
                let mut t = ctx.txn.open_table(KV)?;
                let current = match t.get(full.as_slice())? {
                    Some(v) => Some(decode(v.value())?).filter(|s| s.live(now)),
                    None => None,
                };
                if let Err(e) = check(cond, current.as_ref()) {
                    return Ok(Err(e));
                }
                let version = ctx.next_seq();
                let crc = crc32c::crc32c(&value);
                let s = Stored {
                    version,
                    expires_at,
                    value,
                    crc,
                };
                t.insert(full.as_slice(), encode(&s)?.as_slice())?;
                Ok(Ok(version))
            })
            .await?
    }

    /// Deletes a key; returns the version it had, or None if it did not exist.
    pub async fn kv_delete(
        &self,
        tenant: TenantId,
        ns: &str,
        key: &[u8],
        cond: KvCondition,
    ) -> Result<Option<u64>> {
        check_namespace(ns)?;
        check_key(key)?;
        let mut full = self.kv_prefix(tenant, ns);
        full.extend_from_slice(key);
        let now = now_millis();
        self.engine()
            .write(vec![], move |ctx| {
                let mut t = ctx.txn.open_table(KV)?;
                let current = match t.get(full.as_slice())? {
                    Some(v) => Some(decode(v.value())?).filter(|s| s.live(now)),
                    None => None,
                };
                if let Err(e) = check(cond, current.as_ref()) {
                    return Ok(Err(e));
                }
                t.remove(full.as_slice())?;
                Ok(Ok(current.map(|c| c.version)))
            })
            .await?
    }

    /// Ordered scan of keys with `prefix`, from `start` (inclusive) to `end`
    /// (exclusive), resuming after `after`, at most `limit` entries.
    #[allow(clippy::too_many_arguments)]
    pub async fn kv_scan(
        &self,
        tenant: TenantId,
        ns: &str,
        prefix: &[u8],
        start: Option<Vec<u8>>,
        end: Option<Vec<u8>>,
        after: Option<Vec<u8>>,
        limit: usize,
    ) -> Result<ScanPage> {
        check_namespace(ns)?;
        let limit = limit.clamp(1, MAX_SCAN);
        let base = self.kv_prefix(tenant, ns);
        let prefix = prefix.to_vec();
        let now = now_millis();
        Ok(self
            .engine()
            .read(move |txn| {
                let t = txn.open_table(KV)?;
                let full = |k: &[u8]| {
                    let mut v = base.clone();
                    v.extend_from_slice(k);
                    v
                };
                // Lower bound: the greatest of prefix, start and after.
                let mut lo: Bound<Vec<u8>> = Bound::Included(full(&prefix));
                if let Some(s) = &start
                    && full(s) > full(&prefix)
                {
                    lo = Bound::Included(full(s));
                }
                if let Some(a) = &after {
                    let fa = full(a);
                    let beyond = match &lo {
                        Bound::Included(l) => fa >= *l,
                        _ => true,
                    };
                    if beyond {
                        lo = Bound::Excluded(fa);
                    }
                }
                let mut hi: Bound<Vec<u8>> = match keys::prefix_end(&full(&prefix)) {
                    Some(e) => Bound::Excluded(e),
                    None => Bound::Unbounded,
                };
                if let Some(e) = &end {
                    let fe = full(e);
                    if matches!(&hi, Bound::Excluded(h) if fe < *h)
                        || matches!(hi, Bound::Unbounded)
                    {
                        hi = Bound::Excluded(fe);
                    }
                }
                let mut page = ScanPage::default();
                if let (Bound::Included(l) | Bound::Excluded(l), Bound::Excluded(h)) = (&lo, &hi)
                    && l >= h
                {
                    return Ok(page);
                }
                let range = t.range::<&[u8]>((
                    lo.as_ref().map(Vec::as_slice),
                    hi.as_ref().map(Vec::as_slice),
                ))?;
                for e in range {
                    let (k, v) = e?;
                    let key = k.value()[base.len()..].to_vec();
                    if page.entries.len() == limit {
                        page.next_after = page.entries.last().map(|e| e.key.clone());
                        break;
                    }
                    let s = decode(v.value())?;
                    if s.live(now) {
                        page.entries.push(Entry {
                            key,
                            version: s.version,
                            expires_at: s.expires_at,
                            value: s.value,
                        });
                    }
                }
                Ok(page)
            })
            .await?)
    }

    /// Removes every KV key of a tenant (admin purge). Scans every partition's range
    /// of the tenant; fine for an administrative operation.
    pub async fn purge_kv(&self, tenant: TenantId) -> Result<()> {
        self.engine()
            .write(vec![], move |ctx| {
                let mut t = ctx.txn.open_table(KV)?;
                t.retain(|k, _| !(k.len() >= 18 && &k[2..18] == tenant.as_bytes()))?;
                Ok(())
            })
            .await?;
        Ok(())
    }

    /// Whether a tenant holds any KV key (for the admin API's non-purging delete).
    pub async fn tenant_has_kv(&self, tenant: TenantId) -> Result<bool> {
        Ok(self
            .engine()
            .read(move |txn| {
                let t = txn.open_table(KV)?;
                for e in t.iter()? {
                    let (k, _) = e?;
                    let k = k.value();
                    if k.len() >= 18 && &k[2..18] == tenant.as_bytes() {
                        return Ok(true);
                    }
                }
                Ok(false)
            })
            .await?)
    }
}
