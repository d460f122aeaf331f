//! `vectorflow bench`: ingest, recall/QPS against raw HNSW and brute force,
//! freshness, time travel and memory on a dataset folder, in one process.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use arrow::array::ArrayRef;
use arrow::record_batch::RecordBatch;
use serde_json::json;
use vectorflow::crates::connectors::dataset::{GroundTruth, RecallJudge, exact_search};
use vectorflow::crates::connectors::npy::Matrix;
use vectorflow::crates::operators::distance::{distance, normalize};
use vectorflow::crates::operators::index::HnswIndex;
use vectorflow::{Consistency, Dataset, Engine, EngineConfig, IndexParams, Metric, Pk, SearchOptions};

/// The dataset and engine settings every benchmark takes.
#[derive(Debug, Clone, clap::Args)]
pub struct DatasetArgs {
    /// A dataset folder in the layout of shared/datasets/README.md (required).
    // Optional to clap only so that `bench soak` parses without it.
    #[arg(long)]
    pub dataset: Option<PathBuf>,
    /// Where the results go.
    #[arg(long, default_value = "bench-out")]
    pub out: PathBuf,
    #[arg(long, default_value_t = 2)]
    pub workers: usize,
    #[arg(long, default_value_t = 16_384)]
    pub seal_rows: usize,
}

impl DatasetArgs {
    pub fn open(&self) -> anyhow::Result<Dataset> {
        let dataset =
            self.dataset.as_ref().context("give --dataset DIR (a folder in the layout of shared/datasets)")?;
        Dataset::open(dataset).with_context(|| format!("opening {}", dataset.display()))
    }

    /// Writes `results` to `<out>/<name>` and says where.
    pub fn write_results(&self, name: &str, results: &serde_json::Value) -> anyhow::Result<PathBuf> {
        std::fs::create_dir_all(&self.out)?;
        let path = self.out.join(name);
        std::fs::write(&path, serde_json::to_string_pretty(results)?)?;
        println!("wrote {}", path.display());
        Ok(path)
    }
}

/// A row's scalar attributes as Arrow holds them, in bytes: the raw size of
/// what a row carries besides its vectors, which memory and storage are
/// compared with.
pub fn scalar_bytes_per_row(attributes: &RecordBatch) -> f64 {
    attributes.get_array_memory_size() as f64 / attributes.num_rows().max(1) as f64
}

/// Inserts every base row of `dataset` into `collection`, 1,000 rows per write.
pub fn insert_all(
    engine: &Engine,
    collection: &str,
    dataset: &Dataset,
    schema: &vectorflow::CollectionSchema,
    vectors: &Matrix<f32>,
    attributes: &RecordBatch,
) -> anyhow::Result<()> {
    let n = vectors.rows;
    for start in (0..n).step_by(1000) {
        let batch = dataset.base_batch(schema, vectors, attributes, start..(start + 1000).min(n))?;
        insert_retrying(engine, collection, &batch)?;
    }
    Ok(())
}

/// How long a bulk load keeps sending a batch the engine refuses under backpressure.
const RETRY_REFUSED_INSERTS_FOR: Duration = Duration::from_secs(1800);

/// Inserts `batch`; while the engine refuses it under backpressure
/// (`ResourceExhausted`: not taken, the index builds or the dataflow are
/// behind), sends it again after a pause, as a bulk loader would. Returns
/// how many times it was refused.
pub fn insert_retrying(engine: &Engine, collection: &str, batch: &RecordBatch) -> anyhow::Result<usize> {
    let give_up = Instant::now() + RETRY_REFUSED_INSERTS_FOR;
    let mut refused = 0;
    loop {
        match engine.insert(collection, batch) {
            Ok(_) => return Ok(refused),
            Err(vectorflow::Error::ResourceExhausted { .. }) if Instant::now() < give_up => {
                refused += 1;
                std::thread::sleep(Duration::from_millis(200));
            }
            Err(e) => return Err(e.into()),
        }
    }
}

/// `vectorflow bench [ARGS]` (search), or `vectorflow bench soak`.
#[derive(Debug, Clone, clap::Args)]
#[command(args_conflicts_with_subcommands = true, subcommand_negates_reqs = true)]
pub struct BenchCommand {
    #[command(subcommand)]
    pub kind: Option<BenchKind>,
    #[command(flatten)]
    pub search: BenchArgs,
}

#[derive(Debug, Clone, clap::Subcommand)]
pub enum BenchKind {
    /// Mixed search, insert, upsert, delete and query from many clients
    /// against a server for --minutes: errors, lost writes, p99, memory.
    Soak(crate::bench_soak::SoakArgs),
}

/// Arguments of `vectorflow bench`.
#[derive(Debug, Clone, clap::Args)]
pub struct BenchArgs {
    #[command(flatten)]
    pub data: DatasetArgs,
    #[arg(long, value_delimiter = ',', default_value = "16,32,64,128")]
    pub ef: Vec<usize>,
    #[arg(long, value_delimiter = ',', default_value = "1,4")]
    pub clients: Vec<usize>,
    #[arg(long, default_value_t = 10)]
    pub k: usize,
    /// Use only the first N queries (all when left out).
    #[arg(long)]
    pub queries: Option<usize>,
    /// Queries used for the exact baseline (brute force is slow).
    #[arg(long, default_value_t = 300)]
    pub exact_queries: usize,
    /// Only these ground truths of filters.json (all when left out): the
    /// raw `hnsw_rs` baseline under a selective filter is slow at scale.
    #[arg(long, value_delimiter = ',')]
    pub ground_truths: Vec<String>,
    /// Also run the benchmark through gRPC against this running server
    /// (`vectorflow serve`; http://host:port or host:port): ingest into the
    /// collection `bench_grpc` and search it, next to the in-process numbers.
    #[arg(long)]
    pub addr: Option<String>,
    /// Client counts of the gRPC searches (one connection per client).
    #[arg(long, value_delimiter = ',', default_value = "1,8")]
    pub grpc_clients: Vec<usize>,
    /// Leave out the raw `hnsw_rs` baseline: its single graph over every
    /// row is built before the first search point and takes most of an
    /// hour at a million rows, where a scale comparison (engine at 1M
    /// against engine at 100k) does not need it.
    #[arg(long)]
    pub no_raw: bool,
    /// Keep sealed segments' `f32` vectors in mapped files
    /// (`vectors_on_disk`): memory then counts the vectors' pages mapped
    /// in, which the page cache holds.
    #[arg(long)]
    pub vectors_on_disk: bool,
    /// Also measure range search and grouping search (by this integer
    /// attribute, e.g. `month`) next to plain top-k: unfiltered, 1 client,
    /// each `--ef`, against exact answers.
    #[arg(long)]
    pub features: Option<String>,
    /// Also compare a tenant's search with `tenant` a partition key
    /// (16 partitions) and a plain field, over this many tenants (row i is
    /// tenant i mod N): two more collections of the dataset's rows.
    #[arg(long)]
    pub tenants: Option<usize>,
}

