//! The per-partition replication log: every change a write makes to a partition's tables,
//! recorded as it is made and stored, in the same transaction as the change itself, as one
//! numbered entry of that partition's log. A replica that applies a partition's entries
//! in order holds exactly what the primary holds; docs/cluster.md ("Replication").
//!
//! - Writes see [`TrackedTxn`] instead of the redb transaction: its tables record every
//!   insert and remove. It offers no other way to change a table (no `DerefMut`), so a
//!   change that escapes the log does not compile.
//! - Entries are keyed `partition (2) | lsn (8, big-endian)` in [`REPL_LOG`], so a
//!   partition's log is a contiguous range that travels with its snapshot; the last
//!   number is in [`PART_LSN`]. Only the newest [`LOG_KEEP`] entries of a partition are
//!   kept: a replica further behind catches up from a snapshot.
//! - The node-local table `meta` is not logged.

use std::borrow::Borrow;
use std::cell::RefCell;

use redb::{AccessGuard, Key, ReadableTable, StorageError, TableDefinition, TableHandle, Value};
use serde::{Deserialize, Serialize};

use super::chunk::ChunkRef;
use super::snapshot::{AGE_PREFIX, AGE_TABLE, KEY_TABLES, VALUE_TABLES};
use super::usage::UsageDeltas;
use super::{Engine, EngineError, UPLOADS_BY_AGE};
use crate::types::PartitionId;

/// Log entries: `partition (2) | lsn (8)` -> postcard [`LogEntry`].
pub const REPL_LOG: TableDefinition<&[u8], &[u8]> = TableDefinition::new("repl_log");
/// The number of each partition's last log entry: `partition (2)` -> lsn.
pub const PART_LSN: TableDefinition<&[u8], u64> = TableDefinition::new("part_lsn");
/// Entries kept per partition (older ones are removed as new ones are appended).
pub const LOG_KEEP: u64 = 1024;
/// An entry is closed at the next write boundary once its changes reach this size.
pub const ENTRY_BYTES: usize = 4 << 20;

/// One change to one table (numbered as in partition snapshots).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Change {
    Put {
        table: u8,
        #[serde(with = "serde_bytes")]
        key: Vec<u8>,
        /// None in tables that are sets of keys.
        value: Option<serde_bytes::ByteBuf>,
    },
    Delete {
        table: u8,
        #[serde(with = "serde_bytes")]
        key: Vec<u8>,
    },
}

/// What one group commit changed in one partition (a commit whose changes to a
/// partition exceed [`ENTRY_BYTES`] writes several entries, split between writes).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LogEntry {
    /// The epoch of the primary that wrote it.
    pub epoch: u64,
    /// The primary's version counter after the commit: a replica keeps its own above it,
    /// so versions never repeat if it becomes the primary.
    pub seq: u64,
    pub changes: Vec<Change>,
    /// Chunk files the changes make reachable: a replica must hold them before it
    /// applies the entry.
    pub chunks: Vec<ChunkRef>,
    /// Chunk files no longer referenced on the primary: a replica removes them (after
    /// the same grace period for reads in flight).
    pub freed: Vec<ChunkRef>,
}

impl LogEntry {
    pub fn encode(&self) -> Result<Vec<u8>, EngineError> {
        postcard::to_allocvec(self).map_err(|e| EngineError::Db(format!("log entry: {e}")))
    }

    pub fn decode(bytes: &[u8]) -> Result<Self, EngineError> {
        postcard::from_bytes(bytes)
            .map_err(|e| EngineError::Format(format!("replication log entry: {e}")))
    }

    /// About how many bytes the entry takes (keys, values and chunk references).
    pub fn size(&self) -> usize {
        let refs = (self.chunks.len() + self.freed.len()) * std::mem::size_of::<ChunkRef>();
        // Each change's own allocations and enum, besides its key and value bytes.
        let per_change = std::mem::size_of::<Change>() + 32;
        self.changes
            .iter()
            .map(|c| c.size() + per_change)
            .sum::<usize>()
            + refs
            + std::mem::size_of::<Self>()
    }
}

impl Change {
    /// Bytes of key and value.
    pub fn size(&self) -> usize {
        match self {
            Change::Put { key, value, .. } => key.len() + value.as_ref().map_or(0, |v| v.len()),
            Change::Delete { key, .. } => key.len(),
        }
    }
}

