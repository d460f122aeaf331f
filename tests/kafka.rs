//! Kafka ingestion against a real Kafka-protocol broker on loopback:
//! `tansu` (installed by `.ci/run` into /opt/vectorflow-kafka) with SQLite
//! storage, started per test on a free port and stopped by PID.
//!
//! The broker binary is `$VF_TEST_TANSU`, or tansu in that directory.
//! Without one the tests say so and pass, unless `VF_TEST_REQUIRE_KAFKA` is
//! set (as `.ci/run` does), when a missing broker fails them.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use rdkafka::ClientConfig;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Headers, Message};
use rdkafka::producer::{FutureProducer, FutureRecord, Producer};
use rdkafka::topic_partition_list::{Offset, TopicPartitionList};
use vectorflow::{
    CollectionSchema, Consistency, DataType, Engine, EngineConfig, FieldSchema, KafkaConfig, Metric, Pk,
    QueryOptions, SearchPlan, Value, row,
};

/// A tansu broker on a free loopback port with its SQLite file in `dir`;
/// killed when dropped.
struct Broker {
    child: Option<Child>,
    port: u16,
    dir: PathBuf,
}

impl Drop for Broker {
    fn drop(&mut self) {
        self.kill();
    }
}

fn broker_binary() -> Option<PathBuf> {
    let path = std::env::var_os("VF_TEST_TANSU")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/opt/vectorflow-kafka/bin/tansu"));
    path.exists().then_some(path)
}

impl Broker {
    /// Starts a broker, or `None` (the test then passes without running)
    /// when none is installed and `VF_TEST_REQUIRE_KAFKA` is not set.
    fn start(dir: &Path) -> Option<Broker> {
        if broker_binary().is_none() {
            assert!(
                std::env::var_os("VF_TEST_REQUIRE_KAFKA").is_none(),
                "VF_TEST_REQUIRE_KAFKA is set but no broker: install tansu (see .ci/run) or set VF_TEST_TANSU"
            );
            eprintln!("no Kafka-protocol broker found (see .ci/run); this Kafka test does not run here");
            return None;
        }
        let port = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let mut broker = Broker { child: None, port, dir: dir.to_path_buf() };
        broker.restart();
        Some(broker)
    }

