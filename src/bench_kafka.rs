//! `vectorflow bench-kafka`: Kafka ingestion against a running broker.
//! Measures in one run, on the same data:
//! - rows/s from the topic to searchable (a dataset's rows as JSON records,
//!   produced before the engine starts), against two baselines: a bare
//!   rdkafka consumer that reads and decodes the same records, and the same
//!   rows inserted through the embedded log;
//! - produce-to-visible latency under Strong (one record at a time from a
//!   plain producer, then a Strong `get`), against the produce
//!   acknowledgement alone; and API writes through the topic;
//! - a read replica of the engine (same topic, same object store): the time
//!   it takes to open, API-write-to-visible on it against the primary's own
//!   Strong write-to-visible, and search QPS on each (the two share this
//!   machine's cores: this shows the replica's cost, not the scaling);
//! - a sustained load above ingest capacity: the producer at full speed
//!   while ingestion is stalled for a while (capacity zero) and then runs
//!   again; lag and resident memory over time, then the time to drain.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context;
use rdkafka::ClientConfig;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::Message;
use rdkafka::producer::{FutureProducer, FutureRecord, Producer};
use rdkafka::topic_partition_list::{Offset, TopicPartitionList};
use serde_json::json;

use crate::bench::{DatasetArgs, insert_all, percentile};
use vectorflow::crates::connectors::kafka_record::{RecordFormat, decode, encode_key};
use vectorflow::{
    Consistency, Engine, EngineConfig, GetOptions, KafkaConfig, Pk, Role, SearchOptions, StorageConfig, Value,
};

#[derive(Debug, Clone, clap::Args)]
pub struct KafkaBenchArgs {
    #[command(flatten)]
    pub data: DatasetArgs,
    /// The broker (`host:port`).
    #[arg(long)]
    pub bootstrap: String,
    /// Partitions of the benchmark topic (0: one per worker).
    #[arg(long, default_value_t = 0)]
    pub partitions: i32,
    /// Produce-to-visible samples.
    #[arg(long, default_value_t = 300)]
    pub latency_samples: usize,
    /// How long the overload phase produces, in seconds.
    #[arg(long, default_value_t = 30)]
    pub overload_secs: u64,
    /// For this long at the start of the overload phase ingestion is
    /// paused (a stalled dataflow: capacity zero), then it resumes while
    /// the load goes on.
    #[arg(long, default_value_t = 10)]
    pub stall_secs: u64,
}

const COLLECTION: &str = "bench";
const WAIT: Duration = Duration::from_secs(3600);

pub(crate) fn producer(bootstrap: &str, acks_all: bool) -> anyhow::Result<FutureProducer> {
    Ok(ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("enable.idempotence", if acks_all { "true" } else { "false" })
        .set("linger.ms", if acks_all { "0" } else { "5" })
        // Bounded producer memory in the overload phase.
        .set("queue.buffering.max.kbytes", "65536")
        .create()?)
}

/// Sends every record (waiting while the producer's queue is full) and
/// waits for every acknowledgement.
pub(crate) fn produce_all(
    producer: &FutureProducer,
    topic: &str,
    records: &[(Vec<u8>, Vec<u8>)],
) -> anyhow::Result<()> {
    let mut deliveries = Vec::with_capacity(records.len());
    for (key, value) in records {
        deliveries.push(send(producer, topic, key, value)?);
    }
    for delivery in deliveries {
        futures::executor::block_on(delivery)?.map_err(|(e, _)| e)?;
    }
    Ok(())
}

fn send(
    producer: &FutureProducer,
    topic: &str,
    key: &[u8],
    value: &[u8],
) -> anyhow::Result<rdkafka::producer::DeliveryFuture> {
    let mut record = FutureRecord::to(topic).key(key).payload(value);
    loop {
        match producer.send_result(record) {
            Ok(delivery) => return Ok(delivery),
            Err((rdkafka::error::KafkaError::MessageProduction(rdkafka::types::RDKafkaErrorCode::QueueFull), back)) => {
                producer.poll(Duration::from_millis(5));
                record = back;
            }
            Err((e, _)) => return Err(e.into()),
        }
    }
}

