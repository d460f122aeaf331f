//! Persistence on the object store: checkpoints, recovery from sealed
//! segments plus the log, resharding, damaged objects, compaction.

mod common;

use std::path::{Path, PathBuf};
use std::time::Duration;

use rand::{Rng, SeedableRng};
use vectorflow::crates::dataflow::persist::GRAPH_SUFFIX;
use vectorflow::{
    CollectionSchema, DataType, Engine, EngineConfig, Error, FieldSchema, Metric, Pk, QueryOptions, Row, SearchOptions,
    SearchPlan, row,
};

const DIM: usize = 8;

fn schema() -> CollectionSchema {
    CollectionSchema::new(
        "docs",
        vec![
            FieldSchema::int64_primary("id", false),
            FieldSchema::vector("v", DIM, Metric::L2),
            FieldSchema::new("n", DataType::Int64),
        ],
    )
}

fn config(dir: &Path, workers: usize, seal_rows: usize, exact: bool) -> EngineConfig {
    let mut config = EngineConfig {
        workers,
        seal_rows,
        checkpoint_interval: None,
        compaction_interval: None,
        ..EngineConfig::new(dir)
    };
    if exact {
        config.search_plan = SearchPlan { exact_below_rows: usize::MAX, ..SearchPlan::default() };
    }
    config
}

fn rows(rng: &mut rand::rngs::StdRng, ids: std::ops::Range<i64>, n: i64) -> Vec<Row> {
    ids.map(|id| {
        let v: Vec<f32> = (0..DIM).map(|_| rng.random_range(-1.0..1.0)).collect();
        row([("id", id.into()), ("v", v.into()), ("n", (id % 7 + n).into())])
    })
    .collect()
}

/// Everything a reader sees at `as_of` (now when `None`): the count, every
/// row's key and `n`, and the top 10 keys of a few searches (with and without a filter).
#[derive(Debug, PartialEq)]
struct Answers {
    count: usize,
    rows: Vec<(i64, i64)>,
    searches: Vec<Vec<i64>>,
}

fn answers(engine: &Engine, as_of: Option<u64>) -> Answers {
    let query = QueryOptions { output_fields: vec!["n".into()], as_of, ..Default::default() };
    let count = engine.count("docs", &query).unwrap();
    let rows =
        engine.query("docs", &query).unwrap().iter().map(|r| (common::int(&r["id"]), common::int(&r["n"]))).collect();
    let mut rng = rand::rngs::StdRng::seed_from_u64(99);
    let queries: Vec<Vec<f32>> = (0..6).map(|_| (0..DIM).map(|_| rng.random_range(-1.0..1.0)).collect()).collect();
    let mut searches = Vec::new();
    for filter in [None, Some("n >= 3".to_string())] {
        let options = SearchOptions { as_of, filter, ef: Some(64), ..SearchOptions::new(10) };
        for hits in engine.search("docs", &queries, &options).unwrap().hits {
            searches.push(hits.iter().map(|h| common::pk_int(&h.pk)).collect());
        }
    }
    Answers { count, rows, searches }
}

fn ids(range: std::ops::Range<i64>) -> Vec<Pk> {
    range.map(Pk::Int).collect()
}

/// Every object under the local store's folder for segments.
fn segment_objects(dir: &Path) -> Vec<PathBuf> {
    let mut found = Vec::new();
    let mut stack = vec![dir.join("store/collections")];
    while let Some(folder) = stack.pop() {
        for entry in std::fs::read_dir(&folder).into_iter().flatten().flatten() {
            let path = entry.path();
            if path.is_dir() {
                stack.push(path);
            } else if path.to_string_lossy().contains("/segments/") {
                found.push(path);
            }
        }
    }
    found.sort();
    found
}

