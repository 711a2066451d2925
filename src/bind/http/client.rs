//! HTTP client exchanges for `lua/http_client.lua` (which adds redirects, callbacks and the
//! original client's API): the request head built from a URL and header table, a keep-alive
//! pool per origin (at most [`PER_ORIGIN`] connections; idle ones are reused, a request that
//! finds none free waits its turn), and the exchange a coroutine waits on, taken as a head,
//! then body pieces (or the whole body at once). The HTTP/1.1 rules live in
//! `proto::http::client`.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use mlua::{Lua, RegistryKey, Result, Table, Thread, Value};
use rustc_hash::FxHashMap;

use super::super::error::{lua_type, misuse};
use super::super::options::{seconds_value, Options};
use super::super::sched::{park_value, Job};
use super::super::{addr, runtime, Runtime};
use crate::driver::{ClientTls, ConnectOptions, Event, EventKind, Key, Tag, Target};
use crate::proto::http::client::{ClientLimits, Exchange, HttpClientConn, Upload};

/// The tag of every entry this module opens.
pub(crate) const TAG: Tag = 5;

/// Connections open at once to one origin (browsers use 6).
pub(crate) const PER_ORIGIN: usize = 6;

/// A request body kept for sending again (a pooled connection the server closed while idle)
/// up to this size.
const RETRY_COPY: usize = 1 << 20;

/// Request bytes queued before a streamed upload waits for the peer.
const UPLOAD_QUEUE: usize = 256 << 10;

const CALL: &str = "luna.http.request(config)";

/// Where connections go: scheme, host, port and how TLS is verified (one pool each).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct Origin {
    host: String,
    port: u16,
    /// CA file, verify, server name.
    tls: Option<(Option<String>, bool, String)>,
    /// The proxy connections go through (host, port, credentials): plain http is forwarded,
    /// https tunnels.
    proxy: Option<(String, u16, Option<String>)>,
}

impl Origin {
    /// Where connections are opened: the proxy if there is one.
    fn dial(&self) -> (String, u16) {
        match &self.proxy {
            Some((host, port, _)) => (host.clone(), *port),
            None => (self.host.clone(), self.port),
        }
    }
}

/// Where a tunnel through a proxy stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Tunnel {
    /// No tunnel (no proxy, or http forwarded).
    No,
    /// `CONNECT` sent, the proxy's answer awaited.
    Asked,
    /// The proxy agreed; TLS with the origin is being set up.
    Securing,
}

enum Stage {
    /// Waiting for the host name or a free connection.
    Waiting,
    Sent(Key),
}

struct Pending {
    origin: Origin,
    /// Until it is sent, and a copy after for sending again.
    request: Option<Exchange>,
    stage: Stage,
    /// Addresses still to try if connecting fails.
    fallback: Vec<SocketAddr>,
    connect: ConnectOptionsSpec,
    waiter: Option<RegistryKey>,
    whole: bool,
    body: Vec<u8>,
    head_given: bool,
    failure: Option<String>,
    retried: bool,
    started: Instant,
    resolved: Option<Instant>,
    ready: Option<Instant>,
    reused: bool,
    /// Holds a slot of its origin while its connection is being resolved (the other slots are
    /// the connections in `conns`).
    opening: bool,
    /// A failed request may be sent again on a new connection (GET, HEAD, PUT, DELETE...).
    idempotent: bool,
    /// The whole exchange's deadline (`timeout`), also while it waits for a connection.
    deadline: Option<Instant>,
    tunnel: Tunnel,
    /// The `CONNECT` head for an https request through a proxy.
    connect_head: Option<Vec<u8>>,
    /// A timer wakes the waiting coroutine at the deadline.
    deadline_armed: bool,
}

impl Pending {
    /// The deadline to arm a timer for, once, when the request waits `outside` its
    /// connection's protocol.
    fn deadline_timer(&mut self, outside: bool) -> Option<Instant> {
        if !outside || self.deadline_armed {
            return None;
        }
        self.deadline_armed = self.deadline.is_some();
        self.deadline
    }
}

#[derive(Clone)]
struct ConnectOptionsSpec {
    timeout: Duration,
    tls: Option<(Arc<rustls::ClientConfig>, String)>,
}

struct Conn {
    origin: Origin,
    exchange: Option<u64>,
}

#[derive(Default)]
pub(crate) struct ClientState {
    exchanges: FxHashMap<u64, Pending>,
    conns: FxHashMap<Key, Conn>,
    idle: FxHashMap<Origin, Vec<Key>>,
    queued: FxHashMap<Origin, VecDeque<u64>>,
    next: u64,
    /// Origins whose `serve_queue` is running (a nested call leaves the work to it).
    serving: Vec<Origin>,
}

impl ClientState {
    /// Slots of `origin` in use: its connections and the requests resolving for a new one.
    fn slots_taken(&self, origin: &Origin) -> usize {
        self.conns.values().filter(|c| c.origin == *origin).count()
            + self.exchanges.values().filter(|p| p.opening && p.origin == *origin).count()
    }

    /// Pooled connections waiting for a request.
    pub fn idle_count(&self) -> usize {
        self.idle.values().map(Vec::len).sum()
    }
}

/// A token of RFC 9110 §5.6.2 (methods, header names).
fn is_token(s: &str) -> bool {
    !s.is_empty() && s.bytes().all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b))
}

