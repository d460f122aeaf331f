//! Crash under concurrent load (issue 19): many writers with small batches
//! and deletes, and searchers at every consistency level, all through gRPC;
//! the server is SIGKILLed while the load runs and started again on the same
//! data directory, several times. Each restart must finish (within
//! `RECOVERY_TIMEOUT`), hold every acknowledged write exactly once and none
//! of the deleted keys, and give the time-travel answers recorded before the
//! crash again.
//!
//! The server runs with a long checkpoint interval and a small
//! `log.max_in_flight_rows`, so every restart replays many more log records
//! than one source poll takes and many more rows than the in-flight bound:
//! the replay must advance time while it is behind (it used to wedge there).
//!
//! `VF_CRASH_TRIALS` (default 3), `VF_CRASH_LOAD_MS` (load per trial, default
//! 2500) and `VF_CRASH_SEED` scale the run; the seed is printed at start.

mod common;

use std::collections::BTreeSet;
use std::os::unix::process::ExitStatusExt;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{ServerProcess, wire};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tonic::transport::{Channel, Endpoint};
use vectorflow::Pk;
use vectorflow_proto::v1::vectorflow_client::VectorflowClient;
use vectorflow_proto::v1::{self, field_data::Values};
use vectorflow_proto::{pack_vectors, pks_to_proto};

const COLLECTION: &str = "load";
const DIM: usize = 8;
const WRITERS: usize = 16;
const SEARCHERS: usize = 16;
/// Keys of writer `w` are `w * KEY_SPACE + n`: each writer's model is exact.
const KEY_SPACE: i64 = 1_000_000_000;
const RECOVERY_TIMEOUT: Duration = Duration::from_secs(120);
const RPC_TIMEOUT: Duration = Duration::from_secs(60);

type Client = VectorflowClient<Channel>;

fn server_flags(config: &Path) -> Vec<String> {
    [
        "--workers",
        "2",
        "--seal-rows",
        "2000",
        // Long enough that no checkpoint runs during a trial: the replay covers the whole trial.
        "--checkpoint-interval-ms",
        "600000",
        "--compaction-interval-ms",
        "0",
        "--config",
    ]
    .iter()
    .map(|s| s.to_string())
    .chain([config.display().to_string()])
    .collect()
}

fn schema() -> v1::CollectionSchema {
    wire::schema(COLLECTION, DIM as u32, vec![wire::nullable_varchar("tag", 8)])
}

fn vector(key: i64) -> Vec<f32> {
    (0..DIM as i64).map(|i| ((key * 7 + i * 31) % 1009) as f32 / 8.0).collect()
}

fn insert_request(writer: usize, keys: &[i64]) -> v1::WriteRequest {
    let vectors: Vec<Vec<f32>> = keys.iter().map(|&k| vector(k)).collect();
    let tags = vec![format!("w{writer}"); keys.len()];
    wire::write(
        COLLECTION,
        vec![wire::ints("id", keys.to_vec()), wire::vectors("v", &vectors), wire::strings("tag", tags)],
    )
}

fn keys_proto(keys: &[i64]) -> v1::PrimaryKeys {
    pks_to_proto(&keys.iter().map(|&k| Pk::Int(k)).collect::<Vec<_>>())
}

fn read(consistency: v1::ConsistencyLevel, as_of: u64) -> Option<v1::ReadOptions> {
    Some(v1::ReadOptions { consistency: consistency as i32, as_of, guarantee_ts: 0 })
}

/// One writer's keys as its acknowledged writes left them.
#[derive(Default, Clone)]
struct WriterModel {
    live: BTreeSet<i64>,
    deleted: BTreeSet<i64>,
    next: i64,
}

#[derive(Clone, Debug)]
enum Op {
    Insert(Vec<i64>),
    Delete(i64),
}

/// A writer's state across server processes: its model, and the write in
/// flight when the server died (applied or not: either is correct).
#[derive(Default, Clone)]
struct Writer {
    model: WriterModel,
    uncertain: Option<Op>,
}

/// A time-travel answer recorded while the server ran.
#[derive(Debug, Clone, PartialEq)]
struct Recorded {
    as_of: u64,
    writer: usize,
    count: u64,
    keys: Vec<i64>,
}

