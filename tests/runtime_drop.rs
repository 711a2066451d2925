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
             luna.spawn(function() luna.sleep(100) end)",
        )
        .exec()
        .unwrap();
        luna::bind::with_driver(&lua, |d| {
            for _ in 0..10 {
                d.open_udp("127.0.0.1:0".parse().unwrap()).unwrap();
            }
        })
        .unwrap();
        assert!(open_fds() >= before + 12, "poll, waker and 10 sockets are open");
        drop(lua);
        assert_eq!(open_fds(), before, "descriptors left after the state closed");
    }
}
