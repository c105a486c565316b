//! Reconcilers. Each is a fixed pipeline: read -> validate -> build (pure, `build/`)
//! -> apply (server-side apply) -> status. Shared state lives in [`Context`].

pub mod cluster;
pub mod tenant;

use std::sync::Arc;
use std::time::{Duration, Instant};

use kube::Client;
use kube::runtime::controller::Action;
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use kube::{Resource, ResourceExt};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

use crate::error::Error;

pub const MANAGER: &str = crate::build::MANAGER;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReconcileLabels {
    pub controller: &'static str,
    pub result: &'static str,
}

/// Reconcile counters and durations, by controller and result (`ok` or an error kind).
pub struct Metrics {
    pub registry: std::sync::Mutex<Registry>,
    pub reconciles: Family<ReconcileLabels, Counter>,
    pub duration: Family<ReconcileLabels, Histogram>,
    /// 1 while this process holds the Lease (or runs without leader election), else 0.
    pub leader: prometheus_client::metrics::gauge::Gauge,
}

impl Default for Metrics {
    fn default() -> Self {
        let reconciles = Family::<ReconcileLabels, Counter>::default();
        let duration = Family::<ReconcileLabels, Histogram>::new_with_constructor(|| {
            Histogram::new(exponential_buckets(0.001, 2.0, 14))
        });
        let mut registry = Registry::with_prefix("granary_operator");
        registry.register(
            "reconciles",
            "Reconciles by controller and result",
            reconciles.clone(),
        );
        registry.register(
            "reconcile_duration_seconds",
            "Reconcile durations by controller and result",
            duration.clone(),
        );
        let leader = prometheus_client::metrics::gauge::Gauge::default();
        registry.register(
            "leader",
            "1 while this replica holds the leader Lease and reconciles, 0 on a standby",
            leader.clone(),
        );
        Self {
            registry: std::sync::Mutex::new(registry),
            leader,
            reconciles,
            duration,
        }
    }
}

impl Metrics {
    pub fn observe(&self, controller: &'static str, result: &'static str, started: Instant) {
        let l = ReconcileLabels { controller, result };
        self.reconciles.get_or_create(&l).inc();
        self.duration
            .get_or_create(&l)
            .observe(started.elapsed().as_secs_f64());
    }

    /// Records a finished reconcile: `ok`, or the error's metric label.
    pub fn observe_result<T>(
        &self,
        controller: &'static str,
        r: &Result<T, Error>,
        started: Instant,
    ) {
        self.observe(
            controller,
            r.as_ref()
                .map(|_| "ok")
                .unwrap_or_else(|e| e.metric_label()),
            started,
        );
    }

    pub fn render(&self) -> String {
        let mut out = String::new();
        if let Ok(r) = self.registry.lock() {
            let _ = prometheus_client::encoding::text::encode(&mut out, &r);
        }
        out
    }
}

/// Shared by every reconcile.
pub struct Context {
    pub client: Client,
    pub recorder: Recorder,
    pub metrics: Arc<Metrics>,
    pub http: reqwest::Client,
    pub operator_namespace: String,
    /// Where Prometheus runs: admitted to the storage nodes' metrics.
    pub prometheus_namespace: Option<String>,
    pub failures: Failures,
}

impl Context {
    pub fn new(client: Client, metrics: Arc<Metrics>, operator_namespace: String) -> Self {
        let reporter = Reporter {
            controller: MANAGER.into(),
            instance: std::env::var("POD_NAME").ok(),
        };
        Self {
            recorder: Recorder::new(client.clone(), reporter),
            client,
            metrics,
            http: reqwest::Client::new(),
            operator_namespace,
            prometheus_namespace: None,
            failures: Failures::default(),
        }
    }

    /// Publishes a Kubernetes Event about `obj`; failures to publish are only logged.
    pub async fn event<K: Resource<DynamicType = ()>>(
        &self,
        obj: &K,
        warning: bool,
        reason: &str,
        note: String,
    ) {
        let ev = Event {
            type_: if warning {
                EventType::Warning
            } else {
                EventType::Normal
            },
            reason: reason.into(),
            note: Some(truncate_note(note)),
            action: "Reconcile".into(),
            secondary: None,
        };
        if let Err(e) = self.recorder.publish(&ev, &obj.object_ref(&())).await {
            tracing::warn!(error = %e, "could not publish an event");
        }
    }
}

/// The API server refuses an Event whose note is longer than 1 KiB: longer notes (a
/// reconcile that failed on several objects) are cut at a character boundary, with `…`.
fn truncate_note(mut note: String) -> String {
    const MAX: usize = 1024;
    if note.len() > MAX {
        let mut end = MAX - '…'.len_utf8();
        while !note.is_char_boundary(end) {
            end -= 1;
        }
        note.truncate(end);
        note.push('…');
    }
    note
}

