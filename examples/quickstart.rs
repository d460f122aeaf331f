//! Vectorflow in one page: create a collection from a dataset folder, insert
//! in batches, search, delete and upsert, travel back in time, and measure
//! recall@10.
//!
//! ```text
//! cargo run --release --example quickstart                              # the committed 2,000-row sample
//! cargo run --release --example quickstart -- ../shared/datasets/pypi-20k
//! ```

use std::path::PathBuf;
use std::time::{Duration, Instant};

use vectorflow::crates::connectors::dataset::{ID_COLUMN, RecallJudge, VECTOR_FIELD};
use vectorflow::crates::operators::distance::distance;
use vectorflow::{Consistency, Dataset, Engine, EngineConfig, Pk, SearchOptions};

const K: usize = 10;
const BATCH: usize = 1000;
const MAX_QUERIES: usize = 200;

fn main() -> anyhow::Result<()> {
    let dir = std::env::args()
        .nth(1)
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("examples/data/pypi-2k"));
    let dataset = Dataset::open(&dir)?;
    let vectors = dataset.base_vectors()?;
    let queries = dataset.query_vectors()?;
    let attributes = dataset.base_attributes()?;
    println!("dataset {}: {} rows x {} dims, {} queries", dataset.name(), vectors.rows, vectors.cols, queries.rows);

    let data_dir = tempfile::tempdir()?;
    let seal_rows = (vectors.rows / 4).clamp(500, 16_384);
    let engine = Engine::open(EngineConfig { workers: 2, seal_rows, ..EngineConfig::new(data_dir.path()) })?;
    let schema = dataset.collection_schema("quickstart", &attributes)?;
    let fields: Vec<&str> = schema.fields.iter().map(|f| f.name.as_str()).collect();
    println!("collection `quickstart`: fields {fields:?}, seal at {seal_rows} rows per shard");
    engine.create_collection(schema.clone())?;

    // Insert in batches through the log; Strong reads see each acknowledged write.
    let started = Instant::now();
    for start in (0..vectors.rows).step_by(BATCH) {
        let batch = dataset.base_batch(&schema, &vectors, &attributes, start..(start + BATCH).min(vectors.rows))?;
        engine.insert("quickstart", &batch)?;
    }
    let stats = engine.stats("quickstart", Consistency::Strong)?;
    let ingest = started.elapsed();
    println!(
        "inserted {} rows in {ingest:.2?} ({:.0} rows/s to searchable): {} sealed segments, {} growing rows",
        stats.live_rows,
        stats.live_rows as f64 / ingest.as_secs_f64(),
        stats.sealed_segments,
        stats.growing_rows
    );
    let indexed = Instant::now();
    engine.wait_for_indexes("quickstart", Duration::from_secs(600))?;
    println!("sealed segments indexed (HNSW) after another {:.2?}", indexed.elapsed());

    // Search and recall@10 against the ground truth, or exact search without one.
    let metric = dataset.metric();
    let truth = dataset.ground_truth("unfiltered")?;
    let judge = RecallJudge::new(&vectors, &queries, metric)?;
    let n_queries = queries.rows.min(MAX_QUERIES);
    let query_list: Vec<Vec<f32>> = (0..n_queries).map(|q| queries.row(q).to_vec()).collect();
    let options = SearchOptions { ef: Some(64), ..SearchOptions::new(K) };
    let started = Instant::now();
    let result = engine.search("quickstart", &query_list, &options)?;
    let elapsed = started.elapsed();
    let mut recall = 0.0;
    for (q, hits) in result.hits.iter().enumerate() {
        let found: Vec<(i64, f32)> =
            hits.iter().map(|h| (if let Pk::Int(id) = h.pk { id } else { -1 }, h.score)).collect();
        recall += match &truth {
            Some(truth) => truth.recall(&judge, q, K, &found.iter().map(|(id, _)| *id).collect::<Vec<_>>()),
            None => exact_recall(&vectors.data, vectors.cols, metric, &query_list[q], &found),
        };
    }
    println!(
        "search: {n_queries} queries in {elapsed:.2?} ({:.0} QPS batched), recall@{K} = {:.3} against {}",
        n_queries as f64 / elapsed.as_secs_f64(),
        recall / n_queries as f64,
        if truth.is_some() { "the dataset's ground truth" } else { "exact search" }
    );

    // Delete the best hit of query 0, and upsert another row to sit exactly on the query.
    let top = &result.hits[0];
    let (deleted, replaced) = (top[0].pk.clone(), top[K - 1].pk.clone());
    let before_changes = engine.now();
    let delete = engine.delete("quickstart", std::slice::from_ref(&deleted))?;
    let mut moved = dataset.base_batch(&schema, &vectors, &attributes, 0..1)?;
    if let Pk::Int(id) = replaced {
        moved = replace_row(&moved, id, &query_list[0])?;
    }
    let upsert = engine.upsert("quickstart", &moved)?;
    let now = engine.search("quickstart", &query_list[..1], &SearchOptions::new(3))?;
    let then = engine.search(
        "quickstart",
        &query_list[..1],
        &SearchOptions { as_of: Some(before_changes), ..SearchOptions::new(3) },
    )?;
    let show = |hits: &[vectorflow::SearchHit]| -> Vec<String> {
        hits.iter().map(|h| format!("{} ({:.3})", h.pk, h.score)).collect()
    };
    println!("deleted {deleted} at ts {}, upserted {replaced} onto query 0 at ts {}", delete.ts, upsert.ts);
    println!("  now:                  {:?}", show(&now.hits[0]));
    println!("  as of before changes: {:?}", show(&then.hits[0]));
    let got = engine.get("quickstart", std::slice::from_ref(&deleted), &Default::default())?;
    let options = vectorflow::GetOptions { as_of: Some(before_changes), ..Default::default() };
    let got_then = engine.get("quickstart", std::slice::from_ref(&deleted), &options)?;
    println!("  get({deleted}) now: {} rows; as of before the delete: {} rows", got.len(), got_then.len());
    engine.shutdown();
    Ok(())
}

/// The row `0` batch rewritten as row `id` with vector `vector`.
fn replace_row(
    batch: &arrow::record_batch::RecordBatch,
    id: i64,
    vector: &[f32],
) -> anyhow::Result<arrow::record_batch::RecordBatch> {
    let schema = batch.schema();
    let mut columns = batch.columns().to_vec();
    let id_index = schema.index_of(ID_COLUMN)?;
    columns[id_index] = std::sync::Arc::new(arrow::array::Int64Array::from(vec![id]));
    let vector_index = schema.index_of(VECTOR_FIELD)?;
    columns[vector_index] = vectorflow::crates::core::batch::vector_array(vector.len(), vector.to_vec())?;
    Ok(arrow::record_batch::RecordBatch::try_new(schema, columns)?)
}

/// Recall@k of `found` against brute force over `base` (tie-robust).
fn exact_recall(base: &[f32], dim: usize, metric: vectorflow::Metric, query: &[f32], found: &[(i64, f32)]) -> f64 {
    let mut query = query.to_vec();
    if metric == vectorflow::Metric::COSINE {
        vectorflow::crates::operators::distance::normalize(&mut query);
    }
    let mut all: Vec<f32> = base.chunks_exact(dim).map(|v| distance(metric, &query, v)).collect();
    all.sort_by(f32::total_cmp);
    let kth = all[K.min(all.len()) - 1];
    let hits = found
        .iter()
        .filter(|(id, _)| {
            *id >= 0 && distance(metric, &query, &base[*id as usize * dim..(*id as usize + 1) * dim]) <= kth + 1e-5
        })
        .count();
    hits as f64 / K as f64
}
