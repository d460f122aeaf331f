//! Filter expressions: Milvus boolean expressions (`year > 2000 and color in
//! ["red", "blue"]`, `not`, `&&`, `||`, `==`, `like "ab%"`, `is null`) or SQL
//! predicates (`month >= 202610`, `section IN ('a','b')`). Both are brought to
//! one SQL form, checked against the collection schema, and compiled by
//! DataFusion into a physical expression evaluated on segments' Arrow data.
//!
//! JSON fields take Milvus paths (`meta["a"][0] > 1`) and containment tests
//! (`array_contains(meta["tags"], "x")`); they become calls of the functions
//! in [`crate::json`], typed after what the path is compared with.
//!
//! Filters travel to workers as text; each worker compiles them once.

use std::sync::{Arc, OnceLock};

use arrow::array::{Array, AsArray};
use arrow::record_batch::RecordBatch;
use datafusion::common::DFSchema;
use datafusion::common::ScalarValue;
use datafusion::common::tree_node::{Transformed, TreeNode};
use datafusion::logical_expr::ExprSchemable;
use datafusion::logical_expr::Operator;
use datafusion::physical_expr::PhysicalExpr;
use datafusion::physical_expr::expressions::{BinaryExpr, CastExpr, Column, InListExpr, Literal, TryCastExpr};
use datafusion::prelude::SessionContext;
use vectorflow_core::{CollectionSchema, DataType, Error, Pk, Result, quote, quote_at_most};

use crate::json;

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
        } else if c.is_ascii_alphabetic()
            || c == '_'
            || (c == '$' && text[i + 1..].starts_with(|n: char| n.is_ascii_alphabetic()))
        {
            // `$` starts only Milvus's `$meta`, the dynamic field's name.
            i += 1;
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

/// What an open bracket in the user's text stands for.
enum Open {
    /// `in [ … ]`, written in SQL as `( … )`.
    InList,
    /// `( … )`. `lists`: the call is json_contains_any/all, whose second
    /// argument may be a `[ … ]` list; `commas` seen at this level.
    Paren { lists: bool, commas: usize },
    /// The `[ … ]` values of json_contains_any/all, passed on as further arguments.
    Values,
}

/// The type a JSON value must have to be compared with the other side.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Kind {
    Number,
    Text,
    Bool,
}

const COMPARISONS: &[&str] = &["==", "=", "!=", "<>", "<", "<=", ">", ">="];
const ARITHMETIC: &[&str] = &["+", "-", "*", "/", "%"];

fn op_at(tokens: &[(usize, Token)], index: Option<usize>) -> Option<&str> {
    match index.and_then(|i| tokens.get(i)) {
        Some((_, Token::Op(op))) => Some(op),
        _ => None,
    }
}

/// The lowercase word at `index`, if the token there is an identifier.
fn word_at(tokens: &[(usize, Token)], index: Option<usize>) -> Option<String> {
    match index.and_then(|i| tokens.get(i)) {
        Some((_, Token::Ident(word))) => Some(word.to_ascii_lowercase()),
        _ => None,
    }
}

/// The SQL name of a function; Milvus' array/json containment names map to our UDFs.
fn function_name(word: &str) -> String {
    let lower = word.to_ascii_lowercase();
    match lower.as_str() {
        "array_contains" | "json_contains" => json::JSON_CONTAINS.into(),
        "array_contains_any" | "json_contains_any" => json::JSON_CONTAINS_ANY.into(),
        "array_contains_all" | "json_contains_all" => json::JSON_CONTAINS_ALL.into(),
        _ => lower,
    }
}

/// The kind of the operand at `index`: a literal (a signed number too) or a
/// plain field of a scalar type. JSON paths and calls have no known kind.
fn operand_kind(schema: &CollectionSchema, tokens: &[(usize, Token)], index: Option<usize>) -> Option<Kind> {
    let index = index?;
    let next = op_at(tokens, Some(index + 1));
    match &tokens.get(index)?.1 {
        Token::Number(_) => Some(Kind::Number),
        Token::Str(_) => Some(Kind::Text),
        Token::Op(sign) if sign == "-" || sign == "+" => {
            matches!(tokens.get(index + 1), Some((_, Token::Number(_)))).then_some(Kind::Number)
        }
        Token::Ident(word) if word.eq_ignore_ascii_case("true") || word.eq_ignore_ascii_case("false") => {
            Some(Kind::Bool)
        }
        Token::Ident(_) if next == Some("[") || next == Some("(") => None,
        Token::Ident(word) => match schema.field(word).ok()?.1.data_type {
            DataType::Bool => Some(Kind::Bool),
            DataType::VarChar { .. } => Some(Kind::Text),
            DataType::Int8
            | DataType::Int16
            | DataType::Int32
            | DataType::Int64
            | DataType::Float
            | DataType::Double => Some(Kind::Number),
            DataType::Json | DataType::FloatVector { .. } => None,
        },
        Token::Op(_) => None,
    }
}

/// The kind a JSON path spanning tokens `start..end` is compared with:
/// `path op x`, `x op path`, `path [not] in [x, …]`, `path [not] between x …`,
/// `path [not] like x`.
fn compared_kind(schema: &CollectionSchema, tokens: &[(usize, Token)], start: usize, end: usize) -> Option<Kind> {
    if op_at(tokens, Some(end)).is_some_and(|op| COMPARISONS.contains(&op)) {
        return operand_kind(schema, tokens, Some(end + 1));
    }
    let after = if word_at(tokens, Some(end)).as_deref() == Some("not") { end + 1 } else { end };
    match word_at(tokens, Some(after)).as_deref() {
        Some("in") if matches!(op_at(tokens, Some(after + 1)), Some("[" | "(")) => {
            return operand_kind(schema, tokens, Some(after + 2));
        }
        Some("between") => return operand_kind(schema, tokens, Some(after + 1)),
        Some("like") => return Some(Kind::Text),
        _ => {}
    }
    if op_at(tokens, start.checked_sub(1)).is_some_and(|op| COMPARISONS.contains(&op)) {
        return operand_kind(schema, tokens, start.checked_sub(2));
    }
    None
}

