//! Weighted fair queueing of pixel work across tenants, in CPU time: per
//! tenant FIFO queues served in order of the tenants' virtual time, as
//! Linux CFS serves tasks.
//!
//! A tenant's virtual time is the CPU time its jobs have taken divided by
//! its weight. The next job to start is the front job of the eligible
//! tenant with the least virtual time. A job is charged an estimate of its
//! cost when it starts (so a tenant cannot start many jobs on one reading),
//! and the difference to the CPU time it really took when it ends
//! ([`FairScheduler::charge`]): whatever formats, encodings and sizes the
//! tenants send, every backlogged tenant gets CPU time in proportion to its
//! weight. A tenant that becomes active again starts no earlier than the
//! least virtual time of the tenants already active: time it spent idle is
//! not saved up as credit, but debt (virtual time ahead of the others) is
//! kept. Ties go round robin. This type is pure bookkeeping (no threads,
//! no clock): [`crate::tenancy::Tenancy`] drives it.

use std::collections::{HashMap, VecDeque};

use crate::identity::TenantId;

/// One millisecond of CPU in the scheduler's cost unit (nanoseconds). A
/// job's estimate before it runs is one unit per pixel (its kernels' cost
/// is of that order); what it really took replaces the estimate after.
pub const MILLISECOND: u64 = 1_000_000;

/// Virtual time is cost × this / weight, so that weights up to 1000 keep
/// sub-nanosecond resolution.
const SCALE: u64 = 1 << 10;

#[derive(Debug)]
struct TenantQueue<T> {
    weight: u32,
    /// CPU time charged / weight, scaled by [`SCALE`].
    vtime: u64,
    jobs: VecDeque<(u64, T)>,
}

impl<T> TenantQueue<T> {
    fn advance(&mut self, cost: i64) {
        let step = (cost.unsigned_abs().saturating_mul(SCALE)) / u64::from(self.weight.max(1));
        self.vtime = if cost >= 0 { self.vtime.saturating_add(step) } else { self.vtime.saturating_sub(step) };
    }
}

/// Per-tenant queues served in order of virtual time.
#[derive(Debug)]
pub struct FairScheduler<T> {
    queues: HashMap<TenantId, TenantQueue<T>>,
    /// Tenants with queued work, in round-robin order (for ties).
    active: VecDeque<TenantId>,
    len: usize,
}

impl<T> Default for FairScheduler<T> {
    fn default() -> Self {
        Self { queues: HashMap::new(), active: VecDeque::new(), len: 0 }
    }
}

impl<T> FairScheduler<T> {
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

    /// The least virtual time of the active tenants.
    fn floor(&self) -> Option<u64> {
        self.active.iter().map(|t| self.queues[t].vtime).min()
    }

    /// Queues `job` with an estimated `cost` (nanoseconds of CPU) for
    /// `tenant` with `weight` (>= 1; the latest weight given applies).
    pub fn push(&mut self, tenant: &TenantId, weight: u32, cost: u64, job: T) {
        let floor = self.floor();
        let queue = self.queues.entry(tenant.clone()).or_insert_with(|| TenantQueue { weight, vtime: 0, jobs: VecDeque::new() });
        queue.weight = weight.max(1);
        if queue.jobs.is_empty() {
            // Idle time is not credit: start level with the others at least.
            if let Some(floor) = floor {
                queue.vtime = queue.vtime.max(floor);
            }
            self.active.push_back(tenant.clone());
        }
        queue.jobs.push_back((cost, job));
        self.len += 1;
    }

    /// The next job to run: the front job of the tenant with the least
    /// virtual time among those whose front job `eligible` accepts (a
    /// tenant passed over — at its concurrency limit, or its part of the
    /// workers — keeps its place). The job's estimate is charged now.
    pub fn pop(&mut self, mut eligible: impl FnMut(&TenantId, &T) -> bool) -> Option<(TenantId, T)> {
        let mut best: Option<(usize, u64)> = None;
        for (i, tenant) in self.active.iter().enumerate() {
            let queue = &self.queues[tenant];
            let (_, job) = queue.jobs.front().expect("active queues are non-empty");
            if eligible(tenant, job) && best.is_none_or(|(_, v)| queue.vtime < v) {
                best = Some((i, queue.vtime));
            }
        }
        let (index, _) = best?;
        let tenant = self.active.remove(index).expect("index from the iteration above");
        let queue = self.queues.get_mut(&tenant).expect("active tenants have queues");
        let (cost, job) = queue.jobs.pop_front().expect("active queues are non-empty");
        queue.advance(cost as i64);
        self.len -= 1;
        if !queue.jobs.is_empty() {
            // To the back: among equals, the others go first.
            self.active.push_back(tenant.clone());
        }
        Some((tenant, job))
    }

