//! Leader election over a `coordination.k8s.io` Lease, so two operator replicas can run
//! and only one reconciles. Optimistic concurrency (resourceVersion) decides races.

use std::time::Duration;

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use k8s_openapi::jiff::Timestamp;
use kube::api::PostParams;
use kube::{Api, Client};
use tokio::sync::watch;

const LEASE_SECONDS: i32 = 15;
const RENEW_EVERY: Duration = Duration::from_secs(5);

fn expired(l: &LeaseSpec, now: Timestamp) -> bool {
    let Some(renew) = l.renew_time.as_ref() else {
        return true;
    };
    let dur = i64::from(l.lease_duration_seconds.unwrap_or(LEASE_SECONDS));
    now.as_second() > renew.0.as_second() + dur
}

/// Tries once to become (or stay) the holder. Returns true when we hold the lease.
async fn try_acquire(api: &Api<Lease>, name: &str, me: &str) -> kube::Result<bool> {
    let now = Timestamp::now();
    match api.get_opt(name).await? {
        None => {
            let lease = Lease {
                metadata: ObjectMeta {
                    name: Some(name.into()),
                    ..Default::default()
                },
                spec: Some(LeaseSpec {
                    holder_identity: Some(me.into()),
                    lease_duration_seconds: Some(LEASE_SECONDS),
                    acquire_time: Some(MicroTime(now)),
                    renew_time: Some(MicroTime(now)),
                    lease_transitions: Some(0),
                    ..Default::default()
                }),
            };
            match api.create(&PostParams::default(), &lease).await {
                Ok(_) => Ok(true),
                Err(kube::Error::Api(e)) if e.code == 409 => Ok(false),
                Err(e) => Err(e),
            }
        }
        Some(mut lease) => {
            let spec = lease.spec.clone().unwrap_or_default();
            let mine = spec.holder_identity.as_deref() == Some(me);
            if !mine && !expired(&spec, now) {
                return Ok(false);
            }
            let mut s = spec;
            if !mine {
                s.acquire_time = Some(MicroTime(now));
                s.lease_transitions = Some(s.lease_transitions.unwrap_or(0) + 1);
            }
            s.holder_identity = Some(me.into());
            s.lease_duration_seconds = Some(LEASE_SECONDS);
            s.renew_time = Some(MicroTime(now));
            lease.spec = Some(s);
            match api.replace(name, &PostParams::default(), &lease).await {
                Ok(_) => Ok(true),
                Err(kube::Error::Api(e)) if e.code == 409 => Ok(false),
                Err(e) => Err(e),
            }
        }
    }
}

/// Blocks until this process leads, then keeps renewing in the background. The
/// returned receiver turns false if leadership is lost; the caller must then stop.
pub async fn lead(client: Client, namespace: &str, name: &str, me: &str) -> watch::Receiver<bool> {
    let api: Api<Lease> = Api::namespaced(client, namespace);
    loop {
        match try_acquire(&api, name, me).await {
            Ok(true) => break,
            Ok(false) => tracing::info!(lease = name, "another replica leads; waiting"),
            Err(e) => tracing::warn!(error = %e, "leader election failed; retrying"),
        }
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
    tracing::info!(lease = name, identity = me, "became leader");
    let (tx, rx) = watch::channel(true);
    let (name, me) = (name.to_string(), me.to_string());
    tokio::spawn(async move {
        let mut failures_since = None::<std::time::Instant>;
        loop {
            tokio::time::sleep(RENEW_EVERY).await;
            match try_acquire(&api, &name, &me).await {
                Ok(true) => failures_since = None,
                Ok(false) => {
                    tracing::error!("leadership lost to another replica");
                    let _ = tx.send(false);
                    return;
                }
                Err(e) => {
                    let since = *failures_since.get_or_insert_with(std::time::Instant::now);
                    tracing::warn!(error = %e, "lease renewal failed");
                    // Stop before the lease can expire under us: never two leaders.
                    if since.elapsed() >= Duration::from_secs((LEASE_SECONDS as u64) - 5) {
                        let _ = tx.send(false);
                        return;
                    }
                }
            }
        }
    });
    rx
}
