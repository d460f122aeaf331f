//! `vectorflow bench-sink`: Kafka sinks under a steady write load, against
//! the same load without them, in one run on a running broker. A dataset
//! is loaded into an engine whose log is Kafka; a writer inserts its rows
//! again under new keys at `--rate` rows/s, then at full speed; then two
//! sinks are made (a changefeed of every row, and `--searches` search
//! subscriptions of k 10 in one sink) and the writer runs again while a
//! plain consumer reads the changefeed's topic. Reported: the time from a
//! write's acknowledgement to its record reaching the consumer (p50/p99, at
//! the steady rate), the ingest rate and CPU with and without the sinks,
//! and how fast the changefeed sink writes records when the writer runs at
//! full speed.

use std::collections::HashMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context;
use rdkafka::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::Message;
use rdkafka::topic_partition_list::{Offset, TopicPartitionList};
use serde_json::json;

use crate::bench::{DatasetArgs, insert_all, percentile};
use crate::bench_subscribe::{COLLECTION, Writer};
use vectorflow::{Engine, EngineConfig, KafkaConfig, SinkState, SubscribeOptions};

#[derive(Debug, Clone, clap::Args)]
pub struct SinkBenchArgs {
    #[command(flatten)]
    pub data: DatasetArgs,
    /// The broker (`host:port`).
    #[arg(long)]
    pub bootstrap: String,
    /// Rows per second the writer inserts.
    #[arg(long, default_value_t = 1_000)]
    pub rate: usize,
    /// Seconds each throttled phase writes.
    #[arg(long, default_value_t = 15)]
    pub seconds: u64,
    /// Seconds each full-speed phase writes.
    #[arg(long, default_value_t = 5)]
    pub burst_seconds: u64,
    /// Query vectors of the search sink (k 10 each).
    #[arg(long, default_value_t = 100)]
    pub searches: usize,
}

