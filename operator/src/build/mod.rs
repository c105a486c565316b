//! Pure builders: desired Kubernetes objects from a validated resource. No API client
//! here, so every object is unit-tested from YAML fixtures (see `tests` below and
//! `operator/tests/fixtures/`).

pub mod cluster;

use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference;

pub const APP: &str = "granary-node";
pub const PORT_S3: i32 = 9000;
pub const PORT_KV: i32 = 9100;
pub const PORT_ADMIN: i32 = 9200;
pub const PORT_RPC: i32 = 9300;
pub const DEFAULT_IMAGE: &str = "ghcr.io/granary-dev/granary-node:0.1.0";
pub const MANAGER: &str = "granary-operator";

/// Labels every object of a cluster carries; the selector subset is stable for life.
pub fn cluster_labels(cluster: &str) -> BTreeMap<String, String> {
    BTreeMap::from([
        ("app.kubernetes.io/name".to_string(), APP.to_string()),
        (
            "app.kubernetes.io/instance".to_string(),
            cluster.to_string(),
        ),
        (
            "app.kubernetes.io/managed-by".to_string(),
            MANAGER.to_string(),
        ),
    ])
}

pub fn pool_labels(cluster: &str, zone: &str, pool: &str) -> BTreeMap<String, String> {
    let mut l = cluster_labels(cluster);
    l.insert("granary.dev/zone".into(), zone.into());
    l.insert("granary.dev/pool".into(), pool.into());
    l
}

/// Selector labels (a subset that never changes, as StatefulSet selectors are immutable).
pub fn selector(cluster: &str, zone_pool: Option<(&str, &str)>) -> BTreeMap<String, String> {
    let mut l = BTreeMap::from([
        ("app.kubernetes.io/name".to_string(), APP.to_string()),
        (
            "app.kubernetes.io/instance".to_string(),
            cluster.to_string(),
        ),
    ]);
    if let Some((z, p)) = zone_pool {
        l.insert("granary.dev/zone".into(), z.into());
        l.insert("granary.dev/pool".into(), p.into());
    }
    l
}

/// Everything built for a cluster is owned by it: deleting the StorageCluster deletes
/// them (but never the PersistentVolumeClaims, which StatefulSets do not delete).
pub fn owner(kind: &str, name: &str, uid: &str) -> OwnerReference {
    OwnerReference {
        api_version: format!("{}/{}", crate::crd::GROUP, crate::crd::VERSION),
        kind: kind.into(),
        name: name.into(),
        uid: uid.into(),
        controller: Some(true),
        block_owner_deletion: Some(true),
    }
}
