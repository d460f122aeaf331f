//! `vectorflow serve`: the gRPC access layer over an embedded engine.
//!
//! Engine calls block (they wait for the dataflow), so every handler runs
//! its call on tokio's blocking pool. A client's deadline (`grpc-timeout`)
//! becomes the engine read timeout, a fifth shorter (at least 20 ms), so the
//! answer is DEADLINE_EXCEEDED from us rather than CANCELLED from tonic's timer.

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use futures::{Stream, StreamExt};
use prost::Message;
use std::collections::BTreeMap;
use tokio::net::TcpListener;
use tokio_stream::wrappers::TcpListenerStream;
use tonic::{Request, Response, Status};
use vectorflow::{
    CollectionSchema, Consistency, Engine, Error, GetOptions, GroupBy, HybridOptions, QueryOptions, Ranker,
    SearchOptions, SearchResult, SinkStatus, SqlSession, SubSearch, SubscribeOptions, SubscriptionEvent, Timestamp,
    Value,
};
use vectorflow_proto::v1::vectorflow_server::{Vectorflow, VectorflowServer};
use vectorflow_proto::{self as wire, v1};

use crate::config::ServerConfig;

/// The part of a deadline kept for answering: a fifth of it, at least 20 ms,
/// so a loaded server still answers before tonic's own timer fires.
fn deadline_margin(left: Duration) -> Duration {
    (left / 5).max(Duration::from_millis(20))
}

pub struct VectorflowService {
    engine: Engine,
    sql: SqlSession,
    max_message_bytes: usize,
}

impl VectorflowService {
    pub fn new(
        engine: Engine,
        max_message_bytes: usize,
        sql_policy: vectorflow_sql::SqlPolicy,
    ) -> vectorflow::Result<Self> {
        // SQL from the network is untrusted: queries only, within memory and time limits.
        debug_assert!(sql_policy.read_only, "SQL from the network is read-only");
        let sql = SqlSession::with_policy(engine.clone(), sql_policy)?;
        Ok(VectorflowService { engine, sql, max_message_bytes })
    }

    /// Checks the request's size and deadline, then runs `call` on the
    /// blocking pool with the engine and the time the read may take.
    async fn run<M: Message, T: Send + 'static>(
        &self,
        request: &Request<M>,
        call: impl FnOnce(&Engine, Option<Duration>) -> vectorflow::Result<T> + Send + 'static,
    ) -> Result<T, Status> {
        let size = request.get_ref().encoded_len();
        if size > self.max_message_bytes {
            return Err(Status::resource_exhausted(format!(
                "request of {size} bytes exceeds max_message_bytes = {}",
                self.max_message_bytes
            )));
        }
        let timeout = read_timeout(request)?;
        let engine = self.engine.clone();
        match tokio::task::spawn_blocking(move || call(&engine, timeout)).await {
            Ok(result) => result.map_err(|e| wire::status(&e)),
            Err(e) => Err(Status::internal(format!("request handler failed: {e}"))),
        }
    }
}

/// The time an engine call may take: the client's deadline less the
/// margin kept for answering; an error when the deadline leaves no time.
pub fn read_timeout<M>(request: &Request<M>) -> Result<Option<Duration>, Status> {
    match deadline(request)? {
        Some(left) if left <= deadline_margin(left) => {
            Err(Status::deadline_exceeded(format!("deadline of {left:?} leaves no time to answer")))
        }
        Some(left) => Ok(Some(left - deadline_margin(left))),
        None => Ok(None),
    }
}

/// The client's deadline (`grpc-timeout`: an integer and a unit H M S m u n).
fn deadline<M>(request: &Request<M>) -> Result<Option<Duration>, Status> {
    let Some(header) = request.metadata().get("grpc-timeout") else { return Ok(None) };
    let text = header.to_str().map_err(|_| Status::invalid_argument("grpc-timeout is not ASCII"))?;
    let (digits, unit) = text.split_at(text.len().saturating_sub(1));
    let amount: u64 = digits.parse().map_err(|_| Status::invalid_argument(format!("grpc-timeout `{text}`")))?;
    let duration = match unit {
        "H" => Duration::from_secs(amount.saturating_mul(3600)),
        "M" => Duration::from_secs(amount.saturating_mul(60)),
        "S" => Duration::from_secs(amount),
        "m" => Duration::from_millis(amount),
        "u" => Duration::from_micros(amount),
        "n" => Duration::from_nanos(amount),
        _ => return Err(Status::invalid_argument(format!("grpc-timeout `{text}` has no unit"))),
    };
    Ok(Some(duration))
}

struct Read {
    consistency: Consistency,
    as_of: Option<Timestamp>,
    guarantee_ts: Option<Timestamp>,
}

