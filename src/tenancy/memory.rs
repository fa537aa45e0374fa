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
//! at once. Releases wake the waiters.
//!
//! What it does not do: allocate, copy, or know about transports. The
//! bytes are the caller's; an account only says how many it holds.

use std::{
    collections::HashMap,
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
}

impl MemoryError {
    /// How long a client should wait before retrying, if retrying can help.
    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            MemoryError::Exhausted { retry_after, .. } => Some(*retry_after),
            MemoryError::NeverFits { .. } => None,
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
}

/// The server-wide memory budget and each tenant's share of it.
pub struct Budget {
    state: Mutex<BudgetState>,
    released: Notify,
}

impl std::fmt::Debug for Budget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let state = self.lock();
        f.debug_struct("Budget").field("total", &state.total).field("held", &state.held).finish_non_exhaustive()
    }
}

/// How often a waiting charge looks again even without a release (a
/// reload may have grown the budget).
const RECHECK: Duration = Duration::from_millis(100);

impl Budget {
    pub fn new(total: u64) -> Arc<Self> {
        metrics::gauge!("imgsvc_memory_budget_bytes").set(total as f64);
        Arc::new(Self {
            state: Mutex::new(BudgetState { total, held: 0, high_water: 0, stages: [0; 4], tenants: HashMap::new(), gauges: None }),
            released: Notify::new(),
        })
    }

    /// A new budget size (config reload). Held bytes stay held; charges
    /// fit against the new size from now on.
    pub fn set_total(&self, total: u64) {
        self.lock().total = total;
        metrics::gauge!("imgsvc_memory_budget_bytes").set(total as f64);
        self.wake();
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

    fn try_charge(&self, tenant: &TenantId, share: u64, stage: Stage, n: u64) -> Result<(), Shortfall> {
        let mut state = self.lock();
        let total = state.total;
        if n > share.min(total) {
            return Err(Shortfall::Never { share, total });
        }
        let server_held = state.held;
        let use_ = state.tenants.entry(tenant.clone()).or_default();
        if use_.held + n > share || server_held + n > total {
            let tenant_full = use_.held + n > share;
            let held = use_.held;
            if tenant_full && use_.logged_full.is_none_or(|t| t.elapsed() >= Duration::from_secs(60)) {
                use_.logged_full = Some(Instant::now());
                tracing::warn!(tenant = %tenant, held, share, wanted = n, "tenant has reached its memory share: its requests wait (not read) or are refused");
            }
            return Err(Shortfall::NotNow { tenant_held: held, server_held, share, total });
        }
        use_.held += n;
        use_.stages[stage.index()] += n;
        state.held += n;
        state.high_water = state.high_water.max(state.held);
        state.stages[stage.index()] += n;
        publish(&mut state, tenant, stage);
        Ok(())
    }

    fn release(&self, tenant: &TenantId, stage: Stage, n: u64) {
        if n == 0 {
            return;
        }
        {
            let mut state = self.lock();
            if let Some(use_) = state.tenants.get_mut(tenant) {
                use_.held -= n;
                use_.stages[stage.index()] -= n;
            }
            state.held -= n;
            state.stages[stage.index()] -= n;
            publish(&mut state, tenant, stage);
        }
        self.wake();
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

    fn wake(&self) {
        self.released.notify_waiters();
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
        match self.budget.try_charge(&self.tenant, self.share, state.stage, n) {
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

    /// Charges `n` more bytes, waiting up to `max_wait` for memory to be
    /// released when they do not fit now. Fails at once when they can
    /// never fit. `on_wait` runs once if the charge has to wait.
    pub async fn reserve(&self, n: u64, max_wait: Duration, on_wait: impl FnOnce()) -> Result<(), MemoryError> {
        let started = Instant::now();
        let deadline = started + max_wait;
        let mut on_wait = Some(on_wait);
        loop {
            // Registered before the attempt, so a release in between is not missed.
            let released = self.budget.released.notified();
            tokio::pin!(released);
            released.as_mut().enable();
            match self.try_reserve_inner(n) {
                Ok(()) => return Ok(()),
                Err(Shortfall::Never { share, total }) => {
                    return Err(self.error(n, Shortfall::Never { share, total }, started.elapsed()));
                }
                Err(shortfall) => {
                    let now = Instant::now();
                    if now >= deadline {
                        return Err(self.error(n, shortfall, started.elapsed()));
                    }
                    if let Some(f) = on_wait.take() {
                        f();
                    }
                    let _ = tokio::time::timeout((deadline - now).min(RECHECK), released).await;
                }
            }
        }
    }

    fn try_reserve_inner(&self, n: u64) -> Result<(), Shortfall> {
        let mut state = self.lock();
        self.budget.try_charge(&self.tenant, self.share, state.stage, n)?;
        state.held += n;
        Ok(())
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
}
