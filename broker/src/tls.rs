//! TLS material: a configured certificate, or a self-signed one generated
//! once under `<data_dir>/tls/` and reused on later starts.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use sha2::{Digest, Sha256};
use thiserror::Error;

use crate::config::TlsConfig;

/// A certificate chain and its key, ready for rustls.
#[derive(Debug)]
pub struct TlsMaterial {
    /// The chain, leaf first.
    pub chain: Vec<CertificateDer<'static>>,
    /// The leaf's private key.
    pub key: PrivateKeyDer<'static>,
    /// Where the leaf certificate lives (clients pass it as `--ca`).
    pub cert_path: PathBuf,
}

/// Why TLS material could not be loaded or created.
#[derive(Debug, Error)]
pub enum TlsError {
    /// A file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// A PEM file holds no usable certificate or key.
    #[error("{path}: {message}")]
    Pem {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
    /// Certificate generation failed.
    #[error("cannot generate a self-signed certificate: {0}")]
    Generate(String),
    /// rustls rejected the material.
    #[error("TLS configuration rejected: {0}")]
    Rustls(#[from] rustls::Error),
}

/// The SHA-256 fingerprint of a DER certificate, lowercase hex, as clients pin it.
pub fn fingerprint(cert: &CertificateDer<'_>) -> String {
    hex::encode(Sha256::digest(cert.as_ref()))
}

/// Loads the configured certificate, or the generated one, generating it on first use.
pub fn load_or_generate(config: &TlsConfig, data_dir: &Path) -> Result<TlsMaterial, TlsError> {
    let (cert_path, key_path) = match (&config.cert, &config.key) {
        (Some(cert), Some(key)) => (cert.clone(), key.clone()),
        _ => {
            let dir = data_dir.join("tls");
            let cert = dir.join("cert.pem");
            let key = dir.join("key.pem");
            if !cert.exists() || !key.exists() {
                generate(&dir, &cert, &key, &config.generated_names)?;
            }
            (cert, key)
        }
    };
    load_pair(cert_path, &key_path)
}

/// The node's QUIC stateless-reset key, created once under
/// `<data_dir>/tls/reset.key` (0600) and reused on every start. With the same
/// key, a restarted broker can tell clients of its previous run that their
/// connection is gone (a stateless reset) on their next packet, instead of
/// leaving them to wait out the idle timeout.
pub fn reset_key(data_dir: &Path) -> Result<Vec<u8>, TlsError> {
    let dir = data_dir.join("tls");
    let path = dir.join("reset.key");
    let io = |path: &Path| {
        let path = path.to_owned();
        move |source| TlsError::Io { path, source }
    };
    match std::fs::read(&path) {
        Ok(key) if key.len() == 32 => return Ok(key),
        Ok(_) => {
            return Err(TlsError::Pem {
                path,
                message: "a reset key is 32 bytes; delete the file to make a new one".into(),
            });
        }
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => {}
        Err(error) => return Err(io(&path)(error)),
    }
    std::fs::create_dir_all(&dir).map_err(io(&dir))?;
    let key: [u8; 32] = rand::random();
    write_private(&path, &key).map_err(io(&path))?;
    Ok(key.to_vec())
}

/// Loads a PEM certificate chain and its PEM key.
pub fn load_pair(cert_path: PathBuf, key_path: &Path) -> Result<TlsMaterial, TlsError> {
    let chain = CertificateDer::pem_file_iter(&cert_path)
        .and_then(|iter| iter.collect::<Result<Vec<_>, _>>())
        .map_err(|error| TlsError::Pem {
            path: cert_path.clone(),
            message: error.to_string(),
        })?;
    if chain.is_empty() {
        return Err(TlsError::Pem {
            path: cert_path,
            message: "no certificate found".into(),
        });
    }
    let key = PrivateKeyDer::from_pem_file(key_path).map_err(|error| TlsError::Pem {
        path: key_path.to_owned(),
        message: error.to_string(),
    })?;
    Ok(TlsMaterial {
        chain,
        key,
        cert_path,
    })
}

fn generate(
    dir: &Path,
    cert_path: &Path,
    key_path: &Path,
    extra: &[String],
) -> Result<(), TlsError> {
    let io = |path: &Path| {
        let path = path.to_owned();
        move |source| TlsError::Io { path, source }
    };
    std::fs::create_dir_all(dir).map_err(io(dir))?;
    let mut names = vec!["localhost".to_owned(), "127.0.0.1".to_owned()];
    names.extend(extra.iter().cloned());
    let generated = rcgen::generate_simple_self_signed(names)
        .map_err(|error| TlsError::Generate(error.to_string()))?;
    write_private(key_path, generated.signing_key.serialize_pem().as_bytes())
        .map_err(io(key_path))?;
    std::fs::write(cert_path, generated.cert.pem()).map_err(io(cert_path))?;
    Ok(())
}

pub(crate) fn write_private(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)?;
    file.write_all(bytes)?;
    file.sync_all()
}

/// The rustls server configuration: TLS 1.3 only, ALPN `backbone/1`, ring, no 0-RTT.
pub fn server_config(material: TlsMaterial) -> Result<rustls::ServerConfig, TlsError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_no_client_auth()
        .with_single_cert(material.chain, material.key)?;
    config.alpn_protocols = vec![backbone_protocol::ALPN.to_vec()];
    // 0-RTT data is replayable, so nothing (auth above all) may ride in it.
    config.max_early_data_size = 0;
    Ok(config)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_generated_certificate_is_reused_on_the_next_start() {
        let dir = tempfile::tempdir().expect("tempdir");
        let first = load_or_generate(&TlsConfig::default(), dir.path()).expect("generates");
        let second = load_or_generate(&TlsConfig::default(), dir.path()).expect("loads");
        assert_eq!(fingerprint(&first.chain[0]), fingerprint(&second.chain[0]));
        assert_eq!(fingerprint(&first.chain[0]).len(), 64);
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(dir.path().join("tls/key.pem"))
            .expect("key exists")
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        server_config(second).expect("rustls accepts it");
    }

    #[test]
    fn the_reset_key_is_made_once_and_kept() {
        let dir = tempfile::tempdir().expect("tempdir");
        let first = reset_key(dir.path()).expect("made");
        assert_eq!(first.len(), 32);
        assert_eq!(reset_key(dir.path()).expect("read"), first);
        std::fs::write(dir.path().join("tls/reset.key"), b"short").expect("write");
        let error = reset_key(dir.path()).expect_err("refused");
        assert!(error.to_string().contains("reset.key"), "{error}");
    }

    #[test]
    fn a_garbage_certificate_file_is_a_clear_error() {
        let dir = tempfile::tempdir().expect("tempdir");
        let cert = dir.path().join("cert.pem");
        let key = dir.path().join("key.pem");
        std::fs::write(&cert, "not a pem").expect("write");
        std::fs::write(&key, "not a pem").expect("write");
        let config = TlsConfig {
            cert: Some(cert.clone()),
            key: Some(key),
            generated_names: vec![],
        };
        let error = load_or_generate(&config, dir.path()).expect_err("fails");
        assert!(error.to_string().contains("cert.pem"), "{error}");
    }
}
