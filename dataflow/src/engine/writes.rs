//! Writes: inserts, upserts and deletes go to the log and are acknowledged
//! once durable there, after waiting while the dataflow or the index
//! builds are too far behind (backpressure, see [`EngineConfig::max_apply_lag`]
//! and [`EngineConfig::max_index_backlog_rows`]).

use super::*;
use crate::routing::key_partition_of;
use arrow::array::{Array, AsArray};

impl Engine {
    /// Inserts rows given as an Arrow batch (columns by field name). A row
    /// whose key exists replaces it, as with upsert.
    pub fn insert(&self, collection: &str, batch: &RecordBatch) -> Result<WriteResult> {
        self.write_batch(collection, insert_kind(), |schema, kind| WriteBatch::from_record_batch(schema, batch, kind))
    }

    /// Inserts rows given by field name.
    pub fn insert_rows(&self, collection: &str, rows: &[Row]) -> Result<WriteResult> {
        self.write_batch(collection, insert_kind(), |schema, kind| WriteBatch::from_rows(schema, rows, kind))
    }

    /// Inserts or replaces rows by primary key (keys are always given).
    pub fn upsert(&self, collection: &str, batch: &RecordBatch) -> Result<WriteResult> {
        self.write_batch(collection, WriteKind::Upsert, |schema, kind| {
            WriteBatch::from_record_batch(schema, batch, kind)
        })
    }

    pub fn upsert_rows(&self, collection: &str, rows: &[Row]) -> Result<WriteResult> {
        self.write_batch(collection, WriteKind::Upsert, |schema, kind| WriteBatch::from_rows(schema, rows, kind))
    }

    /// Deletes rows by primary key; keys that do not exist are ignored.
    /// Through a collection's name the keys go from every partition,
    /// through a partition's (see [`Engine::partition`]) from that one.
    pub fn delete(&self, collection: &str, pks: &[Pk]) -> Result<WriteResult> {
        let entry = self.running_entry(collection)?;
        entry.schema.check_keys(pks)?;
        self.wait_for_capacity()?;
        let mut targets = vec![entry.id];
        if entry.partition_of.is_none() {
            targets.extend(self.partitions_of(&entry.schema.name)?.iter().map(|p| p.id));
        }
        let mut ts = 0;
        for target in targets {
            ts = ts.max(self.inner.shared.log.append_deletes(target, pks, self.inner.config.request_timeout)?);
        }
        Ok(WriteResult { pks: pks.to_vec(), ts })
    }

    /// The other partitions of the collection `entry` is (a partition of).
    fn sibling_partitions(&self, entry: &CatalogEntry) -> Result<Vec<CollectionId>> {
        let collection = entry.partition_of.as_ref().map_or(&entry.schema.name, |of| &of.collection);
        let mut ids: Vec<CollectionId> = self.partitions_of(collection)?.iter().map(|p| p.id).collect();
        if entry.partition_of.is_some() {
            ids.push(self.entry(collection)?.id);
        }
        ids.retain(|&id| id != entry.id);
        Ok(ids)
    }

    pub(super) fn write_batch(
        &self,
        collection: &str,
        kind: WriteKind,
        validate: impl FnOnce(&CollectionSchema, WriteKind) -> Result<WriteBatch>,
    ) -> Result<WriteResult> {
        let entry = self.running_entry(collection)?;
        let schema = &entry.schema;
        let write = validate(schema, kind)?;
        let rows = write.batch.num_rows();
        if rows == 0 {
            return Ok(WriteResult { pks: Vec::new(), ts: self.inner.shared.log.tso().last() });
        }
        self.wait_for_capacity()?;
        if entry.partition_of.is_none()
            && let Some((key, partitions)) = schema.partition_key()
        {
            return self.write_by_partition_key(&entry, write, kind, key, partitions);
        }
        // As in Milvus, an upsert replaces its keys wherever they are: the
        // other partitions lose them first.
        if kind == WriteKind::Upsert {
            for sibling in self.sibling_partitions(&entry)? {
                self.inner.shared.log.append_deletes(sibling, &write.pks, self.inner.config.request_timeout)?;
            }
        }
        let pk_index = schema.primary_index();
        let auto_id = schema.primary().auto_id && matches!(kind, WriteKind::Insert { .. });
        let auto_id_field = auto_id.then_some(pk_index);
        let (pks, ts) =
            self.inner.shared.log.append_rows(entry.id, write, auto_id_field, self.inner.config.request_timeout)?;
        Ok(WriteResult { pks, ts })
    }
}

