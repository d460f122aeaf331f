//! `FROM docs FOR SYSTEM_TIME AS OF <time>`: the collection as it was at
//! `<time>`, a datetime string (`'2026-11-24 10:00:00'`, UTC unless it names
//! a zone), a `TIMESTAMP`, or a hybrid timestamp number as writes return.

use std::sync::Arc;

use arrow::compute::kernels::cast_utils::string_to_timestamp_nanos;
use arrow::datatypes::Schema;
use arrow::record_batch::{RecordBatch, RecordBatchOptions};
use datafusion::common::{DFSchema, Result, ScalarValue, plan_err};
use datafusion::datasource::{provider_as_source, source_as_provider};
use datafusion::execution::context::ExecutionProps;
use datafusion::logical_expr::physical_planning_context::PhysicalPlanningContext;
use datafusion::logical_expr::planner::{PlannedRelation, RelationPlanner, RelationPlannerContext, RelationPlanning};
use datafusion::logical_expr::{ColumnarValue, Expr, LogicalPlanBuilder};
use datafusion::physical_expr::create_physical_expr;
use datafusion::sql::sqlparser::ast::{TableFactor, TableVersion};
use vectorflow_core::Timestamp;
use vectorflow_core::time::compose;

use crate::table::CollectionTable;

#[derive(Debug, Default)]
pub struct TimeTravelPlanner;

impl RelationPlanner for TimeTravelPlanner {
    fn plan_relation(
        &self,
        relation: TableFactor,
        context: &mut dyn RelationPlannerContext,
    ) -> Result<RelationPlanning> {
        let TableFactor::Table { name, alias, args: None, version: Some(version), .. } = &relation else {
            return Ok(RelationPlanning::Original(Box::new(relation)));
        };
        let TableVersion::ForSystemTimeAsOf(at) = version else {
            return plan_err!("time travel is written `FOR SYSTEM_TIME AS OF <time>`; `{version}` is not supported");
        };
        let table_ref = context.object_name_to_table_reference(name.clone())?;
        let source = context.context_provider().get_table_source(table_ref.clone())?;
        let provider = source_as_provider(&source)?;
        let Some(table) = provider.as_ref().downcast_ref::<CollectionTable>() else {
            return plan_err!("FOR SYSTEM_TIME AS OF reads collections; `{table_ref}` is not one");
        };
        let at = context.sql_to_expr(at.clone(), &DFSchema::empty())?;
        let ts = timestamp_of(&at)?;
        let plan = LogicalPlanBuilder::scan(table_ref, provider_as_source(Arc::new(table.at(ts))), None)?.build()?;
        Ok(RelationPlanning::Planned(Box::new(PlannedRelation::new(plan, alias.clone()))))
    }
}

/// Evaluates the constant `AS OF` expression to a hybrid timestamp.
fn timestamp_of(expr: &Expr) -> Result<Timestamp> {
    let physical =
        create_physical_expr(expr, &DFSchema::empty(), &ExecutionProps::new(), &PhysicalPlanningContext::default())?;
    let one_row = RecordBatch::try_new_with_options(
        Arc::new(Schema::empty()),
        Vec::new(),
        &RecordBatchOptions::new().with_row_count(Some(1)),
    )?;
    let value = match physical.evaluate(&one_row)? {
        ColumnarValue::Scalar(value) => value,
        ColumnarValue::Array(array) => ScalarValue::try_from_array(&array, 0)?,
    };
    let from_ms = |ms: i64| -> Result<Timestamp> {
        match u64::try_from(ms) {
            Ok(ms) => Ok(compose(ms, 0)),
            Err(_) => plan_err!("FOR SYSTEM_TIME AS OF {value}: before 1970"),
        }
    };
    match &value {
        ScalarValue::Utf8(Some(text)) | ScalarValue::LargeUtf8(Some(text)) | ScalarValue::Utf8View(Some(text)) => {
            if let Ok(ts) = text.trim().parse::<u64>() {
                return Ok(ts);
            }
            match string_to_timestamp_nanos(text.trim()) {
                Ok(nanos) => from_ms(nanos.div_euclid(1_000_000)),
                Err(e) => plan_err!("FOR SYSTEM_TIME AS OF '{text}': not a datetime ({e})"),
            }
        }
        ScalarValue::TimestampSecond(Some(v), _) => from_ms(v.saturating_mul(1000)),
        ScalarValue::TimestampMillisecond(Some(v), _) => from_ms(*v),
        ScalarValue::TimestampMicrosecond(Some(v), _) => from_ms(v.div_euclid(1000)),
        ScalarValue::TimestampNanosecond(Some(v), _) => from_ms(v.div_euclid(1_000_000)),
        ScalarValue::UInt64(Some(v)) => Ok(*v),
        other if other.data_type().is_integer() && !other.is_null() => {
            match other.cast_to(&arrow::datatypes::DataType::UInt64) {
                Ok(ScalarValue::UInt64(Some(v))) => Ok(v),
                _ => plan_err!("FOR SYSTEM_TIME AS OF {other}: a hybrid timestamp is not negative"),
            }
        }
        other => plan_err!(
            "FOR SYSTEM_TIME AS OF takes a datetime ('2026-11-24 10:00:00'), a TIMESTAMP or a hybrid timestamp; got {other} ({})",
            other.data_type()
        ),
    }
}
