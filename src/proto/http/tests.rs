use std::time::{Duration, Instant};

use super::server::{BodyRead, HttpLimits, HttpServerConn, Response};
use crate::proto::stream::{Flow, StreamProtocol};

const DATE: &str = "Tue, 01 Dec 2026 21:00:00 GMT";

fn conn() -> (HttpServerConn, Instant) {
    let now = Instant::now();
    (HttpServerConn::new(HttpLimits::default(), now), now)
}

/// A connection that received `bytes`, one request, taken by the layer above.
fn answering(bytes: &[u8]) -> (HttpServerConn, Instant) {
    let (mut c, now) = conn();
    c.handle_bytes(now, bytes);
    c.take_request().expect("one complete request");
    (c, now)
}

/// Everything queued for the peer, as text, taken by it (at `Instant::now()`).
fn sent(c: &mut HttpServerConn) -> String {
    sent_at(c, Instant::now())
}

/// Everything queued for the peer, as text, taken by it at `now`.
fn sent_at(c: &mut HttpServerConn, now: Instant) -> String {
    let out = String::from_utf8_lossy(c.outgoing()).into_owned();
    c.consume_outgoing(now, out.len());
    out
}

fn ok(c: &mut HttpServerConn, now: Instant, body: &str) {
    c.respond(
        now,
        Response {
            status: 200,
            headers: &[(b"content-type", b"text/plain")],
            body: body.as_bytes(),
            date: DATE,
        },
    )
    .unwrap();
}

/// The status a connection answers `bytes` with, and whether it closes once the client does
/// (it lingers until then, dropping what still comes).
fn refused(bytes: &[u8]) -> (u16, Flow) {
    let (mut c, now) = conn();
    c.handle_bytes(now, bytes);
    assert!(c.take_request().is_none(), "no request reaches the layer above");
    let out = sent(&mut c);
    let status = out.get(9..12).and_then(|s| s.parse().ok()).unwrap_or(0);
    assert!(out.contains("connection: close\r\n"), "{out}");
    assert!(c.flow() == Flow::Open && c.wants_input(), "lingers, reading");
    c.handle_bytes(now, b"GET /more HTTP/1.1\r\nHost: h\r\n\r\n the rest of a refused body");
    assert!(c.take_request().is_none() && c.outgoing().is_empty(), "what comes after is dropped");
    c.handle_eof(now);
    (status, c.flow())
}

