//! Connectors: the embedded write-ahead log (the log the dataflow reads when
//! no Kafka is configured), the object store (catalog, manifests, segment
//! files), dataset import and synthetic datasets.

pub mod catalog;
pub mod dataset;
pub mod kafka;
mod kafka_bindings;
pub mod kafka_record;
pub mod kafka_sink;
pub mod log;
pub mod manifest;
pub mod npy;
pub mod parquet_io;
pub mod power_cut;
pub mod store;
pub mod synth;

pub use catalog::{CatalogEntry, CatalogStore, SinkDefinition};
pub use dataset::Dataset;
pub use kafka::{KafkaConfig, KafkaLog, KafkaReader, PartitionLag};
pub use kafka_record::RecordFormat;
pub use log::{EmbeddedLog, LogEntry, LogOp, LogPoll, LogReader, LogRecord};
pub use manifest::{Checkpoint, IndexFiles, Manifest, SegmentFiles};
pub use store::{Durability, ObjectRef, ObjectStorage, StorageConfig};
