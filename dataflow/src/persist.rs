//! Sealed segments to and from the object store.
//!
//! Workers hand every newly sealed segment to the [`Persister`], whose thread
//! waits for the segment's index builds and writes its objects: Parquet data
//! (the collection's columns plus insert time and version id) and the
//! frozen HNSW graph per vector field (see `vectorflow_operators::frozen`). A checkpoint then lists
//! the segment in the collection's manifest. [`load_segments`] reads them
//! back, in parallel, at recovery.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::{Receiver, Sender};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use arrow::array::{AsArray, UInt32Array, UInt64Array};
use arrow::datatypes::{DataType as ArrowType, Field, Schema, UInt32Type, UInt64Type};
use arrow::record_batch::RecordBatch;
use bytes::Bytes;
use vectorflow_connectors::manifest::collection_prefix;
use vectorflow_connectors::{IndexFiles, ObjectRef, ObjectStorage, SegmentFiles, parquet_io};
use vectorflow_core::{CollectionId, CollectionSchema, Error, Result, Timestamp};
use vectorflow_operators::{FrozenGraph, Restored, SealParams, Segment, SegmentSnapshot};

/// The file name suffix of a vector field's frozen graph.
pub const GRAPH_SUFFIX: &str = "graph.vf";

/// How long a checkpoint waits for a sealed segment's index build and upload.
pub const PERSIST_TIMEOUT: Duration = Duration::from_secs(1800);

/// The folder of a segment's objects.
pub fn segment_prefix(collection: CollectionId, uid: &str) -> String {
    format!("{}/segments/{uid}", collection_prefix(collection))
}

struct Job {
    collection: CollectionId,
    snapshot: SegmentSnapshot,
}

#[derive(Default)]
struct State {
    /// Outcome per uid, kept until a manifest takes it.
    done: HashMap<String, Result<SegmentFiles, String>>,
    /// Segments some shard holds (or is writing): their objects must stay.
    live: HashSet<String>,
}

/// Writes sealed segments on a thread of its own.
pub struct Persister {
    storage: ObjectStorage,
    /// False for a read replica's: nothing is written.
    writes: bool,
    jobs: Mutex<Option<Sender<Job>>>,
    state: Mutex<State>,
    changed: Condvar,
    thread: Mutex<Option<std::thread::JoinHandle<()>>>,
}

impl Persister {
    pub fn start(storage: ObjectStorage) -> Result<Arc<Persister>> {
        // Unbounded on purpose: an entry is a handle on a segment its shard
        // holds anyway (the snapshot shares its columns), and there is at
        // most one per sealed segment. Bounding it made a worker wait for
        // index builds or paused the sources behind them: in `bench soak`
        // with compaction every 30 s the frontier stalled for minutes.
        let (jobs, queue) = std::sync::mpsc::channel();
        let persister = Arc::new(Persister {
            storage,
            writes: true,
            jobs: Mutex::new(Some(jobs)),
            state: Mutex::new(State::default()),
            changed: Condvar::new(),
            thread: Mutex::new(None),
        });
        let worker = persister.clone();
        let thread = std::thread::Builder::new()
            .name("persister".into())
            .spawn(move || worker.run(queue))
            .map_err(|e| Error::storage(format!("starting the persister: {e}")))?;
        if let Ok(mut slot) = persister.thread.lock() {
            *slot = Some(thread);
        }
        Ok(persister)
    }

    /// A persister that writes nothing (a read replica's): submitted
    /// segments are only let out of memory where they are kept on disk.
    pub fn read_only(storage: ObjectStorage) -> Arc<Persister> {
        Arc::new(Persister {
            storage,
            writes: false,
            jobs: Mutex::new(None),
            state: Mutex::new(State::default()),
            changed: Condvar::new(),
            thread: Mutex::new(None),
        })
    }

    pub fn storage(&self) -> &ObjectStorage {
        &self.storage
    }

    /// Queues a sealed segment for writing.
    pub fn submit(&self, collection: CollectionId, snapshot: SegmentSnapshot) {
        self.track([snapshot.uid.clone()]);
        if !self.writes {
            snapshot.release_resident();
            return;
        }
        // The lock is not held while a full queue waits.
        let sender = self.jobs.lock().ok().and_then(|jobs| jobs.clone());
        let sent = sender.map(|sender| sender.send(Job { collection, snapshot }));
        if !matches!(sent, Some(Ok(()))) {
            tracing::warn!("the persister has stopped; a sealed segment is not written (the log still holds it)");
        }
    }

