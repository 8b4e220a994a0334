//! libFuzzer target: text forms users copy around (`bbt1:` and `bbf1:`
//! references, addresses, capabilities, policies, templates) parse, print
//! back canonically and parse again to equal values. The body lives in
//! `backbone_fuzz::references::references_target`, which the `replay` driver runs too.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| backbone_fuzz::references::references_target(data));
