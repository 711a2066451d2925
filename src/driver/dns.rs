//! Name resolution off the game thread: `getaddrinfo` blocks, so each lookup runs on a helper
//! thread that wakes the poll when done. Results are cached.

use std::collections::{HashMap, HashSet};
use std::net::{IpAddr, ToSocketAddrs};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use mio::Waker;

/// How long a successful lookup is reused (`getaddrinfo` does not report TTLs).
const POSITIVE_TTL: Duration = Duration::from_secs(60);
/// How long a failed lookup is reported without asking again.
const NEGATIVE_TTL: Duration = Duration::from_secs(5);
/// Cache entries kept before expired ones are purged.
const CACHE_LIMIT: usize = 1024;

/// The outcome of [`Dns::lookup`].
#[derive(Debug, Clone, PartialEq)]
pub enum Lookup {
    Done(Vec<IpAddr>),
    Failed(String),
    /// A helper thread is resolving it; the driver reports `Ready::Resolved(host)` when done.
    Pending,
}

type Finished = Arc<Mutex<Vec<(String, Result<Vec<IpAddr>, String>)>>>;

pub struct Dns {
    cache: HashMap<String, (Instant, Result<Vec<IpAddr>, String>)>,
    in_flight: HashSet<String>,
    finished: Finished,
    waker: Arc<Waker>,
}

/// Parses an IP literal, with or without the brackets of a URL host (`[::1]`).
pub fn parse_ip(host: &str) -> Option<IpAddr> {
    let bare = host.strip_prefix('[').and_then(|h| h.strip_suffix(']')).unwrap_or(host);
    bare.parse().ok()
}

impl Dns {
    pub fn new(waker: Arc<Waker>) -> Dns {
        Dns { cache: HashMap::new(), in_flight: HashSet::new(), finished: Finished::default(), waker }
    }

    /// Answers from literals or the cache, or starts a background lookup.
    pub fn lookup(&mut self, host: &str, now: Instant) -> Lookup {
        if let Some(ip) = parse_ip(host) {
            return Lookup::Done(vec![ip]);
        }
        if let Some((expires, result)) = self.cache.get(host) {
            if *expires > now {
                return match result {
                    Ok(ips) => Lookup::Done(ips.clone()),
                    Err(e) => Lookup::Failed(e.clone()),
                };
            }
        }
        if self.in_flight.insert(host.to_owned()) {
            let (name, finished, waker) = (host.to_owned(), self.finished.clone(), self.waker.clone());
            let spawned = std::thread::Builder::new().name("luna-dns".into()).spawn(move || {
                let result = resolve_blocking(&name);
                finished.lock().unwrap_or_else(|p| p.into_inner()).push((name, result));
                // The driver may be gone (state closed); then nobody is waiting.
                let _ = waker.wake();
            });
            if let Err(e) = spawned {
                self.in_flight.remove(host);
                return Lookup::Failed(format!("cannot start a resolver thread: {e}"));
            }
        }
        Lookup::Pending
    }

    /// Moves finished lookups into the cache; returns the hosts that completed.
    pub fn collect(&mut self, now: Instant, done: &mut Vec<String>) {
        let finished = std::mem::take(&mut *self.finished.lock().unwrap_or_else(|p| p.into_inner()));
        if finished.is_empty() {
            return;
        }
        if self.cache.len() + finished.len() > CACHE_LIMIT {
            self.cache.retain(|_, (expires, _)| *expires > now);
            if self.cache.len() + finished.len() > CACHE_LIMIT {
                self.cache.clear();
            }
        }
        for (host, result) in finished {
            self.in_flight.remove(&host);
            let ttl = if result.is_ok() { POSITIVE_TTL } else { NEGATIVE_TTL };
            self.cache.insert(host.clone(), (now + ttl, result));
            done.push(host);
        }
    }

    pub fn in_flight(&self) -> usize {
        self.in_flight.len()
    }
}

fn resolve_blocking(host: &str) -> Result<Vec<IpAddr>, String> {
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
}
