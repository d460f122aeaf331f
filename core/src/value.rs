//! Scalar values and primary keys, and reading them out of Arrow columns.

use std::borrow::Cow;
use std::fmt;

use arrow::array::{Array, AsArray};
use arrow::datatypes::{self as adt, DataType as ArrowType};
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::schema::DataType;

/// A primary key.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum Pk {
    Int(i64),
    Str(String),
}

impl fmt::Display for Pk {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Pk::Int(v) => write!(f, "{v}"),
            Pk::Str(v) => write!(f, "{v:?}"),
        }
    }
}

impl Pk {
    /// A deterministic total order key used to break distance ties, so the
    /// same data gives the same top-k however it is sharded: integers in
    /// their own order, strings by a fixed hash.
    pub fn order_key(&self) -> u64 {
        match self {
            Pk::Int(v) => (*v as u64) ^ (1 << 63),
            Pk::Str(s) => {
                // FNV-1a: stable across builds and platforms.
                s.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3))
            }
        }
    }
}

impl From<i64> for Pk {
    fn from(v: i64) -> Self {
        Pk::Int(v)
    }
}

impl From<&str> for Pk {
    fn from(v: &str) -> Self {
        Pk::Str(v.to_string())
    }
}

impl From<String> for Pk {
    fn from(v: String) -> Self {
        Pk::Str(v)
    }
}

impl From<Pk> for Value {
    fn from(pk: Pk) -> Self {
        match pk {
            Pk::Int(v) => Value::Int(v),
            Pk::Str(v) => Value::String(v),
        }
    }
}

/// One field value of one row. JSON fields travel as their text.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Value {
    Null,
    Bool(bool),
    Int(i64),
    Float(f64),
    String(String),
    Vector(Vec<f32>),
}

impl fmt::Display for Value {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Value::Null => write!(f, "null"),
            Value::Bool(v) => write!(f, "{v}"),
            Value::Int(v) => write!(f, "{v}"),
            Value::Float(v) => write!(f, "{v}"),
            Value::String(v) => write!(f, "{v:?}"),
            Value::Vector(v) if v.len() > 4 => write!(f, "[{}, {}, … {} floats]", v[0], v[1], v.len()),
            Value::Vector(v) => write!(f, "{v:?}"),
        }
    }
}

impl From<bool> for Value {
    fn from(v: bool) -> Self {
        Value::Bool(v)
    }
}
impl From<i64> for Value {
    fn from(v: i64) -> Self {
        Value::Int(v)
    }
}
impl From<i32> for Value {
    fn from(v: i32) -> Self {
        Value::Int(v.into())
    }
}
impl From<f64> for Value {
    fn from(v: f64) -> Self {
        Value::Float(v)
    }
}
impl From<&str> for Value {
    fn from(v: &str) -> Self {
        Value::String(v.to_string())
    }
}
impl From<String> for Value {
    fn from(v: String) -> Self {
        Value::String(v)
    }
}
impl From<Vec<f32>> for Value {
    fn from(v: Vec<f32>) -> Self {
        Value::Vector(v)
    }
}

impl Value {
    /// The value as a primary key (`Int` or `String`), the inverse of `From<Pk>`.
    pub fn as_pk(&self) -> Option<Pk> {
        match self {
            Value::Int(v) => Some(Pk::Int(*v)),
            Value::String(v) => Some(Pk::Str(v.clone())),
            _ => None,
        }
    }

