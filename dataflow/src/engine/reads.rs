//! Reads: searches, gets, queries and counts enter the dataflow as requests
//! answered once the frontier has passed their read time.

use super::*;
use vectorflow_core::DataType;
use vectorflow_operators::grouping::{GroupKey, Grouped, Grouping, group};
use vectorflow_operators::{DistanceRange, Hit};

/// Hits per group at most (Milvus allows up to 1024 as well).
const MAX_GROUP_SIZE: usize = 1_024;

/// Candidates per query a grouping search reads at most before it answers
/// with the groups found among them.
const MAX_GROUPING_CANDIDATES: usize = 65_536;

impl Engine {
    /// Searches the `k` nearest rows to each query vector.
    pub fn search(&self, collection: &str, queries: &[Vec<f32>], options: &SearchOptions) -> Result<SearchResult> {
        let entry = self.entry(collection)?;
        let schema = &entry.schema;
        let (field, metric, queries) = self.checked_queries(schema, options.field.as_deref(), queries, options.k)?;
        if let Some(ef) = options.ef
            && !(1..=MAX_EF).contains(&ef)
        {
            return Err(Error::argument("ef", format!("{ef} outside 1..={MAX_EF}")));
        }
        let output_fields = self.output_fields(schema, &options.output_fields)?;
        let filter = self.checked_filter(entry.id, schema, options.filter.as_deref())?;
        let range = DistanceRange::of_scores(metric, options.radius, options.range_filter)?;
        let ef = options.ef.unwrap_or(self.inner.config.default_ef).max(options.k);
        let read_ts = self.read_ts(&entry, options.consistency, options.as_of, options.guarantee_ts)?;
        let targets = self.read_targets(&entry, read_ts, &options.partitions, filter.as_deref())?;
        let to_hit = |hit: Hit, group: Option<Value>, fields: &[usize]| SearchHit {
            pk: hit.pk,
            score: score(metric, hit.distance),
            fields: named(schema, fields, hit.fields),
            group,
        };
        let Some(group_by) = &options.group_by else {
            let kind = RequestKind::Search {
                field,
                queries,
                k: options.k,
                ef,
                range,
                filter,
                output_fields: output_fields.clone(),
            };
            let answer =
                self.request_over(&targets, read_ts, kind, options.timeout, options.consistency, options.as_of)?;
            let Answer::Search { hits, .. } = answer else { return Err(unexpected(answer)) };
            let hits = hits
                .into_iter()
                .map(|hits| hits.into_iter().map(|hit| to_hit(hit, None, &output_fields)).collect())
                .collect();
            return Ok(SearchResult { hits, read_ts });
        };
        let (group_field, group_field_schema) = schema.field(&group_by.field)?;
        if !matches!(
            group_field_schema.data_type,
            DataType::Bool
                | DataType::Int8
                | DataType::Int16
                | DataType::Int32
                | DataType::Int64
                | DataType::VarChar { .. }
        ) {
            return Err(Error::field(
                &group_by.field,
                "group_by_field must be a boolean, integer or string field (floats, JSON and vectors do not group)",
            ));
        }
        if group_by.size == 0 || group_by.size > MAX_GROUP_SIZE {
            return Err(Error::argument("group_size", format!("{} outside 1..={MAX_GROUP_SIZE}", group_by.size)));
        }
        let grouping = Grouping { k: options.k, group_size: group_by.size, strict: group_by.strict };
        // The group's value travels with each hit as one more field.
        let mut fields_read = output_fields.clone();
        fields_read.push(group_field);
        let deadline = Instant::now() + options.timeout.unwrap_or(self.inner.config.request_timeout);
        // The nearest `k` rows of each query (passing `filter`), keyed by group.
        let nearest = |queries: Vec<Vec<f32>>, k: usize, filter: Option<String>| -> Result<Vec<Vec<(GroupKey, Hit)>>> {
            let kind = RequestKind::Search {
                field,
                queries,
                k,
                ef: ef.max(k),
                range,
                filter,
                output_fields: fields_read.clone(),
            };
            let timeout = deadline.saturating_duration_since(Instant::now());
            let answer =
                self.request_over(&targets, read_ts, kind, Some(timeout), options.consistency, options.as_of)?;
            let Answer::Search { hits, .. } = answer else { return Err(unexpected(answer)) };
            Ok(hits
                .into_iter()
                .map(|hits| {
                    hits.into_iter()
                        .map(|mut hit| {
                            let value = hit.fields.pop().unwrap_or(Value::Null);
                            (GroupKey::of(&value).unwrap_or(GroupKey::Null), hit)
                        })
                        .collect()
                })
                .collect())
        };
        // Rank the groups over the nearest rows, more of them until `k`
        // groups appear (or every row was read).
        let limits = self.inner.config.limits;
        let most = (limits.max_search_hits / queries.len()).clamp(options.k, MAX_GROUPING_CANDIDATES);
        let mut candidates = options.k.saturating_mul(group_by.size).saturating_mul(2).clamp(options.k, most);
        let mut grouped: Vec<Grouped> = loop {
            let grouped: Vec<Grouped> = nearest(queries.clone(), candidates, filter.clone())?
                .into_iter()
                .map(|hits| {
                    let all_rows = hits.len() < candidates;
                    group(hits, grouping, all_rows)
                })
                .collect();
            if candidates >= most || grouped.iter().all(|g| g.ranked) {
                break grouped;
            }
            candidates = candidates.saturating_mul(4).min(most);
        };
        // A strict group short of hits gets its nearest rows from a search
        // restricted to it: widening the first search would have to reach
        // every row when a group has fewer than `group_size` of them. The
        // fills are independent reads at one timestamp: they run side by side.
        let base_filter = filter.as_deref();
        let fills: Vec<(usize, usize, String)> = grouped
            .iter()
            .enumerate()
            .flat_map(|(q, grouped)| {
                grouped.unfilled(grouping).map(move |i| {
                    let condition = grouped.groups[i].0.condition(&group_by.field);
                    let restricted = match base_filter {
                        Some(filter) => format!("({filter}) and ({condition})"),
                        None => condition,
                    };
                    (q, i, restricted)
                })
            })
            .collect();
        let lanes = std::thread::available_parallelism().map_or(1, |n| n.get()).min(fills.len());
        let filled: Vec<Result<(usize, usize, Vec<Hit>)>> = std::thread::scope(|scope| {
            let (fills, nearest, queries) = (&fills, &nearest, &queries);
            let handles: Vec<_> = (0..lanes)
                .map(|lane| {
                    scope.spawn(move || {
                        fills
                            .iter()
                            .skip(lane)
                            .step_by(lanes)
                            .map(|(q, i, restricted)| {
                                let members =
                                    nearest(vec![queries[*q].clone()], grouping.group_size, Some(restricted.clone()))?;
                                Ok((*q, *i, members.into_iter().flatten().map(|(_, hit)| hit).collect()))
                            })
                            .collect::<Vec<_>>()
                    })
                })
                .collect();
            handles
                .into_iter()
                .flat_map(|h| h.join().unwrap_or_else(|_| vec![Err(Error::storage("a grouping fill panicked"))]))
                .collect()
        });
        for fill in filled {
            let (q, i, members) = fill?;
            grouped[q].groups[i].1 = members;
        }
        let hits = grouped
            .into_iter()
            .map(|grouped| {
                grouped.into_hits().map(|(key, hit)| to_hit(hit, Some(key.into_value()), &output_fields)).collect()
            })
            .collect();
        Ok(SearchResult { hits, read_ts })
    }

