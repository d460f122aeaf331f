//! Standing queries ("watches"): a search, or a filter, whose answer the
//! dataflow keeps current as it applies changes, for a subscriber that is
//! sent every change of it.
//!
//! Each worker keeps, per watch of a collection, its shard's part of the
//! answer: for a search the exact `k` nearest rows of its shard per query
//! vector, for a changefeed the keys of its shard's rows that pass the
//! filter. When the worker applies the changes of a time (`graph::apply`),
//! each watch of that collection is updated from the changes alone: an
//! inserted row that passes the filter enters when it is closer than the
//! part's k-th; only when a member of the part is retired (deleted, or
//! replaced by an upsert) is the part computed again from the shard, by an
//! exact scan at that time. So a write costs a watch a distance per query
//! and row, not a search. A part that changed is handed to the watch with
//! its time ([`Part`]); the engine merges the workers' parts in time order
//! once every worker has accounted for a time (`Watch::through`) and sends
//! the subscriber the difference (`engine/subscribe.rs`).
//!
//! A watch that starts before what a worker has applied (`as_of` a past
//! time, or registered while the worker ran ahead) starts from the exact
//! answer at its start and replays the shard's history since: one exact
//! scan per time at which a row passing the filter changed.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use arrow::array::{Array, FixedSizeListArray, Float32Array};
use arrow::record_batch::RecordBatch;
use vectorflow_core::value::pk_from_array;
use vectorflow_core::{CollectionId, Error, Metric, Pk, Result, Timestamp, Value, VersionId};
use vectorflow_operators::distance::distance;
use vectorflow_operators::shard::SegmentReader;
use vectorflow_operators::{DistanceRange, Filter, Hit, SearchBounds, Shard, Stop};

use crate::messages::Answer;

/// What a watch keeps current.
#[derive(Debug, Clone)]
pub(crate) enum WatchQuery {
    /// The `k` nearest rows to each query vector (normalised for COSINE).
    Search { field: usize, metric: Metric, queries: Vec<Vec<f32>>, k: usize },
    /// Every insert, update and delete of a row that passes the filter.
    Changes,
}

/// One standing query, shared by the workers (which hand it their parts)
/// and the engine (which merges them for the subscriber).
#[derive(Debug)]
pub(crate) struct Watch {
    pub id: u64,
    pub collection: CollectionId,
    pub query: WatchQuery,
    pub filter: Option<Filter>,
    pub output_fields: Vec<usize>,
    /// The answer starts as of this time.
    pub from: Timestamp,
    /// Per worker (global index): every change at or before this time is
    /// in the parts it handed over (0: not started yet).
    pub through: Vec<AtomicU64>,
    /// Parts handed over and not merged yet.
    pub inbox: Mutex<Vec<Part>>,
    /// Set when the subscriber left or was ended: workers drop their parts.
    pub cancelled: AtomicBool,
}

impl Watch {
    pub fn new(
        id: u64,
        collection: CollectionId,
        query: WatchQuery,
        filter: Option<Filter>,
        output_fields: Vec<usize>,
        from: Timestamp,
        workers: usize,
    ) -> Watch {
        Watch {
            id,
            collection,
            query,
            filter,
            output_fields,
            from,
            through: (0..workers).map(|_| AtomicU64::new(0)).collect(),
            inbox: Mutex::new(Vec::new()),
            cancelled: AtomicBool::new(false),
        }
    }

    fn hand_over(&self, part: Part) {
        if let Ok(mut inbox) = self.inbox.lock() {
            inbox.push(part);
        }
    }

    fn accounted(&self, worker: usize, through: Timestamp) {
        self.through[worker].fetch_max(through, Ordering::AcqRel);
    }
}

/// A worker's part of a watch's answer as of `at`.
#[derive(Debug, Clone)]
pub(crate) struct Part {
    pub worker: usize,
    pub at: Timestamp,
    pub body: PartBody,
}

#[derive(Debug, Clone)]
pub(crate) enum PartBody {
    /// The shard's `k` nearest per query vector (replacing the worker's previous part).
    Top(Vec<Vec<Hit>>),
    /// The shard's rows that entered the filter's set (key and output
    /// fields) and the keys that left it.
    Rows { upserted: Vec<(Pk, Vec<Value>)>, retired: Vec<Pk> },
}