    /// Marks segments as held by a shard (their objects must stay).
    pub fn track(&self, uids: impl IntoIterator<Item = String>) {
        if let Ok(mut state) = self.state.lock() {
            state.live.extend(uids);
        }
    }

    /// Segments a shard dropped (merged away, or growing rows a newer
    /// checkpoint replaced): once no manifest lists them, their objects may
    /// go. Their written files stay known until the next publish: a
    /// checkpoint running now may list them and wait for them.
    pub fn retire(&self, uids: &[String]) {
        if let Ok(mut state) = self.state.lock() {
            for uid in uids {
                state.live.remove(uid);
            }
        }
    }

    pub fn is_live(&self, uid: &str) -> bool {
        self.state.lock().is_ok_and(|state| state.live.contains(uid))
    }

    /// The files of segment `uid` once written, waiting up to `timeout`.
    pub fn wait(&self, uid: &str, timeout: Duration) -> Result<SegmentFiles> {
        let deadline = Instant::now() + timeout;
        let mut state = self.state.lock().map_err(|_| Error::storage("persister state poisoned"))?;
        loop {
            if let Some(outcome) = state.done.get(uid) {
                return outcome.clone().map_err(Error::Storage);
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(Error::Timeout(timeout));
            }
            state = self.changed.wait_timeout(state, left).map_err(|_| Error::storage("persister state poisoned"))?.0;
        }
    }

    /// Forgets written segments a published manifest now lists, and those
    /// retired meanwhile: checkpoints run one at a time, so nothing waits
    /// for them any more.
    pub fn published(&self, uids: impl IntoIterator<Item = String>) {
        if let Ok(mut state) = self.state.lock() {
            for uid in uids {
                state.done.remove(&uid);
            }
            let State { done, live } = &mut *state;
            done.retain(|uid, _| live.contains(uid));
        }
    }

    /// Stops the thread after the queued jobs.
    pub fn stop(&self) {
        if let Ok(mut jobs) = self.jobs.lock() {
            jobs.take();
        }
        if let Some(thread) = self.thread.lock().ok().and_then(|mut t| t.take()) {
            let _ = thread.join();
        }
    }

    fn run(&self, queue: Receiver<Job>) {
        while let Ok(Job { collection, snapshot }) = queue.recv() {
            let uid = snapshot.uid.clone();
            let started = Instant::now();
            let outcome = write_segment(&self.storage, collection, &snapshot);
            // Encoding read every vector of a segment kept on disk.
            snapshot.release_resident();
            match &outcome {
                Ok(files) => {
                    tracing::debug!(collection, uid, rows = files.rows, elapsed = ?started.elapsed(), "segment written")
                }
                Err(e) => tracing::error!(collection, uid, "writing a segment failed: {e}"),
            }
            if let Ok(mut state) = self.state.lock() {
                state.done.insert(uid, outcome.map_err(|e| e.to_string()));
            }
            self.changed.notify_all();
        }
    }
}

/// Writes a segment's data and index files (waiting for its index builds).
fn write_segment(
    storage: &ObjectStorage,
    collection: CollectionId,
    snapshot: &SegmentSnapshot,
) -> Result<SegmentFiles> {
    let prefix = segment_prefix(collection, &snapshot.uid);
    let data = storage.put(&format!("{prefix}/data.parquet"), parquet_io::encode(&snapshot.data)?)?;
    let mut indexes = Vec::new();
    for (field, metric, slot) in &snapshot.indexes {
        // A failed build leaves no index: the load builds it again.
        let Some(index) = slot.wait() else { continue };
        indexes.push(IndexFiles {
            field: *field,
            metric: *metric,
            graph: storage
                .put(&format!("{prefix}/field-{field}.{GRAPH_SUFFIX}"), Bytes::from(index.graph().encode()))?,
            data: None,
        });
    }
    Ok(SegmentFiles {
        uid: snapshot.uid.clone(),
        rows: snapshot.data.num_rows(),
        data,
        indexes,
        deletes: None,
        deleted: 0,
        growing: false,
    })
}

/// Writes a segment's delete log (`(row, delete_ts)` as Parquet) for
/// manifest `version`.
pub fn write_deletes(
    storage: &ObjectStorage,
    collection: CollectionId,
    uid: &str,
    version: u64,
    deletes: &[(u32, Timestamp)],
) -> Result<ObjectRef> {
    let schema = Schema::new(vec![
        Field::new("row", ArrowType::UInt32, false),
        Field::new("delete_ts", ArrowType::UInt64, false),
    ]);
    let batch = RecordBatch::try_new(
        Arc::new(schema),
        vec![
            Arc::new(UInt32Array::from_iter_values(deletes.iter().map(|d| d.0))),
            Arc::new(UInt64Array::from_iter_values(deletes.iter().map(|d| d.1))),
        ],
    )?;
    let path = format!("{}/deletes-{version:020}.parquet", segment_prefix(collection, uid));
    storage.put(&path, parquet_io::encode(&batch)?)
}