/// A request's read options; `argument` names the consistency field in errors.
fn read_options(argument: &str, read: Option<v1::ReadOptions>) -> vectorflow::Result<Read> {
    let read = read.unwrap_or_default();
    let consistency = match wire::consistency_from_proto(argument, read.consistency)? {
        v1::ConsistencyLevel::Strong => Consistency::Strong,
        v1::ConsistencyLevel::Session => Consistency::Session,
        v1::ConsistencyLevel::Bounded => Consistency::Bounded,
        v1::ConsistencyLevel::Eventually => Consistency::Eventually,
    };
    Ok(Read {
        consistency,
        as_of: (read.as_of != 0).then_some(read.as_of),
        guarantee_ts: (read.guarantee_ts != 0).then_some(read.guarantee_ts),
    })
}

/// An insert (or upsert) of a request's rows into its partition.
fn write_rows(engine: &Engine, body: v1::WriteRequest, upsert: bool) -> vectorflow::Result<vectorflow::WriteResult> {
    let target = partition_target(engine, &body.collection, &body.partition)?;
    let batch = write_batch(body)?;
    if upsert { engine.upsert(&target, &batch) } else { engine.insert(&target, &batch) }
}

/// Where a write goes: the named partition, else the collection itself.
fn partition_target(engine: &Engine, collection: &str, partition: &str) -> vectorflow::Result<String> {
    match partition.trim() {
        "" => Ok(collection.to_string()),
        partition => engine.partition(collection, partition),
    }
}

/// A search's answer on the wire: per query its keys, scores, output
/// fields and (for a grouping search on `group_field`) group values.
fn search_response(
    schema: &CollectionSchema,
    output_fields: &[String],
    group_field: Option<&str>,
    result: SearchResult,
) -> vectorflow::Result<v1::SearchResponse> {
    let results = result
        .hits
        .into_iter()
        .map(|hits| {
            let keys: Vec<_> = hits.iter().map(|h| h.pk.clone()).collect();
            let scores = hits.iter().map(|h| h.score).collect();
            let groups = match group_field {
                Some(name) => {
                    let values: Vec<_> = hits
                        .iter()
                        .map(|h| BTreeMap::from([(name.to_string(), h.group.clone().unwrap_or(Value::Null))]))
                        .collect();
                    wire::rows_to_columns(schema, &[name.to_string()], &values)?.pop()
                }
                None => None,
            };
            let rows: Vec<_> = hits.into_iter().map(|h| h.fields).collect();
            Ok(v1::SearchHits {
                keys: Some(wire::pks_to_proto(&keys)),
                scores,
                fields: wire::rows_to_columns(schema, output_fields, &rows)?,
                groups,
            })
        })
        .collect::<vectorflow::Result<Vec<_>>>()?;
    Ok(v1::SearchResponse { results, read_ts: result.read_ts })
}

fn non_empty(text: String) -> Option<String> {
    if text.trim().is_empty() { None } else { Some(text) }
}

fn info(info: vectorflow::CollectionInfo) -> v1::CollectionInfo {
    v1::CollectionInfo {
        id: info.id,
        schema: Some(wire::schema_to_proto(&info.schema)),
        created_ts: info.created_ts,
        aliases: info.aliases,
    }
}

fn write_response(write: vectorflow::WriteResult) -> v1::WriteResponse {
    v1::WriteResponse { keys: Some(wire::pks_to_proto(&write.pks)), ts: write.ts }
}

/// A write's rows: columns, or an Arrow IPC stream.
fn write_batch(request: v1::WriteRequest) -> vectorflow::Result<arrow::record_batch::RecordBatch> {
    if !request.arrow_ipc.is_empty() {
        if !request.columns.is_empty() {
            return Err(Error::argument("columns", "give either columns or arrow_ipc, not both"));
        }
        let batch = wire::ipc_to_batch(&request.arrow_ipc)?;
        // Columns of the null type or without children carry rows in no
        // bytes, and the write would allocate (keys, defaults) per declared
        // row. A real write holds a vector of at least one f32 per row.
        let most_rows = request.arrow_ipc.len() / 4;
        if batch.num_rows() > most_rows {
            return Err(Error::argument(
                "arrow_ipc",
                format!(
                    "{} rows in {} bytes: every row needs its vector (4 bytes or more), so at most {most_rows} rows fit",
                    batch.num_rows(),
                    request.arrow_ipc.len()
                ),
            ));
        }
        return Ok(batch);
    }
    if request.columns.is_empty() {
        return Err(Error::argument("columns", "no rows: give columns or arrow_ipc"));
    }
    wire::columns_to_batch(request.columns)
}

/// Rows with the primary key first, then `output_fields`, as columns.
fn rows_response(
    schema: &CollectionSchema,
    output_fields: &[String],
    rows: &[std::collections::BTreeMap<String, vectorflow::Value>],
) -> vectorflow::Result<v1::QueryResponse> {
    let mut fields = vec![schema.primary().name.clone()];
    fields.extend(output_fields.iter().filter(|f| **f != schema.primary().name).cloned());
    Ok(v1::QueryResponse { columns: wire::rows_to_columns(schema, &fields, rows)?, count: rows.len() as u64 })
}

type SqlStream = Pin<Box<dyn Stream<Item = Result<v1::SqlBatch, Status>> + Send>>;
type SubscribeStream = Pin<Box<dyn Stream<Item = Result<v1::SubscribeEvent, Status>> + Send>>;

