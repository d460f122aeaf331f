//! The `vectorflow.v1` gRPC API: generated tonic/prost code, the descriptor
//! set for server reflection, and conversions between wire messages and the
//! engine's types. Every conversion from the wire checks its input and names
//! the field in its error; nothing here panics on what a client sends.

use std::collections::BTreeMap;
use std::sync::Arc;

use arrow::array::{Array, FixedSizeListArray};
use arrow::array::{
    ArrayRef, BooleanArray, Float32Array, Float64Array, Int64Array, RecordBatch, RecordBatchOptions, StringArray,
};
use arrow::buffer::NullBuffer;
use arrow::datatypes::{Field, Schema};
use vectorflow_core::batch::{IpcBatch, check_ipc_stream, vector_array};
use vectorflow_core::value::value_from_json;
use vectorflow_core::{CollectionSchema, DataType, Error, FieldSchema, Metric, Pk, Result, Value, quote};

#[allow(clippy::all, missing_docs)]
pub mod v1 {
    tonic::include_proto!("vectorflow.v1");
}

pub mod milvus;

/// The encoded `FileDescriptorSet` of `vectorflow.v1`, for gRPC reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/vectorflow_descriptor.bin"));

use v1::field_data::Values;

// ---- schemas ----

pub fn schema_to_proto(schema: &CollectionSchema) -> v1::CollectionSchema {
    v1::CollectionSchema {
        name: schema.name.clone(),
        description: schema.description.clone(),
        fields: schema.fields.iter().map(field_to_proto).collect(),
        num_partitions: schema.num_partitions.map_or(0, |n| n as u32),
    }
}

fn field_to_proto(field: &FieldSchema) -> v1::FieldSchema {
    let (data_type, dim, metric, max_length) = match &field.data_type {
        DataType::Bool => (v1::DataType::Bool, 0, v1::Metric::Unspecified, 0),
        DataType::Int8 => (v1::DataType::Int8, 0, v1::Metric::Unspecified, 0),
        DataType::Int16 => (v1::DataType::Int16, 0, v1::Metric::Unspecified, 0),
        DataType::Int32 => (v1::DataType::Int32, 0, v1::Metric::Unspecified, 0),
        DataType::Int64 => (v1::DataType::Int64, 0, v1::Metric::Unspecified, 0),
        DataType::Float => (v1::DataType::Float, 0, v1::Metric::Unspecified, 0),
        DataType::Double => (v1::DataType::Double, 0, v1::Metric::Unspecified, 0),
        DataType::VarChar { max_length } => (v1::DataType::Varchar, 0, v1::Metric::Unspecified, *max_length as u32),
        DataType::Json => (v1::DataType::Json, 0, v1::Metric::Unspecified, 0),
        DataType::FloatVector { dim, metric } => {
            let metric = match metric {
                Metric::L2 => v1::Metric::L2,
                Metric::IP => v1::Metric::Ip,
                Metric::COSINE => v1::Metric::Cosine,
            };
            (v1::DataType::FloatVector, *dim as u32, metric, 0)
        }
    };
    v1::FieldSchema {
        name: field.name.clone(),
        data_type: data_type as i32,
        dim,
        metric: metric as i32,
        max_length,
        nullable: field.nullable,
        is_primary: field.is_primary,
        auto_id: field.auto_id,
        default_json: field.default_value.as_ref().map(|v| default_json(&field.data_type, v)).unwrap_or_default(),
        is_dynamic: field.is_dynamic,
        description: field.description.clone(),
        is_partition_key: field.is_partition_key,
    }
}

/// A default as the JSON text `field_from_proto` reads back: a JSON field's
/// value already is JSON text, so it is sent as it is, not as a JSON string.
fn default_json(data_type: &DataType, value: &Value) -> String {
    match (data_type, value) {
        (DataType::Json, Value::String(text)) => text.clone(),
        _ => value.to_json().to_string(),
    }
}

pub fn schema_from_proto(schema: v1::CollectionSchema) -> Result<CollectionSchema> {
    let fields = schema.fields.into_iter().map(field_from_proto).collect::<Result<Vec<_>>>()?;
    Ok(CollectionSchema {
        name: schema.name,
        description: schema.description,
        fields,
        properties: Default::default(),
        num_partitions: (schema.num_partitions != 0).then_some(schema.num_partitions as usize),
    })
}

