//! Collections, indexes, loading and flushing, as Milvus clients manage them.

use vectorflow::crates::core::{quote, time::physical_ms};
use vectorflow::{CollectionInfo, Consistency, DataType, Error, Metric};
use vectorflow_proto::milvus::pb::common::{self as common, ErrorCode, IndexState, KeyValuePair};
use vectorflow_proto::milvus::pb::milvus as pb;
use vectorflow_proto::milvus::pb::schema::LongArray;
use vectorflow_proto::milvus::{request, schema, status};

use super::{Answer, Call, CollectionState, IndexRecord, Refusal};

pub(super) fn create_collection(call: &Call, body: pb::CreateCollectionRequest) -> Answer<common::Status> {
    let wanted = schema::schema_from_milvus(
        &body.collection_name,
        &body.schema,
        body.consistency_level,
        &body.properties,
        body.num_partitions,
    )?;
    match call.engine.create_collection(wanted.clone()) {
        Ok(created) => {
            // Milvus: no index until CreateIndex, not served until LoadCollection.
            call.state.update(created.id, |c| {
                *c = CollectionState { indexes: Some(Vec::new()), loaded: false, ..Default::default() }
            });
            Ok(status::ok())
        }
        // Milvus creates idempotently: the same schema again is a success.
        Err(Error::CollectionExists(name)) => {
            // Compared as Milvus sees them: without metrics, which an index may have changed.
            let existing = call.engine.describe_collection(&name)?.schema;
            if schema::schema_to_milvus(&existing) == schema::schema_to_milvus(&wanted) {
                Ok(status::ok())
            } else {
                Err(Error::CollectionExists(name).into())
            }
        }
        Err(e) => Err(e.into()),
    }
}

pub(super) fn drop_collection(call: &Call, body: pb::DropCollectionRequest) -> Answer<common::Status> {
    // Dropping a collection that is not there succeeds, as in Milvus.
    let Ok(info) = call.engine.describe_collection(&body.collection_name) else { return Ok(status::ok()) };
    call.engine.drop_collection(&body.collection_name)?;
    call.state.forget(info.id);
    Ok(status::ok())
}

pub(super) fn create_partition(call: &Call, body: pb::CreatePartitionRequest) -> Answer<common::Status> {
    call.engine.create_partition(&body.collection_name, &body.partition_name)?;
    Ok(status::ok())
}

/// As in Milvus, a loaded partition must be released before it is dropped.
pub(super) fn drop_partition(call: &Call, body: pb::DropPartitionRequest) -> Answer<common::Status> {
    let info = collection(call, &body.collection_name)?;
    let state = call.state.get(info.id);
    if call.engine.has_partition(&body.collection_name, &body.partition_name)?
        && state.loaded
        && !state.released.contains(&body.partition_name)
    {
        return Err(Refusal(status::invalid(
            "partition_name",
            format!("partition `{}` is loaded: release it before dropping it", body.partition_name),
        )));
    }
    call.engine.drop_partition(&body.collection_name, &body.partition_name)?;
    call.state.update(info.id, |c| {
        c.released.remove(&body.partition_name);
    });
    Ok(status::ok())
}

pub(super) fn has_partition(call: &Call, body: pb::HasPartitionRequest) -> Answer<pb::BoolResponse> {
    let value = call.engine.has_partition(&body.collection_name, &body.partition_name)?;
    Ok(pb::BoolResponse { status: Some(status::ok()), value })
}

pub(super) fn show_partitions(call: &Call, body: pb::ShowPartitionsRequest) -> Answer<pb::ShowPartitionsResponse> {
    let info = collection(call, &body.collection_name)?;
    let state = call.state.get(info.id);
    let names = call.engine.list_partitions(&body.collection_name)?;
    let loaded = |name: &String| state.loaded && !state.released.contains(name);
    Ok(pb::ShowPartitionsResponse {
        status: Some(status::ok()),
        partition_i_ds: (1..=names.len() as i64).collect(),
        created_timestamps: vec![info.created_ts; names.len()],
        created_utc_timestamps: vec![physical_ms(info.created_ts); names.len()],
        in_memory_percentages: names.iter().map(|n| if loaded(n) { 100 } else { 0 }).collect(),
        partition_names: names,
    })
}

