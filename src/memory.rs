//! Giving freed memory back to the system between bursts of work.
//!
//! A poll of 100,000 known keys pages the whole ledger through sled, and a thousand
//! transfers allocate and free as much again. glibc keeps what was freed in its arenas,
//! so without this a daemon idle for hours would hold on to its peak (75 MiB after such
//! a poll instead of about 25).

/// Returns the allocator's free memory to the kernel. Cheap when there is little to
/// return; called after start-up and after each poll, never per object.
pub fn release_free() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim takes no pointers from us; it walks glibc's own arenas under
    // their locks and may be called from any thread at any time.
    unsafe {
        libc::malloc_trim(0);
    }
}
