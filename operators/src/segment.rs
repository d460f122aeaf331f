//! A segment: rows as Arrow columns, vectors as contiguous `f32` buffers, and
//! per-row `insert_ts`/`delete_ts`. A row version is visible at `t` iff
//! `insert_ts <= t < delete_ts`.
//!
//! A segment grows by appending chunks until it seals; sealing concatenates
//! the chunks and builds one HNSW index per vector field on a background
//! thread. Until an index is ready the segment answers with exact search, so
//! nothing disappears from results during the hand-off.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError, RwLock};

use arrow::array::{Array, ArrayRef, AsArray, UInt32Array, UInt64Array};
use arrow::buffer::ScalarBuffer;
use arrow::datatypes::{DataType as ArrowType, Field, Float32Type, Schema, UInt32Type, UInt64Type};
use arrow::record_batch::RecordBatch;
use vectorflow_core::value::pks_from_array;
use vectorflow_core::{CollectionSchema, DataType, Error, Metric, Pk, Result, Timestamp, Value, VersionId};

use crate::build_pool::{self, BuildLane};
use crate::distance::distance;
use crate::filter::Filter;
use crate::frozen::FrozenGraph;
use crate::index::{GrowingIndex, HnswIndex, IndexParams, IndexSlot, SealedIndex};
use crate::topk::{Candidate, DistanceRange, SearchBounds, TopK};
use crate::vector_file::{MappedVectors, VectorFiles};

/// How a segment seals: its graphs' build parameters, and where its
/// vectors go (the heap, or files of `vector_files`, see [`crate::vector_file`]).
#[derive(Debug, Clone, Default)]
pub struct SealParams {
    pub index: IndexParams,
    pub vector_files: Option<Arc<VectorFiles>>,
}

/// `delete_ts` of a version nothing has retired yet.
pub const ALIVE: Timestamp = Timestamp::MAX;

/// When a search scans exactly instead of walking the graph.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SearchPlan {
    /// Scan exactly when fewer rows than this are visible.
    pub exact_below_rows: usize,
    /// Scan exactly when less than this fraction of the segment is visible
    /// (a filtered graph walk loses recall when most nodes are filtered out).
    pub exact_below_fraction: f32,
    /// Distances a graph walk computes per unit of `ef` when every row
    /// passes. A walk that may answer only a fraction `f` of the rows
    /// computes about `ef × graph_cost_per_ef / f` of them, a scan exactly
    /// the passing rows, so the search scans when
    /// `passing² < graph_cost_per_ef × ef × rows`: under about a third of
    /// 16k rows at `ef` 64, under 4 % of a million. 0: never by cost.
    pub graph_cost_per_ef: f32,
}

impl Default for SearchPlan {
    fn default() -> Self {
        SearchPlan { exact_below_rows: 1000, exact_below_fraction: 0.1, graph_cost_per_ef: 30.0 }
    }
}

impl SearchPlan {
    /// Whether a search of `segment_rows` rows of which `passing` may be
    /// answered scans them instead of walking the graph.
    pub fn scans(&self, passing: usize, segment_rows: usize, ef: usize) -> bool {
        let below = self.exact_below_rows.max((segment_rows as f32 * self.exact_below_fraction) as usize);
        let scan_cost = passing as f64 * passing as f64;
        let walk_cost = f64::from(self.graph_cost_per_ef) * ef as f64 * segment_rows as f64;
        passing < below || scan_cost < walk_cost
    }
}

/// One vector field of a segment: where it is in the schema, and its index.
#[derive(Debug)]
struct VectorColumn {
    field: usize,
    dim: usize,
    metric: Metric,
    /// One contiguous buffer per chunk.
    chunks: Vec<ScalarBuffer<f32>>,
    /// The sealed chunk's file, when the vectors are kept on disk.
    mapped: Option<MappedVectors>,
    index: Option<Arc<IndexSlot>>,
    /// A growing segment's graph, built while it grows (see [`Segment::grow_graph`]).
    growing: Option<Arc<GrowingIndex>>,
}

/// A growing segment starts its graph at this many rows: below it a scan
/// costs about what a graph search does.
pub const GROWING_GRAPH_FROM_ROWS: usize = 1_024;

/// Rows one job inserts into a growing graph before it yields its build
/// lane (to seal builds queued behind it) and queues itself again.
const GROWING_GRAPH_BUDGET: usize = 2_048;

#[derive(Debug)]
pub struct Segment {
    /// Name in the object store, unique for the store's life; set at seal.
    uid: String,
    chunks: Vec<RecordBatch>,
    /// First row of each chunk.
    chunk_starts: Vec<usize>,
    vectors: Vec<VectorColumn>,
    pk_field: usize,
    pks: Vec<Pk>,
    /// `pks[i].order_key()`, kept to break ties without touching the keys.
    tiebreaks: Vec<u64>,
    versions: Vec<VersionId>,
    insert_ts: Vec<Timestamp>,
    /// Set through `&self`: a sealed segment is shared with the reads that
    /// run without the shard's lock while its one writer (the shard's
    /// worker) retires rows. A read at `t` starts only once every change
    /// at or before `t` is applied and published, and every later change
    /// sets a time after `t`, so whether a read sees those makes no
    /// difference to its answer.
    delete_ts: Vec<AtomicU64>,
    /// The `delete_ts` of every retired row, ascending: how many rows a
    /// time has retired is a binary search, not a pass over the rows
    /// (every search asks, and under upserts every segment has some).
    retire_times: RwLock<Vec<Timestamp>>,
    /// Rows restored hidden (inserted after the restore's `as_of`): never visible.
    hidden: usize,
    max_insert_ts: Timestamp,
    sealed: bool,
    /// Rows handed to the growing graphs so far.
    graph_queued_rows: usize,
    /// Filter results of a sealed segment by filter text: its rows never
    /// change (only `delete_ts` does, and visibility is checked apart).
    filter_results: Mutex<HashMap<String, Arc<RowSet>>>,
}

/// The rows of a segment that pass a filter, as a bitmap (for the graph
/// walk) and as a list (for scans of selective filters).
#[derive(Debug)]
pub struct RowSet {
    bits: Vec<bool>,
    rows: Vec<u32>,
}

impl RowSet {
    pub fn new(bits: Vec<bool>) -> RowSet {
        let rows = bits.iter().enumerate().filter(|(_, b)| **b).map(|(row, _)| row as u32).collect();
        RowSet { bits, rows }
    }

    #[inline]
    pub fn contains(&self, row: usize) -> bool {
        self.bits[row]
    }
}

/// Filter results a sealed segment keeps; the cache starts over beyond it.
const CACHED_FILTERS: usize = 32;

