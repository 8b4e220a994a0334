//! Key files: the secrets of an identity or of one of its devices, on disk.
//!
//! A key file is a small JSON document. An identity key file holds the
//! identity's ed25519 signing secret and its X25519 encryption secret:
//!
//! ```json
//! {
//!   "kind": "backbone-identity-key",
//!   "version": 1,
//!   "address": "bb1…",
//!   "signing_secret": "<64 hex digits>",
//!   "encryption_secret": "<64 hex digits>"
//! }
//! ```
//!
//! A device key file holds the device's own signing secret, the identity's
//! encryption secret (every device of an identity must decrypt envelopes
//! sealed to the identity) and the device certificate the identity issued:
//!
//! ```json
//! {
//!   "kind": "backbone-device-key",
//!   "version": 1,
//!   "address": "bb1…",
//!   "device_secret": "<64 hex digits>",
//!   "encryption_secret": "<64 hex digits>",
//!   "certificate": {
//!     "identity_key": "<64 hex digits>",
//!     "device_key": "<64 hex digits>",
//!     "issued_at_ms": 1700000000000,
//!     "signature": "<128 hex digits>"
//!   }
//! }
//! ```
//!
//! `address` is the identity's address, written for humans reading the
//! file. It is recomputed on load and a mismatch is treated as corruption,
//! as is a device certificate that does not verify or names another device
//! key.
//!
//! Files are written atomically with mode 0600 (a temporary file in the same
//! directory, flushed to disk, then moved into place), and loading refuses a
//! file that its group or other users can access, as ssh does for private
//! keys.

use std::fmt;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};

use backbone_protocol::bytes::Signature;
use backbone_protocol::{Address, DeviceCertificate, IdentityCard, Keypair, PublicKey};
use hex::FromHex;
use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::envelope::EncryptionKeypair;

/// The `kind` of an identity key file.
pub const IDENTITY_KIND: &str = "backbone-identity-key";

/// The `kind` of a device key file.
pub const DEVICE_KIND: &str = "backbone-device-key";

/// The key file format version this module writes and reads.
pub const VERSION: u64 = 1;

/// Key files are a few hundred bytes; anything much larger is not one, and
/// is not read into memory.
const MAX_FILE_LEN: u64 = 64 * 1024;

/// The mode key files are created with: read and write for the owner only.
#[cfg(unix)]
const PRIVATE_MODE: u32 = 0o600;

/// The keys of an identity: the root of trust for its address.
#[derive(Clone, Debug)]
pub struct IdentityKeys {
    /// The identity's ed25519 key; its hash is the address.
    pub signing: Keypair,
    /// The X25519 key envelopes to this identity are sealed to.
    pub encryption: EncryptionKeypair,
}

impl IdentityKeys {
    /// Fresh identity keys from the operating system's secure random source.
    pub fn generate() -> Self {
        Self {
            signing: Keypair::generate(),
            encryption: EncryptionKeypair::generate(),
        }
    }

    /// The identity's address.
    pub fn address(&self) -> Address {
        self.signing.address()
    }

    /// The identity's signed card, publishing its encryption key.
    pub fn card(&self, created_at_ms: u64) -> IdentityCard {
        IdentityCard::sign(&self.signing, self.encryption.public(), created_at_ms)
    }
}

/// The keys of one device of an identity.
#[derive(Clone, Debug)]
pub struct DeviceKeys {
    /// The device's own ed25519 key, which it authenticates with.
    pub device: Keypair,
    /// The identity's signing key (equal to `certificate.identity_key`).
    pub identity_key: PublicKey,
    /// The identity's certificate for [`DeviceKeys::device`].
    pub certificate: DeviceCertificate,
    /// The identity's encryption key pair, so the device can open envelopes.
    pub encryption: EncryptionKeypair,
}

impl DeviceKeys {
    /// Creates keys for a new device of `identity`, with a certificate
    /// issued at `issued_at_ms`.
    pub fn issue(identity: &IdentityKeys, issued_at_ms: u64) -> Self {
        let device = Keypair::generate();
        let certificate =
            DeviceCertificate::issue(&identity.signing, device.public(), issued_at_ms);
        Self {
            device,
            identity_key: identity.signing.public(),
            certificate,
            encryption: identity.encryption.clone(),
        }
    }

