//! The engine: opens the log and the catalog, runs the dataflow on timely
//! worker threads, and offers the collection, write and read API.

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use arrow::record_batch::RecordBatch;
use differential_dataflow::Hashable;
use timely::communication::WorkerGuards;
use vectorflow_connectors::{CatalogEntry, CatalogStore, EmbeddedLog, LogOp, LogRecord};
use vectorflow_core::batch::{WriteBatch, WriteKind};
use vectorflow_core::time::before;
use vectorflow_core::{CollectionId, CollectionSchema, Error, IpcBatch, Metric, Pk, Result, Row, Timestamp, Value};
use vectorflow_operators::distance::{normalize, score};
use vectorflow_operators::{Filter, IndexParams, SearchPlan, ShardConfig, ShardStats};

use crate::graph::{Shared, run_worker};
use crate::messages::{Answer, Request, RequestKind};

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

struct Inner {
    config: EngineConfig,
    shared: Arc<Shared>,
    catalog_store: CatalogStore,
    collections: RwLock<HashMap<String, CatalogEntry>>,
    next_request: AtomicU64,
    guards: Mutex<Option<WorkerGuards<()>>>,
    closed: AtomicBool,
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
    /// Opens the engine on `config.data_dir`, replaying the log into the dataflow.
    pub fn open(config: EngineConfig) -> Result<Engine> {
        if config.workers == 0 {
            return Err(Error::argument("workers", "must be at least 1"));
        }
        if config.seal_rows == 0 {
            return Err(Error::argument("seal_rows", "must be at least 1"));
        }
        let partitions = config.log_partitions.unwrap_or(config.workers as u32);
        let log = EmbeddedLog::open(&config.data_dir.join("wal"), partitions)?;
        let catalog_store = CatalogStore::open(&config.data_dir)?;
        let entries = catalog_store.load()?;
        for entry in &entries {
            log.tso().observe(entry.created_ts);
        }
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
            shard_config: ShardConfig { seal_rows: config.seal_rows, index: config.index, plan: config.search_plan },
            tick: config.tick,
            poll_batch: 256,
        });
        let worker_shared = shared.clone();
        let guards = timely::execute(timely::Config::process(config.workers), move |worker| {
            run_worker(worker, worker_shared.clone());
        })
        .map_err(|e| Error::storage(format!("starting the dataflow workers: {e}")))?;
        tracing::info!(data_dir = %config.data_dir.display(), workers = config.workers, partitions, "engine open");
        Ok(Engine {
            inner: Arc::new(Inner {
                config,
                shared,
                catalog_store,
                collections: RwLock::new(collections),
                next_request: AtomicU64::new(1),
                guards: Mutex::new(Some(guards)),
                closed: AtomicBool::new(false),
            }),
        })
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
        let partitions = self.inner.shared.log.partitions();
        let mut by_partition: BTreeMap<u32, Vec<Pk>> = BTreeMap::new();
        for pk in pks {
            by_partition.entry(partition_of(entry.id, pk, partitions)).or_default().push(pk.clone());
        }
        let records = by_partition
            .into_iter()
            .map(|(p, pks)| (p, LogRecord { collection: entry.id, op: LogOp::Delete(pks) }))
            .collect();
        let ts = self.inner.shared.log.append(records)?;
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
        let partitions = self.inner.shared.log.partitions();
        let mut pks = Vec::new();
        let ts = self.inner.shared.log.append_with(rows as u64, |first_ts| {
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
        let read_ts = self.read_ts(options.consistency, options.as_of, options.guarantee_ts)?;
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
        let read_ts = self.read_ts(options.consistency, options.as_of, options.guarantee_ts)?;
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
        let read_ts = self.read_ts(options.consistency, options.as_of, options.guarantee_ts)?;
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
        let read_ts = self.read_ts(options.consistency, options.as_of, options.guarantee_ts)?;
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

    /// Waits until every write acknowledged so far is applied, then seals the
    /// growing segments (their indexes build in the background). The log has
    /// made every acknowledged write durable already. Returns the flush time.
    pub fn flush(&self, collection: &str) -> Result<Timestamp> {
        let entry = self.entry(collection)?;
        let read_ts = self.read_ts(Consistency::Strong, None, None)?;
        match self.request(entry.id, read_ts, RequestKind::Seal, None, Consistency::Strong, None)? {
            Answer::Done => Ok(read_ts),
            other => Err(unexpected(other)),
        }
    }

    /// Row and segment counts at a consistency level.
    pub fn stats(&self, collection: &str, consistency: Consistency) -> Result<CollectionStats> {
        let entry = self.entry(collection)?;
        let read_ts = self.read_ts(consistency, None, None)?;
        match self.request(entry.id, read_ts, RequestKind::Stats, None, consistency, None)? {
            Answer::Stats(ShardStats { versions, live_rows, growing_rows, sealed_segments, indexed_segments }) => {
                Ok(CollectionStats { live_rows, versions, growing_rows, sealed_segments, indexed_segments, read_ts })
            }
            other => Err(unexpected(other)),
        }
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
            Consistency::Strong => tso.allocate(1),
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
