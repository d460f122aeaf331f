//! Filter expressions through the engine: filtered exact search equals brute
//! force over the rows a reference model says pass (property test), query and
//! count by expression, delete by expression with time travel, and errors
//! with positions.

mod common;

use common::*;
use proptest::prelude::*;
use vectorflow::{CollectionSchema, DataType, Error, FieldSchema, Metric, QueryOptions, SearchOptions, Value, row};

fn schema() -> CollectionSchema {
    CollectionSchema::new(
        "f",
        vec![
            FieldSchema::int64_primary("id", false),
            FieldSchema::vector("v", 2, Metric::L2),
            FieldSchema::new("a", DataType::Int32),
            FieldSchema::new("b", DataType::Int64),
            FieldSchema::new("tag", DataType::VarChar { max_length: 4 }).nullable(),
        ],
    )
}

#[derive(Debug, Clone)]
struct Item {
    id: i64,
    v: [f32; 2],
    a: i64,
    b: i64,
    tag: Option<&'static str>,
}

const TAGS: [&str; 3] = ["x", "y", "zz"];

/// A filter as a tree, rendered as Milvus text and evaluated by the model.
#[derive(Debug, Clone)]
enum Cond {
    Cmp(&'static str, &'static str, i64),
    TagIn(Vec<&'static str>),
    TagLike(&'static str),
    TagIsNull,
    Not(Box<Cond>),
    And(Box<Cond>, Box<Cond>),
    Or(Box<Cond>, Box<Cond>),
}

impl Cond {
    fn text(&self) -> String {
        match self {
            Cond::Cmp(field, op, value) => format!("{field} {op} {value}"),
            Cond::TagIn(tags) => {
                format!("tag in [{}]", tags.iter().map(|t| format!("\"{t}\"")).collect::<Vec<_>>().join(", "))
            }
            Cond::TagLike(prefix) => format!("tag like \"{prefix}%\""),
            Cond::TagIsNull => "tag is null".into(),
            Cond::Not(c) => format!("not ({})", c.text()),
            Cond::And(l, r) => format!("({}) and ({})", l.text(), r.text()),
            Cond::Or(l, r) => format!("({}) || ({})", l.text(), r.text()),
        }
    }

    /// SQL three-valued logic: `None` is unknown (a null tag).
    fn eval(&self, item: &Item) -> Option<bool> {
        match self {
            Cond::Cmp(field, op, value) => {
                let x = if *field == "a" { item.a } else { item.b };
                Some(match *op {
                    "==" => x == *value,
                    "!=" => x != *value,
                    "<" => x < *value,
                    "<=" => x <= *value,
                    ">" => x > *value,
                    _ => x >= *value,
                })
            }
            Cond::TagIn(tags) => item.tag.map(|t| tags.contains(&t)),
            Cond::TagLike(prefix) => item.tag.map(|t| t.starts_with(prefix)),
            Cond::TagIsNull => Some(item.tag.is_none()),
            Cond::Not(c) => c.eval(item).map(|b| !b),
            Cond::And(l, r) => match (l.eval(item), r.eval(item)) {
                (Some(false), _) | (_, Some(false)) => Some(false),
                (Some(true), Some(true)) => Some(true),
                _ => None,
            },
            Cond::Or(l, r) => match (l.eval(item), r.eval(item)) {
                (Some(true), _) | (_, Some(true)) => Some(true),
                (Some(false), Some(false)) => Some(false),
                _ => None,
            },
        }
    }
}

fn cond() -> impl Strategy<Value = Cond> {
    let leaf = prop_oneof![
        (
            prop_oneof![Just("a"), Just("b")],
            prop_oneof![Just("=="), Just("!="), Just("<"), Just("<="), Just(">"), Just(">=")],
            0..10i64
        )
            .prop_map(|(f, op, v)| Cond::Cmp(f, op, v)),
        prop::sample::subsequence(TAGS.to_vec(), 1..3).prop_map(Cond::TagIn),
        prop_oneof![Just("x"), Just("z")].prop_map(Cond::TagLike),
        Just(Cond::TagIsNull),
    ];
    leaf.prop_recursive(3, 12, 2, |inner| {
        prop_oneof![
            inner.clone().prop_map(|c| Cond::Not(Box::new(c))),
            (inner.clone(), inner.clone()).prop_map(|(l, r)| Cond::And(Box::new(l), Box::new(r))),
            (inner.clone(), inner).prop_map(|(l, r)| Cond::Or(Box::new(l), Box::new(r))),
        ]
    })
}

fn items() -> impl Strategy<Value = Vec<Item>> {
    prop::collection::vec((0..20i32, 0..20i32, 0..10i64, 0..10i64, prop::option::of(0..3usize)), 1..60).prop_map(
        |rows| {
            rows.into_iter()
                .enumerate()
                .map(|(i, (x, y, a, b, tag))| Item {
                    id: i as i64,
                    v: [x as f32, y as f32],
                    a,
                    b,
                    tag: tag.map(|t| TAGS[t]),
                })
                .collect()
        },
    )
}

fn insert(engine: &vectorflow::Engine, items: &[Item]) {
    let rows: Vec<_> = items
        .iter()
        .map(|it| {
            let mut r =
                row([("id", it.id.into()), ("v", it.v.to_vec().into()), ("a", it.a.into()), ("b", it.b.into())]);
            r.insert("tag".into(), it.tag.map_or(Value::Null, Value::from));
            r
        })
        .collect();
    engine.insert_rows("f", &rows).unwrap();
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, ..ProptestConfig::default() })]

    #[test]
    fn filtered_exact_search_equals_brute_force_over_passing_rows(items in items(), cond in cond(), qx in 0..20i32, qy in 0..20i32) {
        let dir = tempfile::tempdir().unwrap();
        let engine = exact_engine(dir.path(), 2, 16);
        engine.create_collection(schema()).unwrap();
        insert(&engine, &items);
        let text = cond.text();
        let query = [qx as f32, qy as f32];
        let options = SearchOptions { filter: Some(text.clone()), ..SearchOptions::new(100) };
        let hits = engine.search("f", &[query.to_vec()], &options).unwrap().hits.remove(0);
        let mut found: Vec<(i64, f32)> = hits.iter().map(|h| (int(&h.pk.clone().into()), h.score)).collect();
        found.sort_by_key(|(id, _)| *id);
        let expected: Vec<(i64, f32)> = items
            .iter()
            .filter(|it| cond.eval(it) == Some(true))
            .map(|it| (it.id, (it.v[0] - query[0]).powi(2) + (it.v[1] - query[1]).powi(2)))
            .collect();
        prop_assert_eq!(&found, &expected, "filter `{}`", text);
        let count = engine.count("f", &QueryOptions { filter: Some(text.clone()), ..Default::default() }).unwrap();
        prop_assert_eq!(count, expected.len(), "count(*) where `{}`", text);
        engine.shutdown();
    }
}

