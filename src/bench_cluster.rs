//! `vectorflow bench-cluster`: the same dataset through clusters of 1, 2
//! and 3 processes (`--processes`), measured in one run. The processes of
//! a cluster are engines in this OS process, each with its own timely
//! process index, exchanging over loopback TCP as separate machines would
//! (serialisation and sockets included); they share this machine's cores,
//! so the ratios show the cost of the exchange, not scaling. Per cluster:
//! - ingest: every row produced to the collection's topic as JSON while
//!   ingestion is paused, then timed from the resume until a Strong count
//!   at process 0 sees them all;
//! - search QPS and recall@10 with queries spread over the processes;
//! - write at one process, Strong read of it at the next;
//! - for the largest cluster, the time to reopen every process (recovery
//!   from the checkpoint and the topic) after they all stopped.

use std::time::{Duration, Instant};

use anyhow::Context;
use serde_json::json;

use crate::bench::{DatasetArgs, latency_summary};
use crate::bench_kafka::{api_row, json_records, produce_all, producer, summary};
use vectorflow::crates::connectors::dataset::RecallJudge;
use vectorflow::{
    ClusterConfig, Consistency, Engine, EngineConfig, GetOptions, KafkaConfig, Pk, QueryOptions, SearchOptions,
    StorageConfig,
};

#[derive(Debug, Clone, clap::Args)]
pub struct ClusterBenchArgs {
    #[command(flatten)]
    pub data: DatasetArgs,
    /// The broker (`host:port`).
    #[arg(long)]
    pub bootstrap: String,
    /// Cluster sizes to measure, in processes (each with `--workers` workers).
    #[arg(long, value_delimiter = ',', default_value = "1,2,3")]
    pub processes: Vec<usize>,
    /// Search clients.
    #[arg(long, default_value_t = 2)]
    pub clients: usize,
    #[arg(long, default_value_t = 64)]
    pub ef: usize,
    /// Queries per QPS measurement (the dataset's, cycled).
    #[arg(long, default_value_t = 2_000)]
    pub queries: usize,
}

const COLLECTION: &str = "bench";
const WAIT: Duration = Duration::from_secs(3600);
const K: usize = 10;

