//! DataFusion scalar functions over JSON text columns (`DataType::Json` fields
//! are stored as Arrow Utf8). Filters translate Milvus paths such as
//! `meta["a"][0]` into these calls; the SQL front end registers the same set.
//!
//! - `json_get(doc, step, …)`: the JSON text of the value at the path (Utf8),
//!   null when the path is missing or the value is JSON null.
//! - `json_get_float` / `json_get_str` / `json_get_bool`: the value as Float64 /
//!   Utf8 / Boolean, null unless it is a JSON number / string / bool.
//! - `json_contains(doc, value)`: whether `doc` is an array holding `value`.
//! - `json_contains_any(doc, v1, v2, …)` / `json_contains_all(doc, v1, v2, …)`:
//!   whether the array holds any / all of the values (list arguments, e.g.
//!   from `make_array`, are flattened).
//!
//! Path steps are string keys (objects) or integer indexes (arrays). A null or
//! unparsable document gives null; nothing here panics on data.

use std::sync::Arc;

use arrow::array::{
    Array, ArrayRef, AsArray, BooleanArray, BooleanBuilder, Float64Array, Float64Builder, GenericListArray, Int64Array,
    StringArray, StringBuilder,
};
use arrow::datatypes::{DataType, Float64Type, Int64Type};
use datafusion::common::{Result, ScalarValue, exec_err, plan_err};
use datafusion::logical_expr::{ColumnarValue, ScalarFunctionArgs, ScalarUDF, ScalarUDFImpl, Signature, Volatility};
use datafusion::prelude::SessionContext;
use serde_json::Value as Json;

pub const JSON_GET: &str = "json_get";
pub const JSON_GET_FLOAT: &str = "json_get_float";
pub const JSON_GET_STR: &str = "json_get_str";
pub const JSON_GET_BOOL: &str = "json_get_bool";
pub const JSON_CONTAINS: &str = "json_contains";
pub const JSON_CONTAINS_ANY: &str = "json_contains_any";
pub const JSON_CONTAINS_ALL: &str = "json_contains_all";

/// All JSON functions, ready to register in a `SessionContext`.
pub fn json_udfs() -> Vec<ScalarUDF> {
    let getters = [Getter::Text, Getter::Float, Getter::Str, Getter::Bool];
    let contains = [Contains::One, Contains::Any, Contains::All];
    getters
        .into_iter()
        .map(|getter| ScalarUDF::new_from_impl(JsonGet { getter, signature: Signature::variadic_any(IMMUTABLE) }))
        .chain(
            contains.into_iter().map(|mode| {
                ScalarUDF::new_from_impl(JsonContains { mode, signature: Signature::variadic_any(IMMUTABLE) })
            }),
        )
        .collect()
}

/// Registers the JSON functions in `ctx` (the filter session does this; so must any
/// other session that plans filters or SQL over JSON fields).
pub fn register_json_udfs(ctx: &SessionContext) {
    for udf in json_udfs() {
        ctx.register_udf(udf);
    }
}

const IMMUTABLE: Volatility = Volatility::Immutable;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Getter {
    Text,
    Float,
    Str,
    Bool,
}

/// `json_get*(doc, step, …)`.
#[derive(Debug, PartialEq, Eq, Hash)]
struct JsonGet {
    getter: Getter,
    signature: Signature,
}

impl ScalarUDFImpl for JsonGet {
    fn name(&self) -> &str {
        match self.getter {
            Getter::Text => JSON_GET,
            Getter::Float => JSON_GET_FLOAT,
            Getter::Str => JSON_GET_STR,
            Getter::Bool => JSON_GET_BOOL,
        }
    }

    fn signature(&self) -> &Signature {
        &self.signature
    }

