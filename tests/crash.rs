//! Crash test of `vectorflow serve`: one writer inserts, upserts and deletes
//! through gRPC while a reference model records every acknowledged write and a
//! few time-travel answers; the server is killed with SIGKILL at a random
//! moment, restarted on the same data directory, and must then hold every
//! acknowledged write exactly once, none of the deleted rows, and give the
//! recorded time-travel answers again.
//!
//! Every time-travel answer is asked again after the next restart; beyond
//! `TIME_TRAVEL_KEPT` answers, random ones of those already checked after a
//! restart are dropped, so long runs stay linear in the number of trials.
//!
//! `VF_CRASH_TRIALS` sets the number of kills (default 10) and
//! `VF_CRASH_SEED` the seed of the random choices (printed at start).
//! When the test fails, the data directory is kept and its path printed.

mod common;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::os::unix::process::ExitStatusExt;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use common::ServerProcess;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tonic::transport::{Channel, Endpoint};
use vectorflow::Pk;
use vectorflow_proto::v1::vectorflow_client::VectorflowClient;
use vectorflow_proto::v1::{self, field_data::Values};
use vectorflow_proto::{pack_vectors, pks_to_proto, unpack_vectors};

const SERVER_FLAGS: &[&str] =
    &["--workers", "2", "--seal-rows", "150", "--checkpoint-interval-ms", "300", "--compaction-interval-ms", "700"];
const COLLECTION: &str = "crash";
const DIM: usize = 8;
const RECOVERY_TIMEOUT: Duration = Duration::from_secs(60);
const RPC_TIMEOUT: Duration = Duration::from_secs(30);
const KILL_AFTER_MS: std::ops::RangeInclusive<u64> = 150..=1200;
const TIME_TRAVEL_PER_TRIAL: usize = 3;
const TIME_TRAVEL_KEPT: usize = 30;

type Client = VectorflowClient<Channel>;

/// The live rows as the acknowledged writes left them, and every deleted key.
#[derive(Clone, Default)]
struct Model {
    vals: BTreeMap<i64, i64>,
    keys: Vec<i64>,
    slots: HashMap<i64, usize>,
    deleted: BTreeSet<i64>,
}

impl Model {
    fn put(&mut self, key: i64, val: i64) {
        if self.vals.insert(key, val).is_none() {
            self.slots.insert(key, self.keys.len());
            self.keys.push(key);
        }
    }

    fn remove(&mut self, key: i64) {
        self.vals.remove(&key);
        if let Some(slot) = self.slots.remove(&key) {
            self.keys.swap_remove(slot);
            if let Some(&moved) = self.keys.get(slot) {
                self.slots.insert(moved, slot);
            }
        }
        self.deleted.insert(key);
    }

    /// Up to `n` distinct live keys, at random.
    fn choose(&self, rng: &mut StdRng, n: usize) -> Vec<i64> {
        let n = n.min(self.keys.len());
        rand::seq::index::sample(rng, self.keys.len(), n).into_iter().map(|i| self.keys[i]).collect()
    }
}

/// A write: rows as (key, val) pairs, or the keys to delete.
#[derive(Clone, Debug)]
enum Op {
    Insert(Vec<(i64, i64)>),
    Upsert(Vec<(i64, i64)>),
    Delete(Vec<i64>),
}

impl Op {
    fn keys(&self) -> Vec<i64> {
        match self {
            Op::Insert(rows) | Op::Upsert(rows) => rows.iter().map(|&(k, _)| k).collect(),
            Op::Delete(keys) => keys.clone(),
        }
    }

    fn apply(&self, model: &mut Model) {
        match self {
            Op::Insert(rows) | Op::Upsert(rows) => rows.iter().for_each(|&(k, v)| model.put(k, v)),
            Op::Delete(keys) => keys.iter().for_each(|&k| model.remove(k)),
        }
    }

    fn describe(&self) -> String {
        match self {
            Op::Insert(rows) => format!("insert of {} keys", rows.len()),
            Op::Upsert(rows) => format!("upsert of {} keys", rows.len()),
            Op::Delete(keys) => format!("delete of {} keys", keys.len()),
        }
    }
}

/// A time-travel question and the answer the server gave when it was asked.
struct TimeTravel {
    ts: u64,
    count: u64,
    rows: Vec<(i64, i64)>,
}

/// Everything that outlives one server process.
struct State {
    model: Model,
    next_key: i64,
    next_val: i64,
    answers: Vec<TimeTravel>,
    uncertain: Option<Op>,
}

