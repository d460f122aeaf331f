//! The Milvus gRPC service (`milvus.proto.milvus.MilvusService`), served on
//! the same port as `vectorflow.v1`, so pymilvus's `MilvusClient` and the
//! frameworks built on it work unchanged.
//!
//! Milvus reports errors in-band, in the response's `common.Status`, and
//! its clients retry gRPC errors such as UNAVAILABLE for minutes; so every
//! engine error becomes a status in the answer ([`Failed`]), and only
//! transport problems (authentication, admission, a message too large) stay
//! gRPC errors. Methods not declared in `proto/milvus/milvus.proto` answer
//! UNIMPLEMENTED, which pymilvus does not retry.
//!
//! Milvus keeps per-collection state the engine has no notion of: which
//! indexes were created (the engine indexes every vector field from the
//! start) and whether a collection is loaded (the engine always serves what
//! it holds). [`MilvusState`] keeps it in memory: after a restart a
//! collection reads as loaded with one index per vector field.

mod collections;
mod data;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use prost::Message;
use tonic::{Request, Response, Status};
use vectorflow::{CollectionId, Engine, Error};
use vectorflow_proto::milvus::pb::common::{self as common, KeyValuePair};
use vectorflow_proto::milvus::pb::milvus::{self as pb, milvus_service_server::MilvusService};
use vectorflow_proto::milvus::status;

pub use vectorflow_proto::milvus::pb::milvus::milvus_service_server::MilvusServiceServer;

/// The only database: Milvus's default one.
const DEFAULT_DATABASE: &str = "default";

/// An index a client created (or the one implied for a vector field).
#[derive(Debug, Clone)]
struct IndexRecord {
    id: i64,
    name: String,
    field: String,
    /// The `extra_params` as sent (`index_type`, `metric_type`, knobs).
    params: Vec<KeyValuePair>,
}

/// What Milvus tracks of a collection that the engine does not.
#[derive(Debug, Clone)]
struct CollectionState {
    /// `None`: one implied index per vector field (a collection made through
    /// `vectorflow.v1`, or any after a restart).
    indexes: Option<Vec<IndexRecord>>,
    loaded: bool,
    /// Partitions released while the collection stays loaded: reads leave
    /// them out, and a read naming one is refused.
    released: std::collections::BTreeSet<String>,
}

impl Default for CollectionState {
    fn default() -> Self {
        CollectionState { indexes: None, loaded: true, released: Default::default() }
    }
}

#[derive(Debug, Default)]
struct MilvusState {
    collections: Mutex<HashMap<CollectionId, CollectionState>>,
    /// Writes through this service hold it shared; recreating an empty
    /// collection with another metric holds it alone, so no write lands
    /// between the emptiness check and the recreate.
    writes: std::sync::RwLock<()>,
    next_index_id: std::sync::atomic::AtomicI64,
    next_client_id: std::sync::atomic::AtomicI64,
}

impl MilvusState {
    fn get(&self, id: CollectionId) -> CollectionState {
        self.collections.lock().map(|c| c.get(&id).cloned().unwrap_or_default()).unwrap_or_default()
    }

    fn update(&self, id: CollectionId, change: impl FnOnce(&mut CollectionState)) {
        if let Ok(mut collections) = self.collections.lock() {
            change(collections.entry(id).or_default());
        }
    }

    fn forget(&self, id: CollectionId) {
        if let Ok(mut collections) = self.collections.lock() {
            collections.remove(&id);
        }
    }
}

/// A refused request: the in-band status the client gets.
#[derive(Debug)]
struct Refusal(common::Status);

impl From<Error> for Refusal {
    fn from(error: Error) -> Self {
        Refusal(status::from_error(&error))
    }
}

type Answer<T> = std::result::Result<T, Refusal>;

/// A response that carries a failure in its `status` field.
trait Failed: Default {
    fn failed(status: common::Status) -> Self;
}