    /// The address of the identity this device belongs to.
    pub fn address(&self) -> Address {
        self.identity_key.address()
    }

    /// Checks that the parts belong together: the certificate verifies, is
    /// for this device key, and was issued by `identity_key`.
    fn check(&self) -> Result<(), &'static str> {
        if self.certificate.identity_key != self.identity_key {
            return Err("the device certificate was issued by another identity");
        }
        if self.certificate.device_key != self.device.public() {
            return Err("the device certificate is for another device key");
        }
        self.certificate
            .verify()
            .map_err(|_| "the device certificate signature is invalid")
    }
}

/// The contents of a key file.
#[derive(Clone, Debug)]
pub enum KeyFile {
    /// An identity's own keys.
    Identity(IdentityKeys),
    /// The keys of one device of an identity.
    Device(DeviceKeys),
}

/// The two kinds of key file.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KeyKind {
    /// An identity key file.
    Identity,
    /// A device key file.
    Device,
}

impl KeyKind {
    /// The `kind` string in the file.
    pub fn as_str(self) -> &'static str {
        match self {
            KeyKind::Identity => IDENTITY_KIND,
            KeyKind::Device => DEVICE_KIND,
        }
    }
}

impl fmt::Display for KeyKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            KeyKind::Identity => "identity",
            KeyKind::Device => "device",
        })
    }
}

/// What a client needs to authenticate and to open envelopes, whatever
/// kind of key file it was started with.
#[derive(Clone, Copy, Debug)]
pub struct AuthKeys<'a> {
    /// The identity's signing key; the session's address is its hash.
    pub identity_key: PublicKey,
    /// The key that signs the auth challenge: the device key, or the
    /// identity key itself when the identity acts as its own device.
    pub device: &'a Keypair,
    /// The device certificate, or `None` when the identity key signs.
    pub certificate: Option<DeviceCertificate>,
    /// The identity's encryption key pair.
    pub encryption: &'a EncryptionKeypair,
}

impl KeyFile {
    /// Which kind of key file this is.
    pub fn kind(&self) -> KeyKind {
        match self {
            KeyFile::Identity(_) => KeyKind::Identity,
            KeyFile::Device(_) => KeyKind::Device,
        }
    }

    /// The identity's address.
    pub fn address(&self) -> Address {
        match self {
            KeyFile::Identity(keys) => keys.address(),
            KeyFile::Device(keys) => keys.address(),
        }
    }

    /// The keys to authenticate with and to open envelopes with.
    pub fn auth_keys(&self) -> AuthKeys<'_> {
        match self {
            KeyFile::Identity(keys) => AuthKeys {
                identity_key: keys.signing.public(),
                device: &keys.signing,
                certificate: None,
                encryption: &keys.encryption,
            },
            KeyFile::Device(keys) => AuthKeys {
                identity_key: keys.identity_key,
                device: &keys.device,
                certificate: Some(keys.certificate),
                encryption: &keys.encryption,
            },
        }
    }
}

/// How [`save`] behaves.
#[derive(Clone, Copy, Debug, Default)]
pub struct SaveOptions {
    /// Replace an existing file at the path. Off by default, so a key is
    /// never lost by saving another one over it.
    pub overwrite: bool,
}

