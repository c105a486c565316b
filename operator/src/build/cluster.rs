//! Objects of a StorageCluster: per zone/pool a StatefulSet and a headless Service; per
//! cluster the S3, KV and internal Services, the node ConfigMap, one
//! PodDisruptionBudget over all storage nodes, a NetworkPolicy and a ServiceAccount.

use std::collections::BTreeMap;

use k8s_openapi::api::apps::v1::{StatefulSet, StatefulSetSpec};
use k8s_openapi::api::core::v1::{
    Affinity, Capabilities, ConfigMap, ConfigMapVolumeSource, Container, ContainerPort,
    EnvFromSource, EnvVar, EnvVarSource, HTTPGetAction, ObjectFieldSelector, PersistentVolumeClaim,
    PersistentVolumeClaimSpec, PodSecurityContext, PodSpec, PodTemplateSpec, Probe, SeccompProfile,
    SecretEnvSource, SecretKeySelector, SecurityContext, Service, ServiceAccount, ServicePort,
    ServiceSpec, TopologySpreadConstraint, Volume, VolumeMount, VolumeResourceRequirements,
};
use k8s_openapi::api::networking::v1::{
    NetworkPolicy, NetworkPolicyIngressRule, NetworkPolicyPeer, NetworkPolicyPort,
    NetworkPolicySpec,
};
use k8s_openapi::api::policy::v1::{PodDisruptionBudget, PodDisruptionBudgetSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

use super::*;
use crate::crd::{Pool, StorageCluster, Zone};

/// Inputs the builders need besides the resource itself.
#[derive(Clone, Debug)]
pub struct Context {
    pub name: String,
    pub namespace: String,
    pub uid: String,
    /// Namespace of the operator, whose pods may reach the admin port.
    pub operator_namespace: String,
    /// Namespace of Prometheus, whose pods may reach the admin port for `/metrics`
    /// (operator flag `--prometheus-namespace`).
    pub prometheus_namespace: Option<String>,
}

impl Context {
    pub fn of(sc: &StorageCluster, operator_namespace: &str) -> Self {
        Self {
            name: sc.metadata.name.clone().unwrap_or_default(),
            namespace: sc.metadata.namespace.clone().unwrap_or_default(),
            uid: sc.metadata.uid.clone().unwrap_or_default(),
            operator_namespace: operator_namespace.into(),
            prometheus_namespace: None,
        }
    }

    fn meta(&self, name: String, labels: BTreeMap<String, String>) -> ObjectMeta {
        ObjectMeta {
            name: Some(name),
            namespace: Some(self.namespace.clone()),
            labels: Some(labels),
            owner_references: Some(vec![owner("StorageCluster", &self.name, &self.uid)]),
            ..Default::default()
        }
    }

    pub fn pool_name(&self, zone: &str, pool: &str) -> String {
        format!("{}-{zone}-{pool}", self.name)
    }

    pub fn admin_token_secret(&self) -> String {
        format!("{}-admin-token", self.name)
    }

    /// The cluster's one PodDisruptionBudget.
    pub fn pdb_name(&self) -> String {
        format!("{}-storage", self.name)
    }

    pub fn master_key_secret(&self) -> String {
        format!("{}-master-key", self.name)
    }

    /// The secret storage nodes present to each other on the RPC port.
    pub fn cluster_secret(&self) -> String {
        format!("{}-cluster-secret", self.name)
    }
}

/// Everything desired for one cluster, in apply order.
#[derive(Clone, Debug, Default)]
pub struct Desired {
    pub service_account: ServiceAccount,
    pub config: ConfigMap,
    pub services: Vec<Service>,
    pub stateful_sets: Vec<StatefulSet>,
    pub pdb: PodDisruptionBudget,
    pub network_policy: NetworkPolicy,
}

impl Desired {
    /// The storage container of the first StatefulSet.
    pub fn node_container(&self) -> Option<&Container> {
        self.stateful_sets
            .first()?
            .spec
            .template
            .spec
            .as_ref()?
            .containers
            .first()
    }

    /// The value of the storage container's variable `name` (first StatefulSet).
    pub fn node_env(&self, name: &str) -> Option<String> {
        self.node_container()?
            .env
            .as_ref()?
            .iter()
            .find(|e| e.name == name)
            .and_then(|e| e.value.clone())
    }
}

pub fn build(sc: &StorageCluster, ctx: &Context) -> Desired {
    let mut d = Desired {
        service_account: service_account(ctx),
        config: config_map(sc, ctx),
        pdb: pdb(sc, ctx),
        network_policy: network_policy(ctx),
        ..Default::default()
    };
    d.services.push(client_service(ctx, "s3", PORT_S3));
    d.services.push(client_service(ctx, "kv", PORT_KV));
    d.services.push(internal_service(ctx));
    // Pods read the ConfigMap only at start: a change of it (the replication factor, say)
    // must roll them, so its digest is part of the pod template.
    let digest = config_digest(&d.config);
    for zone in &sc.spec.zones {
        for pool in &zone.pools {
            d.services.push(headless_service(ctx, zone, pool));
            let mut sts = stateful_set(sc, ctx, zone, pool);
            sts.spec
                .template
                .metadata
                .get_or_insert_with(Default::default)
                .annotations
                .get_or_insert_with(Default::default)
                .insert(CONFIG_HASH_ANNOTATION.into(), digest.clone());
            d.stateful_sets.push(sts);
        }
    }
    d
}

/// Pod-template annotation carrying the digest of the node configuration.
pub const CONFIG_HASH_ANNOTATION: &str = "granary.dev/config-hash";

/// The node setting that counts the nodes a new cluster waits for before assigning
/// partitions. It matters only at cluster creation, so it is left out of the digest:
/// a scale-out changes it and must not roll every pod.
const BOOTSTRAP_KEY: &str = "bootstrap_expect";

/// A stable digest of a ConfigMap's data (FNV-1a over sorted keys and values), without
/// its [`BOOTSTRAP_KEY`] line.
fn config_digest(cm: &ConfigMap) -> String {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for (k, v) in cm.data.iter().flatten() {
        let v: String = v
            .lines()
            .filter(|l| !l.starts_with(BOOTSTRAP_KEY))
            .flat_map(|l| [l, "\n"])
            .collect();
        for b in k.bytes().chain([0]).chain(v.bytes()).chain([0]) {
            h = (h ^ b as u64).wrapping_mul(0x0000_0100_0000_01b3);
        }
    }
    format!("{h:016x}")
}

pub fn service_account(ctx: &Context) -> ServiceAccount {
    ServiceAccount {
        metadata: ctx.meta(format!("{}-node", ctx.name), cluster_labels(&ctx.name)),
        automount_service_account_token: Some(false),
        ..Default::default()
    }
}

/// The storage pods the spec asks for (at least one).
fn pods(sc: &StorageCluster) -> i64 {
    sc.spec
        .zones
        .iter()
        .flat_map(|z| &z.pools)
        .map(|p| p.replicas.max(0) as i64)
        .sum::<i64>()
        .max(1)
}

/// Why the spec's cold tier is not given to the nodes, if it is not: a `file://`
/// directory is local to each pod, so on a cluster of several pods a cold object moved
/// by one primary would be unreadable on the node that takes its partition after a
/// failover; `memory://` would lose every cold copy at the pod's next restart. Judged on
/// the URL as the node sees it (control characters removed, as [`config_map`] does).
pub fn cold_tier_refused(sc: &StorageCluster) -> Option<(&'static str, String)> {
    let ct = sc.spec.cold_tier.as_ref()?;
    let url: String = ct.url.chars().filter(|c| !c.is_control()).collect();
    let scheme = url::Url::parse(url.trim())
        .map(|u| u.scheme().to_string())
        .unwrap_or_default();
    let n = pods(sc);
    match scheme.as_str() {
        "memory" => Some((
            "InMemoryStore",
            "a memory:// cold tier keeps the only copy of every moved object in a pod's \
             memory, lost at its next restart: use an object store (s3://, gs://, az://); \
             the nodes run without a cold tier until then"
                .into(),
        )),
        "file" if n > 1 => Some((
            "LocalDirectoryOnCluster",
            format!(
                "a file:// cold tier is a directory local to each pod; with {n} storage pods a \
             cold object would be unreadable after its partition fails over to another \
             pod: use an object store (s3://, gs://, az://); the nodes run without a cold \
             tier until then (objects a single pod already moved there answer 503)"
            ),
        )),
        _ => None,
    }
}

/// The cold tier's URL as the nodes get it, if the spec has one that is not refused:
/// control characters removed, and each cluster under a prefix of its own, so two
/// clusters given the same bucket never see (and never sweep) each other's copies.
fn cold_tier_url(sc: &StorageCluster, ctx: &Context) -> Option<String> {
    let ct = sc.spec.cold_tier.as_ref()?;
    if cold_tier_refused(sc).is_some() {
        return None;
    }
    let url: String = ct.url.chars().filter(|c| !c.is_control()).collect();
    Some(match url.split_once('?') {
        Some((base, query)) => format!(
            "{}/{}/{}?{query}",
            base.trim_end_matches('/'),
            ctx.namespace,
            ctx.name
        ),
        None => format!(
            "{}/{}/{}",
            url.trim_end_matches('/'),
            ctx.namespace,
            ctx.name
        ),
    })
}

/// The node configuration (secrets come from the environment, never from here).
pub fn config_map(sc: &StorageCluster, ctx: &Context) -> ConfigMap {
    let toml = format!(
        "# Generated by granary-operator from StorageCluster {ns}/{name}; edits are overwritten.\n\
         region = \"{region}\"\npartitions = {partitions}\ndata_dir = \"/var/lib/granary\"\n\
         s3_listen = \"0.0.0.0:{s3}\"\nkv_listen = \"0.0.0.0:{kv}\"\nadmin_listen = \"0.0.0.0:{admin}\"\n\
         rpc_listen = \"0.0.0.0:{rpc}\"\nreplication_factor = {factor}\nmin_in_sync = {min_in_sync}\n\
         s3_domains = [\"{name}-s3.{ns}.svc\"]\n{BOOTSTRAP_KEY} = {nodes}\n",
        ns = ctx.namespace,
        name = ctx.name,
        region = sc.spec.region,
        partitions = sc.spec.partitions,
        s3 = PORT_S3,
        kv = PORT_KV,
        admin = PORT_ADMIN,
        rpc = PORT_RPC,
        factor = sc.spec.replication.factor,
        min_in_sync = sc.spec.replication.min_in_sync,
        nodes = pods(sc),
    );
    let mut toml = toml;
    if let Some(url) = cold_tier_url(sc, ctx) {
        // TOML basic string: the URL's quotes and backslashes escaped.
        let url = url.replace('\\', "\\\\").replace('"', "\\\"");
        toml.push_str(&format!("cold_tier = \"{url}\"\n"));
    }
    ConfigMap {
        metadata: ctx.meta(format!("{}-config", ctx.name), cluster_labels(&ctx.name)),
        data: Some(BTreeMap::from([("node.toml".to_string(), toml)])),
        ..Default::default()
    }
}

fn port(name: &str, p: i32) -> ServicePort {
    ServicePort {
        name: Some(name.into()),
        port: p,
        target_port: Some(IntOrString::Int(p)),
        ..Default::default()
    }
}

pub fn client_service(ctx: &Context, what: &str, p: i32) -> Service {
    Service {
        metadata: ctx.meta(format!("{}-{what}", ctx.name), cluster_labels(&ctx.name)),
        spec: Some(ServiceSpec {
            selector: Some(selector(&ctx.name, None)),
            ports: Some(vec![port(what, p)]),
            ..Default::default()
        }),
        ..Default::default()
    }
}

pub fn internal_service(ctx: &Context) -> Service {
    Service {
        metadata: ctx.meta(format!("{}-internal", ctx.name), cluster_labels(&ctx.name)),
        spec: Some(ServiceSpec {
            selector: Some(selector(&ctx.name, None)),
            ports: Some(vec![port("admin", PORT_ADMIN), port("rpc", PORT_RPC)]),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// Stable network identities for the pods of one pool.
pub fn headless_service(ctx: &Context, zone: &Zone, pool: &Pool) -> Service {
    Service {
        metadata: ctx.meta(
            ctx.pool_name(&zone.name, &pool.name),
            pool_labels(&ctx.name, &zone.name, &pool.name),
        ),
        spec: Some(ServiceSpec {
            cluster_ip: Some("None".into()),
            publish_not_ready_addresses: Some(true),
            selector: Some(selector(&ctx.name, Some((&zone.name, &pool.name)))),
            ports: Some(vec![port("admin", PORT_ADMIN), port("rpc", PORT_RPC)]),
            ..Default::default()
        }),
        ..Default::default()
    }
}

fn env(name: &str, value: &str) -> EnvVar {
    EnvVar {
        name: name.into(),
        value: Some(value.into()),
        ..Default::default()
    }
}

fn env_secret(name: &str, secret: &str, key: &str) -> EnvVar {
    EnvVar {
        name: name.into(),
        value_from: Some(EnvVarSource {
            secret_key_ref: Some(SecretKeySelector {
                name: secret.into(),
                key: key.into(),
                optional: Some(false),
            }),
            ..Default::default()
        }),
        ..Default::default()
    }
}

fn http_probe(path: &str, period: i32, failures: i32) -> Probe {
    Probe {
        http_get: Some(HTTPGetAction {
            path: Some(path.into()),
            port: IntOrString::Int(PORT_ADMIN),
            ..Default::default()
        }),
        period_seconds: Some(period),
        failure_threshold: Some(failures),
        ..Default::default()
    }
}

/// The user and group of the node image (the distroless "nonroot" ids); the data volume
/// is given to this group (`fsGroup`).
pub const NODE_UID: i64 = 65532;

/// How long a node may take from start to answering `/healthz` (its listeners open after
/// the start-up scans of the engine, which grow with the volume) before the kubelet
/// restarts it: the startup probe's period times its failure threshold. The liveness
/// probe takes over only after the startup probe passed.
pub const NODE_STARTUP_SECS: i32 = 3600;

/// The storage node's smallest accepted `memory_budget` (its config refuses less).
const MIN_MEMORY_BUDGET: u64 = 8 << 20;
/// Prefix of the variables made of the cold tier's credentials Secret; the storage node
/// reads its credentials under it (`granary_node::cold::CREDENTIAL_ENV_PREFIX`).
pub const COLD_CREDENTIAL_ENV_PREFIX: &str = "GRANARY_COLD_CREDENTIAL_";

pub fn stateful_set(sc: &StorageCluster, ctx: &Context, zone: &Zone, pool: &Pool) -> StatefulSet {
    let name = ctx.pool_name(&zone.name, &pool.name);
    let labels = pool_labels(&ctx.name, &zone.name, &pool.name);
    let mut envs = vec![
        EnvVar {
            name: "GRANARY_NODE_ID".into(),
            value_from: Some(EnvVarSource {
                field_ref: Some(ObjectFieldSelector {
                    field_path: "metadata.name".into(),
                    ..Default::default()
                }),
                ..Default::default()
            }),
            ..Default::default()
        },
        env("GRANARY_ZONE", &zone.name),
        env(
            "GRANARY_ADVERTISE_ADMIN",
            &format!(
                "$(GRANARY_NODE_ID).{name}.{}.svc:{PORT_ADMIN}",
                ctx.namespace
            ),
        ),
        env(
            "GRANARY_ADVERTISE_RPC",
            &format!("$(GRANARY_NODE_ID).{name}.{}.svc:{PORT_RPC}", ctx.namespace),
        ),
        // Placement weight: the data volume's size in GiB.
        env(
            "GRANARY_CAPACITY",
            &crate::quantity::to_u64(&pool.storage.size.0)
                .map_or(1, |b| (b >> 30).max(1))
                .to_string(),
        ),
        env_secret(
            "GRANARY_CATALOG_URL",
            &sc.spec.catalog.postgres_secret_ref.name,
            &sc.spec.catalog.postgres_secret_ref.key,
        ),
        env_secret("GRANARY_MASTER_KEY", &ctx.master_key_secret(), "masterKey"),
        env_secret("GRANARY_ADMIN_TOKEN", &ctx.admin_token_secret(), "token"),
        env_secret("GRANARY_CLUSTER_SECRET", &ctx.cluster_secret(), "secret"),
    ];
    // A quarter of the pod's memory limit for request data held in memory (the node
    // answers SlowDown beyond it); the rest is for the engine, object streams and the
    // runtime. Without a limit the node's default applies.
    if let Some(limit) = pool
        .resources
        .as_ref()
        .and_then(|r| r.limits.as_ref())
        .and_then(|l| l.get("memory"))
        .and_then(|q| crate::quantity::to_u64(&q.0))
    {
        envs.push(env(
            "GRANARY_MEMORY_BUDGET",
            &(limit / 4).max(MIN_MEMORY_BUDGET).to_string(),
        ));
    }
    if let Some(ep) = sc
        .spec
        .telemetry
        .as_ref()
        .and_then(|t| t.otlp_endpoint.as_deref())
    {
        envs.push(env("OTEL_EXPORTER_OTLP_ENDPOINT", ep));
    }
    if sc.spec.cold_tier.is_some() {
        // Also as an explicit variable (the node's settings come from the ConfigMap and
        // its environment; the credentials Secret's keys arrive under their own prefix
        // and cannot set it). Empty (no cold tier) when refused.
        envs.push(env(
            "GRANARY_COLD_TIER",
            &cold_tier_url(sc, ctx).unwrap_or_default(),
        ));
    }
    let container = Container {
        name: "node".into(),
        image: Some(
            sc.spec
                .image
                .clone()
                .unwrap_or_else(|| DEFAULT_IMAGE.into()),
        ),
        image_pull_policy: sc.spec.image_pull_policy.clone(),
        args: Some(vec![
            "serve".into(),
            "--config".into(),
            "/etc/granary/node.toml".into(),
        ]),
        env: Some(envs),
        // The cold tier's credentials: every key of its Secret becomes a variable under
        // the node's credential prefix (AWS_ACCESS_KEY_ID as
        // GRANARY_COLD_CREDENTIAL_AWS_ACCESS_KEY_ID, ...), so no key there can set any
        // other of the node's variables; the node takes AWS_*, GOOGLE_* and AZURE_* ones.
        env_from: sc
            .spec
            .cold_tier
            .as_ref()
            .and_then(|c| c.secret_ref.as_ref())
            .map(|r| {
                vec![EnvFromSource {
                    prefix: Some(COLD_CREDENTIAL_ENV_PREFIX.into()),
                    secret_ref: Some(SecretEnvSource {
                        name: r.name.clone(),
                        optional: Some(false),
                    }),
                    ..Default::default()
                }]
            }),
        ports: Some(
            [
                ("s3", PORT_S3),
                ("kv", PORT_KV),
                ("admin", PORT_ADMIN),
                ("rpc", PORT_RPC),
            ]
            .map(|(n, p)| ContainerPort {
                name: Some(n.into()),
                container_port: p,
                ..Default::default()
            })
            .to_vec(),
        ),
        startup_probe: Some(http_probe("/healthz", 10, NODE_STARTUP_SECS / 10)),
        readiness_probe: Some(http_probe("/readyz", 5, 3)),
        liveness_probe: Some(http_probe("/healthz", 10, 6)),
        security_context: Some(SecurityContext {
            allow_privilege_escalation: Some(false),
            read_only_root_filesystem: Some(true),
            run_as_non_root: Some(true),
            capabilities: Some(Capabilities {
                drop: Some(vec!["ALL".into()]),
                ..Default::default()
            }),
            ..Default::default()
        }),
        resources: pool.resources.clone(),
        volume_mounts: Some(vec![
            VolumeMount {
                name: "data".into(),
                mount_path: "/var/lib/granary".into(),
                ..Default::default()
            },
            VolumeMount {
                name: "config".into(),
                mount_path: "/etc/granary".into(),
                read_only: Some(true),
                ..Default::default()
            },
        ]),
        ..Default::default()
    };
    let pod = PodSpec {
        service_account_name: Some(format!("{}-node", ctx.name)),
        automount_service_account_token: Some(false),
        containers: vec![container],
        // The image's non-root user; the volume's group is set to it on the first mount
        // only (not on every restart of a large volume).
        security_context: Some(PodSecurityContext {
            run_as_non_root: Some(true),
            run_as_user: Some(NODE_UID),
            run_as_group: Some(NODE_UID),
            fs_group: Some(NODE_UID),
            fs_group_change_policy: Some("OnRootMismatch".into()),
            seccomp_profile: Some(SeccompProfile {
                type_: "RuntimeDefault".into(),
                ..Default::default()
            }),
            ..Default::default()
        }),
        node_selector: (!zone.node_selector.is_empty()).then(|| zone.node_selector.clone()),
        tolerations: (!zone.tolerations.is_empty()).then(|| zone.tolerations.clone()),
        affinity: None::<Affinity>,
        // Spread a pool's nodes over hosts so one machine never holds two replicas.
        topology_spread_constraints: Some(vec![TopologySpreadConstraint {
            max_skew: 1,
            topology_key: "kubernetes.io/hostname".into(),
            when_unsatisfiable: "ScheduleAnyway".into(),
            label_selector: Some(LabelSelector {
                match_labels: Some(selector(&ctx.name, Some((&zone.name, &pool.name)))),
                ..Default::default()
            }),
            ..Default::default()
        }]),
        // Time for in-flight requests to finish and the engine to flush.
        termination_grace_period_seconds: Some(60),
        volumes: Some(vec![Volume {
            name: "config".into(),
            config_map: Some(ConfigMapVolumeSource {
                name: format!("{}-config", ctx.name),
                ..Default::default()
            }),
            ..Default::default()
        }]),
        ..Default::default()
    };
    let pvc = PersistentVolumeClaim {
        metadata: ObjectMeta {
            name: Some("data".into()),
            labels: Some(labels.clone()),
            ..Default::default()
        },
        spec: Some(PersistentVolumeClaimSpec {
            access_modes: Some(vec!["ReadWriteOnce".into()]),
            storage_class_name: pool.storage.storage_class_name.clone(),
            resources: Some(VolumeResourceRequirements {
                requests: Some(BTreeMap::from([(
                    "storage".to_string(),
                    pool.storage.size.clone(),
                )])),
                ..Default::default()
            }),
            ..Default::default()
        }),
        ..Default::default()
    };
    StatefulSet {
        metadata: ctx.meta(name.clone(), labels.clone()),
        spec: StatefulSetSpec {
            replicas: Some(pool.replicas),
            service_name: Some(name),
            selector: LabelSelector {
                match_labels: Some(selector(&ctx.name, Some((&zone.name, &pool.name)))),
                ..Default::default()
            },
            pod_management_policy: Some("OrderedReady".into()),
            template: PodTemplateSpec {
                metadata: Some(ObjectMeta {
                    labels: Some(labels),
                    ..Default::default()
                }),
                spec: Some(pod),
            },
            volume_claim_templates: Some(vec![pvc]),
            ..Default::default()
        },
        ..Default::default()
    }
}

/// At most `factor - minInSync` storage nodes of the whole cluster may be voluntarily
/// disrupted at once, whatever their zone or pool: the replicas of a partition live in
/// different zones, so two drains in two pools can hit the same partition, and only a
/// cluster-wide budget keeps every partition at `minInSync` replicas. (One budget per
/// pool would allow `factor - minInSync` per pool; a pod matched by two budgets cannot be
/// evicted at all, so the per-pool and cluster-wide forms cannot be combined either.)
/// With `factor == minInSync` no voluntary disruption is allowed (writes would stop).
pub fn pdb(sc: &StorageCluster, ctx: &Context) -> PodDisruptionBudget {
    let r = &sc.spec.replication;
    let max_unavailable = (r.factor - r.min_in_sync).max(0);
    PodDisruptionBudget {
        metadata: ctx.meta(ctx.pdb_name(), cluster_labels(&ctx.name)),
        spec: Some(PodDisruptionBudgetSpec {
            max_unavailable: Some(IntOrString::Int(max_unavailable)),
            selector: Some(LabelSelector {
                match_labels: Some(selector(&ctx.name, None)),
                ..Default::default()
            }),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// S3 and KV are open; the admin and node-to-node ports only to the cluster's own pods
/// and to the operator's namespace (admin only).
pub fn network_policy(ctx: &Context) -> NetworkPolicy {
    let np = |p: i32| NetworkPolicyPort {
        port: Some(IntOrString::Int(p)),
        protocol: Some("TCP".into()),
        ..Default::default()
    };
    let own_pods = NetworkPolicyPeer {
        pod_selector: Some(LabelSelector {
            match_labels: Some(selector(&ctx.name, None)),
            ..Default::default()
        }),
        ..Default::default()
    };
    let namespace = |ns: &str| NetworkPolicyPeer {
        namespace_selector: Some(LabelSelector {
            match_labels: Some(BTreeMap::from([(
                "kubernetes.io/metadata.name".to_string(),
                ns.to_string(),
            )])),
            ..Default::default()
        }),
        ..Default::default()
    };
    // The operator (admin API) and Prometheus (`/metrics`, on the same port; the admin
    // API itself still needs the admin token).
    let mut admin_clients = vec![namespace(&ctx.operator_namespace)];
    if let Some(p) = ctx
        .prometheus_namespace
        .as_deref()
        .filter(|p| *p != ctx.operator_namespace)
    {
        admin_clients.push(namespace(p));
    }
    NetworkPolicy {
        metadata: ctx.meta(format!("{}-node", ctx.name), cluster_labels(&ctx.name)),
        spec: Some(NetworkPolicySpec {
            pod_selector: Some(LabelSelector {
                match_labels: Some(selector(&ctx.name, None)),
                ..Default::default()
            }),
            policy_types: Some(vec!["Ingress".into()]),
            ingress: Some(vec![
                NetworkPolicyIngressRule {
                    ports: Some(vec![np(PORT_S3), np(PORT_KV)]),
                    from: None,
                },
                NetworkPolicyIngressRule {
                    ports: Some(vec![np(PORT_RPC), np(PORT_ADMIN)]),
                    from: Some(vec![own_pods]),
                },
                NetworkPolicyIngressRule {
                    ports: Some(vec![np(PORT_ADMIN)]),
                    from: Some(admin_clients),
                },
            ]),
            ..Default::default()
        }),
    }
}
