//! Building a sealed segment's HNSW graph with `hnsw_rs` (which then gets
//! frozen, see [`crate::frozen`]); also the raw `hnsw_rs` search the bench
//! compares against.
//!
//! `hnsw_rs` wants non-negative distances, so every metric is mapped to
//! squared L2 on transformed vectors: L2 as is, COSINE on the (already
//! normalised) vectors, IP through the usual MIPS-to-NN augmentation
//! `x -> [x, sqrt(M^2 - |x|^2)]`, `q -> [q, 0]`. Hits are re-scored with the
//! true metric by the caller.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Mutex, MutexGuard, PoisonError};

use anndists::dist::Distance;
use arrow::buffer::ScalarBuffer;
use hnsw_rs::hnsw::Hnsw;
use serde::{Deserialize, Serialize};
use vectorflow_core::{Error, Metric, Result};

use crate::distance::{distance, dot, l2_squared};
use crate::frozen::{FrozenGraph, prefetch};
use crate::quantized::Quantized;

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

/// What a build slot holds once the build has ended: the index, or `None`
/// when it failed (the segment then keeps answering exactly).
pub type IndexSlot = std::sync::OnceLock<Option<SealedIndex>>;

/// A sealed segment's index on one vector field: its frozen graph and the
/// SQ8 codes of its vectors, which the graph walk runs over (see
/// [`crate::quantized`]). Only the graph is stored; the codes are computed
/// from the vectors whenever an index is attached.
#[derive(Debug, Clone)]
pub struct SealedIndex {
    graph: FrozenGraph,
    codes: Quantized,
}

impl SealedIndex {
    /// The index of `graph` over the row-major `vectors` it was built on.
    pub fn new(graph: FrozenGraph, vectors: &[f32], dim: usize, metric: Metric) -> SealedIndex {
        SealedIndex { codes: Quantized::encode(vectors, dim, metric), graph }
    }

    pub fn graph(&self) -> &FrozenGraph {
        &self.graph
    }

    /// Bytes held in memory: the graph and the codes.
    pub fn memory_bytes(&self) -> usize {
        self.graph.memory_bytes() + self.codes.memory_bytes()
    }

    /// Up to `k` rows closest to `query`, nearest first, as in
    /// [`FrozenGraph::search`]: the walk ranks rows by their SQ8 estimates
    /// and its `ef` best are ranked again by their exact distance.
    #[allow(clippy::too_many_arguments)]
    pub fn search(
        &self,
        vectors: &[f32],
        dim: usize,
        metric: Metric,
        query: &[f32],
        k: usize,
        ef: usize,
        accept: Option<&dyn Fn(usize) -> bool>,
    ) -> Vec<(f32, u32)> {
        let rows = self.graph.rows();
        if k == 0 || vectors.len() < rows * dim || self.codes.rows() != rows {
            return self.graph.search(vectors, dim, metric, query, k, ef, accept);
        }
        let prepared = self.codes.prepare(query);
        let code_lines = dim.div_ceil(64);
        let walked = self.graph.walk(
            |row| self.codes.distance(&prepared, row),
            |row| prefetch(self.codes.codes(row), code_lines),
            ef.max(k),
            accept,
        );
        let mut exact: Vec<(f32, u32)> = walked
            .into_iter()
            .map(|(_, row)| (distance(metric, query, &vectors[row as usize * dim..(row as usize + 1) * dim]), row))
            .collect();
        exact.sort_unstable_by(|a, b| a.0.total_cmp(&b.0).then(a.1.cmp(&b.1)));
        exact.truncate(k);
        exact
    }
}

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
        search_graph(&self.hnsw, query, k, ef, filter)
    }
}

/// Up to `k` data ids near `query` in `hnsw` that pass `filter`.
fn search_graph(
    hnsw: &Hnsw<'static, f32, SquaredL2>,
    query: &[f32],
    k: usize,
    ef: usize,
    filter: Option<&dyn Fn(&usize) -> bool>,
) -> Vec<usize> {
    let ef = ef.max(k);
    let neighbours = match filter {
        Some(f) => {
            let f = |id: &usize| f(id);
            hnsw.search_filter(query, k, ef, Some(&f))
        }
        None => hnsw.search_filter(query, k, ef, None),
    };
    neighbours.into_iter().map(|n| n.d_id).collect()
}

/// Rows a growing segment's graph takes in one go: the rows below
/// [`GrowingIndex::indexed_rows`] (the ones searches find through the
/// graph) move on after each step.
const INSERT_STEP: usize = 256;