/// Every watch, by id.
#[derive(Debug, Default)]
pub(crate) struct Watches {
    all: RwLock<HashMap<u64, Arc<Watch>>>,
    /// Bumped when a watch is added or removed.
    version: AtomicU64,
}

impl Watches {
    pub fn add(&self, watch: Arc<Watch>) {
        if let Ok(mut all) = self.all.write() {
            all.insert(watch.id, watch);
        }
        self.version.fetch_add(1, Ordering::AcqRel);
    }

    pub fn remove(&self, id: u64) {
        if let Ok(mut all) = self.all.write()
            && let Some(watch) = all.remove(&id)
        {
            watch.cancelled.store(true, Ordering::Release);
        }
        self.version.fetch_add(1, Ordering::AcqRel);
    }

    pub fn all(&self) -> Vec<Arc<Watch>> {
        self.all.read().map(|all| all.values().cloned().collect()).unwrap_or_default()
    }
}

/// One worker's parts of the watches.
#[derive(Default)]
pub(crate) struct WorkerWatches {
    version: u64,
    /// Some watch starts later than what this worker has applied.
    waiting: bool,
    parts: HashMap<u64, (Arc<Watch>, Local)>,
    /// Watches whose start is being computed off this thread.
    starting: HashMap<u64, Starting>,
}

/// A job for the search pool (the worker is woken when it is done).
pub(crate) type StartJob = Box<dyn FnOnce() + Send>;

/// A watch whose part at its start is computed on the search pool, so the
/// worker goes on applying changes meanwhile; they are kept and applied
/// to the part, in order, once it is there.
struct Starting {
    watch: Arc<Watch>,
    /// Filled by the search pool.
    done: Arc<Mutex<Option<Result<Local>>>>,
    /// Changes applied since the start was taken, in time order.
    pending: Vec<OwnedApplied>,
}

/// [`Applied`], kept (the batches are shared, not copied).
struct OwnedApplied {
    ts: Timestamp,
    batches: Vec<(RecordBatch, Vec<VersionId>)>,
    added: HashSet<VersionId>,
    retired: Vec<(Pk, VersionId)>,
}

/// A worker's state of one watch.
enum Local {
    /// Per query vector, the shard's `k` nearest, closest first.
    Top(Vec<Vec<Hit>>),
    /// Keys of the shard's rows that pass the filter.
    Matching(HashSet<Pk>),
}

/// The changes one time brought to a collection on this worker.
pub(crate) struct Applied<'a> {
    pub ts: Timestamp,
    /// Row batches with their versions; only rows whose version is in `added` were inserted.
    pub batches: &'a [(RecordBatch, Vec<VersionId>)],
    pub added: &'a HashSet<VersionId>,
    pub retired: &'a [(Pk, VersionId)],
}

impl WorkerWatches {
    /// Takes in watches added or cancelled since the last call, starts
    /// those whose start this worker has applied (from the shard's
    /// history, on the search pool through `spawn`), takes in the starts
    /// that are done, and records that every started watch has accounted
    /// for every change at or before `through` on this worker.
    pub fn refresh(
        &mut self,
        watches: &Watches,
        shard_of: &dyn Fn(CollectionId) -> Option<ShardRef>,
        spawn: &dyn Fn(StartJob),
        worker: usize,
        through: Timestamp,
    ) {
        let version = watches.version.load(Ordering::Acquire);
        if version != self.version || self.waiting {
            self.version = version;
            self.waiting = false;
            self.parts.retain(|_, (watch, _)| !watch.cancelled.load(Ordering::Acquire));
            self.starting.retain(|_, starting| !starting.watch.cancelled.load(Ordering::Acquire));
            for watch in watches.all() {
                if self.parts.contains_key(&watch.id) || self.starting.contains_key(&watch.id) {
                    continue;
                }
                if watch.from > through {
                    // Starts once this worker has applied its start.
                    self.waiting = true;
                    continue;
                }
                let Some(shard) = shard_of(watch.collection) else {
                    self.parts.insert(watch.id, (watch.clone(), empty(&watch)));
                    continue;
                };
                let done = Arc::new(Mutex::new(None));
                let (job_watch, job_done) = (watch.clone(), done.clone());
                spawn(Box::new(move || {
                    let local = start(&job_watch, &shard, worker, through);
                    if let Ok(mut done) = job_done.lock() {
                        *done = Some(local);
                    }
                }));
                self.starting.insert(watch.id, Starting { watch, done, pending: Vec::new() });
            }
        }
        self.take_started(shard_of, worker);
        for (watch, _) in self.parts.values() {
            watch.accounted(worker, through);
        }
    }

