//! The HTTP/1.1 upgrade handshake (RFC 6455 §4), both sides, incremental and bounded.
//!
//! Server: feed the bytes of a new connection to [`ServerHandshake::handle_bytes`] until it
//! returns [`ServerUpgrade::Accept`] (write `response`, then run the WebSocket over
//! `leftover` + later bytes) or [`ServerUpgrade::Reject`] (write `response`, close).
//!
//! Client: parse the URL with [`WsUrl::parse`], build the request with
//! [`ClientHandshake::new`] (the 16 random key bytes are passed in: `proto` has no randomness
//! source), write it, then feed the response to [`ClientHandshake::handle_bytes`].

use super::deflate::{self, Agreed, DeflateConfig};
use super::Error;
use tungstenite::handshake::derive_accept_key;

/// Default bound on the size of the request / response head (request line + headers).
pub const DEFAULT_MAX_HEAD_BYTES: usize = 8 * 1024;
/// Default bound on the number of header lines.
pub const DEFAULT_MAX_HEADERS: usize = 64;

/// Bounds applied while parsing an HTTP head.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UpgradeLimits {
    /// Maximum size of the head (request line + headers + empty line) in bytes; larger heads
    /// are refused with `431 Request Header Fields Too Large`.
    pub max_head_bytes: usize,
    /// Maximum number of header lines (more → 431).
    pub max_headers: usize,
}

impl Default for UpgradeLimits {
    fn default() -> Self {
        Self { max_head_bytes: DEFAULT_MAX_HEAD_BYTES, max_headers: DEFAULT_MAX_HEADERS }
    }
}

// ---------------------------------------------------------------------------------------------
// base64 (RFC 4648, standard alphabet, padded) — just enough for the 16-byte key.

const B64: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";

