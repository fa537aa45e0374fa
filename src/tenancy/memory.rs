//! The memory budget: every byte the server holds for a request, charged
//! to one server-wide budget and to its tenant's share of it.
//!
//! A request's bytes are charged to its [`Account`] (one per call), which
//! is shared by everything that holds memory for the call: the request body
//! as it arrives ([`crate::serving::admission`]), the job's input, output and
//! intermediate images while it is queued and running
//! ([`crate::tenancy::Tenancy::run`]), and the answer until the transport
//! has written it to the socket and dropped it. The [`Budget`] holds two
//! bounds at once: the sum over all accounts never exceeds
//! `tenancy.memory_budget_bytes`, and the sum over one tenant's accounts
//! never exceeds that tenant's `max_memory_bytes`. Both are checked in one
//! critical section, so the bound is exact, not sampled.
//!
//! A charge that does not fit now either fails at once ([`Account::try_reserve`]:
//! the scheduler keeps the job queued) or waits for memory to come back
//! ([`Account::reserve`]: the caller stops reading that request's body, and
//! HTTP/2 flow control holds its sender), up to a deadline. A charge that
//! can never fit (more than the tenant's share or the whole budget) fails
//! at once.
//!
//! Waiting is fair and exact: each tenant's waiting charges form a queue,
//! served in order (a large charge is not passed by smaller ones of its
//! tenant: while it waits, the tenant's new charges queue behind it), and
//! a release grants the memory itself, under the budget's lock, to the
//! heads of the queues that now fit, waking only those.
//!
//! What it does not do: allocate, copy, or know about transports. The
//! bytes are the caller's; an account only says how many it holds.

use std::{
    collections::{HashMap, VecDeque},
    sync::{Arc, Mutex, MutexGuard},
    time::{Duration, Instant},
};

use thiserror::Error;
use tokio::sync::Notify;

use crate::identity::TenantId;

/// Where a call's bytes are, for the gauges.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Stage {
    /// The request body, from its first frame until the handler has it.
    Receiving,
    /// Decoded and waiting for a worker.
    Queued,
    /// Input, output and intermediate images of a running job.
    Processing,
    /// The answer, until the transport has written and dropped it.
    Sending,
}

impl Stage {
    pub const ALL: [Stage; 4] = [Stage::Receiving, Stage::Queued, Stage::Processing, Stage::Sending];

    pub fn label(self) -> &'static str {
        match self {
            Stage::Receiving => "receiving",
            Stage::Queued => "queued",
            Stage::Processing => "processing",
            Stage::Sending => "sending",
        }
    }

    fn index(self) -> usize {
        self as usize
    }
}

/// Why memory could not be charged.
#[derive(Clone, Debug, Error, PartialEq, Eq)]
pub enum MemoryError {
    #[error(
        "request needs {needed} bytes of memory, over {}",
        if *.tenant_share < *.budget { format!("tenant \"{tenant}\"'s share of {tenant_share} bytes (max_memory_bytes)") } else { format!("the server's memory budget of {budget} bytes (tenancy.memory_budget_bytes)") }
    )]
    NeverFits { tenant: TenantId, needed: u64, tenant_share: u64, budget: u64 },
    #[error(
        "no memory for {needed} more bytes after waiting {} ms: tenant \"{tenant}\" holds {tenant_held} of its {tenant_share} bytes, the server {server_held} of {budget}; retry in {} ms",
        waited.as_millis(), retry_after.as_millis()
    )]
    Exhausted {
        tenant: TenantId,
        needed: u64,
        tenant_held: u64,
        tenant_share: u64,
        server_held: u64,
        budget: u64,
        waited: Duration,
        retry_after: Duration,
    },
    #[error(
        "no bytes of the request message arrived for {} ms (tenancy.body_timeout_ms): the {held} bytes of memory charged to tenant \"{tenant}\" for it are released",
        timeout.as_millis()
    )]
    BodyTimeout { tenant: TenantId, timeout: Duration, held: u64 },
}

impl MemoryError {
    /// How long a client should wait before retrying, if retrying can help.
    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            MemoryError::Exhausted { retry_after, .. } => Some(*retry_after),
            MemoryError::NeverFits { .. } | MemoryError::BodyTimeout { .. } => None,
        }
    }
}

#[derive(Debug, Default)]
struct TenantUse {
    held: u64,
    stages: [u64; 4],
    /// When a full share was last logged (one line per tenant per minute).
    logged_full: Option<Instant>,
    /// `imgsvc_tenant_memory_held_bytes{tenant, stage}`, by stage: looked up
    /// in the metrics registry once, not on every charge (a large call is
    /// charged frame by frame).
    gauges: Option<[metrics::Gauge; 4]>,
    /// Charges of this tenant waiting for memory, served in order.
    queue: VecDeque<Arc<Waiter>>,
}

