//! The log: partitioned, offset-addressed and durable. [`LogReader`] is what
//! the dataflow's sources read; [`EmbeddedLog`] implements it over `redb`
//! (one table per partition, one fsynced transaction per write), and the
//! Kafka source will implement it over topics.
//!
//! Timestamps are assigned when a write enters the log and stored with it,
//! so a replay yields exactly the timestamps of the first run.

use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use redb::{Database, ReadableDatabase, ReadableTable, ReadableTableMetadata, TableDefinition};
use serde::{Deserialize, Serialize};
use vectorflow_core::{CollectionId, Error, IpcBatch, Pk, Result, Timestamp, Tso};

/// One mutation as it sits in the log.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LogRecord {
    pub collection: CollectionId,
    pub op: LogOp,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum LogOp {
    /// Rows in canonical layout; each replaces any row with its key.
    Upsert(IpcBatch),
    Delete(Vec<Pk>),
}

/// A record read back from the log, with its position and timestamp.
#[derive(Debug, Clone)]
pub struct LogEntry {
    pub partition: u32,
    pub offset: u64,
    pub ts: Timestamp,
    pub record: LogRecord,
}

/// What one poll of a reader returns.
#[derive(Debug, Default)]
pub struct LogPoll {
    pub entries: Vec<LogEntry>,
    /// Set when the reader has caught up: every later entry of its partitions
    /// has a timestamp at or above this, so the source may advance to it.
    pub frontier: Option<Timestamp>,
}

/// A reader over some partitions of a log, as a dataflow source uses it.
pub trait LogReader: Send {
    /// The partitions this reader follows.
    fn partitions(&self) -> Vec<u32>;
    /// Up to `max` entries past the reader's position, in offset order per partition.
    fn poll(&mut self, max: usize) -> Result<LogPoll>;
}

/// redb page cache of the log.
const LOG_CACHE_BYTES: usize = 32 << 20;

const META: TableDefinition<&str, u64> = TableDefinition::new("meta");
/// The newest timestamp among truncated records (the oracle resumes above it).
const MAX_TRUNCATED_TS: &str = "max_truncated_ts";

/// Meta key of a partition's first offset still held.
fn truncated_key(partition: u32) -> String {
    format!("truncated-{partition}")
}

fn partition_table(partition: u32) -> String {
    format!("partition-{partition}")
}

fn storage(e: impl std::fmt::Display) -> Error {
    Error::storage(format!("embedded log: {e}"))
}

/// A write waiting for its group's commit.
struct PendingWrite {
    ts: Timestamp,
    /// Encoded records with their partitions.
    records: Vec<(u32, Vec<u8>)>,
    /// The group's outcome.
    done: std::sync::mpsc::SyncSender<std::result::Result<(), String>>,
}

#[derive(Default)]
struct PendingWrites {
    queue: Vec<PendingWrite>,
    /// A writer is committing groups (it takes what is queued when its commit ends).
    committing: bool,
}

/// The embedded write-ahead log.
pub struct EmbeddedLog {
    db: Database,
    partitions: u32,
    tso: Tso,
    /// Writes waiting to be committed, in timestamp order (group commit).
    pending: Mutex<PendingWrites>,
    /// The next offset of every partition; held while a group commits (and
    /// while the log is truncated), so offsets grow with timestamps.
    writer: Mutex<Vec<u64>>,
    /// Next offset of each partition, published after commit.
    ends: Vec<AtomicU64>,
    /// Every write with a timestamp at or below this is committed and its
    /// offsets are in `ends` (published after them). While a write is in
    /// flight, a reader that has caught up knows its next entry comes after it.
    committed_through: AtomicU64,
    listeners: Mutex<Vec<Box<dyn Fn() + Send>>>,
}

impl std::fmt::Debug for EmbeddedLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EmbeddedLog").field("partitions", &self.partitions).finish()
    }
}

