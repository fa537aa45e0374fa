//! NLImageService, wire-compatible with every existing client.

use prost::Message;
use tonic::{Request, Response, Status};

use super::{InvalidRequest, Pipeline, PixelBuffer, Processor, ServiceError, Step, message_bytes, tenant_of, traced};
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

/// A RotateImage request checked within `max_pixels`: its image and the one
/// step to run. Pure and synchronous, so the fuzz targets run exactly what
/// the handler runs.
pub fn rotate_request(request: NlImageRotateRequest, max_pixels: u64) -> Result<(PixelBuffer, Step), ServiceError> {
    let turns = quarter_turns(request.rotation)?;
    Ok((PixelBuffer::from_legacy(request.image, max_pixels)?, Step::Rotate(turns)))
}

/// A MeanFilter request checked within `max_pixels` (see [`rotate_request`]).
pub fn mean_filter_request(image: NlImage, max_pixels: u64) -> Result<(PixelBuffer, Step), ServiceError> {
    Ok((PixelBuffer::from_legacy(Some(image), max_pixels)?, Step::MeanFilter))
}

#[tonic::async_trait]
impl NlImageService for LegacyService {
    async fn rotate_image(&self, request: Request<NlImageRotateRequest>) -> Result<Response<NlImage>, Status> {
        let tenant = tenant_of(&request);
        let processor = self.processor.clone();
        traced("NLImageService/RotateImage", tenant, move |tenant| {
            Box::pin(async move {
                let call = processor.call(&request, &tenant, &[Operation::Rotate], || request.get_ref().encoded_len())?;
                let (input, step) = rotate_request(request.into_inner(), call.admission.max_image_pixels)?;
                let out = processor.process(&call, input, Pipeline::new([step])).await?.into_legacy();
                processor.hold(&call.account, message_bytes(&out)).await?;
                Ok::<_, ServiceError>(Response::new(out))
            })
        })
        .await
    }

    async fn mean_filter(&self, request: Request<NlImage>) -> Result<Response<NlImage>, Status> {
        let tenant = tenant_of(&request);
        let processor = self.processor.clone();
        traced("NLImageService/MeanFilter", tenant, move |tenant| {
            Box::pin(async move {
                let call = processor.call(&request, &tenant, &[Operation::MeanFilter], || request.get_ref().encoded_len())?;
                let (input, step) = mean_filter_request(request.into_inner(), call.admission.max_image_pixels)?;
                let out = processor.process(&call, input, Pipeline::new([step])).await?.into_legacy();
                processor.hold(&call.account, message_bytes(&out)).await?;
                Ok::<_, ServiceError>(Response::new(out))
            })
        })
        .await
    }
}
