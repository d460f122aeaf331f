//! The object store that holds everything durable but the log: the catalog,
//! manifests, sealed segments, delete logs and index files.
//!
//! `object_store` is async; the engine is not (timely workers are threads),
//! so [`ObjectStorage`] runs the store on a small runtime of its own and
//! waits for each call on the calling thread. Calls never enter that runtime
//! from the caller's thread, so they are safe from inside another tokio
//! runtime's blocking pool too.
//!
//! Every write is durable when it returns: S3 acknowledges a put once it is
//! stored, and on the local filesystem [`Durability`] fsyncs the file and
//! the directories leading to it (`object_store`'s local store does not).
//! So an object is always durable before a manifest or catalog version
//! that lists it is written, and the log is truncated only below a
//! published, durable checkpoint.

use std::path::Path as FsPath;
use std::sync::Arc;

use bytes::Bytes;
use futures::TryStreamExt;
use object_store::aws::AmazonS3Builder;
use object_store::local::LocalFileSystem;
use object_store::path::Path;
use object_store::{ObjectStore, ObjectStoreExt, PutMode, PutOptions, PutPayload};
use serde::{Deserialize, Serialize};
use vectorflow_core::{Error, Result};

/// Where the object store is and how to reach it.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct StorageConfig {
    /// `s3://bucket/prefix` for S3 or an S3-compatible store; empty for the
    /// local filesystem under `<data_dir>/store`.
    pub url: String,
    /// S3 endpoint (for S3-compatible stores); `AWS_ENDPOINT` otherwise.
    pub endpoint: Option<String>,
    /// S3 region; `AWS_REGION` / `AWS_DEFAULT_REGION` otherwise.
    pub region: Option<String>,
    /// Credentials; `AWS_ACCESS_KEY_ID` / `AWS_SECRET_ACCESS_KEY` otherwise.
    pub access_key_id: Option<String>,
    pub secret_access_key: Option<String>,
    /// Allow `http://` endpoints (a local S3-compatible server).
    pub allow_http: bool,
}

/// An object's path, size and CRC-32, as a manifest records it, so a
/// truncated or altered object is caught before anything decodes it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ObjectRef {
    pub path: String,
    pub size: u64,
    pub crc32: u32,
}

/// The store's runtime. Dropped without waiting, so the last handle may go
/// away anywhere, even inside another runtime's task.
struct StoreRuntime(Option<tokio::runtime::Runtime>);

impl Drop for StoreRuntime {
    fn drop(&mut self) {
        if let Some(runtime) = self.0.take() {
            runtime.shutdown_background();
        }
    }
}

/// Makes an object the store has just written survive a power cut.
pub trait Durability: Send + Sync {
    /// Called after every successful write of `path`, before the write
    /// returns to its caller.
    fn sync(&self, path: &str) -> std::io::Result<()>;
}

/// A store whose acknowledged writes are already durable (S3 and
/// S3-compatible servers).
struct DurableOnAcknowledge;

impl Durability for DurableOnAcknowledge {
    fn sync(&self, _path: &str) -> std::io::Result<()> {
        Ok(())
    }
}

/// The local filesystem: fsync the file, then every directory from its
/// parent up to the store's root (a new file's name, and any directory the
/// write created, live in their parent directory).
struct LocalFsync {
    root: std::path::PathBuf,
}

impl Durability for LocalFsync {
    fn sync(&self, path: &str) -> std::io::Result<()> {
        let file = self.root.join(path);
        std::fs::File::open(&file)?.sync_all()?;
        let mut directory = file.parent();
        while let Some(dir) = directory {
            std::fs::File::open(dir)?.sync_all()?;
            if dir == self.root {
                break;
            }
            directory = dir.parent();
        }
        Ok(())
    }
}

/// A synchronous handle on the object store; cheap to clone.
#[derive(Clone)]
pub struct ObjectStorage {
    store: Arc<dyn ObjectStore>,
    durability: Arc<dyn Durability>,
    runtime: Arc<StoreRuntime>,
    /// What the store is, for messages (`file:///…` or `s3://…`).
    description: String,
}

impl std::fmt::Debug for ObjectStorage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ObjectStorage").field("store", &self.description).finish()
    }
}

fn storage_error(what: &str, path: &str, e: impl std::fmt::Display) -> Error {
    Error::storage(format!("object store: {what} `{path}`: {e}"))
}