pub fn log_key(p: PartitionId, lsn: u64) -> [u8; 10] {
    let mut k = [0; 10];
    k[..2].copy_from_slice(&p.0.to_be_bytes());
    k[2..].copy_from_slice(&lsn.to_be_bytes());
    k
}

/// The number a replicated table has in logs and snapshots; None: not replicated.
fn table_number(name: &str) -> Option<u8> {
    VALUE_TABLES
        .iter()
        .map(|(n, d)| (*n, d.name()))
        .chain(KEY_TABLES.iter().map(|(n, d)| (*n, d.name())))
        .chain([(AGE_TABLE, UPLOADS_BY_AGE.name())])
        .find(|(_, t)| *t == name)
        .map(|(n, _)| n)
}

/// The partition a key of table `table` belongs to.
pub fn partition_of(table: u8, key: &[u8]) -> Option<PartitionId> {
    let at = if table == AGE_TABLE { AGE_PREFIX } else { 0 };
    let b = key.get(at..at + 2)?;
    Some(PartitionId(u16::from_be_bytes([b[0], b[1]])))
}

/// A write transaction whose tables record what they change.
pub struct TrackedTxn<'a> {
    txn: &'a redb::WriteTransaction,
    changes: &'a RefCell<Vec<Change>>,
    usage: &'a RefCell<UsageDeltas>,
}

impl<'a> TrackedTxn<'a> {
    pub(super) fn new(
        txn: &'a redb::WriteTransaction,
        changes: &'a RefCell<Vec<Change>>,
        usage: &'a RefCell<UsageDeltas>,
    ) -> Self {
        Self {
            txn,
            changes,
            usage,
        }
    }

    pub fn open_table<K: Key + 'static, V: Value + 'static>(
        &self,
        def: TableDefinition<K, V>,
    ) -> Result<TrackedTable<'a, K, V>, redb::TableError> {
        Ok(TrackedTable {
            inner: self.txn.open_table(def)?,
            number: table_number(def.name()),
            changes: self.changes,
            usage: self.usage,
        })
    }

    /// The transaction itself, for the engine's own bookkeeping that is not replicated
    /// (or is replicated by other means: snapshot import, applying a log).
    pub(super) fn untracked(&self) -> &'a redb::WriteTransaction {
        self.txn
    }

    /// The usage counters' changes of this write, for changes made through
    /// [`Self::untracked`] (applying a log, importing a snapshot).
    pub(super) fn usage(&self) -> &'a RefCell<UsageDeltas> {
        self.usage
    }
}

/// A table of a [`TrackedTxn`]: reads go to the redb table (through `Deref`); changes
/// are recorded, then made.
pub struct TrackedTable<'a, K: Key + 'static, V: Value + 'static> {
    inner: redb::Table<'a, K, V>,
    number: Option<u8>,
    changes: &'a RefCell<Vec<Change>>,
    usage: &'a RefCell<UsageDeltas>,
}

impl<'a, K: Key + 'static, V: Value + 'static> std::ops::Deref for TrackedTable<'a, K, V> {
    type Target = redb::Table<'a, K, V>;

    fn deref(&self) -> &Self::Target {
        &self.inner
    }
}

