//! `vectorflow bench --features`: range search and grouping search next to
//! plain top-k, on the same engine and queries, one client, each `ef`.
//!
//! The references are exact: each query's nearest rows by brute force,
//! scored as the engine scores (COSINE over normalised vectors), so a row
//! on a range's end is judged as the engine judges it. Range search
//! asks for similarities in (s₅₀, s₁₀] of each query's exact ranking (the
//! ten nearest rows are left out, about forty are in, `k` 100 does not cap
//! them); grouping asks for the 10 best groups of `group_field` with 3
//! hits each (strict). Recall is the share of the exact answer's rows (for
//! grouping, of its (group, row) pairs) that the engine returns.

use std::collections::HashMap;
use std::time::Instant;

use serde_json::json;
use vectorflow::crates::connectors::npy::Matrix;
use vectorflow::crates::operators::distance::{distance, normalize, score};
use vectorflow::{Consistency, Engine, GroupBy, Metric, Pk, SearchHit, SearchOptions};

use crate::bench::latency_summary;

/// Exact rows kept per query: enough for 10 full groups on the datasets
/// here (checked per query: a query whose groups these rows do not fill is
/// left out of the grouping recall, and counted).
const EXACT_DEPTH: usize = 2_000;
const RANGE_NEAR: usize = 10;
const RANGE_FAR: usize = 50;
const GROUPS: usize = 10;
const GROUP_SIZE: usize = 3;

/// One measured search kind at one `ef`.
pub struct FeaturePoint {
    pub kind: &'static str,
    pub ef: usize,
    pub qps: f64,
    pub recall: f64,
    pub p50_ms: f64,
    pub p99_ms: f64,
    /// Hits per query, on average.
    pub hits: f64,
}

impl FeaturePoint {
    pub fn json(&self) -> serde_json::Value {
        json!({"kind": self.kind, "ef": self.ef, "qps": self.qps, "recall": self.recall,
               "p50_ms": self.p50_ms, "p99_ms": self.p99_ms, "hits_per_query": self.hits})
    }
}

/// What a query's exact answers are, from its exact ranking.
struct Exact {
    top: Vec<i64>,
    /// The range's ends in the metric's scores, and the rows inside.
    radius: f32,
    range_filter: f32,
    in_range: Vec<i64>,
    /// (group, row) pairs of the exact grouping; `None` when the exact
    /// rows kept do not fill it.
    grouped: Option<Vec<(i64, i64)>>,
}

fn exact_answers(metric: Metric, base: &Matrix<f32>, query: &[f32], k: usize, groups: &[i64]) -> Exact {
    let mut query = query.to_vec();
    if metric == Metric::COSINE {
        normalize(&mut query);
    }
    // (row, score), best first, ties to the lower row.
    let mut ranked: Vec<(i64, f32)> =
        (0..base.rows).map(|row| (row as i64, score(metric, distance(metric, &query, base.row(row))))).collect();
    let better = |a: &(i64, f32), b: &(i64, f32)| match metric {
        Metric::L2 => a.1.total_cmp(&b.1),
        _ => b.1.total_cmp(&a.1),
    };
    let depth = EXACT_DEPTH.min(ranked.len());
    if depth < ranked.len() {
        ranked.select_nth_unstable_by(depth, |a, b| better(a, b).then(a.0.cmp(&b.0)));
        ranked.truncate(depth);
    }
    ranked.sort_by(|a, b| better(a, b).then(a.0.cmp(&b.0)));
    let score_at = |i: usize| ranked.get(i).map_or(f32::NAN, |r| r.1);
    let (radius, range_filter) = (score_at(RANGE_FAR - 1), score_at(RANGE_NEAR - 1));
    let inside = |s: f32| match metric {
        Metric::L2 => s >= range_filter && s < radius,
        _ => s > radius && s <= range_filter,
    };
    let mut members: HashMap<i64, usize> = HashMap::new();
    let mut grouped = Vec::new();
    for &(row, _) in &ranked {
        let group = groups[row as usize];
        let taken = members.len();
        let count = members.entry(group).or_insert_with(|| if taken < GROUPS { 0 } else { usize::MAX });
        if *count < GROUP_SIZE {
            *count += 1;
            grouped.push((group, row));
        }
    }
    let full = members.values().filter(|&&c| c == GROUP_SIZE).count() == GROUPS;
    Exact {
        top: ranked.iter().take(k).map(|r| r.0).collect(),
        radius,
        range_filter,
        in_range: ranked.iter().filter(|r| inside(r.1)).map(|r| r.0).collect(),
        grouped: full.then_some(grouped),
    }
}