/// Standard padded base64.
pub(crate) fn base64_encode(data: &[u8]) -> String {
    let mut out = String::with_capacity(data.len().div_ceil(3) * 4);
    for chunk in data.chunks(3) {
        let b = [chunk[0], *chunk.get(1).unwrap_or(&0), *chunk.get(2).unwrap_or(&0)];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(B64[((n >> (18 - 6 * i)) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// Strict standard padded base64 decoding; `None` on any deviation (incl. non-zero pad bits).
pub(crate) fn base64_decode(s: &[u8]) -> Option<Vec<u8>> {
    if s.len() % 4 != 0 {
        return None;
    }
    let val = |c: u8| B64.iter().position(|&x| x == c).map(|p| p as u32);
    let mut out = Vec::with_capacity(s.len() / 4 * 3);
    let groups = s.len() / 4;
    for (gi, g) in s.chunks(4).enumerate() {
        let pad = g.iter().rev().take_while(|&&c| c == b'=').count();
        if pad > 2 || (pad > 0 && gi + 1 != groups) {
            return None;
        }
        let mut n = 0u32;
        for (i, &c) in g.iter().enumerate() {
            let v = if i >= 4 - pad { 0 } else { val(c)? };
            n = (n << 6) | v;
        }
        let bytes = [(n >> 16) as u8, (n >> 8) as u8, n as u8];
        let keep = 3 - pad;
        if bytes[keep..].iter().any(|&b| b != 0) {
            return None;
        }
        out.extend_from_slice(&bytes[..keep]);
    }
    Some(out)
}

// ---------------------------------------------------------------------------------------------
// Small HTTP helpers.

/// Whether the comma-separated token list `value` contains `token` (ASCII case-insensitive).
fn has_token(value: &str, token: &str) -> bool {
    value.split(',').any(|t| t.trim().eq_ignore_ascii_case(token))
}

/// RFC 7230 `token` (used for subprotocol names).
fn is_token(s: &str) -> bool {
    !s.is_empty() && s.bytes().all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b))
}

/// Where the head ends, if the bytes appended at `from..` completed it. Looks for an empty
/// line (`\n\n` or `\n\r\n`) starting a few bytes before `from`.
fn head_complete(buf: &[u8], from: usize) -> bool {
    let start = from.saturating_sub(3);
    let w = &buf[start..];
    w.windows(2).any(|p| p == b"\n\n") || w.windows(3).any(|p| p == b"\n\r\n")
}

/// An HTTP head (request or response) arriving in pieces, for both handshakes: kept until its
/// empty line or its size limit, parsed once, then dropped; later input is ignored.
#[derive(Debug, Default)]
struct Head {
    buf: Vec<u8>,
    finished: bool,
}

/// What appending to a [`Head`] found.
enum HeadState {
    /// More bytes are needed (or a result was already given).
    Incomplete,
    /// The empty line arrived: parse [`Head::bytes`].
    Complete,
    /// Over the limit without an empty line.
    TooLarge,
}

impl Head {
    fn push(&mut self, data: &[u8], max_bytes: usize) -> HeadState {
        if self.finished {
            return HeadState::Incomplete;
        }
        let from = self.buf.len();
        self.buf.extend_from_slice(data);
        if head_complete(&self.buf, from) {
            HeadState::Complete
        } else if self.buf.len() > max_bytes {
            HeadState::TooLarge
        } else {
            HeadState::Incomplete
        }
    }

    fn bytes(&self) -> &[u8] {
        &self.buf
    }

    /// A result was given: release the bytes and ignore what follows.
    fn finish(&mut self) {
        self.finished = true;
        self.buf = Vec::new();
    }
}

fn lossy(v: &[u8]) -> String {
    String::from_utf8_lossy(v).trim().to_string()
}

fn collect_headers(headers: &[httparse::Header<'_>]) -> Vec<(String, String)> {
    headers.iter().map(|h| (h.name.to_ascii_lowercase(), lossy(h.value))).collect()
}

fn find<'a>(headers: &'a [(String, String)], name: &str) -> impl Iterator<Item = &'a str> + 'a {
    let name = name.to_string();
    headers.iter().filter(move |(n, _)| *n == name).map(|(_, v)| v.as_str())
}

fn reason_phrase(status: u16) -> &'static str {
    match status {
        400 => "Bad Request",
        405 => "Method Not Allowed",
        426 => "Upgrade Required",
        431 => "Request Header Fields Too Large",
        _ => "Error",
    }
}

// ---------------------------------------------------------------------------------------------
// Server side.

/// Incremental server-side upgrade parser. See the module documentation.
#[derive(Debug)]
pub struct ServerHandshake {
    head: Head,
    limits: UpgradeLimits,
}

/// Outcome of [`ServerHandshake::handle_bytes`].
#[derive(Debug)]
pub enum ServerUpgrade {
    /// The request head is not complete yet; feed more bytes.
    Incomplete,
    /// A valid upgrade: send `response`, then run the WebSocket.
    Accept(Box<AcceptedUpgrade>),
    /// An invalid request: send `response` and close the connection.
    Reject(Rejection),
}

/// A validated upgrade request and the `101 Switching Protocols` response to send.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AcceptedUpgrade {
    /// Request path (origin form, without the query), e.g. `/chat`.
    pub path: String,
    /// Query string without the `?`, if any.
    pub query: Option<String>,
    /// All request headers in order: names lowercased, values as (lossy) UTF-8, trimmed.
    pub headers: Vec<(String, String)>,
    /// The subprotocol echoed in `Sec-WebSocket-Protocol`, if one was chosen.
    pub protocol: Option<String>,
    /// The handler that serves this connection: `protocol`, or `"default"` when none of the
    /// offered subprotocols has a handler.
    pub handler: String,
    /// The complete `101` response to write.
    pub response: Vec<u8>,
    /// Bytes received after the request head: they belong to the WebSocket stream.
    pub leftover: Vec<u8>,
    /// What was agreed on for permessage-deflate, if the app allows it and the client offered it.
    pub deflate: Option<Agreed>,
}

impl AcceptedUpgrade {
    /// The first header with this (case-insensitive) name.
    pub fn header(&self, name: &str) -> Option<&str> {
        let name = name.to_ascii_lowercase();
        find(&self.headers, &name).next()
    }
}

/// A refused upgrade: the HTTP error response to write and a readable reason.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rejection {
    /// HTTP status code (400, 405, 426 or 431).
    pub status: u16,
    /// Why the request was refused (also the response body).
    pub reason: String,
    /// The complete HTTP response to write before closing.
    pub response: Vec<u8>,
}

