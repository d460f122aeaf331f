//! A process of a cluster: several processes run one timely dataflow
//! (`EngineConfig::cluster`), each with its own workers' shards. What one
//! process changes (the catalog, the manifests) the others take in here.
//!
//! - Catalog: a change is made by whichever process receives it, with the
//!   catalog's conditional put; the process then waits until every
//!   process has read that version ([`RequestKind::CatalogSync`] to one
//!   worker of each), so the change is known everywhere when it returns.
//!   A worker that meets rows of a collection its process does not know
//!   yet holds them (and its applied frontier) until the catalog is read.
//! - Checkpoints: process 0 runs them on the configured interval (a flush
//!   on any process runs one too); every worker answers with the files its
//!   own process wrote; manifests are published with a conditional put.
//!   The other processes read the newest manifests every second and let
//!   go of what they cover (offset bindings, upload bookkeeping).
//! - Failure: timely has no partial failure. A dead process breaks the
//!   others' exchange connections, their workers panic, and the engine
//!   stops serving (`Unavailable`); the server exits for its supervisor
//!   to restart the cluster, which recovers from the checkpoint and the
//!   topics (see `docs/ARCHITECTURE.md`, "Cluster mode").

use super::*;

impl Engine {
    /// Whether this engine is one process of a cluster.
    pub fn in_cluster(&self) -> bool {
        self.inner.config.cluster.is_cluster()
    }

    /// Whether this process checkpoints and compacts on the configured
    /// intervals: every engine but a cluster's processes other than 0.
    pub(super) fn runs_maintenance(&self) -> bool {
        !self.is_replica() && (!self.in_cluster() || self.inner.config.cluster.process == 0)
    }

    /// Waits until every process of the cluster has taken in the catalog
    /// version this one just wrote. A process that has not yet holds what it
    /// cannot place and reads the catalog then, so a failure here only
    /// costs time: it is logged, not returned.
    pub(super) fn announce_catalog(&self) {
        if !self.in_cluster() {
            return;
        }
        let shared = &self.inner.shared;
        let version = self.inner.catalog_store.version();
        shared.catalog_taken.fetch_max(version, Ordering::AcqRel);
        let first_of_each: Vec<usize> = (0..shared.workers).step_by(shared.local.len().max(1)).collect();
        let timeout = self.inner.config.request_timeout;
        let announced = self.request_to(0, 0, RequestKind::CatalogSync { version }, first_of_each, timeout);
        if let Err(e) = announced {
            tracing::warn!(version, "not every process of the cluster confirmed the catalog change: {e}");
        }
    }

    /// A process that stops tells the others, which stop too (they would
    /// otherwise wait for its progress for ever: a clean exit breaks no
    /// connection). Best effort: a peer that does not hear it stops when
    /// this process's connections close.
    pub(super) fn leave_cluster(&self) {
        if !self.in_cluster() || self.inner.shared.dataflow_failure().is_some() {
            return;
        }
        let shared = &self.inner.shared;
        if shared.local.len() == shared.workers {
            // A cluster of one: nobody to tell.
            self.inner.left_cluster.store(true, Ordering::Release);
            return;
        }
        let others: Vec<usize> = (0..shared.workers)
            .step_by(shared.local.len().max(1))
            .filter(|first| !shared.local.contains(first))
            .collect();
        if others.is_empty() {
            return;
        }
        let leave = RequestKind::Leave { process: self.inner.config.cluster.process };
        match self.request_to(0, 0, leave, others, Duration::from_secs(5)) {
            Ok(_) => self.inner.left_cluster.store(true, Ordering::Release),
            Err(e) => tracing::warn!("telling the other processes that this one stops: {e}"),
        }
    }

    /// One step of following the other processes: the catalog when a
    /// worker needs it or every second, and then the manifests.
    pub(super) fn follow_cluster(&self, next_look: &mut Instant) -> Result<()> {
        let shared = &self.inner.shared;
        let wanted = shared.catalog_wanted.swap(false, Ordering::AcqRel);
        if !wanted && Instant::now() < *next_look {
            return Ok(());
        }
        {
            let _one_change_at_a_time = self.inner.catalog_changes.lock().map_err(|_| Error::Shutdown)?;
            self.follow_catalog()?;
        }
        shared.wake_segments(None);
        if !wanted {
            self.follow_manifests()?;
        }
        *next_look = Instant::now() + replica::CATALOG_FOLLOW_EVERY;
        Ok(())
    }

    /// Takes in the manifests other processes published: what their
    /// checkpoints cover is let go here too.
    fn follow_manifests(&self) -> Result<()> {
        let held: Vec<CollectionId> =
            self.inner.manifests.lock().map_err(|_| Error::Shutdown)?.keys().copied().collect();
        for id in held {
            self.take_newest_manifest(id)?;
        }
        Ok(())
    }

    /// Takes in `id`'s newest manifest if another process published it.
    pub(super) fn take_newest_manifest(&self, id: CollectionId) -> Result<()> {
        let inner = &self.inner;
        let Some(newest) = load_manifest(&inner.storage, id)? else { return Ok(()) };
        let held = inner.manifests.lock().map_err(|_| Error::Shutdown)?.get(&id).map_or(0, |m| m.version);
        if newest.version <= held {
            return Ok(());
        }
        inner.shared.persister.published(newest.segments.iter().flatten().map(|f| f.uid.clone()));
        let checkpoints = {
            let mut manifests = inner.manifests.lock().map_err(|_| Error::Shutdown)?;
            manifests.insert(id, newest);
            checkpoint_positions(&manifests)
        };
        inner.shared.log.checkpointed(id, &checkpoints)
    }
}