#[test]
fn a_flushed_collection_reopens_from_its_segments_and_the_log_tail_with_the_same_history() {
    let dir = tempfile::tempdir().unwrap();
    let mut rng = rand::rngs::StdRng::seed_from_u64(1);
    let (t1, t2, at_t1, at_t2, now, flushed_records, held_at_close);
    {
        let engine = Engine::open(config(dir.path(), 2, 1200, false)).unwrap();
        engine.create_collection(schema()).unwrap();
        for start in (0..3000).step_by(500) {
            engine.insert_rows("docs", &rows(&mut rng, start..start + 500, 0)).unwrap();
        }
        engine.upsert_rows("docs", &rows(&mut rng, 0..100, 1)).unwrap();
        t1 = engine.delete("docs", &ids(200..300)).unwrap().ts;
        let records_before = engine.log_records().unwrap();
        engine.flush("docs").unwrap();
        flushed_records = records_before - engine.log_records().unwrap();
        assert!(flushed_records > 0, "a checkpoint truncates the log below it");
        // After the checkpoint: deletes of sealed rows, new rows, upserts.
        engine.delete("docs", &ids(300..350)).unwrap();
        engine.insert_rows("docs", &rows(&mut rng, 3000..3100, 0)).unwrap();
        t2 = engine.upsert_rows("docs", &rows(&mut rng, 100..120, 2)).unwrap().ts;
        engine.wait_for_indexes("docs", Duration::from_secs(120)).unwrap();
        at_t1 = answers(&engine, Some(t1));
        at_t2 = answers(&engine, Some(t2));
        now = answers(&engine, None);
        held_at_close = engine.log_records().unwrap();
        assert_eq!(at_t1.count, 2900);
        assert_eq!(now.count, 2950);
        engine.shutdown();
    }
    let engine = Engine::open(config(dir.path(), 2, 1200, false)).unwrap();
    let report = engine.recovery_report();
    assert!(report.segments >= 2, "{report:?}");
    assert!(report.rows >= 2400, "{report:?}");
    assert_eq!(report.rebuilt_indexes, 0, "indexes load from their files");
    assert!(report.bytes > 0);
    assert_eq!(report.replayed_records, held_at_close, "only the log tail after the checkpoint is replayed");
    // The loaded graphs are the ones searched before the restart, so even
    // approximate answers are identical.
    assert_eq!(answers(&engine, Some(t1)), at_t1);
    assert_eq!(answers(&engine, Some(t2)), at_t2);
    assert_eq!(answers(&engine, None), now);
    // The oracle resumes above everything recovered.
    let next = engine.insert_rows("docs", &rows(&mut rng, 5000..5001, 0)).unwrap();
    assert!(next.ts > t2);
    // A second checkpoint covers the tail; a third reopen replays nothing.
    engine.flush("docs").unwrap();
    drop(engine);
    let engine = Engine::open(config(dir.path(), 2, 1200, false)).unwrap();
    assert_eq!(engine.recovery_report().replayed_records, 0);
    assert_eq!(answers(&engine, Some(t2)), at_t2);
    assert_eq!(engine.count("docs", &QueryOptions::default()).unwrap(), 2951);
}

#[test]
fn reopening_with_another_worker_count_splits_segments_by_key() {
    let dir = tempfile::tempdir().unwrap();
    let mut rng = rand::rngs::StdRng::seed_from_u64(2);
    let (t1, before);
    {
        let engine = Engine::open(config(dir.path(), 2, 300, true)).unwrap();
        engine.create_collection(schema()).unwrap();
        engine.insert_rows("docs", &rows(&mut rng, 0..1000, 0)).unwrap();
        t1 = engine.delete("docs", &ids(0..100)).unwrap().ts;
        engine.flush("docs").unwrap();
        engine.upsert_rows("docs", &rows(&mut rng, 100..150, 5)).unwrap();
        before = (answers(&engine, Some(t1)), answers(&engine, None));
    }
    for workers in [3, 1] {
        let engine = Engine::open(config(dir.path(), workers, 300, true)).unwrap();
        assert!(engine.recovery_report().rebuilt_indexes > 0);
        assert_eq!((answers(&engine, Some(t1)), answers(&engine, None)), before, "{workers} workers");
        // Its next checkpoint stores the segments cut for this worker count.
        engine.flush("docs").unwrap();
        engine.shutdown();
    }
}

