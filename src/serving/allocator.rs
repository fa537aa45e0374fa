//! glibc malloc settings for a server whose requests allocate image
//! buffers of 100 KB to 32 MB (input, output, message encoding).
//!
//! With glibc's defaults, an allocation of 128 KiB or more is a fresh
//! `mmap` and its release a `munmap` (the threshold adapts, but heap
//! trimming above twice it hands memory back again): every request then
//! page-faults its buffers in, and the kernel zeroes them, page by page.
//! Measured on the isolation bench, 256×256 RGB mean-filter requests
//! went from ~2,500 to ~4,000 per second with the settings below, and
//! 4K rotations took ~10 % less server CPU. The cost: freed memory is kept
//! for reuse (up to [`TRIM_THRESHOLD`] per arena) instead of returned at
//! once; peak memory is unchanged.
//!
//! Memory kept for reuse is given back after a burst: [`spawn_trimmer`]
//! watches the memory budget's accounting, and once what requests hold has
//! fallen well below what they held (by [`TRIM_AFTER_DROP`]), it asks glibc
//! to return the free pages of every arena (`malloc_trim`), so resident
//! memory comes back near idle within a few seconds instead of staying at
//! the burst's peak.
//!
//! Skipped when the operator set glibc's own knobs (`GLIBC_TUNABLES`,
//! `MALLOC_MMAP_THRESHOLD_`, `MALLOC_TRIM_THRESHOLD_`), which then apply,
//! and when the crate is built with the `jemalloc` or `mimalloc` feature:
//! `imgsvc-server` then allocates with that allocator, which purges freed
//! memory itself (tuning and trimmer are skipped in every server of such a
//! build, in-process test servers included). The three were compared in
//! one run: `benches/allocators.sh`, docs/performance.md#allocators.

/// The allocator `imgsvc-server` uses in this build (its features).
pub const SERVER_ALLOCATOR: &str = if cfg!(feature = "jemalloc") {
    "jemalloc"
} else if cfg!(feature = "mimalloc") {
    "mimalloc"
} else {
    "system"
};

/// Whether glibc's malloc is the allocator to tune and trim.
const GLIBC: bool = cfg!(all(target_os = "linux", target_env = "gnu", not(feature = "jemalloc"), not(feature = "mimalloc")));

/// Allocations at least this large still get their own mapping (glibc's
/// maximum: larger images are rare and are released at once).
pub const MMAP_THRESHOLD: usize = 32 << 20;
/// Free memory an arena keeps at its top before giving it back.
pub const TRIM_THRESHOLD: usize = 128 << 20;

/// How far what requests hold must fall below its recent peak before the
/// free memory is returned to the system.
pub const TRIM_AFTER_DROP: u64 = 32 << 20;
/// After a burst, the trimmer also trims in this many idle periods.
const IDLE_TRIMS: u32 = 5;
/// How often the trimmer looks.
pub const TRIM_PERIOD: std::time::Duration = std::time::Duration::from_secs(1);

/// Starts a thread that returns free memory to the system after bursts
/// (see the module docs); it ends when the budget is dropped. Does nothing
/// where glibc's allocator is not in use.
pub fn spawn_trimmer(budget: &std::sync::Arc<crate::tenancy::memory::Budget>) {
    if !GLIBC {
        return;
    }
    let budget = std::sync::Arc::downgrade(budget);
    let spawned = std::thread::Builder::new().name("imgsvc-trim".into()).spawn(move || {
        // Idle periods left in which to trim again: connections closed after
        // their last call free buffers that the budget does not see.
        let mut idle_trims = 0u32;
        loop {
            std::thread::sleep(TRIM_PERIOD);
            let Some(budget) = budget.upgrade() else { return };
            let (high, now) = budget.take_high_water();
            if high > 0 {
                idle_trims = IDLE_TRIMS;
            }
            let dropped = high.saturating_sub(now) >= TRIM_AFTER_DROP;
            let idle = high == 0 && idle_trims > 0;
            if dropped || idle {
                idle_trims = idle_trims.saturating_sub(u32::from(idle));
                trim();
                metrics::counter!("imgsvc_allocator_trims_total").increment(1);
            }
        }
    });
    if let Err(e) = spawned {
        tracing::warn!(error = %e, "cannot start the allocator trimmer: memory freed after bursts stays with the process");
    }
}

#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn trim() {
    // SAFETY: malloc_trim only returns free memory to the system; it
    // takes the arenas' locks itself.
    unsafe {
        libc::malloc_trim(0);
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn trim() {}

/// What [`tune_for_image_buffers`] did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Tuning {
    Applied,
    /// The environment sets glibc's allocator knobs: left as they are.
    LeftToEnvironment,
    /// `imgsvc-server` is built with another allocator ([`SERVER_ALLOCATOR`]).
    OtherAllocator,
    /// Not glibc, or mallopt refused.
    Unavailable,
}

/// Applies [`MMAP_THRESHOLD`] and [`TRIM_THRESHOLD`] to glibc's malloc.
/// Call once, early, from the daemon's `main`.
pub fn tune_for_image_buffers() -> Tuning {
    if SERVER_ALLOCATOR != "system" {
        return Tuning::OtherAllocator;
    }
    let set_by_operator =
        ["GLIBC_TUNABLES", "MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_"].iter().any(|name| std::env::var_os(name).is_some());
    if set_by_operator {
        return Tuning::LeftToEnvironment;
    }
    apply()
}

#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn apply() -> Tuning {
    // SAFETY: mallopt only adjusts allocator parameters; both values fit a
    // c_int and are within glibc's accepted ranges.
    let ok = unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, MMAP_THRESHOLD as libc::c_int) == 1
            && libc::mallopt(libc::M_TRIM_THRESHOLD, TRIM_THRESHOLD as libc::c_int) == 1
    };
    if ok { Tuning::Applied } else { Tuning::Unavailable }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn apply() -> Tuning {
    Tuning::Unavailable
}
