//! Target `references`: arbitrary text through every parser of a text form
//! that users copy around: token references (`bbt1:`, `client/src/token.rs`),
//! file references (`bbf1:`, `client/src/file.rs`), addresses (`bb1…`),
//! delivery capabilities and their hashes (`protocol/src/capability.rs`),
//! inbound policy names, and the binary relationship template a token
//! carries (`client/src/template.rs`).
//!
//! Properties, for each form: parsing never panics, and its error displays;
//! a value that parses prints to a canonical form that parses to an equal
//! value and prints the same again; and that canonical form is the input
//! itself up to what the form's documentation lets a parser ignore
//! (surrounding whitespace, and ASCII case where the form is hex or
//! base32hex). So two different texts never name one value unless they
//! differ only in that, and no text parses to something that prints as
//! another value.

use std::fmt::Display;

use backbone_client::{FileRef, RelationshipTemplate, TokenRef};
use backbone_protocol::Address;
use backbone_protocol::bytes::{FileId, FileSecret, TokenId};
use backbone_protocol::capability::{CapabilityHash, DeliveryCapability};
use backbone_protocol::relationship::InboundPolicy;

/// Which forms an input parsed as, for the tests.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct ParsedForms {
    /// `bbt1:` token reference.
    pub token_ref: bool,
    /// `bbf1:` file reference.
    pub file_ref: bool,
    /// `bb1` address.
    pub address: bool,
    /// 64 hex characters: a capability hash and a capability at once.
    pub capability: bool,
    /// `anyone` or `relationships-only`.
    pub policy: bool,
    /// The binary relationship template.
    pub template: bool,
}

/// Target `references`: see the module documentation.
pub fn references_target(data: &[u8]) {
    parse_references(data);
}

/// Runs every parser over `data` (as UTF-8, invalid sequences replaced) and
/// checks each value that parses.
pub fn parse_references(data: &[u8]) -> ParsedForms {
    let text = String::from_utf8_lossy(data);
    let hex_case = |text: &str| text.trim().to_ascii_lowercase();
    let exact = |text: &str| text.trim().to_owned();
    ParsedForms {
        token_ref: check_form(&text, str::parse::<TokenRef>, TokenRef::to_text, hex_case),
        file_ref: check_form(&text, str::parse::<FileRef>, FileRef::to_text, hex_case),
        // The `bb1` prefix is matched ignoring case, and the base32hex
        // digits are lowercased before decoding.
        address: check_form(&text, str::parse::<Address>, Address::to_string, hex_case),
        capability: check_form(
            &text,
            str::parse::<CapabilityHash>,
            CapabilityHash::to_string,
            hex_case,
        ) & check_form(
            &text,
            DeliveryCapability::from_hex,
            DeliveryCapability::to_hex,
            hex_case,
        ),
        policy: check_form(
            &text,
            str::parse::<InboundPolicy>,
            InboundPolicy::to_string,
            exact,
        ),
        template: check_template(data),
    }
}

/// Checks one text form on `text`; returns whether it parsed.
fn check_form<T, E>(
    text: &str,
    parse: impl Fn(&str) -> Result<T, E>,
    print: impl Fn(&T) -> String,
    normalize: impl Fn(&str) -> String,
) -> bool
where
    T: PartialEq,
    E: Display,
{
    let value = match parse(text) {
        Ok(value) => value,
        Err(error) => {
            // Error messages quote parts of the input; formatting must not panic.
            let _ = error.to_string();
            return false;
        }
    };
    let canonical = print(&value);
    let Ok(again) = parse(&canonical) else {
        panic!("the canonical form {canonical:?} of {text:?} does not parse");
    };
    assert!(
        again == value,
        "{canonical:?} parses to another value than {text:?}"
    );
    assert_eq!(print(&again), canonical, "printing is not stable");
    assert_eq!(
        canonical,
        normalize(text),
        "a text that is not the canonical form up to whitespace and case parsed"
    );
    true
}

/// The template's encoding has a fixed length, so it is canonical: a
/// template that decodes re-encodes to exactly its input.
fn check_template(data: &[u8]) -> bool {
    match RelationshipTemplate::from_bytes(data) {
        Ok(template) => {
            assert_eq!(
                template.to_bytes(),
                data,
                "a template re-encodes to its input"
            );
            true
        }
        Err(error) => {
            let _ = error.to_string();
            false
        }
    }
}

/// Seeds: every form canonical, in upper case, padded with whitespace, and
/// broken in a few ways (wrong prefix, a field short by one digit, a bad
/// checksum, a stray colon).
pub fn references_seeds() -> Vec<Vec<u8>> {
    let token = TokenRef {
        id: TokenId([0x11; 32]),
        key: [0x22; 32],
        salt: None,
    };
    let with_password = TokenRef {
        salt: Some([0x33; 16]),
        ..token
    };
    let file = FileRef {
        id: FileId([0x44; 32]),
        secret: FileSecret([0x55; 32]),
        key: [0x66; 32],
    };
    let address = Address([0x77; 32]).to_string();
    let capability = DeliveryCapability([0x88; 32]);
    let mut texts = vec![
        token.to_text(),
        with_password.to_text(),
        file.to_text(),
        address.clone(),
        capability.to_hex(),
        capability.hash().to_string(),
        InboundPolicy::Anyone.to_string(),
        InboundPolicy::RelationshipsOnly.to_string(),
    ];
    let canonical = texts.clone();
    for text in &canonical {
        texts.push(text.to_ascii_uppercase());
        texts.push(format!(" \t{text}\n"));
        texts.push(text[..text.len() - 1].to_owned());
        texts.push(format!("{text}:"));
    }
    // A mistyped address: the checksum catches it.
    let mut typo = address.into_bytes();
    let last = typo.len() - 1;
    typo[last] = if typo[last] == b'0' { b'1' } else { b'0' };
    texts.push(String::from_utf8(typo).expect("ASCII"));
    texts.push("bbt1:".into());
    texts.push("bbf1:::".into());
    let mut seeds: Vec<Vec<u8>> = texts.into_iter().map(String::into_bytes).collect();
    seeds.push(
        RelationshipTemplate {
            owner: Address([0x99; 32]),
            capability,
        }
        .to_bytes(),
    );
    seeds
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_form_parses_from_its_seed() {
        let parsed: Vec<ParsedForms> = references_seeds()
            .iter()
            .map(|seed| parse_references(seed))
            .collect();
        assert!(parsed.iter().any(|p| p.token_ref));
        assert!(parsed.iter().any(|p| p.file_ref));
        assert!(parsed.iter().any(|p| p.address));
        assert!(parsed.iter().any(|p| p.capability));
        assert!(parsed.iter().any(|p| p.policy));
        assert!(parsed.iter().any(|p| p.template));
        // Upper case and padding parse too (they are within the allowance).
        let upper = TokenRef {
            id: TokenId([0xab; 32]),
            key: [0xcd; 32],
            salt: None,
        }
        .to_text()
        .replace("ab", "AB");
        assert!(parse_references(format!("  {upper} ").as_bytes()).token_ref);
    }

    #[test]
    fn a_parser_accepting_a_non_canonical_text_is_caught() {
        // A parser that ignored a trailing "x" would accept a text whose
        // canonical form differs by more than case and whitespace.
        let lenient = |text: &str| text.trim_end_matches('x').parse::<InboundPolicy>();
        let caught = std::panic::catch_unwind(|| {
            check_form("anyonex", lenient, InboundPolicy::to_string, |t: &str| {
                t.trim().to_owned()
            })
        });
        assert!(caught.is_err());
    }
}
