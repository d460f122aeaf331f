//! Collections (create, drop, list, describe), their partitions and their
//! aliases.

use super::*;
use crate::routing::key_partition_of;
use vectorflow_connectors::catalog::PartitionOf;

/// The partition every collection has: the collection's own entry.
pub const DEFAULT_PARTITION: &str = "_default";

/// The entries named `{collection}.…`: its partitions' (dropped ones too),
/// found as one range of the ordered name map rather than by a scan.
pub(super) fn partition_entries<'a>(
    collections: &'a BTreeMap<String, CatalogEntry>,
    collection: &str,
) -> impl Iterator<Item = &'a CatalogEntry> {
    let prefix = format!("{collection}.");
    collections.range(prefix.clone()..).take_while(move |(name, _)| name.starts_with(&prefix)).map(|(_, e)| e)
}

/// The name of a partition key's partition `i` (0 is `_default`).
fn key_partition_name(i: usize) -> String {
    if i == 0 { DEFAULT_PARTITION.to_string() } else { format!("{DEFAULT_PARTITION}_{i}") }
}

fn partition_not_found(partition: &str) -> Error {
    Error::argument("partition_name", format!("partition `{}` not found", vectorflow_core::quote(partition)))
}

impl Engine {
    /// Creates a collection. Creates and drops run one at a time (on
    /// `catalog_changes`), but the name map reads and writes use is locked
    /// only to look up and to insert, never across the object-store writes
    /// and Kafka admin calls in between.
    pub fn create_collection(&self, schema: CollectionSchema) -> Result<CollectionInfo> {
        schema.validate()?;
        let _one_change_at_a_time = self.catalog_change()?;
        let entry = self.create_entry(schema, None)?;
        // A partition key's values hash to `_default` (the collection's own
        // entry) and `_default_1` .. `_default_{n-1}`.
        if let Some((_, partitions)) = entry.schema.partition_key() {
            for i in 1..partitions {
                if let Err(e) = self.add_partition(&entry, &key_partition_name(i)) {
                    tracing::error!(collection = entry.schema.name, "creating a key partition: {e}");
                    return Err(e);
                }
            }
        }
        self.announce_catalog();
        Ok(info(&entry, Vec::new()))
    }

    /// Adds a collection's (or a partition's) entry: catalog, manifest, log
    /// and dataflow. The caller holds `catalog_changes`.
    fn create_entry(&self, schema: CollectionSchema, partition_of: Option<PartitionOf>) -> Result<CatalogEntry> {
        {
            let collections = self.inner.collections.read().map_err(|_| Error::Shutdown)?;
            if collections.contains_key(&schema.name) {
                return Err(Error::CollectionExists(schema.name));
            }
            let max_collections = self.inner.config.limits.max_collections;
            if collections.len() >= max_collections {
                return Err(Error::exhausted(
                    "max_collections",
                    format!(
                        "the server holds {} collections and partitions, its limit; drop one first",
                        collections.len()
                    ),
                ));
            }
        }
        let created_ts = self.inner.shared.log.tso().allocate(1);
        let entry = self.inner.catalog_store.create_entry(schema, created_ts, partition_of)?;
        let started = (|| {
            let manifest = initial_manifest(&entry, self.inner.shared.log.as_ref(), self.inner.shared.workers)?;
            publish_manifest(&self.inner.storage, &manifest)?;
            self.inner.shared.log.follow(
                entry.id,
                Arc::new(entry.schema.clone()),
                &manifest.checkpoint.log_positions,
            )?;
            Ok(manifest)
        })();
        let manifest = match started {
            Ok(manifest) => manifest,
            Err(e) => {
                // Take the name back out of the catalog, so the create can be retried.
                if let Err(undo) = self.inner.catalog_store.drop_collection(&entry.schema.name) {
                    tracing::error!(collection = entry.schema.name, "undoing a failed create: {undo}");
                }
                return Err(e);
            }
        };
        if let Ok(mut manifests) = self.inner.manifests.lock() {
            manifests.insert(entry.id, manifest);
        }
        if let Ok(mut schemas) = self.inner.shared.schemas.write() {
            schemas.insert(entry.id, Arc::new(entry.schema.clone()));
        }
        self.inner.shared.catalog_next_id.fetch_max(u64::from(entry.id) + 1, Ordering::AcqRel);
        self.inner.collections.write().map_err(|_| Error::Shutdown)?.insert(entry.schema.name.clone(), entry.clone());
        // After the entry is in: a subscription that sees the version read
        // the catalog with it (see `Subscriber::follow_partitions`).
        self.inner.shared.catalog_version.fetch_add(1, Ordering::AcqRel);
        Ok(entry)
    }

