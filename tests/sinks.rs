//! Kafka sinks against a real Kafka-protocol broker (tansu, see
//! `common::kafka`): the records a sink writes replay, at every time, to an
//! exact search (or the filtered rows) as of that time; a sink resumed from
//! any prefix of its records (cut between times or inside one) writes
//! exactly the rest; and through the real binary, a server killed with
//! SIGKILL mid-stream leaves every change in the topic exactly once after
//! its restart.

mod common;

use common::kafka::Broker;
use common::{ServerProcess, wire};

use std::collections::BTreeMap;
use std::path::Path;
use std::time::{Duration, Instant};

use rdkafka::ClientConfig;
use rdkafka::producer::{BaseRecord, DefaultProducerContext, Producer, ThreadedProducer};
use serde_json::Value as Json;
use tonic::transport::Channel;
use vectorflow::{
    Engine, EngineConfig, KafkaConfig, Pk, QueryOptions, SearchOptions, SearchPlan, SinkState, SubscribeOptions, Value,
};
use vectorflow_proto::v1;
use vectorflow_proto::v1::vectorflow_client::VectorflowClient;

const FILTER: &str = "tag == \"a\"";

fn kafka_engine(dir: &Path, broker: &Broker) -> Engine {
    let config = EngineConfig {
        workers: 2,
        seal_rows: 16,
        search_plan: SearchPlan { exact_below_rows: usize::MAX, ..SearchPlan::default() },
        kafka: Some(KafkaConfig { bootstrap_servers: broker.bootstrap(), ..KafkaConfig::default() }),
        checkpoint_interval: None,
        compaction_interval: None,
        ..EngineConfig::new(dir)
    };
    Engine::open(config).expect("engine opens on kafka")
}

/// Deterministic writes: upserts of 40 keys (about half tagged `a`), and
/// deletes; returns each write's time.
fn write(engine: &Engine, from: u64, count: u64) -> Vec<u64> {
    let mut times = Vec::new();
    for i in from..from + count {
        let id = ((i * 37) % 40) as i64;
        let ts = if i % 5 == 4 {
            engine.delete("docs", &[Pk::Int(id)]).unwrap().ts
        } else {
            let x = ((i * 13) % 17) as f32 - 8.0;
            let y = ((i * 7) % 11) as f32 - 5.0;
            let tag: Value = if (i * 3) % 5 < 3 { "a".into() } else { "b".into() };
            let row = vectorflow::row([("id", id.into()), ("v", vec![x, y].into()), ("tag", tag)]);
            engine.upsert_rows("docs", &[row]).unwrap().ts
        };
        times.push(ts);
    }
    times
}

fn search_options(as_of: Option<u64>) -> SubscribeOptions {
    SubscribeOptions {
        filter: Some(FILTER.into()),
        output_fields: vec!["tag".into()],
        as_of,
        progress_every: Duration::from_millis(50),
        ..SubscribeOptions::search(vec![vec![0.0, 0.0], vec![4.0, -2.0]], 3)
    }
}

fn changes_options(as_of: Option<u64>) -> SubscribeOptions {
    SubscribeOptions {
        filter: Some(FILTER.into()),
        output_fields: vec!["tag".into()],
        as_of,
        progress_every: Duration::from_millis(50),
        ..SubscribeOptions::changes()
    }
}

fn wait_written(engine: &Engine, name: &str, through: u64) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let status = engine.sinks().unwrap().into_iter().find(|s| s.definition.name == name).expect("the sink");
        assert!(!matches!(status.state, SinkState::Failed(_)), "sink {name}: {}", status.state);
        if status.written_through >= through && status.state == SinkState::Running {
            return;
        }
        assert!(Instant::now() < deadline, "sink {name} wrote through {} of {through}", status.written_through);
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The values of a one-partition topic, parsed.
fn read_topic(broker: &Broker, topic: &str) -> Vec<(String, Json)> {
    broker
        .read_all(topic, 1)
        .into_iter()
        .map(|(key, value, _)| {
            let key = String::from_utf8(key.unwrap_or_default()).unwrap();
            (key, serde_json::from_slice(&value.unwrap_or_default()).unwrap())
        })
        .collect()
}

