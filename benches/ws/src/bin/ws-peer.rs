//! `ws-peer --port N [--tls CERT KEY]`: the peer server of `benches/ws_echo.sh`, a
//! tokio-tungstenite echo server on a single-threaded runtime (like Luna's server) with
//! `read_buffer_size(4096)`. With `--tls` (PEM certificate chain and private key) it serves wss:
//! tokio-rustls (rustls 0.23, ring provider) under the same WebSocket stream.

use std::sync::Arc;

use futures_util::{SinkExt, StreamExt};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpListener;
use tokio_rustls::rustls;
use tokio_rustls::TlsAcceptor;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;

const USAGE: &str = "usage: ws-peer --port N [--tls CERT KEY]";

async fn echo<S: AsyncRead + AsyncWrite + Unpin>(stream: S, config: WebSocketConfig) {
    let Ok(mut ws) = tokio_tungstenite::accept_async_with_config(stream, Some(config)).await else { return };
    while let Some(Ok(message)) = ws.next().await {
        if (message.is_binary() || message.is_text()) && ws.send(message).await.is_err() {
            return;
        }
    }
}

fn tls_acceptor(cert: &str, key: &str) -> std::io::Result<TlsAcceptor> {
    let open = |path: &str| {
        std::fs::File::open(path)
            .map(std::io::BufReader::new)
            .map_err(|e| std::io::Error::new(e.kind(), format!("{path}: {e}")))
    };
    let certs = rustls_pemfile::certs(&mut open(cert)?).collect::<Result<Vec<_>, _>>()?;
    let key = rustls_pemfile::private_key(&mut open(key)?)?
        .ok_or_else(|| std::io::Error::other(format!("{key}: no private key")))?;
    let config =
        rustls::ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()
            .and_then(|b| b.with_no_client_auth().with_single_cert(certs, key))
            .map_err(std::io::Error::other)?;
    Ok(TlsAcceptor::from(Arc::new(config)))
}

fn usage() -> ! {
    eprintln!("{USAGE}");
    std::process::exit(2);
}

fn main() -> std::io::Result<()> {
    let (mut port, mut tls) = (None, None);
    let mut args = std::env::args().skip(1);
    while let Some(flag) = args.next() {
        match flag.as_str() {
            "--port" => {
                port = Some(args.next().and_then(|p| p.parse::<u16>().ok()).unwrap_or_else(|| usage()))
            }
            "--tls" => match (args.next(), args.next()) {
                (Some(cert), Some(key)) => tls = Some((cert, key)),
                _ => usage(),
            },
            _ => usage(),
        }
    }
    let port = port.unwrap_or_else(|| usage());
    let acceptor = tls.map(|(cert, key)| tls_acceptor(&cert, &key)).transpose()?;
    let runtime = tokio::runtime::Builder::new_current_thread().enable_io().build()?;
    runtime.block_on(async {
        let listener = TcpListener::bind(("127.0.0.1", port)).await?;
        let config = WebSocketConfig::default().read_buffer_size(4096);
        loop {
            let (stream, _) = listener.accept().await?;
            let _ = stream.set_nodelay(true);
            match &acceptor {
                None => drop(tokio::spawn(echo(stream, config))),
                Some(acceptor) => {
                    let accept = acceptor.accept(stream);
                    tokio::spawn(async move {
                        if let Ok(tls) = accept.await {
                            echo(tls, config).await;
                        }
                    });
                }
            }
        }
    })
}
