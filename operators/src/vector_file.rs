//! Sealed segments' vectors kept on disk: a segment's `f32` column written
//! to a file of its own and mapped read-only, so the page cache holds the
//! values instead of the heap (as Qdrant keeps original vectors on disk
//! next to quantised ones in memory).
//!
//! A graph walk reads only the SQ8 codes, which stay on the heap; the
//! `f32` values are read for the re-rank of a walk's best rows, for exact
//! scans of selective filters, for merges and for output fields. After a
//! segment's index is built (which reads every vector), its pages are
//! taken out of the process's resident set again ([`MappedVectors::release_resident`]):
//! they stay in the page cache, and a later read maps them back without
//! touching the disk while memory allows.
//!
//! The files are a cache of the object store's segments, not a copy to
//! recover from: the folder is emptied when the engine opens, and a file
//! is removed when the last buffer over it is dropped.

use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::ptr::NonNull;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use arrow::buffer::{Buffer, ScalarBuffer};
use vectorflow_core::{Error, Result};

/// Where sealed segments put their vector files.
#[derive(Debug)]
pub struct VectorFiles {
    dir: PathBuf,
    /// Names files uniquely within this run (the folder starts empty).
    next: AtomicU64,
}

impl VectorFiles {
    /// Vector files in `dir`, which is created or emptied: files left there
    /// belong to segments of an earlier run, which recovery loads again
    /// from the object store.
    pub fn open(dir: impl Into<PathBuf>) -> Result<Arc<VectorFiles>> {
        let dir = dir.into();
        let storage = |what: &str, e: std::io::Error| Error::storage(format!("{what} {}: {e}", dir.display()));
        if dir.exists() {
            std::fs::remove_dir_all(&dir).map_err(|e| storage("emptying the vector files folder", e))?;
        }
        std::fs::create_dir_all(&dir).map_err(|e| storage("creating the vector files folder", e))?;
        Ok(Arc::new(VectorFiles { dir, next: AtomicU64::new(0) }))
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// `values` written to a new file and mapped.
    pub fn store(&self, values: &[f32]) -> Result<MappedVectors> {
        if values.is_empty() {
            return Err(Error::storage("no vectors to keep on disk"));
        }
        let path = self.dir.join(format!("{:08}.f32", self.next.fetch_add(1, Ordering::Relaxed)));
        let written = write_values(&path, values).and_then(|file| map(&file));
        match written {
            Ok(map) => Ok(MappedVectors { file: Arc::new(MappedFile { map, path }), values: values.len() }),
            Err(e) => {
                let _ = std::fs::remove_file(&path);
                Err(Error::storage(format!("keeping vectors in {}: {e}", path.display())))
            }
        }
    }
}

fn write_values(path: &Path, values: &[f32]) -> std::io::Result<File> {
    let mut file = std::fs::OpenOptions::new().read(true).write(true).create_new(true).open(path)?;
    // Native byte order: the file is read back only by this process.
    let bytes: &[u8] = as_bytes(values);
    file.write_all(bytes)?;
    Ok(file)
}

/// The bytes of `values` as they lie in memory.
fn as_bytes(values: &[f32]) -> &[u8] {
    // SAFETY: any initialised `f32` is 4 initialised bytes, `u8` has no
    // alignment requirement, and the length covers exactly the slice.
    unsafe { std::slice::from_raw_parts(values.as_ptr().cast::<u8>(), std::mem::size_of_val(values)) }
}

fn map(file: &File) -> std::io::Result<memmap2::Mmap> {
    // SAFETY: the file is this process's own, created anew above and never
    // written again; nothing else truncates it while the map lives (the
    // folder is the engine's, emptied at open).
    let map = unsafe { memmap2::MmapOptions::new().map(file)? };
    // Reads are scattered (a re-rank reads a few rows of a segment):
    // read-ahead would fault in pages nobody asked for.
    map.advise(memmap2::Advice::Random)?;
    Ok(map)
}

/// One vector file, mapped; removed when dropped.
#[derive(Debug)]
struct MappedFile {
    map: memmap2::Mmap,
    path: PathBuf,
}

impl Drop for MappedFile {
    fn drop(&mut self) {
        if let Err(e) = std::fs::remove_file(&self.path) {
            tracing::warn!("removing the vector file {}: {e}", self.path.display());
        }
    }
}

/// A segment column's vectors in a mapped file.
#[derive(Debug, Clone)]
pub struct MappedVectors {
    file: Arc<MappedFile>,
    values: usize,
}

impl MappedVectors {
    /// The values as an Arrow buffer over the mapping (it keeps the file mapped).
    pub fn buffer(&self) -> ScalarBuffer<f32> {
        let bytes = self.file.map.len();
        let Some(pointer) = NonNull::new(self.file.map.as_ptr().cast_mut()) else {
            return ScalarBuffer::from(Vec::new());
        };
        // SAFETY: the mapping is `bytes` long, readable and page aligned
        // (so aligned for `f32`), and lives as long as the `Arc` handed
        // over as the buffer's owner; it is never written.
        let buffer = unsafe { Buffer::from_custom_allocation(pointer, bytes, self.file.clone()) };
        ScalarBuffer::new(buffer, 0, self.values)
    }

    /// Takes the file's pages out of this process's resident set: they
    /// stay in the page cache, and the next read maps them again.
    pub fn release_resident(&self) {
        // SAFETY: the mapping is a read-only, shared map of a file: dropping
        // its pages loses nothing, a later read faults them back in from
        // the page cache (or the file).
        if let Err(e) = unsafe { self.file.map.unchecked_advise(memmap2::UncheckedAdvice::DontNeed) } {
            tracing::debug!("releasing the vector file {}: {e}", self.file.path.display());
        }
    }

    #[cfg(test)]
    fn path(&self) -> &Path {
        &self.file.path
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stored_vectors_read_back_equal_and_their_file_goes_with_the_last_buffer() {
        let dir = tempfile::tempdir().unwrap();
        let files = VectorFiles::open(dir.path().join("vectors")).unwrap();
        let values: Vec<f32> = (0..10_000).map(|i| i as f32 * 0.5 - 7.0).collect();
        let mapped = files.store(&values).unwrap();
        let path = mapped.path().to_path_buf();
        let buffer = mapped.buffer();
        assert_eq!(&buffer[..], &values[..]);
        mapped.release_resident();
        assert_eq!(&buffer[..], &values[..], "released pages read back the same");
        drop(mapped);
        assert!(path.exists(), "the buffer still maps it");
        let slice = buffer.slice(100, 50);
        drop(buffer);
        assert_eq!(&slice[..], &values[100..150]);
        drop(slice);
        assert!(!path.exists(), "removed with its last buffer");
    }

    #[test]
    fn opening_empties_the_folder_of_an_earlier_run() {
        let dir = tempfile::tempdir().unwrap();
        let folder = dir.path().join("vectors");
        std::fs::create_dir_all(&folder).unwrap();
        std::fs::write(folder.join("00000000.f32"), [0u8; 8]).unwrap();
        let files = VectorFiles::open(&folder).unwrap();
        assert_eq!(std::fs::read_dir(files.dir()).unwrap().count(), 0);
        assert!(files.store(&[]).is_err(), "nothing to map: the caller keeps them in memory");
    }
}
