//! `vectorflow dataset synth`: the folder it writes opens as a dataset the
//! bench can run on, with the promised shapes, filters and exact ground truths.

use std::path::Path;
use std::process::Command;

use vectorflow::crates::connectors::dataset::{RecallJudge, exact_search};
use vectorflow::{Dataset, Filter, Metric};

const ROWS: usize = 3000;
const DIM: usize = 16;
const QUERIES: usize = 20;
const K: usize = 10;

fn synth(out: &Path, extra: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_vectorflow"))
        .args(["dataset", "synth", "--rows", &ROWS.to_string(), "--dim", &DIM.to_string()])
        .args(["--queries", &QUERIES.to_string(), "--k", &K.to_string(), "--clusters", "12", "--seed", "5"])
        .arg("--out")
        .arg(out)
        .args(extra)
        .output()
        .expect("the vectorflow binary runs")
}

#[test]
fn synth_writes_a_dataset_with_unit_vectors_filters_and_exact_ground_truths() {
    writes_a_checked_dataset(&[]);
}

#[test]
fn synth_with_a_latent_dimension_writes_the_same_kind_of_dataset() {
    writes_a_checked_dataset(&["--latent-dim", "4"]);
}

fn writes_a_checked_dataset(extra: &[&str]) {
    let dir = tempfile::tempdir().unwrap();
    let output = synth(dir.path(), extra);
    assert!(output.status.success(), "synth failed: {}", String::from_utf8_lossy(&output.stderr));
    assert!(String::from_utf8_lossy(&output.stdout).contains("filter10"), "the summary lists the filters");

    let dataset = Dataset::open(dir.path()).unwrap();
    let info = &dataset.info;
    assert_eq!((info.n_base, info.n_queries, info.dim, info.k), (ROWS, QUERIES, DIM, K));
    assert_eq!(dataset.metric(), Metric::COSINE);
    let base = dataset.base_vectors().unwrap();
    let queries = dataset.query_vectors().unwrap();
    assert_eq!((base.rows, base.cols, queries.rows, queries.cols), (ROWS, DIM, QUERIES, DIM));
    for v in base.data.chunks_exact(DIM).chain(queries.data.chunks_exact(DIM)) {
        let norm = v.iter().map(|x| x * x).sum::<f32>().sqrt();
        // f16 rounding of unit vectors: a few parts in 10,000.
        assert!((norm - 1.0).abs() < 1e-3, "norm {norm}");
    }
    // Queries are drawn, not copied from the base set.
    assert!(queries.data.chunks_exact(DIM).all(|q| base.data.chunks_exact(DIM).all(|b| b != q)));

    let names: Vec<&str> = info.ground_truth.keys().map(String::as_str).collect();
    assert_eq!(names, ["filter1", "filter10", "unfiltered"]);
    // The filters as the engine compiles them, over the attributes as the bench loads them.
    let attributes = dataset.base_attributes().unwrap();
    let schema = dataset.collection_schema("synth", &attributes).unwrap();
    let all_rows = dataset.base_batch(&schema, &base, &attributes, 0..ROWS).unwrap();
    let judge = RecallJudge::new(&base, &queries, dataset.metric()).unwrap();
    for (name, gt) in &info.ground_truth {
        let passing: Vec<usize> = match &gt.expression {
            Some(expression) => {
                let mask = Filter::compile(&schema, expression).unwrap().evaluate(&all_rows).unwrap();
                (0..ROWS).filter(|&r| mask[r]).collect()
            }
            None => (0..ROWS).collect(),
        };
        assert_eq!(gt.passing_rows, Some(passing.len()), "{name}");
        let share = passing.len() as f64 / ROWS as f64;
        let expected = match name.as_str() {
            "unfiltered" => 1.0..=1.0,
            "filter10" => 0.08..=0.12,
            _ => 0.01..=0.01,
        };
        assert!(expected.contains(&share), "{name} passes {share}");
        assert!((gt.selectivity.unwrap() - share).abs() < 1e-4, "{name}");

        let truth = dataset.ground_truth(name).unwrap().unwrap();
        assert_eq!((truth.ids.rows, truth.ids.cols, truth.dists.rows, truth.dists.cols), (QUERIES, K, QUERIES, K));
        for q in 0..QUERIES {
            // The library's exact search agrees to the bit, and scores 1.0.
            let exact = exact_search(Metric::COSINE, &base, queries.row(q), K, &passing);
            let ids: Vec<i64> = truth.ids.row(q).iter().map(|&id| i64::from(id)).collect();
            assert_eq!(exact.iter().map(|e| e.0).collect::<Vec<_>>(), ids, "{name} query {q}");
            assert_eq!(exact.iter().map(|e| e.1).collect::<Vec<_>>(), truth.dists.row(q), "{name} query {q}");
            assert_eq!(truth.recall(&judge, q, K, &ids), 1.0);

            // And an independent brute force (f64 sums): the listed scores are
            // the rows' inner products, best first, and no passing row that is
            // clearly closer than the k-th is left out.
            let naive = |row: usize| -> f64 {
                queries.row(q).iter().zip(base.row(row)).map(|(a, b)| f64::from(*a) * f64::from(*b)).sum()
            };
            let dists = truth.dists.row(q);
            assert!(dists.windows(2).all(|w| w[0] >= w[1]), "{name} query {q}: not descending");
            for (&id, &dist) in ids.iter().zip(dists) {
                assert!(passing.contains(&(id as usize)), "{name} query {q}: row {id} does not pass");
                assert!((naive(id as usize) - f64::from(dist)).abs() < 1e-5, "{name} query {q} row {id}");
            }
            let kth = f64::from(dists[K - 1]);
            for &row in passing.iter().filter(|&&row| naive(row) > kth + 1e-5) {
                assert!(ids.contains(&(row as i64)), "{name} query {q}: row {row} is missing");
            }
        }
    }

    // The query attributes have the same columns, one row per query.
    let query_attrs = std::fs::File::open(dir.path().join("query_attrs.parquet")).unwrap();
    let reader = parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder::try_new(query_attrs).unwrap();
    let columns: Vec<String> = reader.schema().fields().iter().map(|f| f.name().clone()).collect();
    assert_eq!(columns, ["id", "cluster", "month", "rank"]);
    assert_eq!(reader.metadata().file_metadata().num_rows(), QUERIES as i64);
}

