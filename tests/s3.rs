//! The object store on S3: a real S3-compatible server (moto's
//! `moto_server`, installed by `.ci/run` into /opt/vectorflow-s3) on loopback.
//!
//! The server binary is `$VF_TEST_S3_SERVER`, or moto's in that venv.
//! Without one the test says so and passes, unless `VF_TEST_REQUIRE_S3`
//! is set (as `.ci/run` does), when a missing server fails it.

mod common;

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use bytes::Bytes;
use vectorflow::crates::connectors::ObjectStorage;
use vectorflow::{Engine, EngineConfig, Pk, QueryOptions, SearchOptions, StorageConfig};

/// moto's S3 server on a free loopback port; killed when dropped.
struct S3Server {
    child: Child,
    endpoint: String,
}

impl Drop for S3Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn server_binary() -> Option<PathBuf> {
    let path = std::env::var_os("VF_TEST_S3_SERVER")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/opt/vectorflow-s3/venv/bin/moto_server"));
    path.exists().then_some(path)
}

fn start_s3() -> Option<S3Server> {
    let Some(binary) = server_binary() else {
        assert!(
            std::env::var_os("VF_TEST_REQUIRE_S3").is_none(),
            "VF_TEST_REQUIRE_S3 is set but no S3 server: install moto (see .ci/run) or set VF_TEST_S3_SERVER"
        );
        eprintln!("no S3-compatible server found (see .ci/run); the S3 test does not run here");
        return None;
    };
    let port = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let child = Command::new(binary)
        .args(["-H", "127.0.0.1", "-p", &port.to_string()])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("moto_server starts");
    let server = S3Server { child, endpoint: format!("http://127.0.0.1:{port}") };
    let deadline = Instant::now() + Duration::from_secs(30);
    while TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "moto_server did not listen within 30 s");
        std::thread::sleep(Duration::from_millis(50));
    }
    // The bucket (object_store does not create buckets).
    let mut stream = TcpStream::connect(("127.0.0.1", port)).unwrap();
    write!(
        stream,
        "PUT /vectorflow HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).unwrap();
    assert!(response.starts_with("HTTP/1.1 200"), "creating the bucket: {response}");
    Some(server)
}

fn s3_config(endpoint: &str) -> StorageConfig {
    StorageConfig {
        url: "s3://vectorflow/tests/engine".into(),
        endpoint: Some(endpoint.into()),
        region: Some("us-east-1".into()),
        access_key_id: Some("test".into()),
        secret_access_key: Some("test".into()),
        allow_http: true,
    }
}

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
    let storage = ObjectStorage::open(&s3_config(&s3.endpoint), dir.path()).unwrap();
    assert!(storage.put_if_absent("probe/v1.json", Bytes::from_static(b"1")).unwrap());
    assert!(!storage.put_if_absent("probe/v1.json", Bytes::from_static(b"2")).unwrap());
    assert_eq!(storage.get_opt("probe/v1.json").unwrap().unwrap(), Bytes::from_static(b"1"));

    let config = EngineConfig {
        seal_rows: 200,
        checkpoint_interval: None,
        compaction_interval: None,
        storage: s3_config(&s3.endpoint),
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