    /// Charges `tenant` `delta` nanoseconds more (or, negative, fewer) than
    /// its job was estimated at: what the job really cost once it ran.
    pub fn charge(&mut self, tenant: &TenantId, delta: i64) {
        let queue = self.queues.entry(tenant.clone()).or_insert_with(|| TenantQueue { weight: 1, vtime: 0, jobs: VecDeque::new() });
        queue.advance(delta);
    }

    /// The active tenant whose virtual time is behind every other active
    /// tenant's by more than `slack` nanoseconds of CPU (at weight 1), if
    /// any: it has had less than its share, and may catch up.
    pub fn lagging(&self, slack: u64) -> Option<&TenantId> {
        let mut by_time = self.active.iter().map(|t| (self.queues[t].vtime, t)).collect::<Vec<_>>();
        by_time.sort_by_key(|(v, _)| *v);
        match by_time.as_slice() {
            [(least, tenant), (next, _), ..] if least.saturating_add(slack.saturating_mul(SCALE)) < *next => Some(*tenant),
            _ => None,
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
        let mut s = FairScheduler::default();
        for i in 0..400 {
            s.push(&t("light"), 1, MILLISECOND / 4, ("light", i));
            s.push(&t("heavy"), 3, MILLISECOND / 4, ("heavy", i));
        }
        // Per millisecond of virtual time, 4 light jobs and 12 heavy ones.
        let served: Vec<&str> = (0..160).map(|_| s.pop(|_, _| true).unwrap().1.0).collect();
        let heavy = served.iter().filter(|n| **n == "heavy").count();
        assert_eq!((served.len() - heavy, heavy), (40, 120));
    }

    #[test]
    fn shares_cost_not_requests_between_small_and_large_jobs() {
        let mut s = FairScheduler::default();
        // "big" sends 4-quantum images, "small" quarter-quantum ones, equal weights.
        for i in 0..100 {
            s.push(&t("big"), 1, 4 * MILLISECOND, i);
        }
        for i in 0..1000 {
            s.push(&t("small"), 1, MILLISECOND / 4, i);
        }
        let (mut big_px, mut small_px) = (0, 0);
        for _ in 0..200 {
            let (tenant, _) = s.pop(|_, _| true).unwrap();
            if tenant.as_str() == "big" { big_px += 4 * MILLISECOND } else { small_px += MILLISECOND / 4 }
        }
        // Cost served is equal to within one large job.
        assert!(big_px.abs_diff(small_px) <= 4 * MILLISECOND, "big {big_px} small {small_px}");
    }

    #[test]
    fn keeps_fifo_order_within_a_tenant() {
        let mut s = FairScheduler::default();
        for i in 0..10 {
            s.push(&t("a"), 1, 10, i);
        }
        let order: Vec<i32> = std::iter::from_fn(|| s.pop(|_, _| true).map(|(_, j)| j)).collect();
        assert_eq!(order, (0..10).collect::<Vec<_>>());
        assert!(s.is_empty());
    }

    #[test]
    fn passes_over_ineligible_tenants_without_losing_their_place() {
        let mut s = FairScheduler::default();
        s.push(&t("blocked"), 1, 10, "b1");
        s.push(&t("free"), 1, 10, "f1");
        s.push(&t("free"), 1, 10, "f2");
        fn pick(s: &mut FairScheduler<&'static str>) -> Option<&'static str> {
            s.pop(|tenant, _| tenant.as_str() != "blocked").map(|(_, j)| j)
        }
        assert_eq!(pick(&mut s), Some("f1"));
        assert_eq!(pick(&mut s), Some("f2"));
        assert_eq!(pick(&mut s), None, "only an ineligible job is left");
        assert_eq!(s.len(), 1);
        assert_eq!(s.pop(|_, _| true).map(|(_, j)| j), Some("b1"));
    }

    #[test]
    fn a_job_of_many_milliseconds_is_still_served() {
        let mut s = FairScheduler::default();
        s.push(&t("a"), 1, 500 * MILLISECOND, "huge");
        assert_eq!(s.pop(|_, _| true).map(|(_, j)| j), Some("huge"));
    }

    #[test]
    fn retain_drops_cancelled_jobs_and_keeps_counts_right() {
        let mut s = FairScheduler::default();
        for i in 0..6 {
            s.push(&t(if i % 2 == 0 { "a" } else { "b" }), 1, 1, i);
        }
        s.retain(|j| *j != 1 && *j != 3 && *j != 5);
        assert_eq!((s.len(), s.queued(&t("a")), s.queued(&t("b"))), (3, 3, 0));
        let order: Vec<i32> = std::iter::from_fn(|| s.pop(|_, _| true).map(|(_, j)| j)).collect();
        assert_eq!(order, [0, 2, 4]);
    }
}
