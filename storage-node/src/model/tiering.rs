//! Lifecycle transitions to the cold tier: which objects are cold (the tenant's
//! `tiering` policy and the bucket's lifecycle rules), the mover that copies their data
//! to the cold store and switches their records, and the sweep of cold copies no record
//! names.
//!
//! A move never leaves an object without a readable copy:
//! 1. the object's chunk files are copied to a fresh name in the cold store (checksummed
//!    per piece);
//! 2. one engine write switches the record to the cold manifest, only if the record is
//!    still the version that was copied (a concurrent overwrite or delete wins, and the
//!    copy is deleted);
//! 3. the chunk files are freed the way replaced data is (after reads that use them).
//!
//! A crash between 1 and 2 leaves an unnamed cold copy (the sweep deletes it after
//! [`TierSettings::orphan_grace`]); a crash between 2 and 3 leaves unnamed chunk files
//! (the start-up sweep of the chunk store deletes them). Cold copies no record names are
//! deleted by [`Store::sweep_cold_orphans`] once older than its grace (a copy a move in
//! progress is writing is younger). Only a partition's primary
//! moves; replicas get the switch through replication.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use redb::ReadableTable;
use serde::{Deserialize, Serialize};

use super::data::{self, ObjectData};
use super::object::{decode_record, encode_ext};
use super::{Error, Result, Store};
use crate::catalog::Bucket;
use crate::cold::{ColdRef, ColdTier};
use crate::engine::{EngineError, OBJECTS, keys};
use crate::types::{PartitionId, TenantId, now_millis};

/// The bucket setting that holds the bucket's lifecycle rules (JSON of [`Lifecycle`]).
pub const LIFECYCLE: &str = "lifecycle";

/// The storage class a cold object reports (`x-amz-storage-class`): instant retrieval,
/// so clients read it like any other object.
pub const COLD_CLASS: &str = "GLACIER_IR";

/// Storage classes a lifecycle transition may name; all mean "the cold tier".
pub const COLD_CLASSES: &[&str] = &[
    "GLACIER",
    "GLACIER_IR",
    "DEEP_ARCHIVE",
    "STANDARD_IA",
    "ONEZONE_IA",
    "INTELLIGENT_TIERING",
];

/// A bucket's lifecycle configuration: the subset Granary acts on.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Lifecycle {
    pub rules: Vec<LifecycleRule>,
}

/// One rule: objects under `prefix` (and within the size bounds) move to the cold tier
/// `days` days after their last write.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct LifecycleRule {
    pub id: Option<String>,
    pub enabled: bool,
    #[serde(default)]
    pub prefix: String,
    /// `ObjectSizeGreaterThan`.
    pub size_greater_than: Option<u64>,
    /// `ObjectSizeLessThan`.
    pub size_less_than: Option<u64>,
    pub days: u32,
    pub storage_class: String,
}

/// When an object is cold, as one rule: after `after_ms` since its last write, if its
/// key starts with `prefix` and its size is within the bounds.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Rule {
    after_ms: i64,
    prefix: String,
    min_size: u64,
    max_size: Option<u64>,
}

impl Rule {
    fn matches(&self, key: &[u8], size: u64, last_modified: i64, now: i64) -> bool {
        key.starts_with(self.prefix.as_bytes())
            && size >= self.min_size
            && self.max_size.is_none_or(|m| size < m)
            && now.saturating_sub(last_modified) >= self.after_ms
    }
}

/// At most this many cold objects have their reads counted at once on a node, and at
/// most [`MAX_COUNTED_PER_TENANT`] of one tenant (so one tenant's scans cannot switch
/// restore on read off for the others). An entry holds the object's engine key (at most
/// 18 + 1024 bytes): 16 MiB at worst. A read of an object not in the table while it, or
/// the tenant's share, is full is not counted.
const MAX_COUNTED_OBJECTS: usize = 16_384;
const MAX_COUNTED_PER_TENANT: usize = 4_096;

/// Reads count towards a restore while each comes within this long of the previous one:
/// an entry not read for longer is forgotten at the next pass.
const RESTORE_READ_WINDOW: Duration = Duration::from_secs(3600);

/// Restore on read: the tenants' `restoreAfterReads` and the reads of cold objects
/// counted against it, in memory on the node that serves them (the partition's
/// primary). A restart starts the counts from zero.
#[derive(Default)]
pub(crate) struct RestoreOnRead {
    /// Each tenant's threshold, as of the mover's last pass.
    policy: std::sync::Mutex<HashMap<TenantId, u32>>,
    /// Engine key of a cold object -> its counted reads.
    reads: std::sync::Mutex<HashMap<Vec<u8>, Counted>>,
    /// Cold copies replaced by a restore, with when they may be deleted: the orphan
    /// sweep leaves them to their timer (reads that began before the restore still
    /// fetch from them).
    retiring: std::sync::Mutex<HashMap<String, std::time::Instant>>,
}

#[derive(Clone, Copy, Debug)]
struct Counted {
    tenant: TenantId,
    /// The record version read (an overwrite starts the count again).
    version: u64,
    reads: u32,
    last: std::time::Instant,
}