fn key(hit: &SearchHit) -> i64 {
    if let Pk::Int(id) = hit.pk { id } else { -1 }
}

/// Measures plain top-k, range and grouping searches of `collection` (the
/// bench's, holding `base` row i under key i) for each query, at each `ef`.
#[allow(clippy::too_many_arguments)]
pub fn measure_features(
    engine: &Engine,
    collection: &str,
    metric: Metric,
    base: &Matrix<f32>,
    queries: &[Vec<f32>],
    group_field: &str,
    groups: &[i64],
    efs: &[usize],
    k: usize,
) -> anyhow::Result<Vec<FeaturePoint>> {
    let started = Instant::now();
    // The vectors as the engine holds them.
    let mut stored = base.clone();
    if metric == Metric::COSINE {
        stored.data.chunks_exact_mut(stored.cols.max(1)).for_each(normalize);
    }
    let base = &stored;
    let exact: Vec<Exact> = std::thread::scope(|scope| {
        let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
        let chunk = queries.len().div_ceil(threads).max(1);
        let handles: Vec<_> = queries
            .chunks(chunk)
            .map(|part| {
                scope.spawn(move || {
                    part.iter().map(|q| exact_answers(metric, base, q, k, groups)).collect::<Vec<Exact>>()
                })
            })
            .collect();
        handles.into_iter().flat_map(|h| h.join().unwrap_or_default()).collect::<Vec<Exact>>()
    });
    anyhow::ensure!(exact.len() == queries.len(), "an exact-answer thread failed");
    let unfilled = exact.iter().filter(|e| e.grouped.is_none()).count();
    println!(
        "features: exact answers of {} queries in {:.1}s ({unfilled} with groups the nearest {EXACT_DEPTH} rows do not fill)",
        queries.len(),
        started.elapsed().as_secs_f64()
    );
    let mut points = Vec::new();
    for &ef in efs {
        for kind in ["top-k", "range", "grouping"] {
            let mut latencies = Vec::with_capacity(queries.len());
            let (mut found, mut expected, mut hits, mut judged) = (0usize, 0usize, 0usize, 0usize);
            let run = Instant::now();
            for (query, exact) in queries.iter().zip(&exact) {
                let base_options =
                    SearchOptions { ef: Some(ef), consistency: Consistency::Bounded, ..SearchOptions::new(k) };
                let options = match kind {
                    "top-k" => base_options,
                    "range" => SearchOptions {
                        radius: Some(exact.radius),
                        range_filter: Some(exact.range_filter),
                        ..SearchOptions { k: 100, ..base_options }
                    },
                    _ => SearchOptions {
                        group_by: Some(GroupBy { field: group_field.to_string(), size: GROUP_SIZE, strict: true }),
                        ..SearchOptions { k: GROUPS, ..base_options }
                    },
                };
                let t = Instant::now();
                let result = engine.search(collection, std::slice::from_ref(query), &options)?;
                latencies.push(t.elapsed().as_secs_f64() * 1e3);
                let answer = &result.hits[0];
                hits += answer.len();
                match kind {
                    "top-k" => {
                        found += answer.iter().filter(|h| exact.top.contains(&key(h))).count();
                        expected += exact.top.len();
                    }
                    "range" => {
                        found += answer.iter().filter(|h| exact.in_range.contains(&key(h))).count();
                        expected += exact.in_range.len();
                    }
                    _ => {
                        let Some(grouped) = &exact.grouped else { continue };
                        judged += 1;
                        let pair = |h: &SearchHit| Some((*groups.get(usize::try_from(key(h)).ok()?)?, key(h)));
                        found += answer.iter().filter(|h| pair(h).is_some_and(|p| grouped.contains(&p))).count();
                        expected += grouped.len();
                    }
                }
            }
            let (qps, p50_ms, p99_ms) = latency_summary(latencies, run.elapsed().as_secs_f64());
            let point = FeaturePoint {
                kind,
                ef,
                qps,
                recall: found as f64 / expected.max(1) as f64,
                p50_ms,
                p99_ms,
                hits: hits as f64 / queries.len() as f64,
            };
            println!(
                "features {kind} ef {ef}: {:.0} QPS, recall {:.3}, p50 {:.3} ms, p99 {:.3} ms, {:.1} hits/query{}",
                point.qps,
                point.recall,
                point.p50_ms,
                point.p99_ms,
                point.hits,
                if kind == "grouping" { format!(" ({judged} queries judged)") } else { String::new() }
            );
            points.push(point);
        }
    }
    Ok(points)
}
