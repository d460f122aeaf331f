//! Property test: random inserts, upserts and deletes over a small key space;
//! `get` and exact search `as_of` earlier timestamps must equal a reference
//! model of the history, with 1 and with 4 workers.

mod common;

use std::collections::BTreeMap;

use common::*;
use proptest::prelude::*;
use vectorflow::{GetOptions, Pk, SearchOptions, Value};

#[derive(Debug, Clone)]
enum Op {
    Upsert(Vec<(i64, [f32; 2])>),
    Delete(Vec<i64>),
}

fn op() -> impl Strategy<Value = Op> {
    let key = 0..12i64;
    let point = (0..20i32, 0..20i32).prop_map(|(x, y)| [x as f32, y as f32]);
    prop_oneof![
        3 => prop::collection::vec((key.clone(), point), 1..5).prop_map(Op::Upsert),
        1 => prop::collection::vec(key, 1..4).prop_map(Op::Delete),
    ]
}

/// Key → vector at one point in time.
type State = BTreeMap<i64, [f32; 2]>;

fn check_history(workers: usize, ops: &[Op]) -> Result<(), TestCaseError> {
    let dir = tempfile::tempdir().unwrap();
    let engine = exact_engine(dir.path(), workers, 5);
    engine.create_collection(small_schema("h")).unwrap();
    let mut state = State::new();
    let mut history: Vec<(u64, State)> = vec![(engine.now(), state.clone())];
    for op in ops {
        let ts = match op {
            Op::Upsert(rows) => {
                let rows: Vec<_> = rows.iter().map(|(k, v)| small_row(*k, *v)).collect();
                let write = engine.upsert_rows("h", &rows).unwrap();
                for row in &rows {
                    let Value::Int(k) = row["id"] else { unreachable!() };
                    let Value::Vector(v) = &row["v"] else { unreachable!() };
                    state.insert(k, [v[0], v[1]]);
                }
                write.ts
            }
            Op::Delete(keys) => {
                let write = engine.delete("h", &keys.iter().copied().map(Pk::Int).collect::<Vec<_>>()).unwrap();
                keys.iter().for_each(|k| {
                    state.remove(k);
                });
                write.ts
            }
        };
        history.push((ts, state.clone()));
    }
    let keys: Vec<Pk> = (0..12).map(Pk::Int).collect();
    let query = [2.0f32, 3.0];
    for (i, (ts, expected)) in history.iter().enumerate() {
        // Exactly at the write, and just before the next one.
        let just_before_next = history.get(i + 1).map_or(*ts, |(next, _)| next - 1);
        for at in [*ts, just_before_next] {
            let options = GetOptions { output_fields: vec!["v".into()], as_of: Some(at), ..Default::default() };
            let got: State = engine
                .get("h", &keys, &options)
                .unwrap()
                .into_iter()
                .map(|row| {
                    let Value::Vector(v) = &row["v"] else { unreachable!() };
                    (int(&row["id"]), [v[0], v[1]])
                })
                .collect();
            prop_assert_eq!(&got, expected, "get as of {} (after op {})", at, i);

            let search = SearchOptions { as_of: Some(at), ..SearchOptions::new(12) };
            let hits = engine.search("h", &[query.to_vec()], &search).unwrap().hits.remove(0);
            let mut found: Vec<(i64, f32)> = hits.iter().map(|h| (int(&h.pk.clone().into()), h.score)).collect();
            prop_assert!(hits.windows(2).all(|w| w[0].score <= w[1].score), "L2 hits nearest first");
            found.sort_by_key(|(k, _)| *k);
            let model: Vec<(i64, f32)> =
                expected.iter().map(|(k, v)| (*k, (v[0] - query[0]).powi(2) + (v[1] - query[1]).powi(2))).collect();
            prop_assert_eq!(found, model, "search as of {} (after op {})", at, i);
        }
    }
    engine.shutdown();
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 12, ..ProptestConfig::default() })]

    #[test]
    fn history_matches_the_model_with_one_worker(ops in prop::collection::vec(op(), 1..25)) {
        check_history(1, &ops)?;
    }

    #[test]
    fn history_matches_the_model_with_four_workers(ops in prop::collection::vec(op(), 1..25)) {
        check_history(4, &ops)?;
    }
}
