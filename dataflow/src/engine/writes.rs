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
        let ts = self.inner.shared.log.append_deletes(entry.id, pks, self.inner.config.request_timeout)?;
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
        let auto_id_field = auto_id.then_some(pk_index);
        let (pks, ts) =
            self.inner.shared.log.append_rows(entry.id, write, auto_id_field, self.inner.config.request_timeout)?;
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
