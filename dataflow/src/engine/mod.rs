//! The engine: opens the log and the catalog, runs the dataflow on timely
//! worker threads, and offers the collection, write and read API.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use arrow::record_batch::RecordBatch;
use timely::communication::WorkerGuards;
use vectorflow_connectors::manifest::{collection_prefix, delete_collection_objects, load_manifest, publish_manifest};
use vectorflow_connectors::{
    CatalogEntry, CatalogStore, Checkpoint, EmbeddedLog, KafkaConfig, KafkaLog, Manifest, ObjectStorage, PartitionLag,
    SegmentFiles, StorageConfig,
};
use vectorflow_core::batch::{WriteBatch, WriteKind};
use vectorflow_core::time::before;
use vectorflow_core::{
    ClusterConfig, CollectionId, CollectionSchema, Error, Metric, Pk, Result, Role, Row, Timestamp, Value,
};
use vectorflow_operators::distance::{normalize, score};
use vectorflow_operators::{
    IndexParams, MergePolicy, SealParams, SearchPlan, Shard, ShardConfig, ShardStats, VectorFiles,
};

use crate::graph::{RecoveredShard, run_worker};
use crate::log::{CheckpointPositions, Log};
use crate::messages::{Answer, Request, RequestKind, ShardCheckpoint, StoredFiles, unix_millis};
use crate::persist::{LoadJob, Loaded, PERSIST_TIMEOUT, Persister, RecoveryReport, load_segments, write_deletes};
use crate::routing::PLACEMENT;
use crate::shards::{FilterCache, WorkerShards, empty_answer};
use crate::shared::{IngestCounters, Shared};

mod catalog;
mod checkpoint;
mod cluster;
mod hybrid;
mod options;
mod reads;
mod recovery;
mod replica;
mod sinks;
mod subscribe;
mod writes;

use recovery::*;

/// The search pool's niceness (the workers run at the process's, 0):
/// searches get what ingestion and index builds leave, but not so little
/// that a search with a deadline cannot answer in time (see
/// ARCHITECTURE, build pool: nice 10 was measured and refused).
const SEARCH_NICENESS: i32 = 5;

/// Largest `ef` a search may ask for.
const MAX_EF: usize = 32_768;

pub use options::*;
pub use sinks::{SinkState, SinkStatus};
pub use subscribe::{QueryChange, SubscribeOptions, Subscription, SubscriptionEvent};

struct Inner {
    config: EngineConfig,
    shared: Arc<Shared>,
    catalog_store: CatalogStore,
    /// By name; ordered, so a collection's partitions (named
    /// `{collection}.{partition}.{ts}`) are one range of it.
    collections: RwLock<BTreeMap<String, CatalogEntry>>,
    /// Alias → collection name; every read and write resolves through it.
    aliases: RwLock<HashMap<String, String>>,
    /// Serialises creates and drops (never held by reads or writes).
    catalog_changes: Mutex<()>,
    next_request: AtomicU64,
    guards: Mutex<Option<WorkerGuards<()>>>,
    closed: AtomicBool,
    storage: ObjectStorage,
    /// The newest published manifest of every collection.
    manifests: Mutex<HashMap<CollectionId, Manifest>>,
    /// Collections a compaction or an index rebuild changed since their last checkpoint.
    dirty: Mutex<HashSet<CollectionId>>,
    /// One checkpoint at a time.
    checkpointing: Mutex<()>,
    recovery: Mutex<RecoveryReport>,
    checkpoint_stats: CheckpointStats,
    maintenance: Mutex<Option<std::thread::JoinHandle<()>>>,
    /// Subscriptions' delivery state, by id, and the thread that delivers them.
    subscribers: Mutex<HashMap<u64, subscribe::Subscriber>>,
    delivery: Mutex<Option<std::thread::JoinHandle<()>>>,
    /// Partition drops under way: a drop's time is taken before the
    /// catalog shows it, and subscriptions wait for it meanwhile.
    partition_drops: std::sync::atomic::AtomicUsize,
    /// Kafka sinks running, by name (each on a thread of its own).
    sinks: Mutex<HashMap<String, Arc<sinks::SinkRunner>>>,
    /// In a cluster: the other processes were told this one stops.
    left_cluster: AtomicBool,
}

