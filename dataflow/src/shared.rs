//! State the engine and every worker of this process share: the shards,
//! how far each worker has applied the log, the request queues, and the
//! switches that stop and wake the workers.

use std::collections::HashMap;
use std::ops::Range;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc::SyncSender;
use std::sync::{Arc, Condvar, Mutex, RwLock};
use std::time::{Duration, Instant};

use timely::scheduling::SyncActivator;
use vectorflow_core::{CollectionId, CollectionSchema, Timestamp};
use vectorflow_operators::ShardConfig;

use crate::graph::RecoveredShard;
use crate::log::Log;
use vectorflow_operators::Stop;

use crate::messages::{Answer, Failure, Partial, Request, RequestKind};
use crate::persist::Persister;
use crate::shards::{FilterCache, WorkerShards, answer_read, empty_answer};

/// State the engine and every worker of this process share. Per-worker
/// vectors have a slot for every worker of the dataflow (indexed by
/// timely's global worker index); only this process's workers use theirs.
pub(crate) struct Shared {
    pub log: Box<dyn Log>,
    /// Every worker of the dataflow (of every process, in a cluster).
    pub workers: usize,
    /// This process's workers.
    pub local: Range<usize>,
    /// Runs reads' shard searches (see [`crate::shards`]), for callers
    /// here and for reads another process of the cluster sends.
    pub search_pool: rayon::ThreadPool,
    /// Filters compiled for reads.
    pub filters: FilterCache,
    /// Per worker: answers finished off the worker's thread (a read for
    /// another process, a checkpoint waiting for its uploads) that its
    /// segment operator sends on.
    pub finished: Vec<Mutex<Vec<Partial>>>,
    pub segment_activators: Mutex<HashMap<usize, SyncActivator>>,
    /// Every collection id below this one is in the catalog this process
    /// took in, or dropped: a worker that meets a larger one waits for
    /// the catalog (another process of the cluster created it).
    pub catalog_next_id: AtomicU64,
    /// The catalog version this process took in.
    pub catalog_taken: AtomicU64,
    /// Set when a worker needs a newer catalog than this process holds.
    pub catalog_wanted: AtomicBool,
    /// Why the dataflow stopped (a worker ended in a panic; in a cluster,
    /// usually because another process died): nothing is served after it.
    pub dataflow_failed: Mutex<Option<String>>,
    /// Standing queries the workers keep current (see [`crate::watches`]).
    pub watches: crate::watches::Watches,
    pub schemas: RwLock<HashMap<CollectionId, Arc<CollectionSchema>>>,
    /// Bumped on every create/drop so workers drop state of dropped collections.
    pub catalog_version: AtomicU64,
    /// Requests waiting to enter the dataflow, per origin worker.
    pub requests: Vec<Mutex<Vec<Request>>>,
    pub request_activators: Mutex<HashMap<usize, SyncActivator>>,
    pub source_activators: Mutex<HashMap<usize, SyncActivator>>,
    /// Where each request's merged answer goes.
    pub replies: Mutex<HashMap<u64, SyncSender<Answer>>>,
    /// Per worker: every change before this time is applied to its segments.
    pub applied: Vec<AtomicU64>,
    /// Signalled when a worker's `applied` moves and a read waits for it.
    pub applied_moved: (Mutex<()>, Condvar),
    /// Reads waiting on `applied_moved` (workers signal only when some do).
    pub applied_waiters: AtomicUsize,
    /// Per worker: its shards, applied by the worker and read by the search pool.
    pub shards: Vec<WorkerShards>,
    pub shutdown: AtomicBool,
    /// While set, sources read nothing and hold their frontier.
    pub ingest_paused: AtomicBool,
    pub shard_config: ShardConfig,
    /// History kept for time travel (merges keep what reads inside it see).
    pub retention: Duration,
    pub tick: Duration,
    /// Log entries one source activation reads at most.
    pub poll_batch: usize,
    /// A source stops reading while this many rows it emitted are not yet
    /// applied (backpressure: Kafka keeps the rest, the lag grows).
    pub max_in_flight_rows: usize,
    /// Writes sealed segments to the object store.
    pub persister: Arc<Persister>,
    /// Shards loaded from the object store at recovery, per worker, with
    /// their collection and checkpoint time; each worker takes its own.
    pub recovered: Mutex<HashMap<usize, Vec<RecoveredShard>>>,
    /// Where each log partition's replay starts (the oldest checkpoint).
    pub replay_from: Vec<u64>,
    /// Per collection, its checkpoint time: replayed records at or before
    /// it are already in the loaded segments.
    pub skip_through: HashMap<CollectionId, Timestamp>,
    /// What the log sources have read since the engine opened.
    pub ingested: IngestCounters,
    /// How long the applied frontier has not moved while the log grew (0: it moves).
    pub frontier_stalled_ms: AtomicU64,
    /// Stalls the watchdog reported.
    pub frontier_stalls: AtomicU64,
    /// Reads whose deadline passed before or while a worker ran them: the
    /// worker skipped them or stopped their work.
    pub reads_cancelled: AtomicU64,
    /// Per worker: rows its shards owe the index builds and merges
    /// ([`Shard::backlog_rows`]); writes wait while the sum is over
    /// `max_index_backlog_rows`.
    pub index_backlog: Vec<AtomicU64>,
    /// Writes held back by `max_apply_lag` or `max_index_backlog_rows`, and refused after waiting.
    pub writes_held: AtomicU64,
    pub writes_refused: AtomicU64,
    /// Collections stopped by an error while applying a change, with the
    /// cause: they serve nothing and are never checkpointed past it, so a
    /// restart replays them from their last checkpoint.
    pub failed: Mutex<HashMap<CollectionId, String>>,
}

