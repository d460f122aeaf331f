//! The per-worker dataflow: log source → exchange by key → upsert
//! arrangement → segment operator ← routed requests; partial answers go to
//! the origin worker's merge.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use differential_dataflow::operators::arrange::upsert::arrange_from_upsert;
use differential_dataflow::trace::implementations::{ValBuilder, ValSpine};
use timely::dataflow::channels::pact::{Exchange, Pipeline};
use timely::dataflow::operators::Capability;
use timely::dataflow::operators::core::{Concat, Exchange as ExchangeOp};
use timely::dataflow::operators::generic::operator::{Operator, source};
use timely::dataflow::operators::vec::Map;
use timely::dataflow::{Scope, StreamVec};
use timely::worker::Worker;
use vectorflow_connectors::{LogEntry, LogOp};
use vectorflow_core::value::pk_from_array;
use vectorflow_core::{CollectionId, IpcBatch, Pk, Timestamp, VersionId};
use vectorflow_operators::Shard;

use crate::messages::{
    Answer, ChunkBody, Failure, Partial, Request, RequestKind, SegmentInput, ShardCheckpoint, ShardChunk, StoredFiles,
    unix_millis,
};
use crate::persist::PERSIST_TIMEOUT;
use crate::routing::shard_of;
use crate::shards::{WorkerShards, empty_answer};
use crate::shared::Shared;
use crate::watches::{Applied, WorkerWatches};

/// A shard recovery loaded: its collection, checkpoint time and segments.
pub(crate) type RecoveredShard = (CollectionId, Timestamp, Shard);

/// An upsert event of the primary-key arrangement: key, version (`None`: delete), time.
type UpsertEvent = (Key, Option<VersionId>, Timestamp);

/// Builds the dataflow on one worker and steps it until shutdown.
pub(crate) fn run_worker(worker: &mut Worker, shared: Arc<Shared>) {
    let index = worker.index();
    let peers = worker.peers();
    // A worker that unwinds takes its part of every answer with it, and in
    // a cluster that is what a dead process does to the others (timely's
    // exchange panics on a broken connection): stop serving, loudly.
    struct StopOnPanic(Arc<Shared>, usize);
    impl Drop for StopOnPanic {
        fn drop(&mut self) {
            if std::thread::panicking() {
                self.0.dataflow_stopped(format!(
                    "worker {} ended in a panic (in a cluster: another process died or its connection broke)",
                    self.1
                ));
            }
        }
    }
    let _stop_on_panic = StopOnPanic(shared.clone(), index);
    worker.dataflow::<Timestamp, _, _>(|scope| build(scope, &shared, index, peers));
    while !shared.shutdown.load(Ordering::Acquire) {
        worker.step_or_park(Some(shared.tick));
    }
    for dataflow in worker.installed_dataflows() {
        worker.drop_dataflow(dataflow);
    }
}

type Key = (CollectionId, Pk);

