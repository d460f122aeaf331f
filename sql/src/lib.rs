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
pub mod policy;
mod predicate;
mod table;
mod time_travel;
mod udf;

use std::sync::Arc;

use std::pin::Pin;

use arrow::record_batch::RecordBatch;
use datafusion::error::DataFusionError;
use datafusion::execution::SessionStateBuilder;
use datafusion::execution::disk_manager::{DiskManagerBuilder, DiskManagerMode};
use datafusion::execution::runtime_env::RuntimeEnvBuilder;
use datafusion::logical_expr::LogicalPlan;
use datafusion::prelude::{DataFrame, SQLOptions, SessionConfig, SessionContext};
use datafusion::sql::parser::DFParserBuilder;
use futures::{Stream, StreamExt};
use vectorflow_core::{Error, Result};
use vectorflow_dataflow::Engine;

pub use ann::AnnSearchRule;
pub use dialect::VectorflowDialect;
pub use policy::SqlPolicy;
pub use table::{AnnSearch, AnnTable, CollectionSchemaProvider, CollectionTable, StatementDeadline, StatementSnapshot};
pub use time_travel::TimeTravelPlanner;
pub use udf::VectorFunction;

/// A SQL session over an engine's collections.
#[derive(Clone)]
pub struct SqlSession {
    engine: Engine,
    ctx: SessionContext,
    policy: Arc<SqlPolicy>,
}

/// A statement's batches as they are computed.
pub type BatchStream = Pin<Box<dyn Stream<Item = Result<RecordBatch>> + Send>>;

impl std::fmt::Debug for SqlSession {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SqlSession").field("engine", &self.engine).field("policy", &self.policy).finish()
    }
}

impl SqlSession {
    /// A session that runs any statement DataFusion knows ([`SqlPolicy::full`]).
    pub fn new(engine: Engine) -> Result<SqlSession> {
        SqlSession::with_policy(engine, SqlPolicy::full())
    }

    /// A session for statements from the network ([`SqlPolicy::read_only`]):
    /// queries only, each within a memory limit.
    pub fn read_only(engine: Engine) -> Result<SqlSession> {
        SqlSession::with_policy(engine, SqlPolicy::read_only())
    }

    pub fn with_policy(engine: Engine, policy: SqlPolicy) -> Result<SqlSession> {
        let mut config = SessionConfig::new();
        if policy.read_only {
            // A recursive CTE without an end runs (and grows) forever.
            config.options_mut().execution.enable_recursive_ctes = false;
        }
        let ctx = SessionContext::new_with_config(config);
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
        Ok(SqlSession { engine, ctx, policy: Arc::new(policy) })
    }

    pub fn policy(&self) -> &SqlPolicy {
        &self.policy
    }

    /// The DataFusion context, to register more tables (`register_parquet`,
    /// `register_batch`) or functions.
    pub fn context(&self) -> &SessionContext {
        &self.ctx
    }

    /// Plans one statement. Collections are read as of one snapshot taken
    /// now (Strong), unless a table says `FOR SYSTEM_TIME AS OF`.
    ///
    /// Planning and running recurse over the statement: [`SqlSession::collect`]
    /// and [`SqlSession::stream`] do both on threads with large stacks; a
    /// caller running the frame itself gives it its own thread's stack.
    pub async fn sql(&self, text: &str) -> Result<DataFrame> {
        let deadline = self.policy.timeout.map(|timeout| std::time::Instant::now() + timeout);
        self.sql_until(text, deadline).await
    }