#[derive(Default)]
struct TrialWrites {
    acknowledged: usize,
    flushes: usize,
    time_travel: usize,
    in_flight: String,
}

/// The vector stored with each version of a row, so a stale or mixed-up vector shows.
fn vector(key: i64, val: i64) -> Vec<f32> {
    (0..DIM as i64).map(|i| ((key * 7 + val * 13 + i * 31) % 1009) as f32 / 8.0).collect()
}

fn schema() -> v1::CollectionSchema {
    common::wire::schema(COLLECTION, DIM as u32, vec![common::wire::field("val", v1::DataType::Int64)])
}

fn write_request(rows: &[(i64, i64)]) -> v1::WriteRequest {
    let ints = |values: Vec<i64>| Some(Values::Ints(v1::IntValues { values }));
    let vectors: Vec<Vec<f32>> = rows.iter().map(|&(k, v)| vector(k, v)).collect();
    v1::WriteRequest {
        collection: COLLECTION.into(),
        columns: vec![
            v1::FieldData { name: "id".into(), nulls: vec![], values: ints(rows.iter().map(|r| r.0).collect()) },
            v1::FieldData { name: "v".into(), nulls: vec![], values: Some(Values::Vectors(pack_vectors(&vectors))) },
            v1::FieldData { name: "val".into(), nulls: vec![], values: ints(rows.iter().map(|r| r.1).collect()) },
        ],
        ..Default::default()
    }
}

fn int_keys(keys: &[i64]) -> v1::PrimaryKeys {
    pks_to_proto(&keys.iter().map(|&k| Pk::Int(k)).collect::<Vec<_>>())
}

fn read_at(as_of: u64) -> Option<v1::ReadOptions> {
    Some(v1::ReadOptions { consistency: v1::ConsistencyLevel::Strong as i32, as_of, guarantee_ts: 0 })
}

/// Sends one write and returns its timestamp.
async fn send(client: &mut Client, op: &Op) -> Result<u64, tonic::Status> {
    let response = match op {
        Op::Insert(rows) => client.insert(write_request(rows)).await?,
        Op::Upsert(rows) => client.upsert(write_request(rows)).await?,
        Op::Delete(keys) => {
            let target = Some(v1::delete_request::Target::Keys(int_keys(keys)));
            client.delete(v1::DeleteRequest { collection: COLLECTION.into(), target, ..Default::default() }).await?
        }
    };
    Ok(response.into_inner().ts)
}

fn ints(columns: &[v1::FieldData], name: &str) -> Vec<i64> {
    match columns.iter().find(|c| c.name == name).and_then(|c| c.values.as_ref()) {
        Some(Values::Ints(ints)) => ints.values.clone(),
        other => panic!("column `{name}` is not a list of integers: {other:?}"),
    }
}

fn vectors(columns: &[v1::FieldData], name: &str) -> Vec<Vec<f32>> {
    match columns.iter().find(|c| c.name == name).and_then(|c| c.values.as_ref()) {
        Some(Values::Vectors(packed)) => unpack_vectors(name, packed).expect("packed vectors"),
        other => panic!("column `{name}` is not a list of vectors: {other:?}"),
    }
}

/// (key, val) rows of an answer, in the order the server gave them.
fn key_vals(columns: &[v1::FieldData]) -> Vec<(i64, i64)> {
    let (ids, vals) = (ints(columns, "id"), ints(columns, "val"));
    assert_eq!(ids.len(), vals.len(), "one val per row");
    ids.into_iter().zip(vals).collect()
}

/// Rows by key, failing if any key appears twice.
fn unique(rows: &[(i64, i64)], what: &str) -> BTreeMap<i64, i64> {
    let mut by_key = BTreeMap::new();
    for &(k, v) in rows {
        if let Some(earlier) = by_key.insert(k, v) {
            panic!("{what}: key {k} appears twice (vals {earlier} and {v})");
        }
    }
    by_key
}

async fn get(client: &mut Client, keys: &[i64]) -> BTreeMap<i64, i64> {
    let request = v1::GetRequest {
        collection: COLLECTION.into(),
        keys: Some(int_keys(keys)),
        output_fields: vec!["val".into()],
        read: read_at(0),
        ..Default::default()
    };
    let answer = client.get(request).await.expect("a Strong get").into_inner();
    unique(&key_vals(&answer.columns), "get")
}