impl Rejection {
    fn new(status: u16, reason: impl Into<String>) -> Self {
        let reason = reason.into();
        let body = format!("{reason}\n");
        let extra = match status {
            405 => "Allow: GET\r\n",
            426 => "Sec-WebSocket-Version: 13\r\nUpgrade: websocket\r\n",
            _ => "",
        };
        let response = format!(
            "HTTP/1.1 {status} {}\r\nConnection: close\r\nContent-Type: text/plain; \
             charset=utf-8\r\nContent-Length: {}\r\n{extra}\r\n{body}",
            reason_phrase(status),
            body.len()
        )
        .into_bytes();
        Self { status, reason, response }
    }
}

impl Default for ServerHandshake {
    fn default() -> Self {
        Self::new(UpgradeLimits::default())
    }
}

impl ServerHandshake {
    /// A parser with the given bounds. Allocates nothing until bytes arrive.
    pub fn new(limits: UpgradeLimits) -> Self {
        Self { head: Head::default(), limits }
    }

    /// Bytes buffered so far (bounded by `max_head_bytes` plus one input chunk).
    pub fn buffered(&self) -> usize {
        self.head.bytes().len()
    }

    /// Whether an `Accept`/`Reject` was already returned (later input is ignored).
    pub fn is_finished(&self) -> bool {
        self.head.finished
    }

    /// Feed received bytes. `has_handler(name)` says whether the server has a handler called
    /// `name` (the literal `"default"` included). `deflate`: the app's permessage-deflate
    /// settings if it allows it, and whether this connection may keep its own contexts
    /// ([`Contexts::available`](super::Contexts::available)). Once `Accept` or `Reject` was
    /// returned, further calls return `Incomplete` and ignore their input.
    pub fn handle_bytes(
        &mut self,
        data: &[u8],
        has_handler: impl Fn(&str) -> bool,
        deflate: Option<(&DeflateConfig, bool)>,
    ) -> ServerUpgrade {
        let result = match self.head.push(data, self.limits.max_head_bytes) {
            HeadState::Incomplete => None,
            HeadState::Complete => self.parse(&has_handler, deflate),
            HeadState::TooLarge => Some(ServerUpgrade::Reject(Rejection::new(431, "request head too large"))),
        };
        match result {
            Some(r) => {
                self.head.finish();
                r
            }
            None => ServerUpgrade::Incomplete,
        }
    }

    fn parse(
        &self,
        has_handler: &dyn Fn(&str) -> bool,
        deflate: Option<(&DeflateConfig, bool)>,
    ) -> Option<ServerUpgrade> {
        let mut headers = vec![httparse::EMPTY_HEADER; self.limits.max_headers];
        let mut req = httparse::Request::new(&mut headers);
        let n = match req.parse(self.head.bytes()) {
            Ok(httparse::Status::Complete(n)) => n,
            Ok(httparse::Status::Partial) => {
                // An empty line inside something httparse still considers incomplete.
                return (self.head.bytes().len() > self.limits.max_head_bytes)
                    .then(|| ServerUpgrade::Reject(Rejection::new(431, "request head too large")));
            }
            Err(httparse::Error::TooManyHeaders) => {
                return Some(ServerUpgrade::Reject(Rejection::new(431, "too many headers")))
            }
            Err(e) => {
                return Some(ServerUpgrade::Reject(Rejection::new(
                    400,
                    format!("malformed HTTP request: {e}"),
                )))
            }
        };
        if n > self.limits.max_head_bytes {
            return Some(ServerUpgrade::Reject(Rejection::new(431, "request head too large")));
        }
        let method = req.method.unwrap_or("");
        let target = req.path.unwrap_or("");
        let version = req.version.unwrap_or(0);
        let hdrs = collect_headers(req.headers);
        let leftover = self.head.bytes()[n..].to_vec();
        Some(match validate_request(method, target, version, hdrs, has_handler, deflate) {
            Ok(mut acc) => {
                acc.leftover = leftover;
                ServerUpgrade::Accept(Box::new(acc))
            }
            Err(rej) => ServerUpgrade::Reject(rej),
        })
    }
}

