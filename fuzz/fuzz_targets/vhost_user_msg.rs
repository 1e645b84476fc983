#![no_main]
//! See `vubd::fuzzing::vhost_user_msg` for the input layout.

libfuzzer_sys::fuzz_target!(|data: &[u8]| vubd::fuzzing::vhost_user_msg(data));
