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
//! watches the memory budget's accounting, and once a burst has ended
//! ([`TrimPolicy`]) it asks glibc to return the free pages of every arena
//! (`malloc_trim`), so resident memory comes back near idle within a few
//! seconds instead of staying at the burst's peak. That works reliably
//! only with one arena ([`ARENA_MAX`]): `malloc_trim` cannot shrink the top
//! of any arena but the main one.
//!
//! Skipped when the operator set glibc's own knobs (`GLIBC_TUNABLES`,
//! `MALLOC_MMAP_THRESHOLD_`, `MALLOC_TRIM_THRESHOLD_`; `MALLOC_ARENA_MAX`
//! for the arena count only), which then apply,
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
/// At most this many malloc arenas (glibc's default: eight per core).
/// `malloc_trim` returns the free pages inside every arena but shrinks the
/// top of the main arena only: every other arena keeps the free memory at
/// its top (up to its 64 MiB heap) for good. With glibc's default count,
/// or with two arenas, a burst of 4K rotations left idle + 50–60 MiB
/// resident in some runs and nothing in others (whichever arena the last
/// large buffers came from); with one, nothing in every run. One arena cost
/// no CPU on two cores (the per-thread caches serve small allocations
/// without its lock; 4K rotations 31.7 ms per request against 34.0 with
/// the default count, docs/performance.md#allocators); machines with many
/// cores can set `MALLOC_ARENA_MAX`, which this leaves alone.
pub const ARENA_MAX: usize = 1;

/// How far what requests hold must fall below its recent peak before the
/// free memory is returned to the system.
pub const TRIM_AFTER_DROP: u64 = 32 << 20;
/// After a burst, the trimmer trims again in this many following periods
/// (memory the budget does not see is freed a little later: connections
/// closed after their last call, buffers of calls that were refused).
const QUIET_TRIMS: u32 = 5;
/// How often the trimmer looks.
pub const TRIM_PERIOD: std::time::Duration = std::time::Duration::from_secs(1);

/// A period is quiet when what is held moved less than this within it.
const QUIET_SWING: u64 = 8 << 20;

/// When to trim, from what the memory budget saw in each period. A burst
/// has ended at the first quiet period (held moved less than
/// [`QUIET_SWING`]) in which what is held is [`TRIM_AFTER_DROP`] below its
/// peak since the last trim, or at the first period with nothing held at
/// all after some activity: trim then, and in each of the [`QUIET_TRIMS`]
/// quiet periods after it. A busy period (calls coming and going) cancels
/// those: trimming under load would only hand back pages the next calls
/// are about to fault in again, and the load's own end trims.
///
/// Not "trim only when nothing is held": connections are charged their
/// HTTP/2 window for their whole life, so a server with open connections
/// never holds nothing, yet has memory to give back after every burst.
#[derive(Debug, Default)]
struct TrimPolicy {
    /// The most held since the last trim that ended a burst.
    peak: u64,
    /// Quiet periods left in which to trim again.
    quiet_trims: u32,
}

impl TrimPolicy {
    /// One period: `high` is the most held during it, `now` what is held
    /// at its end. Whether to trim now.
    fn tick(&mut self, high: u64, now: u64) -> bool {
        self.peak = self.peak.max(high);
        let quiet = high.saturating_sub(now) < QUIET_SWING;
        if !quiet {
            self.quiet_trims = 0;
            return false;
        }
        if self.peak.saturating_sub(now) >= TRIM_AFTER_DROP || (high == 0 && self.peak > 0) {
            (self.peak, self.quiet_trims) = (now, QUIET_TRIMS);
            return true;
        }
        if self.quiet_trims > 0 {
            self.quiet_trims -= 1;
            return true;
        }
        false
    }
}