fn field_from_proto(field: v1::FieldSchema) -> Result<FieldSchema> {
    // The name is checked with the schema, after this: quote it so an error
    // here does not echo a name of any length.
    let name = quote(&field.name).into_owned();
    // An enum value this API does not define is a client error, not a
    // default: prost keeps unknown values as they came.
    let metric = v1::Metric::try_from(field.metric)
        .map_err(|_| Error::field(&name, format!("unknown metric {}: expected L2, IP or COSINE", field.metric)))?;
    let data_type = match v1::DataType::try_from(field.data_type) {
        Ok(v1::DataType::Bool) => DataType::Bool,
        Ok(v1::DataType::Int8) => DataType::Int8,
        Ok(v1::DataType::Int16) => DataType::Int16,
        Ok(v1::DataType::Int32) => DataType::Int32,
        Ok(v1::DataType::Int64) => DataType::Int64,
        Ok(v1::DataType::Float) => DataType::Float,
        Ok(v1::DataType::Double) => DataType::Double,
        Ok(v1::DataType::Varchar) => DataType::VarChar { max_length: field.max_length as usize },
        Ok(v1::DataType::Json) => DataType::Json,
        Ok(v1::DataType::FloatVector) => {
            let metric = match metric {
                v1::Metric::L2 => Metric::L2,
                v1::Metric::Ip => Metric::IP,
                v1::Metric::Cosine => Metric::COSINE,
                v1::Metric::Unspecified => {
                    return Err(Error::field(&name, "a float_vector field needs a metric: L2, IP or COSINE"));
                }
            };
            DataType::FloatVector { dim: field.dim as usize, metric }
        }
        Ok(v1::DataType::Unspecified) => return Err(Error::field(&name, "data_type is not set")),
        Err(_) => return Err(Error::field(&name, format!("unknown data_type {}", field.data_type))),
    };
    let default_value = if field.default_json.trim().is_empty() {
        None
    } else {
        let json: serde_json::Value = serde_json::from_str(&field.default_json)
            .map_err(|e| Error::field(&name, format!("default_json is not JSON: {e}")))?;
        Some(value_from_json(&name, &data_type, json)?)
    };
    Ok(FieldSchema {
        name: field.name,
        data_type,
        nullable: field.nullable,
        default_value,
        is_primary: field.is_primary,
        auto_id: field.auto_id,
        is_dynamic: field.is_dynamic,
        description: field.description,
        is_partition_key: field.is_partition_key,
    })
}

// ---- keys ----

pub fn pks_to_proto(pks: &[Pk]) -> v1::PrimaryKeys {
    use v1::primary_keys::Keys;
    let keys = if pks.iter().all(|pk| matches!(pk, Pk::Int(_))) {
        Keys::IntKeys(v1::IntValues {
            values: pks.iter().filter_map(|pk| if let Pk::Int(v) = pk { Some(*v) } else { None }).collect(),
        })
    } else {
        Keys::StrKeys(v1::StringValues {
            values: pks
                .iter()
                .map(|pk| match pk {
                    Pk::Int(v) => v.to_string(),
                    Pk::Str(s) => s.clone(),
                })
                .collect(),
        })
    };
    v1::PrimaryKeys { keys: Some(keys) }
}

pub fn pks_from_proto(keys: Option<v1::PrimaryKeys>) -> Result<Vec<Pk>> {
    use v1::primary_keys::Keys;
    match keys.and_then(|k| k.keys) {
        Some(Keys::IntKeys(ints)) => Ok(ints.values.into_iter().map(Pk::Int).collect()),
        Some(Keys::StrKeys(strings)) => Ok(strings.values.into_iter().map(Pk::Str).collect()),
        None => Err(Error::argument("keys", "no primary keys given")),
    }
}

// ---- vectors ----

/// Packs vectors of one dimension as little-endian f32.
pub fn pack_vectors(vectors: &[Vec<f32>]) -> v1::VectorValues {
    let dim = vectors.first().map_or(0, Vec::len);
    let data = vectors.iter().flat_map(|v| v.iter().flat_map(|x| x.to_le_bytes())).collect();
    v1::VectorValues { dim: dim as u32, data }
}

