//! Range search, grouping search and hybrid search: exact answers equal a
//! reference on random data (property tests, 1 and 3 workers, sealed and
//! growing segments) and on real data (hybrid fusion over two vector
//! fields), and the graph keeps recall ≥ 0.95 on pypi-20k.

mod common;

use std::time::Duration;

use common::*;
use proptest::prelude::*;
use vectorflow::crates::operators::distance::{distance, normalize};
use vectorflow::{
    CollectionSchema, Consistency, DataType, Dataset, Engine, EngineConfig, FieldSchema, GroupBy, HybridOptions,
    Metric, Pk, Ranker, SearchHit, SearchOptions, SubSearch, Value, row,
};

const DIM: usize = 4;

/// A random row: a vector of small integers (so distances are exact in
/// `f32` whatever the kernel's summation order) and its group.
#[derive(Debug, Clone)]
struct Point {
    vector: [f32; DIM],
    group: i64,
}

fn point(groups: i64) -> impl Strategy<Value = Point> {
    (prop::array::uniform4(-6i32..7), 0..groups).prop_map(|(v, group)| Point { vector: v.map(|x| x as f32), group })
}

#[derive(Debug, Clone)]
struct Case {
    metric: Metric,
    points: Vec<Point>,
    /// Keys deleted after the inserts.
    deleted: Vec<usize>,
    query: [f32; DIM],
    k: usize,
    /// Range ends in the metric's scores (see `range_of`).
    radius: Option<f32>,
    range_filter: Option<f32>,
    group_size: usize,
    strict: bool,
}

fn case() -> impl Strategy<Value = Case> {
    let metric = prop_oneof![Just(Metric::L2), Just(Metric::IP)];
    (
        metric,
        prop::collection::vec(point(9), 1..90),
        prop::collection::vec(0usize..90, 0..10),
        prop::array::uniform4(-6i32..7),
        1usize..8,
        (prop::option::of(0i32..120), prop::option::of(0i32..60)),
        1usize..4,
        any::<bool>(),
    )
        .prop_map(|(metric, points, deleted, query, k, (far, near), group_size, strict)| {
            // Scores: L2 distances lie in 0..~700, IP similarities in about
            // -150..150. The ends are integers, as the scores are, so rows
            // fall exactly on them and the ends' inclusion is tested.
            let (radius, range_filter) = match (metric, far, near) {
                (_, None, _) => (None, None),
                (Metric::L2, Some(far), near) => (Some(far * 2 + 1), near.map(|n| (n * 2).min(far * 2))),
                (_, Some(far), near) => (Some(far - 60), near.map(|n| far - 60 + 1 + n)),
            };
            let (radius, range_filter) = (radius.map(|r| r as f32), range_filter.map(|r| r as f32));
            Case {
                metric,
                points,
                deleted,
                query: query.map(|x| x as f32),
                k,
                radius,
                range_filter,
                group_size,
                strict,
            }
        })
}

fn schema(metric: Metric) -> CollectionSchema {
    CollectionSchema::new(
        "r",
        vec![
            FieldSchema::int64_primary("id", false),
            FieldSchema::vector("v", DIM, metric),
            FieldSchema::new("doc", DataType::Int64),
        ],
    )
}

/// The live rows' (distance, key, group), nearest first, ties by key order
/// as the engine breaks them.
fn reference_order(case: &Case) -> Vec<(f32, i64, i64)> {
    let mut rows: Vec<(f32, i64, i64)> = case
        .points
        .iter()
        .enumerate()
        .filter(|(i, _)| !case.deleted.contains(i))
        .map(|(i, p)| (distance(case.metric, &case.query, &p.vector), i as i64, p.group))
        .collect();
    rows.sort_by(|a, b| a.0.total_cmp(&b.0).then(Pk::Int(a.1).order_key().cmp(&Pk::Int(b.1).order_key())));
    rows
}

