//! `vectorflow bench soak --minutes N`: a long mixed load against a real
//! server, to find what only time shows (leaks, stalls, lost writes).
//!
//! The bench starts `vectorflow serve` (this binary) on a fresh data
//! directory, and `--clients` clients each loop over a mix of search,
//! insert, upsert, delete and query on their own keys. Every client keeps a
//! model of its keys (each live key's version `n`), so:
//! - a Strong query of its own keys must answer what the model says (a
//!   wrong answer is counted);
//! - at the end the server is killed (SIGKILL) and started again on its
//!   data, and every key ever written is read back with a Strong get: a
//!   live key missing or with an older `n` is a lost write, a deleted key
//!   present is a resurrected one. Keys whose last write failed may hold
//!   either outcome and are not checked (any failure is an error anyway).
//!
//! A write the server refuses untaken under backpressure
//! (RESOURCE_EXHAUSTED) is sent again after a pause, as Milvus clients do;
//! those refusals are counted apart.
//!
//! Reported: errors (any call that failed otherwise), lost and resurrected rows,
//! p50/p99 per operation, the server's resident memory at each minute and
//! each minute's calls and p99.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::json;
use tonic::transport::Channel;
use vectorflow::{CollectionSchema, DataType, FieldSchema, Metric, Pk};
use vectorflow_proto::v1::vectorflow_client::VectorflowClient;
use vectorflow_proto::v1::{self, field_data::Values};
use vectorflow_proto::{self as wire};

use crate::bench::{percentile, rss_of};

#[derive(Debug, Clone, clap::Args)]
pub struct SoakArgs {
    /// How long the load runs, in minutes.
    #[arg(long, default_value_t = 10)]
    pub minutes: u64,
    /// Concurrent clients, one connection each.
    #[arg(long, default_value_t = 8)]
    pub clients: usize,
    /// Vector dimension of the collection.
    #[arg(long, default_value_t = 64)]
    pub dim: usize,
    /// Rows each client inserts before the mixed load starts.
    #[arg(long, default_value_t = 5_000)]
    pub initial_rows: usize,
    /// Rows per insert or upsert call.
    #[arg(long, default_value_t = 20)]
    pub batch: usize,
    #[arg(long, default_value_t = 2)]
    pub workers: usize,
    #[arg(long, default_value_t = 16_384)]
    pub seal_rows: usize,
    /// The server's time-travel window, in seconds: history older than this
    /// is compacted away, so memory can level off while the load goes on.
    #[arg(long, default_value_t = 60)]
    pub retention_secs: u64,
    /// How often the server compacts, in milliseconds.
    #[arg(long, default_value_t = 30_000)]
    pub compaction_interval_ms: u64,
    /// Where the results go (`soak.json`).
    #[arg(long, default_value = "bench-out")]
    pub out: PathBuf,
}

const COLLECTION: &str = "soak";
const OPERATIONS: [&str; 5] = ["search", "insert", "upsert", "delete", "query"];

type Client = VectorflowClient<Channel>;

/// One client's keys: live key → its version `n`; deleted keys; keys whose
/// last write failed (it may or may not have been applied: not checked).
#[derive(Default)]
struct Model {
    live: HashMap<i64, i64>,
    /// The live keys, to pick from, and each one's place in it.
    live_keys: Vec<i64>,
    place: HashMap<i64, usize>,
    deleted: Vec<i64>,
    uncertain: std::collections::HashSet<i64>,
    next_key: i64,
}

impl Model {
    fn set(&mut self, key: i64, n: i64) {
        if self.live.insert(key, n).is_none() {
            self.place.insert(key, self.live_keys.len());
            self.live_keys.push(key);
        }
    }

    fn delete(&mut self, key: i64) {
        let Some(at) = self.place.remove(&key) else { return };
        self.live_keys.swap_remove(at);
        if let Some(&moved) = self.live_keys.get(at) {
            self.place.insert(moved, at);
        }
        self.live.remove(&key);
        self.deleted.push(key);
    }

    /// A live key at random (the caller checks there is one).
    fn pick(&self, rng: &mut StdRng) -> i64 {
        self.live_keys[rng.random_range(0..self.live_keys.len())]
    }
}