/// Loads partitions: the collection is served, with these partitions in it.
pub(super) fn load_partitions(call: &Call, body: pb::LoadPartitionsRequest) -> Answer<common::Status> {
    for name in &body.partition_names {
        if !call.engine.has_partition(&body.collection_name, name)? {
            return Err(Refusal(status::invalid("partition_names", format!("partition `{name}` not found"))));
        }
    }
    let loaded = load_collection(
        call,
        pb::LoadCollectionRequest { collection_name: body.collection_name.clone(), ..Default::default() },
    )?;
    let info = collection(call, &body.collection_name)?;
    call.state.update(info.id, |c| body.partition_names.iter().for_each(|n| _ = c.released.remove(n)));
    Ok(loaded)
}

pub(super) fn release_partitions(call: &Call, body: pb::ReleasePartitionsRequest) -> Answer<common::Status> {
    let info = collection(call, &body.collection_name)?;
    for name in &body.partition_names {
        if !call.engine.has_partition(&body.collection_name, name)? {
            return Err(Refusal(status::invalid("partition_names", format!("partition `{name}` not found"))));
        }
    }
    call.state.update(info.id, |c| c.released.extend(body.partition_names.iter().cloned()));
    Ok(status::ok())
}

pub(super) fn get_partition_statistics(
    call: &Call,
    body: pb::GetPartitionStatisticsRequest,
) -> Answer<pb::GetPartitionStatisticsResponse> {
    if !call.engine.has_partition(&body.collection_name, &body.partition_name)? {
        return Err(Refusal(status::invalid(
            "partition_name",
            format!("partition `{}` not found", body.partition_name),
        )));
    }
    let options = vectorflow::QueryOptions { partitions: vec![body.partition_name.clone()], ..Default::default() };
    let rows = call.engine.count(&body.collection_name, &options)?;
    Ok(pb::GetPartitionStatisticsResponse {
        status: Some(status::ok()),
        stats: vec![common::KeyValuePair { key: "row_count".into(), value: rows.to_string() }],
    })
}

pub(super) fn create_alias(call: &Call, body: pb::CreateAliasRequest) -> Answer<common::Status> {
    call.engine.create_alias(&body.alias, &body.collection_name)?;
    Ok(status::ok())
}

pub(super) fn alter_alias(call: &Call, body: pb::AlterAliasRequest) -> Answer<common::Status> {
    call.engine.alter_alias(&body.alias, &body.collection_name)?;
    Ok(status::ok())
}

pub(super) fn drop_alias(call: &Call, body: pb::DropAliasRequest) -> Answer<common::Status> {
    call.engine.drop_alias(&body.alias)?;
    Ok(status::ok())
}

pub(super) fn describe_alias(call: &Call, body: pb::DescribeAliasRequest) -> Answer<pb::DescribeAliasResponse> {
    let collection = call.engine.describe_alias(&body.alias)?;
    Ok(pb::DescribeAliasResponse {
        status: Some(status::ok()),
        db_name: super::DEFAULT_DATABASE.into(),
        alias: body.alias,
        collection,
    })
}

/// The aliases of one collection, or every alias when no collection is named.
pub(super) fn list_aliases(call: &Call, body: pb::ListAliasesRequest) -> Answer<pb::ListAliasesResponse> {
    let named = Some(body.collection_name.as_str()).filter(|name| !name.is_empty());
    let aliases = call.engine.list_aliases(named)?;
    Ok(pb::ListAliasesResponse {
        status: Some(status::ok()),
        db_name: super::DEFAULT_DATABASE.into(),
        collection_name: body.collection_name,
        aliases,
    })
}

fn collection(call: &Call, name: &str) -> Answer<CollectionInfo> {
    Ok(call.engine.describe_collection(name)?)
}

