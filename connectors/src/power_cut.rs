//! A store that loses, at a simulated power cut, every write that was not
//! synced: the test double for checking that whatever the engine
//! acknowledged survives power loss.
//!
//! Objects are written to an in-memory store (the "page cache"); a
//! [`Durability::sync`] copies an object's bytes as they are then to the
//! durable copy. [`PowerCutStore::cut`] returns a store holding the durable
//! copy only: unsynced writes are gone, and deletes that were never synced
//! are undone (an unlinked file comes back), as on a real disk.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use object_store::memory::InMemory;
use object_store::path::Path;
use object_store::{ObjectStoreExt, PutPayload};
use vectorflow_core::{Error, Result};

use crate::store::{Durability, ObjectStorage};

/// An in-memory store with a power switch (see the module documentation).
#[derive(Default)]
pub struct PowerCutStore {
    live: Arc<InMemory>,
    durable: Mutex<BTreeMap<String, Bytes>>,
}

impl PowerCutStore {
    pub fn new() -> Arc<PowerCutStore> {
        Arc::new(PowerCutStore::default())
    }

    /// A handle on the store as it runs (before the cut).
    pub fn storage(self: &Arc<Self>) -> Result<ObjectStorage> {
        ObjectStorage::with_store(self.live.clone(), self.clone(), "memory://power-cut")
    }

    /// Writes an object without syncing it, as a buggy writer would.
    pub fn put_unsynced(&self, path: &str, bytes: Bytes) -> Result<()> {
        futures::executor::block_on(self.live.put(&Path::from(path), PutPayload::from(bytes)))
            .map(|_| ())
            .map_err(|e| Error::storage(format!("power-cut store: {e}")))
    }

    /// Paths that would survive a cut now.
    pub fn durable_paths(&self) -> Vec<String> {
        self.durable.lock().map(|d| d.keys().cloned().collect()).unwrap_or_default()
    }

    /// The power goes off and on: a fresh store holding only what was synced.
    pub fn cut(&self) -> Result<Arc<PowerCutStore>> {
        let durable = self.durable.lock().map_err(|_| Error::storage("power-cut store poisoned"))?.clone();
        let after = PowerCutStore::new();
        for (path, bytes) in &durable {
            after.put_unsynced(path, bytes.clone())?;
        }
        *after.durable.lock().map_err(|_| Error::storage("power-cut store poisoned"))? = durable;
        Ok(after)
    }
}

impl Durability for PowerCutStore {
    fn sync(&self, path: &str) -> std::io::Result<()> {
        let read = async { self.live.get(&Path::from(path)).await?.bytes().await };
        let bytes = futures::executor::block_on(read).map_err(std::io::Error::other)?;
        self.durable.lock().map_err(|_| std::io::Error::other("poisoned"))?.insert(path.to_string(), bytes);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_cut_keeps_synced_writes_and_loses_the_rest() {
        let store = PowerCutStore::new();
        let storage = store.storage().unwrap();
        storage.put("a/synced", Bytes::from_static(b"kept")).unwrap();
        store.put_unsynced("a/unsynced", Bytes::from_static(b"lost")).unwrap();
        assert!(storage.get_opt("a/unsynced").unwrap().is_some());
        storage.delete("a/synced").unwrap();

        let after = store.cut().unwrap().storage().unwrap();
        assert!(after.get_opt("a/unsynced").unwrap().is_none(), "an unsynced write survived the cut");
        // The unsynced delete is undone.
        assert_eq!(after.get_opt("a/synced").unwrap().unwrap(), Bytes::from_static(b"kept"));
    }
}
