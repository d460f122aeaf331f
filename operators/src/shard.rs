//! One shard of one collection on one worker: its segments, where every row
//! version lives, and the reads it answers at a timestamp.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use arrow::record_batch::RecordBatch;
use serde::{Deserialize, Serialize};
use vectorflow_core::{CollectionSchema, Error, Pk, Result, Timestamp, Value, VersionId};

use crate::filter::Filter;
use crate::index::IndexParams;
pub use crate::segment::SearchPlan;
use crate::segment::{RowSet, Segment, SegmentSnapshot};
use crate::topk::TopK;

/// Shard tuning, the same for every shard of an engine.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ShardConfig {
    /// A growing segment seals when it holds this many rows.
    pub seal_rows: usize,
    pub index: IndexParams,
    pub plan: SearchPlan,
}

impl Default for ShardConfig {
    fn default() -> Self {
        ShardConfig { seal_rows: 16_384, index: IndexParams::default(), plan: SearchPlan::default() }
    }
}

/// One search hit: the key, the internal distance (smaller is closer) and the requested fields.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Hit {
    pub pk: Pk,
    pub distance: f32,
    pub fields: Vec<Value>,
}

/// Counts a shard reports.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShardStats {
    /// Row versions held, live or retired.
    pub versions: usize,
    /// Versions not retired.
    pub live_rows: usize,
    pub growing_rows: usize,
    pub sealed_segments: usize,
    pub indexed_segments: usize,
    /// Shards with a compaction waiting for its index.
    pub compacting: usize,
}

impl std::ops::AddAssign for ShardStats {
    fn add_assign(&mut self, other: ShardStats) {
        self.versions += other.versions;
        self.live_rows += other.live_rows;
        self.growing_rows += other.growing_rows;
        self.sealed_segments += other.sealed_segments;
        self.indexed_segments += other.indexed_segments;
        self.compacting += other.compacting;
    }
}

/// Where a row version lives: segment id (its position) and row.
type RowAddress = (u64, u32);

#[derive(Debug)]
pub struct Shard {
    schema: Arc<CollectionSchema>,
    config: ShardConfig,
    /// Segment `i` has id `i`; the last one is the growing segment.
    segments: Vec<Segment>,
    locations: HashMap<VersionId, RowAddress>,
    /// Every version of a key still held.
    versions_by_pk: HashMap<Pk, Vec<RowAddress>>,
    /// Segments sealed since persistence last took them.
    newly_sealed: Vec<SegmentSnapshot>,
    /// A compacted segment whose index is still building, and what it replaces.
    compacting: Option<PendingCompaction>,
    /// History before this time is compacted away: reads before it are refused.
    compacted_through: Timestamp,
}

#[derive(Debug)]
struct PendingCompaction {
    /// uids of the segments it replaces.
    inputs: Vec<String>,
    output: Segment,
    /// Per output row: (input position in `inputs`, row there).
    sources: Vec<(usize, u32)>,
    horizon: Timestamp,
}

/// What a checkpoint records of one sealed segment.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SegmentState {
    pub uid: String,
    pub rows: usize,
    /// Rows retired so far.
    pub retired: usize,
    /// `(row, delete_ts)` of the retired rows; left out (`None`) when the
    /// caller already knows this segment with this `retired` count.
    pub deletes: Option<Vec<(u32, Timestamp)>>,
}

/// When compaction rewrites segments.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct CompactionPolicy {
    /// Rewrite a segment when more than this fraction of its rows is dead.
    pub dead_fraction: f32,
    /// Merge segments with fewer live rows than this.
    pub small_rows: usize,
}

/// A fresh segment name: time first (for people reading listings), then
/// 64 random bits (std's per-process random hasher keys).
/// Asked between units of a read's work: `true` once nobody waits for the
/// answer any more (its deadline passed), so the read stops with
/// [`vectorflow_core::Error::Cancelled`] instead of holding a worker.
#[derive(Clone, Copy)]
pub struct Stop<'a>(pub &'a dyn Fn() -> bool);

impl Stop<'_> {
    /// Never stops.
    pub const NEVER: Stop<'static> = Stop(&|| false);

    pub fn check(&self) -> Result<()> {
        if (self.0)() { Err(vectorflow_core::Error::Cancelled) } else { Ok(()) }
    }
}

