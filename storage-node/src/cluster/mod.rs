//! The cluster layer: membership, failure detection, the partition layout and the
//! internal RPC port. Sits beside the model above the engine and knows nothing of
//! HTTP front ends; docs/cluster.md is its design.
//!
//! What it promises today:
//! - Every node registers itself in the catalog (id, region, zone, advertised S3, KV,
//!   admin and RPC addresses, capacity) and heartbeats every interval.
//! - Every node probes its peers over the RPC port (authenticated with the cluster
//!   secret) and keeps a view of each peer: alive, suspected or failed
//!   ([`membership`]); the view is served at `/admin/v1/nodes` and in metrics.
//! - One layout per cluster, versioned in the catalog ([`layout`]): computed from the
//!   members that are not failed by the coordinator (the alive node with the lowest
//!   id), stored under the next version (a lost race simply reloads), and cached on
//!   every node, which learns of a new version within one interval by polling and at
//!   once on Postgres through `LISTEN/NOTIFY`.
//!
//! - Every partition has an acting primary recorded in the catalog (`partition_states`,
//!   changed only by compare-and-set on its epoch). The coordinator gives each partition
//!   without one its layout's preferred primary; every node caches the table and answers
//!   [`Cluster::route`]: serve here, forward to the primary's RPC port, or unavailable.
//!
//! - Partitions are replicated from their primary to their in-sync replicas
//!   ([`replication`]).
//!
//! - A node serves what it leads only within its lease; the coordinator promotes an
//!   in-sync replica when a primary fails ([`Cluster::lease_valid`], `promote`).
//!
//! Not yet (docs/cluster.md, "Stages"): moving live primaries (rebalancing).

pub mod forward;
pub mod layout;
pub mod membership;
pub mod replication;
pub mod rpc;

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use serde::Serialize;
use tokio::sync::{Notify, watch};

use crate::catalog::{Catalog, NodeRecord, PartitionState, StoredLayout};
use crate::telemetry::Metrics;
use crate::types::{Epoch, NodeId, PartitionId};

pub use layout::{Layout, Member};
pub use membership::{NodeState, Thresholds};

/// The 503 message of a read whose answer could not be released: what it saw may not be
/// on enough replicas yet (see `Replicator::barrier`), and a read changes nothing.
pub const READ_NOT_CONFIRMED: &str = "the partition changed hands or lost in-sync replicas \
    while this read ran, so what it saw cannot be confirmed durable yet; nothing was \
    changed, retry";

/// Settings of the cluster layer, taken from the node's configuration. (No `Debug`: it
/// holds the cluster secret and the catalog URL, which may carry a password.)
#[derive(Clone)]
pub struct ClusterConfig {
    pub me: NodeRecord,
    pub partitions: u16,
    pub replication_factor: u8,
    /// Members the layout must have before partitions get their first primaries.
    pub bootstrap_expect: u16,
    pub interval: Duration,
    pub thresholds: Thresholds,
    pub secret: Option<Arc<str>>,
    /// Postgres URL to LISTEN on for layout announcements (None on SQLite).
    pub listen_url: Option<String>,
}

/// One member as this node sees it.
#[derive(Clone, Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct NodeView {
    #[serde(flatten)]
    pub record: NodeRecord,
    pub state: NodeState,
    /// Milliseconds since its last heartbeat, by the catalog's clock.
    pub heartbeat_age_ms: i64,
    /// Milliseconds its RPC port has not answered this node's probes (0 when it does;
    /// absent for this node itself or when probing is off).
    pub unreachable_ms: Option<u64>,
    pub is_self: bool,
}

/// Where a request for one partition is served.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Route {
    /// This node is the partition's primary.
    Local,
    /// Another node is; forward to its RPC address.
    Remote { node: NodeId, rpc_addr: String },
    /// Nobody can serve it now; the reason is for the client.
    Unavailable(String),
}

#[derive(Clone)]
pub struct Cluster {
    inner: Arc<Inner>,
}

/// Requests per second tried, per tenant id (`tenancy::rate`).
type Demand = HashMap<String, f64>;

