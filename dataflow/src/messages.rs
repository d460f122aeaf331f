//! The records that flow through the dataflow. They are plain serialisable
//! data so they can cross process boundaries in a cluster.

use itertools::Itertools;
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use vectorflow_connectors::SegmentFiles;
use vectorflow_core::{CollectionId, Error, IpcBatch, Pk, Timestamp, Value, VersionId};

use vectorflow_operators::{DistanceRange, Hit, SegmentState, ShardStats};

/// Part of one log record destined for one shard.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ShardChunk {
    /// The worker owning these keys.
    pub shard: usize,
    pub collection: CollectionId,
    pub ts: Timestamp,
    pub body: ChunkBody,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum ChunkBody {
    /// Rows with their keys and version ids, aligned.
    Upsert {
        batch: IpcBatch,
        pks: Vec<Pk>,
        versions: Vec<VersionId>,
    },
    Delete {
        pks: Vec<Pk>,
    },
}

/// What the segment operator consumes: row payloads, and the version
/// changes the upsert arrangement derived from them.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum SegmentInput {
    Chunk(ShardChunk),
    /// `+1`: `version` is the key's current version from `ts`; `-1`: retired
    /// at `ts` (the shard finds it among `pk`'s versions).
    Change {
        collection: CollectionId,
        pk: Pk,
        version: VersionId,
        ts: Timestamp,
        diff: isize,
    },
}

/// A read (or control request) broadcast to every worker.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Request {
    pub id: u64,
    /// The worker that merges the partial answers.
    pub origin: usize,
    pub collection: CollectionId,
    /// Answer as of this time, once every change at or before it is applied.
    pub read_ts: Timestamp,
    /// Wall-clock milliseconds since the Unix epoch after which nobody
    /// waits for the answer: workers skip the request, or stop its work.
    pub deadline_ms: Option<u64>,
    pub kind: RequestKind,
    /// Workers the request goes to (see [`Request::targets`]), worked out
    /// once where it is made; the merge completes after one partial answer
    /// from each.
    pub targets: Vec<usize>,
}

impl Request {
    /// The workers that answer: for a get, only those whose shards own its
    /// keys (its answer is there and nowhere else); every worker otherwise.
    pub fn targets(collection: CollectionId, kind: &RequestKind, origin: usize, workers: usize) -> Vec<usize> {
        match kind {
            RequestKind::Get { pks, .. } => {
                let mut owners: Vec<usize> =
                    pks.iter().map(|pk| crate::routing::shard_of(collection, pk, workers)).collect();
                owners.sort_unstable();
                owners.dedup();
                if owners.is_empty() {
                    // No key: one (empty) answer, from the merging worker.
                    owners.push(origin);
                }
                owners
            }
            _ => (0..workers).collect(),
        }
    }

    /// Whether the caller has stopped waiting for this request.
    pub fn expired(&self) -> bool {
        self.deadline_ms.is_some_and(|deadline| unix_millis() >= deadline)
    }
}

/// Milliseconds since the Unix epoch (0 for a clock before it).
pub fn unix_millis() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

/// Why a worker could not answer, typed so the caller gets the right error
/// class (a bad filter is the caller's fault, a broken segment is not).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum Failure {
    Expression {
        position: usize,
        problem: String,
    },
    Field {
        field: String,
        problem: String,
    },
    Argument {
        argument: String,
        problem: String,
    },
    Exhausted {
        limit: String,
        problem: String,
    },
    Cancelled,
    /// The collection is stopped (fail-stop) by an error applying a change.
    Stopped {
        collection: String,
        cause: String,
    },
    Internal(String),
}

impl From<Error> for Failure {
    fn from(error: Error) -> Failure {
        match error {
            Error::Expression { position, problem } => Failure::Expression { position, problem },
            Error::Field { field, problem } => Failure::Field { field, problem },
            Error::InvalidArgument { argument, problem } => Failure::Argument { argument, problem },
            Error::ResourceExhausted { limit, problem } => Failure::Exhausted { limit, problem },
            Error::Cancelled => Failure::Cancelled,
            Error::CollectionFailed { collection, cause } => Failure::Stopped { collection, cause },
            other => Failure::Internal(other.to_string()),
        }
    }
}