impl RestoreOnRead {
    fn count(&self, tenant: TenantId, key: Vec<u8>, version: u64) {
        if !lock(&self.policy).contains_key(&tenant) {
            return;
        }
        let now = std::time::Instant::now();
        let mut reads = lock(&self.reads);
        if let Some(e) = reads.get_mut(&key) {
            if e.version != version {
                *e = Counted {
                    tenant,
                    version,
                    reads: 0,
                    last: now,
                };
            }
            e.reads = e.reads.saturating_add(1);
            e.last = now;
            return;
        }
        if reads.len() >= MAX_COUNTED_OBJECTS
            || reads.values().filter(|c| c.tenant == tenant).count() >= MAX_COUNTED_PER_TENANT
        {
            return;
        }
        reads.insert(
            key,
            Counted {
                tenant,
                version,
                reads: 1,
                last: now,
            },
        );
    }

    /// Takes the new thresholds; forgets the counts of tenants without one, of
    /// partitions this node does not lead, and those not read within the window.
    fn refresh(&self, policy: HashMap<TenantId, u32>, led: &super::PartitionSet) {
        let now = std::time::Instant::now();
        lock(&self.reads).retain(|k, c| {
            policy.contains_key(&c.tenant)
                && partition_of_key(k).is_some_and(|p| led.contains(p))
                && now.duration_since(c.last) < RESTORE_READ_WINDOW
        });
        *lock(&self.policy) = policy;
    }

    /// The objects read at least their tenant's threshold: (tenant, engine key,
    /// version), the most read first.
    fn due(&self) -> Vec<(TenantId, Vec<u8>, u64)> {
        let policy = lock(&self.policy).clone();
        let mut due: Vec<_> = lock(&self.reads)
            .iter()
            .filter(|(_, c)| policy.get(&c.tenant).is_some_and(|min| c.reads >= *min))
            .map(|(k, c)| (c.reads, c.tenant, k.clone(), c.version))
            .collect();
        due.sort_by(|a, b| b.0.cmp(&a.0).then_with(|| a.2.cmp(&b.2)));
        due.into_iter().map(|(_, t, k, v)| (t, k, v)).collect()
    }

    fn forget(&self, key: &[u8]) {
        lock(&self.reads).remove(key);
    }

    /// How many objects have their reads counted (for tests and the docs' bound).
    #[cfg(test)]
    fn counted(&self) -> usize {
        lock(&self.reads).len()
    }

    fn is_retiring(&self, cold_key: &str) -> bool {
        lock(&self.retiring)
            .get(cold_key)
            .is_some_and(|until| std::time::Instant::now() < *until)
    }
}

/// The partition of an engine key (its first two bytes).
fn partition_of_key(key: &[u8]) -> Option<PartitionId> {
    key.get(..2)
        .map(|b| PartitionId(u16::from_be_bytes([b[0], b[1]])))
}

/// How a restore went.
enum Restore {
    /// The record names the hot data now; its bytes.
    Done(u64),
    /// The data was copied back but the object changed meanwhile (or the node stopped
    /// leading): the copy was removed; the bytes read.
    Raced(u64),
    /// Nothing to do: the object is gone, hot already, or another version.
    Skipped,
}

fn lock<T>(m: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// What one pass did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TierOutcome {
    pub moved: u64,
    pub moved_bytes: u64,
    /// Objects brought back to the hot tier by restore on read, and the bytes read
    /// from the cold tier to do so (including copies made for objects that changed
    /// meanwhile).
    pub restored: u64,
    pub restored_bytes: u64,
    /// Objects that could not be restored (they stay cold; their reads count again).
    pub restore_failed: u64,
    /// Copies made for objects that changed while they were copied (deleted again).
    pub raced: u64,
    /// Objects that could not move (they stay hot).
    pub failed: u64,
}

impl Store {
    /// Sets the node's cold tier (once, before it serves).
    pub fn set_cold_tier(&self, cold: Arc<ColdTier>) {
        let _ = self.inner.cold.set(cold);
    }

    pub fn cold_tier(&self) -> Option<&Arc<ColdTier>> {
        self.inner.cold.get()
    }

    /// The cold tier, or the error a read of cold data gets without one.
    pub(crate) fn cold_or_err(&self) -> Result<&Arc<ColdTier>> {
        self.inner.cold.get().ok_or_else(|| {
            Error::ColdTierUnavailable(
                "the object's data is in the cold tier and this node has no cold tier configured"
                    .into(),
            )
        })
    }

    /// Frees data a record no longer names: chunk files through the log (replicas
    /// free theirs too), a cold copy from the cold store after the same grace.
    pub(crate) fn discard_data(&self, data: ObjectData) {
        match data {
            ObjectData::Cold(r) => {
                let Some(cold) = self.inner.cold.get().cloned() else {
                    tracing::warn!(key = %r.key, "a cold copy was replaced on a node without a cold tier; it stays in the cold store");
                    return;
                };
                let Some(p) = partition_of(&r.key) else {
                    return;
                };
                let me = self.downgrade();
                tokio::spawn(async move {
                    // Reads that began before the delete finish from the copy.
                    tokio::time::sleep(cold.delete_grace).await;
                    // Only while this node still leads the partition (its lease holds): a
                    // deposed primary's overwrite may not be the history its successor
                    // kept, and the successor may still name this copy. Left alone, the
                    // successor's sweep deletes it once no record names it.
                    let Some(store) = me.upgrade() else { return };
                    if !store.led_partitions().contains(p) {
                        return;
                    }
                    if let Err(e) = cold.delete(&r.key).await {
                        tracing::warn!(key = %r.key, error = %e, "could not delete a replaced cold copy; the orphan sweep retries");
                    }
                });
            }
            other => self.discard_chunks(other.into_chunks()),
        }
    }

