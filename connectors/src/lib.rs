//! Connectors: the embedded write-ahead log (the log the dataflow reads when
//! no Kafka is configured), the catalog store, and dataset import.

pub mod catalog;
pub mod dataset;
pub mod log;
pub mod npy;

pub use catalog::{CatalogEntry, CatalogStore};
pub use dataset::Dataset;
pub use log::{EmbeddedLog, LogEntry, LogOp, LogPoll, LogReader, LogRecord};
