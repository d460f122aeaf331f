//! The data plane the dataflow runs: growing and sealed segments (Arrow
//! columns + vectors + per-row insert/delete timestamps), the HNSW index (built
//! with `hnsw_rs`, searched frozen), the merge policy, exact search, and the per-shard state that applies version
//! changes and answers reads.

pub mod build_pool;
pub mod distance;
pub mod filter;
pub mod frozen;
pub mod grouping;
pub mod host;
pub mod index;
pub mod json;
pub mod key_index;
pub mod merge_policy;
pub mod quantized;
pub mod segment;
pub mod shard;
pub mod topk;
pub mod vector_file;

pub use filter::Filter;
pub use frozen::FrozenGraph;
pub use index::HnswIndex;
pub use index::IndexParams;
pub use index::SealedIndex;
pub use merge_policy::MergePolicy;
pub use segment::{Restored, SealParams, Segment, SegmentSnapshot};
pub use shard::{Hit, RowChanges, SearchPlan, SegmentState, Shard, ShardCheckpoint, ShardConfig, ShardStats, Stop};
pub use topk::{DistanceRange, SearchBounds};
pub use vector_file::VectorFiles;