impl From<Failure> for Error {
    fn from(failure: Failure) -> Error {
        match failure {
            Failure::Expression { position, problem } => Error::Expression { position, problem },
            Failure::Field { field, problem } => Error::Field { field, problem },
            Failure::Argument { argument, problem } => Error::InvalidArgument { argument, problem },
            Failure::Exhausted { limit, problem } => Error::ResourceExhausted { limit, problem },
            Failure::Cancelled => Error::Cancelled,
            Failure::Stopped { collection, cause } => Error::CollectionFailed { collection, cause },
            Failure::Internal(problem) => Error::Storage(problem),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum RequestKind {
    Search {
        field: usize,
        queries: Vec<Vec<f32>>,
        k: usize,
        ef: usize,
        /// Only hits at these distances (a range search); `DistanceRange::ALL` otherwise.
        range: DistanceRange,
        /// Filter expression text; the reading engine compiles it once (cached per collection and text).
        filter: Option<String>,
        output_fields: Vec<usize>,
    },
    Get {
        pks: Vec<Pk>,
        output_fields: Vec<usize>,
    },
    /// Rows passing a filter: the first `limit` in key order.
    Query {
        filter: Option<String>,
        output_fields: Vec<usize>,
        limit: usize,
    },
    Count {
        filter: Option<String>,
    },
    /// A checkpoint barrier: with exactly the changes at or before
    /// `read_ts` applied, report the sealed segments and hand the growing
    /// rows to the persister (unsealed). `known` maps the uids the newest manifest lists to the retired
    /// count stored with them (their deletes are left out when unchanged).
    Checkpoint {
        known: HashMap<String, usize>,
    },
    /// Start the merge the shard's merge policy chooses, with dead rows
    /// counted as of `horizon`.
    Compact {
        horizon: Timestamp,
    },
    Stats,
    /// Answered once the worker's process has taken in catalog version
    /// `version` (or a later one): a cluster's catalog change returns when
    /// every process knows it.
    CatalogSync {
        version: u64,
    },
    /// Process `process` of the cluster is stopping: the others stop too
    /// (timely has no partial failure, and a peer that left cleanly would
    /// otherwise leave them waiting for its progress without a word).
    Leave {
        process: usize,
    },
}

impl RequestKind {
    /// Barriers run between changes: exactly those at or before their time are applied.
    pub fn is_barrier(&self) -> bool {
        matches!(self, RequestKind::Checkpoint { .. })
    }

    /// Reads, answered from the shards off the dataflow; the rest are
    /// control requests that change shards, run by their workers.
    pub fn is_read(&self) -> bool {
        self.reads_history() || matches!(self, RequestKind::Stats)
    }

    /// The filter expression a read carries.
    pub fn filter(&self) -> Option<&str> {
        match self {
            RequestKind::Search { filter, .. } | RequestKind::Query { filter, .. } | RequestKind::Count { filter } => {
                filter.as_deref()
            }
            _ => None,
        }
    }

    /// Reads of rows, which need the history at their time.
    pub fn reads_history(&self) -> bool {
        matches!(
            self,
            RequestKind::Search { .. }
                | RequestKind::Get { .. }
                | RequestKind::Query { .. }
                | RequestKind::Count { .. }
        )
    }
}

/// One worker's answer to a request, sent to the origin.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Partial {
    pub id: u64,
    pub origin: usize,
    /// Partial answers the merge waits for (the request's `parts`).
    pub parts: usize,
    pub answer: Answer,
}

/// One shard's part of a checkpoint: its segments, each with its files
/// in the object store once its worker's process has written them
/// (`None`: the newest manifest lists it already).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ShardCheckpoint {
    pub shard: usize,
    pub segments: Vec<(SegmentState, Option<StoredFiles>)>,
}

/// A segment's files as the manifest lists them, crossing processes as
/// their manifest JSON: the manifest leaves empty fields out, which a
/// format without field names (the exchange's) cannot read back.
#[derive(Debug, Clone, PartialEq)]
pub struct StoredFiles(pub SegmentFiles);

impl Serialize for StoredFiles {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> std::result::Result<S::Ok, S::Error> {
        let text = serde_json::to_string(&self.0).map_err(serde::ser::Error::custom)?;
        serializer.serialize_str(&text)
    }
}

impl<'de> Deserialize<'de> for StoredFiles {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> std::result::Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        serde_json::from_str(&text).map(StoredFiles).map_err(serde::de::Error::custom)
    }
}

