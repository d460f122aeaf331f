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

use vectorflow_core::{Metric, Result};

/// The value of `key` among Milvus's key-value parameters.
pub(crate) fn param<'a>(params: &'a [pb::common::KeyValuePair], key: &str) -> Option<&'a str> {
    params.iter().find(|p| p.key == key).map(|p| p.value.as_str())
}

/// The `metric_type` among `params`, when one is given (blank is none).
pub(crate) fn metric_param(params: &[pb::common::KeyValuePair]) -> Result<Option<Metric>> {
    match param(params, "metric_type").map(str::trim) {
        Some("") | None => Ok(None),
        Some(text) => Ok(Some(text.parse()?)),
    }
}

pub mod columns;
pub mod request;
pub mod schema;
pub mod status;
