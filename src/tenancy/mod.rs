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

use std::sync::atomic::Ordering;
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
use scheduler::FairScheduler;

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
    /// A compressed request message that inflates past its limit; `what`
    /// names the limit.
    #[error("request message of {compressed} bytes ({encoding}) inflates to more than {limit} bytes, {what}")]
    InflatesTooLarge { tenant: TenantId, encoding: &'static str, compressed: u64, limit: u64, what: &'static str },
    #[error(
        "tenant \"{tenant}\" already has {admitted} requests running or queued, its limit (max_concurrent_requests {max_concurrent} + max_queued_requests {max_queued})"
    )]
    TenantBusy { tenant: TenantId, admitted: u32, max_concurrent: u32, max_queued: u32 },
    #[error(
        "tenant \"{tenant}\" already has {open} calls open, its weighted part of the server's queue and workers: (limits.max_queued_jobs {max_queued_jobs} + {workers} workers) x weight {weight} / total weight {total_weight} = {part}"
    )]
    QueueShare { tenant: TenantId, open: u32, part: u32, weight: u32, total_weight: u64, max_queued_jobs: usize, workers: usize },
    #[error(
        "tenant \"{tenant}\" already had {open} connections open, its limit (max_connections {limit}): calls on this connection are refused and it is closed; use the connections open"
    )]
    TooManyConnections { tenant: TenantId, open: u32, limit: u32 },
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
            Self::RequestTooLarge { .. } | Self::InflatesTooLarge { .. } => "request_too_large",
            Self::TenantBusy { .. } => "tenant_busy",
            Self::QueueShare { .. } => "queue_share",
            Self::TooManyConnections { .. } => "tenant_connections",
            Self::ServerBusy { .. } => "server_busy",
            Self::MemoryBudget { .. } => "memory_budget",
            Self::Memory(MemoryError::NeverFits { .. }) => "memory_share",
            Self::Memory(MemoryError::Exhausted { .. }) => "memory_exhausted",
            Self::Memory(MemoryError::BodyTimeout { .. }) => "body_timeout",
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

/// A queued job, run with the worker slot the scheduler reserved for it.
type Task = Box<dyn FnOnce(Reservation) + Send>;

struct Pending {
    task: Task,
    state: Arc<JobState>,
    /// Held by the job's account since before it was queued; counted in
    /// `imgsvc_memory_in_flight_bytes` while the job runs.
    bytes: u64,
    max_concurrent: u32,
    weight: u32,
    /// The cost the job was queued with (charged when it starts; the
    /// difference to its measured CPU time is charged when it ends).
    estimate: u64,
    enqueued: Instant,
}