    /// Reads row `row` of an Arrow column of one of the types schemas map to.
    pub fn from_array(array: &dyn Array, row: usize) -> Value {
        if array.is_null(row) {
            return Value::Null;
        }
        match array.data_type() {
            ArrowType::Boolean => Value::Bool(array.as_boolean().value(row)),
            ArrowType::Int8 => Value::Int(array.as_primitive::<adt::Int8Type>().value(row).into()),
            ArrowType::Int16 => Value::Int(array.as_primitive::<adt::Int16Type>().value(row).into()),
            ArrowType::Int32 => Value::Int(array.as_primitive::<adt::Int32Type>().value(row).into()),
            ArrowType::Int64 => Value::Int(array.as_primitive::<adt::Int64Type>().value(row)),
            ArrowType::Float32 => Value::Float(array.as_primitive::<adt::Float32Type>().value(row).into()),
            ArrowType::Float64 => Value::Float(array.as_primitive::<adt::Float64Type>().value(row)),
            ArrowType::Utf8 => Value::String(array.as_string::<i32>().value(row).to_string()),
            ArrowType::FixedSizeList(_, _) => {
                let list = array.as_fixed_size_list();
                let values = list.value(row);
                Value::Vector(values.as_primitive::<adt::Float32Type>().values().to_vec())
            }
            _ => Value::Null,
        }
    }

    pub fn as_i64(&self) -> Option<i64> {
        match self {
            Value::Int(v) => Some(*v),
            _ => None,
        }
    }

    pub fn as_f64(&self) -> Option<f64> {
        match self {
            Value::Int(v) => Some(*v as f64),
            Value::Float(v) => Some(*v),
            _ => None,
        }
    }

    pub fn as_str(&self) -> Option<&str> {
        match self {
            Value::String(v) => Some(v),
            _ => None,
        }
    }

    /// The value as a JSON value (vectors as number arrays, JSON fields stay text).
    pub fn to_json(&self) -> serde_json::Value {
        match self {
            Value::Null => serde_json::Value::Null,
            Value::Bool(v) => (*v).into(),
            Value::Int(v) => (*v).into(),
            Value::Float(v) => serde_json::Number::from_f64(*v).map_or(serde_json::Value::Null, Into::into),
            Value::String(v) => v.clone().into(),
            Value::Vector(v) => v.iter().map(|x| serde_json::Value::from(*x as f64)).collect(),
        }
    }
}

/// Base64 of vectors in JSON: the standard alphabet, padding optional.
const BASE64: base64::engine::GeneralPurpose = base64::engine::GeneralPurpose::new(
    &base64::alphabet::STANDARD,
    base64::engine::GeneralPurposeConfig::new()
        .with_decode_padding_mode(base64::engine::DecodePaddingMode::Indifferent),
);

/// A vector as base64 of its little-endian `f32` bytes: the compact form
/// [`value_from_json`] reads back exactly.
pub fn vector_to_base64(vector: &[f32]) -> String {
    use base64::Engine as _;
    let bytes: Vec<u8> = vector.iter().flat_map(|x| x.to_le_bytes()).collect();
    BASE64.encode(bytes)
}

/// A JSON value as a value of a field of `data_type`: the one conversion the
/// CLI, schema defaults and the Kafka decoder share. `null` is [`Value::Null`]
/// (whether the field may hold it is the row's check); JSON fields keep their
/// text; integers must be whole numbers; a float vector is an array of
/// numbers or a base64 string of its little-endian `f32` bytes. Ranges,
/// dimensions and lengths are checked by [`Value::check_type`], not here.
pub fn value_from_json(field: &str, data_type: &DataType, json: serde_json::Value) -> Result<Value> {
    use serde_json::Value as J;
    Ok(match (data_type, json) {
        (_, J::Null) => Value::Null,
        (DataType::Json, other) => Value::String(other.to_string()),
        (DataType::Bool, J::Bool(b)) => Value::Bool(b),
        (DataType::Int8 | DataType::Int16 | DataType::Int32 | DataType::Int64, J::Number(n)) => {
            Value::Int(n.as_i64().ok_or_else(|| Error::field(field, format!("{n} is not an integer")))?)
        }
        (DataType::Float | DataType::Double, J::Number(n)) => {
            Value::Float(n.as_f64().ok_or_else(|| Error::field(field, format!("{n} is not a number")))?)
        }
        (DataType::VarChar { .. }, J::String(s)) => Value::String(s),
        (DataType::FloatVector { .. }, J::Array(items)) => Value::Vector(
            items
                .iter()
                .enumerate()
                .map(|(i, x)| {
                    x.as_f64().map(|f| f as f32).ok_or_else(|| {
                        Error::field(
                            field,
                            format!("a vector holds something that is not a number: element {i} is {}", short(x)),
                        )
                    })
                })
                .collect::<Result<Vec<f32>>>()?,
        ),
        (DataType::FloatVector { dim, .. }, J::String(text)) => {
            use base64::Engine as _;
            let bytes = BASE64.decode(text.trim()).map_err(|e| {
                Error::field(field, format!("a vector string must be base64 of little-endian f32 (dim {dim}): {e}"))
            })?;
            let needed = dim.saturating_mul(4);
            if bytes.len() != needed {
                return Err(Error::field(
                    field,
                    format!(
                        "base64 vector of {} bytes, but dim {dim} needs {needed} bytes (little-endian f32)",
                        bytes.len()
                    ),
                ));
            }
            Value::Vector(bytes.chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect())
        }
        (t, other) => return Err(Error::field(field, format!("{} does not fit type {t:?}", short(&other)))),
    })
}