#[test]
fn query_count_and_delete_by_expression_with_time_travel() {
    let dir = tempfile::tempdir().unwrap();
    let engine = exact_engine(dir.path(), 3, 8);
    engine.create_collection(schema()).unwrap();
    let items: Vec<Item> = (0..40)
        .map(|i| Item { id: i, v: [i as f32, 0.0], a: i % 10, b: i / 10, tag: Some(TAGS[(i % 3) as usize]) })
        .collect();
    insert(&engine, &items);
    let options = |filter: &str| QueryOptions {
        filter: Some(filter.into()),
        output_fields: vec!["a".into(), "tag".into()],
        ..Default::default()
    };
    let rows = engine.query("f", &options("a < 3 and tag != \"y\"")).unwrap();
    let ids: Vec<i64> = rows.iter().map(|r| int(&r["id"])).collect();
    let expected: Vec<i64> = items.iter().filter(|it| it.a < 3 && it.tag != Some("y")).map(|it| it.id).collect();
    assert_eq!(ids, expected, "rows in key order");
    assert!(rows.iter().all(|r| r.contains_key("a") && r.contains_key("tag")));
    let page = engine.query("f", &QueryOptions { limit: Some(3), offset: 2, ..options("b >= 2") }).unwrap();
    assert_eq!(page.iter().map(|r| int(&r["id"])).collect::<Vec<_>>(), vec![22, 23, 24]);
    assert_eq!(engine.count("f", &QueryOptions::default()).unwrap(), 40);

    let before = engine.now();
    let deleted = engine.delete_by_filter("f", "b == 1 or id in [0, 39]").unwrap();
    assert_eq!(deleted.pks.len(), 12);
    assert_eq!(engine.count("f", &QueryOptions::default()).unwrap(), 28);
    assert_eq!(engine.count("f", &QueryOptions { filter: Some("b == 1".into()), ..Default::default() }).unwrap(), 0);
    let then = QueryOptions { filter: Some("b == 1".into()), as_of: Some(before), ..Default::default() };
    assert_eq!(engine.count("f", &then).unwrap(), 10, "time travel sees the rows before the delete");
    assert_eq!(engine.query("f", &then).unwrap().len(), 10);
    let hits = engine
        .search("f", &[vec![10.0, 0.0]], &SearchOptions { filter: Some("b == 1".into()), ..SearchOptions::new(3) })
        .unwrap();
    assert!(hits.hits[0].is_empty());
    engine.shutdown();
}