/// Checkpoints published and the time they took (for metrics).
#[derive(Default)]
struct CheckpointStats {
    published: AtomicU64,
    total_micros: AtomicU64,
    last_micros: AtomicU64,
}

impl CheckpointStats {
    fn record(&self, took: Duration) {
        let micros = (took.as_micros() as u64).max(1);
        self.published.fetch_add(1, Ordering::Relaxed);
        self.total_micros.fetch_add(micros, Ordering::Relaxed);
        self.last_micros.store(micros, Ordering::Relaxed);
    }
}

/// The folder of the data directory sealed vectors are kept in (with `vectors_on_disk`).
pub const VECTOR_FILES_DIR: &str = "vectors";

/// What a compaction did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CompactionReport {
    /// Segments replaced by compacted ones.
    pub replaced_segments: usize,
    /// The time before which history is gone.
    pub horizon: Timestamp,
    /// The checkpoint that published the result.
    pub checkpoint: Timestamp,
}

/// A running Vectorflow engine. Cheap to clone; every clone is the same engine.
#[derive(Clone)]
pub struct Engine {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Engine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Engine").field("data_dir", &self.inner.config.data_dir).finish()
    }
}

impl Engine {
    /// Opens the engine on `config.data_dir` and its object store: loads
    /// every collection's sealed segments as of its checkpoint, replays the
    /// log from there, and returns once the replay is done.
    pub fn open(config: EngineConfig) -> Result<Engine> {
        let storage = ObjectStorage::open(&config.storage, &config.data_dir)?;
        Engine::open_with_storage(config, storage)
    }

