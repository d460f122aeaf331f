//! Filter expressions: Milvus boolean expressions (`year > 2000 and color in
//! ["red", "blue"]`, `not`, `&&`, `||`, `==`, `like "ab%"`, `is null`) or SQL
//! predicates (`month >= 202610`, `section IN ('a','b')`). Both are brought to
//! one SQL form, checked against the collection schema, and compiled by
//! DataFusion into a physical expression evaluated on segments' Arrow data.
//!
//! Filters travel to workers as text; each worker compiles them once.

use std::sync::{Arc, OnceLock};

use arrow::array::{Array, AsArray};
use arrow::record_batch::RecordBatch;
use datafusion::common::DFSchema;
use datafusion::logical_expr::ExprSchemable;
use datafusion::physical_expr::PhysicalExpr;
use datafusion::prelude::SessionContext;
use vectorflow_core::{CollectionSchema, Error, Result};

/// A compiled filter.
#[derive(Debug, Clone)]
pub struct Filter {
    text: String,
    expr: Arc<dyn PhysicalExpr>,
}

/// Words with a meaning of their own in expressions (never field names).
const KEYWORDS: &[&str] = &["and", "or", "not", "in", "like", "is", "null", "true", "false", "between"];

#[derive(Debug, Clone, PartialEq)]
enum Token {
    Ident(String),
    Number(String),
    Str(String),
    Op(String),
}

/// Splits an expression into tokens, each with its byte position.
fn tokenize(text: &str) -> Result<Vec<(usize, Token)>> {
    let bytes = text.as_bytes();
    let mut tokens = Vec::new();
    let mut i = 0;
    while i < bytes.len() {
        let c = bytes[i] as char;
        let start = i;
        if c.is_whitespace() {
            i += 1;
        } else if c.is_ascii_alphabetic() || c == '_' {
            while i < bytes.len() && ((bytes[i] as char).is_ascii_alphanumeric() || bytes[i] == b'_') {
                i += 1;
            }
            tokens.push((start, Token::Ident(text[start..i].to_string())));
        } else if c.is_ascii_digit() || (c == '.' && bytes.get(i + 1).is_some_and(u8::is_ascii_digit)) {
            while i < bytes.len()
                && ((bytes[i] as char).is_ascii_alphanumeric()
                    || bytes[i] == b'.'
                    || ((bytes[i] == b'+' || bytes[i] == b'-') && matches!(bytes[i - 1], b'e' | b'E')))
            {
                i += 1;
            }
            tokens.push((start, Token::Number(text[start..i].to_string())));
        } else if c == '"' || c == '\'' {
            i += 1;
            let mut value = String::new();
            loop {
                match text[i..].chars().next() {
                    None => return Err(expression(start, "string literal is not closed")),
                    Some('\\') => {
                        let escaped = text[i + 1..].chars().next().ok_or_else(|| expression(i, "dangling escape"))?;
                        value.push(escaped);
                        i += 1 + escaped.len_utf8();
                    }
                    Some(ch) if ch == c => {
                        // SQL style doubled quote inside a literal.
                        if text[i + 1..].starts_with(c) {
                            value.push(c);
                            i += 2;
                        } else {
                            i += 1;
                            break;
                        }
                    }
                    Some(ch) => {
                        value.push(ch);
                        i += ch.len_utf8();
                    }
                }
            }
            tokens.push((start, Token::Str(value)));
        } else {
            let two = text.get(i..i + 2).unwrap_or("");
            let op = match two {
                "==" | "!=" | "<=" | ">=" | "<>" | "&&" | "||" => two,
                _ => match c {
                    '<' | '>' | '=' | '+' | '-' | '*' | '/' | '%' | '(' | ')' | '[' | ']' | ',' | '!' => {
                        &text[i..i + 1]
                    }
                    _ => {
                        return Err(expression(
                            start,
                            format!("unexpected character `{}`", &text[i..].chars().next().unwrap_or(c)),
                        ));
                    }
                },
            };
            i += op.len();
            tokens.push((start, Token::Op(op.to_string())));
        }
    }
    Ok(tokens)
}

fn expression(position: usize, problem: impl Into<String>) -> Error {
    Error::Expression { position, problem: problem.into() }
}

