//! The formats clients share with `backbone-cli` outside the wire protocol,
//! pinned to `docs/protocol.md` ("Formats shared by clients").
//!
//! The section ends with a generated block, between
//! `<!-- client-formats:begin -->` and `<!-- client-formats:end -->`: an
//! identity and a device key file, a relationship template, sealed token
//! content, a token reference, a password verifier and a capability in text
//! form, all built by the reference client's own code from fixed inputs.
//! [`protocol_md_client_formats_block_is_current`] fails when the document
//! differs; run it with `UPDATE_VECTORS=1` to rewrite the block instead:
//!
//! ```text
//! UPDATE_VECTORS=1 cargo test -p backbone-client --test shared_formats
//! ```
//!
//! The fixed inputs reuse the names of the protocol's vectors (IDENTITY,
//! DEVICE, CERTIFICATE, CAPABILITY, TOKEN_ID; see `protocol/tests/vectors.rs`)
//! so a reader can follow one key from the wire to the key file.

use std::fmt::Write as _;
use std::path::PathBuf;

use backbone_client::envelope::EncryptionKeypair;
use backbone_client::keyfile::{self, DeviceKeys, IdentityKeys, KeyFile};
use backbone_client::token::{self, PASSWORD_SALT_DOMAIN, SALT_LEN, TokenRef};
use backbone_client::{DeliveryCapability, RelationshipTemplate};
use backbone_protocol::bytes::TokenId;
use backbone_protocol::{DeviceCertificate, Keypair};
use chacha20poly1305::aead::{Aead, KeyInit, Payload};
use chacha20poly1305::{ChaCha20Poly1305, Nonce};

const BEGIN: &str = "<!-- client-formats:begin -->";
const END: &str = "<!-- client-formats:end -->";

/// The password of the verifier vector; the same as in `src/token.rs`'s tests.
const PASSWORD: &str = "correct horse battery staple";

/// The fixed inputs. The names are the ones the document uses.
struct Fixtures {
    /// `IDENTITY`: secret `[0x01; 32]`, as in the protocol's vectors.
    identity: Keypair,
    /// `DEVICE`: secret `[0x02; 32]`, as in the protocol's vectors.
    device: Keypair,
    /// `ENCRYPTION_SECRET`: IDENTITY's X25519 secret, `[0x0e; 32]`.
    encryption: EncryptionKeypair,
    /// `T`: 1 700 000 000 000 ms, when CERTIFICATE was issued.
    time_ms: u64,
    /// `CAPABILITY`: `[0x66; 32]`, as in the protocol's vectors.
    capability: DeliveryCapability,
    /// `TOKEN_ID`: `[0x88; 32]`, as in the protocol's vectors.
    token_id: TokenId,
    /// `TOKEN_KEY`: a token's content key, `[0xcc; 32]`.
    token_key: [u8; token::KEY_LEN],
    /// `SALT`: a token's password salt, `[0x99; 16]`.
    salt: [u8; SALT_LEN],
}

impl Fixtures {
    fn new() -> Self {
        Self {
            identity: Keypair::from_secret_bytes([0x01; 32]),
            device: Keypair::from_secret_bytes([0x02; 32]),
            encryption: EncryptionKeypair::from_secret_bytes([0x0e; 32]),
            time_ms: 1_700_000_000_000,
            capability: DeliveryCapability([0x66; 32]),
            token_id: TokenId([0x88; 32]),
            token_key: [0xcc; token::KEY_LEN],
            salt: [0x99; SALT_LEN],
        }
    }

    fn identity_keys(&self) -> IdentityKeys {
        IdentityKeys {
            signing: self.identity.clone(),
            encryption: self.encryption.clone(),
        }
    }

    /// DEVICE's keys: CERTIFICATE (IDENTITY certifies DEVICE at T) and
    /// IDENTITY's encryption secret.
    fn device_keys(&self) -> DeviceKeys {
        DeviceKeys {
            device: self.device.clone(),
            identity_key: self.identity.public(),
            certificate: DeviceCertificate::issue(
                &self.identity,
                self.device.public(),
                self.time_ms,
            ),
            encryption: self.encryption.clone(),
        }
    }

    fn template(&self) -> RelationshipTemplate {
        RelationshipTemplate {
            owner: self.identity.address(),
            capability: self.capability,
        }
    }

    fn token_ref(&self) -> TokenRef {
        TokenRef {
            id: self.token_id,
            key: self.token_key,
            salt: Some(self.salt),
        }
    }
}

/// Lowercase hex, 32 bytes per line.
fn hex_lines(bytes: &[u8]) -> String {
    bytes
        .chunks(32)
        .map(hex::encode)
        .collect::<Vec<_>>()
        .join("\n")
}

