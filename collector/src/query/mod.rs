//! Query APIs on `--http-addr`: the Jaeger-compatible API under `/api/` ([`jaeger`]), the
//! project's own OTLP-native API under `/api/v1/` ([`native`]) and, for the dashboard, a
//! read-only proxy to the service registry under `/api/v1/registry/` ([`registry`]). All are
//! documented in `docs/API.md`.

pub mod chart;
pub mod jaeger;
pub mod json;
pub mod native;
pub mod params;
pub mod registry;

use axum::Json;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde_json::json;

use crate::store::StoreError;

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("invalid parameter {name}: {message}")]
    BadParam { name: &'static str, message: String },
    #[error("{0}")]
    NotFound(String),
    #[error("the query failed")]
    Internal,
    #[error("the registry at {url} is unreachable: {reason}")]
    RegistryUnreachable { url: String, reason: String },
}

impl ApiError {
    pub fn bad(name: &'static str, message: String) -> Self {
        Self::BadParam { name, message }
    }

    pub fn status(&self) -> StatusCode {
        match self {
            Self::BadParam { .. } => StatusCode::BAD_REQUEST,
            Self::NotFound(_) => StatusCode::NOT_FOUND,
            Self::Internal => StatusCode::INTERNAL_SERVER_ERROR,
            Self::RegistryUnreachable { .. } => StatusCode::BAD_GATEWAY,
        }
    }
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> Self {
        // Logged once here; the client gets no database details.
        tracing::error!(error = %e, "query failed");
        Self::Internal
    }
}

/// The native API's error body: `{"error": "...", "param": "..."}`.
impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let param = match &self {
            Self::BadParam { name, .. } => Some(*name),
            _ => None,
        };
        (self.status(), Json(json!({ "error": self.to_string(), "param": param }))).into_response()
    }
}
