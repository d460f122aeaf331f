//! Kafka sinks: standing queries whose changes the server writes to a
//! topic, kept in the catalog so they resume after a restart.
//!
//! **Records.** A sink appends to one partition of its topic, so its records
//! keep their order. Each event of its subscription becomes one or more
//! records, all with the event's time `ts` and their place in it (`seq` of
//! `count`); the key names the sink and the row (`{sink}/{query}/{pk}` for a
//! search's hit, `{sink}/{pk}` for a changefeed's row, `{sink}` for a
//! progress record), the value is JSON:
//! `{"sink", "incarnation", "ts", "seq", "count", "kind", "op", "query",
//! "pk", "score", "fields"}`, `kind` one of `snapshot` (the first answer, one
//! `+` record per hit), `change` (`-` for a hit that left, `+` for one that
//! entered), `row` (`-` deleted, replaced or no longer passing, then `+` written) and
//! `progress` (nothing changed through `ts`; also the first record when the
//! first answer is empty).
//!
//! **Exactly once across restarts.** The records of one time are made in
//! an order that depends only on the answers (hits by rank, rows by key), so
//! making them again gives the same records. A sink that (re)starts reads
//! its last record back from the partition: if it completes its time `T`,
//! the sink subscribes `as_of T` and writes what comes after; if it is
//! record `seq` of a time `T` that was cut short, it subscribes `as_of T-1`
//! and writes the records of `T` from `seq + 1` on. The producer is
//! idempotent, so a retry neither repeats nor reorders records. A resume
//! point older than the retention window cannot be replayed: the sink
//! stops, loudly, and says so.

use std::sync::Weak;
use std::sync::atomic::AtomicBool;

use serde::{Deserialize, Serialize};
use vectorflow_connectors::SinkDefinition;
use vectorflow_connectors::kafka_sink::SinkTopic;

use super::*;

/// Events a sink's subscription buffers while its producer is slow; past
/// it the subscription ends and the sink resumes from what it wrote.
const SINK_BUFFER: usize = 4096;
/// The longest a sink waits before trying again after an error.
const MAX_RETRY_WAIT: Duration = Duration::from_secs(10);

/// Where a sink stands.
#[derive(Debug, Clone, PartialEq)]
pub enum SinkState {
    Starting,
    Running,
    /// It failed and tries again (the error says why).
    Retrying(String),
    /// It cannot go on (the error says why); drop it and make it again.
    Failed(String),
}

impl std::fmt::Display for SinkState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SinkState::Starting => write!(f, "starting"),
            SinkState::Running => write!(f, "running"),
            SinkState::Retrying(why) => write!(f, "retrying: {why}"),
            SinkState::Failed(why) => write!(f, "failed: {why}"),
        }
    }
}

/// A sink and how far it has come.
#[derive(Debug, Clone, PartialEq)]
pub struct SinkStatus {
    pub definition: SinkDefinition,
    pub state: SinkState,
    /// Every record through this time is in the topic.
    pub written_through: Timestamp,
    /// Records written since this server started the sink.
    pub records: u64,
}

/// A running sink's shared state; its thread runs `run_sink`.
pub(super) struct SinkRunner {
    definition: SinkDefinition,
    state: Mutex<SinkState>,
    written_through: AtomicU64,
    records: AtomicU64,
    stop: AtomicBool,
}

impl SinkRunner {
    fn status(&self) -> SinkStatus {
        SinkStatus {
            definition: self.definition.clone(),
            state: self.state.lock().map(|s| s.clone()).unwrap_or(SinkState::Failed("state lock poisoned".into())),
            written_through: self.written_through.load(Ordering::Acquire),
            records: self.records.load(Ordering::Relaxed),
        }
    }

    fn set_state(&self, state: SinkState) {
        if let Ok(mut current) = self.state.lock() {
            *current = state;
        }
    }

    pub(super) fn stop(&self) {
        self.stop.store(true, Ordering::Release);
    }
}

