//! The offset bindings topic: a primary publishes there every binding of
//! log offsets to a time and, per worker, how far its bindings have come,
//! so a read replica gives every record the time the primary gave it (and
//! so answers as the primary does at any time).
//!
//! One partition, so bindings and frontiers stay in the order they were
//! made; compacted, since a binding's key is unique and a frontier's key is
//! its worker's. Records are text, each key starting with the deployment's
//! id (`CatalogStore::deployment_id`: one per object store), so
//! deployments that share the brokers and the topic never mix:
//! - `b/{deployment}/{collection}/{partition}/{first}` → `{last} {ts}`:
//!   offsets `first..=last` of that partition of the collection's topic
//!   have time `ts`;
//! - `f/{deployment}/{worker}` → `{workers} {ts}`: the bindings that worker
//!   (of `workers`) made before this record are above it, and every
//!   binding it makes later has a time at or after `ts`.
//!
//! A binding's key gets a tombstone one checkpoint after a checkpoint
//! covers it, so a replica that loaded the previous manifest still finds
//! the bindings it replays. A running replica ignores tombstones: it drops
//! the bindings it has replayed itself.

use std::collections::HashMap;
use std::sync::Weak;
use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::Message;
use vectorflow_core::{CollectionId, Timestamp};

use crate::kafka::{Binding, KafkaLog};

/// How often an idle primary worker publishes its frontier (when it
/// moved): time passes on a replica in steps of about this much.
pub(crate) const FRONTIER_EVERY: Duration = Duration::from_millis(50);

/// How soon a primary worker publishes its frontier after new bindings: a
/// replica applies records once a frontier passes their time, so this is
/// what a write waits for on a replica beyond its delivery.
pub(crate) const FRONTIER_AFTER_BINDINGS: Duration = Duration::from_millis(2);

/// Bindings of collections a replica does not follow yet, kept at most
/// (beyond it they are dropped with a warning: a collection that appears
/// later is read from its topic's start, whose bindings are then missing).
const MAX_UNCLAIMED: usize = 1_000_000;

/// One record of the bindings topic.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum BindingsRecord {
    Binding {
        collection: CollectionId,
        partition: u32,
        binding: Binding,
    },
    Frontier {
        worker: usize,
        workers: usize,
        ts: Timestamp,
    },
    /// A binding a checkpoint covers.
    Forgotten,
}

pub(crate) fn binding_key(deployment: &str, collection: CollectionId, partition: u32, first: u64) -> String {
    format!("b/{deployment}/{collection}/{partition}/{first}")
}

pub(crate) fn binding_record(
    deployment: &str,
    collection: CollectionId,
    partition: u32,
    binding: &Binding,
) -> (String, String) {
    (binding_key(deployment, collection, partition, binding.first), format!("{} {}", binding.last, binding.ts))
}

pub(crate) fn frontier_record(deployment: &str, worker: usize, workers: usize, ts: Timestamp) -> (String, String) {
    (format!("f/{deployment}/{worker}"), format!("{workers} {ts}"))
}

/// A record of the topic for `deployment`, or `None` for another
/// deployment's or one this version does not know.
pub(crate) fn parse(deployment: &str, key: &[u8], value: Option<&[u8]>) -> Option<BindingsRecord> {
    let key = std::str::from_utf8(key).ok()?;
    let mut parts = key.split('/');
    let kind = parts.next()?;
    if parts.next()? != deployment {
        return None;
    }
    let Some(value) = value else { return Some(BindingsRecord::Forgotten) };
    let value = std::str::from_utf8(value).ok()?;
    let (a, b) = value.split_once(' ')?;
    match (kind, parts.next(), parts.next(), parts.next(), parts.next()) {
        ("b", Some(collection), Some(partition), Some(first), None) => Some(BindingsRecord::Binding {
            collection: collection.parse().ok()?,
            partition: partition.parse().ok()?,
            binding: Binding { first: first.parse().ok()?, last: a.parse().ok()?, ts: b.parse().ok()? },
        }),
        ("f", Some(worker), None, None, None) => Some(BindingsRecord::Frontier {
            worker: worker.parse().ok()?,
            workers: a.parse().ok()?,
            ts: b.parse().ok()?,
        }),
        _ => None,
    }
}

/// What a replica learned from the topic besides the bindings of the
/// collections it follows (those go to their partitions' states).
#[derive(Debug, Default)]
pub(crate) struct Learned {
    /// Per primary worker: the primary's worker count and that worker's frontier.
    frontiers: HashMap<usize, (usize, Timestamp)>,
    /// The worker count of the newest frontier record (a primary restarted
    /// with other workers leaves old workers' records behind).
    workers: usize,
    /// Bindings of collections not followed yet, by collection, with the
    /// least time among them.
    unclaimed: HashMap<CollectionId, (Timestamp, Vec<(u32, Binding)>)>,
    unclaimed_count: usize,
}

impl Learned {
    pub fn frontier_of(&mut self, worker: usize, workers: usize, ts: Timestamp) {
        self.workers = workers;
        let slot = self.frontiers.entry(worker).or_insert((workers, ts));
        if slot.0 == workers {
            slot.1 = slot.1.max(ts);
        } else {
            *slot = (workers, ts);
        }
    }

    /// The least time a binding not seen yet can have: every primary
    /// worker's frontier has passed it (0 until each has reported).
    pub fn frontier(&self) -> Timestamp {
        if self.workers == 0 {
            return 0;
        }
        (0..self.workers)
            .map(|w| self.frontiers.get(&w).filter(|(n, _)| *n == self.workers).map_or(0, |(_, ts)| *ts))
            .min()
            .unwrap_or(0)
    }