/// A JSON value as text for an error message, cut as [`quote`] cuts.
fn short(json: &serde_json::Value) -> String {
    quote(&json.to_string()).into_owned()
}

/// The most characters of a client's text an error message repeats.
pub const QUOTE_CHARS: usize = 64;

/// A client's text (a name, a value, an expression) as an error message
/// repeats it: whole when short, else its first [`QUOTE_CHARS`] characters,
/// `…` and its full length. Errors travel back in gRPC headers, whose size
/// is limited: an error echoing a 1 MiB value would reach the client as
/// RESOURCE_EXHAUSTED instead of the problem it names.
pub fn quote(text: &str) -> Cow<'_, str> {
    quote_at_most(text, QUOTE_CHARS)
}

/// Like [`quote`], keeping up to `max_chars` characters (for messages that
/// carry more than the client's text, such as a planner's explanation).
pub fn quote_at_most(text: &str, max_chars: usize) -> Cow<'_, str> {
    match text.char_indices().nth(max_chars) {
        None => Cow::Borrowed(text),
        Some((end, _)) => Cow::Owned(format!("{}… ({} characters)", &text[..end], text.chars().count())),
    }
}

/// A string as a filter literal: the filter reads a backslash and the next
/// character as that character, so only backslashes and quotes are escaped
/// (a JSON escape such as `\t` would lose its meaning).
pub fn string_literal(text: &str) -> String {
    format!("\"{}\"", text.replace('\\', "\\\\").replace('"', "\\\""))
}

/// Reads the primary key at `row` of a primary-key column (`Int64` or `Utf8`).
pub fn pk_from_array(array: &dyn Array, row: usize) -> Result<Pk> {
    if array.is_null(row) {
        return Err(Error::field("primary key", format!("null at row {row}")));
    }
    match array.data_type() {
        ArrowType::Int64 => Ok(Pk::Int(array.as_primitive::<adt::Int64Type>().value(row))),
        ArrowType::Utf8 => Ok(Pk::Str(array.as_string::<i32>().value(row).to_string())),
        other => Err(Error::field("primary key", format!("unsupported key type {other}"))),
    }
}

/// All primary keys of a primary-key column.
pub fn pks_from_array(array: &dyn Array) -> Result<Vec<Pk>> {
    (0..array.len()).map(|row| pk_from_array(array, row)).collect()
}

/// Identity of one row version: the timestamp of the write that made it, the
/// log partition and the row's place in that write. Deterministic from the
/// log, so replay makes the same versions.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct VersionId {
    pub ts: crate::time::Timestamp,
    pub partition: u32,
    pub row: u32,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quote_keeps_short_text_and_cuts_long_text_at_a_character() {
        assert_eq!(quote("name"), "name");
        let exactly = "a".repeat(QUOTE_CHARS);
        assert_eq!(quote(&exactly), exactly);
        let long = "é".repeat(10_000);
        let quoted = quote(&long);
        assert_eq!(quoted, format!("{}… (10000 characters)", "é".repeat(QUOTE_CHARS)));
    }
}
