//! The connection layer: TLS trust, one QUIC connection with its single
//! bidirectional stream, and the handshake (authenticated or anonymous).
//!
//! [`RawConnection`] sends and receives frames as they are; tests use it to
//! send what a well-behaved client never would.

use std::net::{SocketAddr, ToSocketAddrs};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use backbone_protocol::auth::{TLS_EXPORTER_LABEL, TLS_EXPORTER_LEN, sign_auth};
use backbone_protocol::codec::{self, FrameBuffer, Phase};
use backbone_protocol::frame::{Anonymous, AuthOk, Done, Hello};
use backbone_protocol::{DeviceCertificate, Frame, Keypair, PROTOCOL_VERSION, PublicKey};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};
use sha2::{Digest, Sha256};

use crate::error::ClientError;

/// How the client decides to trust the broker's certificate.
#[derive(Clone, Debug)]
pub enum Trust {
    /// Certificates (PEM file) to trust as roots; the broker's self-signed
    /// certificate file works as its own root.
    CaFile(PathBuf),
    /// DER certificates to trust as roots.
    CaDer(Vec<Vec<u8>>),
    /// The SHA-256 fingerprint (hex, colons optional) of the exact certificate to accept.
    Fingerprint(String),
}

/// Where and how to connect.
#[derive(Clone, Debug)]
pub struct ConnectConfig {
    /// `host:port` of the broker (UDP).
    pub server: String,
    /// The TLS server name; defaults to the host part of `server`.
    pub server_name: Option<String>,
    /// Certificate trust.
    pub trust: Trust,
    /// Keep-alive interval.
    pub keep_alive: Duration,
    /// How long connecting (QUIC + TLS) may take.
    pub connect_timeout: Duration,
    /// Frame limit for frames from the broker.
    pub max_frame_len: usize,
    /// A client endpoint (UDP socket) to share between connections; `None`
    /// binds one per connection. Load generators with thousands of
    /// connections share one.
    pub endpoint: Option<quinn::Endpoint>,
    /// Probe the path for packets larger than QUIC's 1,200-byte minimum
    /// (quinn's MTU discovery). Off by default: the probes and their acks
    /// roughly double the datagrams of a connection's start (and come back
    /// every ten minutes), which costs the broker about a fifth of its CPU
    /// per new connection, while envelopes of a few KiB gain little. Turn it
    /// on to move large files over a path with a larger MTU.
    pub mtu_discovery: bool,
}

/// The TLS server name to verify for `server` (`host:port`) when the
/// operator named none: `localhost` when the host is an IP address (a
/// broker's generated certificate is issued for `localhost`), and `None`
/// otherwise, so that the host name itself is verified.
pub fn default_server_name(server: &str) -> Option<String> {
    let host = server.rsplit_once(':').map_or(server, |(host, _)| host);
    host.trim_matches(['[', ']'])
        .parse::<std::net::IpAddr>()
        .is_ok()
        .then(|| "localhost".to_owned())
}

impl ConnectConfig {
    /// Defaults for `server` and `trust`.
    pub fn new(server: impl Into<String>, trust: Trust) -> Self {
        Self {
            server: server.into(),
            server_name: None,
            trust,
            keep_alive: Duration::from_secs(10),
            connect_timeout: Duration::from_secs(10),
            max_frame_len: 4 * 1024 * 1024,
            endpoint: None,
            mtu_discovery: false,
        }
    }
}

/// What a device authenticates with.
#[derive(Clone, Debug)]
pub struct Credentials {
    /// The identity's public signing key.
    pub identity_key: PublicKey,
    /// The key this device signs with (the identity key for the primary device).
    pub device: Keypair,
    /// The device certificate, `None` for the primary device.
    pub certificate: Option<DeviceCertificate>,
}

impl Credentials {
    /// The identity authenticating as its own primary device.
    pub fn primary(identity: &Keypair) -> Self {
        Self {
            identity_key: identity.public(),
            device: identity.clone(),
            certificate: None,
        }
    }
}

