//! What imgsvc's fuzz targets check (`fuzz_targets/*.rs` each call one
//! function here). Each runs the service's own pure entry points, the ones
//! its gRPC handlers run, on bytes as they would arrive, and asserts:
//! no panic; bad input refused as INVALID_ARGUMENT or RESOURCE_EXHAUSTED
//! (never INTERNAL or UNKNOWN); accepted input processed to the expected
//! shape and bit for bit what the plain reference kernels give.
//!
//! Limits are small (16 Ki pixels) so that every accepted image is compared
//! with the reference kernels and a run does thousands of executions a second.

use bytes::Bytes;
use imgsvc::{
    imagefile::{DecodeLimits, DecodeOptions, Encoding},
    imaging::Layout,
    proto::{
        nlimage::{NlImage, NlImageRotateRequest},
        v1::{ProcessRequest, ProcessStreamRequest, process_stream_request::Part},
    },
    service::{
        ImageShape, InvalidRequest, Pipeline, PixelBuffer, ServiceError, Step,
        encoded::{self, EncodedInput},
        legacy, run_reference, stream,
        v1::{self, RequestImage},
    },
};
use prost::Message;
use std::sync::Once;
use tonic::Code;

/// Largest image (width × height) the targets accept.
pub const MAX_PIXELS: u64 = 1 << 14;
/// Operations per v1 request: the server's default.
pub const MAX_OPERATIONS: usize = 16;
/// Decoding limits of encoded images: the pixel limit above, and far less
/// memory than libFuzzer's malloc limit, so a decoder that ignores the
/// limit is reported as a crash.
pub const DECODE_LIMITS: DecodeLimits = DecodeLimits { max_pixels: MAX_PIXELS, max_alloc_bytes: 16 << 20 };

/// `data[0]`: even = RotateImage, odd = MeanFilter; the rest: the request
/// message as protobuf.
pub fn legacy_request(data: &[u8]) {
    let Some((&method, body)) = data.split_first() else { return };
    let checked = if method % 2 == 0 {
        let Ok(request) = NlImageRotateRequest::decode(body) else { return };
        legacy::rotate_request(request, MAX_PIXELS)
    } else {
        let Ok(image) = NlImage::decode(body) else { return };
        legacy::mean_filter_request(image, MAX_PIXELS)
    };
    match checked {
        Ok((input, step)) => {
            let color = input.layout().channels() == 3;
            let out = run_and_check(input, &[step]).into_legacy();
            assert_eq!(out.color, color, "the legacy colour flag survives");
            assert_eq!(out.data.len(), out.width as usize * out.height as usize * if color { 3 } else { 1 });
        }
        Err(err) => assert_refused(err),
    }
}

/// `data`: a ProcessRequest as protobuf, checked and run as
/// `imgsvc.v1.ImageService/Process` runs it (encoded images decoded,
/// results encoded when asked).
pub fn v1_request(data: &[u8]) {
    let_dependency_panics_unwind();
    let Ok(request) = ProcessRequest::decode(data) else { return };
    let checked = (|| {
        let steps = v1::steps_from(&request.operations, MAX_OPERATIONS)?;
        let output = encoded::output_options(request.output.as_ref())?;
        let input = match v1::request_image(request.image, DECODE_LIMITS)? {
            RequestImage::Raw(buffer) => buffer,
            RequestImage::Encoded(encoded) => encoded::decode(&encoded)?,
        };
        Ok::<_, ServiceError>((steps, output, input))
    })();
    match checked {
        Ok((steps, output, input)) => {
            let out = run_and_check(input, &steps);
            if let Some(options) = output {
                let (width, height) = (out.layout().width() as u32, out.layout().height() as u32);
                let image = encoded::encode(out, &options).expect("a valid result encodes");
                assert_eq!((image.width, image.height), (width, height));
                assert!(image.encoded.is_some_and(|e| !e.data.is_empty()), "an encoded result carries a file");
            }
        }
        Err(err) => assert_refused(err),
    }
}

/// `data[0] + 1`: the largest chunk allowed; the rest: the request stream as
/// length-delimited ProcessStreamRequest messages (undecodable bytes end
/// it). Reassembled as `ProcessStream` does, and held to a model of the
/// protocol: accepted exactly when the stream is one header of a valid
/// image, then non-empty chunks within the limit adding up to its size; the
/// data is then the chunks, concatenated.
pub fn stream_reassembly(data: &[u8]) {
    let Some((&limit, mut wire)) = data.split_first() else { return };
    let max_chunk = usize::from(limit) + 1;
    let mut messages = Vec::new();
    while let Ok(message) = ProcessStreamRequest::decode_length_delimited(&mut wire) {
        messages.push(message);
    }
    let well_formed = well_formed_data(&messages, max_chunk);
    match (reassemble(messages, max_chunk), well_formed) {
        (Ok(buffer), Some(data)) => assert!(buffer.data()[..] == data[..], "reassembled bytes differ from the chunks"),
        (Ok(_), None) => panic!("accepted a malformed stream"),
        (Err(err), Some(_)) => panic!("refused a well-formed stream: {err}"),
        (Err(err), None) => assert_refused(err),
    }
}

