//! Fuzz target: bytes from a client into the `:authority` rewriter.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| relay_sidecar::fuzzing::authority(data));