impl<'a, K: Key + 'static, V: Value + 'static> TrackedTable<'a, K, V> {
    pub fn insert<'k, 'v>(
        &mut self,
        key: impl Borrow<K::SelfType<'k>>,
        value: impl Borrow<V::SelfType<'v>>,
    ) -> Result<Option<AccessGuard<'_, V>>, StorageError> {
        let Some(table) = self.number else {
            return self.inner.insert(key, value);
        };
        let has_value = (table as usize) < VALUE_TABLES.len();
        let k = K::as_bytes(key.borrow()).as_ref().to_vec();
        let v = has_value.then(|| serde_bytes::ByteBuf::from(V::as_bytes(value.borrow()).as_ref()));
        let old = self.inner.insert(key, value)?;
        if has_value {
            let old_value = old.as_ref().map(AccessGuard::value);
            let old_bytes = old_value.as_ref().map(|o| V::as_bytes(o));
            self.usage.borrow_mut().observe(
                table,
                &k,
                old_bytes.as_ref().map(AsRef::as_ref),
                v.as_deref().map(|b| &b[..]),
            );
        }
        self.changes.borrow_mut().push(Change::Put {
            table,
            key: k,
            value: v,
        });
        Ok(old)
    }

    pub fn remove<'k>(
        &mut self,
        key: impl Borrow<K::SelfType<'k>>,
    ) -> Result<Option<AccessGuard<'_, V>>, StorageError> {
        let Some(table) = self.number else {
            return self.inner.remove(key);
        };
        let k = K::as_bytes(key.borrow()).as_ref().to_vec();
        let old = self.inner.remove(key)?;
        if (table as usize) < VALUE_TABLES.len() {
            let old_value = old.as_ref().map(AccessGuard::value);
            let old_bytes = old_value.as_ref().map(|o| V::as_bytes(o));
            self.usage
                .borrow_mut()
                .observe(table, &k, old_bytes.as_ref().map(AsRef::as_ref), None);
        }
        self.changes
            .borrow_mut()
            .push(Change::Delete { table, key: k });
        Ok(old)
    }

    /// Removes every entry for which `keep` is false.
    pub fn retain<F: for<'f> FnMut(K::SelfType<'f>, V::SelfType<'f>) -> bool>(
        &mut self,
        keep: F,
    ) -> Result<(), StorageError> {
        let f = self.recording(keep);
        self.inner.retain(f)
    }

    /// Removes every entry in `range` for which `keep` is false.
    pub fn retain_in<'r, KR, F: for<'f> FnMut(K::SelfType<'f>, V::SelfType<'f>) -> bool>(
        &mut self,
        range: impl std::ops::RangeBounds<KR> + 'r,
        keep: F,
    ) -> Result<(), StorageError>
    where
        KR: Borrow<K::SelfType<'r>> + 'r,
    {
        let f = self.recording(keep);
        self.inner.retain_in(range, f)
    }

    /// `keep`, recording a delete for every entry it refuses.
    fn recording<F: for<'f> FnMut(K::SelfType<'f>, V::SelfType<'f>) -> bool>(
        &self,
        mut keep: F,
    ) -> impl for<'f> FnMut(K::SelfType<'f>, V::SelfType<'f>) -> bool + use<'a, K, V, F> {
        let (number, changes, usage) = (self.number, self.changes, self.usage);
        move |k, v| {
            let key = number.map(|_| K::as_bytes(&k).as_ref().to_vec());
            let counted = number
                .filter(|t| (*t as usize) < VALUE_TABLES.len())
                .map(|_| V::as_bytes(&v).as_ref().to_vec());
            let kept = keep(k, v);
            if let (false, Some(table), Some(key)) = (kept, number, key) {
                if let Some(old) = counted {
                    usage.borrow_mut().observe(table, &key, Some(&old), None);
                }
                changes.borrow_mut().push(Change::Delete { table, key });
            }
            kept
        }
    }
}

/// Applies one logged (or snapshot) change without recording it; counts it in `usage`.
pub(super) fn apply_change(
    txn: &redb::WriteTransaction,
    c: &Change,
    usage: &mut UsageDeltas,
) -> Result<(), EngineError> {
    let bad = |t: u8| EngineError::Format(format!("change to unknown table {t}"));
    match c {
        Change::Put {
            table,
            key,
            value: Some(v),
        } => {
            let (_, def) = VALUE_TABLES
                .iter()
                .find(|(n, _)| n == table)
                .ok_or_else(|| bad(*table))?;
            let mut t = txn.open_table(*def)?;
            let old = t.insert(key.as_slice(), v.as_slice())?;
            usage.observe(
                *table,
                key,
                old.as_ref().map(|o| o.value()),
                Some(v.as_slice()),
            );
        }
        Change::Put {
            table,
            key,
            value: None,
        } => {
            if *table == AGE_TABLE {
                txn.open_table(UPLOADS_BY_AGE)?.insert(key.as_slice(), ())?;
            } else {
                let (_, def) = KEY_TABLES
                    .iter()
                    .find(|(n, _)| n == table)
                    .ok_or_else(|| bad(*table))?;
                txn.open_table(*def)?.insert(key.as_slice(), ())?;
            }
        }
        Change::Delete { table, key } => {
            if let Some((_, def)) = VALUE_TABLES.iter().find(|(n, _)| n == table) {
                let mut t = txn.open_table(*def)?;
                let old = t.remove(key.as_slice())?;
                usage.observe(*table, key, old.as_ref().map(|o| o.value()), None);
            } else if *table == AGE_TABLE {
                txn.open_table(UPLOADS_BY_AGE)?.remove(key.as_slice())?;
            } else {
                let (_, def) = KEY_TABLES
                    .iter()
                    .find(|(n, _)| n == table)
                    .ok_or_else(|| bad(*table))?;
                txn.open_table(*def)?.remove(key.as_slice())?;
            }
        }
    }
    Ok(())
}

