//! End-to-end behaviour of the embedded engine: recall, consistency levels,
//! recovery from the log, worker-count independence and input errors.

mod common;

use std::time::Duration;

use common::*;
use vectorflow::crates::connectors::dataset::RecallJudge;
use vectorflow::{
    CollectionSchema, Consistency, DataType, Dataset, Engine, EngineConfig, Error, FieldSchema, GetOptions, Metric, Pk,
    SearchOptions, Value, row,
};

#[test]
fn recall_on_pypi_20k_through_the_engine_with_sealed_and_growing_data() {
    let dataset = Dataset::open(dataset_dir("pypi-20k")).expect("pypi-20k dataset");
    let vectors = dataset.base_vectors().unwrap();
    let queries = dataset.query_vectors().unwrap();
    let attributes = dataset.base_attributes().unwrap();
    let truth = dataset.ground_truth("unfiltered").unwrap().expect("unfiltered ground truth");
    let judge = RecallJudge::new(&vectors, &queries, dataset.metric()).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let engine = Engine::open(EngineConfig { workers: 2, seal_rows: 3000, ..EngineConfig::new(dir.path()) }).unwrap();
    let schema = dataset.collection_schema("pypi", &attributes).unwrap();
    engine.create_collection(schema.clone()).unwrap();
    for start in (0..vectors.rows).step_by(2000) {
        let batch =
            dataset.base_batch(&schema, &vectors, &attributes, start..(start + 2000).min(vectors.rows)).unwrap();
        engine.insert("pypi", &batch).unwrap();
    }
    let stats = engine.wait_for_indexes("pypi", Duration::from_secs(600)).unwrap();
    let stats_now = engine.stats("pypi", Consistency::Strong).unwrap();
    assert_eq!(stats_now.live_rows, vectors.rows);
    assert!(stats.sealed_segments >= 2 && stats_now.growing_rows > 0, "{stats_now:?}");

    let query_list: Vec<Vec<f32>> = (0..queries.rows).map(|q| queries.row(q).to_vec()).collect();
    let options = SearchOptions { output_fields: vec!["month".into()], ..SearchOptions::new(10) };
    let result = engine.search("pypi", &query_list, &options).unwrap();
    let mut recall = 0.0;
    for (q, hits) in result.hits.iter().enumerate() {
        assert_eq!(hits.len(), 10);
        assert!(hits.windows(2).all(|w| w[0].score >= w[1].score), "COSINE hits best first");
        assert!(hits.iter().all(|h| h.fields.contains_key("month")));
        let found: Vec<i64> = hits.iter().map(|h| pk_int(&h.pk)).collect();
        recall += truth.recall(&judge, q, 10, &found);
    }
    let recall = recall / queries.rows as f64;
    assert!(recall >= 0.95, "recall@10 = {recall}");

    // Filtered search, with default parameters, for every filter the dataset lists.
    let mut filters = 0;
    for (name, info) in &dataset.info.ground_truth {
        let Some(expression) = &info.expression else { continue };
        let truth = dataset.ground_truth(name).unwrap().unwrap();
        let options = SearchOptions { filter: Some(expression.clone()), ..SearchOptions::new(10) };
        let result = engine.search("pypi", &query_list, &options).unwrap();
        let recall: f64 = result
            .hits
            .iter()
            .enumerate()
            .map(|(q, hits)| truth.recall(&judge, q, 10, &hits.iter().map(|h| pk_int(&h.pk)).collect::<Vec<_>>()))
            .sum::<f64>()
            / queries.rows as f64;
        assert!(recall >= 0.95, "{name} (`{expression}`): recall@10 = {recall}");
        filters += 1;
    }
    assert!(filters >= 3, "pypi-20k lists filter10, filter1 and filter1b");
    engine.shutdown();
}

