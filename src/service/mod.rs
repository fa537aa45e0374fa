//! The gRPC edge: protobuf in, validated [`PixelBuffer`] and [`Pipeline`],
//! kernels on the worker pool, protobuf out.
//!
//! Both APIs ([`legacy::LegacyService`] for NLImageService and
//! [`v1::V1Service`] for imgsvc.v1) share one [`Processor`], so they apply
//! the same validation, limits and tracing. Errors are decided in
//! [`error`] and mapped to `tonic::Status` in one `From` impl.

pub mod encoded;
pub mod error;
pub mod legacy;
pub mod pixels;
pub mod stream;
pub mod v1;

use std::{future::Future, time::Instant};

use bytes::Bytes;
use tracing::{Instrument, field::Empty};

pub use error::{InvalidRequest, LimitExceeded, ServiceError, StreamProtocolError};
pub use pixels::{Depth, ImageShape, PixelBuffer, RequestError};

use crate::{
    identity::{Tenant, TenantId},
    imaging::{self, Layout, QuarterTurns},
    serving::admission::CallMemory,
    tenancy::{
        JobCost, RuntimePolicy, Tenancy, TenancyError,
        memory::{self, Account, Stage},
        policy::Operation,
    },
};

/// One step of a pipeline.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Step {
    Rotate(QuarterTurns),
    MeanFilter,
}

impl Step {
    /// The operation a tenant must be allowed to run this step.
    pub fn operation(self) -> Operation {
        match self {
            Step::Rotate(_) => Operation::Rotate,
            Step::MeanFilter => Operation::MeanFilter,
        }
    }
}

/// An ordered list of steps, with consecutive rotations folded into one.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Pipeline {
    steps: Vec<Step>,
}

impl Pipeline {
    pub fn new(steps: impl IntoIterator<Item = Step>) -> Self {
        let mut folded: Vec<Step> = Vec::new();
        for step in steps {
            match (folded.last_mut(), step) {
                (Some(Step::Rotate(prev)), Step::Rotate(next)) => *prev = prev.then(next),
                (_, step) => folded.push(step),
            }
        }
        folded.retain(|s| *s != Step::Rotate(QuarterTurns::Zero));
        Self { steps: folded }
    }

    pub fn steps(&self) -> &[Step] {
        &self.steps
    }

    /// Runs the pipeline. CPU-bound: call it on the worker pool.
    pub fn run(&self, input: PixelBuffer) -> Result<PixelBuffer, imaging::ImagingError> {
        run_steps(&self.steps, input, Kernels::Fast)
    }
}

/// Runs `steps` one by one, as requested (no folding), with the plain
/// reference kernels ([`imaging::reference`]): the oracle that tests and
/// fuzz targets hold [`Pipeline::run`] to. Slow; never on a request path.
pub fn run_reference(steps: &[Step], input: PixelBuffer) -> PixelBuffer {
    run_steps(steps, input, Kernels::Reference).expect("the reference kernels accept every validated buffer")
}

#[derive(Clone, Copy)]
enum Kernels {
    Fast,
    Reference,
}

fn run_steps(steps: &[Step], input: PixelBuffer, kernels: Kernels) -> Result<PixelBuffer, imaging::ImagingError> {
    let mut current = input;
    // A job whose caller has gone (cancelled, or past its deadline) stops
    // at the next step, or inside a kernel at its next band of rows
    // (`imaging::Cancel`): what it made so far is dropped unseen, and the
    // job ends with `ImagingError::Cancelled`, which nobody receives.
    let job = crate::tenancy::current_job();
    let gone = || job.as_ref().is_some_and(|j| j.gone());
    let bands = crate::tenancy::JobBands::current();
    let stopped = || {
        crate::tenancy::count_abandoned();
        Err(imaging::ImagingError::Cancelled)
    };
    for &step in steps {
        if gone() {
            return stopped();
        }
        let applied = match current.depth() {
            Depth::Eight => apply(step, current.data(), current.layout(), kernels, &bands).map(|(layout, out)| (layout, Bytes::from(out))),
            Depth::Sixteen => {
                let samples: Vec<u16> = current.data().chunks_exact(2).map(|b| u16::from_le_bytes([b[0], b[1]])).collect();
                apply(step, &samples, current.layout(), kernels, &bands)
                    .map(|(layout, out)| (layout, Bytes::from(out.iter().flat_map(|s| s.to_le_bytes()).collect::<Vec<u8>>())))
            }
        };
        current = match applied {
            Ok((layout, data)) => current.with_data(layout, data),
            Err(imaging::ImagingError::Cancelled) => return stopped(),
            Err(e) => return Err(e),
        };
    }
    Ok(current)
}