/// Whether every change names a table this binary knows (checked before applying any).
pub(super) fn known_tables(changes: &[Change]) -> bool {
    changes.iter().all(|c| match c {
        Change::Put {
            table,
            value: Some(_),
            ..
        } => (*table as usize) < VALUE_TABLES.len(),
        Change::Put { table, .. } | Change::Delete { table, .. } => {
            (*table as usize) < VALUE_TABLES.len() || (4..=AGE_TABLE).contains(table)
        }
    })
}

/// Appends `entry` as the next entry of `p`'s log inside `txn` and trims the log to
/// [`LOG_KEEP`] entries. Returns the entry's number.
pub(super) fn append(
    txn: &redb::WriteTransaction,
    p: PartitionId,
    entry: &LogEntry,
) -> Result<u64, EngineError> {
    let lsn = last_lsn(txn, p)? + 1;
    store(txn, p, lsn, &entry.encode()?)?;
    Ok(lsn)
}

/// Stores entry `lsn` of `p` (encoded), makes it the last, trims the log.
pub(super) fn store(
    txn: &redb::WriteTransaction,
    p: PartitionId,
    lsn: u64,
    encoded: &[u8],
) -> Result<(), EngineError> {
    let mut log = txn.open_table(REPL_LOG)?;
    log.insert(log_key(p, lsn).as_slice(), encoded)?;
    if lsn > LOG_KEEP {
        log.remove(log_key(p, lsn - LOG_KEEP).as_slice())?;
    }
    txn.open_table(PART_LSN)?
        .insert(p.0.to_be_bytes().as_slice(), lsn)?;
    Ok(())
}

pub(super) fn last_lsn(txn: &redb::WriteTransaction, p: PartitionId) -> Result<u64, EngineError> {
    Ok(txn
        .open_table(PART_LSN)?
        .get(p.0.to_be_bytes().as_slice())?
        .map_or(0, |v| v.value()))
}