/// Every time's records are whole, in order, and there once: `(ts, seq)`
/// counts up without a gap or a repeat.
fn check_places(records: &[(String, Json)]) {
    let mut expected: Option<(u64, u64, u64)> = None;
    for (key, value) in records {
        let (ts, seq, count) =
            (value["ts"].as_u64().unwrap(), value["seq"].as_u64().unwrap(), value["count"].as_u64().unwrap());
        match expected {
            Some((at, next, of)) if next < of => {
                assert_eq!((ts, seq, count), (at, next, of), "record {key} out of place");
            }
            Some((at, _, _)) => {
                assert!(ts > at && seq == 0, "record {key} at ({ts}, {seq}) after time {at}");
            }
            None => assert_eq!(seq, 0, "the first record {key}"),
        }
        expected = Some((ts, seq + 1, count));
    }
    if let Some((at, next, of)) = expected {
        assert_eq!(next, of, "time {at} ends after {next} of its {of} records");
    }
}

/// Per query, key → score, after replaying the search sink's records at
/// or before `ts`.
fn search_answer_at(records: &[(String, Json)], ts: u64) -> Vec<BTreeMap<i64, f32>> {
    let mut answer = vec![BTreeMap::new(), BTreeMap::new()];
    for (_, value) in records.iter().take_while(|(_, v)| v["ts"].as_u64().unwrap() <= ts) {
        if value["kind"] == "progress" {
            continue;
        }
        let query = value["query"].as_u64().unwrap() as usize;
        let pk = value["pk"].as_i64().unwrap();
        if value["op"] == "+" {
            answer[query].insert(pk, value["score"].as_f64().unwrap() as f32);
        } else {
            answer[query].remove(&pk);
        }
    }
    answer
}

fn exact_search_at(engine: &Engine, ts: u64) -> Vec<BTreeMap<i64, f32>> {
    let options = SearchOptions { as_of: Some(ts), filter: Some(FILTER.into()), ..SearchOptions::new(3) };
    let found = engine.search("docs", &[vec![0.0, 0.0], vec![4.0, -2.0]], &options).unwrap();
    found.hits.iter().map(|hits| hits.iter().map(|h| (common::pk_int(&h.pk), h.score)).collect()).collect()
}

/// Key → tag of the rows passing the filter: those at the changefeed's
/// start (`rows`), and its records at or before `ts` replayed.
fn rows_at(mut rows: BTreeMap<i64, String>, records: &[(String, Json)], ts: u64) -> BTreeMap<i64, String> {
    for (_, value) in records.iter().take_while(|(_, v)| v["ts"].as_u64().unwrap() <= ts) {
        if value["kind"] != "row" {
            continue;
        }
        let pk = value["pk"].as_i64().unwrap();
        if value["op"] == "+" {
            rows.insert(pk, value["fields"]["tag"].as_str().unwrap().to_string());
        } else {
            rows.remove(&pk);
        }
    }
    rows
}

fn filtered_rows_at(engine: &Engine, ts: u64) -> BTreeMap<i64, String> {
    let options = QueryOptions {
        filter: Some(FILTER.into()),
        output_fields: vec!["id".into(), "tag".into()],
        as_of: Some(ts),
        ..Default::default()
    };
    engine
        .scan("docs", &options, None)
        .unwrap()
        .into_iter()
        .map(|row| {
            let Value::String(tag) = &row["tag"] else { panic!("tag is text") };
            (common::int(&row["id"]), tag.clone())
        })
        .collect()
}

fn same_answer(got: &[BTreeMap<i64, f32>], want: &[BTreeMap<i64, f32>]) -> bool {
    got.len() == want.len()
        && got.iter().zip(want).all(|(g, w)| {
            g.len() == w.len() && g.iter().zip(w).all(|((gk, gs), (wk, ws))| gk == wk && (gs - ws).abs() < 1e-4)
        })
}

