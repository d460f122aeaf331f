//! Kafka records as writes: the key and value bytes of one record decoded
//! into an upsert of a row or a delete of a key, checked against the
//! collection schema. No Kafka client is involved; the source feeds each
//! record's bytes here and sends a record that fails to a dead-letter topic
//! with the error's text as its reason.
//!
//! Conventions (those of Kafka Connect and Debezium):
//!
//! - The record key is the primary key: for an `int64` key decimal text
//!   (`42`) or a JSON number; for a `varchar` key its UTF-8 text, or a JSON
//!   string (unquoted). A JSON object key (`{"id": 42}`, also inside
//!   Kafka Connect's `{"schema": …, "payload": …}` envelope) gives the
//!   primary-key field. An empty key counts as no key.
//! - A null value (a tombstone) deletes the key.
//! - [`RecordFormat::Json`]: the value is the row as a JSON object (vectors
//!   as number arrays or base64 of little-endian `f32`); `{"op": "delete"}`
//!   deletes. The primary key may be in the value; when the key gives it too
//!   the two must agree.
//! - [`RecordFormat::Debezium`]: the value is a change event (`before`,
//!   `after`, `op`), possibly in the Kafka Connect envelope: `c`, `u` and `r`
//!   upsert `after`; `d` deletes the record key, else the key in `before`.
//!
//! Rows go through [`row_from_json`], the check the CLI uses, so a record is
//! refused for the same reasons as a bad line of a JSON lines file.

use serde_json::{Map, Value as J};
use vectorflow_core::batch::{Row, row_from_json};
use vectorflow_core::value::{value_from_json, vector_to_base64};
use vectorflow_core::{CollectionSchema, DataType, Error, FieldSchema, Pk, Value};

/// How a record's value is laid out.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RecordFormat {
    #[default]
    /// The row as one JSON object; `{"op": "delete"}` deletes.
    Json,
    /// A Debezium change event, with or without the `schema`/`payload` envelope.
    Debezium,
}

/// What one record asks of the collection.
#[derive(Debug, Clone, PartialEq)]
pub enum Mutation {
    /// Write this row (replacing the key's current row). Without the primary
    /// key only for an `auto_id` collection, where the engine assigns it.
    Upsert(Row),
    /// Delete the row of this key.
    Delete(Pk),
}

/// Why a record cannot be applied; the text names the part of the record
/// (key, value, op or field) and the problem, for a dead-letter header.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    /// The record key is missing, malformed, or disagrees with the value.
    #[error("key: {0}")]
    Key(String),
    /// The value is not JSON, not an object, or not a change event.
    #[error("value: {0}")]
    Value(String),
    /// The operation is one this decoder does not apply.
    #[error("op: {0}")]
    Op(String),
    /// A field of the row does not fit the schema.
    #[error("field `{field}`: {problem}")]
    Field { field: String, problem: String },
}

impl From<Error> for DecodeError {
    fn from(error: Error) -> Self {
        match error {
            Error::Field { field, problem } => DecodeError::Field { field, problem },
            other => DecodeError::Value(other.to_string()),
        }
    }
}

/// The record key of a primary key: decimal text or the string's UTF-8,
/// what [`decode`] reads back and what Kafka's string serializers write.
pub fn encode_key(pk: &Pk) -> Vec<u8> {
    match pk {
        Pk::Int(v) => v.to_string().into_bytes(),
        Pk::Str(v) => v.clone().into_bytes(),
    }
}

/// Row `row` of a canonical batch of `schema` as a record value: a JSON
/// object of its non-null fields, vectors as base64 of little-endian `f32`
/// (exact, and half the size of number arrays), JSON fields as JSON.
/// [`decode`] reads it back to the same row.
pub fn encode_row(schema: &CollectionSchema, batch: &arrow::record_batch::RecordBatch, row: usize) -> Vec<u8> {
    let mut object = Map::new();
    for (field, column) in schema.fields.iter().zip(batch.columns()) {
        let json = match (Value::from_array(column.as_ref(), row), &field.data_type) {
            (Value::Null, _) => continue,
            (Value::Vector(v), _) => J::String(vector_to_base64(&v)),
            (Value::String(text), DataType::Json) => serde_json::from_str(&text).unwrap_or(J::String(text)),
            (value, _) => value.to_json(),
        };
        object.insert(field.name.clone(), json);
    }
    J::Object(object).to_string().into_bytes()
}

