//! Collections: create, drop, list, describe.

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
        Ok(info(&entry))
    }

    /// Drops a collection: it is gone from the catalog at once; its objects
    /// are removed after, with no lock held.
    pub fn drop_collection(&self, name: &str) -> Result<()> {
        let _one_change_at_a_time = self.inner.catalog_changes.lock().map_err(|_| Error::Shutdown)?;
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

    pub fn describe_collection(&self, name: &str) -> Result<CollectionInfo> {
        Ok(info(&self.entry(name)?))
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

    pub(super) fn entry(&self, name: &str) -> Result<CatalogEntry> {
        let collections = self.inner.collections.read().map_err(|_| Error::Shutdown)?;
        collections
            .get(name)
            .cloned()
            .ok_or_else(|| Error::CollectionNotFound(vectorflow_core::quote(name).into_owned()))
    }
}