/// The records that tell changes (progress records come as time passes,
/// so two runs write them at different times) are equal, but for the last
/// bits of their scores.
fn same_changes(got: &[(String, Json)], want: &[(String, Json)]) -> bool {
    let strip = |records: &[(String, Json)]| -> Vec<(String, Json, f64)> {
        records
            .iter()
            .filter(|(_, value)| value["kind"] != "progress")
            .map(|(key, value)| {
                let mut value = value.clone();
                let score = value.as_object_mut().and_then(|o| o.remove("score")).and_then(|s| s.as_f64());
                (key.clone(), value, score.unwrap_or(0.0))
            })
            .collect()
    };
    let (got, want) = (strip(got), strip(want));
    got.len() == want.len() && got.iter().zip(&want).all(|(g, w)| g.0 == w.0 && g.1 == w.1 && (g.2 - w.2).abs() < 1e-4)
}

fn copy_into(broker: &Broker, topic: &str, records: &[(String, Json)]) {
    broker.create_topic(topic, 1);
    let producer: ThreadedProducer<DefaultProducerContext> =
        ClientConfig::new().set("bootstrap.servers", broker.bootstrap()).create().unwrap();
    for (key, value) in records {
        let value = value.to_string();
        producer.send(BaseRecord::to(topic).key(key).payload(&value).partition(0)).unwrap();
    }
    producer.flush(Duration::from_secs(30)).unwrap();
}

#[test]
fn a_sink_replays_to_exact_answers_and_resumes_exactly_from_any_cut() {
    let dir = tempfile::tempdir().unwrap();
    let Some(broker) = Broker::start(dir.path()) else { return };
    let engine = kafka_engine(&dir.path().join("data"), &broker);
    engine.create_collection(common::small_schema("docs")).unwrap();
    let mut times = write(&engine, 0, 30);
    let start = *times.last().unwrap();
    let search = engine.create_sink("near", "docs", "near-topic", &search_options(Some(start))).unwrap();
    assert_eq!(search.definition.start_ts, start);
    engine.create_sink("feed", "docs", "feed-topic", &changes_options(Some(start))).unwrap();
    // Sinks live in the catalog: names are unique, and a collection
    // with sinks cannot be dropped.
    let taken = engine.create_sink("near", "docs", "other", &search_options(None)).unwrap_err();
    assert!(taken.to_string().contains("near"), "{taken}");
    assert!(engine.drop_collection("docs").is_err());
    assert!(engine.create_sink("bad name", "docs", "t", &search_options(None)).is_err());
    times.extend(write(&engine, 30, 90));
    let last = *times.last().unwrap();
    wait_written(&engine, "near", last);
    wait_written(&engine, "feed", last);
    let near = read_topic(&broker, "near-topic");
    let feed = read_topic(&broker, "feed-topic");
    check_places(&near);
    check_places(&feed);
    assert_eq!(near[0].1["ts"].as_u64(), Some(start));
    assert!(near.iter().all(|(key, value)| key.starts_with("near") && value["sink"] == "near"));
    for &ts in times.iter().filter(|&&ts| ts >= start) {
        assert!(same_answer(&search_answer_at(&near, ts), &exact_search_at(&engine, ts)), "search at {ts}");
        let replayed = rows_at(filtered_rows_at(&engine, start), &feed, ts);
        assert_eq!(replayed, filtered_rows_at(&engine, ts), "changefeed at {ts}");
    }
    let changed_times = near.iter().filter(|(_, v)| v["kind"] == "change").count();
    assert!(changed_times > 10, "the writes changed the answer {changed_times} times");

    // Cut the search sink's records anywhere: between two times, inside
    // the first answer, inside a change, or before anything. A sink made
    // again with the same definition on a topic holding that prefix
    // writes exactly the rest.
    let inside_change = near
        .iter()
        .position(|(_, v)| v["kind"] == "change" && v["count"].as_u64() > Some(1) && v["seq"] == 0)
        .expect("a change of several records")
        + 1;
    let between = near.iter().position(|(_, v)| v["kind"] == "change").unwrap();
    let at_progress = near.iter().rposition(|(_, v)| v["kind"] == "progress").unwrap_or(1);
    let cuts: std::collections::BTreeSet<usize> =
        [0, 1, between, inside_change, at_progress, near.len() / 2, near.len() - 1].into();
    for cut in cuts {
        engine.drop_sink("near").unwrap();
        let topic = format!("near-cut-{cut}");
        copy_into(&broker, &topic, &near[..cut]);
        engine.create_sink("near", "docs", &topic, &search_options(Some(start))).unwrap();
        wait_written(&engine, "near", last);
        let resumed = read_topic(&broker, &topic);
        check_places(&resumed);
        assert!(same_changes(&resumed, &near), "cut at {cut}: {} records, {} expected", resumed.len(), near.len());
    }
    engine.drop_sink("near").unwrap();
    engine.drop_sink("feed").unwrap();
    assert!(engine.sinks().unwrap().is_empty());
    engine.drop_collection("docs").unwrap();
}

