//! The Kafka side of a sink: one partition of one topic that a standing
//! query's records are appended to, in order, by an idempotent producer,
//! and read back from its end when the sink resumes (the engine's `sinks`
//! module decides what the records say and where a sink resumes).
//!
//! Why no Kafka transactions: a sink's records carry their own position
//! (time, and place within that time), so the records already written tell
//! a restarted sink exactly where to go on, which needs nothing of the
//! broker beyond ordered appends to one partition.

use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use rdkafka::ClientContext;
use rdkafka::admin::AdminClient;
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::Message;
use rdkafka::producer::{BaseRecord, DeliveryResult, Producer, ProducerContext, ThreadedProducer};
use rdkafka::topic_partition_list::{Offset, TopicPartitionList};
use vectorflow_core::Result;

use crate::kafka::{KafkaConfig, client_config, consumer_settings, ensure_topic, kafka_error, partition_count};

/// Records read back per step when looking for a sink's last record; each
/// further step reads four times as many.
const FIRST_LOOK_BACK: i64 = 256;

/// Remembers the first record the brokers refused, so the sink can stop
/// and resume from what was written.
#[derive(Default)]
struct Deliveries {
    failed: Mutex<Option<String>>,
    delivered: AtomicU64,
}

impl ClientContext for Deliveries {}

impl ProducerContext for Deliveries {
    type DeliveryOpaque = ();

    fn delivery(&self, result: &DeliveryResult<'_>, _: ()) {
        if result.is_ok() {
            self.delivered.fetch_add(1, Ordering::AcqRel);
        }
        if let Err((error, _)) = result
            && let Ok(mut failed) = self.failed.lock()
            && failed.is_none()
        {
            *failed = Some(error.to_string());
        }
    }
}

/// One partition of a topic a sink appends to.
pub struct SinkTopic {
    config: KafkaConfig,
    topic: String,
    partition: i32,
    producer: ThreadedProducer<Deliveries>,
}

impl SinkTopic {
    /// The partitions of `topic`, creating it with one partition when it
    /// does not exist (a sink's records go to one partition anyway).
    pub fn prepare(config: &KafkaConfig, topic: &str) -> Result<u32> {
        let admin: AdminClient<DefaultClientContext> =
            client_config(config, &[]).create().map_err(|e| kafka_error("creating the admin client", e))?;
        let metadata = metadata_consumer(config)?;
        ensure_topic(&admin, &metadata, config, topic, 1, &[])
    }

    /// Opens partition `partition` of `topic` for appending.
    pub fn open(config: &KafkaConfig, topic: &str, partition: i32) -> Result<SinkTopic> {
        let metadata = metadata_consumer(config)?;
        let partitions = partition_count(&metadata, config, topic)?
            .ok_or_else(|| kafka_error(&format!("sink topic `{topic}`"), "does not exist"))?;
        if partition < 0 || partition as u32 >= partitions {
            return Err(kafka_error(
                &format!("sink topic `{topic}`"),
                format!("has {partitions} partitions, and the sink writes to partition {partition}"),
            ));
        }
        let producer = client_config(
            config,
            &[
                // Retries neither repeat nor reorder records.
                ("enable.idempotence", "true"),
                ("acks", "all"),
                ("linger.ms", "2"),
                // Bounded: a sink whose broker is slow waits for room.
                ("queue.buffering.max.messages", "100000"),
            ],
        )
        .create_with_context(Deliveries::default())
        .map_err(|e| kafka_error("creating the sink's producer", e))?;
        Ok(SinkTopic { config: config.clone(), topic: topic.to_string(), partition, producer })
    }

