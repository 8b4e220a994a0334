//! The fleet's certificates: one CA, and one certificate per node signed by
//! it. Nodes authenticate each other with them (mutual TLS), and serve the
//! node certificate to clients too, so a client that trusts the fleet CA can
//! connect to any node and follow redirects between them.
//!
//! Layout of the PKI directory: `ca.pem`, `ca.key`, and `<node>.pem`,
//! `<node>.key` per node. Keys are written `0600`.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};
use rustls::pki_types::CertificateDer;
use rustls::pki_types::pem::PemObject;

use crate::tls::{TlsError, TlsMaterial, write_private};

const CA_NAME: &str = "Backbone fleet CA";

/// A node's fleet credentials.
#[derive(Debug)]
pub struct NodeCredentials {
    /// The fleet CA certificate.
    pub ca: CertificateDer<'static>,
    /// The node's certificate (chain) and key.
    pub material: TlsMaterial,
}

fn ca_params() -> CertificateParams {
    let mut params = CertificateParams::default();
    let mut name = DistinguishedName::new();
    name.push(DnType::CommonName, CA_NAME);
    params.distinguished_name = name;
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    params.not_before = rcgen::date_time_ymd(2026, 1, 1);
    params.not_after = rcgen::date_time_ymd(2046, 1, 1);
    params
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> TlsError + use<> {
    let path = path.to_owned();
    move |source| TlsError::Io { path, source }
}

fn generation(error: rcgen::Error) -> TlsError {
    TlsError::Generate(error.to_string())
}

/// Creates the CA (unless `ca.pem`/`ca.key` exist) and a certificate for each
/// node that has none yet. Each node certificate names the node, `localhost`,
/// `127.0.0.1` and `extra_names`. Returns the files written.
pub fn generate(
    dir: &Path,
    nodes: &[String],
    extra_names: &[String],
) -> Result<Vec<PathBuf>, TlsError> {
    std::fs::create_dir_all(dir).map_err(io(dir))?;
    let mut written = Vec::new();
    let (ca_cert, ca_key) = (dir.join("ca.pem"), dir.join("ca.key"));
    let ca_key_pair = if ca_cert.exists() && ca_key.exists() {
        let pem = std::fs::read_to_string(&ca_key).map_err(io(&ca_key))?;
        KeyPair::from_pem(&pem).map_err(|error| TlsError::Pem {
            path: ca_key.clone(),
            message: error.to_string(),
        })?
    } else {
        let key = KeyPair::generate().map_err(generation)?;
        let cert = ca_params().self_signed(&key).map_err(generation)?;
        write_private(&ca_key, key.serialize_pem().as_bytes()).map_err(io(&ca_key))?;
        std::fs::write(&ca_cert, cert.pem()).map_err(io(&ca_cert))?;
        written.extend([ca_cert, ca_key]);
        key
    };
    // The issuer is rebuilt from the fixed CA parameters and its key: the
    // subject and key identifier it puts in leaves match the stored CA.
    let issuer = Issuer::new(ca_params(), ca_key_pair);
    for node in nodes {
        let (cert_path, key_path) = (
            dir.join(format!("{node}.pem")),
            dir.join(format!("{node}.key")),
        );
        if cert_path.exists() && key_path.exists() {
            continue;
        }
        let mut names = vec![node.clone(), "localhost".into(), "127.0.0.1".into()];
        names.extend(extra_names.iter().cloned());
        let mut params = CertificateParams::new(names).map_err(generation)?;
        params
            .distinguished_name
            .push(DnType::CommonName, node.as_str());
        params.extended_key_usages = vec![
            rcgen::ExtendedKeyUsagePurpose::ServerAuth,
            rcgen::ExtendedKeyUsagePurpose::ClientAuth,
        ];
        params.not_before = rcgen::date_time_ymd(2026, 1, 1);
        params.not_after = rcgen::date_time_ymd(2046, 1, 1);
        let key = KeyPair::generate().map_err(generation)?;
        let cert = params.signed_by(&key, &issuer).map_err(generation)?;
        write_private(&key_path, key.serialize_pem().as_bytes()).map_err(io(&key_path))?;
        std::fs::write(&cert_path, cert.pem()).map_err(io(&cert_path))?;
        written.extend([cert_path, key_path]);
    }
    Ok(written)
}

/// Loads the CA and `node`'s certificate and key from `dir`.
pub fn load(dir: &Path, node: &str) -> Result<NodeCredentials, TlsError> {
    let ca_path = dir.join("ca.pem");
    let ca = CertificateDer::from_pem_file(&ca_path).map_err(|error| TlsError::Pem {
        path: ca_path.clone(),
        message: error.to_string(),
    })?;
    let cert_path = dir.join(format!("{node}.pem"));
    let key_path = dir.join(format!("{node}.key"));
    let material = crate::tls::load_pair(cert_path, &key_path)?;
    Ok(NodeCredentials { ca, material })
}

fn roots(ca: &CertificateDer<'static>) -> Result<Arc<rustls::RootCertStore>, TlsError> {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(ca.clone())?;
    Ok(Arc::new(roots))
}

/// TLS for the node's peer listener: TLS 1.3, ALPN `backbone-peer/1`, and a
/// client certificate signed by the fleet CA required.
pub fn peer_server_config(credentials: &NodeCredentials) -> Result<rustls::ServerConfig, TlsError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
        roots(&credentials.ca)?,
        provider.clone(),
    )
    .build()
    .map_err(|error| TlsError::Generate(format!("client verifier: {error}")))?;
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(verifier)
        .with_single_cert(
            credentials.material.chain.clone(),
            credentials.material.key.clone_key(),
        )?;
    config.alpn_protocols = vec![backbone_protocol::fleet::PEER_ALPN.to_vec()];
    config.max_early_data_size = 0;
    Ok(config)
}

