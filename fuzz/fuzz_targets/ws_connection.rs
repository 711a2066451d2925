//! A WebSocket connection (server or client role) fed arbitrary bytes after the upgrade.
//! Byte 0 chooses role and chunking; see `luna::proto::ws::fuzzing::connection`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    luna::proto::ws::fuzzing::connection(data);
});
