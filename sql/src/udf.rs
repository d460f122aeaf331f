//! Vector distance functions for SQL: `l2_distance`, `cosine_distance` and
//! `inner_product`. Either side is a vector column (`FixedSizeList<Float32>`)
//! or a literal (`[0.1, 0.2]` or `make_array(...)`, a list of numbers).
//!
//! They compute what the engine's metrics compute, with the same kernels, so
//! SQL values equal search scores: `l2_distance` is the squared Euclidean
//! distance (Milvus reports L2 that way), `cosine_distance` is
//! `1 - cosine similarity`, `inner_product` the dot product.

use std::sync::Arc;

use arrow::array::{Array, ArrayRef, AsArray, Float32Array};
use arrow::compute::cast;
use arrow::datatypes::{DataType, Float32Type};
use datafusion::common::{DataFusionError, Result, exec_err};
use datafusion::logical_expr::{ColumnarValue, ScalarFunctionArgs, ScalarUDF, ScalarUDFImpl, Signature, Volatility};
use vectorflow_core::Metric;
use vectorflow_operators::distance::{dot, l2_squared};

/// The three distance functions.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum VectorFunction {
    L2Distance,
    CosineDistance,
    InnerProduct,
}

impl VectorFunction {
    pub const ALL: [VectorFunction; 3] =
        [VectorFunction::L2Distance, VectorFunction::CosineDistance, VectorFunction::InnerProduct];

    pub fn name(self) -> &'static str {
        match self {
            VectorFunction::L2Distance => "l2_distance",
            VectorFunction::CosineDistance => "cosine_distance",
            VectorFunction::InnerProduct => "inner_product",
        }
    }

    pub fn from_name(name: &str) -> Option<VectorFunction> {
        VectorFunction::ALL.into_iter().find(|f| f.name() == name)
    }

    /// Whether ordering by this function in `descending` order ranks rows as
    /// a search with `metric` does (nearest first), so an ANN search can answer it.
    pub fn ranks_like(self, metric: Metric, descending: bool) -> bool {
        match (self, metric) {
            (VectorFunction::L2Distance, Metric::L2) => !descending,
            (VectorFunction::CosineDistance, Metric::COSINE) => !descending,
            // Stored COSINE vectors are unit length, so the inner product ranks them as cosine does.
            (VectorFunction::InnerProduct, Metric::IP | Metric::COSINE) => descending,
            _ => false,
        }
    }

    fn compute(self, a: &[f32], b: &[f32]) -> f32 {
        match self {
            VectorFunction::L2Distance => l2_squared(a, b),
            VectorFunction::InnerProduct => dot(a, b),
            VectorFunction::CosineDistance => {
                let norms = (dot(a, a) * dot(b, b)).sqrt();
                if norms == 0.0 { 1.0 } else { 1.0 - dot(a, b) / norms }
            }
        }
    }

    pub fn udf(self) -> ScalarUDF {
        ScalarUDF::new_from_impl(DistanceUdf { function: self, signature: Signature::any(2, Volatility::Immutable) })
    }
}

#[derive(Debug, PartialEq, Eq, Hash)]
struct DistanceUdf {
    function: VectorFunction,
    signature: Signature,
}

impl ScalarUDFImpl for DistanceUdf {
    fn name(&self) -> &str {
        self.function.name()
    }

    fn signature(&self) -> &Signature {
        &self.signature
    }

    fn return_type(&self, arg_types: &[DataType]) -> Result<DataType> {
        for (i, t) in arg_types.iter().enumerate() {
            if !is_vector_type(t) && !t.is_null() {
                return exec_err!("{}: argument {} is {t}, not a vector (a list of numbers)", self.name(), i + 1);
            }
        }
        Ok(DataType::Float32)
    }

