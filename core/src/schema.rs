//! Collection schemas and their Arrow form.

use std::sync::Arc;

use arrow::datatypes::{DataType as ArrowType, Field, Schema as ArrowSchema, SchemaRef};
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::value::{Pk, Value, quote};

/// Stable numeric id of a collection; never reused, so a dropped collection's
/// log records can be told apart from a new collection with the same name.
pub type CollectionId = u32;

/// Longest name accepted for collections and fields.
const MAX_NAME_LEN: usize = 255;
/// Most collection properties, and the longest value of one.
const MAX_PROPERTIES: usize = 64;
const MAX_PROPERTY_BYTES: usize = 4096;
/// Largest vector dimension accepted.
pub const MAX_DIM: usize = 32_768;

/// Distance metric of a vector field.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Metric {
    /// Squared Euclidean distance; smaller is closer.
    L2,
    /// Inner product; larger is closer.
    IP,
    /// Cosine similarity; larger is closer. Vectors are normalised on write.
    COSINE,
}

impl Metric {
    /// Whether larger scores are closer (IP, COSINE) or smaller (L2).
    pub fn larger_is_closer(self) -> bool {
        !matches!(self, Metric::L2)
    }
}

impl std::str::FromStr for Metric {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s.to_ascii_uppercase().as_str() {
            "L2" => Ok(Metric::L2),
            "IP" => Ok(Metric::IP),
            "COSINE" => Ok(Metric::COSINE),
            other => Err(Error::argument("metric", format!("unknown metric `{other}`, expected L2, IP or COSINE"))),
        }
    }
}

/// Type of a field.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum DataType {
    Bool,
    Int8,
    Int16,
    Int32,
    Int64,
    Float,
    Double,
    VarChar {
        max_length: usize,
    },
    /// JSON text, validated on write.
    Json,
    FloatVector {
        dim: usize,
        metric: Metric,
    },
}

impl DataType {
    /// The Arrow type rows of this field are held in.
    pub fn arrow_type(&self) -> ArrowType {
        match self {
            DataType::Bool => ArrowType::Boolean,
            DataType::Int8 => ArrowType::Int8,
            DataType::Int16 => ArrowType::Int16,
            DataType::Int32 => ArrowType::Int32,
            DataType::Int64 => ArrowType::Int64,
            DataType::Float => ArrowType::Float32,
            DataType::Double => ArrowType::Float64,
            DataType::VarChar { .. } | DataType::Json => ArrowType::Utf8,
            DataType::FloatVector { dim, .. } => {
                ArrowType::FixedSizeList(Arc::new(Field::new("item", ArrowType::Float32, false)), *dim as i32)
            }
        }
    }

    pub fn is_vector(&self) -> bool {
        matches!(self, DataType::FloatVector { .. })
    }

    fn is_integer(&self) -> bool {
        matches!(self, DataType::Int8 | DataType::Int16 | DataType::Int32 | DataType::Int64)
    }
}

/// One field of a collection.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FieldSchema {
    pub name: String,
    pub data_type: DataType,
    #[serde(default)]
    pub nullable: bool,
    /// Used when a write leaves the field out (or gives null for a non-nullable field).
    #[serde(default)]
    pub default_value: Option<Value>,
    #[serde(default)]
    pub is_primary: bool,
    /// For the primary key: ids are assigned by the engine on insert.
    #[serde(default)]
    pub auto_id: bool,
    /// The collection's dynamic field (Milvus's `$meta`): a JSON object per
    /// row holding the keys the schema does not declare. Filters reach its
    /// keys by bare name (`color == "red"` reads `$meta["color"]`).
    #[serde(default)]
    pub is_dynamic: bool,
    #[serde(default)]
    pub description: String,
    /// The collection's partition key (Milvus's `is_partition_key`): rows
    /// go to one of `num_partitions` partitions by the hash of this field's
    /// value, and a filter that pins the value reads only its partition.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub is_partition_key: bool,
}

/// The name of a collection's dynamic field, as Milvus names it.
pub const DYNAMIC_FIELD_NAME: &str = "$meta";