/// The flat f32 values of packed vectors, checked against `dim`.
pub fn unpack_floats(argument: &str, vectors: &v1::VectorValues) -> Result<Vec<f32>> {
    let dim = vectors.dim as usize;
    if dim == 0 {
        return Err(Error::argument(argument, "dim is 0"));
    }
    if !vectors.data.len().is_multiple_of(4 * dim) {
        return Err(Error::argument(
            argument,
            format!("{} bytes is not a whole number of {dim}-dimensional f32 vectors", vectors.data.len()),
        ));
    }
    Ok(vectors.data.chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect())
}

pub fn unpack_vectors(argument: &str, vectors: &v1::VectorValues) -> Result<Vec<Vec<f32>>> {
    let floats = unpack_floats(argument, vectors)?;
    Ok(floats.chunks_exact(vectors.dim as usize).map(<[f32]>::to_vec).collect())
}

// ---- rows as columns ----

/// A write's columns as an Arrow batch (types are brought to the schema's
/// canonical ones, and checked, by the engine's write validation).
pub fn columns_to_batch(columns: Vec<v1::FieldData>) -> Result<RecordBatch> {
    let mut fields = Vec::with_capacity(columns.len());
    let mut arrays: Vec<ArrayRef> = Vec::with_capacity(columns.len());
    let mut rows: Option<(usize, String)> = None;
    for column in columns {
        // Column names are checked against the schema later; errors here
        // quote them so a name of any length stays a short message.
        let name = quote(&column.name).into_owned();
        let valid = |i: usize| column.nulls.get(i).is_none_or(|null| !null);
        let array: ArrayRef = match column.values {
            Some(Values::Bools(v)) => {
                Arc::new(BooleanArray::from_iter(v.values.iter().enumerate().map(|(i, x)| valid(i).then_some(*x))))
            }
            Some(Values::Ints(v)) => {
                Arc::new(Int64Array::from_iter(v.values.iter().enumerate().map(|(i, x)| valid(i).then_some(*x))))
            }
            Some(Values::Floats(v)) => {
                Arc::new(Float32Array::from_iter(v.values.iter().enumerate().map(|(i, x)| valid(i).then_some(*x))))
            }
            Some(Values::Doubles(v)) => {
                Arc::new(Float64Array::from_iter(v.values.iter().enumerate().map(|(i, x)| valid(i).then_some(*x))))
            }
            Some(Values::Strings(v)) => Arc::new(StringArray::from_iter(
                v.values.iter().enumerate().map(|(i, x)| valid(i).then_some(x.as_str())),
            )),
            Some(Values::Vectors(v)) => {
                with_nulls(vector_array(v.dim as usize, unpack_floats(&name, &v)?)?, &column.nulls)
            }
            None => return Err(Error::field(&name, "the column carries no values")),
        };
        if !column.nulls.is_empty() && column.nulls.len() != array.len() {
            return Err(Error::field(&name, format!("{} null flags for {} values", column.nulls.len(), array.len())));
        }
        match &rows {
            Some((n, first)) if *n != array.len() => {
                return Err(Error::field(&name, format!("{} rows, but column `{first}` has {n}", array.len())));
            }
            Some(_) => {}
            None => rows = Some((array.len(), name.clone())),
        }
        fields.push(Field::new(column.name, array.data_type().clone(), true));
        arrays.push(array);
    }
    let options = RecordBatchOptions::new().with_row_count(Some(rows.map_or(0, |(n, _)| n)));
    Ok(RecordBatch::try_new_with_options(Arc::new(Schema::new(fields)), arrays, &options)?)
}

/// A vector column with the rows `nulls` flags as null, so the write
/// validation sees (and refuses, vectors are never nullable) the nulls a
/// client sent instead of the zeros packed in their place. A count of flags
/// other than the rows is left for the caller's length check.
fn with_nulls(array: ArrayRef, nulls: &[bool]) -> ArrayRef {
    if !nulls.contains(&true) || nulls.len() != array.len() {
        return array;
    }
    let Some(list) = array.as_any().downcast_ref::<FixedSizeListArray>() else { return array };
    let (field, size, values, _) = list.clone().into_parts();
    let validity = NullBuffer::from_iter(nulls.iter().map(|null| !null));
    match FixedSizeListArray::try_new(field, size, values, Some(validity)) {
        Ok(list) => Arc::new(list),
        Err(_) => array,
    }
}