pub fn new_uid() -> String {
    use std::hash::{BuildHasher, Hasher};
    let random = std::collections::hash_map::RandomState::new().build_hasher().finish();
    format!("{:x}-{random:016x}", vectorflow_core::time::wall_clock_ms())
}

impl Shard {
    pub fn new(schema: Arc<CollectionSchema>, config: ShardConfig) -> Shard {
        Shard::restore(schema, config, Vec::new())
    }

    /// A shard over restored sealed segments (see [`Segment::restore`]),
    /// with a new growing segment after them.
    pub fn restore(schema: Arc<CollectionSchema>, config: ShardConfig, mut segments: Vec<Segment>) -> Shard {
        for (position, segment) in segments.iter_mut().enumerate() {
            segment.id = position as u64;
        }
        segments.push(Segment::new(segments.len() as u64, &schema));
        let mut shard = Shard {
            schema,
            config,
            segments,
            locations: HashMap::new(),
            versions_by_pk: HashMap::new(),
            newly_sealed: Vec::new(),
            compacting: None,
            compacted_through: 0,
        };
        shard.index_rows();
        shard
    }

    /// Rebuilds where every version lives (after segments moved).
    fn index_rows(&mut self) {
        self.locations.clear();
        self.versions_by_pk.clear();
        for segment in &self.segments {
            for row in 0..segment.len() as u32 {
                if segment.is_hidden(row) {
                    continue;
                }
                let address = (segment.id, row);
                self.locations.insert(segment.version(row), address);
                self.versions_by_pk.entry(segment.pk(row).clone()).or_default().push(address);
            }
        }
    }

    /// The current version of every key (its live row), for restoring the
    /// upsert arrangement after recovery.
    pub fn live_versions(&self) -> Vec<(Pk, VersionId)> {
        let mut live = Vec::new();
        for segment in &self.segments {
            for row in 0..segment.len() as u32 {
                if !segment.is_hidden(row) && segment.visible(row as usize, Timestamp::MAX - 1) {
                    live.push((segment.pk(row).clone(), segment.version(row)));
                }
            }
        }
        live
    }

    /// Sealed segments not yet handed to persistence.
    pub fn take_newly_sealed(&mut self) -> Vec<SegmentSnapshot> {
        std::mem::take(&mut self.newly_sealed)
    }

    /// The sealed segments as a checkpoint records them; `known` maps uids
    /// the caller has stored to the `retired` count stored with them.
    pub fn checkpoint_state(&self, known: &HashMap<String, usize>) -> Vec<SegmentState> {
        self.segments
            .iter()
            .filter(|s| s.is_sealed())
            .map(|s| SegmentState {
                uid: s.uid().to_string(),
                rows: s.len(),
                retired: s.retired(),
                deletes: (known.get(s.uid()) != Some(&s.retired())).then(|| s.deletes()),
            })
            .collect()
    }

    /// Starts compacting the sealed, indexed segments that have more dead
    /// rows (see [`Segment::dead_rows`]) than the policy allows, or too few
    /// live ones; their rows still visible after `horizon` go to one new
    /// segment, swapped in by [`Shard::finish_compaction`] once its index is
    /// built. Returns how many segments it replaces (0: nothing to do).
    pub fn start_compaction(&mut self, horizon: Timestamp, policy: CompactionPolicy) -> Result<usize> {
        if self.compacting.is_some() {
            return Ok(0);
        }
        let mut chosen = Vec::new();
        let mut small = Vec::new();
        for (position, segment) in self.segments.iter().enumerate() {
            if !segment.is_sealed() || !segment.is_indexed() {
                continue;
            }
            let dead = segment.dead_rows(horizon);
            let live = segment.len() - dead;
            if dead as f32 > policy.dead_fraction * segment.len() as f32 {
                chosen.push(position);
            } else if live < policy.small_rows {
                small.push(position);
            }
        }
        // Merging pays off only with at least two small segments.
        if small.len() >= 2 || !chosen.is_empty() {
            chosen.extend(small);
        }
        chosen.sort_unstable();
        if chosen.is_empty() {
            return Ok(0);
        }
        let inputs: Vec<&Segment> = chosen.iter().map(|&p| &self.segments[p]).collect();
        let (output, sources) = Segment::compacted(&inputs, 0, new_uid(), &self.schema, horizon, self.config.index)?;
        let count = inputs.len();
        tracing::debug!(inputs = count, rows = output.len(), "compaction started");
        self.compacting = Some(PendingCompaction {
            inputs: inputs.iter().map(|s| s.uid().to_string()).collect(),
            output,
            sources,
            horizon,
        });
        Ok(count)
    }

