//! Per-tenant rate limits: the Tenant's QoS `requestsPerSecond` and
//! `bandwidthBytesPerSecond` (bytes read and written), as token buckets.
//!
//! - Each bucket refills at its rate and holds at most one second of it, so over any
//!   window of T seconds a tenant is admitted at most `rate x (T + 1)`.
//! - A request is admitted while its tenant has a request token and a non-negative
//!   byte balance; its declared body bytes (and, for reads, the bytes it answers with)
//!   are then taken, so one large transfer may take the balance below zero and the
//!   next requests wait until it is paid back: the long-run rate holds.
//! - A refused request gets S3 `SlowDown` (KV: `SlowDown`) with `Retry-After`, the
//!   seconds until a token is there again, and consumes nothing.
//! - On a cluster the nodes share a tenant's `requestsPerSecond` by demand. Every
//!   heartbeat interval (1 s) each node counts the requests the tenant tried on it
//!   (admitted or refused), caps that rate at the limit (refused requests cannot buy a
//!   larger share) and smooths it (`d = d / 2 + rate / 2`); its probe answers
//!   (`/rpc/v1/ping`) carry the result to the peers. A node admits
//!   `limit x (d + e) / (D + N e)`: `d` its own demand, `D` the cluster's, `N` the nodes
//!   that serve, `e = D / 50N` (a floor, so a node that starts seeing the tenant is not
//!   starved; with no demand anywhere each node admits `limit / N`). A peer whose demand
//!   is unknown (no answer for three intervals, no cluster secret, or a version that
//!   does not send it) is assumed to have this node's. The shares add up to the limit:
//!   a tenant whose requests all reach one node (one bucket: its partition's primary)
//!   gets about 98% of it there, and one spread over the nodes gets it in aggregate.
//!   When the tenant's traffic moves between nodes the shares follow within a few
//!   intervals, during which the aggregate can be above or below the limit; a model of
//!   the scheme with a tenant alternating floods and lulls on every node, out of phase,
//!   stays within 1.02x of the limit on average.
//! - `bandwidthBytesPerSecond` is shared the same way, by its own demand: the body bytes
//!   tried on a node per second (declared bodies, admitted or refused, and the bytes
//!   reads answered with), capped at the limit and smoothed alike. So a tenant whose
//!   transfers all reach one node gets about 98% of its bandwidth there, not `1/N`.
//!   Peers from before this (their answers carry no byte demand) count as having none.
//! - `maxConcurrentRequests` is shared by its own demand: the slots a tenant asked for on
//!   a node, by Little's law the time-averaged number of its requests in flight there
//!   scaled by how many it tried per one admitted (`in flight x tried / admitted`: a
//!   node that refuses half of the tenant's requests for want of slots sees twice the
//!   concurrency it could hold), capped at the cap and smoothed alike. A node holds at
//!   most `ceil(cap x (d + e) / (D + N e))` slots, and no more than the cap less the
//!   slots its peers said they hold (each interval, with their demand), at least one.
//!   So a tenant whose requests all reach one node gets its whole cap there (on three
//!   nodes up to a cap of 76; 99 of 100), and slots already held elsewhere (long
//!   downloads) are never granted twice: once the nodes have heard each other (within
//!   about three intervals: a peer counts, its answer is fetched, this node applies it)
//!   the slots held on all nodes together are at most `cap + N - 1` (one per node when
//!   the peers hold the whole cap). Within those intervals requests admitted at once on
//!   several nodes can add to that. With no
//!   demand known anywhere each node holds `ceil(cap / N)`, as before. A node whose
//!   tenant is refused on its floor of one slot sees the demand at the next interval.
//!   Peers from before this (their answers carry no concurrency demand and no held
//!   count) count as having none: during a rolling upgrade an upgraded node can take
//!   nearly the whole cap while each older node still allows `ceil(cap / N)`.
//! - A Tenant's QoS is read from the catalog at most every [`SPEC_TTL`]: a changed limit
//!   takes effect within that time. A catalog that cannot be read admits (limits are
//!   not a security boundary; quotas and authentication are).

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;

use crate::catalog::Catalog;
use crate::types::TenantId;

/// Per-tenant series: bounded by the number of tenants (never per key or bucket).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TenantLabels {
    pub tenant: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ThrottleLabels {
    pub tenant: String,
    pub limit: &'static str,
}

/// The tenant series this node keeps (registered with the node's metrics).
#[derive(Clone, Default)]
pub struct TenantMetrics {
    /// Requests admitted (signature verified), per tenant.
    pub requests: Family<TenantLabels, Counter>,
    /// Body bytes written and answered, per tenant.
    pub bytes: Family<TenantLabels, Counter>,
    /// Requests refused for a rate limit, per tenant and limit.
    pub throttled: Family<ThrottleLabels, Counter>,
}

