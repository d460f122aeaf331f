//! Kafka as the log: one topic per collection, read by rdkafka consumers
//! inside the dataflow (each worker reads its share of every topic's
//! partitions), written by an idempotent producer on behalf of the API.
//!
//! **Timestamps.** A record's timestamp is assigned when the source first
//! reads it, from the engine's timestamp oracle, and *bound* to its offset
//! durably (a redb table in the data directory) before the record enters the
//! dataflow. A replay after a crash reuses the bindings, so every record
//! gets the timestamp it had, and time travel answers as before the crash.
//! Producer timestamps (`CreateTime`) are not used for the dataflow time:
//! they may be skewed, repeated or set for backfills, and a partition that
//! waits for them would hold the frontier back. Because later records
//! always get later oracle timestamps, an idle partition never holds the
//! frontier back: a source may always advance to the oracle's next time.
//!
//! Records of one partition that name distinct keys share a timestamp (a
//! *run*); a run ends where a key repeats, so one key never changes twice at
//! one time. A binding is `(partition, first offset, last offset) → time`.
//!
//! **Shared bindings.** A primary also publishes each binding, and per
//! worker how far its bindings have come, to the bindings topic
//! (`kafka_bindings`); a read replica ([`Role::Replica`]) binds nothing
//! itself: it gives each record the time the primary bound it to, and its
//! sources advance only as far as the primary's frontiers.
//!
//! **Exactly once.** A checkpoint stores, per partition, the first offset
//! whose time is after the checkpoint; recovery loads the segments as of the
//! checkpoint and seeks the consumers there. Consumer-group commits are
//! made after each checkpoint for monitoring only.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::ops::Range;
use std::path::Path;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use rdkafka::ClientConfig;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, Message, OwnedHeaders, OwnedMessage};
use rdkafka::producer::{DeliveryFuture, FutureProducer, FutureRecord, Producer};
use rdkafka::topic_partition_list::{Offset, TopicPartitionList};
use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};
use serde::{Deserialize, Serialize};
use vectorflow_core::batch::{Row, WriteBatch, WriteKind};
use vectorflow_core::{CollectionId, CollectionSchema, Error, IpcBatch, Pk, Result, Role, Timestamp, Tso, Value};

use crate::kafka_bindings::{
    BindingsRecord, FRONTIER_AFTER_BINDINGS, FRONTIER_EVERY, Learned, binding_key, binding_record, frontier_record,
};
use crate::kafka_record::{Mutation, RecordFormat, decode, encode_key, encode_row};
use crate::log::{LogEntry, LogOp, LogPoll, LogReader, LogRecord};

/// `[log.kafka]` of the server configuration.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct KafkaConfig {
    /// `host:port[,host:port...]`.
    pub bootstrap_servers: String,
    /// Consumer group the checkpointed positions are committed to (for monitoring).
    pub group_id: String,
    /// A collection without an entry in `topics` reads `<topic_prefix><name>`.
    pub topic_prefix: String,
    /// Collection name → topic.
    pub topics: BTreeMap<String, String>,
    /// Collection name → record format (`json`, the default, or `debezium`).
    pub formats: BTreeMap<String, RecordFormat>,
    /// Partitions of the topics Vectorflow creates (0: one per worker).
    pub partitions: i32,
    pub replication_factor: i32,
    /// Bad records of topic `t` go to `t<dead_letter_suffix>`.
    pub dead_letter_suffix: String,
    /// librdkafka settings for every client (SASL, TLS, ...); they win over Vectorflow's.
    pub properties: BTreeMap<String, String>,
    /// Broker requests (metadata, admin, delivery) fail after this long, in milliseconds.
    pub timeout_ms: u64,
    /// The compacted topic a primary publishes its offset bindings to and
    /// read replicas follow (empty: `<topic_prefix>_bindings`). One per
    /// deployment: a primary and its replicas name the same one.
    pub bindings_topic: String,
}

impl Default for KafkaConfig {
    fn default() -> Self {
        KafkaConfig {
            bootstrap_servers: "127.0.0.1:9092".into(),
            group_id: "vectorflow".into(),
            topic_prefix: "vectorflow.".into(),
            topics: BTreeMap::new(),
            formats: BTreeMap::new(),
            partitions: 0,
            replication_factor: 1,
            dead_letter_suffix: ".dlq".into(),
            properties: BTreeMap::new(),
            timeout_ms: 10_000,
            bindings_topic: String::new(),
        }
    }
}

impl KafkaConfig {
    /// The topic collection `name` reads.
    pub fn topic_of(&self, name: &str) -> String {
        self.topics.get(name).cloned().unwrap_or_else(|| format!("{}{name}", self.topic_prefix))
    }

    /// The topic of the offset bindings.
    pub fn bindings_topic(&self) -> String {
        if self.bindings_topic.is_empty() {
            format!("{}_bindings", self.topic_prefix)
        } else {
            self.bindings_topic.clone()
        }
    }

    /// How long a broker request may take.
    pub fn timeout(&self) -> Duration {
        Duration::from_millis(self.timeout_ms.max(1))
    }
}

/// One partition's consumer lag, as the statistics report it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct PartitionLag {
    pub partition: u32,
    /// The next offset the source will read.
    pub position: u64,
    /// The broker's high watermark (the offset after the last acknowledged record).
    pub high_watermark: u64,
}

impl PartitionLag {
    pub fn lag(&self) -> u64 {
        self.high_watermark.saturating_sub(self.position)
    }
}

/// Offsets `first..=last` of a partition, read at time `ts`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Binding {
    pub first: u64,
    pub last: u64,
    pub ts: Timestamp,
}

/// Bindings: (collection, partition, first offset) → (last offset, time).
const BINDINGS: TableDefinition<(u32, u32, u64), (u64, u64)> = TableDefinition::new("bindings");

pub(crate) fn kafka_error(what: &str, e: impl std::fmt::Display) -> Error {
    Error::Unavailable(format!("kafka: {what}: {e}"))
}

fn bindings_error(e: impl std::fmt::Display) -> Error {
    Error::storage(format!("kafka offset bindings: {e}"))
}

/// What the engine knows of one collection's topic.
struct Feed {
    topic: String,
    dead_letter_topic: String,
    schema: Arc<CollectionSchema>,
    format: RecordFormat,
    partitions: Vec<PartitionState>,
    dead_letters: u64,
}

#[derive(Default)]
struct PartitionState {
    /// Every offset below is bound (and handed to the dataflow).
    next: u64,
    /// Bindings since the checkpoint, by first offset; those at or after
    /// `next` were made before a restart and are replayed as they are.
    bindings: VecDeque<Binding>,
}

impl PartitionState {
    fn binding_of(&self, offset: u64) -> Option<Binding> {
        let i = self.bindings.partition_point(|b| b.last < offset);
        self.bindings.get(i).copied().filter(|b| b.first <= offset)
    }

    /// The time of the first binding still to replay, if any.
    fn pending_ts(&self) -> Option<Timestamp> {
        let i = self.bindings.partition_point(|b| b.last < self.next);
        self.bindings.get(i).map(|b| b.ts)
    }

