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
            // Released (no holder) counts as free at once.
            let free = spec.holder_identity.as_deref().is_none_or(str::is_empty);
            if !mine && !free && !expired(&spec, now) {
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

/// Held while this process leads.
pub struct Leadership {
    api: Api<Lease>,
    name: String,
    me: String,
    lost: watch::Receiver<bool>,
    renewer: tokio::task::JoinHandle<()>,
}

impl Leadership {
    /// Resolves when leadership is lost (renewal failed or another replica took over);
    /// the caller must then stop reconciling.
    pub async fn lost(&mut self) {
        let _ = self.lost.wait_for(|leading| !*leading).await;
    }

    /// Stops renewing and gives the Lease up, so another replica takes over at once
    /// instead of after the lease duration (as client-go's ReleaseOnCancel does).
    pub async fn release(self) {
        self.renewer.abort();
        let Ok(Some(mut lease)) = self.api.get_opt(&self.name).await else {
            return;
        };
        let mut spec = lease.spec.clone().unwrap_or_default();
        if spec.holder_identity.as_deref() != Some(self.me.as_str()) {
            return;
        }
        spec.holder_identity = None;
        spec.lease_duration_seconds = Some(1);
        spec.renew_time = Some(MicroTime(Timestamp::now()));
        lease.spec = Some(spec);
        match self
            .api
            .replace(&self.name, &PostParams::default(), &lease)
            .await
        {
            Ok(_) => tracing::info!(lease = %self.name, "released the lease"),
            Err(e) => {
                tracing::warn!(error = %e, "could not release the lease; it expires on its own")
            }
        }
    }
}

/// Blocks until this process leads, then keeps renewing in the background. While it
/// waits, `healthy` says whether the last attempt reached the Lease (held by another
/// replica counts; an error such as a 403 does not), for readiness.
pub async fn lead(
    client: Client,
    namespace: &str,
    name: &str,
    me: &str,
    healthy: &std::sync::atomic::AtomicBool,
) -> Leadership {
    use std::sync::atomic::Ordering;
    let api: Api<Lease> = Api::namespaced(client, namespace);
    loop {
        match try_acquire(&api, name, me).await {
            Ok(true) => {
                healthy.store(true, Ordering::Relaxed);
                break;
            }
            Ok(false) => {
                healthy.store(true, Ordering::Relaxed);
                tracing::info!(lease = name, "another replica leads; waiting")
            }
            Err(e) => {
                healthy.store(false, Ordering::Relaxed);
                tracing::warn!(error = %e, "leader election failed; retrying")
            }
        }
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
    tracing::info!(lease = name, identity = me, "became leader");
    let (tx, rx) = watch::channel(true);
    let renewer = tokio::spawn({
        let (api, name, me) = (api.clone(), name.to_string(), me.to_string());
        async move {
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
        }
    });
    Leadership {
        api,
        name: name.to_string(),
        me: me.to_string(),
        lost: rx,
        renewer,
    }
}