    /// Moves the watches whose start is computed to the started ones,
    /// after applying the changes kept meanwhile to their parts.
    fn take_started(&mut self, shard_of: &dyn Fn(CollectionId) -> Option<ShardRef>, worker: usize) {
        let done: Vec<u64> = self
            .starting
            .iter()
            .filter(|(_, starting)| starting.done.lock().is_ok_and(|done| done.is_some()))
            .map(|(&id, _)| id)
            .collect();
        for id in done {
            let Some(Starting { watch, done, pending }) = self.starting.remove(&id) else { continue };
            let result = done.lock().ok().and_then(|mut done| done.take());
            let caught_up = result.unwrap_or_else(|| Err(Error::Internal("a start without its result".into())));
            let caught_up = caught_up.and_then(|mut local| {
                if pending.is_empty() {
                    return Ok(local);
                }
                let shard = shard_of(watch.collection)
                    .ok_or_else(|| Error::Internal("the shard of a starting standing query is gone".into()))?;
                let shard = shard.read().map_err(|_| Error::Internal("a shard's lock is poisoned".into()))?;
                for kept in &pending {
                    let applied =
                        Applied { ts: kept.ts, batches: &kept.batches, added: &kept.added, retired: &kept.retired };
                    if let Some(body) = step(&watch, &mut local, &shard, &applied)? {
                        watch.hand_over(Part { worker, at: kept.ts, body });
                    }
                }
                Ok(local)
            });
            match caught_up {
                Ok(local) => {
                    self.parts.insert(id, (watch, local));
                }
                Err(e) => tracing::error!(watch = watch.id, "starting a standing query: {e}"),
            }
        }
    }

    /// Whether any watch follows `collection` on this worker.
    pub fn follows(&self, collection: CollectionId) -> bool {
        self.parts.values().any(|(watch, _)| watch.collection == collection)
            || self.starting.values().any(|starting| starting.watch.collection == collection)
    }

    /// Updates the watches of `collection` with the changes applied at
    /// `applied.ts` to `shard` (which holds them now).
    pub fn applied(&mut self, shard: &Shard, collection: CollectionId, applied: &Applied<'_>, worker: usize) {
        for starting in self.starting.values_mut().filter(|s| s.watch.collection == collection) {
            let versions: HashSet<VersionId> =
                applied.batches.iter().flat_map(|(_, versions)| versions.iter().copied()).collect();
            starting.pending.push(OwnedApplied {
                ts: applied.ts,
                batches: applied.batches.to_vec(),
                added: applied.added.intersection(&versions).copied().collect(),
                retired: applied.retired.to_vec(),
            });
        }
        for (watch, local) in self.parts.values_mut() {
            if watch.collection != collection || watch.cancelled.load(Ordering::Acquire) {
                continue;
            }
            match step(watch, local, shard, applied) {
                Ok(Some(body)) => watch.hand_over(Part { worker, at: applied.ts, body }),
                Ok(None) => {}
                Err(e) => tracing::error!(watch = watch.id, ts = applied.ts, "updating a standing query: {e}"),
            }
            watch.accounted(worker, applied.ts);
        }
    }
}

/// A worker's shard, as [`crate::shards`] hands them out.
pub(crate) type ShardRef = crate::shards::ShardHandle;

