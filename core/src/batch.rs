//! Write batches: user rows or Arrow batches checked against a schema and
//! brought to the canonical Arrow layout the log and the segments hold.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use arrow::array::{
    Array, ArrayRef, AsArray, BooleanBuilder, FixedSizeListArray, Float32Array, Float32Builder, Float64Builder,
    Int8Builder, Int16Builder, Int32Builder, Int64Array, Int64Builder, StringBuilder, UInt32Array,
};
use arrow::compute::{CastOptions, cast_with_options, take};
use arrow::datatypes::{DataType as ArrowType, Field, Float32Type, Float64Type};
use arrow::record_batch::RecordBatch;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::error::{Error, Result};
use crate::schema::{CollectionSchema, DataType, FieldSchema, Metric};
use crate::value::{Pk, Value, pks_from_array, quote, value_from_json};

/// One row given by name, as a user writes it.
pub type Row = BTreeMap<String, Value>;

/// A write that passed validation: canonical columns in schema order, one row
/// per primary key (the last occurrence wins), and the keys.
#[derive(Debug, Clone)]
pub struct WriteBatch {
    pub batch: RecordBatch,
    pub pks: Vec<Pk>,
}

/// Whether a write may carry its own keys for an auto-id collection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WriteKind {
    /// New rows; auto-id keys are assigned starting at the given id.
    Insert { first_auto_id: i64 },
    /// Rows replacing whatever has their keys; keys are always given.
    Upsert,
}

impl WriteBatch {
    /// Checks `input` against `schema` and brings it to canonical form. Every
    /// error names the field and the problem; nothing is half-applied because
    /// nothing is applied until the whole batch passes.
    pub fn from_record_batch(schema: &CollectionSchema, input: &RecordBatch, kind: WriteKind) -> Result<WriteBatch> {
        let rows = input.num_rows();
        // Rows come with columns: a batch of none would have keys and
        // defaults made for rows nobody sent, as many as it declares.
        if input.num_columns() == 0 && rows > 0 {
            return Err(Error::argument("batch", format!("{rows} rows but no columns")));
        }
        let input_schema = input.schema();
        let mut given = std::collections::HashSet::with_capacity(input_schema.fields().len());
        for field in input_schema.fields() {
            if schema.field_index(field.name()).is_none() {
                return Err(Error::field(
                    quote(field.name()),
                    format!("no such field in collection `{}`", schema.name),
                ));
            }
            // Two columns for one field would leave it to chance which one is written.
            if !given.insert(field.name()) {
                return Err(Error::field(field.name(), "given twice: a write holds one column per field"));
            }
        }
        let mut columns: Vec<ArrayRef> = Vec::with_capacity(schema.fields.len());
        for field in &schema.fields {
            let given = input_schema.index_of(&field.name).ok().map(|i| input.column(i).clone());
            let column = if field.is_primary && field.auto_id {
                match (kind, given) {
                    (WriteKind::Insert { .. }, Some(_)) => {
                        return Err(Error::field(
                            &field.name,
                            "the primary key is assigned by the engine (auto_id): leave it out of inserts",
                        ));
                    }
                    (WriteKind::Insert { first_auto_id }, None) => {
                        Arc::new(Int64Array::from_iter_values(first_auto_id..first_auto_id + rows as i64)) as ArrayRef
                    }
                    (WriteKind::Upsert, Some(column)) => canonical_column(field, column, rows)?,
                    (WriteKind::Upsert, None) => {
                        return Err(Error::field(&field.name, "missing: upserts must give the primary key"));
                    }
                }
            } else {
                match given {
                    Some(column) => canonical_column(field, column, rows)?,
                    None if field.is_primary => return Err(Error::field(&field.name, "missing primary key")),
                    None => missing_column(field, rows)?,
                }
            };
            columns.push(column);
        }
        let batch = RecordBatch::try_new(schema.arrow_schema(), columns)?;
        let pks = pks_from_array(batch.column(schema.primary_index()).as_ref())?;
        dedupe_keep_last(batch, pks)
    }

    /// Builds a write from rows given by name.
    pub fn from_rows(schema: &CollectionSchema, rows: &[Row], kind: WriteKind) -> Result<WriteBatch> {
        for (i, row) in rows.iter().enumerate() {
            if let Some(name) = row.keys().find(|name| schema.field_index(name).is_none()) {
                return Err(Error::field(
                    quote(name),
                    format!("no such field in collection `{}` (row {i})", schema.name),
                ));
            }
        }
        let mut fields = Vec::new();
        let mut columns = Vec::new();
        for field in &schema.fields {
            if !rows.iter().any(|row| row.contains_key(&field.name)) {
                continue;
            }
            let values: Vec<Value> =
                rows.iter().map(|row| row.get(&field.name).cloned().unwrap_or(Value::Null)).collect();
            fields.push(Field::new(&field.name, field.data_type.arrow_type(), true));
            columns.push(values_to_array(&field.name, &field.data_type, &values)?);
        }
        let options = arrow::record_batch::RecordBatchOptions::new().with_row_count(Some(rows.len()));
        let input =
            RecordBatch::try_new_with_options(Arc::new(arrow::datatypes::Schema::new(fields)), columns, &options)?;
        WriteBatch::from_record_batch(schema, &input, kind)
    }
}

