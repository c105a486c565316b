//! The pure builders, from the example manifests in `examples/`.

use granary_operator::build::cluster::{Context, build};
use granary_operator::crd::{StorageCluster, Tenant};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

fn example_cluster() -> StorageCluster {
    let text = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../examples/storagecluster.yaml"
    ))
    .unwrap();
    let mut sc: StorageCluster = serde_yaml::from_str(&text).unwrap();
    sc.metadata.uid = Some("uid-1".into());
    sc
}

fn ctx(sc: &StorageCluster) -> Context {
    Context::of(sc, "granary-operator")
}

#[test]
fn example_tenants_parse_with_defaults() {
    let text = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../examples/tenants.yaml"
    ))
    .unwrap();
    let tenants: Vec<Tenant> = serde_yaml::Deserializer::from_str(&text)
        .map(|d| serde::Deserialize::deserialize(d).unwrap())
        .collect();
    assert_eq!(tenants.len(), 2);
    assert!(
        tenants[1].spec.endpoints.s3 && tenants[1].spec.endpoints.kv,
        "endpoints default to on"
    );
    assert_eq!(
        tenants[1].spec.deletion_policy,
        granary_operator::crd::DeletionPolicy::Delete
    );
}

#[test]
fn one_statefulset_and_headless_service_per_zone_pool() {
    let sc = example_cluster();
    let d = build(&sc, &ctx(&sc));
    let names: Vec<_> = d
        .stateful_sets
        .iter()
        .map(|s| s.metadata.name.clone().unwrap())
        .collect();
    assert_eq!(
        names,
        ["main-a-fast", "main-b-fast", "main-c-fast", "main-c-bulk"]
    );
    let svc: Vec<_> = d
        .services
        .iter()
        .map(|s| s.metadata.name.clone().unwrap())
        .collect();
    assert_eq!(
        svc,
        [
            "main-s3",
            "main-kv",
            "main-internal",
            "main-a-fast",
            "main-b-fast",
            "main-c-fast",
            "main-c-bulk"
        ]
    );
    for o in d
        .stateful_sets
        .iter()
        .map(|s| &s.metadata)
        .chain(d.services.iter().map(|s| &s.metadata))
    {
        let owners = o.owner_references.as_ref().unwrap();
        assert_eq!(
            (
                owners[0].kind.as_str(),
                owners[0].uid.as_str(),
                owners[0].controller
            ),
            ("StorageCluster", "uid-1", Some(true))
        );
        assert_eq!(o.namespace.as_deref(), Some("granary-system"));
    }
}