fn empty(watch: &Watch) -> Local {
    match &watch.query {
        WatchQuery::Search { queries, .. } => Local::Top(vec![Vec::new(); queries.len()]),
        WatchQuery::Changes => Local::Matching(HashSet::new()),
    }
}

/// The exact `k` nearest of the shard at `ts`, per query vector.
fn exact_top(watch: &Watch, shard: &Shard, ts: Timestamp) -> Result<Vec<Vec<Hit>>> {
    exact_top_of(watch, shard.reader(), ts)
}

/// The exact `k` nearest among `segments` at `ts`, per query vector.
fn exact_top_of(watch: &Watch, segments: SegmentReader<'_>, ts: Timestamp) -> Result<Vec<Vec<Hit>>> {
    let WatchQuery::Search { field, queries, k, .. } = &watch.query else { return Ok(Vec::new()) };
    let bounds = SearchBounds { k: *k, ef: *k, range: DistanceRange::ALL };
    let never = || false;
    segments.exact().search(*field, queries, bounds, ts, watch.filter.as_ref(), &watch.output_fields, Stop(&never))
}

/// A watch's part at its start on this worker, with the history since
/// (through `through`) handed over.
fn start(watch: &Watch, handle: &ShardRef, worker: usize, through: Timestamp) -> Result<Local> {
    let never = || false;
    let stop = Stop(&never);
    let shard = handle.read().map_err(|_| Error::Internal("a shard's lock is poisoned".into()))?;
    let history =
        shard.reader().changes_between(watch.from, through, watch.filter.as_ref(), &watch.output_fields, stop)?;
    if history.is_empty() {
        // Only the answer at the start: the growing segment under the
        // shard's lock, the sealed ones after it is released (as reads
        // do), so the worker applies changes meanwhile.
        let sealed = shard.sealed_view();
        return match &watch.query {
            WatchQuery::Search { k, .. } => {
                let growing = exact_top_of(watch, shard.growing_reader(), watch.from)?;
                drop(shard);
                let mut top = Answer::Search { k: *k, hits: growing };
                top.merge(Answer::Search { k: *k, hits: exact_top_of(watch, sealed.reader(), watch.from)? });
                let Answer::Search { hits, .. } = top else {
                    return Err(Error::Internal("a merged search is not a search".into()));
                };
                watch.hand_over(Part { worker, at: watch.from, body: PartBody::Top(hits.clone()) });
                Ok(Local::Top(hits))
            }
            WatchQuery::Changes => {
                let filter = watch.filter.as_ref();
                let growing = shard.growing_reader().query(filter, watch.from, &[], usize::MAX, stop)?;
                drop(shard);
                let mut matching: HashSet<Pk> = growing.into_iter().map(|(pk, _)| pk).collect();
                let sealed = sealed.reader().query(filter, watch.from, &[], usize::MAX, stop)?;
                matching.extend(sealed.into_iter().map(|(pk, _)| pk));
                Ok(Local::Matching(matching))
            }
        };
    }
    match &watch.query {
        WatchQuery::Search { .. } => {
            let mut top = exact_top(watch, &shard, watch.from)?;
            watch.hand_over(Part { worker, at: watch.from, body: PartBody::Top(top.clone()) });
            for &at in history.keys() {
                let now = exact_top(watch, &shard, at)?;
                if now != top {
                    top = now;
                    watch.hand_over(Part { worker, at, body: PartBody::Top(top.clone()) });
                }
            }
            Ok(Local::Top(top))
        }
        WatchQuery::Changes => {
            let rows = shard.reader().query(watch.filter.as_ref(), watch.from, &[], usize::MAX, stop)?;
            let mut matching: HashSet<Pk> = rows.into_iter().map(|(pk, _)| pk).collect();
            for (at, (upserted, retired)) in history {
                let retired: Vec<Pk> = retired.into_iter().filter(|pk| matching.remove(pk)).collect();
                matching.extend(upserted.iter().map(|(pk, _)| pk.clone()));
                watch.hand_over(Part { worker, at, body: PartBody::Rows { upserted, retired } });
            }
            Ok(Local::Matching(matching))
        }
    }
}