/// The header fields of `headers` (`{name = value}` or `{name = {v1, v2}}`), checked so no
/// value can end the head early.
fn header_fields(headers: Option<Table>) -> Result<Vec<(String, String)>> {
    let mut fields = Vec::new();
    let Some(headers) = headers else { return Ok(fields) };
    for pair in headers.pairs::<Value, Value>() {
        let (name, value) = pair?;
        let Value::String(name) = name else {
            return Err(misuse(CALL, format!("header names must be strings, got {}", lua_type(&name))));
        };
        let name = name.to_str()?.to_owned();
        if !is_token(&name) {
            return Err(misuse(CALL, format!("'{name}' is not a valid header name")));
        }
        let values: Vec<Value> = match value {
            Value::Table(list) => list.sequence_values().collect::<Result<_>>()?,
            other => vec![other],
        };
        for value in values {
            let text = match &value {
                Value::String(s) => s.to_str()?.to_owned(),
                Value::Integer(_) | Value::Number(_) => value.to_string()?,
                other => {
                    return Err(misuse(
                        CALL,
                        format!(
                            "header '{name}' must be a string, a number or a list of them, got {}",
                            lua_type(other)
                        ),
                    ))
                }
            };
            if text.bytes().any(|b| b == b'\r' || b == b'\n' || b == 0) {
                return Err(misuse(CALL, format!("header '{name}' holds a line break or NUL")));
            }
            fields.push((name.clone(), text));
        }
    }
    Ok(fields)
}

/// The request head: request line, `Host`, our defaults unless the caller set them, the
/// caller's fields, the body's framing.
fn build_head(
    method: &str,
    url: &url::Url,
    fields: &[(String, String)],
    framing: Option<Option<u64>>,
    decompress: bool,
    forward: Option<&Option<String>>,
) -> Vec<u8> {
    use std::io::Write as _;
    let has = |name: &str| fields.iter().any(|(n, _)| n.eq_ignore_ascii_case(name));
    let mut head = Vec::with_capacity(256);
    // Writes into a Vec cannot fail.
    let _ = match (forward, url.query()) {
        // A proxy is asked for the absolute URL (RFC 9112 §3.2.2), without its fragment.
        (Some(_), _) => write!(head, "{method} {} HTTP/1.1\r\n", &url[..url::Position::AfterQuery]),
        (None, Some(q)) => write!(head, "{method} {}?{q} HTTP/1.1\r\n", url.path()),
        (None, None) => write!(head, "{method} {} HTTP/1.1\r\n", url.path()),
    };
    if let Some(Some(auth)) = forward {
        if !has("proxy-authorization") {
            let _ = write!(head, "proxy-authorization: {auth}\r\n");
        }
    }
    if !has("host") {
        let host = url.host_str().unwrap_or("");
        let _ = match url.port() {
            Some(port) => write!(head, "host: {host}:{port}\r\n"),
            None => write!(head, "host: {host}\r\n"),
        };
    }
    if !has("user-agent") {
        head.extend_from_slice(concat!("user-agent: luna/", env!("CARGO_PKG_VERSION"), "\r\n").as_bytes());
    }
    if !has("accept") {
        head.extend_from_slice(b"accept: */*\r\n");
    }
    if decompress && !has("accept-encoding") {
        head.extend_from_slice(b"accept-encoding: gzip, deflate, br\r\n");
    }
    for (name, value) in fields {
        // The body's framing is ours to say.
        if framing.is_some()
            && (name.eq_ignore_ascii_case("content-length") || name.eq_ignore_ascii_case("transfer-encoding"))
        {
            continue;
        }
        let _ = write!(head, "{name}: {value}\r\n");
    }
    let _ = match framing {
        Some(Some(n)) => write!(head, "content-length: {n}\r\n"),
        Some(None) => write!(head, "transfer-encoding: chunked\r\n"),
        None => Ok(()),
    };
    head.extend_from_slice(b"\r\n");
    head
}

/// What `lua/http_client.lua` passes to `core.http_client_start`, in order (positional: a
/// table per request would cost a table and a string per key).
type Spec = (
    mlua::String,
    Option<mlua::String>,
    Option<Table>,
    Option<Table>,
    Option<mlua::String>,
    bool,
    Option<f64>,
    bool,
    Option<f64>,
    Option<f64>,
    Option<f64>,
    Option<f64>,
    Option<Table>,
    bool,
    Option<mlua::String>,
);

/// A proxy URL: where it is and the `Proxy-Authorization` its user name and password give.
fn proxy_of(text: &str) -> std::result::Result<(String, u16, Option<String>), String> {
    let url = url::Url::parse(text).map_err(|e| format!("invalid proxy URL '{text}': {e}"))?;
    if url.scheme() != "http" {
        return Err(format!("unsupported proxy scheme '{}' (http:// proxies only)", url.scheme()));
    }
    let host = url.host_str().ok_or_else(|| format!("the proxy URL '{text}' has no host"))?.to_owned();
    let decode = |s: &str| percent_encoding::percent_decode_str(s).decode_utf8_lossy().into_owned();
    let auth = (!url.username().is_empty()).then(|| {
        let pair = format!("{}:{}", decode(url.username()), decode(url.password().unwrap_or("")));
        format!("Basic {}", data_encoding::BASE64.encode(pair.as_bytes()))
    });
    Ok((host, url.port_or_known_default().unwrap_or(80), auth))
}

/// A whole number of bytes >= 0 (at most 2^53, what a Lua number holds exactly).
fn bytes(key: &str, n: Option<f64>) -> Result<Option<u64>> {
    match n {
        None => Ok(None),
        Some(n) if n >= 0.0 && n.fract() == 0.0 && n <= 2f64.powi(53) => Ok(Some(n as u64)),
        Some(n) => Err(misuse(CALL, format!("'{key}' must be a whole number >= 0, got {n}"))),
    }
}

