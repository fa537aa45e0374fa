//! Multi-tenancy at the service edge: who may do what, how often, how much
//! at once, and in which order pixel work runs.
//!
//! Every request passes, in this order and before any pixel work:
//! 1. [`Tenancy::admit`]: tenant known and enabled (PERMISSION_DENIED), the
//!    operations allowed (PERMISSION_DENIED), the token bucket
//!    (RESOURCE_EXHAUSTED with a retry hint), the request size
//!    (RESOURCE_EXHAUSTED). The admission carries the tenant's effective
//!    pixel limit for image validation.
//! 2. [`Tenancy::run`]: the tenant's running + waiting requests against
//!    `max_concurrent_requests + max_queued_requests`, the server-wide
//!    queue, and the memory budget (all RESOURCE_EXHAUSTED at once); then
//!    the job waits in its tenant's queue until the deficit-round-robin
//!    [`scheduler`] picks it: at most `worker_threads` jobs run at once, a
//!    tenant runs at most `max_concurrent_requests`, and the bytes of images
//!    in flight stay within `tenancy.memory_budget_bytes`. Images of at most
//!    `limits.inline_max_pixels` skip the queue and run on the calling
//!    thread, within the same tenant and memory limits (see
//!    [`reserve_inline`]).
//!
//! A request cancelled while queued leaves the queue and its job never runs
//! (`imgsvc_cancelled_while_queued_total{tenant}` counts it;
//! `imgsvc_jobs_started_total{tenant}` counts jobs that ran); resources
//! of a running job are released when the job actually finishes (by a guard
//! that travels with the job onto the worker thread), so the accounting
//! never lies.
//! [`Tenancy::reconfigure`] swaps the policy at once for new requests
//! (config reload); admitted requests keep the terms they were admitted on.

pub mod memory;
pub mod policy;
pub mod rate;
pub mod scheduler;

use std::{
    collections::HashMap,
    panic::AssertUnwindSafe,
    sync::{Arc, Mutex, MutexGuard},
    time::{Duration, Instant},
};

use thiserror::Error;
use tokio::sync::oneshot;

use crate::{
    config::Limits,
    identity::TenantId,
    serving::worker::{WorkerError, WorkerPool},
};
use memory::{Account, Budget, MemoryError, Stage};
use policy::{Operation, TenancyConfig, TenantPolicy};
use rate::TokenBucket;
use scheduler::DrrScheduler;

/// Why a tenant's request was refused.
#[derive(Debug, Error, PartialEq)]
pub enum TenancyError {
    #[error("tenant \"{tenant}\" is not configured on this server")]
    UnknownTenant { tenant: TenantId },
    #[error("tenant \"{tenant}\" is disabled on this server")]
    Disabled { tenant: TenantId },
    #[error("operation {operation} is not allowed for tenant \"{tenant}\" (allowed: {allowed})")]
    OperationNotAllowed { tenant: TenantId, operation: Operation, allowed: String },
    #[error("tenant \"{tenant}\" is over its rate limit of {rate} requests per second (burst {burst}); retry in {} ms", retry_after.as_millis())]
    RateLimited { tenant: TenantId, rate: f64, burst: u32, retry_after: Duration },
    #[error("request is {bytes} bytes, over tenant \"{tenant}\"'s limit of {limit} bytes")]
    RequestTooLarge { tenant: TenantId, bytes: u64, limit: u64 },
    #[error(
        "tenant \"{tenant}\" already has {admitted} requests running or queued, its limit (max_concurrent_requests {max_concurrent} + max_queued_requests {max_queued})"
    )]
    TenantBusy { tenant: TenantId, admitted: u32, max_concurrent: u32, max_queued: u32 },
    #[error("server queue is full: {queued} image jobs are waiting (limits.max_queued_jobs)")]
    ServerBusy { queued: usize },
    #[error("image needs {needed} bytes in flight, over the server's memory budget of {budget} bytes (tenancy.memory_budget_bytes)")]
    MemoryBudget { needed: u64, budget: u64 },
    #[error(transparent)]
    Memory(#[from] MemoryError),
    #[error(transparent)]
    Worker(#[from] WorkerError),
}

impl TenancyError {
    /// A short label for metrics.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::UnknownTenant { .. } => "unknown_tenant",
            Self::Disabled { .. } => "disabled",
            Self::OperationNotAllowed { .. } => "operation_not_allowed",
            Self::RateLimited { .. } => "rate_limited",
            Self::RequestTooLarge { .. } => "request_too_large",
            Self::TenantBusy { .. } => "tenant_busy",
            Self::ServerBusy { .. } => "server_busy",
            Self::MemoryBudget { .. } => "memory_budget",
            Self::Memory(MemoryError::NeverFits { .. }) => "memory_share",
            Self::Memory(MemoryError::Exhausted { .. }) => "memory_exhausted",
            Self::Worker(_) => "worker",
        }
    }
}