fn split_target(target: &str) -> Option<(String, Option<String>)> {
    let origin_form = if target.starts_with('/') {
        target.to_string()
    } else {
        // absolute-form (RFC 7230 §5.3.2): keep path + query.
        let u = url::Url::parse(target).ok()?;
        if !matches!(u.scheme(), "http" | "https" | "ws" | "wss") {
            return None;
        }
        match u.query() {
            Some(q) => format!("{}?{q}", u.path()),
            None => u.path().to_string(),
        }
    };
    let origin_form = origin_form.split('#').next().unwrap_or("").to_string();
    Some(match origin_form.split_once('?') {
        Some((p, q)) => (p.to_string(), Some(q.to_string())),
        None => (origin_form, None),
    })
}

fn validate_request(
    method: &str,
    target: &str,
    version: u8,
    headers: Vec<(String, String)>,
    has_handler: &dyn Fn(&str) -> bool,
    deflate: Option<(&DeflateConfig, bool)>,
) -> Result<AcceptedUpgrade, Rejection> {
    if method != "GET" {
        return Err(Rejection::new(405, format!("method {method} not allowed (use GET)")));
    }
    if version != 1 {
        return Err(Rejection::new(400, "HTTP/1.1 required for a WebSocket upgrade"));
    }
    let (path, query) = split_target(target)
        .ok_or_else(|| Rejection::new(400, format!("invalid request target '{target}'")))?;
    if find(&headers, "host").next().is_none() {
        return Err(Rejection::new(400, "missing Host header"));
    }
    if !find(&headers, "upgrade").any(|v| has_token(v, "websocket")) {
        // A plain HTTP request (a browser opening the address): RFC 9110's 426 says what to use.
        return Err(Rejection::new(426, "this is a WebSocket server: connect with 'Upgrade: websocket'"));
    }
    if !find(&headers, "connection").any(|v| has_token(v, "upgrade")) {
        return Err(Rejection::new(400, "missing 'Connection: Upgrade' header"));
    }
    let versions: Vec<&str> = find(&headers, "sec-websocket-version").collect();
    if versions.len() != 1 || versions[0] != "13" {
        return Err(Rejection::new(426, "unsupported or missing Sec-WebSocket-Version (need 13)"));
    }
    let keys: Vec<&str> = find(&headers, "sec-websocket-key").collect();
    let key = match keys.as_slice() {
        [k] => *k,
        [] => return Err(Rejection::new(400, "missing Sec-WebSocket-Key header")),
        _ => return Err(Rejection::new(400, "more than one Sec-WebSocket-Key header")),
    };
    if base64_decode(key.as_bytes()).is_none_or(|k| k.len() != 16) {
        return Err(Rejection::new(400, "invalid Sec-WebSocket-Key (must be base64 of 16 bytes)"));
    }
    let offered: Vec<&str> = find(&headers, "sec-websocket-protocol")
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .collect();
    let (protocol, handler) = match offered.iter().find(|p| has_handler(p)) {
        Some(p) => (Some(p.to_string()), p.to_string()),
        None if has_handler("default") => (None, "default".to_string()),
        None if offered.is_empty() => {
            return Err(Rejection::new(400, "no subprotocol requested and no default handler"))
        }
        None => {
            return Err(Rejection::new(
                400,
                format!("no handler for subprotocol(s) '{}'", offered.join(", ")),
            ))
        }
    };
    let mut response = format!(
        "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Accept: {}\r\n",
        derive_accept_key(key.as_bytes())
    );
    if let Some(p) = &protocol {
        response.push_str("Sec-WebSocket-Protocol: ");
        response.push_str(p);
        response.push_str("\r\n");
    }
    let agreed = deflate.and_then(|(config, own_context)| {
        deflate::negotiate(find(&headers, "sec-websocket-extensions"), config, own_context)
    });
    let deflate = agreed.map(|(agreed, extension)| {
        response.push_str("Sec-WebSocket-Extensions: ");
        response.push_str(&extension);
        response.push_str("\r\n");
        agreed
    });
    response.push_str("\r\n");
    Ok(AcceptedUpgrade {
        path,
        query,
        headers,
        protocol,
        handler,
        response: response.into_bytes(),
        leftover: Vec::new(),
        deflate,
    })
}

