//! Group commit: one thread owns the redb write side. Each loop takes every write
//! waiting at that moment, fsyncs the chunk directories they need, applies them in
//! arrival order inside one transaction and commits it with a single durable flush;
//! only then is each caller answered. Under concurrency N writers share one fsync.

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::sync::Arc;

use std::cell::RefCell;
use std::collections::BTreeMap;

use tokio::sync::{mpsc, oneshot};

use super::chunk::ChunkRef;
use super::replog::{self, Change, LogEntry, LogState, TrackedTxn};
use super::usage::UsageDeltas;
use super::{EngineError, META};
use crate::types::PartitionId;

/// What a queued write sees: the shared transaction (whose tables log every change to
/// the partitions' replication logs) and the node's sequence counter.
pub struct WriteCtx<'a> {
    pub txn: TrackedTxn<'a>,
    seq: &'a mut u64,
    chunks: Vec<ChunkRef>,
    freed: Vec<ChunkRef>,
    logged: &'a mut Vec<(PartitionId, u64)>,
}

impl WriteCtx<'_> {
    /// Declares chunk files this write makes reachable (new object or part data): they
    /// travel to the replicas with the log entry.
    pub fn ship_chunks(&mut self, chunks: &[ChunkRef]) {
        self.chunks.extend_from_slice(chunks);
    }

    /// Declares chunk files no longer referenced (replaced or deleted data): the
    /// replicas remove their copies when they apply the entry.
    pub fn free_chunks(&mut self, chunks: &[ChunkRef]) {
        self.freed.extend_from_slice(chunks);
    }

    /// Notes that this write stored log entry `lsn` of `p` itself (applying a log).
    pub(super) fn logged(&mut self, p: PartitionId, lsn: u64) {
        self.logged.push((p, lsn));
    }

    /// A fresh number, strictly greater than every one handed out before (also across
    /// restarts). KV versions and object versions come from here.
    pub fn next_seq(&mut self) -> u64 {
        *self.seq += 1;
        *self.seq
    }

    /// Makes every later number greater than `floor` (data imported from another node
    /// carries that node's numbers).
    pub fn raise_seq_to(&mut self, floor: u64) {
        *self.seq = (*self.seq).max(floor);
    }
}

