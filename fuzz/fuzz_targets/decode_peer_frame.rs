//! libFuzzer target: arbitrary bytes through the node-to-node frame decoder;
//! decoded frames must re-encode canonically. The body lives in
//! `backbone_fuzz::decode_peer_frame_target`.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| backbone_fuzz::decode_peer_frame_target(data));