/// A charge waiting in its tenant's queue.
#[derive(Debug)]
struct Waiter {
    n: u64,
    /// Charged before the charges of calls that wait for their first
    /// memory (see [`Account::reserve`]).
    first: bool,
    share: u64,
    stage: Stage,
    /// Set, under the budget's lock, once the bytes are charged for it.
    granted: std::sync::atomic::AtomicBool,
    wake: Notify,
}

impl Waiter {
    fn granted(&self) -> bool {
        self.granted.load(std::sync::atomic::Ordering::Acquire)
    }
}

#[derive(Debug)]
struct BudgetState {
    total: u64,
    held: u64,
    /// The most held since [`Budget::take_high_water`] last looked.
    high_water: u64,
    stages: [u64; 4],
    tenants: HashMap<TenantId, TenantUse>,
    /// `imgsvc_memory_held_bytes{stage}`, by stage, once looked up.
    gauges: Option<[metrics::Gauge; 4]>,
    /// Charges waiting, over all tenants.
    waiting: usize,
}

impl BudgetState {
    fn charge(&mut self, tenant: &TenantId, stage: Stage, n: u64) {
        let use_ = self.tenants.entry(tenant.clone()).or_default();
        use_.held += n;
        use_.stages[stage.index()] += n;
        self.held += n;
        self.high_water = self.high_water.max(self.held);
        self.stages[stage.index()] += n;
        publish(self, tenant, stage);
    }

    /// Charges the heads of the waiting queues that fit now, in each
    /// tenant's order; returns them, to be woken once the lock is let go.
    fn grant(&mut self) -> Vec<Arc<Waiter>> {
        if self.waiting == 0 {
            return Vec::new();
        }
        let queued: Vec<TenantId> = self.tenants.iter().filter(|(_, u)| !u.queue.is_empty()).map(|(t, _)| t.clone()).collect();
        let mut granted = Vec::new();
        for tenant in queued {
            loop {
                let (server_held, total) = (self.held, self.total);
                let use_ = self.tenants.get_mut(&tenant).expect("listed above");
                let Some(head) = use_.queue.front() else { break };
                if use_.held + head.n > head.share || server_held + head.n > total {
                    break;
                }
                let head = use_.queue.pop_front().expect("looked at above");
                self.waiting -= 1;
                self.charge(&tenant, head.stage, head.n);
                head.granted.store(true, std::sync::atomic::Ordering::Release);
                granted.push(head);
            }
        }
        granted
    }

    /// Takes `waiter` out of `tenant`'s queue (it gave up); whoever it
    /// held back may fit now.
    fn withdraw(&mut self, tenant: &TenantId, waiter: &Arc<Waiter>) -> Vec<Arc<Waiter>> {
        if let Some(use_) = self.tenants.get_mut(tenant)
            && let Some(at) = use_.queue.iter().position(|w| Arc::ptr_eq(w, waiter))
        {
            use_.queue.remove(at);
            self.waiting -= 1;
        }
        self.grant()
    }
}

fn wake(granted: Vec<Arc<Waiter>>) {
    for waiter in granted {
        waiter.wake.notify_one();
    }
}

/// The server-wide memory budget and each tenant's share of it.
pub struct Budget {
    state: Mutex<BudgetState>,
}

impl std::fmt::Debug for Budget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let state = self.lock();
        f.debug_struct("Budget").field("total", &state.total).field("held", &state.held).finish_non_exhaustive()
    }
}

impl Budget {
    pub fn new(total: u64) -> Arc<Self> {
        metrics::gauge!("imgsvc_memory_budget_bytes").set(total as f64);
        Arc::new(Self {
            state: Mutex::new(BudgetState {
                total,
                held: 0,
                high_water: 0,
                stages: [0; 4],
                tenants: HashMap::new(),
                gauges: None,
                waiting: 0,
            }),
        })
    }

    /// A new budget size (config reload). Held bytes stay held; charges
    /// fit against the new size from now on.
    pub fn set_total(&self, total: u64) {
        let granted = {
            let mut state = self.lock();
            state.total = total;
            state.grant()
        };
        metrics::gauge!("imgsvc_memory_budget_bytes").set(total as f64);
        wake(granted);
    }

    pub fn total(&self) -> u64 {
        self.lock().total
    }

    /// Bytes held by all accounts.
    pub fn held(&self) -> u64 {
        self.lock().held
    }

    /// The most bytes held at once since the last call (and the bytes
    /// held now, from which the next period starts).
    pub fn take_high_water(&self) -> (u64, u64) {
        let mut state = self.lock();
        let high = state.high_water;
        state.high_water = state.held;
        (high, state.held)
    }

