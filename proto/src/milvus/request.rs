//! What a Milvus request asks for, read from its parameters: the query
//! vectors of a placeholder group, search and query parameters, index
//! parameters, and the read's consistency and timestamps.

use prost::Message;
use vectorflow_core::{Error, Metric, Result, Timestamp, quote, string_literal};

use std::collections::HashMap;

use super::pb::common::{ConsistencyLevel, KeyValuePair, PlaceholderGroup, PlaceholderType};
use super::pb::schema::{
    TemplateArrayValue, TemplateValue, template_array_value::Data as ArrayData, template_value::Val,
};
use super::{metric_param, param};

/// Milvus's largest `limit + offset` of a search.
pub const MAX_TOPK: usize = 16_384;

fn number(argument: &str, text: &str) -> Result<usize> {
    text.trim()
        .parse::<usize>()
        .map_err(|_| Error::argument(argument, format!("`{}` is not a non-negative integer", quote(text))))
}

/// The query vectors of a search: one float-vector placeholder, one value
/// of little-endian f32s per query.
pub fn query_vectors(placeholder_group: &[u8], nq: i64) -> Result<Vec<Vec<f32>>> {
    let group = PlaceholderGroup::decode(placeholder_group)
        .map_err(|e| Error::argument("placeholder_group", format!("not a serialized PlaceholderGroup: {e}")))?;
    let [placeholder] = group.placeholders.as_slice() else {
        return Err(Error::argument(
            "placeholder_group",
            format!("{} placeholders: a search takes exactly one", group.placeholders.len()),
        ));
    };
    if placeholder.r#type != PlaceholderType::FloatVector as i32 {
        let name = PlaceholderType::try_from(placeholder.r#type).map_or("unknown", |t| t.as_str_name());
        return Err(Error::argument(
            "placeholder_group",
            format!("placeholder type {name} ({}): only float vectors are supported", placeholder.r#type),
        ));
    }
    if nq > 0 && placeholder.values.len() as i64 != nq {
        return Err(Error::argument("nq", format!("nq is {nq} but {} query vectors came", placeholder.values.len())));
    }
    placeholder
        .values
        .iter()
        .enumerate()
        .map(|(i, bytes)| {
            if bytes.is_empty() || bytes.len() % 4 != 0 {
                return Err(Error::argument(
                    "placeholder_group",
                    format!("query {i}: {} bytes are not a vector of f32s", bytes.len()),
                ));
            }
            Ok(bytes.chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect())
        })
        .collect()
}

/// A search's parameters.
#[derive(Debug, Clone, PartialEq)]
pub struct SearchParams {
    pub limit: usize,
    pub offset: usize,
    pub ef: Option<usize>,
    pub metric: Option<Metric>,
    pub anns_field: Option<String>,
    /// Time travel from `params` (`{"travel_timestamp": ts}`): pymilvus
    /// passes any search parameter there, but never sets the request's field.
    pub travel_ts: Option<u64>,
    /// Range search (`params`: `radius`, `range_filter`).
    pub radius: Option<f32>,
    pub range_filter: Option<f32>,
    /// Grouping search: `group_by_field`, `group_size` (default 1),
    /// `strict_group_size` (default false).
    pub group_by: Option<GroupByParams>,
}

/// A grouping search's parameters.
#[derive(Debug, Clone, PartialEq)]
pub struct GroupByParams {
    pub field: String,
    pub size: usize,
    pub strict: bool,
}

/// Reads `search_params` as pymilvus sends them: `topk`, `offset`,
/// `metric_type`, `anns_field`, and `params` (JSON with `ef`; `nprobe` and
/// other index knobs are accepted and have no effect on an HNSW graph).
/// Features not built yet are refused by name rather than ignored.
pub fn search_params(params: &[KeyValuePair]) -> Result<SearchParams> {
    let limit = number("search_params.topk", param(params, "topk").unwrap_or("10"))?;
    let offset = number("search_params.offset", param(params, "offset").unwrap_or("0"))?;
    if limit == 0 || limit.saturating_add(offset) > MAX_TOPK {
        return Err(Error::argument(
            "search_params.topk",
            format!(
                "limit {limit} + offset {offset}: the limit must be positive and limit + offset at most {MAX_TOPK}"
            ),
        ));
    }
    let mut metric = metric_param(params)?;
    let mut ef = None;
    let mut travel_ts = None;
    let (mut radius, mut range_filter) = (None, None);
    if let Some(text) = param(params, "params").filter(|t| !t.trim().is_empty()) {
        let json: serde_json::Value = serde_json::from_str(text)
            .map_err(|e| Error::argument("search_params.params", format!("not JSON: {e}")))?;
        let object =
            json.as_object().ok_or_else(|| Error::argument("search_params.params", "expected a JSON object"))?;
        radius = json_float(object, "radius")?;
        range_filter = json_float(object, "range_filter")?;
        if let Some(value) = object.get("ef") {
            let value = value.as_u64().filter(|v| *v > 0 && *v <= MAX_TOPK as u64).ok_or_else(|| {
                Error::argument("search_params.params.ef", format!("{value} is not in 1..={MAX_TOPK}"))
            })?;
            ef = Some(value as usize);
        }
        if let Some(value) = object.get("travel_timestamp") {
            let ts = value.as_u64().ok_or_else(|| {
                Error::argument("search_params.params.travel_timestamp", format!("{value} is not a timestamp"))
            })?;
            travel_ts = (ts != 0).then_some(ts);
        }
        if let Some(text) = object.get("metric_type").and_then(|m| m.as_str()).filter(|t| !t.is_empty()) {
            metric = Some(text.parse()?);
        }
    }
    if param(params, "group_by_fields").is_some_and(|v| !v.trim().is_empty()) {
        return Err(Error::argument("search_params.group_by_fields", "grouping by several fields is not supported"));
    }
    let group_by = match param(params, "group_by_field").map(str::trim).filter(|f| !f.is_empty()) {
        Some(field) => {
            let size = number("search_params.group_size", param(params, "group_size").unwrap_or("1"))?.max(1);
            let strict = match param(params, "strict_group_size").map(|v| v.trim().to_ascii_lowercase()).as_deref() {
                None | Some("") | Some("false") | Some("0") => false,
                Some("true") | Some("1") => true,
                Some(other) => {
                    return Err(Error::argument(
                        "search_params.strict_group_size",
                        format!("`{other}` is not a boolean"),
                    ));
                }
            };
            Some(GroupByParams { field: field.to_string(), size, strict })
        }
        None => None,
    };
    let anns_field = param(params, "anns_field").map(str::trim).filter(|f| !f.is_empty()).map(str::to_string);
    Ok(SearchParams { limit, offset, ef, metric, anns_field, travel_ts, radius, range_filter, group_by })
}

/// How a hybrid search fuses its searches (`rank_params`).
#[derive(Debug, Clone, PartialEq)]
pub enum RankStrategy {
    Rrf { k: f32 },
    Weighted { weights: Vec<f32>, normalize: bool },
}

/// A hybrid search's `rank_params` as pymilvus sends them: `strategy`
/// (`rrf` or `weighted`), `params` (JSON: `{"k": 60}`, or `{"weights":
/// [...], "norm_score": true}`), `limit`, `offset`, `round_decimal`.
#[derive(Debug, Clone, PartialEq)]
pub struct RankParams {
    pub strategy: RankStrategy,
    pub limit: usize,
    pub offset: usize,
}

pub fn rank_params(params: &[KeyValuePair]) -> Result<RankParams> {
    let limit = number("rank_params.limit", param(params, "limit").unwrap_or("10"))?;
    let offset = number("rank_params.offset", param(params, "offset").unwrap_or("0"))?;
    if limit == 0 || limit.saturating_add(offset) > MAX_TOPK {
        return Err(Error::argument(
            "rank_params.limit",
            format!(
                "limit {limit} + offset {offset}: the limit must be positive and limit + offset at most {MAX_TOPK}"
            ),
        ));
    }
    for refused in ["group_by_field", "rank_group_scorer"] {
        if param(params, refused).is_some_and(|v| !v.trim().is_empty()) {
            return Err(Error::argument(
                format!("rank_params.{refused}"),
                "grouping is not supported in a hybrid search",
            ));
        }
    }
    let json: serde_json::Value = match param(params, "params").filter(|t| !t.trim().is_empty()) {
        Some(text) => {
            serde_json::from_str(text).map_err(|e| Error::argument("rank_params.params", format!("not JSON: {e}")))?
        }
        None => serde_json::Value::Object(Default::default()),
    };
    let strategy = match param(params, "strategy").map(|s| s.trim().to_ascii_lowercase()).as_deref() {
        None | Some("") | Some("rrf") => {
            let k = match json.get("k") {
                Some(value) => value
                    .as_f64()
                    .filter(|k| *k > 0.0 && *k < 16_384.0)
                    .ok_or_else(|| Error::argument("rank_params.params.k", format!("{value} is not in (0, 16384)")))?,
                None => 60.0,
            };
            RankStrategy::Rrf { k: k as f32 }
        }
        Some("weighted") => {
            let weights =
                json.get("weights")
                    .and_then(|w| w.as_array())
                    .ok_or_else(|| Error::argument("rank_params.params.weights", "missing: one weight per search"))?
                    .iter()
                    .map(|w| {
                        w.as_f64().filter(|w| w.is_finite()).map(|w| w as f32).ok_or_else(|| {
                            Error::argument("rank_params.params.weights", format!("{w} is not a number"))
                        })
                    })
                    .collect::<Result<Vec<f32>>>()?;
            let normalize = match json.get("norm_score") {
                None => true,
                Some(value) => value.as_bool().ok_or_else(|| {
                    Error::argument("rank_params.params.norm_score", format!("{value} is not a boolean"))
                })?,
            };
            RankStrategy::Weighted { weights, normalize }
        }
        Some(other) => {
            return Err(Error::argument(
                "rank_params.strategy",
                format!("`{other}` is not supported: use rrf or weighted"),
            ));
        }
    };
    Ok(RankParams { strategy, limit, offset })
}

/// A number in a search's `params` JSON, as `f32`.
fn json_float(object: &serde_json::Map<String, serde_json::Value>, key: &str) -> Result<Option<f32>> {
    object
        .get(key)
        .map(|value| {
            value.as_f64().filter(|v| v.is_finite()).map(|v| v as f32).ok_or_else(|| {
                Error::argument(format!("search_params.params.{key}"), format!("{value} is not a number"))
            })
        })
        .transpose()
}

/// A query's `limit` and `offset` (`query_params`); no limit means all rows.
pub fn query_window(params: &[KeyValuePair]) -> Result<(Option<usize>, usize)> {
    let limit = param(params, "limit").map(|t| number("query_params.limit", t)).transpose()?;
    let offset = number("query_params.offset", param(params, "offset").unwrap_or("0"))?;
    Ok((limit, offset))
}

/// The index a `CreateIndex` describes: its type, metric and parameters.
#[derive(Debug, Clone, PartialEq)]
pub struct IndexParams {
    pub index_type: String,
    pub metric: Option<Metric>,
    /// Every parameter as sent, for `DescribeIndex`.
    pub params: Vec<KeyValuePair>,
}

/// Vector index types accepted: every one is served by our HNSW graph.
const VECTOR_INDEX_TYPES: &[&str] = &[
    "AUTOINDEX",
    "HNSW",
    "FLAT",
    "IVF_FLAT",
    "IVF_SQ8",
    "IVF_PQ",
    "IVF_RABITQ",
    "SCANN",
    "DISKANN",
    "HNSW_SQ",
    "HNSW_PQ",
    "HNSW_PRQ",
];
/// Scalar index types accepted: filters scan Arrow columns, so these
/// change nothing but are kept for `DescribeIndex`.
const SCALAR_INDEX_TYPES: &[&str] = &["AUTOINDEX", "INVERTED", "STL_SORT", "BITMAP", "TRIE"];

/// The index `extra` describes, on a vector field or a scalar one.
pub fn index_params(extra: &[KeyValuePair], on_vectors: bool) -> Result<IndexParams> {
    let index_type = param(extra, "index_type").map(str::trim).filter(|t| !t.is_empty()).unwrap_or("AUTOINDEX");
    let upper = index_type.to_ascii_uppercase();
    let (known, kind) = if on_vectors { (VECTOR_INDEX_TYPES, "vector") } else { (SCALAR_INDEX_TYPES, "scalar") };
    if !known.contains(&upper.as_str()) {
        return Err(Error::argument(
            "index_type",
            format!("`{}` is not a {kind} index type (expected one of {})", quote(index_type), known.join(", ")),
        ));
    }
    let metric = metric_param(extra)?;
    if let Some(text) = param(extra, "params").filter(|t| !t.trim().is_empty()) {
        serde_json::from_str::<serde_json::Value>(text)
            .map_err(|e| Error::argument("extra_params.params", format!("not JSON: {e}")))?;
    }
    Ok(IndexParams { index_type: upper, metric, params: extra.to_vec() })
}

/// A template value as expression text.
fn render(name: &str, value: &TemplateValue) -> Result<String> {
    Ok(match &value.val {
        Some(Val::BoolVal(b)) => b.to_string(),
        Some(Val::Int64Val(i)) => i.to_string(),
        Some(Val::FloatVal(f)) if f.is_finite() => format!("{f:?}"),
        Some(Val::StringVal(text)) => string_literal(text),
        Some(Val::ArrayVal(array)) => render_array(name, array)?,
        Some(Val::FloatVal(_)) => return Err(Error::argument(name, "a template number must be finite")),
        Some(Val::BytesVal(_)) | None => {
            return Err(Error::argument(name, "a template value must be a bool, number, string or array"));
        }
    })
}

/// The longest expression templates may make: the filter's own limit.
pub const MAX_EXPRESSION_BYTES: usize = 1 << 20;

fn render_array(name: &str, array: &TemplateArrayValue) -> Result<String> {
    let items: Vec<String> = match &array.data {
        Some(ArrayData::BoolData(v)) => v.data.iter().map(ToString::to_string).collect(),
        Some(ArrayData::LongData(v)) => v.data.iter().map(ToString::to_string).collect(),
        Some(ArrayData::DoubleData(v)) => v
            .data
            .iter()
            .map(|f| {
                if f.is_finite() {
                    Ok(format!("{f:?}"))
                } else {
                    Err(Error::argument(name, "a template number must be finite"))
                }
            })
            .collect::<Result<_>>()?,
        Some(ArrayData::StringData(v)) => v.data.iter().map(|t| string_literal(t)).collect(),
        Some(ArrayData::ArrayData(v)) => v.data.iter().map(|a| render_array(name, a)).collect::<Result<_>>()?,
        Some(ArrayData::JsonData(_)) | None => {
            return Err(Error::argument(name, "a template array must hold bools, numbers, strings or arrays"));
        }
    };
    Ok(format!("[{}]", items.join(", ")))
}

/// Milvus's expression templates: `{name}` outside string literals is
/// replaced by `values[name]` as a literal. Without values the expression
/// is left as it is.
pub fn fill_templates(expr: &str, values: &HashMap<String, TemplateValue>) -> Result<String> {
    if values.is_empty() {
        return Ok(expr.to_string());
    }
    let mut out = String::with_capacity(expr.len());
    let mut quote_char: Option<char> = None;
    let mut chars = expr.char_indices().peekable();
    while let Some((at, c)) = chars.next() {
        match (quote_char, c) {
            (Some(_), '\\') => {
                out.push(c);
                if let Some((_, escaped)) = chars.next() {
                    out.push(escaped);
                }
            }
            (Some(q), c) if c == q => {
                quote_char = None;
                out.push(c);
            }
            (Some(_), c) => out.push(c),
            (None, '"' | '\'') => {
                quote_char = Some(c);
                out.push(c);
            }
            (None, '{') => {
                let rest = &expr[at + 1..];
                let end =
                    rest.find('}').ok_or_else(|| Error::argument("expr", format!("`{{` at {at} is not closed")))?;
                let name = rest[..end].trim();
                let value = values.get(name).ok_or_else(|| {
                    Error::argument("expr_template_values", format!("no value for template `{{{}}}`", quote(name)))
                })?;
                out.push_str(&render(&format!("expr_template_values.{}", quote(name)), value)?);
                if out.len() > MAX_EXPRESSION_BYTES {
                    return Err(Error::argument(
                        "expr_template_values",
                        format!("the filled expression exceeds {MAX_EXPRESSION_BYTES} bytes"),
                    ));
                }
                for _ in 0..=rest[..end].chars().count() {
                    chars.next();
                }
            }
            (None, c) => out.push(c),
        }
    }
    Ok(out)
}

/// How a read waits and which time it reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReadTime {
    pub level: ConsistencyLevel,
    /// For Session: the write the read must see.
    pub guarantee_ts: Option<Timestamp>,
    /// Time travel (`travel_timestamp`).
    pub as_of: Option<Timestamp>,
}

