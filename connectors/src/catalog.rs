//! The durable catalog: collections, their ids and schemas, and the
//! aliases that name them, kept in the object store as versioned documents
//! (`catalog/v{N}.json`). A change
//! writes version N+1 with a conditional put, so two writers cannot both
//! publish over the same version, and a reader always sees a whole version.

use std::collections::BTreeMap;
use std::sync::Mutex;

use bytes::Bytes;
use serde::{Deserialize, Serialize};
use vectorflow_core::{CollectionId, CollectionSchema, Error, Result, Timestamp};

use crate::manifest::newest_complete_version;
use crate::store::{ObjectStorage, version_path, versions};

/// One collection as the catalog holds it, or one partition of a
/// collection: a partition is an entry of its own (its own id, shards,
/// segments, merges and manifests), so a read of some partitions never
/// touches the others'.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CatalogEntry {
    pub id: CollectionId,
    pub schema: CollectionSchema,
    pub created_ts: Timestamp,
    /// Set for a partition (absent in documents written before partitions).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub partition_of: Option<PartitionOf>,
}

/// What a partition's entry belongs to.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PartitionOf {
    pub collection: String,
    pub partition: String,
    /// When it was dropped: reads at or after it leave it out, reads
    /// before it (time travel) still see its rows.
    #[serde(default)]
    pub dropped_ts: Option<Timestamp>,
}

impl CatalogEntry {
    /// Whether this is a partition of `collection` that reads at `ts` cover.
    pub fn is_partition_at(&self, collection: &str, ts: Timestamp) -> bool {
        self.partition_of.as_ref().is_some_and(|of| {
            of.collection == collection && self.created_ts <= ts && of.dropped_ts.is_none_or(|dropped| ts < dropped)
        })
    }

    /// Whether this is a partition of `collection` not dropped.
    pub fn is_live_partition(&self, collection: &str) -> bool {
        self.partition_of.as_ref().is_some_and(|of| of.collection == collection && of.dropped_ts.is_none())
    }
}

/// One version of the catalog document.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
struct CatalogDocument {
    /// Collection ids are never reused, so log records of a dropped
    /// collection can never be taken for a new one's.
    next_collection_id: CollectionId,
    collections: Vec<CatalogEntry>,
    /// Alias → the name of the collection it stands for (absent in
    /// documents written before aliases existed).
    #[serde(default)]
    aliases: BTreeMap<String, String>,
    /// Kafka sinks by name (absent in documents written before sinks).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    sinks: BTreeMap<String, SinkDefinition>,
}

/// A standing query whose changes a server writes to a Kafka topic, kept
/// in the catalog so it resumes after a restart (see the engine's
/// `sinks` module for the records and how a sink resumes).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SinkDefinition {
    pub name: String,
    /// The collection's name (an alias is resolved when the sink is made).
    pub collection: String,
    pub topic: String,
    /// The topic's partition the sink writes every record to, so they
    /// keep their order.
    pub partition: i32,
    /// The vector field searched (`None`: the collection's only one).
    #[serde(default)]
    pub field: Option<String>,
    /// Query vectors; none: a changefeed of the rows `filter` passes.
    #[serde(default)]
    pub queries: Vec<Vec<f32>>,
    #[serde(default)]
    pub k: usize,
    #[serde(default)]
    pub filter: Option<String>,
    #[serde(default)]
    pub output_fields: Vec<String>,
    /// The time of the sink's first answer.
    pub start_ts: Timestamp,
    /// A progress record is written after this long without a change.
    pub progress_every_ms: u64,
    /// Names this definition in the records it writes (its start time and a
    /// checksum of the query), so a sink made again under the same name
    /// never takes a former one's records for its own.
    pub incarnation: String,
}

impl SinkDefinition {
    /// The incarnation of a sink with this query and start.
    pub fn compute_incarnation(&self) -> String {
        let query = serde_json::json!([
            self.collection,
            self.field,
            self.queries,
            self.k,
            self.filter,
            self.output_fields,
            self.start_ts
        ]);
        format!("{:x}-{:08x}", self.start_ts, crc32fast::hash(query.to_string().as_bytes()))
    }
}

const PREFIX: &str = "catalog";
/// The object holding the deployment's id (see [`CatalogStore::deployment_id`]).
const DEPLOYMENT: &str = "deployment";
/// Catalog versions kept behind the newest.
const KEPT_VERSIONS: u64 = 3;