/// `core.http_client_start(url, method, headers, query, body, streamed, content_length,
/// decompress, max_body_size, timeout, connect_timeout, stall_timeout, tls, whole, proxy)` → request
/// id, or `nil, err` for a URL that cannot be asked.
fn start(lua: &Lua, spec: Spec) -> Result<(Option<u64>, Option<String>)> {
    let (
        text,
        method,
        headers,
        query,
        body,
        streamed,
        length,
        decompress,
        max_body,
        timeout,
        connect_timeout,
        stall_timeout,
        tls_table,
        whole,
        proxy,
    ) = spec;
    let text = text.to_str()?;
    let mut url = match url::Url::parse(&text) {
        Ok(url) => url,
        Err(e) => return Ok((None, Some(format!("invalid URL '{text}': {e}")))),
    };
    let tls = match url.scheme() {
        "http" => false,
        "https" => true,
        other => return Ok((None, Some(format!("unsupported URL scheme '{other}' (http or https)")))),
    };
    let Some(host) = url.host_str().map(str::to_owned) else {
        return Ok((None, Some(format!("the URL '{text}' has no host"))));
    };
    if let Some(query) = query {
        let mut pairs = url.query_pairs_mut();
        for pair in query.pairs::<String, Value>() {
            let (name, value) = pair?;
            pairs.append_pair(&name, &value.to_string()?);
        }
    }
    let method = match method {
        Some(m) => m.to_str()?.to_ascii_uppercase(),
        None => "GET".to_owned(),
    };
    if !is_token(&method) {
        return Err(misuse(CALL, format!("'{method}' is not a valid method")));
    }
    let fields = header_fields(headers)?;
    let body = body.map(|b| b.as_bytes().to_vec()).unwrap_or_default();
    let length = bytes("content_length", length)?;
    let framing = if streamed {
        Some(length)
    } else if !body.is_empty() || !matches!(method.as_str(), "GET" | "HEAD" | "DELETE" | "OPTIONS" | "TRACE")
    {
        Some(Some(body.len() as u64))
    } else {
        None
    };
    let max_body = bytes("max_body_size", max_body)?;
    let timeout = seconds_value(CALL, "timeout", timeout)?;
    let connect_timeout = seconds_value(CALL, "connect_timeout", connect_timeout)?;
    let stall_timeout = seconds_value(CALL, "stall_timeout", stall_timeout)?;
    let proxy = match proxy.map(|p| p.to_str().map(|p| proxy_of(&p))).transpose()? {
        None => None,
        Some(Ok(proxy)) => Some(proxy),
        Some(Err(e)) => return Ok((None, Some(e))),
    };
    let now = Instant::now();
    let forward = proxy.as_ref().filter(|_| !tls).map(|(_, _, auth)| auth.clone());
    let head = build_head(&method, &url, &fields, framing, decompress, forward.as_ref());
    let exchange = Exchange {
        head,
        body,
        upload: if streamed { Upload::Streamed { chunked: length.is_none() } } else { Upload::Whole },
        head_request: method == "HEAD",
        decompress,
        max_body,
        stall: stall_timeout.unwrap_or(Duration::from_secs(30)),
        deadline: timeout.map(|t| now + t),
    };
    let port = url.port_or_known_default().unwrap_or(if tls { 443 } else { 80 });
    let rt = runtime(lua)?;
    let tls_spec = if tls { Some(tls_options(&rt, tls_table, &host)?) } else { None };
    let origin = Origin {
        host: host.clone(),
        port,
        tls: tls_spec.as_ref().map(|(ca, verify, name, _)| (ca.clone(), *verify, name.clone())),
        proxy: proxy.clone(),
    };
    // https through a proxy: a tunnel to the origin first (RFC 9110 §9.3.6).
    let connect_head = proxy.as_ref().filter(|_| tls).map(|(_, _, auth)| {
        // (`host_str` keeps an IPv6 literal's brackets.)
        let authority = format!("{host}:{port}");
        let auth = auth.as_ref().map(|a| format!("proxy-authorization: {a}\r\n")).unwrap_or_default();
        format!("CONNECT {authority} HTTP/1.1\r\nhost: {authority}\r\n{auth}\r\n").into_bytes()
    });
    let connect = ConnectOptionsSpec {
        timeout: connect_timeout.unwrap_or(Duration::from_secs(10)),
        tls: tls_spec.map(|(_, _, name, config)| (config, name)),
    };
    let pending = Pending {
        origin,
        request: Some(exchange),
        stage: Stage::Waiting,
        fallback: Vec::new(),
        connect,
        waiter: None,
        whole,
        body: Vec::new(),
        head_given: false,
        failure: None,
        retried: false,
        started: now,
        resolved: None,
        ready: None,
        reused: false,
        opening: false,
        idempotent: matches!(method.as_str(), "GET" | "HEAD" | "PUT" | "DELETE" | "OPTIONS" | "TRACE"),
        deadline: timeout.map(|t| now + t),
        tunnel: Tunnel::No,
        connect_head,
        deadline_armed: false,
    };
    let id = {
        let mut state = rt.http_client.borrow_mut();
        state.next += 1;
        let id = state.next;
        state.exchanges.insert(id, pending);
        id
    };
    assign(lua, &rt, id)?;
    Ok((Some(id), None))
}

