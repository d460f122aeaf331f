//! Writes: inserts, upserts and deletes go to the log and are acknowledged
//! once durable there, after waiting while the dataflow or the index
//! builds are too far behind (backpressure, see [`EngineConfig::max_apply_lag`]
//! and [`EngineConfig::max_index_backlog_rows`]).

use super::*;

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
    pub fn delete(&self, collection: &str, pks: &[Pk]) -> Result<WriteResult> {
        let entry = self.running_entry(collection)?;
        entry.schema.check_keys(pks)?;
        self.wait_for_capacity()?;
        let log = match &self.inner.shared.log {
            Log::Embedded(log) => log,
            Log::Kafka(kafka) => {
                let ts = kafka.write(entry.id, None, pks, self.inner.config.request_timeout)?;
                return Ok(WriteResult { pks: pks.to_vec(), ts });
            }
        };
        let partitions = log.partitions();
        let mut by_partition: BTreeMap<u32, Vec<Pk>> = BTreeMap::new();
        for pk in pks {
            by_partition.entry(partition_of(entry.id, pk, partitions)).or_default().push(pk.clone());
        }
        let records = by_partition
            .into_iter()
            .map(|(p, pks)| (p, LogRecord { collection: entry.id, op: LogOp::Delete(pks) }))
            .collect();
        let ts = log.append(records)?;
        Ok(WriteResult { pks: pks.to_vec(), ts })
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
        let pk_index = schema.primary_index();
        let auto_id = schema.primary().auto_id && matches!(kind, WriteKind::Insert { .. });
        let log = match &self.inner.shared.log {
            Log::Embedded(log) => log,
            Log::Kafka(kafka) => {
                // Auto ids from reserved timestamps, as in the embedded log;
                // the records carry them as keys.
                let write = if auto_id {
                    with_auto_ids(write, pk_index, kafka.tso().allocate(rows as u64) as i64)?
                } else {
                    write
                };
                let ts = kafka.write(entry.id, Some(&write), &[], self.inner.config.request_timeout)?;
                return Ok(WriteResult { pks: write.pks, ts });
            }
        };
        let partitions = log.partitions();
        let mut pks = Vec::new();
        let ts = log.append_with(rows as u64, |first_ts| {
            let write = if auto_id { with_auto_ids(write, pk_index, first_ts as i64)? } else { write };
            let mut rows_by_partition: BTreeMap<u32, Vec<u32>> = BTreeMap::new();
            for (row, pk) in write.pks.iter().enumerate() {
                rows_by_partition.entry(partition_of(entry.id, pk, partitions)).or_default().push(row as u32);
            }
            let mut records = Vec::with_capacity(rows_by_partition.len());
            for (partition, rows) in rows_by_partition {
                let part = if rows.len() == write.pks.len() {
                    write.batch.clone()
                } else {
                    vectorflow_core::batch::take_rows(&write.batch, &rows)?
                };
                records.push((partition, LogRecord { collection: entry.id, op: LogOp::Upsert(IpcBatch(part)) }));
            }
            pks = write.pks;
            Ok(records)
        })?;
        Ok(WriteResult { pks, ts })
    }
}

impl Engine {
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

/// Replaces placeholder auto ids with ids from the write's reserved timestamps.
pub(super) fn with_auto_ids(write: WriteBatch, pk_index: usize, first: i64) -> Result<WriteBatch> {
    let rows = write.batch.num_rows() as i64;
    let ids = arrow::array::Int64Array::from_iter_values(first..first + rows);
    let mut columns = write.batch.columns().to_vec();
    columns[pk_index] = Arc::new(ids);
    let batch = RecordBatch::try_new(write.batch.schema(), columns)?;
    Ok(WriteBatch { batch, pks: (first..first + rows).map(Pk::Int).collect() })
}
