//! SQL over collections: ANN planning equals the Rust API search and shows in
//! EXPLAIN, orders the rule must not rewrite stay exact, time travel with
//! `FOR SYSTEM_TIME AS OF`, joins with a Parquet file, aggregates, errors,
//! and the `vectorflow sql` command.

mod common;

use std::path::Path;
use std::time::Duration;

use arrow::array::{Array, AsArray, RecordBatch};
use arrow::datatypes::{Float32Type, Int64Type};
use common::*;
use vectorflow::{
    Dataset, Engine, EngineConfig, Error, Metric, Pk, QueryOptions, SearchOptions, SqlSession, Value, row,
};

fn sample_dir() -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/data/pypi-2k")
}

/// The committed 2,000-row sample as collection `docs`, in sealed, indexed
/// segments and a growing one.
fn sample_engine(dir: &Path) -> (Engine, Dataset) {
    let dataset = Dataset::open(sample_dir()).expect("sample dataset");
    let vectors = dataset.base_vectors().unwrap();
    let attributes = dataset.base_attributes().unwrap();
    // Small segments searched through their HNSW graphs (no exact fallback), so
    // the SQL plan and the API must agree on approximate answers.
    let config = EngineConfig {
        workers: 2,
        seal_rows: 600,
        search_plan: vectorflow::SearchPlan { exact_below_rows: 20, exact_below_fraction: 0.0, graph_cost_per_ef: 0.0 },
        ..EngineConfig::new(dir)
    };
    let engine = Engine::open(config).unwrap();
    let schema = dataset.collection_schema("docs", &attributes).unwrap();
    engine.create_collection(schema.clone()).unwrap();
    for start in (0..vectors.rows).step_by(500) {
        let batch = dataset.base_batch(&schema, &vectors, &attributes, start..(start + 500).min(vectors.rows)).unwrap();
        engine.insert("docs", &batch).unwrap();
    }
    engine.wait_for_indexes("docs", Duration::from_secs(300)).unwrap();
    (engine, dataset)
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Runtime::new().unwrap()
}

fn vector_literal(v: &[f32]) -> String {
    format!("[{}]", v.iter().map(|x| format!("{x:?}")).collect::<Vec<_>>().join(", "))
}

fn column_i64(batches: &[RecordBatch], column: usize) -> Vec<i64> {
    batches
        .iter()
        .flat_map(|b| {
            let c = arrow::compute::cast(b.column(column), &arrow::datatypes::DataType::Int64).unwrap();
            c.as_primitive::<Int64Type>().values().to_vec()
        })
        .collect()
}

fn column_f32(batches: &[RecordBatch], column: usize) -> Vec<f32> {
    batches.iter().flat_map(|b| b.column(column).as_primitive::<Float32Type>().values().to_vec()).collect()
}

fn explain(rt: &tokio::runtime::Runtime, session: &SqlSession, query: &str) -> String {
    let batches = rt.block_on(session.collect(&format!("EXPLAIN {query}"))).unwrap();
    arrow::util::pretty::pretty_format_batches(&batches).unwrap().to_string()
}