impl Segment {
    pub fn new(schema: &CollectionSchema) -> Segment {
        let vectors = schema
            .fields
            .iter()
            .enumerate()
            .filter_map(|(field, f)| match f.data_type {
                DataType::FloatVector { dim, metric } => Some(VectorColumn {
                    field,
                    dim,
                    metric,
                    chunks: Vec::new(),
                    mapped: None,
                    index: None,
                    growing: None,
                }),
                _ => None,
            })
            .collect();
        Segment {
            uid: String::new(),
            chunks: Vec::new(),
            chunk_starts: Vec::new(),
            vectors,
            pk_field: schema.primary_index(),
            pks: Vec::new(),
            tiebreaks: Vec::new(),
            versions: Vec::new(),
            insert_ts: Vec::new(),
            delete_ts: Vec::new(),
            retire_times: RwLock::new(Vec::new()),
            hidden: 0,
            max_insert_ts: 0,
            sealed: false,
            graph_queued_rows: 0,
            filter_results: Mutex::new(HashMap::new()),
        }
    }

    pub fn len(&self) -> usize {
        self.pks.len()
    }

    pub fn is_empty(&self) -> bool {
        self.pks.is_empty()
    }

    pub fn is_sealed(&self) -> bool {
        self.sealed
    }

    /// Whether every vector field's index build has ended (false while growing).
    pub fn is_indexed(&self) -> bool {
        self.sealed && self.vectors.iter().all(|v| v.index.as_ref().is_some_and(|i| i.get().is_some()))
    }

    /// Bytes the built indexes of this segment hold (graphs and SQ8 codes).
    pub fn index_bytes(&self) -> usize {
        self.vectors.iter().filter_map(|v| v.index.as_ref()?.get()?.as_ref()).map(SealedIndex::memory_bytes).sum()
    }

    pub fn uid(&self) -> &str {
        &self.uid
    }

    /// Rows retired by a later version (or a delete).
    pub fn retired(&self) -> usize {
        self.retire_times().len() + self.hidden
    }

