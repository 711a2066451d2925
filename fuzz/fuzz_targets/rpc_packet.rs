#![no_main]
//! Fuzz target: `luna::proto::rpc::fuzzing::packet` (seed corpus: `fuzz/corpus/rpc_packet/`).

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    luna::proto::rpc::fuzzing::packet(data);
});
