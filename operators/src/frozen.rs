//! A sealed segment's HNSW graph, frozen for search.
//!
//! `hnsw_rs` builds the graph; once built it is converted into this compact
//! read-only layout and the `hnsw_rs` structure is dropped. Per layer the
//! neighbour lists are `u32` row numbers in one contiguous array with an
//! offset per node (compressed sparse rows); layer 0 covers every row,
//! the upper layers only the rows that reach them (sorted, found by binary
//! search: the descent through them takes a handful of steps). The vectors
//! are not part of the graph: a search reads the segment's own contiguous
//! vector column, so a vector is held once in memory and once on disk.
//!
//! The search is the standard HNSW one: a greedy descent through the upper
//! layers, then a best-first beam of width `ef` on layer 0. It differs from
//! `hnsw_rs`'s in three ways, each for recall or speed:
//! - the descent moves greedily until no neighbour is closer on each layer
//!   (`hnsw_rs` looks at the pivot's neighbours once per layer);
//! - rows a filter rejects are walked through but never enter the answer,
//!   and the beam keeps going until it holds `ef` accepted rows (as
//!   hnswlib does), where `hnsw_rs` may stop with fewer;
//! - the visited set is a generation-stamped array per thread instead of a
//!   hash map, and the next nodes' vectors are prefetched.
//!
//! File layout (all integers little-endian `u32`):
//! `"VFHNSW\0\0"`, format version, rows, entry row, layer count `L`;
//! layer 0: `rows + 1` offsets, then the neighbours; each layer `1..L`:
//! its row count `n`, its `n` rows (ascending), `n + 1` offsets, the
//! neighbours; last the CRC-32 of everything before it.

use std::cell::RefCell;
use std::cmp::{Ordering, Reverse};
use std::collections::BinaryHeap;

use hnsw_rs::hnsw::Hnsw;
use vectorflow_core::{Error, Metric, Result};

use crate::distance::distance;

const MAGIC: &[u8; 8] = b"VFHNSW\0\0";
const FORMAT_VERSION: u32 = 1;
/// Layers a file may declare; `hnsw_rs` builds at most 16.
const MAX_LAYERS: u32 = 64;
/// Cache lines of an `f32` vector prefetched before it is measured: the
/// first two cover 32 values, enough for the kernel to start while the
/// hardware prefetcher streams the rest in.
const F32_PREFETCH_LINES: usize = 2;

/// Neighbour lists of the nodes of one layer, in node order.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
struct Adjacency {
    /// `offsets[i]..offsets[i + 1]` indexes node `i`'s neighbours.
    offsets: Vec<u32>,
    neighbours: Vec<u32>,
}

impl Adjacency {
    fn from_lists(lists: impl IntoIterator<Item = Vec<u32>>) -> Adjacency {
        let mut adjacency = Adjacency { offsets: vec![0], neighbours: Vec::new() };
        for list in lists {
            adjacency.neighbours.extend(list);
            adjacency.offsets.push(adjacency.neighbours.len() as u32);
        }
        // Built by doubling; frozen, it never grows again.
        adjacency.neighbours.shrink_to_fit();
        adjacency.offsets.shrink_to_fit();
        adjacency
    }

    #[inline]
    fn of(&self, node: usize) -> &[u32] {
        &self.neighbours[self.offsets[node] as usize..self.offsets[node + 1] as usize]
    }

    fn nodes(&self) -> usize {
        self.offsets.len() - 1
    }

    /// Bytes held (capacity, not length: what the heap gave it).
    fn bytes(&self) -> usize {
        4 * (self.offsets.capacity() + self.neighbours.capacity())
    }
}

/// A layer above 0: the rows on it and their neighbour lists.
#[derive(Debug, Clone, PartialEq, Eq)]
struct UpperLayer {
    rows: Vec<u32>,
    links: Adjacency,
}

impl UpperLayer {
    #[inline]
    fn neighbours(&self, row: u32) -> &[u32] {
        match self.rows.binary_search(&row) {
            Ok(node) => self.links.of(node),
            Err(_) => &[],
        }
    }
}