impl FieldSchema {
    pub fn new(name: impl Into<String>, data_type: DataType) -> Self {
        FieldSchema {
            name: name.into(),
            data_type,
            nullable: false,
            default_value: None,
            is_primary: false,
            auto_id: false,
            is_dynamic: false,
            description: String::new(),
            is_partition_key: false,
        }
    }

    /// This field as the collection's partition key.
    pub fn partition_key(self) -> Self {
        FieldSchema { is_partition_key: true, ..self }
    }

    /// The dynamic field: a nullable JSON field named [`DYNAMIC_FIELD_NAME`].
    pub fn dynamic() -> Self {
        FieldSchema { nullable: true, is_dynamic: true, ..FieldSchema::new(DYNAMIC_FIELD_NAME, DataType::Json) }
    }

    /// An `int64` primary key.
    pub fn int64_primary(name: impl Into<String>, auto_id: bool) -> Self {
        FieldSchema { is_primary: true, auto_id, ..FieldSchema::new(name, DataType::Int64) }
    }

    /// A `varchar` primary key.
    pub fn varchar_primary(name: impl Into<String>, max_length: usize) -> Self {
        FieldSchema { is_primary: true, ..FieldSchema::new(name, DataType::VarChar { max_length }) }
    }

    pub fn vector(name: impl Into<String>, dim: usize, metric: Metric) -> Self {
        FieldSchema::new(name, DataType::FloatVector { dim, metric })
    }

    pub fn nullable(mut self) -> Self {
        self.nullable = true;
        self
    }

    pub fn with_default(mut self, value: Value) -> Self {
        self.default_value = Some(value);
        self
    }
}

/// The schema of a collection: one primary key, at least one vector field, scalars.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CollectionSchema {
    pub name: String,
    #[serde(default)]
    pub description: String,
    pub fields: Vec<FieldSchema>,
    /// Settings fixed at creation that the engine does not read, kept for
    /// the API that set them (Milvus's `consistency_level`, for one).
    #[serde(default)]
    pub properties: std::collections::BTreeMap<String, String>,
    /// With a partition key: how many partitions its values hash to
    /// (default [`DEFAULT_KEY_PARTITIONS`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub num_partitions: Option<usize>,
}

/// Partitions of a partition-key collection when the schema names none (as in Milvus).
pub const DEFAULT_KEY_PARTITIONS: usize = 16;
/// Partitions a partition-key collection may have at most (as in Milvus).
pub const MAX_KEY_PARTITIONS: usize = 1024;

impl CollectionSchema {
    pub fn new(name: impl Into<String>, fields: Vec<FieldSchema>) -> Self {
        CollectionSchema {
            name: name.into(),
            description: String::new(),
            fields,
            properties: Default::default(),
            num_partitions: None,
        }
    }

    /// The partition key's field index and how many partitions it hashes to.
    pub fn partition_key(&self) -> Option<(usize, usize)> {
        let field = self.fields.iter().position(|f| f.is_partition_key)?;
        Some((field, self.num_partitions.unwrap_or(DEFAULT_KEY_PARTITIONS)))
    }

