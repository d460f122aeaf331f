//! The timely/differential dataflow at the heart of Vectorflow, and the
//! engine that runs it.
//!
//! ```text
//!  log partitions ──► LogSource (partition p on worker p mod W)
//!                        │ ShardChunk at its log timestamp
//!                        ▼ exchange by hash(collection, pk)
//!                  ┌─────┴───────────────┐
//!                  │                     ▼
//!                  │       arrange_from_upsert (key → version)
//!                  │                     │ +1 new version / -1 retired, at t
//!                  ▼                     ▼
//!        requests ─► broadcast ─► Segments (per worker: growing + sealed
//!        (per origin worker)        segments per collection; applies
//!                                   changes when the frontier passes t;
//!                                   answers reads when it passes read_ts)
//!                                        │ partial top-k / rows
//!                                        ▼ exchange to the origin worker
//!                                      Merge ─► the caller's reply
//! ```

pub mod engine;
mod graph;
mod log;
mod messages;
pub mod persist;
pub mod routing;

pub use engine::{
    CollectionInfo, CollectionStats, Consistency, Engine, EngineConfig, EngineHealth, GetOptions, IngestStats, Limits,
    QueryOptions, ReplayProgress, SearchHit, SearchOptions, SearchResult, Session, WriteResult, row,
};
pub use persist::RecoveryReport;
