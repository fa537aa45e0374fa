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
        max_connections: 4,
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
fn a_rate_removed_and_restored_by_reloads_gives_no_fresh_burst() {
    let mut p = policy_with(1, 1);
    p.rate = Some((0.001, 1));
    let ten = tenancy(&[("a", p.clone())], 1, 1 << 20);
    let t0 = Instant::now();
    assert!(ten.admit_at(&t("a"), &[], 0, t0).is_ok());
    let mut unlimited = p.clone();
    unlimited.rate = None;
    ten.reconfigure(runtime(&[("a", unlimited)], 1 << 20));
    assert!(ten.admit_at(&t("a"), &[], 0, t0).is_ok());
    ten.reconfigure(runtime(&[("a", p)], 1 << 20));
    let err = ten.admit_at(&t("a"), &[], 0, t0 + Duration::from_secs(1)).unwrap_err();
    assert_eq!(err.reason(), "rate_limited", "{err}");
}

#[test]
fn a_call_refused_for_its_slots_takes_no_token() {
    let mut p = policy_with(1, 0);
    p.rate = Some((0.001, 2));
    let ten = tenancy(&[("a", p)], 1, 1 << 20);
    let (_admission, slot) = ten.admit_call(&t("a"), &[]).unwrap();
    let busy = ten.admit_call(&t("a"), &[]).unwrap_err();
    assert_eq!(
        busy.to_string(),
        "tenant \"a\" already has 1 requests running or queued, its limit (max_concurrent_requests 1 + max_queued_requests 0)"
    );
    drop(slot);
    // The refused call left the second token: this one takes it.
    let (_admission, _slot) = ten.admit_call(&t("a"), &[]).unwrap();
}

