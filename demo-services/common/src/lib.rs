//! What every Switchyard demo service shares, and nothing more: telemetry setup and the HTTP/gRPC
//! instrumentation that follows the OpenTelemetry semantic conventions (`telemetry`, `http`), the
//! registry client (`registry`), graceful shutdown (`shutdown`), the one mapping from errors to
//! HTTP statuses and gRPC codes (`error`), resilience (`resilience`) and the flags every service
//! takes (`args`).

pub mod args;
pub mod db;
pub mod error;
pub mod http;
pub mod registry;
pub mod resilience;
pub mod service;
pub mod shutdown;
pub mod telemetry;

pub use error::ApiError;
