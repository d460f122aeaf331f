//! Collections as DataFusion tables: a table provider that reads a
//! collection through the engine (so every scan is a dataflow read at one
//! timestamp), the schema provider that lists the engine's collections next
//! to tables the user registers, and the scan operator.

use std::collections::BTreeMap;
use std::fmt;
use std::sync::Arc;
use std::time::{Duration, Instant};

use arrow::array::ArrayRef;
use arrow::datatypes::SchemaRef;
use arrow::record_batch::{RecordBatch, RecordBatchOptions};
use async_trait::async_trait;
use datafusion::catalog::{MemorySchemaProvider, SchemaProvider, Session, TableProvider};
use datafusion::common::tree_node::TreeNodeRecursion;
use datafusion::common::{DataFusionError, Result as DfResult, plan_err};
use datafusion::datasource::TableType;
use datafusion::execution::memory_pool::MemoryLimit;
use datafusion::execution::{SendableRecordBatchStream, TaskContext};
use datafusion::logical_expr::{Expr, TableProviderFilterPushDown};
use datafusion::physical_expr::{EquivalenceProperties, PhysicalExpr};
use datafusion::physical_plan::execution_plan::{Boundedness, EmissionType};
use datafusion::physical_plan::stream::RecordBatchStreamAdapter;
use datafusion::physical_plan::{DisplayAs, DisplayFormatType, ExecutionPlan, Partitioning, PlanProperties};
use vectorflow_core::batch::values_to_array;
use vectorflow_core::{CollectionSchema, Error, FieldSchema, Metric, Timestamp, Value};
use vectorflow_dataflow::{Engine, QueryOptions, SearchOptions};

use crate::predicate::filter_text;

/// The read timestamp of the statement being planned: every scan of a
/// statement reads at the same time, so joins and subqueries see one snapshot.
#[derive(Debug, Clone, Copy)]
pub struct StatementSnapshot(pub Timestamp);

/// When the statement being planned must be done: its engine reads stop
/// there too (in the workers), not only the statement's own futures.
#[derive(Debug, Clone, Copy)]
pub struct StatementDeadline(pub Instant);

/// A collection as a table: scalar columns and vectors as `FixedSizeList<Float32>`.
#[derive(Debug, Clone)]
pub struct CollectionTable {
    engine: Engine,
    schema: Arc<CollectionSchema>,
    arrow_schema: SchemaRef,
    /// Time travel (`FOR SYSTEM_TIME AS OF`); the statement's snapshot when `None`.
    as_of: Option<Timestamp>,
}

impl CollectionTable {
    pub fn new(engine: Engine, schema: CollectionSchema) -> CollectionTable {
        let arrow_schema = schema.arrow_schema();
        CollectionTable { engine, schema: Arc::new(schema), arrow_schema, as_of: None }
    }

    /// The same table as of `ts`.
    pub fn at(&self, ts: Timestamp) -> CollectionTable {
        CollectionTable { as_of: Some(ts), ..self.clone() }
    }

    pub fn schema_of_collection(&self) -> &CollectionSchema {
        &self.schema
    }

    pub fn as_of(&self) -> Option<Timestamp> {
        self.as_of
    }

    /// The timestamp a scan planned in `state` reads at.
    fn read_ts(&self, state: &dyn Session) -> Timestamp {
        self.as_of
            .or_else(|| state.config().get_extension::<StatementSnapshot>().map(|s| s.0))
            .unwrap_or_else(|| self.engine.now())
    }

    /// The read a scan with this projection does, given what it looks for.
    fn scan_plan(&self, state: &dyn Session, projection: Option<&Vec<usize>>, lookup: Lookup) -> Arc<ScanExec> {
        let fields: Vec<usize> = projection.cloned().unwrap_or_else(|| (0..self.schema.fields.len()).collect());
        let projected = self.arrow_schema.project(&fields).map(Arc::new).unwrap_or_else(|_| self.arrow_schema.clone());
        Arc::new(ScanExec::new(
            self.engine.clone(),
            self.schema.clone(),
            fields,
            projected,
            Read {
                read_ts: self.read_ts(state),
                lookup,
                deadline: state.config().get_extension::<StatementDeadline>().map(|d| d.0),
            },
        ))
    }
}

#[async_trait]
impl TableProvider for CollectionTable {
    fn schema(&self) -> SchemaRef {
        self.arrow_schema.clone()
    }