/// All rows (key order, with `val`) and the count, as of `as_of` (0 = Strong now).
async fn all_rows(client: &mut Client, as_of: u64) -> Result<(Vec<(i64, i64)>, u64), tonic::Status> {
    let request = v1::QueryRequest {
        collection: COLLECTION.into(),
        output_fields: vec!["val".into()],
        read: read_at(as_of),
        ..Default::default()
    };
    let rows = key_vals(&client.query(request.clone()).await?.into_inner().columns);
    let count = client.query(v1::QueryRequest { count_only: true, ..request }).await?.into_inner().count;
    Ok((rows, count))
}

fn difference(expected: &BTreeMap<i64, i64>, actual: &BTreeMap<i64, i64>) -> String {
    let missing: Vec<_> = expected.iter().filter(|(k, _)| !actual.contains_key(k)).take(8).collect();
    let extra: Vec<_> = actual.iter().filter(|(k, _)| !expected.contains_key(k)).take(8).collect();
    let changed: Vec<_> =
        expected.iter().filter_map(|(k, v)| actual.get(k).filter(|a| *a != v).map(|a| (k, v, a))).take(8).collect();
    format!(
        "{} expected, {} present; missing (key, val) {missing:?}; unexpected {extra:?}; (key, expected, actual) {changed:?}",
        expected.len(),
        actual.len()
    )
}

/// Adopts the write in flight at the kill if the server holds its after-state;
/// fails unless the server holds its before- or its after-state.
fn resolve_uncertain(op: &Op, model: &mut Model, found: &BTreeMap<i64, i64>) -> &'static str {
    let keys = op.keys();
    let state_of = |model: &Model| -> BTreeMap<i64, i64> {
        keys.iter().filter_map(|k| model.vals.get(k).map(|&v| (*k, v))).collect()
    };
    let before = state_of(model);
    let mut applied = model.clone();
    op.apply(&mut applied);
    let after = state_of(&applied);
    if *found == before {
        "not applied"
    } else if *found == after {
        *model = applied;
        "applied"
    } else {
        panic!(
            "the {} in flight at the kill left a state that is neither before nor after it: \
             found {found:?}, before {before:?}, after {after:?}",
            op.describe()
        )
    }
}

/// Checks the restarted server against the model; returns the rows it holds.
async fn verify(client: &mut Client, state: &mut State, rng: &mut StdRng) -> (usize, String) {
    let mut uncertain = String::new();
    let names = client.list_collections(v1::Empty {}).await.expect("the collections").into_inner().names;
    assert_eq!(names, vec![COLLECTION.to_string()], "the collection survives");
    if let Some(op) = state.uncertain.take() {
        let found = get(client, &op.keys()).await;
        uncertain =
            format!("; the {} in flight was {}", op.describe(), resolve_uncertain(&op, &mut state.model, &found));
    }

    let request = v1::QueryRequest {
        collection: COLLECTION.into(),
        output_fields: vec!["val".into(), "v".into()],
        read: read_at(0),
        ..Default::default()
    };
    let columns = client.query(request).await.expect("a Strong query of all rows").into_inner().columns;
    let rows = key_vals(&columns);
    let present = unique(&rows, "Strong query of all rows");
    assert!(present == state.model.vals, "Strong query after restart: {}", difference(&state.model.vals, &present));
    let stored = vectors(&columns, "v");
    assert_eq!(stored.len(), rows.len(), "one vector per row");
    for ((key, val), v) in rows.iter().zip(stored) {
        assert_eq!(v, vector(*key, *val), "the vector of key {key} (val {val})");
    }
    let resurrected: Vec<_> = state.model.deleted.iter().filter(|k| present.contains_key(k)).take(8).collect();
    assert!(resurrected.is_empty(), "deleted keys are back: {resurrected:?}");

    let count = client
        .query(v1::QueryRequest {
            collection: COLLECTION.into(),
            count_only: true,
            read: read_at(0),
            ..Default::default()
        })
        .await
        .expect("a Strong count")
        .into_inner()
        .count;
    assert_eq!(count, state.model.vals.len() as u64, "count after restart");

    let deleted: Vec<i64> = state.model.deleted.iter().copied().collect();
    let sample: Vec<i64> =
        rand::seq::index::sample(rng, deleted.len(), deleted.len().min(64)).into_iter().map(|i| deleted[i]).collect();
    if !sample.is_empty() {
        let found = get(client, &sample).await;
        assert!(found.is_empty(), "get returns deleted keys: {found:?}");
    }
    let live = state.model.choose(rng, 64);
    let found = get(client, &live).await;
    let expected: BTreeMap<i64, i64> = live.iter().map(|k| (*k, state.model.vals[k])).collect();
    assert!(found == expected, "get of live keys after restart: {}", difference(&expected, &found));

    for question in &state.answers {
        let (rows, count) = all_rows(client, question.ts).await.expect("time travel after restart");
        assert_eq!(count, question.count, "count as of {} after restart", question.ts);
        if rows != question.rows {
            let (expected, actual) = (unique(&question.rows, "recorded"), unique(&rows, "time travel"));
            panic!("rows as of {} after restart: {}", question.ts, difference(&expected, &actual));
        }
    }
    while state.answers.len() > TIME_TRAVEL_KEPT {
        state.answers.swap_remove(rng.random_range(0..state.answers.len()));
    }
    (rows.len(), uncertain)
}

