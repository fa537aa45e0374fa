//! imgsvc.v1.ImageService.

use tonic::{Request, Response, Status};

use super::{codec, tenant_of, traced, InvalidRequest, LimitExceeded, Pipeline, PixelBuffer, Processor, ServiceError, Step};
use crate::{
    imaging::QuarterTurns,
    proto::v1::{
        image_service_server::ImageService, operation::Kind, rotate::{Amount, Angle}, Operation, ProcessRequest,
        ProcessResponse,
    },
};

#[derive(Clone, Debug)]
pub struct V1Service {
    processor: Processor,
}

impl V1Service {
    pub fn new(processor: Processor) -> Self {
        Self { processor }
    }
}

/// Validates a v1 operation list into a pipeline.
pub fn pipeline_from(operations: &[Operation], max_operations: usize) -> Result<Pipeline, ServiceError> {
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
                Some(Amount::QuarterTurns(n)) => Ok(Step::Rotate(QuarterTurns::from_count(n))),
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
    Ok(Pipeline::new(steps))
}

#[tonic::async_trait]
impl ImageService for V1Service {
    async fn process(&self, request: Request<ProcessRequest>) -> Result<Response<ProcessResponse>, Status> {
        let tenant = tenant_of(&request);
        let processor = self.processor.clone();
        traced("imgsvc.v1.ImageService/Process", tenant, move |_tenant| {
            Box::pin(async move {
                let mut req = request.into_inner();
                let limits = *processor.limits();
                // Every cheap check before any work.
                let pipeline = pipeline_from(&req.operations, limits.max_operations)?;
                let output = codec::output_options(req.output.as_ref())?;
                let input = match codec::encoded_input(&mut req.image, codec::decode_limits(&limits))? {
                    Some(encoded) => processor.run(move || codec::decode(&encoded)).await?,
                    None => PixelBuffer::from_v1(req.image, limits.max_image_pixels)?,
                };
                let out = processor.process(input, pipeline).await?;
                let image = match output {
                    Some(options) => processor.run(move || codec::encode(out, &options)).await?,
                    None => out.into_v1(),
                };
                Ok::<_, ServiceError>(Response::new(ProcessResponse { image: Some(image) }))
            })
        })
        .await
    }
}
