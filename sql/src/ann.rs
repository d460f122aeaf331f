//! The rule that plans `ORDER BY <distance>(vector, <constant>) LIMIT k`
//! over a collection as an ANN search.
//!
//! It matches `Sort(fetch = k)` over projections, at most one filter and a
//! scan of a collection, where the one sort key is a distance function of
//! the collection's vector field and a constant vector, ordered the way the
//! field's metric ranks (nearest first). The scan becomes an [`AnnTable`]
//! scan that runs the engine's k-NN search with the whole WHERE clause
//! inside it; the sort stays on top and orders the k rows. Anything else
//! (another order, a predicate the filter compiler cannot take, a metric
//! mismatch) keeps the exact plan, which is always correct.
//!
//! Conjuncts that bound the sort key itself (`WHERE l2_distance(v, q) < 0.5`)
//! become the search's range (Milvus's `radius` / `range_filter` in the
//! metric's scores), so the engine's range search answers them; they also
//! stay in a filter above the search, which keeps their SQL meaning exact
//! at the range's ends whatever the engine's rounding.

use std::sync::Arc;

use datafusion::common::tree_node::{Transformed, TreeNode};
use datafusion::common::{Column, Result, ScalarValue};
use datafusion::datasource::{provider_as_source, source_as_provider};
use datafusion::logical_expr::utils::{conjunction, split_conjunction_owned};
use datafusion::logical_expr::{
    BinaryExpr, Cast, Expr, Filter, LogicalPlan, Operator, Projection, Sort, SubqueryAlias, TableScan,
    TableScanBuilder, TryCast,
};
use datafusion::optimizer::{ApplyOrder, OptimizerConfig, OptimizerRule};
use vectorflow_core::{DataType, Metric};

use crate::predicate::filter_text;
use crate::table::{AnnSearch, AnnTable, CollectionTable};
use crate::udf::{VectorFunction, literal_vector};

/// Largest `k` a search takes; larger limits stay exact.
const MAX_K: usize = 16_384;

#[derive(Debug, Default)]
pub struct AnnSearchRule;

impl OptimizerRule for AnnSearchRule {
    fn name(&self) -> &str {
        "vectorflow_ann_search"
    }

    fn apply_order(&self) -> Option<ApplyOrder> {
        Some(ApplyOrder::TopDown)
    }

    fn rewrite(&self, plan: LogicalPlan, _config: &dyn OptimizerConfig) -> Result<Transformed<LogicalPlan>> {
        let LogicalPlan::Sort(sort) = &plan else { return Ok(Transformed::no(plan)) };
        let (Some(k), [key]) = (sort.fetch, sort.expr.as_slice()) else { return Ok(Transformed::no(plan)) };
        if k == 0 || k > MAX_K {
            return Ok(Transformed::no(plan));
        }
        let order = Order { key: key.expr.clone().unalias(), descending: !key.asc, k };
        match with_search(&sort.input, order, Vec::new())? {
            Some(input) => Ok(Transformed::yes(LogicalPlan::Sort(Sort {
                expr: sort.expr.clone(),
                input: Arc::new(input),
                fetch: sort.fetch,
            }))),
            None => Ok(Transformed::no(plan)),
        }
    }
}

/// The sort key, rewritten to the columns of the plan node being visited.
struct Order {
    key: Expr,
    descending: bool,
    k: usize,
}