/// One measured configuration.
#[derive(Debug, Clone)]
struct Point {
    filter: String,
    ef: usize,
    clients: usize,
    measured: Measured,
}

impl Point {
    fn new(filter: &str, ef: usize, clients: usize, measured: Measured) -> Point {
        Point { filter: filter.to_string(), ef, clients, measured }
    }

    fn json(&self) -> serde_json::Value {
        json!({"filter": self.filter, "ef": self.ef, "clients": self.clients, "qps": self.measured.qps,
               "recall_at_k": self.measured.recall, "p50_ms": self.measured.p50_ms, "p99_ms": self.measured.p99_ms, "cores_busy": self.measured.cores,
               "major_faults_per_search": self.measured.major_faults_per_search,
               "minor_faults_per_search": self.measured.minor_faults_per_search})
    }
}

/// What [`measure`] found.
#[derive(Debug, Clone, Copy)]
struct Measured {
    qps: f64,
    recall: f64,
    p50_ms: f64,
    p99_ms: f64,
    /// CPU seconds this process spent per second of the point: how many of
    /// the machine's cores the searches kept busy.
    cores: f64,
    /// Page faults per search that read from disk (major) and that only
    /// mapped a cached page (minor): vectors kept in mapped files pay here.
    major_faults_per_search: f64,
    minor_faults_per_search: f64,
}

/// What this process has used so far (all threads).
#[derive(Debug, Clone, Copy)]
pub struct ProcessUsage {
    /// User and system CPU time.
    pub cpu: Duration,
    /// Page faults that waited for the disk.
    pub major_faults: u64,
    /// Page faults served without the disk (a cached page mapped in).
    pub minor_faults: u64,
}

/// CPU time and page faults of this process so far.
pub fn process_usage() -> ProcessUsage {
    let mut usage = std::mem::MaybeUninit::<libc::rusage>::zeroed();
    // SAFETY: getrusage writes one `rusage` through the pointer, which is
    // valid and large enough; on failure it writes nothing and the zeroed
    // value (no time) stands.
    let usage = unsafe {
        libc::getrusage(libc::RUSAGE_SELF, usage.as_mut_ptr());
        usage.assume_init()
    };
    let time = |t: libc::timeval| Duration::new(t.tv_sec.max(0) as u64, (t.tv_usec.max(0) as u32) * 1000);
    ProcessUsage {
        cpu: time(usage.ru_utime) + time(usage.ru_stime),
        major_faults: usage.ru_majflt.max(0) as u64,
        minor_faults: usage.ru_minflt.max(0) as u64,
    }
}

/// An engine point's QPS against the baselines at the same filter, ef and clients.
struct Ratio<'a> {
    point: &'a Point,
    vs_hnsw: Option<f64>,
    vs_exact: Option<f64>,
}

/// QPS, p50 and p99 (ms) of sequential searches that took `latencies_ms`
/// over `elapsed_s` seconds.
pub fn latency_summary(mut latencies_ms: Vec<f64>, elapsed_s: f64) -> (f64, f64, f64) {
    latencies_ms.sort_by(f64::total_cmp);
    let qps = latencies_ms.len() as f64 / elapsed_s.max(f64::MIN_POSITIVE);
    (qps, percentile(&latencies_ms, 0.5), percentile(&latencies_ms, 0.99))
}

pub fn percentile(sorted_ms: &[f64], p: f64) -> f64 {
    if sorted_ms.is_empty() {
        return 0.0;
    }
    sorted_ms[((sorted_ms.len() - 1) as f64 * p).round() as usize]
}

/// One search: a query in, (id, score) hits out, best first.
type SearchFn<'a> = dyn Fn(&[f32]) -> anyhow::Result<Vec<(i64, f32)>> + Sync + 'a;

/// Runs `search` for every query on `clients` threads; returns QPS, recall and latency percentiles.
/// `queries[q]` is what `search` gets (it may be normalised); recall judges
/// the returned ids against query `q` of the dataset through `judge`.
fn measure(
    queries: &[Vec<f32>],
    clients: usize,
    k: usize,
    truth: &GroundTruth,
    judge: &RecallJudge,
    search: &SearchFn,
) -> anyhow::Result<Measured> {
    let started = Instant::now();
    let usage_before = process_usage();
    let per_client: Vec<anyhow::Result<Vec<(usize, f64, f64)>>> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..clients)
            .map(|c| {
                scope.spawn(move || {
                    let mut out = Vec::new();
                    for q in (c..queries.len()).step_by(clients) {
                        let t = Instant::now();
                        let found = search(&queries[q])?;
                        let ms = t.elapsed().as_secs_f64() * 1e3;
                        let ids: Vec<i64> = found.iter().map(|(id, _)| *id).collect();
                        out.push((q, ms, truth.recall(judge, q, k, &ids)));
                    }
                    Ok(out)
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap_or_else(|_| Err(anyhow::anyhow!("client panicked")))).collect()
    });
    let elapsed = started.elapsed().as_secs_f64();
    let usage = process_usage();
    let cores = (usage.cpu - usage_before.cpu).as_secs_f64() / elapsed.max(f64::MIN_POSITIVE);
    let mut latencies = Vec::new();
    let mut recall = 0.0;
    for result in per_client {
        for (_, ms, r) in result? {
            latencies.push(ms);
            recall += r;
        }
    }
    let searches = latencies.len().max(1) as f64;
    let (qps, p50_ms, p99_ms) = latency_summary(latencies, elapsed);
    Ok(Measured {
        qps,
        recall: recall / searches,
        p50_ms,
        p99_ms,
        cores,
        major_faults_per_search: usage.major_faults.saturating_sub(usage_before.major_faults) as f64 / searches,
        minor_faults_per_search: usage.minor_faults.saturating_sub(usage_before.minor_faults) as f64 / searches,
    })
}

/// Peak resident set size of this process (VmHWM), in bytes.
fn peak_rss() -> u64 {
    read_status("VmHWM:")
}

/// Where this process's resident memory is, in bytes.
#[derive(Debug, Clone, Copy, Default)]
struct Resident {
    /// All of it (`VmRSS`).
    total: u64,
    /// Anonymous pages: the heap and thread stacks.
    anonymous: u64,
    /// Pages of mapped files (vectors kept on disk, the binary).
    file: u64,
    /// Heap bytes handed out by the allocator (glibc's count, all arenas);
    /// the rest of `anonymous` is freed heap not yet given back, and stacks.
    heap_in_use: u64,
}