#[test]
fn strong_sees_acknowledged_writes_eventually_does_not_wait_session_sees_its_own() {
    let dir = tempfile::tempdir().unwrap();
    let engine = exact_engine(dir.path(), 2, 1000);
    engine.create_collection(small_schema("c")).unwrap();
    for id in 0..30 {
        engine.insert_rows("c", &[small_row(id, [id as f32, 0.0])]).unwrap();
        let rows = engine.get("c", &[Pk::Int(id)], &GetOptions::default()).unwrap();
        assert_eq!(rows.len(), 1, "Strong get right after write {id}");
        let hits = engine.search("c", &[vec![id as f32, 0.0]], &SearchOptions::new(1)).unwrap();
        assert_eq!(pks(&hits.hits[0]), vec![Pk::Int(id)]);
    }

    // With ingestion paused, a write is acknowledged but not applied.
    engine.pause_ingest();
    let session = engine.session();
    let write = session.insert_rows("c", &[small_row(100, [100.0, 0.0])]).unwrap();
    let query = [vec![100.0, 0.0]];
    let eventually = SearchOptions { consistency: Consistency::Eventually, ..SearchOptions::new(1) };
    let started = std::time::Instant::now();
    let seen = engine.search("c", &query, &eventually).unwrap();
    assert!(started.elapsed() < Duration::from_secs(5), "Eventually must not wait for the frontier");
    assert_ne!(pks(&seen.hits[0]), vec![Pk::Int(100)]);
    assert!(seen.read_ts < write.ts);
    let strong = SearchOptions { timeout: Some(Duration::from_millis(300)), ..SearchOptions::new(1) };
    assert!(matches!(engine.search("c", &query, &strong), Err(Error::Timeout(_))));
    let session_read = SearchOptions { consistency: Consistency::Session, ..strong.clone() };
    assert!(matches!(session.search("c", &query, &session_read), Err(Error::Timeout(_))));
    // Another session without writes is not held back.
    let other = engine.session();
    assert!(other.search("c", &query, &session_read).is_ok());
    engine.resume_ingest();
    let session_read = SearchOptions { timeout: Some(Duration::from_secs(30)), ..session_read };
    assert_eq!(pks(&session.search("c", &query, &session_read).unwrap().hits[0]), vec![Pk::Int(100)]);
    assert_eq!(pks(&engine.search("c", &query, &SearchOptions::new(1)).unwrap().hits[0]), vec![Pk::Int(100)]);
    let bounded = SearchOptions { consistency: Consistency::Bounded, ..SearchOptions::new(1) };
    assert!(engine.search("c", &query, &bounded).is_ok());
    engine.shutdown();
}

#[test]
fn reopening_without_flush_finds_every_acknowledged_write_at_the_same_timestamps() {
    let dir = tempfile::tempdir().unwrap();
    let ids: Vec<Pk> = (0..40).map(Pk::Int).collect();
    let (writes, before, after_upsert, deleted_at) = {
        let engine = exact_engine(dir.path(), 2, 7);
        engine.create_collection(small_schema("c")).unwrap();
        let mut writes = Vec::new();
        for chunk in (0..40).collect::<Vec<i64>>().chunks(10) {
            let rows: Vec<_> = chunk.iter().map(|&id| small_row(id, [id as f32, 1.0])).collect();
            writes.push(engine.insert_rows("c", &rows).unwrap());
        }
        let upsert = engine.upsert_rows("c", &[small_row(5, [-1.0, -1.0])]).unwrap();
        let delete = engine.delete("c", &[Pk::Int(6), Pk::Int(7)]).unwrap();
        let options = GetOptions { output_fields: vec!["v".into()], ..Default::default() };
        let before = engine.get("c", &ids, &GetOptions { as_of: Some(upsert.ts - 1), ..options.clone() }).unwrap();
        let after = engine.get("c", &ids, &GetOptions { as_of: Some(upsert.ts), ..options }).unwrap();
        assert_eq!(after.len(), 40);
        writes.push(upsert);
        // Dropped without flush or shutdown.
        drop(engine);
        (writes, before, after, delete.ts)
    };
    let engine = exact_engine(dir.path(), 3, 7);
    let options = GetOptions { output_fields: vec!["v".into()], ..Default::default() };
    let upsert_ts = writes.last().unwrap().ts;
    assert_eq!(engine.get("c", &ids, &GetOptions { as_of: Some(upsert_ts - 1), ..options.clone() }).unwrap(), before);
    assert_eq!(engine.get("c", &ids, &GetOptions { as_of: Some(upsert_ts), ..options.clone() }).unwrap(), after_upsert);
    let now = engine.get("c", &ids, &options).unwrap();
    assert_eq!(now.len(), 38, "the two deletes stay applied");
    assert_eq!(
        engine
            .get("c", &[Pk::Int(6)], &GetOptions { as_of: Some(deleted_at - 1), ..Default::default() })
            .unwrap()
            .len(),
        1
    );
    // Each insert batch is visible exactly from its own timestamp.
    for (i, write) in writes.iter().take(4).enumerate() {
        let first = Pk::Int(i as i64 * 10);
        let at = |ts| {
            engine
                .get("c", std::slice::from_ref(&first), &GetOptions { as_of: Some(ts), ..Default::default() })
                .unwrap()
                .len()
        };
        assert_eq!((at(write.ts - 1), at(write.ts)), (0, 1), "write {i}");
    }
    // The timestamp oracle resumes above the log.
    let next = engine.insert_rows("c", &[small_row(99, [0.0, 0.0])]).unwrap();
    assert!(next.ts > upsert_ts && next.ts > deleted_at);
    engine.shutdown();
}

