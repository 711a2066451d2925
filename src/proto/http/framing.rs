//! Message bodies as HTTP/1.1 frames them (RFC 9112 §6–7): a known length, chunked coding, or
//! (responses only) until the connection closes. One decoder for both directions: the server
//! reads request bodies with it, the client response bodies.

/// How the rest of a body is framed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Framing {
    /// Body bytes still to come.
    Length(u64),
    Chunked(Chunk),
    /// Everything until the peer closes (a response without a length).
    UntilClose,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Chunk {
    Size,
    Data(u64),
    /// The CRLF after a chunk's data.
    DataEnd,
    Trailers,
}

/// Why a body cannot be read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FrameError {
    /// Bad chunked coding.
    Malformed,
    /// A chunk past what is allowed.
    TooLarge,
    /// Trailers past the header limits.
    TrailersTooLarge,
}

/// What one [`Framing::decode`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Decoded {
    /// Bytes of the input used (framing and data).
    pub consumed: usize,
    /// Body bytes among them.
    pub data: u64,
    /// The body is complete.
    pub done: bool,
}

/// Longest chunk-size line (size, extensions, CRLF) we wait for.
const MAX_CHUNK_LINE: usize = 1024;

/// Header limits for trailers: the most fields and bytes.
#[derive(Debug, Clone, Copy)]
pub struct TrailerLimits {
    pub fields: usize,
    pub bytes: usize,
}

impl Framing {
    /// The framing is complete (nothing more to read).
    pub fn is_done(&self) -> bool {
        *self == Framing::Length(0)
    }

    /// Decodes what `input` holds: body bytes go to `out` (dropped when `None`), at most `room`
    /// of them; a chunk larger than `allowed` is refused before any of it is read.
    pub fn decode(
        &mut self,
        input: &[u8],
        mut room: usize,
        allowed: u64,
        trailers: TrailerLimits,
        mut out: Option<&mut Vec<u8>>,
    ) -> Result<Decoded, FrameError> {
        let mut at = 0;
        let mut data = 0u64;
        let result = |at, data, done| Ok(Decoded { consumed: at, data, done });
        loop {
            let buf = &input[at..];
            match *self {
                Framing::Length(0) => return result(at, data, true),
                Framing::Chunked(Chunk::Data(0)) => *self = Framing::Chunked(Chunk::DataEnd),
                Framing::Length(left) | Framing::Chunked(Chunk::Data(left)) => {
                    if buf.is_empty() || room == 0 {
                        return result(at, data, false);
                    }
                    let n = usize::try_from(left).unwrap_or(usize::MAX).min(buf.len()).min(room);
                    if let Some(out) = out.as_deref_mut() {
                        out.extend_from_slice(&buf[..n]);
                    }
                    at += n;
                    room -= n;
                    data += n as u64;
                    let left = left - n as u64;
                    *self = match *self {
                        Framing::Length(_) => Framing::Length(left),
                        _ => Framing::Chunked(Chunk::Data(left)),
                    };
                }
                Framing::UntilClose => {
                    let n = buf.len().min(room);
                    if let Some(out) = out.as_deref_mut() {
                        out.extend_from_slice(&buf[..n]);
                    }
                    return result(at + n, data + n as u64, false);
                }
                Framing::Chunked(Chunk::Size) => {
                    let Some(end) = buf.iter().position(|b| *b == b'\n') else {
                        if buf.len() > MAX_CHUNK_LINE {
                            return Err(FrameError::Malformed);
                        }
                        return result(at, data, false);
                    };
                    // Stricter than httparse: at least one hex digit, CRLF-terminated, no CR or LF
                    // inside, so no other parser can read the line differently.
                    let line = &buf[..end];
                    if end > MAX_CHUNK_LINE
                        || !line.first().is_some_and(u8::is_ascii_hexdigit)
                        || line.last() != Some(&b'\r')
                        || line[..end - 1].contains(&b'\r')
                    {
                        return Err(FrameError::Malformed);
                    }
                    let Ok(httparse::Status::Complete((n, size))) = httparse::parse_chunk_size(&buf[..=end])
                    else {
                        return Err(FrameError::Malformed);
                    };
                    if size > allowed.saturating_sub(data) {
                        return Err(FrameError::TooLarge);
                    }
                    at += n;
                    *self = Framing::Chunked(if size == 0 { Chunk::Trailers } else { Chunk::Data(size) });
                }
                Framing::Chunked(Chunk::DataEnd) => {
                    if buf.len() < 2 {
                        if buf.first().is_some_and(|b| *b != b'\r') {
                            return Err(FrameError::Malformed);
                        }
                        return result(at, data, false);
                    }
                    if &buf[..2] != b"\r\n" {
                        return Err(FrameError::Malformed);
                    }
                    at += 2;
                    *self = Framing::Chunked(Chunk::Size);
                }
                Framing::Chunked(Chunk::Trailers) => {
                    let mut fields = vec![httparse::EMPTY_HEADER; trailers.fields];
                    return match httparse::parse_headers(buf, &mut fields) {
                        Ok(httparse::Status::Complete((n, _))) => {
                            *self = Framing::Length(0);
                            result(at + n, data, true)
                        }
                        Ok(httparse::Status::Partial) if buf.len() > trailers.bytes => {
                            Err(FrameError::TrailersTooLarge)
                        }
                        Ok(httparse::Status::Partial) => result(at, data, false),
                        Err(httparse::Error::TooManyHeaders) => Err(FrameError::TrailersTooLarge),
                        Err(_) => Err(FrameError::Malformed),
                    };
                }
            }
        }
    }
}

/// The `Content-Length` values of a message, checked: digits only, all the same. `Err` for a
/// malformed or conflicting length (`Malformed`).
pub fn content_length<'a>(values: impl Iterator<Item = &'a str>) -> Result<Option<u64>, FrameError> {
    let mut length: Option<u64> = None;
    for value in values {
        let v = value.trim_matches([' ', '\t']);
        if !is_length(v.as_bytes()) {
            return Err(FrameError::Malformed);
        }
        let n: u64 = v.parse().map_err(|_| FrameError::Malformed)?;
        if length.is_some_and(|l| l != n) {
            return Err(FrameError::Malformed);
        }
        length = Some(n);
    }
    Ok(length)
}

/// The transfer codings of a message, lower-case, in order.
pub fn transfer_codings<'a>(values: impl Iterator<Item = &'a str>) -> Vec<String> {
    values.flat_map(|v| v.split(',').map(|c| c.trim_matches([' ', '\t']).to_ascii_lowercase())).collect()
}

/// Whether `v` is a Content-Length value: 1 to 18 digits (so it fits a `u64`).
pub fn is_length(v: &[u8]) -> bool {
    (1..=18).contains(&v.len()) && v.iter().all(u8::is_ascii_digit)
}