    /// Checks the schema is one the engine can hold; the error names the field.
    pub fn validate(&self) -> Result<()> {
        check_name("collection name", &self.name)?;
        let mut seen = std::collections::HashSet::new();
        for field in &self.fields {
            if field.is_dynamic {
                if field.name != DYNAMIC_FIELD_NAME || field.data_type != DataType::Json || field.is_primary {
                    return Err(Error::InvalidSchema(format!(
                        "the dynamic field must be a JSON field named `{DYNAMIC_FIELD_NAME}` (not `{}`)",
                        quote(&field.name)
                    )));
                }
            } else {
                check_name("field name", &field.name)?;
            }
            if !seen.insert(field.name.as_str()) {
                return Err(Error::InvalidSchema(format!("field `{}` appears twice", field.name)));
            }
            match &field.data_type {
                DataType::FloatVector { dim, .. } if *dim == 0 || *dim > MAX_DIM => {
                    return Err(Error::InvalidSchema(format!(
                        "field `{}`: dim {dim} outside 1..={MAX_DIM}",
                        field.name
                    )));
                }
                DataType::VarChar { max_length } if *max_length == 0 || *max_length > 65_535 => {
                    return Err(Error::InvalidSchema(format!(
                        "field `{}`: max_length {max_length} outside 1..=65535",
                        field.name
                    )));
                }
                _ => {}
            }
            if field.is_primary && (field.nullable || field.default_value.is_some()) {
                return Err(Error::InvalidSchema(format!(
                    "primary key `{}` cannot be nullable or have a default",
                    field.name
                )));
            }
            if field.auto_id && !(field.is_primary && field.data_type == DataType::Int64) {
                return Err(Error::InvalidSchema(format!(
                    "field `{}`: auto_id needs an int64 primary key",
                    field.name
                )));
            }
            if field.data_type.is_vector() && (field.nullable || field.default_value.is_some()) {
                return Err(Error::InvalidSchema(format!(
                    "vector field `{}` cannot be nullable or have a default",
                    field.name
                )));
            }
            if let Some(default) = &field.default_value {
                default.check_type(&field.name, &field.data_type)?;
            }
        }
        let primaries: Vec<_> = self.fields.iter().filter(|f| f.is_primary).collect();
        match primaries.as_slice() {
            [pk] if pk.data_type == DataType::Int64 || matches!(pk.data_type, DataType::VarChar { .. }) => {}
            [pk] => {
                return Err(Error::InvalidSchema(format!(
                    "primary key `{}` must be int64 or varchar, not {:?}",
                    pk.name, pk.data_type
                )));
            }
            [] => return Err(Error::InvalidSchema("no primary key field (set is_primary on one field)".into())),
            _ => return Err(Error::InvalidSchema("more than one primary key field".into())),
        }
        if !self.fields.iter().any(|f| f.data_type.is_vector()) {
            return Err(Error::InvalidSchema("a collection needs at least one float_vector field".into()));
        }
        let keys: Vec<&FieldSchema> = self.fields.iter().filter(|f| f.is_partition_key).collect();
        match keys.as_slice() {
            [] if self.num_partitions.is_some() => {
                return Err(Error::InvalidSchema("num_partitions needs a partition key field".into()));
            }
            [] => {}
            [key] => {
                if key.is_primary
                    || key.nullable
                    || !(key.data_type == DataType::Int64 || matches!(key.data_type, DataType::VarChar { .. }))
                {
                    return Err(Error::InvalidSchema(format!(
                        "partition key `{}` must be a non-nullable int64 or varchar field other than the primary key",
                        key.name
                    )));
                }
                if let Some(n) = self.num_partitions
                    && !(1..=MAX_KEY_PARTITIONS).contains(&n)
                {
                    return Err(Error::InvalidSchema(format!("num_partitions {n} outside 1..={MAX_KEY_PARTITIONS}")));
                }
            }
            _ => return Err(Error::InvalidSchema("more than one partition key field".into())),
        }
        if self.properties.len() > MAX_PROPERTIES
            || self.properties.iter().any(|(k, v)| k.len() > MAX_NAME_LEN || v.len() > MAX_PROPERTY_BYTES)
        {
            return Err(Error::InvalidSchema(format!(
                "at most {MAX_PROPERTIES} properties, keys of at most {MAX_NAME_LEN} bytes, values of at most {MAX_PROPERTY_BYTES}"
            )));
        }
        if self.fields.iter().filter(|f| f.is_dynamic).count() > 1 {
            return Err(Error::InvalidSchema("more than one dynamic field".into()));
        }
        Ok(())
    }

    /// The dynamic field, when the collection has one.
    pub fn dynamic_field(&self) -> Option<&FieldSchema> {
        self.fields.iter().find(|f| f.is_dynamic)
    }

    /// Index of the primary key field. Valid schemas have exactly one.
    pub fn primary_index(&self) -> usize {
        self.fields.iter().position(|f| f.is_primary).unwrap_or(0)
    }

    pub fn primary(&self) -> &FieldSchema {
        &self.fields[self.primary_index()]
    }

    pub fn field_index(&self, name: &str) -> Option<usize> {
        self.fields.iter().position(|f| f.name == name)
    }