fn build<'scope>(scope: Scope<'scope, Timestamp>, shared: &Arc<Shared>, index: usize, peers: usize) {
    let recovered = shared.recovered.lock().ok().and_then(|mut r| r.remove(&index)).unwrap_or_default();
    let restored_versions: Vec<(Timestamp, Vec<UpsertEvent>)> = recovered
        .iter()
        .map(|(collection, at, shard)| {
            let versions = shard.live_versions().into_iter().map(|(pk, v)| ((*collection, pk), Some(v), *at)).collect();
            (*at, versions)
        })
        .collect();
    for (collection, _, shard) in recovered {
        shared.shards[index].insert(collection, shard);
    }

    let chunks = log_source(scope, shared.clone(), index, peers).exchange(|chunk: &ShardChunk| chunk.shard as u64);

    let upserts = chunks.clone().flat_map(|chunk: ShardChunk| {
        let collection = chunk.collection;
        let ts = chunk.ts;
        let events: Vec<UpsertEvent> = match chunk.body {
            ChunkBody::Upsert { pks, versions, .. } => {
                pks.into_iter().zip(versions).map(|(pk, v)| ((collection, pk), Some(v), ts)).collect()
            }
            ChunkBody::Delete { pks } => pks.into_iter().map(|pk| ((collection, pk), None, ts)).collect(),
        };
        events
    });
    // Recovered shards already hold their rows; the arrangement learns each
    // key's current version at the checkpoint time, and the segment
    // operator ignores these (no rows come with them).
    let upserts = upserts.concat(restore_source(scope, restored_versions));
    let arranged = arrange_from_upsert::<
        ValBuilder<Key, VersionId, Timestamp, isize>,
        ValSpine<Key, VersionId, Timestamp, isize>,
        Key,
        VersionId,
    >(upserts, "PrimaryKeyVersions");
    // The arrangement places keys by differential's own hash; each change
    // goes back to the key's shard, where its rows are.
    let changes = arranged
        .as_collection(move |key: &Key, version: &VersionId| {
            (shard_of(key.0, &key.1, peers), key.0, key.1.clone(), *version)
        })
        .inner
        .exchange(|((shard, ..), _, _)| *shard as u64)
        .map(|((_, collection, pk, version), ts, diff)| SegmentInput::Change { collection, pk, version, ts, diff });

    let data = chunks.map(SegmentInput::Chunk).concat(changes);
    // Each request goes to the workers that answer it (every worker, or a
    // get's key owners), exchanged there like the data.
    let requests = request_source(scope, shared.clone(), index)
        .flat_map(|request| request.targets.clone().into_iter().map(move |target| (target, request.clone())))
        .exchange(|(target, _): &(usize, Request)| *target as u64)
        .map(|(_, request)| request);
    let partials = segments(data, requests, shared.clone(), index);
    merge(partials, shared.clone());
}

/// Reads this worker's log partitions and cuts each record into per-shard chunks.
fn log_source<'scope>(
    scope: Scope<'scope, Timestamp>,
    shared: Arc<Shared>,
    index: usize,
    peers: usize,
) -> StreamVec<'scope, Timestamp, ShardChunk> {
    source(scope, "LogSource", move |capability, info| {
        let wake = scope.worker().sync_activator_for(info.address.to_vec());
        let wake = Box::new(move || {
            let _ = wake.activate();
        });
        let mut reader = match shared.log.reader(index, peers, &shared.replay_from, wake) {
            Ok(reader) => reader,
            Err(e) => {
                tracing::error!(worker = index, "no log reader, this worker reads nothing: {e}");
                None
            }
        };
        let activator = scope.worker().sync_activator_for(info.address.to_vec());
        if let Ok(mut activators) = shared.source_activators.lock() {
            activators.insert(index, scope.worker().sync_activator_for(info.address.to_vec()));
        }
        let delayed = scope.worker().activator_for(info.address.clone());
        let mut capability = reader.is_some().then_some(capability);
        // Rows emitted and not yet applied, by time.
        let mut in_flight: VecDeque<(Timestamp, usize)> = VecDeque::new();
        let mut in_flight_rows = 0;
        move |output| {
            if shared.shutdown.load(Ordering::Acquire) {
                capability = None;
            }
            let (Some(cap), Some(reader)) = (capability.as_mut(), reader.as_mut()) else { return };
            if shared.ingest_paused.load(Ordering::Acquire) {
                delayed.activate_after(shared.tick);
                return;
            }
            let applied = shared.applied_frontier();
            while in_flight.front().is_some_and(|(ts, _)| *ts < applied) {
                in_flight_rows -= in_flight.pop_front().map_or(0, |(_, rows)| rows);
            }
            shared.ingested.in_flight_rows[index].store(in_flight_rows as u64, Ordering::Relaxed);
            // Hold off only while the dataflow can still catch up without
            // us: rows in flight at times before our capability can be
            // applied. If all of them are at or after it, they wait for this
            // source to advance time, so it must read on (else neither moves).
            let can_drain = in_flight.front().is_some_and(|(ts, _)| ts < cap.time());
            if in_flight_rows >= shared.max_in_flight_rows && can_drain {
                delayed.activate_after(shared.tick);
                return;
            }
            let poll = match reader.poll(shared.poll_batch) {
                Ok(poll) => poll,
                Err(e) => {
                    tracing::error!(worker = index, "log read failed, retrying: {e}");
                    delayed.activate_after(shared.tick * 10);
                    return;
                }
            };
            let full = poll.entries.len() >= shared.poll_batch;
            shared.ingested.records.fetch_add(poll.entries.len() as u64, Ordering::Relaxed);
            for entry in poll.entries {
                let time = entry.ts.max(*cap.time());
                let rows = match &entry.record.op {
                    LogOp::Upsert(batch) => batch.0.num_rows(),
                    LogOp::Delete(pks) => pks.len(),
                };
                shared.ingested.rows.fetch_add(rows as u64, Ordering::Relaxed);
                in_flight_rows += rows;
                in_flight.push_back((time, rows));
                let at = cap.delayed(&time);
                let mut session = output.session(&at);
                for chunk in cut_into_chunks(&shared, entry, peers) {
                    session.give(chunk);
                }
            }
            match poll.frontier {
                Some(frontier) => {
                    if frontier > *cap.time() {
                        cap.downgrade(&frontier);
                    }
                    if full {
                        let _ = activator.activate();
                    } else {
                        delayed.activate_after(shared.tick);
                    }
                }
                // Behind: read on at once.
                None => {
                    let _ = activator.activate();
                }
            }
        }
    })
}

