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

use std::sync::Arc;

use datafusion::common::tree_node::{Transformed, TreeNode};
use datafusion::common::{Column, Result};
use datafusion::datasource::{provider_as_source, source_as_provider};
use datafusion::logical_expr::utils::split_conjunction_owned;
use datafusion::logical_expr::{Expr, LogicalPlan, Projection, Sort, SubqueryAlias, TableScan, TableScanBuilder};
use datafusion::optimizer::{ApplyOrder, OptimizerConfig, OptimizerRule};
use vectorflow_core::DataType;

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
            let key = order.key.transform(|e| {
                Ok(match e {
                    Expr::Column(c) => match projection.schema.index_of_column(&c) {
                        Ok(i) => Transformed::yes(projection.expr[i].clone().unalias()),
                        Err(_) => Transformed::no(Expr::Column(c)),
                    },
                    other => Transformed::no(other),
                })
            })?;
            let Some(input) = with_search(&projection.input, Order { key: key.data, ..order }, predicates)? else {
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
    let filter = if predicates.is_empty() {
        None
    } else {
        match filter_text(schema, &predicates) {
            Some(text) => Some(text),
            None => return Ok(None),
        }
    };
    let search = AnnSearch { field: field.name.clone(), metric, query, k: order.k, filter };
    let ann = AnnTable { table: table.clone(), search };
    let scan = TableScanBuilder::new(scan.table_name.clone(), provider_as_source(Arc::new(ann)))
        .with_projection(scan.projection.clone())
        .build()?;
    Ok(Some(LogicalPlan::TableScan(scan)))
}