    /// Finds a field by name, or an error naming it.
    pub fn field(&self, name: &str) -> Result<(usize, &FieldSchema)> {
        self.field_index(name)
            .map(|i| (i, &self.fields[i]))
            .ok_or_else(|| Error::field(quote(name), format!("no such field in collection `{}`", self.name)))
    }

    /// Checks that every key has the primary key's type, so a read or a
    /// delete by keys of the wrong type is refused rather than finding nothing.
    pub fn check_keys(&self, pks: &[Pk]) -> Result<()> {
        let primary = self.primary();
        let wanted = match primary.data_type {
            DataType::Int64 => "int64",
            _ => "string",
        };
        let wrong = pks.iter().position(|pk| match pk {
            Pk::Int(_) => primary.data_type != DataType::Int64,
            Pk::Str(_) => primary.data_type == DataType::Int64,
        });
        match wrong {
            Some(i) => Err(Error::field(
                &primary.name,
                format!("key {i} is {}, but the primary key is {wanted}", quote(&pks[i].to_string())),
            )),
            None => Ok(()),
        }
    }

    /// The vector field a search uses: the named one, or the only one.
    pub fn vector_field(&self, name: Option<&str>) -> Result<(usize, usize, Metric)> {
        let index = match name {
            Some(name) => self.field(name)?.0,
            None => {
                let vectors: Vec<usize> =
                    (0..self.fields.len()).filter(|&i| self.fields[i].data_type.is_vector()).collect();
                match vectors.as_slice() {
                    [only] => *only,
                    _ => {
                        return Err(Error::argument(
                            "field",
                            "the collection has several vector fields: name the one to search",
                        ));
                    }
                }
            }
        };
        match self.fields[index].data_type {
            DataType::FloatVector { dim, metric } => Ok((index, dim, metric)),
            _ => Err(Error::field(&self.fields[index].name, "is not a float_vector field")),
        }
    }

    /// The Arrow schema of the rows (fields in schema order).
    pub fn arrow_schema(&self) -> SchemaRef {
        let fields: Vec<Field> =
            self.fields.iter().map(|f| Field::new(&f.name, f.data_type.arrow_type(), f.nullable)).collect();
        Arc::new(ArrowSchema::new(fields))
    }
}

impl CollectionSchema {
    /// Checks that `batch` holds this collection's columns, in order, with
    /// their Arrow types: what the segments assume of every row they append.
    pub fn check_batch_shape(&self, batch: &arrow::record_batch::RecordBatch) -> Result<()> {
        if batch.num_columns() != self.fields.len() {
            return Err(Error::InvalidArgument {
                argument: "batch".into(),
                problem: format!("{} columns, the collection has {} fields", batch.num_columns(), self.fields.len()),
            });
        }
        for (field, column) in self.fields.iter().zip(batch.columns()) {
            let expected = field.data_type.arrow_type();
            // A vector column's item field may be named or nullable either way.
            let fits = match (column.data_type(), &expected) {
                (ArrowType::FixedSizeList(item, size), ArrowType::FixedSizeList(_, want)) => {
                    size == want && item.data_type() == &ArrowType::Float32
                }
                (actual, expected) => actual == expected,
            };
            if !fits {
                return Err(Error::field(
                    &field.name,
                    format!("column of type {} where {expected} was expected", column.data_type()),
                ));
            }
        }
        Ok(())
    }
}

/// Checks an alias by the rule for collection names: an alias stands
/// wherever a collection name does.
pub fn check_alias(alias: &str) -> Result<()> {
    check_name("alias", alias).map_err(|e| match e {
        Error::InvalidSchema(problem) => Error::argument("alias", problem),
        other => other,
    })
}

/// Checks a partition name: the rules of collection names.
pub fn check_partition_name(name: &str) -> Result<()> {
    check_name("partition name", name).map_err(|e| match e {
        Error::InvalidSchema(problem) => Error::argument("partition_name", problem),
        other => other,
    })
}

