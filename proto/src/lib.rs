//! Wire types of the simclr-cluster gRPC services (generated from `cluster/v1/*.proto` at build time)
//! and their conversions to the domain types of `simclr-common`. Nothing outside this crate builds or
//! reads wire messages field by field except the service handlers at the edge.

pub mod cluster {
    pub mod v1 {
        tonic::include_proto!("simclr.cluster.v1");
    }
}

/// TensorBoard's event records (the scalar part of its schema), for `tfevents` files.
pub mod tensorboard {
    tonic::include_proto!("tensorboard");
}

pub mod client;
mod convert;
pub mod health;
pub mod tls;

pub use convert::{peer_table_from_wire, peer_table_to_wire};

pub use cluster::v1 as wire;

/// Metadata key that carries the cluster token on every call, when the job has one.
pub const TOKEN_METADATA_KEY: &str = "x-simclr-token";