/// A subscription's event on the wire.
/// A subscription's options from its request (shared by Subscribe and CreateSink).
fn subscribe_options(body: &v1::SubscribeRequest) -> vectorflow::Result<SubscribeOptions> {
    let queries = match &body.vectors {
        Some(vectors) if !vectors.data.is_empty() => wire::unpack_vectors("vectors", vectors)?,
        _ => Vec::new(),
    };
    let options = SubscribeOptions {
        field: non_empty(body.field.clone()),
        queries,
        k: body.k as usize,
        filter: non_empty(body.filter.clone()),
        output_fields: body.output_fields.clone(),
        as_of: (body.as_of != 0).then_some(body.as_of),
        ..SubscribeOptions::changes()
    };
    // 0: the engine's default buffer.
    Ok(match body.buffer {
        0 => options,
        buffer => SubscribeOptions { buffer: buffer as usize, ..options },
    })
}

fn sink_info(status: SinkStatus) -> v1::SinkInfo {
    let definition = status.definition;
    v1::SinkInfo {
        name: definition.name,
        collection: definition.collection,
        topic: definition.topic,
        partition: definition.partition,
        start_ts: definition.start_ts,
        incarnation: definition.incarnation,
        state: status.state.to_string(),
        written_through: status.written_through,
        records: status.records,
    }
}

fn subscribe_event(
    schema: &CollectionSchema,
    output_fields: &[String],
    event: SubscriptionEvent,
) -> vectorflow::Result<v1::SubscribeEvent> {
    use v1::subscribe_event::Event;
    let ts = event.ts();
    let hits = |hits: Vec<vectorflow::SearchHit>| -> vectorflow::Result<v1::SearchHits> {
        let result = SearchResult { hits: vec![hits], read_ts: ts };
        Ok(search_response(schema, output_fields, None, result)?.results.remove(0))
    };
    let event = match event {
        SubscriptionEvent::Snapshot { hits: answer, .. } => {
            Event::Snapshot(search_response(schema, output_fields, None, SearchResult { hits: answer, read_ts: ts })?)
        }
        SubscriptionEvent::Changed { changes, .. } => Event::Changed(v1::QueryChanges {
            changes: changes
                .into_iter()
                .map(|change| {
                    Ok(v1::QueryChange {
                        query: change.query as u32,
                        removed: Some(hits(change.removed)?),
                        added: Some(hits(change.added)?),
                    })
                })
                .collect::<vectorflow::Result<_>>()?,
        }),
        SubscriptionEvent::Rows { upserted, deleted, .. } => Event::Rows(v1::RowChanges {
            upserted: rows_response(schema, output_fields, &upserted)?.columns,
            deleted: Some(wire::pks_to_proto(&deleted)),
        }),
        SubscriptionEvent::Progress { .. } => Event::Progress(v1::Empty {}),
    };
    Ok(v1::SubscribeEvent { ts, event: Some(event) })
}

#[tonic::async_trait]
impl Vectorflow for VectorflowService {
    async fn create_collection(
        &self,
        request: Request<v1::CreateCollectionRequest>,
    ) -> Result<Response<v1::CollectionInfo>, Status> {
        let schema = request.get_ref().schema.clone();
        let created = self
            .run(&request, move |engine, _| {
                let schema = schema.ok_or_else(|| Error::argument("schema", "missing"))?;
                engine.create_collection(wire::schema_from_proto(schema)?)
            })
            .await?;
        tracing::info!(collection = created.schema.name, "collection created");
        Ok(Response::new(info(created)))
    }

    async fn drop_collection(&self, request: Request<v1::CollectionRef>) -> Result<Response<v1::Empty>, Status> {
        let name = request.get_ref().name.clone();
        self.run(&request, move |engine, _| engine.drop_collection(&name)).await?;
        Ok(Response::new(v1::Empty {}))
    }

    async fn list_collections(
        &self,
        request: Request<v1::Empty>,
    ) -> Result<Response<v1::ListCollectionsResponse>, Status> {
        let names = self.run(&request, |engine, _| Ok(engine.list_collections())).await?;
        Ok(Response::new(v1::ListCollectionsResponse { names }))
    }

    async fn describe_collection(
        &self,
        request: Request<v1::CollectionRef>,
    ) -> Result<Response<v1::CollectionInfo>, Status> {
        let name = request.get_ref().name.clone();
        Ok(Response::new(info(self.run(&request, move |engine, _| engine.describe_collection(&name)).await?)))
    }

    async fn create_alias(&self, request: Request<v1::AliasRequest>) -> Result<Response<v1::Empty>, Status> {
        let v1::AliasRequest { alias, collection } = request.get_ref().clone();
        self.run(&request, move |engine, _| engine.create_alias(&alias, &collection)).await?;
        Ok(Response::new(v1::Empty {}))
    }

    async fn alter_alias(&self, request: Request<v1::AliasRequest>) -> Result<Response<v1::Empty>, Status> {
        let v1::AliasRequest { alias, collection } = request.get_ref().clone();
        self.run(&request, move |engine, _| engine.alter_alias(&alias, &collection)).await?;
        Ok(Response::new(v1::Empty {}))
    }