struct Inner {
    cfg: ClusterConfig,
    catalog: Arc<dyn Catalog>,
    metrics: Arc<Metrics>,
    view: Mutex<Vec<NodeView>>,
    /// Per peer: since when its probes fail (absent: it answered the last one).
    unreachable_since: Mutex<HashMap<NodeId, Instant>>,
    layout: watch::Sender<Option<Arc<Layout>>>,
    /// Every partition's state as last read from the catalog, indexed by partition.
    states: std::sync::RwLock<Arc<Vec<Option<PartitionState>>>>,
    /// Bumped whenever `view` is replaced.
    view_seq: watch::Sender<u64>,
    /// Bumped whenever the partition table changes.
    states_seq: watch::Sender<u64>,
    /// Members counted when the bootstrap wait was last logged (logged on change only).
    waiting_logged: std::sync::atomic::AtomicUsize,
    /// Whether "this node leads nothing" was logged.
    idle_logged: std::sync::atomic::AtomicBool,
    /// Random per process start: a peer whose incarnation changed has restarted (and may
    /// have lost what it held).
    incarnation: String,
    /// Each peer's incarnation, as its last answered probe said.
    incarnations: Mutex<HashMap<NodeId, String>>,
    /// Rate-limited tenants' demand (requests per second tried) on this node, as its
    /// probe answers tell the peers, and on each peer, from its last answered probe.
    local_demand: Mutex<Arc<serde_json::Map<String, serde_json::Value>>>,
    peer_demand: Mutex<HashMap<NodeId, (Instant, Demand)>>,
    /// When the last heartbeat that reached the catalog was sent: this node serves the
    /// partitions it leads only within `suspect_after` of it (its lease), and the
    /// coordinator promotes a replica only after `fail_after` without a heartbeat.
    lease_from: Mutex<Option<Instant>>,
    /// Partitions whose failed primary had no live in-sync replica (logged once each).
    stranded: Mutex<std::collections::HashSet<PartitionId>>,
    wake: Notify,
    http: reqwest::Client,
}

impl Cluster {
    pub fn new(cfg: ClusterConfig, catalog: Arc<dyn Catalog>, metrics: Arc<Metrics>) -> Self {
        // Without its timeouts a probe of a hung peer would stall every heartbeat; the
        // builder fails only if the TLS backend cannot start, which plain HTTP never needs.
        let http = peer_client(cfg.interval, |b| b.timeout(cfg.interval));
        Self {
            inner: Arc::new(Inner {
                cfg,
                catalog,
                metrics,
                view: Mutex::new(Vec::new()),
                unreachable_since: Mutex::new(HashMap::new()),
                layout: watch::Sender::new(None),
                states: Default::default(),
                view_seq: watch::Sender::new(0),
                states_seq: watch::Sender::new(0),
                waiting_logged: Default::default(),
                idle_logged: Default::default(),
                incarnation: uuid::Uuid::new_v4().simple().to_string(),
                incarnations: Mutex::new(HashMap::new()),
                local_demand: Mutex::default(),
                peer_demand: Mutex::default(),
                lease_from: Mutex::new(None),
                stranded: Mutex::new(Default::default()),
                wake: Notify::new(),
                http,
            }),
        }
    }

    pub fn me(&self) -> &NodeId {
        &self.inner.cfg.me.id
    }

    pub fn partitions(&self) -> u16 {
        self.inner.cfg.partitions
    }

    /// The client for requests to peers (short default timeout; override per request).
    pub(crate) fn http(&self) -> &reqwest::Client {
        &self.inner.http
    }

    pub fn secret(&self) -> Option<&Arc<str>> {
        self.inner.cfg.secret.as_ref()
    }

