//! Generated protobuf and gRPC code for both APIs, and their codec.

pub mod codec;

/// The NLImageService wire protocol (`proto/nlimage.proto`, no package).
pub mod nlimage {
    #![allow(clippy::all, missing_docs)]
    include!(concat!(env!("OUT_DIR"), "/_.rs"));
}

/// imgsvc's own versioned API (`proto/imgsvc/v1/imgsvc.proto`).
pub mod v1 {
    #![allow(clippy::all, missing_docs)]
    include!(concat!(env!("OUT_DIR"), "/imgsvc.v1.rs"));
}

/// Encoded `FileDescriptorSet` of both protos, for gRPC server reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/imgsvc_descriptor.bin"));