/// A read-only HNSW graph over the rows `0..rows` of one segment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FrozenGraph {
    rows: u32,
    entry: u32,
    base: Adjacency,
    /// Layers 1, 2, … in order.
    upper: Vec<UpperLayer>,
}

impl FrozenGraph {
    /// Freezes a graph `hnsw_rs` built with row numbers `0..rows` as data ids.
    pub fn freeze<D: anndists::dist::Distance<f32> + Send + Sync>(
        hnsw: &Hnsw<'_, f32, D>,
        rows: usize,
    ) -> Result<FrozenGraph> {
        let broken = |problem: String| Error::Internal(format!("freezing an HNSW graph: {problem}"));
        let row_count = u32::try_from(rows).map_err(|_| broken(format!("{rows} rows do not fit a u32")))?;
        let mut levels = vec![0u8; rows];
        // Per row, its neighbour lists on layers 0..=level.
        let mut lists: Vec<Vec<Vec<u32>>> = vec![Vec::new(); rows];
        let mut seen = 0usize;
        for point in hnsw.get_point_indexation() {
            let row = point.get_origin_id();
            if row >= rows {
                return Err(broken(format!("data id {row} outside 0..{rows}")));
            }
            let level = point.get_point_id().0;
            levels[row] = level;
            lists[row] = point
                .get_neighborhood_id()
                .into_iter()
                .take(usize::from(level) + 1)
                .map(|layer| layer.into_iter().map(|n| n.d_id as u32).filter(|&n| n < row_count).collect())
                .collect();
            seen += 1;
        }
        if seen != rows {
            return Err(broken(format!("{seen} points for {rows} rows")));
        }
        let top = hnsw.get_max_level_observed();
        let entry = hnsw
            .get_point_indexation()
            .get_layer_iterator(usize::from(top))
            .next()
            .map(|p| p.get_origin_id() as u32)
            .unwrap_or(0);
        let base = Adjacency::from_lists(
            lists.iter_mut().map(|l| if l.is_empty() { Vec::new() } else { std::mem::take(&mut l[0]) }),
        );
        let upper = (1..=usize::from(top))
            .map(|layer| {
                let on_layer: Vec<u32> = (0..row_count).filter(|&r| usize::from(levels[r as usize]) >= layer).collect();
                let links = Adjacency::from_lists(
                    on_layer.iter().map(|&r| lists[r as usize].get_mut(layer).map(std::mem::take).unwrap_or_default()),
                );
                UpperLayer { rows: on_layer, links }
            })
            .collect();
        Ok(FrozenGraph { rows: row_count, entry, base, upper })
    }

    pub fn rows(&self) -> usize {
        self.rows as usize
    }

    /// Bytes the graph holds in memory (the vectors are the segment's).
    pub fn memory_bytes(&self) -> usize {
        self.base.bytes() + self.upper.iter().map(|l| 4 * l.rows.len() + l.links.bytes()).sum::<usize>()
    }