fn apply<T: imaging::Sample + Default>(
    step: Step,
    src: &[T],
    layout: Layout,
    kernels: Kernels,
    cancel: imaging::Cancel<'_>,
) -> Result<(Layout, Vec<T>), imaging::ImagingError> {
    use imaging::reference;
    Ok(match (step, kernels) {
        (Step::Rotate(turns), Kernels::Fast) => (layout.rotated(turns), imaging::rotate_cancellable(src, layout, turns, cancel)?),
        (Step::Rotate(turns), Kernels::Reference) => (layout.rotated(turns), reference::rotate(src, layout, turns)),
        (Step::MeanFilter, Kernels::Fast) => (layout, imaging::mean_filter_cancellable(src, layout, cancel)?),
        (Step::MeanFilter, Kernels::Reference) => (layout, reference::mean_filter(src, layout)),
    })
}

/// What both APIs share: tenancy (limits, admission, scheduling).
#[derive(Clone, Debug)]
pub struct Processor {
    tenancy: Tenancy,
}

impl Processor {
    pub fn new(tenancy: Tenancy) -> Self {
        Self { tenancy }
    }

    /// The policy in force now (limits for request validation).
    pub fn policy(&self) -> std::sync::Arc<RuntimePolicy> {
        self.tenancy.policy()
    }

    /// The admission and memory account of a call: the ones the admission
    /// layer made at the request's headers ([`crate::serving::admission`]), or, for
    /// a request that did not pass it, an admission of `operations` on
    /// `request_bytes` and a fresh account.
    pub fn call<T>(
        &self,
        request: &tonic::Request<T>,
        tenant: &TenantId,
        operations: &[Operation],
        request_bytes: impl FnOnce() -> usize,
    ) -> Result<CallMemory, ServiceError> {
        if let Some(call) = request.extensions().get::<CallMemory>() {
            return Ok(call.clone());
        }
        let admission = self.tenancy.admit(tenant, operations, request_bytes() as u64)?;
        let account = self.tenancy.account(&admission, Stage::Receiving);
        Ok(CallMemory { admission, account })
    }

    /// Makes `account` hold exactly `target` bytes: gives back the excess,
    /// or charges the difference, waiting up to `tenancy.memory_wait_ms`
    /// for it.
    pub async fn hold(&self, account: &Account, target: u64) -> Result<(), ServiceError> {
        let held = account.held();
        if target <= held {
            account.release(held - target);
            return Ok(());
        }
        let wait = self.tenancy.policy().tenancy.memory_wait;
        let tenant = account.tenant().clone();
        account.reserve(target - held, wait, || memory::count_wait(&tenant)).await.map_err(TenancyError::from)?;
        Ok(())
    }

    /// Charges `n` more bytes to `account`, waiting up to
    /// `tenancy.memory_wait_ms` for them.
    pub async fn reserve(&self, account: &Account, n: u64) -> Result<(), ServiceError> {
        self.hold(account, account.held() + n).await
    }

    /// Runs other CPU-bound work of an admitted request (decoding,
    /// encoding) on the worker pool, through the tenant's queue, with
    /// `cost.bytes` held by the call's `account` while it runs.
    pub async fn run<R, F>(&self, call: &CallMemory, cost: JobCost, job: F) -> Result<R, ServiceError>
    where
        F: FnOnce() -> Result<R, ServiceError> + Send + 'static,
        R: Send + 'static,
    {
        self.tenancy.run_charged(&call.admission, cost, &call.account, job).await?
    }