    fn table_type(&self) -> TableType {
        TableType::Base
    }

    fn supports_filters_pushdown(&self, filters: &[&Expr]) -> DfResult<Vec<TableProviderFilterPushDown>> {
        // The workers evaluate what they can; DataFusion checks again above the
        // scan, so a predicate the filter compiler reads differently stays correct.
        Ok(vec![TableProviderFilterPushDown::Inexact; filters.len()])
    }

    async fn scan(
        &self,
        state: &dyn Session,
        projection: Option<&Vec<usize>>,
        filters: &[Expr],
        limit: Option<usize>,
    ) -> DfResult<Arc<dyn ExecutionPlan>> {
        let filter = filter_text(&self.schema, filters);
        // A limit is pushed here only when no filter is left above the scan.
        let limit = if filters.is_empty() || filter.is_some() { limit } else { None };
        Ok(self.scan_plan(state, projection, Lookup::Rows { filter, limit }))
    }
}

/// A k-nearest-neighbour search over a collection, standing in for
/// `ORDER BY distance LIMIT k` over a scan (see [`crate::ann`]).
#[derive(Debug, Clone)]
pub struct AnnTable {
    pub table: CollectionTable,
    pub search: AnnSearch,
}

/// The search an [`AnnTable`] runs.
#[derive(Debug, Clone, PartialEq)]
pub struct AnnSearch {
    pub field: String,
    pub metric: Metric,
    pub query: Vec<f32>,
    pub k: usize,
    /// The whole WHERE clause but its bounds on the distance, applied inside the search.
    pub filter: Option<String>,
    /// The bounds on the distance as a range search (see [`crate::ann`]).
    pub radius: Option<f32>,
    pub range_filter: Option<f32>,
}

#[async_trait]
impl TableProvider for AnnTable {
    fn schema(&self) -> SchemaRef {
        self.table.arrow_schema.clone()
    }

    fn table_type(&self) -> TableType {
        TableType::Base
    }

    async fn scan(
        &self,
        state: &dyn Session,
        projection: Option<&Vec<usize>>,
        _filters: &[Expr],
        _limit: Option<usize>,
    ) -> DfResult<Arc<dyn ExecutionPlan>> {
        Ok(self.table.scan_plan(state, projection, Lookup::Nearest(self.search.clone())))
    }
}

/// What a scan asks the engine for.
#[derive(Debug, Clone)]
enum Lookup {
    /// Rows (passing a filter), in key order.
    Rows { filter: Option<String>, limit: Option<usize> },
    /// The nearest rows to one vector.
    Nearest(AnnSearch),
}

#[derive(Debug, Clone)]
struct Read {
    read_ts: Timestamp,
    lookup: Lookup,
    deadline: Option<Instant>,
}

impl Read {
    /// What is left of the statement's time, as the engine read's timeout.
    fn timeout(&self) -> Option<Duration> {
        self.deadline.map(|deadline| deadline.saturating_duration_since(Instant::now()).max(Duration::from_millis(1)))
    }
}

/// Reads a collection through the engine, as one partition.
#[derive(Debug)]
pub struct ScanExec {
    engine: Engine,
    collection: Arc<CollectionSchema>,
    /// Collection field indices, in output order.
    fields: Vec<usize>,
    schema: SchemaRef,
    read: Read,
    properties: Arc<PlanProperties>,
}

impl ScanExec {
    fn new(
        engine: Engine,
        collection: Arc<CollectionSchema>,
        fields: Vec<usize>,
        schema: SchemaRef,
        read: Read,
    ) -> ScanExec {
        let properties = Arc::new(PlanProperties::new(
            EquivalenceProperties::new(schema.clone()),
            Partitioning::UnknownPartitioning(1),
            EmissionType::Final,
            Boundedness::Bounded,
        ));
        ScanExec { engine, collection, fields, schema, read, properties }
    }

