//! The engine: opens the log and the catalog, runs the dataflow on timely
//! worker threads, and offers the collection, write and read API.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use arrow::record_batch::RecordBatch;
use differential_dataflow::Hashable;
use timely::communication::WorkerGuards;
use vectorflow_connectors::manifest::{collection_prefix, delete_collection_objects, load_manifest, publish_manifest};
use vectorflow_connectors::{
    CatalogEntry, CatalogStore, Checkpoint, EmbeddedLog, KafkaConfig, KafkaLog, LogOp, LogRecord, Manifest,
    ObjectStorage, PartitionLag, SegmentFiles, StorageConfig,
};
use vectorflow_core::batch::{WriteBatch, WriteKind};
use vectorflow_core::time::before;
use vectorflow_core::{CollectionId, CollectionSchema, Error, IpcBatch, Metric, Pk, Result, Row, Timestamp, Value};
use vectorflow_operators::distance::{normalize, score};
use vectorflow_operators::{CompactionPolicy, Filter, IndexParams, SearchPlan, Shard, ShardConfig, ShardStats};

use crate::graph::{RecoveredShard, Shared, run_worker};
use crate::log::Log;
use crate::messages::{Answer, Request, RequestKind};
use crate::persist::{LoadJob, Loaded, Persister, RecoveryReport, load_segments, write_deletes};

/// Largest `ef` a search may ask for.
const MAX_EF: usize = 32_768;

/// How to open an engine.
#[derive(Debug, Clone)]
pub struct EngineConfig {
    /// Holds the write-ahead log and the catalog.
    pub data_dir: PathBuf,
    /// timely worker threads.
    pub workers: usize,
    /// Log partitions, fixed when the data directory is created (default: one per worker).
    pub log_partitions: Option<u32>,
    /// A growing segment seals at this many rows.
    pub seal_rows: usize,
    pub index: IndexParams,
    pub search_plan: SearchPlan,
    /// History kept for time travel.
    pub retention: Duration,
    /// Staleness bound of `Consistency::Bounded`.
    pub bounded_staleness: Duration,
    /// How often idle sources advance the frontier.
    pub tick: Duration,
    /// How long a read waits for the dataflow before it fails with `Timeout`.
    pub request_timeout: Duration,
    /// `ef` when a search does not set one (raised to `k` when smaller).
    pub default_ef: usize,
    /// The object store for the catalog, manifests and sealed segments.
    pub storage: StorageConfig,
    /// How often collections with new writes are checkpointed (`None`: only on flush).
    pub checkpoint_interval: Option<Duration>,
    /// How often compaction looks for segments to rewrite (`None`: only on `compact`).
    pub compaction_interval: Option<Duration>,
    /// Compaction rewrites a segment when more than this fraction of its rows is dead.
    pub compaction_dead_fraction: f32,
    /// Threads that load segments at recovery.
    pub load_threads: usize,
    /// Read and write Kafka topics instead of the embedded log.
    pub kafka: Option<KafkaConfig>,
    /// A log source stops reading while this many of its rows are not yet
    /// applied (Kafka keeps the rest: backpressure instead of buffering).
    pub max_in_flight_rows: usize,
}

impl EngineConfig {
    pub fn new(data_dir: impl Into<PathBuf>) -> Self {
        EngineConfig {
            data_dir: data_dir.into(),
            workers: 2,
            log_partitions: None,
            seal_rows: ShardConfig::default().seal_rows,
            index: IndexParams::default(),
            search_plan: SearchPlan::default(),
            retention: Duration::from_secs(24 * 3600),
            bounded_staleness: Duration::from_secs(1),
            tick: Duration::from_millis(5),
            request_timeout: Duration::from_secs(30),
            default_ef: 64,
            storage: StorageConfig::default(),
            checkpoint_interval: Some(Duration::from_secs(60)),
            compaction_interval: Some(Duration::from_secs(60)),
            compaction_dead_fraction: 0.2,
            load_threads: std::thread::available_parallelism().map_or(2, |n| n.get()),
            kafka: None,
            max_in_flight_rows: 50_000,
        }
    }
}

/// Read consistency, as in Milvus.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Consistency {
    /// Sees every write acknowledged before the read started.
    #[default]
    Strong,
    /// Sees the session's own writes (through [`Session`]).
    Session,
    /// At most `bounded_staleness` behind.
    Bounded,
    /// Whatever every worker has applied; never waits.
    Eventually,
}

impl std::str::FromStr for Consistency {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s.to_ascii_lowercase().as_str() {
            "strong" => Ok(Consistency::Strong),
            "session" => Ok(Consistency::Session),
            "bounded" => Ok(Consistency::Bounded),
            "eventually" => Ok(Consistency::Eventually),
            other => Err(Error::argument("consistency", format!("unknown level `{other}`"))),
        }
    }
}

/// What a write returns.
#[derive(Debug, Clone, PartialEq)]
pub struct WriteResult {
    pub pks: Vec<Pk>,
    /// The write's timestamp: reads at or after it see it.
    pub ts: Timestamp,
}

