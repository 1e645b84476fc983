#![no_main]
//! See `vubd::fuzzing::desc_chain` for the input layout.

libfuzzer_sys::fuzz_target!(|data: &[u8]| vubd::fuzzing::desc_chain(data));
