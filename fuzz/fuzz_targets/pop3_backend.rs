//! Fuzz target: `cutover::fuzzing::pop3_backend` (see that function for the input format).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| cutover::fuzzing::pop3_backend(data));