/// How long a Tenant's QoS is used before it is read again.
pub const SPEC_TTL: Duration = Duration::from_secs(5);

/// A tenant's demand on one node (module docs): requests and body bytes per second
/// tried there, and the concurrent requests it asked for, each capped at its limit and
/// smoothed.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Demand {
    pub requests: f64,
    pub bytes: f64,
    pub concurrency: f64,
    /// The tenant's requests holding a slot there when the demand was counted.
    pub held: f64,
}

/// The suffixes of a tenant's byte and concurrency demand, and of its held requests, in
/// the demand a node tells its peers (requests go under the bare tenant id). Older
/// nodes cannot parse these keys as tenant ids, so they skip them.
const BYTES_KEY: &str = "/bytes";
const CONCURRENCY_KEY: &str = "/concurrency";
const HELD_KEY: &str = "/held";

impl Demand {
    /// This node's demand as its probe answers carry it: one number per tenant and
    /// measure, zeros left out (absent is zero).
    pub fn to_wire(demand: HashMap<TenantId, Demand>) -> impl Iterator<Item = (String, f64)> {
        demand
            .into_iter()
            .flat_map(|(t, d)| {
                [
                    (t.to_string(), d.requests),
                    (format!("{t}{BYTES_KEY}"), d.bytes),
                    (format!("{t}{CONCURRENCY_KEY}"), d.concurrency),
                    (format!("{t}{HELD_KEY}"), d.held),
                ]
            })
            .filter(|(_, v)| *v > 0.0)
    }

    /// The peers' demand from their answers (summed over the peers), per tenant; keys
    /// this version does not know are skipped.
    pub fn from_wire(wire: impl IntoIterator<Item = (String, f64)>) -> HashMap<TenantId, Demand> {
        let mut demand: HashMap<TenantId, Demand> = HashMap::new();
        for (key, d) in wire {
            let (id, field): (&str, fn(&mut Demand) -> &mut f64) =
                if let Some(id) = key.strip_suffix(BYTES_KEY) {
                    (id, |e| &mut e.bytes)
                } else if let Some(id) = key.strip_suffix(CONCURRENCY_KEY) {
                    (id, |e| &mut e.concurrency)
                } else if let Some(id) = key.strip_suffix(HELD_KEY) {
                    (id, |e| &mut e.held)
                } else {
                    (key.as_str(), |e| &mut e.requests)
                };
            let Ok(t) = id.parse() else { continue };
            *field(demand.entry(t).or_default()) += d;
        }
        demand
    }
}

/// A refused request: retry after this long.
#[derive(Debug)]
pub struct Throttled {
    pub retry_after: Duration,
    /// Which limit: `requests`, `bytes` or `concurrency`.
    pub limit: &'static str,
}

impl std::fmt::Display for Throttled {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "the tenant's {} rate limit is reached; retry after {} s",
            self.limit,
            self.retry_after_secs()
        )
    }
}

impl Throttled {
    /// `Retry-After` in whole seconds (at least 1).
    pub fn retry_after_secs(&self) -> u64 {
        self.retry_after.as_secs_f64().ceil().max(1.0) as u64
    }
}

#[derive(Clone)]
pub struct RateLimits {
    catalog: Arc<dyn Catalog>,
    tenants: Arc<std::sync::Mutex<HashMap<TenantId, Limiter>>>,
    /// The nodes that serve.
    nodes: Arc<AtomicU32>,
    /// Each limited tenant's demand on the other nodes, summed over those whose demand
    /// is known, and how many those are.
    peer_demand: Arc<std::sync::Mutex<(HashMap<TenantId, Demand>, u32)>>,
    /// Requests in flight per tenant (those with a concurrency cap).
    inflight: Counts,
    pub metrics: TenantMetrics,
}

type Counts = Arc<std::sync::Mutex<HashMap<TenantId, Slots>>>;

/// A capped tenant's concurrent requests on this node, and what measures its demand for
/// them since the last [`RateLimits::roll_demand`].
#[derive(Debug, Default)]
struct Slots {
    /// Requests holding a slot now.
    held: u32,
    /// Slot-seconds held, counted up to `at`.
    held_secs: f64,
    at: Option<Instant>,
    /// Requests that asked for a slot, and those refused one.
    asked: u64,
    refused: u64,
}

impl Slots {
    /// Counts the slots held until `now`.
    fn advance(&mut self, now: Instant) {
        if let Some(at) = self.at {
            self.held_secs +=
                f64::from(self.held) * now.saturating_duration_since(at).as_secs_f64();
        }
        self.at = Some(now);
    }

