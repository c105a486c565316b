//! Replication of partitions from their primary to their in-sync replicas
//! (docs/cluster.md, "Replication").
//!
//! - The primary of a partition ships its log ([`crate::engine::replog`]) to every other
//!   member of the partition's replica set, in order, each entry after the chunk files it
//!   makes reachable. A replica applies entries only in order, only from the primary of
//!   an epoch at least as new as any it has seen (fencing), and acknowledges after its
//!   commit is durable.
//! - A request's answer is released only once everything committed on its partitions
//!   before the answer was made is durable on every in-sync replica ([`Replicator::barrier`]):
//!   a write is acknowledged only when it cannot be lost with any one node, and a read
//!   never shows a write that could still be lost.
//! - The in-sync set changes only by compare-and-set in the catalog: a replica that does
//!   not acknowledge within `suspect_after` is removed first and then no longer waited
//!   for; a replica outside it that has caught up is waited for first and then added.
//!   A write needs at least `min_in_sync` in-sync replicas (the primary counts).
//! - A replica whose position is not in the primary's log (too far behind, or holding
//!   entries of a deposed primary) is reinstalled from a partition snapshot.
//!
//! - A primary that takes a partition over from another node (promotion, hand-over)
//!   serves it only once the previous primary's lease must have run out.
//!
//! Failover itself (promotion by the coordinator) is in [`super::Cluster`].

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use super::Cluster;
use crate::catalog::PartitionState;
use crate::engine::{ChunkRef, Engine, EngineError, LogEntry, LogPosition};
use crate::types::ChunkId;
use crate::types::{Epoch, NodeId, PartitionId};

/// Header of a shipment naming the chunk files it does not carry (comma-separated ids);
/// its presence asks the replica to check that every other chunk has arrived.
pub const SKIPPED_HEADER: &str = "x-granary-chunks-skipped";
/// Header of a replica's answer to a shipment it checked that way.
pub const CHECKED_HEADER: &str = "x-granary-chunks-checked";

/// Entries and bytes sent in one shipment.
const SHIP_ENTRIES: usize = 256;
const SHIP_BYTES: usize = 8 << 20;

/// What a primary sends a replica: entries of one partition's log, in order.
#[derive(Serialize, Deserialize)]
pub struct Shipment {
    pub epoch: u64,
    pub primary: NodeId,
    pub entries: Vec<(u64, LogEntry)>,
}

/// A replica's answer to a shipment it refused.
#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Refusal {
    pub reason: String,
    /// Where the replica's log stands.
    pub position: LogPosition,
    /// The newest epoch it has seen for the partition.
    pub epoch: u64,
}

#[derive(Clone)]
pub struct Replicator {
    inner: Arc<Inner>,
}

struct Inner {
    cluster: Cluster,
    engine: Engine,
    http: reqwest::Client,
    min_in_sync: usize,
    /// A replica that has not acknowledged for this long leaves the in-sync set.
    ship_timeout: Duration,
    /// Partitions this node leads, by partition.
    led: Mutex<HashMap<PartitionId, Arc<Led>>>,
    /// The primary and epoch of every partition as last seen by `follow_table`.
    primaries: Mutex<HashMap<PartitionId, (NodeId, Epoch)>>,
    /// A hand-over of a partition to its preferred primary is under way.
    rebalancing: std::sync::atomic::AtomicBool,
    /// Partitions not to hand over before the time given (a recent attempt failed).
    handoff_backoff: Mutex<HashMap<PartitionId, Instant>>,
    /// Replica side: the newest epoch seen per partition (fencing).
    seen: Mutex<HashMap<PartitionId, u64>>,
    /// Replica side: one shipment or resync at a time per partition.
    applying: Mutex<HashMap<PartitionId, Arc<tokio::sync::Mutex<()>>>>,
    /// Chunk files being sent ahead of their entries.
    presend_slots: Arc<tokio::sync::Semaphore>,
    /// Partitions this process has served as primary (each under an epoch of its own).
    taken_up: Mutex<HashSet<PartitionId>>,
    /// Replicas (with the incarnation that said so) that check every chunk an entry
    /// references has arrived: only for them is a chunk sent ahead not sent again.
    checks: Mutex<HashMap<NodeId, Option<String>>>,
    /// Copies held here of partitions the layout moved elsewhere, since when they have
    /// been found no longer needed.
    retiring: Mutex<HashMap<PartitionId, Instant>>,
    retire_checked: Mutex<Option<Instant>>,
}

/// This node's state as the primary of one partition under one epoch.
struct Led {
    p: PartitionId,
    state: Mutex<PartitionState>,
    /// Replicas that must acknowledge before a write is durable: the in-sync set
    /// (without this node), plus a caught-up replica about to join it.
    waited: Mutex<HashSet<NodeId>>,
    acked: Mutex<HashMap<NodeId, u64>>,
    /// The highest entry durable on every waited replica (and here).
    durable: watch::Sender<u64>,
    /// Set once this node has checked that no in-sync peer holds more of the partition
    /// than it does (after a restart it may have lost its disk); nothing is served before.
    verified: std::sync::atomic::AtomicBool,
    /// Replicas a shipper runs for.
    shipping: Mutex<HashSet<NodeId>>,
    /// This node took the partition over from another (or cannot tell): it waits out
    /// the previous primary's lease before serving.
    takeover: bool,
    /// This node is handing the partition to another: it serves no new request.
    handing_off: std::sync::atomic::AtomicBool,
    stop: tokio_util::sync::CancellationToken,
    /// Chunk files sent to a replica while their upload still ran, before the entry that
    /// references them (see [`Replicator::pre_ship`]).
    presend: Mutex<HashMap<(NodeId, ChunkId), Presend>>,
}

/// A chunk file on its way to a replica ahead of its log entry.
struct Presend {
    at: Instant,
    chunk: ChunkRef,
    /// Stops the transfer when the pre-send is forgotten.
    abort: tokio::task::AbortHandle,
    /// Ok(true): the replica holds it; Ok(false): gone here; Err: not sent.
    done: futures::future::Shared<futures::future::BoxFuture<'static, Result<bool, String>>>,
}

/// A copy of a partition the layout moved elsewhere is dropped once it has been found
/// unneeded for this many times `suspect_after`.
const RETIRE_AFTER: u32 = 4;

/// Chunk files sent ahead of their entries at once, per node (more are sent with their
/// entries, as before).
const PRESEND_SLOTS: usize = 4;
/// A chunk sent ahead whose entry never came (the upload failed) is forgotten after this,
/// and the replicas are told to remove it.
const PRESEND_MAX_AGE: Duration = Duration::from_secs(600);
/// At most this many chunk files gone here are named in one shipment (their entries are
/// followed by ones that free them; the replica checks every other chunk has arrived).
const SKIPPED_MAX: usize = 64;

impl Led {
    fn recompute(&self, engine: &Engine) {
        let committed = engine.committed_lsn(self.p);
        let waited = self.waited.lock().unwrap_or_else(PoisonError::into_inner);
        let acked = self.acked.lock().unwrap_or_else(PoisonError::into_inner);
        let d = waited
            .iter()
            .map(|n| acked.get(n).copied().unwrap_or(0))
            .fold(committed, u64::min);
        self.durable.send_if_modified(|v| {
            let changed = *v != d;
            *v = d;
            changed
        });
    }

    fn in_sync(&self) -> usize {
        self.state
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .in_sync
            .len()
    }
}

