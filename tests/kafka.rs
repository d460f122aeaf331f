//! Kafka ingestion against a real Kafka-protocol broker on loopback:
//! `tansu` (installed by `.ci/run` into /opt/vectorflow-kafka) with SQLite
//! storage, started per test on a free port and stopped by PID.
//!
//! The broker binary is `$VF_TEST_TANSU`, or tansu in that directory.
//! Without one the tests say so and pass, unless `VF_TEST_REQUIRE_KAFKA` is
//! set (as `.ci/run` does), when a missing broker fails them.

mod common;

use common::kafka::{Broker, produce};

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use rdkafka::ClientConfig;
use rdkafka::producer::FutureProducer;
use vectorflow::{
    CollectionSchema, Consistency, DataType, Engine, EngineConfig, FieldSchema, KafkaConfig, Metric, Pk, QueryOptions,
    Role, SearchOptions, SearchPlan, StorageConfig, Value, row,
};

const DIM: usize = 4;

/// `id` int64, `v` float_vector(4) L2, `n` int64.
fn schema(name: &str) -> CollectionSchema {
    CollectionSchema::new(
        name,
        vec![
            FieldSchema::int64_primary("id", false),
            FieldSchema::vector("v", DIM, Metric::L2),
            FieldSchema::new("n", DataType::Int64),
        ],
    )
}

fn vector(id: i64, n: i64) -> Vec<f32> {
    vec![id as f32, n as f32, (id % 7) as f32, 1.0]
}

fn json_row(id: i64, n: i64) -> String {
    serde_json::json!({ "id": id, "v": vector(id, n), "n": n }).to_string()
}

fn kafka_engine(dir: &Path, broker: &Broker, workers: usize) -> Engine {
    let config = EngineConfig {
        workers,
        seal_rows: 2_000,
        search_plan: SearchPlan { exact_below_rows: usize::MAX, ..SearchPlan::default() },
        kafka: Some(KafkaConfig { bootstrap_servers: broker.bootstrap(), ..KafkaConfig::default() }),
        checkpoint_interval: None,
        compaction_interval: None,
        ..EngineConfig::new(dir)
    };
    Engine::open(config).expect("engine opens on kafka")
}

/// An engine (2 workers) with collection `name`, reading topic
/// `vectorflow.<name>` created with `partitions`.
fn engine_reading(dir: &Path, broker: &Broker, name: &str, partitions: i32) -> Engine {
    broker.create_topic(&format!("vectorflow.{name}"), partitions);
    let engine = kafka_engine(&dir.join("data"), broker, 2);
    engine.create_collection(schema(name)).unwrap();
    engine
}

/// Every live row as id → n, read with `consistency` (a scan: more rows
/// than one query answer may hold).
fn live(engine: &Engine, collection: &str, consistency: Consistency) -> BTreeMap<i64, i64> {
    by_id(engine.scan(collection, &everything(consistency), None).unwrap())
}

fn everything(consistency: Consistency) -> QueryOptions {
    QueryOptions {
        filter: Some("id >= 0".into()),
        output_fields: vec!["id".into(), "n".into()],
        consistency,
        ..Default::default()
    }
}

fn by_id(rows: Vec<BTreeMap<String, Value>>) -> BTreeMap<i64, i64> {
    rows.into_iter().map(|row| (common::int(&row["id"]), common::int(&row["n"]))).collect()
}