/// The policy in force: tenants and the server-wide limits.
#[derive(Clone, Debug)]
pub struct RuntimePolicy {
    pub limits: Limits,
    pub tenancy: TenancyConfig,
}

/// A request that passed [`Tenancy::admit`], with the terms it runs under.
#[derive(Clone, Debug)]
pub struct Admission {
    pub tenant: TenantId,
    pub policy: TenantPolicy,
    /// The tenant's pixel limit (never above the server's).
    pub max_image_pixels: u64,
    pub max_operations: usize,
}

impl Admission {
    /// The operations a request turned out to need (a v1 body names them):
    /// allowed for this tenant?
    pub fn check_operations(&self, operations: &[Operation]) -> Result<(), TenancyError> {
        match operations.iter().find(|op| !self.policy.allows(**op)) {
            Some(op) => {
                Err(TenancyError::OperationNotAllowed { tenant: self.tenant.clone(), operation: *op, allowed: self.policy.allowed_list() })
            }
            None => Ok(()),
        }
    }

    /// A request message of `bytes`: within the tenant's limit?
    pub fn check_request_bytes(&self, bytes: u64) -> Result<(), TenancyError> {
        if bytes > self.policy.max_request_bytes {
            return Err(TenancyError::RequestTooLarge { tenant: self.tenant.clone(), bytes, limit: self.policy.max_request_bytes });
        }
        Ok(())
    }
}

/// What a job costs the scheduler (pixels) and the memory budget (bytes).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct JobCost {
    pub pixels: u64,
    pub bytes: u64,
    /// The job runs our kernels only, so `pixels` bounds its CPU time and a
    /// tiny one may run inline. Not so for decoding and encoding, whose cost
    /// is only estimated before they start.
    pub kernels_only: bool,
}

impl JobCost {
    /// Kernel work over `pixels` pixels (summed over the steps).
    pub const fn kernels(pixels: u64, bytes: u64) -> Self {
        Self { pixels, bytes, kernels_only: true }
    }

    /// Other work (codecs) whose cost is estimated as `pixels`.
    pub const fn estimated(pixels: u64, bytes: u64) -> Self {
        Self { pixels, bytes, kernels_only: false }
    }
}

struct Pending {
    start: oneshot::Sender<Reservation>,
    /// Held by the job's account since before it was queued; counted in
    /// `imgsvc_memory_in_flight_bytes` while the job runs.
    bytes: u64,
    max_concurrent: u32,
    enqueued: Instant,
}

struct State {
    policy: Arc<RuntimePolicy>,
    buckets: HashMap<TenantId, TokenBucket>,
    running: HashMap<TenantId, u32>,
    running_total: usize,
    /// Bytes of the jobs running now (a gauge; the budget itself is
    /// enforced by [`Budget`]).
    memory_in_use: u64,
    /// Jobs waiting for their memory before they are queued.
    waiting_memory: HashMap<TenantId, u32>,
    /// Calls holding a [`CallSlot`].
    calls: HashMap<TenantId, u32>,
    scheduler: DrrScheduler<Pending>,
}