    /// Swaps a started compaction in once its index is built: the new
    /// segment takes the deletes that arrived meanwhile and replaces its
    /// inputs. Returns the uids of the segments it replaced (none while
    /// the index is still building).
    pub fn finish_compaction(&mut self) -> Vec<String> {
        if !self.compacting.as_ref().is_some_and(|c| c.output.is_indexed() || c.output.is_empty()) {
            return Vec::new();
        }
        let Some(PendingCompaction { inputs, mut output, sources, horizon }) = self.compacting.take() else {
            return Vec::new();
        };
        let positions: Vec<usize> =
            inputs.iter().filter_map(|uid| self.segments.iter().position(|s| s.uid() == uid)).collect();
        if positions.len() != inputs.len() {
            tracing::error!("a compaction input vanished; the compaction is dropped");
            return Vec::new();
        }
        {
            let input_segments: Vec<&Segment> = positions.iter().map(|&p| &self.segments[p]).collect();
            output.take_deletes_from(&input_segments, &sources);
        }
        let growing = self.segments.pop();
        self.segments = std::mem::take(&mut self.segments)
            .into_iter()
            .enumerate()
            .filter(|(position, _)| !positions.contains(position))
            .map(|(_, s)| s)
            .collect();
        if !output.is_empty() {
            match output.snapshot() {
                Ok(snapshot) => self.newly_sealed.push(snapshot),
                Err(e) => tracing::error!("snapshot of a compacted segment: {e}"),
            }
            self.segments.push(output);
        }
        self.segments.extend(growing);
        for (position, segment) in self.segments.iter_mut().enumerate() {
            segment.id = position as u64;
        }
        self.index_rows();
        self.compacted_through = self.compacted_through.max(horizon);
        tracing::debug!(replaced = inputs.len(), "compaction swapped in");
        inputs
    }

    /// Reads before this time are refused: compaction dropped history there.
    pub fn compacted_through(&self) -> Timestamp {
        self.compacted_through
    }

    /// Whether a compaction is waiting for its index.
    pub fn is_compacting(&self) -> bool {
        self.compacting.is_some()
    }

    pub fn schema(&self) -> &Arc<CollectionSchema> {
        &self.schema
    }

    fn growing(&mut self) -> &mut Segment {
        let last = self.segments.len() - 1;
        &mut self.segments[last]
    }

    /// Applies the version changes of one timestamp: `retired` versions get
    /// `delete_ts = ts`; rows of `chunks` whose version is in `added` are
    /// appended with `insert_ts = ts` (others were superseded within `ts`).
    pub fn apply(
        &mut self,
        ts: Timestamp,
        chunks: Vec<(RecordBatch, Vec<VersionId>)>,
        added: &HashSet<VersionId>,
        retired: &[VersionId],
    ) -> Result<()> {
        for version in retired {
            match self.locations.get(version) {
                Some(&(segment, row)) => self.segments[segment as usize].retire(row, ts),
                None => {
                    return Err(Error::storage(format!(
                        "retiring version {version:?} at ts {ts}: the shard does not hold it"
                    )));
                }
            }
        }
        for (batch, versions) in chunks {
            self.schema.check_batch_shape(&batch)?;
            let keep: Vec<u32> =
                (0..versions.len()).filter(|&i| added.contains(&versions[i])).map(|i| i as u32).collect();
            if keep.is_empty() {
                continue;
            }
            let (batch, versions) = if keep.len() == versions.len() {
                (batch, versions)
            } else {
                let kept_versions = keep.iter().map(|&i| versions[i as usize]).collect();
                (vectorflow_core::batch::take_rows(&batch, &keep)?, kept_versions)
            };
            self.append(batch, versions, ts)?;
        }
        Ok(())
    }

    fn append(&mut self, batch: RecordBatch, versions: Vec<VersionId>, ts: Timestamp) -> Result<()> {
        let rows = batch.num_rows();
        let segment_id = (self.segments.len() - 1) as u64;
        let first = self.growing().append(batch, versions.clone(), ts)?;
        for (i, version) in versions.into_iter().enumerate() {
            let address = (segment_id, first + i as u32);
            self.locations.insert(version, address);
            let pk = self.segments[segment_id as usize].pk(address.1).clone();
            self.versions_by_pk.entry(pk).or_default().push(address);
        }
        if self.growing().len() >= self.config.seal_rows {
            self.seal_growing()?;
        }
        tracing::trace!(rows, ts, "appended");
        Ok(())
    }