#[test]
fn ann_sql_equals_the_api_search_and_explain_shows_the_ann_scan() {
    let dir = tempfile::tempdir().unwrap();
    let (engine, dataset) = sample_engine(dir.path());
    let queries = dataset.query_vectors().unwrap();
    let session = SqlSession::new(engine.clone()).unwrap();
    let rt = runtime();
    let filter = "month >= 202001 AND rank > 0";
    for q in 0..8 {
        let query = queries.row(q);
        let literal = vector_literal(query);
        let sql = format!(
            "SELECT id, name, cosine_distance(embedding, {literal}) AS d FROM docs WHERE {filter} ORDER BY d LIMIT 10"
        );
        let batches = rt.block_on(session.collect(&sql)).unwrap();
        let options = SearchOptions { filter: Some(filter.into()), ..SearchOptions::new(10) };
        let api = engine.search("docs", &[query.to_vec()], &options).unwrap();
        let api_ids: Vec<i64> = api.hits[0].iter().map(|h| pk_int(&h.pk)).collect();
        assert_eq!(column_i64(&batches, 0), api_ids, "query {q}");
        for (d, hit) in column_f32(&batches, 2).iter().zip(&api.hits[0]) {
            assert!((d - (1.0 - hit.score)).abs() < 1e-4, "distance {d} vs score {}", hit.score);
        }
        // The same through inner_product, ranked descending (unit vectors), unfiltered.
        let sql = format!("SELECT id FROM docs ORDER BY inner_product(embedding, {literal}) DESC LIMIT 5");
        let batches = rt.block_on(session.collect(&sql)).unwrap();
        let api = engine.search("docs", &[query.to_vec()], &SearchOptions::new(5)).unwrap();
        assert_eq!(column_i64(&batches, 0), api.hits[0].iter().map(|h| pk_int(&h.pk)).collect::<Vec<_>>());
    }
    let literal = vector_literal(queries.row(0));
    let plan = explain(
        &rt,
        &session,
        &format!("SELECT id, cosine_distance(embedding, {literal}) AS d FROM docs WHERE {filter} ORDER BY d LIMIT 10"),
    );
    assert!(plan.contains("AnnSearchExec: collection=docs, field=embedding, metric=COSINE, k=10"), "{plan}");
    assert!(plan.contains("filter=") && plan.contains("month >= 202001") && plan.contains("rank > 0"), "{plan}");
    assert!(!plan.contains("FilterExec"), "the search applies the WHERE clause: {plan}");
    // make_array works as the query side too, with an alias on the table.
    let make_array =
        format!("make_array({})", queries.row(0).iter().map(|x| format!("{x:?}")).collect::<Vec<_>>().join(", "));
    let plan = explain(
        &rt,
        &session,
        &format!("SELECT t.id FROM docs t ORDER BY cosine_distance(t.embedding, {make_array}) LIMIT 3"),
    );
    assert!(plan.contains("AnnSearchExec"), "{plan}");
    engine.shutdown();
}