/// Milvus's consistency rules: with `use_default_consistency` the
/// collection's level applies, else the request's. pymilvus sends its last
/// write's timestamp as `guarantee_timestamp` (1 when it has none, Milvus's
/// "eventually" sentinel); a Bounded or Session read that carries one waits
/// for that write, so a client always reads its own writes.
pub fn read_time(
    use_default: bool,
    requested: i32,
    collection_default: ConsistencyLevel,
    guarantee_ts: u64,
    travel_ts: u64,
) -> Result<ReadTime> {
    let level = if use_default {
        collection_default
    } else {
        ConsistencyLevel::try_from(requested)
            .map_err(|_| Error::argument("consistency_level", format!("unknown level {requested}")))?
    };
    let level = match level {
        ConsistencyLevel::Customized => ConsistencyLevel::Session,
        other => other,
    };
    Ok(ReadTime {
        level,
        // 1 and 2 are pymilvus's markers for Eventually and Bounded, not times.
        guarantee_ts: (guarantee_ts > 2).then_some(guarantee_ts),
        as_of: (travel_ts != 0).then_some(travel_ts),
    })
}

#[cfg(test)]
mod tests {
    use super::super::pb::common::PlaceholderValue;
    use super::*;
    use proptest::prelude::*;

    fn kv(key: &str, value: &str) -> KeyValuePair {
        KeyValuePair { key: key.into(), value: value.into() }
    }