/// Why a key file could not be saved or loaded.
#[derive(Debug, Error)]
pub enum KeyFileError {
    /// Reading or writing the file failed.
    #[error("key file {}: {source}", path.display())]
    Io {
        /// The file (or its temporary sibling) being accessed.
        path: PathBuf,
        /// The underlying error.
        source: io::Error,
    },
    /// A file already exists where a new key file was to be saved.
    #[error("key file {} already exists; refusing to overwrite it", .0.display())]
    Exists(PathBuf),
    /// The file is not a valid key file.
    #[error("key file {} is corrupt: {reason}", path.display())]
    Corrupt {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// The file is a valid key file of another kind than asked for.
    #[error("key file {} is a {found} key file, but a {expected} key file is needed", path.display())]
    WrongKind {
        /// The file.
        path: PathBuf,
        /// The kind asked for.
        expected: KeyKind,
        /// The kind in the file.
        found: KeyKind,
    },
    /// The file was written by a newer (or unknown) format version.
    #[error("key file {} has unsupported version {version} (this client reads version {VERSION})", path.display())]
    UnsupportedVersion {
        /// The file.
        path: PathBuf,
        /// The version in the file.
        version: u64,
    },
    /// The file can be accessed by its group or by other users, so its
    /// secrets may have leaked; it is refused, as ssh refuses such keys.
    #[error(
        "key file {} is accessible by group or others (mode {mode:04o}); private keys must not be, \
         run `chmod 600 {}` if you are sure nobody else has read it",
        path.display(),
        path.display()
    )]
    InsecurePermissions {
        /// The file.
        path: PathBuf,
        /// Its permission bits.
        mode: u32,
    },
    /// The keys to save do not belong together (for example a device
    /// certificate for another device key); saving them would write a file
    /// that cannot be loaded.
    #[error("refusing to save inconsistent keys to {}: {reason}", path.display())]
    Inconsistent {
        /// The file that was to be written.
        path: PathBuf,
        /// What does not fit.
        reason: &'static str,
    },
}

/// Saves `key_file` to `path` atomically, readable by the owner only.
///
/// The keys are written to a temporary file in the same directory, flushed
/// to disk and then moved to `path`, so a crash leaves either no file or a
/// complete one. Unless `options.overwrite` is set, an existing file at
/// `path` is left untouched and [`KeyFileError::Exists`] is returned; the
/// check and the move are one atomic step, so there is no race.
pub fn save(path: &Path, key_file: &KeyFile, options: SaveOptions) -> Result<(), KeyFileError> {
    let contents = to_bytes(key_file).map_err(|reason| KeyFileError::Inconsistent {
        path: path.to_owned(),
        reason,
    })?;

    if !options.overwrite && path.symlink_metadata().is_ok() {
        // Checked early only to avoid needless work; the atomic check is
        // the hard link below.
        return Err(KeyFileError::Exists(path.to_owned()));
    }

    let directory = match path.parent() {
        Some(parent) if !parent.as_os_str().is_empty() => parent,
        _ => Path::new("."),
    };
    let file_name = path.file_name().ok_or_else(|| KeyFileError::Io {
        path: path.to_owned(),
        source: io::Error::new(io::ErrorKind::InvalidInput, "path has no file name"),
    })?;
    let mut suffix = [0u8; 8];
    rand::fill(&mut suffix[..]);
    let mut temp_name = std::ffi::OsString::from(".");
    temp_name.push(file_name);
    temp_name.push(format!(".tmp-{}", hex::encode(suffix)));
    let temp_path = directory.join(temp_name);

    let result = write_private(&temp_path, &contents).and_then(|()| {
        if options.overwrite {
            fs::rename(&temp_path, path).map_err(|source| KeyFileError::Io {
                path: path.to_owned(),
                source,
            })
        } else {
            // A hard link, unlike a rename, fails if the target exists.
            fs::hard_link(&temp_path, path).map_err(|source| {
                if source.kind() == io::ErrorKind::AlreadyExists {
                    KeyFileError::Exists(path.to_owned())
                } else {
                    KeyFileError::Io {
                        path: path.to_owned(),
                        source,
                    }
                }
            })
        }
    });
    // After a rename the temporary file is gone; after a link or a failure
    // it must be removed. Failing to remove it leaves a private file behind,
    // which is untidy but not worth failing the save for.
    let _ = fs::remove_file(&temp_path);
    result?;

    // Flush the directory entry too, so the new name survives a crash.
    File::open(directory)
        .and_then(|dir| dir.sync_all())
        .map_err(|source| KeyFileError::Io {
            path: directory.to_owned(),
            source,
        })
}

/// The contents [`save`] writes for `key_file`: the JSON document described
/// in the module documentation, pretty-printed, and a newline. Device keys
/// that do not belong together are refused with the reason, since they
/// would make a file that cannot be loaded.
pub fn to_bytes(key_file: &KeyFile) -> Result<Vec<u8>, &'static str> {
    let mut contents = match key_file {
        KeyFile::Identity(keys) => serde_json::to_vec_pretty(&IdentityFile::from_keys(keys)),
        KeyFile::Device(keys) => {
            keys.check()?;
            serde_json::to_vec_pretty(&DeviceFile::from_keys(keys))
        }
    }
    // These structs hold only strings and integers, which JSON always encodes.
    .expect("a key file serializes to JSON");
    contents.push(b'\n');
    Ok(contents)
}