struct Shared {
    state: Mutex<State>,
    pool: WorkerPool,
    worker_slots: usize,
    budget: Arc<Budget>,
}

/// Per-tenant admission and fair scheduling of pixel work.
#[derive(Clone)]
pub struct Tenancy {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for Tenancy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tenancy").field("worker_slots", &self.shared.worker_slots).finish_non_exhaustive()
    }
}

/// Counts for tests and metrics.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TenantLoad {
    pub running: u32,
    pub queued: u32,
}

impl Tenancy {
    pub fn new(policy: RuntimePolicy, pool: WorkerPool) -> Self {
        let worker_slots = pool.threads();
        let budget = Budget::new(policy.tenancy.memory_budget_bytes);
        crate::telemetry::tenant_limits::publish(None, &policy.tenancy);
        let state = State {
            policy: Arc::new(policy),
            buckets: HashMap::new(),
            running: HashMap::new(),
            running_total: 0,
            memory_in_use: 0,
            waiting_memory: HashMap::new(),
            calls: HashMap::new(),
            scheduler: DrrScheduler::default(),
        };
        Self { shared: Arc::new(Shared { state: Mutex::new(state), pool, worker_slots, budget }) }
    }

    /// The memory budget every request's bytes are charged to.
    pub fn budget(&self) -> &Arc<Budget> {
        &self.shared.budget
    }

    /// An account holding `bytes` for one connection of `tenant` (its
    /// HTTP/2 window), if they fit its share now; `None` for a tenant that
    /// is not served (its calls are refused anyway).
    pub fn connection_account(&self, tenant: &TenantId, bytes: u64) -> Result<Option<Arc<Account>>, MemoryError> {
        let share = match self.policy().tenancy.policy(tenant) {
            Some(policy) => policy.max_memory_bytes,
            None => return Ok(None),
        };
        let account = self.shared.budget.account(tenant.clone(), share, Stage::Receiving);
        account.try_reserve(bytes)?;
        Ok(Some(account))
    }

    /// A new, empty memory account for one call of an admitted tenant.
    pub fn account(&self, admission: &Admission, stage: Stage) -> Arc<Account> {
        self.shared.budget.account(admission.tenant.clone(), admission.policy.max_memory_bytes, stage)
    }

    pub fn policy(&self) -> Arc<RuntimePolicy> {
        lock(&self.shared.state).policy.clone()
    }

    /// Adopts a new policy for requests admitted from now on.
    pub fn reconfigure(&self, policy: RuntimePolicy) {
        let now = Instant::now();
        let mut state = lock(&self.shared.state);
        let tenancy = &policy.tenancy;
        state.buckets.retain(|tenant, bucket| match tenancy.policy(tenant).and_then(|p| p.rate) {
            Some((rate, burst)) => {
                if !bucket.matches(rate, burst) {
                    bucket.reconfigure(rate, burst, now);
                }
                true
            }
            None => false,
        });
        self.shared.budget.set_total(policy.tenancy.memory_budget_bytes);
        crate::telemetry::tenant_limits::publish(Some(&state.policy.tenancy), &policy.tenancy);
        state.policy = Arc::new(policy);
    }

    /// How many of `tenant`'s requests are running and queued right now.
    pub fn load(&self, tenant: &TenantId) -> TenantLoad {
        let state = lock(&self.shared.state);
        let waiting = state.waiting_memory.get(tenant).copied().unwrap_or(0);
        TenantLoad { running: state.running.get(tenant).copied().unwrap_or(0), queued: state.scheduler.queued(tenant) as u32 + waiting }
    }

