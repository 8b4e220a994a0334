//! libFuzzer target: arbitrary bytes decoded as an identity card, a device
//! certificate and an Auth frame, then verified; nothing may panic. The body
//! lives in `backbone_fuzz::verify_card_and_auth_target`.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| backbone_fuzz::verify_card_and_auth_target(data));
