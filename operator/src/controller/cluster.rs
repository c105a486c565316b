//! StorageCluster reconciler: secrets -> desired objects -> server-side apply -> status.
//!
//! Scale-in is refused (condition `Degraded`, reason `ScaleInRefused`) until the
//! storage nodes can drain a node: a pool's StatefulSet is never shrunk by the operator.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use base64::Engine as _;
use k8s_openapi::ByteString;
use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::core::v1::{PersistentVolumeClaim, Secret};
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use k8s_openapi::api::storage::v1::StorageClass;
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::api::{ListParams, Patch, PatchParams, PostParams};
use kube::runtime::controller::Action;
use kube::{Api, Resource, ResourceExt};
use rand::RngCore;
use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::json;

use super::{Context, MANAGER};
use crate::build::cluster::{self as builder, Desired};
use crate::crd::{MemberCounts, StorageCluster, StorageClusterStatus, ZoneStatus};
use crate::error::{Error, Result};
use crate::{conditions, quantity};

pub async fn reconcile(sc: Arc<StorageCluster>, ctx: Arc<Context>) -> Result<Action> {
    let started = Instant::now();
    let r = apply(&sc, &ctx).await;
    ctx.metrics.observe_result("storagecluster", &r, started);
    if r.is_ok() {
        ctx.failures.record(sc.as_ref(), true);
    }
    if let Err(e) = &r {
        ctx.event(sc.as_ref(), true, "ReconcileFailed", e.to_string())
            .await;
        // An apply failure was written into the status with everything else.
        if !matches!(e, Error::Apply(_)) {
            let _ = set_failed_status(&sc, &ctx, e).await;
        }
    }
    r
}

async fn ssa<K>(api: &Api<K>, obj: &K) -> Result<()>
where
    K: Resource + Clone + Serialize + DeserializeOwned + std::fmt::Debug,
{
    let name = obj.meta().name.clone().unwrap_or_default();
    api.patch(
        &name,
        &PatchParams::apply(MANAGER).force(),
        &Patch::Apply(obj),
    )
    .await?;
    Ok(())
}

/// Creates a Secret with one random value if it does not exist; never overwrites.
async fn ensure_secret(
    ctx: &Context,
    ns: &str,
    sc: &StorageCluster,
    name: &str,
    key: &str,
    value: String,
) -> Result<()> {
    let api: Api<Secret> = Api::namespaced(ctx.client.clone(), ns);
    if api.get_opt(name).await?.is_some() {
        return Ok(());
    }
    let b = builder::Context::of(sc, &ctx.operator_namespace);
    let secret = Secret {
        metadata: ObjectMeta {
            name: Some(name.into()),
            namespace: Some(ns.into()),
            labels: Some(crate::build::cluster_labels(&b.name)),
            // Not owned by the cluster: deleting the StorageCluster must not make its
            // catalog secrets unreadable (the data stays, see docs).
            ..Default::default()
        },
        data: Some(BTreeMap::from([(
            key.to_string(),
            ByteString(value.into_bytes()),
        )])),
        ..Default::default()
    };
    match api.create(&PostParams::default(), &secret).await {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(e)) if e.code == 409 => Ok(()),
        Err(e) => Err(e.into()),
    }
}

fn random_hex(n: usize) -> String {
    let mut b = vec![0u8; n];
    rand::rng().fill_bytes(&mut b);
    hex::encode(b)
}

