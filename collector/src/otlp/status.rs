//! Errors of the ingest path and their one mapping to an HTTP status and a gRPC code.

use http::StatusCode;
use tonic::Code;

use crate::store::StoreError;

#[derive(Debug, thiserror::Error)]
pub enum IngestError {
    /// The body cannot be decoded: the message names what is wrong.
    #[error("{0}")]
    Malformed(String),
    #[error("unsupported Content-Type {0:?}: use application/x-protobuf or application/json")]
    UnsupportedContentType(String),
    #[error("unsupported Content-Encoding {0:?}: use gzip or send the body uncompressed")]
    UnsupportedEncoding(String),
    #[error("request body is larger than the limit of {limit} bytes{}", if *.decompressed { " after decompression" } else { "" })]
    TooLarge { limit: usize, decompressed: bool },
    /// Decoded, the request would take more than the whole in-flight budget (many tiny items).
    #[error("decoded, this export would take {decoded} bytes, more than the limit of {limit} bytes of export requests in flight: send fewer items a request")]
    DecodesTooLarge { decoded: usize, limit: usize },
    #[error("the collector is overloaded: retry later")]
    Overloaded,
    /// The in-flight byte budget (`--max-inflight-bytes`) is spent.
    #[error("the collector holds its limit of {limit} bytes of export requests in flight: retry later")]
    Busy { limit: usize },
    #[error("the collector is shutting down: retry later")]
    ShuttingDown,
    #[error("the collector could not store the data ({0}): retry later")]
    Storage(String),
}

impl From<StoreError> for IngestError {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::Overloaded => Self::Overloaded,
            StoreError::Closed => Self::ShuttingDown,
            e => Self::Storage(e.to_string()),
        }
    }
}

impl IngestError {
    /// The single mapping from an ingest error to both protocols' status codes.
    pub fn codes(&self) -> (StatusCode, Code) {
        match self {
            Self::Malformed(_) => (StatusCode::BAD_REQUEST, Code::InvalidArgument),
            Self::UnsupportedContentType(_) | Self::UnsupportedEncoding(_) => (StatusCode::UNSUPPORTED_MEDIA_TYPE, Code::InvalidArgument),
            Self::TooLarge { .. } | Self::DecodesTooLarge { .. } => (StatusCode::PAYLOAD_TOO_LARGE, Code::ResourceExhausted),
            Self::Overloaded | Self::Busy { .. } | Self::ShuttingDown => (StatusCode::SERVICE_UNAVAILABLE, Code::Unavailable),
            Self::Storage(_) => (StatusCode::SERVICE_UNAVAILABLE, Code::Unavailable),
        }
    }

    /// Seconds a client should wait before retrying, where retrying makes sense.
    pub fn retry_after(&self) -> Option<u32> {
        match self {
            Self::Overloaded | Self::Busy { .. } | Self::ShuttingDown | Self::Storage(_) => Some(1),
            _ => None,
        }
    }

    /// A short label for the requests metric.
    pub fn outcome(&self) -> &'static str {
        match self {
            Self::Malformed(_) => "malformed",
            Self::UnsupportedContentType(_) | Self::UnsupportedEncoding(_) => "unsupported",
            Self::TooLarge { .. } | Self::DecodesTooLarge { .. } => "too_large",
            Self::Overloaded | Self::Busy { .. } => "overloaded",
            Self::ShuttingDown => "shutting_down",
            Self::Storage(_) => "storage_error",
        }
    }
}

impl From<IngestError> for tonic::Status {
    fn from(e: IngestError) -> Self {
        let mut status = tonic::Status::new(e.codes().1, e.to_string());
        if let IngestError::Busy { limit } = e {
            // Lets the HTTP side tell this refusal from other body errors (see `inflight`).
            status.metadata_mut().insert(super::inflight::LIMIT_KEY, limit.into());
        }
        status
    }
}