/// One JSON object (field name → value) as a row of `schema`, checked as the
/// engine will check it, so a bad row is refused before it is sent or
/// logged: unknown fields, an `auto_id` key given, types and ranges,
/// dimensions, non-finite vector elements, zero COSINE vectors, nulls a field
/// cannot hold and missing required fields. Every error is [`Error::Field`].
/// Fields left out stay out (the write fills defaults and nulls).
pub fn row_from_json(schema: &CollectionSchema, object: serde_json::Map<String, serde_json::Value>) -> Result<Row> {
    let mut row = Row::new();
    for (name, json) in object {
        let field = schema.field(&name).map(|(_, f)| f)?;
        if field.is_primary && field.auto_id {
            return Err(Error::field(name, "the primary key is assigned by the engine (auto_id): leave it out"));
        }
        let value = value_from_json(&name, &field.data_type, json)?;
        value.check_type(&name, &field.data_type)?;
        if let Value::Vector(v) = &value {
            if let Some(i) = v.iter().position(|x| !x.is_finite()) {
                return Err(Error::field(name, format!("element {i} is outside the range of f32")));
            }
            check_vector(&name, "the vector", v)?;
            if matches!(field.data_type, DataType::FloatVector { metric: Metric::COSINE, .. })
                && v.iter().all(|x| *x == 0.0)
            {
                return Err(Error::field(name, "a zero vector has no direction for COSINE"));
            }
        }
        if value == Value::Null && !field.nullable && field.default_value.is_none() {
            return Err(Error::field(name, "null, but the field is not nullable and has no default"));
        }
        row.insert(name, value);
    }
    for field in &schema.fields {
        let needed = !(field.nullable || field.default_value.is_some() || (field.is_primary && field.auto_id));
        if needed && !row.contains_key(&field.name) {
            return Err(Error::field(&field.name, "missing (not nullable and no default value)"));
        }
    }
    Ok(row)
}

/// Brings one given column to the field's canonical type and checks its values.
fn canonical_column(field: &FieldSchema, column: ArrayRef, rows: usize) -> Result<ArrayRef> {
    let column = match &field.data_type {
        DataType::FloatVector { dim, metric } => vector_column(&field.name, column, *dim, *metric)?,
        data_type => {
            let target = data_type.arrow_type();
            if column.data_type() == &target {
                column
            } else if !castable_kind(column.data_type(), data_type) {
                return Err(Error::field(
                    &field.name,
                    format!("cannot use {} as {:?}: the kinds differ", column.data_type(), data_type),
                ));
            } else {
                let options = CastOptions { safe: false, ..Default::default() };
                cast_with_options(&column, &target, &options).map_err(|e| {
                    Error::field(&field.name, format!("cannot use {} as {:?}: {e}", column.data_type(), data_type))
                })?
            }
        }
    };
    let column = fill_nulls(field, column, rows)?;
    check_values(field, column.as_ref())?;
    Ok(column)
}

/// Whether a column of `given` may be cast to `field`: integers widen or
/// narrow (range-checked by the cast) and become floats, strings stay
/// strings; no silent number/text/bool conversions.
fn castable_kind(given: &ArrowType, field: &DataType) -> bool {
    let text = matches!(given, ArrowType::Utf8 | ArrowType::LargeUtf8 | ArrowType::Utf8View);
    if given == &ArrowType::Null {
        return true;
    }
    match field {
        DataType::Bool => matches!(given, ArrowType::Boolean),
        DataType::Int8 | DataType::Int16 | DataType::Int32 | DataType::Int64 => given.is_integer(),
        DataType::Float | DataType::Double => given.is_integer() || given.is_floating(),
        DataType::VarChar { .. } | DataType::Json => text,
        DataType::FloatVector { .. } => true,
    }
}

/// A column for a field the write left out: its default, or nulls.
fn missing_column(field: &FieldSchema, rows: usize) -> Result<ArrayRef> {
    match (&field.default_value, field.nullable) {
        (Some(default), _) => values_to_array(&field.name, &field.data_type, &vec![default.clone(); rows]),
        (None, true) => Ok(arrow::array::new_null_array(&field.data_type.arrow_type(), rows)),
        (None, false) => Err(Error::field(&field.name, "missing (not nullable and no default value)")),
    }
}