/// Fails unless the server was already being killed when `status` came back.
fn expect_killed(killed: &AtomicBool, status: &tonic::Status, what: &str) {
    assert!(killed.load(Ordering::SeqCst), "{what} failed while the server was up: {status:?}");
}

/// Writes random operations until the server dies; the model follows every acknowledged one.
async fn write_until_killed(
    mut client: Client,
    mut state: State,
    mut rng: StdRng,
    killed: Arc<AtomicBool>,
) -> (State, TrialWrites) {
    let mut writes = TrialWrites::default();
    loop {
        let choice = rng.random_range(0..100);
        let op = if state.model.keys.len() < 10 || choice < 40 {
            let n = rng.random_range(1..=20);
            let rows = (0..n)
                .map(|i| {
                    state.next_val += 1;
                    (state.next_key + i, state.next_val)
                })
                .collect();
            state.next_key += n;
            Op::Insert(rows)
        } else if choice < 70 {
            let n = rng.random_range(1..=10);
            let rows = state
                .model
                .choose(&mut rng, n)
                .into_iter()
                .map(|k| {
                    state.next_val += 1;
                    (k, state.next_val)
                })
                .collect();
            Op::Upsert(rows)
        } else if choice < 97 {
            let n = rng.random_range(1..=5);
            Op::Delete(state.model.choose(&mut rng, n))
        } else {
            if let Err(status) = client.flush(v1::CollectionRef { name: COLLECTION.into() }).await {
                expect_killed(&killed, &status, "flush");
                writes.in_flight = format!("flush ({:?})", status.code());
                break;
            }
            writes.flushes += 1;
            continue;
        };
        let ts = match send(&mut client, &op).await {
            Ok(ts) => ts,
            Err(status) => {
                expect_killed(&killed, &status, &op.describe());
                writes.in_flight = format!("{} ({:?})", op.describe(), status.code());
                state.uncertain = Some(op);
                break;
            }
        };
        op.apply(&mut state.model);
        writes.acknowledged += 1;
        let ask = writes.acknowledged == 2 || rng.random_ratio(1, 25);
        if ask && writes.time_travel < TIME_TRAVEL_PER_TRIAL {
            match all_rows(&mut client, ts).await {
                Ok((rows, count)) => {
                    assert_eq!(count, state.model.vals.len() as u64, "count as of the write at {ts}");
                    let (actual, expected) = (unique(&rows, "time travel"), &state.model.vals);
                    assert!(actual == *expected, "rows as of the write at {ts}: {}", difference(expected, &actual));
                    state.answers.push(TimeTravel { ts, count, rows });
                    writes.time_travel += 1;
                }
                Err(status) => {
                    expect_killed(&killed, &status, "time travel");
                    writes.in_flight = format!("time-travel query ({:?})", status.code());
                    break;
                }
            }
        }
    }
    (state, writes)
}

