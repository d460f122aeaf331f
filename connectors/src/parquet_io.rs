//! Record batches to Parquet bytes and back: the format of segment data and
//! delete logs in the object store.

use std::sync::Arc;

use arrow::record_batch::RecordBatch;
use bytes::Bytes;
use parquet::arrow::ArrowWriter;
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use parquet::basic::{Compression, ZstdLevel};
use parquet::file::properties::WriterProperties;
use vectorflow_core::{Error, Result};

/// Rows per Parquet row group.
const ROW_GROUP_ROWS: usize = 64 * 1024;

/// `batch` as one Parquet file.
pub fn encode(batch: &RecordBatch) -> Result<Bytes> {
    let properties = WriterProperties::builder()
        .set_compression(Compression::ZSTD(ZstdLevel::default()))
        .set_max_row_group_row_count(Some(ROW_GROUP_ROWS))
        .build();
    let mut out = Vec::new();
    let mut writer = ArrowWriter::try_new(&mut out, batch.schema(), Some(properties))
        .map_err(|e| Error::storage(format!("parquet writer: {e}")))?;
    writer.write(batch).map_err(|e| Error::storage(format!("parquet write: {e}")))?;
    writer.close().map_err(|e| Error::storage(format!("parquet close: {e}")))?;
    Ok(Bytes::from(out))
}

/// The rows of a Parquet file as one batch; `location` names it in errors.
pub fn decode(bytes: Bytes, location: &str) -> Result<RecordBatch> {
    let corrupt = |e: &dyn std::fmt::Display| Error::Corrupt { location: location.to_string(), problem: e.to_string() };
    let builder = ParquetRecordBatchReaderBuilder::try_new(bytes).map_err(|e| corrupt(&e))?;
    let schema: Arc<arrow::datatypes::Schema> = builder.schema().clone();
    let reader = builder.with_batch_size(ROW_GROUP_ROWS).build().map_err(|e| corrupt(&e))?;
    let batches = reader.collect::<std::result::Result<Vec<_>, _>>().map_err(|e| corrupt(&e))?;
    arrow::compute::concat_batches(&schema, &batches).map_err(|e| corrupt(&e))
}

#[cfg(test)]
mod tests {
    use super::*;
    use arrow::array::{Int64Array, UInt64Array};

    #[test]
    fn round_trips_and_names_a_truncated_file() {
        let batch = RecordBatch::try_from_iter([
            ("a", Arc::new(Int64Array::from(vec![1, 2, 3])) as _),
            ("b", Arc::new(UInt64Array::from(vec![7, 8, 9])) as _),
        ])
        .unwrap();
        let bytes = encode(&batch).unwrap();
        assert_eq!(decode(bytes.clone(), "x").unwrap(), batch);
        let err = decode(bytes.slice(..bytes.len() / 2), "seg/data.parquet").unwrap_err().to_string();
        assert!(err.contains("seg/data.parquet"), "{err}");
    }
}