    /// Seals the growing segment (if it holds rows) and starts a new one.
    pub fn seal_growing(&mut self) -> Result<()> {
        if self.growing().is_empty() {
            return Ok(());
        }
        let params = self.config.index;
        self.growing().seal_as(new_uid(), params)?;
        let snapshot = self.growing().snapshot()?;
        self.newly_sealed.push(snapshot);
        let id = self.segments.len() as u64;
        self.segments.push(Segment::new(id, &self.schema));
        Ok(())
    }

    /// Which rows of each segment pass `filter` (`None` without a filter).
    fn allowed(&self, filter: Option<&Filter>, stop: Stop<'_>) -> Result<Vec<Option<Arc<RowSet>>>> {
        self.segments
            .iter()
            .map(|segment| {
                stop.check()?;
                filter.map(|f| segment.evaluate(f)).transpose()
            })
            .collect()
    }

    /// The `k` closest rows visible at `ts` (and passing `filter`) for each
    /// query, with `output_fields`. `stop` is asked between segments.
    #[allow(clippy::too_many_arguments)]
    pub fn search(
        &self,
        field: usize,
        queries: &[Vec<f32>],
        k: usize,
        ef: usize,
        ts: Timestamp,
        filter: Option<&Filter>,
        output_fields: &[usize],
        stop: Stop<'_>,
    ) -> Result<Vec<Vec<Hit>>> {
        let allowed = self.allowed(filter, stop)?;
        queries
            .iter()
            .map(|query| {
                let mut top = TopK::new(k);
                for (segment, allowed) in self.segments.iter().zip(&allowed) {
                    stop.check()?;
                    for candidate in segment.search(field, query, k, ef, ts, allowed.as_deref(), self.config.plan) {
                        top.push(candidate);
                    }
                }
                Ok(top
                    .into_sorted()
                    .into_iter()
                    .map(|c| self.hit(c.segment, c.row, c.distance, output_fields))
                    .collect())
            })
            .collect()
    }

    fn hit(&self, segment: u64, row: u32, distance: f32, output_fields: &[usize]) -> Hit {
        let segment = &self.segments[segment as usize];
        Hit {
            pk: segment.pk(row).clone(),
            distance,
            fields: output_fields.iter().map(|&f| segment.value(f, row)).collect(),
        }
    }

    /// Rows visible at `ts` that pass `filter`: the first `limit` in key
    /// order (`Pk::order_key`), with `output_fields`.
    pub fn query(
        &self,
        filter: Option<&Filter>,
        ts: Timestamp,
        output_fields: &[usize],
        limit: usize,
        stop: Stop<'_>,
    ) -> Result<Vec<(Pk, Vec<Value>)>> {
        let allowed = self.allowed(filter, stop)?;
        // The first `limit` in key order, in a max-heap of at most `limit`
        // entries: memory follows the answer, not the rows that match.
        let mut first: std::collections::BinaryHeap<(u64, u64, u32)> = std::collections::BinaryHeap::new();
        for (segment, allowed) in self.segments.iter().zip(&allowed) {
            stop.check()?;
            for row in segment.matching_rows(ts, allowed.as_deref()) {
                let entry = (segment.pk(row).order_key(), segment.id, row);
                if first.len() < limit {
                    first.push(entry);
                } else if first.peek().is_some_and(|last| entry < *last) {
                    first.pop();
                    first.push(entry);
                }
            }
        }
        Ok(first
            .into_sorted_vec()
            .into_iter()
            .map(|(_, segment, row)| {
                let hit = self.hit(segment, row, 0.0, output_fields);
                (hit.pk, hit.fields)
            })
            .collect())
    }

    /// How many rows visible at `ts` pass `filter`.
    pub fn count(&self, filter: Option<&Filter>, ts: Timestamp, stop: Stop<'_>) -> Result<usize> {
        let allowed = self.allowed(filter, stop)?;
        Ok(self
            .segments
            .iter()
            .zip(&allowed)
            .map(|(segment, allowed)| segment.passing_count(ts, allowed.as_deref()))
            .sum())
    }

