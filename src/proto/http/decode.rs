//! Content codings of response bodies (RFC 9110 §8.4.1): gzip, deflate (zlib, or raw as some
//! servers send it) and brotli, decoded in bounded steps so a small body that expands hugely
//! (a "zip bomb") never produces more than the caller has room for at a time.

use std::io::Write;

use brotli_decompressor::{BrotliDecompressStream, BrotliResult, BrotliState, StandardAlloc};
use flate2::write::{DeflateDecoder, GzDecoder, ZlibDecoder};

/// Compressed bytes deflate decodes in one step: deflate expands at most ~1032×, so a step
/// adds at most about 512 KiB past the room asked for.
pub const DEFLATE_STEP: usize = 512;

/// What brotli decodes into at a time (its output is bounded by this, not by its input: a few
/// bytes of brotli can stand for megabytes).
const BROTLI_CHUNK: usize = 16 << 10;

/// The most a [`Decoder::feed`] adds past the room it was given.
pub const OVERSHOOT: usize = DEFLATE_STEP * 1032;

type Brotli = BrotliState<StandardAlloc, StandardAlloc, StandardAlloc>;

pub enum Decoder {
    /// `deflate`, before its first byte says zlib or raw (a zlib stream starts 0x78).
    Deflate,
    Gzip(GzDecoder<Vec<u8>>),
    Zlib(ZlibDecoder<Vec<u8>>),
    Raw(DeflateDecoder<Vec<u8>>),
    /// The state and whether the stream ended.
    Brotli(Box<Brotli>, bool),
}

impl Decoder {
    /// The decoder of a `Content-Encoding` (lower-case), `None` for one we do not decode.
    pub fn for_encoding(name: &str) -> Option<Decoder> {
        match name {
            "gzip" | "x-gzip" => Some(Decoder::Gzip(GzDecoder::new(Vec::new()))),
            "deflate" => Some(Decoder::Deflate),
            "br" => {
                let alloc = || StandardAlloc::default();
                let state = BrotliState::new(alloc(), alloc(), alloc());
                Some(Decoder::Brotli(Box::new(state), false))
            }
            _ => None,
        }
    }

    /// Decodes `input` into `out` until it is used up or `out` grew by `room` (plus at most
    /// [`OVERSHOOT`]): how many bytes of `input` were used.
    pub fn feed(&mut self, input: &[u8], out: &mut Vec<u8>, room: usize) -> std::io::Result<usize> {
        if let (Decoder::Deflate, Some(first)) = (&*self, input.first()) {
            *self = match first {
                0x78 => Decoder::Zlib(ZlibDecoder::new(Vec::new())),
                _ => Decoder::Raw(DeflateDecoder::new(Vec::new())),
            };
        }
        let start = out.len();
        let mut used = 0;
        match self {
            Decoder::Deflate => {}
            Decoder::Brotli(state, ended) => {
                let mut chunk = [0u8; BROTLI_CHUNK];
                while out.len() - start < room && !*ended {
                    let (mut available_in, mut available_out, mut written, mut total) =
                        (input.len() - used, chunk.len(), 0, 0);
                    let result = BrotliDecompressStream(
                        &mut available_in,
                        &mut used,
                        input,
                        &mut available_out,
                        &mut written,
                        &mut chunk,
                        &mut total,
                        state,
                    );
                    out.extend_from_slice(&chunk[..written]);
                    match result {
                        BrotliResult::NeedsMoreOutput => {}
                        BrotliResult::NeedsMoreInput => break,
                        BrotliResult::ResultSuccess => *ended = true,
                        BrotliResult::ResultFailure => return Err(std::io::ErrorKind::InvalidData.into()),
                    }
                }
            }
            flate => {
                while used < input.len() && out.len() - start < room {
                    let end = (used + DEFLATE_STEP).min(input.len());
                    let produced = match flate {
                        Decoder::Gzip(d) => d.write_all(&input[used..end]).map(|()| d.get_mut()),
                        Decoder::Zlib(d) => d.write_all(&input[used..end]).map(|()| d.get_mut()),
                        Decoder::Raw(d) => d.write_all(&input[used..end]).map(|()| d.get_mut()),
                        _ => unreachable!("brotli and undecided deflate are handled above"),
                    }?;
                    out.append(produced);
                    used = end;
                }
            }
        }
        Ok(used)
    }

    /// Decoded bytes are waiting inside (brotli stopped for room, not for input).
    pub fn has_output(&self) -> bool {
        match self {
            Decoder::Brotli(state, ended) => !ended && brotli_decompressor::BrotliDecoderHasMoreOutput(state),
            _ => false,
        }
    }

    /// Ends the stream, adding what it still held to `out`: an error for a cut or broken one.
    pub fn finish(&mut self, out: &mut Vec<u8>) -> std::io::Result<()> {
        let cut = || Err(std::io::ErrorKind::UnexpectedEof.into());
        match self {
            // An empty body.
            Decoder::Deflate => Ok(()),
            Decoder::Gzip(d) => d.try_finish().map(|()| out.append(d.get_mut())),
            Decoder::Zlib(d) => d.try_finish().map(|()| out.append(d.get_mut())),
            Decoder::Raw(d) => d.try_finish().map(|()| out.append(d.get_mut())),
            Decoder::Brotli(_, true) => Ok(()),
            Decoder::Brotli(_, false) => cut(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// "hello" in brotli.
    const HELLO: &[u8] = &[11, 2, 128, 104, 101, 108, 108, 111, 3];

    #[test]
    fn brotli_decodes_in_any_pieces_and_a_cut_stream_fails() {
        for size in 1..HELLO.len() {
            let mut d = Decoder::for_encoding("br").unwrap();
            let mut out = Vec::new();
            for piece in HELLO.chunks(size) {
                assert_eq!(d.feed(piece, &mut out, 1 << 20).unwrap(), piece.len());
            }
            d.finish(&mut out).unwrap();
            assert_eq!(out, b"hello");
        }
        let mut d = Decoder::for_encoding("br").unwrap();
        d.feed(&HELLO[..4], &mut Vec::new(), 1 << 20).unwrap();
        assert!(d.finish(&mut Vec::new()).is_err());
    }

    #[test]
    fn deflate_output_per_feed_is_bounded_by_the_room() {
        let mut z = flate2::write::ZlibEncoder::new(Vec::new(), flate2::Compression::fast());
        z.write_all(&vec![0u8; 8 << 20]).unwrap();
        let zipped = z.finish().unwrap();
        let mut d = Decoder::for_encoding("deflate").unwrap();
        let (mut at, mut total) = (0, 0);
        while at < zipped.len() {
            let mut out = Vec::new();
            at += d.feed(&zipped[at..], &mut out, 64 << 10).unwrap();
            assert!(out.len() <= (64 << 10) + OVERSHOOT, "{} bytes in one feed", out.len());
            total += out.len();
        }
        let mut rest = Vec::new();
        d.finish(&mut rest).unwrap();
        assert_eq!(total + rest.len(), 8 << 20);
    }
}
