//! Name resolution off the game thread: `getaddrinfo` blocks, so lookups run on a small pool of
//! helper threads (at most [`MAX_THREADS`], started on demand, gone after [`IDLE_EXIT`] without
//! work or when the driver is dropped) that wake the poll when a lookup is done. Results are
//! cached; a host asked for while its lookup runs joins that lookup.

use std::collections::{HashMap, HashSet, VecDeque};
use std::net::{IpAddr, ToSocketAddrs};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use mio::Waker;

/// How long a successful lookup is reused (`getaddrinfo` does not report TTLs).
const POSITIVE_TTL: Duration = Duration::from_secs(60);
/// How long a failed lookup is reported without asking again.
const NEGATIVE_TTL: Duration = Duration::from_secs(5);
/// Cache entries kept before expired ones are purged.
const CACHE_LIMIT: usize = 1024;
/// Resolver threads at most (a lookup of a dead name server can take seconds; more lookups
/// than threads wait in the queue).
pub const MAX_THREADS: usize = 4;
/// A resolver thread with nothing to do for this long exits.
const IDLE_EXIT: Duration = Duration::from_secs(10);

/// The outcome of `Dns::lookup`.
#[derive(Debug, Clone, PartialEq)]
pub enum Lookup {
    Done(Vec<IpAddr>),
    Failed(String),
    /// A helper thread is resolving it; the driver reports `Ready::Resolved(host)` when done.
    Pending,
}

type Answer = Result<Vec<IpAddr>, String>;

#[derive(Default)]
struct Shared {
    queue: VecDeque<String>,
    finished: Vec<(String, Answer)>,
    threads: usize,
    idle: usize,
    /// The driver is gone: threads exit.
    closed: bool,
}

struct Pool {
    shared: Mutex<Shared>,
    work: Condvar,
    waker: Arc<Waker>,
}

impl Pool {
    fn lock(&self) -> MutexGuard<'_, Shared> {
        self.shared.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn run(self: Arc<Pool>) {
        let mut shared = self.lock();
        loop {
            if shared.closed {
                break;
            }
            let Some(host) = shared.queue.pop_front() else {
                shared.idle += 1;
                let (guard, timeout) =
                    self.work.wait_timeout(shared, IDLE_EXIT).unwrap_or_else(|p| p.into_inner());
                shared = guard;
                shared.idle -= 1;
                if timeout.timed_out() && shared.queue.is_empty() {
                    break;
                }
                continue;
            };
            drop(shared);
            let answer = resolve_blocking(&host);
            shared = self.lock();
            shared.finished.push((host, answer));
            // The poll may be gone (state closed); then nobody is waiting.
            let _ = self.waker.wake();
        }
        shared.threads -= 1;
    }
}

pub struct Dns {
    cache: HashMap<String, (Instant, Answer)>,
    in_flight: HashSet<String>,
    pool: Arc<Pool>,
}

/// Parses an IP literal, with or without the brackets of a URL host (`[::1]`).
pub fn parse_ip(host: &str) -> Option<IpAddr> {
    let bare = host.strip_prefix('[').and_then(|h| h.strip_suffix(']')).unwrap_or(host);
    bare.parse().ok()
}

impl Dns {
    pub fn new(waker: Arc<Waker>) -> Dns {
        let pool = Arc::new(Pool { shared: Mutex::default(), work: Condvar::new(), waker });
        Dns { cache: HashMap::new(), in_flight: HashSet::new(), pool }
    }

    /// Answers from literals or the cache, or queues a background lookup.
    pub fn lookup(&mut self, host: &str, now: Instant) -> Lookup {
        if let Some(ip) = parse_ip(host) {
            return Lookup::Done(vec![ip]);
        }
        if let Some((expires, answer)) = self.cache.get(host) {
            if *expires > now {
                return match answer {
                    Ok(ips) => Lookup::Done(ips.clone()),
                    Err(e) => Lookup::Failed(e.clone()),
                };
            }
        }
        if self.in_flight.contains(host) {
            return Lookup::Pending;
        }
        let mut shared = self.pool.lock();
        shared.queue.push_back(host.to_owned());
        if shared.idle > 0 {
            self.pool.work.notify_one();
        } else if shared.threads < MAX_THREADS {
            let pool = self.pool.clone();
            if std::thread::Builder::new().name("luna-dns".into()).spawn(move || pool.run()).is_ok() {
                shared.threads += 1;
            } else if shared.threads == 0 {
                shared.queue.pop_back();
                return Lookup::Failed(format!("cannot resolve '{host}': no resolver thread could start"));
            }
        }
        drop(shared);
        self.in_flight.insert(host.to_owned());
        Lookup::Pending
    }