impl Replicator {
    pub fn new(
        cluster: Cluster,
        engine: Engine,
        min_in_sync: usize,
        ship_timeout: Duration,
    ) -> Self {
        let http = super::peer_client(Duration::from_secs(2), |b| b);
        Self {
            inner: Arc::new(Inner {
                cluster,
                engine,
                http,
                min_in_sync: min_in_sync.max(1),
                ship_timeout,
                led: Mutex::new(HashMap::new()),
                primaries: Mutex::new(HashMap::new()),
                rebalancing: std::sync::atomic::AtomicBool::new(false),
                handoff_backoff: Mutex::new(HashMap::new()),
                seen: Mutex::new(HashMap::new()),
                applying: Mutex::new(HashMap::new()),
                presend_slots: Arc::new(tokio::sync::Semaphore::new(PRESEND_SLOTS)),
                taken_up: Mutex::new(HashSet::new()),
                checks: Mutex::new(HashMap::new()),
                retiring: Mutex::new(HashMap::new()),
                retire_checked: Mutex::new(None),
            }),
        }
    }

    /// Follows the partition table: starts shipping for every partition this node
    /// leads (per epoch), stops for those it no longer leads. Runs until `shutdown`.
    pub async fn run(self, mut shutdown: watch::Receiver<bool>) {
        let mut states = self.inner.cluster.watch_states();
        let mut layout = self.inner.cluster.watch_layout();
        let mut rebalance = tokio::time::interval(self.inner.ship_timeout / 2);
        rebalance.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            self.follow_table();
            tokio::select! {
                r = states.changed() => if r.is_err() { return },
                r = layout.changed() => if r.is_err() { return },
                _ = rebalance.tick() => {
                    if !self.inner.rebalancing.swap(true, std::sync::atomic::Ordering::AcqRel) {
                        let this = self.clone();
                        tokio::spawn(async move {
                            // Cleared however the task ends (a panic included).
                            let _clear = ClearOnDrop(&this.inner.rebalancing);
                            this.rebalance_one().await;
                            this.retire_copies().await;
                        });
                    }
                }
                _ = shutdown.wait_for(|v| *v) => {
                    for l in self.led_all() {
                        l.stop.cancel();
                    }
                    return;
                }
            }
        }
    }

    /// Takes up the partitions this node leads now and waits (up to `within`) until each
    /// has been checked against its replicas, so a node that starts serves at once what
    /// it may serve. Partitions still being checked are refused until they are.
    pub async fn take_up(&self, within: Duration) {
        let within = within + self.inner.ship_timeout * 2;
        self.follow_table();
        let started = Instant::now();
        while started.elapsed() < within {
            if self
                .led_all()
                .iter()
                .all(|l| l.verified.load(std::sync::atomic::Ordering::Acquire))
            {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let waiting = self
            .led_all()
            .iter()
            .filter(|l| !l.verified.load(std::sync::atomic::Ordering::Acquire))
            .count();
        tracing::warn!(
            partitions = waiting,
            "some partitions this node leads are still being checked against their replicas; they answer 503 until then"
        );
    }

    fn led_all(&self) -> Vec<Arc<Led>> {
        let led = self
            .inner
            .led
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        led.values().cloned().collect()
    }

    fn follow_table(&self) {
        let me = self.inner.cluster.me().clone();
        let table = self.inner.cluster.partition_states();
        let previous: HashMap<PartitionId, (NodeId, Epoch)> = std::mem::replace(
            &mut *self
                .inner
                .primaries
                .lock()
                .unwrap_or_else(PoisonError::into_inner),
            table
                .iter()
                .flatten()
                .map(|s| (s.partition, (s.primary.clone(), s.epoch)))
                .collect(),
        );
        let mut led = self
            .inner
            .led
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        for state in table.iter().flatten() {
            let p = state.partition;
            let current = led
                .get(&p)
                .map(|l| l.state.lock().unwrap_or_else(PoisonError::into_inner).epoch);
            if state.primary != me {
                if let Some(l) = led.remove(&p) {
                    l.stop.cancel();
                }
                continue;
            }
            if current.is_some_and(|e| e >= state.epoch) {
                // Same leadership; the layout may have brought a replica back (or a new
                // one): ship to it too.
                if let Some(l) = led.get(&p) {
                    self.ship_to_replicas(l, state);
                }
                continue;
            }
            if let Some(old) = led.remove(&p) {
                old.stop.cancel();
            }
            self.inner.engine.set_epoch(p, state.epoch.0);
            let waited: HashSet<NodeId> = state
                .in_sync
                .iter()
                .filter(|n| **n != me)
                .cloned()
                .collect();
            let l = Arc::new(Led {
                p,
                state: Mutex::new(state.clone()),
                waited: Mutex::new(waited),
                acked: Mutex::new(HashMap::new()),
                durable: watch::Sender::new(0),
                verified: std::sync::atomic::AtomicBool::new(false),
                shipping: Mutex::new(HashSet::new()),
                takeover: state.epoch.0 > 1
                    && previous.get(&p).is_none_or(|(was, _)| *was != me)
                    && !handed_over(previous.get(&p), state, &me),
                handing_off: std::sync::atomic::AtomicBool::new(false),
                stop: tokio_util::sync::CancellationToken::new(),
                presend: Mutex::new(HashMap::new()),
            });
            tokio::spawn(self.clone().verify(l.clone()));
            l.recompute(&self.inner.engine);
            self.ship_to_replicas(&l, state);
            led.insert(p, l);
        }
    }

    /// Starts a shipper for every member of the partition's replica set in the current
    /// layout, and of its in-sync set, that has none yet.
    fn ship_to_replicas(&self, l: &Arc<Led>, state: &PartitionState) {
        let me = self.inner.cluster.me();
        let replicas: Vec<NodeId> = self
            .inner
            .cluster
            .layout()
            .map(|lay| lay.replicas(l.p).map(|m| m.id.clone()).collect())
            .unwrap_or_default();
        let mut shipping = l.shipping.lock().unwrap_or_else(PoisonError::into_inner);
        for r in replicas.into_iter().chain(state.in_sync.iter().cloned()) {
            if r != *me && shipping.insert(r.clone()) {
                tokio::spawn(self.clone().ship(l.clone(), r));
            }
        }
        if !shipping.is_empty() {
            // The partition's entries go to its replicas while the primary's own commit
            // is being made durable, as a Raft leader sends while it appends.
            self.inner.engine.ship_early(l.p);
        }
    }

    /// Whether this node serves partition `p` now: it leads it and has checked, after
    /// taking it up, that no in-sync peer holds more of it (`verify`).
    pub fn serving(&self, p: PartitionId) -> bool {
        self.inner
            .led
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(&p)
            .is_some_and(|l| {
                l.verified.load(std::sync::atomic::Ordering::Acquire)
                    && !l.stop.is_cancelled()
                    && !l.handing_off.load(std::sync::atomic::Ordering::Acquire)
            })
    }

    /// Drops the copies this node holds of partitions the layout no longer places on it,
    /// once the move is complete: the catalog names a primary in the layout's replica set,
    /// every member of that set is in sync, and this node is neither primary nor in sync.
    /// A copy is dropped only after it has been found so for [`RETIRE_AFTER`] times
    /// `suspect_after` (a layout that flaps back keeps it), and again under the
    /// partition's replica lock just before, so no shipment or reinstall runs meanwhile
    /// (a partition whose lock is busy is left for a later round).
    async fn retire_copies(&self) {
        {
            let mut checked = self
                .inner
                .retire_checked
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            if checked.is_some_and(|at| at.elapsed() < self.inner.ship_timeout) {
                return;
            }
            *checked = Some(Instant::now());
        }
        // Candidates from this node's cached view of the table (no catalog query per
        // round); each is read fresh from the catalog before it is dropped.
        let states = self.inner.cluster.partition_states();
        let grace = self.inner.ship_timeout * RETIRE_AFTER;
        let mut due = Vec::new();
        for st in states.iter().flatten() {
            let p = st.partition;
            // Its log is what a copy is known by (chunk files left without records, say
            // a transfer that raced a drop, go with the next startup sweep).
            let holds = self.inner.engine.committed_lsn(p) > 0;
            let mut retiring = self
                .inner
                .retiring
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            if !(holds && self.retired(st)) {
                retiring.remove(&p);
                continue;
            }
            let since = *retiring.entry(p).or_insert_with(Instant::now);
            if since.elapsed() >= grace {
                due.push(p);
            }
        }
        for p in due {
            let lock = self.partition_lock(p);
            // Never waits (this runs in the node's one rebalancing task; a reinstall may
            // hold the lock for long).
            let Ok(_one) = lock.try_lock() else {
                continue;
            };
            // Decided on this node's cached layout: only if it is still the newest (a
            // layout that placed the partition here again may not have reached it yet).
            let newest = self
                .inner
                .cluster
                .catalog()
                .latest_layout_version()
                .await
                .ok()
                .flatten();
            if newest.is_none() || newest != self.inner.cluster.layout().map(|l| l.version) {
                continue;
            }
            let fresh = self
                .inner
                .cluster
                .catalog()
                .partition_states()
                .await
                .ok()
                .and_then(|all| all.into_iter().find(|s| s.partition == p));
            let led = self
                .inner
                .led
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .contains_key(&p);
            if led || !fresh.as_ref().is_some_and(|st| self.retired(st)) {
                continue;
            }
            match self.inner.engine.drop_partition(p).await {
                Ok(files) => {
                    self.inner.cluster.metrics().retired_copies.inc();
                    tracing::info!(partition = %p, chunk_files = files, "dropped this node's copy of a partition the layout moved to other nodes (all of them in sync)");
                    self.inner
                        .retiring
                        .lock()
                        .unwrap_or_else(PoisonError::into_inner)
                        .remove(&p);
                }
                Err(e) => {
                    tracing::warn!(partition = %p, error = %e, "could not drop the copy of a partition the layout moved elsewhere");
                }
            }
        }
    }

    /// Whether this node's copy of `st.partition` is no longer needed (see
    /// [`Self::retire_copies`]).
    fn retired(&self, st: &PartitionState) -> bool {
        let Some(layout) = self.inner.cluster.layout() else {
            return false;
        };
        let me = self.inner.cluster.me();
        let replicas: Vec<NodeId> = layout
            .replicas(st.partition)
            .map(|m| m.id.clone())
            .collect();
        !replicas.is_empty()
            && !replicas.contains(me)
            && st.primary != *me
            && !st.in_sync.contains(me)
            && replicas.contains(&st.primary)
            && replicas.iter().all(|n| st.in_sync.contains(n))
    }

    /// Hands one partition this node leads to the layout's preferred primary for it, when
    /// that node is alive and in sync (a node that joined, or one that returned after a
    /// failover and caught up). One at a time per node: each costs its partition a short
    /// pause (no new requests while what is committed becomes durable everywhere).
    async fn rebalance_one(&self) {
        use std::sync::atomic::Ordering;
        let Some(layout) = self.inner.cluster.layout() else {
            return;
        };
        let me = self.inner.cluster.me().clone();
        let alive: HashSet<NodeId> = self
            .inner
            .cluster
            .nodes()
            .into_iter()
            .filter(|v| v.state == super::NodeState::Alive)
            .map(|v| v.record.id)
            .collect();
        let mut led = self.led_all();
        // Start at a random place, so one partition that does not settle cannot hold up
        // the others; skip those that recently failed to settle.
        if !led.is_empty() {
            let at = rand::random::<u32>() as usize % led.len();
            led.rotate_left(at);
        }
        let now = Instant::now();
        self.inner
            .handoff_backoff
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .retain(|_, until| *until > now);
        let backing_off = self
            .inner
            .handoff_backoff
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone();
        let candidate = led.into_iter().find_map(|l| {
            let preferred = layout.replicas(l.p).next()?.id.clone();
            l.recompute(&self.inner.engine);
            let ready = l.verified.load(Ordering::Acquire)
                && !l.stop.is_cancelled()
                && !l.handing_off.load(Ordering::Acquire)
                && !backing_off.contains_key(&l.p)
                && preferred != me
                && alive.contains(&preferred)
                && l.state
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .in_sync
                    .contains(&preferred)
                // Settled already (nothing on its way to a replica): the pause will be short.
                && *l.durable.borrow() >= self.inner.engine.visible_lsn(l.p);
            ready.then_some((l, preferred))
        });
        if let Some((l, to)) = candidate {
            self.hand_off(&l, to).await;
        }
    }

    /// Stops serving partition `l.p`, waits until everything visible on it is durable on
    /// every in-sync replica (and stays so), then names `to` primary under the next epoch,
    /// keeping this node in the in-sync set: the sign, for `to`, that the hand-over was
    /// orderly and no lease needs waiting out. Gives up (and serves again) if the
    /// partition does not settle within twice `suspect_after`.
    async fn hand_off(&self, l: &Arc<Led>, to: NodeId) {
        use std::sync::atomic::Ordering;
        l.handing_off.store(true, Ordering::Release);
        let engine = &self.inner.engine;
        let deadline = Instant::now() + self.inner.ship_timeout;
        let mut last = None;
        loop {
            if l.stop.is_cancelled() {
                return;
            }
            l.recompute(engine);
            let visible = engine.visible_lsn(l.p);
            if *l.durable.borrow() >= visible && last == Some(visible) {
                break;
            }
            last = Some(visible);
            if Instant::now() > deadline {
                tracing::info!(partition = %l.p, to = %to.0, "handing the partition over: it did not settle; serving it again and retrying later");
                self.back_off(l.p);
                l.handing_off.store(false, Ordering::Release);
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let state = l
            .state
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone();
        if !state.in_sync.contains(&to) {
            l.handing_off.store(false, Ordering::Release);
            return;
        }
        let mut next = state.clone();
        next.epoch = Epoch(state.epoch.0 + 1);
        next.primary = to.clone();
        let what = format!(
            "primary handed to {}, the layout's preferred primary for this partition",
            to.0
        );
        let changed = tokio::time::timeout(
            self.inner.ship_timeout * 2,
            self.change(l, state, next, &what),
        )
        .await;
        if changed == Ok(true) {
            self.inner.cluster.metrics().primary_handoffs.inc();
            l.stop.cancel();
            return;
        }
        // Refused, failed or timed out: whether the catalog took the change is not known
        // here (a failed or slow compare-and-set may have been applied). Never serve on
        // from this state: drop it, and take the partition up afresh (checked again) if
        // the table still names this node.
        self.back_off(l.p);
        l.stop.cancel();
        {
            let mut led = self
                .inner
                .led
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            if led.get(&l.p).is_some_and(|cur| Arc::ptr_eq(cur, l)) {
                led.remove(&l.p);
            }
        }
        self.inner.cluster.refresh_soon();
    }

    /// No hand-over of `p` for a while (it did not settle, or the change failed).
    fn back_off(&self, p: PartitionId) {
        self.inner
            .handoff_backoff
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(p, Instant::now() + self.inner.ship_timeout * 5);
    }

    /// Why a write to partition `p` must be refused before it starts (as Kafka's
    /// `NotEnoughReplicas`): its in-sync set is smaller than `min_in_sync`, so the write
    /// could not be acknowledged. None: go ahead (the barrier still decides).
    pub fn refuse_write(&self, p: PartitionId) -> Option<String> {
        let in_sync = self
            .inner
            .led
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(&p)?
            .in_sync();
        if in_sync >= self.inner.min_in_sync {
            return None;
        }
        let replicas = self
            .inner
            .cluster
            .layout()
            .map_or(0, |l| l.replicas(p).count());
        Some(if replicas < self.inner.min_in_sync {
            format!(
                "partition {p} has {replicas} replicas in the layout, fewer than min_in_sync \
                 {}: writes are refused (nothing was written) until more nodes join the \
                 cluster (or min_in_sync is lowered)",
                self.inner.min_in_sync
            )
        } else {
            format!(
                "partition {p} has {in_sync} in-sync replicas, fewer than min_in_sync {}: \
                 writes are refused (nothing was written) until a replica catches up; retry",
                self.inner.min_in_sync
            )
        })
    }

    /// Releases once everything a request may have seen or written on `partitions`
    /// (each with the last entry visible when the request first touched it) is durable
    /// on every in-sync replica. Err: this node no longer leads one of them; not within
    /// `wait`; or a partition that was written meanwhile has fewer in-sync replicas than
    /// `min_in_sync`.
    pub async fn barrier(
        &self,
        partitions: &[(PartitionId, u64)],
        wait: Duration,
    ) -> Result<(), String> {
        for (p, before) in partitions {
            let led = self
                .inner
                .led
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .get(p)
                .cloned();
            // The request passed the partition guard, so this node led the partition
            // then; if it no longer does (or not yet verifiably), what it did here may not
            // be on the replicas.
            let Some(l) = led.filter(|l| {
                l.verified.load(std::sync::atomic::Ordering::Acquire) && !l.stop.is_cancelled()
            }) else {
                return Err(format!(
                    "this node stopped leading partition {p} while the request ran; whether \
                     its writes last is unknown"
                ));
            };
            // The data was read under the lease; it must still hold now, when the answer
            // is released (else another node may have been promoted meanwhile).
            if !self.inner.cluster.lease_valid() {
                return Err(format!(
                    "this node's lease ran out while the request on partition {p} ran; retry"
                ));
            }
            let target = self.inner.engine.visible_lsn(*p);
            // Writes happened on the partition since the request first touched it (its
            // own, or others' it may have seen): they need min_in_sync copies.
            let in_sync = l.in_sync();
            if target > *before && in_sync < self.inner.min_in_sync {
                return Err(format!(
                    "partition {p} has {in_sync} in-sync replicas, fewer than min_in_sync {}: \
                     the write is stored on too few nodes, and whether it lasts is unknown",
                    self.inner.min_in_sync
                ));
            }
            // The replicas may acknowledge before this node's own commit is durable: that
            // commit (a log tick) is the other event that can complete the wait. Watched
            // before `durable` is computed, so a commit in between is not missed.
            let mut ticks = self.inner.engine.watch_log(*p);
            l.recompute(&self.inner.engine);
            let mut durable = l.durable.subscribe();
            if *durable.borrow() >= target {
                continue;
            }
            // Replicas that stop answering leave the in-sync set within `suspect_after`
            // (and the wait ends); a slow one that makes progress (a large object) is
            // waited for, up to `wait`.
            let started = Instant::now();
            loop {
                if *durable.borrow_and_update() >= target {
                    break;
                }
                let in_sync = l.in_sync();
                if in_sync < self.inner.min_in_sync {
                    return Err(format!(
                        "partition {p} has {in_sync} in-sync replicas, fewer than min_in_sync \
                         {}: the write is stored on too few nodes, and whether it lasts is \
                         unknown",
                        self.inner.min_in_sync
                    ));
                }
                if started.elapsed() > wait {
                    return Err(format!(
                        "partition {p}: the write did not reach its in-sync replicas within \
                         {wait:?}; whether it lasts is unknown"
                    ));
                }
                // This node stopped leading the partition (handed it over, or was deposed):
                // its shippers are gone, so the wait could only run out.
                if l.stop.is_cancelled() {
                    return Err(format!(
                        "this node stopped leading partition {p} while the request ran; \
                         whether its writes last is unknown"
                    ));
                }
                let _ = tokio::time::timeout(Duration::from_millis(500), async {
                    tokio::select! {
                        _ = durable.changed() => {}
                        _ = ticks.changed() => {}
                    }
                })
                .await;
                l.recompute(&self.inner.engine);
            }
        }
        Ok(())
    }

    /// Before this node serves partition `l.p`: if an in-sync peer holds more of it (this
    /// node restarted without its data, or behind), it hands the partition to the peer
    /// that holds the most and rejoins as a replica; otherwise it starts serving. An
    /// unreachable peer is waited for while this node holds nothing of the partition.
    async fn verify(self, l: Arc<Led>) {
        let me = self.inner.cluster.me().clone();
        // Taken over from another node (or not known to be this node's before): the previous
        // primary serves until its lease runs out, `suspect_after` after its last
        // heartbeat that saw the old table, which came before the change this node saw.
        // Wait that long (and a margin for clock rates) before serving.
        if l.takeover {
            let wait = self.inner.ship_timeout + self.inner.ship_timeout / 4;
            tokio::select! {
                () = tokio::time::sleep(wait) => {}
                () = l.stop.cancelled() => return,
            }
        }
        loop {
            if l.stop.is_cancelled() {
                return;
            }
            let mine = self.inner.engine.committed_lsn(l.p);
            let state = l
                .state
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .clone();
            let mut best: Option<(NodeId, u64)> = None;
            let mut behind = Vec::new();
            let mut unreachable = false;
            for peer in state.in_sync.iter().filter(|n| **n != me) {
                match self.position_of(l.p, peer).await {
                    Ok(pos)
                        if pos.lsn > mine && best.as_ref().is_none_or(|(_, b)| pos.lsn > *b) =>
                    {
                        best = Some((peer.clone(), pos.lsn));
                    }
                    Ok(pos) if pos.lsn < mine => behind.push(peer.clone()),
                    Ok(_) => {}
                    Err(_) => unreachable = true,
                }
            }
            if let Some((peer, theirs)) = best {
                tracing::warn!(partition = %l.p, mine, theirs, to = %peer.0,
                    "an in-sync replica holds more of this partition than this node (restarted without its data?): handing the partition to it");
                let mut next = state.clone();
                next.epoch = Epoch(state.epoch.0 + 1);
                next.primary = peer;
                next.in_sync.retain(|n| *n != me);
                if self.change(&l, state, next, "primary handed over").await {
                    l.stop.cancel();
                    return;
                }
                tokio::time::sleep(Duration::from_millis(500)).await;
                continue;
            }
            if !unreachable || mine > 0 {
                // A peer behind this node may miss writes that were acknowledged before
                // the restart (how far they went is not kept): it leaves the in-sync set
                // and rejoins once it has caught up.
                // The first time this process serves the partition it does so under a
                // new epoch: before a crash it may have shipped entries it never
                // committed (early shipping), and the numbers it now writes again must not
                // carry the epoch those entries carry, or a replica holding them would
                // look like a prefix of this log (Raft's new term after a restart).
                let first = !self
                    .inner
                    .taken_up
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .contains(&l.p);
                if !behind.is_empty() || first {
                    let mut next = state.clone();
                    next.epoch = Epoch(state.epoch.0 + 1);
                    next.in_sync.retain(|n| !behind.contains(n));
                    let names: Vec<&str> = behind.iter().map(|n| n.0.as_str()).collect();
                    let what = if behind.is_empty() {
                        "taken up by this node after it started: a new epoch".to_string()
                    } else {
                        format!(
                            "replicas {names:?} are behind after a restart and leave the \
                             in-sync set until they catch up"
                        )
                    };
                    if !self.change(&l, state, next, &what).await {
                        tokio::time::sleep(Duration::from_millis(200)).await;
                        continue;
                    }
                    let mut waited = l.waited.lock().unwrap_or_else(PoisonError::into_inner);
                    waited.retain(|n| !behind.contains(n));
                }
                self.inner
                    .taken_up
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .insert(l.p);
                l.verified.store(true, std::sync::atomic::Ordering::Release);
                return;
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    }

    async fn position_of(&self, p: PartitionId, r: &NodeId) -> Result<LogPosition, String> {
        let addr = self.rpc_addr(r)?;
        let secret = self.secret()?;
        peer_json(
            self.inner
                .http
                .get(format!("http://{addr}/rpc/v1/partitions/{}/position", p.0))
                .bearer_auth(&*secret)
                .timeout(self.inner.ship_timeout),
        )
        .await
    }

    /// Ships partition `l.p`'s log to replica `r` until this node stops leading it.
    async fn ship(self, l: Arc<Led>, r: NodeId) {
        let stop = l.stop.clone();
        tokio::select! {
            () = stop.cancelled() => {}
            () = self.ship_loop(&l, &r) => {}
        }
    }

    async fn ship_loop(&self, l: &Led, r: &NodeId) {
        let engine = &self.inner.engine;
        let mut log = engine.watch_log(l.p);
        // Since when the replica has not advanced while it had entries to take: only
        // progress resets it, so a replica that keeps refusing (a full disk, say) leaves
        // the in-sync set like one that does not answer.
        let mut failing_since: Option<Instant> = None;
        let mut position: Option<u64> = None;
        // The replica's incarnation when its position was learnt: a restart may have
        // lost what it held, so its position is asked again.
        let mut incarnation: Option<String> = None;
        // Nothing is shipped before this node has checked it holds the partition's
        // latest state (`verify`): an empty restarted primary must not reinstall its
        // replicas from its own empty copy.
        while !l.verified.load(std::sync::atomic::Ordering::Acquire) {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        loop {
            if !self.wanted(l, r) {
                // The layout no longer places a replica here and its own replicas are all
                // in sync: stop waiting for this node (leave also drops it from what
                // writes wait for when it was only joining), and stop shipping to it.
                self.leave(
                    l,
                    r,
                    "the layout no longer places a replica of this partition on it",
                )
                .await;
                let still = l
                    .state
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .in_sync
                    .contains(r);
                if !still {
                    l.shipping
                        .lock()
                        .unwrap_or_else(PoisonError::into_inner)
                        .remove(r);
                    tracing::info!(partition = %l.p, replica = %r.0, "stopped shipping to a node the layout no longer places a replica on");
                    return;
                }
                // The change did not go through: it is still waited for, so it is
                // still shipped to (and retired on a later round).
            }
            let now = self.inner.cluster.incarnation_of(r);
            if position.is_some() && now.is_some() && now != incarnation {
                tracing::info!(partition = %l.p, replica = %r.0, "replica restarted; asking where it stands");
                position = None;
            }
            let outcome = match position {
                None => {
                    incarnation = now;
                    // What was sent ahead may be gone (the replica restarted, or is
                    // about to be reinstalled): everything is sent again with its entry.
                    l.presend
                        .lock()
                        .unwrap_or_else(PoisonError::into_inner)
                        .retain(|(n, _), ahead| {
                            let keep = n != r;
                            if !keep {
                                ahead.abort.abort();
                            }
                            keep
                        });

                    match self.establish(l, r).await {
                        Ok(lsn) => {
                            // Less than it acknowledged before (it restarted without its
                            // data, or was reinstalled): it no longer holds every
                            // acknowledged write, so it leaves the in-sync set at once
                            // and rejoins when it has caught up.
                            let before = l
                                .acked
                                .lock()
                                .unwrap_or_else(PoisonError::into_inner)
                                .get(r)
                                .copied();
                            if before.is_some_and(|b| lsn < b) {
                                self.leave(l, r, "it holds less than it acknowledged").await;
                            }
                            position = Some(lsn);
                            Ok(())
                        }
                        Err(e) => Err(e),
                    }
                }
                Some(at) if at >= engine.shippable_lsn(l.p) => {
                    self.maybe_join(l, r, at).await;
                    // The replica may have acknowledged entries before this node's own
                    // commit of them was durable; that commit woke this loop.
                    l.recompute(engine);
                    // Wait for new entries (or re-check now and then).
                    let _ = tokio::time::timeout(Duration::from_secs(1), log.changed()).await;
                    continue;
                }
                Some(at) => self.send(l, r, at).await.map(|lsn| {
                    position = Some(lsn);
                }),
            };
            match outcome {
                Ok(()) => {
                    let lsn = position.unwrap_or(0);
                    let previous = l
                        .acked
                        .lock()
                        .unwrap_or_else(PoisonError::into_inner)
                        .insert(r.clone(), lsn);
                    if previous.is_none_or(|b| lsn > b) || lsn >= engine.committed_lsn(l.p) {
                        failing_since = None;
                    } else if failing_since.get_or_insert_with(Instant::now).elapsed()
                        >= self.inner.ship_timeout
                    {
                        self.leave(l, r, "it makes no progress").await;
                    }
                    l.recompute(engine);
                }
                Err(e) => {
                    position = None;
                    let since = *failing_since.get_or_insert_with(Instant::now);
                    tracing::debug!(partition = %l.p, replica = %r.0, error = %e, "shipping failed");
                    if since.elapsed() >= self.inner.ship_timeout {
                        self.leave(l, r, &e).await;
                    }
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
            }
        }
    }

    /// Whether partition `l.p` still ships to `r`: it is in the layout's replica set, or
    /// the layout's own replicas are not all in sync yet (an old replica stays, for
    /// durability and promotion, until the new ones have caught up).
    fn wanted(&self, l: &Led, r: &NodeId) -> bool {
        let Some(layout) = self.inner.cluster.layout() else {
            return true;
        };
        let me = self.inner.cluster.me();
        let replicas: Vec<NodeId> = layout.replicas(l.p).map(|m| m.id.clone()).collect();
        if replicas.contains(r) {
            return true;
        }
        let state = l.state.lock().unwrap_or_else(PoisonError::into_inner);
        // Retire only into a full replica set that keeps enough copies without it.
        let full = replicas.len() >= usize::from(layout.factor)
            && state.in_sync.len() > self.inner.min_in_sync;
        !(full
            && replicas
                .iter()
                .filter(|n| *n != me)
                .all(|n| state.in_sync.contains(n)))
    }

    fn rpc_addr(&self, r: &NodeId) -> Result<String, String> {
        self.inner
            .cluster
            .nodes()
            .into_iter()
            .find(|v| v.record.id == *r)
            .map(|v| v.record.rpc_addr)
            .filter(|a| !a.is_empty())
            .ok_or_else(|| format!("no RPC address known for {}", r.0))
    }

    fn secret(&self) -> Result<Arc<str>, String> {
        self.inner
            .cluster
            .secret()
            .cloned()
            .ok_or_else(|| "no cluster secret".to_string())
    }

    /// Finds where replica `r` stands and makes it a prefix of this node's log: the
    /// number of its last entry, once it matches ours (reinstalling the partition from a
    /// snapshot when it does not).
    async fn establish(&self, l: &Led, r: &NodeId) -> Result<u64, String> {
        let theirs = self.position_of(l.p, r).await?;
        let addr = self.rpc_addr(r)?;
        let secret = self.secret()?;
        if self
            .is_prefix(l.p, theirs)
            .await
            .map_err(|e| e.to_string())?
        {
            return Ok(theirs.lsn);
        }
        tracing::info!(partition = %l.p, replica = %r.0, their_lsn = theirs.lsn,
            "replica's log is not a prefix of ours (behind the kept log, or diverged): reinstalling it from a snapshot");
        // Its copy is wiped first: it must not count as holding every acknowledged write
        // meanwhile.
        self.leave(l, r, "it is reinstalled from a snapshot").await;
        if l.state
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .in_sync
            .contains(r)
        {
            return Err(format!(
                "{} could not leave the in-sync set before its resync",
                r.0
            ));
        }
        let epoch = l
            .state
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .epoch
            .0;
        let url = format!("http://{addr}/rpc/v1/partitions/{}/resync", l.p.0);
        let pos: LogPosition = peer_json(
            self.inner
                .http
                .post(&url)
                .bearer_auth(&*secret)
                .json(&serde_json::json!({"epoch": epoch, "primary": self.inner.cluster.me().0}))
                .timeout(Duration::from_secs(3600)),
        )
        .await?;
        Ok(pos.lsn)
    }

    /// Whether a log standing at `theirs` is a prefix of this node's log for `p`.
    async fn is_prefix(&self, p: PartitionId, theirs: LogPosition) -> Result<bool, EngineError> {
        let engine = &self.inner.engine;
        if theirs.lsn == 0 {
            // Empty: a prefix if our log still starts at 1.
            return Ok(engine.read_log(p, 1, 1, 1).await?.is_some() || engine.committed_lsn(p) == 0);
        }
        if theirs.lsn > engine.committed_lsn(p) {
            // Ahead of this node's commits: a prefix only if it holds entries of the
            // commit under way here (shipped while this node's fsync ran).
            if let Some(epoch) = engine.recent_epoch(p, theirs.lsn) {
                return Ok(epoch == theirs.epoch);
            }
            // Not kept in memory: committed (and trimmed) since, or never written here.
            if theirs.lsn > engine.committed_lsn(p) {
                return Ok(false);
            }
        }
        Ok(match engine.read_log(p, theirs.lsn, 1, 1).await? {
            Some(e) => e.first().is_some_and(|(_, e)| e.epoch == theirs.epoch),
            None => false,
        })
    }

    /// Sends the entries after `at` (and the chunk files they need); returns the new
    /// position.
    async fn send(&self, l: &Led, r: &NodeId, at: u64) -> Result<u64, String> {
        let engine = &self.inner.engine;
        let Some(entries) = engine
            .entries_to_ship(l.p, at + 1, SHIP_ENTRIES, SHIP_BYTES)
            .await
            .map_err(|e| e.to_string())?
        else {
            return Err(format!("entry {} is no longer in the log", at + 1));
        };
        let mut entries = entries;
        let addr = self.rpc_addr(r)?;
        let secret = self.secret()?;
        // Chunk files gone here (replaced since; a later entry frees them): named to the
        // replica, which checks that every other chunk an entry references has arrived.
        let mut skipped: Vec<ChunkId> = Vec::new();
        let mut cut = entries.len();
        let trusted = self.checks_chunks(r);
        // Chunks not sent again because they were sent ahead.
        let mut ahead_used: Vec<ChunkRef> = Vec::new();
        for (i, (_, e)) in entries.iter().enumerate() {
            let before = skipped.len();
            for c in &e.chunks {
                let ahead = l
                    .presend
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .remove(&(r.clone(), c.id));
                // A transfer still running is awaited (never two of one chunk at once);
                // what it delivered counts only for a replica that checks (another may
                // have lost it since, unseen).
                if let Some(ahead) = ahead
                    && ahead.done.await == Ok(true)
                    && trusted
                {
                    ahead_used.push(c.clone());
                    continue;
                }
                if !self.put_chunk(r, c).await? {
                    skipped.push(c.id);
                }
            }
            // Too many to name: the shipment ends before this entry (which goes first in
            // the next one), unless it is the first.
            if skipped.len() > SKIPPED_MAX && i > 0 {
                skipped.truncate(before);
                cut = i;
                break;
            }
        }
        entries.truncate(cut);
        // A lone first entry naming more than that is sent unchecked, as older primaries
        // send: every chunk it references that is here goes with it then, those sent
        // ahead included.
        let checked = skipped.len() <= SKIPPED_MAX;
        if !checked {
            for c in std::mem::take(&mut ahead_used) {
                self.put_chunk(r, &c).await?;
            }
        }
        self.inner
            .cluster
            .metrics()
            .chunks_sent_ahead
            .inc_by(ahead_used.len() as u64);
        // Read before the shipment goes: a restart while it is answered is not credited.
        let incarnation = self.inner.cluster.incarnation_of(r);
        let epoch = l
            .state
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .epoch
            .0;
        let last = entries.last().map_or(at, |(n, _)| *n);
        let body = postcard::to_allocvec(&Shipment {
            epoch,
            primary: self.inner.cluster.me().clone(),
            entries,
        })
        .map_err(|e| e.to_string())?;
        let url = format!("http://{addr}/rpc/v1/partitions/{}/log", l.p.0);
        let skipped: Vec<String> = skipped.iter().map(|c| c.0.simple().to_string()).collect();
        let mut req = self.inner.http.post(&url).bearer_auth(&*secret);
        if checked {
            req = req.header(SKIPPED_HEADER, skipped.join(","));
        }
        let resp = req
            .body(body)
            .timeout(self.inner.ship_timeout)
            .send()
            .await
            .map_err(|e| e.to_string())?;
        if checked {
            let mut checks = self
                .inner
                .checks
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            if resp.headers().contains_key(CHECKED_HEADER) && incarnation.is_some() {
                checks.insert(r.clone(), incarnation);
            } else {
                checks.remove(r);
            }
        }
        if !resp.status().is_success() {
            let status = resp.status();
            return Err(format!(
                "{} refused entries {}..={last}: {status} {}",
                r.0,
                at + 1,
                resp.text().await.unwrap_or_default()
            ));
        }
        Ok(last)
    }

    /// Whether replica `r`, as it runs now (its incarnation), answered a shipment saying
    /// it checks that every chunk an entry references has arrived.
    fn checks_chunks(&self, r: &NodeId) -> bool {
        let now = self.inner.cluster.incarnation_of(r);
        now.is_some()
            && self
                .inner
                .checks
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .get(r)
                == Some(&now)
    }

    /// Streams chunk file `c` to replica `r`. Ok(false): the file is gone here (replaced
    /// since, so the replica never needs it).
    async fn put_chunk(&self, r: &NodeId, c: &ChunkRef) -> Result<bool, String> {
        let engine = &self.inner.engine;
        let addr = self.rpc_addr(r)?;
        let secret = self.secret()?;
        let Some(frames) = engine
            .chunk_frames(c)
            .await
            .map_err(|e| format!("reading chunk {}: {e}", c.id.0))?
        else {
            // Gone here: replaced since, so the replica never needs it.
            return Ok(false);
        };
        // Progress of the transfer: pieces taken by the connection, and whether the whole
        // file has been handed to it.
        let pulled = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let written = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (pulled2, written2) = (pulled.clone(), written.clone());
        use futures::StreamExt as _;
        let all_taken = futures::stream::once(async move {
            written2.store(true, std::sync::atomic::Ordering::Release);
        })
        .filter_map(|()| futures::future::ready(None));
        let body = reqwest::Body::wrap_stream(
            frames
                .inspect(move |_| {
                    pulled2.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                })
                .chain(all_taken),
        );
        let url = format!("http://{addr}/rpc/v1/partitions/{}/chunks", c.partition.0);
        // No overall timeout (chunk files are large); a replica that stops answering
        // is suspected, and the transfer ends then. One that still answers heartbeats but
        // takes nothing for `suspect_after` (or, once all is sent, does not answer within
        // four times that) has stalled: the transfer fails, and its shipper moves on.
        let idle = self.inner.ship_timeout;
        let stalled = async {
            let (mut last, mut quiet) = (u64::MAX, Duration::ZERO);
            loop {
                tokio::time::sleep(idle / 4).await;
                let now = pulled.load(std::sync::atomic::Ordering::Relaxed);
                if now == last {
                    quiet += idle / 4;
                } else {
                    (last, quiet) = (now, Duration::ZERO);
                }
                let limit = if written.load(std::sync::atomic::Ordering::Acquire) {
                    idle * 4
                } else {
                    idle
                };
                if quiet >= limit {
                    return quiet;
                }
            }
        };
        let resp = tokio::select! {
            r = self.inner.http.put(&url).bearer_auth(&*secret).body(body).send() => r.map_err(|e| e.to_string()),
            () = self.inner.cluster.until_not_alive(r) => Err(format!("{} stopped answering", r.0)),
            quiet = stalled => Err(format!("{} took nothing of chunk {} for {quiet:?}", r.0, c.id.0)),
        };
        // A failed read here ends the body early, so it shows as a failed transfer.
        resp.map_err(|e| format!("chunk to {}: {e}", r.0))?
            .error_for_status()
            .map(|_| true)
            .map_err(|e| format!("chunk to {}: {e}", r.0))
    }

    /// The hook the model calls for every chunk file an upload finishes (see
    /// [`crate::model::ChunkHook`]).
    pub fn chunk_hook(&self) -> crate::model::ChunkHook {
        let this = self.clone();
        let handle = tokio::runtime::Handle::current();
        Arc::new(move |c: &ChunkRef| {
            let _rt = handle.enter();
            this.pre_ship(c);
        })
    }

    /// Starts sending chunk file `c`, just written by an upload to a partition this node
    /// leads, to the replicas shipped to, so a large object reaches them while its body
    /// still arrives (the entry that references it then finds it there). Only while a
    /// slot is free: otherwise the chunk goes with its entry, as always. Never blocks.
    fn pre_ship(&self, c: &ChunkRef) {
        let led = self
            .inner
            .led
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(&c.partition)
            .cloned();
        let Some(l) = led.filter(|l| {
            l.verified.load(std::sync::atomic::Ordering::Acquire) && !l.stop.is_cancelled()
        }) else {
            return;
        };
        self.prune_presends(&l);
        let replicas: Vec<NodeId> = l
            .shipping
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .iter()
            .cloned()
            .collect();
        for r in replicas {
            let Ok(permit) = self.inner.presend_slots.clone().try_acquire_owned() else {
                return;
            };
            let (this, c2, r2, stop) = (self.clone(), c.clone(), r.clone(), l.stop.clone());
            let task = tokio::spawn(async move {
                let _permit = permit;
                tokio::select! {
                    sent = this.put_chunk(&r2, &c2) => sent,
                    () = stop.cancelled() => Err("no longer the primary".to_string()),
                }
            });
            use futures::FutureExt;
            let abort = task.abort_handle();
            let done = async move { task.await.map_err(|e| e.to_string())? }
                .boxed()
                .shared();
            l.presend
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .insert(
                    (r, c.id),
                    Presend {
                        at: Instant::now(),
                        chunk: c.clone(),
                        abort,
                        done,
                    },
                );
        }
    }

    /// Forgets chunks sent ahead whose entry never came; the replicas are told to remove
    /// the ones gone here (their upload failed) through the log.
    fn prune_presends(&self, l: &Arc<Led>) {
        let stale: Vec<ChunkRef> = {
            let mut m = l.presend.lock().unwrap_or_else(PoisonError::into_inner);
            let mut stale = Vec::new();
            m.retain(|_, ahead| {
                let keep = ahead.at.elapsed() < PRESEND_MAX_AGE;
                if !keep {
                    ahead.abort.abort();
                    stale.push(ahead.chunk.clone());
                }
                keep
            });
            stale
        };
        if stale.is_empty() {
            return;
        }
        let (engine, l) = (self.inner.engine.clone(), l.clone());
        tokio::spawn(async move {
            let chunks = engine.chunks().clone();
            let gone: Vec<ChunkRef> = tokio::task::spawn_blocking(move || {
                stale
                    .into_iter()
                    .filter(|c| !chunks.path(c.partition, c.id).exists())
                    .collect()
            })
            .await
            .unwrap_or_default();
            // Only the partition's primary writes its log.
            if !gone.is_empty()
                && !l.stop.is_cancelled()
                && let Err(e) = engine.log_freed(gone).await
            {
                tracing::warn!(error = %e, "could not log the removal of chunks sent ahead of a failed upload");
            }
        });
    }

    /// Adds replica `r` (at `at`, caught up) to the in-sync set if it is not in it: it is
    /// waited for first, and added once it has everything committed since.
    async fn maybe_join(&self, l: &Led, r: &NodeId, at: u64) {
        let state = l
            .state
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone();
        if state.in_sync.contains(r) {
            return;
        }
        l.waited
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(r.clone());
        if at < self.inner.engine.committed_lsn(l.p) {
            return; // not yet: next time round, with everything since
        }
        let mut next = state.clone();
        next.epoch = Epoch(state.epoch.0 + 1);
        next.in_sync.push(r.clone());
        self.change(
            l,
            state,
            next,
            &format!("replica {} caught up and joins the in-sync set", r.0),
        )
        .await;
    }

    /// Removes replica `r` from the in-sync set (in the catalog first, then from what
    /// writes wait for).
    async fn leave(&self, l: &Led, r: &NodeId, why: &str) {
        let state = l
            .state
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone();
        if state.in_sync.contains(r) {
            let mut next = state.clone();
            next.epoch = Epoch(state.epoch.0 + 1);
            next.in_sync.retain(|n| n != r);
            if !self
                .change(
                    l,
                    state,
                    next,
                    &format!("replica {} leaves the in-sync set: {why}", r.0),
                )
                .await
            {
                return;
            }
        }
        l.waited
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(r);
        l.recompute(&self.inner.engine);
    }

    /// Installs `next` by compare-and-set; on success this node keeps leading under the
    /// new epoch. False (and this node stops leading the partition here) if another
    /// change won.
    async fn change(&self, l: &Led, old: PartitionState, next: PartitionState, what: &str) -> bool {
        match self
            .inner
            .cluster
            .catalog()
            .cas_partition_state(Some(old.epoch), &next)
            .await
        {
            Ok(true) => {
                tracing::info!(partition = %l.p, epoch = next.epoch.0, in_sync = ?next.in_sync.iter().map(|n| n.0.as_str()).collect::<Vec<_>>(), "{what}");
                // Entries are stamped with the epoch of the primary that wrote them. A node
                // that hands the partition over keeps the old one: an entry it still
                // commits late then differs (by epoch) from the new primary's entry at
                // the same position, so it is found and replaced, never taken for it.
                if next.primary == *self.inner.cluster.me() {
                    self.inner.engine.set_epoch(l.p, next.epoch.0);
                }
                *l.state.lock().unwrap_or_else(PoisonError::into_inner) = next;
                self.inner.cluster.refresh_soon();
                true
            }
            Ok(false) => {
                tracing::warn!(partition = %l.p, "the partition's state changed under this primary; re-reading it");
                self.inner.cluster.refresh_soon();
                false
            }
            Err(e) => {
                tracing::warn!(partition = %l.p, error = %e, "changing the in-sync set failed");
                false
            }
        }
    }

    // ---- replica side ----

    fn partition_lock(&self, p: PartitionId) -> Arc<tokio::sync::Mutex<()>> {
        self.inner
            .applying
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .entry(p)
            .or_default()
            .clone()
    }

    /// Applies a shipment from the primary of partition `p`, or says why not.
    pub async fn receive(
        &self,
        p: PartitionId,
        s: Shipment,
        skipped: Option<HashSet<ChunkId>>,
    ) -> Result<u64, Refusal> {
        let engine = &self.inner.engine;
        let lock = self.partition_lock(p);
        let _one = lock.lock().await;
        let outcome = self.fence(p, &s);
        // Every chunk file an entry makes reachable must be here before the entry is
        // applied (a chunk sent ahead may have been removed since: a restart's orphan
        // sweep, a reinstall): the primary sends it again after this refusal.
        let outcome = match (outcome, skipped) {
            (Ok(()), Some(skipped)) => {
                let chunks = engine.chunks().clone();
                let wanted: Vec<(u64, ChunkRef)> = s
                    .entries
                    .iter()
                    .flat_map(|(n, e)| e.chunks.iter().map(|c| (*n, c.clone())))
                    .filter(|(_, c)| !skipped.contains(&c.id))
                    .collect();
                let missing = tokio::task::spawn_blocking(move || {
                    wanted
                        .into_iter()
                        .find(|(_, c)| !chunks.path(c.partition, c.id).exists())
                })
                .await
                .unwrap_or(None);
                match missing {
                    Some((n, c)) => Err({
                        self.inner.cluster.metrics().missing_chunk_refusals.inc();
                        (
                            format!(
                                "chunk {} of entry {n} has not arrived; send it again",
                                c.id.0
                            ),
                            s.epoch,
                        )
                    }),
                    None => Ok(()),
                }
            }
            (outcome, _) => outcome,
        };
        let outcome = match outcome {
            Ok(()) => {
                self.inner
                    .seen
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .insert(p, s.epoch);
                engine
                    .apply_log(p, s.entries)
                    .await
                    .map_err(|e| (e.to_string(), s.epoch))
            }
            Err(refused) => Err(refused),
        };
        // Where this node stands, read only for a refusal (the primary starts over there).
        match outcome {
            Ok(lsn) => Ok(lsn),
            Err((reason, epoch)) => Err(Refusal {
                reason,
                position: engine.log_position(p).await.unwrap_or_default(),
                epoch,
            }),
        }
    }

    /// Why a shipment from `s.primary` under `s.epoch` must be refused (with the newest
    /// epoch this node has seen for `p`), if it must.
    fn fence(&self, p: PartitionId, s: &Shipment) -> Result<(), (String, u64)> {
        let cached = self.inner.cluster.partition_states();
        let known = cached.get(p.0 as usize).cloned().flatten();
        let seen = {
            let m = self
                .inner
                .seen
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            m.get(&p).copied().unwrap_or(0)
        }
        .max(known.as_ref().map_or(0, |k| k.epoch.0));
        if s.epoch < seen {
            return Err((
                format!(
                    "epoch {} is older than {seen}: a deposed primary is fenced",
                    s.epoch
                ),
                seen,
            ));
        }
        if let Some(k) = &known
            && k.epoch.0 == s.epoch
            && k.primary != s.primary
        {
            return Err((
                format!("{} is not the primary of epoch {}", s.primary.0, s.epoch),
                seen,
            ));
        }
        if known
            .as_ref()
            .is_some_and(|k| k.primary == *self.inner.cluster.me())
            && s.epoch <= seen
        {
            return Err(("this node leads the partition".into(), seen));
        }
        Ok(())
    }

    /// Replaces local partition `p` with a snapshot of its primary's (`primary`, at
    /// `epoch`); returns the position it then stands at.
    pub async fn resync(
        &self,
        p: PartitionId,
        epoch: u64,
        primary: &NodeId,
    ) -> Result<LogPosition, String> {
        let lock = self.partition_lock(p);
        let _one = lock.lock().await;
        let seen = self
            .inner
            .seen
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(&p)
            .copied()
            .unwrap_or(0);
        if epoch < seen {
            return Err(format!("epoch {epoch} is older than {seen}"));
        }
        // Wiping a partition on the word of a peer: only for the primary the catalog
        // names now, under the epoch it names.
        let current = self
            .inner
            .cluster
            .catalog()
            .partition_states()
            .await
            .map_err(|e| e.to_string())?
            .into_iter()
            .find(|s| s.partition == p);
        if !current
            .as_ref()
            .is_some_and(|s| s.primary == *primary && s.epoch.0 == epoch)
        {
            return Err(format!(
                "{} at epoch {epoch} is not partition {p}'s primary in the catalog",
                primary.0
            ));
        }
        let addr = self.rpc_addr(primary)?;
        let secret = self.secret()?;
        let imported = super::rpc::pull_partition(
            &self.inner.http,
            &addr,
            &secret,
            p,
            &self.inner.engine,
            Duration::from_secs(3600),
        )
        .await
        .map_err(|e| e.to_string())?;
        tracing::info!(partition = %p, primary = %primary.0, records = imported.records, chunks = imported.chunks, "partition reinstalled from its primary's snapshot");
        self.inner.cluster.metrics().replica_resyncs.inc();
        self.inner
            .engine
            .log_position(p)
            .await
            .map_err(|e| e.to_string())
    }
}

/// Sends a request to a peer and decodes its JSON answer; any failure as text.
/// Clears the flag when dropped.
struct ClearOnDrop<'a>(&'a std::sync::atomic::AtomicBool);

impl Drop for ClearOnDrop<'_> {
    fn drop(&mut self) {
        self.0.store(false, std::sync::atomic::Ordering::Release);
    }
}

/// Whether `state` (which names `me` primary) came from an orderly hand-over by the
/// primary this node saw just before: the epoch follows the one seen, and that primary
/// kept itself in the in-sync set (a failover or a restart hand-over removes it), having
/// stopped serving before it handed over.
fn handed_over(previous: Option<&(NodeId, Epoch)>, state: &PartitionState, me: &NodeId) -> bool {
    previous.is_some_and(|(was, epoch)| {
        was != me && epoch.0 + 1 == state.epoch.0 && state.in_sync.contains(was)
    })
}

async fn peer_json<T: serde::de::DeserializeOwned>(
    req: reqwest::RequestBuilder,
) -> Result<T, String> {
    req.send()
        .await
        .and_then(|r| r.error_for_status())
        .map_err(|e| e.to_string())?
        .json()
        .await
        .map_err(|e| e.to_string())
}
