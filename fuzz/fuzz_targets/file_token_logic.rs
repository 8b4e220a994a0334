//! libFuzzer target: the pure rules under the token and file requests
//! (sizes, the download opener, upload offsets, password attempts, quotas,
//! token content, slot routing) against their documented models. The body lives in
//! `backbone_fuzz::file_token_logic::file_token_logic_target`, which the `replay` driver runs too.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| backbone_fuzz::file_token_logic::file_token_logic_target(data));