impl EmbeddedLog {
    /// Opens (or creates) the log in `dir`. The partition count is fixed when
    /// the log is created; a different `partitions` later is ignored with a warning.
    pub fn open(dir: &Path, partitions: u32) -> Result<Arc<EmbeddedLog>> {
        std::fs::create_dir_all(dir)?;
        // Each record is written once and read back once, in order: a small
        // page cache suffices (redb's default of 1 GiB would hold the whole log).
        let db = Database::builder().set_cache_size(LOG_CACHE_BYTES).create(dir.join("wal.redb")).map_err(storage)?;
        let txn = db.begin_write().map_err(storage)?;
        let stored_partitions = {
            let mut meta = txn.open_table(META).map_err(storage)?;
            let stored = meta.get("partitions").map_err(storage)?.map(|v| v.value());
            match stored {
                Some(n) => {
                    if n as u32 != partitions {
                        tracing::warn!(stored = n, asked = partitions, "log partition count is fixed at creation");
                    }
                    n as u32
                }
                None => {
                    meta.insert("partitions", u64::from(partitions.max(1))).map_err(storage)?;
                    partitions.max(1)
                }
            }
        };
        for p in 0..stored_partitions {
            txn.open_table(TableDefinition::<u64, &[u8]>::new(&partition_table(p))).map_err(storage)?;
        }
        txn.commit().map_err(storage)?;

        let mut ends = Vec::new();
        let read = db.begin_read().map_err(storage)?;
        // Truncation may have emptied a partition: its next offset and the
        // newest timestamp are kept in the meta table for that case.
        let meta = read.open_table(META).map_err(storage)?;
        let mut max_ts = meta.get(MAX_TRUNCATED_TS).map_err(storage)?.map_or(0, |v| v.value());
        for p in 0..stored_partitions {
            let table = read.open_table(TableDefinition::<u64, &[u8]>::new(&partition_table(p))).map_err(storage)?;
            let truncated = meta.get(truncated_key(p).as_str()).map_err(storage)?.map_or(0, |v| v.value());
            match table.last().map_err(storage)? {
                Some((offset, bytes)) => {
                    let (ts, _) = decode(bytes.value(), p, offset.value())?;
                    max_ts = max_ts.max(ts);
                    ends.push((offset.value() + 1).max(truncated));
                }
                None => ends.push(truncated),
            }
        }
        drop(meta);
        drop(read);
        Ok(Arc::new(EmbeddedLog {
            db,
            partitions: stored_partitions,
            tso: Tso::new(max_ts),
            pending: Mutex::new(PendingWrites::default()),
            writer: Mutex::new(ends.clone()),
            ends: ends.into_iter().map(AtomicU64::new).collect(),
            committed_through: AtomicU64::new(max_ts),
            listeners: Mutex::new(Vec::new()),
        }))
    }

    pub fn partitions(&self) -> u32 {
        self.partitions
    }

    /// The timestamp oracle writes and reads draw from.
    pub fn tso(&self) -> &Tso {
        &self.tso
    }

    /// Calls `listener` after every durable append (to wake the sources).
    pub fn subscribe(&self, listener: Box<dyn Fn() + Send>) {
        if let Ok(mut listeners) = self.listeners.lock() {
            listeners.push(listener);
        }
    }

    /// Appends one write durably. `timestamps` consecutive timestamps are
    /// reserved; `build` gets the first (the write's timestamp, also usable
    /// as a base for auto ids) and returns the records to append, each with
    /// its partition. Returns the write's timestamp once it is fsynced.
    ///
    /// Group commit: concurrent writes queue in timestamp order; the first
    /// writer to find no commit running commits everything queued in one
    /// transaction (one fsync), then the writes queued meanwhile, and so on.
    /// Each write is acknowledged only once its own transaction is durable.
    pub fn append_with(
        &self,
        timestamps: u64,
        build: impl FnOnce(Timestamp) -> Result<Vec<(u32, LogRecord)>>,
    ) -> Result<Timestamp> {
        let (done, outcome) = std::sync::mpsc::sync_channel(1);
        let (ts, lead) = {
            let mut pending = self.pending.lock().map_err(|_| storage("writer lock poisoned"))?;
            // Allocated under the queue's lock: queue order is timestamp order.
            let ts = self.tso.allocate(timestamps);
            let mut records = Vec::new();
            for (partition, record) in build(ts)? {
                if partition >= self.partitions {
                    return Err(Error::argument(
                        "partition",
                        format!("{partition} out of range 0..{}", self.partitions),
                    ));
                }
                records.push((partition, encode(ts, &record)?));
            }
            pending.queue.push(PendingWrite { ts, records, done });
            let lead = !pending.committing;
            pending.committing = true;
            (ts, lead)
        };
        if lead {
            self.commit_pending();
        }
        match outcome.recv() {
            Ok(Ok(())) => Ok(ts),
            Ok(Err(problem)) => Err(storage(problem)),
            Err(_) => Err(storage("the commit of this write was abandoned")),
        }
    }

