//! Column data between Milvus's `schema.FieldData` and ours: a write's
//! columns as an Arrow batch (checked and made canonical by the engine's
//! write validation), and rows of an answer as `FieldData`.

use std::collections::BTreeMap;
use std::sync::Arc;

use arrow::array::{
    ArrayRef, BooleanArray, Float32Array, Float64Array, Int32Array, Int64Array, RecordBatch, RecordBatchOptions,
    StringArray,
};
use arrow::datatypes::{Field, Schema};
use vectorflow_core::batch::vector_array;
use vectorflow_core::{CollectionSchema, DataType, Error, Result, Value, quote};

use super::pb::schema::{
    self as pb, BoolArray, DoubleArray, FloatArray, IntArray, JsonArray, LongArray, ScalarField, StringArray as Strs,
    VectorField, field_data::Field as Payload, scalar_field::Data as Scalars, vector_field::Data as Vectors,
};
use super::schema::{FIRST_FIELD_ID, data_type_to_milvus};

/// The values of a compact column (nulls left out, as pymilvus sends a
/// nullable column) spread over `valid`'s rows; a dense column (one value
/// per row) is kept as it is.
fn spread<T: Clone>(name: &str, values: Vec<T>, valid: &[bool]) -> Result<Vec<Option<T>>> {
    if valid.is_empty() {
        return Ok(values.into_iter().map(Some).collect());
    }
    let present = valid.iter().filter(|v| **v).count();
    if values.len() == valid.len() {
        return Ok(values.into_iter().zip(valid).map(|(v, ok)| ok.then_some(v)).collect());
    }
    if values.len() != present {
        return Err(Error::field(
            name,
            format!("{} values for {} rows of which valid_data marks {present} valid", values.len(), valid.len()),
        ));
    }
    let mut values = values.into_iter();
    Ok(valid.iter().map(|ok| if *ok { values.next() } else { None }).collect())
}

/// One column of a write as an Arrow array.
fn column_to_array(name: &str, data: pb::FieldData) -> Result<ArrayRef> {
    let valid = data.valid_data;
    Ok(match data.field {
        Some(Payload::Scalars(ScalarField { data: Some(scalars) })) => match scalars {
            Scalars::BoolData(v) => Arc::new(BooleanArray::from(spread(name, v.data, &valid)?)),
            Scalars::IntData(v) => Arc::new(Int32Array::from(spread(name, v.data, &valid)?)),
            Scalars::LongData(v) => Arc::new(Int64Array::from(spread(name, v.data, &valid)?)),
            Scalars::FloatData(v) => Arc::new(Float32Array::from(spread(name, v.data, &valid)?)),
            Scalars::DoubleData(v) => Arc::new(Float64Array::from(spread(name, v.data, &valid)?)),
            Scalars::StringData(v) => Arc::new(StringArray::from(spread(name, v.data, &valid)?)),
            Scalars::JsonData(v) => {
                let texts = v
                    .data
                    .into_iter()
                    .enumerate()
                    .map(|(row, bytes)| {
                        String::from_utf8(bytes)
                            .map_err(|_| Error::field(name, format!("row {row}: JSON is not UTF-8")))
                    })
                    .collect::<Result<Vec<_>>>()?;
                Arc::new(StringArray::from(spread(name, texts, &valid)?))
            }
            Scalars::BytesData(_) | Scalars::ArrayData(_) => {
                return Err(Error::field(name, "bytes and array columns are not supported"));
            }
        },
        Some(Payload::Vectors(VectorField { dim, data: Some(Vectors::FloatVector(values)) })) => {
            if !valid.is_empty() && valid.contains(&false) {
                return Err(Error::field(name, "a vector field cannot hold nulls"));
            }
            let dim = usize::try_from(dim)
                .ok()
                .filter(|d| *d > 0)
                .ok_or_else(|| Error::field(name, format!("vectors of dim {dim}: the dim must be positive")))?;
            if values.data.len() % dim != 0 {
                return Err(Error::field(
                    name,
                    format!("{} floats are not whole vectors of dim {dim}", values.data.len()),
                ));
            }
            vector_array(dim, values.data)?
        }
        Some(Payload::Vectors(_)) => {
            return Err(Error::field(name, "only float vectors are supported (not binary, float16, bfloat16 or int8)"));
        }
        Some(Payload::Scalars(ScalarField { data: None })) | None => {
            return Err(Error::field(name, "the column carries no data"));
        }
    })
}