/// What a sink record says of its place: the part read back at resume.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct RecordPlace {
    sink: String,
    incarnation: String,
    ts: Timestamp,
    seq: u32,
    count: u32,
}

/// One record of a sink, as written: its place, then what it says.
#[derive(Serialize)]
struct SinkRecord<'a> {
    sink: &'a str,
    incarnation: &'a str,
    ts: Timestamp,
    seq: u32,
    count: u32,
    #[serde(flatten)]
    body: &'a Unplaced,
}

/// A record before its place in its time is known.
#[derive(Serialize)]
struct Unplaced {
    /// The Kafka key, not part of the value.
    #[serde(skip)]
    key: String,
    kind: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    op: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    query: Option<usize>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pk: Option<serde_json::Value>,
    #[serde(skip_serializing_if = "Option::is_none")]
    score: Option<f32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    fields: Option<serde_json::Map<String, serde_json::Value>>,
}

/// Where a (re)started sink subscribes and what it leaves out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Resume {
    as_of: Timestamp,
    /// Whether the first answer (the snapshot at `as_of`) is written.
    write_snapshot: bool,
    /// Records of the first time written that were written before.
    skip: usize,
    /// The time whose records were cut short, when one was.
    cut_at: Option<Timestamp>,
}

/// Where a sink whose last record is `last` goes on.
fn resume_after(definition: &SinkDefinition, last: Option<&RecordPlace>) -> Resume {
    let start = Resume { as_of: definition.start_ts, write_snapshot: true, skip: 0, cut_at: None };
    let Some(last) = last else { return start };
    let complete = last.seq + 1 >= last.count;
    match (complete, last.ts <= definition.start_ts) {
        (true, _) => Resume { as_of: last.ts, write_snapshot: false, skip: 0, cut_at: None },
        (false, true) => Resume { skip: last.seq as usize + 1, cut_at: Some(last.ts), ..start },
        // Nothing changes between T-1 and T, so the answer at T-1 is the
        // one the records of T were a change of.
        (false, false) => {
            Resume { as_of: last.ts - 1, write_snapshot: false, skip: last.seq as usize + 1, cut_at: Some(last.ts) }
        }
    }
}

fn pk_json(pk: &Pk) -> serde_json::Value {
    Value::from(pk.clone()).to_json()
}

fn pk_text(pk: &serde_json::Value) -> String {
    match pk {
        serde_json::Value::String(text) => text.clone(),
        other => other.to_string(),
    }
}

fn json_fields(fields: &BTreeMap<String, Value>) -> serde_json::Map<String, serde_json::Value> {
    fields.iter().map(|(name, value)| (name.clone(), value.to_json())).collect()
}

