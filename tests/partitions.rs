//! Named partitions: rows written to a partition are read with their
//! collection or alone; upserts and deletes follow Milvus; a dropped
//! partition is gone from reads at its drop time but time travel before it
//! still sees its rows, also after a restart. A partition key: 1,000
//! tenants hashed to 16 partitions, each tenant's search reading one
//! partition and returning only its rows.

mod common;

use common::*;
use vectorflow::{Engine, GetOptions, Pk, QueryOptions, SearchOptions, Value};

fn keys(engine: &Engine, partitions: &[&str], as_of: Option<u64>) -> Vec<i64> {
    let options = QueryOptions {
        partitions: partitions.iter().map(|p| p.to_string()).collect(),
        as_of,
        ..QueryOptions::default()
    };
    engine.scan("c", &options, None).unwrap().iter().map(|row| int(&row["id"])).collect()
}

fn rows(ids: std::ops::Range<i64>) -> Vec<vectorflow::Row> {
    ids.map(|id| small_row(id, [id as f32, 0.0])).collect()
}

#[test]
fn partitions_hold_their_rows_restrict_reads_and_a_drop_keeps_time_travel() {
    let dir = tempfile::tempdir().unwrap();
    let engine = exact_engine(dir.path(), 2, 7);
    engine.create_collection(small_schema("c")).unwrap();
    engine.create_partition("c", "p1").unwrap();
    engine.create_partition("c", "p2").unwrap();
    assert_eq!(engine.list_partitions("c").unwrap(), ["_default", "p1", "p2"]);
    assert_eq!(engine.list_collections(), ["c"], "partitions are not collections");
    assert!(engine.has_partition("c", "p1").unwrap() && !engine.has_partition("c", "p3").unwrap());
    let again = engine.create_partition("c", "p1").unwrap_err().to_string();
    assert!(again.contains("partition_name") && again.contains("already exists"), "{again}");
    let bad = engine.create_partition("c", "no.dots").unwrap_err().to_string();
    assert!(bad.contains("partition_name"), "{bad}");
    assert!(engine.drop_partition("c", "_default").is_err());

    let p1 = engine.partition("c", "p1").unwrap();
    let p2 = engine.partition("c", "p2").unwrap();
    engine.insert_rows("c", &rows(0..10)).unwrap();
    engine.insert_rows(&p1, &rows(10..20)).unwrap();
    let last = engine.insert_rows(&p2, &rows(20..30)).unwrap().ts;

    // The collection reads every partition; a read may name some.
    assert_eq!(keys(&engine, &[], None), (0..30).collect::<Vec<_>>());
    assert_eq!(keys(&engine, &["p1"], None), (10..20).collect::<Vec<_>>());
    assert_eq!(keys(&engine, &["p2", "_default"], None), (0..10).chain(20..30).collect::<Vec<_>>());
    let near_15 = vec![vec![15.2, 0.0]];
    let all = engine.search("c", &near_15, &SearchOptions::new(3)).unwrap();
    assert_eq!(pks(&all.hits[0]), [15, 16, 14].map(Pk::Int));
    let only_p2 = SearchOptions { partitions: vec!["p2".into()], ..SearchOptions::new(3) };
    assert_eq!(pks(&engine.search("c", &near_15, &only_p2).unwrap().hits[0]), [20, 21, 22].map(Pk::Int));
    let counted = QueryOptions { partitions: vec!["p1".into()], ..QueryOptions::default() };
    assert_eq!(engine.count("c", &counted).unwrap(), 10);
    let in_p2 = GetOptions { partitions: vec!["p2".into()], ..GetOptions::default() };
    assert!(engine.get("c", &[Pk::Int(15)], &in_p2).unwrap().is_empty());
    assert_eq!(engine.get("c", &[Pk::Int(15)], &GetOptions::default()).unwrap().len(), 1);
    let unknown = SearchOptions { partitions: vec!["p9".into()], ..SearchOptions::new(3) };
    let error = engine.search("c", &near_15, &unknown).unwrap_err().to_string();
    assert!(error.contains("partition `p9` not found"), "{error}");

    // An upsert replaces its key wherever it is; a delete through the
    // collection reaches every partition, through a partition only that one.
    engine.upsert_rows(&p1, &[small_row(5, [15.1, 0.0])]).unwrap();
    assert_eq!(keys(&engine, &["_default"], None), [0, 1, 2, 3, 4, 6, 7, 8, 9]);
    assert_eq!(pks(&engine.search("c", &near_15, &SearchOptions::new(1)).unwrap().hits[0]), [Pk::Int(5)]);
    engine.delete(&p2, &[Pk::Int(12)]).unwrap();
    assert!(keys(&engine, &["p1"], None).contains(&12), "a delete through p2 leaves p1's key");
    engine.delete("c", &[Pk::Int(12), Pk::Int(21)]).unwrap();
    assert!(!keys(&engine, &[], None).iter().any(|k| *k == 12 || *k == 21));

    // Dropped at a timestamp: gone from reads after it, there before it.
    let before_drop = engine.insert_rows(&p1, &rows(40..41)).unwrap().ts;
    let dropped_at = engine.drop_partition("c", "p1").unwrap();
    assert!(dropped_at > before_drop);
    assert_eq!(engine.list_partitions("c").unwrap(), ["_default", "p2"]);
    let now: Vec<i64> = keys(&engine, &[], None);
    assert!(now.iter().all(|k| !(10..20).contains(k) && *k != 40 && *k != 5), "{now:?}");
    let then = keys(&engine, &[], Some(before_drop));
    assert!(then.contains(&40) && then.contains(&13) && then.contains(&5), "{then:?}");
    assert!(!keys(&engine, &[], Some(last)).contains(&40), "time travel to before the row was written");
    assert!(engine.partition("c", "p1").is_err(), "a dropped partition takes no writes");
    let as_of = SearchOptions { as_of: Some(before_drop), partitions: vec!["p1".into()], ..SearchOptions::new(2) };
    assert_eq!(pks(&engine.search("c", &near_15, &as_of).unwrap().hits[0]), [5, 15].map(Pk::Int));
    // A new partition may take the dropped one's name.
    engine.create_partition("c", "p1").unwrap();
    assert!(keys(&engine, &["p1"], None).is_empty());
    engine.flush("c").unwrap();
    engine.shutdown();
    drop(engine);

    // After a restart: the same partitions, the same history.
    let engine = exact_engine(dir.path(), 2, 7);
    assert_eq!(engine.list_partitions("c").unwrap(), ["_default", "p1", "p2"]);
    assert_eq!(keys(&engine, &[], None), now);
    assert_eq!(keys(&engine, &[], Some(before_drop)), then);
    let with_v = GetOptions { output_fields: vec!["v".into()], ..GetOptions::default() };
    let value = engine.get("c", &[Pk::Int(22)], &with_v).unwrap();
    assert_eq!(value[0]["v"], Value::Vector(vec![22.0, 0.0]));
    engine.drop_collection("c").unwrap();
    assert!(engine.list_collections().is_empty(), "its partitions went with it");
    engine.shutdown();
}