    /// Bytes held by `tenant`'s accounts.
    pub fn tenant_held(&self, tenant: &TenantId) -> u64 {
        self.lock().tenants.get(tenant).map_or(0, |t| t.held)
    }

    /// Bytes held in `stage`, by all accounts or by `tenant`'s.
    pub fn stage_held(&self, stage: Stage, tenant: Option<&TenantId>) -> u64 {
        let state = self.lock();
        match tenant {
            None => state.stages[stage.index()],
            Some(t) => state.tenants.get(t).map_or(0, |u| u.stages[stage.index()]),
        }
    }

    /// A new, empty account for one call of `tenant`, whose accounts
    /// together may hold at most `share` bytes.
    pub fn account(self: &Arc<Self>, tenant: TenantId, share: u64, stage: Stage) -> Arc<Account> {
        Arc::new(Account { budget: self.clone(), tenant, share, state: Mutex::new(AccountState { held: 0, stage }) })
    }

    fn lock(&self) -> MutexGuard<'_, BudgetState> {
        // Integers only: consistent even after a panic elsewhere.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Charges `n` if it fits now. `fair`: not while charges of the
    /// tenant wait (it would pass them).
    fn try_charge(&self, tenant: &TenantId, share: u64, stage: Stage, n: u64, fair: bool) -> Result<(), Shortfall> {
        let mut state = self.lock();
        Self::try_charge_locked(&mut state, tenant, share, stage, n, fair)
    }

    fn try_charge_locked(
        state: &mut BudgetState,
        tenant: &TenantId,
        share: u64,
        stage: Stage,
        n: u64,
        fair: bool,
    ) -> Result<(), Shortfall> {
        let total = state.total;
        if n > share.min(total) {
            return Err(Shortfall::Never { share, total });
        }
        let server_held = state.held;
        let use_ = state.tenants.entry(tenant.clone()).or_default();
        if use_.held + n > share || server_held + n > total || (fair && !use_.queue.is_empty()) {
            let tenant_full = use_.held + n > share;
            let held = use_.held;
            if tenant_full && use_.logged_full.is_none_or(|t| t.elapsed() >= Duration::from_secs(60)) {
                use_.logged_full = Some(Instant::now());
                tracing::warn!(tenant = %tenant, held, share, wanted = n, "tenant has reached its memory share: its requests wait (not read) or are refused");
            }
            return Err(Shortfall::NotNow { tenant_held: held, server_held, share, total });
        }
        state.charge(tenant, stage, n);
        Ok(())
    }

    fn release(&self, tenant: &TenantId, stage: Stage, n: u64) {
        if n == 0 {
            return;
        }
        let granted = {
            let mut state = self.lock();
            if let Some(use_) = state.tenants.get_mut(tenant) {
                use_.held -= n;
                use_.stages[stage.index()] -= n;
            }
            state.held -= n;
            state.stages[stage.index()] -= n;
            publish(&mut state, tenant, stage);
            state.grant()
        };
        wake(granted);
    }

    /// Charges `n` now, or queues a waiter for them (`Ok(Some)`): at the
    /// back of the tenant's queue, or with `first` after the other `first`
    /// waiters only.
    fn charge_or_queue(&self, tenant: &TenantId, share: u64, stage: Stage, n: u64, first: bool) -> Result<Option<Arc<Waiter>>, Shortfall> {
        let mut state = self.lock();
        match Self::try_charge_locked(&mut state, tenant, share, stage, n, !first) {
            Ok(()) => Ok(None),
            Err(Shortfall::NotNow { .. }) => {
                let waiter = Arc::new(Waiter { n, first, share, stage, granted: false.into(), wake: Notify::new() });
                let queue = &mut state.tenants.entry(tenant.clone()).or_default().queue;
                let at = if first { queue.iter().position(|w| !w.first).unwrap_or(queue.len()) } else { queue.len() };
                queue.insert(at, waiter.clone());
                state.waiting += 1;
                Ok(Some(waiter))
            }
            Err(never) => Err(never),
        }
    }

    /// Ends a wait: `Ok` when the waiter was granted its bytes (they are
    /// charged at its stage), else it leaves the queue, and the shortfall
    /// it saw last is returned.
    fn end_wait(&self, tenant: &TenantId, waiter: &Arc<Waiter>) -> Result<(), Shortfall> {
        let (result, granted) = {
            let mut state = self.lock();
            if waiter.granted() {
                return Ok(());
            }
            let granted = state.withdraw(tenant, waiter);
            let (server_held, total) = (state.held, state.total);
            let tenant_held = state.tenants.get(tenant).map_or(0, |u| u.held);
            (Err(Shortfall::NotNow { tenant_held, server_held, share: waiter.share, total }), granted)
        };
        wake(granted);
        result
    }