/// Splits one log entry into a chunk per shard that owns some of its keys.
fn cut_into_chunks(shared: &Shared, entry: LogEntry, peers: usize) -> Vec<ShardChunk> {
    let LogEntry { partition, ts, record, offset } = entry;
    let collection = record.collection;
    let Some(schema) = shared.schema(collection) else {
        // A dropped collection: its records are history nobody can read.
        return Vec::new();
    };
    if shared.skip_through.get(&collection).is_some_and(|&checkpoint| ts <= checkpoint) {
        // Already in the segments recovery loaded.
        return Vec::new();
    }
    let chunk = |shard, body| ShardChunk { shard, collection, ts, body };
    match record.op {
        LogOp::Delete(pks) => {
            let mut by_shard: BTreeMap<usize, Vec<Pk>> = BTreeMap::new();
            for pk in pks {
                by_shard.entry(shard_of(collection, &pk, peers)).or_default().push(pk);
            }
            by_shard.into_iter().map(|(shard, pks)| chunk(shard, ChunkBody::Delete { pks })).collect()
        }
        LogOp::Upsert(IpcBatch(batch)) => {
            let pk_column = schema.primary_index();
            let mut rows_by_shard: BTreeMap<usize, (Vec<u32>, Vec<Pk>)> = BTreeMap::new();
            for row in 0..batch.num_rows() {
                match pk_from_array(batch.column(pk_column).as_ref(), row) {
                    Ok(pk) => {
                        let rows = rows_by_shard.entry(shard_of(collection, &pk, peers)).or_default();
                        rows.0.push(row as u32);
                        rows.1.push(pk);
                    }
                    Err(e) => {
                        shared.fail(collection, format!("log partition {partition} offset {offset} row {row}: {e}"));
                        return Vec::new();
                    }
                }
            }
            let version = |row: u32| VersionId { ts, partition, row };
            let single_shard =
                rows_by_shard.len() == 1 && rows_by_shard.values().all(|(rows, _)| rows.len() == batch.num_rows());
            let mut chunks = Vec::new();
            for (shard, (rows, pks)) in rows_by_shard {
                let versions = rows.iter().map(|&row| version(row)).collect();
                let part =
                    if single_shard { Ok(batch.clone()) } else { vectorflow_core::batch::take_rows(&batch, &rows) };
                match part {
                    Ok(part) => chunks.push(chunk(shard, ChunkBody::Upsert { batch: IpcBatch(part), pks, versions })),
                    Err(e) => {
                        shared.fail(collection, format!("log partition {partition} offset {offset}: {e}"));
                        return Vec::new();
                    }
                }
            }
            chunks
        }
    }
}

/// Emits the restored key versions, each collection's at its checkpoint
/// time, then closes.
fn restore_source<'scope>(
    scope: Scope<'scope, Timestamp>,
    mut restored: Vec<(Timestamp, Vec<UpsertEvent>)>,
) -> StreamVec<'scope, Timestamp, UpsertEvent> {
    source(scope, "RestoredVersions", move |capability, _info| {
        let mut capability = Some(capability);
        move |output| {
            if let Some(cap) = capability.take() {
                for (at, versions) in restored.drain(..) {
                    let time = cap.delayed(&at);
                    output.session(&time).give_iterator(versions.into_iter());
                }
            }
        }
    })
}

