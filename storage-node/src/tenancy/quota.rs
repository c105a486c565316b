//! Quota enforcement: a write that would take its tenant past a quota (`storageBytes`,
//! `objects`, `buckets`, `kvKeys`) is refused before it commits, and nothing is stored.
//!
//! Each node keeps, per tenant with a quota, a ledger:
//! - `base`: the tenant's usage as last measured (the usage counters, `engine::usage`,
//!   of every partition's primary) and when that measurement began;
//! - `pending`: what admitted writes still in flight may add;
//! - `since`: what admitted writes added that a measurement may not have seen yet, each
//!   with the moment from which any measurement surely sees it (a local write: its
//!   commit; a grant to another node, or a write whose request was cancelled: its
//!   deadline plus a margin, see [`GRANT_TTL`]). An entry leaves when a measurement that
//!   began after that moment completes; until then it may be counted twice, the safe side.
//!
//! A write is admitted when `base + since + pending + its amount` stays within every
//! quota; its amount is what it adds at most (an overwrite adds its size minus the size
//! it replaces, read just before and checked again inside the commit, [`CommitGuard`]; a
//! delete adds nothing, and what deletes give back shows at the next measurement). A
//! measurement older than [`MEASURE_EVERY`] is taken again before admitting, and a write
//! that does not fit measures again first (at most every [`REMEASURE_MIN`]) so that space
//! freed meanwhile counts. Every admitted write must commit within [`GRANT_USE`] of its
//! admission or is refused (retry), which bounds how long an admission can stay unseen.
//!
//! On a cluster every admission of a tenant is decided by one node, the tenant's quota
//! authority (the primary of the partition its id hashes to): other nodes ask it over
//! the RPC port. So a quota holds exactly on one node and on a cluster (given commits
//! whose fsync takes less than `GRANT_TTL - GRANT_USE`), except across a failover of the
//! authority: the new one measures afresh and does not know the old one's grants whose
//! writes had not committed yet, so the overshoot is at most the writes in flight at
//! that moment (docs/design.md, "Usage counters and quotas").

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
#[error("the tenant's {what} quota is {limit}; it counts {used} and this write would add {adding}")]
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

/// Asks the tenant's quota authority to admit an amount (or, probing, whether it
/// fits); None: this node is the authority (decide here).
pub type Authority = Arc<
    dyn Fn(TenantId, Amount, bool) -> Pin<Box<dyn Future<Output = Option<Verdict>> + Send>>
        + Send
        + Sync,
>;

/// Measures a tenant's usage (cluster-wide on a cluster).
pub type Measure = Arc<
    dyn Fn(TenantId) -> Pin<Box<dyn Future<Output = Result<Usage, String>> + Send>> + Send + Sync,
>;

#[derive(Default)]
struct Ledger {
    quotas: Option<(Quotas, Instant)>,
    /// The tenant's name, for metrics.
    name: Option<String>,
    /// Something of the tenant was deleted here since the last measurement began: a
    /// write that does not fit measures again at once (not after REMEASURE_MIN).
    freed: bool,
    /// The last measurement that failed, and why (cleared by one that succeeds).
    failed: Option<(Instant, String)>,
    /// The last measurement and when it began.
    base: Option<(Usage, Instant)>,
    pending: Amount,
    /// Additions not known to be in `base`: (from when a measurement surely sees it,
    /// amount). An entry leaves once a measurement that began after its time completes:
    /// a local write's time is its commit; a grant to another node's write is its time
    /// plus [`GRANT_TTL`], by which that write has committed or been refused.
    since: std::collections::VecDeque<(Instant, Amount)>,
}

impl Ledger {
    fn since_total(&self) -> Amount {
        let mut t = Amount::default();
        for (_, a) in &self.since {
            t.add(*a);
        }
        t
    }
}