/// The server through its gRPC API, on a runtime of the test's own.
struct Api {
    runtime: tokio::runtime::Runtime,
    client: VectorflowClient<Channel>,
}

impl Api {
    fn connect(server: &ServerProcess) -> Api {
        let runtime = tokio::runtime::Runtime::new().unwrap();
        let address = format!("http://{}", server.address);
        let client = runtime.block_on(VectorflowClient::connect(address)).expect("connects");
        Api { runtime, client }
    }

    /// Write `i` of the same deterministic sequence as [`write`]; its time.
    fn write(&mut self, i: u64) -> u64 {
        let id = ((i * 37) % 40) as i64;
        let response = if i % 5 == 4 {
            let keys =
                v1::PrimaryKeys { keys: Some(v1::primary_keys::Keys::IntKeys(v1::IntValues { values: vec![id] })) };
            let request = v1::DeleteRequest {
                collection: "docs".into(),
                target: Some(v1::delete_request::Target::Keys(keys)),
                ..Default::default()
            };
            self.runtime.block_on(self.client.delete(request))
        } else {
            let x = ((i * 13) % 17) as f32 - 8.0;
            let y = ((i * 7) % 11) as f32 - 5.0;
            let tag = if (i * 3) % 5 < 3 { "a" } else { "b" };
            let columns = vec![
                wire::ints("id", vec![id]),
                wire::vectors("v", &[vec![x, y]]),
                wire::strings("tag", vec![tag.to_string()]),
            ];
            self.runtime.block_on(self.client.upsert(wire::write("docs", columns)))
        };
        response.expect("the write is acknowledged").into_inner().ts
    }

    fn search_at(&mut self, ts: u64) -> Vec<BTreeMap<i64, f32>> {
        let request = v1::SearchRequest {
            collection: "docs".into(),
            vectors: Some(vectorflow_proto::pack_vectors(&[vec![0.0, 0.0], vec![4.0, -2.0]])),
            k: 3,
            filter: FILTER.into(),
            read: Some(v1::ReadOptions { as_of: ts, ..Default::default() }),
            ..Default::default()
        };
        let response = self.runtime.block_on(self.client.search(request)).expect("searches").into_inner();
        response
            .results
            .iter()
            .map(|hits| {
                let Some(v1::primary_keys::Keys::IntKeys(keys)) = hits.keys.as_ref().and_then(|k| k.keys.clone())
                else {
                    return BTreeMap::new();
                };
                keys.values.iter().copied().zip(hits.scores.iter().copied()).collect()
            })
            .collect()
    }

    fn sink(&mut self, name: &str) -> v1::SinkInfo {
        let sinks = self.runtime.block_on(self.client.list_sinks(v1::Empty {})).expect("lists").into_inner().sinks;
        sinks.into_iter().find(|s| s.name == name).expect("the sink is listed")
    }

