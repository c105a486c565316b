// Several printcolumns share `type_ = "string"`; clippy reads them as duplicated attributes.
#![allow(clippy::duplicated_attributes)]

use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::{CustomResource, KubeSchema};
use serde::{Deserialize, Serialize};

/// A tenant of a StorageCluster, living in the tenant's own namespace.
#[derive(CustomResource, KubeSchema, Clone, Debug, PartialEq, Serialize, Deserialize)]
#[kube(
    group = "granary.dev",
    version = "v1alpha1",
    kind = "Tenant",
    namespaced,
    shortname = "gt",
    category = "granary",
    status = "TenantStatus",
    printcolumn(
        name = "Cluster",
        type_ = "string",
        json_path = ".spec.clusterRef.name"
    ),
    printcolumn(
        name = "Ready",
        type_ = "string",
        json_path = ".status.conditions[?(@.type==\"Ready\")].status"
    ),
    printcolumn(
        name = "Storage",
        type_ = "string",
        json_path = ".status.usage.storage"
    ),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[serde(rename_all = "camelCase")]
pub struct TenantSpec {
    /// The StorageCluster serving this tenant. Immutable: the tenant's data, keys and
    /// cleanup live on that cluster.
    #[x_kube(validation = Rule::new("self == oldSelf").message("clusterRef is immutable"))]
    pub cluster_ref: ClusterRef,
    #[serde(default)]
    pub quotas: Quotas,
    #[serde(default)]
    pub qos: Qos,
    #[serde(default)]
    pub placement: Placement,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub geo: Option<TenantGeo>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tiering: Option<Tiering>,
    #[serde(default)]
    pub endpoints: EndpointToggles,
    /// Secret written by the operator into this namespace (endpoints and credentials).
    #[schemars(
        length(min = 1, max = 253),
        regex(pattern = r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$")
    )]
    pub credentials_secret: String,
    #[serde(default)]
    pub deletion_policy: DeletionPolicy,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct ClusterRef {
    #[schemars(length(min = 1, max = 253))]
    pub name: String,
    #[schemars(length(min = 1, max = 63))]
    pub namespace: String,
}

/// Limits enforced cluster-wide; absent means unlimited.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct Quotas {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new("type(self) == int ? self >= 0 : !string(self).startsWith('-')").message("quotas.storage must not be negative"))]
    pub storage: Option<Quantity>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0))]
    pub objects: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0))]
    pub buckets: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0))]
    pub kv_keys: Option<i64>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct Qos {
    /// Share of a node's I/O relative to other tenants (default 100).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 10000))]
    pub weight: Option<i32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 10000000))]
    pub requests_per_second: Option<i64>,
    /// Bytes per second.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new("type(self) == int ? self > 0 : !string(self).startsWith('-') && string(self) != '0'").message("qos.bandwidth must be positive"))]
    pub bandwidth: Option<Quantity>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 100000))]
    pub max_concurrent_requests: Option<i32>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct Placement {
    /// Subset of the cluster's zones (default: all).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 16), inner(length(min = 1, max = 20)))]
    #[x_kube(validation = Rule::new("self.all(z, self.exists_one(y, y == z))").message("placement zones must be unique"))]
    pub zones: Vec<String>,
    /// Override of the cluster's replication factor; may not exceed it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 7))]
    pub replication_factor: Option<i32>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct TenantGeo {
    #[serde(default)]
    pub regions: Vec<GeoRegion>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct GeoRegion {
    pub name: String,
    #[serde(default)]
    pub mode: GeoMode,
}

#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema,
)]
pub enum GeoMode {
    #[default]
    Async,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct Tiering {
    /// Age after which data moves to the cold tier, e.g. `720h`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = r"^([0-9]+(\.[0-9]+)?(ns|us|ms|s|m|h))+$"))]
    pub cold_after: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min_object_size: Option<Quantity>,
    /// Restore on read: a cold object read this many times is brought back to the hot
    /// tier by the mover, and its age then counts from the restore. Unset: cold
    /// objects stay cold until they are overwritten.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub restore_after_reads: Option<u32>,
    /// The policy covers only these buckets (unset or empty: all the tenant's buckets).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub buckets: Option<Vec<String>>,
    /// The policy covers only object keys starting with this (unset: every key).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prefix: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct EndpointToggles {
    #[serde(default = "yes")]
    pub s3: bool,
    #[serde(default = "yes")]
    pub kv: bool,
}

fn yes() -> bool {
    true
}

impl Default for EndpointToggles {
    fn default() -> Self {
        Self { s3: true, kv: true }
    }
}

#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema,
)]
pub enum DeletionPolicy {
    /// Keep the tenant's data when the Tenant is deleted.
    #[default]
    Retain,
    /// Delete all of the tenant's data with the Tenant.
    Delete,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct TenantStatus {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    #[serde(default)]
    pub conditions: Vec<Condition>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub usage: Option<Usage>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub endpoints: Option<TenantEndpoints>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Usage {
    /// Bytes stored, hot and cold (what `quotas.storage` limits).
    pub storage: Option<String>,
    /// The part of `storage` on the storage nodes' disks.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hot_storage: Option<String>,
    /// The part of `storage` whose data is in the cold tier.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cold_storage: Option<String>,
    pub objects: Option<i64>,
    pub buckets: Option<i64>,
    pub kv_keys: Option<i64>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct TenantEndpoints {
    pub s3: Option<String>,
    pub kv: Option<String>,
}