/// Why the contents of a key file were refused by [`parse`].
#[derive(Clone, Debug, Error, PartialEq, Eq)]
pub enum ParseError {
    /// The contents are not a valid key file; the reason says why.
    #[error("{0}")]
    Corrupt(String),
    /// A key file of a newer (or unknown) format version.
    #[error("unsupported version {0} (this client reads version {VERSION})")]
    UnsupportedVersion(u64),
}

/// Parses the contents of a key file of either kind: what [`load`] does
/// once it has checked the file's permissions and size and read it. Public
/// so that contents from elsewhere can be checked without a file (the fuzz
/// target `key_file` does).
pub fn parse(contents: &[u8]) -> Result<KeyFile, ParseError> {
    let corrupt = |error: serde_json::Error| ParseError::Corrupt(error.to_string());
    // Kind and version are read first, so a file from a newer client is
    // reported as such rather than as corrupt.
    let header: Header = serde_json::from_slice(contents).map_err(corrupt)?;
    if header.version != VERSION {
        return Err(ParseError::UnsupportedVersion(header.version));
    }
    match header.kind.as_str() {
        IDENTITY_KIND => {
            let file: IdentityFile = serde_json::from_slice(contents).map_err(corrupt)?;
            file.into_keys()
                .map(KeyFile::Identity)
                .map_err(ParseError::Corrupt)
        }
        DEVICE_KIND => {
            let file: DeviceFile = serde_json::from_slice(contents).map_err(corrupt)?;
            file.into_keys()
                .map(KeyFile::Device)
                .map_err(ParseError::Corrupt)
        }
        other => Err(ParseError::Corrupt(format!("unknown kind {other:?}"))),
    }
}

/// Creates `path` (which must not exist) with mode 0600 and writes `contents` durably.
fn write_private(path: &Path, contents: &[u8]) -> Result<(), KeyFileError> {
    let io_error = |source| KeyFileError::Io {
        path: path.to_owned(),
        source,
    };
    let mut options = OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
        options.mode(PRIVATE_MODE);
        let mut file = options.open(path).map_err(io_error)?;
        // The umask can only clear bits from the mode above; setting it
        // again makes it exactly 0600 whatever the umask.
        file.set_permissions(fs::Permissions::from_mode(PRIVATE_MODE))
            .map_err(io_error)?;
        file.write_all(contents).map_err(io_error)?;
        file.sync_all().map_err(io_error)
    }
    #[cfg(not(unix))]
    {
        let mut file = options.open(path).map_err(io_error)?;
        file.write_all(contents).map_err(io_error)?;
        file.sync_all().map_err(io_error)
    }
}

/// Loads a key file of either kind.
pub fn load(path: &Path) -> Result<KeyFile, KeyFileError> {
    let io_error = |source| KeyFileError::Io {
        path: path.to_owned(),
        source,
    };
    let corrupt = |reason: String| KeyFileError::Corrupt {
        path: path.to_owned(),
        reason,
    };

    let file = File::open(path).map_err(io_error)?;
    // Permissions are checked on the open file, so they are those of the
    // file actually read even if the path is swapped meanwhile.
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = file.metadata().map_err(io_error)?.permissions().mode() & 0o7777;
        if mode & 0o077 != 0 {
            return Err(KeyFileError::InsecurePermissions {
                path: path.to_owned(),
                mode,
            });
        }
    }
    let mut contents = Vec::new();
    file.take(MAX_FILE_LEN + 1)
        .read_to_end(&mut contents)
        .map_err(io_error)?;
    if contents.len() as u64 > MAX_FILE_LEN {
        return Err(corrupt(format!("larger than {MAX_FILE_LEN} bytes")));
    }
    parse(&contents).map_err(|error| match error {
        ParseError::Corrupt(reason) => corrupt(reason),
        ParseError::UnsupportedVersion(version) => KeyFileError::UnsupportedVersion {
            path: path.to_owned(),
            version,
        },
    })
}