#[test]
fn exact_search_answers_identically_with_one_and_four_workers() {
    let answers: Vec<Vec<Vec<(Pk, u32)>>> = [1, 4]
        .into_iter()
        .map(|workers| {
            let dir = tempfile::tempdir().unwrap();
            let engine = exact_engine(dir.path(), workers, 16);
            engine.create_collection(small_schema("c")).unwrap();
            let rows: Vec<_> =
                (0..300).map(|id| small_row(id, [(id * 37 % 101) as f32, (id * 11 % 53) as f32])).collect();
            engine.insert_rows("c", &rows).unwrap();
            engine.delete("c", &(0..300).step_by(7).map(Pk::Int).collect::<Vec<_>>()).unwrap();
            let moved: Vec<_> = (0..300).step_by(5).map(|id| small_row(id, [(id % 13) as f32, 3.0])).collect();
            engine.upsert_rows("c", &moved).unwrap();
            let queries: Vec<Vec<f32>> = (0..20).map(|q| vec![(q * 5) as f32, (q * 3 % 50) as f32]).collect();
            let result = engine.search("c", &queries, &SearchOptions::new(15)).unwrap();
            engine.shutdown();
            result.hits.iter().map(|hits| hits.iter().map(|h| (h.pk.clone(), h.score.to_bits())).collect()).collect()
        })
        .collect();
    assert_eq!(answers[0], answers[1]);
    assert!(answers[0].iter().all(|hits| hits.len() == 15));
}

#[test]
fn bad_input_gets_typed_errors_naming_the_field_and_applies_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let engine = exact_engine(dir.path(), 2, 100);
    engine.create_collection(small_schema("c")).unwrap();
    engine.insert_rows("c", &[small_row(1, [0.0, 0.0])]).unwrap();

    let field_error = |result: vectorflow::Result<vectorflow::WriteResult>, field: &str| match result {
        Err(Error::Field { field: f, problem }) => assert_eq!(f, field, "{problem}"),
        other => panic!("expected a field error on `{field}`, got {other:?}"),
    };
    // A good row next to a bad one: the whole write is refused.
    field_error(
        engine.insert_rows("c", &[small_row(2, [1.0, 1.0]), row([("id", 3i64.into()), ("v", vec![1.0].into())])]),
        "v",
    );
    field_error(
        engine.insert_rows("c", &[row([("id", 4i64.into()), ("v", vec![1.0, 2.0].into()), ("color", "red".into())])]),
        "color",
    );
    field_error(
        engine.insert_rows("c", &[row([("id", 5i64.into()), ("v", vec![1.0, 2.0].into()), ("tag", 7i64.into())])]),
        "tag",
    );
    field_error(
        engine.insert_rows(
            "c",
            &[row([("id", 6i64.into()), ("v", vec![1.0, 2.0].into()), ("tag", "much too long".into())])],
        ),
        "tag",
    );
    field_error(engine.insert_rows("c", &[row([("v", vec![1.0, 2.0].into())])]), "id");
    field_error(engine.insert_rows("c", &[row([("id", "x".into()), ("v", vec![1.0, 2.0].into())])]), "id");
    field_error(engine.insert_rows("c", &[row([("id", 8i64.into()), ("v", vec![f32::NAN, 2.0].into())])]), "v");
    field_error(engine.delete("c", &[Pk::Str("x".into())]), "id");
    assert_eq!(engine.stats("c", Consistency::Strong).unwrap().live_rows, 1, "nothing partially applied");

    match engine.search("c", &[vec![1.0, 2.0, 3.0]], &SearchOptions::new(3)) {
        Err(Error::Field { field, problem }) => assert!(field == "v" && problem.contains("dimension"), "{problem}"),
        other => panic!("{other:?}"),
    }
    assert!(matches!(
        engine.search("c", &[vec![1.0, 2.0]], &SearchOptions::new(0)),
        Err(Error::InvalidArgument { .. })
    ));
    let huge_ef = SearchOptions { ef: Some(1 << 40), ..SearchOptions::new(1) };
    assert!(
        matches!(engine.search("c", &[vec![1.0, 2.0]], &huge_ef), Err(Error::InvalidArgument { argument, .. }) if argument == "ef")
    );
    let unknown_output = SearchOptions { output_fields: vec!["nope".into()], ..SearchOptions::new(1) };
    assert!(
        matches!(engine.search("c", &[vec![1.0, 2.0]], &unknown_output), Err(Error::Field { field, .. }) if field == "nope")
    );
    assert!(matches!(engine.create_collection(small_schema("c")), Err(Error::CollectionExists(name)) if name == "c"));
    assert!(
        matches!(engine.insert_rows("nope", &[small_row(1, [0.0, 0.0])]), Err(Error::CollectionNotFound(name)) if name == "nope")
    );
    assert!(matches!(
        engine.search("nope", &[vec![0.0, 0.0]], &SearchOptions::new(1)),
        Err(Error::CollectionNotFound(_))
    ));
    assert!(matches!(engine.drop_collection("nope"), Err(Error::CollectionNotFound(_))));
    let future = SearchOptions { as_of: Some(engine.now() + (1 << 40)), ..SearchOptions::new(1) };
    assert!(matches!(engine.search("c", &[vec![0.0, 0.0]], &future), Err(Error::FutureTimestamp { .. })));
    let ancient = SearchOptions { as_of: Some(1), ..SearchOptions::new(1) };
    assert!(matches!(engine.search("c", &[vec![0.0, 0.0]], &ancient), Err(Error::OutsideRetention { .. })));
    let no_pk = CollectionSchema::new("d", vec![FieldSchema::vector("v", 2, Metric::L2)]);
    assert!(matches!(engine.create_collection(no_pk), Err(Error::InvalidSchema(_))));
    engine.shutdown();
}

