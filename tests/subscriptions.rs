//! Standing queries against a reference: replaying the events a
//! subscription sends gives, at every write's timestamp, exactly an exact
//! search (or the filtered rows) as of that timestamp, with 1 and 4 workers;
//! and a subscriber that does not read is ended, not the writers.

mod common;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use proptest::prelude::*;
use vectorflow::{
    Engine, Error, Pk, QueryOptions, SearchOptions, SubscribeOptions, Subscription, SubscriptionEvent, Value,
};

#[derive(Debug, Clone)]
enum Op {
    Upsert {
        id: i64,
        v: [f32; 2],
        tagged: bool,
    },
    Delete {
        id: i64,
    },
    Flush,
    /// An upsert into partition `p{partition}` (0: `_default`); skipped
    /// when the partition does not exist.
    UpsertInto {
        partition: u8,
        id: i64,
        v: [f32; 2],
        tagged: bool,
    },
    CreatePartition(u8),
    DropPartition(u8),
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        6 => (0i64..30, -10.0f32..10.0, -10.0f32..10.0, any::<bool>())
            .prop_map(|(id, x, y, tagged)| Op::Upsert { id, v: [x, y], tagged }),
        2 => (0i64..30).prop_map(|id| Op::Delete { id }),
        1 => Just(Op::Flush),
    ]
}

/// Writes to a collection with partitions, which come and go.
fn partitioned_op() -> impl Strategy<Value = Op> {
    prop_oneof![
        6 => (0u8..3, 0i64..30, -10.0f32..10.0, -10.0f32..10.0, any::<bool>())
            .prop_map(|(partition, id, x, y, tagged)| Op::UpsertInto { partition, id, v: [x, y], tagged }),
        2 => (0i64..30).prop_map(|id| Op::Delete { id }),
        1 => (1u8..3).prop_map(Op::CreatePartition),
        1 => (1u8..3).prop_map(Op::DropPartition),
    ]
}

const FILTER: &str = "tag == \"a\"";

/// A search subscription's queries, k and filter.
struct SearchSpec {
    queries: Vec<Vec<f32>>,
    k: usize,
    filter: Option<&'static str>,
}

fn apply(engine: &Engine, op: &Op) -> Option<u64> {
    let row = |id: i64, v: &[f32; 2], tagged: bool| {
        let tag: Value = if tagged { "a".into() } else { "b".into() };
        vectorflow::row([("id", id.into()), ("v", v.to_vec().into()), ("tag", tag)])
    };
    let partition = |p: u8| if p == 0 { "_default".to_string() } else { format!("p{p}") };
    match op {
        Op::Upsert { id, v, tagged } => Some(engine.upsert_rows("docs", &[row(*id, v, *tagged)]).unwrap().ts),
        Op::UpsertInto { partition: p, id, v, tagged } => {
            let target = engine.partition("docs", &partition(*p)).ok()?;
            Some(engine.upsert_rows(&target, &[row(*id, v, *tagged)]).unwrap().ts)
        }
        Op::CreatePartition(p) => {
            engine.create_partition("docs", &partition(*p)).ok()?;
            None
        }
        Op::DropPartition(p) => engine.drop_partition("docs", &partition(*p)).ok(),
        Op::Delete { id } => Some(engine.delete("docs", &[Pk::Int(*id)]).unwrap().ts),
        Op::Flush => {
            engine.flush("docs").unwrap();
            None
        }
    }
}

/// The events of `subscription` through time `through` at least.
fn events_through(subscription: &mut Subscription, through: u64) -> Vec<SubscriptionEvent> {
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut events = Vec::new();
    while events.last().is_none_or(|e: &SubscriptionEvent| e.ts() < through) {
        assert!(Instant::now() < deadline, "no event through {through} within 60 s: {events:?}");
        if let Some(event) = subscription.recv_timeout(Duration::from_millis(100)).unwrap() {
            events.push(event);
        }
    }
    events
}