/// How long a write admitted by another node's quota authority may take to commit after
/// the grant; the asker refuses to commit it later ([`CommitGuard`]), so a measurement
/// that begins after this has seen it.
pub const GRANT_TTL: Duration = Duration::from_secs(3);
/// The asker's own limit, counted from before it asked: inside [`GRANT_TTL`].
pub const GRANT_USE: Duration = Duration::from_millis(1500);
/// How long a write admitted on its own node may take to commit (a slow disk delays the
/// group commit); a reservation dropped unsettled counts until a measurement after it.
pub const LOCAL_USE: Duration = Duration::from_secs(30);
/// A failed measurement is not tried again for this long (the writes waiting for it use
/// the last good one, or are refused with 503).
pub const RETRY_FAILED: Duration = Duration::from_secs(1);
/// How old a measurement may be and still be used when a new one fails (a partition
/// without a reachable primary): what was admitted since still counts, so an old one
/// errs on the safe side.
pub const STALE_MAX: Duration = Duration::from_secs(60);

/// Writes refused for a quota, per tenant and quota (bounded: tenants x 4).
#[derive(Clone, Debug, Hash, PartialEq, Eq, prometheus_client::encoding::EncodeLabelSet)]
pub struct QuotaLabels {
    pub tenant: String,
    pub quota: String,
}

#[derive(Clone)]
pub struct QuotaGate {
    catalog: Arc<dyn Catalog>,
    /// Writes refused by a quota, counted where the client was answered.
    pub refused: prometheus_client::metrics::family::Family<
        QuotaLabels,
        prometheus_client::metrics::counter::Counter,
    >,
    measure: Arc<std::sync::OnceLock<Measure>>,
    authority: Arc<std::sync::OnceLock<Authority>>,
    local: Measure,
    ledgers: Arc<Mutex<HashMap<TenantId, Ledger>>>,
    /// Serialises measurements per tenant (one at a time; the others wait for it).
    measuring: Arc<tokio::sync::Mutex<HashMap<TenantId, Arc<tokio::sync::Mutex<()>>>>>,
}

/// An admitted write's claim on its tenant's headroom. Call [`Reservation::committed`]
/// once the write is durable (its amount counts until a measurement sees it) or
/// [`Reservation::release`] when it surely did not happen; dropped otherwise (a request
/// cancelled while its commit ran) it counts as committed, the safe side.
pub struct Reservation {
    gate: Option<(QuotaGate, TenantId)>,
    amount: Amount,
    guard: CommitGuard,
}

/// What the write's commit must still check, inside its transaction: that it commits
/// in time and that it adds no more than it was admitted for (the record it replaces
/// may have changed since its size was read).
#[derive(Clone, Copy, Debug, Default)]
pub struct CommitGuard {
    deadline: Option<Instant>,
    /// (the record existed when admitted, the new record's size, bytes admitted);
    /// None: nothing to check (no quota applies).
    replaces: Option<(bool, u64, u64)>,
}

impl CommitGuard {
    /// Err (retry) when the write may no longer commit as admitted; `current` is the
    /// size of the record it replaces now (None: absent).
    pub fn check(&self, current: Option<u64>) -> Result<(), String> {
        if self.deadline.is_some_and(|d| Instant::now() > d) {
            return Err(
                "the quota check of this write expired before it could commit; retry".into(),
            );
        }
        if let Some((existed, new, admitted)) = self.replaces
            && ((existed && current.is_none())
                || new.saturating_sub(current.unwrap_or(0)) > admitted)
        {
            return Err(
                "what this write replaces changed while its quota was checked; retry".into(),
            );
        }
        Ok(())
    }
}

impl Reservation {
    /// A write that needs no reservation (no quota applies to it).
    pub fn none() -> Self {
        Self {
            gate: None,
            amount: Amount::default(),
            guard: CommitGuard::default(),
        }
    }

    /// What the commit checks (copied into the write's closure).
    pub fn guard(&self) -> CommitGuard {
        self.guard
    }

