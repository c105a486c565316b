//! `granary-operator`: `crd` prints the CRDs; `run` reconciles StorageClusters and
//! Tenants until SIGTERM.

use std::sync::Arc;
use std::time::Duration;

use clap::{Parser, Subcommand};
use futures::future::{BoxFuture, Shared};
use futures::{FutureExt, StreamExt};
use granary_operator::controller::{self, Context, Metrics};
use granary_operator::crd::{StorageCluster, Tenant};
use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::core::v1::{Namespace, Secret, Service};
use kube::api::ListParams;
use kube::runtime::reflector::ObjectRef;
use kube::runtime::{Controller, watcher};
use kube::{Api, Client, ResourceExt};

#[derive(Parser)]
#[command(
    name = "granary-operator",
    version,
    about = "Granary Kubernetes operator"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Print the CustomResourceDefinitions as YAML.
    Crd,
    /// Run the controllers.
    Run(RunArgs),
    /// Write and read back a KV entry through a StorageCluster with a throwaway tenant
    /// (what the chart's `helm test` runs); exits non-zero on any failure.
    SmokeTest {
        /// The StorageCluster's name.
        #[arg(long)]
        cluster: String,
        /// Its namespace; default: this pod's.
        #[arg(long, env = "POD_NAMESPACE", default_value = "default")]
        namespace: String,
    },
}

#[derive(clap::Args)]
struct RunArgs {
    /// Namespaces to watch, comma-separated; empty means all.
    #[arg(
        long,
        env = "GRANARY_WATCH_NAMESPACES",
        value_delimiter = ',',
        default_value = ""
    )]
    watch_namespaces: Vec<String>,
    /// Elect a leader through a Lease (run two replicas safely).
    #[arg(long, overrides_with = "no_leader_election", default_value_t = true)]
    leader_election: bool,
    #[arg(long)]
    no_leader_election: bool,
    #[arg(long, default_value = "granary-operator")]
    lease_name: String,
    /// Namespace of the Lease; default: this pod's namespace.
    #[arg(long, env = "POD_NAMESPACE", default_value = "default")]
    lease_namespace: String,
    /// Address of /metrics, /healthz and /readyz.
    #[arg(long, default_value = "0.0.0.0:8080")]
    metrics_addr: std::net::SocketAddr,
    /// After SIGTERM, how long running reconciles may take before the process exits
    /// anyway (keep it below the pod's terminationGracePeriodSeconds).
    #[arg(long, default_value = "10s", value_parser = parse_grace)]
    shutdown_grace: Duration,
    /// Namespace where Prometheus runs: the storage nodes' NetworkPolicy admits it to the
    /// admin port, where `/metrics` is served.
    #[arg(long, env = "GRANARY_PROMETHEUS_NAMESPACE")]
    prometheus_namespace: Option<String>,
}

/// A duration such as `10s` or `1m30s` (the Tenant `coldAfter` syntax).
fn parse_grace(s: &str) -> Result<Duration, String> {
    granary_operator::controller::tenant::parse_duration_secs(s)
        .map(Duration::from_secs)
        .ok_or_else(|| format!("expected a duration such as 10s or 1m30s, got {s:?}"))
}

/// Resolves on the first SIGINT or SIGTERM. The handlers are installed when this is
/// called, not when the future is first polled, so no early signal is lost.
fn shutdown_signal() -> std::io::Result<Shared<BoxFuture<'static, ()>>> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    Ok(async move {
        tokio::select! {
            _ = term.recv() => tracing::info!("SIGTERM received; shutting down"),
            _ = int.recv() => tracing::info!("SIGINT received; shutting down"),
        }
    }
    .boxed()
    .shared())
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.cmd {
        Cmd::Crd => {
            print!("{}", granary_operator::crd::crds_yaml()?);
            Ok(())
        }
        Cmd::Run(args) => tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()?
            .block_on(run(args)),
        Cmd::SmokeTest { cluster, namespace } => tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?
            .block_on(async {
                let _ = rustls::crypto::ring::default_provider().install_default();
                let client = Client::try_default().await?;
                granary_operator::smoke::run(client, &namespace, &cluster).await
            }),
    }
}