    /// The rows with these primary keys (those that exist), in the order asked.
    pub fn get(&self, collection: &str, pks: &[Pk], options: &GetOptions) -> Result<Vec<BTreeMap<String, Value>>> {
        let entry = self.entry(collection)?;
        let schema = &entry.schema;
        schema.check_keys(pks)?;
        let max_keys = self.inner.config.limits.max_get_keys;
        if pks.len() > max_keys {
            return Err(Error::exhausted("max_get_keys", format!("{} keys exceed the limit of {max_keys}", pks.len())));
        }
        let output_fields = self.output_fields(schema, &options.output_fields)?;
        let read_ts = self.read_ts(&entry, options.consistency, options.as_of, options.guarantee_ts)?;
        let targets = self.read_targets(&entry, read_ts, &options.partitions, None)?;
        let kind = RequestKind::Get { pks: pks.to_vec(), output_fields: output_fields.clone() };
        let answer = self.request_over(&targets, read_ts, kind, options.timeout, options.consistency, options.as_of)?;
        let Answer::Get(rows) = answer else { return Err(unexpected(answer)) };
        let mut by_pk: HashMap<Pk, Vec<Value>> = rows.into_iter().collect();
        let pk_name = &schema.primary().name;
        Ok(pks
            .iter()
            .filter_map(|pk| {
                let values = by_pk.remove(pk)?;
                let mut row = named(schema, &output_fields, values);
                row.insert(pk_name.clone(), pk.clone().into());
                Some(row)
            })
            .collect())
    }