    /// Up to `k` rows closest to `query`, nearest first, as `(distance,
    /// row)` with the metric's internal distance (see
    /// [`crate::distance::distance`]). `vectors` holds the segment's rows
    /// row-major (`dim` each); `accept`, when given, says which rows may be
    /// answered (the walk still passes through the others).
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
        if vectors.len() < self.rows as usize * dim {
            return Vec::new();
        }
        let vector = |row: u32| &vectors[row as usize * dim..(row as usize + 1) * dim];
        let mut found = self.walk(
            |row| distance(metric, query, vector(row)),
            |row| prefetch(vector(row), F32_PREFETCH_LINES),
            ef.max(k),
            accept,
        );
        found.truncate(k);
        found
    }

    /// The HNSW walk: the `ef` best rows `accept` takes (all when `None`),
    /// nearest first, by `measure`, a distance from the query to a row;
    /// `prefetch` is called on the rows about to be measured.
    pub fn walk(
        &self,
        measure: impl Fn(u32) -> f32,
        prefetch: impl Fn(u32),
        ef: usize,
        accept: Option<&dyn Fn(usize) -> bool>,
    ) -> Vec<(f32, u32)> {
        if self.rows == 0 || ef == 0 {
            return Vec::new();
        }
        let accepted = |row: u32| accept.is_none_or(|a| a(row as usize));

        // Greedy descent through the upper layers.
        let mut current = self.entry;
        let mut current_distance = measure(current);
        for layer in self.upper.iter().rev() {
            loop {
                let mut moved = false;
                for &next in layer.neighbours(current) {
                    let d = measure(next);
                    if d < current_distance {
                        (current, current_distance) = (next, d);
                        moved = true;
                    }
                }
                if !moved {
                    break;
                }
            }
        }

        // Best-first beam on layer 0.
        VISITED.with(|visited| {
            let mut visited = visited.borrow_mut();
            visited.start(self.rows as usize);
            let mut candidates: BinaryHeap<Reverse<Scored>> = BinaryHeap::with_capacity(ef * 2);
            let mut results: BinaryHeap<Scored> = BinaryHeap::with_capacity(ef + 1);
            visited.insert(current);
            candidates.push(Reverse(Scored(current_distance, current)));
            if accepted(current) {
                results.push(Scored(current_distance, current));
            }
            let mut fresh: Vec<u32> = Vec::with_capacity(64);
            while let Some(Reverse(Scored(d, node))) = candidates.pop() {
                let bound = results.peek().map_or(f32::INFINITY, |f| f.0);
                if d > bound && results.len() >= ef {
                    break;
                }
                fresh.clear();
                fresh.extend(self.base.of(node as usize).iter().copied().filter(|&n| visited.insert(n)));
                for &n in &fresh {
                    prefetch(n);
                }
                for &n in &fresh {
                    let d = measure(n);
                    let bound = results.peek().map_or(f32::INFINITY, |f| f.0);
                    if results.len() < ef || d < bound {
                        candidates.push(Reverse(Scored(d, n)));
                        if accepted(n) {
                            results.push(Scored(d, n));
                            if results.len() > ef {
                                results.pop();
                            }
                        }
                    }
                }
            }
            results.into_sorted_vec().into_iter().map(|s| (s.0, s.1)).collect()
        })
    }

    /// The graph over the rows `keep` alone (ascending row numbers; row `i`
    /// of the new graph is row `keep[i]` of this one), for a segment
    /// rewritten without its dead rows. The graph is repaired, not built
    /// again (the way FreshDiskANN consolidates deletes): a row that lost
    /// neighbours picks new ones, by HNSW's neighbour-selection heuristic,
    /// among its kept neighbours and the kept neighbours of those it lost,
    /// up to `max_links` per upper layer and twice that on layer 0 (as the
    /// builder does). That costs a few hundred distances per repaired row,
    /// against the tens of thousands of an insert into a fresh graph.
    /// Rows that lost no neighbour keep their lists. Meant for rewrites
    /// that keep most rows: past about half gone, the two-hop detours
    /// themselves are mostly gone and a fresh build is better.
    pub fn without_dropped_rows(
        &self,
        keep: &[u32],
        vectors: &[f32],
        dim: usize,
        metric: Metric,
        max_links: usize,
    ) -> Result<FrozenGraph> {
        let rows = self.rows as usize;
        if vectors.len() < rows * dim {
            return Err(Error::Internal(format!("{} values for {rows} rows of {dim}", vectors.len())));
        }
        if keep.windows(2).any(|w| w[0] >= w[1]) || keep.last().is_some_and(|&r| r >= self.rows) {
            return Err(Error::Internal("the rows to keep are not ascending rows of the graph".into()));
        }
        const DROPPED: u32 = u32::MAX;
        let mut new_row = vec![DROPPED; rows];
        for (new, &old) in keep.iter().enumerate() {
            new_row[old as usize] = new as u32;
        }
        let repair = Repair { new_row: &new_row, vectors, dim, metric };
        let base = Adjacency::from_lists(
            keep.iter()
                .map(|&old| repair.list(old, self.base.of(old as usize), |n| self.base.of(n as usize), 2 * max_links)),
        );
        let mut upper: Vec<UpperLayer> = self
            .upper
            .iter()
            .map(|layer| {
                let kept: Vec<u32> = layer.rows.iter().copied().filter(|&r| new_row[r as usize] != DROPPED).collect();
                let links = Adjacency::from_lists(
                    kept.iter().map(|&old| repair.list(old, layer.neighbours(old), |n| layer.neighbours(n), max_links)),
                );
                // Row numbers map in order, so the layer stays sorted.
                UpperLayer { rows: kept.iter().map(|&r| new_row[r as usize]).collect(), links }
            })
            .collect();
        while upper.last().is_some_and(|layer| layer.rows.is_empty()) {
            upper.pop();
        }
        let entry = match new_row.get(self.entry as usize) {
            Some(&new) if new != DROPPED && upper.last().is_none_or(|top| top.rows.binary_search(&new).is_ok()) => new,
            _ => upper.last().and_then(|top| top.rows.first().copied()).unwrap_or(0),
        };
        Ok(FrozenGraph { rows: keep.len() as u32, entry, base, upper })
    }

    /// The graph in its file layout (see the module documentation).
    pub fn encode(&self) -> Vec<u8> {
        let words = 5 + self.base.offsets.len() + self.base.neighbours.len();
        let upper_words: usize = self.upper.iter().map(|l| 2 + 2 * l.rows.len() + l.links.neighbours.len()).sum();
        let mut out = Vec::with_capacity(8 + 4 * (words + upper_words + 1));
        out.extend_from_slice(MAGIC);
        let put = |out: &mut Vec<u8>, values: &[u32]| {
            for v in values {
                out.extend_from_slice(&v.to_le_bytes());
            }
        };
        put(&mut out, &[FORMAT_VERSION, self.rows, self.entry, 1 + self.upper.len() as u32]);
        put(&mut out, &self.base.offsets);
        put(&mut out, &self.base.neighbours);
        for layer in &self.upper {
            put(&mut out, &[layer.rows.len() as u32]);
            put(&mut out, &layer.rows);
            put(&mut out, &layer.links.offsets);
            put(&mut out, &layer.links.neighbours);
        }
        let checksum = crc32fast::hash(&out);
        out.extend_from_slice(&checksum.to_le_bytes());
        out
    }

    /// Reads a graph [`FrozenGraph::encode`] wrote for a segment of `rows`
    /// rows. Anything malformed (a flipped bit, a truncated file, another
    /// segment's graph) is [`Error::Corrupt`] naming `location`, never a
    /// panic.
    pub fn decode(bytes: &[u8], rows: usize, location: &str) -> Result<FrozenGraph> {
        let corrupt = |problem: String| Error::Corrupt { location: location.to_string(), problem };
        if bytes.len() < MAGIC.len() + 4 || &bytes[..MAGIC.len()] != MAGIC {
            return Err(corrupt("not a frozen HNSW graph".into()));
        }
        let (body, stored) = bytes.split_at(bytes.len() - 4);
        let stored = u32::from_le_bytes([stored[0], stored[1], stored[2], stored[3]]);
        if crc32fast::hash(body) != stored {
            return Err(corrupt("checksum mismatch".into()));
        }
        let mut reader = Words { bytes: &body[MAGIC.len()..], location };
        let version = reader.one()?;
        if version != FORMAT_VERSION {
            return Err(corrupt(format!("format version {version}, this build reads {FORMAT_VERSION}")));
        }
        let stored_rows = reader.one()?;
        if stored_rows as usize != rows {
            return Err(corrupt(format!("a graph of {stored_rows} rows, the segment has {rows}")));
        }
        let entry = reader.one()?;
        let layers = reader.one()?;
        if layers == 0 || layers > MAX_LAYERS || (rows > 0 && entry >= stored_rows) {
            return Err(corrupt(format!("{layers} layers, entry row {entry}")));
        }
        let base = reader.adjacency(rows, stored_rows)?;
        let mut upper = Vec::with_capacity(layers as usize - 1);
        for _ in 1..layers {
            let count = reader.one()? as usize;
            if count > rows {
                return Err(corrupt(format!("a layer of {count} rows")));
            }
            let layer_rows = reader.many(count)?;
            if layer_rows.windows(2).any(|w| w[0] >= w[1]) || layer_rows.last().is_some_and(|&r| r >= stored_rows) {
                return Err(corrupt("a layer's rows are not ascending row numbers".into()));
            }
            let links = reader.adjacency(count, stored_rows)?;
            upper.push(UpperLayer { rows: layer_rows, links });
        }
        if !reader.bytes.is_empty() {
            return Err(corrupt(format!("{} bytes after the last layer", reader.bytes.len())));
        }
        if let Some(top) = upper.last()
            && top.rows.binary_search(&entry).is_err()
        {
            return Err(corrupt("the entry row is not on the top layer".into()));
        }
        Ok(FrozenGraph { rows: stored_rows, entry, base, upper })
    }
}

