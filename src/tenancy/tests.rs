use std::sync::mpsc;

use super::{policy::*, *};
use crate::config::Limits;

fn t(name: &str) -> TenantId {
    TenantId::parse(name).unwrap()
}

fn policy_with(max_concurrent: u32, max_queued: u32) -> TenantPolicy {
    TenantPolicy {
        enabled: true,
        rate: None,
        max_concurrent_requests: max_concurrent,
        max_queued_requests: max_queued,
        max_image_pixels: 1000,
        max_request_bytes: 10_000,
        // No share of its own: the budget bounds these tests' tenants.
        max_memory_bytes: u64::MAX,
        allowed_operations: Operation::ALL.to_vec(),
        weight: 1,
    }
}

fn runtime(tenants: &[(&str, TenantPolicy)], budget: u64) -> RuntimePolicy {
    RuntimePolicy {
        limits: Limits {
            max_image_pixels: 5000,
            max_message_bytes: 1 << 20,
            max_operations: 16,
            max_queued_jobs: 100,
            inline_max_pixels: 0,
            stream_max_chunk_bytes: 1 << 16,
            stream_response_chunk_bytes: 1 << 16,
        },
        tenancy: TenancyConfig {
            unknown_tenants: UnknownTenants::Refuse,
            memory_budget_bytes: budget,
            memory_wait: Duration::from_secs(30),
            body_timeout: Duration::from_secs(30),
            defaults: policy_with(4, 4),
            tenants: tenants.iter().map(|(n, p)| (t(n), p.clone())).collect(),
        },
    }
}

fn tenancy(tenants: &[(&str, TenantPolicy)], workers: usize, budget: u64) -> Tenancy {
    Tenancy::new(runtime(tenants, budget), WorkerPool::new(workers, 100).unwrap())
}

const SMALL: JobCost = JobCost::kernels(10, 10);