/// The admin API client of a StorageCluster's nodes (the internal Service, or the
/// `granary.dev/admin-endpoint` annotation), or None while its admin token Secret does
/// not exist yet.
pub async fn cluster_admin(
    ctx: &Context,
    sc: &crate::crd::StorageCluster,
    b: &crate::build::cluster::Context,
) -> crate::error::Result<Option<crate::admin_client::AdminClient>> {
    use k8s_openapi::api::core::v1::Secret;
    let secrets: kube::Api<Secret> = kube::Api::namespaced(ctx.client.clone(), &b.namespace);
    let token = secrets
        .get_opt(&b.admin_token_secret())
        .await?
        .and_then(|s| s.data)
        .and_then(|d| d.get("token").cloned())
        .map(|v| String::from_utf8_lossy(&v.0).to_string());
    let url = sc
        .annotations()
        .get(tenant::ANNOTATION_ADMIN)
        .cloned()
        .unwrap_or_else(|| format!("http://{}-internal.{}.svc:9200", b.name, b.namespace));
    Ok(token.map(|t| crate::admin_client::AdminClient::new(ctx.http.clone(), &url, &t)))
}

/// Consecutive failed reconciles per object, for the retry backoff.
#[derive(Default)]
pub struct Failures(std::sync::Mutex<std::collections::HashMap<String, u32>>);

impl Failures {
    /// By uid: a re-created object of the same name starts afresh.
    fn key<K: Resource<DynamicType = ()>>(obj: &K) -> String {
        format!(
            "{}/{}/{}/{}",
            K::kind(&()),
            obj.meta().namespace.as_deref().unwrap_or_default(),
            obj.meta().name.as_deref().unwrap_or_default(),
            obj.meta().uid.as_deref().unwrap_or_default()
        )
    }

    /// Records a reconcile's outcome; returns how many failed in a row (0 on success).
    pub fn record<K: Resource<DynamicType = ()>>(&self, obj: &K, ok: bool) -> u32 {
        let key = Self::key(obj);
        let mut m = self
            .0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if ok {
            m.remove(&key);
            return 0;
        }
        let n = m.entry(key).or_insert(0);
        *n = n.saturating_add(1);
        *n
    }
}

/// The delay before retry `n` (1 = after the first failure): 5 s doubling up to 5
/// minutes, each spread by ±20 % so objects that failed together (an API server outage)
/// do not retry in lockstep.
pub fn retry_delay(n: u32, jitter: f64) -> Duration {
    let base = 5.0 * 2f64.powi(n.saturating_sub(1).min(16) as i32);
    Duration::from_secs_f64(base.min(300.0) * (0.8 + 0.4 * jitter.clamp(0.0, 1.0)))
}

/// Retry with exponential backoff and jitter (an invalid spec waits for its next change
/// or 5 minutes); the error is recorded by the reconciler itself (condition and event)
/// before it returns.
pub fn error_policy<K: Resource<DynamicType = ()>>(
    obj: Arc<K>,
    err: &Error,
    ctx: Arc<Context>,
) -> Action {
    // Waits for the spec to change (which triggers a reconcile) or 5 minutes.
    if matches!(err, Error::Invalid(_)) {
        return Action::requeue(Duration::from_secs(300));
    }
    let failures = ctx.failures.record(obj.as_ref(), false);
    let mut delay = retry_delay(failures, rand::random());
    // Some objects failed but the status was written: keep looking at the cluster's
    // health as often as a healthy reconcile would while it is degraded.
    if matches!(err, Error::Apply(_)) {
        delay = delay.min(Duration::from_secs(30));
    }
    tracing::warn!(name = %obj.name_any(), error = %err, failures, retry_in = ?delay, "reconcile failed");
    Action::requeue(delay)
}

#[cfg(test)]
mod tests {
    #[test]
    fn retries_back_off_exponentially_with_jitter_up_to_five_minutes() {
        use std::time::Duration;
        let d = |n, j| super::retry_delay(n, j);
        assert_eq!(d(1, 0.5), Duration::from_secs(5));
        assert_eq!(d(2, 0.5), Duration::from_secs(10));
        assert_eq!(d(4, 0.5), Duration::from_secs(40));
        assert_eq!(d(30, 0.5), Duration::from_secs(300), "capped");
        assert_eq!(d(1, 0.0), Duration::from_secs(4));
        assert_eq!(d(1, 1.0), Duration::from_secs(6));
        let f = super::Failures::default();
        let mut sc: crate::crd::StorageCluster =
            serde_yaml::from_str(include_str!("../../../examples/storagecluster.yaml")).unwrap();
        assert_eq!(f.record(&sc, false), 1);
        assert_eq!(f.record(&sc, false), 2);
        sc.metadata.name = Some("other".into());
        assert_eq!(f.record(&sc, false), 1, "per object");
        assert_eq!(f.record(&sc, true), 0);
        assert_eq!(f.record(&sc, false), 1, "reset by a success");
    }

    #[test]
    fn event_notes_fit_the_api_servers_limit() {
        assert_eq!(super::truncate_note("short".into()), "short");
        let long = "é".repeat(700); // 1400 bytes
        let cut = super::truncate_note(long);
        assert!(cut.len() <= 1024 && cut.ends_with('…'), "{}", cut.len());
    }
}