    fn return_type(&self, arg_types: &[DataType]) -> Result<DataType> {
        // Checked here so bad calls fail when the filter compiles, not per batch.
        check_document(self.name(), arg_types)?;
        for (i, t) in arg_types.iter().enumerate().skip(1) {
            if !(is_text(t) || t.is_integer() || t == &DataType::Null) {
                return plan_err!("{}: path step {i} must be a string key or an integer index, not {t}", self.name());
            }
        }
        Ok(match self.getter {
            Getter::Text | Getter::Str => DataType::Utf8,
            Getter::Float => DataType::Float64,
            Getter::Bool => DataType::Boolean,
        })
    }

    fn invoke_with_args(&self, args: ScalarFunctionArgs) -> Result<ColumnarValue> {
        let scalar = all_scalar(&args.args);
        let arrays = ColumnarValue::values_to_arrays(&args.args)?;
        let Some((doc, path)) = arrays.split_first() else {
            return exec_err!("{} needs a json argument", self.name());
        };
        let doc = text_column(self.name(), doc)?;
        let steps = path.iter().map(|a| step_column(self.name(), a)).collect::<Result<Vec<_>>>()?;
        let rows = doc.len();
        let array: ArrayRef = match self.getter {
            Getter::Text => {
                let mut out = StringBuilder::with_capacity(rows, 0);
                for row in 0..rows {
                    out.append_option(lookup(&doc, &steps, row, |v| (!v.is_null()).then(|| v.to_string())));
                }
                Arc::new(out.finish())
            }
            Getter::Str => {
                let mut out = StringBuilder::with_capacity(rows, 0);
                for row in 0..rows {
                    out.append_option(lookup(&doc, &steps, row, |v| v.as_str().map(str::to_string)));
                }
                Arc::new(out.finish())
            }
            Getter::Float => {
                let mut out = Float64Builder::with_capacity(rows);
                for row in 0..rows {
                    out.append_option(lookup(&doc, &steps, row, Json::as_f64));
                }
                Arc::new(out.finish())
            }
            Getter::Bool => {
                let mut out = BooleanBuilder::with_capacity(rows);
                for row in 0..rows {
                    out.append_option(lookup(&doc, &steps, row, Json::as_bool));
                }
                Arc::new(out.finish())
            }
        };
        finish(array, scalar)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Contains {
    One,
    Any,
    All,
}

/// `json_contains(doc, value)`, `json_contains_any(doc, value, …)`, `json_contains_all(doc, value, …)`.
#[derive(Debug, PartialEq, Eq, Hash)]
struct JsonContains {
    mode: Contains,
    signature: Signature,
}

impl ScalarUDFImpl for JsonContains {
    fn name(&self) -> &str {
        match self.mode {
            Contains::One => JSON_CONTAINS,
            Contains::Any => JSON_CONTAINS_ANY,
            Contains::All => JSON_CONTAINS_ALL,
        }
    }

    fn signature(&self) -> &Signature {
        &self.signature
    }

    fn return_type(&self, arg_types: &[DataType]) -> Result<DataType> {
        check_document(self.name(), arg_types)?;
        if self.mode == Contains::One && arg_types.len() != 2 {
            return plan_err!("{} takes a json array and one value, got {} arguments", self.name(), arg_types.len());
        }
        for (i, t) in arg_types.iter().enumerate().skip(1) {
            let element = match t {
                DataType::List(f) | DataType::LargeList(f) if self.mode != Contains::One => f.data_type(),
                other => other,
            };
            if !is_scalar_needle(element) {
                return plan_err!("{}: argument {} must be a string, number or bool, not {t}", self.name(), i + 1);
            }
        }
        Ok(DataType::Boolean)
    }

    fn invoke_with_args(&self, args: ScalarFunctionArgs) -> Result<ColumnarValue> {
        let scalar = all_scalar(&args.args);
        let arrays = ColumnarValue::values_to_arrays(&args.args)?;
        let Some((doc, values)) = arrays.split_first() else {
            return exec_err!("{} needs a json argument", self.name());
        };
        let doc = text_column(self.name(), doc)?;
        let values = values.iter().map(|a| needle_column(self.name(), a)).collect::<Result<Vec<_>>>()?;
        let mut out = BooleanBuilder::with_capacity(doc.len());
        let mut needles = Vec::new();
        for row in 0..doc.len() {
            let items = match parse(&doc, row) {
                None => {
                    out.append_null();
                    continue;
                }
                Some(Json::Array(items)) => items,
                // Anything but an array holds nothing.
                Some(_) => {
                    out.append_value(false);
                    continue;
                }
            };
            needles.clear();
            for column in &values {
                column.collect(row, &mut needles);
            }
            let holds = |needle: &Needle| items.iter().any(|item| needle.matches(item));
            out.append_value(match self.mode {
                Contains::One | Contains::All => needles.iter().all(holds),
                Contains::Any => needles.iter().any(holds),
            });
        }
        finish(Arc::new(out.finish()), scalar)
    }
}

fn is_text(t: &DataType) -> bool {
    matches!(t, DataType::Utf8 | DataType::LargeUtf8 | DataType::Utf8View)
}

fn is_scalar_needle(t: &DataType) -> bool {
    is_text(t) || t.is_numeric() || matches!(t, DataType::Boolean | DataType::Null)
}

fn check_document(name: &str, arg_types: &[DataType]) -> Result<()> {
    match arg_types.first() {
        None => plan_err!("{name} needs a json argument"),
        Some(t) if is_text(t) || t == &DataType::Null => Ok(()),
        Some(t) => plan_err!("{name}: the first argument must be json text, not {t}"),
    }
}

fn all_scalar(args: &[ColumnarValue]) -> bool {
    args.iter().all(|a| matches!(a, ColumnarValue::Scalar(_)))
}

/// Scalar in, scalar out: lets DataFusion fold constant calls.
fn finish(array: ArrayRef, scalar: bool) -> Result<ColumnarValue> {
    if scalar && array.len() == 1 {
        Ok(ColumnarValue::Scalar(ScalarValue::try_from_array(&array, 0)?))
    } else {
        Ok(ColumnarValue::Array(array))
    }
}

fn cast(name: &str, array: &ArrayRef, to: &DataType) -> Result<ArrayRef> {
    match arrow::compute::cast(array, to) {
        Ok(a) => Ok(a),
        Err(e) => exec_err!("{name}: cannot read {} as {to}: {e}", array.data_type()),
    }
}

fn text_column(name: &str, array: &ArrayRef) -> Result<StringArray> {
    let utf8 = cast(name, array, &DataType::Utf8)?;
    match utf8.as_string_opt::<i32>() {
        Some(s) => Ok(s.clone()),
        None => exec_err!("{name}: expected json text, got {}", array.data_type()),
    }
}

fn parse(doc: &StringArray, row: usize) -> Option<Json> {
    doc.is_valid(row).then(|| serde_json::from_str(doc.value(row)).ok()).flatten()
}

/// One path argument, per row.
enum StepColumn {
    Keys(StringArray),
    Indexes(Int64Array),
    Nulls,
}

fn step_column(name: &str, array: &ArrayRef) -> Result<StepColumn> {
    let t = array.data_type();
    if is_text(t) {
        Ok(StepColumn::Keys(text_column(name, array)?))
    } else if t.is_integer() {
        match cast(name, array, &DataType::Int64)?.as_primitive_opt::<Int64Type>() {
            Some(a) => Ok(StepColumn::Indexes(a.clone())),
            None => exec_err!("{name}: cannot read {t} as an index"),
        }
    } else if t == &DataType::Null {
        Ok(StepColumn::Nulls)
    } else {
        exec_err!("{name}: a path step must be a string key or an integer index, not {t}")
    }
}

/// Walks the path in row `row` of `doc` and hands the value found to `read`.
fn lookup<R>(doc: &StringArray, steps: &[StepColumn], row: usize, read: impl FnOnce(&Json) -> Option<R>) -> Option<R> {
    let root = parse(doc, row)?;
    let mut value = &root;
    for step in steps {
        value = match step {
            StepColumn::Keys(keys) if keys.is_valid(row) => value.as_object()?.get(keys.value(row))?,
            StepColumn::Indexes(indexes) if indexes.is_valid(row) => {
                value.as_array()?.get(usize::try_from(indexes.value(row)).ok()?)?
            }
            _ => return None,
        };
    }
    read(value)
}

/// A value looked for in a JSON array. A null argument matches nothing.
enum Needle<'a> {
    Str(&'a str),
    Int(i64),
    Float(f64),
    Bool(bool),
    Null,
}

impl Needle<'_> {
    /// Numbers compare by value (1 == 1.0); other kinds only match their own kind.
    fn matches(&self, item: &Json) -> bool {
        match (self, item) {
            (Needle::Str(s), Json::String(v)) => s == v,
            (Needle::Bool(b), Json::Bool(v)) => b == v,
            (Needle::Int(i), Json::Number(n)) => match n.as_i64() {
                Some(v) => v == *i,
                // An integer beyond i64 cannot equal an i64; a float compares as float.
                None => !n.is_u64() && n.as_f64() == Some(*i as f64),
            },
            (Needle::Float(f), Json::Number(n)) => n.as_f64() == Some(*f),
            _ => false,
        }
    }
}

/// One value argument, per row.
enum NeedleColumn {
    Str(StringArray),
    Int(Int64Array),
    Float(Float64Array),
    Bool(BooleanArray),
    Nulls,
    /// A list argument (`make_array(…)`): each row stands for its elements.
    List(GenericListArray<i32>, Box<NeedleColumn>),
}

fn needle_column(name: &str, array: &ArrayRef) -> Result<NeedleColumn> {
    let t = array.data_type().clone();
    Ok(match &t {
        t if is_text(t) => NeedleColumn::Str(text_column(name, array)?),
        t if t.is_integer() => match cast(name, array, &DataType::Int64)?.as_primitive_opt::<Int64Type>() {
            Some(a) => NeedleColumn::Int(a.clone()),
            None => return exec_err!("{name}: cannot read {t} as an integer"),
        },
        t if t.is_numeric() => match cast(name, array, &DataType::Float64)?.as_primitive_opt::<Float64Type>() {
            Some(a) => NeedleColumn::Float(a.clone()),
            None => return exec_err!("{name}: cannot read {t} as a number"),
        },
        DataType::Boolean => match array.as_boolean_opt() {
            Some(a) => NeedleColumn::Bool(a.clone()),
            None => return exec_err!("{name}: cannot read {t} as a bool"),
        },
        DataType::Null => NeedleColumn::Nulls,
        DataType::List(_) | DataType::LargeList(_) => {
            let field = match &t {
                DataType::List(f) | DataType::LargeList(f) => f.clone(),
                _ => return exec_err!("{name}: unexpected {t}"),
            };
            let list = cast(name, array, &DataType::List(field))?;
            match list.as_list_opt::<i32>() {
                Some(l) => {
                    let values = needle_column(name, l.values())?;
                    if matches!(values, NeedleColumn::List(..)) {
                        return exec_err!("{name}: nested lists are not supported");
                    }
                    NeedleColumn::List(l.clone(), Box::new(values))
                }
                None => return exec_err!("{name}: cannot read {t} as a list"),
            }
        }
        t => return exec_err!("{name}: cannot look for a {t} value in json"),
    })
}

impl NeedleColumn {
    /// Adds the value(s) this argument holds in row `row` to `out`.
    fn collect<'a>(&'a self, row: usize, out: &mut Vec<Needle<'a>>) {
        let needle = match self {
            NeedleColumn::Str(a) if a.is_valid(row) => Needle::Str(a.value(row)),
            NeedleColumn::Int(a) if a.is_valid(row) => Needle::Int(a.value(row)),
            NeedleColumn::Float(a) if a.is_valid(row) => Needle::Float(a.value(row)),
            NeedleColumn::Bool(a) if a.is_valid(row) => Needle::Bool(a.value(row)),
            NeedleColumn::List(list, values) => {
                if list.is_valid(row) {
                    let offsets = list.value_offsets();
                    let (start, end) = (offsets.get(row).copied(), offsets.get(row + 1).copied());
                    if let (Some(start), Some(end)) = (start, end) {
                        for i in start.max(0) as usize..end.max(0) as usize {
                            values.collect(i, out);
                        }
                    }
                } else {
                    out.push(Needle::Null);
                }
                return;
            }
            _ => Needle::Null,
        };
        out.push(needle);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use arrow::datatypes::Schema;
    use arrow::record_batch::{RecordBatch, RecordBatchOptions};
    use datafusion::common::DFSchema;

