//! `vectorflow bench-subscribe`: standing queries under a steady write
//! load, against the same load without them, in one run. A dataset is
//! loaded, then a writer inserts its rows again under new keys at
//! `--rate` rows/s; then `--subscriptions` search subscriptions (k 10, the
//! dataset's query vectors, every tenth with the `filter10` filter) are
//! opened and the writer runs again. Reported: the time from a write's
//! acknowledgement to a change it caused reaching the subscriber (p50/p99,
//! at the steady rate, once every subscription has its first answer), the
//! time until every subscription had its first answer (each starts from an
//! exact scan of every shard), the process's CPU (cores busy) with and without the
//! subscriptions, and the ingest rate the writer reached, throttled and
//! at full speed.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use arrow::array::{ArrayRef, Int64Array};
use arrow::record_batch::RecordBatch;
use serde_json::json;

use crate::bench::{DatasetArgs, insert_all, percentile, process_usage};
use vectorflow::{Consistency, Engine, EngineConfig, QueryOptions, SubscribeOptions, Subscription, SubscriptionEvent};

#[derive(Debug, Clone, clap::Args)]
pub struct SubscribeBenchArgs {
    #[command(flatten)]
    pub data: DatasetArgs,
    /// Search subscriptions opened.
    #[arg(long, default_value_t = 1_000)]
    pub subscriptions: usize,
    /// Rows per second the writer inserts.
    #[arg(long, default_value_t = 1_000)]
    pub rate: usize,
    /// Seconds each throttled phase writes.
    #[arg(long, default_value_t = 20)]
    pub seconds: u64,
    /// Seconds each full-speed phase writes.
    #[arg(long, default_value_t = 5)]
    pub burst_seconds: u64,
}

pub(crate) const COLLECTION: &str = "bench";
const K: usize = 10;
/// Rows per write.
const WRITE_ROWS: usize = 10;