async fn run(args: RunArgs) -> anyhow::Result<()> {
    // Choose the TLS crypto backend explicitly: with both compiled in (workspace feature
    // unification), rustls would panic at the first API connection otherwise.
    let _ = rustls::crypto::ring::default_provider().install_default();
    // Reconcile spans come from kube-runtime's controller; keep them for traces.
    let _telemetry = granary_telemetry::init(
        "granary-operator",
        "info,kube=warn",
        &["granary_operator", "kube_runtime"],
    );
    let stop = shutdown_signal()?;
    let client = Client::try_default().await?;
    let metrics = Arc::new(Metrics::default());
    let ready = Arc::new(std::sync::atomic::AtomicBool::new(false));

    let m = metrics.clone();
    let r = ready.clone();
    let app = axum::Router::new()
        .route(
            "/metrics",
            axum::routing::get(move || {
                let m = m.clone();
                async move { m.render() }
            }),
        )
        .route("/healthz", axum::routing::get(|| async { "ok" }))
        .route(
            "/readyz",
            axum::routing::get(move || {
                let r = r.clone();
                async move {
                    if r.load(std::sync::atomic::Ordering::Relaxed) {
                        (axum::http::StatusCode::OK, "ready")
                    } else {
                        (axum::http::StatusCode::SERVICE_UNAVAILABLE, "waiting")
                    }
                }
            }),
        );
    let listener = tokio::net::TcpListener::bind(args.metrics_addr).await?;
    tracing::info!(addr = %listener.local_addr()?, "metrics listening");
    tokio::spawn(async move { axum::serve(listener, app).await });

    // Ready, leader or standby, once this replica could do its work: the API server
    // answers, the CRDs are installed and its RBAC lets it list them, and (on a standby)
    // it can read the Lease. A standby that waited for the Lease to turn Ready would stall
    // every rolling update of the Deployment (the new pod waits for the Lease the old pod
    // holds until it is stopped, which waits for the new pod to be Ready); one that is
    // Ready without being able to work would let a broken upgrade replace a working one.
    loop {
        // In the first watched namespace when there are any (rbac.namespaced grants no
        // cluster-wide list).
        let first = args
            .watch_namespaces
            .iter()
            .find(|n| !n.is_empty())
            .cloned();
        let check = async {
            let probe = ListParams::default().limit(1);
            scoped::<StorageCluster>(&client, &first)
                .list(&probe)
                .await?;
            scoped::<Tenant>(&client, &first).list(&probe).await
        };
        tokio::select! {
            r = tokio::time::timeout(Duration::from_secs(10), check) => match r {
                Ok(Ok(_)) => break,
                Ok(Err(e)) => tracing::warn!(error = %e, "cannot list StorageClusters and Tenants yet (API server, CRDs or RBAC); retrying"),
                Err(_) => tracing::warn!("the API server did not answer within 10 s; retrying"),
            },
            _ = stop.clone() => {
                tracing::info!("stopped before the API server answered");
                return Ok(());
            }
        }
        tokio::select! {
            () = tokio::time::sleep(Duration::from_secs(2)) => {}
            _ = stop.clone() => {
                tracing::info!("stopped before the API server answered");
                return Ok(());
            }
        }
    }
    ready.store(true, std::sync::atomic::Ordering::Relaxed);

    let mut leading = if args.leader_election && !args.no_leader_election {
        let me = std::env::var("POD_NAME")
            .unwrap_or_else(|_| format!("granary-operator-{}", std::process::id()));
        let lead = granary_operator::leader::lead(
            client.clone(),
            &args.lease_namespace,
            &args.lease_name,
            &me,
            &ready,
        );
        tokio::select! {
            rx = lead => Some(rx),
            _ = stop.clone() => {
                tracing::info!("stopped before acquiring the lease");
                return Ok(());
            }
        }
    } else {
        None
    };
    metrics.leader.set(1);

    let operator_ns = args.lease_namespace.clone();
    let mut ctx = Context::new(client.clone(), metrics.clone(), operator_ns);
    ctx.prometheus_namespace = args.prometheus_namespace.filter(|p| !p.is_empty());
    let ctx = Arc::new(ctx);
    let namespaces: Vec<String> = args
        .watch_namespaces
        .into_iter()
        .filter(|s| !s.is_empty())
        .collect();
    let mut tasks = Vec::new();
    let scopes: Vec<Option<String>> = if namespaces.is_empty() {
        vec![None]
    } else {
        namespaces.into_iter().map(Some).collect()
    };
    for ns in scopes {
        let (clusters, sts, svc, tenants, secrets): (Api<StorageCluster>, _, _, Api<Tenant>, _) = (
            scoped(&client, &ns),
            scoped::<StatefulSet>(&client, &ns),
            scoped::<Service>(&client, &ns),
            scoped(&client, &ns),
            scoped::<Secret>(&client, &ns),
        );
        let cfg = watcher::Config::default();
        // Only the objects the operator made (its label) are watched and cached: not
        // every Secret, StatefulSet and Service of the cluster.
        let own = watcher::Config::default().labels(&format!(
            "app.kubernetes.io/managed-by={}",
            granary_operator::build::MANAGER
        ));
        let (clusters, cluster_store) = spec_changes(clusters, cfg.clone());
        let (tenants, tenant_store) = spec_changes(tenants, cfg.clone());
        let c1 = Controller::for_stream(clusters, cluster_store)
            .owns(sts, own.clone())
            .owns(svc, own.clone())
            .graceful_shutdown_on(stop.clone())
            .run(
                controller::cluster::reconcile,
                controller::error_policy,
                ctx.clone(),
            )
            .for_each(|_| futures::future::ready(()));
        // A namespace's labels decide whether its tenants may use their cluster: a change
        // re-examines its tenants at once (suspends or resumes them).
        let namespaces = Api::<Namespace>::all(client.clone());
        let namespace_cfg = match &ns {
            Some(n) => watcher::Config::default().fields(&format!("metadata.name={n}")),
            None => watcher::Config::default(),
        };
        let in_namespace = tenant_store.clone();
        // A cluster's changes (its readiness, its namespace selector) re-examine the
        // tenants it serves.
        let of_cluster = tenant_store.clone();
        // (In the watched namespaces only: with rbac.namespaced the operator may not
        // list StorageClusters elsewhere.)
        let all_clusters = scoped::<StorageCluster>(&client, &ns);
        let c2 = Controller::for_stream(tenants, tenant_store)
            .owns(secrets, own.clone())
            .watches(
                all_clusters,
                watcher::Config::default(),
                move |sc: StorageCluster| {
                    let (name, namespace) = (sc.name_any(), sc.namespace().unwrap_or_default());
                    of_cluster
                        .state()
                        .into_iter()
                        .filter(|t| {
                            t.spec.cluster_ref.name == name
                                && t.spec.cluster_ref.namespace == namespace
                        })
                        .map(|t| ObjectRef::from_obj(t.as_ref()))
                        .collect::<Vec<_>>()
                },
            )
            .watches(namespaces, namespace_cfg, move |ns: Namespace| {
                let name = ns.name_any();
                in_namespace
                    .state()
                    .into_iter()
                    .filter(|t| t.namespace().as_deref() == Some(name.as_str()))
                    .map(|t| ObjectRef::from_obj(t.as_ref()))
                    .collect::<Vec<_>>()
            })
            .graceful_shutdown_on(stop.clone())
            .run(
                controller::tenant::reconcile,
                controller::error_policy,
                ctx.clone(),
            )
            .for_each(|_| futures::future::ready(()));
        tasks.push(tokio::spawn(c1));
        tasks.push(tokio::spawn(c2));
    }
    let aborts: Vec<_> = tasks.iter().map(|t| t.abort_handle()).collect();
    let mut all = std::pin::pin!(futures::future::join_all(tasks));
    let outcome: anyhow::Result<()> = {
        let mut lost = std::pin::pin!(async {
            match leading.as_mut() {
                Some(l) => l.lost().await,
                None => futures::future::pending().await,
            }
        });
        tokio::select! {
            _ = &mut all => Ok(()),
            _ = &mut lost => Err(anyhow::anyhow!("lost leadership; exiting so a new leader takes over")),
            _ = stop.clone() => {
                // The controllers saw the same signal and stop taking work; in-flight
                // reconciles get the grace period. Watches retrying against an
                // unreachable API server would otherwise hold the process forever.
                // Leadership is still watched: past the lease, another replica may lead.
                tokio::select! {
                    r = tokio::time::timeout(args.shutdown_grace, &mut all) => {
                        if r.is_err() {
                            tracing::warn!(grace = ?args.shutdown_grace, "controllers did not stop within the grace period; exiting anyway");
                        }
                        Ok(())
                    }
                    _ = &mut lost => Err(anyhow::anyhow!("lost leadership while shutting down")),
                }
            }
        }
    };
    // Nothing reconciles any more before the Lease can pass to another replica.
    for a in &aborts {
        a.abort();
    }
    if outcome.is_ok()
        && let Some(l) = leading
    {
        // A standby replica takes over at once; bounded, the API server may be gone.
        let _ = tokio::time::timeout(Duration::from_secs(3), l.release()).await;
    }
    tracing::info!("operator stopped");
    outcome
}

