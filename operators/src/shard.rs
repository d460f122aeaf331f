//! One shard of one collection on one worker: its segments, where every row
//! version lives, and the reads it answers at a timestamp.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use arrow::record_batch::RecordBatch;
use serde::{Deserialize, Serialize};
use vectorflow_core::{CollectionSchema, Error, Pk, Result, Timestamp, Value, VersionId};

use crate::filter::Filter;
use crate::key_index::KeyIndex;
use crate::merge_policy::{MergePolicy, SegmentSize};
pub use crate::segment::SearchPlan;
use crate::segment::{RowSet, SealParams, Segment, SegmentSnapshot};
use crate::topk::{Candidate, SearchBounds, TopK};

/// Shard tuning, the same for every shard of an engine.
#[derive(Debug, Clone)]
pub struct ShardConfig {
    /// A growing segment seals when it holds this many rows.
    pub seal_rows: usize,
    /// The graphs' parameters and where sealed vectors go.
    pub seal: SealParams,
    pub plan: SearchPlan,
    /// Which sealed segments merge (and which are rewritten for their dead rows).
    pub merge: MergePolicy,
}

impl Default for ShardConfig {
    fn default() -> Self {
        ShardConfig {
            seal_rows: 16_384,
            seal: SealParams::default(),
            plan: SearchPlan::default(),
            merge: MergePolicy::default(),
        }
    }
}

/// One search hit: the key, the internal distance (smaller is closer) and the requested fields.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Hit {
    pub pk: Pk,
    pub distance: f32,
    pub fields: Vec<Value>,
}

/// Row changes by time: the rows inserted (key and fields) and the keys retired.
pub type RowChanges = std::collections::BTreeMap<Timestamp, (Vec<(Pk, Vec<Value>)>, Vec<Pk>)>;

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
    /// Shards with a merge building its graph, or about to start one.
    pub compacting: usize,
    /// Shards whose segments are not yet what the merge policy settles on:
    /// merging, or not quiet long enough for the policy's last look.
    pub merges_pending: usize,
    /// Bytes the sealed segments' indexes hold: graphs and SQ8 codes (the
    /// vectors are the segments').
    pub index_bytes: usize,
}

impl std::ops::AddAssign for ShardStats {
    fn add_assign(&mut self, other: ShardStats) {
        self.versions += other.versions;
        self.live_rows += other.live_rows;
        self.growing_rows += other.growing_rows;
        self.sealed_segments += other.sealed_segments;
        self.indexed_segments += other.indexed_segments;
        self.compacting += other.compacting;
        self.merges_pending += other.merges_pending;
        self.index_bytes += other.index_bytes;
    }
}

#[derive(Debug)]
pub struct Shard {
    schema: Arc<CollectionSchema>,
    config: ShardConfig,
    /// The sealed segments, then the growing one. A row's address names
    /// its segment by position here. Sealed segments are shared with the
    /// reads that search them without the shard's lock (see
    /// [`Shard::sealed_view`]); the growing one never is.
    segments: Vec<Arc<Segment>>,
    /// Every version of a key still held: a retired version is found among
    /// its key's (no map by version: that cost about 40 bytes a row).
    versions_by_pk: KeyIndex,
    /// Segments sealed since persistence last took them.
    newly_sealed: Vec<SegmentSnapshot>,
    /// The uid the last checkpoint stored the growing rows under.
    stored_growing: Option<String>,
    /// A compacted segment whose index is still building, and what it replaces.
    compacting: Option<PendingCompaction>,
    /// History before this time is compacted away: reads before it are refused.
    compacted_through: Timestamp,
    /// (indexed segments, segments) as last seen, and since when.
    merge_state: Option<(usize, usize)>,
    changed_at: std::time::Instant,
    /// Whether the merge policy has looked at the current state, busy
    /// (`Some(false)`) or quiet (`Some(true)`): it looks once each.
    merge_looked: Option<bool>,
    /// When the merge policy last looked (dead rows change without a
    /// change of segments, so it looks again after a while).
    looked_at: std::time::Instant,
}

/// How often the merge policy looks at dead rows when the segments did not change.
const DEAD_ROWS_LOOK_EVERY: std::time::Duration = std::time::Duration::from_millis(250);

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
    /// The growing segment's rows as of the checkpoint (not sealed, no index).
    #[serde(default)]
    pub growing: bool,
}

