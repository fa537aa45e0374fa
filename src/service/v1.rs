//! imgsvc.v1.ImageService.

use prost::Message;
use tonic::{Request, Response, Status};

use std::pin::Pin;

use tokio_stream::Stream;

use super::{
    ImageShape,
    stream::{self, Reassembly, chunks},
};
use super::{
    InvalidRequest, LimitExceeded, Pipeline, PixelBuffer, Processor, ServiceError, Step, answer_bytes, encoded, legacy::SplicedAnswer,
    live_buffers, message_bytes, tenant_of, traced,
};
use crate::{imagefile::DecodeLimits, serving::admission::CallMemory, tenancy::JobCost};
use crate::{
    imaging::QuarterTurns,
    proto::v1::{
        Image, Operation, ProcessRequest, ProcessResponse, ProcessStreamRequest, ProcessStreamResponse, StreamHeader,
        image_service_server::ImageService,
        operation::Kind,
        process_stream_response,
        rotate::{Amount, Angle},
    },
};

/// The response stream of ProcessStream: a header, then data chunks.
pub type ResponseStream = Pin<Box<dyn Stream<Item = Result<ProcessStreamResponse, Status>> + Send>>;

#[derive(Clone, Debug)]
pub struct V1Service {
    processor: Processor,
    /// Raw Process answers go out as [`SplicedAnswer`]s (not when
    /// responses may be compressed: `server.compress_responses`).
    splice: bool,
}

impl V1Service {
    /// `splice`: send raw Process answers as [`SplicedAnswer`]s; only for a
    /// server that never compresses responses.
    pub fn new(processor: Processor, splice: bool) -> Self {
        Self { processor, splice }
    }
}

/// Validates a v1 operation list into steps, in order (not yet folded, so
/// that every requested operation is checked against the tenant's rights).
pub fn steps_from(operations: &[Operation], max_operations: usize) -> Result<Vec<Step>, ServiceError> {
    if operations.len() > max_operations {
        return Err(LimitExceeded::TooManyOperations { count: operations.len(), limit: max_operations }.into());
    }
    let steps = operations
        .iter()
        .enumerate()
        .map(|(index, op)| match &op.kind {
            None => Err(InvalidRequest::EmptyOperation { index }),
            Some(Kind::MeanFilter(_)) => Ok(Step::MeanFilter),
            Some(Kind::Rotate(rotate)) => match rotate.amount {
                None => Err(InvalidRequest::MissingRotateAmount { index }),
                Some(Amount::QuarterTurns(n)) => Ok(Step::Rotate(QuarterTurns::from_count(i64::from(n)))),
                Some(Amount::Angle(value)) => match Angle::try_from(value) {
                    Ok(Angle::Angle0) => Ok(Step::Rotate(QuarterTurns::Zero)),
                    Ok(Angle::Angle90) => Ok(Step::Rotate(QuarterTurns::One)),
                    Ok(Angle::Angle180) => Ok(Step::Rotate(QuarterTurns::Two)),
                    Ok(Angle::Angle270) => Ok(Step::Rotate(QuarterTurns::Three)),
                    Ok(Angle::Unspecified) | Err(_) => Err(InvalidRequest::InvalidAngle { index, value }),
                },
            },
        })
        .collect::<Result<Vec<_>, _>>()?;
    Ok(steps)
}

/// The image of a Process request, checked.
#[derive(Debug)]
pub enum RequestImage {
    /// Raw pixels, validated.
    Raw(PixelBuffer),
    /// An encoded file, to decode on the worker pool ([`encoded::decode`]).
    Encoded(encoded::EncodedInput),
}

/// Checks the image of a Process request within `limits` (the tenant's
/// pixel limit). Pure and synchronous, so the fuzz targets run exactly what
/// the handler runs.
pub fn request_image(mut image: Option<Image>, limits: DecodeLimits) -> Result<RequestImage, ServiceError> {
    Ok(match encoded::encoded_input(&mut image, limits)? {
        Some(encoded) => RequestImage::Encoded(encoded),
        None => RequestImage::Raw(PixelBuffer::from_v1(image, limits.max_pixels)?),
    })
}

/// Receives a whole ProcessStream request: header first, then chunks. The
/// image the header declares is charged to the call's account before its
/// buffer is allocated (with the images its pipeline will make).
async fn receive_stream(
    processor: &Processor,
    call: &CallMemory,
    mut stream: tonic::Streaming<ProcessStreamRequest>,
) -> Result<(PixelBuffer, Vec<Step>), ServiceError> {
    let next = |m: Result<Option<ProcessStreamRequest>, Status>| m.map_err(ServiceError::Transport);
    let header = stream::header_of(next(stream.message().await)?).map_err(InvalidRequest::from)?;
    let policy = processor.policy();
    let steps = steps_from(&header.operations, policy.limits.max_operations)?;
    let operations: Vec<_> = steps.iter().map(|s| s.operation()).collect();
    call.admission.check_operations(&operations)?;
    // max_request_bytes bounds request messages; a streamed image as a whole
    // is bounded by the pixel limit, its chunks by stream.max_chunk_bytes.
    let shape = ImageShape::from_v1(header.format, header.width, header.height, call.admission.max_image_pixels)?;
    processor.reserve(&call.account, shape.bytes() * live_buffers(steps.len())).await?;
    let mut reassembly = Reassembly::new(shape.bytes(), policy.limits.stream_max_chunk_bytes);
    while let Some(message) = next(stream.message().await)? {
        reassembly.accept(message).map_err(InvalidRequest::from)?;
    }
    let data = reassembly.finish().map_err(InvalidRequest::from)?;
    Ok((shape.with_data(data)?, steps))
}