/// Pins one certificate by SHA-256 and still checks the TLS 1.3 handshake signature.
#[derive(Debug)]
struct FingerprintVerifier {
    fingerprint: [u8; 32],
    provider: Arc<rustls::crypto::CryptoProvider>,
}

impl ServerCertVerifier for FingerprintVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        if Sha256::digest(end_entity.as_ref())[..] == self.fingerprint[..] {
            Ok(ServerCertVerified::assertion())
        } else {
            Err(rustls::Error::InvalidCertificate(
                rustls::CertificateError::ApplicationVerificationFailure,
            ))
        }
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Err(rustls::Error::PeerIncompatible(
            rustls::PeerIncompatible::Tls12NotOffered,
        ))
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// Parses a hex SHA-256 fingerprint, with or without colons.
pub fn parse_fingerprint(text: &str) -> Result<[u8; 32], ClientError> {
    let cleaned: String = text
        .trim()
        .trim_start_matches("sha256:")
        .chars()
        .filter(|c| *c != ':')
        .collect();
    let bytes =
        hex::decode(&cleaned).map_err(|_| ClientError::InvalidFingerprint(text.to_owned()))?;
    bytes
        .try_into()
        .map_err(|_| ClientError::InvalidFingerprint(text.to_owned()))
}

/// The rustls client configuration for a trust setting.
pub fn tls_config(trust: &Trust) -> Result<rustls::ClientConfig, ClientError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|error| ClientError::Tls(error.to_string()))?;
    let mut config = match trust {
        Trust::Fingerprint(text) => builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(FingerprintVerifier {
                fingerprint: parse_fingerprint(text)?,
                provider,
            }))
            .with_no_client_auth(),
        Trust::CaFile(_) | Trust::CaDer(_) => {
            let certs: Vec<CertificateDer<'static>> = match trust {
                Trust::CaFile(path) => CertificateDer::pem_file_iter(path)
                    .and_then(|iter| iter.collect::<Result<Vec<_>, _>>())
                    .map_err(|error| ClientError::Tls(format!("{}: {error}", path.display())))?,
                Trust::CaDer(ders) => ders
                    .iter()
                    .map(|der| CertificateDer::from(der.clone()))
                    .collect(),
                Trust::Fingerprint(_) => unreachable!("handled above"),
            };
            let mut roots = rustls::RootCertStore::empty();
            for cert in certs {
                roots
                    .add(cert)
                    .map_err(|error| ClientError::Tls(error.to_string()))?;
            }
            if roots.is_empty() {
                return Err(ClientError::Tls("no CA certificate found".into()));
            }
            builder.with_root_certificates(roots).with_no_client_auth()
        }
    };
    config.alpn_protocols = vec![backbone_protocol::ALPN.to_vec()];
    // 0-RTT is never used: auth must not be replayable.
    config.enable_early_data = false;
    Ok(config)
}

/// One connection to a broker with its frame stream.
pub struct RawConnection {
    connection: quinn::Connection,
    endpoint: quinn::Endpoint,
    send: quinn::SendStream,
    recv: quinn::RecvStream,
    buffer: FrameBuffer,
    out: Vec<u8>,
}

/// How long a stream's end waits for the connection's close to arrive.
const CLOSE_GRACE: Duration = Duration::from_millis(250);

/// Why `connection` closed, waiting up to [`CLOSE_GRACE`] for it: a broker
/// that refuses or ends a session closes the connection with a code right
/// after its last frame, and the end of its stream can arrive first.
pub(crate) async fn close_reason_soon(
    connection: &quinn::Connection,
) -> Option<quinn::ConnectionError> {
    match connection.close_reason() {
        Some(reason) => Some(reason),
        None => tokio::time::timeout(CLOSE_GRACE, connection.closed())
            .await
            .ok(),
    }
}

fn resolve(server: &str) -> Result<SocketAddr, ClientError> {
    server
        .to_socket_addrs()
        .map_err(|error| ClientError::Unreachable(format!("{server}: {error}")))?
        .next()
        .ok_or_else(|| ClientError::Unreachable(format!("{server}: no address")))
}

