//! Inflating compressed request messages within what they were charged.
//!
//! A gRPC message with the compressed flag is inflated here, by the
//! admission layer ([`super::admission`]), not by tonic: tonic would inflate
//! it into a buffer that grows up to the server's message limit, whatever
//! the tenant's `max_request_bytes` was and whatever the budget charged.
//! Here the output buffer is the limit the call was charged for and can
//! never grow past it: a message that inflates to more is refused
//! (RESOURCE_EXHAUSTED) once that many bytes have come out, and the rest
//! of the input is never inflated.
//!
//! - zstd is inflated in one pass straight into the output buffer
//!   (`ZSTD_decompressDCtx`), which serves as the decoder's window: no
//!   window buffer is allocated, whatever window size the frame declares.
//! - gzip is inflated by flate2 reading the compressed bytes in place; its
//!   state is fixed (about 40 KiB: the 32 KiB window and the Huffman
//!   tables).
//!
//! The output buffer's capacity is reserved at the limit, but only the
//! bytes written to it become resident memory; the unwritten rest is
//! address space (glibc, jemalloc and mimalloc alike allocate it lazily).

use std::io::Read;

use tonic::codegen::http::HeaderMap;

/// A request's `grpc-encoding` the server inflates itself.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RequestEncoding {
    Gzip,
    Zstd,
}

impl RequestEncoding {
    /// The encoding a request's headers declare, when it is one the server
    /// accepts and inflates (gzip, zstd). Any other (`identity`, none, or
    /// one the server does not accept) is left to tonic, which refuses a
    /// compressed message it cannot inflate.
    pub fn of(headers: &HeaderMap) -> Option<Self> {
        match headers.get("grpc-encoding")?.as_bytes() {
            b"gzip" => Some(Self::Gzip),
            b"zstd" => Some(Self::Zstd),
            _ => None,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Self::Gzip => "gzip",
            Self::Zstd => "zstd",
        }
    }
}

/// Why a compressed message was not inflated.
#[derive(Debug, PartialEq, Eq)]
pub enum InflateError {
    /// It inflates to more than the limit.
    TooLarge,
    /// It is not valid data of its encoding; the decoder's words.
    Corrupt(String),
}

/// Inflates `compressed` (one gRPC message's bytes) of `encoding` into a
/// buffer of at most `limit` bytes.
pub fn inflate(encoding: RequestEncoding, compressed: &[u8], limit: u64) -> Result<Vec<u8>, InflateError> {
    // One more byte than the limit: a message of exactly `limit` bytes
    // fits, and one byte more proves it is over.
    let capacity = usize::try_from(limit.saturating_add(1)).unwrap_or(usize::MAX);
    let mut out = Vec::new();
    out.try_reserve_exact(capacity).map_err(|_| InflateError::TooLarge)?;
    match encoding {
        RequestEncoding::Gzip => {
            let decoder = flate2::bufread::GzDecoder::new(compressed);
            // `take` stops the decoder at the capacity: `read_to_end` then
            // never grows the buffer.
            decoder.take(capacity as u64).read_to_end(&mut out).map_err(|e| InflateError::Corrupt(e.to_string()))?;
        }
        RequestEncoding::Zstd => {
            let mut decoder = zstd::bulk::Decompressor::new().map_err(|e| InflateError::Corrupt(e.to_string()))?;
            if let Err(error) = decoder.decompress_to_buffer(compressed, &mut out) {
                let too_small = error
                    .get_ref()
                    .and_then(|e| e.downcast_ref::<zstd::Error>())
                    .is_some_and(|e| e.is(zstd::zstd_safe::zstd_sys::ZSTD_ErrorCode::ZSTD_error_dstSize_tooSmall));
                return Err(if too_small { InflateError::TooLarge } else { InflateError::Corrupt(error.to_string()) });
            }
        }
    }
    if out.len() as u64 > limit {
        return Err(InflateError::TooLarge);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn gzip(data: &[u8]) -> Vec<u8> {
        let mut encoder = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
        encoder.write_all(data).unwrap();
        encoder.finish().unwrap()
    }

    fn zstd(data: &[u8]) -> Vec<u8> {
        zstd::bulk::compress(data, 3).unwrap()
    }

    /// A zstd frame that does not declare its size (as a streaming
    /// compressor writes it), so the decoder learns it only by inflating.
    fn zstd_streamed(data: &[u8]) -> Vec<u8> {
        let mut encoder = zstd::stream::write::Encoder::new(Vec::new(), 3).unwrap();
        encoder.include_contentsize(false).unwrap();
        encoder.write_all(data).unwrap();
        encoder.finish().unwrap()
    }

    fn sample(len: usize) -> Vec<u8> {
        (0..len).map(|i| (i * 7 % 251) as u8).collect()
    }

    #[test]
    fn a_message_inflates_to_its_bytes_up_to_exactly_the_limit() {
        let data = sample(100_000);
        for (encoding, compressed) in
            [(RequestEncoding::Gzip, gzip(&data)), (RequestEncoding::Zstd, zstd(&data)), (RequestEncoding::Zstd, zstd_streamed(&data))]
        {
            assert_eq!(inflate(encoding, &compressed, 100_000).unwrap(), data, "{encoding:?}");
            assert_eq!(inflate(encoding, &compressed, 99_999), Err(InflateError::TooLarge), "{encoding:?}");
        }
    }

    #[test]
    fn a_bomb_is_refused_with_no_more_memory_than_the_limit() {
        // 64 MiB of zeros, a few KiB compressed; limit 1 MiB.
        let zeros = vec![0u8; 64 << 20];
        for (encoding, compressed) in
            [(RequestEncoding::Gzip, gzip(&zeros)), (RequestEncoding::Zstd, zstd(&zeros)), (RequestEncoding::Zstd, zstd_streamed(&zeros))]
        {
            assert!(compressed.len() < 100_000, "{encoding:?}: {}", compressed.len());
            assert_eq!(inflate(encoding, &compressed, 1 << 20), Err(InflateError::TooLarge), "{encoding:?}");
        }
    }

    #[test]
    fn corrupt_and_truncated_data_is_named_as_such() {
        let data = sample(10_000);
        for (encoding, compressed) in [(RequestEncoding::Gzip, gzip(&data)), (RequestEncoding::Zstd, zstd_streamed(&data))] {
            let truncated = &compressed[..compressed.len() / 2];
            assert!(matches!(inflate(encoding, truncated, 1 << 20), Err(InflateError::Corrupt(_))), "{encoding:?} truncated");
            assert!(matches!(inflate(encoding, b"not compressed at all", 1 << 20), Err(InflateError::Corrupt(_))), "{encoding:?}");
        }
    }

    #[test]
    fn the_encoding_comes_from_the_grpc_encoding_header() {
        let mut headers = HeaderMap::new();
        assert_eq!(RequestEncoding::of(&headers), None);
        for (value, want) in
            [("gzip", Some(RequestEncoding::Gzip)), ("zstd", Some(RequestEncoding::Zstd)), ("identity", None), ("br", None)]
        {
            headers.insert("grpc-encoding", value.parse().unwrap());
            assert_eq!(RequestEncoding::of(&headers), want, "{value}");
        }
    }
}
