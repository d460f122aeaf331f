//! The durable catalog: collections, their ids and schemas.

use std::path::Path;

use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};
use serde::{Deserialize, Serialize};
use vectorflow_core::{CollectionId, CollectionSchema, Error, Result, Timestamp};

/// One collection as the catalog holds it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CatalogEntry {
    pub id: CollectionId,
    pub schema: CollectionSchema,
    pub created_ts: Timestamp,
}

const COLLECTIONS: TableDefinition<&str, &[u8]> = TableDefinition::new("collections");
const COUNTERS: TableDefinition<&str, u64> = TableDefinition::new("counters");

fn storage(e: impl std::fmt::Display) -> Error {
    Error::storage(format!("catalog: {e}"))
}

/// Collections by name, stored durably in `catalog.redb`.
pub struct CatalogStore {
    db: Database,
}

impl CatalogStore {
    pub fn open(dir: &Path) -> Result<CatalogStore> {
        std::fs::create_dir_all(dir)?;
        let db = Database::builder().set_cache_size(4 << 20).create(dir.join("catalog.redb")).map_err(storage)?;
        let txn = db.begin_write().map_err(storage)?;
        txn.open_table(COLLECTIONS).map_err(storage)?;
        txn.open_table(COUNTERS).map_err(storage)?;
        txn.commit().map_err(storage)?;
        Ok(CatalogStore { db })
    }

    /// Every collection.
    pub fn load(&self) -> Result<Vec<CatalogEntry>> {
        let read = self.db.begin_read().map_err(storage)?;
        let table = read.open_table(COLLECTIONS).map_err(storage)?;
        let mut entries = Vec::new();
        for item in table.iter().map_err(storage)? {
            let (name, bytes) = item.map_err(storage)?;
            let entry = serde_json::from_slice(bytes.value()).map_err(|e| Error::Corrupt {
                location: format!("catalog entry `{}`", name.value()),
                problem: e.to_string(),
            })?;
            entries.push(entry);
        }
        Ok(entries)
    }

    /// Adds a collection under a fresh id; fails if the name is taken.
    pub fn create(&self, schema: CollectionSchema, created_ts: Timestamp) -> Result<CatalogEntry> {
        let txn = self.db.begin_write().map_err(storage)?;
        let entry = {
            let mut table = txn.open_table(COLLECTIONS).map_err(storage)?;
            if table.get(schema.name.as_str()).map_err(storage)?.is_some() {
                return Err(Error::CollectionExists(schema.name));
            }
            let mut counters = txn.open_table(COUNTERS).map_err(storage)?;
            let id = counters.get("next_collection_id").map_err(storage)?.map_or(1, |v| v.value());
            counters.insert("next_collection_id", id + 1).map_err(storage)?;
            let id = CollectionId::try_from(id).map_err(|_| storage("collection ids exhausted"))?;
            let entry = CatalogEntry { id, schema, created_ts };
            let bytes = serde_json::to_vec(&entry).map_err(storage)?;
            table.insert(entry.schema.name.as_str(), bytes.as_slice()).map_err(storage)?;
            entry
        };
        txn.commit().map_err(storage)?;
        Ok(entry)
    }

    pub fn drop_collection(&self, name: &str) -> Result<()> {
        let txn = self.db.begin_write().map_err(storage)?;
        {
            let mut table = txn.open_table(COLLECTIONS).map_err(storage)?;
            if table.remove(name).map_err(storage)?.is_none() {
                return Err(Error::CollectionNotFound(name.to_string()));
            }
        }
        txn.commit().map_err(storage)?;
        Ok(())
    }
}