impl RawConnection {
    /// Connects (QUIC + TLS) and opens the frame stream.
    pub async fn connect(config: &ConnectConfig) -> Result<Self, ClientError> {
        let addr = resolve(&config.server)?;
        let tls = tls_config(&config.trust)?;
        let crypto = quinn::crypto::rustls::QuicClientConfig::try_from(tls)
            .map_err(|error| ClientError::Tls(error.to_string()))?;
        let mut client_config = quinn::ClientConfig::new(Arc::new(crypto));
        let mut transport = quinn::TransportConfig::default();
        transport
            .keep_alive_interval(Some(config.keep_alive))
            .receive_window(quinn::VarInt::from_u32(16 * 1024 * 1024))
            .stream_receive_window(quinn::VarInt::from_u32(8 * 1024 * 1024));
        if !config.mtu_discovery {
            transport.mtu_discovery_config(None);
        }
        client_config.transport_config(Arc::new(transport));
        let bind: SocketAddr = if addr.is_ipv6() {
            "[::]:0"
        } else {
            "0.0.0.0:0"
        }
        .parse()
        .map_err(|_| ClientError::Unreachable("bind address".into()))?;
        let endpoint = match &config.endpoint {
            Some(shared) => shared.clone(),
            None => {
                quinn::Endpoint::client(bind).map_err(|error| ClientError::Io(error.to_string()))?
            }
        };
        let host = config.server_name.clone().unwrap_or_else(|| {
            config
                .server
                .rsplit_once(':')
                .map(|(h, _)| h)
                .unwrap_or(&config.server)
                .trim_matches(['[', ']'])
                .to_owned()
        });
        let connecting = endpoint
            .connect_with(client_config, addr, &host)
            .map_err(|error| ClientError::Unreachable(format!("{}: {error}", config.server)))?;
        let connection = match tokio::time::timeout(config.connect_timeout, connecting).await {
            Err(_) => {
                return Err(ClientError::Unreachable(format!(
                    "{}: connection timed out",
                    config.server
                )));
            }
            Ok(Err(error)) => return Err(ClientError::from_connection(error, &config.server)),
            Ok(Ok(connection)) => connection,
        };
        let (send, recv) = connection
            .open_bi()
            .await
            .map_err(|error| ClientError::from_connection(error, &config.server))?;
        Ok(Self {
            connection,
            endpoint,
            send,
            recv,
            buffer: FrameBuffer::new(config.max_frame_len),
            out: Vec::with_capacity(4096),
        })
    }

    /// The QUIC connection.
    pub fn connection(&self) -> &quinn::Connection {
        &self.connection
    }

    /// The TLS exporter value bound into the auth signature.
    pub fn tls_exporter(&self) -> Result<[u8; TLS_EXPORTER_LEN], ClientError> {
        let mut out = [0u8; TLS_EXPORTER_LEN];
        self.connection
            .export_keying_material(&mut out, TLS_EXPORTER_LABEL, b"")
            .map_err(|_| ClientError::Tls("TLS exporter unavailable".into()))?;
        Ok(out)
    }

    /// Sends one frame.
    pub async fn send(&mut self, frame: &Frame) -> Result<(), ClientError> {
        self.out.clear();
        codec::encode_frame(frame, &mut self.out)
            .map_err(|error| ClientError::Protocol(error.to_string()))?;
        self.send_bytes_inner().await
    }

    /// Sends raw bytes on the frame stream (for tests of malformed input).
    pub async fn send_raw(&mut self, bytes: &[u8]) -> Result<(), ClientError> {
        self.out.clear();
        self.out.extend_from_slice(bytes);
        self.send_bytes_inner().await
    }

    async fn send_bytes_inner(&mut self) -> Result<(), ClientError> {
        match self.send.write_all(&self.out).await {
            Ok(()) => Ok(()),
            Err(_) => Err(self.closed_error().await),
        }
    }

