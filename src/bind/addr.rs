//! Addresses as Lua code gives them, in one place: `"*"` (every interface, IPv4 and IPv6),
//! `"localhost"`, IP literals (`"::1"`, `"[::1]"`) and host names, which resolve off-thread. A
//! caller that needs the addresses of a name not resolved yet leaves a continuation here; it
//! runs when the lookup finishes (from `tick`), with the addresses or the failure.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::Instant;

use mlua::{Lua, Result};

use super::Runtime;
use crate::driver::net::{self, ListenOptions, ListenSocket};
use crate::driver::Lookup;

/// What to do once a host name resolved.
pub(crate) type Continuation =
    Box<dyn FnOnce(&Lua, &Runtime, std::result::Result<Vec<IpAddr>, String>) -> Result<()>>;

/// Continuations waiting for host names, by host.
#[derive(Default)]
pub(crate) struct Waiting(HashMap<String, Vec<Continuation>>);

impl Waiting {
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

/// The addresses a server binds for `host`, in the order to try, or `None` for a host name
/// (resolve it): `"*"` is every interface (an IPv6 socket that takes IPv4 too, or IPv4 alone
/// where IPv6 is off), `"localhost"` the IPv4 loopback.
pub(crate) fn listen_ips(host: &str) -> Option<Vec<IpAddr>> {
    match host {
        "*" => Some(vec![IpAddr::V6(Ipv6Addr::UNSPECIFIED), IpAddr::V4(Ipv4Addr::UNSPECIFIED)]),
        "localhost" => Some(vec![IpAddr::V4(Ipv4Addr::LOCALHOST)]),
        other => crate::driver::parse_ip(other).map(|ip| vec![ip]),
    }
}

/// `ips` with `port`.
pub(crate) fn with_port(ips: &[IpAddr], port: u16) -> Vec<SocketAddr> {
    ips.iter().map(|ip| SocketAddr::new(*ip, port)).collect()
}

/// A TCP socket listening on the first of `addrs` that takes one, with the address it got (a
/// free port filled in), or why none did (the last failure).
pub(crate) fn tcp_listen_first(
    addrs: &[SocketAddr],
    options: ListenOptions,
) -> std::result::Result<(ListenSocket, SocketAddr), String> {
    let mut last = String::from("no address to listen on");
    for addr in addrs {
        match net::tcp_listen(*addr, options) {
            Ok(socket) => {
                let local = socket.local_address().ok().and_then(|a| a.ip()).unwrap_or(*addr);
                return Ok((socket, local));
            }
            Err(e) => last = format!("cannot listen on {}: {e}", show(*addr)),
        }
    }
    Err(last)
}

/// `"ip:port"`, IPv6 as `"[::1]:port"`, IPv4-mapped IPv6 as plain IPv4.
pub(crate) fn show(addr: SocketAddr) -> String {
    SocketAddr::new(addr.ip().to_canonical(), addr.port()).to_string()
}

/// Runs `then` with the addresses of `host` (a literal, `"*"`, `"localhost"` or a name): now if
/// they are known, else once the lookup finishes. `listen` picks the server meaning of `"*"`
/// and `"localhost"`.
pub(crate) fn resolve_then(
    lua: &Lua,
    rt: &Runtime,
    host: &str,
    listen: bool,
    then: Continuation,
) -> Result<()> {
    if listen {
        if let Some(ips) = listen_ips(host) {
            return then(lua, rt, Ok(ips));
        }
    }
    let lookup = rt.driver.borrow_mut().lookup(host, Instant::now());
    match lookup {
        Lookup::Done(ips) => then(lua, rt, Ok(ips)),
        Lookup::Failed(e) => then(lua, rt, Err(e)),
        Lookup::Pending => {
            rt.resolving.borrow_mut().0.entry(host.to_owned()).or_default().push(then);
            Ok(())
        }
    }
}

/// `host` resolved (or failed): runs what waited for it. Every continuation runs even if one
/// raises; the first error is returned.
pub(crate) fn resolved(lua: &Lua, rt: &Runtime, host: &str, now: Instant) -> Result<()> {
    let Some(waiting) = rt.resolving.borrow_mut().0.remove(host) else { return Ok(()) };
    let answer = match rt.driver.borrow_mut().lookup(host, now) {
        Lookup::Done(ips) => Ok(ips),
        Lookup::Failed(e) => Err(e),
        // Expired again at once (a clock jump): ask once more.
        Lookup::Pending => {
            rt.resolving.borrow_mut().0.insert(host.to_owned(), waiting);
            return Ok(());
        }
    };
    let mut result = Ok(());
    for then in waiting {
        result = result.and(then(lua, rt, answer.clone()));
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn server_hosts() {
        assert_eq!(listen_ips("*").unwrap().len(), 2);
        assert_eq!(listen_ips("localhost"), Some(vec![IpAddr::V4(Ipv4Addr::LOCALHOST)]));
        assert_eq!(listen_ips("[::1]"), Some(vec![IpAddr::V6(Ipv6Addr::LOCALHOST)]));
        assert_eq!(listen_ips("example.com"), None);
        assert_eq!(show("[::ffff:127.0.0.1]:80".parse().unwrap()), "127.0.0.1:80");
        assert_eq!(show("[::1]:80".parse().unwrap()), "[::1]:80");
    }
}