    /// The lifecycle rules of a bucket (none if it has no configuration).
    pub async fn bucket_lifecycle(&self, bucket: &Bucket) -> Result<Option<Lifecycle>> {
        let Some(v) = self.catalog().bucket_setting(bucket.id, LIFECYCLE).await? else {
            return Ok(None);
        };
        serde_json::from_str(&v)
            .map(Some)
            .map_err(|e| Error::Corrupt(format!("stored lifecycle configuration: {e}")))
    }

    /// Counts a read of a cold object for its tenant's restore-on-read policy.
    pub(crate) fn count_cold_read(&self, tenant: TenantId, key: Vec<u8>, version: u64) {
        self.inner.restore.count(tenant, key, version);
    }

    /// One pass of the mover over the partitions this node leads: brings back the cold
    /// objects read often enough (restore on read), then moves every object that a rule
    /// makes cold, at most `max_bytes` of both (the rest wait for the next pass). Stops
    /// early while the cold tier is unreachable.
    pub async fn tier_pass(&self, max_bytes: u64) -> Result<TierOutcome> {
        let mut out = TierOutcome::default();
        let Some(cold) = self.inner.cold.get().cloned() else {
            return Ok(out);
        };
        let tenants = self.catalog().list_tenants().await?;
        self.inner.restore.refresh(
            tenants
                .iter()
                .filter_map(|t| {
                    let n = t.spec.tiering.restore_after_reads.filter(|n| *n > 0)?;
                    Some((t.id, n))
                })
                .collect(),
            &self.led_partitions(),
        );
        // Ages are judged as of the pass's start: what this pass restores is younger
        // and does not move back in the same pass.
        let now = now_millis();
        // Restores take at most half the pass's budget, so transitions keep moving.
        self.restore_due(&cold, max_bytes / 2, &mut out).await;
        if out.moved_bytes + out.restored_bytes >= max_bytes || !cold.reachable() {
            return Ok(out);
        }
        for tenant in tenants {
            let policy = &tenant.spec.tiering;
            let tenant_rule = policy.cold_after_seconds.map(|s| Rule {
                after_ms: i64::try_from(s).unwrap_or(i64::MAX).saturating_mul(1000),
                prefix: policy.prefix.clone(),
                min_size: policy.min_object_size.unwrap_or(0),
                max_size: None,
            });
            for bucket in self.catalog().list_buckets(tenant.id).await? {
                let tenant_rule = tenant_rule
                    .as_ref()
                    .filter(|_| policy.buckets.is_empty() || policy.buckets.contains(&bucket.name));
                // Only what this node leads, checked before the catalog is asked for the
                // bucket's rules.
                let p = self.partition(tenant.id, &bucket.name);
                if !self.led_partitions().contains(p) {
                    continue;
                }
                let mut rules: Vec<Rule> = tenant_rule.into_iter().cloned().collect();
                if let Some(lc) = self.bucket_lifecycle(&bucket).await? {
                    rules.extend(lc.rules.iter().filter(|r| r.enabled).map(|r| Rule {
                        after_ms: i64::from(r.days) * 86_400_000,
                        prefix: r.prefix.clone(),
                        min_size: r.size_greater_than.map_or(0, |s| s.saturating_add(1)),
                        max_size: r.size_less_than,
                    }));
                }
                if rules.is_empty() {
                    continue;
                }
                self.move_bucket(&cold, p, &bucket, &rules, now, max_bytes, &mut out)
                    .await?;
                if out.moved_bytes + out.restored_bytes >= max_bytes || !cold.reachable() {
                    return Ok(out);
                }
            }
        }
        Ok(out)
    }

    #[allow(clippy::too_many_arguments)]
    async fn move_bucket(
        &self,
        cold: &Arc<ColdTier>,
        p: PartitionId,
        bucket: &Bucket,
        rules: &[Rule],
        now: i64,
        max_bytes: u64,
        out: &mut TierOutcome,
    ) -> Result<()> {
        let prefix = keys::bucket_prefix(p, bucket.id);
        let mut after: Option<Vec<u8>> = None;
        loop {
            let (pfx, rules2, start) = (prefix.clone(), rules.to_vec(), after.clone());
            // A page of candidates: (full key, record) of hot objects a rule makes cold.
            let page = self
                .engine()
                .read(move |txn| {
                    let t = txn.open_table(OBJECTS)?;
                    let end = keys::prefix_end(&pfx);
                    let lo = match &start {
                        Some(s) => std::ops::Bound::Excluded(s.as_slice()),
                        None => std::ops::Bound::Included(pfx.as_slice()),
                    };
                    let hi = match &end {
                        Some(e) => std::ops::Bound::Excluded(e.as_slice()),
                        None => std::ops::Bound::Unbounded,
                    };
                    let mut seen = None;
                    let mut found = Vec::new();
                    for (n, e) in t.range::<&[u8]>((lo, hi))?.enumerate() {
                        let (k, v) = e?;
                        let key = k.value().to_vec();
                        seen = Some(key.clone());
                        if let Ok(rec) = decode_record(v.value())
                            && rec.size > 0
                            && !rec.data.is_cold()
                            && rules2.iter().any(|r| {
                                // A restored object's age counts from its restore.
                                let since = rec.last_modified.max(rec.ext.restored_at.unwrap_or(0));
                                r.matches(&key[pfx.len()..], rec.size, since, now)
                            })
                        {
                            found.push((key, rec));
                        }
                        if n >= 511 || found.len() >= 16 {
                            break;
                        }
                    }
                    Ok::<_, EngineError>((found, seen))
                })
                .await?;
            let (found, seen) = page;
            for (key, rec) in found {
                if !self.led_partitions().contains(p) {
                    return Ok(());
                }
                let size = rec.size;
                let key_copy = key.clone();
                match self.move_object(cold, p, bucket, key, rec).await {
                    Ok(Some(n)) => {
                        out.moved += 1;
                        out.moved_bytes += n;
                    }
                    Ok(None) => {
                        out.raced += 1;
                        // The copy was made and deleted again: it counts against the
                        // pass's budget all the same.
                        out.moved_bytes += size;
                    }
                    Err(Error::ColdTierUnavailable(why)) => {
                        tracing::warn!(error = %why, "cold tier unavailable; transitions pause until it answers");
                        return Ok(());
                    }
                    // One object that cannot move (its data fails a checksum, say) must
                    // not stop the others: it stays hot and is tried again next pass.
                    Err(e) => {
                        out.failed += 1;
                        tracing::warn!(bucket = %bucket.name, key = %String::from_utf8_lossy(&key_copy[prefix.len()..]), error = %e, "an object could not move to the cold tier; it stays hot and is tried again next pass");
                    }
                }
                if out.moved_bytes + out.restored_bytes >= max_bytes {
                    return Ok(());
                }
            }
            match seen {
                Some(s) => after = Some(s),
                None => return Ok(()),
            }
        }
    }

