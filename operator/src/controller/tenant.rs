//! Tenant reconciler: check the cluster reference and the namespace policy, register
//! the tenant with the storage nodes' admin API, write the credentials Secret into the
//! tenant's namespace, report status; a finalizer honours `deletionPolicy`.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::{Namespace, Secret};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::api::{Patch, PatchParams};
use kube::runtime::controller::Action;
use kube::runtime::finalizer::{Event as Finalizer, finalizer};
use kube::{Api, Resource, ResourceExt};
use serde_json::{Value, json};

use super::{Context, MANAGER};
use crate::admin_client::AdminClient;
use crate::build::cluster::Context as BuildContext;
use crate::crd::{
    DeletionPolicy, Quotas, StorageCluster, Tenant, TenantEndpoints, TenantStatus, Usage,
};
use crate::error::{Error, Result};
use crate::{conditions, quantity, selector};

pub const FINALIZER: &str = "granary.dev/tenant-cleanup";
/// Overrides of the in-cluster addresses (`http://<cluster>-internal.<ns>.svc:9200`,
/// `-s3`, `-kv`), for clusters reached from outside the Kubernetes network.
pub const ANNOTATION_ADMIN: &str = "granary.dev/admin-endpoint";
pub const ANNOTATION_S3: &str = "granary.dev/s3-endpoint";
pub const ANNOTATION_KV: &str = "granary.dev/kv-endpoint";
/// Key id recorded on the credentials Secret, to revoke it on deletion.
const ACCESS_KEY_ID: &str = "AWS_ACCESS_KEY_ID";

/// The tenant's name on the storage nodes: unique per (namespace, name).
pub fn node_tenant_name(t: &Tenant) -> String {
    let n = format!("{}.{}", t.namespace().unwrap_or_default(), t.name_any());
    n.chars().take(128).collect()
}

/// The tenant settings sent to the admin API (its JSON shape, docs/admin-api.md).
pub fn admin_spec(t: &Tenant) -> Result<Value> {
    let s = &t.spec;
    let bytes = |q: &Option<k8s_openapi::apimachinery::pkg::api::resource::Quantity>,
                 what: &str|
     -> Result<Option<u64>> {
        q.as_ref()
            .map(|q| {
                quantity::to_u64(&q.0).ok_or_else(|| {
                    Error::Invalid(format!("{what}: {:?} is not a valid quantity", q.0))
                })
            })
            .transpose()
    };
    let cold_after = s
        .tiering
        .as_ref()
        .and_then(|t| t.cold_after.as_deref())
        .map(|d| {
            parse_duration_secs(d)
                .ok_or_else(|| Error::Invalid(format!("tiering.coldAfter: bad duration {d:?}")))
        })
        .transpose()?;
    let mut tiering = json!({
        "coldAfterSeconds": cold_after,
        "minObjectSize": bytes(&s.tiering.as_ref().and_then(|t| t.min_object_size.clone()), "tiering.minObjectSize")?,
    });
    // Only when set: a node from before these fields refuses them.
    if let Some(t) = &s.tiering {
        if let Some(n) = t.restore_after_reads {
            tiering["restoreAfterReads"] = json!(n);
        }
        if let Some(b) = t.buckets.as_ref().filter(|b| !b.is_empty()) {
            tiering["buckets"] = json!(b);
        }
        if let Some(p) = t.prefix.as_ref().filter(|p| !p.is_empty()) {
            tiering["prefix"] = json!(p);
        }
    }
    Ok(json!({
        "quotas": {
            "storageBytes": bytes(&s.quotas.storage, "quotas.storage")?,
            "objects": s.quotas.objects,
            "buckets": s.quotas.buckets,
            "kvKeys": s.quotas.kv_keys,
        },
        "qos": {
            "weight": s.qos.weight,
            "requestsPerSecond": s.qos.requests_per_second,
            "bandwidthBytesPerSecond": bytes(&s.qos.bandwidth, "qos.bandwidth")?,
            "maxConcurrentRequests": s.qos.max_concurrent_requests,
        },
        "placement": {"zones": s.placement.zones, "replicationFactor": s.placement.replication_factor},
        "tiering": tiering,
    }))
}