/// Emits requests queued for this worker. Requests carry their read time as
/// data; the stream itself stays at time zero so it never holds back the
/// data frontier.
fn request_source<'scope>(
    scope: Scope<'scope, Timestamp>,
    shared: Arc<Shared>,
    index: usize,
) -> StreamVec<'scope, Timestamp, Request> {
    source(scope, "Requests", move |capability, info| {
        if let Ok(mut activators) = shared.request_activators.lock() {
            activators.insert(index, scope.worker().sync_activator_for(info.address.to_vec()));
        }
        let mut capability = Some(capability);
        move |output| {
            if shared.shutdown.load(Ordering::Acquire) {
                capability = None;
            }
            let Some(cap) = capability.as_ref() else { return };
            let requests = match shared.requests[index].lock() {
                Ok(mut queue) => std::mem::take(&mut *queue),
                Err(_) => return,
            };
            if !requests.is_empty() {
                output.session(cap).give_iterator(requests.into_iter());
            }
        }
    })
}

/// Everything that arrived for one time, applied once the frontier passes it.
#[derive(Default)]
struct Pending {
    chunks: Vec<ShardChunk>,
    added: HashSet<VersionId>,
    retired: Vec<(CollectionId, Pk, VersionId)>,
}

impl Pending {
    /// The collections these changes are of (with repeats).
    fn collections(&self) -> impl Iterator<Item = CollectionId> + '_ {
        self.chunks.iter().map(|c| c.collection).chain(self.retired.iter().map(|r| r.0))
    }
}

