//! The engine's configuration, and the options and answers of its API.

use super::*;

/// How to open an engine.
#[derive(Debug, Clone)]
pub struct EngineConfig {
    /// Holds the write-ahead log and the catalog.
    pub data_dir: PathBuf,
    /// timely worker threads (of this process, in a cluster).
    pub workers: usize,
    /// Several processes as one dataflow (`processes` empty: this one alone).
    pub cluster: ClusterConfig,
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
    /// Merges never make a segment with more rows than this.
    pub max_segment_rows: usize,
    /// Sealed segments of one size tier merged at once (see
    /// `vectorflow_operators::merge_policy`).
    pub merge_factor: usize,
    /// Threads that load segments at recovery.
    pub load_threads: usize,
    /// Read and write Kafka topics instead of the embedded log.
    pub kafka: Option<KafkaConfig>,
    /// A log source stops reading while this many of its rows are not yet
    /// applied (Kafka keeps the rest: backpressure instead of buffering).
    pub max_in_flight_rows: usize,
    /// Opening fails when the log replay makes no progress for this long,
    /// with an error that says where it is stuck.
    pub replay_stall_timeout: Duration,
    /// The stall watchdog reports when the applied frontier has not moved
    /// for this long while the log grew.
    pub stall_report_after: Duration,
    /// Bounds on what one read may ask for.
    pub limits: Limits,
    /// Writes wait while the applied frontier is more than this behind the
    /// clock (the dataflow applies the log slower than writers fill it);
    /// one that would wait past `request_timeout` is refused with
    /// `ResourceExhausted` and not written. `None`: never wait.
    pub max_apply_lag: Option<Duration>,
    /// Writes also wait while the shards hold more than this many rows the
    /// background work owes: sealed rows whose graph is not built yet and
    /// dead rows a merge will drop (see `Shard::backlog_rows`). Index builds
    /// run below the workers' priority; without this bound a load they
    /// cannot keep up with grows memory (and brute-force search work)
    /// without end. `None`: never wait.
    pub max_index_backlog_rows: Option<usize>,
    /// Sealed segments keep their `f32` vectors in files under the data
    /// directory, mapped, instead of on the heap: searches walk the graphs
    /// over SQ8 codes in memory and read the `f32` values only to re-rank
    /// (and for exact scans, merges and output fields), so the page cache
    /// holds them while memory allows.
    pub vectors_on_disk: bool,
    /// A primary (writes, checkpoints, publishes) or a read replica of
    /// one (needs `kafka` and the primary's object store; see [`Role`]).
    pub role: Role,
}

/// Bounds on one request's answer and on the catalog, so no request can
/// hold a worker or the server's memory hostage.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Query vectors × `k` per search (each a hit the workers hold and merge).
    pub max_search_hits: usize,
    /// Query vectors per search.
    pub max_search_vectors: usize,
    /// Rows one `query` returns (`limit + offset`; a query without a limit
    /// that matches more fails and asks for one).
    pub max_query_rows: usize,
    /// Primary keys per `get`.
    pub max_get_keys: usize,
    /// Collections the engine holds (each has a shard on every worker).
    pub max_collections: usize,
    /// Partitions of one collection (besides `_default`).
    pub max_partitions: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_search_hits: 1 << 20,
            max_search_vectors: 16_384,
            max_query_rows: 100_000,
            max_get_keys: 100_000,
            max_collections: 4096,
            max_partitions: 1024,
        }
    }
}

impl EngineConfig {
    /// Every worker of the dataflow: this process's, or the whole cluster's.
    pub fn total_workers(&self) -> usize {
        self.cluster.total_workers(self.workers)
    }

    /// The global indices of this process's workers.
    pub fn local_workers(&self) -> std::ops::Range<usize> {
        self.cluster.local_workers(self.workers)
    }

