//! Writes and reads, as Milvus clients make them.

use std::collections::BTreeMap;

use vectorflow::{
    CollectionSchema, Consistency, Error, GroupBy, HybridOptions, Pk, QueryOptions, Ranker, SearchHit, SearchOptions,
    SearchResult, SubSearch, Timestamp, Value, WriteResult,
};
use vectorflow_proto::milvus::pb::common::{ConsistencyLevel, ErrorCode};
use vectorflow_proto::milvus::pb::milvus as pb;
use vectorflow_proto::milvus::pb::schema::{
    self as schema_pb, IDs, LongArray, ScalarField, StringArray, field_data::Field as Payload, i_ds::IdField,
    scalar_field::Data as Scalars,
};
use vectorflow_proto::milvus::request::RankStrategy;
use vectorflow_proto::milvus::{columns, request, status};

use super::{Answer, Call, Refusal};

fn ids(pks: &[Pk]) -> IDs {
    let id_field = if pks.iter().all(|pk| matches!(pk, Pk::Int(_))) {
        IdField::IntId(LongArray {
            data: pks.iter().filter_map(|pk| if let Pk::Int(i) = pk { Some(*i) } else { None }).collect(),
        })
    } else {
        IdField::StrId(StringArray { data: pks.iter().map(|pk| pk.to_string()).collect() })
    };
    IDs { id_field: Some(id_field) }
}

fn mutation(write: &WriteResult) -> pb::MutationResult {
    pb::MutationResult {
        status: Some(status::ok()),
        i_ds: Some(ids(&write.pks)),
        succ_index: (0..write.pks.len() as u32).collect(),
        timestamp: write.ts,
        ..Default::default()
    }
}

/// Where a write goes: the named partition, else the collection's `_default`.
fn write_target(call: &Call, collection: &str, partition: &str) -> Answer<String> {
    Ok(match partition.trim() {
        "" => collection.to_string(),
        partition => call.engine.partition(collection, partition)?,
    })
}

/// The partitions a read covers: those it names (none of them released),
/// or, when it names none, every partition not released.
fn read_partitions(call: &Call, info: &vectorflow::CollectionInfo, named: &[String]) -> Answer<Vec<String>> {
    let released = call.state.get(info.id).released;
    let named: Vec<String> = named.iter().map(|n| n.trim().to_string()).filter(|n| !n.is_empty()).collect();
    if let Some(name) = named.iter().find(|n| released.contains(*n)) {
        return Err(Refusal(status::failure(
            status::code::COLLECTION_NOT_LOADED,
            ErrorCode::UnexpectedError,
            format!("partition not loaded[partition={name}]: call load_partitions first"),
        )));
    }
    if !named.is_empty() || released.is_empty() {
        return Ok(named);
    }
    let loaded: Vec<String> =
        call.engine.list_partitions(&info.schema.name)?.into_iter().filter(|n| !released.contains(n)).collect();
    if loaded.is_empty() {
        return Err(Refusal(status::failure(
            status::code::COLLECTION_NOT_LOADED,
            ErrorCode::UnexpectedError,
            "every partition of the collection is released: call load_partitions first",
        )));
    }
    Ok(loaded)
}

pub(super) fn write(
    call: &Call,
    collection: &str,
    partition: &str,
    columns_data: Vec<schema_pb::FieldData>,
    num_rows: u32,
    upsert: bool,
) -> Answer<pb::MutationResult> {
    let _no_recreate_meanwhile = call.state.writes.read().map_err(|_| Error::Shutdown)?;
    let schema = call.engine.describe_collection(collection)?.schema;
    let collection = write_target(call, collection, partition)?;
    let collection = collection.as_str();
    let batch = columns::columns_to_batch(&schema, columns_data, num_rows)?;
    // Milvus counts the rows sent (a key given twice is written once, the last wins).
    let sent = i64::from(num_rows);
    let succ_index = (0..num_rows).collect();
    if upsert {
        let written = call.engine.upsert(collection, &batch)?;
        Ok(pb::MutationResult { upsert_cnt: sent, succ_index, ..mutation(&written) })
    } else {
        let written = call.engine.insert(collection, &batch)?;
        Ok(pb::MutationResult { insert_cnt: sent, succ_index, ..mutation(&written) })
    }
}

