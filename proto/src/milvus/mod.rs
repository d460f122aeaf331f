//! Milvus wire compatibility: the generated code of the Milvus protocol
//! subset under `proto/milvus/`, and conversions between its messages and
//! the engine's types (schemas, columns, requests, statuses). Like the
//! `vectorflow.v1` conversions, every conversion from the wire checks its
//! input and names the field in its error; nothing here panics on what a
//! client sends.

/// Generated code. The three packages are siblings, as in Milvus, so the
/// generated `super::common::…` paths resolve.
#[allow(clippy::all, missing_docs)]
pub mod pb {
    pub mod common {
        tonic::include_proto!("milvus.proto.common");
    }
    pub mod schema {
        tonic::include_proto!("milvus.proto.schema");
    }
    pub mod milvus {
        tonic::include_proto!("milvus.proto.milvus");
    }
}

/// The encoded `FileDescriptorSet` of the Milvus subset, for gRPC reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/milvus_descriptor.bin"));

pub mod columns;
pub mod request;
pub mod schema;
pub mod status;