    /// Receives the next frame.
    pub async fn recv(&mut self) -> Result<Frame, ClientError> {
        loop {
            match self.buffer.next_frame(Phase::Any) {
                Ok(Some(frame)) => return Ok(frame),
                Ok(None) => {}
                Err(error) => return Err(ClientError::Protocol(error.to_string())),
            }
            match self.recv.read_chunk(64 * 1024, true).await {
                Ok(Some(chunk)) => self.buffer.extend(&chunk.bytes),
                Ok(None) | Err(_) => return Err(self.closed_error().await),
            }
        }
    }

    async fn closed_error(&self) -> ClientError {
        match close_reason_soon(&self.connection).await {
            Some(reason) => ClientError::from_connection(reason, "broker"),
            None => ClientError::Disconnected("stream closed".into()),
        }
    }

    /// Splits into the connection, its stream halves and the endpoint (for the background client).
    pub(crate) fn into_parts(
        self,
    ) -> (
        quinn::Connection,
        quinn::Endpoint,
        quinn::SendStream,
        quinn::RecvStream,
        FrameBuffer,
    ) {
        (
            self.connection,
            self.endpoint,
            self.send,
            self.recv,
            self.buffer,
        )
    }

    /// Runs Hello → Challenge → Auth → AuthOk.
    pub async fn authenticate(&mut self, credentials: &Credentials) -> Result<AuthOk, ClientError> {
        self.send(&Frame::Hello(Hello {
            min_version: PROTOCOL_VERSION,
            max_version: PROTOCOL_VERSION,
        }))
        .await?;
        let challenge = match self.recv().await? {
            Frame::Challenge(challenge) => challenge,
            other => return Err(unexpected(other)),
        };
        let exporter = self.tls_exporter()?;
        let auth = sign_auth(
            credentials.identity_key,
            &credentials.device,
            credentials.certificate,
            &challenge.nonce,
            &exporter,
            &challenge.server_id,
        );
        self.send(&Frame::Auth(auth)).await?;
        match self.recv().await? {
            Frame::AuthOk(ok) => Ok(ok),
            other => Err(unexpected(other)),
        }
    }

    /// Runs Hello → Challenge → Anonymous and waits for the broker's
    /// confirmation (`Done` for request 0). The session names no identity:
    /// it can only send sealed envelopes and fetch cards.
    pub async fn open_anonymous(&mut self) -> Result<(), ClientError> {
        self.send(&Frame::Hello(Hello {
            min_version: PROTOCOL_VERSION,
            max_version: PROTOCOL_VERSION,
        }))
        .await?;
        match self.recv().await? {
            Frame::Challenge(_) => {}
            other => return Err(unexpected(other)),
        }
        self.send(&Frame::Anonymous(Anonymous {})).await?;
        match self.recv().await? {
            Frame::Done(Done { request_id: 0 }) => Ok(()),
            other => Err(unexpected(other)),
        }
    }

    /// Closes the connection politely and waits until the broker has seen it.
    pub async fn close(self) {
        self.connection.close(quinn::VarInt::from_u32(0), b"bye");
        let _ = tokio::time::timeout(Duration::from_secs(1), self.connection.closed()).await;
    }
}

/// Turns an unexpected frame into an error (server errors keep their code).
pub(crate) fn unexpected(frame: Frame) -> ClientError {
    match frame {
        Frame::Error(error) => {
            ClientError::server(error.code, error.message.0, error.retry_after_ms)
        }
        Frame::Redirect(redirect) => ClientError::Redirect(redirect.node.0),
        other => ClientError::Protocol(format!(
            "unexpected {} frame",
            Frame::TAG_NAMES
                .get(other.tag() as usize)
                .copied()
                .unwrap_or("unknown")
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_ip_address_verifies_localhost_and_a_host_name_itself() {
        assert_eq!(
            default_server_name("127.0.0.1:7700").as_deref(),
            Some("localhost")
        );
        assert_eq!(
            default_server_name("[::1]:7700").as_deref(),
            Some("localhost")
        );
        assert_eq!(default_server_name("broker.example.org:7700"), None);
    }
}