pub(super) fn delete(call: &Call, body: pb::DeleteRequest) -> Answer<pb::MutationResult> {
    let expr = request::fill_templates(&body.expr, &body.expr_template_values)?;
    if expr.trim().is_empty() {
        return Err(
            Error::argument("expr", "a delete needs a filter expression (`id in [1, 2]` or a condition)").into()
        );
    }
    let _no_recreate_meanwhile = call.state.writes.read().map_err(|_| Error::Shutdown)?;
    let target = write_target(call, &body.collection_name, &body.partition_name)?;
    let written = call.engine.delete_by_filter(&target, &expr)?;
    // Milvus (2.3.2 on) answers a delete with its count only: pymilvus
    // returns the keys instead when they are there.
    Ok(pb::MutationResult {
        delete_cnt: written.pks.len() as i64,
        i_ds: None,
        succ_index: Vec::new(),
        ..mutation(&written)
    })
}

/// How a read waits, from the request's level and timestamps.
struct Read {
    consistency: Consistency,
    guarantee_ts: Option<Timestamp>,
    as_of: Option<Timestamp>,
}

fn read(time: request::ReadTime) -> Read {
    let consistency = match time.level {
        ConsistencyLevel::Strong => Consistency::Strong,
        // A client's own writes, when it names them, are always seen.
        _ if time.guarantee_ts.is_some() => Consistency::Session,
        ConsistencyLevel::Eventually => Consistency::Eventually,
        _ => Consistency::Bounded,
    };
    Read { consistency, guarantee_ts: time.guarantee_ts, as_of: time.as_of }
}

/// A search or query on a released collection is refused, as in Milvus.
fn check_loaded(call: &Call, collection: &str) -> Answer<vectorflow::CollectionInfo> {
    let info = call.engine.describe_collection(collection)?;
    if !call.state.get(info.id).loaded {
        return Err(Refusal(status::failure(
            status::code::COLLECTION_NOT_LOADED,
            ErrorCode::UnexpectedError,
            format!(
                "collection not loaded[collection={}]: call load_collection first",
                vectorflow::crates::core::quote(collection)
            ),
        )));
    }
    Ok(info)
}

/// The names an answer lists in `output_fields`: `*` spelled out (with the
/// dynamic field, so a client unpacks all its keys), dynamic keys as asked.
fn listed_output_fields(schema: &CollectionSchema, requested: &[String]) -> Vec<String> {
    // With `*` every field is listed and no dynamic key: a key listed
    // next to `$meta` would make the client keep only that key.
    if requested.iter().any(|name| name.trim() == "*") {
        return schema.fields.iter().map(|f| f.name.clone()).collect();
    }
    let mut listed: Vec<String> = Vec::new();
    for name in requested {
        let name = name.trim().to_string();
        if !listed.contains(&name) {
            listed.push(name);
        }
    }
    listed
}

pub(super) fn search(call: &Call, body: pb::SearchRequest) -> Answer<pb::SearchResults> {
    let info = check_loaded(call, &body.collection_name)?;
    let schema = &info.schema;
    let params = request::search_params(&body.search_params)?;
    let queries = request::query_vectors(&body.placeholder_group, body.nq)?;
    check_metric(schema, &params)?;
    let time = request::read_time(
        body.use_default_consistency,
        body.consistency_level,
        vectorflow_proto::milvus::schema::consistency_of(schema),
        body.guarantee_timestamp,
        if body.travel_timestamp != 0 { body.travel_timestamp } else { params.travel_ts.unwrap_or(0) },
    )?;
    let read = read(time);
    let filter = request::fill_templates(&body.dsl, &body.expr_template_values)?;
    let fields = columns::output_fields(schema, &body.output_fields)?;
    let options = SearchOptions {
        field: params.anns_field.clone(),
        k: params.limit + params.offset,
        ef: params.ef,
        output_fields: fields.clone(),
        filter: (!filter.trim().is_empty()).then_some(filter),
        radius: params.radius,
        range_filter: params.range_filter,
        group_by: params.group_by.as_ref().map(|g| GroupBy { field: g.field.clone(), size: g.size, strict: g.strict }),
        partitions: read_partitions(call, &info, &body.partition_names)?,
        consistency: read.consistency,
        as_of: read.as_of,
        guarantee_ts: read.guarantee_ts,
        timeout: call.timeout,
    };
    let result = call.engine.search(&body.collection_name, &queries, &options)?;
    let page = Page { offset: params.offset, limit: params.limit };
    let group_field = params.group_by.as_ref().map(|g| g.field.as_str());
    search_results(schema, body.collection_name, &body.output_fields, &fields, page, group_field, result)
}