#[test]
fn a_missing_index_is_rebuilt_and_damaged_data_is_an_error_naming_the_object() {
    let dir = tempfile::tempdir().unwrap();
    let mut rng = rand::rngs::StdRng::seed_from_u64(3);
    let expected;
    {
        let engine = Engine::open(config(dir.path(), 2, 200, true)).unwrap();
        engine.create_collection(schema()).unwrap();
        engine.insert_rows("docs", &rows(&mut rng, 0..900, 0)).unwrap();
        engine.delete("docs", &ids(10..20)).unwrap();
        engine.flush("docs").unwrap();
        expected = answers(&engine, None);
    }
    let objects = segment_objects(dir.path());
    let graphs: Vec<_> = objects.iter().filter(|p| p.to_string_lossy().ends_with(GRAPH_SUFFIX)).collect();
    assert!(graphs.len() >= 2, "{objects:?}");
    std::fs::remove_file(graphs[0]).unwrap();
    {
        let engine = Engine::open(config(dir.path(), 2, 200, true)).unwrap();
        assert_eq!(engine.recovery_report().rebuilt_indexes, 1);
        assert_eq!(answers(&engine, None), expected);
        engine.shutdown();
    }
    // An index file altered in place fails its checksum and is rebuilt too.
    let mut bytes = std::fs::read(graphs[1]).unwrap();
    let middle = bytes.len() / 2;
    bytes[middle] ^= 0xff;
    std::fs::write(graphs[1], &bytes).unwrap();
    {
        let engine = Engine::open(config(dir.path(), 2, 200, true)).unwrap();
        assert!(engine.recovery_report().rebuilt_indexes >= 1);
        assert_eq!(answers(&engine, None), expected);
        engine.shutdown();
    }
    // Truncated data cannot be rebuilt from anything: opening fails and says which object.
    let data = objects.iter().find(|p| p.to_string_lossy().ends_with("data.parquet")).unwrap();
    let bytes = std::fs::read(data).unwrap();
    std::fs::write(data, &bytes[..bytes.len() / 2]).unwrap();
    let relative = data.strip_prefix(dir.path().join("store")).unwrap().to_string_lossy().to_string();
    match Engine::open(config(dir.path(), 2, 200, true)) {
        Err(e @ Error::Corrupt { .. }) => assert!(e.to_string().contains(&relative), "{e}"),
        other => panic!("expected a corrupt-data error naming {relative}, got {other:?}"),
    }
    // The server refuses to start on it, and says why.
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_vectorflow"))
        .args(["serve", "--listen", "127.0.0.1:0", "--data-dir"])
        .arg(dir.path())
        .output()
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains(&relative), "{stderr}");
    // A missing data object is named too.
    std::fs::remove_file(data).unwrap();
    match Engine::open(config(dir.path(), 2, 200, true)) {
        Err(e) => assert!(e.to_string().contains(&relative) && e.to_string().contains("missing"), "{e}"),
        Ok(_) => panic!("opened without a data object"),
    }
}

#[test]
fn compaction_drops_history_outside_retention_shrinks_storage_and_keeps_answers_inside_it() {
    let dir = tempfile::tempdir().unwrap();
    let mut rng = rand::rngs::StdRng::seed_from_u64(4);
    let mut cfg = config(dir.path(), 2, 150, true);
    cfg.retention = Duration::from_secs(6);
    let engine = Engine::open(cfg.clone()).unwrap();
    engine.create_collection(schema()).unwrap();
    for start in (0..1200).step_by(100) {
        engine.insert_rows("docs", &rows(&mut rng, start..start + 100, 0)).unwrap();
        // Small checkpoints leave small segments for compaction to merge.
        engine.flush("docs").unwrap();
    }
    let deleted = engine.delete("docs", &ids(0..800)).unwrap().ts;
    engine.flush("docs").unwrap();
    let segments_before = engine.stats("docs", Default::default()).unwrap().sealed_segments;
    let bytes_before = engine.storage_bytes("docs").unwrap();
    std::thread::sleep(Duration::from_millis(6500));
    // Inside the window: after the deletes, and a later upsert.
    let inside = engine.upsert_rows("docs", &rows(&mut rng, 900..950, 3)).unwrap().ts;
    let at_inside = answers(&engine, Some(inside));
    let now = answers(&engine, None);
    assert_eq!(now.count, 400);

    // The workers look at dead rows every 250 ms and may have rewritten
    // the segments already; either way, after this call they are gone.
    let report = engine.compact("docs").unwrap();
    assert!(report.horizon > deleted, "{report:?}");
    let segments_after = engine.stats("docs", Default::default()).unwrap().sealed_segments;
    let bytes_after = engine.storage_bytes("docs").unwrap();
    assert!(segments_after < segments_before, "{segments_before} -> {segments_after}");
    assert!(bytes_after < bytes_before, "storage {bytes_before} -> {bytes_after} bytes");
    assert_eq!(answers(&engine, Some(inside)), at_inside);
    assert_eq!(answers(&engine, None), now);
    // Before the horizon: a clear error, not an answer missing the compacted rows.
    match engine.count("docs", &QueryOptions { as_of: Some(deleted - 1), ..Default::default() }) {
        Err(Error::OutsideRetention { .. }) => {}
        other => panic!("expected OutsideRetention, got {other:?}"),
    }
    // The compacted state is what recovery loads.
    drop(engine);
    let engine = Engine::open(cfg).unwrap();
    assert_eq!(answers(&engine, None), now);
}