    /// Runs an admitted, validated pipeline on the worker pool through the
    /// tenant's queue, and records the image in the span. The call's
    /// account holds the input and the images the pipeline makes while it
    /// runs, then only the output.
    pub async fn process(&self, call: &CallMemory, input: PixelBuffer, pipeline: Pipeline) -> Result<PixelBuffer, ServiceError> {
        let span = tracing::Span::current();
        // As i64: OpenTelemetry has no unsigned integers, and exports u64
        // fields as strings.
        span.record("width", input.layout().width() as i64);
        span.record("height", input.layout().height() as i64);
        span.record("format", input.format().as_str_name().trim_start_matches("PIXEL_FORMAT_"));
        crate::telemetry::metrics::note_request_bytes(input.data().len());
        if pipeline.steps().is_empty() {
            crate::telemetry::metrics::note_response(0, input.data().len());
            self.hold(&call.account, input.data().len() as u64).await?;
            return Ok(input); // nothing to do: hand the request's bytes back
        }
        let layout = input.layout();
        let image_bytes = input.data().len() as u64;
        let pixels = layout.width() as u64 * layout.height() as u64;
        let work = pixels * pipeline.steps().len() as u64;
        let cost = JobCost::kernels(work, image_bytes * live_buffers(pipeline.steps().len()));
        let output = self.tenancy.run_charged(&call.admission, cost, &call.account, move || pipeline.run(input)).await??;
        // The input and intermediates are gone: the account holds the output.
        self.hold(&call.account, output.data().len() as u64).await?;
        crate::telemetry::metrics::note_response(pixels, output.data().len());
        Ok(output)
    }
}

/// Images in flight while `steps` steps run: the input plus at most two
/// buffers of the same size (a step's output, and the previous step's
/// while it is read).
pub fn live_buffers(steps: usize) -> u64 {
    1 + steps.min(2) as u64
}

/// What a unary answer holds once encoded: the message and its 5-byte gRPC
/// prefix.
pub fn message_bytes(message: &impl prost::Message) -> u64 {
    message.encoded_len() as u64 + 5
}

/// What a unary answer of `message` bytes ([`message_bytes`]) holds until
/// it is sent, to charge when the handler returns it. Spliced
/// ([`legacy::SplicedAnswer`]: the pixels go into the body as they are),
/// the message once. Otherwise tonic encodes the message into a buffer it
/// keeps until the answer ends (a second copy), and when responses may be
/// compressed (`server.compress_responses`) compresses that buffer into a
/// third. Each data frame takes its bytes' share of the charge with it; the
/// rest is released when the answer ends.
pub fn answer_bytes(message: u64, spliced: bool, may_compress: bool) -> u64 {
    match (spliced, may_compress) {
        (true, _) => message,
        (false, false) => message * 2,
        (false, true) => message * 3,
    }
}

/// The tenant the identity layer attached to a request.
pub fn tenant_of<T>(request: &tonic::Request<T>) -> Result<TenantId, ServiceError> {
    request.extensions().get::<Tenant>().map(|t| t.0.clone()).ok_or(ServiceError::NoTenant)
}

/// Runs one RPC inside its span: method, tenant, image facts, status and
/// duration, and one log event when it ends.
pub async fn traced<T, F>(method: &'static str, tenant: Result<TenantId, ServiceError>, call: F) -> Result<T, tonic::Status>
where
    F: FnOnce(TenantId) -> std::pin::Pin<Box<dyn Future<Output = Result<T, ServiceError>> + Send>>,
{
    let span = tracing::info_span!(
        "rpc",
        method,
        tenant = Empty,
        width = Empty,
        height = Empty,
        format = Empty,
        status = Empty,
        duration_ms = Empty,
    );
    let started = Instant::now();
    let tenant_label = tenant.as_ref().ok().map(|t| t.as_str().to_owned());
    let result = async {
        let tenant = tenant?;
        tracing::Span::current().record("tenant", tenant.as_str());
        call(tenant).await
    }
    .instrument(span.clone());
    let result = crate::telemetry::metrics::measured(method, tenant_label.as_deref(), result).await;
    let code = match &result {
        Ok(_) => tonic::Code::Ok,
        Err(status) => status.code(),
    };
    span.record("status", format!("{code:?}"));
    span.record("duration_ms", started.elapsed().as_secs_f64() * 1e3);
    span.in_scope(|| match &result {
        Ok(_) => tracing::info!("request finished"),
        Err(status) => tracing::info!(message = status.message(), "request refused"),
    });
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pipeline_folds_consecutive_rotations_and_drops_identity() {
        let p = Pipeline::new([
            Step::Rotate(QuarterTurns::One),
            Step::Rotate(QuarterTurns::Three),
            Step::MeanFilter,
            Step::Rotate(QuarterTurns::Two),
            Step::Rotate(QuarterTurns::One),
        ]);
        assert_eq!(p.steps(), &[Step::MeanFilter, Step::Rotate(QuarterTurns::Three)]);
    }
}