/// Per query, key → score, after replaying every event at or before `ts`.
fn search_answer_at(events: &[SubscriptionEvent], ts: u64) -> Vec<BTreeMap<i64, f32>> {
    let mut answer: Vec<BTreeMap<i64, f32>> = Vec::new();
    for event in events.iter().take_while(|e| e.ts() <= ts) {
        match event {
            SubscriptionEvent::Snapshot { hits, .. } => {
                answer =
                    hits.iter().map(|hits| hits.iter().map(|h| (common::pk_int(&h.pk), h.score)).collect()).collect();
            }
            SubscriptionEvent::Changed { changes, .. } => {
                for change in changes {
                    for hit in &change.removed {
                        answer[change.query].remove(&common::pk_int(&hit.pk));
                    }
                    for hit in &change.added {
                        answer[change.query].insert(common::pk_int(&hit.pk), hit.score);
                    }
                }
            }
            SubscriptionEvent::Progress { .. } => {}
            SubscriptionEvent::Rows { .. } => panic!("a search subscription sent rows"),
        }
    }
    answer
}

fn exact_search_at(engine: &Engine, spec: &SearchSpec, ts: u64) -> Vec<BTreeMap<i64, f32>> {
    let options =
        SearchOptions { as_of: Some(ts), filter: spec.filter.map(str::to_string), ..SearchOptions::new(spec.k) };
    let found = engine.search("docs", &spec.queries, &options).unwrap();
    found.hits.iter().map(|hits| hits.iter().map(|h| (common::pk_int(&h.pk), h.score)).collect()).collect()
}

fn same_answer(got: &[BTreeMap<i64, f32>], want: &[BTreeMap<i64, f32>]) -> bool {
    got.len() == want.len()
        && got.iter().zip(want).all(|(g, w)| {
            g.len() == w.len() && g.iter().zip(w).all(|((gk, gs), (wk, ws))| gk == wk && (gs - ws).abs() < 1e-4)
        })
}

fn check(workers: usize, ops: &[Op]) -> Result<(), TestCaseError> {
    let dir = tempfile::tempdir().unwrap();
    let engine = common::exact_engine(dir.path(), workers, 8);
    engine.create_collection(common::small_schema("docs")).unwrap();
    if ops.iter().any(|op| matches!(op, Op::UpsertInto { .. })) {
        engine.create_partition("docs", "p1").unwrap();
    }
    let (before, after) = ops.split_at(ops.len() / 3);
    let mut writes: Vec<u64> = before.iter().filter_map(|op| apply(&engine, op)).collect();
    let specs = [
        SearchSpec { queries: vec![vec![0.0, 0.0], vec![5.0, 5.0]], k: 3, filter: None },
        SearchSpec { queries: vec![vec![1.0, -1.0]], k: 2, filter: Some(FILTER) },
    ];
    let subscribe = |spec: &SearchSpec, as_of: Option<u64>| {
        let options = SubscribeOptions {
            filter: spec.filter.map(str::to_string),
            as_of,
            ..SubscribeOptions::search(spec.queries.clone(), spec.k)
        };
        engine.subscribe("docs", &options).unwrap()
    };
    let mut searches: Vec<Subscription> = specs.iter().map(|spec| subscribe(spec, None)).collect();
    let feed_options = SubscribeOptions {
        filter: Some(FILTER.into()),
        output_fields: vec!["tag".into()],
        ..SubscribeOptions::changes()
    };
    let mut feed = engine.subscribe("docs", &feed_options).unwrap();
    let (middle, last) = after.split_at(after.len() / 2);
    writes.extend(middle.iter().filter_map(|op| apply(&engine, op)));
    // One more, starting in the past: it replays the history since.
    let past = writes.first().copied();
    let replayed = subscribe(&specs[0], past);
    searches.push(replayed);
    writes.extend(last.iter().filter_map(|op| apply(&engine, op)));
    let through = engine.now();

    // The third subscription is the first's, started in the past.
    let spec_of = [0, 1, 0];
    for (i, subscription) in searches.iter_mut().enumerate() {
        let spec = &specs[spec_of[i]];
        let events = events_through(subscription, through);
        let start = events.first().map(SubscriptionEvent::ts).unwrap_or(0);
        prop_assert!(matches!(events.first(), Some(SubscriptionEvent::Snapshot { .. })), "{events:?}");
        prop_assert!(events.windows(2).all(|w| w[0].ts() <= w[1].ts()), "events out of time order: {events:?}");
        for &ts in writes.iter().filter(|&&ts| ts >= start).chain([start, through].iter()) {
            let got = search_answer_at(&events, ts);
            let want = exact_search_at(&engine, spec, ts);
            prop_assert!(same_answer(&got, &want), "subscription {i} as of {ts}: {got:?}, exact {want:?}");
        }
    }
    let events = events_through(&mut feed, through);
    let start = events.first().map(SubscriptionEvent::ts).unwrap_or(0);
    // The feed reports changes after its start: compare what changed since.
    let at_start: BTreeMap<i64, Value> = rows_at(&engine, start);
    for &ts in writes.iter().filter(|&&ts| ts >= start).chain([through].iter()) {
        let mut got = at_start.clone();
        // Replay on top of the rows at the start, in order.
        for event in events.iter().take_while(|e| e.ts() <= ts) {
            if let SubscriptionEvent::Rows { upserted, deleted, .. } = event {
                for pk in deleted {
                    got.remove(&common::pk_int(pk));
                }
                for row in upserted {
                    got.insert(common::int(&row["id"]), row["tag"].clone());
                }
            }
        }
        let want = rows_at(&engine, ts);
        prop_assert_eq!(&got, &want, "the changefeed replayed through {}", ts);
    }
    drop(searches);
    drop(feed);
    engine.shutdown();
    Ok(())
}