/// A JSON record and its row as a JSON object.
pub(crate) type JsonRecords = (Vec<(Vec<u8>, Vec<u8>)>, Vec<serde_json::Map<String, serde_json::Value>>);

/// The dataset's rows as Kafka records (key: the encoded primary key,
/// value: the row as JSON with vectors as number arrays), and each row's object.
pub(crate) fn json_records(
    dataset: &vectorflow::Dataset,
    schema: &vectorflow::CollectionSchema,
    vectors: &vectorflow::crates::connectors::npy::Matrix<f32>,
    attributes: &arrow::record_batch::RecordBatch,
) -> anyhow::Result<JsonRecords> {
    let n = vectors.rows;
    let mut records: Vec<(Vec<u8>, Vec<u8>)> = Vec::with_capacity(n);
    let mut rows_json: Vec<serde_json::Map<String, serde_json::Value>> = Vec::with_capacity(n);
    for start in (0..n).step_by(1000) {
        let batch = dataset.base_batch(schema, vectors, attributes, start..(start + 1000).min(n))?;
        for row in 0..batch.num_rows() {
            let mut object = serde_json::Map::new();
            for (field, column) in schema.fields.iter().zip(batch.columns()) {
                let value = Value::from_array(column.as_ref(), row);
                if value != Value::Null {
                    object.insert(field.name.clone(), value.to_json());
                }
            }
            let pk =
                vectorflow::crates::core::value::pk_from_array(batch.column(schema.primary_index()).as_ref(), row)?;
            records.push((encode_key(&pk), serde_json::Value::Object(object.clone()).to_string().into_bytes()));
            rows_json.push(object);
        }
    }
    Ok((records, rows_json))
}

pub(crate) fn summary(mut ms: Vec<f64>) -> serde_json::Value {
    ms.sort_by(f64::total_cmp);
    json!({ "samples": ms.len(), "p50_ms": percentile(&ms, 0.5), "p99_ms": percentile(&ms, 0.99),
            "max_ms": ms.last().copied().unwrap_or(0.0) })
}

/// Resident memory of this process, in MB.
fn rss_mb() -> f64 {
    crate::bench::rss_of("self") as f64 / (1024.0 * 1024.0)
}