/// Go-style durations (`720h`, `1h30m`, `90s`) in whole seconds.
pub fn parse_duration_secs(d: &str) -> Option<u64> {
    let mut total = 0f64;
    let mut num = String::new();
    let mut chars = d.chars().peekable();
    let mut any = false;
    while let Some(c) = chars.next() {
        if c.is_ascii_digit() || c == '.' {
            num.push(c);
            continue;
        }
        let mut unit = c.to_string();
        if (c == 'm' || c == 'u' || c == 'n') && chars.peek() == Some(&'s') {
            unit.push('s');
            chars.next();
        }
        let v: f64 = num.parse().ok()?;
        num.clear();
        total += v * match unit.as_str() {
            "h" => 3600.0,
            "m" => 60.0,
            "s" => 1.0,
            "ms" => 1e-3,
            "us" => 1e-6,
            "ns" => 1e-9,
            _ => return None,
        };
        any = true;
    }
    (any && num.is_empty()).then_some(total as u64)
}

pub async fn reconcile(t: Arc<Tenant>, ctx: Arc<Context>) -> Result<Action> {
    let started = Instant::now();
    let ns = t
        .namespace()
        .ok_or_else(|| Error::Invalid("Tenant must be namespaced".into()))?;
    let api: Api<Tenant> = Api::namespaced(ctx.client.clone(), &ns);
    let r = finalizer(&api, FINALIZER, t.clone(), |ev| async {
        match ev {
            Finalizer::Apply(t) => apply(&t, &ctx).await,
            Finalizer::Cleanup(t) => cleanup(&t, &ctx).await,
        }
    })
    .await
    .map_err(|e| match e {
        kube::runtime::finalizer::Error::ApplyFailed(e)
        | kube::runtime::finalizer::Error::CleanupFailed(e) => e,
        other => Error::Finalizer(other.to_string()),
    });
    ctx.metrics.observe_result("tenant", &r, started);
    if r.is_ok() {
        ctx.failures.record(t.as_ref(), true);
    }
    if let Err(e) = &r {
        ctx.event(t.as_ref(), true, "ReconcileFailed", e.to_string())
            .await;
        let mut status = t.status.clone().unwrap_or_default();
        conditions::set(
            &mut status.conditions,
            "Ready",
            false,
            "ReconcileFailed",
            e.to_string(),
            t.metadata.generation,
        );
        let _ = patch_status(&ctx, &t, status).await;
    }
    r
}

async fn patch_status(ctx: &Context, t: &Tenant, status: TenantStatus) -> Result<()> {
    let api: Api<Tenant> = Api::namespaced(ctx.client.clone(), &t.namespace().unwrap_or_default());
    let body = json!({"apiVersion": "granary.dev/v1alpha1", "kind": "Tenant", "status": status});
    api.patch_status(
        &t.name_any(),
        &PatchParams::apply(MANAGER).force(),
        &Patch::Apply(&body),
    )
    .await?;
    Ok(())
}

/// What the tenant's cluster offers it: admin client and public endpoints.
struct ClusterAccess {
    admin: AdminClient,
    s3: String,
    kv: String,
    region: String,
    /// Why the cluster is not Ready (its Ready condition's reason and message), if so.
    cluster_not_ready: Option<String>,
}

/// Why a Tenant cannot be served: a user-visible refusal (a condition, nothing created).
struct Refusal {
    reason: &'static str,
    message: String,
    /// When the namespace lost its permission: the cluster's admin client, to suspend
    /// what was registered before.
    suspend_with: Option<AdminClient>,
}