    /// Moves one object; `Some(bytes)` once its record names the cold copy, `None` if
    /// it changed meanwhile (the copy is deleted again).
    async fn move_object(
        &self,
        cold: &Arc<ColdTier>,
        p: PartitionId,
        bucket: &Bucket,
        key: Vec<u8>,
        rec: super::ObjectRecord,
    ) -> Result<Option<u64>> {
        let cold_key = ColdTier::new_key(p.0, &bucket.id.0.simple().to_string(), rec.version);
        let io = self.background_io();
        let body = data::read_body(self.engine().chunks(), &rec.data, 0..rec.size, &io).await?;
        let cref = cold
            .upload(&cold_key, rec.size, body.stream)
            .await
            .map_err(cold_err)?;
        // The upload took a while: a node that no longer leads the partition must not
        // write (its successor decides about this object).
        if !self.led_partitions().contains(p) {
            let _ = cold.delete(&cold_key).await;
            return Ok(None);
        }
        let switched = self
            .switch_data(key, &rec, ObjectData::Cold(cref), vec![], None)
            .await;
        match switched {
            Ok(true) => {
                self.discard_chunks(rec.data.into_chunks());
                Ok(Some(rec.size))
            }
            Ok(false) => {
                let _ = cold.delete(&cold_key).await;
                Ok(None)
            }
            Err(e) => {
                let _ = cold.delete(&cold_key).await;
                Err(e.into())
            }
        }
    }

    /// Brings back the objects their tenants' restore-on-read policies made due, within
    /// `budget` bytes shared equally by the tenants that have any due (the rest stay
    /// due for the next pass).
    async fn restore_due(&self, cold: &Arc<ColdTier>, budget: u64, out: &mut TierOutcome) {
        let due = self.inner.restore.due();
        if due.is_empty() {
            return;
        }
        let tenants: std::collections::HashSet<TenantId> = due.iter().map(|d| d.0).collect();
        let share = budget / tenants.len() as u64;
        let mut spent: HashMap<TenantId, u64> = HashMap::new();
        let led = self.led_partitions();
        for (tenant, key, version) in due {
            let used = spent.entry(tenant).or_default();
            if *used >= share.max(1) {
                continue;
            }
            let Some(p) = partition_of_key(&key).filter(|p| led.contains(*p)) else {
                self.inner.restore.forget(&key);
                continue;
            };
            match self.restore_object(cold, p, key.clone(), version).await {
                Ok(Restore::Done(n)) => {
                    out.restored += 1;
                    out.restored_bytes += n;
                    *used += n;
                }
                Ok(Restore::Raced(n)) => {
                    out.restored_bytes += n;
                    *used += n;
                }
                Ok(Restore::Skipped) => {}
                Err(Error::ColdTierUnavailable(why)) => {
                    // Still due: tried again once the tier answers.
                    tracing::warn!(error = %why, "cold tier unavailable; restores pause until it answers");
                    return;
                }
                Err(e) => {
                    out.restore_failed += 1;
                    tracing::warn!(
                        key = %String::from_utf8_lossy(key.get(keys::BUCKET_PREFIX_LEN..).unwrap_or_default()),
                        error = %e,
                        "an object could not be restored from the cold tier; it stays cold (its reads are counted again)"
                    );
                }
            }
            self.inner.restore.forget(&key);
        }
    }

