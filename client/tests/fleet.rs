//! A sharded fleet on loopback: several real brokers sharing a fleet map and
//! a fleet CA, clients entering through any node.

mod support;

use std::time::Duration;

use backbone_broker::fleet::LinkState;
use backbone_protocol::ErrorCode;
use backbone_protocol::bytes::Text;
use backbone_protocol::fleet::{HandoffAck, HandoffDone, Import, PeerFrame, PeerHello};
use support::{TestFleet, next_delivery};

const WAIT: Duration = Duration::from_secs(10);
const HOUR: Duration = Duration::from_secs(3600);

#[tokio::test]
async fn clients_are_redirected_home_and_sends_cross_nodes() {
    let fleet = TestFleet::start(3).await;
    let alice = fleet.identity_on(0);
    let bob = fleet.identity_on(1);
    let carol = fleet.identity_on(2);
    // Everyone enters through a node that is not their home.
    let bob_client = fleet.connect(&bob, 2).await;
    let carol_client = fleet.connect(&carol, 0).await;
    let alice_client = fleet.connect(&alice, 1).await;

    // Fetching bob's card from alice's home node (0) goes to bob's (1).
    let ack = alice_client
        .send(&[bob.address()], b"across the fleet", HOUR)
        .await
        .expect("sent");
    assert_eq!(ack.stored.len(), 1, "{ack:?}");
    assert!(ack.failed.is_empty(), "{ack:?}");
    let message = tokio::time::timeout(WAIT, bob_client.next_message())
        .await
        .expect("in time")
        .expect("running")
        .expect("opens");
    assert_eq!(message.opened.plaintext, b"across the fleet");
    assert_eq!(message.opened.sender, alice.address());
    assert_eq!(message.delivery.seq, ack.stored[0].seq);

    // One send to a local and two remote recipients: one message id, durable
    // on every owner before the ack.
    let recipients = [alice.address(), bob.address(), carol.address()];
    let ack = alice_client
        .send(&recipients, b"to everyone", HOUR)
        .await
        .expect("sent");
    assert_eq!(ack.stored.len(), 3, "{ack:?}");
    for client in [&alice_client, &bob_client, &carol_client] {
        let delivery = next_delivery(client, WAIT).await;
        assert_eq!(delivery.message_id, ack.message_id);
    }
    fleet.shutdown().await;
}

#[tokio::test]
async fn a_full_mailbox_on_another_node_refuses_with_quota_exceeded() {
    let fleet = TestFleet::start_with(2, |_, config| config.limits.mailbox_max_envelopes = 1).await;
    let alice = fleet.identity_on(0);
    let bob = fleet.identity_on(1);
    // A forward needs the link up (before, a send is refused with a
    // retryable `ShardUnavailable`).
    fleet.wait_links_up().await;
    fleet.connect(&bob, 1).await;
    let alice_client = fleet.connect(&alice, 0).await;
    let ack = alice_client
        .send_envelope(&[bob.address()], vec![1], HOUR)
        .await
        .expect("sent");
    assert_eq!(ack.stored.len(), 1, "{ack:?}");
    // The owner node refuses; the code crosses the fleet link unchanged.
    let ack = alice_client
        .send_envelope(&[bob.address(), alice.address()], vec![2], HOUR)
        .await
        .expect("sent");
    assert_eq!(ack.failed.len(), 1, "{ack:?}");
    assert_eq!(ack.failed[0].address, bob.address());
    assert_eq!(
        ErrorCode::from_u16(ack.failed[0].code),
        Some(ErrorCode::QuotaExceeded)
    );
    assert_eq!(ack.stored.len(), 1, "alice's own copy is stored: {ack:?}");
    fleet.shutdown().await;
}