/// Which json function reads the path spanning tokens `start..end`.
fn json_getter(schema: &CollectionSchema, tokens: &[(usize, Token)], start: usize, end: usize) -> &'static str {
    let before = start.checked_sub(1);
    match compared_kind(schema, tokens, start, end) {
        Some(Kind::Number) => json::JSON_GET_FLOAT,
        Some(Kind::Text) => json::JSON_GET_STR,
        Some(Kind::Bool) => json::JSON_GET_BOOL,
        None if [op_at(tokens, before), op_at(tokens, Some(end))]
            .iter()
            .flatten()
            .any(|op| ARITHMETIC.contains(op)) =>
        {
            json::JSON_GET_FLOAT
        }
        None => {
            // A bare path between logical connectives is itself a condition.
            let connective = |word: Option<String>, op: Option<&str>, allowed: &[&str]| {
                word.is_some_and(|w| allowed.contains(&w.as_str())) || op.is_some_and(|o| allowed.contains(&o))
            };
            let group_open = op_at(tokens, before) == Some("(")
                && !before.and_then(|b| b.checked_sub(1)).and_then(|i| tokens.get(i)).is_some_and(
                    |(_, t)| matches!(t, Token::Ident(w) if !KEYWORDS.contains(&w.to_ascii_lowercase().as_str())),
                );
            let opens = before.is_none()
                || group_open
                || connective(word_at(tokens, before), op_at(tokens, before), &["and", "or", "not", "&&", "||", "!"]);
            let closes = end >= tokens.len()
                || connective(word_at(tokens, Some(end)), op_at(tokens, Some(end)), &["and", "or", "&&", "||", ")"]);
            if opens && closes { json::JSON_GET_BOOL } else { json::JSON_GET }
        }
    }
}

/// Reads the path steps `["key"]` / `[0]` from `tokens[start..]`: their SQL
/// arguments (each with a leading `, `) and the index just past the path.
fn json_path(tokens: &[(usize, Token)], start: usize, text_len: usize) -> Result<(String, usize)> {
    let mut steps = String::new();
    let mut index = start;
    while op_at(tokens, Some(index)) == Some("[") {
        let step = match tokens.get(index + 1) {
            Some((_, Token::Str(key))) => format!("'{}'", key.replace('\'', "''")),
            Some((at, Token::Number(n))) => match n.parse::<u32>() {
                Ok(i) if n.bytes().all(|b| b.is_ascii_digit()) => i.to_string(),
                _ => {
                    return Err(expression(
                        *at,
                        format!("a json path index must be a non-negative integer, not `{n}`"),
                    ));
                }
            },
            Some((at, _)) => {
                return Err(expression(*at, "a json path step must be a string key or an integer index"));
            }
            None => return Err(expression(text_len, "a json path step must be a string key or an integer index")),
        };
        match tokens.get(index + 2) {
            Some((_, Token::Op(close))) if close == "]" => {}
            Some((at, _)) => return Err(expression(*at, "expected `]` after the json path step")),
            None => return Err(expression(text_len, "expected `]` after the json path step")),
        }
        steps.push_str(", ");
        steps.push_str(&step);
        index += 3;
    }
    Ok((steps, index))
}

/// The longest filter text, in bytes. Tokenizing and rewriting are linear,
/// but a filter travels to every worker and is compiled on each.
pub const MAX_FILTER_BYTES: usize = 1 << 20;

/// The most operators (`and`, `or`, `not`, comparisons, arithmetic, `like`,
/// `is`, `between`, `in`) and function calls one filter may hold.
/// DataFusion plans and evaluates an expression by recursing once per
/// operator. Planning runs on its own [`COMPILE_STACK_BYTES`] stack;
/// evaluating runs on the caller's thread (a tokio or timely worker, 2 MiB):
/// in the dev profile a chain of about 500 operators overflows there, so 128
/// keeps more than a 3x margin (the test
/// `the_largest_filters_evaluate_on_a_third_of_a_thread_stack` checks it).
pub const MAX_EXPRESSION_TERMS: usize = 128;

/// The most values in one `in [..]` list: a list is one flat node, so it may
/// be long, but its values are held in memory on every worker.
pub const MAX_IN_LIST_VALUES: usize = 100_000;

/// The stack DataFusion parses and plans a filter on. Parsing and type
/// coercion take about 18 KB per chained operator and 100 KB per nested call
/// in the dev profile, so a 2 MiB thread overflows at about 110 operators or
/// 20 nested calls; 64 MiB keeps [`MAX_EXPRESSION_TERMS`] and sqlparser's
/// nesting limit (50) far below that. The pages are only touched as used.
const COMPILE_STACK_BYTES: usize = 64 << 20;

