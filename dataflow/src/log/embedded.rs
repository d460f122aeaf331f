//! The embedded log: partitions in the data directory, read by every
//! worker for every collection, truncated below every collection's checkpoint.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use vectorflow_connectors::{EmbeddedLog, LogOp, LogReader, LogRecord};
use vectorflow_core::batch::WriteBatch;
use vectorflow_core::{CollectionId, IpcBatch, Pk, Result, Timestamp, Tso};

use super::{CheckpointPositions, Log, with_auto_ids};
use crate::routing::partition_of;

impl Log for Arc<EmbeddedLog> {
    fn tso(&self) -> &Tso {
        EmbeddedLog::tso(self)
    }

    fn append_rows(
        &self,
        collection: CollectionId,
        write: WriteBatch,
        auto_id_field: Option<usize>,
        _timeout: Duration,
    ) -> Result<(Vec<Pk>, Timestamp)> {
        let partitions = self.partitions();
        let rows = write.batch.num_rows();
        let mut pks = Vec::new();
        let ts = self.append_with(rows as u64, |first_ts| {
            let write = match auto_id_field {
                Some(field) => with_auto_ids(write, field, first_ts as i64)?,
                None => write,
            };
            let mut rows_by_partition: BTreeMap<u32, Vec<u32>> = BTreeMap::new();
            for (row, pk) in write.pks.iter().enumerate() {
                rows_by_partition.entry(partition_of(collection, pk, partitions)).or_default().push(row as u32);
            }
            let mut records = Vec::with_capacity(rows_by_partition.len());
            for (partition, rows) in rows_by_partition {
                let part = if rows.len() == write.pks.len() {
                    write.batch.clone()
                } else {
                    vectorflow_core::batch::take_rows(&write.batch, &rows)?
                };
                records.push((partition, LogRecord { collection, op: LogOp::Upsert(IpcBatch(part)) }));
            }
            pks = write.pks;
            Ok(records)
        })?;
        Ok((pks, ts))
    }

    fn append_deletes(&self, collection: CollectionId, pks: &[Pk], _timeout: Duration) -> Result<Timestamp> {
        let partitions = self.partitions();
        let mut by_partition: BTreeMap<u32, Vec<Pk>> = BTreeMap::new();
        for pk in pks {
            by_partition.entry(partition_of(collection, pk, partitions)).or_default().push(pk.clone());
        }
        let records =
            by_partition.into_iter().map(|(p, pks)| (p, LogRecord { collection, op: LogOp::Delete(pks) })).collect();
        self.append(records)
    }

    fn reader(
        &self,
        worker: usize,
        peers: usize,
        replay_from: &[u64],
        wake: Box<dyn Fn() + Send>,
    ) -> Result<Option<Box<dyn LogReader>>> {
        let partitions: Vec<u32> = (0..self.partitions()).filter(|p| *p as usize % peers == worker).collect();
        self.subscribe(wake);
        Ok((!partitions.is_empty()).then(|| Box::new(self.reader_from(partitions, replay_from)) as _))
    }

    fn positions(&self, _collection: CollectionId) -> Result<Vec<u64>> {
        Ok(self.ends())
    }

    fn positions_after(&self, _collection: CollectionId, ts: Timestamp) -> Result<Vec<u64>> {
        EmbeddedLog::positions_after(self, ts)
    }

    fn start_positions(&self, created_ts: Timestamp) -> Result<Vec<u64>> {
        EmbeddedLog::positions_after(self, created_ts)
    }

    fn replay_start(&self, checkpoints: &CheckpointPositions) -> Vec<u64> {
        oldest_checkpoint_positions(checkpoints, self.ends())
    }

    fn records_to_replay(&self, replay_from: &[u64]) -> u64 {
        self.ends().iter().zip(replay_from).map(|(end, from)| end.saturating_sub(*from)).sum()
    }

    fn held_records(&self) -> Result<u64> {
        EmbeddedLog::held_records(self)
    }

    fn written(&self) -> u64 {
        self.ends().iter().sum()
    }

    /// Drops the records every collection's checkpoint covers.
    fn checkpointed(&self, _collection: CollectionId, checkpoints: &CheckpointPositions) -> Result<()> {
        let below = oldest_checkpoint_positions(checkpoints, self.ends());
        let removed = self.truncate_below(&below)?;
        if removed > 0 {
            tracing::debug!(removed, "log truncated");
        }
        Ok(())
    }
}

/// Per log partition, the lowest position any checkpoint still needs
/// (`ends` where none needs anything).
fn oldest_checkpoint_positions(checkpoints: &CheckpointPositions, mut ends: Vec<u64>) -> Vec<u64> {
    for positions in checkpoints.values() {
        for (slot, position) in ends.iter_mut().zip(positions) {
            *slot = (*slot).min(*position);
        }
    }
    ends
}