fn missing_key() -> DecodeError {
    DecodeError::Key("missing".into())
}

/// Decodes one record of a topic feeding `schema`. `None` is an absent key
/// or value (a null value is a tombstone). Never panics, whatever the bytes.
pub fn decode(
    schema: &CollectionSchema,
    format: RecordFormat,
    key: Option<&[u8]>,
    value: Option<&[u8]>,
) -> Result<Mutation, DecodeError> {
    let primary = schema.primary();
    let key = key.filter(|k| !k.is_empty()).map(|k| key_from_bytes(primary, k)).transpose()?;
    let Some(value) = value else {
        return key.map(Mutation::Delete).ok_or_else(missing_key);
    };
    let json: J = serde_json::from_slice(value).map_err(|e| DecodeError::Value(format!("not JSON: {e}")))?;
    let J::Object(object) = json else {
        return Err(DecodeError::Value(format!("not a JSON object: {}", short(&json))));
    };
    match format {
        RecordFormat::Json => decode_json(schema, key, object),
        RecordFormat::Debezium => decode_debezium(schema, key, object),
    }
}

fn decode_json(
    schema: &CollectionSchema,
    key: Option<Pk>,
    mut object: Map<String, J>,
) -> Result<Mutation, DecodeError> {
    // `op` is an instruction only where it is not a field of the collection.
    if schema.field_index("op").is_none()
        && let Some(op) = object.remove("op")
    {
        if op.as_str() != Some("delete") {
            return Err(DecodeError::Op(format!("{} is not \"delete\" (leave `op` out to upsert)", short(&op))));
        }
        let primary = schema.primary();
        let given = object.remove(&primary.name).map(|json| pk_from_json(primary, json)).transpose()?;
        return agree(&primary.name, "the value", key, given)?.map(Mutation::Delete).ok_or_else(missing_key);
    }
    upsert(schema, key, object)
}

fn decode_debezium(
    schema: &CollectionSchema,
    key: Option<Pk>,
    object: Map<String, J>,
) -> Result<Mutation, DecodeError> {
    let mut event = match unwrap_envelope(J::Object(object)) {
        J::Object(event) => event,
        // A null payload is a tombstone in the envelope.
        J::Null => return key.map(Mutation::Delete).ok_or_else(missing_key),
        other => return Err(DecodeError::Value(format!("payload is not a JSON object: {}", short(&other)))),
    };
    let op = match event.get("op") {
        Some(J::String(op)) => op.clone(),
        Some(other) => return Err(DecodeError::Op(format!("{} is not a string", short(other)))),
        None => return Err(DecodeError::Op("missing: not a Debezium change event".into())),
    };
    match op.as_str() {
        "c" | "u" | "r" => match event.remove("after") {
            Some(J::Object(after)) => upsert(schema, key, after),
            None | Some(J::Null) => Err(DecodeError::Value(format!("op `{op}` without `after`"))),
            Some(other) => Err(DecodeError::Value(format!("`after` is not a JSON object: {}", short(&other)))),
        },
        "d" => {
            let primary = schema.primary();
            let given = match event.remove("before") {
                Some(J::Object(mut before)) => {
                    before.remove(&primary.name).map(|json| pk_from_json(primary, json)).transpose()?
                }
                None | Some(J::Null) => None,
                Some(other) => {
                    return Err(DecodeError::Value(format!("`before` is not a JSON object: {}", short(&other))));
                }
            };
            agree(&primary.name, "`before`", key, given)?.map(Mutation::Delete).ok_or_else(missing_key)
        }
        "t" => Err(DecodeError::Op("`t` (truncate) is not supported: it names no keys to delete".into())),
        other => Err(DecodeError::Op(format!("unknown op {other:?}, expected c, u, r or d"))),
    }
}

