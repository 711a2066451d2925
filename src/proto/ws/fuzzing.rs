//! Entry points for the fuzz targets (`fuzz/fuzz_targets/ws_*.rs`) and the stable test that
//! replays their seed corpus (`tests/fuzz_seeds_streams.rs`). Each takes arbitrary bytes, must
//! never panic, and checks a few invariants with `assert!` (a failed assertion is a bug).

use super::conn::{Opcode, Role, WsConfig, WsConn, WsEvent};
use super::deflate::{Agreed, DeflateConfig};
use super::upgrade::{ClientHandshake, ServerHandshake, ServerUpgrade, UpgradeLimits, WsUrl};

/// Chunk size chosen by a control byte: 1..=16 bytes, or everything at once.
fn chunk_len(ctl: u8, total: usize) -> usize {
    match ctl & 0x1f {
        0 => total.max(1),
        n => usize::from(n.min(16)),
    }
}

/// Drive the server-side upgrade parser and the client-side response parser with `data`.
///
/// Byte 0 picks the chunk size, the server's handler set and whether permessage-deflate is
/// allowed and offered; the rest is fed as the request (server side) and as the response
/// (client side).
pub fn upgrade(data: &[u8]) {
    let Some((&ctl, input)) = data.split_first() else { return };
    let limits = UpgradeLimits { max_head_bytes: 2048, max_headers: 16 };
    let chunk = chunk_len(ctl, input.len());
    let with_default = ctl & 0x20 != 0;
    let has_handler = |p: &str| p == "chat" || p == "echo" || (with_default && p == "default");
    let deflate = (ctl & 0x40 != 0).then(DeflateConfig::default);

    let mut hs = ServerHandshake::new(limits);
    let mut outcome = None;
    for piece in input.chunks(chunk) {
        match hs.handle_bytes(piece, has_handler, deflate.as_ref().map(|d| (d, ctl & 0x80 != 0))) {
            ServerUpgrade::Incomplete => {
                assert!(hs.is_finished() || hs.buffered() <= limits.max_head_bytes + chunk);
            }
            other => {
                outcome = Some(other);
                break;
            }
        }
    }
    match outcome {
        Some(ServerUpgrade::Accept(a)) => {
            assert!(a.response.starts_with(b"HTTP/1.1 101 "));
            assert!(a.path.starts_with('/'));
            assert!(a.protocol.is_none() || a.protocol.as_deref() == Some(a.handler.as_str()));
            assert!(has_handler(&a.handler));
            const ANSWER: &[u8] = b"Sec-WebSocket-Extensions: permessage-deflate";
            let answered = a.response.windows(ANSWER.len()).any(|w| w == ANSWER);
            assert_eq!(a.deflate.is_some(), answered);
            assert!(deflate.is_some() || a.deflate.is_none());
        }
        Some(ServerUpgrade::Reject(r)) => {
            assert!(r.response.starts_with(b"HTTP/1.1 4"));
            assert!(matches!(r.status, 400 | 405 | 426 | 431));
        }
        _ => {}
    }

    // Client side: the same bytes as a server response.
    let url = WsUrl::parse("ws://example.com:8080/x?y").expect("static URL");
    let Ok((mut ch, req)) = ClientHandshake::new(&url, &["chat", "echo"], [7; 16], deflate.as_ref()) else {
        panic!("static request")
    };
    assert!(req.ends_with(b"\r\n\r\n"));
    for piece in input.chunks(chunk) {
        match ch.handle_bytes(piece) {
            Ok(None) => {}
            Ok(Some(up)) => {
                assert!(up.protocol.is_none() || matches!(up.protocol.as_deref(), Some("chat" | "echo")));
                assert!(deflate.is_some() || up.deflate.is_none());
                break;
            }
            Err(_) => break,
        }
    }
    // URL parsing of arbitrary text.
    if let Ok(s) = std::str::from_utf8(input) {
        if let Ok(u) = WsUrl::parse(s) {
            assert!(u.resource.starts_with('/'));
        }
    }
}

/// Feed arbitrary bytes to a WebSocket connection that already passed its upgrade.
///
/// Byte 0: bit 7 = client role (else server), bit 5 = permessage-deflate agreed (with context
/// takeover, every message compressed), low bits = chunk size. Small limits make the size
/// checks reachable. Between chunks the target sends, pings and occasionally closes.
pub fn connection(data: &[u8]) {
    let Some((&ctl, input)) = data.split_first() else { return };
    let role = if ctl & 0x80 != 0 { Role::Client } else { Role::Server };
    let config = WsConfig {
        read_buffer_size: 256,
        max_message_size: 4096,
        max_frame_size: 1024,
        max_outgoing_buffer: 8192,
        max_incoming_buffer: 16384,
    };
    let chunk = chunk_len(ctl, input.len());
    let deflate = (ctl & 0x20 != 0).then_some(Agreed {
        level: 1,
        threshold: 0,
        send_window_bits: 15,
        send_takeover: true,
        recv_takeover: true,
    });
    let mut conn = WsConn::new(role, config, &[], deflate);
    let mut closed_events = 0;
    let mut out = Vec::new();
    for (i, piece) in input.chunks(chunk).enumerate() {
        conn.handle_bytes(piece);
        while let Some(ev) = conn.poll_event() {
            match ev {
                WsEvent::Message { opcode, data } => {
                    assert!(data.len() <= config.max_message_size);
                    if opcode == Opcode::Text {
                        assert!(std::str::from_utf8(&data).is_ok());
                    }
                    let _ = conn.send(opcode, &data);
                }
                WsEvent::Closed { code, .. } => {
                    closed_events += 1;
                    assert!(code >= 1000);
                    assert!(conn.is_closed());
                }
            }
        }
        match i % 7 {
            3 => {
                let _ = conn.ping(b"k");
            }
            5 if ctl & 0x40 != 0 => {
                let _ = conn.close(1000, "bye");
            }
            _ => {}
        }
        if i % 2 == 0 {
            conn.take_outgoing(&mut out);
            out.clear();
        }
    }
    conn.handle_eof();
    loop {
        conn.take_outgoing(&mut out);
        out.clear();
        match conn.poll_event() {
            Some(WsEvent::Closed { .. }) => closed_events += 1,
            Some(WsEvent::Message { .. }) => {}
            None if conn.outgoing_len() > 0 => {}
            None => break,
        }
    }
    assert!(closed_events <= 1);
    assert!(conn.is_closed(), "end of stream must end the connection");
    assert!(conn.poll_event().is_none());
}