impl Resident {
    fn now() -> Resident {
        Resident {
            total: read_status("VmRSS:"),
            anonymous: read_status("RssAnon:"),
            file: read_status("RssFile:"),
            heap_in_use: heap_in_use(),
        }
    }

    /// Growth since `before` (zero where a count shrank).
    fn since(self, before: Resident) -> Resident {
        Resident {
            total: self.total.saturating_sub(before.total),
            anonymous: self.anonymous.saturating_sub(before.anonymous),
            file: self.file.saturating_sub(before.file),
            heap_in_use: self.heap_in_use.saturating_sub(before.heap_in_use),
        }
    }

    fn json(&self) -> serde_json::Value {
        json!({"total_bytes": self.total, "anonymous_bytes": self.anonymous, "file_bytes": self.file,
               "heap_in_use_bytes": self.heap_in_use})
    }
}

/// Heap bytes the allocator has handed out (0 where it cannot tell).
fn heap_in_use() -> u64 {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        // SAFETY: mallinfo2 takes no arguments and returns a plain struct.
        let info = unsafe { libc::mallinfo2() };
        (info.uordblks + info.hblkhd) as u64
    }
    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    {
        0
    }
}

fn read_status(key: &str) -> u64 {
    process_status("self", key)
}

/// Resident set size of process `pid` ("self" for this one), in bytes (0 if unknown).
pub fn rss_of(pid: &str) -> u64 {
    process_status(pid, "VmRSS:")
}

/// A size field (`VmRSS:`, `VmHWM:`) of /proc/<pid>/status, in bytes.
fn process_status(pid: &str, key: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines().find(|l| l.starts_with(key)).and_then(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
        })
        .map_or(0, |kb| kb * 1024)
}

fn ids(hits: &[vectorflow::SearchHit]) -> Vec<(i64, f32)> {
    hits.iter().map(|h| (if let Pk::Int(id) = h.pk { id } else { -1 }, h.score)).collect()
}

