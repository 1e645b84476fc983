#![no_main]
//! See `blocklayer::drivers::luks::fuzzing` for the input layout.

libfuzzer_sys::fuzz_target!(|data: &[u8]| vubd::fuzzing::luks_header(data));