    /// [`SqlSession::sql`] with the statement's deadline: its engine reads
    /// stop there.
    async fn sql_until(&self, text: &str, deadline: Option<std::time::Instant>) -> Result<DataFrame> {
        policy::check_statement(text, &self.policy)?;
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
        if let Some(limit) = self.policy.memory_limit {
            // A pool of its own per statement, and no spilling: going over is an error, not a full disk.
            let runtime = RuntimeEnvBuilder::new()
                .with_memory_limit(limit, 1.0)
                .with_disk_manager_builder(DiskManagerBuilder::default().with_mode(DiskManagerMode::Disabled))
                .build_arc()
                .map_err(sql_error)?;
            state = SessionStateBuilder::new_from_existing(state).with_runtime_env(runtime).build();
        }
        state.config_mut().set_extension(Arc::new(StatementSnapshot(self.engine.now())));
        if let Some(deadline) = deadline {
            state.config_mut().set_extension(Arc::new(StatementDeadline(deadline)));
        }
        let plan = state.statement_to_plan(statement).await.map_err(sql_error)?;
        if self.policy.read_only {
            SQLOptions::new()
                .with_allow_ddl(false)
                .with_allow_dml(false)
                .with_allow_statements(false)
                .verify_plan(&plan)
                .map_err(|e| Error::Sql(format!("{} (this server's SQL is read-only: queries only)", sql_error(e))))?;
        }
        if matches!(plan, LogicalPlan::Ddl(_) | LogicalPlan::Statement(_)) {
            // CREATE EXTERNAL TABLE, CREATE VIEW, SET ...: the context carries them out.
            return self.ctx.execute_logical_plan(plan).await.map_err(sql_error);
        }
        Ok(DataFrame::new(state, plan))
    }

    /// Runs one statement and returns all its batches. The statement is
    /// planned and run on [`policy::statement_runtime`].
    pub async fn collect(&self, text: &str) -> Result<Vec<RecordBatch>> {
        let session = self.clone();
        let text = text.to_string();
        let limit = self.policy.timeout;
        let running = policy::statement_runtime()?.spawn(async move {
            let work = async { session.sql(&text).await?.collect().await.map_err(sql_error) };
            match limit {
                Some(limit) => tokio::time::timeout(limit, work).await.map_err(|_| Error::Timeout(limit))?,
                None => work.await,
            }
        });
        running.await.map_err(|e| Error::Internal(format!("the statement stopped: {e}")))?
    }

    /// Runs one statement on [`policy::statement_runtime`] and streams its
    /// batches; errors in planning come back here, errors while running in
    /// the stream. Dropping the stream stops the statement.
    pub async fn stream(&self, text: &str) -> Result<BatchStream> {
        self.stream_within(text, None).await
    }

    /// [`SqlSession::stream`] within `deadline` (the caller's) as well as
    /// the policy's timeout: past the earlier one the statement stops and
    /// the caller gets [`Error::Timeout`].
    pub async fn stream_within(&self, text: &str, deadline: Option<std::time::Duration>) -> Result<BatchStream> {
        let session = self.clone();
        let text = text.to_string();
        let limit = match (self.policy.timeout, deadline) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        let (planned_tx, planned_rx) = tokio::sync::oneshot::channel();
        let (batch_tx, batch_rx) = tokio::sync::mpsc::channel::<Result<RecordBatch>>(2);
        policy::statement_runtime()?.spawn(async move {
            let mut planned_tx = Some(planned_tx);
            let work = async {
                let deadline = limit.map(|limit| std::time::Instant::now() + limit);
                let planned = match session.sql_until(&text, deadline).await {
                    Ok(frame) => frame.execute_stream().await.map_err(sql_error),
                    Err(e) => Err(e),
                };
                let mut batches = match planned {
                    Ok(batches) => {
                        if let Some(tx) = planned_tx.take() {
                            let _ = tx.send(Ok(()));
                        }
                        batches
                    }
                    Err(e) => {
                        if let Some(tx) = planned_tx.take() {
                            let _ = tx.send(Err(e));
                        }
                        return;
                    }
                };
                while let Some(batch) = batches.next().await {
                    if batch_tx.send(batch.map_err(sql_error)).await.is_err() {
                        break; // The reader went away.
                    }
                }
            };
            let Some(limit) = limit else { return work.await };
            if tokio::time::timeout(limit, work).await.is_err() {
                // The statement's futures are dropped: it stops here.
                match planned_tx.take() {
                    Some(tx) => _ = tx.send(Err(Error::Timeout(limit))),
                    None => _ = batch_tx.send(Err(Error::Timeout(limit))).await,
                }
            }
        });
        planned_rx.await.map_err(|_| Error::Internal("the statement stopped while planning".into()))??;
        let batches = futures::stream::unfold(batch_rx, |mut rx| async move { rx.recv().await.map(|item| (item, rx)) });
        Ok(Box::pin(batches))
    }
}

