//! SQL over Vectorflow collections, on DataFusion.
//!
//! Every collection is a table (scalar columns, vectors as
//! `FixedSizeList<Float32>`), read through the engine at the statement's
//! snapshot or `FOR SYSTEM_TIME AS OF` a time. `l2_distance`,
//! `cosine_distance` and `inner_product` compare vectors, and
//! `ORDER BY <distance>(vec, [..]) LIMIT k` runs as an ANN search with the
//! WHERE clause inside it (visible in `EXPLAIN` as `AnnSearchExec`).
//! Other tables (Parquet files, memory tables) register in the same session
//! and join as in any DataFusion SQL.
//!
//! ```no_run
//! # async fn demo(engine: vectorflow_dataflow::Engine) -> vectorflow_core::Result<()> {
//! let session = vectorflow_sql::SqlSession::new(engine)?;
//! let batches = session
//!     .collect("SELECT id, cosine_distance(embedding, [0.1, 0.2, 0.3]) AS d FROM docs WHERE year > 2000 ORDER BY d LIMIT 10")
//!     .await?;
//! # Ok(()) }
//! ```

mod ann;
mod dialect;
mod predicate;
mod table;
mod time_travel;
mod udf;

use std::sync::Arc;

use arrow::record_batch::RecordBatch;
use datafusion::error::DataFusionError;
use datafusion::logical_expr::LogicalPlan;
use datafusion::prelude::{DataFrame, SessionContext};
use datafusion::sql::parser::DFParserBuilder;
use vectorflow_core::{Error, Result};
use vectorflow_dataflow::Engine;

pub use ann::AnnSearchRule;
pub use dialect::VectorflowDialect;
pub use table::{AnnSearch, AnnTable, CollectionSchemaProvider, CollectionTable, StatementSnapshot};
pub use time_travel::TimeTravelPlanner;
pub use udf::VectorFunction;

/// A SQL session over an engine's collections.
#[derive(Clone)]
pub struct SqlSession {
    engine: Engine,
    ctx: SessionContext,
}

impl std::fmt::Debug for SqlSession {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SqlSession").field("engine", &self.engine).finish()
    }
}

impl SqlSession {
    pub fn new(engine: Engine) -> Result<SqlSession> {
        let ctx = SessionContext::new();
        for function in VectorFunction::ALL {
            ctx.register_udf(function.udf());
        }
        vectorflow_operators::json::register_json_udfs(&ctx);
        ctx.add_optimizer_rule(Arc::new(AnnSearchRule));
        ctx.register_relation_planner(Arc::new(TimeTravelPlanner)).map_err(sql_error)?;
        let catalog =
            ctx.catalog("datafusion").ok_or_else(|| Error::Sql("DataFusion's default catalog is missing".into()))?;
        catalog
            .register_schema("public", Arc::new(CollectionSchemaProvider::new(engine.clone())))
            .map_err(sql_error)?;
        Ok(SqlSession { engine, ctx })
    }

    /// The DataFusion context, to register more tables (`register_parquet`,
    /// `register_batch`) or functions.
    pub fn context(&self) -> &SessionContext {
        &self.ctx
    }

    /// Plans one statement. Collections are read as of one snapshot taken
    /// now (Strong), unless a table says `FOR SYSTEM_TIME AS OF`.
    pub async fn sql(&self, text: &str) -> Result<DataFrame> {
        let dialect = VectorflowDialect::default();
        let mut statements = DFParserBuilder::new(text)
            .with_dialect(&dialect)
            .build()
            .and_then(|mut parser| parser.parse_statements())
            .map_err(sql_error)?;
        let statement = match (statements.pop_front(), statements.is_empty()) {
            (Some(statement), true) => statement,
            (None, _) => return Err(Error::Sql("no SQL statement".into())),
            (Some(_), false) => return Err(Error::Sql("one statement at a time, please".into())),
        };
        let mut state = self.ctx.state();
        state.config_mut().set_extension(Arc::new(StatementSnapshot(self.engine.now())));
        let plan = state.statement_to_plan(statement).await.map_err(sql_error)?;
        if matches!(plan, LogicalPlan::Ddl(_) | LogicalPlan::Statement(_)) {
            // CREATE EXTERNAL TABLE, CREATE VIEW, SET ...: the context carries them out.
            return self.ctx.execute_logical_plan(plan).await.map_err(sql_error);
        }
        Ok(DataFrame::new(state, plan))
    }

    /// Runs one statement and returns all its batches.
    pub async fn collect(&self, text: &str) -> Result<Vec<RecordBatch>> {
        self.sql(text).await?.collect().await.map_err(sql_error)
    }
}

/// A DataFusion error as the engine's error, keeping the engine's own errors
/// (a collection not found, a time outside retention) as they were.
pub fn sql_error(error: DataFusionError) -> Error {
    match error {
        DataFusionError::External(inner) => match inner.downcast::<Error>() {
            Ok(engine_error) => *engine_error,
            Err(other) => Error::Sql(other.to_string()),
        },
        DataFusionError::Context(_, inner) => sql_error(*inner),
        DataFusionError::Shared(shared) => match Arc::try_unwrap(shared) {
            Ok(inner) => sql_error(inner),
            Err(shared) => Error::Sql(shared.to_string()),
        },
        other => Error::Sql(other.to_string()),
    }
}