fn read_deletes(storage: &ObjectStorage, reference: &ObjectRef) -> Result<Vec<(u32, Timestamp)>> {
    let location = format!("{}/{}", storage.description(), reference.path);
    let batch = parquet_io::decode(storage.get_checked(reference)?, &location)?;
    let corrupt = || Error::Corrupt { location: location.clone(), problem: "not a delete log".into() };
    if batch.num_columns() != 2 {
        return Err(corrupt());
    }
    let rows = batch.column(0).as_primitive_opt::<UInt32Type>().ok_or_else(corrupt)?;
    let stamps = batch.column(1).as_primitive_opt::<UInt64Type>().ok_or_else(corrupt)?;
    Ok(rows.values().iter().copied().zip(stamps.values().iter().copied()).collect())
}

/// One segment to load: its shard, its place there and its files.
pub struct LoadJob<'a> {
    pub collection: CollectionId,
    pub schema: &'a CollectionSchema,
    pub shard: usize,
    pub files: &'a SegmentFiles,
    pub as_of: Timestamp,
    /// Set when the engine runs another worker count than the segments
    /// were cut for: rows are split by their new shard (indexes rebuilt).
    pub reshard_to: Option<usize>,
}

/// A loaded segment; `rebuilt` when an index file was missing or bad and
/// the index is being built again from the data.
pub struct Loaded {
    pub collection: CollectionId,
    pub shard: usize,
    pub segment: Segment,
    pub rebuilt: bool,
    pub bytes: u64,
}

/// What recovery loaded, for logs and benchmarks.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct RecoveryReport {
    pub collections: usize,
    pub segments: usize,
    pub rows: usize,
    /// Bytes read from the object store.
    pub bytes: u64,
    /// Indexes rebuilt from data because their files were missing or bad.
    pub rebuilt_indexes: usize,
    /// Time to load every segment.
    pub load: Duration,
    /// Time from opening until the dataflow had replayed the log.
    pub total: Duration,
    /// Log records held (not yet covered by every checkpoint) at open.
    pub replayed_records: u64,
    /// Rows (upserted or deleted keys) the replay read.
    pub replayed_rows: u64,
}

/// Loads `jobs` on `threads` threads, logging progress; fails with the
/// first segment that cannot be loaded (naming its object).
pub fn load_segments(
    storage: &ObjectStorage,
    jobs: &[LoadJob<'_>],
    params: &SealParams,
    threads: usize,
) -> Result<Vec<Loaded>> {
    let next = AtomicUsize::new(0);
    let finished = AtomicUsize::new(0);
    let started = Instant::now();
    let results: Mutex<Vec<(usize, Result<Vec<Loaded>>)>> = Mutex::new(Vec::with_capacity(jobs.len()));
    std::thread::scope(|scope| {
        for _ in 0..threads.clamp(1, jobs.len().max(1)) {
            scope.spawn(|| {
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    let Some(job) = jobs.get(i) else { break };
                    let loaded = load_segment(storage, job, params);
                    let done = finished.fetch_add(1, Ordering::Relaxed) + 1;
                    if loaded.is_ok() {
                        tracing::info!(
                            collection = job.collection,
                            segment = job.files.uid,
                            rows = job.files.rows,
                            progress = format!("{done}/{}", jobs.len()),
                            elapsed = ?started.elapsed(),
                            "segment loaded"
                        );
                    }
                    if let Ok(mut results) = results.lock() {
                        results.push((i, loaded));
                    }
                }
            });
        }
    });
    let mut results = results.into_inner().map_err(|_| Error::storage("segment loader poisoned"))?;
    results.sort_by_key(|(i, _)| *i);
    let mut all = Vec::new();
    for (_, loaded) in results {
        all.extend(loaded?);
    }
    Ok(all)
}

