//! A real Kafka-protocol broker for tests: `tansu` (installed by `.ci/run`
//! into /opt/vectorflow-kafka) with SQLite storage, started per test on a
//! free loopback port and stopped by PID.
//!
//! The broker binary is `$VF_TEST_TANSU`, or tansu in that directory.
//! Without one a test says so and passes, unless `VF_TEST_REQUIRE_KAFKA` is
//! set (as `.ci/run` does), when a missing broker fails it.

use std::collections::BTreeMap;
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use rdkafka::ClientConfig;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Headers, Message};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::topic_partition_list::{Offset, TopicPartitionList};

/// A tansu broker on a free loopback port with its SQLite file in `dir`;
/// killed when dropped.
pub struct Broker {
    child: Option<Child>,
    pub port: u16,
    dir: PathBuf,
    /// Held while the broker lives (see `ONE_AT_A_TIME`).
    _serial: std::sync::MutexGuard<'static, ()>,
}

impl Drop for Broker {
    fn drop(&mut self) {
        self.kill();
    }
}

/// The Kafka tests run one at a time: each starts a broker, and several
/// brokers and engines at once on a 2-core machine starve each other.
static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());

pub fn broker_binary() -> Option<PathBuf> {
    let path = std::env::var_os("VF_TEST_TANSU")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/opt/vectorflow-kafka/bin/tansu"));
    path.exists().then_some(path)
}

impl Broker {
    /// Starts a broker, or `None` (the test then passes without running)
    /// when none is installed and `VF_TEST_REQUIRE_KAFKA` is not set.
    pub fn start(dir: &Path) -> Option<Broker> {
        if broker_binary().is_none() {
            assert!(
                std::env::var_os("VF_TEST_REQUIRE_KAFKA").is_none(),
                "VF_TEST_REQUIRE_KAFKA is set but no broker: install tansu (see .ci/run) or set VF_TEST_TANSU"
            );
            eprintln!("no Kafka-protocol broker found (see .ci/run); this Kafka test does not run here");
            return None;
        }
        let serial = ONE_AT_A_TIME.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        let port = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let mut broker = Broker { child: None, port, dir: dir.to_path_buf(), _serial: serial };
        broker.restart();
        Some(broker)
    }

    pub fn bootstrap(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// (Re)starts the broker on the same port and storage.
    pub fn restart(&mut self) {
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
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    pub fn create_topic(&self, topic: &str, partitions: i32) {
        let admin: AdminClient<DefaultClientContext> =
            ClientConfig::new().set("bootstrap.servers", self.bootstrap()).create().unwrap();
        let new = NewTopic::new(topic, partitions, TopicReplication::Fixed(1));
        let results = futures::executor::block_on(admin.create_topics([&new], &AdminOptions::new())).unwrap();
        for result in results {
            result.unwrap();
        }
    }

    /// A plain producer, as any Kafka user has (not through Vectorflow).
    pub fn producer(&self) -> FutureProducer {
        ClientConfig::new()
            .set("bootstrap.servers", self.bootstrap())
            .set("linger.ms", "5")
            .set("message.timeout.ms", "300000")
            .create()
            .unwrap()
    }

    /// Every record of `topic` from the beginning: (key, value, headers).
    pub fn read_all(&self, topic: &str, partitions: i32) -> Vec<Record> {
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

/// A record read back: key, value and headers.
pub type Record = (Option<Vec<u8>>, Option<Vec<u8>>, BTreeMap<String, String>);

/// Sends every record and waits for all acknowledgements.
pub fn produce(producer: &FutureProducer, topic: &str, records: &[(String, Option<String>)]) {
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
