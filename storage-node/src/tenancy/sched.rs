//! The node's I/O scheduler: weighted fair queueing per tenant in front of the disk.
//!
//! Object bodies move in pieces of at most 1 MiB (`model::data`); every piece read from
//! or written to a chunk file takes one of the node's `slots` for the time of its disk
//! I/O, and every request takes a turn when it is admitted: it waits behind the queued
//! pieces with smaller tags but holds no slot. While slots are free nothing waits. When
//! they are all taken, waiters are served smallest finish tag first, with the tags of
//! start-time fair queueing: a class's next piece starts where its previous one finished
//! (or at the virtual time, if later) and finishes `cost / weight` later, cost in bytes.
//! So over a busy period each tenant gets slot time in proportion to its weight (the
//! Tenant's `qos.weight`, default 100), whatever the number or size of its requests, and
//! a quiet tenant's request does not queue behind a flooding tenant's pieces: its turn,
//! which takes no slot, goes at once when its tag is first (its own pieces, if it has
//! any, wait for the next slot release). A class alone may take up to [`ALONE_FACTOR`]
//! times the slots.
//!
//! [`Class::Background`] (weight [`BACKGROUND_WEIGHT`]) is background work: a partition
//! snapshot streamed to a replica takes its turn per piece sent, and the KV TTL and
//! multipart expiry sweeps per batch (counted in `granary_background_io_bytes_total`).
//! Not yet in it: the startup orphan sweep (before the node serves) and chunk files
//! shipped to replicas (on the writing request's path).
//!
//! Metrics: time spent waiting, per tenant (`granary_tenant_queue_wait_seconds_total`).

use std::collections::{BinaryHeap, HashMap};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use tokio::sync::oneshot;

use super::rate::TenantLabels;
use crate::catalog::Catalog;
use crate::types::TenantId;

/// Pieces of I/O (up to 1 MiB each) a node runs at once.
pub const DEFAULT_SLOTS: usize = 2;
/// A tenant's weight when its QoS names none.
pub const DEFAULT_WEIGHT: u32 = 100;
/// The weight of background work (a tenant of weight 100 gets 10 times its share).
pub const BACKGROUND_WEIGHT: u32 = 10;
/// A class that asked for nothing for this long no longer counts as active: a class
/// alone may take more than the slots.
pub const ACTIVE: Duration = Duration::from_millis(500);
/// A class alone may hold this many times the slots.
pub const ALONE_FACTOR: usize = 4;
/// The cost charged for a request's turn: a small request counts as this many bytes.
pub const TURN_COST: u64 = 4096;

/// Who an I/O is for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Class {
    Tenant(TenantId),
    Background,
}

struct Waiter {
    finish: u128,
    seq: u64,
    tx: Option<oneshot::Sender<()>>,
    start: u128,
    /// Ok: a request's turn (takes no slot); Err: a piece (takes the slot).
    turn: Result<Class, Class>,
}

impl PartialEq for Waiter {
    fn eq(&self, o: &Self) -> bool {
        (self.finish, self.seq) == (o.finish, o.seq)
    }
}

impl Eq for Waiter {}

impl Ord for Waiter {
    fn cmp(&self, o: &Self) -> std::cmp::Ordering {
        // Smallest finish tag first (BinaryHeap is a max-heap), then arrival.
        o.finish.cmp(&self.finish).then(o.seq.cmp(&self.seq))
    }
}

impl PartialOrd for Waiter {
    fn partial_cmp(&self, o: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(o))
    }
}

impl State {
    /// Pops waiters at the head of the queue whose requests were cancelled.
    fn drop_cancelled_head(&mut self) {
        while self
            .queue
            .peek()
            .is_some_and(|w| w.tx.as_ref().is_none_or(|t| t.is_closed()))
        {
            self.queue.pop();
        }
    }

    /// Wakes the turns at the head of the queue (they take no slot), skipping
    /// cancelled waiters, until the head is a piece.
    fn wake_turns_at_head(&mut self) {
        loop {
            self.drop_cancelled_head();
            if self.queue.peek().is_none_or(|w| w.turn.is_err()) {
                return;
            }
            if let Some(mut w) = self.queue.pop() {
                self.vtime = self.vtime.max(w.start);
                if let Some(tx) = w.tx.take() {
                    let _ = tx.send(());
                }
            }
        }
    }
}

struct State {
    in_use: usize,
    /// Virtual time: the start tag of the piece most recently given a slot. Tags are in
    /// bytes x 1000 / weight.
    vtime: u128,
    /// Each class's last finish tag.
    last: HashMap<Class, u128>,
    /// Slots held, per class.
    holders: HashMap<Class, usize>,
    /// When each class last asked for a turn or a slot.
    seen: HashMap<Class, Instant>,
    queue: BinaryHeap<Waiter>,
    seq: u64,
}