/// What a checkpoint takes of a shard.
#[derive(Debug)]
pub struct ShardCheckpoint {
    /// Every sealed segment, then the growing rows if there are any.
    pub states: Vec<SegmentState>,
    /// The growing rows to write (listed last in `states`).
    pub growing: Option<SegmentSnapshot>,
    /// The previous checkpoint's growing rows: the new checkpoint replaces
    /// them, so their objects may go once it is published.
    pub superseded: Option<String>,
}

/// Asked between units of a read's work: `true` once nobody waits for the
/// answer any more (its deadline passed), so the read stops with
/// [`vectorflow_core::Error::Cancelled`] instead of holding a search thread.
#[derive(Clone, Copy)]
pub struct Stop<'a>(pub &'a dyn Fn() -> bool);

impl Stop<'_> {
    /// Never stops.
    pub const NEVER: Stop<'static> = Stop(&|| false);

    pub fn check(&self) -> Result<()> {
        if (self.0)() { Err(vectorflow_core::Error::Cancelled) } else { Ok(()) }
    }
}

/// A shard's sealed segments at one moment (see [`Shard::sealed_view`]).
#[derive(Debug, Clone)]
pub struct SealedView {
    segments: Vec<Arc<Segment>>,
    plan: SearchPlan,
}

impl SealedView {
    pub fn reader(&self) -> SegmentReader<'_> {
        SegmentReader { segments: &self.segments, plan: self.plan }
    }
}

/// The reads a shard answers at a timestamp, over some of its segments:
/// all of them, the growing one, or a [`SealedView`]. Answers over
/// disjoint parts of a shard merge like the answers of shards.
#[derive(Clone, Copy)]
pub struct SegmentReader<'a> {
    segments: &'a [Arc<Segment>],
    plan: SearchPlan,
}