    fn bootstrap(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// (Re)starts the broker on the same port and storage.
    fn restart(&mut self) {
        let binary = broker_binary().expect("the broker binary");
        let url = format!("tcp://127.0.0.1:{}", self.port);
        let child = Command::new(binary)
            .args(["broker", "--listener-url", &url, "--advertised-listener-url", &url])
            // Relative to the working directory, which is `dir`.
            .args(["--storage-engine", "sqlite://tansu.db"])
            .current_dir(&self.dir)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("the broker starts");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(30);
        while TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            assert!(Instant::now() < deadline, "the broker did not listen within 30 s");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// SIGKILL, as a crash.
    fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    fn create_topic(&self, topic: &str, partitions: i32) {
        let admin: AdminClient<DefaultClientContext> =
            ClientConfig::new().set("bootstrap.servers", self.bootstrap()).create().unwrap();
        let new = NewTopic::new(topic, partitions, TopicReplication::Fixed(1));
        let results = futures::executor::block_on(admin.create_topics([&new], &AdminOptions::new())).unwrap();
        for result in results {
            result.unwrap();
        }
    }

    /// A plain producer, as any Kafka user has (not through Vectorflow).
    fn producer(&self) -> FutureProducer {
        ClientConfig::new()
            .set("bootstrap.servers", self.bootstrap())
            .set("linger.ms", "5")
            .set("message.timeout.ms", "60000")
            .create()
            .unwrap()
    }

    /// Every record of `topic` from the beginning: (key, value, headers).
    fn read_all(&self, topic: &str, partitions: i32) -> Vec<(Option<Vec<u8>>, Option<Vec<u8>>, BTreeMap<String, String>)> {
        let consumer: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", self.bootstrap())
            .set("group.id", "test-reader")
            .set("fetch.wait.max.ms", "5")
            .create()
            .unwrap();
        let mut list = TopicPartitionList::new();
        let mut ends = BTreeMap::new();
        for p in 0..partitions {
            list.add_partition_offset(topic, p, Offset::Beginning).unwrap();
            let (_, high) = consumer.fetch_watermarks(topic, p, Duration::from_secs(10)).unwrap();
            ends.insert(p, high);
        }
        consumer.assign(&list).unwrap();
        let total: i64 = ends.values().sum();
        let mut records = Vec::new();
        let deadline = Instant::now() + Duration::from_secs(60);
        while (records.len() as i64) < total {
            assert!(Instant::now() < deadline, "read {} of {total} records of {topic}", records.len());
            let Some(message) = consumer.poll(Duration::from_millis(100)) else { continue };
            let message = message.unwrap();
            let headers = message
                .headers()
                .map(|h| {
                    h.iter()
                        .map(|h| (h.key.to_string(), String::from_utf8_lossy(h.value.unwrap_or_default()).into_owned()))
                        .collect()
                })
                .unwrap_or_default();
            records.push((message.key().map(<[u8]>::to_vec), message.payload().map(<[u8]>::to_vec), headers));
        }
        records
    }
}

/// Sends every record and waits for all acknowledgements.
fn produce(producer: &FutureProducer, topic: &str, records: &[(String, Option<String>)]) {
    let mut deliveries = Vec::with_capacity(records.len());
    for (key, value) in records {
        let mut record = FutureRecord::<str, str>::to(topic).key(key.as_str());
        if let Some(value) = value {
            record = record.payload(value.as_str());
        }
        loop {
            match producer.send_result(record) {
                Ok(delivery) => {
                    deliveries.push(delivery);
                    break;
                }
                Err((_, back)) => {
                    producer.poll(Duration::from_millis(10));
                    record = back;
                }
            }
        }
    }
    for delivery in deliveries {
        futures::executor::block_on(delivery).unwrap().unwrap();
    }
}

const DIM: usize = 4;

/// `id` int64, `v` float_vector(4) L2, `n` int64.
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

fn vector(id: i64, n: i64) -> Vec<f32> {
    vec![id as f32, n as f32, (id % 7) as f32, 1.0]
}

fn json_row(id: i64, n: i64) -> String {
    serde_json::json!({ "id": id, "v": vector(id, n), "n": n }).to_string()
}

fn kafka_engine(dir: &Path, broker: &Broker, workers: usize) -> Engine {
    let config = EngineConfig {
        workers,
        seal_rows: 2_000,
        search_plan: SearchPlan { exact_below_rows: usize::MAX, exact_below_fraction: 1.0 },
        kafka: Some(KafkaConfig { bootstrap_servers: broker.bootstrap(), ..KafkaConfig::default() }),
        checkpoint_interval: None,
        compaction_interval: None,
        ..EngineConfig::new(dir)
    };
    Engine::open(config).expect("engine opens on kafka")
}

/// Every live row as id → n, read with `consistency`.
fn live(engine: &Engine, collection: &str, consistency: Consistency) -> BTreeMap<i64, i64> {
    by_id(engine.query(collection, &everything(consistency)).unwrap())
}

fn everything(consistency: Consistency) -> QueryOptions {
    QueryOptions {
        filter: Some("id >= 0".into()),
        output_fields: vec!["id".into(), "n".into()],
        limit: Some(usize::MAX),
        consistency,
        ..Default::default()
    }
}

fn by_id(rows: Vec<BTreeMap<String, Value>>) -> BTreeMap<i64, i64> {
    rows.into_iter().map(|row| (common::int(&row["id"]), common::int(&row["n"]))).collect()
}

/// Partition counts below, equal to and above the worker count; plain
/// producers and API writes (produced to the topic by Vectorflow) together.
#[test]
fn any_partition_count_with_any_worker_count() {
    let dir = tempfile::tempdir().unwrap();
    let Some(broker) = Broker::start(dir.path()) else { return };
    let engine = kafka_engine(&dir.path().join("data"), &broker, 2);
    let producer = broker.producer();
    for partitions in [1, 2, 5] {
        let name = format!("p{partitions}");
        broker.create_topic(&format!("vectorflow.{name}"), partitions);
        engine.create_collection(schema(&name)).unwrap();
        let mut reference = BTreeMap::new();
        let records: Vec<(String, Option<String>)> = (0..1_000)
            .map(|i| {
                let id = i % 700;
                reference.insert(id, i);
                (id.to_string(), Some(json_row(id, i)))
            })
            .collect();
        produce(&producer, &format!("vectorflow.{name}"), &records);
        // Strong: everything the broker acknowledged before the read.
        assert_eq!(live(&engine, &name, Consistency::Strong), reference, "{partitions} partitions");

        // API writes go through the topic and come back with their time.
        let session = engine.session();
        let rows: Vec<_> = (1_000..1_100).map(|id| row([("id", id.into()), ("v", vector(id, 1).into()), ("n", 1.into())])).collect();
        let written = session.insert_rows(&name, &rows).unwrap();
        assert_eq!(written.pks.len(), 100);
        for id in 1_000..1_100 {
            reference.insert(id, 1);
        }
        let deleted = session.delete(&name, &[Pk::Int(0), Pk::Int(1_000)]).unwrap();
        assert!(deleted.ts > written.ts);
        reference.remove(&0);
        reference.remove(&1_000);
        let seen = session.query(&name, &everything(Consistency::Session)).unwrap();
        assert_eq!(by_id(seen), reference);
        // Time travel to the insert: the deletes are not there yet.
        let before_delete = engine
            .query(&name, &QueryOptions {
                filter: Some("id == 0 or id == 1000".into()),
                output_fields: vec!["id".into()],
                as_of: Some(written.ts),
                ..Default::default()
            })
            .unwrap();
        assert_eq!(before_delete.len(), 2);
        let stats = engine.ingest_stats(&name).unwrap().unwrap();
        assert_eq!(stats.partitions.len(), partitions as usize);
        assert_eq!(stats.lag(), 0);
        assert_eq!(stats.dead_letters, 0);
    }
}