/// An event's records, in the order that depends only on the answers.
fn event_records(name: &str, primary: &str, event: &SubscriptionEvent) -> Vec<Unplaced> {
    let hit = |kind: &'static str, op: &'static str, query: usize, hit: &SearchHit| {
        let pk = pk_json(&hit.pk);
        Unplaced {
            key: format!("{name}/{query}/{}", pk_text(&pk)),
            kind,
            op: Some(op),
            query: Some(query),
            pk: Some(pk),
            score: Some(hit.score),
            fields: Some(json_fields(&hit.fields)),
        }
    };
    let progress = || Unplaced {
        key: name.to_string(),
        kind: "progress",
        op: None,
        query: None,
        pk: None,
        score: None,
        fields: None,
    };
    let mut records = Vec::new();
    match event {
        SubscriptionEvent::Snapshot { hits, .. } => {
            for (query, hits) in hits.iter().enumerate() {
                records.extend(hits.iter().map(|h| hit("snapshot", "+", query, h)));
            }
        }
        SubscriptionEvent::Changed { changes, .. } => {
            for change in changes {
                records.extend(change.removed.iter().map(|h| hit("change", "-", change.query, h)));
                records.extend(change.added.iter().map(|h| hit("change", "+", change.query, h)));
            }
        }
        SubscriptionEvent::Rows { upserted, deleted, .. } => {
            // Workers hand their parts over in any order; by key (stable,
            // so one key's rows keep theirs) the order is the data's.
            let mut upserted: Vec<(serde_json::Value, &BTreeMap<String, Value>)> = upserted
                .iter()
                .map(|row| (row.get(primary).map_or(serde_json::Value::Null, Value::to_json), row))
                .collect();
            upserted.sort_by_key(|(pk, _)| pk_text(pk));
            let mut deleted: Vec<serde_json::Value> = deleted.iter().map(pk_json).collect();
            deleted.sort_by_key(pk_text);
            // Deletes first: an upsert that replaces a passing row retires it too.
            records.extend(deleted.into_iter().map(|pk| Unplaced {
                key: format!("{name}/{}", pk_text(&pk)),
                kind: "row",
                op: Some("-"),
                query: None,
                pk: Some(pk),
                score: None,
                fields: None,
            }));
            records.extend(upserted.into_iter().map(|(pk, row)| Unplaced {
                key: format!("{name}/{}", pk_text(&pk)),
                kind: "row",
                op: Some("+"),
                query: None,
                pk: Some(pk),
                score: None,
                fields: Some(json_fields(row)),
            }));
        }
        SubscriptionEvent::Progress { .. } => {}
    }
    if records.is_empty() {
        // Progress, or a first answer with nothing in it: one record
        // still marks the time as written.
        records.push(progress());
    }
    records
}

impl Engine {
    /// Makes a Kafka sink: `options`' standing query on `collection`, its
    /// changes written to `topic` (made when missing) from now, or from
    /// `options.as_of`, on; it runs until dropped, also across restarts.
    pub fn create_sink(
        &self,
        name: &str,
        collection: &str,
        topic: &str,
        options: &SubscribeOptions,
    ) -> Result<SinkStatus> {
        self.writable("sink changes")?;
        check_sink_name("name", name)?;
        check_sink_name("topic", topic)?;
        let kafka = self.sink_kafka()?;
        let _changes = self.inner.catalog_changes.lock().map_err(|_| Error::Shutdown)?;
        let planned = self.plan_watch(collection, options)?;
        let partitions = SinkTopic::prepare(kafka, topic)?;
        let mut definition = SinkDefinition {
            name: name.to_string(),
            collection: planned.entry.schema.name.clone(),
            topic: topic.to_string(),
            partition: (crc32fast::hash(name.as_bytes()) % partitions.max(1)) as i32,
            field: options.field.clone(),
            queries: options.queries.clone(),
            k: options.k,
            filter: options.filter.clone(),
            output_fields: options.output_fields.clone(),
            start_ts: planned.from,
            progress_every_ms: options.progress_every.as_millis().max(1) as u64,
            incarnation: String::new(),
        };
        definition.incarnation = definition.compute_incarnation();
        self.inner.catalog_store.create_sink(definition.clone())?;
        let runner = self.start_sink(definition)?;
        Ok(runner.status())
    }

    /// Stops a sink and forgets it (its records stay in its topic).
    pub fn drop_sink(&self, name: &str) -> Result<()> {
        self.writable("sink changes")?;
        let _changes = self.inner.catalog_changes.lock().map_err(|_| Error::Shutdown)?;
        self.inner.catalog_store.drop_sink(name)?;
        if let Some(runner) = self.inner.sinks.lock().map_err(|_| Error::Shutdown)?.remove(name) {
            runner.stop();
        }
        Ok(())
    }

    /// Every sink and how far it has come.
    pub fn sinks(&self) -> Result<Vec<SinkStatus>> {
        let running = self.inner.sinks.lock().map_err(|_| Error::Shutdown)?;
        let mut sinks: Vec<SinkStatus> = running.values().map(|runner| runner.status()).collect();
        sinks.sort_by(|a, b| a.definition.name.cmp(&b.definition.name));
        Ok(sinks)
    }