/// Updates a worker's part with the changes of one time; the new part
/// when it changed.
fn step(watch: &Watch, local: &mut Local, shard: &Shard, applied: &Applied<'_>) -> Result<Option<PartBody>> {
    let passing: Vec<Vec<bool>> = applied
        .batches
        .iter()
        .map(|(batch, _)| match &watch.filter {
            Some(filter) => filter.evaluate(batch),
            None => Ok(vec![true; batch.num_rows()]),
        })
        .collect::<Result<_>>()?;
    let inserted = || {
        applied.batches.iter().zip(&passing).flat_map(|((batch, versions), passing)| {
            (0..batch.num_rows())
                .filter(move |&row| passing[row] && applied.added.contains(&versions[row]))
                .map(move |row| (batch, row))
        })
    };
    match (local, &watch.query) {
        (Local::Top(tops), WatchQuery::Search { field, metric, queries, k }) => {
            let retired: HashSet<&Pk> = applied.retired.iter().map(|(pk, _)| pk).collect();
            // A member left: this part is computed again, exactly.
            if tops.iter().flatten().any(|hit| retired.contains(&hit.pk)) {
                let now = exact_top(watch, shard, applied.ts)?;
                let changed = now != *tops;
                *tops = now;
                return Ok(changed.then(|| PartBody::Top(tops.clone())));
            }
            let mut changed = false;
            for (batch, row) in inserted() {
                let vector = row_vector(batch, *field, row)?;
                let pk = pk_from_array(batch.column(pk_column(batch, shard)?).as_ref(), row)?;
                for (top, query) in tops.iter_mut().zip(queries) {
                    let candidate = (distance(*metric, query, vector), pk.order_key());
                    let enters =
                        top.len() < *k || top.last().is_some_and(|kth| candidate < (kth.distance, kth.pk.order_key()));
                    if !enters {
                        continue;
                    }
                    let fields =
                        watch.output_fields.iter().map(|&f| Value::from_array(batch.column(f).as_ref(), row)).collect();
                    let at = top.partition_point(|hit| (hit.distance, hit.pk.order_key()) < candidate);
                    top.insert(at, Hit { pk: pk.clone(), distance: candidate.0, fields });
                    top.truncate(*k);
                    changed = true;
                }
            }
            Ok(changed.then(|| PartBody::Top(tops.clone())))
        }
        (Local::Matching(matching), WatchQuery::Changes) => {
            let retired: Vec<Pk> =
                applied.retired.iter().map(|(pk, _)| pk.clone()).filter(|pk| matching.remove(pk)).collect();
            let mut upserted = Vec::new();
            for (batch, row) in inserted() {
                let pk = pk_from_array(batch.column(pk_column(batch, shard)?).as_ref(), row)?;
                let fields =
                    watch.output_fields.iter().map(|&f| Value::from_array(batch.column(f).as_ref(), row)).collect();
                matching.insert(pk.clone());
                upserted.push((pk, fields));
            }
            Ok((!upserted.is_empty() || !retired.is_empty()).then_some(PartBody::Rows { upserted, retired }))
        }
        _ => Err(Error::Internal(format!("watch {}: its state does not fit its query", watch.id))),
    }
}

fn pk_column(batch: &RecordBatch, shard: &Shard) -> Result<usize> {
    let index = shard.schema().primary_index();
    if index < batch.num_columns() { Ok(index) } else { Err(Error::Internal("a batch without its key column".into())) }
}

/// Row `row`'s vector in column `field` of `batch`.
fn row_vector(batch: &RecordBatch, field: usize, row: usize) -> Result<&[f32]> {
    let list = batch
        .column(field)
        .as_any()
        .downcast_ref::<FixedSizeListArray>()
        .ok_or_else(|| Error::Internal(format!("column {field} holds no vectors")))?;
    let values = list
        .values()
        .as_any()
        .downcast_ref::<Float32Array>()
        .ok_or_else(|| Error::Internal(format!("column {field}'s vectors are not f32")))?;
    let dim = list.value_length() as usize;
    let start = list.value_offset(row) as usize;
    values.values().get(start..start + dim).ok_or_else(|| Error::Internal("a vector outside its column".into()))
}