impl SegmentReader<'_> {
    /// The same segments read by exact scans only (no graph walk): answers
    /// that must equal an exact search, such as a standing query's.
    pub fn exact(self) -> Self {
        SegmentReader { plan: SearchPlan { exact_below_rows: usize::MAX, ..self.plan }, ..self }
    }

    /// The changes of rows passing `filter` at times in `(after, through]`,
    /// by time: the rows inserted then (key and `output_fields`) and the
    /// keys whose row was retired then. The history a standing query
    /// replays when it starts before what its worker has applied.
    pub fn changes_between(
        &self,
        after: Timestamp,
        through: Timestamp,
        filter: Option<&Filter>,
        output_fields: &[usize],
        stop: Stop<'_>,
    ) -> Result<RowChanges> {
        let allowed = self.allowed(filter, stop)?;
        let mut changes = RowChanges::new();
        let within = |ts: Timestamp| after < ts && ts <= through;
        for (position, (segment, allowed)) in self.segments.iter().zip(&allowed).enumerate() {
            stop.check()?;
            let passes = |row: u32| allowed.as_ref().is_none_or(|set| set.contains(row as usize));
            for row in 0..segment.len() as u32 {
                let inserted = segment.insert_ts(row);
                if within(inserted) && passes(row) {
                    let hit = self.hit(position as u64, row, 0.0, output_fields);
                    changes.entry(inserted).or_default().0.push((hit.pk, hit.fields));
                }
            }
            for (row, retired) in segment.deletes() {
                if within(retired) && passes(row) {
                    changes.entry(retired).or_default().1.push(segment.pk(row).clone());
                }
            }
        }
        Ok(changes)
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

    /// The `bounds.k` closest rows visible at `ts` within `bounds.range`
    /// (and passing `filter`) for each query, with `output_fields`. `stop`
    /// is asked between segments.
    #[allow(clippy::too_many_arguments)]
    pub fn search(
        &self,
        field: usize,
        queries: &[Vec<f32>],
        bounds: SearchBounds,
        ts: Timestamp,
        filter: Option<&Filter>,
        output_fields: &[usize],
        stop: Stop<'_>,
    ) -> Result<Vec<Vec<Hit>>> {
        let allowed = self.allowed(filter, stop)?;
        queries
            .iter()
            .map(|query| {
                let mut top = TopK::new(bounds.k);
                for (position, (segment, allowed)) in self.segments.iter().zip(&allowed).enumerate() {
                    stop.check()?;
                    for candidate in segment.search(field, query, bounds, ts, allowed.as_deref(), self.plan) {
                        top.push(Candidate { segment: position as u64, ..candidate });
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
        for (position, (segment, allowed)) in self.segments.iter().zip(&allowed).enumerate() {
            stop.check()?;
            for row in segment.matching_rows(ts, allowed.as_deref()) {
                let entry = (segment.pk(row).order_key(), position as u64, row);
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
}

/// A fresh segment name: time first (for people reading listings), then
/// 64 random bits (std's per-process random hasher keys).
pub fn new_uid() -> String {
    use std::hash::{BuildHasher, Hasher};
    let random = std::collections::hash_map::RandomState::new().build_hasher().finish();
    format!("{:x}-{random:016x}", vectorflow_core::time::wall_clock_ms())
}

impl Shard {
    pub fn new(schema: Arc<CollectionSchema>, config: ShardConfig) -> Shard {
        Shard::restore(schema, config, Vec::new())
    }

    /// A shard over restored segments (see [`Segment::restore`]): the
    /// sealed ones, then the restored growing rows as its growing segment
    /// (or a new one).
    pub fn restore(schema: Arc<CollectionSchema>, config: ShardConfig, segments: Vec<Segment>) -> Shard {
        let (mut segments, mut growing): (Vec<Segment>, Vec<Segment>) =
            segments.into_iter().partition(Segment::is_sealed);
        // One growing segment per shard; more only if files were moved by hand.
        while growing.len() > 1 {
            if let Some(mut extra) = growing.pop() {
                match extra.seal_as(new_uid(), &config.seal) {
                    Ok(()) => segments.push(extra),
                    Err(e) => tracing::error!("sealing an extra growing segment: {e}"),
                }
            }
        }
        segments.push(growing.pop().unwrap_or_else(|| Segment::new(&schema)));
        let mut shard = Shard {
            schema,
            config,
            segments: segments.into_iter().map(Arc::new).collect(),
            versions_by_pk: KeyIndex::default(),
            newly_sealed: Vec::new(),
            stored_growing: None,
            compacting: None,
            compacted_through: 0,
            merge_state: None,
            changed_at: std::time::Instant::now(),
            merge_looked: None,
            looked_at: std::time::Instant::now(),
        };
        shard.index_rows();
        shard
    }

    /// Rebuilds where every version lives (after segments moved).
    fn index_rows(&mut self) {
        self.versions_by_pk.clear();
        for (position, segment) in self.segments.iter().enumerate() {
            for row in 0..segment.len() as u32 {
                if segment.is_hidden(row) {
                    continue;
                }
                self.versions_by_pk.insert(segment.pk(row), (position as u32, row));
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

    /// The shard as a checkpoint records it: the sealed segments (`known`
    /// maps uids the caller has stored to the `retired` count stored with
    /// them), and the growing rows, stored as they are rather than sealed
    /// so a checkpoint never makes a small segment (and its graph).
    pub fn checkpoint(&mut self, known: &HashMap<String, usize>) -> Result<ShardCheckpoint> {
        let mut states: Vec<SegmentState> = self
            .segments
            .iter()
            .filter(|s| s.is_sealed())
            .map(|s| SegmentState {
                uid: s.uid().to_string(),
                rows: s.len(),
                retired: s.retired(),
                deletes: (known.get(s.uid()) != Some(&s.retired())).then(|| s.deletes()),
                growing: false,
            })
            .collect();
        let growing = self.segments.last().filter(|s| !s.is_sealed() && !s.is_empty());
        let snapshot = growing.map(|s| s.growing_snapshot(new_uid())).transpose()?;
        if let (Some(segment), Some(snapshot)) = (growing, &snapshot) {
            states.push(SegmentState {
                uid: snapshot.uid.clone(),
                rows: segment.len(),
                retired: segment.retired(),
                deletes: Some(segment.deletes()),
                growing: true,
            });
        }
        let superseded = std::mem::replace(&mut self.stored_growing, snapshot.as_ref().map(|s| s.uid.clone()));
        Ok(ShardCheckpoint { states, growing: snapshot, superseded })
    }

    /// Starts the merge the policy (see [`MergePolicy`]) chooses among the
    /// sealed, indexed segments: their rows still visible after `horizon`
    /// go to one new segment, whose graph builds in the background while
    /// the inputs keep answering; [`Shard::finish_compaction`] swaps it in.
    /// One merge per shard at a time. Returns how many segments it replaces
    /// (0: nothing to do).
    pub fn start_compaction(&mut self, horizon: Timestamp) -> Result<usize> {
        let quiet = self.is_quiet();
        if self.compacting.is_some() {
            return Ok(0);
        }
        let candidates: Vec<usize> = (0..self.segments.len())
            .filter(|&p| self.segments[p].is_sealed() && self.segments[p].is_indexed())
            .collect();
        let sizes: Vec<SegmentSize> = candidates
            .iter()
            .map(|&p| {
                let segment = &self.segments[p];
                SegmentSize { rows: segment.len(), live: segment.len() - segment.dead_rows(horizon) }
            })
            .collect();
        // While fresh segments wait for their graph, only rewrites that
        // free dead rows run: a tier merge would compete with those builds.
        let builds_waiting = self.segments.iter().any(|s| s.is_sealed() && !s.is_indexed());
        let chosen = if builds_waiting {
            self.config.merge.choose_rewrites(&sizes)
        } else {
            self.config.merge.choose(&sizes, quiet)
        };
        let chosen: Vec<usize> = chosen.into_iter().map(|i| candidates[i]).collect();
        if chosen.is_empty() {
            return Ok(0);
        }
        let inputs: Vec<&Segment> = chosen.iter().map(|&p| &*self.segments[p]).collect();
        let (output, sources) = Segment::compacted(&inputs, new_uid(), &self.schema, horizon, &self.config.seal)?;
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

    /// Starts the merge the policy chooses (see [`Shard::start_compaction`])
    /// if the segments changed since it last looked (a seal, a finished
    /// merge, a graph that finished building), or, for dead rows, if
    /// [`DEAD_ROWS_LOOK_EVERY`] passed. Cheap otherwise, so the worker asks
    /// after every step.
    pub fn merge_if_due(&mut self, horizon: impl FnOnce() -> Timestamp) -> Result<usize> {
        let state = Some(self.merge_state());
        if self.merge_state != state {
            self.merge_state = state;
            self.changed_at = std::time::Instant::now();
            self.merge_looked = None;
        }
        let quiet = self.is_quiet();
        let dead_rows_due = self.looked_at.elapsed() >= DEAD_ROWS_LOOK_EVERY;
        if self.compacting.is_some() || (self.merge_looked == Some(quiet) && !dead_rows_due) {
            return Ok(0);
        }
        self.merge_looked = Some(quiet);
        self.looked_at = std::time::Instant::now();
        self.start_compaction(horizon())
    }

    /// Rows held that the background work owes: sealed rows whose graph is
    /// not built yet (they are searched by brute force), and dead rows past
    /// `horizon` in segments the merge policy will rewrite. Writers wait
    /// while the engine's sum of these is over its bound, so a load the
    /// index builds cannot keep up with slows the writers instead of
    /// growing memory without end. A merge's output is not owed: its
    /// inputs answer meanwhile, and a merge of a million rows that counted
    /// would hold every writer for the minutes it takes.
    pub fn backlog_rows(&self, horizon: Timestamp) -> usize {
        let dead_fraction = f64::from(self.config.merge.dead_fraction);
        let mut rows = 0;
        for segment in self.segments.iter().filter(|s| s.is_sealed()) {
            if !segment.is_indexed() {
                rows += segment.len();
                continue;
            }
            let dead = segment.dead_rows(horizon);
            if dead as f64 > dead_fraction * segment.len() as f64 {
                rows += dead;
            }
        }
        rows
    }

    /// Whether the segments have not changed for the policy's `quiet_after`.
    fn is_quiet(&self) -> bool {
        self.changed_at.elapsed() >= self.config.merge.quiet_after
    }

    /// What the merge policy's choice depends on, short of dead rows.
    fn merge_state(&self) -> (usize, usize) {
        (self.segments.iter().filter(|s| s.is_indexed()).count(), self.segments.len())
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
            let input_segments: Vec<&Segment> = positions.iter().map(|&p| &*self.segments[p]).collect();
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
            self.segments.push(Arc::new(output));
        }
        self.segments.extend(growing);
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

    fn growing(&self) -> &Segment {
        &self.segments[self.segments.len() - 1]
    }

    /// The growing segment, to append to or seal: only the shard's worker
    /// holds it (reads borrow it under the shard's lock, never keep it).
    fn growing_mut(&mut self) -> Result<&mut Segment> {
        let last = self.segments.len() - 1;
        Arc::get_mut(&mut self.segments[last])
            .ok_or_else(|| Error::Internal("the growing segment is shared with a read".into()))
    }

    /// Applies the version changes of one timestamp: `retired` versions (with their keys) get
    /// `delete_ts = ts`; rows of `chunks` whose version is in `added` are
    /// appended with `insert_ts = ts` (others were superseded within `ts`).
    pub fn apply(
        &mut self,
        ts: Timestamp,
        chunks: Vec<(RecordBatch, Vec<VersionId>)>,
        added: &HashSet<VersionId>,
        retired: &[(Pk, VersionId)],
    ) -> Result<()> {
        for (pk, version) in retired {
            let segments = &self.segments;
            let address = self
                .versions_by_pk
                .get(pk, |(segment, row)| segments[segment as usize].pk(row))
                .find(|&(segment, row)| segments[segment as usize].version(row) == *version);
            match address {
                Some((segment, row)) => self.segments[segment as usize].retire(row, ts),
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
        let position = (self.segments.len() - 1) as u32;
        let params = self.config.seal.index;
        let growing = self.growing_mut()?;
        let first = growing.append(batch, versions, ts)?;
        growing.grow_graph(params);
        let growing = &self.segments[position as usize];
        for row in first..first + rows as u32 {
            self.versions_by_pk.insert(growing.pk(row), (position, row));
        }
        if self.growing().len() >= self.config.seal_rows {
            self.seal_growing()?;
        }
        tracing::trace!(rows, ts, "appended");
        Ok(())
    }

    /// Seals the growing segment (if it holds rows) and starts a new one.
    fn seal_growing(&mut self) -> Result<()> {
        if self.growing().is_empty() {
            return Ok(());
        }
        let params = self.config.seal.clone();
        self.growing_mut()?.seal_as(new_uid(), &params)?;
        let snapshot = self.growing().snapshot()?;
        self.newly_sealed.push(snapshot);
        self.segments.push(Arc::new(Segment::new(&self.schema)));
        Ok(())
    }

    /// Reads over every segment: searches, queries and counts at a
    /// timestamp (the engine reads a shard in two parts instead, see
    /// [`Shard::sealed_view`]).
    pub fn reader(&self) -> SegmentReader<'_> {
        SegmentReader { segments: &self.segments, plan: self.config.plan }
    }

    /// Reads over the growing segment alone: for the part of a read that
    /// needs the shard's lock (see [`Shard::sealed_view`]).
    pub fn growing_reader(&self) -> SegmentReader<'_> {
        SegmentReader {
            segments: std::slice::from_ref(&self.segments[self.segments.len() - 1]),
            plan: self.config.plan,
        }
    }

    /// The sealed segments as they are now, to read without the shard's
    /// lock: the worker keeps applying (it only retires their rows, at
    /// times after any running read's) and a merge that replaces them
    /// leaves this view its own. So a long search never holds up a write;
    /// only the growing segment's part of a read holds the lock.
    pub fn sealed_view(&self) -> SealedView {
        SealedView { segments: self.segments[..self.segments.len() - 1].to_vec(), plan: self.config.plan }
    }

    /// The version of each key visible at `ts` that this shard holds, with `output_fields`.
    pub fn get(&self, pks: &[Pk], ts: Timestamp, output_fields: &[usize]) -> Vec<(Pk, Vec<Value>)> {
        pks.iter()
            .filter_map(|pk| {
                let segments = &self.segments;
                let (segment, row) = self
                    .versions_by_pk
                    .get(pk, |(segment, row)| segments[segment as usize].pk(row))
                    .rev()
                    .find(|&(s, r)| segments[s as usize].visible(r as usize, ts))?;
                let segment = &self.segments[segment as usize];
                Some((pk.clone(), output_fields.iter().map(|&f| segment.value(f, row)).collect()))
            })
            .collect()
    }

    pub fn stats(&self) -> ShardStats {
        // A merge the policy has not looked at yet counts as running: the
        // shard's segments are not settled until it has.
        let current = self.merge_state == Some(self.merge_state());
        let looked = current && self.merge_looked.is_some();
        let settled = current && self.merge_looked == Some(true);
        let mut stats = ShardStats {
            compacting: usize::from(self.compacting.is_some() || !looked),
            merges_pending: usize::from(self.compacting.is_some() || !settled),
            ..Default::default()
        };
        for segment in &self.segments {
            stats.index_bytes += segment.index_bytes();
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
    use crate::merge_policy::MergePolicy;
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

    /// The versions at `rows` of `versions`, keyed: the tests write key `i`
    /// as the `i`-th version.
    fn retiring(versions: &[VersionId], rows: &[usize]) -> Vec<(Pk, VersionId)> {
        rows.iter().map(|&row| (Pk::Int(row as i64), versions[row])).collect()
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
        shard.apply(20, vec![(b2, v2)], &added2, &[(Pk::Int(1), v1[0])]).unwrap();
        shard.apply(30, vec![], &HashSet::new(), &[(Pk::Int(2), v1[1])]).unwrap();

        let ids = |ts| -> Vec<Pk> {
            shard
                .reader()
                .search(1, &[vec![0.0, 0.0]], SearchBounds::top(3, 16), ts, None, &[], Stop::NEVER)
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
            shard.reader().search(1, &[vec![0.0, 0.0]], SearchBounds::top(3, 16), 35, None, &[], stopped),
            Err(vectorflow_core::Error::Cancelled)
        ));
        assert!(matches!(shard.reader().count(None, 35, stopped), Err(vectorflow_core::Error::Cancelled)));
    }

    /// The rows a query answers and the keys a search finds, at one time.
    type Answers = (Vec<(Pk, Vec<Value>)>, Vec<Pk>);

    /// Every answer at every time, searched exactly.
    fn answers(shard: &Shard, times: &[Timestamp]) -> Vec<Answers> {
        times
            .iter()
            .map(|&ts| {
                let rows = shard.reader().query(None, ts, &[1], usize::MAX, Stop::NEVER).unwrap();
                let hits = shard
                    .reader()
                    .search(1, &[vec![0.3, 0.1]], SearchBounds::top(7, 16), ts, None, &[], Stop::NEVER)
                    .unwrap();
                (rows, hits[0].iter().map(|h| h.pk.clone()).collect())
            })
            .collect()
    }

    fn wait_until(mut what: impl FnMut() -> bool) {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        while !what() {
            assert!(std::time::Instant::now() < deadline, "timed out");
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
    }

    /// Segments of 10 rows, merged four at a time, rewritten past half dead.
    fn small_merge_policy() -> MergePolicy {
        MergePolicy {
            dead_fraction: 0.5,
            floor_rows: 10,
            max_segment_rows: 1000,
            merge_factor: 4,
            ..Default::default()
        }
    }

    /// A search, query and count over the growing segment and over a
    /// sealed view taken at the same moment, merged as shards' answers are.
    fn answers_in_parts(growing: SegmentReader<'_>, sealed: &SealedView, ts: Timestamp) -> (Answers, usize) {
        let parts = [growing, sealed.reader()];
        let mut rows: Vec<(Pk, Vec<Value>)> =
            parts.iter().flat_map(|p| p.query(None, ts, &[1], usize::MAX, Stop::NEVER).unwrap()).collect();
        rows.sort_by_key(|(pk, _)| pk.order_key());
        let mut hits: Vec<Hit> = parts
            .iter()
            .flat_map(|p| {
                p.search(1, &[vec![0.3, 0.1]], SearchBounds::top(7, 16), ts, None, &[], Stop::NEVER).unwrap().remove(0)
            })
            .collect();
        hits.sort_by(|a, b| a.distance.total_cmp(&b.distance).then_with(|| a.pk.order_key().cmp(&b.pk.order_key())));
        hits.truncate(7);
        let count = parts.iter().map(|p| p.count(None, ts, Stop::NEVER).unwrap()).sum();
        ((rows, hits.into_iter().map(|h| h.pk).collect()), count)
    }

    #[test]
    fn a_sealed_view_answers_as_of_its_reads_time_while_the_shard_applies_and_merges_on() {
        sealed_view_answers_through_a_merge(SealParams::default());
    }

    #[test]
    fn with_vectors_on_disk_a_shard_answers_the_same_and_leaves_no_file_behind() {
        let dir = tempfile::tempdir().unwrap();
        let files = crate::VectorFiles::open(dir.path().join("vectors")).unwrap();
        let files_held = || std::fs::read_dir(files.dir()).unwrap().count();
        sealed_view_answers_through_a_merge(SealParams { vector_files: Some(files.clone()), ..SealParams::default() });
        assert_eq!(files_held(), 0, "every segment's file goes with the segment");
    }

    /// A shard sealing with `seal` answers as of every time the same
    /// before and after a merge, and so does a view taken before it.
    fn sealed_view_answers_through_a_merge(seal: SealParams) {
        let on_disk = seal.vector_files.clone();
        let files_held = || on_disk.as_ref().map_or(0, |files| std::fs::read_dir(files.dir()).unwrap().count());
        let schema = schema();
        let plan = SearchPlan { exact_below_rows: usize::MAX, ..SearchPlan::default() };
        // Quiet at once: the two sealed segments merge when asked.
        let merge = MergePolicy { quiet_after: std::time::Duration::ZERO, ..small_merge_policy() };
        let config = ShardConfig { seal_rows: 10, plan, merge, seal };
        let mut shard = Shard::new(schema.clone(), config);
        let mut all = Vec::new();
        // Batches of 6 rows sealing at 10: two sealed segments and 6 growing rows.
        for batch in 0..5i64 {
            let ts = 10 * (batch as u64 + 1);
            let rows: Vec<(i64, [f32; 2])> = (0..6).map(|i| (batch * 6 + i, [i as f32 * 0.1, batch as f32])).collect();
            let (b, v) = write(&schema, ts, &rows);
            all.extend(v.iter().copied());
            shard.apply(ts, vec![(b, v.clone())], &v.iter().copied().collect(), &[]).unwrap();
        }
        shard.apply(55, vec![], &HashSet::new(), &retiring(&all, &[2, 20, 27])).unwrap();
        assert_eq!((shard.stats().growing_rows, shard.stats().sealed_segments), (6, 2));
        if on_disk.is_some() {
            assert_eq!(files_held(), 2, "a file per sealed segment");
        }
        let times: Vec<Timestamp> = (0..=60).collect();
        let whole: Vec<Answers> = answers(&shard, &times);
        let view = shard.sealed_view();
        for (i, &ts) in times.iter().enumerate() {
            let (parts, count) = answers_in_parts(shard.growing_reader(), &view, ts);
            assert_eq!(parts, whole[i], "at {ts}: the parts merged answer as the whole shard");
            assert_eq!(count, whole[i].0.len());
        }
        // The growing part as of now; then the shard moves on: deletes,
        // more rows, and a merge that replaces the segments the view holds.
        let growing_then: Vec<Answers> = times
            .iter()
            .map(|&ts| {
                let rows = shard.growing_reader().query(None, ts, &[1], usize::MAX, Stop::NEVER).unwrap();
                (rows, Vec::new())
            })
            .collect();
        let view_then: Vec<Vec<(Pk, Vec<Value>)>> =
            times.iter().map(|&ts| view.reader().query(None, ts, &[1], usize::MAX, Stop::NEVER).unwrap()).collect();
        shard.apply(70, vec![], &HashSet::new(), &retiring(&all, &[0, 14, 25])).unwrap();
        let (b, v) = write(&schema, 80, &[(100, [0.3, 0.1])]);
        shard.apply(80, vec![(b, v.clone())], &v.iter().copied().collect(), &[]).unwrap();
        wait_until(|| shard.stats().indexed_segments == shard.stats().sealed_segments);
        assert_eq!(shard.merge_if_due(|| 0).unwrap(), 2);
        wait_until(|| !shard.finish_compaction().is_empty());
        for (i, &ts) in times.iter().enumerate() {
            let rows = view.reader().query(None, ts, &[1], usize::MAX, Stop::NEVER).unwrap();
            assert_eq!(rows, view_then[i], "at {ts}: the view still answers as it did");
            let mut merged = [rows, growing_then[i].0.clone()].concat();
            merged.sort_by_key(|(pk, _)| pk.order_key());
            assert_eq!(merged, whole[i].0);
        }
        assert_eq!(answers(&shard, &times), whole, "the shard itself answers those times as before");
        if on_disk.is_some() {
            assert_eq!(files_held(), 3, "the view holds the merged segments' files, the shard the merge's");
            drop(view);
            drop(shard.take_newly_sealed());
            assert_eq!(files_held(), 1);
        }
    }

    #[test]
    fn the_backlog_counts_dead_rows_a_rewrite_will_drop_until_it_has() {
        let schema = schema();
        let merge = small_merge_policy();
        let mut shard = Shard::new(schema.clone(), ShardConfig { seal_rows: 10, merge, ..ShardConfig::default() });
        let rows: Vec<(i64, [f32; 2])> = (0..10).map(|i| (i, [i as f32, 0.0])).collect();
        let (b, v) = write(&schema, 10, &rows);
        shard.apply(10, vec![(b, v.clone())], &v.iter().copied().collect(), &[]).unwrap();
        assert_eq!(shard.stats().sealed_segments, 1);
        // Sealed rows are owed until their graph is built.
        let owed = shard.backlog_rows(0);
        assert!(owed == 0 || (owed == 10 && shard.stats().indexed_segments == 0), "{owed}");
        wait_until(|| shard.stats().indexed_segments == 1);
        assert_eq!(shard.backlog_rows(0), 0);
        shard.apply(20, vec![], &HashSet::new(), &retiring(&v, &[0, 1, 2, 3])).unwrap();
        assert_eq!(shard.backlog_rows(15), 0, "retired after the horizon: time travel still sees them");
        assert_eq!(shard.backlog_rows(25), 0, "4 of 10 dead is not more than half: no rewrite will drop them");
        shard.apply(30, vec![], &HashSet::new(), &retiring(&v, &[4, 5])).unwrap();
        assert_eq!(shard.backlog_rows(35), 6);
        assert_eq!(shard.merge_if_due(|| 35).unwrap(), 1, "the policy rewrites it");
        assert_eq!(shard.backlog_rows(35), 6, "owed until the rewrite replaces the segment");
        wait_until(|| !shard.finish_compaction().is_empty());
        assert_eq!(shard.backlog_rows(35), 0);
        assert_eq!(shard.stats().versions, 4);
    }

    #[test]
    fn merged_segments_answer_as_their_inputs_did_also_before_deletes_that_arrived_during_the_merge() {
        let schema = schema();
        let merge = small_merge_policy();
        // Exact search everywhere, so answers compare equal rather than by recall.
        let plan = SearchPlan { exact_below_rows: usize::MAX, ..SearchPlan::default() };
        let mut shard =
            Shard::new(schema.clone(), ShardConfig { seal_rows: 10, plan, merge, ..ShardConfig::default() });
        let mut all = Vec::new();
        for batch in 0..4i64 {
            let ts = 10 * (batch as u64 + 1);
            let rows: Vec<(i64, [f32; 2])> =
                (0..10).map(|i| (batch * 10 + i, [(batch * 10 + i) as f32 * 0.01, (i as f32).sin()])).collect();
            let (b, v) = write(&schema, ts, &rows);
            all.extend(v.iter().copied());
            shard.apply(ts, vec![(b, v.clone())], &v.iter().copied().collect(), &[]).unwrap();
        }
        // An upsert and a delete before the merge.
        let (b, v) = write(&schema, 45, &[(3, [0.3, 0.1])]);
        shard.apply(45, vec![(b, v.clone())], &v.iter().copied().collect(), &retiring(&all, &[3])).unwrap();
        shard.apply(47, vec![], &HashSet::new(), &retiring(&all, &[5])).unwrap();
        assert_eq!(shard.stats().sealed_segments, 4);
        wait_until(|| shard.stats().indexed_segments == 4);
        let times: Vec<Timestamp> = (0..=70).step_by(1).collect();
        let before = answers(&shard, &times);

        // Four segments of the lowest tier: the policy merges them.
        assert_eq!(shard.merge_if_due(|| 0).unwrap(), 4);
        assert_eq!(shard.merge_if_due(|| 0).unwrap(), 0, "one merge at a time");
        // Deletes arriving while the merged graph builds carry over.
        shard.apply(55, vec![], &HashSet::new(), &retiring(&all, &[0, 17])).unwrap();
        shard.apply(60, vec![], &HashSet::new(), &retiring(&all, &[39])).unwrap();
        let during = answers(&shard, &times);
        wait_until(|| !shard.finish_compaction().is_empty());
        assert!(!shard.is_compacting());
        assert_eq!(shard.stats().sealed_segments, 1);
        assert_eq!(answers(&shard, &times), during);
        // Before the deletes that arrived during the merge, as before it.
        assert_eq!(answers(&shard, &times[..55]), before[..55]);
        let at = |ts: Timestamp| shard.get(&[Pk::Int(0), Pk::Int(39)], ts, &[]).len();
        assert_eq!((at(54), at(55), at(60)), (2, 1, 0));
    }
}