/// Collections by name, stored durably in the object store.
pub struct CatalogStore {
    storage: ObjectStorage,
    /// The newest version and its document; changes are serialised here.
    current: Mutex<(u64, CatalogDocument)>,
}

impl CatalogStore {
    pub fn open(storage: ObjectStorage) -> Result<CatalogStore> {
        let (version, document) = newest_complete_version(&storage, PREFIX, "catalog version")?
            .unwrap_or((0, CatalogDocument { next_collection_id: 1, ..CatalogDocument::default() }));
        Ok(CatalogStore { storage, current: Mutex::new((version, document)) })
    }

    /// This deployment's id: a random name written once into the object
    /// store (`create`: made if missing; else `None` when missing). Records
    /// kept outside the store (the Kafka bindings topic) carry it, so
    /// deployments sharing brokers, or a store wiped and started again,
    /// never take each other's records.
    pub fn deployment_id(storage: &ObjectStorage, create: bool) -> Result<Option<String>> {
        let read = |bytes: Bytes| {
            let id = String::from_utf8(bytes.to_vec())
                .ok()
                .filter(|id| !id.is_empty() && id.len() <= 64 && id.bytes().all(|b| b.is_ascii_alphanumeric()));
            id.ok_or_else(|| Error::Corrupt { location: DEPLOYMENT.into(), problem: "not a deployment id".into() })
        };
        if let Some(bytes) = storage.get_opt(DEPLOYMENT)? {
            return read(bytes).map(Some);
        }
        if !create {
            return Ok(None);
        }
        let made = format!("{:016x}", rand::random::<u64>());
        // Two primaries starting at once: one id wins, both read it back.
        storage.put_if_absent(DEPLOYMENT, Bytes::from(made))?;
        let bytes = storage.get_opt(DEPLOYMENT)?.ok_or_else(|| Error::storage("the deployment id vanished"))?;
        read(bytes).map(Some)
    }

    /// Reads the newest version another process (a primary) published;
    /// true if it is newer than the one held.
    pub fn refresh(&self) -> Result<bool> {
        let Some((version, document)) = newest_complete_version(&self.storage, PREFIX, "catalog version")? else {
            return Ok(false);
        };
        let mut current = self.current.lock().map_err(|_| Error::storage("catalog lock poisoned"))?;
        if version <= current.0 {
            return Ok(false);
        }
        *current = (version, document);
        Ok(true)
    }

    /// The version of the catalog this store holds.
    pub fn version(&self) -> u64 {
        self.current.lock().map_or(0, |current| current.0)
    }

    /// The id the next collection gets: every id below it was given out.
    pub fn next_id(&self) -> Result<CollectionId> {
        let current = self.current.lock().map_err(|_| Error::storage("catalog lock poisoned"))?;
        Ok(current.1.next_collection_id)
    }

    /// Every collection.
    pub fn load(&self) -> Result<Vec<CatalogEntry>> {
        let current = self.current.lock().map_err(|_| Error::storage("catalog lock poisoned"))?;
        Ok(current.1.collections.clone())
    }

    /// Every alias, with the name of its collection.
    pub fn aliases(&self) -> Result<BTreeMap<String, String>> {
        let current = self.current.lock().map_err(|_| Error::storage("catalog lock poisoned"))?;
        Ok(current.1.aliases.clone())
    }

    /// Adds a collection under a fresh id; fails if the name is taken (by
    /// a collection or an alias).
    pub fn create(&self, schema: CollectionSchema, created_ts: Timestamp) -> Result<CatalogEntry> {
        self.create_entry(schema, created_ts, None)
    }

    /// Adds a collection, or (with `partition_of`) a partition's entry.
    pub fn create_entry(
        &self,
        schema: CollectionSchema,
        created_ts: Timestamp,
        partition_of: Option<PartitionOf>,
    ) -> Result<CatalogEntry> {
        let mut entry = None;
        self.change(|document| {
            if document.collections.iter().any(|c| c.schema.name == schema.name) {
                return Err(Error::CollectionExists(schema.name.clone()));
            }
            if document.aliases.contains_key(&schema.name) {
                return Err(Error::argument(
                    "collection_name",
                    format!("`{}` is an alias; a collection cannot take its name", schema.name),
                ));
            }
            let id = document.next_collection_id;
            document.next_collection_id =
                id.checked_add(1).ok_or_else(|| Error::storage("catalog: collection ids exhausted"))?;
            let created = CatalogEntry { id, schema: schema.clone(), created_ts, partition_of: partition_of.clone() };
            document.collections.push(created.clone());
            entry = Some(created);
            Ok(())
        })?;
        entry.ok_or_else(|| Error::storage("catalog: the new entry was not recorded"))
    }

