//! `udp-load`: the datagram load generator of `benches/udp_echo.sh`.
//!
//! N sockets (`--conns`), each bound to 127.0.0.1 and connected to the server, each with exactly
//! one datagram in flight: send `--size` bytes (the first 8 carry the socket's sequence number),
//! wait for the echo, record the round trip, repeat. A datagram whose echo has not come back
//! within `--timeout-ms` (default 200) is counted as lost and a new one (the next sequence
//! number) is sent, so a lost datagram never stalls a socket; an echo that arrives after that
//! is counted as stale and ignored. One mio loop on one thread, no allocation per message.
//! Prints what tcp-load prints plus `lost=` and `stale=` (both over the measured window).

use std::io::{self, ErrorKind};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use loadgen::{Meter, Run};
use mio::net::UdpSocket;
use mio::{Events, Interest, Poll, Token};

const USAGE: &str = "usage: udp-load --addr IP:PORT [--conns 50] [--size 32] [--warmup 2] [--duration 5] \
[--server-pid PID] [--timeout-ms 200]";
const SEQ: usize = 8;

struct Sock {
    socket: UdpSocket,
    /// Sequence number of the datagram in flight.
    seq: u64,
    sent_at: Instant,
    /// When the datagram in flight counts as lost.
    deadline: Instant,
}

impl Sock {
    /// Sends the next datagram (`message` with this socket's next sequence number).
    fn send_next(&mut self, message: &mut [u8], now: Instant, timeout: Duration) -> io::Result<()> {
        self.seq += 1;
        (self.sent_at, self.deadline) = (now, now + timeout);
        message[..SEQ].copy_from_slice(&self.seq.to_le_bytes());
        match self.socket.send(message) {
            Ok(_) => Ok(()),
            // A full socket buffer loses the datagram like the network would: the deadline resends.
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::Interrupted) => Ok(()),
            Err(e) => Err(e),
        }
    }
}

fn main() {
    let (mut addr, mut timeout_ms) = (None, 200u64);
    let options = loadgen::parse_args(USAGE, SEQ..=65_507, |flag, value| {
        match flag {
            "--addr" => {
                let v = value()?;
                addr = Some(v.parse::<SocketAddr>().map_err(|_| format!("--addr: bad address '{v}'"))?)
            }
            "--timeout-ms" => timeout_ms = loadgen::number(flag, value()?)?,
            _ => return Ok(false),
        }
        Ok(true)
    })
    .and_then(|o| Ok((o, addr.ok_or(USAGE)?)))
    .unwrap_or_else(|e| loadgen::fail("udp-load", e, true));
    let (options, addr) = options;
    if let Err(e) = run(&options, addr, Duration::from_millis(timeout_ms.max(1))) {
        loadgen::fail("udp-load", e, false);
    }
}

fn run(run: &Run, addr: SocketAddr, timeout: Duration) -> io::Result<()> {
    let mut message: Vec<u8> = (0..run.size).map(|i| b'a' + (i % 26) as u8).collect();
    let mut poll = Poll::new()?;
    let mut socks = Vec::with_capacity(run.conns);
    let now = Instant::now();
    for i in 0..run.conns {
        let mut socket = UdpSocket::bind("127.0.0.1:0".parse().expect("valid address"))?;
        socket.connect(addr)?;
        poll.registry().register(&mut socket, Token(i), Interest::READABLE)?;
        socks.push(Sock { socket, seq: 0, sent_at: now, deadline: now });
    }
    let mut buf = vec![0u8; 65_536];
    let mut events = Events::with_capacity(1024);
    let (mut lost, mut stale) = (0u64, 0u64);
    let scan_every = (timeout / 4).max(Duration::from_millis(1));
    let mut meter = Meter::start(run);
    let start = Instant::now();
    let mut next_scan = start + scan_every;
    for s in &mut socks {
        s.send_next(&mut message, start, timeout)?;
    }
    while let Some(wait) = meter.next_wait() {
        let now = Instant::now();
        if now >= next_scan {
            for s in socks.iter_mut().filter(|s| s.deadline <= now) {
                lost += u64::from(meter.measuring());
                s.send_next(&mut message, now, timeout)?;
            }
            next_scan = now + scan_every;
        }
        poll.poll(&mut events, Some(wait.min(next_scan.saturating_duration_since(now))))?;
        for event in &events {
            let s = &mut socks[event.token().0];
            loop {
                let n = match s.socket.recv(&mut buf) {
                    Ok(n) => n,
                    Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                    Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                    Err(e) => return Err(io::Error::new(e.kind(), format!("receiving from {addr}: {e}"))),
                };
                let seq = u64::from_le_bytes(buf[..SEQ.min(n)].try_into().unwrap_or([0; SEQ]));
                if n == message.len() && seq < s.seq && buf[SEQ..n] == message[SEQ..] {
                    stale += u64::from(meter.measuring());
                    continue;
                }
                if n != message.len() || seq != s.seq || buf[SEQ..n] != message[SEQ..] {
                    return Err(io::Error::new(
                        ErrorKind::InvalidData,
                        "an echo different from the datagram sent",
                    ));
                }
                let now = meter.record(s.sent_at);
                s.send_next(&mut message, now, timeout)?;
                // The next echo raises a new edge (epoll signals every datagram that arrives,
                // and any stale one still queued is read before it then): the receive that
                // would only return WouldBlock is skipped.
                break;
            }
        }
    }
    let what =
        format!("udp {addr}, {} sockets x {} B, timeout {} ms", run.conns, run.size, timeout.as_millis());
    meter.report("udp-load", &what, &[("lost", lost), ("stale", stale)]);
    Ok(())
}
