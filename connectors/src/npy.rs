//! NumPy `.npy` arrays (v1/v2/v3, C order, little-endian `f2`/`f4`/`i4`):
//! read as `f32`/`i32` matrices, and written (`f2` vectors, `f4`/`i4`
//! ground truths) for dataset samples and synthetic datasets.

use std::path::Path;

use half::f16;
use vectorflow_core::{Error, Result};

/// A row-major matrix read from a `.npy` file.
#[derive(Debug, Clone, PartialEq)]
pub struct Matrix<T> {
    pub rows: usize,
    pub cols: usize,
    pub data: Vec<T>,
}

impl<T> Matrix<T> {
    pub fn row(&self, i: usize) -> &[T] {
        &self.data[i * self.cols..(i + 1) * self.cols]
    }
}

fn corrupt(path: &Path, problem: impl Into<String>) -> Error {
    Error::Corrupt { location: path.display().to_string(), problem: problem.into() }
}

struct Header {
    descr: String,
    rows: usize,
    cols: usize,
    data_start: usize,
}

fn parse_header(path: &Path, bytes: &[u8]) -> Result<Header> {
    if bytes.len() < 10 || &bytes[..6] != b"\x93NUMPY" {
        return Err(corrupt(path, "not a .npy file (bad magic)"));
    }
    let (len, start) = match bytes[6] {
        1 => (u16::from_le_bytes([bytes[8], bytes[9]]) as usize, 10),
        2 | 3 if bytes.len() >= 12 => (u32::from_le_bytes([bytes[8], bytes[9], bytes[10], bytes[11]]) as usize, 12),
        v => return Err(corrupt(path, format!("unsupported .npy version {v}"))),
    };
    let header = bytes.get(start..start + len).ok_or_else(|| corrupt(path, "truncated header"))?;
    let header = std::str::from_utf8(header).map_err(|_| corrupt(path, "header is not text"))?;
    let field = |key: &str| -> Result<&str> {
        let at = header.find(key).ok_or_else(|| corrupt(path, format!("header has no {key}")))?;
        Ok(header[at + key.len()..].trim_start_matches([' ', ':']))
    };
    let descr = field("'descr'")?;
    let descr = descr.trim_start_matches('\'').split('\'').next().unwrap_or_default().to_string();
    if field("'fortran_order'")?.starts_with("True") {
        return Err(corrupt(path, "Fortran order is not supported"));
    }
    let shape = field("'shape'")?;
    let shape = shape.trim_start_matches('(').split(')').next().unwrap_or_default();
    let dims: Vec<usize> = shape
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|s| s.parse().map_err(|_| corrupt(path, format!("bad shape entry `{s}`"))))
        .collect::<Result<_>>()?;
    let (rows, cols) = match dims.as_slice() {
        [r] => (*r, 1),
        [r, c] => (*r, *c),
        _ => return Err(corrupt(path, format!("expected a 1-d or 2-d array, shape is {dims:?}"))),
    };
    Ok(Header { descr, rows, cols, data_start: start + len })
}

fn read_values<T>(path: &Path, decode: impl Fn(&str, &[u8]) -> Option<Vec<T>>) -> Result<Matrix<T>> {
    let bytes = std::fs::read(path)?;
    let header = parse_header(path, &bytes)?;
    let data = decode(&header.descr, &bytes[header.data_start..])
        .ok_or_else(|| corrupt(path, format!("unsupported dtype `{}`", header.descr)))?;
    if data.len() != header.rows * header.cols {
        return Err(corrupt(path, format!("holds {} values, shape says {}", data.len(), header.rows * header.cols)));
    }
    Ok(Matrix { rows: header.rows, cols: header.cols, data })
}

/// Reads a float matrix (`f2` widened to `f32`, or `f4`).
pub fn read_f32(path: &Path) -> Result<Matrix<f32>> {
    read_values(path, |descr, data| match descr {
        "<f2" => Some(data.chunks_exact(2).map(|b| f16::from_le_bytes([b[0], b[1]]).to_f32()).collect()),
        "<f4" => Some(data.chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect()),
        _ => None,
    })
}

