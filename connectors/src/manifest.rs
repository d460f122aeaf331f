//! Per-collection manifests: which sealed segments (data, index files,
//! delete logs) make up the collection as of a checkpoint, and where in the
//! log replay resumes. A new manifest is written as the next version with a
//! conditional put; the newest complete version is the collection's state.

use bytes::Bytes;
use serde::{Deserialize, Serialize};
use vectorflow_core::{CollectionId, Error, Metric, Result, Timestamp};

use crate::store::{ObjectRef, ObjectStorage, version_path, versions};

/// Where recovery starts: everything at or before `ts` is in the manifest's
/// segments; replay reads each log partition from `log_positions[p]` and
/// skips this collection's records at or before `ts`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Checkpoint {
    pub ts: Timestamp,
    /// Per log partition, the first offset not covered.
    pub log_positions: Vec<u64>,
}

/// The index of one vector field: its frozen HNSW graph (the vectors are
/// the segment's data file's).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct IndexFiles {
    pub field: usize,
    pub metric: Metric,
    pub graph: ObjectRef,
    /// The `hnsw_rs` data file manifests listed before the frozen layout;
    /// such an index no longer loads and is rebuilt from the data.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data: Option<ObjectRef>,
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
    /// The rows of a growing segment as of the checkpoint: restored as the
    /// shard's growing segment (no index), not sealed.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub growing: bool,
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
                .chain(segment.indexes.iter().flat_map(|index| std::iter::once(&index.graph).chain(index.data.iter())))
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
    Ok(newest_complete_version(storage, &manifest_prefix(collection), "manifest")?.map(|(_, manifest)| manifest))
}

/// The newest versioned document under `prefix` that decodes whole.
///
/// A power cut between the local store's rename of a new version and its
/// fsync can leave that version empty or cut short. Its write never
/// returned, so nothing relied on it (the log was not truncated for it):
/// it is removed and the version before it is the current one. Any other
/// damage is an error naming the object.
pub fn newest_complete_version<T: serde::de::DeserializeOwned>(
    storage: &ObjectStorage,
    prefix: &str,
    what: &str,
) -> Result<Option<(u64, T)>> {
    let mut found = versions(storage, prefix)?;
    found.sort_by_key(|(version, _)| std::cmp::Reverse(*version));
    let newest = found.first().map(|(version, _)| *version);
    for (version, path) in found {
        let location = format!("{}/{path}", storage.description());
        let bytes = storage
            .get_opt(&path)?
            .ok_or_else(|| Error::Corrupt { location: location.clone(), problem: format!("the {what} vanished") })?;
        match serde_json::from_slice(&bytes) {
            Ok(document) => return Ok(Some((version, document))),
            Err(e) if e.is_eof() && Some(version) == newest => {
                tracing::warn!(
                    location,
                    "the newest {what} was cut short by a crash before it was synced; using the one before it"
                );
                storage.delete(&path)?;
            }
            Err(e) => return Err(Error::Corrupt { location, problem: e.to_string() }),
        }
    }
    Ok(None)
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::StorageConfig;

    fn manifest(version: u64) -> Manifest {
        Manifest {
            version,
            collection: 4,
            shards: 2,
            placement: "xxh64-v1".into(),
            checkpoint: Checkpoint { ts: version * 10, log_positions: vec![version] },
            segments: vec![Vec::new(), Vec::new()],
        }
    }

    #[test]
    fn a_newest_version_cut_short_falls_back_to_the_one_before_and_other_damage_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let storage = ObjectStorage::open(&StorageConfig::default(), dir.path()).unwrap();
        publish_manifest(&storage, &manifest(1)).unwrap();
        publish_manifest(&storage, &manifest(2)).unwrap();
        // What a power cut between the rename and the fsync can leave.
        let whole = serde_json::to_vec(&manifest(3)).unwrap();
        let torn = version_path(&manifest_prefix(4), 3);
        storage.put(&torn, Bytes::copy_from_slice(&whole[..whole.len() / 2])).unwrap();
        assert_eq!(load_manifest(&storage, 4).unwrap(), Some(manifest(2)));
        assert!(storage.get_opt(&torn).unwrap().is_none(), "the torn version is removed");
        // So the next checkpoint can publish version 3.
        publish_manifest(&storage, &manifest(3)).unwrap();
        assert_eq!(load_manifest(&storage, 4).unwrap(), Some(manifest(3)));

        // Damage that is not a cut-short write is not papered over.
        storage.put(&version_path(&manifest_prefix(4), 4), Bytes::from_static(b"{\"version\": x}")).unwrap();
        let error = load_manifest(&storage, 4).unwrap_err().to_string();
        assert!(error.contains("v00000000000000000004.json"), "{error}");
    }
}
