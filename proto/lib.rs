//! The gRPC contract of relay-sidecar, generated from
//! `proto/relay_sidecar/v1/relay_sidecar.proto` at build time.
//!
//! The daemon implements [`v1::relay_sidecar_server::RelaySidecar`]; clients
//! use [`v1::relay_sidecar_client::RelaySidecarClient`] (or the friendlier
//! `relay-sidecar-client` crate).

/// Package `relay_sidecar.v1`: the service `RelaySidecar` and its messages.
pub mod v1 {
    #![allow(missing_docs, missing_debug_implementations, clippy::all)]
    tonic::include_proto!("relay_sidecar.v1");
}

/// The encoded `FileDescriptorSet` of the contract, for gRPC reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/relay_sidecar_descriptor.bin"));

/// The fully qualified service name, as used by gRPC health checks.
pub const SERVICE_NAME: &str = "relay_sidecar.v1.RelaySidecar";

pub use prost;
pub use prost_types;
pub use tonic;