    /// Rows passing `options.filter` (all rows without one), in primary-key
    /// order, after `offset`, at most `limit`; with the primary key and
    /// `output_fields`. An answer holds at most `limits.max_query_rows` rows:
    /// a larger `limit + offset` is refused, and so is a query without a
    /// limit that matches more.
    pub fn query(&self, collection: &str, options: &QueryOptions) -> Result<Vec<BTreeMap<String, Value>>> {
        self.query_bounded(collection, options, Some(self.inner.config.limits.max_query_rows))
    }

    /// Like [`Engine::query`] with a bound of the caller's (`None`: none),
    /// for a consumer that sizes what it may hold itself (SQL scans, bounded
    /// by their statement's memory limit). Over the bound it fails with
    /// `ResourceExhausted` as `query` does.
    pub fn scan(
        &self,
        collection: &str,
        options: &QueryOptions,
        max_rows: Option<usize>,
    ) -> Result<Vec<BTreeMap<String, Value>>> {
        self.query_bounded(collection, options, max_rows)
    }

    fn query_bounded(
        &self,
        collection: &str,
        options: &QueryOptions,
        max_rows: Option<usize>,
    ) -> Result<Vec<BTreeMap<String, Value>>> {
        let entry = self.entry(collection)?;
        let schema = &entry.schema;
        let output_fields = self.output_fields(schema, &options.output_fields)?;
        let Some(max_rows) = max_rows else {
            return Ok(self.named_rows(schema, &output_fields, self.query_rows(&entry, options, &output_fields)?));
        };
        let rows = match options.limit {
            Some(limit) if limit.saturating_add(options.offset) > max_rows => {
                return Err(Error::exhausted(
                    "max_query_rows",
                    format!("limit {limit} + offset {} exceeds the limit of {max_rows} rows per query", options.offset),
                ));
            }
            Some(_) => self.query_rows(&entry, options, &output_fields)?,
            None => {
                // Ask for one row more than allowed to tell "exactly at the
                // limit" from "over it".
                let skipped = options.offset.min(max_rows);
                let capped = QueryOptions { limit: Some(max_rows + 1 - skipped), ..options.clone() };
                let rows = self.query_rows(&entry, &capped, &output_fields)?;
                if rows.len() + skipped > max_rows {
                    return Err(Error::exhausted(
                        "max_query_rows",
                        format!(
                            "the query matches more than {max_rows} rows; set a limit and page with offset, \
                             or narrow the filter"
                        ),
                    ));
                }
                rows
            }
        };
        Ok(self.named_rows(schema, &output_fields, rows))
    }

    /// Rows as field name → value maps, with the primary key.
    fn named_rows(
        &self,
        schema: &CollectionSchema,
        output_fields: &[usize],
        rows: Vec<(Pk, Vec<Value>)>,
    ) -> Vec<BTreeMap<String, Value>> {
        let pk_name = &schema.primary().name;
        rows.into_iter()
            .map(|(pk, values)| {
                let mut row = named(schema, output_fields, values);
                row.insert(pk_name.clone(), pk.into());
                row
            })
            .collect()
    }

    /// Keys and `output_fields` of the rows a query selects, after `offset`.
    pub(super) fn query_rows(
        &self,
        entry: &CatalogEntry,
        options: &QueryOptions,
        output_fields: &[usize],
    ) -> Result<Vec<(Pk, Vec<Value>)>> {
        let filter = self.checked_filter(entry.id, &entry.schema, options.filter.as_deref())?;
        let read_ts = self.read_ts(entry, options.consistency, options.as_of, options.guarantee_ts)?;
        let limit = options.limit.map_or(usize::MAX, |l| l.saturating_add(options.offset));
        let targets = self.read_targets(entry, read_ts, &options.partitions, filter.as_deref())?;
        let kind = RequestKind::Query { filter, output_fields: output_fields.to_vec(), limit };
        let answer = self.request_over(&targets, read_ts, kind, options.timeout, options.consistency, options.as_of)?;
        let Answer::Query { rows, .. } = answer else { return Err(unexpected(answer)) };
        Ok(rows.into_iter().skip(options.offset).collect())
    }

