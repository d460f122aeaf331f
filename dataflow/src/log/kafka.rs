//! Kafka topics, one per collection: each collection's sources seek to its
//! own checkpoint, commits move with its checkpoints, and writes wait for
//! the brokers and then for the sources to read them.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use vectorflow_connectors::{KafkaLog, LogReader};
use vectorflow_core::batch::WriteBatch;
use vectorflow_core::{CollectionId, CollectionSchema, Error, Pk, Result, Timestamp, Tso};

use super::{CheckpointPositions, Log, with_auto_ids};
use crate::engine::IngestStats;

impl Log for Arc<KafkaLog> {
    fn takes_outside_records(&self) -> bool {
        true
    }

    fn tso(&self) -> &Tso {
        KafkaLog::tso(self)
    }

    fn append_rows(
        &self,
        collection: CollectionId,
        write: WriteBatch,
        auto_id_field: Option<usize>,
        timeout: Duration,
    ) -> Result<(Vec<Pk>, Timestamp)> {
        // Auto ids from reserved timestamps, as in the embedded log; the
        // records carry them as keys.
        let write = match auto_id_field {
            Some(field) => {
                let first = self.tso().allocate(write.batch.num_rows() as u64) as i64;
                with_auto_ids(write, field, first)?
            }
            None => write,
        };
        let ts = self.write(collection, Some(&write), &[], timeout)?;
        Ok((write.pks, ts))
    }

    fn append_deletes(&self, collection: CollectionId, pks: &[Pk], timeout: Duration) -> Result<Timestamp> {
        self.write(collection, None, pks, timeout)
    }

    /// Kafka's readers are polled: `wake` is not needed.
    fn reader(
        &self,
        worker: usize,
        _peers: usize,
        _replay_from: &[u64],
        _wake: Box<dyn Fn() + Send>,
    ) -> Result<Option<Box<dyn LogReader>>> {
        Ok(Some(Box::new(KafkaLog::reader(self, worker)?)))
    }

    fn positions(&self, collection: CollectionId) -> Result<Vec<u64>> {
        KafkaLog::positions(self, collection)
    }

    fn positions_after(&self, collection: CollectionId, ts: Timestamp) -> Result<Vec<u64>> {
        KafkaLog::positions_after(self, collection, ts)
    }

    /// A topic is read from its beginning (Kafka's `earliest`).
    fn start_positions(&self, _created_ts: Timestamp) -> Result<Vec<u64>> {
        Ok(Vec::new())
    }

    fn follow(&self, collection: CollectionId, schema: Arc<CollectionSchema>, positions: &[u64]) -> Result<()> {
        self.register(collection, schema, positions)
    }

    fn unfollow(&self, collection: CollectionId) -> Result<()> {
        self.unregister(collection)
    }

    /// A replica replays what its primary had bound when it opened (the
    /// primary may be down: nothing later can be read then).
    fn replay_target(&self, timeout: Duration) -> Result<Option<Timestamp>> {
        if self.is_replica() {
            return Ok(self.published_frontier().checked_sub(1));
        }
        self.sync(None, timeout)?;
        Ok(Some(self.tso().next_possible()))
    }

    fn catalog_listed(&self, listed: &HashSet<CollectionId>, next_id: CollectionId) {
        self.forget_unfollowed(listed, next_id);
    }

    /// The oracle's time: the sources bind records to it.
    fn written(&self) -> u64 {
        self.tso().next_possible()
    }

    fn checkpointed(&self, collection: CollectionId, checkpoints: &CheckpointPositions) -> Result<()> {
        let positions = checkpoints
            .get(&collection)
            .ok_or_else(|| Error::Internal(format!("no checkpoint of collection {collection} to commit")))?;
        KafkaLog::checkpointed(self, collection, positions)
    }

    fn flush(&self) -> Result<()> {
        self.flush_producer()
    }

    fn sync(&self, collection: Option<CollectionId>, timeout: Duration) -> Result<()> {
        match collection {
            Some(collection) => KafkaLog::sync(self, collection, timeout),
            None => self.sync_all(timeout),
        }
    }

    fn ingest_stats(&self, collection: CollectionId, name: &str) -> Result<Option<IngestStats>> {
        Ok(Some(IngestStats {
            topic: self.config().topic_of(name),
            dead_letters: self.dead_letters(collection),
            partitions: self.lag(collection)?,
        }))
    }
}
