//! Which sealed segments of a shard to merge next: a pure function of
//! their sizes, in the spirit of tantivy's `LogMergePolicy`.
//!
//! Segments fall into tiers by their live rows: tier 0 up to `floor_rows`
//! (the seal size, and the tiny segments a checkpoint or flush seals),
//! tier `t` up to `floor_rows × merge_factor^t`. When a tier holds
//! `merge_factor` segments they merge into one of the next tier, never
//! past `max_segment_rows`. So a shard of `n` rows holds fewer than
//! `merge_factor` segments per tier and about `log_factor(n / floor)`
//! tiers, and each row is rewritten about that many times over its life.
//!
//! Once a shard is quiet (its segments have not changed for
//! `quiet_after`), a tier with two or more segments merges all of them that
//! fit, so data that stopped changing settles at about one segment per tier
//! (searches pay per segment: an HNSW search costs nearly the same on a
//! small graph as on a large one). Under a trickle of writes this merges
//! pairs, never a large segment with each new small one.
//!
//! Dead rows come first: a segment with more than `dead_fraction` of its
//! rows dead (no read inside the retention window can see them) is
//! rewritten, together with the other such segments while they fit, so
//! deletes and upserts give their memory back.

use std::time::Duration;

use serde::{Deserialize, Serialize};

/// What the policy needs to know of one sealed segment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SegmentSize {
    /// Rows held, dead or alive.
    pub rows: usize,
    /// Rows some read inside the retention window can still see.
    pub live: usize,
}

