#![no_main]
//! Fuzz target: `luna::proto::rpc::fuzzing::handshake` (seed corpus: `fuzz/corpus/rpc_handshake/`).

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    luna::proto::rpc::fuzzing::handshake(data);
});