pub fn run(args: KafkaBenchArgs) -> anyhow::Result<()> {
    let dataset = args.data.open()?;
    let vectors = dataset.base_vectors()?;
    let attributes = dataset.base_attributes()?;
    let n = vectors.rows;
    let schema = dataset.collection_schema(COLLECTION, &attributes)?;
    let partitions = if args.partitions > 0 { args.partitions } else { args.data.workers as i32 };
    let run_id = std::process::id();
    let topic = format!("bench.{}.{run_id}", dataset.name());
    println!(
        "dataset {}: {n} x {}, workers {}, topic {topic} ({partitions} partitions)",
        dataset.name(),
        vectors.cols,
        args.data.workers
    );

    // ---- the rows as JSON records (vectors as number arrays), keyed by id ----
    let started = Instant::now();
    let (records, rows_json) = json_records(&dataset, &schema, &vectors, &attributes)?;
    let json_bytes: usize = records.iter().map(|(_, v)| v.len()).sum();
    println!(
        "encoded {n} records ({:.0} bytes each) in {:.1} s",
        json_bytes as f64 / n as f64,
        started.elapsed().as_secs_f64()
    );

    let admin: AdminClient<DefaultClientContext> =
        ClientConfig::new().set("bootstrap.servers", &args.bootstrap).create()?;
    let new = NewTopic::new(&topic, partitions, TopicReplication::Fixed(1));
    for result in futures::executor::block_on(admin.create_topics([&new], &AdminOptions::new()))? {
        result.map_err(|(name, code)| anyhow::anyhow!("creating {name}: {code}"))?;
    }

    // ---- produce everything before the engine starts ----
    let bulk = producer(&args.bootstrap, false)?;
    let started = Instant::now();
    produce_all(&bulk, &topic, &records)?;
    let produce_s = started.elapsed().as_secs_f64();
    println!("produced {n} records in {produce_s:.2} s ({:.0} records/s)", n as f64 / produce_s);

    // ---- baseline: a bare consumer that reads and decodes the records ----
    let started = Instant::now();
    {
        let consumer: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", &args.bootstrap)
            .set("group.id", format!("bench-raw-{run_id}"))
            .set("fetch.wait.max.ms", "5")
            .create()?;
        let mut list = TopicPartitionList::new();
        for p in 0..partitions {
            list.add_partition_offset(&topic, p, Offset::Beginning)?;
        }
        consumer.assign(&list)?;
        let mut read = 0;
        while read < n {
            match consumer.poll(Duration::from_millis(100)) {
                Some(Ok(message)) => {
                    decode(&schema, RecordFormat::Json, message.key(), message.payload())
                        .map_err(|e| anyhow::anyhow!("decoding offset {}: {e}", message.offset()))?;
                    read += 1;
                }
                Some(Err(e)) => anyhow::bail!("raw consumer: {e}"),
                None => {
                    anyhow::ensure!(started.elapsed() < WAIT, "raw consumer read {read} of {n}");
                }
            }
        }
    }
    let raw_s = started.elapsed().as_secs_f64();
    println!("bare consumer + decode: {raw_s:.2} s ({:.0} rows/s)", n as f64 / raw_s);

    // ---- baseline: the same rows through the embedded log ----
    let embedded_dir = tempfile::tempdir()?;
    let base_config = EngineConfig {
        workers: args.data.workers,
        seal_rows: args.data.seal_rows,
        checkpoint_interval: None,
        compaction_interval: None,
        ..EngineConfig::new(embedded_dir.path())
    };
    let embedded_s = {
        let engine = Engine::open(base_config.clone())?;
        engine.create_collection(schema.clone())?;
        let started = Instant::now();
        insert_all(&engine, COLLECTION, &dataset, &schema, &vectors, &attributes)?;
        let stats = engine.stats(COLLECTION, Consistency::Strong)?;
        anyhow::ensure!(stats.live_rows == n, "embedded: {} of {n} rows", stats.live_rows);
        started.elapsed().as_secs_f64()
    };
    println!("embedded log (insert batches of 1000): {embedded_s:.2} s ({:.0} rows/s)", n as f64 / embedded_s);

    // ---- Kafka to searchable ----
    let kafka_dir = tempfile::tempdir()?;
    let kafka = KafkaConfig {
        bootstrap_servers: args.bootstrap.clone(),
        group_id: format!("bench-{run_id}"),
        topics: [(COLLECTION.to_string(), topic.clone())].into(),
        ..KafkaConfig::default()
    };
    // An object store a replica can share.
    let storage =
        StorageConfig { url: format!("file://{}", kafka_dir.path().join("store").display()), ..Default::default() };
    let config = EngineConfig {
        kafka: Some(kafka),
        storage,
        ..EngineConfig { data_dir: kafka_dir.path().join("primary"), ..base_config }
    };
    let engine = Engine::open(config.clone())?;
    let started = Instant::now();
    engine.create_collection(schema.clone())?;
    loop {
        let stats = engine.stats(COLLECTION, Consistency::Eventually)?;
        if stats.live_rows == n {
            break;
        }
        anyhow::ensure!(started.elapsed() < WAIT, "kafka: {} of {n} rows", stats.live_rows);
        std::thread::sleep(Duration::from_millis(5));
    }
    let kafka_s = started.elapsed().as_secs_f64();
    let query = vectors.row(n / 2).to_vec();
    let hit = engine.search(COLLECTION, &[query], &SearchOptions::new(1))?;
    anyhow::ensure!(hit.hits[0].len() == 1, "a search after ingestion found nothing");
    println!("kafka → searchable: {kafka_s:.2} s ({:.0} rows/s)", n as f64 / kafka_s);

    // ---- produce-to-visible latency under Strong ----
    let single = producer(&args.bootstrap, true)?;
    // Connection and producer id set up before measuring.
    // (Rewrites row 0 with its own values.)
    futures::executor::block_on(send(&single, &topic, &records[0].0, &records[0].1)?)?.map_err(|(e, _)| e)?;
    let mut ack_ms = Vec::new();
    let mut visible_ms = Vec::new();
    let key_of = |i: usize| (n + i) as i64;
    let latency_record = |i: usize| -> (Vec<u8>, Vec<u8>) {
        let mut object = rows_json[i % n].clone();
        let id = key_of(i);
        object.insert(schema.primary().name.clone(), json!(id));
        (encode_key(&Pk::Int(id)), serde_json::Value::Object(object).to_string().into_bytes())
    };
    for i in 0..args.latency_samples {
        let (key, value) = latency_record(i);
        let started = Instant::now();
        futures::executor::block_on(send(&single, &topic, &key, &value)?)?.map_err(|(e, _)| e)?;
        ack_ms.push(started.elapsed().as_secs_f64() * 1e3);
        loop {
            let found = engine.get(COLLECTION, &[Pk::Int(key_of(i))], &GetOptions::default())?;
            if !found.is_empty() {
                break;
            }
            anyhow::ensure!(started.elapsed() < Duration::from_secs(60), "record {i} never became visible");
        }
        visible_ms.push(started.elapsed().as_secs_f64() * 1e3);
    }
    let mut api_ms = Vec::new();
    for i in 0..args.latency_samples.min(200) {
        let j = args.latency_samples + i;
        let row = api_row(&schema, &rows_json[j % n], key_of(j));
        let started = Instant::now();
        engine.insert_rows(COLLECTION, &[row])?;
        api_ms.push(started.elapsed().as_secs_f64() * 1e3);
    }
    let produce_ack = summary(ack_ms);
    let produce_to_visible = summary(visible_ms);
    let api_write = summary(api_ms);
    println!(
        "produce ack {produce_ack}\nproduce to visible (Strong get) {produce_to_visible}\nAPI insert through the topic {api_write}"
    );

    // ---- a read replica ----
    let replica = measure_replica(&engine, &config, &vectors, &rows_json, &schema, key_of(args.latency_samples + 200))?;

    // ---- sustained load above ingest capacity ----
    let stop = Arc::new(AtomicBool::new(false));
    let produced = Arc::new(AtomicU64::new(0));
    let first_key = n + args.latency_samples + 400;
    let overload_records: Vec<(Vec<u8>, Vec<u8>)> = (0..n)
        .map(|i| {
            let mut object = rows_json[i].clone();
            let id = (first_key + i) as i64;
            object.insert(schema.primary().name.clone(), json!(id));
            (encode_key(&Pk::Int(id)), serde_json::Value::Object(object).to_string().into_bytes())
        })
        .collect();
    // After the load's own records are built, so the growth is the engine's.
    let rss_before = rss_mb();
    let load = {
        let (stop, produced, topic, bulk) = (stop.clone(), produced.clone(), topic.clone(), bulk.clone());
        std::thread::spawn(move || -> anyhow::Result<()> {
            for (key, value) in overload_records.iter().cycle() {
                if stop.load(Ordering::Acquire) {
                    break;
                }
                drop(send(&bulk, &topic, key, value)?);
                produced.fetch_add(1, Ordering::Relaxed);
            }
            bulk.flush(Duration::from_secs(120))?;
            Ok(())
        })
    };
    let mut samples = Vec::new();
    let started = Instant::now();
    engine.pause_ingest();
    let mut stalled = true;
    let rows_before = engine.stats(COLLECTION, Consistency::Eventually)?.live_rows;
    let read_records = |engine: &Engine| -> anyhow::Result<u64> {
        let ingest = engine.ingest_stats(COLLECTION)?.context("kafka statistics")?;
        Ok(ingest.partitions.iter().map(|p| p.position).sum())
    };
    let read_before = read_records(&engine)?;
    while started.elapsed() < Duration::from_secs(args.overload_secs) {
        std::thread::sleep(Duration::from_secs(1));
        if stalled && started.elapsed() >= Duration::from_secs(args.stall_secs) {
            engine.resume_ingest();
            stalled = false;
        }
        let ingest = engine.ingest_stats(COLLECTION)?.context("kafka statistics")?;
        let read: u64 = ingest.partitions.iter().map(|p| p.position).sum();
        let sample = json!({ "t_s": started.elapsed().as_secs_f64(), "produced": produced.load(Ordering::Relaxed),
                             "ingested": read - read_before, "lag": ingest.lag(), "rss_mb": rss_mb(),
                             "stalled": stalled });
        println!("overload {sample}");
        samples.push(sample);
    }
    engine.resume_ingest();
    stop.store(true, Ordering::Release);
    let overload_s = started.elapsed().as_secs_f64();
    let drain_started = Instant::now();
    load.join().map_err(|_| anyhow::anyhow!("the load thread panicked"))??;
    let total_produced = produced.load(Ordering::Relaxed);
    loop {
        let ingest = engine.ingest_stats(COLLECTION)?.context("kafka statistics")?;
        if ingest.lag() == 0 {
            break;
        }
        anyhow::ensure!(drain_started.elapsed() < WAIT, "the lag never drained");
        std::thread::sleep(Duration::from_millis(100));
    }
    let drain_s = drain_started.elapsed().as_secs_f64();
    let stats = engine.stats(COLLECTION, Consistency::Strong)?;
    let expected = rows_before + (total_produced as usize).min(n);
    let drained_records = read_records(&engine)? - read_before;
    println!(
        "drained in {drain_s:.1} s after the load stopped; read {drained_records} of {total_produced} records; \
         {} live rows (expected {expected})",
        stats.live_rows
    );
    anyhow::ensure!(drained_records == total_produced, "read {drained_records} of {total_produced} records");
    let peak_rss = samples.iter().filter_map(|s| s["rss_mb"].as_f64()).fold(rss_before, f64::max);
    let max_lag = samples.iter().filter_map(|s| s["lag"].as_u64()).max().unwrap_or(0);

    let results = json!({
        "dataset": dataset.name(),
        "rows": n,
        "dim": vectors.cols,
        "workers": args.data.workers,
        "partitions": partitions,
        "seal_rows": args.data.seal_rows,
        "json_bytes_per_record": json_bytes as f64 / n as f64,
        "produce": { "seconds": produce_s, "records_per_s": n as f64 / produce_s },
        "bare_consumer_decode": { "seconds": raw_s, "rows_per_s": n as f64 / raw_s },
        "embedded_log_insert": { "seconds": embedded_s, "rows_per_s": n as f64 / embedded_s },
        "kafka_to_searchable": { "seconds": kafka_s, "rows_per_s": n as f64 / kafka_s },
        "ratios": {
            "kafka_vs_bare_consumer": raw_s / kafka_s,
            "kafka_vs_embedded_log": embedded_s / kafka_s,
        },
        "latency": { "produce_ack": produce_ack, "produce_to_visible_strong": produce_to_visible,
                     "api_insert_through_topic": api_write },
        "replica": replica,
        "overload": {
            "seconds": overload_s,
            "stall_s": args.stall_secs,
            "produced": total_produced,
            "produce_rate": total_produced as f64 / overload_s,
            "max_lag": max_lag,
            "rss_mb_before": rss_before,
            "rss_mb_peak": peak_rss,
            "drain_s_after_load_stopped": drain_s,
            "records_read": drained_records,
            "live_rows_after": stats.live_rows,
            "live_rows_expected": expected,
            "samples": samples,
        },
    });
    args.data.write_results("kafka.json", &results)?;
    Ok(())
}