    /// Adds a binding learned from the bindings topic, unless it is
    /// replayed already or known (a primary republishes after a restart).
    fn learn(&mut self, binding: Binding) {
        if binding.last < self.next || self.bindings.back().is_some_and(|b| b.last >= binding.first) {
            return;
        }
        self.bindings.push_back(binding);
    }

    /// A partition another process of the cluster reads: its binding is
    /// learned, and its offsets count as read (writes and Strong reads
    /// here wait for exactly that).
    fn learn_read_elsewhere(&mut self, binding: Binding) {
        self.learn(binding);
        self.next = self.next.max(binding.last + 1);
    }
}

/// The Kafka log shared by the engine and every worker's source.
pub struct KafkaLog {
    config: KafkaConfig,
    role: Role,
    /// Names this deployment's records in the bindings topic.
    deployment: String,
    /// Every worker of the dataflow (of every process, in a cluster):
    /// partitions are assigned over all of them.
    workers: usize,
    /// The workers of this process; the others' partitions are read by
    /// other processes of the cluster, whose bindings this one learns.
    local: Range<usize>,
    tso: Tso,
    producer: FutureProducer,
    admin: AdminClient<DefaultClientContext>,
    /// Metadata, watermarks and the informational group commits.
    metadata: BaseConsumer,
    bindings: Database,
    feeds: Mutex<HashMap<CollectionId, Feed>>,
    /// Signalled whenever offsets are bound.
    bound: Condvar,
    /// Bumped when a feed is added or removed, so sources reassign.
    version: AtomicU64,
    /// What a replica or a cluster process learned from the bindings
    /// topic that it cannot use yet (frontiers, and bindings of
    /// collections it does not follow yet). Locked after `feeds`.
    learned: Mutex<Learned>,
    /// The bindings topic's offset the follower has read up to.
    learned_through: AtomicU64,
    /// Per collection, the binding keys the last checkpoint let go: the
    /// next checkpoint tombstones them in the bindings topic.
    let_go: Mutex<HashMap<CollectionId, Vec<(u32, u64)>>>,
}

impl std::fmt::Debug for KafkaLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KafkaLog").field("bootstrap_servers", &self.config.bootstrap_servers).finish()
    }
}

impl KafkaLog {
    /// Connects to the brokers (failing with a clear error when they cannot
    /// be reached) and opens the offset bindings in `dir`. A replica, and
    /// a process of a cluster, also read the bindings topic to its end
    /// before returning, and follow it from then on.
    ///
    /// `workers` counts every worker of the dataflow, `local` those of
    /// this process (all of them, but in a cluster). `deployment`
    /// (`CatalogStore::deployment_id`) names this deployment's records in
    /// the bindings topic.
    pub fn open(
        config: KafkaConfig,
        workers: usize,
        local: Range<usize>,
        dir: &Path,
        role: Role,
        deployment: String,
    ) -> Result<Arc<KafkaLog>> {
        if config.bootstrap_servers.trim().is_empty() {
            return Err(Error::argument("log.kafka.bootstrap_servers", "must name at least one broker"));
        }
        let producer: FutureProducer = client_config(
            &config,
            &[("enable.idempotence", "true"), ("acks", "all"), ("linger.ms", "1"), ("partitioner", "murmur2_random")],
        )
        .create()
        .map_err(|e| kafka_error("creating the producer", e))?;
        let admin: AdminClient<DefaultClientContext> =
            client_config(&config, &[]).create().map_err(|e| kafka_error("creating the admin client", e))?;
        let metadata: BaseConsumer = client_config(&config, &consumer_settings(&config))
            .create()
            .map_err(|e| kafka_error("creating the metadata consumer", e))?;
        metadata
            .fetch_metadata(None, config.timeout())
            .map_err(|e| kafka_error(&format!("cannot reach the brokers at `{}`", config.bootstrap_servers), e))?;
        std::fs::create_dir_all(dir)?;
        let bindings = Database::create(dir.join("bindings.redb")).map_err(bindings_error)?;
        let mut floor = 0;
        {
            let txn = bindings.begin_write().map_err(bindings_error)?;
            txn.open_table(BINDINGS).map_err(bindings_error)?;
            txn.commit().map_err(bindings_error)?;
            let read = bindings.begin_read().map_err(bindings_error)?;
            let table = read.open_table(BINDINGS).map_err(bindings_error)?;
            for item in table.iter().map_err(bindings_error)? {
                let (_, value) = item.map_err(bindings_error)?;
                floor = floor.max(value.value().1);
            }
        }
        let log = Arc::new(KafkaLog {
            config,
            role,
            deployment,
            workers: workers.max(1),
            local,
            tso: Tso::new(floor),
            producer,
            admin,
            metadata,
            bindings,
            feeds: Mutex::new(HashMap::new()),
            bound: Condvar::new(),
            version: AtomicU64::new(0),
            learned: Mutex::new(Learned::default()),
            learned_through: AtomicU64::new(0),
            let_go: Mutex::new(HashMap::new()),
        });
        let topic = log.config.bindings_topic();
        log.ensure_topic_with(&topic, 1, &[("cleanup.policy", "compact")])?;
        if role == Role::Replica || log.in_cluster() {
            log.start_following_bindings(&topic)?;
        }
        Ok(log)
    }

    /// Whether other processes read some of the partitions (a cluster).
    pub fn in_cluster(&self) -> bool {
        self.local != (0..self.workers)
    }

    /// Whether another process of the cluster reads partition `partition` of `id`.
    fn read_elsewhere(&self, id: CollectionId, partition: usize) -> bool {
        self.role == Role::Primary && !self.local.contains(&self.reader_of(id, partition))
    }

    /// A replica or a cluster process: reads the bindings topic from its start on a thread of
    /// its own, and waits until it has read what the topic holds now.
    fn start_following_bindings(self: &Arc<Self>, topic: &str) -> Result<()> {
        let consumer: BaseConsumer = client_config(&self.config, &consumer_settings(&self.config))
            .create()
            .map_err(|e| kafka_error("creating the bindings consumer", e))?;
        let mut list = TopicPartitionList::new();
        list.add_partition_offset(topic, 0, Offset::Beginning).map_err(|e| kafka_error("assignment", e))?;
        consumer.assign(&list).map_err(|e| kafka_error(&format!("reading `{topic}`"), e))?;
        let (_, end) = self
            .metadata
            .fetch_watermarks(topic, 0, self.config.timeout())
            .map_err(|e| kafka_error(&format!("watermarks of `{topic}`"), e))?;
        let (log, deployment) = (Arc::downgrade(self), self.deployment.clone());
        std::thread::Builder::new()
            .name("kafka-bindings".into())
            .spawn(move || crate::kafka_bindings::follow(log, consumer, deployment))
            .map_err(|e| Error::storage(format!("starting the bindings follower: {e}")))?;
        let end = end.max(0) as u64;
        let timeout = self.config.timeout() * 6;
        if !crate::kafka_bindings::wait_until(timeout, || self.learned_through.load(Ordering::Acquire) >= end) {
            return Err(kafka_error(
                &format!("reading the bindings topic `{topic}`"),
                format!("not read to its end (offset {end}) within {timeout:?}"),
            ));
        }
        tracing::info!(topic, records = end, "read the primary's offset bindings");
        Ok(())
    }