    /// The concurrency asked for over the `secs` just ended (module docs), and a fresh
    /// count.
    fn roll(&mut self, now: Instant, secs: f64) -> f64 {
        self.advance(now);
        let admitted = self.asked.saturating_sub(self.refused).max(1);
        let scale = if self.asked == 0 {
            1.0
        } else {
            self.asked as f64 / admitted as f64
        };
        let asked = self.held_secs / secs * scale;
        self.held_secs = 0.0;
        self.asked = 0;
        self.refused = 0;
        asked
    }
}

/// Where a request's [`InFlight`] waits until its response is done: the S3 front puts
/// one in the request, the operation fills it, the front ties it to the response body.
#[derive(Clone, Default)]
pub struct HoldSlot(Arc<std::sync::Mutex<Option<InFlight>>>);

impl HoldSlot {
    /// Keeps `held` if it holds a slot (an unheld one has nothing to give back).
    pub fn put(&self, held: InFlight) {
        if !held.is_held() {
            return;
        }
        *self
            .0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(held);
    }

    pub fn take(&self) -> Option<InFlight> {
        self.0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .take()
    }
}

/// One of a tenant's concurrent requests, given back when dropped.
#[must_use]
pub struct InFlight(Option<(TenantId, Counts)>);

impl InFlight {
    /// Whether this holds one of a capped tenant's slots (else there is nothing to
    /// give back).
    pub fn is_held(&self) -> bool {
        self.0.is_some()
    }
}

/// A response body that holds its request's [`InFlight`] until the body has ended (or
/// is dropped, when the client goes away).
pub struct Held<B> {
    inner: std::pin::Pin<Box<B>>,
    held: Option<InFlight>,
}

impl<B> Held<B> {
    pub fn new(inner: B, held: InFlight) -> Self {
        Self {
            inner: Box::pin(inner),
            held: Some(held),
        }
    }
}

impl<B: http_body::Body> http_body::Body for Held<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<Self::Data>, Self::Error>>> {
        let r = self.inner.as_mut().poll_frame(cx);
        if matches!(r, std::task::Poll::Ready(None)) || self.inner.is_end_stream() {
            self.held = None;
        }
        r
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

impl std::fmt::Debug for InFlight {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("InFlight")
            .field(&self.0.as_ref().map(|(t, _)| t))
            .finish()
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        if let Some((t, counts)) = self.0.take() {
            let mut counts = counts
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            if let Some(n) = counts.get_mut(&t) {
                n.advance(Instant::now());
                n.held = n.held.saturating_sub(1);
            }
        }
    }
}

type Limits = (Option<u64>, Option<u64>, Option<u32>);

struct Limiter {
    /// The tenant's name, for its metrics.
    name: String,
    /// (requests/s, bytes/s, concurrent requests) as last read, and when.
    limits: Limits,
    read_at: Instant,
    requests: Bucket,
    bytes: Bucket,
    /// Requests tried here (admitted or refused) since `counted_from`, and their body
    /// bytes (declared, and answered by reads).
    tried: u64,
    tried_bytes: u64,
    counted_from: Instant,
    /// Requests per second tried here, capped at the limit and smoothed (module docs).
    demand: f64,
    /// Bytes per second tried here, capped at the bandwidth limit and smoothed.
    byte_demand: f64,
    /// Concurrent requests asked for here, capped at the cap and smoothed.
    slot_demand: f64,
}

struct Bucket {
    tokens: f64,
    at: Instant,
}

impl Bucket {
    fn full(rate: Option<f64>) -> Self {
        Bucket {
            tokens: rate.map_or(0.0, burst),
            at: Instant::now(),
        }
    }

    /// Refills at `rate` per second, up to one second's worth (at least one token, so
    /// that a node's share below 1/s still admits a request now and then).
    fn refill(&mut self, rate: f64, now: Instant) {
        let dt = now.saturating_duration_since(self.at).as_secs_f64();
        self.tokens = (self.tokens + rate * dt).min(burst(rate));
        self.at = now;
    }
}

/// The most body bytes one request is counted for (the largest S3 object): a declared
/// length beyond it is a lie that must not block the tenant for ages or buy demand.
const MAX_BODY: u64 = 5 << 40;

fn burst(rate: f64) -> f64 {
    rate.max(1.0)
}

/// How long until `missing` tokens come back at `rate` (a minute if never).
fn wait(missing: f64, rate: f64) -> Duration {
    Duration::try_from_secs_f64(missing / rate).unwrap_or(Duration::from_secs(60))
}

impl RateLimits {
    pub fn new(catalog: Arc<dyn Catalog>) -> Self {
        Self {
            catalog,
            tenants: Arc::default(),
            nodes: Arc::new(AtomicU32::new(1)),
            peer_demand: Arc::default(),
            inflight: Arc::default(),
            metrics: TenantMetrics::default(),
        }
    }