/// Counts the log sources keep, for replay progress and the stall watchdog.
#[derive(Debug, Default)]
pub(crate) struct IngestCounters {
    /// Log records read.
    pub records: AtomicU64,
    /// Rows (upserted or deleted keys) in them.
    pub rows: AtomicU64,
    /// Per worker: rows its source emitted that are not applied yet.
    pub in_flight_rows: Vec<AtomicU64>,
}

impl IngestCounters {
    pub fn new(workers: usize) -> IngestCounters {
        IngestCounters { in_flight_rows: (0..workers).map(|_| AtomicU64::new(0)).collect(), ..Default::default() }
    }

    pub fn in_flight(&self) -> u64 {
        self.in_flight_rows.iter().map(|rows| rows.load(Ordering::Relaxed)).sum()
    }
}

impl Shared {
    /// Reads before this time are outside the retention window.
    pub fn retention_horizon(&self) -> Timestamp {
        vectorflow_core::time::before(self.log.tso().next_possible(), self.retention)
    }

    pub(crate) fn schema(&self, collection: CollectionId) -> Option<Arc<CollectionSchema>> {
        self.schemas.read().ok()?.get(&collection).cloned()
    }

    /// Wakes `worker`'s request source.
    pub fn wake_requests(&self, worker: usize) {
        if let Ok(activators) = self.request_activators.lock()
            && let Some(activator) = activators.get(&worker)
        {
            let _ = activator.activate();
        }
    }

    /// Tells every worker to stop and wakes the operators that hold capabilities.
    pub fn stop(&self) {
        self.shutdown.store(true, Ordering::Release);
        if let Ok(activators) = self.request_activators.lock() {
            activators.values().for_each(|a| {
                let _ = a.activate();
            });
        }
        self.wake_sources();
        let _guard = self.applied_moved.0.lock();
        self.applied_moved.1.notify_all();
    }

    /// Wakes every log source, so frontiers move now rather than at the next tick.
    pub fn wake_sources(&self) {
        if let Ok(activators) = self.source_activators.lock() {
            activators.values().for_each(|a| {
                let _ = a.activate();
            });
        }
    }

    /// Stops `collection` (fail-stop): the first cause is kept.
    pub fn fail(&self, collection: CollectionId, cause: String) {
        tracing::error!(collection, "collection stopped: {cause}");
        if let Ok(mut failed) = self.failed.lock() {
            failed.entry(collection).or_insert(cause);
        }
    }

    /// Why `collection` is stopped, if it is.
    pub fn failure(&self, collection: CollectionId) -> Option<String> {
        self.failed.lock().ok()?.get(&collection).cloned()
    }

    /// The failure a stopped collection answers with.
    pub fn stopped(&self, collection: CollectionId) -> Option<Failure> {
        let cause = self.failure(collection)?;
        let collection = self.schema(collection).map_or_else(|| collection.to_string(), |s| s.name.clone());
        Some(Failure::Stopped { collection, cause })
    }

    /// Rows every worker's shards owe the index builds and merges.
    pub fn index_backlog_rows(&self) -> u64 {
        self.index_backlog.iter().map(|rows| rows.load(Ordering::Acquire)).sum()
    }