    /// Takes in records of the bindings topic, read through `position`: a
    /// replica every binding, a cluster process those of partitions other
    /// processes read (its own it makes).
    pub(crate) fn learn(&self, records: Vec<BindingsRecord>, position: u64) {
        if !records.is_empty()
            && let Ok(mut feeds) = self.feeds()
            && let Ok(mut learned) = self.learned.lock()
        {
            for record in records {
                match record {
                    BindingsRecord::Binding { collection, partition, binding } => {
                        self.tso.observe(binding.ts);
                        let p = partition as usize;
                        if self.role == Role::Primary && !self.read_elsewhere(collection, p) {
                            continue;
                        }
                        match feeds.get_mut(&collection) {
                            Some(feed) => {
                                if let Some(state) = feed.partitions.get_mut(p) {
                                    match self.role {
                                        Role::Replica => state.learn(binding),
                                        Role::Primary => state.learn_read_elsewhere(binding),
                                    }
                                }
                            }
                            None => learned.keep_unclaimed(collection, partition, binding),
                        }
                    }
                    BindingsRecord::Frontier { worker, workers, ts } => {
                        self.tso.observe(ts.saturating_sub(1));
                        learned.frontier_of(worker, workers, ts);
                    }
                    // Replayed bindings go as the sources pass them.
                    BindingsRecord::Forgotten => {}
                }
            }
        }
        self.learned_through.fetch_max(position, Ordering::AcqRel);
        self.bound.notify_all();
    }

    /// A replica: the time before which the primary has published every
    /// binding (0 before every primary worker has published a frontier).
    pub fn published_frontier(&self) -> Timestamp {
        self.learned.lock().map_or(0, |learned| learned.frontier())
    }

    /// The worker that reads partition `partition` of collection `id`.
    fn reader_of(&self, id: CollectionId, partition: usize) -> usize {
        (partition + id as usize) % self.workers
    }

    /// A replica: forgets the bindings kept for collections that will
    /// never be followed (dropped: ids below `next_id` the catalog does not
    /// list), which would hold the sources' frontier back.
    pub fn forget_unfollowed(&self, listed: &HashSet<CollectionId>, next_id: CollectionId) {
        if let Ok(mut learned) = self.learned.lock() {
            learned.forget_unless(|id| listed.contains(&id) || id >= next_id);
        }
    }

    /// Whether this log follows a primary's bindings instead of binding offsets itself.
    pub fn is_replica(&self) -> bool {
        self.role == Role::Replica
    }

    /// Hands records to the bindings topic (a primary); the deliveries go to `in_flight`.
    fn publish_bindings(&self, records: Vec<(String, Option<String>)>, in_flight: &mut Vec<(String, DeliveryFuture)>) {
        let topic = self.config.bindings_topic();
        let deadline = Instant::now() + self.config.timeout();
        for (key, value) in &records {
            let mut record = FutureRecord::<[u8], [u8]>::to(&topic).key(key.as_bytes());
            if let Some(value) = value {
                record = record.payload(value.as_bytes());
            }
            match self.enqueue(record, deadline) {
                Ok(delivery) => in_flight.push((topic.clone(), delivery)),
                Err(e) => tracing::error!(topic, key, "a binding could not be published (replicas wait for it): {e}"),
            }
        }
    }

    pub fn config(&self) -> &KafkaConfig {
        &self.config
    }

    /// The timestamp oracle writes and reads draw from.
    pub fn tso(&self) -> &Tso {
        &self.tso
    }