struct State {
    policy: Arc<RuntimePolicy>,
    buckets: HashMap<TenantId, TokenBucket>,
    running: HashMap<TenantId, u32>,
    /// The weights of the tenants in `running`.
    running_weights: HashMap<TenantId, u32>,
    /// CPU time of each tenant's jobs (worker and inline), in nanoseconds.
    cpu_ns: HashMap<TenantId, u64>,
    running_total: usize,
    /// Bytes of the jobs running now (a gauge; the budget itself is
    /// enforced by [`Budget`]).
    memory_in_use: u64,
    /// Jobs waiting for their memory before they are queued.
    waiting_memory: HashMap<TenantId, u32>,
    /// Calls holding a [`CallSlot`].
    calls: HashMap<TenantId, u32>,
    /// Of those, calls of tenants without a `[tenants.<name>]` table
    /// (served with the defaults): they share one part of the queue.
    unconfigured_calls: u32,
    /// Connections holding a [`ConnectionSlot`].
    connections: HashMap<TenantId, u32>,
    /// When a tenant's refused connections were last logged, and how many
    /// were refused since.
    connection_warnings: HashMap<TenantId, (Option<Instant>, u64)>,
    scheduler: FairScheduler<Pending>,
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
            running_weights: HashMap::new(),
            cpu_ns: HashMap::new(),
            running_total: 0,
            memory_in_use: 0,
            waiting_memory: HashMap::new(),
            calls: HashMap::new(),
            unconfigured_calls: 0,
            connections: HashMap::new(),
            connection_warnings: HashMap::new(),
            scheduler: FairScheduler::default(),
        };
        Self { shared: Arc::new(Shared { state: Mutex::new(state), pool, worker_slots, budget }) }
    }

    /// The memory budget every request's bytes are charged to.
    pub fn budget(&self) -> &Arc<Budget> {
        &self.shared.budget
    }

    /// An account holding `bytes` for one connection (its HTTP/2 window),
    /// if they fit now: charged to the tenant its certificate names, or —
    /// a certificate naming no tenant, or one not served here — to the
    /// pool of such connections, [`TenantId::unserved`], with the default
    /// share (`tenant_defaults.max_memory_bytes`). HTTP/2 buffers a
    /// connection's window whatever its certificate names, although its
    /// calls are refused.
    pub fn connection_account(&self, tenant: Option<&TenantId>, bytes: u64) -> Result<Arc<Account>, MemoryError> {
        let policy = self.policy();
        let served = tenant.and_then(|t| policy.tenancy.policy(t).map(|p| (t.clone(), p.max_memory_bytes)));
        let (tenant, share) = served.unwrap_or_else(|| (TenantId::unserved(), policy.tenancy.defaults.max_memory_bytes));
        let account = self.shared.budget.account(tenant, share, Stage::Receiving);
        account.try_reserve(bytes)?;
        Ok(account)
    }

    /// Whether `tenant`'s calls are served at all (configured, or served
    /// with the defaults): a connection of a tenant that is not gets no
    /// I/O lane of its own and a short life.
    pub fn serves(&self, tenant: &TenantId) -> bool {
        self.policy().tenancy.policy(tenant).is_some()
    }

    /// One of `tenant`'s connections, from its handshake until it ends: at
    /// most its `max_connections` at once (`imgsvc_tenant_connections`).
    /// Beyond that, [`TenancyError::TooManyConnections`], logged at warn at
    /// most once per [`CONNECTION_WARNING_INTERVAL`] per tenant. The limit in
    /// force at the handshake decides: a reload that lowers it closes no
    /// connection. For tenants that are served ([`Tenancy::serves`]).
    pub fn admit_connection(&self, tenant: &TenantId) -> Result<ConnectionSlot, TenancyError> {
        let mut state = lock(&self.shared.state);
        let policy = state.policy.clone();
        let Some(limit) = policy.tenancy.policy(tenant).map(|p| p.max_connections) else {
            return Err(TenancyError::UnknownTenant { tenant: tenant.clone() });
        };
        let open = state.connections.entry(tenant.clone()).or_default();
        if *open >= limit {
            let open = *open;
            if open == 0 {
                state.connections.remove(tenant);
            }
            let now = Instant::now();
            let (last, refused) = state.connection_warnings.entry(tenant.clone()).or_insert((None, 0));
            *refused += 1;
            if last.is_none_or(|last| now.duration_since(last) >= CONNECTION_WARNING_INTERVAL) {
                let refused = std::mem::take(refused);
                *last = Some(now);
                drop(state);
                tracing::warn!(
                    %tenant,
                    limit,
                    refused,
                    "tenant has max_connections connections open: its new connections are refused (their calls get RESOURCE_EXHAUSTED, then they are closed); logged at most once a minute per tenant, `refused` counts since the last"
                );
            }
            return Err(TenancyError::TooManyConnections { tenant: tenant.clone(), open, limit });
        }
        *open += 1;
        metrics::gauge!("imgsvc_tenant_connections", "tenant" => tenant.to_string()).set(f64::from(*open));
        Ok(ConnectionSlot { shared: self.shared.clone(), tenant: tenant.clone() })
    }

    /// How many of `tenant`'s connections hold a [`ConnectionSlot`] now.
    pub fn connections(&self, tenant: &TenantId) -> u32 {
        lock(&self.shared.state).connections.get(tenant).copied().unwrap_or(0)
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
        // Token buckets are kept: a rate removed and restored, or changed,
        // carries on from the tokens the tenant had (no fresh burst);
        // `take_token` adopts a changed rate.
        let mut state = lock(&self.shared.state);
        self.shared.budget.set_total(policy.tenancy.memory_budget_bytes);
        crate::telemetry::tenant_limits::publish(Some(&state.policy.tenancy), &policy.tenancy);
        state.policy = Arc::new(policy);
    }

    /// CPU time `tenant`'s jobs (on the workers and inline) have taken so
    /// far (`imgsvc_tenant_cpu_seconds_total`).
    pub fn cpu_time(&self, tenant: &TenantId) -> Duration {
        Duration::from_nanos(lock(&self.shared.state).cpu_ns.get(tenant).copied().unwrap_or(0))
    }

    /// How many of `tenant`'s requests are running and queued right now.
    pub fn load(&self, tenant: &TenantId) -> TenantLoad {
        let state = lock(&self.shared.state);
        let waiting = state.waiting_memory.get(tenant).copied().unwrap_or(0);
        TenantLoad { running: state.running.get(tenant).copied().unwrap_or(0), queued: state.scheduler.queued(tenant) as u32 + waiting }
    }

    /// Step 1 at the request's headers, before a byte of its body is read:
    /// [`Tenancy::admit`] (with the operations the method names, and no
    /// size yet), and one of the tenant's call slots: at most
    /// `max_concurrent_requests + max_queued_requests` calls at once, and
    /// at most its weighted part of the server's job queue and workers
    /// ([`TenancyConfig::jobs_part`]; unconfigured tenants served with the
    /// defaults share one part), from their headers until their answer has
    /// been sent. The token bucket is asked last, so a call refused for
    /// another reason takes no token.
    pub fn admit_call(&self, tenant: &TenantId, operations: &[Operation]) -> Result<(Admission, CallSlot), TenancyError> {
        let result = self.admit_call_at(tenant, operations, Instant::now());
        if let Err(e) = &result {
            metrics::counter!("imgsvc_refusals_total", "tenant" => tenant.to_string(), "reason" => e.reason()).increment(1);
        }
        result
    }

    fn admit_call_at(&self, tenant: &TenantId, operations: &[Operation], now: Instant) -> Result<(Admission, CallSlot), TenancyError> {
        let mut state = lock(&self.shared.state);
        let runtime = state.policy.clone();
        let admission = terms(&runtime, tenant, operations)?;
        let (max_concurrent, max_queued) = (admission.policy.max_concurrent_requests, admission.policy.max_queued_requests);
        let calls = state.calls.get(tenant).copied().unwrap_or(0);
        if calls >= max_concurrent.saturating_add(max_queued) {
            return Err(TenancyError::TenantBusy { tenant: tenant.clone(), admitted: calls, max_concurrent, max_queued });
        }
        let unconfigured = !runtime.tenancy.tenants.contains_key(tenant);
        let weight = admission.policy.weight;
        let part = runtime.tenancy.jobs_part(weight, runtime.limits.max_queued_jobs, self.shared.worker_slots);
        let open = if unconfigured { state.unconfigured_calls } else { calls };
        if open >= part {
            return Err(TenancyError::QueueShare {
                tenant: tenant.clone(),
                open,
                part,
                weight,
                total_weight: runtime.tenancy.total_weight(),
                max_queued_jobs: runtime.limits.max_queued_jobs,
                workers: self.shared.worker_slots,
            });
        }
        take_token(&mut state, &admission, now)?;
        let calls = state.calls.entry(tenant.clone()).or_default();
        *calls += 1;
        metrics::gauge!("imgsvc_tenant_calls_open", "tenant" => tenant.to_string()).set(*calls as f64);
        if unconfigured {
            state.unconfigured_calls += 1;
        }
        Ok((admission, CallSlot { shared: self.shared.clone(), tenant: tenant.clone(), unconfigured }))
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
        let admission = terms(&runtime, tenant, operations)?;
        admission.check_request_bytes(request_bytes)?;
        take_token(&mut state, &admission, now)?;
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
        {
            let mut state = lock(&self.shared.state);
            if let Some(reservation) = reserve_inline(&self.shared, &mut state, admission, cost) {
                drop(state);
                account.set_stage(Stage::Processing);
                return run_inline(reservation, job);
            }
        }
        // The job goes into the queue whole: the scheduler hands it to a
        // worker thread itself (no round trip through this task), and the
        // answer comes back here.
        let job_state = Arc::new(JobState::default());
        let (done, answer) = oneshot::channel();
        let task: Task = {
            let (tenant, job_state, job_account) = (tenant.clone(), job_state.clone(), account.clone());
            Box::new(move |mut reservation: Reservation| {
                if !job_state.start() {
                    return; // the caller went away first (counted by `Waiting`)
                }
                count_started(&tenant);
                // The job's buffers are held until it ends, even if its
                // caller has gone away meanwhile.
                job_account.set_stage(Stage::Processing);
                let cpu = ThreadCpu::start();
                let result = CURRENT_JOB.set(&job_state, || std::panic::catch_unwind(AssertUnwindSafe(job)));
                reservation.cpu_ns = cpu.elapsed_ns().map(|own| job_state.cpu_ns(own));
                // Free the worker before answering, so a caller that submits
                // its next job as soon as it has this result finds it free.
                drop(reservation);
                let _ = done.send(result);
            })
        };
        {
            let mut state = lock(&self.shared.state);
            // Calls admitted at their headers never meet this bound: their
            // parts add up to `max_queued_jobs + workers` jobs running or
            // queued ([`TenancyConfig::jobs_part`]).
            let queued = state.scheduler.len();
            if queued + state.running_total >= state.policy.limits.max_queued_jobs + self.shared.worker_slots {
                return Err(TenancyError::ServerBusy { queued });
            }
            let max_concurrent = admission.policy.max_concurrent_requests;
            let (weight, estimate) = (admission.policy.weight, cost.pixels.max(1));
            let pending =
                Pending { task, state: job_state.clone(), bytes: cost.bytes, max_concurrent, weight, estimate, enqueued: Instant::now() };
            state.scheduler.push(tenant, weight, estimate, pending);
            gauge_queue_depth(&state, tenant);
            self.dispatch(&mut state);
        }
        account.set_stage(Stage::Queued);
        let _waiting = Waiting { shared: &self.shared, tenant, job: job_state };
        match answer.await {
            Ok(Ok(value)) => Ok(value),
            Ok(Err(panic)) => Err(WorkerError::Panicked(crate::serving::worker::panic_message(&panic)).into()),
            // The task is only dropped unrun when the process is going away.
            Err(_) => Err(WorkerError::Panicked("scheduler dropped the job".into()).into()),
        }
    }

    /// Starts queued jobs while workers, tenant limits and memory allow.
    fn dispatch(&self, state: &mut State) {
        dispatch(&self.shared, state);
    }
}

