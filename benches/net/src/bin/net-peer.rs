//! `net-peer (--tcp PORT | --unix PATH | --udp PORT) [--buf BYTES]`: the tokio peer server of
//! `benches/tcp_echo.sh` and `benches/udp_echo.sh`, on a single-threaded runtime (like Luna's
//! server), bound to 127.0.0.1 (or the Unix socket PATH). Prints `ready` once bound.
//!
//! - stream echo: one task per connection (`TCP_NODELAY` on), reading into its own buffer of
//!   `--buf` bytes (default 65536, libuv's read size) and writing what it read back with
//!   `write_all`; the buffer is allocated with the connection's first byte (read and echoed
//!   alone), so an idle connection holds only its task and socket;
//! - UDP echo: one socket, `recv_from` into a 65536-byte buffer, `send_to` back.

use std::io;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, UdpSocket, UnixListener};

const USAGE: &str = "usage: net-peer (--tcp PORT | --unix PATH | --udp PORT) [--buf BYTES]";

enum Serve {
    Tcp(u16),
    Unix(String),
    Udp(u16),
}

async fn echo(mut stream: impl AsyncRead + AsyncWrite + Unpin, size: usize) {
    // An idle connection holds no buffer (benches/tcp_idle.sh): the first byte is read and
    // echoed on its own (tokio's readiness can wake a task before any data is there), and the
    // buffer comes with it.
    let mut first = [0u8; 1];
    if !matches!(stream.read(&mut first).await, Ok(1)) || stream.write_all(&first).await.is_err() {
        return;
    }
    let mut buf = vec![0u8; size];
    while let Ok(n @ 1..) = stream.read(&mut buf).await {
        if stream.write_all(&buf[..n]).await.is_err() {
            return;
        }
    }
}

fn ready() {
    println!("ready");
}

async fn serve(what: Serve, size: usize) -> io::Result<()> {
    match what {
        Serve::Tcp(port) => {
            let listener = TcpListener::bind(("127.0.0.1", port)).await?;
            ready();
            loop {
                let (stream, _) = listener.accept().await?;
                stream.set_nodelay(true)?;
                tokio::spawn(echo(stream, size));
            }
        }
        Serve::Unix(path) => {
            let listener = UnixListener::bind(&path)?;
            ready();
            loop {
                let (stream, _) = listener.accept().await?;
                tokio::spawn(echo(stream, size));
            }
        }
        Serve::Udp(port) => {
            let socket = UdpSocket::bind(("127.0.0.1", port)).await?;
            ready();
            let mut buf = vec![0u8; 65_536];
            loop {
                let (n, from) = socket.recv_from(&mut buf).await?;
                socket.send_to(&buf[..n], from).await?;
            }
        }
    }
}

fn usage() -> ! {
    eprintln!("{USAGE}");
    std::process::exit(2);
}

fn main() -> io::Result<()> {
    let (mut what, mut size) = (None, 65_536);
    let mut args = std::env::args().skip(1);
    while let Some(flag) = args.next() {
        let value = args.next().unwrap_or_else(|| usage());
        let port = |v: &str| v.parse().unwrap_or_else(|_| usage());
        match flag.as_str() {
            "--tcp" => what = Some(Serve::Tcp(port(&value))),
            "--udp" => what = Some(Serve::Udp(port(&value))),
            "--unix" => what = Some(Serve::Unix(value)),
            "--buf" => size = value.parse().ok().filter(|&s| s > 0).unwrap_or_else(|| usage()),
            _ => usage(),
        }
    }
    let what = what.unwrap_or_else(|| usage());
    let runtime = tokio::runtime::Builder::new_current_thread().enable_io().build()?;
    runtime.block_on(serve(what, size))
}