#[test]
fn orders_the_rule_must_not_rewrite_give_the_exact_answer() {
    let dir = tempfile::tempdir().unwrap();
    let engine = exact_engine(dir.path(), 2, 50);
    engine.create_collection(small_schema("pts")).unwrap();
    let points: Vec<(i64, [f32; 2])> = (0..200).map(|i| (i, [(i % 20) as f32, (i / 20) as f32 * 1.5])).collect();
    let rows: Vec<_> = points
        .iter()
        .map(|(id, v)| {
            let mut r = small_row(*id, *v);
            r.insert("tag".into(), if id % 3 == 0 { "a".into() } else { "b".into() });
            r
        })
        .collect();
    engine.insert_rows("pts", &rows).unwrap();
    let session = SqlSession::new(engine.clone()).unwrap();
    let rt = runtime();
    let l2 = |v: &[f32; 2], q: [f32; 2]| (v[0] - q[0]).powi(2) + (v[1] - q[1]).powi(2);
    let brute = |q: [f32; 2], keep: &dyn Fn(i64) -> bool, farthest: bool, k: usize| -> Vec<i64> {
        let mut scored: Vec<(f32, i64)> =
            points.iter().filter(|(id, _)| keep(*id)).map(|(id, v)| (l2(v, q), *id)).collect();
        scored.sort_by(|a, b| if farthest { b.0.total_cmp(&a.0) } else { a.0.total_cmp(&b.0) }.then(a.1.cmp(&b.1)));
        scored.into_iter().take(k).map(|(_, id)| id).collect()
    };

    // Descending under L2 ranks farthest first: no ANN search can answer it.
    let sql = "SELECT id, l2_distance(v, [3.0, 4.0]) AS d FROM pts ORDER BY d DESC, id LIMIT 4";
    assert!(!explain(&rt, &session, sql).contains("AnnSearchExec"));
    let batches = rt.block_on(session.collect(sql)).unwrap();
    assert_eq!(column_i64(&batches, 0), brute([3.0, 4.0], &|_| true, true, 4));

    let sql = "SELECT id FROM pts ORDER BY l2_distance(v, [3.0, 4.0]) DESC LIMIT 4";
    assert!(!explain(&rt, &session, sql).contains("AnnSearchExec"));

    // A predicate the filter compiler cannot take (CASE) keeps the exact plan.
    let sql = "SELECT id FROM pts WHERE CASE WHEN id % 3 = 0 THEN tag ELSE 'z' END = 'a' \
               ORDER BY l2_distance(v, [3.0, 4.0]) LIMIT 5";
    let plan = explain(&rt, &session, sql);
    assert!(!plan.contains("AnnSearchExec"), "{plan}");
    let got = column_i64(&rt.block_on(session.collect(sql)).unwrap(), 0);
    let mut want = brute([3.0, 4.0], &|id| id % 3 == 0, false, 5);
    let mut got_sorted = got.clone();
    got_sorted.sort();
    want.sort();
    assert_eq!(got_sorted, want);

    // The matching order is planned as ANN, and on exact segments equals brute force.
    let sql = "SELECT id FROM pts WHERE tag = 'a' ORDER BY l2_distance(v, [3.0, 4.0]) LIMIT 5";
    assert!(explain(&rt, &session, sql).contains("AnnSearchExec"));
    let got = column_i64(&rt.block_on(session.collect(sql)).unwrap(), 0);
    assert_eq!(got, brute([3.0, 4.0], &|id| id % 3 == 0, false, 5));

    // Bounds on the ordered distance become the engine's range search, and
    // the answer is brute force's within them (ends exact: the grid's
    // distances are exact in f32, and rows lie at 5 and at 16.25).
    let within = |lo: f32, hi: f32, hi_inclusive: bool| {
        let v: Vec<i64> = brute([3.0, 4.0], &|_| true, false, 200)
            .into_iter()
            .filter(|id| {
                let d = l2(&points[*id as usize].1, [3.0, 4.0]);
                d >= lo && if hi_inclusive { d <= hi } else { d < hi }
            })
            .collect();
        v
    };
    let sql = "SELECT id FROM pts WHERE l2_distance(v, [3.0, 4.0]) < 16.25 AND l2_distance(v, [3.0, 4.0]) >= 5 \
               ORDER BY l2_distance(v, [3.0, 4.0]) LIMIT 100";
    let plan = explain(&rt, &session, sql);
    assert!(
        plan.contains("AnnSearchExec") && plan.contains("radius=16.25") && plan.contains("range_filter=5"),
        "{plan}"
    );
    // Equal distances come in any order (the one sort key is the distance).
    let by_distance = |mut ids: Vec<i64>| {
        ids.sort_by(|a, b| {
            let (da, db) = (l2(&points[*a as usize].1, [3.0, 4.0]), l2(&points[*b as usize].1, [3.0, 4.0]));
            da.total_cmp(&db).then(a.cmp(b))
        });
        ids
    };
    let got = column_i64(&rt.block_on(session.collect(sql)).unwrap(), 0);
    assert_eq!(by_distance(got.clone()), within(5.0, 16.25, false));
    assert_eq!(
        by_distance(got.clone()).iter().map(|id| l2(&points[*id as usize].1, [3.0, 4.0])).collect::<Vec<_>>(),
        got.iter().map(|id| l2(&points[*id as usize].1, [3.0, 4.0])).collect::<Vec<_>>(),
        "nearest first"
    );
    assert!(!got.is_empty());
    for end in [5.0, 16.25] {
        assert!(points.iter().any(|(_, v)| l2(v, [3.0, 4.0]) == end), "a row lies at {end}");
    }
    let sql = "SELECT id FROM pts WHERE 5 >= l2_distance(v, [3.0, 4.0]) AND tag = 'a' \
               ORDER BY l2_distance(v, [3.0, 4.0]) LIMIT 100";
    assert!(explain(&rt, &session, sql).contains("radius="));
    let got = column_i64(&rt.block_on(session.collect(sql)).unwrap(), 0);
    let expect: Vec<i64> = within(f32::NEG_INFINITY, 5.0, true).into_iter().filter(|id| id % 3 == 0).collect();
    assert_eq!(by_distance(got), expect, "an inclusive far end keeps the rows on it");
    // An empty range (near end past the far end) stays exact: no rows.
    let sql = "SELECT id FROM pts WHERE l2_distance(v, [3.0, 4.0]) < 2 AND l2_distance(v, [3.0, 4.0]) > 5 \
               ORDER BY l2_distance(v, [3.0, 4.0]) LIMIT 10";
    assert!(column_i64(&rt.block_on(session.collect(sql)).unwrap(), 0).is_empty());

    // A metric mismatch (cosine ordering over an L2 field) stays exact and correct.
    let sql = "SELECT id FROM pts ORDER BY cosine_distance(v, [1.0, 0.0]), id LIMIT 3";
    assert!(!explain(&rt, &session, sql).contains("AnnSearchExec"));
    let got = column_i64(&rt.block_on(session.collect(sql)).unwrap(), 0);
    assert_eq!(got, vec![1, 2, 3], "points on the x axis have cosine distance 0");
    engine.shutdown();
}

