//! An in-memory duplex byte pipe: the "socket" tungstenite runs over, sans-IO.
//!
//! The driver pushes bytes received from the network with [`Pipe::push_incoming`]; the
//! protocol reads them through [`Read`] (which returns `WouldBlock` when nothing is buffered,
//! or `Ok(0)` once [`Pipe::set_eof`] was called). Whatever the protocol writes through
//! [`Write`] is queued for the driver, which sends it and calls
//! [`Pipe::consume_outgoing`] (or [`Pipe::take_outgoing`]).
//!
//! Memory: buffers whose capacity grew past [`SHRINK_THRESHOLD`] are released when they are
//! drained, so a connection that keeps moving messages of a few KiB reuses its buffers instead
//! of allocating them per message; [`Pipe::trim`] (for a connection gone idle) releases drained
//! buffers over [`TRIM_KEEP`]. A drained outgoing buffer larger than that is kept as the
//! thread's one spare (up to [`SPARE_MAX`]) for the next large message of any connection: a
//! fresh multi-MiB allocation per message costs a page fault per 4 KiB written into it, which
//! was the largest cost of echoing 4 MiB messages.
//!
//! Frame tracking: the pipe follows WebSocket frame boundaries in the bytes it hands out (a
//! tiny header parser that also notes whether a fragmented data message is in progress).
//! [`Pipe::at_quiet_boundary`] tells the WebSocket layer that everything read so far formed
//! complete frames and complete messages, so the reader holds no partial state and its
//! (possibly grown) buffers can be replaced by fresh small ones.

use std::cell::Cell;
use std::collections::VecDeque;
use std::io::{self, Read, Write};

/// A drained buffer keeps its allocation only when it is at most this large.
pub const SHRINK_THRESHOLD: usize = 8 * 1024;
/// What [`Pipe::trim`] lets a drained buffer keep.
pub const TRIM_KEEP: usize = 1024;
/// The largest drained outgoing buffer a thread keeps for reuse.
pub const SPARE_MAX: usize = 16 << 20;

thread_local! {
    /// The thread's spare outgoing buffer (empty, or capacity above [`SHRINK_THRESHOLD`]).
    static SPARE: Cell<Vec<u8>> = const { Cell::new(Vec::new()) };
}

/// In-memory duplex pipe. See the module documentation.
#[derive(Debug, Default)]
pub struct Pipe {
    incoming: VecDeque<u8>,
    outgoing: Vec<u8>,
    /// Bytes at the front of `outgoing` already handed to the transport.
    out_pos: usize,
    eof: bool,
    tracker: FrameTracker,
}

/// Incremental parser of the frame headers in the byte stream handed to the reader.
#[derive(Debug, Clone, Copy, Default)]
struct FrameTracker {
    header: [u8; 14],
    /// Header bytes seen so far (0 = at a frame boundary when `payload_left` is 0).
    have: usize,
    /// Header bytes needed (2 until the length form is known).
    need: usize,
    /// Payload bytes of the current frame not handed out yet.
    payload_left: u64,
    /// A data message was started by a non-final frame and not finished yet.
    fragmented: bool,
    /// The largest frame payload seen since [`Pipe::reset_largest_frame`].
    largest: u64,
}

impl FrameTracker {
    fn at_boundary(&self) -> bool {
        self.have == 0 && self.payload_left == 0
    }