pub fn run(args: BenchArgs) -> anyhow::Result<()> {
    anyhow::ensure!(args.k >= 1, "--k must be at least 1");
    anyhow::ensure!(args.clients.iter().all(|&c| c >= 1), "--clients must all be at least 1");
    anyhow::ensure!(args.grpc_clients.iter().all(|&c| c >= 1), "--grpc-clients must all be at least 1");
    let dataset = args.data.open()?;
    // With --addr: a runtime for the gRPC part, and the server checked now rather than after the in-process part.
    let grpc_runtime = match &args.addr {
        Some(addr) => Some(grpc::check_server(addr)?),
        None => None,
    };
    let vectors = dataset.base_vectors()?;
    let queries_m = dataset.query_vectors()?;
    let attributes = dataset.base_attributes()?;
    let metric = dataset.metric();
    // Every ground truth listed, each with its filter expression.
    let mut truths = Vec::new();
    for (name, info) in &dataset.info.ground_truth {
        if !args.ground_truths.is_empty() && !args.ground_truths.contains(name) {
            continue;
        }
        let truth = dataset.ground_truth(name)?.with_context(|| format!("ground truth `{name}`"))?;
        truths.push((name.clone(), info.expression.clone(), truth));
    }
    anyhow::ensure!(!truths.is_empty(), "no ground truth to measure (filters.json, --ground-truths)");
    let n_queries = args.queries.map_or(queries_m.rows, |q| q.min(queries_m.rows));
    // Recall is judged from the dataset's own vectors, as the ground truths were computed.
    let judge = RecallJudge::new(&vectors, &queries_m, metric)?;
    for (name, _, truth) in &truths {
        anyhow::ensure!(
            truth.ids.rows >= n_queries && truth.ids.cols >= args.k,
            "ground truth `{name}` lists {} neighbours of {} queries; --k {} over {n_queries} queries needs more",
            truth.ids.cols,
            truth.ids.rows,
            args.k
        );
    }
    let queries: Vec<Vec<f32>> = (0..n_queries).map(|q| queries_m.row(q).to_vec()).collect();
    let n = vectors.rows;
    let k = args.k;
    println!(
        "dataset {}: {n} x {} {metric:?}, {} queries, workers {}, seal_rows {}",
        dataset.name(),
        vectors.cols,
        queries.len(),
        args.data.workers,
        args.data.seal_rows
    );

    // ---- ingest ----
    let data_dir = tempfile::tempdir()?;
    // No background checkpoints or compaction: they would share the cores
    // with the searches measured here (`bench-recovery` measures them).
    let engine = Engine::open(EngineConfig {
        workers: args.data.workers,
        seal_rows: args.data.seal_rows,
        checkpoint_interval: None,
        compaction_interval: None,
        vectors_on_disk: args.vectors_on_disk,
        ..EngineConfig::new(data_dir.path())
    })?;
    let schema = dataset.collection_schema("bench", &attributes)?;
    engine.create_collection(schema.clone())?;
    let resident_before = Resident::now();
    let progress = indicatif::ProgressBar::new(n as u64);
    progress.set_style(
        indicatif::ProgressStyle::with_template("ingest {bar:40} {pos}/{len} rows {per_sec} eta {eta}")
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    let started = Instant::now();
    const BATCH: usize = 1000;
    let mut inserts_refused = 0;
    for start in (0..n).step_by(BATCH) {
        let end = (start + BATCH).min(n);
        let batch = dataset.base_batch(&schema, &vectors, &attributes, start..end)?;
        inserts_refused += insert_retrying(&engine, "bench", &batch)?;
        progress.inc((end - start) as u64);
    }
    if inserts_refused > 0 {
        println!(
            "ingest: {inserts_refused} inserts refused under backpressure (max_index_backlog_rows or \
             max_apply_lag_ms) and sent again: the ingest rate below is the index builds' rate"
        );
    }
    let stats = engine.stats("bench", Consistency::Strong)?;
    let ingest_s = started.elapsed().as_secs_f64();
    progress.finish_and_clear();
    anyhow::ensure!(stats.live_rows == n, "ingested {} of {n} rows", stats.live_rows);
    let index_started = Instant::now();
    engine.wait_for_indexes("bench", Duration::from_secs(3600))?;
    let index_wait_s = index_started.elapsed().as_secs_f64();
    // Searches are measured on the segments the merge policy settles on.
    let settled = engine.wait_for_merges("bench", Duration::from_secs(3600))?;
    let merge_wait_s = index_started.elapsed().as_secs_f64() - index_wait_s;
    // Every segment written to the object store before anything is timed:
    // at a million rows the persister was still encoding merged segments
    // while the searches ran.
    engine.flush("bench")?;
    let resident_engine = Resident::now().since(resident_before);
    // What of it is freed heap the allocator still holds: the engine trims
    // after each build and merge, so this should be little.
    vectorflow::crates::operators::host::release_freed_memory();
    let resident_trimmed = Resident::now().since(resident_before);
    let workers = args.data.workers.max(1);
    let segments = json!({
        "sealed": settled.sealed_segments,
        "per_shard": settled.sealed_segments as f64 / workers as f64,
        "growing_rows": settled.growing_rows,
        // Per query, every sealed segment's graph is searched once (on its
        // worker) and every non-empty growing segment scanned.
        "graph_searches_per_query": settled.indexed_segments,
    });
    println!(
        "ingest: {n} rows in {ingest_s:.2}s = {:.0} rows/s to searchable; indexes ready {index_wait_s:.2}s later, \
         merges settled {merge_wait_s:.2}s after that: {} sealed segments ({:.1} per shard, {} graph searches per \
         query), {} growing rows",
        n as f64 / ingest_s,
        settled.sealed_segments,
        settled.sealed_segments as f64 / workers as f64,
        settled.indexed_segments,
        settled.growing_rows
    );

    // ---- baselines: raw hnsw_rs over the same vectors, and brute force over the passing rows ----
    let mut base = vectors.data.clone();
    if metric == Metric::COSINE {
        base.chunks_exact_mut(vectors.cols).for_each(normalize);
    }
    let build_started = Instant::now();
    let raw = (!args.no_raw).then(|| HnswIndex::build(&base, vectors.cols, metric, IndexParams::default()));
    let raw_build_s = build_started.elapsed().as_secs_f64();
    let prepared: Vec<Vec<f32>> = queries
        .iter()
        .map(|q| {
            let mut q = q.clone();
            if metric == Metric::COSINE {
                normalize(&mut q);
            }
            q
        })
        .collect();
    let dim = vectors.cols;
    let score = |row: usize, q: &[f32]| {
        vectorflow::crates::operators::distance::score(metric, distance(metric, q, &base[row * dim..(row + 1) * dim]))
    };
    let all_rows = dataset.base_batch(&schema, &vectors, &attributes, 0..n)?;
    // Brute force scores the stored vectors the way the ground truths were
    // computed (not normalised), so it is exact by the recall rule: 1.0.
    let exact_queries = &queries[..args.exact_queries.min(queries.len())];

    // ---- engine and raw hnsw_rs search, per ground truth (with its filter) ----
    // Each engine point is measured right before the raw point it is
    // compared with: this machine's speed drifts over minutes, and a ratio
    // of measurements taken minutes apart measured the drift (the same
    // binary's engine/raw ratio at ef 64 was 1.7 in one run and 3.2 in the next).
    let mut engine_points = Vec::new();
    let mut hnsw_points = Vec::new();
    let mut exact_points = Vec::new();
    for (name, expression, truth) in &truths {
        // The same filter, evaluated once over all rows by the same compiler the engine uses.
        let passing: Option<Vec<bool>> = match expression {
            Some(text) => Some(vectorflow::Filter::compile(&schema, text)?.evaluate(&all_rows)?),
            None => None,
        };
        let passing_rows: Vec<usize> = match &passing {
            Some(p) => (0..n).filter(|&i| p[i]).collect(),
            None => (0..n).collect(),
        };
        for &ef in &args.ef {
            for &clients in &args.clients {
                let options = SearchOptions {
                    ef: Some(ef),
                    filter: expression.clone(),
                    consistency: Consistency::Bounded,
                    ..SearchOptions::new(k)
                };
                let search = |q: &[f32]| -> anyhow::Result<Vec<(i64, f32)>> {
                    let result = engine.search("bench", &[q.to_vec()], &options)?;
                    Ok(ids(&result.hits[0]))
                };
                let point = Point::new(name, ef, clients, measure(&queries, clients, k, truth, &judge, &search)?);
                // Printed now too: at scale the measurements take long.
                println!(
                    "engine {name} ef {ef} clients {clients}: {:.0} QPS, recall {:.3}, p50 {:.3} ms, p99 {:.3} ms, \
                     {:.2} cores busy, {:.1} major / {:.0} minor page faults per search",
                    point.measured.qps,
                    point.measured.recall,
                    point.measured.p50_ms,
                    point.measured.p99_ms,
                    point.measured.cores,
                    point.measured.major_faults_per_search,
                    point.measured.minor_faults_per_search
                );
                engine_points.push(point);

                let Some(raw) = &raw else { continue };
                let raw_search = |q: &[f32]| -> anyhow::Result<Vec<(i64, f32)>> {
                    let allowed = |row: &usize| passing.as_ref().is_none_or(|p| p[*row]);
                    let filter: Option<&dyn Fn(&usize) -> bool> = if passing.is_some() { Some(&allowed) } else { None };
                    let mut rows: Vec<(i64, f32)> =
                        raw.search(q, k, ef, filter).into_iter().map(|r| (r as i64, score(r, q))).collect();
                    rows.sort_by(|a, b| rank(metric, a.1, b.1));
                    Ok(rows)
                };
                hnsw_points.push(Point::new(
                    name,
                    ef,
                    clients,
                    measure(&prepared, clients, k, truth, &judge, &raw_search)?,
                ));
            }
        }
        for &clients in &args.clients {
            let search = |q: &[f32]| -> anyhow::Result<Vec<(i64, f32)>> {
                Ok(exact_search(metric, &vectors, q, k, &passing_rows))
            };
            exact_points.push(Point::new(
                name,
                0,
                clients,
                measure(exact_queries, clients, k, truth, &judge, &search)?,
            ));
        }
    }
    drop(raw);

    // ---- range and grouping search next to plain top-k ----
    let features = match &args.features {
        Some(field) => {
            let column = attributes
                .column_by_name(field)
                .ok_or_else(|| anyhow::anyhow!("--features {field}: the dataset has no such attribute"))?;
            let column = arrow::compute::cast(column, &arrow::datatypes::DataType::Int64)?;
            let groups = column
                .as_any()
                .downcast_ref::<arrow::array::Int64Array>()
                .ok_or_else(|| anyhow::anyhow!("--features {field}: not an integer attribute"))?
                .values()
                .to_vec();
            crate::bench_features::measure_features(
                &engine, "bench", metric, &vectors, &queries, field, &groups, &args.ef, k,
            )?
        }
        None => Vec::new(),
    };

    // ---- a tenant's search: partition key against a plain filter ----
    let tenants = match args.tenants {
        Some(count) => crate::bench_tenants::measure_tenants(&engine, metric, &vectors, &queries, count, &args.ef, k)?,
        None => Vec::new(),
    };

    // ---- freshness: Strong reads of just-written rows under a steady writer ----
    let rows = Rows { dataset: &dataset, schema: &schema, vectors: &vectors, attributes: &attributes };
    // Then the same while clients search flat out: a search must not hold back ingestion.
    let loaded = freshness(&engine, &rows, &queries, LOAD_CLIENTS)?;
    let freshness = freshness(&engine, &rows, &[], 0)?;

    // ---- time travel ----
    let travel = time_travel(&engine, &rows, &queries, k)?;

    let peak = peak_rss();
    let bytes_per_vector = resident_engine.total as f64 / n as f64;
    let raw_bytes = (vectors.cols * 4) as f64;
    // Where a vector's bytes go: its f32 values (held once), its share of
    // the indexes (graphs and SQ8 codes), its scalar attributes as Arrow holds them, and the rest
    // (keys, versions, timestamps, allocator slack) from the RSS growth.
    let index_bytes = settled.index_bytes as f64 / n as f64;
    let scalar_bytes = scalar_bytes_per_row(&attributes);
    // On disk, a vector's resident bytes are its share of the mapped pages.
    let vector_bytes = if args.vectors_on_disk { resident_engine.file as f64 / n as f64 } else { raw_bytes };
    let other_bytes = bytes_per_vector - vector_bytes - index_bytes - scalar_bytes;
    let breakdown = json!({
        "vectors": vector_bytes,
        "vectors_on_disk": args.vectors_on_disk,
        "index": index_bytes,
        "scalars": scalar_bytes,
        "other": other_bytes,
    });

    // ---- the same through gRPC, against a running server ----
    let grpc = match (&args.addr, grpc_runtime) {
        (Some(addr), Some(runtime)) => {
            let data = grpc::Data {
                dataset: &dataset,
                vectors: &vectors,
                attributes: &attributes,
                queries: &queries,
                judge: &judge,
            };
            Some(grpc::run(&runtime, addr, &args, &data, &truths)?)
        }
        _ => None,
    };
    // gRPC QPS over in-process engine QPS at the same filter, ef and client count.
    let vs_engine = |g: &Point| {
        engine_points
            .iter()
            .find(|e| e.filter == g.filter && e.ef == g.ef && e.clients == g.clients)
            .map(|e| g.measured.qps / e.measured.qps)
    };

    // ---- report ----
    // Engine-to-baseline QPS ratios at the same filter, ef and client count.
    let ratios: Vec<Ratio> = engine_points
        .iter()
        .map(|p| {
            let same = |b: &&Point| b.filter == p.filter && b.clients == p.clients;
            Ratio {
                point: p,
                vs_hnsw: hnsw_points
                    .iter()
                    .filter(same)
                    .find(|b| b.ef == p.ef)
                    .map(|b| p.measured.qps / b.measured.qps),
                vs_exact: exact_points.iter().find(same).map(|b| p.measured.qps / b.measured.qps),
            }
        })
        .collect();
    println!();
    println!(
        "{:<12} {:<11} {:>5} {:>7} {:>10} {:>9} {:>9} {:>9} {:>6} {:>9} {:>9}{}",
        "system",
        "filter",
        "ef",
        "clients",
        "QPS",
        "recall",
        "p50 ms",
        "p99 ms",
        "cores",
        "vs hnsw",
        "vs exact",
        if grpc.is_some() { format!(" {:>9}", "vs engine") } else { String::new() }
    );
    let ratio = |r: Option<f64>| r.map_or(String::from("-"), |r| format!("{r:.2}"));
    let print_with = |name: &str, p: &Point, vs_hnsw: Option<f64>, vs_exact: Option<f64>, tail: &str| {
        println!(
            "{name:<12} {:<11} {:>5} {:>7} {:>10.0} {:>9.3} {:>9.3} {:>9.3} {:>6.2} {:>9} {:>9}{tail}",
            p.filter,
            p.ef,
            p.clients,
            p.measured.qps,
            p.measured.recall,
            p.measured.p50_ms,
            p.measured.p99_ms,
            p.measured.cores,
            ratio(vs_hnsw),
            ratio(vs_exact)
        );
    };
    let print = |name: &str, p: &Point, vs_hnsw: Option<f64>, vs_exact: Option<f64>| {
        print_with(name, p, vs_hnsw, vs_exact, "");
    };
    for r in &ratios {
        print("engine", r.point, r.vs_hnsw, r.vs_exact);
    }
    for p in &hnsw_points {
        print("raw hnsw_rs", p, None, None);
    }
    for p in &exact_points {
        print("brute force", p, None, None);
    }
    if let Some(grpc) = &grpc {
        for p in &grpc.points {
            // The last column: QPS over the in-process engine's ("none" where the engine ran no such point).
            let tail = format!(" {:>9}", vs_engine(p).map_or("none".to_string(), |r| format!("{r:.2}")));
            print_with("grpc", p, None, None, &tail);
        }
    }
    println!(
        "\ningest {:.0} rows/s; index ready +{index_wait_s:.2}s (raw hnsw_rs single-graph build of all rows: {raw_build_s:.2}s)",
        n as f64 / ingest_s
    );
    println!(
        "freshness (Strong, write-to-visible): p50 {:.2} ms, p99 {:.2} ms over {} writes",
        freshness.p50_ms, freshness.p99_ms, freshness.writes
    );
    println!(
        "freshness while {LOAD_CLIENTS} clients search (ef 64, unfiltered): p50 {:.2} ms, p99 {:.2} ms over {} writes \
         ({:.2}x the idle p99); {:.0} searches/s meanwhile",
        loaded.p50_ms,
        loaded.p99_ms,
        loaded.writes,
        loaded.p99_ms / freshness.p99_ms.max(1e-9),
        loaded.searches_per_s
    );
    println!(
        "time travel: as_of cost ratio {:.2} against current searches; answers equal to those recorded then: {}",
        travel.0, travel.1
    );
    println!(
        "memory: peak RSS {:.0} MiB; engine {:.0} bytes/vector vs {raw_bytes:.0} raw ({:.2}x, {:.2}x of raw + \
         scalars): vectors {vector_bytes:.0}{}, index (graph + SQ8 codes) {index_bytes:.0}, scalars \
         {scalar_bytes:.0}, other {other_bytes:.0}",
        peak as f64 / (1 << 20) as f64,
        bytes_per_vector,
        bytes_per_vector / raw_bytes,
        bytes_per_vector / (raw_bytes + scalar_bytes),
        if args.vectors_on_disk { " (on disk: their pages mapped in)" } else { "" }
    );
    let mib = |bytes: u64| bytes as f64 / (1 << 20) as f64;
    println!(
        "memory growth after the indexes: {:.0} MiB anonymous ({:.0} MiB of it heap in use; {:.0} MiB after a \
         trim), {:.0} MiB file-backed",
        mib(resident_engine.anonymous),
        mib(resident_engine.heap_in_use),
        mib(resident_trimmed.anonymous),
        mib(resident_engine.file)
    );
    if let Some(grpc) = &grpc {
        println!(
            "grpc ({}): ingest {:.0} rows/s ({} rows through Insert, Arrow IPC batches of {}); \
             indexes ready +{:.2}s after flush ({} sealed segments)",
            grpc.addr,
            grpc.rows as f64 / grpc.ingest_s,
            grpc.rows,
            grpc::BATCH,
            grpc.index_wait_s,
            grpc.sealed_segments
        );
    }

    std::fs::create_dir_all(&args.data.out)?;
    let mut results = json!({
        "dataset": dataset.name(),
        "rows": n,
        "workers": args.data.workers,
        "k": k,
        "consistency": "Bounded",
        "ingest": {"rows_per_s": n as f64 / ingest_s, "seconds": ingest_s},
        "index": {"build_s": index_wait_s, "merges_settled_s": merge_wait_s, "raw_hnsw_build_s": raw_build_s},
        "segments": segments,
        "search": engine_points.iter().map(Point::json).collect::<Vec<_>>(),
        "baseline_hnsw": hnsw_points.iter().map(Point::json).collect::<Vec<_>>(),
        "baseline_exact": exact_points.iter().map(Point::json).collect::<Vec<_>>(),
        "ratios": ratios.iter().map(|r| json!({
            "filter": r.point.filter, "ef": r.point.ef, "clients": r.point.clients,
            "qps_vs_hnsw": r.vs_hnsw, "qps_vs_exact": r.vs_exact
        })).collect::<Vec<_>>(),
        "freshness_ms": {"p50": freshness.p50_ms, "p99": freshness.p99_ms, "writes": freshness.writes},
        "freshness_under_load_ms": {"clients": LOAD_CLIENTS, "p50": loaded.p50_ms, "p99": loaded.p99_ms,
                                    "writes": loaded.writes, "searches_per_s": loaded.searches_per_s},
        "time_travel": {"cost_ratio": travel.0, "answers_equal": travel.1},
        "features": features.iter().map(crate::bench_features::FeaturePoint::json).collect::<Vec<_>>(),
        "tenants": tenants.iter().map(crate::bench_tenants::TenantPoint::json).collect::<Vec<_>>(),
        "memory": {"peak_rss_bytes": peak, "bytes_per_vector": bytes_per_vector, "raw_bytes_per_vector": raw_bytes,
                   "per_vector": breakdown, "resident_growth": resident_engine.json(),
                   "resident_growth_after_trim": resident_trimmed.json()},
    });
    if let Some(grpc) = &grpc {
        results["grpc"] = grpc
            .points
            .iter()
            .map(|p| {
                let mut point = p.json();
                point["qps_vs_engine"] = json!(vs_engine(p));
                point
            })
            .collect();
        results["grpc_ingest"] = json!({
            "addr": grpc.addr,
            "rows": grpc.rows,
            "rows_per_s": grpc.rows as f64 / grpc.ingest_s,
            "seconds": grpc.ingest_s,
            "index_wait_s": grpc.index_wait_s,
            "sealed_segments": grpc.sealed_segments,
        });
    }
    args.data.write_results("results.json", &results)?;
    let one_client = args.clients.first().copied().unwrap_or(1);
    let line = |name: &str, filter: &str, points: &[Point]| crate::plot::Series {
        name: format!("{name} ({one_client} client)"),
        points: points
            .iter()
            .filter(|p| p.clients == one_client && p.filter == filter)
            .map(|p| (p.measured.recall, p.measured.qps))
            .collect(),
    };
    let panels: Vec<(String, Vec<crate::plot::Series>)> = truths
        .iter()
        .map(|(name, _, _)| {
            let mut series = vec![
                line("engine", name, &engine_points),
                line("raw hnsw_rs", name, &hnsw_points),
                line("brute force", name, &exact_points),
            ];
            if let Some(grpc) = &grpc {
                let clients = args.grpc_clients.first().copied().unwrap_or(1);
                series.push(crate::plot::Series {
                    name: format!("grpc ({clients} client)"),
                    points: grpc
                        .points
                        .iter()
                        .filter(|p| p.clients == clients && p.filter == *name)
                        .map(|p| (p.measured.recall, p.measured.qps))
                        .collect(),
                });
            }
            (name.clone(), series)
        })
        .collect();
    let plot = args.data.out.join("recall_qps.png");
    crate::plot::recall_qps(&plot, &panels)?;
    println!("wrote {}", plot.display());
    engine.shutdown();
    Ok(())
}

/// Orders scores best first for the metric.
fn rank(metric: Metric, a: f32, b: f32) -> std::cmp::Ordering {
    if metric.larger_is_closer() { b.total_cmp(&a) } else { a.total_cmp(&b) }
}

/// A writer inserts one new row every 5 ms; after each acknowledged write a
/// Strong get must return it. Returns (p50 ms, p99 ms, writes).
/// Strong write-to-visible latency of single-row writes.
struct Freshness {
    p50_ms: f64,
    p99_ms: f64,
    writes: usize,
    /// Searches the loading clients completed per second meanwhile.
    searches_per_s: f64,
}

/// Searching clients while freshness is measured under load.
const LOAD_CLIENTS: usize = 8;

/// Writes single rows for 3 s, each followed by a Strong get of it, while
/// `clients` threads search `queries` flat out (none: idle).
fn freshness(engine: &Engine, rows: &Rows, queries: &[Vec<f32>], clients: usize) -> anyhow::Result<Freshness> {
    let n = rows.vectors.rows;
    let clients = if queries.is_empty() { 0 } else { clients };
    let stop = std::sync::atomic::AtomicBool::new(false);
    let searches = std::sync::atomic::AtomicUsize::new(0);
    let started_all = Instant::now();
    let latencies = std::thread::scope(|scope| -> anyhow::Result<Vec<f64>> {
        let searchers: Vec<_> = (0..clients)
            .map(|client| {
                let (stop, searches) = (&stop, &searches);
                scope.spawn(move || -> anyhow::Result<()> {
                    let options = SearchOptions { ef: Some(64), ..SearchOptions::new(10) };
                    let mut i = client;
                    while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                        engine.search("bench", std::slice::from_ref(&queries[i % queries.len()]), &options)?;
                        searches.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        i += clients;
                    }
                    Ok(())
                })
            })
            .collect();
        let written = (|| -> anyhow::Result<Vec<f64>> {
            let mut latencies = Vec::new();
            let deadline = Instant::now() + Duration::from_secs(3);
            // Ids after the base rows, and apart for the loaded and the idle call.
            let first = n + 1_000_000 * usize::from(clients > 0);
            let mut i = 0;
            while Instant::now() < deadline {
                let id = (first + i) as i64;
                let batch = rows.with_id(i % n, id)?;
                let started = Instant::now();
                engine.insert("bench", &batch)?;
                let visible = engine.get("bench", &[Pk::Int(id)], &Default::default())?;
                anyhow::ensure!(visible.len() == 1, "row {id} not visible to a Strong read after its write");
                latencies.push(started.elapsed().as_secs_f64() * 1e3);
                std::thread::sleep(Duration::from_millis(5));
                i += 1;
            }
            Ok(latencies)
        })();
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        for searcher in searchers {
            searcher.join().map_err(|_| anyhow::anyhow!("a searching client panicked"))??;
        }
        written
    })?;
    let elapsed = started_all.elapsed().as_secs_f64();
    let mut latencies = latencies;
    latencies.sort_by(f64::total_cmp);
    Ok(Freshness {
        p50_ms: percentile(&latencies, 0.5),
        p99_ms: percentile(&latencies, 0.99),
        writes: latencies.len(),
        searches_per_s: searches.load(std::sync::atomic::Ordering::Relaxed) as f64 / elapsed,
    })
}