    /// How many rows pass `options.filter` (`count(*)`); limit and offset are ignored.
    pub fn count(&self, collection: &str, options: &QueryOptions) -> Result<usize> {
        let entry = self.entry(collection)?;
        let filter = self.checked_filter(entry.id, &entry.schema, options.filter.as_deref())?;
        let read_ts = self.read_ts(&entry, options.consistency, options.as_of, options.guarantee_ts)?;
        let targets = self.read_targets(&entry, read_ts, &options.partitions, filter.as_deref())?;
        let kind = RequestKind::Count { filter };
        match self.request_over(&targets, read_ts, kind, options.timeout, options.consistency, options.as_of)? {
            Answer::Count(count) => Ok(count),
            other => Err(unexpected(other)),
        }
    }

    /// Deletes the rows passing `filter` as of a Strong read, through the log
    /// like any delete. Returns the keys deleted and the delete's timestamp.
    pub fn delete_by_filter(&self, collection: &str, filter: &str) -> Result<WriteResult> {
        let entry = self.entry(collection)?;
        let options = QueryOptions { filter: Some(filter.to_string()), ..Default::default() };
        let pks: Vec<Pk> = self.query_rows(&entry, &options, &[])?.into_iter().map(|(pk, _)| pk).collect();
        self.delete(collection, &pks)
    }

    /// Row and segment counts at a consistency level.
    pub fn stats(&self, collection: &str, consistency: Consistency) -> Result<CollectionStats> {
        self.stats_inner(collection, consistency, None)
    }

    /// [`Engine::stats`] waiting at most `timeout` for the dataflow.
    pub fn stats_within(
        &self,
        collection: &str,
        consistency: Consistency,
        timeout: Duration,
    ) -> Result<CollectionStats> {
        self.stats_inner(collection, consistency, Some(timeout))
    }

    fn stats_inner(
        &self,
        collection: &str,
        consistency: Consistency,
        timeout: Option<Duration>,
    ) -> Result<CollectionStats> {
        let entry = self.entry(collection)?;
        let read_ts = self.read_ts(&entry, consistency, None, None)?;
        // A collection's counts include its partitions'.
        let targets = self.read_targets(&entry, read_ts, &[], None)?;
        match self.request_over(&targets, read_ts, RequestKind::Stats, timeout, consistency, None)? {
            Answer::Stats(ShardStats {
                versions,
                live_rows,
                growing_rows,
                sealed_segments,
                indexed_segments,
                compacting,
                merges_pending,
                index_bytes,
            }) => Ok(CollectionStats {
                live_rows,
                versions,
                growing_rows,
                sealed_segments,
                indexed_segments,
                compacting,
                merges_pending,
                index_bytes,
                read_ts,
            }),
            other => Err(unexpected(other)),
        }
    }

    /// Kafka ingestion of the collection: dead letters and lag per partition
    /// (`None` on the embedded log). Asks the brokers for their watermarks.
    pub fn ingest_stats(&self, collection: &str) -> Result<Option<IngestStats>> {
        let entry = self.entry(collection)?;
        self.inner.shared.log.ingest_stats(entry.id, &entry.schema.name)
    }

    /// Waits until every sealed segment of the collection has its index, or `timeout`.
    pub fn wait_for_indexes(&self, collection: &str, timeout: Duration) -> Result<CollectionStats> {
        self.wait_for_stats(collection, timeout, Duration::from_millis(10), |stats| {
            stats.indexed_segments == stats.sealed_segments
        })
    }

    /// Waits until every sealed segment is indexed and no merge runs or
    /// is due: the segments the merge policy settles on for the data as it
    /// is now.
    pub fn wait_for_merges(&self, collection: &str, timeout: Duration) -> Result<CollectionStats> {
        self.wait_for_stats(collection, timeout, Duration::from_millis(20), |stats| {
            stats.indexed_segments == stats.sealed_segments && stats.merges_pending == 0
        })
    }

