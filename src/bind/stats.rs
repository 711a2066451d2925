//! `luna.stats([t])`: one table across transports. Counters are plain integers bumped where the
//! work happens; the call reads them, counts live objects from each module's maps (O(apps),
//! plus one pass over the driver's entries for queued bytes) and fills `t` when given, so a
//! game calling it every frame makes no garbage.

use std::time::Duration;

use super::raw::{Field, Out, RawFn, Stack, Value};
use super::{net, rpc, ws, Runtime};

/// What the runtime counts as it goes.
#[derive(Clone, Copy, Default)]
pub(crate) struct Counters {
    /// Errors raised by user callbacks, handlers and coroutines (reported or raised).
    pub handler_errors: u64,
    pub rpc_in: u64,
    pub rpc_out: u64,
    pub ws_in: u64,
    pub ws_out: u64,
    /// WebSocket connections we closed for an oversized message (1009).
    pub ws_oversize: u64,
    /// ... or for breaking the protocol (1002, 1007).
    pub ws_malformed: u64,
    /// What RPC server and client objects that are gone had counted (their drop fields).
    pub rpc_retired: Census,
    /// `update` calls since the last `stats()`.
    window: UpdateWindow,
}

#[derive(Clone, Copy, Default)]
struct UpdateWindow {
    count: u64,
    total: Duration,
    max: Duration,
    last: Duration,
    handled: u64,
    deferred: u64,
}

impl Counters {
    /// An update (outermost tick) took `took`, ran `handled` units and left `deferred`.
    pub fn update_done(&mut self, took: Duration, handled: u64, deferred: u64) {
        let w = &mut self.window;
        w.count += 1;
        w.total += took;
        w.max = w.max.max(took);
        w.last = took;
        w.handled += handled;
        w.deferred = deferred;
    }
}

/// Live objects and drop counts each module reports.
#[derive(Clone, Copy, Default)]
pub(crate) struct Census {
    pub rpc_sessions: u64,
    pub rpc_clients: u64,
    pub rpc_retransmits: u64,
    pub ws: u64,
    pub ws_clients: u64,
    pub streams: u64,
    pub udp: u64,
    pub listeners: u64,
    pub oversize: u64,
    pub malformed: u64,
    pub flood: u64,
}

/// `luna.stats([t])` → `t` (or a new table): a raw C function whose report the trampoline sets
/// with raw sets (mlua protects each set with a `pcall`, which costs more than the whole report).
pub(crate) struct Stats;

impl RawFn for Stats {
    const NAME: &'static str = "luna.stats([t])";

    fn call(rt: &Runtime, st: &Stack) -> std::result::Result<Out, String> {
        st.report_table(1, Self::NAME)?;
        // The trampoline fills the table after this returns (filling may raise).
        let mut census = Census::default();
        rpc::census(rt, &mut census);
        ws::census(rt, &mut census);
        net::census(rt, &mut census);
        let (traffic, queued) = {
            let driver = rt.driver.borrow();
            (driver.traffic, driver.queued_bytes())
        };
        let w = std::mem::take(&mut rt.counters.borrow_mut().window);
        let c = *rt.counters.borrow();
        let n = |v: u64| v as f64;
        let avg = if w.count > 0 { w.total.as_secs_f64() / w.count as f64 } else { 0.0 };

        let fields: Vec<Field> = vec![
            ("update", "count", n(w.count)),
            ("update", "last", w.last.as_secs_f64()),
            ("update", "max", w.max.as_secs_f64()),
            ("update", "avg", avg),
            ("update", "handled", n(w.handled)),
            ("update", "deferred", n(w.deferred)),
            ("connections", "rpc_sessions", n(census.rpc_sessions)),
            ("connections", "rpc_clients", n(census.rpc_clients)),
            ("connections", "ws", n(census.ws)),
            ("connections", "ws_clients", n(census.ws_clients)),
            ("connections", "streams", n(census.streams)),
            ("connections", "udp", n(census.udp)),
            ("connections", "listeners", n(census.listeners)),
            ("", "bytes_in", n(traffic.bytes_in)),
            ("", "bytes_out", n(traffic.bytes_out)),
            ("", "datagrams_in", n(traffic.datagrams_in)),
            ("", "datagrams_out", n(traffic.datagrams_out)),
            ("", "queued_bytes", n(queued)),
            ("", "messages_in", n(c.rpc_in + c.ws_in)),
            ("", "messages_out", n(c.rpc_out + c.ws_out)),
            ("", "tls_handshake_failures", n(traffic.tls_failures)),
            ("", "handler_errors", n(c.handler_errors)),
            ("rpc", "messages_in", n(c.rpc_in)),
            ("rpc", "messages_out", n(c.rpc_out)),
            ("rpc", "retransmissions", n(census.rpc_retransmits)),
            ("ws", "messages_in", n(c.ws_in)),
            ("ws", "messages_out", n(c.ws_out)),
            ("dropped", "oversize", n(census.oversize + c.ws_oversize)),
            ("dropped", "malformed", n(census.malformed + c.ws_malformed)),
            ("dropped", "flood", n(census.flood)),
        ];
        Ok(Out::one(Value::Report { into: 1, fields }))
    }
}