/// `HybridSearch`: each request is a search as `Search` reads it (its
/// `topk` is what it contributes), fused as `rank_params` say.
pub(super) fn hybrid_search(call: &Call, body: pb::HybridSearchRequest) -> Answer<pb::SearchResults> {
    let info = check_loaded(call, &body.collection_name)?;
    let schema = &info.schema;
    if !body.function_score.is_empty() || !body.function_chains.is_empty() {
        return Err(Error::argument(
            "function_score",
            "function rerankers are not supported; use RRFRanker or WeightedRanker",
        )
        .into());
    }
    let rank = request::rank_params(&body.rank_params)?;
    let mut searches = Vec::with_capacity(body.requests.len());
    for (i, sub) in body.requests.iter().enumerate() {
        let params = request::search_params(&sub.search_params)?;
        if params.group_by.is_some() {
            return Err(
                Error::argument(format!("requests[{i}].group_by_field"), "not supported in a sub-search").into()
            );
        }
        check_metric(schema, &params)?;
        let filter = request::fill_templates(&sub.dsl, &sub.expr_template_values)?;
        searches.push(SubSearch {
            field: params.anns_field,
            queries: request::query_vectors(&sub.placeholder_group, sub.nq)?,
            k: params.limit + params.offset,
            ef: params.ef,
            filter: (!filter.trim().is_empty()).then_some(filter),
            radius: params.radius,
            range_filter: params.range_filter,
        });
    }
    let time = request::read_time(
        body.use_default_consistency,
        body.consistency_level,
        vectorflow_proto::milvus::schema::consistency_of(schema),
        body.guarantee_timestamp,
        body.travel_timestamp,
    )?;
    let read = read(time);
    let fields = columns::output_fields(schema, &body.output_fields)?;
    let ranker = match rank.strategy {
        RankStrategy::Rrf { k } => Ranker::Rrf { k },
        RankStrategy::Weighted { weights, normalize } => Ranker::Weighted { weights, normalize },
    };
    let options = HybridOptions {
        k: rank.limit + rank.offset,
        ranker,
        output_fields: fields.clone(),
        partitions: read_partitions(call, &info, &body.partition_names)?,
        consistency: read.consistency,
        as_of: read.as_of,
        guarantee_ts: read.guarantee_ts,
        timeout: call.timeout,
    };
    let result = call.engine.hybrid_search(&body.collection_name, &searches, &options)?;
    let page = Page { offset: rank.offset, limit: rank.limit };
    search_results(schema, body.collection_name, &body.output_fields, &fields, page, None, result)
}

/// A search names the metric its field is indexed with, or none.
fn check_metric(schema: &CollectionSchema, params: &request::SearchParams) -> Answer<()> {
    let (_, _, metric) = schema.vector_field(params.anns_field.as_deref())?;
    match params.metric {
        Some(asked) if asked != metric => Err(Error::argument(
            "metric_type",
            format!(
                "metric type not match: the field is indexed with {}, the search asks for {}",
                vectorflow_proto::milvus::schema::metric_name(metric),
                vectorflow_proto::milvus::schema::metric_name(asked)
            ),
        )
        .into()),
        _ => Ok(()),
    }
}

/// Which hits of each query an answer carries.
#[derive(Clone, Copy)]
struct Page {
    offset: usize,
    limit: usize,
}

/// A search's answer as Milvus sends it: the page of each query's hits,
/// their keys, scores, output fields and (grouping on `group_field`) groups.
fn search_results(
    schema: &CollectionSchema,
    collection_name: String,
    requested_fields: &[String],
    fields: &[String],
    page: Page,
    group_field: Option<&str>,
    result: SearchResult,
) -> Answer<pb::SearchResults> {
    let mut topks = Vec::with_capacity(result.hits.len());
    let mut pks = Vec::new();
    let mut scores = Vec::new();
    let mut rows: Vec<&BTreeMap<String, Value>> = Vec::new();
    let mut groups: Vec<BTreeMap<String, Value>> = Vec::new();
    for hits in &result.hits {
        let page = page_of(hits, page.offset, page.limit);
        topks.push(page.len() as i64);
        for hit in page {
            pks.push(hit.pk.clone());
            scores.push(hit.score);
            rows.push(&hit.fields);
            if let (Some(field), Some(value)) = (group_field, &hit.group) {
                groups.push(BTreeMap::from([(field.to_string(), value.clone())]));
            }
        }
    }
    let fields_data = fields
        .iter()
        .map(|name| columns::rows_to_field_data(schema, name, &rows))
        .collect::<vectorflow::Result<Vec<_>>>()?;
    let group_by_field_value = match group_field {
        Some(field) => {
            let group_rows: Vec<&BTreeMap<String, Value>> = groups.iter().collect();
            Some(columns::rows_to_field_data(schema, field, &group_rows)?)
        }
        None => None,
    };
    Ok(pb::SearchResults {
        status: Some(status::ok()),
        results: Some(schema_pb::SearchResultData {
            num_queries: result.hits.len() as i64,
            top_k: page.limit as i64,
            fields_data,
            scores,
            ids: Some(ids(&pks)),
            topks,
            output_fields: listed_output_fields(schema, requested_fields),
            primary_field_name: schema.primary().name.clone(),
            group_by_field_value,
            ..Default::default()
        }),
        collection_name,
        session_ts: result.read_ts,
    })
}