#[derive(Clone)]
pub struct IoScheduler {
    slots: Arc<std::sync::atomic::AtomicUsize>,
    state: Arc<Mutex<State>>,
    catalog: Option<Arc<dyn Catalog>>,
    weights: Arc<Mutex<HashMap<TenantId, (u32, Instant)>>>,
    /// Seconds waited for a slot, per tenant.
    pub waited: Family<TenantLabels, Counter<f64, std::sync::atomic::AtomicU64>>,
    /// Bytes (or cost units) of background work admitted (snapshot streaming, expiry).
    pub background: Counter,
    names: Arc<Mutex<HashMap<TenantId, String>>>,
}

/// A place in the queue. Dropped before it was served (its request was cancelled), it
/// gives back what it was handed meanwhile (a slot: to the next waiter) and, when it
/// was its class's last, its class's tag, so cancelled work is not charged.
struct Pending {
    rx: Option<oneshot::Receiver<()>>,
    sched: IoScheduler,
    class: Class,
    piece: bool,
    tags: (u128, u128),
}

impl Drop for Pending {
    fn drop(&mut self) {
        let Some(mut rx) = self.rx.take() else {
            return;
        };
        // After close() no sender can succeed: either it handed over before (the value
        // is there) or it never will.
        rx.close();
        if rx.try_recv().is_ok() {
            if self.piece {
                self.sched.release(self.class);
            }
        } else {
            let mut s = self.sched.lock();
            if s.last.get(&self.class) == Some(&self.tags.1) {
                s.last.insert(self.class, self.tags.0);
            }
        }
    }
}

/// A slot held for one piece of I/O; given to the next waiter when dropped.
pub struct Slot {
    sched: IoScheduler,
    class: Class,
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.sched.release(self.class);
    }
}

impl IoScheduler {
    /// `slots`: pieces of I/O the node runs at once. `catalog`: where weights are read
    /// (None: every tenant has the default weight).
    pub fn new(slots: usize, catalog: Option<Arc<dyn Catalog>>) -> Self {
        Self {
            slots: Arc::new(std::sync::atomic::AtomicUsize::new(slots.max(1))),
            state: Arc::new(Mutex::new(State {
                in_use: 0,
                vtime: 0,
                last: HashMap::new(),
                holders: HashMap::new(),
                seen: HashMap::new(),
                queue: BinaryHeap::new(),
                seq: 0,
            })),
            catalog,
            weights: Arc::default(),
            waited: Family::default(),
            background: Counter::default(),
            names: Arc::default(),
        }
    }