    pub fn keep_unclaimed(&mut self, collection: CollectionId, partition: u32, binding: Binding) {
        if self.unclaimed_count >= MAX_UNCLAIMED {
            tracing::warn!(collection, "too many bindings of collections not followed; dropping one");
            return;
        }
        self.unclaimed_count += 1;
        let (least, bindings) = self.unclaimed.entry(collection).or_insert((binding.ts, Vec::new()));
        *least = (*least).min(binding.ts);
        bindings.push((partition, binding));
    }

    pub fn claim(&mut self, collection: CollectionId) -> Vec<(u32, Binding)> {
        let (_, claimed) = self.unclaimed.remove(&collection).unwrap_or_default();
        self.unclaimed_count -= claimed.len();
        claimed
    }

    /// The least time of a binding kept for a collection not followed yet:
    /// the sources wait there until it is followed (or forgotten).
    pub fn least_unclaimed(&self) -> Option<Timestamp> {
        self.unclaimed.values().map(|(least, _)| *least).min()
    }

    /// Keeps the unclaimed bindings of the collections `keep` accepts.
    pub fn forget_unless(&mut self, keep: impl Fn(CollectionId) -> bool) {
        self.unclaimed.retain(|&id, _| keep(id));
        self.unclaimed_count = self.unclaimed.values().map(|(_, bindings)| bindings.len()).sum();
    }
}

/// The replica's follower of the bindings topic: reads it from the start,
/// hands what it reads to the log, until the log is dropped.
pub(crate) fn follow(log: Weak<KafkaLog>, consumer: BaseConsumer, deployment: String) {
    let mut batch = Vec::new();
    loop {
        // Not held while polling: the log closes (its bindings database
        // with it) as soon as its engine is gone, so it can open again.
        if log.strong_count() == 0 {
            return;
        }
        let first = consumer.poll(Duration::from_millis(20));
        for message in first.into_iter().chain(std::iter::from_fn(|| consumer.poll(Duration::ZERO))).take(4096) {
            match message {
                // Another deployment's records, or unknown ones, are skipped.
                Ok(message) => batch.extend(message.key().and_then(|key| parse(&deployment, key, message.payload()))),
                Err(e) => {
                    tracing::warn!("reading the bindings topic: {e}");
                    break;
                }
            }
        }
        let position = consumer
            .position()
            .ok()
            .and_then(|list| list.elements().first().and_then(|e| e.offset().to_raw()))
            .unwrap_or(0);
        let Some(strong) = log.upgrade() else { return };
        strong.learn(std::mem::take(&mut batch), position.max(0) as u64);
    }
}

/// Waits until `reached()` or `timeout`; false on timeout.
pub(crate) fn wait_until(timeout: Duration, mut reached: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    while !reached() {
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_round_trip_and_unknown_ones_are_none() {
        let binding = Binding { first: 10, last: 14, ts: 1 << 40 };
        let (key, value) = binding_record("d1", 3, 1, &binding);
        assert_eq!(
            parse("d1", key.as_bytes(), Some(value.as_bytes())),
            Some(BindingsRecord::Binding { collection: 3, partition: 1, binding })
        );
        assert_eq!(parse("d2", key.as_bytes(), Some(value.as_bytes())), None, "another deployment's");
        let (key, value) = frontier_record("d1", 2, 4, 99);
        assert_eq!(
            parse("d1", key.as_bytes(), Some(value.as_bytes())),
            Some(BindingsRecord::Frontier { worker: 2, workers: 4, ts: 99 })
        );
        assert_eq!(parse("d1", key.as_bytes(), None), Some(BindingsRecord::Forgotten));
        assert_eq!(parse("d1", b"x/d1/1", Some(b"1 2")), None);
        assert_eq!(parse("d1", b"b/d1/1/2", Some(b"1 2")), None);
        assert_eq!(parse("d1", b"b/d1/1/2/3", Some(b"oops")), None);
    }

    #[test]
    fn the_frontier_waits_for_every_worker_of_the_newest_count() {
        let mut learned = Learned::default();
        assert_eq!(learned.frontier(), 0);
        learned.frontier_of(0, 2, 100);
        assert_eq!(learned.frontier(), 0, "worker 1 has not reported");
        learned.frontier_of(1, 2, 80);
        assert_eq!(learned.frontier(), 80);
        learned.frontier_of(1, 2, 70);
        assert_eq!(learned.frontier(), 80, "a frontier never moves back");
        // The primary restarted with one worker: only worker 0's new record counts.
        learned.frontier_of(0, 1, 120);
        assert_eq!(learned.frontier(), 120);
        learned.keep_unclaimed(5, 0, Binding { first: 0, last: 1, ts: 7 });
        learned.keep_unclaimed(5, 1, Binding { first: 0, last: 1, ts: 6 });
        learned.keep_unclaimed(6, 0, Binding { first: 0, last: 1, ts: 9 });
        assert_eq!(learned.least_unclaimed(), Some(6));
        assert_eq!(learned.claim(5).len(), 2);
        assert!(learned.claim(5).is_empty());
        assert_eq!(learned.least_unclaimed(), Some(9));
        learned.forget_unless(|id| id != 6);
        assert_eq!(learned.least_unclaimed(), None);
    }
}