/// The dataset's base rows, to build write batches from.
struct Rows<'a> {
    dataset: &'a Dataset,
    schema: &'a vectorflow::CollectionSchema,
    vectors: &'a Matrix<f32>,
    attributes: &'a RecordBatch,
}

impl Rows<'_> {
    /// Base row `source` with one column replaced.
    fn with_column(&self, source: usize, field: usize, column: ArrayRef) -> anyhow::Result<RecordBatch> {
        let batch = self.dataset.base_batch(self.schema, self.vectors, self.attributes, source..source + 1)?;
        let mut columns = batch.columns().to_vec();
        columns[field] = column;
        Ok(RecordBatch::try_new(batch.schema(), columns)?)
    }

    /// Base row `source` under primary key `id`.
    fn with_id(&self, source: usize, id: i64) -> anyhow::Result<RecordBatch> {
        self.with_column(source, self.schema.primary_index(), Arc::new(arrow::array::Int64Array::from(vec![id])))
    }

    /// Base row `source` with vector `vector`.
    fn with_vector(&self, source: usize, vector: &[f32]) -> anyhow::Result<RecordBatch> {
        let field = self.schema.vector_field(None)?.0;
        self.with_column(source, field, vectorflow::crates::core::batch::vector_array(vector.len(), vector.to_vec())?)
    }
}