/// The segment operator: applies version changes to this worker's shards
/// in time order, publishes how far it has applied (reads wait for that
/// and run off the dataflow, see [`crate::shards`]), runs each shard's
/// maintenance, and answers requests: checkpoint barriers once the data
/// frontier has passed their time, compactions at once, and reads another
/// process of a cluster sends once the frontier has passed their time.
/// Work that takes long (a read's search, a checkpoint's uploads) runs off
/// this thread; its answer comes back through [`Shared::finish`] and
/// leaves at the capability held for it.
fn segments<'scope>(
    data: StreamVec<'scope, Timestamp, SegmentInput>,
    requests: StreamVec<'scope, Timestamp, Request>,
    shared: Arc<Shared>,
    index: usize,
) -> StreamVec<'scope, Timestamp, Partial> {
    let scope = data.scope();
    data.binary_frontier(requests, Pipeline, Pipeline, "Segments", move |_capability, info| {
        if let Ok(mut activators) = shared.segment_activators.lock() {
            activators.insert(index, scope.worker().sync_activator_for(info.address.to_vec()));
        }
        let mut stash: BTreeMap<Timestamp, Pending> = BTreeMap::new();
        let mut waiting: Vec<(Capability<Timestamp>, Request)> = Vec::new();
        // Requests whose answer is being worked out off this thread, by
        // origin worker and id (each process numbers its own requests).
        let mut running: HashMap<(usize, u64), Capability<Timestamp>> = HashMap::new();
        let mut catalog_version = 0;
        let mut watches = WorkerWatches::default();
        move |(data, data_frontier), (requests, _), output| {
            let shards = &shared.shards[index];
            data.for_each(|_cap, items| {
                for item in items.drain(..) {
                    match item {
                        SegmentInput::Chunk(chunk) => stash.entry(chunk.ts).or_default().chunks.push(chunk),
                        SegmentInput::Change { collection, pk, version, ts, diff } => {
                            let pending = stash.entry(ts).or_default();
                            if diff > 0 {
                                pending.added.insert(version);
                            } else {
                                pending.retired.push((collection, pk, version));
                            }
                        }
                    }
                }
            });
            requests.for_each(|cap, items| {
                let Some(cap) = cap.retain_least(0) else { return };
                for request in items.drain(..) {
                    waiting.push((cap.clone(), request));
                }
            });
            let finished = shared.finished[index].lock().map(|mut f| std::mem::take(&mut *f)).unwrap_or_default();
            for partial in finished {
                if let Some(cap) = running.remove(&(partial.origin, partial.id)) {
                    output.session(&cap).give(partial);
                }
            }

            let current = shared.catalog_version.load(Ordering::Acquire);
            if current != catalog_version {
                catalog_version = current;
                if let Ok(schemas) = shared.schemas.read() {
                    shards.retain(|id| schemas.contains_key(&id));
                }
            }

            // Everything before the frontier is complete: apply it in time
            // order, up to changes of a collection this process does not
            // know yet (`reached` stops there until the catalog is read). A
            // barrier the frontier has passed runs between the changes at or
            // before its time and the later ones.
            let frontier = data_frontier.frontier().iter().copied().min().unwrap_or(Timestamp::MAX);
            let mut reached = frontier;
            let (mut barriers, others): (Vec<_>, Vec<_>) = std::mem::take(&mut waiting)
                .into_iter()
                .partition(|(_, request)| request.kind.is_barrier() && request.read_ts < frontier);
            waiting = others;
            barriers.sort_by_key(|(_, request)| request.read_ts);
            let mut barriers = barriers.into_iter();
            while let Some((cap, request)) = barriers.next() {
                if let Err(held) = apply_through(&shared, shards, &mut stash, request.read_ts, &mut watches, index) {
                    reached = held;
                    waiting.push((cap, request));
                    waiting.extend(barriers);
                    break;
                }
                match answer_control(&shared, shards, &request, index) {
                    Some(answer) => output.session(&cap).give(partial(&request, answer)),
                    None => {
                        running.insert((request.origin, request.id), cap);
                    }
                }
            }
            if reached == frontier
                && let Err(held) =
                    apply_through(&shared, shards, &mut stash, frontier.saturating_sub(1), &mut watches, index)
            {
                reached = held;
            }
            // Starts run on the search pool: ingestion does not wait behind their scans.
            let spawn = |job: crate::watches::StartJob| {
                let woken = shared.clone();
                shared.search_pool.spawn(move || {
                    job();
                    woken.wake_segments(Some(index));
                });
            };
            watches.refresh(
                &shared.watches,
                &|collection| shards.get(collection),
                &spawn,
                index,
                reached.saturating_sub(1),
            );
            shared.publish_applied(index, reached);

            let horizon = shared.retention_horizon();
            let mut backlog = 0;
            for (collection, shard) in shards.all() {
                let Ok(mut shard) = crate::shards::write(&shard) else { continue };
                let replaced = shard.finish_compaction();
                if !replaced.is_empty() {
                    shared.persister.retire(&replaced);
                    vectorflow_operators::build_pool::release_freed_memory_later();
                }
                for snapshot in shard.take_newly_sealed() {
                    shared.persister.submit(collection, snapshot);
                }
                match shard.merge_if_due(|| horizon) {
                    Ok(0) => {}
                    Ok(merged) => tracing::debug!(collection, merged, "merge started"),
                    Err(e) => tracing::warn!(collection, "starting a merge: {e}"),
                }
                backlog += shard.backlog_rows(horizon);
            }
            shared.index_backlog[index].store(backlog as u64, Ordering::Release);

            waiting.retain(|(cap, request)| {
                let expired = request.expired();
                if !expired {
                    match &request.kind {
                        RequestKind::CatalogSync { version }
                            if shared.catalog_taken.load(Ordering::Acquire) < *version =>
                        {
                            shared.catalog_wanted.store(true, Ordering::Release);
                            return true;
                        }
                        kind if kind.is_read() => {
                            if request.read_ts >= reached {
                                return true;
                            }
                            running.insert((request.origin, request.id), cap.clone());
                            read_off_thread(&shared, index, request.clone());
                            return false;
                        }
                        kind if kind.is_barrier() => return true,
                        _ => {}
                    }
                }
                let answer = if expired {
                    // Nobody waits for it: answer at once so the merge
                    // completes and nothing stays queued behind the frontier.
                    shared.reads_cancelled.fetch_add(1, Ordering::Relaxed);
                    Some(Answer::Failed(Failure::Cancelled))
                } else {
                    answer_control(&shared, shards, request, index)
                };
                match answer {
                    Some(answer) => output.session(cap).give(partial(request, answer)),
                    None => {
                        running.insert((request.origin, request.id), cap.clone());
                    }
                }
                false
            });
        }
    })
}