// ---------------------------------------------------------------------------------------------
// Client side.

/// A parsed `ws://` / `wss://` URL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WsUrl {
    /// `true` for `wss://`.
    pub secure: bool,
    /// Host to connect to / verify: a DNS name or an IP literal *without* brackets.
    pub host: String,
    /// Whether `host` is an IP literal (no DNS lookup needed).
    pub host_is_ip: bool,
    /// Port (default 80 for ws, 443 for wss).
    pub port: u16,
    /// Path and query for the request line, e.g. `/chat?room=1` (at least `/`).
    pub resource: String,
    /// Value of the `Host` header: host (IPv6 in brackets) plus `:port` when not the default.
    pub host_header: String,
}

impl WsUrl {
    /// Parse a `ws://` or `wss://` URL. Fragments are refused (RFC 6455 §3).
    pub fn parse(s: &str) -> Result<WsUrl, Error> {
        let u = url::Url::parse(s.trim()).map_err(|e| Error::InvalidUrl(format!("'{s}': {e}")))?;
        let secure = match u.scheme() {
            "ws" => false,
            "wss" => true,
            other => return Err(Error::InvalidUrl(format!("'{s}': scheme '{other}' is not ws or wss"))),
        };
        if u.fragment().is_some() {
            return Err(Error::InvalidUrl(format!("'{s}': fragments are not allowed")));
        }
        let default_port = if secure { 443 } else { 80 };
        let port = u.port().unwrap_or(default_port);
        let (host, host_is_ip, bracketed) = match u.host() {
            Some(url::Host::Domain(d)) if !d.is_empty() => (d.to_string(), false, d.to_string()),
            Some(url::Host::Ipv4(a)) => (a.to_string(), true, a.to_string()),
            Some(url::Host::Ipv6(a)) => (a.to_string(), true, format!("[{a}]")),
            _ => return Err(Error::InvalidUrl(format!("'{s}': no host"))),
        };
        let host_header = if port == default_port { bracketed } else { format!("{bracketed}:{port}") };
        let mut resource = u.path().to_string();
        if resource.is_empty() {
            resource.push('/');
        }
        if let Some(q) = u.query() {
            resource.push('?');
            resource.push_str(q);
        }
        Ok(WsUrl { secure, host, host_is_ip, port, resource, host_header })
    }
}

/// Incremental client-side upgrade: builds the request and validates the response.
#[derive(Debug)]
pub struct ClientHandshake {
    expected_accept: String,
    offered: Vec<String>,
    deflate: Option<DeflateConfig>,
    head: Head,
    limits: UpgradeLimits,
}

/// A successful client upgrade.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientUpgrade {
    /// The subprotocol the server chose (always one we offered), if any.
    pub protocol: Option<String>,
    /// Response headers in order: names lowercased, values as (lossy) UTF-8, trimmed.
    pub headers: Vec<(String, String)>,
    /// Bytes received after the response head: the start of the WebSocket stream.
    pub leftover: Vec<u8>,
    /// What the server agreed to for permessage-deflate (only if we offered it).
    pub deflate: Option<Agreed>,
}