    /// Publishes that `worker` has applied every change before `frontier`,
    /// waking the reads waiting for it.
    pub fn publish_applied(&self, worker: usize, frontier: Timestamp) {
        // SeqCst on both sides: a read that registers as a waiter after
        // this load sees the new frontier in its own check.
        let before = self.applied[worker].swap(frontier, Ordering::SeqCst);
        if before != frontier && self.applied_waiters.load(Ordering::SeqCst) > 0 {
            let _guard = self.applied_moved.0.lock();
            self.applied_moved.1.notify_all();
        }
    }

    /// Waits until each of `workers` has applied every change at or before
    /// `ts`; false if `deadline` or shutdown comes first.
    pub fn wait_applied(&self, workers: &[usize], ts: Timestamp, deadline: Instant) -> bool {
        let applied = || workers.iter().all(|&w| self.applied[w].load(Ordering::SeqCst) > ts);
        if applied() {
            return true;
        }
        let Ok(mut guard) = self.applied_moved.0.lock() else { return false };
        self.applied_waiters.fetch_add(1, Ordering::SeqCst);
        let reached = loop {
            if applied() {
                break true;
            }
            let now = Instant::now();
            if now >= deadline || self.shutdown.load(Ordering::Acquire) {
                break false;
            }
            // Bounded so a shutdown is noticed even without a signal.
            let wait = (deadline - now).min(Duration::from_millis(100));
            guard = match self.applied_moved.1.wait_timeout(guard, wait) {
                Ok((guard, _)) => guard,
                Err(_) => break false,
            };
        };
        self.applied_waiters.fetch_sub(1, Ordering::SeqCst);
        reached
    }

    /// Waits until some worker's applied frontier moves, or `timeout`.
    pub fn wait_for_progress(&self, timeout: Duration) {
        let Ok(guard) = self.applied_moved.0.lock() else { return };
        self.applied_waiters.fetch_add(1, Ordering::SeqCst);
        let _ = self.applied_moved.1.wait_timeout(guard, timeout);
        self.applied_waiters.fetch_sub(1, Ordering::SeqCst);
    }

    /// The time before which every worker has applied every change.
    pub fn applied_frontier(&self) -> Timestamp {
        self.applied[self.local.clone()].iter().map(|a| a.load(Ordering::Acquire)).min().unwrap_or(0)
    }

    /// Hands a partial answer finished off the worker's thread to `worker`'s segment operator.
    pub fn finish(&self, worker: usize, partial: Partial) {
        if let Ok(mut finished) = self.finished[worker].lock() {
            finished.push(partial);
        }
        self.wake_segments(Some(worker));
    }

    /// Wakes `worker`'s segment operator (every local one for `None`).
    pub fn wake_segments(&self, worker: Option<usize>) {
        if let Ok(activators) = self.segment_activators.lock() {
            for (_, activator) in activators.iter().filter(|(w, _)| worker.is_none_or(|one| **w == one)) {
                let _ = activator.activate();
            }
        }
    }

    /// Stops serving: a worker ended by `cause`. Waiting reads wake and fail.
    pub fn dataflow_stopped(&self, cause: String) {
        if let Ok(mut failed) = self.dataflow_failed.lock()
            && failed.is_none()
        {
            tracing::error!("the dataflow stopped, nothing is served until a restart: {cause}");
            *failed = Some(cause);
        }
        self.stop();
    }

    /// Whether `collection` is newer than the catalog this process took
    /// in (another process of the cluster created it): not dropped, unknown.
    pub fn unknown_collection(&self, collection: CollectionId) -> bool {
        u64::from(collection) >= self.catalog_next_id.load(Ordering::Acquire) && self.schema(collection).is_none()
    }

    /// Why the dataflow stopped, if it did.
    pub fn dataflow_failure(&self) -> Option<String> {
        self.dataflow_failed.lock().ok()?.clone()
    }

    /// The answer of worker `worker`'s shard of `collection` to the read
    /// `kind` at `ts`, stopped at `deadline` (see [`answer_read`]).
    pub fn answer_read_on(
        &self,
        worker: usize,
        collection: CollectionId,
        kind: &RequestKind,
        ts: Timestamp,
        deadline: Instant,
    ) -> Answer {
        if let Some(stopped) = self.stopped(collection) {
            return Answer::Failed(stopped);
        }
        let Some(shard) = self.shards[worker].get(collection) else { return empty_answer(kind) };
        let filter = match (kind.filter(), self.schema(collection)) {
            (Some(text), Some(schema)) => match self.filters.get(collection, &schema, text) {
                Ok(filter) => Some(filter),
                Err(e) => return Answer::Failed(e.into()),
            },
            _ => None,
        };
        let expired = move || Instant::now() >= deadline;
        answer_read(&shard, kind, ts, filter.as_ref(), Stop(&expired))
    }
}
