//! Following a `Redirect`: a fake node answers the client's `Hello` with a
//! redirect, and the client must reconnect where it is sent, authenticate
//! there, and give up on a redirect loop instead of spinning forever.

mod support;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use backbone_client::{Client, ClientError, ClientOptions, ConnectConfig, Status, Trust};
use backbone_protocol::bytes::Text;
use backbone_protocol::codec::{self, FrameBuffer, Phase};
use backbone_protocol::frame::Redirect;
use backbone_protocol::{Frame, PROTOCOL_VERSION};
use quinn::crypto::rustls::QuicServerConfig;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use support::{Identity, TestBroker};

const WAIT: Duration = Duration::from_secs(10);
const HOUR: Duration = Duration::from_secs(3600);

/// Where the fake node sends clients.
enum RedirectTo {
    /// Another node, `host:port`.
    Node(String),
    /// The fake node itself: a redirect loop.
    Itself,
}

/// A QUIC endpoint that speaks just enough of the protocol to redirect: it
/// reads the client's `Hello`, answers `Redirect`, and holds the connection
/// open until the client closes it.
struct FakeNode {
    addr: SocketAddr,
    /// Its self-signed certificate, for the client to trust.
    cert_der: Vec<u8>,
    /// Connections whose first frame was a `Hello` of the current version.
    hellos: Arc<AtomicUsize>,
}

impl FakeNode {
    async fn start(redirect_to: RedirectTo) -> FakeNode {
        // Configured like the real broker (broker/src/tls.rs): TLS 1.3 only,
        // the protocol's ALPN, ring, no 0-RTT.
        let generated =
            rcgen::generate_simple_self_signed(vec!["localhost".into()]).expect("certificate");
        let cert = generated.cert.der().clone();
        let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(
            generated.signing_key.serialize_der(),
        ));
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut tls = rustls::ServerConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])
            .expect("TLS 1.3")
            .with_no_client_auth()
            .with_single_cert(vec![cert.clone()], key)
            .expect("rustls accepts the certificate");
        tls.alpn_protocols = vec![backbone_protocol::ALPN.to_vec()];
        tls.max_early_data_size = 0;
        let crypto = QuicServerConfig::try_from(tls).expect("usable for QUIC");
        let endpoint = quinn::Endpoint::server(
            quinn::ServerConfig::with_crypto(Arc::new(crypto)),
            "127.0.0.1:0".parse().expect("addr"),
        )
        .expect("binds");
        let addr = endpoint.local_addr().expect("bound");
        let target = match redirect_to {
            RedirectTo::Node(node) => node,
            RedirectTo::Itself => addr.to_string(),
        };
        let hellos = Arc::new(AtomicUsize::new(0));
        tokio::spawn(serve(endpoint, target, hellos.clone()));
        FakeNode {
            addr,
            cert_der: cert.to_vec(),
            hellos,
        }
    }

    fn hellos(&self) -> usize {
        self.hellos.load(Ordering::SeqCst)
    }
}

async fn serve(endpoint: quinn::Endpoint, target: String, hellos: Arc<AtomicUsize>) {
    while let Some(incoming) = endpoint.accept().await {
        let (target, hellos) = (target.clone(), hellos.clone());
        tokio::spawn(async move {
            let Ok(connection) = incoming.await else {
                return;
            };
            let Ok((mut send, mut recv)) = connection.accept_bi().await else {
                return;
            };
            let mut buffer = FrameBuffer::new(64 * 1024);
            let first = loop {
                match buffer.next_frame(Phase::PreAuth) {
                    Ok(Some(frame)) => break frame,
                    Ok(None) => {}
                    Err(_) => return,
                }
                match recv.read_chunk(64 * 1024, true).await {
                    Ok(Some(chunk)) => buffer.extend(&chunk.bytes),
                    Ok(None) | Err(_) => return,
                }
            };
            // Anything but a Hello goes unanswered, so the test fails on
            // the count below (or times out) rather than passing by luck.
            let Frame::Hello(hello) = first else { return };
            if hello.min_version > PROTOCOL_VERSION || hello.max_version < PROTOCOL_VERSION {
                return;
            }
            hellos.fetch_add(1, Ordering::SeqCst);
            let redirect = Frame::Redirect(Redirect {
                request_id: 0,
                node: Text(target),
            });
            let bytes = codec::frame_to_vec(&redirect).expect("encodes");
            if send.write_all(&bytes).await.is_ok() {
                connection.closed().await;
            }
        });
    }
}

/// The real broker's certificate, which the client must trust too once redirected.
fn broker_cert_der(broker: &TestBroker) -> Vec<u8> {
    let certs = CertificateDer::pem_file_iter(&broker.broker().cert_path)
        .expect("opens the certificate")
        .collect::<Result<Vec<_>, _>>()
        .expect("parses the certificate");
    certs.first().expect("one certificate").to_vec()
}

/// Options that connect `identity` to the fake node, trusting both certificates.
fn options_via(node: &FakeNode, broker: &TestBroker, identity: &Identity) -> ClientOptions {
    let mut connect = ConnectConfig::new(
        node.addr.to_string(),
        Trust::CaDer(vec![node.cert_der.clone(), broker_cert_der(broker)]),
    );
    // Both certificates are issued for localhost.
    connect.server_name = Some("localhost".into());
    connect.connect_timeout = Duration::from_secs(5);
    let mut options = identity.options(broker);
    options.connect = connect;
    options
}

#[tokio::test]
async fn the_client_follows_a_redirect_and_authenticates_at_the_target() {
    let broker = TestBroker::start().await;
    let node = FakeNode::start(RedirectTo::Node(broker.broker().quic_addr.to_string())).await;
    let (alice, bob) = (Identity::new(), Identity::new());

    let bob_client = tokio::time::timeout(WAIT, Client::connect(options_via(&node, &broker, &bob)))
        .await
        .expect("connects in time")
        .expect("connects through the redirect");
    assert_eq!(
        node.hellos(),
        1,
        "the client said Hello to the fake node once"
    );
    assert_eq!(bob_client.status(), Status::Connected);
    // Only an authenticated session at the real broker can publish a card
    // and receive pushed messages.
    bob_client.publish_card().await.expect("publishes its card");

    let alice_client = alice.connect(&broker).await;
    alice_client
        .send(&[bob.address()], b"found you", HOUR)
        .await
        .expect("sent");
    let message = tokio::time::timeout(WAIT, bob_client.next_message())
        .await
        .expect("arrives in time")
        .expect("running")
        .expect("opens");
    assert_eq!(message.opened.plaintext, b"found you");
    assert_eq!(message.opened.sender, alice.address());
    assert_eq!(node.hellos(), 1, "no reconnect went back to the fake node");
    broker.shutdown().await;
}

#[tokio::test]
async fn a_redirect_loop_is_an_error_not_a_hang() {
    let broker = TestBroker::start().await;
    let node = FakeNode::start(RedirectTo::Itself).await;

    let result = tokio::time::timeout(
        Duration::from_secs(30),
        Client::connect(options_via(&node, &broker, &Identity::new())),
    )
    .await
    .expect("gives up in time");
    match result {
        Err(ClientError::Protocol(reason)) => {
            assert!(reason.contains("redirect"), "{reason}");
        }
        Err(other) => panic!("expected a redirect error, got {other}"),
        Ok(_) => panic!("connected through a redirect loop"),
    }
    let hellos = node.hellos();
    assert!(
        (2..=16).contains(&hellos),
        "followed the loop a few times, then stopped: {hellos} connections"
    );
    broker.shutdown().await;
}
