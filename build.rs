//! Compiles the protos with protox (pure Rust): no system `protoc` needed.
use std::{env, path::PathBuf};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protos = ["proto/nlimage.proto", "proto/imgsvc/v1/imgsvc.proto"];
    println!("cargo:rerun-if-changed=proto");

    let mut compiler = protox::Compiler::new(["proto"])?;
    compiler.include_imports(true).include_source_info(true);
    compiler.open_files(protos)?;
    let fds = compiler.file_descriptor_set();

    // Encoded descriptor set for the gRPC reflection service.
    let out_dir = PathBuf::from(env::var("OUT_DIR")?);
    std::fs::write(out_dir.join("imgsvc_descriptor.bin"), compiler.encode_file_descriptor_set())?;

    tonic_prost_build::configure()
        .bytes(".")
        // Reserves each message's length before encoding (see the module).
        .codec_path("crate::proto::codec::ReservingProstCodec")
        .compile_fds(fds)?;
    Ok(())
}