    /// Commits queued writes, a group at a time, until the queue is empty.
    fn commit_pending(&self) {
        loop {
            let group = match self.pending.lock() {
                Ok(mut pending) if pending.queue.is_empty() => {
                    pending.committing = false;
                    return;
                }
                Ok(mut pending) => std::mem::take(&mut pending.queue),
                Err(_) => return,
            };
            let result = self.commit_group(&group).map_err(|e| e.to_string());
            for write in group {
                let _ = write.done.send(result.clone());
            }
            if result.is_ok()
                && let Ok(listeners) = self.listeners.lock()
            {
                listeners.iter().for_each(|wake| wake());
            }
        }
    }

    /// Writes one group in one transaction and publishes its offsets.
    fn commit_group(&self, group: &[PendingWrite]) -> Result<()> {
        let mut next = self.writer.lock().map_err(|_| storage("writer lock poisoned"))?;
        let txn = self.db.begin_write().map_err(storage)?;
        let mut new_next = next.clone();
        for write in group {
            for (partition, bytes) in &write.records {
                let p = *partition as usize;
                let mut table = txn
                    .open_table(TableDefinition::<u64, &[u8]>::new(&partition_table(*partition)))
                    .map_err(storage)?;
                table.insert(new_next[p], bytes.as_slice()).map_err(storage)?;
                new_next[p] += 1;
            }
        }
        txn.commit().map_err(storage)?;
        *next = new_next;
        for (p, end) in next.iter().enumerate() {
            self.ends[p].store(*end, Ordering::Release);
        }
        if let Some(newest) = group.iter().map(|write| write.ts).max() {
            self.committed_through.fetch_max(newest, Ordering::Release);
        }
        Ok(())
    }

    /// Appends records that need no auto ids.
    pub fn append(&self, records: Vec<(u32, LogRecord)>) -> Result<Timestamp> {
        self.append_with(1, |_| Ok(records))
    }

    /// A timestamp below which every write is durable and readable, and at or
    /// above which every later write will be; `None` while a write is in flight.
    pub fn watermark(&self) -> Option<Timestamp> {
        let pending = self.pending.try_lock().ok()?;
        (!pending.committing && pending.queue.is_empty()).then(|| self.tso.next_possible())
    }

    /// A reader of `partitions` from their first offsets.
    pub fn reader(self: &Arc<Self>, partitions: Vec<u32>) -> EmbeddedLogReader {
        self.reader_from(partitions, &[])
    }

    /// A reader of `partitions`, each from `start[p]` (0 where `start` is short).
    pub fn reader_from(self: &Arc<Self>, partitions: Vec<u32>, start: &[u64]) -> EmbeddedLogReader {
        let positions = partitions
            .into_iter()
            .filter(|p| *p < self.partitions)
            .map(|p| (p, start.get(p as usize).copied().unwrap_or(0)))
            .collect();
        EmbeddedLogReader { log: self.clone(), positions }
    }

    /// The next offset of every partition.
    pub fn ends(&self) -> Vec<u64> {
        self.ends.iter().map(|end| end.load(Ordering::Acquire)).collect()
    }

    /// Per partition, the first offset whose record has a timestamp above
    /// `ts` (the end when there is none). Timestamps grow with offsets in a
    /// partition, so this is a binary search. Call it once every write at
    /// or before `ts` is committed (for example, after the dataflow's
    /// frontier passed `ts`).
    pub fn positions_after(&self, ts: Timestamp) -> Result<Vec<u64>> {
        let read = self.db.begin_read().map_err(storage)?;
        let mut positions = Vec::with_capacity(self.partitions as usize);
        for p in 0..self.partitions {
            let table = read.open_table(TableDefinition::<u64, &[u8]>::new(&partition_table(p))).map_err(storage)?;
            let end = self.ends[p as usize].load(Ordering::Acquire);
            let mut low = match table.first().map_err(storage)? {
                Some((offset, _)) => offset.value(),
                None => end,
            };
            let mut high = end;
            while low < high {
                let middle = low + (high - low) / 2;
                let entry_ts = match table.get(middle).map_err(storage)? {
                    Some(bytes) => decode(bytes.value(), p, middle)?.0,
                    None => return Err(storage(format!("partition {p} has no offset {middle}"))),
                };
                if entry_ts <= ts {
                    low = middle + 1;
                } else {
                    high = middle;
                }
            }
            positions.push(low);
        }
        Ok(positions)
    }