impl ObjectStorage {
    /// Opens the store `config` names, or `<data_dir>/store` on the local filesystem.
    pub fn open(config: &StorageConfig, data_dir: &FsPath) -> Result<ObjectStorage> {
        let url = config.url.trim();
        type Opened = (Arc<dyn ObjectStore>, Arc<dyn Durability>, String);
        let (store, durability, description): Opened = if url.is_empty() || url.starts_with("file://") {
            let dir = match url.strip_prefix("file://") {
                Some(path) if !path.is_empty() => std::path::PathBuf::from(path),
                _ => data_dir.join("store"),
            };
            std::fs::create_dir_all(&dir)?;
            let local = LocalFileSystem::new_with_prefix(&dir)
                .map_err(|e| Error::argument("storage.url", format!("{}: {e}", dir.display())))?;
            let root = std::fs::canonicalize(&dir)?;
            // The root's own entry (if `create_dir_all` just made it) lives in its parent.
            if let Some(parent) = root.parent() {
                std::fs::File::open(parent)?.sync_all()?;
            }
            (Arc::new(local), Arc::new(LocalFsync { root }), format!("file://{}", dir.display()))
        } else if url.starts_with("s3://") {
            let mut builder = AmazonS3Builder::from_env().with_url(url).with_allow_http(config.allow_http);
            if let Some(endpoint) = &config.endpoint {
                builder = builder.with_endpoint(endpoint);
            }
            if let Some(region) = &config.region {
                builder = builder.with_region(region);
            }
            if let Some(key) = &config.access_key_id {
                builder = builder.with_access_key_id(key);
            }
            if let Some(secret) = &config.secret_access_key {
                builder = builder.with_secret_access_key(secret);
            }
            let s3 = builder.build().map_err(|e| Error::argument("storage.url", format!("`{url}`: {e}")))?;
            (Arc::new(s3), Arc::new(DurableOnAcknowledge), url.to_string())
        } else {
            return Err(Error::argument("storage.url", format!("`{url}`: expected s3://bucket/prefix or file:///dir")));
        };
        ObjectStorage::with_store(store, durability, description)
    }

    /// A handle on any `object_store` implementation, made durable by
    /// `durability` (tests use it to simulate power loss).
    pub fn with_store(
        store: Arc<dyn ObjectStore>,
        durability: Arc<dyn Durability>,
        description: impl Into<String>,
    ) -> Result<ObjectStorage> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("object-store")
            .enable_all()
            .build()
            .map_err(|e| Error::storage(format!("object store runtime: {e}")))?;
        Ok(ObjectStorage {
            store,
            durability,
            runtime: Arc::new(StoreRuntime(Some(runtime))),
            description: description.into(),
        })
    }

    /// Makes a written object durable.
    fn sync(&self, path: &str) -> Result<()> {
        self.durability.sync(path).map_err(|e| storage_error("syncing", path, e))
    }

    pub fn description(&self) -> &str {
        &self.description
    }

    /// Runs `future` on the store's runtime and waits for it here.
    fn run<T: Send + 'static>(
        &self,
        future: impl std::future::Future<Output = object_store::Result<T>> + Send + 'static,
    ) -> object_store::Result<T> {
        let (done, result) = std::sync::mpsc::sync_channel(1);
        if let Some(runtime) = &self.runtime.0 {
            runtime.spawn(async move {
                let _ = done.send(future.await);
            });
        }
        result.recv().unwrap_or_else(|_| {
            Err(object_store::Error::Generic { store: "vectorflow", source: "object store runtime stopped".into() })
        })
    }

    /// Writes `bytes` at `path`, replacing what is there; returns its reference.
    pub fn put(&self, path: &str, bytes: Bytes) -> Result<ObjectRef> {
        let reference = ObjectRef { path: path.to_string(), size: bytes.len() as u64, crc32: crc32fast::hash(&bytes) };
        let store = self.store.clone();
        let location = Path::from(path);
        self.run(async move { store.put(&location, PutPayload::from(bytes)).await })
            .map_err(|e| storage_error("writing", path, e))?;
        self.sync(path)?;
        Ok(reference)
    }

    /// Writes `bytes` at `path` only if nothing is there (a conditional put:
    /// `If-None-Match: *` on S3, an exclusive create on a filesystem).
    /// Returns `false` when the path was taken.
    pub fn put_if_absent(&self, path: &str, bytes: Bytes) -> Result<bool> {
        let store = self.store.clone();
        let location = Path::from(path);
        let options = PutOptions { mode: PutMode::Create, ..Default::default() };
        match self.run(async move { store.put_opts(&location, PutPayload::from(bytes), options).await }) {
            Ok(_) => {
                self.sync(path)?;
                Ok(true)
            }
            Err(object_store::Error::AlreadyExists { .. } | object_store::Error::Precondition { .. }) => Ok(false),
            Err(e) => Err(storage_error("publishing", path, e)),
        }
    }

    /// The object at `path`, or `None` if there is none.
    pub fn get_opt(&self, path: &str) -> Result<Option<Bytes>> {
        let store = self.store.clone();
        let location = Path::from(path);
        match self.run(async move { store.get(&location).await?.bytes().await }) {
            Ok(bytes) => Ok(Some(bytes)),
            Err(object_store::Error::NotFound { .. }) => Ok(None),
            Err(e) => Err(storage_error("reading", path, e)),
        }
    }

    /// The object `reference` names, checked against its size and CRC-32.
    pub fn get_checked(&self, reference: &ObjectRef) -> Result<Bytes> {
        let path = &reference.path;
        let corrupt = |problem: String| Error::Corrupt { location: format!("{}/{path}", self.description), problem };
        let bytes = self.get_opt(path)?.ok_or_else(|| corrupt("the object is missing".into()))?;
        if bytes.len() as u64 != reference.size {
            return Err(corrupt(format!("{} bytes, the manifest says {}", bytes.len(), reference.size)));
        }
        let crc = crc32fast::hash(&bytes);
        if crc != reference.crc32 {
            return Err(corrupt(format!("CRC-32 {crc:08x}, the manifest says {:08x}", reference.crc32)));
        }
        Ok(bytes)
    }

    /// Every object under `prefix` (a folder, no trailing slash), with its size.
    pub fn list(&self, prefix: &str) -> Result<Vec<(String, u64)>> {
        let store = self.store.clone();
        let location = Path::from(prefix);
        let listed = self.run(async move {
            let objects: Vec<object_store::ObjectMeta> = store.list(Some(&location)).try_collect().await?;
            Ok(objects)
        });
        let objects = listed.map_err(|e| storage_error("listing", prefix, e))?;
        Ok(objects.into_iter().map(|meta| (meta.location.to_string(), meta.size)).collect())
    }

    /// Removes the object at `path`; a missing object is not an error.
    pub fn delete(&self, path: &str) -> Result<()> {
        let store = self.store.clone();
        let location = Path::from(path);
        match self.run(async move { store.delete(&location).await }) {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(e) => Err(storage_error("deleting", path, e)),
        }
    }

    /// Bytes of every object under `prefix`.
    pub fn bytes_under(&self, prefix: &str) -> Result<u64> {
        Ok(self.list(prefix)?.iter().map(|(_, size)| size).sum())
    }
}

