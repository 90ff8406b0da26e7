//! Compiles `proto/` with a pure-Rust protobuf compiler, so a build needs no system `protoc`.
//! The encoded descriptor set is kept for gRPC reflection.

use std::path::PathBuf;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut protos = Vec::new();
    for entry in std::fs::read_dir("proto/dsreg/v1")? {
        let path = entry?.path();
        if path.extension().is_some_and(|e| e == "proto") {
            protos.push(path);
        }
    }
    protos.sort();
    println!("cargo:rerun-if-changed=proto");
    for proto in &protos {
        println!("cargo:rerun-if-changed={}", proto.display());
    }
    let descriptors = protox::compile(&protos, ["proto"])?;
    let out_dir = PathBuf::from(std::env::var("OUT_DIR")?);
    std::fs::write(
        out_dir.join("dsreg_descriptor.bin"),
        prost::Message::encode_to_vec(&descriptors),
    )?;
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        // prost's codec, except that a request that does not decode is INVALID_ARGUMENT.
        .codec_path("crate::api::grpc::codec::Codec")
        .compile_fds(descriptors)?;
    Ok(())
}