/// `tls = {ca, verify, server_name}`: the pool's view of it and the config.
fn tls_options(
    rt: &Runtime,
    table: Option<Table>,
    host: &str,
) -> Result<(Option<String>, bool, String, Arc<rustls::ClientConfig>)> {
    let (mut ca, mut verify, mut name) = (None, true, host.trim_matches(['[', ']']).to_owned());
    if let Some(table) = table {
        let o = Options::new(CALL, Value::Table(table), &["ca", "verify", "server_name"])?;
        ca = o.string("ca")?;
        verify = o.boolean("verify")?.unwrap_or(true);
        if let Some(n) = o.string("server_name")? {
            name = n;
        }
    }
    let config = rt.tls.borrow_mut().client(CALL, ca.as_deref(), verify, &[b"http/1.1"])?;
    Ok((ca, verify, name, config))
}

/// Gives request `id` a connection: an idle one of its origin, a new one if the origin has
/// room, or a place in its origin's queue.
fn assign(lua: &Lua, rt: &Runtime, id: u64) -> Result<()> {
    let origin = match rt.http_client.borrow().exchanges.get(&id) {
        Some(p) => p.origin.clone(),
        None => return Ok(()),
    };
    loop {
        let idle = rt.http_client.borrow_mut().idle.get_mut(&origin).and_then(Vec::pop);
        let Some(key) = idle else { break };
        let reusable = rt.driver.borrow_mut().proto::<HttpClientConn>(key).is_some_and(|p| p.is_reusable());
        if reusable {
            send_on(rt, id, key, true);
            return Ok(());
        }
        // Its slot is free now: this request may take it below.
        close_conn(rt, key);
    }
    let room = {
        let mut state = rt.http_client.borrow_mut();
        let room = state.slots_taken(&origin) < PER_ORIGIN;
        if room {
            if let Some(p) = state.exchanges.get_mut(&id) {
                p.opening = true;
            }
        } else {
            state.queued.entry(origin.clone()).or_default().push_back(id);
        }
        room
    };
    if !room {
        return Ok(());
    }
    let (dial_host, port) = origin.dial();
    let then: addr::Continuation = Box::new(move |lua, rt, ips| {
        let now = Instant::now();
        let mut addrs = match ips {
            Ok(ips) if !ips.is_empty() => addr::with_port(&ips, port),
            Ok(_) => return give_up(lua, rt, id, "cannot resolve the host: no addresses".into()),
            Err(e) => return give_up(lua, rt, id, e),
        };
        let first = addrs.remove(0);
        match rt.http_client.borrow_mut().exchanges.get_mut(&id) {
            Some(p) => {
                p.fallback = addrs;
                p.resolved = Some(now);
            }
            // Cancelled meanwhile: its slot went with it.
            None => return Ok(()),
        }
        connect(lua, rt, id, first)
    });
    addr::resolve_then(lua, rt, &dial_host, false, then)
}

/// Opens a connection to `addr` for request `id` (which holds a slot of its origin).
fn connect(lua: &Lua, rt: &Runtime, id: u64, addr: SocketAddr) -> Result<()> {
    let (spec, origin, connect_head) = match rt.http_client.borrow().exchanges.get(&id) {
        Some(p) => (p.connect.clone(), p.origin.clone(), p.connect_head.clone()),
        None => return Ok(()),
    };
    let options = ConnectOptions {
        timeout: spec.timeout,
        // Through a tunnel, TLS starts once the proxy agreed.
        tls: spec
            .tls
            .filter(|_| connect_head.is_none())
            .map(|(config, server_name)| ClientTls { config, server_name }),
        ..ConnectOptions::default()
    };
    let proto = Box::new(HttpClientConn::new(ClientLimits::default(), Instant::now()));
    let opened = rt.driver.borrow_mut().connect(&Target::Tcp(addr), proto, options, TAG);
    match opened {
        Ok(key) => {
            let mut state = rt.http_client.borrow_mut();
            state.conns.insert(key, Conn { origin, exchange: Some(id) });
            if let Some(p) = state.exchanges.get_mut(&id) {
                p.opening = false;
                if connect_head.is_some() {
                    p.tunnel = Tunnel::Asked;
                    p.stage = Stage::Sent(key);
                }
            }
            drop(state);
            match connect_head {
                Some(head) => {
                    let now = rt.driver.borrow().now();
                    if let Some(proto) = rt.driver.borrow_mut().proto::<HttpClientConn>(key) {
                        proto.tunnel(now, &head);
                    }
                    rt.flush(key);
                }
                None => send_on(rt, id, key, false),
            }
            Ok(())
        }
        Err(e) => give_up(lua, rt, id, e),
    }
}

/// Request `id` could not get a connection: it fails and its slot goes to the next in line.
fn give_up(lua: &Lua, rt: &Runtime, id: u64, why: String) -> Result<()> {
    let origin = {
        let mut state = rt.http_client.borrow_mut();
        let Some(p) = state.exchanges.get_mut(&id) else { return Ok(()) };
        p.failure = Some(why);
        p.opening = false;
        wake(rt, p);
        p.origin.clone()
    };
    serve_queue(lua, rt, &origin)
}

/// A slot of `origin` may be free: queued requests take free slots in order. A loop, not a
/// recursion (a request that fails at once frees its slot again); a nested call returns and
/// the outer loop goes on.
fn serve_queue(lua: &Lua, rt: &Runtime, origin: &Origin) -> Result<()> {
    {
        let mut state = rt.http_client.borrow_mut();
        if state.serving.contains(origin) {
            return Ok(());
        }
        state.serving.push(origin.clone());
    }
    let result = (|| loop {
        let next = {
            let mut state = rt.http_client.borrow_mut();
            if state.slots_taken(origin) >= PER_ORIGIN {
                return Ok(());
            }
            state.queued.get_mut(origin).and_then(VecDeque::pop_front)
        };
        match next {
            Some(next) => assign(lua, rt, next)?,
            None => return Ok(()),
        }
    })();
    rt.http_client.borrow_mut().serving.retain(|o| o != origin);
    result
}