impl From<(&'static str, String)> for Refusal {
    fn from((reason, message): (&'static str, String)) -> Self {
        Self {
            reason,
            message,
            suspend_with: None,
        }
    }
}

/// Resolves the cluster and checks the namespace policy.
async fn access(t: &Tenant, ctx: &Context) -> Result<Result<ClusterAccess, Refusal>> {
    let r = &t.spec.cluster_ref;
    let clusters: Api<StorageCluster> = Api::namespaced(ctx.client.clone(), &r.namespace);
    let Some(sc) = clusters.get_opt(&r.name).await? else {
        return Ok(Err((
            "ClusterNotFound",
            format!("StorageCluster {}/{} does not exist", r.namespace, r.name),
        )
            .into()));
    };
    let tns = t.namespace().unwrap_or_default();
    let allowed = match sc.spec.tenants.as_ref() {
        None => tns == r.namespace,
        Some(p) => {
            let ns = Api::<Namespace>::all(ctx.client.clone()).get(&tns).await?;
            selector::matches(&p.namespace_selector, &ns.labels().clone())
        }
    };
    let b = BuildContext::of(&sc, &ctx.operator_namespace);
    if !allowed {
        return Ok(Err(Refusal {
            reason: "NamespaceNotAllowed",
            message: format!(
                "namespace {tns:?} is not selected by StorageCluster {}/{} spec.tenants.namespaceSelector",
                r.namespace, r.name
            ),
            suspend_with: super::cluster_admin(ctx, &sc, &b).await?,
        }));
    }
    let Some(admin) = super::cluster_admin(ctx, &sc, &b).await? else {
        return Ok(Err((
            "ClusterNotReady",
            format!(
                "the admin token Secret {} does not exist yet",
                b.admin_token_secret()
            ),
        )
            .into()));
    };
    let (s3, kv) = client_endpoints(&sc, &b);
    Ok(Ok(ClusterAccess {
        admin,
        s3,
        kv,
        region: sc.spec.region.clone(),
        cluster_not_ready: cluster_not_ready(&sc),
    }))
}

/// The S3 and KV endpoints a cluster's tenants use: its client Services, or the
/// `granary.dev/{s3,kv}-endpoint` annotations.
pub fn client_endpoints(sc: &StorageCluster, b: &BuildContext) -> (String, String) {
    let ann = sc.annotations();
    (
        ann.get(ANNOTATION_S3)
            .cloned()
            .unwrap_or_else(|| format!("http://{}-s3.{}.svc:9000", b.name, b.namespace)),
        ann.get(ANNOTATION_KV)
            .cloned()
            .unwrap_or_else(|| format!("http://{}-kv.{}.svc:9100", b.name, b.namespace)),
    )
}

/// Why a StorageCluster is not Ready, or None when its Ready condition is True.
fn cluster_not_ready(sc: &StorageCluster) -> Option<String> {
    let ready = sc
        .status
        .as_ref()
        .and_then(|s| s.conditions.iter().find(|c| c.type_ == "Ready"));
    let name = format!(
        "StorageCluster {}/{}",
        sc.namespace().unwrap_or_default(),
        sc.name_any()
    );
    match ready {
        Some(c) if c.status == "True" => None,
        Some(c) => Some(format!("{name} is not Ready ({}: {})", c.reason, c.message)),
        None => Some(format!("{name} has not reported its state yet")),
    }
}

/// Whether `s` was created for Tenant `t` (it is the Secret's controlling owner).
fn owned_by(s: &Secret, t: &Tenant) -> bool {
    let uid = t.meta().uid.as_deref();
    s.metadata
        .owner_references
        .iter()
        .flatten()
        .any(|o| o.controller == Some(true) && Some(o.uid.as_str()) == uid)
}

/// Reports why the Tenant is not served (Ready and Progressing False, a Warning event
/// when the reason is new) and looks again in 30 s.
async fn refuse(
    t: &Tenant,
    ctx: &Context,
    mut status: TenantStatus,
    reason: &'static str,
    msg: String,
) -> Result<Action> {
    let gen_ = t.metadata.generation;
    if !status.conditions.iter().any(|c| c.reason == reason) {
        ctx.event(t, true, reason, msg.clone()).await;
    }
    conditions::set(&mut status.conditions, "Ready", false, reason, msg, gen_);
    conditions::set(
        &mut status.conditions,
        "Progressing",
        false,
        reason,
        "",
        gen_,
    );
    patch_status(ctx, t, status).await?;
    Ok(Action::requeue(Duration::from_secs(30)))
}

async fn apply(t: &Tenant, ctx: &Context) -> Result<Action> {
    let gen_ = t.metadata.generation;
    let mut status = t.status.clone().unwrap_or_default();
    status.observed_generation = gen_;
    let access = match access(t, ctx).await? {
        Ok(a) => a,
        Err(Refusal {
            reason,
            message: mut msg,
            suspend_with,
        }) => {
            // A namespace that lost its permission keeps its data, but its keys stop
            // working until the permission is back (the next reconcile then registers
            // the tenant unsuspended).
            if let Some(admin) = suspend_with
                && admin.suspend_tenant(&node_tenant_name(t)).await?
            {
                msg.push_str(
                    "; the tenant is suspended: its access keys are refused, its data is kept",
                );
            }
            return refuse(t, ctx, status, reason, msg).await;
        }
    };
    // The credentials Secret is this Tenant's alone: one that exists and was not created
    // for it (another Tenant's, or anything a user keeps there) is never written over,
    // nor deleted with the Tenant.
    let ns = t.namespace().unwrap_or_default();
    let secrets: Api<Secret> = Api::namespaced(ctx.client.clone(), &ns);
    let existing = secrets.get_opt(&t.spec.credentials_secret).await?;
    if let Some(s) = &existing
        && !owned_by(s, t)
    {
        let msg = format!(
            "Secret {ns}/{} exists and was not created for this Tenant; the operator does \
             not write over it: delete it or name another spec.credentialsSecret",
            t.spec.credentials_secret
        );
        return refuse(t, ctx, status, "SecretConflict", msg).await;
    }
    let name = node_tenant_name(t);
    access.admin.upsert_tenant(&name, &admin_spec(t)?).await?;

    // Credentials: keep the key in the Secret while it is live; otherwise issue one.
    let get = |s: &Option<Secret>, k: &str| {
        s.as_ref()
            .and_then(|s| s.data.as_ref())
            .and_then(|d| d.get(k))
            .map(|v| String::from_utf8_lossy(&v.0).to_string())
    };
    let (ak, sk) = match (
        get(&existing, ACCESS_KEY_ID),
        get(&existing, "AWS_SECRET_ACCESS_KEY"),
    ) {
        (Some(ak), Some(sk)) if access.admin.key_is_live(&name, &ak).await? => (ak, sk),
        _ => {
            let (ak, sk) = access
                .admin
                .create_key(&name, &format!("Tenant {ns}/{}", t.name_any()))
                .await?;
            ctx.event(
                t,
                false,
                "CredentialsIssued",
                format!(
                    "issued access key {ak} into Secret {}",
                    t.spec.credentials_secret
                ),
            )
            .await;
            (ak, sk)
        }
    };
    let mut data = BTreeMap::new();
    let mut put = |k: &str, v: &str| {
        data.insert(k.to_string(), ByteString(v.as_bytes().to_vec()));
    };
    if t.spec.endpoints.s3 {
        put("S3_ENDPOINT", &access.s3);
    }
    if t.spec.endpoints.kv {
        put("KV_ENDPOINT", &access.kv);
    }
    put("AWS_REGION", &access.region);
    put(ACCESS_KEY_ID, &ak);
    put("AWS_SECRET_ACCESS_KEY", &sk);
    let secret = Secret {
        metadata: ObjectMeta {
            name: Some(t.spec.credentials_secret.clone()),
            namespace: Some(ns.clone()),
            labels: Some(BTreeMap::from([(
                "app.kubernetes.io/managed-by".to_string(),
                MANAGER.to_string(),
            )])),
            owner_references: t.controller_owner_ref(&()).map(|o| vec![o]),
            ..Default::default()
        },
        type_: Some("Opaque".into()),
        data: Some(data),
        ..Default::default()
    };
    secrets
        .patch(
            &t.spec.credentials_secret,
            &PatchParams::apply(MANAGER).force(),
            &Patch::Apply(&secret),
        )
        .await?;

    let u = access.admin.usage(&name).await?;
    let n = |k: &str| u[k].as_i64();
    let usage = Usage {
        storage: u["storageBytes"].as_u64().map(|b| b.to_string()),
        hot_storage: u["hotBytes"].as_u64().map(|b| b.to_string()),
        cold_storage: u["coldBytes"].as_u64().map(|b| b.to_string()),
        objects: n("objects"),
        buckets: n("buckets"),
        kv_keys: n("kvKeys"),
    };
    let excess = over_quota(&t.spec.quotas, &usage);
    let was_over = t
        .status
        .as_ref()
        .and_then(|s| s.conditions.iter().find(|c| c.type_ == "QuotaExceeded"))
        .is_some_and(|c| c.status == "True");
    status.usage = Some(usage);
    status.endpoints = Some(TenantEndpoints {
        s3: t.spec.endpoints.s3.then(|| access.s3.clone()),
        kv: t.spec.endpoints.kv.then(|| access.kv.clone()),
    });
    // Registered, but the tenant is Ready only while its cluster is: its endpoints
    // serve nothing otherwise.
    match &access.cluster_not_ready {
        None => conditions::set(
            &mut status.conditions,
            "Ready",
            true,
            "Registered",
            format!(
                "registered as {name}; credentials in Secret {}",
                t.spec.credentials_secret
            ),
            gen_,
        ),
        Some(why) => {
            if !status
                .conditions
                .iter()
                .any(|c| c.type_ == "Ready" && c.reason == "ClusterNotReady")
            {
                ctx.event(t, true, "ClusterNotReady", why.clone()).await;
            }
            conditions::set(
                &mut status.conditions,
                "Ready",
                false,
                "ClusterNotReady",
                format!("registered as {name}, but {why}"),
                gen_,
            );
        }
    }
    conditions::set(
        &mut status.conditions,
        "Progressing",
        false,
        "Registered",
        "",
        gen_,
    );
    conditions::set(
        &mut status.conditions,
        "Degraded",
        false,
        "Registered",
        "",
        gen_,
    );
    let over = !excess.is_empty();
    let (reason, msg) = if over {
        ("OverQuota", format!("over quota: {}", excess.join(", ")))
    } else {
        ("WithinQuota", "usage is within every quota".to_string())
    };
    if over && !was_over {
        ctx.event(t, true, "QuotaExceeded", msg.clone()).await;
    }
    conditions::set(
        &mut status.conditions,
        "QuotaExceeded",
        over,
        reason,
        msg,
        gen_,
    );
    patch_status(ctx, t, status).await?;
    // Usage is polled; a minute is fresh enough for a status field. The cluster's
    // readiness is looked at again sooner while it is not Ready.
    // Changes of the cluster (its readiness, its namespace selector) trigger a reconcile
    // through the StorageCluster watch.
    Ok(Action::requeue(Duration::from_secs(60)))
}

/// What is over its quota, in words (`objects 3 > 2`); empty when usage is within every
/// quota (a quota is a maximum: usage equal to it is within).
fn over_quota(q: &Quotas, u: &Usage) -> Vec<String> {
    let mut out = Vec::new();
    let limit = q.storage.as_ref().and_then(|s| quantity::to_u64(&s.0));
    let used = u.storage.as_deref().and_then(|s| s.parse::<u64>().ok());
    if let (Some(limit), Some(used)) = (limit, used)
        && used > limit
    {
        out.push(format!("storage {used} bytes > {limit}"));
    }
    for (what, limit, used) in [
        ("objects", q.objects, u.objects),
        ("buckets", q.buckets, u.buckets),
        ("kvKeys", q.kv_keys, u.kv_keys),
    ] {
        if let (Some(limit), Some(used)) = (limit, used)
            && used > limit
        {
            out.push(format!("{what} {used} > {limit}"));
        }
    }
    out
}

/// Deletion: `Delete` removes the tenant and all its data from the cluster; `Retain`
/// keeps the data and only revokes the key this Tenant was given.
async fn cleanup(t: &Tenant, ctx: &Context) -> Result<Action> {
    let admin = match access(t, ctx).await? {
        Ok(a) => a.admin,
        // A namespace that lost its permission: what was registered is still cleaned up
        // (else a later Tenant of the same name would inherit the data and keys).
        Err(Refusal {
            suspend_with: Some(admin),
            ..
        }) => admin,
        // The cluster is gone: nothing is left to clean up.
        Err(Refusal {
            reason: "ClusterNotFound",
            ..
        }) => return Ok(Action::await_change()),
        // The cluster cannot be reached yet: keep the finalizer and retry.
        Err(r) => {
            return Err(Error::Admin(format!(
                "cannot clean up the tenant yet: {}",
                r.message
            )));
        }
    };
    let name = node_tenant_name(t);
    match t.spec.deletion_policy {
        DeletionPolicy::Delete => {
            admin.delete_tenant(&name, true).await?;
            ctx.event(
                t,
                false,
                "TenantDeleted",
                format!("deleted tenant {name} and all its data"),
            )
            .await;
        }
        DeletionPolicy::Retain => {
            let secrets: Api<Secret> =
                Api::namespaced(ctx.client.clone(), &t.namespace().unwrap_or_default());
            if let Some(ak) = secrets
                .get_opt(&t.spec.credentials_secret)
                .await?
                .filter(|s| owned_by(s, t))
                .and_then(|s| s.data)
                .and_then(|d| d.get(ACCESS_KEY_ID).cloned())
            {
                admin
                    .revoke_key(&name, &String::from_utf8_lossy(&ak.0))
                    .await?;
            }
            ctx.event(
                t,
                false,
                "TenantRetained",
                format!("kept tenant {name} and its data (deletionPolicy Retain)"),
            )
            .await;
        }
    }
    Ok(Action::await_change())
}

#[cfg(test)]
mod tests {
    use k8s_openapi::apimachinery::pkg::api::resource::Quantity;

    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration_secs("720h"), Some(720 * 3600));
        assert_eq!(parse_duration_secs("1h30m"), Some(5400));
        assert_eq!(parse_duration_secs("90s"), Some(90));
        assert_eq!(parse_duration_secs("1500ms"), Some(1));
        assert_eq!(parse_duration_secs("10"), None);
        assert_eq!(parse_duration_secs("5d"), None);
    }

    #[test]
    fn quota_excess_is_named_and_equal_usage_is_within() {
        let q = Quotas {
            storage: Some(Quantity("1Ki".into())),
            objects: Some(2),
            buckets: None,
            kv_keys: Some(0),
        };
        let mut u = Usage {
            storage: Some("1024".into()),
            objects: Some(2),
            buckets: Some(50),
            kv_keys: Some(0),
            ..Default::default()
        };
        assert!(over_quota(&q, &u).is_empty());
        u.storage = Some("1025".into());
        u.objects = Some(3);
        u.kv_keys = Some(1);
        assert_eq!(
            over_quota(&q, &u),
            ["storage 1025 bytes > 1024", "objects 3 > 2", "kvKeys 1 > 0"]
        );
        assert!(
            over_quota(&Quotas::default(), &u).is_empty(),
            "no quota, no excess"
        );
    }

    #[test]
    fn admin_spec_converts_quantities() {
        let text = std::fs::read_to_string(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../examples/tenants.yaml"
        ))
        .unwrap();
        let first = text.split("---").next().unwrap();
        let t: Tenant = serde_yaml::from_str(first).unwrap();
        let v = admin_spec(&t).unwrap();
        assert_eq!(v["quotas"]["storageBytes"], 2u64 * 1024u64.pow(4));
        assert_eq!(v["qos"]["bandwidthBytesPerSecond"], 400u64 * 1024 * 1024);
        assert_eq!(v["tiering"]["coldAfterSeconds"], 720 * 3600);
        assert_eq!(v["tiering"]["restoreAfterReads"], 3);
        assert_eq!(v["tiering"]["buckets"], json!(["events"]));
        assert_eq!(v["tiering"]["prefix"], "raw/");
        assert_eq!(node_tenant_name(&t), "team-analytics.analytics");
        // Unset, the field is left out (a node from before it refuses it).
        let mut t2 = t.clone();
        if let Some(tr) = t2.spec.tiering.as_mut() {
            tr.restore_after_reads = None;
        }
        if let Some(tr) = t2.spec.tiering.as_mut() {
            tr.buckets = None;
            tr.prefix = Some(String::new());
        }
        let v = admin_spec(&t2).unwrap();
        for field in ["restoreAfterReads", "buckets", "prefix"] {
            assert!(v["tiering"].get(field).is_none(), "{field}: {v}");
        }
    }
}