    /// Creates partition `partition` of `collection` (Milvus's
    /// `create_partition`): rows written to it are searched with the
    /// collection, or alone when a read names it. `_default` always exists.
    pub fn create_partition(&self, collection: &str, partition: &str) -> Result<()> {
        vectorflow_core::check_partition_name(partition)?;
        let _one_change_at_a_time = self.catalog_change()?;
        let parent = self.collection_entry(collection)?;
        if partition == DEFAULT_PARTITION || self.live_partition(&parent.schema.name, partition)?.is_some() {
            return Err(Error::argument(
                "partition_name",
                format!("partition `{partition}` already exists in collection `{}`", parent.schema.name),
            ));
        }
        if parent.schema.partition_key().is_some() {
            return Err(Error::argument(
                "partition_name",
                format!("collection `{}` has a partition key: its rows choose their partitions", parent.schema.name),
            ));
        }
        let max = self.inner.config.limits.max_partitions;
        if self.partitions_of(&parent.schema.name)?.len() >= max {
            return Err(Error::exhausted(
                "max_partitions",
                format!("collection `{}` has {max} partitions, the limit", parent.schema.name),
            ));
        }
        self.add_partition(&parent, partition)?;
        self.announce_catalog();
        Ok(())
    }

    /// Adds partition `partition`'s entry to `parent`. A dropped
    /// partition's entry stays for time travel, so each entry gets a name
    /// of its own (users' names hold no dot).
    fn add_partition(&self, parent: &CatalogEntry, partition: &str) -> Result<CatalogEntry> {
        let mut schema = parent.schema.clone();
        schema.name = format!("{}.{partition}.{}", parent.schema.name, self.inner.shared.log.tso().allocate(1));
        let of =
            PartitionOf { collection: parent.schema.name.clone(), partition: partition.to_string(), dropped_ts: None };
        self.create_entry(schema, Some(of))
    }

    /// The ids of a partition-key collection's partitions, by key partition number.
    pub(super) fn key_partition_ids(&self, entry: &CatalogEntry, partitions: usize) -> Result<Vec<CollectionId>> {
        let live = self.partitions_of(&entry.schema.name)?;
        (0..partitions)
            .map(|i| {
                if i == 0 {
                    return Ok(entry.id);
                }
                let name = key_partition_name(i);
                live.iter()
                    .find(|p| p.partition_of.as_ref().is_some_and(|of| of.partition == name))
                    .map(|p| p.id)
                    .ok_or_else(|| {
                        Error::storage(format!("collection `{}` lacks key partition `{name}`", entry.schema.name))
                    })
            })
            .collect()
    }

    /// Drops partition `partition` at a timestamp, which it returns: reads
    /// at or after it leave the partition out; reads `as_of` before it
    /// still see its rows. Its storage goes with its collection.
    pub fn drop_partition(&self, collection: &str, partition: &str) -> Result<Timestamp> {
        let _one_change_at_a_time = self.catalog_change()?;
        let parent = self.collection_entry(collection)?;
        if partition == DEFAULT_PARTITION || parent.schema.partition_key().is_some() {
            return Err(Error::argument(
                "partition_name",
                "the `_default` partition, and those of a partition key, cannot be dropped",
            ));
        }
        let entry =
            self.live_partition(&parent.schema.name, partition)?.ok_or_else(|| partition_not_found(partition))?;
        let ts = {
            // Subscriptions deliver nothing from before the drop's time is
            // taken until the catalog shows the drop.
            let _under_way = PartitionDropUnderWay::start(&self.inner.partition_drops);
            let ts = self.inner.shared.log.tso().allocate(1);
            let dropped = self.inner.catalog_store.drop_partition(&entry.schema.name, ts)?;
            self.inner.collections.write().map_err(|_| Error::Shutdown)?.insert(dropped.schema.name.clone(), dropped);
            self.inner.shared.catalog_version.fetch_add(1, Ordering::AcqRel);
            ts
        };
        self.announce_catalog();
        Ok(ts)
    }

    /// The collection's partitions, `_default` first, then by name.
    pub fn list_partitions(&self, collection: &str) -> Result<Vec<String>> {
        let parent = self.collection_entry(collection)?;
        let mut names: Vec<String> = self
            .partitions_of(&parent.schema.name)?
            .into_iter()
            .filter_map(|e| e.partition_of.map(|of| of.partition))
            .collect();
        names.sort();
        names.insert(0, DEFAULT_PARTITION.to_string());
        Ok(names)
    }