    /// The retire times (a poisoned lock still holds a sorted list: each
    /// change is one insert or one remove).
    fn retire_times(&self) -> std::sync::RwLockReadGuard<'_, Vec<Timestamp>> {
        self.retire_times.read().unwrap_or_else(PoisonError::into_inner)
    }

    #[inline]
    fn delete_ts(&self, row: usize) -> Timestamp {
        self.delete_ts[row].load(Ordering::Relaxed)
    }

    /// Rows retired at or before `ts`.
    fn retired_by(&self, ts: Timestamp) -> usize {
        self.retire_times().partition_point(|&t| t <= ts)
    }

    /// Sets a row's `delete_ts` to `ts` if that is earlier, keeping
    /// `retire_times` in step.
    fn set_delete_ts(&self, row: usize, ts: Timestamp) {
        let old = self.delete_ts(row);
        if ts >= old {
            return;
        }
        let mut retire_times = self.retire_times.write().unwrap_or_else(PoisonError::into_inner);
        if old != ALIVE {
            let at = retire_times.partition_point(|&t| t < old);
            retire_times.remove(at);
        }
        self.delete_ts[row].store(ts, Ordering::Relaxed);
        // Deletes arrive in time order, so this is nearly always a push.
        let at = retire_times.partition_point(|&t| t <= ts);
        retire_times.insert(at, ts);
    }

    /// Recomputes `retire_times` and `hidden` after `delete_ts`/`insert_ts` were set wholesale.
    fn recount_retired(&mut self) {
        let mut retire_times: Vec<Timestamp> =
            self.delete_ts.iter_mut().map(|ts| *ts.get_mut()).filter(|&ts| ts != ALIVE).collect();
        retire_times.sort_unstable();
        self.retire_times = RwLock::new(retire_times);
        self.hidden = self.insert_ts.iter().filter(|&&ts| ts == ALIVE).count();
    }

    /// `(row, delete_ts)` of every retired row.
    pub fn deletes(&self) -> Vec<(u32, Timestamp)> {
        (0..self.len()).map(|row| (row as u32, self.delete_ts(row))).filter(|&(_, ts)| ts != ALIVE).collect()
    }

    /// Rows no read inside the retention window can see: retired at or
    /// before `horizon`, or hidden (never visible).
    pub fn dead_rows(&self, horizon: Timestamp) -> usize {
        self.retired_by(horizon) + self.hidden
    }

    fn is_dead(&self, row: usize, horizon: Timestamp) -> bool {
        self.delete_ts(row) <= horizon || self.insert_ts[row] == ALIVE
    }

    /// What persistence needs of a sealed segment: its rows with the system
    /// columns (see [`SYSTEM_COLUMNS`]) and its index slots.
    pub fn snapshot(&self) -> Result<SegmentSnapshot> {
        let Some(chunk) = self.chunks.first().filter(|_| self.sealed && self.chunks.len() == 1) else {
            return Err(Error::storage(format!("segment {} is not sealed", self.uid)));
        };
        let indexes =
            self.vectors.iter().filter_map(|v| v.index.clone().map(|slot| (v.field, v.metric, slot))).collect();
        let mapped = self.vectors.iter().filter_map(|v| v.mapped.clone()).collect();
        Ok(SegmentSnapshot { uid: self.uid.clone(), data: self.with_system_columns(chunk)?, indexes, mapped })
    }

    /// What persistence needs of the growing segment's rows so far, under
    /// `uid` (a new one per snapshot: stored objects are never
    /// overwritten): the rows with the system columns, no index.
    pub fn growing_snapshot(&self, uid: String) -> Result<SegmentSnapshot> {
        let Some(first) = self.chunks.first() else {
            return Err(Error::storage("an empty growing segment has nothing to store"));
        };
        let rows = arrow::compute::concat_batches(&first.schema(), &self.chunks)?;
        Ok(SegmentSnapshot { uid, data: self.with_system_columns(&rows)?, indexes: Vec::new(), mapped: Vec::new() })
    }

    /// `rows` (all of this segment's, in order) followed by the system columns.
    fn with_system_columns(&self, chunk: &RecordBatch) -> Result<RecordBatch> {
        let mut fields: Vec<Field> = chunk.schema().fields().iter().map(|f| f.as_ref().clone()).collect();
        let mut columns: Vec<ArrayRef> = chunk.columns().to_vec();
        fields.extend(system_fields());
        columns.push(Arc::new(UInt64Array::from(self.insert_ts.clone())));
        columns.push(Arc::new(UInt64Array::from_iter_values(self.versions.iter().map(|v| v.ts))));
        columns.push(Arc::new(UInt32Array::from_iter_values(self.versions.iter().map(|v| v.partition))));
        columns.push(Arc::new(UInt32Array::from_iter_values(self.versions.iter().map(|v| v.row))));
        Ok(RecordBatch::try_new(Arc::new(Schema::new(fields)), columns)?)
    }

    /// A segment from stored parts: `data` as [`Segment::snapshot`] (or
    /// [`Segment::growing_snapshot`]) wrote it, the deletes, and what it
    /// was (see [`Restored`]). The segment is restored as of `as_of`: rows
    /// inserted later are hidden and later deletes undone, so replaying
    /// the log from `as_of` cannot apply anything twice.
    #[allow(clippy::too_many_arguments)]
    pub fn restore(
        uid: String,
        schema: &CollectionSchema,
        data: RecordBatch,
        deletes: &[(u32, Timestamp)],
        restored: Restored,
        as_of: Timestamp,
        params: &SealParams,
    ) -> Result<Segment> {
        let corrupt = |problem: String| Error::Corrupt { location: format!("segment {uid}"), problem };
        let user_columns = schema.fields.len();
        if data.num_columns() != user_columns + SYSTEM_COLUMNS.len() {
            return Err(corrupt(format!(
                "{} columns, the schema needs {} plus {} system columns",
                data.num_columns(),
                user_columns,
                SYSTEM_COLUMNS.len()
            )));
        }
        let system = |i: usize| data.column(user_columns + i);
        let (Some(insert_ts), Some(version_ts), Some(version_partition), Some(version_row)) = (
            system(0).as_primitive_opt::<UInt64Type>(),
            system(1).as_primitive_opt::<UInt64Type>(),
            system(2).as_primitive_opt::<UInt32Type>(),
            system(3).as_primitive_opt::<UInt32Type>(),
        ) else {
            return Err(corrupt("system columns of the wrong type".into()));
        };
        let rows = data.num_rows();
        let user = data.project(&(0..user_columns).collect::<Vec<_>>())?;
        let mut segment = Segment::new(schema);
        segment.uid = uid.clone();
        segment.pks = pks_from_array(user.column(segment.pk_field).as_ref())?;
        segment.tiebreaks = segment.pks.iter().map(Pk::order_key).collect();
        segment.versions = (0..rows)
            .map(|i| VersionId {
                ts: version_ts.value(i),
                partition: version_partition.value(i),
                row: version_row.value(i),
            })
            .collect();
        segment.insert_ts = insert_ts.values().iter().map(|&ts| if ts <= as_of { ts } else { ALIVE }).collect();
        segment.delete_ts = (0..rows).map(|_| AtomicU64::new(ALIVE)).collect();
        for &(row, ts) in deletes {
            let slot = segment
                .delete_ts
                .get_mut(row as usize)
                .ok_or_else(|| corrupt(format!("deleted row {row} of {rows}")))?;
            if ts <= as_of {
                *slot.get_mut() = ts;
            }
        }
        segment.recount_retired();
        segment.max_insert_ts = segment.insert_ts.iter().copied().filter(|&ts| ts != ALIVE).max().unwrap_or(0);
        segment.chunk_starts = vec![0];
        segment.chunks = vec![user];
        match restored {
            Restored::Sealed { indexes } => {
                segment.sealed = true;
                segment.attach_indexes(indexes, params, BuildLane::Seal);
            }
            Restored::Growing => {
                // It keeps growing (and seals at the seal size); its rows
                // are searched exactly until then, as before the restart.
                segment.uid = String::new();
                let batch = &segment.chunks[0];
                let buffers: Vec<_> = segment.vectors.iter().map(|c| vector_buffer(batch, c.field, c.dim)).collect();
                for (column, buffer) in segment.vectors.iter_mut().zip(buffers) {
                    column.chunks = vec![buffer];
                }
                segment.grow_graph(params.index);
            }
        }
        Ok(segment)
    }

    /// Gives each vector field of the sealed single chunk its contiguous
    /// buffer and its index: the one in `ready`, else one built in the background.
    fn attach_indexes(&mut self, ready: HashMap<usize, FrozenGraph>, params: &SealParams, lane: BuildLane) {
        self.attach_or_repair_indexes(ready, HashMap::new(), params, lane);
    }

    /// [`Segment::attach_indexes`], where a field in `repairs` gets its
    /// graph repaired from its source segment's instead of built.
    fn attach_or_repair_indexes(
        &mut self,
        mut ready: HashMap<usize, FrozenGraph>,
        mut repairs: HashMap<usize, GraphRepair>,
        params: &SealParams,
        lane: BuildLane,
    ) {
        if let Some(files) = &params.vector_files {
            self.move_vectors_to(files);
        }
        let Some(batch) = self.chunks.first() else { return };
        for column in &mut self.vectors {
            let buffer = vector_buffer(batch, column.field, column.dim);
            column.chunks = vec![buffer.clone()];
            let slot = Arc::new(IndexSlot::new());
            match ready.remove(&column.field) {
                Some(graph) => {
                    let _ = slot.set(Some(SealedIndex::new(graph, &buffer, column.dim, column.metric)));
                    // Quantising read every vector.
                    if let Some(mapped) = &column.mapped {
                        mapped.release_resident();
                    }
                }
                None => {
                    let source = match (repairs.remove(&column.field), column.growing.take()) {
                        (Some(repair), _) => GraphSource::Repair(repair),
                        (None, Some(graph)) => GraphSource::Grown(graph),
                        (None, None) => GraphSource::Build,
                    };
                    let build = IndexBuild {
                        slot: slot.clone(),
                        vectors: buffer,
                        mapped: column.mapped.clone(),
                        dim: column.dim,
                        metric: column.metric,
                    };
                    spawn_index_build(build, source, params.index, &self.uid, lane)
                }
            }
            column.index = Some(slot);
        }
    }

    /// Writes the sealed chunk's vectors to files of `files` and maps them
    /// in place of the heap buffers (see [`crate::vector_file`]). A field
    /// whose file cannot be written keeps its vectors on the heap.
    fn move_vectors_to(&mut self, files: &VectorFiles) {
        let [batch] = self.chunks.as_slice() else { return };
        let mut batch = batch.clone();
        for column in &mut self.vectors {
            let values = vector_buffer(&batch, column.field, column.dim);
            let moved = files.store(&values).and_then(|mapped| {
                let batch = with_vector_values(&batch, column.field, column.dim, mapped.buffer())?;
                Ok((batch, mapped))
            });
            match moved {
                Ok((moved, mapped)) => {
                    batch = moved;
                    column.mapped = Some(mapped);
                }
                Err(e) => tracing::warn!(segment = self.uid, field = column.field, "vectors stay in memory: {e}"),
            }
        }
        self.chunks = vec![batch];
    }

    /// Whether `hidden` rows (see [`Segment::restore`]) are never visible.
    pub fn is_hidden(&self, row: u32) -> bool {
        self.insert_ts[row as usize] == ALIVE
    }

    /// The rows of this sealed segment that some read inside the window
    /// after `horizon` can still see, as a new sealed segment of its own
    /// (uid `uid`, index building in the background), with the source row
    /// of each new row.
    pub fn compacted(
        inputs: &[&Segment],
        uid: String,
        schema: &CollectionSchema,
        horizon: Timestamp,
        params: &SealParams,
    ) -> Result<(Segment, Vec<(usize, u32)>)> {
        let mut output = Segment::new(schema);
        output.uid = uid;
        let mut sources = Vec::new();
        for (input_index, input) in inputs.iter().enumerate() {
            let Some(chunk) = input.chunks.first().filter(|_| input.sealed) else { continue };
            let keep: Vec<u32> =
                (0..input.len()).filter(|&row| !input.is_dead(row, horizon)).map(|r| r as u32).collect();
            if keep.is_empty() {
                continue;
            }
            let batch = vectorflow_core::batch::take_rows(chunk, &keep)?;
            let first = output.len();
            let versions = keep.iter().map(|&row| input.versions[row as usize]).collect();
            output.append(batch, versions, 0)?;
            for (i, &row) in keep.iter().enumerate() {
                output.insert_ts[first + i] = input.insert_ts[row as usize];
                *output.delete_ts[first + i].get_mut() = input.delete_ts(row as usize);
                sources.push((input_index, row));
            }
        }
        output.recount_retired();
        output.max_insert_ts = output.insert_ts.iter().copied().max().unwrap_or(0);
        let repairs = match inputs {
            [input] if sources.len() * 2 >= input.len() => input.graph_repairs(&sources),
            _ => HashMap::new(),
        };
        output.seal_repairing(repairs, params, BuildLane::Merge)?;
        Ok((output, sources))
    }

    /// How to repair each vector field's graph for a rewrite of this
    /// segment that keeps the rows `sources` names (all of them from this
    /// one): only when every field's graph is built; otherwise the
    /// rewrite builds afresh.
    fn graph_repairs(&self, sources: &[(usize, u32)]) -> HashMap<usize, GraphRepair> {
        let keep: Arc<Vec<u32>> = Arc::new(sources.iter().map(|&(_, row)| row).collect());
        let mut repairs = HashMap::new();
        for column in &self.vectors {
            let (Some(from), [vectors]) = (&column.index, column.chunks.as_slice()) else { return HashMap::new() };
            if !matches!(from.get(), Some(Some(_))) {
                return HashMap::new();
            }
            repairs
                .insert(column.field, GraphRepair { from: from.clone(), vectors: vectors.clone(), keep: keep.clone() });
        }
        repairs
    }

    /// Copies the current `delete_ts` of each row's source (deletes that
    /// arrived while the compacted segment was being built).
    pub fn take_deletes_from(&mut self, inputs: &[&Segment], sources: &[(usize, u32)]) {
        for (row, &(input, source_row)) in sources.iter().enumerate() {
            self.set_delete_ts(row, inputs[input].delete_ts(source_row as usize));
        }
    }

    /// Rows not retired by any later version.
    pub fn live_rows(&self) -> usize {
        self.len() - self.retired()
    }

    pub fn pk(&self, row: u32) -> &Pk {
        &self.pks[row as usize]
    }

    pub fn version(&self, row: u32) -> VersionId {
        self.versions[row as usize]
    }

    pub fn insert_ts(&self, row: u32) -> Timestamp {
        self.insert_ts[row as usize]
    }

    #[inline]
    pub fn visible(&self, row: usize, ts: Timestamp) -> bool {
        self.insert_ts[row] <= ts && ts < self.delete_ts(row)
    }

    /// Appends rows inserted at `ts`; returns the first new row number.
    pub fn append(&mut self, batch: RecordBatch, versions: Vec<VersionId>, ts: Timestamp) -> Result<u32> {
        debug_assert!(!self.sealed, "appends go to the growing segment");
        let first = self.len();
        let pks = pks_from_array(batch.column(self.pk_field).as_ref())?;
        for column in &mut self.vectors {
            column.chunks.push(vector_buffer(&batch, column.field, column.dim));
        }
        self.tiebreaks.extend(pks.iter().map(Pk::order_key));
        self.pks.extend(pks);
        self.versions.extend(versions);
        self.insert_ts.resize(self.pks.len(), ts);
        self.delete_ts.resize_with(self.pks.len(), || AtomicU64::new(ALIVE));
        self.max_insert_ts = self.max_insert_ts.max(ts);
        self.chunk_starts.push(first);
        self.chunks.push(batch);
        Ok(first as u32)
    }

    /// Keeps the growing segment's graphs (see [`GrowingIndex`]) up with its
    /// rows: starts them once it holds [`GROWING_GRAPH_FROM_ROWS`] rows and
    /// queues the chunks appended since, for the build pool to insert.
    pub fn grow_graph(&mut self, params: IndexParams) {
        if self.sealed || self.len() < GROWING_GRAPH_FROM_ROWS {
            return;
        }
        // Only the chunks appended since the last call: one-row writes make
        // thousands of chunks, and a pass over all of them per append would
        // cost the square of the segment's writes.
        let first_new = self.chunk_starts.partition_point(|&start| start < self.graph_queued_rows);
        for column in &mut self.vectors {
            if column.growing.is_none() {
                // About the seal size: only a hint for its first allocations.
                let expected = self.pks.len().max(16_384);
                column.growing = GrowingIndex::new(column.dim, column.metric, expected, params).map(Arc::new);
            }
            let Some(graph) = &column.growing else { continue };
            for (vectors, &first) in column.chunks[first_new..].iter().zip(&self.chunk_starts[first_new..]) {
                if graph.push(first, vectors.clone()) {
                    insert_into_growing_graph(graph.clone());
                }
            }
        }
        self.graph_queued_rows = self.len();
    }

    /// Retires a row version at `ts` (a delete, or an upsert that replaced it).
    pub fn retire(&self, row: u32, ts: Timestamp) {
        self.set_delete_ts(row as usize, ts);
    }

    /// Seals the segment under `uid`: one chunk, and an HNSW index per
    /// vector field built off the calling thread.
    pub fn seal_as(&mut self, uid: String, params: &SealParams) -> Result<()> {
        self.uid = uid;
        self.seal_repairing(HashMap::new(), params, BuildLane::Seal)
    }

    /// [`Segment::seal`], repairing the graphs of the fields in `repairs`.
    fn seal_repairing(
        &mut self,
        repairs: HashMap<usize, GraphRepair>,
        params: &SealParams,
        lane: BuildLane,
    ) -> Result<()> {
        if self.sealed {
            return Ok(());
        }
        self.sealed = true;
        if self.chunks.len() > 1 {
            let schema = self.chunks[0].schema();
            let batch = arrow::compute::concat_batches(&schema, &self.chunks)?;
            self.chunks = vec![batch];
            self.chunk_starts = vec![0];
        }
        // A sealed segment's rows never grow again: give back the slack of
        // the vectors that grew by doubling (up to half of each).
        self.pks.shrink_to_fit();
        self.tiebreaks.shrink_to_fit();
        self.versions.shrink_to_fit();
        self.insert_ts.shrink_to_fit();
        self.delete_ts.shrink_to_fit();
        self.attach_or_repair_indexes(HashMap::new(), repairs, params, lane);
        Ok(())
    }

    fn locate(&self, row: usize) -> (usize, usize) {
        let chunk = self.chunk_starts.partition_point(|&start| start <= row) - 1;
        (chunk, row - self.chunk_starts[chunk])
    }

    /// The value of schema field `field` at `row`.
    pub fn value(&self, field: usize, row: u32) -> Value {
        let (chunk, local) = self.locate(row as usize);
        Value::from_array(self.chunks[chunk].column(field).as_ref(), local)
    }

    fn column(&self, field: usize) -> Option<&VectorColumn> {
        self.vectors.iter().find(|v| v.field == field)
    }

    /// Rows visible at `ts` (and passing `allowed`, when given).
    pub fn passing_count(&self, ts: Timestamp, allowed: Option<&RowSet>) -> usize {
        match allowed {
            // Every row not hidden is inserted by then: subtract the retired ones.
            None if ts >= self.max_insert_ts => self.len() - self.hidden - self.retired_by(ts),
            None => (0..self.len()).filter(|&row| self.visible(row, ts)).count(),
            Some(set) => set.rows.iter().filter(|&&row| self.visible(row as usize, ts)).count(),
        }
    }

    /// Which rows pass `filter` (visibility aside), in row order; computed
    /// once per filter for a sealed segment.
    pub fn evaluate(&self, filter: &Filter) -> Result<Arc<RowSet>> {
        if self.sealed
            && let Some(cached) = self.filter_results.lock().ok().and_then(|c| c.get(filter.text()).cloned())
        {
            return Ok(cached);
        }
        let mut passing = Vec::with_capacity(self.len());
        for chunk in &self.chunks {
            passing.extend(filter.evaluate(chunk)?);
        }
        let passing = Arc::new(RowSet::new(passing));
        if self.sealed
            && let Ok(mut cache) = self.filter_results.lock()
        {
            if cache.len() >= CACHED_FILTERS {
                cache.clear();
            }
            cache.insert(filter.text().to_string(), passing.clone());
        }
        Ok(passing)
    }

    /// The `bounds.k` rows closest to `query` in vector field `field` among
    /// those visible at `ts`, within `bounds.range` and, when given,
    /// `allowed`. `query` is already normalised for COSINE.
    /// The candidates' `segment` is 0: the segment does not know its
    /// position among those a read covers.
    pub fn search(
        &self,
        field: usize,
        query: &[f32],
        bounds: SearchBounds,
        ts: Timestamp,
        allowed: Option<&RowSet>,
        plan: SearchPlan,
    ) -> Vec<Candidate> {
        let Some(column) = self.column(field) else { return Vec::new() };
        let passing = self.passing_count(ts, allowed);
        if passing == 0 || bounds.k == 0 {
            return Vec::new();
        }
        let index = column.index.as_ref().and_then(|slot| slot.get()).and_then(Option::as_ref);
        let passes = |row: usize| allowed.is_none_or(|a| a.contains(row)) && self.visible(row, ts);
        let walks = |ef: usize| !plan.scans(passing, self.len(), ef.max(bounds.k));
        if let Some(growing) = column.growing.as_deref()
            && growing.indexed_rows() >= GROWING_GRAPH_FROM_ROWS
            && let Some(found) = self.search_growing(column, growing, query, bounds, &walks, &passes)
        {
            return found;
        }
        // A sealed segment has one chunk: its vectors are contiguous.
        if let Some(index) = index
            && column.chunks.len() == 1
        {
            let accept: Option<&dyn Fn(usize) -> bool> = if passing == self.len() { None } else { Some(&passes) };
            let walk = |ef: usize| index.search(&column.chunks[0], column.dim, column.metric, query, ef, ef, accept);
            if let Some(found) = walk_within(bounds, &walks, walk) {
                return self.candidates(found);
            }
        }
        // A selective filter, or a range the walk would have to cover most
        // of the segment for: scan the rows that pass.
        match allowed {
            Some(set) => self.exact_rows(column, query, bounds, set.rows.iter().map(|&r| r as usize), &passes),
            None => self.exact(column, query, bounds, &passes),
        }
    }

    fn candidates(&self, found: Vec<(f32, u32)>) -> Vec<Candidate> {
        found
            .into_iter()
            .map(|(distance, row)| Candidate { distance, tiebreak: self.tiebreaks[row as usize], segment: 0, row })
            .collect()
    }

    /// A growing segment's answer: its graph over the rows it holds, a scan
    /// of the rows appended since; `None` when the plan prefers a scan.
    fn search_growing(
        &self,
        column: &VectorColumn,
        graph: &GrowingIndex,
        query: &[f32],
        bounds: SearchBounds,
        walks: &dyn Fn(usize) -> bool,
        passes: &dyn Fn(usize) -> bool,
    ) -> Option<Vec<Candidate>> {
        // Read once: rows the graph takes in meanwhile are scanned, not found twice.
        let indexed = graph.indexed_rows().min(self.len());
        let walk = |ef: usize| {
            let mut found: Vec<(f32, u32)> = graph
                .search(query, ef, ef, &|row: &usize| *row < indexed && passes(*row))
                .into_iter()
                .map(|row| (distance(column.metric, query, self.vector_in(column, row)), row as u32))
                .collect();
            found.sort_unstable_by(|a, b| a.0.total_cmp(&b.0).then(a.1.cmp(&b.1)));
            found
        };
        let mut top = TopK::new(bounds.k);
        for candidate in self.candidates(walk_within(bounds, walks, walk)?) {
            top.push(candidate);
        }
        for candidate in self.exact_rows(column, query, bounds, indexed..self.len(), passes) {
            top.push(candidate);
        }
        Some(top.into_sorted())
    }

    /// Rows visible at `ts` and allowed, in row order.
    pub fn matching_rows(&self, ts: Timestamp, allowed: Option<&RowSet>) -> Vec<u32> {
        match allowed {
            Some(set) => set.rows.iter().copied().filter(|&row| self.visible(row as usize, ts)).collect(),
            None => (0..self.len() as u32).filter(|&row| self.visible(row as usize, ts)).collect(),
        }
    }

    /// Exact top-k over the given rows (those `passes` accepts).
    fn exact_rows(
        &self,
        column: &VectorColumn,
        query: &[f32],
        bounds: SearchBounds,
        rows: impl Iterator<Item = usize>,
        passes: &dyn Fn(usize) -> bool,
    ) -> Vec<Candidate> {
        let mut top = TopK::new(bounds.k);
        for row in rows.filter(|&row| passes(row)) {
            let d = distance(column.metric, query, self.vector_in(column, row));
            if d <= top.threshold() && bounds.range.contains(d) {
                top.push(Candidate { distance: d, tiebreak: self.tiebreaks[row], segment: 0, row: row as u32 });
            }
        }
        top.into_sorted()
    }

    fn vector_in<'a>(&'a self, column: &'a VectorColumn, row: usize) -> &'a [f32] {
        let (chunk, local) = self.locate(row);
        &column.chunks[chunk][local * column.dim..(local + 1) * column.dim]
    }

    fn exact(
        &self,
        column: &VectorColumn,
        query: &[f32],
        bounds: SearchBounds,
        passes: &dyn Fn(usize) -> bool,
    ) -> Vec<Candidate> {
        let mut top = TopK::new(bounds.k);
        for (chunk, buffer) in column.chunks.iter().enumerate() {
            let start = self.chunk_starts[chunk];
            for (local, vector) in buffer.chunks_exact(column.dim).enumerate() {
                let row = start + local;
                if !passes(row) {
                    continue;
                }
                let d = distance(column.metric, query, vector);
                if d <= top.threshold() && bounds.range.contains(d) {
                    top.push(Candidate { distance: d, tiebreak: self.tiebreaks[row], segment: 0, row: row as u32 });
                }
            }
        }
        top.into_sorted()
    }
}