    /// Sets the number of nodes sharing each tenant's limits.
    pub fn set_nodes(&self, n: u32) {
        self.nodes.store(n.max(1), Ordering::Relaxed);
    }

    /// Ends this node's count of tried requests and bytes: each limited tenant's demand
    /// (module docs), for those with any, to tell the peers.
    pub fn roll_demand(&self) -> HashMap<TenantId, Demand> {
        let now = Instant::now();
        let mut out = HashMap::new();
        // Capped at the limit, smoothed; a trace is none.
        let smooth = |d: f64, rate: f64, cap: Option<u64>| {
            let d = d / 2.0 + rate.min(cap.map_or(0.0, |r| r as f64)) / 2.0;
            if d < 0.01 { 0.0 } else { d }
        };
        let mut tenants = self.lock();
        let mut slots = self
            .inflight
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        for (t, l) in tenants.iter_mut() {
            let secs = now.duration_since(l.counted_from).as_secs_f64().max(0.001);
            l.demand = smooth(l.demand, l.tried as f64 / secs, l.limits.0);
            l.byte_demand = smooth(l.byte_demand, l.tried_bytes as f64 / secs, l.limits.1);
            let (asked, held) = slots
                .get_mut(t)
                .map_or((0.0, 0), |n| (n.roll(now, secs), n.held));
            l.slot_demand = smooth(l.slot_demand, asked, l.limits.2.map(u64::from));
            l.tried = 0;
            l.tried_bytes = 0;
            l.counted_from = now;
            if l.demand > 0.0 || l.byte_demand > 0.0 || l.slot_demand > 0.0 || held > 0 {
                out.insert(
                    *t,
                    Demand {
                        requests: l.demand,
                        bytes: l.byte_demand,
                        concurrency: l.slot_demand,
                        held: f64::from(held),
                    },
                );
            }
        }
        // Tenants with nothing in flight start afresh (and are forgotten).
        slots.retain(|_, n| n.held > 0);
        out
    }

    /// The demand on the other nodes whose demand is known (`known` of them), summed
    /// per tenant.
    pub fn set_peer_demand(&self, demand: HashMap<TenantId, Demand>, known: u32) {
        *self
            .peer_demand
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = (demand, known);
    }

    fn nodes(&self) -> f64 {
        f64::from(self.nodes.load(Ordering::Relaxed).max(1))
    }

    /// `limit / N`.
    fn even_share(&self, limit: Option<u64>) -> Option<f64> {
        limit.map(|l| l as f64 / self.nodes())
    }

    /// This node's share of a tenant's `limit` by demand (module docs): `mine` its own,
    /// `others` the peers' (the unknown ones assumed to have `mine`).
    fn share(&self, limit: Option<u64>, mine: f64, others: f64) -> Option<f64> {
        let n = self.nodes();
        let total = mine + others;
        if !total.is_finite() {
            return self.even_share(limit);
        }
        let floor = (total / (50.0 * n)).max(1e-9);
        limit.map(|l| l as f64 * (mine + floor) / (total + n * floor))
    }

    /// The peers' demand for `tenant`, each peer whose demand is unknown counted as
    /// having `mine`.
    fn others(&self, tenant: TenantId, mine: Demand) -> Demand {
        let peers = self.nodes.load(Ordering::Relaxed).max(1) - 1;
        let g = self
            .peer_demand
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let unknown = f64::from(peers.saturating_sub(g.1));
        let known = g.0.get(&tenant).copied().unwrap_or_default();
        Demand {
            requests: known.requests + unknown * mine.requests,
            bytes: known.bytes + unknown * mine.bytes,
            concurrency: known.concurrency + unknown * mine.concurrency,
            // Only what is known: a peer that does not tell is bounded by its share.
            held: known.held,
        }
    }

    /// This node's demand for `tenant`.
    fn mine(&self, tenant: TenantId) -> Demand {
        self.lock()
            .get(&tenant)
            .map_or_else(Demand::default, |l| Demand {
                requests: l.demand,
                bytes: l.byte_demand,
                concurrency: l.slot_demand,
                held: 0.0,
            })
    }

