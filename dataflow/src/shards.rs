//! Each worker's shards, shared with the threads that read them.
//!
//! A worker applies changes to its shards under each shard's write lock and
//! then publishes its applied frontier. Reads do not enter the dataflow:
//! once every worker they need has applied everything at or before their
//! time, they run on the engine's search pool under the shards' read locks.
//! Visibility at a time is a property of the rows (insert and delete
//! times), so changes applied after a read's time do not disturb it. So a
//! worker never runs a search, and concurrent reads use every core.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, RwLock, RwLockReadGuard, RwLockWriteGuard};

use vectorflow_core::{CollectionId, CollectionSchema, Timestamp};
use vectorflow_operators::shard::SegmentReader;
use vectorflow_operators::{Filter, SearchBounds, Shard, Stop};

use crate::messages::{Answer, Failure, RequestKind};

/// One collection's shard on one worker.
pub(crate) type ShardHandle = Arc<RwLock<Shard>>;

/// One worker's shards by collection.
#[derive(Default)]
pub(crate) struct WorkerShards(RwLock<HashMap<CollectionId, ShardHandle>>);

impl WorkerShards {
    pub fn get(&self, collection: CollectionId) -> Option<ShardHandle> {
        self.0.read().ok()?.get(&collection).cloned()
    }

    /// The shard of `collection`, made by `make` if there is none yet
    /// (`None` from `make`: there is none to make).
    pub fn get_or_make(&self, collection: CollectionId, make: impl FnOnce() -> Option<Shard>) -> Option<ShardHandle> {
        if let Some(shard) = self.get(collection) {
            return Some(shard);
        }
        let mut shards = self.0.write().ok()?;
        if let Some(shard) = shards.get(&collection) {
            return Some(shard.clone());
        }
        let shard = Arc::new(RwLock::new(make()?));
        shards.insert(collection, shard.clone());
        Some(shard)
    }

    pub fn insert(&self, collection: CollectionId, shard: Shard) {
        if let Ok(mut shards) = self.0.write() {
            shards.insert(collection, Arc::new(RwLock::new(shard)));
        }
    }

    pub fn remove(&self, collection: CollectionId) {
        if let Ok(mut shards) = self.0.write() {
            shards.remove(&collection);
        }
    }

    /// Keeps the shards of the collections `keep` accepts.
    pub fn retain(&self, keep: impl Fn(CollectionId) -> bool) {
        if let Ok(mut shards) = self.0.write() {
            shards.retain(|&collection, _| keep(collection));
        }
    }

    /// Every shard, for the worker's maintenance pass.
    pub fn all(&self) -> Vec<(CollectionId, ShardHandle)> {
        self.0.read().map(|shards| shards.iter().map(|(&c, s)| (c, s.clone())).collect()).unwrap_or_default()
    }
}

/// A poisoned shard lock means a thread panicked while holding it: the
/// shard may be half changed, so nothing is read from or applied to it.
const POISONED: &str = "a shard's lock is poisoned: a thread panicked while holding it";

pub(crate) fn read(shard: &ShardHandle) -> Result<RwLockReadGuard<'_, Shard>, Failure> {
    shard.read().map_err(|_| Failure::Internal(POISONED.into()))
}

pub(crate) fn write(shard: &ShardHandle) -> Result<RwLockWriteGuard<'_, Shard>, Failure> {
    shard.write().map_err(|_| Failure::Internal(POISONED.into()))
}

