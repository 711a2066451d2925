//! What Luna's load generators share (`benches/ws` ws-load, `benches/net` tcp-load and udp-load):
//! the options every one of them takes, the non-blocking read and write steps of a stream
//! connection, and the [`Meter`]: a warm-up, then the measured window, round-trip times in an
//! HdrHistogram, and the CPU % of the generator, of the server (`--server-pid`) and of the rest
//! of the machine over exactly that window (from `/proc`, see `../shared/BENCHMARKING.md`).
//!
//! Every generator prints one human line and one machine-readable line:
//! `RESULT msgs_per_s=… p50_us=… p99_us=… client_cpu=… server_cpu=… others_cpu=…` (CPU in % of
//! one core, `na` when unknown), plus the generator's own counters (udp-load: `lost=…`).

use std::io::{self, ErrorKind, Read, Write};
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;

/// Longest blocking step anywhere (a connect, a handshake read, one poll).
pub const STEP_TIMEOUT: Duration = Duration::from_secs(5);

/// The options every generator takes.
pub struct Run {
    /// `--conns`: connections (or sockets), each with one message in flight.
    pub conns: usize,
    /// `--size`: payload bytes per message.
    pub size: usize,
    /// `--warmup` seconds before the measured window.
    pub warmup: Duration,
    /// `--duration` seconds measured.
    pub duration: Duration,
    /// `--server-pid`: the process whose CPU % is reported.
    pub server_pid: Option<u32>,
}

/// Parses the command line: the common options `--conns 50 --size 32 --warmup 2 --duration 5
/// --server-pid PID`, and the generator's own through `own(flag, value)`, where `value()` takes
/// the flag's value; `own` returns `Ok(false)` for a flag it does not know. `size` must lie in
/// `sizes`.
pub fn parse_args(
    usage: &str,
    sizes: std::ops::RangeInclusive<usize>,
    mut own: impl FnMut(&str, &mut dyn FnMut() -> Result<String, String>) -> Result<bool, String>,
) -> Result<Run, String> {
    let (mut conns, mut size, mut warmup, mut duration, mut server_pid) = (50, 32, 2.0, 5.0, None);
    let mut args = std::env::args().skip(1);
    while let Some(flag) = args.next() {
        let mut value = || args.next().ok_or_else(|| format!("{flag} needs a value\n{usage}"));
        match flag.as_str() {
            "--conns" => conns = number(&flag, value()?)?,
            "--size" => size = number(&flag, value()?)?,
            "--warmup" => warmup = number(&flag, value()?)?,
            "--duration" => duration = number(&flag, value()?)?,
            "--server-pid" => server_pid = Some(number(&flag, value()?)?),
            _ if own(&flag, &mut value)? => {}
            _ => return Err(format!("unknown option '{flag}'\n{usage}")),
        }
    }
    if conns == 0
        || !sizes.contains(&size)
        || !(0.0..=3600.0).contains(&warmup)
        || !(0.1..=3600.0).contains(&duration)
    {
        return Err(format!(
            "need --conns > 0, --size in [{}, {}], --warmup in [0, 3600], --duration in [0.1, 3600]",
            sizes.start(),
            sizes.end()
        ));
    }
    let (warmup, duration) = (Duration::from_secs_f64(warmup), Duration::from_secs_f64(duration));
    Ok(Run { conns, size, warmup, duration, server_pid })
}

/// The value of `flag`, parsed.
pub fn number<T: std::str::FromStr>(flag: &str, value: String) -> Result<T, String> {
    value.parse().map_err(|_| format!("{flag}: bad value '{value}'"))
}

/// Prints `error` as `NAME: error` and exits 1 (2 for a bad command line, `usage` true).
pub fn fail(name: &str, error: impl std::fmt::Display, usage: bool) -> ! {
    if usage {
        eprintln!("{error}");
    } else {
        eprintln!("{name}: {error}");
    }
    std::process::exit(if usage { 2 } else { 1 })
}