/// A growing segment's graph, built while its rows arrive: appended
/// chunks queue here and build-pool jobs insert them in row order, so the
/// rows below [`GrowingIndex::indexed_rows`] are in the graph and a search
/// scans only the rows after them. At seal the rest is inserted and the
/// graph frozen ([`GrowingIndex::finish`]): a segment's graph is built
/// once, starting while it grows. `hnsw_rs` inserts through `&self` and
/// locks each neighbour list on its own, so searches run during inserts.
/// L2 and COSINE only: IP's augmentation needs the largest norm of every
/// row before the first insert.
pub struct GrowingIndex {
    hnsw: Hnsw<'static, f32, SquaredL2>,
    dim: usize,
    /// Chunks not inserted yet: (first row, row-major vectors).
    queue: Mutex<VecDeque<(usize, ScalarBuffer<f32>)>>,
    /// Held by the one thread inserting, so rows go in in order.
    inserting: Mutex<()>,
    indexed: AtomicUsize,
    /// A job to insert the queue is queued or running.
    scheduled: AtomicBool,
}

impl std::fmt::Debug for GrowingIndex {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GrowingIndex").field("dim", &self.dim).field("indexed", &self.indexed_rows()).finish()
    }
}

/// A poisoned lock here still holds a consistent queue (each change is one push or pop).
fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

impl GrowingIndex {
    /// An empty graph for about `expected_rows` rows; `None` for IP.
    pub fn new(dim: usize, metric: Metric, expected_rows: usize, params: IndexParams) -> Option<GrowingIndex> {
        (metric != Metric::IP).then(|| GrowingIndex {
            hnsw: Hnsw::new(params.m, expected_rows.max(1), MAX_LAYERS, params.ef_construction, SquaredL2),
            dim,
            queue: Mutex::new(VecDeque::new()),
            inserting: Mutex::new(()),
            indexed: AtomicUsize::new(0),
            scheduled: AtomicBool::new(false),
        })
    }

    /// Rows `0..indexed_rows()` are in the graph.
    pub fn indexed_rows(&self) -> usize {
        self.indexed.load(Ordering::Acquire)
    }

    /// Queues rows `first..` (row-major `vectors`). Returns whether the
    /// caller must start a job running [`GrowingIndex::insert_queued`]
    /// (none is queued or running).
    pub fn push(&self, first: usize, vectors: ScalarBuffer<f32>) -> bool {
        lock(&self.queue).push_back((first, vectors));
        !self.scheduled.swap(true, Ordering::SeqCst)
    }

    /// Inserts queued chunks until about `budget` rows went in. Returns
    /// whether the job must run again (rows are still queued): a job
    /// yields its lane after its budget, so seal builds queued behind it
    /// run in between.
    pub fn insert_queued(&self, budget: usize) -> bool {
        let _one_inserter = lock(&self.inserting);
        let mut inserted = 0;
        while inserted < budget {
            let Some((first, vectors)) = lock(&self.queue).pop_front() else { break };
            let items: Vec<(&[f32], usize)> =
                vectors.chunks_exact(self.dim).enumerate().map(|(i, v)| (v, first + i)).collect();
            for step in items.chunks(INSERT_STEP) {
                self.hnsw.parallel_insert_slice(&step.to_vec());
                if let Some(&(_, last)) = step.last() {
                    self.indexed.store(last + 1, Ordering::Release);
                }
            }
            inserted += items.len();
        }
        if !lock(&self.queue).is_empty() {
            return true;
        }
        self.scheduled.store(false, Ordering::SeqCst);
        // A push between the look above and the store found `scheduled`
        // still set and left its chunk to this job.
        !lock(&self.queue).is_empty() && !self.scheduled.swap(true, Ordering::SeqCst)
    }

    /// Up to `k` rows near `query` among the indexed rows `filter` accepts.
    pub fn search(&self, query: &[f32], k: usize, ef: usize, filter: &dyn Fn(&usize) -> bool) -> Vec<usize> {
        search_graph(&self.hnsw, query, k, ef, Some(filter))
    }