/// Key → tag of the rows passing [`FILTER`] as of `ts`.
fn rows_at(engine: &Engine, ts: u64) -> BTreeMap<i64, Value> {
    let options = QueryOptions {
        filter: Some(FILTER.into()),
        output_fields: vec!["tag".into()],
        as_of: Some(ts),
        ..QueryOptions::default()
    };
    engine
        .query("docs", &options)
        .unwrap()
        .into_iter()
        .map(|row| (common::int(&row["id"]), row["tag"].clone()))
        .collect()
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 8, ..ProptestConfig::default() })]

    #[test]
    fn subscriptions_replay_to_the_exact_answer_with_one_worker(ops in prop::collection::vec(op(), 6..40)) {
        check(1, &ops)?;
    }

    #[test]
    fn subscriptions_replay_to_the_exact_answer_with_four_workers(ops in prop::collection::vec(op(), 6..40)) {
        check(4, &ops)?;
    }

    /// Partitions made and dropped while the subscriptions run: a drop
    /// takes its rows out of the answer (and out of the changefeed) at its time.
    #[test]
    fn subscriptions_follow_partitions_as_they_come_and_go(ops in prop::collection::vec(partitioned_op(), 6..40)) {
        check(2, &ops)?;
    }
}

/// A subscriber that never reads fills its buffer and is ended with
/// `ResourceExhausted` naming the buffer; the writes go on meanwhile.
#[test]
fn a_subscriber_that_does_not_read_is_ended_and_writes_go_on() {
    let dir = tempfile::tempdir().unwrap();
    let engine = common::exact_engine(dir.path(), 2, 64);
    engine.create_collection(common::small_schema("docs")).unwrap();
    let options = SubscribeOptions { buffer: 4, ..SubscribeOptions::changes() };
    let mut slow = engine.subscribe("docs", &options).unwrap();
    let started = Instant::now();
    for i in 0..50i64 {
        engine.insert_rows("docs", &[common::small_row(i, [i as f32, 0.0])]).unwrap();
    }
    assert!(started.elapsed() < Duration::from_secs(30), "the writes waited for the subscriber");
    let mut received = 0;
    let error = loop {
        match slow.recv_timeout(Duration::from_secs(30)) {
            Ok(Some(_)) => received += 1,
            Ok(None) => panic!("neither an event nor the end within 30 s"),
            Err(e) => break e,
        }
    };
    assert!(received <= 4, "{received} events for a buffer of 4");
    match error {
        Error::ResourceExhausted { limit, .. } => assert_eq!(limit, "subscription_buffer"),
        other => panic!("ended with {other:?}"),
    }
    let rows = engine.count("docs", &QueryOptions::default()).unwrap();
    assert_eq!(rows, 50);
}