/// Starts the server and waits for a healthy answer; returns it, a client and the time that took.
async fn start(dir: &Path) -> (ServerProcess, Client, Duration) {
    let started = Instant::now();
    let dir = dir.to_path_buf();
    let server = tokio::task::spawn_blocking(move || ServerProcess::start_within(&dir, SERVER_FLAGS, RECOVERY_TIMEOUT))
        .await
        .unwrap_or_else(|e| std::panic::resume_unwind(e.into_panic()));
    let endpoint = Endpoint::from_shared(format!("http://{}", server.address))
        .expect("an address")
        .timeout(RPC_TIMEOUT)
        .connect_timeout(Duration::from_secs(5));
    loop {
        let last = match endpoint.connect().await {
            Ok(channel) => {
                let mut client = VectorflowClient::new(channel).max_decoding_message_size(1 << 30);
                match client.health(v1::Empty {}).await {
                    Ok(health) if health.get_ref().status == "SERVING" => {
                        return (server, client, started.elapsed());
                    }
                    other => format!("{other:?}"),
                }
            }
            Err(e) => format!("{e:?}"),
        };
        assert!(started.elapsed() < RECOVERY_TIMEOUT, "not healthy within {RECOVERY_TIMEOUT:?}: {last}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn env_number(name: &str) -> Option<u64> {
    let text = std::env::var(name).ok()?;
    Some(text.trim().parse().unwrap_or_else(|e| panic!("{name}={text:?}: {e}")))
}

/// Keeps the data directory when the test fails, so the state can be inspected.
struct DataDir(Option<tempfile::TempDir>);

impl DataDir {
    fn path(&self) -> &Path {
        self.0.as_ref().expect("the data directory").path()
    }
}

impl Drop for DataDir {
    fn drop(&mut self) {
        if std::thread::panicking()
            && let Some(dir) = self.0.take()
        {
            eprintln!("data directory kept: {}", dir.keep().display());
        }
    }
}

#[test]
fn sigkill_at_random_moments_loses_no_acknowledged_write() {
    let trials = env_number("VF_CRASH_TRIALS").unwrap_or(10);
    let seed = env_number("VF_CRASH_SEED").unwrap_or_else(|| {
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).expect("a clock after 1970").as_nanos()
            as u64
    });
    println!("crash test: {trials} trials, VF_CRASH_SEED={seed}, server flags {SERVER_FLAGS:?}");
    let dir = DataDir(Some(tempfile::Builder::new().prefix("vectorflow-crash-").tempdir().expect("a temp dir")));
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build().expect("a runtime");
    let mut rng = StdRng::seed_from_u64(seed);
    let mut state = State { model: Model::default(), next_key: 0, next_val: 0, answers: Vec::new(), uncertain: None };
    let test_started = Instant::now();
    let mut acknowledged = 0;

    for trial in 1..=trials {
        let (mut server, mut client, recovery) = runtime.block_on(start(dir.path()));
        let verify_started = Instant::now();
        let (rows, uncertain) = if trial == 1 {
            runtime
                .block_on(client.create_collection(v1::CreateCollectionRequest { schema: Some(schema()) }))
                .expect("the collection is created");
            (0, String::new())
        } else {
            runtime.block_on(verify(&mut client, &mut state, &mut rng))
        };
        let answers = state.answers.len();
        let verified_in = verify_started.elapsed();

        let killed = Arc::new(AtomicBool::new(false));
        let delay = Duration::from_millis(rng.random_range(KILL_AFTER_MS));
        let writer_rng = StdRng::seed_from_u64(rng.random());
        let writer = runtime.spawn(write_until_killed(client.clone(), state, writer_rng, killed.clone()));
        std::thread::sleep(delay);
        killed.store(true, Ordering::SeqCst);
        let status = server.kill();
        assert_eq!(status.signal(), Some(9), "trial {trial}: the server was still running until SIGKILL: {status}");
        let (next, writes) = runtime.block_on(writer).unwrap_or_else(|e| std::panic::resume_unwind(e.into_panic()));
        state = next;
        println!(
            "trial {trial}/{trials}: recovered in {} ms, verified {rows} rows and {answers} time-travel answers in {} ms{uncertain}; \
             {} writes acknowledged ({} flushes, {} time-travel answers recorded) in {} ms, then SIGKILL during {}",
            recovery.as_millis(),
            verified_in.as_millis(),
            writes.acknowledged,
            writes.flushes,
            writes.time_travel,
            delay.as_millis(),
            if writes.in_flight.is_empty() { "no call" } else { &writes.in_flight },
        );
        acknowledged += writes.acknowledged;
    }

    assert!(acknowledged >= trials as usize, "only {acknowledged} writes acknowledged in {trials} trials");

    let (mut server, mut client, recovery) = runtime.block_on(start(dir.path()));
    let answers = state.answers.len();
    let (rows, uncertain) = runtime.block_on(verify(&mut client, &mut state, &mut rng));
    println!(
        "final: recovered in {} ms, verified {rows} rows and {answers} time-travel answers{uncertain}",
        recovery.as_millis()
    );
    let status = server.terminate();
    assert!(status.success(), "SIGTERM exits cleanly: {status:?}");
    let (mut server, mut client, recovery) = runtime.block_on(start(dir.path()));
    let (rows, _) = runtime.block_on(verify(&mut client, &mut state, &mut rng));
    let status = server.terminate();
    assert!(status.success(), "SIGTERM exits cleanly: {status:?}");
    println!(
        "after SIGTERM: recovered in {} ms, verified {rows} rows again; {acknowledged} writes acknowledged, \
         {} deleted keys, {} s in all",
        recovery.as_millis(),
        state.model.deleted.len(),
        test_started.elapsed().as_secs()
    );
}