    /// Inserts what is still queued and freezes the graph of `rows` rows.
    pub fn finish(&self, rows: usize) -> Result<FrozenGraph> {
        self.insert_queued(usize::MAX);
        let indexed = self.indexed_rows();
        if indexed != rows {
            return Err(Error::Internal(format!("the growing graph holds {indexed} of {rows} rows")));
        }
        FrozenGraph::freeze(&self.hnsw, rows)
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
    fn the_quantised_walk_finds_what_the_exact_walk_finds_and_answers_exact_distances() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(11);
        let (rows, dim, k, ef) = (3000, 48, 10, 64);
        for metric in [Metric::L2, Metric::IP, Metric::COSINE] {
            let mut vectors: Vec<f32> = (0..rows * dim).map(|_| rng.random_range(-1.0..1.0)).collect();
            if metric == Metric::COSINE {
                vectors.chunks_exact_mut(dim).for_each(crate::distance::normalize);
            }
            let graph = HnswIndex::build(&vectors, dim, metric, IndexParams::default()).freeze().unwrap();
            let index = SealedIndex::new(graph.clone(), &vectors, dim, metric);
            let (mut exact_walk_hits, mut quantised_hits) = (0, 0);
            for _ in 0..30 {
                let query: Vec<f32> = (0..dim).map(|_| rng.random_range(-1.0..1.0)).collect();
                let mut all: Vec<(f32, u32)> = vectors
                    .chunks_exact(dim)
                    .enumerate()
                    .map(|(r, v)| (distance(metric, &query, v), r as u32))
                    .collect();
                all.sort_by(|a, b| a.0.total_cmp(&b.0));
                let truth: Vec<u32> = all[..k].iter().map(|x| x.1).collect();
                let found = index.search(&vectors, dim, metric, &query, k, ef, None);
                assert_eq!(found.len(), k);
                for (d, row) in &found {
                    // Re-ranked: the distances are the exact ones, in order.
                    assert_eq!(*d, distance(metric, &query, &vectors[*row as usize * dim..(*row as usize + 1) * dim]));
                }
                assert!(found.windows(2).all(|w| w[0].0 <= w[1].0));
                quantised_hits += found.iter().filter(|x| truth.contains(&x.1)).count();
                let walked = graph.search(&vectors, dim, metric, &query, k, ef, None);
                exact_walk_hits += walked.iter().filter(|x| truth.contains(&x.1)).count();
                let odd = |row: usize| row % 2 == 1;
                let filtered = index.search(&vectors, dim, metric, &query, k, ef, Some(&odd));
                assert!(filtered.len() == k && filtered.iter().all(|x| x.1 % 2 == 1));
            }
            let total = 30 * k;
            // Uniform random data is HNSW's hardest case: an exact walk finds 0.95–0.99 here.
            assert!(quantised_hits as f64 >= 0.9 * total as f64, "{metric:?}: recall {quantised_hits}/{total}");
            assert!(
                quantised_hits + total / 50 >= exact_walk_hits,
                "{metric:?}: {quantised_hits} vs {exact_walk_hits}"
            );
        }
    }

    #[test]
    fn a_growing_graph_takes_its_rows_in_order_answers_while_it_grows_and_freezes() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(9);
        let (dim, chunk) = (16, 500);
        assert!(GrowingIndex::new(dim, Metric::IP, 100, IndexParams::default()).is_none(), "IP needs every norm first");
        let graph = GrowingIndex::new(dim, Metric::L2, 100, IndexParams::default()).unwrap();
        let vectors: Vec<f32> = (0..4 * chunk * dim).map(|_| rng.random_range(-1.0..1.0)).collect();
        let chunks: Vec<ScalarBuffer<f32>> =
            vectors.chunks(chunk * dim).map(|c| ScalarBuffer::from(c.to_vec())).collect();
        assert!(graph.push(0, chunks[0].clone()), "the first push starts a job");
        assert!(!graph.push(chunk, chunks[1].clone()), "one is queued already");
        assert!(graph.insert_queued(chunk), "a budget of one chunk leaves the second queued");
        assert_eq!(graph.indexed_rows(), chunk);
        // Indexed rows are found; the rest are not in the graph yet.
        let row = 123;
        let everything = |_: &usize| true;
        assert_eq!(graph.search(&vectors[row * dim..(row + 1) * dim], 1, 32, &everything), vec![row]);
        assert!(!graph.insert_queued(usize::MAX), "drained: the job ends");
        assert_eq!(graph.indexed_rows(), 2 * chunk);
        assert!(graph.push(2 * chunk, chunks[2].clone()), "no job runs: the push starts one");
        graph.push(3 * chunk, chunks[3].clone());
        let frozen = graph.finish(4 * chunk).unwrap();
        assert_eq!(frozen.rows(), 4 * chunk);
        assert!(graph.finish(4 * chunk + 1).is_err(), "a row the graph never got");
        let mut found = 0;
        for _ in 0..20 {
            let query: Vec<f32> = (0..dim).map(|_| rng.random_range(-1.0..1.0)).collect();
            let mut exact: Vec<(f32, u32)> = vectors
                .chunks_exact(dim)
                .enumerate()
                .map(|(r, v)| (distance(Metric::L2, &query, v), r as u32))
                .collect();
            exact.sort_by(|a, b| a.0.total_cmp(&b.0));
            let hits = frozen.search(&vectors, dim, Metric::L2, &query, 10, 64, None);
            found += hits.iter().filter(|(_, r)| exact[..10].iter().any(|e| e.1 == *r)).count();
        }
        assert!(found as f64 / 200.0 > 0.9, "recall {found}/200");
    }

    #[test]
    fn finds_true_neighbours_for_every_metric() {
        for metric in [Metric::L2, Metric::IP] {
            assert!(recall(metric) > 0.9, "{metric:?}");
        }
    }
}
