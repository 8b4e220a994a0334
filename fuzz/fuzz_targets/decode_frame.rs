//! libFuzzer target: arbitrary bytes through the frame decoder, in both
//! phases; decoded frames must re-encode canonically. The body lives in
//! `backbone_fuzz::decode_frame_target` so the stable `replay` driver runs
//! exactly the same checks.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| backbone_fuzz::decode_frame_target(data));