/// Up to `bounds.k` rows within `bounds.range` from graph walks:
/// `walk(ef)` answers the `ef` rows nearest the query, nearest first, with
/// exact distances. A range that excludes the nearest rows (a
/// `range_filter`) needs a wider walk: `ef` doubles until the walk holds
/// `k` rows in the range, reaches past it, or runs out of rows. `None`
/// once `walks` says a scan is cheaper than a walk that wide.
fn walk_within(
    bounds: SearchBounds,
    walks: &dyn Fn(usize) -> bool,
    mut walk: impl FnMut(usize) -> Vec<(f32, u32)>,
) -> Option<Vec<(f32, u32)>> {
    let mut ef = bounds.ef.max(bounds.k);
    loop {
        if !walks(ef) {
            return None;
        }
        let found = walk(ef);
        let ran_out = found.len() < ef;
        let reached_past = found.last().is_some_and(|&(d, _)| d >= bounds.range.below);
        let mut inside: Vec<(f32, u32)> = if bounds.range == DistanceRange::ALL {
            found
        } else {
            found.into_iter().filter(|&(d, _)| bounds.range.contains(d)).collect()
        };
        if inside.len() >= bounds.k || ran_out || reached_past {
            inside.truncate(bounds.k);
            return Some(inside);
        }
        ef = ef.saturating_mul(2);
    }
}