    /// Account for bytes handed out.
    fn advance(&mut self, mut data: &[u8]) {
        while !data.is_empty() {
            if self.payload_left > 0 {
                let n = usize::try_from(self.payload_left).unwrap_or(usize::MAX).min(data.len());
                self.payload_left -= n as u64;
                data = &data[n..];
                continue;
            }
            if self.have == 0 {
                self.need = 2;
            }
            let n = (self.need - self.have).min(data.len());
            self.header[self.have..self.have + n].copy_from_slice(&data[..n]);
            self.have += n;
            data = &data[n..];
            if self.have == 2 {
                let ext = match self.header[1] & 0x7f {
                    126 => 2,
                    127 => 8,
                    _ => 0,
                };
                let mask = if self.header[1] & 0x80 != 0 { 4 } else { 0 };
                self.need = 2 + ext + mask;
            }
            if self.have == self.need {
                let len = match self.header[1] & 0x7f {
                    126 => u64::from(u16::from_be_bytes([self.header[2], self.header[3]])),
                    127 => {
                        let mut b = [0u8; 8];
                        b.copy_from_slice(&self.header[2..10]);
                        u64::from_be_bytes(b)
                    }
                    n => u64::from(n),
                };
                let fin = self.header[0] & 0x80 != 0;
                match self.header[0] & 0x0f {
                    1 | 2 => self.fragmented = !fin,
                    0 if fin => self.fragmented = false,
                    _ => {}
                }
                self.payload_left = len;
                self.largest = self.largest.max(len);
                self.have = 0;
            }
        }
    }
}

impl Pipe {
    /// An empty pipe (allocates nothing).
    pub fn new() -> Self {
        Self::default()
    }

    /// Append bytes received from the transport.
    pub fn push_incoming(&mut self, data: &[u8]) {
        self.incoming.extend(data);
    }

    /// Bytes received but not read by the protocol yet.
    pub fn incoming_len(&self) -> usize {
        self.incoming.len()
    }

    /// The largest frame payload handed to the reader since the last
    /// [`reset_largest_frame`](Self::reset_largest_frame) (frames are counted once their header
    /// is complete).
    pub fn largest_frame(&self) -> u64 {
        self.tracker.largest
    }

    pub fn reset_largest_frame(&mut self) {
        self.tracker.largest = 0;
    }

    /// The transport reached end of stream: once the buffered bytes are read, `read` returns
    /// `Ok(0)` instead of `WouldBlock`.
    pub fn set_eof(&mut self) {
        self.eof = true;
    }

    /// Whether [`set_eof`](Self::set_eof) was called.
    pub fn is_eof(&self) -> bool {
        self.eof
    }

    /// Queue bytes for the transport directly (e.g. a pre-encoded frame).
    pub fn push_outgoing(&mut self, data: &[u8]) {
        self.push_outgoing_all(&[data]);
    }

    /// Queue the concatenation of `parts` (one allocation for all of them).
    pub fn push_outgoing_all(&mut self, parts: &[&[u8]]) {
        self.compact();
        let len: usize = parts.iter().map(|p| p.len()).sum();
        if self.outgoing.is_empty() && len > self.outgoing.capacity().max(SHRINK_THRESHOLD) {
            let spare = SPARE.take();
            if spare.capacity() >= len {
                self.outgoing = spare;
            } else {
                SPARE.set(spare);
            }
        }
        self.outgoing.reserve(len);
        for part in parts {
            self.outgoing.extend_from_slice(part);
        }
    }

    /// Bytes waiting to be written to the transport.
    pub fn outgoing(&self) -> &[u8] {
        &self.outgoing[self.out_pos..]
    }

    /// Number of bytes waiting to be written to the transport.
    pub fn outgoing_len(&self) -> usize {
        self.outgoing.len() - self.out_pos
    }

    /// Mark the first `n` bytes of [`outgoing`](Self::outgoing) as written (clamped).
    pub fn consume_outgoing(&mut self, n: usize) {
        self.out_pos = (self.out_pos + n).min(self.outgoing.len());
        if self.out_pos == self.outgoing.len() {
            self.out_pos = 0;
            self.outgoing.clear();
            let capacity = self.outgoing.capacity();
            if capacity > SHRINK_THRESHOLD {
                let drained = std::mem::take(&mut self.outgoing);
                let spare = SPARE.take();
                SPARE.set(if capacity <= SPARE_MAX && capacity > spare.capacity() { drained } else { spare });
            }
        }
    }