    /// Copies a cold object's data back to hot storage and switches its record to it,
    /// only if the record is still `version` with that cold copy. Once the switch is
    /// on the partition's in-sync replicas, the cold copy is retired (deleted after the
    /// orphan grace, so reads that began before finish); until then it stays, as a
    /// replica promoted before it has the switch still names it.
    async fn restore_object(
        &self,
        cold: &Arc<ColdTier>,
        p: PartitionId,
        key: Vec<u8>,
        version: u64,
    ) -> Result<Restore> {
        let rec = match self.record_at(key.clone()).await {
            Ok(r) => r,
            Err(Error::NoSuchKey) => return Ok(Restore::Skipped),
            Err(e) => return Err(e),
        };
        let ObjectData::Cold(cref) = &rec.data else {
            return Ok(Restore::Skipped);
        };
        if rec.version != version {
            return Ok(Restore::Skipped);
        }
        // Background turns at the I/O scheduler; each chunk file goes to the replicas
        // as soon as it is complete (as a PUT's do), so the switch's commit does not
        // wait for all of them.
        let mut io = self.background_io();
        io.announce = self.inner.chunk_hook.get().cloned();
        let body = cold
            .read(cref, 0..rec.size, io.clone())
            .await
            .map_err(cold_err)?
            .1;
        let written = data::write_body(self.engine().chunks(), p, body, &io).await?;
        // The cold read verified every piece; a single-part object's ETag is the MD5
        // of its bytes, checked as well.
        let single_part = rec.ext.part_sizes.is_empty() && !rec.etag.contains('-');
        if written.size != rec.size || (single_part && hex::encode(written.md5) != rec.etag) {
            data::abandon(self.engine().chunks(), written.data).await;
            return Err(Error::Corrupt(format!(
                "the cold copy {} read back as other bytes than the object's",
                cref.key
            )));
        }
        if !self.led_partitions().contains(p) {
            data::abandon(self.engine().chunks(), written.data).await;
            return Ok(Restore::Raced(rec.size));
        }
        let switched = self
            .switch_data(
                key,
                &rec,
                written.data.clone(),
                written.dirs.clone(),
                Some(now_millis()),
            )
            .await;
        match switched {
            Ok(true) => {}
            Ok(false) => {
                data::abandon(self.engine().chunks(), written.data).await;
                return Ok(Restore::Raced(rec.size));
            }
            Err(e) => {
                data::abandon(self.engine().chunks(), written.data).await;
                return Err(e.into());
            }
        }
        // Everything the partition's log holds now, the switch included.
        let durable = match self.inner.barrier.get() {
            Some(wait) => wait(vec![(p, 0)]).await,
            None => Ok(()),
        };
        match durable {
            Ok(()) => self.retire_cold_copy(cold, cref.key.clone(), p),
            // Left to the orphan sweep of whichever node leads the partition once no
            // record names it.
            Err(why) => tracing::warn!(
                cold_key = %cref.key,
                error = %why,
                "a restored object's switch is not known to be on the replicas; its cold copy is kept for the orphan sweep"
            ),
        }
        Ok(Restore::Done(rec.size))
    }

    /// Deletes a cold copy a restore replaced after the orphan grace (reads that began
    /// before the restore still fetch from it), while this node leads `p`; the orphan
    /// sweep leaves it alone until then.
    fn retire_cold_copy(&self, cold: &Arc<ColdTier>, cold_key: String, p: PartitionId) {
        let grace = cold.retire_grace;
        lock(&self.inner.restore.retiring)
            .insert(cold_key.clone(), std::time::Instant::now() + grace);
        let (me, cold) = (self.downgrade(), cold.clone());
        tokio::spawn(async move {
            tokio::time::sleep(grace).await;
            let Some(store) = me.upgrade() else { return };
            if store.led_partitions().contains(p)
                && let Err(e) = cold.delete(&cold_key).await
            {
                tracing::warn!(key = %cold_key, error = %e, "could not delete a restored object's cold copy; the orphan sweep retries");
            }
            lock(&store.inner.restore.retiring).remove(&cold_key);
        });
    }

    /// One engine write that makes the record under `key` name `new` instead of the
    /// data of `rec`, only if it is still that version with that data; `Ok(false)` if
    /// it changed or went away. New chunk files travel to the replicas with the write;
    /// `restored_at` stamps a restore.
    async fn switch_data(
        &self,
        key: Vec<u8>,
        rec: &super::ObjectRecord,
        new: ObjectData,
        dirs: Vec<std::path::PathBuf>,
        restored_at: Option<i64>,
    ) -> std::result::Result<bool, EngineError> {
        let (version, old) = (rec.version, rec.data.clone());
        self.engine()
            .write(dirs, move |ctx| {
                let mut t = ctx.txn.open_table(OBJECTS)?;
                let Some(cur) = t.get(key.as_slice())?.map(|v| v.value().to_vec()) else {
                    return Ok(false);
                };
                let mut cur = decode_record(&cur).map_err(|e| EngineError::Db(e.to_string()))?;
                if cur.version != version || cur.data != old {
                    return Ok(false);
                }
                cur.data = new;
                if restored_at.is_some() {
                    cur.ext.restored_at = restored_at;
                }
                t.insert(key.as_slice(), encode_ext(&cur)?.as_slice())?;
                drop(t);
                ctx.ship_chunks(cur.data.chunks());
                Ok(true)
            })
            .await
    }