/// Replaces nulls with the field's default; rejects nulls it cannot hold.
fn fill_nulls(field: &FieldSchema, column: ArrayRef, rows: usize) -> Result<ArrayRef> {
    if column.null_count() == 0 {
        return Ok(column);
    }
    if let Some(default) = &field.default_value {
        let values: Vec<Value> = (0..rows)
            .map(|row| if column.is_null(row) { default.clone() } else { Value::from_array(column.as_ref(), row) })
            .collect();
        return values_to_array(&field.name, &field.data_type, &values);
    }
    if field.nullable {
        return Ok(column);
    }
    let row = (0..rows).find(|&row| column.is_null(row)).unwrap_or(0);
    Err(Error::field(&field.name, format!("null at row {row} (not nullable and no default value)")))
}

fn check_values(field: &FieldSchema, column: &dyn Array) -> Result<()> {
    match &field.data_type {
        DataType::VarChar { max_length } => {
            for (row, value) in column.as_string::<i32>().iter().enumerate() {
                if let Some(value) = value {
                    let len = value.chars().count();
                    if len > *max_length {
                        return Err(Error::field(
                            &field.name,
                            format!("row {row}: {len} characters exceed max_length {max_length}"),
                        ));
                    }
                }
            }
        }
        DataType::Json => {
            for (row, value) in column.as_string::<i32>().iter().enumerate() {
                if let Some(Err(e)) = value.map(serde_json::from_str::<serde_json::Value>) {
                    return Err(Error::field(&field.name, format!("row {row}: not valid JSON: {e}")));
                }
            }
        }
        _ => {}
    }
    Ok(())
}

/// Accepts `FixedSizeList<Float32|Float64>` or `List<Float32|Float64>` of the
/// right length per row; COSINE vectors are normalised here, once.
fn vector_column(name: &str, column: ArrayRef, dim: usize, metric: Metric) -> Result<ArrayRef> {
    let rows = column.len();
    let mut values: Vec<f32> = Vec::with_capacity(rows * dim);
    let mut push_row = |row: usize, item: ArrayRef| -> Result<()> {
        if item.len() != dim {
            return Err(Error::field(name, format!("row {row}: dimension {} does not match dim {dim}", item.len())));
        }
        if item.null_count() > 0 {
            return Err(Error::field(name, format!("row {row}: vector holds nulls")));
        }
        match item.data_type() {
            ArrowType::Float32 => values.extend_from_slice(item.as_primitive::<Float32Type>().values()),
            ArrowType::Float64 => values.extend(item.as_primitive::<Float64Type>().values().iter().map(|&x| x as f32)),
            other => return Err(Error::field(name, format!("row {row}: vector elements are {other}, not floats"))),
        }
        Ok(())
    };
    match column.data_type() {
        ArrowType::FixedSizeList(_, _) => {
            let list = column.as_fixed_size_list();
            for row in 0..rows {
                if list.is_null(row) {
                    return Err(Error::field(name, format!("row {row}: vector is null")));
                }
                push_row(row, list.value(row))?;
            }
        }
        ArrowType::List(_) => {
            let list = column.as_list::<i32>();
            for row in 0..rows {
                if list.is_null(row) {
                    return Err(Error::field(name, format!("row {row}: vector is null")));
                }
                push_row(row, list.value(row))?;
            }
        }
        other => return Err(Error::field(name, format!("expected a float vector column, got {other}"))),
    }
    for (row, vector) in values.chunks_exact_mut(dim).enumerate() {
        check_vector(name, &format!("row {row}"), vector)?;
        if metric == Metric::COSINE {
            let norm = vector.iter().map(|x| x * x).sum::<f32>().sqrt();
            if norm == 0.0 {
                return Err(Error::field(name, format!("row {row}: a zero vector has no direction for COSINE")));
            }
            vector.iter_mut().for_each(|x| *x /= norm);
        }
    }
    vector_array(dim, values)
}

/// The largest squared L2 norm a stored or query vector may have. Scores
/// are computed in f32: an inner product is at most the product of the
/// norms, a squared L2 distance at most 4 × the larger squared norm, and
/// every partial sum is bounded the same way; the remaining factor 2 covers
/// the rounding of summing in f32. So no score of such vectors is infinite.
pub const MAX_SQUARED_NORM: f64 = f32::MAX as f64 / 8.0;

/// Checks that a vector can be scored: finite elements, and a squared norm
/// of at most [`MAX_SQUARED_NORM`] (`3e38` is a finite f32, but its square
/// is not, so every distance to it would be infinite and rank nothing).
/// `context` says which vector (`row 3`, `query 0`); the error names `field`.
/// The write validation and a search's query vectors both use it.
pub fn check_vector(field: &str, context: &str, vector: &[f32]) -> Result<()> {
    if let Some(i) = vector.iter().position(|x| !x.is_finite()) {
        return Err(Error::field(
            field,
            format!("{context}: element {i} is {}: vectors hold finite numbers", vector[i]),
        ));
    }
    // In f64, where the square of any f32 is finite and exact enough.
    let squared: f64 = vector.iter().map(|&x| f64::from(x) * f64::from(x)).sum();
    if squared > MAX_SQUARED_NORM {
        return Err(Error::field(
            field,
            format!(
                "{context}: squared norm {squared:.3e} exceeds {MAX_SQUARED_NORM:.3e}: its scores would overflow f32"
            ),
        ));
    }
    Ok(())
}