/// The SQL form of an expression, and for each byte of it the position in
/// the original text it came from (to report errors where the user wrote them).
fn to_sql(schema: &CollectionSchema, text: &str) -> Result<(String, Vec<usize>)> {
    let tokens = tokenize(text)?;
    if tokens.is_empty() {
        return Err(expression(0, "empty expression"));
    }
    let mut sql = String::new();
    let mut origin = Vec::new();
    let mut brackets: Vec<bool> = Vec::new(); // true = an IN list written with [ ]
    let push = |sql: &mut String, origin: &mut Vec<usize>, piece: &str, at: usize| {
        if !sql.is_empty() {
            sql.push(' ');
            origin.push(at);
        }
        sql.push_str(piece);
        origin.extend(std::iter::repeat_n(at, piece.len()));
    };
    for (index, (at, token)) in tokens.iter().enumerate() {
        let next = tokens.get(index + 1).map(|(_, t)| t);
        let piece = match token {
            Token::Ident(word) => {
                let lower = word.to_ascii_lowercase();
                if KEYWORDS.contains(&lower.as_str()) {
                    lower.to_ascii_uppercase()
                } else if next == Some(&Token::Op("(".into())) {
                    // A function call: DataFusion resolves the name.
                    lower
                } else {
                    match schema.field(word) {
                        Ok((_, field)) if field.data_type.is_vector() => {
                            return Err(expression(*at, format!("vector field `{word}` cannot be used in a filter")));
                        }
                        Ok(_) => format!("\"{word}\""),
                        Err(_) => {
                            return Err(expression(
                                *at,
                                format!("unknown field `{word}` in collection `{}`", schema.name),
                            ));
                        }
                    }
                }
            }
            Token::Number(n) => n.clone(),
            Token::Str(s) => format!("'{}'", s.replace('\'', "''")),
            Token::Op(op) => match op.as_str() {
                "==" => "=".into(),
                "&&" => "AND".into(),
                "||" => "OR".into(),
                "!" => "NOT".into(),
                "[" => {
                    let after_in =
                        index > 0 && matches!(&tokens[index - 1].1, Token::Ident(w) if w.eq_ignore_ascii_case("in"));
                    if !after_in {
                        return Err(expression(*at, "`[` only opens a list after `in`"));
                    }
                    brackets.push(true);
                    "(".into()
                }
                "]" => match brackets.pop() {
                    Some(true) => ")".into(),
                    _ => return Err(expression(*at, "`]` without a matching `[`")),
                },
                "(" => {
                    brackets.push(false);
                    "(".into()
                }
                ")" => match brackets.pop() {
                    Some(false) => ")".into(),
                    _ => return Err(expression(*at, "`)` without a matching `(`")),
                },
                other => other.to_string(),
            },
        };
        push(&mut sql, &mut origin, &piece, *at);
    }
    if !brackets.is_empty() {
        return Err(expression(text.len(), "unclosed bracket"));
    }
    Ok((sql, origin))
}

/// DataFusion's function registry and planner, built once per process.
fn session() -> &'static SessionContext {
    static SESSION: OnceLock<SessionContext> = OnceLock::new();
    SESSION.get_or_init(SessionContext::new)
}

/// Maps a DataFusion error on the SQL text back to a position in the user's text.
fn datafusion_error(error: datafusion::error::DataFusionError, origin: &[usize]) -> Error {
    let message = error.to_string();
    // sqlparser reports "Line: 1, Column: N" (1-based, in the SQL text).
    let position = message
        .split("Column: ")
        .nth(1)
        .and_then(|rest| rest.split(|c: char| !c.is_ascii_digit()).next())
        .and_then(|n| n.parse::<usize>().ok())
        .and_then(|column| origin.get(column.saturating_sub(1)).copied())
        .unwrap_or(0);
    expression(position, message)
}

impl Filter {
    /// Parses `text` and checks it against `schema`.
    pub fn compile(schema: &CollectionSchema, text: &str) -> Result<Filter> {
        let (sql, origin) = to_sql(schema, text)?;
        let df_schema = DFSchema::try_from(schema.arrow_schema().as_ref().clone())
            .map_err(|e| Error::InvalidSchema(e.to_string()))?;
        let ctx = session();
        let expr = ctx.parse_sql_expr(&sql, &df_schema).map_err(|e| datafusion_error(e, &origin))?;
        let data_type = expr.get_type(&df_schema).map_err(|e| datafusion_error(e, &origin))?;
        if data_type != arrow::datatypes::DataType::Boolean {
            return Err(expression(0, format!("the expression is {data_type}, not a boolean condition")));
        }
        let physical = ctx.create_physical_expr(expr, &df_schema).map_err(|e| datafusion_error(e, &origin))?;
        Ok(Filter { text: text.to_string(), expr: physical })
    }

    pub fn text(&self) -> &str {
        &self.text
    }

