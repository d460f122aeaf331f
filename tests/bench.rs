//! `vectorflow bench` on pypi-20k: a test of the harness (keys, ranges,
//! exact baseline), not of speed.

mod common;

use std::process::Command;

#[test]
fn bench_writes_results_with_every_key_and_an_exact_baseline_at_recall_one() {
    let out = tempfile::tempdir().unwrap();
    let status = Command::new(env!("CARGO_BIN_EXE_vectorflow"))
        .args(["bench", "--dataset"])
        .arg(common::dataset_dir("pypi-20k"))
        .arg("--out")
        .arg(out.path())
        .args(["--ef", "32,64", "--clients", "1,2", "--queries", "100", "--exact-queries", "50", "--seal-rows", "4000"])
        .args(["--features", "month", "--tenants", "50"])
        .status()
        .expect("the vectorflow binary runs");
    assert!(status.success(), "bench exited with {status}");
    let text = std::fs::read_to_string(out.path().join("results.json")).unwrap();
    let results: serde_json::Value = serde_json::from_str(&text).unwrap();
    for pointer in [
        "/dataset",
        "/ingest/rows_per_s",
        "/index/build_s",
        "/freshness_ms/p50",
        "/freshness_ms/p99",
        "/time_travel/cost_ratio",
        "/time_travel/answers_equal",
        "/memory/peak_rss_bytes",
        "/memory/bytes_per_vector",
    ] {
        assert!(results.pointer(pointer).is_some(), "results.json lacks {pointer}");
    }
    assert_eq!(results["time_travel"]["answers_equal"], serde_json::Value::Bool(true));
    for list in ["search", "baseline_hnsw", "baseline_exact"] {
        let points = results[list].as_array().unwrap_or_else(|| panic!("{list} is not a list"));
        assert!(!points.is_empty(), "{list} is empty");
        for point in points {
            for key in ["filter", "ef", "clients", "qps", "recall_at_k", "p50_ms", "p99_ms"] {
                assert!(point.get(key).is_some(), "{list} entry lacks {key}");
            }
            let recall = point["recall_at_k"].as_f64().unwrap();
            assert!((0.0..=1.0).contains(&recall), "{list} recall {recall}");
        }
    }
    for point in results["baseline_exact"].as_array().unwrap() {
        assert_eq!(point["recall_at_k"].as_f64(), Some(1.0), "brute force must find the ground truth");
    }
    // Range and grouping search next to top-k, at each ef.
    let features = results["features"].as_array().expect("features is a list");
    let kinds: Vec<&str> = features.iter().filter_map(|p| p["kind"].as_str()).collect();
    assert_eq!(kinds, ["top-k", "range", "grouping", "top-k", "range", "grouping"]);
    for point in features {
        let recall = point["recall"].as_f64().unwrap();
        assert!((0.5..=1.0).contains(&recall), "{point}: recall against the exact answer");
        assert!(point["qps"].as_f64().unwrap() > 0.0 && point["hits_per_query"].as_f64().unwrap() > 0.0, "{point}");
    }
    // A tenant's search with `tenant` a partition key and a plain field.
    let tenants = results["tenants"].as_array().expect("tenants is a list");
    assert_eq!(tenants.len(), 4, "two layouts at two ef: {tenants:?}");
    for point in tenants {
        assert!(point["recall"].as_f64().unwrap() >= 0.9, "{point}");
        assert_eq!(point["partitions_read"].as_u64(), Some(1), "{point}");
    }
    assert!(tenants.iter().any(|p| p["partitions"].as_u64() == Some(16)), "the keyed layout has 16 partitions");
    assert!(out.path().join("recall_qps.png").exists(), "the plot is written");
}
