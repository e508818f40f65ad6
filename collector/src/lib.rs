//! Switchyard's collector: OTLP ingest (gRPC and HTTP) into SQLite, and query APIs.
//! See `ARCHITECTURE.md` at the repository root for the map.

pub mod app;
pub mod config;
pub mod exposition;
pub mod fuzz;
pub mod listen;
pub mod metrics;
pub mod otlp;
pub mod prometheus_otlp;
pub mod query;
pub mod store;
