//! `vectorflow bench-recovery`: what a restart costs. Ingests a dataset, then
//! measures in one run, on the same data:
//! - recovery by full log replay (no checkpoint yet: every row replayed, every
//!   index built again), the baseline;
//! - a checkpoint (flush) and the bytes it stores, per kind of object;
//! - recovery from the checkpoint (segments and index files loaded);
//! - recovery when the index files are gone (data loaded, indexes rebuilt).

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use crate::bench::{DatasetArgs, insert_all, scalar_bytes_per_row};
use serde_json::json;
use vectorflow::crates::dataflow::persist::GRAPH_SUFFIX;
use vectorflow::{
    CollectionSchema, Consistency, Engine, EngineConfig, FieldSchema, Metric, Pk, QueryOptions, SearchOptions, row,
};

#[derive(Debug, Clone, clap::Args)]
pub struct RecoveryArgs {
    #[command(flatten)]
    pub data: DatasetArgs,
    /// Query vectors whose answers are compared before and after recovery.
    #[arg(long, default_value_t = 100)]
    pub queries: usize,
    /// Instead: the restart cost of a log of this many one-row writes (the
    /// dataset's vectors, cycled), after a crash (nothing checkpointed: the
    /// whole log is replayed) and after a clean shutdown (checkpointed).
    #[arg(long)]
    pub small_writes: Option<usize>,
    /// Concurrent writers for `--small-writes`.
    #[arg(long, default_value_t = 16)]
    pub writers: usize,
    /// For `--small-writes`: keep the first this many components of each
    /// vector (the restart cost is the log's, not the index builds').
    #[arg(long)]
    pub dim: Option<usize>,
}

const COLLECTION: &str = "bench";
const INDEX_WAIT: Duration = Duration::from_secs(3600);

/// Timings of one restart: `open` returns after loading and replaying;
/// `ready` adds the wait for every index.
struct Restart {
    open_s: f64,
    ready_s: f64,
    report: vectorflow::RecoveryReport,
}

fn restart(config: &EngineConfig) -> anyhow::Result<(Engine, Restart)> {
    let started = Instant::now();
    let engine = Engine::open(config.clone())?;
    let open_s = started.elapsed().as_secs_f64();
    engine.wait_for_indexes(COLLECTION, INDEX_WAIT)?;
    let ready_s = started.elapsed().as_secs_f64();
    let report = engine.recovery_report();
    Ok((engine, Restart { open_s, ready_s, report }))
}

fn answers(engine: &Engine, queries: &[Vec<f32>]) -> anyhow::Result<Vec<Vec<Pk>>> {
    let options = SearchOptions { ef: Some(64), ..SearchOptions::new(10) };
    Ok(engine
        .search(COLLECTION, queries, &options)?
        .hits
        .iter()
        .map(|hits| hits.iter().map(|h| h.pk.clone()).collect())
        .collect())
}

/// Bytes per kind of stored object (data, index graph, delete logs, manifests, catalog).
fn storage_by_kind(engine: &Engine) -> anyhow::Result<BTreeMap<&'static str, u64>> {
    let mut kinds = BTreeMap::new();
    for prefix in ["catalog", "collections"] {
        for (path, size) in engine.storage().list(prefix)? {
            let kind = if path.ends_with("data.parquet") {
                "segment_data"
            } else if path.ends_with(GRAPH_SUFFIX) {
                "index_graph"
            } else if path.contains("/deletes-") {
                "delete_logs"
            } else if path.contains("/manifest/") {
                "manifests"
            } else {
                "catalog"
            };
            *kinds.entry(kind).or_insert(0) += size;
        }
    }
    Ok(kinds)
}

/// The engine both measurements restart: no background checkpoints or
/// compaction, so each restart replays exactly what the run left.
fn engine_config(args: &RecoveryArgs, data_dir: &std::path::Path) -> EngineConfig {
    EngineConfig {
        workers: args.data.workers,
        seal_rows: args.data.seal_rows,
        checkpoint_interval: None,
        compaction_interval: None,
        ..EngineConfig::new(data_dir)
    }
}