    fn move_stage(&self, tenant: &TenantId, from: Stage, to: Stage, n: u64) {
        if n == 0 || from == to {
            return;
        }
        let mut state = self.lock();
        if let Some(use_) = state.tenants.get_mut(tenant) {
            use_.stages[from.index()] -= n;
            use_.stages[to.index()] += n;
        }
        state.stages[from.index()] -= n;
        state.stages[to.index()] += n;
        publish(&mut state, tenant, from);
        publish(&mut state, tenant, to);
    }
}

/// Updates the gauges of `stage` (overall and `tenant`'s). The handles are
/// looked up at the first update, i.e. after the metrics recorder is
/// installed (the daemon installs it before it serves).
fn publish(state: &mut BudgetState, tenant: &TenantId, stage: Stage) {
    let i = stage.index();
    let overall = state.gauges.get_or_insert_with(|| Stage::ALL.map(|s| metrics::gauge!("imgsvc_memory_held_bytes", "stage" => s.label())));
    overall[i].set(state.stages[i] as f64);
    if let Some(t) = state.tenants.get_mut(tenant) {
        let gauges = t.gauges.get_or_insert_with(|| {
            Stage::ALL.map(|s| metrics::gauge!("imgsvc_tenant_memory_held_bytes", "tenant" => tenant.to_string(), "stage" => s.label()))
        });
        gauges[i].set(t.stages[i] as f64);
    }
}

enum Shortfall {
    Never { share: u64, total: u64 },
    NotNow { tenant_held: u64, server_held: u64, share: u64, total: u64 },
}

#[derive(Debug)]
struct AccountState {
    held: u64,
    stage: Stage,
}

/// The bytes one call holds. Everything still held is released when the
/// last reference is dropped, on every path (success, refusal,
/// cancellation, a client gone mid-body, a deadline).
#[derive(Debug)]
pub struct Account {
    budget: Arc<Budget>,
    tenant: TenantId,
    share: u64,
    state: Mutex<AccountState>,
}

/// How far beyond its share the unread windows of a tenant's held-back
/// calls may take it: an eighth of the share ([`Account::try_reserve_unread`]).
pub const UNREAD_OVERDRAFT_DIVISOR: u64 = 8;

impl Account {
    pub fn tenant(&self) -> &TenantId {
        &self.tenant
    }

    /// Bytes this account holds now.
    pub fn held(&self) -> u64 {
        self.lock().held
    }

    pub fn stage(&self) -> Stage {
        self.lock().stage
    }

    /// Charges `n` more bytes if they fit now.
    pub fn try_reserve(&self, n: u64) -> Result<(), MemoryError> {
        let mut state = self.lock();
        match self.budget.try_charge(&self.tenant, self.share, state.stage, n, false) {
            Ok(()) => {
                state.held += n;
                Ok(())
            }
            Err(shortfall) => Err(self.error(n, shortfall, Duration::ZERO)),
        }
    }

    /// As [`Account::try_reserve`], for request bytes that are already in
    /// memory and must be counted, not waited for (the unread window of a
    /// call held back for memory): they may take the tenant up to
    /// [`UNREAD_OVERDRAFT_DIVISOR`]th of its share beyond it, while the
    /// server's budget has room. The budget itself is never exceeded; the
    /// tenant's later charges wait until it is back under its share.
    pub fn try_reserve_unread(&self, n: u64) -> Result<(), MemoryError> {
        let mut state = self.lock();
        let limit = self.share.saturating_add(self.share / UNREAD_OVERDRAFT_DIVISOR);
        match self.budget.try_charge(&self.tenant, limit, state.stage, n, false) {
            Ok(()) => {
                state.held += n;
                Ok(())
            }
            Err(shortfall) => Err(self.error(n, shortfall, Duration::ZERO)),
        }
    }

    /// As [`Account::try_reserve`], but not ahead of the tenant's charges
    /// that wait for memory.
    pub fn try_reserve_fair(&self, n: u64) -> Result<(), MemoryError> {
        let mut state = self.lock();
        match self.budget.try_charge(&self.tenant, self.share, state.stage, n, true) {
            Ok(()) => {
                state.held += n;
                Ok(())
            }
            Err(shortfall) => Err(self.error(n, shortfall, Duration::ZERO)),
        }
    }

    /// Whether `n` more bytes could ever fit this account's tenant.
    pub fn check_fits(&self, n: u64) -> Result<(), MemoryError> {
        let total = self.budget.total();
        if n > self.share.min(total) {
            return Err(self.error(n, Shortfall::Never { share: self.share, total }, Duration::ZERO));
        }
        Ok(())
    }

