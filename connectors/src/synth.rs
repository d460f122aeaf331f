//! Synthetic datasets in the layout of `shared/datasets/README.md`
//! (`vectorflow dataset synth`): clustered unit vectors, integer attributes
//! with filters passing about 10 % and 1 % of the rows, and exact ground
//! truths, so benchmarks can run at sizes and dimensions the real datasets
//! do not have.
//!
//! Everything is a function of the [`SynthSpec`] (seed included): the random
//! streams are cut into fixed chunks, each with its own generator, so the
//! output does not depend on how many threads drew it.

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use arrow::array::{ArrayRef, Int32Array};
use arrow::datatypes::{DataType as ArrowType, Field, Schema};
use arrow::record_batch::RecordBatch;
use half::f16;
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use vectorflow_core::{Error, Metric, Result};

use crate::dataset::{self, Dataset, DatasetInfo, GroundTruthInfo, Nearest, Scored, truth_scores};
use crate::npy;

/// What to generate.
#[derive(Debug, Clone, PartialEq)]
pub struct SynthSpec {
    /// Base rows (ids `0..rows`).
    pub rows: usize,
    pub dim: usize,
    pub queries: usize,
    /// Neighbours listed per query in each ground truth.
    pub k: usize,
    /// Cluster centres the vectors are drawn around.
    pub clusters: usize,
    /// Dimensions of the subspace each cluster spreads in (`None`: all of
    /// them, isotropic noise). See [`LATENT_RESIDUAL`].
    pub latent_dim: Option<usize>,
    pub seed: u64,
}

impl SynthSpec {
    pub const DEFAULT_QUERIES: usize = 1000;
    pub const DEFAULT_K: usize = 100;
    pub const DEFAULT_CLUSTERS: usize = 100;
    pub const DEFAULT_SEED: u64 = 42;

    /// `rows` x `dim` with the defaults above (those of `vectorflow dataset synth`).
    pub fn new(rows: usize, dim: usize) -> SynthSpec {
        SynthSpec {
            rows,
            dim,
            queries: Self::DEFAULT_QUERIES,
            k: Self::DEFAULT_K,
            clusters: Self::DEFAULT_CLUSTERS,
            latent_dim: None,
            seed: Self::DEFAULT_SEED,
        }
    }

    fn validate(&self) -> Result<()> {
        // Ids are int32 in the attribute and ground-truth files.
        let max_rows = i32::MAX as usize;
        let checks = [
            (self.rows >= 1 && self.rows <= max_rows, "rows", format!("must be 1 to {max_rows}")),
            (self.dim >= 1, "dim", "must be at least 1".to_string()),
            (self.queries >= 1 && self.queries <= max_rows, "queries", format!("must be 1 to {max_rows}")),
            (self.k >= 1 && self.k <= self.rows, "k", format!("must be 1 to rows ({})", self.rows)),
            (self.clusters >= 1, "clusters", "must be at least 1".to_string()),
            (
                self.latent_dim.is_none_or(|latent| latent >= 1 && latent <= self.dim),
                "latent_dim",
                format!("must be 1 to dim ({})", self.dim),
            ),
        ];
        if let Some((_, argument, problem)) = checks.into_iter().find(|(ok, _, _)| !ok) {
            return Err(Error::argument(argument, problem));
        }
        for (argument, count) in [("rows", self.rows), ("queries", self.queries)] {
            if count.checked_mul(self.dim).and_then(|n| n.checked_mul(4)).is_none() {
                return Err(Error::argument(argument, format!("{count} x {} vectors do not fit in memory", self.dim)));
            }
        }
        Ok(())
    }
}

/// Noise around a cluster centre, as the expected norm of the noise vector
/// relative to the (unit) centre: points sit at cosine ~0.8 from their
/// centre and ~0.64 from each other, well apart from other clusters, so the
/// neighbourhoods are neither trivial nor uniform noise.
const NOISE: f64 = 0.75;