/// A row to upsert from a JSON object, its key from the record key and/or
/// the object's primary-key field.
fn upsert(schema: &CollectionSchema, key: Option<Pk>, mut object: Map<String, J>) -> Result<Mutation, DecodeError> {
    let primary = schema.primary();
    let given = object.get(&primary.name).map(|json| pk_from_json(primary, json.clone())).transpose()?;
    match agree(&primary.name, "the value", key, given)? {
        None if primary.auto_id => Ok(Mutation::Upsert(row_from_json(schema, object)?)),
        None => Err(missing_key()),
        // An auto_id key given by the record is kept (an upsert of that key,
        // so a replayed record rewrites the same row); `row_from_json` only
        // takes rows whose auto_id key is left out.
        Some(pk) if primary.auto_id => {
            object.remove(&primary.name);
            let mut row = row_from_json(schema, object)?;
            row.insert(primary.name.clone(), pk.into());
            Ok(Mutation::Upsert(row))
        }
        Some(pk) => {
            object.insert(primary.name.clone(), Value::from(pk).to_json());
            Ok(Mutation::Upsert(row_from_json(schema, object)?))
        }
    }
}

/// The key both sides give, or the one that is given; an error if they differ.
fn agree(field: &str, place: &str, key: Option<Pk>, given: Option<Pk>) -> Result<Option<Pk>, DecodeError> {
    match (key, given) {
        (Some(key), Some(given)) if key != given => {
            Err(DecodeError::Key(format!("{key} does not match field `{field}` = {given} in {place}")))
        }
        (key, given) => Ok(key.or(given)),
    }
}

/// The record key's bytes as a primary key of `primary`'s type.
fn key_from_bytes(primary: &FieldSchema, bytes: &[u8]) -> Result<Pk, DecodeError> {
    let text = std::str::from_utf8(bytes).map_err(|e| DecodeError::Key(format!("not UTF-8: {e}")))?;
    if let DataType::VarChar { .. } = primary.data_type {
        return match serde_json::from_str::<J>(text) {
            Ok(J::String(s)) => Ok(Pk::Str(s)),
            Ok(json @ J::Object(_)) => key_from_json(primary, json),
            _ => Ok(Pk::Str(text.to_string())),
        };
    }
    if let Ok(v) = text.trim().parse::<i64>() {
        return Ok(Pk::Int(v));
    }
    match serde_json::from_str::<J>(text) {
        Ok(json) => key_from_json(primary, json),
        Err(_) => Err(DecodeError::Key(format!(
            "{} is not an int64 key (decimal text, a JSON number, or a JSON object with `{}`)",
            short(&J::String(text.to_string())),
            primary.name
        ))),
    }
}

/// A JSON key: the primary-key field of an object (Debezium, Kafka Connect),
/// else the value itself.
fn key_from_json(primary: &FieldSchema, json: J) -> Result<Pk, DecodeError> {
    let as_key = |e: DecodeError| DecodeError::Key(e.to_string());
    match unwrap_envelope(json) {
        J::Object(mut object) => match object.remove(&primary.name) {
            Some(json) => pk_from_json(primary, json).map_err(as_key),
            None => Err(DecodeError::Key(format!("a JSON object without field `{}`", primary.name))),
        },
        J::String(s) if !matches!(primary.data_type, DataType::VarChar { .. }) => s
            .trim()
            .parse::<i64>()
            .map(Pk::Int)
            .map_err(|_| DecodeError::Key(format!("{} is not an int64 key", short(&J::String(s.clone()))))),
        json => pk_from_json(primary, json).map_err(as_key),
    }
}

/// A primary key from a JSON value of the field's type.
fn pk_from_json(primary: &FieldSchema, json: J) -> Result<Pk, DecodeError> {
    let problem = |problem: &str| DecodeError::Field { field: primary.name.clone(), problem: problem.to_string() };
    match value_from_json(&primary.name, &primary.data_type, json)? {
        Value::Int(v) => Ok(Pk::Int(v)),
        Value::String(s) => Ok(Pk::Str(s)),
        Value::Null => Err(problem("null, but a primary key cannot be null")),
        _ => Err(problem("a primary key must be int64 or varchar")),
    }
}

/// The payload of Kafka Connect's JSON envelope (`{"schema": …, "payload": …}`,
/// JsonConverter with `schemas.enable=true`); anything else as it is.
fn unwrap_envelope(json: J) -> J {
    match json {
        J::Object(mut object) if object.len() == 2 && object.contains_key("schema") => match object.remove("payload") {
            Some(payload) => payload,
            None => J::Object(object),
        },
        other => other,
    }
}