    /// Starts the catalog's sinks (at open, on a primary).
    pub(super) fn start_sinks(&self) -> Result<()> {
        if self.is_replica() || self.in_cluster() {
            return Ok(());
        }
        for definition in self.inner.catalog_store.sinks()? {
            self.start_sink(definition)?;
        }
        Ok(())
    }

    fn sink_kafka(&self) -> Result<&KafkaConfig> {
        if self.in_cluster() {
            return Err(Error::argument("sink", "Kafka sinks are not built for cluster mode yet"));
        }
        self.inner
            .config
            .kafka
            .as_ref()
            .ok_or_else(|| Error::argument("sink", "a Kafka sink writes to the brokers of `log.kafka`: configure them"))
    }

    fn start_sink(&self, definition: SinkDefinition) -> Result<Arc<SinkRunner>> {
        let name = definition.name.clone();
        let runner = Arc::new(SinkRunner {
            definition,
            state: Mutex::new(SinkState::Starting),
            written_through: AtomicU64::new(0),
            records: AtomicU64::new(0),
            stop: AtomicBool::new(false),
        });
        let weak = Arc::downgrade(&self.inner);
        let running = runner.clone();
        std::thread::Builder::new()
            .name(format!("sink-{name}"))
            .spawn(move || run_sink(weak, running))
            .map_err(|e| Error::storage(format!("starting sink `{name}`: {e}")))?;
        if let Some(former) = self.inner.sinks.lock().map_err(|_| Error::Shutdown)?.insert(name, runner.clone()) {
            former.stop();
        }
        Ok(runner)
    }
}

/// Names of sinks and topics: what Kafka allows in a topic name.
fn check_sink_name(argument: &str, name: &str) -> Result<()> {
    let allowed = |c: char| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-');
    if name.is_empty() || name.len() > 200 || !name.chars().all(allowed) {
        return Err(Error::argument(argument, format!("`{name}`: use 1 to 200 of A-Z, a-z, 0-9, `.`, `_`, `-`")));
    }
    Ok(())
}

/// Why a sink's run ended.
enum SinkEnd {
    /// Dropped, or the engine closed.
    Stopped,
    /// Try again from what was written.
    Retry(Error),
    /// It cannot go on.
    Failed(String),
}