/// The terms `tenant` is served on: known and enabled, `operations` allowed.
fn terms(runtime: &RuntimePolicy, tenant: &TenantId, operations: &[Operation]) -> Result<Admission, TenancyError> {
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
    Ok(admission)
}

/// One token of the admitted tenant's bucket, if it has a rate.
fn take_token(state: &mut State, admission: &Admission, now: Instant) -> Result<(), TenancyError> {
    let Some((rate, burst)) = admission.policy.rate else { return Ok(()) };
    let tenant = &admission.tenant;
    let bucket = state.buckets.entry(tenant.clone()).or_insert_with(|| TokenBucket::new(rate, burst, now));
    if !bucket.matches(rate, burst) {
        bucket.reconfigure(rate, burst, now);
    }
    bucket.try_take(now).map_err(|retry_after| TenancyError::RateLimited { tenant: tenant.clone(), rate, burst, retry_after })
}

fn dispatch(shared: &Arc<Shared>, state: &mut State) {
    while state.running_total < shared.worker_slots {
        let running = &state.running;
        let workers = shared.worker_slots as u64;
        let active = active_weight(state, None);
        let lagging = state.scheduler.lagging(LAG_SLACK_NS).cloned();
        // A queued job's memory is already held (see `Tenancy::run_charged`).
        // First pass: tenants under their weighted part of the workers
        // (inline jobs included), or behind every other tenant in CPU time
        // (a worker of theirs got less of the cores); only if none of
        // those can start, any tenant under its own concurrency limit (no
        // worker left idle).
        let picked = state
            .scheduler
            .pop(|tenant, p| {
                let n = running.get(tenant).copied().unwrap_or(0);
                let under_part = u64::from(n) * active < workers * u64::from(p.weight);
                p.state.gone() || (n < p.max_concurrent && (under_part || lagging.as_ref() == Some(tenant)))
            })
            .or_else(|| state.scheduler.pop(|tenant, p| p.state.gone() || running.get(tenant).copied().unwrap_or(0) < p.max_concurrent));
        let Some((tenant, pending)) = picked else { break };
        gauge_queue_depth(state, &tenant);
        if pending.state.gone() {
            continue; // cancelled while queued
        }
        *state.running.entry(tenant.clone()).or_default() += 1;
        state.running_weights.insert(tenant.clone(), pending.weight);
        state.running_total += 1;
        state.memory_in_use += pending.bytes;
        metrics::histogram!("imgsvc_queue_wait_seconds", "tenant" => tenant.to_string()).record(pending.enqueued.elapsed().as_secs_f64());
        let reservation = Reservation {
            shared: Some(shared.clone()),
            tenant,
            bytes: pending.bytes,
            worker: true,
            estimate: pending.estimate,
            cpu_ns: None,
        };
        let task = pending.task;
        shared.pool.spawn(move || task(reservation));
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
    let tenant = &admission.tenant;
    let running = state.running.get(tenant).copied().unwrap_or(0);
    let fits =
        cost.kernels_only && cost.pixels <= state.policy.limits.inline_max_pixels && running < admission.policy.max_concurrent_requests;
    if !fits {
        return None;
    }
    // Inline jobs count towards the tenant's part of the workers: at its
    // part while others wait, the job queues like any other.
    let weight = admission.policy.weight;
    let others_wait = state.scheduler.active().any(|t| t != tenant);
    let workers = shared.worker_slots as u64;
    if others_wait && u64::from(running) * active_weight(state, Some((tenant, weight))) >= workers * u64::from(weight) {
        return None;
    }
    *state.running.entry(tenant.clone()).or_default() += 1;
    state.running_weights.insert(tenant.clone(), weight);
    state.memory_in_use += cost.bytes;
    metrics::counter!("imgsvc_inline_jobs_total", "tenant" => tenant.to_string()).increment(1);
    // Not queued, so nothing was charged before: all its CPU is charged after.
    Some(Reservation { shared: Some(shared.clone()), tenant: tenant.clone(), bytes: cost.bytes, worker: false, estimate: 0, cpu_ns: None })
}

fn run_inline<R, F>(mut reservation: Reservation, job: F) -> Result<R, TenancyError>
where
    F: FnOnce() -> R,
{
    count_started(&reservation.tenant);
    let cpu = ThreadCpu::start();
    let result = std::panic::catch_unwind(AssertUnwindSafe(job));
    reservation.cpu_ns = cpu.elapsed_ns();
    drop(reservation);
    result.map_err(|panic| WorkerError::Panicked(crate::serving::worker::panic_message(&panic)).into())
}

/// How far (CPU time at weight 1) a tenant must be behind every other
/// waiting tenant before it may take a worker beyond its part.
const LAG_SLACK_NS: u64 = 20_000_000;

/// The weights of the tenants with jobs queued or running (and of
/// `also`): what the workers are shared between now.
fn active_weight(state: &State, also: Option<(&TenantId, u32)>) -> u64 {
    let queued = state.scheduler.active().filter_map(|t| state.scheduler.weight(t).map(|w| (t, w)));
    let running = state.running_weights.iter().filter(|(t, _)| state.scheduler.queued(t) == 0).map(|(t, w)| (t, *w));
    let mut total: u64 = queued.chain(running).map(|(_, w)| u64::from(w)).sum();
    if let Some((tenant, weight)) = also
        && state.scheduler.queued(tenant) == 0
        && !state.running_weights.contains_key(tenant)
    {
        total += u64::from(weight);
    }
    total.max(1)
}

/// CPU time of the calling thread (`CLOCK_THREAD_CPUTIME_ID`): what a job
/// costs, without the time its thread waited for a core.
struct ThreadCpu(Option<Duration>);

impl ThreadCpu {
    fn start() -> Self {
        Self(thread_cpu_time())
    }

    fn elapsed_ns(&self) -> Option<u64> {
        let (start, end) = (self.0?, thread_cpu_time()?);
        Some(end.saturating_sub(start).as_nanos() as u64)
    }
}

#[cfg(target_os = "linux")]
fn thread_cpu_time() -> Option<Duration> {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: `ts` is a valid, writable timespec for the call's duration.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    (rc == 0).then(|| Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32))
}

#[cfg(not(target_os = "linux"))]
fn thread_cpu_time() -> Option<Duration> {
    None
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
    /// What the scheduler charged when the job started.
    estimate: u64,
    /// The CPU time the job took, once it has run.
    cpu_ns: Option<u64>,
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
                state.running_weights.remove(&self.tenant);
            }
        }
        if self.worker {
            state.running_total -= 1;
        }
        state.memory_in_use -= self.bytes;
        if let Some(cpu_ns) = self.cpu_ns {
            // What the job really cost, as CFS charges a task's run time.
            state.scheduler.charge(&self.tenant, cpu_ns as i64 - self.estimate as i64);
            let total = state.cpu_ns.entry(self.tenant.clone()).or_default();
            *total += cpu_ns;
            // Monotonic; a gauge because the metrics facade counts integers.
            metrics::gauge!("imgsvc_tenant_cpu_seconds_total", "tenant" => self.tenant.to_string()).set(*total as f64 / 1e9);
        }
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
    unconfigured: bool,
}

