//! `ws-peer --port N`: the peer server of `benches/ws_echo.sh`, a tokio-tungstenite echo server
//! on a single-threaded runtime (like Luna's server) with `read_buffer_size(4096)`.

use futures_util::{SinkExt, StreamExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;

async fn echo(stream: TcpStream, config: WebSocketConfig) {
    let _ = stream.set_nodelay(true);
    let Ok(mut ws) = tokio_tungstenite::accept_async_with_config(stream, Some(config)).await else { return };
    while let Some(Ok(message)) = ws.next().await {
        if (message.is_binary() || message.is_text()) && ws.send(message).await.is_err() {
            return;
        }
    }
}

fn main() -> std::io::Result<()> {
    let mut args = std::env::args().skip(1);
    let port: u16 = match (args.next().as_deref(), args.next().map(|p| p.parse())) {
        (Some("--port"), Some(Ok(port))) => port,
        _ => {
            eprintln!("usage: ws-peer --port N");
            std::process::exit(2);
        }
    };
    let runtime = tokio::runtime::Builder::new_current_thread().enable_io().build()?;
    runtime.block_on(async {
        let listener = TcpListener::bind(("127.0.0.1", port)).await?;
        let config = WebSocketConfig::default().read_buffer_size(4096);
        loop {
            let (stream, _) = listener.accept().await?;
            tokio::spawn(echo(stream, config));
        }
    })
}