#[test]
fn system_time_as_of_before_a_delete_still_returns_the_row() {
    let dir = tempfile::tempdir().unwrap();
    let engine = exact_engine(dir.path(), 2, 1000);
    engine.create_collection(small_schema("pts")).unwrap();
    let inserted = engine.insert_rows("pts", &[small_row(1, [0.0, 0.0]), small_row(2, [5.0, 5.0])]).unwrap();
    std::thread::sleep(Duration::from_millis(20));
    let between_ms = vectorflow::crates::core::time::wall_clock_ms();
    std::thread::sleep(Duration::from_millis(20));
    let deleted = engine.delete("pts", &[Pk::Int(1)]).unwrap();
    assert!(inserted.ts < deleted.ts);
    let session = SqlSession::new(engine.clone()).unwrap();
    let rt = runtime();
    let ids = |sql: &str| column_i64(&rt.block_on(session.collect(sql)).unwrap(), 0);

    assert_eq!(ids("SELECT id FROM pts ORDER BY id"), vec![2]);
    assert_eq!(ids(&format!("SELECT id FROM pts FOR SYSTEM_TIME AS OF {} ORDER BY id", deleted.ts - 1)), vec![1, 2]);
    assert_eq!(ids(&format!("SELECT id FROM pts FOR SYSTEM_TIME AS OF {} ORDER BY id", deleted.ts)), vec![2]);
    assert_eq!(
        ids(&format!("SELECT id FROM pts FOR SYSTEM_TIME AS OF {} ORDER BY id", inserted.ts - 1)),
        Vec::<i64>::new()
    );
    // A datetime string (UTC) and a TIMESTAMP between the writes.
    let datetime = arrow::compute::cast(
        &arrow::array::TimestampMillisecondArray::from(vec![between_ms as i64]),
        &arrow::datatypes::DataType::Utf8,
    )
    .unwrap();
    let datetime = datetime.as_string::<i32>().value(0).to_string();
    assert_eq!(ids(&format!("SELECT id FROM pts FOR SYSTEM_TIME AS OF '{datetime}' ORDER BY id")), vec![1, 2]);
    assert_eq!(
        ids(&format!(
            "SELECT p.id FROM pts FOR SYSTEM_TIME AS OF to_timestamp_millis({between_ms}) AS p ORDER BY p.id"
        )),
        vec![1, 2]
    );
    // ANN planning works on the past too: the deleted row is still the nearest.
    let sql = format!(
        "SELECT id FROM pts FOR SYSTEM_TIME AS OF {} ORDER BY l2_distance(v, [0.0, 0.0]) LIMIT 1",
        deleted.ts - 1
    );
    assert!(explain(&rt, &session, &sql).contains("AnnSearchExec"));
    assert_eq!(ids(&sql), vec![1]);
    // Past and present in one statement.
    let sql = format!(
        "SELECT then.id FROM pts FOR SYSTEM_TIME AS OF {} AS then LEFT JOIN pts now ON then.id = now.id WHERE now.id IS NULL",
        deleted.ts - 1
    );
    assert_eq!(ids(&sql), vec![1]);

    // Outside the window: clear errors.
    match rt.block_on(session.collect("SELECT id FROM pts FOR SYSTEM_TIME AS OF '2001-01-01 00:00:00'")) {
        Err(Error::OutsideRetention { .. }) => {}
        other => panic!("expected OutsideRetention, got {other:?}"),
    }
    match rt.block_on(session.collect("SELECT id FROM pts FOR SYSTEM_TIME AS OF '2200-01-01 00:00:00'")) {
        Err(Error::FutureTimestamp { .. }) => {}
        other => panic!("expected FutureTimestamp, got {other:?}"),
    }
    match rt.block_on(session.collect("SELECT id FROM pts FOR SYSTEM_TIME AS OF 'yesterday-ish'")) {
        Err(Error::Sql(message)) => assert!(message.contains("not a datetime"), "{message}"),
        other => panic!("expected a SQL error, got {other:?}"),
    }
    engine.shutdown();
}

