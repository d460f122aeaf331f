//! The Milvus API with the real Milvus client: pymilvus's `MilvusClient`,
//! unchanged, against `vectorflow serve` (its `milvus.proto.milvus.MilvusService`
//! shares the port of `vectorflow.v1`). The client side is
//! `tests/pymilvus/test_milvus_client.py`, run by the Python of a venv with
//! pymilvus (installed by `.ci/run` into /opt/vectorflow-milvus); it also
//! compares pymilvus's answers with the `vectorflow.v1` CLI's on the same
//! server.
//!
//! The Python is `$VF_TEST_PYMILVUS`, or that venv's. Without one that can
//! import pymilvus the test says so and passes, unless
//! `VF_TEST_REQUIRE_PYMILVUS` is set (as `.ci/run` does), when it fails.

mod common;

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

/// The whole Python suite takes well under a minute; past this it is hung.
const SUITE_TIMEOUT: Duration = Duration::from_secs(300);

/// The venv's Python, if it imports pymilvus; otherwise why not.
fn python() -> Result<PathBuf, String> {
    let path = std::env::var_os("VF_TEST_PYMILVUS")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/opt/vectorflow-milvus/venv/bin/python"));
    if !path.exists() {
        return Err(format!("{} does not exist", path.display()));
    }
    let probe = Command::new(&path)
        .args(["-c", "import pymilvus; print(pymilvus.__version__)"])
        .env("PYTHONDONTWRITEBYTECODE", "1")
        .output()
        .map_err(|e| format!("{} does not run: {e}", path.display()))?;
    if !probe.status.success() {
        return Err(format!(
            "{} cannot import pymilvus: {}",
            path.display(),
            String::from_utf8_lossy(&probe.stderr).trim()
        ));
    }
    Ok(path)
}

/// Reads a child's pipe to the end on a thread of its own, so a full pipe
/// never blocks the child.
fn drain(mut pipe: impl Read + Send + 'static) -> std::thread::JoinHandle<String> {
    std::thread::spawn(move || {
        let mut bytes = Vec::new();
        let _ = pipe.read_to_end(&mut bytes);
        String::from_utf8_lossy(&bytes).into_owned()
    })
}