/// This worker's answer to `request`, for the origin's merge.
fn partial(request: &Request, answer: Answer) -> Partial {
    Partial { id: request.id, origin: request.origin, parts: request.targets.len(), answer }
}

/// Answers a read another process sent on the search pool, as a read made
/// here runs (see [`crate::shards`]); the answer goes back through
/// [`Shared::finish`].
fn read_off_thread(shared: &Arc<Shared>, index: usize, request: Request) {
    let shared_for_read = shared.clone();
    shared.search_pool.spawn(move || {
        let shared = shared_for_read;
        let left = request
            .deadline_ms
            .map_or(Duration::from_secs(3600), |ms| Duration::from_millis(ms.saturating_sub(unix_millis())));
        let answer =
            shared.answer_read_on(index, request.collection, &request.kind, request.read_ts, Instant::now() + left);
        shared.finish(index, partial(&request, answer));
    });
}

/// Applies every stashed time at or before `through`, in time order; stops
/// (`Err` with its time) at changes of a collection the process's catalog
/// does not hold yet (created by another process of a cluster), and asks
/// for the catalog to be read.
fn apply_through(
    shared: &Shared,
    shards: &WorkerShards,
    stash: &mut BTreeMap<Timestamp, Pending>,
    through: Timestamp,
    watches: &mut WorkerWatches,
    index: usize,
) -> Result<(), Timestamp> {
    while let Some(entry) = stash.first_entry() {
        if *entry.key() > through {
            break;
        }
        let ts = *entry.key();
        if entry.get().collections().any(|collection| shared.unknown_collection(collection)) {
            shared.catalog_wanted.store(true, Ordering::Release);
            return Err(ts);
        }
        apply(shared, shards, ts, entry.remove(), watches, index);
    }
    Ok(())
}
fn apply(
    shared: &Shared,
    shards: &WorkerShards,
    ts: Timestamp,
    pending: Pending,
    watches: &mut WorkerWatches,
    index: usize,
) {
    let Pending { chunks, added, retired } = pending;
    // Per collection: the upserted chunks, and the retired versions with their keys.
    type Changes = (Vec<(arrow::record_batch::RecordBatch, Vec<VersionId>)>, Vec<(Pk, VersionId)>);
    let mut per_collection: BTreeMap<CollectionId, Changes> = BTreeMap::new();
    for chunk in chunks {
        if let ChunkBody::Upsert { batch, versions, .. } = chunk.body {
            per_collection.entry(chunk.collection).or_default().0.push((batch.0, versions));
        }
    }
    for (collection, pk, version) in retired {
        per_collection.entry(collection).or_default().1.push((pk, version));
    }
    for (collection, (batches, retired)) in per_collection {
        if shared.failure(collection).is_some() {
            // Stopped: nothing more is applied until a restart replays it.
            continue;
        }
        let make = || shared.schema(collection).map(|schema| Shard::new(schema, shared.shard_config.clone()));
        let Some(shard) = shards.get_or_make(collection, make) else { continue };
        // Standing queries of the collection see the same changes.
        let watched = watches.follows(collection).then(|| batches.clone());
        let applied = match crate::shards::write(&shard) {
            Ok(mut shard) => shard.apply(ts, batches, &added, &retired).map_err(|e| e.to_string()).map(|()| {
                if let Some(batches) = &watched {
                    let changes = Applied { ts, batches, added: &added, retired: &retired };
                    watches.applied(&shard, collection, &changes, index);
                }
            }),
            Err(failure) => Err(format!("{failure:?}")),
        };
        if let Err(e) = applied {
            shared.fail(collection, format!("applying the changes at ts {ts}: {e}"));
            shards.remove(collection);
        }
    }
}

