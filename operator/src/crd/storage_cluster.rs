// Several printcolumns share `type_ = "string"`; clippy reads them as duplicated attributes.
#![allow(clippy::duplicated_attributes)]

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{ResourceRequirements, Toleration};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, LabelSelector};
use kube::{CustomResource, KubeSchema};
use serde::{Deserialize, Serialize};

use super::{SecretKeyRef, SecretRef};

/// A Granary storage cluster in one region: zones of node pools, each pool one
/// StatefulSet of storage nodes.
#[derive(CustomResource, KubeSchema, Clone, Debug, PartialEq, Serialize, Deserialize)]
#[kube(
    group = "granary.dev",
    version = "v1alpha1",
    kind = "StorageCluster",
    namespaced,
    shortname = "gsc",
    category = "granary",
    status = "StorageClusterStatus",
    printcolumn(name = "Region", type_ = "string", json_path = ".spec.region"),
    printcolumn(
        name = "Factor",
        type_ = "integer",
        json_path = ".spec.replication.factor"
    ),
    printcolumn(
        name = "Ready",
        type_ = "string",
        json_path = ".status.conditions[?(@.type==\"Ready\")].status"
    ),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("self.replication.factor <= size(self.zones)").message("replication.factor must not exceed the number of zones"))]
#[x_kube(validation = Rule::new("self.replication.minInSync <= self.replication.factor").message("replication.minInSync must not exceed replication.factor"))]
pub struct StorageClusterSpec {
    /// Region this cluster serves (S3 region name).
    #[schemars(length(min = 1, max = 63))]
    pub region: String,
    pub replication: Replication,
    /// Number of partitions; fixed for the life of the cluster.
    #[serde(default = "default_partitions")]
    #[schemars(range(min = 1, max = 65535))]
    #[x_kube(validation = Rule::new("self == oldSelf").message("partitions is immutable"))]
    pub partitions: i32,
    /// Failure domains; one StatefulSet per zone and pool.
    #[schemars(length(min = 1, max = 16))]
    #[x_kube(validation = Rule::new("self.all(z, self.exists_one(y, y.name == z.name))").message("zone names must be unique"))]
    pub zones: Vec<Zone>,
    pub catalog: CatalogSpec,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cold_tier: Option<ColdTier>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub geo: Option<Geo>,
    /// Which namespaces may place Tenants on this cluster (none: only its own namespace).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tenants: Option<TenantPolicy>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub telemetry: Option<Telemetry>,
    /// Storage node image.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = r"^(Always|IfNotPresent|Never)$"))]
    pub image_pull_policy: Option<String>,
}

fn default_partitions() -> i32 {
    1024
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct Replication {
    /// Copies of every piece of data.
    #[schemars(range(min = 1, max = 7))]
    pub factor: i32,
    /// Copies that must be durable before a write is acknowledged.
    #[schemars(range(min = 1, max = 7))]
    pub min_in_sync: i32,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct Zone {
    #[schemars(
        length(min = 1, max = 20),
        regex(pattern = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
    )]
    pub name: String,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub node_selector: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tolerations: Vec<Toleration>,
    #[schemars(length(min = 1, max = 16))]
    #[x_kube(validation = Rule::new("self.all(p, self.exists_one(q, q.name == p.name))").message("pool names must be unique within a zone"))]
    pub pools: Vec<Pool>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct Pool {
    #[schemars(
        length(min = 1, max = 20),
        regex(pattern = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
    )]
    pub name: String,
    #[schemars(range(min = 0, max = 1000))]
    pub replicas: i32,
    pub storage: PoolStorage,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resources: Option<ResourceRequirements>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct PoolStorage {
    /// Size of each node's data volume.
    pub size: Quantity,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub storage_class_name: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct CatalogSpec {
    /// Secret key holding the Postgres URL of the placement catalog.
    pub postgres_secret_ref: SecretKeyRef,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct ColdTier {
    /// Object store URL (`s3://`, `gs://`, `az://`, `file://`).
    #[schemars(length(min = 1))]
    pub url: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret_ref: Option<SecretRef>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct Geo {
    #[serde(default)]
    pub peers: Vec<GeoPeer>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct GeoPeer {
    pub name: String,
    pub region: String,
    pub endpoint: String,
    pub secret_ref: SecretRef,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct TenantPolicy {
    pub namespace_selector: LabelSelector,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct Telemetry {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub otlp_endpoint: Option<String>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct StorageClusterStatus {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    #[serde(default)]
    pub conditions: Vec<Condition>,
    #[serde(default)]
    pub zones: Vec<ZoneStatus>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub layout_version: Option<i64>,
    /// Storage nodes by state, as the cluster judges them (alive, suspected, failed).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub members: Option<MemberCounts>,
    /// Partitions with fewer replicas than `replication.factor`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub under_replicated_partitions: Option<i64>,
    /// Partitions with fewer replicas than `replication.minInSync`: writes to them
    /// cannot be acknowledged durably (condition Degraded, reason BelowMinInSync).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub below_min_in_sync_partitions: Option<i64>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct MemberCounts {
    pub alive: i32,
    pub suspected: i32,
    pub failed: i32,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ZoneStatus {
    pub name: String,
    pub ready_nodes: i32,
    pub nodes: i32,
}