impl Failed for common::Status {
    fn failed(status: common::Status) -> Self {
        status
    }
}

macro_rules! failed_in_status_field {
    ($($response:ty),* $(,)?) => {
        $(impl Failed for $response {
            fn failed(status: common::Status) -> Self {
                Self { status: Some(status), ..Default::default() }
            }
        })*
    };
}

failed_in_status_field!(
    pb::ShowPartitionsResponse,
    pb::GetPartitionStatisticsResponse,
    pb::ConnectResponse,
    pb::GetVersionResponse,
    pb::CheckHealthResponse,
    pb::AllocTimestampResponse,
    pb::BoolResponse,
    pb::DescribeCollectionResponse,
    pb::ShowCollectionsResponse,
    pb::GetCollectionStatisticsResponse,
    pb::GetLoadingProgressResponse,
    pb::GetLoadStateResponse,
    pb::DescribeIndexResponse,
    pb::MutationResult,
    pb::SearchResults,
    pb::QueryResults,
    pb::FlushResponse,
    pb::GetFlushStateResponse,
    pb::DescribeAliasResponse,
    pb::ListAliasesResponse,
);

/// What a handler works with.
struct Call {
    engine: Engine,
    state: Arc<MilvusState>,
    /// The time a read may wait (from the client's deadline).
    timeout: Option<Duration>,
}

pub struct MilvusServiceImpl {
    engine: Engine,
    state: Arc<MilvusState>,
    max_message_bytes: usize,
}

impl MilvusServiceImpl {
    pub fn new(engine: Engine, max_message_bytes: usize) -> Self {
        MilvusServiceImpl { engine, state: Arc::default(), max_message_bytes }
    }

    /// Runs `work` on the blocking pool (engine calls wait for the dataflow)
    /// and answers its failure in-band.
    async fn answer<M, R>(
        &self,
        request: Request<M>,
        db_name: impl FnOnce(&M) -> &str,
        work: impl FnOnce(&Call, M) -> Answer<R> + Send + 'static,
    ) -> Result<Response<R>, Status>
    where
        M: Message + Send + 'static,
        R: Failed + Message + Send + 'static,
    {
        let size = request.get_ref().encoded_len();
        if size > self.max_message_bytes {
            return Err(Status::resource_exhausted(format!(
                "request of {size} bytes exceeds max_message_bytes = {}",
                self.max_message_bytes
            )));
        }
        let timeout = crate::server::read_timeout(&request)?;
        // The database comes in the request or in `dbname` metadata; only the default one exists.
        let header = request.metadata().get("dbname").and_then(|v| v.to_str().ok()).unwrap_or("").to_string();
        let body = request.into_inner();
        for database in [db_name(&body), header.as_str()] {
            if !database.is_empty() && database != DEFAULT_DATABASE {
                return Ok(Response::new(R::failed(status::failure(
                    status::code::DATABASE_NOT_FOUND,
                    common::ErrorCode::UnexpectedError,
                    format!(
                        "database not found[database={}]: only `default` exists",
                        vectorflow::crates::core::quote(database)
                    ),
                ))));
            }
        }
        let call = Call { engine: self.engine.clone(), state: self.state.clone(), timeout };
        let answer = tokio::task::spawn_blocking(move || work(&call, body)).await;
        let max_bytes = self.max_message_bytes;
        Ok(Response::new(match answer {
            // An answer over the message limit would fail while it is sent,
            // as a gRPC error pymilvus retries: say so in-band instead.
            Ok(Ok(response)) if response.encoded_len() > max_bytes => R::failed(status::from_error(&Error::argument(
                "limit",
                format!(
                    "the answer is {} bytes, more than max_message_bytes = {max_bytes}: ask for fewer rows, \
                     fields or hits (limit / offset)",
                    response.encoded_len()
                ),
            ))),
            Ok(Ok(response)) => response,
            Ok(Err(Refusal(status))) => R::failed(status),
            Err(e) => R::failed(status::from_error(&Error::Internal(format!("request handler failed: {e}")))),
        }))
    }
}