/// Loads an identity key file; a device key file is [`KeyFileError::WrongKind`].
pub fn load_identity(path: &Path) -> Result<IdentityKeys, KeyFileError> {
    match load(path)? {
        KeyFile::Identity(keys) => Ok(keys),
        other => Err(wrong_kind(path, KeyKind::Identity, other.kind())),
    }
}

/// Loads a device key file; an identity key file is [`KeyFileError::WrongKind`].
pub fn load_device(path: &Path) -> Result<DeviceKeys, KeyFileError> {
    match load(path)? {
        KeyFile::Device(keys) => Ok(keys),
        other => Err(wrong_kind(path, KeyKind::Device, other.kind())),
    }
}

fn wrong_kind(path: &Path, expected: KeyKind, found: KeyKind) -> KeyFileError {
    KeyFileError::WrongKind {
        path: path.to_owned(),
        expected,
        found,
    }
}

/// The fields every key file starts with.
#[derive(Deserialize)]
struct Header {
    kind: String,
    version: u64,
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct IdentityFile {
    kind: String,
    version: u64,
    address: String,
    signing_secret: String,
    encryption_secret: String,
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct DeviceFile {
    kind: String,
    version: u64,
    address: String,
    device_secret: String,
    encryption_secret: String,
    certificate: CertificateFile,
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct CertificateFile {
    identity_key: String,
    device_key: String,
    issued_at_ms: u64,
    signature: String,
}

impl IdentityFile {
    fn from_keys(keys: &IdentityKeys) -> Self {
        Self {
            kind: IDENTITY_KIND.to_owned(),
            version: VERSION,
            address: keys.address().to_string(),
            signing_secret: hex::encode(keys.signing.secret_bytes()),
            encryption_secret: hex::encode(keys.encryption.secret_bytes()),
        }
    }

    fn into_keys(self) -> Result<IdentityKeys, String> {
        let keys = IdentityKeys {
            signing: Keypair::from_secret_bytes(decode_hex(
                "signing_secret",
                &self.signing_secret,
            )?),
            encryption: EncryptionKeypair::from_secret_bytes(decode_hex(
                "encryption_secret",
                &self.encryption_secret,
            )?),
        };
        check_address(&self.address, &keys.address())?;
        Ok(keys)
    }
}

impl DeviceFile {
    fn from_keys(keys: &DeviceKeys) -> Self {
        let certificate = &keys.certificate;
        Self {
            kind: DEVICE_KIND.to_owned(),
            version: VERSION,
            address: keys.address().to_string(),
            device_secret: hex::encode(keys.device.secret_bytes()),
            encryption_secret: hex::encode(keys.encryption.secret_bytes()),
            certificate: CertificateFile {
                identity_key: hex::encode(certificate.identity_key.as_bytes()),
                device_key: hex::encode(certificate.device_key.as_bytes()),
                issued_at_ms: certificate.issued_at_ms,
                signature: hex::encode(certificate.signature.as_bytes()),
            },
        }
    }

    fn into_keys(self) -> Result<DeviceKeys, String> {
        let certificate = DeviceCertificate {
            identity_key: PublicKey(decode_hex(
                "certificate.identity_key",
                &self.certificate.identity_key,
            )?),
            device_key: PublicKey(decode_hex(
                "certificate.device_key",
                &self.certificate.device_key,
            )?),
            issued_at_ms: self.certificate.issued_at_ms,
            signature: Signature(decode_hex(
                "certificate.signature",
                &self.certificate.signature,
            )?),
        };
        let keys = DeviceKeys {
            device: Keypair::from_secret_bytes(decode_hex("device_secret", &self.device_secret)?),
            identity_key: certificate.identity_key,
            certificate,
            encryption: EncryptionKeypair::from_secret_bytes(decode_hex(
                "encryption_secret",
                &self.encryption_secret,
            )?),
        };
        keys.check()?;
        check_address(&self.address, &keys.address())?;
        Ok(keys)
    }
}

/// Decodes a fixed-length hex field, naming the field in the error.
fn decode_hex<T: FromHex<Error = hex::FromHexError>>(field: &str, text: &str) -> Result<T, String> {
    T::from_hex(text).map_err(|error| match error {
        hex::FromHexError::InvalidStringLength | hex::FromHexError::OddLength => {
            format!("{field} has the wrong length ({} hex digits)", text.len())
        }
        hex::FromHexError::InvalidHexCharacter { .. } => format!("{field} is not hex: {error}"),
    })
}

/// Checks the human-readable address against the one the keys imply.
fn check_address(written: &str, actual: &Address) -> Result<(), String> {
    let written: Address = written
        .parse()
        .map_err(|error| format!("address is not a valid address: {error}"))?;
    if written != *actual {
        return Err(format!(
            "address {written} does not match the keys, which belong to {actual}"
        ));
    }
    Ok(())
}

// The tests check Unix permission bits, so they run on Unix only.
#[cfg(all(test, unix))]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    fn identity() -> IdentityKeys {
        IdentityKeys {
            signing: Keypair::from_secret_bytes([1; 32]),
            encryption: EncryptionKeypair::from_secret_bytes([2; 32]),
        }
    }

    fn device() -> DeviceKeys {
        let identity = identity();
        let device = Keypair::from_secret_bytes([3; 32]);
        DeviceKeys {
            identity_key: identity.signing.public(),
            certificate: DeviceCertificate::issue(&identity.signing, device.public(), 1_000),
            device,
            encryption: identity.encryption,
        }
    }

    fn save_new(path: &Path, key_file: &KeyFile) {
        save(path, key_file, SaveOptions::default()).unwrap();
    }

    /// Writes `contents` as a private file, bypassing [`save`].
    fn write_raw(path: &Path, contents: &str) {
        fs::write(path, contents).unwrap();
        set_mode(path, 0o600);
    }

    fn set_mode(path: &Path, mode: u32) {
        use std::os::unix::fs::PermissionsExt;
        fs::set_permissions(path, fs::Permissions::from_mode(mode)).unwrap();
    }

    fn mode_of(path: &Path) -> u32 {
        use std::os::unix::fs::PermissionsExt;
        fs::metadata(path).unwrap().permissions().mode() & 0o7777
    }

    fn json_of(key_file: &KeyFile) -> serde_json::Value {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("key.json");
        save_new(&path, key_file);
        serde_json::from_slice(&fs::read(&path).unwrap()).unwrap()
    }

    /// Loads `json` from a private file and returns the `Corrupt` reason.
    fn corrupt_reason(json: &str) -> String {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("key.json");
        write_raw(&path, json);
        corrupt_reason_at(&path)
    }

    fn corrupt_reason_at(path: &Path) -> String {
        match load(path) {
            Err(KeyFileError::Corrupt { reason, .. }) => reason,
            other => panic!("expected Corrupt, got {other:?}"),
        }
    }

    #[test]
    fn an_identity_key_file_round_trips_with_mode_0600() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("identity.json");
        let keys = identity();
        save_new(&path, &KeyFile::Identity(keys.clone()));
        assert_eq!(mode_of(&path), 0o600);

        let loaded = load_identity(&path).unwrap();
        assert_eq!(loaded.signing.secret_bytes(), keys.signing.secret_bytes());
        assert_eq!(
            loaded.encryption.secret_bytes(),
            keys.encryption.secret_bytes()
        );

        let json: serde_json::Value = serde_json::from_slice(&fs::read(&path).unwrap()).unwrap();
        assert_eq!(json["kind"], IDENTITY_KIND);
        assert_eq!(json["version"], 1);
        assert_eq!(json["address"], keys.address().to_string());
        assert_eq!(json["signing_secret"], hex::encode([1u8; 32]));
        assert_eq!(json["encryption_secret"], hex::encode([2u8; 32]));

        // Only the key file is left in the directory: no temporary files.
        assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 1);
    }

    #[test]
    fn a_device_key_file_round_trips() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("device.json");
        let keys = device();
        save_new(&path, &KeyFile::Device(keys.clone()));
        assert_eq!(mode_of(&path), 0o600);

        let loaded = load_device(&path).unwrap();
        assert_eq!(loaded.device.secret_bytes(), keys.device.secret_bytes());
        assert_eq!(loaded.identity_key, keys.identity_key);
        assert_eq!(loaded.certificate, keys.certificate);
        assert_eq!(
            loaded.encryption.secret_bytes(),
            keys.encryption.secret_bytes()
        );
        assert_eq!(loaded.address(), identity().address());
    }

    #[test]
    fn parse_reads_what_to_bytes_writes_and_what_save_wrote() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("device.json");
        let key_file = KeyFile::Device(device());
        save_new(&path, &key_file);
        let contents = to_bytes(&key_file).unwrap();
        assert_eq!(fs::read(&path).unwrap(), contents, "save writes to_bytes");
        let KeyFile::Device(parsed) = parse(&contents).unwrap() else {
            panic!("a device key file parsed as another kind");
        };
        assert_eq!(parsed.device.secret_bytes(), device().device.secret_bytes());
        assert_eq!(parsed.certificate, device().certificate);
        assert!(matches!(parse(&contents[1..]), Err(ParseError::Corrupt(_))));
        let newer = String::from_utf8(contents)
            .unwrap()
            .replace("\"version\": 1", "\"version\": 7");
        assert_eq!(
            parse(newer.as_bytes()).err(),
            Some(ParseError::UnsupportedVersion(7))
        );
        let mut inconsistent = device();
        inconsistent.device = Keypair::from_secret_bytes([9; 32]);
        assert!(to_bytes(&KeyFile::Device(inconsistent)).is_err());
    }

    #[test]
    fn auth_keys_cover_both_kinds() {
        let identity_file = KeyFile::Identity(identity());
        let auth = identity_file.auth_keys();
        assert_eq!(auth.identity_key, identity().signing.public());
        assert_eq!(auth.device.public(), identity().signing.public());
        assert_eq!(auth.certificate, None);
        assert_eq!(auth.encryption.public(), identity().encryption.public());

        let device_file = KeyFile::Device(device());
        let auth = device_file.auth_keys();
        assert_eq!(auth.identity_key, identity().signing.public());
        assert_eq!(auth.device.public(), device().device.public());
        assert_eq!(auth.certificate, Some(device().certificate));
        assert_eq!(auth.encryption.public(), identity().encryption.public());
        assert_eq!(device_file.address(), identity_file.address());
    }

    #[test]
    fn generated_and_issued_keys_fit_together() {
        let identity = IdentityKeys::generate();
        let card = identity.card(5);
        assert_eq!(card.verify(&identity.address()), Ok(()));
        assert_eq!(card.encryption_key, identity.encryption.public());
        let device = DeviceKeys::issue(&identity, 6);
        assert_eq!(device.check(), Ok(()));
        assert_eq!(device.certificate.verify_for(&identity.address()), Ok(()));
    }

    #[test]
    fn an_existing_file_is_not_overwritten_unless_asked() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("key.json");
        save_new(&path, &KeyFile::Identity(identity()));
        let before = fs::read(&path).unwrap();

        let other = KeyFile::Identity(IdentityKeys::generate());
        assert!(matches!(
            save(&path, &other, SaveOptions::default()),
            Err(KeyFileError::Exists(existing)) if existing == path
        ));
        assert_eq!(fs::read(&path).unwrap(), before);

        save(&path, &other, SaveOptions { overwrite: true }).unwrap();
        assert_eq!(load(&path).unwrap().address(), other.address());
        assert_eq!(mode_of(&path), 0o600);
        assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 1);
    }

    #[test]
    fn a_file_readable_by_others_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("key.json");
        save_new(&path, &KeyFile::Identity(identity()));
        for mode in [0o644, 0o640, 0o604, 0o620] {
            set_mode(&path, mode);
            let error = load(&path).unwrap_err();
            assert!(
                matches!(error, KeyFileError::InsecurePermissions { mode: found, .. } if found == mode),
                "mode {mode:o}: {error:?}"
            );
            assert!(error.to_string().contains("chmod 600"));
        }
        set_mode(&path, 0o400);
        assert!(load(&path).is_ok());
    }

    #[test]
    fn the_wrong_kind_is_reported() {
        let dir = tempfile::tempdir().unwrap();
        let identity_path = dir.path().join("identity.json");
        let device_path = dir.path().join("device.json");
        save_new(&identity_path, &KeyFile::Identity(identity()));
        save_new(&device_path, &KeyFile::Device(device()));
        assert!(matches!(
            load_identity(&device_path),
            Err(KeyFileError::WrongKind {
                expected: KeyKind::Identity,
                found: KeyKind::Device,
                ..
            })
        ));
        assert!(matches!(
            load_device(&identity_path),
            Err(KeyFileError::WrongKind {
                expected: KeyKind::Device,
                found: KeyKind::Identity,
                ..
            })
        ));
    }

    #[test]
    fn corrupt_files_are_reported_as_corrupt() {
        let good = json_of(&KeyFile::Identity(identity()));
        let with = |field: &str, value: serde_json::Value| {
            let mut json = good.clone();
            json[field] = value;
            json.to_string()
        };

        assert!(!corrupt_reason("{not json").is_empty());
        assert!(!corrupt_reason("").is_empty());
        assert!(
            corrupt_reason(&with("kind", "backbone-mystery-key".into())).contains("unknown kind")
        );
        assert!(
            corrupt_reason(&with("signing_secret", "zz".repeat(32).into())).contains("not hex")
        );
        assert!(
            corrupt_reason(&with("signing_secret", "ab".repeat(31).into()))
                .contains("wrong length")
        );
        assert!(
            corrupt_reason(&with("encryption_secret", "ab".repeat(33).into()))
                .contains("wrong length")
        );
        assert!(corrupt_reason(&with("signing_secret", "abc".into())).contains("wrong length"));
        let other_address = Keypair::from_secret_bytes([9; 32]).address().to_string();
        assert!(corrupt_reason(&with("address", other_address.into())).contains("does not match"));
        assert!(corrupt_reason(&with("address", "bb1nope".into())).contains("not a valid address"));
        assert!(corrupt_reason(&with("extra", 1.into())).contains("unknown field"));
        let mut missing = good.clone();
        missing.as_object_mut().unwrap().remove("encryption_secret");
        assert!(corrupt_reason(&missing.to_string()).contains("missing field"));
    }

    #[test]
    fn a_device_file_with_a_bad_certificate_is_corrupt() {
        let good = json_of(&KeyFile::Device(device()));

        let mut forged = good.clone();
        forged["certificate"]["issued_at_ms"] = 2_000.into();
        assert!(corrupt_reason(&forged.to_string()).contains("signature is invalid"));

        let mut other_device = good.clone();
        other_device["device_secret"] = hex::encode([4u8; 32]).into();
        assert!(corrupt_reason(&other_device.to_string()).contains("another device key"));

        let mut short_signature = good.clone();
        short_signature["certificate"]["signature"] = "00".repeat(32).into();
        assert!(corrupt_reason(&short_signature.to_string()).contains("certificate.signature"));
    }

    #[test]
    fn inconsistent_device_keys_are_not_saved() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("device.json");
        let mut keys = device();
        keys.device = Keypair::from_secret_bytes([4; 32]);
        assert!(matches!(
            save(&path, &KeyFile::Device(keys), SaveOptions::default()),
            Err(KeyFileError::Inconsistent { .. })
        ));
        assert!(!path.exists());
    }

    #[test]
    fn a_newer_version_is_unsupported_rather_than_corrupt() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("key.json");
        write_raw(
            &path,
            r#"{"kind":"backbone-identity-key","version":2,"anything":"new"}"#,
        );
        assert!(matches!(
            load(&path),
            Err(KeyFileError::UnsupportedVersion { version: 2, .. })
        ));
    }

    #[test]
    fn missing_and_oversized_files_are_errors() {
        let dir = tempfile::tempdir().unwrap();
        assert!(matches!(
            load(&dir.path().join("absent.json")),
            Err(KeyFileError::Io { .. })
        ));
        let big = dir.path().join("big.json");
        write_raw(&big, &" ".repeat(MAX_FILE_LEN as usize + 1));
        assert!(corrupt_reason_at(&big).contains("larger than"));
    }

    #[test]
    fn secrets_are_not_in_debug_output() {
        let debug = format!("{:?}", KeyFile::Device(device()));
        assert!(!debug.contains(&hex::encode([2u8; 32])));
        assert!(!debug.contains(&hex::encode([3u8; 32])));
    }
}
