//! SQL predicates as filter text. Filters travel to the workers as text
//! (DESIGN.md: requests are plain data), so a predicate DataFusion planned
//! is written back as SQL, unqualified, and handed to the same filter
//! compiler every other read uses.

use datafusion::common::tree_node::{Transformed, TreeNode};
use datafusion::logical_expr::Expr;
use datafusion::sql::unparser::Unparser;
use datafusion::sql::unparser::dialect::CustomDialectBuilder;
use vectorflow_core::CollectionSchema;
use vectorflow_operators::Filter;

/// The conjunction of `predicates` as filter text the collection's filter
/// compiler accepts, or `None` when one of them cannot be expressed (the
/// caller then leaves it to DataFusion).
pub fn filter_text(schema: &CollectionSchema, predicates: &[Expr]) -> Option<String> {
    if predicates.is_empty() {
        return None;
    }
    // Field names are plain identifiers (the schema checks them), so nothing needs quoting.
    let dialect = CustomDialectBuilder::new().build();
    let unparser = Unparser::new(&dialect);
    let mut parts = Vec::with_capacity(predicates.len());
    for predicate in predicates {
        let unqualified = predicate
            .clone()
            .transform(|e| {
                Ok(match e {
                    Expr::Column(c) if c.relation.is_some() => {
                        Transformed::yes(Expr::Column(datafusion::common::Column::new_unqualified(c.name)))
                    }
                    other => Transformed::no(other),
                })
            })
            .ok()?
            .data;
        let text = unparser.expr_to_sql(&unqualified).ok()?.to_string();
        Filter::compile(schema, &text).ok()?;
        parts.push(format!("({text})"));
    }
    Some(parts.join(" AND "))
}