    /// Deletes cold copies of the partitions this node leads that no object record
    /// names and that are older than `grace`. Returns how many.
    pub async fn sweep_cold_orphans(&self, cold: &Arc<ColdTier>, grace: Duration) -> Result<u64> {
        let listed = cold.list("").await.map_err(cold_err)?;
        // Copies of partitions this node leads; the rest are their primaries' business.
        if listed.is_empty() {
            return Ok(0);
        }
        let led = self.led_partitions();
        let named = self
            .engine()
            .read(move |txn| {
                let t = txn.open_table(OBJECTS)?;
                let mut named = std::collections::HashSet::new();
                for e in t.iter()? {
                    let (_, v) = e?;
                    match decode_record(v.value()) {
                        Ok(rec) => {
                            if let ObjectData::Cold(r) = rec.data {
                                named.insert(r.key);
                            }
                        }
                        // A record this node cannot read might name any copy.
                        Err(e) => return Ok(Err(e)),
                    }
                }
                Ok(Ok(named))
            })
            .await??;
        let cutoff = now_millis().saturating_sub(grace.as_millis() as i64);
        let mut deleted = 0;
        for (key, modified) in listed {
            let Some(p) = partition_of(&key) else {
                continue;
            };
            if !led.contains(p)
                || named.contains(&key)
                || modified > cutoff
                || self.inner.restore.is_retiring(&key)
            {
                continue;
            }
            // Still leading right before the delete (see `discard_data`).
            if !self.led_partitions().contains(p) {
                continue;
            }
            cold.delete(&key).await.map_err(cold_err)?;
            tracing::info!(key = %key, "deleted a cold copy no object names (left by an interrupted move or delete)");
            deleted += 1;
        }
        Ok(deleted)
    }

    /// Reads `range` of cold data, each piece in the reader's turn at the I/O scheduler.
    pub(crate) async fn read_cold(
        &self,
        r: &ColdRef,
        range: std::ops::Range<u64>,
        io: data::Io,
    ) -> Result<data::ObjectBody> {
        let cold = self.cold_or_err()?;
        let (len, stream) = cold.read(r, range, io).await.map_err(cold_err)?;
        Ok(data::ObjectBody { len, stream })
    }
}

/// The partition a cold copy's name belongs to (`p<5 digits>/...`).
fn partition_of(key: &str) -> Option<PartitionId> {
    key.strip_prefix('p')
        .and_then(|k| k.get(..5))
        .and_then(|d| d.parse::<u16>().ok())
        .map(PartitionId)
}

/// A cold-tier error as the model reports it.
pub(crate) fn cold_err(e: crate::cold::ColdError) -> Error {
    match e {
        crate::cold::ColdError::Unavailable(m) => Error::ColdTierUnavailable(m),
        crate::cold::ColdError::Corrupt(m) => Error::Corrupt(m),
        crate::cold::ColdError::Missing(k) => Error::Corrupt(format!(
            "the cold copy {k} of this object is missing from the cold tier"
        )),
        crate::cold::ColdError::Local(m) => Error::Corrupt(format!("local data: {m}")),
    }
}

#[cfg(test)]
mod tests {
    use bytes::Bytes;

    use super::*;
    use crate::cold::ColdConfig;
    use crate::model::data::ByteStream;
    use crate::model::object::{Conditions, ObjectMeta};

    /// A store with a tenant and a `file://` cold tier under `dir` (no grace for
    /// deletes).
    async fn store_with_cold_tier(dir: &std::path::Path) -> (Store, TenantId, Arc<ColdTier>) {
        let (s, t) = crate::model::test_store_with_tenant(&dir.join("node")).await;
        let cold = Arc::new(
            ColdTier::open(&ColdConfig {
                url: format!("file://{}", dir.join("cold").display()),
                options: Vec::new(),
                timeout: Duration::from_secs(5),
                delete_grace: Duration::ZERO,
                retire_grace: Duration::ZERO,
            })
            .unwrap(),
        );
        s.set_cold_tier(cold.clone());
        (s, t, cold)
    }

    /// Changes the tenant's tiering policy in the catalog.
    async fn set_tiering(s: &Store, t: TenantId, f: impl FnOnce(&mut crate::catalog::Tiering)) {
        let tenant = s.catalog().tenant_by_id(t).await.unwrap().unwrap();
        let mut spec = tenant.spec.clone();
        f(&mut spec.tiering);
        s.catalog()
            .update_tenant(&tenant.name, &spec)
            .await
            .unwrap();
    }

    fn body(len: usize, seed: u8) -> ByteStream {
        Box::pin(futures::stream::iter([Ok(Bytes::from(vec![seed; len]))]))
    }

