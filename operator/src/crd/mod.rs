//! The user-facing API: `StorageCluster` and `Tenant` in `granary.dev/v1alpha1`.
//!
//! Validation lives in the schema (OpenAPI bounds and CEL rules), so the apiserver
//! refuses bad resources with a clear message before the operator ever sees them.

mod storage_cluster;
mod tenant;

use kube::CustomResourceExt;
use serde::{Deserialize, Serialize};

pub use storage_cluster::*;
pub use tenant::*;

pub const GROUP: &str = "granary.dev";
pub const VERSION: &str = "v1alpha1";

/// A reference to a key of a Secret in the same namespace as the referring object.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SecretKeyRef {
    /// Name of the Secret.
    #[schemars(length(min = 1, max = 253))]
    pub name: String,
    /// Key within the Secret.
    #[schemars(length(min = 1, max = 253))]
    pub key: String,
}

/// A reference to a whole Secret in the same namespace.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SecretRef {
    #[schemars(length(min = 1, max = 253))]
    pub name: String,
}

/// Both CRDs as one multi-document YAML stream (what `granary-operator crd` prints and
/// what `crds/` holds).
pub fn crds_yaml() -> anyhow::Result<String> {
    let mut out = String::new();
    for crd in [StorageCluster::crd(), Tenant::crd()] {
        out.push_str("---\n");
        out.push_str(&serde_yaml::to_string(&crd)?);
    }
    Ok(out)
}
