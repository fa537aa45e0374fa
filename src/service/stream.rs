//! ProcessStream: reassembly of a chunked image (a pure state machine) and
//! the handler around it.

use bytes::{Bytes, BytesMut};

use super::error::StreamProtocolError;
use crate::proto::v1::{ProcessStreamRequest, StreamHeader, process_stream_request::Part};

/// The header a stream must start with, from its first message (`None`:
/// the stream ended before it).
pub fn header_of(first: Option<ProcessStreamRequest>) -> Result<StreamHeader, StreamProtocolError> {
    match first.map(|m| m.part) {
        None => Err(StreamProtocolError::NoHeader),
        Some(Some(Part::Header(header))) => Ok(header),
        Some(Some(Part::Chunk(_))) => Err(StreamProtocolError::ChunkBeforeHeader { index: 0 }),
        Some(None) => Err(StreamProtocolError::EmptyMessage { index: 0 }),
    }
}

/// Collects the chunks of one image. Pure: no I/O, no async, so its rules
/// are tested (and fuzzed) directly.
#[derive(Debug)]
pub struct Reassembly {
    declared: u64,
    max_chunk: usize,
    data: BytesMut,
    /// Messages seen, the header included (for error messages).
    messages: u64,
}

impl Reassembly {
    /// After a header declaring `declared` bytes. The buffer is allocated up
    /// front: `declared` has been checked against the pixel and byte limits.
    pub fn new(declared: u64, max_chunk: usize) -> Self {
        Self { declared, max_chunk, data: BytesMut::with_capacity(declared as usize), messages: 1 }
    }

    /// Takes the next message after the header: a chunk, or the error it
    /// is (a second header, an empty message, a chunk out of bounds).
    pub fn accept(&mut self, message: ProcessStreamRequest) -> Result<(), StreamProtocolError> {
        match message.part {
            Some(Part::Chunk(chunk)) => self.push(&chunk),
            Some(Part::Header(_)) => Err(self.reject(|index| StreamProtocolError::SecondHeader { index })),
            None => Err(self.reject(|index| StreamProtocolError::EmptyMessage { index })),
        }
    }

    pub fn push(&mut self, chunk: &[u8]) -> Result<(), StreamProtocolError> {
        let index = self.messages;
        self.messages += 1;
        if chunk.is_empty() {
            return Err(StreamProtocolError::EmptyChunk { index });
        }
        if chunk.len() > self.max_chunk {
            return Err(StreamProtocolError::ChunkTooLarge { index, len: chunk.len(), limit: self.max_chunk });
        }
        let received = self.data.len() as u64 + chunk.len() as u64;
        if received > self.declared {
            return Err(StreamProtocolError::PastDeclaredSize { index, received, declared: self.declared });
        }
        self.data.extend_from_slice(chunk);
        Ok(())
    }

    /// Counts a message that is not a chunk and names it in `error`.
    fn reject(&mut self, error: impl FnOnce(u64) -> StreamProtocolError) -> StreamProtocolError {
        let index = self.messages;
        self.messages += 1;
        error(index)
    }

    /// The complete image data, or how much is missing.
    pub fn finish(self) -> Result<Bytes, StreamProtocolError> {
        let received = self.data.len() as u64;
        if received != self.declared {
            return Err(StreamProtocolError::Truncated { received, declared: self.declared });
        }
        Ok(self.data.freeze())
    }
}

/// Splits `data` into chunks of at most `chunk` bytes without copying.
pub fn chunks(data: Bytes, chunk: usize) -> impl Iterator<Item = Bytes> {
    let chunk = chunk.max(1);
    let len = data.len();
    (0..len.div_ceil(chunk)).map(move |i| data.slice(i * chunk..((i + 1) * chunk).min(len)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reassembles_chunks_of_any_size_including_single_bytes() {
        let image: Vec<u8> = (0..=255).collect();
        for size in [1, 3, 7, 100, 256] {
            let mut r = Reassembly::new(256, 256);
            for c in image.chunks(size) {
                r.push(c).unwrap();
            }
            assert_eq!(&r.finish().unwrap()[..], &image[..], "chunk size {size}");
        }
    }

    #[test]
    fn refuses_data_past_the_declared_size_naming_the_message() {
        let mut r = Reassembly::new(10, 100);
        r.push(&[0; 6]).unwrap();
        assert_eq!(r.push(&[0; 5]), Err(StreamProtocolError::PastDeclaredSize { index: 2, received: 11, declared: 10 }));
    }

    #[test]
    fn refuses_a_truncated_stream() {
        let mut r = Reassembly::new(10, 100);
        r.push(&[0; 4]).unwrap();
        assert_eq!(r.finish(), Err(StreamProtocolError::Truncated { received: 4, declared: 10 }));
    }

    #[test]
    fn refuses_empty_and_oversized_chunks() {
        let mut r = Reassembly::new(10, 4);
        assert_eq!(r.push(&[]), Err(StreamProtocolError::EmptyChunk { index: 1 }));
        assert_eq!(r.push(&[0; 5]), Err(StreamProtocolError::ChunkTooLarge { index: 2, len: 5, limit: 4 }));
    }

    #[test]
    fn the_first_message_must_be_the_header_and_later_ones_chunks() {
        let header = || ProcessStreamRequest { part: Some(Part::Header(StreamHeader { width: 2, ..Default::default() })) };
        let chunk = || ProcessStreamRequest { part: Some(Part::Chunk(Bytes::from_static(&[1, 2]))) };
        let empty = ProcessStreamRequest { part: None };
        assert_eq!(header_of(Some(header())).map(|h| h.width), Ok(2));
        assert_eq!(header_of(None), Err(StreamProtocolError::NoHeader));
        assert_eq!(header_of(Some(chunk())), Err(StreamProtocolError::ChunkBeforeHeader { index: 0 }));
        assert_eq!(header_of(Some(empty.clone())), Err(StreamProtocolError::EmptyMessage { index: 0 }));
        let mut r = Reassembly::new(4, 4);
        assert_eq!(r.accept(chunk()), Ok(()));
        assert_eq!(r.accept(header()), Err(StreamProtocolError::SecondHeader { index: 2 }));
        assert_eq!(r.accept(empty), Err(StreamProtocolError::EmptyMessage { index: 3 }));
        assert_eq!(r.accept(chunk()), Ok(()));
        assert_eq!(&r.finish().unwrap()[..], &[1, 2, 1, 2]);
    }

    #[test]
    fn chunks_split_without_gaps_or_overlap() {
        let data = Bytes::from((0..10u8).collect::<Vec<_>>());
        let parts: Vec<Bytes> = chunks(data.clone(), 4).collect();
        assert_eq!(parts.iter().map(|b| b.len()).collect::<Vec<_>>(), [4, 4, 2]);
        assert_eq!(parts.concat(), data.to_vec());
        assert_eq!(chunks(Bytes::new(), 4).count(), 0);
    }
}