#[test]
fn schema_features_auto_id_varchar_keys_defaults_json_and_drop() {
    let dir = tempfile::tempdir().unwrap();
    let engine = exact_engine(dir.path(), 2, 100);
    let auto = CollectionSchema::new(
        "auto",
        vec![
            FieldSchema::int64_primary("id", true),
            FieldSchema::vector("v", 2, Metric::IP),
            FieldSchema::vector("w", 3, Metric::COSINE),
            FieldSchema::new("year", DataType::Int16).with_default(Value::Int(2000)),
            FieldSchema::new("meta", DataType::Json).nullable(),
            FieldSchema::new("score", DataType::Double).nullable(),
            FieldSchema::new("ok", DataType::Bool).with_default(Value::Bool(true)),
        ],
    );
    engine.create_collection(auto).unwrap();
    let rows = vec![
        row([("v", vec![1.0, 0.0].into()), ("w", vec![0.0, 0.0, 2.0].into()), ("meta", r#"{"a": 1}"#.into())]),
        row([("v", vec![0.0, 1.0].into()), ("w", vec![3.0, 0.0, 0.0].into()), ("year", 1999i64.into())]),
    ];
    let write = engine.insert_rows("auto", &rows).unwrap();
    assert_eq!(write.pks.len(), 2);
    assert_ne!(write.pks[0], write.pks[1]);
    let options =
        GetOptions { output_fields: vec!["year".into(), "meta".into(), "w".into(), "ok".into()], ..Default::default() };
    let got = engine.get("auto", &write.pks, &options).unwrap();
    assert_eq!(got[0]["year"], Value::Int(2000));
    assert_eq!(got[1]["year"], Value::Int(1999));
    assert_eq!(got[0]["meta"], Value::String(r#"{"a": 1}"#.into()));
    assert_eq!(got[1]["meta"], Value::Null);
    assert_eq!(got[0]["w"], Value::Vector(vec![0.0, 0.0, 1.0]), "COSINE vectors are stored normalised");
    assert_eq!(got[0]["ok"], Value::Bool(true));
    // Two vector fields: the search must name one.
    assert!(matches!(
        engine.search("auto", &[vec![1.0, 0.0]], &SearchOptions::new(1)),
        Err(Error::InvalidArgument { .. })
    ));
    let by_ip = SearchOptions { field: Some("v".into()), ..SearchOptions::new(2) };
    let hits = engine.search("auto", &[vec![2.0, 1.0]], &by_ip).unwrap();
    assert_eq!(hits.hits[0][0].pk, write.pks[0]);
    assert_eq!(hits.hits[0][0].score, 2.0, "IP score is the inner product");
    let bad_json = row([("v", vec![1.0, 0.0].into()), ("w", vec![1.0, 0.0, 0.0].into()), ("meta", "{nope".into())]);
    assert!(matches!(engine.insert_rows("auto", &[bad_json]), Err(Error::Field { field, .. }) if field == "meta"));
    assert!(matches!(engine.upsert_rows("auto", &rows), Err(Error::Field { field, .. }) if field == "id"));

    let names = CollectionSchema::new(
        "names",
        vec![FieldSchema::varchar_primary("name", 16), FieldSchema::vector("v", 2, Metric::L2)],
    );
    engine.create_collection(names).unwrap();
    engine.insert_rows("names", &[row([("name", "ada".into()), ("v", vec![0.0, 0.0].into())])]).unwrap();
    engine.upsert_rows("names", &[row([("name", "ada".into()), ("v", vec![5.0, 5.0].into())])]).unwrap();
    let hits = engine.search("names", &[vec![5.0, 5.0]], &SearchOptions::new(5)).unwrap();
    assert_eq!(hits.hits[0].len(), 1, "an upsert replaces the row");
    assert_eq!((hits.hits[0][0].pk.clone(), hits.hits[0][0].score), (Pk::Str("ada".into()), 0.0));
    assert_eq!(engine.list_collections(), vec!["auto".to_string(), "names".to_string()]);
    engine.drop_collection("names").unwrap();
    assert_eq!(engine.list_collections(), vec!["auto".to_string()]);
    assert!(matches!(engine.describe_collection("names"), Err(Error::CollectionNotFound(_))));
    engine.create_collection(small_schema("names")).unwrap();
    assert_eq!(engine.stats("names", Consistency::Strong).unwrap().live_rows, 0, "a new collection starts empty");
    engine.shutdown();
}

#[test]
fn aliases_resolve_for_reads_and_writes_swap_atomically_under_searches_and_survive_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let engine = exact_engine(dir.path(), 2, 100);
    // Each collection holds rows of its own: blue's ids are below 1,000, green's above.
    for (name, first) in [("blue", 0i64), ("green", 1000)] {
        engine.create_collection(small_schema(name)).unwrap();
        let rows: Vec<_> = (0..150).map(|i| small_row(first + i, [i as f32, 0.0])).collect();
        engine.insert_rows(name, &rows).unwrap();
    }
    engine.create_alias("live", "blue").unwrap();
    assert_eq!(engine.describe_alias("live").unwrap(), "blue");
    assert_eq!(engine.describe_collection("live").unwrap().schema.name, "blue");
    assert_eq!(engine.describe_collection("blue").unwrap().aliases, vec!["live".to_string()]);
    let strong = SearchOptions { consistency: Consistency::Strong, ..SearchOptions::new(3) };
    let ids = |options: &SearchOptions| -> Vec<i64> {
        engine.search("live", &[vec![0.0, 0.0]], options).unwrap().hits[0].iter().map(|h| pk_int(&h.pk)).collect()
    };
    assert_eq!(ids(&strong), vec![0, 1, 2]);
    // A write through the alias goes to the collection it names.
    engine.insert_rows("live", &[small_row(-1, [0.0, 0.0])]).unwrap();
    assert_eq!(ids(&strong), vec![-1, 0, 1]);
    assert_eq!(engine.stats("blue", Consistency::Strong).unwrap().live_rows, 151);

    // The rules: an alias is unique, never a collection's name, and never dangles.
    assert!(matches!(engine.create_alias("live", "green"), Err(Error::InvalidArgument { .. })));
    assert!(matches!(engine.create_alias("green", "blue"), Err(Error::InvalidArgument { .. })));
    assert!(matches!(engine.create_alias("x", "nope"), Err(Error::CollectionNotFound(_))));
    assert!(
        matches!(engine.create_alias("no spaces", "blue"), Err(Error::InvalidArgument { argument, .. }) if argument == "alias")
    );
    assert!(matches!(engine.alter_alias("other", "green"), Err(Error::AliasNotFound(_))));
    assert!(matches!(engine.create_collection(small_schema("live")), Err(Error::InvalidArgument { .. })));
    assert!(matches!(engine.drop_collection("blue"), Err(Error::InvalidArgument { .. })));
    assert!(matches!(engine.drop_collection("live"), Err(Error::InvalidArgument { .. })));

    // Searches run flat out through the alias while it moves to green:
    // each one answers from blue or from green, never fails, never mixes.
    let stop = std::sync::atomic::AtomicBool::new(false);
    let eventually = SearchOptions { consistency: Consistency::Eventually, ..SearchOptions::new(3) };
    let seen = std::thread::scope(|scope| {
        let searchers: Vec<_> = (0..4)
            .map(|_| {
                scope.spawn(|| {
                    let (mut blue, mut green) = (0, 0);
                    while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                        match ids(&eventually).as_slice() {
                            [-1, 0, 1] => blue += 1,
                            [1000, 1001, 1002] => green += 1,
                            other => panic!("an answer from neither collection: {other:?}"),
                        }
                    }
                    (blue, green)
                })
            })
            .collect();
        std::thread::sleep(Duration::from_millis(100));
        engine.alter_alias("live", "green").unwrap();
        std::thread::sleep(Duration::from_millis(100));
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        searchers.into_iter().map(|s| s.join().unwrap()).fold((0, 0), |a, b| (a.0 + b.0, a.1 + b.1))
    });
    assert!(seen.0 > 0 && seen.1 > 0, "searches before and after the swap: {seen:?}");
    assert_eq!(ids(&strong), vec![1000, 1001, 1002]);
    assert_eq!(engine.list_aliases(Some("green")).unwrap(), vec!["live".to_string()]);
    assert!(engine.list_aliases(Some("blue")).unwrap().is_empty());
    engine.drop_collection("blue").unwrap();
    engine.create_alias("next", "green").unwrap();
    engine.shutdown();
    drop(engine);

    let engine = exact_engine(dir.path(), 2, 100);
    assert_eq!(engine.list_aliases(None).unwrap(), vec!["live".to_string(), "next".to_string()]);
    assert_eq!(engine.describe_collection("live").unwrap().schema.name, "green");
    engine.drop_alias("live").unwrap();
    assert!(matches!(engine.drop_alias("live"), Err(Error::AliasNotFound(_))));
    assert!(matches!(engine.search("live", &[vec![0.0, 0.0]], &strong), Err(Error::CollectionNotFound(_))));
    assert_eq!(engine.search("next", &[vec![0.0, 0.0]], &strong).unwrap().hits[0].len(), 3);
    engine.shutdown();
}

#[test]
fn concurrent_writers_and_readers_finish_with_correct_counts() {
    let dir = tempfile::tempdir().unwrap();
    let engine = exact_engine(dir.path(), 2, 64);
    engine.create_collection(small_schema("c")).unwrap();
    std::thread::scope(|scope| {
        for t in 0..8i64 {
            let engine = engine.clone();
            scope.spawn(move || {
                let session = engine.session();
                for i in 0..40i64 {
                    let id = t * 1000 + i;
                    session.insert_rows("c", &[small_row(id, [t as f32, i as f32])]).unwrap();
                    if i % 4 == 0 {
                        let read = SearchOptions { consistency: Consistency::Session, ..SearchOptions::new(1) };
                        let hits = session.search("c", &[vec![t as f32, i as f32]], &read).unwrap();
                        assert_eq!(pks(&hits.hits[0]), vec![Pk::Int(id)], "thread {t} sees its write {i}");
                    }
                    if i % 10 == 9 {
                        session.delete("c", &[Pk::Int(id - 1)]).unwrap();
                    }
                }
            });
        }
    });
    // 8 threads x 40 rows, 4 deletes each.
    assert_eq!(engine.stats("c", Consistency::Strong).unwrap().live_rows, 8 * 36);
    assert_eq!(engine.count("c", &Default::default()).unwrap(), 8 * 36);
    engine.shutdown();
}

#[test]
fn writes_become_visible_while_searches_run_flat_out_and_the_searches_stay_exact() {
    let dir = tempfile::tempdir().unwrap();
    let engine = exact_engine(dir.path(), 2, 256);
    engine.create_collection(small_schema("c")).unwrap();
    // A base of rows on a grid, sealed and growing, for the searches to work on.
    let base: Vec<_> = (0..3000i64).map(|id| small_row(id, [(id % 100) as f32, (id / 100) as f32])).collect();
    for chunk in base.chunks(500) {
        engine.insert_rows("c", chunk).unwrap();
    }
    let stop = std::sync::atomic::AtomicBool::new(false);
    let searches = std::sync::atomic::AtomicUsize::new(0);
    std::thread::scope(|scope| {
        for client in 0..4i64 {
            let (engine, stop, searches) = (&engine, &stop, &searches);
            scope.spawn(move || {
                let mut i = client;
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    // Each query sits on a base row: exact search finds it first.
                    let id = (i * 37) % 3000;
                    let query = vec![(id % 100) as f32, (id / 100) as f32];
                    let hits = engine.search("c", &[query], &SearchOptions::new(5)).unwrap();
                    assert_eq!(hits.hits[0].len(), 5);
                    assert_eq!(hits.hits[0][0].pk, Pk::Int(id), "query on row {id}");
                    searches.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    i += 4;
                }
            });
        }
        // Meanwhile each write is acknowledged and then seen by a Strong
        // search and a Strong get (off the grid, so it is its own nearest).
        for i in 0..300i64 {
            let id = 10_000 + i;
            let vector = [-1000.0 - i as f32, 0.5];
            engine.insert_rows("c", &[small_row(id, vector)]).unwrap();
            let strong = SearchOptions { consistency: Consistency::Strong, ..SearchOptions::new(1) };
            let hits = engine.search("c", &[vector.to_vec()], &strong).unwrap();
            assert_eq!(pks(&hits.hits[0]), vec![Pk::Int(id)], "write {i} seen by a Strong search");
            assert_eq!(engine.get("c", &[Pk::Int(id)], &Default::default()).unwrap().len(), 1, "write {i}");
        }
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
    });
    assert!(searches.load(std::sync::atomic::Ordering::Relaxed) > 0, "the searches ran alongside the writes");
    assert_eq!(engine.count("c", &Default::default()).unwrap(), 3300);
    engine.shutdown();
}

#[test]
fn writes_wait_while_sealed_rows_wait_for_their_graph_and_go_through_once_it_is_built() {
    let dataset = Dataset::open(dataset_dir("pypi-20k")).expect("pypi-20k dataset");
    let vectors = dataset.base_vectors().unwrap();
    let attributes = dataset.base_attributes().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let config = EngineConfig {
        workers: 1,
        seal_rows: 8000,
        max_index_backlog_rows: Some(4000),
        checkpoint_interval: None,
        compaction_interval: None,
        ..EngineConfig::new(dir.path())
    };
    let engine = Engine::open(config).unwrap();
    let schema = dataset.collection_schema("pypi", &attributes).unwrap();
    engine.create_collection(schema.clone()).unwrap();
    let half = vectors.rows / 2;
    let first = dataset.base_batch(&schema, &vectors, &attributes, 0..half).unwrap();
    engine.insert("pypi", &first).unwrap();
    // Applied, the first 8,000 rows seal; their graph takes seconds to build.
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while engine.health().index_backlog_rows == 0 {
        assert!(std::time::Instant::now() < deadline, "the sealed rows never showed as owed: {:?}", engine.health());
        std::thread::sleep(Duration::from_millis(2));
    }
    assert_eq!(engine.health().writes_held, 0);
    let second = dataset.base_batch(&schema, &vectors, &attributes, half..vectors.rows).unwrap();
    engine.insert("pypi", &second).unwrap();
    let health = engine.health();
    assert_eq!((health.writes_held, health.writes_refused), (1, 0), "{health:?}");
    engine.wait_for_indexes("pypi", Duration::from_secs(600)).unwrap();
    assert_eq!(engine.stats("pypi", Consistency::Strong).unwrap().live_rows, vectors.rows);
    // Every graph built, nothing is owed (the gauge follows within a worker step).
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while engine.health().index_backlog_rows != 0 {
        assert!(std::time::Instant::now() < deadline, "still owed: {:?}", engine.health());
        std::thread::sleep(Duration::from_millis(5));
    }
    engine.shutdown();
}

#[test]
fn writes_wait_while_the_dataflow_lags_and_are_refused_untaken_past_the_timeout() {
    let dir = tempfile::tempdir().unwrap();
    let config = EngineConfig {
        workers: 2,
        max_apply_lag: Some(Duration::from_millis(200)),
        request_timeout: Duration::from_millis(800),
        ..EngineConfig::new(dir.path())
    };
    let engine = Engine::open(config).unwrap();
    engine.create_collection(small_schema("c")).unwrap();
    engine.insert_rows("c", &[small_row(1, [1.0, 0.0])]).unwrap();
    // Paused, the applied frontier stops while the clock goes on.
    engine.pause_ingest();
    engine.insert_rows("c", &[small_row(2, [2.0, 0.0])]).unwrap();
    std::thread::sleep(Duration::from_millis(400));
    let started = std::time::Instant::now();
    match engine.insert_rows("c", &[small_row(3, [3.0, 0.0])]) {
        Err(Error::ResourceExhausted { limit, problem }) => {
            assert_eq!(limit, "max_apply_lag_ms");
            assert!(problem.contains("not taken"), "{problem}");
        }
        other => panic!("expected the write to be refused, got {other:?}"),
    }
    assert!(started.elapsed() >= Duration::from_millis(700), "it waited for the dataflow first");
    assert!(matches!(engine.delete("c", &[Pk::Int(1)]), Err(Error::ResourceExhausted { .. })));
    // A write that starts waiting goes through once the dataflow catches up.
    let waiting = std::thread::scope(|scope| {
        let write = scope.spawn(|| engine.insert_rows("c", &[small_row(4, [4.0, 0.0])]));
        std::thread::sleep(Duration::from_millis(150));
        engine.resume_ingest();
        write.join().unwrap()
    });
    assert!(waiting.is_ok(), "{waiting:?}");
    let health = engine.health();
    assert!(health.writes_held >= 3 && health.writes_refused == 2, "{health:?}");
    // The refused writes were never taken; the others all were.
    let found = engine.get("c", &[1, 2, 3, 4].map(Pk::Int), &GetOptions::default()).unwrap();
    let mut found: Vec<i64> = found.iter().map(|r| int(&r["id"])).collect();
    found.sort();
    assert_eq!(found, vec![1, 2, 4]);
    engine.shutdown();
}

#[test]
fn with_vectors_on_disk_the_engine_answers_as_in_memory_across_a_restart_and_keeps_no_stale_file() {
    let dataset = Dataset::open(dataset_dir("pypi-20k")).expect("pypi-20k dataset");
    let vectors = dataset.base_vectors().unwrap();
    let queries = dataset.query_vectors().unwrap();
    let attributes = dataset.base_attributes().unwrap();
    let rows = 6000;
    let exact = vectorflow::SearchPlan { exact_below_rows: usize::MAX, ..vectorflow::SearchPlan::default() };
    let open = |dir: &std::path::Path, on_disk: bool| {
        let config = EngineConfig {
            workers: 2,
            seal_rows: 1000,
            search_plan: exact,
            vectors_on_disk: on_disk,
            ..EngineConfig::new(dir)
        };
        Engine::open(config).unwrap()
    };
    let files_in = |dir: &std::path::Path| match std::fs::read_dir(dir.join("vectors")) {
        Ok(entries) => entries.count(),
        Err(_) => 0,
    };
    let (memory_dir, disk_dir) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let (in_memory, on_disk) = (open(memory_dir.path(), false), open(disk_dir.path(), true));
    let schema = dataset.collection_schema("pypi", &attributes).unwrap();
    for engine in [&in_memory, &on_disk] {
        engine.create_collection(schema.clone()).unwrap();
        for start in (0..rows).step_by(1500) {
            let batch = dataset.base_batch(&schema, &vectors, &attributes, start..start + 1500).unwrap();
            engine.insert("pypi", &batch).unwrap();
        }
        engine.delete("pypi", &[Pk::Int(3), Pk::Int(1234), Pk::Int(4321)]).unwrap();
        engine.wait_for_indexes("pypi", Duration::from_secs(600)).unwrap();
    }
    assert_eq!(files_in(memory_dir.path()), 0);
    let sealed = on_disk.stats("pypi", Consistency::Strong).unwrap().sealed_segments;
    assert!(sealed >= 4 && files_in(disk_dir.path()) >= sealed, "a file per sealed segment");

    let query_list: Vec<Vec<f32>> = (0..20).map(|q| queries.row(q).to_vec()).collect();
    let options = SearchOptions { output_fields: vec!["month".into(), "embedding".into()], ..SearchOptions::new(10) };
    let keys: Vec<Pk> = [0, 1, 2, 999, 1000, 5999].into_iter().map(Pk::Int).collect();
    let get = GetOptions { output_fields: vec!["embedding".into()], ..Default::default() };
    let answers = |engine: &Engine| {
        let hits = engine.search("pypi", &query_list, &options).unwrap().hits;
        (hits, engine.get("pypi", &keys, &get).unwrap())
    };
    let expected = answers(&in_memory);
    assert_eq!(answers(&on_disk), expected, "searches and their vectors as in memory");

    // Stored and restarted: the segments load again and map new files.
    on_disk.flush("pypi").unwrap();
    on_disk.shutdown();
    drop(on_disk);
    let reopened = open(disk_dir.path(), true);
    reopened.wait_for_indexes("pypi", Duration::from_secs(600)).unwrap();
    assert_eq!(answers(&reopened), expected, "the same after a restart");
    assert!(files_in(disk_dir.path()) >= sealed);

    reopened.drop_collection("pypi").unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while files_in(disk_dir.path()) > 0 {
        assert!(std::time::Instant::now() < deadline, "the dropped collection's files stay");
        std::thread::sleep(Duration::from_millis(20));
    }
    reopened.shutdown();
    in_memory.shutdown();
}