/// Opens a read replica of `primary` (after a checkpoint, so it loads
/// segments and follows the topic from there) and measures it against the
/// primary: open time, write-to-visible, search QPS. Writes keys from `first_key`.
fn measure_replica(
    primary: &Engine,
    primary_config: &EngineConfig,
    vectors: &vectorflow::crates::connectors::npy::Matrix<f32>,
    rows_json: &[serde_json::Map<String, serde_json::Value>],
    schema: &vectorflow::CollectionSchema,
    first_key: i64,
) -> anyhow::Result<serde_json::Value> {
    primary.flush(COLLECTION)?;
    let replica_dir = tempfile::tempdir()?;
    let config = EngineConfig { data_dir: replica_dir.path().into(), role: Role::Replica, ..primary_config.clone() };
    let started = Instant::now();
    let replica = Engine::open(config)?;
    let open_s = started.elapsed().as_secs_f64();
    let report = replica.recovery_report();
    println!("replica opened in {open_s:.2} s ({} segments, {} rows loaded)", report.segments, report.rows);

    // API write on the primary → visible on the replica (and on the primary, Strong).
    let mut on_replica_ms = Vec::new();
    let mut on_primary_ms = Vec::new();
    let eventually = GetOptions { consistency: Consistency::Eventually, ..GetOptions::default() };
    for i in 0..100 {
        let key = first_key + i as i64;
        let started = Instant::now();
        primary.insert_rows(COLLECTION, &[api_row(schema, &rows_json[i % rows_json.len()], key)])?;
        let acknowledged = started.elapsed();
        primary.get(COLLECTION, &[Pk::Int(key)], &GetOptions::default())?;
        on_primary_ms.push(started.elapsed().as_secs_f64() * 1e3);
        loop {
            if !replica.get(COLLECTION, &[Pk::Int(key)], &eventually)?.is_empty() {
                break;
            }
            anyhow::ensure!(started.elapsed() < Duration::from_secs(60), "write {i} never reached the replica");
        }
        // From the acknowledgement: what a reader of the replica waits after the writer was told.
        on_replica_ms.push((started.elapsed() - acknowledged).as_secs_f64() * 1e3);
    }
    let visible_on_replica = summary(on_replica_ms);
    let strong_on_primary = summary(on_primary_ms);
    println!(
        "replica: acknowledged-to-visible {visible_on_replica}; on the primary, write + Strong get {strong_on_primary}"
    );

    // Search QPS, one client, Bounded reads, the same queries on each.
    let queries: Vec<Vec<f32>> = (0..500).map(|i| vectors.row((i * 97) % vectors.rows).to_vec()).collect();
    let options = SearchOptions { consistency: Consistency::Bounded, ..SearchOptions::new(10) };
    let qps = |engine: &Engine| -> anyhow::Result<f64> {
        let started = Instant::now();
        for query in &queries {
            engine.search(COLLECTION, std::slice::from_ref(query), &options)?;
        }
        Ok(queries.len() as f64 / started.elapsed().as_secs_f64())
    };
    // Twice in turn, the second round counted: the first warms both up
    // (the primary may still be indexing what the flush sealed).
    let _warm_up = (qps(primary)?, qps(&replica)?);
    let (primary_qps, replica_qps) = (qps(primary)?, qps(&replica)?);
    println!("search QPS (1 client): primary {primary_qps:.0}, replica {replica_qps:.0}");
    Ok(json!({
        "open_s": open_s,
        "segments_loaded": report.segments,
        "rows_loaded": report.rows,
        "acknowledged_to_visible_on_replica_ms": visible_on_replica,
        "write_then_strong_get_on_primary_ms": strong_on_primary,
        "search_qps_primary": primary_qps,
        "search_qps_replica": replica_qps,
        "replica_vs_primary_qps": replica_qps / primary_qps,
    }))
}

/// A dataset row (as JSON) for an API write, under primary key `key`.
pub(crate) fn api_row(
    schema: &vectorflow::CollectionSchema,
    json_row: &serde_json::Map<String, serde_json::Value>,
    key: i64,
) -> vectorflow::Row {
    json_row
        .iter()
        .filter_map(|(name, json)| {
            let field = schema.field(name).ok()?.1;
            vectorflow::crates::core::value::value_from_json(name, &field.data_type, json.clone())
                .ok()
                .map(|v| (name.clone(), v))
        })
        .chain([(schema.primary().name.clone(), Value::Int(key))])
        .collect()
}