#[tonic::async_trait]
impl ImageService for V1Service {
    type ProcessStreamStream = ResponseStream;

    async fn process_stream(
        &self,
        request: Request<tonic::Streaming<ProcessStreamRequest>>,
    ) -> Result<Response<Self::ProcessStreamStream>, Status> {
        let tenant = tenant_of(&request);
        let processor = self.processor.clone();
        traced("imgsvc.v1.ImageService/ProcessStream", tenant, move |tenant| {
            Box::pin(async move {
                let call = processor.call(&request, &tenant, &[], || 0)?;
                let (input, steps) = receive_stream(&processor, &call, request.into_inner()).await?;
                let out = processor.process(&call, input, Pipeline::new(steps)).await?;
                // The output, and the frames that carry its chunks while the
                // transport holds them.
                processor.hold(&call.account, out.data().len() as u64 * 2).await?;
                let chunk = processor.policy().limits.stream_response_chunk_bytes;
                let image = out.into_v1();
                let header = ProcessStreamResponse {
                    part: Some(process_stream_response::Part::Header(StreamHeader {
                        format: image.format,
                        width: image.width,
                        height: image.height,
                        operations: vec![],
                    })),
                };
                let parts = std::iter::once(header).chain(
                    chunks(image.data, chunk).map(|c| ProcessStreamResponse { part: Some(process_stream_response::Part::Chunk(c)) }),
                );
                let stream: ResponseStream = Box::pin(tokio_stream::iter(parts.map(Ok)));
                Ok::<_, ServiceError>(Response::new(stream))
            })
        })
        .await
    }

    async fn process(&self, request: Request<ProcessRequest>) -> Result<Response<ProcessResponse>, Status> {
        let tenant = tenant_of(&request);
        let (processor, splice) = (self.processor.clone(), self.splice);
        traced("imgsvc.v1.ImageService/Process", tenant, move |tenant| {
            Box::pin(async move {
                let call = processor.call(&request, &tenant, &[], || request.get_ref().encoded_len())?;
                let req = request.into_inner();
                let policy = processor.policy();
                // Every cheap check before any work.
                let steps = steps_from(&req.operations, policy.limits.max_operations)?;
                let operations: Vec<_> = steps.iter().map(|s| s.operation()).collect();
                let output = encoded::output_options(req.output.as_ref())?;
                call.admission.check_operations(&operations)?;
                let mut decode_limits = encoded::decode_limits(&policy.limits);
                decode_limits.max_pixels = call.admission.max_image_pixels;
                let input = match request_image(req.image, decode_limits)? {
                    RequestImage::Encoded(encoded) => {
                        // What decoding holds at its peak, from the file's
                        // header, is charged before decoding beside the file:
                        // the decoded pixels and the largest of the decoder's
                        // working memory (bounded by image::Limits to what is
                        // charged), an EXIF rotation's copy and a conversion
                        // to a v1 mode.
                        let n = encoded.data.len() as u64;
                        let cost = encoded::decode_cost(&encoded)?;
                        processor.run(&call, JobCost::estimated(cost.decoded, n + cost.peak), move || encoded::decode(&encoded)).await?
                    }
                    RequestImage::Raw(buffer) => buffer,
                };
                // The encoder's own limits, before the kernels and the encoder run.
                if let Some(options) = &output {
                    let layout = input.layout();
                    let turned =
                        steps.iter().filter(|s| matches!(s, Step::Rotate(QuarterTurns::One | QuarterTurns::Three))).count() % 2 == 1;
                    let (w, h) = if turned { (layout.height(), layout.width()) } else { (layout.width(), layout.height()) };
                    options.encoding.check_size(w as u32, h as u32)?;
                }
                let out = processor.process(&call, input, Pipeline::new(steps)).await?;
                let image = match output {
                    Some(options) => {
                        let cost = JobCost::estimated(out.layout().pixels() as u64, out.data().len() as u64 * 2);
                        processor.run(&call, cost, move || encoded::encode(out, &options)).await?
                    }
                    None => out.into_v1(),
                };
                let mut response = ProcessResponse { image: Some(image) };
                let message = message_bytes(&response);
                let spliced = if splice { SplicedAnswer::split_process(&mut response) } else { None };
                processor.hold(&call.account, answer_bytes(message, spliced.is_some(), !splice)).await?;
                let mut response = Response::new(response);
                if let Some(spliced) = spliced {
                    response.extensions_mut().insert(spliced);
                }
                Ok::<_, ServiceError>(response)
            })
        })
        .await
    }
}