fn ints(columns: &[v1::FieldData], name: &str) -> Vec<i64> {
    match columns.iter().find(|c| c.name == name).and_then(|c| c.values.as_ref()) {
        Some(Values::Ints(ints)) => ints.values.clone(),
        None => Vec::new(),
        other => panic!("column `{name}` is not a list of integers: {other:?}"),
    }
}

fn range_filter(writer: usize) -> String {
    let low = writer as i64 * KEY_SPACE;
    format!("id >= {low} and id < {}", low + KEY_SPACE)
}

/// A writer's keys (sorted, failing on a duplicate) and its count, as of `as_of` (0: Strong now).
async fn writer_rows(client: &mut Client, writer: usize, as_of: u64) -> Result<(Vec<i64>, u64), tonic::Status> {
    let request = v1::QueryRequest {
        collection: COLLECTION.into(),
        filter: range_filter(writer),
        read: read(v1::ConsistencyLevel::Strong, as_of),
        limit: 100_000,
        ..Default::default()
    };
    let keys = ints(&client.query(request.clone()).await?.into_inner().columns, "id");
    let unique: BTreeSet<i64> = keys.iter().copied().collect();
    assert_eq!(unique.len(), keys.len(), "writer {writer}: a key appears twice as of {as_of}");
    let count = client.query(v1::QueryRequest { count_only: true, limit: 0, ..request }).await?.into_inner().count;
    Ok((keys, count))
}

async fn write_until_killed(
    mut client: Client,
    index: usize,
    mut writer: Writer,
    mut rng: StdRng,
    killed: Arc<AtomicBool>,
    last_ack: Arc<AtomicU64>,
) -> (Writer, usize) {
    let mut acknowledged = 0;
    loop {
        let op = if !writer.model.live.is_empty() && rng.random_ratio(1, 20) {
            let live: Vec<i64> = writer.model.live.iter().copied().collect();
            Op::Delete(live[rng.random_range(0..live.len())])
        } else {
            let n = [1, 10, 100][rng.random_range(0..3)];
            let first = index as i64 * KEY_SPACE + writer.model.next;
            writer.model.next += n;
            Op::Insert((first..first + n).collect())
        };
        let result = match &op {
            Op::Insert(keys) => client.insert(insert_request(index, keys)).await,
            Op::Delete(key) => {
                let target = Some(v1::delete_request::Target::Keys(keys_proto(&[*key])));
                client.delete(v1::DeleteRequest { collection: COLLECTION.into(), target, ..Default::default() }).await
            }
        };
        match result {
            Ok(response) => {
                last_ack.fetch_max(response.into_inner().ts, Ordering::SeqCst);
                match op {
                    Op::Insert(keys) => writer.model.live.extend(keys),
                    Op::Delete(key) => {
                        writer.model.live.remove(&key);
                        writer.model.deleted.insert(key);
                    }
                }
                acknowledged += 1;
            }
            Err(status) => {
                assert!(
                    killed.load(Ordering::SeqCst),
                    "writer {index}: a write failed while the server was up: {status:?}"
                );
                writer.uncertain = Some(op);
                return (writer, acknowledged);
            }
        }
    }
}

/// Searches until the server dies: 4 vectors, k = 20, half filtered, each
/// consistency level in turn; every answer before the kill must succeed.
async fn search_until_killed(mut client: Client, index: usize, killed: Arc<AtomicBool>) -> usize {
    let levels = [
        v1::ConsistencyLevel::Strong,
        v1::ConsistencyLevel::Eventually,
        v1::ConsistencyLevel::Bounded,
        v1::ConsistencyLevel::Session,
    ];
    let mut answered = 0;
    loop {
        let queries: Vec<Vec<f32>> = (0..4).map(|i| vector((index * 31 + answered * 7 + i) as i64)).collect();
        let request = v1::SearchRequest {
            collection: COLLECTION.into(),
            vectors: Some(pack_vectors(&queries)),
            k: 20,
            filter: if answered % 2 == 0 { "tag != \"w3\"".into() } else { String::new() },
            read: read(levels[answered % levels.len()], 0),
            ..Default::default()
        };
        match client.search(request).await {
            Ok(_) => answered += 1,
            Err(status) => {
                assert!(
                    killed.load(Ordering::SeqCst),
                    "searcher {index}: a search failed while the server was up: {status:?}"
                );
                return answered;
            }
        }
    }
}

