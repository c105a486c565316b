//! Granary's Kubernetes operator: CRD types (`crd`), pure builders of the objects it
//! applies (`build`), reconcilers (`controller`) and the runtime pieces around them.

pub mod admin_client;
pub mod build;
pub mod conditions;
pub mod controller;
pub mod crd;
pub mod error;
pub mod leader;
pub mod quantity;
pub mod selector;
pub mod smoke;