    /// Drops every record below `positions[p]` in each partition: nothing
    /// will read them again (every checkpoint covers them).
    pub fn truncate_below(&self, positions: &[u64]) -> Result<u64> {
        let _writer = self.writer.lock().map_err(|_| storage("writer lock poisoned"))?;
        let txn = self.db.begin_write().map_err(storage)?;
        let mut removed = 0;
        {
            let mut meta = txn.open_table(META).map_err(storage)?;
            let mut max_ts = meta.get(MAX_TRUNCATED_TS).map_err(storage)?.map_or(0, |v| v.value());
            for (p, &below) in positions.iter().enumerate().take(self.partitions as usize) {
                let p = p as u32;
                let below = below.min(self.ends[p as usize].load(Ordering::Acquire));
                let mut table =
                    txn.open_table(TableDefinition::<u64, &[u8]>::new(&partition_table(p))).map_err(storage)?;
                if below > 0
                    && let Some(bytes) = table.get(below - 1).map_err(storage)?
                {
                    max_ts = max_ts.max(decode(bytes.value(), p, below - 1)?.0);
                }
                let before = table.len().map_err(storage)?;
                table.retain_in::<u64, _>(..below, |_, _| false).map_err(storage)?;
                removed += before - table.len().map_err(storage)?;
                let held = meta.get(truncated_key(p).as_str()).map_err(storage)?.map_or(0, |v| v.value());
                meta.insert(truncated_key(p).as_str(), held.max(below)).map_err(storage)?;
            }
            meta.insert(MAX_TRUNCATED_TS, max_ts).map_err(storage)?;
        }
        txn.commit().map_err(storage)?;
        Ok(removed)
    }

    /// Records held, over every partition.
    pub fn held_records(&self) -> Result<u64> {
        let read = self.db.begin_read().map_err(storage)?;
        let mut held = 0;
        for p in 0..self.partitions {
            let table = read.open_table(TableDefinition::<u64, &[u8]>::new(&partition_table(p))).map_err(storage)?;
            held += table.len().map_err(storage)?;
        }
        Ok(held)
    }
}

fn encode(ts: Timestamp, record: &LogRecord) -> Result<Vec<u8>> {
    bincode::serialize(&(ts, record)).map_err(|e| Error::storage(format!("encoding a log record: {e}")))
}

fn decode(bytes: &[u8], partition: u32, offset: u64) -> Result<(Timestamp, LogRecord)> {
    bincode::deserialize(bytes).map_err(|e| Error::Corrupt {
        location: format!("embedded log partition {partition} offset {offset}"),
        problem: e.to_string(),
    })
}

/// Reads some partitions of an [`EmbeddedLog`].
pub struct EmbeddedLogReader {
    log: Arc<EmbeddedLog>,
    /// (partition, next offset to read)
    positions: Vec<(u32, u64)>,
}

impl LogReader for EmbeddedLogReader {
    fn partitions(&self) -> Vec<u32> {
        self.positions.iter().map(|(p, _)| *p).collect()
    }