/// Appends a fenced block of `name  value` lines; long values continue
/// indented under their name (the layout of the protocol's vectors).
fn push_block(out: &mut String, lines: &[(&str, Vec<u8>)]) {
    let width = lines.iter().map(|(name, _)| name.len()).max().unwrap_or(0);
    out.push_str("```text\n");
    for (name, bytes) in lines {
        let hex = hex_lines(bytes);
        let mut rows = hex.lines();
        let _ = writeln!(out, "{name:<width$}  {}", rows.next().unwrap_or("(empty)"));
        for row in rows {
            let _ = writeln!(out, "{:<width$}  {row}", "");
        }
    }
    out.push_str("```\n\n");
}

/// The associated data of sealed token content as `docs/protocol.md`
/// states it: the format version, then `backbone token content v1`.
fn token_content_aad() -> Vec<u8> {
    [&[token::CONTENT_VERSION][..], b"backbone token content v1"].concat()
}

fn key_file_text(key_file: &KeyFile) -> String {
    let bytes = keyfile::to_bytes(key_file).expect("the fixtures fit together");
    String::from_utf8(bytes).expect("key files are UTF-8")
}

/// The whole generated block.
fn formats_block() -> String {
    let f = Fixtures::new();
    let mut out = String::from(
        "Generated by `client/tests/shared_formats.rs`; do not edit by hand. IDENTITY, \
         DEVICE, CERTIFICATE, CAPABILITY and TOKEN_ID are the inputs of the \
         [test vectors](#test-vectors); ENCRYPTION_SECRET = `[0x0e; 32]`, \
         TOKEN_KEY = `[0xcc; 32]`, SALT = `[0x99; 16]`.\n\n",
    );

    out.push_str("#### Identity key file\n\n");
    let _ = writeln!(
        out,
        "IDENTITY's key file, with ENCRYPTION_SECRET, whose X25519 public key is `{}`:\n",
        hex::encode(f.encryption.public().as_bytes())
    );
    let _ = writeln!(
        out,
        "```json\n{}```\n",
        key_file_text(&KeyFile::Identity(f.identity_keys()))
    );

    out.push_str("#### Device key file\n\n");
    out.push_str(
        "DEVICE's key file: its own secret, CERTIFICATE and IDENTITY's ENCRYPTION_SECRET.\n\n",
    );
    let _ = writeln!(
        out,
        "```json\n{}```\n",
        key_file_text(&KeyFile::Device(f.device_keys()))
    );

    out.push_str("#### Relationship template\n\n");
    out.push_str("IDENTITY's template with CAPABILITY, 72 bytes.\n\n");
    let template = f.template().to_bytes();
    push_block(
        &mut out,
        &[
            ("magic", template[..8].to_vec()),
            ("owner", template[8..40].to_vec()),
            ("capability", template[40..].to_vec()),
            ("encoding", template.clone()),
        ],
    );

    out.push_str("#### Token content\n\n");
    out.push_str(
        "The template above as a token's content, sealed under TOKEN_KEY: \
         `0x01 ‖ ChaCha20-Poly1305(TOKEN_KEY, nonce, aad, template)`.\n\n",
    );
    let sealed = token::seal_content(&f.token_key, &template).expect("seals");
    let aad = token_content_aad();
    push_block(
        &mut out,
        &[
            ("key", f.token_key.to_vec()),
            ("nonce", vec![0; 12]),
            ("aad", aad),
            ("sealed", sealed),
        ],
    );

    out.push_str("#### Token reference\n\n");
    let _ = writeln!(
        out,
        "For TOKEN_ID, TOKEN_KEY and SALT (a password-protected token):\n\n```text\n{}\n```\n",
        f.token_ref().to_text()
    );

    out.push_str("#### Token password verifier\n\n");
    let _ = writeln!(
        out,
        "Argon2id (version 0x13, 19 456 KiB, 2 passes, 1 lane, 32 bytes) of the password \
         `{PASSWORD}` with the salt `\"backbone token password v1\" ‖ SALT`.\n"
    );
    let verifier = token::derive_verifier(PASSWORD, &f.salt).expect("derives");
    push_block(
        &mut out,
        &[
            ("password", PASSWORD.as_bytes().to_vec()),
            ("salt", [PASSWORD_SALT_DOMAIN, &f.salt[..]].concat()),
            ("verifier", verifier.0.to_vec()),
        ],
    );

    out.push_str("#### Delivery capability\n\n");
    let _ = writeln!(
        out,
        "CAPABILITY in text form: `{}`. Its hash in text form: `{}`.",
        f.capability.to_hex(),
        f.capability.hash()
    );
    out
}

fn protocol_md_path() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../docs/protocol.md")
}