#[test]
fn a_tiny_rate_answers_a_long_retry_hint_instead_of_panicking() {
    let mut bucket = rate::TokenBucket::new(1e-21, 1, Instant::now());
    let now = Instant::now();
    assert!(bucket.try_take(now).is_ok());
    assert_eq!(bucket.try_take(now), Err(Duration::MAX));
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
    // Each job takes about a quarter quantum of CPU, as estimated (what a
    // job really costs is charged after it ran).
    let cost = JobCost::kernels(scheduler::MILLISECOND / 4, 1);
    let mut calls = Vec::new();
    for i in 0..40 {
        for name in ["light", "heavy"] {
            let (ten2, order) = (ten.clone(), order.clone());
            let adm = ten.admit(&t(name), &[], 0).unwrap();
            calls.push(tokio::spawn(async move {
                ten2.run(&adm, cost, move || {
                    burn_cpu(Duration::from_nanos(scheduler::MILLISECOND / 4));
                    order.lock().unwrap().push(name)
                })
                .await
            }));
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
    // 8 and 24 exactly if every job took exactly its estimate; measured
    // CPU times vary by a few per cent, so one job either way.
    assert!((23..=25).contains(&heavy), "{first_32:?}");
}

/// Spins until this thread has used `cpu` of CPU time.
fn burn_cpu(cpu: Duration) {
    let start = ThreadCpu::start();
    let mut x = 0u64;
    for _ in 0..100_000_000 {
        for _ in 0..1000 {
            x = std::hint::black_box(x.wrapping_mul(6364136223846793005).wrapping_add(1));
        }
        if start.elapsed_ns().is_none_or(|ns| ns >= cpu.as_nanos() as u64) {
            return;
        }
    }
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

/// Runs the two tenants' jobs, each from `tasks` loops, on a server with
/// two workers; returns the CPU time each tenant's jobs took between
/// `warmup` and `warmup + window` (both backlogged all along).
async fn cpu_shares(weights: (u32, u32), window: Duration) -> (f64, f64) {
    use crate::{
        imagefile::{EncodeOptions, Encoding},
        imaging::QuarterTurns,
        proto::v1::PixelFormat,
        service::{Pipeline, Step, encoded, pixels::ImageShape},
    };
    fn image(format: PixelFormat, width: u32, height: u32) -> crate::service::PixelBuffer {
        let shape = ImageShape::from_v1(format as i32, width, height, u64::MAX).unwrap();
        let data: Vec<u8> = (0..shape.bytes()).map(|i| (i * 31 % 251) as u8).collect();
        shape.with_data(bytes::Bytes::from(data)).unwrap()
    }
    let mut rotating = policy_with(64, 100);
    rotating.weight = weights.0;
    let mut filtering = policy_with(64, 100);
    filtering.weight = weights.1;
    let mut runtime = runtime(&[("rotating", rotating), ("filtering", filtering)], 1 << 30);
    runtime.limits.max_queued_jobs = 1000;
    let ten = Tenancy::new(runtime, WorkerPool::new(2, 1000).unwrap());
    // GRAY8 quarter turns of 1000×1000 (1 byte a pixel, a transpose) and
    // RGBA16 mean filters of 256×256 encoded as PNG (8 bytes a pixel, a
    // conversion and a deflate): per pixel, the second costs far more.
    let gray = image(PixelFormat::Gray8, 1000, 1000);
    let rgba16 = image(PixelFormat::Rgba16, 256, 256);
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut loops = Vec::new();
    // Enough calls that neither tenant's queue runs dry between jobs (the
    // answers have to reach the loops and new jobs come back: a quarter
    // turn of GRAY8 takes well under a millisecond).
    for _ in 0..64 {
        for name in ["rotating", "filtering"] {
            let (ten, stop, gray, rgba16) = (ten.clone(), stop.clone(), gray.clone(), rgba16.clone());
            let adm = ten.admit(&t(name), &[], 0).unwrap();
            loops.push(tokio::spawn(async move {
                for _ in 0..100_000 {
                    if stop.load(std::sync::atomic::Ordering::Relaxed) {
                        break;
                    }
                    if name == "rotating" {
                        let (input, cost) = (gray.clone(), JobCost::kernels(1_000_000, 1));
                        let job = move || Pipeline::new([Step::Rotate(QuarterTurns::One)]).run(input).unwrap().data().len();
                        ten.run(&adm, cost, job).await.unwrap();
                    } else {
                        let (input, cost) = (rgba16.clone(), JobCost::estimated(65_536, 1));
                        let job = move || {
                            let out = Pipeline::new([Step::MeanFilter]).run(input).unwrap();
                            encoded::encode(out, &EncodeOptions::new(Encoding::Png)).unwrap().encoded.map_or(0, |e| e.data.len())
                        };
                        ten.run(&adm, cost, job).await.unwrap();
                    }
                }
            }));
        }
    }
    let cpu = |ten: &Tenancy| (ten.cpu_time(&t("rotating")).as_secs_f64(), ten.cpu_time(&t("filtering")).as_secs_f64());
    tokio::time::sleep(Duration::from_millis(300)).await;
    let before = cpu(&ten);
    tokio::time::sleep(window).await;
    let after = cpu(&ten);
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for l in loops {
        l.await.unwrap();
    }
    (after.0 - before.0, after.1 - before.1)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tenants_get_cpu_time_in_proportion_to_their_weights_whatever_their_formats() {
    // A share ratio, not a timing: each figure is CPU time measured per job.
    let (rotating, filtering) = cpu_shares((1, 1), Duration::from_millis(1200)).await;
    let ratio = rotating / filtering;
    eprintln!("weights 1:1: rotating {rotating:.3} s, filtering {filtering:.3} s of CPU (ratio {ratio:.2})");
    assert!((0.8..=1.2).contains(&ratio), "weights 1:1: rotating {rotating:.3} s, filtering {filtering:.3} s of CPU (ratio {ratio:.2})");
    let (rotating, filtering) = cpu_shares((1, 3), Duration::from_millis(1200)).await;
    let ratio = filtering / rotating;
    eprintln!("weights 1:3: rotating {rotating:.3} s, filtering {filtering:.3} s of CPU (ratio {ratio:.2})");
    assert!((2.4..=3.6).contains(&ratio), "weights 1:3: rotating {rotating:.3} s, filtering {filtering:.3} s of CPU (ratio {ratio:.2})");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tenant_holds_no_more_than_its_part_of_the_workers_while_another_waits() {
    let ten = tenancy(&[("a", policy_with(4, 10)), ("b", policy_with(4, 10))], 2, 1 << 30);
    let (a, b) = (ten.admit(&t("a"), &[], 0).unwrap(), ten.admit(&t("b"), &[], 0).unwrap());
    // Alone, "a" takes both workers, and queues a third job.
    let mut releases = Vec::new();
    let mut calls = Vec::new();
    for _ in 0..3 {
        let (job, release, started) = held_job();
        releases.push((release, started));
        let (ten, a) = (ten.clone(), a.clone());
        calls.push(tokio::spawn(async move { ten.run(&a, SMALL, job).await }));
    }
    until(|| ten.load(&t("a")) == TenantLoad { running: 2, queued: 1 }).await;
    let (job, release_b, _) = held_job();
    let b_call = tokio::spawn({
        let ten = ten.clone();
        async move { ten.run(&b, SMALL, job).await }
    });
    until(|| ten.load(&t("b")).queued == 1).await;
    // A worker frees: "b" waits and "a" is at its part (one of two), so
    // "b" gets it although "a"'s job was queued first.
    // (A job counts as running once a worker took it, a moment before the
    // worker starts it: wait for the start, bounded.)
    let mut running = None;
    until(|| {
        running = running.or_else(|| releases.iter_mut().position(|(_, started)| started.try_recv().is_ok()));
        running.is_some()
    })
    .await;
    let running = running.expect("a job of a's runs");
    releases.remove(running).0.send(()).unwrap();
    until(|| ten.load(&t("b")).running == 1).await;
    assert_eq!(ten.load(&t("a")), TenantLoad { running: 1, queued: 1 });
    release_b.send(()).unwrap();
    b_call.await.unwrap().unwrap();
    for (r, _) in releases {
        r.send(()).unwrap();
    }
    for c in calls {
        c.await.unwrap().unwrap();
    }
}

#[test]
fn a_tenant_holds_at_most_max_connections_and_a_lowered_limit_closes_none_of_them() {
    let three = TenantPolicy { max_connections: 3, ..policy_with(4, 4) };
    let ten = tenancy(&[("a", three.clone()), ("b", three.clone())], 1, 1 << 20);
    let mut held: Vec<_> = (0..3).map(|_| ten.admit_connection(&t("a")).unwrap()).collect();
    assert_eq!(ten.admit_connection(&t("a")).unwrap_err(), TenancyError::TooManyConnections { tenant: t("a"), open: 3, limit: 3 });
    assert!(ten.admit_connection(&t("b")).is_ok(), "counted per tenant");
    assert_eq!(ten.admit_connection(&t("nobody")).unwrap_err(), TenancyError::UnknownTenant { tenant: t("nobody") });
    held.pop();
    assert_eq!(ten.connections(&t("a")), 2);
    held.push(ten.admit_connection(&t("a")).unwrap());
    // Lowered to 1: the three stay, new ones are refused until all but one end.
    ten.reconfigure(runtime(&[("a", TenantPolicy { max_connections: 1, ..three })], 1 << 20));
    assert_eq!(ten.connections(&t("a")), 3);
    assert!(matches!(ten.admit_connection(&t("a")), Err(TenancyError::TooManyConnections { open: 3, limit: 1, .. })));
    held.truncate(1);
    assert!(matches!(ten.admit_connection(&t("a")), Err(TenancyError::TooManyConnections { open: 1, limit: 1, .. })));
    held.clear();
    assert_eq!(ten.connections(&t("a")), 0);
    drop(ten.admit_connection(&t("a")).unwrap());
}

/// A kernel split across two threads: the bands the other thread runs are
/// charged to the job (its own thread's CPU time alone would miss them),
/// and when that thread was running a job of its own, taken off that job.
#[test]
fn a_kernel_split_across_threads_charges_the_job_every_band() {
    use crate::imaging::{self, Layout};
    let pool = rayon::ThreadPoolBuilder::new().num_threads(2).build().unwrap();
    let layout = Layout::new(2048, 2048, 3).unwrap();
    let src = vec![9u8; layout.samples()];
    let job = Arc::new(JobState::default());
    assert!(job.start());
    let (own, other) = pool.install(|| {
        // Bounded: the other thread normally takes bands of the first run.
        for _ in 0..20 {
            let cpu = ThreadCpu::start();
            let out = CURRENT_JOB.set(&job, || imaging::mean_filter_cancellable(&src, layout, &JobBands::current()));
            assert_eq!(out.unwrap().len(), layout.samples());
            let own = cpu.elapsed_ns().unwrap();
            if job.borrowed_ns.load(Ordering::Acquire) > 0 {
                return (own, job.borrowed_ns.load(Ordering::Acquire));
            }
        }
        panic!("the other thread of the pool never ran a band in 20 kernels");
    });
    assert_eq!(job.lent_ns.load(Ordering::Acquire), 0, "the other thread ran no job of its own");
    assert_eq!(job.cpu_ns(own), own + other);

    // A thread inside a job of its own that runs another job's band lends
    // that band's time: it moves from the first job to the second.
    let (mine, theirs) = (Arc::new(JobState::default()), Arc::new(JobState::default()));
    CURRENT_JOB.set(&mine, || {
        let bands = JobBands(Some(theirs.clone()));
        assert!(!crate::imaging::Bands::cancelled(&bands));
        let spin = std::time::Instant::now();
        while spin.elapsed() < Duration::from_millis(5) {
            std::hint::black_box(0u64);
        }
        crate::imaging::Bands::band_done(&bands);
    });
    let moved = theirs.borrowed_ns.load(Ordering::Acquire);
    assert!(moved > 0);
    assert_eq!(mine.lent_ns.load(Ordering::Acquire), moved);
    assert_eq!(mine.cpu_ns(moved + 1000), 1000);
    // Its caller gone, the job's kernels stop at their next band.
    theirs.abandon();
    assert!(crate::imaging::Bands::cancelled(&JobBands(Some(theirs))));
}