impl ClientHandshake {
    /// Build the upgrade request for `url`, offering `protocols` (in preference order) and
    /// permessage-deflate with `deflate`'s settings, if given, and using `key` (16 random bytes
    /// from the caller) as `Sec-WebSocket-Key`. Returns the handshake state and the request
    /// bytes to write.
    pub fn new(
        url: &WsUrl,
        protocols: &[&str],
        key: [u8; 16],
        deflate: Option<&DeflateConfig>,
    ) -> Result<(Self, Vec<u8>), Error> {
        if let Some(bad) = protocols.iter().find(|p| !is_token(p)) {
            return Err(Error::Handshake(format!("invalid subprotocol name '{bad}'")));
        }
        let key_b64 = base64_encode(&key);
        let mut req = format!(
            "GET {} HTTP/1.1\r\nHost: {}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
             Sec-WebSocket-Key: {key_b64}\r\nSec-WebSocket-Version: 13\r\n",
            url.resource, url.host_header
        );
        if !protocols.is_empty() {
            req.push_str("Sec-WebSocket-Protocol: ");
            req.push_str(&protocols.join(", "));
            req.push_str("\r\n");
        }
        if let Some(config) = deflate {
            req.push_str("Sec-WebSocket-Extensions: ");
            req.push_str(&deflate::offer(config));
            req.push_str("\r\n");
        }
        req.push_str("\r\n");
        let hs = ClientHandshake {
            expected_accept: derive_accept_key(key_b64.as_bytes()),
            offered: protocols.iter().map(|p| p.to_string()).collect(),
            deflate: deflate.copied(),
            head: Head::default(),
            limits: UpgradeLimits::default(),
        };
        Ok((hs, req.into_bytes()))
    }

    /// Change the response bounds (defaults: 8 KiB, 64 headers).
    pub fn set_limits(&mut self, limits: UpgradeLimits) {
        self.limits = limits;
    }

    /// Feed response bytes: `Ok(None)` while incomplete, `Ok(Some(_))` once upgraded, `Err`
    /// when the server refused or answered wrongly. After a result, input is ignored
    /// (`Ok(None)`).
    pub fn handle_bytes(&mut self, data: &[u8]) -> Result<Option<ClientUpgrade>, Error> {
        let result = match self.head.push(data, self.limits.max_head_bytes) {
            HeadState::Incomplete => None,
            HeadState::Complete => self.parse(),
            HeadState::TooLarge => Some(Err(Error::Handshake("response head too large".into()))),
        };
        match result {
            Some(r) => {
                self.head.finish();
                r.map(Some)
            }
            None => Ok(None),
        }
    }

