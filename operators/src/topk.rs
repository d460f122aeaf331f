//! Bounded top-k selection by distance (smaller is closer).

use std::cmp::Ordering;
use std::collections::BinaryHeap;

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
    fn keeps_the_k_smallest_in_order() {
        let mut top = TopK::new(3);
        for (row, d) in [5.0, 1.0, 4.0, 2.0, 3.0, 0.5].into_iter().enumerate() {
            top.push(Candidate { distance: d, tiebreak: 0, segment: 0, row: row as u32 });
        }
        let rows: Vec<u32> = top.into_sorted().iter().map(|c| c.row).collect();
        assert_eq!(rows, vec![5, 1, 3]);
    }
}
