//! The runtime lives in the Lua state and dies with it: closing the state closes the poller,
//! its waker and every socket (what LÖVE's `love.event.quit("restart")` relies on).
//! A test binary of its own, so no other test opens descriptors meanwhile.
#![cfg(feature = "vendored")]

use mlua::Lua;

fn open_fds() -> usize {
    std::fs::read_dir("/proc/self/fd").unwrap().count()
}

#[test]
fn closing_the_state_closes_every_descriptor() {
    let before = open_fds();
    for _ in 0..3 {
        let lua = Lua::new();
        luna::bind::preload(&lua).unwrap();
        lua.load(
            "local luna = require('luna')
             luna.set_interval(1, function() end)
             luna.spawn(function() luna.sleep(100) end)
             for _ = 1, 10 do luna.udp.open{host = '127.0.0.1'} end
             local srv = luna.tcp.listen{host = '127.0.0.1', port = 0, on_connection = function(s) end}
             luna.tcp.connect('127.0.0.1', srv.port)",
        )
        .exec()
        .unwrap();
        for _ in 0..20 {
            luna::bind::tick(&lua, Some(std::time::Duration::from_millis(5))).unwrap();
        }
        assert!(
            open_fds() >= before + 15,
            "poll, waker, 10 UDP sockets, a listener and a connection are open"
        );
        drop(lua);
        assert_eq!(open_fds(), before, "descriptors left after the state closed");
    }
}