/// With a latent dimension, the share of the noise's energy that is still
/// isotropic (the rest lies in the cluster's own subspace). Real embeddings
/// are not exactly on a low-dimensional manifold, and without some
/// isotropic noise neighbours would tie far more than in real data.
///
/// Why the option exists: a graph index's cost at a fixed recall grows with
/// the rows much faster on data of high local intrinsic dimension. Isotropic
/// noise in 128 dimensions measures about 47 (Levina-Bickel, 20 neighbours),
/// the real `pypi-100k` embeddings about 22, and a latent dimension of 24
/// with this residual about 19 (`examples/hnswlib/intrinsic_dim.py`).
pub const LATENT_RESIDUAL: f64 = 0.1;

/// Rows drawn per generator; fixed so the output is independent of threads.
const DRAW_CHUNK: usize = 4096;

/// Queries per pass over the base vectors in the ground-truth computation.
const QUERY_CHUNK: usize = 64;

/// Bytes of base vectors scored against a query chunk at a time (stays in L2).
const BLOCK_BYTES: usize = 256 * 1024;

/// Months of the `month` attribute: 2007-01 to 2026-12, uniformly.
const MONTHS: i32 = 240;
const FIRST_YEAR: i32 = 2007;

/// `filter10` passes the last 24 of the 240 months (about 10 %).
const FILTER10: &str = "month >= 202501";

/// The generator streams (one per kind of draw).
#[derive(Clone, Copy)]
enum Stream {
    Centres = 1,
    Base = 2,
    Queries = 3,
    BaseRank = 4,
    QueryRank = 5,
    Subspaces = 6,
}