/// One query's page of hits: `limit` after `offset`, counted in hits, or
/// in groups for a grouping search (its hits come group after group).
fn page_of(hits: &[SearchHit], offset: usize, limit: usize) -> &[SearchHit] {
    if hits.first().is_none_or(|hit| hit.group.is_none()) {
        let start = offset.min(hits.len());
        return &hits[start..(start + limit).min(hits.len())];
    }
    // Where each group starts, and the end.
    let mut starts: Vec<usize> = (0..hits.len()).filter(|&i| i == 0 || hits[i].group != hits[i - 1].group).collect();
    starts.push(hits.len());
    let groups = starts.len() - 1;
    let first = offset.min(groups);
    let last = offset.saturating_add(limit).min(groups);
    &hits[starts[first]..starts[last]]
}

/// `count(*)` as the only output field asks for the number of rows; next
/// to other fields it is refused, as in Milvus.
fn is_count(output_fields: &[String]) -> Answer<bool> {
    let counts = output_fields.iter().filter(|f| f.trim().eq_ignore_ascii_case("count(*)")).count();
    match (counts, output_fields.len()) {
        (0, _) => Ok(false),
        (1, 1) => Ok(true),
        _ => Err(Error::argument("output_fields", "count(*) must be the only output field").into()),
    }
}

pub(super) fn query(call: &Call, body: pb::QueryRequest) -> Answer<pb::QueryResults> {
    let info = check_loaded(call, &body.collection_name)?;
    let schema = &info.schema;
    let (limit, offset) = request::query_window(&body.query_params)?;
    let time = request::read_time(
        body.use_default_consistency,
        body.consistency_level,
        vectorflow_proto::milvus::schema::consistency_of(schema),
        body.guarantee_timestamp,
        body.travel_timestamp,
    )?;
    let read = read(time);
    let filter = request::fill_templates(&body.expr, &body.expr_template_values)?;
    let filter = (!filter.trim().is_empty()).then_some(filter);
    let count = is_count(&body.output_fields)?;
    if filter.is_none() && limit.is_none() && !count {
        return Err(Error::argument("expr", "empty expression should be used with limit").into());
    }
    let mut options = QueryOptions {
        filter,
        output_fields: Vec::new(),
        limit,
        offset,
        partitions: read_partitions(call, &info, &body.partition_names)?,
        consistency: read.consistency,
        as_of: read.as_of,
        guarantee_ts: read.guarantee_ts,
        timeout: call.timeout,
    };
    if count {
        let rows = call.engine.count(&body.collection_name, &options)? as i64;
        let column = schema_pb::FieldData {
            r#type: schema_pb::DataType::Int64 as i32,
            field_name: "count(*)".into(),
            field: Some(Payload::Scalars(ScalarField {
                data: Some(Scalars::LongData(LongArray { data: vec![rows] })),
            })),
            ..Default::default()
        };
        return Ok(pb::QueryResults {
            status: Some(status::ok()),
            fields_data: vec![column],
            collection_name: body.collection_name,
            output_fields: vec!["count(*)".into()],
            session_ts: call.engine.now(),
            primary_field_name: schema.primary().name.clone(),
        });
    }
    // The primary key comes back whether asked for or not, as in Milvus.
    let primary = schema.primary().name.clone();
    let mut fields = vec![primary.clone()];
    for name in columns::output_fields(schema, &body.output_fields)? {
        if name != primary {
            fields.push(name);
        }
    }
    options.output_fields = fields.clone();
    let rows = call.engine.query(&body.collection_name, &options)?;
    let refs: Vec<&BTreeMap<String, Value>> = rows.iter().collect();
    let fields_data = fields
        .iter()
        .map(|name| columns::rows_to_field_data(schema, name, &refs))
        .collect::<vectorflow::Result<Vec<_>>>()?;
    let mut listed = listed_output_fields(schema, &body.output_fields);
    if !listed.contains(&primary) {
        listed.insert(0, primary.clone());
    }
    Ok(pb::QueryResults {
        status: Some(status::ok()),
        fields_data,
        collection_name: body.collection_name,
        output_fields: listed,
        session_ts: call.engine.now(),
        primary_field_name: primary,
    })
}