impl std::fmt::Debug for CallSlot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CallSlot").field("tenant", &self.tenant).finish()
    }
}

impl Drop for CallSlot {
    fn drop(&mut self) {
        let mut state = lock(&self.shared.state);
        release_one(&mut state.calls, &self.tenant, "imgsvc_tenant_calls_open");
        if self.unconfigured {
            state.unconfigured_calls -= 1;
        }
    }
}

/// How often a tenant's refused connections are logged, at most.
pub const CONNECTION_WARNING_INTERVAL: Duration = Duration::from_secs(60);

/// One of a tenant's connections ([`Tenancy::admit_connection`]), from its
/// handshake until it ends. Released on drop.
pub struct ConnectionSlot {
    shared: Arc<Shared>,
    tenant: TenantId,
}

impl std::fmt::Debug for ConnectionSlot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConnectionSlot").field("tenant", &self.tenant).finish()
    }
}

impl Drop for ConnectionSlot {
    fn drop(&mut self) {
        release_one(&mut lock(&self.shared.state).connections, &self.tenant, "imgsvc_tenant_connections");
    }
}

/// Takes one from `tenant`'s count (removed at 0) and sets the gauge
/// `name{tenant}` to what is left.
fn release_one(counts: &mut HashMap<TenantId, u32>, tenant: &TenantId, name: &'static str) {
    if let Some(n) = counts.get_mut(tenant) {
        *n -= 1;
        metrics::gauge!(name, "tenant" => tenant.to_string()).set(f64::from(*n));
        if *n == 0 {
            counts.remove(tenant);
        }
    }
}