pub fn run(args: ClusterBenchArgs) -> anyhow::Result<()> {
    let dataset = args.data.open()?;
    let vectors = dataset.base_vectors()?;
    let query_vectors = dataset.query_vectors()?;
    let attributes = dataset.base_attributes()?;
    let truth = dataset.ground_truth("unfiltered")?.context("the dataset has no `unfiltered` ground truth")?;
    let judge = RecallJudge::new(&vectors, &query_vectors, dataset.metric())?;
    let n = vectors.rows;
    let schema = dataset.collection_schema(COLLECTION, &attributes)?;
    let (records, rows_json) = json_records(&dataset, &schema, &vectors, &attributes)?;
    let run_id = std::process::id();
    println!(
        "dataset {}: {n} x {}, {} workers per process, clusters of {:?} processes",
        dataset.name(),
        vectors.cols,
        args.data.workers,
        args.processes
    );
    let largest = args.processes.iter().copied().max().unwrap_or(1);
    let mut results = Vec::new();
    for &processes in &args.processes {
        anyhow::ensure!(processes > 0, "--processes: a cluster has at least 1 process");
        let dir = tempfile::tempdir()?;
        let configs = cluster_configs(&args, dir.path(), processes, &format!("bc{run_id}p{processes}"))?;
        let started = Instant::now();
        let engines = open_all(&configs)?;
        let open_s = started.elapsed().as_secs_f64();
        engines[0].create_collection(schema.clone())?;
        let topic = configs[0].kafka.as_ref().map(|k| k.topic_of(COLLECTION)).unwrap_or_default();

        // ---- ingest: everything produced while ingestion is paused, then
        // timed from the resume until a Strong count sees every row ----
        engines.iter().for_each(Engine::pause_ingest);
        let started = Instant::now();
        produce_all(&producer(&args.bootstrap, false)?, &topic, &records)?;
        let produced_s = started.elapsed().as_secs_f64();
        let started = Instant::now();
        engines.iter().for_each(Engine::resume_ingest);
        let strong = QueryOptions { consistency: Consistency::Strong, ..QueryOptions::default() };
        loop {
            let count = engines[0].count(COLLECTION, &strong)?;
            if count == n {
                break;
            }
            anyhow::ensure!(started.elapsed() < WAIT, "{processes} processes: {count} of {n} rows");
            std::thread::sleep(Duration::from_millis(20));
        }
        let ingest_s = started.elapsed().as_secs_f64();
        eprintln!("{processes} process(es): ingested in {ingest_s:.2} s; flushing");
        engines[0].flush(COLLECTION)?;
        engines[0].wait_for_indexes(COLLECTION, WAIT)?;
        eprintln!("{processes} process(es): flushed; searching");

        // ---- search, each query at the next process ----
        let options =
            SearchOptions { consistency: Consistency::Eventually, ef: Some(args.ef), ..SearchOptions::new(K) };
        let queries: Vec<usize> = (0..args.queries).map(|i| i % query_vectors.rows).collect();
        let search_started = Instant::now();
        let per_client: Vec<anyhow::Result<Vec<(f64, f64)>>> = std::thread::scope(|scope| {
            let handles: Vec<_> = (0..args.clients.max(1))
                .map(|c| {
                    let (engines, queries, options, truth, judge) = (&engines, &queries, &options, &truth, &judge);
                    let query_vectors = &query_vectors;
                    scope.spawn(move || -> anyhow::Result<Vec<(f64, f64)>> {
                        let mut out = Vec::new();
                        for i in (c..queries.len()).step_by(args.clients.max(1)) {
                            let q = queries[i];
                            let engine = &engines[i % engines.len()];
                            let t = Instant::now();
                            let found =
                                engine.search(COLLECTION, &[query_vectors.row(q).to_vec()], options)?.hits.remove(0);
                            let ms = t.elapsed().as_secs_f64() * 1e3;
                            let ids: Vec<i64> =
                                found.iter().map(|h| if let Pk::Int(id) = h.pk { id } else { -1 }).collect();
                            out.push((ms, truth.recall(judge, q, K, &ids)));
                        }
                        Ok(out)
                    })
                })
                .collect();
            handles
                .into_iter()
                .map(|h| h.join().unwrap_or_else(|_| Err(anyhow::anyhow!("a client panicked"))))
                .collect()
        });
        let elapsed = search_started.elapsed().as_secs_f64();
        let mut latencies = Vec::new();
        let mut recall = 0.0;
        for client in per_client {
            for (ms, r) in client? {
                latencies.push(ms);
                recall += r;
            }
        }
        let searches = latencies.len().max(1) as f64;
        let (qps, p50_ms, p99_ms) = latency_summary(latencies, elapsed);

        // ---- a write at one process, read Strong at the next ----
        let mut visible_ms = Vec::new();
        for i in 0..100usize {
            let key = 1_000_000_000 + i as i64;
            let started = Instant::now();
            engines[i % processes].insert_rows(COLLECTION, &[api_row(&schema, &rows_json[i % n], key)])?;
            let got = engines[(i + 1) % processes].get(COLLECTION, &[Pk::Int(key)], &GetOptions::default())?;
            anyhow::ensure!(got.len() == 1, "write {i} not visible at the next process");
            visible_ms.push(started.elapsed().as_secs_f64() * 1e3);
        }
        let write_then_strong_get = summary(visible_ms);
        println!(
            "{processes} process(es): open {open_s:.2} s; ingest {n} rows in {ingest_s:.2} s ({:.0} rows/s; produce \
             {produced_s:.2} s); search {qps:.0} QPS, recall {:.3}, p50 {p50_ms:.2} ms, p99 {p99_ms:.2} ms; \
             write + Strong get at the next process {write_then_strong_get}",
            n as f64 / ingest_s,
            recall / searches
        );
        let mut result = json!({
            "processes": processes,
            "workers_per_process": args.data.workers,
            "open_s": open_s,
            "ingest_s": ingest_s,
            "ingest_rows_per_s": n as f64 / ingest_s,
            "produce_s": produced_s,
            "search": { "clients": args.clients, "ef": args.ef, "k": K, "qps": qps, "recall": recall / searches,
                        "p50_ms": p50_ms, "p99_ms": p99_ms },
            "write_then_strong_get_at_next_process_ms": write_then_strong_get,
        });

        // ---- recovery: every process stops (no flush), then all reopen ----
        if processes == largest {
            for engine in &engines {
                engine.shutdown();
            }
            drop(engines);
            let started = Instant::now();
            let engines = open_all(&configs)?;
            let recover_s = started.elapsed().as_secs_f64();
            let count = engines[0].count(COLLECTION, &strong)?;
            anyhow::ensure!(count == n + 100, "after recovery: {count} rows, {} expected", n + 100);
            let report = engines.iter().map(|e| e.recovery_report()).collect::<Vec<_>>();
            println!(
                "{processes} processes recovered in {recover_s:.2} s (segments loaded per process: {:?}, rows replayed: {:?})",
                report.iter().map(|r| r.segments).collect::<Vec<_>>(),
                report.iter().map(|r| r.replayed_rows).collect::<Vec<_>>()
            );
            result["recovery"] = json!({
                "reopen_all_s": recover_s,
                "segments_loaded": report.iter().map(|r| r.segments).collect::<Vec<_>>(),
                "rows_loaded": report.iter().map(|r| r.rows).collect::<Vec<_>>(),
                "rows_replayed": report.iter().map(|r| r.replayed_rows).collect::<Vec<_>>(),
            });
            for engine in &engines {
                engine.shutdown();
            }
        } else {
            for engine in &engines {
                engine.shutdown();
            }
        }
        results.push(result);
    }
    let baseline = results.first().cloned().unwrap_or_default();
    for result in &mut results {
        let ratio = |path: &[&str]| {
            let get = |v: &serde_json::Value| path.iter().fold(v.clone(), |v, key| v[*key].clone()).as_f64();
            match (get(result), get(&baseline)) {
                (Some(value), Some(base)) if base > 0.0 => value / base,
                _ => f64::NAN,
            }
        };
        let (ingest, qps) = (ratio(&["ingest_rows_per_s"]), ratio(&["search", "qps"]));
        result["vs_first"] = json!({ "ingest": ingest, "qps": qps });
    }
    args.data.write_results(
        &format!("cluster-{}.json", dataset.name()),
        &json!({ "dataset": dataset.name(), "rows": n, "dim": vectors.cols, "clusters": results }),
    )?;
    Ok(())
}