/// Milvus's range in internal distances (smaller is closer): L2
/// `range_filter <= d < radius`; IP `radius < s <= range_filter`, s = -d.
fn in_range(case: &Case, d: f32) -> bool {
    let Some(radius) = case.radius else { return true };
    match case.metric {
        Metric::L2 => d < radius && case.range_filter.is_none_or(|near| d >= near),
        _ => -d > radius && case.range_filter.is_none_or(|near| -d <= near),
    }
}

/// The first `k` groups of rows (key, group) taken nearest first, each
/// with its first `size` keys.
fn reference_groups(rows: impl Iterator<Item = (i64, i64)>, k: usize, size: usize) -> Vec<(i64, Vec<i64>)> {
    let mut groups: Vec<(i64, Vec<i64>)> = Vec::new();
    for (key, group) in rows {
        if let Some((_, members)) = groups.iter_mut().find(|(g, _)| *g == group) {
            if members.len() < size {
                members.push(key);
            }
        } else if groups.len() < k {
            groups.push((group, vec![key]));
        }
    }
    groups
}

fn keys(hits: &[SearchHit]) -> Vec<i64> {
    hits.iter().map(|h| pk_int(&h.pk)).collect()
}

fn load(engine: &Engine, case: &Case) {
    engine.create_collection(schema(case.metric)).unwrap();
    for (start, chunk) in case.points.chunks(7).enumerate() {
        let rows: Vec<_> = chunk
            .iter()
            .enumerate()
            .map(|(i, p)| {
                let id = (start * 7 + i) as i64;
                row([("id", id.into()), ("v", p.vector.to_vec().into()), ("doc", p.group.into())])
            })
            .collect();
        engine.insert_rows("r", &rows).unwrap();
    }
    let deleted: Vec<Pk> = case.deleted.iter().map(|&i| Pk::Int(i as i64)).collect();
    engine.delete("r", &deleted).unwrap();
}

fn check_case(workers: usize, case: &Case) -> Result<(), TestCaseError> {
    let dir = tempfile::tempdir().unwrap();
    let engine = exact_engine(dir.path(), workers, 11);
    load(&engine, case);
    let order = reference_order(case);
    let within: Vec<&(f32, i64, i64)> = order.iter().filter(|(d, _, _)| in_range(case, *d)).collect();
    let query = vec![case.query.to_vec()];
    let base = SearchOptions { radius: case.radius, range_filter: case.range_filter, ..SearchOptions::new(case.k) };

    // Range search: the nearest k rows within the range.
    let hits = engine.search("r", &query, &base).unwrap().hits.remove(0);
    let expected: Vec<i64> = within.iter().take(case.k).map(|r| r.1).collect();
    prop_assert_eq!(keys(&hits), expected, "range search");

    // Grouping (within the range): the first k groups in distance order,
    // each with its nearest `group_size` rows.
    let groups = reference_groups(within.iter().map(|r| (r.1, r.2)), case.k, case.group_size);
    let grouping = GroupBy { field: "doc".into(), size: case.group_size, strict: case.strict };
    let options = SearchOptions { group_by: Some(grouping), output_fields: vec!["doc".into()], ..base };
    let hits = engine.search("r", &query, &options).unwrap().hits.remove(0);
    for hit in &hits {
        prop_assert_eq!(hit.group.as_ref(), hit.fields.get("doc"), "a hit's group is its doc");
    }
    let mut got: Vec<(i64, Vec<i64>)> = Vec::new();
    for hit in &hits {
        let Some(Value::Int(group)) = hit.group else { return Err(TestCaseError::fail("a hit without its group")) };
        match got.last_mut() {
            Some((g, members)) if *g == group => members.push(pk_int(&hit.pk)),
            _ => got.push((group, vec![pk_int(&hit.pk)])),
        }
    }
    if case.strict {
        prop_assert_eq!(got, groups, "strict grouping");
    } else {
        // The same groups in the same order, each a prefix of its exact members.
        prop_assert_eq!(got.iter().map(|g| g.0).collect::<Vec<_>>(), groups.iter().map(|g| g.0).collect::<Vec<_>>());
        for ((_, members), (_, exact)) in got.iter().zip(&groups) {
            prop_assert!(!members.is_empty() && exact.starts_with(members), "{members:?} is not a prefix of {exact:?}");
        }
    }
    engine.shutdown();
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, ..ProptestConfig::default() })]

    #[test]
    fn range_and_grouping_equal_the_reference_with_one_worker(case in case()) {
        check_case(1, &case)?;
    }

    #[test]
    fn range_and_grouping_equal_the_reference_with_three_workers(case in case()) {
        check_case(3, &case)?;
    }
}

