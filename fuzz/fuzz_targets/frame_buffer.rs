//! libFuzzer target: a byte stream fed in chunks into the receive buffer
//! (`protocol::codec::FrameBuffer`), every outcome checked against a reference
//! decoding of the whole stream. The body lives in
//! `backbone_fuzz::frame_buffer::frame_buffer_target`, which the `replay` driver runs too.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| backbone_fuzz::frame_buffer::frame_buffer_target(data));
