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
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use mio::net::TcpStream;
use mio::{Events, Interest, Poll, Token};
use rustls::pki_types::ServerName;
use rustls::{ClientConfig, ClientConnection};

const USAGE: &str =
    "usage: ws-load [--host IP] --port N [--conns 50] [--size 32] [--warmup 2] [--duration 5] \
[--server-pid PID] [--tls --ca CA_PEM]";
const MASK: [u8; 4] = [0x37, 0xfa, 0x21, 0x3d];
/// Longest blocking step anywhere (connect, handshake read, one poll).
const STEP_TIMEOUT: Duration = Duration::from_secs(5);

struct Options {
    addr: SocketAddr,
    conns: usize,
    size: usize,
    warmup: Duration,
    duration: Duration,
    server_pid: Option<u32>,
    /// `--tls`: the client configuration (trusting `--ca`).
    tls: Option<Arc<ClientConfig>>,
}

fn parse_args() -> Result<Options, String> {
    let (mut host, mut port) = ("127.0.0.1".to_owned(), None);
    let (mut conns, mut size, mut warmup, mut duration, mut server_pid) = (50, 32, 2.0, 5.0, None);
    let (mut tls, mut ca) = (false, None);
    let mut args = std::env::args().skip(1);
    while let Some(flag) = args.next() {
        if flag == "--tls" {
            tls = true;
            continue;
        }
        let value = args.next().ok_or_else(|| format!("{flag} needs a value\n{USAGE}"))?;
        let bad = || format!("{flag}: bad value '{value}'");
        match flag.as_str() {
            "--host" => host = value.clone(),
            "--port" => port = Some(value.parse::<u16>().map_err(|_| bad())?),
            "--conns" => conns = value.parse().map_err(|_| bad())?,
            "--size" => size = value.parse().map_err(|_| bad())?,
            "--warmup" => warmup = value.parse().map_err(|_| bad())?,
            "--duration" => duration = value.parse().map_err(|_| bad())?,
            "--server-pid" => server_pid = Some(value.parse().map_err(|_| bad())?),
            "--ca" => ca = Some(value),
            _ => return Err(format!("unknown option '{flag}'\n{USAGE}")),
        }
    }
    let port = port.ok_or(USAGE)?;
    let addr = format!("{host}:{port}").parse().map_err(|e| format!("--host: {e}"))?;
    if conns == 0 || size > 65_535 || !(0.0..=3600.0).contains(&warmup) || !(0.1..=3600.0).contains(&duration)
    {
        return Err(
            "need --conns > 0, --size <= 65535, --warmup in [0, 3600], --duration in [0.1, 3600]".into()
        );
    }
    let (warmup, duration) = (Duration::from_secs_f64(warmup), Duration::from_secs_f64(duration));
    let tls = match (tls, ca) {
        (false, None) => None,
        (true, Some(ca)) => Some(client_config(&ca).map_err(|e| format!("--ca {ca}: {e}"))?),
        _ => return Err(format!("--tls and --ca go together\n{USAGE}")),
    };
    Ok(Options { addr, conns, size, warmup, duration, server_pid, tls })
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
    fn finish_echo(&self, expected: &[u8], hist: &mut Histogram<u64>) -> io::Result<Instant> {
        if self.buf[..self.received] != expected[..] {
            return Err(io::Error::other("the echo differs from the message sent"));
        }
        let now = Instant::now();
        hist.saturating_record(now.duration_since(self.sent_at).as_nanos() as u64);
        Ok(now)
    }

    fn write_pending(&mut self, request: &[u8]) -> io::Result<()> {
        while self.written < request.len() {
            match self.stream.write(&request[self.written..]) {
                Ok(0) => return Err(ErrorKind::WriteZero.into()),
                Ok(n) => self.written += n,
                Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
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

fn clock_ticks_per_second() -> f64 {
    // SAFETY: sysconf has no preconditions.
    unsafe { libc::sysconf(libc::_SC_CLK_TCK) as f64 }
}

/// Utime + stime of a process in seconds, from `/proc/PID/stat`.
fn cpu_seconds(pid: &str) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let mut fields = stat.rsplit_once(')')?.1.split_whitespace().skip(11); // field 14: utime
    let ticks = fields.next()?.parse::<u64>().ok()? + fields.next()?.parse::<u64>().ok()?;
    Some(ticks as f64 / clock_ticks_per_second())
}

/// CPU time of the whole machine (all CPUs, stolen time included, idle and iowait not) in
/// seconds, from `/proc/stat`.
fn machine_busy_seconds() -> Option<f64> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    let line = stat.lines().next()?.strip_prefix("cpu ")?;
    let ticks: Vec<u64> = line.split_whitespace().take(8).map(|f| f.parse().ok()).collect::<Option<_>>()?;
    let [user, nice, system, _idle, _iowait, irq, softirq, steal] = ticks[..] else { return None };
    Some((user + nice + system + irq + softirq + steal) as f64 / clock_ticks_per_second())
}

/// CPU counters at one end of the measured window.
struct Window {
    at: Instant,
    client: Option<f64>,
    server: Option<f64>,
    machine: Option<f64>,
}

impl Window {
    fn now(server: &Option<String>) -> Self {
        let server = server.as_deref().and_then(cpu_seconds);
        Window { at: Instant::now(), client: cpu_seconds("self"), server, machine: machine_busy_seconds() }
    }
}

/// CPU % (of one core) between two readings.
fn percent(start: Option<f64>, end: Option<f64>, secs: f64) -> Option<f64> {
    Some((100.0 * (end? - start?) / secs).round())
}

fn show(percent: Option<f64>) -> String {
    percent.map_or_else(|| "na".into(), |p| format!("{p:.0}"))
}

fn run(o: Options) -> io::Result<()> {
    let payload: Vec<u8> = (0..o.size).map(|i| b'a' + (i % 26) as u8).collect();
    let (request, expected) = (frame(&payload, true), frame(&payload, false));
    let server_pid = o.server_pid.map(|p| p.to_string());

    let mut poll = Poll::new()?;
    let mut conns = Vec::with_capacity(o.conns);
    for i in 0..o.conns {
        let (mut stream, tls) = connect(o.addr, o.tls.as_ref())
            .map_err(|e| io::Error::new(e.kind(), format!("connection {i}: {e}")))?;
        poll.registry().register(&mut stream, Token(i), Interest::READABLE | Interest::WRITABLE)?;
        let buf = vec![0; expected.len() + 512].into_boxed_slice();
        conns.push(Conn { stream, written: 0, received: 0, buf, sent_at: Instant::now(), tls });
    }
    let mut hist =
        Histogram::<u64>::new_with_bounds(1_000, 60_000_000_000, 3).expect("valid histogram bounds");
    let mut events = Events::with_capacity(1024);
    let start = Instant::now();
    for c in &mut conns {
        if c.tls.is_some() {
            c.send_tls(&request, start)?;
        } else {
            c.send(&request, start)?;
        }
    }
    let (warm_end, end) = (start + o.warmup, start + o.warmup + o.duration);
    let (mut window, mut count) = (None, 0u64);
    loop {
        let now = Instant::now();
        if window.is_none() && now >= warm_end {
            hist.reset();
            count = 0;
            window = Some(Window::now(&server_pid));
        }
        if now >= end {
            break;
        }
        let until = if window.is_none() { warm_end } else { end };
        poll.poll(&mut events, Some((until - now).min(STEP_TIMEOUT)))?;
        for event in &events {
            let c = &mut conns[event.token().0];
            if c.tls.is_some() {
                c.flush_tls()?;
                if !event.is_readable() {
                    continue;
                }
                c.receive_tls(expected.len())?;
                if c.received >= expected.len() {
                    let now = c.finish_echo(&expected, &mut hist)?;
                    count += 1;
                    c.send_tls(&request, now)?;
                }
                continue;
            }
            c.write_pending(&request)?;
            if !event.is_readable() {
                continue;
            }
            loop {
                match c.stream.read(&mut c.buf[c.received..]) {
                    Ok(0) => {
                        return Err(io::Error::new(
                            ErrorKind::UnexpectedEof,
                            "the server closed a connection",
                        ))
                    }
                    Ok(n) => c.received += n,
                    Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                    Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                    Err(e) => return Err(e),
                }
                if c.received >= expected.len() {
                    let now = c.finish_echo(&expected, &mut hist)?;
                    count += 1;
                    c.send(&request, now)?;
                    // Nothing more can arrive before the server has this message, and its echo
                    // raises a new edge: skip the read that would only return WouldBlock.
                    break;
                }
            }
        }
    }
    let first = window.expect("the measured window has started");
    let last = Window::now(&server_pid);
    let secs = last.at.duration_since(first.at).as_secs_f64();
    let rate = count as f64 / secs;
    let (p50, p99) = (hist.value_at_quantile(0.50) as f64 / 1e3, hist.value_at_quantile(0.99) as f64 / 1e3);
    let (client, server) =
        (percent(first.client, last.client, secs), percent(first.server, last.server, secs));
    // Everything else the machine ran meanwhile (other processes, the hypervisor's steal time).
    let others = percent(first.machine, last.machine, secs)
        .map(|m| (m - client.unwrap_or(0.0) - server.unwrap_or(0.0)).max(0.0));
    let (client, server, others) = (show(client), show(server), show(others));
    println!(
        "ws-load: {} conns x {} B, {secs:.2} s measured: {rate:.0} msgs/s, p50 {p50:.1} us, p99 {p99:.1} us, \
         client CPU {client} %, server CPU {server} %, others {others} %",
        o.conns, o.size
    );
    println!(
        "RESULT msgs_per_s={rate:.0} p50_us={p50:.1} p99_us={p99:.1} client_cpu={client} server_cpu={server} \
         others_cpu={others}"
    );
    Ok(())
}

fn main() {
    let options = parse_args().unwrap_or_else(|e| {
        eprintln!("{e}");
        std::process::exit(2);
    });
    if let Err(e) = run(options) {
        eprintln!("ws-load: {e}");
        std::process::exit(1);
    }
}
