//! Sockets: TCP and Unix streams and listeners, UDP. Built with socket2 where an option must be
//! set before `bind` (dual-stack `[::]`, `SO_REUSEPORT`, the backlog, broadcast), then handed to
//! mio as non-blocking sockets.

use std::fmt;
use std::io::{self, Read, Write};
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::{Path, PathBuf};

use mio::event::Source;
use mio::net::{TcpListener, TcpStream, UdpSocket, UnixListener, UnixStream};
use mio::{Interest, Registry, Token};
use socket2::{Domain, Protocol, SockRef, Socket, Type};

/// Where a socket is: an IP address and port, or a Unix socket path (unnamed for the client
/// end of a Unix connection).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Address {
    Ip(SocketAddr),
    Unix(Option<PathBuf>),
}

impl Address {
    /// An IP address as people write it: IPv4-mapped IPv6 addresses as plain IPv4.
    pub fn canonical(addr: SocketAddr) -> Address {
        Address::Ip(SocketAddr::new(addr.ip().to_canonical(), addr.port()))
    }

    pub fn ip(&self) -> Option<SocketAddr> {
        match self {
            Address::Ip(addr) => Some(*addr),
            Address::Unix(_) => None,
        }
    }
}

impl fmt::Display for Address {
    /// `ip:port`, `[v6]:port`, or the socket path.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Address::Ip(addr) => write!(f, "{addr}"),
            Address::Unix(Some(path)) => write!(f, "{}", path.display()),
            Address::Unix(None) => f.write_str("(unnamed)"),
        }
    }
}

/// A connected byte stream.
#[derive(Debug)]
pub enum StreamSocket {
    Tcp(TcpStream),
    Unix(UnixStream),
}

impl StreamSocket {
    /// The pending connect error, if the connect failed.
    pub fn take_error(&self) -> io::Result<Option<io::Error>> {
        match self {
            StreamSocket::Tcp(s) => s.take_error(),
            StreamSocket::Unix(s) => s.take_error(),
        }
    }

    /// Whether a non-blocking connect completed (the peer address is known).
    pub fn is_connected(&self) -> bool {
        match self {
            StreamSocket::Tcp(s) => s.peer_addr().is_ok(),
            StreamSocket::Unix(s) => s.peer_addr().is_ok(),
        }
    }

    pub fn local_address(&self) -> Option<Address> {
        match self {
            StreamSocket::Tcp(s) => s.local_addr().ok().map(Address::canonical),
            StreamSocket::Unix(s) => {
                s.local_addr().ok().map(|a| Address::Unix(a.as_pathname().map(Path::to_path_buf)))
            }
        }
    }

    pub fn set_nodelay(&self, on: bool) -> io::Result<()> {
        match self {
            StreamSocket::Tcp(s) => s.set_nodelay(on),
            StreamSocket::Unix(_) => Ok(()),
        }
    }

    pub fn set_ttl(&self, ttl: u32) -> io::Result<()> {
        match self {
            StreamSocket::Tcp(s) => s.set_ttl(ttl),
            StreamSocket::Unix(_) => Ok(()),
        }
    }

    pub fn shutdown_write(&self) {
        let _ = match self {
            StreamSocket::Tcp(s) => s.shutdown(std::net::Shutdown::Write),
            StreamSocket::Unix(s) => s.shutdown(std::net::Shutdown::Write),
        };
    }

    /// Makes the close that follows send a reset instead of a FIN.
    pub fn set_reset_on_close(&self) {
        if let StreamSocket::Tcp(s) = self {
            let _ = SockRef::from(s).set_linger(Some(std::time::Duration::ZERO));
        }
    }

    #[cfg(unix)]
    pub fn fd(&self) -> i32 {
        use std::os::fd::AsRawFd;
        match self {
            StreamSocket::Tcp(s) => s.as_raw_fd(),
            StreamSocket::Unix(s) => s.as_raw_fd(),
        }
    }
}

