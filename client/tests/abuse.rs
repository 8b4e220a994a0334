//! The probes of a hostile review, each against a real broker on loopback,
//! asserting the bound that closes the hole it found:
//!
//! - half-open QUIC handshakes cannot hold the places real clients need;
//! - one source cannot take every unauthenticated or anonymous place;
//! - anonymous `GetToken` floods from clients that never read cannot make
//!   the broker's memory grow with what they ask for;
//! - before authentication a connection gets one stream and 4 KiB frames,
//!   and large frames leave no memory behind.
//!
//! Memory is measured on a broker process of its own (the clients' buffers
//! would hide the broker's in one process), with its resident set from
//! `/proc`.

mod process;
mod support;

use std::net::{IpAddr, Ipv4Addr, SocketAddr, UdpSocket};
use std::sync::Arc;
use std::time::{Duration, Instant};

use backbone_client::transport::{RawConnection, tls_config};
use backbone_client::{Client, ClientOptions, ConnectConfig, Trust};
use backbone_protocol::codec::{self, PRE_AUTH_MAX_FRAME_LEN};
use backbone_protocol::frame::{GetToken, Hello};
use backbone_protocol::{ErrorCode, Frame, PROTOCOL_VERSION};
use support::{Identity, TestBroker, eventually};

const HOUR: Duration = Duration::from_secs(3600);