/// What [`FrozenGraph::without_dropped_rows`] needs to repair one list.
struct Repair<'a> {
    /// Per old row, its new row number (`u32::MAX`: dropped).
    new_row: &'a [u32],
    vectors: &'a [f32],
    dim: usize,
    metric: Metric,
}

impl Repair<'_> {
    fn vector(&self, row: u32) -> &[f32] {
        &self.vectors[row as usize * self.dim..(row as usize + 1) * self.dim]
    }

    fn kept(&self, row: u32) -> bool {
        self.new_row[row as usize] != u32::MAX
    }

    /// `node`'s new neighbour list (new row numbers) on a layer where its
    /// list was `list` and `neighbours_of` gives any row's old list.
    fn list<'g>(&self, node: u32, list: &[u32], neighbours_of: impl Fn(u32) -> &'g [u32], cap: usize) -> Vec<u32> {
        if list.iter().all(|&n| self.kept(n)) {
            return list.iter().map(|&n| self.new_row[n as usize]).collect();
        }
        let mut candidates: Vec<u32> = Vec::with_capacity(list.len() * 4);
        for &n in list {
            if self.kept(n) {
                candidates.push(n);
            } else {
                candidates.extend(neighbours_of(n).iter().copied().filter(|&m| m != node && self.kept(m)));
            }
        }
        candidates.sort_unstable();
        candidates.dedup();
        let here = self.vector(node);
        let mut scored: Vec<Scored> =
            candidates.into_iter().map(|c| Scored(distance(self.metric, here, self.vector(c)), c)).collect();
        scored.sort_unstable();
        // HNSW's heuristic: take a candidate unless a row already taken is
        // closer to it than the node is (it is reachable through that row),
        // so the links spread in every direction; then fill up with the
        // nearest of those passed over, as the build keeps no fewer links.
        let mut chosen: Vec<u32> = Vec::with_capacity(cap);
        let mut passed: Vec<u32> = Vec::new();
        for &Scored(d, c) in &scored {
            if chosen.len() >= cap {
                break;
            }
            let candidate = self.vector(c);
            if chosen.iter().all(|&s| distance(self.metric, candidate, self.vector(s)) > d) {
                chosen.push(c);
            } else {
                passed.push(c);
            }
        }
        let room = cap.saturating_sub(chosen.len());
        chosen.extend(passed.into_iter().take(room));
        chosen.into_iter().map(|n| self.new_row[n as usize]).collect()
    }
}

