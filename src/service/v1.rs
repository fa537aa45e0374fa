//! imgsvc.v1.ImageService.

use prost::Message;
use tonic::{Request, Response, Status};

use std::pin::Pin;

use tokio_stream::Stream;

use super::{
    ImageShape,
    stream::{self, Reassembly, chunks},
};
use super::{InvalidRequest, LimitExceeded, Pipeline, PixelBuffer, Processor, ServiceError, Step, codec, tenant_of, traced};
use crate::{codec::DecodeLimits, tenancy::JobCost};
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
}

impl V1Service {
    pub fn new(processor: Processor) -> Self {
        Self { processor }
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
    /// An encoded file, to decode on the worker pool ([`codec::decode`]).
    Encoded(codec::EncodedInput),
}

/// Checks the image of a Process request within `limits` (the tenant's
/// pixel limit). Pure and synchronous, so the fuzz targets run exactly what
/// the handler runs.
pub fn request_image(mut image: Option<Image>, limits: DecodeLimits) -> Result<RequestImage, ServiceError> {
    Ok(match codec::encoded_input(&mut image, limits)? {
        Some(encoded) => RequestImage::Encoded(encoded),
        None => RequestImage::Raw(PixelBuffer::from_v1(image, limits.max_pixels)?),
    })
}

/// Receives a whole ProcessStream request: header first, then chunks.
async fn receive_stream(
    processor: &Processor,
    tenant: &crate::identity::TenantId,
    mut stream: tonic::Streaming<ProcessStreamRequest>,
) -> Result<(crate::tenancy::Admission, PixelBuffer, Vec<Step>), ServiceError> {
    let next = |m: Result<Option<ProcessStreamRequest>, Status>| m.map_err(ServiceError::Transport);
    let header = stream::header_of(next(stream.message().await)?).map_err(InvalidRequest::from)?;
    let policy = processor.policy();
    let steps = steps_from(&header.operations, policy.limits.max_operations)?;
    let operations: Vec<_> = steps.iter().map(|s| s.operation()).collect();
    // max_request_bytes bounds request messages; a streamed image as a whole
    // is bounded by the pixel limit, its chunks by stream.max_chunk_bytes.
    let admission = processor.admit(tenant, &operations, header.encoded_len())?;
    let shape = ImageShape::from_v1(header.format, header.width, header.height, admission.max_image_pixels)?;
    let mut reassembly = Reassembly::new(shape.bytes(), policy.limits.stream_max_chunk_bytes);
    while let Some(message) = next(stream.message().await)? {
        reassembly.accept(message).map_err(InvalidRequest::from)?;
    }
    let data = reassembly.finish().map_err(InvalidRequest::from)?;
    Ok((admission, shape.with_data(data)?, steps))
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
                let (admission, input, steps) = receive_stream(&processor, &tenant, request.into_inner()).await?;
                let out = processor.process(&admission, input, Pipeline::new(steps)).await?;
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
        let processor = self.processor.clone();
        traced("imgsvc.v1.ImageService/Process", tenant, move |tenant| {
            Box::pin(async move {
                let req = request.into_inner();
                let policy = processor.policy();
                // Every cheap check before any work.
                let steps = steps_from(&req.operations, policy.limits.max_operations)?;
                let operations: Vec<_> = steps.iter().map(|s| s.operation()).collect();
                let output = codec::output_options(req.output.as_ref())?;
                let admission = processor.admit(&tenant, &operations, req.encoded_len())?;
                let mut decode_limits = codec::decode_limits(&policy.limits);
                decode_limits.max_pixels = admission.max_image_pixels;
                let input = match request_image(req.image, decode_limits)? {
                    RequestImage::Encoded(encoded) => {
                        // The decoded size is unknown until the header is read
                        // (on the worker): the encoded size stands in for it.
                        let n = encoded.data.len() as u64;
                        processor.run(&admission, JobCost::estimated(n, n), move || codec::decode(&encoded)).await?
                    }
                    RequestImage::Raw(buffer) => buffer,
                };
                let out = processor.process(&admission, input, Pipeline::new(steps)).await?;
                let image = match output {
                    Some(options) => {
                        let cost = JobCost::estimated(out.layout().pixels() as u64, out.data().len() as u64 * 2);
                        processor.run(&admission, cost, move || codec::encode(out, &options)).await?
                    }
                    None => out.into_v1(),
                };
                Ok::<_, ServiceError>(Response::new(ProcessResponse { image: Some(image) }))
            })
        })
        .await
    }
}