/// A control request's answer from this worker's shard of its collection;
/// `None` when it is finished off this thread (a checkpoint waits for its
/// segments' uploads there) and comes back through [`Shared::finish`].
fn answer_control(shared: &Arc<Shared>, shards: &WorkerShards, request: &Request, index: usize) -> Option<Answer> {
    if let Some(stopped) = shared.stopped(request.collection) {
        return Some(Answer::Failed(stopped));
    }
    match request.kind {
        RequestKind::CatalogSync { .. } => return Some(Answer::Done),
        RequestKind::Leave { process } => {
            // Answered first, so the leaving process hears it before this
            // one stops (the answer leaves with this activation's output).
            let shared = shared.clone();
            std::thread::spawn(move || {
                std::thread::sleep(Duration::from_millis(200));
                shared.dataflow_stopped(format!("process {process} of the cluster stopped"));
            });
            return Some(Answer::Done);
        }
        _ => {}
    }
    let Some(shard) = shards.get(request.collection) else { return Some(empty_answer(&request.kind)) };
    let mut shard = match crate::shards::write(&shard) {
        Ok(shard) => shard,
        Err(failure) => return Some(Answer::Failed(failure)),
    };
    let result = match &request.kind {
        RequestKind::Checkpoint { known } => match shard.checkpoint(known) {
            Ok(checkpoint) => {
                if let Some(superseded) = checkpoint.superseded {
                    // The previous checkpoint (published: checkpoints run one at
                    // a time) lists them until this one replaces it.
                    shared.persister.retire(&[superseded]);
                }
                if let Some(growing) = checkpoint.growing {
                    shared.persister.submit(request.collection, growing);
                }
                drop(shard);
                let to_wait: Vec<_> =
                    checkpoint.states.into_iter().map(|state| (!known.contains_key(&state.uid), state)).collect();
                wait_for_uploads(shared, index, request.clone(), to_wait);
                return None;
            }
            Err(e) => Err(e),
        },
        RequestKind::Compact { horizon } => shard.start_compaction(*horizon).map(Answer::Count),
        // Reads run off the dataflow (see `crate::shards`).
        _ => return Some(Answer::Failed(Failure::Internal("a read reached the dataflow's control path".into()))),
    };
    Some(result.unwrap_or_else(|e| Answer::Failed(e.into())))
}

/// A checkpoint's part of this worker: once this process has written the
/// segments the newest manifest does not list (`true` beside them), their
/// files go with their states to the checkpoint's origin.
fn wait_for_uploads(
    shared: &Arc<Shared>,
    index: usize,
    request: Request,
    segments: Vec<(bool, vectorflow_operators::SegmentState)>,
) {
    let spawned = std::thread::Builder::new().name("checkpoint-part".into()).spawn({
        let shared = shared.clone();
        let request = request.clone();
        move || {
            let mut listed = Vec::with_capacity(segments.len());
            let mut failed = None;
            for (new, state) in segments {
                let files = if new {
                    match shared.persister.wait(&state.uid, PERSIST_TIMEOUT) {
                        Ok(files) => Some(StoredFiles(files)),
                        Err(e) => {
                            failed = Some(Answer::Failed(e.into()));
                            break;
                        }
                    }
                } else {
                    None
                };
                listed.push((state, files));
            }
            let answer =
                failed.unwrap_or_else(|| Answer::Checkpoint(vec![ShardCheckpoint { shard: index, segments: listed }]));
            shared.finish(index, partial(&request, answer));
        }
    });
    if let Err(e) = spawned {
        let failure = Failure::Internal(format!("starting a checkpoint's upload wait: {e}"));
        shared.finish(index, partial(&request, Answer::Failed(failure)));
    }
}

/// Collects every answering worker's part of an answer on the origin worker and
/// completes the caller's reply when the last part arrives.
fn merge<'scope>(partials: StreamVec<'scope, Timestamp, Partial>, shared: Arc<Shared>) {
    let mut collecting: HashMap<u64, (usize, Answer)> = HashMap::new();
    partials.sink(Exchange::new(|p: &Partial| p.origin as u64), "Merge", move |(input, _)| {
        input.for_each(|_cap, items| {
            for partial in items.drain(..) {
                let done = {
                    let entry = collecting.entry(partial.id);
                    let slot = entry.or_insert_with(|| (0, Answer::Done));
                    if slot.0 == 0 {
                        slot.1 = partial.answer;
                    } else {
                        slot.1.merge(partial.answer);
                    }
                    slot.0 += 1;
                    slot.0 >= partial.parts
                };
                if done && let Some((_, answer)) = collecting.remove(&partial.id) {
                    let reply = shared.replies.lock().ok().and_then(|mut r| r.remove(&partial.id));
                    if let Some(reply) = reply {
                        // The caller may have timed out and gone; nothing to do then.
                        let _ = reply.try_send(answer);
                    }
                }
            }
        });
    });
}