    /// Moving an object to the cold tier moves its bytes from the hot to the cold
    /// counter (the total, which quotas limit, stays); deleting or overwriting a cold
    /// object gives its cold bytes back; the counters always equal a recount.
    #[tokio::test]
    async fn a_move_shifts_bytes_from_hot_to_cold_in_the_counters() {
        let dir = tempfile::tempdir().unwrap();
        let (s, t, _) = store_with_cold_tier(dir.path()).await;
        s.create_bucket(t, "b").await.unwrap();
        let sizes = [("cold/a", 1000usize), ("cold/b", 3 << 20), ("hot/c", 5000)];
        for (k, len) in sizes {
            s.put_object(
                t,
                "b",
                k,
                body(len, 1),
                None,
                ObjectMeta::default(),
                Conditions::default(),
            )
            .await
            .unwrap();
        }
        let usage = || async { s.tenant_usage_in(t, &s.all_partitions()).await.unwrap() };
        let total: u64 = sizes.iter().map(|(_, l)| *l as u64).sum();
        let before = usage().await;
        assert_eq!((before.hot_bytes, before.cold_bytes), (total, 0));

        let lc = Lifecycle {
            rules: vec![LifecycleRule {
                enabled: true,
                prefix: "cold/".into(),
                storage_class: "GLACIER".into(),
                ..Default::default()
            }],
        };
        s.set_bucket_setting(
            t,
            "b",
            LIFECYCLE,
            Some(&serde_json::to_string(&lc).unwrap()),
        )
        .await
        .unwrap();
        let out = s.tier_pass(u64::MAX).await.unwrap();
        assert_eq!(out.moved, 2, "{out:?}");
        let moved = 1000 + (3u64 << 20);
        let after = usage().await;
        assert_eq!(after.storage_bytes, total, "quotas count both tiers");
        assert_eq!(after.object_bytes, total);
        assert_eq!((after.hot_bytes, after.cold_bytes), (total - moved, moved));
        assert!(s.engine().verify_usage().await.unwrap().is_empty());
        assert_eq!(s.engine().usage_total().await.unwrap().cold_bytes, moved);

        // A cold read takes the reader's turns at the I/O scheduler (one per piece), as
        // a hot read does.
        let class = crate::tenancy::sched::Class::Tenant(t);
        let before = s.io_scheduler().charged(class);
        let (_, _, read) = s
            .get_object(t, "b", "cold/b", None, &Conditions::default())
            .await
            .unwrap();
        let got = futures::TryStreamExt::try_fold(read.stream, Vec::new(), |mut v, b| async move {
            v.extend_from_slice(&b);
            Ok(v)
        })
        .await
        .unwrap();
        assert_eq!(got, vec![1u8; 3 << 20]);
        assert!(
            s.io_scheduler().charged(class) > before,
            "the cold read was charged to its tenant"
        );

        // Deleting a cold object and overwriting another (hot again) give it back.
        s.delete_object(t, "b", "cold/a").await.unwrap();
        assert_eq!(usage().await.cold_bytes, 3 << 20);
        s.put_object(
            t,
            "b",
            "cold/b",
            body(10, 2),
            None,
            ObjectMeta::default(),
            Conditions::default(),
        )
        .await
        .unwrap();
        let end = usage().await;
        assert_eq!((end.hot_bytes, end.cold_bytes), (5000 + 10, 0));
        assert!(s.engine().verify_usage().await.unwrap().is_empty());
    }

    async fn read_all(s: &Store, t: TenantId, key: &str) -> Vec<u8> {
        let (_, _, read) = s
            .get_object(t, "b", key, None, &Conditions::default())
            .await
            .unwrap();
        futures::TryStreamExt::try_fold(read.stream, Vec::new(), |mut v, b| async move {
            v.extend_from_slice(&b);
            Ok(v)
        })
        .await
        .unwrap()
    }

    async fn is_cold(s: &Store, t: TenantId, key: &str) -> bool {
        s.head_object(t, "b", key).await.unwrap().data.is_cold()
    }