#[test]
fn statefulset_carries_replicas_zone_affinity_volumes_probes_and_secrets() {
    let sc = example_cluster();
    let d = build(&sc, &ctx(&sc));
    let sts = d
        .stateful_sets
        .iter()
        .find(|s| s.metadata.name.as_deref() == Some("main-c-bulk"))
        .unwrap();
    let spec = &sts.spec;
    assert_eq!(spec.replicas, Some(1));
    assert_eq!(spec.service_name.as_deref(), Some("main-c-bulk"));
    let sel = spec.selector.match_labels.as_ref().unwrap();
    assert_eq!(sel.get("granary.dev/zone").map(String::as_str), Some("c"));
    assert_eq!(
        sel.get("granary.dev/pool").map(String::as_str),
        Some("bulk")
    );
    let pod = spec.template.spec.as_ref().unwrap();
    assert_eq!(
        pod.node_selector
            .as_ref()
            .unwrap()
            .get("topology.kubernetes.io/zone")
            .map(String::as_str),
        Some("eu-west-1c")
    );
    assert_eq!(
        pod.tolerations.as_ref().unwrap()[0].key.as_deref(),
        Some("dedicated")
    );
    assert_eq!(pod.termination_grace_period_seconds, Some(60));
    let tsc = &pod.topology_spread_constraints.as_ref().unwrap()[0];
    assert_eq!(
        (tsc.max_skew, tsc.topology_key.as_str()),
        (1, "kubernetes.io/hostname")
    );
    let c = &pod.containers[0];
    assert_eq!(
        c.args.as_ref().unwrap(),
        &["serve", "--config", "/etc/granary/node.toml"]
    );
    let probe = c
        .readiness_probe
        .as_ref()
        .unwrap()
        .http_get
        .as_ref()
        .unwrap();
    assert_eq!(
        (probe.path.as_deref(), &probe.port),
        (Some("/readyz"), &IntOrString::Int(9200))
    );
    // Start-up scans of a large volume may take long: a startup probe holds the liveness
    // probe off for up to an hour (the liveness probe alone allows a minute).
    let startup = c.startup_probe.as_ref().expect("a startup probe");
    assert_eq!(
        startup.http_get.as_ref().unwrap().path.as_deref(),
        Some("/healthz")
    );
    assert!(
        startup.period_seconds.unwrap_or(10) * startup.failure_threshold.unwrap_or(3) >= 3600,
        "{startup:?}"
    );
    // The image's non-root user, the volume given to its group, nothing else allowed.
    let psc = pod
        .security_context
        .as_ref()
        .expect("a pod securityContext");
    assert_eq!(
        (psc.run_as_non_root, psc.run_as_user, psc.fs_group),
        (Some(true), Some(65532), Some(65532))
    );
    let csc = c
        .security_context
        .as_ref()
        .expect("a container securityContext");
    assert_eq!(
        (
            csc.allow_privilege_escalation,
            csc.read_only_root_filesystem
        ),
        (Some(false), Some(true))
    );
    assert_eq!(
        csc.capabilities.as_ref().and_then(|c| c.drop.clone()),
        Some(vec!["ALL".to_string()])
    );
    let env = c.env.as_ref().unwrap();
    let var = |n: &str| env.iter().find(|e| e.name == n).unwrap();
    let secret_of = |n: &str| {
        let r = var(n).value_from.as_ref().unwrap();
        let sk = r.secret_key_ref.as_ref().unwrap();
        (sk.name.clone(), sk.key.clone())
    };
    assert_eq!(
        secret_of("GRANARY_CATALOG_URL"),
        ("granary-catalog".into(), "url".into())
    );
    assert!(
        env.iter().all(|e| e
            .value
            .as_deref()
            .is_none_or(|v| !v.contains("postgres://"))),
        "no secret in plain env"
    );
    assert!(env.iter().any(|e| e.name == "OTEL_EXPORTER_OTLP_ENDPOINT"));
    // Joining the cluster: peers reach this pod's RPC port by its stable DNS name and
    // authenticate with the cluster secret; placement weighs it by its volume size.
    let rpc = var("GRANARY_ADVERTISE_RPC").value.as_deref().unwrap();
    assert!(
        rpc.starts_with("$(GRANARY_NODE_ID).") && rpc.ends_with(":9300"),
        "{rpc}"
    );
    let (name, key) = secret_of("GRANARY_CLUSTER_SECRET");
    assert_eq!(key, "secret");
    assert!(name.ends_with("-cluster-secret"), "{name}");
    let capacity: u64 = var("GRANARY_CAPACITY")
        .value
        .as_deref()
        .unwrap()
        .parse()
        .unwrap();
    assert!(capacity >= 1);
    let pvc = &spec.volume_claim_templates.as_ref().unwrap()[0];
    let req = pvc
        .spec
        .as_ref()
        .unwrap()
        .resources
        .as_ref()
        .unwrap()
        .requests
        .as_ref()
        .unwrap();
    assert_eq!(req["storage"].0, "4Ti");
    assert_eq!(pvc.spec.as_ref().unwrap().storage_class_name, None);
    let fast = d
        .stateful_sets
        .iter()
        .find(|s| s.metadata.name.as_deref() == Some("main-a-fast"))
        .unwrap();
    let pvc = &fast.spec.volume_claim_templates.as_ref().unwrap()[0];
    assert_eq!(
        pvc.spec.as_ref().unwrap().storage_class_name.as_deref(),
        Some("nvme")
    );
}

#[test]
fn pdb_never_allows_more_disruption_than_min_in_sync_allows() {
    let mut sc = example_cluster();
    let d = build(&sc, &ctx(&sc));
    // One budget over every storage node of the cluster (all zones and pools): drains in
    // two pools at once must not take two replicas of one partition.
    let spec = d.pdb.spec.as_ref().unwrap();
    assert_eq!(d.pdb.metadata.name.as_deref(), Some("main-storage"));
    assert_eq!(
        spec.max_unavailable,
        Some(IntOrString::Int(1)),
        "factor 3, minInSync 2"
    );
    let sel = spec
        .selector
        .as_ref()
        .unwrap()
        .match_labels
        .as_ref()
        .unwrap();
    for sts in &d.stateful_sets {
        let pod_labels = sts
            .spec
            .template
            .metadata
            .as_ref()
            .unwrap()
            .labels
            .as_ref()
            .unwrap();
        assert!(
            sel.iter().all(|(k, v)| pod_labels.get(k) == Some(v)),
            "the budget selects the pods of {:?}",
            sts.metadata.name
        );
    }
    assert!(!sel.contains_key("granary.dev/pool") && !sel.contains_key("granary.dev/zone"));
    sc.spec.replication.min_in_sync = 3;
    let d = build(&sc, &ctx(&sc));
    assert_eq!(
        d.pdb.spec.as_ref().unwrap().max_unavailable,
        Some(IntOrString::Int(0))
    );
}