/// A `FixedSizeList<Float32>` column from row-major values.
pub fn vector_array(dim: usize, values: Vec<f32>) -> Result<ArrayRef> {
    let item = Arc::new(Field::new("item", ArrowType::Float32, false));
    Ok(Arc::new(FixedSizeListArray::try_new(item, dim as i32, Arc::new(Float32Array::from(values)), None)?))
}

/// One column from values, checking each against the field type.
pub fn values_to_array(name: &str, data_type: &DataType, values: &[Value]) -> Result<ArrayRef> {
    for value in values {
        value.check_type(name, data_type)?;
    }
    macro_rules! ints {
        ($builder:ty, $t:ty) => {{
            let mut b = <$builder>::with_capacity(values.len());
            for v in values {
                b.append_option(v.as_i64().map(|x| x as $t));
            }
            Arc::new(b.finish()) as ArrayRef
        }};
    }
    Ok(match data_type {
        DataType::Bool => {
            let mut b = BooleanBuilder::with_capacity(values.len());
            values.iter().for_each(|v| b.append_option(if let Value::Bool(x) = v { Some(*x) } else { None }));
            Arc::new(b.finish())
        }
        DataType::Int8 => ints!(Int8Builder, i8),
        DataType::Int16 => ints!(Int16Builder, i16),
        DataType::Int32 => ints!(Int32Builder, i32),
        DataType::Int64 => ints!(Int64Builder, i64),
        DataType::Float => {
            let mut b = Float32Builder::with_capacity(values.len());
            values.iter().for_each(|v| b.append_option(v.as_f64().map(|x| x as f32)));
            Arc::new(b.finish())
        }
        DataType::Double => {
            let mut b = Float64Builder::with_capacity(values.len());
            values.iter().for_each(|v| b.append_option(v.as_f64()));
            Arc::new(b.finish())
        }
        DataType::VarChar { .. } | DataType::Json => {
            let mut b = StringBuilder::new();
            values.iter().for_each(|v| b.append_option(v.as_str()));
            Arc::new(b.finish())
        }
        DataType::FloatVector { dim, .. } => {
            let mut b = arrow::array::FixedSizeListBuilder::new(Float32Builder::new(), *dim as i32)
                .with_field(Arc::new(Field::new("item", ArrowType::Float32, false)));
            for v in values {
                match v {
                    Value::Vector(x) => {
                        b.values().append_slice(x);
                        b.append(true);
                    }
                    _ => {
                        b.values().append_slice(&vec![0.0; *dim]);
                        b.append(false);
                    }
                }
            }
            Arc::new(b.finish())
        }
    })
}

/// Keeps only the last row of each primary key, as if the rows were applied in order.
fn dedupe_keep_last(batch: RecordBatch, pks: Vec<Pk>) -> Result<WriteBatch> {
    let mut last: HashMap<&Pk, usize> = HashMap::with_capacity(pks.len());
    for (row, pk) in pks.iter().enumerate() {
        last.insert(pk, row);
    }
    if last.len() == pks.len() {
        return Ok(WriteBatch { batch, pks });
    }
    let keep: Vec<u32> = (0..pks.len()).filter(|row| last[&pks[*row]] == *row).map(|row| row as u32).collect();
    let batch = take_rows(&batch, &keep)?;
    let pks = keep.iter().map(|&row| pks[row as usize].clone()).collect();
    Ok(WriteBatch { batch, pks })
}

/// The rows `indices` of `batch`, in that order.
pub fn take_rows(batch: &RecordBatch, indices: &[u32]) -> Result<RecordBatch> {
    let indices = UInt32Array::from(indices.to_vec());
    let columns = batch.columns().iter().map(|c| take(c.as_ref(), &indices, None)).collect::<Result<Vec<_>, _>>()?;
    Ok(RecordBatch::try_new(batch.schema(), columns)?)
}

/// A record batch that serialises as Arrow IPC, so it can cross timely's
/// process boundaries and sit in the log.
#[derive(Debug, Clone)]
pub struct IpcBatch(pub RecordBatch);

impl IpcBatch {
    pub fn to_bytes(&self) -> Result<Vec<u8>> {
        let mut out = Vec::new();
        {
            let mut writer = arrow::ipc::writer::StreamWriter::try_new(&mut out, &self.0.schema())?;
            writer.write(&self.0)?;
            writer.finish()?;
        }
        Ok(out)
    }