fn check_name(what: &str, name: &str) -> Result<()> {
    let valid_start = name.chars().next().is_some_and(|c| c.is_ascii_alphabetic() || c == '_');
    if name.is_empty()
        || name.len() > MAX_NAME_LEN
        || !valid_start
        || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
    {
        let name = quote(name);
        return Err(Error::InvalidSchema(format!(
            "{what} `{name}` must start with a letter or `_` and hold only letters, digits and `_` (at most {MAX_NAME_LEN})"
        )));
    }
    Ok(())
}

impl Value {
    /// Checks that the value fits a field of type `data_type`.
    pub fn check_type(&self, field: &str, data_type: &DataType) -> Result<()> {
        if let (Value::Vector(v), DataType::FloatVector { dim, .. }) = (self, data_type)
            && v.len() != *dim
        {
            return Err(Error::field(field, format!("dimension {} does not match dim {dim}", v.len())));
        }
        let fits = match (self, data_type) {
            (Value::Null, _) => true,
            (Value::Bool(_), DataType::Bool) => true,
            (Value::Int(v), t) if t.is_integer() => int_fits(*v, t),
            (Value::Int(_) | Value::Float(_), DataType::Float | DataType::Double) => true,
            (Value::String(s), DataType::VarChar { max_length }) => s.chars().count() <= *max_length,
            (Value::String(s), DataType::Json) => serde_json::from_str::<serde_json::Value>(s).is_ok(),
            (Value::Vector(v), DataType::FloatVector { dim, .. }) => v.len() == *dim,
            _ => false,
        };
        if fits {
            Ok(())
        } else {
            Err(Error::field(field, format!("value {} does not fit type {data_type:?}", quote(&self.to_string()))))
        }
    }
}

fn int_fits(v: i64, t: &DataType) -> bool {
    match t {
        DataType::Int8 => i8::try_from(v).is_ok(),
        DataType::Int16 => i16::try_from(v).is_ok(),
        DataType::Int32 => i32::try_from(v).is_ok(),
        _ => true,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn schema(primary: FieldSchema) -> CollectionSchema {
        CollectionSchema::new("c", vec![primary, FieldSchema::vector("v", 2, Metric::L2)])
    }

    #[test]
    fn keys_of_the_wrong_type_are_refused() {
        let ints = schema(FieldSchema::int64_primary("id", false));
        ints.check_keys(&[Pk::Int(1), Pk::Int(2)]).unwrap();
        let error = ints.check_keys(&[Pk::Int(1), Pk::from("a")]).unwrap_err();
        assert!(matches!(error, Error::Field { .. }), "{error:?}");
        assert_eq!(error.to_string(), r#"field `id`: key 1 is "a", but the primary key is int64"#);
        let strings = schema(FieldSchema::varchar_primary("name", 8));
        strings.check_keys(&[Pk::from("a")]).unwrap();
        let error = strings.check_keys(&[Pk::Int(7)]).unwrap_err();
        assert_eq!(error.to_string(), "field `name`: key 0 is 7, but the primary key is string");
        let long = Pk::from("k".repeat(5000));
        assert!(ints.check_keys(&[long]).unwrap_err().to_string().len() < 200);
    }

    #[test]
    fn errors_quote_long_names_and_defaults_short() {
        let long = schema(FieldSchema::int64_primary("id", false));
        let named = CollectionSchema { name: "c".repeat(10_000), ..long.clone() };
        let message = named.validate().unwrap_err().to_string();
        assert!(message.len() < 300 && message.contains("(10000 characters)"), "{} bytes", message.len());
        let message = long.field(&"f".repeat(10_000)).unwrap_err().to_string();
        assert!(message.len() < 200 && message.starts_with("field `fff"), "{} bytes", message.len());
        let defaulted = CollectionSchema::new(
            "c",
            vec![
                FieldSchema::int64_primary("id", false),
                FieldSchema::vector("v", 2, Metric::L2),
                FieldSchema::new("t", DataType::VarChar { max_length: 4 })
                    .with_default(Value::from("x".repeat(1 << 20))),
            ],
        );
        let message = defaulted.validate().unwrap_err().to_string();
        assert!(message.len() < 200 && message.starts_with(r#"field `t`: value "xxx"#), "{} bytes", message.len());
    }
}