#[test]
fn a_refusal_lingers_a_while_then_closes() {
    let (mut c, now) = conn();
    c.handle_bytes(now, b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 99999999999\r\n\r\nxx");
    assert_eq!(
        c.poll_timeout(),
        Some(now + HttpLimits::default().send_timeout),
        "the refusal is timed while it goes out"
    );
    let later = now + Duration::from_millis(10);
    sent_at(&mut c, later);
    assert_eq!(c.flow(), Flow::Open);
    assert_eq!(c.poll_timeout(), Some(later + Duration::from_secs(2)));
    c.handle_timeout(later + Duration::from_secs(2));
    assert_eq!((c.flow(), c.close_reason()), (Flow::Finish, "parse_error"));
}

#[test]
fn get_and_keep_alive_response() {
    let (mut c, now) = conn();
    c.handle_bytes(now, b"GET /a/b?x=1&y=%20 HTTP/1.1\r\nHost: h\r\nX-Two: 1\r\nx-two: 2\r\n\r\n");
    assert!(c.take_news());
    let r = c.take_request().unwrap();
    assert_eq!((r.method.as_str(), r.path.as_str(), r.query.as_str()), ("GET", "/a/b", "x=1&y=%20"));
    assert_eq!(r.headers.iter().filter(|(n, _)| n == "x-two").count(), 2);
    assert_eq!(r.header("host"), Some("h"));
    assert!(c.awaits_response());
    ok(&mut c, now, "hello");
    assert_eq!(
        sent(&mut c),
        format!(
            "HTTP/1.1 200 OK\r\ndate: {DATE}\r\ncontent-type: text/plain\r\ncontent-length: 5\r\n\r\nhello"
        )
    );
    assert_eq!(c.flow(), Flow::Open, "HTTP/1.1 keeps the connection");
    assert!(c.respond(now, Response { status: 200, headers: &[], body: b"", date: DATE }).is_err());
}

#[test]
fn pipelined_requests_are_answered_in_order() {
    let (mut c, now) = conn();
    c.handle_bytes(now, b"GET /1 HTTP/1.1\r\nHost: h\r\n\r\nPOST /2 HTTP/1.1\r\nHost: h\r\nContent-Length: 3\r\n\r\nabcGET /3 HT");
    assert_eq!(c.take_request().unwrap().path, "/1");
    assert!(c.take_request().is_none(), "one request at a time");
    ok(&mut c, now, "one");
    let r = c.take_request().unwrap();
    assert_eq!((r.path.as_str(), r.body.as_slice()), ("/2", &b"abc"[..]));
    ok(&mut c, now, "two");
    assert!(c.take_request().is_none());
    c.handle_bytes(now, b"TP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n");
    assert_eq!(c.take_request().unwrap().path, "/3");
    ok(&mut c, now, "three");
    let out = sent(&mut c);
    let bodies: Vec<&str> =
        out.split("\r\n\r\n").skip(1).map(|s| &s[..s.find("HTTP").unwrap_or(s.len())]).collect();
    assert_eq!(bodies, ["one", "two", "three"]);
    assert!(out.ends_with("connection: close\r\n\r\nthree"));
    assert_eq!(c.flow(), Flow::Finish, "Connection: close is honoured");
}

#[test]
fn chunked_bodies_byte_by_byte() {
    let (mut c, now) = conn();
    let bytes = b"POST /u HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n5;ext=1\r\nhello\r\n1\r\n \r\n5\r\nworld\r\n0\r\nTrailer: x\r\n\r\n";
    for b in bytes.iter() {
        assert!(c.take_request().is_none());
        c.handle_bytes(now, &[*b]);
    }
    assert_eq!(c.take_request().unwrap().body, b"hello world");
    assert_eq!(sent(&mut c), "", "nothing answered yet");
}

#[test]
fn http10_closes_unless_keep_alive_and_head_has_no_body() {
    let (mut c, now) = conn();
    c.handle_bytes(now, b"GET / HTTP/1.0\r\n\r\n");
    assert_eq!(c.take_request().unwrap().minor_version, 0);
    ok(&mut c, now, "x");
    assert!(sent(&mut c).contains("connection: close"));
    assert_eq!(c.flow(), Flow::Finish);

    let (mut c, now) = answering(b"HEAD / HTTP/1.0\r\nConnection: keep-alive\r\n\r\n");
    ok(&mut c, now, "12345");
    let out = sent(&mut c);
    assert!(
        out.ends_with("content-length: 5\r\nconnection: keep-alive\r\n\r\n"),
        "HEAD: the length, no body: {out}"
    );
    assert_eq!(c.flow(), Flow::Open);
}

#[test]
fn no_body_for_204_and_304() {
    for status in [204, 304] {
        let (mut c, now) = conn();
        c.handle_bytes(now, b"GET / HTTP/1.1\r\nHost: h\r\n\r\n");
        c.take_request().unwrap();
        c.respond(now, Response { status, headers: &[], body: b"ignored", date: DATE }).unwrap();
        let out = sent(&mut c);
        assert!(out.ends_with("\r\n\r\n") && !out.contains("content-length"), "{out}");
    }
}

#[test]
fn expect_100_continue() {
    let (mut c, now) = conn();
    c.handle_bytes(now, b"PUT /f HTTP/1.1\r\nHost: h\r\nExpect: 100-continue\r\nContent-Length: 2\r\n\r\n");
    assert_eq!(sent(&mut c), "HTTP/1.1 100 Continue\r\n\r\n");
    c.handle_bytes(now, b"ok");
    assert_eq!(c.take_request().unwrap().body, b"ok");
    assert_eq!(refused(b"PUT / HTTP/1.1\r\nHost: h\r\nExpect: magic\r\nContent-Length: 1\r\n\r\nx").0, 417);
}

#[test]
fn smuggling_shapes_are_refused() {
    let cases: &[(&[u8], u16)] = &[
        (b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n", 400),
        (b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\n", 400),
        (b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 3, 3\r\n\r\n", 400),
        (b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: +3\r\n\r\n", 400),
        (b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 99999999999999999999\r\n\r\n", 400),
        (b"POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: gzip\r\n\r\n", 400),
        (b"POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: gzip, chunked\r\n\r\n", 501),
        (b"POST / HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n", 400),
        (b"POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n", 400),
        (b"POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nabX", 400),
        (b"GET / HTTP/1.1\r\nHost: h\r\nX: a\r\n b\r\n\r\n", 400),
        (b"GET / HTTP/1.1\r\n\r\n", 400),
        (b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n", 400),
        (b"GET / HTTP/2.0\r\nHost: h\r\n\r\n", 505),
        (b"GET /\x01 HTTP/1.1\r\nHost: h\r\n\r\n", 400),
        (b"GET example.com HTTP/1.1\r\nHost: h\r\n\r\n", 400),
    ];
    for (bytes, status) in cases {
        assert_eq!(refused(bytes), (*status, Flow::Finish), "{}", String::from_utf8_lossy(bytes));
    }
}

#[test]
fn limits_have_their_codes() {
    let limits = HttpLimits::default();
    let long_target = format!("GET /{} HTTP/1.1\r\nHost: h\r\n\r\n", "a".repeat(limits.max_uri));
    assert_eq!(refused(long_target.as_bytes()).0, 414);
    let endless_line = format!("GET /{}", "a".repeat(limits.max_uri + 100));
    assert_eq!(refused(endless_line.as_bytes()).0, 414);
    let big_head = format!("GET / HTTP/1.1\r\nHost: h\r\nX: {}\r\n", "v".repeat(limits.max_header_size));
    assert_eq!(refused(big_head.as_bytes()).0, 431);
    let many = format!("GET / HTTP/1.1\r\nHost: h\r\n{}\r\n", "X: v\r\n".repeat(limits.max_headers));
    assert_eq!(refused(many.as_bytes()).0, 431);
    let big_body =
        format!("POST / HTTP/1.1\r\nHost: h\r\nContent-Length: {}\r\n\r\n", limits.max_body_size + 1);
    assert_eq!(refused(big_body.as_bytes()).0, 413);
    let big_chunk = format!(
        "POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n{:x}\r\n",
        limits.max_body_size + 1
    );
    assert_eq!(refused(big_chunk.as_bytes()).0, 413);
}

#[test]
fn a_pipelining_client_that_never_reads_is_held_by_flow_control() {
    let (mut c, now) = conn();
    let one = b"GET / HTTP/1.1\r\nHost: h\r\n\r\n";
    let mut fed = 0;
    while c.wants_input() && fed < 10_000 {
        c.handle_bytes(now, one);
        fed += 1;
    }
    assert!(fed < 1000, "reading stops while a request is unanswered ({fed} fed)");
    c.take_request().unwrap();
    let mut answered = 0;
    while c.awaits_response() {
        ok(&mut c, now, &"x".repeat((1 << 20) + 1));
        answered += 1;
        c.take_request();
    }
    assert_eq!(answered, 1, "the next request waits while an answer over the bound is queued");
    assert!(!c.wants_input(), "and reading pauses");
    c.consume_outgoing(now, usize::MAX);
    assert!(c.take_request().is_some(), "once it is out, the next request goes on");
    assert!(c.take_news());
}

#[test]
fn timeouts() {
    let limits = HttpLimits::default();
    // Idle keep-alive: closed quietly.
    let (mut c, now) = conn();
    assert_eq!(c.poll_timeout(), Some(now + limits.idle_timeout));
    c.handle_timeout(now + limits.idle_timeout);
    assert_eq!((sent(&mut c), c.flow()), (String::new(), Flow::Finish));
    // Slowloris: a head that never ends → 408.
    let (mut c, now) = conn();
    c.handle_bytes(now, b"GET / HTTP/1.1\r\n");
    let later = now + Duration::from_secs(1);
    c.handle_bytes(later, b"X-a: b\r\n");
    assert_eq!(c.poll_timeout(), Some(now + limits.head_timeout), "counted from the head's first byte");
    c.handle_timeout(now + limits.head_timeout);
    assert!(sent(&mut c).starts_with("HTTP/1.1 408 "));
    // A body that stalls → 408, counted from its last byte.
    let (mut c, now) = conn();
    c.handle_bytes(now, b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 10\r\n\r\nab");
    c.handle_bytes(later, b"cd");
    assert_eq!(c.poll_timeout(), Some(later + limits.body_timeout));
    c.handle_timeout(later + limits.body_timeout - Duration::from_millis(1));
    assert_eq!(c.flow(), Flow::Open, "not before its time");
    c.handle_timeout(later + limits.body_timeout);
    assert!(sent(&mut c).starts_with("HTTP/1.1 408 "));
    // No timeout while the layer above handles a request.
    let (mut c, now) = conn();
    c.handle_bytes(now, b"GET / HTTP/1.1\r\nHost: h\r\n\r\n");
    assert_eq!(c.poll_timeout(), None);
}

#[test]
fn half_closed_client_still_gets_its_answer() {
    let (mut c, now) = conn();
    c.handle_bytes(now, b"GET / HTTP/1.1\r\nHost: h\r\n\r\n");
    c.handle_eof(now);
    assert_eq!(c.flow(), Flow::Open);
    c.take_request().unwrap();
    ok(&mut c, now, "late");
    assert!(sent(&mut c).ends_with("late"));
    assert_eq!(c.flow(), Flow::Finish, "then it closes");
    // An unfinished request at end of stream is dropped.
    let (mut c, now) = conn();
    c.handle_bytes(now, b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 5\r\n\r\nab");
    c.handle_eof(now);
    assert!(c.take_request().is_none());
    assert_eq!(c.flow(), Flow::Finish);
}

#[test]
fn bad_responses_are_refused_and_the_request_can_still_be_answered() {
    let (mut c, now) = answering(b"GET / HTTP/1.1\r\nHost: h\r\n\r\n");
    let bad: [&[(&[u8], &[u8])]; 3] =
        [&[(b"x-a", b"1\r\nInjected: yes")], &[(b"bad name", b"1")], &[(b"", b"1")]];
    for headers in bad {
        assert!(c.respond(now, Response { status: 200, headers, body: b"", date: DATE }).is_err());
    }
    assert!(c.respond(now, Response { status: 101, headers: &[], body: b"", date: DATE }).is_err());
    assert_eq!(sent(&mut c), "");
    let headers: &[(&[u8], &[u8])] =
        &[(b"Content-Length", b"99"), (b"Date", b"yesterday"), (b"Connection", b"close")];
    c.respond(now, Response { status: 500, headers, body: b"oops", date: DATE }).unwrap();
    assert_eq!(
        sent(&mut c),
        "HTTP/1.1 500 Internal Server Error\r\nDate: yesterday\r\nConnection: close\r\ncontent-length: 4\r\n\r\noops"
    );
}

#[test]
fn absolute_and_asterisk_targets() {
    let (mut c, now) = conn();
    c.handle_bytes(now, b"GET http://example.com/p/q?z=1 HTTP/1.1\r\nHost: example.com\r\n\r\n");
    let r = c.take_request().unwrap();
    assert_eq!((r.path.as_str(), r.query.as_str()), ("/p/q", "z=1"));
    ok(&mut c, now, "");
    c.handle_bytes(now, b"OPTIONS * HTTP/1.1\r\nHost: h\r\n\r\n");
    assert_eq!(c.take_request().unwrap().path, "*");
}

#[test]
fn leading_empty_lines_between_requests_are_ignored() {
    let (mut c, now) = conn();
    c.handle_bytes(now, b"\r\nGET / HTTP/1.1\r\nHost: h\r\n\r\n");
    assert!(c.take_request().is_some());
}

#[test]
fn chunk_lines_are_read_strictly() {
    let head = "POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n";
    // A size that would overflow the limit check, an empty size line, a bare LF in an extension,
    // a CR inside one, a line that never ends.
    for body in [
        "1\r\na\r\nffffffffffffffff\r\n",
        "\r\n\r\n",
        "2;x\nAB\r\nxx\r\n0\r\n\r\n",
        "2;x\rq\r\nab\r\n",
        &"1".repeat(2000),
    ] {
        let (status, _) = refused(format!("{head}{body}").as_bytes());
        assert!(status == 400 || status == 413, "{body:?}: {status}");
    }
    assert_eq!(refused(format!("{head}ffffffffffffffff\r\n").as_bytes()).0, 413);
    // Only SP and HTAB are whitespace around a length or a coding.
    assert_eq!(refused("POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 3\u{a0}\r\n\r\nabc".as_bytes()).0, 400);
    assert_eq!(
        refused("POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\u{3000}\r\n\r\n".as_bytes()).0,
        400
    );
    let (mut c, now) = conn();
    c.handle_bytes(
        now,
        b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: \t3 \r\nTransfer-Encoding:\r\n\r\nabc",
    );
    assert!(c.take_request().is_none(), "an empty Transfer-Encoding is still one");
    let (mut c, now) = conn();
    c.handle_bytes(now, b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: \t3 \r\n\r\nabc");
    assert_eq!(c.take_request().unwrap().body, b"abc");
}

#[test]
fn absolute_form_keeps_the_path_as_sent_and_its_authority_is_the_host() {
    let (mut c, now) = conn();
    c.handle_bytes(now, b"GET http://evil/a/../admin%2f?q=1 HTTP/1.1\r\nHost: good\r\n\r\n");
    let r = c.take_request().unwrap();
    assert_eq!(
        (r.path.as_str(), r.query.as_str(), r.header("host")),
        ("/a/../admin%2f", "q=1", Some("evil"))
    );
    ok(&mut c, now, "");
    c.handle_bytes(now, b"GET HTTP://h?x HTTP/1.1\r\nHost: h\r\n\r\n");
    let r = c.take_request().unwrap();
    assert_eq!((r.path.as_str(), r.query.as_str()), ("/", "x"));
    for target in ["ftp://h/x", "http:///x", "http://u@h/x"] {
        assert_eq!(
            refused(format!("GET {target} HTTP/1.1\r\nHost: h\r\n\r\n").as_bytes()).0,
            400,
            "{target}"
        );
    }
}

#[test]
fn a_blank_line_after_a_body_is_not_a_slow_head() {
    let limits = HttpLimits::default();
    let (mut c, now) = answering(b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 1\r\n\r\nx\r\n");
    ok(&mut c, now, "");
    sent_at(&mut c, now);
    assert_eq!(c.poll_timeout(), Some(now + limits.idle_timeout), "idle, not a head in progress");
    c.handle_timeout(now + limits.head_timeout);
    assert_eq!((sent(&mut c), c.flow()), (String::new(), Flow::Open), "no unsolicited 408");
}

#[test]
fn a_reader_that_stops_is_cut_off_and_idle_time_starts_when_the_answer_is_out() {
    let limits = HttpLimits::default();
    let (mut c, now) = answering(b"GET / HTTP/1.1\r\nHost: h\r\n\r\n");
    ok(&mut c, now, &"x".repeat(100_000));
    assert_eq!(c.poll_timeout(), Some(now + limits.send_timeout), "the reader is timed while we send");
    // Progress moves it; a slow reader of a long answer keeps the connection.
    let later = now + limits.send_timeout - Duration::from_secs(1);
    c.consume_outgoing(later, 1000);
    assert_eq!(c.poll_timeout(), Some(later + limits.send_timeout));
    c.handle_timeout(later + limits.send_timeout);
    assert_eq!(c.flow(), Flow::Abort, "no progress for send_timeout: cut");
    // Once all is out, the keep-alive idle time counts from then.
    let (mut c, now) = answering(b"GET / HTTP/1.1\r\nHost: h\r\n\r\n");
    ok(&mut c, now, "x");
    let out_at = now + Duration::from_secs(50);
    sent_at(&mut c, out_at);
    assert_eq!(c.poll_timeout(), Some(out_at + limits.idle_timeout));
}

#[test]
fn http10_keep_alive_is_announced() {
    let (mut c, now) = answering(b"GET / HTTP/1.0\r\nConnection: keep-alive\r\n\r\n");
    ok(&mut c, now, "x");
    assert!(sent(&mut c).contains("connection: keep-alive\r\n"));
}

#[test]
fn head_may_say_the_length_a_get_would_get() {
    let (mut c, now) = answering(b"HEAD /big HTTP/1.1\r\nHost: h\r\n\r\n");
    let headers: &[(&[u8], &[u8])] = &[(b"Content-Length", b"1048576")];
    c.respond(now, Response { status: 200, headers, body: b"", date: DATE }).unwrap();
    let out = sent(&mut c);
    assert!(out.contains("content-length: 1048576\r\n") && !out.contains("Content-Length"), "{out}");
    // Elsewhere the length is always the body's.
    c.handle_bytes(now, b"GET /big HTTP/1.1\r\nHost: h\r\n\r\n");
    c.take_request().unwrap();
    c.respond(now, Response { status: 200, headers, body: b"abc", date: DATE }).unwrap();
    assert!(sent(&mut c).contains("content-length: 3\r\n"));
}

#[test]
fn an_end_of_stream_behind_a_large_answer_closes_once_it_is_out() {
    let (mut c, now) = answering(b"GET / HTTP/1.1\r\nHost: h\r\n\r\n");
    ok(&mut c, now, &"e".repeat((1 << 20) + 600));
    assert!(!c.wants_input(), "reading pauses behind the answer");
    c.handle_eof(now);
    assert_eq!(c.flow(), Flow::Open, "the answer is still going out");
    let later = now + Duration::from_secs(1);
    sent_at(&mut c, later);
    assert_eq!(c.flow(), Flow::Finish, "then the connection closes");
    // Draining nothing does not restart the idle clock.
    let (mut c, now) = conn();
    c.consume_outgoing(now + Duration::from_secs(30), 0);
    assert_eq!(c.poll_timeout(), Some(now + HttpLimits::default().idle_timeout));
}

fn streamed(c: &mut HttpServerConn, now: Instant, length: Option<u64>) {
    c.respond_streamed(now, Response { status: 200, headers: &[], body: b"ignored", date: DATE }, length)
        .unwrap();
}

#[test]
fn streamed_body_with_a_length_then_the_next_request() {
    let (mut c, now) = answering(b"GET /f HTTP/1.1\r\nHost: h\r\n\r\nGET /next HTTP/1.1\r\nHost: h\r\n\r\n");
    streamed(&mut c, now, Some(10));
    assert!(c.is_streaming() && c.wants_body() && !c.awaits_response());
    assert!(!c.has_request(), "the next request waits behind the streamed body");
    c.send_body(now, b"01234");
    c.send_body(now, b"56789 and more than announced");
    assert!(!c.is_streaming());
    assert_eq!(
        sent(&mut c),
        format!("HTTP/1.1 200 OK\r\ndate: {DATE}\r\ncontent-length: 10\r\n\r\n0123456789")
    );
    assert_eq!(c.take_request().map(|r| r.path), Some("/next".into()), "then the next request");
}

#[test]
fn streamed_body_without_a_length_is_chunked_or_close_delimited() {
    let (mut c, now) = answering(b"GET / HTTP/1.1\r\nHost: h\r\n\r\n");
    streamed(&mut c, now, None);
    c.send_body(now, b"hello");
    c.send_body(now, b"");
    c.end_body(now);
    let out = sent(&mut c);
    assert!(out.contains("transfer-encoding: chunked\r\n"), "{out}");
    assert!(out.ends_with("\r\n\r\n5\r\nhello\r\n0\r\n\r\n"), "{out}");
    assert_eq!(c.flow(), Flow::Open, "kept alive");

    let (mut old, now) = answering(b"GET / HTTP/1.0\r\nConnection: keep-alive\r\n\r\n");
    streamed(&mut old, now, None);
    old.send_body(now, b"raw");
    old.end_body(now);
    let out = sent(&mut old);
    assert!(out.contains("connection: close\r\n") && out.ends_with("\r\n\r\nraw"), "{out}");
    assert_eq!((old.flow(), old.close_reason()), (Flow::Finish, "response_sent"));
}

#[test]
fn streamed_body_ended_short_cuts_the_connection_and_head_sends_none() {
    let (mut c, now) = answering(b"GET / HTTP/1.1\r\nHost: h\r\n\r\n");
    streamed(&mut c, now, Some(100));
    c.send_body(now, b"partial");
    c.end_body(now);
    assert_eq!(c.flow(), Flow::Abort, "a body shorter than announced is never passed off as whole");

    let (mut h, now) = answering(b"HEAD / HTTP/1.1\r\nHost: h\r\n\r\n");
    streamed(&mut h, now, Some(100));
    assert!(!h.is_streaming(), "HEAD: the head is the whole answer");
    assert!(sent(&mut h).ends_with("content-length: 100\r\n\r\n"));
}

#[test]
fn a_reader_that_stalls_a_streamed_body_is_cut_off() {
    let (mut c, now) = answering(b"GET / HTTP/1.1\r\nHost: h\r\n\r\n");
    streamed(&mut c, now, Some(2 << 20));
    c.send_body(now, &[0; (1 << 20) + 1]);
    assert!(!c.wants_body(), "enough is queued");
    let late = now + HttpLimits::default().send_timeout + Duration::from_secs(1);
    assert_eq!(c.poll_timeout(), Some(now + HttpLimits::default().send_timeout));
    c.handle_timeout(late);
    assert_eq!((c.flow(), c.close_reason()), (Flow::Abort, "timeout"));
}

#[test]
fn close_reasons() {
    let (mut c, now) = conn();
    c.handle_eof(now);
    assert_eq!(c.close_reason(), "client_closed");
    let (mut c, now) = conn();
    c.handle_bytes(now, b"BAD\r\n\r\n");
    assert_eq!(c.close_reason(), "parse_error");
    let (mut c, now) = conn();
    c.handle_timeout(now + HttpLimits::default().idle_timeout);
    assert_eq!(c.close_reason(), "timeout");
    let (mut c, now) = answering(b"GET / HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n");
    ok(&mut c, now, "bye");
    assert_eq!(c.close_reason(), "response_sent");
    let (mut c, now) = conn();
    c.finish();
    c.handle_error(now, "reset");
    assert_eq!(c.close_reason(), "server_stopped", "the first reason counts");
}

#[test]
fn a_reader_that_stalls_behind_a_pipelined_request_is_cut_off_too() {
    let (mut c, now) = answering(b"GET /a HTTP/1.1\r\nHost: h\r\n\r\nGET /b HTTP/1.1\r\nHost: h\r\n\r\n");
    streamed(&mut c, now, Some(512 << 10));
    c.send_body(now, &[0; 512 << 10]);
    assert!(c.take_request().is_some(), "the next request is handled while the answer goes out");
    assert_eq!(
        c.poll_timeout(),
        Some(now + HttpLimits::default().send_timeout),
        "the stalled reader is timed"
    );
    c.handle_timeout(now + HttpLimits::default().send_timeout);
    assert_eq!((c.flow(), c.close_reason()), (Flow::Abort, "timeout"));
}

fn early() -> (HttpServerConn, Instant) {
    let now = Instant::now();
    (HttpServerConn::new(HttpLimits::default(), now).deliver_heads(), now)
}

#[test]
fn early_requests_come_with_a_body_that_came_with_their_head() {
    let (mut c, now) = early();
    c.handle_bytes(now, b"POST /a HTTP/1.1\r\nHost: h\r\nContent-Length: 2\r\n\r\nok");
    assert!(!c.body_pending());
    assert_eq!(c.take_request().unwrap().body, b"ok");
    assert_eq!(c.take_body(1), BodyRead::Data(Vec::new(), true), "nothing more to read");
}

#[test]
fn early_bodies_are_read_whole_when_asked_for() {
    let (mut c, now) = early();
    c.handle_bytes(now, b"POST /a HTTP/1.1\r\nHost: h\r\nContent-Length: 6\r\n\r\nab");
    let request = c.take_request().expect("handed over with its head");
    assert!(request.body.is_empty() && c.body_pending());
    assert_eq!(c.take_body(1), BodyRead::Waiting, "not asked for yet");
    c.read_body(now, 1, 100, false);
    c.handle_bytes(now, b"cd");
    assert_eq!(c.take_body(1), BodyRead::Waiting, "whole: not before the end");
    c.handle_bytes(now, b"efGET /next HTTP/1.1\r\nHost: h\r\n\r\n");
    assert_eq!(c.take_body(1), BodyRead::Data(b"abcdef".to_vec(), true));
    ok(&mut c, now, "done");
    assert_eq!(c.take_request().map(|r| r.path), Some("/next".into()), "then the next request");
}

#[test]
fn early_bodies_stream_with_backpressure() {
    let (mut c, now) = early();
    c.handle_bytes(now, b"PUT /a HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n");
    c.take_request().unwrap();
    c.read_body(now, 1, 1 << 30, true);
    c.handle_bytes(now, b"3\r\nabc\r\n");
    assert!(c.take_news());
    assert_eq!(c.take_body(1), BodyRead::Data(b"abc".to_vec(), false));
    assert_eq!(c.take_body(1), BodyRead::Waiting);
    // More than the read-ahead: the rest waits in the input, then reading pauses.
    let big = vec![b'x'; 200 << 10];
    let mut fed = format!("{:x}\r\n", big.len()).into_bytes();
    fed.extend_from_slice(&big);
    fed.extend_from_slice(b"\r\n0\r\n\r\n");
    let mut pos = 0;
    while c.wants_input() && pos < fed.len() {
        let end = (pos + (16 << 10)).min(fed.len());
        c.handle_bytes(now, &fed[pos..end]);
        pos = end;
    }
    assert!(pos < fed.len(), "the client is held by flow control, not our memory");
    let mut got = Vec::new();
    loop {
        match c.take_body(1) {
            BodyRead::Data(d, last) => {
                assert!(d.len() <= 64 << 10, "a piece is at most the read-ahead");
                got.extend_from_slice(&d);
                if last {
                    break;
                }
            }
            BodyRead::Waiting => {
                assert!(c.wants_input() && pos < fed.len(), "taking makes room; something is left to feed");
                let end = (pos + (16 << 10)).min(fed.len());
                c.handle_bytes(now, &fed[pos..end]);
                pos = end;
            }
            BodyRead::Failed(why) => panic!("{why}"),
        }
    }
    assert_eq!(got, big, "all of the body, in order");
    assert_eq!(pos, fed.len());
}

#[test]
fn early_continue_goes_out_when_the_body_is_asked_for() {
    let (mut c, now) = early();
    c.handle_bytes(now, b"PUT /f HTTP/1.1\r\nHost: h\r\nExpect: 100-continue\r\nContent-Length: 2\r\n\r\n");
    c.take_request().unwrap();
    assert_eq!(sent(&mut c), "", "not before the body is asked for");
    c.read_body(now, 1, 10, false);
    assert_eq!(sent(&mut c), "HTTP/1.1 100 Continue\r\n\r\n");
    c.handle_bytes(now, b"ok");
    assert_eq!(c.take_body(1), BodyRead::Data(b"ok".to_vec(), true));
}

#[test]
fn early_answer_without_the_body() {
    // The client waits for 100 Continue: it never sends the body, so the connection closes.
    let (mut c, now) = early();
    c.handle_bytes(now, b"PUT /f HTTP/1.1\r\nHost: h\r\nExpect: 100-continue\r\nContent-Length: 9\r\n\r\n");
    c.take_request().unwrap();
    ok(&mut c, now, "no thanks");
    let out = sent(&mut c);
    assert!(!out.contains("100 Continue") && out.contains("connection: close\r\n"), "{out}");
    assert_eq!(c.flow(), Flow::Finish);

    // A body on its way is read and dropped, then the next request is served.
    let (mut c, now) = early();
    c.handle_bytes(now, b"PUT /f HTTP/1.1\r\nHost: h\r\nContent-Length: 10\r\n\r\n01234");
    c.take_request().unwrap();
    ok(&mut c, now, "early");
    assert!(!sent(&mut c).contains("connection: close"));
    assert_eq!(c.take_body(1), BodyRead::Failed("answered"), "the body is no longer there to read");
    assert_eq!(c.poll_timeout(), Some(now + HttpLimits::default().body_timeout), "the rest is timed");
    c.handle_bytes(now, b"56789GET /next HTTP/1.1\r\nHost: h\r\n\r\n");
    assert_eq!(c.take_request().map(|r| r.path), Some("/next".into()));

    // Answered while the body is read piece by piece: the reader learns it is over.
    let (mut c, now) = early();
    c.handle_bytes(now, b"PUT /f HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n");
    c.take_request().unwrap();
    c.read_body(now, 1, 100, true);
    streamed(&mut c, now, None);
    assert_eq!(c.take_body(1), BodyRead::Failed("answered"));
    c.handle_bytes(now, b"2\r\nab\r\n0\r\n\r\n");
    c.end_body(now);
    c.handle_bytes(now, b"GET /next HTTP/1.1\r\nHost: h\r\n\r\n");
    assert_eq!(c.take_request().map(|r| r.path), Some("/next".into()));
}

#[test]
fn early_body_limits_timeouts_and_a_client_that_goes() {
    let (mut c, now) = early();
    c.handle_bytes(now, b"PUT /f HTTP/1.1\r\nHost: h\r\nContent-Length: 11\r\n\r\n");
    c.take_request().unwrap();
    c.read_body(now, 1, 10, false);
    assert!(sent(&mut c).starts_with("HTTP/1.1 413 "), "a length over the limit given");
    assert_eq!(c.take_body(1), BodyRead::Failed("too_large"));
    assert!(!c.awaits_response());

    let (mut c, now) = early();
    c.handle_bytes(now, b"PUT /f HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n");
    c.take_request().unwrap();
    c.read_body(now, 1, 10, true);
    c.handle_bytes(now, b"8\r\n12345678\r\n8\r\n");
    assert_eq!(c.take_body(1), BodyRead::Failed("too_large"), "chunks past the limit");
    assert!(sent(&mut c).starts_with("HTTP/1.1 413 "));

    let (mut c, now) = early();
    c.handle_bytes(now, b"PUT /f HTTP/1.1\r\nHost: h\r\nContent-Length: 5\r\n\r\n");
    c.take_request().unwrap();
    assert_eq!(c.poll_timeout(), None, "a body not asked for is not timed");
    let later = now + Duration::from_secs(100);
    c.read_body(later, 1, 10, false);
    let due = later + HttpLimits::default().body_timeout;
    assert_eq!(c.poll_timeout(), Some(due), "timed from when it was asked for");
    c.handle_timeout(due);
    assert_eq!(c.take_body(1), BodyRead::Failed("timeout"));
    assert!(sent(&mut c).starts_with("HTTP/1.1 408 "));

    let (mut c, now) = early();
    c.handle_bytes(now, b"PUT /f HTTP/1.1\r\nHost: h\r\nContent-Length: 5\r\n\r\nab");
    c.take_request().unwrap();
    c.read_body(now, 1, 10, true);
    assert_eq!(c.take_body(1), BodyRead::Data(b"ab".to_vec(), false));
    c.handle_eof(now);
    assert_eq!(c.take_body(1), BodyRead::Failed("client_closed"));
    ok(&mut c, now, "still answered");
    assert!(sent(&mut c).starts_with("HTTP/1.1 200 "));
}

#[test]
fn early_body_dropped_behind_a_streamed_answer_is_not_cut_off() {
    let (mut c, now) = early();
    c.handle_bytes(now, b"PUT /f HTTP/1.1\r\nHost: h\r\nContent-Length: 10\r\n\r\n01234");
    c.take_request().unwrap();
    let later = now + Duration::from_secs(20);
    streamed(&mut c, later, None);
    sent_at(&mut c, later);
    assert_eq!(c.poll_timeout(), Some(later + HttpLimits::default().body_timeout), "timed from the answer");
    c.handle_bytes(later, b"56789");
    assert_eq!(c.poll_timeout(), None, "the body is all in: nothing to time while the answer waits");
    // A body that stops while the answer goes out: the answer still does, then the close.
    let (mut c, now) = early();
    c.handle_bytes(now, b"PUT /f HTTP/1.1\r\nHost: h\r\nContent-Length: 10\r\n\r\n01234");
    c.take_request().unwrap();
    streamed(&mut c, now, None);
    let due = now + HttpLimits::default().body_timeout;
    c.handle_timeout(due);
    assert_eq!(c.flow(), Flow::Open, "the answer is not cut");
    c.send_body(due, b"still");
    c.end_body(due);
    assert!(sent_at(&mut c, due).ends_with("5\r\nstill\r\n0\r\n\r\n"));
    assert_eq!(c.flow(), Flow::Finish, "then the connection closes");
}

#[test]
fn early_stream_body_then_half_close_is_read_to_its_end() {
    let (mut c, now) = early();
    c.handle_bytes(now, b"PUT /f HTTP/1.1\r\nHost: h\r\nContent-Length: 70000\r\n\r\n");
    c.take_request().unwrap();
    c.read_body(now, 1, 1 << 20, true);
    for _ in 0..7 {
        c.handle_bytes(now, &[b'z'; 10000]);
    }
    c.handle_eof(now);
    let mut got = 0;
    loop {
        match c.take_body(1) {
            BodyRead::Data(d, last) => {
                got += d.len();
                if last {
                    break;
                }
            }
            other => panic!("{other:?} after {got} bytes"),
        }
    }
    assert_eq!(got, 70000, "all of it, though the client finished sending");
}

#[test]
fn early_body_reads_are_for_their_own_request() {
    let (mut c, now) = early();
    c.handle_bytes(now, b"POST /1 HTTP/1.1\r\nHost: h\r\nContent-Length: 4\r\n\r\n");
    let first = c.take_request().unwrap();
    ok(&mut c, now, "answered first");
    c.handle_bytes(now, b"abcdPOST /2 HTTP/1.1\r\nHost: h\r\nContent-Length: 4\r\n\r\n");
    let second = c.take_request().expect("the next request");
    assert_eq!((first.number, second.number), (1, 2));
    c.read_body(now, first.number, 100, false);
    assert_eq!(c.take_body(first.number), BodyRead::Failed("answered"), "the first body went");
    assert!(c.body_pending(), "the second request's body is untouched");
    c.handle_bytes(now, b"wxyz");
    c.read_body(now, second.number, 100, false);
    assert_eq!(c.take_body(second.number), BodyRead::Data(b"wxyz".to_vec(), true));
}