    fn invoke_with_args(&self, args: ScalarFunctionArgs) -> Result<ColumnarValue> {
        let rows = args.number_rows;
        let [left, right] = args.args.as_slice() else {
            return exec_err!("{} takes two vectors", self.name());
        };
        let all_scalar = matches!((left, right), (ColumnarValue::Scalar(_), ColumnarValue::Scalar(_)));
        let left = VectorArg::new(self.name(), left)?;
        let right = VectorArg::new(self.name(), right)?;
        let rows = if all_scalar { 1 } else { rows };
        let mut out = Vec::with_capacity(rows);
        for row in 0..rows {
            out.push(match (left.row(row), right.row(row)) {
                (Some(a), Some(b)) if a.len() == b.len() => Some(self.function.compute(a, b)),
                (Some(a), Some(b)) => {
                    return exec_err!("{}: vectors of dimension {} and {} (row {row})", self.name(), a.len(), b.len());
                }
                _ => None,
            });
        }
        let array: ArrayRef = Arc::new(Float32Array::from(out));
        Ok(if all_scalar {
            ColumnarValue::Scalar(datafusion::common::ScalarValue::try_from_array(&array, 0)?)
        } else {
            ColumnarValue::Array(array)
        })
    }
}

fn is_vector_type(t: &DataType) -> bool {
    match t {
        DataType::FixedSizeList(item, _) | DataType::List(item) | DataType::LargeList(item) => {
            item.data_type().is_numeric() || item.data_type().is_null()
        }
        _ => false,
    }
}

/// One argument as flat `f32` values and a value range per row (one row,
/// repeated, for a scalar).
struct VectorArg {
    values: Float32Array,
    ranges: Vec<Option<(usize, usize)>>,
    broadcast: bool,
}

impl VectorArg {
    fn new(function: &str, value: &ColumnarValue) -> Result<VectorArg> {
        let (array, broadcast) = match value {
            ColumnarValue::Array(array) => (array.clone(), false),
            ColumnarValue::Scalar(scalar) => (scalar.to_array_of_size(1)?, true),
        };
        let (child, ranges): (ArrayRef, Vec<Option<(usize, usize)>>) = match array.data_type() {
            DataType::FixedSizeList(_, _) => {
                let list = array.as_fixed_size_list();
                let len = list.value_length() as usize;
                let ranges = (0..list.len())
                    .map(|i| {
                        list.is_valid(i).then(|| (list.value_offset(i) as usize, list.value_offset(i) as usize + len))
                    })
                    .collect();
                (list.values().clone(), ranges)
            }
            DataType::List(_) => list_parts(array.as_list::<i32>()),
            DataType::LargeList(_) => list_parts(array.as_list::<i64>()),
            DataType::Null => (Arc::new(Float32Array::from(Vec::<f32>::new())) as ArrayRef, vec![None; array.len()]),
            other => return exec_err!("{function}: {other} is not a vector (a list of numbers)"),
        };
        let values = cast(&child, &DataType::Float32).map_err(|e| DataFusionError::ArrowError(Box::new(e), None))?;
        let values = values.as_primitive::<Float32Type>().clone();
        if values.null_count() > 0 {
            return exec_err!("{function}: a vector holds a null element");
        }
        Ok(VectorArg { values, ranges, broadcast })
    }

    fn row(&self, row: usize) -> Option<&[f32]> {
        let row = if self.broadcast { 0 } else { row };
        let (start, end) = (*self.ranges.get(row)?)?;
        self.values.values().get(start..end)
    }
}

/// The child values of a list array and each row's value range.
fn list_parts<O: arrow::array::OffsetSizeTrait>(
    list: &arrow::array::GenericListArray<O>,
) -> (ArrayRef, Vec<Option<(usize, usize)>>) {
    let offsets = list.value_offsets();
    let ranges =
        (0..list.len()).map(|i| list.is_valid(i).then(|| (offsets[i].as_usize(), offsets[i + 1].as_usize()))).collect();
    (list.values().clone(), ranges)
}

/// A constant vector (a list literal), as `f32`s; `None` for anything else.
pub fn literal_vector(value: &datafusion::common::ScalarValue) -> Option<Vec<f32>> {
    let arg = VectorArg::new("vector", &ColumnarValue::Scalar(value.clone())).ok()?;
    arg.row(0).map(<[f32]>::to_vec)
}
