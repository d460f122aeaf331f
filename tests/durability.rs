//! Durability and fail-stop: every acknowledged write survives a power cut
//! (a store that loses whatever was not synced); an error while applying a
//! change stops its collection instead of being dropped, and the collection
//! is never checkpointed past it; segments cut with another placement are
//! split by key at load.

mod common;

use std::path::Path;
use std::sync::Arc;

use bytes::Bytes;
use rand::{Rng, SeedableRng};
use vectorflow::crates::connectors::power_cut::PowerCutStore;
use vectorflow::crates::connectors::{EmbeddedLog, LogOp, LogRecord};
use vectorflow::crates::core::IpcBatch;
use vectorflow::{
    CollectionSchema, DataType, Engine, EngineConfig, Error, FieldSchema, Metric, Pk, QueryOptions, Row, SearchOptions,
    SearchPlan, row,
};

const DIM: usize = 4;

fn schema(name: &str) -> CollectionSchema {
    CollectionSchema::new(
        name,
        vec![
            FieldSchema::int64_primary("id", false),
            FieldSchema::vector("v", DIM, Metric::L2),
            FieldSchema::new("n", DataType::Int64),
        ],
    )
}

fn config(dir: &Path) -> EngineConfig {
    EngineConfig {
        workers: 2,
        seal_rows: 300,
        checkpoint_interval: None,
        compaction_interval: None,
        search_plan: SearchPlan { exact_below_rows: usize::MAX, ..SearchPlan::default() },
        ..EngineConfig::new(dir)
    }
}

fn rows(rng: &mut rand::rngs::StdRng, ids: std::ops::Range<i64>, n: i64) -> Vec<Row> {
    ids.map(|id| {
        let v: Vec<f32> = (0..DIM).map(|_| rng.random_range(-1.0..1.0)).collect();
        row([("id", id.into()), ("v", v.into()), ("n", n.into())])
    })
    .collect()
}

/// Every row's `(id, n)`, in key order.
fn contents(engine: &Engine, collection: &str) -> Vec<(i64, i64)> {
    let query = QueryOptions { output_fields: vec!["n".into()], limit: Some(100_000), ..Default::default() };
    let mut found: Vec<(i64, i64)> = engine
        .query(collection, &query)
        .unwrap()
        .iter()
        .map(|r| (common::int(&r["id"]), common::int(&r["n"])))
        .collect();
    found.sort();
    found
}

#[test]
fn every_acknowledged_write_survives_a_power_cut_after_checkpoints() {
    let dir = tempfile::tempdir().unwrap();
    let store = PowerCutStore::new();
    let mut rng = rand::rngs::StdRng::seed_from_u64(5);
    // The reference model: what every acknowledged write leaves.
    let mut expected = std::collections::BTreeMap::new();
    let cut = {
        let engine = Engine::open_with_storage(config(dir.path()), store.storage().unwrap()).unwrap();
        engine.create_collection(schema("docs")).unwrap();
        for round in 0..4i64 {
            let start = round * 400;
            engine.insert_rows("docs", &rows(&mut rng, start..start + 400, round)).unwrap();
            (start..start + 400).for_each(|id| _ = expected.insert(id, round));
            engine.upsert_rows("docs", &rows(&mut rng, start..start + 50, 10 + round)).unwrap();
            (start..start + 50).for_each(|id| _ = expected.insert(id, 10 + round));
            let deleted: Vec<Pk> = (start + 100..start + 120).map(Pk::Int).collect();
            engine.delete("docs", &deleted).unwrap();
            (start + 100..start + 120).for_each(|id| _ = expected.remove(&id));
            // Each checkpoint truncates the log below it: from then on the
            // rows live only in the objects it wrote.
            let before = engine.log_records().unwrap();
            engine.flush("docs").unwrap();
            assert!(engine.log_records().unwrap() < before, "the checkpoint truncated the log");
        }
        // A tail only the log holds.
        engine.insert_rows("docs", &rows(&mut rng, 5000..5010, 7)).unwrap();
        (5000..5010).for_each(|id| _ = expected.insert(id, 7));
        assert_eq!(contents(&engine, "docs"), expected.clone().into_iter().collect::<Vec<_>>());
        // The power goes while the engine runs: the store keeps only what
        // was synced by now, whatever the engine does after.
        store.put_unsynced("collections/1/stray", Bytes::from_static(b"never synced")).unwrap();
        let after = store.cut().unwrap();
        engine.shutdown();
        after
    };
    let after = cut;
    let storage = after.storage().unwrap();
    assert!(storage.get_opt("collections/1/stray").unwrap().is_none(), "the cut keeps only synced writes");
    assert!(after.durable_paths().iter().any(|p| p.starts_with("catalog/")), "the catalog is durable");

    let engine = Engine::open_with_storage(config(dir.path()), storage).unwrap();
    assert!(engine.recovery_report().segments > 0, "{:?}", engine.recovery_report());
    assert_eq!(contents(&engine, "docs"), expected.into_iter().collect::<Vec<_>>());
    let hits = engine.search("docs", &[vec![0.0; DIM]], &SearchOptions::new(5)).unwrap();
    assert_eq!(hits.hits[0].len(), 5);
    engine.shutdown();
}

