//! Cluster mode through the real binary: `vectorflow cluster local` runs 3
//! processes × 2 workers on loopback over a tansu broker and moto's S3
//! server; clients talk gRPC to every process.

mod common;

use std::collections::BTreeMap;
use std::net::TcpListener;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::kafka::{Broker, produce};
use common::s3::{S3Server, s3_config, start_s3};
use tonic::transport::{Channel, Endpoint};
use vectorflow::{Engine, EngineConfig, KafkaConfig, QueryOptions, SearchOptions, SearchPlan};
use vectorflow_proto::v1::vectorflow_client::VectorflowClient;
use vectorflow_proto::v1::{self, field_data::Values};
use vectorflow_proto::{pack_vectors, pks_from_proto, pks_to_proto};

type Client = VectorflowClient<Channel>;

const PROCESSES: usize = 3;
const DIM: usize = 4;
const TOPIC: &str = "vectorflow.docs";

/// A running `vectorflow cluster local`; it and its processes are killed when dropped.
struct Cluster {
    launcher: Child,
    grpc_port: u16,
}

impl Cluster {
    fn start(dir: &Path, broker: &Broker, s3: &S3Server) -> Cluster {
        let (grpc_port, exchange_port) = (free_ports(PROCESSES), free_ports(PROCESSES));
        let launcher = Command::new(env!("CARGO_BIN_EXE_vectorflow"))
            .args(["cluster", "local", "--processes", &PROCESSES.to_string(), "--workers", "2"])
            .args(["--kafka", &broker.bootstrap(), "--storage", "s3://vectorflow/cluster"])
            .arg("--data-dir")
            .arg(dir)
            .args(["--grpc-port", &grpc_port.to_string(), "--exchange-port", &exchange_port.to_string()])
            .args(["--", "--seal-rows", "300", "--checkpoint-interval-ms", "400"])
            .envs(storage_env(s3))
            .env("RUST_LOG", "warn")
            .env("RUST_BACKTRACE", "0")
            .stdout(Stdio::null())
            .spawn()
            .expect("the launcher starts");
        Cluster { launcher, grpc_port }
    }