impl SegmentSize {
    fn dead(&self) -> usize {
        self.rows.saturating_sub(self.live)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct MergePolicy {
    /// Rewrite a segment when more than this fraction of its rows is dead.
    pub dead_fraction: f32,
    /// Live rows of the smallest tier (the seal size).
    pub floor_rows: usize,
    /// No merge makes a segment with more live rows than this.
    pub max_segment_rows: usize,
    /// Segments of one tier merged at once, and the size ratio of tiers.
    pub merge_factor: usize,
    /// A shard whose segments have not changed for this long is quiet.
    pub quiet_after: Duration,
}

impl Default for MergePolicy {
    fn default() -> Self {
        MergePolicy {
            dead_fraction: 0.2,
            floor_rows: 16_384,
            max_segment_rows: 1 << 20,
            merge_factor: 4,
            quiet_after: Duration::from_secs(5),
        }
    }
}

impl MergePolicy {
    /// The tier of a segment with `live` rows.
    pub fn tier(&self, live: usize) -> u32 {
        let factor = self.merge_factor.max(2);
        let mut bound = self.floor_rows.max(1);
        let mut tier = 0;
        while live > bound {
            bound = bound.saturating_mul(factor);
            tier += 1;
        }
        tier
    }

    /// The segments (positions in `segments`) to merge into one next, in
    /// ascending order; empty when nothing should be merged. `quiet`: the
    /// shard's segments have not changed for `quiet_after`.
    pub fn choose(&self, segments: &[SegmentSize], quiet: bool) -> Vec<usize> {
        let mut chosen = self.dead_heavy(segments);
        if chosen.is_empty() {
            chosen = self.full_tier(segments, quiet);
        }
        chosen.sort_unstable();
        chosen
    }

    /// [`MergePolicy::choose`] limited to rewrites of segments with dead
    /// rows: for a shard whose fresh segments still wait for their graph,
    /// where a tier merge (a fresh build of many rows) would compete with
    /// those builds and frees nothing.
    pub fn choose_rewrites(&self, segments: &[SegmentSize]) -> Vec<usize> {
        let mut chosen = self.dead_heavy(segments);
        chosen.sort_unstable();
        chosen
    }

    /// The segments with too many dead rows. Those that lost more than
    /// half go together, smallest first while their live rows fit one
    /// segment; failing those, the one with the most dead rows alone: a
    /// rewrite of a single segment that keeps most of its rows repairs the
    /// segment's graph instead of building a new one (see
    /// `FrozenGraph::without_dropped_rows`), which makes the rewrites that
    /// upserts cause cheap.
    fn dead_heavy(&self, segments: &[SegmentSize]) -> Vec<usize> {
        let heavy: Vec<usize> = (0..segments.len())
            .filter(|&i| {
                let s = segments[i];
                s.rows > 0 && s.dead() as f64 > f64::from(self.dead_fraction) * s.rows as f64
            })
            .collect();
        let (mut mostly_dead, mostly_live): (Vec<usize>, Vec<usize>) =
            heavy.into_iter().partition(|&i| segments[i].live * 2 < segments[i].rows);
        if mostly_dead.is_empty() {
            return mostly_live
                .into_iter()
                .max_by_key(|&i| (segments[i].dead(), std::cmp::Reverse(i)))
                .into_iter()
                .collect();
        }
        mostly_dead.sort_by_key(|&i| (segments[i].live, i));
        self.fitting(mostly_dead, segments, 1)
    }

    /// The lowest tier holding `merge_factor` segments (two when quiet):
    /// its smallest ones (up to `merge_factor`; all when quiet) that fit
    /// one segment, if at least two do.
    fn full_tier(&self, segments: &[SegmentSize], quiet: bool) -> Vec<usize> {
        let factor = self.merge_factor.max(2);
        let mut by_tier: std::collections::BTreeMap<u32, Vec<usize>> = std::collections::BTreeMap::new();
        for (i, s) in segments.iter().enumerate() {
            // A segment past half the maximum has nothing to merge with.
            if s.live.saturating_mul(2) <= self.max_segment_rows {
                by_tier.entry(self.tier(s.live)).or_default().push(i);
            }
        }
        for members in by_tier.into_values() {
            if members.len() < if quiet { 2 } else { factor } {
                continue;
            }
            let mut members = members;
            members.sort_by_key(|&i| (segments[i].live, i));
            if !quiet {
                members.truncate(factor);
            }
            let group = self.fitting(members, segments, 2);
            if !group.is_empty() {
                return group;
            }
        }
        Vec::new()
    }

    /// The longest prefix of `candidates` whose live rows fit one segment,
    /// if it has at least `at_least` members (a single candidate always
    /// fits when `at_least` is 1: a rewrite only shrinks it).
    fn fitting(&self, candidates: Vec<usize>, segments: &[SegmentSize], at_least: usize) -> Vec<usize> {
        let mut total = 0usize;
        let mut group = Vec::new();
        for i in candidates {
            let live = segments[i].live;
            if !group.is_empty() && total + live > self.max_segment_rows {
                break;
            }
            total += live;
            group.push(i);
        }
        if group.len() >= at_least { group } else { Vec::new() }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn policy() -> MergePolicy {
        MergePolicy {
            dead_fraction: 0.2,
            floor_rows: 100,
            max_segment_rows: 10_000,
            merge_factor: 4,
            ..Default::default()
        }
    }

    impl MergePolicy {
        fn choose_busy(&self, segments: &[SegmentSize]) -> Vec<usize> {
            self.choose(segments, false)
        }
    }

    #[test]
    fn a_quiet_shard_merges_every_tier_with_two_or_more_segments() {
        let p = policy();
        assert!(p.choose(&live(&[100, 90, 80]), false).is_empty());
        assert_eq!(p.choose(&live(&[100, 90, 80]), true), vec![0, 1, 2]);
        assert!(p.choose(&live(&[5000, 100]), true).is_empty(), "a large segment is not rewritten for a small one");
        assert_eq!(p.choose(&live(&[5000, 100, 60]), true), vec![1, 2]);
        // Bulk data settles at one segment per tier, then stays.
        let mut segments = vec![100; 30];
        loop {
            let chosen = p.choose(&live(&segments), true);
            if chosen.is_empty() {
                break;
            }
            let merged: usize = chosen.iter().map(|&i| segments[i]).sum();
            segments = segments.iter().enumerate().filter(|(i, _)| !chosen.contains(i)).map(|(_, &s)| s).collect();
            segments.push(merged);
        }
        let tiers: std::collections::HashSet<u32> = segments.iter().map(|&s| p.tier(s)).collect();
        assert_eq!(tiers.len(), segments.len(), "{segments:?}");
        assert_eq!(segments.iter().sum::<usize>(), 3000);
        assert!(segments.len() <= 2, "{segments:?}");
    }

    fn live(rows: &[usize]) -> Vec<SegmentSize> {
        rows.iter().map(|&r| SegmentSize { rows: r, live: r }).collect()
    }

    #[test]
    fn tiers_grow_by_the_merge_factor() {
        let p = policy();
        assert_eq!([0, 1, 100, 101, 400, 401, 1600, 1601].map(|n| p.tier(n)), [0, 0, 0, 1, 1, 2, 2, 3]);
    }

    #[test]
    fn a_tier_merges_once_it_holds_merge_factor_segments() {
        let p = policy();
        assert!(p.choose_busy(&live(&[100, 90, 80])).is_empty());
        assert_eq!(p.choose_busy(&live(&[100, 90, 80, 5])), vec![0, 1, 2, 3]);
        // Tiny segments (checkpoints of a few rows) share tier 0.
        assert_eq!(p.choose_busy(&live(&[3, 1, 2, 7, 350])), vec![0, 1, 2, 3]);
        // The lowest full tier goes first; its smallest members.
        assert_eq!(p.choose_busy(&live(&[300, 300, 300, 300, 50, 40, 30, 20, 10])), vec![5, 6, 7, 8]);
        assert_eq!(p.choose_busy(&live(&[50, 40, 30, 20, 10])), vec![1, 2, 3, 4]);
    }

    #[test]
    fn no_merge_passes_the_maximum_and_large_segments_stay() {
        let p = MergePolicy { max_segment_rows: 1000, ..policy() };
        // Tier 2 (401..=1600) segments past half the maximum are left alone.
        assert!(p.choose_busy(&live(&[600, 600, 600, 600])).is_empty());
        // Four of tier 1 would make 1,200: three fit.
        assert_eq!(p.choose_busy(&live(&[300, 300, 300, 300])), vec![0, 1, 2]);
    }

    #[test]
    fn dead_rows_are_rewritten_first() {
        let p = policy();
        let mut segments = live(&[100, 90, 80, 70]);
        segments.push(SegmentSize { rows: 5000, live: 1000 });
        assert_eq!(p.choose_busy(&segments), vec![4]);
        segments.push(SegmentSize { rows: 50, live: 10 });
        assert_eq!(p.choose_busy(&segments), vec![4, 5]);
        // An all-dead segment is rewritten (to nothing).
        assert_eq!(p.choose_busy(&[SegmentSize { rows: 10, live: 0 }]), vec![0]);
        // 20 % dead is not more than the fraction.
        assert!(p.choose_busy(&[SegmentSize { rows: 100, live: 80 }]).is_empty());
    }

    #[test]
    fn a_segment_that_keeps_most_of_its_rows_is_rewritten_alone() {
        let p = policy();
        let mostly_live = [
            SegmentSize { rows: 1000, live: 700 },
            SegmentSize { rows: 1000, live: 600 },
            SegmentSize { rows: 90, live: 90 },
        ];
        // Alone (its graph is repaired), the one with the most dead rows first.
        assert_eq!(p.choose_busy(&mostly_live), vec![1]);
        // Segments that lost more than half go first, together.
        let mut mixed = mostly_live.to_vec();
        mixed.push(SegmentSize { rows: 1000, live: 100 });
        mixed.push(SegmentSize { rows: 800, live: 300 });
        assert_eq!(p.choose_busy(&mixed), vec![3, 4]);
        // Rewrites only: a full tier is left alone.
        let tier = live(&[100, 90, 80, 70]);
        assert_eq!(p.choose_busy(&tier), vec![0, 1, 2, 3]);
        assert!(p.choose_rewrites(&tier).is_empty());
        assert_eq!(p.choose_rewrites(&mixed), vec![3, 4]);
    }

    /// Applies the policy until it settles, as a shard does.
    fn settle(p: &MergePolicy, mut segments: Vec<usize>) -> (Vec<usize>, usize) {
        let mut merges = 0;
        loop {
            let chosen = p.choose_busy(&live(&segments));
            if chosen.is_empty() {
                return (segments, merges);
            }
            assert!(chosen.len() >= 2, "a merge of live segments joins at least two");
            let merged: usize = chosen.iter().map(|&i| segments[i]).sum();
            assert!(merged <= p.max_segment_rows);
            segments = segments.iter().enumerate().filter(|(i, _)| !chosen.contains(i)).map(|(_, &s)| s).collect();
            segments.push(merged);
            merges += 1;
        }
    }

    proptest! {
        #[test]
        fn segments_per_shard_grow_like_the_log_of_the_rows(seals in 1usize..400, tiny in 0usize..50) {
            let p = policy();
            // Seals of `floor_rows` rows, interleaved with tiny checkpoint seals.
            let mut segments = Vec::new();
            for i in 0..seals + tiny {
                segments.push(if i % 9 == 8 && i / 9 < tiny { 3 } else { p.floor_rows });
                segments = settle(&p, segments).0;
            }
            let rows: usize = segments.iter().sum();
            let tiers = (1..).find(|&t| p.floor_rows * p.merge_factor.pow(t) >= p.max_segment_rows).unwrap() as usize + 1;
            let full = rows / p.max_segment_rows * 2 + 1;
            prop_assert!(segments.len() <= (p.merge_factor - 1) * tiers + full, "{segments:?}");
            prop_assert!(segments.iter().all(|&s| s <= p.max_segment_rows));
        }
    }
}
