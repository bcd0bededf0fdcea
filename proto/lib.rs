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

/// The protobuf codec of every RPC in the contract: prost's, with buffers
/// sized for this service's messages instead of tonic's 8 KiB default.
///
/// Every open call holds one of these buffers for its whole life (a
/// subscription, for one, is a call that never ends), so on a daemon with a
/// thousand subscribers the default costs about 8 MiB before any message
/// flows. Messages here are a few hundred bytes; a buffer still grows when a
/// larger one or a burst needs it.
#[derive(Debug)]
pub struct Codec<T, U>(std::marker::PhantomData<(T, U)>);

impl<T, U> Default for Codec<T, U> {
    fn default() -> Self {
        Self(std::marker::PhantomData)
    }
}

/// The first capacity of a call's encode and decode buffers, bytes.
pub const CODEC_BUFFER_SIZE: usize = 512;

/// How many bytes of a response stream are encoded before they are handed to
/// HTTP/2 (tonic's default).
const CODEC_YIELD_THRESHOLD: usize = 32 * 1024;

impl<T, U> tonic::codec::Codec for Codec<T, U>
where
    T: prost::Message + Send + 'static,
    U: prost::Message + Default + Send + 'static,
{
    type Encode = T;
    type Decode = U;
    type Encoder = tonic_prost::ProstEncoder<T>;
    type Decoder = tonic_prost::ProstDecoder<U>;

    fn encoder(&mut self) -> Self::Encoder {
        tonic_prost::ProstEncoder::new(buffer_settings())
    }

    fn decoder(&mut self) -> Self::Decoder {
        tonic_prost::ProstDecoder::new(buffer_settings())
    }
}

fn buffer_settings() -> tonic::codec::BufferSettings {
    tonic::codec::BufferSettings::new(CODEC_BUFFER_SIZE, CODEC_YIELD_THRESHOLD)
}

/// The encoded `FileDescriptorSet` of the contract, for gRPC reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/relay_sidecar_descriptor.bin"));

/// The fully qualified service name, as used by gRPC health checks.
pub const SERVICE_NAME: &str = "relay_sidecar.v1.RelaySidecar";

pub use prost;
pub use prost_types;
pub use tonic;
