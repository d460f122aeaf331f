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
/// A filter passing fewer rows than the file has columns pads each row with
/// id `-1` (and an infinitely far score).
#[derive(Debug, Clone)]
pub struct GroundTruth {
    pub ids: Matrix<i32>,
    pub dists: Matrix<f32>,
}

impl GroundTruth {
    /// Recall@k of the row ids `found` (best first) for query `q`, robust to
    /// ties: a returned row is a hit when it is among the true top `k`, or
    /// when `judge` scores it, from the dataset's own vectors, at least as
    /// close as the k-th true neighbour (within [`RECALL_TOLERANCE`]).
    /// Returned scores are not used: an engine may re-normalise vectors,
    /// which moves near-duplicates across the k-th similarity.
    ///
    /// Only the first `k` ids count and an id counts once. Out of `k`, or
    /// of the rows the filter passes when that is fewer; 0 for a query the
    /// ground truth does not cover.
    pub fn recall(&self, judge: &RecallJudge, q: usize, k: usize, found: &[i64]) -> f64 {
        if q >= self.ids.rows || q >= self.dists.rows {
            return 0.0;
        }
        let ids = self.ids.row(q);
        let listed = ids.iter().take(k.min(self.dists.cols)).take_while(|&&id| id >= 0).count();
        let Some(kth) = listed.checked_sub(1).map(|last| self.dists.row(q)[last]) else {
            // Nothing to find: a filter passing no row, or k = 0.
            return 1.0;
        };
        let truth = &ids[..listed];
        let mut seen = std::collections::HashSet::with_capacity(k);
        let hits = found
            .iter()
            .take(k)
            .filter(|&&id| seen.insert(id))
            .filter(|&&id| {
                i32::try_from(id).is_ok_and(|id| truth.contains(&id))
                    || judge.score(q, id).is_some_and(|score| judge.at_least_as_close(score, kth))
            })
            .count();
        hits.min(listed) as f64 / listed as f64
    }
}

/// How far a returned row's score may fall short of the k-th true
/// neighbour's and still count as a hit: rounding in the last bits of a
/// similarity around 1.0, where summation orders differ between tools.
pub const RECALL_TOLERANCE: f32 = 1e-6;

/// Accumulator lanes of [`truth_score`]. Fixed (and no fused multiply-add),
/// so a score has the same bits on every CPU, whatever its vector width: a
/// ground truth written on one machine is recomputed exactly on another.
const LANES: usize = 16;

#[inline(always)]
fn truth_kernel<const L2: bool>(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0.0f32; LANES];
    let (ca, ra) = a.as_chunks::<LANES>();
    let (cb, rb) = b.as_chunks::<LANES>();
    for (x, y) in ca.iter().zip(cb) {
        for i in 0..LANES {
            acc[i] += if L2 { (x[i] - y[i]) * (x[i] - y[i]) } else { x[i] * y[i] };
        }
    }
    let tail: f32 = ra.iter().zip(rb).map(|(x, y)| if L2 { (x - y) * (x - y) } else { x * y }).sum();
    acc.iter().sum::<f32>() + tail
}

/// [`truth_kernel`] with 256-bit registers: the same operations in the same
/// order (AVX without FMA), so the same bits, twice as many lanes per instruction.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx")]
fn truth_kernel_avx<const L2: bool>(a: &[f32], b: &[f32]) -> f32 {
    truth_kernel::<L2>(a, b)
}

#[inline(always)]
fn truth_block<const L2: bool>(query: &[f32], rows: &[f32], out: &mut [f32]) {
    for (row, score) in rows.chunks_exact(query.len().max(1)).zip(out) {
        *score = truth_kernel::<L2>(query, row);
    }
}

/// [`truth_block`] with AVX, as [`truth_kernel_avx`]; one call per block
/// lets the rows' reductions overlap (about twice as fast as row by row).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx")]
fn truth_block_avx<const L2: bool>(query: &[f32], rows: &[f32], out: &mut [f32]) {
    truth_block::<L2>(query, rows, out)
}

/// [`truth_score`] of `query` against each of the consecutive vectors in
/// `rows`, into `out` (the same bits as one call per row).
pub fn truth_scores(metric: Metric, query: &[f32], rows: &[f32], out: &mut [f32]) {
    let l2 = metric == Metric::L2;
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx") {
        // SAFETY: this CPU supports AVX, the only feature the kernels are compiled with.
        return unsafe {
            if l2 { truth_block_avx::<true>(query, rows, out) } else { truth_block_avx::<false>(query, rows, out) }
        };
    }
    if l2 { truth_block::<true>(query, rows, out) } else { truth_block::<false>(query, rows, out) }
}

