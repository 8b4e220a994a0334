//! libFuzzer target: the real broker's request handlers, started once per
//! process with a memory store and driven over a loopback QUIC connection;
//! every answer is checked. The body lives in
//! `backbone_fuzz::session::session_target`, which the `replay` driver runs too.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| backbone_fuzz::session::session_target(data));