    /// Drops a collection; fails while an alias names it (as Milvus does:
    /// an alias never dangles).
    pub fn drop_collection(&self, name: &str) -> Result<()> {
        self.change(|document| {
            let aliases: Vec<&str> =
                document.aliases.iter().filter(|(_, target)| *target == name).map(|(a, _)| a.as_str()).collect();
            if !aliases.is_empty() {
                return Err(Error::argument(
                    "collection_name",
                    format!("collection `{name}` has aliases {aliases:?}: drop or alter them first"),
                ));
            }
            let sinks: Vec<&str> =
                document.sinks.values().filter(|sink| sink.collection == name).map(|s| s.name.as_str()).collect();
            if !sinks.is_empty() {
                return Err(Error::argument(
                    "collection_name",
                    format!("collection `{name}` has Kafka sinks {sinks:?}: drop them first"),
                ));
            }
            let before = document.collections.len();
            document.collections.retain(|c| c.schema.name != name);
            if document.collections.len() == before {
                return Err(Error::CollectionNotFound(name.to_string()));
            }
            Ok(())
        })
    }

    /// Marks the partition entry `name` dropped at `ts`; its entry stays
    /// (reads before `ts` still see its rows) until its collection goes.
    pub fn drop_partition(&self, name: &str, ts: Timestamp) -> Result<CatalogEntry> {
        let mut dropped = None;
        self.change(|document| {
            let entry = document
                .collections
                .iter_mut()
                .find(|c| c.schema.name == name && c.partition_of.as_ref().is_some_and(|of| of.dropped_ts.is_none()))
                .ok_or_else(|| Error::CollectionNotFound(name.to_string()))?;
            if let Some(of) = entry.partition_of.as_mut() {
                of.dropped_ts = Some(ts);
            }
            dropped = Some(entry.clone());
            Ok(())
        })?;
        dropped.ok_or_else(|| Error::storage("catalog: the dropped partition was not recorded"))
    }

    /// Points `alias` at `collection`: a new alias (`replace` false) or an
    /// existing one moved, in one catalog version (`replace` true).
    pub fn set_alias(&self, alias: &str, collection: &str, replace: bool) -> Result<()> {
        self.change(|document| {
            if !document.collections.iter().any(|c| c.schema.name == collection) {
                return Err(Error::CollectionNotFound(collection.to_string()));
            }
            if document.collections.iter().any(|c| c.schema.name == alias) {
                return Err(Error::argument("alias", format!("`{alias}` is the name of a collection")));
            }
            match (document.aliases.get(alias), replace) {
                (Some(target), false) => {
                    return Err(Error::argument("alias", format!("alias `{alias}` already names `{target}`")));
                }
                (None, true) => return Err(Error::AliasNotFound(alias.to_string())),
                _ => {}
            }
            document.aliases.insert(alias.to_string(), collection.to_string());
            Ok(())
        })
    }

    pub fn drop_alias(&self, alias: &str) -> Result<()> {
        self.change(|document| match document.aliases.remove(alias) {
            Some(_) => Ok(()),
            None => Err(Error::AliasNotFound(alias.to_string())),
        })
    }

    /// Every Kafka sink.
    pub fn sinks(&self) -> Result<Vec<SinkDefinition>> {
        let current = self.current.lock().map_err(|_| Error::storage("catalog lock poisoned"))?;
        Ok(current.1.sinks.values().cloned().collect())
    }

    /// Adds a Kafka sink; fails if the name is taken or its collection is not in the catalog.
    pub fn create_sink(&self, sink: SinkDefinition) -> Result<()> {
        self.change(|document| {
            if document.sinks.contains_key(&sink.name) {
                return Err(Error::argument("name", format!("a sink named `{}` exists", sink.name)));
            }
            if !document.collections.iter().any(|c| c.schema.name == sink.collection) {
                return Err(Error::CollectionNotFound(sink.collection.clone()));
            }
            document.sinks.insert(sink.name.clone(), sink);
            Ok(())
        })
    }