    pub fn from_bytes(bytes: &[u8]) -> Result<IpcBatch> {
        check_ipc_stream(bytes).map_err(|problem| Error::Corrupt { location: "ipc batch".into(), problem })?;
        let mut reader = arrow::ipc::reader::StreamReader::try_new(std::io::Cursor::new(bytes), None)?;
        match reader.next() {
            Some(batch) => Ok(IpcBatch(batch?)),
            None => Err(Error::Corrupt { location: "ipc batch".into(), problem: "no record batch in stream".into() }),
        }
    }
}

/// Checks the framing of an Arrow IPC stream before a reader decodes it:
/// every message's metadata and body must fit in the bytes that follow,
/// and bodies must not be compressed. Arrow's reader allocates what a
/// message declares before reading it, so 16 bytes declaring 2 GiB of
/// metadata cost 2 GiB and seconds of zeroing (a negative length, far
/// more), and a compressed buffer's declared size is allocated before
/// decompressing. Past this check, decoding allocates about `bytes.len()`.
/// The problem says which message is wrong and how.
pub fn check_ipc_stream(bytes: &[u8]) -> std::result::Result<(), String> {
    /// Marks a length prefix in the current format (older writers omit it).
    const CONTINUATION: i32 = -1;
    fn length_at(bytes: &[u8], at: usize, message: usize) -> std::result::Result<i32, String> {
        match bytes.get(at..at.saturating_add(4)) {
            Some(&[a, b, c, d]) => Ok(i32::from_le_bytes([a, b, c, d])),
            _ => Err(format!("message {message}: the stream ends inside a length prefix at byte {at}")),
        }
    }
    let mut at = 0;
    let mut message = 0;
    while at < bytes.len() {
        let mut declared = length_at(bytes, at, message)?;
        at += 4;
        if declared == CONTINUATION {
            declared = length_at(bytes, at, message)?;
            at += 4;
        }
        if declared == 0 {
            // The end-of-stream marker: the reader stops here.
            return Ok(());
        }
        let left = bytes.len() - at;
        let Some(length) = usize::try_from(declared).ok().filter(|&length| length <= left) else {
            return Err(format!(
                "message {message}: metadata of {declared} bytes, but {left} bytes follow its length prefix"
            ));
        };
        let metadata = arrow::ipc::root_as_message(&bytes[at..at + length])
            .map_err(|e| format!("message {message}: metadata is not an Arrow IPC message: {e}"))?;
        at += length;
        let left = bytes.len() - at;
        let declared = metadata.bodyLength();
        let Some(body) = usize::try_from(declared).ok().filter(|&body| body <= left) else {
            return Err(format!("message {message}: body of {declared} bytes, but {left} bytes follow its metadata"));
        };
        if let Some(batch) = metadata.header_as_record_batch().or_else(|| metadata.header_as_dictionary_batch()?.data())
        {
            if batch.compression().is_some() {
                return Err(format!("message {message}: compressed bodies are not accepted; send it uncompressed"));
            }
            // Arrow's reader slices these out of the body with an assertion.
            for (i, buffer) in batch.buffers().iter().flatten().enumerate() {
                let end = buffer.offset().checked_add(buffer.length());
                if buffer.offset() < 0 || buffer.length() < 0 || end.is_none_or(|end| end > declared) {
                    return Err(format!(
                        "message {message}: buffer {i} at offset {} of {} bytes lies outside the body of {declared} bytes",
                        buffer.offset(),
                        buffer.length()
                    ));
                }
            }
        }
        at += body;
        message += 1;
    }
    Ok(())
}

impl Serialize for IpcBatch {
    fn serialize<S: Serializer>(&self, serializer: S) -> std::result::Result<S::Ok, S::Error> {
        let bytes = self.to_bytes().map_err(serde::ser::Error::custom)?;
        serializer.serialize_bytes(&bytes)
    }
}

impl<'de> Deserialize<'de> for IpcBatch {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> std::result::Result<Self, D::Error> {
        let bytes: Vec<u8> = serde::de::Deserialize::deserialize(deserializer)?;
        IpcBatch::from_bytes(&bytes).map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::schema::FieldSchema;

    fn schema() -> CollectionSchema {
        CollectionSchema::new(
            "docs",
            vec![
                FieldSchema::int64_primary("id", false),
                FieldSchema::vector("v", 2, Metric::COSINE),
                FieldSchema::new("year", DataType::Int32).with_default(Value::Int(1999)),
                FieldSchema::new("title", DataType::VarChar { max_length: 5 }).nullable(),
            ],
        )
    }

    fn row(id: i64, v: Vec<f32>) -> Row {
        Row::from([("id".to_string(), Value::Int(id)), ("v".to_string(), Value::Vector(v))])
    }

    #[test]
    fn fills_defaults_and_nulls_and_normalises() {
        let write = WriteBatch::from_rows(&schema(), &[row(1, vec![3.0, 4.0])], WriteKind::Upsert).unwrap();
        let batch = &write.batch;
        assert_eq!(Value::from_array(batch.column(2).as_ref(), 0), Value::Int(1999));
        assert_eq!(Value::from_array(batch.column(3).as_ref(), 0), Value::Null);
        assert_eq!(Value::from_array(batch.column(1).as_ref(), 0), Value::Vector(vec![0.6, 0.8]));
    }