    /// Move every queued outgoing byte to the end of `out`.
    pub fn take_outgoing(&mut self, out: &mut Vec<u8>) {
        if out.is_empty() && self.out_pos == 0 && out.capacity() <= SHRINK_THRESHOLD {
            // Hand over the allocation instead of copying (we get `out`'s small one back).
            std::mem::swap(out, &mut self.outgoing);
            return;
        }
        out.extend_from_slice(self.outgoing());
        let n = self.outgoing_len();
        self.consume_outgoing(n);
    }

    /// Whether no incoming bytes are buffered and everything handed to the reader so far
    /// forms complete frames and no fragmented message is in progress. (Meaningful only
    /// while the stream is valid, i.e. the reader reported no protocol error.)
    pub fn at_quiet_boundary(&self) -> bool {
        self.incoming.is_empty() && self.tracker.at_boundary() && !self.tracker.fragmented
    }

    /// Heap bytes currently owned by the pipe's buffers (capacity, not length).
    pub fn heap_capacity(&self) -> usize {
        self.incoming.capacity() + self.outgoing.capacity()
    }

    /// Releases drained buffers larger than [`TRIM_KEEP`].
    pub fn trim(&mut self) {
        if self.incoming.is_empty() && self.incoming.capacity() > TRIM_KEEP {
            self.incoming = VecDeque::new();
        }
        if self.outgoing_len() == 0 && self.outgoing.capacity() > TRIM_KEEP {
            self.out_pos = 0;
            self.outgoing = Vec::new();
        }
    }

    /// Drop the already-written prefix of `outgoing` when it is large.
    fn compact(&mut self) {
        if self.out_pos > 0 && self.out_pos >= self.outgoing.len() / 2 {
            self.outgoing.drain(..self.out_pos);
            self.out_pos = 0;
        }
    }
}

impl Read for Pipe {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.incoming.is_empty() {
            return if self.eof || buf.is_empty() { Ok(0) } else { Err(io::ErrorKind::WouldBlock.into()) };
        }
        let n = self.incoming.read(buf)?;
        self.tracker.advance(&buf[..n]);
        if self.incoming.is_empty() && self.incoming.capacity() > SHRINK_THRESHOLD {
            self.incoming = VecDeque::new();
        }
        Ok(n)
    }
}

