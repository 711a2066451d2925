//! An HTTP/1.1 client connection fed a server's bytes in pieces; see
//! `luna::proto::fuzzing::http_client`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    luna::proto::fuzzing::http_client(data);
});