    #[test]
    fn errors_name_the_field() {
        let s = schema();
        let err = WriteBatch::from_rows(&s, &[row(1, vec![1.0])], WriteKind::Upsert).unwrap_err();
        assert!(err.to_string().contains("`v`") && err.to_string().contains("dimension"), "{err}");
        let mut bad = row(1, vec![1.0, 0.0]);
        bad.insert("nope".into(), Value::Int(1));
        let err = WriteBatch::from_rows(&s, &[bad], WriteKind::Upsert).unwrap_err();
        assert!(err.to_string().contains("`nope`"), "{err}");
        let mut long = row(1, vec![1.0, 0.0]);
        long.insert("title".into(), "toolong".into());
        let err = WriteBatch::from_rows(&s, &[long], WriteKind::Upsert).unwrap_err();
        assert!(err.to_string().contains("max_length"), "{err}");
        let mut wrong = row(1, vec![1.0, 0.0]);
        wrong.insert("year".into(), "x".into());
        let err = WriteBatch::from_rows(&s, &[wrong], WriteKind::Upsert).unwrap_err();
        assert!(err.to_string().contains("`year`"), "{err}");
        let missing = Row::from([("v".to_string(), Value::Vector(vec![1.0, 0.0]))]);
        let err = WriteBatch::from_rows(&s, &[missing], WriteKind::Upsert).unwrap_err();
        assert!(err.to_string().contains("`id`"), "{err}");
    }

    fn json_row(text: &str) -> Result<Row> {
        let serde_json::Value::Object(object) = serde_json::from_str(text).unwrap() else { panic!("not an object") };
        row_from_json(&schema(), object)
    }