/// Starts request `id` on connection `key`.
fn send_on(rt: &Runtime, id: u64, key: Key, reused: bool) {
    let request = {
        let mut state = rt.http_client.borrow_mut();
        if let Some(conn) = state.conns.get_mut(&key) {
            conn.exchange = Some(id);
        }
        let Some(p) = state.exchanges.get_mut(&id) else { return };
        p.stage = Stage::Sent(key);
        p.reused = reused;
        if reused {
            p.ready = Some(Instant::now());
        }
        let Some(request) = p.request.take() else { return };
        // A copy for sending again on a new connection: after a failed connect (a streamed body
        // is not written before the connection is up, so its head is all there is), or when a
        // pooled connection turns out dead (whole bodies up to RETRY_COPY).
        let copy = match request.upload {
            Upload::Whole => !reused || request.body.len() <= RETRY_COPY,
            Upload::Streamed { .. } => !reused,
        };
        if copy && !p.retried {
            p.request = Some(request.clone());
        }
        request
    };
    let now = rt.driver.borrow().now();
    if let Some(proto) = rt.driver.borrow_mut().proto::<HttpClientConn>(key) {
        proto.start(now, request);
    }
    rt.flush(key);
    // A streamed upload waits for its connection.
    if let Some(p) = rt.http_client.borrow_mut().exchanges.get_mut(&id) {
        wake(rt, p);
    }
}

fn wake(rt: &Runtime, p: &mut Pending) {
    if let Some(waiter) = p.waiter.take() {
        rt.sched.borrow_mut().jobs.push_back(Job::Key(waiter));
    }
}

/// Closes connection `key` and forgets it.
fn close_conn(rt: &Runtime, key: Key) -> Option<Origin> {
    let conn = rt.http_client.borrow_mut().conns.remove(&key)?;
    {
        let mut state = rt.http_client.borrow_mut();
        if let Some(idle) = state.idle.get_mut(&conn.origin) {
            idle.retain(|k| *k != key);
        }
    }
    rt.driver.borrow_mut().close(key);
    Some(conn.origin)
}

/// Closes the pooled connections (`luna.close()`); requests under way go on.
pub(crate) fn close_idle(rt: &Runtime) {
    let idle: Vec<Key> = rt.http_client.borrow().idle.values().flatten().copied().collect();
    for key in idle {
        close_conn(rt, key);
    }
}

/// Driver events of client connections.
pub(crate) fn event(lua: &Lua, rt: &Runtime, event: Event) -> Result<()> {
    let key = event.key;
    let Some(id) = rt.http_client.borrow().conns.get(&key).map(|c| c.exchange) else {
        rt.driver.borrow_mut().close(key);
        return Ok(());
    };
    let Some(id) = id else {
        // Idle: a connection the server closed (or that timed out) leaves the pool.
        let dead = !rt.driver.borrow_mut().proto::<HttpClientConn>(key).is_some_and(|p| p.is_reusable());
        if dead {
            if let Some(origin) = close_conn(rt, key) {
                serve_queue(lua, rt, &origin)?;
            }
        }
        return Ok(());
    };
    if matches!(event.kind, EventKind::News) && advance_tunnel(lua, rt, id, key)? {
        return Ok(());
    }
    if matches!(event.kind, EventKind::News) {
        let (ready, failed, lost_idle) = {
            let mut driver = rt.driver.borrow_mut();
            match driver.proto::<HttpClientConn>(key) {
                Some(p) => (p.is_ready(), p.failure().is_some(), p.lost_idle()),
                None => (false, true, false),
            }
        };
        let retry = {
            let mut state = rt.http_client.borrow_mut();
            let Some(p) = state.exchanges.get_mut(&id) else { return Ok(()) };
            if ready && p.ready.is_none() {
                p.ready = Some(Instant::now());
                // Connected: only a reused connection's request is ever sent again.
                if !p.reused {
                    p.request = None;
                }
            }
            let connect_failed = failed && !ready && !p.fallback.is_empty();
            let can_again = p.request.is_some() && !p.retried && !p.head_given;
            if failed && can_again && ((lost_idle && p.idempotent) || connect_failed) {
                p.retried = lost_idle;
                // The slot passes from the dead connection to its replacement.
                p.opening = true;
                p.stage = Stage::Waiting;
                Some(if connect_failed { Some(p.fallback.remove(0)) } else { None })
            } else {
                None
            }
        };
        if let Some(next) = retry {
            rt.http_client.borrow_mut().conns.remove(&key);
            rt.driver.borrow_mut().close(key);
            return match next {
                Some(addr) => connect(lua, rt, id, addr),
                None => {
                    let Some((host, port)) =
                        rt.http_client.borrow().exchanges.get(&id).map(|p| p.origin.dial())
                    else {
                        return Ok(());
                    };
                    let then: addr::Continuation = Box::new(move |lua, rt, ips| match ips {
                        Ok(ips) if !ips.is_empty() => connect(lua, rt, id, SocketAddr::new(ips[0], port)),
                        Ok(_) => give_up(lua, rt, id, "cannot resolve the host: no addresses".into()),
                        Err(e) => give_up(lua, rt, id, e),
                    });
                    addr::resolve_then(lua, rt, &host, false, then)
                }
            };
        }
    }
    if let Some(p) = rt.http_client.borrow_mut().exchanges.get_mut(&id) {
        wake(rt, p);
    }
    Ok(())
}

