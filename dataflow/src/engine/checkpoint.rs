//! Checkpoints, compaction and the background threads that run them (and
//! watch the frontier).

use super::*;

impl Engine {
    /// Makes every write acknowledged so far durable in the object store:
    /// a checkpoint that writes the segments sealed since the last one
    /// (with their graphs) and the growing rows (unsealed), and publishes
    /// the collection's manifest. Returns the
    /// checkpoint's time once the manifest is published.
    ///
    /// Flushes coalesce: a flush that finds a checkpoint running waits for
    /// it, and if that one (or any) began after the flush was called, it
    /// covers every write acknowledged before the call, so its time is the
    /// answer and no second, tiny checkpoint is made.
    pub fn flush(&self, collection: &str) -> Result<Timestamp> {
        self.writable("flushes")?;
        let entry = self.entry(collection)?;
        // Every write acknowledged before this call has a time below this.
        let called_at = self.inner.shared.log.tso().next_possible();
        let mut flushed = self.checkpoint_covering(&entry, Some(called_at))?;
        // A collection's partitions are flushed with it.
        if entry.partition_of.is_none() {
            for partition in self.partitions_of(&entry.schema.name)? {
                flushed = flushed.max(self.checkpoint_covering(&partition, Some(called_at))?);
            }
        }
        Ok(flushed)
    }

    /// A checkpoint of one collection (see [`Engine::flush`]).
    pub(super) fn checkpoint(&self, entry: &CatalogEntry) -> Result<Timestamp> {
        self.checkpoint_covering(entry, None)
    }

    /// A checkpoint of one collection, unless the newest one already covers
    /// `covering` (then its time).
    fn checkpoint_covering(&self, entry: &CatalogEntry, covering: Option<Timestamp>) -> Result<Timestamp> {
        self.writable("checkpoints")?;
        let inner = &self.inner;
        let _one_at_a_time = inner.checkpointing.lock().map_err(|_| Error::Shutdown)?;
        if self.in_cluster() {
            // Another process may have published since.
            self.take_newest_manifest(entry.id)?;
        }
        let previous = inner
            .manifests
            .lock()
            .map_err(|_| Error::Shutdown)?
            .get(&entry.id)
            .cloned()
            .ok_or_else(|| Error::storage(format!("collection `{}` has no manifest", entry.schema.name)))?;
        if let Some(covering) = covering
            && previous.checkpoint.ts >= covering
        {
            return Ok(previous.checkpoint.ts);
        }
        let stored: HashMap<&str, &SegmentFiles> =
            previous.segments.iter().flatten().map(|files| (files.uid.as_str(), files)).collect();
        let known = stored.iter().map(|(uid, files)| (uid.to_string(), files.deleted)).collect();
        if let Ok(mut dirty) = inner.dirty.lock() {
            dirty.remove(&entry.id);
        }
        let started = Instant::now();
        let ts = inner.shared.log.tso().allocate(1);
        // Every worker answers once its process has written its new segments.
        let kind = RequestKind::Checkpoint { known };
        let answer = self.request(entry.id, ts, kind, Some(PERSIST_TIMEOUT), Consistency::Strong, None)?;
        let Answer::Checkpoint(parts) = answer else { return Err(unexpected(answer)) };
        // A collection stopped by an apply error is never checkpointed past
        // it: the log keeps what a restart must replay.
        self.check_running(entry)?;
        // Every write at or before `ts` is committed now (the frontier passed it).
        // Dead letters of the records the checkpoint covers were handed to
        // the producer before those records were applied: delivered before
        // the checkpoint moves past them, they cannot be lost.
        inner.shared.log.flush()?;
        let log_positions = inner.shared.log.positions_after(entry.id, ts)?;
        let version = previous.version + 1;
        let mut segments = vec![Vec::new(); inner.shared.workers];
        for ShardCheckpoint { shard, segments: states } in parts {
            let slot = segments
                .get_mut(shard)
                .ok_or_else(|| Error::storage(format!("checkpoint answer from unknown shard {shard}")))?;
            for (state, written) in states {
                // New segments come with the files their worker's process
                // wrote; the others the previous manifest lists.
                let mut files = match (written, stored.get(state.uid.as_str())) {
                    (Some(StoredFiles(files)), _) => files,
                    (None, Some(files)) => (*files).clone(),
                    (None, None) => {
                        return Err(Error::storage(format!(
                            "checkpoint: segment {} of shard {shard} has neither files nor a manifest entry",
                            state.uid
                        )));
                    }
                };
                files.growing = state.growing;
                if let Some(deletes) = &state.deletes {
                    files.deletes = if deletes.is_empty() {
                        None
                    } else {
                        Some(write_deletes(&inner.storage, entry.id, &state.uid, version, deletes)?)
                    };
                    files.deleted = state.retired;
                }
                slot.push(files);
            }
        }
        let manifest = Manifest {
            version,
            collection: entry.id,
            shards: inner.shared.workers,
            placement: PLACEMENT.to_string(),
            checkpoint: Checkpoint { ts, log_positions },
            segments,
        };
        publish_manifest(&inner.storage, &manifest)?;
        inner.shared.persister.published(manifest.segments.iter().flatten().map(|f| f.uid.clone()));
        if let Ok(mut manifests) = inner.manifests.lock() {
            manifests.insert(entry.id, manifest.clone());
        }
        if let Err(e) = self.collect_garbage(&manifest, &previous) {
            tracing::warn!(collection = entry.schema.name, "removing unreferenced objects: {e}");
        }
        let released = match inner.manifests.lock() {
            Ok(manifests) => {
                let checkpoints = checkpoint_positions(&manifests);
                drop(manifests);
                inner.shared.log.checkpointed(entry.id, &checkpoints)
            }
            Err(_) => Err(Error::Shutdown),
        };
        if let Err(e) = released {
            tracing::warn!("releasing the log the checkpoint covers: {e}");
        }
        inner.checkpoint_stats.record(started.elapsed());
        tracing::debug!(collection = entry.schema.name, version, ts, "checkpoint published");
        Ok(ts)
    }

