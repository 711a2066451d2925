//! A `multipart/form-data` body read as it arrives, in pieces of any size; see
//! `luna::proto::fuzzing::multipart`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    luna::proto::fuzzing::multipart(data);
});
