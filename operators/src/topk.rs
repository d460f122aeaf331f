//! Bounded top-k selection by distance (smaller is closer).

use serde::{Deserialize, Serialize};
use std::cmp::Ordering;
use std::collections::BinaryHeap;
use vectorflow_core::{Error, Metric, Result};

/// The distances a range search answers: `from <= distance < below`, in
/// the internal distance (smaller is closer; see [`crate::distance`]).
/// Milvus's `range_filter` is the inclusive end nearest the query, its
/// `radius` the exclusive far end.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct DistanceRange {
    pub from: f32,
    pub below: f32,
}

impl DistanceRange {
    /// Every distance: a plain top-k search.
    pub const ALL: DistanceRange = DistanceRange { from: f32::NEG_INFINITY, below: f32::INFINITY };

    #[inline]
    pub fn contains(&self, distance: f32) -> bool {
        distance >= self.from && distance < self.below
    }

    /// The range of a Milvus range search, in the metric's own scores:
    /// for L2 (squared distances) `range_filter <= d < radius`; for IP and
    /// COSINE (similarities) `radius < s <= range_filter`. `range_filter`
    /// needs a `radius`; neither gives [`DistanceRange::ALL`].
    pub fn of_scores(metric: Metric, radius: Option<f32>, range_filter: Option<f32>) -> Result<DistanceRange> {
        for (name, value) in [("radius", radius), ("range_filter", range_filter)] {
            if value.is_some_and(|v| !v.is_finite()) {
                return Err(Error::argument(name, "must be a finite number"));
            }
        }
        let Some(radius) = radius else {
            return match range_filter {
                Some(_) => Err(Error::argument("range_filter", "needs a radius (the range's far end)")),
                None => Ok(DistanceRange::ALL),
            };
        };
        match metric {
            Metric::L2 => {
                if let Some(near) = range_filter
                    && near >= radius
                {
                    return Err(Error::argument(
                        "range_filter",
                        format!("{near} must be below radius {radius} for L2 (range_filter <= distance < radius)"),
                    ));
                }
                Ok(DistanceRange { from: range_filter.unwrap_or(f32::NEG_INFINITY), below: radius })
            }
            Metric::IP | Metric::COSINE => {
                if let Some(near) = range_filter
                    && near <= radius
                {
                    return Err(Error::argument(
                        "range_filter",
                        format!(
                            "{near} must be above radius {radius} for {metric:?} (radius < similarity <= range_filter)"
                        ),
                    ));
                }
                // Internally a similarity s is the distance -s.
                Ok(DistanceRange { from: range_filter.map_or(f32::NEG_INFINITY, |near| -near), below: -radius })
            }
        }
    }
}

impl Default for DistanceRange {
    fn default() -> Self {
        DistanceRange::ALL
    }
}

/// What a search keeps: at most `k` rows, within `range`, found with a
/// graph walk of at least `ef` candidates.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SearchBounds {
    pub k: usize,
    pub ef: usize,
    pub range: DistanceRange,
}

impl SearchBounds {
    /// The `k` nearest rows, walking `ef` candidates.
    pub fn top(k: usize, ef: usize) -> SearchBounds {
        SearchBounds { k, ef, range: DistanceRange::ALL }
    }
}

/// A candidate row and its distance.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Candidate {
    pub distance: f32,
    /// Breaks distance ties deterministically (the key's [`Pk::order_key`](vectorflow_core::Pk::order_key)).
    pub tiebreak: u64,
    /// Position of the segment holding the row among those a read covers.
    pub segment: u64,
    pub row: u32,
}

impl Eq for Candidate {}

impl Ord for Candidate {
    fn cmp(&self, other: &Self) -> Ordering {
        self.distance
            .total_cmp(&other.distance)
            .then(self.tiebreak.cmp(&other.tiebreak))
            .then(self.segment.cmp(&other.segment))
            .then(self.row.cmp(&other.row))
    }
}

impl PartialOrd for Candidate {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

/// Keeps the `k` closest candidates pushed so far.
#[derive(Debug)]
pub struct TopK {
    k: usize,
    heap: BinaryHeap<Candidate>,
}

impl TopK {
    pub fn new(k: usize) -> Self {
        TopK { k, heap: BinaryHeap::with_capacity(k + 1) }
    }

    /// The distance a new candidate must beat, once the heap is full.
    #[inline]
    pub fn threshold(&self) -> f32 {
        if self.heap.len() < self.k { f32::INFINITY } else { self.heap.peek().map_or(f32::INFINITY, |c| c.distance) }
    }

    #[inline]
    pub fn push(&mut self, candidate: Candidate) {
        if self.k == 0 {
            return;
        }
        if self.heap.len() < self.k {
            self.heap.push(candidate);
        } else if let Some(mut top) = self.heap.peek_mut()
            && candidate < *top
        {
            *top = candidate;
        }
    }

    /// The kept candidates, closest first.
    pub fn into_sorted(self) -> Vec<Candidate> {
        self.heap.into_sorted_vec()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_range_follows_milvus_semantics_for_each_metric() {
        let l2 = DistanceRange::of_scores(Metric::L2, Some(2.0), Some(1.0)).unwrap();
        assert!(l2.contains(1.0) && l2.contains(1.5) && !l2.contains(2.0) && !l2.contains(0.5));
        // IP: 0.5 < s <= 0.9, so the distance -s lies in [-0.9, -0.5).
        let ip = DistanceRange::of_scores(Metric::IP, Some(0.5), Some(0.9)).unwrap();
        assert!(ip.contains(-0.9) && ip.contains(-0.6) && !ip.contains(-0.5) && !ip.contains(-0.95));
        let far_only = DistanceRange::of_scores(Metric::COSINE, Some(0.2), None).unwrap();
        assert!(far_only.contains(-1.0) && !far_only.contains(-0.2));
        assert_eq!(DistanceRange::of_scores(Metric::L2, None, None).unwrap(), DistanceRange::ALL);
        for (metric, radius, near) in
            [(Metric::L2, Some(1.0), Some(1.0)), (Metric::IP, Some(0.5), Some(0.4)), (Metric::L2, None, Some(1.0))]
        {
            let error = DistanceRange::of_scores(metric, radius, near).unwrap_err().to_string();
            assert!(error.contains("range_filter"), "{error}");
        }
        assert!(DistanceRange::of_scores(Metric::L2, Some(f32::NAN), None).unwrap_err().to_string().contains("radius"));
    }

    #[test]
    fn keeps_the_k_smallest_in_order() {
        let mut top = TopK::new(3);
        for (row, d) in [5.0, 1.0, 4.0, 2.0, 3.0, 0.5].into_iter().enumerate() {
            top.push(Candidate { distance: d, tiebreak: 0, segment: 0, row: row as u32 });
        }
        let rows: Vec<u32> = top.into_sorted().iter().map(|c| c.row).collect();
        assert_eq!(rows, vec![5, 1, 3]);
    }
}