/// Every versioned object `{prefix}/v{N:020}.json`.
pub fn versions(storage: &ObjectStorage, prefix: &str) -> Result<Vec<(u64, String)>> {
    Ok(storage
        .list(prefix)?
        .into_iter()
        .filter_map(|(path, _)| {
            let name = path.rsplit('/').next()?;
            let version = name.strip_prefix('v')?.strip_suffix(".json")?.parse().ok()?;
            Some((version, path))
        })
        .collect())
}

/// The path of version `version` under `prefix`.
pub fn version_path(prefix: &str, version: u64) -> String {
    format!("{prefix}/v{version:020}.json")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn conditional_put_refuses_a_taken_path_and_checks_catch_truncation() {
        let dir = tempfile::tempdir().unwrap();
        let storage = ObjectStorage::open(&StorageConfig::default(), dir.path()).unwrap();
        assert!(storage.put_if_absent("a/v1.json", Bytes::from_static(b"one")).unwrap());
        assert!(!storage.put_if_absent("a/v1.json", Bytes::from_static(b"two")).unwrap());
        assert_eq!(storage.get_opt("a/v1.json").unwrap().unwrap(), Bytes::from_static(b"one"));
        assert!(storage.get_opt("a/missing").unwrap().is_none());

        let reference = storage.put("seg/data", Bytes::from_static(b"0123456789")).unwrap();
        assert_eq!(storage.get_checked(&reference).unwrap().len(), 10);
        std::fs::write(dir.path().join("store/seg/data"), b"01234").unwrap();
        let err = storage.get_checked(&reference).unwrap_err().to_string();
        assert!(err.contains("seg/data") && err.contains("5 bytes"), "{err}");
        storage.delete("seg/data").unwrap();
        let err = storage.get_checked(&reference).unwrap_err().to_string();
        assert!(err.contains("seg/data") && err.contains("missing"), "{err}");

        storage.put(&version_path("m", 3), Bytes::from_static(b"{}")).unwrap();
        storage.put(&version_path("m", 12), Bytes::from_static(b"{}")).unwrap();
        assert_eq!(versions(&storage, "m").unwrap().into_iter().map(|(v, _)| v).max(), Some(12));
        assert_eq!(storage.bytes_under("m").unwrap(), 4);
    }
}