/// Reads an `i4` matrix.
pub fn read_i32(path: &Path) -> Result<Matrix<i32>> {
    read_values(path, |descr, data| match descr {
        "<i4" => Some(data.chunks_exact(4).map(|b| i32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect()),
        _ => None,
    })
}

/// Writes `data` (`rows * cols` values, row-major) as a `.npy` v1.0 array of
/// dtype `descr`, streaming through a buffer: a million-row base set is not
/// copied into a second, encoded buffer first.
fn write_values<T: Copy, const N: usize>(
    path: &Path,
    descr: &str,
    rows: usize,
    cols: usize,
    data: &[T],
    encode: impl Fn(T) -> [u8; N],
) -> Result<()> {
    use std::io::Write;

    if data.len() != rows * cols {
        return Err(Error::argument(
            "data",
            format!("holds {} values, shape ({rows}, {cols}) needs {}", data.len(), rows * cols),
        ));
    }
    let mut header = format!("{{'descr': '{descr}', 'fortran_order': False, 'shape': ({rows}, {cols}), }}");
    // Pad so the data starts on a 64-byte boundary, ending the header with a newline.
    while (10 + header.len() + 1) % 64 != 0 {
        header.push(' ');
    }
    header.push('\n');
    let header_len =
        u16::try_from(header.len()).map_err(|_| Error::argument("shape", "too long for a .npy v1.0 header"))?;
    let mut out = std::io::BufWriter::new(std::fs::File::create(path)?);
    out.write_all(b"\x93NUMPY\x01\x00")?;
    out.write_all(&header_len.to_le_bytes())?;
    out.write_all(header.as_bytes())?;
    for x in data {
        out.write_all(&encode(*x))?;
    }
    out.flush()?;
    Ok(())
}

/// Writes a float matrix as `f2` (the datasets' own format).
pub fn write_f16(path: &Path, rows: usize, cols: usize, data: &[f32]) -> Result<()> {
    write_values(path, "<f2", rows, cols, data, |x| f16::from_f32(x).to_le_bytes())
}

/// Writes a float matrix as `f4` (ground-truth similarities).
pub fn write_f32(path: &Path, rows: usize, cols: usize, data: &[f32]) -> Result<()> {
    write_values(path, "<f4", rows, cols, data, f32::to_le_bytes)
}

/// Writes an `i4` matrix (ground-truth row ids).
pub fn write_i32(path: &Path, rows: usize, cols: usize, data: &[i32]) -> Result<()> {
    write_values(path, "<i4", rows, cols, data, i32::to_le_bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn f16_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m.npy");
        write_f16(&path, 2, 3, &[0.5, -1.0, 2.0, 0.25, 0.0, 3.0]).unwrap();
        let m = read_f32(&path).unwrap();
        assert_eq!((m.rows, m.cols), (2, 3));
        assert_eq!(m.row(1), &[0.25, 0.0, 3.0]);
        assert!(read_i32(&path).is_err());
    }

    #[test]
    fn f32_and_i32_round_trip_and_a_wrong_length_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let floats = dir.path().join("f.npy");
        write_f32(&floats, 2, 2, &[0.1, -2.5, f32::NEG_INFINITY, 1e-7]).unwrap();
        assert_eq!(
            read_f32(&floats).unwrap(),
            Matrix { rows: 2, cols: 2, data: vec![0.1, -2.5, f32::NEG_INFINITY, 1e-7] }
        );
        let ints = dir.path().join("i.npy");
        write_i32(&ints, 1, 3, &[7, -1, i32::MAX]).unwrap();
        assert_eq!(read_i32(&ints).unwrap(), Matrix { rows: 1, cols: 3, data: vec![7, -1, i32::MAX] });
        assert!(read_f32(&ints).is_err(), "an i4 array is not read as floats");
        assert!(write_i32(&ints, 2, 3, &[1, 2, 3]).is_err());
    }
}