/// A write's columns as one Arrow batch of `num_rows` rows. Column names
/// are checked against `schema` by the engine; here the dynamic column is
/// routed to the collection's dynamic field.
pub fn columns_to_batch(schema: &CollectionSchema, columns: Vec<pb::FieldData>, num_rows: u32) -> Result<RecordBatch> {
    let mut fields = Vec::with_capacity(columns.len());
    let mut arrays: Vec<ArrayRef> = Vec::with_capacity(columns.len());
    let rows = num_rows as usize;
    // Rows come with their columns: without any, `num_rows` alone would
    // make the engine allocate keys and defaults for rows nobody sent.
    if columns.is_empty() && rows > 0 {
        return Err(Error::argument("fields_data", format!("no columns for num_rows = {rows}")));
    }
    for column in columns {
        let name = if column.is_dynamic {
            match schema.dynamic_field() {
                Some(dynamic) => dynamic.name.clone(),
                None => {
                    return Err(Error::field(
                        quote(&column.field_name),
                        "the collection has no dynamic field (create it with enable_dynamic_field)",
                    ));
                }
            }
        } else {
            column.field_name.clone()
        };
        let quoted = quote(&name).into_owned();
        let array = column_to_array(&quoted, column)?;
        if array.len() != rows {
            return Err(Error::field(&quoted, format!("{} rows, but num_rows is {rows}", array.len())));
        }
        fields.push(Field::new(name, array.data_type().clone(), true));
        arrays.push(array);
    }
    let options = RecordBatchOptions::new().with_row_count(Some(rows));
    Ok(RecordBatch::try_new_with_options(Arc::new(Schema::new(fields)), arrays, &options)?)
}

/// Field `name` of every row as a Milvus column, in row order.
pub fn rows_to_field_data(
    schema: &CollectionSchema,
    name: &str,
    rows: &[&BTreeMap<String, Value>],
) -> Result<pb::FieldData> {
    let (index, field) = schema.field(name)?;
    let values: Vec<&Value> = rows.iter().map(|row| row.get(name).unwrap_or(&Value::Null)).collect();
    let valid_data = if field.nullable && !field.is_dynamic {
        values.iter().map(|v| !matches!(v, Value::Null)).collect()
    } else {
        Vec::new()
    };
    let scalars = |data: Scalars| Payload::Scalars(ScalarField { data: Some(data) });
    let payload = match &field.data_type {
        DataType::Bool => scalars(Scalars::BoolData(BoolArray {
            data: values.iter().map(|v| matches!(v, Value::Bool(true))).collect(),
        })),
        DataType::Int8 | DataType::Int16 | DataType::Int32 => scalars(Scalars::IntData(IntArray {
            data: values.iter().map(|v| v.as_i64().unwrap_or(0) as i32).collect(),
        })),
        DataType::Int64 => {
            scalars(Scalars::LongData(LongArray { data: values.iter().map(|v| v.as_i64().unwrap_or(0)).collect() }))
        }
        DataType::Float => scalars(Scalars::FloatData(FloatArray {
            data: values.iter().map(|v| v.as_f64().unwrap_or(0.0) as f32).collect(),
        })),
        DataType::Double => scalars(Scalars::DoubleData(DoubleArray {
            data: values.iter().map(|v| v.as_f64().unwrap_or(0.0)).collect(),
        })),
        DataType::VarChar { .. } => scalars(Scalars::StringData(Strs {
            data: values.iter().map(|v| v.as_str().unwrap_or_default().to_string()).collect(),
        })),
        DataType::Json => {
            // A row without dynamic keys reads as an empty object, as in Milvus.
            let empty = if field.is_dynamic { "{}" } else { "null" };
            scalars(Scalars::JsonData(JsonArray {
                data: values.iter().map(|v| v.as_str().unwrap_or(empty).as_bytes().to_vec()).collect(),
            }))
        }
        DataType::FloatVector { dim, .. } => {
            let mut data = Vec::with_capacity(values.len() * dim);
            for value in &values {
                match value {
                    Value::Vector(v) if v.len() == *dim => data.extend_from_slice(v),
                    _ => data.extend(std::iter::repeat_n(0.0, *dim)),
                }
            }
            Payload::Vectors(VectorField { dim: *dim as i64, data: Some(Vectors::FloatVector(FloatArray { data })) })
        }
    };
    Ok(pb::FieldData {
        r#type: data_type_to_milvus(&field.data_type) as i32,
        field_name: field.name.clone(),
        field: Some(payload),
        field_id: FIRST_FIELD_ID + index as i64,
        is_dynamic: field.is_dynamic,
        valid_data,
    })
}

/// The fields an answer returns for Milvus's `output_fields`: `*` is every
/// field; a name the schema lacks is a dynamic key, served by the dynamic
/// field (the client picks the key out). The primary key is left to the caller.
pub fn output_fields(schema: &CollectionSchema, requested: &[String]) -> Result<Vec<String>> {
    let mut fields: Vec<String> = Vec::new();
    let mut add = |name: &str| {
        if !fields.iter().any(|f| f == name) {
            fields.push(name.to_string());
        }
    };
    for name in requested {
        let name = name.trim();
        if name == "*" {
            schema.fields.iter().for_each(|f| add(&f.name));
        } else if schema.field_index(name).is_some() {
            add(name);
        } else if let Some(dynamic) = schema.dynamic_field() {
            add(&dynamic.name);
        } else {
            return Err(Error::field(quote(name), format!("no such field in collection `{}`", schema.name)));
        }
    }
    Ok(fields)
}

#[cfg(test)]
mod tests {
    use super::*;
    use arrow::array::Array;
    use proptest::prelude::*;
    use vectorflow_core::{FieldSchema, Metric};

