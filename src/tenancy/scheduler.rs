//! Weighted fair queueing of pixel work across tenants: deficit round robin
//! over per-tenant FIFO queues, where a job's cost is its CPU time.
//!
//! Each round, a tenant with queued work earns `weight × quantum` of credit
//! and runs jobs from the front of its queue while its credit covers them.
//! A job is queued with an estimate of its cost; when it has run, the
//! difference between the CPU time it really took and the estimate is
//! charged to its tenant ([`DrrScheduler::charge`]), as Linux CFS charges
//! the time a task ran: a tenant whose jobs cost more than estimated goes
//! into debt and waits until the others have had their share. Debt is kept
//! when a tenant's queue empties (unused credit is forfeited, as DRR
//! requires). Over time every backlogged tenant gets CPU time in proportion
//! to its weight, whatever the formats, encodings and sizes of the other
//! tenants' images. This type is pure bookkeeping (no threads, no clock):
//! [`crate::tenancy::Tenancy`] drives it.

use std::collections::{HashMap, VecDeque};

use crate::identity::TenantId;

/// Credit a weight-1 tenant earns per round, in cost units (nanoseconds
/// of CPU; a job's estimate before it runs is one unit per pixel). About
/// a millisecond, or one 1024×1024 image: small enough that a round stays
/// short, large enough that typical jobs need few rounds.
pub const QUANTUM_PIXELS: u64 = 1 << 20;

#[derive(Debug)]
struct TenantQueue<T> {
    weight: u32,
    /// Credit (positive) or debt (negative), in cost units.
    deficit: i64,
    jobs: VecDeque<(u64, T)>,
}

/// Per-tenant queues served by deficit round robin.
#[derive(Debug)]
pub struct DrrScheduler<T> {
    queues: HashMap<TenantId, TenantQueue<T>>,
    /// Tenants with queued work, in round-robin order.
    active: VecDeque<TenantId>,
    len: usize,
}

impl<T> Default for DrrScheduler<T> {
    fn default() -> Self {
        Self { queues: HashMap::new(), active: VecDeque::new(), len: 0 }
    }
}

impl<T> DrrScheduler<T> {
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Jobs queued for `tenant`.
    pub fn queued(&self, tenant: &TenantId) -> usize {
        self.queues.get(tenant).map_or(0, |q| q.jobs.len())
    }

    /// Queues `job` of `cost` pixels for `tenant` with `weight` (>= 1; the
    /// latest weight given for a tenant applies).
    pub fn push(&mut self, tenant: &TenantId, weight: u32, cost: u64, job: T) {
        let queue = self.queues.entry(tenant.clone()).or_insert_with(|| TenantQueue { weight, deficit: 0, jobs: VecDeque::new() });
        queue.weight = weight.max(1);
        if queue.jobs.is_empty() {
            self.active.push_back(tenant.clone());
        }
        queue.jobs.push_back((cost, job));
        self.len += 1;
    }

    /// The next job to run among those `eligible` accepts (a tenant whose
    /// front job is not eligible — at its concurrency limit, or too large for
    /// the memory left — is passed over this time and keeps its place).
    pub fn pop(&mut self, mut eligible: impl FnMut(&TenantId, &T) -> bool) -> Option<(TenantId, T)> {
        // A round visits each active tenant once. If a whole round serves
        // nobody, every eligible tenant is credited the same number of
        // further rounds at once (what empty rounds would do), so after the
        // fast-forward the next round serves someone.
        for _ in 0..3 {
            if let Some(served) = self.round(&mut eligible) {
                return Some(served);
            }
            let rounds_needed = self
                .active
                .iter()
                .filter_map(|tenant| {
                    let queue = &self.queues[tenant];
                    let (cost, job) = queue.jobs.front()?;
                    let per_round = u64::from(queue.weight) * QUANTUM_PIXELS;
                    eligible(tenant, job).then(|| (*cost as i64).saturating_sub(queue.deficit).max(0).unsigned_abs().div_ceil(per_round))
                })
                .min()?;
            for tenant in &self.active {
                let queue = self.queues.get_mut(tenant).expect("active tenants have queues");
                if queue.jobs.front().is_some_and(|(_, job)| eligible(tenant, job)) {
                    queue.deficit += (rounds_needed * u64::from(queue.weight) * QUANTUM_PIXELS) as i64;
                }
            }
        }
        None
    }

    /// One pass over the active tenants, serving the first that can be.
    fn round(&mut self, eligible: &mut impl FnMut(&TenantId, &T) -> bool) -> Option<(TenantId, T)> {
        for _ in 0..self.active.len() {
            let tenant = self.active.front().cloned()?;
            let queue = self.queues.get_mut(&tenant).expect("active tenants have queues");
            let (cost, job) = queue.jobs.front().expect("active queues are non-empty");
            if !eligible(&tenant, job) {
                self.active.rotate_left(1);
                continue;
            }
            if queue.deficit < *cost as i64 {
                // Not enough credit: earn this round's and move on.
                queue.deficit += (u64::from(queue.weight) * QUANTUM_PIXELS) as i64;
                self.active.rotate_left(1);
                continue;
            }
            let cost = *cost;
            queue.deficit -= cost as i64;
            let (_, job) = queue.jobs.pop_front().expect("checked non-empty");
            self.len -= 1;
            if queue.jobs.is_empty() {
                // Leaving the round forfeits unused credit, as DRR
                // requires; debt is kept.
                queue.deficit = queue.deficit.min(0);
                self.active.pop_front();
            }
            return Some((tenant, job));
        }
        None
    }