fn no_database<M>(_: &M) -> &str {
    ""
}

#[tonic::async_trait]
impl MilvusService for MilvusServiceImpl {
    async fn connect(&self, request: Request<pb::ConnectRequest>) -> Result<Response<pb::ConnectResponse>, Status> {
        let identifier = self.state.next_client_id.fetch_add(1, std::sync::atomic::Ordering::Relaxed) + 1;
        self.answer(request, no_database, move |_, _| {
            Ok(pb::ConnectResponse {
                status: Some(status::ok()),
                server_info: Some(common::ServerInfo {
                    build_tags: server_version(),
                    deploy_mode: "vectorflow".into(),
                    ..Default::default()
                }),
                identifier,
            })
        })
        .await
    }

    async fn get_version(
        &self,
        request: Request<pb::GetVersionRequest>,
    ) -> Result<Response<pb::GetVersionResponse>, Status> {
        self.answer(request, no_database, |_, _| {
            Ok(pb::GetVersionResponse { status: Some(status::ok()), version: server_version() })
        })
        .await
    }

    async fn check_health(
        &self,
        request: Request<pb::CheckHealthRequest>,
    ) -> Result<Response<pb::CheckHealthResponse>, Status> {
        self.answer(request, no_database, |call, _| {
            let reasons: Vec<String> = call
                .engine
                .failed_collections()
                .into_iter()
                .map(|(name, cause)| format!("collection `{name}` is stopped: {cause}"))
                .collect();
            Ok(pb::CheckHealthResponse { status: Some(status::ok()), is_healthy: reasons.is_empty(), reasons })
        })
        .await
    }

    async fn alloc_timestamp(
        &self,
        request: Request<pb::AllocTimestampRequest>,
    ) -> Result<Response<pb::AllocTimestampResponse>, Status> {
        self.answer(request, no_database, |call, _| {
            Ok(pb::AllocTimestampResponse { status: Some(status::ok()), timestamp: call.engine.now() })
        })
        .await
    }

    async fn create_collection(
        &self,
        request: Request<pb::CreateCollectionRequest>,
    ) -> Result<Response<common::Status>, Status> {
        self.answer(request, |r| &r.db_name, collections::create_collection).await
    }

    async fn drop_collection(
        &self,
        request: Request<pb::DropCollectionRequest>,
    ) -> Result<Response<common::Status>, Status> {
        self.answer(request, |r| &r.db_name, collections::drop_collection).await
    }

    async fn create_partition(
        &self,
        request: Request<pb::CreatePartitionRequest>,
    ) -> Result<Response<common::Status>, Status> {
        self.answer(request, |r| &r.db_name, collections::create_partition).await
    }

    async fn drop_partition(
        &self,
        request: Request<pb::DropPartitionRequest>,
    ) -> Result<Response<common::Status>, Status> {
        self.answer(request, |r| &r.db_name, collections::drop_partition).await
    }

    async fn has_partition(
        &self,
        request: Request<pb::HasPartitionRequest>,
    ) -> Result<Response<pb::BoolResponse>, Status> {
        self.answer(request, |r| &r.db_name, collections::has_partition).await
    }

    async fn show_partitions(
        &self,
        request: Request<pb::ShowPartitionsRequest>,
    ) -> Result<Response<pb::ShowPartitionsResponse>, Status> {
        self.answer(request, |r| &r.db_name, collections::show_partitions).await
    }

    async fn load_partitions(
        &self,
        request: Request<pb::LoadPartitionsRequest>,
    ) -> Result<Response<common::Status>, Status> {
        self.answer(request, |r| &r.db_name, collections::load_partitions).await
    }

    async fn release_partitions(
        &self,
        request: Request<pb::ReleasePartitionsRequest>,
    ) -> Result<Response<common::Status>, Status> {
        self.answer(request, |r| &r.db_name, collections::release_partitions).await
    }