    /// A client of process `process`, once it serves (after a restart too).
    async fn client(&self, process: usize) -> Client {
        let address = format!("http://127.0.0.1:{}", self.grpc_port + process as u16);
        let endpoint = Endpoint::from_shared(address).unwrap();
        let deadline = Instant::now() + Duration::from_secs(180);
        loop {
            if let Ok(channel) = endpoint.connect().await {
                let mut client = VectorflowClient::new(channel).max_decoding_message_size(1 << 30);
                if client.list_collections(v1::Empty {}).await.is_ok() {
                    return client;
                }
            }
            assert!(Instant::now() < deadline, "process {process} does not serve");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    async fn clients(&self) -> Vec<Client> {
        let mut clients = Vec::new();
        for process in 0..PROCESSES {
            clients.push(self.client(process).await);
        }
        clients
    }

    /// The PID of the `serve` process `process` the launcher runs now.
    fn process_pid(&self, process: usize) -> u32 {
        let children = std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children", pid = self.launcher.id()))
            .unwrap_or_default();
        children
            .split_whitespace()
            .filter_map(|pid| pid.parse::<u32>().ok())
            .find(|pid| {
                let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
                let args: Vec<&[u8]> = cmdline.split(|b| *b == 0).collect();
                args.windows(2).any(|w| w[0] == b"--process" && w[1] == process.to_string().as_bytes())
            })
            .unwrap_or_else(|| panic!("no process {process} among the launcher's children {children:?}"))
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        let children = std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children", pid = self.launcher.id()));
        let _ = self.launcher.kill();
        for pid in children.unwrap_or_default().split_whitespace() {
            let _ = Command::new("kill").args(["-KILL", pid]).status();
        }
        let _ = self.launcher.wait();
    }
}

/// The first of `count` consecutive free loopback ports.
fn free_ports(count: usize) -> u16 {
    loop {
        let first = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        if first as usize + count > u16::MAX as usize {
            continue;
        }
        let all_free = (first..first + count as u16).all(|port| TcpListener::bind(("127.0.0.1", port)).is_ok());
        if all_free {
            return first;
        }
    }
}

/// The S3 settings of `s3_config` as `serve` reads them from the environment.
fn storage_env(s3: &S3Server) -> Vec<(&'static str, String)> {
    let config = s3_config(&s3.endpoint, "cluster");
    vec![
        ("VECTORFLOW_STORAGE__ENDPOINT", config.endpoint.unwrap_or_default()),
        ("VECTORFLOW_STORAGE__REGION", config.region.unwrap_or_default()),
        ("VECTORFLOW_STORAGE__ACCESS_KEY_ID", config.access_key_id.unwrap_or_default()),
        ("VECTORFLOW_STORAGE__SECRET_ACCESS_KEY", config.secret_access_key.unwrap_or_default()),
        ("VECTORFLOW_STORAGE__ALLOW_HTTP", "true".into()),
    ]
}

fn proto_schema() -> v1::CollectionSchema {
    common::wire::schema("docs", DIM as u32, vec![common::wire::field("n", v1::DataType::Int64)])
}

fn engine_schema() -> vectorflow::CollectionSchema {
    vectorflow::CollectionSchema::new(
        "docs",
        vec![
            vectorflow::FieldSchema::int64_primary("id", false),
            vectorflow::FieldSchema::vector("v", DIM, vectorflow::Metric::L2),
            vectorflow::FieldSchema::new("n", vectorflow::DataType::Int64),
        ],
    )
}

fn vector(id: i64, n: i64) -> Vec<f32> {
    vec![(id % 97) as f32, (n % 89) as f32 * 0.5, (id % 13) as f32 * 2.0, 1.0]
}

fn json_row(id: i64, n: i64) -> String {
    serde_json::json!({ "id": id, "v": vector(id, n), "n": n }).to_string()
}

/// Upserts over `keys` keys with every ninth record a tombstone, and the
/// rows they leave (id → n).
fn records(from: i64, count: i64, keys: i64) -> Vec<(String, Option<String>)> {
    (from..from + count)
        .map(|i| {
            let id = (i * 31) % keys;
            (id.to_string(), (i % 9 != 8).then(|| json_row(id, i)))
        })
        .collect()
}

fn apply(model: &mut BTreeMap<i64, i64>, records: &[(String, Option<String>)]) {
    for (key, value) in records {
        let id: i64 = key.parse().unwrap();
        match value {
            Some(value) => {
                model.insert(id, serde_json::from_str::<serde_json::Value>(value).unwrap()["n"].as_i64().unwrap())
            }
            None => model.remove(&id),
        };
    }
}

fn read(consistency: v1::ConsistencyLevel, as_of: u64) -> Option<v1::ReadOptions> {
    Some(v1::ReadOptions { consistency: consistency as i32, as_of, guarantee_ts: 0 })
}

/// id → n of every row (as of `as_of`; 0: a Strong read now).
async fn rows(client: &mut Client, as_of: u64) -> BTreeMap<i64, i64> {
    let request = v1::QueryRequest {
        collection: "docs".into(),
        output_fields: vec!["id".into(), "n".into()],
        read: read(v1::ConsistencyLevel::Strong, as_of),
        ..Default::default()
    };
    let answer = client.query(request).await.unwrap().into_inner();
    let column = |name: &str| -> Vec<i64> {
        match answer.columns.iter().find(|c| c.name == name).and_then(|c| c.values.clone()) {
            Some(Values::Ints(ints)) => ints.values,
            other => panic!("column {name}: {other:?}"),
        }
    };
    column("id").into_iter().zip(column("n")).collect()
}

/// A Strong read's time, to ask again later.
async fn now(client: &mut Client) -> u64 {
    let request = v1::StatsRequest { collection: "docs".into(), consistency: v1::ConsistencyLevel::Strong as i32 };
    client.get_stats(request).await.unwrap().into_inner().read_ts
}

/// The keys and distances of the 10 nearest rows to `query`.
async fn nearest(client: &mut Client, query: &[f32]) -> Vec<(i64, f32)> {
    let request = v1::SearchRequest {
        collection: "docs".into(),
        vectors: Some(pack_vectors(&[query.to_vec()])),
        k: 10,
        read: read(v1::ConsistencyLevel::Strong, 0),
        ..Default::default()
    };
    let hits = client.search(request).await.unwrap().into_inner().results.remove(0);
    let keys = pks_from_proto(hits.keys).unwrap().into_iter().map(|pk| common::pk_int(&pk));
    keys.zip(hits.scores).collect()
}

async fn count(client: &mut Client, filter: &str) -> u64 {
    let request = v1::QueryRequest {
        collection: "docs".into(),
        filter: filter.into(),
        count_only: true,
        read: read(v1::ConsistencyLevel::Strong, 0),
        ..Default::default()
    };
    client.query(request).await.unwrap().into_inner().count
}

/// The first column of an SQL statement's answer, as integers.
async fn sql(client: &mut Client, statement: &str) -> Vec<i64> {
    let mut stream = client.sql(v1::SqlRequest { query: statement.into() }).await.unwrap().into_inner();
    let mut values = Vec::new();
    while let Some(batch) = stream.message().await.unwrap() {
        let reader = arrow::ipc::reader::StreamReader::try_new(std::io::Cursor::new(batch.arrow_ipc), None).unwrap();
        for batch in reader {
            let batch = batch.unwrap();
            let column = arrow::compute::cast(batch.column(0), &arrow::datatypes::DataType::Int64).unwrap();
            let ints = column.as_any().downcast_ref::<arrow::array::Int64Array>().unwrap();
            values.extend(ints.values().iter().copied());
        }
    }
    values
}

async fn write(client: &mut Client, ids: &[i64], n: i64) -> u64 {
    let columns = vec![
        common::wire::ints("id", ids.to_vec()),
        common::wire::vectors("v", &ids.iter().map(|&id| vector(id, n)).collect::<Vec<_>>()),
        common::wire::ints("n", vec![n; ids.len()]),
    ];
    client.upsert(common::wire::write("docs", columns)).await.unwrap().into_inner().ts
}

/// A single-process engine reading the same topic, searching exactly.
fn reference_engine(dir: &Path, broker: &Broker) -> Engine {
    let config = EngineConfig {
        workers: 2,
        kafka: Some(KafkaConfig { bootstrap_servers: broker.bootstrap(), ..KafkaConfig::default() }),
        search_plan: SearchPlan { exact_below_rows: usize::MAX, ..SearchPlan::default() },
        ..EngineConfig::new(dir)
    };
    let engine = Engine::open(config).unwrap();
    engine.create_collection(engine_schema()).unwrap();
    engine
}

/// A broker, an S3 server and a cluster on them, with `docs` created
/// through process `creator`; `None` where the broker or S3 server is missing.
struct Running {
    broker: Broker,
    s3: S3Server,
    cluster: Cluster,
    runtime: tokio::runtime::Runtime,
    clients: Vec<Client>,
}

fn start(dir: &Path, creator: usize) -> Option<Running> {
    let broker = Broker::start(dir)?;
    let s3 = start_s3()?;
    let cluster = Cluster::start(&dir.join("cluster"), &broker, &s3);
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let mut clients = runtime.block_on(cluster.clients());
    let create = v1::CreateCollectionRequest { schema: Some(proto_schema()) };
    runtime.block_on(clients[creator].create_collection(create)).unwrap();
    Some(Running { broker, s3, cluster, runtime, clients })
}

/// Records from a plain producer and writes through every process's API,
/// while reads go to every process and a read replica follows: at the end
/// every process answers exact searches, queries, counts and SQL as one
/// engine fed the same topic does; each process reads its own writes
/// (Strong) and the others' at once; answers as of times read during
/// ingestion are equal at every process and on the replica.
#[test]
fn three_processes_answer_as_one_engine_fed_the_same_topic() {
    let dir = tempfile::tempdir().unwrap();
    let Some(Running { broker, s3, cluster: _cluster, runtime, mut clients }) = start(dir.path(), 1) else { return };
    // Known everywhere at once: the create waits for every process.
    for client in clients.iter_mut() {
        let info = runtime.block_on(client.describe_collection(v1::CollectionRef { name: "docs".into() })).unwrap();
        assert_eq!(info.into_inner().schema.map(|s| s.fields.len()), Some(3));
    }

    let producer = broker.producer();
    let mut model = BTreeMap::new();
    let mut remembered: Vec<(u64, BTreeMap<i64, i64>)> = Vec::new();
    let mut replica = None;
    for round in 0..6i64 {
        let batch = records(round * 500, 500, 1_500);
        produce(&producer, TOPIC, &batch);
        apply(&mut model, &batch);
        // Writes through the API of each process, read back at once
        // (Strong) where written and at the next process.
        let process = round as usize % PROCESSES;
        let ids = [10_000 + round, 10_100 + round];
        runtime.block_on(write(&mut clients[process], &ids, round));
        model.extend(ids.iter().map(|&id| (id, round)));
        if round == 4 {
            let keys = pks_to_proto(&[vectorflow::Pk::Int(10_000)]);
            let delete = v1::DeleteRequest {
                collection: "docs".into(),
                target: Some(v1::delete_request::Target::Keys(keys)),
                ..Default::default()
            };
            runtime.block_on(clients[2].delete(delete)).unwrap();
            model.remove(&10_000);
        }
        for reader in [process, (process + 1) % PROCESSES] {
            assert_eq!(runtime.block_on(rows(&mut clients[reader], 0)), model, "round {round}, process {reader}");
        }
        let ts = runtime.block_on(now(&mut clients[(process + 2) % PROCESSES]));
        remembered.push((ts, model.clone()));
        if round == 2 {
            let flags = ["--kafka", &broker.bootstrap(), "--storage", "s3://vectorflow/cluster", "--role", "replica"];
            let server = common::ServerProcess::start_with_env(&dir.path().join("replica"), &flags, &storage_env(&s3));
            replica = Some(server);
        }
    }

    let engine = reference_engine(&dir.path().join("reference"), &broker);
    let everything = QueryOptions { output_fields: vec!["n".into()], ..QueryOptions::default() };
    let reference: BTreeMap<i64, i64> = engine
        .query("docs", &everything)
        .unwrap()
        .into_iter()
        .map(|row| (common::int(&row["id"]), common::int(&row["n"])))
        .collect();
    assert_eq!(reference, model, "the reference engine read the topic");
    let queries: Vec<Vec<f32>> = [(3, 7), (50, 500), (96, 88)].iter().map(|&(id, n)| vector(id, n)).collect();
    let exact: Vec<Vec<(i64, f32)>> = queries
        .iter()
        .map(|q| {
            let found = engine.search("docs", std::slice::from_ref(q), &SearchOptions::new(10)).unwrap();
            found.hits[0].iter().map(|h| (common::pk_int(&h.pk), h.score)).collect()
        })
        .collect();
    let filtered = engine
        .count("docs", &QueryOptions { filter: Some("n % 3 == 1".into()), ..QueryOptions::default() })
        .unwrap() as u64;
    for (process, client) in clients.iter_mut().enumerate() {
        assert_eq!(runtime.block_on(rows(client, 0)), reference, "process {process}");
        for (query, expected) in queries.iter().zip(&exact) {
            let found = runtime.block_on(nearest(client, query));
            let keys = |hits: &[(i64, f32)]| hits.iter().map(|h| h.0).collect::<Vec<_>>();
            assert_eq!(keys(&found), keys(expected), "process {process}: nearest to {query:?}");
            for (got, want) in found.iter().zip(expected) {
                assert!((got.1 - want.1).abs() < 1e-4, "process {process}: {got:?} vs {want:?}");
            }
        }
        assert_eq!(runtime.block_on(count(client, "n % 3 == 1")), filtered, "process {process}");
        let ids = runtime.block_on(sql(client, "SELECT id FROM docs WHERE n % 2 = 0 ORDER BY id"));
        let expected: Vec<i64> = reference.iter().filter(|(_, n)| *n % 2 == 0).map(|(id, _)| *id).collect();
        assert_eq!(ids, expected, "process {process}: SQL");
        for (ts, answer) in &remembered {
            assert_eq!(&runtime.block_on(rows(client, *ts)), answer, "process {process} as of {ts}");
        }
    }
    // Concurrent reads entering at every process: each process numbers its
    // requests from 1, and their parts meet on the same workers.
    runtime.block_on(async {
        let mut tasks = Vec::new();
        for client in clients.iter() {
            let mut client = client.clone();
            let query = queries[0].clone();
            tasks.push(tokio::spawn(async move {
                for _ in 0..40 {
                    nearest(&mut client, &query).await;
                }
            }));
        }
        for task in tasks {
            tokio::time::timeout(Duration::from_secs(120), task).await.expect("concurrent reads answered").unwrap();
        }
    });
    let replica = replica.expect("the replica started");
    let mut to_replica = runtime.block_on(async {
        let endpoint = Endpoint::from_shared(format!("http://{}", replica.address)).unwrap();
        VectorflowClient::new(endpoint.connect().await.unwrap())
    });
    for (ts, answer) in &remembered {
        assert_eq!(&runtime.block_on(rows(&mut to_replica, *ts)), answer, "the replica as of {ts}");
    }
    engine.shutdown();
    assert!(remembered.windows(2).all(|w| w[0].1 != w[1].1), "every round changed the rows");
}

/// SIGKILL one process while a producer writes: the others stop serving,
/// the launcher restarts the cluster, every record is then applied exactly
/// once, and answers as of times read before the kill are unchanged.
#[test]
fn a_killed_process_takes_the_cluster_down_and_it_restarts_with_every_record_once() {
    let dir = tempfile::tempdir().unwrap();
    let Some(Running { broker, s3: _s3, cluster, runtime, mut clients }) = start(dir.path(), 0) else { return };

    let all = records(0, 16_000, 2_000);
    let mut model = BTreeMap::new();
    apply(&mut model, &all);
    let bootstrap = broker.bootstrap();
    let to_produce = all.clone();
    let producing = std::thread::spawn(move || {
        let producer: rdkafka::producer::FutureProducer =
            rdkafka::ClientConfig::new().set("bootstrap.servers", bootstrap).set("linger.ms", "5").create().unwrap();
        for chunk in to_produce.chunks(1_000) {
            produce(&producer, TOPIC, chunk);
            std::thread::sleep(Duration::from_millis(150));
        }
    });
    std::thread::sleep(Duration::from_millis(1_200));
    let mut remembered = Vec::new();
    for client in clients.iter_mut() {
        let ts = runtime.block_on(now(client));
        remembered.push((ts, runtime.block_on(rows(client, ts))));
    }
    let victim = cluster.process_pid(2);
    Command::new("kill").args(["-KILL", &victim.to_string()]).status().unwrap();
    // The others stop serving: UNAVAILABLE, or gone while they restart.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let answer = runtime.block_on(async {
            let request =
                v1::StatsRequest { collection: "docs".into(), consistency: v1::ConsistencyLevel::Eventually as i32 };
            tokio::time::timeout(Duration::from_secs(5), clients[0].get_stats(request)).await
        });
        match answer {
            Ok(Ok(_)) => assert!(Instant::now() < deadline, "process 0 still serves 30 s after process 2 died"),
            Ok(Err(status)) => {
                assert!(
                    matches!(status.code(), tonic::Code::Unavailable | tonic::Code::Unknown | tonic::Code::Cancelled),
                    "{status:?}"
                );
                break;
            }
            Err(_) => break,
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    producing.join().unwrap();
    let mut clients = runtime.block_on(cluster.clients());
    for (process, client) in clients.iter_mut().enumerate() {
        for (ts, answer) in &remembered {
            assert_eq!(&runtime.block_on(rows(client, *ts)), answer, "process {process} as of {ts} after the restart");
        }
        assert_eq!(runtime.block_on(rows(client, 0)), model, "process {process}: every record once");
    }
    assert!(remembered.iter().all(|(_, answer)| !answer.is_empty() && answer != &model), "the kill landed mid-stream");

    // A process stopped cleanly (SIGTERM) takes the others with it too, and
    // the cluster comes back with the same rows.
    let (stopped, other) = (cluster.process_pid(1), cluster.process_pid(0));
    Command::new("kill").args(["-TERM", &stopped.to_string()]).status().unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    while Path::new(&format!("/proc/{other}")).exists() && !is_zombie(other) {
        assert!(Instant::now() < deadline, "process 0 still runs 30 s after process 1 stopped");
        std::thread::sleep(Duration::from_millis(50));
    }
    let mut clients = runtime.block_on(cluster.clients());
    assert_eq!(runtime.block_on(rows(&mut clients[0], 0)), model);
}

/// Whether `pid` has exited and waits for its parent to reap it.
fn is_zombie(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|stat| stat.contains(") Z "))
}