/// pypi-20k's vectors as the engine holds them (normalised), and their keys.
struct Corpus {
    vectors: Vec<Vec<f32>>,
    months: Vec<i64>,
}

impl Corpus {
    /// Every row nearest first for one query: (distance, key).
    fn ranked(&self, query: &[f32]) -> Vec<(f32, i64)> {
        let mut ranked: Vec<(f32, i64)> =
            self.vectors.iter().enumerate().map(|(i, v)| (distance(Metric::COSINE, query, v), i as i64)).collect();
        ranked.sort_by(|a, b| a.0.total_cmp(&b.0).then(a.1.cmp(&b.1)));
        ranked
    }
}

#[test]
fn range_and_grouping_through_the_graph_keep_recall_on_pypi_20k() {
    let dataset = Dataset::open(dataset_dir("pypi-20k")).expect("pypi-20k dataset");
    let vectors = dataset.base_vectors().unwrap();
    let queries = dataset.query_vectors().unwrap();
    let attributes = dataset.base_attributes().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let engine = Engine::open(EngineConfig { workers: 2, seal_rows: 3000, ..EngineConfig::new(dir.path()) }).unwrap();
    let schema = dataset.collection_schema("pypi", &attributes).unwrap();
    engine.create_collection(schema.clone()).unwrap();
    for start in (0..vectors.rows).step_by(4000) {
        let batch =
            dataset.base_batch(&schema, &vectors, &attributes, start..(start + 4000).min(vectors.rows)).unwrap();
        engine.insert("pypi", &batch).unwrap();
    }
    let stats = engine.wait_for_indexes("pypi", Duration::from_secs(600)).unwrap();
    assert!(stats.indexed_segments >= 2, "searches walk graphs: {stats:?}");
    let month_column = attributes.column_by_name("month").expect("pypi-20k has a month attribute");
    let month_column = arrow::compute::cast(month_column, &arrow::datatypes::DataType::Int64).unwrap();
    let months = month_column.as_any().downcast_ref::<arrow::array::Int64Array>().unwrap().values().to_vec();
    let corpus = Corpus {
        vectors: (0..vectors.rows)
            .map(|i| {
                let mut v = vectors.row(i).to_vec();
                normalize(&mut v);
                v
            })
            .collect(),
        months,
    };
    let sample: Vec<Vec<f32>> = (0..100)
        .map(|q| {
            let mut v = queries.row(q).to_vec();
            normalize(&mut v);
            v
        })
        .collect();

    // Range: similarity in (s[30], s[5]]: the nearest five are left out,
    // up to 25 rows are in, and k 100 does not cap them.
    let (mut found, mut expected) = (0usize, 0usize);
    for query in &sample {
        let ranked = corpus.ranked(query);
        let (radius, near) = (-ranked[30].0, -ranked[5].0);
        let exact: Vec<i64> = ranked.iter().filter(|(d, _)| -d > radius && -d <= near).map(|r| r.1).collect();
        let options = SearchOptions {
            radius: Some(radius),
            range_filter: Some(near),
            consistency: Consistency::Strong,
            ..SearchOptions::new(100)
        };
        let hits = engine.search("pypi", std::slice::from_ref(query), &options).unwrap().hits.remove(0);
        assert!(hits.iter().all(|h| h.score > radius && h.score <= near + 1e-6), "hits outside the range");
        found += keys(&hits).iter().filter(|k| exact.contains(k)).count();
        expected += exact.len();
    }
    let recall = found as f64 / expected as f64;
    assert!(recall >= 0.95, "range search recall {recall} ({found} of {expected})");

    // Grouping by month: 10 groups of up to 3, strict.
    let (mut found, mut expected) = (0usize, 0usize);
    for query in &sample {
        let ranked = corpus.ranked(query).into_iter().map(|(_, key)| (key, corpus.months[key as usize]));
        let groups = reference_groups(ranked, 10, 3);
        let grouping = GroupBy { field: "month".into(), size: 3, strict: true };
        let options = SearchOptions { group_by: Some(grouping), ..SearchOptions::new(10) };
        let hits = engine.search("pypi", std::slice::from_ref(query), &options).unwrap().hits.remove(0);
        let exact: Vec<(i64, i64)> = groups.iter().flat_map(|(g, m)| m.iter().map(move |k| (*g, *k))).collect();
        for hit in &hits {
            let key = pk_int(&hit.pk);
            assert_eq!(hit.group, Some(Value::Int(corpus.months[key as usize])), "hit {key}'s group");
            found += usize::from(exact.contains(&(corpus.months[key as usize], key)));
        }
        expected += exact.len();
    }
    let recall = found as f64 / expected as f64;
    assert!(recall >= 0.95, "grouping search recall {recall} ({found} of {expected})");
    engine.shutdown();
}