/// JSON as text for an error message, cut at 60 characters.
fn short(json: &J) -> String {
    let text = json.to_string();
    match text.char_indices().nth(60) {
        Some((end, _)) => format!("{}…", &text[..end]),
        None => text,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use vectorflow_core::Metric;

    /// `id` int64 key, `v` 3-d L2, `title` nullable varchar, `year` with a default.
    fn int_schema() -> CollectionSchema {
        CollectionSchema::new(
            "docs",
            vec![
                FieldSchema::int64_primary("id", false),
                FieldSchema::vector("v", 3, Metric::L2),
                FieldSchema::new("title", DataType::VarChar { max_length: 8 }).nullable(),
                FieldSchema::new("year", DataType::Int32).with_default(Value::Int(1999)),
            ],
        )
    }

    /// `name` varchar key, `v` 2-d COSINE.
    fn str_schema() -> CollectionSchema {
        CollectionSchema::new(
            "names",
            vec![FieldSchema::varchar_primary("name", 16), FieldSchema::vector("v", 2, Metric::COSINE)],
        )
    }

    fn auto_schema() -> CollectionSchema {
        CollectionSchema::new(
            "auto",
            vec![FieldSchema::int64_primary("id", true), FieldSchema::vector("v", 3, Metric::L2)],
        )
    }

    fn json(schema: &CollectionSchema, key: Option<&str>, value: Option<&str>) -> Result<Mutation, DecodeError> {
        decode(schema, RecordFormat::Json, key.map(str::as_bytes), value.map(str::as_bytes))
    }

    fn debezium(schema: &CollectionSchema, key: Option<&str>, value: &str) -> Result<Mutation, DecodeError> {
        decode(schema, RecordFormat::Debezium, key.map(str::as_bytes), Some(value.as_bytes()))
    }

    fn row(id: i64, v: [f32; 3]) -> Row {
        Row::from([("id".to_string(), Value::Int(id)), ("v".to_string(), Value::Vector(v.to_vec()))])
    }

    fn upsert_of(id: i64, v: [f32; 3]) -> Mutation {
        Mutation::Upsert(row(id, v))
    }

    fn error(result: Result<Mutation, DecodeError>) -> String {
        result.expect_err("expected an error").to_string()
    }

    /// Kafka Connect's JSON envelope around `payload`.
    fn envelope(payload: &str) -> String {
        format!(r#"{{"schema": {{"type": "struct", "optional": false}}, "payload": {payload}}}"#)
    }

    #[test]
    fn encoded_rows_decode_to_the_same_row() {
        let schema = int_schema();
        let rows = [row(7, [0.1, -2.5, f32::MIN_POSITIVE]), row(8, [1e-30, 3.0, -0.0])];
        let write =
            vectorflow_core::batch::WriteBatch::from_rows(&schema, &rows, vectorflow_core::batch::WriteKind::Upsert)
                .unwrap();
        for (i, pk) in write.pks.iter().enumerate() {
            let key = encode_key(pk);
            let value = encode_row(&schema, &write.batch, i);
            let decoded = decode(&schema, RecordFormat::Json, Some(&key), Some(&value)).unwrap();
            let Mutation::Upsert(decoded) = decoded else { panic!("an upsert") };
            // Vectors come back bit for bit (base64 of the f32 bytes).
            assert_eq!(decoded.get("v"), rows[i].get("v"));
            assert_eq!(decoded.get("id"), rows[i].get("id"));
        }
    }

    #[test]
    fn int_keys_as_text_number_object_and_envelope() {
        let s = int_schema();
        let value = r#"{"v": [1, 0, 0]}"#;
        for key in ["42", " 42\n", "\"42\"", r#"{"id": 42}"#, &envelope(r#"{"id": 42}"#), &envelope("42")] {
            assert_eq!(json(&s, Some(key), Some(value)), Ok(upsert_of(42, [1.0, 0.0, 0.0])), "key {key}");
        }
        assert_eq!(json(&s, Some("-7"), None), Ok(Mutation::Delete(Pk::Int(-7))));
        let cases = [
            ("abc", "key: \"abc\" is not an int64 key"),
            ("1.5", "key: field `id`: 1.5 is not an integer"),
            ("99999999999999999999", "key: field `id`: 1e+20 is not an integer"),
            ("true", "key: field `id`: true does not fit type Int64"),
            (r#"{"other": 1}"#, "key: a JSON object without field `id`"),
            (r#"{"id": null}"#, "key: field `id`: null, but a primary key cannot be null"),
        ];
        for (key, expected) in cases {
            let message = error(json(&s, Some(key), Some(value)));
            assert!(message.starts_with(expected), "key {key}: {message}");
        }
        let message = error(decode(&s, RecordFormat::Json, Some(&[0xff, 0xfe]), Some(value.as_bytes())));
        assert!(message.starts_with("key: not UTF-8"), "{message}");
    }

    #[test]
    fn varchar_keys_as_text_json_string_and_object() {
        let s = str_schema();
        let value = r#"{"v": [1, 2]}"#;
        let expected = |name: &str| {
            Ok(Mutation::Upsert(Row::from([
                ("name".to_string(), Value::String(name.to_string())),
                ("v".to_string(), Value::Vector(vec![1.0, 2.0])),
            ])))
        };
        assert_eq!(json(&s, Some("abc"), Some(value)), expected("abc"));
        assert_eq!(json(&s, Some("\"abc\""), Some(value)), expected("abc"));
        assert_eq!(json(&s, Some("42"), Some(value)), expected("42"));
        assert_eq!(json(&s, Some(r#"{"name": "abc"}"#), Some(value)), expected("abc"));
        assert_eq!(json(&s, Some(&envelope(r#"{"name": "abc"}"#)), Some(value)), expected("abc"));
        assert_eq!(json(&s, Some("a b"), None), Ok(Mutation::Delete(Pk::Str("a b".into()))));
        let message = error(json(&s, Some(r#"{"name": 42}"#), Some(value)));
        assert!(message.starts_with("key: field `name`: 42 does not fit type VarChar"), "{message}");
        // The row's checks apply to a key from the record too.
        let message = error(json(&s, Some("seventeen chars.."), Some(value)));
        assert!(message.starts_with("field `name`: value \"seventeen chars..\" does not fit"), "{message}");
    }

    #[test]
    fn tombstones_delete_the_key() {
        let s = int_schema();
        assert_eq!(json(&s, Some("42"), None), Ok(Mutation::Delete(Pk::Int(42))));
        assert_eq!(
            debezium(&s, Some("42"), "null").map_err(|e| e.to_string()),
            Err("value: not a JSON object: null".into())
        );
        assert_eq!(decode(&s, RecordFormat::Debezium, Some(b"42"), None), Ok(Mutation::Delete(Pk::Int(42))));
        assert_eq!(error(json(&s, None, None)), "key: missing");
        assert_eq!(error(json(&s, Some(""), None)), "key: missing");
        assert_eq!(error(decode(&s, RecordFormat::Debezium, None, None)), "key: missing");
    }

    #[test]
    fn op_delete_in_json_deletes() {
        let s = int_schema();
        assert_eq!(json(&s, Some("42"), Some(r#"{"op": "delete"}"#)), Ok(Mutation::Delete(Pk::Int(42))));
        assert_eq!(json(&s, None, Some(r#"{"op": "delete", "id": 42}"#)), Ok(Mutation::Delete(Pk::Int(42))));
        assert_eq!(json(&s, Some("42"), Some(r#"{"op": "delete", "id": 42}"#)), Ok(Mutation::Delete(Pk::Int(42))));
        assert_eq!(error(json(&s, None, Some(r#"{"op": "delete"}"#))), "key: missing");
        let message = error(json(&s, Some("42"), Some(r#"{"op": "delete", "id": 43}"#)));
        assert_eq!(message, "key: 42 does not match field `id` = 43 in the value");
        let message = error(json(&s, Some("42"), Some(r#"{"op": "insert", "v": [1, 0, 0]}"#)));
        assert!(message.starts_with("op: \"insert\" is not \"delete\""), "{message}");
        // Where `op` is a field of the collection, it is data.
        let with_op = CollectionSchema::new(
            "ops",
            vec![
                FieldSchema::int64_primary("id", false),
                FieldSchema::vector("v", 1, Metric::L2),
                FieldSchema::new("op", DataType::VarChar { max_length: 8 }),
            ],
        );
        let decoded = json(&with_op, Some("1"), Some(r#"{"op": "delete", "v": [1]}"#)).unwrap();
        let Mutation::Upsert(row) = decoded else { panic!("expected an upsert: {decoded:?}") };
        assert_eq!(row["op"], Value::String("delete".into()));
    }

    #[test]
    fn key_and_value_must_agree_and_either_may_give_it() {
        let s = int_schema();
        let v = [1.0, 0.0, 0.0];
        assert_eq!(json(&s, Some("42"), Some(r#"{"id": 42, "v": [1, 0, 0]}"#)), Ok(upsert_of(42, v)));
        assert_eq!(json(&s, None, Some(r#"{"id": 42, "v": [1, 0, 0]}"#)), Ok(upsert_of(42, v)));
        assert_eq!(json(&s, Some("42"), Some(r#"{"v": [1, 0, 0]}"#)), Ok(upsert_of(42, v)));
        let message = error(json(&s, Some("42"), Some(r#"{"id": 43, "v": [1, 0, 0]}"#)));
        assert_eq!(message, "key: 42 does not match field `id` = 43 in the value");
        let message = error(json(&str_schema(), Some("a"), Some(r#"{"name": "b", "v": [1, 0]}"#)));
        assert_eq!(message, "key: \"a\" does not match field `name` = \"b\" in the value");
        assert_eq!(error(json(&s, None, Some(r#"{"v": [1, 0, 0]}"#))), "key: missing");
        let message = error(json(&s, None, Some(r#"{"id": null, "v": [1, 0, 0]}"#)));
        assert_eq!(message, "field `id`: null, but a primary key cannot be null");
    }

    #[test]
    fn auto_id_rows_may_come_without_a_key() {
        let s = auto_schema();
        let vector = || ("v".to_string(), Value::Vector(vec![1.0, 0.0, 0.0]));
        assert_eq!(json(&s, None, Some(r#"{"v": [1, 0, 0]}"#)), Ok(Mutation::Upsert(Row::from([vector()]))));
        let keyed = Ok(Mutation::Upsert(Row::from([("id".to_string(), Value::Int(5)), vector()])));
        assert_eq!(json(&s, Some("5"), Some(r#"{"v": [1, 0, 0]}"#)), keyed);
        assert_eq!(json(&s, Some("5"), Some(r#"{"id": 5, "v": [1, 0, 0]}"#)), keyed);
        assert_eq!(debezium(&s, None, r#"{"op": "c", "after": {"id": 5, "v": [1, 0, 0]}}"#), keyed);
        assert_eq!(error(json(&s, None, None)), "key: missing");
    }

    #[test]
    fn base64_vectors_with_and_without_padding() {
        // Little-endian f32 [1.5, -2, 0.25] (12 bytes: no padding needed).
        let s = int_schema();
        let decoded = json(&s, Some("1"), Some(r#"{"v": "AADAPwAAAMAAAIA+"}"#));
        assert_eq!(decoded, Ok(upsert_of(1, [1.5, -2.0, 0.25])));
        // [1, 2] is 8 bytes: base64 with and without its padding.
        let s = str_schema();
        for text in ["AACAPwAAAEA=", "AACAPwAAAEA"] {
            let Ok(Mutation::Upsert(row)) = json(&s, Some("a"), Some(&format!(r#"{{"v": "{text}"}}"#))) else {
                panic!("{text} did not decode")
            };
            assert_eq!(row["v"], Value::Vector(vec![1.0, 2.0]));
        }
        // Two floats for a 3-d field; four bytes; not base64.
        let s = int_schema();
        let message = error(json(&s, Some("1"), Some(r#"{"v": "AACAPwAAAEA="}"#)));
        assert!(message.starts_with("field `v`: base64 vector of 8 bytes, but dim 3 needs 12 bytes"), "{message}");
        let message = error(json(&s, Some("1"), Some(r#"{"v": "AACAPw"}"#)));
        assert!(message.starts_with("field `v`: base64 vector of 4 bytes, but dim 3"), "{message}");
        let message = error(json(&s, Some("1"), Some(r#"{"v": "not base64!"}"#)));
        assert!(
            message.starts_with("field `v`: a vector string must be base64 of little-endian f32 (dim 3)"),
            "{message}"
        );
    }

    #[test]
    fn debezium_events_with_and_without_the_envelope() {
        let s = int_schema();
        let after = r#"{"id": 7, "v": [1, 0, 0]}"#;
        for op in ["c", "u", "r"] {
            let event = format!(r#"{{"before": null, "after": {after}, "op": "{op}", "ts_ms": 1, "source": {{}}}}"#);
            assert_eq!(debezium(&s, Some(r#"{"id": 7}"#), &event), Ok(upsert_of(7, [1.0, 0.0, 0.0])), "{op}");
            assert_eq!(debezium(&s, None, &envelope(&event)), Ok(upsert_of(7, [1.0, 0.0, 0.0])), "{op}");
            let key = envelope(r#"{"id": 7}"#);
            assert_eq!(debezium(&s, Some(&key), &envelope(&event)), Ok(upsert_of(7, [1.0, 0.0, 0.0])), "{op}");
        }
        let delete = r#"{"before": {"id": 7, "v": [1, 0, 0]}, "after": null, "op": "d"}"#;
        assert_eq!(debezium(&s, Some(r#"{"id": 7}"#), delete), Ok(Mutation::Delete(Pk::Int(7))));
        assert_eq!(debezium(&s, None, delete), Ok(Mutation::Delete(Pk::Int(7))));
        assert_eq!(debezium(&s, None, &envelope(delete)), Ok(Mutation::Delete(Pk::Int(7))));
        let bare = r#"{"before": null, "after": null, "op": "d"}"#;
        assert_eq!(debezium(&s, Some("7"), bare), Ok(Mutation::Delete(Pk::Int(7))));
        assert_eq!(error(debezium(&s, None, bare)), "key: missing");
        assert_eq!(error(debezium(&s, Some("8"), delete)), "key: 8 does not match field `id` = 7 in `before`");
        // A null payload in the envelope is a tombstone.
        assert_eq!(debezium(&s, Some("7"), &envelope("null")), Ok(Mutation::Delete(Pk::Int(7))));
        assert_eq!(
            error(debezium(&s, Some("7"), r#"{"op": "t", "before": null, "after": null}"#)).as_str(),
            "op: `t` (truncate) is not supported: it names no keys to delete"
        );
        let message = error(debezium(&s, Some("7"), r#"{"op": "x", "after": {}}"#));
        assert!(message.starts_with("op: unknown op \"x\""), "{message}");
        assert_eq!(error(debezium(&s, Some("7"), r#"{"after": {}}"#)), "op: missing: not a Debezium change event");
        assert_eq!(error(debezium(&s, Some("7"), r#"{"op": 1}"#)), "op: 1 is not a string");
        assert_eq!(error(debezium(&s, Some("7"), r#"{"op": "c", "after": null}"#)), "value: op `c` without `after`");
        assert_eq!(
            error(debezium(&s, Some("7"), r#"{"op": "u", "after": [1]}"#)),
            "value: `after` is not a JSON object: [1]"
        );
        assert_eq!(error(debezium(&s, Some("7"), &envelope("3"))), "value: payload is not a JSON object: 3");
        let unknown = r#"{"op": "c", "after": {"id": 7, "v": [1, 0, 0], "colour": "red"}}"#;
        assert_eq!(error(debezium(&s, None, unknown)), "field `colour`: no such field in collection `docs`");
        let wrong = r#"{"op": "u", "after": {"id": 7, "v": [1, 0]}}"#;
        assert_eq!(error(debezium(&s, None, wrong)), "field `v`: dimension 2 does not match dim 3");
    }

    #[test]
    fn row_errors_name_the_field() {
        let s = int_schema();
        let cases = [
            (r#"{"v": [1, 0, 0], "colour": 1}"#, "field `colour`: no such field in collection `docs`"),
            (r#"{"v": [1, 0, 0], "year": "x"}"#, "field `year`: \"x\" does not fit type Int32"),
            (r#"{"v": [1, 0, 0], "title": 7}"#, "field `title`: 7 does not fit type VarChar"),
            (r#"{"v": [1, 0, 0, 0, 0, 0, 0, 0]}"#, "field `v`: dimension 8 does not match dim 3"),
            (r#"{"v": [1, "x", 0]}"#, "field `v`: a vector holds something that is not a number: element 1"),
            (r#"{"v": [1, 1e300, 0]}"#, "field `v`: element 1 is outside the range of f32"),
            (r#"{"v": null}"#, "field `v`: null, but the field is not nullable"),
            (r#"{"title": "x"}"#, "field `v`: missing"),
        ];
        for (value, expected) in cases {
            let result = json(&s, Some("1"), Some(value));
            assert!(matches!(result, Err(DecodeError::Field { .. })), "{value}: {result:?}");
            let message = error(result);
            assert!(message.starts_with(expected), "{value}: {message}");
        }
        let message = error(json(&str_schema(), Some("a"), Some(r#"{"v": [0, 0]}"#)));
        assert_eq!(message, "field `v`: a zero vector has no direction for COSINE");
    }

    #[test]
    fn values_that_are_not_json_objects() {
        let s = int_schema();
        for format in [RecordFormat::Json, RecordFormat::Debezium] {
            let message = error(decode(&s, format, Some(b"1"), Some(b"{\"v\": [1, 0")));
            assert!(message.starts_with("value: not JSON: "), "{message}");
            let message = error(decode(&s, format, Some(b"1"), Some(b"")));
            assert!(message.starts_with("value: not JSON: "), "{message}");
            let message = error(decode(&s, format, Some(b"1"), Some(&[0xff, 0x00])));
            assert!(message.starts_with("value: not JSON: "), "{message}");
            assert_eq!(error(decode(&s, format, Some(b"1"), Some(b"[1, 0, 0]"))), "value: not a JSON object: [1,0,0]");
            assert_eq!(error(decode(&s, format, Some(b"1"), Some(b"\"x\""))), "value: not a JSON object: \"x\"");
        }
        let long = format!("[{}]", vec!["1"; 100].join(","));
        let message = error(json(&s, Some("1"), Some(&long)));
        assert!(message.ends_with('…') && message.chars().count() < 100, "{message}");
    }

    /// Arbitrary JSON, nested a few levels.
    fn any_json() -> impl Strategy<Value = J> {
        let leaf = prop_oneof![
            Just(J::Null),
            any::<bool>().prop_map(J::Bool),
            any::<i64>().prop_map(J::from),
            any::<f64>().prop_map(J::from),
            "[a-zA-Z0-9+/=\"{} ]{0,12}".prop_map(J::String),
        ];
        leaf.prop_recursive(3, 24, 4, |inner| {
            prop_oneof![
                proptest::collection::vec(inner.clone(), 0..4).prop_map(J::Array),
                proptest::collection::btree_map(field_name(), inner, 0..4)
                    .prop_map(|m| J::Object(m.into_iter().collect())),
            ]
        })
    }

    /// Names the decoder looks at, so arbitrary objects reach its deeper paths.
    fn field_name() -> impl Strategy<Value = String> {
        prop_oneof![
            proptest::sample::select(vec![
                "id", "name", "v", "title", "year", "op", "before", "after", "schema", "payload",
            ])
            .prop_map(str::to_string),
            "[a-z]{1,4}",
        ]
    }

    fn any_bytes() -> impl Strategy<Value = Option<Vec<u8>>> {
        proptest::option::of(prop_oneof![
            proptest::collection::vec(any::<u8>(), 0..32),
            any_json().prop_map(|j| j.to_string().into_bytes()),
            "c|u|d|r|t|delete".prop_map(|op| format!(r#"{{"op": "{op}"}}"#).into_bytes()),
        ])
    }

    fn any_schema() -> impl Strategy<Value = CollectionSchema> {
        proptest::sample::select(vec![int_schema(), str_schema(), auto_schema()])
    }

    fn any_format() -> impl Strategy<Value = RecordFormat> {
        prop_oneof![Just(RecordFormat::Json), Just(RecordFormat::Debezium)]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2000))]

        /// Whatever bytes a topic holds, decoding answers with a mutation or an error.
        #[test]
        fn any_bytes_decode_or_fail_cleanly(
            schema in any_schema(), format in any_format(), key in any_bytes(), value in any_bytes()
        ) {
            let _ = decode(&schema, format, key.as_deref(), value.as_deref());
        }

        /// Arbitrary objects as rows, change events and enveloped events.
        #[test]
        fn any_objects_decode_or_fail_cleanly(
            schema in any_schema(),
            format in any_format(),
            key in proptest::option::of(any_json()),
            object in proptest::collection::btree_map(field_name(), any_json(), 0..6),
            op in "c|u|d|r|t|delete|x",
            wrap in any::<bool>(),
        ) {
            let mut object: Map<String, J> = object.into_iter().collect();
            if format == RecordFormat::Debezium || op == "delete" {
                object.insert("op".into(), J::String(op));
            }
            let mut value = J::Object(object);
            if wrap {
                value = serde_json::json!({"schema": {}, "payload": value});
            }
            let key = key.map(|k| k.to_string());
            let result = decode(&schema, format, key.as_deref().map(str::as_bytes), Some(value.to_string().as_bytes()));
            if let Err(error) = result {
                prop_assert!(!error.to_string().is_empty());
            }
        }
    }
}