    fn parse(&self) -> Option<Result<ClientUpgrade, Error>> {
        let fail = |m: String| Some(Err(Error::Handshake(m)));
        let mut headers = vec![httparse::EMPTY_HEADER; self.limits.max_headers];
        let mut resp = httparse::Response::new(&mut headers);
        let n = match resp.parse(self.head.bytes()) {
            Ok(httparse::Status::Complete(n)) => n,
            Ok(httparse::Status::Partial) => {
                return (self.head.bytes().len() > self.limits.max_head_bytes)
                    .then(|| Err(Error::Handshake("response head too large".into())));
            }
            Err(e) => return fail(format!("malformed HTTP response: {e}")),
        };
        if n > self.limits.max_head_bytes {
            return fail("response head too large".into());
        }
        let code = resp.code.unwrap_or(0);
        if code != 101 {
            return fail(format!("server refused the upgrade: HTTP {code} {}", resp.reason.unwrap_or("")));
        }
        let hdrs = collect_headers(resp.headers);
        if !find(&hdrs, "upgrade").any(|v| has_token(v, "websocket")) {
            return fail("response lacks 'Upgrade: websocket'".into());
        }
        if !find(&hdrs, "connection").any(|v| has_token(v, "upgrade")) {
            return fail("response lacks 'Connection: Upgrade'".into());
        }
        let accepts: Vec<&str> = find(&hdrs, "sec-websocket-accept").collect();
        if accepts.as_slice() != [self.expected_accept.as_str()] {
            return fail("wrong or missing Sec-WebSocket-Accept".into());
        }
        let deflate = {
            let extensions = find(&hdrs, "sec-websocket-extensions");
            match &self.deflate {
                Some(config) => match deflate::accept_response(extensions, config) {
                    Ok(agreed) => agreed,
                    Err(e) => return fail(e),
                },
                None if extensions.filter(|v| !v.is_empty()).count() > 0 => {
                    return fail("server selected an extension we did not offer".into())
                }
                None => None,
            }
        };
        let chosen: Vec<&str> = find(&hdrs, "sec-websocket-protocol").collect();
        let protocol = match chosen.as_slice() {
            [] => None,
            [p] if self.offered.iter().any(|o| o == p) => Some(p.to_string()),
            [p] => return fail(format!("server chose subprotocol '{p}' which we did not offer")),
            _ => return fail("server sent more than one Sec-WebSocket-Protocol".into()),
        };
        let leftover = self.head.bytes()[n..].to_vec();
        Some(Ok(ClientUpgrade { protocol, headers: hdrs, leftover, deflate }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_roundtrip_and_strictness() {
        assert_eq!(base64_encode(b""), "");
        assert_eq!(base64_encode(b"a"), "YQ==");
        assert_eq!(base64_encode(b"ab"), "YWI=");
        assert_eq!(base64_encode(b"abc"), "YWJj");
        for n in 0..40u8 {
            let v: Vec<u8> = (0..n).map(|i| i.wrapping_mul(37)).collect();
            assert_eq!(base64_decode(base64_encode(&v).as_bytes()).unwrap(), v);
        }
        assert!(base64_decode(b"YQ=").is_none());
        assert!(base64_decode(b"YR==").is_none()); // non-zero pad bits
        assert!(base64_decode(b"Y===").is_none());
        assert!(base64_decode(b"YQ==YQ==").is_none());
        assert!(base64_decode(b"Y!Q=").is_none());
        assert_eq!(base64_decode(b"dGhlIHNhbXBsZSBub25jZQ==").unwrap(), b"the sample nonce");
    }

    #[test]
    fn rfc_sample_accept() {
        let req = b"GET /chat HTTP/1.1\r\nHost: server.example.com\r\nUpgrade: websocket\r\n\
Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\
Sec-WebSocket-Protocol: chat, superchat\r\nSec-WebSocket-Version: 13\r\n\r\n";
        let mut hs = ServerHandshake::default();
        match hs.handle_bytes(req, |p| p == "chat", None) {
            ServerUpgrade::Accept(a) => {
                let r = String::from_utf8(a.response.clone()).unwrap();
                assert!(r.contains("Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n"));
                assert!(r.contains("Sec-WebSocket-Protocol: chat\r\n"));
                assert_eq!(a.handler, "chat");
                assert_eq!(a.path, "/chat");
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn url_parsing() {
        let u = WsUrl::parse("ws://localhost").unwrap();
        assert_eq!(
            (u.secure, u.port, u.resource.as_str(), u.host_header.as_str()),
            (false, 80, "/", "localhost")
        );
        let u = WsUrl::parse("wss://example.com:8443/a/b?x=1&y=2").unwrap();
        assert_eq!((u.secure, u.port, u.resource.as_str()), (true, 8443, "/a/b?x=1&y=2"));
        assert_eq!(u.host_header, "example.com:8443");
        assert!(!u.host_is_ip);
        let u = WsUrl::parse("ws://[::1]:9000/p").unwrap();
        assert_eq!((u.host.as_str(), u.host_header.as_str(), u.host_is_ip), ("::1", "[::1]:9000", true));
        let u = WsUrl::parse("wss://[::1]/").unwrap();
        assert_eq!((u.port, u.host_header.as_str()), (443, "[::1]"));
        let u = WsUrl::parse("ws://127.0.0.1:80?q").unwrap();
        assert_eq!(
            (u.host.as_str(), u.host_header.as_str(), u.resource.as_str()),
            ("127.0.0.1", "127.0.0.1", "/?q")
        );
        for bad in ["http://x", "ws://", "ws://x/#frag", "nonsense", "ws://[::1"] {
            assert!(WsUrl::parse(bad).is_err(), "{bad}");
        }
    }
}