    /// The version of each key visible at `ts` that this shard holds, with `output_fields`.
    pub fn get(&self, pks: &[Pk], ts: Timestamp, output_fields: &[usize]) -> Vec<(Pk, Vec<Value>)> {
        pks.iter()
            .filter_map(|pk| {
                let addresses = self.versions_by_pk.get(pk)?;
                let &(segment, row) =
                    addresses.iter().rev().find(|(s, r)| self.segments[*s as usize].visible(*r as usize, ts))?;
                let segment = &self.segments[segment as usize];
                Some((pk.clone(), output_fields.iter().map(|&f| segment.value(f, row)).collect()))
            })
            .collect()
    }

    pub fn stats(&self) -> ShardStats {
        let mut stats = ShardStats { compacting: usize::from(self.compacting.is_some()), ..Default::default() };
        for segment in &self.segments {
            stats.versions += segment.len();
            stats.live_rows += segment.live_rows();
            if segment.is_sealed() {
                stats.sealed_segments += 1;
                stats.indexed_segments += usize::from(segment.is_indexed());
            } else {
                stats.growing_rows += segment.len();
            }
        }
        stats
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vectorflow_core::batch::{WriteBatch, WriteKind};
    use vectorflow_core::{FieldSchema, Metric, Row};

    fn schema() -> Arc<CollectionSchema> {
        Arc::new(CollectionSchema::new(
            "t",
            vec![FieldSchema::int64_primary("id", false), FieldSchema::vector("v", 2, Metric::L2)],
        ))
    }

    fn write(schema: &CollectionSchema, ts: Timestamp, rows: &[(i64, [f32; 2])]) -> (RecordBatch, Vec<VersionId>) {
        let rows: Vec<Row> = rows
            .iter()
            .map(|(id, v)| Row::from([("id".into(), Value::Int(*id)), ("v".into(), Value::Vector(v.to_vec()))]))
            .collect();
        let batch = WriteBatch::from_rows(schema, &rows, WriteKind::Upsert).unwrap().batch;
        let versions = (0..rows.len() as u32).map(|row| VersionId { ts, partition: 0, row }).collect();
        (batch, versions)
    }

    #[test]
    fn versions_are_visible_between_insert_and_retire_across_seals() {
        let schema = schema();
        let config = ShardConfig { seal_rows: 2, ..ShardConfig::default() };
        let mut shard = Shard::new(schema.clone(), config);
        let (b1, v1) = write(&schema, 10, &[(1, [0.0, 0.0]), (2, [1.0, 0.0]), (3, [5.0, 5.0])]);
        let added: HashSet<_> = v1.iter().copied().collect();
        shard.apply(10, vec![(b1, v1.clone())], &added, &[]).unwrap();
        let (b2, v2) = write(&schema, 20, &[(1, [9.0, 9.0])]);
        let added2: HashSet<_> = v2.iter().copied().collect();
        shard.apply(20, vec![(b2, v2)], &added2, &[v1[0]]).unwrap();
        shard.apply(30, vec![], &HashSet::new(), &[v1[1]]).unwrap();

        let ids = |ts| -> Vec<Pk> {
            shard
                .search(1, &[vec![0.0, 0.0]], 3, 16, ts, None, &[], Stop::NEVER)
                .unwrap()
                .remove(0)
                .into_iter()
                .map(|h| h.pk)
                .collect()
        };
        assert_eq!(ids(15), vec![Pk::Int(1), Pk::Int(2), Pk::Int(3)]);
        assert_eq!(ids(25), vec![Pk::Int(2), Pk::Int(3), Pk::Int(1)]);
        assert_eq!(ids(35), vec![Pk::Int(3), Pk::Int(1)]);
        assert_eq!(ids(5), Vec::<Pk>::new());
        assert_eq!(shard.get(&[Pk::Int(1)], 25, &[1])[0].1, vec![Value::Vector(vec![9.0, 9.0])]);
        assert!(shard.get(&[Pk::Int(2)], 35, &[]).is_empty());
        assert_eq!(shard.stats().sealed_segments, 1);

        let stopped = Stop(&|| true);
        assert!(matches!(
            shard.search(1, &[vec![0.0, 0.0]], 3, 16, 35, None, &[], stopped),
            Err(vectorflow_core::Error::Cancelled)
        ));
        assert!(matches!(shard.count(None, 35, stopped), Err(vectorflow_core::Error::Cancelled)));
    }
}