/// Functions whose result grows with an argument's value (a count, a length,
/// a range) or multiplies its input, so one row can ask for any amount of
/// memory (`lpad(s, 2147483647)`): refused in filters, with why.
pub const ALLOCATING_FUNCTIONS: &[(&str, &str)] = &[
    ("repeat", "its result is as long as the count argument says"),
    ("lpad", "its result is as long as the length argument says"),
    ("rpad", "its result is as long as the length argument says"),
    ("overlay", "its result grows with its arguments"),
    ("array_repeat", "its result has as many elements as the count argument says"),
    ("array_resize", "its result has as many elements as the size argument says"),
    ("range", "its result has as many elements as the range spans"),
    ("generate_series", "its result has as many elements as the range spans"),
    ("make_array", "it builds an array from its arguments"),
    ("replace", "its result can be a multiple of its input, and nested calls multiply again"),
    ("regexp_replace", "its result can be a multiple of its input, and nested calls multiply again"),
    ("encode", "its result is a multiple of its input, and nested calls multiply again"),
    ("array_to_string", "its result can be a multiple of its input, and nested calls multiply again"),
    ("arrow_cast", "its type argument can name a fixed-size list of any length"),
    ("arrow_try_cast", "its type argument can name a fixed-size list of any length"),
];

/// Why `name` (a function name as written, any case) is refused, if it is:
/// the canonical names above and every alias DataFusion registers for them.
pub fn allocating_function(name: &str) -> Option<&'static str> {
    static REFUSED: OnceLock<Vec<(String, &'static str)>> = OnceLock::new();
    let refused = REFUSED.get_or_init(|| {
        let state = session().state();
        let mut refused = Vec::new();
        for (canonical, why) in ALLOCATING_FUNCTIONS {
            refused.push((canonical.to_string(), *why));
            if let Some(udf) = state.scalar_functions().get(*canonical) {
                refused.extend(udf.aliases().iter().map(|alias| (alias.clone(), *why)));
            }
        }
        refused
    });
    let lower = name.to_ascii_lowercase();
    refused.iter().find(|(refused, _)| *refused == lower).map(|(_, why)| *why)
}

/// Refuses, before anything recurses over it, an expression too large to
/// compile and evaluate safely (see [`MAX_EXPRESSION_TERMS`]), an `in` list
/// over [`MAX_IN_LIST_VALUES`], or a call of an [`ALLOCATING_FUNCTIONS`] one.
fn check_size(tokens: &[(usize, Token)]) -> Result<()> {
    let mut terms = 0usize;
    // One entry per open bracket: for an `in` list, how many values it has had.
    let mut open: Vec<Option<usize>> = Vec::new();
    for (index, (at, token)) in tokens.iter().enumerate() {
        let previous = index.checked_sub(1);
        let is_term = match token {
            Token::Ident(word) => {
                let lower = word.to_ascii_lowercase();
                if KEYWORDS.contains(&lower.as_str()) {
                    matches!(lower.as_str(), "and" | "or" | "not" | "in" | "like" | "is" | "between")
                } else if op_at(tokens, Some(index + 1)) == Some("(") {
                    let name = function_name(word);
                    if let Some(why) = allocating_function(&name) {
                        return Err(expression(*at, format!("function `{name}` is not allowed in filters: {why}")));
                    }
                    true
                } else {
                    false
                }
            }
            Token::Op(op) => match op.as_str() {
                "[" | "(" => {
                    let list = word_at(tokens, previous).as_deref() == Some("in");
                    open.push(list.then_some(1));
                    false
                }
                "]" | ")" => {
                    open.pop();
                    false
                }
                "," => {
                    if let Some(Some(values)) = open.last_mut() {
                        *values += 1;
                        if *values > MAX_IN_LIST_VALUES {
                            return Err(expression(
                                *at,
                                format!(
                                    "the `in` list has more than {MAX_IN_LIST_VALUES} values (limit max_in_list_values)"
                                ),
                            ));
                        }
                    }
                    false
                }
                // A sign on a number is part of the value (`in [-1, -2]`), not an operator that nests.
                "-" | "+"
                    if matches!(tokens.get(index + 1), Some((_, Token::Number(_))))
                        && (previous.is_none() || op_at(tokens, previous).is_some_and(|p| p != ")" && p != "]")) =>
                {
                    false
                }
                _ => true,
            },
            Token::Number(_) | Token::Str(_) => false,
        };
        if is_term {
            terms += 1;
            if terms > MAX_EXPRESSION_TERMS {
                return Err(expression(
                    *at,
                    format!(
                        "the expression has more than {MAX_EXPRESSION_TERMS} operators and function calls \
                         (limit max_expression_terms); use `field in [..]` for long lists of values"
                    ),
                ));
            }
        }
    }
    Ok(())
}

