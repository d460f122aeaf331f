//! Collections (create, drop, list, describe) and their aliases.

use super::*;

impl Engine {
    /// Creates a collection. Creates and drops run one at a time (on
    /// `catalog_changes`), but the name map reads and writes use is locked
    /// only to look up and to insert, never across the object-store writes
    /// and Kafka admin calls in between.
    pub fn create_collection(&self, schema: CollectionSchema) -> Result<CollectionInfo> {
        schema.validate()?;
        let _one_change_at_a_time = self.inner.catalog_changes.lock().map_err(|_| Error::Shutdown)?;
        {
            let collections = self.inner.collections.read().map_err(|_| Error::Shutdown)?;
            if collections.contains_key(&schema.name) {
                return Err(Error::CollectionExists(schema.name));
            }
            let max_collections = self.inner.config.limits.max_collections;
            if collections.len() >= max_collections {
                return Err(Error::exhausted(
                    "max_collections",
                    format!("the server holds {} collections, its limit; drop one first", collections.len()),
                ));
            }
        }
        let created_ts = self.inner.shared.log.tso().allocate(1);
        let entry = self.inner.catalog_store.create(schema, created_ts)?;
        let started = (|| {
            let manifest = initial_manifest(&entry, self.inner.shared.log.as_ref(), self.inner.config.workers)?;
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
        self.inner.shared.catalog_version.fetch_add(1, Ordering::AcqRel);
        self.inner.collections.write().map_err(|_| Error::Shutdown)?.insert(entry.schema.name.clone(), entry.clone());
        Ok(info(&entry, Vec::new()))
    }

    /// Drops a collection: it is gone from the catalog at once; its objects
    /// are removed after, with no lock held. `name` must be the
    /// collection's own name, not an alias, and no alias may name it.
    pub fn drop_collection(&self, name: &str) -> Result<()> {
        let _one_change_at_a_time = self.inner.catalog_changes.lock().map_err(|_| Error::Shutdown)?;
        if let Some(target) = self.alias_target(name)? {
            return Err(Error::argument(
                "collection_name",
                format!("`{name}` is an alias of `{target}`: drop a collection by its own name"),
            ));
        }
        let entry = self.entry(name)?;
        self.inner.catalog_store.drop_collection(name)?;
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
        if let Err(e) = delete_collection_objects(&self.inner.storage, entry.id) {
            tracing::warn!(collection = name, "removing the dropped collection's objects: {e}");
        }
        Ok(())
    }

    pub fn list_collections(&self) -> Vec<String> {
        let mut names: Vec<String> =
            self.inner.collections.read().map(|c| c.keys().cloned().collect()).unwrap_or_default();
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
        let _one_change_at_a_time = self.inner.catalog_changes.lock().map_err(|_| Error::Shutdown)?;
        self.inner.catalog_store.set_alias(alias, collection, replace)?;
        self.inner.aliases.write().map_err(|_| Error::Shutdown)?.insert(alias.to_string(), collection.to_string());
        Ok(())
    }

    pub fn drop_alias(&self, alias: &str) -> Result<()> {
        let _one_change_at_a_time = self.inner.catalog_changes.lock().map_err(|_| Error::Shutdown)?;
        self.inner.catalog_store.drop_alias(alias)?;
        self.inner.aliases.write().map_err(|_| Error::Shutdown)?.remove(alias);
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