/// Where a sealed segment's graph comes from.
enum GraphSource {
    /// A fresh `hnsw_rs` build over the segment's vectors.
    Build,
    /// The graph the segment grew while growing, finished (its last rows
    /// inserted) and frozen; built afresh if that fails.
    Grown(Arc<GrowingIndex>),
    /// The graph of the segment this one rewrites, repaired.
    Repair(GraphRepair),
}

/// A rewrite's graph as its source segment's graph without the dropped
/// rows (see [`FrozenGraph::without_dropped_rows`]).
struct GraphRepair {
    /// The source segment's graph slot (built).
    from: Arc<IndexSlot>,
    /// The source segment's vectors.
    vectors: ScalarBuffer<f32>,
    /// The source rows kept, ascending.
    keep: Arc<Vec<u32>>,
}

/// One vector field's index to build: where it goes, over which vectors.
struct IndexBuild {
    slot: Arc<IndexSlot>,
    /// The sealed segment's vectors of the field, row-major.
    vectors: ScalarBuffer<f32>,
    /// Their file, when they are kept on disk: the build reads them all.
    mapped: Option<MappedVectors>,
    dim: usize,
    metric: Metric,
}

/// Builds a graph into `slot` in the build pool (see [`build_pool`]),
/// freezes it and quantises the vectors for it. The slot ends up `None`
/// if the build fails; the segment then keeps answering exactly.
fn spawn_index_build(build: IndexBuild, source: GraphSource, params: IndexParams, uid: &str, lane: BuildLane) {
    let segment = uid.to_string();
    let IndexBuild { slot, vectors, mapped, dim, metric } = build;
    build_pool::submit(lane, move || {
        let started = std::time::Instant::now();
        // `hnsw_rs`'s structure (its own copy of the vectors, pointer-linked
        // neighbour lists) lives only until it is frozen; dropping it in the
        // pool keeps its parallel teardown on the pool's threads too.
        // Unwind safety: after a panic the graph being built is dropped,
        // never searched (the segment answers exactly or builds afresh).
        let built = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            let graph = match &source {
                GraphSource::Build => build_pool::install(|| HnswIndex::build(&vectors, dim, metric, params).freeze()),
                GraphSource::Repair(GraphRepair { from, vectors, keep }) => match from.get() {
                    Some(Some(index)) => index.graph().without_dropped_rows(keep, vectors, dim, metric, params.m),
                    _ => Err(vectorflow_core::Error::Internal("the graph to repair is gone".into())),
                },
                GraphSource::Grown(graph) => finish_grown_graph(graph, &vectors, dim, metric, params, &segment),
            }?;
            Ok::<_, vectorflow_core::Error>(SealedIndex::new(graph, &vectors, dim, metric))
        }));
        match built {
            Ok(Ok(index)) => {
                let repaired = matches!(source, GraphSource::Repair(_));
                let rows = index.graph().rows();
                tracing::debug!(segment, ?lane, repaired, rows, elapsed = ?started.elapsed(), "index built");
                let _ = slot.set(Some(index));
            }
            Ok(Err(e)) => {
                tracing::error!(segment, "the index build failed, the segment answers exactly: {e}");
                let _ = slot.set(None);
            }
            Err(_) => {
                tracing::error!(segment, "the index build panicked; the segment answers exactly");
                let _ = slot.set(None);
            }
        }
        if let Some(mapped) = &mapped {
            mapped.release_resident();
        }
    });
}