#[test]
fn an_error_applying_a_change_stops_the_collection_and_no_checkpoint_passes_it() {
    let dir = tempfile::tempdir().unwrap();
    let mut rng = rand::rngs::StdRng::seed_from_u64(6);
    let collection_id;
    // The newest manifest's file name (`v{N:020}.json`).
    let manifest_version = |dir: &Path, id: u32| -> std::ffi::OsString {
        let folder = dir.join(format!("store/collections/{id}/manifest"));
        std::fs::read_dir(folder).unwrap().map(|e| e.unwrap().file_name()).max().unwrap()
    };
    {
        let engine = Engine::open(config(dir.path())).unwrap();
        collection_id = engine.create_collection(schema("docs")).unwrap().id;
        engine.create_collection(schema("other")).unwrap();
        engine.insert_rows("docs", &rows(&mut rng, 0..500, 1)).unwrap();
        engine.insert_rows("other", &rows(&mut rng, 0..50, 1)).unwrap();
        engine.flush("docs").unwrap();
        engine.shutdown();
    }
    let versions_before = manifest_version(dir.path(), collection_id);
    // A record the writers never produce: a row without its vector and
    // `n` columns (a damaged log, or a bug upstream).
    {
        let log = EmbeddedLog::open(&dir.path().join("wal"), 2).unwrap();
        let ids = arrow::array::Int64Array::from(vec![9_000i64]);
        let batch =
            arrow::record_batch::RecordBatch::try_from_iter([("id", Arc::new(ids) as arrow::array::ArrayRef)]).unwrap();
        let record = LogRecord { collection: collection_id, op: LogOp::Upsert(IpcBatch(batch)) };
        log.append(vec![(0, record)]).unwrap();
    }
    for restart in 0..2i64 {
        // Background checkpoints on: they skip the stopped collection.
        let engine = Engine::open(EngineConfig {
            checkpoint_interval: Some(std::time::Duration::from_millis(20)),
            ..config(dir.path())
        })
        .unwrap();
        let failed = engine.failed_collections();
        assert_eq!(failed.len(), 1, "{failed:?}");
        assert_eq!(failed[0].0, "docs");
        assert!(failed[0].1.contains("columns"), "the cause names the problem: {}", failed[0].1);
        let stopped = |result: Result<(), Error>, what: &str| match result {
            Err(Error::CollectionFailed { collection, cause }) => {
                assert_eq!(collection, "docs");
                assert!(!cause.is_empty());
            }
            other => panic!("{what}: expected the collection to be stopped, got {other:?}"),
        };
        stopped(engine.search("docs", &[vec![0.0; DIM]], &SearchOptions::new(3)).map(|_| ()), "search");
        stopped(engine.query("docs", &QueryOptions::default()).map(|_| ()), "query");
        stopped(engine.insert_rows("docs", &rows(&mut rng, 10_000..10_001, 1)).map(|_| ()), "insert");
        stopped(engine.delete("docs", &[Pk::Int(1)]).map(|_| ()), "delete");
        stopped(engine.flush("docs").map(|_| ()), "flush");
        // The status code a client gets.
        let error = engine.flush("docs").unwrap_err();
        assert_eq!(vectorflow_proto::status(&error).code(), tonic::Code::FailedPrecondition);
        // The other collection is untouched.
        let others = 50 + 10 * restart;
        assert_eq!(contents(&engine, "other").len(), others as usize);
        engine.insert_rows("other", &rows(&mut rng, others..others + 10, 1)).unwrap();
        engine.flush("other").unwrap();
        // Let the maintenance thread pass several times.
        std::thread::sleep(std::time::Duration::from_millis(200));
        engine.shutdown();
        // No checkpoint moved past the bad record: a restart replays it again.
        assert_eq!(manifest_version(dir.path(), collection_id), versions_before);
    }
}