type Done = Box<dyn FnOnce(Result<(), String>) + Send>;
type Job = Box<dyn FnOnce(&mut WriteCtx<'_>) -> Done + Send>;
/// Answers a write that was not run (its chunk files could not be made durable).
type Fail = Box<dyn FnOnce(String) + Send>;

enum Msg {
    Write {
        dirs: Vec<PathBuf>,
        job: Job,
        fail: Fail,
    },
    Shutdown(oneshot::Sender<()>),
}

#[derive(Clone)]
pub(super) struct Committer {
    tx: mpsc::UnboundedSender<Msg>,
}

/// Most writes folded into one transaction; bounds the latency of the first in line.
const MAX_BATCH: usize = 512;

impl Committer {
    pub fn start(db: Arc<redb::Database>, logs: Arc<LogState>) -> Result<Self, EngineError> {
        let (tx, rx) = mpsc::unbounded_channel();
        std::thread::Builder::new()
            .name("granary-commit".into())
            .spawn(move || run(db, logs, rx))?;
        Ok(Self { tx })
    }

    pub async fn submit<T, F>(&self, dirs: Vec<PathBuf>, f: F) -> Result<T, EngineError>
    where
        T: Send + 'static,
        F: FnOnce(&mut WriteCtx<'_>) -> Result<T, EngineError> + Send + 'static,
    {
        let (done_tx, done_rx) = oneshot::channel::<Result<T, EngineError>>();
        // Either the job answers (after the commit) or `fail` does (it never ran).
        let done_tx = Arc::new(std::sync::Mutex::new(Some(done_tx)));
        let answer = move |tx: &std::sync::Mutex<Option<oneshot::Sender<_>>>, r| {
            if let Some(tx) = tx
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .take()
            {
                let _ = tx.send(r);
            }
        };
        let fail_tx = done_tx.clone();
        let fail: Fail = Box::new(move |e| answer(&fail_tx, Err(EngineError::Db(e))));
        let job: Job = Box::new(move |ctx| {
            let outcome = f(ctx);
            Box::new(move |committed: Result<(), String>| {
                let r = match committed {
                    Ok(()) => outcome,
                    Err(e) => Err(EngineError::Db(e)),
                };
                answer(&done_tx, r);
            })
        });
        self.tx
            .send(Msg::Write { dirs, job, fail })
            .map_err(|_| EngineError::Closed)?;
        done_rx.await.map_err(|_| EngineError::Closed)?
    }

    pub async fn shutdown(&self) {
        let (tx, rx) = oneshot::channel();
        if self.tx.send(Msg::Shutdown(tx)).is_ok() {
            let _ = rx.await;
        }
    }
}

fn run(db: Arc<redb::Database>, logs: Arc<LogState>, mut rx: mpsc::UnboundedReceiver<Msg>) {
    let mut seq = match load_seq(&db) {
        Ok(s) => s,
        Err(e) => {
            tracing::error!(error = %e, "cannot read the sequence counter; refusing writes");
            return;
        }
    };
    let mut stop: Option<oneshot::Sender<()>> = None;
    while stop.is_none() {
        let Some(first) = rx.blocking_recv() else {
            break;
        };
        let mut batch: Vec<(Vec<PathBuf>, Job, Fail)> = Vec::new();
        let push = |msg: Msg,
                    batch: &mut Vec<(Vec<PathBuf>, Job, Fail)>,
                    stop: &mut Option<oneshot::Sender<()>>| match msg {
            Msg::Write { dirs, job, fail } => batch.push((dirs, job, fail)),
            Msg::Shutdown(s) => *stop = Some(s),
        };
        push(first, &mut batch, &mut stop);
        while batch.len() < MAX_BATCH && stop.is_none() {
            match rx.try_recv() {
                Ok(msg) => push(msg, &mut batch, &mut stop),
                Err(_) => break,
            }
        }
        if batch.is_empty() {
            continue;
        }
        // The directories of the batch's new chunk files, each synced once. A write whose
        // directory fails to sync fails alone: the others of the batch go on.
        let dirs: BTreeSet<&PathBuf> = batch.iter().flat_map(|(d, _, _)| d).collect();
        let failed: BTreeMap<PathBuf, String> = dirs
            .into_iter()
            .filter_map(|d| {
                super::chunk::sync_dir(d).err().map(|e| {
                    (
                        d.clone(),
                        format!("fsync of chunk directory {} failed: {e}", d.display()),
                    )
                })
            })
            .collect();
        let batch: Vec<Job> = batch
            .into_iter()
            .filter_map(|(d, job, fail)| match d.iter().find_map(|d| failed.get(d)) {
                Some(e) => {
                    tracing::error!(error = %e, "a write's chunk files are not durable; it fails");
                    fail(e.clone());
                    None
                }
                None => Some(job),
            })
            .collect();
        if batch.is_empty() {
            continue;
        }
        let before = seq;
        let mut logged = Vec::new();
        let mut staged: Vec<(PartitionId, u64)> = Vec::new();
        let (dones, result) = match db.begin_write().map_err(|e| e.to_string()) {
            Err(e) => (
                batch
                    .into_iter()
                    .map(|_| None)
                    .collect::<Vec<Option<Done>>>(),
                Err(e),
            ),
            Ok(txn) => {
                let mut changes = Vec::new();
                let mut chunks = Vec::new();
                let mut freed = Vec::new();
                let mut counted: Result<(), String> = Ok(());
                let dones: Vec<Option<Done>> = batch
                    .into_iter()
                    .map(|job| {
                        let recorded = RefCell::new(Vec::new());
                        let usage = RefCell::new(UsageDeltas::default());
                        let mut ctx = WriteCtx {
                            txn: TrackedTxn::new(&txn, &recorded, &usage),
                            seq: &mut seq,
                            chunks: Vec::new(),
                            freed: Vec::new(),
                            logged: &mut logged,
                        };
                        let done = job(&mut ctx);
                        // Each write's counts are stored before the next write runs, so
                        // a write sees the usage the writes before it left.
                        if counted.is_ok() {
                            counted = usage
                                .borrow_mut()
                                .flush(&txn)
                                .map_err(|e| format!("updating the usage counters failed: {e}"));
                        }
                        chunks.append(&mut ctx.chunks);
                        freed.append(&mut ctx.freed);
                        changes.push(recorded.into_inner());
                        Some(done)
                    })
                    .collect();
                // Partitions whose log this batch writes with entries from elsewhere
                // (a replica applying its primary's log, a snapshot import).
                for (p, _) in &logged {
                    logs.forget(*p);
                }
                let result = counted
                    .and_then(|()| {
                        log_changes(&txn, &logs, changes, (chunks, freed), seq, &mut logged)
                    })
                    .and_then(|entries| store_seq(&txn, seq).map(|()| entries))
                    .and_then(|entries| {
                        super::usage::note_positions(&txn, &logged)
                            .map(|()| entries)
                            .map_err(|e| e.to_string())
                    })
                    .and_then(|entries| {
                        // Published before the data becomes visible: a read that
                        // sees it waits for these entries to be replicated.
                        logs.pending(&logged);
                        // From here the entries may reach the replicas before the
                        // commit below is durable (it runs in parallel with their fsync).
                        staged = logs.stage(entries);
                        txn.commit().map_err(|e| e.to_string())
                    });
                (dones, result)
            }
        };
        if result.is_err() && !staged.is_empty() && !logs.unstage(&staged) {
            // Some of the batch's log entries may be on replicas already, and their
            // numbers would be handed out again here to other changes: the logs would
            // diverge unseen. Stop, as a database does when its log cannot be written;
            // once restarted, this node serves the partitions under new epochs, and a
            // replica holding such entries is reinstalled or takes the partition over.
            let at: Vec<String> = staged
                .iter()
                .map(|(p, lsn)| format!("partition {p} from entry {lsn}"))
                .collect();
            tracing::error!(error = ?result, staged = ?at, "group commit failed after its log entries were sent to replicas; stopping the node so the logs cannot diverge");
            eprintln!(
                "granary-node: group commit failed after its log entries were sent to replicas ({}): {result:?}; stopping",
                at.join(", ")
            );
            std::process::abort();
        }
        if result.is_err() {
            // Nothing of this batch is durable; hand the numbers out again.
            seq = before;
            tracing::error!(error = ?result, "group commit failed");
            logs.abandoned(&logged);
        } else {
            logs.committed(&logged);
        }
        for done in dones.into_iter().flatten() {
            done(result.clone());
        }
    }
    // Fail whatever is still queued so no caller waits forever.
    rx.close();
    while let Ok(Msg::Write { job: _, .. }) = rx.try_recv() {}
    // Release the database before confirming the shutdown, so that once every other
    // handle is dropped the store can be opened again (by a restart in the process).
    drop(db);
    if let Some(s) = stop {
        let _ = s.send(());
    }
}

/// Appends the batch's log entries: per partition, its changes in the order they were
/// made, the chunk files they made reachable (with the first entry, before any change
/// that may reference them) and the ones they freed (with the last). A partition's entry
/// is closed at a write's boundary once it holds [`replog::ENTRY_BYTES`], so no entry
/// outgrows a snapshot frame or a shipment, and no write is split between two.
fn log_changes(
    txn: &redb::WriteTransaction,
    logs: &LogState,
    changes: Vec<Vec<Change>>,
    (chunks, freed): (Vec<ChunkRef>, Vec<ChunkRef>),
    seq: u64,
    logged: &mut Vec<(PartitionId, u64)>,
) -> Result<Vec<(PartitionId, u64, LogEntry)>, String> {
    let entry = |p: PartitionId| LogEntry {
        epoch: logs.epoch(p),
        seq,
        changes: Vec::new(),
        chunks: Vec::new(),
        freed: Vec::new(),
    };
    let mut by_partition: BTreeMap<PartitionId, Vec<(LogEntry, usize)>> = BTreeMap::new();
    for job in changes {
        let mut touched = std::collections::BTreeSet::new();
        for c in job {
            let (Change::Put { table, key, .. } | Change::Delete { table, key }) = &c;
            let Some(p) = replog::partition_of(*table, key) else {
                return Err(format!(
                    "a change to table {table} has a key without a partition"
                ));
            };
            let size = c.size();
            let entries = by_partition.entry(p).or_default();
            // A new entry only where this write starts in the partition.
            let first_of_write = touched.insert(p);
            let full = entries
                .last()
                .is_none_or(|(_, bytes)| *bytes >= replog::ENTRY_BYTES);
            if entries.is_empty() || (first_of_write && full) {
                entries.push((entry(p), 0));
            }
            if let Some((e, bytes)) = entries.last_mut() {
                e.changes.push(c);
                *bytes += size;
            }
        }
    }
    let mut by_partition: BTreeMap<PartitionId, Vec<LogEntry>> = by_partition
        .into_iter()
        .map(|(p, es)| (p, es.into_iter().map(|(e, _)| e).collect()))
        .collect();
    for c in chunks {
        let es = by_partition.entry(c.partition).or_default();
        if es.is_empty() {
            es.push(entry(c.partition));
        }
        es[0].chunks.push(c);
    }
    for c in freed {
        let es = by_partition.entry(c.partition).or_default();
        if es.is_empty() {
            es.push(entry(c.partition));
        }
        if let Some(e) = es.last_mut() {
            e.freed.push(c);
        }
    }
    let mut staged = Vec::new();
    for (p, es) in by_partition {
        for e in es {
            let lsn = replog::append(txn, p, &e).map_err(|e| e.to_string())?;
            logged.push((p, lsn));
            staged.push((p, lsn, e));
        }
    }
    Ok(staged)
}

fn load_seq(db: &redb::Database) -> Result<u64, EngineError> {
    use redb::ReadableDatabase;
    let txn = db.begin_read()?;
    let t = txn.open_table(META)?;
    Ok(t.get("seq")?.map(|v| v.value()).unwrap_or(0))
}

fn store_seq(txn: &redb::WriteTransaction, seq: u64) -> Result<(), String> {
    let mut t = txn.open_table(META).map_err(|e| e.to_string())?;
    t.insert("seq", seq).map_err(|e| e.to_string())?;
    Ok(())
}
