//! libFuzzer target: a sequence of storage operations applied to the
//! broker's memory store and sled store, every result compared. The body lives in
//! `backbone_fuzz::store_ops::store_ops_target`, which the `replay` driver runs too.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| backbone_fuzz::store_ops::store_ops_target(data));