/// The SQL form of an expression, and for each byte of it the position in
/// the original text it came from (to report errors where the user wrote them).
fn to_sql(schema: &CollectionSchema, text: &str) -> Result<(String, Vec<usize>)> {
    if text.len() > MAX_FILTER_BYTES {
        return Err(expression(
            0,
            format!(
                "the filter is {} bytes, more than {MAX_FILTER_BYTES} (limit max_filter_bytes); \
                 use `field in [..]` for long lists of values",
                text.len()
            ),
        ));
    }
    let tokens = tokenize(text)?;
    if tokens.is_empty() {
        return Err(expression(0, "empty expression"));
    }
    check_size(&tokens)?;
    let mut sql = String::new();
    let mut origin = Vec::new();
    let mut brackets: Vec<Open> = Vec::new();
    let push = |sql: &mut String, origin: &mut Vec<usize>, piece: &str, at: usize| {
        if !sql.is_empty() {
            sql.push(' ');
            origin.push(at);
        }
        sql.push_str(piece);
        origin.extend(std::iter::repeat_n(at, piece.len()));
    };
    let mut index = 0;
    while let Some((at, token)) = tokens.get(index) {
        let at = *at;
        let next = op_at(&tokens, Some(index + 1));
        let previous = index.checked_sub(1);
        let mut consumed = 1;
        let piece = match token {
            Token::Ident(word) => {
                let lower = word.to_ascii_lowercase();
                if KEYWORDS.contains(&lower.as_str()) {
                    Some(lower.to_ascii_uppercase())
                } else if next == Some("(") {
                    // A function call: DataFusion resolves the name.
                    Some(function_name(word))
                } else {
                    match schema.field(word) {
                        Ok((_, field)) if field.data_type.is_vector() => {
                            return Err(expression(at, format!("vector field `{word}` cannot be used in a filter")));
                        }
                        Ok((_, field)) if next == Some("[") => {
                            if field.data_type != DataType::Json {
                                let bracket = tokens.get(index + 1).map_or(at, |(p, _)| *p);
                                return Err(expression(
                                    bracket,
                                    format!("field `{word}` is not json: `[` opens a path only after a json field"),
                                ));
                            }
                            let (steps, end) = json_path(&tokens, index + 1, text.len())?;
                            consumed = end - index;
                            Some(format!("{}(\"{word}\"{steps})", json_getter(schema, &tokens, index, end)))
                        }
                        Ok(_) => Some(format!("\"{word}\"")),
                        // A name the schema does not declare is a key of the
                        // dynamic field, as in Milvus: `color` reads `$meta["color"]`.
                        Err(_) => match schema.dynamic_field() {
                            Some(dynamic) => {
                                let (steps, end) = json_path(&tokens, index + 1, text.len())?;
                                consumed = end - index;
                                let getter = json_getter(schema, &tokens, index, end);
                                Some(format!("{getter}(\"{}\", '{word}'{steps})", dynamic.name))
                            }
                            None => {
                                return Err(expression(
                                    at,
                                    format!("unknown field `{word}` in collection `{}`", schema.name),
                                ));
                            }
                        },
                    }
                }
            }
            Token::Number(n) => Some(n.clone()),
            Token::Str(s) => Some(format!("'{}'", s.replace('\'', "''"))),
            Token::Op(op) => match op.as_str() {
                "==" => Some("=".into()),
                "&&" => Some("AND".into()),
                "||" => Some("OR".into()),
                "!" => Some("NOT".into()),
                "[" => {
                    if word_at(&tokens, previous).as_deref() == Some("in") {
                        brackets.push(Open::InList);
                        Some("(".into())
                    } else if op_at(&tokens, previous) == Some(",")
                        && matches!(brackets.last(), Some(Open::Paren { lists: true, commas: 1 }))
                    {
                        brackets.push(Open::Values);
                        if next == Some("]") && sql.ends_with(" ,") {
                            // An empty list: no further arguments, so no comma either.
                            let keep = sql.len() - 2;
                            sql.truncate(keep);
                            origin.truncate(keep);
                        }
                        None
                    } else {
                        return Err(expression(
                            at,
                            "`[` opens a list only after `in` or as the second argument of json_contains_any/all, \
                             and a path only after a json field",
                        ));
                    }
                }
                "]" => match brackets.pop() {
                    Some(Open::InList) => Some(")".into()),
                    Some(Open::Values) if next == Some(")") => None,
                    Some(Open::Values) => {
                        let after = tokens.get(index + 1).map_or(text.len(), |(p, _)| *p);
                        return Err(expression(after, "expected `)`: the `[ … ]` list is the last argument"));
                    }
                    _ => return Err(expression(at, "`]` without a matching `[`")),
                },
                "(" => {
                    let call = word_at(&tokens, previous).map(|w| function_name(&w));
                    let lists = matches!(call.as_deref(), Some(json::JSON_CONTAINS_ANY | json::JSON_CONTAINS_ALL));
                    brackets.push(Open::Paren { lists, commas: 0 });
                    Some("(".into())
                }
                ")" => match brackets.pop() {
                    Some(Open::Paren { .. }) => Some(")".into()),
                    _ => return Err(expression(at, "`)` without a matching `(`")),
                },
                "," => {
                    if let Some(Open::Paren { commas, .. }) = brackets.last_mut() {
                        *commas += 1;
                    }
                    Some(",".into())
                }
                other => Some(other.to_string()),
            },
        };
        if let Some(piece) = piece {
            push(&mut sql, &mut origin, &piece, at);
        }
        index += consumed;
    }
    if !brackets.is_empty() {
        return Err(expression(text.len(), "unclosed bracket"));
    }
    Ok((sql, origin))
}

/// DataFusion's function registry and planner, built once per process.
fn session() -> &'static SessionContext {
    static SESSION: OnceLock<SessionContext> = OnceLock::new();
    SESSION.get_or_init(|| {
        let ctx = SessionContext::new();
        json::register_json_udfs(&ctx);
        ctx
    })
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
    // DataFusion's messages can quote the whole expression back.
    expression(position, quote_at_most(&message, 300).into_owned())
}

