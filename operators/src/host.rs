//! What the engine asks of the operating system: a lower priority for
//! threads whose work may wait, and freed heap pages given back.

/// Lowers the calling thread's priority to `nice` (Linux: niceness is per
/// thread); a thread already at or below it stays. A failure only leaves
/// the thread at its priority, so it is logged, not returned.
pub fn lower_thread_priority(nice: i32) {
    #[cfg(target_os = "linux")]
    // SAFETY: gettid, getpriority and setpriority take no pointers;
    // PRIO_PROCESS with a thread id concerns that thread only.
    unsafe {
        let thread = libc::gettid();
        if libc::getpriority(libc::PRIO_PROCESS, thread as libc::id_t) >= nice {
            return;
        }
        if libc::setpriority(libc::PRIO_PROCESS, thread as libc::id_t, nice) != 0 {
            tracing::warn!("lowering thread {thread}'s priority to nice {nice}: {}", std::io::Error::last_os_error());
        }
    }
    #[cfg(not(target_os = "linux"))]
    let _ = nice;
}

/// Gives the heap pages freed since to the operating system. A graph build
/// allocates and frees millions of small blocks (`hnsw_rs`'s points and
/// neighbour lists, dropped once frozen); glibc keeps such memory in its
/// arenas, so without this the process holds the build's peak for good.
pub fn release_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim takes no pointers and only returns free pages.
    unsafe {
        libc::malloc_trim(0);
    }
}

#[cfg(test)]
mod tests {
    #[test]
    #[cfg(target_os = "linux")]
    fn a_lowered_thread_runs_at_its_new_niceness_and_others_keep_theirs() {
        let before = unsafe { libc::getpriority(libc::PRIO_PROCESS, libc::gettid() as libc::id_t) };
        let lowered = std::thread::spawn(|| {
            super::lower_thread_priority(7);
            unsafe { libc::getpriority(libc::PRIO_PROCESS, libc::gettid() as libc::id_t) }
        })
        .join()
        .unwrap();
        assert_eq!(lowered, 7.max(before));
        let after = unsafe { libc::getpriority(libc::PRIO_PROCESS, libc::gettid() as libc::id_t) };
        assert_eq!(after, before, "only the calling thread changes");
    }
}