/// Records time-travel answers of random writers as of the latest acknowledged write.
async fn record_until_killed(
    mut client: Client,
    mut rng: StdRng,
    killed: Arc<AtomicBool>,
    last_ack: Arc<AtomicU64>,
    recorded: Arc<Mutex<Vec<Recorded>>>,
) {
    loop {
        tokio::time::sleep(Duration::from_millis(rng.random_range(100..400))).await;
        let as_of = last_ack.load(Ordering::SeqCst);
        if as_of == 0 {
            continue;
        }
        let writer = rng.random_range(0..WRITERS);
        match writer_rows(&mut client, writer, as_of).await {
            Ok((keys, count)) => {
                assert_eq!(count, keys.len() as u64, "count and rows agree as of {as_of}");
                recorded.lock().expect("the recorded answers").push(Recorded { as_of, writer, count, keys });
            }
            Err(status) => {
                assert!(killed.load(Ordering::SeqCst), "time travel failed while the server was up: {status:?}");
                return;
            }
        }
    }
}

/// Checks the restarted server against every writer's model and the recorded answers.
async fn verify(client: &mut Client, writers: &mut [Writer], recorded: &[Recorded]) -> usize {
    let mut rows = 0;
    for (index, writer) in writers.iter_mut().enumerate() {
        let (keys, count) = writer_rows(client, index, 0).await.expect("a Strong query after restart");
        let present: BTreeSet<i64> = keys.into_iter().collect();
        if let Some(op) = writer.uncertain.take() {
            // Either state is right for the write the kill interrupted; adopt what the server holds.
            match op {
                Op::Insert(keys) => {
                    let held = keys.iter().filter(|k| present.contains(k)).count();
                    assert!(
                        held == 0 || held == keys.len(),
                        "writer {index}: an insert half applied ({held} of {})",
                        keys.len()
                    );
                    if held > 0 {
                        writer.model.live.extend(keys);
                    }
                }
                Op::Delete(key) => {
                    if !present.contains(&key) {
                        writer.model.live.remove(&key);
                        writer.model.deleted.insert(key);
                    }
                }
            }
        }
        let missing: Vec<_> = writer.model.live.difference(&present).take(8).collect();
        let extra: Vec<_> = present.difference(&writer.model.live).take(8).collect();
        assert!(
            missing.is_empty() && extra.is_empty(),
            "writer {index}: {} acknowledged keys, {} present; missing {missing:?}; unexpected {extra:?}",
            writer.model.live.len(),
            present.len()
        );
        let resurrected: Vec<_> = writer.model.deleted.intersection(&present).take(8).collect();
        assert!(resurrected.is_empty(), "writer {index}: deleted keys are back: {resurrected:?}");
        assert_eq!(count, present.len() as u64, "writer {index}: count after restart");
        rows += present.len();
    }
    for answer in recorded {
        let (keys, count) = writer_rows(client, answer.writer, answer.as_of).await.expect("time travel after restart");
        assert_eq!(count, answer.count, "writer {} count as of {} after restart", answer.writer, answer.as_of);
        assert!(keys == answer.keys, "writer {} rows as of {} changed after restart", answer.writer, answer.as_of);
    }
    rows
}

async fn connect(address: &str) -> Client {
    let endpoint = Endpoint::from_shared(format!("http://{address}"))
        .expect("an address")
        .timeout(RPC_TIMEOUT)
        .connect_timeout(Duration::from_secs(5));
    let channel = endpoint.connect().await.expect("connects");
    VectorflowClient::new(channel).max_decoding_message_size(1 << 30)
}

fn env_number(name: &str) -> Option<u64> {
    let text = std::env::var(name).ok()?;
    Some(text.trim().parse().unwrap_or_else(|e| panic!("{name}={text:?}: {e}")))
}