/// The score a ground truth lists for base vector `row` and query `query`,
/// computed from the vectors as stored (f16 widened to f32; never
/// re-normalised): the inner product for IP and COSINE (larger is closer;
/// COSINE datasets hold unit vectors), the squared Euclidean distance for L2
/// (smaller is closer).
#[inline]
pub fn truth_score(metric: Metric, query: &[f32], row: &[f32]) -> f32 {
    let l2 = metric == Metric::L2;
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx") {
        // SAFETY: this CPU supports AVX, the only feature the kernels are compiled with.
        return unsafe {
            if l2 { truth_kernel_avx::<true>(query, row) } else { truth_kernel_avx::<false>(query, row) }
        };
    }
    if l2 { truth_kernel::<true>(query, row) } else { truth_kernel::<false>(query, row) }
}

/// Whether `score` is at least as close as `bound` for `metric`, within [`RECALL_TOLERANCE`].
fn at_least_as_close(metric: Metric, score: f32, bound: f32) -> bool {
    if metric.larger_is_closer() { score >= bound - RECALL_TOLERANCE } else { score <= bound + RECALL_TOLERANCE }
}

/// A row and its [`truth_score`], ordered so that the greater one is
/// farther: worse score first, then the higher row (ties go to the lower row).
#[derive(Debug, Clone, Copy)]
pub(crate) struct Scored {
    pub score: f32,
    pub row: u32,
    larger_is_closer: bool,
}

impl Scored {
    pub fn new(metric: Metric, score: f32, row: u32) -> Scored {
        Scored { score, row, larger_is_closer: metric.larger_is_closer() }
    }
}

impl PartialEq for Scored {
    fn eq(&self, other: &Self) -> bool {
        self.cmp(other) == std::cmp::Ordering::Equal
    }
}

impl Eq for Scored {}

impl PartialOrd for Scored {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for Scored {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        let by_score =
            if self.larger_is_closer { other.score.total_cmp(&self.score) } else { self.score.total_cmp(&other.score) };
        by_score.then(self.row.cmp(&other.row))
    }
}

/// The `k` closest rows pushed so far (a bounded max-heap on [`Scored`]).
#[derive(Debug)]
pub(crate) struct Nearest {
    k: usize,
    heap: std::collections::BinaryHeap<Scored>,
}

impl Nearest {
    pub fn new(k: usize) -> Nearest {
        Nearest { k, heap: std::collections::BinaryHeap::with_capacity(k + 1) }
    }

    #[inline]
    pub fn push(&mut self, candidate: Scored) {
        if self.heap.len() < self.k {
            self.heap.push(candidate);
        } else if let Some(mut farthest) = self.heap.peek_mut()
            && candidate < *farthest
        {
            *farthest = candidate;
        }
    }

    /// The kept rows, nearest first.
    pub fn into_sorted(self) -> Vec<Scored> {
        self.heap.into_sorted_vec()
    }
}

/// Exact top `k` of `base` rows `rows` for `query` by [`truth_score`],
/// nearest first, ties to the lower row: how a ground truth is made, so
/// this search scores recall 1.0 against one. (row, score) pairs.
pub fn exact_search(metric: Metric, base: &Matrix<f32>, query: &[f32], k: usize, rows: &[usize]) -> Vec<(i64, f32)> {
    let mut nearest = Nearest::new(k);
    for &row in rows.iter().filter(|&&row| row < base.rows) {
        nearest.push(Scored::new(metric, truth_score(metric, query, base.row(row)), row as u32));
    }
    nearest.into_sorted().into_iter().map(|s| (i64::from(s.row), s.score)).collect()
}

/// Judges returned rows for [`GroundTruth::recall`] from a dataset's own
/// base and query vectors (as loaded: f16 widened to f32, not normalised).
#[derive(Debug, Clone, Copy)]
pub struct RecallJudge<'a> {
    base: &'a Matrix<f32>,
    queries: &'a Matrix<f32>,
    metric: Metric,
}