    /// Reads up to `max` entries, shared out over the partitions that are
    /// behind, and always reports a frontier: the least timestamp any later
    /// entry of these partitions can carry. A partition that is behind is
    /// bounded by the timestamp of its next unread entry (timestamps never
    /// decrease along a partition), one that has caught up by the log's
    /// watermark. Reporting a frontier while behind is what lets a long
    /// replay (or a reader that stays behind under load) advance time, so
    /// the dataflow applies what it has read and releases backpressure.
    fn poll(&mut self, max: usize) -> Result<LogPoll> {
        // Read the bounds first: everything below them is committed, so
        // it is in what we read next. With a write in flight there is no
        // watermark, but every write not yet committed comes after the last
        // committed one.
        let committed = self.log.committed_through.load(Ordering::Acquire);
        let caught_up_bound = self.log.watermark().unwrap_or(committed + 1);
        let mut entries = Vec::new();
        let behind: Vec<usize> = (0..self.positions.len())
            .filter(|&i| {
                let (p, next) = self.positions[i];
                self.log.ends[p as usize].load(Ordering::Acquire) > next
            })
            .collect();
        let mut frontier = caught_up_bound;
        if !behind.is_empty() {
            let read = self.log.db.begin_read().map_err(storage)?;
            let share = max.div_ceil(behind.len()).max(1);
            for i in behind {
                let (partition, next) = &mut self.positions[i];
                let table = read
                    .open_table(TableDefinition::<u64, &[u8]>::new(&partition_table(*partition)))
                    .map_err(storage)?;
                let mut next_ts = None;
                for (taken, item) in table.range(*next..).map_err(storage)?.enumerate() {
                    let (offset, bytes) = item.map_err(storage)?;
                    let (ts, record) = decode(bytes.value(), *partition, offset.value())?;
                    if taken >= share || entries.len() >= max {
                        next_ts = Some(ts);
                        break;
                    }
                    entries.push(LogEntry { partition: *partition, offset: offset.value(), ts, record });
                    *next = offset.value() + 1;
                }
                if let Some(ts) = next_ts {
                    frontier = frontier.min(ts);
                }
            }
        }
        Ok(LogPoll { entries, frontier: Some(frontier) })
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashSet;

    use super::*;

    fn delete(collection: CollectionId, key: i64) -> LogRecord {
        LogRecord { collection, op: LogOp::Delete(vec![Pk::Int(key)]) }
    }

    #[test]
    fn appends_survive_reopen_with_their_timestamps() {
        let dir = tempfile::tempdir().unwrap();
        let (t1, t2);
        {
            let log = EmbeddedLog::open(dir.path(), 2).unwrap();
            t1 = log.append(vec![(0, delete(1, 10)), (1, delete(1, 11))]).unwrap();
            t2 = log.append(vec![(1, delete(1, 12))]).unwrap();
            assert!(t2 > t1);
        }
        let log = EmbeddedLog::open(dir.path(), 7).unwrap();
        assert_eq!(log.partitions(), 2);
        assert!(log.tso().allocate(1) > t2, "the oracle resumes above the log");
        let mut reader = log.reader(vec![1]);
        let poll = reader.poll(10).unwrap();
        let seen: Vec<(u64, Timestamp)> = poll.entries.iter().map(|e| (e.offset, e.ts)).collect();
        assert_eq!(seen, vec![(0, t1), (1, t2)]);
        assert!(poll.frontier.unwrap() > t2);
        assert!(reader.poll(10).unwrap().entries.is_empty());
    }

    #[test]
    fn positions_after_a_time_and_truncation_keep_offsets_and_the_oracle() {
        let dir = tempfile::tempdir().unwrap();
        let mut stamps = Vec::new();
        {
            let log = EmbeddedLog::open(dir.path(), 2).unwrap();
            for key in 0..6 {
                stamps.push(log.append(vec![((key % 2) as u32, delete(1, key))]).unwrap());
            }
            // Partition 0 holds keys 0, 2, 4 at offsets 0..3; partition 1 keys 1, 3, 5.
            assert_eq!(log.positions_after(0).unwrap(), vec![0, 0]);
            assert_eq!(log.positions_after(stamps[2]).unwrap(), vec![2, 1]);
            assert_eq!(log.positions_after(stamps[5]).unwrap(), vec![3, 3]);
            assert_eq!(log.truncate_below(&[3, 1]).unwrap(), 4);
            assert_eq!(log.held_records().unwrap(), 2);
            assert_eq!(log.positions_after(stamps[2]).unwrap(), vec![3, 1]);
        }
        let log = EmbeddedLog::open(dir.path(), 2).unwrap();
        assert_eq!(log.ends(), vec![3, 3], "offsets never go back, even for an emptied partition");
        assert!(log.tso().allocate(1) > stamps[5]);
        let mut reader = log.reader_from(vec![0, 1], &[3, 1]);
        let offsets: Vec<(u32, u64)> =
            reader.poll(10).unwrap().entries.iter().map(|e| (e.partition, e.offset)).collect();
        assert_eq!(offsets, vec![(1, 1), (1, 2)]);
        assert!(log.append(vec![(0, delete(1, 9))]).unwrap() > stamps[5]);
        assert_eq!(log.ends(), vec![4, 3]);
    }

    #[test]
    fn concurrent_writes_commit_in_groups_with_timestamps_growing_along_each_partition() {
        let dir = tempfile::tempdir().unwrap();
        let log = EmbeddedLog::open(dir.path(), 2).unwrap();
        let acknowledged: Vec<Timestamp> = std::thread::scope(|scope| {
            let writers: Vec<_> = (0..8i64)
                .map(|writer| {
                    let log = &log;
                    scope.spawn(move || {
                        (0..40i64)
                            .map(|i| {
                                let key = writer * 1000 + i;
                                log.append(vec![((key % 2) as u32, delete(1, key)), (0, delete(2, key))]).unwrap()
                            })
                            .collect::<Vec<_>>()
                    })
                })
                .collect();
            writers.into_iter().flat_map(|w| w.join().unwrap()).collect()
        });
        assert_eq!(acknowledged.iter().collect::<HashSet<_>>().len(), 320, "one timestamp per write");
        let mut reader = log.reader(vec![0, 1]);
        let mut entries = Vec::new();
        loop {
            let poll = reader.poll(1000).unwrap();
            if poll.entries.is_empty() {
                break;
            }
            entries.extend(poll.entries);
        }
        assert_eq!(entries.len(), 640);
        for partition in 0..2 {
            let stamps: Vec<Timestamp> = entries.iter().filter(|e| e.partition == partition).map(|e| e.ts).collect();
            assert!(stamps.windows(2).all(|w| w[0] <= w[1]), "timestamps grow along partition {partition}");
        }
        let read: HashSet<Timestamp> = entries.iter().map(|e| e.ts).collect();
        assert!(acknowledged.iter().all(|ts| read.contains(ts)), "every acknowledged write is in the log");
    }

    #[test]
    fn a_partial_poll_claims_the_next_entrys_time_as_its_frontier() {
        let dir = tempfile::tempdir().unwrap();
        let log = EmbeddedLog::open(dir.path(), 1).unwrap();
        let stamps: Vec<Timestamp> = (0..5).map(|key| log.append(vec![(0, delete(1, key))]).unwrap()).collect();
        let mut reader = log.reader(vec![0]);
        let first = reader.poll(3).unwrap();
        assert_eq!(first.entries.len(), 3);
        // Behind, the reader still lets time advance up to its next entry.
        assert_eq!(first.frontier, Some(stamps[3]));
        let rest = reader.poll(3).unwrap();
        assert_eq!(rest.entries.len(), 2);
        assert!(rest.frontier.unwrap() > stamps[4]);
    }

    #[test]
    fn a_reader_that_caught_up_has_a_frontier_while_a_write_is_in_flight() {
        let dir = tempfile::tempdir().unwrap();
        let log = EmbeddedLog::open(dir.path(), 2).unwrap();
        let last = log.append(vec![(0, delete(1, 1)), (1, delete(1, 2))]).unwrap();
        let mut reader = log.reader(vec![0, 1]);
        // A write whose group is committing.
        let in_flight = {
            log.pending.lock().unwrap().committing = true;
            log.writer.lock().unwrap()
        };
        let poll = reader.poll(10).unwrap();
        assert_eq!(poll.entries.len(), 2);
        assert_eq!(poll.frontier, Some(last + 1), "the next write comes after the last committed one");
        drop(in_flight);
        log.pending.lock().unwrap().committing = false;
        assert!(reader.poll(10).unwrap().frontier.unwrap() > last);
    }

    #[test]
    fn partitions_behind_share_a_poll_and_the_slowest_bounds_the_frontier() {
        let dir = tempfile::tempdir().unwrap();
        let log = EmbeddedLog::open(dir.path(), 2).unwrap();
        let stamps: Vec<Timestamp> =
            (0..8).map(|key| log.append(vec![((key % 2) as u32, delete(1, key))]).unwrap()).collect();
        let mut reader = log.reader(vec![0, 1]);
        let poll = reader.poll(4).unwrap();
        let per_partition = |p: u32| poll.entries.iter().filter(|e| e.partition == p).count();
        assert_eq!((per_partition(0), per_partition(1)), (2, 2));
        // Partition 0 holds keys 0, 2, 4, 6 and partition 1 keys 1, 3, 5, 7: the next unread are keys 4 and 5.
        assert_eq!(poll.frontier, Some(stamps[4]));
    }
}