/// TLS for dialing a peer: its certificate must be signed by the fleet CA and
/// name the peer; this node presents its own certificate.
pub fn peer_client_config(credentials: &NodeCredentials) -> Result<rustls::ClientConfig, TlsError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_root_certificates(roots(&credentials.ca)?)
        .with_client_auth_cert(
            credentials.material.chain.clone(),
            credentials.material.key.clone_key(),
        )?;
    config.alpn_protocols = vec![backbone_protocol::fleet::PEER_ALPN.to_vec()];
    Ok(config)
}

#[cfg(test)]
mod tests {
    use rustls::client::danger::ServerCertVerifier;

    use super::*;

    #[test]
    fn generate_is_idempotent_and_issues_missing_nodes_from_the_same_ca() {
        let dir = tempfile::tempdir().expect("tempdir");
        let nodes = ["a".to_owned(), "b".to_owned()];
        let first = generate(dir.path(), &nodes, &[]).expect("generates");
        assert_eq!(first.len(), 6);
        let ca_before = std::fs::read(dir.path().join("ca.pem")).expect("ca");
        assert!(generate(dir.path(), &nodes, &[]).expect("again").is_empty());
        let more = ["a".to_owned(), "b".to_owned(), "d".to_owned()];
        let added = generate(dir.path(), &more, &[]).expect("adds d");
        assert_eq!(added.len(), 2);
        assert_eq!(
            std::fs::read(dir.path().join("ca.pem")).expect("ca"),
            ca_before
        );
        use std::os::unix::fs::PermissionsExt;
        for key in ["ca.key", "a.key", "d.key"] {
            let mode = std::fs::metadata(dir.path().join(key))
                .expect("key")
                .permissions()
                .mode();
            assert_eq!(mode & 0o777, 0o600, "{key}");
        }
        // A node issued later chains to the same CA: rustls accepts it.
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        for node in ["a", "d"] {
            let credentials = load(dir.path(), node).expect("loads");
            peer_server_config(&credentials).expect("server config");
            peer_client_config(&credentials).expect("client config");
            let verifier = rustls::client::WebPkiServerVerifier::builder_with_provider(
                roots(&credentials.ca).expect("roots"),
                provider.clone(),
            )
            .build()
            .expect("verifier");
            let name = rustls::pki_types::ServerName::try_from(node.to_owned()).expect("name");
            verifier
                .verify_server_cert(
                    &credentials.material.chain[0],
                    &[],
                    &name,
                    &[],
                    rustls::pki_types::UnixTime::now(),
                )
                .expect("chains to the fleet CA and names the node");
        }
    }

    #[test]
    fn a_missing_node_certificate_names_the_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        generate(dir.path(), &["a".to_owned()], &[]).expect("generates");
        let error = load(dir.path(), "zz").expect_err("missing");
        assert!(error.to_string().contains("zz.pem"), "{error}");
    }
}