/// Flushes that arrive while a checkpoint runs share it (or the next one):
/// eight at once publish at most two checkpoints, and every flush still
/// covers the writes acknowledged before it.
#[test]
fn concurrent_flushes_coalesce_into_few_checkpoints() {
    let dir = tempfile::tempdir().unwrap();
    let engine = Engine::open(config(dir.path(), 2, 1000, true)).unwrap();
    engine.create_collection(schema()).unwrap();
    let mut rng = rand::rngs::StdRng::seed_from_u64(11);
    let written = engine.insert_rows("docs", &rows(&mut rng, 0..50, 0)).unwrap();
    let stamps: Vec<u64> = std::thread::scope(|scope| {
        let flushes: Vec<_> = (0..8).map(|_| scope.spawn(|| engine.flush("docs").unwrap())).collect();
        flushes.into_iter().map(|f| f.join().unwrap()).collect()
    });
    let distinct: std::collections::BTreeSet<u64> = stamps.iter().copied().collect();
    assert!(distinct.len() <= 2, "8 concurrent flushes made {} checkpoints: {distinct:?}", distinct.len());
    assert!(stamps.iter().all(|&ts| ts > written.ts), "every flush covers the write before it");
    let later = engine.insert_rows("docs", &rows(&mut rng, 50..60, 0)).unwrap();
    let flushed = engine.flush("docs").unwrap();
    assert!(flushed > later.ts, "a flush after a new write checkpoints again");
    drop(engine);
    let reopened = Engine::open(config(dir.path(), 2, 1000, true)).unwrap();
    assert_eq!(reopened.recovery_report().replayed_records, 0, "the last flush covered every write");
    assert_eq!(reopened.count("docs", &QueryOptions::default()).unwrap(), 60);
}

#[test]
fn a_checkpoint_stores_the_growing_rows_without_sealing_them() {
    let dir = tempfile::tempdir().unwrap();
    let mut rng = rand::rngs::StdRng::seed_from_u64(21);
    let data_files = |dir: &Path| segment_objects(dir).iter().filter(|p| p.ends_with("data.parquet")).count();
    let (deleted_at, before_delete, now);
    {
        let engine = Engine::open(config(dir.path(), 2, 1000, true)).unwrap();
        engine.create_collection(schema()).unwrap();
        engine.insert_rows("docs", &rows(&mut rng, 0..300, 0)).unwrap();
        deleted_at = engine.delete("docs", &ids(0..10)).unwrap().ts;
        before_delete = answers(&engine, Some(deleted_at - 1));
        engine.flush("docs").unwrap();
        let stats = engine.stats("docs", vectorflow::Consistency::Strong).unwrap();
        assert_eq!((stats.sealed_segments, stats.growing_rows), (0, 300), "a flush seals nothing: {stats:?}");
        assert_eq!(data_files(dir.path()), 2, "one growing snapshot per shard");
        assert!(!segment_objects(dir.path()).iter().any(|p| p.to_string_lossy().ends_with(GRAPH_SUFFIX)));
        // The next checkpoint stores the growing rows again and drops the old copy.
        engine.insert_rows("docs", &rows(&mut rng, 300..350, 0)).unwrap();
        engine.flush("docs").unwrap();
        assert_eq!(data_files(dir.path()), 2, "{:?}", segment_objects(dir.path()));
        now = answers(&engine, None);
        assert_eq!(now.count, 340);
        engine.shutdown();
    }
    let engine = Engine::open(config(dir.path(), 2, 1000, true)).unwrap();
    assert_eq!(engine.recovery_report().replayed_records, 0, "the checkpoint holds every row");
    let stats = engine.stats("docs", vectorflow::Consistency::Strong).unwrap();
    assert_eq!((stats.sealed_segments, stats.growing_rows), (0, 350), "{stats:?}");
    assert_eq!(answers(&engine, None), now);
    assert_eq!(answers(&engine, Some(deleted_at - 1)), before_delete);
    // The restored rows keep growing and seal at the seal size.
    engine.insert_rows("docs", &rows(&mut rng, 350..2500, 0)).unwrap();
    engine.wait_for_indexes("docs", Duration::from_secs(120)).unwrap();
    let stats = engine.stats("docs", vectorflow::Consistency::Strong).unwrap();
    assert!(stats.sealed_segments >= 2 && stats.growing_rows < 2000, "{stats:?}");
    assert_eq!(engine.count("docs", &QueryOptions::default()).unwrap(), 2490);
    assert_eq!(answers(&engine, Some(deleted_at - 1)), before_delete);
    engine.shutdown();
}