#[test]
fn bad_expressions_get_errors_with_positions() {
    let dir = tempfile::tempdir().unwrap();
    let engine = exact_engine(dir.path(), 2, 8);
    engine.create_collection(schema()).unwrap();
    let error = |filter: &str| match engine.search(
        "f",
        &[vec![0.0, 0.0]],
        &SearchOptions { filter: Some(filter.into()), ..SearchOptions::new(1) },
    ) {
        Err(Error::Expression { position, problem }) => (position, problem),
        other => panic!("`{filter}`: expected an expression error, got {other:?}"),
    };
    let (position, problem) = error("a > 1 and nope == 2");
    assert_eq!(position, 10);
    assert!(problem.contains("unknown field `nope`"), "{problem}");
    let (position, _) = error("a > 1 and tag == \"x");
    assert_eq!(position, 17);
    assert!(error("a >").1.to_lowercase().contains("expected"));
    assert!(error("a + 1").1.contains("not a boolean"));
    assert!(error("tag in [1, \"x\"").1.contains("unclosed"));
    let bad_query = QueryOptions { filter: Some("b === 3".into()), ..Default::default() };
    assert!(matches!(engine.query("f", &bad_query), Err(Error::Expression { .. })));
    assert!(matches!(engine.delete_by_filter("f", "colour == 1"), Err(Error::Expression { position: 0, .. })));
    engine.shutdown();
}

#[test]
fn json_paths_and_array_contains_filter_through_the_engine_and_sql() {
    let dir = tempfile::tempdir().unwrap();
    let engine = exact_engine(dir.path(), 2, 4);
    let schema = CollectionSchema::new(
        "j",
        vec![
            FieldSchema::int64_primary("id", false),
            FieldSchema::vector("v", 2, Metric::L2),
            FieldSchema::new("meta", DataType::Json).nullable(),
        ],
    );
    engine.create_collection(schema).unwrap();
    let metas = [
        Some(r#"{"a": 1, "tags": ["x", "y"], "n": {"b": 2.5}, "s": "hi"}"#),
        Some(r#"{"a": 3, "tags": ["y"], "n": {"b": 0.5}, "s": "ho"}"#),
        None,
        Some(r#"{"a": "3", "tags": "x", "s": 7}"#),
        Some(r#"{"a": 5, "tags": ["x", 1]}"#),
    ];
    let rows: Vec<_> = metas
        .iter()
        .enumerate()
        .map(|(i, meta)| {
            row([
                ("id", (i as i64).into()),
                ("v", vec![i as f32, 0.0].into()),
                ("meta", meta.map_or(Value::Null, Value::from)),
            ])
        })
        .collect();
    engine.insert_rows("j", &rows).unwrap();
    let ids = |filter: &str| -> Vec<i64> {
        let options = QueryOptions { filter: Some(filter.into()), ..Default::default() };
        let mut ids: Vec<i64> = engine.query("j", &options).unwrap().iter().map(|r| int(&r["id"])).collect();
        ids.sort();
        ids
    };
    assert_eq!(ids(r#"meta["a"] >= 3"#), vec![1, 4], "the string \"3\" is not a number");
    assert_eq!(ids(r#"meta["n"]["b"] > 1.0"#), vec![0]);
    assert_eq!(ids(r#"meta["s"] == "hi" or meta["s"] like "h%""#), vec![0, 1]);
    assert_eq!(ids(r#"meta["tags"][0] == "y""#), vec![1]);
    assert_eq!(ids(r#"array_contains(meta["tags"], "x")"#), vec![0, 4]);
    assert_eq!(ids(r#"json_contains(meta["tags"], 1)"#), vec![4]);
    assert_eq!(ids(r#"meta["n"] is null"#), vec![2, 3, 4]);
    let hits = engine
        .search(
            "j",
            &[vec![4.0, 0.0]],
            &SearchOptions { filter: Some(r#"array_contains(meta["tags"], "y")"#.into()), ..SearchOptions::new(1) },
        )
        .unwrap();
    assert_eq!(pks(&hits.hits[0]), vec![vectorflow::Pk::Int(1)]);
    match engine.count("j", &QueryOptions { filter: Some(r#"id["a"] == 1"#.into()), ..Default::default() }) {
        Err(Error::Expression { position, problem }) => {
            assert_eq!(position, 2);
            assert!(problem.contains("not json"), "{problem}");
        }
        other => panic!("expected an expression error, got {other:?}"),
    }
    // The same functions in SQL.
    let session = vectorflow::SqlSession::new(engine.clone()).unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let batches = rt
        .block_on(session.collect(
            "SELECT id FROM j WHERE json_get_float(meta, 'a') >= 3 AND json_contains(meta, 'zz') IS NOT TRUE ORDER BY id",
        ))
        .unwrap();
    let got: Vec<i64> = batches
        .iter()
        .flat_map(|b| b.column(0).as_any().downcast_ref::<arrow::array::Int64Array>().unwrap().values().to_vec())
        .collect();
    assert_eq!(got, vec![1, 4]);
    engine.shutdown();
}
