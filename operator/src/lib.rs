//! Granary's Kubernetes operator: CRD types, reconcilers and the pure builders of the
//! objects they apply.

pub mod build;
pub mod crd;