#[test]
fn protocol_md_client_formats_block_is_current() {
    let path = protocol_md_path();
    let current = std::fs::read_to_string(&path)
        .unwrap_or_else(|error| panic!("cannot read {}: {error}", path.display()))
        .replace("\r\n", "\n");
    let start = current
        .find(BEGIN)
        .unwrap_or_else(|| panic!("docs/protocol.md has no {BEGIN} marker"))
        + BEGIN.len();
    let stop = start
        + current[start..]
            .find(END)
            .unwrap_or_else(|| panic!("docs/protocol.md has no {END} marker after {BEGIN}"));
    let wanted = format!("\n{}\n", formats_block().trim_end());
    if std::env::var_os("UPDATE_VECTORS").is_some_and(|value| value == "1") {
        if current[start..stop] != wanted {
            let updated = format!("{}{wanted}{}", &current[..start], &current[stop..]);
            std::fs::write(&path, updated)
                .unwrap_or_else(|error| panic!("cannot write {}: {error}", path.display()));
        }
        return;
    }
    let found = &current[start..stop];
    if found != wanted {
        let first_difference = found
            .lines()
            .zip(wanted.lines())
            .position(|(a, b)| a != b)
            .map_or("one block is a prefix of the other".to_owned(), |line| {
                format!("first difference at line {} of the block", line + 1)
            });
        panic!(
            "docs/protocol.md is stale between {BEGIN} and {END} ({first_difference}).\n\
             If the change to a shared format is intended, regenerate with\n  \
             UPDATE_VECTORS=1 cargo test -p backbone-client --test shared_formats"
        );
    }
}

/// What the vectors show reads back as the same keys, template and
/// reference, so the block documents formats that round-trip, not just
/// bytes that happen to be written.
#[test]
fn the_vectors_parse_back() {
    let f = Fixtures::new();
    let identity = keyfile::parse(key_file_text(&KeyFile::Identity(f.identity_keys())).as_bytes())
        .expect("the identity key file parses");
    assert_eq!(identity.address(), f.identity.address());
    let device = keyfile::parse(key_file_text(&KeyFile::Device(f.device_keys())).as_bytes())
        .expect("the device key file parses");
    assert_eq!(device.address(), f.identity.address());
    assert_eq!(
        device.auth_keys().device.public(),
        f.device.public(),
        "a device key file authenticates with the device's own key"
    );
    assert_eq!(
        device.auth_keys().encryption.public(),
        f.encryption.public(),
        "a device key file holds the identity's encryption key"
    );

    let template = f.template().to_bytes();
    assert_eq!(template.len(), 72);
    assert_eq!(
        RelationshipTemplate::from_bytes(&template),
        Ok(f.template())
    );
    let sealed = token::seal_content(&f.token_key, &template).expect("seals");
    assert_eq!(sealed.len(), 1 + 72 + 16);
    assert_eq!(sealed[0], token::CONTENT_VERSION);
    let documented = ChaCha20Poly1305::new((&f.token_key).into())
        .decrypt(
            &Nonce::default(),
            Payload {
                msg: &sealed[1..],
                aad: &token_content_aad(),
            },
        )
        .expect("the key, nonce and aad the block shows open the content");
    assert_eq!(documented, template);
    assert_eq!(
        token::open_content(&f.token_key, &sealed).expect("opens"),
        template
    );
    assert_eq!(
        f.token_ref().to_text().parse::<TokenRef>(),
        Ok(f.token_ref())
    );
    assert_eq!(
        DeliveryCapability::from_hex(&format!("  {}\n", f.capability.to_hex().to_uppercase())),
        Ok(f.capability),
        "a capability's text is read in either case, whitespace around it ignored"
    );
}

/// The key file rules the document states: other field sets and versions
/// are refused, either case of hex is read.
#[test]
fn key_files_are_read_as_protocol_md_describes() {
    let f = Fixtures::new();
    let text = key_file_text(&KeyFile::Identity(f.identity_keys()));
    let json: serde_json::Value = serde_json::from_str(&text).expect("JSON");
    let with = |change: &dyn Fn(&mut serde_json::Map<String, serde_json::Value>)| {
        let mut object = json.as_object().expect("an object").clone();
        change(&mut object);
        keyfile::parse(serde_json::to_string(&object).expect("encodes").as_bytes())
    };
    assert!(
        with(&|_| {}).is_ok(),
        "compact JSON, not only the written layout"
    );
    assert!(
        with(&|object| {
            let upper = object["signing_secret"]
                .as_str()
                .expect("hex")
                .to_uppercase();
            object.insert("signing_secret".into(), upper.into());
        })
        .is_ok(),
        "upper-case hex"
    );
    assert!(
        with(&|object| {
            object.insert("comment".into(), "mine".into());
        })
        .is_err(),
        "an unknown field"
    );
    assert!(
        with(&|object| {
            object.remove("address");
        })
        .is_err(),
        "a missing field"
    );
    assert_eq!(
        with(&|object| {
            object.insert("version".into(), 2.into());
        })
        .err(),
        Some(keyfile::ParseError::UnsupportedVersion(2))
    );
    assert!(
        with(&|object| {
            let other = Keypair::from_secret_bytes([0x03; 32]).address().to_string();
            object.insert("address".into(), other.into());
        })
        .is_err(),
        "an address that is not the identity key's"
    );
}