#[test]
fn segments_cut_with_another_placement_are_split_by_key_at_load() {
    let dir = tempfile::tempdir().unwrap();
    let mut rng = rand::rngs::StdRng::seed_from_u64(7);
    let expected;
    let id;
    {
        let engine = Engine::open(config(dir.path())).unwrap();
        id = engine.create_collection(schema("docs")).unwrap().id;
        engine.insert_rows("docs", &rows(&mut rng, 0..900, 1)).unwrap();
        engine.flush("docs").unwrap();
        expected = contents(&engine, "docs");
        engine.shutdown();
    }
    // Rewrite the newest manifest as one from before placement was recorded.
    let folder = dir.path().join(format!("store/collections/{id}/manifest"));
    let newest = std::fs::read_dir(&folder).unwrap().map(|e| e.unwrap().path()).max().unwrap();
    let mut manifest: serde_json::Value = serde_json::from_slice(&std::fs::read(&newest).unwrap()).unwrap();
    assert_eq!(manifest["placement"], "xxh64-v1");
    manifest.as_object_mut().unwrap().remove("placement");
    std::fs::write(&newest, serde_json::to_vec(&manifest).unwrap()).unwrap();

    let engine = Engine::open(config(dir.path())).unwrap();
    assert!(engine.recovery_report().rebuilt_indexes > 0, "{:?}", engine.recovery_report());
    assert_eq!(contents(&engine, "docs"), expected);
    // Every key is on the shard routing puts it on: an upsert of each key
    // retires its old version there (a key left on another shard would
    // show twice).
    engine.upsert_rows("docs", &rows(&mut rng, 0..900, 2)).unwrap();
    assert_eq!(contents(&engine, "docs"), (0..900).map(|id| (id, 2)).collect::<Vec<_>>());
    engine.flush("docs").unwrap();
    engine.shutdown();
    let newest = std::fs::read_dir(&folder).unwrap().map(|e| e.unwrap().path()).max().unwrap();
    let manifest: serde_json::Value = serde_json::from_slice(&std::fs::read(&newest).unwrap()).unwrap();
    assert_eq!(manifest["placement"], "xxh64-v1", "the next checkpoint records the placement");
}

/// A store whose catalog writes wait until the test lets them go.
struct HeldCatalogWrites {
    entered: std::sync::mpsc::SyncSender<()>,
    release: std::sync::Mutex<std::sync::mpsc::Receiver<()>>,
}

impl vectorflow::crates::connectors::Durability for HeldCatalogWrites {
    fn sync(&self, path: &str) -> std::io::Result<()> {
        if path.starts_with("catalog/") {
            let _ = self.entered.try_send(());
            let release = self.release.lock().unwrap();
            let _ = release.recv_timeout(std::time::Duration::from_secs(60));
        }
        Ok(())
    }
}

#[test]
fn reads_and_writes_go_on_while_a_collection_create_waits_on_the_store() {
    let dir = tempfile::tempdir().unwrap();
    let (entered_tx, entered) = std::sync::mpsc::sync_channel(16);
    let (release, release_rx) = std::sync::mpsc::channel();
    let durability = Arc::new(HeldCatalogWrites { entered: entered_tx, release: std::sync::Mutex::new(release_rx) });
    let store = Arc::new(object_store::memory::InMemory::new());
    let storage =
        vectorflow::crates::connectors::ObjectStorage::with_store(store, durability, "memory://held").unwrap();
    let engine = Engine::open_with_storage(config(dir.path()), storage).unwrap();
    let mut rng = rand::rngs::StdRng::seed_from_u64(8);
    // The first create waits on its catalog write until released.
    let creating = std::thread::spawn({
        let engine = engine.clone();
        move || engine.create_collection(schema("docs"))
    });
    entered.recv_timeout(std::time::Duration::from_secs(60)).expect("the create reached the store");
    release.send(()).unwrap();
    creating.join().unwrap().unwrap();
    entered.try_iter().count();

    // The second create holds its catalog write while the rest goes on.
    let creating = std::thread::spawn({
        let engine = engine.clone();
        move || engine.create_collection(schema("later"))
    });
    entered.recv_timeout(std::time::Duration::from_secs(60)).expect("the create reached the store");
    let (done_tx, done) = std::sync::mpsc::channel();
    std::thread::spawn({
        let engine = engine.clone();
        let rows = rows(&mut rng, 0..20, 1);
        move || {
            let outcome = (|| -> vectorflow::Result<usize> {
                engine.describe_collection("docs")?;
                engine.insert_rows("docs", &rows)?;
                Ok(engine.search("docs", &[vec![0.0; DIM]], &SearchOptions::new(5))?.hits[0].len())
            })();
            let _ = done_tx.send((outcome, engine.list_collections()));
        }
    });
    let (outcome, names) = done
        .recv_timeout(std::time::Duration::from_secs(60))
        .expect("describe, insert and search finished while the create waited on the store");
    assert_eq!(outcome.unwrap(), 5);
    assert_eq!(names, vec!["docs".to_string()], "the new collection appears only once it is durable");
    release.send(()).unwrap();
    creating.join().unwrap().unwrap();
    assert_eq!(engine.list_collections(), vec!["docs".to_string(), "later".to_string()]);
    engine.shutdown();
}