    /// [`Engine::open`] on an object store the caller built (`config.storage`
    /// is not used): for stores `object_store` offers that the config does
    /// not name, and for tests that cut the power.
    pub fn open_with_storage(config: EngineConfig, storage: ObjectStorage) -> Result<Engine> {
        if config.workers == 0 {
            return Err(Error::argument("workers", "must be at least 1"));
        }
        if config.seal_rows == 0 {
            return Err(Error::argument("seal_rows", "must be at least 1"));
        }
        config.cluster.validate()?;
        if config.cluster.is_cluster() {
            check_cluster(&config, &storage)?;
        }
        let started = Instant::now();
        let (workers, local) = (config.total_workers(), config.local_workers());
        let partitions = config.log_partitions.unwrap_or(workers as u32);
        let log: Box<dyn Log> = match (&config.kafka, config.role) {
            (Some(kafka), role) => {
                let deployment = CatalogStore::deployment_id(&storage, role == Role::Primary)?.ok_or_else(|| {
                    Error::Unavailable(format!(
                        "no primary has started on the object store {} yet: a read replica follows one",
                        storage.description()
                    ))
                })?;
                let kafka_dir = config.data_dir.join("kafka");
                Box::new(KafkaLog::open(kafka.clone(), workers, local.clone(), &kafka_dir, role, deployment)?)
            }
            (None, Role::Primary) => Box::new(EmbeddedLog::open(&config.data_dir.join("wal"), partitions)?),
            (None, Role::Replica) => {
                return Err(Error::argument(
                    "role",
                    "a read replica follows its primary's Kafka topics: configure the primary's `log.kafka` \
                     and its object store",
                ));
            }
        };
        let catalog_store = CatalogStore::open(storage.clone())?;
        let entries = catalog_store.load()?;
        let aliases: HashMap<String, String> = catalog_store.aliases()?.into_iter().collect();
        for entry in &entries {
            log.tso().observe(entry.created_ts);
        }
        if config.merge_factor < 2 {
            return Err(Error::argument("merge_factor", "must be at least 2"));
        }
        if config.max_segment_rows < config.seal_rows {
            return Err(Error::argument("max_segment_rows", "must be at least seal_rows"));
        }
        let merge = MergePolicy {
            dead_fraction: config.compaction_dead_fraction,
            floor_rows: config.seal_rows,
            max_segment_rows: config.max_segment_rows,
            merge_factor: config.merge_factor,
            ..MergePolicy::default()
        };
        // Sealed vectors on disk (see `vectorflow_operators::vector_file`):
        // a cache beside the data, emptied at open.
        let vector_files = if config.vectors_on_disk {
            Some(VectorFiles::open(config.data_dir.join(VECTOR_FILES_DIR))?)
        } else {
            None
        };
        let seal = SealParams { index: config.index, vector_files };
        let shard_config = ShardConfig { seal_rows: config.seal_rows, seal, plan: config.search_plan, merge };
        let persister = match config.role {
            Role::Primary => Persister::start(storage.clone())?,
            // The primary writes the segments; a replica's own stay in memory.
            Role::Replica => Persister::read_only(storage.clone()),
        };
        let recovered = recover(&config, &storage, log.as_ref(), &entries, &persister, shard_config.clone())
            .inspect_err(|_| {
                // Nothing will submit to it: let its thread end.
                persister.stop();
            })?;
        let schemas = entries.iter().map(|e| (e.id, Arc::new(e.schema.clone()))).collect();
        let collections = entries.into_iter().map(|e| (e.schema.name.clone(), e)).collect();
        // One search thread per core: reads are the work that should use
        // them all. Below the workers' priority, so applying a write never
        // waits for a core behind the searches (with 8 clients searching,
        // write-to-visible p99 was 2.7x its idle value at equal priority).
        let search_pool = rayon::ThreadPoolBuilder::new()
            .num_threads(std::thread::available_parallelism().map_or(2, |n| n.get()))
            .thread_name(|i| format!("vectorflow-search-{i}"))
            .start_handler(|_| vectorflow_operators::host::lower_thread_priority(SEARCH_NICENESS))
            .build()
            .map_err(|e| Error::storage(format!("starting the search pool: {e}")))?;
        let per_worker = |make: &dyn Fn() -> AtomicU64| (0..workers).map(|_| make()).collect::<Vec<_>>();
        let shared = Arc::new(Shared {
            log,
            workers,
            local: local.clone(),
            search_pool,
            filters: FilterCache::default(),
            finished: (0..workers).map(|_| Mutex::new(Vec::new())).collect(),
            segment_activators: Mutex::new(HashMap::new()),
            catalog_next_id: AtomicU64::new(u64::from(catalog_store.next_id()?)),
            catalog_taken: AtomicU64::new(catalog_store.version()),
            catalog_wanted: AtomicBool::new(false),
            dataflow_failed: Mutex::new(None),
            watches: Default::default(),
            schemas: RwLock::new(schemas),
            catalog_version: AtomicU64::new(0),
            requests: (0..workers).map(|_| Mutex::new(Vec::new())).collect(),
            request_activators: Mutex::new(HashMap::new()),
            source_activators: Mutex::new(HashMap::new()),
            replies: Mutex::new(HashMap::new()),
            applied: per_worker(&|| AtomicU64::new(0)),
            applied_moved: (Mutex::new(()), std::sync::Condvar::new()),
            applied_waiters: std::sync::atomic::AtomicUsize::new(0),
            shards: (0..workers).map(|_| WorkerShards::default()).collect(),
            shutdown: AtomicBool::new(false),
            ingest_paused: AtomicBool::new(false),
            shard_config,
            retention: config.retention,
            tick: config.tick,
            poll_batch: if config.kafka.is_some() { 1024 } else { 256 },
            max_in_flight_rows: config.max_in_flight_rows.max(1),
            persister,
            recovered: Mutex::new(recovered.shards),
            replay_from: recovered.replay_from,
            skip_through: recovered.skip_through,
            ingested: IngestCounters::new(workers),
            frontier_stalled_ms: AtomicU64::new(0),
            frontier_stalls: AtomicU64::new(0),
            reads_cancelled: AtomicU64::new(0),
            writes_held: AtomicU64::new(0),
            writes_refused: AtomicU64::new(0),
            index_backlog: per_worker(&|| AtomicU64::new(0)),
            failed: Mutex::new(HashMap::new()),
        });
        let worker_shared = shared.clone();
        let guards = timely::execute(timely_config(&config), move |worker| {
            run_worker(worker, worker_shared.clone());
        })
        .map_err(|e| Error::storage(format!("starting the dataflow workers: {e}")))?;
        let engine = Engine {
            inner: Arc::new(Inner {
                config,
                shared,
                catalog_store,
                collections: RwLock::new(collections),
                aliases: RwLock::new(aliases),
                catalog_changes: Mutex::new(()),
                next_request: AtomicU64::new(1),
                guards: Mutex::new(Some(guards)),
                closed: AtomicBool::new(false),
                storage,
                manifests: Mutex::new(recovered.manifests),
                dirty: Mutex::new(recovered.dirty),
                checkpointing: Mutex::new(()),
                recovery: Mutex::new(recovered.report),
                checkpoint_stats: CheckpointStats::default(),
                maintenance: Mutex::new(None),
                subscribers: Mutex::new(HashMap::new()),
                delivery: Mutex::new(None),
                partition_drops: std::sync::atomic::AtomicUsize::new(0),
                sinks: Mutex::new(HashMap::new()),
                left_cluster: AtomicBool::new(false),
            }),
        };
        if engine.is_replica() {
            // Bindings of collections dropped before this replica opened
            // would hold its sources back.
            engine.take_in_catalog()?;
        }
        engine.wait_for_replay(started)?;
        engine.start_maintenance()?;
        engine.start_sinks()?;
        let report = engine.recovery_report();
        let config = &engine.inner.config;
        tracing::info!(
            data_dir = %config.data_dir.display(),
            storage = engine.inner.storage.description(),
            workers = config.workers,
            partitions,
            segments = report.segments,
            rows = report.rows,
            load = ?report.load,
            total = ?report.total,
            "engine open"
        );
        Ok(engine)
    }

