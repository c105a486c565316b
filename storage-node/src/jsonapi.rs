//! JSON error bodies shared by the KV and admin front ends:
//! `{"error": "<Code>", "message": "<text>", ...}` with a matching HTTP status.

use axum::Json;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};

use crate::model;

#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub code: &'static str,
    pub message: String,
    pub extra: Option<(&'static str, Value)>,
}

/// Accepts a request only when its `Authorization: Bearer` value equals `expected`
/// (compared in constant time); `None` refuses everyone. `why` is the 401 message.
pub fn check_bearer(
    headers: &axum::http::HeaderMap,
    expected: Option<&str>,
    why: &'static str,
) -> Result<(), ApiError> {
    let given = headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim)
        .unwrap_or("");
    match expected {
        Some(e)
            if !given.is_empty()
                && crate::types::constant_time_eq(given.as_bytes(), e.as_bytes()) =>
        {
            Ok(())
        }
        _ => Err(ApiError::new(StatusCode::UNAUTHORIZED, "Unauthorized", why)),
    }
}

impl ApiError {
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            code,
            message: message.into(),
            extra: None,
        }
    }

    /// 503 `SlowDown` for a request over its tenant's rate limit; the answer carries
    /// `Retry-After` (seconds) and `retryAfterSeconds` in its body.
    pub fn slow_down(th: &crate::tenancy::rate::Throttled) -> Self {
        Self {
            status: StatusCode::SERVICE_UNAVAILABLE,
            code: "SlowDown",
            message: format!("the tenant's {} rate limit is reached", th.limit),
            extra: Some(("retryAfterSeconds", json!(th.retry_after_secs()))),
        }
    }

    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "InvalidArgument", message)
    }

    /// 503 `ServiceUnavailable`: the client may retry.
    pub fn unavailable(message: impl Into<String>) -> Self {
        Self::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "ServiceUnavailable",
            message,
        )
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut body = json!({"error": self.code, "message": self.message});
        let retry_after = match &self.extra {
            Some(("retryAfterSeconds", v)) => v.as_u64(),
            _ => None,
        };
        if let Some((k, v)) = self.extra {
            body[k] = v;
        }
        let mut r = (self.status, Json(body)).into_response();
        if let Some(s) = retry_after {
            r.headers_mut()
                .insert(axum::http::header::RETRY_AFTER, s.into());
        }
        r
    }
}

impl From<model::Error> for ApiError {
    fn from(e: model::Error) -> Self {
        use model::Error as E;
        match e {
            E::VersionMismatch { current } => ApiError {
                status: StatusCode::PRECONDITION_FAILED,
                code: "VersionMismatch",
                message: "the key's current version does not match the condition".into(),
                extra: Some(("currentVersion", json!(current))),
            },
            E::Invalid(m) => ApiError::bad_request(m),
            E::IncompleteBody(m) => ApiError::new(StatusCode::BAD_REQUEST, "IncompleteBody", m),
            E::NoSuchKey => ApiError::new(StatusCode::NOT_FOUND, "NotFound", "no such key"),
            E::Corrupt(m) => {
                tracing::error!(error = %m, "corrupt data detected on read");
                ApiError::new(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "InternalError",
                    "stored data failed its checksum",
                )
            }
            E::NotPrimary(m) | E::QuotaUndecided(m) | E::ColdTierUnavailable(m) => {
                ApiError::unavailable(m)
            }
            E::QuotaExceeded(q) => ApiError {
                status: StatusCode::FORBIDDEN,
                code: "QuotaExceeded",
                message: q.to_string(),
                extra: Some((
                    "quota",
                    json!({"name": q.what, "limit": q.limit, "used": q.used, "adding": q.adding}),
                )),
            },
            E::NotEnoughReplicas(m) => {
                ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "NotEnoughReplicas", m)
            }
            e @ (E::Engine(_) | E::Catalog(_)) => {
                tracing::error!(error = %e, "internal error");
                ApiError::new(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "InternalError",
                    "internal error",
                )
            }
            other => ApiError::new(StatusCode::CONFLICT, "Conflict", other.to_string()),
        }
    }
}

impl From<crate::catalog::CatalogError> for ApiError {
    fn from(e: crate::catalog::CatalogError) -> Self {
        use crate::catalog::CatalogError as C;
        match e {
            C::Conflict(m) => ApiError::new(
                StatusCode::CONFLICT,
                "AlreadyExists",
                format!("{m} already exists"),
            ),
            C::NotFound(m) => {
                ApiError::new(StatusCode::NOT_FOUND, "NotFound", format!("{m} not found"))
            }
            e => {
                tracing::error!(error = %e, "catalog error");
                ApiError::new(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "InternalError",
                    "internal error",
                )
            }
        }
    }
}