pub fn run(args: SubscribeBenchArgs) -> anyhow::Result<()> {
    let dataset = args.data.open()?;
    let vectors = dataset.base_vectors()?;
    let queries = dataset.query_vectors()?;
    let attributes = dataset.base_attributes()?;
    let schema = dataset.collection_schema(COLLECTION, &attributes)?;
    let filter10 = dataset.info.ground_truth.get("filter10").and_then(|t| t.expression.clone());
    let n = vectors.rows;
    let dir = tempfile::tempdir()?;
    let engine = Engine::open(EngineConfig {
        workers: args.data.workers,
        seal_rows: args.data.seal_rows,
        checkpoint_interval: None,
        compaction_interval: None,
        ..EngineConfig::new(dir.path())
    })?;
    engine.create_collection(schema.clone())?;
    insert_all(&engine, COLLECTION, &dataset, &schema, &vectors, &attributes)?;
    engine.flush(COLLECTION)?;
    engine.wait_for_indexes(COLLECTION, Duration::from_secs(3600))?;
    println!("dataset {}: {n} x {} loaded; writer {} rows/s", dataset.name(), vectors.cols, args.rate);
    let mut writer = Writer::new(&dataset, &schema, &vectors, &attributes)?;
    let mut write = |engine: &Engine, rate: Option<usize>, seconds: u64| writer.run(engine, rate, seconds);

    // ---- without subscriptions ----
    let quiet = write(&engine, Some(args.rate), args.seconds)?;
    let quiet_burst = write(&engine, None, args.burst_seconds)?;
    println!(
        "without subscriptions: {:.0} rows/s at {:.2} cores; full speed {:.0} rows/s",
        quiet.rows_per_s, quiet.cores, quiet_burst.rows_per_s
    );

    // ---- with them ----
    let opened = Instant::now();
    let mut subscriptions: Vec<Subscription> = (0..args.subscriptions)
        .map(|i| {
            let options = SubscribeOptions {
                filter: if i % 10 == 9 { filter10.clone() } else { None },
                buffer: 1 << 16,
                progress_every: Duration::from_secs(3600),
                ..SubscribeOptions::search(vec![queries.row(i % queries.rows).to_vec()], K)
            };
            engine.subscribe(COLLECTION, &options)
        })
        .collect::<Result<_, _>>()?;
    let subscribed_s = opened.elapsed().as_secs_f64();
    let receiving = AtomicBool::new(true);
    let first_answers = AtomicUsize::new(0);
    let received: Mutex<Vec<(u64, Instant)>> = Mutex::new(Vec::new());
    let (loud, loud_burst, snapshots, open_s) = std::thread::scope(|scope| -> anyhow::Result<_> {
        let consumers: Vec<_> = subscriptions
            .chunks_mut(args.subscriptions.div_ceil(2).max(1))
            .map(|mine| {
                let (receiving, received, first_answers) = (&receiving, &received, &first_answers);
                scope.spawn(move || -> anyhow::Result<usize> {
                    let mut snapshots = 0;
                    let mut seen = Vec::new();
                    while receiving.load(Ordering::Acquire) {
                        let mut any = false;
                        for subscription in mine.iter_mut() {
                            while let Some(event) = subscription.recv_timeout(Duration::ZERO)? {
                                any = true;
                                match event {
                                    SubscriptionEvent::Snapshot { .. } => {
                                        snapshots += 1;
                                        first_answers.fetch_add(1, Ordering::AcqRel);
                                    }
                                    SubscriptionEvent::Changed { ts, .. } => seen.push((ts, Instant::now())),
                                    _ => {}
                                }
                            }
                        }
                        if !any {
                            std::thread::sleep(Duration::from_millis(1));
                        }
                    }
                    received.lock().map_err(|_| anyhow::anyhow!("poisoned"))?.extend(seen);
                    Ok(snapshots)
                })
            })
            .collect();
        // Open means answering: each subscription starts with an exact
        // scan of every shard, on the workers, which ingestion waits behind.
        let deadline = Instant::now() + Duration::from_secs(600);
        while first_answers.load(Ordering::Acquire) < args.subscriptions && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(5));
        }
        let open_s = opened.elapsed().as_secs_f64();
        let loud = write(&engine, Some(args.rate), args.seconds);
        let loud_burst = write(&engine, None, args.burst_seconds);
        // The changes of the last writes arrive after a Strong read's time.
        engine.count(COLLECTION, &QueryOptions { consistency: Consistency::Strong, ..QueryOptions::default() })?;
        std::thread::sleep(Duration::from_millis(500));
        receiving.store(false, Ordering::Release);
        let mut snapshots = 0;
        for consumer in consumers {
            snapshots += consumer.join().map_err(|_| anyhow::anyhow!("a consumer panicked"))??;
        }
        Ok((loud?, loud_burst?, snapshots, open_s))
    })?;
    anyhow::ensure!(snapshots == args.subscriptions, "{snapshots} of {} subscriptions answered", args.subscriptions);
    // Latency at the steady rate only: at full speed the writes outrun
    // the workers and what is measured is how far they fell behind.
    let acks = &loud.acks;
    // (latency ms, seconds into the phase the write was acknowledged)
    let mut timed: Vec<(f64, f64)> = received
        .into_inner()
        .unwrap_or_default()
        .into_iter()
        .filter_map(|(ts, at)| {
            acks.get(&ts).map(|ack| {
                let latency = at.saturating_duration_since(*ack).as_secs_f64() * 1e3;
                (latency, ack.saturating_duration_since(loud.started).as_secs_f64())
            })
        })
        .collect();
    timed.sort_by(|a, b| a.0.total_cmp(&b.0));
    let latencies: Vec<f64> = timed.iter().map(|(latency, _)| *latency).collect();
    let worst: Vec<String> =
        timed.iter().rev().take(5).map(|(latency, at)| format!("{latency:.0} ms at {at:.1} s")).collect();
    println!("slowest changes (latency, when the write was acknowledged in the phase): {}", worst.join(", "));
    let changed_writes = latencies.len();
    println!(
        "with {} subscriptions (subscribed in {subscribed_s:.2} s, every first answer in {open_s:.2} s): {:.0} rows/s at {:.2} cores; full speed {:.0} rows/s; \
         {changed_writes} changes delivered, acknowledgement → subscriber p50 {:.2} ms, p99 {:.2} ms",
        args.subscriptions,
        loud.rows_per_s,
        loud.cores,
        loud_burst.rows_per_s,
        percentile(&latencies, 0.5),
        percentile(&latencies, 0.99)
    );
    let results = json!({
        "dataset": dataset.name(), "rows": n, "workers": args.data.workers,
        "subscriptions": args.subscriptions, "k": K, "filtered_fraction": 0.1, "filter": filter10,
        "writer_rows_per_s": args.rate, "seconds": args.seconds,
        "without": { "rows_per_s": quiet.rows_per_s, "cores": quiet.cores, "full_speed_rows_per_s": quiet_burst.rows_per_s },
        "with": { "rows_per_s": loud.rows_per_s, "cores": loud.cores, "full_speed_rows_per_s": loud_burst.rows_per_s,
                  "subscribe_calls_s": subscribed_s, "open_s": open_s, "changes_delivered": changed_writes,
                  "ack_to_subscriber_p50_ms": percentile(&latencies, 0.5),
                  "ack_to_subscriber_p90_ms": percentile(&latencies, 0.9),
                  "ack_to_subscriber_p99_ms": percentile(&latencies, 0.99),
                  "slowest": worst },
        "subscription_cores": loud.cores - quiet.cores,
        "full_speed_ratio": loud_burst.rows_per_s / quiet_burst.rows_per_s,
    });
    args.data.write_results(&format!("subscribe-{}.json", dataset.name()), &results).context("writing the results")?;
    drop(subscriptions);
    engine.shutdown();
    Ok(())
}

