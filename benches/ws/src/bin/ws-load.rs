//! `ws-load`: the WebSocket load generator of `benches/ws_echo.sh`.
//!
//! N connections (raw TCP, the upgrade done by hand), each with exactly one message in flight:
//! send a precomputed masked binary frame, wait for the whole echo, repeat. One mio loop on one
//! thread, no allocation per message; round-trip times go to an HdrHistogram. After a warm-up the
//! measured window starts; the generator prints msgs/s, p50, p99, its own CPU % and, with
//! `--server-pid`, the server's CPU % over exactly the same window (from `/proc/PID/stat`).
//!
//! `--tls --ca CA_PEM` speaks wss instead: each connection is a rustls 0.23 (ring) client session
//! for server name "localhost", verified against the given CA (the repo's test CA,
//! `tests/data/ca.pem`). The TLS handshake and the upgrade are done blocking while connecting
//! (like the plain upgrade, before any measurement); the echo loop then writes the same frames
//! into the session and drives it without blocking (`write_tls`, `read_tls`,
//! `process_new_packets`, `reader().read`). The plain path is unchanged.

use std::io::{self, ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpStream as StdStream};
use std::sync::Arc;
use std::time::Instant;

use loadgen::{read_until, write_pending, Meter, Run, STEP_TIMEOUT};
use mio::net::TcpStream;
use mio::{Events, Interest, Poll, Token};
use rustls::pki_types::ServerName;
use rustls::{ClientConfig, ClientConnection};

const USAGE: &str =
    "usage: ws-load [--host IP] --port N [--conns 50] [--size 32] [--warmup 2] [--duration 5] \
[--server-pid PID] [--tls --ca CA_PEM]";
const MASK: [u8; 4] = [0x37, 0xfa, 0x21, 0x3d];

struct Options {
    addr: SocketAddr,
    run: Run,
    /// `--tls`: the client configuration (trusting `--ca`).
    tls: Option<Arc<ClientConfig>>,
}

fn parse_args() -> Result<Options, String> {
    let (mut host, mut port) = ("127.0.0.1".to_owned(), None);
    let (mut tls, mut ca) = (false, None);
    let run = loadgen::parse_args(USAGE, 0..=65_535, |flag, value| {
        match flag {
            "--tls" => tls = true,
            "--host" => host = value()?,
            "--port" => port = Some(loadgen::number::<u16>(flag, value()?)?),
            "--ca" => ca = Some(value()?),
            _ => return Ok(false),
        }
        Ok(true)
    })?;
    let port = port.ok_or(USAGE)?;
    let addr = format!("{host}:{port}").parse().map_err(|e| format!("--host: {e}"))?;
    let tls = match (tls, ca) {
        (false, None) => None,
        (true, Some(ca)) => Some(client_config(&ca).map_err(|e| format!("--ca {ca}: {e}"))?),
        _ => return Err(format!("--tls and --ca go together\n{USAGE}")),
    };
    Ok(Options { addr, run, tls })
}

/// A rustls client configuration (ring provider) trusting only the CA certificates in `ca`.
fn client_config(ca: &str) -> io::Result<Arc<ClientConfig>> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls_pemfile::certs(&mut io::BufReader::new(std::fs::File::open(ca)?)) {
        roots.add(cert?).map_err(io::Error::other)?;
    }
    if roots.is_empty() {
        return Err(io::Error::other("no certificate"));
    }
    let config = ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .map_err(io::Error::other)?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(Arc::new(config))
}

/// A binary frame carrying `payload`: masked (client to server) or not (the echo expected back).
fn frame(payload: &[u8], masked: bool) -> Vec<u8> {
    let mask_bit = if masked { 0x80 } else { 0 };
    let mut f = vec![0x82];
    match payload.len() {
        n @ 0..=125 => f.push(mask_bit | n as u8),
        n => {
            f.push(mask_bit | 126);
            f.extend_from_slice(&(n as u16).to_be_bytes());
        }
    }
    if masked {
        f.extend_from_slice(&MASK);
        f.extend(payload.iter().enumerate().map(|(i, b)| b ^ MASK[i % 4]));
    } else {
        f.extend_from_slice(payload);
    }
    f
}