/// Options of a search.
#[derive(Debug, Clone, Default)]
pub struct SearchOptions {
    /// The vector field; may be left out when the collection has one.
    pub field: Option<String>,
    pub k: usize,
    pub ef: Option<usize>,
    pub output_fields: Vec<String>,
    /// Only rows passing this expression (Milvus or SQL predicate syntax).
    pub filter: Option<String>,
    pub consistency: Consistency,
    /// Time travel: answer as of this timestamp.
    pub as_of: Option<Timestamp>,
    /// For `Consistency::Session`: the session's last write (set by [`Session`]).
    pub guarantee_ts: Option<Timestamp>,
    /// Overrides the engine's request timeout.
    pub timeout: Option<Duration>,
}

impl SearchOptions {
    pub fn new(k: usize) -> Self {
        SearchOptions { k, ..Default::default() }
    }
}

/// Options of a get by primary keys.
#[derive(Debug, Clone, Default)]
pub struct GetOptions {
    pub output_fields: Vec<String>,
    pub consistency: Consistency,
    pub as_of: Option<Timestamp>,
    pub guarantee_ts: Option<Timestamp>,
    pub timeout: Option<Duration>,
}

/// Options of a query by expression.
#[derive(Debug, Clone, Default)]
pub struct QueryOptions {
    /// Rows passing this expression; all rows when `None`.
    pub filter: Option<String>,
    pub output_fields: Vec<String>,
    /// At most this many rows (after `offset`); all when `None`.
    pub limit: Option<usize>,
    pub offset: usize,
    pub consistency: Consistency,
    pub as_of: Option<Timestamp>,
    pub guarantee_ts: Option<Timestamp>,
    pub timeout: Option<Duration>,
}

/// One hit: the key, the metric's score (squared L2, inner product or cosine
/// similarity) and the requested fields.
#[derive(Debug, Clone, PartialEq)]
pub struct SearchHit {
    pub pk: Pk,
    pub score: f32,
    pub fields: BTreeMap<String, Value>,
}

/// Hits per query vector, best first, and the timestamp the search read at.
#[derive(Debug, Clone, PartialEq)]
pub struct SearchResult {
    pub hits: Vec<Vec<SearchHit>>,
    pub read_ts: Timestamp,
}

/// A collection as `describe` shows it.
#[derive(Debug, Clone, PartialEq)]
pub struct CollectionInfo {
    pub id: CollectionId,
    pub schema: CollectionSchema,
    pub created_ts: Timestamp,
}

/// Counts over every shard of a collection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CollectionStats {
    pub live_rows: usize,
    pub versions: usize,
    pub growing_rows: usize,
    pub sealed_segments: usize,
    pub indexed_segments: usize,
    pub read_ts: Timestamp,
}

/// How a collection's Kafka topic is being read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IngestStats {
    pub topic: String,
    /// Bad records sent to the dead-letter topic since the engine started.
    pub dead_letters: u64,
    pub partitions: Vec<PartitionLag>,
}

impl IngestStats {
    /// Records the brokers hold that the sources have not read yet.
    pub fn lag(&self) -> u64 {
        self.partitions.iter().map(PartitionLag::lag).sum()
    }
}

struct Inner {
    config: EngineConfig,
    shared: Arc<Shared>,
    catalog_store: CatalogStore,
    collections: RwLock<HashMap<String, CatalogEntry>>,
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
    maintenance: Mutex<Option<std::thread::JoinHandle<()>>>,
}