    /// Charges `tenant` `delta` cost units more (or, negative, fewer) than
    /// its job was queued with: what the job really cost once it ran.
    pub fn charge(&mut self, tenant: &TenantId, delta: i64) {
        let queue = self.queues.entry(tenant.clone()).or_insert_with(|| TenantQueue { weight: 1, deficit: 0, jobs: VecDeque::new() });
        queue.deficit = queue.deficit.saturating_sub(delta);
        if queue.jobs.is_empty() {
            queue.deficit = queue.deficit.min(0);
        }
    }

    /// The weight `tenant` was last queued with.
    pub fn weight(&self, tenant: &TenantId) -> Option<u32> {
        self.queues.get(tenant).map(|q| q.weight)
    }

    /// Tenants with queued jobs.
    pub fn active(&self) -> impl Iterator<Item = &TenantId> {
        self.active.iter()
    }

    /// Keeps only the jobs `keep` accepts (drops cancelled requests).
    pub fn retain(&mut self, mut keep: impl FnMut(&T) -> bool) {
        let mut removed = 0;
        for queue in self.queues.values_mut() {
            let before = queue.jobs.len();
            queue.jobs.retain(|(_, job)| keep(job));
            removed += before - queue.jobs.len();
            if queue.jobs.is_empty() {
                queue.deficit = queue.deficit.min(0);
            }
        }
        self.len -= removed;
        let queues = &self.queues;
        self.active.retain(|t| queues.get(t).is_some_and(|q| !q.jobs.is_empty()));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(name: &str) -> TenantId {
        TenantId::parse(name).unwrap()
    }

    #[test]
    fn serves_backlogged_tenants_in_proportion_to_their_weights() {
        let mut s = DrrScheduler::default();
        for i in 0..400 {
            s.push(&t("light"), 1, QUANTUM_PIXELS / 4, ("light", i));
            s.push(&t("heavy"), 3, QUANTUM_PIXELS / 4, ("heavy", i));
        }
        // A cycle serves 4 light jobs (1 quantum) and 12 heavy ones (3).
        let served: Vec<&str> = (0..160).map(|_| s.pop(|_, _| true).unwrap().1.0).collect();
        let heavy = served.iter().filter(|n| **n == "heavy").count();
        assert_eq!((served.len() - heavy, heavy), (40, 120));
    }

    #[test]
    fn shares_pixels_not_requests_between_small_and_large_images() {
        let mut s = DrrScheduler::default();
        // "big" sends 4-quantum images, "small" quarter-quantum ones, equal weights.
        for i in 0..100 {
            s.push(&t("big"), 1, 4 * QUANTUM_PIXELS, i);
        }
        for i in 0..1000 {
            s.push(&t("small"), 1, QUANTUM_PIXELS / 4, i);
        }
        let (mut big_px, mut small_px) = (0, 0);
        for _ in 0..200 {
            let (tenant, _) = s.pop(|_, _| true).unwrap();
            if tenant.as_str() == "big" { big_px += 4 * QUANTUM_PIXELS } else { small_px += QUANTUM_PIXELS / 4 }
        }
        // Pixel throughput is equal to within one large job.
        assert!(big_px.abs_diff(small_px) <= 4 * QUANTUM_PIXELS, "big {big_px} small {small_px}");
    }

    #[test]
    fn keeps_fifo_order_within_a_tenant() {
        let mut s = DrrScheduler::default();
        for i in 0..10 {
            s.push(&t("a"), 1, 10, i);
        }
        let order: Vec<i32> = std::iter::from_fn(|| s.pop(|_, _| true).map(|(_, j)| j)).collect();
        assert_eq!(order, (0..10).collect::<Vec<_>>());
        assert!(s.is_empty());
    }

    #[test]
    fn passes_over_ineligible_tenants_without_losing_their_place() {
        let mut s = DrrScheduler::default();
        s.push(&t("blocked"), 1, 10, "b1");
        s.push(&t("free"), 1, 10, "f1");
        s.push(&t("free"), 1, 10, "f2");
        fn pick(s: &mut DrrScheduler<&'static str>) -> Option<&'static str> {
            s.pop(|tenant, _| tenant.as_str() != "blocked").map(|(_, j)| j)
        }
        assert_eq!(pick(&mut s), Some("f1"));
        assert_eq!(pick(&mut s), Some("f2"));
        assert_eq!(pick(&mut s), None, "only an ineligible job is left");
        assert_eq!(s.len(), 1);
        assert_eq!(s.pop(|_, _| true).map(|(_, j)| j), Some("b1"));
    }

    #[test]
    fn a_job_larger_than_many_quanta_is_still_served() {
        let mut s = DrrScheduler::default();
        s.push(&t("a"), 1, 500 * QUANTUM_PIXELS, "huge");
        assert_eq!(s.pop(|_, _| true).map(|(_, j)| j), Some("huge"));
    }

    #[test]
    fn retain_drops_cancelled_jobs_and_keeps_counts_right() {
        let mut s = DrrScheduler::default();
        for i in 0..6 {
            s.push(&t(if i % 2 == 0 { "a" } else { "b" }), 1, 1, i);
        }
        s.retain(|j| *j != 1 && *j != 3 && *j != 5);
        assert_eq!((s.len(), s.queued(&t("a")), s.queued(&t("b"))), (3, 3, 0));
        let order: Vec<i32> = std::iter::from_fn(|| s.pop(|_, _| true).map(|(_, j)| j)).collect();
        assert_eq!(order, [0, 2, 4]);
    }
}