fn load_segment(storage: &ObjectStorage, job: &LoadJob<'_>, params: &SealParams) -> Result<Vec<Loaded>> {
    let files = job.files;
    let location = |path: &str| format!("{}/{path}", storage.description());
    let data_bytes = storage.get_checked(&files.data)?;
    let mut bytes = data_bytes.len() as u64;
    let data = parquet_io::decode(data_bytes, &location(&files.data.path))?;
    if data.num_rows() != files.rows {
        return Err(Error::Corrupt {
            location: location(&files.data.path),
            problem: format!("{} rows, the manifest says {}", data.num_rows(), files.rows),
        });
    }
    let deletes = match &files.deletes {
        Some(reference) => {
            bytes += reference.size;
            read_deletes(storage, reference)?
        }
        None => Vec::new(),
    };
    if let Some(shards) = job.reshard_to {
        return reshard(job, data, &deletes, shards, bytes, params);
    }
    if files.growing {
        let segment = Segment::restore(String::new(), job.schema, data, &deletes, Restored::Growing, job.as_of, params)
            .map_err(|e| relocate(e, &location(&files.data.path)))?;
        return Ok(vec![Loaded { collection: job.collection, shard: job.shard, segment, rebuilt: false, bytes }]);
    }
    let mut indexes = HashMap::new();
    let mut rebuilt = false;
    let vector_fields: Vec<usize> = job
        .schema
        .fields
        .iter()
        .enumerate()
        .filter(|(_, f)| matches!(f.data_type, vectorflow_core::DataType::FloatVector { .. }))
        .map(|(i, _)| i)
        .collect();
    for field in vector_fields {
        let loaded = files.indexes.iter().find(|i| i.field == field).map(|index| {
            let graph = storage.get_checked(&index.graph)?;
            bytes += index.graph.size;
            FrozenGraph::decode(&graph, files.rows, &location(&index.graph.path))
        });
        match loaded {
            Some(Ok(index)) => {
                indexes.insert(field, index);
            }
            Some(Err(e)) => {
                tracing::warn!(segment = files.uid, field, "index unusable, rebuilding it from the data: {e}");
                rebuilt = true;
            }
            None => {
                tracing::warn!(segment = files.uid, field, "index files missing, rebuilding it from the data");
                rebuilt = true;
            }
        }
    }
    // A segment whose index is rebuilt is written again under a new name:
    // the objects the manifest lists are never overwritten.
    let uid = if rebuilt { vectorflow_operators::shard::new_uid() } else { files.uid.clone() };
    let segment = Segment::restore(uid, job.schema, data, &deletes, Restored::Sealed { indexes }, job.as_of, params)
        .map_err(|e| relocate(e, &location(&files.data.path)))?;
    Ok(vec![Loaded { collection: job.collection, shard: job.shard, segment, rebuilt, bytes }])
}

/// A corrupt-segment error located at the object it was read from.
fn relocate(error: Error, location: &str) -> Error {
    match error {
        Error::Corrupt { problem, .. } => Error::Corrupt { location: location.to_string(), problem },
        other => other,
    }
}

/// Splits a stored segment's rows by their shard among `shards` (the
/// dataflow's key hash), one new segment per shard, indexes built anew.
fn reshard(
    job: &LoadJob<'_>,
    data: RecordBatch,
    deletes: &[(u32, Timestamp)],
    shards: usize,
    bytes: u64,
    params: &SealParams,
) -> Result<Vec<Loaded>> {
    let pks = vectorflow_core::value::pks_from_array(data.column(job.schema.primary_index()).as_ref())?;
    let mut rows_of: Vec<Vec<u32>> = vec![Vec::new(); shards];
    let mut moved_to = Vec::with_capacity(pks.len());
    for (row, pk) in pks.iter().enumerate() {
        let shard = crate::routing::shard_of(job.collection, pk, shards);
        moved_to.push((shard, rows_of[shard].len() as u32));
        rows_of[shard].push(row as u32);
    }
    let mut deletes_of: Vec<Vec<(u32, Timestamp)>> = vec![Vec::new(); shards];
    for &(row, ts) in deletes {
        if let Some(&(shard, new_row)) = moved_to.get(row as usize) {
            deletes_of[shard].push((new_row, ts));
        }
    }
    let mut loaded = Vec::new();
    for (shard, rows) in rows_of.into_iter().enumerate() {
        if rows.is_empty() {
            continue;
        }
        let part = vectorflow_core::batch::take_rows(&data, &rows)?;
        let uid = vectorflow_operators::shard::new_uid();
        let segment =
            Segment::restore(uid, job.schema, part, &deletes_of[shard], Restored::sealed(), job.as_of, params)?;
        loaded.push(Loaded { collection: job.collection, shard, segment, rebuilt: true, bytes: 0 });
    }
    if let Some(first) = loaded.first_mut() {
        first.bytes = bytes;
    }
    Ok(loaded)
}