/// A reference fusion of exact sub-answers ((key, score) best first):
/// RRF or Milvus-normalised weights, fused score first, ties in key order.
fn reference_fusion(lists: &[(Metric, Vec<(i64, f32)>)], ranker: &Ranker, k: usize) -> Vec<(i64, f32)> {
    let mut fused: Vec<(i64, f32)> = Vec::new();
    for (search, (metric, hits)) in lists.iter().enumerate() {
        for (rank, &(key, score)) in hits.iter().enumerate() {
            let add = match ranker {
                Ranker::Rrf { k } => 1.0 / (k + (rank + 1) as f32),
                Ranker::Weighted { weights, .. } => {
                    let normalised = match metric {
                        Metric::L2 => 1.0 - 2.0 * score.atan() / std::f32::consts::PI,
                        _ => (1.0 + score) / 2.0,
                    };
                    weights[search] * normalised
                }
            };
            match fused.iter_mut().find(|(k, _)| *k == key) {
                Some((_, total)) => *total += add,
                None => fused.push((key, 0.0 + add)),
            }
        }
    }
    fused.sort_by(|a, b| b.1.total_cmp(&a.1).then(Pk::Int(a.0).order_key().cmp(&Pk::Int(b.0).order_key())));
    fused.truncate(k);
    fused
}

/// Exact top `k` (key, score) of `rows` for `query`, best first, as the engine ranks.
fn exact_top(metric: Metric, rows: &[Vec<f32>], query: &[f32], k: usize) -> Vec<(i64, f32)> {
    let mut ranked: Vec<(f32, i64)> =
        rows.iter().enumerate().map(|(i, v)| (distance(metric, query, v), i as i64)).collect();
    ranked.sort_by(|a, b| a.0.total_cmp(&b.0).then(Pk::Int(a.1).order_key().cmp(&Pk::Int(b.1).order_key())));
    ranked.truncate(k);
    ranked.into_iter().map(|(d, key)| (key, if metric == Metric::L2 { d } else { -d })).collect()
}