pub(super) fn describe_collection(
    call: &Call,
    body: pb::DescribeCollectionRequest,
) -> Answer<pb::DescribeCollectionResponse> {
    let info = if body.collection_name.is_empty() && body.collection_id != 0 {
        let found = call.engine.list_collections().into_iter().find_map(|name| {
            call.engine.describe_collection(&name).ok().filter(|info| i64::from(info.id) == body.collection_id)
        });
        found.ok_or_else(|| Error::CollectionNotFound(format!("id {}", body.collection_id)))?
    } else {
        collection(call, &body.collection_name)?
    };
    let workers = call.engine.config().workers as i32;
    Ok(pb::DescribeCollectionResponse {
        status: Some(status::ok()),
        schema: Some(schema::schema_to_milvus(&info.schema)),
        collection_id: i64::from(info.id),
        virtual_channel_names: (0..workers).map(|w| format!("{}_v{w}", info.schema.name)).collect(),
        physical_channel_names: (0..workers).map(|w| format!("{}_{w}", info.schema.name)).collect(),
        created_timestamp: info.created_ts,
        created_utc_timestamp: physical_ms(info.created_ts),
        shards_num: workers,
        consistency_level: vectorflow_proto::milvus::schema::consistency_of(&info.schema) as i32,
        collection_name: info.schema.name.clone(),
        aliases: info.aliases.clone(),
        properties: schema::user_properties(&info.schema),
        db_name: super::DEFAULT_DATABASE.into(),
        num_partitions: call.engine.list_partitions(&info.schema.name).map_or(1, |p| p.len() as i64),
        ..Default::default()
    })
}

pub(super) fn show_collections(call: &Call, _body: pb::ShowCollectionsRequest) -> Answer<pb::ShowCollectionsResponse> {
    let infos: Vec<CollectionInfo> =
        call.engine.list_collections().iter().filter_map(|name| call.engine.describe_collection(name).ok()).collect();
    let workers = call.engine.config().workers as i32;
    Ok(pb::ShowCollectionsResponse {
        status: Some(status::ok()),
        collection_names: infos.iter().map(|i| i.schema.name.clone()).collect(),
        collection_ids: infos.iter().map(|i| i64::from(i.id)).collect(),
        created_timestamps: infos.iter().map(|i| i.created_ts).collect(),
        created_utc_timestamps: infos.iter().map(|i| physical_ms(i.created_ts)).collect(),
        in_memory_percentages: infos.iter().map(|i| if call.state.get(i.id).loaded { 100 } else { 0 }).collect(),
        query_service_available: infos.iter().map(|i| call.state.get(i.id).loaded).collect(),
        shards_num: infos.iter().map(|_| workers).collect(),
    })
}

pub(super) fn collection_statistics(
    call: &Call,
    body: pb::GetCollectionStatisticsRequest,
) -> Answer<pb::GetCollectionStatisticsResponse> {
    let stats = call.engine.stats(&body.collection_name, Consistency::Strong)?;
    Ok(pb::GetCollectionStatisticsResponse {
        status: Some(status::ok()),
        stats: vec![KeyValuePair { key: "row_count".into(), value: stats.live_rows.to_string() }],
    })
}

/// The indexes of a collection: those created, or one implied per vector field.
fn indexes(call: &Call, info: &CollectionInfo) -> Vec<IndexRecord> {
    match call.state.get(info.id).indexes {
        Some(created) => created,
        None => info
            .schema
            .fields
            .iter()
            .enumerate()
            .filter(|(_, f)| f.data_type.is_vector())
            .map(|(i, f)| IndexRecord {
                id: i as i64 + 1,
                name: f.name.clone(),
                field: f.name.clone(),
                params: vec![KeyValuePair { key: "index_type".into(), value: "HNSW".into() }],
            })
            .collect(),
    }
}

fn metric_of(info: &CollectionInfo, field: &str) -> Option<Metric> {
    match info.schema.field(field).ok()?.1.data_type {
        DataType::FloatVector { metric, .. } => Some(metric),
        _ => None,
    }
}

