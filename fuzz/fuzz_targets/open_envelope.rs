//! libFuzzer target: arbitrary bytes opened as an end-to-end envelope; only
//! envelopes the fixed sender really sealed may open. The body lives in
//! `backbone_fuzz::open_envelope_target`.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| backbone_fuzz::open_envelope_target(data));