/// Queues a job inserting `graph`'s queued rows in the seal lane; it
/// queues itself again after [`GROWING_GRAPH_BUDGET`] rows while rows wait.
/// If an insert panics the graph stops growing (its rows keep being
/// scanned) and the seal builds the segment's graph afresh.
fn insert_into_growing_graph(graph: Arc<GrowingIndex>) {
    build_pool::submit(BuildLane::Seal, move || {
        let more = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            build_pool::install(|| graph.insert_queued(GROWING_GRAPH_BUDGET))
        }));
        match more {
            Ok(true) => insert_into_growing_graph(graph),
            Ok(false) => {}
            Err(_) => tracing::error!("an insert into a growing segment's graph panicked; the graph stops growing"),
        }
    });
}

/// The graph a segment grew while growing, with its last rows inserted
/// and frozen; built afresh if an insert failed or panicked (the rows are
/// all there, only the graph is lost).
fn finish_grown_graph(
    graph: &GrowingIndex,
    vectors: &ScalarBuffer<f32>,
    dim: usize,
    metric: Metric,
    params: IndexParams,
    segment: &str,
) -> Result<FrozenGraph> {
    let rows = vectors.len().checked_div(dim).unwrap_or(0);
    // Unwind safety: a graph an insert panicked in is never used again.
    let finished =
        std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| build_pool::install(|| graph.finish(rows))));
    let problem = match finished {
        Ok(Ok(frozen)) => return Ok(frozen),
        Ok(Err(e)) => e.to_string(),
        Err(_) => "an insert panicked".to_string(),
    };
    tracing::warn!(segment, "the graph grown with the segment is unusable ({problem}); building afresh");
    build_pool::install(|| HnswIndex::build(vectors, dim, metric, params).freeze())
}