    /// Removes the collection's segment objects that the newest manifest
    /// does not list and no shard holds (compacted away, superseded delete
    /// logs, or left by a crash before they were published). In a cluster
    /// another process's uploads in flight are unknown here: only what
    /// `previous` listed and `manifest` does not goes.
    pub(super) fn collect_garbage(&self, manifest: &Manifest, previous: &Manifest) -> Result<()> {
        let storage = &self.inner.storage;
        let referenced: HashSet<&str> = manifest.objects().map(|o| o.path.as_str()).collect();
        if self.in_cluster() {
            for object in previous.objects().filter(|o| !referenced.contains(o.path.as_str())) {
                storage.delete(&object.path)?;
            }
            return Ok(());
        }
        let listed_segments: HashSet<&str> = manifest.segments.iter().flatten().map(|f| f.uid.as_str()).collect();
        let prefix = format!("{}/segments/", collection_prefix(manifest.collection));
        for (path, _) in storage.list(prefix.trim_end_matches('/'))? {
            if referenced.contains(path.as_str()) {
                continue;
            }
            let uid = path.strip_prefix(&prefix).and_then(|rest| rest.split('/').next()).unwrap_or_default();
            if !listed_segments.contains(uid) && self.inner.shared.persister.is_live(uid) {
                continue;
            }
            storage.delete(&path)?;
        }
        Ok(())
    }

