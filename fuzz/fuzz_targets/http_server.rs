//! An HTTP/1.1 server connection driven through the driver's contract by a script of transport
//! events and answers from the layer above; see `luna::proto::fuzzing::http_glue`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    luna::proto::fuzzing::http_glue(data);
});