    /// Moves finished lookups into the cache; appends the hosts that completed.
    pub fn collect(&mut self, now: Instant, done: &mut Vec<String>) {
        let finished = std::mem::take(&mut self.pool.lock().finished);
        if finished.is_empty() {
            return;
        }
        if self.cache.len() + finished.len() > CACHE_LIMIT {
            self.cache.retain(|_, (expires, _)| *expires > now);
            if self.cache.len() + finished.len() > CACHE_LIMIT {
                self.cache.clear();
            }
        }
        for (host, answer) in finished {
            self.in_flight.remove(&host);
            let ttl = if answer.is_ok() { POSITIVE_TTL } else { NEGATIVE_TTL };
            self.cache.insert(host.clone(), (now + ttl, answer));
            done.push(host);
        }
    }

    pub fn in_flight(&self) -> usize {
        self.in_flight.len()
    }

    #[cfg(test)]
    fn threads(&self) -> usize {
        self.pool.lock().threads
    }
}

impl Drop for Dns {
    fn drop(&mut self) {
        let mut shared = self.pool.lock();
        shared.closed = true;
        shared.queue.clear();
        self.pool.work.notify_all();
    }
}

fn resolve_blocking(host: &str) -> Answer {
    let addrs = (host, 0).to_socket_addrs().map_err(|e| format!("cannot resolve '{host}': {e}"))?;
    let mut ips: Vec<IpAddr> = Vec::new();
    for addr in addrs {
        if !ips.contains(&addr.ip()) {
            ips.push(addr.ip());
        }
    }
    if ips.is_empty() {
        return Err(format!("cannot resolve '{host}': no addresses"));
    }
    Ok(ips)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn literals_need_no_lookup() {
        assert_eq!(parse_ip("127.0.0.1"), Some("127.0.0.1".parse().unwrap()));
        assert_eq!(parse_ip("[::1]"), Some("::1".parse().unwrap()));
        assert_eq!(parse_ip("::1"), Some("::1".parse().unwrap()));
        assert_eq!(parse_ip("localhost"), None);
    }

    #[test]
    fn many_lookups_share_a_bounded_pool() {
        let poll = mio::Poll::new().unwrap();
        let waker = Arc::new(Waker::new(poll.registry(), mio::Token(0)).unwrap());
        let mut dns = Dns::new(waker);
        let now = Instant::now();
        let hosts: Vec<String> = (0..40).map(|i| format!("host{i}.invalid")).collect();
        for host in &hosts {
            assert_eq!(dns.lookup(host, now), Lookup::Pending);
            assert_eq!(dns.lookup(host, now), Lookup::Pending, "a second ask joins the lookup");
        }
        assert!(dns.threads() <= MAX_THREADS, "{} threads", dns.threads());
        assert_eq!(dns.in_flight(), hosts.len());
        let mut done = Vec::new();
        let deadline = Instant::now() + Duration::from_secs(60);
        let mut collected = now;
        while done.len() < hosts.len() {
            assert!(Instant::now() < deadline, "lookups did not finish: {} of {}", done.len(), hosts.len());
            std::thread::sleep(Duration::from_millis(20));
            collected = Instant::now();
            dns.collect(collected, &mut done);
        }
        assert_eq!(dns.in_flight(), 0);
        // The failure is cached (for NEGATIVE_TTL from when it was collected; a loaded machine
        // may take longer than that for all 40).
        let last = done.last().unwrap();
        assert!(matches!(dns.lookup(last, collected), Lookup::Failed(_)));
        assert_eq!(
            dns.lookup(last, collected + NEGATIVE_TTL),
            Lookup::Pending,
            "an expired failure is asked again"
        );
    }
}
