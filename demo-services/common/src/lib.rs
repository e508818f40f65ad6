//! What every Switchyard demo service shares, and nothing more: telemetry setup and the HTTP/gRPC
//! instrumentation that follows the OpenTelemetry semantic conventions (`telemetry`, `http`), the
//! registry client (`registry`), graceful shutdown (`shutdown`), the one mapping from errors to
//! HTTP statuses and gRPC codes (`error`), resilience (`resilience`) and the flags every service
//! takes (`args`).

pub mod args;
pub mod card;
pub mod clock;
pub mod db;
pub mod error;
pub mod faults;
pub mod http;
pub mod listen;
pub mod messaging;
pub mod registry;
pub mod resilience;
pub mod service;
pub mod shutdown;
pub mod telemetry;
pub mod upstream;

pub use error::ApiError;

// Services give memory back to the system (argon2's 19 MiB per hash, the memory_growth fault);
// glibc's malloc keeps it per thread arena instead.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;