    /// Evaluates a constant SQL expression on a one-row batch, shown as text.
    fn one(sql: &str) -> String {
        let ctx = SessionContext::new();
        register_json_udfs(&ctx);
        let schema = Arc::new(Schema::empty());
        let df_schema = DFSchema::try_from(schema.as_ref().clone()).unwrap();
        let expr = ctx.parse_sql_expr(sql, &df_schema).unwrap_or_else(|e| panic!("{sql}: {e}"));
        let physical = ctx.create_physical_expr(expr, &df_schema).unwrap();
        let batch =
            RecordBatch::try_new_with_options(schema, vec![], &RecordBatchOptions::new().with_row_count(Some(1)))
                .unwrap();
        let array = physical.evaluate(&batch).unwrap().into_array(1).unwrap();
        arrow::util::display::ArrayFormatter::try_new(array.as_ref(), &Default::default()).unwrap().value(0).to_string()
    }

    #[test]
    fn functions_read_paths_and_arrays() {
        assert_eq!(one(r#"json_get('{"a": {"b": [1, "x"]}}', 'a', 'b', 1)"#), r#""x""#);
        assert_eq!(one(r#"json_get('{"a": {"b": 1}}', 'a')"#), r#"{"b":1}"#);
        assert_eq!(one(r#"json_get('{"a": null}', 'a')"#), "");
        assert_eq!(one(r#"json_get('{"a": 1}', 0)"#), "");
        assert_eq!(one(r#"json_get('not json', 'a')"#), "");
        assert_eq!(one(r#"json_get_float('{"a": 2}', 'a') + 0.5"#), "2.5");
        assert_eq!(one(r#"json_get_str('{"a": 2}', 'a')"#), "");
        assert_eq!(one(r#"json_get_str('{"a": "q"}', 'a')"#), "q");
        assert_eq!(one("json_get_bool('[true]', 0)"), "true");
        assert_eq!(one(r#"json_contains('[1, "x"]', 1.0)"#), "true");
        assert_eq!(one(r#"json_contains('[1.0, "x"]', 1)"#), "true");
        assert_eq!(one(r#"json_contains('[1, "x"]', 'y')"#), "false");
        assert_eq!(one(r#"json_contains('{"a": 1}', 1)"#), "false");
        assert_eq!(one("json_contains(NULL, 1)"), "");
        assert_eq!(one("json_contains_any('[1, 2]', 'x', 2)"), "true");
        assert_eq!(one("json_contains_any('[1, 2]')"), "false");
        assert_eq!(one("json_contains_all('[1, 2, true]', 2, true)"), "true");
        assert_eq!(one("json_contains_all('[1, 2]', make_array(1, 3))"), "false");
        assert_eq!(one("json_contains_any('[1, 2]', make_array(3, 2))"), "true");
        assert_eq!(one("json_contains_all('[1, 2]')"), "true");
    }

    #[test]
    fn bad_calls_fail_when_planned() {
        let ctx = SessionContext::new();
        register_json_udfs(&ctx);
        let df_schema = DFSchema::empty();
        for sql in ["json_get(1, 'a')", "json_get('{}', 1.5)", "json_contains('[]', 1, 2)", "json_contains('[]')"] {
            let planned = ctx
                .parse_sql_expr(sql, &df_schema)
                .and_then(|e| datafusion::logical_expr::ExprSchemable::get_type(&e, &df_schema));
            assert!(planned.is_err(), "{sql}");
        }
    }
}