/// One shard's answer to a read at `ts` (a control request gets `Failed`:
/// those change the shard and run on its worker). Searches, queries and
/// counts read the growing segment under the shard's read lock and the
/// sealed segments after releasing it (see [`Shard::sealed_view`]): the
/// worker waiting to apply the next writes waits for the growing
/// segment's part of a read, never for a graph search.
pub(crate) fn answer_read(
    shard: &ShardHandle,
    kind: &RequestKind,
    ts: Timestamp,
    filter: Option<&Filter>,
    stop: Stop<'_>,
) -> Answer {
    let shard = match read(shard) {
        Ok(shard) => shard,
        Err(failure) => return Answer::Failed(failure),
    };
    if kind.reads_history() && ts < shard.compacted_through() {
        return Answer::Compacted { horizon: shard.compacted_through() };
    }
    match kind {
        RequestKind::Search { .. } | RequestKind::Query { .. } | RequestKind::Count { .. } => {
            let sealed = shard.sealed_view();
            let mut answer = answer_from_segments(shard.growing_reader(), kind, ts, filter, stop);
            drop(shard);
            answer.merge(answer_from_segments(sealed.reader(), kind, ts, filter, stop));
            answer
        }
        RequestKind::Get { pks, output_fields } => Answer::Get(shard.get(pks, ts, output_fields)),
        RequestKind::Stats => Answer::Stats(shard.stats()),
        RequestKind::Checkpoint { .. }
        | RequestKind::Compact { .. }
        | RequestKind::CatalogSync { .. }
        | RequestKind::Leave { .. } => Answer::Failed(Failure::Internal("a control request is not a read".into())),
    }
}

/// A search's, query's or count's answer over some of a shard's segments.
fn answer_from_segments(
    segments: SegmentReader<'_>,
    kind: &RequestKind,
    ts: Timestamp,
    filter: Option<&Filter>,
    stop: Stop<'_>,
) -> Answer {
    let result = match kind {
        RequestKind::Search { field, queries, k, ef, range, output_fields, .. } => {
            let bounds = SearchBounds { k: *k, ef: *ef, range: *range };
            segments
                .search(*field, queries, bounds, ts, filter, output_fields, stop)
                .map(|hits| Answer::Search { k: *k, hits })
        }
        RequestKind::Query { output_fields, limit, .. } => {
            segments.query(filter, ts, output_fields, *limit, stop).map(|rows| Answer::Query { limit: *limit, rows })
        }
        RequestKind::Count { .. } => segments.count(filter, ts, stop).map(Answer::Count),
        _ => return Answer::Failed(Failure::Internal("only searches, queries and counts read segments".into())),
    };
    result.unwrap_or_else(|e| Answer::Failed(e.into()))
}

/// The answer for a collection a worker holds no rows of.
pub(crate) fn empty_answer(kind: &RequestKind) -> Answer {
    match kind {
        RequestKind::Search { queries, k, .. } => Answer::Search { k: *k, hits: vec![Vec::new(); queries.len()] },
        RequestKind::Get { .. } => Answer::Get(Vec::new()),
        RequestKind::Query { limit, .. } => Answer::Query { limit: *limit, rows: Vec::new() },
        RequestKind::Count { .. } => Answer::Count(0),
        RequestKind::Checkpoint { .. } => Answer::Checkpoint(Vec::new()),
        RequestKind::Compact { .. } => Answer::Count(0),
        RequestKind::Stats => Answer::Stats(Default::default()),
        RequestKind::CatalogSync { .. } | RequestKind::Leave { .. } => Answer::Done,
    }
}

/// Compiled filters by (collection, text). Compiling plans the expression
/// with DataFusion on a thread of its own, which costs more than a
/// selective search: a repeated filter compiles once. A collection's
/// schema never changes under its id, so entries never go stale.
#[derive(Default)]
pub(crate) struct FilterCache(Mutex<HashMap<CollectionId, HashMap<String, Filter>>>);

impl FilterCache {
    /// Collections, and filters per collection, kept at most; past either
    /// bound that cache starts over (so dropped collections' filters go too).
    const CAPACITY: usize = 256;

    pub fn get(
        &self,
        collection: CollectionId,
        schema: &CollectionSchema,
        text: &str,
    ) -> vectorflow_core::Result<Filter> {
        // Looked up by `&str`: a hit (every repeated read) allocates no key.
        let cached = self.0.lock().ok().and_then(|cache| cache.get(&collection)?.get(text).cloned());
        if let Some(filter) = cached {
            return Ok(filter);
        }
        let filter = Filter::compile(schema, text)?;
        if let Ok(mut cache) = self.0.lock() {
            if !cache.contains_key(&collection) && cache.len() >= Self::CAPACITY {
                cache.clear();
            }
            let filters = cache.entry(collection).or_default();
            if filters.len() >= Self::CAPACITY {
                filters.clear();
            }
            filters.insert(text.to_string(), filter.clone());
        }
        Ok(filter)
    }
}
