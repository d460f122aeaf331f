//! Scalar quantisation (SQ8) of a sealed segment's vectors, for the graph
//! walk.
//!
//! A graph search spends most of its time reading vectors: with `ef` 64 a
//! walk computes a few thousand distances, each over a whole vector, and at
//! 384 dimensions that is 24 cache lines of `f32` per distance. The walk
//! only has to rank candidates roughly, so it runs over one byte per
//! dimension (a quarter of the memory traffic) and the rows it ends with
//! are re-ranked with the exact `f32` distance (see
//! [`crate::index::SealedIndex`]). This is the SQ8 of Milvus's `HNSW_SQ`
//! with refinement and of Qdrant's scalar quantisation with rescoring.
//!
//! Each dimension `j` is mapped linearly from `[low_j, high_j]` (its range
//! over the segment) onto `0..=255`: `x_j ≈ low_j + step_j · c_j`. The
//! estimated inner product with a query `q` is then
//! `q·low + Σ (q_j step_j) c_j`: a weighted sum of the codes, with weights
//! and constant computed once per query. Squared L2 is
//! `|q|² − 2 q·x̂ + |x̂|²` with `|x̂|²`, the decoded row's squared norm,
//! kept per row, so every metric runs the same kernel.
//!
//! The codes are derived data: they are computed from the vectors when a
//! segment's graph is attached (built, repaired or loaded) and never stored.

use vectorflow_core::Metric;

use crate::distance::dot;

/// Lanes per step of the kernel (see [`crate::distance`]).
const LANES: usize = 16;

/// One byte per dimension per row, with the per-dimension mapping back.
#[derive(Debug, Clone, PartialEq)]
pub struct Quantized {
    dim: usize,
    metric: Metric,
    /// `low_j`: the smallest value of dimension `j`.
    low: Vec<f32>,
    /// `step_j`: the value one code unit stands for in dimension `j`.
    step: Vec<f32>,
    /// Row-major codes, `dim` per row.
    codes: Vec<u8>,
    /// Squared norm of each decoded row; L2 only (empty otherwise).
    norms: Vec<f32>,
}

/// A query prepared for [`Quantized::distance`].
pub struct QuantizedQuery {
    /// `bias + Σ weights_j c_j (+ |x̂|²)` is the estimated distance.
    bias: f32,
    weights: Vec<f32>,
}

impl Quantized {
    /// Quantises the row-major `vectors` (`dim` values per row).
    pub fn encode(vectors: &[f32], dim: usize, metric: Metric) -> Quantized {
        let dim = dim.max(1);
        let mut low = vec![f32::INFINITY; dim];
        let mut high = vec![f32::NEG_INFINITY; dim];
        for row in vectors.chunks_exact(dim) {
            for ((l, h), &x) in low.iter_mut().zip(high.iter_mut()).zip(row) {
                *l = l.min(x);
                *h = h.max(x);
            }
        }
        // A dimension without finite values (no rows) maps everything to 0.
        let step: Vec<f32> = low
            .iter()
            .zip(&high)
            .map(|(&l, &h)| if h > l && (h - l).is_finite() { (h - l) / 255.0 } else { 0.0 })
            .collect();
        for l in &mut low {
            if !l.is_finite() {
                *l = 0.0;
            }
        }
        let mut codes = Vec::with_capacity(vectors.len() / dim * dim);
        for row in vectors.chunks_exact(dim) {
            codes.extend(
                row.iter()
                    .zip(&low)
                    .zip(&step)
                    .map(|((&x, &l), &s)| if s > 0.0 { ((x - l) / s).round().clamp(0.0, 255.0) as u8 } else { 0 }),
            );
        }
        let mut quantized = Quantized { dim, metric, low, step, codes, norms: Vec::new() };
        if metric == Metric::L2 {
            let mut decoded = vec![0.0f32; dim];
            quantized.norms = (0..quantized.rows())
                .map(|row| {
                    quantized.decode_into(row, &mut decoded);
                    dot(&decoded, &decoded)
                })
                .collect();
        }
        quantized.codes.shrink_to_fit();
        quantized
    }

    pub fn rows(&self) -> usize {
        self.codes.len() / self.dim
    }

    /// Bytes held in memory.
    pub fn memory_bytes(&self) -> usize {
        self.codes.capacity() + 4 * (self.low.capacity() + self.step.capacity() + self.norms.capacity())
    }

