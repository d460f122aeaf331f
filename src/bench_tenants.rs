//! `vectorflow bench --tenants N`: the dataset's rows in two more
//! collections, row `i` belonging to tenant `i mod N`: one with `tenant` as
//! its partition key (16 partitions), one with `tenant` a plain field. Each
//! query searches one tenant's rows (`tenant == t`) in both, one client,
//! at each `ef`; recall is against exact search over that tenant's rows.

use std::time::{Duration, Instant};

use serde_json::json;
use vectorflow::crates::connectors::npy::Matrix;
use vectorflow::crates::operators::distance::{distance, normalize};
use vectorflow::{CollectionSchema, Consistency, DataType, Engine, FieldSchema, Metric, Pk, SearchOptions, row};

use crate::bench::latency_summary;

const KEYED: &str = "tenants_by_key";
const PLAIN: &str = "tenants_by_filter";
const KEY_PARTITIONS: usize = 16;

pub struct TenantPoint {
    pub layout: &'static str,
    pub ef: usize,
    pub qps: f64,
    pub recall: f64,
    pub p50_ms: f64,
    pub p99_ms: f64,
    /// Partitions a tenant's search reads, of the collection's.
    pub partitions_read: usize,
    pub partitions: usize,
}

impl TenantPoint {
    pub fn json(&self) -> serde_json::Value {
        json!({"layout": self.layout, "ef": self.ef, "qps": self.qps, "recall": self.recall,
               "p50_ms": self.p50_ms, "p99_ms": self.p99_ms, "partitions_read": self.partitions_read,
               "partitions": self.partitions})
    }
}

fn schema(name: &str, dim: usize, metric: Metric, keyed: bool) -> CollectionSchema {
    let tenant = FieldSchema::new("tenant", DataType::Int64);
    let mut schema = CollectionSchema::new(
        name,
        vec![
            FieldSchema::int64_primary("id", false),
            FieldSchema::vector("v", dim, metric),
            if keyed { tenant.partition_key() } else { tenant },
        ],
    );
    if keyed {
        schema.num_partitions = Some(KEY_PARTITIONS);
    }
    schema
}

#[allow(clippy::too_many_arguments)]
pub fn measure_tenants(
    engine: &Engine,
    metric: Metric,
    base: &Matrix<f32>,
    queries: &[Vec<f32>],
    tenants: usize,
    efs: &[usize],
    k: usize,
) -> anyhow::Result<Vec<TenantPoint>> {
    anyhow::ensure!(tenants >= 1, "--tenants must be at least 1");
    let started = Instant::now();
    for (name, keyed) in [(KEYED, true), (PLAIN, false)] {
        engine.create_collection(schema(name, base.cols, metric, keyed))?;
        for start in (0..base.rows).step_by(1000) {
            let rows: Vec<_> = (start..(start + 1000).min(base.rows))
                .map(|i| {
                    row([
                        ("id", (i as i64).into()),
                        ("v", base.row(i).to_vec().into()),
                        ("tenant", ((i % tenants) as i64).into()),
                    ])
                })
                .collect();
            engine.insert_rows(name, &rows)?;
        }
        engine.wait_for_indexes(name, Duration::from_secs(3600))?;
        engine.wait_for_merges(name, Duration::from_secs(3600))?;
        // Persisted now, so no checkpoint writes segments while searches are timed.
        engine.flush(name)?;
    }
    println!(
        "tenants: {} rows of {tenants} tenants in `{KEYED}` (partition key, {KEY_PARTITIONS} partitions) and \
         `{PLAIN}` (plain field), indexed in {:.1}s",
        base.rows,
        started.elapsed().as_secs_f64()
    );
    // The stored vectors as the engine holds them, for the exact answers.
    let mut stored = base.clone();
    if metric == Metric::COSINE {
        stored.data.chunks_exact_mut(stored.cols.max(1)).for_each(normalize);
    }
    let exact: Vec<Vec<i64>> = queries
        .iter()
        .enumerate()
        .map(|(q, query)| {
            let mut query = query.clone();
            if metric == Metric::COSINE {
                normalize(&mut query);
            }
            let tenant = q % tenants;
            let mut rows: Vec<(f32, i64)> = (tenant..stored.rows)
                .step_by(tenants)
                .map(|i| (distance(metric, &query, stored.row(i)), i as i64))
                .collect();
            rows.sort_by(|a, b| a.0.total_cmp(&b.0).then(a.1.cmp(&b.1)));
            rows.into_iter().take(k).map(|r| r.1).collect()
        })
        .collect();
    // One unmeasured pass: each tenant's filter is compiled once per
    // collection (and per partition), then served from the filter caches.
    for name in [KEYED, PLAIN] {
        for (q, query) in queries.iter().enumerate() {
            let options = SearchOptions { filter: Some(format!("tenant == {}", q % tenants)), ..SearchOptions::new(k) };
            engine.search(name, std::slice::from_ref(query), &options)?;
        }
    }
    let mut points = Vec::new();
    for &ef in efs {
        for (layout, name) in [("partition key", KEYED), ("plain filter", PLAIN)] {
            let partitions_read = engine.read_partitions(name, Some("tenant == 0"))?.len();
            let partitions = engine.list_partitions(name)?.len();
            let mut latencies = Vec::with_capacity(queries.len());
            let (mut found, mut expected) = (0usize, 0usize);
            let run = Instant::now();
            for (q, query) in queries.iter().enumerate() {
                let options = SearchOptions {
                    ef: Some(ef),
                    filter: Some(format!("tenant == {}", q % tenants)),
                    consistency: Consistency::Bounded,
                    ..SearchOptions::new(k)
                };
                let t = Instant::now();
                let result = engine.search(name, std::slice::from_ref(query), &options)?;
                latencies.push(t.elapsed().as_secs_f64() * 1e3);
                found +=
                    result.hits[0].iter().filter(|h| matches!(h.pk, Pk::Int(id) if exact[q].contains(&id))).count();
                expected += exact[q].len();
            }
            let (qps, p50_ms, p99_ms) = latency_summary(latencies, run.elapsed().as_secs_f64());
            let point = TenantPoint {
                layout,
                ef,
                qps,
                recall: found as f64 / expected.max(1) as f64,
                p50_ms,
                p99_ms,
                partitions_read,
                partitions,
            };
            println!(
                "tenants {layout} ef {ef}: {:.0} QPS, recall {:.3}, p50 {:.3} ms, p99 {:.3} ms, {} of {} partitions read",
                point.qps, point.recall, point.p50_ms, point.p99_ms, point.partitions_read, point.partitions
            );
            points.push(point);
        }
    }
    for name in [KEYED, PLAIN] {
        engine.drop_collection(name)?;
    }
    Ok(points)
}