/// A sink's thread: runs it, and after an error resumes it from what it
/// wrote, until it is dropped or the engine closes.
fn run_sink(inner: Weak<Inner>, runner: Arc<SinkRunner>) {
    let mut wait = Duration::from_millis(100);
    loop {
        match write_sink(&inner, &runner) {
            SinkEnd::Stopped => return,
            SinkEnd::Failed(why) => {
                tracing::error!(sink = %runner.definition.name, "sink stopped: {why}");
                runner.set_state(SinkState::Failed(why));
                return;
            }
            SinkEnd::Retry(error) => {
                tracing::warn!(sink = %runner.definition.name, "sink resumes after {wait:?}: {error}");
                runner.set_state(SinkState::Retrying(error.to_string()));
            }
        }
        let until = Instant::now() + wait;
        while Instant::now() < until {
            if runner.stop.load(Ordering::Acquire) || inner.upgrade().is_none_or(|i| i.closed.load(Ordering::Acquire)) {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        wait = (wait * 2).min(MAX_RETRY_WAIT);
    }
}

/// One run of a sink: finds where it stopped, subscribes from there and
/// writes every event's records until something ends it.
fn write_sink(inner: &Weak<Inner>, runner: &SinkRunner) -> SinkEnd {
    let definition = &runner.definition;
    let Some(engine) = inner.upgrade().map(|inner| Engine { inner }) else { return SinkEnd::Stopped };
    let kafka = match engine.sink_kafka() {
        Ok(kafka) => kafka.clone(),
        Err(e) => return SinkEnd::Failed(e.to_string()),
    };
    let topic = match SinkTopic::open(&kafka, &definition.topic, definition.partition) {
        Ok(topic) => topic,
        Err(e) => return SinkEnd::Retry(e),
    };
    let last = topic.last_record(|_, value| {
        serde_json::from_slice::<RecordPlace>(value)
            .is_ok_and(|place| place.sink == definition.name && place.incarnation == definition.incarnation)
    });
    let last: Option<RecordPlace> = match last {
        Ok(last) => last.and_then(|value| serde_json::from_slice(&value).ok()),
        Err(e) => return SinkEnd::Retry(e),
    };
    let resume = resume_after(definition, last.as_ref());
    let options = SubscribeOptions {
        field: definition.field.clone(),
        queries: definition.queries.clone(),
        k: definition.k,
        filter: definition.filter.clone(),
        output_fields: definition.output_fields.clone(),
        as_of: Some(resume.as_of),
        buffer: SINK_BUFFER,
        progress_every: Duration::from_millis(definition.progress_every_ms.max(1)),
    };
    let mut subscription = match engine.subscribe(&definition.collection, &options) {
        Ok(subscription) => subscription,
        Err(e @ (Error::OutsideRetention { .. } | Error::CollectionNotFound(_) | Error::InvalidArgument { .. })) => {
            return SinkEnd::Failed(format!("resuming at {}: {e}", resume.as_of));
        }
        Err(Error::Shutdown) => return SinkEnd::Stopped,
        Err(e) => return SinkEnd::Retry(e),
    };
    let primary = engine.entry(&definition.collection).map(|e| e.schema.primary().name.clone()).unwrap_or_default();
    // The sink must not keep the engine open.
    drop(engine);
    runner.set_state(SinkState::Running);
    runner.written_through.store(resume.as_of, Ordering::Release);
    let mut first = true;
    let mut pending_cut = resume.cut_at.map(|at| (at, resume.skip));
    // Per time sent: the records sent through it, until the brokers took them.
    let mut in_flight: std::collections::VecDeque<(u64, Timestamp)> = std::collections::VecDeque::new();
    let mut sent = 0u64;
    let records_before = runner.records.load(Ordering::Relaxed);
    let end = loop {
        let delivered = topic.delivered();
        runner.records.store(records_before + delivered, Ordering::Relaxed);
        while let Some(&(through, ts)) = in_flight.front()
            && through <= delivered
        {
            runner.written_through.store(ts, Ordering::Release);
            in_flight.pop_front();
        }
        if runner.stop.load(Ordering::Acquire) {
            break SinkEnd::Stopped;
        }
        let event = match subscription.recv_timeout(Duration::from_millis(20)) {
            Ok(Some(event)) => event,
            Ok(None) => match topic.delivery_failure() {
                Ok(()) => continue,
                Err(e) => break SinkEnd::Retry(e),
            },
            Err(Error::Shutdown) => break SinkEnd::Stopped,
            Err(e) => break SinkEnd::Retry(e),
        };
        let ts = event.ts();
        let mut skip = 0;
        if first {
            first = false;
            if matches!(event, SubscriptionEvent::Snapshot { .. }) && !resume.write_snapshot {
                in_flight.push_back((sent, ts));
                continue;
            }
        }
        if let Some((cut_at, cut_skip)) = pending_cut.take() {
            // The first records written are those of the time cut short.
            if ts != cut_at {
                break SinkEnd::Failed(format!(
                    "the records of time {cut_at} were cut short, and the answer's next change is at {ts}: \
                     the sink cannot tell what is missing"
                ));
            }
            skip = cut_skip;
        }
        let records = event_records(&definition.name, &primary, &event);
        let count = records.len() as u32;
        if skip > records.len() {
            break SinkEnd::Failed(format!("time {ts} had {skip} records written, and {count} are made for it again"));
        }
        let mut failed = None;
        for (seq, record) in records.into_iter().enumerate().skip(skip) {
            let value = SinkRecord {
                sink: &definition.name,
                incarnation: &definition.incarnation,
                ts,
                seq: seq as u32,
                count,
                body: &record,
            };
            let written = serde_json::to_vec(&value)
                .map_err(|e| Error::Internal(format!("encoding a sink record: {e}")))
                .and_then(|bytes| topic.send(&record.key, &bytes));
            if let Err(e) = written {
                failed = Some(e);
                break;
            }
            sent += 1;
        }
        if let Some(e) = failed {
            break SinkEnd::Retry(e);
        }
        in_flight.push_back((sent, ts));
    };
    drop(subscription);
    // Before a resume reads back what was written, whatever is on its way
    // must have landed (or failed).
    if let Err(e) = topic.flush(kafka.timeout()) {
        tracing::warn!(sink = %definition.name, "flushing the sink's records: {e}");
    }
    end
}

#[cfg(test)]
mod tests {
    use super::*;

    fn definition() -> SinkDefinition {
        SinkDefinition {
            name: "s".into(),
            collection: "c".into(),
            topic: "t".into(),
            partition: 0,
            field: None,
            queries: vec![vec![1.0, 0.0]],
            k: 3,
            filter: None,
            output_fields: Vec::new(),
            start_ts: 100,
            progress_every_ms: 1000,
            incarnation: "x".into(),
        }
    }

    fn place(ts: Timestamp, seq: u32, count: u32) -> RecordPlace {
        RecordPlace { sink: "s".into(), incarnation: "x".into(), ts, seq, count }
    }

    #[test]
    fn a_sink_resumes_after_its_last_whole_time_or_inside_a_cut_one() {
        let def = definition();
        assert_eq!(resume_after(&def, None), Resume { as_of: 100, write_snapshot: true, skip: 0, cut_at: None });
        // The first answer cut after its second record.
        assert_eq!(
            resume_after(&def, Some(&place(100, 1, 3))),
            Resume { as_of: 100, write_snapshot: true, skip: 2, cut_at: Some(100) }
        );
        // The first answer whole: only what comes after it.
        assert_eq!(
            resume_after(&def, Some(&place(100, 2, 3))),
            Resume { as_of: 100, write_snapshot: false, skip: 0, cut_at: None }
        );
        assert_eq!(
            resume_after(&def, Some(&place(250, 0, 1))),
            Resume { as_of: 250, write_snapshot: false, skip: 0, cut_at: None }
        );
        // A change cut short: the answer before it, then its rest.
        assert_eq!(
            resume_after(&def, Some(&place(250, 0, 4))),
            Resume { as_of: 249, write_snapshot: false, skip: 1, cut_at: Some(250) }
        );
    }

    #[test]
    fn records_of_one_time_come_in_an_order_set_by_the_data() {
        let row = |id: i64| BTreeMap::from([("id".to_string(), Value::Int(id))]);
        let a =
            SubscriptionEvent::Rows { ts: 7, upserted: vec![row(3), row(1)], deleted: vec![Pk::Int(9), Pk::Int(2)] };
        let b =
            SubscriptionEvent::Rows { ts: 7, upserted: vec![row(1), row(3)], deleted: vec![Pk::Int(2), Pk::Int(9)] };
        let keys = |event| event_records("s", "id", &event).into_iter().map(|r| (r.key, r.op)).collect::<Vec<_>>();
        let expected: Vec<(String, Option<&str>)> = vec![
            ("s/2".into(), Some("-")),
            ("s/9".into(), Some("-")),
            ("s/1".into(), Some("+")),
            ("s/3".into(), Some("+")),
        ];
        assert_eq!(keys(a), expected);
        assert_eq!(keys(b), expected);
        let empty = event_records("s", "id", &SubscriptionEvent::Snapshot { ts: 1, hits: vec![Vec::new()] });
        assert_eq!(empty.len(), 1);
        assert_eq!((empty[0].kind, empty[0].key.as_str()), ("progress", "s"));
    }
}