async fn apply(sc: &StorageCluster, ctx: &Context) -> Result<Action> {
    let ns = sc
        .namespace()
        .ok_or_else(|| Error::Invalid("StorageCluster must be namespaced".into()))?;
    let mut bctx = builder::Context::of(sc, &ctx.operator_namespace);
    bctx.prometheus_namespace = ctx.prometheus_namespace.clone();
    let client = ctx.client.clone();

    ensure_secret(
        ctx,
        &ns,
        sc,
        &bctx.admin_token_secret(),
        "token",
        random_hex(24),
    )
    .await?;
    ensure_secret(
        ctx,
        &ns,
        sc,
        &bctx.cluster_secret(),
        "secret",
        random_hex(24),
    )
    .await?;
    let mut key = [0u8; 32];
    rand::rng().fill_bytes(&mut key);
    ensure_secret(
        ctx,
        &ns,
        sc,
        &bctx.master_key_secret(),
        "masterKey",
        base64::engine::general_purpose::STANDARD.encode(key),
    )
    .await?;

    let mut desired: Desired = builder::build(sc, &bctx);

    // The catalog Secret is the user's: without it no node can start, which the status
    // says by name (instead of only "0/N nodes ready").
    let catalog_missing = catalog_secret_problem(sc, ctx, &ns).await;

    // Refuse scale-in: keep the current replica count where the spec asks for fewer.
    // Volume changes: volumeClaimTemplates cannot change, so a larger size expands the
    // pool's claims in place and anything else is refused.
    let sts_api: Api<StatefulSet> = Api::namespaced(client.clone(), &ns);
    let mut refused = Vec::new();
    let mut volume_refusals = Vec::new();
    let mut expansions = Vec::new();
    for sts in &mut desired.stateful_sets {
        let name = sts.metadata.name.clone().unwrap_or_default();
        if let Some(current) = sts_api.get_opt(&name).await? {
            let have = current.spec.replicas.unwrap_or(1);
            let want = sts.spec.replicas.unwrap_or(1);
            if want < have {
                refused.push(format!("{name}: {have} -> {want}"));
                sts.spec.replicas = Some(have);
            }
            match volume_change(&current, sts) {
                VolumeChange::None => {}
                VolumeChange::Grow(size) => expansions.push((name.clone(), have.max(want), size)),
                VolumeChange::Refused(why) => volume_refusals.push(format!("{name}: {why}")),
            }
            keep_volume_templates(&current, sts);
        }
    }

    // Every object is applied even when one fails (a refused change must not freeze the
    // budget, the policy or the status); the failures are reported together at the end.
    let mut failures: Vec<String> = Vec::new();
    let mut note = |what: String, r: Result<()>| {
        if let Err(e) = r {
            tracing::warn!(object = %what, error = %e, "apply failed");
            failures.push(format!("{what}: {e}"));
        }
    };
    note(
        "ServiceAccount".into(),
        ssa(
            &Api::namespaced(client.clone(), &ns),
            &desired.service_account,
        )
        .await,
    );
    note(
        "ConfigMap".into(),
        ssa(&Api::namespaced(client.clone(), &ns), &desired.config).await,
    );
    for s in &desired.services {
        note(
            format!("Service {}", s.name_any()),
            ssa(&Api::namespaced(client.clone(), &ns), s).await,
        );
    }
    for s in &desired.stateful_sets {
        note(
            format!("StatefulSet {}", s.name_any()),
            ssa(&sts_api, s).await,
        );
    }
    for (sts, replicas, size) in &expansions {
        match expand_claims(ctx, &ns, sts, *replicas, size).await {
            Ok(Some(why)) => volume_refusals.push(format!("{sts}: {why}")),
            Ok(None) => {}
            Err(e) => note(format!("volumes of {sts}"), Err(e)),
        }
    }
    let pdb_api: Api<PodDisruptionBudget> = Api::namespaced(client.clone(), &ns);
    note(
        "PodDisruptionBudget".into(),
        ssa(&pdb_api, &desired.pdb).await,
    );
    note(
        "superseded PodDisruptionBudgets".into(),
        remove_stale_pdbs(&pdb_api, &bctx).await,
    );
    note(
        "NetworkPolicy".into(),
        ssa(
            &Api::namespaced(client.clone(), &ns),
            &desired.network_policy,
        )
        .await,
    );
    // Pools removed from the spec keep running (their nodes hold data) and are reported.
    let removed = match removed_pools(&sts_api, &bctx, &desired).await {
        Ok(r) => r,
        Err(e) => {
            note("StatefulSets of removed pools".into(), Err(e));
            Vec::new()
        }
    };

    // Status from what exists now.
    let mut zones: BTreeMap<String, ZoneStatus> = BTreeMap::new();
    let mut all_ready = true;
    for zone in &sc.spec.zones {
        let z = zones
            .entry(zone.name.clone())
            .or_insert_with(|| ZoneStatus {
                name: zone.name.clone(),
                ..Default::default()
            });
        for pool in &zone.pools {
            let name = bctx.pool_name(&zone.name, &pool.name);
            let cur = sts_api.get_opt(&name).await?;
            let want = cur
                .as_ref()
                .and_then(|s| s.spec.replicas)
                .unwrap_or(pool.replicas);
            let ready = cur
                .as_ref()
                .and_then(|s| s.status.as_ref())
                .and_then(|s| s.ready_replicas)
                .unwrap_or(0);
            z.nodes += want;
            z.ready_nodes += ready;
            all_ready &= ready >= want;
        }
    }
    let gen_ = sc.metadata.generation;
    let mut conds = sc
        .status
        .as_ref()
        .map(|s| s.conditions.clone())
        .unwrap_or_default();
    let total: i32 = zones.values().map(|z| z.nodes).sum();
    let ready: i32 = zones.values().map(|z| z.ready_nodes).sum();
    if let Some(why) = &catalog_missing {
        if !conds
            .iter()
            .any(|c| c.type_ == "Ready" && c.reason == "CatalogSecretMissing")
        {
            ctx.event(sc, true, "CatalogSecretMissing", why.clone())
                .await;
        }
        conditions::set(
            &mut conds,
            "Ready",
            false,
            "CatalogSecretMissing",
            format!("{why} ({ready}/{total} storage nodes ready)"),
            gen_,
        );
        conditions::set(
            &mut conds,
            "Progressing",
            false,
            "CatalogSecretMissing",
            "waiting for the catalog Secret",
            gen_,
        );
    } else if all_ready {
        conditions::set(
            &mut conds,
            "Ready",
            true,
            "AllPoolsReady",
            format!("{ready}/{total} storage nodes ready"),
            gen_,
        );
        conditions::set(
            &mut conds,
            "Progressing",
            false,
            "Stable",
            "all pools at their desired size",
            gen_,
        );
    } else {
        conditions::set(
            &mut conds,
            "Ready",
            false,
            "NodesNotReady",
            format!("{ready}/{total} storage nodes ready"),
            gen_,
        );
        conditions::set(
            &mut conds,
            "Progressing",
            true,
            "RollingOut",
            "waiting for storage nodes to become ready",
            gen_,
        );
    }
    // Replication health as the storage nodes report it; unreachable nodes leave the
    // last known figures in place (the Ready condition already says nodes are down).
    let health = match super::cluster_admin(ctx, sc, &bctx).await? {
        Some(admin) => match tokio::time::timeout(HEALTH_TIMEOUT, admin.cluster_health()).await {
            Ok(Ok((layout, nodes))) => {
                Health::from_admin(&layout, &nodes, sc.spec.replication.min_in_sync)
            }
            Ok(Err(e)) => {
                tracing::debug!(error = %e, "cluster health unavailable");
                None
            }
            Err(_) => None,
        },
        None => None,
    };
    let old = sc.status.clone().unwrap_or_default();
    let (layout_version, members, under, below) = match &health {
        Some(h) => (
            Some(h.layout_version),
            Some(h.members.clone()),
            Some(h.under_replicated),
            Some(h.below_min_in_sync),
        ),
        None => (
            old.layout_version,
            old.members.clone(),
            old.under_replicated_partitions,
            old.below_min_in_sync_partitions,
        ),
    };
    // Degraded names the most urgent reason (writes that cannot be made durable, then a
    // refused request, then missing redundancy) and its message tells all of them.
    let replication = health.as_ref().and_then(|h| h.degraded(sc));
    let refusal = (!refused.is_empty()).then(|| {
        format!(
            "scale-in refused (nodes cannot be drained yet, removing them could lose data): {}",
            refused.join(", ")
        )
    });
    let old = conds
        .iter()
        .find(|c| c.type_ == "Degraded" && c.status == "True");
    let (old_reason, old_message) = match old {
        Some(c) => (Some(c.reason.clone()), c.message.clone()),
        None => (None, String::new()),
    };
    let mut parts: Vec<(u8, &'static str, String)> = Vec::new();
    if let Some((reason, msg)) = replication {
        parts.push((if reason == "BelowMinInSync" { 0 } else { 2 }, reason, msg));
    }
    if let Some(msg) = refusal.clone() {
        parts.push((1, "ScaleInRefused", msg));
    }
    if !volume_refusals.is_empty() {
        parts.push((
            1,
            "VolumeChangeRefused",
            format!(
                "volume change refused (the pools keep their volumes): {}",
                volume_refusals.join(", ")
            ),
        ));
    }
    if !failures.is_empty() {
        parts.push((
            1,
            "ApplyFailed",
            format!("not applied: {}", failures.join("; ")),
        ));
    }
    if !removed.is_empty() {
        parts.push((
            2,
            "PoolsRemoved",
            format!(
                "pools removed from the spec keep running until their nodes can be drained: {}",
                removed.join(", ")
            ),
        ));
    }
    parts.sort_by_key(|p| p.0);
    match parts.first() {
        Some((_, reason, _)) => {
            let reason = *reason;
            let msg = parts
                .iter()
                .map(|p| p.2.as_str())
                .collect::<Vec<_>>()
                .join("; ");
            if old_reason.as_deref() != Some(reason) {
                ctx.event(sc, true, reason, msg.clone()).await;
            }
            if let Some(r) = &refusal
                && reason != "ScaleInRefused"
                && !old_message.contains("scale-in refused")
            {
                ctx.event(sc, true, "ScaleInRefused", r.clone()).await;
            }
            conditions::set(&mut conds, "Degraded", true, reason, msg, gen_);
        }
        // Without fresh health a replication verdict stands; the operator's own
        // verdicts (refusals, failures, removed pools) are always fresh.
        None if health.is_some()
            || old_reason.is_none()
            || old_reason
                .as_deref()
                .is_some_and(|r| !matches!(r, "BelowMinInSync" | "UnderReplicated")) =>
        {
            conditions::set(&mut conds, "Degraded", false, "AsRequested", "", gen_);
        }
        None => {}
    }
    if !failures.is_empty() {
        conditions::set(
            &mut conds,
            "Ready",
            false,
            "ApplyFailed",
            format!("not applied: {}", failures.join("; ")),
            gen_,
        );
    }
    // ColdTierReachable, from the storage nodes' own calls to the cold tier; without a
    // cold tier in the spec the condition goes away.
    if sc.spec.cold_tier.is_none() {
        conds.retain(|c| c.type_ != "ColdTierReachable");
    } else if let Some((reason, why)) = builder::cold_tier_refused(sc) {
        conditions::set(&mut conds, "ColdTierReachable", false, reason, why, gen_);
    } else if let Some(h) = &health {
        match h.cold_tier_reachable {
            Some(true) => {
                conditions::set(&mut conds, "ColdTierReachable", true, "Reachable", "", gen_)
            }
            Some(false) => conditions::set(
                &mut conds,
                "ColdTierReachable",
                false,
                "Unreachable",
                "the storage nodes' last call to the cold tier failed: cold objects answer 503 \
                 and transitions wait (see the nodes' logs for the error)",
                gen_,
            ),
            None => conditions::set(
                &mut conds,
                "ColdTierReachable",
                false,
                "NotConfigured",
                "the storage nodes run without the cold tier yet (they pick it up when they \
                 restart with the new configuration)",
                gen_,
            ),
        }
    }
    let watch_closely = health.is_none() || conditions::is_true(&conds, "Degraded");
    let status = StorageClusterStatus {
        observed_generation: gen_,
        conditions: conds,
        zones: zones.into_values().collect(),
        layout_version,
        members,
        under_replicated_partitions: under,
        below_min_in_sync_partitions: below,
    };
    patch_status(ctx, &ns, &sc.name_any(), &status).await?;
    if !failures.is_empty() {
        return Err(Error::Apply(failures.join("; ")));
    }
    // Health changes without any Kubernetes event: look again soon while it is bad or
    // unknown.
    Ok(Action::requeue(Duration::from_secs(if !all_ready {
        10
    } else if watch_closely {
        30
    } else {
        300
    })))
}

async fn patch_status(
    ctx: &Context,
    ns: &str,
    name: &str,
    status: &StorageClusterStatus,
) -> Result<()> {
    let api: Api<StorageCluster> = Api::namespaced(ctx.client.clone(), ns);
    let body =
        json!({"apiVersion": "granary.dev/v1alpha1", "kind": "StorageCluster", "status": status});
    api.patch_status(
        name,
        &PatchParams::apply(MANAGER).force(),
        &Patch::Apply(&body),
    )
    .await?;
    Ok(())
}

/// Why the catalog Secret the cluster names cannot be used, or None.
async fn catalog_secret_problem(sc: &StorageCluster, ctx: &Context, ns: &str) -> Option<String> {
    let r = &sc.spec.catalog.postgres_secret_ref;
    let api: Api<Secret> = Api::namespaced(ctx.client.clone(), ns);
    match api.get_opt(&r.name).await {
        Ok(Some(s)) => {
            let present = s
                .data
                .as_ref()
                .and_then(|d| d.get(&r.key))
                .is_some_and(|v| !v.0.is_empty())
                || s.string_data
                    .as_ref()
                    .and_then(|d| d.get(&r.key))
                    .is_some_and(|v| !v.is_empty());
            (!present).then(|| {
                format!(
                    "the catalog Secret {ns}/{} has no key {:?} (spec.catalog.postgresSecretRef)",
                    r.name, r.key
                )
            })
        }
        Ok(None) => Some(format!(
            "the catalog Secret {ns}/{} does not exist (spec.catalog.postgresSecretRef): \
             the storage nodes cannot start without their catalog URL",
            r.name
        )),
        // Not known to be missing: a transient API error is no reason to say so.
        Err(e) => {
            tracing::warn!(error = %e, secret = %r.name, "cannot read the catalog Secret");
            None
        }
    }
}

/// What a change of a pool's `storage` means for its StatefulSet.
#[derive(Debug, PartialEq)]
pub enum VolumeChange {
    None,
    /// A larger size: the pool's claims are expanded in place to it.
    Grow(Quantity),
    /// A change no volume can make in place (a smaller size, another StorageClass).
    Refused(String),
}

fn data_template(sts: &StatefulSet) -> Option<&PersistentVolumeClaim> {
    sts.spec
        .volume_claim_templates
        .as_ref()?
        .iter()
        .find(|t| t.metadata.name.as_deref() == Some("data"))
}

fn requested_size(pvc: &PersistentVolumeClaim) -> Option<&Quantity> {
    pvc.spec
        .as_ref()?
        .resources
        .as_ref()?
        .requests
        .as_ref()?
        .get("storage")
}

/// Compares the `data` volume template of the existing StatefulSet with the desired one.
pub fn volume_change(current: &StatefulSet, desired: &StatefulSet) -> VolumeChange {
    let (Some(cur), Some(want)) = (data_template(current), data_template(desired)) else {
        return VolumeChange::None;
    };
    let class =
        |p: &PersistentVolumeClaim| p.spec.as_ref().and_then(|s| s.storage_class_name.clone());
    if class(cur) != class(want) {
        let show = |c: Option<String>| c.unwrap_or_else(|| "the default".into());
        return VolumeChange::Refused(format!(
            "storageClassName cannot change in place ({} -> {}): the claims keep their class; \
             move the data to a new pool instead",
            show(class(cur)),
            show(class(want))
        ));
    }
    let (Some(have), Some(size)) = (requested_size(cur), requested_size(want)) else {
        return VolumeChange::None;
    };
    match (quantity::to_u64(&have.0), quantity::to_u64(&size.0)) {
        (Some(h), Some(w)) if w > h => VolumeChange::Grow(size.clone()),
        (Some(h), Some(w)) if w < h => VolumeChange::Refused(format!(
            "storage.size cannot shrink ({} -> {}): volumes are never shrunk",
            have.0, size.0
        )),
        _ => VolumeChange::None,
    }
}

/// The API server refuses any change to `volumeClaimTemplates`: what is applied keeps the
/// existing template's size and class (claims are expanded by [`expand_claims`]).
fn keep_volume_templates(current: &StatefulSet, desired: &mut StatefulSet) {
    let Some(cur) = data_template(current).and_then(|t| t.spec.clone()) else {
        return;
    };
    if let Some(t) = desired.spec.volume_claim_templates.as_mut().and_then(|ts| {
        ts.iter_mut()
            .find(|t| t.metadata.name.as_deref() == Some("data"))
    }) && let Some(spec) = t.spec.as_mut()
    {
        spec.resources = cur.resources;
        spec.storage_class_name = cur.storage_class_name;
    }
}

/// Expands the bound `data` claims of StatefulSet `sts` (ordinals below `replicas`) to
/// `size` where they are smaller, as Rook and CloudNativePG do (the storage driver grows
/// the volume, the kubelet the file system). Returns why it cannot, when a
/// claim's StorageClass does not allow expansion (nothing is changed then).
async fn expand_claims(
    ctx: &Context,
    ns: &str,
    sts: &str,
    replicas: i32,
    size: &Quantity,
) -> Result<Option<String>> {
    let want = quantity::to_u64(&size.0).unwrap_or(0);
    let pvcs: Api<PersistentVolumeClaim> = Api::namespaced(ctx.client.clone(), ns);
    let classes: Api<StorageClass> = Api::all(ctx.client.clone());
    let mut small = Vec::new();
    for i in 0..replicas {
        let name = format!("data-{sts}-{i}");
        let Some(pvc) = pvcs.get_opt(&name).await? else {
            continue; // created later from the template, expanded on a later pass
        };
        // Only a bound claim can be resized (the API server refuses the others); one
        // that binds later is expanded on a later pass.
        let bound = pvc.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Bound");
        if bound
            && requested_size(&pvc)
                .and_then(|q| quantity::to_u64(&q.0))
                .is_some_and(|have| have < want)
        {
            small.push(pvc);
        }
    }
    for pvc in &small {
        let class = pvc.spec.as_ref().and_then(|s| s.storage_class_name.clone());
        let why = match &class {
            Some(c) => match classes.get_opt(c).await? {
                Some(sc) if sc.allow_volume_expansion == Some(true) => None,
                Some(_) => Some(format!(
                    "StorageClass {c} does not allow volume expansion (allowVolumeExpansion)"
                )),
                None => Some(format!("StorageClass {c} does not exist")),
            },
            None => Some("the claim has no StorageClass".to_string()),
        };
        if let Some(why) = why {
            return Ok(Some(format!(
                "storage.size grew to {}, but {why}; the claims keep their size",
                size.0
            )));
        }
    }
    for pvc in small {
        let name = pvc.name_any();
        let patch = json!({"spec": {"resources": {"requests": {"storage": size}}}});
        pvcs.patch(&name, &PatchParams::default(), &Patch::Merge(&patch))
            .await?;
        tracing::info!(claim = %name, size = %size.0, "expanding a volume");
    }
    Ok(None)
}

/// StatefulSets this cluster owns that no pool of its spec describes any more.
async fn removed_pools(
    api: &Api<StatefulSet>,
    bctx: &builder::Context,
    desired: &Desired,
) -> Result<Vec<String>> {
    let labels = crate::build::cluster_labels(&bctx.name)
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join(",");
    let wanted: Vec<String> = desired.stateful_sets.iter().map(|s| s.name_any()).collect();
    Ok(api
        .list(&ListParams::default().labels(&labels))
        .await?
        .into_iter()
        .filter(|s| {
            s.metadata
                .owner_references
                .iter()
                .flatten()
                .any(|o| o.uid == bctx.uid)
                && !wanted.contains(&s.name_any())
        })
        .map(|s| format!("{} ({} nodes)", s.name_any(), s.spec.replicas.unwrap_or(0)))
        .collect())
}

async fn set_failed_status(sc: &StorageCluster, ctx: &Context, e: &Error) -> Result<()> {
    let ns = sc.namespace().unwrap_or_default();
    let mut status = sc.status.clone().unwrap_or_default();
    conditions::set(
        &mut status.conditions,
        "Ready",
        false,
        "ReconcileFailed",
        e.to_string(),
        sc.metadata.generation,
    );
    patch_status(ctx, &ns, &sc.name_any(), &status).await
}

/// Earlier versions applied one budget per pool. A pod matched by two budgets cannot be
/// evicted at all, so any other budget this cluster owns goes once the cluster-wide one
/// is in place. Budgets it does not own are never touched.
async fn remove_stale_pdbs(api: &Api<PodDisruptionBudget>, bctx: &builder::Context) -> Result<()> {
    let labels = crate::build::cluster_labels(&bctx.name)
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join(",");
    let keep = bctx.pdb_name();
    for old in api.list(&ListParams::default().labels(&labels)).await? {
        let owned = old
            .metadata
            .owner_references
            .iter()
            .flatten()
            .any(|o| o.uid == bctx.uid);
        let name = old.metadata.name.unwrap_or_default();
        if owned && name != keep {
            tracing::info!(pdb = %name, "removing a superseded PodDisruptionBudget");
            api.delete(&name, &Default::default()).await?;
        }
    }
    Ok(())
}

/// How long a reconcile waits for a node to report the cluster's health.
const HEALTH_TIMEOUT: Duration = Duration::from_secs(3);

/// The cluster's replication health, from one node's `/admin/v1/layout` and `/nodes`.
#[derive(Clone, Debug, PartialEq)]
pub struct Health {
    pub layout_version: i64,
    pub members: MemberCounts,
    pub under_replicated: i64,
    pub below_min_in_sync: i64,
    /// Whether the answering node's last call to the cold tier succeeded (None: it has
    /// no cold tier).
    pub cold_tier_reachable: Option<bool>,
}

impl Health {
    /// None when the answers do not have the documented shape.
    pub fn from_admin(
        layout: &serde_json::Value,
        nodes: &serde_json::Value,
        min_in_sync: i32,
    ) -> Option<Self> {
        let by_count = layout["partitionsByReplicaCount"].as_array()?;
        let below = by_count
            .iter()
            .take(min_in_sync.max(0) as usize)
            .map(|c| c.as_i64().unwrap_or(0))
            .sum();
        let count = |k: &str| nodes[k].as_i64().map(|n| n as i32);
        Some(Self {
            layout_version: layout["version"].as_i64()?,
            members: MemberCounts {
                alive: count("alive")?,
                suspected: count("suspected")?,
                failed: count("failed")?,
            },
            under_replicated: layout["underReplicatedPartitions"].as_i64()?,
            below_min_in_sync: below,
            cold_tier_reachable: nodes["coldTier"]["reachable"].as_bool(),
        })
    }

    /// The Degraded reason and message, if any.
    pub fn degraded(&self, sc: &StorageCluster) -> Option<(&'static str, String)> {
        let r = &sc.spec.replication;
        let m = &self.members;
        let nodes = format!(
            "{} node(s) alive, {} suspected, {} failed",
            m.alive, m.suspected, m.failed
        );
        if self.below_min_in_sync > 0 {
            Some((
                "BelowMinInSync",
                format!(
                    "{} of {} partitions have fewer than minInSync={} replicas; writes to them \
                     cannot be acknowledged durably ({nodes})",
                    self.below_min_in_sync, sc.spec.partitions, r.min_in_sync
                ),
            ))
        } else if self.under_replicated > 0 {
            Some((
                "UnderReplicated",
                format!(
                    "{} of {} partitions have fewer than {} replicas ({nodes})",
                    self.under_replicated, sc.spec.partitions, r.factor
                ),
            ))
        } else {
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cluster(factor: i32, min_in_sync: i32) -> StorageCluster {
        let mut sc: StorageCluster =
            serde_yaml::from_str(include_str!("../../../examples/storagecluster.yaml")).unwrap();
        sc.spec.replication.factor = factor;
        sc.spec.replication.min_in_sync = min_in_sync;
        sc
    }

    fn sts(size: &str, class: Option<&str>) -> StatefulSet {
        let mut sc = cluster(3, 2);
        let pool = &mut sc.spec.zones[0].pools[0];
        pool.storage.size = Quantity(size.into());
        pool.storage.storage_class_name = class.map(Into::into);
        let b = builder::Context::of(&sc, "granary-system");
        builder::build(&sc, &b).stateful_sets.remove(0)
    }

    /// A `file://` cold tier reaches a single storage pod only: on several pods each
    /// would have its own directory, and cold objects would be unreadable after a
    /// failover, so the nodes run without it and the spec says why.
    #[test]
    fn a_local_cold_tier_is_refused_on_a_cluster_of_several_pods() {
        let mut sc = cluster(1, 1);
        sc.spec.cold_tier = Some(crate::crd::ColdTier {
            url: "file:///var/lib/granary/cold".into(),
            secret_ref: None,
        });
        let b = builder::Context::of(&sc, "granary-system");
        let toml_of = |sc: &StorageCluster| {
            builder::build(sc, &b).config.data.as_ref().unwrap()["node.toml"].clone()
        };
        assert!(builder::cold_tier_refused(&sc).is_some());
        assert!(!toml_of(&sc).contains("cold_tier"), "{}", toml_of(&sc));
        // The explicit variable (it wins over a key of the credentials Secret) says "none".
        let cold_env = |sc: &StorageCluster| builder::build(sc, &b).node_env("GRANARY_COLD_TIER");
        assert_eq!(cold_env(&sc).as_deref(), Some(""));
        sc.spec.zones.truncate(1);
        sc.spec.zones[0].pools.truncate(1);
        sc.spec.zones[0].pools[0].replicas = 1;
        assert_eq!(builder::cold_tier_refused(&sc), None);
        assert!(toml_of(&sc).contains("cold_tier = \"file:///var/lib/granary/cold/"));
        assert_eq!(
            cold_env(&sc),
            Some(format!(
                "file:///var/lib/granary/cold/{}/{}",
                b.namespace, b.name
            ))
        );
        // An object store is fine whatever the size.
        let mut big = cluster(3, 2);
        big.spec.cold_tier = Some(crate::crd::ColdTier {
            url: "s3://archive".into(),
            secret_ref: None,
        });
        assert_eq!(builder::cold_tier_refused(&big), None);
        // The URL as the node would see it: control characters removed, any case.
        for url in ["\u{1}file:///x", "FILE:///x", " file:/x", "file:///x?a=b"] {
            big.spec.cold_tier.as_mut().unwrap().url = url.into();
            assert!(builder::cold_tier_refused(&big).is_some(), "{url:?}");
        }
        // Never in memory, whatever the size.
        sc.spec.cold_tier.as_mut().unwrap().url = "memory:///".into();
        assert_eq!(
            builder::cold_tier_refused(&sc).map(|r| r.0),
            Some("InMemoryStore")
        );
    }

    #[test]
    fn a_cold_tier_reaches_the_node_config_and_its_secret_the_environment() {
        let mut sc = cluster(3, 2);
        let b = builder::Context::of(&sc, "granary-system");
        let plain = builder::build(&sc, &b);
        assert!(!plain.config.data.as_ref().unwrap()["node.toml"].contains("cold_tier"));
        assert!(plain.node_container().unwrap().env_from.is_none());
        sc.spec.cold_tier = Some(crate::crd::ColdTier {
            url: "s3://archive/\"granary\"\n".into(),
            secret_ref: Some(crate::crd::SecretRef {
                name: "cold-creds".into(),
            }),
        });
        let d = builder::build(&sc, &b);
        let toml_text = &d.config.data.as_ref().unwrap()["node.toml"];
        let parsed: toml::Value =
            toml::from_str(toml_text).expect("the node config stays valid TOML");
        assert_eq!(
            parsed["cold_tier"].as_str(),
            Some(format!("s3://archive/\"granary\"/{}/{}", b.namespace, b.name).as_str()),
            "the URL, with the cluster's own prefix"
        );
        let c = &d.stateful_sets[0]
            .spec
            .template
            .spec
            .as_ref()
            .unwrap()
            .containers[0];
        let from = c
            .env_from
            .as_ref()
            .expect("env from the cold tier's Secret");
        assert_eq!(
            from[0].secret_ref.as_ref().map(|r| r.name.as_str()),
            Some("cold-creds")
        );
        // Under the node's credential prefix: no key of that Secret can set another of
        // the node's variables.
        assert_eq!(
            from[0].prefix.as_deref(),
            Some(builder::COLD_CREDENTIAL_ENV_PREFIX)
        );
        assert_ne!(
            plain.config.data, d.config.data,
            "the config digest changes, so the pods roll to pick the cold tier up"
        );
    }

    #[test]
    fn volume_changes_grow_in_place_and_refuse_shrinking_or_another_class() {
        let cur = sts("500Gi", Some("nvme"));
        assert_eq!(
            volume_change(&cur, &sts("500Gi", Some("nvme"))),
            VolumeChange::None
        );
        assert_eq!(
            volume_change(&cur, &sts("536870912000", Some("nvme"))),
            VolumeChange::None,
            "the same size written differently"
        );
        assert_eq!(
            volume_change(&cur, &sts("600Gi", Some("nvme"))),
            VolumeChange::Grow(Quantity("600Gi".into()))
        );
        let VolumeChange::Refused(why) = volume_change(&cur, &sts("400Gi", Some("nvme"))) else {
            panic!("shrinking must be refused")
        };
        assert!(why.contains("cannot shrink (500Gi -> 400Gi)"), "{why}");
        let VolumeChange::Refused(why) = volume_change(&cur, &sts("600Gi", None)) else {
            panic!("another class must be refused")
        };
        assert!(why.contains("nvme -> the default"), "{why}");
        // What is applied keeps the existing template (the API server refuses changes).
        let mut want = sts("600Gi", None);
        keep_volume_templates(&cur, &mut want);
        assert_eq!(data_template(&want), data_template(&cur));
    }

    #[test]
    fn health_counts_partitions_below_min_in_sync_from_the_replica_histogram() {
        let layout = json!({"version": 4, "underReplicatedPartitions": 30,
                            "partitionsByReplicaCount": [0, 10, 20, 994]});
        let nodes = json!({"alive": 5, "suspected": 0, "failed": 1});
        let h = Health::from_admin(&layout, &nodes, 2).unwrap();
        assert_eq!(h.below_min_in_sync, 10);
        assert_eq!(h.cold_tier_reachable, None);
        let cold = json!({"alive": 5, "suspected": 0, "failed": 1,
                          "coldTier": {"url": "s3://b/p", "reachable": false}});
        assert_eq!(
            Health::from_admin(&layout, &cold, 2)
                .unwrap()
                .cold_tier_reachable,
            Some(false)
        );
        assert_eq!(h.under_replicated, 30);
        assert_eq!(h.members.failed, 1);
        let (reason, msg) = h.degraded(&cluster(3, 2)).unwrap();
        assert_eq!(reason, "BelowMinInSync");
        assert!(msg.contains("10 of") && msg.contains("1 failed"), "{msg}");
        let h = Health::from_admin(&layout, &nodes, 1).unwrap();
        assert_eq!(h.below_min_in_sync, 0);
        assert_eq!(h.degraded(&cluster(3, 1)).unwrap().0, "UnderReplicated");
        let healthy = json!({"version": 4, "underReplicatedPartitions": 0,
                             "partitionsByReplicaCount": [0, 0, 0, 1024]});
        let h = Health::from_admin(&healthy, &nodes, 2).unwrap();
        assert_eq!(h.degraded(&cluster(3, 2)), None);
        assert_eq!(
            Health::from_admin(&json!({}), &nodes, 2),
            None,
            "wrong shape"
        );
    }
}