/// A tunnel through a proxy: TLS once the proxy agreed, the request once TLS is up. True when
/// the event was the tunnel's.
fn advance_tunnel(lua: &Lua, rt: &Runtime, id: u64, key: Key) -> Result<bool> {
    let (tunnel, tls) = match rt.http_client.borrow().exchanges.get(&id) {
        Some(p) if p.tunnel != Tunnel::No => (p.tunnel, p.connect.tls.clone()),
        _ => return Ok(false),
    };
    let (opened, ready, failed) = {
        let mut driver = rt.driver.borrow_mut();
        let Some(proto) = driver.proto::<HttpClientConn>(key) else { return Ok(false) };
        let opened = if tunnel == Tunnel::Asked { proto.tunnel_opened() } else { None };
        (opened, proto.is_ready(), proto.failure().is_some())
    };
    if failed {
        return Ok(false);
    }
    if let Some(leftover) = opened {
        let Some((config, name)) = tls else { return Ok(false) };
        let started = crate::proto::tls::Tls::client(config, &name)
            .map_err(|e| e.to_string())
            .and_then(|tls| rt.driver.borrow_mut().start_tls(key, tls, &leftover));
        if let Err(e) = started {
            close_conn(rt, key);
            give_up(lua, rt, id, format!("cannot start TLS through the proxy: {e}"))?;
            return Ok(true);
        }
        if let Some(p) = rt.http_client.borrow_mut().exchanges.get_mut(&id) {
            p.tunnel = Tunnel::Securing;
        }
        return Ok(true);
    }
    if tunnel == Tunnel::Securing && ready {
        if let Some(p) = rt.http_client.borrow_mut().exchanges.get_mut(&id) {
            p.tunnel = Tunnel::No;
            p.ready = Some(Instant::now());
        }
        send_on(rt, id, key, false);
        return Ok(true);
    }
    Ok(tunnel == Tunnel::Asked || tunnel == Tunnel::Securing)
}

/// Request `id` is over: its connection goes back to the pool (or to the next request of its
/// origin) if it can be kept, otherwise it closes.
fn finish(lua: &Lua, rt: &Runtime, id: u64) -> Result<()> {
    let Some(p) = rt.http_client.borrow_mut().exchanges.remove(&id) else { return Ok(()) };
    if let Some(waiter) = p.waiter {
        lua.remove_registry_value(waiter)?;
    }
    let Stage::Sent(key) = p.stage else {
        // Still waiting: out of its origin's queue (a lookup that finishes finds it gone, and
        // the slot it held is free).
        if let Some(queue) = rt.http_client.borrow_mut().queued.get_mut(&p.origin) {
            queue.retain(|q| *q != id);
        }
        return serve_queue(lua, rt, &p.origin);
    };
    let now = rt.driver.borrow().now();
    let kept = rt.driver.borrow_mut().proto::<HttpClientConn>(key).is_some_and(|proto| proto.recycle(now));
    if !kept {
        close_conn(rt, key);
        return serve_queue(lua, rt, &p.origin);
    }
    let next = {
        let mut state = rt.http_client.borrow_mut();
        if let Some(conn) = state.conns.get_mut(&key) {
            conn.exchange = None;
        }
        let next = state.queued.get_mut(&p.origin).and_then(VecDeque::pop_front);
        if next.is_none() {
            state.idle.entry(p.origin.clone()).or_default().push(key);
        }
        next
    };
    if let Some(next) = next {
        send_on(rt, next, key, true);
    }
    Ok(())
}

fn seconds(from: Instant, to: Option<Instant>) -> Option<f64> {
    to.map(|t| t.saturating_duration_since(from).as_secs_f64())
}

/// `{dns, connect, first_byte, total, reused}` in seconds from the start (nil for a step that
/// did not happen: a reused connection has no dns or connect).
fn timings(lua: &Lua, p: &Pending, first_byte: Option<Instant>) -> Result<Table> {
    let t = lua.create_table()?;
    if !p.reused {
        t.set("dns", seconds(p.started, p.resolved))?;
        t.set("connect", seconds(p.started, p.ready))?;
    }
    t.set("first_byte", seconds(p.started, first_byte))?;
    t.set("total", p.started.elapsed().as_secs_f64())?;
    t.set("reused", p.reused)?;
    Ok(t)
}

/// What the connection has of the body: for a whole body, everything it can give now (a take
/// decodes only so much of a compressed one, and nothing else would ask again).
fn take_all(proto: &mut HttpClientConn, whole: bool) -> (Vec<u8>, bool) {
    let (mut data, mut done) = proto.take_body();
    while whole && !done && proto.failure().is_none() {
        let (more, end) = proto.take_body();
        if more.is_empty() {
            break;
        }
        data.extend_from_slice(&more);
        done = end;
    }
    (data, done)
}

/// The whole body of request `id` and its timings if it is all there (the request is then
/// over); what came of it so far is kept otherwise.
fn whole_now(
    lua: &Lua,
    rt: &Runtime,
    id: u64,
    key: Key,
    first_byte: Option<Instant>,
) -> Result<Option<(Value, Table)>> {
    if !rt.http_client.borrow().exchanges.get(&id).is_some_and(|p| p.whole) {
        return Ok(None);
    }
    let taken = rt.driver.borrow_mut().proto::<HttpClientConn>(key).and_then(|proto| {
        let taken = take_all(proto, true);
        // A failure is the next call's to report.
        proto.failure().is_none().then_some(taken)
    });
    let Some((data, done)) = taken else { return Ok(None) };
    rt.resume_reading(key);
    settle_body(lua, rt, id, data, done, first_byte)
}