    /// Runs the read (blocking: it waits for the dataflow). `memory_limit`
    /// is the statement's: a scan holds its rows before DataFusion sees
    /// them, so it may hold at most as many as the limit has room for.
    fn run(
        engine: &Engine,
        collection: &CollectionSchema,
        fields: &[usize],
        schema: SchemaRef,
        read: &Read,
        memory_limit: Option<usize>,
    ) -> Result<RecordBatch, Error> {
        let pk_index = collection.primary_index();
        let output_fields: Vec<String> =
            fields.iter().filter(|&&f| f != pk_index).map(|&f| collection.fields[f].name.clone()).collect();
        let rows: Vec<BTreeMap<String, Value>> = match &read.lookup {
            Lookup::Rows { filter, limit } => {
                let options = QueryOptions {
                    filter: filter.clone(),
                    output_fields,
                    limit: *limit,
                    as_of: Some(read.read_ts),
                    timeout: read.timeout(),
                    ..Default::default()
                };
                let row_bytes = estimated_row_bytes(collection, fields);
                let max_rows = memory_limit.map(|bytes| (bytes / row_bytes).max(1));
                engine.scan(&collection.name, &options, max_rows).map_err(|e| match (e, max_rows) {
                    (Error::ResourceExhausted { .. }, Some(rows)) => Error::exhausted(
                        "memory_limit",
                        format!(
                            "scanning `{}` would hold more than {rows} rows of about {row_bytes} bytes; \
                             filter or project less, or add a LIMIT",
                            collection.name
                        ),
                    ),
                    (other, _) => other,
                })?
            }
            Lookup::Nearest(search) => {
                let options = SearchOptions {
                    field: Some(search.field.clone()),
                    filter: search.filter.clone(),
                    radius: search.radius,
                    range_filter: search.range_filter,
                    output_fields,
                    as_of: Some(read.read_ts),
                    timeout: read.timeout(),
                    ..SearchOptions::new(search.k)
                };
                let result = engine.search(&collection.name, std::slice::from_ref(&search.query), &options)?;
                let pk_name = &collection.primary().name;
                result
                    .hits
                    .into_iter()
                    .flatten()
                    .map(|hit| {
                        let mut row = hit.fields;
                        row.insert(pk_name.clone(), hit.pk.into());
                        row
                    })
                    .collect()
            }
        };
        rows_to_batch(schema, fields.iter().map(|&f| &collection.fields[f]), &rows)
    }
}

/// Columns of `fields` from rows given by name.
fn rows_to_batch<'a>(
    schema: SchemaRef,
    fields: impl Iterator<Item = &'a FieldSchema>,
    rows: &[BTreeMap<String, Value>],
) -> Result<RecordBatch, Error> {
    let columns = fields
        .map(|field| {
            let values: Vec<Value> =
                rows.iter().map(|row| row.get(&field.name).cloned().unwrap_or(Value::Null)).collect();
            values_to_array(&field.name, &field.data_type, &values)
        })
        .collect::<Result<Vec<ArrayRef>, Error>>()?;
    let options = RecordBatchOptions::new().with_row_count(Some(rows.len()));
    Ok(RecordBatch::try_new_with_options(schema, columns, &options)?)
}

impl DisplayAs for ScanExec {
    fn fmt_as(&self, _: DisplayFormatType, f: &mut fmt::Formatter) -> fmt::Result {
        let names: Vec<&str> = self.fields.iter().map(|&i| self.collection.fields[i].name.as_str()).collect();
        match &self.read.lookup {
            Lookup::Rows { filter, limit } => {
                write!(f, "CollectionScanExec: collection={}, fields=[{}]", self.collection.name, names.join(", "))?;
                if let Some(filter) = filter {
                    write!(f, ", filter={filter}")?;
                }
                if let Some(limit) = limit {
                    write!(f, ", limit={limit}")?;
                }
            }
            Lookup::Nearest(search) => {
                write!(
                    f,
                    "AnnSearchExec: collection={}, field={}, metric={:?}, k={}, fields=[{}]",
                    self.collection.name,
                    search.field,
                    search.metric,
                    search.k,
                    names.join(", ")
                )?;
                if let Some(filter) = &search.filter {
                    write!(f, ", filter={filter}")?;
                }
                if let Some(radius) = search.radius {
                    write!(f, ", radius={radius}")?;
                }
                if let Some(range_filter) = search.range_filter {
                    write!(f, ", range_filter={range_filter}")?;
                }
            }
        }
        write!(f, ", read_ts={}", self.read.read_ts)
    }
}

impl ExecutionPlan for ScanExec {
    fn name(&self) -> &str {
        match self.read.lookup {
            Lookup::Rows { .. } => "CollectionScanExec",
            Lookup::Nearest(_) => "AnnSearchExec",
        }
    }

    fn properties(&self) -> &Arc<PlanProperties> {
        &self.properties
    }