/// A connection over its tenant's `max_connections` at its handshake
/// ([`TenancyError::TooManyConnections`]): every call on it is refused with
/// that error until it is closed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OverConnectionLimit {
    pub tenant: TenantId,
    pub open: u32,
    pub limit: u32,
}

impl OverConnectionLimit {
    /// The refusal, from the error [`Tenancy::admit_connection`] returned.
    pub fn of(error: &TenancyError) -> Option<Self> {
        match error {
            TenancyError::TooManyConnections { tenant, open, limit } => Some(Self { tenant: tenant.clone(), open: *open, limit: *limit }),
            _ => None,
        }
    }

    pub fn error(&self) -> TenancyError {
        TenancyError::TooManyConnections { tenant: self.tenant.clone(), open: self.open, limit: self.limit }
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

/// Where a queued job is: waiting, started on a worker, or abandoned by
/// its caller (cancelled, or its deadline passed).
#[derive(Debug, Default)]
pub struct JobState {
    state: std::sync::atomic::AtomicU8,
    /// CPU time other threads spent on this job's bands of rows (a kernel
    /// split across the pool): charged to this job.
    borrowed_ns: std::sync::atomic::AtomicU64,
    /// CPU time this job's thread spent on other jobs' bands (stolen while
    /// it waited inside a kernel of its own): charged to them, not to this
    /// job.
    lent_ns: std::sync::atomic::AtomicU64,
}

const QUEUED: u8 = 0;
const STARTED: u8 = 1;
const GONE: u8 = 2;

impl JobState {
    /// The worker takes the job: false if its caller has gone.
    fn start(&self) -> bool {
        self.state.compare_exchange(QUEUED, STARTED, Ordering::AcqRel, Ordering::Acquire).is_ok()
    }

    /// The caller goes away: true if the job had not started.
    fn abandon(&self) -> bool {
        self.state.swap(GONE, Ordering::AcqRel) == QUEUED
    }

    /// Whether the job's caller has gone: a running job may stop early.
    pub fn gone(&self) -> bool {
        self.state.load(Ordering::Acquire) == GONE
    }

    /// The job's CPU time, from what its own thread measured: plus what
    /// other threads spent on its bands, less what its thread spent on
    /// other jobs' bands.
    fn cpu_ns(&self, own_thread_ns: u64) -> u64 {
        (own_thread_ns + self.borrowed_ns.load(Ordering::Acquire)).saturating_sub(self.lent_ns.load(Ordering::Acquire))
    }
}

/// The [`imaging::Bands`] of the job running on this thread: its kernels
/// stop at the next band once its caller has gone, and the CPU time of each
/// band that runs on another thread is moved to this job (from the job
/// that thread was running, if any), so a kernel split across the workers
/// is charged all it took.
pub struct JobBands(Option<Arc<JobState>>);

std::thread_local! {
    /// The CPU time of this thread when its current band began.
    static BAND_STARTED: std::cell::Cell<Option<Duration>> = const { std::cell::Cell::new(None) };
}

impl JobBands {
    /// For the job running on this thread (none outside a job).
    pub fn current() -> Self {
        Self(current_job())
    }
}

impl crate::imaging::Bands for JobBands {
    fn cancelled(&self) -> bool {
        let Some(job) = &self.0 else { return false };
        if job.gone() {
            return true;
        }
        let own = current_job().is_some_and(|mine| Arc::ptr_eq(&mine, job));
        if !own {
            BAND_STARTED.with(|b| b.set(thread_cpu_time()));
        }
        false
    }

    fn band_done(&self) {
        let Some(job) = &self.0 else { return };
        let Some(started) = BAND_STARTED.with(|b| b.take()) else { return };
        let Some(now) = thread_cpu_time() else { return };
        let ns = now.saturating_sub(started).as_nanos() as u64;
        job.borrowed_ns.fetch_add(ns, Ordering::AcqRel);
        if let Some(mine) = current_job() {
            mine.lent_ns.fetch_add(ns, Ordering::AcqRel);
        }
    }
}

std::thread_local! {
    static CURRENT: std::cell::RefCell<Option<Arc<JobState>>> = const { std::cell::RefCell::new(None) };
}

/// The job running on this thread, for kernels that check between bands
/// whether their caller is still there.
struct CurrentJob;

static CURRENT_JOB: CurrentJob = CurrentJob;

impl CurrentJob {
    fn set<R>(&self, job: &Arc<JobState>, f: impl FnOnce() -> R) -> R {
        let previous = CURRENT.with(|c| c.replace(Some(job.clone())));
        let result = f();
        CURRENT.with(|c| *c.borrow_mut() = previous);
        result
    }
}

/// The state of the job running on this thread (`None` outside a job):
/// clone it into a kernel's cancellation check.
pub fn current_job() -> Option<Arc<JobState>> {
    CURRENT.with(|c| c.borrow().clone())
}

/// A queued or running job's caller: when it is dropped (the call was
/// cancelled or its deadline passed), a queued job leaves the queue unrun
/// and a running one sees [`JobState::gone`].
struct Waiting<'a> {
    shared: &'a Arc<Shared>,
    tenant: &'a TenantId,
    job: Arc<JobState>,
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        if self.job.abandon() {
            let mut state = lock(&self.shared.state);
            state.scheduler.retain(|p| !p.state.gone());
            gauge_queue_depth(&state, self.tenant);
            drop(state);
            count_cancelled(self.tenant);
        }
    }
}

/// Counts a job (kernels, decoding, encoding) that began to run, inline or
/// on a worker.
fn count_started(tenant: &TenantId) {
    metrics::counter!("imgsvc_jobs_started_total", "tenant" => tenant.to_string()).increment(1);
}

/// Counts a running job that stopped early because its caller had gone
/// (`imgsvc_jobs_abandoned_total`).
pub fn count_abandoned() {
    metrics::counter!("imgsvc_jobs_abandoned_total").increment(1);
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