#[test]
fn synth_is_deterministic_and_refuses_bad_arguments() {
    let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    assert!(synth(a.path(), &[]).status.success());
    assert!(synth(b.path(), &[]).status.success());
    for file in ["base.npy", "queries.npy", "base_attrs.parquet", "gt_filter10_ids.npy", "gt_unfiltered_dists.npy"] {
        assert_eq!(std::fs::read(a.path().join(file)).unwrap(), std::fs::read(b.path().join(file)).unwrap(), "{file}");
    }
    let bad = tempfile::tempdir().unwrap();
    let good = [("--rows", "100"), ("--dim", "4"), ("--queries", "2"), ("--k", "5"), ("--clusters", "3")];
    let refused = [
        ("--rows", "0"),
        ("--dim", "0"),
        ("--queries", "0"),
        ("--k", "0"),
        ("--k", "101"),
        ("--latent-dim", "0"),
        ("--latent-dim", "5"),
    ];
    for (argument, value) in refused {
        let mut args: Vec<(&str, &str)> =
            good.iter().map(|&(a, v)| if a == argument { (a, value) } else { (a, v) }).collect();
        if !good.iter().any(|&(a, _)| a == argument) {
            args.push((argument, value));
        }
        let output = Command::new(env!("CARGO_BIN_EXE_vectorflow"))
            .args(["dataset", "synth", "--out"])
            .arg(bad.path())
            .args(args.into_iter().flat_map(|(a, v)| [a, v]))
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(!output.status.success(), "{argument} {value} was accepted");
        let field = argument.trim_start_matches('-').replace('-', "_");
        assert!(stderr.contains(&field) && !stderr.contains("panicked"), "{stderr}");
    }
}