    async fn drop_alias(&self, request: Request<v1::AliasRef>) -> Result<Response<v1::Empty>, Status> {
        let alias = request.get_ref().alias.clone();
        self.run(&request, move |engine, _| engine.drop_alias(&alias)).await?;
        Ok(Response::new(v1::Empty {}))
    }

    async fn describe_alias(&self, request: Request<v1::AliasRef>) -> Result<Response<v1::AliasRequest>, Status> {
        let alias = request.get_ref().alias.clone();
        let named = alias.clone();
        let collection = self.run(&request, move |engine, _| engine.describe_alias(&named)).await?;
        Ok(Response::new(v1::AliasRequest { alias, collection }))
    }

    async fn list_aliases(
        &self,
        request: Request<v1::CollectionRef>,
    ) -> Result<Response<v1::ListAliasesResponse>, Status> {
        let name = request.get_ref().name.clone();
        let aliases = self
            .run(&request, move |engine, _| engine.list_aliases(Some(name.as_str()).filter(|n| !n.is_empty())))
            .await?;
        Ok(Response::new(v1::ListAliasesResponse { aliases }))
    }

    async fn insert(&self, request: Request<v1::WriteRequest>) -> Result<Response<v1::WriteResponse>, Status> {
        let body = request.get_ref().clone();
        let write = self.run(&request, move |engine, _| write_rows(engine, body, false)).await?;
        Ok(Response::new(write_response(write)))
    }

    async fn upsert(&self, request: Request<v1::WriteRequest>) -> Result<Response<v1::WriteResponse>, Status> {
        let body = request.get_ref().clone();
        let write = self.run(&request, move |engine, _| write_rows(engine, body, true)).await?;
        Ok(Response::new(write_response(write)))
    }

    async fn create_partition(&self, request: Request<v1::PartitionRequest>) -> Result<Response<v1::Empty>, Status> {
        let v1::PartitionRequest { collection, partition } = request.get_ref().clone();
        self.run(&request, move |engine, _| engine.create_partition(&collection, &partition)).await?;
        Ok(Response::new(v1::Empty {}))
    }

    async fn drop_partition(
        &self,
        request: Request<v1::PartitionRequest>,
    ) -> Result<Response<v1::DropPartitionResponse>, Status> {
        let v1::PartitionRequest { collection, partition } = request.get_ref().clone();
        let ts = self.run(&request, move |engine, _| engine.drop_partition(&collection, &partition)).await?;
        Ok(Response::new(v1::DropPartitionResponse { ts }))
    }

    async fn list_partitions(
        &self,
        request: Request<v1::CollectionRef>,
    ) -> Result<Response<v1::ListPartitionsResponse>, Status> {
        let name = request.get_ref().name.clone();
        let names = self.run(&request, move |engine, _| engine.list_partitions(&name)).await?;
        Ok(Response::new(v1::ListPartitionsResponse { names }))
    }

    async fn delete(&self, request: Request<v1::DeleteRequest>) -> Result<Response<v1::WriteResponse>, Status> {
        let body = request.get_ref().clone();
        let write = self
            .run(&request, move |engine, _| {
                let target = partition_target(engine, &body.collection, &body.partition)?;
                match body.target {
                    Some(v1::delete_request::Target::Keys(keys)) => {
                        engine.delete(&target, &wire::pks_from_proto(Some(keys))?)
                    }
                    Some(v1::delete_request::Target::Filter(filter)) if !filter.trim().is_empty() => {
                        engine.delete_by_filter(&target, &filter)
                    }
                    _ => Err(Error::argument("target", "give keys or a non-empty filter")),
                }
            })
            .await?;
        Ok(Response::new(write_response(write)))
    }

    async fn search(&self, request: Request<v1::SearchRequest>) -> Result<Response<v1::SearchResponse>, Status> {
        let body = request.get_ref().clone();
        let response = self
            .run(&request, move |engine, timeout| {
                let vectors = body.vectors.ok_or_else(|| Error::argument("vectors", "missing"))?;
                let queries = wire::unpack_vectors("vectors", &vectors)?;
                let read = read_options("read.consistency", body.read)?;
                let options = SearchOptions {
                    field: non_empty(body.field),
                    k: body.k as usize,
                    ef: (body.ef != 0).then_some(body.ef as usize),
                    output_fields: body.output_fields.clone(),
                    filter: non_empty(body.filter),
                    radius: body.radius,
                    range_filter: body.range_filter,
                    group_by: body.group_by.as_ref().map(|g| GroupBy {
                        field: g.field.clone(),
                        size: (g.size as usize).max(1),
                        strict: g.strict,
                    }),
                    partitions: body.partitions.clone(),
                    consistency: read.consistency,
                    as_of: read.as_of,
                    guarantee_ts: read.guarantee_ts,
                    timeout,
                };
                let group_field = options.group_by.as_ref().map(|g| g.field.clone());
                let schema = engine.describe_collection(&body.collection)?.schema;
                let result = engine.search(&body.collection, &queries, &options)?;
                search_response(&schema, &body.output_fields, group_field.as_deref(), result)
            })
            .await?;
        Ok(Response::new(response))
    }