    /// Compacts the collection now: segments with more dead rows than
    /// `compaction_dead_fraction` (rows no read inside the retention window
    /// can see) are rewritten, small ones merged; waits for the new indexes,
    /// then publishes a checkpoint (which removes the replaced objects).
    pub fn compact(&self, collection: &str) -> Result<CompactionReport> {
        self.writable("compactions")?;
        let entry = self.entry(collection)?;
        let (replaced_segments, horizon) = self.start_compaction(&entry)?;
        let deadline = Instant::now() + PERSIST_TIMEOUT;
        loop {
            let compacting = match self.request(entry.id, 0, RequestKind::Stats, None, Consistency::Eventually, None)? {
                Answer::Stats(stats) => stats.compacting,
                other => return Err(unexpected(other)),
            };
            if compacting == 0 {
                break;
            }
            if Instant::now() >= deadline {
                return Err(Error::Timeout(PERSIST_TIMEOUT));
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        let checkpoint = self.checkpoint(&entry)?;
        Ok(CompactionReport { replaced_segments, horizon, checkpoint })
    }

    /// Asks every shard to start compacting; returns the segments replaced and the horizon.
    pub(super) fn start_compaction(&self, entry: &CatalogEntry) -> Result<(usize, Timestamp)> {
        let horizon = self.retention_horizon();
        let kind = RequestKind::Compact { horizon };
        match self.request(entry.id, 0, kind, None, Consistency::Eventually, None)? {
            Answer::Count(replaced) => {
                if replaced > 0
                    && let Ok(mut dirty) = self.inner.dirty.lock()
                {
                    dirty.insert(entry.id);
                }
                Ok((replaced, horizon))
            }
            other => Err(unexpected(other)),
        }
    }

    /// Starts the thread that checkpoints and compacts on the configured intervals.
    pub(super) fn start_maintenance(&self) -> Result<()> {
        let weak = Arc::downgrade(&self.inner);
        let report_after = self.inner.config.stall_report_after;
        std::thread::Builder::new()
            .name("frontier-watchdog".into())
            .spawn(move || watch_frontier(weak, report_after))
            .map_err(|e| Error::storage(format!("starting the frontier watchdog: {e}")))?;
        let config = &self.inner.config;
        let weak = Arc::downgrade(&self.inner);
        let thread = if self.is_replica() {
            std::thread::Builder::new().name("follow-primary".into()).spawn(move || replica::follow_primary(weak))
        } else {
            let (checkpoint_every, compact_every) = match self.runs_maintenance() {
                true => (config.checkpoint_interval, config.compaction_interval),
                false => (None, None),
            };
            if checkpoint_every.is_none() && compact_every.is_none() && !self.in_cluster() {
                return Ok(());
            }
            std::thread::Builder::new()
                .name("maintenance".into())
                .spawn(move || maintain(weak, checkpoint_every, compact_every))
        }
        .map_err(|e| Error::storage(format!("starting the maintenance thread: {e}")))?;
        if let Ok(mut slot) = self.inner.maintenance.lock() {
            *slot = Some(thread);
        }
        Ok(())
    }

    /// Checkpoints a collection if the log moved past its checkpoint or a
    /// compaction changed it since.
    pub(super) fn checkpoint_if_changed(&self, entry: &CatalogEntry) -> Result<()> {
        if self.inner.shared.failure(entry.id).is_some() {
            // Stopped (fail-stop): its checkpoint stays where it was.
            return Ok(());
        }
        let positions = self.inner.shared.log.positions(entry.id)?;
        let behind = self
            .inner
            .manifests
            .lock()
            .map_err(|_| Error::Shutdown)?
            .get(&entry.id)
            .is_none_or(|m| m.checkpoint.log_positions != positions);
        let dirty = self.inner.dirty.lock().is_ok_and(|d| d.contains(&entry.id));
        if behind || dirty {
            self.checkpoint(entry)?;
        }
        Ok(())
    }
}

/// The maintenance loop: checkpoints and compaction on their intervals,
/// and in a cluster what the other processes change, until the engine
/// closes or is dropped.
pub(super) fn maintain(
    inner: std::sync::Weak<Inner>,
    checkpoint_every: Option<Duration>,
    compact_every: Option<Duration>,
) {
    let step = Duration::from_millis(20);
    let (mut next_checkpoint, mut next_compaction) = {
        let now = Instant::now();
        (checkpoint_every.map(|d| now + d), compact_every.map(|d| now + d))
    };
    let mut next_look = Instant::now();
    loop {
        std::thread::sleep(step);
        let Some(inner) = inner.upgrade() else { return };
        if inner.closed.load(Ordering::Acquire) {
            return;
        }
        let engine = Engine { inner };
        if engine.in_cluster()
            && let Err(e) = engine.follow_cluster(&mut next_look)
        {
            tracing::warn!("following the other processes of the cluster: {e}");
        }
        let now = Instant::now();
        let entries: Vec<CatalogEntry> =
            engine.inner.collections.read().map(|c| c.values().cloned().collect()).unwrap_or_default();
        if let (Some(at), Some(every)) = (next_compaction, compact_every)
            && now >= at
        {
            for entry in &entries {
                if let Err(e) = engine.start_compaction(entry) {
                    tracing::warn!(collection = entry.schema.name, "compaction: {e}");
                }
            }
            next_compaction = Some(now + every);
        }
        if let (Some(at), Some(every)) = (next_checkpoint, checkpoint_every)
            && now >= at
        {
            for entry in &entries {
                // A collection dropped meanwhile has no manifest any more.
                if let Err(e) = engine.checkpoint_if_changed(entry)
                    && engine.inner.collections.read().is_ok_and(|c| c.contains_key(&entry.schema.name))
                {
                    tracing::warn!(collection = entry.schema.name, "checkpoint: {e}");
                }
            }
            next_checkpoint = Some(Instant::now() + every);
        }
    }
}

/// Reports a frontier that stops advancing while the log grows: the
/// dataflow is wedged and Strong reads and new writes' visibility wait. The
/// stall shows in the log (an error, repeated every `report_after`) and in
/// [`Engine::health`].
pub(super) fn watch_frontier(inner: std::sync::Weak<Inner>, report_after: Duration) {
    let step = Duration::from_millis(500);
    let mut last: Option<(Timestamp, u64)> = None;
    let mut stalled_since: Option<Instant> = None;
    let mut reported_at: Option<Instant> = None;
    loop {
        std::thread::sleep(step);
        let Some(inner) = inner.upgrade() else { return };
        if inner.closed.load(Ordering::Acquire) {
            return;
        }
        let shared = &inner.shared;
        let frontier = shared.applied_frontier();
        let written = shared.log.written();
        let paused = shared.ingest_paused.load(Ordering::Acquire);
        let stuck = last.is_some_and(|(f, w)| f == frontier && w != written) && !paused;
        let moved = last.is_some_and(|(f, _)| f != frontier);
        last = Some((frontier, written));
        if moved || paused {
            if stalled_since.is_some() {
                tracing::info!(frontier, "the applied frontier advances again");
            }
            stalled_since = None;
            reported_at = None;
        } else if stuck && stalled_since.is_none() {
            stalled_since = Some(Instant::now());
        }
        let since = stalled_since.map(|at| at.elapsed());
        shared.frontier_stalled_ms.store(since.map_or(0, |d| d.as_millis() as u64), Ordering::Relaxed);
        if let Some(since) = since
            && since >= report_after
            && reported_at.is_none_or(|at| at.elapsed() >= report_after)
        {
            reported_at = Some(Instant::now());
            shared.frontier_stalls.fetch_add(1, Ordering::Relaxed);
            tracing::error!(
                stalled_for = ?since,
                frontier,
                per_worker = ?shared.applied[shared.local.clone()].iter().map(|a| a.load(Ordering::Acquire)).collect::<Vec<_>>(),
                rows_in_flight = shared.ingested.in_flight(),
                "the applied frontier has not advanced while the log grew: writes are acknowledged but not applied"
            );
        }
    }
}