    /// Sets how many pieces run at once (the node's `io_slots`).
    pub fn set_slots(&self, n: usize) {
        self.slots
            .store(n.max(1), std::sync::atomic::Ordering::Relaxed);
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The virtual finish tag of `class`'s last piece or turn (what it has been charged).
    #[cfg(test)]
    pub(crate) fn charged(&self, class: Class) -> u128 {
        self.lock().last.get(&class).copied().unwrap_or(0)
    }

    /// The class's weight (a tenant's QoS, read again after the rate limits' spec
    /// lifetime).
    pub async fn weight(&self, class: Class) -> u32 {
        let t = match class {
            Class::Background => return BACKGROUND_WEIGHT,
            Class::Tenant(t) => t,
        };
        let stale = {
            let mut ws = self.weights.lock().unwrap_or_else(PoisonError::into_inner);
            match ws.get_mut(&t) {
                Some((w, at)) if at.elapsed() < super::rate::SPEC_TTL => return *w,
                // Expired: this caller reads it again; the others keep the old weight
                // meanwhile (one catalog read, not one per concurrent request).
                Some((w, at)) => {
                    *at = Instant::now();
                    Some(*w)
                }
                None => None,
            }
        };
        let Some(catalog) = &self.catalog else {
            return DEFAULT_WEIGHT;
        };
        let (w, name) = match catalog.tenant_by_id(t).await {
            Ok(Some(tenant)) => (
                tenant.spec.qos.weight.unwrap_or(DEFAULT_WEIGHT).max(1),
                Some(tenant.name),
            ),
            _ => (stale.unwrap_or(DEFAULT_WEIGHT), None),
        };
        self.weights
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(t, (w, Instant::now()));
        if let Some(n) = name {
            self.names
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .insert(t, n);
        }
        w
    }

    /// Waits for a slot for a piece of `cost` bytes of `class`'s I/O, at `weight`
    /// ([`Self::weight`]).
    pub async fn slot(&self, class: Class, weight: u32, cost: u64) -> Slot {
        self.wait(class, weight, cost, false).await;
        Slot {
            sched: self.clone(),
            class,
        }
    }

    /// Waits for this request's fair turn: behind the pieces queued before it with
    /// smaller tags, but holding no slot (a request's own pieces take slots).
    pub async fn turn(&self, class: Class, cost: u64) {
        let w = self.weight(class).await;
        self.wait(class, w, cost.max(TURN_COST), true).await;
    }

    async fn wait(&self, class: Class, weight: u32, cost: u64, turn: bool) {
        if class == Class::Background {
            self.background.inc_by(cost);
        }
        let weight = weight.max(1);
        let rx = {
            let mut s = self.lock();
            let last = s.last.get(&class).copied().unwrap_or(0);
            let start = s.vtime.max(last);
            let finish = start + u128::from(cost.max(1)) * 1000 / u128::from(weight);
            s.last.insert(class, finish);
            let slots = self.slots.load(std::sync::atomic::Ordering::Relaxed);
            // Alone (no other class asked for a turn or a slot within ACTIVE), a class
            // is never held back: there is nobody to be fair to.
            let now = Instant::now();
            s.seen.insert(class, now);
            if s.seen.len() > 64 {
                s.seen.retain(|_, t| now.duration_since(*t) < ACTIVE);
            }
            if s.last.len() > 64 {
                // A class whose tags are behind virtual time starts from it anyway.
                let vtime = s.vtime;
                s.last.retain(|_, l| *l > vtime);
            }
            // Alone, a class may take a few times the slots (never unbounded: a class
            // that shows up waits for at most that many pieces to drain).
            let alone = s
                .seen
                .iter()
                .all(|(c, t)| *c == class || now.duration_since(*t) >= ACTIVE)
                && s.holders.keys().all(|c| *c == class)
                && s.in_use < slots * ALONE_FACTOR;
            // A turn takes no slot: when nobody waiting is due before it (its finish
            // tag is the smallest), it goes now rather than at the next release, which
            // may be a whole piece (or a chunk's fsync) away.
            // (Waiters that were cancelled are dropped from the head first.)
            s.drop_cancelled_head();
            let head = s.queue.peek().map(|w| (w.start, w.finish));
            let first = turn && head.is_none_or(|(_, f)| finish < f);
            if first && let Some((head_start, _)) = head {
                // Past the queue: virtual time moves no further than the head's start,
                // so the work waiting there is not made to look late.
                s.vtime = s.vtime.max(start.min(head_start));
                None
            } else if first || (s.queue.is_empty() && (turn || s.in_use < slots || alone)) {
                if !turn {
                    s.in_use += 1;
                    *s.holders.entry(class).or_default() += 1;
                }
                s.vtime = s.vtime.max(start);
                None
            } else {
                let (tx, rx) = oneshot::channel();
                s.seq += 1;
                let seq = s.seq;
                s.queue.push(Waiter {
                    finish,
                    seq,
                    tx: Some(tx),
                    start,
                    turn: if turn { Ok(class) } else { Err(class) },
                });
                Some((rx, start, finish))
            }
        };
        if let Some((rx, start, finish)) = rx {
            let started = Instant::now();
            let mut pending = Pending {
                rx: Some(rx),
                sched: self.clone(),
                class,
                piece: !turn,
                tags: (start, finish),
            };
            if let Some(rx) = pending.rx.as_mut() {
                // A sender is dropped unsent only when the scheduler is gone.
                let _ = rx.await;
            }
            // Handed over: the slot (for a piece) is now this caller's.
            pending.rx = None;
            self.note_wait(class, started.elapsed());
        }
    }

    fn release(&self, class: Class) {
        let mut s = self.lock();
        if let Some(n) = s.holders.get_mut(&class) {
            *n -= 1;
            if *n == 0 {
                s.holders.remove(&class);
            }
        }
        let slots = self.slots.load(std::sync::atomic::Ordering::Relaxed);
        if s.in_use > slots {
            // Taken beyond the slots while a class was alone: shrink back first (turns
            // at the head need no slot: they go).
            s.in_use -= 1;
            s.wake_turns_at_head();
            return;
        }
        while let Some(mut w) = s.queue.pop() {
            s.vtime = s.vtime.max(w.start);
            let Some(tx) = w.tx.take() else { continue };
            match w.turn {
                // A turn takes no slot: wake it and go on to the next waiter.
                Ok(_) => {
                    let _ = tx.send(());
                }
                Err(c) => {
                    if tx.send(()).is_ok() {
                        // The slot passes to the waiter: in_use is unchanged. Turns that
                        // are now first go too (they take no slot).
                        *s.holders.entry(c).or_default() += 1;
                        s.wake_turns_at_head();
                        return;
                    }
                    // That waiter gave up (its request was cancelled): the next one.
                }
            }
        }
        s.in_use = s.in_use.saturating_sub(1);
    }

    fn note_wait(&self, class: Class, d: Duration) {
        let Class::Tenant(t) = class else {
            return;
        };
        let name = self
            .names
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(&t)
            .cloned()
            .unwrap_or_else(|| t.to_string());
        self.waited
            .get_or_create(&TenantLabels { tenant: name })
            .inc_by(d.as_secs_f64());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tenant(n: u128) -> Class {
        Class::Tenant(TenantId(uuid::Uuid::from_u128(n)))
    }

    /// With every slot taken, a quiet tenant's request is served before a flooding
    /// tenant's queued pieces; a tenant alone is never held back.
    #[tokio::test]
    async fn waiters_are_served_in_fair_order() {
        let s = IoScheduler::new(1, None);
        // Alone, a tenant takes as many slots as it asks for.
        let alone: Vec<Slot> =
            futures::future::join_all((0..3).map(|_| s.slot(tenant(9), 100, 1))).await;
        drop(alone);
        let held = s.slot(tenant(2), 100, 1).await;
        let order = Arc::new(Mutex::new(Vec::new()));
        let mut tasks = Vec::new();
        // The flooder queues 4 pieces behind another tenant's, then a third tenant's
        // small request arrives.
        for i in 0..4 {
            let (s, order) = (s.clone(), order.clone());
            tasks.push(tokio::spawn(async move {
                let _slot = s.slot(tenant(1), 100, 1 << 20).await;
                order.lock().unwrap().push(format!("a{i}"));
            }));
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let (s2, order2) = (s.clone(), order.clone());
        tasks.push(tokio::spawn(async move {
            s2.turn(tenant(3), 4096).await;
            order2.lock().unwrap().push("c".into());
        }));
        tokio::time::sleep(Duration::from_millis(20)).await;
        // The small request goes at once, while the slot is still held: a turn takes no
        // slot, and nobody waiting is due before it. The flooder's pieces wait.
        assert_eq!(*order.lock().unwrap(), vec!["c".to_string()]);
        // The flooder's own small request is due after its queued pieces: it waits
        // for them.
        let mut flooder_turn = Box::pin(s.turn(tenant(1), 4096));
        assert!(futures::poll!(flooder_turn.as_mut()).is_pending());
        drop(held);
        for t in tasks {
            t.await.unwrap();
        }
        tokio::time::timeout(Duration::from_secs(1), flooder_turn)
            .await
            .expect("the flooder's turn comes once its pieces are served");
        let order = order.lock().unwrap().clone();
        assert_eq!(order, ["c", "a0", "a1", "a2", "a3"]);
    }

    /// A waiter cancelled after it was handed a slot, before it ran, gives the slot to
    /// the next waiter: nothing leaks, and the node keeps serving.
    #[tokio::test]
    async fn a_cancelled_waiter_gives_its_slot_back() {
        let s = IoScheduler::new(1, None);
        let held = s.slot(tenant(1), 100, 1).await;
        let mut waiting = Box::pin(s.slot(tenant(2), 100, 1));
        assert!(futures::poll!(waiting.as_mut()).is_pending());
        // The slot passes to the waiter, which is dropped before it runs.
        drop(held);
        drop(waiting);
        assert_eq!(s.lock().in_use, 0);
        assert!(s.lock().holders.is_empty());
        // Cancelled before anything was handed: its tag is given back too.
        let held = s.slot(tenant(1), 100, 1).await;
        let before = s.lock().last.get(&tenant(2)).copied();
        let mut waiting = Box::pin(s.slot(tenant(2), 100, 1 << 20));
        assert!(futures::poll!(waiting.as_mut()).is_pending());
        drop(waiting);
        assert_eq!(s.lock().last.get(&tenant(2)).copied(), before);
        drop(held);
        let _again = tokio::time::timeout(Duration::from_secs(1), s.slot(tenant(3), 100, 1))
            .await
            .expect("a slot is free");
    }

    /// Over a busy period, slot time follows the weights.
    #[tokio::test]
    async fn shares_follow_the_weights() {
        let s = IoScheduler::new(1, None);
        let held = s.slot(Class::Background, BACKGROUND_WEIGHT, 1).await;
        let order = Arc::new(Mutex::new(Vec::new()));
        let mut tasks = Vec::new();
        for (class, name) in [(tenant(1), "t"), (Class::Background, "bg")] {
            for _ in 0..20 {
                let (s, order) = (s.clone(), order.clone());
                tasks.push(tokio::spawn(async move {
                    let w = s.weight(class).await;
                    let _slot = s.slot(class, w, 1000).await;
                    order.lock().unwrap().push(name);
                }));
            }
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
        drop(held);
        for t in tasks {
            t.await.unwrap();
        }
        let order = order.lock().unwrap().clone();
        // In the first 11 grants, the tenant (weight 100) gets about 10 for the
        // background's (weight 10) 1.
        let first: Vec<_> = order.iter().take(11).collect();
        let tenant_share = first.iter().filter(|n| ***n == "t").count();
        assert!(tenant_share >= 9, "{order:?}");
    }
}
