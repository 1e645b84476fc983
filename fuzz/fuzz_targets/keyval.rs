#![no_main]
//! See `vubd::fuzzing::keyval` for the input layout.

libfuzzer_sys::fuzz_target!(|data: &[u8]| vubd::fuzzing::keyval(data));