/// Connects and upgrades one connection (blocking, each step bounded by `STEP_TIMEOUT`), over a
/// TLS session when `tls` is given.
fn connect(
    addr: SocketAddr,
    tls: Option<&Arc<ClientConfig>>,
) -> io::Result<(TcpStream, Option<Box<ClientConnection>>)> {
    let mut s = StdStream::connect_timeout(&addr, STEP_TIMEOUT)?;
    s.set_nodelay(true)?;
    s.set_read_timeout(Some(STEP_TIMEOUT))?;
    s.set_write_timeout(Some(STEP_TIMEOUT))?;
    let session = match tls {
        None => {
            upgrade(&mut s, addr)?;
            None
        }
        Some(config) => {
            let name = ServerName::try_from("localhost").expect("valid server name");
            let mut session =
                Box::new(ClientConnection::new(config.clone(), name).map_err(io::Error::other)?);
            // The whole request frame always goes into the session at once (it can exceed 64 KiB).
            session.set_buffer_limit(None);
            upgrade(&mut rustls::Stream::new(&mut *session, &mut s), addr)?;
            Some(session)
        }
    };
    s.set_nonblocking(true)?;
    Ok((TcpStream::from_std(s), session))
}

/// Sends the upgrade request and checks the `101` response.
fn upgrade(s: &mut (impl Read + Write), addr: SocketAddr) -> io::Result<()> {
    let request = format!(
        "GET / HTTP/1.1\r\nHost: {addr}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
    );
    s.write_all(request.as_bytes())?;
    let (mut buf, mut len) = ([0u8; 2048], 0);
    while !buf[..len].windows(4).any(|w| w == b"\r\n\r\n") {
        match s.read(&mut buf[len..])? {
            0 => return Err(io::Error::new(ErrorKind::UnexpectedEof, "closed during the upgrade")),
            n if len + n == buf.len() => return Err(io::Error::other("upgrade response too long")),
            n => len += n,
        }
    }
    let response = &buf[..len];
    if !response.starts_with(b"HTTP/1.1 101") || !response.ends_with(b"\r\n\r\n") {
        let text = String::from_utf8_lossy(response);
        return Err(io::Error::other(format!("upgrade refused: {}", text.lines().next().unwrap_or(""))));
    }
    Ok(())
}

struct Conn {
    stream: TcpStream,
    /// Bytes of the request frame written so far.
    written: usize,
    /// Bytes of the echo received so far, in `buf` (longer than the echo, to catch extra bytes).
    received: usize,
    buf: Box<[u8]>,
    sent_at: Instant,
    /// The TLS session (`--tls`), boxed to keep the plain connection small.
    tls: Option<Box<ClientConnection>>,
}

impl Conn {
    /// The whole echo is in: checks it and records the round trip; returns the time to stamp
    /// the next message with.
    fn finish_echo(&self, expected: &[u8], meter: &mut Meter) -> io::Result<Instant> {
        if self.buf[..self.received] != expected[..] {
            return Err(io::Error::other("the echo differs from the message sent"));
        }
        Ok(meter.record(self.sent_at))
    }

    fn write_pending(&mut self, request: &[u8]) -> io::Result<()> {
        write_pending(&mut self.stream, request, &mut self.written)
    }

    fn send(&mut self, request: &[u8], now: Instant) -> io::Result<()> {
        (self.written, self.received, self.sent_at) = (0, 0, now);
        self.write_pending(request)
    }

