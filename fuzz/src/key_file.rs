//! Target `key_file`: arbitrary bytes parsed as the contents of an identity
//! or device key file with `backbone_client::keyfile::parse`, the function
//! `keyfile::load` calls once it has read a file.
//!
//! Properties: parsing never panics and its errors display; a parsed file
//! holds what loading promises (a device's certificate verifies, names the
//! device's own key and the identity key, and the address written in the
//! file is the keys' address); and it re-serialises with
//! `keyfile::to_bytes` (what `save` writes) to contents that parse to equal
//! keys and serialise to the same bytes again.

use backbone_client::keyfile::{self, KeyFile};
use backbone_protocol::{Address, Keypair};

/// Target `key_file`: see the module documentation.
pub fn key_file_target(data: &[u8]) {
    parse_key_file(data);
}

/// Parses `data` as a key file and checks what parses; returns it.
pub fn parse_key_file(data: &[u8]) -> Option<KeyFile> {
    let key_file = match keyfile::parse(data) {
        Ok(key_file) => key_file,
        Err(error) => {
            let _ = error.to_string();
            return None;
        }
    };
    check_invariants(&key_file, data);
    let written = keyfile::to_bytes(&key_file)
        .unwrap_or_else(|reason| panic!("a parsed key file does not serialise: {reason}"));
    let again = keyfile::parse(&written)
        .unwrap_or_else(|error| panic!("a re-serialised key file does not parse: {error}"));
    assert_same_keys(&key_file, &again);
    assert_eq!(
        keyfile::to_bytes(&again).expect("it serialised once"),
        written,
        "serialising is not stable"
    );
    Some(key_file)
}

/// What `load` promises about a key file it returns.
fn check_invariants(key_file: &KeyFile, data: &[u8]) {
    if let KeyFile::Device(keys) = key_file {
        assert!(
            keys.certificate.verify().is_ok(),
            "a device certificate that does not verify"
        );
        assert_eq!(
            keys.certificate.device_key,
            keys.device.public(),
            "a certificate for another device key"
        );
        assert_eq!(
            keys.certificate.identity_key, keys.identity_key,
            "a certificate from another identity"
        );
    }
    // The file parsed, so it is a JSON object with an "address" string; the
    // address written in it must be the keys' own.
    let json: serde_json::Value = serde_json::from_slice(data).expect("a key file is JSON");
    let written: Address = json["address"]
        .as_str()
        .expect("a key file names its address")
        .parse()
        .expect("a key file's address parses");
    assert_eq!(
        written,
        key_file.address(),
        "the file names another address"
    );
}

fn assert_same_keys(a: &KeyFile, b: &KeyFile) {
    let secret = |key: &Keypair| key.secret_bytes();
    match (a, b) {
        (KeyFile::Identity(a), KeyFile::Identity(b)) => {
            assert_eq!(secret(&a.signing), secret(&b.signing));
            assert_eq!(a.encryption.secret_bytes(), b.encryption.secret_bytes());
        }
        (KeyFile::Device(a), KeyFile::Device(b)) => {
            assert_eq!(secret(&a.device), secret(&b.device));
            assert_eq!(a.identity_key, b.identity_key);
            assert_eq!(a.certificate, b.certificate);
            assert_eq!(a.encryption.secret_bytes(), b.encryption.secret_bytes());
        }
        _ => panic!("a key file changed kind when re-serialised"),
    }
}

/// Seeds: an identity and a device key file as `save` writes them, compact
/// and with upper-case hex, and a few refusals (another version, a wrong
/// address, a certificate for another device, a missing field).
pub fn key_file_seeds() -> Vec<Vec<u8>> {
    use backbone_client::envelope::EncryptionKeypair;
    use backbone_client::keyfile::{DeviceKeys, IdentityKeys};
    use backbone_protocol::DeviceCertificate;

    let identity = IdentityKeys {
        signing: Keypair::from_secret_bytes([1; 32]),
        encryption: EncryptionKeypair::from_secret_bytes([2; 32]),
    };
    let device = Keypair::from_secret_bytes([3; 32]);
    let device_keys = DeviceKeys {
        identity_key: identity.signing.public(),
        certificate: DeviceCertificate::issue(&identity.signing, device.public(), 1_000),
        device,
        encryption: identity.encryption.clone(),
    };
    let identity_file =
        keyfile::to_bytes(&KeyFile::Identity(identity)).expect("identity keys serialise");
    let device_file =
        keyfile::to_bytes(&KeyFile::Device(device_keys)).expect("device keys serialise");
    let text = |bytes: &[u8]| String::from_utf8(bytes.to_vec()).expect("JSON is UTF-8");
    let compact = |bytes: &[u8]| {
        let value: serde_json::Value = serde_json::from_slice(bytes).expect("JSON");
        serde_json::to_vec(&value).expect("JSON")
    };
    let replace = |bytes: &[u8], from: &str, to: &str| text(bytes).replacen(from, to, 1);
    let mut seeds = vec![
        identity_file.clone(),
        device_file.clone(),
        compact(&identity_file),
        compact(&device_file),
        text(&identity_file).to_ascii_uppercase().into_bytes(),
        replace(&identity_file, "\"version\": 1", "\"version\": 2").into_bytes(),
        replace(
            &device_file,
            "\"issued_at_ms\": 1000",
            "\"issued_at_ms\": 1001",
        )
        .into_bytes(),
        replace(&identity_file, "\"address\": \"bb1", "\"address\": \"bb10").into_bytes(),
    ];
    // Upper-case hex in the secrets only (the kind must stay lower case).
    let upper_secret =
        text(&identity_file).replace(&hex::encode([1u8; 32]), &hex::encode_upper([1u8; 32]));
    seeds.push(upper_secret.into_bytes());
    // The device file without its certificate.
    let mut value: serde_json::Value = serde_json::from_slice(&device_file).expect("JSON");
    value
        .as_object_mut()
        .expect("an object")
        .remove("certificate");
    seeds.push(serde_json::to_vec(&value).expect("JSON"));
    seeds
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_seeds_parse_or_are_refused_as_intended() {
        let parsed: Vec<bool> = key_file_seeds()
            .iter()
            .map(|seed| parse_key_file(seed).is_some())
            .collect();
        assert_eq!(
            parsed,
            [
                true, true, true, true, false, false, false, false, true, false
            ]
        );
    }
}