/// What a stored segment was when it was written.
#[derive(Debug)]
pub enum Restored {
    /// Sealed, with the graphs that loaded (a vector field without one is
    /// built again, in the background).
    Sealed { indexes: HashMap<usize, FrozenGraph> },
    /// The rows a checkpoint took of a growing segment.
    Growing,
}

impl Restored {
    /// Sealed, every graph to be built.
    pub fn sealed() -> Restored {
        Restored::Sealed { indexes: HashMap::new() }
    }
}

/// What persistence writes of a sealed segment.
#[derive(Debug, Clone)]
pub struct SegmentSnapshot {
    pub uid: String,
    /// The user columns, then [`SYSTEM_COLUMNS`].
    pub data: RecordBatch,
    /// `(field, metric, slot)` per vector field.
    pub indexes: Vec<(usize, Metric, Arc<IndexSlot>)>,
    /// The vector files of the segment, when its vectors are kept on disk.
    mapped: Vec<MappedVectors>,
}

impl SegmentSnapshot {
    /// Takes the pages of the segment's vector files that writing it read
    /// out of the resident set again (see [`MappedVectors::release_resident`]).
    pub fn release_resident(&self) {
        self.mapped.iter().for_each(MappedVectors::release_resident);
    }
}

/// Columns stored after the user's: insert time and version id.
pub const SYSTEM_COLUMNS: [&str; 4] = ["__insert_ts", "__version_ts", "__version_partition", "__version_row"];

fn system_fields() -> Vec<Field> {
    let types = [ArrowType::UInt64, ArrowType::UInt64, ArrowType::UInt32, ArrowType::UInt32];
    SYSTEM_COLUMNS.iter().zip(types).map(|(name, t)| Field::new(*name, t, false)).collect()
}

/// `batch` with the `FixedSizeList<Float32>` column `field` over `values`
/// (the same vectors, held elsewhere).
fn with_vector_values(batch: &RecordBatch, field: usize, dim: usize, values: ScalarBuffer<f32>) -> Result<RecordBatch> {
    let list = batch.column(field).as_fixed_size_list();
    let (item, _, _, nulls) = list.clone().into_parts();
    let values = Arc::new(arrow::array::Float32Array::new(values, None));
    let size = i32::try_from(dim).map_err(|_| Error::Internal(format!("dimension {dim} out of range")))?;
    let array = arrow::array::FixedSizeListArray::try_new(item, size, values, nulls)?;
    let mut columns = batch.columns().to_vec();
    columns[field] = Arc::new(array);
    Ok(RecordBatch::try_new(batch.schema(), columns)?)
}