    async fn hybrid_search(
        &self,
        request: Request<v1::HybridSearchRequest>,
    ) -> Result<Response<v1::SearchResponse>, Status> {
        let body = request.get_ref().clone();
        let response = self
            .run(&request, move |engine, timeout| {
                let searches = body
                    .searches
                    .iter()
                    .enumerate()
                    .map(|(i, search)| {
                        let what = format!("searches[{i}].vectors");
                        let vectors = search.vectors.as_ref().ok_or_else(|| Error::argument(&what, "missing"))?;
                        Ok(SubSearch {
                            field: non_empty(search.field.clone()),
                            queries: wire::unpack_vectors(&what, vectors)?,
                            k: search.k as usize,
                            ef: (search.ef != 0).then_some(search.ef as usize),
                            filter: non_empty(search.filter.clone()),
                            radius: search.radius,
                            range_filter: search.range_filter,
                        })
                    })
                    .collect::<vectorflow::Result<Vec<_>>>()?;
                let ranker = match body.ranker {
                    Some(v1::hybrid_search_request::Ranker::Rrf(rrf)) => {
                        Ranker::Rrf { k: if rrf.k == 0.0 { 60.0 } else { rrf.k } }
                    }
                    Some(v1::hybrid_search_request::Ranker::Weighted(weighted)) => {
                        Ranker::Weighted { weights: weighted.weights, normalize: !weighted.raw_scores }
                    }
                    None => return Err(Error::argument("ranker", "give rrf or weighted")),
                };
                let read = read_options("read.consistency", body.read)?;
                let options = HybridOptions {
                    k: body.k as usize,
                    ranker,
                    output_fields: body.output_fields.clone(),
                    partitions: body.partitions.clone(),
                    consistency: read.consistency,
                    as_of: read.as_of,
                    guarantee_ts: read.guarantee_ts,
                    timeout,
                };
                let schema = engine.describe_collection(&body.collection)?.schema;
                let result = engine.hybrid_search(&body.collection, &searches, &options)?;
                search_response(&schema, &body.output_fields, None, result)
            })
            .await?;
        Ok(Response::new(response))
    }

    async fn query(&self, request: Request<v1::QueryRequest>) -> Result<Response<v1::QueryResponse>, Status> {
        let body = request.get_ref().clone();
        let response = self
            .run(&request, move |engine, timeout| {
                let read = read_options("read.consistency", body.read)?;
                let options = QueryOptions {
                    filter: non_empty(body.filter),
                    output_fields: body.output_fields.clone(),
                    limit: (body.limit != 0).then_some(body.limit as usize),
                    offset: body.offset as usize,
                    partitions: body.partitions.clone(),
                    consistency: read.consistency,
                    as_of: read.as_of,
                    guarantee_ts: read.guarantee_ts,
                    timeout,
                };
                if body.count_only {
                    let count = engine.count(&body.collection, &options)?;
                    return Ok(v1::QueryResponse { columns: Vec::new(), count: count as u64 });
                }
                let schema = engine.describe_collection(&body.collection)?.schema;
                let rows = engine.query(&body.collection, &options)?;
                rows_response(&schema, &body.output_fields, &rows)
            })
            .await?;
        Ok(Response::new(response))
    }

    async fn get(&self, request: Request<v1::GetRequest>) -> Result<Response<v1::QueryResponse>, Status> {
        let body = request.get_ref().clone();
        let response = self
            .run(&request, move |engine, timeout| {
                let read = read_options("read.consistency", body.read)?;
                let options = GetOptions {
                    output_fields: body.output_fields.clone(),
                    partitions: body.partitions.clone(),
                    consistency: read.consistency,
                    as_of: read.as_of,
                    guarantee_ts: read.guarantee_ts,
                    timeout,
                };
                let schema = engine.describe_collection(&body.collection)?.schema;
                let rows = engine.get(&body.collection, &wire::pks_from_proto(body.keys)?, &options)?;
                rows_response(&schema, &body.output_fields, &rows)
            })
            .await?;
        Ok(Response::new(response))
    }

    type SqlStream = SqlStream;
    type SubscribeStream = SubscribeStream;

    async fn subscribe(
        &self,
        request: Request<v1::SubscribeRequest>,
    ) -> Result<Response<Self::SubscribeStream>, Status> {
        let body = request.get_ref().clone();
        let output_fields = body.output_fields.clone();
        let (subscription, schema) = self
            .run(&request, move |engine, _| {
                let options = subscribe_options(&body)?;
                let schema = engine.describe_collection(&body.collection)?.schema;
                Ok((engine.subscribe(&body.collection, &options)?, schema))
            })
            .await?;
        // The subscription is read on a thread of its own; a slow client
        // leaves its events in the subscription's buffer, which ends it
        // (RESOURCE_EXHAUSTED) when full. A client that leaves ends it too.
        let (sender, receiver) = tokio::sync::mpsc::channel(16);
        std::thread::Builder::new()
            .name("subscription".into())
            .spawn(move || {
                let mut subscription = subscription;
                loop {
                    let item = match subscription.recv_timeout(Duration::from_millis(500)) {
                        Ok(Some(event)) => {
                            subscribe_event(&schema, &output_fields, event).map_err(|e| wire::status(&e))
                        }
                        Ok(None) if sender.is_closed() => return,
                        Ok(None) => continue,
                        Err(Error::Shutdown) => return,
                        Err(e) => Err(wire::status(&e)),
                    };
                    let last = item.is_err();
                    if sender.blocking_send(item).is_err() || last {
                        return;
                    }
                }
            })
            .map_err(|e| Status::internal(format!("starting the subscription's sender: {e}")))?;
        Ok(Response::new(Box::pin(tokio_stream::wrappers::ReceiverStream::new(receiver))))
    }