/// Adds `data` to what request `id` keeps of its body (a whole one); once `done`, the request
/// is over: its body (nil when it was streamed) and timings.
fn settle_body(
    lua: &Lua,
    rt: &Runtime,
    id: u64,
    data: Vec<u8>,
    done: bool,
    first_byte: Option<Instant>,
) -> Result<Option<(Value, Table)>> {
    let settled = {
        let mut state = rt.http_client.borrow_mut();
        let Some(p) = state.exchanges.get_mut(&id) else { return Ok(None) };
        if !done {
            if p.whole {
                p.body.extend_from_slice(&data);
            }
            return Ok(None);
        }
        // A body that came in one take is used as it is.
        let body = if p.body.is_empty() {
            data
        } else {
            p.body.extend_from_slice(&data);
            std::mem::take(&mut p.body)
        };
        let body = if p.whole { Value::String(lua.create_string(&body)?) } else { Value::Nil };
        (body, timings(lua, p, first_byte)?)
    };
    finish(lua, rt, id)?;
    Ok(Some(settled))
}

const TIMEOUT: &str = "timeout (the request took longer than its 'timeout')";

/// Wakes `co` at `at` too: a request waiting outside its connection's protocol (for a name, a
/// connection, a tunnel) has no other clock. A wake after the wait ended is harmless (every
/// wait checks again).
fn arm_deadline(lua: &Lua, rt: &Runtime, co: &Thread, at: Option<Instant>) -> Result<()> {
    if let Some(at) = at {
        let timer = lua.create_registry_value(co)?;
        rt.sched.borrow_mut().timers.insert(at, super::super::sched::TimerAction::Wake(timer));
    }
    Ok(())
}

/// `core.http_client_next(id, co)` → what request `id` has next:
/// `"head", status, reason, {name, value, ...}, minor_version[, body, timings]` (a whole body
/// that came with the head); `"data", piece`;
/// `"done", body (whole requests) or nil, timings`; `nil, err`; or `PARK` (`co` is parked
/// until there is more).
fn next(lua: &Lua, (id, co): (u64, Thread)) -> Result<mlua::MultiValue> {
    use mlua::IntoLuaMulti;
    let rt = runtime(lua)?;
    let (key, failure, deadline) = match rt.http_client.borrow_mut().exchanges.get_mut(&id) {
        None => return (Value::Nil, "the request was cancelled").into_lua_multi(lua),
        Some(p) => {
            let key = if let Stage::Sent(k) = p.stage { Some(k) } else { None };
            // The connection's protocol keeps the deadline once the request is on it.
            let outside = key.is_none() || p.tunnel != Tunnel::No;
            if outside && p.deadline.is_some_and(|d| Instant::now() >= d) {
                p.failure.get_or_insert_with(|| TIMEOUT.into());
            }
            (key, p.failure.clone(), p.deadline_timer(outside))
        }
    };
    if let Some(why) = failure {
        finish(lua, &rt, id)?;
        return (Value::Nil, why).into_lua_multi(lua);
    }
    if let Some(key) = key {
        enum Step {
            Head(crate::proto::http::client::ResponseHead),
            Body(Vec<u8>, bool),
            Failed(String),
        }
        let (head_given, whole) =
            rt.http_client.borrow().exchanges.get(&id).map_or((false, false), |p| (p.head_given, p.whole));
        let (step, first_byte) = {
            let mut driver = rt.driver.borrow_mut();
            match driver.proto::<HttpClientConn>(key) {
                None => (Step::Failed("the connection closed".into()), None),
                Some(proto) => {
                    let first = proto.first_byte();
                    let step = match proto.failure() {
                        Some(why) => Step::Failed(why.to_owned()),
                        None if !head_given => match proto.take_head() {
                            Some(head) => Step::Head(head),
                            None => Step::Body(Vec::new(), false),
                        },
                        None => {
                            let (data, done) = take_all(proto, whole);
                            // Reading ahead may have failed it (a limit, bad framing).
                            match proto.failure() {
                                Some(why) => Step::Failed(why.to_owned()),
                                None => Step::Body(data, done),
                            }
                        }
                    };
                    (step, first)
                }
            }
        };
        rt.resume_reading(key);
        match step {
            Step::Failed(why) => {
                finish(lua, &rt, id)?;
                return (Value::Nil, why).into_lua_multi(lua);
            }
            Step::Head(head) => {
                if let Some(p) = rt.http_client.borrow_mut().exchanges.get_mut(&id) {
                    p.head_given = true;
                }
                let fields = lua.create_table_with_capacity(head.headers.len() * 2, 0)?;
                for (name, value) in &head.headers {
                    fields.push(name.as_str())?;
                    fields.push(lua.create_string(value)?)?;
                }
                let head = ("head", head.status, head.reason, fields, head.minor_version);
                // A whole body that came with its head goes along (one call fewer).
                if let Some((body, times)) = whole_now(lua, &rt, id, key, first_byte)? {
                    let (kind, status, reason, fields, minor) = head;
                    return (kind, status, reason, fields, minor, body, times).into_lua_multi(lua);
                }
                return head.into_lua_multi(lua);
            }
            Step::Body(data, done) if head_given => {
                if !whole && !data.is_empty() {
                    return ("data", lua.create_string(&data)?).into_lua_multi(lua);
                }
                if let Some((body, times)) = settle_body(lua, &rt, id, data, done, first_byte)? {
                    return ("done", body, times).into_lua_multi(lua);
                }
            }
            Step::Body(..) => {}
        }
    }
    arm_deadline(lua, &rt, &co, deadline)?;
    let waiter = lua.create_registry_value(co)?;
    let old = match rt.http_client.borrow_mut().exchanges.get_mut(&id) {
        Some(p) => p.waiter.replace(waiter),
        None => Some(waiter),
    };
    if let Some(old) = old {
        lua.remove_registry_value(old)?;
    }
    Value::LightUserData(park_value()).into_lua_multi(lua)
}

