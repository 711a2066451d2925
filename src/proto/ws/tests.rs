//! In-memory server ↔ client tests of the whole `proto::ws` stack.

use super::conn::is_sendable_close_code;
use super::*;

// ---------------------------------------------------------------------------------------------
// Helpers.

const KEY: [u8; 16] = *b"0123456789abcdef";

fn request(extra: &str) -> Vec<u8> {
    format!(
        "GET /chat?room=1 HTTP/1.1\r\nHost: localhost:9000\r\nUpgrade: websocket\r\n\
         Connection: keep-alive, Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\
         Sec-WebSocket-Version: 13\r\n{extra}\r\n"
    )
    .into_bytes()
}

fn handlers<'a>(names: &'a [&'a str]) -> impl Fn(&str) -> bool + 'a {
    move |p| names.contains(&p)
}

fn server_accept(req: &[u8], names: &[&str]) -> Result<Box<AcceptedUpgrade>, Rejection> {
    let mut hs = ServerHandshake::default();
    match hs.handle_bytes(req, handlers(names), None) {
        ServerUpgrade::Accept(a) => Ok(a),
        ServerUpgrade::Reject(r) => Err(r),
        ServerUpgrade::Incomplete => panic!("incomplete"),
    }
}

fn reject(req: &[u8]) -> Rejection {
    server_accept(req, &["default"]).expect_err("should be rejected")
}

/// Connect a client and a server through the handshakes, feeding `step` bytes at a time.
fn pair_with(step: usize, config: WsConfig, protocols: &[&str], names: &[&str]) -> (WsConn, WsConn) {
    pair_deflate(step, config, protocols, names, None)
}

/// [`pair_with`], both sides allowing permessage-deflate with `deflate` when given.
fn pair_deflate(
    step: usize,
    config: WsConfig,
    protocols: &[&str],
    names: &[&str],
    deflate: Option<&DeflateConfig>,
) -> (WsConn, WsConn) {
    let url = WsUrl::parse("ws://localhost:9000/chat?room=1").unwrap();
    let (mut ch, req) = ClientHandshake::new(&url, protocols, KEY, deflate).unwrap();
    let mut sh = ServerHandshake::default();
    let mut accepted = None;
    for piece in req.chunks(step) {
        match sh.handle_bytes(piece, handlers(names), deflate.map(|d| (d, true))) {
            ServerUpgrade::Incomplete => {}
            ServerUpgrade::Accept(a) => accepted = Some(a),
            ServerUpgrade::Reject(r) => panic!("rejected: {}", r.reason),
        }
    }
    let a = accepted.expect("accepted");
    assert_eq!(a.path, "/chat");
    assert_eq!(a.query.as_deref(), Some("room=1"));
    assert_eq!(a.header("HOST"), Some("localhost:9000"));
    let server = WsConn::new(Role::Server, config, &a.leftover, a.deflate);
    let mut up = None;
    for piece in a.response.chunks(step) {
        if let Some(u) = ch.handle_bytes(piece).unwrap() {
            up = Some(u);
        }
    }
    let up = up.expect("client upgraded");
    assert_eq!(up.protocol, a.protocol);
    assert_eq!(up.deflate.is_some(), deflate.is_some());
    let client = WsConn::new(Role::Client, config, &up.leftover, up.deflate);
    (server, client)
}

fn pair() -> (WsConn, WsConn) {
    pair_with(usize::MAX, WsConfig::default(), &[], &["default"])
}

/// Move bytes `from` → `to`, `step` bytes at a time, collecting `to`'s events.
fn transfer(from: &mut WsConn, to: &mut WsConn, step: usize) -> Vec<WsEvent> {
    let mut bytes = Vec::new();
    from.take_outgoing(&mut bytes);
    let mut events = Vec::new();
    for piece in bytes.chunks(step.max(1)) {
        to.handle_bytes(piece);
        while let Some(e) = to.poll_event() {
            events.push(e);
        }
    }
    events
}

fn feed(conn: &mut WsConn, bytes: &[u8]) -> Vec<WsEvent> {
    conn.handle_bytes(bytes);
    let mut events = Vec::new();
    while let Some(e) = conn.poll_event() {
        events.push(e);
    }
    events
}

/// A raw frame; `mask` set → masked as a client must.
fn raw(fin: bool, opcode: u8, payload: &[u8], mask: Option<[u8; 4]>) -> Vec<u8> {
    let mut v = vec![(if fin { 0x80 } else { 0 }) | opcode];
    let m = if mask.is_some() { 0x80 } else { 0 };
    match payload.len() {
        n if n < 126 => v.push(m | n as u8),
        n if n < 65536 => {
            v.push(m | 126);
            v.extend_from_slice(&(n as u16).to_be_bytes());
        }
        n => {
            v.push(m | 127);
            v.extend_from_slice(&(n as u64).to_be_bytes());
        }
    }
    match mask {
        Some(k) => {
            v.extend_from_slice(&k);
            v.extend(payload.iter().enumerate().map(|(i, b)| b ^ k[i % 4]));
        }
        None => v.extend_from_slice(payload),
    }
    v
}

const M: Option<[u8; 4]> = Some([1, 2, 3, 4]);

fn msg(opcode: Opcode, data: &[u8]) -> WsEvent {
    WsEvent::Message { opcode, data: tungstenite::Bytes::copy_from_slice(data) }
}

fn closed_code(events: &[WsEvent]) -> Option<(u16, bool)> {
    events.iter().find_map(|e| match e {
        WsEvent::Closed { code, clean, .. } => Some((*code, *clean)),
        _ => None,
    })
}

/// Parse the first frame of `bytes` (unmasked): (opcode, payload).
fn first_frame(bytes: &[u8]) -> (u8, Vec<u8>) {
    let op = bytes[0] & 0x0f;
    let len = (bytes[1] & 0x7f) as usize;
    assert!(len < 126);
    (op, bytes[2..2 + len].to_vec())
}

// ---------------------------------------------------------------------------------------------
// Messages.

#[test]
fn text_and_binary_both_ways_one_byte_at_a_time() {
    let (mut s, mut c) = pair_with(1, WsConfig::default(), &[], &["default"]);
    c.send(Opcode::Text, "héllo".as_bytes()).unwrap();
    c.send(Opcode::Binary, &[0, 255, 1]).unwrap();
    let big = vec![7u8; 70_000];
    c.send(Opcode::Binary, &big).unwrap();
    let ev = transfer(&mut c, &mut s, 1);
    assert_eq!(
        ev,
        vec![
            msg(Opcode::Text, "héllo".as_bytes()),
            msg(Opcode::Binary, &[0, 255, 1]),
            msg(Opcode::Binary, &big)
        ]
    );

    s.send(Opcode::Text, b"").unwrap();
    s.send(Opcode::Binary, &big[..300]).unwrap();
    let ev = transfer(&mut s, &mut c, 1);
    assert_eq!(ev, vec![msg(Opcode::Text, b""), msg(Opcode::Binary, &big[..300])]);
    assert!(s.take_activity());
    assert!(!s.take_activity());
}

#[test]
fn fragmented_message_with_interleaved_ping() {
    let (mut s, _c) = pair();
    let mut bytes = raw(false, 1, b"ab", M);
    bytes.extend(raw(true, 9, b"PI", M));
    bytes.extend(raw(false, 0, b"cd", M));
    bytes.extend(raw(true, 10, b"unsolicited pong", M));
    bytes.extend(raw(true, 0, b"ef", M));
    let mut events = Vec::new();
    for b in &bytes {
        // one byte at a time
        events.extend(feed(&mut s, &[*b]));
    }
    assert_eq!(events, vec![msg(Opcode::Text, b"abcdef")]);
    assert_eq!(first_frame(s.outgoing()), (10, b"PI".to_vec()), "pong sent");
}

#[test]
fn fragmented_binary_reassembled() {
    let (mut s, _c) = pair();
    let mut bytes = raw(false, 2, &[1, 2], M);
    bytes.extend(raw(false, 0, &[3], M));
    bytes.extend(raw(true, 0, &[], M));
    assert_eq!(feed(&mut s, &bytes), vec![msg(Opcode::Binary, &[1, 2, 3])]);
}

#[test]
fn long_mixed_stream_in_random_chunks() {
    // Exercises the reader refresh at quiet points (after bursts that may have grown its
    // buffer) with every kind of frame sequence split at arbitrary places.
    let mut seed = 0x9e37_79b9u32;
    let mut rnd = move |n: u32| {
        seed ^= seed << 13;
        seed ^= seed >> 17;
        seed ^= seed << 5;
        seed % n
    };
    let (mut s, _c) = pair();
    let mut stream = Vec::new();
    let mut expect = Vec::new();
    for i in 0..300u32 {
        let len = match rnd(4) {
            0 => rnd(10) as usize,
            1 => rnd(200) as usize,
            2 => 4000 + rnd(3000) as usize,
            _ => 20_000 + rnd(50_000) as usize,
        };
        let payload: Vec<u8> = (0..len).map(|j| b'a' + ((i as usize + j) % 26) as u8).collect();
        let op = if rnd(2) == 0 { Opcode::Text } else { Opcode::Binary };
        if rnd(3) == 0 && len > 2 {
            // Fragmented in three pieces with a ping in between.
            let (a, rest) = payload.split_at(len / 3);
            let (b, c) = rest.split_at(rest.len() / 2);
            stream.extend(raw(false, op.as_u8(), a, M));
            stream.extend(raw(true, 9, b"p", M));
            stream.extend(raw(false, 0, b, M));
            stream.extend(raw(true, 0, c, M));
        } else {
            stream.extend(raw(true, op.as_u8(), &payload, M));
        }
        expect.push(msg(op, &payload));
    }
    let mut got = Vec::new();
    let mut pos = 0;
    while pos < stream.len() {
        let n = match rnd(3) {
            0 => 1 + rnd(16) as usize,
            1 => 1 + rnd(5000) as usize,
            _ => 1 + rnd(100_000) as usize,
        }
        .min(stream.len() - pos);
        got.extend(feed(&mut s, &stream[pos..pos + n]));
        pos += n;
        let k = s.outgoing_len();
        s.consume_outgoing(k);
    }
    assert_eq!(got.len(), expect.len());
    assert!(got == expect, "stream corrupted");
}

#[test]
fn ping_api_and_automatic_pong() {
    let (mut s, mut c) = pair();
    s.ping(b"keepalive").unwrap();
    assert!(transfer(&mut s, &mut c, 3).is_empty());
    // The client answered automatically.
    assert!(c.wants_write());
    c.take_activity();
    assert!(transfer(&mut c, &mut s, 1).is_empty());
    assert!(s.take_activity());
    assert!(matches!(s.ping(&[0; 126]), Err(Error::ControlFrameTooLong(126))));
}

#[test]
fn broadcast_pre_encoded_frame_keeps_order() {
    let (mut s1, mut c1) = pair();
    let (mut s2, mut c2) = pair();
    let frame = encode_frame(Opcode::Text, b"to everyone").unwrap();
    for s in [&mut s1, &mut s2] {
        s.send(Opcode::Text, b"1").unwrap();
        s.send_encoded(&frame).unwrap();
        s.send(Opcode::Binary, b"3").unwrap();
    }
    // A ping from the client in between: its pong must not corrupt the stream.
    c1.ping(b"p").unwrap();
    transfer(&mut c1, &mut s1, 1);
    s1.send_encoded(&frame).unwrap();
    let expect = vec![msg(Opcode::Text, b"1"), msg(Opcode::Text, b"to everyone"), msg(Opcode::Binary, b"3")];
    let mut e1 = expect.clone();
    e1.push(msg(Opcode::Text, b"to everyone"));
    assert_eq!(transfer(&mut s1, &mut c1, 2), e1);
    assert_eq!(transfer(&mut s2, &mut c2, 5), expect);
    assert!(matches!(c1.send_encoded(&frame), Err(Error::WrongRole(_))));
    assert_eq!(encode_frame(Opcode::Text, &[0xff]), Err(Error::InvalidUtf8));
}

#[test]
fn send_validation() {
    let (mut s, _c) = pair();
    assert_eq!(s.send(Opcode::Text, &[0xc3, 0x28]), Err(Error::InvalidUtf8));
    assert_eq!(Opcode::from_u8(9), Err(Error::InvalidOpcode(9)));
    assert_eq!(Opcode::from_u8(1).unwrap().as_u8(), 1);
    for code in [0, 999, 1004, 1005, 1006, 1015, 2000, 5000] {
        assert!(!is_sendable_close_code(code));
        assert_eq!(s.close(code, ""), Err(Error::InvalidCloseCode(code)));
    }
    s.close(1000, "").unwrap();
    assert_eq!(s.send(Opcode::Text, b"x"), Err(Error::Closed));
    assert_eq!(s.ping(b""), Err(Error::Closed));
    assert!(s.is_closing() && !s.can_send());
}

// ---------------------------------------------------------------------------------------------
// Closing.

#[test]
fn close_initiated_by_client() {
    let (mut s, mut c) = pair();
    c.close(4001, "bye").unwrap();
    assert!(c.is_closing());
    let ev = transfer(&mut c, &mut s, 1);
    assert_eq!(ev, vec![WsEvent::Closed { code: 4001, reason: "bye".into(), clean: true }]);
    assert!(s.is_closed());
    // The server's close reply echoes the code.
    assert_eq!(first_frame(s.outgoing()), (8, vec![0x0f, 0xa1, b'b', b'y', b'e']));
    let ev = transfer(&mut s, &mut c, 1);
    assert_eq!(ev, vec![WsEvent::Closed { code: 4001, reason: "bye".into(), clean: true }]);
    assert!(c.is_closed());
    assert_eq!(s.poll_event(), None);
}

#[test]
fn close_initiated_by_server_messages_before_reply_still_delivered() {
    let (mut s, mut c) = pair();
    c.send(Opcode::Text, b"in flight").unwrap();
    s.close(1001, &"é".repeat(100)).unwrap(); // 200 bytes, cut to 123 on a char boundary
    let ev = transfer(&mut s, &mut c, 7);
    match &ev[..] {
        [WsEvent::Closed { code: 1001, reason, clean: true }] => assert_eq!(reason.len(), 122),
        other => panic!("{other:?}"),
    }
    let ev = transfer(&mut c, &mut s, 7);
    assert_eq!(ev[0], msg(Opcode::Text, b"in flight"));
    assert!(matches!(ev[1], WsEvent::Closed { code: 1001, clean: true, .. }));
}

#[test]
fn close_without_code_reports_1005() {
    let (mut s, _c) = pair();
    let ev = feed(&mut s, &raw(true, 8, b"", M));
    assert_eq!(ev, vec![WsEvent::Closed { code: 1005, reason: String::new(), clean: true }]);
    assert_eq!(first_frame(s.outgoing()), (8, vec![]));
}

#[test]
fn invalid_close_codes_from_peer() {
    for payload in [&[0x03, 0xed][..], &[0x03, 0xe7], &[0x13, 0x88]] {
        // 1005 (not sendable), 999, 5000
        let (mut s, _c) = pair();
        let ev = feed(&mut s, &raw(true, 8, payload, M));
        assert_eq!(closed_code(&ev), Some((1002, true)), "{payload:?}");
        assert_eq!(first_frame(s.outgoing()).1[..2], [0x03, 0xea]);
    }
    // In reply to our close.
    let (mut s, _c) = pair();
    s.close(1000, "").unwrap();
    let ev = feed(&mut s, &raw(true, 8, &[0x03, 0xb4], M));
    assert_eq!(closed_code(&ev), Some((1002, true)));
    // A one-byte close payload is a protocol error.
    let (mut s, _c) = pair();
    assert_eq!(closed_code(&feed(&mut s, &raw(true, 8, &[3], M))), Some((1002, false)));
    // Invalid UTF-8 in the reason.
    let (mut s, _c) = pair();
    assert_eq!(closed_code(&feed(&mut s, &raw(true, 8, &[3, 232, 0xff], M))), Some((1007, false)));
}

#[test]
fn eof_without_close_is_1006_and_abort() {
    let (mut s, _c) = pair();
    s.handle_bytes(&raw(true, 1, b"half", M)[..3]);
    s.handle_eof();
    assert_eq!(closed_code(&[s.poll_event().unwrap()]), Some((1006, false)));
    assert_eq!(s.poll_event(), None);
    assert!(!s.wants_write(), "nothing sent to a gone peer");

    let (mut s, _c) = pair();
    s.close(1000, "").unwrap();
    s.abort("close handshake timed out");
    assert_eq!(
        s.poll_event(),
        Some(WsEvent::Closed { code: 1006, reason: "close handshake timed out".into(), clean: false })
    );
    assert!(s.is_closed() && !s.wants_input());
}

// ---------------------------------------------------------------------------------------------
// Hostile input.

#[test]
fn unmasked_client_frame_rejected_with_1002() {
    let (mut s, _c) = pair();
    let ev = feed(&mut s, &raw(true, 1, b"hi", None));
    assert_eq!(closed_code(&ev), Some((1002, false)));
    assert_eq!(first_frame(s.outgoing()).0, 8);
    assert_eq!(first_frame(s.outgoing()).1[..2], 1002u16.to_be_bytes());
    // Nothing more after the failure.
    assert!(feed(&mut s, &raw(true, 1, b"hi", M)).is_empty());
}

#[test]
fn masked_server_frame_rejected_by_client() {
    let (_s, mut c) = pair();
    assert_eq!(closed_code(&feed(&mut c, &raw(true, 1, b"hi", M))), Some((1002, false)));
}

#[test]
fn protocol_violations_are_1002() {
    let cases: Vec<Vec<u8>> = vec![
        raw(true, 0, b"x", M),      // continuation without start
        raw(true, 3, b"x", M),      // reserved opcode
        raw(false, 9, b"x", M),     // fragmented control frame
        raw(true, 9, &[0; 126], M), // control frame too big
        {
            let mut v = raw(true, 1, b"x", M);
            v[0] |= 0x40; // RSV1 without extension
            v
        },
        {
            let mut v = raw(false, 1, b"a", M);
            v.extend(raw(true, 2, b"b", M)); // new data frame inside a fragmented message
            v
        },
    ];
    for bytes in cases {
        let (mut s, _c) = pair();
        assert_eq!(closed_code(&feed(&mut s, &bytes)), Some((1002, false)), "{bytes:?}");
    }
}

#[test]
fn oversize_frame_and_message_are_1009() {
    let config = WsConfig { max_frame_size: 100, max_message_size: 250, ..WsConfig::default() };
    let (mut s, _c) = pair_with(usize::MAX, config, &[], &["default"]);
    // Only the header of a huge frame is needed to refuse it.
    let hdr = &raw(true, 2, &[0; 101], M)[..8];
    let ev = feed(&mut s, hdr);
    assert_eq!(closed_code(&ev), Some((1009, false)));
    assert_eq!(first_frame(s.outgoing()).1[..2], 1009u16.to_be_bytes());

    let (mut s, _c) = pair_with(usize::MAX, config, &[], &["default"]);
    let mut bytes = Vec::new();
    bytes.extend(raw(false, 2, &[0; 100], M));
    bytes.extend(raw(false, 0, &[0; 100], M));
    bytes.extend(raw(true, 0, &[0; 100], M));
    assert_eq!(closed_code(&feed(&mut s, &bytes)), Some((1009, false)));

    // A declared 2^63 length must not allocate or panic.
    let (mut s, _c) = pair();
    let mut v = vec![0x82, 0xff];
    v.extend_from_slice(&(1u64 << 62).to_be_bytes());
    v.extend_from_slice(&[1, 2, 3, 4]);
    assert_eq!(closed_code(&feed(&mut s, &v)), Some((1009, false)));
}

#[test]
fn invalid_utf8_text_is_1007() {
    let (mut s, _c) = pair();
    assert_eq!(closed_code(&feed(&mut s, &raw(true, 1, &[0x68, 0xff], M))), Some((1007, false)));
    assert_eq!(first_frame(s.outgoing()).1[..2], 1007u16.to_be_bytes());
    // Split inside a code point is fine; an invalid continuation fails.
    let (mut s, _c) = pair();
    let mut bytes = raw(false, 1, &[0xc3], M);
    bytes.extend(raw(true, 0, &[0xa9], M));
    assert_eq!(feed(&mut s, &bytes), vec![msg(Opcode::Text, "é".as_bytes())]);
    let mut bytes = raw(false, 1, &[0xc3], M);
    bytes.extend(raw(true, 0, &[0x28], M));
    assert_eq!(closed_code(&feed(&mut s, &bytes)), Some((1007, false)));
}

#[test]
fn backpressure_bound() {
    let config = WsConfig { max_outgoing_buffer: 10_000, ..WsConfig::default() };
    let (mut s, mut c) = pair_with(usize::MAX, config, &[], &["default"]);
    let chunk = [1u8; 1000];
    let mut sent = 0;
    let err = loop {
        match s.send(Opcode::Binary, &chunk) {
            Ok(()) => sent += 1,
            Err(e) => break e,
        }
        assert!(sent < 100, "never pushed back");
    };
    assert!(matches!(err, Error::Backpressure { limit: 10_000, .. }), "{err}");
    assert!(s.outgoing_len() <= 10_000);
    assert_eq!(sent, 9);
    // A single large message is accepted into an empty queue.
    let n = s.outgoing_len();
    s.consume_outgoing(n);
    s.send(Opcode::Binary, &[0u8; 50_000]).unwrap();
    assert!(s.send(Opcode::Binary, b"x").is_err());
    // The same for clients.
    for _ in 0..9 {
        c.send(Opcode::Binary, &chunk).unwrap();
    }
    assert!(matches!(c.send(Opcode::Binary, &chunk), Err(Error::Backpressure { .. })));
}

#[test]
fn ping_flood_without_reading_pauses_input() {
    let config = WsConfig { max_outgoing_buffer: 1000, ..WsConfig::default() };
    let (mut s, _c) = pair_with(usize::MAX, config, &[], &["default"]);
    let mut flood = Vec::new();
    for _ in 0..1000 {
        flood.extend(raw(true, 9, &[0; 100], M));
    }
    s.handle_bytes(&flood);
    assert_eq!(s.poll_event(), None);
    assert!(s.outgoing_len() <= 2000 + 200, "{}", s.outgoing_len());
    assert!(s.incoming_len() > 0);
    // Once the driver flushes, processing resumes.
    while s.incoming_len() > 0 {
        let n = s.outgoing_len();
        s.consume_outgoing(n);
        assert_eq!(s.poll_event(), None);
    }
    assert!(!s.is_closed());
}

// ---------------------------------------------------------------------------------------------
// Upgrade: server side.

#[test]
fn upgrade_rejections() {
    let ok = String::from_utf8(request("")).unwrap();
    let cases: Vec<(String, u16, &str)> = vec![
        (ok.replacen("GET", "POST", 1), 405, "method"),
        (ok.replacen("HTTP/1.1", "HTTP/1.0", 1), 400, "HTTP/1.1"),
        (ok.replace("Host: localhost:9000\r\n", ""), 400, "Host"),
        (ok.replace("Upgrade: websocket\r\n", ""), 426, "Upgrade"),
        (ok.replace("Upgrade: websocket", "Upgrade: h2c"), 426, "Upgrade"),
        (ok.replace("keep-alive, Upgrade", "keep-alive"), 400, "Connection"),
        (ok.replace("Version: 13", "Version: 8"), 426, "Version"),
        (ok.replace("Sec-WebSocket-Version: 13\r\n", ""), 426, "Version"),
        (ok.replace("Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n", ""), 400, "missing Sec-WebSocket-Key"),
        (ok.replace("dGhlIHNhbXBsZSBub25jZQ==", "dGhlIHNhbXBsZQ=="), 400, "invalid Sec-WebSocket-Key"),
        (
            ok.replace("dGhlIHNhbXBsZSBub25jZQ==", "not base64 at all!!!!!!!"),
            400,
            "invalid Sec-WebSocket-Key",
        ),
        (
            ok.replace(
                "Sec-WebSocket-Version",
                "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version",
            ),
            400,
            "more than one",
        ),
        (ok.replacen("/chat?room=1", "chat", 1), 400, "target"),
        ("GARBAGE\x01\r\n\r\n".to_string(), 400, "malformed"),
        ("GET / HTTP/1.1\r\nBad Header\r\n\r\n".to_string(), 400, "malformed"),
    ];
    for (req, status, needle) in cases {
        let r = reject(req.as_bytes());
        assert_eq!(r.status, status, "{req:?}: {}", r.reason);
        assert!(r.reason.contains(needle), "{:?} lacks {needle:?}", r.reason);
        let resp = String::from_utf8(r.response).unwrap();
        assert!(resp.starts_with(&format!("HTTP/1.1 {status} ")), "{resp}");
        assert!(resp.contains("Connection: close\r\n"));
        if status == 426 {
            assert!(resp.contains("Sec-WebSocket-Version: 13\r\n"));
        }
    }
    // Too many headers.
    let many: String = (0..70).map(|i| format!("X-{i}: y\r\n")).collect();
    assert_eq!(reject(&request(&many)).status, 431);
    // Too large.
    let big = format!("X-Big: {}\r\n", "a".repeat(9000));
    assert_eq!(reject(&request(&big)).status, 431);
}

#[test]
fn slow_partial_upgrade_stays_bounded() {
    let mut hs = ServerHandshake::default();
    let header = b"GET / HTTP/1.1\r\nX-Slow: ";
    let mut fed = 0;
    let mut result = None;
    for &b in header.iter().chain(std::iter::repeat(&b'a')) {
        fed += 1;
        match hs.handle_bytes(&[b], |_| true, None) {
            ServerUpgrade::Incomplete => assert!(hs.buffered() <= DEFAULT_MAX),
            other => {
                result = Some(other);
                break;
            }
        }
        assert!(fed < 100_000);
    }
    match result {
        Some(ServerUpgrade::Reject(r)) => assert_eq!(r.status, 431),
        other => panic!("{other:?}"),
    }
    assert!(fed <= DEFAULT_MAX + 1);
    assert!(hs.is_finished());
    assert_eq!(hs.buffered(), 0);
    assert!(matches!(hs.handle_bytes(b"\r\n\r\n", |_| true, None), ServerUpgrade::Incomplete));
}

const DEFAULT_MAX: usize = upgrade::DEFAULT_MAX_HEAD_BYTES;

#[test]
fn protocol_selection_rules() {
    let offer = |list: &str, names: &[&str]| {
        let extra =
            if list.is_empty() { String::new() } else { format!("Sec-WebSocket-Protocol: {list}\r\n") };
        server_accept(&request(&extra), names)
            .map(|a| (a.protocol.clone(), a.handler.clone(), String::from_utf8(a.response.clone()).unwrap()))
    };
    // First offered name that is a handler wins and is echoed.
    let (p, h, resp) = offer("foo, chat, echo", &["echo", "chat", "default"]).unwrap();
    assert_eq!((p.as_deref(), h.as_str()), (Some("chat"), "chat"));
    assert!(resp.contains("Sec-WebSocket-Protocol: chat\r\n"));
    // An explicit "default" is echoed.
    let (p, h, _) = offer("default", &["default"]).unwrap();
    assert_eq!((p.as_deref(), h.as_str()), (Some("default"), "default"));
    // No match → default handler, no protocol header.
    let (p, h, resp) = offer("foo,bar", &["chat", "default"]).unwrap();
    assert_eq!((p, h.as_str()), (None, "default"));
    assert!(!resp.contains("Sec-WebSocket-Protocol"));
    // Absent header → default.
    assert_eq!(offer("", &["default"]).unwrap().1, "default");
    // Several header lines form one list.
    let req = request("Sec-WebSocket-Protocol: a\r\nSec-WebSocket-Protocol: b, chat\r\n");
    assert_eq!(server_accept(&req, &["chat"]).unwrap().handler, "chat");
    // No match and no default → refused.
    let r = offer("foo", &["chat"]).unwrap_err();
    assert_eq!(r.status, 400);
    assert!(r.reason.contains("foo"));
    assert_eq!(offer("", &["chat"]).unwrap_err().status, 400);
}

#[test]
fn upgrade_details_and_leftover() {
    let mut req = request("");
    req.extend_from_slice(&raw(true, 1, b"early", M));
    let a = server_accept(&req, &["default"]).unwrap();
    assert_eq!(a.leftover, raw(true, 1, b"early", M));
    let resp = String::from_utf8(a.response.clone()).unwrap();
    assert!(resp.starts_with("HTTP/1.1 101 Switching Protocols\r\n"));
    assert!(resp.contains("Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n"));
    assert!(resp.ends_with("\r\n\r\n"));
    let mut s = WsConn::new(Role::Server, WsConfig::default(), &a.leftover, None);
    assert_eq!(s.poll_event(), Some(msg(Opcode::Text, b"early")));
    // Case-insensitive header names and values; absolute-form target; bare LF line ends.
    let lf = "GET ws://h/p?q HTTP/1.1\nhost: h\nUPGRADE: WebSocket\nconnection: UPGRADE\n\
              sec-websocket-key: dGhlIHNhbXBsZSBub25jZQ==\nsec-websocket-version: 13\n\n";
    let a = server_accept(lf.as_bytes(), &["default"]).unwrap();
    assert_eq!((a.path.as_str(), a.query.as_deref()), ("/p", Some("q")));
}

// ---------------------------------------------------------------------------------------------
// Upgrade: client side.

fn client_for(protocols: &[&str]) -> (ClientHandshake, Vec<u8>) {
    let url = WsUrl::parse("ws://[::1]:9000/x").unwrap();
    ClientHandshake::new(&url, protocols, KEY, None).unwrap()
}

fn response_for(req: &[u8], names: &[&str]) -> Vec<u8> {
    server_accept(req, names).unwrap().response
}

#[test]
fn client_request_shape() {
    let (_, req) = client_for(&["chat", "echo"]);
    let req = String::from_utf8(req).unwrap();
    assert!(req.starts_with("GET /x HTTP/1.1\r\nHost: [::1]:9000\r\n"), "{req}");
    assert!(req.contains("Sec-WebSocket-Key: MDEyMzQ1Njc4OWFiY2RlZg==\r\n"));
    assert!(req.contains("Sec-WebSocket-Protocol: chat, echo\r\n"));
    assert!(req.contains("Sec-WebSocket-Version: 13\r\n"));
    let url = WsUrl::parse("ws://h/").unwrap();
    assert!(ClientHandshake::new(&url, &["bad name"], KEY, None).is_err());
    assert!(ClientHandshake::new(&url, &[""], KEY, None).is_err());
}

#[test]
fn client_response_validation() {
    let (mut ch, req) = client_for(&["chat"]);
    let mut resp = response_for(&req, &["chat"]);
    resp.extend_from_slice(&[0x81, 0x02, b'h', b'i']);
    let mut up = None;
    for b in &resp {
        if let Some(u) = ch.handle_bytes(&[*b]).unwrap() {
            up = Some(u);
        }
    }
    // The leftover starts right after the head (only the byte that completed it is fed).
    let up = up.unwrap();
    assert_eq!(up.protocol.as_deref(), Some("chat"));
    assert!(up.leftover.is_empty());
    // In one chunk, the frame is leftover.
    let (mut ch, req) = client_for(&["chat"]);
    let up = ch.handle_bytes(&resp).unwrap().unwrap();
    assert_eq!(up.leftover, [0x81, 0x02, b'h', b'i']);

    let good = String::from_utf8(response_for(&client_for(&["chat"]).1, &["chat"])).unwrap();
    let _ = req;
    let bad: Vec<(String, &str)> = vec![
        ("HTTP/1.1 403 Forbidden\r\nContent-Length: 0\r\n\r\n".into(), "HTTP 403 Forbidden"),
        (good.replace("Sec-WebSocket-Accept: ", "Sec-WebSocket-Accept: x"), "Accept"),
        (good.replace("Upgrade: websocket\r\n", ""), "Upgrade"),
        (good.replace("Connection: Upgrade\r\n", ""), "Connection"),
        (good.replace("Protocol: chat", "Protocol: other"), "did not offer"),
        (good.replace("\r\n\r\n", "\r\nSec-WebSocket-Extensions: permessage-deflate\r\n\r\n"), "extension"),
        ("HTTP/1.1 101 OK\r\n\x01\r\n\r\n".into(), "malformed"),
    ];
    for (resp, needle) in bad {
        let (mut ch, _) = client_for(&["chat"]);
        match ch.handle_bytes(resp.as_bytes()) {
            Err(Error::Handshake(m)) => assert!(m.contains(needle), "{m:?} lacks {needle:?}"),
            other => panic!("{resp:?}: {other:?}"),
        }
    }
    // Oversized response head.
    let (mut ch, _) = client_for(&[]);
    let mut n = 0;
    let err = loop {
        match ch.handle_bytes(&[b'a'; 100]) {
            Ok(None) => n += 1,
            Ok(Some(_)) => panic!(),
            Err(e) => break e,
        }
        assert!(n < 200);
    };
    assert!(err.to_string().contains("too large"));
}

// ---------------------------------------------------------------------------------------------
// Over TLS.

#[test]
fn wss_end_to_end_one_byte_at_a_time() {
    use crate::proto::tls::tests::{pump, test_client_config, test_server_config};
    use crate::proto::tls::Tls;
    let mut ct = Tls::client(test_client_config(), "localhost").unwrap();
    let mut st = Tls::server(test_server_config()).unwrap();
    // The client can queue its upgrade request before the handshake completes.
    let url = WsUrl::parse("wss://localhost:9443/secure").unwrap();
    let (mut ch, req) = ClientHandshake::new(&url, &["chat"], KEY, None).unwrap();
    ct.write_plaintext(&req).unwrap();
    pump(&mut ct, &mut st, 1).unwrap();

    let mut plain = Vec::new();
    st.read_plaintext(&mut plain);
    let a = server_accept(&plain, &["chat"]).unwrap();
    assert_eq!(a.path, "/secure");
    st.write_plaintext(&a.response).unwrap();
    let mut server = WsConn::new(Role::Server, WsConfig::default(), &a.leftover, None);
    server.send(Opcode::Text, b"welcome").unwrap();
    let mut out = Vec::new();
    server.take_outgoing(&mut out);
    st.write_plaintext(&out).unwrap();
    pump(&mut ct, &mut st, 1).unwrap();

    let mut plain = Vec::new();
    ct.read_plaintext(&mut plain);
    let up = ch.handle_bytes(&plain).unwrap().unwrap();
    assert_eq!(up.protocol.as_deref(), Some("chat"));
    let mut client = WsConn::new(Role::Client, WsConfig::default(), &up.leftover, None);
    assert_eq!(client.poll_event(), Some(msg(Opcode::Text, b"welcome")));

    // Close over TLS, then close_notify.
    client.close(1000, "done").unwrap();
    let mut out = Vec::new();
    client.take_outgoing(&mut out);
    ct.write_plaintext(&out).unwrap();
    ct.send_close_notify();
    pump(&mut ct, &mut st, 3).unwrap();
    let mut plain = Vec::new();
    st.read_plaintext(&mut plain);
    assert_eq!(
        feed(&mut server, &plain),
        vec![WsEvent::Closed { code: 1000, reason: "done".into(), clean: true }]
    );
    assert!(st.peer_closed());
}

// ---------------------------------------------------------------------------------------------
// Fuzz entry points smoke test.

#[test]
fn fuzz_entry_points_accept_junk() {
    let mut seed = 0x1234_5678u32;
    for len in 0..300 {
        let v: Vec<u8> = (0..len)
            .map(|_| {
                seed ^= seed << 13;
                seed ^= seed >> 17;
                seed ^= seed << 5;
                seed as u8
            })
            .collect();
        fuzzing::upgrade(&v);
        fuzzing::connection(&v);
    }
}

// ---------------------------------------------------------------------------------------------
// permessage-deflate through the whole stack.

fn deflate_pair(config: &DeflateConfig) -> (WsConn, WsConn) {
    pair_deflate(7, WsConfig::default(), &[], &["default"], Some(config))
}

#[test]
fn deflate_messages_both_ways_smaller_on_the_wire() {
    for takeover in [true, false] {
        let cfg = DeflateConfig { context_takeover: takeover, ..DeflateConfig::default() };
        let (mut s, mut c) = deflate_pair(&cfg);
        let text = "{\"player\":\"x\",\"pos\":[1,2,3],\"hp\":100}".repeat(30);
        for round in 0..3 {
            c.send(Opcode::Text, text.as_bytes()).unwrap();
            let wire = c.outgoing_len();
            assert!(wire < text.len() / 4, "round {round}: {wire} bytes for {}", text.len());
            let got = transfer(&mut c, &mut s, 5);
            assert_eq!(got, vec![WsEvent::Message { opcode: Opcode::Text, data: text.clone().into() }]);
            s.send(Opcode::Binary, text.as_bytes()).unwrap();
            assert!(s.outgoing_len() < text.len() / 4);
            let got = transfer(&mut s, &mut c, 3);
            assert_eq!(got, vec![WsEvent::Message { opcode: Opcode::Binary, data: text.clone().into() }]);
        }
        // Short messages go as they are; ping and close work as ever.
        c.send(Opcode::Text, b"hi").unwrap();
        assert_eq!(c.outgoing_len(), 2 + 4 + 2);
        assert_eq!(
            transfer(&mut c, &mut s, 1),
            vec![WsEvent::Message { opcode: Opcode::Text, data: "hi".into() }]
        );
        c.close(1000, "bye").unwrap();
        assert!(matches!(
            transfer(&mut c, &mut s, 2).as_slice(),
            [WsEvent::Closed { code: 1000, clean: true, .. }]
        ));
        assert!(matches!(
            transfer(&mut s, &mut c, 2).as_slice(),
            [WsEvent::Closed { code: 1000, clean: true, .. }]
        ));
    }
}

#[test]
fn deflate_large_message_and_limits() {
    let (mut s, mut c) = deflate_pair(&DeflateConfig::default());
    // 8 MiB of varied bytes, fed in 64 KiB pieces: inflated in pieces, reassembled whole.
    let big: Vec<u8> = (0..8u32 << 20).map(|i| (i.wrapping_mul(2654435761) >> 13) as u8 % 16).collect();
    c.send(Opcode::Binary, &big).unwrap();
    let got = transfer(&mut c, &mut s, 64 << 10);
    assert_eq!(got.len(), 1);
    assert!(matches!(&got[0], WsEvent::Message { data, .. } if data[..] == big[..]));
    // A message over the server's limit once inflated: 1009, with little read.
    let small = WsConfig { max_message_size: 1 << 20, max_frame_size: 1 << 20, ..WsConfig::default() };
    let (mut s, mut c) = pair_deflate(usize::MAX, small, &[], &["default"], Some(&DeflateConfig::default()));
    c.send(Opcode::Binary, &vec![0u8; 4 << 20]).unwrap();
    let got = transfer(&mut c, &mut s, usize::MAX);
    assert!(matches!(got.as_slice(), [WsEvent::Closed { code: 1009, clean: false, .. }]), "{got:?}");
}

#[test]
fn deflate_declined_or_not_offered() {
    // The server allows it, the client does not offer it: plain connection.
    let url = WsUrl::parse("ws://localhost:9000/").unwrap();
    let (_, req) = ClientHandshake::new(&url, &[], KEY, None).unwrap();
    let mut sh = ServerHandshake::default();
    let cfg = DeflateConfig::default();
    let ServerUpgrade::Accept(a) = sh.handle_bytes(&req, handlers(&["default"]), Some((&cfg, true))) else {
        panic!("not accepted")
    };
    assert!(a.deflate.is_none());
    assert!(!String::from_utf8_lossy(&a.response).contains("Extensions"));
    // The client offers, the server does not allow it: the client runs without.
    let (mut ch, req) = ClientHandshake::new(&url, &[], KEY, Some(&cfg)).unwrap();
    assert!(String::from_utf8_lossy(&req)
        .contains("Sec-WebSocket-Extensions: permessage-deflate; client_max_window_bits\r\n"));
    let ServerUpgrade::Accept(a) =
        ServerHandshake::default().handle_bytes(&req, handlers(&["default"]), None)
    else {
        panic!("not accepted")
    };
    let up = ch.handle_bytes(&a.response).unwrap().unwrap();
    assert!(a.deflate.is_none() && up.deflate.is_none());
    // A compressed frame on a connection without deflate: 1002.
    let mut s = WsConn::new(Role::Server, WsConfig::default(), &[], None);
    let events = feed(&mut s, &[0xc1, 0x80, 1, 2, 3, 4]);
    assert!(matches!(events.as_slice(), [WsEvent::Closed { code: 1002, .. }]), "{events:?}");
}

/// A server connection that agreed on permessage-deflate (takeover both ways) with no upgrade.
fn deflate_server(config: WsConfig) -> WsConn {
    let agreed =
        Agreed { level: 1, threshold: 0, send_window_bits: 15, send_takeover: true, recv_takeover: true };
    WsConn::new(Role::Server, config, &[], Some(agreed))
}

/// A client's frame: masked, RSV bits as given (bit 0x40 = RSV1).
fn rsv_frame(fin: bool, rsv: u8, opcode: u8, payload: &[u8]) -> Vec<u8> {
    let mut f = raw(fin, opcode, payload, M);
    f[0] |= rsv;
    f
}

/// `data` deflated as one message of a stream (sync flush, tail taken off).
fn deflated(z: &mut flate2::Compress, data: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(data.len() + 64);
    z.compress_vec(data, &mut out, flate2::FlushCompress::Sync).unwrap();
    out.truncate(out.len() - 4);
    out
}

fn raw_deflater() -> flate2::Compress {
    flate2::Compress::new(flate2::Compression::new(6), false)
}

#[test]
fn deflate_frame_rules_hold_inside_compressed_messages() {
    let mut z = raw_deflater();
    // A plain data frame while a compressed message is open (its first frame empty): 1002.
    let mut s = deflate_server(WsConfig::default());
    let mut wire = rsv_frame(false, 0x40, 1, b"");
    wire.extend(raw(true, 1, b"hi", M));
    wire.extend(raw(true, 0, &deflated(&mut z, b"x"), M));
    let events = feed(&mut s, &wire);
    assert!(matches!(events.as_slice(), [WsEvent::Closed { code: 1002, .. }]), "{events:?}");
    // RSV2 beside RSV1: 1002.
    let mut s = deflate_server(WsConfig::default());
    let events = feed(&mut s, &rsv_frame(true, 0x60, 1, &deflated(&mut raw_deflater(), b"abc")));
    assert!(matches!(events.as_slice(), [WsEvent::Closed { code: 1002, .. }]), "{events:?}");
    // An empty compressed payload is an empty message and leaves the context as it was.
    let mut s = deflate_server(WsConfig::default());
    let mut z = raw_deflater();
    let mut wire = rsv_frame(true, 0x40, 1, &deflated(&mut z, b"first first"));
    wire.extend(rsv_frame(true, 0x40, 2, b""));
    wire.extend(rsv_frame(true, 0x40, 1, &deflated(&mut z, b"first again")));
    let texts: Vec<_> = feed(&mut s, &wire)
        .into_iter()
        .map(|e| match e {
            WsEvent::Message { data, .. } => data.to_vec(),
            other => panic!("{other:?}"),
        })
        .collect();
    assert_eq!(texts, [b"first first".to_vec(), Vec::new(), b"first again".to_vec()]);
    // Garbage, then the peer leaves: the inflater's 1007 is what is reported, not 1006.
    let mut s = deflate_server(WsConfig::default());
    s.handle_bytes(&rsv_frame(true, 0x40, 1, &[0xff; 20]));
    s.handle_eof();
    let events: Vec<_> = std::iter::from_fn(|| s.poll_event()).collect();
    assert!(matches!(events.as_slice(), [WsEvent::Closed { code: 1007, .. }]), "{events:?}");
}

#[test]
fn deflate_bombs_in_one_read_wait_for_the_reader() {
    // 20 messages that each inflate to 900 KiB, ~1 KiB each on the wire, in one read: the
    // inflater hands on about one at a time, as tungstenite reads them.
    let config = WsConfig { max_message_size: 1 << 20, max_frame_size: 1 << 20, ..WsConfig::default() };
    let mut s = deflate_server(config);
    let mut z = raw_deflater();
    let wire: Vec<u8> =
        (0..20).flat_map(|_| rsv_frame(true, 0x40, 2, &deflated(&mut z, &[0; 900 << 10]))).collect();
    assert!(wire.len() < 64 << 10, "{}", wire.len());
    s.handle_bytes(&wire);
    let mut peak = s.incoming_len();
    let mut messages = 0;
    while let Some(event) = s.poll_event() {
        assert!(matches!(&event, WsEvent::Message { data, .. } if data.len() == 900 << 10), "{event:?}");
        messages += 1;
        peak = peak.max(s.incoming_len());
    }
    assert_eq!(messages, 20);
    assert!(peak < 2 << 20, "{peak} bytes waited inflated at once");
    assert!(!s.is_closed());
}

#[test]
fn deflate_context_counts_until_the_connection_goes() {
    let contexts = Contexts::new(1);
    let mut s = deflate_server(WsConfig::default());
    s.keep_context(contexts.take());
    assert!(!contexts.available());
    drop(s);
    assert!(contexts.available() && contexts.used() == 0);
}

#[test]
fn trim_keeps_frames_the_reader_holds() {
    // One read of the reader takes the big frame and the small ones behind it; trimming after
    // the first message (not at WouldBlock) must not drop the others.
    let mut s = WsConn::new(Role::Server, WsConfig::default(), &[], None);
    let mut wire = raw(true, 2, &[7; 600], M);
    for m in [b"a", b"b", b"c"] {
        wire.extend(raw(true, 1, m, M));
    }
    s.handle_bytes(&wire);
    assert!(matches!(s.poll_event(), Some(WsEvent::Message { data, .. }) if data.len() == 600));
    s.trim();
    let rest: Vec<_> = std::iter::from_fn(|| s.poll_event()).collect();
    assert_eq!(rest.len(), 3, "{rest:?}");
}