/// An answer: a worker's part, or (after the merge) the whole.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum Answer {
    Search {
        k: usize,
        hits: Vec<Vec<Hit>>,
    },
    Get(Vec<(Pk, Vec<Value>)>),
    Query {
        limit: usize,
        rows: Vec<(Pk, Vec<Value>)>,
    },
    Count(usize),
    Stats(ShardStats),
    /// Per shard (worker), its segments.
    Checkpoint(Vec<ShardCheckpoint>),
    Done,
    Failed(Failure),
    /// The read's time is before history this worker has compacted away.
    Compacted {
        horizon: Timestamp,
    },
}

impl Answer {
    /// Folds another part (another worker's, or another part of a shard's
    /// segments) into this one. Parts come sorted (hits by distance, then
    /// key order; rows by key order), so they merge in one pass: with a
    /// large `k` or `limit` a sort here cost more than the searches.
    pub fn merge(&mut self, other: Answer) {
        match (self, other) {
            (Answer::Search { k, hits }, Answer::Search { hits: more, .. }) => {
                for (mine, theirs) in hits.iter_mut().zip(more) {
                    let merged = std::mem::take(mine).into_iter().merge_by(theirs, |a, b| {
                        a.distance.total_cmp(&b.distance).then_with(|| a.pk.order_key().cmp(&b.pk.order_key())).is_le()
                    });
                    *mine = merged.take(*k).collect();
                }
            }
            (Answer::Get(rows), Answer::Get(more)) => rows.extend(more),
            (Answer::Query { limit, rows }, Answer::Query { rows: more, .. }) => {
                let merged = std::mem::take(rows).into_iter().merge_by(more, |a, b| a.0.order_key() <= b.0.order_key());
                *rows = merged.take(*limit).collect();
            }
            (Answer::Count(count), Answer::Count(more)) => *count += more,
            (Answer::Stats(stats), Answer::Stats(more)) => *stats += more,
            (Answer::Checkpoint(shards), Answer::Checkpoint(more)) => shards.extend(more),
            (Answer::Failed(_) | Answer::Compacted { .. }, _) => {}
            (this, refused @ (Answer::Failed(_) | Answer::Compacted { .. })) => *this = refused,
            (_, _) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::routing::shard_of;

    #[test]
    fn a_checkpoint_answer_crosses_processes_with_its_files_intact() {
        let files = SegmentFiles {
            uid: "s1".into(),
            rows: 3,
            data: vectorflow_connectors::ObjectRef { path: "c/1/s1/data".into(), size: 10, crc32: 7 },
            indexes: Vec::new(),
            deletes: None,
            deleted: 0,
            growing: false,
        };
        let answer = Answer::Checkpoint(vec![ShardCheckpoint {
            shard: 4,
            segments: vec![(
                SegmentState { uid: "s1".into(), rows: 3, retired: 0, deletes: None, growing: false },
                Some(StoredFiles(files.clone())),
            )],
        }]);
        let bytes = bincode::serialize(&answer).unwrap();
        let Answer::Checkpoint(parts) = bincode::deserialize::<Answer>(&bytes).unwrap() else {
            panic!("not a checkpoint")
        };
        assert_eq!(parts[0].shard, 4);
        assert_eq!(parts[0].segments[0].1, Some(StoredFiles(files)));
    }

    #[test]
    fn a_get_goes_only_to_the_workers_owning_its_keys_other_reads_to_every_worker() {
        let (collection, workers) = (7, 4);
        let pks: Vec<Pk> = (0..3).map(Pk::Int).collect();
        let get = RequestKind::Get { pks: pks.clone(), output_fields: Vec::new() };
        let mut owners: Vec<usize> = pks.iter().map(|pk| shard_of(collection, pk, workers)).collect();
        owners.sort_unstable();
        owners.dedup();
        assert_eq!(Request::targets(collection, &get, 2, workers), owners);
        let one = RequestKind::Get { pks: vec![Pk::Int(42)], output_fields: Vec::new() };
        assert_eq!(Request::targets(collection, &one, 2, workers), vec![shard_of(collection, &Pk::Int(42), workers)]);
        let none = RequestKind::Get { pks: Vec::new(), output_fields: Vec::new() };
        assert_eq!(Request::targets(collection, &none, 2, workers), vec![2], "no key: the merging worker answers");
        assert_eq!(Request::targets(collection, &RequestKind::Stats, 2, workers), vec![0, 1, 2, 3]);
    }
}