/// `core.http_client_write(id, co, piece)` → true when `piece` (nil: the end of the body) is
/// queued, `PARK` when `co` waits for room or for the connection, `nil, err` when the request
/// failed.
fn write(lua: &Lua, (id, co, piece): (u64, Thread, Option<mlua::String>)) -> Result<(Value, Option<String>)> {
    let rt = runtime(lua)?;
    let (key, deadline) = match rt.http_client.borrow_mut().exchanges.get_mut(&id) {
        None => return Ok((Value::Nil, Some("the request was cancelled".into()))),
        Some(p) if p.failure.is_some() => return Ok((Value::Nil, p.failure.clone())),
        Some(p) => {
            let key = match p.stage {
                // Not through a tunnel being set up (the body would go to the proxy in clear).
                Stage::Sent(key) if p.tunnel == Tunnel::No => Some(key),
                _ => None,
            };
            if key.is_none() && p.deadline.is_some_and(|d| Instant::now() >= d) {
                return Ok((Value::Nil, Some(TIMEOUT.into())));
            }
            (key, p.deadline_timer(key.is_none()))
        }
    };
    if let Some(key) = key {
        let queued = {
            let mut driver = rt.driver.borrow_mut();
            match driver.proto::<HttpClientConn>(key) {
                // Not before the connection is up: a failed connect can then go to the next
                // address with nothing of the body sent.
                Some(proto) if proto.failure().is_none() && !proto.is_ready() => None,
                Some(proto) if proto.failure().is_none() => {
                    let queued = proto.queued();
                    if queued < UPLOAD_QUEUE {
                        match &piece {
                            Some(data) => proto.send_body(&data.as_bytes()),
                            None => proto.end_body(),
                        }
                    }
                    Some(queued)
                }
                Some(proto) => return Ok((Value::Nil, proto.failure().map(str::to_owned))),
                None => return Ok((Value::Nil, Some("the connection closed".into()))),
            }
        };
        if queued.is_some_and(|q| q < UPLOAD_QUEUE) {
            rt.flush(key);
            return Ok((Value::Boolean(true), None));
        }
    }
    arm_deadline(lua, &rt, &co, deadline)?;
    let waiter = lua.create_registry_value(co)?;
    if let Some(p) = rt.http_client.borrow_mut().exchanges.get_mut(&id) {
        if let Some(old) = p.waiter.replace(waiter) {
            lua.remove_registry_value(old)?;
        }
    }
    Ok((Value::LightUserData(park_value()), None))
}

/// `core.http_client_cancel(id)`: drops request `id` (its connection closes if the exchange
/// was under way).
fn cancel(lua: &Lua, id: u64) -> Result<()> {
    let rt = runtime(lua)?;
    let key = match rt.http_client.borrow_mut().exchanges.get_mut(&id) {
        Some(p) => match p.stage {
            Stage::Sent(key) => Some(key),
            Stage::Waiting => None,
        },
        None => return Ok(()),
    };
    if let Some(key) = key {
        // Whatever the response still sends cannot be told from the next one's.
        if let Some(proto) = rt.driver.borrow_mut().proto::<HttpClientConn>(key) {
            if !proto.is_done() {
                proto.abort();
            }
        }
    }
    finish(lua, &rt, id)
}

/// `core.http_url_join(base, reference)` → the absolute URL, or `nil, err`.
fn url_join(_: &Lua, (base, reference): (String, String)) -> Result<(Option<String>, Option<String>)> {
    let joined = url::Url::parse(&base).and_then(|b| b.join(&reference));
    Ok(match joined {
        Ok(url) => (Some(url.to_string()), None),
        Err(e) => (None, Some(format!("invalid redirect location '{reference}': {e}"))),
    })
}

/// The `http` table of both modules (`lua/http_client.lua`), built once per state.
pub(crate) fn table(lua: &Lua) -> Result<Table> {
    const KEY: &str = "luna.http_client";
    if let Value::Table(t) = lua.named_registry_value::<Value>(KEY)? {
        return Ok(t);
    }
    let core = lua.create_table()?;
    core.set("PARK", Value::LightUserData(park_value()))?;
    core.set("http_client_start", lua.create_function(start)?)?;
    core.set("http_client_next", lua.create_function(next)?)?;
    core.set("http_client_write", lua.create_function(write)?)?;
    core.set("http_client_cancel", lua.create_function(cancel)?)?;
    core.set("http_url_join", lua.create_function(url_join)?)?;
    core.set(
        "http_client_close_idle",
        lua.create_function(|lua, ()| {
            let rt = runtime(lua)?;
            close_idle(&rt);
            Ok(())
        })?,
    )?;
    // The original client's blocking calls outside a coroutine: one tick, sleeping in the poll.
    core.set(
        "pump",
        lua.create_function(|lua, seconds: f64| {
            super::super::tick(lua, Some(Duration::from_secs_f64(seconds)))
        })?,
    )?;
    let spawn = lua.create_function(super::super::time::spawn)?;
    // `lua/luna.lua`'s header joining, shared with the server's requests.
    super::super::lua_half(lua)?;
    let join_fields: mlua::Function = lua.named_registry_value("luna.join_fields")?;
    let http: Table = lua
        .load(include_str!("../../../lua/http_client.lua"))
        .set_name("=http_client.lua")
        .call((core, spawn, join_fields))?;
    lua.set_named_registry_value(KEY, &http)?;
    Ok(http)
}
