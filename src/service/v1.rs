//! imgsvc.v1.ImageService.

use prost::Message;
use tonic::{Request, Response, Status};

use super::{tenant_of, traced, InvalidRequest, LimitExceeded, Pipeline, PixelBuffer, Processor, ServiceError, Step};
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
    Ok(steps)
}

#[tonic::async_trait]
impl ImageService for V1Service {
    async fn process(&self, request: Request<ProcessRequest>) -> Result<Response<ProcessResponse>, Status> {
        let tenant = tenant_of(&request);
        let processor = self.processor.clone();
        traced("imgsvc.v1.ImageService/Process", tenant, move |tenant| {
            Box::pin(async move {
                
                let req = request.into_inner();
                let steps = steps_from(&req.operations, processor.policy().limits.max_operations)?;
                let operations: Vec<_> = steps.iter().map(|s| s.operation()).collect();
                let admission = processor.admit(&tenant, &operations, req.encoded_len())?;
                let input = PixelBuffer::from_v1(req.image, admission.max_image_pixels)?;
                let out = processor.process(&admission, input, Pipeline::new(steps)).await?;
                Ok::<_, ServiceError>(Response::new(ProcessResponse { image: Some(out.into_v1()) }))
            })
        })
        .await
    }
}