/// Locks `m`, ignoring poisoning (as every lock of the log state always did).
fn lock<T>(m: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// What the engine shares about its logs with the replication layer.
#[derive(Default)]
pub struct LogState {
    /// The epoch new entries of a partition are written under (set by the primary).
    epochs: std::sync::Mutex<std::collections::HashMap<PartitionId, u64>>,
    /// Each partition's last committed entry.
    committed: std::sync::Mutex<std::collections::HashMap<PartitionId, u64>>,
    /// Each partition's last entry of a commit under way (published just before the
    /// commit makes its data visible).
    pending: std::sync::Mutex<std::collections::HashMap<PartitionId, u64>>,
    /// Per partition, bumped after every commit that logged something to it and when its
    /// entries are staged: each shipper wakes for its own partition only.
    ticks:
        std::sync::Mutex<std::collections::HashMap<PartitionId, tokio::sync::watch::Sender<u64>>>,
    /// Set by the replication layer: entries this node writes are kept in [`Self::recent`]
    /// from just before their commit, so they reach the replicas while the local fsync
    /// runs (docs/cluster.md, "Replication").
    early: std::sync::Mutex<std::collections::HashSet<PartitionId>>,
    /// The newest entries of each partition this node wrote itself, contiguous: every
    /// entry of a commit under way, and committed ones up to [`RECENT_BYTES`].
    recent: std::sync::Mutex<std::collections::HashMap<PartitionId, Recent>>,
}

/// Committed entries kept in memory per partition for shipping (entries of a commit
/// under way are kept whatever their size).
const RECENT_BYTES: usize = 64 << 10;

#[derive(Default)]
struct Recent {
    entries: std::collections::VecDeque<(u64, std::sync::Arc<LogEntry>, usize)>,
    bytes: usize,
    /// The highest entry handed to a shipper.
    taken: u64,
}

impl LogState {
    pub(super) fn load(db: &redb::Database) -> Result<Self, EngineError> {
        use redb::ReadableDatabase;
        let s = Self::default();
        let txn = db.begin_read()?;
        let mut committed = lock(&s.committed);
        for e in txn.open_table(PART_LSN)?.iter()? {
            let (k, v) = e?;
            if let [a, b] = k.value() {
                committed.insert(PartitionId(u16::from_be_bytes([*a, *b])), v.value());
            }
        }
        drop(committed);
        Ok(s)
    }

    pub(super) fn epoch(&self, p: PartitionId) -> u64 {
        let m = lock(&self.epochs);
        m.get(&p).copied().unwrap_or(0)
    }

    pub(super) fn pending(&self, logged: &[(PartitionId, u64)]) {
        let mut m = lock(&self.pending);
        for (p, lsn) in logged {
            m.insert(*p, *lsn);
        }
    }

    /// The commit failed: what was pending never happened.
    pub(super) fn abandoned(&self, logged: &[(PartitionId, u64)]) {
        let mut m = lock(&self.pending);
        for (p, _) in logged {
            m.remove(p);
        }
    }

    pub(super) fn committed(&self, logged: &[(PartitionId, u64)]) {
        if logged.is_empty() {
            return;
        }
        let mut m = lock(&self.committed);
        for (p, lsn) in logged {
            m.insert(*p, *lsn);
        }
        drop(m);
        {
            let mut recent = lock(&self.recent);
            for (p, lsn) in logged {
                if let Some(r) = recent.get_mut(p) {
                    while r.bytes > RECENT_BYTES
                        && r.entries.front().is_some_and(|(n, _, _)| n <= lsn)
                    {
                        if let Some((_, _, size)) = r.entries.pop_front() {
                            r.bytes -= size;
                        }
                    }
                }
            }
        }
        let mut partitions: Vec<PartitionId> = logged.iter().map(|(p, _)| *p).collect();
        partitions.dedup();
        self.tick(&partitions);
    }

    /// Keeps the entries of the commit about to happen (`entries`: partition, number,
    /// entry, in log order) of partitions shipped early where shippers find them, and
    /// wakes their shippers. Returns each staged partition with its first staged number
    /// (empty: nothing kept).
    pub(super) fn stage(
        &self,
        entries: Vec<(PartitionId, u64, LogEntry)>,
    ) -> Vec<(PartitionId, u64)> {
        let early = lock(&self.early);
        let mut staged: Vec<(PartitionId, u64)> = Vec::new();
        let mut recent = lock(&self.recent);
        for (p, lsn, e) in entries {
            if !early.contains(&p) {
                continue;
            }
            if staged.last().is_none_or(|(q, _)| *q != p) {
                staged.push((p, lsn));
            }
            let r = recent.entry(p).or_default();
            // Only a contiguous run is kept: a gap (entries applied from another
            // primary, a snapshot) starts it afresh.
            if r.entries.back().is_some_and(|(n, _, _)| n + 1 != lsn) {
                *r = Recent::default();
            }
            let size = e.size();
            r.bytes += size;
            r.entries.push_back((lsn, std::sync::Arc::new(e), size));
        }
        drop(recent);
        let partitions: Vec<PartitionId> = staged.iter().map(|(p, _)| *p).collect();
        self.tick(&partitions);
        staged
    }

    /// The commit of entries staged at `staged` failed: drops them if no shipper has
    /// taken any (true); false if one may be on a replica already.
    pub(super) fn unstage(&self, staged: &[(PartitionId, u64)]) -> bool {
        let mut recent = lock(&self.recent);
        if staged
            .iter()
            .any(|(p, first)| recent.get(p).is_some_and(|r| r.taken >= *first))
        {
            return false;
        }
        for (p, first) in staged {
            if let Some(r) = recent.get_mut(p) {
                while r.entries.back().is_some_and(|(n, _, _)| n >= first) {
                    if let Some((_, _, size)) = r.entries.pop_back() {
                        r.bytes -= size;
                    }
                }
            }
        }
        true
    }

    fn tick(&self, partitions: &[PartitionId]) {
        let ticks = lock(&self.ticks);
        for p in partitions {
            if let Some(t) = ticks.get(p) {
                t.send_modify(|t| *t += 1);
            }
        }
    }

    /// Forgets the kept entries of `p`: its log is being written by another primary's
    /// entries or a snapshot, so what is kept may no longer be its log.
    pub(super) fn forget(&self, p: PartitionId) {
        let mut recent = lock(&self.recent);
        recent.remove(&p);
    }
}

/// How long a replica keeps freed chunk files for reads that may still use them.
const FREED_GRACE: std::time::Duration = std::time::Duration::from_secs(5);

impl Engine {
    /// Logs that `chunks` are no longer referenced (after the commit that unreferenced
    /// them), so the replicas remove their copies too.
    pub async fn log_freed(&self, chunks: Vec<ChunkRef>) -> Result<(), EngineError> {
        self.write(vec![], move |ctx| {
            ctx.free_chunks(&chunks);
            Ok(())
        })
        .await
    }

    /// Entries of `p` written from now on carry `epoch`.
    pub fn set_epoch(&self, p: PartitionId, epoch: u64) {
        let mut m = lock(&self.log_state().epochs);
        m.insert(p, epoch);
    }

    /// The number of `p`'s last committed log entry (0: none).
    pub fn committed_lsn(&self, p: PartitionId) -> u64 {
        let m = lock(&self.log_state().committed);
        m.get(&p).copied().unwrap_or(0)
    }

    /// The number of `p`'s last entry whose data may be visible to a read (committed, or
    /// being committed right now): what an answer must wait for before it is released.
    pub fn visible_lsn(&self, p: PartitionId) -> u64 {
        let pending = {
            let m = lock(&self.log_state().pending);
            m.get(&p).copied().unwrap_or(0)
        };
        pending.max(self.committed_lsn(p))
    }

    /// Changes whenever a commit logged something to `p`, and when entries of `p` are
    /// staged for an early shipment.
    pub fn watch_log(&self, p: PartitionId) -> tokio::sync::watch::Receiver<u64> {
        let mut ticks = lock(&self.log_state().ticks);
        ticks
            .entry(p)
            .or_insert_with(|| tokio::sync::watch::channel(0).0)
            .subscribe()
    }

    /// From now on, entries this node writes to `p` can be shipped from just before
    /// their commit (in parallel with the local fsync) rather than after it. The
    /// replication layer turns this on for partitions it ships to other nodes; a commit
    /// that fails after a shipper took such an entry stops the process, since a replica
    /// may hold it (docs/cluster.md, "Replication").
    pub fn ship_early(&self, p: PartitionId) {
        lock(&self.log_state().early).insert(p);
    }

    /// The number of `p`'s last entry that can be shipped: committed, or staged for the
    /// commit under way.
    pub fn shippable_lsn(&self, p: PartitionId) -> u64 {
        let staged = {
            let recent = lock(&self.log_state().recent);
            recent
                .get(&p)
                .and_then(|r| r.entries.back())
                .map_or(0, |(n, _, _)| *n)
        };
        staged.max(self.committed_lsn(p))
    }

    /// The epoch of `p`'s entry `lsn` if it is among the entries kept in memory.
    pub fn recent_epoch(&self, p: PartitionId, lsn: u64) -> Option<u64> {
        let recent = lock(&self.log_state().recent);
        let r = recent.get(&p)?;
        let first = r.entries.front()?.0;
        let i = usize::try_from(lsn.checked_sub(first)?).ok()?;
        r.entries.get(i).map(|(_, e, _)| e.epoch)
    }

    /// Entries of `p` from number `from` on, for a shipment: from memory when they are
    /// kept there (the commit under way included), else from the stored log (as
    /// [`Self::read_log`]).
    pub async fn entries_to_ship(
        &self,
        p: PartitionId,
        from: u64,
        max: usize,
        max_bytes: usize,
    ) -> Result<Option<Vec<(u64, LogEntry)>>, EngineError> {
        let kept = {
            let mut recent = lock(&self.log_state().recent);
            let mut out = Vec::new();
            if let Some(r) = recent.get_mut(&p)
                && let Some(first) = r.entries.front().map(|(n, _, _)| *n)
                && first <= from
                && let Ok(skip) = usize::try_from(from - first)
                && skip < r.entries.len()
            {
                let mut bytes = 0;
                for (n, e, size) in r.entries.iter().skip(skip) {
                    out.push((*n, e.clone()));
                    bytes += size;
                    if out.len() >= max || bytes >= max_bytes {
                        break;
                    }
                }
                if let Some((n, _)) = out.last() {
                    r.taken = r.taken.max(*n);
                }
            }
            out
        };
        if !kept.is_empty() {
            // Copied outside the lock: the group commit stages and trims under it.
            return Ok(Some(
                kept.into_iter()
                    .map(|(n, e)| (n, LogEntry::clone(&e)))
                    .collect(),
            ));
        }
        self.read_log(p, from, max, max_bytes).await
    }
}

/// Where a partition's log stands on this node.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct LogPosition {
    /// Number of the last entry (0: none yet).
    pub lsn: u64,
    /// Epoch of the last entry (0: none, or trimmed away).
    pub epoch: u64,
}

