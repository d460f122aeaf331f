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
        let left = inner.subscribers.lock().ok().and_then(|mut subscribers| subscribers.remove(&self.id));
        if let Some(subscriber) = left {
            subscriber.forget(&inner);
        }
    }
}

/// A subscription's query, checked against its collection, before it starts.
pub(super) struct PlannedWatch {
    pub entry: CatalogEntry,
    query: WatchQuery,
    /// The filter's text (each member compiles it for its own entry).
    filter: Option<String>,
    output_fields: Vec<usize>,
    /// The time of the first answer.
    pub from: Timestamp,
    /// Whether the subscription follows the collection's partitions (its
    /// `_default` is the collection's own entry).
    partitioned: bool,
}

/// A part, with the index of the member whose watch handed it over.
type MemberPart = (usize, Part);

/// One catalog entry a subscription follows: the collection's own, or one
/// of its partitions', each with a watch of its own.
struct Member {
    watch: Arc<Watch>,
    /// Each worker's newest part (a search's).
    parts: HashMap<usize, Vec<Vec<Hit>>>,
    /// A dropped partition: from this time on its rows are out of the answer.
    dropped_at: Option<Timestamp>,
}

/// The delivery side of one subscription.
pub(super) struct Subscriber {
    /// The collection's own entry (the first member's).
    entry: CatalogEntry,
    query: WatchQuery,
    filter: Option<String>,
    output_fields: Vec<usize>,
    /// The time of the first answer.
    from: Timestamp,
    partitioned: bool,
    members: Vec<Member>,
    /// The catalog version its partitions were last followed at.
    catalog_seen: u64,
    schema: Arc<CollectionSchema>,
    sender: SyncSender<SubscriptionEvent>,
    ended: Arc<Mutex<Option<Error>>>,
    /// Events the subscriber may leave unread.
    buffer: usize,
    progress_every: Duration,
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
        let partitioned = entry.partition_of.is_none();
        if partitioned && self.is_replica() && !self.partitions_of(&entry.schema.name)?.is_empty() {
            // A replica learns a partition's drop up to a second late,
            // and the answer would keep its rows meanwhile.
            return Err(Error::argument(
                "collection",
                format!(
                    "`{collection}` has partitions: on a read replica a standing query follows one partition \
                     (name `{collection}.<partition>` with Engine::partition) or a collection without partitions"
                ),
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
        let filter = self.checked_filter(entry.id, schema, options.filter.as_deref())?;
        let from = self.read_ts(&entry, Consistency::Strong, options.as_of, None)?;
        Ok(PlannedWatch { entry, query, filter, output_fields, from, partitioned })
    }

    /// Registers a planned watch with the workers and its subscriber.
    pub(super) fn start_watch(&self, planned: PlannedWatch, options: &SubscribeOptions) -> Result<Subscription> {
        let PlannedWatch { entry, query, filter, output_fields, from, partitioned } = planned;
        let id = self.inner.next_request.fetch_add(1, Ordering::Relaxed);
        let (sender, events) = std::sync::mpsc::sync_channel(options.buffer);
        let ended = Arc::new(Mutex::new(None));
        let mut subscriber = Subscriber {
            schema: Arc::new(entry.schema.clone()),
            entry,
            query,
            filter,
            output_fields,
            from,
            partitioned,
            members: Vec::new(),
            catalog_seen: u64::MAX,
            sender,
            ended: ended.clone(),
            buffer: options.buffer,
            progress_every: options.progress_every,
            sent: None,
            sent_through: 0,
            last_event: Instant::now(),
        };
        // The partitions that exist at the start; those made later join
        // at the first delivery (see `Subscriber::follow_partitions`).
        subscriber.add_member(&self.inner, subscriber.entry.clone(), from)?;
        if partitioned {
            let collections = self.inner.collections.read().map_err(|_| Error::Shutdown)?;
            let at_start: Vec<CatalogEntry> = catalog::partition_entries(&collections, &subscriber.entry.schema.name)
                .filter(|e| e.is_partition_at(&subscriber.entry.schema.name, from))
                .cloned()
                .collect();
            drop(collections);
            for partition in at_start {
                subscriber.add_member(&self.inner, partition, from)?;
            }
        }
        {
            let mut subscribers = self.inner.subscribers.lock().map_err(|_| Error::Shutdown)?;
            if subscribers.len() >= MAX_SUBSCRIPTIONS {
                subscriber.forget(&self.inner);
                return Err(Error::exhausted(
                    "max_subscriptions",
                    format!("the server holds {MAX_SUBSCRIPTIONS} subscriptions, its limit"),
                ));
            }
            subscribers.insert(id, subscriber);
        }
        self.start_delivery()?;
        self.inner.shared.wake_segments(None);
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
            if let Err(end) = subscriber.deliver(&inner, local.clone()) {
                subscriber.forget(&inner);
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
    /// Follows `entry` (the collection, or one of its partitions) from `from` on.
    fn add_member(&mut self, inner: &Inner, entry: CatalogEntry, from: Timestamp) -> Result<()> {
        let filter = match &self.filter {
            Some(text) => Some(inner.shared.filters.get(entry.id, &entry.schema, text)?),
            None => None,
        };
        let id = inner.next_request.fetch_add(1, Ordering::Relaxed);
        let watch = Arc::new(Watch::new(
            id,
            entry.id,
            self.query.clone(),
            filter,
            self.output_fields.clone(),
            from,
            inner.shared.workers,
        ));
        let dropped_at = entry.partition_of.as_ref().and_then(|of| of.dropped_ts);
        inner.shared.watches.add(watch.clone());
        self.members.push(Member { watch, parts: HashMap::new(), dropped_at });
        Ok(())
    }

    /// Takes its watches away from the workers.
    fn forget(&self, inner: &Inner) {
        for member in &self.members {
            inner.shared.watches.remove(member.watch.id);
        }
    }

    /// Follows the partitions made, and notes those dropped, since the
    /// last call. Called after the workers' progress was read: a partition
    /// not in the catalog yet gets rows only at later times, and a drop's
    /// time is known before the workers pass it, or the drop is under way
    /// (then this round delivers nothing: `Ok(false)`).
    fn follow_partitions(&mut self, inner: &Inner) -> Result<bool> {
        if inner.partition_drops.load(Ordering::Acquire) > 0 {
            return Ok(false);
        }
        // Bumped after each change is in the catalog: unchanged, the
        // catalog holds nothing this has not followed.
        let version = inner.shared.catalog_version.load(Ordering::Acquire);
        if version == self.catalog_seen {
            return Ok(true);
        }
        let collections = inner.collections.read().map_err(|_| Error::Shutdown)?;
        let name = &self.entry.schema.name;
        let partitions: Vec<CatalogEntry> = catalog::partition_entries(&collections, name)
            .filter(|e| e.partition_of.as_ref().is_some_and(|of| &of.collection == name))
            .cloned()
            .collect();
        drop(collections);
        self.catalog_seen = version;
        let joined = self.from.max(self.sent_through);
        for partition in partitions {
            let dropped = partition.partition_of.as_ref().and_then(|of| of.dropped_ts);
            match self.members.iter().position(|m| m.watch.collection == partition.id) {
                Some(member) => self.members[member].dropped_at = self.members[member].dropped_at.or(dropped),
                None if dropped.is_none_or(|at| at > joined) => self.add_member(inner, partition, joined)?,
                None => {}
            }
        }
        Ok(true)
    }

    /// Sends what every worker has accounted for since the last call.
    /// `Err(Some(_))`: ended with that error; `Err(None)`: the subscriber left.
    fn deliver(&mut self, inner: &Inner, workers: std::ops::Range<usize>) -> std::result::Result<(), Option<Error>> {
        let accounted = |members: &[Member]| {
            members
                .iter()
                .flat_map(|m| workers.clone().map(|w| m.watch.through[w].load(Ordering::Acquire)))
                .min()
                .unwrap_or(0)
        };
        let through = accounted(&self.members);
        if through < self.from || self.members.iter().any(|m| through < m.watch.from) {
            return Ok(());
        }
        if self.partitioned {
            let members = self.members.len();
            match self.follow_partitions(inner) {
                Ok(true) if self.members.len() == members => {}
                // A partition joined: it must start before this goes on.
                Ok(_) => return Ok(()),
                Err(e) => return Err(Some(e)),
            }
        }
        let mut parts: Vec<MemberPart> = Vec::new();
        for (index, member) in self.members.iter().enumerate() {
            let Ok(mut inbox) = member.watch.inbox.lock() else { return Err(None) };
            let (ready, later): (Vec<Part>, Vec<Part>) = inbox.drain(..).partition(|part| part.at <= through);
            *inbox = later;
            parts.extend(ready.into_iter().map(|part| (index, part)));
        }
        parts.sort_by_key(|(_, part)| part.at);
        let mut sent_any = false;
        if self.sent.is_none() {
            // The first event: the answer at the start.
            let (start, rest): (Vec<MemberPart>, Vec<MemberPart>) =
                parts.into_iter().partition(|(_, p)| p.at <= self.from);
            parts = rest;
            for (index, part) in start {
                if let PartBody::Top(top) = part.body {
                    self.members[index].parts.insert(part.worker, top);
                }
            }
            let answer = self.merged();
            let hits = answer.iter().map(|hits| hits.iter().map(|h| self.search_hit(h)).collect()).collect();
            self.send(SubscriptionEvent::Snapshot { ts: self.from, hits })?;
            self.sent = Some(answer);
            self.sent_through = self.from;
            sent_any = true;
        }
        // The times with changes: the parts', and the drops' of partitions.
        let mut times: Vec<Timestamp> = parts.iter().map(|(_, p)| p.at).collect();
        times.extend(
            self.members.iter().filter_map(|m| m.dropped_at).filter(|&at| self.sent_through < at && at <= through),
        );
        times.sort_unstable();
        times.dedup();
        let mut parts = parts.into_iter().peekable();
        for at in times {
            let mut rows: (Vec<BTreeMap<String, Value>>, Vec<Pk>) = (Vec::new(), Vec::new());
            for member in self.members.iter_mut().filter(|m| m.dropped_at == Some(at)) {
                // Its rows leave the answer; a changefeed's are deleted.
                member.parts.clear();
                if matches!(self.query, WatchQuery::Changes) {
                    rows.1.extend(dropped_keys(inner, member, self.filter.as_ref(), at).map_err(Some)?);
                }
            }
            while let Some((index, part)) = parts.next_if(|(_, part)| part.at == at) {
                match part.body {
                    PartBody::Top(top) => {
                        self.members[index].parts.insert(part.worker, top);
                    }
                    PartBody::Rows { upserted, retired } => {
                        let fields = &self.output_fields;
                        rows.0.extend(upserted.into_iter().map(|(_, row)| named(&self.schema, fields, row)));
                        rows.1.extend(retired);
                    }
                }
            }
            let event =
                match &self.query {
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
        // A dropped partition whose drop was sent has nothing more to say.
        let (gone, kept): (Vec<Member>, Vec<Member>) =
            std::mem::take(&mut self.members).into_iter().partition(|m| m.dropped_at.is_some_and(|at| at <= through));
        self.members = kept;
        for member in gone {
            inner.shared.watches.remove(member.watch.id);
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
        let WatchQuery::Search { queries, k, .. } = &self.query else { return Vec::new() };
        (0..queries.len())
            .map(|q| {
                let mut all: Vec<&Hit> = self
                    .members
                    .iter()
                    .flat_map(|member| member.parts.values())
                    .filter_map(|part| part.get(q))
                    .flatten()
                    .collect();
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
        let metric = match &self.query {
            WatchQuery::Search { metric, .. } => *metric,
            WatchQuery::Changes => Metric::L2,
        };
        SearchHit {
            pk: hit.pk.clone(),
            score: score(metric, hit.distance),
            fields: named(&self.schema, &self.output_fields, hit.fields.clone()),
            group: None,
        }
    }
}

/// The keys of a dropped partition's rows that passed the filter just
/// before its drop at `at`, read as any query of this process's shards is.
fn dropped_keys(inner: &Inner, member: &Member, filter: Option<&String>, at: Timestamp) -> Result<Vec<Pk>> {
    let kind = RequestKind::Query { filter: filter.cloned(), output_fields: Vec::new(), limit: usize::MAX };
    let deadline = Instant::now() + inner.config.request_timeout;
    let mut keys = Vec::new();
    for worker in inner.shared.local.clone() {
        match inner.shared.answer_read_on(worker, member.watch.collection, &kind, at - 1, deadline) {
            Answer::Query { rows, .. } => keys.extend(rows.into_iter().map(|(pk, _)| pk)),
            Answer::Failed(failure) => return Err(failure.into()),
            _ => return Err(Error::Internal("a query answered with something else".into())),
        }
    }
    keys.sort_by_key(Pk::order_key);
    Ok(keys)
}