    /// Charges `n` more bytes for a call that already holds memory (its
    /// later messages, its images), waiting up to `max_wait` for memory
    /// to be released when they do not fit now: ahead of the charges of
    /// calls waiting for their first memory ([`Account::reserve_in_turn`]),
    /// which may be waiting for this very call to finish. Fails at once
    /// when they can never fit. `on_wait` runs once if the charge waits.
    pub async fn reserve(&self, n: u64, max_wait: Duration, on_wait: impl FnOnce()) -> Result<(), MemoryError> {
        self.reserve_queued(n, max_wait, on_wait, true).await
    }

    /// As [`Account::reserve`], for a call's first message: behind every
    /// charge of the tenant that already waits, so a large call is not
    /// passed by smaller ones that came after it.
    pub async fn reserve_in_turn(&self, n: u64, max_wait: Duration, on_wait: impl FnOnce()) -> Result<(), MemoryError> {
        self.reserve_queued(n, max_wait, on_wait, false).await
    }

    async fn reserve_queued(&self, n: u64, max_wait: Duration, on_wait: impl FnOnce(), first: bool) -> Result<(), MemoryError> {
        if n == 0 {
            return Ok(());
        }
        let started = Instant::now();
        let stage = self.stage();
        let waiter = match self.budget.charge_or_queue(&self.tenant, self.share, stage, n, first) {
            Ok(None) => {
                self.add_granted(n, stage);
                return Ok(());
            }
            Ok(Some(waiter)) => waiter,
            Err(shortfall) => return Err(self.error(n, shortfall, Duration::ZERO)),
        };
        on_wait();
        // Leaves the queue (or gives back what it was granted) if this
        // future is dropped while it waits.
        let mut queued = Queued { budget: &self.budget, tenant: &self.tenant, waiter: Some(waiter.clone()) };
        let _ = tokio::time::timeout(max_wait, waiter.wake.notified()).await;
        queued.waiter = None;
        match self.budget.end_wait(&self.tenant, &waiter) {
            Ok(()) => {
                self.add_granted(n, waiter.stage);
                Ok(())
            }
            Err(shortfall) => Err(self.error(n, shortfall, started.elapsed())),
        }
    }

    /// Adds `n` bytes charged to the budget at `stage` to this account.
    fn add_granted(&self, n: u64, stage: Stage) {
        let mut state = self.lock();
        // The handler may have moved the account on meanwhile.
        self.budget.move_stage(&self.tenant, stage, state.stage, n);
        state.held += n;
    }

    /// Releases `n` of the bytes held (at most what is held).
    pub fn release(&self, n: u64) {
        let mut state = self.lock();
        let n = n.min(state.held);
        state.held -= n;
        self.budget.release(&self.tenant, state.stage, n);
    }

    /// Holds exactly `target` bytes: releases the excess, or charges the
    /// difference if it fits now.
    pub fn try_resize(&self, target: u64) -> Result<(), MemoryError> {
        let held = self.held();
        if target <= held {
            self.release(held - target);
            Ok(())
        } else {
            self.try_reserve(target - held)
        }
    }

    /// Moves the bytes held (and later charges) to `stage`.
    pub fn set_stage(&self, stage: Stage) {
        let mut state = self.lock();
        self.budget.move_stage(&self.tenant, state.stage, stage, state.held);
        state.stage = stage;
    }

    /// Moves `n` bytes out of this account into a new one of the same
    /// tenant, at `stage`, without releasing them (no other call can take
    /// them in between). Used to hand an answer's bytes to the frames
    /// that carry it.
    pub fn split(&self, n: u64, stage: Stage) -> Arc<Account> {
        let mut state = self.lock();
        let n = n.min(state.held);
        state.held -= n;
        self.budget.move_stage(&self.tenant, state.stage, stage, n);
        Arc::new(Account {
            budget: self.budget.clone(),
            tenant: self.tenant.clone(),
            share: self.share,
            state: Mutex::new(AccountState { held: n, stage }),
        })
    }

    fn error(&self, needed: u64, shortfall: Shortfall, waited: Duration) -> MemoryError {
        let tenant = self.tenant.clone();
        let error = match shortfall {
            Shortfall::Never { share, total } => MemoryError::NeverFits { tenant, needed, tenant_share: share, budget: total },
            Shortfall::NotNow { tenant_held, server_held, share, total } => MemoryError::Exhausted {
                tenant,
                needed,
                tenant_held,
                tenant_share: share,
                server_held,
                budget: total,
                waited,
                // Memory comes back as requests finish: a short, fixed hint.
                retry_after: Duration::from_millis(250),
            },
        };
        let reason = match error {
            MemoryError::NeverFits { .. } => "never_fits",
            MemoryError::Exhausted { .. } => "exhausted",
            MemoryError::BodyTimeout { .. } => "body_timeout",
        };
        if !waited.is_zero() || matches!(error, MemoryError::NeverFits { .. }) {
            metrics::counter!("imgsvc_memory_refusals_total", "tenant" => self.tenant.to_string(), "reason" => reason).increment(1);
        }
        error
    }