/// Writes `buf[*written..]` until done or the socket is full (`WouldBlock`).
pub fn write_pending(w: &mut impl Write, buf: &[u8], written: &mut usize) -> io::Result<()> {
    while *written < buf.len() {
        match w.write(&buf[*written..]) {
            Ok(0) => return Err(ErrorKind::WriteZero.into()),
            Ok(n) => *written += n,
            Err(e) if e.kind() == ErrorKind::WouldBlock => break,
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Reads into `buf[*received..]` until the socket is drained (`WouldBlock`) or `*received`
/// reaches `want`; a closed connection is an error. `buf` longer than `want` catches extra bytes.
pub fn read_until(r: &mut impl Read, buf: &mut [u8], received: &mut usize, want: usize) -> io::Result<()> {
    while *received < want {
        match r.read(&mut buf[*received..]) {
            Ok(0) => return Err(io::Error::new(ErrorKind::UnexpectedEof, "the server closed a connection")),
            Ok(n) => *received += n,
            Err(e) if e.kind() == ErrorKind::WouldBlock => break,
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
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

/// The warm-up, the measured window and what was measured in it.
pub struct Meter {
    hist: Histogram<u64>,
    count: u64,
    warm_end: Instant,
    end: Instant,
    window: Option<Window>,
    server_pid: Option<String>,
}

impl Meter {
    /// Starts the warm-up now.
    pub fn start(run: &Run) -> Self {
        let start = Instant::now();
        Meter {
            hist: Histogram::new_with_bounds(1_000, 60_000_000_000, 3).expect("valid histogram bounds"),
            count: 0,
            warm_end: start + run.warmup,
            end: start + run.warmup + run.duration,
            window: None,
            server_pid: run.server_pid.map(|p| p.to_string()),
        }
    }

    /// Whether the measured window has started (the warm-up is over).
    pub fn measuring(&self) -> bool {
        self.window.is_some()
    }

    /// One round trip, sent at `sent_at`, is complete: records it and returns the time now (to
    /// stamp the next message with).
    pub fn record(&mut self, sent_at: Instant) -> Instant {
        let now = Instant::now();
        self.hist.saturating_record(now.duration_since(sent_at).as_nanos() as u64);
        self.count += 1;
        now
    }

    /// Called at each turn of the event loop: opens the measured window once the warm-up is
    /// over (what the warm-up recorded is dropped), and returns how long the loop may sleep
    /// (at most [`STEP_TIMEOUT`]), or `None` once the window is over.
    pub fn next_wait(&mut self) -> Option<Duration> {
        let now = Instant::now();
        if self.window.is_none() && now >= self.warm_end {
            self.hist.reset();
            self.count = 0;
            self.window = Some(Window::now(&self.server_pid));
        }
        let until = if self.window.is_none() { self.warm_end } else { self.end };
        (now < self.end).then(|| (until - now).min(STEP_TIMEOUT))
    }

    /// Closes the window; `what` describes the run (`50 conns x 32 B`), `extra` adds counters to
    /// both lines. Prints the human line (prefixed `name:`) and the `RESULT` line.
    pub fn report(self, name: &str, what: &str, extra: &[(&str, u64)]) {
        let first = self.window.expect("the measured window has started");
        let last = Window::now(&self.server_pid);
        let secs = last.at.duration_since(first.at).as_secs_f64();
        let rate = self.count as f64 / secs;
        let quantile = |q| self.hist.value_at_quantile(q) as f64 / 1e3;
        let (p50, p99) = (quantile(0.50), quantile(0.99));
        let (client, server) =
            (percent(first.client, last.client, secs), percent(first.server, last.server, secs));
        // Everything else the machine ran meanwhile (other processes, the hypervisor's steal time).
        let others = percent(first.machine, last.machine, secs)
            .map(|m| (m - client.unwrap_or(0.0) - server.unwrap_or(0.0)).max(0.0));
        let (client, server, others) = (show(client), show(server), show(others));
        let human: String = extra.iter().map(|(k, v)| format!(", {k} {v}")).collect();
        let machine: String = extra.iter().map(|(k, v)| format!(" {k}={v}")).collect();
        println!(
            "{name}: {what}, {secs:.2} s measured: {rate:.0} msgs/s, p50 {p50:.1} us, p99 {p99:.1} us, \
             client CPU {client} %, server CPU {server} %, others {others} %{human}"
        );
        println!(
            "RESULT msgs_per_s={rate:.0} p50_us={p50:.1} p99_us={p99:.1} client_cpu={client} server_cpu={server} \
             others_cpu={others}{machine}"
        );
    }
}
