//! The one mapping from a service error to an HTTP status, a gRPC code and a JSON body, used by
//! every service. Clients learn what *they* did wrong (which field, which limit); internal details
//! are logged once here and never echoed.

use axum::Json;
use axum::extract::rejection::JsonRejection;
use axum::extract::{FromRequest, Request};
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Serialize;
use serde::de::DeserializeOwned;

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// The request is malformed; `field` names the offending field or parameter when there is one.
    #[error("{message}")]
    BadRequest { field: Option<String>, message: String },
    #[error("{0}")]
    Unauthorized(String),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    MethodNotAllowed(String),
    #[error("{message}")]
    Conflict { field: Option<String>, message: String },
    #[error("{0}")]
    TooLarge(String),
    #[error("rate limit exceeded: retry in {retry_after_secs}s")]
    TooManyRequests { retry_after_secs: u64 },
    /// No healthy upstream, shutting down.
    #[error("{0}")]
    Unavailable(String),
    /// An upstream's circuit is open; callers may retry after the given time.
    #[error("{message}")]
    CircuitOpen { message: String, retry_after_secs: u64 },
    #[error("{0}")]
    BadGateway(String),
    #[error("{0}")]
    GatewayTimeout(String),
    /// Not enough stock for what was asked.
    #[error("{0}")]
    OutOfStock(String),
    /// A card charge was declined.
    #[error("{0}")]
    PaymentRequired(String),
    /// A failure injected by a fault (see `faults`): its message names the fault.
    #[error("{0}")]
    Injected(String),
    /// Logged, never shown to the client.
    #[error("internal error")]
    Internal(String),
}

impl ApiError {
    pub fn bad_field(field: &str, message: impl Into<String>) -> Self {
        Self::BadRequest { field: Some(field.to_owned()), message: message.into() }
    }

    pub fn internal(e: impl std::fmt::Display) -> Self {
        Self::Internal(e.to_string())
    }

    /// The HTTP status and the gRPC code of this error; the only place they are chosen.
    pub fn codes(&self) -> (StatusCode, tonic::Code) {
        match self {
            Self::BadRequest { .. } => (StatusCode::BAD_REQUEST, tonic::Code::InvalidArgument),
            Self::Unauthorized(_) => (StatusCode::UNAUTHORIZED, tonic::Code::Unauthenticated),
            Self::NotFound(_) => (StatusCode::NOT_FOUND, tonic::Code::NotFound),
            Self::MethodNotAllowed(_) => (StatusCode::METHOD_NOT_ALLOWED, tonic::Code::Unimplemented),
            Self::Conflict { .. } => (StatusCode::CONFLICT, tonic::Code::AlreadyExists),
            Self::TooLarge(_) => (StatusCode::PAYLOAD_TOO_LARGE, tonic::Code::ResourceExhausted),
            Self::TooManyRequests { .. } => (StatusCode::TOO_MANY_REQUESTS, tonic::Code::ResourceExhausted),
            Self::Unavailable(_) | Self::CircuitOpen { .. } => (StatusCode::SERVICE_UNAVAILABLE, tonic::Code::Unavailable),
            Self::BadGateway(_) => (StatusCode::BAD_GATEWAY, tonic::Code::Unavailable),
            Self::GatewayTimeout(_) => (StatusCode::GATEWAY_TIMEOUT, tonic::Code::DeadlineExceeded),
            Self::OutOfStock(_) => (StatusCode::CONFLICT, tonic::Code::FailedPrecondition),
            Self::PaymentRequired(_) => (StatusCode::PAYMENT_REQUIRED, tonic::Code::FailedPrecondition),
            Self::Injected(_) | Self::Internal(_) => (StatusCode::INTERNAL_SERVER_ERROR, tonic::Code::Internal),
        }
    }

    fn kind(&self) -> &'static str {
        match self {
            Self::BadRequest { .. } => "bad_request",
            Self::Unauthorized(_) => "unauthorized",
            Self::NotFound(_) => "not_found",
            Self::MethodNotAllowed(_) => "method_not_allowed",
            Self::Conflict { .. } => "conflict",
            Self::TooLarge(_) => "too_large",
            Self::TooManyRequests { .. } => "rate_limited",
            Self::Unavailable(_) => "unavailable",
            Self::CircuitOpen { .. } => "circuit_open",
            Self::BadGateway(_) => "bad_gateway",
            Self::GatewayTimeout(_) => "timeout",
            Self::OutOfStock(_) => "out_of_stock",
            Self::PaymentRequired(_) => "payment_declined",
            Self::Injected(_) => "injected_fault",
            Self::Internal(_) => "internal",
        }
    }

    fn field(&self) -> Option<&str> {
        match self {
            Self::BadRequest { field, .. } | Self::Conflict { field, .. } => field.as_deref(),
            _ => None,
        }
    }

    /// The error a gRPC status from an upstream stands for (the inverse of [`ApiError::codes`]).
    pub fn from_grpc(s: &tonic::Status) -> Self {
        let m = s.message().to_owned();
        match s.code() {
            tonic::Code::InvalidArgument | tonic::Code::OutOfRange => Self::BadRequest { field: None, message: m },
            tonic::Code::Unauthenticated | tonic::Code::PermissionDenied => Self::Unauthorized(m),
            tonic::Code::NotFound => Self::NotFound(m),
            tonic::Code::AlreadyExists => Self::Conflict { field: None, message: m },
            tonic::Code::FailedPrecondition => Self::Conflict { field: None, message: m },
            tonic::Code::ResourceExhausted => Self::TooManyRequests { retry_after_secs: 1 },
            tonic::Code::Unavailable => Self::Unavailable(m),
            tonic::Code::DeadlineExceeded => Self::GatewayTimeout(m),
            _ => Self::BadGateway(m),
        }
    }

    /// The JSON body every service answers errors with.
    pub fn body(&self) -> ErrorBody {
        ErrorBody { error: ErrorDetail { code: self.kind(), message: self.to_string(), field: self.field().map(str::to_owned) } }
    }
}

