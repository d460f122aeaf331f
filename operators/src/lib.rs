//! The data plane the dataflow runs: growing and sealed segments (Arrow
//! columns + vectors + per-row insert/delete timestamps), the HNSW index over
//! `hnsw_rs`, exact search, and the per-shard state that applies version
//! changes and answers reads.

pub mod distance;
pub mod filter;
pub mod index;
pub mod json;
pub mod segment;
pub mod shard;
pub mod topk;

pub use filter::Filter;
pub use index::HnswIndex;
pub use index::IndexParams;
pub use segment::{Segment, SegmentSnapshot};
pub use shard::{CompactionPolicy, Hit, SearchPlan, SegmentState, Shard, ShardConfig, ShardStats, Stop};