    async fn limits(&self, tenant: TenantId) -> Limits {
        if let Some(l) = self
            .lock()
            .get(&tenant)
            .filter(|l| l.read_at.elapsed() < SPEC_TTL)
        {
            return l.limits;
        }
        let (read, name) = match self.catalog.tenant_by_id(tenant).await {
            Ok(Some(t)) => (
                (
                    t.spec.qos.requests_per_second,
                    t.spec.qos.bandwidth_bytes_per_second,
                    t.spec.qos.max_concurrent_requests,
                ),
                t.name,
            ),
            Ok(None) => ((None, None, None), tenant.to_string()),
            Err(e) => {
                // Keep what was read last (or admit), and ask again after the interval
                // rather than on every request.
                tracing::warn!(error = %e, %tenant, "rate limits unreadable; keeping the last read");
                let mut tenants = self.lock();
                return match tenants.get_mut(&tenant) {
                    Some(l) => {
                        l.read_at = Instant::now();
                        l.limits
                    }
                    None => (None, None, None),
                };
            }
        };
        let now = Instant::now();
        let others = self.others(tenant, Demand::default());
        let mut tenants = self.lock();
        let l = tenants.entry(tenant).or_insert_with(|| Limiter {
            name: name.clone(),
            limits: read,
            read_at: now,
            requests: Bucket::full(self.share(read.0, 0.0, others.requests)),
            bytes: Bucket::full(self.share(read.1, 0.0, others.bytes)),
            tried: 0,
            tried_bytes: 0,
            counted_from: now,
            demand: 0.0,
            byte_demand: 0.0,
            slot_demand: 0.0,
        });
        l.limits = read;
        l.read_at = now;
        l.name = name;
        read
    }

