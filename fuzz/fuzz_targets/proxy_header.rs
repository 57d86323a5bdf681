//! Fuzz target: `cutover::fuzzing::proxy_header` (see that function for the checks).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| cutover::fuzzing::proxy_header(data));
