//! A stream protocol (raw bytes, WebSocket server or client session) driven through the
//! driver's contract by a script of transport events and layer-above actions; see
//! `luna::proto::fuzzing::stream_glue`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    luna::proto::fuzzing::stream_glue(data);
});
