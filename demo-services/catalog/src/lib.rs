//! The catalog's gRPC contract, shared with its clients (the gateway).

pub mod proto {
    tonic::include_proto!("switchyard.catalog.v1");
}