    /// Polls the collection's stats every `interval` until `done` accepts
    /// them, or `timeout`.
    fn wait_for_stats(
        &self,
        collection: &str,
        timeout: Duration,
        interval: Duration,
        done: impl Fn(&CollectionStats) -> bool,
    ) -> Result<CollectionStats> {
        let deadline = std::time::Instant::now() + timeout;
        // The first look sees every write acknowledged before the call;
        // later ones need not wait for the log: the state only moves on.
        let mut consistency = Consistency::Strong;
        loop {
            let stats = self.stats(collection, consistency)?;
            consistency = Consistency::Eventually;
            if done(&stats) {
                return Ok(stats);
            }
            if std::time::Instant::now() >= deadline {
                return Err(Error::Timeout(timeout));
            }
            std::thread::sleep(interval);
        }
    }

    pub(super) fn output_fields(&self, schema: &CollectionSchema, names: &[String]) -> Result<Vec<usize>> {
        names.iter().map(|name| schema.field(name).map(|(i, _)| i)).collect()
    }

    /// Checks a search's query vectors against `field` (the only vector
    /// field when `None`) and the limits for `k` hits each; returns the
    /// field, its metric and the vectors (normalised for COSINE).
    pub(super) fn checked_queries(
        &self,
        schema: &CollectionSchema,
        field: Option<&str>,
        queries: &[Vec<f32>],
        k: usize,
    ) -> Result<(usize, Metric, Vec<Vec<f32>>)> {
        let (field_index, dim, metric) = schema.vector_field(field)?;
        if k == 0 {
            return Err(Error::argument("k", "must be at least 1"));
        }
        if k > 16_384 {
            return Err(Error::argument("k", format!("{} exceeds the limit of 16384", k)));
        }
        if queries.is_empty() {
            return Err(Error::argument("vectors", "no query vectors"));
        }
        let limits = self.inner.config.limits;
        if queries.len() > limits.max_search_vectors {
            return Err(Error::exhausted(
                "max_search_vectors",
                format!("{} query vectors exceed the limit of {}", queries.len(), limits.max_search_vectors),
            ));
        }
        if queries.len().saturating_mul(k) > limits.max_search_hits {
            return Err(Error::exhausted(
                "max_search_hits",
                format!(
                    "{} query vectors × k {} = {} hits exceed the limit of {}; search in smaller batches",
                    queries.len(),
                    k,
                    queries.len().saturating_mul(k),
                    limits.max_search_hits
                ),
            ));
        }
        let field_name = &schema.fields[field_index].name;
        let mut queries = queries.to_vec();
        for (i, query) in queries.iter_mut().enumerate() {
            if query.len() != dim {
                return Err(Error::field(
                    field_name,
                    format!("query {i}: dimension {} does not match dim {dim}", query.len()),
                ));
            }
            vectorflow_core::batch::check_vector(field_name, &format!("query {i}"), query)?;
            if metric == Metric::COSINE {
                normalize(query);
            }
        }
        Ok((field_index, metric, queries))
    }

    /// The timestamp a read answers at.
    pub(super) fn read_ts(
        &self,
        entry: &CatalogEntry,
        consistency: Consistency,
        as_of: Option<Timestamp>,
        guarantee_ts: Option<Timestamp>,
    ) -> Result<Timestamp> {
        let tso = self.inner.shared.log.tso();
        if let Some(as_of) = as_of {
            let now = tso.next_possible();
            if as_of > now {
                return Err(Error::FutureTimestamp { as_of, now });
            }
            let horizon = before(now, self.inner.config.retention);
            if as_of < horizon {
                return Err(Error::OutsideRetention { as_of, horizon });
            }
            return Ok(as_of);
        }
        if let Some(guarantee_ts) = guarantee_ts {
            // A session cannot have written in the future: waiting for it
            // would hold the read until its deadline.
            let now = tso.next_possible();
            if guarantee_ts > now {
                return Err(Error::FutureTimestamp { as_of: guarantee_ts, now });
            }
        }
        let applied = self.inner.shared.applied_frontier().saturating_sub(1);
        Ok(match consistency {
            Consistency::Strong => {
                // Acknowledged by an external log's brokers means read by
                // the sources first; their records then have times before
                // this read's.
                // A collection with partitions is read from several
                // collections' topics: all of them are synced.
                let partitioned = entry.partition_of.is_none() && !self.partitions_of(&entry.schema.name)?.is_empty();
                let scope = (!partitioned).then_some(entry.id);
                self.inner.shared.log.sync(scope, self.inner.config.request_timeout)?;
                tso.allocate(1)
            }
            Consistency::Session => applied.max(guarantee_ts.unwrap_or(0)),
            Consistency::Bounded => applied.max(before(tso.next_possible(), self.inner.config.bounded_staleness)),
            Consistency::Eventually => applied,
        })
    }