    /// The dataflow's liveness: how far it has applied the log, and
    /// whether the frontier watchdog sees it stalled.
    pub fn health(&self) -> EngineHealth {
        let shared = &self.inner.shared;
        let stalled_ms = shared.frontier_stalled_ms.load(Ordering::Relaxed);
        EngineHealth {
            applied_frontier: shared.applied_frontier(),
            next_ts: shared.log.tso().next_possible(),
            records_ingested: shared.ingested.records.load(Ordering::Relaxed),
            rows_ingested: shared.ingested.rows.load(Ordering::Relaxed),
            rows_in_flight: shared.ingested.in_flight(),
            frontier_stalled_for: (stalled_ms > 0).then(|| Duration::from_millis(stalled_ms)),
            frontier_stall_reports: shared.frontier_stalls.load(Ordering::Relaxed),
            reads_cancelled: shared.reads_cancelled.load(Ordering::Relaxed),
            checkpoints: self.inner.checkpoint_stats.published.load(Ordering::Relaxed),
            checkpoint_time: Duration::from_micros(self.inner.checkpoint_stats.total_micros.load(Ordering::Relaxed)),
            last_checkpoint: match self.inner.checkpoint_stats.last_micros.load(Ordering::Relaxed) {
                0 => None,
                micros => Some(Duration::from_micros(micros)),
            },
            writes_held: shared.writes_held.load(Ordering::Relaxed),
            writes_refused: shared.writes_refused.load(Ordering::Relaxed),
            index_backlog_rows: shared.index_backlog_rows(),
            stopped: shared.dataflow_failure(),
        }
    }

    /// What recovery loaded at open and how long it took.
    pub fn recovery_report(&self) -> RecoveryReport {
        self.inner.recovery.lock().map(|r| *r).unwrap_or_default()
    }

    /// Bytes the collection's objects take in the object store.
    pub fn storage_bytes(&self, collection: &str) -> Result<u64> {
        let entry = self.entry(collection)?;
        self.inner.storage.bytes_under(&collection_prefix(entry.id))
    }