/// `plan` with its collection scan replaced by an ANN search, or `None`
/// when the shape does not fit.
fn with_search(plan: &LogicalPlan, order: Order, mut predicates: Vec<Expr>) -> Result<Option<LogicalPlan>> {
    match plan {
        LogicalPlan::Projection(projection) => {
            // The key and the predicates collected above, in the input's columns.
            let through = |expr: Expr| {
                expr.transform(|e| {
                    Ok(match e {
                        Expr::Column(c) => match projection.schema.index_of_column(&c) {
                            Ok(i) => Transformed::yes(projection.expr[i].clone().unalias()),
                            Err(_) => Transformed::no(Expr::Column(c)),
                        },
                        other => Transformed::no(other),
                    })
                })
                .map(|t| t.data)
            };
            let key = through(order.key.clone())?;
            let predicates = predicates.into_iter().map(through).collect::<Result<Vec<_>>>()?;
            let Some(input) = with_search(&projection.input, Order { key, ..order }, predicates)? else {
                return Ok(None);
            };
            Ok(Some(LogicalPlan::Projection(Projection::try_new_with_schema(
                projection.expr.clone(),
                Arc::new(input),
                projection.schema.clone(),
            )?)))
        }
        LogicalPlan::SubqueryAlias(alias) => {
            // Same fields, other qualifier: map each column by position.
            let input_schema = alias.input.schema();
            let key = order.key.transform(|e| {
                Ok(match e {
                    Expr::Column(c) => match alias.schema.index_of_column(&c) {
                        Ok(i) => Transformed::yes(Expr::Column(Column::from(input_schema.qualified_field(i)))),
                        Err(_) => Transformed::no(Expr::Column(c)),
                    },
                    other => Transformed::no(other),
                })
            })?;
            if !predicates.is_empty() {
                return Ok(None);
            }
            let Some(input) = with_search(&alias.input, Order { key: key.data, ..order }, predicates)? else {
                return Ok(None);
            };
            Ok(Some(LogicalPlan::SubqueryAlias(SubqueryAlias::try_new(Arc::new(input), alias.alias.clone())?)))
        }
        LogicalPlan::Filter(filter) if predicates.is_empty() => {
            predicates.extend(split_conjunction_owned(filter.predicate.clone()));
            // The search applies the whole predicate, so the filter node goes.
            with_search(&filter.input, order, predicates)
        }
        LogicalPlan::TableScan(scan) => search_scan(scan, &order, predicates),
        _ => Ok(None),
    }
}

fn search_scan(scan: &TableScan, order: &Order, mut predicates: Vec<Expr>) -> Result<Option<LogicalPlan>> {
    if scan.fetch.is_some() {
        return Ok(None);
    }
    let provider = source_as_provider(&scan.source)?;
    let Some(table) = provider.as_ref().downcast_ref::<CollectionTable>() else { return Ok(None) };
    let schema = table.schema_of_collection();
    let Expr::ScalarFunction(call) = &order.key else { return Ok(None) };
    let Some(function) = VectorFunction::from_name(call.func.name()) else { return Ok(None) };
    let (column, constant) = match call.args.as_slice() {
        [Expr::Column(c), Expr::Literal(v, _)] | [Expr::Literal(v, _), Expr::Column(c)] => (c, v),
        _ => return Ok(None),
    };
    let Ok(projected) = scan.projected_schema.index_of_column(column) else { return Ok(None) };
    let field_index = scan.projection.as_ref().map_or(projected, |p| p[projected]);
    let field = &schema.fields[field_index];
    let DataType::FloatVector { dim, metric } = field.data_type else { return Ok(None) };
    if !function.ranks_like(metric, order.descending) {
        return Ok(None);
    }
    let Some(query) = literal_vector(constant) else { return Ok(None) };
    if query.len() != dim || query.iter().any(|x| !x.is_finite()) {
        return Ok(None);
    }
    // Inexact pushdown leaves the scan's filters in the filter node too.
    for f in &scan.filters {
        if !predicates.contains(f) {
            predicates.push(f.clone());
        }
    }
    let (bounds, mut predicates): (Vec<Expr>, Vec<Expr>) =
        predicates.into_iter().partition(|p| key_bound(&order.key, p).is_some());
    let range = match score_range(function, metric, bounds.iter().filter_map(|p| key_bound(&order.key, p))) {
        Some(range) => range,
        // Bounds the range search cannot take: they stay predicates (and
        // the filter compiler refuses them, so the plan stays exact).
        None => {
            predicates.extend(bounds.iter().cloned());
            ScoreRange::default()
        }
    };
    let filter = if predicates.is_empty() {
        None
    } else {
        match filter_text(schema, &predicates) {
            Some(text) => Some(text),
            None => return Ok(None),
        }
    };
    let search = AnnSearch {
        field: field.name.clone(),
        metric,
        query,
        k: order.k,
        filter,
        radius: range.radius,
        range_filter: range.range_filter,
    };
    let ann = AnnTable { table: table.clone(), search };
    let scan = TableScanBuilder::new(scan.table_name.clone(), provider_as_source(Arc::new(ann)))
        .with_projection(scan.projection.clone())
        .build()?;
    // The bounds also stay as a filter over the search: their SQL meaning at
    // the range's ends, whatever the engine's rounding.
    let kept = if range.pushed { bounds } else { Vec::new() };
    match conjunction(kept) {
        Some(bounds) => Ok(Some(LogicalPlan::Filter(Filter::try_new(bounds, Arc::new(LogicalPlan::TableScan(scan)))?))),
        None => Ok(Some(LogicalPlan::TableScan(scan))),
    }
}