/// The batches of an Arrow IPC stream, concatenated. The stream's framing is
/// checked against its length before Arrow's reader allocates anything
/// ([`check_ipc_stream`]), so a few bytes cannot make the reader allocate gigabytes.
pub fn ipc_to_batch(bytes: &[u8]) -> Result<RecordBatch> {
    check_ipc_stream(bytes).map_err(|problem| Error::argument("arrow_ipc", problem))?;
    // Arrow's reader validates what it decodes, but some malformed streams
    // still reach an assertion inside it (a buffer sliced past its end, an
    // overflowing list length). Those are the client's bad bytes, not our
    // failure: answer them as such instead of failing the handler.
    std::panic::catch_unwind(|| decode_ipc(bytes)).unwrap_or_else(|_| {
        Err(Error::argument("arrow_ipc", "the stream is malformed: Arrow's reader could not decode it"))
    })
}

fn decode_ipc(bytes: &[u8]) -> Result<RecordBatch> {
    let reader = arrow::ipc::reader::StreamReader::try_new(std::io::Cursor::new(bytes), None)
        .map_err(|e| Error::argument("arrow_ipc", format!("not an Arrow IPC stream: {e}")))?;
    let schema = reader.schema();
    let batches = reader
        .collect::<std::result::Result<Vec<_>, _>>()
        .map_err(|e| Error::argument("arrow_ipc", format!("bad record batch: {e}")))?;
    arrow::compute::concat_batches(&schema, &batches)
        .map_err(|e| Error::argument("arrow_ipc", format!("the record batches do not concatenate: {e}")))
}

/// One batch as an Arrow IPC stream.
pub fn batch_to_ipc(batch: &RecordBatch) -> Result<Vec<u8>> {
    IpcBatch(batch.clone()).to_bytes()
}

/// Rows (by field name) as columns of `fields`, in that order.
pub fn rows_to_columns(
    schema: &CollectionSchema,
    fields: &[String],
    rows: &[BTreeMap<String, Value>],
) -> Result<Vec<v1::FieldData>> {
    fields
        .iter()
        .map(|name| {
            let (_, field) = schema.field(name)?;
            let values: Vec<&Value> = rows.iter().map(|row| row.get(name).unwrap_or(&Value::Null)).collect();
            Ok(values_to_column(name, &field.data_type, &values))
        })
        .collect()
}

/// One column of values of `data_type`.
pub fn values_to_column(name: &str, data_type: &DataType, values: &[&Value]) -> v1::FieldData {
    let nulls: Vec<bool> = values.iter().map(|v| matches!(v, Value::Null)).collect();
    let nulls = if nulls.iter().any(|n| *n) { nulls } else { Vec::new() };
    let values = match data_type {
        DataType::Bool => {
            Values::Bools(v1::BoolValues { values: values.iter().map(|v| matches!(v, Value::Bool(true))).collect() })
        }
        DataType::Int8 | DataType::Int16 | DataType::Int32 | DataType::Int64 => {
            Values::Ints(v1::IntValues { values: values.iter().map(|v| v.as_i64().unwrap_or(0)).collect() })
        }
        DataType::Float => Values::Floats(v1::FloatValues {
            values: values.iter().map(|v| v.as_f64().unwrap_or(0.0) as f32).collect(),
        }),
        DataType::Double => {
            Values::Doubles(v1::DoubleValues { values: values.iter().map(|v| v.as_f64().unwrap_or(0.0)).collect() })
        }
        DataType::VarChar { .. } | DataType::Json => Values::Strings(v1::StringValues {
            values: values.iter().map(|v| v.as_str().unwrap_or_default().to_string()).collect(),
        }),
        DataType::FloatVector { dim, .. } => {
            let mut data = Vec::with_capacity(values.len() * dim * 4);
            for value in values {
                match value {
                    Value::Vector(v) => data.extend(v.iter().flat_map(|x| x.to_le_bytes())),
                    _ => data.extend(std::iter::repeat_n(0u8, dim * 4)),
                }
            }
            Values::Vectors(v1::VectorValues { dim: *dim as u32, data })
        }
    };
    v1::FieldData { name: name.to_string(), nulls, values: Some(values) }
}