    /// A read of several collections' rows (a collection's partitions) at
    /// one time: their answers merged as shards' answers merge.
    pub(super) fn request_over(
        &self,
        targets: &[CollectionId],
        read_ts: Timestamp,
        kind: RequestKind,
        timeout: Option<Duration>,
        consistency: Consistency,
        as_of: Option<Timestamp>,
    ) -> Result<Answer> {
        let deadline = Instant::now() + timeout.unwrap_or(self.inner.config.request_timeout);
        let mut merged: Option<Answer> = None;
        for &target in targets {
            let left = deadline.saturating_duration_since(Instant::now());
            let answer = self.request(target, read_ts, kind.clone(), Some(left), consistency, as_of)?;
            match merged.as_mut() {
                Some(merged) => merged.merge(answer),
                None => merged = Some(answer),
            }
        }
        merged.ok_or_else(|| Error::storage("a read with no collection to read"))
    }

    /// Answers a request: a read from the shards off the dataflow (see
    /// [`Engine::read`]), a control request through the dataflow.
    pub(super) fn request(
        &self,
        collection: CollectionId,
        read_ts: Timestamp,
        kind: RequestKind,
        timeout: Option<Duration>,
        consistency: Consistency,
        as_of: Option<Timestamp>,
    ) -> Result<Answer> {
        self.serving()?;
        if consistency == Consistency::Strong || as_of.is_some() {
            self.inner.shared.wake_sources();
        }
        let timeout = timeout.unwrap_or(self.inner.config.request_timeout);
        if kind.is_read() {
            return self.read(collection, read_ts, &kind, timeout);
        }
        let targets = Request::targets(collection, &kind, self.inner.shared.local.start, self.inner.shared.workers);
        self.request_to(collection, read_ts, kind, targets, timeout)
    }

    /// Sends a request through the dataflow to the workers `targets` and waits for its merged answer.
    pub(super) fn request_to(
        &self,
        collection: CollectionId,
        read_ts: Timestamp,
        kind: RequestKind,
        targets: Vec<usize>,
        timeout: Duration,
    ) -> Result<Answer> {
        let sent = self.send(collection, read_ts, kind, targets, timeout)?;
        let answer = self.receive(sent)?;
        self.answered(answer, read_ts, timeout)
    }

    /// Fails when the engine serves nothing: closed, or its dataflow stopped
    /// (in a cluster, another process died: the cluster restarts).
    pub(super) fn serving(&self) -> Result<()> {
        if let Some(cause) = self.inner.shared.dataflow_failure() {
            return Err(Error::Unavailable(format!("this server stopped serving and must be restarted: {cause}")));
        }
        if self.inner.closed.load(Ordering::Acquire) {
            return Err(Error::Shutdown);
        }
        Ok(())
    }

    /// Sends `kind` into the dataflow to the workers `targets`; their
    /// parts merge on a worker of this process, whose answer [`Engine::receive`] waits for.
    fn send(
        &self,
        collection: CollectionId,
        read_ts: Timestamp,
        kind: RequestKind,
        targets: Vec<usize>,
        timeout: Duration,
    ) -> Result<Sent> {
        let shared = &self.inner.shared;
        let id = self.inner.next_request.fetch_add(1, Ordering::Relaxed);
        let origin = shared.local.start + (id % shared.local.len() as u64) as usize;
        let (reply, answer) = std::sync::mpsc::sync_channel(1);
        shared.replies.lock().map_err(|_| Error::Shutdown)?.insert(id, reply);
        let deadline_ms = Some(unix_millis().saturating_add(timeout.as_millis() as u64));
        shared.requests[origin].lock().map_err(|_| Error::Shutdown)?.push(Request {
            id,
            origin,
            collection,
            read_ts,
            deadline_ms,
            kind,
            targets,
        });
        shared.wake_requests(origin);
        Ok(Sent { id, answer, deadline: Instant::now() + timeout, timeout })
    }