    /// Step 1 at the request's headers, before a byte of its body is read:
    /// [`Tenancy::admit`] (with the operations the method names, and no
    /// size yet), and one of the tenant's call slots
    /// (`max_concurrent_requests + max_queued_requests` calls at once,
    /// from their headers until their answer has been sent).
    pub fn admit_call(&self, tenant: &TenantId, operations: &[Operation]) -> Result<(Admission, CallSlot), TenancyError> {
        let admission = self.admit(tenant, operations, 0)?;
        let mut state = lock(&self.shared.state);
        let (max_concurrent, max_queued) = (admission.policy.max_concurrent_requests, admission.policy.max_queued_requests);
        let calls = state.calls.entry(tenant.clone()).or_default();
        if *calls >= max_concurrent.saturating_add(max_queued) {
            let error = TenancyError::TenantBusy { tenant: tenant.clone(), admitted: *calls, max_concurrent, max_queued };
            drop(state);
            metrics::counter!("imgsvc_refusals_total", "tenant" => tenant.to_string(), "reason" => error.reason()).increment(1);
            return Err(error);
        }
        *calls += 1;
        metrics::gauge!("imgsvc_tenant_calls_open", "tenant" => tenant.to_string()).set(*calls as f64);
        Ok((admission, CallSlot { shared: self.shared.clone(), tenant: tenant.clone() }))
    }

    /// Step 1: is this tenant allowed these operations, now, at this size?
    pub fn admit(&self, tenant: &TenantId, operations: &[Operation], request_bytes: u64) -> Result<Admission, TenancyError> {
        self.admit_at(tenant, operations, request_bytes, Instant::now())
    }

    /// [`Tenancy::admit`] at a given instant (tests drive the clock).
    pub fn admit_at(
        &self,
        tenant: &TenantId,
        operations: &[Operation],
        request_bytes: u64,
        now: Instant,
    ) -> Result<Admission, TenancyError> {
        let result = self.check(tenant, operations, request_bytes, now);
        if let Err(e) = &result {
            metrics::counter!("imgsvc_refusals_total", "tenant" => tenant.to_string(), "reason" => e.reason()).increment(1);
        }
        result
    }

    fn check(&self, tenant: &TenantId, operations: &[Operation], request_bytes: u64, now: Instant) -> Result<Admission, TenancyError> {
        let mut state = lock(&self.shared.state);
        let runtime = state.policy.clone();
        let policy = runtime.tenancy.policy(tenant).ok_or_else(|| TenancyError::UnknownTenant { tenant: tenant.clone() })?;
        if !policy.enabled {
            return Err(TenancyError::Disabled { tenant: tenant.clone() });
        }
        let admission = Admission {
            tenant: tenant.clone(),
            policy: policy.clone(),
            max_image_pixels: policy.max_image_pixels.min(runtime.limits.max_image_pixels),
            max_operations: runtime.limits.max_operations,
        };
        admission.check_operations(operations)?;
        if let Some((rate, burst)) = policy.rate {
            let bucket = state.buckets.entry(tenant.clone()).or_insert_with(|| TokenBucket::new(rate, burst, now));
            bucket.try_take(now).map_err(|retry_after| TenancyError::RateLimited { tenant: tenant.clone(), rate, burst, retry_after })?;
        }
        admission.check_request_bytes(request_bytes)?;
        Ok(admission)
    }

    /// Step 2: queues `job` for the admitted tenant and runs it on the
    /// worker pool when the scheduler picks it. Its memory (`cost.bytes`)
    /// is charged to a fresh account for the job's lifetime.
    pub async fn run<R, F>(&self, admission: &Admission, cost: JobCost, job: F) -> Result<R, TenancyError>
    where
        F: FnOnce() -> R + Send + 'static,
        R: Send + 'static,
    {
        let account = self.account(admission, Stage::Queued);
        self.run_charged(admission, cost, &account, job).await
    }