    pub fn has_partition(&self, collection: &str, partition: &str) -> Result<bool> {
        let parent = self.collection_entry(collection)?;
        Ok(partition == DEFAULT_PARTITION || self.live_partition(&parent.schema.name, partition)?.is_some())
    }

    /// The name every write and read takes to reach one partition:
    /// `_default` is the collection itself.
    pub fn partition(&self, collection: &str, partition: &str) -> Result<String> {
        let parent = self.collection_entry(collection)?;
        if parent.schema.partition_key().is_some() {
            return Err(Error::argument(
                "partition_name",
                format!("collection `{}` has a partition key: rows go to their key's partition", parent.schema.name),
            ));
        }
        if partition == DEFAULT_PARTITION {
            return Ok(parent.schema.name);
        }
        let entry =
            self.live_partition(&parent.schema.name, partition)?.ok_or_else(|| partition_not_found(partition))?;
        Ok(entry.schema.name)
    }

    /// The partitions a Strong read of `collection` with `filter` covers
    /// now (a partition key's filter prunes the rest), by name.
    pub fn read_partitions(&self, collection: &str, filter: Option<&str>) -> Result<Vec<String>> {
        let entry = self.collection_entry(collection)?;
        let filter = self.checked_filter(entry.id, &entry.schema, filter)?;
        let ids = self.read_targets(&entry, self.inner.shared.log.tso().next_possible(), &[], filter.as_deref())?;
        let collections = self.inner.collections.read().map_err(|_| Error::Shutdown)?;
        Ok(ids
            .into_iter()
            .map(|id| match collections.values().find(|e| e.id == id).and_then(|e| e.partition_of.as_ref()) {
                Some(of) => of.partition.clone(),
                None => DEFAULT_PARTITION.to_string(),
            })
            .collect())
    }

    /// A collection's own entry (through an alias too), not a partition's.
    fn collection_entry(&self, name: &str) -> Result<CatalogEntry> {
        let entry = self.entry(name)?;
        match &entry.partition_of {
            Some(of) => Err(Error::argument(
                "collection_name",
                format!("`{name}` is partition `{}` of `{}`, not a collection", of.partition, of.collection),
            )),
            None => Ok(entry),
        }
    }

    /// The partitions of `collection` not dropped (`_default` aside).
    pub(super) fn partitions_of(&self, collection: &str) -> Result<Vec<CatalogEntry>> {
        let collections = self.inner.collections.read().map_err(|_| Error::Shutdown)?;
        Ok(partition_entries(&collections, collection).filter(|e| e.is_live_partition(collection)).cloned().collect())
    }

    fn live_partition(&self, collection: &str, partition: &str) -> Result<Option<CatalogEntry>> {
        Ok(self
            .partitions_of(collection)?
            .into_iter()
            .find(|e| e.partition_of.as_ref().is_some_and(|of| of.partition == partition)))
    }

    /// The ids a read of `entry` at `read_ts` covers: a partition's own; a
    /// collection's and those of its partitions that exist at `read_ts`,
    /// or only those `partitions` names.
    pub(super) fn read_targets(
        &self,
        entry: &CatalogEntry,
        read_ts: Timestamp,
        partitions: &[String],
        filter: Option<&str>,
    ) -> Result<Vec<CollectionId>> {
        if entry.partition_of.is_some() {
            return Ok(vec![entry.id]);
        }
        if let Some((key, count)) = entry.schema.partition_key() {
            if !partitions.is_empty() {
                return Err(Error::argument(
                    "partition_names",
                    "a collection with a partition key is read by filtering on the key, not by partition names",
                ));
            }
            let ids = self.key_partition_ids(entry, count)?;
            // A filter that pins the key's values reads only their partitions.
            let pinned = match filter {
                Some(text) => self
                    .inner
                    .shared
                    .filters
                    .get(entry.id, &entry.schema, text)?
                    .pinned_values(&entry.schema.fields[key].name),
                None => None,
            };
            return Ok(match pinned {
                Some(values) => {
                    let mut chosen: Vec<usize> = values.iter().map(|v| key_partition_of(v, count)).collect();
                    // Records produced straight to the collection's topic
                    // land in `_default` whatever their key: it is read too.
                    if self.inner.shared.log.takes_outside_records() {
                        chosen.push(0);
                    }
                    chosen.sort_unstable();
                    chosen.dedup();
                    chosen.into_iter().map(|i| ids[i]).collect()
                }
                None => ids,
            });
        }
        let collections = self.inner.collections.read().map_err(|_| Error::Shutdown)?;
        let at_read: Vec<&CatalogEntry> = partition_entries(&collections, &entry.schema.name)
            .filter(|e| e.is_partition_at(&entry.schema.name, read_ts))
            .collect();
        if partitions.is_empty() {
            return Ok(std::iter::once(entry.id).chain(at_read.iter().map(|e| e.id)).collect());
        }
        let mut ids = Vec::with_capacity(partitions.len());
        for name in partitions {
            let id = if name == DEFAULT_PARTITION {
                entry.id
            } else {
                at_read
                    .iter()
                    .find(|e| e.partition_of.as_ref().is_some_and(|of| &of.partition == name))
                    .map(|e| e.id)
                    .ok_or_else(|| partition_not_found(name))?
            };
            if !ids.contains(&id) {
                ids.push(id);
            }
        }
        Ok(ids)
    }

