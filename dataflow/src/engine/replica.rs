//! A read replica's side of the engine: what it refuses (every change: the
//! primary makes them) and how it follows the primary's catalog.
//!
//! A replica opens like a primary (it loads the published segments as of
//! each manifest's checkpoint and reads the topics from there), but its
//! Kafka log takes every record's time from the primary's bindings (see
//! `vectorflow_connectors::kafka`), so its answers at a time equal the
//! primary's. It never writes to the log or the object store: its own
//! sealed segments stay in memory.

use super::*;

/// How often a replica looks for collections the primary created or dropped.
pub(super) const CATALOG_FOLLOW_EVERY: Duration = Duration::from_secs(1);

impl Engine {
    /// Whether this engine is a read replica.
    pub fn is_replica(&self) -> bool {
        self.inner.config.role == Role::Replica
    }

    /// Refuses a change on a read replica, naming what was refused.
    pub(super) fn writable(&self, change: &str) -> Result<()> {
        if self.is_replica() {
            return Err(Error::ReadOnly(format!("this server is a read replica: send {change} to the primary")));
        }
        Ok(())
    }

    /// The lock catalog changes hold, one change at a time (none on a
    /// replica). In a cluster the change starts from the newest catalog
    /// any process wrote.
    pub(super) fn catalog_change(&self) -> Result<std::sync::MutexGuard<'_, ()>> {
        self.writable("catalog changes (collections, partitions, aliases)")?;
        let guard = self.inner.catalog_changes.lock().map_err(|_| Error::Shutdown)?;
        if self.in_cluster() {
            self.follow_catalog()?;
        }
        Ok(guard)
    }

    /// A replica, or a process of a cluster: takes in the collections,
    /// partitions and aliases another server created, dropped or changed
    /// since the catalog was last read.
    pub(super) fn follow_catalog(&self) -> Result<()> {
        if self.inner.catalog_store.refresh()? {
            self.take_in_catalog()?;
        }
        Ok(())
    }

    /// A replica, or a process of a cluster: makes the engine's collections
    /// those of the catalog it holds.
    pub(super) fn take_in_catalog(&self) -> Result<()> {
        let entries = self.inner.catalog_store.load()?;
        let aliases = self.inner.catalog_store.aliases()?;
        let known: HashMap<CollectionId, CatalogEntry> =
            self.inner.collections.read().map_err(|_| Error::Shutdown)?.values().map(|e| (e.id, e.clone())).collect();
        let listed: HashSet<CollectionId> = entries.iter().map(|e| e.id).collect();
        for gone in known.values().filter(|e| !listed.contains(&e.id)) {
            tracing::info!(collection = gone.schema.name, "another server dropped a collection");
            self.forget_locally(gone)?;
        }
        for entry in entries {
            match known.get(&entry.id) {
                None => self.follow_new_entry(entry)?,
                // A partition dropped at a time: reads after it leave it out.
                Some(held) if held.partition_of != entry.partition_of => {
                    self.inner
                        .collections
                        .write()
                        .map_err(|_| Error::Shutdown)?
                        .insert(entry.schema.name.clone(), entry);
                }
                Some(_) => {}
            }
        }
        *self.inner.aliases.write().map_err(|_| Error::Shutdown)? = aliases.into_iter().collect();
        let next_id = self.inner.catalog_store.next_id()?;
        self.inner.shared.log.catalog_listed(&listed, next_id);
        let shared = &self.inner.shared;
        shared.catalog_next_id.fetch_max(u64::from(next_id), Ordering::AcqRel);
        shared.catalog_taken.fetch_max(self.inner.catalog_store.version(), Ordering::AcqRel);
        Ok(())
    }

    /// A collection (or partition) another server created after this one
    /// opened: its topic is read from the start, with the bindings kept
    /// since it opened (every one of this collection's).
    fn follow_new_entry(&self, entry: CatalogEntry) -> Result<()> {
        tracing::info!(collection = entry.schema.name, "following a collection another server created");
        let inner = &self.inner;
        inner.shared.log.tso().observe(entry.created_ts);
        let manifest = initial_manifest(&entry, inner.shared.log.as_ref(), inner.shared.workers)?;
        inner.shared.log.follow(entry.id, Arc::new(entry.schema.clone()), &manifest.checkpoint.log_positions)?;
        if let Ok(mut manifests) = inner.manifests.lock() {
            manifests.insert(entry.id, manifest);
        }
        if let Ok(mut schemas) = inner.shared.schemas.write() {
            schemas.insert(entry.id, Arc::new(entry.schema.clone()));
        }
        inner.shared.catalog_version.fetch_add(1, Ordering::AcqRel);
        inner.collections.write().map_err(|_| Error::Shutdown)?.insert(entry.schema.name.clone(), entry);
        Ok(())
    }
}

/// A replica's maintenance loop: follows the primary's catalog until the
/// engine closes or is dropped. (Merges run in the workers as on a primary;
/// a replica makes no checkpoints.)
pub(super) fn follow_primary(inner: std::sync::Weak<Inner>) {
    let step = Duration::from_millis(20);
    let mut next_look = Instant::now() + CATALOG_FOLLOW_EVERY;
    loop {
        std::thread::sleep(step);
        let Some(inner) = inner.upgrade() else { return };
        if inner.closed.load(Ordering::Acquire) {
            return;
        }
        if Instant::now() < next_look {
            continue;
        }
        let engine = Engine { inner };
        if let Err(e) = engine.follow_catalog() {
            tracing::warn!("following the primary's catalog: {e}");
        }
        next_look = Instant::now() + CATALOG_FOLLOW_EVERY;
    }
}