    /// The object store the engine writes to.
    pub fn storage(&self) -> &ObjectStorage {
        &self.inner.storage
    }

    /// Log records held (not yet covered by every collection's checkpoint).
    pub fn log_records(&self) -> Result<u64> {
        self.inner.shared.log.held_records()
    }

    pub fn config(&self) -> &EngineConfig {
        &self.inner.config
    }

    /// A session: reads with `Consistency::Session` see its own writes.
    pub fn session(&self) -> Session {
        Session { engine: self.clone(), last_write: Arc::new(AtomicU64::new(0)) }
    }

    /// A timestamp for "now": after every write acknowledged so far and
    /// before every later one (it is reserved, so no write gets it).
    pub fn now(&self) -> Timestamp {
        self.inner.shared.log.tso().allocate(1)
    }

    /// The oldest timestamp time travel can still reach.
    pub fn retention_horizon(&self) -> Timestamp {
        self.inner.shared.retention_horizon()
    }

    /// Stops applying the log: writes are still acknowledged (they are durable
    /// in the log) but become visible only after [`Engine::resume_ingest`].
    /// Strong and Session reads wait meanwhile; Eventually reads do not.
    pub fn pause_ingest(&self) {
        self.inner.shared.ingest_paused.store(true, Ordering::Release);
    }

    pub fn resume_ingest(&self) {
        self.inner.shared.ingest_paused.store(false, Ordering::Release);
        self.inner.shared.wake_sources();
    }

    /// Stops the workers. Acknowledged writes are already durable in the
    /// log. In a cluster every other process stops too.
    pub fn shutdown(&self) {
        self.leave_cluster();
        self.inner.stop();
    }
}

impl Inner {
    /// Stops the workers and waits for them; later calls do nothing.
    fn stop(&self) {
        if self.closed.swap(true, Ordering::AcqRel) {
            return;
        }
        // Their threads see it within a poll and end (their records on the
        // way are flushed, or written again at the next start).
        if let Ok(sinks) = self.sinks.lock() {
            sinks.values().for_each(|sink| sink.stop());
        }
        if let Some(thread) = self.maintenance.lock().ok().and_then(|mut m| m.take())
            && thread.thread().id() != std::thread::current().id()
        {
            let _ = thread.join();
        }
        self.shared.persister.stop();
        self.shared.stop();
        let mut guards = self.guards.lock().ok().and_then(|mut g| g.take());
        let peers_run_on = self.config.cluster.is_cluster()
            && !self.left_cluster.load(Ordering::Acquire)
            && self.shared.dataflow_failure().is_none();
        if peers_run_on && let Some(guards) = guards.take() {
            // The exchange threads end when the other processes' connections
            // close, which they do only when those stop: joining would wait
            // for them. An engine dropped without `shutdown` (which tells
            // them) leaves its threads to the process's exit.
            tracing::warn!("a cluster process stopped without telling the others: they stop when it exits");
            std::mem::forget(guards);
        }
        if let Some(guards) = guards {
            // After a cluster peer died, timely's exchange threads ended in a
            // panic, which joining them repeats: it is reported, not raised.
            let joined = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| guards.join()));
            match joined {
                Ok(results) => {
                    for result in results {
                        if let Err(e) = result {
                            tracing::error!("worker ended with an error: {e}");
                        }
                    }
                }
                Err(_) => tracing::error!("the dataflow's exchange threads ended in a panic"),
            }
        }
        if let Ok(mut replies) = self.shared.replies.lock() {
            replies.clear();
        }
    }
}

impl Drop for Inner {
    fn drop(&mut self) {
        self.stop();
    }
}

/// timely's configuration: this process's workers, and in a cluster the
/// exchange addresses of every process.
fn timely_config(config: &EngineConfig) -> timely::Config {
    let ClusterConfig { processes, process, .. } = &config.cluster;
    if processes.is_empty() {
        return timely::Config::process(config.workers);
    }
    timely::Config {
        communication: timely::CommunicationConfig::Cluster {
            threads: config.workers,
            process: *process,
            addresses: processes.clone(),
            report: false,
            zerocopy: false,
        },
        worker: timely::WorkerConfig::default(),
    }
}