    /// Drops a collection: it is gone from the catalog at once; its objects
    /// are removed after, with no lock held. `name` must be the
    /// collection's own name, not an alias, and no alias may name it.
    pub fn drop_collection(&self, name: &str) -> Result<()> {
        let _one_change_at_a_time = self.catalog_change()?;
        if let Some(target) = self.alias_target(name)? {
            return Err(Error::argument(
                "collection_name",
                format!("`{name}` is an alias of `{target}`: drop a collection by its own name"),
            ));
        }
        let entry = self.collection_entry(name)?;
        self.inner.catalog_store.drop_collection(name)?;
        let partitions: Vec<CatalogEntry> = {
            let collections = self.inner.collections.read().map_err(|_| Error::Shutdown)?;
            partition_entries(&collections, &entry.schema.name)
                .filter(|e| e.partition_of.as_ref().is_some_and(|of| of.collection == entry.schema.name))
                .cloned()
                .collect()
        };
        for partition in &partitions {
            if let Err(e) = self.inner.catalog_store.drop_collection(&partition.schema.name) {
                tracing::warn!(partition = partition.schema.name, "dropping a dropped collection's partition: {e}");
            }
        }
        for dropped in std::iter::once(&entry).chain(&partitions) {
            self.forget_entry(dropped)?;
        }
        self.announce_catalog();
        Ok(())
    }

    /// Removes a dropped entry from the engine and its objects from the store.
    fn forget_entry(&self, entry: &CatalogEntry) -> Result<()> {
        self.forget_locally(entry)?;
        if let Err(e) = delete_collection_objects(&self.inner.storage, entry.id) {
            tracing::warn!(collection = entry.schema.name, "removing the dropped collection's objects: {e}");
        }
        Ok(())
    }

    /// Removes a dropped entry from the engine (not from the store).
    pub(super) fn forget_locally(&self, entry: &CatalogEntry) -> Result<()> {
        let name = entry.schema.name.as_str();
        self.inner.collections.write().map_err(|_| Error::Shutdown)?.remove(name);
        if let Ok(mut schemas) = self.inner.shared.schemas.write() {
            schemas.remove(&entry.id);
        }
        if let Ok(mut manifests) = self.inner.manifests.lock() {
            manifests.remove(&entry.id);
        }
        if let Ok(mut failed) = self.inner.shared.failed.lock() {
            failed.remove(&entry.id);
        }
        if let Err(e) = self.inner.shared.log.unfollow(entry.id) {
            tracing::warn!(collection = name, "forgetting the dropped collection's offset bindings: {e}");
        }
        self.inner.shared.catalog_version.fetch_add(1, Ordering::AcqRel);
        Ok(())
    }

    /// Collections by name (their partitions are not collections).
    pub fn list_collections(&self) -> Vec<String> {
        let mut names: Vec<String> = self
            .inner
            .collections
            .read()
            .map(|c| c.values().filter(|e| e.partition_of.is_none()).map(|e| e.schema.name.clone()).collect())
            .unwrap_or_default();
        names.sort();
        names
    }

    /// The collection `name` names (its own name or an alias).
    pub fn describe_collection(&self, name: &str) -> Result<CollectionInfo> {
        let entry = self.entry(name)?;
        let aliases = self.list_aliases(Some(&entry.schema.name))?;
        Ok(info(&entry, aliases))
    }