/// Waits for `child` up to `timeout`; kills it past that (`None`).
fn wait_within(child: &mut Child, timeout: Duration) -> Option<ExitStatus> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(status) = child.try_wait().expect("the suite's status") {
            return Some(status);
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            return None;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn pymilvus_milvus_client_works_against_the_server() {
    let python = match python() {
        Ok(python) => python,
        Err(why) => {
            assert!(
                std::env::var_os("VF_TEST_REQUIRE_PYMILVUS").is_none(),
                "VF_TEST_REQUIRE_PYMILVUS is set but there is no Python with pymilvus ({why}): \
                 install it (see .ci/run) or set VF_TEST_PYMILVUS"
            );
            eprintln!("no Python with pymilvus ({why}; see .ci/run); the pymilvus test does not run here");
            return;
        }
    };
    let dir = tempfile::tempdir().expect("a temporary directory");
    let server = common::ServerProcess::start(dir.path(), &[]);
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/pymilvus/test_milvus_client.py");
    let mut child = Command::new(&python)
        .arg(&script)
        .args(["--uri", &format!("http://{}", server.address)])
        .args(["--vectorflow-bin", env!("CARGO_BIN_EXE_vectorflow")])
        .args(["--vectorflow-addr", &server.address])
        .env("PYTHONUNBUFFERED", "1")
        .env("PYTHONDONTWRITEBYTECODE", "1")
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("the pymilvus suite starts");
    let stdout = drain(child.stdout.take().expect("the suite's stdout"));
    let stderr = drain(child.stderr.take().expect("the suite's stderr"));
    let status = wait_within(&mut child, SUITE_TIMEOUT);
    let stdout = stdout.join().expect("the suite's stdout is read");
    let stderr = stderr.join().expect("the suite's stderr is read");
    drop(server);
    let output = format!("--- stdout ---\n{stdout}\n--- stderr ---\n{stderr}");
    let Some(status) = status else {
        panic!("the pymilvus suite did not finish within {SUITE_TIMEOUT:?} and was killed\n{output}");
    };
    assert!(status.success(), "the pymilvus suite failed ({status})\n{output}");
    println!("{output}");
}

/// Calls `/milvus.proto.milvus.MilvusService/{method}` with tonic's generic
/// client (our build generates no Milvus client: its `Connect` RPC would
/// clash with the client's own `connect`).
async fn milvus_call<Req, Resp>(
    channel: tonic::transport::Channel,
    method: &str,
    request: tonic::Request<Req>,
) -> Result<Resp, tonic::Status>
where
    Req: prost::Message + Send + Sync + 'static,
    Resp: prost::Message + Default + Send + Sync + 'static,
{
    let mut client = tonic::client::Grpc::new(channel);
    client.ready().await.map_err(|e| tonic::Status::unavailable(e.to_string()))?;
    let path = http::uri::PathAndQuery::try_from(format!("/milvus.proto.milvus.MilvusService/{method}"))
        .expect("a valid path");
    let codec = tonic_prost::ProstCodec::<Req, Resp>::default();
    client.unary(request, path, codec).await.map(tonic::Response::into_inner)
}

#[test]
fn milvus_wire_errors_are_in_band_and_unknown_methods_unimplemented() {
    use vectorflow_proto::milvus::pb::{common as mc, milvus as mp};
    let dir = tempfile::tempdir().unwrap();
    let server = common::ServerProcess::start(dir.path(), &[]);
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build().unwrap();
    runtime.block_on(async {
        let channel = tonic::transport::Channel::from_shared(format!("http://{}", server.address))
            .unwrap()
            .connect()
            .await
            .unwrap();
        // A method of Milvus we do not serve: UNIMPLEMENTED, which pymilvus does not retry.
        let unknown = milvus_call::<mp::GetVersionRequest, mp::GetVersionResponse>(
            channel.clone(),
            "CreateDatabase",
            tonic::Request::new(mp::GetVersionRequest {}),
        )
        .await
        .unwrap_err();
        assert_eq!(unknown.code(), tonic::Code::Unimplemented, "{unknown:?}");
        // A missing collection: an OK response whose status says code 100.
        let describe = mp::DescribeCollectionRequest { collection_name: "absent".into(), ..Default::default() };
        let missing: mp::DescribeCollectionResponse =
            milvus_call(channel.clone(), "DescribeCollection", tonic::Request::new(describe)).await.unwrap();
        let status = missing.status.unwrap();
        assert_eq!((status.code, status.error_code), (100, mc::ErrorCode::CollectionNotExists as i32));
        assert!(status.reason.contains("absent"), "{}", status.reason);
        // A quick collection, then a search whose placeholder group is not one.
        let schema = vectorflow_proto::milvus::pb::schema::CollectionSchema {
            name: "c".into(),
            fields: vec![
                vectorflow_proto::milvus::pb::schema::FieldSchema {
                    name: "id".into(),
                    is_primary_key: true,
                    data_type: vectorflow_proto::milvus::pb::schema::DataType::Int64 as i32,
                    ..Default::default()
                },
                vectorflow_proto::milvus::pb::schema::FieldSchema {
                    name: "vector".into(),
                    data_type: vectorflow_proto::milvus::pb::schema::DataType::FloatVector as i32,
                    type_params: vec![mc::KeyValuePair { key: "dim".into(), value: "4".into() }],
                    ..Default::default()
                },
            ],
            enable_dynamic_field: true,
            ..Default::default()
        };
        let create = mp::CreateCollectionRequest {
            collection_name: "c".into(),
            schema: prost::Message::encode_to_vec(&schema),
            consistency_level: mc::ConsistencyLevel::Strong as i32,
            ..Default::default()
        };
        let created: mc::Status =
            milvus_call(channel.clone(), "CreateCollection", tonic::Request::new(create.clone())).await.unwrap();
        assert_eq!(created.code, 0, "{}", created.reason);
        // The same schema again is a success, as in Milvus.
        let again: mc::Status =
            milvus_call(channel.clone(), "CreateCollection", tonic::Request::new(create)).await.unwrap();
        assert_eq!(again.code, 0, "{}", again.reason);
        let load = mp::LoadCollectionRequest { collection_name: "c".into(), ..Default::default() };
        let refused: mc::Status =
            milvus_call(channel.clone(), "LoadCollection", tonic::Request::new(load)).await.unwrap();
        assert_eq!(refused.code, 700, "a load before any vector index: {}", refused.reason);
        let search = mp::SearchRequest {
            collection_name: "c".into(),
            placeholder_group: vec![0xff, 0x01],
            nq: 1,
            ..Default::default()
        };
        let not_loaded: mp::SearchResults =
            milvus_call(channel.clone(), "Search", tonic::Request::new(search.clone())).await.unwrap();
        assert_eq!(not_loaded.status.unwrap().code, 101);
        // Another database: refused in-band, naming it.
        let mut elsewhere = tonic::Request::new(mp::ShowCollectionsRequest::default());
        elsewhere.metadata_mut().insert("dbname", "analytics".parse().unwrap());
        let shown: mp::ShowCollectionsResponse =
            milvus_call(channel.clone(), "ShowCollections", elsewhere).await.unwrap();
        let status = shown.status.unwrap();
        assert_eq!(status.code, 800);
        assert!(status.reason.contains("analytics"), "{}", status.reason);
    });
}

/// pymilvus's credentials (`token="user:password"`, sent as bare base64 in
/// `authorization`) reach the same role check as every other call.
#[test]
fn pymilvus_credentials_pass_the_role_check() {
    let python = match python() {
        Ok(python) => python,
        Err(why) => {
            assert!(std::env::var_os("VF_TEST_REQUIRE_PYMILVUS").is_none(), "no Python with pymilvus: {why}");
            eprintln!("skipped: {why}");
            return;
        }
    };
    let dir = tempfile::tempdir().unwrap();
    let mut toml = String::from("[auth]\nenabled = true\n");
    for (name, role) in [("reader", "read"), ("root", "admin")] {
        let hash = common::phc(&format!("{name}-pw"));
        toml.push_str(&format!("[[auth.users]]\nname = \"{name}\"\npassword_hash = \"{hash}\"\nrole = \"{role}\"\n"));
    }
    let config = dir.path().join("auth.toml");
    std::fs::write(&config, toml).unwrap();
    let server = common::ServerProcess::start(&dir.path().join("data"), &["--config", config.to_str().unwrap()]);
    let script = r#"
import sys
from pymilvus import MilvusClient
uri = sys.argv[1]
root = MilvusClient(uri=uri, token="root:root-pw", timeout=20)
root.create_collection("guarded", dimension=4, timeout=20)
reader = MilvusClient(uri=uri, token="reader:reader-pw", timeout=20)
assert reader.list_collections(timeout=20) == ["guarded"]
try:
    reader.drop_collection("guarded", timeout=5)
    sys.exit("a reader dropped a collection")
except Exception as e:  # PERMISSION_DENIED comes as a gRPC error, as from Milvus
    assert "permission" in str(e).lower(), e
try:
    MilvusClient(uri=uri, token="root:wrong", timeout=5).list_collections(timeout=5)
    sys.exit("a wrong password was accepted")
except Exception as e:  # pymilvus reports a refused Connect as a failed connection
    assert any(w in str(e).lower() for w in ("credentials", "unauthenticated", "fail connecting")), e
print("ok")
"#;
    let output = Command::new(python)
        .args(["-c", script, &format!("http://{}", server.address)])
        .env("PYTHONDONTWRITEBYTECODE", "1")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success() && stdout.contains("ok"), "stdout:\n{stdout}\nstderr:\n{stderr}");
}
