//! Per-collection manifests: which sealed segments (data, index files,
//! delete logs) make up the collection as of a checkpoint, and where in the
//! log replay resumes. A new manifest is written as the next version with a
//! conditional put; the newest complete version is the collection's state.

use bytes::Bytes;
use serde::{Deserialize, Serialize};
use vectorflow_core::{CollectionId, Error, Metric, Result, Timestamp};

use crate::store::{ObjectRef, ObjectStorage, latest_version, version_path, versions};

/// Where recovery starts: everything at or before `ts` is in the manifest's
/// segments; replay reads each log partition from `log_positions[p]` and
/// skips this collection's records at or before `ts`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Checkpoint {
    pub ts: Timestamp,
    /// Per log partition, the first offset not covered.
    pub log_positions: Vec<u64>,
}

/// The index file pair `hnsw_rs` dumps for one vector field.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct IndexFiles {
    pub field: usize,
    pub metric: Metric,
    pub graph: ObjectRef,
    pub data: ObjectRef,
}

/// One sealed segment as stored.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SegmentFiles {
    /// Unique across the store's life (its objects live under it).
    pub uid: String,
    pub rows: usize,
    /// Parquet: the collection's columns plus `_insert_ts` and the version id.
    pub data: ObjectRef,
    /// One per vector field; missing ones are rebuilt from the data at load.
    pub indexes: Vec<IndexFiles>,
    /// Parquet `(row, delete_ts)` of the rows retired by the checkpoint.
    pub deletes: Option<ObjectRef>,
    /// Rows with a `delete_ts` in `deletes`.
    pub deleted: usize,
}

/// A collection's state in the object store.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Manifest {
    pub version: u64,
    pub collection: CollectionId,
    /// Shards (one per worker) the segments are cut into.
    pub shards: usize,
    /// How keys were placed on shards (`routing::PLACEMENT` in the engine);
    /// empty in manifests written before placement was recorded.
    #[serde(default)]
    pub placement: String,
    pub checkpoint: Checkpoint,
    /// Sealed segments per shard.
    pub segments: Vec<Vec<SegmentFiles>>,
}

impl Manifest {
    /// Every object the manifest references.
    pub fn objects(&self) -> impl Iterator<Item = &ObjectRef> {
        self.segments.iter().flatten().flat_map(|segment| {
            std::iter::once(&segment.data)
                .chain(segment.indexes.iter().flat_map(|index| [&index.graph, &index.data]))
                .chain(segment.deletes.iter())
        })
    }
}

/// The folder of a collection's objects.
pub fn collection_prefix(collection: CollectionId) -> String {
    format!("collections/{collection}")
}

fn manifest_prefix(collection: CollectionId) -> String {
    format!("{}/manifest", collection_prefix(collection))
}

/// Manifest versions kept behind the newest (a reader that listed an older
/// version still finds it for a while).
const KEPT_VERSIONS: u64 = 3;

/// The newest manifest of `collection`, if any was published.
pub fn load_manifest(storage: &ObjectStorage, collection: CollectionId) -> Result<Option<Manifest>> {
    let Some((_, path)) = latest_version(storage, &manifest_prefix(collection))? else { return Ok(None) };
    let location = format!("{}/{path}", storage.description());
    let bytes = storage
        .get_opt(&path)?
        .ok_or_else(|| Error::Corrupt { location: location.clone(), problem: "the manifest vanished".into() })?;
    let manifest: Manifest =
        serde_json::from_slice(&bytes).map_err(|e| Error::Corrupt { location, problem: e.to_string() })?;
    Ok(Some(manifest))
}

/// Publishes `manifest` (whose `version` must be one above the newest) and
/// removes versions older than the few kept. Fails if another writer took
/// the version.
pub fn publish_manifest(storage: &ObjectStorage, manifest: &Manifest) -> Result<()> {
    let prefix = manifest_prefix(manifest.collection);
    let bytes = serde_json::to_vec(manifest).map_err(|e| Error::storage(format!("encoding a manifest: {e}")))?;
    if !storage.put_if_absent(&version_path(&prefix, manifest.version), Bytes::from(bytes))? {
        return Err(Error::storage(format!(
            "manifest version {} of collection {} was published by another writer",
            manifest.version, manifest.collection
        )));
    }
    for (old, path) in versions(storage, &prefix)? {
        if old + KEPT_VERSIONS <= manifest.version
            && let Err(e) = storage.delete(&path)
        {
            tracing::warn!("removing an old manifest: {e}");
        }
    }
    Ok(())
}

/// Removes every object of a dropped collection.
pub fn delete_collection_objects(storage: &ObjectStorage, collection: CollectionId) -> Result<()> {
    for (path, _) in storage.list(&collection_prefix(collection))? {
        storage.delete(&path)?;
    }
    Ok(())
}