/// The engines of a cluster of `processes` on loopback, sharing a file
/// object store and topics named by `prefix`.
fn cluster_configs(
    args: &ClusterBenchArgs,
    dir: &std::path::Path,
    processes: usize,
    prefix: &str,
) -> anyhow::Result<Vec<EngineConfig>> {
    let first_port = free_ports(processes)?;
    let addresses: Vec<String> = (0..processes).map(|i| format!("127.0.0.1:{}", first_port + i as u16)).collect();
    let kafka = KafkaConfig {
        bootstrap_servers: args.bootstrap.clone(),
        group_id: prefix.to_string(),
        topic_prefix: prefix.to_string(),
        ..KafkaConfig::default()
    };
    let storage = StorageConfig { url: format!("file://{}", dir.join("store").display()), ..Default::default() };
    Ok((0..processes)
        .map(|process| EngineConfig {
            workers: args.data.workers,
            seal_rows: args.data.seal_rows,
            cluster: ClusterConfig { processes: addresses.clone(), process, private_network: false },
            kafka: Some(kafka.clone()),
            storage: storage.clone(),
            // Checkpoints on flush only: none run during the searches measured.
            checkpoint_interval: None,
            compaction_interval: None,
            ..EngineConfig::new(dir.join(format!("process-{process}")))
        })
        .collect())
}

/// Opens every process of a cluster at once (each waits for the others to connect).
fn open_all(configs: &[EngineConfig]) -> anyhow::Result<Vec<Engine>> {
    std::thread::scope(|scope| {
        let opening: Vec<_> = configs.iter().map(|config| scope.spawn(|| Engine::open(config.clone()))).collect();
        opening
            .into_iter()
            .enumerate()
            .map(|(i, handle)| {
                handle
                    .join()
                    .map_err(|_| anyhow::anyhow!("opening process {i} panicked"))?
                    .with_context(|| format!("opening process {i}"))
            })
            .collect()
    })
}

/// The first of `count` consecutive free loopback ports.
fn free_ports(count: usize) -> anyhow::Result<u16> {
    for _ in 0..100 {
        let first = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
        if first as usize + count > u16::MAX as usize {
            continue;
        }
        if (first..first + count as u16).all(|port| std::net::TcpListener::bind(("127.0.0.1", port)).is_ok()) {
            return Ok(first);
        }
    }
    anyhow::bail!("found no {count} consecutive free loopback ports")
}