/// Parses the SQL form of a filter and plans it against `schema` as a boolean physical expression.
fn plan(schema: &CollectionSchema, sql: &str, origin: &[usize]) -> Result<Arc<dyn PhysicalExpr>> {
    let df_schema =
        DFSchema::try_from(schema.arrow_schema().as_ref().clone()).map_err(|e| Error::InvalidSchema(e.to_string()))?;
    let ctx = session();
    let expr = ctx.parse_sql_expr(sql, &df_schema).map_err(|e| datafusion_error(e, origin))?;
    let data_type = expr.get_type(&df_schema).map_err(|e| datafusion_error(e, origin))?;
    if data_type != arrow::datatypes::DataType::Boolean {
        return Err(expression(0, format!("the expression is {data_type}, not a boolean condition")));
    }
    let physical = ctx.create_physical_expr(expr, &df_schema).map_err(|e| datafusion_error(e, origin))?;
    // DataFusion's integer arithmetic wraps unless asked not to: a filter
    // such as `9223372036854775807 + n > 0` would silently compare a wrapped
    // value. Checked arithmetic makes the overflow an error of the filter.
    physical
        .transform_up(|node| match node.downcast_ref::<BinaryExpr>() {
            Some(binary) => {
                let checked = BinaryExpr::new(binary.left().clone(), *binary.op(), binary.right().clone())
                    .with_fail_on_overflow(true);
                Ok(Transformed::yes(Arc::new(checked) as Arc<dyn PhysicalExpr>))
            }
            None => Ok(Transformed::no(node)),
        })
        .map(|transformed| transformed.data)
        .map_err(|e| datafusion_error(e, origin))
}

impl Filter {
    /// Parses `text` and checks it against `schema`.
    pub fn compile(schema: &CollectionSchema, text: &str) -> Result<Filter> {
        let (sql, origin) = to_sql(schema, text)?;
        // DataFusion recurses over the expression while parsing and planning
        // it; a thread of its own gives that a known stack, whatever called us.
        let expr = std::thread::scope(|scope| {
            let planning = std::thread::Builder::new()
                .name("vectorflow-filter".into())
                .stack_size(COMPILE_STACK_BYTES)
                .spawn_scoped(scope, || plan(schema, &sql, &origin))?;
            planning.join().unwrap_or_else(|_| Err(expression(0, "planning the filter failed")))
        })?;
        Ok(Filter { text: text.to_string(), expr })
    }

    pub fn text(&self) -> &str {
        &self.text
    }

    /// The values of `field` every passing row has, when the filter pins
    /// them: `field == v`, `field in [..]`, an `or` of such, or an `and`
    /// with one of them. `None` when rows with other values may pass.
    /// Partition-key pruning reads it: only the pinned values' partitions
    /// can hold passing rows.
    pub fn pinned_values(&self, field: &str) -> Option<Vec<Pk>> {
        pinned(&self.expr, field)
    }

    /// Which rows of `batch` (in the collection's canonical layout) pass; null counts as false.
    pub fn evaluate(&self, batch: &RecordBatch) -> Result<Vec<bool>> {
        let value = self.expr.evaluate(batch).and_then(|v| v.into_array(batch.num_rows())).map_err(|e| {
            expression(0, quote_at_most(&format!("evaluating `{}`: {e}", quote(&self.text)), 300).into_owned())
        })?;
        let passed = value.as_boolean_opt().ok_or_else(|| expression(0, "the filter did not yield booleans"))?;
        Ok((0..passed.len()).map(|i| passed.is_valid(i) && passed.value(i)).collect())
    }
}