/// Waits (bounded) until `cond` holds.
async fn until(mut cond: impl FnMut() -> bool) {
    for _ in 0..10_000 {
        if cond() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    panic!("condition not reached within 10 s");
}

/// A job that runs until released, and says when it has started.
fn held_job() -> (impl FnOnce() + Send + 'static, mpsc::Sender<()>, tokio::sync::oneshot::Receiver<()>) {
    let (release, released) = mpsc::channel::<()>();
    let (started_tx, started) = tokio::sync::oneshot::channel();
    let job = move || {
        let _ = started_tx.send(());
        let _ = released.recv();
    };
    (job, release, started)
}

#[test]
fn admit_refuses_unknown_and_disabled_tenants() {
    let mut off = policy_with(1, 1);
    off.enabled = false;
    let ten = tenancy(&[("on", policy_with(1, 1)), ("off", off)], 1, 1 << 20);
    assert_eq!(ten.admit(&t("nobody"), &[], 0).unwrap_err(), TenancyError::UnknownTenant { tenant: t("nobody") });
    assert_eq!(ten.admit(&t("off"), &[], 0).unwrap_err(), TenancyError::Disabled { tenant: t("off") });
    assert_eq!(ten.admit(&t("nobody"), &[], 0).unwrap_err().to_string(), "tenant \"nobody\" is not configured on this server");
    assert!(ten.admit(&t("on"), &[], 0).is_ok());
}

#[test]
fn admit_refuses_operations_not_allowed_naming_the_allowed_ones() {
    let mut p = policy_with(1, 1);
    p.allowed_operations = vec![Operation::Rotate];
    let ten = tenancy(&[("a", p)], 1, 1 << 20);
    let err = ten.admit(&t("a"), &[Operation::Rotate, Operation::MeanFilter], 0).unwrap_err();
    assert_eq!(err.to_string(), "operation mean_filter is not allowed for tenant \"a\" (allowed: rotate)");
    assert!(ten.admit(&t("a"), &[Operation::Rotate], 0).is_ok());
}

#[test]
fn admit_applies_the_token_bucket_against_the_given_clock() {
    let mut p = policy_with(1, 1);
    p.rate = Some((2.0, 2));
    let ten = tenancy(&[("a", p)], 1, 1 << 20);
    let t0 = Instant::now();
    assert!(ten.admit_at(&t("a"), &[], 0, t0).is_ok());
    assert!(ten.admit_at(&t("a"), &[], 0, t0).is_ok());
    let err = ten.admit_at(&t("a"), &[], 0, t0).unwrap_err();
    assert_eq!(err, TenancyError::RateLimited { tenant: t("a"), rate: 2.0, burst: 2, retry_after: Duration::from_millis(500) });
    assert_eq!(err.to_string(), "tenant \"a\" is over its rate limit of 2 requests per second (burst 2); retry in 500 ms");
    assert!(ten.admit_at(&t("a"), &[], 0, t0 + Duration::from_millis(500)).is_ok());
}

#[test]
fn a_reload_changes_the_rate_for_the_next_request() {
    let mut p = policy_with(1, 1);
    p.rate = Some((1.0, 1));
    let ten = tenancy(&[("a", p.clone())], 1, 1 << 20);
    let t0 = Instant::now();
    assert!(ten.admit_at(&t("a"), &[], 0, t0).is_ok());
    assert!(ten.admit_at(&t("a"), &[], 0, t0).is_err());
    p.rate = None;
    ten.reconfigure(runtime(&[("a", p)], 1 << 20));
    assert!(ten.admit_at(&t("a"), &[], 0, t0).is_ok(), "no rate limit after the reload");
}

#[test]
fn admit_refuses_requests_over_the_tenant_byte_limit_and_caps_pixels_at_the_server_limit() {
    let mut p = policy_with(1, 1);
    p.max_image_pixels = 1_000_000; // above the server's 5000
    let ten = tenancy(&[("a", p)], 1, 1 << 20);
    let err = ten.admit(&t("a"), &[], 10_001).unwrap_err();
    assert_eq!(err.to_string(), "request is 10001 bytes, over tenant \"a\"'s limit of 10000 bytes");
    assert_eq!(ten.admit(&t("a"), &[], 10_000).unwrap().max_image_pixels, 5000);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refuses_at_once_beyond_concurrent_plus_queued_and_serves_again_after() {
    let ten = tenancy(&[("a", policy_with(1, 1))], 2, 1 << 20);
    let adm = ten.admit(&t("a"), &[], 0).unwrap();
    let (job1, release1, started1) = held_job();
    let first = tokio::spawn({
        let (ten, adm) = (ten.clone(), adm.clone());
        async move { ten.run(&adm, SMALL, job1).await }
    });
    started1.await.unwrap();
    // The second waits: the tenant may run only one at a time, though a worker is free.
    let second = tokio::spawn({
        let (ten, adm) = (ten.clone(), adm.clone());
        async move { ten.run(&adm, SMALL, || 2).await }
    });
    until(|| ten.load(&t("a")) == TenantLoad { running: 1, queued: 1 }).await;
    let err = ten.run(&adm, SMALL, || 3).await.unwrap_err();
    assert_eq!(err, TenancyError::TenantBusy { tenant: t("a"), admitted: 2, max_concurrent: 1, max_queued: 1 });
    assert_eq!(
        err.to_string(),
        "tenant \"a\" already has 2 requests running or queued, its limit (max_concurrent_requests 1 + max_queued_requests 1)"
    );
    release1.send(()).unwrap();
    first.await.unwrap().unwrap();
    assert_eq!(second.await.unwrap(), Ok(2));
    assert_eq!(ten.run(&adm, SMALL, || 4).await, Ok(4));
    assert_eq!(ten.load(&t("a")), TenantLoad::default());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_tenant_at_its_limit_does_not_block_another() {
    let ten = tenancy(&[("a", policy_with(1, 0)), ("b", policy_with(1, 0))], 2, 1 << 20);
    let adm_a = ten.admit(&t("a"), &[], 0).unwrap();
    let (job, release, started) = held_job();
    let held = tokio::spawn({
        let ten = ten.clone();
        async move { ten.run(&adm_a, SMALL, job).await }
    });
    started.await.unwrap();
    let adm_b = ten.admit(&t("b"), &[], 0).unwrap();
    assert_eq!(ten.run(&adm_b, SMALL, || "b ran").await, Ok("b ran"));
    release.send(()).unwrap();
    held.await.unwrap().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memory_budget_refuses_what_can_never_fit_and_delays_what_cannot_fit_yet() {
    let ten = tenancy(&[("a", policy_with(4, 4))], 2, 1000);
    let adm = ten.admit(&t("a"), &[], 0).unwrap();
    let err = ten.run(&adm, JobCost::kernels(1, 1001), || ()).await.unwrap_err();
    assert_eq!(
        err.to_string(),
        "image needs 1001 bytes in flight, over the server's memory budget of 1000 bytes (tenancy.memory_budget_bytes)"
    );
    let (job, release, started) = held_job();
    let big = tokio::spawn({
        let (ten, adm) = (ten.clone(), adm.clone());
        async move { ten.run(&adm, JobCost::kernels(1, 700), job).await }
    });
    started.await.unwrap();
    // A worker is free, but 700 + 400 > 1000: it waits for the memory.
    let waiting = tokio::spawn({
        let (ten, adm) = (ten.clone(), adm.clone());
        async move { ten.run(&adm, JobCost::kernels(1, 400), || "ran").await }
    });
    until(|| ten.load(&t("a")).queued == 1).await;
    assert_eq!(ten.load(&t("a")).running, 1);
    release.send(()).unwrap();
    big.await.unwrap().unwrap();
    assert_eq!(waiting.await.unwrap(), Ok("ran"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_cancelled_while_queued_leaves_the_queue_and_never_runs() {
    let ten = tenancy(&[("a", policy_with(1, 1))], 1, 1 << 20);
    let adm = ten.admit(&t("a"), &[], 0).unwrap();
    let (job, release, started) = held_job();
    let held = tokio::spawn({
        let (ten, adm) = (ten.clone(), adm.clone());
        async move { ten.run(&adm, SMALL, job).await }
    });
    started.await.unwrap();
    let ran = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let queued = tokio::spawn({
        let (ten, adm, ran) = (ten.clone(), adm.clone(), ran.clone());
        async move { ten.run(&adm, SMALL, move || ran.store(true, std::sync::atomic::Ordering::SeqCst)).await }
    });
    until(|| ten.load(&t("a")).queued == 1).await;
    queued.abort();
    let _ = queued.await;
    assert_eq!(ten.load(&t("a")), TenantLoad { running: 1, queued: 0 });
    release.send(()).unwrap();
    held.await.unwrap().unwrap();
    assert_eq!(ten.run(&adm, SMALL, || 7).await, Ok(7));
    assert!(!ran.load(std::sync::atomic::Ordering::SeqCst), "the cancelled job's kernel never ran");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queued_work_from_weights_1_and_3_is_served_1_to_3() {
    let mut light = policy_with(1, 100);
    light.weight = 1;
    let mut heavy = policy_with(1, 100);
    heavy.weight = 3;
    let ten = tenancy(&[("light", light), ("heavy", heavy)], 1, 1 << 30);
    // Hold the only worker while both tenants queue 40 equal jobs each.
    let blocker_adm = ten.admit(&t("light"), &[], 0).unwrap();
    let (job, release, started) = held_job();
    let blocker = tokio::spawn({
        let ten = ten.clone();
        async move { ten.run(&blocker_adm, SMALL, job).await }
    });
    started.await.unwrap();
    let order = Arc::new(Mutex::new(Vec::new()));
    let cost = JobCost::kernels(scheduler::QUANTUM_PIXELS / 4, 1);
    let mut calls = Vec::new();
    for i in 0..40 {
        for name in ["light", "heavy"] {
            let (ten2, order) = (ten.clone(), order.clone());
            let adm = ten.admit(&t(name), &[], 0).unwrap();
            calls.push(tokio::spawn(async move { ten2.run(&adm, cost, move || order.lock().unwrap().push(name)).await }));
            until(|| ten.load(&t(name)).queued == i + 1).await;
        }
    }
    release.send(()).unwrap();
    blocker.await.unwrap().unwrap();
    for c in calls {
        c.await.unwrap().unwrap();
    }
    let order = order.lock().unwrap();
    let first_32 = &order[..32];
    let heavy = first_32.iter().filter(|n| **n == "heavy").count();
    assert_eq!((32 - heavy, heavy), (8, 24), "{first_32:?}");
}

fn tenancy_inline(tenants: &[(&str, TenantPolicy)], workers: usize, budget: u64, inline_max_pixels: u64) -> Tenancy {
    let mut policy = runtime(tenants, budget);
    policy.limits.inline_max_pixels = inline_max_pixels;
    Tenancy::new(policy, WorkerPool::new(workers, 100).unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tiny_images_run_inline_while_every_worker_is_busy() {
    let ten = tenancy_inline(&[("heavy", policy_with(4, 4)), ("light", policy_with(1, 0))], 1, 1 << 20, 100);
    let heavy = ten.admit(&t("heavy"), &[], 0).unwrap();
    let (job, release, started) = held_job();
    let held = tokio::spawn({
        let (ten, adm) = (ten.clone(), heavy.clone());
        async move { ten.run(&adm, JobCost::kernels(1000, 10), job).await }
    });
    started.await.unwrap();
    // The only worker is held, and a second large job waits for it…
    let queued = tokio::spawn({
        let (ten, adm) = (ten.clone(), heavy.clone());
        async move { ten.run(&adm, JobCost::kernels(1000, 10), || "large").await }
    });
    until(|| ten.load(&t("heavy")).queued == 1).await;
    // …but an image at the inline limit runs at once, on this thread.
    let light = ten.admit(&t("light"), &[], 0).unwrap();
    let caller = std::thread::current().id();
    let ran_on = ten.run(&light, JobCost::kernels(100, 10), move || std::thread::current().id()).await;
    assert_eq!(ran_on, Ok(caller));
    // One pixel more goes through the queue, behind the large job.
    let over = tokio::spawn({
        let (ten, adm) = (ten.clone(), light.clone());
        async move { ten.run(&adm, JobCost::kernels(101, 10), || "over").await }
    });
    until(|| ten.load(&t("light")).queued == 1).await;
    // So does codec work, whose cost is only an estimate, however small.
    let codec = tokio::spawn({
        let (ten, adm) = (ten.clone(), heavy.clone());
        async move { ten.run(&adm, JobCost::estimated(1, 10), || "decoded").await }
    });
    until(|| ten.load(&t("heavy")).queued == 2).await;
    release.send(()).unwrap();
    held.await.unwrap().unwrap();
    assert_eq!(queued.await.unwrap(), Ok("large"));
    assert_eq!(over.await.unwrap(), Ok("over"));
    assert_eq!(codec.await.unwrap(), Ok("decoded"));
    assert_eq!(ten.load(&t("light")), TenantLoad::default());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inline_jobs_count_against_the_tenant_concurrency_and_memory_budget() {
    let ten = tenancy_inline(&[("a", policy_with(1, 1))], 2, 1000, 100);
    let adm = ten.admit(&t("a"), &[], 0).unwrap();
    let tiny = JobCost::kernels(10, 10);
    // An inline job that is running holds the tenant's only slot: the next
    // tiny job queues instead of running beside it.
    let (job, release, started) = held_job();
    let first = tokio::task::spawn_blocking({
        let (ten, adm) = (ten.clone(), adm.clone());
        move || tokio::runtime::Handle::current().block_on(async move { ten.run(&adm, tiny, job).await })
    });
    started.await.unwrap();
    assert_eq!(ten.load(&t("a")), TenantLoad { running: 1, queued: 0 });
    let second = tokio::spawn({
        let (ten, adm) = (ten.clone(), adm.clone());
        async move { ten.run(&adm, tiny, || "second").await }
    });
    until(|| ten.load(&t("a")).queued == 1).await;
    release.send(()).unwrap();
    first.await.unwrap().unwrap();
    assert_eq!(second.await.unwrap(), Ok("second"));
    // The memory budget applies too: a tiny image needing more than is left waits.
    let (job, release, started) = held_job();
    let big = tokio::spawn({
        let (ten, adm) = (ten.clone(), adm.clone());
        async move { ten.run(&adm, JobCost::kernels(1000, 995), job).await }
    });
    started.await.unwrap();
    let starved = tokio::spawn({
        let (ten, adm) = (ten.clone(), adm.clone());
        async move { ten.run(&adm, tiny, || "after").await }
    });
    until(|| ten.load(&t("a")).queued == 1).await;
    release.send(()).unwrap();
    big.await.unwrap().unwrap();
    assert_eq!(starved.await.unwrap(), Ok("after"));
}

#[tokio::test]
async fn a_panicking_inline_job_is_reported_and_frees_its_slot() {
    let ten = tenancy_inline(&[("a", policy_with(1, 0))], 1, 1 << 20, 100);
    let adm = ten.admit(&t("a"), &[], 0).unwrap();
    let err = ten.run(&adm, SMALL, || -> u8 { panic!("kernel bug") }).await.unwrap_err();
    assert_eq!(err, TenancyError::Worker(WorkerError::Panicked("kernel bug".into())));
    assert_eq!(ten.load(&t("a")), TenantLoad::default());
    assert_eq!(ten.run(&adm, SMALL, || 5).await, Ok(5));
}