    /// Notes what the commit must check: whether the replaced record existed, the new
    /// record's size (in the unit `current` is given in at the check) and the bytes
    /// admitted for it.
    pub fn replacing(mut self, existed: bool, new: u64, admitted: u64) -> Self {
        self.guard.replaces = Some((existed, new, admitted));
        self
    }

    pub fn committed(mut self) {
        self.settle(Some(Instant::now()));
    }

    /// The write did not happen: its amount is free again.
    pub fn release(mut self) {
        self.settle(None);
    }

    /// Counts the amount for a write another node commits within [`GRANT_TTL`].
    pub fn granted(mut self) {
        self.settle(Some(Instant::now() + GRANT_TTL));
    }

    fn settle(&mut self, seen_from: Option<Instant>) {
        if let Some((g, t)) = self.gate.take() {
            let mut ls = g.lock();
            let l = ls.entry(t).or_default();
            l.pending.sub(self.amount);
            if let Some(from) = seen_from {
                l.since.push_back((from, self.amount));
            }
        }
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        // The write may still commit, up to its deadline: counted until a measurement
        // that begins after that.
        let from = self.guard.deadline.map_or_else(Instant::now, |d| {
            d + (GRANT_TTL - GRANT_USE).max(Duration::from_secs(1))
        });
        self.settle(Some(from.max(Instant::now())));
    }
}