    #[test]
    fn json_rows_convert_and_leave_missing_fields_out() {
        let row = json_row(r#"{"id": 7, "v": [3, 4], "title": null}"#).unwrap();
        assert_eq!(
            row,
            Row::from([
                ("id".to_string(), Value::Int(7)),
                ("v".to_string(), Value::Vector(vec![3.0, 4.0])),
                ("title".to_string(), Value::Null),
            ])
        );
        // The same vector as base64 of little-endian f32, with and without padding.
        let bytes: Vec<u8> = [3.0f32, 4.0].iter().flat_map(|x| x.to_le_bytes()).collect();
        use base64::Engine as _;
        let padded = base64::engine::general_purpose::STANDARD.encode(&bytes);
        let unpadded = base64::engine::general_purpose::STANDARD_NO_PAD.encode(&bytes);
        for text in [padded, unpadded] {
            let row = json_row(&format!(r#"{{"id": 7, "v": "{text}"}}"#)).unwrap();
            assert_eq!(row["v"], Value::Vector(vec![3.0, 4.0]));
        }
    }

    #[test]
    fn json_row_errors_name_the_field() {
        let cases = [
            (r#"{"id": 1, "v": [1, 0], "nope": 1}"#, "field `nope`: no such field in collection `docs`"),
            (r#"{"id": 1.5, "v": [1, 0]}"#, "field `id`: 1.5 is not an integer"),
            (r#"{"id": 1, "v": [1, 0], "year": "x"}"#, "field `year`: \"x\" does not fit type Int32"),
            (r#"{"id": 1, "v": [1, 0], "year": 3000000000}"#, "field `year`: value 3000000000 does not fit type Int32"),
            (r#"{"id": 1, "v": [1, 0], "title": "toolong"}"#, "field `title`: value \"toolong\" does not fit"),
            (r#"{"id": 1, "v": [1, 0, 0]}"#, "field `v`: dimension 3 does not match dim 2"),
            (r#"{"id": 1, "v": [1, "x"]}"#, "field `v`: a vector holds something that is not a number: element 1"),
            (r#"{"id": 1, "v": [1, 1e300]}"#, "field `v`: element 1 is outside the range of f32"),
            (r#"{"id": 1, "v": [0, 0]}"#, "field `v`: a zero vector has no direction for COSINE"),
            (r#"{"id": 1, "v": "AACAPw"}"#, "field `v`: base64 vector of 4 bytes, but dim 2 needs 8 bytes"),
            (r#"{"id": 1, "v": "not base64!"}"#, "field `v`: a vector string must be base64"),
            (r#"{"id": null, "v": [1, 0]}"#, "field `id`: null, but the field is not nullable"),
            (r#"{"v": [1, 0]}"#, "field `id`: missing"),
            (r#"{"id": 1}"#, "field `v`: missing"),
        ];
        for (text, expected) in cases {
            let error = json_row(text).unwrap_err();
            assert!(matches!(error, Error::Field { .. }), "{text}: {error:?}");
            assert!(error.to_string().starts_with(expected), "{text}: {error}");
        }
        // A null for a field with a default is allowed (the write fills it).
        assert_eq!(json_row(r#"{"id": 1, "v": [1, 0], "year": null}"#).unwrap()["year"], Value::Null);
        let auto = CollectionSchema::new(
            "auto",
            vec![FieldSchema::int64_primary("id", true), FieldSchema::vector("v", 1, Metric::L2)],
        );
        let object = serde_json::json!({"id": 1, "v": [1]}).as_object().cloned().unwrap();
        let error = row_from_json(&auto, object).unwrap_err().to_string();
        assert!(error.starts_with("field `id`: the primary key is assigned by the engine (auto_id)"), "{error}");
        let object = serde_json::json!({"v": [1]}).as_object().cloned().unwrap();
        assert_eq!(row_from_json(&auto, object).unwrap().len(), 1);
    }

    #[test]
    fn a_field_given_twice_is_refused() {
        let ids: ArrayRef = Arc::new(Int64Array::from(vec![1]));
        let others: ArrayRef = Arc::new(Int64Array::from(vec![2]));
        let vectors = vector_array(2, vec![1.0, 0.0]).unwrap();
        let fields = vec![
            Field::new("id", ArrowType::Int64, true),
            Field::new("v", vectors.data_type().clone(), true),
            Field::new("id", ArrowType::Int64, true),
        ];
        let input =
            RecordBatch::try_new(Arc::new(arrow::datatypes::Schema::new(fields)), vec![ids, vectors, others]).unwrap();
        let error = WriteBatch::from_record_batch(&schema(), &input, WriteKind::Upsert).unwrap_err();
        assert!(matches!(error, Error::Field { .. }), "{error:?}");
        assert_eq!(error.to_string(), "field `id`: given twice: a write holds one column per field");
    }

    #[test]
    fn vectors_whose_scores_overflow_f32_are_refused() {
        let l2 = CollectionSchema::new(
            "l2",
            vec![FieldSchema::int64_primary("id", false), FieldSchema::vector("v", 2, Metric::L2)],
        );
        for s in [&schema(), &l2] {
            // 3e38 is a finite f32; its square is not.
            let error = WriteBatch::from_rows(s, &[row(1, vec![3e38, 0.0])], WriteKind::Upsert).unwrap_err();
            assert!(matches!(error, Error::Field { .. }), "{error:?}");
            let message = error.to_string();
            assert!(message.starts_with("field `v`: row 0: squared norm 9.000e76 exceeds"), "{message}");
            assert!(message.ends_with("its scores would overflow f32"), "{message}");
            let error = WriteBatch::from_rows(s, &[row(1, vec![f32::NAN, 0.0])], WriteKind::Upsert).unwrap_err();
            assert_eq!(error.to_string(), "field `v`: row 0: element 0 is NaN: vectors hold finite numbers");
        }
        // Each element fits, the sum of squares does not.
        let error = check_vector("v", "query 0", &[1.5e19, 1.5e19]).unwrap_err().to_string();
        assert!(error.starts_with("field `v`: query 0: squared norm 4.500e38 exceeds"), "{error}");
        // Large but safe: every L2 distance between two such vectors is finite in f32.
        let big = (MAX_SQUARED_NORM / 2.0).sqrt() as f32;
        check_vector("v", "row 0", &[big, big]).unwrap();
        let distance: f32 = [big, big].iter().zip([-big, -big]).map(|(a, b)| (a - b) * (a - b)).sum();
        assert!(distance.is_finite(), "{distance}");
        WriteBatch::from_rows(&l2, &[row(1, vec![1e18, -1e18])], WriteKind::Upsert).unwrap();
        let error = json_row(r#"{"id": 1, "v": [3e38, 0]}"#).unwrap_err().to_string();
        assert!(error.starts_with("field `v`: the vector: squared norm"), "{error}");
    }

    #[test]
    fn errors_quote_long_names_and_values_short() {
        let long = "n".repeat(10_000);
        let mut bad = row(1, vec![1.0, 0.0]);
        bad.insert(long.clone(), Value::Int(1));
        let message = WriteBatch::from_rows(&schema(), &[bad], WriteKind::Upsert).unwrap_err().to_string();
        assert!(message.len() < 200, "{} bytes: {}", message.len(), &message[..200]);
        assert!(message.contains("… (10000 characters)"), "{message}");
        let mut bad = row(1, vec![1.0, 0.0]);
        bad.insert("title".into(), Value::String("t".repeat(1 << 20)));
        let message = WriteBatch::from_rows(&schema(), &[bad], WriteKind::Upsert).unwrap_err().to_string();
        assert!(message.len() < 200 && message.starts_with("field `title`: value \"ttt"), "{}", &message[..200]);
        let object = serde_json::Map::from_iter([(long, serde_json::Value::from(1))]);
        let message = row_from_json(&schema(), object).unwrap_err().to_string();
        assert!(message.len() < 200 && message.contains("(10000 characters)"), "{}", message.len());
    }

    /// The stream of one small batch, as our writer frames it.
    fn ipc_stream() -> Vec<u8> {
        IpcBatch(WriteBatch::from_rows(&schema(), &[row(1, vec![1.0, 0.0])], WriteKind::Upsert).unwrap().batch)
            .to_bytes()
            .unwrap()
    }

    #[test]
    fn ipc_lengths_beyond_the_bytes_are_refused_before_decoding() {
        // A continuation marker and 2 GiB of metadata in 16 bytes: Arrow's
        // reader would allocate (and zero) the 2 GiB before finding the end.
        let mut hostile = vec![0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x7f];
        hostile.extend([0; 8]);
        assert_eq!(
            check_ipc_stream(&hostile).unwrap_err(),
            "message 0: metadata of 2147483647 bytes, but 8 bytes follow its length prefix"
        );
        let error = IpcBatch::from_bytes(&hostile).unwrap_err();
        assert!(matches!(error, Error::Corrupt { .. }), "{error:?}");
        // Negative lengths, with and without the continuation marker (older writers).
        let negative = [0xff, 0xff, 0xff, 0xff, 0x00, 0x00, 0x00, 0x80];
        assert!(check_ipc_stream(&negative).unwrap_err().contains("metadata of -2147483648 bytes"));
        let legacy = [0x00, 0x00, 0x00, 0x80, 0, 0, 0, 0];
        assert!(check_ipc_stream(&legacy).unwrap_err().contains("metadata of -2147483648 bytes"));
        assert!(check_ipc_stream(&[0xff, 0xff]).unwrap_err().contains("ends inside a length prefix"));

        let stream = ipc_stream();
        check_ipc_stream(&stream).unwrap();
        assert_eq!(check_ipc_stream(&[]), Ok(()));
        // Cut inside the record batch's body: the body no longer fits.
        let end_marker = 8;
        let cut = &stream[..stream.len() - end_marker - 4];
        let problem = check_ipc_stream(cut).unwrap_err();
        assert!(
            problem.starts_with("message 1: body of ") && problem.contains("bytes follow its metadata"),
            "{problem}"
        );
        // Metadata that is not a flatbuffer Message.
        let mut garbage = vec![0xff, 0xff, 0xff, 0xff, 8, 0, 0, 0];
        garbage.extend([0xab; 8]);
        assert!(check_ipc_stream(&garbage).unwrap_err().contains("not an Arrow IPC message"));
    }

    /// A record batch message whose body is compressed: each compressed
    /// buffer declares its decompressed size, which Arrow's reader allocates
    /// up front (with the lz4 and zstd features the server is built with).
    fn compressed_batch_message() -> Vec<u8> {
        use arrow::ipc::{
            BodyCompressionBuilder, CompressionType, MessageBuilder, MessageHeader, MetadataVersion, RecordBatchBuilder,
        };
        let mut builder = flatbuffers::FlatBufferBuilder::new();
        let compression = {
            let mut compression = BodyCompressionBuilder::new(&mut builder);
            compression.add_codec(CompressionType::LZ4_FRAME);
            compression.finish()
        };
        let batch = {
            let mut batch = RecordBatchBuilder::new(&mut builder);
            batch.add_length(1);
            batch.add_compression(compression);
            batch.finish()
        };
        let mut message = MessageBuilder::new(&mut builder);
        message.add_version(MetadataVersion::V5);
        message.add_header_type(MessageHeader::RecordBatch);
        message.add_header(batch.as_union_value());
        message.add_bodyLength(0);
        let message = message.finish();
        builder.finish(message, None);
        let metadata = builder.finished_data();
        let mut framed = vec![0xff, 0xff, 0xff, 0xff];
        framed.extend((metadata.len() as i32).to_le_bytes());
        framed.extend(metadata);
        framed
    }

    #[test]
    fn compressed_ipc_bodies_are_refused() {
        let hostile = compressed_batch_message();
        assert_eq!(
            check_ipc_stream(&hostile).unwrap_err(),
            "message 0: compressed bodies are not accepted; send it uncompressed"
        );
    }

    #[test]
    fn last_row_of_a_key_wins_and_ipc_round_trips() {
        let rows = [row(1, vec![1.0, 0.0]), row(2, vec![0.0, 1.0]), row(1, vec![0.0, 2.0])];
        let write = WriteBatch::from_rows(&schema(), &rows, WriteKind::Upsert).unwrap();
        assert_eq!(write.pks, vec![Pk::Int(2), Pk::Int(1)]);
        let back = IpcBatch::from_bytes(&IpcBatch(write.batch.clone()).to_bytes().unwrap()).unwrap();
        assert_eq!(back.0, write.batch);
    }
}