/// Partition counts below, equal to and above the worker count; plain
/// producers and API writes (produced to the topic by Vectorflow) together.
#[test]
fn any_partition_count_with_any_worker_count() {
    let dir = tempfile::tempdir().unwrap();
    let Some(broker) = Broker::start(dir.path()) else { return };
    let engine = kafka_engine(&dir.path().join("data"), &broker, 2);
    let producer = broker.producer();
    for partitions in [1, 2, 5] {
        let name = format!("p{partitions}");
        broker.create_topic(&format!("vectorflow.{name}"), partitions);
        engine.create_collection(schema(&name)).unwrap();
        let mut reference = BTreeMap::new();
        let records: Vec<(String, Option<String>)> = (0..1_000)
            .map(|i| {
                let id = i % 700;
                reference.insert(id, i);
                (id.to_string(), Some(json_row(id, i)))
            })
            .collect();
        produce(&producer, &format!("vectorflow.{name}"), &records);
        // Strong: everything the broker acknowledged before the read.
        assert_eq!(live(&engine, &name, Consistency::Strong), reference, "{partitions} partitions");

        // API writes go through the topic and come back with their time.
        let session = engine.session();
        let rows: Vec<_> =
            (1_000..1_100).map(|id| row([("id", id.into()), ("v", vector(id, 1).into()), ("n", 1.into())])).collect();
        let written = session.insert_rows(&name, &rows).unwrap();
        assert_eq!(written.pks.len(), 100);
        for id in 1_000..1_100 {
            reference.insert(id, 1);
        }
        let deleted = session.delete(&name, &[Pk::Int(0), Pk::Int(1_000)]).unwrap();
        assert!(deleted.ts > written.ts);
        reference.remove(&0);
        reference.remove(&1_000);
        let seen = session.query(&name, &everything(Consistency::Session)).unwrap();
        assert_eq!(by_id(seen), reference);
        // Time travel to the insert: the deletes are not there yet.
        let before_delete = engine
            .query(
                &name,
                &QueryOptions {
                    filter: Some("id == 0 or id == 1000".into()),
                    output_fields: vec!["id".into()],
                    as_of: Some(written.ts),
                    ..Default::default()
                },
            )
            .unwrap();
        assert_eq!(before_delete.len(), 2);
        let stats = engine.ingest_stats(&name).unwrap().unwrap();
        assert_eq!(stats.partitions.len(), partitions as usize);
        assert_eq!(stats.lag(), 0);
        assert_eq!(stats.dead_letters, 0);
    }
}

/// A Debezium change stream (with the schema/payload envelope) feeds a
/// collection: creates, updates, snapshot reads and deletes.
#[test]
fn debezium_change_events_feed_a_collection() {
    let dir = tempfile::tempdir().unwrap();
    let Some(broker) = Broker::start(dir.path()) else { return };
    broker.create_topic("pg.public.cdc", 2);
    let config = EngineConfig {
        workers: 2,
        kafka: Some(KafkaConfig {
            bootstrap_servers: broker.bootstrap(),
            topics: [("cdc".to_string(), "pg.public.cdc".to_string())].into(),
            formats: [("cdc".to_string(), vectorflow::RecordFormat::Debezium)].into(),
            ..KafkaConfig::default()
        }),
        checkpoint_interval: None,
        compaction_interval: None,
        ..EngineConfig::new(dir.path().join("data"))
    };
    let engine = Engine::open(config).unwrap();
    engine.create_collection(schema("cdc")).unwrap();
    let event = |op: &str, before: Option<i64>, after: Option<(i64, i64)>| {
        let row = |id: i64, n: i64| serde_json::json!({ "id": id, "v": vector(id, n), "n": n });
        let payload = serde_json::json!({
            "op": op,
            "before": before.map(|id| row(id, 0)),
            "after": after.map(|(id, n)| row(id, n)),
            "source": { "connector": "postgresql", "table": "cdc" },
        });
        serde_json::json!({ "schema": {}, "payload": payload }).to_string()
    };
    let key = |id: i64| serde_json::json!({ "schema": {}, "payload": { "id": id } }).to_string();
    let records = vec![
        (key(1), Some(event("r", None, Some((1, 10))))),
        (key(2), Some(event("c", None, Some((2, 20))))),
        (key(3), Some(event("c", None, Some((3, 30))))),
        (key(2), Some(event("u", Some(2), Some((2, 21))))),
        (key(3), Some(event("d", Some(3), None))),
        // Debezium's tombstone after a delete.
        (key(3), None),
    ];
    produce(&broker.producer(), "pg.public.cdc", &records);
    assert_eq!(live(&engine, "cdc", Consistency::Strong), BTreeMap::from([(1, 10), (2, 21)]));
}

