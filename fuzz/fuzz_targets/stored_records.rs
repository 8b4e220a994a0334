//! libFuzzer target: arbitrary bytes decoded as a record of the broker's
//! sled store; a record that decodes re-encodes to exactly its bytes. The body lives in
//! `backbone_fuzz::stored_records::stored_records_target`, which the `replay` driver runs too.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| backbone_fuzz::stored_records::stored_records_target(data));
