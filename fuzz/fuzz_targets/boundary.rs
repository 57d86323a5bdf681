//! Fuzz target: `cutover::fuzzing::boundary` (see that function for the checks).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| cutover::fuzzing::boundary(data));
