//! Writes and reads, as Milvus clients make them.

use std::collections::BTreeMap;

use vectorflow::{
    CollectionSchema, Consistency, Error, GroupBy, Pk, QueryOptions, SearchHit, SearchOptions, Timestamp, Value,
    WriteResult,
};
use vectorflow_proto::milvus::pb::common::{ConsistencyLevel, ErrorCode};
use vectorflow_proto::milvus::pb::milvus as pb;
use vectorflow_proto::milvus::pb::schema::{
    self as schema_pb, IDs, LongArray, ScalarField, StringArray, field_data::Field as Payload, i_ds::IdField,
    scalar_field::Data as Scalars,
};
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

pub(super) fn write(
    call: &Call,
    collection: &str,
    columns_data: Vec<schema_pb::FieldData>,
    num_rows: u32,
    upsert: bool,
) -> Answer<pb::MutationResult> {
    let _no_recreate_meanwhile = call.state.writes.read().map_err(|_| Error::Shutdown)?;
    let schema = call.engine.describe_collection(collection)?.schema;
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
    let written = call.engine.delete_by_filter(&body.collection_name, &expr)?;
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
    let (_, _, metric) = schema.vector_field(params.anns_field.as_deref())?;
    if let Some(asked) = params.metric
        && asked != metric
    {
        return Err(Error::argument(
            "metric_type",
            format!(
                "metric type not match: the field is indexed with {}, the search asks for {}",
                vectorflow_proto::milvus::schema::metric_name(metric),
                vectorflow_proto::milvus::schema::metric_name(asked)
            ),
        )
        .into());
    }
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
        consistency: read.consistency,
        as_of: read.as_of,
        guarantee_ts: read.guarantee_ts,
        timeout: call.timeout,
    };
    let result = call.engine.search(&body.collection_name, &queries, &options)?;
    let mut topks = Vec::with_capacity(result.hits.len());
    let mut pks = Vec::new();
    let mut scores = Vec::new();
    let mut rows: Vec<&BTreeMap<String, Value>> = Vec::new();
    let mut groups: Vec<BTreeMap<String, Value>> = Vec::new();
    for hits in &result.hits {
        let page = page_of(hits, params.offset, params.limit);
        topks.push(page.len() as i64);
        for hit in page {
            pks.push(hit.pk.clone());
            scores.push(hit.score);
            rows.push(&hit.fields);
            if let (Some(group_by), Some(value)) = (&params.group_by, &hit.group) {
                groups.push(BTreeMap::from([(group_by.field.clone(), value.clone())]));
            }
        }
    }
    let fields_data = fields
        .iter()
        .map(|name| columns::rows_to_field_data(schema, name, &rows))
        .collect::<vectorflow::Result<Vec<_>>>()?;
    let group_by_field_value = match &params.group_by {
        Some(group_by) => {
            let group_rows: Vec<&BTreeMap<String, Value>> = groups.iter().collect();
            Some(columns::rows_to_field_data(schema, &group_by.field, &group_rows)?)
        }
        None => None,
    };
    Ok(pb::SearchResults {
        status: Some(status::ok()),
        results: Some(schema_pb::SearchResultData {
            num_queries: queries.len() as i64,
            top_k: params.limit as i64,
            fields_data,
            scores,
            ids: Some(ids(&pks)),
            topks,
            output_fields: listed_output_fields(schema, &body.output_fields),
            primary_field_name: schema.primary().name.clone(),
            group_by_field_value,
            ..Default::default()
        }),
        collection_name: body.collection_name,
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