impl Read for StreamSocket {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            StreamSocket::Tcp(s) => s.read(buf),
            StreamSocket::Unix(s) => s.read(buf),
        }
    }
}

impl Write for StreamSocket {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            StreamSocket::Tcp(s) => s.write(buf),
            StreamSocket::Unix(s) => s.write(buf),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl Source for StreamSocket {
    fn register(&mut self, registry: &Registry, token: Token, interests: Interest) -> io::Result<()> {
        match self {
            StreamSocket::Tcp(s) => s.register(registry, token, interests),
            StreamSocket::Unix(s) => s.register(registry, token, interests),
        }
    }

    fn reregister(&mut self, registry: &Registry, token: Token, interests: Interest) -> io::Result<()> {
        match self {
            StreamSocket::Tcp(s) => s.reregister(registry, token, interests),
            StreamSocket::Unix(s) => s.reregister(registry, token, interests),
        }
    }

    fn deregister(&mut self, registry: &Registry) -> io::Result<()> {
        match self {
            StreamSocket::Tcp(s) => s.deregister(registry),
            StreamSocket::Unix(s) => s.deregister(registry),
        }
    }
}

/// A listening socket.
#[derive(Debug)]
pub enum ListenSocket {
    Tcp(TcpListener),
    /// The listener and the socket file it created (removed when the listener closes).
    Unix(UnixListener, PathBuf),
}

impl ListenSocket {
    /// The next pending connection, its peer canonical.
    pub fn accept(&self) -> io::Result<(StreamSocket, Address)> {
        match self {
            ListenSocket::Tcp(l) => {
                l.accept().map(|(s, peer)| (StreamSocket::Tcp(s), Address::canonical(peer)))
            }
            ListenSocket::Unix(l, _) => l.accept().map(|(s, peer)| {
                (StreamSocket::Unix(s), Address::Unix(peer.as_pathname().map(Path::to_path_buf)))
            }),
        }
    }

    pub fn local_address(&self) -> io::Result<Address> {
        match self {
            ListenSocket::Tcp(l) => l.local_addr().map(Address::canonical),
            ListenSocket::Unix(_, path) => Ok(Address::Unix(Some(path.clone()))),
        }
    }

    pub fn is_tcp(&self) -> bool {
        matches!(self, ListenSocket::Tcp(_))
    }
}

impl Drop for ListenSocket {
    fn drop(&mut self) {
        if let ListenSocket::Unix(_, path) = self {
            let _ = std::fs::remove_file(path);
        }
    }
}

impl Source for ListenSocket {
    fn register(&mut self, registry: &Registry, token: Token, interests: Interest) -> io::Result<()> {
        match self {
            ListenSocket::Tcp(l) => l.register(registry, token, interests),
            ListenSocket::Unix(l, _) => l.register(registry, token, interests),
        }
    }

    fn reregister(&mut self, registry: &Registry, token: Token, interests: Interest) -> io::Result<()> {
        match self {
            ListenSocket::Tcp(l) => l.reregister(registry, token, interests),
            ListenSocket::Unix(l, _) => l.reregister(registry, token, interests),
        }
    }

    fn deregister(&mut self, registry: &Registry) -> io::Result<()> {
        match self {
            ListenSocket::Tcp(l) => l.deregister(registry),
            ListenSocket::Unix(l, _) => l.deregister(registry),
        }
    }
}

/// Options for listening sockets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ListenOptions {
    /// Pending connections the kernel holds for `accept`.
    pub backlog: i32,
    /// `SO_REUSEPORT`: several sockets (processes) share the port; the kernel spreads
    /// connections over them.
    pub reuse_port: bool,
}

impl Default for ListenOptions {
    fn default() -> Self {
        ListenOptions { backlog: 1024, reuse_port: false }
    }
}