/// `data[0]`: the declared encoding (`% 7`: 0 = detect, else
/// `Encoding::ALL[n - 1]`) and TIFF page (`/ 7 % 3`); the rest: the file.
pub fn decode_image(data: &[u8]) {
    let_dependency_panics_unwind();
    let Some((&selector, file)) = data.split_first() else { return };
    let encoding = match usize::from(selector % 7) {
        0 => None,
        n => Some(Encoding::ALL[n - 1]),
    };
    let page = u32::from(selector / 7 % 3);
    let options = DecodeOptions { encoding, page, limits: DECODE_LIMITS };
    match encoded::decode(&EncodedInput { data: Bytes::copy_from_slice(file), options }) {
        Ok(buffer) => {
            assert!(buffer.layout().pixels() as u64 <= DECODE_LIMITS.max_pixels, "decoded past the pixel limit");
            assert!(buffer.data().len() as u64 <= DECODE_LIMITS.max_alloc_bytes, "decoded past the memory limit");
        }
        Err(err) => assert_refused(err),
    }
}

/// Lets a panic raised inside a crates.io dependency unwind. Third-party
/// decoders can panic on malformed files, and `encoded::decode` catches that
/// and refuses the file, as the server must; libfuzzer-sys's panic hook
/// aborts on every panic, which would report those handled cases as
/// crashes. A panic anywhere else (imgsvc's code, std) still aborts at once,
/// and so does a dependency's panic that nothing catches (libfuzzer-sys
/// aborts on whatever unwinds out of a target).
fn let_dependency_panics_unwind() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        let abort = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            if !info.location().is_some_and(|at| at.file().contains("/registry/src/")) {
                abort(info);
            }
        }));
    });
}

/// Runs `steps` through the service's pipeline and checks the result
/// against the reference kernels applied step by step.
fn run_and_check(input: PixelBuffer, steps: &[Step]) -> PixelBuffer {
    let layout = steps.iter().fold(input.layout(), |layout: Layout, step| match step {
        Step::Rotate(turns) => layout.rotated(*turns),
        Step::MeanFilter => layout,
    });
    let out = Pipeline::new(steps.iter().copied()).run(input.clone()).expect("the kernels accept every validated buffer");
    assert_eq!((out.layout(), out.format()), (layout, input.format()));
    assert_eq!(out.data().len(), layout.samples() * input.bytes_per_sample());
    assert!(out == run_reference(steps, input), "{steps:?} on {layout:?} differs from the reference kernels");
    out
}

/// What a refusal of bad input must be: INVALID_ARGUMENT or
/// RESOURCE_EXHAUSTED, with a message.
fn assert_refused(err: ServiceError) {
    let status = tonic::Status::from(err);
    assert!(
        matches!(status.code(), Code::InvalidArgument | Code::ResourceExhausted),
        "bad input refused as {:?}: {}",
        status.code(),
        status.message()
    );
    assert!(!status.message().is_empty(), "a refusal says what is wrong");
}

/// ProcessStream's receiving side without tenancy: header, shape, chunks.
fn reassemble(messages: Vec<ProcessStreamRequest>, max_chunk: usize) -> Result<PixelBuffer, ServiceError> {
    let mut messages = messages.into_iter();
    let header = stream::header_of(messages.next()).map_err(InvalidRequest::from)?;
    let shape = ImageShape::from_v1(header.format, header.width, header.height, MAX_PIXELS)?;
    let mut reassembly = stream::Reassembly::new(shape.bytes(), max_chunk);
    for message in messages {
        reassembly.accept(message).map_err(InvalidRequest::from)?;
    }
    Ok(shape.with_data(reassembly.finish().map_err(InvalidRequest::from)?)?)
}

/// The model: the image data if `messages` is a well-formed stream.
fn well_formed_data(messages: &[ProcessStreamRequest], max_chunk: usize) -> Option<Vec<u8>> {
    let (first, rest) = messages.split_first()?;
    let Some(Part::Header(header)) = &first.part else { return None };
    let declared = ImageShape::from_v1(header.format, header.width, header.height, MAX_PIXELS).ok()?.bytes();
    let chunks = rest
        .iter()
        .map(|message| match &message.part {
            Some(Part::Chunk(chunk)) if !chunk.is_empty() && chunk.len() <= max_chunk => Some(chunk.clone()),
            _ => None,
        })
        .collect::<Option<Vec<Bytes>>>()?;
    let data = chunks.concat();
    (data.len() as u64 == declared).then_some(data)
}
