//! Distances over `f32` slices, written so the compiler vectorises them.
//!
//! Internally every metric is a distance where smaller is closer; users see
//! the metric's own score ([`score`]).

use vectorflow_core::Metric;

/// Lanes per step: two 8-wide registers, so additions of consecutive steps overlap.
const LANES: usize = 16;

/// Dot product kernel; with `FMA` the multiply-adds fuse (only call it so
/// from code compiled with the `fma` target feature, where it is one instruction).
#[inline(always)]
fn dot_kernel<const FMA: bool>(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0.0f32; LANES];
    let (ca, ra) = a.as_chunks::<LANES>();
    let (cb, rb) = b.as_chunks::<LANES>();
    for (x, y) in ca.iter().zip(cb) {
        for i in 0..LANES {
            acc[i] = if FMA { x[i].mul_add(y[i], acc[i]) } else { acc[i] + x[i] * y[i] };
        }
    }
    let tail: f32 = ra.iter().zip(rb).map(|(x, y)| x * y).sum();
    acc.iter().sum::<f32>() + tail
}

/// Squared Euclidean distance kernel; see [`dot_kernel`].
#[inline(always)]
fn l2_kernel<const FMA: bool>(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0.0f32; LANES];
    let (ca, ra) = a.as_chunks::<LANES>();
    let (cb, rb) = b.as_chunks::<LANES>();
    for (x, y) in ca.iter().zip(cb) {
        for i in 0..LANES {
            let d = x[i] - y[i];
            acc[i] = if FMA { d.mul_add(d, acc[i]) } else { acc[i] + d * d };
        }
    }
    let tail: f32 = ra.iter().zip(rb).map(|(x, y)| (x - y) * (x - y)).sum();
    acc.iter().sum::<f32>() + tail
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
fn dot_avx2(a: &[f32], b: &[f32]) -> f32 {
    dot_kernel::<true>(a, b)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
fn l2_avx2(a: &[f32], b: &[f32]) -> f32 {
    l2_kernel::<true>(a, b)
}

/// Whether this CPU has AVX2 and FMA (checked once, then a cached load).
#[cfg(target_arch = "x86_64")]
#[inline]
pub(crate) fn has_avx2_fma() -> bool {
    std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
}

/// Dot product.
#[inline]
pub fn dot(a: &[f32], b: &[f32]) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if has_avx2_fma() {
        // SAFETY: the CPU supports the features `dot_avx2` is compiled for.
        return unsafe { dot_avx2(a, b) };
    }
    dot_kernel::<false>(a, b)
}

/// Squared Euclidean distance.
#[inline]
pub fn l2_squared(a: &[f32], b: &[f32]) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if has_avx2_fma() {
        // SAFETY: the CPU supports the features `l2_avx2` is compiled for.
        return unsafe { l2_avx2(a, b) };
    }
    l2_kernel::<false>(a, b)
}

/// The internal distance (smaller is closer) of `metric`. COSINE vectors are
/// stored normalised and queries are normalised before search, so COSINE is
/// the negated dot product like IP.
#[inline]
pub fn distance(metric: Metric, a: &[f32], b: &[f32]) -> f32 {
    match metric {
        Metric::L2 => l2_squared(a, b),
        Metric::IP | Metric::COSINE => -dot(a, b),
    }
}

/// The score a user sees for an internal distance: squared L2 for L2, the
/// inner product for IP, the cosine similarity for COSINE.
pub fn score(metric: Metric, distance: f32) -> f32 {
    match metric {
        Metric::L2 => distance,
        Metric::IP | Metric::COSINE => -distance,
    }
}

/// Normalises in place; a zero vector stays zero.
pub fn normalize(v: &mut [f32]) {
    let norm = dot(v, v).sqrt();
    if norm > 0.0 {
        v.iter_mut().for_each(|x| *x /= norm);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_naive_on_odd_lengths() {
        let a: Vec<f32> = (0..19).map(|i| i as f32 * 0.5).collect();
        let b: Vec<f32> = (0..19).map(|i| 3.0 - i as f32).collect();
        let naive_dot: f32 = a.iter().zip(&b).map(|(x, y)| x * y).sum();
        let naive_l2: f32 = a.iter().zip(&b).map(|(x, y)| (x - y) * (x - y)).sum();
        assert!((dot(&a, &b) - naive_dot).abs() < 1e-3);
        assert!((l2_squared(&a, &b) - naive_l2).abs() < 1e-3);
        assert_eq!(score(Metric::IP, distance(Metric::IP, &a, &b)), dot(&a, &b));
        // The portable kernels, whatever this CPU dispatches to.
        assert!((dot_kernel::<false>(&a, &b) - naive_dot).abs() < 1e-3);
        assert!((l2_kernel::<false>(&a, &b) - naive_l2).abs() < 1e-3);
        let long: Vec<f32> = (0..389).map(|i| (i as f32 * 0.37).sin()).collect();
        let other: Vec<f32> = (0..389).map(|i| (i as f32 * 0.11).cos()).collect();
        let naive: f32 = long.iter().zip(&other).map(|(x, y)| x * y).sum();
        assert!((dot(&long, &other) - naive).abs() < 1e-3);
    }
}