    fn feeds(&self) -> Result<MutexGuard<'_, HashMap<CollectionId, Feed>>> {
        self.feeds.lock().map_err(|_| Error::Shutdown)
    }

    /// Starts reading collection `id` from `positions` (per partition; 0, the
    /// topic's beginning, where short). Creates the topic and its dead-letter
    /// topic when they do not exist. Bindings made after `positions` before a
    /// restart are kept, to replay with their timestamps.
    pub fn register(&self, id: CollectionId, schema: Arc<CollectionSchema>, positions: &[u64]) -> Result<()> {
        let topic = self.config.topic_of(&schema.name);
        let dead_letter_topic = format!("{topic}{}", self.config.dead_letter_suffix);
        let partitions = self.ensure_topic(&topic, self.default_partitions())?;
        self.ensure_topic(&dead_letter_topic, 1)?;
        let mut states: Vec<PartitionState> = (0..partitions)
            .map(|p| {
                let next = positions.get(p as usize).copied().unwrap_or(0);
                PartitionState { next, bindings: VecDeque::new() }
            })
            .collect();
        let read = self.bindings.begin_read().map_err(bindings_error)?;
        let table = read.open_table(BINDINGS).map_err(bindings_error)?;
        for item in table.range((id, 0, 0)..=(id, u32::MAX, u64::MAX)).map_err(bindings_error)? {
            let (key, value) = item.map_err(bindings_error)?;
            let ((_, partition, first), (last, ts)) = (key.value(), value.value());
            if let Some(state) = states.get_mut(partition as usize)
                && last >= state.next
            {
                state.bindings.push_back(Binding { first, last, ts });
                self.tso.observe(ts);
            }
        }
        drop(table);
        drop(read);
        let format = self.config.formats.get(&schema.name).copied().unwrap_or_default();
        tracing::info!(
            collection = schema.name,
            topic,
            partitions,
            ?format,
            role = self.role.name(),
            "reading from kafka"
        );
        if self.role == Role::Primary {
            // Bindings to replay may have been made and not published before a
            // restart: publish them again (replicas skip what they know).
            let records = states
                .iter()
                .enumerate()
                .flat_map(|(p, state)| {
                    state.bindings.iter().map(move |b| binding_record(&self.deployment, id, p as u32, b))
                })
                .map(|(key, value)| (key, Some(value)))
                .collect();
            // Not awaited: the producer delivers them in the background
            // (librdkafka retries; a replica waits for what is missing).
            self.publish_bindings(records, &mut Vec::new());
        }
        let mut feed = Feed { topic, dead_letter_topic, schema, format, partitions: states, dead_letters: 0 };
        let mut feeds = self.feeds()?;
        if let Ok(mut learned) = self.learned.lock() {
            for (partition, binding) in learned.claim(id) {
                if let Some(state) = feed.partitions.get_mut(partition as usize) {
                    match self.role {
                        Role::Replica => state.learn(binding),
                        Role::Primary => state.learn_read_elsewhere(binding),
                    }
                }
            }
        }
        feeds.insert(id, feed);
        drop(feeds);
        self.version.fetch_add(1, Ordering::AcqRel);
        Ok(())
    }

    /// Stops reading a dropped collection and forgets its bindings. The
    /// topic stays: it belongs to its producers.
    pub fn unregister(&self, id: CollectionId) -> Result<()> {
        self.feeds()?.remove(&id);
        self.version.fetch_add(1, Ordering::AcqRel);
        let txn = self.bindings.begin_write().map_err(bindings_error)?;
        {
            let mut table = txn.open_table(BINDINGS).map_err(bindings_error)?;
            table.retain_in((id, 0, 0)..=(id, u32::MAX, u64::MAX), |_, _| false).map_err(bindings_error)?;
        }
        txn.commit().map_err(bindings_error)
    }

    fn default_partitions(&self) -> i32 {
        if self.config.partitions > 0 { self.config.partitions } else { self.workers as i32 }
    }

    /// Creates `topic` with `partitions` unless it exists; returns its partition count.
    fn ensure_topic(&self, topic: &str, partitions: i32) -> Result<u32> {
        self.ensure_topic_with(topic, partitions, &[])
    }

    /// [`KafkaLog::ensure_topic`] with topic settings for a topic it creates.
    fn ensure_topic_with(&self, topic: &str, partitions: i32, settings: &[(&str, &str)]) -> Result<u32> {
        ensure_topic(&self.admin, &self.metadata, &self.config, topic, partitions, settings)
    }

    /// Per partition of `id`'s topic, the first offset whose time is after
    /// `ts`: where a replay from a checkpoint at `ts` starts. Call it once
    /// the dataflow has applied everything at or before `ts`.
    pub fn positions_after(&self, id: CollectionId, ts: Timestamp) -> Result<Vec<u64>> {
        let feeds = self.feeds()?;
        let Some(feed) = feeds.get(&id) else { return Ok(Vec::new()) };
        Ok(feed
            .partitions
            .iter()
            .map(|state| {
                // Times grow with offsets: the first binding after `ts` starts the replay.
                let i = state.bindings.partition_point(|b| b.ts <= ts);
                state.bindings.get(i).map_or(state.next, |b| b.first.min(state.next))
            })
            .collect())
    }

    /// The next offset to read, per partition of `id`'s topic.
    pub fn positions(&self, id: CollectionId) -> Result<Vec<u64>> {
        Ok(self.feeds()?.get(&id).map(|f| f.partitions.iter().map(|s| s.next).collect()).unwrap_or_default())
    }

    /// Forgets the bindings a checkpoint at `positions` covers, and commits
    /// the positions to the consumer group (for monitoring tools).
    pub fn checkpointed(&self, id: CollectionId, positions: &[u64]) -> Result<()> {
        let topic = {
            let mut feeds = self.feeds()?;
            let Some(feed) = feeds.get_mut(&id) else { return Ok(()) };
            for (state, &position) in feed.partitions.iter_mut().zip(positions) {
                while state.bindings.front().is_some_and(|b| b.last < position) {
                    state.bindings.pop_front();
                }
            }
            feed.topic.clone()
        };
        let mut let_go = Vec::new();
        let txn = self.bindings.begin_write().map_err(bindings_error)?;
        {
            let mut table = txn.open_table(BINDINGS).map_err(bindings_error)?;
            for (p, &position) in positions.iter().enumerate() {
                let p = p as u32;
                table
                    .retain_in((id, p, 0)..(id, p, position), |key, v| {
                        let keep = v.0 >= position;
                        if !keep {
                            let_go.push((p, key.2));
                        }
                        keep
                    })
                    .map_err(bindings_error)?;
            }
        }
        txn.commit().map_err(bindings_error)?;
        // The bindings the previous checkpoint let go leave the bindings
        // topic now: a replica that loaded the previous manifest replays
        // from there and still finds what this checkpoint let go.
        let previous = self.let_go.lock().ok().and_then(|mut all| all.insert(id, let_go)).unwrap_or_default();
        let tombstones =
            previous.into_iter().map(|(p, first)| (binding_key(&self.deployment, id, p, first), None)).collect();
        // Not awaited: a lost tombstone only leaves a binding to compaction.
        self.publish_bindings(tombstones, &mut Vec::new());
        let mut list = TopicPartitionList::new();
        for (p, &position) in positions.iter().enumerate() {
            list.add_partition_offset(&topic, p as i32, Offset::Offset(position as i64))
                .map_err(|e| kafka_error("commit list", e))?;
        }
        if let Err(e) = self.metadata.commit(&list, CommitMode::Async) {
            tracing::debug!(topic, "informational offset commit failed: {e}");
        }
        Ok(())
    }

    /// Waits until the sources have read every record the brokers had
    /// acknowledged for `id`'s topic when this was called (a Strong read's
    /// precondition). Asks the brokers for the high watermarks.
    pub fn sync(&self, id: CollectionId, timeout: Duration) -> Result<()> {
        let targets = self.high_watermarks(id)?;
        self.wait_for(id, &targets, timeout)
    }

    /// Waits until every registered collection's sources caught up with the brokers.
    pub fn sync_all(&self, timeout: Duration) -> Result<()> {
        let ids: Vec<CollectionId> = self.feeds()?.keys().copied().collect();
        let deadline = Instant::now() + timeout;
        for id in ids {
            self.sync(id, deadline.saturating_duration_since(Instant::now()))?;
        }
        Ok(())
    }

    fn high_watermarks(&self, id: CollectionId) -> Result<Vec<u64>> {
        let (topic, partitions) = {
            let feeds = self.feeds()?;
            let Some(feed) = feeds.get(&id) else { return Ok(Vec::new()) };
            (feed.topic.clone(), feed.partitions.len())
        };
        (0..partitions)
            .map(|p| {
                self.metadata
                    .fetch_watermarks(&topic, p as i32, self.config.timeout())
                    .map(|(_, high)| high.max(0) as u64)
                    .map_err(|e| kafka_error(&format!("watermarks of `{topic}` partition {p}"), e))
            })
            .collect()
    }

    /// Waits until offset `targets[p] - 1` of every partition is bound.
    fn wait_for(&self, id: CollectionId, targets: &[u64], timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        let mut feeds = self.feeds()?;
        loop {
            let Some(feed) = feeds.get(&id) else { return Ok(()) };
            if feed.partitions.iter().zip(targets).all(|(state, &target)| state.next >= target) {
                return Ok(());
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(Error::Timeout(timeout));
            }
            feeds = self.bound.wait_timeout(feeds, left.min(Duration::from_millis(50))).map_err(|_| Error::Shutdown)?.0;
        }
    }

    /// Consumer lag per partition of `id`'s topic (asks the brokers).
    pub fn lag(&self, id: CollectionId) -> Result<Vec<PartitionLag>> {
        let highs = self.high_watermarks(id)?;
        let positions = self.positions(id)?;
        Ok(positions
            .into_iter()
            .zip(highs)
            .enumerate()
            .map(|(p, (position, high_watermark))| PartitionLag { partition: p as u32, position, high_watermark })
            .collect())
    }

    /// Records of `id` sent to its dead-letter topic since the engine started.
    pub fn dead_letters(&self, id: CollectionId) -> u64 {
        self.feeds.lock().ok().and_then(|f| f.get(&id).map(|f| f.dead_letters)).unwrap_or(0)
    }

    /// Produces rows (upserts) and keys (tombstones) of collection `id` to
    /// its topic, waits for the brokers to acknowledge all of them
    /// (idempotent producer, `acks=all`) and then for the sources to read
    /// them; returns the newest timestamp they were given.
    pub fn write(
        &self,
        id: CollectionId,
        write: Option<&WriteBatch>,
        deletes: &[Pk],
        timeout: Duration,
    ) -> Result<Timestamp> {
        if self.role == Role::Replica {
            return Err(Error::ReadOnly("a read replica does not write to the log: send writes to the primary".into()));
        }
        let (topic, schema) = {
            let feeds = self.feeds()?;
            let feed = feeds.get(&id).ok_or_else(|| Error::storage(format!("collection {id} has no topic")))?;
            (feed.topic.clone(), feed.schema.clone())
        };
        let mut records: Vec<(Vec<u8>, Option<Vec<u8>>)> = Vec::new();
        if let Some(write) = write {
            for (row, pk) in write.pks.iter().enumerate() {
                records.push((encode_key(pk), Some(encode_row(&schema, &write.batch, row))));
            }
        }
        records.extend(deletes.iter().map(|pk| (encode_key(pk), None)));
        let deadline = Instant::now() + timeout;
        let mut deliveries = Vec::with_capacity(records.len());
        for (key, value) in &records {
            let mut record = FutureRecord::<[u8], [u8]>::to(&topic).key(key.as_slice());
            if let Some(value) = value {
                record = record.payload(value.as_slice());
            }
            deliveries.push(self.enqueue(record, deadline)?);
        }
        let mut targets: BTreeMap<u32, u64> = BTreeMap::new();
        for delivery in deliveries {
            let delivered = futures::executor::block_on(delivery)
                .map_err(|_| kafka_error(&format!("producing to `{topic}`"), "the producer went away"))?
                .map_err(|(e, _)| kafka_error(&format!("producing to `{topic}`"), e))?;
            let target = targets.entry(delivered.partition as u32).or_default();
            *target = (*target).max(delivered.offset as u64 + 1);
        }
        let partitions = targets.keys().next_back().map_or(0, |p| *p as usize + 1);
        let mut wanted = vec![0; partitions];
        for (&p, &target) in &targets {
            wanted[p as usize] = target;
        }
        self.wait_for(id, &wanted, deadline.saturating_duration_since(Instant::now()))?;
        let feeds = self.feeds()?;
        let feed = feeds.get(&id).ok_or_else(|| Error::CollectionNotFound(schema.name.clone()))?;
        Ok(targets
            .iter()
            .filter_map(|(&p, &target)| feed.partitions.get(p as usize)?.binding_of(target - 1))
            .map(|b| b.ts)
            .max()
            .unwrap_or_else(|| self.tso.last()))
    }

    /// Hands a record to the producer, waiting while its queue is full.
    fn enqueue<'a>(&self, mut record: FutureRecord<'a, [u8], [u8]>, deadline: Instant) -> Result<DeliveryFuture> {
        loop {
            match self.producer.send_result(record) {
                Ok(delivery) => return Ok(delivery),
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), back)) => {
                    if Instant::now() >= deadline {
                        return Err(kafka_error("producing", "the producer queue stayed full"));
                    }
                    self.producer.poll(Duration::from_millis(10));
                    record = back;
                }
                Err((e, _)) => return Err(kafka_error("producing", e)),
            }
        }
    }

    /// Waits for every record handed to the producer to be delivered.
    pub fn flush_producer(&self) -> Result<()> {
        self.producer.flush(self.config.timeout()).map_err(|e| kafka_error("flushing the producer", e))
    }

    /// A reader of worker `worker`'s share of every collection's partitions
    /// (partition `p` of collection `c` goes to worker `(p + c) mod workers`).
    pub fn reader(self: &Arc<Self>, worker: usize) -> Result<KafkaReader> {
        let consumer: BaseConsumer = client_config(&self.config, &consumer_settings(&self.config))
            .create()
            .map_err(|e| kafka_error("creating a consumer", e))?;
        Ok(KafkaReader {
            log: self.clone(),
            worker,
            consumer,
            version: u64::MAX,
            assigned: HashMap::new(),
            deliveries_in_flight: Vec::new(),
            carry: BTreeMap::new(),
            published_frontier: None,
            bound_since_frontier: false,
        })
    }
}

