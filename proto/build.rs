//! Compiles `vectorflow/v1/vectorflow.proto` and the Milvus subset under
//! `milvus/` with protox (pure Rust), so a fresh machine needs no `protoc`,
//! and keeps each descriptor set for gRPC server reflection.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let out_dir = std::path::PathBuf::from(std::env::var("OUT_DIR")?);
    // No generated Milvus client: its `Connect` RPC would clash with the
    // client's own `connect` constructor (tests call it through tonic's
    // generic client instead).
    let sets: [(&[&str], &str, bool); 2] = [
        (&["vectorflow/v1/vectorflow.proto"], "vectorflow_descriptor.bin", true),
        (&["milvus/common.proto", "milvus/schema.proto", "milvus/milvus.proto"], "milvus_descriptor.bin", false),
    ];
    for (protos, descriptor_file, client) in sets {
        for proto in protos {
            println!("cargo:rerun-if-changed={proto}");
        }
        let descriptors = protox::compile(protos, ["."])?;
        std::fs::write(out_dir.join(descriptor_file), prost::Message::encode_to_vec(&descriptors))?;
        tonic_prost_build::configure().build_client(client).compile_fds(descriptors)?;
    }
    Ok(())
}