    /// The value of the last record of the partition that `is_ours` accepts
    /// (given its key and value), reading back from the end.
    pub fn last_record(&self, is_ours: impl Fn(&[u8], &[u8]) -> bool) -> Result<Option<Vec<u8>>> {
        let consumer = metadata_consumer(&self.config)?;
        let (low, high) = consumer
            .fetch_watermarks(&self.topic, self.partition, self.config.timeout())
            .map_err(|e| kafka_error(&format!("watermarks of sink topic `{}`", self.topic), e))?;
        let mut end = high;
        let mut look_back = FIRST_LOOK_BACK;
        while end > low {
            let start = (end - look_back).max(low);
            let mut found = None;
            for (key, value) in self.read_range(&consumer, start, end)? {
                if is_ours(&key, &value) {
                    found = Some(value);
                }
            }
            if found.is_some() {
                return Ok(found);
            }
            end = start;
            look_back = look_back.saturating_mul(4);
        }
        Ok(None)
    }

    /// The records at offsets `start..end` (keys and values).
    fn read_range(&self, consumer: &BaseConsumer, start: i64, end: i64) -> Result<Vec<(Vec<u8>, Vec<u8>)>> {
        let mut assignment = TopicPartitionList::new();
        assignment
            .add_partition_offset(&self.topic, self.partition, Offset::Offset(start))
            .map_err(|e| kafka_error("assigning the sink's partition", e))?;
        consumer.assign(&assignment).map_err(|e| kafka_error("assigning the sink's partition", e))?;
        let deadline = Instant::now() + self.config.timeout();
        let mut records = Vec::new();
        loop {
            let position = consumer
                .position()
                .ok()
                .and_then(|list| list.find_partition(&self.topic, self.partition).and_then(|p| p.offset().to_raw()));
            if position.is_some_and(|at| at >= end) {
                return Ok(records);
            }
            if Instant::now() >= deadline {
                return Err(kafka_error(
                    &format!("reading back sink topic `{}`", self.topic),
                    format!("offsets {start}..{end} did not arrive in {:?}", self.config.timeout()),
                ));
            }
            match consumer.poll(Duration::from_millis(100)) {
                Some(Ok(message)) => {
                    if message.offset() >= end {
                        return Ok(records);
                    }
                    let key = message.key().unwrap_or_default().to_vec();
                    let value = message.payload().unwrap_or_default().to_vec();
                    records.push((key, value));
                    if message.offset() + 1 >= end {
                        return Ok(records);
                    }
                }
                Some(Err(e)) => return Err(kafka_error(&format!("reading back sink topic `{}`", self.topic), e)),
                None => {}
            }
        }
    }

    /// Queues one record; waits while the producer's queue is full.
    pub fn send(&self, key: &str, value: &[u8]) -> Result<()> {
        self.delivery_failure()?;
        let mut record = BaseRecord::to(&self.topic).key(key).payload(value).partition(self.partition);
        let deadline = Instant::now() + self.config.timeout();
        loop {
            match self.producer.send(record) {
                Ok(()) => return Ok(()),
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), back))
                    if Instant::now() < deadline =>
                {
                    record = back;
                    std::thread::sleep(Duration::from_millis(5));
                }
                Err((e, _)) => return Err(kafka_error(&format!("writing to sink topic `{}`", self.topic), e)),
            }
        }
    }

    /// Records the brokers took since this was opened (in the order sent).
    pub fn delivered(&self) -> u64 {
        self.producer.context().delivered.load(Ordering::Acquire)
    }

    /// The first record the brokers refused, as an error.
    pub fn delivery_failure(&self) -> Result<()> {
        match self.producer.context().failed.lock().ok().and_then(|failed| failed.clone()) {
            Some(problem) => Err(kafka_error(&format!("delivering to sink topic `{}`", self.topic), problem)),
            None => Ok(()),
        }
    }

    /// Waits until every queued record is delivered (or refused).
    pub fn flush(&self, timeout: Duration) -> Result<()> {
        self.producer.flush(timeout).map_err(|e| kafka_error(&format!("flushing sink topic `{}`", self.topic), e))?;
        self.delivery_failure()
    }
}

/// A consumer with the log's settings (librdkafka reads committed records by default).
fn metadata_consumer(config: &KafkaConfig) -> Result<BaseConsumer> {
    client_config(config, &consumer_settings(config)).create().map_err(|e| kafka_error("creating the sink's reader", e))
}

impl std::fmt::Debug for SinkTopic {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SinkTopic").field("topic", &self.topic).field("partition", &self.partition).finish()
    }
}