/// What a cluster needs: a log and an object store every process shares.
fn check_cluster(config: &EngineConfig, storage: &ObjectStorage) -> Result<()> {
    if config.kafka.is_none() {
        return Err(Error::argument(
            "cluster",
            "a cluster's processes share their log: configure `log.kafka` (the embedded log is one process's)",
        ));
    }
    let own = format!("file://{}", config.data_dir.join("store").display());
    if storage.description() == own {
        return Err(Error::argument(
            "cluster",
            format!(
                "a cluster's processes share one object store, and `{}` is this process's data directory: \
                 configure `storage.url` (s3://…, or file:// on a disk every process mounts)",
                storage.description()
            ),
        ));
    }
    if config.role == Role::Replica {
        return Err(Error::argument(
            "role",
            "a read replica follows a primary on its own: run it without `cluster`, pointed at the cluster's topics \
             and object store",
        ));
    }
    Ok(())
}

/// A client session: remembers its last write so `Consistency::Session`
/// reads see it.
#[derive(Debug, Clone)]
pub struct Session {
    engine: Engine,
    last_write: Arc<AtomicU64>,
}

impl Session {
    pub fn engine(&self) -> &Engine {
        &self.engine
    }

    /// The timestamp of this session's last acknowledged write.
    pub fn last_write(&self) -> Timestamp {
        self.last_write.load(Ordering::Acquire)
    }

    fn record(&self, result: Result<WriteResult>) -> Result<WriteResult> {
        if let Ok(write) = &result {
            self.last_write.fetch_max(write.ts, Ordering::AcqRel);
        }
        result
    }

    pub fn insert_rows(&self, collection: &str, rows: &[Row]) -> Result<WriteResult> {
        self.record(self.engine.insert_rows(collection, rows))
    }

    pub fn insert(&self, collection: &str, batch: &RecordBatch) -> Result<WriteResult> {
        self.record(self.engine.insert(collection, batch))
    }

    pub fn upsert_rows(&self, collection: &str, rows: &[Row]) -> Result<WriteResult> {
        self.record(self.engine.upsert_rows(collection, rows))
    }

    pub fn delete(&self, collection: &str, pks: &[Pk]) -> Result<WriteResult> {
        self.record(self.engine.delete(collection, pks))
    }

    pub fn search(&self, collection: &str, queries: &[Vec<f32>], options: &SearchOptions) -> Result<SearchResult> {
        let options = SearchOptions { guarantee_ts: Some(self.last_write()), ..options.clone() };
        self.engine.search(collection, queries, &options)
    }

    pub fn get(&self, collection: &str, pks: &[Pk], options: &GetOptions) -> Result<Vec<BTreeMap<String, Value>>> {
        let options = GetOptions { guarantee_ts: Some(self.last_write()), ..options.clone() };
        self.engine.get(collection, pks, &options)
    }

    pub fn query(&self, collection: &str, options: &QueryOptions) -> Result<Vec<BTreeMap<String, Value>>> {
        let options = QueryOptions { guarantee_ts: Some(self.last_write()), ..options.clone() };
        self.engine.query(collection, &options)
    }
}

fn info(entry: &CatalogEntry, aliases: Vec<String>) -> CollectionInfo {
    CollectionInfo { id: entry.id, schema: entry.schema.clone(), created_ts: entry.created_ts, aliases }
}

fn named(schema: &CollectionSchema, fields: &[usize], values: Vec<Value>) -> BTreeMap<String, Value> {
    fields.iter().zip(values).map(|(&f, v)| (schema.fields[f].name.clone(), v)).collect()
}

fn unexpected(answer: Answer) -> Error {
    Error::storage(format!("unexpected answer from the dataflow: {answer:?}"))
}

/// A convenience for building rows: `row([("id", 1.into()), ("v", vec![..].into())])`.
pub fn row<const N: usize>(fields: [(&str, Value); N]) -> Row {
    fields.into_iter().map(|(k, v)| (k.to_string(), v)).collect()
}