#[test]
fn a_partition_key_keeps_a_thousand_tenants_apart_and_its_filter_reads_one_partition() {
    let dir = tempfile::tempdir().unwrap();
    let engine = exact_engine(dir.path(), 2, 700);
    let mut schema = vectorflow::CollectionSchema::new(
        "t",
        vec![
            vectorflow::FieldSchema::int64_primary("id", false),
            vectorflow::FieldSchema::vector("v", 4, vectorflow::Metric::L2),
            vectorflow::FieldSchema::new("tenant", vectorflow::DataType::Int64).partition_key(),
        ],
    );
    schema.num_partitions = Some(16);
    engine.create_collection(schema).unwrap();
    let partitions = engine.list_partitions("t").unwrap();
    assert_eq!(partitions.len(), 16);
    assert!(engine.create_partition("t", "p1").is_err() && engine.partition("t", "_default_3").is_err());
    let vector = |id: i64| (0..4).map(|d| ((id * 37 + d * 11) % 101) as f32).collect::<Vec<f32>>();
    let row = |id: i64, tenant: i64| {
        vectorflow::row([("id", id.into()), ("v", vector(id).into()), ("tenant", tenant.into())])
    };
    let all: Vec<_> = (0..1000i64).flat_map(|tenant| (0..5).map(move |j| (tenant * 5 + j, tenant))).collect();
    for chunk in all.chunks(1000) {
        engine.insert_rows("t", &chunk.iter().map(|&(id, tenant)| row(id, tenant)).collect::<Vec<_>>()).unwrap();
    }
    assert_eq!(engine.count("t", &QueryOptions::default()).unwrap(), 5000);
    assert_eq!(engine.read_partitions("t", None).unwrap().len(), 16);
    // As in Milvus, a read names no partition of a partition-key collection.
    for partition in &partitions {
        let mine = QueryOptions { partitions: vec![partition.clone()], ..QueryOptions::default() };
        let error = engine.count("t", &mine).unwrap_err().to_string();
        assert!(error.contains("partition key"), "a partition-key collection is read by key: {error}");
    }
    for tenant in (0..1000).step_by(7) {
        let filter = format!("tenant == {tenant}");
        assert_eq!(engine.read_partitions("t", Some(&filter)).unwrap().len(), 1, "{filter} reads one partition");
        let options = SearchOptions {
            filter: Some(filter.clone()),
            output_fields: vec!["tenant".into()],
            ..SearchOptions::new(10)
        };
        let hits = engine.search("t", &[vector(tenant * 5 + 2)], &options).unwrap().hits.remove(0);
        assert_eq!(hits.len(), 5, "{filter}: the tenant's five rows");
        assert!(hits.iter().all(|h| h.fields["tenant"] == Value::Int(tenant)), "{filter}: only its rows");
        assert_eq!(hits[0].pk, Pk::Int(tenant * 5 + 2));
    }
    let two = "tenant in [3, 998] and id >= 0";
    assert!(engine.read_partitions("t", Some(two)).unwrap().len() <= 2);
    let got = engine.scan("t", &QueryOptions { filter: Some(two.into()), ..QueryOptions::default() }, None).unwrap();
    assert_eq!(
        got.iter().map(|r| int(&r["id"])).collect::<Vec<_>>(),
        [15, 16, 17, 18, 19, 4990, 4991, 4992, 4993, 4994]
    );
    // An upsert that changes a row's tenant moves it to the new tenant's partition.
    engine.upsert_rows("t", &[row(0, 999)]).unwrap();
    let count =
        |filter: &str| engine.count("t", &QueryOptions { filter: Some(filter.into()), ..QueryOptions::default() });
    assert_eq!((count("tenant == 0").unwrap(), count("tenant == 999").unwrap()), (4, 6));
    assert_eq!(engine.count("t", &QueryOptions::default()).unwrap(), 5000);
    let moved =
        engine.get("t", &[Pk::Int(0)], &GetOptions { output_fields: vec!["tenant".into()], ..GetOptions::default() });
    assert_eq!(moved.unwrap()[0]["tenant"], Value::Int(999));
    engine.shutdown();
}
