//! The log the engine writes and the dataflow reads: one [`Log`] trait,
//! implemented by the embedded log (`embedded.rs`) and by Kafka topics
//! (`kafka.rs`). The engine asks the log for what it needs, never which
//! log it has; where only one of them has something to do (Kafka's
//! registrations, syncs and dead letters, the embedded log's truncation and
//! replay), the other's implementation does nothing.

mod embedded;
mod kafka;

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use vectorflow_connectors::LogReader;
use vectorflow_core::batch::WriteBatch;
use vectorflow_core::{CollectionId, CollectionSchema, Pk, Result, Timestamp, Tso};

use crate::engine::IngestStats;

/// Per collection, the log positions its newest checkpoint resumes from.
pub(crate) type CheckpointPositions = HashMap<CollectionId, Vec<u64>>;

pub(crate) trait Log: Send + Sync {
    /// The timestamp oracle writes and reads draw from.
    fn tso(&self) -> &Tso;

    /// Appends validated rows of `collection` and returns their keys and
    /// the write's timestamp once they are durable. With `auto_id_field`,
    /// the rows' keys in that field are placeholders, replaced by ids drawn
    /// from timestamps the write reserves.
    fn append_rows(
        &self,
        collection: CollectionId,
        write: WriteBatch,
        auto_id_field: Option<usize>,
        timeout: Duration,
    ) -> Result<(Vec<Pk>, Timestamp)>;

    /// Appends deletes of `pks`; returns the write's timestamp once durable.
    fn append_deletes(&self, collection: CollectionId, pks: &[Pk], timeout: Duration) -> Result<Timestamp>;

    /// What worker `worker` of `peers` reads (`None`: nothing), from
    /// `replay_from` (see [`Log::replay_start`]); `wake` is called when
    /// records arrive, for a log that can tell.
    fn reader(
        &self,
        worker: usize,
        peers: usize,
        replay_from: &[u64],
        wake: Box<dyn Fn() + Send>,
    ) -> Result<Option<Box<dyn LogReader>>>;

    /// Where `collection`'s records end now: a checkpoint is due when its
    /// manifest's positions differ.
    fn positions(&self, collection: CollectionId) -> Result<Vec<u64>>;

    /// Where reading `collection` resumes after a checkpoint at `ts`: per
    /// partition, the position of its first record after `ts`.
    fn positions_after(&self, collection: CollectionId, ts: Timestamp) -> Result<Vec<u64>>;

    /// Where a collection created at `created_ts` starts reading.
    fn start_positions(&self, created_ts: Timestamp) -> Result<Vec<u64>>;

    /// Starts following `collection` from `positions` (at its creation, or
    /// its manifest's at recovery).
    fn follow(&self, _collection: CollectionId, _schema: Arc<CollectionSchema>, _positions: &[u64]) -> Result<()> {
        Ok(())
    }

    /// Stops following a dropped collection.
    fn unfollow(&self, _collection: CollectionId) -> Result<()> {
        Ok(())
    }

    /// The catalog lists `listed` and has given out every id below
    /// `next_id`: what the log kept for other collections can go.
    fn catalog_listed(&self, _listed: &HashSet<CollectionId>, _next_id: CollectionId) {}

    /// Where the readers' replay starts after recovery, per partition, for
    /// a log whose readers read every collection.
    fn replay_start(&self, _checkpoints: &CheckpointPositions) -> Vec<u64> {
        Vec::new()
    }

    /// Records between `replay_from` and the log's end: the replay's work.
    fn records_to_replay(&self, _replay_from: &[u64]) -> u64 {
        0
    }

    /// Records held here, not yet covered by every collection's checkpoint.
    fn held_records(&self) -> Result<u64> {
        Ok(0)
    }

    /// Grows with every write: the stall report compares it with the applied frontier.
    fn written(&self) -> u64;

    /// A checkpoint of `collection` is published (`checkpoints`: every
    /// collection's newest, this one's included): what every checkpoint
    /// covers may go.
    fn checkpointed(&self, collection: CollectionId, checkpoints: &CheckpointPositions) -> Result<()>;

    /// Delivers what the log's readers handed on (dead letters) before a
    /// checkpoint moves past the records they came from.
    fn flush(&self) -> Result<()> {
        Ok(())
    }

    /// The time the replay at open must pass: that of the log's end now
    /// (after waiting up to `timeout` for the readers to reach it), or
    /// `None` when there is nothing to wait for.
    fn replay_target(&self, timeout: Duration) -> Result<Option<Timestamp>> {
        // Everything an external log holds now is the "log at open".
        self.sync(None, timeout)?;
        Ok(Some(self.tso().next_possible()))
    }

    /// Waits until the readers have read every record acknowledged so far
    /// (of `collection`, or of every collection).
    fn sync(&self, _collection: Option<CollectionId>, _timeout: Duration) -> Result<()> {
        Ok(())
    }

    /// How an external log's topic of `collection` (named `name`) is read.
    fn ingest_stats(&self, _collection: CollectionId, _name: &str) -> Result<Option<IngestStats>> {
        Ok(None)
    }

    /// Whether records may reach a collection without passing through the
    /// engine's writes (producers writing to an external log's topic):
    /// such rows are not routed by a partition key.
    fn takes_outside_records(&self) -> bool {
        false
    }
}

/// Replaces placeholder auto ids with `first..`, ids from the write's reserved timestamps.
fn with_auto_ids(write: WriteBatch, pk_index: usize, first: i64) -> Result<WriteBatch> {
    let rows = write.batch.num_rows() as i64;
    let ids = arrow::array::Int64Array::from_iter_values(first..first + rows);
    let mut columns = write.batch.columns().to_vec();
    columns[pk_index] = Arc::new(ids);
    let batch = arrow::record_batch::RecordBatch::try_new(write.batch.schema(), columns)?;
    Ok(WriteBatch { batch, pks: (first..first + rows).map(Pk::Int).collect() })
}