impl QuotaGate {
    /// `local` measures this node's own usage of a tenant (every partition): the
    /// measurement unless [`Self::set_measure`] installs a cluster-wide one.
    pub fn new(catalog: Arc<dyn Catalog>, local: Measure) -> Self {
        Self {
            catalog,
            refused: Default::default(),
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
        let stale = {
            let mut ls = self.lock();
            match ls.get_mut(&tenant).and_then(|l| l.quotas.as_mut()) {
                Some((q, at)) if at.elapsed() < SPEC_TTL => return Ok(q.clone()),
                // Expired: this caller reads them again; concurrent writes keep using
                // the old ones meanwhile (one catalog read, not one per write).
                Some((q, at)) => {
                    *at = Instant::now();
                    Some(q.clone())
                }
                None => None,
            }
        };
        match stale {
            Some(stale) => Ok(self.refresh_quotas(tenant).await.unwrap_or(stale)),
            None => self.refresh_quotas(tenant).await,
        }
    }

    async fn refresh_quotas(&self, tenant: TenantId) -> Result<Quotas, String> {
        let (q, name) = match self.catalog.tenant_by_id(tenant).await {
            Ok(Some(t)) => (t.spec.quotas, Some(t.name)),
            Ok(None) => (Quotas::default(), None),
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
        let mut ls = self.lock();
        let l = ls.entry(tenant).or_default();
        l.quotas = Some((q.clone(), Instant::now()));
        if name.is_some() {
            l.name = name;
        }
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

    /// Notes that a delete on this node gave some of `tenant`'s usage back.
    pub fn freed(&self, tenant: TenantId) {
        if let Some(l) = self.lock().get_mut(&tenant) {
            l.freed = true;
        }
    }

    /// Forgets the cached quotas of `tenant` (after an admin changed them here).
    pub fn invalidate(&self, tenant: TenantId) {
        if let Some(l) = self.lock().get_mut(&tenant) {
            l.quotas = None;
        }
    }

    /// Measures the tenant's usage now (one measurement at a time per tenant; a caller
    /// that waited for another's uses it if it is fresh enough). When it fails, a
    /// measurement up to [`STALE_MAX`] old is kept (what was admitted since still counts).
    async fn measure(&self, tenant: TenantId, fresher_than: Duration) -> Result<(), String> {
        match self.measure_now(tenant, fresher_than).await {
            Ok(()) => Ok(()),
            Err(e) => {
                let usable = self
                    .lock()
                    .get(&tenant)
                    .and_then(|l| l.base.as_ref())
                    .is_some_and(|(_, at)| at.elapsed() < STALE_MAX);
                if usable {
                    tracing::warn!(%tenant, error = %e, "measuring the tenant's usage failed; checking quotas against the last measurement");
                    Ok(())
                } else {
                    tracing::warn!(%tenant, error = %e, "measuring the tenant's usage failed");
                    Err(
                        "the tenant's usage could not be measured for its quota check; \
                         nothing was written; retry"
                            .into(),
                    )
                }
            }
        }
    }

    async fn measure_now(&self, tenant: TenantId, fresher_than: Duration) -> Result<(), String> {
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
        // One that just failed (a partition without a primary, a peer that does not
        // answer) is not tried again by every write that waited behind it.
        if let Some(e) = self
            .lock()
            .get(&tenant)
            .and_then(|l| l.failed.as_ref())
            .filter(|(at, _)| at.elapsed() < RETRY_FAILED)
            .map(|(_, e)| e.clone())
        {
            return Err(e);
        }
        let started = Instant::now();
        if let Some(l) = self.lock().get_mut(&tenant) {
            l.freed = false;
        }
        let m = self.measure.get().unwrap_or(&self.local).clone();
        let usage = match m(tenant).await {
            Ok(u) => u,
            Err(e) => {
                self.lock().entry(tenant).or_default().failed = Some((Instant::now(), e.clone()));
                return Err(e);
            }
        };
        let mut ls = self.lock();
        let l = ls.entry(tenant).or_default();
        // What surely committed before the measurement began is in it.
        l.since.retain(|(from, _)| *from >= started);
        l.base = Some((usage, started));
        l.failed = None;
        Ok(())
    }

    /// Whether `amount` fits: the first quota it would exceed, if any.
    fn check(l: &Ledger, q: &Quotas, amount: Amount) -> Result<(), QuotaExceeded> {
        let Some((base, _)) = &l.base else {
            return Ok(());
        };
        let mut added = l.since_total();
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
        self.decide(tenant, amount, false).await
    }

    fn count_refusal(&self, tenant: TenantId, q: &QuotaExceeded) {
        let name = self
            .lock()
            .get(&tenant)
            .and_then(|l| l.name.clone())
            .unwrap_or_else(|| tenant.to_string());
        self.refused
            .get_or_create(&QuotaLabels {
                tenant: name,
                quota: q.what.to_string(),
            })
            .inc();
    }

    /// [`Self::admit`], or with `probe` only whether `amount` fits now (nothing is
    /// admitted or counted).
    async fn decide(
        &self,
        tenant: TenantId,
        amount: Amount,
        probe: bool,
    ) -> Result<Reservation, Result<QuotaExceeded, String>> {
        let verdict = self.decide_inner(tenant, amount, probe).await;
        if let Err(Ok(q)) = &verdict {
            self.count_refusal(tenant, q);
        }
        verdict
    }

    async fn decide_inner(
        &self,
        tenant: TenantId,
        amount: Amount,
        probe: bool,
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
        let asked = Instant::now();
        if let Some(a) = self.authority.get()
            && let Some(verdict) = a(tenant, amount, probe).await
        {
            // Decided (and counted, unless a probe) by the authority, which counts it
            // for GRANT_TTL after its grant: the write must commit before then.
            return verdict.map(|()| {
                let mut r = Reservation::none();
                r.guard.deadline = Some(asked + GRANT_USE);
                r
            });
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
                        // A write that does not commit in time is refused (retry), so
                        // a reservation dropped without an outcome is bounded too.
                        guard: CommitGuard {
                            deadline: Some(Instant::now() + LOCAL_USE),
                            ..Default::default()
                        },
                    });
                }
                Err(e) if remeasured => return Err(Ok(e)),
                Err(_) => {
                    // Space freed since the last measurement counts: measure again
                    // (at once after a delete here, else not more often than
                    // REMEASURE_MIN) and decide on that.
                    let freed = self.lock().get(&tenant).is_some_and(|l| l.freed);
                    let fresher = if freed { Duration::ZERO } else { REMEASURE_MIN };
                    self.measure(tenant, fresher).await.map_err(Err)?;
                    remeasured = true;
                }
            }
        }
    }

    /// Refuses early a write whose declared size cannot fit (before its body is read);
    /// admits nothing. The write is checked again, exactly, before it commits.
    pub async fn precheck(&self, tenant: TenantId, amount: Amount) -> Result<(), QuotaExceeded> {
        match self.decide(tenant, amount, true).await {
            // A probe admits nothing: give back what was reserved here.
            Ok(r) => {
                r.release();
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
        b.release();
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

    /// A grant to another node's write counts until a measurement that began after the
    /// write's deadline (it may commit right after a measurement read its partition); a
    /// reservation dropped without an outcome (a cancelled request) counts the same way.
    #[tokio::test]
    async fn grants_and_cancelled_writes_count_until_surely_measured() {
        let usage = Arc::new(Mutex::new(Usage::default()));
        let q = Quotas {
            storage_bytes: Some(1000),
            ..Default::default()
        };
        let (g, t) = gate(q, usage).await;
        g.admit_here(t, bytes(600)).await.ok().unwrap().granted();
        tokio::time::sleep(REMEASURE_MIN).await;
        // Measured again (usage still 0: the write has not committed): still counted.
        assert!(g.admit(t, bytes(500)).await.is_err());
        drop(g.admit(t, bytes(300)).await.ok().unwrap());
        tokio::time::sleep(REMEASURE_MIN).await;
        assert!(
            g.admit(t, bytes(200)).await.is_err(),
            "a dropped reservation counts"
        );
        // After the grant's lifetime it is gone; the dropped local reservation still
        // counts (its write could commit until LOCAL_USE after its admission).
        tokio::time::sleep(GRANT_TTL).await;
        assert!(g.admit(t, bytes(701)).await.is_err());
        let r = g.admit(t, bytes(700)).await.ok().unwrap();
        r.release();
    }

    /// When measuring fails (a partition without a primary), the writes waiting for the
    /// measurement do not each try again: one attempt per RETRY_FAILED, and the last good
    /// measurement (with what was admitted since) decides meanwhile.
    #[tokio::test]
    async fn a_failed_measurement_is_not_retried_by_every_write() {
        use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
        let cat = SqlCatalog::connect("sqlite::memory:", MasterKey::generate())
            .await
            .unwrap();
        let spec = TenantSpec {
            quotas: Quotas {
                storage_bytes: Some(1000),
                ..Default::default()
            },
            ..Default::default()
        };
        let t = cat.create_tenant("t", &spec).await.unwrap().id;
        let (calls, failing) = (
            Arc::new(AtomicUsize::new(0)),
            Arc::new(AtomicBool::new(false)),
        );
        let m: Measure = {
            let (calls, failing) = (calls.clone(), failing.clone());
            Arc::new(move |_| {
                calls.fetch_add(1, Ordering::SeqCst);
                let fail = failing.load(Ordering::SeqCst);
                Box::pin(async move {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    if fail {
                        Err("partition 3 has no primary".to_string())
                    } else {
                        Ok(Usage::default())
                    }
                })
            })
        };
        let g = QuotaGate::new(Arc::new(cat), m);
        g.admit(t, bytes(100)).await.ok().unwrap().committed();
        failing.store(true, Ordering::SeqCst);
        tokio::time::sleep(MEASURE_EVERY).await;
        let before = calls.load(Ordering::SeqCst);
        let writes: Vec<_> = (0..10)
            .map(|_| {
                let g = g.clone();
                tokio::spawn(async move { g.admit(t, bytes(10)).await.map(Reservation::committed) })
            })
            .collect();
        for w in writes {
            assert!(
                w.await.unwrap().is_ok(),
                "the last good measurement decides"
            );
        }
        assert_eq!(
            calls.load(Ordering::SeqCst) - before,
            1,
            "one attempt, not ten"
        );
        // It still counts what was admitted: 100 + 10 x 10 of 1000.
        assert!(g.admit(t, bytes(801)).await.is_err());
    }
}
