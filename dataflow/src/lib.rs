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
//!   control requests ─► Segments (per worker: growing + sealed segments
//!   (checkpoints,          per collection, in Shared::shards; applies
//!    compactions)          changes when the frontier passes t, then
//!                          publishes applied[w])
//!                                        │ partial answers
//!                                        ▼ exchange to the origin worker
//!                                      Merge ─► the caller's reply
//!
//!  reads ─► wait until applied[w] > read_ts ─► each shard under its read
//!           lock (caller's thread + search pool) ─► merge on the caller
//! ```

pub mod engine;
mod graph;
mod log;
mod messages;
pub mod persist;
pub mod routing;
mod shards;
mod shared;
mod watches;

pub use engine::{
    CollectionInfo, CollectionStats, Consistency, Engine, EngineConfig, EngineHealth, GetOptions, GroupBy,
    HybridOptions, IngestStats, Limits, QueryChange, QueryOptions, Ranker, ReplayProgress, SearchHit, SearchOptions,
    SearchResult, Session, SinkState, SinkStatus, SubSearch, SubscribeOptions, Subscription, SubscriptionEvent,
    WriteResult, row,
};
pub use persist::RecoveryReport;
