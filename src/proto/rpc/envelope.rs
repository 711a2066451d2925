//! RPC envelopes: the bytes of one session message.
//!
//! ```text
//! Request          0x01 ‖ id varint ‖ path_len varint ‖ path (UTF-8) ‖ args (rest)
//! Request noawait  0x02 ‖ id varint ‖ path_len varint ‖ path (UTF-8) ‖ args (rest)
//! Response ok      0x03 ‖ id varint ‖ result (rest)
//! Response error   0x04 ‖ id varint ‖ message (UTF-8, rest)
//! Push             0x05 ‖ payload (rest)
//! ```
//! `args`/`result`/`payload` are opaque (MessagePack produced by the Lua layer). Decoding borrows
//! from the input and never panics.

use super::wire::{put_varint, varint_len, Reader};
use super::Error;

const T_REQUEST: u8 = 1;
const T_REQUEST_NOAWAIT: u8 = 2;
const T_RESPONSE_OK: u8 = 3;
const T_RESPONSE_ERR: u8 = 4;
const T_PUSH: u8 = 5;

/// Longest request path.
pub const MAX_PATH: usize = 1024;

/// One decoded RPC message.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Envelope<'a> {
    /// Client → server call of `path`.
    Request {
        /// Caller-chosen id echoed by the response.
        id: u32,
        /// `router/handler[/…]`.
        path: &'a str,
        /// Encoded arguments.
        args: &'a [u8],
        /// The caller does not wait for the result (a response is still sent; callers may ignore it).
        noawait: bool,
    },
    /// Server → client answer to request `id`.
    Response {
        /// The request's id.
        id: u32,
        /// Encoded result, or an error message.
        result: Result<&'a [u8], &'a str>,
    },
    /// Server → client message not tied to a request (`client:send`).
    Push(&'a [u8]),
}

impl<'a> Envelope<'a> {
    /// Appends the encoding to `out`.
    pub fn encode(&self, out: &mut Vec<u8>) {
        out.reserve(self.encoded_len());
        match *self {
            Envelope::Request { id, path, args, noawait } => {
                out.push(if noawait { T_REQUEST_NOAWAIT } else { T_REQUEST });
                put_varint(out, u64::from(id));
                put_varint(out, path.len() as u64);
                out.extend_from_slice(path.as_bytes());
                out.extend_from_slice(args);
            }
            Envelope::Response { id, result } => {
                Envelope::response_head(id, result.is_ok(), out);
                out.extend_from_slice(result.unwrap_or_else(str::as_bytes));
            }
            Envelope::Push(p) => {
                out.push(T_PUSH);
                out.extend_from_slice(p);
            }
        }
    }

    /// The start of a response to request `id` (`ok`: a result follows, else an error text), for
    /// a caller that writes the body straight after it.
    pub fn response_head(id: u32, ok: bool, out: &mut Vec<u8>) {
        out.push(if ok { T_RESPONSE_OK } else { T_RESPONSE_ERR });
        put_varint(out, u64::from(id));
    }

    /// Exact size of the encoding.
    pub fn encoded_len(&self) -> usize {
        match *self {
            Envelope::Request { id, path, args, .. } => {
                1 + varint_len(u64::from(id)) + varint_len(path.len() as u64) + path.len() + args.len()
            }
            Envelope::Response { id, result } => {
                1 + varint_len(u64::from(id)) + result.map_or_else(|e| e.len(), |b| b.len())
            }
            Envelope::Push(p) => 1 + p.len(),
        }
    }

    /// Decodes one message; `Error::Malformed` on anything invalid (unknown tag, bad varint,
    /// id above `u32::MAX`, path too long or not UTF-8, error text not UTF-8).
    pub fn decode(data: &'a [u8]) -> Result<Self, Error> {
        let mut r = Reader::new(data);
        let tag = r.u8().ok_or(Error::Malformed)?;
        let id = |r: &mut Reader<'a>| -> Result<u32, Error> {
            r.varint().and_then(|v| u32::try_from(v).ok()).ok_or(Error::Malformed)
        };
        match tag {
            T_REQUEST | T_REQUEST_NOAWAIT => {
                let id = id(&mut r)?;
                let len = r.len(MAX_PATH).ok_or(Error::Malformed)?;
                let path = std::str::from_utf8(r.bytes(len).ok_or(Error::Malformed)?)
                    .map_err(|_| Error::Malformed)?;
                Ok(Envelope::Request { id, path, args: r.rest(), noawait: tag == T_REQUEST_NOAWAIT })
            }
            T_RESPONSE_OK => Ok(Envelope::Response { id: id(&mut r)?, result: Ok(r.rest()) }),
            T_RESPONSE_ERR => {
                let id = id(&mut r)?;
                let msg = std::str::from_utf8(r.rest()).map_err(|_| Error::Malformed)?;
                Ok(Envelope::Response { id, result: Err(msg) })
            }
            T_PUSH => Ok(Envelope::Push(r.rest())),
            _ => Err(Error::Malformed),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rt(e: Envelope<'_>) {
        let mut b = Vec::new();
        e.encode(&mut b);
        assert_eq!(b.len(), e.encoded_len());
        assert_eq!(Envelope::decode(&b).unwrap(), e);
    }

    #[test]
    fn round_trips() {
        rt(Envelope::Request { id: 0, path: "api/echo", args: b"\x81\xa1a\x01", noawait: false });
        rt(Envelope::Request { id: u32::MAX, path: "", args: b"", noawait: true });
        rt(Envelope::Response { id: 7, result: Ok(b"\xc0") });
        rt(Envelope::Response { id: 300, result: Ok(b"") });
        rt(Envelope::Response { id: 8, result: Err("Argument 'x' expected to be number, got string (é)") });
        rt(Envelope::Push(b"hello"));
        rt(Envelope::Push(b""));
    }

    #[test]
    fn rejects() {
        assert_eq!(Envelope::decode(b""), Err(Error::Malformed), "empty");
        assert_eq!(Envelope::decode(&[9]), Err(Error::Malformed), "unknown tag");
        assert_eq!(Envelope::decode(&[1]), Err(Error::Malformed), "no id");
        assert_eq!(Envelope::decode(&[1, 0x80]), Err(Error::Malformed), "truncated varint");
        assert_eq!(Envelope::decode(&[3, 0x80, 0x80, 0x80, 0x80, 0x10]), Err(Error::Malformed), "id > u32");
        assert_eq!(Envelope::decode(&[1, 1, 5, b'a']), Err(Error::Malformed), "truncated path");
        assert_eq!(Envelope::decode(&[1, 1, 2, 0xff, 0xfe]), Err(Error::Malformed), "path not UTF-8");
        let mut long = vec![1, 1];
        put_varint(&mut long, MAX_PATH as u64 + 1);
        long.resize(long.len() + MAX_PATH + 1, b'a');
        assert_eq!(Envelope::decode(&long), Err(Error::Malformed), "path too long");
        assert_eq!(Envelope::decode(&[4, 1, 0xc3]), Err(Error::Malformed), "error text not UTF-8");
    }
}