    pub fn new(data_dir: impl Into<PathBuf>) -> Self {
        EngineConfig {
            data_dir: data_dir.into(),
            workers: 2,
            cluster: ClusterConfig::default(),
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
            max_segment_rows: MergePolicy::default().max_segment_rows,
            merge_factor: MergePolicy::default().merge_factor,
            load_threads: std::thread::available_parallelism().map_or(2, |n| n.get()),
            kafka: None,
            max_in_flight_rows: 50_000,
            replay_stall_timeout: Duration::from_secs(120),
            stall_report_after: Duration::from_secs(30),
            limits: Limits::default(),
            max_apply_lag: Some(Duration::from_secs(10)),
            max_index_backlog_rows: Some(131_072),
            vectors_on_disk: false,
            role: Role::Primary,
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
    /// Range search: only hits within `radius` of the query, `k` being a
    /// cap. In the metric's own scores, as Milvus has it: for L2
    /// `range_filter <= distance < radius`, for IP and COSINE
    /// `radius < similarity <= range_filter`.
    pub radius: Option<f32>,
    /// The range's near end (needs `radius`).
    pub range_filter: Option<f32>,
    /// Grouping search: `k` groups of hits by a scalar field.
    pub group_by: Option<GroupBy>,
    /// Only these partitions (`_default` included by name); all when empty.
    pub partitions: Vec<String>,
    pub consistency: Consistency,
    /// Time travel: answer as of this timestamp.
    pub as_of: Option<Timestamp>,
    /// For `Consistency::Session`: the session's last write (set by [`Session`]).
    pub guarantee_ts: Option<Timestamp>,
    /// Overrides the engine's request timeout.
    pub timeout: Option<Duration>,
}

/// One search of a hybrid search (see [`Engine::hybrid_search`]).
#[derive(Debug, Clone, Default)]
pub struct SubSearch {
    /// The vector field; may be left out when the collection has one.
    pub field: Option<String>,
    /// One vector per query; every sub-search has as many.
    pub queries: Vec<Vec<f32>>,
    /// Hits this search contributes to the fusion, per query.
    pub k: usize,
    pub ef: Option<usize>,
    pub filter: Option<String>,
    pub radius: Option<f32>,
    pub range_filter: Option<f32>,
}

/// How a hybrid search fuses its searches' hits into one ranking (higher
/// fused score first).
#[derive(Debug, Clone, PartialEq)]
pub enum Ranker {
    /// Reciprocal rank fusion: a hit scores `Σ 1 / (k + rank)` over the
    /// searches that found it, ranks counted from 1 (Milvus's `RRFRanker`).
    Rrf { k: f32 },
    /// `Σ weight × score` over the searches that found the hit, one weight
    /// per search. With `normalize` each score is first mapped to [0, 1]
    /// as Milvus does (COSINE `(1 + s) / 2`, IP `1/2 + atan(s) / π`, L2
    /// `1 − 2 atan(d) / π`); without it IP and COSINE scores count as they
    /// are and an L2 distance still turns into `1 − 2 atan(d) / π`, so
    /// that a larger value is better for every metric.
    Weighted { weights: Vec<f32>, normalize: bool },
}

/// Options of a hybrid search (see [`Engine::hybrid_search`]).
#[derive(Debug, Clone)]
pub struct HybridOptions {
    /// Fused hits per query.
    pub k: usize,
    pub ranker: Ranker,
    pub output_fields: Vec<String>,
    /// Only these partitions; all when empty.
    pub partitions: Vec<String>,
    pub consistency: Consistency,
    pub as_of: Option<Timestamp>,
    pub guarantee_ts: Option<Timestamp>,
    pub timeout: Option<Duration>,
}

impl HybridOptions {
    pub fn new(k: usize, ranker: Ranker) -> Self {
        HybridOptions {
            k,
            ranker,
            output_fields: Vec::new(),
            partitions: Vec::new(),
            consistency: Consistency::default(),
            as_of: None,
            guarantee_ts: None,
            timeout: None,
        }
    }
}

/// A grouping search (Milvus's `group_by_field`): the best `k` groups by
/// the field's value, ranked by their nearest hit, each with up to `size`
/// of its nearest hits; the hits come group after group.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GroupBy {
    /// A boolean, integer or string field.
    pub field: String,
    /// Hits per group at most (Milvus's `group_size`; at least 1).
    pub size: usize,
    /// Whether each group must hold `size` hits when it has that many
    /// rows (`strict_group_size`). Without it a group holds those of its
    /// hits found among the candidates searched, its nearest ones.
    pub strict: bool,
}

impl GroupBy {
    /// One hit per group of `field`.
    pub fn new(field: impl Into<String>) -> GroupBy {
        GroupBy { field: field.into(), size: 1, strict: false }
    }
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
    /// Only these partitions; all when empty.
    pub partitions: Vec<String>,
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
    /// At most this many rows (after `offset`); all when `None`, up to
    /// [`Limits::max_query_rows`] (more is an error asking for a limit).
    pub limit: Option<usize>,
    pub offset: usize,
    /// Only these partitions; all when empty.
    pub partitions: Vec<String>,
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
    /// In a grouping search, the value of the group the hit belongs to.
    pub group: Option<Value>,
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
    /// The aliases that name it, sorted.
    pub aliases: Vec<String>,
}

/// Counts over every shard of a collection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CollectionStats {
    pub live_rows: usize,
    pub versions: usize,
    pub growing_rows: usize,
    pub sealed_segments: usize,
    pub indexed_segments: usize,
    /// Shards with a merge building its output's graph, or about to start one.
    pub compacting: usize,
    /// Shards whose segments are not yet what the merge policy settles on
    /// (merging, or not quiet for `quiet_after` yet).
    pub merges_pending: usize,
    /// Bytes the sealed segments' indexes (graphs and SQ8 codes) hold in memory.
    pub index_bytes: usize,
    pub read_ts: Timestamp,
}