    fn children(&self) -> Vec<&Arc<dyn ExecutionPlan>> {
        Vec::new()
    }

    fn apply_expressions(
        &self,
        _f: &mut dyn FnMut(&Arc<dyn PhysicalExpr>) -> DfResult<TreeNodeRecursion>,
    ) -> DfResult<TreeNodeRecursion> {
        Ok(TreeNodeRecursion::Continue)
    }

    fn with_new_children(self: Arc<Self>, children: Vec<Arc<dyn ExecutionPlan>>) -> DfResult<Arc<dyn ExecutionPlan>> {
        if children.is_empty() { Ok(self) } else { plan_err!("{} has no inputs", self.name()) }
    }

    fn execute(&self, partition: usize, context: Arc<TaskContext>) -> DfResult<SendableRecordBatchStream> {
        if partition != 0 {
            return plan_err!("{} has one partition, not {partition}", self.name());
        }
        let engine = self.engine.clone();
        let collection = self.collection.clone();
        let fields = self.fields.clone();
        let schema = self.schema.clone();
        let read = self.read.clone();
        let memory_limit = match context.memory_pool().memory_limit() {
            MemoryLimit::Finite(bytes) => Some(bytes),
            MemoryLimit::Infinite | MemoryLimit::Unknown => None,
        };
        let batch = futures::stream::once(async move {
            // Reads wait for the dataflow: keep them off the async workers.
            tokio::task::spawn_blocking(move || {
                ScanExec::run(&engine, &collection, &fields, schema, &read, memory_limit)
            })
            .await
            .map_err(|e| DataFusionError::External(Box::new(e)))?
            .map_err(|e| DataFusionError::External(Box::new(e)))
        });
        Ok(Box::pin(RecordBatchStreamAdapter::new(self.schema.clone(), batch)))
    }
}

/// What one scanned row of `fields` costs while the scan holds it: a map
/// entry (name and value) per field, and the value's payload.
fn estimated_row_bytes(collection: &CollectionSchema, fields: &[usize]) -> usize {
    const ROW: usize = 64;
    const ENTRY: usize = 96;
    let payload = |field: &FieldSchema| match &field.data_type {
        vectorflow_core::DataType::FloatVector { dim, .. } => dim * 4,
        vectorflow_core::DataType::VarChar { max_length } => (*max_length).min(256),
        vectorflow_core::DataType::Json => 256,
        _ => 0,
    };
    ROW + fields.iter().filter_map(|&f| collection.fields.get(f)).map(|field| ENTRY + payload(field)).sum::<usize>()
}

/// The default schema of a SQL session: every collection of the engine (read
/// live, so collections created later appear), plus tables the user
/// registers (Parquet files, memory tables, views).
#[derive(Debug)]
pub struct CollectionSchemaProvider {
    engine: Engine,
    registered: MemorySchemaProvider,
}

impl CollectionSchemaProvider {
    pub fn new(engine: Engine) -> Self {
        CollectionSchemaProvider { engine, registered: MemorySchemaProvider::new() }
    }
}

#[async_trait]
impl SchemaProvider for CollectionSchemaProvider {
    fn table_names(&self) -> Vec<String> {
        let mut names = self.engine.list_collections();
        names.extend(self.registered.table_names());
        names
    }

    async fn table(&self, name: &str) -> DfResult<Option<Arc<dyn TableProvider>>> {
        match self.engine.describe_collection(name) {
            Ok(info) => Ok(Some(Arc::new(CollectionTable::new(self.engine.clone(), info.schema)))),
            Err(Error::CollectionNotFound(_)) => self.registered.table(name).await,
            Err(e) => Err(DataFusionError::External(Box::new(e))),
        }
    }

    fn register_table(&self, name: String, table: Arc<dyn TableProvider>) -> DfResult<Option<Arc<dyn TableProvider>>> {
        if self.engine.describe_collection(&name).is_ok() {
            return plan_err!("a collection named `{name}` exists; register the table under another name");
        }
        self.registered.register_table(name, table)
    }

    fn deregister_table(&self, name: &str) -> DfResult<Option<Arc<dyn TableProvider>>> {
        self.registered.deregister_table(name)
    }

    fn table_exist(&self, name: &str) -> bool {
        self.engine.describe_collection(name).is_ok() || self.registered.table_exist(name)
    }
}
