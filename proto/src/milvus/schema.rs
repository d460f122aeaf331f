//! Collection schemas between Milvus's `schema.CollectionSchema` and ours.
//!
//! Milvus fixes a vector field's metric when its index is created, we when
//! the collection is; a field's `index_params` may carry `metric_type`, and
//! otherwise the collection starts with Milvus's default, COSINE (the Milvus
//! service recreates an empty collection when `CreateIndex` names another).

use prost::Message;
use vectorflow_core::{
    CollectionSchema, DYNAMIC_FIELD_NAME, DataType, Error, FieldSchema, Metric, Result, Value, quote,
};

use super::pb::common::{ConsistencyLevel, KeyValuePair};
use super::pb::schema::{self as pb, value_field::Data as DefaultData};
use super::{metric_param, param};

/// The metric a collection gets when nothing names one (Milvus's default).
pub const DEFAULT_METRIC: Metric = Metric::COSINE;
/// The collection property that keeps Milvus's consistency level.
pub const CONSISTENCY_PROPERTY: &str = "milvus.consistency_level";
/// Field ids start here, as in Milvus (0 and 1 are its system fields).
pub const FIRST_FIELD_ID: i64 = 100;

/// Milvus's data type of one of our fields.
pub fn data_type_to_milvus(data_type: &DataType) -> pb::DataType {
    match data_type {
        DataType::Bool => pb::DataType::Bool,
        DataType::Int8 => pb::DataType::Int8,
        DataType::Int16 => pb::DataType::Int16,
        DataType::Int32 => pb::DataType::Int32,
        DataType::Int64 => pb::DataType::Int64,
        DataType::Float => pb::DataType::Float,
        DataType::Double => pb::DataType::Double,
        DataType::VarChar { .. } => pb::DataType::VarChar,
        DataType::Json => pb::DataType::Json,
        DataType::FloatVector { .. } => pb::DataType::FloatVector,
    }
}

pub fn metric_name(metric: Metric) -> &'static str {
    match metric {
        Metric::L2 => "L2",
        Metric::IP => "IP",
        Metric::COSINE => "COSINE",
    }
}

/// A positive integer type parameter (`dim`, `max_length`) of field `name`.
fn positive(name: &str, params: &[KeyValuePair], key: &str) -> Result<usize> {
    let text = param(params, key).ok_or_else(|| Error::field(name, format!("type_params has no `{key}`")))?;
    text.trim()
        .parse::<usize>()
        .ok()
        .filter(|n| *n > 0)
        .ok_or_else(|| Error::field(name, format!("`{key}` = {} is not a positive integer", quote(text))))
}

/// The consistency level a collection was created with.
pub fn consistency_of(schema: &CollectionSchema) -> ConsistencyLevel {
    schema
        .properties
        .get(CONSISTENCY_PROPERTY)
        .and_then(|name| ConsistencyLevel::from_str_name(name))
        .unwrap_or(ConsistencyLevel::Bounded)
}

/// Our schema for a `CreateCollection`: `schema_bytes` is the serialized
/// `schema.CollectionSchema`, `name` the request's collection name.
pub fn schema_from_milvus(
    name: &str,
    schema_bytes: &[u8],
    consistency: i32,
    properties: &[KeyValuePair],
    num_partitions: i64,
) -> Result<CollectionSchema> {
    let milvus = pb::CollectionSchema::decode(schema_bytes)
        .map_err(|e| Error::argument("schema", format!("not a serialized CollectionSchema: {e}")))?;
    if !milvus.functions.is_empty() {
        return Err(Error::argument("schema.functions", "functions (BM25, embeddings, rerankers) are not supported"));
    }
    let mut fields = Vec::with_capacity(milvus.fields.len() + 1);
    for field in milvus.fields {
        // A client that lists the dynamic field itself gets it from the flag below.
        if field.is_dynamic {
            continue;
        }
        let mut ours = field_from_milvus(field)?;
        if ours.is_primary && milvus.auto_id {
            ours.auto_id = true;
        }
        fields.push(ours);
    }
    if milvus.enable_dynamic_field {
        fields.push(FieldSchema::dynamic());
    }
    let level = ConsistencyLevel::try_from(consistency)
        .map_err(|_| Error::argument("consistency_level", format!("unknown level {consistency}")))?;
    let mut schema = CollectionSchema::new(name, fields);
    schema.description = milvus.description;
    for pair in properties.iter().chain(&milvus.properties) {
        schema.properties.insert(pair.key.clone(), pair.value.clone());
    }
    schema.properties.insert(CONSISTENCY_PROPERTY.into(), level.as_str_name().into());
    // Milvus reads `num_partitions` only for a partition key.
    if schema.fields.iter().any(|f| f.is_partition_key) && num_partitions > 0 {
        schema.num_partitions = Some(usize::try_from(num_partitions).unwrap_or(usize::MAX));
    }
    schema.validate()?;
    Ok(schema)
}

