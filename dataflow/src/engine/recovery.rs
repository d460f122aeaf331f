//! Recovery at open: segments loaded as of each collection's checkpoint,
//! then the log replayed from there, with progress and a stall timeout.

use super::*;

impl Engine {
    /// Waits until the dataflow has applied every record the log held at
    /// open, and records how long recovery took. Reports progress every 5 s
    /// and fails when nothing moves for `replay_stall_timeout`, saying where
    /// the replay stands, rather than waiting silently for ever.
    pub(super) fn wait_for_replay(&self, started: Instant) -> Result<()> {
        let shared = &self.inner.shared;
        let record_total = || {
            if let Ok(mut report) = self.inner.recovery.lock() {
                report.total = started.elapsed();
                report.replayed_rows = shared.ingested.rows.load(Ordering::Relaxed);
            }
        };
        let Some(target) = shared.log.replay_target(self.inner.config.request_timeout.max(Duration::from_secs(600)))?
        else {
            record_total();
            return Ok(());
        };
        let to_replay = shared.log.records_to_replay(&shared.replay_from);
        let stall_timeout = self.inner.config.replay_stall_timeout;
        let mut logged = Instant::now();
        let mut last_progress = (Instant::now(), shared.applied_frontier(), 0);
        while shared.applied_frontier() <= target {
            if self.inner.closed.load(Ordering::Acquire) {
                return Err(Error::Shutdown);
            }
            shared.wake_sources();
            std::thread::sleep(Duration::from_millis(2));
            let progress = self.replay_progress(to_replay, target);
            let (since, frontier, records) = last_progress;
            if progress.applied_frontier != frontier || progress.records_read != records {
                last_progress = (Instant::now(), progress.applied_frontier, progress.records_read);
            } else if since.elapsed() > stall_timeout {
                tracing::error!(?progress, "log replay stalled");
                return Err(Error::storage(format!(
                    "log replay made no progress for {stall_timeout:?} (replay_stall_timeout): {progress}"
                )));
            }
            if logged.elapsed() > Duration::from_secs(5) {
                tracing::info!(elapsed = ?started.elapsed(), "replaying the log: {progress}");
                logged = Instant::now();
            }
        }
        record_total();
        Ok(())
    }

    pub(super) fn replay_progress(&self, records_to_replay: u64, target: Timestamp) -> ReplayProgress {
        let shared = &self.inner.shared;
        ReplayProgress {
            records_read: shared.ingested.records.load(Ordering::Relaxed),
            records_to_replay,
            rows_read: shared.ingested.rows.load(Ordering::Relaxed),
            rows_in_flight: shared.ingested.in_flight(),
            applied_frontier: shared.applied_frontier(),
            per_worker: shared.applied[shared.local.clone()].iter().map(|a| a.load(Ordering::Acquire)).collect(),
            target,
        }
    }
}

/// The manifest of a collection nothing has been checkpointed for: no
/// segments, replay from the log position at its creation.
pub(super) fn initial_manifest(entry: &CatalogEntry, log: &dyn Log, shards: usize) -> Result<Manifest> {
    let log_positions = log.start_positions(entry.created_ts)?;
    Ok(Manifest {
        version: 1,
        collection: entry.id,
        shards,
        placement: PLACEMENT.to_string(),
        checkpoint: Checkpoint { ts: entry.created_ts, log_positions },
        segments: vec![Vec::new(); shards],
    })
}

/// Each collection's newest checkpoint's log positions.
pub(super) fn checkpoint_positions(manifests: &HashMap<CollectionId, Manifest>) -> CheckpointPositions {
    manifests.iter().map(|(id, m)| (*id, m.checkpoint.log_positions.clone())).collect()
}

/// Whether a manifest's segments were cut for another shard count or by
/// another placement than [`PLACEMENT`] (manifests from before placement
/// was recorded were cut by differential's `hashed()`).
fn needs_resharding(manifest: &Manifest, workers: usize) -> bool {
    manifest.shards != workers || manifest.placement != PLACEMENT
}

/// What recovery hands the dataflow and the engine.
pub(super) struct Recovered {
    pub(super) shards: HashMap<usize, Vec<RecoveredShard>>,
    pub(super) replay_from: Vec<u64>,
    pub(super) skip_through: HashMap<CollectionId, Timestamp>,
    pub(super) manifests: HashMap<CollectionId, Manifest>,
    pub(super) dirty: HashSet<CollectionId>,
    pub(super) report: RecoveryReport,
}

