//! Quota enforcement: a write that would take its tenant past a quota (`storageBytes`,
//! `objects`, `buckets`, `kvKeys`) is refused before it commits, and nothing is stored.
//!
//! Each node keeps, per tenant with a quota, a ledger:
//! - `base`: the tenant's usage as last measured (the usage counters, `engine::usage`:
//!   this node's partitions, or every primary's share on a cluster);
//! - `pending`: what admitted writes still in flight may add;
//! - `since`: what admitted writes added after the measurement began (they may or may
//!   not be in `base`: counted again, which errs on the safe side).
//!
//! A write is admitted when `base + since + pending + its amount` stays within every
//! quota; its amount is what it adds at most (an overwrite adds its size minus the size
//! it replaces, read just before; a delete adds nothing, and what deletes give back
//! shows at the next measurement). A measurement older than [`MEASURE_EVERY`] is taken
//! again before admitting, and a write that does not fit measures again first (at most
//! every [`REMEASURE_MIN`]) so that space freed meanwhile counts. On one node every write
//! of the tenant passes this ledger, so a quota is never exceeded.
//!
//! On a cluster every admission of a tenant is decided by one node, the tenant's quota
//! authority (the primary of the partition its id hashes to, see `cluster`): other
//! nodes ask it over the RPC port and it counts what it grants them as added at once
//! (a write that then fails is counted until the next measurement: the safe side). So a
//! quota holds exactly on a cluster too, except across a failover of the authority: the
//! new one measures afresh and does not know the grants of the old one whose writes had
//! not committed yet, so the overshoot is at most the writes in flight at that moment
//! (docs/design.md, "Quotas").

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use crate::catalog::{Catalog, Quotas};
use crate::model::bucket::Usage;
use crate::types::TenantId;

/// A measurement is taken again when it is older than this.
pub const MEASURE_EVERY: Duration = Duration::from_secs(1);
/// A write that does not fit measures again, at most this often per tenant.
pub const REMEASURE_MIN: Duration = Duration::from_millis(100);
/// Quotas are read from the catalog again after this long.
pub const SPEC_TTL: Duration = super::rate::SPEC_TTL;

/// What a write may add to its tenant's usage.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Amount {
    pub bytes: u64,
    pub objects: u64,
    pub buckets: u64,
    pub kv_keys: u64,
}

impl Amount {
    fn add(&mut self, o: Amount) {
        self.bytes = self.bytes.saturating_add(o.bytes);
        self.objects = self.objects.saturating_add(o.objects);
        self.buckets = self.buckets.saturating_add(o.buckets);
        self.kv_keys = self.kv_keys.saturating_add(o.kv_keys);
    }

    fn sub(&mut self, o: Amount) {
        self.bytes = self.bytes.saturating_sub(o.bytes);
        self.objects = self.objects.saturating_sub(o.objects);
        self.buckets = self.buckets.saturating_sub(o.buckets);
        self.kv_keys = self.kv_keys.saturating_sub(o.kv_keys);
    }

    fn is_zero(&self) -> bool {
        *self == Amount::default()
    }
}

/// A refused write: which quota, its limit, and what the tenant holds.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error, serde::Serialize, serde::Deserialize)]
#[error("the tenant's {what} quota is {limit}; it holds {used} and this write would add {adding}")]
pub struct QuotaExceeded {
    /// The quota's name in the Tenant spec (`storageBytes`, `objects`, `buckets`,
    /// `kvKeys`).
    pub what: std::borrow::Cow<'static, str>,
    pub limit: u64,
    pub used: u64,
    pub adding: u64,
}

/// The partition whose primary decides a tenant's admissions on a cluster (a container
/// name no bucket or namespace can have).
pub fn authority_partition(tenant: TenantId, partitions: u16) -> crate::types::PartitionId {
    crate::types::PartitionId::of(tenant, b"\0quota", partitions)
}

/// What an admission decided: admitted, refused by a quota, or undecided (why).
pub type Verdict = Result<(), Result<QuotaExceeded, String>>;

/// Asks the tenant's quota authority to admit an amount; None: this node is the
/// authority (decide here).
pub type Authority = Arc<
    dyn Fn(TenantId, Amount) -> Pin<Box<dyn Future<Output = Option<Verdict>> + Send>> + Send + Sync,