    fn wait_written(&mut self, name: &str, through: u64) {
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            let sink = self.sink(name);
            assert!(!sink.state.starts_with("failed"), "sink {name}: {}", sink.state);
            if sink.written_through >= through && sink.state == "running" {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "sink {name}: {} through {} of {through}",
                sink.state,
                sink.written_through
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// A server killed with SIGKILL while it writes a sink's records, then
/// restarted: the topic holds every change once, in order, and replaying
/// it gives the exact answer at every write's time, before and after.
#[test]
fn after_a_sigkill_and_restart_the_sink_topic_holds_every_change_once() {
    let dir = tempfile::tempdir().unwrap();
    let Some(broker) = Broker::start(dir.path()) else { return };
    let data = dir.path().join("data");
    let flags = ["--kafka", &broker.bootstrap()];
    let mut server = ServerProcess::start(&data, &flags);
    let mut api = Api::connect(&server);
    let schema = wire::schema("docs", 2, vec![wire::nullable_varchar("tag", 8)]);
    api.runtime
        .block_on(api.client.create_collection(v1::CreateCollectionRequest { schema: Some(schema) }))
        .expect("creates the collection");
    let mut times: Vec<u64> = (0..20).map(|i| api.write(i)).collect();
    let query = v1::SubscribeRequest {
        collection: "docs".into(),
        vectors: Some(vectorflow_proto::pack_vectors(&[vec![0.0, 0.0], vec![4.0, -2.0]])),
        k: 3,
        filter: FILTER.into(),
        output_fields: vec!["tag".into()],
        ..Default::default()
    };
    let request =
        v1::CreateSinkRequest { name: "near".into(), topic: "near".into(), query: Some(query), progress_every_ms: 20 };
    let created = api.runtime.block_on(api.client.create_sink(request)).expect("creates the sink").into_inner();
    let start = created.start_ts;
    assert!(start >= *times.last().unwrap());
    // A changefeed sink, made with the command-line client.
    let cli = |args: &[&str]| {
        let output = std::process::Command::new(env!("CARGO_BIN_EXE_vectorflow"))
            .args(args)
            .args(["--addr", &server.address, "--json"])
            .output()
            .expect("the client runs");
        assert!(output.status.success(), "vectorflow {args:?}: {}", String::from_utf8_lossy(&output.stderr));
        String::from_utf8(output.stdout).unwrap()
    };
    let made = cli(&["sink", "create", "feed", "--topic", "feed", "-c", "docs", "--filter", FILTER]);
    let made: Json = serde_json::from_str(made.trim()).unwrap();
    assert_eq!((made["name"].as_str(), made["topic"].as_str()), (Some("feed"), Some("feed")));
    // Writes as fast as they are acknowledged, then SIGKILL at once:
    // the sink is still writing the last of them.
    times.extend((20..80).map(|i| api.write(i)));
    server.kill();
    let written_before = broker.read_all("near", 1).len();

    let mut server = ServerProcess::start(&data, &flags);
    let mut api = Api::connect(&server);
    times.extend((80..120).map(|i| api.write(i)));
    let last = *times.last().unwrap();
    api.wait_written("near", last);
    api.wait_written("feed", last);
    let records = read_topic(&broker, "near");
    eprintln!("{written_before} records before the SIGKILL, {} in all", records.len());
    check_places(&records);
    let feed = read_topic(&broker, "feed");
    check_places(&feed);
    assert!(feed.iter().filter(|(_, v)| v["kind"] == "row").count() > 20, "the changefeed wrote rows");
    let listed = std::process::Command::new(env!("CARGO_BIN_EXE_vectorflow"))
        .args(["sink", "list", "--addr", &server.address, "--json"])
        .output()
        .expect("the client runs");
    let listed: Vec<Json> =
        String::from_utf8(listed.stdout).unwrap().lines().map(|line| serde_json::from_str(line).unwrap()).collect();
    let names: Vec<&str> = listed.iter().filter_map(|sink| sink["name"].as_str()).collect();
    assert_eq!(names, ["feed", "near"], "both sinks came back after the restart");
    assert_eq!(records[0].1["ts"].as_u64(), Some(start));
    for &ts in times.iter().filter(|&&ts| ts >= start) {
        assert!(same_answer(&search_answer_at(&records, ts), &api.search_at(ts)), "search at {ts}");
    }
    server.terminate();
}