/// The contiguous values of a `FixedSizeList<Float32>` column.
fn vector_buffer(batch: &RecordBatch, field: usize, dim: usize) -> ScalarBuffer<f32> {
    let list = batch.column(field).as_fixed_size_list();
    let values = list.values().as_primitive::<Float32Type>().values().clone();
    let offset = list.offset() * dim;
    values.slice(offset, list.len() * dim)
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};
    use vectorflow_core::FieldSchema;
    use vectorflow_core::batch::{WriteBatch, WriteKind, vector_array};

    #[test]
    fn the_plan_scans_when_a_walk_would_compute_more_distances_than_the_passing_rows() {
        let plan = SearchPlan::default();
        assert!(!plan.scans(16_384, 16_384, 64), "unfiltered: the graph");
        assert!(plan.scans(1_638, 16_384, 64), "10 % of a sealed segment: scan");
        assert!(plan.scans(999, 1_000_000, 10), "below exact_below_rows");
        assert!(plan.scans(40_000, 1_000_000, 64), "4 % of a million");
        let by_cost_only = SearchPlan { exact_below_fraction: 0.0, ..plan };
        assert!(by_cost_only.scans(40_000, 1_000_000, 64) && !by_cost_only.scans(50_000, 1_000_000, 64));
        assert!(!plan.scans(150_000, 1_000_000, 64), "15 % of a million: the graph");
        let never = SearchPlan { exact_below_rows: 0, exact_below_fraction: 0.0, graph_cost_per_ef: 0.0 };
        assert!(!never.scans(1, 16_384, 64));
    }

    fn l2_schema() -> CollectionSchema {
        CollectionSchema::new(
            "t",
            vec![FieldSchema::int64_primary("id", false), FieldSchema::vector("v", 8, Metric::L2)],
        )
    }

    /// Rows with keys `first..` and the 8-dimensional `values`, written at `ts`.
    fn rows_of(
        schema: &CollectionSchema,
        first: usize,
        values: &[f32],
        ts: Timestamp,
    ) -> (RecordBatch, Vec<VersionId>) {
        let rows = values.len() / 8;
        let input = RecordBatch::try_new(
            std::sync::Arc::new(arrow::datatypes::Schema::new(vec![
                arrow::datatypes::Field::new("id", arrow::datatypes::DataType::Int64, false),
                arrow::datatypes::Field::new("v", schema.fields[1].data_type.arrow_type(), false),
            ])),
            vec![
                std::sync::Arc::new(arrow::array::Int64Array::from_iter_values(
                    (first..first + rows).map(|k| k as i64),
                )),
                vector_array(8, values.to_vec()).unwrap(),
            ],
        )
        .unwrap();
        let batch = WriteBatch::from_record_batch(schema, &input, WriteKind::Upsert).unwrap().batch;
        let versions = (0..rows as u32).map(|row| VersionId { ts, partition: 0, row: first as u32 + row }).collect();
        (batch, versions)
    }

    /// A sealed, indexed segment of `rows` random 8-dimensional L2 vectors
    /// (keys `0..rows`, inserted at 10), with its schema and the vectors.
    fn indexed_random_segment(rows: usize, rng: &mut rand::rngs::StdRng) -> (CollectionSchema, Vec<f32>, Segment) {
        let schema = l2_schema();
        let values: Vec<f32> = (0..rows * 8).map(|_| rng.random_range(-1.0..1.0)).collect();
        let (batch, versions) = rows_of(&schema, 0, &values, 10);
        let mut segment = Segment::new(&schema);
        segment.append(batch, versions, 10).unwrap();
        segment.seal_as("s".into(), &SealParams::default()).unwrap();
        while !segment.is_indexed() {
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        (schema, values, segment)
    }

    /// The exact top `k` rows of `values` (8-dimensional) near `query` among `rows`.
    fn exact_top(values: &[f32], rows: std::ops::Range<usize>, query: &[f32], k: usize) -> Vec<u32> {
        let mut exact: Vec<(f32, u32)> =
            rows.map(|r| (distance(Metric::L2, query, &values[r * 8..(r + 1) * 8]), r as u32)).collect();
        exact.sort_by(|a, b| a.0.total_cmp(&b.0));
        exact.into_iter().take(k).map(|x| x.1).collect()
    }

    #[test]
    fn a_growing_segment_searches_through_its_graph_and_finds_rows_appended_since_at_once() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(11);
        let schema = l2_schema();
        let params = IndexParams::default();
        // Always the graph when there is one: this test is about the graph.
        let plan = SearchPlan { exact_below_rows: 0, exact_below_fraction: 0.0, graph_cost_per_ef: 0.0 };
        let mut segment = Segment::new(&schema);
        let mut values: Vec<f32> = Vec::new();
        for (chunk, ts) in [(0usize, 10u64), (1, 20), (2, 30)] {
            let chunk_values: Vec<f32> = (0..700 * 8).map(|_| rng.random_range(-1.0..1.0)).collect();
            let (batch, versions) = rows_of(&schema, chunk * 700, &chunk_values, ts);
            segment.append(batch, versions, ts).unwrap();
            segment.grow_graph(params);
            values.extend(chunk_values);
        }
        let graph = segment.vectors[0].growing.clone().expect("2,100 rows grow a graph");
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
        while graph.indexed_rows() < 2_100 {
            assert!(std::time::Instant::now() < deadline, "the graph took 60 s");
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        let mut recall = |segment: &Segment, rows: usize, ts: Timestamp| {
            let mut found = 0;
            for _ in 0..20 {
                let query: Vec<f32> = (0..8).map(|_| rng.random_range(-1.0..1.0)).collect();
                let hits: Vec<u32> = segment
                    .search(1, &query, SearchBounds::top(10, 64), ts, None, plan)
                    .iter()
                    .map(|c| c.row)
                    .collect();
                found += exact_top(&values, 0..rows, &query, 10).iter().filter(|r| hits.contains(r)).count();
            }
            found as f64 / 200.0
        };
        assert!(recall(&segment, 2_100, 30) > 0.9);
        assert!(recall(&segment, 1_400, 25) > 0.9, "as of 25: the third chunk is not visible yet");

        // A row appended now is found at once, in the graph or not yet.
        let far = [9.0f32; 8];
        let (batch, versions) = rows_of(&schema, 2_100, &far, 40);
        segment.append(batch, versions, 40).unwrap();
        segment.grow_graph(params);
        let top = segment.search(1, &far, SearchBounds::top(1, 64), 40, None, plan);
        assert_eq!((top[0].row, top[0].distance), (2_100, 0.0));
        assert_ne!(
            segment.search(1, &far, SearchBounds::top(1, 64), 35, None, plan)[0].row,
            2_100,
            "not visible before 40"
        );

        // Sealed, it freezes the graph it grew (with the last row inserted).
        segment.seal_as("s".into(), &SealParams { index: params, ..SealParams::default() }).unwrap();
        assert!(segment.vectors[0].growing.is_none());
        while !segment.is_indexed() {
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        assert_eq!(graph.indexed_rows(), 2_101);
        assert_eq!(segment.search(1, &far, SearchBounds::top(1, 64), 40, None, plan)[0].row, 2_100);
        assert!(recall(&segment, 2_100, 30) > 0.9);
    }

    #[test]
    fn search_stays_exact_when_few_rows_of_an_indexed_segment_are_visible() {
        let rows = 3000;
        let mut rng = rand::rngs::StdRng::seed_from_u64(3);
        let (_, values, segment) = indexed_random_segment(rows, &mut rng);
        // Retire all but every 60th row: 50 rows stay visible.
        for row in (0..rows as u32).filter(|r| r % 60 != 0) {
            segment.retire(row, 20);
        }
        let plan = SearchPlan::default();
        let query = vec![0.1f32; 8];
        let found: Vec<u32> =
            segment.search(1, &query, SearchBounds::top(10, 16), 25, None, plan).iter().map(|c| c.row).collect();
        let mut exact: Vec<(f32, u32)> = (0..rows as u32)
            .filter(|r| r % 60 == 0)
            .map(|r| (distance(Metric::L2, &query, &values[r as usize * 8..(r as usize + 1) * 8]), r))
            .collect();
        exact.sort_by(|a, b| a.0.total_cmp(&b.0));
        assert_eq!(found, exact[..10].iter().map(|x| x.1).collect::<Vec<_>>());
        // Before the deletes every row is visible and the graph answers.
        assert_eq!(segment.search(1, &query, SearchBounds::top(10, 64), 15, None, plan).len(), 10);
    }

    #[test]
    fn a_rewrite_that_keeps_most_rows_repairs_the_graph_and_counts_stay_right() {
        let rows = 3000;
        let mut rng = rand::rngs::StdRng::seed_from_u64(5);
        let (schema, values, segment) = indexed_random_segment(rows, &mut rng);
        // A third retired at 20, a few more at 40 (after the horizon).
        let retired_at = |row: u32| match row % 30 {
            0..10 => Some(20),
            10 => Some(40),
            _ => None,
        };
        for row in (0..rows as u32).rev() {
            if let Some(ts) = retired_at(row) {
                segment.retire(row, ts);
            }
        }
        let visible_at = |ts: Timestamp| (0..rows as u32).filter(|&r| retired_at(r).is_none_or(|t| ts < t)).count();
        for ts in [5, 10, 19, 20, 39, 40, 100] {
            let expected = if ts < 10 { 0 } else { visible_at(ts) };
            assert_eq!(segment.passing_count(ts, None), expected, "at {ts}");
        }
        assert_eq!(segment.dead_rows(30), visible_at(10) - visible_at(20));
        let (mut output, sources) =
            Segment::compacted(&[&segment], "r".into(), &schema, 30, &SealParams::default()).unwrap();
        assert_eq!(segment.graph_repairs(&sources).len(), 1, "two thirds kept: the graph is repaired, not rebuilt");
        while !output.is_indexed() {
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        output.take_deletes_from(&[&segment], &sources);
        assert_eq!(output.len(), visible_at(20));
        assert_eq!(output.passing_count(100, None), visible_at(100));
        assert_eq!(output.passing_count(39, None), visible_at(39));
        let index = output.vectors[0].index.as_ref().and_then(|slot| slot.get().cloned()).flatten().unwrap();
        assert_eq!(index.graph().rows(), output.len());
        // Through the repaired graph, against exact search over what is visible now.
        let never_scan = SearchPlan { exact_below_rows: 0, exact_below_fraction: 0.0, graph_cost_per_ef: 0.0 };
        let mut hits = 0;
        for _ in 0..20 {
            let query: Vec<f32> = (0..8).map(|_| rng.random_range(-1.0..1.0)).collect();
            let found: Vec<u32> = output
                .search(1, &query, SearchBounds::top(10, 64), 100, None, never_scan)
                .iter()
                .map(|c| sources[c.row as usize].1)
                .collect();
            let mut exact: Vec<(f32, u32)> = (0..rows as u32)
                .filter(|&r| retired_at(r).is_none())
                .map(|r| (distance(Metric::L2, &query, &values[r as usize * 8..(r as usize + 1) * 8]), r))
                .collect();
            exact.sort_by(|a, b| a.0.total_cmp(&b.0));
            hits += found.iter().filter(|r| exact[..10].iter().any(|x| x.1 == **r)).count();
        }
        assert!(hits >= 190, "recall {hits}/200 through the repaired graph");
    }
}