fn domain(addr: &SocketAddr) -> Domain {
    if addr.is_ipv6() {
        Domain::IPV6
    } else {
        Domain::IPV4
    }
}

/// A socket of `ty` bound to `addr`: `[::]` takes IPv4 too, and an address in use by a
/// listener that is gone (TIME_WAIT) can be bound again at once.
fn bound(addr: SocketAddr, ty: Type, protocol: Protocol, reuse_port: bool) -> io::Result<Socket> {
    let socket = Socket::new(domain(&addr), ty, Some(protocol))?;
    socket.set_nonblocking(true)?;
    socket.set_cloexec(true)?;
    if addr.is_ipv6() {
        socket.set_only_v6(false)?;
    }
    socket.set_reuse_address(true)?;
    if reuse_port {
        socket.set_reuse_port(true)?;
    }
    socket.bind(&addr.into())?;
    Ok(socket)
}

pub fn tcp_listen(addr: SocketAddr, options: ListenOptions) -> io::Result<ListenSocket> {
    let socket = bound(addr, Type::STREAM, Protocol::TCP, options.reuse_port)?;
    socket.listen(options.backlog)?;
    Ok(ListenSocket::Tcp(TcpListener::from_std(socket.into())))
}

/// Listens on a Unix socket at `path`. A socket file left by a process that is gone (nobody
/// accepts on it) is replaced; a live one, or a path that is not a socket, is an error.
pub fn unix_listen(path: &Path, options: ListenOptions) -> io::Result<ListenSocket> {
    use std::os::unix::fs::FileTypeExt;
    if let Ok(meta) = std::fs::symlink_metadata(path) {
        if !meta.file_type().is_socket() {
            return Err(io::Error::new(io::ErrorKind::AlreadyExists, "the path exists and is not a socket"));
        }
        match std::os::unix::net::UnixStream::connect(path) {
            Ok(_) => {
                return Err(io::Error::new(io::ErrorKind::AddrInUse, "a server is already listening there"))
            }
            Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => std::fs::remove_file(path)?,
            Err(_) => {}
        }
    }
    let socket = Socket::new(Domain::UNIX, Type::STREAM, None)?;
    socket.set_nonblocking(true)?;
    socket.set_cloexec(true)?;
    socket.bind(&socket2::SockAddr::unix(path)?)?;
    if let Err(e) = socket.listen(options.backlog) {
        let _ = std::fs::remove_file(path);
        return Err(e);
    }
    let listener: std::os::unix::net::UnixListener = socket.into();
    Ok(ListenSocket::Unix(UnixListener::from_std(listener), path.to_path_buf()))
}

/// Options for UDP sockets.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct UdpOptions {
    pub reuse_port: bool,
    pub broadcast: bool,
}

pub fn udp_bind(addr: SocketAddr, options: UdpOptions) -> io::Result<UdpSocket> {
    let socket = bound(addr, Type::DGRAM, Protocol::UDP, options.reuse_port)?;
    if options.broadcast {
        socket.set_broadcast(true)?;
    }
    Ok(UdpSocket::from_std(socket.into()))
}

/// The wildcard address of the family of `addr` (where a client socket binds).
pub fn any_address(addr: &SocketAddr) -> SocketAddr {
    match addr {
        SocketAddr::V4(_) => SocketAddr::new(Ipv4Addr::UNSPECIFIED.into(), 0),
        SocketAddr::V6(_) => SocketAddr::new(Ipv6Addr::UNSPECIFIED.into(), 0),
    }
}

/// Starts a non-blocking TCP connect (completion shows as writability).
pub fn tcp_connect(addr: SocketAddr) -> io::Result<StreamSocket> {
    TcpStream::connect(addr).map(StreamSocket::Tcp)
}

/// Connects to a Unix socket (local: completes at once or fails).
pub fn unix_connect(path: &Path) -> io::Result<StreamSocket> {
    UnixStream::connect(path).map(StreamSocket::Unix)
}
