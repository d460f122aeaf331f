//! Subscriptions: the engine's side of standing queries. The workers keep
//! each watch's parts current (`crate::watches`); a delivery thread merges
//! them in time order once every worker has accounted for a time, and sends
//! the subscriber the first answer, then each change of it, and progress
//! when time passes without one. A subscriber that does not keep up fills
//! its buffer and is ended with `ResourceExhausted`; ingestion never waits.

use std::sync::mpsc::{Receiver, RecvTimeoutError, SyncSender, TrySendError};

use vectorflow_operators::Hit;

use super::*;
use crate::watches::{Part, PartBody, Watch, WatchQuery};

/// Subscriptions one engine holds at most.
const MAX_SUBSCRIPTIONS: usize = 10_000;
/// The largest buffer a subscriber may ask for, in events.
const MAX_BUFFER: usize = 1 << 20;

/// What to subscribe to: a search (`queries` not empty) or a changefeed.
#[derive(Debug, Clone)]
pub struct SubscribeOptions {
    /// The vector field searched (the only one when `None`).
    pub field: Option<String>,
    /// Query vectors; none: a changefeed of the rows `filter` passes.
    pub queries: Vec<Vec<f32>>,
    pub k: usize,
    pub filter: Option<String>,
    pub output_fields: Vec<String>,
    /// Start at this past time (inside the retention window) and replay
    /// the changes since; `None`: now (after every acknowledged write).
    pub as_of: Option<Timestamp>,
    /// Events buffered for a subscriber that reads slower than they come;
    /// past it the subscription ends with `ResourceExhausted`.
    pub buffer: usize,
    /// A progress event comes after this long without a change.
    pub progress_every: Duration,
}

impl SubscribeOptions {
    /// The `k` nearest rows to each of `queries`.
    pub fn search(queries: Vec<Vec<f32>>, k: usize) -> SubscribeOptions {
        SubscribeOptions { queries, k, ..SubscribeOptions::changes() }
    }

    /// Every insert, update and delete (of rows passing `filter`, when set).
    pub fn changes() -> SubscribeOptions {
        SubscribeOptions {
            field: None,
            queries: Vec::new(),
            k: 0,
            filter: None,
            output_fields: Vec::new(),
            as_of: None,
            buffer: 1024,
            progress_every: Duration::from_millis(100),
        }
    }
}

/// What a subscriber receives, in timestamp order.
#[derive(Debug, Clone, PartialEq)]
pub enum SubscriptionEvent {
    /// The answer as of `ts`, per query vector (a changefeed's is empty:
    /// it reports the changes after `ts`).
    Snapshot { ts: Timestamp, hits: Vec<Vec<SearchHit>> },
    /// The answer changed at `ts`: per query vector that changed, the hits
    /// that left and those that entered (a hit whose score or fields
    /// changed leaves and enters).
    Changed { ts: Timestamp, changes: Vec<QueryChange> },
    /// Rows passing the filter written at `ts` (their fields, with the
    /// key), and keys whose row was deleted or no longer passes.
    Rows { ts: Timestamp, upserted: Vec<BTreeMap<String, Value>>, deleted: Vec<Pk> },
    /// Nothing changed through `ts`.
    Progress { ts: Timestamp },
}