    fn label(&self, tenant: TenantId) -> TenantLabels {
        TenantLabels {
            tenant: self
                .lock()
                .get(&tenant)
                .map_or_else(|| tenant.to_string(), |l| l.name.clone()),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<TenantId, Limiter>> {
        self.tenants
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Admits one request of `tenant` carrying `bytes` (its declared body), or answers
    /// how long to wait. A refused request takes nothing. The answer holds one of the
    /// tenant's concurrent requests until it is dropped (with the response).
    pub async fn admit(&self, tenant: TenantId, bytes: u64) -> Result<InFlight, Throttled> {
        let verdict = self.admit_inner(tenant, bytes).await;
        let l = self.label(tenant);
        match &verdict {
            Ok(_) => {
                self.metrics.requests.get_or_create(&l).inc();
                self.metrics.bytes.get_or_create(&l).inc_by(bytes);
            }
            Err(th) => {
                self.metrics
                    .throttled
                    .get_or_create(&ThrottleLabels {
                        tenant: l.tenant,
                        limit: th.limit,
                    })
                    .inc();
            }
        }
        verdict
    }

    async fn admit_inner(&self, tenant: TenantId, bytes: u64) -> Result<InFlight, Throttled> {
        let (rps, bps, concurrent) = self.limits(tenant).await;
        if (rps, bps, concurrent) == (None, None, None) {
            return Ok(InFlight(None));
        }
        // Read once for the concurrency share and the rate shares.
        let mine = self.mine(tenant);
        let others = self.others(tenant, mine);
        let held = self.enter(tenant, concurrent, mine, others)?;
        if rps.is_none() && bps.is_none() {
            return Ok(held);
        }
        // A limit of 0 blocks the tenant.
        for (limit, what) in [(rps, "requests"), (bps, "bytes")] {
            if limit == Some(0) {
                return Err(Throttled {
                    retry_after: Duration::from_secs(60),
                    limit: what,
                });
            }
        }
        let now = Instant::now();
        let mut tenants = self.lock();
        let Some(l) = tenants.get_mut(&tenant) else {
            return Ok(held);
        };
        // Counted as demand whatever the verdict (the nodes share the limit by it).
        let bytes = bytes.min(MAX_BODY);
        l.tried += 1;
        l.tried_bytes = l.tried_bytes.saturating_add(bytes);
        let (rps, bps) = (
            self.share(rps, l.demand, others.requests),
            self.share(bps, l.byte_demand, others.bytes),
        );
        if let Some(r) = rps {
            l.requests.refill(r, now);
            if l.requests.tokens < 1.0 {
                return Err(Throttled {
                    retry_after: wait(1.0 - l.requests.tokens, r),
                    limit: "requests",
                });
            }
        }
        if let Some(r) = bps {
            l.bytes.refill(r, now);
            if l.bytes.tokens < 0.0 {
                // Told at the even share at least: a node whose share is small only
                // because it has not seen the tenant's demand yet gets a larger one
                // within an interval or two.
                let at = r.max(self.even_share(l.limits.1).unwrap_or(0.0));
                return Err(Throttled {
                    retry_after: wait(-l.bytes.tokens, at),
                    limit: "bytes",
                });
            }
            l.bytes.tokens -= bytes as f64;
        }
        if rps.is_some() {
            l.requests.tokens -= 1.0;
        }
        Ok(held)
    }

    /// Takes one of the tenant's concurrent requests on this node (its share of
    /// `maxConcurrentRequests` by demand, module docs), or refuses.
    fn enter(
        &self,
        tenant: TenantId,
        cap: Option<u32>,
        mine: Demand,
        others: Demand,
    ) -> Result<InFlight, Throttled> {
        let Some(cap) = cap else {
            return Ok(InFlight(None));
        };
        if cap == 0 {
            // A cap of 0 blocks the tenant, as a rate of 0 does.
            return Err(Throttled {
                retry_after: Duration::from_secs(60),
                limit: "concurrency",
            });
        }
        let share = self.slots(cap, mine, others);
        let now = Instant::now();
        let mut counts = self
            .inflight
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let n = counts.entry(tenant).or_default();
        n.advance(now);
        n.asked += 1;
        if n.held >= share {
            n.refused += 1;
            return Err(Throttled {
                retry_after: Duration::from_secs(1),
                limit: "concurrency",
            });
        }
        n.held += 1;
        Ok(InFlight(Some((tenant, self.inflight.clone()))))
    }

    /// How many concurrent requests of `tenant` this node holds: its share of `cap` by
    /// demand, rounded up, and no more than the peers' held requests leave of the cap;
    /// at least one, at most the cap.
    fn slots(&self, cap: u32, mine: Demand, others: Demand) -> u32 {
        let share = self
            .share(Some(u64::from(cap)), mine.concurrency, others.concurrency)
            .unwrap_or(0.0);
        // (Less a trace, so that an even split of floating-point noise is not one more.)
        let slots = (share - 1e-6).ceil().min(f64::from(cap) - others.held);
        if slots.is_finite() {
            (slots.max(1.0) as u32).min(cap)
        } else {
            cap.div_ceil(self.nodes.load(Ordering::Relaxed).max(1))
        }
    }

    /// Takes `bytes` a request answers with (a read) from the tenant's byte balance,
    /// after the fact: it may go negative, which the next requests wait out.
    pub fn charge(&self, tenant: TenantId, bytes: u64) {
        let l = self.label(tenant);
        self.metrics.bytes.get_or_create(&l).inc_by(bytes);
        let bytes = bytes.min(MAX_BODY);
        if self
            .lock()
            .get(&tenant)
            .is_none_or(|l| l.limits.1.is_none())
        {
            return;
        }
        let mine = self.mine(tenant);
        let others = self.others(tenant, mine);
        let mut tenants = self.lock();
        if let Some(l) = tenants.get_mut(&tenant) {
            l.tried_bytes = l.tried_bytes.saturating_add(bytes);
            if let Some(r) = self.share(l.limits.1, l.byte_demand, others.bytes) {
                l.bytes.refill(r, Instant::now());
                l.bytes.tokens -= bytes as f64;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::catalog::{SqlCatalog, TenantSpec};

    async fn limited(rps: Option<u64>, bps: Option<u64>) -> (RateLimits, TenantId) {
        limited_with(rps, bps, None).await
    }

    async fn limited_with(
        rps: Option<u64>,
        bps: Option<u64>,
        concurrent: Option<u32>,
    ) -> (RateLimits, TenantId) {
        let cat = Arc::new(
            SqlCatalog::connect("sqlite::memory:", crate::catalog::MasterKey::generate())
                .await
                .unwrap(),
        );
        let mut spec = TenantSpec::default();
        spec.qos.requests_per_second = rps;
        spec.qos.bandwidth_bytes_per_second = bps;
        spec.qos.max_concurrent_requests = concurrent;
        let t = cat.create_tenant("t", &spec).await.unwrap().id;
        (RateLimits::new(cat), t)
    }

    #[tokio::test]
    async fn requests_beyond_the_rate_wait_and_take_nothing() {
        let (r, t) = limited(Some(10), None).await;
        for _ in 0..10 {
            let _ = r.admit(t, 0).await.unwrap();
        }
        let e = r.admit(t, 0).await.unwrap_err();
        assert_eq!(e.limit, "requests");
        assert!(e.retry_after <= Duration::from_millis(110), "{e:?}");
        tokio::time::sleep(Duration::from_millis(250)).await;
        // About 2.5 tokens came back.
        let _ = r.admit(t, 0).await.unwrap();
        let _ = r.admit(t, 0).await.unwrap();
        assert!(r.admit(t, 0).await.is_err() || r.admit(t, 0).await.is_err());
        // Two nodes share it: each admits half.
        r.set_nodes(2);
        tokio::time::sleep(Duration::from_millis(1100)).await;
        let mut n = 0;
        while r.admit(t, 0).await.is_ok() {
            n += 1;
        }
        assert_eq!(n, 5);
    }

    #[tokio::test]
    async fn nodes_share_a_limit_by_demand() {
        let (r, t) = limited(Some(30), None).await;
        r.set_nodes(3);
        // Without any demand known, a third.
        assert_eq!(r.share(Some(30), 0.0, 0.0), Some(10.0));
        // All the demand here: nearly all of it; the shares of three nodes with any
        // demand add up to the limit.
        let all = r.share(Some(30), 50.0, 0.0).unwrap();
        assert!((29.0..30.0).contains(&all), "{all}");
        let (a, b, c) = (10.0, 20.0, 30.0);
        let sum: f64 = [(a, b + c), (b, a + c), (c, a + b)]
            .iter()
            .map(|&(mine, others)| r.share(Some(30), mine, others).unwrap())
            .sum();
        assert!((sum - 30.0).abs() < 1e-6, "{sum}");
        // A node that sees none of the demand keeps a small floor.
        let idle = r.share(Some(30), 0.0, 100.0).unwrap();
        assert!(idle > 0.0 && idle < 1.0, "{idle}");

        // A share from garbage is the even one.
        assert_eq!(r.share(Some(30), 1.0, f64::INFINITY), Some(10.0));

        // Counted: the requests tried here become this node's demand, capped at the
        // limit (refusals buy nothing) and smoothed.
        for _ in 0..3000 {
            let _ = r.admit(t, 0).await;
        }
        let d = r.roll_demand();
        assert!((14.0..=15.0).contains(&d[&t].requests), "{d:?}");
        // Peers whose demand is unknown are taken to have this node's: a third here.
        tokio::time::sleep(Duration::from_millis(1100)).await;
        assert_eq!(admitted_now(&r, t).await, 10);
        // Both peers known to have none: nearly all of it here.
        r.set_peer_demand(HashMap::new(), 2);
        tokio::time::sleep(Duration::from_millis(1100)).await;
        assert!(admitted_now(&r, t).await >= 29);
        // Peers that try twice as much (known): a third is left here.
        let mine = r.lock()[&t].demand;
        r.set_peer_demand(
            HashMap::from([(
                t,
                Demand {
                    requests: 2.0 * mine,
                    ..Demand::default()
                },
            )]),
            2,
        );
        tokio::time::sleep(Duration::from_millis(1100)).await;
        let n = admitted_now(&r, t).await;
        assert!((9..=11).contains(&n), "admitted {n}, a third of 30");
    }

    /// Bandwidth is shared by byte demand: the body bytes tried here (declared, and
    /// charged for reads) become this node's demand, capped at the limit; with the
    /// peers known to see none, nearly the whole bandwidth is admitted here, with the
    /// peers unknown a third.
    #[tokio::test]
    async fn nodes_share_bandwidth_by_demand() {
        let (r, t) = limited(None, Some(3000)).await;
        r.set_nodes(3);
        for _ in 0..5 {
            let _ = r.admit(t, 1000).await;
        }
        // (Two admitted, three refused: each tried; a read answered with 1000 more.)
        r.charge(t, 1000);
        let d = r.roll_demand();
        assert!((1400.0..=1500.0).contains(&d[&t].bytes), "{d:?}");
        assert_eq!(d[&t].requests, 0.0, "no request limit, no request demand");
        // Peers known to see none of it: nearly all the bandwidth here. The balance,
        // 2000 below zero, is paid back within 1.1 s (at a third, 1000/s, it would
        // not be), so a transfer passes; it takes the balance below zero again.
        r.set_peer_demand(HashMap::new(), 2);
        tokio::time::sleep(Duration::from_millis(1100)).await;
        assert!(r.admit(t, 2500).await.is_ok());
        assert_eq!(r.admit(t, 1).await.unwrap_err().limit, "bytes");
        // Peers unknown (taken to have this node's demand): a third.
        r.set_peer_demand(HashMap::new(), 0);
        let mine = r.mine(t);
        let share = r.share(Some(3000), mine.bytes, r.others(t, mine).bytes);
        assert!((share.unwrap() - 1000.0).abs() < 1.0, "{share:?}");
    }

    /// The demand a node sends its peers comes back as it went, summed over peers;
    /// zeros are not sent and keys from other versions are skipped.
    #[test]
    fn demand_travels_in_the_probe_answers() {
        let t: TenantId = "7c9e6679-7425-40de-944b-e07fc1f90ae7".parse().unwrap();
        let d = Demand {
            requests: 3.0,
            bytes: 0.0,
            concurrency: 2.5,
            held: 2.0,
        };
        let wire: Vec<_> = Demand::to_wire(HashMap::from([(t, d)])).collect();
        assert_eq!(wire.len(), 3, "{wire:?}");
        let mut back = wire.clone();
        back.extend(wire);
        back.push((format!("{t}/future"), 9.0));
        let got = Demand::from_wire(back);
        assert_eq!(
            got[&t],
            Demand {
                requests: 6.0,
                bytes: 0.0,
                concurrency: 5.0,
                held: 4.0,
            }
        );
        assert_eq!(got.len(), 1);
    }

    /// Admits `tenant` until refused (at most 100); how many were admitted.
    async fn admitted_now(r: &RateLimits, tenant: TenantId) -> usize {
        let mut n = 0;
        while n < 100 && r.admit(tenant, 0).await.is_ok() {
            n += 1;
        }
        n
    }

    #[tokio::test]
    async fn a_large_transfer_is_paid_back_before_the_next() {
        let (r, t) = limited(None, Some(1000)).await;
        let _ = r.admit(t, 5000).await.unwrap();
        let e = r.admit(t, 1).await.unwrap_err();
        assert_eq!(e.limit, "bytes");
        assert!(e.retry_after >= Duration::from_secs(3), "{e:?}");
        assert!(e.retry_after_secs() >= 4);
        r.charge(t, 1000);
        let e = r.admit(t, 1).await.unwrap_err();
        assert!(e.retry_after >= Duration::from_secs(4), "{e:?}");
        // A share below one request per second still admits one now and then, and a
        // limit of 0 blocks without a panic.
        let (slow, v) = limited(Some(2), None).await;
        slow.set_nodes(3);
        tokio::time::sleep(Duration::from_millis(1600)).await;
        let _ = slow.admit(v, 0).await.unwrap();
        let (blocked, w) = limited(Some(0), Some(0)).await;
        let e = blocked.admit(w, 0).await.unwrap_err();
        assert_eq!(e.retry_after_secs(), 60);
        // A tenant without limits is never refused.
        let (free, u) = limited(None, None).await;
        for _ in 0..1000 {
            let _ = free.admit(u, 1 << 30).await.unwrap();
        }
    }

    /// Admits `tenant` until refused (at most 20), holding every admitted request.
    async fn hold_all(r: &RateLimits, tenant: TenantId) -> Vec<InFlight> {
        let mut held = Vec::new();
        while held.len() < 20 {
            match r.admit(tenant, 0).await {
                Ok(h) => held.push(h),
                Err(_) => break,
            }
        }
        held
    }

    #[tokio::test]
    async fn concurrent_requests_are_capped_and_given_back() {
        let (r, t) = limited_with(None, None, Some(2)).await;
        let a = r.admit(t, 0).await.unwrap();
        let _b = r.admit(t, 0).await.unwrap();
        let e = r.admit(t, 0).await.unwrap_err();
        assert_eq!(e.limit, "concurrency");
        drop(a);
        let _c = r.admit(t, 0).await.unwrap();

        // On three nodes, while no demand is known: a third of the cap, rounded up.
        let (r, t) = limited_with(None, None, Some(8)).await;
        r.set_nodes(3);
        let held = hold_all(&r, t).await;
        assert_eq!(held.len(), 3);
        // Three held for a while and seven asked for (four refused): by Little's law
        // this node asked for seven slots; smoothed, half of that.
        for _ in 0..3 {
            assert_eq!(r.admit(t, 0).await.unwrap_err().limit, "concurrency");
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
        let d = r.roll_demand()[&t];
        assert!((3.0..=3.6).contains(&d.concurrency), "{d:?}");
        // Peers whose demand is unknown are taken to have this node's: still a third.
        assert!(r.admit(t, 0).await.is_err());
        // Peers known to ask for none: the whole cap here.
        r.set_peer_demand(HashMap::new(), 2);
        let more = hold_all(&r, t).await;
        assert_eq!(held.len() + more.len(), 8);
        // Peers known to ask for as much each: a third again, once these are done.
        drop((held, more));
        r.set_peer_demand(
            HashMap::from([(
                t,
                Demand {
                    concurrency: 2.0 * d.concurrency,
                    ..Demand::default()
                },
            )]),
            2,
        );
        assert_eq!(hold_all(&r, t).await.len(), 3);
        // Peers that ask for twice as much as this node together: the slots of three
        // such nodes add up to less than the cap plus one per node.
        let sum: u32 = [(1.0, 5.0), (2.0, 4.0), (3.0, 3.0)]
            .iter()
            .map(|&(mine, others)| {
                let share = r.share(Some(8), mine, others).unwrap();
                (share - 1e-6).ceil() as u32
            })
            .sum();
        assert!((8..8 + 3).contains(&sum), "{sum}");
        // Slots the peers hold are not granted here again, however large this node's
        // share: with 7 of 8 held elsewhere, one here.
        r.set_peer_demand(
            HashMap::from([(
                t,
                Demand {
                    held: 7.0,
                    ..Demand::default()
                },
            )]),
            2,
        );
        let _one = hold_all(&r, t).await;
        assert_eq!(_one.len(), 1);
        drop(_one);
        // A tenant with nothing in flight is forgotten at the next count; one holding
        // slots tells its peers how many.
        let _two = [r.admit(t, 0).await.unwrap()];
        assert_eq!(r.roll_demand()[&t].held, 1.0);
        drop(_two);
        r.roll_demand();
        assert!(r.inflight.lock().unwrap().is_empty());
    }
}