    fn group(vectors: &[Vec<f32>]) -> Vec<u8> {
        PlaceholderGroup {
            placeholders: vec![PlaceholderValue {
                tag: "$0".into(),
                r#type: PlaceholderType::FloatVector as i32,
                values: vectors.iter().map(|v| v.iter().flat_map(|x| x.to_le_bytes()).collect()).collect(),
                element_level: false,
            }],
        }
        .encode_to_vec()
    }

    #[test]
    fn placeholders_become_vectors() {
        let vectors = vec![vec![1.0, 2.0], vec![3.0, -4.5]];
        assert_eq!(query_vectors(&group(&vectors), 2).unwrap(), vectors);
        assert!(query_vectors(&group(&vectors), 3).unwrap_err().to_string().contains("nq"));
        assert!(query_vectors(b"\x0a\x01", 1).is_err());
    }

    #[test]
    fn pymilvus_search_params() {
        let params = vec![
            kv("topk", "5"),
            kv("offset", "2"),
            kv("round_decimal", "-1"),
            kv("ignore_growing", "False"),
            kv("metric_type", "L2"),
            kv("params", r#"{"ef": 64, "nprobe": 16, "metric_type": "L2"}"#),
        ];
        let read = search_params(&params).unwrap();
        let expected = SearchParams {
            limit: 5,
            offset: 2,
            ef: Some(64),
            metric: Some(Metric::L2),
            anns_field: None,
            travel_ts: None,
            radius: None,
            range_filter: None,
            group_by: None,
        };
        assert_eq!(read, expected);
        let travel = search_params(&[kv("params", r#"{"travel_timestamp": 123}"#)]).unwrap();
        assert_eq!(travel.travel_ts, Some(123));
        let range = search_params(&[kv("params", r#"{"radius": 0.5, "range_filter": 0.9}"#)]).unwrap();
        assert_eq!((range.radius, range.range_filter), (Some(0.5), Some(0.9)));
        let bad_range = vec![kv("params", r#"{"radius": "far"}"#)];
        assert!(search_params(&bad_range).unwrap_err().to_string().contains("search_params.params.radius"));
        let grouped =
            search_params(&[kv("group_by_field", "doc"), kv("group_size", "3"), kv("strict_group_size", "True")]);
        let expected = GroupByParams { field: "doc".into(), size: 3, strict: true };
        assert_eq!(grouped.unwrap().group_by, Some(expected));
        let loose = search_params(&[kv("group_by_field", "doc")]).unwrap().group_by.unwrap();
        assert_eq!((loose.size, loose.strict), (1, false));
        let not_bool = search_params(&[kv("group_by_field", "doc"), kv("strict_group_size", "yes")]);
        assert!(not_bool.unwrap_err().to_string().contains("strict_group_size"));
        assert!(search_params(&[kv("topk", "20000")]).is_err());
        assert!(search_params(&[kv("topk", "x")]).unwrap_err().to_string().contains("topk"));
    }

    #[test]
    fn pymilvus_rank_params() {
        let rrf = rank_params(&[kv("strategy", "rrf"), kv("params", r#"{"k": 60}"#), kv("limit", "5")]).unwrap();
        assert_eq!(rrf, RankParams { strategy: RankStrategy::Rrf { k: 60.0 }, limit: 5, offset: 0 });
        let weighted = rank_params(&[
            kv("strategy", "weighted"),
            kv("params", r#"{"weights": [0.3, 0.7], "norm_score": false}"#),
            kv("limit", "3"),
            kv("offset", "1"),
        ])
        .unwrap();
        let strategy = RankStrategy::Weighted { weights: vec![0.3, 0.7], normalize: false };
        assert_eq!(weighted, RankParams { strategy, limit: 3, offset: 1 });
        let unknown = rank_params(&[kv("strategy", "decay")]).unwrap_err().to_string();
        assert!(unknown.contains("rank_params.strategy"), "{unknown}");
        let no_weights = rank_params(&[kv("strategy", "weighted")]).unwrap_err().to_string();
        assert!(no_weights.contains("weights"), "{no_weights}");
        assert!(rank_params(&[kv("params", r#"{"k": 0}"#)]).unwrap_err().to_string().contains("params.k"));
    }

    #[test]
    fn reads_follow_milvus_consistency() {
        let bounded = ConsistencyLevel::Bounded;
        let read = read_time(true, 0, bounded, 1, 0).unwrap();
        assert_eq!((read.level, read.guarantee_ts), (bounded, None));
        let read = read_time(true, 0, bounded, 77 << 18, 0).unwrap();
        assert_eq!(read.guarantee_ts, Some(77 << 18));
        assert_eq!(read_time(false, 0, bounded, 0, 0).unwrap().level, ConsistencyLevel::Strong);
        assert_eq!(read_time(false, 0, bounded, 0, 99).unwrap().as_of, Some(99));
        assert!(read_time(false, 42, bounded, 0, 0).is_err());
    }

    #[test]
    fn index_types_map_to_the_graph() {
        let index = index_params(&[kv("index_type", "hnsw"), kv("metric_type", "IP")], true).unwrap();
        assert_eq!((index.index_type.as_str(), index.metric), ("HNSW", Some(Metric::IP)));
        assert!(index_params(&[kv("index_type", "BITMAP")], true).is_err());
        assert!(index_params(&[kv("index_type", "BITMAP")], false).is_ok());
        assert_eq!(index_params(&[], true).unwrap().index_type, "AUTOINDEX");
    }

    #[test]
    fn templates_become_literals() {
        let values = HashMap::from([
            ("age".to_string(), TemplateValue { val: Some(Val::Int64Val(30)) }),
            ("name".to_string(), TemplateValue { val: Some(Val::StringVal("a\"b".into())) }),
            (
                "ids".to_string(),
                TemplateValue {
                    val: Some(Val::ArrayVal(TemplateArrayValue {
                        data: Some(ArrayData::LongData(super::super::pb::schema::LongArray { data: vec![1, 2] })),
                    })),
                },
            ),
        ]);
        let filled = fill_templates(r#"age > {age} and name == {name} and id in {ids} and t == "{age}""#, &values);
        assert_eq!(filled.unwrap(), r#"age > 30 and name == "a\"b" and id in [1, 2] and t == "{age}""#);
        assert!(fill_templates("x == {missing}", &values).unwrap_err().to_string().contains("missing"));
        assert!(fill_templates("x == {age", &values).is_err());
        let tab = HashMap::from([("s".to_string(), TemplateValue { val: Some(Val::StringVal("a\tb\\".into())) })]);
        assert_eq!(fill_templates("x == {s}", &tab).unwrap(), "x == \"a\tb\\\\\"");
        let huge = HashMap::from([("a".to_string(), TemplateValue { val: Some(Val::StringVal("x".repeat(1 << 16))) })]);
        let error = fill_templates(&"{a} or ".repeat(64), &huge).unwrap_err().to_string();
        assert!(error.contains("exceeds"), "{error}");
        assert_eq!(fill_templates("x == {age}", &HashMap::new()).unwrap(), "x == {age}");
    }

    proptest! {
        #[test]
        fn any_template_text_fills_or_fails_cleanly(expr in "[a-z{}\"' \\\\]{0,24}") {
            let values = HashMap::from([("a".to_string(), TemplateValue { val: Some(Val::BoolVal(true)) })]);
            let _ = fill_templates(&expr, &values);
        }

        #[test]
        fn any_bytes_decode_or_fail_cleanly(bytes in proptest::collection::vec(any::<u8>(), 0..256), nq in -2i64..4) {
            let _ = query_vectors(&bytes, nq);
        }
    }
}