#[tokio::test]
async fn a_down_owner_fails_only_its_recipients_and_recovers() {
    let mut fleet = TestFleet::start(3).await;
    let alice = fleet.identity_on(0);
    let bob = fleet.identity_on(1);
    let carol = fleet.identity_on(2);
    fleet.connect(&bob, 1).await;
    fleet.connect(&carol, 2).await;
    let alice_client = fleet.connect(&alice, 0).await;
    alice_client
        .send(&[bob.address()], b"before", HOUR)
        .await
        .expect("sent");

    fleet.stop(1).await;
    // The link notices the node is gone (it said goodbye on shutdown).
    let deadline = tokio::time::Instant::now() + WAIT;
    while fleet.nodes[0]
        .broker()
        .link_states()
        .iter()
        .any(|(name, state)| name == "node-1" && *state == LinkState::Up)
    {
        assert!(tokio::time::Instant::now() < deadline, "link stays up");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let ack = alice_client
        .send(&[bob.address(), carol.address()], b"while down", HOUR)
        .await
        .expect("the send itself is answered");
    assert_eq!(ack.stored.len(), 1, "{ack:?}");
    assert_eq!(ack.stored[0].address, carol.address());
    assert_eq!(ack.failed.len(), 1, "{ack:?}");
    let failed = ack.failed[0];
    assert_eq!(failed.address, bob.address());
    assert_eq!(failed.code, ErrorCode::ShardUnavailable as u16);
    assert_eq!(failed.retry_after_ms, Some(1000));

    // Back up: the retry goes through, and bob gets both stored messages.
    fleet.nodes[1].restart().await;
    fleet.wait_links_up().await;
    let ack = alice_client
        .send(&[bob.address()], b"after", HOUR)
        .await
        .expect("sent");
    assert_eq!(ack.stored.len(), 1, "{ack:?}");
    let bob_client = fleet.connect(&bob, 1).await;
    let mut texts = Vec::new();
    for _ in 0..2 {
        let message = tokio::time::timeout(WAIT, bob_client.next_message())
            .await
            .expect("in time")
            .expect("running")
            .expect("opens");
        texts.push(message.opened.plaintext);
    }
    assert_eq!(texts, vec![b"before".to_vec(), b"after".to_vec()]);
    fleet.shutdown().await;
}

#[tokio::test]
async fn nodes_with_different_maps_refuse_to_route_to_each_other() {
    // Node 1 loads the same slots under another epoch: a map mismatch.
    let fleet = TestFleet::start_with(2, |index, config| {
        if index == 1 {
            let file = config.fleet.file.clone().expect("fleet file");
            let text = std::fs::read_to_string(&file)
                .expect("map")
                .replace("epoch = 1", "epoch = 2");
            let other = file.with_file_name("fleet-epoch-2.toml");
            std::fs::write(&other, text).expect("write");
            config.fleet.file = Some(other);
        }
    })
    .await;
    let reason = refusal_seen_by(&fleet, 0).await;
    assert!(reason.contains("fleet map mismatch"), "{reason}");
    assert!(reason.contains("epoch 2"), "{reason}");

    let alice = fleet.identity_on(0);
    let bob = fleet.identity_on(1);
    let alice_client = fleet.connect(&alice, 0).await;
    let ack = alice_client
        .send_envelope(&[bob.address()], b"opaque".to_vec(), HOUR)
        .await
        .expect("answered");
    assert!(ack.stored.is_empty(), "{ack:?}");
    assert_eq!(ack.failed[0].code, ErrorCode::ShardUnavailable as u16);
    let error = alice_client
        .fetch_card(&bob.address())
        .await
        .expect_err("no route to bob's card");
    assert_eq!(error.code(), Some(ErrorCode::ShardUnavailable), "{error}");
    fleet.shutdown().await;
}

/// Waits until node `index`'s only link is refused; returns the reason.
async fn refusal_seen_by(fleet: &TestFleet, index: usize) -> String {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let states = fleet.nodes[index].broker().link_states();
        if let [(_, LinkState::Refused(reason))] = &states[..] {
            return reason.clone();
        }
        assert!(tokio::time::Instant::now() < deadline, "{states:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Sends one request to node `to` over a fresh peer link, as node `as_node`
/// (with that node's fleet certificate), and returns the answer.
async fn peer_request(
    fleet: &TestFleet,
    as_node: &str,
    to: usize,
    build: impl FnOnce(u64) -> PeerFrame,
) -> PeerFrame {
    use backbone_broker::fleet::{link::PeerReader, pki};
    use backbone_protocol::codec::{MAX_FRAME_LEN, encode_peer_frame};
    let credentials = pki::load(fleet.pki.path(), as_node).expect("credentials");
    let tls = pki::peer_client_config(&credentials).expect("tls");
    let tls = quinn::crypto::rustls::QuicClientConfig::try_from(tls).expect("quic tls");
    let endpoint = quinn::Endpoint::client("127.0.0.1:0".parse().expect("addr")).expect("endpoint");
    let peer = fleet.nodes[to].broker().peer_addr.expect("peer listener");
    let connection = endpoint
        .connect_with(
            quinn::ClientConfig::new(std::sync::Arc::new(tls)),
            peer,
            &format!("node-{to}"),
        )
        .expect("connect")
        .await
        .expect("handshake");
    let (mut send, recv) = connection.open_bi().await.expect("stream");
    let map = backbone_broker::fleet::FleetMap::load(&fleet.map_path()).expect("map");
    let mut bytes = Vec::new();
    let hello = PeerHello {
        node: Text(as_node.to_owned()),
        epoch: map.epoch(),
        map_digest: map.digest(),
    };
    encode_peer_frame(&PeerFrame::Hello(hello), &mut bytes).expect("encode");
    encode_peer_frame(&build(1), &mut bytes).expect("encode");
    send.write_all(&bytes).await.expect("write");
    let mut reader = PeerReader::new(recv, MAX_FRAME_LEN);
    let welcome = reader.next().await.expect("welcome");
    assert!(matches!(welcome, PeerFrame::Welcome(_)), "{welcome:?}");
    let answer = tokio::time::timeout(WAIT, reader.next())
        .await
        .expect("answer in time")
        .expect("answer");
    connection.close(0u32.into(), b"done");
    answer
}

/// An identity whose address falls in `slots`.
fn identity_in(slots: std::ops::RangeInclusive<u16>) -> support::Identity {
    loop {
        let identity = support::Identity::new();
        if slots.contains(&backbone_protocol::fleet::slot_of(&identity.address())) {
            return identity;
        }
    }
}

/// Growing the fleet: a third node takes over half of node 0's slots, with
/// their stored envelopes and cursors, while a sender keeps sending.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_node_takes_over_slots_with_their_mailboxes_under_traffic() {
    use std::collections::{BTreeMap, BTreeSet};
    use std::sync::{Arc, Mutex};

    // Epoch 1: node-0 owns 0-2047, node-1 owns 2048-4095.
    let mut fleet = TestFleet::start(2).await;
    let mover = identity_in(1024..=2047); // node-0, then node-2
    let stayer = identity_in(0..=1023); // node-0 throughout
    let sender = identity_in(2048..=4095); // node-1 throughout
    let mover_client = fleet.connect(&mover, 0).await;
    let capability = backbone_client::DeliveryCapability::random();
    mover_client
        .register_capability(&capability)
        .await
        .expect("registers a capability");
    // Two devices of the mover, one of them unregistered before the move:
    // only the other may come back on node-2.
    let (kept, revoked) = (
        backbone_protocol::Keypair::generate(),
        backbone_protocol::Keypair::generate(),
    );
    let as_device = |device: &backbone_protocol::Keypair| {
        let certificate =
            backbone_protocol::DeviceCertificate::issue(&mover.signing, device.public(), 1);
        let credentials = backbone_client::Credentials {
            identity_key: mover.signing.public(),
            device: device.clone(),
            certificate: Some(certificate),
        };
        (certificate, credentials)
    };
    for device in [&kept, &revoked] {
        mover_client
            .register_device(as_device(device).0)
            .await
            .expect("registers a device");
    }
    mover_client
        .unregister_device(&revoked.public().device_id())
        .await
        .expect("unregisters a device");
    // Two tokens of the mover: one to fetch after the move, and one a
    // password guesser has brought to one failure short of the lock.
    let token = mover_client
        .create_token(b"moves with its owner", HOUR, None)
        .await
        .expect("creates a token");
    let guessed = mover_client
        .create_token(b"guessed at", HOUR, Some("right"))
        .await
        .expect("creates a token");
    {
        let guesser = backbone_client::TokenFetcher::connect(fleet.connect_config(1))
            .await
            .expect("anonymous session");
        for _ in 1..5 {
            assert!(matches!(
                guesser.get(&guessed, Some("wrong")).await,
                Err(backbone_client::ClientError::Token(
                    backbone_client::TokenError::WrongPassword
                ))
            ));
        }
        guesser.close().await;
    }
    // Two files of the mover: a complete one big enough to move in several
    // parts, and one whose upload stopped halfway.
    let file_plain: Vec<u8> = (0..5 * 1024 * 1024 + 7)
        .map(|i: usize| (i % 251) as u8)
        .collect();
    let moved_file = mover_client
        .put_file(
            backbone_client::FileSource::Bytes(file_plain.clone().into()),
            HOUR,
        )
        .await
        .expect("uploads a file");
    let partial = mover_client
        .create_file(
            1000,
            backbone_protocol::bytes::ContentHash::of(&[7; 1000]),
            backbone_protocol::bytes::FileSecret::random().hash(),
            HOUR,
        )
        .await
        .expect("creates a file")
        .file_id;
    mover_client
        .upload_file_part(&partial, 0, &[7; 400])
        .await
        .expect("uploads a part");
    fn file_path(
        fleet: &TestFleet,
        node: usize,
        id: &backbone_protocol::bytes::FileId,
    ) -> std::path::PathBuf {
        fleet.nodes[node]
            .dir
            .path()
            .join("files")
            .join(hex::encode(id.0))
    }
    assert!(file_path(&fleet, 0, &moved_file.id).exists());
    fleet.connect(&stayer, 0).await;
    let sender_client = Arc::new(fleet.connect(&sender, 1).await);

    // Five envelopes for the mover; it reads and acknowledges two of them.
    for n in 0..5u64 {
        let ack = sender_client
            .send_envelope(&[mover.address()], n.to_le_bytes().to_vec(), HOUR)
            .await
            .expect("sent");
        assert_eq!(ack.stored.len(), 1);
    }
    // Three large envelopes too, so the handover needs more than one batch
    // and frames beyond the client frame limit.
    for n in 100..103u64 {
        let mut payload = n.to_le_bytes().to_vec();
        payload.resize(900 * 1024, n as u8);
        let ack = sender_client
            .send_envelope(&[mover.address()], payload, HOUR)
            .await
            .expect("sent");
        assert_eq!(ack.stored.len(), 1);
    }
    for expected in 1..=2 {
        let delivery = next_delivery(&mover_client, WAIT).await;
        assert_eq!(delivery.seq, expected);
        mover_client.ack(delivery.seq).await.expect("ack");
    }
    // Let the cursor reach the store, then go offline.
    tokio::time::sleep(Duration::from_millis(300)).await;
    drop(mover_client);

    // Traffic through the whole procedure: numbered envelopes to both
    // recipients, each retried with a new number until acknowledged.
    let acked: Arc<Mutex<BTreeMap<[u8; 32], BTreeSet<u64>>>> = Arc::default();
    let attempted = Arc::new(Mutex::new(BTreeSet::new()));
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let traffic = {
        let (client, acked, attempted, stop) = (
            sender_client.clone(),
            acked.clone(),
            attempted.clone(),
            stop.clone(),
        );
        let recipients = [mover.address(), stayer.address()];
        tokio::spawn(async move {
            let mut next = 1_000u64;
            while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                next += 1;
                attempted.lock().expect("lock").insert(next);
                if let Ok(ack) = client
                    .send_envelope(&recipients, next.to_le_bytes().to_vec(), HOUR)
                    .await
                {
                    for stored in ack.stored {
                        acked
                            .lock()
                            .expect("lock")
                            .entry(stored.address.0)
                            .or_default()
                            .insert(next);
                    }
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
    };

    // Epoch 2: node-2 owns 1024-2047, moved from node-0.
    fleet.grow_by_node_2_taking_1024_2047().await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let status = fleet.nodes[2].broker().fleet_status();
        let source = fleet.nodes[0].broker().fleet_status();
        if status["importing_slots"] == 0 && source["handoffs"][0]["state"] == "done" {
            assert_eq!(status["handoffs"][0]["state"], "imported", "{status}");
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "{status} {source}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Keep sending on the new map until a fair amount reached the mover (on
    // a busy machine the procedure may have left little), then stop.
    let enough = tokio::time::Instant::now() + Duration::from_secs(20);
    tokio::time::sleep(Duration::from_millis(500)).await;
    while acked
        .lock()
        .expect("lock")
        .get(&mover.address().0)
        .map_or(0, BTreeSet::len)
        <= 10
        && tokio::time::Instant::now() < enough
    {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    traffic.await.expect("traffic task");

    // The mover, entering through node-1, lands on node-2 and resumes after
    // its cursor: envelopes 3..5 first, then the traffic, nothing twice.
    let mover_client = fleet.connect(&mover, 1).await;
    let mut delivered = Vec::new();
    let mut seqs = Vec::new();
    while let Ok(Some(delivery)) =
        tokio::time::timeout(Duration::from_secs(2), mover_client.next_delivery()).await
    {
        seqs.push(delivery.seq);
        delivered.push(u64::from_le_bytes(
            delivery.envelope[..8].try_into().expect("8 bytes"),
        ));
        mover_client.ack(delivery.seq).await.expect("ack");
    }
    assert_eq!(
        &delivered[..6],
        &[2, 3, 4, 100, 101, 102],
        "resumes after the cursor"
    );
    assert_eq!(seqs[0], 3);
    // The capability hash moved with the mailbox.
    assert_eq!(
        mover_client.list_capabilities().await.expect("lists"),
        vec![capability.hash()]
    );
    // The registered device moved and logs in there; the unregistered one
    // did not come back.
    assert_eq!(
        mover_client.list_devices().await.expect("lists"),
        vec![as_device(&kept).0]
    );
    let through_node_1 = |device| {
        let mut options = fleet.options(&mover, 1);
        options.credentials = as_device(device).1;
        options
    };
    backbone_client::Client::connect(through_node_1(&kept))
        .await
        .expect("the kept device logs in on node-2");
    let refused = backbone_client::Client::connect(through_node_1(&revoked))
        .await
        .err()
        .expect("the unregistered device is refused on node-2");
    assert_eq!(
        refused.code(),
        Some(ErrorCode::DeviceNotRegistered),
        "{refused}"
    );
    // So did the tokens, with their failure counts: fetched through node-0,
    // the previous owner, the requests go to node-2.
    let fetcher = backbone_client::TokenFetcher::connect(fleet.connect_config(0))
        .await
        .expect("anonymous session");
    assert_eq!(
        fetcher.get(&token, None).await.expect("the token moved"),
        b"moves with its owner"
    );
    assert!(matches!(
        fetcher.get(&guessed, Some("wrong")).await,
        Err(backbone_client::ClientError::Token(
            backbone_client::TokenError::Locked
        ))
    ));
    fetcher.close().await;
    // And the files, bytes and records: the complete one downloads through
    // node-0 (redirected to node-2), the partial one resumes where it was.
    let mut downloaded = Vec::new();
    backbone_client::FileFetcher::new(fleet.connect_config(0))
        .get(&moved_file, &mut downloaded)
        .await
        .expect("the file moved");
    assert!(downloaded == file_plain, "the moved file's content differs");
    let state = mover_client
        .file_status(&partial)
        .await
        .expect("the partial file moved");
    assert_eq!((state.received, state.complete), (400, false));
    let state = mover_client
        .upload_file_part(&partial, 400, &[7; 600])
        .await
        .expect("the upload resumes on node-2");
    assert!(state.complete);
    for id in [&moved_file.id, &partial] {
        assert!(file_path(&fleet, 2, id).exists(), "node-2 holds the bytes");
        assert!(
            !file_path(&fleet, 0, id).exists(),
            "node-0 deleted its copy"
        );
    }
    let unique: BTreeSet<u64> = delivered.iter().copied().collect();
    assert_eq!(unique.len(), delivered.len(), "duplicates in {delivered:?}");
    let acked_mover = acked
        .lock()
        .expect("lock")
        .remove(&mover.address().0)
        .unwrap_or_default();
    let lost: Vec<_> = acked_mover.difference(&unique).collect();
    assert!(lost.is_empty(), "acknowledged but lost: {lost:?}");
    let attempted = attempted.lock().expect("lock").clone();
    assert!(
        unique
            .iter()
            .all(|n| *n < 5 || (100..103).contains(n) || attempted.contains(n)),
        "delivered something never sent"
    );
    assert!(
        acked_mover.len() > 10,
        "too little traffic was acknowledged: {acked_mover:?}"
    );
    println!(
        "mover: sent {} attempts, acked {}, delivered {}, lost {}, duplicated {}",
        attempted.len(),
        acked_mover.len(),
        unique.len(),
        lost.len(),
        delivered.len() - unique.len()
    );

    // node-0 replays the handover as if it had missed node-2's answer: the
    // finished move is acknowledged and nothing is merged again; a mailbox
    // outside the move is refused.
    let mut replay = backbone_protocol::fleet::MailboxTransfer {
        address: mover.address(),
        head: 999,
        envelopes: vec![backbone_protocol::fleet::TransferEnvelope {
            seq: 999,
            message_id: backbone_protocol::bytes::MessageId([9; 16]),
            sender: None,
            stored_at_ms: 1,
            expires_at_ms: u64::MAX,
            envelope: backbone_protocol::bytes::Blob::from(vec![9; 8]),
        }],
        cursors: vec![],
        card: None,
        devices: vec![],
        capabilities: vec![],
        tokens: vec![],
        policy: None,
        relationships: vec![],
        deletion: None,
    };
    let answer = peer_request(&fleet, "node-0", 2, |request_id| {
        PeerFrame::Import(Import {
            request_id,
            epoch: 2,
            mailboxes: vec![replay.clone()],
        })
    })
    .await;
    assert!(
        matches!(
            answer,
            PeerFrame::HandoffAck(HandoffAck { result: Ok(()), .. })
        ),
        "{answer:?}"
    );
    let answer = peer_request(&fleet, "node-0", 2, |request_id| {
        PeerFrame::HandoffDone(HandoffDone {
            request_id,
            epoch: 2,
            slots: vec![(1024, 2047)],
        })
    })
    .await;
    assert!(
        matches!(
            answer,
            PeerFrame::HandoffAck(HandoffAck { result: Ok(()), .. })
        ),
        "{answer:?}"
    );
    replay.address = stayer.address();
    let answer = peer_request(&fleet, "node-0", 2, |request_id| {
        PeerFrame::Import(Import {
            request_id,
            epoch: 2,
            mailboxes: vec![replay.clone()],
        })
    })
    .await;
    assert!(
        matches!(&answer, PeerFrame::HandoffAck(HandoffAck { result: Err((code, _)), .. })
            if *code == ErrorCode::UnexpectedFrame as u16),
        "{answer:?}"
    );

    // node-0 kept nothing of the moved slots.
    fleet.stop(0).await;
    let stores = support::open_stores(fleet.nodes[0].dir.path());
    let moved = |address: &backbone_protocol::Address| {
        (1024..=2047).contains(&backbone_protocol::fleet::slot_of(address))
    };
    let mut left = stores.directory.addresses(&moved).expect("scan");
    left.extend(stores.log.mailboxes(&moved));
    assert!(
        left.is_empty(),
        "node-0 still holds {} moved mailboxes",
        left.len()
    );
    let stayer_address = stayer.address();
    let is_stayer = |a: &backbone_protocol::Address| *a == stayer_address;
    assert!(
        !stores
            .directory
            .addresses(&is_stayer)
            .expect("scan")
            .is_empty()
            || !stores.log.mailboxes(&is_stayer).is_empty()
    );
    stores.log.close().expect("closes");
    drop(stores);
    // ...and node-2 merged nothing from the replay.
    fleet.stop(2).await;
    let stores = support::open_stores(fleet.nodes[2].dir.path());
    let head = stores.log.head_seq(&mover.address()).expect("head");
    assert!((5..999).contains(&head), "head {head}");
    stores.log.close().expect("closes");
    drop(stores);
    fleet.shutdown().await;
}

#[tokio::test]
async fn a_node_cannot_link_under_another_nodes_name() {
    // node-1 presents node-0's certificate (issued by the same fleet CA) while
    // calling itself node-1: node-0 refuses the link.
    let fleet = TestFleet::start_with(2, |index, config| {
        if index == 1 {
            let pki = config.fleet.pki_dir.clone().expect("pki");
            let forged = pki.join("forged");
            std::fs::create_dir_all(&forged).expect("dir");
            std::fs::copy(pki.join("ca.pem"), forged.join("ca.pem")).expect("ca");
            std::fs::copy(pki.join("node-0.pem"), forged.join("node-1.pem")).expect("cert");
            std::fs::copy(pki.join("node-0.key"), forged.join("node-1.key")).expect("key");
            config.fleet.pki_dir = Some(forged);
        }
    })
    .await;
    let reason = refusal_seen_by(&fleet, 1).await;
    assert!(reason.contains("does not name node node-1"), "{reason}");
    fleet.shutdown().await;
}