pub(super) fn create_index(call: &Call, body: pb::CreateIndexRequest) -> Answer<common::Status> {
    let mut info = collection(call, &body.collection_name)?;
    let (_, field) = info.schema.field(&body.field_name)?;
    let on_vectors = field.data_type.is_vector();
    let wanted = request::index_params(&body.extra_params, on_vectors)?;
    let name = if body.index_name.is_empty() { body.field_name.clone() } else { body.index_name.clone() };
    let implied = call.state.get(info.id).indexes.is_none();
    let mut existing = indexes(call, &info);
    // An implied index (a collection made elsewhere, or any after a
    // restart) gives way to the one a client creates on its field.
    if implied {
        existing.retain(|i| i.field != body.field_name);
    }
    if let Some(same) = existing.iter().find(|i| i.field == body.field_name || i.name == name) {
        let current = request::index_params(&same.params, on_vectors)?;
        let same_metric = wanted.metric.is_none() || wanted.metric == metric_of(&info, &body.field_name);
        if same.name == name && same.field == body.field_name && current.index_type == wanted.index_type && same_metric
        {
            return Ok(status::ok());
        }
        return Err(Refusal(status::failure(
            702,
            ErrorCode::IllegalArgument,
            format!(
                "at most one distinct index is allowed per field: field `{}` has index `{}` (drop it first)",
                quote(&same.field),
                quote(&same.name)
            ),
        )));
    }
    if let (Some(metric), Some(current)) = (wanted.metric, metric_of(&info, &body.field_name))
        && metric != current
    {
        info = rescore(call, &info, &body.field_name, metric, current)?;
    }
    let id = call.state.next_index_id.fetch_add(1, std::sync::atomic::Ordering::Relaxed) + 1;
    let record = IndexRecord { id, name, field: body.field_name.clone(), params: wanted.params };
    let mut all = existing;
    all.push(record);
    call.state.update(info.id, |c| c.indexes = Some(all));
    Ok(status::ok())
}

/// Milvus picks a vector field's metric with its index; we fix it with the
/// collection, since graphs (and COSINE's normalised vectors) depend on it.
/// A collection that has never held a row is created again with the metric
/// asked for; one with rows keeps its metric and the request is refused.
fn rescore(call: &Call, info: &CollectionInfo, field: &str, metric: Metric, current: Metric) -> Answer<CollectionInfo> {
    let _no_writes_meanwhile = call.state.writes.write().map_err(|_| Error::Shutdown)?;
    let stats = call.engine.stats(&info.schema.name, Consistency::Strong)?;
    if stats.versions > 0 {
        return Err(Refusal(status::failure(
            status::code::INDEX_NOT_SUPPORTED,
            ErrorCode::IllegalMetricType,
            format!(
                "field `{}` already holds rows scored by {}: Vectorflow fixes a vector field's metric once rows \
                 are written, so an index with metric_type {} needs a new collection (create the index before \
                 inserting, or give the metric in the schema)",
                quote(field),
                schema::metric_name(current),
                schema::metric_name(metric)
            ),
        )));
    }
    let changed = schema::with_metric(&info.schema, field, metric)?;
    let state = call.state.get(info.id);
    call.engine.drop_collection(&info.schema.name)?;
    call.state.forget(info.id);
    let created = match call.engine.create_collection(changed) {
        Ok(created) => created,
        Err(e) => {
            // Put the empty collection back as it was, so a failed change loses nothing.
            if let Ok(back) = call.engine.create_collection(info.schema.clone()) {
                call.state.update(back.id, |c| *c = state.clone());
            }
            return Err(e.into());
        }
    };
    call.state.update(created.id, |c| *c = state);
    Ok(created)
}