    async fn get_partition_statistics(
        &self,
        request: Request<pb::GetPartitionStatisticsRequest>,
    ) -> Result<Response<pb::GetPartitionStatisticsResponse>, Status> {
        self.answer(request, |r| &r.db_name, collections::get_partition_statistics).await
    }

    async fn create_alias(&self, request: Request<pb::CreateAliasRequest>) -> Result<Response<common::Status>, Status> {
        self.answer(request, |r| &r.db_name, collections::create_alias).await
    }

    async fn alter_alias(&self, request: Request<pb::AlterAliasRequest>) -> Result<Response<common::Status>, Status> {
        self.answer(request, |r| &r.db_name, collections::alter_alias).await
    }

    async fn drop_alias(&self, request: Request<pb::DropAliasRequest>) -> Result<Response<common::Status>, Status> {
        self.answer(request, |r| &r.db_name, collections::drop_alias).await
    }

    async fn describe_alias(
        &self,
        request: Request<pb::DescribeAliasRequest>,
    ) -> Result<Response<pb::DescribeAliasResponse>, Status> {
        self.answer(request, |r| &r.db_name, collections::describe_alias).await
    }

    async fn list_aliases(
        &self,
        request: Request<pb::ListAliasesRequest>,
    ) -> Result<Response<pb::ListAliasesResponse>, Status> {
        self.answer(request, |r| &r.db_name, collections::list_aliases).await
    }

    async fn has_collection(
        &self,
        request: Request<pb::HasCollectionRequest>,
    ) -> Result<Response<pb::BoolResponse>, Status> {
        self.answer(
            request,
            |r| &r.db_name,
            |call, body| {
                let value = call.engine.describe_collection(&body.collection_name).is_ok();
                Ok(pb::BoolResponse { status: Some(status::ok()), value })
            },
        )
        .await
    }

    async fn describe_collection(
        &self,
        request: Request<pb::DescribeCollectionRequest>,
    ) -> Result<Response<pb::DescribeCollectionResponse>, Status> {
        self.answer(request, |r| &r.db_name, collections::describe_collection).await
    }

    async fn show_collections(
        &self,
        request: Request<pb::ShowCollectionsRequest>,
    ) -> Result<Response<pb::ShowCollectionsResponse>, Status> {
        self.answer(request, |r| &r.db_name, collections::show_collections).await
    }

    async fn get_collection_statistics(
        &self,
        request: Request<pb::GetCollectionStatisticsRequest>,
    ) -> Result<Response<pb::GetCollectionStatisticsResponse>, Status> {
        self.answer(request, |r| &r.db_name, collections::collection_statistics).await
    }

    async fn load_collection(
        &self,
        request: Request<pb::LoadCollectionRequest>,
    ) -> Result<Response<common::Status>, Status> {
        self.answer(request, |r| &r.db_name, collections::load_collection).await
    }

    async fn release_collection(
        &self,
        request: Request<pb::ReleaseCollectionRequest>,
    ) -> Result<Response<common::Status>, Status> {
        self.answer(
            request,
            |r| &r.db_name,
            |call, body| {
                let id = call.engine.describe_collection(&body.collection_name)?.id;
                call.state.update(id, |c| c.loaded = false);
                Ok(status::ok())
            },
        )
        .await
    }

    async fn get_loading_progress(
        &self,
        request: Request<pb::GetLoadingProgressRequest>,
    ) -> Result<Response<pb::GetLoadingProgressResponse>, Status> {
        self.answer(
            request,
            |r| &r.db_name,
            |call, body| {
                let id = call.engine.describe_collection(&body.collection_name)?.id;
                let progress = if call.state.get(id).loaded { 100 } else { 0 };
                Ok(pb::GetLoadingProgressResponse { status: Some(status::ok()), progress, refresh_progress: progress })
            },
        )
        .await
    }

