//! KV namespaces: per-tenant, binary-safe keys with versioned values.
//!
//! Every write gets a version from the engine's sequence counter, so versions are
//! strictly increasing per key, also across delete and re-create and across restarts.
//! Conditional writes are evaluated inside the group commit: compare-and-set cannot
//! lose an update. Expired values (TTL) read as absent at once and are removed by
//! [`Store::kv_sweep_expired`], which a node runs every few seconds, driven by an
//! expiry index kept in the same transactions as the values.

use std::ops::Bound;

use redb::ReadableTable;
use serde::{Deserialize, Serialize};

use super::object::encode;
use super::{Error, PartitionSet, Result, Store};
use crate::engine::{EngineError, KV, KV_EXPIRY, META, keys};
use crate::types::{PartitionId, TenantId, now_millis};

pub const MAX_KEY: usize = 1024;
pub const MAX_VALUE: usize = 1024 * 1024;
pub const MAX_NAMESPACE: usize = 63;
pub const MAX_SCAN: usize = 1000;
pub const MAX_BATCH: usize = 100;
/// Most bytes of keys and values one scan page or batch answer carries (before JSON
/// and base64). A page cut by it has a cursor (scan) or unprocessed keys (batch); it
/// always holds at least one entry, so every value can be read.
pub const MAX_PAGE_BYTES: usize = 4 * 1024 * 1024;
/// Bytes an entry counts for against [`MAX_PAGE_BYTES`].
pub fn entry_cost(key: &[u8], value: &[u8]) -> usize {
    key.len() + value.len() + 64
}

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

/// The answer to a batch read: each key read, in request order, with its entry (None
/// if absent), then the keys left unread because the answer reached its byte cap.
#[derive(Debug, Default)]
pub struct BatchPage {
    pub read: Vec<(Vec<u8>, Option<Entry>)>,
    pub unprocessed: Vec<Vec<u8>>,
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
    let s: Stored = super::object::decode_stored("kv", b).map_err(EngineError::Db)?;
    if crc32c::crc32c(&s.value) != s.crc {
        return Err(EngineError::Db("kv value fails its checksum".into()));
    }
    Ok(s)
}

/// The expiry-index key of KV key `full` (partition first) expiring at `at` ms.
fn expiry_key(full: &[u8], at: i64) -> Vec<u8> {
    let mut k = Vec::with_capacity(full.len() + 8);
    k.extend_from_slice(&full[..2]);
    k.extend_from_slice(&u64::try_from(at).unwrap_or(0).to_be_bytes());
    k.extend_from_slice(&full[2..]);
    k
}

/// Inverse of [`expiry_key`]: the KV key and its expiry time.
fn expiry_target(idx: &[u8]) -> Option<(Vec<u8>, i64)> {
    if idx.len() < 10 {
        return None;
    }
    let at = u64::from_be_bytes(idx[2..10].try_into().ok()?);
    let mut full = idx[..2].to_vec();
    full.extend_from_slice(&idx[10..]);
    Some((full, i64::try_from(at).unwrap_or(i64::MAX)))
}

/// Set in the engine's meta table once every TTL value is in the expiry index.
const EXPIRY_INDEX_MARK: &str = "kv_expiry_index";

/// Most expired keys removed by one sweep transaction.
const SWEEP_BATCH: usize = 5000;

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

/// The name a KV namespace is placed by: its partition is that of this "container"
/// (prefixed so that a namespace and a bucket of the same name spread independently).
pub fn kv_container(ns: &str) -> String {
    format!("kv:{ns}")
}

impl Store {
    fn kv_prefix(&self, tenant: TenantId, ns: &str) -> Result<Vec<u8>> {
        let p = self.led_partition(tenant, &kv_container(ns))?;
        Ok(keys::kv_namespace_prefix(p, tenant, ns))
    }

    pub async fn kv_get(&self, tenant: TenantId, ns: &str, key: &[u8]) -> Result<Option<Entry>> {
        let mut many = self
            .kv_get_many(tenant, ns, vec![key.to_vec()], usize::MAX)
            .await?;
        Ok(many.read.pop().and_then(|(_, e)| e))
    }