#[test]
fn restart_after_sigkill_under_concurrent_load_finishes_and_loses_nothing() {
    let trials = env_number("VF_CRASH_TRIALS").unwrap_or(3);
    let load = Duration::from_millis(env_number("VF_CRASH_LOAD_MS").unwrap_or(2500));
    let seed = env_number("VF_CRASH_SEED").unwrap_or_else(|| {
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).expect("a clock after 1970").as_nanos()
            as u64
    });
    println!("concurrent crash test: {trials} trials of {load:?}, VF_CRASH_SEED={seed}");
    let dir = tempfile::Builder::new().prefix("vectorflow-crash-load-").tempdir().expect("a temp dir");
    let config = dir.path().join("server.toml");
    // A small in-flight bound, far below what one trial writes: the replay
    // must release it while it is still behind the log.
    std::fs::write(&config, "replay_stall_timeout_secs = 30\n[log]\nmax_in_flight_rows = 2000\n")
        .expect("the config file");
    let data = dir.path().join("data");
    let flags = server_flags(&config);
    let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build().expect("a runtime");
    let mut rng = StdRng::seed_from_u64(seed);
    let mut writers: Vec<Writer> = vec![Writer::default(); WRITERS];
    let mut recorded: Vec<Recorded> = Vec::new();

    for trial in 0..=trials {
        let started = Instant::now();
        let mut server = ServerProcess::start_within(&data, &flags, RECOVERY_TIMEOUT);
        let recovery = started.elapsed();
        let mut client = runtime.block_on(connect(&server.address));
        let health = runtime.block_on(client.health(v1::Empty {})).expect("health").into_inner();
        let replayed = health.recovery.map_or(0, |r| r.log_records_replayed);
        if trial == 0 {
            runtime
                .block_on(client.create_collection(v1::CreateCollectionRequest { schema: Some(schema()) }))
                .expect("the collection is created");
        } else {
            let rows = runtime.block_on(verify(&mut client, &mut writers, &recorded));
            println!(
                "trial {trial}: restarted in {} ms replaying {replayed} log records; {rows} rows and {} time-travel answers verified",
                recovery.as_millis(),
                recorded.len()
            );
        }
        if trial == trials {
            let status = server.terminate();
            assert!(status.success(), "SIGTERM exits cleanly: {status:?}");
            break;
        }

        let killed = Arc::new(AtomicBool::new(false));
        let last_ack = Arc::new(AtomicU64::new(0));
        let fresh = Arc::new(Mutex::new(Vec::new()));
        let writer_tasks: Vec<_> = writers
            .drain(..)
            .enumerate()
            .map(|(index, writer)| {
                let client = client.clone();
                let rng = StdRng::seed_from_u64(rng.random());
                runtime.spawn(write_until_killed(client, index, writer, rng, killed.clone(), last_ack.clone()))
            })
            .collect();
        let searchers: Vec<_> = (0..SEARCHERS)
            .map(|index| runtime.spawn(search_until_killed(client.clone(), index, killed.clone())))
            .collect();
        let recorder = runtime.spawn(record_until_killed(
            client.clone(),
            StdRng::seed_from_u64(rng.random()),
            killed.clone(),
            last_ack.clone(),
            fresh.clone(),
        ));
        std::thread::sleep(load + Duration::from_millis(rng.random_range(0..500)));
        killed.store(true, Ordering::SeqCst);
        let status = server.kill();
        assert_eq!(status.signal(), Some(9), "trial {trial}: the server was running until SIGKILL: {status}");
        let mut acknowledged = 0;
        for task in writer_tasks {
            let (writer, acks) = runtime.block_on(task).unwrap_or_else(|e| std::panic::resume_unwind(e.into_panic()));
            writers.push(writer);
            acknowledged += acks;
        }
        let searches: usize = searchers
            .into_iter()
            .map(|task| runtime.block_on(task).unwrap_or_else(|e| std::panic::resume_unwind(e.into_panic())))
            .sum();
        runtime.block_on(recorder).unwrap_or_else(|e| std::panic::resume_unwind(e.into_panic()));
        recorded.extend(fresh.lock().expect("the recorded answers").drain(..));
        println!(
            "trial {}: {acknowledged} writes acknowledged and {searches} searches answered, then SIGKILL",
            trial + 1
        );
        assert!(acknowledged > 0, "trial {}: no write was acknowledged", trial + 1);
    }
}