    /// Names `collection` also `alias`. Aliases are unique across
    /// collections and collection names; a collection may have several.
    pub fn create_alias(&self, alias: &str, collection: &str) -> Result<()> {
        self.set_alias(alias, collection, false)
    }

    /// Points an existing alias at another collection, atomically: a read
    /// or write through the alias resolves to the old collection or the
    /// new one, never to neither (blue/green swaps).
    pub fn alter_alias(&self, alias: &str, collection: &str) -> Result<()> {
        self.set_alias(alias, collection, true)
    }

    fn set_alias(&self, alias: &str, collection: &str, replace: bool) -> Result<()> {
        vectorflow_core::check_alias(alias)?;
        let _one_change_at_a_time = self.catalog_change()?;
        self.inner.catalog_store.set_alias(alias, collection, replace)?;
        self.inner.aliases.write().map_err(|_| Error::Shutdown)?.insert(alias.to_string(), collection.to_string());
        self.announce_catalog();
        Ok(())
    }

    pub fn drop_alias(&self, alias: &str) -> Result<()> {
        let _one_change_at_a_time = self.catalog_change()?;
        self.inner.catalog_store.drop_alias(alias)?;
        self.inner.aliases.write().map_err(|_| Error::Shutdown)?.remove(alias);
        self.announce_catalog();
        Ok(())
    }

    /// The name of the collection `alias` names.
    pub fn describe_alias(&self, alias: &str) -> Result<String> {
        self.alias_target(alias)?.ok_or_else(|| Error::AliasNotFound(vectorflow_core::quote(alias).into_owned()))
    }

    /// The aliases of `collection` (a collection's own name; all aliases
    /// when `None`), sorted.
    pub fn list_aliases(&self, collection: Option<&str>) -> Result<Vec<String>> {
        if let Some(name) = collection {
            self.entry(name)?;
        }
        let aliases = self.inner.aliases.read().map_err(|_| Error::Shutdown)?;
        let mut names: Vec<String> = aliases
            .iter()
            .filter(|(_, target)| collection.is_none_or(|c| c == target.as_str()))
            .map(|(alias, _)| alias.clone())
            .collect();
        names.sort();
        Ok(names)
    }

    fn alias_target(&self, name: &str) -> Result<Option<String>> {
        Ok(self.inner.aliases.read().map_err(|_| Error::Shutdown)?.get(name).cloned())
    }

    /// The collection's entry, unless an error while applying a change
    /// stopped it (fail-stop): then `CollectionFailed` with the cause.
    pub(super) fn running_entry(&self, name: &str) -> Result<CatalogEntry> {
        let entry = self.entry(name)?;
        self.check_running(&entry)?;
        Ok(entry)
    }

    pub(super) fn check_running(&self, entry: &CatalogEntry) -> Result<()> {
        match self.inner.shared.failure(entry.id) {
            Some(cause) => Err(Error::CollectionFailed { collection: entry.schema.name.clone(), cause }),
            None => Ok(()),
        }
    }

    /// Collections stopped by an apply error, with the cause.
    pub fn failed_collections(&self) -> Vec<(String, String)> {
        let failed = self.inner.shared.failed.lock().map(|f| f.clone()).unwrap_or_default();
        let collections = self.inner.collections.read().map(|c| c.clone()).unwrap_or_default();
        let mut named: Vec<(String, String)> = collections
            .into_values()
            .filter_map(|entry| failed.get(&entry.id).map(|cause| (entry.schema.name, cause.clone())))
            .collect();
        named.sort();
        named
    }

    /// The collection `name` names: a collection's own name, else an alias.
    pub(super) fn entry(&self, name: &str) -> Result<CatalogEntry> {
        let collections = self.inner.collections.read().map_err(|_| Error::Shutdown)?;
        let found = match collections.get(name) {
            Some(entry) => Some(entry),
            None => self.alias_target(name)?.and_then(|target| collections.get(&target)),
        };
        found.cloned().ok_or_else(|| Error::CollectionNotFound(vectorflow_core::quote(name).into_owned()))
    }
}

/// Counts a partition drop as under way while it lives.
struct PartitionDropUnderWay<'a>(&'a std::sync::atomic::AtomicUsize);

impl<'a> PartitionDropUnderWay<'a> {
    fn start(drops: &'a std::sync::atomic::AtomicUsize) -> Self {
        drops.fetch_add(1, Ordering::AcqRel);
        PartitionDropUnderWay(drops)
    }
}

impl Drop for PartitionDropUnderWay<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}