fn field_from_milvus(field: pb::FieldSchema) -> Result<FieldSchema> {
    let name = quote(&field.name).into_owned();
    let data_type = match pb::DataType::try_from(field.data_type) {
        Ok(pb::DataType::Bool) => DataType::Bool,
        Ok(pb::DataType::Int8) => DataType::Int8,
        Ok(pb::DataType::Int16) => DataType::Int16,
        Ok(pb::DataType::Int32) => DataType::Int32,
        Ok(pb::DataType::Int64) => DataType::Int64,
        Ok(pb::DataType::Float) => DataType::Float,
        Ok(pb::DataType::Double) => DataType::Double,
        Ok(pb::DataType::VarChar) => {
            DataType::VarChar { max_length: positive(&name, &field.type_params, "max_length")? }
        }
        Ok(pb::DataType::Json) => DataType::Json,
        Ok(pb::DataType::FloatVector) => {
            let metric = metric_param(&field.index_params)?.unwrap_or(DEFAULT_METRIC);
            DataType::FloatVector { dim: positive(&name, &field.type_params, "dim")?, metric }
        }
        Ok(other) => {
            return Err(Error::field(&name, format!("data type {} is not supported", other.as_str_name())));
        }
        Err(_) => return Err(Error::field(&name, format!("unknown data type {}", field.data_type))),
    };
    let default_value = match field.default_value.and_then(|v| v.data) {
        None => None,
        Some(value) => Some(default_from_milvus(&name, &data_type, value)?),
    };
    Ok(FieldSchema {
        name: field.name,
        data_type,
        nullable: field.nullable,
        default_value,
        is_primary: field.is_primary_key,
        auto_id: field.auto_id,
        is_dynamic: false,
        description: field.description,
        is_partition_key: field.is_partition_key,
    })
}

fn default_from_milvus(name: &str, data_type: &DataType, value: DefaultData) -> Result<Value> {
    let value = match value {
        DefaultData::BoolData(b) => Value::Bool(b),
        DefaultData::IntData(i) => Value::Int(i64::from(i)),
        DefaultData::LongData(i) => Value::Int(i),
        DefaultData::FloatData(f) => Value::Float(f64::from(f)),
        DefaultData::DoubleData(f) => Value::Float(f),
        DefaultData::StringData(s) => Value::String(s),
        DefaultData::BytesData(b) => {
            Value::String(String::from_utf8(b).map_err(|_| Error::field(name, "the default value is not UTF-8"))?)
        }
    };
    value.check_type(name, data_type)?;
    Ok(value)
}

fn default_to_milvus(value: &Value, data_type: &DataType) -> Option<pb::ValueField> {
    let data = match (data_type, value) {
        (DataType::Bool, Value::Bool(b)) => DefaultData::BoolData(*b),
        (DataType::Int8 | DataType::Int16 | DataType::Int32, Value::Int(i)) => {
            DefaultData::IntData(i32::try_from(*i).ok()?)
        }
        (DataType::Int64, Value::Int(i)) => DefaultData::LongData(*i),
        (DataType::Float, v) => DefaultData::FloatData(v.as_f64()? as f32),
        (DataType::Double, v) => DefaultData::DoubleData(v.as_f64()?),
        (DataType::VarChar { .. } | DataType::Json, Value::String(s)) => DefaultData::StringData(s.clone()),
        _ => return None,
    };
    Some(pb::ValueField { data: Some(data) })
}

/// Field `index` of `schema` as Milvus describes it.
pub fn field_to_milvus(index: usize, field: &FieldSchema) -> pb::FieldSchema {
    let mut type_params = Vec::new();
    match &field.data_type {
        DataType::FloatVector { dim, .. } => {
            type_params.push(KeyValuePair { key: "dim".into(), value: dim.to_string() });
        }
        DataType::VarChar { max_length } => {
            type_params.push(KeyValuePair { key: "max_length".into(), value: max_length.to_string() });
        }
        _ => {}
    }
    pb::FieldSchema {
        field_id: FIRST_FIELD_ID + index as i64,
        name: field.name.clone(),
        is_primary_key: field.is_primary,
        description: field.description.clone(),
        data_type: data_type_to_milvus(&field.data_type) as i32,
        type_params,
        auto_id: field.auto_id,
        default_value: field.default_value.as_ref().and_then(|v| default_to_milvus(v, &field.data_type)),
        is_dynamic: field.is_dynamic,
        nullable: field.nullable,
        is_partition_key: field.is_partition_key,
        ..Default::default()
    }
}

/// Our schema as Milvus describes it. The dynamic field is left out, as
/// Milvus does: clients see `enable_dynamic_field` instead.
pub fn schema_to_milvus(schema: &CollectionSchema) -> pb::CollectionSchema {
    pb::CollectionSchema {
        name: schema.name.clone(),
        description: schema.description.clone(),
        fields: schema
            .fields
            .iter()
            .enumerate()
            .filter(|(_, f)| !f.is_dynamic)
            .map(|(i, f)| field_to_milvus(i, f))
            .collect(),
        enable_dynamic_field: schema.fields.iter().any(|f| f.is_dynamic && f.name == DYNAMIC_FIELD_NAME),
        properties: user_properties(schema),
        ..Default::default()
    }
}