pub(super) fn describe_index(call: &Call, body: pb::DescribeIndexRequest) -> Answer<pb::DescribeIndexResponse> {
    let info = collection(call, &body.collection_name)?;
    let found: Vec<IndexRecord> = indexes(call, &info)
        .into_iter()
        .filter(|i| body.index_name.is_empty() || i.name == body.index_name)
        .filter(|i| body.field_name.is_empty() || i.field == body.field_name)
        .collect();
    if found.is_empty() {
        return Err(index_not_found(&body.collection_name, &body.index_name));
    }
    let stats = call.engine.stats(&info.schema.name, Consistency::Eventually)?;
    // Milvus's index covers sealed segments; growing rows are searched without it.
    let built = stats.indexed_segments >= stats.sealed_segments;
    let total_rows = stats.live_rows as i64;
    let pending = if built { 0 } else { (stats.live_rows.saturating_sub(stats.growing_rows)) as i64 };
    let index_descriptions = found
        .into_iter()
        .map(|index| {
            let mut params = index.params.clone();
            if let Some(metric) = metric_of(&info, &index.field) {
                params.retain(|p| p.key != "metric_type");
                params.push(KeyValuePair { key: "metric_type".into(), value: schema::metric_name(metric).into() });
            }
            if !params.iter().any(|p| p.key == "index_type") {
                params.push(KeyValuePair { key: "index_type".into(), value: "AUTOINDEX".into() });
            }
            pb::IndexDescription {
                index_name: index.name,
                index_id: index.id,
                params,
                field_name: index.field,
                indexed_rows: total_rows - pending,
                total_rows,
                state: if built { IndexState::Finished } else { IndexState::InProgress } as i32,
                index_state_fail_reason: String::new(),
                pending_index_rows: pending,
            }
        })
        .collect();
    Ok(pb::DescribeIndexResponse { status: Some(status::ok()), index_descriptions })
}

fn index_not_found(collection: &str, index: &str) -> Refusal {
    Refusal(status::failure(
        status::code::INDEX_NOT_FOUND,
        ErrorCode::IndexNotExist,
        format!("index not found[collection={}][indexName={}]", quote(collection), quote(index)),
    ))
}

pub(super) fn drop_index(call: &Call, body: pb::DropIndexRequest) -> Answer<common::Status> {
    let info = collection(call, &body.collection_name)?;
    let state = call.state.get(info.id);
    let all = indexes(call, &info);
    let (dropped, kept): (Vec<_>, Vec<_>) = all.into_iter().partition(|i| {
        (body.index_name.is_empty() || i.name == body.index_name)
            && (body.field_name.is_empty() || i.field == body.field_name)
    });
    if dropped.is_empty() {
        return Err(index_not_found(&body.collection_name, &body.index_name));
    }
    if state.loaded && dropped.iter().any(|i| metric_of(&info, &i.field).is_some()) {
        return Err(Refusal(status::failure(
            status::code::UNEXPECTED,
            ErrorCode::UnexpectedError,
            format!(
                "index cannot be dropped, collection `{}` is loaded: release it first",
                quote(&body.collection_name)
            ),
        )));
    }
    call.state.update(info.id, |c| c.indexes = Some(kept));
    Ok(status::ok())
}

pub(super) fn load_collection(call: &Call, body: pb::LoadCollectionRequest) -> Answer<common::Status> {
    let info = collection(call, &body.collection_name)?;
    let indexed = indexes(call, &info);
    let unindexed: Vec<&str> = info
        .schema
        .fields
        .iter()
        .filter(|f| f.data_type.is_vector() && !indexed.iter().any(|i| i.field == f.name))
        .map(|f| f.name.as_str())
        .collect();
    if !unindexed.is_empty() {
        return Err(Refusal(status::failure(
            status::code::INDEX_NOT_FOUND,
            ErrorCode::IndexNotExist,
            format!("there is no vector index on field: [{}], please create index firstly", unindexed.join(", ")),
        )));
    }
    call.state.update(info.id, |c| c.loaded = true);
    Ok(status::ok())
}

pub(super) fn flush(call: &Call, body: pb::FlushRequest) -> Answer<pb::FlushResponse> {
    let mut response =
        pb::FlushResponse { status: Some(status::ok()), db_name: super::DEFAULT_DATABASE.into(), ..Default::default() };
    for name in body.collection_names {
        let flush_ts = call.engine.flush(&name)?;
        response.coll_seg_i_ds.insert(name.clone(), LongArray::default());
        response.flush_coll_seg_i_ds.insert(name.clone(), LongArray::default());
        response.coll_seal_times.insert(name.clone(), (physical_ms(flush_ts) / 1000) as i64);
        response.coll_flush_ts.insert(name, flush_ts);
    }
    Ok(response)
}