#[test]
fn joins_with_parquet_and_aggregates_work_as_in_datafusion() {
    let dir = tempfile::tempdir().unwrap();
    let (engine, _dataset) = sample_engine(dir.path());
    let session = SqlSession::new(engine.clone()).unwrap();
    let rt = runtime();
    let attrs = sample_dir().join("base_attrs.parquet");
    rt.block_on(session.context().register_parquet("attrs", attrs.to_str().unwrap(), Default::default())).unwrap();

    let count = |sql: &str| column_i64(&rt.block_on(session.collect(sql)).unwrap(), 0)[0];
    assert_eq!(count("SELECT count(*) FROM docs"), 2000);
    let api =
        engine.count("docs", &QueryOptions { filter: Some("month >= 202001".into()), ..Default::default() }).unwrap();
    assert_eq!(count("SELECT count(*) FROM docs WHERE month >= 202001") as usize, api);
    assert_eq!(
        count("SELECT count(*) FROM docs d JOIN attrs a ON d.id = a.id WHERE d.name = a.name AND a.month >= 202001")
            as usize,
        api
    );
    // Aggregates by group equal per-group counts through the API.
    let batches = rt
        .block_on(session.collect(
            "SELECT month / 100 AS year, count(*) AS n, avg(summary_len) AS l FROM docs WHERE month > 0 GROUP BY 1 ORDER BY 1",
        ))
        .unwrap();
    let years = column_i64(&batches, 0);
    let counts = column_i64(&batches, 1);
    assert!(years.len() > 3);
    for (year, n) in years.iter().zip(&counts).take(4) {
        let filter = format!("month >= {} and month < {}", year * 100, (year + 1) * 100);
        let api = engine.count("docs", &QueryOptions { filter: Some(filter), ..Default::default() }).unwrap();
        assert_eq!(*n as usize, api, "year {year}");
    }
    // A rewritten ANN search joined with the Parquet table.
    let options = vectorflow::GetOptions { output_fields: vec!["embedding".into()], ..Default::default() };
    let q = engine.get("docs", &[Pk::Int(7)], &options).unwrap();
    let Some(Value::Vector(v)) = q[0].get("embedding") else { panic!("row 7 has a vector") };
    let sql = format!(
        "SELECT a.id, a.name FROM (SELECT id FROM docs ORDER BY cosine_distance(embedding, {}) LIMIT 3) n JOIN attrs a ON a.id = n.id",
        vector_literal(v)
    );
    assert!(explain(&rt, &session, &sql).contains("AnnSearchExec"));
    assert!(column_i64(&rt.block_on(session.collect(&sql)).unwrap(), 0).contains(&7));
    engine.shutdown();
}