/// The properties a client set (ours, such as the consistency level, left out).
pub fn user_properties(schema: &CollectionSchema) -> Vec<KeyValuePair> {
    schema
        .properties
        .iter()
        .filter(|(k, _)| k.as_str() != CONSISTENCY_PROPERTY)
        .map(|(k, v)| KeyValuePair { key: k.clone(), value: v.clone() })
        .collect()
}

/// The same schema with vector field `field` scored by `metric`.
pub fn with_metric(schema: &CollectionSchema, field: &str, metric: Metric) -> Result<CollectionSchema> {
    let mut changed = schema.clone();
    let (index, _) = schema.field(field)?;
    match &mut changed.fields[index].data_type {
        DataType::FloatVector { metric: m, .. } => *m = metric,
        _ => return Err(Error::field(field, "is not a float_vector field: only vector fields take a metric")),
    }
    Ok(changed)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn kv(key: &str, value: &str) -> KeyValuePair {
        KeyValuePair { key: key.into(), value: value.into() }
    }

    fn quick_schema() -> pb::CollectionSchema {
        pb::CollectionSchema {
            name: "qs".into(),
            fields: vec![
                pb::FieldSchema {
                    name: "id".into(),
                    is_primary_key: true,
                    data_type: pb::DataType::Int64 as i32,
                    ..Default::default()
                },
                pb::FieldSchema {
                    name: "vector".into(),
                    data_type: pb::DataType::FloatVector as i32,
                    type_params: vec![kv("dim", "8")],
                    ..Default::default()
                },
                pb::FieldSchema {
                    name: "title".into(),
                    data_type: pb::DataType::VarChar as i32,
                    type_params: vec![kv("max_length", "64")],
                    nullable: true,
                    description: "the title".into(),
                    ..Default::default()
                },
                pb::FieldSchema {
                    name: "year".into(),
                    data_type: pb::DataType::Int32 as i32,
                    default_value: Some(pb::ValueField { data: Some(DefaultData::IntData(2000)) }),
                    ..Default::default()
                },
            ],
            enable_dynamic_field: true,
            ..Default::default()
        }
    }

    #[test]
    fn a_quick_schema_converts_both_ways() {
        let bytes = quick_schema().encode_to_vec();
        let ours = schema_from_milvus("qs", &bytes, ConsistencyLevel::Strong as i32, &[], 0).unwrap();
        assert_eq!(ours.fields.len(), 5);
        assert_eq!(ours.fields[1].data_type, DataType::FloatVector { dim: 8, metric: DEFAULT_METRIC });
        assert!(ours.fields[4].is_dynamic);
        assert_eq!(consistency_of(&ours), ConsistencyLevel::Strong);
        let back = schema_to_milvus(&ours);
        assert!(back.enable_dynamic_field);
        let ids: Vec<i64> = back.fields.iter().map(|f| f.field_id).collect();
        assert_eq!(ids, vec![100, 101, 102, 103]);
        assert_eq!(back.fields[1].type_params, vec![kv("dim", "8")]);
        assert_eq!(back.fields[2].type_params, vec![kv("max_length", "64")]);
        assert!(back.fields[2].nullable);
        assert_eq!(back.fields[2].description, "the title");
        assert_eq!(back.fields[3].default_value, Some(pb::ValueField { data: Some(DefaultData::IntData(2000)) }));
        assert!(user_properties(&ours).is_empty());
    }

    #[test]
    fn unsupported_fields_are_named() {
        let mut schema = quick_schema();
        schema.fields[2].data_type = pb::DataType::BinaryVector as i32;
        let error = schema_from_milvus("qs", &schema.encode_to_vec(), 0, &[], 0).unwrap_err().to_string();
        assert!(error.contains("title") && error.contains("BinaryVector"), "{error}");
        let mut schema = quick_schema();
        schema.fields[1].type_params.clear();
        let error = schema_from_milvus("qs", &schema.encode_to_vec(), 0, &[], 0).unwrap_err().to_string();
        assert!(error.contains("vector") && error.contains("dim"), "{error}");
        let error = schema_from_milvus("qs", b"\xff\xff", 0, &[], 0).unwrap_err().to_string();
        assert!(error.contains("schema"), "{error}");
    }

    #[test]
    fn a_metric_in_index_params_is_kept() {
        let mut schema = quick_schema();
        schema.fields[1].index_params = vec![kv("metric_type", "L2")];
        let ours = schema_from_milvus("qs", &schema.encode_to_vec(), 0, &[], 0).unwrap();
        assert_eq!(ours.fields[1].data_type, DataType::FloatVector { dim: 8, metric: Metric::L2 });
        let ip = with_metric(&ours, "vector", Metric::IP).unwrap();
        assert_eq!(ip.fields[1].data_type, DataType::FloatVector { dim: 8, metric: Metric::IP });
        assert!(with_metric(&ours, "title", Metric::IP).is_err());
    }

    proptest! {
        #[test]
        fn any_bytes_convert_or_fail_cleanly(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            let _ = schema_from_milvus("c", &bytes, 0, &[], 0);
        }
    }
}
