//! # Vectorflow
//!
//! A streaming vector database: writes go to a log, a timely/differential
//! dataflow turns them into growing and sealed (HNSW-indexed) segments, and
//! reads travel through the same dataflow with consistency levels and time
//! travel.
//!
//! ```no_run
//! use vectorflow::{CollectionSchema, Engine, EngineConfig, FieldSchema, Metric, SearchOptions, row};
//!
//! # fn main() -> vectorflow::Result<()> {
//! let engine = Engine::open(EngineConfig::new("/tmp/vectorflow-demo"))?;
//! engine.create_collection(CollectionSchema::new(
//!     "docs",
//!     vec![FieldSchema::int64_primary("id", false), FieldSchema::vector("embedding", 3, Metric::COSINE)],
//! ))?;
//! let write = engine.insert_rows("docs", &[row([("id", 1i64.into()), ("embedding", vec![0.1, 0.2, 0.3].into())])])?;
//! let result = engine.search("docs", &[vec![0.1, 0.2, 0.3]], &SearchOptions::new(10))?;
//! // Time travel: the same search as of the write.
//! let then = engine.search("docs", &[vec![0.1, 0.2, 0.3]], &SearchOptions { as_of: Some(write.ts), ..SearchOptions::new(10) })?;
//! # Ok(()) }
//! ```

pub use vectorflow_connectors::{Dataset, SinkDefinition};
pub use vectorflow_connectors::{KafkaConfig, PartitionLag, RecordFormat, StorageConfig};
pub use vectorflow_core::{
    ClusterConfig, CollectionId, CollectionSchema, DataType, Error, FieldSchema, Metric, Pk, Result, Role, Row,
    Timestamp, Value,
};
pub use vectorflow_dataflow::RecoveryReport;
pub use vectorflow_dataflow::engine::CompactionReport;
pub use vectorflow_dataflow::{
    CollectionInfo, CollectionStats, Consistency, Engine, EngineConfig, EngineHealth, GetOptions, GroupBy,
    HybridOptions, IngestStats, Limits, QueryChange, QueryOptions, Ranker, ReplayProgress, SearchHit, SearchOptions,
    SearchResult, Session, SinkState, SinkStatus, SubSearch, SubscribeOptions, Subscription, SubscriptionEvent,
    WriteResult, row,
};
pub use vectorflow_operators::{Filter, IndexParams, SearchPlan};
pub use vectorflow_sql::SqlSession;

/// Lower-level crates, for tools that need them.
pub mod crates {
    pub use vectorflow_connectors as connectors;
    pub use vectorflow_core as core;
    pub use vectorflow_dataflow as dataflow;
    pub use vectorflow_operators as operators;
    pub use vectorflow_sql as sql;
}