impl SubscriptionEvent {
    pub fn ts(&self) -> Timestamp {
        match self {
            SubscriptionEvent::Snapshot { ts, .. }
            | SubscriptionEvent::Changed { ts, .. }
            | SubscriptionEvent::Rows { ts, .. }
            | SubscriptionEvent::Progress { ts } => *ts,
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct QueryChange {
    pub query: usize,
    pub removed: Vec<SearchHit>,
    pub added: Vec<SearchHit>,
}

/// A live subscription: iterate it for its events. Dropping it ends it.
/// It does not keep the engine open: when the engine closes, its events end.
pub struct Subscription {
    engine: std::sync::Weak<Inner>,
    id: u64,
    events: Receiver<SubscriptionEvent>,
    ended: Arc<Mutex<Option<Error>>>,
    finished: bool,
}

impl std::fmt::Debug for Subscription {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Subscription").field("id", &self.id).finish()
    }
}

impl Subscription {
    pub fn id(&self) -> u64 {
        self.id
    }

    /// The next event, waiting at most `timeout` (`Ok(None)`: none came).
    /// An ended subscription answers its cause once, then `Shutdown`.
    pub fn recv_timeout(&mut self, timeout: Duration) -> Result<Option<SubscriptionEvent>> {
        if self.finished {
            return Err(Error::Shutdown);
        }
        match self.events.recv_timeout(timeout) {
            Ok(event) => Ok(Some(event)),
            Err(RecvTimeoutError::Timeout) => Ok(None),
            Err(RecvTimeoutError::Disconnected) => {
                self.finished = true;
                Err(self.ended.lock().ok().and_then(|mut e| e.take()).unwrap_or(Error::Shutdown))
            }
        }
    }
}

impl Iterator for Subscription {
    type Item = Result<SubscriptionEvent>;

    fn next(&mut self) -> Option<Self::Item> {
        loop {
            match self.recv_timeout(Duration::from_secs(3600)) {
                Ok(Some(event)) => return Some(Ok(event)),
                Ok(None) => continue,
                // Ended without a cause (the engine closed): the events end.
                Err(Error::Shutdown) => return None,
                Err(e) => return Some(Err(e)),
            }
        }
    }
}

impl Drop for Subscription {
    fn drop(&mut self) {
        let Some(inner) = self.engine.upgrade() else { return };
        inner.shared.watches.remove(self.id);
        if let Ok(mut subscribers) = inner.subscribers.lock() {
            subscribers.remove(&self.id);
        }
    }
}

/// A subscription's query, checked against its collection, before it starts.
pub(super) struct PlannedWatch {
    pub entry: CatalogEntry,
    query: WatchQuery,
    filter: Option<vectorflow_operators::Filter>,
    output_fields: Vec<usize>,
    /// The time of the first answer.
    pub from: Timestamp,
}

/// The delivery side of one subscription.
pub(super) struct Subscriber {
    watch: Arc<Watch>,
    schema: Arc<CollectionSchema>,
    sender: SyncSender<SubscriptionEvent>,
    ended: Arc<Mutex<Option<Error>>>,
    /// Events the subscriber may leave unread.
    buffer: usize,
    progress_every: Duration,
    /// Each worker's newest part (a search's).
    parts: HashMap<usize, Vec<Vec<Hit>>>,
    /// The answer last sent (a search's), per query.
    sent: Option<Vec<Vec<Hit>>>,
    /// Every change through this time has been sent.
    sent_through: Timestamp,
    last_event: Instant,
}

impl Engine {
    /// Subscribes to a standing query on `collection`: its answer as of a
    /// time, then every change, as it happens (see [`SubscriptionEvent`]).
    pub fn subscribe(&self, collection: &str, options: &SubscribeOptions) -> Result<Subscription> {
        let planned = self.plan_watch(collection, options)?;
        self.start_watch(planned, options)
    }

    /// Checks a standing query and picks the time of its first answer.
    pub(super) fn plan_watch(&self, collection: &str, options: &SubscribeOptions) -> Result<PlannedWatch> {
        self.serving()?;
        if self.in_cluster() {
            return Err(Error::argument(
                "subscribe",
                "standing queries are not built for cluster mode yet: subscribe on a read replica of the cluster",
            ));
        }
        let entry = self.entry(collection)?;
        if entry.partition_of.is_none() && !self.partitions_of(&entry.schema.name)?.is_empty() {
            return Err(Error::argument(
                "collection",
                format!("`{collection}` has partitions: standing queries follow collections without partitions"),
            ));
        }
        let schema = &entry.schema;
        if options.buffer == 0 || options.buffer > MAX_BUFFER {
            return Err(Error::argument("buffer", format!("{} outside 1..={MAX_BUFFER}", options.buffer)));
        }
        let query = if options.queries.is_empty() {
            if options.k != 0 || options.field.is_some() {
                return Err(Error::argument("vectors", "a search subscription needs query vectors"));
            }
            WatchQuery::Changes
        } else {
            let (field, metric, queries) =
                self.checked_queries(schema, options.field.as_deref(), &options.queries, options.k)?;
            WatchQuery::Search { field, metric, queries, k: options.k }
        };
        let mut output_fields = self.output_fields(schema, &options.output_fields)?;
        if matches!(query, WatchQuery::Changes) && !output_fields.contains(&schema.primary_index()) {
            output_fields.insert(0, schema.primary_index());
        }
        let filter = match self.checked_filter(entry.id, schema, options.filter.as_deref())? {
            Some(text) => Some(self.inner.shared.filters.get(entry.id, schema, &text)?),
            None => None,
        };
        let from = self.read_ts(&entry, Consistency::Strong, options.as_of, None)?;
        Ok(PlannedWatch { entry, query, filter, output_fields, from })
    }

    /// Registers a planned watch with the workers and its subscriber.
    pub(super) fn start_watch(&self, planned: PlannedWatch, options: &SubscribeOptions) -> Result<Subscription> {
        let PlannedWatch { entry, query, filter, output_fields, from } = planned;
        let schema = &entry.schema;
        let shared = &self.inner.shared;
        let id = self.inner.next_request.fetch_add(1, Ordering::Relaxed);
        let watch = Arc::new(Watch::new(id, entry.id, query, filter, output_fields, from, shared.workers));
        let (sender, events) = std::sync::mpsc::sync_channel(options.buffer);
        let ended = Arc::new(Mutex::new(None));
        {
            let mut subscribers = self.inner.subscribers.lock().map_err(|_| Error::Shutdown)?;
            if subscribers.len() >= MAX_SUBSCRIPTIONS {
                return Err(Error::exhausted(
                    "max_subscriptions",
                    format!("the server holds {MAX_SUBSCRIPTIONS} subscriptions, its limit"),
                ));
            }
            subscribers.insert(
                id,
                Subscriber {
                    watch: watch.clone(),
                    schema: Arc::new(schema.clone()),
                    sender,
                    ended: ended.clone(),
                    buffer: options.buffer,
                    progress_every: options.progress_every,
                    parts: HashMap::new(),
                    sent: None,
                    sent_through: 0,
                    last_event: Instant::now(),
                },
            );
        }
        shared.watches.add(watch);
        self.start_delivery()?;
        shared.wake_segments(None);
        Ok(Subscription { engine: Arc::downgrade(&self.inner), id, events, ended, finished: false })
    }

    /// Starts the thread that delivers subscriptions' events, once.
    fn start_delivery(&self) -> Result<()> {
        let mut delivery = self.inner.delivery.lock().map_err(|_| Error::Shutdown)?;
        if delivery.is_some() {
            return Ok(());
        }
        let weak = Arc::downgrade(&self.inner);
        let thread = std::thread::Builder::new()
            .name("subscriptions".into())
            .spawn(move || deliver(weak))
            .map_err(|e| Error::storage(format!("starting the subscription delivery: {e}")))?;
        *delivery = Some(thread);
        Ok(())
    }
}

/// The delivery loop: after every move of the applied frontier (or every
/// 10 ms), each subscriber gets what its watch's workers accounted for.
fn deliver(inner: std::sync::Weak<Inner>) {
    loop {
        let Some(inner) = inner.upgrade() else { return };
        if inner.closed.load(Ordering::Acquire) {
            return;
        }
        inner.shared.wait_for_progress(Duration::from_millis(10));
        let Ok(mut subscribers) = inner.subscribers.lock() else { return };
        let local = inner.shared.local.clone();
        let mut gone = Vec::new();
        for (id, subscriber) in subscribers.iter_mut() {
            if let Err(end) = subscriber.deliver(local.clone()) {
                inner.shared.watches.remove(*id);
                if let Some(error) = end
                    && let Ok(mut ended) = subscriber.ended.lock()
                {
                    *ended = Some(error);
                }
                gone.push(*id);
            }
        }
        // Dropping a subscriber's sender ends its subscription (after the
        // events it buffered).
        for id in gone {
            subscribers.remove(&id);
        }
    }
}

impl Subscriber {
    /// Sends what every worker has accounted for since the last call.
    /// `Err(Some(_))`: ended with that error; `Err(None)`: the subscriber left.
    fn deliver(&mut self, workers: std::ops::Range<usize>) -> std::result::Result<(), Option<Error>> {
        let watch = self.watch.clone();
        let through = workers.map(|w| watch.through[w].load(Ordering::Acquire)).min().unwrap_or(0);
        if through < watch.from {
            return Ok(());
        }
        let mut parts: Vec<Part> = {
            let Ok(mut inbox) = watch.inbox.lock() else { return Err(None) };
            let (ready, later): (Vec<Part>, Vec<Part>) = inbox.drain(..).partition(|part| part.at <= through);
            *inbox = later;
            ready
        };
        parts.sort_by_key(|part| part.at);
        let mut sent_any = false;
        if self.sent.is_none() {
            // The first event: the answer at the start.
            let (start, rest): (Vec<Part>, Vec<Part>) = parts.into_iter().partition(|p| p.at <= watch.from);
            parts = rest;
            for part in start {
                if let PartBody::Top(top) = part.body {
                    self.parts.insert(part.worker, top);
                }
            }
            let answer = self.merged();
            let hits = answer.iter().map(|hits| hits.iter().map(|h| self.search_hit(h)).collect()).collect();
            self.send(SubscriptionEvent::Snapshot { ts: watch.from, hits })?;
            self.sent = Some(answer);
            self.sent_through = watch.from;
            sent_any = true;
        }
        let mut i = 0;
        while i < parts.len() {
            let at = parts[i].at;
            let mut rows: (Vec<BTreeMap<String, Value>>, Vec<Pk>) = (Vec::new(), Vec::new());
            while i < parts.len() && parts[i].at == at {
                let part = std::mem::replace(&mut parts[i].body, PartBody::Top(Vec::new()));
                match part {
                    PartBody::Top(top) => {
                        self.parts.insert(parts[i].worker, top);
                    }
                    PartBody::Rows { upserted, retired } => {
                        rows.0.extend(
                            upserted.into_iter().map(|(_, fields)| named(&self.schema, &watch.output_fields, fields)),
                        );
                        rows.1.extend(retired);
                    }
                }
                i += 1;
            }
            let event =
                match &watch.query {
                    WatchQuery::Search { .. } => {
                        let answer = self.merged();
                        let changes = self.changes(&answer);
                        self.sent = Some(answer);
                        (!changes.is_empty()).then_some(SubscriptionEvent::Changed { ts: at, changes })
                    }
                    WatchQuery::Changes => (!rows.0.is_empty() || !rows.1.is_empty())
                        .then_some(SubscriptionEvent::Rows { ts: at, upserted: rows.0, deleted: rows.1 }),
                };
            if let Some(event) = event {
                self.send(event)?;
                sent_any = true;
            }
        }
        if !sent_any && through > self.sent_through && self.last_event.elapsed() >= self.progress_every {
            self.send(SubscriptionEvent::Progress { ts: through })?;
        }
        if sent_any || through > self.sent_through {
            self.sent_through = self.sent_through.max(through);
        }
        Ok(())
    }

    fn send(&mut self, event: SubscriptionEvent) -> std::result::Result<(), Option<Error>> {
        match self.sender.try_send(event) {
            Ok(()) => {
                self.last_event = Instant::now();
                Ok(())
            }
            Err(TrySendError::Full(_)) => Err(Some(Error::exhausted(
                "subscription_buffer",
                format!(
                    "the subscriber did not keep up: {} events waited unread, the buffer's size; subscribe again \
                     (as_of the last event's time) with a larger buffer, or read faster",
                    self.buffer
                ),
            ))),
            Err(TrySendError::Disconnected(_)) => Err(None),
        }
    }

    /// The answer now: the `k` nearest over every worker's part, per query.
    fn merged(&self) -> Vec<Vec<Hit>> {
        let WatchQuery::Search { queries, k, .. } = &self.watch.query else { return Vec::new() };
        (0..queries.len())
            .map(|q| {
                let mut all: Vec<&Hit> = self.parts.values().filter_map(|part| part.get(q)).flatten().collect();
                all.sort_by(|a, b| {
                    a.distance.total_cmp(&b.distance).then_with(|| a.pk.order_key().cmp(&b.pk.order_key()))
                });
                all.into_iter().take(*k).cloned().collect()
            })
            .collect()
    }

    /// Per query, the hits of `answer` that differ from the answer last sent.
    fn changes(&self, answer: &[Vec<Hit>]) -> Vec<QueryChange> {
        let empty = Vec::new();
        let sent = self.sent.as_ref().unwrap_or(&empty);
        answer
            .iter()
            .enumerate()
            .filter_map(|(query, now)| {
                let before = sent.get(query).map(Vec::as_slice).unwrap_or_default();
                let removed: Vec<SearchHit> =
                    before.iter().filter(|hit| !now.contains(hit)).map(|h| self.search_hit(h)).collect();
                let added: Vec<SearchHit> =
                    now.iter().filter(|hit| !before.contains(hit)).map(|h| self.search_hit(h)).collect();
                (!removed.is_empty() || !added.is_empty()).then_some(QueryChange { query, removed, added })
            })
            .collect()
    }

    fn search_hit(&self, hit: &Hit) -> SearchHit {
        let metric = match &self.watch.query {
            WatchQuery::Search { metric, .. } => *metric,
            WatchQuery::Changes => Metric::L2,
        };
        SearchHit {
            pk: hit.pk.clone(),
            score: score(metric, hit.distance),
            fields: named(&self.schema, &self.watch.output_fields, hit.fields.clone()),
            group: None,
        }
    }
}