    /// The members as this node saw them at its last tick.
    pub fn nodes(&self) -> Vec<NodeView> {
        self.inner
            .view
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// The current layout, once one is known.
    pub fn layout(&self) -> Option<Arc<Layout>> {
        self.inner.layout.borrow().clone()
    }

    /// Where partition `p` is served, by this node's latest view of the catalog.
    pub fn route(&self, p: PartitionId) -> Route {
        let states = self.partition_states();
        let Some(Some(state)) = states.get(p.0 as usize) else {
            return Route::Unavailable(format!(
                "partition {p} has no primary yet: the cluster is forming (partitions are \
                 assigned once bootstrap_expect nodes have joined)"
            ));
        };
        if state.primary == *self.me() {
            if !self.lease_valid() {
                return Route::Unavailable(format!(
                    "this node has not reached the catalog for longer than suspect_after, so \
                     it serves none of its partitions ({p} included) until it does: another \
                     node may be taking them over"
                ));
            }
            return Route::Local;
        }
        let view = self
            .inner
            .view
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        match view.iter().find(|v| v.record.id == state.primary) {
            Some(v) if v.state == NodeState::Failed => Route::Unavailable(format!(
                "partition {p} is led by node {}, which has failed; it is unavailable until an \
                 in-sync replica is promoted (or that node returns)",
                state.primary.0
            )),
            // Fail fast rather than queue behind a peer that does not answer probes.
            Some(v) if v.state == NodeState::Suspected => Route::Unavailable(format!(
                "partition {p} is held by node {}, which does not answer from here; retry",
                state.primary.0
            )),
            Some(v) if !v.record.rpc_addr.is_empty() => Route::Remote {
                node: state.primary.clone(),
                rpc_addr: v.record.rpc_addr.clone(),
            },
            _ => Route::Unavailable(format!(
                "partition {p} is held by node {}, which this node cannot address",
                state.primary.0
            )),
        }
    }

    /// Resolves once this node no longer judges `node` alive (suspected, failed or no
    /// longer a member): lets a request waiting on that node give up.
    pub async fn until_not_alive(&self, node: &NodeId) {
        let mut seq = self.inner.view_seq.subscribe();
        loop {
            let alive = self
                .inner
                .view
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .iter()
                .any(|v| v.record.id == *node && v.state == NodeState::Alive);
            if !alive {
                return;
            }
            if seq.changed().await.is_err() {
                return std::future::pending().await;
            }
        }
    }

    /// Every partition's replication state as last read (index: partition; None: unset).
    pub fn partition_states(&self) -> Arc<Vec<Option<PartitionState>>> {
        self.inner
            .states
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Whether this node's lease holds: its last heartbeat that reached the catalog was
    /// sent less than `suspect_after` ago.
    pub fn lease_valid(&self) -> bool {
        self.inner
            .lease_from
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .is_some_and(|t| t.elapsed() < self.inner.cfg.thresholds.suspect_after)
    }

    /// Records a heartbeat; returns when it was sent if it reached the catalog.
    async fn heartbeat(&self) -> anyhow::Result<Option<Instant>> {
        let sent = Instant::now();
        let ok = self.inner.catalog.heartbeat(self.me()).await?;
        Ok(ok.then_some(sent))
    }

    /// This process's incarnation (random per start).
    pub fn incarnation(&self) -> &str {
        &self.inner.incarnation
    }

    /// A peer's incarnation, from its last answered probe.
    pub fn incarnation_of(&self, id: &NodeId) -> Option<String> {
        self.inner
            .incarnations
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(id)
            .cloned()
    }

    /// Sets this node's demand per rate-limited tenant (`tenancy::rate`), which its
    /// probe answers carry to the peers.
    pub fn set_local_demand(&self, demand: impl IntoIterator<Item = (String, f64)>) {
        let map = demand
            .into_iter()
            .map(|(t, d)| (t, serde_json::Value::from(d)))
            .collect();
        *self
            .inner
            .local_demand
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = Arc::new(map);
    }

    pub fn local_demand(&self) -> Arc<serde_json::Map<String, serde_json::Value>> {
        self.inner
            .local_demand
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// The peers' demand per tenant, summed over the peers that told it within the
    /// last three intervals, and how many those are.
    pub fn peer_demand(&self) -> (HashMap<String, f64>, u32) {
        let fresh = self.inner.cfg.interval * 3;
        let mut sum = HashMap::new();
        let mut known = 0;
        for (at, demand) in self
            .inner
            .peer_demand
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .values()
        {
            if at.elapsed() > fresh {
                continue;
            }
            known += 1;
            for (t, d) in demand {
                *sum.entry(t.clone()).or_insert(0.0) += d;
            }
        }
        (sum, known)
    }

    /// Changes whenever the partition table does.
    pub fn watch_states(&self) -> watch::Receiver<u64> {
        self.inner.states_seq.subscribe()
    }

    pub fn metrics(&self) -> &Metrics {
        &self.inner.metrics
    }

    pub fn catalog(&self) -> &Arc<dyn Catalog> {
        &self.inner.catalog
    }

    /// Reads the partition states again now (a forwarded request found the cached
    /// primary wrong).
    pub fn refresh_soon(&self) {
        self.inner.wake.notify_one();
    }

    /// Changes to the current layout.
    pub fn watch_layout(&self) -> watch::Receiver<Option<Arc<Layout>>> {
        self.inner.layout.subscribe()
    }

    /// Registers this node, then heartbeats, probes, judges and maintains the layout every
    /// interval until `shutdown` flips. The first tick runs before this returns, so a
    /// node that serves has registered and knows a layout.
    pub async fn start(
        &self,
        shutdown: watch::Receiver<bool>,
    ) -> anyhow::Result<tokio::task::JoinHandle<()>> {
        self.inner.catalog.upsert_node(&self.inner.cfg.me).await?;
        // Stamp the first heartbeat with the catalog's clock, like every later one.
        self.heartbeat().await?;
        if let Err(e) = self.tick().await {
            tracing::warn!(error = %e, "first cluster tick failed; retrying");
        }
        if let Some(url) = self.inner.cfg.listen_url.clone() {
            tokio::spawn(listen_for_layouts(self.clone(), url, shutdown.clone()));
        }
        let me = self.clone();
        Ok(tokio::spawn(async move { me.run(shutdown).await }))
    }

    async fn run(self, mut shutdown: watch::Receiver<bool>) {
        let mut tick = tokio::time::interval(self.inner.cfg.interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                _ = self.inner.wake.notified() => {}
                _ = shutdown.wait_for(|v| *v) => return,
            }
            if let Err(e) = self.tick().await {
                tracing::warn!(error = %e, "cluster tick failed; retrying next interval");
            }
        }
    }

    async fn tick(&self) -> anyhow::Result<()> {
        let inner = &self.inner;
        let catalog = &inner.catalog;
        let sent = match self.heartbeat().await? {
            Some(sent) => sent,
            None => {
                // Removed from the catalog behind our back (or a fresh catalog): register
                // again.
                catalog.upsert_node(&inner.cfg.me).await?;
                self.heartbeat()
                    .await?
                    .ok_or_else(|| anyhow::anyhow!("this node's heartbeat is not recorded"))?
            }
        };
        let now = catalog.now_millis().await?;
        let records: Vec<NodeRecord> = catalog
            .list_nodes()
            .await?
            .into_iter()
            .filter(|n| n.region == inner.cfg.me.region)
            .collect();
        self.probe_peers(&records).await;
        let view = self.judge(records, now);
        self.publish_view(&view);
        let previous = std::mem::replace(
            &mut *inner.view.lock().unwrap_or_else(PoisonError::into_inner),
            view.clone(),
        );
        log_transitions(&previous, &view);
        inner.view_seq.send_modify(|n| *n += 1);
        let coordinator = view
            .iter()
            .filter(|v| v.state == NodeState::Alive)
            .map(|v| &v.record.id)
            .min()
            == Some(self.me());
        self.maintain_layout(&view, coordinator).await?;
        self.maintain_partitions(coordinator, &view).await?;
        // The lease runs from this tick's heartbeat, and only once the partition table
        // read after it is installed: a node that was stopped or cut off never serves from
        // the table it had before (another node may lead its partitions now).
        *inner
            .lease_from
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = Some(sent);
        Ok(())
    }

    /// Failover: for every partition whose primary is failed (no catalog heartbeat for
    /// `fail_after`, so its lease of `suspect_after` has long expired and it serves
    /// nothing), names the first live member of its in-sync set, in the layout's order,
    /// primary under the next epoch, without the failed node. Every in-sync member holds
    /// every acknowledged write, so none is lost. True if anything changed.
    async fn promote(&self, stored: &[PartitionState], view: &[NodeView]) -> anyhow::Result<bool> {
        let state_of = |id: &NodeId| view.iter().find(|v| v.record.id == *id).map(|v| v.state);
        let layout = self.layout();
        let mut changed = false;
        for s in stored {
            if state_of(&s.primary) != Some(NodeState::Failed) {
                continue;
            }
            let order: Vec<NodeId> = layout
                .as_ref()
                .map(|l| l.replicas(s.partition).map(|m| m.id.clone()).collect())
                .unwrap_or_default();
            let mut candidates: Vec<&NodeId> = s
                .in_sync
                .iter()
                .filter(|n| **n != s.primary && state_of(n) == Some(NodeState::Alive))
                .collect();
            candidates.sort_by_key(|n| order.iter().position(|o| o == *n).unwrap_or(usize::MAX));
            let Some(next_primary) = candidates.first() else {
                let first = self
                    .inner
                    .stranded
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .insert(s.partition);
                if first {
                    tracing::error!(partition = %s.partition, primary = %s.primary.0,
                        in_sync = ?s.in_sync.iter().map(|n| n.0.as_str()).collect::<Vec<_>>(),
                        "the partition's primary failed and no in-sync replica is alive: it stays unavailable until one returns");
                }
                continue;
            };
            let next = PartitionState {
                partition: s.partition,
                epoch: Epoch(s.epoch.0 + 1),
                primary: (*next_primary).clone(),
                in_sync: s
                    .in_sync
                    .iter()
                    .filter(|n| **n != s.primary)
                    .cloned()
                    .collect(),
            };
            if self
                .inner
                .catalog
                .cas_partition_state(Some(s.epoch), &next)
                .await?
            {
                self.inner
                    .stranded
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .remove(&s.partition);
                tracing::warn!(partition = %s.partition, failed = %s.primary.0, primary = %next.primary.0,
                    epoch = next.epoch.0, "primary failed: promoted an in-sync replica");
                changed = true;
            }
        }
        Ok(changed)
    }

    /// Whether first primaries may be assigned from `layout`: always once the cluster
    /// exists (some partition has a state), else when `bootstrap_expect` nodes joined.
    fn enough_to_bootstrap(&self, layout: &Layout, creating: bool) -> bool {
        let expect = self.inner.cfg.bootstrap_expect as usize;
        if !creating || layout.members.len() >= expect {
            return true;
        }
        let joined = layout.members.len();
        if self
            .inner
            .waiting_logged
            .swap(joined, std::sync::atomic::Ordering::Relaxed)
            != joined
        {
            tracing::info!(
                joined,
                expect,
                "waiting for bootstrap_expect nodes before assigning partitions"
            );
        }
        false
    }

    /// Reads every partition's state; the coordinator first gives each partition that has
    /// none its layout's preferred primary (epoch 1), and replaces failed primaries
    /// ([`Cluster::promote`]). A live primary is never moved here: primaries hand their
    /// partitions to the layout's preferred ones themselves (`Replicator::hand_off`).
    async fn maintain_partitions(
        &self,
        coordinator: bool,
        view: &[NodeView],
    ) -> anyhow::Result<()> {
        let catalog = &self.inner.catalog;
        let n = self.inner.cfg.partitions as usize;
        let mut stored = catalog.partition_states().await?;
        if coordinator && self.promote(&stored, view).await? {
            stored = catalog.partition_states().await?;
        }
        if coordinator
            && stored.len() < n
            && let Some(layout) = self.layout()
            && self.enough_to_bootstrap(&layout, stored.is_empty())
        {
            let mut have = vec![false; n];
            for s in &stored {
                if let Some(h) = have.get_mut(s.partition.0 as usize) {
                    *h = true;
                }
            }
            let initial: Vec<PartitionState> = (0..self.inner.cfg.partitions)
                .map(PartitionId)
                .filter(|p| !have[p.0 as usize])
                .filter_map(|p| {
                    // Every replica is empty and so in sync at creation.
                    let in_sync: Vec<NodeId> = layout.replicas(p).map(|m| m.id.clone()).collect();
                    Some(PartitionState {
                        partition: p,
                        epoch: Epoch(1),
                        primary: in_sync.first()?.clone(),
                        in_sync,
                    })
                })
                .collect();
            let set = catalog.init_partition_states(&initial).await?;
            if set > 0 {
                tracing::info!(
                    partitions = set,
                    layout = layout.version,
                    "assigned first primaries from the layout"
                );
            }
            stored = catalog.partition_states().await?;
        }
        let mut table = vec![None; n];
        for s in stored {
            if let Some(slot) = table.get_mut(s.partition.0 as usize) {
                *slot = Some(s);
            }
        }
        let led = table
            .iter()
            .flatten()
            .filter(|s| s.primary == *self.me())
            .count();
        self.inner.metrics.partitions_led.set(led as i64);
        let planned: u32 = self.layout().map_or(0, |l| {
            l.members
                .iter()
                .zip(l.load())
                .filter(|(m, _)| m.id == *self.me())
                .map(|(_, (primary, _))| primary)
                .sum()
        });
        if led == 0
            && planned > 0
            && table.iter().all(Option::is_some)
            && !self
                .inner
                .idle_logged
                .swap(true, std::sync::atomic::Ordering::Relaxed)
        {
            tracing::info!(
                planned_primaries = planned,
                "this node leads no partition yet: it joined a cluster whose partitions were \
                 assigned without it; their primaries hand them over once it has caught up"
            );
        }
        let mut current = self
            .inner
            .states
            .write()
            .unwrap_or_else(PoisonError::into_inner);
        if **current != table {
            *current = Arc::new(table);
            drop(current);
            self.inner.states_seq.send_modify(|n| *n += 1);
        }
        Ok(())
    }

    /// Probes every peer's RPC port at once; remembers since when each one fails.
    async fn probe_peers(&self, records: &[NodeRecord]) {
        let Some(secret) = self.inner.cfg.secret.clone() else {
            return;
        };
        let probes = records
            .iter()
            .filter(|n| n.id != *self.me() && !n.rpc_addr.is_empty())
            .map(|n| {
                let (http, secret) = (self.inner.http.clone(), secret.clone());
                let url = format!("http://{}/rpc/v1/ping", n.rpc_addr);
                let id = n.id.clone();
                async move {
                    // Only the node we meant counts: a stale address or a wrong advertised
                    // one must not make a dead node look alive.
                    let answer = match http.get(&url).bearer_auth(&*secret).send().await {
                        Ok(r) if r.status().is_success() => {
                            r.json::<serde_json::Value>().await.ok()
                        }
                        _ => None,
                    }
                    .filter(|v| v["nodeId"].as_str() == Some(id.0.as_str()));
                    let incarnation = answer
                        .as_ref()
                        .and_then(|v| v["incarnation"].as_str().map(str::to_string));
                    // Absent from an older node's answer (its demand stays unknown); a
                    // malformed entry is skipped, a huge one clamped.
                    let demand: Option<HashMap<String, f64>> = answer
                        .as_ref()
                        .and_then(|v| v["demand"].as_object())
                        .map(|m| {
                            m.iter()
                                .filter_map(|(t, d)| {
                                    let d = d.as_f64().filter(|d| d.is_finite() && *d >= 0.0)?;
                                    // (A sanity bound only: byte demand is in
                                    // bytes per second.)
                                    Some((t.clone(), d.min(1e18)))
                                })
                                .collect()
                        });
                    (id, answer.is_some(), incarnation, demand)
                }
            });
        let mut results = futures::future::join_all(probes).await;
        let mut since = self
            .inner
            .unreachable_since
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let mut incarnations = self
            .inner
            .incarnations
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        for (id, _, inc, _) in &results {
            if let Some(inc) = inc {
                incarnations.insert(id.clone(), inc.clone());
            }
        }
        drop(incarnations);
        let mut demand = self
            .inner
            .peer_demand
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        // A peer that does not answer keeps what it said last until that is too old
        // (`peer_demand`); one that left the catalog is forgotten.
        demand.retain(|id, _| records.iter().any(|r| r.id == *id));
        for (id, _, _, d) in results.iter_mut() {
            if let Some(d) = d.take() {
                demand.insert(id.clone(), (Instant::now(), d));
            }
        }
        drop(demand);
        for (id, ok, _, _) in results {
            if ok {
                since.remove(&id);
            } else {
                since.entry(id).or_insert_with(Instant::now);
            }
        }
    }

    fn judge(&self, records: Vec<NodeRecord>, now: i64) -> Vec<NodeView> {
        let since = self
            .inner
            .unreachable_since
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let probing = self.inner.cfg.secret.is_some();
        records
            .into_iter()
            .map(|record| {
                let is_self = record.id == *self.me();
                let age = (now - record.heartbeat_at).max(0);
                let unreachable = (probing && !is_self && !record.rpc_addr.is_empty()).then(|| {
                    since
                        .get(&record.id)
                        .map(|t| t.elapsed())
                        .unwrap_or_default()
                });
                let state = if is_self {
                    NodeState::Alive
                } else {
                    membership::judge(
                        self.inner.cfg.thresholds,
                        Duration::from_millis(age as u64),
                        unreachable,
                    )
                };
                NodeView {
                    record,
                    state,
                    heartbeat_age_ms: age,
                    unreachable_ms: unreachable.map(|d| d.as_millis() as u64),
                    is_self,
                }
            })
            .collect()
    }

    fn publish_view(&self, view: &[NodeView]) {
        self.inner.metrics.cluster_view_at.set(
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs() as i64),
        );
        let m = &self.inner.metrics;
        for state in [NodeState::Alive, NodeState::Suspected, NodeState::Failed] {
            let n = view.iter().filter(|v| v.state == state).count();
            m.cluster_nodes
                .get_or_create(&crate::telemetry::NodeStateLabels {
                    state: state.as_str(),
                })
                .set(n as i64);
        }
    }

    /// Loads the newest layout; if this node is the coordinator and the members changed,
    /// stores the next version first.
    async fn maintain_layout(&self, view: &[NodeView], coordinator: bool) -> anyhow::Result<()> {
        let cfg = &self.inner.cfg;
        let mut current = self.load_layout().await?;
        if coordinator {
            // Suspected nodes keep their place: only failure (agreed through the
            // catalog) moves partitions, so a slow node does not cause churn.
            let mut members: Vec<Member> = view
                .iter()
                .filter(|v| v.state != NodeState::Failed)
                .map(|v| Member {
                    id: v.record.id.clone(),
                    zone: v.record.zone.clone(),
                    capacity: v.record.capacity.max(1),
                })
                .collect();
            members.sort_by(|a, b| a.id.cmp(&b.id));
            // The layout is a function of these inputs: the same ones, the same layout.
            let unchanged = current.as_ref().is_some_and(|c| {
                c.members == members
                    && c.factor == cfg.replication_factor
                    && c.partitions == cfg.partitions
            });
            if !unchanged {
                let version = current.as_ref().map_or(1, |l| l.version + 1);
                let desired =
                    Layout::compute(version, cfg.partitions, cfg.replication_factor, &members);
                let stored = StoredLayout {
                    version,
                    body: serde_json::to_string(&desired)?,
                };
                if self
                    .inner
                    .catalog
                    .insert_layout(&stored, cfg.partitions)
                    .await?
                {
                    tracing::info!(
                        version,
                        members = desired.members.len(),
                        under_replicated = desired.under_replicated(),
                        "stored a new partition layout"
                    );
                }
                current = self.load_layout().await?;
            }
        }
        if let Some(l) = current {
            let m = &self.inner.metrics;
            m.layout_version.set(l.version as i64);
            m.under_replicated.set(l.under_replicated() as i64);
            self.inner.layout.send_if_modified(|old| {
                if old.as_ref().map(|o| o.version) == Some(l.version) {
                    return false;
                }
                tracing::info!(version = l.version, "now using partition layout");
                *old = Some(l);
                true
            });
        }
        Ok(())
    }

    async fn load_layout(&self) -> anyhow::Result<Option<Arc<Layout>>> {
        // The version first: the body is read only when it changed.
        let latest = self.inner.catalog.latest_layout_version().await?;
        if let Some(cached) = self.layout()
            && latest == Some(cached.version)
        {
            return Ok(Some(cached));
        }
        let Some(stored) = self.inner.catalog.latest_layout().await? else {
            return Ok(None);
        };
        let mut layout: Layout = serde_json::from_str(&stored.body)
            .map_err(|e| anyhow::anyhow!("layout version {} is corrupt: {e}", stored.version))?;
        let members = layout.members.len();
        if layout.partitions != self.inner.cfg.partitions
            || layout.replicas.len() != layout.partitions as usize
            || layout
                .replicas
                .iter()
                .flatten()
                .any(|&i| i as usize >= members)
        {
            anyhow::bail!(
                "layout version {} does not fit this cluster ({} partitions); is the catalog \
                 shared with another cluster?",
                stored.version,
                self.inner.cfg.partitions
            );
        }
        layout.version = stored.version;
        Ok(Some(Arc::new(layout)))
    }
}

/// An HTTP client for peers' RPC ports: addressed directly (never through an environment
/// proxy, which would see the cluster secret and clients' signatures), never redirected,
/// connecting within `connect`; `more` adds settings. Building fails only if a TLS
/// backend cannot start, which plain HTTP never needs.
pub(crate) fn peer_client(
    connect: Duration,
    more: impl FnOnce(reqwest::ClientBuilder) -> reqwest::ClientBuilder,
) -> reqwest::Client {
    more(
        reqwest::Client::builder()
            .connect_timeout(connect)
            .tcp_nodelay(true)
            .no_proxy()
            .redirect(reqwest::redirect::Policy::none()),
    )
    .build()
    .expect("an HTTP client without TLS always builds")
}

/// Logs every change of a member's state, with the evidence for it.
fn log_transitions(before: &[NodeView], after: &[NodeView]) {
    for n in after {
        let old = before
            .iter()
            .find(|b| b.record.id == n.record.id)
            .map(|b| b.state);
        if old == Some(n.state) || (old.is_none() && n.state == NodeState::Alive) {
            continue;
        }
        let (node, zone) = (&n.record.id.0, &n.record.zone);
        let (age, unreachable) = (n.heartbeat_age_ms, n.unreachable_ms.unwrap_or(0));
        match n.state {
            NodeState::Alive => tracing::info!(node, zone, "peer is alive"),
            NodeState::Suspected => tracing::warn!(
                node,
                zone,
                heartbeat_age_ms = age,
                unreachable_ms = unreachable,
                "peer suspected: no recent heartbeat or its RPC port does not answer"
            ),
            NodeState::Failed => tracing::warn!(
                node,
                zone,
                heartbeat_age_ms = age,
                "peer failed: no heartbeat in the catalog for longer than fail_after; it leaves the next layout"
            ),
        }
    }
}

/// Wakes the cluster loop whenever a layout is announced on Postgres, so a new version
/// is used within milliseconds rather than at the next poll. Reconnects on error; the
/// poll keeps working meanwhile.
async fn listen_for_layouts(cluster: Cluster, url: String, mut shutdown: watch::Receiver<bool>) {
    loop {
        tokio::select! {
            r = listen_session(&cluster, &url) => {
                let Err(e) = r;
                tracing::debug!(error = %e, "layout listener lost its connection; reconnecting");
            }
            _ = shutdown.wait_for(|v| *v) => return,
        }
        tokio::select! {
            _ = tokio::time::sleep(cluster.inner.cfg.interval) => {}
            _ = shutdown.wait_for(|v| *v) => return,
        }
    }
}

async fn listen_session(
    cluster: &Cluster,
    url: &str,
) -> Result<std::convert::Infallible, sqlx::Error> {
    let mut l = sqlx::postgres::PgListener::connect(url).await?;
    l.listen(crate::catalog::LAYOUT_CHANNEL).await?;
    loop {
        l.recv().await?;
        cluster.inner.wake.notify_one();
    }
}
