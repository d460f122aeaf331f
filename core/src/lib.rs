//! Types shared by every Vectorflow crate: collection schemas, values and
//! primary keys, hybrid timestamps, write batches and the one error enum.

pub mod batch;
pub mod cluster;
pub mod error;
pub mod role;
pub mod schema;
pub mod time;
pub mod value;

pub use batch::{IpcBatch, Row, WriteBatch};
pub use cluster::ClusterConfig;
pub use error::{Error, Result};
pub use role::Role;
pub use schema::{
    CollectionId, CollectionSchema, DYNAMIC_FIELD_NAME, DataType, FieldSchema, Metric, check_alias,
    check_partition_name,
};
pub use time::{Timestamp, Tso};
pub use value::{Pk, Value, VersionId, quote, quote_at_most, string_literal};