/// A generator for chunk `chunk` of `stream`, decorrelated from every other
/// (splitmix64 finaliser over the three inputs).
fn generator(seed: u64, stream: Stream, chunk: usize) -> StdRng {
    let mut z =
        seed ^ (stream as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ (chunk as u64).wrapping_mul(0xD1B5_4A32_D192_ED03);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    StdRng::seed_from_u64(z ^ (z >> 31))
}

/// Standard normal draws (Box-Muller: two per pair of uniforms).
struct Gaussian {
    spare: Option<f64>,
}

impl Gaussian {
    fn new() -> Gaussian {
        Gaussian { spare: None }
    }

    fn draw(&mut self, rng: &mut StdRng) -> f64 {
        if let Some(z) = self.spare.take() {
            return z;
        }
        // 1 - u is in (0, 1], so the logarithm is finite.
        let radius = (-2.0 * (1.0 - rng.random::<f64>()).ln()).sqrt();
        let angle = std::f64::consts::TAU * rng.random::<f64>();
        self.spare = Some(radius * angle.sin());
        radius * angle.cos()
    }
}

/// Scales `v` to unit length and rounds it to f16 (the stored format),
/// keeping the widened values: the ground truth is computed from exactly
/// what `base.npy` holds.
fn normalise_to_f16(v: &mut [f64], out: &mut [f32]) {
    let norm = v.iter().map(|x| x * x).sum::<f64>().sqrt();
    let scale = if norm > 0.0 { 1.0 / norm } else { 0.0 };
    for (o, x) in out.iter_mut().zip(v.iter()) {
        *o = f16::from_f64(x * scale).to_f32();
    }
}

fn threads() -> usize {
    std::thread::available_parallelism().map_or(1, std::num::NonZero::get)
}

/// `count` points: each picks a centre uniformly, adds gaussian noise and is
/// normalised. Returns the vectors (rounded through f16), each point's
/// cluster and its `month` attribute.
fn draw_points(
    spec: &SynthSpec,
    centres: &[f32],
    subspaces: Option<&Subspaces>,
    count: usize,
    stream: Stream,
) -> (Vec<f32>, Vec<i32>, Vec<i32>) {
    let dim = spec.dim;
    // Each coordinate's share of the noise, so its expected norm is NOISE.
    let isotropic_share = if subspaces.is_some() { LATENT_RESIDUAL } else { 1.0 };
    // (`sqrt(1.0)` is exactly 1: isotropic datasets come out bit for bit as before.)
    let sigma = NOISE / (dim as f64).sqrt() * isotropic_share.sqrt();
    let mut vectors = vec![0.0f32; count * dim];
    let mut clusters = vec![0i32; count];
    let mut months = vec![0i32; count];
    let work = std::sync::Mutex::new(
        vectors
            .chunks_mut(DRAW_CHUNK * dim)
            .zip(clusters.chunks_mut(DRAW_CHUNK))
            .zip(months.chunks_mut(DRAW_CHUNK))
            .enumerate(),
    );
    // The guard goes into the closure and drops there: the lock is held only
    // to take a chunk. A poisoned lock means another drawer panicked; the
    // scope re-raises that.
    let next_chunk = || work.lock().ok().and_then(|mut chunks| chunks.next());
    std::thread::scope(|scope| {
        for _ in 0..threads() {
            scope.spawn(|| {
                let mut point = vec![0.0f64; dim];
                while let Some((chunk, ((vectors, clusters), months))) = next_chunk() {
                    let mut rng = generator(spec.seed, stream, chunk);
                    let mut gaussian = Gaussian::new();
                    for ((out, cluster), month) in
                        vectors.chunks_exact_mut(dim).zip(clusters.iter_mut()).zip(months.iter_mut())
                    {
                        let c = rng.random_range(0..spec.clusters);
                        let centre = &centres[c * dim..(c + 1) * dim];
                        for (p, x) in point.iter_mut().zip(centre) {
                            *p = f64::from(*x) + sigma * gaussian.draw(&mut rng);
                        }
                        if let Some(subspaces) = subspaces {
                            subspaces.spread(c, &mut point, &mut gaussian, &mut rng);
                        }
                        normalise_to_f16(&mut point, out);
                        *cluster = c as i32;
                        let m = rng.random_range(0..MONTHS);
                        *month = (FIRST_YEAR + m / 12) * 100 + m % 12 + 1;
                    }
                }
            });
        }
    });
    (vectors, clusters, months)
}

/// Per cluster, `latent` directions (gaussian, so nearly orthogonal and of
/// about unit length) its points spread along.
struct Subspaces {
    latent: usize,
    dim: usize,
    /// `clusters x latent x dim`.
    directions: Vec<f64>,
    /// Standard deviation along each direction, so the latent part of the
    /// noise has expected norm `NOISE * sqrt(1 - LATENT_RESIDUAL)`.
    sigma: f64,
}

impl Subspaces {
    fn draw(spec: &SynthSpec, latent: usize) -> Subspaces {
        let dim = spec.dim;
        let mut rng = generator(spec.seed, Stream::Subspaces, 0);
        let mut gaussian = Gaussian::new();
        let scale = 1.0 / (dim as f64).sqrt();
        let directions = (0..spec.clusters * latent * dim).map(|_| scale * gaussian.draw(&mut rng)).collect();
        let sigma = NOISE * ((1.0 - LATENT_RESIDUAL) / latent as f64).sqrt();
        Subspaces { latent, dim, directions, sigma }
    }

    /// Adds a gaussian point of cluster `cluster`'s subspace to `point`.
    fn spread(&self, cluster: usize, point: &mut [f64], gaussian: &mut Gaussian, rng: &mut StdRng) {
        let size = self.latent * self.dim;
        let directions = &self.directions[cluster * size..(cluster + 1) * size];
        for direction in directions.chunks_exact(self.dim) {
            let weight = self.sigma * gaussian.draw(rng);
            point.iter_mut().zip(direction).for_each(|(p, d)| *p += weight * d);
        }
    }
}

/// Ranks `1..=count` in random order (every row ranked, like the download
/// ranks of the real datasets, so a rank range passes an exact share).
fn ranks(seed: u64, count: usize, stream: Stream) -> Vec<i32> {
    let mut ranks: Vec<i32> = (1..=count as i32).collect();
    ranks.shuffle(&mut generator(seed, stream, 0));
    ranks
}

fn attributes(clusters: Vec<i32>, months: Vec<i32>, ranks: Vec<i32>) -> Result<RecordBatch> {
    let columns: Vec<(&str, Vec<i32>)> =
        vec![("id", (0..clusters.len() as i32).collect()), ("cluster", clusters), ("month", months), ("rank", ranks)];
    let schema =
        Schema::new(columns.iter().map(|(name, _)| Field::new(*name, ArrowType::Int32, false)).collect::<Vec<_>>());
    let arrays: Vec<ArrayRef> = columns.into_iter().map(|(_, v)| Arc::new(Int32Array::from(v)) as ArrayRef).collect();
    Ok(RecordBatch::try_new(Arc::new(schema), arrays)?)
}

/// One ground truth to compute: its name, filter expression and passing rows (`None` = all).
struct Filter {
    name: &'static str,
    expression: Option<String>,
    passing: Option<Vec<bool>>,
}

/// Exact top-`k` of every query for every filter, by [`truth_scores`]:
/// query chunks are spread over the cores, each chunk streams the base set
/// once in cache-sized blocks and keeps one bounded heap per query and filter
/// (no query x row score matrix). Returns per filter (ids, scores), `queries x k`,
/// padded with id -1 and score -inf where a filter passes fewer than `k` rows.
fn ground_truths(
    metric: Metric,
    base: &[f32],
    queries: &[f32],
    dim: usize,
    k: usize,
    filters: &[Filter],
) -> Vec<(Vec<i32>, Vec<f32>)> {
    let n = base.len() / dim;
    let n_queries = queries.len() / dim;
    let chunks = n_queries.div_ceil(QUERY_CHUNK);
    let block = (BLOCK_BYTES / (dim * 4)).max(1);
    let next = AtomicUsize::new(0);
    let done: Vec<(usize, Vec<Vec<Vec<Scored>>>)> = std::thread::scope(|scope| {
        let workers: Vec<_> = (0..threads().min(chunks))
            .map(|_| {
                scope.spawn(|| {
                    let mut done = Vec::new();
                    loop {
                        let chunk = next.fetch_add(1, Ordering::Relaxed);
                        if chunk >= chunks {
                            break done;
                        }
                        let first = chunk * QUERY_CHUNK;
                        let last = (first + QUERY_CHUNK).min(n_queries);
                        let mut nearest: Vec<Vec<Nearest>> =
                            (first..last).map(|_| filters.iter().map(|_| Nearest::new(k)).collect()).collect();
                        let mut scores = vec![0.0f32; block];
                        for start in (0..n).step_by(block) {
                            let rows = start..(start + block).min(n);
                            let scores = &mut scores[..rows.len()];
                            for (q, heaps) in (first..last).zip(nearest.iter_mut()) {
                                let query = &queries[q * dim..(q + 1) * dim];
                                truth_scores(metric, query, &base[rows.start * dim..rows.end * dim], scores);
                                for (row, &score) in rows.clone().zip(scores.iter()) {
                                    for (heap, filter) in heaps.iter_mut().zip(filters) {
                                        if filter.passing.as_ref().is_none_or(|p| p[row]) {
                                            heap.push(Scored::new(metric, score, row as u32));
                                        }
                                    }
                                }
                            }
                        }
                        let sorted = nearest
                            .into_iter()
                            .map(|heaps| heaps.into_iter().map(Nearest::into_sorted).collect())
                            .collect();
                        done.push((chunk, sorted));
                    }
                })
            })
            .collect();
        // A panicking worker is a bug here, not bad input: re-raise it.
        workers.into_iter().flat_map(|w| w.join().unwrap_or_else(|panic| std::panic::resume_unwind(panic))).collect()
    });
    let padding = if metric.larger_is_closer() { f32::NEG_INFINITY } else { f32::INFINITY };
    let mut out: Vec<(Vec<i32>, Vec<f32>)> =
        filters.iter().map(|_| (vec![-1; n_queries * k], vec![padding; n_queries * k])).collect();
    for (chunk, per_query) in done {
        for (offset, per_filter) in per_query.into_iter().enumerate() {
            let q = chunk * QUERY_CHUNK + offset;
            for ((ids, scores), found) in out.iter_mut().zip(per_filter) {
                for (i, scored) in found.into_iter().enumerate() {
                    ids[q * k + i] = scored.row as i32;
                    scores[q * k + i] = scored.score;
                }
            }
        }
    }
    out
}

/// Writes a synthetic dataset for `spec` into `out` (created if missing;
/// files of the same names are replaced) and opens it.
///
/// Files: `base.npy`, `queries.npy` (f16 unit vectors), `base_attrs.parquet`,
/// `query_attrs.parquet` (int32 `id`, `cluster`, `month` yyyymm, `rank`),
/// `filters.json` and the ground truths `unfiltered`, `filter10`
/// (`month >= 202501`, ~10 %) and `filter1` (`rank >= 1 AND rank <= rows/100`,
/// 1 %), each `gt_<name>_{ids,dists}.npy` (metric COSINE: inner products of
/// the stored vectors, as [`truth_score`](crate::dataset::truth_score) computes them).
pub fn synthesize(out: &Path, spec: &SynthSpec) -> Result<Dataset> {
    spec.validate()?;
    let (dim, metric) = (spec.dim, Metric::COSINE);
    std::fs::create_dir_all(out)?;

    // Centres: isotropic gaussian directions, i.e. uniform on the sphere.
    let mut centres = vec![0.0f32; spec.clusters * dim];
    let mut rng = generator(spec.seed, Stream::Centres, 0);
    let mut gaussian = Gaussian::new();
    let mut point = vec![0.0f64; dim];
    for centre in centres.chunks_exact_mut(dim) {
        point.iter_mut().for_each(|p| *p = gaussian.draw(&mut rng));
        let norm = point.iter().map(|x| x * x).sum::<f64>().sqrt().max(f64::MIN_POSITIVE);
        centre.iter_mut().zip(&point).for_each(|(c, p)| *c = (p / norm) as f32);
    }

    tracing::info!(rows = spec.rows, dim, "drawing base vectors");
    let subspaces = spec.latent_dim.map(|latent| Subspaces::draw(spec, latent));
    let (base, base_clusters, base_months) = draw_points(spec, &centres, subspaces.as_ref(), spec.rows, Stream::Base);
    let (queries, query_clusters, query_months) =
        draw_points(spec, &centres, subspaces.as_ref(), spec.queries, Stream::Queries);
    let base_ranks = ranks(spec.seed, spec.rows, Stream::BaseRank);
    let query_ranks = ranks(spec.seed, spec.queries, Stream::QueryRank);

    // 1 % of the ranks (at least one row), so `filter1` passes exactly that many rows.
    let top_ranks = (spec.rows / 100).max(1) as i32;
    let filters = [
        Filter { name: "unfiltered", expression: None, passing: None },
        Filter {
            name: "filter10",
            expression: Some(FILTER10.to_string()),
            passing: Some(base_months.iter().map(|&m| m >= 202501).collect()),
        },
        Filter {
            name: "filter1",
            expression: Some(format!("rank >= 1 AND rank <= {top_ranks}")),
            passing: Some(base_ranks.iter().map(|&r| (1..=top_ranks).contains(&r)).collect()),
        },
    ];

    npy::write_f16(&out.join("base.npy"), spec.rows, dim, &base)?;
    npy::write_f16(&out.join("queries.npy"), spec.queries, dim, &queries)?;
    dataset::write_parquet(&out.join("base_attrs.parquet"), &attributes(base_clusters, base_months, base_ranks)?)?;
    dataset::write_parquet(&out.join("query_attrs.parquet"), &attributes(query_clusters, query_months, query_ranks)?)?;

    tracing::info!(queries = spec.queries, k = spec.k, "computing exact ground truths");
    let truths = ground_truths(metric, &base, &queries, dim, spec.k, &filters);
    let mut ground_truth = std::collections::BTreeMap::new();
    for (filter, (ids, scores)) in filters.iter().zip(truths) {
        let ids_file = format!("gt_{}_ids.npy", filter.name);
        let dists_file = format!("gt_{}_dists.npy", filter.name);
        npy::write_i32(&out.join(&ids_file), spec.queries, spec.k, &ids)?;
        npy::write_f32(&out.join(&dists_file), spec.queries, spec.k, &scores)?;
        let passing_rows = filter.passing.as_ref().map_or(spec.rows, |p| p.iter().filter(|&&x| x).count());
        let selectivity = (passing_rows as f64 / spec.rows as f64 * 1e4).round() / 1e4;
        ground_truth.insert(
            filter.name.to_string(),
            GroundTruthInfo {
                expression: filter.expression.clone(),
                passing_rows: Some(passing_rows),
                selectivity: Some(selectivity),
                ids_file,
                dists_file,
            },
        );
    }
    let info = DatasetInfo {
        n_base: spec.rows,
        n_queries: spec.queries,
        dim,
        k: spec.k,
        metric: "COSINE (vectors are L2-normalised before the float16 rounding, so inner product = cosine \
                 similarity; larger is closer)"
            .to_string(),
        ground_truth,
    };
    let mut json = serde_json::to_value(&info).map_err(Error::storage)?;
    if let Some(object) = json.as_object_mut() {
        // Extra keys, ignored by the reader: the format note the real datasets carry, and how to redo this one.
        object.insert("vector_dtype".into(), "float16 (widen to float32 on load)".into());
        object.insert(
            "synthetic".into(),
            serde_json::json!({
                "seed": spec.seed,
                "clusters": spec.clusters,
                "noise": NOISE,
                "latent_dim": spec.latent_dim,
                "latent_residual": spec.latent_dim.map(|_| LATENT_RESIDUAL),
                "padding": "ground-truth rows of filters passing fewer than k rows end in id -1, score -inf",
            }),
        );
    }
    let text = serde_json::to_string_pretty(&json).map_err(Error::storage)?;
    std::fs::write(out.join("filters.json"), text)?;
    Dataset::open(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dataset::truth_score;

    fn small() -> SynthSpec {
        SynthSpec { rows: 1500, dim: 12, queries: 70, k: 20, clusters: 8, latent_dim: None, seed: 7 }
    }

    #[test]
    fn the_same_seed_writes_the_same_files_and_another_seed_does_not() {
        let (a, b, c) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        synthesize(a.path(), &small()).unwrap();
        synthesize(b.path(), &small()).unwrap();
        synthesize(c.path(), &SynthSpec { seed: 8, ..small() }).unwrap();
        for file in ["base.npy", "queries.npy", "gt_unfiltered_ids.npy", "gt_filter1_dists.npy", "base_attrs.parquet"] {
            let read = |dir: &tempfile::TempDir| std::fs::read(dir.path().join(file)).unwrap();
            assert_eq!(read(&a), read(&b), "{file} differs between two runs with one seed");
            assert_ne!(read(&a), read(&c), "{file} is the same under another seed");
        }
    }

    #[test]
    fn padding_where_a_filter_passes_fewer_than_k_rows() {
        // 1,500 rows: filter1 passes 15 rows, fewer than k = 20.
        let dir = tempfile::tempdir().unwrap();
        let dataset = synthesize(dir.path(), &small()).unwrap();
        let truth = dataset.ground_truth("filter1").unwrap().unwrap();
        for q in 0..truth.ids.rows {
            assert!(truth.ids.row(q)[..15].iter().all(|&id| id >= 0));
            assert!(truth.ids.row(q)[15..].iter().all(|&id| id == -1));
            assert!(truth.dists.row(q)[15..].iter().all(|&d| d == f32::NEG_INFINITY));
        }
    }

    /// Levina-Bickel estimate of the local intrinsic dimension (median over
    /// the first `sample` points, from their `neighbours` nearest by cosine).
    fn intrinsic_dimension(vectors: &[f32], dim: usize, sample: usize, neighbours: usize) -> f64 {
        let rows: Vec<&[f32]> = vectors.chunks_exact(dim).collect();
        let mut estimates: Vec<f64> = rows[..sample]
            .iter()
            .enumerate()
            .map(|(i, a)| {
                let mut distances: Vec<f64> = rows
                    .iter()
                    .enumerate()
                    .filter(|&(j, _)| j != i)
                    .map(|(_, b)| (2.0 - 2.0 * f64::from(truth_score(Metric::COSINE, a, b))).max(1e-12).sqrt())
                    .collect();
                distances.sort_by(f64::total_cmp);
                let far = distances[neighbours - 1];
                let logs: f64 = distances[..neighbours - 1].iter().map(|d| (far / d).ln()).sum();
                (neighbours - 1) as f64 / logs
            })
            .collect();
        estimates.sort_by(f64::total_cmp);
        estimates[sample / 2]
    }

    #[test]
    fn a_latent_dimension_lowers_the_intrinsic_dimension_and_keeps_the_spread() {
        let spec = SynthSpec { rows: 3000, dim: 64, queries: 10, k: 10, clusters: 4, latent_dim: None, seed: 3 };
        let isotropic_dir = tempfile::tempdir().unwrap();
        let latent_dir = tempfile::tempdir().unwrap();
        let isotropic = synthesize(isotropic_dir.path(), &spec).unwrap();
        let latent = synthesize(latent_dir.path(), &SynthSpec { latent_dim: Some(4), ..spec.clone() }).unwrap();
        let (isotropic, latent) = (isotropic.base_vectors().unwrap(), latent.base_vectors().unwrap());
        let isotropic_lid = intrinsic_dimension(&isotropic.data, 64, 200, 20);
        let latent_lid = intrinsic_dimension(&latent.data, 64, 200, 20);
        // The latent points still sit on the unit sphere around 4 centres in
        // 64 dimensions, but locally they fill far fewer of them.
        assert!(isotropic_lid > 20.0, "isotropic noise in 64 dimensions: {isotropic_lid:.1}");
        assert!(latent_lid < 0.5 * isotropic_lid, "latent 4: {latent_lid:.1} against {isotropic_lid:.1}");
        // Same spread around the centres: the mean cosine to the cluster's
        // mean is about the same (noise of the same expected norm).
        let spread = |vectors: &[f32]| {
            let rows: Vec<&[f32]> = vectors.chunks_exact(64).collect();
            let mean: Vec<f32> = (0..64).map(|d| rows.iter().map(|r| r[d]).sum::<f32>() / rows.len() as f32).collect();
            let norm = mean.iter().map(|x| x * x).sum::<f32>().sqrt();
            rows.iter().map(|r| r.iter().zip(&mean).map(|(x, m)| x * m).sum::<f32>() / norm).sum::<f32>()
                / rows.len() as f32
        };
        let (a, b) = (spread(&isotropic.data), spread(&latent.data));
        assert!((a - b).abs() < 0.05, "mean cosine to the centroid: isotropic {a:.3}, latent {b:.3}");
    }

    #[test]
    fn bad_specs_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        for spec in [
            SynthSpec { rows: 0, ..small() },
            SynthSpec { dim: 0, ..small() },
            SynthSpec { queries: 0, ..small() },
            SynthSpec { k: 0, ..small() },
            SynthSpec { k: 1501, ..small() },
            SynthSpec { clusters: 0, ..small() },
            SynthSpec { latent_dim: Some(0), ..small() },
            SynthSpec { latent_dim: Some(13), ..small() },
            SynthSpec { rows: usize::MAX / 2, ..small() },
            SynthSpec { dim: usize::MAX / 1000, ..small() },
        ] {
            assert!(matches!(synthesize(dir.path(), &spec), Err(Error::InvalidArgument { .. })), "{spec:?}");
        }
    }
}