/// Where a log replay stands (in the log while it runs, and in the error
/// when it stalls).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReplayProgress {
    pub records_read: u64,
    /// Records the log held past the oldest checkpoint at open (embedded log; 0 on Kafka).
    pub records_to_replay: u64,
    pub rows_read: u64,
    /// Rows read and not yet applied.
    pub rows_in_flight: u64,
    /// Every change before this time is applied on every worker.
    pub applied_frontier: Timestamp,
    /// Each worker's applied frontier (the lowest is the one holding the replay back).
    pub per_worker: Vec<Timestamp>,
    /// The replay is done when the frontier passes this time.
    pub target: Timestamp,
}

impl std::fmt::Display for ReplayProgress {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "read {} of {} records ({} rows, {} not yet applied); applied through {} of {} (per worker {:?})",
            self.records_read,
            self.records_to_replay,
            self.rows_read,
            self.rows_in_flight,
            self.applied_frontier,
            self.target,
            self.per_worker
        )
    }
}

/// See [`Engine::health`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EngineHealth {
    /// Every change before this time is applied on every worker.
    pub applied_frontier: Timestamp,
    /// The oracle's next time (the log's head).
    pub next_ts: Timestamp,
    /// Log records and rows the sources have read since the engine opened.
    pub records_ingested: u64,
    pub rows_ingested: u64,
    /// Rows read and not yet applied.
    pub rows_in_flight: u64,
    /// Set while the frontier has not moved although the log grew.
    pub frontier_stalled_for: Option<Duration>,
    /// Stalls the watchdog reported since the engine opened.
    pub frontier_stall_reports: u64,
    /// Worker parts of reads stopped or skipped because their deadline passed.
    pub reads_cancelled: u64,
    /// Checkpoints published since the engine opened, and the time they took in all.
    pub checkpoints: u64,
    pub checkpoint_time: Duration,
    /// How long the newest checkpoint took.
    pub last_checkpoint: Option<Duration>,
    /// Writes that waited for the dataflow or the index builds to catch up
    /// (`max_apply_lag`, `max_index_backlog_rows`), and those refused
    /// because they did not in time.
    pub writes_held: u64,
    pub writes_refused: u64,
    /// Rows the shards owe the index builds and merges (see `max_index_backlog_rows`).
    pub index_backlog_rows: u64,
    /// Why the dataflow stopped (a worker died; in a cluster, usually
    /// another process): the engine serves nothing until a restart.
    pub stopped: Option<String>,
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
