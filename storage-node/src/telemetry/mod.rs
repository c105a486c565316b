//! Traces, metrics and request accounting shared by every front end.
//!
//! - One `tracing` span per request (`front`, `operation`, `tenant`, `bucket`,
//!   `status`, `bytes`), exported over OTLP (HTTP/protobuf) when
//!   `OTEL_EXPORTER_OTLP_ENDPOINT` is set.
//! - Prometheus metrics: request counts and latency histograms by front end,
//!   operation and status, served on the admin listener at `/metrics`.

use std::sync::{Arc, Mutex};
use std::time::Instant;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

/// Filled in by a handler with its operation name, read back by the HTTP layer.
#[derive(Clone, Default)]
pub struct OpSlot(Arc<Mutex<&'static str>>);

impl OpSlot {
    pub fn set(&self, op: &'static str) {
        if let Ok(mut g) = self.0.lock() {
            *g = op;
        }
    }

    pub fn get(&self) -> &'static str {
        self.0.lock().map(|g| *g).unwrap_or("unknown")
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    pub front: &'static str,
    pub operation: &'static str,
    pub status: u16,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct NodeStateLabels {
    pub state: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TierLabels {
    pub tier: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ForwardLabels {
    pub front: &'static str,
    pub outcome: &'static str,
}

pub struct Metrics {
    pub registry: Mutex<Registry>,
    pub requests: Family<RequestLabels, Counter>,
    pub latency: Family<RequestLabels, Histogram>,
    /// Startup orphan sweeps that deleted nothing because a record could not be read.
    pub orphan_sweep_aborted: Counter,
    /// Cluster members by state, as this node judges them.
    pub cluster_nodes: Family<NodeStateLabels, Gauge>,
    pub layout_version: Gauge,
    pub under_replicated: Gauge,
    /// Partitions this node is the acting primary of.
    pub partitions_led: Gauge,
    /// Partitions this node reinstalled from its primary's snapshot (its log was behind
    /// what the primary keeps, or diverged).
    pub replica_resyncs: Counter,
    pub primary_handoffs: Counter,
    /// Chunk files that reached a replica while their upload still ran, and were not
    /// sent again with their entry.
    pub chunks_sent_ahead: Counter,
    /// Shipments this node refused because a chunk file an entry references had not
    /// arrived (the primary sends it again).
    pub missing_chunk_refusals: Counter,
    /// Copies of partitions this node dropped after the layout moved them elsewhere.
    pub retired_copies: Counter,
    /// Requests sent on to the partition's primary, by front end and outcome.
    pub forwarded: Family<ForwardLabels, Counter>,
    /// When this node last judged its peers (Unix seconds): a stale value means the
    /// cluster view (catalog or peers) is not being refreshed.
    pub cluster_view_at: Gauge,
    /// Objects and bytes the mover put in the cold tier.
    pub cold_moved_objects: Counter,
    pub cold_moved_bytes: Counter,
    /// Objects and bytes restore on read brought back from the cold tier.
    pub cold_restored_objects: Counter,
    pub cold_restored_bytes: Counter,
    /// Objects restore on read could not bring back (they stay cold).
    pub cold_restore_failures: Counter,
    /// Cold copies no record named, deleted by the sweep.
    pub cold_orphans_deleted: Counter,
    /// 1 while the last call to the cold tier succeeded (0 also without a cold tier).
    pub cold_tier_reachable: Gauge,
    /// Objects the mover could not move (they stay hot; retried next pass).
    pub cold_move_failures: Counter,
    /// Bytes of the data this node holds (every copy it keeps, primary or replica), by
    /// tier; set from the usage counters every 5 s by the node's housekeeping
    /// ([`Metrics::set_stored`]).
    pub stored_bytes: Family<TierLabels, Gauge>,
}

impl Default for Metrics {
    fn default() -> Self {
        let requests = Family::<RequestLabels, Counter>::default();
        let latency = Family::<RequestLabels, Histogram>::new_with_constructor(|| {
            Histogram::new(exponential_buckets(0.0005, 2.0, 16))
        });
        let mut registry = Registry::with_prefix("granary");
        registry.register(
            "requests",
            "Requests handled, by front end, operation and status",
            requests.clone(),
        );
        registry.register(
            "request_duration_seconds",
            "Request latency until the response head, by front end, operation and status",
            latency.clone(),
        );
        let orphan_sweep_aborted = Counter::default();
        registry.register(
            "orphan_sweep_aborted",
            "Startup orphan sweeps that removed nothing because a metadata record could not \
             be read (corrupt, or written by a newer format); see the node log",
            orphan_sweep_aborted.clone(),
        );
        let cluster_nodes = Family::<NodeStateLabels, Gauge>::default();
        registry.register(
            "cluster_nodes",
            "Cluster members by state (alive, suspected, failed) as this node judges them",
            cluster_nodes.clone(),
        );
        let layout_version = Gauge::default();
        registry.register(
            "cluster_layout_version",
            "Version of the partition layout this node uses",
            layout_version.clone(),
        );
        let under_replicated = Gauge::default();
        registry.register(
            "cluster_under_replicated_partitions",
            "Partitions whose replica set in the current layout is smaller than the replication factor",
            under_replicated.clone(),
        );
        let partitions_led = Gauge::default();
        registry.register(
            "cluster_partitions_led",
            "Partitions this node is the acting primary of",
            partitions_led.clone(),
        );
        let replica_resyncs = Counter::default();
        registry.register(
            "replica_resyncs",
            "Partitions this node reinstalled from its primary's snapshot because its log was \
             behind what the primary keeps, or diverged",
            replica_resyncs.clone(),
        );
        let primary_handoffs = Counter::default();
        registry.register(
            "primary_handoffs",
            "Partitions this node handed to the layout's preferred primary (a node that \
             joined, or returned and caught up)",
            primary_handoffs.clone(),
        );
        let chunks_sent_ahead = Counter::default();
        registry.register(
            "replication_chunks_sent_ahead",
            "Chunk files this node (as primary) sent to a replica while their upload still \
             ran, so they were not sent again with the log entry that references them",
            chunks_sent_ahead.clone(),
        );
        let missing_chunk_refusals = Counter::default();
        registry.register(
            "replication_missing_chunk_refusals",
            "Shipments this node (as replica) refused because a chunk file an entry \
             references had not arrived; the primary sends it again",
            missing_chunk_refusals.clone(),
        );
        let retired_copies = Counter::default();
        registry.register(
            "replication_retired_copies",
            "Copies of partitions this node dropped (records, log and chunk files) once the \
             layout had moved them to other nodes and those were all in sync",
            retired_copies.clone(),
        );
        let forwarded = Family::<ForwardLabels, Counter>::default();
        registry.register(
            "forwarded_requests",
            "Requests this node sent on to their partition's primary, by front end and outcome \
             (ok: the primary answered; unreachable: it could not be reached; failed: it \
             failed after it may have acted; busy: not sent, max_forwards_per_peer in flight)",
            forwarded.clone(),
        );
        let cluster_view_at = Gauge::default();
        registry.register(
            "cluster_view_timestamp_seconds",
            "When this node last refreshed its view of the cluster's members",
            cluster_view_at.clone(),
        );
        let cold_moved_objects = Counter::default();
        registry.register(
            "cold_moved_objects",
            "Objects whose data the mover moved to the cold tier",
            cold_moved_objects.clone(),
        );
        let cold_moved_bytes = Counter::default();
        registry.register(
            "cold_moved_bytes",
            "Bytes of object data the mover moved to the cold tier",
            cold_moved_bytes.clone(),
        );
        let cold_restored_objects = Counter::default();
        registry.register(
            "cold_restored_objects",
            "Cold objects read often enough (the tenant's restoreAfterReads) that the mover \
             brought their data back to the hot tier",
            cold_restored_objects.clone(),
        );
        let cold_restored_bytes = Counter::default();
        registry.register(
            "cold_restored_bytes",
            "Bytes of object data restore on read read back from the cold tier (including \
             copies made for objects that changed meanwhile)",
            cold_restored_bytes.clone(),
        );
        let cold_restore_failures = Counter::default();
        registry.register(
            "cold_restore_failures",
            "Objects restore on read could not bring back to the hot tier (their cold copy \
             failed to read or verify, or the local write failed); they stay cold",
            cold_restore_failures.clone(),
        );
        let cold_orphans_deleted = Counter::default();
        registry.register(
            "cold_orphans_deleted",
            "Cold copies no object named (left by an interrupted move or delete), deleted by \
             the sweep",
            cold_orphans_deleted.clone(),
        );
        let cold_tier_reachable = Gauge::default();
        registry.register(
            "cold_tier_reachable",
            "1 while the last call to the cold tier succeeded; 0 when it failed or there is \
             no cold tier",
            cold_tier_reachable.clone(),
        );
        let cold_move_failures = Counter::default();
        registry.register(
            "cold_move_failures",
            "Objects the mover could not move to the cold tier (their local data failed to \
             read or the store refused them); they stay hot and are tried again",
            cold_move_failures.clone(),
        );
        let stored_bytes = Family::<TierLabels, Gauge>::default();
        registry.register(
            "stored_bytes",
            "Bytes of object, multipart part and KV data this node keeps (its primary and \
             replica copies), by tier: hot on its disks, cold in the cold tier (objects only)",
            stored_bytes.clone(),
        );
        Self {
            registry: Mutex::new(registry),
            requests,
            latency,
            orphan_sweep_aborted,
            cluster_nodes,
            layout_version,
            under_replicated,
            partitions_led,
            replica_resyncs,
            primary_handoffs,
            chunks_sent_ahead,
            missing_chunk_refusals,
            retired_copies,
            forwarded,
            cluster_view_at,
            cold_moved_objects,
            cold_moved_bytes,
            cold_restored_objects,
            cold_restored_bytes,
            cold_restore_failures,
            cold_orphans_deleted,
            cold_tier_reachable,
            cold_move_failures,
            stored_bytes,
        }
    }
}

impl Metrics {
    pub fn observe(
        &self,
        front: &'static str,
        operation: &'static str,
        status: u16,
        started: Instant,
    ) {
        let l = RequestLabels {
            front,
            operation,
            status,
        };
        self.requests.get_or_create(&l).inc();
        self.latency
            .get_or_create(&l)
            .observe(started.elapsed().as_secs_f64());
    }

    /// Sets the stored-bytes gauges from this node's usage counters.
    pub fn set_stored(&self, c: &crate::engine::usage::Counters) {
        let gauge = |v: u64| i64::try_from(v).unwrap_or(i64::MAX);
        self.stored_bytes
            .get_or_create(&TierLabels { tier: "hot" })
            .set(gauge(c.hot_bytes()));
        self.stored_bytes
            .get_or_create(&TierLabels { tier: "cold" })
            .set(gauge(c.cold_bytes));
    }

    pub fn render(&self) -> String {
        let mut out = String::new();
        if let Ok(r) = self.registry.lock() {
            let _ = prometheus_client::encoding::text::encode(&mut out, &r);
        }
        out
    }
}

pub use granary_telemetry::TelemetryGuard;

/// Logs to stderr (`RUST_LOG`) and, when `OTEL_EXPORTER_OTLP_ENDPOINT` is set, traces
/// over OTLP; the request spans of this crate are always kept for traces.
pub fn init(service: &'static str) -> TelemetryGuard {
    granary_telemetry::init(service, "info,s3s=warn,sqlx=warn", &["granary_node"])
}
