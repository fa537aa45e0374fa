//! NLImageService, wire-compatible with every existing client.

use prost::Message;
use tonic::{Request, Response, Status};

use super::{InvalidRequest, Pipeline, PixelBuffer, Processor, ServiceError, Step, tenant_of, traced};
use crate::{
    imaging::QuarterTurns,
    proto::nlimage::{NlImage, NlImageRotateRequest, nl_image_rotate_request::Rotation, nl_image_service_server::NlImageService},
    tenancy::policy::Operation,
};

#[derive(Clone, Debug)]
pub struct LegacyService {
    processor: Processor,
}

impl LegacyService {
    pub fn new(processor: Processor) -> Self {
        Self { processor }
    }
}

fn quarter_turns(rotation: i32) -> Result<QuarterTurns, InvalidRequest> {
    match Rotation::try_from(rotation) {
        Ok(Rotation::None) => Ok(QuarterTurns::Zero),
        Ok(Rotation::NinetyDeg) => Ok(QuarterTurns::One),
        Ok(Rotation::OneEightyDeg) => Ok(QuarterTurns::Two),
        Ok(Rotation::TwoSeventyDeg) => Ok(QuarterTurns::Three),
        Err(_) => Err(InvalidRequest::UnknownRotation { value: rotation }),
    }
}

#[tonic::async_trait]
impl NlImageService for LegacyService {
    async fn rotate_image(&self, request: Request<NlImageRotateRequest>) -> Result<Response<NlImage>, Status> {
        let tenant = tenant_of(&request);
        let processor = self.processor.clone();
        traced("NLImageService/RotateImage", tenant, move |tenant| {
            Box::pin(async move {
                let req = request.into_inner();
                let admission = processor.admit(&tenant, &[Operation::Rotate], req.encoded_len())?;
                let turns = quarter_turns(req.rotation)?;
                let input = PixelBuffer::from_legacy(req.image, admission.max_image_pixels)?;
                let out = processor.process(&admission, input, Pipeline::new([Step::Rotate(turns)])).await?;
                Ok::<_, ServiceError>(Response::new(out.into_legacy()))
            })
        })
        .await
    }

    async fn mean_filter(&self, request: Request<NlImage>) -> Result<Response<NlImage>, Status> {
        let tenant = tenant_of(&request);
        let processor = self.processor.clone();
        traced("NLImageService/MeanFilter", tenant, move |tenant| {
            Box::pin(async move {
                let image = request.into_inner();
                let admission = processor.admit(&tenant, &[Operation::MeanFilter], image.encoded_len())?;
                let input = PixelBuffer::from_legacy(Some(image), admission.max_image_pixels)?;
                let out = processor.process(&admission, input, Pipeline::new([Step::MeanFilter])).await?;
                Ok::<_, ServiceError>(Response::new(out.into_legacy()))
            })
        })
        .await
    }
}
