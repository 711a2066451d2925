//! An HTTP/1.1 server connection that hands requests over once their head is in, driven like
//! `http_server`; see `luna::proto::fuzzing::http_early_glue`. Uses the `http_server` corpus.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    luna::proto::fuzzing::http_early_glue(data);
});