    /// Which rows of `batch` (in the collection's canonical layout) pass; null counts as false.
    pub fn evaluate(&self, batch: &RecordBatch) -> Result<Vec<bool>> {
        let value = self
            .expr
            .evaluate(batch)
            .and_then(|v| v.into_array(batch.num_rows()))
            .map_err(|e| expression(0, format!("evaluating `{}`: {e}", self.text)))?;
        let passed = value.as_boolean_opt().ok_or_else(|| expression(0, "the filter did not yield booleans"))?;
        Ok((0..passed.len()).map(|i| passed.is_valid(i) && passed.value(i)).collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vectorflow_core::batch::{WriteBatch, WriteKind};
    use vectorflow_core::{DataType, FieldSchema, Metric, Row, Value};

    fn schema() -> CollectionSchema {
        CollectionSchema::new(
            "docs",
            vec![
                FieldSchema::int64_primary("id", false),
                FieldSchema::vector("v", 2, Metric::L2),
                FieldSchema::new("year", DataType::Int32),
                FieldSchema::new("color", DataType::VarChar { max_length: 10 }).nullable(),
            ],
        )
    }

    fn batch() -> RecordBatch {
        let rows: Vec<Row> = [(1, 1999, Some("red")), (2, 2005, Some("blue")), (3, 2010, None), (4, 2020, Some("abc"))]
            .into_iter()
            .map(|(id, year, color)| {
                let mut row = Row::new();
                row.insert("id".into(), Value::Int(id));
                row.insert("v".into(), Value::Vector(vec![0.0, 0.0]));
                row.insert("year".into(), Value::Int(year));
                row.insert("color".into(), color.map_or(Value::Null, Value::from));
                row
            })
            .collect();
        WriteBatch::from_rows(&schema(), &rows, WriteKind::Upsert).unwrap().batch
    }

    fn passing(text: &str) -> Vec<i64> {
        let filter = Filter::compile(&schema(), text).unwrap_or_else(|e| panic!("{text}: {e}"));
        filter.evaluate(&batch()).unwrap().iter().enumerate().filter(|(_, p)| **p).map(|(i, _)| i as i64 + 1).collect()
    }

    #[test]
    fn milvus_and_sql_forms_agree() {
        assert_eq!(passing(r#"year > 2000 and color in ["red", "blue"]"#), vec![2]);
        assert_eq!(passing("year > 2000 AND color IN ('red','blue')"), vec![2]);
        assert_eq!(passing(r#"not (year == 1999) && color != "abc""#), vec![2]);
        assert_eq!(passing(r#"color like "ab%" || year <= 1999"#), vec![1, 4]);
        assert_eq!(passing("color is null"), vec![3]);
        assert_eq!(passing("color IS NOT NULL and year % 2 = 0"), vec![4]);
        assert_eq!(passing("year + 1 >= 2011"), vec![3, 4]);
        assert_eq!(passing("year between 2000 and 2010"), vec![2, 3]);
        assert_eq!(passing(r#"color not in ["red"]"#), vec![2, 4]);
    }

    #[test]
    fn errors_name_the_position() {
        let err = |text: &str| match Filter::compile(&schema(), text) {
            Err(Error::Expression { position, problem }) => (position, problem),
            other => panic!("{text}: expected an expression error, got {other:?}"),
        };
        let (position, problem) = err("year > 2000 and colour == \"red\"");
        assert_eq!(position, 16);
        assert!(problem.contains("unknown field `colour`"), "{problem}");
        assert!(err("year > ").1.to_lowercase().contains("expected"), "{}", err("year > ").1);
        assert_eq!(err("year > 'x").0, 7);
        assert_eq!(err("year $ 3").0, 5);
        assert!(err("year + 1").1.contains("not a boolean"));
        assert!(err("v > 1").1.contains("vector field"));
        assert_eq!(err("(year > 1").0, 9);
    }

    proptest::proptest! {
        #[test]
        fn any_text_gives_a_filter_or_an_error_never_a_panic(text in "[ -~äß€\\[\\]\"']{0,40}") {
            let _ = Filter::compile(&schema(), &text);
        }

        #[test]
        fn expression_shaped_text_never_panics(
            parts in proptest::collection::vec(
                proptest::sample::select(vec!["year", "color", "id", "==", ">", "and", "or", "not", "in", "[", "]",
                    "(", ")", "\"red\"", "'x'", "3", "-1.5e3", ",", "like", "is", "null", "+", "%", "!", "&&"]),
                0..12,
            )
        ) {
            let _ = Filter::compile(&schema(), &parts.join(" "));
        }
    }
}