/// Column `i` of a response as values (for clients printing rows).
pub fn column_values(column: &v1::FieldData) -> Vec<Value> {
    let null = |i: usize| column.nulls.get(i).copied().unwrap_or(false);
    let pick = |i: usize, v: Value| if null(i) { Value::Null } else { v };
    match &column.values {
        Some(Values::Bools(v)) => v.values.iter().enumerate().map(|(i, x)| pick(i, Value::Bool(*x))).collect(),
        Some(Values::Ints(v)) => v.values.iter().enumerate().map(|(i, x)| pick(i, Value::Int(*x))).collect(),
        Some(Values::Floats(v)) => {
            v.values.iter().enumerate().map(|(i, x)| pick(i, Value::Float(f64::from(*x)))).collect()
        }
        Some(Values::Doubles(v)) => v.values.iter().enumerate().map(|(i, x)| pick(i, Value::Float(*x))).collect(),
        Some(Values::Strings(v)) => {
            v.values.iter().enumerate().map(|(i, x)| pick(i, Value::String(x.clone()))).collect()
        }
        Some(Values::Vectors(v)) => {
            let dim = (v.dim as usize).max(1);
            v.data
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                .collect::<Vec<f32>>()
                .chunks(dim)
                .enumerate()
                .map(|(i, x)| pick(i, Value::Vector(x.to_vec())))
                .collect()
        }
        None => Vec::new(),
    }
}

/// A consistency level from the wire: a value the API does not define is
/// refused, not read as the default (prost keeps unknown enum values as sent).
pub fn consistency_from_proto(argument: &str, value: i32) -> Result<v1::ConsistencyLevel> {
    v1::ConsistencyLevel::try_from(value).map_err(|_| {
        Error::argument(
            argument,
            format!(
                "unknown consistency level {value}: expected 0 (strong), 1 (session), 2 (bounded) or 3 (eventually)"
            ),
        )
    })
}

pub fn consistency_name(level: v1::ConsistencyLevel) -> &'static str {
    match level {
        v1::ConsistencyLevel::Strong => "strong",
        v1::ConsistencyLevel::Session => "session",
        v1::ConsistencyLevel::Bounded => "bounded",
        v1::ConsistencyLevel::Eventually => "eventually",
    }
}

/// The gRPC status for an engine error: the code a client can react to,
/// and the message that names the field or argument.
pub fn status(error: &Error) -> tonic::Status {
    use tonic::Code;
    let code = match error {
        Error::Field { .. }
        | Error::InvalidArgument { .. }
        | Error::Expression { .. }
        | Error::InvalidSchema(_)
        | Error::Sql(_) => Code::InvalidArgument,
        Error::CollectionNotFound(_) | Error::AliasNotFound(_) => Code::NotFound,
        Error::CollectionExists(_) => Code::AlreadyExists,
        Error::OutsideRetention { .. } => Code::FailedPrecondition,
        Error::FutureTimestamp { .. } => Code::OutOfRange,
        Error::Timeout(_) => Code::DeadlineExceeded,
        Error::Unavailable(_) => Code::Unavailable,
        Error::Shutdown => Code::Unavailable,
        Error::ResourceExhausted { .. } => Code::ResourceExhausted,
        Error::Cancelled => Code::Cancelled,
        Error::CollectionFailed { .. } | Error::ReadOnly(_) => Code::FailedPrecondition,
        Error::Internal(_) | Error::Storage(_) | Error::Corrupt { .. } | Error::Arrow(_) | Error::Io(_) => {
            Code::Internal
        }
    };
    tonic::Status::new(code, capped(error.to_string()))
}

/// The longest status message sent, in bytes. gRPC carries the message in a
/// header, and HTTP/2 peers refuse header blocks over a few KiB: a longer
/// message reaches the client as RESOURCE_EXHAUSTED instead of the problem.
pub const MAX_STATUS_MESSAGE: usize = 512;