    async fn get_load_state(
        &self,
        request: Request<pb::GetLoadStateRequest>,
    ) -> Result<Response<pb::GetLoadStateResponse>, Status> {
        self.answer(
            request,
            |r| &r.db_name,
            |call, body| {
                // A collection that is not there is a state, not an error, in Milvus.
                let state = match call.engine.describe_collection(&body.collection_name) {
                    Err(Error::CollectionNotFound(_)) => common::LoadState::NotExist,
                    Err(e) => return Err(e.into()),
                    Ok(info) if call.state.get(info.id).loaded => common::LoadState::Loaded,
                    Ok(_) => common::LoadState::NotLoad,
                };
                Ok(pb::GetLoadStateResponse { status: Some(status::ok()), state: state as i32 })
            },
        )
        .await
    }

    async fn create_index(&self, request: Request<pb::CreateIndexRequest>) -> Result<Response<common::Status>, Status> {
        self.answer(request, |r| &r.db_name, collections::create_index).await
    }

    async fn describe_index(
        &self,
        request: Request<pb::DescribeIndexRequest>,
    ) -> Result<Response<pb::DescribeIndexResponse>, Status> {
        self.answer(request, |r| &r.db_name, collections::describe_index).await
    }

    async fn drop_index(&self, request: Request<pb::DropIndexRequest>) -> Result<Response<common::Status>, Status> {
        self.answer(request, |r| &r.db_name, collections::drop_index).await
    }

    async fn insert(&self, request: Request<pb::InsertRequest>) -> Result<Response<pb::MutationResult>, Status> {
        self.answer(
            request,
            |r| &r.db_name,
            |call, body| {
                data::write(call, &body.collection_name, &body.partition_name, body.fields_data, body.num_rows, false)
            },
        )
        .await
    }

    async fn upsert(&self, request: Request<pb::UpsertRequest>) -> Result<Response<pb::MutationResult>, Status> {
        self.answer(
            request,
            |r| &r.db_name,
            |call, body| {
                if body.partial_update {
                    return Err(Refusal(status::invalid("partial_update", "partial updates are not supported yet")));
                }
                data::write(call, &body.collection_name, &body.partition_name, body.fields_data, body.num_rows, true)
            },
        )
        .await
    }

    async fn delete(&self, request: Request<pb::DeleteRequest>) -> Result<Response<pb::MutationResult>, Status> {
        self.answer(request, |r| &r.db_name, data::delete).await
    }

    async fn search(&self, request: Request<pb::SearchRequest>) -> Result<Response<pb::SearchResults>, Status> {
        self.answer(request, |r| &r.db_name, data::search).await
    }

    async fn hybrid_search(
        &self,
        request: Request<pb::HybridSearchRequest>,
    ) -> Result<Response<pb::SearchResults>, Status> {
        self.answer(request, |r| &r.db_name, data::hybrid_search).await
    }

    async fn query(&self, request: Request<pb::QueryRequest>) -> Result<Response<pb::QueryResults>, Status> {
        self.answer(request, |r| &r.db_name, data::query).await
    }

    async fn flush(&self, request: Request<pb::FlushRequest>) -> Result<Response<pb::FlushResponse>, Status> {
        self.answer(request, |r| &r.db_name, collections::flush).await
    }

    async fn get_flush_state(
        &self,
        request: Request<pb::GetFlushStateRequest>,
    ) -> Result<Response<pb::GetFlushStateResponse>, Status> {
        self.answer(
            request,
            |r| &r.db_name,
            |call, body| {
                // `Flush` returns once the collection is checkpointed: anything
                // it returned a flush time for is flushed.
                if !body.collection_name.is_empty() {
                    call.engine.describe_collection(&body.collection_name)?;
                }
                Ok(pb::GetFlushStateResponse { status: Some(status::ok()), flushed: true })
            },
        )
        .await
    }
}

/// The version reported to clients.
fn server_version() -> String {
    format!("vectorflow-{}", env!("CARGO_PKG_VERSION"))
}
