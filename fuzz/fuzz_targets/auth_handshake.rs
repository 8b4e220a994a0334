//! libFuzzer target: bytes read as pre-auth frames and clock steps, fed into
//! the broker's auth handshake state machine and checked against a reference
//! model. The body lives in `backbone_fuzz::auth_handshake_target`.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| backbone_fuzz::auth_handshake_target(data));
