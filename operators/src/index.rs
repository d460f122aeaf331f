//! Building a sealed segment's HNSW graph with `hnsw_rs` (which then gets
//! frozen, see [`crate::frozen`]); also the raw `hnsw_rs` search the bench
//! compares against.
//!
//! `hnsw_rs` wants non-negative distances, so every metric is mapped to
//! squared L2 on transformed vectors: L2 as is, COSINE on the (already
//! normalised) vectors, IP through the usual MIPS-to-NN augmentation
//! `x -> [x, sqrt(M^2 - |x|^2)]`, `q -> [q, 0]`. Hits are re-scored with the
//! true metric by the caller.

use anndists::dist::Distance;
use hnsw_rs::hnsw::Hnsw;
use serde::{Deserialize, Serialize};
use vectorflow_core::{Metric, Result};

use crate::distance::{dot, l2_squared};
use crate::frozen::FrozenGraph;

/// HNSW build parameters.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct IndexParams {
    /// Links per node (M).
    pub m: usize,
    pub ef_construction: usize,
}

impl Default for IndexParams {
    fn default() -> Self {
        IndexParams { m: 16, ef_construction: 200 }
    }
}

/// Layers `hnsw_rs` may build (its own maximum).
const MAX_LAYERS: usize = 16;

/// Squared L2, clamped at zero against rounding.
#[derive(Debug, Default, Clone, Copy)]
pub struct SquaredL2;

impl Distance<f32> for SquaredL2 {
    fn eval(&self, a: &[f32], b: &[f32]) -> f32 {
        l2_squared(a, b).max(0.0)
    }
}

/// What a build slot holds once the build has ended: the frozen graph, or
/// `None` when it failed (the segment then keeps answering exactly).
pub type IndexSlot = std::sync::OnceLock<Option<FrozenGraph>>;

/// An `hnsw_rs` graph over the rows of one segment; data ids are row numbers.
pub struct HnswIndex {
    hnsw: Hnsw<'static, f32, SquaredL2>,
    metric: Metric,
    rows: usize,
}

impl std::fmt::Debug for HnswIndex {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HnswIndex").field("metric", &self.metric).field("rows", &self.rows).finish()
    }
}

impl HnswIndex {
    /// Builds the graph over row-major `vectors` (in parallel on rayon's pool).
    pub fn build(vectors: &[f32], dim: usize, metric: Metric, params: IndexParams) -> HnswIndex {
        let rows = vectors.len().checked_div(dim).unwrap_or(0);
        let hnsw = Hnsw::new(params.m, rows.max(1), MAX_LAYERS, params.ef_construction, SquaredL2);
        let data: Vec<Vec<f32>> = match metric {
            Metric::L2 | Metric::COSINE => vectors.chunks_exact(dim).map(<[f32]>::to_vec).collect(),
            Metric::IP => {
                let max_norm_sq = vectors.chunks_exact(dim).map(|v| dot(v, v)).fold(0.0f32, f32::max);
                vectors
                    .chunks_exact(dim)
                    .map(|v| {
                        let mut x = v.to_vec();
                        x.push((max_norm_sq - dot(v, v)).max(0.0).sqrt());
                        x
                    })
                    .collect()
            }
        };
        let items: Vec<(&[f32], usize)> = data.iter().enumerate().map(|(row, v)| (v.as_slice(), row)).collect();
        hnsw.parallel_insert_slice(&items);
        let mut hnsw = hnsw;
        hnsw.set_searching_mode(true);
        HnswIndex { hnsw, metric, rows }
    }

    pub fn rows(&self) -> usize {
        self.rows
    }

    pub fn metric(&self) -> Metric {
        self.metric
    }

    /// The graph in the compact read-only layout sealed segments search.
    pub fn freeze(&self) -> Result<FrozenGraph> {
        FrozenGraph::freeze(&self.hnsw, self.rows)
    }

    /// Up to `k` rows near `query` that pass `filter`, in no particular order of the true metric.
    pub fn search(&self, query: &[f32], k: usize, ef: usize, filter: Option<&dyn Fn(&usize) -> bool>) -> Vec<usize> {
        let augmented;
        let query = match self.metric {
            Metric::IP => {
                let mut q = query.to_vec();
                q.push(0.0);
                augmented = q;
                augmented.as_slice()
            }
            _ => query,
        };
        let ef = ef.max(k);
        let neighbours = match filter {
            Some(f) => {
                let f = |id: &usize| f(id);
                self.hnsw.search_filter(query, k, ef, Some(&f))
            }
            None => self.hnsw.search_filter(query, k, ef, None),
        };
        neighbours.into_iter().map(|n| n.d_id).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::distance::distance;
    use rand::{Rng, SeedableRng};

    fn recall(metric: Metric) -> f64 {
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        let (rows, dim, k) = (2000, 16, 10);
        let vectors: Vec<f32> = (0..rows * dim).map(|_| rng.random_range(-1.0..1.0)).collect();
        let index = HnswIndex::build(&vectors, dim, metric, IndexParams::default());
        let mut hits = 0;
        for q in 0..20 {
            let query: Vec<f32> = (0..dim).map(|_| rng.random_range(-1.0..1.0)).collect();
            let mut exact: Vec<(f32, usize)> =
                vectors.chunks_exact(dim).enumerate().map(|(r, v)| (distance(metric, &query, v), r)).collect();
            exact.sort_by(|a, b| a.0.total_cmp(&b.0));
            let truth: Vec<usize> = exact[..k].iter().map(|x| x.1).collect();
            let found = index.search(&query, k, 64, None);
            hits += found.iter().filter(|r| truth.contains(r)).count();
            let only_even = |id: &usize| id.is_multiple_of(2);
            assert!(index.search(&query, k, 64, Some(&only_even)).iter().all(|r| r.is_multiple_of(2)), "query {q}");
        }
        hits as f64 / (20 * k) as f64
    }

    #[test]
    fn finds_true_neighbours_for_every_metric() {
        for metric in [Metric::L2, Metric::IP] {
            assert!(recall(metric) > 0.9, "{metric:?}");
        }
    }
}