impl<'a> RecallJudge<'a> {
    /// `base` and `queries` as [`Dataset::base_vectors`] and
    /// [`Dataset::query_vectors`] load them; `metric` from [`Dataset::metric`].
    pub fn new(base: &'a Matrix<f32>, queries: &'a Matrix<f32>, metric: Metric) -> Result<RecallJudge<'a>> {
        if base.cols != queries.cols {
            return Err(Error::argument(
                "queries",
                format!("{} dimensions, the base vectors have {}", queries.cols, base.cols),
            ));
        }
        Ok(RecallJudge { base, queries, metric })
    }

    pub fn metric(&self) -> Metric {
        self.metric
    }

    /// The [`truth_score`] of base row `row` for query `q`; `None` when
    /// either is not in the dataset (an id the engine made up, say).
    pub fn score(&self, q: usize, row: i64) -> Option<f32> {
        let row = usize::try_from(row).ok().filter(|&row| row < self.base.rows)?;
        (q < self.queries.rows).then(|| truth_score(self.metric, self.queries.row(q), self.base.row(row)))
    }

    /// Whether `score` is as close as `bound` (a ground-truth score) or closer, within [`RECALL_TOLERANCE`].
    pub fn at_least_as_close(&self, score: f32, bound: f32) -> bool {
        at_least_as_close(self.metric, score, bound)
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

/// Writes `batch` as one Parquet file (an attribute file of a dataset folder).
pub(crate) fn write_parquet(path: &Path, batch: &RecordBatch) -> Result<()> {
    let file = File::create(path)?;
    let parquet_error = |e: parquet::errors::ParquetError| Error::storage(format!("{}: {e}", path.display()));
    let mut writer = ArrowWriter::try_new(file, batch.schema(), None).map_err(parquet_error)?;
    writer.write(batch).map_err(parquet_error)?;
    writer.close().map_err(parquet_error)?;
    Ok(())
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
        let ids = npy::read_i32(&self.dir.join(&info.ids_file))?;
        let dists = npy::read_f32(&self.dir.join(&info.dists_file))?;
        if (ids.rows, ids.cols) != (dists.rows, dists.cols) {
            return Err(Error::Corrupt {
                location: self.dir.join(&info.dists_file).display().to_string(),
                problem: format!("shape ({}, {}), the ids are ({}, {})", dists.rows, dists.cols, ids.rows, ids.cols),
            });
        }
        Ok(Some(GroundTruth { ids, dists }))
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
        write_parquet(&out.join("base_attrs.parquet"), &self.base_attributes()?.slice(0, rows))?;
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

#[cfg(test)]
mod tests {
    use super::*;

    fn matrix<T>(rows: usize, cols: usize, data: Vec<T>) -> Matrix<T> {
        assert_eq!(data.len(), rows * cols);
        Matrix { rows, cols, data }
    }

    /// Rows 0 and 1 are the same vector; row 2 is farther from the query.
    fn tied() -> (Matrix<f32>, Matrix<f32>, GroundTruth) {
        let base = matrix(4, 2, vec![1.0, 0.0, 1.0, 0.0, 0.6, 0.8, 0.0, 1.0]);
        let queries = matrix(1, 2, vec![1.0, 0.0]);
        // The truth lists row 0 (tie broken the other way than an engine might).
        let truth = GroundTruth { ids: matrix(1, 2, vec![0, 2]), dists: matrix(1, 2, vec![1.0, 0.6]) };
        (base, queries, truth)
    }

    #[test]
    fn a_row_tied_with_the_kth_neighbour_is_a_hit_a_farther_one_is_not() {
        let (base, queries, truth) = tied();
        let judge = RecallJudge::new(&base, &queries, Metric::COSINE).unwrap();
        assert_eq!(truth.recall(&judge, 0, 1, &[0]), 1.0);
        assert_eq!(truth.recall(&judge, 0, 1, &[1]), 1.0, "row 1 is not listed but as similar as row 0");
        assert_eq!(truth.recall(&judge, 0, 1, &[2]), 0.0, "row 2 is less similar than the 1st neighbour");
        assert_eq!(truth.recall(&judge, 0, 2, &[1, 0]), 1.0);
        assert_eq!(truth.recall(&judge, 0, 2, &[1, 3]), 0.5, "row 3 (0.0) is below the 2nd neighbour (0.6)");
        // A repeated id counts once; made-up ids are misses; only the first k count.
        assert_eq!(truth.recall(&judge, 0, 2, &[0, 0]), 0.5);
        assert_eq!(truth.recall(&judge, 0, 2, &[-1, 99]), 0.0);
        assert_eq!(truth.recall(&judge, 0, 1, &[3, 0]), 0.0);
        // A query the truth does not cover.
        assert_eq!(truth.recall(&judge, 1, 1, &[0]), 0.0);
    }

    #[test]
    fn the_tie_rule_uses_the_datasets_vectors_not_the_engines_scores() {
        // Row 1 is row 0 at twice the length: a COSINE engine normalises it
        // to the same vector, but the ground truth's inner product of the
        // stored vectors puts it far above; row 2 normalised would tie with
        // row 0 but stored at half length it scores below the k-th.
        let base = matrix(3, 2, vec![0.8, 0.6, 1.6, 1.2, 0.4, 0.3]);
        let queries = matrix(1, 2, vec![0.8, 0.6]);
        let truth = GroundTruth { ids: matrix(1, 1, vec![1]), dists: matrix(1, 1, vec![2.0]) };
        let judge = RecallJudge::new(&base, &queries, Metric::COSINE).unwrap();
        assert_eq!(truth.recall(&judge, 0, 1, &[0]), 0.0);
        let truth = GroundTruth { ids: matrix(1, 1, vec![0]), dists: matrix(1, 1, vec![1.0]) };
        assert_eq!(truth.recall(&judge, 0, 1, &[2]), 0.0);
        assert_eq!(truth.recall(&judge, 0, 1, &[1]), 1.0);
    }

    #[test]
    fn l2_ground_truths_rank_ascending() {
        let base = matrix(3, 2, vec![1.0, 0.0, 1.0, 0.0, 3.0, 0.0]);
        let queries = matrix(1, 2, vec![0.0, 0.0]);
        let truth = GroundTruth { ids: matrix(1, 1, vec![0]), dists: matrix(1, 1, vec![1.0]) };
        let judge = RecallJudge::new(&base, &queries, Metric::L2).unwrap();
        assert_eq!(truth.recall(&judge, 0, 1, &[1]), 1.0, "the same squared distance");
        assert_eq!(truth.recall(&judge, 0, 1, &[2]), 0.0, "9 is farther than 1");
        assert_eq!(exact_search(Metric::L2, &base, queries.row(0), 2, &[0, 1, 2]), vec![(0, 1.0), (1, 1.0)]);
    }

    #[test]
    fn padded_ground_truths_count_only_the_rows_the_filter_passes() {
        let (base, queries, _) = tied();
        let judge = RecallJudge::new(&base, &queries, Metric::COSINE).unwrap();
        let truth = GroundTruth {
            ids: matrix(1, 3, vec![2, -1, -1]),
            dists: matrix(1, 3, vec![0.6, f32::NEG_INFINITY, f32::NEG_INFINITY]),
        };
        assert_eq!(truth.recall(&judge, 0, 3, &[2]), 1.0);
        assert_eq!(truth.recall(&judge, 0, 3, &[3]), 0.0);
        let nothing = GroundTruth { ids: matrix(1, 1, vec![-1]), dists: matrix(1, 1, vec![f32::NEG_INFINITY]) };
        assert_eq!(nothing.recall(&judge, 0, 1, &[]), 1.0, "a filter passing no row: nothing to find");
        assert!(RecallJudge::new(&base, &matrix(1, 3, vec![0.0; 3]), Metric::COSINE).is_err());
    }

    #[test]
    fn scores_of_a_block_have_the_bits_of_single_scores() {
        for dim in [1, 15, 16, 37, 128] {
            let base = duplicated(50, dim);
            let query = duplicated(3, dim);
            for metric in [Metric::COSINE, Metric::L2] {
                let mut block = vec![0.0; base.rows];
                truth_scores(metric, query.row(2), &base.data, &mut block);
                for (row, score) in block.iter().enumerate() {
                    assert_eq!(score.to_bits(), truth_score(metric, query.row(2), base.row(row)).to_bits());
                }
                let naive: f32 = query.row(2).iter().zip(base.row(7)).map(|(a, b)| a * b).sum();
                if metric == Metric::COSINE {
                    assert!((block[7] - naive).abs() < 1e-4, "dim {dim}: {} vs {naive}", block[7]);
                }
            }
        }
    }

    /// f16-rounded pseudo-random vectors with exact and near duplicates, the
    /// way real embedding datasets have them.
    fn duplicated(rows: usize, dim: usize) -> Matrix<f32> {
        let mut data = Vec::with_capacity(rows * dim);
        for r in 0..rows {
            // Every third row repeats an earlier one, every fifth nudges one by an f16 step.
            let source = if r % 3 == 2 || r % 5 == 4 { r / 2 } else { r };
            for d in 0..dim {
                let x = ((source * 31 + d * 17) as f32 * 0.37).sin();
                let x = if source != r && r % 5 == 4 && d == 0 { x + 1e-3 } else { x };
                data.push(half::f16::from_f32(x).to_f32());
            }
        }
        Matrix { rows, cols: dim, data }
    }

    #[test]
    fn exact_search_over_the_base_vectors_scores_one_against_a_differently_computed_truth() {
        let (dim, k) = (37, 10);
        let base = duplicated(600, dim);
        let queries = duplicated(25, dim);
        let rows: Vec<usize> = (0..base.rows).collect();
        // The truth as another tool would make it: f64 sums rounded to f32,
        // ties broken towards the higher row.
        let (mut ids, mut dists) = (Vec::new(), Vec::new());
        for q in 0..queries.rows {
            let mut scored: Vec<(f32, i32)> = (0..base.rows)
                .map(|r| {
                    let dot: f64 =
                        queries.row(q).iter().zip(base.row(r)).map(|(a, b)| f64::from(*a) * f64::from(*b)).sum();
                    (dot as f32, r as i32)
                })
                .collect();
            scored.sort_by(|a, b| b.0.total_cmp(&a.0).then(b.1.cmp(&a.1)));
            ids.extend(scored[..k].iter().map(|s| s.1));
            dists.extend(scored[..k].iter().map(|s| s.0));
        }
        let truth = GroundTruth { ids: matrix(queries.rows, k, ids), dists: matrix(queries.rows, k, dists) };
        let judge = RecallJudge::new(&base, &queries, Metric::COSINE).unwrap();
        let mut differs = 0;
        for q in 0..queries.rows {
            let found: Vec<i64> =
                exact_search(Metric::COSINE, &base, queries.row(q), k, &rows).into_iter().map(|(id, _)| id).collect();
            differs += usize::from(found.iter().zip(truth.ids.row(q)).any(|(a, b)| *a != i64::from(*b)));
            assert_eq!(truth.recall(&judge, q, k, &found), 1.0, "query {q}");
        }
        assert!(differs > 0, "the ties should make some id lists differ from the truth's");
    }

    /// The real dataset, where present: every listed neighbour's score from
    /// the stored vectors is within the tolerance of the score the ground
    /// truth lists, so exact search scores 1.0 against every ground truth.
    #[test]
    fn exact_search_scores_one_on_pypi_20k() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../shared/datasets/pypi-20k");
        if !dir.join("filters.json").exists() {
            eprintln!("skipped: {} is not there", dir.display());
            return;
        }
        let dataset = Dataset::open(&dir).unwrap();
        let (base, queries) = (dataset.base_vectors().unwrap(), dataset.query_vectors().unwrap());
        let judge = RecallJudge::new(&base, &queries, dataset.metric()).unwrap();
        let attributes = dataset.base_attributes().unwrap();
        let month = arrow::compute::cast(attributes.column_by_name("month").unwrap(), &ArrowType::Int32).unwrap();
        let month = month.as_primitive::<arrow::datatypes::Int32Type>();
        for name in dataset.info.ground_truth.keys() {
            let truth = dataset.ground_truth(name).unwrap().unwrap();
            let mut worst = 0.0f32;
            for q in 0..truth.ids.rows {
                for (&id, &dist) in truth.ids.row(q).iter().zip(truth.dists.row(q)) {
                    worst = worst.max((judge.score(q, i64::from(id)).unwrap() - dist).abs());
                }
            }
            // (3.6e-7 at most on pypi-20k: other summation orders, within the tolerance.)
            assert!(worst <= RECALL_TOLERANCE, "{name}: a listed score differs by {worst}");
        }
        // And a direct check on a few queries of the unfiltered and `month >= 202610` truths.
        for (name, passing) in [
            ("unfiltered", (0..base.rows).collect::<Vec<_>>()),
            ("filter10", (0..base.rows).filter(|&r| month.value(r) >= 202610).collect()),
        ] {
            let truth = dataset.ground_truth(name).unwrap().unwrap();
            assert_eq!(dataset.info.ground_truth[name].expression.is_some(), name == "filter10");
            for q in 0..5 {
                for k in [1, 10, 100] {
                    let found: Vec<i64> = exact_search(judge.metric(), &base, queries.row(q), k, &passing)
                        .into_iter()
                        .map(|r| r.0)
                        .collect();
                    assert_eq!(truth.recall(&judge, q, k, &found), 1.0, "{name} query {q} k {k}");
                }
            }
        }
    }
}