/// One writer phase: the rate reached, the CPU the process used, and each write's acknowledgement.
pub(crate) struct Phase {
    pub started: Instant,
    pub rows_per_s: f64,
    pub cores: f64,
    pub acks: HashMap<u64, Instant>,
}

/// Writes a dataset's first rows again under new keys, in inserts of
/// [`WRITE_ROWS`], at a steady rate or as fast as they are acknowledged.
pub(crate) struct Writer {
    batches: Vec<RecordBatch>,
    pk: usize,
    next_key: i64,
}

impl Writer {
    pub fn new(
        dataset: &vectorflow::Dataset,
        schema: &vectorflow::CollectionSchema,
        vectors: &vectorflow::crates::connectors::npy::Matrix<f32>,
        attributes: &RecordBatch,
    ) -> anyhow::Result<Writer> {
        let n = vectors.rows;
        let batches: Vec<RecordBatch> = (0..n.min(20_000))
            .step_by(WRITE_ROWS)
            .map(|start| dataset.base_batch(schema, vectors, attributes, start..(start + WRITE_ROWS).min(n)))
            .collect::<Result<_, _>>()?;
        Ok(Writer { batches, pk: schema.primary_index(), next_key: 1_000_000_000 })
    }

    /// Writes for `seconds`, at `rate` rows/s (`None`: full speed).
    pub fn run(&mut self, engine: &Engine, rate: Option<usize>, seconds: u64) -> anyhow::Result<Phase> {
        let mut acks = HashMap::new();
        let started = Instant::now();
        let usage = process_usage();
        let mut rows = 0;
        let mut i = 0;
        while started.elapsed() < Duration::from_secs(seconds) {
            let mut batch = self.batches[i % self.batches.len()].clone();
            i += 1;
            let keys: ArrayRef =
                Arc::new(Int64Array::from_iter_values(self.next_key..self.next_key + batch.num_rows() as i64));
            self.next_key += batch.num_rows() as i64;
            let mut columns = batch.columns().to_vec();
            columns[self.pk] = keys;
            batch = RecordBatch::try_new(batch.schema(), columns)?;
            let written = engine.insert(COLLECTION, &batch)?;
            acks.insert(written.ts, Instant::now());
            rows += batch.num_rows();
            if let Some(rate) = rate {
                let due = started + Duration::from_secs_f64(rows as f64 / rate as f64);
                std::thread::sleep(due.saturating_duration_since(Instant::now()));
            }
        }
        let elapsed = started.elapsed().as_secs_f64();
        let cpu = (process_usage().cpu - usage.cpu).as_secs_f64();
        Ok(Phase { started, rows_per_s: rows as f64 / elapsed, cores: cpu / elapsed, acks })
    }
}