/// Reads little-endian `u32`s off a file, with errors naming it.
struct Words<'a> {
    bytes: &'a [u8],
    location: &'a str,
}

impl Words<'_> {
    fn corrupt(&self, problem: String) -> Error {
        Error::Corrupt { location: self.location.to_string(), problem }
    }

    fn many(&mut self, count: usize) -> Result<Vec<u32>> {
        let needed = count.checked_mul(4).filter(|&n| n <= self.bytes.len());
        let Some(needed) = needed else {
            return Err(self.corrupt(format!("truncated: {count} more values expected")));
        };
        let (taken, rest) = self.bytes.split_at(needed);
        self.bytes = rest;
        Ok(taken.chunks_exact(4).map(|w| u32::from_le_bytes([w[0], w[1], w[2], w[3]])).collect())
    }

    fn one(&mut self) -> Result<u32> {
        Ok(self.many(1)?[0])
    }

    /// Offsets for `nodes` nodes, then the neighbours they index (each a row below `rows`).
    fn adjacency(&mut self, nodes: usize, rows: u32) -> Result<Adjacency> {
        let offsets = self.many(nodes + 1)?;
        if offsets[0] != 0 || offsets.windows(2).any(|w| w[0] > w[1]) {
            return Err(self.corrupt("neighbour offsets are not ascending".into()));
        }
        let neighbours = self.many(offsets[nodes] as usize)?;
        if neighbours.iter().any(|&n| n >= rows) {
            return Err(self.corrupt("a neighbour outside the segment".into()));
        }
        let adjacency = Adjacency { offsets, neighbours };
        debug_assert_eq!(adjacency.nodes(), nodes);
        Ok(adjacency)
    }
}