/// `message` cut to [`MAX_STATUS_MESSAGE`] bytes (at a character boundary)
/// with its full length: the last line of defence for any error that
/// repeats a client's text at length.
pub fn capped(message: String) -> String {
    if message.len() <= MAX_STATUS_MESSAGE {
        return message;
    }
    let mut end = MAX_STATUS_MESSAGE - 64;
    while !message.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}… (message of {} bytes cut)", &message[..end], message.len())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// An IPC stream of several column types (ints with nulls, strings, vectors).
    fn sample_stream() -> Vec<u8> {
        let columns = vec![
            v1::FieldData {
                name: "id".into(),
                nulls: vec![false, true, false],
                values: Some(Values::Ints(v1::IntValues { values: vec![1, 2, 3] })),
            },
            v1::FieldData {
                name: "s".into(),
                nulls: vec![],
                values: Some(Values::Strings(v1::StringValues { values: vec!["a".into(), "".into(), "ccc".into()] })),
            },
            v1::FieldData {
                name: "v".into(),
                nulls: vec![],
                values: Some(Values::Vectors(pack_vectors(&[vec![1.0, 2.0], vec![3.0, 4.0], vec![5.0, 6.0]]))),
            },
        ];
        batch_to_ipc(&columns_to_batch(columns).unwrap()).unwrap()
    }

    fn column() -> impl Strategy<Value = v1::FieldData> {
        let values = prop_oneof![
            proptest::collection::vec(any::<bool>(), 0..6).prop_map(|v| Values::Bools(v1::BoolValues { values: v })),
            proptest::collection::vec(any::<i64>(), 0..6).prop_map(|v| Values::Ints(v1::IntValues { values: v })),
            proptest::collection::vec(any::<f64>(), 0..6).prop_map(|v| Values::Doubles(v1::DoubleValues { values: v })),
            proptest::collection::vec(".{0,4}", 0..6).prop_map(|v| Values::Strings(v1::StringValues { values: v })),
            (0u32..5, proptest::collection::vec(any::<u8>(), 0..40))
                .prop_map(|(dim, data)| Values::Vectors(v1::VectorValues { dim, data })),
        ];
        ("[a-c]{1,2}", proptest::collection::vec(any::<bool>(), 0..7), proptest::option::of(values))
            .prop_map(|(name, nulls, values)| v1::FieldData { name, nulls, values })
    }

    proptest! {
        /// Whatever a client sends, the conversions answer with a batch or an error.
        #[test]
        fn any_columns_convert_or_fail_cleanly(columns in proptest::collection::vec(column(), 0..4)) {
            if let Ok(batch) = columns_to_batch(columns.clone()) {
                prop_assert_eq!(batch.num_columns(), columns.len());
            }
            for column in &columns {
                let _ = column_values(column);
            }
        }

        /// Whatever bytes a client sends as `arrow_ipc`, decoding answers
        /// with a batch or an error, and never panics.
        #[test]
        fn any_bytes_decode_as_ipc_or_fail_cleanly(bytes in proptest::collection::vec(any::<u8>(), 0..256)) {
            let (result, largest) = allocations::largest_during(|| ipc_to_batch(&bytes));
            // Random bytes are refused by the framing check, which allocates
            // nothing: the reader would allocate whatever the first 4 bytes say.
            prop_assert!(result.is_err());
            prop_assert!(largest < 1 << 16, "{} bytes decoded with an allocation of {}", bytes.len(), largest);
        }

        /// The same for a valid stream with some bytes changed or cut off,
        /// which reaches far deeper into the decoder than random bytes.
        #[test]
        fn damaged_ipc_streams_decode_or_fail_cleanly(
            changes in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..8),
            cut in any::<prop::sample::Index>(),
        ) {
            let mut bytes = sample_stream();
            for (at, byte) in changes {
                let at = at.index(bytes.len());
                bytes[at] = byte;
            }
            let keep = cut.index(bytes.len() + 1);
            let (results, largest) =
                allocations::largest_during(|| [ipc_to_batch(&bytes), ipc_to_batch(&bytes[..keep])]);
            // A panic inside Arrow's reader (caught) may capture a backtrace,
            // which allocates as much as it likes: only decoding counts.
            let panicked = results.iter().any(|result| {
                matches!(result, Err(Error::InvalidArgument { problem, .. }) if problem.contains("could not decode"))
            });
            // Decoding allocates about what it was given, not what it was told.
            prop_assert!(
                panicked || largest < 1 << 20,
                "{} bytes decoded with an allocation of {}",
                bytes.len(),
                largest
            );
        }

        #[test]
        fn any_field_schema_converts_or_fails_cleanly(
            data_type in -2i32..12, metric in -1i32..5, dim in 0u32..5, default_json in ".{0,6}"
        ) {
            let field = v1::FieldSchema { name: "f".into(), data_type, metric, dim, default_json, ..Default::default() };
            let schema = v1::CollectionSchema { name: "c".into(), fields: vec![field], ..Default::default() };
            if let Ok(schema) = schema_from_proto(schema) {
                let back = schema_from_proto(schema_to_proto(&schema));
                prop_assert_eq!(back.ok(), Some(schema));
            }
        }
    }

    /// Records the largest allocation the current thread asks for while
    /// `TRACKING` is set, so a test can show a decoder refuses a length
    /// before allocating it (other test threads are not counted).
    mod allocations {
        use std::alloc::{GlobalAlloc, Layout, System};
        use std::cell::Cell;

        thread_local! {
            static TRACKING: Cell<bool> = const { Cell::new(false) };
            static LARGEST: Cell<usize> = const { Cell::new(0) };
        }

        struct Largest;

        unsafe impl GlobalAlloc for Largest {
            unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
                note(layout.size());
                unsafe { System.alloc(layout) }
            }
            unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
                note(layout.size());
                unsafe { System.alloc_zeroed(layout) }
            }
            unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
                note(new_size);
                unsafe { System.realloc(ptr, layout, new_size) }
            }
            unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
                unsafe { System.dealloc(ptr, layout) }
            }
        }

        fn note(size: usize) {
            // `try_with`: the thread-locals may be gone while a thread exits.
            let _ = TRACKING.try_with(|tracking| {
                if tracking.get() {
                    let _ = LARGEST.try_with(|largest| largest.set(largest.get().max(size)));
                }
            });
        }

        #[global_allocator]
        static GLOBAL: Largest = Largest;

        /// Runs `f` and returns the largest single allocation it made on this thread.
        pub fn largest_during<T>(f: impl FnOnce() -> T) -> (T, usize) {
            LARGEST.with(|largest| largest.set(0));
            TRACKING.with(|tracking| tracking.set(true));
            let result = f();
            TRACKING.with(|tracking| tracking.set(false));
            (result, LARGEST.with(Cell::get))
        }
    }

    #[test]
    fn sixteen_bytes_declaring_two_gib_are_refused_without_allocating_them() {
        let mut hostile = vec![0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x7f];
        hostile.extend([0; 8]);
        let (result, largest) = allocations::largest_during(|| ipc_to_batch(&hostile));
        let error = result.unwrap_err();
        assert!(matches!(error, Error::InvalidArgument { ref argument, .. } if argument == "arrow_ipc"), "{error:?}");
        assert!(error.to_string().contains("metadata of 2147483647 bytes, but 8 bytes follow"), "{error}");
        assert!(largest < 4096, "decoding 16 bytes allocated {largest} bytes at once");
        assert_eq!(status(&error).code(), tonic::Code::InvalidArgument);
    }

    #[test]
    fn a_valid_ipc_stream_still_decodes() {
        let batch = columns_to_batch(vec![v1::FieldData {
            name: "a".into(),
            nulls: vec![],
            values: Some(Values::Ints(v1::IntValues { values: vec![1, 2, 3] })),
        }])
        .unwrap();
        assert_eq!(ipc_to_batch(&batch_to_ipc(&batch).unwrap()).unwrap(), batch);
    }

    #[test]
    fn vector_null_flags_become_nulls() {
        let column = v1::FieldData {
            name: "v".into(),
            nulls: vec![false, true],
            values: Some(Values::Vectors(pack_vectors(&[vec![1.0, 0.0], vec![0.0, 1.0]]))),
        };
        let batch = columns_to_batch(vec![column]).unwrap();
        assert_eq!(batch.column(0).null_count(), 1);
        assert!(batch.column(0).is_null(1) && batch.column(0).is_valid(0));
        // Through the write validation: a vector field is never nullable.
        let schema = CollectionSchema::new(
            "c",
            vec![FieldSchema::int64_primary("id", false), FieldSchema::vector("v", 2, Metric::L2)],
        );
        let ids = v1::FieldData {
            name: "id".into(),
            nulls: vec![],
            values: Some(Values::Ints(v1::IntValues { values: vec![1] })),
        };
        let vectors = v1::FieldData {
            name: "v".into(),
            nulls: vec![true],
            values: Some(Values::Vectors(pack_vectors(&[vec![1.0, 0.0]]))),
        };
        let batch = columns_to_batch(vec![ids, vectors]).unwrap();
        let kind = vectorflow_core::batch::WriteKind::Upsert;
        let error = vectorflow_core::WriteBatch::from_record_batch(&schema, &batch, kind).unwrap_err();
        assert_eq!(error.to_string(), "field `v`: row 0: vector is null");
    }

    #[test]
    fn unknown_enum_values_are_refused() {
        let error = consistency_from_proto("read.consistency", 99).unwrap_err();
        assert!(matches!(error, Error::InvalidArgument { .. }), "{error:?}");
        assert!(error.to_string().starts_with("invalid argument `read.consistency`: unknown consistency level 99"));
        assert_eq!(consistency_from_proto("c", 2).unwrap(), v1::ConsistencyLevel::Bounded);
        let field = |data_type: i32, metric: i32| v1::FieldSchema {
            name: "f".into(),
            data_type,
            metric,
            dim: 2,
            ..Default::default()
        };
        let cases = [
            (field(99, 0), "field `f`: unknown data_type 99"),
            (field(0, 0), "field `f`: data_type is not set"),
            (field(v1::DataType::FloatVector as i32, 99), "field `f`: unknown metric 99"),
            // An unknown value is refused even where the field does not use it.
            (field(v1::DataType::Int64 as i32, 99), "field `f`: unknown metric 99"),
        ];
        for (field, expected) in cases {
            let error = field_from_proto(field).unwrap_err().to_string();
            assert!(error.starts_with(expected), "{error}");
        }
    }

    #[test]
    fn errors_about_long_client_text_stay_short() {
        let long = "x".repeat(10_000);
        let field = v1::FieldSchema {
            name: long.clone(),
            data_type: v1::DataType::Varchar as i32,
            max_length: 16,
            default_json: format!("{{\"a\": \"{}\"}}", "y".repeat(1 << 20)),
            ..Default::default()
        };
        let error = field_from_proto(field).unwrap_err().to_string();
        assert!(error.len() < 300, "{} bytes", error.len());
        assert!(error.starts_with("field `xxxx") && error.contains("(10000 characters)"), "{}", &error[..100]);
        let columns = vec![v1::FieldData { name: long, nulls: vec![], values: None }];
        let error = columns_to_batch(columns).unwrap_err().to_string();
        assert!(error.len() < 300, "{} bytes", error.len());
        // Whatever an error holds, its status message stays within the limit.
        let huge = Error::CollectionNotFound("z".repeat(10_000));
        let status = status(&huge);
        assert_eq!(status.code(), tonic::Code::NotFound);
        assert!(status.message().len() <= MAX_STATUS_MESSAGE, "{}", status.message().len());
        assert!(
            status.message().starts_with("collection `zzz")
                && status.message().ends_with("(message of 10023 bytes cut)")
        );
        // Cut at a character boundary.
        let wide = capped("é".repeat(1000));
        assert!(wide.len() <= MAX_STATUS_MESSAGE && wide.ends_with("(message of 2000 bytes cut)"), "{wide}");
        assert_eq!(capped("short".into()), "short");
    }

    #[test]
    fn json_field_defaults_round_trip_as_json() {
        let schema = CollectionSchema::new(
            "c",
            vec![
                FieldSchema::int64_primary("id", false),
                FieldSchema::vector("v", 2, Metric::L2),
                FieldSchema::new("meta", DataType::Json).with_default(Value::String(r#"{"a":1}"#.into())),
                FieldSchema::new("tag", DataType::VarChar { max_length: 8 }).with_default(Value::String("x".into())),
            ],
        );
        let proto = schema_to_proto(&schema);
        assert_eq!(proto.fields[2].default_json, r#"{"a":1}"#);
        assert_eq!(proto.fields[3].default_json, r#""x""#);
        assert_eq!(schema_from_proto(proto).unwrap(), schema);
    }

    #[test]
    fn vectors_round_trip_and_bad_lengths_name_the_argument() {
        let packed = pack_vectors(&[vec![1.0, 2.0], vec![3.0, -4.5]]);
        assert_eq!(unpack_vectors("vectors", &packed).unwrap(), vec![vec![1.0, 2.0], vec![3.0, -4.5]]);
        let bad = v1::VectorValues { dim: 2, data: vec![0; 12] };
        let error = unpack_vectors("vectors", &bad).unwrap_err().to_string();
        assert!(error.contains("vectors") && error.contains("12 bytes"), "{error}");
        let mismatched = vec![
            v1::FieldData {
                name: "a".into(),
                nulls: vec![],
                values: Some(Values::Ints(v1::IntValues { values: vec![1, 2] })),
            },
            v1::FieldData {
                name: "b".into(),
                nulls: vec![],
                values: Some(Values::Ints(v1::IntValues { values: vec![1] })),
            },
        ];
        let error = columns_to_batch(mismatched).unwrap_err().to_string();
        assert!(error.contains("`b`") && error.contains("column `a` has 2"), "{error}");
    }
}