/// Starts a thread that returns free memory to the system after bursts
/// (see the module docs and [`TrimPolicy`]); it ends when the budget is
/// dropped. Does nothing where glibc's allocator is not in use.
pub fn spawn_trimmer(budget: &std::sync::Arc<crate::tenancy::memory::Budget>) {
    if !GLIBC {
        return;
    }
    let budget = std::sync::Arc::downgrade(budget);
    let spawned = std::thread::Builder::new().name("imgsvc-trim".into()).spawn(move || {
        let mut policy = TrimPolicy::default();
        loop {
            std::thread::sleep(TRIM_PERIOD);
            let Some(budget) = budget.upgrade() else { return };
            let (high, now) = budget.take_high_water();
            if policy.tick(high, now) {
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

/// Applies [`MMAP_THRESHOLD`], [`TRIM_THRESHOLD`] and [`ARENA_MAX`] to
/// glibc's malloc. Call once, early, from the daemon's `main`, before any
/// other thread starts (arenas are made as threads first allocate).
/// `MALLOC_ARENA_MAX` in the environment keeps its arena count;
/// `GLIBC_TUNABLES`, `MALLOC_MMAP_THRESHOLD_` or `MALLOC_TRIM_THRESHOLD_`
/// leave everything to the environment.
pub fn tune_for_image_buffers() -> Tuning {
    if SERVER_ALLOCATOR != "system" {
        return Tuning::OtherAllocator;
    }
    let set = |name: &str| std::env::var_os(name).is_some();
    if ["GLIBC_TUNABLES", "MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_"].iter().any(|name| set(name)) {
        return Tuning::LeftToEnvironment;
    }
    apply(!set("MALLOC_ARENA_MAX"))
}

#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn apply(arenas: bool) -> Tuning {
    // SAFETY: mallopt only adjusts allocator parameters; the values fit a
    // c_int and are within glibc's accepted ranges.
    let ok = unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, MMAP_THRESHOLD as libc::c_int) == 1
            && libc::mallopt(libc::M_TRIM_THRESHOLD, TRIM_THRESHOLD as libc::c_int) == 1
            && (!arenas || libc::mallopt(libc::M_ARENA_MAX, ARENA_MAX as libc::c_int) == 1)
    };
    if ok { Tuning::Applied } else { Tuning::Unavailable }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn apply(_arenas: bool) -> Tuning {
    Tuning::Unavailable
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1 << 20;

    /// Runs the policy over (high, now) periods; the periods in which it trims.
    fn trims(periods: &[(u64, u64)]) -> Vec<usize> {
        let mut policy = TrimPolicy::default();
        periods.iter().enumerate().filter(|&(_, &(high, now))| policy.tick(high, now)).map(|(i, _)| i).collect()
    }

    #[test]
    fn an_idle_server_is_never_trimmed() {
        assert_eq!(trims(&[(0, 0); 20]), Vec::<usize>::new());
    }

    #[test]
    fn the_end_of_a_burst_trims_in_the_first_quiet_period_and_the_quiet_periods_after_it() {
        let mut periods = vec![(300 * MIB, 250 * MIB), (400 * MIB, 0)];
        periods.extend([(0, 0); 10]);
        // Period 2 is the first quiet one; 3..=7 the quiet trims; then nothing.
        assert_eq!(trims(&periods), vec![2, 3, 4, 5, 6, 7]);
    }

    #[test]
    fn a_burst_ends_while_connections_keep_their_windows_charged() {
        // 16 MiB stays held (four connections' windows) before, during and after.
        let mut periods = vec![(16 * MIB, 16 * MIB), (200 * MIB, 180 * MIB), (180 * MIB, 16 * MIB)];
        periods.extend([(16 * MIB, 16 * MIB); 8]);
        assert_eq!(trims(&periods), vec![3, 4, 5, 6, 7, 8]);
    }

    #[test]
    fn small_activity_is_trimmed_once_nothing_at_all_is_held() {
        let periods = [(0, 0), (5 * MIB, 5 * MIB), (6 * MIB, 0), (0, 0), (0, 0)];
        assert_eq!(trims(&periods), vec![3, 4]);
    }

    #[test]
    fn a_load_is_not_trimmed_while_it_lasts_and_a_new_burst_cancels_the_quiet_trims() {
        // Large calls coming and going: every period swings by 10 MiB or more.
        let steady = [(110 * MIB, 100 * MIB), (120 * MIB, 95 * MIB), (118 * MIB, 100 * MIB), (150 * MIB, 10 * MIB)];
        assert_eq!(trims(&steady), Vec::<usize>::new());
        // A burst ends (trim in period 2), a new one starts in period 3 and
        // cancels the quiet trims; its own end (period 6) trims again.
        let periods = [
            (200 * MIB, 150 * MIB),
            (150 * MIB, 10 * MIB),
            (10 * MIB, 10 * MIB),
            (80 * MIB, 70 * MIB),
            (90 * MIB, 80 * MIB),
            (90 * MIB, 10 * MIB),
            (10 * MIB, 10 * MIB),
        ];
        assert_eq!(trims(&periods), vec![2, 6]);
    }
}