#[derive(Debug, Serialize)]
pub struct ErrorBody {
    pub error: ErrorDetail,
}

#[derive(Debug, Serialize)]
pub struct ErrorDetail {
    pub code: &'static str,
    pub message: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub field: Option<String>,
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        if let Self::Internal(detail) = &self {
            tracing::error!(error = %detail, "internal error");
        }
        let (status, _) = self.codes();
        let mut resp = (status, Json(self.body())).into_response();
        let headers = resp.headers_mut();
        match &self {
            Self::Unauthorized(message) => {
                let value = format!("Bearer realm=\"switchyard\", error=\"invalid_token\", error_description=\"{}\"", message.replace('"', "'"));
                if let Ok(v) = HeaderValue::from_str(&value) {
                    headers.insert(header::WWW_AUTHENTICATE, v);
                }
            }
            Self::TooManyRequests { retry_after_secs } | Self::CircuitOpen { retry_after_secs, .. } => {
                headers.insert(header::RETRY_AFTER, HeaderValue::from(*retry_after_secs));
            }
            Self::Unavailable(_) => {
                headers.insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
            }
            _ => {}
        }
        resp
    }
}

impl From<ApiError> for tonic::Status {
    fn from(e: ApiError) -> Self {
        if let ApiError::Internal(detail) = &e {
            tracing::error!(error = %detail, "internal error");
        }
        tonic::Status::new(e.codes().1, e.to_string())
    }
}

/// An integer query parameter from 1 to `max`, `default` when absent; a 400 naming it otherwise.
pub fn int_param(value: Option<&String>, name: &str, default: i64, max: i64) -> Result<i64, ApiError> {
    match value {
        None => Ok(default),
        Some(v) => v
            .parse::<i64>()
            .ok()
            .filter(|n| (1..=max).contains(n))
            .ok_or_else(|| ApiError::bad_field(name, format!("{name} must be an integer from 1 to {max}, got {v:?}"))),
    }
}

/// A JSON request body whose rejection is an [`ApiError`] naming the problem (axum reports the
/// path of the offending field, e.g. `email: invalid type: integer`).
pub struct JsonBody<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequest<S> for JsonBody<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        match Json::<T>::from_request(req, state).await {
            Ok(Json(v)) => Ok(Self(v)),
            Err(rejection) => Err(json_rejection(rejection)),
        }
    }
}

fn json_rejection(r: JsonRejection) -> ApiError {
    let message = match &r {
        JsonRejection::MissingJsonContentType(_) => "expected a JSON body with `Content-Type: application/json`".to_owned(),
        _ => r
            .body_text()
            .replace("Failed to deserialize the JSON body into the target type: ", "invalid JSON body: ")
            .replace("Failed to parse the request body as JSON: ", "invalid JSON body: "),
    };
    let field = field_of(&message);
    ApiError::BadRequest { field, message }
}

/// The field a serde error message names: "missing field `x`", or "x: invalid type …" / "x.y: …".
fn field_of(message: &str) -> Option<String> {
    if let Some(rest) = message.split("missing field `").nth(1) {
        return rest.split('`').next().map(str::to_owned);
    }
    let body = message.strip_prefix("invalid JSON body: ")?;
    let (path, _) = body.split_once(": ")?;
    (!path.contains(' ')).then(|| path.to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fields_are_found_in_serde_messages() {
        assert_eq!(field_of("invalid JSON body: missing field `email` at line 1 column 2").as_deref(), Some("email"));
        assert_eq!(field_of("invalid JSON body: lease.durationSecs: invalid type: string").as_deref(), Some("lease.durationSecs"));
        assert_eq!(field_of("invalid JSON body: expected value at line 1 column 1"), None);
    }

    #[test]
    fn every_error_has_one_status_and_code() {
        let e = ApiError::bad_field("email", "email is not an address");
        assert_eq!(e.codes(), (StatusCode::BAD_REQUEST, tonic::Code::InvalidArgument));
        let body = serde_json::to_value(e.body()).unwrap_or_default();
        assert_eq!(body["error"]["field"], "email");
        assert_eq!(ApiError::GatewayTimeout("x".into()).codes().0, StatusCode::GATEWAY_TIMEOUT);
    }
}