#[test]
fn services_and_network_policy_expose_only_what_they_should() {
    let sc = example_cluster();
    let d = build(&sc, &ctx(&sc));
    let s3 = d
        .services
        .iter()
        .find(|s| s.metadata.name.as_deref() == Some("main-s3"))
        .unwrap();
    assert_eq!(
        s3.spec.as_ref().unwrap().ports.as_ref().unwrap()[0].port,
        9000
    );
    let headless = d
        .services
        .iter()
        .find(|s| s.metadata.name.as_deref() == Some("main-a-fast"))
        .unwrap();
    assert_eq!(
        headless.spec.as_ref().unwrap().cluster_ip.as_deref(),
        Some("None")
    );
    let np = d.network_policy.spec.as_ref().unwrap();
    let rules = np.ingress.as_ref().unwrap();
    // S3/KV open, RPC only from the cluster's pods, admin also from the operator.
    assert!(rules[0].from.is_none());
    let rpc_rule = rules
        .iter()
        .find(|r| {
            r.ports
                .as_ref()
                .unwrap()
                .iter()
                .any(|p| p.port == Some(IntOrString::Int(9300)))
        })
        .unwrap();
    assert!(rpc_rule.from.as_ref().unwrap()[0].pod_selector.is_some());
    // The admin port (and /metrics on it): the operator's namespace, and Prometheus'
    // when the operator is told where it runs.
    let admin_namespaces = |d: &granary_operator::build::cluster::Desired| {
        let rules = d
            .network_policy
            .spec
            .as_ref()
            .unwrap()
            .ingress
            .clone()
            .unwrap();
        rules
            .iter()
            .filter(|r| {
                r.ports
                    .as_ref()
                    .unwrap()
                    .iter()
                    .all(|p| p.port == Some(IntOrString::Int(9200)))
            })
            .flat_map(|r| r.from.clone().unwrap_or_default())
            .filter_map(|p| {
                p.namespace_selector?
                    .match_labels?
                    .get("kubernetes.io/metadata.name")
                    .cloned()
            })
            .collect::<Vec<_>>()
    };
    assert_eq!(admin_namespaces(&d), vec!["granary-operator".to_string()]);
    let mut with_prometheus = ctx(&sc);
    with_prometheus.prometheus_namespace = Some("monitoring".into());
    assert_eq!(
        admin_namespaces(&build(&sc, &with_prometheus)),
        vec!["granary-operator".to_string(), "monitoring".to_string()]
    );
    let cm = d.config.data.as_ref().unwrap()["node.toml"].clone();
    assert!(cm.contains("region = \"eu-west-1\"") && cm.contains("partitions = 1024"));
    assert!(!cm.contains("postgres"), "no secrets in the ConfigMap");
    assert!(cm.contains("rpc_listen = \"0.0.0.0:9300\""), "{cm}");
    assert!(cm.contains("replication_factor = "), "{cm}");
}

#[test]
fn the_memory_budget_is_a_quarter_of_the_pod_memory_limit() {
    use k8s_openapi::api::core::v1::ResourceRequirements;
    use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
    let mut sc = example_cluster();
    let budget = |sc: &StorageCluster| build(sc, &ctx(sc)).node_env("GRANARY_MEMORY_BUDGET");
    assert_eq!(budget(&sc), None, "no limit: the node's default");
    sc.spec.zones[0].pools[0].resources = Some(ResourceRequirements {
        limits: Some([("memory".to_string(), Quantity("2Gi".into()))].into()),
        ..Default::default()
    });
    assert_eq!(budget(&sc).as_deref(), Some("536870912"));
    sc.spec.zones[0].pools[0].resources = Some(ResourceRequirements {
        limits: Some([("memory".to_string(), Quantity("16Mi".into()))].into()),
        ..Default::default()
    });
    assert_eq!(
        budget(&sc).as_deref(),
        Some("8388608"),
        "never below the node's minimum"
    );
}

#[test]
fn a_config_change_rolls_the_pods_and_nothing_else_does() {
    use granary_operator::build::cluster::CONFIG_HASH_ANNOTATION;
    let hash = |sc: &StorageCluster| {
        let d = build(sc, &ctx(sc));
        let all: Vec<String> = d
            .stateful_sets
            .iter()
            .map(|s| {
                s.spec
                    .template
                    .metadata
                    .as_ref()
                    .unwrap()
                    .annotations
                    .as_ref()
                    .unwrap()[CONFIG_HASH_ANNOTATION]
                    .clone()
            })
            .collect();
        assert!(
            all.windows(2).all(|w| w[0] == w[1]),
            "one digest for all pools"
        );
        all[0].clone()
    };
    let mut sc = example_cluster();
    let before = hash(&sc);
    assert_eq!(hash(&sc), before, "stable");
    let nodes: i32 = sc
        .spec
        .zones
        .iter()
        .flat_map(|z| &z.pools)
        .map(|p| p.replicas)
        .sum();
    let toml = |sc: &StorageCluster| build(sc, &ctx(sc)).config.data.unwrap()["node.toml"].clone();
    assert!(
        toml(&sc).contains(&format!("\nbootstrap_expect = {nodes}\n")),
        "a new cluster waits for all its nodes: {}",
        toml(&sc)
    );
    sc.spec.zones[0].pools[0].replicas += 1;
    assert!(toml(&sc).contains(&format!("\nbootstrap_expect = {}\n", nodes + 1)));
    assert_eq!(hash(&sc), before, "scaling is not a config change");
    assert!(toml(&sc).contains(&format!(
        "\nmin_in_sync = {}\n",
        sc.spec.replication.min_in_sync
    )));
    sc.spec.replication.factor -= 1;
    assert_ne!(hash(&sc), before, "the replication factor is in node.toml");
}