#[test]
fn sql_errors_name_the_problem() {
    let dir = tempfile::tempdir().unwrap();
    let engine = exact_engine(dir.path(), 1, 1000);
    engine.create_collection(small_schema("pts")).unwrap();
    engine.insert_rows("pts", &[small_row(1, [0.0, 0.0])]).unwrap();
    let session = SqlSession::new(engine.clone()).unwrap();
    let rt = runtime();
    let error = |sql: &str| match rt.block_on(session.collect(sql)) {
        Err(Error::Sql(message)) => message,
        other => panic!("{sql}: expected a SQL error, got {other:?}"),
    };
    assert!(error("SELECT id FROM nope").contains("nope"));
    assert!(error("SELECT colour FROM pts").contains("colour"));
    assert!(error("SELEC id FROM pts").to_lowercase().contains("selec"));
    assert!(error("SELECT l2_distance(v, [1.0, 2.0, 3.0]) FROM pts").contains("dimension"));
    assert!(error("SELECT l2_distance(v, 'x') FROM pts").contains("not a vector"));
    assert!(error("SELECT 1; SELECT 2").contains("one statement"));
    assert!(error("SELECT id FROM pts FOR SYSTEM_TIME AS OF true").contains("FOR SYSTEM_TIME AS OF"));
    session.context().register_batch("plain", RecordBatch::new_empty(small_schema("x").arrow_schema())).unwrap();
    assert!(error("SELECT * FROM plain FOR SYSTEM_TIME AS OF 1").contains("not one"));
    engine.shutdown();
}

#[test]
fn the_sql_command_prints_a_table() {
    let dir = tempfile::tempdir().unwrap();
    {
        let engine = exact_engine(dir.path(), 1, 1000);
        engine.create_collection(small_schema("pts")).unwrap();
        let mut tagged = small_row(1, [0.0, 0.0]);
        tagged.insert("tag".into(), "hello".into());
        engine.insert_rows("pts", &[tagged, small_row(2, [1.0, 1.0])]).unwrap();
        engine.shutdown();
    }
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_vectorflow"))
        .args(["sql", "--data-dir", dir.path().to_str().unwrap(), "SELECT id, tag FROM pts ORDER BY id"])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "{stdout} {}", String::from_utf8_lossy(&output.stderr));
    assert!(stdout.contains("| id | tag   |"), "{stdout}");
    assert!(stdout.contains("| 1  | hello |"), "{stdout}");
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_vectorflow"))
        .args(["sql", "--data-dir", dir.path().to_str().unwrap(), "SELECT nope FROM pts"])
        .output()
        .unwrap();
    assert!(!output.status.success());
    assert!(String::from_utf8_lossy(&output.stderr).contains("nope"));
}

#[test]
fn distance_functions_match_the_engine_metrics() {
    let dir = tempfile::tempdir().unwrap();
    let engine = exact_engine(dir.path(), 1, 1000);
    engine
        .create_collection(vectorflow::CollectionSchema::new(
            "m",
            vec![
                vectorflow::FieldSchema::int64_primary("id", false),
                vectorflow::FieldSchema::vector("v", 3, Metric::IP),
            ],
        ))
        .unwrap();
    engine.insert_rows("m", &[row([("id", 1i64.into()), ("v", vec![1.0, 2.0, 2.0].into())])]).unwrap();
    let session = SqlSession::new(engine.clone()).unwrap();
    let rt = runtime();
    let batches = rt
        .block_on(session.collect(
            "SELECT l2_distance(v, [1.0, 0.0, 0.0]), cosine_distance(v, [2.0, 0.0, 0.0]), inner_product(v, [1.0, 1.0, 1.0]), \
             l2_distance([1.0, 1.0], [0.0, 0.0]) FROM m",
        ))
        .unwrap();
    let b = &batches[0];
    let value = |c: usize| b.column(c).as_primitive::<Float32Type>().value(0);
    assert_eq!(value(0), 8.0);
    assert!((value(1) - (1.0 - 1.0 / 3.0)).abs() < 1e-6);
    assert_eq!(value(2), 5.0);
    assert_eq!(value(3), 2.0);
    assert!(!b.column(0).is_null(0));
    engine.shutdown();
}