impl Engine {
    /// The number and epoch of partition `p`'s last log entry.
    pub async fn log_position(&self, p: PartitionId) -> Result<LogPosition, EngineError> {
        self.read(move |txn| {
            let lsn = txn
                .open_table(PART_LSN)?
                .get(p.0.to_be_bytes().as_slice())?
                .map_or(0, |v| v.value());
            let epoch = match txn.open_table(REPL_LOG)?.get(log_key(p, lsn).as_slice())? {
                Some(e) => LogEntry::decode(e.value())?.epoch,
                None => 0,
            };
            Ok(LogPosition { lsn, epoch })
        })
        .await
    }

    /// Entries of `p` from number `from` on, at most `max` of them and about `max_bytes`
    /// (at least one). None if entry `from` is no longer (or not yet) in the log.
    pub async fn read_log(
        &self,
        p: PartitionId,
        from: u64,
        max: usize,
        max_bytes: usize,
    ) -> Result<Option<Vec<(u64, LogEntry)>>, EngineError> {
        self.read(move |txn| {
            let t = txn.open_table(REPL_LOG)?;
            let start = log_key(p, from);
            let end = log_key(p, u64::MAX);
            let mut out = Vec::new();
            let mut bytes = 0;
            for e in t.range(start.as_slice()..=end.as_slice())? {
                let (k, v) = e?;
                let lsn = u64::from_be_bytes(k.value()[2..10].try_into().unwrap_or_default());
                if out.is_empty() && lsn != from {
                    return Ok(None);
                }
                bytes += v.value().len();
                out.push((lsn, LogEntry::decode(v.value())?));
                if out.len() >= max || bytes >= max_bytes {
                    break;
                }
            }
            Ok((!out.is_empty()).then_some(out))
        })
        .await
    }