/// 100k rows from a plain producer, with tombstones and `{"op": "delete"}`
/// mixed in: the searchable set equals the reference, read while the
/// records are still arriving and once they are all in.
#[test]
fn hundred_thousand_rows_with_tombstones() {
    let dir = tempfile::tempdir().unwrap();
    let Some(broker) = Broker::start(dir.path()) else { return };
    let engine = engine_reading(dir.path(), &broker, "items", 3);
    let mut reference = BTreeMap::new();
    let mut records = Vec::new();
    for i in 0..100_000i64 {
        let id = i % 60_000;
        reference.insert(id, i);
        records.push((id.to_string(), Some(json_row(id, i))));
        if i % 10 == 9 {
            // Delete an earlier key: a tombstone, or the explicit op.
            let gone = (i * 7919) % (id + 1);
            reference.remove(&gone);
            let value = (i % 20 == 9).then(|| r#"{"op":"delete"}"#.to_string());
            records.push((gone.to_string(), value));
        }
    }
    let producer = broker.producer();
    let (first, rest) = records.split_at(records.len() / 2);
    produce(&producer, "vectorflow.items", first);
    // A Strong read in the middle sees exactly the acknowledged half.
    let mut half = BTreeMap::new();
    for (key, value) in first {
        let id: i64 = key.parse().unwrap();
        match value.as_deref().map(|v| serde_json::from_str::<serde_json::Value>(v).unwrap()) {
            Some(json) if json.get("n").is_some() => half.insert(id, json["n"].as_i64().unwrap()),
            _ => half.remove(&id),
        };
    }
    assert_eq!(live(&engine, "items", Consistency::Strong), half);
    produce(&producer, "vectorflow.items", rest);
    assert_eq!(live(&engine, "items", Consistency::Strong), reference);
    // Searchable: the nearest row to a live row's own vector is itself.
    let (&id, &n) = reference.iter().nth(12_345).unwrap();
    let hits = engine.search("items", &[vector(id, n)], &vectorflow::SearchOptions::new(1)).unwrap();
    assert_eq!(common::pks(&hits.hits[0]), vec![Pk::Int(id)]);
    let ingest = engine.ingest_stats("items").unwrap().unwrap();
    assert_eq!((ingest.lag(), ingest.dead_letters), (0, 0));
}

/// 10k malformed records between 20k good ones: every good one applied,
/// every bad one in the dead-letter topic with its original bytes and a
/// reason naming the problem, and the count in the statistics.
#[test]
fn bad_records_go_to_the_dead_letter_topic() {
    let dir = tempfile::tempdir().unwrap();
    let Some(broker) = Broker::start(dir.path()) else { return };
    let engine = engine_reading(dir.path(), &broker, "mixed", 2);
    let mut reference = BTreeMap::new();
    let mut records = Vec::new();
    let mut bad = BTreeMap::new();
    for i in 0..30_000i64 {
        if i % 3 != 2 {
            reference.insert(i, i);
            records.push((i.to_string(), Some(json_row(i, i))));
            continue;
        }
        let (value, reason) = match i % 5 {
            0 => ("not json at all".to_string(), "not JSON"),
            1 => (serde_json::json!({ "id": i, "v": vector(i, i), "n": "seven" }).to_string(), "`n`"),
            2 => (serde_json::json!({ "id": i, "v": [1.0, 2.0], "n": 1 }).to_string(), "`v`"),
            3 => (serde_json::json!({ "v": vector(i, i), "n": 1 }).to_string(), "key"),
            _ => (r#"{"op":"truncate"}"#.to_string(), "op"),
        };
        // A record without a key: the row gives none either.
        let key = if i % 5 == 3 { String::new() } else { i.to_string() };
        bad.insert(value.clone(), reason);
        records.push((key, Some(value)));
    }
    produce(&broker.producer(), "vectorflow.mixed", &records);
    assert_eq!(live(&engine, "mixed", Consistency::Strong), reference);
    let ingest = engine.ingest_stats("mixed").unwrap().unwrap();
    assert_eq!(ingest.dead_letters, 10_000);
    let letters = broker.read_all("vectorflow.mixed.dlq", 1);
    assert_eq!(letters.len(), 10_000);
    for (_, value, headers) in &letters {
        let value = String::from_utf8(value.clone().unwrap()).unwrap();
        let expected = bad.get(&value).unwrap_or_else(|| panic!("unexpected dead letter {value}"));
        let reason = &headers["vectorflow.error"];
        assert!(reason.contains(expected), "{value}: {reason}");
        assert_eq!(headers["vectorflow.topic"], "vectorflow.mixed");
        assert!(headers.contains_key("vectorflow.offset"));
    }
}

/// The broker is killed and restarted while records arrive: ingestion
/// resumes on its own and nothing is lost or applied twice.
#[test]
fn ingestion_resumes_after_a_broker_restart() {
    let dir = tempfile::tempdir().unwrap();
    let Some(mut broker) = Broker::start(dir.path()) else { return };
    let engine = engine_reading(dir.path(), &broker, "steady", 2);
    let records: Vec<_> = (0..20_000i64).map(|i| (i.to_string(), Some(json_row(i, i)))).collect();
    let producer = broker.producer();
    produce(&producer, "vectorflow.steady", &records[..10_000]);
    broker.kill();
    std::thread::sleep(Duration::from_millis(500));
    broker.restart();
    let producer = broker.producer();
    produce(&producer, "vectorflow.steady", &records[10_000..]);
    let expected: BTreeMap<i64, i64> = (0..20_000).map(|i| (i, i)).collect();
    assert_eq!(live(&engine, "steady", Consistency::Strong), expected);
    // One version per record: nothing was applied twice.
    assert_eq!(engine.stats("steady", Consistency::Strong).unwrap().versions, 20_000);
}

/// An engine on a shared object store (`store`) with `role`.
fn engine_with_role(dir: &Path, store: &Path, broker: &Broker, workers: usize, role: Role) -> Engine {
    let config = EngineConfig {
        workers,
        seal_rows: 300,
        search_plan: SearchPlan { exact_below_rows: usize::MAX, ..SearchPlan::default() },
        kafka: Some(KafkaConfig { bootstrap_servers: broker.bootstrap(), ..KafkaConfig::default() }),
        storage: StorageConfig { url: format!("file://{}", store.display()), ..StorageConfig::default() },
        checkpoint_interval: None,
        compaction_interval: None,
        role,
        ..EngineConfig::new(dir)
    };
    Engine::open(config).expect("engine opens on kafka")
}

/// Every row of `collection` as of `ts` (id → n), and the exact 10 nearest
/// ids of two query vectors then.
fn answers_at(engine: &Engine, collection: &str, ts: u64) -> (BTreeMap<i64, i64>, Vec<Vec<i64>>) {
    let rows = by_id(
        engine.scan(collection, &QueryOptions { as_of: Some(ts), ..everything(Consistency::Strong) }, None).unwrap(),
    );
    let options = SearchOptions { as_of: Some(ts), ..SearchOptions::new(10) };
    let found = engine.search(collection, &[vector(3, 5), vector(250, 1)], &options).unwrap();
    let ids = found.hits.iter().map(|hits| hits.iter().map(|h| common::pk_int(&h.pk)).collect()).collect();
    (rows, ids)
}

/// A read replica (3 workers) of a primary (2 workers): it loads the
/// primary's checkpoint, follows the topic with the primary's offset
/// bindings while writes keep coming, and answers as the primary does at
/// every time; it refuses changes, sees a Strong write of the primary, and
/// follows collections the primary creates and drops.
#[test]
fn a_replica_answers_as_the_primary_at_every_time_while_ingestion_runs() {
    let dir = tempfile::tempdir().unwrap();
    // A replica follows a primary's Kafka topics: without Kafka it is refused.
    let alone = Engine::open(EngineConfig { role: Role::Replica, ..EngineConfig::new(dir.path().join("alone")) });
    assert!(
        matches!(&alone, Err(vectorflow::Error::InvalidArgument { argument, .. }) if argument == "role"),
        "{alone:?}"
    );
    let Some(broker) = Broker::start(dir.path()) else { return };
    // Another deployment on the same brokers publishes bindings of its own
    // collection 1 to the same bindings topic: nobody else takes them.
    {
        let config = EngineConfig {
            kafka: Some(KafkaConfig {
                bootstrap_servers: broker.bootstrap(),
                topic_prefix: "stranger.".into(),
                bindings_topic: "vectorflow._bindings".into(),
                ..KafkaConfig::default()
            }),
            checkpoint_interval: None,
            compaction_interval: None,
            ..EngineConfig::new(dir.path().join("stranger"))
        };
        let stranger = Engine::open(config).unwrap();
        stranger.create_collection(schema("docs")).unwrap();
        // More records than the primary below writes, in several bindings.
        for from in (0..3_000).step_by(500) {
            let rows: Vec<_> = (from..from + 500)
                .map(|id| row([("id", id.into()), ("v", vector(id, 9).into()), ("n", 9.into())]))
                .collect();
            stranger.insert_rows("docs", &rows).unwrap();
        }
    }
    let store = dir.path().join("store");
    let primary = engine_with_role(&dir.path().join("primary"), &store, &broker, 2, Role::Primary);
    primary.create_collection(schema("docs")).unwrap();
    let write = |ids: std::ops::Range<i64>, n: i64| {
        let rows: Vec<_> =
            ids.map(|id| row([("id", id.into()), ("v", vector(id, n).into()), ("n", n.into())])).collect();
        primary.upsert_rows("docs", &rows).unwrap().ts
    };
    // Sealed segments in a published checkpoint, then writes only in the topic.
    let mut times = vec![write(0..700, 0)];
    times.push(primary.delete("docs", &(0..50).map(Pk::Int).collect::<Vec<_>>()).unwrap().ts);
    primary.flush("docs").unwrap();
    times.push(write(600..900, 1));

    let replica = engine_with_role(&dir.path().join("replica"), &store, &broker, 3, Role::Replica);
    assert!(replica.recovery_report().segments > 0, "the replica loads the published segments");
    // Writes go on while the replica answers.
    let writer = {
        let primary = primary.clone();
        std::thread::spawn(move || {
            let mut times = Vec::new();
            for round in 0..30i64 {
                let ids = (round * 37) % 900..(round * 37) % 900 + 40;
                let rows: Vec<_> = ids
                    .map(|id| row([("id", id.into()), ("v", vector(id, round).into()), ("n", round.into())]))
                    .collect();
                times.push(primary.upsert_rows("docs", &rows).unwrap().ts);
                let gone: Vec<Pk> = (0..3).map(|i| Pk::Int((round * 53 + i * 7) % 900)).collect();
                times.push(primary.delete("docs", &gone).unwrap().ts);
                if round == 15 {
                    primary.flush("docs").unwrap();
                }
            }
            times
        })
    };
    let same_as_primary = |collection: &str, ts: u64| {
        let (replica_rows, replica_hits) = answers_at(&replica, collection, ts);
        let (primary_rows, primary_hits) = answers_at(&primary, collection, ts);
        let differing: Vec<_> = primary_rows.iter().filter(|(id, n)| replica_rows.get(id) != Some(n)).take(5).collect();
        assert!(
            replica_rows == primary_rows,
            "as of {ts}: the replica has {} rows, the primary {}; first differing: {differing:?}",
            replica_rows.len(),
            primary_rows.len()
        );
        assert_eq!(replica_hits, primary_hits, "as of {ts}");
    };
    for &ts in &times {
        same_as_primary("docs", ts);
    }
    let during = writer.join().unwrap();
    for &ts in &during {
        same_as_primary("docs", ts);
    }
    // Strong on the replica sees what the primary acknowledged before it.
    let last = write(5_000..5_001, 77);
    assert_eq!(live(&replica, "docs", Consistency::Strong).get(&5_000), Some(&77));
    assert_eq!(live(&replica, "docs", Consistency::Strong), live(&primary, "docs", Consistency::Strong));
    same_as_primary("docs", last);

    // Changes are the primary's.
    let refused = replica.upsert_rows("docs", &[row([("id", 1.into()), ("v", vector(1, 1).into()), ("n", 1.into())])]);
    assert!(matches!(refused, Err(vectorflow::Error::ReadOnly(_))), "{refused:?}");
    assert!(matches!(replica.create_collection(schema("other")), Err(vectorflow::Error::ReadOnly(_))));
    assert!(matches!(replica.flush("docs"), Err(vectorflow::Error::ReadOnly(_))));
    assert!(matches!(replica.drop_collection("docs"), Err(vectorflow::Error::ReadOnly(_))));

    // A collection the primary creates later is followed, and so is its drop.
    primary.create_collection(schema("later")).unwrap();
    let rows: Vec<_> =
        (0..10).map(|id| row([("id", id.into()), ("v", vector(id, 2).into()), ("n", 2.into())])).collect();
    let at = primary.insert_rows("later", &rows).unwrap().ts;
    let deadline = Instant::now() + Duration::from_secs(30);
    while !replica.list_collections().contains(&"later".to_string()) {
        assert!(Instant::now() < deadline, "the replica did not follow the new collection");
        std::thread::sleep(Duration::from_millis(50));
    }
    same_as_primary("later", at);
    primary.drop_collection("later").unwrap();
    while replica.list_collections().contains(&"later".to_string()) {
        assert!(Instant::now() < deadline, "the replica did not follow the drop");
        std::thread::sleep(Duration::from_millis(50));
    }
    drop(replica);

    // A replica opened on the newest checkpoint answers the same (also
    // with the primary stopped, up to the primary's last published
    // frontier) and writes nothing to the object store.
    primary.flush("docs").unwrap();
    let expected = answers_at(&primary, "docs", last);
    // Frontiers past the flush are published meanwhile.
    std::thread::sleep(Duration::from_millis(500));
    primary.shutdown();
    drop(primary);
    let before = store_listing(&store);
    let again = engine_with_role(&dir.path().join("replica2"), &store, &broker, 1, Role::Replica);
    assert_eq!(answers_at(&again, "docs", last), expected);
    drop(again);
    assert_eq!(store_listing(&store), before, "a replica writes nothing to the object store");
}

/// Every file under `dir` with its size.
fn store_listing(dir: &Path) -> BTreeMap<PathBuf, u64> {
    let mut files = BTreeMap::new();
    let mut pending = vec![dir.to_path_buf()];
    while let Some(dir) = pending.pop() {
        for entry in std::fs::read_dir(&dir).unwrap() {
            let entry = entry.unwrap();
            let metadata = entry.metadata().unwrap();
            if metadata.is_dir() {
                pending.push(entry.path());
            } else {
                files.insert(entry.path(), metadata.len());
            }
        }
    }
    files
}

mod sigkill {
    //! `vectorflow serve --kafka` killed with SIGKILL while it consumes.

    use super::*;
    use common::ServerProcess;
    use tonic::transport::{Channel, Endpoint};
    use vectorflow_proto::v1;
    use vectorflow_proto::v1::vectorflow_client::VectorflowClient;

    type Client = VectorflowClient<Channel>;

    fn proto_schema() -> v1::CollectionSchema {
        let field = |name: &str, data_type: v1::DataType| v1::FieldSchema {
            name: name.into(),
            data_type: data_type as i32,
            ..Default::default()
        };
        v1::CollectionSchema {
            name: "crashk".into(),
            description: String::new(),
            fields: vec![
                v1::FieldSchema { is_primary: true, ..field("id", v1::DataType::Int64) },
                v1::FieldSchema {
                    dim: DIM as u32,
                    metric: v1::Metric::L2 as i32,
                    ..field("v", v1::DataType::FloatVector)
                },
                field("n", v1::DataType::Int64),
            ],
            ..Default::default()
        }
    }

    async fn connect(server: &ServerProcess) -> Client {
        let endpoint = Endpoint::from_shared(format!("http://{}", server.address)).unwrap();
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Ok(channel) = endpoint.connect().await {
                return VectorflowClient::new(channel).max_decoding_message_size(1 << 30);
            }
            assert!(Instant::now() < deadline, "no connection to the server");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    async fn strong_stats(client: &mut Client) -> v1::CollectionStats {
        let request =
            v1::StatsRequest { collection: "crashk".into(), consistency: v1::ConsistencyLevel::Strong as i32 };
        client.get_stats(request).await.unwrap().into_inner()
    }

    /// id → n as of `as_of` (0: a Strong read now).
    async fn rows(client: &mut Client, as_of: u64) -> BTreeMap<i64, i64> {
        let request = v1::QueryRequest {
            collection: "crashk".into(),
            output_fields: vec!["id".into(), "n".into()],
            read: Some(v1::ReadOptions { consistency: v1::ConsistencyLevel::Strong as i32, as_of, guarantee_ts: 0 }),
            ..Default::default()
        };
        let answer = client.query(request).await.unwrap().into_inner();
        let column = |name: &str| -> Vec<i64> {
            match answer.columns.iter().find(|c| c.name == name).and_then(|c| c.values.clone()) {
                Some(v1::field_data::Values::Ints(ints)) => ints.values,
                other => panic!("column {name}: {other:?}"),
            }
        };
        column("id").into_iter().zip(column("n")).collect()
    }

    /// Records are produced (upserts over 3,000 keys and tombstones) while
    /// the server is killed three times; after each restart the answers
    /// as of times read before the kill are unchanged, and at the end the
    /// rows equal the last record of every key in the topic.
    #[test]
    fn killed_while_consuming_applies_every_record_once() {
        let dir = tempfile::tempdir().unwrap();
        let Some(broker) = Broker::start(dir.path()) else { return };
        broker.create_topic("vectorflow.crashk", 3);
        let data = dir.path().join("data");
        let bootstrap = broker.bootstrap();
        let flags = ["--kafka", &bootstrap, "--workers", "2", "--seal-rows", "500", "--checkpoint-interval-ms", "300"];
        let runtime = tokio::runtime::Runtime::new().unwrap();
        let mut server = ServerProcess::start(&data, &flags);
        let mut client = runtime.block_on(connect(&server));
        runtime
            .block_on(client.create_collection(v1::CreateCollectionRequest { schema: Some(proto_schema()) }))
            .unwrap();

        let mut reference = BTreeMap::new();
        let mut records = Vec::new();
        for i in 0..40_000i64 {
            let id = (i * 31) % 3_000;
            if i % 9 == 8 {
                reference.remove(&id);
                records.push((id.to_string(), None));
            } else {
                reference.insert(id, i);
                records.push((id.to_string(), Some(json_row(id, i))));
            }
        }
        let producer_broker = broker.bootstrap();
        let producing = std::thread::spawn(move || {
            let producer: FutureProducer =
                ClientConfig::new().set("bootstrap.servers", producer_broker).set("linger.ms", "5").create().unwrap();
            for chunk in records.chunks(2_000) {
                produce(&producer, "vectorflow.crashk", chunk);
                std::thread::sleep(Duration::from_millis(100));
            }
        });

        let mut remembered: Vec<(u64, BTreeMap<i64, i64>)> = Vec::new();
        for kill in 0..3 {
            std::thread::sleep(Duration::from_millis(400 + 300 * kill));
            // An answer as of a time before the kill, to ask again after it.
            let stats = runtime.block_on(strong_stats(&mut client));
            remembered.push((stats.read_ts, runtime.block_on(rows(&mut client, stats.read_ts))));
            std::thread::sleep(Duration::from_millis(150));
            server.kill();
            server = ServerProcess::start(&data, &flags);
            client = runtime.block_on(connect(&server));
            for (ts, answer) in &remembered {
                assert_eq!(&runtime.block_on(rows(&mut client, *ts)), answer, "as of {ts} after kill {kill}");
            }
        }
        producing.join().unwrap();
        assert_eq!(runtime.block_on(rows(&mut client, 0)), reference);
        let stats = runtime.block_on(strong_stats(&mut client));
        let ingest = stats.kafka.expect("kafka statistics");
        assert_eq!(ingest.partitions.iter().map(|p| p.lag).sum::<u64>(), 0);
        assert_eq!(stats.live_rows as usize, reference.len());
        assert!(
            remembered.iter().any(|(_, answer)| !answer.is_empty() && answer != &reference),
            "kills landed mid-stream"
        );
    }

    /// `serve --role replica` beside a primary on the same topics and
    /// object store: the replica answers as the primary does at the
    /// primary's times, also after the primary checkpointed and moved on,
    /// and refuses writes with FAILED_PRECONDITION.
    #[test]
    fn a_replica_server_answers_as_the_primary_and_refuses_writes() {
        let dir = tempfile::tempdir().unwrap();
        let Some(broker) = Broker::start(dir.path()) else { return };
        broker.create_topic("vectorflow.crashk", 2);
        let bootstrap = broker.bootstrap();
        let store = format!("file://{}", dir.path().join("store").display());
        let flags =
            ["--kafka", &bootstrap, "--storage", &store, "--seal-rows", "200", "--checkpoint-interval-ms", "300"];
        let runtime = tokio::runtime::Runtime::new().unwrap();
        let primary = ServerProcess::start(&dir.path().join("primary"), &flags);
        let mut to_primary = runtime.block_on(connect(&primary));
        runtime
            .block_on(to_primary.create_collection(v1::CreateCollectionRequest { schema: Some(proto_schema()) }))
            .unwrap();
        let producer = broker.producer();
        let batch = |from: i64| -> Vec<(String, Option<String>)> {
            (from..from + 1_500)
                .map(|i| {
                    let id = (i * 7) % 1_000;
                    (id.to_string(), if i % 5 == 4 { None } else { Some(json_row(id, i)) })
                })
                .collect()
        };
        produce(&producer, "vectorflow.crashk", &batch(0));
        let first = runtime.block_on(strong_stats(&mut to_primary)).read_ts;
        let expected_first = runtime.block_on(rows(&mut to_primary, first));

        let replica_flags: Vec<&str> = flags.iter().copied().chain(["--role", "replica"]).collect();
        let replica = ServerProcess::start(&dir.path().join("replica"), &replica_flags);
        let mut to_replica = runtime.block_on(connect(&replica));
        assert_eq!(runtime.block_on(rows(&mut to_replica, first)), expected_first);
        produce(&producer, "vectorflow.crashk", &batch(1_500));
        let second = runtime.block_on(strong_stats(&mut to_primary)).read_ts;
        let expected_second = runtime.block_on(rows(&mut to_primary, second));
        assert_ne!(expected_first, expected_second);
        assert_eq!(runtime.block_on(rows(&mut to_replica, second)), expected_second);
        assert_eq!(runtime.block_on(rows(&mut to_replica, 0)), runtime.block_on(rows(&mut to_primary, 0)));

        let write = v1::WriteRequest {
            collection: "crashk".into(),
            columns: vec![
                common::wire::ints("id", vec![1]),
                common::wire::vectors("v", &[vector(1, 1)]),
                common::wire::ints("n", vec![1]),
            ],
            ..Default::default()
        };
        let refused = runtime.block_on(to_replica.insert(write)).unwrap_err();
        assert_eq!(refused.code(), tonic::Code::FailedPrecondition, "{refused:?}");
        assert!(refused.message().contains("read replica"), "{}", refused.message());
    }
}