/// How long a checkpoint waits for a sealed segment's index build and upload.
const PERSIST_TIMEOUT: Duration = Duration::from_secs(1800);

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
        if config.workers == 0 {
            return Err(Error::argument("workers", "must be at least 1"));
        }
        if config.seal_rows == 0 {
            return Err(Error::argument("seal_rows", "must be at least 1"));
        }
        let started = Instant::now();
        let storage = ObjectStorage::open(&config.storage, &config.data_dir)?;
        let partitions = config.log_partitions.unwrap_or(config.workers as u32);
        let log = match &config.kafka {
            Some(kafka) => Log::Kafka(KafkaLog::open(kafka.clone(), config.workers, &config.data_dir.join("kafka"))?),
            None => Log::Embedded(EmbeddedLog::open(&config.data_dir.join("wal"), partitions)?),
        };
        let catalog_store = CatalogStore::open(storage.clone())?;
        let entries = catalog_store.load()?;
        for entry in &entries {
            log.tso().observe(entry.created_ts);
        }
        let shard_config = ShardConfig { seal_rows: config.seal_rows, index: config.index, plan: config.search_plan };
        let persister = Persister::start(storage.clone())?;
        let recovered = recover(&config, &storage, &log, &entries, &persister, shard_config).inspect_err(|_| {
            // Nothing will submit to it: let its thread end.
            persister.stop();
        })?;
        let schemas = entries.iter().map(|e| (e.id, Arc::new(e.schema.clone()))).collect();
        let collections = entries.into_iter().map(|e| (e.schema.name.clone(), e)).collect();
        let shared = Arc::new(Shared {
            log,
            workers: config.workers,
            schemas: RwLock::new(schemas),
            catalog_version: AtomicU64::new(0),
            requests: (0..config.workers).map(|_| Mutex::new(Vec::new())).collect(),
            request_activators: Mutex::new(HashMap::new()),
            source_activators: Mutex::new(HashMap::new()),
            replies: Mutex::new(HashMap::new()),
            applied: (0..config.workers).map(|_| AtomicU64::new(0)).collect(),
            shutdown: AtomicBool::new(false),
            ingest_paused: AtomicBool::new(false),
            shard_config,
            tick: config.tick,
            poll_batch: if config.kafka.is_some() { 1024 } else { 256 },
            max_in_flight_rows: config.max_in_flight_rows.max(1),
            persister,
            recovered: Mutex::new(recovered.shards),
            replay_from: recovered.replay_from,
            skip_through: recovered.skip_through,
        });
        let worker_shared = shared.clone();
        let guards = timely::execute(timely::Config::process(config.workers), move |worker| {
            run_worker(worker, worker_shared.clone());
        })
        .map_err(|e| Error::storage(format!("starting the dataflow workers: {e}")))?;
        let engine = Engine {
            inner: Arc::new(Inner {
                config,
                shared,
                catalog_store,
                collections: RwLock::new(collections),
                next_request: AtomicU64::new(1),
                guards: Mutex::new(Some(guards)),
                closed: AtomicBool::new(false),
                storage,
                manifests: Mutex::new(recovered.manifests),
                dirty: Mutex::new(recovered.dirty),
                checkpointing: Mutex::new(()),
                recovery: Mutex::new(recovered.report),
                maintenance: Mutex::new(None),
            }),
        };
        engine.wait_for_replay(started)?;
        engine.start_maintenance()?;
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

    /// Waits until the dataflow has applied every record the log held at
    /// open, and records how long recovery took.
    fn wait_for_replay(&self, started: Instant) -> Result<()> {
        let shared = &self.inner.shared;
        if let Some(kafka) = shared.log.kafka() {
            // Everything the brokers hold now is the "log at open".
            kafka.sync_all(self.inner.config.request_timeout.max(Duration::from_secs(600)))?;
        }
        let target = shared.log.tso().next_possible();
        let mut logged = Instant::now();
        while shared.applied_frontier() <= target {
            if self.inner.closed.load(Ordering::Acquire) {
                return Err(Error::Shutdown);
            }
            shared.wake_sources();
            std::thread::sleep(Duration::from_millis(2));
            if logged.elapsed() > Duration::from_secs(5) {
                tracing::info!(elapsed = ?started.elapsed(), "replaying the log");
                logged = Instant::now();
            }
        }
        if let Ok(mut report) = self.inner.recovery.lock() {
            report.total = started.elapsed();
        }
        Ok(())
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
        match &self.inner.shared.log {
            Log::Embedded(log) => log.held_records(),
            Log::Kafka(_) => Ok(0),
        }
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
        before(self.inner.shared.log.tso().next_possible(), self.inner.config.retention)
    }

    // ---- collections ----

    pub fn create_collection(&self, schema: CollectionSchema) -> Result<CollectionInfo> {
        schema.validate()?;
        let mut collections = self.inner.collections.write().map_err(|_| Error::Shutdown)?;
        if collections.contains_key(&schema.name) {
            return Err(Error::CollectionExists(schema.name));
        }
        let created_ts = self.inner.shared.log.tso().allocate(1);
        let entry = self.inner.catalog_store.create(schema, created_ts)?;
        let manifest = initial_manifest(&entry, &self.inner.shared.log, self.inner.config.workers)?;
        publish_manifest(&self.inner.storage, &manifest)?;
        if let Some(kafka) = self.inner.shared.log.kafka() {
            kafka.register(entry.id, Arc::new(entry.schema.clone()), &manifest.checkpoint.log_positions)?;
        }
        if let Ok(mut manifests) = self.inner.manifests.lock() {
            manifests.insert(entry.id, manifest);
        }
        if let Ok(mut schemas) = self.inner.shared.schemas.write() {
            schemas.insert(entry.id, Arc::new(entry.schema.clone()));
        }
        self.inner.shared.catalog_version.fetch_add(1, Ordering::AcqRel);
        collections.insert(entry.schema.name.clone(), entry.clone());
        Ok(info(&entry))
    }

    pub fn drop_collection(&self, name: &str) -> Result<()> {
        let mut collections = self.inner.collections.write().map_err(|_| Error::Shutdown)?;
        let entry = collections.get(name).ok_or_else(|| Error::CollectionNotFound(name.to_string()))?;
        self.inner.catalog_store.drop_collection(name)?;
        if let Ok(mut schemas) = self.inner.shared.schemas.write() {
            schemas.remove(&entry.id);
        }
        if let Ok(mut manifests) = self.inner.manifests.lock() {
            manifests.remove(&entry.id);
        }
        if let Some(kafka) = self.inner.shared.log.kafka()
            && let Err(e) = kafka.unregister(entry.id)
        {
            tracing::warn!(collection = name, "forgetting the dropped collection's offset bindings: {e}");
        }
        if let Err(e) = delete_collection_objects(&self.inner.storage, entry.id) {
            tracing::warn!(collection = name, "removing the dropped collection's objects: {e}");
        }
        self.inner.shared.catalog_version.fetch_add(1, Ordering::AcqRel);
        collections.remove(name);
        Ok(())
    }

    pub fn list_collections(&self) -> Vec<String> {
        let mut names: Vec<String> =
            self.inner.collections.read().map(|c| c.keys().cloned().collect()).unwrap_or_default();
        names.sort();
        names
    }

    pub fn describe_collection(&self, name: &str) -> Result<CollectionInfo> {
        Ok(info(&self.entry(name)?))
    }

    fn entry(&self, name: &str) -> Result<CatalogEntry> {
        let collections = self.inner.collections.read().map_err(|_| Error::Shutdown)?;
        collections.get(name).cloned().ok_or_else(|| Error::CollectionNotFound(name.to_string()))
    }

    // ---- writes ----

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
        let entry = self.entry(collection)?;
        let pk_field = entry.schema.primary();
        for pk in pks {
            let fits = matches!(
                (pk, &pk_field.data_type),
                (Pk::Int(_), vectorflow_core::DataType::Int64)
                    | (Pk::Str(_), vectorflow_core::DataType::VarChar { .. })
            );
            if !fits {
                return Err(Error::field(&pk_field.name, format!("key {pk} does not fit {:?}", pk_field.data_type)));
            }
        }
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

    fn write_batch(
        &self,
        collection: &str,
        kind: WriteKind,
        validate: impl FnOnce(&CollectionSchema, WriteKind) -> Result<WriteBatch>,
    ) -> Result<WriteResult> {
        let entry = self.entry(collection)?;
        let schema = &entry.schema;
        let write = validate(schema, kind)?;
        let rows = write.batch.num_rows();
        if rows == 0 {
            return Ok(WriteResult { pks: Vec::new(), ts: self.inner.shared.log.tso().last() });
        }
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

    // ---- reads ----

    /// Searches the `k` nearest rows to each query vector.
    pub fn search(&self, collection: &str, queries: &[Vec<f32>], options: &SearchOptions) -> Result<SearchResult> {
        let entry = self.entry(collection)?;
        let schema = &entry.schema;
        let (field, dim, metric) = schema.vector_field(options.field.as_deref())?;
        if options.k == 0 {
            return Err(Error::argument("k", "must be at least 1"));
        }
        if options.k > 16_384 {
            return Err(Error::argument("k", format!("{} exceeds the limit of 16384", options.k)));
        }
        if queries.is_empty() {
            return Err(Error::argument("vectors", "no query vectors"));
        }
        if let Some(ef) = options.ef
            && !(1..=MAX_EF).contains(&ef)
        {
            return Err(Error::argument("ef", format!("{ef} outside 1..={MAX_EF}")));
        }
        let field_name = &schema.fields[field].name;
        let mut queries = queries.to_vec();
        for (i, query) in queries.iter_mut().enumerate() {
            if query.len() != dim {
                return Err(Error::field(
                    field_name,
                    format!("query {i}: dimension {} does not match dim {dim}", query.len()),
                ));
            }
            if query.iter().any(|x| !x.is_finite()) {
                return Err(Error::field(field_name, format!("query {i}: holds NaN or infinity")));
            }
            if metric == Metric::COSINE {
                normalize(query);
            }
        }
        let output_fields = self.output_fields(schema, &options.output_fields)?;
        let filter = checked_filter(schema, options.filter.as_deref())?;
        let ef = options.ef.unwrap_or(self.inner.config.default_ef).max(options.k);
        let read_ts = self.read_ts(entry.id, options.consistency, options.as_of, options.guarantee_ts)?;
        let kind =
            RequestKind::Search { field, queries, k: options.k, ef, filter, output_fields: output_fields.clone() };
        let answer = self.request(entry.id, read_ts, kind, options.timeout, options.consistency, options.as_of)?;
        let Answer::Search { hits, .. } = answer else { return Err(unexpected(answer)) };
        let hits = hits
            .into_iter()
            .map(|hits| {
                hits.into_iter()
                    .map(|hit| SearchHit {
                        pk: hit.pk,
                        score: score(metric, hit.distance),
                        fields: named(schema, &output_fields, hit.fields),
                    })
                    .collect()
            })
            .collect();
        Ok(SearchResult { hits, read_ts })
    }

    /// The rows with these primary keys (those that exist), in the order asked.
    pub fn get(&self, collection: &str, pks: &[Pk], options: &GetOptions) -> Result<Vec<BTreeMap<String, Value>>> {
        let entry = self.entry(collection)?;
        let schema = &entry.schema;
        let output_fields = self.output_fields(schema, &options.output_fields)?;
        let read_ts = self.read_ts(entry.id, options.consistency, options.as_of, options.guarantee_ts)?;
        let kind = RequestKind::Get { pks: pks.to_vec(), output_fields: output_fields.clone() };
        let answer = self.request(entry.id, read_ts, kind, options.timeout, options.consistency, options.as_of)?;
        let Answer::Get(rows) = answer else { return Err(unexpected(answer)) };
        let mut by_pk: HashMap<Pk, Vec<Value>> = rows.into_iter().collect();
        let pk_name = &schema.primary().name;
        Ok(pks
            .iter()
            .filter_map(|pk| {
                let values = by_pk.remove(pk)?;
                let mut row = named(schema, &output_fields, values);
                row.insert(pk_name.clone(), pk.clone().into());
                Some(row)
            })
            .collect())
    }

    /// Rows passing `options.filter` (all rows without one), in primary-key
    /// order, after `offset`, at most `limit`; with the primary key and `output_fields`.
    pub fn query(&self, collection: &str, options: &QueryOptions) -> Result<Vec<BTreeMap<String, Value>>> {
        let entry = self.entry(collection)?;
        let schema = &entry.schema;
        let output_fields = self.output_fields(schema, &options.output_fields)?;
        let rows = self.query_rows(&entry, options, &output_fields)?;
        let pk_name = &schema.primary().name;
        Ok(rows
            .into_iter()
            .map(|(pk, values)| {
                let mut row = named(schema, &output_fields, values);
                row.insert(pk_name.clone(), pk.into());
                row
            })
            .collect())
    }

    /// Keys and `output_fields` of the rows a query selects, after `offset`.
    fn query_rows(
        &self,
        entry: &CatalogEntry,
        options: &QueryOptions,
        output_fields: &[usize],
    ) -> Result<Vec<(Pk, Vec<Value>)>> {
        let filter = checked_filter(&entry.schema, options.filter.as_deref())?;
        let read_ts = self.read_ts(entry.id, options.consistency, options.as_of, options.guarantee_ts)?;
        let limit = options.limit.map_or(usize::MAX, |l| l.saturating_add(options.offset));
        let kind = RequestKind::Query { filter, output_fields: output_fields.to_vec(), limit };
        let answer = self.request(entry.id, read_ts, kind, options.timeout, options.consistency, options.as_of)?;
        let Answer::Query { rows, .. } = answer else { return Err(unexpected(answer)) };
        Ok(rows.into_iter().skip(options.offset).collect())
    }

    /// How many rows pass `options.filter` (`count(*)`); limit and offset are ignored.
    pub fn count(&self, collection: &str, options: &QueryOptions) -> Result<usize> {
        let entry = self.entry(collection)?;
        let filter = checked_filter(&entry.schema, options.filter.as_deref())?;
        let read_ts = self.read_ts(entry.id, options.consistency, options.as_of, options.guarantee_ts)?;
        let kind = RequestKind::Count { filter };
        match self.request(entry.id, read_ts, kind, options.timeout, options.consistency, options.as_of)? {
            Answer::Count(count) => Ok(count),
            other => Err(unexpected(other)),
        }
    }

    /// Deletes the rows passing `filter` as of a Strong read, through the log
    /// like any delete. Returns the keys deleted and the delete's timestamp.
    pub fn delete_by_filter(&self, collection: &str, filter: &str) -> Result<WriteResult> {
        let entry = self.entry(collection)?;
        let options = QueryOptions { filter: Some(filter.to_string()), ..Default::default() };
        let pks: Vec<Pk> = self.query_rows(&entry, &options, &[])?.into_iter().map(|(pk, _)| pk).collect();
        self.delete(collection, &pks)
    }

    /// Makes every write acknowledged so far durable in the object store:
    /// a checkpoint that seals the growing segments, writes them with their
    /// indexes and publishes the collection's manifest. Returns the
    /// checkpoint's time once the manifest is published.
    pub fn flush(&self, collection: &str) -> Result<Timestamp> {
        let entry = self.entry(collection)?;
        self.checkpoint(&entry)
    }

    /// A checkpoint of one collection (see [`Engine::flush`]).
    fn checkpoint(&self, entry: &CatalogEntry) -> Result<Timestamp> {
        let inner = &self.inner;
        let _one_at_a_time = inner.checkpointing.lock().map_err(|_| Error::Shutdown)?;
        let previous = inner
            .manifests
            .lock()
            .map_err(|_| Error::Shutdown)?
            .get(&entry.id)
            .cloned()
            .ok_or_else(|| Error::storage(format!("collection `{}` has no manifest", entry.schema.name)))?;
        let stored: HashMap<&str, &SegmentFiles> =
            previous.segments.iter().flatten().map(|files| (files.uid.as_str(), files)).collect();
        let known = stored.iter().map(|(uid, files)| (uid.to_string(), files.deleted)).collect();
        if let Ok(mut dirty) = inner.dirty.lock() {
            dirty.remove(&entry.id);
        }
        let ts = inner.shared.log.tso().allocate(1);
        let answer = self.request(entry.id, ts, RequestKind::Checkpoint { known }, None, Consistency::Strong, None)?;
        let Answer::Checkpoint(parts) = answer else { return Err(unexpected(answer)) };
        // Every write at or before `ts` is committed now (the frontier passed it).
        if let Some(kafka) = inner.shared.log.kafka() {
            // Dead letters of the records the checkpoint covers were handed
            // to the producer before those records were applied: delivered
            // before the checkpoint moves past them, they cannot be lost.
            kafka.flush_producer()?;
        }
        let log_positions = match &inner.shared.log {
            Log::Embedded(log) => log.positions_after(ts)?,
            Log::Kafka(kafka) => kafka.positions_after(entry.id, ts)?,
        };
        let version = previous.version + 1;
        let mut segments = vec![Vec::new(); inner.config.workers];
        for (shard, states) in parts {
            let slot = segments
                .get_mut(shard)
                .ok_or_else(|| Error::storage(format!("checkpoint answer from unknown shard {shard}")))?;
            for state in states {
                let mut files = match stored.get(state.uid.as_str()) {
                    Some(files) => (*files).clone(),
                    None => inner.shared.persister.wait(&state.uid, PERSIST_TIMEOUT)?,
                };
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
            shards: inner.config.workers,
            checkpoint: Checkpoint { ts, log_positions },
            segments,
        };
        publish_manifest(&inner.storage, &manifest)?;
        inner.shared.persister.published(manifest.segments.iter().flatten().map(|f| f.uid.clone()));
        if let Ok(mut manifests) = inner.manifests.lock() {
            manifests.insert(entry.id, manifest.clone());
        }
        if let Err(e) = self.collect_garbage(&manifest) {
            tracing::warn!(collection = entry.schema.name, "removing unreferenced objects: {e}");
        }
        let truncated = match &inner.shared.log {
            Log::Embedded(_) => self.truncate_log(),
            Log::Kafka(kafka) => kafka.checkpointed(entry.id, &manifest.checkpoint.log_positions),
        };
        if let Err(e) = truncated {
            tracing::warn!("truncating the log: {e}");
        }
        tracing::debug!(collection = entry.schema.name, version, ts, "checkpoint published");
        Ok(ts)
    }

    /// Removes the collection's segment objects that the newest manifest
    /// does not list and no shard holds (compacted away, superseded delete
    /// logs, or left by a crash before they were published).
    fn collect_garbage(&self, manifest: &Manifest) -> Result<()> {
        let storage = &self.inner.storage;
        let referenced: HashSet<&str> = manifest.objects().map(|o| o.path.as_str()).collect();
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

    /// Drops the log records every collection's checkpoint covers.
    fn truncate_log(&self) -> Result<()> {
        let Log::Embedded(log) = &self.inner.shared.log else { return Ok(()) };
        let manifests = self.inner.manifests.lock().map_err(|_| Error::Shutdown)?;
        let below = oldest_checkpoint_positions(manifests.values(), log.ends());
        drop(manifests);
        let removed = log.truncate_below(&below)?;
        if removed > 0 {
            tracing::debug!(removed, "log truncated");
        }
        Ok(())
    }

    /// Compacts the collection now: segments with more dead rows than
    /// `compaction_dead_fraction` (rows no read inside the retention window
    /// can see) are rewritten, small ones merged; waits for the new indexes,
    /// then publishes a checkpoint (which removes the replaced objects).
    pub fn compact(&self, collection: &str) -> Result<CompactionReport> {
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
    fn start_compaction(&self, entry: &CatalogEntry) -> Result<(usize, Timestamp)> {
        let horizon = self.retention_horizon();
        let policy = CompactionPolicy {
            dead_fraction: self.inner.config.compaction_dead_fraction,
            small_rows: (self.inner.config.seal_rows / 2).max(1),
        };
        let kind = RequestKind::Compact { horizon, policy };
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
    fn start_maintenance(&self) -> Result<()> {
        let config = &self.inner.config;
        if config.checkpoint_interval.is_none() && config.compaction_interval.is_none() {
            return Ok(());
        }
        let weak = Arc::downgrade(&self.inner);
        let (checkpoint_every, compact_every) = (config.checkpoint_interval, config.compaction_interval);
        let thread = std::thread::Builder::new()
            .name("maintenance".into())
            .spawn(move || maintain(weak, checkpoint_every, compact_every))
            .map_err(|e| Error::storage(format!("starting the maintenance thread: {e}")))?;
        if let Ok(mut slot) = self.inner.maintenance.lock() {
            *slot = Some(thread);
        }
        Ok(())
    }

    /// Checkpoints a collection if the log moved past its checkpoint or a
    /// compaction changed it since.
    fn checkpoint_if_changed(&self, entry: &CatalogEntry) -> Result<()> {
        let positions = match &self.inner.shared.log {
            Log::Embedded(log) => log.ends(),
            Log::Kafka(kafka) => kafka.positions(entry.id)?,
        };
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

    /// Row and segment counts at a consistency level.
    pub fn stats(&self, collection: &str, consistency: Consistency) -> Result<CollectionStats> {
        let entry = self.entry(collection)?;
        let read_ts = self.read_ts(entry.id, consistency, None, None)?;
        match self.request(entry.id, read_ts, RequestKind::Stats, None, consistency, None)? {
            Answer::Stats(ShardStats {
                versions, live_rows, growing_rows, sealed_segments, indexed_segments, ..
            }) => Ok(CollectionStats { live_rows, versions, growing_rows, sealed_segments, indexed_segments, read_ts }),
            other => Err(unexpected(other)),
        }
    }

    /// Kafka ingestion of the collection: dead letters and lag per partition
    /// (`None` on the embedded log). Asks the brokers for their watermarks.
    pub fn ingest_stats(&self, collection: &str) -> Result<Option<IngestStats>> {
        let entry = self.entry(collection)?;
        let Some(kafka) = self.inner.shared.log.kafka() else { return Ok(None) };
        Ok(Some(IngestStats {
            topic: kafka.config().topic_of(&entry.schema.name),
            dead_letters: kafka.dead_letters(entry.id),
            partitions: kafka.lag(entry.id)?,
        }))
    }

    /// Waits until every sealed segment of the collection has its index, or `timeout`.
    pub fn wait_for_indexes(&self, collection: &str, timeout: Duration) -> Result<CollectionStats> {
        let deadline = std::time::Instant::now() + timeout;
        loop {
            let stats = self.stats(collection, Consistency::Eventually)?;
            if stats.indexed_segments == stats.sealed_segments {
                return Ok(stats);
            }
            if std::time::Instant::now() >= deadline {
                return Err(Error::Timeout(timeout));
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    fn output_fields(&self, schema: &CollectionSchema, names: &[String]) -> Result<Vec<usize>> {
        names.iter().map(|name| schema.field(name).map(|(i, _)| i)).collect()
    }

    /// The timestamp a read answers at.
    fn read_ts(
        &self,
        collection: CollectionId,
        consistency: Consistency,
        as_of: Option<Timestamp>,
        guarantee_ts: Option<Timestamp>,
    ) -> Result<Timestamp> {
        let tso = self.inner.shared.log.tso();
        if let Some(as_of) = as_of {
            let now = tso.next_possible();
            if as_of > now {
                return Err(Error::FutureTimestamp { as_of, now });
            }
            let horizon = before(now, self.inner.config.retention);
            if as_of < horizon {
                return Err(Error::OutsideRetention { as_of, horizon });
            }
            return Ok(as_of);
        }
        let applied = self.inner.shared.applied_frontier().saturating_sub(1);
        Ok(match consistency {
            Consistency::Strong => {
                if let Some(kafka) = self.inner.shared.log.kafka() {
                    // Acknowledged by the brokers means read by the sources
                    // first; their records then have times before this read's.
                    kafka.sync(collection, self.inner.config.request_timeout)?;
                }
                tso.allocate(1)
            }
            Consistency::Session => applied.max(guarantee_ts.unwrap_or(0)),
            Consistency::Bounded => applied.max(before(tso.next_possible(), self.inner.config.bounded_staleness)),
            Consistency::Eventually => applied,
        })
    }

    /// Sends a request through the dataflow and waits for the merged answer.
    fn request(
        &self,
        collection: CollectionId,
        read_ts: Timestamp,
        kind: RequestKind,
        timeout: Option<Duration>,
        consistency: Consistency,
        as_of: Option<Timestamp>,
    ) -> Result<Answer> {
        if self.inner.closed.load(Ordering::Acquire) {
            return Err(Error::Shutdown);
        }
        let shared = &self.inner.shared;
        let id = self.inner.next_request.fetch_add(1, Ordering::Relaxed);
        let origin = (id % shared.workers as u64) as usize;
        let (reply, answer) = std::sync::mpsc::sync_channel(1);
        shared.replies.lock().map_err(|_| Error::Shutdown)?.insert(id, reply);
        shared.requests[origin].lock().map_err(|_| Error::Shutdown)?.push(Request {
            id,
            origin,
            collection,
            read_ts,
            kind,
        });
        shared.wake_requests(origin);
        if consistency == Consistency::Strong || as_of.is_some() {
            shared.wake_sources();
        }
        let timeout = timeout.unwrap_or(self.inner.config.request_timeout);
        match answer.recv_timeout(timeout) {
            Ok(Answer::Failed(problem)) => Err(Error::storage(problem)),
            Ok(Answer::Compacted { horizon }) => Err(Error::OutsideRetention { as_of: read_ts, horizon }),
            Ok(answer) => Ok(answer),
            Err(_) => {
                if let Ok(mut replies) = shared.replies.lock() {
                    replies.remove(&id);
                }
                if self.inner.closed.load(Ordering::Acquire) {
                    Err(Error::Shutdown)
                } else {
                    Err(Error::Timeout(timeout))
                }
            }
        }
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

    /// Stops the workers. Acknowledged writes are already durable in the log.
    pub fn shutdown(&self) {
        self.inner.stop();
    }
}

impl Inner {
    /// Stops the workers and waits for them; later calls do nothing.
    fn stop(&self) {
        if self.closed.swap(true, Ordering::AcqRel) {
            return;
        }
        if let Some(thread) = self.maintenance.lock().ok().and_then(|mut m| m.take())
            && thread.thread().id() != std::thread::current().id()
        {
            let _ = thread.join();
        }
        self.shared.persister.stop();
        self.shared.stop();
        if let Some(guards) = self.guards.lock().ok().and_then(|mut g| g.take()) {
            for result in guards.join() {
                if let Err(e) = result {
                    tracing::error!("worker ended with an error: {e}");
                }
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

/// The maintenance loop: checkpoints and compaction on their intervals,
/// until the engine closes or is dropped.
fn maintain(inner: std::sync::Weak<Inner>, checkpoint_every: Option<Duration>, compact_every: Option<Duration>) {
    let step = Duration::from_millis(20);
    let (mut next_checkpoint, mut next_compaction) = {
        let now = Instant::now();
        (checkpoint_every.map(|d| now + d), compact_every.map(|d| now + d))
    };
    loop {
        std::thread::sleep(step);
        let Some(inner) = inner.upgrade() else { return };
        if inner.closed.load(Ordering::Acquire) {
            return;
        }
        let engine = Engine { inner };
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

/// The manifest of a collection nothing has been checkpointed for: no
/// segments, replay from the log position at its creation.
fn initial_manifest(entry: &CatalogEntry, log: &Log, workers: usize) -> Result<Manifest> {
    let log_positions = match log {
        Log::Embedded(log) => log.positions_after(entry.created_ts)?,
        // A topic is read from its beginning (Kafka's `earliest`).
        Log::Kafka(_) => Vec::new(),
    };
    Ok(Manifest {
        version: 1,
        collection: entry.id,
        shards: workers,
        checkpoint: Checkpoint { ts: entry.created_ts, log_positions },
        segments: vec![Vec::new(); workers],
    })
}

/// Per log partition, the lowest position any of `manifests` still needs
/// (`ends` where none needs anything).
fn oldest_checkpoint_positions<'a>(manifests: impl Iterator<Item = &'a Manifest>, mut ends: Vec<u64>) -> Vec<u64> {
    for manifest in manifests {
        for (slot, position) in ends.iter_mut().zip(&manifest.checkpoint.log_positions) {
            *slot = (*slot).min(*position);
        }
    }
    ends
}

/// What recovery hands the dataflow and the engine.
struct Recovered {
    shards: HashMap<usize, Vec<RecoveredShard>>,
    replay_from: Vec<u64>,
    skip_through: HashMap<CollectionId, Timestamp>,
    manifests: HashMap<CollectionId, Manifest>,
    dirty: HashSet<CollectionId>,
    report: RecoveryReport,
}

/// Reads every collection's manifest and loads its segments as of the
/// checkpoint (in parallel); works out where the log replay starts.
fn recover(
    config: &EngineConfig,
    storage: &ObjectStorage,
    log: &Log,
    entries: &[CatalogEntry],
    persister: &Persister,
    shard_config: ShardConfig,
) -> Result<Recovered> {
    let replayed_records = match log {
        Log::Embedded(log) => log.held_records()?,
        Log::Kafka(_) => 0,
    };
    let mut report = RecoveryReport { collections: entries.len(), replayed_records, ..Default::default() };
    let mut manifests = HashMap::new();
    for entry in entries {
        let manifest = match load_manifest(storage, entry.id)? {
            Some(manifest) => {
                if manifest.shards != config.workers {
                    tracing::warn!(
                        collection = entry.schema.name,
                        stored = manifest.shards,
                        workers = config.workers,
                        "segments were cut for another worker count: splitting them by key, indexes are rebuilt"
                    );
                }
                manifest
            }
            // Created, then a crash before its first manifest: no write to it was acknowledged.
            None => {
                let manifest = initial_manifest(entry, log, config.workers)?;
                publish_manifest(storage, &manifest)?;
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
            manifest.segments.iter().enumerate().flat_map(move |(shard, segments)| {
                segments.iter().map(move |files| LoadJob {
                    collection: entry.id,
                    schema: &entry.schema,
                    shard,
                    files,
                    as_of: manifest.checkpoint.ts,
                    reshard_to: (manifest.shards != config.workers).then_some(config.workers),
                })
            })
        })
        .collect();
    let started = Instant::now();
    let loaded = load_segments(storage, &jobs, config.index, config.load_threads)?;
    report.load = started.elapsed();

    let mut dirty = HashSet::new();
    let mut per_shard: BTreeMap<(usize, CollectionId), Vec<vectorflow_operators::Segment>> = BTreeMap::new();
    for Loaded { collection, shard, segment, rebuilt, bytes } in loaded {
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
        let shard = Shard::restore(Arc::new(entry.schema.clone()), shard_config, segments);
        shards.entry(worker).or_default().push((collection, at, shard));
    }
    let replay_from = match log {
        Log::Embedded(log) => oldest_checkpoint_positions(manifests.values(), log.ends()),
        Log::Kafka(kafka) => {
            // Each collection's sources seek to its own checkpoint.
            for entry in entries {
                let positions = &manifests[&entry.id].checkpoint.log_positions;
                kafka.register(entry.id, Arc::new(entry.schema.clone()), positions)?;
            }
            Vec::new()
        }
    };
    let skip_through = manifests.iter().map(|(id, m)| (*id, m.checkpoint.ts)).collect();
    Ok(Recovered { shards, replay_from, skip_through, manifests, dirty, report })
}

/// Checks a filter against the schema here, so the caller gets the error
/// with its position; workers compile the same text again.
fn checked_filter(schema: &CollectionSchema, filter: Option<&str>) -> Result<Option<String>> {
    match filter.map(str::trim) {
        None | Some("") => Ok(None),
        Some(text) => {
            Filter::compile(schema, text)?;
            Ok(Some(text.to_string()))
        }
    }
}

fn info(entry: &CatalogEntry) -> CollectionInfo {
    CollectionInfo { id: entry.id, schema: entry.schema.clone(), created_ts: entry.created_ts }
}

fn insert_kind() -> WriteKind {
    // Auto ids are assigned from the write's timestamp once it is known.
    WriteKind::Insert { first_auto_id: 0 }
}

/// Replaces placeholder auto ids with ids from the write's reserved timestamps.
fn with_auto_ids(write: WriteBatch, pk_index: usize, first: i64) -> Result<WriteBatch> {
    let rows = write.batch.num_rows() as i64;
    let ids = arrow::array::Int64Array::from_iter_values(first..first + rows);
    let mut columns = write.batch.columns().to_vec();
    columns[pk_index] = Arc::new(ids);
    let batch = RecordBatch::try_new(write.batch.schema(), columns)?;
    Ok(WriteBatch { batch, pks: (first..first + rows).map(Pk::Int).collect() })
}

fn partition_of(collection: CollectionId, pk: &Pk, partitions: u32) -> u32 {
    ((&collection, pk).hashed() % u64::from(partitions)) as u32
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
