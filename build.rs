//! Compiles the contract in proto/ into Rust with protox (no system protoc),
//! and keeps the encoded file descriptor set for gRPC reflection.

use std::path::PathBuf;

use prost::Message;

const PROTO: &str = "proto/relay_sidecar/v1/relay_sidecar.proto";

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo::rerun-if-changed={PROTO}");
    let out_dir = PathBuf::from(std::env::var("OUT_DIR")?);
    let fds = protox::compile([PROTO], ["proto"])?;
    std::fs::write(
        out_dir.join("relay_sidecar_descriptor.bin"),
        fds.encode_to_vec(),
    )?;
    tonic_prost_build::configure()
        .codec_path("crate::Codec")
        .compile_fds(fds)?;
    Ok(())
}