/// A distance and a row, ordered by distance (ties by row): a max-heap of
/// them keeps the farthest on top (the results, whose top is the bound), a
/// max-heap of `Reverse` ones the nearest (the candidate queue).
#[derive(Debug, Clone, Copy, PartialEq)]
struct Scored(f32, u32);

impl Eq for Scored {}
impl PartialOrd for Scored {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for Scored {
    fn cmp(&self, other: &Self) -> Ordering {
        self.0.total_cmp(&other.0).then(self.1.cmp(&other.1))
    }
}

/// Which rows a search has visited: a row is visited when its stamp equals
/// the current generation, so starting a search costs nothing until the
/// generation counter wraps.
#[derive(Default)]
struct Visited {
    stamps: Vec<u16>,
    generation: u16,
}

impl Visited {
    fn start(&mut self, rows: usize) {
        if self.stamps.len() < rows {
            self.stamps.resize(rows, 0);
        }
        self.generation = self.generation.wrapping_add(1);
        if self.generation == 0 {
            self.stamps.fill(0);
            self.generation = 1;
        }
    }

    /// Marks `row` visited; `true` if it was not yet.
    #[inline]
    fn insert(&mut self, row: u32) -> bool {
        let stamp = &mut self.stamps[row as usize];
        let fresh = *stamp != self.generation;
        *stamp = self.generation;
        fresh
    }
}

thread_local! {
    /// One visited set per search thread, reused across searches.
    static VISITED: RefCell<Visited> = RefCell::new(Visited::default());
}

/// Asks the CPU to start loading the first `lines` cache lines of a
/// vector the search reads next.
#[inline(always)]
pub(crate) fn prefetch<T>(values: &[T], lines: usize) {
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::x86_64::{_MM_HINT_T0, _mm_prefetch};
        let bytes = std::mem::size_of_val(values);
        let start = values.as_ptr().cast::<i8>();
        for line in 0..lines.min(bytes.div_ceil(64)) {
            // SAFETY: prefetching is a hint and never faults; the address
            // is inside the live slice (`line * 64 < bytes`).
            unsafe { _mm_prefetch::<_MM_HINT_T0>(start.add(line * 64)) };
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = (values, lines);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::index::{HnswIndex, IndexParams};
    use rand::{Rng, SeedableRng};

    fn random(rows: usize, dim: usize, seed: u64) -> Vec<f32> {
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        (0..rows * dim).map(|_| rng.random_range(-1.0..1.0)).collect()
    }

    fn exact(vectors: &[f32], dim: usize, metric: Metric, query: &[f32], k: usize) -> Vec<u32> {
        let mut all: Vec<(f32, u32)> =
            vectors.chunks_exact(dim).enumerate().map(|(r, v)| (distance(metric, query, v), r as u32)).collect();
        all.sort_by(|a, b| a.0.total_cmp(&b.0));
        all[..k].iter().map(|x| x.1).collect()
    }

    #[test]
    fn the_frozen_search_finds_what_hnsw_rs_finds_on_the_same_graph() {
        let (rows, dim, k, ef) = (3000, 24, 10, 64);
        for metric in [Metric::L2, Metric::IP] {
            let vectors = random(rows, dim, 5);
            let raw = HnswIndex::build(&vectors, dim, metric, IndexParams::default());
            let frozen = raw.freeze().unwrap();
            let queries = random(50, dim, 6);
            let (mut same, mut frozen_hits, mut raw_hits) = (0, 0, 0);
            for query in queries.chunks_exact(dim) {
                let truth = exact(&vectors, dim, metric, query, k);
                let ours: Vec<u32> =
                    frozen.search(&vectors, dim, metric, query, k, ef, None).into_iter().map(|x| x.1).collect();
                let theirs: Vec<u32> = raw.search(query, k, ef, None).into_iter().map(|r| r as u32).collect();
                same += ours.iter().filter(|r| theirs.contains(r)).count();
                frozen_hits += ours.iter().filter(|r| truth.contains(r)).count();
                raw_hits += theirs.iter().filter(|r| truth.contains(r)).count();
            }
            let total = 50 * k;
            // Both walk the same graph; the descent and stopping rules differ
            // slightly (see the module documentation), so a few answers may.
            assert!(same as f64 >= 0.97 * total as f64, "{metric:?}: {same} of {total} the same");
            // The graph differs from run to run (parallel inserts); either
            // walk may find one true neighbour the other misses.
            assert!(frozen_hits + total / 100 >= raw_hits, "{metric:?}: frozen {frozen_hits} vs hnsw_rs {raw_hits}");
            assert!(frozen_hits as f64 >= 0.95 * total as f64, "{metric:?}: recall {frozen_hits}/{total}");
        }
    }

    #[test]
    fn a_filtered_search_answers_only_accepted_rows_and_keeps_recall() {
        let (rows, dim, k) = (3000, 16, 10);
        let vectors = random(rows, dim, 8);
        let frozen = HnswIndex::build(&vectors, dim, Metric::L2, IndexParams::default()).freeze().unwrap();
        let half = |row: usize| row.is_multiple_of(2);
        let mut hits = 0;
        for query in random(30, dim, 9).chunks_exact(dim) {
            let found = frozen.search(&vectors, dim, Metric::L2, query, k, 64, Some(&half));
            assert_eq!(found.len(), k);
            assert!(found.iter().all(|&(_, r)| r % 2 == 0));
            assert!(found.windows(2).all(|w| w[0].0 <= w[1].0), "nearest first");
            let mut even: Vec<(f32, u32)> = vectors
                .chunks_exact(dim)
                .enumerate()
                .filter(|(r, _)| r % 2 == 0)
                .map(|(r, v)| (distance(Metric::L2, query, v), r as u32))
                .collect();
            even.sort_by(|a, b| a.0.total_cmp(&b.0));
            hits += found.iter().filter(|(_, r)| even[..k].iter().any(|e| e.1 == *r)).count();
        }
        assert!(hits as f64 >= 0.95 * 300.0, "{hits}/300");
    }

    #[test]
    fn a_graph_round_trips_through_its_file_and_damage_is_an_error() {
        let (rows, dim) = (800, 8);
        let vectors = random(rows, dim, 10);
        let frozen = HnswIndex::build(&vectors, dim, Metric::L2, IndexParams::default()).freeze().unwrap();
        let bytes = frozen.encode();
        assert_eq!(FrozenGraph::decode(&bytes, rows, "seg/f").unwrap(), frozen);

        let err = FrozenGraph::decode(&bytes, rows + 1, "seg/f").unwrap_err().to_string();
        assert!(err.contains("seg/f") && err.contains("rows"), "{err}");
        for cut in [0, 7, 20, bytes.len() / 2, bytes.len() - 1] {
            let err = FrozenGraph::decode(&bytes[..cut], rows, "seg/f").unwrap_err();
            assert!(matches!(err, Error::Corrupt { .. }), "cut at {cut}: {err}");
        }
        for position in [9, 30, bytes.len() / 3, bytes.len() - 2] {
            let mut flipped = bytes.clone();
            flipped[position] ^= 0x10;
            let err = FrozenGraph::decode(&flipped, rows, "seg/f").unwrap_err();
            assert!(matches!(err, Error::Corrupt { .. }), "flip at {position}: {err}");
        }
    }

    #[test]
    fn tiny_and_empty_graphs_search_without_panicking() {
        for rows in [1usize, 2, 5] {
            let vectors = random(rows, 4, rows as u64);
            let frozen = HnswIndex::build(&vectors, 4, Metric::L2, IndexParams::default()).freeze().unwrap();
            let found = frozen.search(&vectors, 4, Metric::L2, &[0.0; 4], 10, 16, None);
            assert_eq!(found.len(), rows);
            let none = |_: usize| false;
            assert!(frozen.search(&vectors, 4, Metric::L2, &[0.0; 4], 10, 16, Some(&none)).is_empty());
            assert_eq!(FrozenGraph::decode(&frozen.encode(), rows, "x").unwrap(), frozen);
        }
    }

    #[test]
    fn a_graph_repaired_after_dropping_rows_finds_what_a_fresh_graph_finds() {
        let (rows, dim, k, ef) = (4000, 24, 10, 64);
        let mut rng = rand::rngs::StdRng::seed_from_u64(11);
        for (metric, drop_share) in [(Metric::L2, 0.2), (Metric::L2, 0.5), (Metric::IP, 0.35)] {
            let vectors = random(rows, dim, 9);
            let graph = HnswIndex::build(&vectors, dim, metric, IndexParams::default()).freeze().unwrap();
            let keep: Vec<u32> = (0..rows as u32).filter(|_| rng.random::<f64>() >= drop_share).collect();
            let kept_vectors: Vec<f32> =
                keep.iter().flat_map(|&r| vectors[r as usize * dim..][..dim].to_vec()).collect();
            let repaired = graph.without_dropped_rows(&keep, &vectors, dim, metric, IndexParams::default().m).unwrap();
            assert_eq!(repaired.rows(), keep.len());
            assert!(repaired.base.neighbours.iter().all(|&n| (n as usize) < keep.len()));
            assert!(repaired.memory_bytes() <= graph.memory_bytes());
            assert_eq!(FrozenGraph::decode(&repaired.encode(), keep.len(), "x").unwrap(), repaired);
            let fresh = HnswIndex::build(&kept_vectors, dim, metric, IndexParams::default()).freeze().unwrap();
            let (mut repaired_hits, mut fresh_hits) = (0, 0);
            for query in random(50, dim, 12).chunks_exact(dim) {
                let truth = exact(&kept_vectors, dim, metric, query, k);
                let found = |g: &FrozenGraph| g.search(&kept_vectors, dim, metric, query, k, ef, None);
                repaired_hits += found(&repaired).iter().filter(|x| truth.contains(&x.1)).count();
                fresh_hits += found(&fresh).iter().filter(|x| truth.contains(&x.1)).count();
            }
            let total = 50 * k;
            assert!(repaired_hits as f64 >= 0.95 * total as f64, "{metric:?} {drop_share}: {repaired_hits}/{total}");
            assert!(
                repaired_hits + total / 50 >= fresh_hits,
                "{metric:?} {drop_share}: repaired {repaired_hits} vs fresh {fresh_hits}"
            );
        }
    }

    #[test]
    fn a_repair_that_drops_everything_or_the_entry_row_still_searches() {
        let (rows, dim) = (500, 8);
        let vectors = random(rows, dim, 3);
        let graph = HnswIndex::build(&vectors, dim, Metric::L2, IndexParams::default()).freeze().unwrap();
        let empty = graph.without_dropped_rows(&[], &vectors, dim, Metric::L2, 16).unwrap();
        assert_eq!(empty.rows(), 0);
        assert!(empty.search(&[], dim, Metric::L2, &vectors[..dim], 5, 16, None).is_empty());
        let keep: Vec<u32> = (0..rows as u32).filter(|&r| r != graph.entry).collect();
        let kept_vectors: Vec<f32> = keep.iter().flat_map(|&r| vectors[r as usize * dim..][..dim].to_vec()).collect();
        let repaired = graph.without_dropped_rows(&keep, &vectors, dim, Metric::L2, 16).unwrap();
        let found = repaired.search(&kept_vectors, dim, Metric::L2, &kept_vectors[..dim], 1, 32, None);
        assert_eq!(found.first().map(|x| x.1), Some(0), "row 0 finds itself");
        assert!(graph.without_dropped_rows(&[3, 2], &vectors, dim, Metric::L2, 16).is_err());
        assert!(graph.without_dropped_rows(&[rows as u32], &vectors, dim, Metric::L2, 16).is_err());
    }
}