/// Records answers at t0, then deletes the best hit of every sampled query
/// (and a spread of other rows) and upserts its second hit onto the query
/// vector, then searches `as_of t0` again. Returns (cost ratio of as_of
/// searches to current ones, whether the as_of answers equal the recorded ones).
fn time_travel(engine: &Engine, rows: &Rows, queries: &[Vec<f32>], k: usize) -> anyhow::Result<(f64, bool)> {
    let sample = &queries[..queries.len().min(200)];
    let options = SearchOptions { ef: Some(64), ..SearchOptions::new(k) };
    let t0 = engine.now();
    let at_t0 = SearchOptions { as_of: Some(t0), ..options.clone() };
    let recorded = engine.search("bench", sample, &at_t0)?;
    let mut doomed: Vec<Pk> = recorded.hits.iter().filter_map(|h| h.first().map(|h| h.pk.clone())).collect();
    doomed.extend((0..rows.vectors.rows).step_by(50).map(|i| Pk::Int(i as i64)));
    doomed.sort();
    doomed.dedup();
    engine.delete("bench", &doomed)?;
    let mut moved = Vec::new();
    for (q, hits) in sample.iter().zip(&recorded.hits) {
        // Only base rows (freshness added copies under new ids).
        if let Some(Pk::Int(id)) = hits.get(1).map(|h| &h.pk)
            && (*id as usize) < rows.vectors.rows
            && !doomed.contains(&Pk::Int(*id))
        {
            moved.push(rows.with_vector(*id as usize, q)?);
        }
    }
    if let Some(first) = moved.first() {
        engine.upsert("bench", &arrow::compute::concat_batches(&first.schema(), &moved)?)?;
    }
    let time = |options: &SearchOptions| -> anyhow::Result<(f64, Vec<Vec<vectorflow::SearchHit>>)> {
        let started = Instant::now();
        let mut hits = Vec::with_capacity(sample.len());
        for q in sample {
            hits.push(engine.search("bench", std::slice::from_ref(q), options)?.hits.remove(0));
        }
        Ok((started.elapsed().as_secs_f64(), hits))
    };
    let (current_s, current) = time(&options)?;
    let (travel_s, travelled) = time(&at_t0)?;
    anyhow::ensure!(current != recorded.hits, "the deletes did not change current answers");
    let same = travelled.iter().zip(&recorded.hits).all(|(x, y)| x.iter().map(|h| &h.pk).eq(y.iter().map(|h| &h.pk)));
    Ok((travel_s / current_s, same))
}