/// What the clients measured, shared.
#[derive(Default)]
struct Observed {
    /// Per operation, per minute: latencies in ms.
    latencies: HashMap<(&'static str, usize), Vec<f64>>,
    errors: Vec<String>,
    wrong_answers: Vec<String>,
    /// Writes the server refused untaken under backpressure
    /// (RESOURCE_EXHAUSTED) and the client sent again.
    writes_refused_and_retried: usize,
}

/// One write call, as [`write_with_retry`] sends it.
enum WriteCall {
    Insert(v1::WriteRequest),
    Upsert(v1::WriteRequest),
    Delete(v1::DeleteRequest),
}

/// How long a client keeps sending a write the server refuses under backpressure.
const RETRY_REFUSED_WRITES_FOR: Duration = Duration::from_secs(180);

/// Sends a write; while the server refuses it under backpressure
/// (RESOURCE_EXHAUSTED: the write was not taken, retry later), sends it
/// again after a growing pause, as Milvus clients retry a rate-limit
/// refusal, for up to [`RETRY_REFUSED_WRITES_FOR`]. Counts the refusals in
/// `refused`. Any other failure is returned.
async fn write_with_retry(client: &mut Client, call: &WriteCall, refused: &mut usize) -> Result<(), tonic::Status> {
    let give_up = Instant::now() + RETRY_REFUSED_WRITES_FOR;
    let mut pause = Duration::from_millis(50);
    loop {
        let result = match call {
            WriteCall::Insert(request) => client.insert(request.clone()).await.map(drop),
            WriteCall::Upsert(request) => client.upsert(request.clone()).await.map(drop),
            WriteCall::Delete(request) => client.delete(request.clone()).await.map(drop),
        };
        match result {
            Err(status) if status.code() == tonic::Code::ResourceExhausted && Instant::now() < give_up => {
                *refused += 1;
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(Duration::from_secs(1));
            }
            other => return other,
        }
    }
}

/// The server under test, stopped (SIGTERM, then SIGKILL) when dropped.
struct Server {
    child: std::process::Child,
    address: String,
}

impl Drop for Server {
    fn drop(&mut self) {
        if !matches!(self.child.try_wait(), Ok(None)) {
            return; // Already gone (killed by the bench).
        }
        let _ = std::process::Command::new("kill").args(["-TERM", &self.child.id().to_string()]).status();
        let deadline = Instant::now() + Duration::from_secs(120);
        while Instant::now() < deadline {
            if matches!(self.child.try_wait(), Ok(Some(_))) {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start_server(args: &SoakArgs, data_dir: &std::path::Path, log_name: &str) -> anyhow::Result<Server> {
    use std::io::{BufRead, BufReader};
    std::fs::create_dir_all(&args.out)?;
    let log = std::fs::File::create(args.out.join(log_name))?;
    let mut child = std::process::Command::new(std::env::current_exe()?)
        .env("RUST_LOG", std::env::var("RUST_LOG").unwrap_or_else(|_| "warn".into()))
        .stderr(log)
        .args(["serve", "--listen", "127.0.0.1:0", "--data-dir"])
        .arg(data_dir)
        .args(["--workers", &args.workers.to_string(), "--seal-rows", &args.seal_rows.to_string()])
        .args(["--retention-secs", &args.retention_secs.to_string()])
        .args(["--compaction-interval-ms", &args.compaction_interval_ms.to_string()])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .context("starting vectorflow serve")?;
    let stdout = child.stdout.take().context("the server's stdout")?;
    let mut line = String::new();
    BufReader::new(stdout).read_line(&mut line)?;
    let address = line
        .trim()
        .strip_prefix("vectorflow listening on ")
        .with_context(|| format!("unexpected first line from the server: {line:?}"))?
        .to_string();
    Ok(Server { child, address })
}

fn int_column(name: &str, values: Vec<i64>) -> v1::FieldData {
    v1::FieldData { name: name.into(), nulls: Vec::new(), values: Some(Values::Ints(v1::IntValues { values })) }
}

fn write(keys: &[i64], versions: &[i64], rng: &mut StdRng, dim: usize) -> v1::WriteRequest {
    let vectors: Vec<Vec<f32>> = keys.iter().map(|_| random_vector(rng, dim)).collect();
    v1::WriteRequest {
        collection: COLLECTION.into(),
        columns: vec![
            int_column("id", keys.to_vec()),
            v1::FieldData {
                name: "v".into(),
                nulls: Vec::new(),
                values: Some(Values::Vectors(wire::pack_vectors(&vectors))),
            },
            int_column("n", versions.to_vec()),
        ],
        arrow_ipc: Vec::new(),
        partition: String::new(),
    }
}

fn random_vector(rng: &mut StdRng, dim: usize) -> Vec<f32> {
    (0..dim).map(|_| rng.random_range(-1.0f32..1.0)).collect()
}

fn strong() -> Option<v1::ReadOptions> {
    Some(v1::ReadOptions { consistency: v1::ConsistencyLevel::Strong as i32, ..Default::default() })
}

/// `(key, n)` pairs of a query or get answer.
fn key_versions(response: v1::QueryResponse) -> Vec<(i64, i64)> {
    let column = |name: &str| {
        response.columns.iter().find(|c| c.name == name).and_then(|c| match &c.values {
            Some(Values::Ints(ints)) => Some(ints.values.clone()),
            _ => None,
        })
    };
    let (Some(keys), Some(versions)) = (column("id"), column("n")) else { return Vec::new() };
    keys.into_iter().zip(versions).collect()
}

/// The key range of client `client`: its keys never meet another's.
fn first_key(client: usize) -> i64 {
    client as i64 * 1_000_000_000
}

pub fn run(args: SoakArgs) -> anyhow::Result<()> {
    anyhow::ensure!(
        args.clients >= 1 && args.batch >= 1 && args.dim >= 1,
        "--clients, --batch and --dim must be at least 1"
    );
    let data_dir = tempfile::tempdir_in(std::env::temp_dir())?;
    let server = start_server(&args, data_dir.path(), "soak-server.log")?;
    let pid = server.child.id().to_string();
    println!(
        "soak: server {} (pid {pid}, log in {}), {} clients, {} minutes",
        server.address,
        args.out.join("soak-server.log").display(),
        args.clients,
        args.minutes
    );
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    let connect = |address: &str| {
        runtime.block_on(async {
            let channel = tonic::transport::Endpoint::from_shared(format!("http://{address}"))?
                .timeout(Duration::from_secs(120))
                .connect()
                .await?;
            anyhow::Ok(VectorflowClient::new(channel).max_decoding_message_size(256 << 20))
        })
    };
    let mut admin = connect(&server.address)?;
    let schema = CollectionSchema::new(
        COLLECTION,
        vec![
            FieldSchema::int64_primary("id", false),
            FieldSchema::vector("v", args.dim, Metric::COSINE),
            FieldSchema::new("n", DataType::Int64),
        ],
    );
    runtime
        .block_on(admin.create_collection(v1::CreateCollectionRequest { schema: Some(wire::schema_to_proto(&schema)) }))
        .map_err(crate::client::rpc)?;

    // Each client's initial rows, so searches and deletes have rows from the start.
    let mut models: Vec<Model> =
        (0..args.clients).map(|c| Model { next_key: first_key(c), ..Default::default() }).collect();
    let mut rng = StdRng::seed_from_u64(7);
    for model in &mut models {
        for _ in (0..args.initial_rows).step_by(500) {
            let keys: Vec<i64> = (model.next_key..model.next_key + 500).collect();
            model.next_key += 500;
            runtime
                .block_on(admin.insert(write(&keys, &vec![0; keys.len()], &mut rng, args.dim)))
                .map_err(crate::client::rpc)?;
            keys.into_iter().for_each(|key| model.set(key, 0));
        }
    }

    let observed = Arc::new(Mutex::new(Observed::default()));
    let stop = Arc::new(AtomicBool::new(false));
    let started = Instant::now();
    let duration = Duration::from_secs(args.minutes * 60);
    let mut tasks = Vec::new();
    for (index, model) in models.into_iter().enumerate() {
        let client = connect(&server.address)?;
        let (observed, stop, dim, batch) = (observed.clone(), stop.clone(), args.dim, args.batch);
        tasks.push(
            runtime.spawn(async move { client_loop(index, client, model, observed, stop, started, dim, batch).await }),
        );
    }
    // Resident memory of the server at every minute.
    let mut rss_per_minute = vec![json!({"minute": 0, "rss_mb": rss_of(&pid) as f64 / 1048576.0})];
    for minute in 1..=args.minutes {
        let at = started + Duration::from_secs(minute * 60);
        std::thread::sleep(at.saturating_duration_since(Instant::now()));
        let rss_mb = rss_of(&pid) as f64 / 1048576.0;
        let (calls, errors) = observed
            .lock()
            .map(|o| (o.latencies.values().map(Vec::len).sum::<usize>(), o.errors.len()))
            .unwrap_or_default();
        let request =
            v1::StatsRequest { collection: COLLECTION.into(), consistency: v1::ConsistencyLevel::Eventually as i32 };
        let stats = runtime.block_on(admin.get_stats(request)).map(|s| s.into_inner()).unwrap_or_default();
        println!(
            "minute {minute}: server RSS {rss_mb:.0} MB, {} live rows, {} row versions, {} sealed segments ({} indexed); \
             {calls} calls so far, {errors} errors",
            stats.live_rows, stats.versions, stats.sealed_segments, stats.indexed_segments
        );
        rss_per_minute.push(json!({"minute": minute, "rss_mb": rss_mb, "live_rows": stats.live_rows,
            "row_versions": stats.versions, "sealed_segments": stats.sealed_segments,
            "indexed_segments": stats.indexed_segments}));
    }
    stop.store(true, Ordering::SeqCst);
    let mut models = Vec::new();
    for task in tasks {
        models.push(runtime.block_on(task)?);
    }
    let load_secs = started.elapsed().min(duration + Duration::from_secs(60)).as_secs_f64();

    // SIGKILL the server and start it again on the same data: the check
    // reads what survived, not only what was in memory.
    drop(admin);
    let mut server = server;
    server.child.kill()?;
    server.child.wait()?;
    drop(server);
    let restart_started = Instant::now();
    let server = start_server(&args, data_dir.path(), "soak-server-restart.log")?;
    let restart_secs = restart_started.elapsed().as_secs_f64();
    println!("restart after SIGKILL: serving again in {restart_secs:.1}s");
    let mut admin = connect(&server.address)?;

    // Every acknowledged write, read back with a Strong get.
    let (mut lost, mut resurrected, mut checked) = (Vec::new(), Vec::new(), 0usize);
    for model in &models {
        let mut keys: Vec<i64> = model
            .live
            .keys()
            .copied()
            .chain(model.deleted.iter().copied())
            .filter(|key| !model.uncertain.contains(key))
            .collect();
        keys.sort_unstable();
        for chunk in keys.chunks(10_000) {
            let request = v1::GetRequest {
                collection: COLLECTION.into(),
                keys: Some(wire::pks_to_proto(&chunk.iter().map(|&k| Pk::Int(k)).collect::<Vec<_>>())),
                output_fields: vec!["n".into()],
                read: strong(),
                partitions: Vec::new(),
            };
            let found: HashMap<i64, i64> =
                key_versions(runtime.block_on(admin.get(request)).map_err(crate::client::rpc)?.into_inner())
                    .into_iter()
                    .collect();
            for key in chunk {
                checked += 1;
                match (model.live.get(key), found.get(key)) {
                    (Some(want), Some(got)) if want == got => {}
                    (Some(want), got) => lost.push(format!("key {key}: wrote n={want}, read {got:?}")),
                    (None, Some(got)) => resurrected.push(format!("key {key}: deleted, read n={got}")),
                    (None, None) => {}
                }
            }
        }
    }
    let live_rows: usize = models.iter().map(|m| m.live.len()).sum();
    let uncertain: usize = models.iter().map(|m| m.uncertain.len()).sum();
    let observed = observed.lock().map_err(|_| anyhow::anyhow!("a client panicked"))?;
    let mut per_operation = serde_json::Map::new();
    println!("\n{:<8} {:>9} {:>9} {:>9} {:>9}", "op", "calls", "calls/s", "p50 ms", "p99 ms");
    for operation in OPERATIONS {
        let mut all: Vec<f64> = observed
            .latencies
            .iter()
            .filter(|((op, _), _)| *op == operation)
            .flat_map(|(_, v)| v.iter().copied())
            .collect();
        all.sort_by(f64::total_cmp);
        let (p50, p99) = (percentile(&all, 0.5), percentile(&all, 0.99));
        println!("{operation:<8} {:>9} {:>9.1} {p50:>9.2} {p99:>9.2}", all.len(), all.len() as f64 / load_secs);
        per_operation.insert(
            operation.into(),
            json!({"calls": all.len(), "per_sec": all.len() as f64 / load_secs, "p50_ms": p50, "p99_ms": p99}),
        );
    }
    let per_minute: Vec<serde_json::Value> = (0..args.minutes as usize)
        .map(|minute| {
            let mut all: Vec<f64> = observed
                .latencies
                .iter()
                .filter(|((_, m), _)| *m == minute)
                .flat_map(|(_, v)| v.iter().copied())
                .collect();
            all.sort_by(f64::total_cmp);
            json!({"minute": minute + 1, "calls": all.len(), "p99_ms": percentile(&all, 0.99)})
        })
        .collect();
    println!(
        "\nerrors {}, wrong answers {}, rows checked {checked}, lost {}, resurrected {}, live rows at the end \
         {live_rows}; writes refused under backpressure and sent again {}",
        observed.errors.len(),
        observed.wrong_answers.len(),
        lost.len(),
        resurrected.len(),
        observed.writes_refused_and_retried
    );
    for line in observed.errors.iter().chain(&observed.wrong_answers).chain(&lost).chain(&resurrected).take(20) {
        println!("  {line}");
    }
    let results = json!({
        "minutes": args.minutes, "clients": args.clients, "dim": args.dim, "workers": args.workers,
        "seal_rows": args.seal_rows, "batch": args.batch, "initial_rows_per_client": args.initial_rows,
        "retention_secs": args.retention_secs, "compaction_interval_ms": args.compaction_interval_ms,
        "build": if cfg!(debug_assertions) { "dev" } else { "release" },
        "errors": observed.errors.len(), "wrong_answers": observed.wrong_answers.len(),
        "writes_refused_and_retried": observed.writes_refused_and_retried,
        "rows_checked": checked, "rows_lost": lost.len(), "rows_resurrected": resurrected.len(), "live_rows": live_rows,
        "rows_not_checked_after_a_failed_write": uncertain, "restart_after_sigkill_s": restart_secs,
        "operations": per_operation, "per_minute": per_minute, "server_rss_mb": rss_per_minute,
        "first_problems": observed.errors.iter().chain(&observed.wrong_answers).chain(&lost).chain(&resurrected).take(20).collect::<Vec<_>>(),
    });
    std::fs::create_dir_all(&args.out)?;
    let path = args.out.join("soak.json");
    std::fs::write(&path, serde_json::to_string_pretty(&results)?)?;
    println!("wrote {}", path.display());
    drop(server);
    anyhow::ensure!(
        observed.errors.is_empty() && observed.wrong_answers.is_empty() && lost.is_empty() && resurrected.is_empty(),
        "the soak found problems (see above)"
    );
    Ok(())
}

/// One client's loop until `stop`: returns its model of its keys.
#[allow(clippy::too_many_arguments)]
async fn client_loop(
    index: usize,
    mut client: Client,
    mut model: Model,
    observed: Arc<Mutex<Observed>>,
    stop: Arc<AtomicBool>,
    started: Instant,
    dim: usize,
    batch: usize,
) -> Model {
    let mut rng = StdRng::seed_from_u64(1000 + index as u64);
    let mut refused = 0;
    while !stop.load(Ordering::SeqCst) {
        let operation = match rng.random_range(0..100) {
            0..40 => "search",
            40..60 => "insert",
            60..75 => "upsert",
            75..85 => "delete",
            _ => "query",
        };
        if operation != "search" && operation != "insert" && model.live_keys.is_empty() {
            continue;
        }
        // Each arm times only its call: the model's bookkeeping comes after.
        let call_started = Instant::now();
        let (ms, outcome): (f64, Result<Option<String>, tonic::Status>) = match operation {
            "search" => {
                let request = v1::SearchRequest {
                    collection: COLLECTION.into(),
                    vectors: Some(wire::pack_vectors(&[random_vector(&mut rng, dim)])),
                    k: 10,
                    ..Default::default()
                };
                let result = client.search(request).await;
                (elapsed_ms(call_started), result.map(|_| None))
            }
            "insert" => {
                let keys: Vec<i64> = (model.next_key..model.next_key + batch as i64).collect();
                let request = write(&keys, &vec![0; keys.len()], &mut rng, dim);
                let call_started = Instant::now();
                let result = write_with_retry(&mut client, &WriteCall::Insert(request), &mut refused).await;
                let ms = elapsed_ms(call_started);
                // Keys are never reused, acknowledged or not.
                model.next_key += batch as i64;
                match &result {
                    Ok(_) => keys.into_iter().for_each(|key| model.set(key, 0)),
                    // It may have been applied: either outcome is right.
                    Err(_) => model.uncertain.extend(keys),
                }
                (ms, result.map(|_| None))
            }
            "upsert" => {
                let mut keys: Vec<i64> = (0..batch).map(|_| model.pick(&mut rng)).collect();
                keys.sort_unstable();
                keys.dedup();
                let versions: Vec<i64> = keys.iter().map(|k| model.live[k] + 1).collect();
                let request = write(&keys, &versions, &mut rng, dim);
                let call_started = Instant::now();
                let result = write_with_retry(&mut client, &WriteCall::Upsert(request), &mut refused).await;
                let ms = elapsed_ms(call_started);
                match &result {
                    Ok(_) => keys.iter().zip(versions).for_each(|(key, n)| model.set(*key, n)),
                    Err(_) => model.uncertain.extend(keys),
                }
                (ms, result.map(|_| None))
            }
            "delete" => {
                // Twice an insert's rows at half the rate: the live rows stay level.
                let mut keys: Vec<i64> = (0..batch * 2).map(|_| model.pick(&mut rng)).collect();
                keys.sort_unstable();
                keys.dedup();
                let request = v1::DeleteRequest {
                    collection: COLLECTION.into(),
                    target: Some(v1::delete_request::Target::Keys(wire::pks_to_proto(
                        &keys.iter().map(|&k| Pk::Int(k)).collect::<Vec<_>>(),
                    ))),
                    partition: String::new(),
                };
                let call_started = Instant::now();
                let result = write_with_retry(&mut client, &WriteCall::Delete(request), &mut refused).await;
                let ms = elapsed_ms(call_started);
                match &result {
                    Ok(_) => keys.iter().for_each(|key| model.delete(*key)),
                    Err(_) => model.uncertain.extend(keys),
                }
                (ms, result.map(|_| None))
            }
            _ => {
                // Ten of its own keys, live or deleted, must read as the model says.
                let mut keys: Vec<i64> = (0..10).map(|_| model.pick(&mut rng)).collect();
                keys.extend(model.deleted.iter().rev().take(3));
                keys.sort_unstable();
                keys.dedup();
                let list = keys.iter().map(|k| k.to_string()).collect::<Vec<_>>().join(", ");
                let request = v1::QueryRequest {
                    collection: COLLECTION.into(),
                    filter: format!("id in [{list}]"),
                    output_fields: vec!["n".into()],
                    limit: 100,
                    read: strong(),
                    ..Default::default()
                };
                let call_started = Instant::now();
                let result = client.query(request).await;
                let ms = elapsed_ms(call_started);
                let checked = result.map(|response| {
                    let certain = |key: &i64| !model.uncertain.contains(key);
                    let mut got: Vec<(i64, i64)> =
                        key_versions(response.into_inner()).into_iter().filter(|(k, _)| certain(k)).collect();
                    got.sort_unstable();
                    let want: Vec<(i64, i64)> = keys
                        .iter()
                        .filter(|k| certain(k))
                        .filter_map(|k| model.live.get(k).map(|n| (*k, *n)))
                        .collect();
                    (got != want)
                        .then(|| format!("client {index}: query of {list} read {got:?}, the model says {want:?}"))
                });
                (ms, checked)
            }
        };
        let minute = (call_started.duration_since(started).as_secs() / 60) as usize;
        if let Ok(mut observed) = observed.lock() {
            observed.latencies.entry((operation, minute)).or_default().push(ms);
            match outcome {
                Ok(None) => {}
                Ok(Some(wrong)) => observed.wrong_answers.push(wrong),
                Err(status) => observed.errors.push(format!("client {index} {operation}: {status}")),
            }
            observed.writes_refused_and_retried += std::mem::take(&mut refused);
        }
    }
    model
}

fn elapsed_ms(since: Instant) -> f64 {
    since.elapsed().as_secs_f64() * 1000.0
}