impl Write for Pipe {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.push_outgoing(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn read_would_block_then_eof() {
        let mut p = Pipe::new();
        let mut b = [0u8; 4];
        assert_eq!(p.read(&mut b).unwrap_err().kind(), io::ErrorKind::WouldBlock);
        p.push_incoming(b"abcdef");
        assert_eq!(p.read(&mut b).unwrap(), 4);
        assert_eq!(&b, b"abcd");
        p.set_eof();
        assert_eq!(p.read(&mut b).unwrap(), 2);
        assert_eq!(p.read(&mut b).unwrap(), 0);
    }

    #[test]
    fn outgoing_partial_consume_and_shrink() {
        let mut p = Pipe::new();
        p.write_all(&[1u8; SHRINK_THRESHOLD + 5000]).unwrap();
        assert_eq!(p.outgoing_len(), SHRINK_THRESHOLD + 5000);
        p.consume_outgoing(SHRINK_THRESHOLD + 4000);
        assert_eq!(p.outgoing(), &[1u8; 1000][..]);
        p.write_all(&[2u8; 10]).unwrap();
        assert_eq!(p.outgoing_len(), 1010);
        assert_eq!(p.outgoing()[1000], 2);
        p.consume_outgoing(usize::MAX);
        assert_eq!(p.outgoing_len(), 0);
        assert_eq!(p.heap_capacity(), 0);

        p.push_incoming(&[0u8; SHRINK_THRESHOLD + 1]);
        let mut sink = vec![0u8; SHRINK_THRESHOLD * 2];
        assert_eq!(p.read(&mut sink).unwrap(), SHRINK_THRESHOLD + 1);
        assert_eq!(p.heap_capacity(), 0);

        // Buffers of a few KiB are kept for the next message, until a trim.
        p.push_incoming(&[0u8; 4110]);
        assert_eq!(p.read(&mut sink).unwrap(), 4110);
        p.write_all(&[3u8; 4110]).unwrap();
        p.consume_outgoing(4110);
        assert!(p.heap_capacity() >= 2 * 4110);
        p.trim();
        assert_eq!(p.heap_capacity(), 0);
    }

    #[test]
    fn large_outgoing_buffers_are_reused_by_the_thread() {
        let big = vec![7u8; SHRINK_THRESHOLD * 4];
        let mut a = Pipe::new();
        a.push_outgoing_all(&[&big[..10], &big[10..]]);
        assert_eq!(a.outgoing(), &big[..]);
        let first = a.outgoing().as_ptr();
        a.consume_outgoing(usize::MAX);
        // The drained buffer left the pipe (an idle connection holds nothing) ...
        assert_eq!(a.heap_capacity(), 0);
        // ... and the next large message of any connection on this thread writes into it.
        let mut b = Pipe::new();
        b.push_outgoing(&big);
        assert_eq!(b.outgoing().as_ptr(), first);
        // Small messages and buffers over SPARE_MAX are not kept.
        b.consume_outgoing(usize::MAX);
        let mut c = Pipe::new();
        c.push_outgoing(&big[..100]);
        assert_ne!(c.outgoing().as_ptr(), first);
        let huge = vec![1u8; SPARE_MAX + 1];
        c.consume_outgoing(usize::MAX);
        c.push_outgoing(&huge);
        c.consume_outgoing(usize::MAX);
        let spare = SPARE.take();
        assert_eq!(spare.as_ptr(), first);
        assert!(spare.capacity() <= SPARE_MAX);
    }

    #[test]
    fn frame_tracking() {
        let mut p = Pipe::new();
        assert!(p.at_quiet_boundary());
        // Non-final text (masked, 2 bytes), ping, final continuation with 16-bit length.
        let mut bytes = vec![0x01, 0x82, 1, 2, 3, 4, b'a', b'b'];
        bytes.extend([0x89, 0x80, 0, 0, 0, 0]);
        let mut cont = vec![0x80, 0x7e, 0x01, 0x00];
        cont.extend([0u8; 256]);
        bytes.extend(&cont);
        let mut quiet = Vec::new();
        for b in &bytes {
            p.push_incoming(&[*b]);
            let mut one = [0u8; 1];
            assert_eq!(p.read(&mut one).unwrap(), 1);
            quiet.push(p.at_quiet_boundary());
        }
        // Only after the final frame's last byte is the stream quiet.
        assert_eq!(quiet.iter().filter(|q| **q).count(), 1);
        assert!(*quiet.last().unwrap());
        // 64-bit length form.
        assert_eq!(p.largest_frame(), 256);
        p.reset_largest_frame();
        p.push_incoming(&[0x82, 0x7f, 0, 0, 0, 0, 0, 0, 0, 1, 9]);
        let mut buf = [0u8; 64];
        assert_eq!(p.read(&mut buf).unwrap(), 11);
        assert!(p.at_quiet_boundary());
        assert_eq!(p.largest_frame(), 1);
        p.push_incoming(&[0x82]);
        let _ = p.read(&mut buf);
        assert!(!p.at_quiet_boundary());
    }

    #[test]
    fn take_outgoing_moves_everything() {
        let mut p = Pipe::new();
        p.write_all(b"hello").unwrap();
        let mut out = Vec::new();
        p.take_outgoing(&mut out);
        assert_eq!(out, b"hello");
        p.write_all(b" world").unwrap();
        p.consume_outgoing(1);
        p.take_outgoing(&mut out);
        assert_eq!(out, b"helloworld");
        assert_eq!(p.outgoing_len(), 0);
    }
}