    /// TLS: writes what the session has to send, until done or the socket is full.
    fn flush_tls(&mut self) -> io::Result<()> {
        let tls = self.tls.as_mut().expect("a TLS connection");
        while tls.wants_write() {
            match tls.write_tls(&mut self.stream) {
                Ok(0) => return Err(ErrorKind::WriteZero.into()),
                Ok(_) => {}
                Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    /// TLS: puts the whole frame into the session (no buffer limit) and starts writing it.
    fn send_tls(&mut self, request: &[u8], now: Instant) -> io::Result<()> {
        (self.received, self.sent_at) = (0, now);
        self.tls.as_mut().expect("a TLS connection").writer().write_all(request)?;
        self.flush_tls()
    }

    /// TLS: reads and decrypts what has arrived into `buf`; returns whether the socket is
    /// drained (`WouldBlock`) or the echo is complete (`received >= expected_len`).
    fn receive_tls(&mut self, expected_len: usize) -> io::Result<()> {
        let tls = self.tls.as_mut().expect("a TLS connection");
        loop {
            match tls.read_tls(&mut self.stream) {
                Ok(0) => {
                    return Err(io::Error::new(ErrorKind::UnexpectedEof, "the server closed a connection"))
                }
                Ok(_) => {}
                Err(e) if e.kind() == ErrorKind::WouldBlock => return Ok(()),
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            }
            tls.process_new_packets().map_err(io::Error::other)?;
            loop {
                match tls.reader().read(&mut self.buf[self.received..]) {
                    Ok(0) if self.received < self.buf.len() => {
                        return Err(io::Error::new(ErrorKind::UnexpectedEof, "the server closed the session"))
                    }
                    Ok(n) => self.received += n,
                    Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                    Err(e) => return Err(e),
                }
                if self.received >= expected_len {
                    // Nothing more can arrive before the server has the next message.
                    return Ok(());
                }
            }
        }
    }
}

fn run(o: Options) -> io::Result<()> {
    let payload: Vec<u8> = (0..o.run.size).map(|i| b'a' + (i % 26) as u8).collect();
    let (request, expected) = (frame(&payload, true), frame(&payload, false));

    let mut poll = Poll::new()?;
    let mut conns = Vec::with_capacity(o.run.conns);
    for i in 0..o.run.conns {
        let (mut stream, tls) = connect(o.addr, o.tls.as_ref())
            .map_err(|e| io::Error::new(e.kind(), format!("connection {i}: {e}")))?;
        poll.registry().register(&mut stream, Token(i), Interest::READABLE | Interest::WRITABLE)?;
        let buf = vec![0; expected.len() + 512].into_boxed_slice();
        conns.push(Conn { stream, written: 0, received: 0, buf, sent_at: Instant::now(), tls });
    }
    let mut events = Events::with_capacity(1024);
    let mut meter = Meter::start(&o.run);
    let start = Instant::now();
    for c in &mut conns {
        if c.tls.is_some() {
            c.send_tls(&request, start)?;
        } else {
            c.send(&request, start)?;
        }
    }
    while let Some(wait) = meter.next_wait() {
        poll.poll(&mut events, Some(wait))?;
        for event in &events {
            let c = &mut conns[event.token().0];
            if c.tls.is_some() {
                c.flush_tls()?;
                if !event.is_readable() {
                    continue;
                }
                c.receive_tls(expected.len())?;
                if c.received >= expected.len() {
                    let now = c.finish_echo(&expected, &mut meter)?;
                    c.send_tls(&request, now)?;
                }
                continue;
            }
            c.write_pending(&request)?;
            if !event.is_readable() {
                continue;
            }
            read_until(&mut c.stream, &mut c.buf, &mut c.received, expected.len())?;
            if c.received >= expected.len() {
                let now = c.finish_echo(&expected, &mut meter)?;
                // Nothing more can arrive before the server has this message, and its echo
                // raises a new edge: the read that would only return WouldBlock is skipped.
                c.send(&request, now)?;
            }
        }
    }
    meter.report("ws-load", &format!("{} conns x {} B", o.run.conns, o.run.size), &[]);
    Ok(())
}

fn main() {
    let options = parse_args().unwrap_or_else(|e| loadgen::fail("ws-load", e, true));
    if let Err(e) = run(options) {
        loadgen::fail("ws-load", e, false);
    }
}