pub fn run(args: RecoveryArgs) -> anyhow::Result<()> {
    if let Some(writes) = args.small_writes {
        return small_writes(&args, writes);
    }
    let dataset = args.data.open()?;
    let vectors = dataset.base_vectors()?;
    let attributes = dataset.base_attributes()?;
    let query_vectors = dataset.query_vectors()?;
    let queries: Vec<Vec<f32>> =
        (0..args.queries.min(query_vectors.rows)).map(|q| query_vectors.row(q).to_vec()).collect();
    let n = vectors.rows;
    let data_dir = tempfile::tempdir()?;
    let config = engine_config(&args, data_dir.path());
    println!(
        "dataset {}: {n} x {}, workers {}, seal_rows {}",
        dataset.name(),
        vectors.cols,
        args.data.workers,
        args.data.seal_rows
    );

    // ---- ingest, nothing checkpointed ----
    let schema = dataset.collection_schema(COLLECTION, &attributes)?;
    {
        let engine = Engine::open(config.clone())?;
        engine.create_collection(schema.clone())?;
        let started = Instant::now();
        insert_all(&engine, COLLECTION, &dataset, &schema, &vectors, &attributes)?;
        let stats = engine.stats(COLLECTION, Consistency::Strong)?;
        anyhow::ensure!(stats.live_rows == n, "ingested {} of {n} rows", stats.live_rows);
        // Settled, as a collection that stopped changing is: what is stored
        // then is the steady state, not inputs of merges under way.
        let settled = engine.wait_for_merges(COLLECTION, INDEX_WAIT)?;
        println!(
            "ingested {n} rows and built the indexes in {:.1} s ({} sealed segments once merges settled)",
            started.elapsed().as_secs_f64(),
            settled.sealed_segments
        );
    }

    // ---- baseline: recovery by replaying the whole log ----
    let (engine, replay) = restart(&config)?;
    println!(
        "full log replay: open {:.2} s ({} records), indexes ready {:.2} s",
        replay.open_s, replay.report.replayed_records, replay.ready_s
    );

    // ---- checkpoint ----
    let started = Instant::now();
    engine.flush(COLLECTION)?;
    let flush_s = started.elapsed().as_secs_f64();
    let stored = storage_by_kind(&engine)?;
    let total_bytes: u64 = stored.values().sum();
    let before = answers(&engine, &queries)?;
    drop(engine);
    let bytes_per_vector = total_bytes as f64 / n as f64;
    let raw_vector_bytes = vectors.cols * 4;
    let raw_scalar_bytes = scalar_bytes_per_row(&attributes);
    let stored_vs_raw = bytes_per_vector / (raw_vector_bytes as f64 + raw_scalar_bytes);
    println!(
        "checkpoint: {flush_s:.2} s, {total_bytes} bytes stored ({bytes_per_vector:.0} bytes/vector, {stored_vs_raw:.2}x \
         the raw vector ({raw_vector_bytes}) and scalar ({raw_scalar_bytes:.0}) bytes): {}",
        stored
            .iter()
            .map(|(kind, bytes)| format!("{kind} {:.0}", *bytes as f64 / n as f64))
            .collect::<Vec<_>>()
            .join(", ")
    );

    // ---- recovery from the checkpoint ----
    let (engine, loaded) = restart(&config)?;
    let answers_equal = answers(&engine, &queries)? == before;
    anyhow::ensure!(loaded.report.rebuilt_indexes == 0, "indexes were rebuilt: {:?}", loaded.report);
    let load_s = loaded.report.load.as_secs_f64();
    println!(
        "from the checkpoint: open {:.2} s (segments {} loaded in {load_s:.2} s: {:.0} MB/s, {:.0} rows/s), \
         indexes ready {:.2} s; answers equal to before: {answers_equal}",
        loaded.open_s,
        loaded.report.segments,
        loaded.report.bytes as f64 / load_s / 1e6,
        loaded.report.rows as f64 / load_s,
        loaded.ready_s
    );
    // ---- recovery without the index files: data loaded, indexes rebuilt ----
    for (path, _) in engine.storage().list("collections")? {
        if path.ends_with(GRAPH_SUFFIX) {
            engine.storage().delete(&path)?;
        }
    }
    drop(engine);
    let (_engine, rebuilt) = restart(&config)?;
    println!(
        "without index files: open {:.2} s ({} indexes rebuilt), indexes ready {:.2} s",
        rebuilt.open_s, rebuilt.report.rebuilt_indexes, rebuilt.ready_s
    );

    let restart_json = |r: &Restart| {
        json!({
            "open_s": r.open_s,
            "ready_s": r.ready_s,
            "segments": r.report.segments,
            "rows": r.report.rows,
            "bytes_read": r.report.bytes,
            "load_s": r.report.load.as_secs_f64(),
            "replayed_records": r.report.replayed_records,
            "rebuilt_indexes": r.report.rebuilt_indexes,
        })
    };
    let results = json!({
        "dataset": dataset.name(),
        "rows": n,
        "dim": vectors.cols,
        "workers": args.data.workers,
        "seal_rows": args.data.seal_rows,
        "full_log_replay": restart_json(&replay),
        "checkpoint": {"flush_s": flush_s, "stored_bytes": total_bytes, "bytes_per_vector": bytes_per_vector,
                       "raw_vector_bytes": raw_vector_bytes, "raw_scalar_bytes": raw_scalar_bytes,
                       "stored_vs_raw": stored_vs_raw, "by_kind": stored},
        "from_checkpoint": restart_json(&loaded),
        "segment_load": {
            "mb_per_s": loaded.report.bytes as f64 / load_s / 1e6,
            "rows_per_s": loaded.report.rows as f64 / load_s,
        },
        "answers_equal_after_recovery": answers_equal,
        "without_index_files": restart_json(&rebuilt),
        "ratios": {
            "ready_from_checkpoint_vs_replay": loaded.ready_s / replay.ready_s,
            "ready_from_checkpoint_vs_rebuild": loaded.ready_s / rebuilt.ready_s,
        },
    });
    args.data.write_results("recovery.json", &results)?;
    Ok(())
}

