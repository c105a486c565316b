//! The operator's one error type; each variant is also a metric label.

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("Kubernetes API: {0}")]
    Kube(#[from] kube::Error),
    #[error("storage node admin API: {0}")]
    Admin(String),
    #[error("{0}")]
    Invalid(String),
    #[error("finalizer: {0}")]
    Finalizer(String),
    /// Some objects could not be applied (the rest were, and the status was written).
    #[error("{0}")]
    Apply(String),
}

impl Error {
    pub fn metric_label(&self) -> &'static str {
        match self {
            Error::Kube(kube::Error::Api(s)) if s.code == 403 => "forbidden",
            Error::Kube(_) => "kube",
            Error::Admin(_) => "admin_api",
            Error::Invalid(_) => "invalid",
            Error::Finalizer(_) => "finalizer",
            Error::Apply(_) => "apply",
        }
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