#[test]
fn hybrid_search_over_two_vector_fields_of_real_data_equals_fusing_the_exact_answers() {
    let dataset = Dataset::open(dataset_dir("pypi-20k")).expect("pypi-20k dataset");
    let vectors = dataset.base_vectors().unwrap();
    let queries = dataset.query_vectors().unwrap();
    let n = vectors.rows;
    // Field `a`: the row's embedding (COSINE). Field `b`: the first 128
    // dimensions of another row's embedding (L2): real values with
    // neighbourhoods of their own.
    let other = |i: usize| (i * 7919 + 13) % n;
    let a_rows: Vec<Vec<f32>> = (0..n)
        .map(|i| {
            let mut v = vectors.row(i).to_vec();
            normalize(&mut v);
            v
        })
        .collect();
    let b_rows: Vec<Vec<f32>> = (0..n).map(|i| vectors.row(other(i))[..128].to_vec()).collect();
    let dir = tempfile::tempdir().unwrap();
    let engine = exact_engine(dir.path(), 2, 6000);
    let schema = CollectionSchema::new(
        "two",
        vec![
            FieldSchema::int64_primary("id", false),
            FieldSchema::vector("a", vectors.cols, Metric::COSINE),
            FieldSchema::vector("b", 128, Metric::L2),
        ],
    );
    engine.create_collection(schema).unwrap();
    for start in (0..n).step_by(2000) {
        let rows: Vec<_> = (start..(start + 2000).min(n))
            .map(|i| row([("id", (i as i64).into()), ("a", a_rows[i].clone().into()), ("b", b_rows[i].clone().into())]))
            .collect();
        engine.insert_rows("two", &rows).unwrap();
    }
    let rankers = [Ranker::Rrf { k: 60.0 }, Ranker::Weighted { weights: vec![0.7, 0.3], normalize: true }];
    for q in 0..10 {
        let mut a_query = queries.row(q).to_vec();
        normalize(&mut a_query);
        let b_query = queries.row(q + 1)[..128].to_vec();
        let searches = [
            SubSearch { field: Some("a".into()), queries: vec![a_query.clone()], k: 30, ..Default::default() },
            SubSearch { field: Some("b".into()), queries: vec![b_query.clone()], k: 20, ..Default::default() },
        ];
        let lists = [
            (Metric::COSINE, exact_top(Metric::COSINE, &a_rows, &a_query, 30)),
            (Metric::L2, exact_top(Metric::L2, &b_rows, &b_query, 20)),
        ];
        for ranker in &rankers {
            let options = HybridOptions { consistency: Consistency::Strong, ..HybridOptions::new(15, ranker.clone()) };
            let hits = engine.hybrid_search("two", &searches, &options).unwrap().hits.remove(0);
            let got: Vec<(i64, f32)> = hits.iter().map(|h| (pk_int(&h.pk), h.score)).collect();
            let expected = reference_fusion(&lists, ranker, 15);
            assert_eq!(
                got.iter().map(|h| h.0).collect::<Vec<_>>(),
                expected.iter().map(|h| h.0).collect::<Vec<_>>(),
                "query {q}, {ranker:?}"
            );
            for ((_, score), (_, want)) in got.iter().zip(&expected) {
                assert!((score - want).abs() < 1e-6, "query {q}, {ranker:?}: fused score {score}, expected {want}");
            }
        }
    }
    // Sub-searches must agree on the number of queries; weights on the number of searches.
    let two_queries = SubSearch {
        field: Some("a".into()),
        queries: vec![a_rows[0].clone(), a_rows[1].clone()],
        k: 5,
        ..Default::default()
    };
    let one_query = SubSearch { field: Some("b".into()), queries: vec![b_rows[0].clone()], k: 5, ..Default::default() };
    let error = engine
        .hybrid_search("two", &[two_queries.clone(), one_query], &HybridOptions::new(5, Ranker::Rrf { k: 60.0 }))
        .unwrap_err()
        .to_string();
    assert!(error.contains("searches[1].vectors"), "{error}");
    let weights = Ranker::Weighted { weights: vec![1.0, 2.0], normalize: true };
    let error = engine.hybrid_search("two", &[two_queries], &HybridOptions::new(5, weights)).unwrap_err().to_string();
    assert!(error.contains("ranker.weights"), "{error}");
    engine.shutdown();
}
