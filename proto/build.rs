//! Compiles `vectorflow/v1/vectorflow.proto` with protox (pure Rust), so a
//! fresh machine needs no `protoc`, and keeps the descriptor set for gRPC
//! server reflection.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let proto = "vectorflow/v1/vectorflow.proto";
    println!("cargo:rerun-if-changed={proto}");
    let descriptors = protox::compile([proto], ["."])?;
    let out_dir = std::path::PathBuf::from(std::env::var("OUT_DIR")?);
    std::fs::write(out_dir.join("vectorflow_descriptor.bin"), prost::Message::encode_to_vec(&descriptors))?;
    tonic_prost_build::configure().compile_fds(descriptors)?;
    Ok(())
}
