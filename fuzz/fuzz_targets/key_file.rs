//! libFuzzer target: arbitrary bytes parsed as a key file; what parses
//! holds what loading promises and re-serialises to equal keys. The body lives in
//! `backbone_fuzz::key_file::key_file_target`, which the `replay` driver runs too.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| backbone_fuzz::key_file::key_file_target(data));