    /// Waits for the merged answer of a request [`Engine::send`] sent.
    fn receive(&self, sent: Sent) -> Result<Answer> {
        let shared = &self.inner.shared;
        match sent.answer.recv_timeout(sent.deadline.saturating_duration_since(Instant::now())) {
            Ok(answer) => Ok(answer),
            Err(_) => {
                if let Ok(mut replies) = shared.replies.lock() {
                    replies.remove(&sent.id);
                }
                self.serving()?;
                Err(Error::Timeout(sent.timeout))
            }
        }
    }

    /// The caller's result of a merged answer: refusals become errors.
    fn answered(&self, answer: Answer, read_ts: Timestamp, timeout: Duration) -> Result<Answer> {
        match answer {
            // A read stopped at its deadline is the caller's timeout.
            Answer::Failed(crate::messages::Failure::Cancelled) => {
                self.inner.shared.reads_cancelled.fetch_add(1, Ordering::Relaxed);
                Err(Error::Timeout(timeout))
            }
            Answer::Failed(failure) => Err(failure.into()),
            Answer::Compacted { horizon } => Err(Error::OutsideRetention { as_of: read_ts, horizon }),
            answer => Ok(answer),
        }
    }

    /// Checks a filter against the schema here, so the caller gets the error
    /// with its position; the compiled filter is kept for the read's shards
    /// (compiling plans it with DataFusion, which costs more than a
    /// selective search).
    pub(super) fn checked_filter(
        &self,
        collection: CollectionId,
        schema: &CollectionSchema,
        filter: Option<&str>,
    ) -> Result<Option<String>> {
        match filter.map(str::trim) {
            None | Some("") => Ok(None),
            Some(text) => {
                self.inner.shared.filters.get(collection, schema, text)?;
                Ok(Some(text.to_string()))
            }
        }
    }

    /// Answers a read without entering the dataflow where it can: once each
    /// of this process's workers it needs has applied every change at or
    /// before `read_ts`, their shards answer on the search pool under read
    /// locks. Another process's shards (in a cluster) answer through the
    /// dataflow meanwhile, once their frontier passed `read_ts`; the parts
    /// merge here.
    fn read(
        &self,
        collection: CollectionId,
        read_ts: Timestamp,
        kind: &RequestKind,
        timeout: Duration,
    ) -> Result<Answer> {
        let shared = &self.inner.shared;
        let deadline = Instant::now() + timeout;
        let workers = Request::targets(collection, kind, shared.local.start, shared.workers);
        let (local, remote): (Vec<usize>, Vec<usize>) = workers.into_iter().partition(|w| shared.local.contains(w));
        let sent = match remote.is_empty() {
            true => None,
            false => Some(self.send(collection, read_ts, kind.clone(), remote, timeout)?),
        };
        if !shared.wait_applied(&local, read_ts, deadline) {
            self.serving()?;
            shared.reads_cancelled.fetch_add(1, Ordering::Relaxed);
            return Err(Error::Timeout(timeout));
        }
        let answer_from = |worker: usize| shared.answer_read_on(worker, collection, kind, read_ts, deadline);
        // A single shard (a get's) answers on this thread. Several answer on
        // the search pool, so at most one search per core holds a shard's
        // read lock: with every client's thread searching, a preempted
        // search held its lock for milliseconds and the worker waiting to
        // apply a write waited with it.
        let mut answer = match local.as_slice() {
            [] => None,
            [worker] => Some(answer_from(*worker)),
            _ => shared.search_pool.install(|| {
                use rayon::prelude::*;
                local.par_iter().map(|&worker| answer_from(worker)).reduce_with(|mut whole, part| {
                    whole.merge(part);
                    whole
                })
            }),
        };
        if let Some(sent) = sent {
            let theirs = self.receive(sent)?;
            match answer.as_mut() {
                Some(mine) => mine.merge(theirs),
                None => answer = Some(theirs),
            }
        }
        // A collection stopped while this read ran may have lost its shards.
        if let Some(stopped) = shared.stopped(collection) {
            return Err(stopped.into());
        }
        self.answered(answer.unwrap_or_else(|| empty_answer(kind)), read_ts, timeout)
    }
}

/// A request in the dataflow, and where its merged answer arrives.
struct Sent {
    id: u64,
    answer: std::sync::mpsc::Receiver<Answer>,
    deadline: Instant,
    timeout: Duration,
}
