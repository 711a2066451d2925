//! Cost of an idle `luna.update()` with 0, 1,000 and 10,000 open sockets, called from Lua,
//! against the floor: a bare `mio::Poll::poll(0)` over the same sockets, also called from Lua.
//!
//! Run with `benches/idle_update.sh` (pinned, both Lua flavours). Rounds alternate ours/peer
//! (A B A B …) and the median, min–max and ratio are printed.

use std::os::fd::AsRawFd;
use std::time::Duration;

use mio::unix::SourceFd;
use mio::{Events, Interest, Poll, Token};
use mlua::{Function, Lua};

const ROUNDS: usize = 5;
const CALLS: u32 = 2_000_000;

fn raise_fd_limit(want: u64) {
    let mut lim = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: plain libc calls with a valid pointer.
    unsafe {
        libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim);
        lim.rlim_cur = want.min(lim.rlim_max);
        libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
    }
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

fn main() -> mlua::Result<()> {
    raise_fd_limit(20_000);
    let lua = Lua::new();
    luna::bind::preload(&lua)?;
    // The peer: its own Poll over the very same sockets (an fd may sit in several epolls).
    let peer = std::rc::Rc::new(std::cell::RefCell::new((Poll::new()?, Events::with_capacity(1024))));
    let p = peer.clone();
    lua.globals().set(
        "peer_poll",
        lua.create_function(move |_, ()| {
            let (poll, events) = &mut *p.borrow_mut();
            poll.poll(events, Some(Duration::ZERO)).map_err(mlua::Error::external)
        })?,
    )?;
    let time_calls: Function = lua
        .load(
            r#"local luna = require("luna")
            return function(which, n)
              local f = which == "ours" and luna.update or peer_poll
              local t0 = os.clock()
              for _ = 1, n do f(0) end
              return (os.clock() - t0) / n * 1e9
            end"#,
        )
        .call(())?;
    println!("lua: {}", lua.load("return jit and jit.version or _VERSION").eval::<String>()?);
    println!(
        "{:>7}  {:>22}  {:>22}  {:>6}",
        "sockets", "luna.update ns (min-max)", "poll(0) ns (min-max)", "ratio"
    );
    let mut open = 0;
    for target in [0usize, 1_000, 10_000] {
        while open < target {
            let fd = luna::bind::with_driver(&lua, |d| {
                let socket = luna::driver::net::udp_bind("127.0.0.1:0".parse().unwrap(), Default::default())?;
                let key = d.open_datagram(socket, None, 16, 0)?;
                Ok::<_, luna::driver::Error>(d.datagram(key).expect("just opened").socket().as_raw_fd())
            })??;
            peer.borrow().0.registry().register(&mut SourceFd(&fd), Token(open), Interest::READABLE)?;
            open += 1;
        }
        time_calls.call::<f64>(("ours", CALLS / 10))?; // warm-up
        time_calls.call::<f64>(("peer", CALLS / 10))?;
        let (mut ours, mut floor) = (Vec::new(), Vec::new());
        for _ in 0..ROUNDS {
            ours.push(time_calls.call::<f64>(("ours", CALLS))?);
            floor.push(time_calls.call::<f64>(("peer", CALLS))?);
        }
        let (lo_o, hi_o) =
            (ours.iter().cloned().fold(f64::MAX, f64::min), ours.iter().cloned().fold(0.0, f64::max));
        let (lo_p, hi_p) =
            (floor.iter().cloned().fold(f64::MAX, f64::min), floor.iter().cloned().fold(0.0, f64::max));
        let (mo, mp) = (median(&mut ours), median(&mut floor));
        println!(
            "{target:>7}  {:>22}  {:>22}  {:>6.2}",
            format!("{mo:.0} ({lo_o:.0}-{hi_o:.0})"),
            format!("{mp:.0} ({lo_p:.0}-{hi_p:.0})"),
            mo / mp
        );
    }
    Ok(())
}
