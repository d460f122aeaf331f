//! Where index builds run: one bounded pool for the whole process.
//!
//! Each build inserts its rows in parallel on one rayon pool of about one
//! thread per core. The pool runs at the workers' priority: below it
//! (nice 10, then 4) a search load starved the builds, and unbuilt
//! segments are searched by brute force, which makes every search dearer
//! and starves the builds further (under `bench soak`'s 8 clients only 1
//! to 3 of 16 to 42 sealed segments had their graph at any time). What
//! keeps builds from taking over is their bound (two lanes, one pool), and
//! what keeps writers from outrunning them is the engine's
//! `max_index_backlog_rows`. Builds start from two lanes, each taking one
//! build at a time:
//! - `Seal`: a segment that just sealed (or whose stored index was
//!   unusable). These are at most `seal_rows` rows and make fresh data
//!   searchable through a graph, so they never wait behind a merge.
//! - `Merge`: the output of a merge or compaction, which may hold a million
//!   rows and take minutes; its inputs keep answering meanwhile.
//!
//! So at most two builds run at once whatever the ingest rate, and their
//! threads are bounded by the pool. The lane queues hold one entry per
//! segment waiting for its graph (a handle on vectors the segment holds
//! anyway), so they grow only with the segments being built.

use std::sync::OnceLock;
use std::sync::mpsc::{Sender, channel};

/// Which lane a build waits in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BuildLane {
    Seal,
    Merge,
}

type Build = Box<dyn FnOnce() + Send + 'static>;

struct Pool {
    seal: Sender<Build>,
    merge: Sender<Build>,
}

static POOL: OnceLock<Option<Pool>> = OnceLock::new();
static THREADS: OnceLock<Option<rayon::ThreadPool>> = OnceLock::new();

/// The rayon pool builds insert their rows on (`None` if it cannot start:
/// builds then run on their lane's thread alone).
fn threads() -> Option<&'static rayon::ThreadPool> {
    THREADS
        .get_or_init(|| {
            let threads = std::thread::available_parallelism().map_or(2, |n| n.get());
            rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .thread_name(|i| format!("index-build-{i}"))
                .build()
                .inspect_err(|e| tracing::warn!("starting the index build pool: {e}"))
                .ok()
        })
        .as_ref()
}

/// Gives freed heap pages back once the merge lane is free: a merge's
/// inputs (their rows and graphs) are dropped on a worker when its output
/// replaces them, after that build's own trim, so without this glibc keeps
/// them (measured: about 400 bytes per row at 100k rows).
pub fn release_freed_memory_later() {
    submit(BuildLane::Merge, || {});
}

/// Runs `work` inside the build pool, so its parallel iterators (those of
/// `hnsw_rs`'s inserts) use the pool's threads.
pub fn install<R: Send>(work: impl FnOnce() -> R + Send) -> R {
    match threads() {
        Some(pool) => pool.install(work),
        None => work(),
    }
}

fn lane(name: &str) -> Option<Sender<Build>> {
    let (sender, receiver) = channel::<Build>();
    std::thread::Builder::new()
        .name(name.into())
        .spawn(move || {
            while let Ok(build) = receiver.recv() {
                build();
                crate::host::release_freed_memory();
            }
        })
        .inspect_err(|e| tracing::warn!("starting the {name} lane: {e}"))
        .ok()
        .map(|_| sender)
}

/// Queues `build` in `lane`. If the pool cannot run it, `build` runs on the
/// caller's thread (the caller's segment is then built before it returns;
/// slower, never lost).
pub fn submit(lane_kind: BuildLane, build: impl FnOnce() + Send + 'static) {
    let pool = POOL.get_or_init(|| match (lane("index-seal"), lane("index-merge")) {
        (Some(seal), Some(merge)) => Some(Pool { seal, merge }),
        _ => None,
    });
    let build: Build = Box::new(build);
    let refused = match pool {
        Some(pool) => {
            let sender = match lane_kind {
                BuildLane::Seal => &pool.seal,
                BuildLane::Merge => &pool.merge,
            };
            sender.send(build).err().map(|e| e.0)
        }
        None => Some(build),
    };
    if let Some(build) = refused {
        tracing::warn!("the index build lanes are down; building on the calling thread");
        build();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builds_in_both_lanes_run_and_parallel_work_uses_the_pool() {
        let (done, finished) = channel();
        for (i, lane) in [BuildLane::Seal, BuildLane::Merge, BuildLane::Seal].into_iter().enumerate() {
            let done = done.clone();
            submit(lane, move || {
                let name = install(|| std::thread::current().name().map(str::to_string));
                let _ = done.send((i, name));
            });
        }
        let mut seen: Vec<(usize, Option<String>)> =
            (0..3).map(|_| finished.recv_timeout(std::time::Duration::from_secs(10)).unwrap()).collect();
        seen.sort();
        assert_eq!(seen.iter().map(|s| s.0).collect::<Vec<_>>(), vec![0, 1, 2]);
        assert!(
            seen.iter().all(|(_, name)| name.as_deref().is_some_and(|n| n.starts_with("index-build-"))),
            "{seen:?}"
        );
    }
}