/// `vectorflow bench --addr`: the same dataset and searches through a running
/// server's gRPC API.
mod grpc {
    use std::collections::HashMap;
    use std::sync::Mutex;
    use std::thread::ThreadId;
    use std::time::{Duration, Instant};

    use tonic::transport::Channel;
    use vectorflow::crates::connectors::dataset::{GroundTruth, RecallJudge};
    use vectorflow::crates::connectors::npy::Matrix;
    use vectorflow::{Dataset, Pk};
    use vectorflow_proto::v1::vectorflow_client::VectorflowClient;
    use vectorflow_proto::{self as wire, v1};

    use super::{BenchArgs, Point, measure};
    use crate::client::{self, rpc};

    /// The collection the gRPC run creates on the server (dropped first if it exists).
    pub const COLLECTION: &str = "bench_grpc";
    /// Rows per Insert call.
    pub const BATCH: usize = 1000;

    /// What the searches and the ingest read.
    pub struct Data<'a> {
        pub dataset: &'a Dataset,
        pub vectors: &'a Matrix<f32>,
        pub attributes: &'a arrow::record_batch::RecordBatch,
        pub queries: &'a [Vec<f32>],
        pub judge: &'a RecallJudge<'a>,
    }

    /// The gRPC part's results.
    pub struct Run {
        pub addr: String,
        pub rows: usize,
        pub ingest_s: f64,
        pub index_wait_s: f64,
        pub sealed_segments: u64,
        pub points: Vec<Point>,
    }

    /// A runtime for the gRPC calls, once the server at `addr` has answered Health.
    pub fn check_server(addr: &str) -> anyhow::Result<tokio::runtime::Runtime> {
        let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
        runtime.block_on(async {
            let mut client = client::connect(addr, None).await?;
            client.health(v1::Empty {}).await.map_err(rpc)?;
            anyhow::Ok(())
        })?;
        Ok(runtime)
    }

    fn read(consistency: v1::ConsistencyLevel) -> Option<v1::ReadOptions> {
        Some(v1::ReadOptions { consistency: consistency as i32, ..Default::default() })
    }

    /// Ingests the dataset into `bench_grpc` through Insert (Arrow IPC),
    /// flushes and waits for the indexes, then measures every filter, ef and
    /// `--grpc-clients` count with one connection per client.
    pub fn run(
        runtime: &tokio::runtime::Runtime,
        addr: &str,
        args: &BenchArgs,
        data: &Data,
        truths: &[(String, Option<String>, GroundTruth)],
    ) -> anyhow::Result<Run> {
        let n = data.vectors.rows;
        let mut admin = runtime.block_on(client::connect(addr, None))?;
        let names = runtime.block_on(admin.list_collections(v1::Empty {})).map_err(rpc)?.into_inner().names;
        if names.iter().any(|name| name == COLLECTION) {
            runtime.block_on(admin.drop_collection(v1::CollectionRef { name: COLLECTION.into() })).map_err(rpc)?;
        }
        let schema = data.dataset.collection_schema(COLLECTION, data.attributes)?;
        let request = v1::CreateCollectionRequest { schema: Some(wire::schema_to_proto(&schema)) };
        runtime.block_on(admin.create_collection(request)).map_err(rpc)?;

        // ---- ingest ----
        let progress = indicatif::ProgressBar::new(n as u64);
        progress.set_style(
            indicatif::ProgressStyle::with_template("grpc ingest {bar:40} {pos}/{len} rows {per_sec} eta {eta}")
                .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
        );
        let started = Instant::now();
        for start in (0..n).step_by(BATCH) {
            let end = (start + BATCH).min(n);
            let batch = data.dataset.base_batch(&schema, data.vectors, data.attributes, start..end)?;
            let request = v1::WriteRequest {
                collection: COLLECTION.into(),
                columns: Vec::new(),
                arrow_ipc: wire::batch_to_ipc(&batch)?,
                partition: String::new(),
            };
            runtime.block_on(admin.insert(request)).map_err(rpc)?;
            progress.inc((end - start) as u64);
        }
        let stats_request =
            |consistency| v1::StatsRequest { collection: COLLECTION.into(), consistency: consistency as i32 };
        let stats =
            runtime.block_on(admin.get_stats(stats_request(v1::ConsistencyLevel::Strong))).map_err(rpc)?.into_inner();
        let ingest_s = started.elapsed().as_secs_f64();
        progress.finish_and_clear();
        anyhow::ensure!(stats.live_rows == n as u64, "ingested {} of {n} rows through gRPC", stats.live_rows);

        // ---- flush, then wait until every sealed segment has its index ----
        let index_started = Instant::now();
        runtime.block_on(admin.flush(v1::CollectionRef { name: COLLECTION.into() })).map_err(rpc)?;
        let deadline = Instant::now() + Duration::from_secs(3600);
        let stats = loop {
            let stats = runtime
                .block_on(admin.get_stats(stats_request(v1::ConsistencyLevel::Eventually)))
                .map_err(rpc)?
                .into_inner();
            if stats.indexed_segments == stats.sealed_segments {
                break stats;
            }
            anyhow::ensure!(Instant::now() < deadline, "the server's indexes were not ready within an hour");
            std::thread::sleep(Duration::from_millis(10));
        };
        let index_wait_s = index_started.elapsed().as_secs_f64();
        println!(
            "grpc ingest: {n} rows in {ingest_s:.2}s = {:.0} rows/s to searchable; indexes ready {index_wait_s:.2}s \
             after flush ({} sealed segments, {} growing rows)",
            n as f64 / ingest_s,
            stats.sealed_segments,
            stats.growing_rows
        );

        // ---- searches: one channel (HTTP/2 connection) per client ----
        let max_clients = args.grpc_clients.iter().copied().max().unwrap_or(1);
        let channels: Vec<Channel> =
            (0..max_clients).map(|_| runtime.block_on(client::channel(addr, None))).collect::<anyhow::Result<_>>()?;
        // The same credentials as the setup calls (`VECTORFLOW_USER`/`_PASSWORD`/`_TOKEN`).
        let authorization = client::Credentials::from_env().authorization()?;
        let k = args.k;
        let mut points = Vec::new();
        for (name, expression, truth) in truths {
            for &ef in &args.ef {
                for &clients in &args.grpc_clients {
                    // `measure` runs each client on a thread of its own: a thread's first call takes the next channel.
                    let slots: Mutex<HashMap<ThreadId, usize>> = Mutex::new(HashMap::new());
                    let search = |q: &[f32]| -> anyhow::Result<Vec<(i64, f32)>> {
                        let slot = {
                            let mut slots = slots.lock().map_err(|_| anyhow::anyhow!("a client thread panicked"))?;
                            let next = slots.len();
                            *slots.entry(std::thread::current().id()).or_insert(next)
                        };
                        let channel = channels[slot % channels.len()].clone();
                        let mut client = VectorflowClient::with_interceptor(channel, authorization.clone())
                            .max_decoding_message_size(usize::MAX);
                        let request = v1::SearchRequest {
                            collection: COLLECTION.into(),
                            field: String::new(),
                            vectors: Some(wire::pack_vectors(std::slice::from_ref(&q.to_vec()))),
                            k: k as u32,
                            ef: ef as u32,
                            filter: expression.clone().unwrap_or_default(),
                            output_fields: Vec::new(),
                            read: read(v1::ConsistencyLevel::Bounded),
                            ..Default::default()
                        };
                        let response = runtime.block_on(client.search(request)).map_err(rpc)?.into_inner();
                        let hits = response
                            .results
                            .into_iter()
                            .next()
                            .ok_or_else(|| anyhow::anyhow!("the server answered no result list"))?;
                        let keys = wire::pks_from_proto(hits.keys)?;
                        Ok(keys
                            .iter()
                            .zip(hits.scores)
                            .map(|(key, score)| (if let Pk::Int(id) = key { *id } else { -1 }, score))
                            .collect())
                    };
                    points.push(Point::new(
                        name,
                        ef,
                        clients,
                        measure(data.queries, clients, k, truth, data.judge, &search)?,
                    ));
                }
            }
        }
        Ok(Run {
            addr: addr.to_string(),
            rows: n,
            ingest_s,
            index_wait_s,
            sealed_segments: stats.sealed_segments,
            points,
        })
    }
}