>;

/// Measures a tenant's usage (cluster-wide on a cluster).
pub type Measure = Arc<
    dyn Fn(TenantId) -> Pin<Box<dyn Future<Output = Result<Usage, String>> + Send>> + Send + Sync,
>;

#[derive(Default)]
struct Ledger {
    quotas: Option<(Quotas, Instant)>,
    base: Option<(Usage, Instant)>,
    /// Bumped when a measurement starts; `since` is split at that point.
    measuring: u64,
    pending: Amount,
    since: Amount,
    /// `since` when the measurement under way began.
    since_at_start: Amount,
}

#[derive(Clone)]
pub struct QuotaGate {
    catalog: Arc<dyn Catalog>,
    measure: Arc<std::sync::OnceLock<Measure>>,
    authority: Arc<std::sync::OnceLock<Authority>>,
    local: Measure,
    ledgers: Arc<Mutex<HashMap<TenantId, Ledger>>>,
    /// Serialises measurements per tenant (one at a time; the others wait for it).
    measuring: Arc<tokio::sync::Mutex<HashMap<TenantId, Arc<tokio::sync::Mutex<()>>>>>,
}

/// An admitted write's claim on its tenant's headroom: released when dropped; call
/// [`Reservation::committed`] once the write is durable, so its amount counts until the
/// next measurement sees it.
pub struct Reservation {
    gate: Option<(QuotaGate, TenantId)>,
    amount: Amount,
}

impl Reservation {
    /// A write that needs no reservation (no quota applies to it).
    pub fn none() -> Self {
        Self {
            gate: None,
            amount: Amount::default(),
        }
    }

    pub fn committed(mut self) {
        if let Some((g, t)) = self.gate.take() {
            let mut ls = g.lock();
            let l = ls.entry(t).or_default();
            l.pending.sub(self.amount);
            l.since.add(self.amount);
        }
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        if let Some((g, t)) = self.gate.take() {
            g.lock().entry(t).or_default().pending.sub(self.amount);
        }
    }
}

impl QuotaGate {
    /// `local` measures this node's own usage of a tenant (every partition): the
    /// measurement unless [`Self::set_measure`] installs a cluster-wide one.
    pub fn new(catalog: Arc<dyn Catalog>, local: Measure) -> Self {
        Self {
            catalog,
            measure: Arc::default(),
            authority: Arc::default(),
            local,
            ledgers: Arc::default(),
            measuring: Arc::default(),
        }
    }

    /// Installs the cluster-wide measurement (once).
    pub fn set_measure(&self, m: Measure) {
        let _ = self.measure.set(m);
    }