    /// [`Tenancy::run`] for a job whose memory is held by `account` (the
    /// call's): before the job is queued the account is topped up to
    /// `cost.bytes` (what it already holds, the request body say, counts),
    /// waiting up to `tenancy.memory_wait_ms` for memory to come back.
    pub async fn run_charged<R, F>(&self, admission: &Admission, cost: JobCost, account: &Arc<Account>, job: F) -> Result<R, TenancyError>
    where
        F: FnOnce() -> R + Send + 'static,
        R: Send + 'static,
    {
        let result = self.run_inner(admission, cost, account, job).await;
        if let Err(e) = &result {
            metrics::counter!("imgsvc_refusals_total", "tenant" => admission.tenant.to_string(), "reason" => e.reason()).increment(1);
        }
        result
    }

    async fn run_inner<R, F>(&self, admission: &Admission, cost: JobCost, account: &Arc<Account>, job: F) -> Result<R, TenancyError>
    where
        F: FnOnce() -> R + Send + 'static,
        R: Send + 'static,
    {
        let tenant = &admission.tenant;
        let memory_wait = {
            let state = lock(&self.shared.state);
            let budget = state.policy.tenancy.memory_budget_bytes;
            if cost.bytes > budget {
                return Err(TenancyError::MemoryBudget { needed: cost.bytes, budget });
            }
            let (max_concurrent, max_queued) = (admission.policy.max_concurrent_requests, admission.policy.max_queued_requests);
            let admitted = state.running.get(tenant).copied().unwrap_or(0)
                + state.scheduler.queued(tenant) as u32
                + state.waiting_memory.get(tenant).copied().unwrap_or(0);
            if admitted >= max_concurrent.saturating_add(max_queued) {
                return Err(TenancyError::TenantBusy { tenant: tenant.clone(), admitted, max_concurrent, max_queued });
            }
            state.policy.tenancy.memory_wait
        };
        let missing = cost.bytes.saturating_sub(account.held());
        if missing > 0 && account.try_reserve(missing).is_err() {
            // Counted as queued while it waits, so the tenant's limits see it.
            let _waiting = WaitingMemory::new(&self.shared, tenant);
            account.reserve(missing, memory_wait, || memory::count_wait(tenant)).await?;
        }
        let (start, started) = oneshot::channel();
        {
            let mut state = lock(&self.shared.state);
            if let Some(reservation) = reserve_inline(&self.shared, &mut state, admission, cost) {
                drop(state);
                account.set_stage(Stage::Processing);
                return run_inline(reservation, job);
            }
            let queued = state.scheduler.len();
            if queued >= state.policy.limits.max_queued_jobs {
                return Err(TenancyError::ServerBusy { queued });
            }
            let max_concurrent = admission.policy.max_concurrent_requests;
            let pending = Pending { start, bytes: cost.bytes, max_concurrent, enqueued: Instant::now() };
            state.scheduler.push(tenant, admission.policy.weight, cost.pixels.max(1), pending);
            gauge_queue_depth(&state, tenant);
            self.dispatch(&mut state);
        }
        account.set_stage(Stage::Queued);
        let mut waiting = Waiting { shared: &self.shared, tenant, started: Some(started) };
        let reservation = match waiting.started.as_mut().expect("set above").await {
            Ok(r) => r,
            // The sender is only dropped unsent when the process is going away.
            Err(_) => return Err(WorkerError::Panicked("scheduler dropped the job".into()).into()),
        };
        waiting.started = None;
        account.set_stage(Stage::Processing);
        // The reservation travels with the job: released when it finishes.
        // The pool skips a job whose caller went away while it waited for a
        // thread: `not_started` counts that as cancelled too.
        let not_started = NotStarted { tenant: Some(tenant.clone()) };
        // So does the account: the job's buffers are held until it ends,
        // even if the caller has gone away.
        let job_account = account.clone();
        Ok(self
            .shared
            .pool
            .run(move || {
                not_started.start();
                let _reservation = reservation;
                let _account = job_account;
                job()
            })
            .await?)
    }