/// A DataFusion error as the engine's error, by its true class: the
/// engine's own errors (a collection not found, a time outside retention)
/// as they were; a statement over its memory limit is
/// [`Error::ResourceExhausted`]; DataFusion's internal errors, panicked
/// tasks and failed reads of files are [`Error::Internal`]; the rest (the
/// statement does not parse, plan, or evaluate on its data) [`Error::Sql`].
pub fn sql_error(error: DataFusionError) -> Error {
    classify(&error)
}

/// [`sql_error`] on a borrowed error: DataFusion shares one error between
/// the partitions that saw it, so the engine's error inside is reached by
/// reference (and duplicated), never by unwrapping the share.
fn classify(error: &DataFusionError) -> Error {
    match error {
        DataFusionError::ResourcesExhausted(problem) => {
            Error::exhausted("memory_limit", format!("the statement needs more memory than its limit: {problem}"))
        }
        DataFusionError::External(inner) => {
            if let Some(engine_error) = inner.downcast_ref::<Error>() {
                engine_error.duplicate()
            } else if let Some(nested) = inner.downcast_ref::<DataFusionError>() {
                classify(nested)
            } else if inner.downcast_ref::<tokio::task::JoinError>().is_some() {
                Error::Internal(format!("a statement task stopped: {inner}"))
            } else {
                Error::Sql(inner.to_string())
            }
        }
        DataFusionError::Context(_, inner) | DataFusionError::Diagnostic(_, inner) => classify(inner),
        DataFusionError::Shared(shared) => classify(shared),
        DataFusionError::Internal(_)
        | DataFusionError::ExecutionJoin(_)
        | DataFusionError::IoError(_)
        | DataFusionError::ObjectStore(_)
        | DataFusionError::ParquetError(_)
        | DataFusionError::Ffi(_) => Error::Internal(error.to_string()),
        other => Error::Sql(other.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vectorflow_core::{CollectionSchema, DataType, FieldSchema, Metric};
    use vectorflow_dataflow::EngineConfig;

    fn engine(dir: &std::path::Path) -> Engine {
        let engine = Engine::open(EngineConfig::new(dir)).unwrap();
        engine
            .create_collection(CollectionSchema::new(
                "docs",
                vec![
                    FieldSchema::int64_primary("id", false),
                    FieldSchema::vector("v", 2, Metric::L2),
                    FieldSchema::new("n", DataType::Int64),
                ],
            ))
            .unwrap();
        engine
    }

    fn runtime() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap()
    }

    #[test]
    fn errors_keep_their_class() {
        assert!(matches!(sql_error(DataFusionError::Internal("broken".into())), Error::Internal(_)));
        assert!(matches!(sql_error(DataFusionError::IoError(std::io::Error::other("disk"))), Error::Internal(_)));
        assert!(matches!(sql_error(DataFusionError::Plan("no such column".into())), Error::Sql(_)));
        let wrapped =
            DataFusionError::Context("while planning".into(), Box::new(DataFusionError::Internal("x".into())));
        assert!(matches!(sql_error(wrapped), Error::Internal(_)));
        // A shared error (repartitioning hands one error to every output
        // partition) keeps the engine error inside it, while others hold it too.
        let stopped = Error::CollectionFailed { collection: "docs".into(), cause: "bad record".into() };
        let inner = Arc::new(DataFusionError::External(Box::new(stopped)));
        match sql_error(DataFusionError::Shared(inner.clone())) {
            Error::CollectionFailed { collection, .. } => assert_eq!(collection, "docs"),
            other => panic!("expected CollectionFailed, got {other:?}"),
        }
        assert_eq!(Arc::strong_count(&inner), 1);
        let dir = tempfile::tempdir().unwrap();
        let session = SqlSession::read_only(engine(dir.path())).unwrap();
        match runtime().block_on(session.collect("SELECT nope FROM docs")) {
            Err(Error::Sql(problem)) => assert!(problem.contains("nope"), "{problem}"),
            other => panic!("expected Error::Sql, got {other:?}"),
        }
    }

    #[test]
    fn a_statement_past_its_timeout_stops_with_a_timeout() {
        let dir = tempfile::tempdir().unwrap();
        let engine = engine(dir.path());
        let rows: Vec<_> = (0..200).map(row).collect();
        engine.insert_rows("docs", &rows).unwrap();
        let limit = std::time::Duration::from_millis(200);
        let policy = SqlPolicy { timeout: Some(limit), ..SqlPolicy::read_only() };
        let session = SqlSession::with_policy(engine, policy).unwrap();
        // 200^4 = 1.6 billion joined rows: far more than 200 ms of work.
        let text = "SELECT count(*) FROM docs a, docs b, docs c, docs d WHERE a.n + b.n + c.n + d.n >= 0";
        match runtime().block_on(session.collect(text)) {
            Err(Error::Timeout(after)) => assert_eq!(after, limit),
            other => panic!("expected a timeout, got {other:?}"),
        }
        let streamed = runtime().block_on(async {
            let mut batches = session.stream_within(text, Some(std::time::Duration::from_millis(100))).await?;
            while let Some(batch) = batches.next().await {
                batch?;
            }
            Ok::<_, Error>(())
        });
        assert!(matches!(streamed, Err(Error::Timeout(_))), "{streamed:?}");
        // A quick statement is unaffected.
        assert!(runtime().block_on(session.collect("SELECT count(*) FROM docs")).is_ok());
    }

    fn row(id: i64) -> vectorflow_core::Row {
        vectorflow_dataflow::row([("id", id.into()), ("v", vec![0.5f32, 0.5].into()), ("n", id.into())])
    }

    #[test]
    fn long_statements_are_refused_naming_the_limit() {
        let dir = tempfile::tempdir().unwrap();
        let session = SqlSession::new(engine(dir.path())).unwrap();
        let or_chain = (0..1000).map(|i| format!("n = {i}")).collect::<Vec<_>>().join(" OR ");
        for text in [format!("SELECT 1{}", " + 1".repeat(1000)), format!("SELECT id FROM docs WHERE {or_chain}")] {
            match runtime().block_on(session.collect(&text)) {
                Err(Error::Sql(problem)) => {
                    assert!(problem.contains("max_statement_weight"), "{problem}");
                    assert!(problem.len() < 400, "{problem}");
                }
                other => panic!("expected a refusal, got {other:?}"),
            }
        }
        // A vector literal of negative numbers is values, not operators.
        let vector = format!("[{}]", vec!["-0.5"; 1000].join(", "));
        let batches = runtime().block_on(session.collect(&format!("SELECT cardinality({vector}) AS n"))).unwrap();
        assert_eq!(batches[0].num_rows(), 1);
        assert!(runtime().block_on(session.collect(&format!("SELECT 1{}", " + 1".repeat(100)))).is_ok());
    }

    #[test]
    fn read_only_sessions_refuse_writes_files_and_allocating_functions() {
        let dir = tempfile::tempdir().unwrap();
        let session = SqlSession::read_only(engine(dir.path())).unwrap();
        let target = dir.path().join("written.json");
        for text in [
            format!("COPY (SELECT 'x' AS junk) TO '{}' STORED AS JSON", target.display()),
            "CREATE EXTERNAL TABLE etc (line VARCHAR) STORED AS CSV LOCATION '/etc/hostname'".to_string(),
            "INSERT INTO docs VALUES (1, [0.0, 0.0], 1)".to_string(),
            "DROP TABLE docs".to_string(),
            "CREATE VIEW w AS SELECT 1".to_string(),
            "SET datafusion.execution.batch_size = 1".to_string(),
            "SELECT length(repeat('x', 1000000000))".to_string(),
            "SELECT * FROM generate_series(1, 1000000000000)".to_string(),
            "SELECT lpad('x', 2147483647)".to_string(),
        ] {
            match runtime().block_on(session.collect(&text)) {
                Err(Error::Sql(_)) => {}
                other => panic!("{text}: expected Error::Sql, got {other:?}"),
            }
        }
        assert!(!target.exists(), "COPY wrote {}", target.display());
        let rows = runtime().block_on(session.collect("SELECT count(*) FROM docs")).unwrap();
        assert_eq!(rows[0].num_rows(), 1);
        // The full session (the local CLI) still writes.
        let full = SqlSession::new(session.engine.clone()).unwrap();
        let copy = format!("COPY (SELECT 'x' AS junk) TO '{}' STORED AS JSON", target.display());
        runtime().block_on(full.collect(&copy)).unwrap();
        assert!(target.exists());
    }

    #[test]
    fn a_statement_over_its_memory_limit_is_resource_exhausted() {
        let dir = tempfile::tempdir().unwrap();
        let policy = SqlPolicy { memory_limit: Some(1 << 20), ..SqlPolicy::read_only() };
        let session = SqlSession::with_policy(engine(dir.path()), policy).unwrap();
        let sort = "SELECT v FROM unnest(range(0, 2000000)) AS t(v) ORDER BY v DESC";
        // `range` is refused in read-only SQL; the table function is planned under a full policy with the same pool.
        assert!(matches!(runtime().block_on(session.collect(sort)), Err(Error::Sql(_))));
        let policy = SqlPolicy { memory_limit: Some(1 << 20), ..SqlPolicy::full() };
        let session = SqlSession::with_policy(session.engine.clone(), policy).unwrap();
        match runtime().block_on(session.collect("SELECT value FROM generate_series(1, 2000000) ORDER BY value DESC")) {
            Err(Error::ResourceExhausted { limit, problem }) => assert_eq!(limit, "memory_limit", "{problem}"),
            other => panic!("expected ResourceExhausted, got {:?}", other.map(|b| b.len())),
        }
    }

    #[test]
    fn a_scan_holds_no_more_rows_than_its_memory_limit_has_room_for() {
        let dir = tempfile::tempdir().unwrap();
        let engine = engine(dir.path());
        let rows: Vec<vectorflow_core::Row> = (0..5000i64)
            .map(|i| vectorflow_dataflow::row([("id", i.into()), ("v", vec![i as f32, 0.0].into()), ("n", i.into())]))
            .collect();
        engine.insert_rows("docs", &rows).unwrap();
        let policy = SqlPolicy { memory_limit: Some(1 << 20), ..SqlPolicy::read_only() };
        let session = SqlSession::with_policy(engine.clone(), policy).unwrap();
        match runtime().block_on(session.collect("SELECT id, v, n FROM docs")) {
            Err(Error::ResourceExhausted { limit, problem }) => {
                assert_eq!(limit, "memory_limit", "{problem}");
                assert!(problem.contains("`docs`"), "{problem}");
            }
            other => panic!("expected ResourceExhausted, got {:?}", other.map(|b| b.len())),
        }
        // A filtered scan that fits answers; the local session has no limit.
        let few = runtime().block_on(session.collect("SELECT id FROM docs WHERE n < 10")).unwrap();
        assert_eq!(few.iter().map(|b| b.num_rows()).sum::<usize>(), 10);
        let full = SqlSession::new(engine).unwrap();
        let all = runtime().block_on(full.collect("SELECT id, v, n FROM docs")).unwrap();
        assert_eq!(all.iter().map(|b| b.num_rows()).sum::<usize>(), 5000);
    }
}