    fn schema() -> CollectionSchema {
        CollectionSchema::new(
            "c",
            vec![
                FieldSchema::int64_primary("id", false),
                FieldSchema::vector("vector", 2, Metric::L2),
                FieldSchema::new("title", DataType::VarChar { max_length: 16 }).nullable(),
                FieldSchema::dynamic(),
            ],
        )
    }

    fn scalar(name: &str, data: Scalars, valid: Vec<bool>) -> pb::FieldData {
        pb::FieldData {
            field_name: name.into(),
            field: Some(Payload::Scalars(ScalarField { data: Some(data) })),
            valid_data: valid,
            ..Default::default()
        }
    }

    #[test]
    fn a_pymilvus_write_becomes_a_batch() {
        let columns = vec![
            scalar("id", Scalars::LongData(LongArray { data: vec![1, 2, 3] }), vec![]),
            pb::FieldData {
                field_name: "vector".into(),
                field: Some(Payload::Vectors(VectorField {
                    dim: 2,
                    data: Some(Vectors::FloatVector(FloatArray { data: vec![0.0, 1.0, 2.0, 3.0, 4.0, 5.0] })),
                })),
                ..Default::default()
            },
            // Compact: the null row has no value.
            scalar("title", Scalars::StringData(Strs { data: vec!["a".into(), "c".into()] }), vec![true, false, true]),
            pb::FieldData {
                field_name: "$meta".into(),
                is_dynamic: true,
                ..scalar(
                    "",
                    Scalars::JsonData(JsonArray { data: vec![b"{\"k\":1}".to_vec(), b"{}".to_vec(), b"{}".to_vec()] }),
                    vec![],
                )
            },
        ];
        let batch = columns_to_batch(&schema(), columns, 3).unwrap();
        assert_eq!(batch.num_rows(), 3);
        let title = batch.column_by_name("title").unwrap();
        assert!(title.is_null(1) && !title.is_null(2));
        assert!(batch.column_by_name("$meta").is_some());
    }

    #[test]
    fn bad_columns_are_named() {
        assert!(columns_to_batch(&schema(), Vec::new(), u32::MAX).unwrap_err().to_string().contains("fields_data"));
        let short = vec![scalar("id", Scalars::LongData(LongArray { data: vec![1] }), vec![])];
        assert!(columns_to_batch(&schema(), short, 2).unwrap_err().to_string().contains("`id`"));
        let ragged = vec![pb::FieldData {
            field_name: "vector".into(),
            field: Some(Payload::Vectors(VectorField {
                dim: 2,
                data: Some(Vectors::FloatVector(FloatArray { data: vec![0.0, 1.0, 2.0] })),
            })),
            ..Default::default()
        }];
        assert!(columns_to_batch(&schema(), ragged, 1).unwrap_err().to_string().contains("vector"));
        let mut no_dynamic = schema();
        no_dynamic.fields.pop();
        let dynamic = vec![pb::FieldData { is_dynamic: true, field_name: "$meta".into(), ..Default::default() }];
        assert!(columns_to_batch(&no_dynamic, dynamic, 0).unwrap_err().to_string().contains("dynamic"));
    }

    #[test]
    fn rows_become_dense_columns_with_validity() {
        let rows: Vec<BTreeMap<String, Value>> = vec![
            BTreeMap::from([("title".into(), Value::String("a".into()))]),
            BTreeMap::from([("title".into(), Value::Null)]),
        ];
        let refs: Vec<_> = rows.iter().collect();
        let title = rows_to_field_data(&schema(), "title", &refs).unwrap();
        assert_eq!(title.valid_data, vec![true, false]);
        assert_eq!(title.field_id, 102);
        let meta = rows_to_field_data(&schema(), "$meta", &refs).unwrap();
        assert!(meta.is_dynamic && meta.valid_data.is_empty());
        assert_eq!(output_fields(&schema(), &["color".into(), "title".into()]).unwrap(), vec!["$meta", "title"]);
        assert_eq!(output_fields(&schema(), &["*".into()]).unwrap().len(), 4);
    }

    fn any_column() -> impl Strategy<Value = pb::FieldData> {
        (
            "[a-z$]{0,6}",
            any::<bool>(),
            proptest::collection::vec(any::<i64>(), 0..6),
            proptest::collection::vec(any::<bool>(), 0..6),
            0i64..4,
            proptest::collection::vec(any::<f32>(), 0..9),
        )
            .prop_map(|(name, vector, ints, valid, dim, floats)| pb::FieldData {
                field_name: name,
                field: Some(if vector {
                    Payload::Vectors(VectorField { dim, data: Some(Vectors::FloatVector(FloatArray { data: floats })) })
                } else {
                    Payload::Scalars(ScalarField { data: Some(Scalars::LongData(LongArray { data: ints })) })
                }),
                valid_data: valid,
                ..Default::default()
            })
    }

    proptest! {
        #[test]
        fn any_columns_convert_or_fail_cleanly(columns in proptest::collection::vec(any_column(), 0..4), rows in 0u32..6) {
            let _ = columns_to_batch(&schema(), columns, rows);
        }
    }
}