    fn lock(&self) -> MutexGuard<'_, AccountState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl Drop for Account {
    fn drop(&mut self) {
        let state = self.state.get_mut().unwrap_or_else(|e| e.into_inner());
        let (held, stage) = (state.held, state.stage);
        state.held = 0;
        self.budget.release(&self.tenant, stage, held);
    }
}

/// A waiting charge whose wait is not over: dropped with the future that
/// waits, it leaves the queue, or gives back what it was granted.
struct Queued<'a> {
    budget: &'a Budget,
    tenant: &'a TenantId,
    waiter: Option<Arc<Waiter>>,
}

impl Drop for Queued<'_> {
    fn drop(&mut self) {
        if let Some(waiter) = self.waiter.take()
            && self.budget.end_wait(self.tenant, &waiter).is_ok()
        {
            self.budget.release(self.tenant, waiter.stage, waiter.n);
        }
    }
}

/// Counts a refusal for want of memory decided outside an [`Account`]
/// (`reason` as in `imgsvc_memory_refusals_total`).
pub fn count_refusal(tenant: &TenantId, reason: &'static str) {
    metrics::counter!("imgsvc_memory_refusals_total", "tenant" => tenant.to_string(), "reason" => reason).increment(1);
}

/// Counts a charge that had to wait for memory (back-pressure).
pub fn count_wait(tenant: &TenantId) {
    metrics::counter!("imgsvc_memory_waits_total", "tenant" => tenant.to_string()).increment(1);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(name: &str) -> TenantId {
        TenantId::parse(name).unwrap()
    }

    #[test]
    fn charges_count_against_the_tenant_share_and_the_budget_and_come_back_on_drop() {
        let budget = Budget::new(1000);
        let a = budget.account(t("a"), 600, Stage::Receiving);
        a.try_reserve(400).unwrap();
        assert_eq!((a.held(), budget.held(), budget.tenant_held(&t("a"))), (400, 400, 400));
        // 400 + 300 > a's share of 600, though the budget has room.
        let a2 = budget.account(t("a"), 600, Stage::Receiving);
        let err = a2.try_reserve(300).unwrap_err();
        assert!(matches!(err, MemoryError::Exhausted { tenant_held: 400, tenant_share: 600, .. }), "{err:?}");
        // Another tenant still gets what is left of the budget, and no more.
        let b = budget.account(t("b"), 1000, Stage::Receiving);
        b.try_reserve(600).unwrap();
        assert!(matches!(b.try_reserve(1).unwrap_err(), MemoryError::Exhausted { server_held: 1000, budget: 1000, .. }));
        drop(a);
        assert_eq!((budget.held(), budget.tenant_held(&t("a"))), (600, 0));
        drop(b);
        drop(a2);
        assert_eq!(budget.held(), 0);
    }

    #[test]
    fn unread_bytes_may_take_a_tenant_an_eighth_beyond_its_share_never_beyond_the_budget() {
        let budget = Budget::new(1000);
        let a = budget.account(t("a"), 800, Stage::Receiving);
        a.try_reserve(800).unwrap();
        assert!(a.try_reserve(1).is_err(), "the share is full");
        // An eighth of 800 beyond it, for unread bytes only.
        a.try_reserve_unread(100).unwrap();
        assert!(matches!(a.try_reserve_unread(1).unwrap_err(), MemoryError::Exhausted { tenant_held: 900, tenant_share: 900, .. }));
        assert_eq!((budget.held(), budget.tenant_held(&t("a"))), (900, 900));
        // The budget bounds it too: with 950 held, only 50 more.
        let b = budget.account(t("b"), 1000, Stage::Receiving);
        b.try_reserve(50).unwrap();
        let c = budget.account(t("c"), 1000, Stage::Receiving);
        c.try_reserve(950).unwrap_err();
        assert!(matches!(c.try_reserve_unread(51).unwrap_err(), MemoryError::Exhausted { server_held: 950, budget: 1000, .. }));
        c.try_reserve_unread(50).unwrap();
        drop((a, b, c));
        assert_eq!(budget.held(), 0);
    }

    #[test]
    fn what_can_never_fit_is_refused_naming_the_share_or_the_budget() {
        let budget = Budget::new(1000);
        let a = budget.account(t("a"), 600, Stage::Receiving);
        assert_eq!(
            a.try_reserve(601).unwrap_err().to_string(),
            "request needs 601 bytes of memory, over tenant \"a\"'s share of 600 bytes (max_memory_bytes)"
        );
        let b = budget.account(t("b"), 1000, Stage::Receiving);
        assert_eq!(
            b.try_reserve(1001).unwrap_err().to_string(),
            "request needs 1001 bytes of memory, over the server's memory budget of 1000 bytes (tenancy.memory_budget_bytes)"
        );
        assert_eq!(budget.held(), 0);
    }

    #[test]
    fn stages_move_bytes_without_charging_them_twice() {
        let budget = Budget::new(1000);
        let a = budget.account(t("a"), 1000, Stage::Receiving);
        a.try_reserve(300).unwrap();
        assert_eq!(budget.stage_held(Stage::Receiving, None), 300);
        a.set_stage(Stage::Processing);
        a.try_reserve(200).unwrap();
        assert_eq!(budget.stage_held(Stage::Receiving, None), 0);
        assert_eq!(budget.stage_held(Stage::Processing, Some(&t("a"))), 500);
        let frame = a.split(100, Stage::Sending);
        assert_eq!((a.held(), frame.held(), budget.held()), (400, 100, 500));
        assert_eq!(budget.stage_held(Stage::Sending, None), 100);
        a.try_resize(50).unwrap();
        assert_eq!(budget.held(), 150);
        drop(frame);
        drop(a);
        assert_eq!(budget.held(), 0);
        for stage in Stage::ALL {
            assert_eq!(budget.stage_held(stage, None), 0);
        }
    }

    #[tokio::test]
    async fn a_waiting_charge_gets_the_memory_when_it_is_released() {
        let budget = Budget::new(1000);
        let holder = budget.account(t("a"), 1000, Stage::Processing);
        holder.try_reserve(800).unwrap();
        let waiter = budget.account(t("b"), 1000, Stage::Receiving);
        let mut waited = false;
        let release = async {
            tokio::task::yield_now().await;
            holder.release(800);
        };
        let (reserved, ()) = tokio::join!(waiter.reserve(500, Duration::from_secs(10), || waited = true), release);
        reserved.unwrap();
        assert!(waited, "the charge had to wait");
        assert_eq!((waiter.held(), budget.held()), (500, 500));
    }

    #[tokio::test]
    async fn a_waiting_charge_is_refused_after_its_deadline_with_a_retry_hint_and_holds_nothing() {
        let budget = Budget::new(1000);
        let holder = budget.account(t("a"), 1000, Stage::Processing);
        holder.try_reserve(800).unwrap();
        let waiter = budget.account(t("b"), 1000, Stage::Receiving);
        let err = waiter.reserve(500, Duration::from_millis(50), || ()).await.unwrap_err();
        assert!(matches!(err, MemoryError::Exhausted { needed: 500, server_held: 800, .. }), "{err:?}");
        assert_eq!(err.retry_after(), Some(Duration::from_millis(250)));
        assert_eq!((waiter.held(), budget.held()), (0, 800));
    }

    #[tokio::test]
    async fn a_charge_that_can_never_fit_does_not_wait() {
        let budget = Budget::new(1000);
        let a = budget.account(t("a"), 500, Stage::Receiving);
        let started = Instant::now();
        let err = a.reserve(501, Duration::from_secs(30), || panic!("must not wait")).await.unwrap_err();
        assert!(matches!(err, MemoryError::NeverFits { needed: 501, tenant_share: 500, .. }));
        assert!(started.elapsed() < Duration::from_secs(5));
    }

    /// Polls `future` once.
    fn poll_once<F: Future>(future: std::pin::Pin<&mut F>) -> std::task::Poll<F::Output> {
        future.poll(&mut std::task::Context::from_waker(std::task::Waker::noop()))
    }

    use std::future::Future;

    #[tokio::test]
    async fn waiters_are_served_in_order_and_a_large_one_is_not_passed_by_smaller_ones() {
        let budget = Budget::new(1000);
        let holder = budget.account(t("a"), 1000, Stage::Processing);
        holder.try_reserve(900).unwrap();
        let (large, small) = (budget.account(t("a"), 1000, Stage::Receiving), budget.account(t("a"), 1000, Stage::Receiving));
        let mut large_wait = std::pin::pin!(large.reserve_in_turn(500, Duration::from_secs(30), || ()));
        assert!(poll_once(large_wait.as_mut()).is_pending(), "500 more does not fit: it waits");
        // 50 would fit now, but the large charge waits first.
        assert!(matches!(small.try_reserve_fair(50), Err(MemoryError::Exhausted { .. })));
        let mut small_wait = std::pin::pin!(small.reserve_in_turn(50, Duration::from_secs(30), || ()));
        assert!(poll_once(small_wait.as_mut()).is_pending(), "queued behind the large charge");
        holder.release(450);
        // 450 + 500 fit: the large charge is granted, then the small one.
        assert!(matches!(poll_once(large_wait.as_mut()), std::task::Poll::Ready(Ok(()))));
        assert!(matches!(poll_once(small_wait.as_mut()), std::task::Poll::Ready(Ok(()))));
        assert_eq!((large.held(), small.held(), budget.held()), (500, 50, 1000));
    }

    #[tokio::test]
    async fn a_release_grants_only_what_now_fits() {
        let budget = Budget::new(1000);
        let holder = budget.account(t("a"), 1000, Stage::Processing);
        holder.try_reserve(1000).unwrap();
        let waiters: Vec<_> = (0..3).map(|_| budget.account(t("b"), 1000, Stage::Receiving)).collect();
        let mut waits: Vec<_> = waiters.iter().map(|w| Box::pin(w.reserve_in_turn(400, Duration::from_secs(30), || ()))).collect();
        for wait in &mut waits {
            assert!(poll_once(wait.as_mut()).is_pending());
        }
        holder.release(500);
        // One 400 fits in the 500 released; the second would not.
        let ready: Vec<bool> = waits.iter_mut().map(|w| poll_once(w.as_mut()).is_ready()).collect();
        assert_eq!(ready, [true, false, false]);
        assert_eq!(budget.held(), 900);
        holder.release(500);
        let ready: Vec<bool> = waits[1..].iter_mut().map(|w| poll_once(w.as_mut()).is_ready()).collect();
        assert_eq!(ready, [true, false], "400 of the 500 released fit, the next 400 not");
        drop(waits);
        drop(waiters);
        assert_eq!(budget.held(), 0, "the waiter still queued left the queue; the granted gave back their bytes");
    }

    #[tokio::test]
    async fn a_waiter_that_gives_up_lets_the_one_behind_it_through_and_keeps_nothing() {
        let budget = Budget::new(1000);
        let holder = budget.account(t("a"), 1000, Stage::Processing);
        holder.try_reserve(700).unwrap();
        let (large, small) = (budget.account(t("a"), 1000, Stage::Receiving), budget.account(t("a"), 1000, Stage::Receiving));
        let mut large_wait = Box::pin(large.reserve_in_turn(600, Duration::from_secs(30), || ()));
        assert!(poll_once(large_wait.as_mut()).is_pending());
        let mut small_wait = std::pin::pin!(small.reserve_in_turn(200, Duration::from_secs(30), || ()));
        assert!(poll_once(small_wait.as_mut()).is_pending(), "behind the large charge");
        drop(large_wait);
        assert!(matches!(poll_once(small_wait.as_mut()), std::task::Poll::Ready(Ok(()))), "granted when the head left");
        assert_eq!((large.held(), small.held(), budget.held()), (0, 200, 900));
        // A waiter granted its bytes but dropped before it saw them gives them back.
        let late = budget.account(t("a"), 1000, Stage::Receiving);
        let mut late_wait = Box::pin(late.reserve_in_turn(300, Duration::from_secs(30), || ()));
        assert!(poll_once(late_wait.as_mut()).is_pending());
        holder.release(700);
        assert_eq!(budget.held(), 500, "granted on release");
        drop(late_wait);
        assert_eq!((late.held(), budget.held()), (0, 200));
    }

    #[tokio::test]
    async fn a_call_that_holds_memory_is_charged_before_calls_waiting_for_their_first() {
        let budget = Budget::new(1000);
        let running = budget.account(t("a"), 1000, Stage::Processing);
        running.try_reserve(600).unwrap();
        let new = budget.account(t("a"), 1000, Stage::Receiving);
        let mut new_wait = std::pin::pin!(new.reserve_in_turn(600, Duration::from_secs(30), || ()));
        assert!(poll_once(new_wait.as_mut()).is_pending());
        // The running call's top-up passes the new call (which waits for
        // the running call to finish), and is granted first on release.
        running.try_reserve(300).unwrap();
        let other = budget.account(t("a"), 1000, Stage::Processing);
        other.try_reserve(100).unwrap();
        let mut top_up = std::pin::pin!(running.reserve(100, Duration::from_secs(30), || ()));
        assert!(poll_once(top_up.as_mut()).is_pending());
        other.release(100);
        assert!(matches!(poll_once(top_up.as_mut()), std::task::Poll::Ready(Ok(()))));
        assert!(poll_once(new_wait.as_mut()).is_pending());
        running.release(1000);
        assert!(matches!(poll_once(new_wait.as_mut()), std::task::Poll::Ready(Ok(()))));
    }
}