    async fn create_sink(&self, request: Request<v1::CreateSinkRequest>) -> Result<Response<v1::SinkInfo>, Status> {
        let body = request.get_ref().clone();
        let status = self
            .run(&request, move |engine, _| {
                let query = body.query.ok_or_else(|| Error::argument("query", "missing: the sink's standing query"))?;
                let mut options = subscribe_options(&query)?;
                options.progress_every = Duration::from_millis(match body.progress_every_ms {
                    0 => 1000,
                    ms => u64::from(ms),
                });
                engine.create_sink(&body.name, &query.collection, &body.topic, &options)
            })
            .await?;
        Ok(Response::new(sink_info(status)))
    }

    async fn drop_sink(&self, request: Request<v1::SinkRef>) -> Result<Response<v1::Empty>, Status> {
        let name = request.get_ref().name.clone();
        self.run(&request, move |engine, _| engine.drop_sink(&name)).await?;
        Ok(Response::new(v1::Empty {}))
    }

    async fn list_sinks(&self, request: Request<v1::Empty>) -> Result<Response<v1::ListSinksResponse>, Status> {
        let sinks = self.run(&request, move |engine, _| engine.sinks()).await?;
        Ok(Response::new(v1::ListSinksResponse { sinks: sinks.into_iter().map(sink_info).collect() }))
    }

    async fn sql(&self, request: Request<v1::SqlRequest>) -> Result<Response<Self::SqlStream>, Status> {
        let size = request.get_ref().encoded_len();
        if size > self.max_message_bytes {
            return Err(Status::resource_exhausted(format!("request of {size} bytes exceeds max_message_bytes")));
        }
        // Planned and run on the SQL runtime's large-stack threads, not this tokio worker.
        let deadline = deadline(&request)?;
        let batches = self.sql.stream_within(&request.get_ref().query, deadline).await.map_err(|e| wire::status(&e))?;
        let stream = batches.map(|batch| {
            let batch = batch.map_err(|e| wire::status(&e))?;
            let arrow_ipc = wire::batch_to_ipc(&batch).map_err(|e| wire::status(&e))?;
            Ok(v1::SqlBatch { arrow_ipc })
        });
        Ok(Response::new(Box::pin(stream)))
    }

    async fn flush(&self, request: Request<v1::CollectionRef>) -> Result<Response<v1::FlushResponse>, Status> {
        let name = request.get_ref().name.clone();
        let flush_ts = self.run(&request, move |engine, _| engine.flush(&name)).await?;
        Ok(Response::new(v1::FlushResponse { flush_ts }))
    }

    async fn get_stats(&self, request: Request<v1::StatsRequest>) -> Result<Response<v1::CollectionStats>, Status> {
        let body = request.get_ref().clone();
        let stats = self
            .run(&request, move |engine, _| {
                let read = read_options(
                    "consistency",
                    Some(v1::ReadOptions { consistency: body.consistency, ..Default::default() }),
                )?;
                Ok((engine.stats(&body.collection, read.consistency)?, engine.ingest_stats(&body.collection)?))
            })
            .await?;
        let (stats, ingest) = stats;
        Ok(Response::new(v1::CollectionStats {
            live_rows: stats.live_rows as u64,
            versions: stats.versions as u64,
            growing_rows: stats.growing_rows as u64,
            sealed_segments: stats.sealed_segments as u64,
            indexed_segments: stats.indexed_segments as u64,
            read_ts: stats.read_ts,
            kafka: ingest.map(|ingest| v1::KafkaIngest {
                dead_letters: ingest.dead_letters,
                partitions: ingest
                    .partitions
                    .iter()
                    .map(|p| v1::PartitionLag {
                        partition: p.partition,
                        position: p.position,
                        high_watermark: p.high_watermark,
                        lag: p.lag(),
                    })
                    .collect(),
                topic: ingest.topic,
            }),
        }))
    }