    /// Reads several distinct keys from one consistent snapshot, until the entries
    /// read reach `max_bytes` (by [`entry_cost`]); the rest are returned unread. A key
    /// listed twice is refused: it would cost its value twice for nothing.
    pub async fn kv_get_many(
        &self,
        tenant: TenantId,
        ns: &str,
        keys: Vec<Vec<u8>>,
        max_bytes: usize,
    ) -> Result<BatchPage> {
        check_namespace(ns)?;
        if keys.len() > MAX_BATCH {
            return Err(Error::Invalid(format!(
                "at most {MAX_BATCH} keys per batch"
            )));
        }
        let mut seen = std::collections::HashSet::with_capacity(keys.len());
        for k in &keys {
            check_key(k)?;
            if !seen.insert(k.as_slice()) {
                return Err(Error::Invalid(
                    "a key is listed more than once in the batch".into(),
                ));
            }
        }
        drop(seen);
        let prefix = self.kv_prefix(tenant, ns)?;
        let now = now_millis();
        Ok(self
            .engine()
            .read(move |txn| {
                let t = txn.open_table(KV)?;
                let mut page = BatchPage::default();
                let mut used = 0usize;
                let mut keys = keys.into_iter();
                for key in keys.by_ref() {
                    let mut full = prefix.clone();
                    full.extend_from_slice(&key);
                    let Some(v) = t.get(full.as_slice())? else {
                        page.read.push((key, None));
                        continue;
                    };
                    let s = decode(v.value())?;
                    let cost = entry_cost(&key, &s.value);
                    if !page.read.is_empty() && used.saturating_add(cost) > max_bytes {
                        page.unprocessed.push(key);
                        break;
                    }
                    used += cost;
                    let e = s.live(now).then_some(Entry {
                        version: s.version,
                        expires_at: s.expires_at,
                        value: s.value,
                        key: key.clone(),
                    });
                    page.read.push((key, e));
                }
                page.unprocessed.extend(keys);
                Ok(page)
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
        let mut full = self.kv_prefix(tenant, ns)?;
        full.extend_from_slice(key);
        let admitted = self
            .admit_record(
                tenant,
                super::quota::RecordKind::Kv,
                &full,
                value.len() as u64,
            )
            .await?;
        let now = now_millis();
        let expires_at = ttl_ms.map(|t| now.saturating_add(i64::try_from(t).unwrap_or(i64::MAX)));
        let guard = admitted.guard();
        let r = self
            .engine()
            .write(vec![], move |ctx| {
                let mut t = ctx.txn.open_table(KV)?;
                let stored = match t.get(full.as_slice())? {
                    Some(v) => Some(decode(v.value())?),
                    None => None,
                };
                let current = stored.clone().filter(|s| s.live(now));
                if let Err(e) = check(cond, current.as_ref()) {
                    return Ok(Err(e));
                }
                if let Err(m) = guard.check(stored.as_ref().map(|s| s.value.len() as u64)) {
                    return Ok(Err(Error::QuotaUndecided(m)));
                }
                let version = ctx.next_seq();
                let crc = crc32c::crc32c(&value);
                let record = encode(&Stored {
                    version,
                    expires_at,
                    value,
                    crc,
                })?;
                let mut idx = ctx.txn.open_table(KV_EXPIRY)?;
                if let Some(at) = stored.and_then(|s| s.expires_at) {
                    idx.remove(expiry_key(&full, at).as_slice())?;
                }
                if let Some(at) = expires_at {
                    idx.insert(expiry_key(&full, at).as_slice(), ())?;
                }
                t.insert(full.as_slice(), record.as_slice())?;
                Ok(Ok(version))
            })
            .await;
        match r {
            Ok(Ok(version)) => {
                admitted.committed();
                Ok(version)
            }
            Ok(Err(e)) => {
                admitted.release();
                Err(e)
            }
            Err(e) => {
                admitted.release();
                Err(e.into())
            }
        }
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
        let mut full = self.kv_prefix(tenant, ns)?;
        full.extend_from_slice(key);
        let now = now_millis();
        let r = self
            .engine()
            .write(vec![], move |ctx| {
                let mut t = ctx.txn.open_table(KV)?;
                let stored = match t.get(full.as_slice())? {
                    Some(v) => Some(decode(v.value())?),
                    None => None,
                };
                let current = stored.clone().filter(|s| s.live(now));
                if let Err(e) = check(cond, current.as_ref()) {
                    return Ok(Err(e));
                }
                if let Some(at) = stored.and_then(|s| s.expires_at) {
                    let mut idx = ctx.txn.open_table(KV_EXPIRY)?;
                    idx.remove(expiry_key(&full, at).as_slice())?;
                }
                t.remove(full.as_slice())?;
                Ok(Ok(current.map(|c| c.version)))
            })
            .await?;
        if matches!(r, Ok(Some(_))) {
            self.quotas().freed(tenant);
        }
        r
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
        max_bytes: usize,
    ) -> Result<ScanPage> {
        check_namespace(ns)?;
        let limit = limit.clamp(1, MAX_SCAN);
        let base = self.kv_prefix(tenant, ns)?;
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
                let mut used = 0usize;
                for e in range {
                    let (k, v) = e?;
                    let key = k.value()[base.len()..].to_vec();
                    if page.entries.len() == limit {
                        page.next_after = page.entries.last().map(|e| e.key.clone());
                        break;
                    }
                    let s = decode(v.value())?;
                    if s.live(now) {
                        let cost = entry_cost(&key, &s.value);
                        if !page.entries.is_empty() && used.saturating_add(cost) > max_bytes {
                            page.next_after = page.entries.last().map(|e| e.key.clone());
                            break;
                        }
                        used += cost;
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

    /// The KV key ranges of one tenant: one per partition (a namespace's partition is
    /// a hash, so a tenant's keys are spread over all of them). Visiting these touches
    /// only the tenant's own keys.
    /// The tenant's KV range in each partition of `set`.
    pub(crate) fn tenant_kv_ranges(
        &self,
        tenant: TenantId,
        set: &PartitionSet,
    ) -> Vec<(Vec<u8>, Vec<u8>)> {
        (0..self.inner.partitions)
            .filter(|p| set.contains(PartitionId(*p)))
            .map(|p| {
                let mut lo = p.to_be_bytes().to_vec();
                lo.extend_from_slice(tenant.as_bytes());
                // Partitions are < 2^15, so the prefix is never all 0xff.
                let hi = keys::prefix_end(&lo).unwrap_or_default();
                (lo, hi)
            })
            .collect()
    }

    /// Removes the tenant's KV keys in the partitions of `set`, in one transaction.
    pub async fn purge_kv_in(&self, tenant: TenantId, set: &PartitionSet) -> Result<()> {
        let ranges = self.tenant_kv_ranges(tenant, set);
        self.engine()
            .write(vec![], move |ctx| {
                let mut t = ctx.txn.open_table(KV)?;
                let mut idx = ctx.txn.open_table(KV_EXPIRY)?;
                for (lo, hi) in &ranges {
                    let mut doomed = Vec::new();
                    for e in t.range(lo.as_slice()..hi.as_slice())? {
                        let (k, v) = e?;
                        let expires_at = decode(v.value()).ok().and_then(|s| s.expires_at);
                        doomed.push((k.value().to_vec(), expires_at));
                    }
                    for (k, expires_at) in doomed {
                        t.remove(k.as_slice())?;
                        if let Some(at) = expires_at {
                            idx.remove(expiry_key(&k, at).as_slice())?;
                        }
                    }
                }
                Ok(())
            })
            .await?;
        Ok(())
    }

    /// Removes KV values whose TTL has passed (they already read as absent), at most
    /// [`SWEEP_BATCH`] per transaction, until none is left. Returns how many went. What
    /// is due is found in a read snapshot, so a sweep with nothing to do never takes a
    /// slot (and an fsync) in the group commit.
    pub async fn kv_sweep_expired(&self) -> Result<usize> {
        let partitions = self.inner.partitions;
        let mut total = 0;
        let led = self.led_partitions();
        loop {
            let now = now_millis();
            let led = led.clone();
            let due = self
                .engine()
                .read(move |txn| {
                    let idx = txn.open_table(KV_EXPIRY)?;
                    let mut due = Vec::new();
                    for p in (0..partitions).filter(|p| led.contains(PartitionId(*p))) {
                        let lo = expiry_key(&p.to_be_bytes(), 0);
                        let hi = expiry_key(&p.to_be_bytes(), now.saturating_add(1));
                        for e in idx.range(lo.as_slice()..hi.as_slice())? {
                            due.push(e?.0.value().to_vec());
                            if due.len() == SWEEP_BATCH {
                                return Ok(due);
                            }
                        }
                    }
                    Ok(due)
                })
                .await?;
            if due.is_empty() {
                return Ok(total);
            }
            let full_batch = due.len() == SWEEP_BATCH;
            // Background work: the batch waits for its turn behind tenants' I/O; what
            // this node no longer leads after the wait is left to its new primary.
            self.background_turn(due.len()).await;
            let led_now = self.led_partitions();
            let mut due = due;
            due.retain(|k| {
                k.get(..2).is_some_and(|b| {
                    led_now.contains(PartitionId(u16::from_be_bytes([b[0], b[1]])))
                })
            });
            total += self
                .engine()
                .write(vec![], move |ctx| {
                    let mut idx = ctx.txn.open_table(KV_EXPIRY)?;
                    let mut kv = ctx.txn.open_table(KV)?;
                    let mut removed = 0;
                    for i in &due {
                        // Decide before changing anything: an error returned after a
                        // change would still be committed with the rest of the batch.
                        // Only the value this index entry was made for goes; a newer
                        // write of the key has its own entry. A value that fails its
                        // checksum stays (reads report it); its entry goes.
                        let expired = match expiry_target(i) {
                            Some((full, at)) => match kv.get(full.as_slice())? {
                                Some(v) => decode(v.value())
                                    .is_ok_and(|s| s.expires_at == Some(at))
                                    .then_some(full),
                                None => None,
                            },
                            None => None,
                        };
                        idx.remove(i.as_slice())?;
                        if let Some(full) = expired {
                            kv.remove(full.as_slice())?;
                            removed += 1;
                        }
                    }
                    Ok(removed)
                })
                .await?;
            if !full_batch {
                return Ok(total);
            }
        }
    }

    /// Builds the expiry index for values written before it existed; once per data
    /// directory (recorded in the engine's meta table). Returns the entries added.
    pub async fn kv_backfill_expiry_index(&self) -> Result<usize> {
        let done = self
            .engine()
            .read(|txn| Ok(txn.open_table(META)?.get(EXPIRY_INDEX_MARK)?.is_some()))
            .await?;
        if done {
            return Ok(0);
        }
        Ok(self
            .engine()
            .write(vec![], |ctx| {
                let mut meta = ctx.txn.open_table(META)?;
                if meta.get(EXPIRY_INDEX_MARK)?.is_some() {
                    return Ok(0);
                }
                let kv = ctx.txn.open_table(KV)?;
                let mut idx = ctx.txn.open_table(KV_EXPIRY)?;
                let mut added = 0;
                for e in kv.iter()? {
                    let (k, v) = e?;
                    // A value that fails its checksum is skipped (reads report it).
                    if let Some(at) = decode(v.value()).ok().and_then(|s| s.expires_at) {
                        idx.insert(expiry_key(k.value(), at).as_slice(), ())?;
                        added += 1;
                    }
                }
                meta.insert(EXPIRY_INDEX_MARK, 1)?;
                Ok(added)
            })
            .await?)
    }

    /// Whether the tenant has KV keys in the partitions of `set`.
    pub async fn tenant_has_kv_in(&self, tenant: TenantId, set: &PartitionSet) -> Result<bool> {
        let ranges = self.tenant_kv_ranges(tenant, set);
        Ok(self
            .engine()
            .read(move |txn| {
                let t = txn.open_table(KV)?;
                for (lo, hi) in &ranges {
                    if t.range(lo.as_slice()..hi.as_slice())?.next().is_some() {
                        return Ok(true);
                    }
                }
                Ok(false)
            })
            .await?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::test_store as store;

    #[tokio::test]
    async fn values_from_before_the_index_are_backfilled_then_swept() {
        let dir = tempfile::tempdir().unwrap();
        let s = store(dir.path()).await;
        let tenant = TenantId::random();
        // A TTL value as an older node wrote it: in the KV table only.
        let mut full = s.kv_prefix(tenant, "ns").unwrap();
        full.extend_from_slice(b"old");
        let rec = Stored {
            version: 1,
            expires_at: Some(now_millis() - 1),
            value: b"v".to_vec(),
            crc: crc32c::crc32c(b"v"),
        };
        s.engine()
            .write(vec![], move |ctx| {
                let mut t = ctx.txn.open_table(KV)?;
                t.insert(full.as_slice(), encode(&rec)?.as_slice())?;
                Ok(())
            })
            .await
            .unwrap();
        s.kv_put(
            tenant,
            "ns",
            b"live",
            b"x".to_vec(),
            KvCondition::None,
            None,
        )
        .await
        .unwrap();
        assert_eq!(s.kv_sweep_expired().await.unwrap(), 0, "not indexed yet");
        assert_eq!(s.kv_backfill_expiry_index().await.unwrap(), 1);
        assert_eq!(s.kv_backfill_expiry_index().await.unwrap(), 0, "only once");
        assert_eq!(s.kv_sweep_expired().await.unwrap(), 1);
        let page = s
            .kv_scan(tenant, "ns", b"", None, None, None, 10, MAX_PAGE_BYTES)
            .await
            .unwrap();
        assert_eq!(page.entries.len(), 1);
        assert_eq!(page.entries[0].key, b"live");
        assert_eq!(
            s.tenant_usage_in(tenant, &s.all_partitions())
                .await
                .unwrap()
                .kv_keys,
            1
        );
    }
}
