#![no_main]
//! Fuzz target: `luna::proto::rpc::fuzzing::session` (seed corpus: `fuzz/corpus/rpc_session/`).

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    luna::proto::rpc::fuzzing::session(data);
});