/// See [`Filter::pinned_values`].
fn pinned(expr: &Arc<dyn PhysicalExpr>, field: &str) -> Option<Vec<Pk>> {
    let is_field = |e: &Arc<dyn PhysicalExpr>| {
        let mut e = e;
        // A cast of the column (to the literal's type) keeps its values.
        loop {
            if let Some(cast) = e.downcast_ref::<CastExpr>() {
                e = cast.expr();
            } else if let Some(cast) = e.downcast_ref::<TryCastExpr>() {
                e = cast.expr();
            } else {
                break;
            }
        }
        e.downcast_ref::<Column>().is_some_and(|c| c.name() == field)
    };
    let literal = |e: &Arc<dyn PhysicalExpr>| match e.downcast_ref::<Literal>()?.value() {
        ScalarValue::Int8(Some(v)) => Some(Pk::Int(i64::from(*v))),
        ScalarValue::Int16(Some(v)) => Some(Pk::Int(i64::from(*v))),
        ScalarValue::Int32(Some(v)) => Some(Pk::Int(i64::from(*v))),
        ScalarValue::Int64(Some(v)) => Some(Pk::Int(*v)),
        ScalarValue::Utf8(Some(v)) | ScalarValue::LargeUtf8(Some(v)) | ScalarValue::Utf8View(Some(v)) => {
            Some(Pk::Str(v.clone()))
        }
        _ => None,
    };
    if let Some(binary) = expr.downcast_ref::<BinaryExpr>() {
        return match binary.op() {
            Operator::And => pinned(binary.left(), field).or_else(|| pinned(binary.right(), field)),
            Operator::Or => {
                let mut values = pinned(binary.left(), field)?;
                values.extend(pinned(binary.right(), field)?);
                Some(values)
            }
            Operator::Eq if is_field(binary.left()) => literal(binary.right()).map(|v| vec![v]),
            Operator::Eq if is_field(binary.right()) => literal(binary.left()).map(|v| vec![v]),
            _ => None,
        };
    }
    if let Some(list) = expr.downcast_ref::<InListExpr>()
        && !list.negated()
        && is_field(list.expr())
    {
        return list.list().iter().map(literal).collect();
    }
    None
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
                FieldSchema::new("meta", DataType::Json).nullable(),
            ],
        )
    }

    /// Rows 1 and 2 hold the documented shapes, row 3 no document, row 4 the
    /// same keys with other JSON types (and `k`, which 1 lacks and 2 holds as null).
    const META: [Option<&str>; 4] = [
        Some(r#"{"a": 1, "tags": ["x", "y"], "n": {"b": 2.5}, "s": "hi", "flag": true, "arr": [1, 2]}"#),
        Some(r#"{"a": 2.5, "tags": ["y", 3], "n": {"b": 1}, "s": "ho", "flag": false, "k": null, "arr": [2]}"#),
        None,
        Some(r#"{"a": "1", "tags": "x", "s": 5, "flag": "true", "k": 2, "arr": []}"#),
    ];

    fn batch() -> RecordBatch {
        let rows: Vec<Row> = [(1, 1999, Some("red")), (2, 2005, Some("blue")), (3, 2010, None), (4, 2020, Some("abc"))]
            .into_iter()
            .zip(META)
            .map(|((id, year, color), meta)| {
                let mut row = Row::new();
                row.insert("id".into(), Value::Int(id));
                row.insert("v".into(), Value::Vector(vec![0.0, 0.0]));
                row.insert("year".into(), Value::Int(year));
                row.insert("color".into(), color.map_or(Value::Null, Value::from));
                row.insert("meta".into(), meta.map_or(Value::Null, Value::from));
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
    fn pinned_values_are_the_only_values_a_filter_passes() {
        let pinned = |text: &str, field: &str| Filter::compile(&schema(), text).unwrap().pinned_values(field);
        let ints = |v: &[i64]| Some(v.iter().map(|&x| Pk::Int(x)).collect::<Vec<_>>());
        assert_eq!(pinned("year == 2001", "year"), ints(&[2001]));
        assert_eq!(pinned("year in [1, 2]", "year"), ints(&[1, 2]));
        assert_eq!(pinned("year = 1 OR year = 2", "year"), ints(&[1, 2]));
        assert_eq!(pinned(r#"color == "red" and year > 5"#, "color"), Some(vec![Pk::Str("red".into())]));
        assert_eq!(pinned(r#"color == "red" and year > 5"#, "year"), None);
        assert_eq!(pinned("year > 5", "year"), None);
        assert_eq!(pinned("not (year == 1)", "year"), None);
        assert_eq!(pinned(r#"year == 1 or color == "x""#, "year"), None);
        assert_eq!(pinned("year not in [1, 2]", "year"), None);
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

    /// The same documents in a dynamic field: bare names read its keys.
    fn passing_dynamic(text: &str) -> Vec<i64> {
        let mut dynamic = schema();
        dynamic.fields.retain(|f| f.name != "meta");
        dynamic.fields.push(FieldSchema::dynamic());
        let rows: Vec<Row> = (1..=4)
            .zip(META)
            .map(|(id, meta)| {
                let mut row = Row::new();
                row.insert("id".into(), Value::Int(id));
                row.insert("v".into(), Value::Vector(vec![0.0, 0.0]));
                row.insert("year".into(), Value::Int(2000 + id));
                row.insert(vectorflow_core::DYNAMIC_FIELD_NAME.into(), meta.map_or(Value::Null, Value::from));
                row
            })
            .collect();
        let batch = WriteBatch::from_rows(&dynamic, &rows, WriteKind::Upsert).unwrap().batch;
        let filter = Filter::compile(&dynamic, text).unwrap_or_else(|e| panic!("{text}: {e}"));
        filter.evaluate(&batch).unwrap().iter().enumerate().filter(|(_, p)| **p).map(|(i, _)| i as i64 + 1).collect()
    }

    #[test]
    fn undeclared_names_read_the_dynamic_field() {
        assert_eq!(passing_dynamic(r#"s == "hi""#), vec![1]);
        assert_eq!(passing_dynamic("a > 1.5 and year > 2000"), vec![2]);
        assert_eq!(passing_dynamic(r#"n["b"] == 1"#), vec![2]);
        assert_eq!(passing_dynamic(r#"$meta["s"] in ["hi", "ho"]"#), vec![1, 2]);
        assert_eq!(passing_dynamic(r#"array_contains(tags, "x")"#), vec![1]);
        assert_eq!(passing_dynamic("flag"), vec![1]);
        // Without a dynamic field an undeclared name is still an error.
        assert!(err("colour == 1").1.contains("unknown field `colour`"));
    }

    fn err(text: &str) -> (usize, String) {
        match Filter::compile(&schema(), text) {
            Err(Error::Expression { position, problem }) => (position, problem),
            other => panic!("{text}: expected an expression error, got {other:?}"),
        }
    }

    #[test]
    fn errors_name_the_position() {
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

    #[test]
    fn json_paths_compare_typed_values() {
        assert_eq!(passing(r#"meta["a"] == 1"#), vec![1]);
        assert_eq!(passing(r#"meta["a"] > 1.5"#), vec![2]);
        assert_eq!(passing(r#"3 > meta["a"]"#), vec![1, 2]);
        assert_eq!(passing(r#"meta["a"] >= -1e3 and meta["a"] <= +1"#), vec![1]);
        assert_eq!(passing(r#"meta["n"]["b"] > 1.5"#), vec![1]);
        assert_eq!(passing(r#"meta["n"]["b"] == 1"#), vec![2]);
        assert_eq!(passing(r#"meta["s"] == "hi""#), vec![1]);
        assert_eq!(passing(r#""ho" == meta["s"]"#), vec![2]);
        assert_eq!(passing(r#"meta["s"] != "hi""#), vec![2]);
        assert_eq!(passing(r#"meta["s"] like "h%""#), vec![1, 2]);
        assert_eq!(passing(r#"meta["flag"] == true"#), vec![1]);
        assert_eq!(passing(r#"meta["flag"] == false"#), vec![2]);
        assert_eq!(passing(r#"meta["flag"] && year < 2000"#), vec![1]);
        assert_eq!(passing(r#"not meta["flag"]"#), vec![2]);
        assert_eq!(passing(r#"meta["a"] in [1, 2.5]"#), vec![1, 2]);
        assert_eq!(passing(r#"meta["a"] in ["1"]"#), vec![4]);
        assert_eq!(passing(r#"meta["a"] not in [1]"#), vec![2]);
        assert_eq!(passing(r#"meta["a"] between 0 and 2"#), vec![1]);
        assert_eq!(passing(r#"meta["k"] is null"#), vec![1, 2, 3]);
        assert_eq!(passing(r#"meta["k"] is not null"#), vec![4]);
        assert_eq!(passing(r#"meta["arr"][0] == 1"#), vec![1]);
        assert_eq!(passing(r#"meta["arr"][1] == 2"#), vec![1]);
        assert_eq!(passing(r#"meta["arr"][0] > 1"#), vec![2]);
        assert_eq!(passing(r#"meta["tags"][1] == 3"#), vec![2]);
        assert_eq!(passing(r#"meta["a"] * 2 > 4"#), vec![2]);
        assert_eq!(passing(r#"meta["a"] > year - 2004"#), vec![1, 2]);
        assert_eq!(passing(r#"meta["n"] is not null and meta["n"]["b"] < 2"#), vec![2]);
        assert_eq!(passing(r#"meta["arr"] == meta["arr"]"#), vec![1, 2, 4]);
        assert_eq!(passing("meta is null"), vec![3]);
        // The functions are there for SQL predicates too.
        assert_eq!(passing("json_get_float(meta, 'a') = 1 OR json_get_str(meta, 's') = 'ho'"), vec![1, 2]);
    }

    #[test]
    fn json_paths_become_typed_calls() {
        let sql = |text: &str| to_sql(&schema(), text).unwrap().0;
        assert_eq!(sql(r#"meta["a"][0] == 1"#), r#"json_get_float("meta", 'a', 0) = 1"#);
        assert_eq!(sql(r#""x" < meta["a"]"#), r#"'x' < json_get_str("meta", 'a')"#);
        assert_eq!(sql(r#"meta["a"] not in [true]"#), r#"json_get_bool("meta", 'a') NOT IN ( TRUE )"#);
        assert_eq!(sql(r#"meta["a"] is null"#), r#"json_get("meta", 'a') IS NULL"#);
        assert_eq!(sql(r#"abs(meta["a"]) > year"#), r#"abs ( json_get("meta", 'a') ) > "year""#);
        assert_eq!(sql(r#"-meta["a"] > year"#), r#"- json_get_float("meta", 'a') > "year""#);
        assert_eq!(
            sql(r#"Array_Contains_Any(meta["t"], [1, 2])"#),
            r#"json_contains_any ( json_get("meta", 't') , 1 , 2 )"#
        );
        assert_eq!(sql(r#"json_contains_all(meta, [])"#), r#"json_contains_all ( "meta" )"#);
    }

    #[test]
    fn json_arrays_hold_values() {
        assert_eq!(passing(r#"array_contains(meta["tags"], "x")"#), vec![1]);
        assert_eq!(passing(r#"json_contains(meta["tags"], 3)"#), vec![2]);
        assert_eq!(passing(r#"ARRAY_CONTAINS(meta["tags"], 3.0)"#), vec![2]);
        assert_eq!(passing(r#"array_contains(meta["arr"], 2)"#), vec![1, 2]);
        assert_eq!(passing(r#"not array_contains(meta["tags"], "x")"#), vec![2, 4]);
        assert_eq!(passing(r#"json_contains(meta["flag"], true)"#), Vec::<i64>::new());
        assert_eq!(passing(r#"json_contains_any(meta["tags"], ["x", 3])"#), vec![1, 2]);
        assert_eq!(passing(r#"array_contains_any(meta["arr"], [5, 1.0])"#), vec![1]);
        assert_eq!(passing(r#"array_contains_all(meta["tags"], ["x", "y"])"#), vec![1]);
        assert_eq!(passing(r#"json_contains_all(meta["arr"], [2])"#), vec![1, 2]);
        assert_eq!(passing(r#"json_contains_all(meta["arr"], [])"#), vec![1, 2, 4]);
        assert_eq!(passing(r#"json_contains_any(meta["arr"], [])"#), Vec::<i64>::new());
        assert_eq!(passing(r#"json_contains_any(meta["arr"], 5, 2)"#), vec![1, 2]);
    }

    #[test]
    fn json_errors_name_the_position() {
        let (position, problem) = err(r#"year["a"] == 1"#);
        assert_eq!(position, 4);
        assert!(problem.contains("field `year` is not json: `[`"), "{problem}");
        let (position, problem) = err(r#"year > 1 and color[0] == "x""#);
        assert_eq!(position, 18);
        assert!(problem.contains("field `color` is not json"), "{problem}");
        let (position, problem) = err("meta[a] == 1");
        assert_eq!(position, 5);
        assert!(problem.contains("string key or an integer index"), "{problem}");
        assert_eq!(err("meta[1.5] == 1").0, 5);
        assert_eq!(err("meta[-1] == 1").0, 5);
        assert_eq!(err(r#"meta["a"]["#).0, 10);
        let (position, problem) = err(r#"meta["a" == 1"#);
        assert_eq!(position, 9);
        assert!(problem.contains("expected `]`"), "{problem}");
        assert_eq!(err(r#"meta["a""#).0, 8);
        assert_eq!(err(r#"meta["a"] in [1][0]"#).0, 16);
        assert_eq!(err(r#"array_contains(meta["tags"], ["x"])"#).0, 29);
        assert_eq!(err(r#"json_contains_any(meta["tags"], 1, ["x"])"#).0, 35);
        let (position, problem) = err(r#"json_contains_any(meta["tags"], ["x"], 1)"#);
        assert_eq!(position, 37);
        assert!(problem.contains("last argument"), "{problem}");
        assert!(err("array_contains(year, 1)").1.contains("json"));
        assert!(err(r#"meta["a"] + 1"#).1.contains("not a boolean"));
    }

    fn chain(terms: usize, op: &str) -> String {
        (0..terms).map(|i| format!("year != {i}")).collect::<Vec<_>>().join(&format!(" {op} "))
    }

    #[test]
    fn long_expressions_are_refused_naming_the_limit() {
        let or_chain = (0..800).map(|i| format!("year == {i}")).collect::<Vec<_>>().join(" or ");
        for text in [or_chain, chain(1000, "and"), format!("year{} > 0", " + 1".repeat(1000))] {
            let (position, problem) = err(&text);
            assert!(problem.contains("max_expression_terms") && problem.contains("128"), "{problem}");
            assert!(position > 0 && position < text.len(), "{position}");
            assert!(problem.len() < 300, "the message repeats the input: {problem}");
        }
        // At the limit: 64 comparisons and 63 `and`s compile and evaluate.
        assert_eq!(passing(&chain(64, "and")), vec![1, 2, 3, 4]);
    }

    #[test]
    fn in_lists_hold_a_hundred_thousand_values() {
        let values = |n: usize| (0..n).map(|i| (i as i64 - 50_000).to_string()).collect::<Vec<_>>().join(", ");
        assert_eq!(passing(&format!("year in [{}] and id > 1", values(100_000))), vec![2, 3, 4]);
        let (_, problem) = err(&format!("year in [{}]", values(100_001)));
        assert!(problem.contains("max_in_list_values"), "{problem}");
        let long = format!("year in [{}]", "1, ".repeat(MAX_FILTER_BYTES / 3));
        let (position, problem) = err(&long);
        assert_eq!(position, 0);
        assert!(problem.contains("max_filter_bytes") && problem.len() < 300, "{problem}");
    }

    #[test]
    fn functions_that_allocate_from_their_arguments_are_refused() {
        for (text, function) in [
            ("year > 0 and length(repeat(color, 10000000)) > 0", "repeat"),
            ("length(lpad(color, 2147483647)) > 0", "lpad"),
            ("length(RPAD(color, 2147483647, 'x')) > 0", "rpad"),
            ("array_length(list_repeat(year, 100000000)) > 0", "list_repeat"),
            ("cardinality(range(0, 10000000000)) > 0", "range"),
            ("cardinality(generate_series(1, year * 100000000)) > 0", "generate_series"),
            ("length(replace(replace(color, '', 'xxxx'), '', 'xxxx')) > 0", "replace"),
        ] {
            let (position, problem) = err(text);
            assert!(problem.contains(&format!("function `{function}` is not allowed")), "{text}: {problem}");
            assert_eq!(&text[position..position + function.len()].to_ascii_lowercase(), function);
        }
        assert_eq!(passing("abs(year - 2000) < 6"), vec![1, 2]);
    }

    #[test]
    fn integer_overflow_is_an_error_of_the_filter_not_a_wrapped_value() {
        let filter = Filter::compile(&schema(), "9223372036854775807 + year > 0").unwrap();
        let error = filter.evaluate(&batch()).unwrap_err();
        assert!(matches!(error, Error::Expression { .. }), "{error}");
        assert!(error.to_string().contains("Overflow"), "{error}");
    }

    #[test]
    fn errors_quote_only_a_prefix_of_the_filter() {
        let long = format!("color == '{}' and year + 1", "x".repeat(100_000));
        let (_, problem) = err(&long);
        assert!(problem.len() < 400, "{} bytes", problem.len());
    }

    /// The filters at the limits, evaluated and dropped on a third of the
    /// 2 MiB a tokio or timely worker has: the limits keep a 3x margin.
    #[test]
    fn the_largest_filters_evaluate_on_a_third_of_a_thread_stack() {
        let nested_calls = format!("{}year{} > 0{}", "abs(".repeat(45), ")".repeat(45), " and year > 0".repeat(41));
        let nested_not = format!("{}year > 0", "not ".repeat(40));
        for text in [chain(64, "or"), format!("year{} > 0", " + 1".repeat(127)), nested_calls, nested_not] {
            let filter = Filter::compile(&schema(), &text).unwrap_or_else(|e| panic!("{e}"));
            let evaluated = std::thread::Builder::new()
                .stack_size((2 << 20) / 3)
                .spawn(move || {
                    let passed = filter.evaluate(&batch()).map(|rows| rows.len());
                    drop(filter);
                    passed
                })
                .unwrap()
                .join()
                .unwrap();
            assert_eq!(evaluated.unwrap(), 4);
        }
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
                    "(", ")", "\"red\"", "'x'", "3", "-1.5e3", ",", "like", "is", "null", "+", "%", "!", "&&",
                    "meta", "[\"k\"]", "[0]", "[]", "true", "array_contains", "json_contains_any(", "between"]),
                0..12,
            )
        ) {
            // Evaluating too: the json functions meet whatever the text made of the data.
            if let Ok(filter) = Filter::compile(&schema(), &parts.join(" ")) {
                let _ = filter.evaluate(&batch());
            }
        }
    }
}