    /// Starts queued jobs while workers, tenant limits and memory allow.
    fn dispatch(&self, state: &mut State) {
        dispatch(&self.shared, state);
    }
}

fn dispatch(shared: &Arc<Shared>, state: &mut State) {
    while state.running_total < shared.worker_slots {
        let running = &state.running;
        // A queued job's memory is already held (see `Tenancy::run_charged`).
        let picked = state.scheduler.pop(|tenant, p| p.start.is_closed() || running.get(tenant).copied().unwrap_or(0) < p.max_concurrent);
        let Some((tenant, pending)) = picked else { break };
        gauge_queue_depth(state, &tenant);
        if pending.start.is_closed() {
            continue; // cancelled while queued
        }
        *state.running.entry(tenant.clone()).or_default() += 1;
        state.running_total += 1;
        state.memory_in_use += pending.bytes;
        metrics::histogram!("imgsvc_queue_wait_seconds", "tenant" => tenant.to_string()).record(pending.enqueued.elapsed().as_secs_f64());
        let reservation = Reservation { shared: Some(shared.clone()), tenant, bytes: pending.bytes, worker: true };
        if let Err(mut reservation) = pending.start.send(reservation) {
            // Cancelled in between: undo here, under the lock we hold.
            reservation.release(state);
        }
    }
    metrics::gauge!("imgsvc_memory_in_flight_bytes").set(state.memory_in_use as f64);
}

/// A tiny image's slot for running on the calling thread, if the tenant's
/// concurrency allows it now (its memory is already held). Such jobs cost less CPU
/// than receiving their request did (64Ki pixels ≈ 50 µs of mean filter), so
/// they skip the queue and the hand-off to the worker pool: a tenant sending
/// small images is not stuck behind another's 4K images (whose jobs run for
/// tens of milliseconds and are not preempted), and small requests save the
/// two thread switches. They still count against the tenant's
/// `max_concurrent_requests` and the memory budget.
fn reserve_inline(shared: &Arc<Shared>, state: &mut State, admission: &Admission, cost: JobCost) -> Option<Reservation> {
    let running = state.running.get(&admission.tenant).copied().unwrap_or(0);
    let fits =
        cost.kernels_only && cost.pixels <= state.policy.limits.inline_max_pixels && running < admission.policy.max_concurrent_requests;
    if !fits {
        return None;
    }
    *state.running.entry(admission.tenant.clone()).or_default() += 1;
    state.memory_in_use += cost.bytes;
    metrics::counter!("imgsvc_inline_jobs_total", "tenant" => admission.tenant.to_string()).increment(1);
    Some(Reservation { shared: Some(shared.clone()), tenant: admission.tenant.clone(), bytes: cost.bytes, worker: false })
}

fn run_inline<R, F>(reservation: Reservation, job: F) -> Result<R, TenancyError>
where
    F: FnOnce() -> R,
{
    count_started(&reservation.tenant);
    let result = std::panic::catch_unwind(AssertUnwindSafe(job));
    drop(reservation);
    result.map_err(|panic| WorkerError::Panicked(crate::serving::worker::panic_message(&panic)).into())
}

fn gauge_queue_depth(state: &State, tenant: &TenantId) {
    metrics::gauge!("imgsvc_queue_depth", "tenant" => tenant.to_string()).set(state.scheduler.queued(tenant) as f64);
}

/// A running slot: one worker (unless the job runs inline), one of the
/// tenant's concurrent requests and `bytes` of the memory budget. Released
/// on drop.
struct Reservation {
    shared: Option<Arc<Shared>>,
    tenant: TenantId,
    bytes: u64,
    worker: bool,
}