pub fn run(args: SinkBenchArgs) -> anyhow::Result<()> {
    let dataset = args.data.open()?;
    let vectors = dataset.base_vectors()?;
    let queries = dataset.query_vectors()?;
    let attributes = dataset.base_attributes()?;
    let schema = dataset.collection_schema(COLLECTION, &attributes)?;
    // Topics of this run only: a broker keeps the last run's.
    let prefix = format!("bench-sink-{:x}.", run_suffix());
    let dir = tempfile::tempdir()?;
    let engine = Engine::open(EngineConfig {
        workers: args.data.workers,
        seal_rows: args.data.seal_rows,
        checkpoint_interval: None,
        compaction_interval: None,
        kafka: Some(KafkaConfig {
            bootstrap_servers: args.bootstrap.clone(),
            topic_prefix: prefix.clone(),
            ..KafkaConfig::default()
        }),
        ..EngineConfig::new(dir.path())
    })?;
    engine.create_collection(schema.clone())?;
    insert_all(&engine, COLLECTION, &dataset, &schema, &vectors, &attributes)?;
    println!(
        "dataset {}: {} x {} loaded through Kafka; writer {} rows/s",
        dataset.name(),
        vectors.rows,
        vectors.cols,
        args.rate
    );
    let mut writer = Writer::new(&dataset, &schema, &vectors, &attributes)?;

    let quiet = writer.run(&engine, Some(args.rate), args.seconds)?;
    let quiet_burst = writer.run(&engine, None, args.burst_seconds)?;
    println!(
        "without sinks: {:.0} rows/s at {:.2} cores; full speed {:.0} rows/s",
        quiet.rows_per_s, quiet.cores, quiet_burst.rows_per_s
    );

    let feed_topic = format!("{prefix}cdc");
    let opened = Instant::now();
    let feed = engine.create_sink("cdc", COLLECTION, &feed_topic, &SubscribeOptions::changes())?;
    let searches = (0..args.searches).map(|i| queries.row(i % queries.rows).to_vec()).collect();
    let near =
        engine.create_sink("near", COLLECTION, &format!("{prefix}near"), &SubscribeOptions::search(searches, 10))?;
    // Measured once both have written their first answer.
    for (name, start) in [("cdc", feed.definition.start_ts), ("near", near.definition.start_ts)] {
        wait_written(&engine, name, start)?;
    }
    let open_s = opened.elapsed().as_secs_f64();
    println!("sinks made and their first answers written in {open_s:.2} s");
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", &args.bootstrap)
        .set("group.id", format!("{prefix}reader"))
        .set("fetch.wait.max.ms", "5")
        .set("enable.auto.commit", "false")
        .create()?;
    let mut assignment = TopicPartitionList::new();
    assignment.add_partition_offset(&feed_topic, feed.definition.partition, Offset::Beginning)?;
    consumer.assign(&assignment)?;
    let reading = AtomicBool::new(true);
    // The first time each `ts` reached the consumer.
    let arrived: Mutex<HashMap<u64, Instant>> = Mutex::new(HashMap::new());
    let (loud, loud_burst, burst_drain_s, burst_records) = std::thread::scope(|scope| -> anyhow::Result<_> {
        let reader = scope.spawn(|| {
            while reading.load(Ordering::Acquire) {
                let Some(Ok(message)) = consumer.poll(Duration::from_millis(50)) else { continue };
                let ts = message
                    .payload()
                    .and_then(|value| serde_json::from_slice::<serde_json::Value>(value).ok())
                    .and_then(|value| value["ts"].as_u64());
                if let (Some(ts), Ok(mut arrived)) = (ts, arrived.lock()) {
                    arrived.entry(ts).or_insert_with(Instant::now);
                }
            }
        });
        let loud = writer.run(&engine, Some(args.rate), args.seconds);
        let records_before = sink_records(&engine, "cdc")?;
        let loud_burst = writer.run(&engine, None, args.burst_seconds);
        // How long the sink takes to have written every record of the burst.
        let last = loud_burst.as_ref().ok().and_then(|b| b.acks.keys().max().copied()).unwrap_or(0);
        let burst_started = loud_burst.as_ref().map(|b| b.started).unwrap_or_else(|_| Instant::now());
        wait_written(&engine, "cdc", last)?;
        let drain_s = burst_started.elapsed().as_secs_f64();
        let burst_records = sink_records(&engine, "cdc")? - records_before;
        std::thread::sleep(Duration::from_millis(500));
        reading.store(false, Ordering::Release);
        reader.join().map_err(|_| anyhow::anyhow!("the topic reader panicked"))?;
        Ok((loud?, loud_burst?, drain_s, burst_records))
    })?;
    let arrived = arrived.into_inner().unwrap_or_default();
    let mut latencies: Vec<f64> = loud
        .acks
        .iter()
        .filter_map(|(ts, ack)| arrived.get(ts).map(|at| at.saturating_duration_since(*ack).as_secs_f64() * 1e3))
        .collect();
    latencies.sort_by(f64::total_cmp);
    let sink_records_per_s = burst_records as f64 / burst_drain_s;
    println!(
        "with a changefeed sink and a {}-query search sink: {:.0} rows/s at {:.2} cores; full speed {:.0} rows/s; \
         acknowledgement → record read from the topic p50 {:.2} ms, p99 {:.2} ms ({} of {} writes seen); \
         the changefeed sink wrote {burst_records} records of the burst in {burst_drain_s:.2} s ({sink_records_per_s:.0} records/s)",
        args.searches,
        loud.rows_per_s,
        loud.cores,
        loud_burst.rows_per_s,
        percentile(&latencies, 0.5),
        percentile(&latencies, 0.99),
        latencies.len(),
        loud.acks.len(),
    );
    let results = json!({
        "dataset": dataset.name(), "rows": vectors.rows, "workers": args.data.workers,
        "writer_rows_per_s": args.rate, "seconds": args.seconds, "search_sink_queries": args.searches,
        "without": { "rows_per_s": quiet.rows_per_s, "cores": quiet.cores, "full_speed_rows_per_s": quiet_burst.rows_per_s },
        "sinks_open_s": open_s,
        "with": { "rows_per_s": loud.rows_per_s, "cores": loud.cores, "full_speed_rows_per_s": loud_burst.rows_per_s,
                  "ack_to_topic_reader_p50_ms": percentile(&latencies, 0.5),
                  "ack_to_topic_reader_p99_ms": percentile(&latencies, 0.99),
                  "writes_seen": latencies.len(), "writes": loud.acks.len(),
                  "burst_records": burst_records, "burst_drain_s": burst_drain_s,
                  "sink_records_per_s": sink_records_per_s },
        "sink_cores": loud.cores - quiet.cores,
        "full_speed_ratio": loud_burst.rows_per_s / quiet_burst.rows_per_s,
    });
    args.data.write_results(&format!("sink-{}.json", dataset.name()), &results).context("writing the results")?;
    engine.drop_sink("cdc")?;
    engine.drop_sink("near")?;
    engine.shutdown();
    Ok(())
}

/// Waits until sink `name` has written every record through `ts`.
fn wait_written(engine: &Engine, name: &str, ts: u64) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(600);
    loop {
        let status = engine.sinks()?.into_iter().find(|s| s.definition.name == name).context("the sink")?;
        if let SinkState::Failed(why) = &status.state {
            anyhow::bail!("sink {name} failed: {why}");
        }
        if status.written_through >= ts {
            return Ok(());
        }
        anyhow::ensure!(Instant::now() < deadline, "sink {name} did not write through {ts} in 600 s");
        std::thread::sleep(Duration::from_millis(5));
    }
}

fn sink_records(engine: &Engine, name: &str) -> anyhow::Result<u64> {
    Ok(engine.sinks()?.into_iter().find(|s| s.definition.name == name).context("the sink")?.records)
}

/// A run's own suffix for its topics (the clock's nanoseconds).
fn run_suffix() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos() as u64)
}