    /// Applies entries of `p`'s log received from its primary, in order, and stores them
    /// under the same numbers, all in one commit. The first must directly follow this
    /// node's last entry; returns the new last number.
    pub async fn apply_log(
        &self,
        p: PartitionId,
        entries: Vec<(u64, LogEntry)>,
    ) -> Result<u64, EngineError> {
        self.log_state().forget(p);
        // The directories of the chunk files these entries make reachable. A chunk the
        // primary no longer had when this replica caught up (its data was replaced or
        // moved to the cold tier since) was never sent and is not here: its directory
        // may not exist, and there is nothing in it to make durable.
        let dirs = entries
            .iter()
            .flat_map(|(_, e)| &e.chunks)
            .filter_map(|c| {
                self.chunks()
                    .path(c.partition, c.id)
                    .parent()
                    .map(std::path::Path::to_path_buf)
            })
            .collect::<std::collections::BTreeSet<_>>()
            .into_iter()
            // Each directory once; only those known to be absent are left out: a stat that
            // fails otherwise keeps the directory, whose sync then fails the write
            // (retried) rather than skipping it.
            .filter(|dir| !matches!(dir.try_exists(), Ok(false)))
            .collect();
        self.write(dirs, move |ctx| {
            let txn = ctx.txn.untracked();
            let mut next = last_lsn(txn, p)? + 1;
            for (lsn, e) in &entries {
                if *lsn != next {
                    return Err(EngineError::Format(format!(
                        "log entry {lsn} of partition {p} does not follow {}",
                        next - 1
                    )));
                }
                if !known_tables(&e.changes)
                    || e.changes.iter().any(|c| {
                        let (Change::Put { table, key, .. } | Change::Delete { table, key }) = c;
                        partition_of(*table, key) != Some(p)
                    })
                {
                    return Err(EngineError::Format(format!(
                        "log entry {lsn} of partition {p} changes another partition or an \
                         unknown table"
                    )));
                }
                next += 1;
            }
            let mut freed = Vec::new();
            let usage = ctx.txn.usage();
            for (lsn, e) in &entries {
                for c in &e.changes {
                    apply_change(txn, c, &mut usage.borrow_mut())?;
                }
                ctx.raise_seq_to(e.seq);
                store(txn, p, *lsn, &e.encode()?)?;
                ctx.logged(p, *lsn);
                freed.extend(e.freed.iter().cloned());
            }
            Ok((next - 1, freed))
        })
        .await
        .map(|(last, freed)| {
            if !freed.is_empty() {
                let chunks = self.chunks().clone();
                tokio::spawn(async move {
                    tokio::time::sleep(FREED_GRACE).await;
                    chunks.remove_when_unused(freed);
                });
            }
            last
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(epoch: u64, key: &[u8]) -> LogEntry {
        LogEntry {
            epoch,
            seq: 1,
            changes: vec![Change::Delete {
                table: 0,
                key: key.to_vec(),
            }],
            chunks: Vec::new(),
            freed: Vec::new(),
        }
    }

    /// A replica catching up applies an entry that names a chunk file its primary no
    /// longer had (replaced or moved to the cold tier since, so never sent), even in a
    /// partition whose chunk directory does not exist here; and a write whose chunk
    /// directory cannot be synced fails alone, not the writes committed with it.
    #[tokio::test]
    async fn a_chunk_that_never_came_does_not_block_the_log_or_other_writes() {
        let dir = tempfile::tempdir().unwrap();
        let engine = Engine::open(dir.path()).unwrap();
        let p = PartitionId(3);
        let mut e = entry(1, &[0, 3, 1]);
        e.chunks = vec![ChunkRef {
            id: crate::types::ChunkId::random(),
            partition: p,
            len: 10,
        }];
        let missing_dir = engine.chunks().path(p, e.chunks[0].id);
        assert!(!missing_dir.parent().unwrap().exists());
        assert_eq!(engine.apply_log(p, vec![(1, e)]).await.unwrap(), 1);

        let gone = dir.path().join("no-such-directory");
        let (bad, good) = tokio::join!(
            engine.write(vec![gone], |_| Ok(())),
            engine.write(Vec::new(), |_| Ok(()))
        );
        let err = bad.expect_err("its directory cannot be synced").to_string();
        assert!(err.contains("no-such-directory"), "{err}");
        good.expect("a write without that directory commits");
    }

    /// Entries of a commit under way are offered to shippers before the commit is
    /// durable, only contiguously, and only once early shipping is on.
    #[tokio::test]
    async fn staged_entries_are_shippable_before_their_commit() {
        let dir = tempfile::tempdir().unwrap();
        let engine = Engine::open(dir.path()).unwrap();
        let p = PartitionId(3);
        let logs = engine.log_state();
        assert!(
            logs.stage(vec![(p, 1, entry(4, b"a"))]).is_empty(),
            "off by default"
        );
        assert_eq!(engine.shippable_lsn(p), 0);

        engine.ship_early(p);
        let mut tick = engine.watch_log(p);
        let other = engine.watch_log(PartitionId(4));
        tick.borrow_and_update();
        let staged = logs.stage(vec![
            (p, 1, entry(4, b"a")),
            (p, 2, entry(4, b"b")),
            (PartitionId(4), 1, entry(4, b"x")),
        ]);
        assert_eq!(staged, vec![(p, 1)], "only partitions shipped early");
        assert!(
            tick.has_changed().unwrap(),
            "the partition's shippers are woken"
        );
        assert!(!other.has_changed().unwrap(), "another partition's are not");
        assert_eq!(engine.committed_lsn(p), 0);
        assert_eq!(engine.shippable_lsn(p), 2);
        assert_eq!(engine.recent_epoch(p, 2), Some(4));
        let offered = engine.entries_to_ship(p, 2, 10, usize::MAX).await.unwrap();
        assert_eq!(offered, Some(vec![(2, entry(4, b"b"))]));

        // A failed commit of entries a shipper took may not be undone (the node stops);
        // of entries none took, it may.
        assert!(!logs.unstage(&[(p, 2)]), "entry 2 was taken");
        assert_eq!(logs.stage(vec![(p, 3, entry(4, b"c"))]), vec![(p, 3)]);
        assert!(logs.unstage(&[(p, 3)]));
        assert_eq!(engine.shippable_lsn(p), 2);

        // A gap starts the kept run afresh.
        assert_eq!(logs.stage(vec![(p, 7, entry(5, b"c"))]), vec![(p, 7)]);
        assert_eq!(engine.recent_epoch(p, 1), None);
        assert_eq!(engine.recent_epoch(p, 7), Some(5));
        // Nothing stored and nothing kept before 7: not offered.
        assert_eq!(
            engine.entries_to_ship(p, 1, 10, usize::MAX).await.unwrap(),
            None
        );

        logs.forget(p);
        assert_eq!(engine.shippable_lsn(p), 0);
        assert_eq!(
            engine.entries_to_ship(p, 7, 10, usize::MAX).await.unwrap(),
            None
        );
    }
}