    /// Installs the way to the tenants' quota authorities on a cluster (once).
    pub fn set_authority(&self, a: Authority) {
        let _ = self.authority.set(a);
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<TenantId, Ledger>> {
        self.ledgers.lock().unwrap_or_else(PoisonError::into_inner)
    }

    async fn quotas(&self, tenant: TenantId) -> Result<Quotas, String> {
        if let Some((q, _)) = self
            .lock()
            .get(&tenant)
            .and_then(|l| l.quotas.as_ref())
            .filter(|(_, at)| at.elapsed() < SPEC_TTL)
        {
            return Ok(q.clone());
        }
        let q = match self.catalog.tenant_by_id(tenant).await {
            Ok(Some(t)) => t.spec.quotas,
            Ok(None) => Quotas::default(),
            Err(e) => {
                // Keep enforcing what was read last; with nothing read, refuse rather
                // than admit unchecked.
                let kept = self
                    .lock()
                    .get(&tenant)
                    .and_then(|l| l.quotas.as_ref())
                    .map(|(q, _)| q.clone());
                return kept.ok_or_else(|| format!("the tenant's quotas are unreadable: {e}"));
            }
        };
        self.lock().entry(tenant).or_default().quotas = Some((q.clone(), Instant::now()));
        Ok(q)
    }

    /// Whether any quota is set for `tenant` (true when unreadable: the admission
    /// decides then).
    pub async fn applies(&self, tenant: TenantId) -> bool {
        match self.quotas(tenant).await {
            Ok(q) => {
                q.storage_bytes.is_some()
                    || q.objects.is_some()
                    || q.buckets.is_some()
                    || q.kv_keys.is_some()
            }
            Err(_) => true,
        }
    }

    /// Forgets the cached quotas of `tenant` (after an admin changed them here).
    pub fn invalidate(&self, tenant: TenantId) {
        if let Some(l) = self.lock().get_mut(&tenant) {
            l.quotas = None;
        }
    }

    /// Measures the tenant's usage now (one measurement at a time per tenant; a caller
    /// that waited for another's uses it if it is fresh enough).
    async fn measure(&self, tenant: TenantId, fresher_than: Duration) -> Result<(), String> {
        let lock = self
            .measuring
            .lock()
            .await
            .entry(tenant)
            .or_default()
            .clone();
        let _one = lock.lock().await;
        if self
            .lock()
            .get(&tenant)
            .and_then(|l| l.base.as_ref())
            .is_some_and(|(_, at)| at.elapsed() < fresher_than)
        {
            return Ok(());
        }
        let started = Instant::now();
        let generation = {
            let mut ls = self.lock();
            let l = ls.entry(tenant).or_default();
            l.measuring += 1;
            l.since_at_start = l.since;
            l.measuring
        };
        let m = self.measure.get().unwrap_or(&self.local).clone();
        let usage = m(tenant).await?;
        let mut ls = self.lock();
        let l = ls.entry(tenant).or_default();
        if l.measuring == generation {
            // What was committed before the measurement began is in it.
            let before = l.since_at_start;
            l.since.sub(before);
            l.since_at_start = Amount::default();
            l.base = Some((usage, started));
        }
        Ok(())
    }

    /// Whether `amount` fits: the first quota it would exceed, if any.
    fn check(l: &Ledger, q: &Quotas, amount: Amount) -> Result<(), QuotaExceeded> {
        let Some((base, _)) = &l.base else {
            return Ok(());
        };
        let mut added = l.since;
        added.add(l.pending);
        let fields: [(&'static str, Option<u64>, u64, u64, u64); 4] = [
            (
                "storageBytes",
                q.storage_bytes,
                base.storage_bytes,
                added.bytes,
                amount.bytes,
            ),
            (
                "objects",
                q.objects,
                base.objects,
                added.objects,
                amount.objects,
            ),
            (
                "buckets",
                q.buckets,
                base.buckets,
                added.buckets,
                amount.buckets,
            ),
            (
                "kvKeys",
                q.kv_keys,
                base.kv_keys,
                added.kv_keys,
                amount.kv_keys,
            ),
        ];
        for (what, limit, used, added, adding) in fields {
            let Some(limit) = limit else { continue };
            let used = used.saturating_add(added);
            if adding > 0 && used.saturating_add(adding) > limit {
                return Err(QuotaExceeded {
                    what: what.into(),
                    limit,
                    used,
                    adding,
                });
            }
        }
        Ok(())
    }

    /// Admits a write of `tenant` that may add `amount`, or says which quota it would
    /// exceed. `Err(Err(..))`: the quotas or the usage could not be read (nothing was
    /// admitted; retry).
    pub async fn admit(
        &self,
        tenant: TenantId,
        amount: Amount,
    ) -> Result<Reservation, Result<QuotaExceeded, String>> {
        if amount.is_zero() {
            return Ok(Reservation::none());
        }
        let q = self.quotas(tenant).await.map_err(Err)?;
        let applies = (amount.bytes > 0 && q.storage_bytes.is_some())
            || (amount.objects > 0 && q.objects.is_some())
            || (amount.buckets > 0 && q.buckets.is_some())
            || (amount.kv_keys > 0 && q.kv_keys.is_some());
        if !applies {
            return Ok(Reservation::none());
        }
        if let Some(a) = self.authority.get()
            && let Some(verdict) = a(tenant, amount).await
        {
            // Decided (and counted) by the authority.
            return verdict.map(|()| Reservation::none());
        }
        self.admit_here(tenant, amount).await
    }

    /// Admits on this node's ledger (this node is the tenant's authority).
    pub async fn admit_here(
        &self,
        tenant: TenantId,
        amount: Amount,
    ) -> Result<Reservation, Result<QuotaExceeded, String>> {
        let q = self.quotas(tenant).await.map_err(Err)?;
        let mut remeasured = false;
        loop {
            let fresh = {
                let ls = self.lock();
                ls.get(&tenant)
                    .and_then(|l| l.base.as_ref())
                    .map(|(_, at)| at.elapsed())
            };
            if fresh.is_none_or(|age| age >= MEASURE_EVERY) {
                self.measure(tenant, MEASURE_EVERY).await.map_err(Err)?;
                remeasured = true;
            }
            let verdict = {
                let mut ls = self.lock();
                let l = ls.entry(tenant).or_default();
                let v = Self::check(l, &q, amount);
                if v.is_ok() {
                    l.pending.add(amount);
                }
                v
            };
            match verdict {
                Ok(()) => {
                    return Ok(Reservation {
                        gate: Some((self.clone(), tenant)),
                        amount,
                    });
                }
                Err(e) if remeasured => return Err(Ok(e)),
                Err(_) => {
                    // Space freed since the last measurement counts: measure again
                    // (not more often than REMEASURE_MIN) and decide on that.
                    self.measure(tenant, REMEASURE_MIN).await.map_err(Err)?;
                    remeasured = true;
                }
            }
        }
    }

    /// Refuses early a write whose declared size cannot fit (before its body is read);
    /// admits nothing. The write is checked again, exactly, before it commits.
    pub async fn precheck(&self, tenant: TenantId, amount: Amount) -> Result<(), QuotaExceeded> {
        match self.admit(tenant, amount).await {
            Ok(r) => {
                drop(r);
                Ok(())
            }
            Err(Ok(e)) => Err(e),
            // Undecided here: the exact check decides.
            Err(Err(_)) => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::catalog::{MasterKey, SqlCatalog, TenantSpec};

    fn fixed(usage: Arc<Mutex<Usage>>) -> Measure {
        Arc::new(move |_| {
            let u = usage.lock().unwrap().clone();
            Box::pin(async move { Ok(u) })
        })
    }

    async fn gate(q: Quotas, usage: Arc<Mutex<Usage>>) -> (QuotaGate, TenantId) {
        let cat = SqlCatalog::connect("sqlite::memory:", MasterKey::generate())
            .await
            .unwrap();
        let spec = TenantSpec {
            quotas: q,
            ..Default::default()
        };
        let t = cat.create_tenant("t", &spec).await.unwrap().id;
        (QuotaGate::new(Arc::new(cat), fixed(usage)), t)
    }

    fn bytes(n: u64) -> Amount {
        Amount {
            bytes: n,
            ..Default::default()
        }
    }

    /// In-flight and committed admissions count until a measurement shows them; a
    /// refused write takes nothing; dropping a reservation gives it back.
    #[tokio::test]
    async fn admissions_count_until_measured_and_refusals_take_nothing() {
        let usage = Arc::new(Mutex::new(Usage {
            storage_bytes: 600,
            ..Default::default()
        }));
        let q = Quotas {
            storage_bytes: Some(1000),
            ..Default::default()
        };
        let (g, t) = gate(q, usage.clone()).await;
        let a = g.admit(t, bytes(300)).await.ok().unwrap();
        let e = g.admit(t, bytes(101)).await.err().unwrap().unwrap();
        assert_eq!(
            (&*e.what, e.limit, e.used, e.adding),
            ("storageBytes", 1000, 900, 101)
        );
        let b = g.admit(t, bytes(100)).await.ok().unwrap();
        drop(b);
        let b = g.admit(t, bytes(100)).await.ok().unwrap();
        // Committed, not yet measured: still counted.
        a.committed();
        b.committed();
        assert!(g.admit(t, bytes(1)).await.is_err());
        // Deletes show at the next measurement.
        *usage.lock().unwrap() = Usage {
            storage_bytes: 500,
            ..Default::default()
        };
        tokio::time::sleep(REMEASURE_MIN).await;
        assert!(g.admit(t, bytes(500)).await.is_ok());
        // Other quotas, and writes no quota applies to.
        assert!(
            g.admit(
                t,
                Amount {
                    objects: 1_000_000,
                    ..Default::default()
                }
            )
            .await
            .is_ok()
        );
    }
}