/// Opens the engine, times it, and checks the row count it recovered.
fn reopen_counting(config: &EngineConfig, expected: usize) -> anyhow::Result<(Engine, f64)> {
    let started = Instant::now();
    let engine = Engine::open(config.clone())?;
    let open_s = started.elapsed().as_secs_f64();
    let count = engine.count(COLLECTION, &QueryOptions::default())?;
    anyhow::ensure!(count == expected, "recovered {count} of {expected} rows");
    Ok((engine, open_s))
}

/// The restart cost of a log of `writes` one-row writes: after a crash
/// (the engine stops with nothing checkpointed, as a SIGKILL leaves it:
/// every write is replayed from the log) and after a clean shutdown (a
/// checkpoint first, as `vectorflow serve` makes on SIGTERM).
fn small_writes(args: &RecoveryArgs, writes: usize) -> anyhow::Result<()> {
    let dataset = args.data.open()?;
    let vectors = dataset.base_vectors()?;
    let data_dir = tempfile::tempdir()?;
    let config = engine_config(args, data_dir.path());
    let writers = args.writers.max(1);
    let dim = args.dim.unwrap_or(vectors.cols).clamp(1, vectors.cols);
    println!("{writes} one-row writes of {} x {dim} vectors from {writers} writers", vectors.rows);
    let engine = Engine::open(config.clone())?;
    engine.create_collection(CollectionSchema::new(
        COLLECTION,
        vec![FieldSchema::int64_primary("id", false), FieldSchema::vector("v", dim, Metric::L2)],
    ))?;
    let started = Instant::now();
    std::thread::scope(|scope| -> anyhow::Result<()> {
        let handles: Vec<_> = (0..writers)
            .map(|writer| {
                let (engine, vectors) = (&engine, &vectors);
                scope.spawn(move || -> anyhow::Result<()> {
                    for key in (writer..writes).step_by(writers) {
                        let vector = vectors.row(key % vectors.rows)[..dim].to_vec();
                        engine.insert_rows(COLLECTION, &[row([("id", (key as i64).into()), ("v", vector.into())])])?;
                    }
                    Ok(())
                })
            })
            .collect();
        for handle in handles {
            handle.join().map_err(|_| anyhow::anyhow!("a writer panicked"))??;
        }
        Ok(())
    })?;
    let write_s = started.elapsed().as_secs_f64();
    let log_records = engine.log_records()?;
    println!("written in {write_s:.1} s ({:.0} writes/s), {log_records} log records", writes as f64 / write_s);
    // A crash: the workers stop, nothing is checkpointed.
    engine.shutdown();
    drop(engine);

    let (engine, after_crash_s) = reopen_counting(&config, writes)?;
    let replayed = engine.recovery_report().replayed_records;
    println!("after a crash: open {after_crash_s:.2} s replaying {replayed} records");
    let started = Instant::now();
    engine.flush(COLLECTION)?;
    let flush_s = started.elapsed().as_secs_f64();
    engine.shutdown();
    drop(engine);
    let (engine, after_clean_s) = reopen_counting(&config, writes)?;
    let replayed_clean = engine.recovery_report().replayed_records;
    println!(
        "after a clean shutdown (checkpoint of {flush_s:.2} s): open {after_clean_s:.2} s replaying {replayed_clean} records"
    );
    let results = json!({
        "dataset": dataset.name(),
        "writes": writes,
        "writers": writers,
        "dim": dim,
        "workers": args.data.workers,
        "write_s": write_s,
        "writes_per_s": writes as f64 / write_s,
        "after_crash": {"open_s": after_crash_s, "replayed_records": replayed,
                        "replayed_records_per_s": replayed as f64 / after_crash_s},
        "checkpoint_s": flush_s,
        "after_clean_shutdown": {"open_s": after_clean_s, "replayed_records": replayed_clean},
    });
    args.data.write_results("small-writes-recovery.json", &results)?;
    Ok(())
}
