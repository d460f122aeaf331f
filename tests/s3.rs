//! The object store on S3: a real S3-compatible server (moto's
//! `moto_server`, installed by `.ci/run` into /opt/vectorflow-s3) on loopback.
//!
//! The server binary is `$VF_TEST_S3_SERVER`, or moto's in that venv.
//! Without one the test says so and passes, unless `VF_TEST_REQUIRE_S3`
//! is set (as `.ci/run` does), when a missing server fails it.

mod common;

use common::s3::{s3_config, start_s3};

use bytes::Bytes;
use vectorflow::crates::connectors::ObjectStorage;
use vectorflow::{Engine, EngineConfig, Pk, QueryOptions, SearchOptions};

/// The keys of the 5 nearest rows to `query`, as of `as_of` (now when `None`).
fn top5(engine: &Engine, query: &[f32], as_of: Option<u64>) -> Vec<Pk> {
    let options = SearchOptions { as_of, ..SearchOptions::new(5) };
    common::pks(&engine.search("docs", &[query.to_vec()], &options).unwrap().hits[0])
}

#[test]
fn segments_manifests_and_the_catalog_live_in_s3_and_recovery_reads_them_back() {
    let Some(s3) = start_s3() else { return };
    let dir = tempfile::tempdir().unwrap();

    // The conditional put the manifests rely on: the second create of a path fails.
    let storage = ObjectStorage::open(&s3_config(&s3.endpoint, "tests/engine"), dir.path()).unwrap();
    assert!(storage.put_if_absent("probe/v1.json", Bytes::from_static(b"1")).unwrap());
    assert!(!storage.put_if_absent("probe/v1.json", Bytes::from_static(b"2")).unwrap());
    assert_eq!(storage.get_opt("probe/v1.json").unwrap().unwrap(), Bytes::from_static(b"1"));

    let config = EngineConfig {
        seal_rows: 200,
        checkpoint_interval: None,
        compaction_interval: None,
        storage: s3_config(&s3.endpoint, "tests/engine"),
        ..EngineConfig::new(dir.path())
    };
    let query = vec![0.5f32, 0.5];
    let (deleted_ts, before_delete, now) = {
        let engine = Engine::open(config.clone()).unwrap();
        engine.create_collection(common::small_schema("docs")).unwrap();
        let rows: Vec<_> = (0..1000).map(|id| common::small_row(id, [id as f32 / 1000.0, 0.5])).collect();
        engine.insert_rows("docs", &rows).unwrap();
        engine.flush("docs").unwrap();
        let deleted_ts = engine.delete("docs", &[Pk::Int(500), Pk::Int(501)]).unwrap().ts;
        engine.flush("docs").unwrap();
        engine.insert_rows("docs", &[common::small_row(2000, [0.5, 0.5])]).unwrap();
        let result = (deleted_ts, top5(&engine, &query, Some(deleted_ts - 1)), top5(&engine, &query, None));
        assert!(engine.storage_bytes("docs").unwrap() > 0);
        engine.shutdown();
        result
    };
    assert!(!dir.path().join("store").exists(), "nothing goes to the local store when S3 is configured");

    let engine = Engine::open(config).unwrap();
    let report = engine.recovery_report();
    assert!(report.segments >= 2 && report.bytes > 0 && report.rebuilt_indexes == 0, "{report:?}");
    assert_eq!(top5(&engine, &query, Some(deleted_ts - 1)), before_delete);
    assert_eq!(top5(&engine, &query, None), now);
    assert_eq!(engine.count("docs", &QueryOptions::default()).unwrap(), 999);
    let listed = engine.storage().list("catalog").unwrap();
    assert!(!listed.is_empty(), "the catalog is in the bucket");
}