/// A comparison of the sort key with a number: `key < 0.5`, `0.1 <= key`.
#[derive(Debug, Clone, Copy)]
struct KeyBound {
    /// The key is below (`true`) or above the value.
    below: bool,
    inclusive: bool,
    value: f64,
}

fn key_bound(key: &Expr, predicate: &Expr) -> Option<KeyBound> {
    let Expr::BinaryExpr(BinaryExpr { left, op, right }) = predicate else { return None };
    // A float cast of the key (type coercion against a Float64 literal) keeps its order.
    let is_key = |side: &Expr| match side {
        Expr::Cast(Cast { expr, .. }) | Expr::TryCast(TryCast { expr, .. }) => expr.as_ref().clone().unalias() == *key,
        side => side.clone().unalias() == *key,
    };
    let (value, flipped) = match (left.as_ref(), right.as_ref()) {
        (side, Expr::Literal(value, _)) if is_key(side) => (value, false),
        (Expr::Literal(value, _), side) if is_key(side) => (value, true),
        _ => return None,
    };
    let value = match value {
        ScalarValue::Float64(Some(v)) => *v,
        ScalarValue::Float32(Some(v)) => f64::from(*v),
        ScalarValue::Int64(Some(v)) => *v as f64,
        ScalarValue::Int32(Some(v)) => f64::from(*v),
        _ => return None,
    };
    let (below, inclusive) = match op {
        Operator::Lt => (true, false),
        Operator::LtEq => (true, true),
        Operator::Gt => (false, false),
        Operator::GtEq => (false, true),
        _ => return None,
    };
    value.is_finite().then_some(KeyBound { below: below != flipped, inclusive, value })
}

/// A search's range in the metric's scores.
#[derive(Debug, Default)]
struct ScoreRange {
    radius: Option<f32>,
    range_filter: Option<f32>,
    /// Whether any bound went into the range.
    pushed: bool,
}

/// The range search the key's bounds ask for: the key as a distance
/// (larger is farther: `l2_distance` is L2's score, `cosine_distance` is
/// `1 − cosine`, an IP search's `inner_product` is the negated distance),
/// its tightest far end exclusive and near end inclusive, in the metric's
/// scores. `None` for a pairing the range cannot express (an inner product
/// over COSINE vectors scales with the literal's norm) or an empty range.
fn score_range(function: VectorFunction, metric: Metric, bounds: impl Iterator<Item = KeyBound>) -> Option<ScoreRange> {
    let (mut far, mut near): (Option<f64>, Option<f64>) = (None, None);
    let key_is_distance = match (function, metric) {
        (VectorFunction::L2Distance, Metric::L2) | (VectorFunction::CosineDistance, Metric::COSINE) => true,
        (VectorFunction::InnerProduct, Metric::IP) => false,
        _ => return None,
    };
    let mut any = false;
    for bound in bounds {
        any = true;
        // In distance terms: (farther-than, value, inclusive).
        let (is_far_end, value) =
            if key_is_distance { (bound.below, bound.value) } else { (!bound.below, -bound.value) };
        // The far end is exclusive, the near end inclusive: move an
        // inclusive far end (or exclusive near end) one step out (in).
        let step = |v: f64| (v as f32).next_up();
        if is_far_end {
            let end = if bound.inclusive { f64::from(step(value)) } else { value };
            far = Some(far.map_or(end, |f| f.min(end)));
        } else {
            let end = if bound.inclusive { value } else { f64::from(step(value)) };
            near = Some(near.map_or(end, |n| n.max(end)));
        }
    }
    if !any {
        return Some(ScoreRange::default());
    }
    if let (Some(far), Some(near)) = (far, near)
        && near >= far
    {
        return None;
    }
    // Distances to scores: L2 as is; COSINE s = 1 − d; IP s = −d.
    let to_score = |d: f64| -> f32 {
        match metric {
            Metric::L2 => d as f32,
            Metric::COSINE => (1.0 - d) as f32,
            Metric::IP => (-d) as f32,
        }
    };
    let unbounded_far = match metric {
        Metric::L2 => f32::MAX,
        _ => -f32::MAX,
    };
    Some(ScoreRange {
        radius: Some(far.map_or(unbounded_far, to_score)),
        range_filter: near.map(to_score),
        pushed: true,
    })
}
