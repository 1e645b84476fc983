#![no_main]
//! See `qcow::fuzzing` for the input layout.

libfuzzer_sys::fuzz_target!(|data: &[u8]| qcow::fuzzing::qcow2_meta(data));