/// Reads every collection's manifest and loads its segments as of the
/// checkpoint (in parallel); works out where the log replay starts.
pub(super) fn recover(
    config: &EngineConfig,
    storage: &ObjectStorage,
    log: &dyn Log,
    entries: &[CatalogEntry],
    persister: &Persister,
    shard_config: ShardConfig,
) -> Result<Recovered> {
    // Shards are cut for every worker of the dataflow; this process loads its own workers'.
    let (workers, local) = (config.total_workers(), config.local_workers());
    let replayed_records = log.held_records()?;
    let mut report = RecoveryReport { collections: entries.len(), replayed_records, ..Default::default() };
    let mut manifests = HashMap::new();
    for entry in entries {
        let manifest = match load_manifest(storage, entry.id)? {
            Some(manifest) => {
                if needs_resharding(&manifest, workers) {
                    tracing::warn!(
                        collection = entry.schema.name,
                        stored_shards = manifest.shards,
                        stored_placement = manifest.placement,
                        workers,
                        placement = PLACEMENT,
                        "segments were cut for another worker count or placement: splitting them by key, indexes are rebuilt"
                    );
                }
                manifest
            }
            // Created, then a crash before its first manifest: no write to it was acknowledged.
            None => {
                let manifest = initial_manifest(entry, log, workers)?;
                if config.role == Role::Primary {
                    publish_manifest(storage, &manifest)?;
                }
                manifest
            }
        };
        log.tso().observe(manifest.checkpoint.ts);
        manifests.insert(entry.id, manifest);
    }

    let jobs: Vec<LoadJob<'_>> = entries
        .iter()
        .flat_map(|entry| {
            let manifest = &manifests[&entry.id];
            let reshard_to = needs_resharding(manifest, workers).then_some(workers);
            let local = local.clone();
            manifest
                .segments
                .iter()
                .enumerate()
                // Cut for these workers: each process loads its own shards.
                // Cut otherwise: every process reads every segment and keeps
                // its own workers' rows.
                .filter(move |(shard, _)| reshard_to.is_some() || local.contains(shard))
                .flat_map(move |(shard, segments)| {
                    segments.iter().map(move |files| LoadJob {
                        collection: entry.id,
                        schema: &entry.schema,
                        shard,
                        files,
                        as_of: manifest.checkpoint.ts,
                        reshard_to,
                    })
                })
        })
        .collect();
    let started = Instant::now();
    let loaded = load_segments(storage, &jobs, &shard_config.seal, config.load_threads)?;
    report.load = started.elapsed();

    let mut dirty = HashSet::new();
    let mut per_shard: BTreeMap<(usize, CollectionId), Vec<vectorflow_operators::Segment>> = BTreeMap::new();
    for Loaded { collection, shard, segment, rebuilt, bytes } in loaded {
        if !local.contains(&shard) {
            continue;
        }
        report.segments += 1;
        report.rows += segment.len();
        report.bytes += bytes;
        persister.track([segment.uid().to_string()]);
        if rebuilt {
            report.rebuilt_indexes += 1;
            persister.submit(collection, segment.snapshot()?);
            dirty.insert(collection);
        }
        per_shard.entry((shard, collection)).or_default().push(segment);
    }
    let mut shards: HashMap<usize, Vec<RecoveredShard>> = HashMap::new();
    for ((worker, collection), segments) in per_shard {
        let Some(entry) = entries.iter().find(|e| e.id == collection) else { continue };
        let at = manifests[&collection].checkpoint.ts;
        let shard = Shard::restore(Arc::new(entry.schema.clone()), shard_config.clone(), segments);
        shards.entry(worker).or_default().push((collection, at, shard));
    }
    // Each collection is read from its own checkpoint on (where the log
    // reads per collection), the replay from the oldest (where it does not).
    for entry in entries {
        let positions = &manifests[&entry.id].checkpoint.log_positions;
        log.follow(entry.id, Arc::new(entry.schema.clone()), positions)?;
    }
    let replay_from = log.replay_start(&checkpoint_positions(&manifests));
    let skip_through = manifests.iter().map(|(id, m)| (*id, m.checkpoint.ts)).collect();
    Ok(Recovered { shards, replay_from, skip_through, manifests, dirty, report })
}
