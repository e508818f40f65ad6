//! The inventory's contract, shared with its clients (orders, the gateway): the gRPC service.

pub mod proto {
    tonic::include_proto!("switchyard.inventory.v1");
}

/// The gRPC service name, as in `rpc.service`.
pub const SERVICE: &str = "switchyard.inventory.v1.Inventory";
