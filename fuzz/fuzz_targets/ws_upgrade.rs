//! The WebSocket upgrade parsers (server request, client response, URL) on arbitrary bytes.
//! Byte 0 chooses the chunk size and the server's handler set; see
//! `luna::proto::ws::fuzzing::upgrade`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    luna::proto::ws::fuzzing::upgrade(data);
});