/// The objects of `api` whenever their spec (generation), finalizers or annotations
/// change, and the store they are read from. Status-only updates (the operator's own
/// included) trigger nothing: they would make every reconcile trigger the next one.
/// Changes of owned objects still trigger (`owns`), and every reconcile schedules the
/// next look (`Action::requeue`).
fn spec_changes<K>(
    api: Api<K>,
    cfg: watcher::Config,
) -> (
    impl futures::Stream<Item = Result<K, watcher::Error>> + Send + 'static,
    kube::runtime::reflector::Store<K>,
)
where
    K: kube::Resource<DynamicType = ()>
        + Clone
        + serde::de::DeserializeOwned
        + std::fmt::Debug
        + Send
        + Sync
        + 'static,
{
    use kube::runtime::{Predicate, WatchStreamExt, predicates, reflector};
    let (reader, writer) = reflector::store();
    let stream = watcher(api, cfg)
        .default_backoff()
        .reflect(writer)
        .applied_objects()
        .predicate_filter(
            predicates::generation
                .combine(predicates::finalizers)
                .combine(predicates::annotations),
            Default::default(),
        );
    (stream, reader)
}

/// An API over one namespace, or all namespaces when `ns` is None.
fn scoped<K>(client: &Client, ns: &Option<String>) -> Api<K>
where
    K: kube::Resource<Scope = k8s_openapi::NamespaceResourceScope, DynamicType = ()>,
{
    match ns {
        Some(n) => Api::namespaced(client.clone(), n),
        None => Api::all(client.clone()),
    }
}