    async fn health(&self, _request: Request<v1::Empty>) -> Result<Response<v1::HealthResponse>, Status> {
        let health = self.engine.health();
        let recovery = self.engine.recovery_report();
        Ok(Response::new(v1::HealthResponse {
            status: "SERVING".into(),
            version: env!("CARGO_PKG_VERSION").into(),
            dataflow: Some(v1::DataflowHealth {
                applied_frontier: health.applied_frontier,
                next_ts: health.next_ts,
                records_ingested: health.records_ingested,
                rows_ingested: health.rows_ingested,
                rows_in_flight: health.rows_in_flight,
                frontier_stalled_ms: health.frontier_stalled_for.map_or(0, |d| d.as_millis() as u64),
                frontier_stall_reports: health.frontier_stall_reports,
                reads_cancelled: health.reads_cancelled,
                writes_held: health.writes_held,
                writes_refused: health.writes_refused,
                index_backlog_rows: health.index_backlog_rows,
            }),
            recovery: Some(v1::RecoveryReport {
                segments_loaded: recovery.segments as u64,
                rows_loaded: recovery.rows as u64,
                log_records_replayed: recovery.replayed_records,
                log_rows_replayed: recovery.replayed_rows,
                load_ms: recovery.load.as_millis() as u64,
                total_ms: recovery.total.as_millis() as u64,
            }),
        }))
    }
}

/// tonic reports an oversized message as OUT_OF_RANGE; gRPC's spec (and our
/// API) says RESOURCE_EXHAUSTED. Errors before a handler runs are
/// trailers-only responses, so the status sits in the headers.
fn oversized_is_resource_exhausted<B>(mut response: http::Response<B>) -> http::Response<B> {
    let headers = response.headers_mut();
    let out_of_range = headers.get("grpc-status").is_some_and(|s| s == "11");
    let too_large = headers
        .get("grpc-message")
        .and_then(|m| m.to_str().ok())
        .is_some_and(|m| m.contains("too%20large") || m.contains("too large"));
    if out_of_range && too_large {
        headers.insert("grpc-status", http::HeaderValue::from_static("8"));
    }
    response
}

/// tonic answers a request body that does not decode as protobuf (bad wire
/// format, a string field that is not UTF-8) with INTERNAL, as if the server
/// had failed; it is the client's request that is malformed, so the answer
/// is INVALID_ARGUMENT. prost's message names the message and field
/// (`CollectionRef.name: invalid string value`), and is kept. Decoding
/// fails before a handler runs: a trailers-only response, status in the headers.
fn undecodable_is_invalid_argument<B>(mut response: http::Response<B>) -> http::Response<B> {
    let headers = response.headers_mut();
    let internal = headers.get("grpc-status").is_some_and(|s| s == "13");
    let undecodable = headers.get("grpc-message").and_then(|m| m.to_str().ok()).is_some_and(|m| {
        m.starts_with("failed%20to%20decode%20Protobuf%20message") || m.starts_with("failed to decode Protobuf message")
    });
    if internal && undecodable {
        headers.insert("grpc-status", http::HeaderValue::from_static("3"));
    }
    response
}