impl Engine {
    /// A write to a partition-key collection: each row to the partition its
    /// key's value hashes to (one log record per partition written). An
    /// upsert first deletes its keys from the partitions its rows do not go
    /// to, so a key whose partition-key value changed does not stay behind.
    fn write_by_partition_key(
        &self,
        entry: &CatalogEntry,
        write: WriteBatch,
        kind: WriteKind,
        key: usize,
        partitions: usize,
    ) -> Result<WriteResult> {
        let schema = &entry.schema;
        let ids = self.key_partition_ids(entry, partitions)?;
        let key_name = &schema.fields[key].name;
        let column = write
            .batch
            .column_by_name(key_name)
            .ok_or_else(|| Error::storage(format!("the write lacks partition key column `{key_name}`")))?;
        let rows = write.batch.num_rows();
        let value_at = |row: usize| -> Result<Pk> {
            if column.is_null(row) {
                return Err(Error::field(key_name, format!("row {row}: the partition key cannot be null")));
            }
            if let Some(ints) = column.as_primitive_opt::<arrow::datatypes::Int64Type>() {
                return Ok(Pk::Int(ints.value(row)));
            }
            if let Some(text) = column.as_string_opt::<i32>() {
                return Ok(Pk::Str(text.value(row).to_string()));
            }
            Err(Error::field(key_name, "the partition key column is neither int64 nor string"))
        };
        let mut rows_of: Vec<Vec<u32>> = vec![Vec::new(); partitions];
        for row in 0..rows {
            rows_of[key_partition_of(&value_at(row)?, partitions)].push(row as u32);
        }
        let timeout = self.inner.config.request_timeout;
        let log = &self.inner.shared.log;
        let mut ts = 0;
        if kind == WriteKind::Upsert {
            for (partition, id) in ids.iter().enumerate() {
                let elsewhere: Vec<Pk> = (0..partitions)
                    .filter(|&p| p != partition)
                    .flat_map(|p| rows_of[p].iter().map(|&row| write.pks[row as usize].clone()))
                    .collect();
                if !elsewhere.is_empty() {
                    ts = ts.max(log.append_deletes(*id, &elsewhere, timeout)?);
                }
            }
        }
        let auto_id = schema.primary().auto_id && matches!(kind, WriteKind::Insert { .. });
        let auto_id_field = auto_id.then_some(schema.primary_index());
        let mut pks: Vec<Pk> = write.pks.clone();
        for (partition, chosen) in rows_of.iter().enumerate() {
            if chosen.is_empty() {
                continue;
            }
            let indices = arrow::array::UInt32Array::from(chosen.clone());
            let batch = arrow::compute::take_record_batch(&write.batch, &indices)?;
            let part = WriteBatch { batch, pks: chosen.iter().map(|&row| write.pks[row as usize].clone()).collect() };
            let (written, at) = log.append_rows(ids[partition], part, auto_id_field, timeout)?;
            for (&row, pk) in chosen.iter().zip(written) {
                pks[row as usize] = pk;
            }
            ts = ts.max(at);
        }
        Ok(WriteResult { pks, ts })
    }

    /// Backpressure: waits while the applied frontier is more than
    /// `max_apply_lag` behind the clock (writers fill the log faster than
    /// the dataflow applies it; the gap is what a Strong read waits for),
    /// or while the shards owe the index builds more than
    /// `max_index_backlog_rows` rows. Gives up at `request_timeout` with
    /// `ResourceExhausted` naming the bound, before anything is written.
    fn wait_for_capacity(&self) -> Result<()> {
        let config = &self.inner.config;
        let shared = &self.inner.shared;
        let over = || -> Option<(&'static str, String)> {
            if let Some(bound) = config.max_apply_lag {
                let now = vectorflow_core::time::physical_ms(shared.log.tso().next_possible());
                let behind = now.saturating_sub(vectorflow_core::time::physical_ms(shared.applied_frontier()));
                if behind > bound.as_millis() as u64 {
                    let problem = format!(
                        "the dataflow has applied the log only up to {behind} ms ago (the bound is {} ms)",
                        bound.as_millis()
                    );
                    return Some(("max_apply_lag_ms", problem));
                }
            }
            if let Some(bound) = config.max_index_backlog_rows {
                let owed = shared.index_backlog_rows();
                if owed > bound as u64 {
                    let problem = format!(
                        "{owed} rows wait for their index build or for a merge to drop them (the bound is {bound})"
                    );
                    return Some(("max_index_backlog_rows", problem));
                }
            }
            None
        };
        if over().is_none() {
            return Ok(());
        }
        shared.writes_held.fetch_add(1, Ordering::Relaxed);
        let deadline = Instant::now() + config.request_timeout;
        loop {
            std::thread::sleep(Duration::from_millis(2));
            let Some((limit, problem)) = over() else { return Ok(()) };
            if self.inner.closed.load(Ordering::Acquire) {
                return Err(Error::Shutdown);
            }
            if Instant::now() >= deadline {
                shared.writes_refused.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(limit, "a write was refused: {problem}");
                return Err(Error::ResourceExhausted {
                    limit: limit.into(),
                    problem: format!(
                        "{problem} and did not catch up within {} ms; the write was not taken, retry it later",
                        config.request_timeout.as_millis()
                    ),
                });
            }
        }
    }
}

pub(super) fn insert_kind() -> WriteKind {
    // Auto ids are assigned from the write's timestamp once it is known.
    WriteKind::Insert { first_auto_id: 0 }
}