    /// The weights and constant of `query`'s estimated distances.
    pub fn prepare(&self, query: &[f32]) -> QuantizedQuery {
        let at_low = dot(query, &self.low);
        let scaled = query.iter().zip(&self.step).map(|(q, s)| q * s);
        match self.metric {
            Metric::IP | Metric::COSINE => QuantizedQuery { bias: -at_low, weights: scaled.map(|w| -w).collect() },
            Metric::L2 => {
                QuantizedQuery { bias: dot(query, query) - 2.0 * at_low, weights: scaled.map(|w| -2.0 * w).collect() }
            }
        }
    }

    /// The estimated internal distance (see [`crate::distance::distance`])
    /// of `row` from the prepared query.
    #[inline]
    pub fn distance(&self, query: &QuantizedQuery, row: u32) -> f32 {
        let estimate = query.bias + weighted_sum(&query.weights, self.codes(row));
        match self.norms.get(row as usize) {
            Some(norm) => estimate + norm,
            None => estimate,
        }
    }

    /// Row `row`'s codes.
    #[inline]
    pub fn codes(&self, row: u32) -> &[u8] {
        let start = row as usize * self.dim;
        &self.codes[start..start + self.dim]
    }

    fn decode_into(&self, row: usize, out: &mut [f32]) {
        let codes = &self.codes[row * self.dim..(row + 1) * self.dim];
        for (((o, &c), &l), &s) in out.iter_mut().zip(codes).zip(&self.low).zip(&self.step) {
            *o = l + s * f32::from(c);
        }
    }
}

#[inline(always)]
fn weighted_sum_kernel<const FMA: bool>(weights: &[f32], codes: &[u8]) -> f32 {
    let mut acc = [0.0f32; LANES];
    let (cw, rw) = weights.as_chunks::<LANES>();
    let (cc, rc) = codes.as_chunks::<LANES>();
    for (w, c) in cw.iter().zip(cc) {
        for i in 0..LANES {
            let code = f32::from(c[i]);
            acc[i] = if FMA { code.mul_add(w[i], acc[i]) } else { acc[i] + code * w[i] };
        }
    }
    let tail: f32 = rw.iter().zip(rc).map(|(w, &c)| w * f32::from(c)).sum();
    acc.iter().sum::<f32>() + tail
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
fn weighted_sum_avx2(weights: &[f32], codes: &[u8]) -> f32 {
    weighted_sum_kernel::<true>(weights, codes)
}

/// `Σ weights_j · codes_j`.
#[inline]
fn weighted_sum(weights: &[f32], codes: &[u8]) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if crate::distance::has_avx2_fma() {
        // SAFETY: the CPU supports the features `weighted_sum_avx2` is compiled for.
        return unsafe { weighted_sum_avx2(weights, codes) };
    }
    weighted_sum_kernel::<false>(weights, codes)
}

#[cfg(test)]
mod tests {
    use rand::{Rng, SeedableRng};

    use super::*;
    use crate::distance::distance;

    fn random(rows: usize, dim: usize, seed: u64) -> Vec<f32> {
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        (0..rows * dim).map(|_| rng.random_range(-1.0f32..1.0)).collect()
    }

    #[test]
    fn estimates_are_close_to_the_exact_distances_for_every_metric() {
        let dim = 37;
        let vectors = random(200, dim, 1);
        let queries = random(5, dim, 2);
        for metric in [Metric::L2, Metric::IP, Metric::COSINE] {
            let quantized = Quantized::encode(&vectors, dim, metric);
            assert_eq!(quantized.rows(), 200);
            for query in queries.chunks_exact(dim) {
                let prepared = quantized.prepare(query);
                for (row, vector) in vectors.chunks_exact(dim).enumerate() {
                    let exact = distance(metric, query, vector);
                    let estimate = quantized.distance(&prepared, row as u32);
                    // At most half a code step (1/255 here) per dimension.
                    let tolerance = 0.05 + 0.01 * exact.abs();
                    assert!((exact - estimate).abs() < tolerance, "{metric:?} row {row}: {exact} vs {estimate}");
                }
            }
        }
    }

    #[test]
    fn constant_dimensions_and_empty_inputs_do_not_break_it() {
        let dim = 4;
        let vectors = vec![0.5, 1.0, -2.0, 0.0, 0.5, 3.0, -2.0, 0.0];
        let quantized = Quantized::encode(&vectors, dim, Metric::L2);
        let query = [0.5, 2.0, -2.0, 1.0];
        let prepared = quantized.prepare(&query);
        assert!((quantized.distance(&prepared, 0) - 2.0).abs() < 1e-3);
        assert!((quantized.distance(&prepared, 1) - 2.0).abs() < 1e-3);
        let empty = Quantized::encode(&[], dim, Metric::IP);
        assert_eq!(empty.rows(), 0);
        assert!(empty.prepare(&query).weights.iter().all(|w| w.is_finite()));
    }
}
