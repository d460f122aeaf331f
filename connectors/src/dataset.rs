//! Datasets in the layout of `shared/datasets/README.md`: `base.npy`,
//! `queries.npy`, `base_attrs.parquet`, `query_attrs.parquet`, `filters.json`
//! and `gt_<name>_{ids,dists}.npy`. Any dimension and any attribute columns.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use arrow::array::{Array, ArrayRef, AsArray, Int64Array};
use arrow::datatypes::DataType as ArrowType;
use arrow::record_batch::RecordBatch;
use parquet::arrow::ArrowWriter;
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use serde::{Deserialize, Serialize};
use vectorflow_core::batch::vector_array;
use vectorflow_core::{CollectionSchema, DataType, Error, FieldSchema, Metric, Result};

use crate::npy::{self, Matrix};

/// The primary key column of dataset collections (row number of the base set).
pub const ID_COLUMN: &str = "id";
/// The vector field of dataset collections.
pub const VECTOR_FIELD: &str = "embedding";

/// One ground truth listed in `filters.json`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct GroundTruthInfo {
    /// SQL predicate over the attribute columns; `None` = unfiltered.
    pub expression: Option<String>,
    #[serde(default)]
    pub passing_rows: Option<usize>,
    #[serde(default)]
    pub selectivity: Option<f64>,
    pub ids_file: String,
    pub dists_file: String,
}

/// `filters.json`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DatasetInfo {
    pub n_base: usize,
    pub n_queries: usize,
    pub dim: usize,
    #[serde(default)]
    pub k: usize,
    #[serde(default)]
    pub metric: String,
    #[serde(default)]
    pub ground_truth: std::collections::BTreeMap<String, GroundTruthInfo>,
}

/// Exact neighbours of every query, nearest first, with their similarities.
#[derive(Debug, Clone)]
pub struct GroundTruth {
    pub ids: Matrix<i32>,
    pub dists: Matrix<f32>,
}

impl GroundTruth {
    /// Recall@k of `found` for query `q`, robust to ties: a returned row is a
    /// hit when it is a true neighbour or as similar as the k-th one.
    pub fn recall(&self, q: usize, k: usize, found: &[(i64, f32)]) -> f64 {
        let truth = &self.ids.row(q)[..k.min(self.ids.cols)];
        let kth = self.dists.row(q)[k.min(self.dists.cols) - 1];
        let hits = found
            .iter()
            .take(k)
            .filter(|(id, similarity)| truth.contains(&(*id as i32)) || *similarity >= kth - 1e-6)
            .count();
        hits as f64 / k as f64
    }
}

/// A dataset folder.
#[derive(Debug, Clone)]
pub struct Dataset {
    pub dir: PathBuf,
    pub info: DatasetInfo,
}

fn read_parquet(path: &Path) -> Result<RecordBatch> {
    let file = File::open(path)
        .map_err(|e| Error::Corrupt { location: path.display().to_string(), problem: e.to_string() })?;
    let parquet_error = |e: parquet::errors::ParquetError| Error::Corrupt {
        location: path.display().to_string(),
        problem: e.to_string(),
    };
    let builder = ParquetRecordBatchReaderBuilder::try_new(file).map_err(parquet_error)?;
    let schema = builder.schema().clone();
    let batches = builder.build().map_err(parquet_error)?.collect::<Result<Vec<_>, _>>()?;
    Ok(arrow::compute::concat_batches(&schema, &batches)?)
}

impl Dataset {
    pub fn open(dir: impl Into<PathBuf>) -> Result<Dataset> {
        let dir = dir.into();
        let path = dir.join("filters.json");
        let text = std::fs::read_to_string(&path)
            .map_err(|e| Error::Corrupt { location: path.display().to_string(), problem: e.to_string() })?;
        let info = serde_json::from_str(&text)
            .map_err(|e| Error::Corrupt { location: path.display().to_string(), problem: e.to_string() })?;
        Ok(Dataset { dir, info })
    }

    pub fn name(&self) -> String {
        self.dir.file_name().map_or_else(|| self.dir.display().to_string(), |n| n.to_string_lossy().into_owned())
    }

    /// The dataset's metric (the first word of `filters.json`'s `metric`; COSINE if absent).
    pub fn metric(&self) -> Metric {
        self.info.metric.split_whitespace().next().and_then(|m| m.parse().ok()).unwrap_or(Metric::COSINE)
    }