    pub fn drop_sink(&self, name: &str) -> Result<SinkDefinition> {
        let mut dropped = None;
        self.change(|document| {
            dropped = document.sinks.remove(name);
            match dropped {
                Some(_) => Ok(()),
                None => Err(Error::argument("name", format!("no sink named `{name}`"))),
            }
        })?;
        dropped.ok_or_else(|| Error::storage("catalog: the dropped sink was not recorded"))
    }

    /// Applies `edit` to a copy of the newest version and publishes it as the next.
    fn change(&self, edit: impl FnOnce(&mut CatalogDocument) -> Result<()>) -> Result<()> {
        let mut current = self.current.lock().map_err(|_| Error::storage("catalog lock poisoned"))?;
        let mut document = current.1.clone();
        edit(&mut document)?;
        let version = current.0 + 1;
        let bytes = serde_json::to_vec_pretty(&document).map_err(|e| Error::storage(format!("catalog: {e}")))?;
        if !self.storage.put_if_absent(&version_path(PREFIX, version), Bytes::from(bytes))? {
            return Err(Error::storage(format!(
                "catalog version {version} was published by another process: restart to read it"
            )));
        }
        *current = (version, document);
        for (old, path) in versions(&self.storage, PREFIX)? {
            if old + KEPT_VERSIONS <= version
                && let Err(e) = self.storage.delete(&path)
            {
                tracing::warn!("removing an old catalog version: {e}");
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::StorageConfig;
    use vectorflow_core::{FieldSchema, Metric};

    fn schema(name: &str) -> CollectionSchema {
        CollectionSchema::new(
            name,
            vec![FieldSchema::int64_primary("id", false), FieldSchema::vector("v", 2, Metric::L2)],
        )
    }

    #[test]
    fn collections_survive_reopen_and_ids_are_never_reused() {
        let dir = tempfile::tempdir().unwrap();
        let storage = || ObjectStorage::open(&StorageConfig::default(), dir.path()).unwrap();
        {
            let catalog = CatalogStore::open(storage()).unwrap();
            assert_eq!(catalog.create(schema("a"), 5).unwrap().id, 1);
            assert!(matches!(catalog.create(schema("a"), 6), Err(Error::CollectionExists(_))));
            assert_eq!(catalog.create(schema("b"), 7).unwrap().id, 2);
            catalog.drop_collection("b").unwrap();
        }
        let catalog = CatalogStore::open(storage()).unwrap();
        let names: Vec<String> = catalog.load().unwrap().into_iter().map(|e| e.schema.name).collect();
        assert_eq!(names, vec!["a".to_string()]);
        assert_eq!(catalog.create(schema("b"), 8).unwrap().id, 3);
        assert!(matches!(catalog.drop_collection("zz"), Err(Error::CollectionNotFound(_))));
    }

    #[test]
    fn aliases_name_one_collection_survive_reopen_and_never_dangle() {
        let dir = tempfile::tempdir().unwrap();
        let storage = || ObjectStorage::open(&StorageConfig::default(), dir.path()).unwrap();
        {
            let catalog = CatalogStore::open(storage()).unwrap();
            catalog.create(schema("blue"), 1).unwrap();
            catalog.create(schema("green"), 2).unwrap();
            catalog.set_alias("live", "blue", false).unwrap();
            assert!(matches!(catalog.set_alias("live", "green", false), Err(Error::InvalidArgument { .. })));
            assert!(matches!(catalog.set_alias("next", "green", true), Err(Error::AliasNotFound(_))));
            assert!(matches!(catalog.set_alias("blue", "green", false), Err(Error::InvalidArgument { .. })));
            assert!(matches!(catalog.set_alias("x", "nope", false), Err(Error::CollectionNotFound(_))));
            assert!(matches!(catalog.create(schema("live"), 3), Err(Error::InvalidArgument { .. })));
            catalog.set_alias("live", "green", true).unwrap();
            assert!(matches!(catalog.drop_collection("green"), Err(Error::InvalidArgument { .. })));
            catalog.drop_collection("blue").unwrap();
        }
        let catalog = CatalogStore::open(storage()).unwrap();
        assert_eq!(catalog.aliases().unwrap().into_iter().collect::<Vec<_>>(), vec![("live".into(), "green".into())]);
        catalog.drop_alias("live").unwrap();
        assert!(matches!(catalog.drop_alias("live"), Err(Error::AliasNotFound(_))));
        catalog.drop_collection("green").unwrap();
    }
}