/// Runs the server until SIGTERM or SIGINT: stops accepting, lets in-flight
/// calls finish, flushes every collection and stops the engine.
pub async fn serve(config: ServerConfig) -> anyhow::Result<()> {
    // Both before the data directory is touched: a misconfigured server fails at once.
    config.check_exposure()?;
    let authenticator = config.auth.authenticator()?.map(Arc::new);
    let auth_layer = crate::auth::AuthLayer::new(authenticator.clone());
    // TLS files are read and checked here too, before the data directory is touched.
    let mut server = tonic::transport::Server::builder();
    if let Some(tls) = config.tls.server_config()? {
        let path = |p: &Option<std::path::PathBuf>| p.as_deref().map(|p| p.display().to_string()).unwrap_or_default();
        let mut files =
            format!("[tls] cert_path {} and key_path {}", path(&config.tls.cert_path), path(&config.tls.key_path));
        if config.tls.client_ca_path.is_some() {
            files.push_str(&format!(" (client_ca_path {})", path(&config.tls.client_ca_path)));
        }
        // rustls refuses here a key that does not belong to the certificate.
        server = server.tls_config(tls).map_err(|e| {
            let mut reason = e.to_string();
            let mut source = std::error::Error::source(&e);
            while let Some(cause) = source {
                reason = format!("{reason}: {cause}");
                source = cause.source();
            }
            anyhow::anyhow!("{files}: cannot serve TLS with these (does the key belong to the certificate?): {reason}")
        })?;
    }
    let engine = Engine::open(config.engine_config())?;
    exit_when_the_dataflow_stops(engine.clone());
    let listener = TcpListener::bind(&config.listen).await?;
    let address: SocketAddr = listener.local_addr()?;
    let service = VectorflowService::new(engine.clone(), config.max_message_bytes, config.limits.sql_policy())?;
    let metrics = match &config.metrics_listen {
        Some(metrics_listen) => {
            let metrics = crate::metrics::Metrics::new(engine.clone())?;
            let listener = TcpListener::bind(metrics_listen).await?;
            let address = listener.local_addr()?;
            let (serving, auth) = (metrics.clone(), authenticator.clone());
            tokio::spawn(async move {
                if let Err(e) = crate::metrics::serve(listener, serving, auth, shutdown_signal()).await {
                    tracing::error!("metrics endpoint stopped: {e}");
                }
            });
            tracing::info!(%address, "metrics at /metrics");
            Some((metrics, address))
        }
        None => None,
    };
    // Reflection in both versions: grpcio's reflection client and older grpcurl speak only v1alpha.
    let reflection_builder = || {
        tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(wire::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(wire::milvus::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
    };
    let reflection = reflection_builder().build_v1()?;
    let reflection_v1alpha = reflection_builder().build_v1alpha()?;
    // The standard health service, for load balancers and orchestrators ("" is SERVING from the start).
    let (health_reporter, health) = tonic_health::server::health_reporter();
    health_reporter.set_serving::<VectorflowServer<VectorflowService>>().await;
    if config.auth.enabled {
        tracing::info!(users = config.auth.users.len(), tokens = config.auth.tokens.len(), "authentication on");
    } else if !crate::config::is_loopback(&config.listen) {
        tracing::warn!(listen = config.listen, "serving without authentication on a non-loopback address (insecure)");
    }
    // tonic's own limit sits above ours so our handlers see (and refuse) large requests with a clear message.
    let transport_limit = config.max_message_bytes.saturating_add(config.max_message_bytes / 4 + (1 << 20));
    let grpc = VectorflowServer::new(service)
        .max_decoding_message_size(transport_limit)
        .max_encoding_message_size(transport_limit);
    // Milvus's protocol on the same port, for pymilvus and the frameworks built on it.
    let milvus = crate::milvus::MilvusServiceServer::new(crate::milvus::MilvusServiceImpl::new(
        engine.clone(),
        config.max_message_bytes,
    ))
    .max_decoding_message_size(transport_limit)
    .max_encoding_message_size(transport_limit);
    let tls = match (&config.tls.cert_path, &config.tls.client_ca_path) {
        (None, _) => "off",
        (Some(_), None) => "on",
        (Some(_), Some(_)) => "mutual",
    };
    tracing::info!(%address, data_dir = %config.data_dir.display(), tls, "vectorflow serving");
    // Tests and scripts read the bound address (the port may have been 0).
    println!("vectorflow listening on {address}");
    if let Some((_, metrics_address)) = &metrics {
        println!("vectorflow metrics on http://{metrics_address}/metrics");
    }
    let served = server
        // Outermost: it times the whole call and sees the code the client gets.
        .layer(crate::observe::ObserveLayer::new(
            Duration::from_millis(config.slow_request_ms),
            metrics.map(|(metrics, _)| metrics),
        ))
        .layer(tower::util::MapResponseLayer::new(oversized_is_resource_exhausted))
        .layer(tower::util::MapResponseLayer::new(undecodable_is_invalid_argument))
        // Admission before authentication: an overloaded server refuses at once.
        .layer(crate::admission::AdmissionLayer::new(config.limits.max_concurrent_requests))
        // Innermost: every service goes through the one role check (auth.rs's table).
        .layer(auth_layer)
        .add_service(health)
        .add_service(reflection)
        .add_service(reflection_v1alpha)
        .add_service(grpc)
        .add_service(milvus)
        .serve_with_incoming_shutdown(TcpListenerStream::new(listener), shutdown_signal())
        .await;
    let in_cluster = engine.in_cluster();
    tracing::info!(in_cluster, "stopped accepting; flushing");
    let flushed = tokio::task::spawn_blocking(move || {
        // A cluster's checkpoint needs every process, which stop at once:
        // it restarts from its last checkpoint and the topics instead.
        let flushing = if in_cluster { Vec::new() } else { engine.list_collections() };
        for name in flushing {
            if let Err(e) = engine.flush(&name) {
                tracing::warn!(collection = name, "flush at shutdown: {e}");
            }
        }
        engine.shutdown();
    })
    .await;
    served?;
    flushed?;
    tracing::info!("vectorflow stopped");
    Ok(())
}

/// Exit code of a server whose dataflow stopped (EX_SOFTWARE): a supervisor restarts it.
pub const DATAFLOW_STOPPED_EXIT: i32 = 70;

/// Ends the process when the engine's dataflow stops (a worker died; in a
/// cluster, another process did and took the shared dataflow with it):
/// timely cannot continue without it, so the server exits and its
/// supervisor restarts it, which recovers from the checkpoint and the log.
/// Requests meanwhile fail with `UNAVAILABLE`.
fn exit_when_the_dataflow_stops(engine: Engine) {
    tokio::spawn(async move {
        let mut every = tokio::time::interval(Duration::from_millis(100));
        loop {
            every.tick().await;
            if let Some(cause) = engine.health().stopped {
                tracing::error!("exiting for a restart: {cause}");
                eprintln!("vectorflow: the dataflow stopped ({cause}); exiting for a restart");
                std::process::exit(DATAFLOW_STOPPED_EXIT);
            }
        }
    });
}

async fn shutdown_signal() {
    let interrupt = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut terminate) => {
                tokio::select! {
                    _ = interrupt => {}
                    _ = terminate.recv() => {}
                }
            }
            Err(e) => {
                tracing::warn!("cannot listen for SIGTERM: {e}");
                let _ = interrupt.await;
            }
        }
    }
    #[cfg(not(unix))]
    let _ = interrupt.await;
    tracing::info!("shutdown signal received");
}