    /// A collection for this dataset: `id` (int64 primary key), the vector
    /// field `embedding`, and every other attribute column as a scalar field.
    pub fn collection_schema(&self, name: &str, attributes: &RecordBatch) -> Result<CollectionSchema> {
        let mut fields = vec![
            FieldSchema::int64_primary(ID_COLUMN, false),
            FieldSchema::vector(VECTOR_FIELD, self.info.dim, self.metric()),
        ];
        for (i, field) in attributes.schema().fields().iter().enumerate() {
            if field.name() == ID_COLUMN {
                continue;
            }
            let data_type = match field.data_type() {
                ArrowType::Boolean => DataType::Bool,
                ArrowType::Int8 => DataType::Int8,
                ArrowType::Int16 => DataType::Int16,
                ArrowType::Int32 => DataType::Int32,
                ArrowType::Int64 => DataType::Int64,
                ArrowType::Float32 => DataType::Float,
                ArrowType::Float64 => DataType::Double,
                ArrowType::Utf8 | ArrowType::LargeUtf8 | ArrowType::Utf8View => {
                    let column = arrow::compute::cast(attributes.column(i), &ArrowType::Utf8)?;
                    let longest = column.as_string::<i32>().iter().flatten().map(|s| s.chars().count()).max();
                    DataType::VarChar { max_length: longest.unwrap_or(1).clamp(1, 65_535) }
                }
                other => {
                    tracing::warn!(column = field.name(), "attribute type {other} is not supported; column skipped");
                    continue;
                }
            };
            let mut schema_field = FieldSchema::new(field.name(), data_type);
            schema_field.nullable = field.is_nullable() || attributes.column(i).null_count() > 0;
            fields.push(schema_field);
        }
        Ok(CollectionSchema::new(name, fields))
    }

    /// Rows `range` of the base set as a batch for `schema` (from
    /// [`Dataset::collection_schema`]): ids, vectors and attributes.
    pub fn base_batch(
        &self,
        schema: &CollectionSchema,
        vectors: &Matrix<f32>,
        attributes: &RecordBatch,
        range: std::ops::Range<usize>,
    ) -> Result<RecordBatch> {
        let (start, len) = (range.start, range.len());
        if range.end > vectors.rows || range.end > attributes.num_rows() {
            return Err(Error::argument(
                "range",
                format!("rows {range:?} outside the dataset's {} rows", vectors.rows.min(attributes.num_rows())),
            ));
        }
        let mut fields = Vec::new();
        let mut columns: Vec<ArrayRef> = Vec::new();
        for field in &schema.fields {
            let column: ArrayRef = if field.is_primary {
                Arc::new(Int64Array::from_iter_values(range.clone().map(|i| i as i64)))
            } else if field.data_type.is_vector() {
                vector_array(vectors.cols, vectors.data[start * vectors.cols..range.end * vectors.cols].to_vec())?
            } else {
                let column = attributes
                    .column_by_name(&field.name)
                    .ok_or_else(|| Error::field(&field.name, "not among the dataset's attribute columns"))?;
                arrow::compute::cast(&column.slice(start, len), &field.data_type.arrow_type())?
            };
            fields.push(arrow::datatypes::Field::new(&field.name, column.data_type().clone(), true));
            columns.push(column);
        }
        Ok(RecordBatch::try_new(Arc::new(arrow::datatypes::Schema::new(fields)), columns)?)
    }

    pub fn base_vectors(&self) -> Result<Matrix<f32>> {
        npy::read_f32(&self.dir.join("base.npy"))
    }

    pub fn query_vectors(&self) -> Result<Matrix<f32>> {
        npy::read_f32(&self.dir.join("queries.npy"))
    }

    /// The attribute columns of the base rows (row `i` is vector `i`).
    pub fn base_attributes(&self) -> Result<RecordBatch> {
        read_parquet(&self.dir.join("base_attrs.parquet"))
    }

    pub fn ground_truth(&self, name: &str) -> Result<Option<GroundTruth>> {
        let Some(info) = self.info.ground_truth.get(name) else { return Ok(None) };
        Ok(Some(GroundTruth {
            ids: npy::read_i32(&self.dir.join(&info.ids_file))?,
            dists: npy::read_f32(&self.dir.join(&info.dists_file))?,
        }))
    }

    /// Writes the first `rows` base rows and `queries` queries to `out` in the
    /// same layout, without ground truths (they would not hold for a subset).
    pub fn write_sample(&self, out: &Path, rows: usize, queries: usize) -> Result<Dataset> {
        std::fs::create_dir_all(out)?;
        let base = self.base_vectors()?;
        let rows = rows.min(base.rows);
        npy::write_f16(&out.join("base.npy"), rows, base.cols, &base.data[..rows * base.cols])?;
        let query = self.query_vectors()?;
        let queries = queries.min(query.rows);
        npy::write_f16(&out.join("queries.npy"), queries, query.cols, &query.data[..queries * query.cols])?;
        let attrs = self.base_attributes()?.slice(0, rows);
        let path = out.join("base_attrs.parquet");
        let file = File::create(&path)?;
        let parquet_error = |e: parquet::errors::ParquetError| Error::storage(format!("{}: {e}", path.display()));
        let mut writer = ArrowWriter::try_new(file, attrs.schema(), None).map_err(parquet_error)?;
        writer.write(&attrs).map_err(parquet_error)?;
        writer.close().map_err(parquet_error)?;
        let info = DatasetInfo {
            n_base: rows,
            n_queries: queries,
            dim: base.cols,
            k: 0,
            metric: self.info.metric.clone(),
            ground_truth: Default::default(),
        };
        let json = serde_json::to_string_pretty(&info).map_err(Error::storage)?;
        std::fs::write(out.join("filters.json"), json)?;
        Dataset::open(out)
    }
}