/// Sends `count` QUIC Initial packets (each a complete ClientHello, as a
/// real client's first datagram) to `server`, spread round-robin over
/// `sources`, and never reads an answer: the half-open handshakes a flood
/// from forged addresses leaves. Returns the bytes sent.
fn flood_initials(server: SocketAddr, sources: &[IpAddr], count: usize, trust: &Trust) -> usize {
    let tls = tls_config(trust).expect("tls config");
    let crypto = quinn_proto::crypto::rustls::QuicClientConfig::try_from(tls).expect("quic tls");
    let client = quinn_proto::ClientConfig::new(Arc::new(crypto));
    let mut endpoint = quinn_proto::Endpoint::new(
        Arc::new(quinn_proto::EndpointConfig::default()),
        None,
        false,
        None,
    );
    let sockets: Vec<UdpSocket> = sources
        .iter()
        .map(|ip| UdpSocket::bind(SocketAddr::new(*ip, 0)).expect("bind a loopback source"))
        .collect();
    let mut sent = 0;
    let mut datagram = Vec::new();
    for i in 0..count {
        let now = Instant::now();
        let (_, mut connection) = endpoint
            .connect(now, client.clone(), server, "localhost")
            .expect("connect");
        datagram.clear();
        let transmit = connection
            .poll_transmit(now, 1, &mut datagram)
            .expect("an Initial to send");
        sent += sockets[i % sockets.len()]
            .send_to(&datagram[..transmit.size], server)
            .expect("send");
    }
    sent
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn half_open_handshakes_from_many_addresses_do_not_lock_real_clients_out() {
    let broker = TestBroker::start_with(|config| {
        // Short, so the test also sees the places come back.
        config.auth.deadline = Duration::from_secs(3);
    })
    .await;
    let limits = broker.config.limits.clone();
    // 2,050 handshakes (about 2.5 MB), from 50 addresses: more than
    // `max_unauthenticated`, under the per-source limits, as a flood with
    // forged source addresses looks.
    let sources: Vec<IpAddr> = (1..=50)
        .map(|i| IpAddr::V4(Ipv4Addr::new(127, 0, 1, i)))
        .collect();
    let trust = Trust::CaFile(broker.broker().cert_path.clone());
    let sent = flood_initials(broker.broker().quic_addr, &sources, 2_050, &trust);
    assert!(sent > 2_000_000, "{sent} bytes");
    // The broker has taken the burst in.
    eventually("the burst is in", Duration::from_secs(5), async || {
        broker.broker().unauthenticated() >= limits.retry_above_unauthenticated
    })
    .await;

    let alice = Identity::new();
    let started = Instant::now();
    let client = tokio::time::timeout(
        Duration::from_secs(2),
        Client::connect(alice.options(&broker)),
    )
    .await
    .expect("a real client connects within 2 s of the burst")
    .expect("connects");
    client.publish_card().await.expect("and is served");
    eprintln!(
        "connected {:?} after the burst; {} retries; {} unauthenticated",
        started.elapsed(),
        broker.broker().retries(),
        broker.broker().unauthenticated()
    );
    assert!(
        broker.broker().retries() > 0,
        "the burst was asked to prove its addresses"
    );
    assert!(
        broker.broker().unauthenticated() <= limits.retry_above_unauthenticated + 1,
        "half-open handshakes hold at most the places below the Retry threshold: {}",
        broker.broker().unauthenticated()
    );
    // A handshake that never completes gives its place back at the
    // deadline, counted from its first packet.
    eventually(
        "the half-open places come back",
        Duration::from_secs(6),
        async || broker.broker().unauthenticated() == 0,
    )
    .await;
    drop(client);
    broker.shutdown().await;
}

/// A client endpoint on another loopback address, to play a second host.
fn endpoint_at(ip: [u8; 4]) -> quinn::Endpoint {
    quinn::Endpoint::client(SocketAddr::from((ip, 0))).expect("client endpoint")
}

fn connect_config_from(broker: &TestBroker, endpoint: &quinn::Endpoint) -> ConnectConfig {
    let mut config = broker.connect_config();
    config.endpoint = Some(endpoint.clone());
    config
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_source_cannot_take_every_place_before_authentication() {
    let broker = TestBroker::start_with(|config| {
        config.limits.per_source.max_unauthenticated = 3;
        config.auth.deadline = Duration::from_secs(30);
    })
    .await;
    let host = endpoint_at([127, 0, 0, 2]);
    let config = connect_config_from(&broker, &host);
    let mut held = Vec::new();
    for _ in 0..3 {
        held.push(
            RawConnection::connect(&config)
                .await
                .expect("within the cap"),
        );
    }
    // The fourth is asked to prove its address, does, and is refused.
    let retries = broker.broker().retries();
    let refused = RawConnection::connect(&config).await;
    assert!(refused.is_err(), "a fourth unauthenticated connection");
    assert!(
        broker.broker().retries() > retries,
        "it was asked for a Retry first"
    );
    // Another host is not affected.
    let alice = Identity::new();
    alice.connect(&broker).await;
    // Once one authenticates, its place is free again.
    let bob = Identity::new();
    held[0]
        .authenticate(&backbone_client::transport::Credentials::primary(
            &bob.signing,
        ))
        .await
        .expect("authenticates");
    RawConnection::connect(&config)
        .await
        .expect("a place came free");
    drop(held);
    broker.shutdown().await;

    // An exempt network is held only to the broker-wide limits.
    let broker = TestBroker::start_with(|config| {
        config.limits.per_source.max_unauthenticated = 3;
        config.limits.per_source.exempt = vec!["127.0.0.2/32".parse().expect("net")];
    })
    .await;
    let config = connect_config_from(&broker, &host);
    let mut held = Vec::new();
    for _ in 0..6 {
        held.push(RawConnection::connect(&config).await.expect("exempt"));
    }
    drop(held);
    broker.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn anonymous_sessions_are_capped_per_source_and_in_total() {
    let broker = TestBroker::start_with(|config| {
        config.limits.per_source.max_anonymous = 2;
        config.limits.max_anonymous = 3;
    })
    .await;
    let host = endpoint_at([127, 0, 0, 2]);
    let config = connect_config_from(&broker, &host);
    let mut sessions = Vec::new();
    for _ in 0..2 {
        let mut raw = RawConnection::connect(&config).await.expect("connects");
        raw.open_anonymous().await.expect("within the cap");
        sessions.push(raw);
    }
    let mut third = RawConnection::connect(&config).await.expect("connects");
    let error = third
        .open_anonymous()
        .await
        .expect_err("over the per-source cap");
    assert_eq!(error.code(), Some(ErrorCode::Overloaded), "{error}");
    assert_eq!(broker.broker().anonymous_sessions(), 2);

    // From another address, one more fits the broker-wide cap, then none.
    let mut other = RawConnection::connect(&broker.connect_config())
        .await
        .expect("connects");
    other.open_anonymous().await.expect("room left in total");
    let mut over = RawConnection::connect(&broker.connect_config())
        .await
        .expect("connects");
    let error = over
        .open_anonymous()
        .await
        .expect_err("over the broker-wide cap");
    assert_eq!(error.code(), Some(ErrorCode::Overloaded), "{error}");

    // Closing one frees its place.
    sessions.pop().expect("one").close().await;
    eventually(
        "the closed session's place comes back",
        Duration::from_secs(5),
        async || broker.broker().anonymous_sessions() == 2,
    )
    .await;
    let mut again = RawConnection::connect(&config).await.expect("connects");
    again.open_anonymous().await.expect("a place came free");
    broker.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn before_authentication_a_connection_gets_small_frames_and_one_stream() {
    let broker =
        TestBroker::start_with(|config| config.auth.deadline = Duration::from_secs(30)).await;

    // A Hello declaring 100,000 bytes is refused from its header, long
    // before the auth deadline and without the body being sent.
    let mut raw = RawConnection::connect(&broker.connect_config())
        .await
        .expect("connects");
    let mut header = codec::frame_to_vec(&Frame::Hello(Hello {
        min_version: PROTOCOL_VERSION,
        max_version: PROTOCOL_VERSION,
    }))
    .expect("encodes");
    header[..4].copy_from_slice(&100_000u32.to_be_bytes());
    raw.send_raw(&header).await.expect("sent");
    let closed = tokio::time::timeout(Duration::from_secs(2), raw.connection().closed())
        .await
        .expect("closed at once");
    let quinn::ConnectionError::ApplicationClosed(close) = closed else {
        panic!("closed otherwise: {closed:?}");
    };
    assert_eq!(
        close.error_code,
        quinn::VarInt::from_u32(ErrorCode::FrameTooLarge as u32),
        "{close:?}"
    );

    // A frame at the limit is still read: this padded Hello ends the
    // handshake for its trailing bytes, not for its size.
    let mut raw = RawConnection::connect(&broker.connect_config())
        .await
        .expect("connects");
    let mut at_limit = header.clone();
    at_limit[..4].copy_from_slice(&((PRE_AUTH_MAX_FRAME_LEN - 4) as u32).to_be_bytes());
    at_limit.resize(PRE_AUTH_MAX_FRAME_LEN, 0);
    raw.send_raw(&at_limit).await.expect("sent");
    let error = raw.recv().await.expect_err("the handshake ends");
    assert_eq!(error.code(), Some(ErrorCode::TrailingBytes), "{error}");

    // A second stream cannot be opened before authentication, so nothing
    // can be buffered on one.
    let raw = RawConnection::connect(&broker.connect_config())
        .await
        .expect("connects");
    let connection = raw.connection().clone();
    let second = tokio::time::timeout(Duration::from_millis(500), connection.open_bi()).await;
    assert!(second.is_err(), "a second stream opened before Auth");

    // Authentication grants the configured streams.
    let mut raw = RawConnection::connect(&broker.connect_config())
        .await
        .expect("connects");
    let alice = Identity::new();
    raw.authenticate(&backbone_client::transport::Credentials::primary(
        &alice.signing,
    ))
    .await
    .expect("authenticates");
    let connection = raw.connection().clone();
    let (mut send, _recv) = tokio::time::timeout(Duration::from_secs(2), connection.open_bi())
        .await
        .expect("a second stream after Auth")
        .expect("opens");
    send.write_all(&[0]).await.expect("write");
    broker.shutdown().await;
}

/// The broker process's resident set, in bytes.
fn rss_bytes(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("proc status");
    let kib: u64 = status
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))
        .and_then(|value| value.split_whitespace().next())
        .and_then(|kib| kib.parse().ok())
        .expect("VmRSS");
    kib * 1024
}

/// A broker process of its own, and how to reach it.
struct ProcessBroker {
    process: process::BrokerProcess,
    connect: ConnectConfig,
    _dir: tempfile::TempDir,
}

fn start_process_broker(env: &[(&str, &str)]) -> ProcessBroker {
    let dir = tempfile::tempdir().expect("tempdir");
    let port = process::free_udp_port();
    let process = process::spawn_broker(
        &dir.path().join("data"),
        port,
        dir.path().join("broker.log"),
        "127.0.0.1:0",
        "info",
        env,
    );
    process.wait_listening();
    let mut connect = ConnectConfig::new(
        format!("127.0.0.1:{port}"),
        Trust::CaFile(dir.path().join("data/tls/cert.pem")),
    );
    connect.server_name = Some("localhost".into());
    ProcessBroker {
        process,
        connect,
        _dir: dir,
    }
}

fn options(broker: &ProcessBroker, identity: &Identity) -> ClientOptions {
    let mut options = ClientOptions::primary(
        broker.connect.clone(),
        identity.signing.clone(),
        identity.encryption.clone(),
    );
    options.request_timeout = Duration::from_secs(10);
    options
}

/// The highest resident set seen while `work` runs, sampled every 50 ms.
async fn peak_rss_during<T>(pid: u32, work: impl std::future::Future<Output = T>) -> (u64, T) {
    let mut peak = rss_bytes(pid);
    tokio::pin!(work);
    let mut tick = tokio::time::interval(Duration::from_millis(50));
    loop {
        tokio::select! {
            output = &mut work => return (peak.max(rss_bytes(pid)), output),
            _ = tick.tick() => peak = peak.max(rss_bytes(pid)),
        }
    }
}

const MIB: u64 = 1024 * 1024;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_anonymous_get_token_flood_that_never_reads_keeps_broker_memory_bounded() {
    let broker = start_process_broker(&[]);
    let pid = broker.process.child.id();
    let (alice, bob) = (Identity::new(), Identity::new());
    let alice_client = Client::connect(options(&broker, &alice))
        .await
        .expect("connects");
    let bob_client = Client::connect(options(&broker, &bob))
        .await
        .expect("connects");
    alice_client.publish_card().await.expect("card");
    bob_client.publish_card().await.expect("card");
    // The largest token the default config allows, less the sealing.
    let token = alice_client
        .create_token(&vec![7u8; 64 * 1024 - 1024], HOUR, None)
        .await
        .expect("token");
    let mut sent_before = Vec::new();
    for _ in 0..20 {
        let started = Instant::now();
        bob_client
            .send_envelope(&[alice.address()], vec![1; 100], HOUR)
            .await
            .expect("send");
        sent_before.push(started.elapsed());
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let idle = rss_bytes(pid);

    // 16 anonymous connections, each asking for the token 1,400 times back
    // to back and never reading an answer.
    let mut request = Vec::new();
    for id in 1..=1_400u64 {
        codec::encode_frame(
            &Frame::GetToken(GetToken {
                request_id: id,
                token_id: token.id,
                password_verifier: None,
            }),
            &mut request,
        )
        .expect("encodes");
    }
    let flood = async {
        let mut attackers = Vec::new();
        for _ in 0..16 {
            let mut raw = RawConnection::connect(&broker.connect)
                .await
                .expect("connects");
            raw.open_anonymous().await.expect("anonymous");
            raw.send_raw(&request).await.expect("requests sent");
            attackers.push(raw);
        }
        // Meanwhile another client's sends go on as before.
        let mut sent_during = Vec::new();
        let deadline = Instant::now() + Duration::from_secs(8);
        while Instant::now() < deadline {
            let started = Instant::now();
            bob_client
                .send_envelope(&[alice.address()], vec![1; 100], HOUR)
                .await
                .expect("send during the flood");
            sent_during.push(started.elapsed());
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        (attackers, sent_during)
    };
    let (peak, (attackers, mut sent_during)) = peak_rss_during(pid, flood).await;
    sent_during.sort();
    sent_before.sort();
    let median = |times: &[Duration]| times[times.len() / 2];
    let worst = *sent_during.last().expect("sends");
    eprintln!(
        "broker RSS idle {} MiB, peak during the flood {} MiB (+{} MiB); sends before: median {:?}; during: median {:?}, worst {:?} over {}",
        idle / MIB,
        peak / MIB,
        peak.saturating_sub(idle) / MIB,
        median(&sent_before),
        median(&sent_during),
        worst,
        sent_during.len()
    );
    assert!(
        peak.saturating_sub(idle) <= 64 * MIB,
        "the flood grew the broker by {} MiB",
        peak.saturating_sub(idle) / MIB
    );
    assert!(
        worst < Duration::from_secs(1),
        "a send took {worst:?} during the flood"
    );
    drop(attackers);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_frames_and_extra_streams_leave_no_memory_behind() {
    let broker = start_process_broker(&[]);
    let pid = broker.process.child.id();
    // Let the broker settle, with one connection made (first-use
    // allocations are not what is measured).
    let mut warm = RawConnection::connect(&broker.connect)
        .await
        .expect("connects");
    warm.open_anonymous().await.expect("anonymous");
    tokio::time::sleep(Duration::from_millis(500)).await;
    let idle = rss_bytes(pid);

    let megabyte = 1024 * 1024;
    // An unknown frame type: skipped as it arrives.
    let mut unknown = vec![0u8; 4 + megabyte];
    unknown[..4].copy_from_slice(&(megabyte as u32).to_be_bytes());
    unknown[4] = PROTOCOL_VERSION;
    unknown[5..9].copy_from_slice(&9_999u32.to_le_bytes());
    // A known frame type with a malformed body: buffered, then skipped.
    let mut malformed = unknown.clone();
    let sealed_send_tag =
        codec::frame_to_vec(&Frame::SealedSend(backbone_protocol::frame::SealedSend {
            request_id: 1,
            ttl_secs: 1,
            recipient: backbone_protocol::Address([0; 32]),
            capability: backbone_protocol::bytes::DeliveryCapability([0; 32]),
            envelope: backbone_protocol::bytes::Blob::default(),
        }))
        .expect("encodes")[5..9]
            .to_vec();
    malformed[5..9].copy_from_slice(&sealed_send_tag);
    malformed[9..17].copy_from_slice(&1u64.to_le_bytes());
    malformed[17..].fill(0xFF);

    let mut held = Vec::new();
    for i in 0..30 {
        let mut raw = RawConnection::connect(&broker.connect)
            .await
            .expect("connects");
        raw.open_anonymous().await.expect("anonymous");
        raw.send_raw(if i % 2 == 0 { &unknown } else { &malformed })
            .await
            .expect("sent");
        match tokio::time::timeout(Duration::from_secs(10), raw.recv()).await {
            Ok(Ok(Frame::Error(error))) => assert!(
                error.code == ErrorCode::UnknownFrameType as u16
                    || error.code == ErrorCode::MalformedFrame as u16
                    || error.code == ErrorCode::TruncatedFrame as u16,
                "{error:?}"
            ),
            other => panic!("expected the frame's error, got {other:?}"),
        }
        held.push(raw);
    }
    // 20 connections still authenticating try to open a second stream.
    let mut pending = Vec::new();
    for _ in 0..20 {
        let raw = RawConnection::connect(&broker.connect)
            .await
            .expect("connects");
        let connection = raw.connection().clone();
        let opened = tokio::time::timeout(Duration::from_millis(200), connection.open_bi()).await;
        if let Ok(Ok((mut send, _recv))) = opened {
            let _ = send.write_all(&vec![0u8; megabyte]).await;
        }
        pending.push(raw);
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    let after = rss_bytes(pid);
    eprintln!(
        "broker RSS idle {} KiB, with 30 anonymous connections past a 1 MB frame each and 20 still authenticating {} KiB (+{} KiB)",
        idle / 1024,
        after / 1024,
        after.saturating_sub(idle) / 1024
    );
    assert!(
        after.saturating_sub(idle) <= 12 * MIB,
        "the connections hold {} MiB",
        after.saturating_sub(idle) / MIB
    );
    drop((held, pending, warm));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_identities_of_one_source_share_a_relationship_request_budget() {
    let broker = TestBroker::start_with(|config| {
        config.limits.per_source.relationship_requests_per_minute = 2;
    })
    .await;
    let owner = Identity::new();
    let owner_client = owner.connect(&broker).await;
    let capability = backbone_protocol::bytes::DeliveryCapability::random();
    owner_client
        .register_capability(&capability)
        .await
        .expect("registers");
    // Fresh identities cost nothing, but from one address they share one
    // budget: two requests pass, the third identity's is refused although
    // its own per-identity budget is untouched.
    let host = endpoint_at([127, 0, 0, 2]);
    let mut codes = Vec::new();
    for _ in 0..3 {
        let asker = Identity::new();
        let mut options = asker.options(&broker);
        options.connect = connect_config_from(&broker, &host);
        let client = Client::connect(options).await.expect("connects");
        client.publish_card().await.expect("card");
        codes.push(
            client
                .request_relationship(&owner.address(), &capability, b"hi")
                .await
                .err()
                .and_then(|error| error.code()),
        );
    }
    assert_eq!(codes, [None, None, Some(ErrorCode::RateLimited)]);
    // An identity connected from another address has its own budget.
    let elsewhere = Identity::new();
    elsewhere
        .connect(&broker)
        .await
        .request_relationship(&owner.address(), &capability, b"hi")
        .await
        .expect("another source's budget");
    broker.shutdown().await;
}