    /// Restore on read: a cold object read `restoreAfterReads` times comes back to the
    /// hot tier at the mover's next pass, byte-identical, with its cold copy deleted
    /// and its lifecycle age counted from the restore (it does not move straight back);
    /// an object overwritten after its reads were counted is left alone; without the
    /// policy reads count for nothing.
    #[tokio::test]
    async fn objects_read_often_enough_come_back_to_the_hot_tier() {
        let dir = tempfile::tempdir().unwrap();
        let (s, t, cold) = store_with_cold_tier(dir.path()).await;
        s.create_bucket(t, "b").await.unwrap();
        let big: Vec<u8> = (0..(3u32 << 20)).map(|i| (i % 251) as u8).collect();
        let objects = [
            ("big", big.clone()),
            ("small", b"tiny".to_vec()),
            ("other", vec![9u8; 5000]),
        ];
        for (k, v) in &objects {
            s.put_object(
                t,
                "b",
                k,
                Box::pin(futures::stream::iter([Ok(Bytes::from(v.clone()))])),
                None,
                ObjectMeta::default(),
                Conditions::default(),
            )
            .await
            .unwrap();
        }
        set_tiering(&s, t, |p| p.cold_after_seconds = Some(2)).await;
        tokio::time::sleep(Duration::from_millis(2100)).await;
        assert_eq!(s.tier_pass(u64::MAX).await.unwrap().moved, 3);

        // Without the policy, reads are not counted.
        for _ in 0..3 {
            assert_eq!(read_all(&s, t, "big").await, big);
        }
        set_tiering(&s, t, |p| p.restore_after_reads = Some(2)).await;
        let out = s.tier_pass(u64::MAX).await.unwrap();
        assert_eq!((out.restored, out.moved), (0, 0), "{out:?}");

        // One read is not enough; the second makes it due.
        assert_eq!(read_all(&s, t, "big").await, big);
        assert_eq!(read_all(&s, t, "small").await, b"tiny");
        assert_eq!(read_all(&s, t, "other").await, vec![9u8; 5000]);
        assert_eq!(s.tier_pass(u64::MAX).await.unwrap().restored, 0);
        assert_eq!(read_all(&s, t, "big").await, big);
        assert_eq!(read_all(&s, t, "small").await, b"tiny");
        assert_eq!(read_all(&s, t, "other").await, vec![9u8; 5000]);
        // "other" is overwritten (hot again, new version) before the pass.
        s.put_object(
            t,
            "b",
            "other",
            body(10, 4),
            None,
            ObjectMeta::default(),
            Conditions::default(),
        )
        .await
        .unwrap();
        let out = s.tier_pass(u64::MAX).await.unwrap();
        assert_eq!(
            (out.restored, out.restored_bytes, out.moved),
            (2, (3u64 << 20) + 4, 0),
            "{out:?}"
        );
        // The restored objects' age counts from the restore: the next pass leaves them.
        assert_eq!(s.tier_pass(u64::MAX).await.unwrap().moved, 0);
        for k in ["big", "small", "other"] {
            assert!(!is_cold(&s, t, k).await, "{k} is hot");
        }
        let rec = s.head_object(t, "b", "big").await.unwrap();
        assert!(rec.ext.restored_at.is_some_and(|r| r > rec.last_modified));
        assert_eq!(
            rec.etag,
            hex::encode(<md5::Md5 as md5::Digest>::digest(&big))
        );
        assert_eq!(read_all(&s, t, "big").await, big);
        assert_eq!(read_all(&s, t, "small").await, b"tiny");
        assert_eq!(read_all(&s, t, "other").await, vec![4u8; 10]);
        let usage = s.tenant_usage_in(t, &s.all_partitions()).await.unwrap();
        assert_eq!(usage.cold_bytes, 0);
        assert!(s.engine().verify_usage().await.unwrap().is_empty());

        // The replaced cold copies go (grace zero here); nothing is left in the tier.
        for _ in 0..100 {
            if cold.list("").await.unwrap().is_empty() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert!(
            cold.list("").await.unwrap().is_empty(),
            "no cold copy is left"
        );

        // Two seconds after the restore they are cold again.
        tokio::time::sleep(Duration::from_millis(2100)).await;
        assert_eq!(s.tier_pass(u64::MAX).await.unwrap().moved, 3);
        assert_eq!(read_all(&s, t, "big").await, big);

        // The switch is conditional: a record that changed since it was read is left
        // alone (a restore or move that raced an overwrite).
        let stale = s.head_object(t, "b", "small").await.unwrap();
        s.put_object(
            t,
            "b",
            "small",
            body(3, 5),
            None,
            ObjectMeta::default(),
            Conditions::default(),
        )
        .await
        .unwrap();
        let (_, mut k) = s.object_location(t, "b").await.unwrap();
        k.extend_from_slice(b"small");
        let switched = s
            .switch_data(
                k,
                &stale,
                ObjectData::inline(b"tiny".to_vec()),
                vec![],
                Some(1),
            )
            .await
            .unwrap();
        assert!(!switched, "a stale switch is refused");
        assert_eq!(read_all(&s, t, "small").await, vec![5u8; 3]);
    }

    /// A tenant policy limited to some buckets and a key prefix moves only what it
    /// names.
    #[tokio::test]
    async fn a_tenant_policy_moves_only_its_buckets_and_prefix() {
        let dir = tempfile::tempdir().unwrap();
        let (s, t, _) = store_with_cold_tier(dir.path()).await;
        for b in ["b", "c"] {
            s.create_bucket(t, b).await.unwrap();
            for k in ["logs/x", "data/y"] {
                s.put_object(
                    t,
                    b,
                    k,
                    body(100, 1),
                    None,
                    ObjectMeta::default(),
                    Conditions::default(),
                )
                .await
                .unwrap();
            }
        }
        set_tiering(&s, t, |p| {
            p.cold_after_seconds = Some(0);
            p.buckets = vec!["b".into()];
            p.prefix = "logs/".into();
        })
        .await;
        assert_eq!(s.tier_pass(u64::MAX).await.unwrap().moved, 1);
        for (b, k, cold) in [
            ("b", "logs/x", true),
            ("b", "data/y", false),
            ("c", "logs/x", false),
            ("c", "data/y", false),
        ] {
            let rec = s.head_object(t, b, k).await.unwrap();
            assert_eq!(rec.data.is_cold(), cold, "{b}/{k}");
        }
    }

    /// The read counter stays bounded: one tenant gets at most its share of the table
    /// (another is still counted), and a pass forgets the counts of partitions this
    /// node does not lead and of tenants without the policy.
    #[test]
    fn the_read_counter_is_bounded_per_tenant_and_forgets() {
        let r = RestoreOnRead::default();
        let a = TenantId(uuid::Uuid::from_u128(1));
        let b = TenantId(uuid::Uuid::from_u128(2));
        let mut all = crate::model::PartitionSet::none(4);
        for p in 0..4 {
            all.insert(PartitionId(p));
        }
        r.refresh([(a, 1), (b, 1)].into(), &all);
        let key = |p: u16, i: u32| {
            let mut k = p.to_be_bytes().to_vec();
            k.extend_from_slice(&i.to_be_bytes());
            k
        };
        for i in 0..(MAX_COUNTED_PER_TENANT as u32 + 100) {
            r.count(a, key(0, i), 1);
        }
        assert_eq!(r.counted(), MAX_COUNTED_PER_TENANT);
        r.count(b, key(1, 0), 1);
        assert_eq!(
            r.counted(),
            MAX_COUNTED_PER_TENANT + 1,
            "b is still counted"
        );
        assert_eq!(r.due().len(), MAX_COUNTED_PER_TENANT + 1);
        // Partition 0 is not led any more, and a loses the policy: only b's count stays.
        let mut led = crate::model::PartitionSet::none(4);
        led.insert(PartitionId(1));
        r.refresh([(b, 1)].into(), &led);
        assert_eq!(r.counted(), 1);
        r.refresh(HashMap::new(), &led);
        assert_eq!(r.counted(), 0);
        r.count(b, key(1, 0), 1);
        assert_eq!(r.counted(), 0, "no policy, no count");
    }
}