pub(crate) fn consumer_settings(config: &KafkaConfig) -> Vec<(&'static str, &str)> {
    vec![
        ("group.id", config.group_id.as_str()),
        ("enable.auto.commit", "false"),
        ("enable.auto.offset.store", "false"),
        ("auto.offset.reset", "earliest"),
        // Fetches wait at most this long for data: freshness over batching.
        ("fetch.wait.max.ms", "5"),
        // The prefetch queue per consumer: bounded memory when the dataflow falls behind.
        ("queued.max.messages.kbytes", "16384"),
        ("enable.partition.eof", "false"),
    ]
}

/// Creates `topic` with `partitions` and `settings` unless it exists;
/// returns its partition count.
pub(crate) fn ensure_topic(
    admin: &AdminClient<DefaultClientContext>,
    metadata: &BaseConsumer,
    config: &KafkaConfig,
    topic: &str,
    partitions: i32,
    settings: &[(&str, &str)],
) -> Result<u32> {
    if let Some(count) = partition_count(metadata, config, topic)? {
        return Ok(count);
    }
    let mut new = NewTopic::new(topic, partitions, TopicReplication::Fixed(config.replication_factor));
    for (key, value) in settings {
        new = new.set(key, value);
    }
    let options = AdminOptions::new().operation_timeout(Some(config.timeout()));
    let results = futures::executor::block_on(admin.create_topics([&new], &options))
        .map_err(|e| kafka_error(&format!("creating topic `{topic}`"), e))?;
    for result in results {
        match result {
            Ok(_) | Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
            Err((name, code)) => return Err(kafka_error(&format!("creating topic `{name}`"), code)),
        }
    }
    // Metadata lags creation briefly.
    let deadline = Instant::now() + config.timeout();
    loop {
        if let Some(count) = partition_count(metadata, config, topic)? {
            tracing::info!(topic, partitions = count, "created topic");
            return Ok(count);
        }
        if Instant::now() >= deadline {
            return Err(kafka_error(&format!("topic `{topic}`"), "created, but not in the metadata"));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The partitions of `topic`, `None` when it does not exist.
pub(crate) fn partition_count(metadata: &BaseConsumer, config: &KafkaConfig, topic: &str) -> Result<Option<u32>> {
    let metadata = metadata
        .fetch_metadata(Some(topic), config.timeout())
        .map_err(|e| kafka_error(&format!("metadata of topic `{topic}`"), e))?;
    Ok(metadata
        .topics()
        .iter()
        .find(|t| t.name() == topic && t.error().is_none() && !t.partitions().is_empty())
        .map(|t| t.partitions().len() as u32))
}

pub(crate) fn client_config(config: &KafkaConfig, settings: &[(&str, &str)]) -> ClientConfig {
    let mut client = ClientConfig::new();
    client.set("bootstrap.servers", &config.bootstrap_servers);
    for (key, value) in settings {
        client.set(*key, *value);
    }
    for (key, value) in &config.properties {
        client.set(key, value);
    }
    client
}

/// One worker's consumer: reads its partitions, binds offsets to times,
/// decodes records and dead-letters the bad ones.
pub struct KafkaReader {
    log: Arc<KafkaLog>,
    worker: usize,
    consumer: BaseConsumer,
    /// The feeds version the assignment follows.
    version: u64,
    /// (topic, partition) → collection.
    assigned: HashMap<(String, i32), CollectionId>,
    /// Dead letters and published bindings on their way, with their topic.
    deliveries_in_flight: Vec<(String, DeliveryFuture)>,
    /// Records of a binding made before a restart whose last offset has not
    /// arrived yet: a binding is applied whole, as it was the first time, so
    /// its rows get the same version ids.
    carry: BTreeMap<(CollectionId, i32), Vec<Read>>,
    /// A primary: the frontier this worker last published, and when.
    published_frontier: Option<(Instant, Timestamp)>,
    /// A primary: bindings were published since that frontier.
    bound_since_frontier: bool,
}

/// Records of one partition sharing a time: (collection, partition, their
/// binding, records).
type TimedRun = (CollectionId, i32, Binding, Vec<Read>);

/// A record of one partition, decoded.
struct Read {
    offset: u64,
    key: Option<Vec<u8>>,
    value: Option<Vec<u8>>,
    decoded: std::result::Result<Mutation, String>,
}

impl KafkaReader {
    /// Follows feeds added or removed since the last call.
    fn reassign(&mut self) -> Result<()> {
        let version = self.log.version.load(Ordering::Acquire);
        if version == self.version {
            return Ok(());
        }
        let mut wanted: HashMap<(String, i32), (CollectionId, u64)> = HashMap::new();
        for (&id, feed) in self.log.feeds()?.iter() {
            for (p, state) in feed.partitions.iter().enumerate() {
                if self.log.reader_of(id, p) == self.worker {
                    wanted.insert((feed.topic.clone(), p as i32), (id, state.next));
                }
            }
        }
        let mut removed = TopicPartitionList::new();
        self.assigned.retain(|key, id| {
            let keep = wanted.get(key).is_some_and(|(wanted_id, _)| wanted_id == id);
            if !keep {
                removed.add_partition(&key.0, key.1);
            }
            keep
        });
        let kept: HashSet<CollectionId> = self.assigned.values().copied().collect();
        self.carry.retain(|(id, _), _| kept.contains(id));
        if removed.count() > 0 {
            self.consumer.incremental_unassign(&removed).map_err(|e| kafka_error("unassigning partitions", e))?;
        }
        let mut added = TopicPartitionList::new();
        for (key, (id, next)) in wanted {
            if let std::collections::hash_map::Entry::Vacant(slot) = self.assigned.entry(key) {
                added
                    .add_partition_offset(&slot.key().0, slot.key().1, Offset::Offset(next as i64))
                    .map_err(|e| kafka_error("assignment", e))?;
                slot.insert(id);
            }
        }
        if added.count() > 0 {
            self.consumer.incremental_assign(&added).map_err(|e| kafka_error("assigning partitions", e))?;
        }
        self.version = version;
        Ok(())
    }

    /// Drops the deliveries that finished and reports failures.
    fn settle_deliveries(&mut self) {
        let mut cx = Context::from_waker(futures::task::noop_waker_ref());
        self.deliveries_in_flight.retain_mut(|(topic, delivery)| match Pin::new(delivery).poll(&mut cx) {
            Poll::Pending => true,
            Poll::Ready(Ok(Ok(_))) => false,
            Poll::Ready(Ok(Err((e, _)))) => {
                tracing::error!(topic, "a record could not be delivered: {e}");
                false
            }
            Poll::Ready(Err(_)) => false,
        });
    }

    fn dead_letter(&mut self, feed_topic: &str, dead_letter_topic: &str, partition: i32, read: &Read, reason: &str) {
        let partition_text = partition.to_string();
        let offset_text = read.offset.to_string();
        let headers = OwnedHeaders::new()
            .insert(Header { key: "vectorflow.error", value: Some(reason) })
            .insert(Header { key: "vectorflow.topic", value: Some(feed_topic) })
            .insert(Header { key: "vectorflow.partition", value: Some(&partition_text) })
            .insert(Header { key: "vectorflow.offset", value: Some(&offset_text) });
        let mut record = FutureRecord::<[u8], [u8]>::to(dead_letter_topic).headers(headers);
        if let Some(key) = &read.key {
            record = record.key(key.as_slice());
        }
        if let Some(value) = &read.value {
            record = record.payload(value.as_slice());
        }
        let deadline = Instant::now() + self.log.config.timeout();
        match self.log.enqueue(record, deadline) {
            Ok(delivery) => self.deliveries_in_flight.push((dead_letter_topic.to_string(), delivery)),
            Err(e) => tracing::error!(topic = dead_letter_topic, "a dead letter could not be produced: {e}"),
        }
    }
}

impl LogReader for KafkaReader {
    fn partitions(&self) -> Vec<u32> {
        self.assigned.keys().map(|(_, p)| *p as u32).collect()
    }

    fn poll(&mut self, max: usize) -> Result<LogPoll> {
        self.reassign()?;
        self.settle_deliveries();
        let mut messages: Vec<OwnedMessage> = Vec::new();
        if !self.assigned.is_empty() {
            while messages.len() < max {
                match self.consumer.poll(Duration::ZERO) {
                    None => break,
                    Some(Ok(message)) => messages.push(message.detach()),
                    Some(Err(e)) => {
                        // Broker or network trouble: librdkafka retries on its own.
                        tracing::warn!(worker = self.worker, "kafka consumer: {e}");
                        break;
                    }
                }
            }
        }
        // A replica's carried records wait for their bindings, which arrive
        // from the bindings topic, not with new messages.
        let entries = if messages.is_empty() && self.carry.is_empty() {
            self.skip_control_records()?;
            Vec::new()
        } else {
            self.bind(messages)?
        };
        // Later records get later oracle times, so the source may advance to
        // the oracle's next time; bindings made before a restart hold it
        // below their times until they are replayed. A replica's later
        // records get the primary's bindings, none below the primary's
        // published frontier; bindings of a collection the replica does not
        // follow yet hold it too (all workers: any may be given its
        // partitions). Every partition this worker owns counts, assigned
        // yet or not, so a collection followed meanwhile cannot slip by.
        let frontier = {
            let (log, worker) = (&self.log, self.worker);
            let feeds = log.feeds()?;
            let pending = feeds
                .iter()
                .flat_map(|(&id, feed)| {
                    feed.partitions.iter().enumerate().filter(move |(p, _)| log.reader_of(id, *p) == worker)
                })
                .filter_map(|(_, state)| state.pending_ts())
                .min();
            let next = match self.log.role {
                Role::Primary => self.log.tso.next_possible(),
                Role::Replica => {
                    let learned = self.log.learned.lock().map_err(|_| Error::Shutdown)?;
                    learned.frontier().min(learned.least_unclaimed().unwrap_or(Timestamp::MAX))
                }
            };
            pending.map_or(next, |ts| ts.min(next))
        };
        if self.log.role == Role::Primary {
            self.publish_frontier(frontier);
        }
        Ok(LogPoll { entries, frontier: Some(frontier) })
    }
}

impl KafkaReader {
    /// A primary: tells replicas that this worker's later bindings have
    /// times at or after `frontier` (every binding it made so far was
    /// handed to the producer before this record): right after new
    /// bindings (at most every [`FRONTIER_AFTER_BINDINGS`], so replicas
    /// can apply them at once), else at most every [`FRONTIER_EVERY`].
    fn publish_frontier(&mut self, frontier: Timestamp) {
        let every = if self.bound_since_frontier { FRONTIER_AFTER_BINDINGS } else { FRONTIER_EVERY };
        if self.published_frontier.is_some_and(|(at, ts)| ts >= frontier || at.elapsed() < every) {
            return;
        }
        self.published_frontier = Some((Instant::now(), frontier));
        self.bound_since_frontier = false;
        let (key, value) = frontier_record(&self.log.deployment, self.worker, self.log.workers, frontier);
        self.log.publish_bindings(vec![(key, Some(value))], &mut self.deliveries_in_flight);
    }

    /// Moves each idle partition's position past offsets that hold no
    /// records (transaction markers), which the consumer skips; otherwise a
    /// Strong read would wait for them forever.
    fn skip_control_records(&mut self) -> Result<()> {
        let Ok(positions) = self.consumer.position() else { return Ok(()) };
        let mut feeds = self.log.feeds()?;
        let mut moved = false;
        for element in positions.elements() {
            let Offset::Offset(position) = element.offset() else { continue };
            let Some(&id) = self.assigned.get(&(element.topic().to_string(), element.partition())) else { continue };
            if self.carry.contains_key(&(id, element.partition())) {
                continue;
            }
            if let Some(state) = feeds.get_mut(&id).and_then(|f| f.partitions.get_mut(element.partition() as usize))
                && position.max(0) as u64 > state.next
                && state.pending_ts().is_none()
            {
                state.next = position as u64;
                moved = true;
            }
        }
        if moved {
            self.log.bound.notify_all();
        }
        Ok(())
    }

    /// Decodes `messages`, binds their offsets to times (reusing bindings
    /// made before a restart), persists new bindings, dead-letters bad
    /// records and returns the log entries to apply.
    fn bind(&mut self, messages: Vec<OwnedMessage>) -> Result<Vec<LogEntry>> {
        // Decode per (collection, partition), in offset order, after what
        // the last poll carried over.
        let mut by_partition = std::mem::take(&mut self.carry);
        let feeds_snapshot: HashMap<CollectionId, (Arc<CollectionSchema>, RecordFormat)> = {
            let feeds = self.log.feeds()?;
            feeds.iter().map(|(id, f)| (*id, (f.schema.clone(), f.format))).collect()
        };
        for message in messages {
            let Some(&id) = self.assigned.get(&(message.topic().to_string(), message.partition())) else { continue };
            let Some((schema, format)) = feeds_snapshot.get(&id) else { continue };
            let key = message.key().map(<[u8]>::to_vec);
            let value = message.payload().map(<[u8]>::to_vec);
            let decoded = decode(schema, *format, key.as_deref(), value.as_deref()).map_err(|e| e.to_string());
            let read = Read { offset: message.offset().max(0) as u64, key, value, decoded };
            by_partition.entry((id, message.partition())).or_default().push(read);
        }

        // Assign times: replayed offsets keep the binding they had, new ones
        // form runs that get oracle times as they close (in offset order).
        let mut new_bindings: Vec<(CollectionId, u32, Binding)> = Vec::new();
        let mut timed: Vec<TimedRun> = Vec::new();
        let replica = self.log.role == Role::Replica;
        {
            let feeds = self.log.feeds()?;
            for ((id, partition), reads) in by_partition {
                let Some(state) = feeds.get(&id).and_then(|f| f.partitions.get(partition as usize)) else { continue };
                let schema = &feeds_snapshot[&id].0;
                let mut run: Option<(Binding, Vec<Read>, HashSet<Pk>, bool)> = None;
                let mut close = |run: &mut Option<(Binding, Vec<Read>, HashSet<Pk>, bool)>,
                                 timed: &mut Vec<TimedRun>| {
                    if let Some((mut binding, reads, _, _)) = run.take() {
                        // Rows without keys (auto id) take their ids from the run's reserved times.
                        let auto_rows =
                            reads.iter().filter(|r| matches!(&r.decoded, Ok(Mutation::Upsert(_)))).count() as u64;
                        binding.ts = self.log.tso.allocate(auto_rows.max(1));
                        new_bindings.push((id, partition as u32, binding));
                        timed.push((id, partition, binding, reads));
                    }
                };
                let mut reads = reads.into_iter();
                while let Some(read) = reads.next() {
                    if read.offset < state.next {
                        continue; // already handed to the dataflow
                    }
                    if replica && state.binding_of(read.offset).is_none() {
                        // The primary has not published this record's binding
                        // yet: it waits, with every later one of the partition.
                        let waiting = self.carry.entry((id, partition)).or_default();
                        waiting.push(read);
                        waiting.extend(reads.by_ref());
                        break;
                    }
                    if let Some(stored) = state.binding_of(read.offset) {
                        close(&mut run, &mut timed);
                        match timed.last_mut() {
                            Some((i, p, binding, reads)) if *i == id && *p == partition && *binding == stored => {
                                reads.push(read)
                            }
                            _ => timed.push((id, partition, stored, vec![read])),
                        }
                        continue;
                    }
                    let (key, keyed) = run_key(schema, &read.decoded);
                    let continues = run.as_ref().is_some_and(|(_, _, keys, run_keyed)| {
                        key.as_ref().is_none_or(|k| !keys.contains(k)) && (read.decoded.is_err() || *run_keyed == keyed)
                    });
                    if !continues {
                        close(&mut run, &mut timed);
                    }
                    let (binding, reads, keys, _) = run.get_or_insert_with(|| {
                        (Binding { first: read.offset, last: read.offset, ts: 0 }, Vec::new(), HashSet::new(), keyed)
                    });
                    binding.last = read.offset;
                    if let Some(key) = key {
                        keys.insert(key);
                    }
                    reads.push(read);
                }
                close(&mut run, &mut timed);
                // A replayed binding whose last record is not here yet waits
                // for it (a new run always ends at its last record).
                if let Some((i, p, binding, reads)) = timed.last()
                    && (*i, *p) == (id, partition)
                    && reads.last().is_some_and(|r| r.offset < binding.last)
                    && let Some((_, _, _, reads)) = timed.pop()
                {
                    let waiting = self.carry.entry((id, partition)).or_default();
                    waiting.splice(0..0, reads);
                }
            }
        }

        if !new_bindings.is_empty() {
            let txn = self.log.bindings.begin_write().map_err(bindings_error)?;
            {
                let mut table = txn.open_table(BINDINGS).map_err(bindings_error)?;
                for (id, partition, b) in &new_bindings {
                    table.insert((*id, *partition, b.first), (b.last, b.ts)).map_err(bindings_error)?;
                }
            }
            txn.commit().map_err(bindings_error)?;
            // Replicas give the records these times too.
            let records = new_bindings
                .iter()
                .map(|(id, partition, b)| binding_record(&self.log.deployment, *id, *partition, b))
                .map(|(key, value)| (key, Some(value)))
                .collect();
            self.log.publish_bindings(records, &mut self.deliveries_in_flight);
            self.bound_since_frontier = true;
        }

        // Publish the bindings and the new positions, and build the entries.
        let mut entries = Vec::new();
        let mut dead: Vec<(String, String, i32, Read, String)> = Vec::new();
        {
            let mut feeds = self.log.feeds()?;
            for (id, partition, b) in &new_bindings {
                if let Some(state) = feeds.get_mut(id).and_then(|f| f.partitions.get_mut(*partition as usize)) {
                    state.bindings.push_back(*b);
                }
            }
            for (id, partition, Binding { ts, .. }, reads) in timed {
                let Some(feed) = feeds.get_mut(&id) else { continue };
                let schema = feed.schema.clone();
                if let Some(state) = feed.partitions.get_mut(partition as usize)
                    && let Some(last) = reads.last()
                {
                    state.next = state.next.max(last.offset + 1);
                    if replica {
                        // A replica never checkpoints: it lets go of what it replayed.
                        while state.bindings.front().is_some_and(|b| b.last < state.next) {
                            state.bindings.pop_front();
                        }
                    }
                }
                let (good, bad) = run_entries(&schema, id, partition as u32, ts, reads);
                entries.extend(good);
                for (read, reason) in bad {
                    feed.dead_letters += 1;
                    dead.push((feed.topic.clone(), feed.dead_letter_topic.clone(), partition, read, reason));
                }
            }
        }
        self.log.bound.notify_all();
        if replica {
            // The primary sends them; a replica only counts them.
            dead.clear();
        }
        for (topic, dead_letter_topic, partition, read, reason) in dead {
            tracing::debug!(topic, partition, offset = read.offset, reason, "dead letter");
            self.dead_letter(&topic, &dead_letter_topic, partition, &read, &reason);
        }
        Ok(entries)
    }
}

/// The key a record changes (for cutting runs) and whether it carries one.
fn run_key(schema: &CollectionSchema, decoded: &std::result::Result<Mutation, String>) -> (Option<Pk>, bool) {
    match decoded {
        Ok(Mutation::Delete(pk)) => (Some(pk.clone()), true),
        Ok(Mutation::Upsert(row)) => {
            let pk = row.get(&schema.primary().name).and_then(Value::as_pk);
            let keyed = pk.is_some();
            (pk, keyed)
        }
        Err(_) => (None, true),
    }
}

/// The log entries of one run (all at `ts`): one upsert batch and one
/// delete list; records that fail the batch's checks come back with a reason.
fn run_entries(
    schema: &CollectionSchema,
    collection: CollectionId,
    partition: u32,
    ts: Timestamp,
    reads: Vec<Read>,
) -> (Vec<LogEntry>, Vec<(Read, String)>) {
    let mut rows: Vec<(Row, Read)> = Vec::new();
    let mut deletes = Vec::new();
    let mut bad = Vec::new();
    let offset = reads.first().map_or(0, |r| r.offset);
    for mut read in reads {
        match std::mem::replace(&mut read.decoded, Err(String::new())) {
            Ok(Mutation::Upsert(row)) => rows.push((row, read)),
            Ok(Mutation::Delete(pk)) => deletes.push(pk),
            Err(reason) => bad.push((read, reason)),
        }
    }
    let entry = |op| LogEntry { partition, offset, ts, record: LogRecord { collection, op } };
    let mut entries = Vec::new();
    if !rows.is_empty() {
        let auto = schema.primary().auto_id && !rows.iter().any(|(row, _)| row.contains_key(&schema.primary().name));
        let kind = if auto { WriteKind::Insert { first_auto_id: ts as i64 } } else { WriteKind::Upsert };
        let only_rows: Vec<Row> = rows.iter().map(|(row, _)| row.clone()).collect();
        let write = match WriteBatch::from_rows(schema, &only_rows, kind) {
            Ok(write) => Some(write),
            Err(_) => {
                // Find the rows the batch refuses; the rest go on.
                let mut fine = Vec::with_capacity(rows.len());
                for (row, read) in rows {
                    match WriteBatch::from_rows(schema, std::slice::from_ref(&row), kind) {
                        Ok(_) => fine.push(row),
                        Err(e) => bad.push((read, e.to_string())),
                    }
                }
                WriteBatch::from_rows(schema, &fine, kind).ok().filter(|w| w.batch.num_rows() > 0)
            }
        };
        if let Some(write) = write {
            entries.push(entry(LogOp::Upsert(IpcBatch(write.batch))));
        }
    }
    if !deletes.is_empty() {
        entries.push(entry(LogOp::Delete(deletes)));
    }
    (entries, bad)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn state(next: u64, bindings: &[(u64, u64, Timestamp)]) -> PartitionState {
        PartitionState {
            next,
            bindings: bindings.iter().map(|&(first, last, ts)| Binding { first, last, ts }).collect(),
        }
    }

    #[test]
    fn bindings_answer_offsets_and_replays() {
        let s = state(10, &[(0, 4, 100), (5, 9, 200), (10, 14, 300)]);
        assert_eq!(s.binding_of(0).map(|b| b.ts), Some(100));
        assert_eq!(s.binding_of(7).map(|b| b.ts), Some(200));
        assert_eq!(s.binding_of(14).map(|b| b.ts), Some(300));
        assert_eq!(s.binding_of(15), None);
        // Offsets 10..=14 were bound before a restart and wait to be replayed.
        assert_eq!(s.pending_ts(), Some(300));
        assert_eq!(state(15, &[(10, 14, 300)]).pending_ts(), None);
    }

    #[test]
    fn topics_and_settings() {
        let mut config = KafkaConfig::default();
        assert_eq!(config.topic_of("docs"), "vectorflow.docs");
        config.topics.insert("docs".into(), "pg.public.docs".into());
        assert_eq!(config.topic_of("docs"), "pg.public.docs");
        config.properties.insert("fetch.wait.max.ms".into(), "50".into());
        let client = client_config(&config, &consumer_settings(&config));
        // The user's librdkafka settings win over Vectorflow's.
        assert_eq!(client.get("fetch.wait.max.ms"), Some("50"));
        assert_eq!(client.get("enable.auto.commit"), Some("false"));
        assert_eq!(PartitionLag { partition: 0, position: 7, high_watermark: 10 }.lag(), 3);
    }

    #[test]
    fn runs_split_where_a_key_repeats_and_bad_rows_are_refused() {
        let schema = CollectionSchema::new(
            "docs",
            vec![
                vectorflow_core::FieldSchema::int64_primary("id", false),
                vectorflow_core::FieldSchema::vector("v", 2, vectorflow_core::Metric::L2),
            ],
        );
        let read = |offset: u64, decoded: std::result::Result<Mutation, String>| Read {
            offset,
            key: None,
            value: None,
            decoded,
        };
        let row = |id: i64| {
            Mutation::Upsert(Row::from([
                ("id".to_string(), Value::Int(id)),
                ("v".to_string(), vec![1.0f32, 2.0].into()),
            ]))
        };
        assert_eq!(run_key(&schema, &Ok(row(3))), (Some(Pk::Int(3)), true));
        assert_eq!(run_key(&schema, &Ok(Mutation::Delete(Pk::Int(4)))), (Some(Pk::Int(4)), true));
        let reads = vec![
            read(5, Ok(row(1))),
            read(6, Err("value: not JSON".into())),
            read(7, Ok(Mutation::Delete(Pk::Int(2)))),
        ];
        let (entries, bad) = run_entries(&schema, 1, 0, 42, reads);
        assert_eq!(entries.len(), 2);
        assert!(entries.iter().all(|e| e.ts == 42 && e.offset == 5));
        assert_eq!(bad.len(), 1);
        assert_eq!(bad[0].0.offset, 6);
    }
}
