//! `tcp-load`: the stream load generator of `benches/tcp_echo.sh`.
//!
//! N connections (TCP with `TCP_NODELAY`, or a Unix-domain socket with `--unix`), each with
//! exactly one message in flight: send `--size` bytes, wait until exactly that many bytes came
//! back (the echo may arrive split or coalesced; it must equal what was sent), record the round
//! trip, repeat. One mio loop on one thread, no allocation per message. After the warm-up it
//! prints msgs/s, p50, p99 and the CPU % of itself, of the server (`--server-pid`) and of the rest
//! of the machine over the measured window (benches/loadgen).

use std::io::{self, ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpStream as StdTcp};
use std::os::unix::net::UnixStream as StdUnix;
use std::time::Instant;

use loadgen::{read_until, write_pending, Meter, Run, STEP_TIMEOUT};
use mio::event::Source;
use mio::net::{TcpStream, UnixStream};
use mio::{Events, Interest, Poll, Token};

const USAGE: &str = "usage: tcp-load (--addr IP:PORT | --unix PATH) [--conns 50] [--size 32] [--warmup 2] \
[--duration 5] [--server-pid PID]";

enum Target {
    Tcp(SocketAddr),
    Unix(String),
}

struct Conn<S> {
    stream: S,
    /// Bytes of the message written so far.
    written: usize,
    /// Bytes of the echo received so far, in `buf` (longer than the message, to catch extra bytes).
    received: usize,
    buf: Box<[u8]>,
    sent_at: Instant,
}

impl<S: Read + Write> Conn<S> {
    fn send(&mut self, message: &[u8], now: Instant) -> io::Result<()> {
        (self.written, self.received, self.sent_at) = (0, 0, now);
        write_pending(&mut self.stream, message, &mut self.written)
    }
}

/// Connects one stream (blocking, bounded by `STEP_TIMEOUT`), then makes it non-blocking.
fn connect_tcp(addr: SocketAddr) -> io::Result<TcpStream> {
    let s = StdTcp::connect_timeout(&addr, STEP_TIMEOUT)?;
    s.set_nodelay(true)?;
    s.set_nonblocking(true)?;
    Ok(TcpStream::from_std(s))
}

fn connect_unix(path: &str) -> io::Result<UnixStream> {
    let s = StdUnix::connect(path)?;
    s.set_nonblocking(true)?;
    Ok(UnixStream::from_std(s))
}

/// Connects `run.conns` streams and runs the echo loop over them; `label` names the target.
fn run<S: Read + Write + Source>(
    run: &Run,
    label: &str,
    mut connect: impl FnMut() -> io::Result<S>,
) -> io::Result<()> {
    let message: Vec<u8> = (0..run.size).map(|i| b'a' + (i % 26) as u8).collect();
    let mut poll = Poll::new()?;
    let mut conns = Vec::with_capacity(run.conns);
    for i in 0..run.conns {
        let mut stream = connect().map_err(|e| io::Error::new(e.kind(), format!("connection {i}: {e}")))?;
        poll.registry().register(&mut stream, Token(i), Interest::READABLE | Interest::WRITABLE)?;
        let buf = vec![0; run.size + 512].into_boxed_slice();
        conns.push(Conn { stream, written: 0, received: 0, buf, sent_at: Instant::now() });
    }
    let mut events = Events::with_capacity(1024);
    let mut meter = Meter::start(run);
    let start = Instant::now();
    for c in &mut conns {
        c.send(&message, start)?;
    }
    while let Some(wait) = meter.next_wait() {
        poll.poll(&mut events, Some(wait))?;
        for event in &events {
            let c = &mut conns[event.token().0];
            write_pending(&mut c.stream, &message, &mut c.written)?;
            if !event.is_readable() {
                continue;
            }
            read_until(&mut c.stream, &mut c.buf, &mut c.received, message.len())?;
            if c.received < message.len() {
                continue;
            }
            if c.buf[..c.received] != message[..] {
                let kind = if c.received > message.len() { "longer than" } else { "different from" };
                return Err(io::Error::new(
                    ErrorKind::InvalidData,
                    format!("an echo {kind} the message sent"),
                ));
            }
            let now = meter.record(c.sent_at);
            // Nothing more can arrive before the server has the next message, and its echo
            // raises a new edge: the read that would only return WouldBlock is skipped.
            c.send(&message, now)?;
        }
    }
    meter.report("tcp-load", &format!("{label}, {} conns x {} B", run.conns, run.size), &[]);
    Ok(())
}

fn main() {
    let mut target = None;
    let options = loadgen::parse_args(USAGE, 1..=1 << 24, |flag, value| {
        match flag {
            "--addr" => {
                let v = value()?;
                target = Some(Target::Tcp(v.parse().map_err(|_| format!("--addr: bad address '{v}'"))?))
            }
            "--unix" => target = Some(Target::Unix(value()?)),
            _ => return Ok(false),
        }
        Ok(true)
    })
    .and_then(|o| Ok((o, target.ok_or(USAGE)?)))
    .unwrap_or_else(|e| loadgen::fail("tcp-load", e, true));
    let (options, target) = options;
    let result = match target {
        Target::Tcp(addr) => run(&options, &format!("tcp {addr}"), || connect_tcp(addr)),
        Target::Unix(path) => run(&options, &format!("unix {path}"), || connect_unix(&path)),
    };
    if let Err(e) = result {
        loadgen::fail("tcp-load", e, false);
    }
}