impl Reservation {
    fn release(&mut self, state: &mut State) {
        if self.shared.take().is_none() {
            return;
        }
        if let Some(n) = state.running.get_mut(&self.tenant) {
            *n -= 1;
            if *n == 0 {
                state.running.remove(&self.tenant);
            }
        }
        if self.worker {
            state.running_total -= 1;
        }
        state.memory_in_use -= self.bytes;
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        if let Some(shared) = self.shared.clone() {
            let mut state = lock(&shared.state);
            self.release(&mut state);
            dispatch(&shared, &mut state);
        }
    }
}

/// One of a tenant's calls, from its headers until its answer is sent
/// ([`Tenancy::admit_call`]). Released on drop.
pub struct CallSlot {
    shared: Arc<Shared>,
    tenant: TenantId,
}

impl std::fmt::Debug for CallSlot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CallSlot").field("tenant", &self.tenant).finish()
    }
}

impl Drop for CallSlot {
    fn drop(&mut self) {
        let mut state = lock(&self.shared.state);
        if let Some(n) = state.calls.get_mut(&self.tenant) {
            *n -= 1;
            metrics::gauge!("imgsvc_tenant_calls_open", "tenant" => self.tenant.to_string()).set(*n as f64);
            if *n == 0 {
                state.calls.remove(&self.tenant);
            }
        }
    }
}

/// A job waiting for its memory before it is queued: counted among the
/// tenant's queued jobs.
struct WaitingMemory<'a> {
    shared: &'a Arc<Shared>,
    tenant: &'a TenantId,
}

impl<'a> WaitingMemory<'a> {
    fn new(shared: &'a Arc<Shared>, tenant: &'a TenantId) -> Self {
        *lock(&shared.state).waiting_memory.entry(tenant.clone()).or_default() += 1;
        Self { shared, tenant }
    }
}

impl Drop for WaitingMemory<'_> {
    fn drop(&mut self) {
        let mut state = lock(&self.shared.state);
        if let Some(n) = state.waiting_memory.get_mut(self.tenant) {
            *n -= 1;
            if *n == 0 {
                state.waiting_memory.remove(self.tenant);
            }
        }
    }
}

/// Removes a request from its queue if it is dropped (cancelled) before
/// the scheduler starts it.
struct Waiting<'a> {
    shared: &'a Arc<Shared>,
    tenant: &'a TenantId,
    started: Option<oneshot::Receiver<Reservation>>,
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        if let Some(rx) = self.started.take() {
            drop(rx); // closes the channel: the scheduler sees the job as cancelled
            let mut state = lock(&self.shared.state);
            state.scheduler.retain(|p| !p.start.is_closed());
            gauge_queue_depth(&state, self.tenant);
            drop(state);
            count_cancelled(self.tenant);
        }
    }
}

/// A job handed to the worker pool: counted as started when a worker runs
/// it, or as cancelled when it is dropped unrun.
struct NotStarted {
    /// Taken when the job starts.
    tenant: Option<TenantId>,
}

impl NotStarted {
    fn start(mut self) {
        if let Some(tenant) = self.tenant.take() {
            count_started(&tenant);
        }
    }
}

impl Drop for NotStarted {
    fn drop(&mut self) {
        if let Some(tenant) = &self.tenant {
            count_cancelled(tenant);
        }
    }
}

/// Counts a job (kernels, decoding, encoding) that began to run, inline or
/// on a worker.
fn count_started(tenant: &TenantId) {
    metrics::counter!("imgsvc_jobs_started_total", "tenant" => tenant.to_string()).increment(1);
}

fn count_cancelled(tenant: &TenantId) {
    metrics::counter!("imgsvc_cancelled_while_queued_total", "tenant" => tenant.to_string()).increment(1);
}

/// The state stays consistent across a panic elsewhere (every update is a
/// few integer operations), so a poisoned lock is safe to keep using.
fn lock(m: &Mutex<State>) -> MutexGuard<'_, State> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

#[cfg(test)]
mod tests;
