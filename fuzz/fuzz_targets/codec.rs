//! Fuzz target: text from the relay into the codec, both dialects.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| relay_sidecar::fuzzing::codec(data));
