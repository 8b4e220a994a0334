//! The metadata audit: everything the broker stores or logs must be in the
//! audit table of `docs/security.md`, and the table must list nothing the
//! broker does not store.
//!
//! The real `backbone` binary runs a scenario that touches every kind of
//! record (cards, a device, a delivery capability, sends, a sealed send, acks,
//! a delete, an expiry, tokens fetched with and without an identity, files
//! uploaded, downloaded and deleted, an identity deleted and one scheduled
//! for deletion) with debug logging. Afterwards every file of its data
//! directory and every record of
//! every sled tree is classified, and each class must be a row of the table.
//! Field names are taken from the stored types themselves (through serde),
//! so a new field fails the test until the table names it. The log must not
//! contain envelope bytes, card contents, capabilities, token ids, token
//! contents or the plaintext, and the sealed sender, who never
//! authenticates, must appear nowhere: not in any file of the data
//! directory, not in the log. Neither may a token's content key, its
//! password or its password verifier (only a hash of the verifier is
//! stored), nor a file's key, download secret (only its hash is stored) or
//! plaintext.

mod process;
mod support;

use std::collections::BTreeSet;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use backbone_broker::store::{SledStore, StoredEnvelope};
use backbone_client::{
    Client, ClientOptions, ConnectConfig, DeliveryCapability, FileSource, SealedOptions,
    SealedSender, TokenFetcher, Trust,
};
use backbone_protocol::deletion::{Deletion, PeerToTell};
use backbone_protocol::relationship::{Decision, InboundPolicy};
use backbone_protocol::{DeviceCertificate, IdentityCard, Keypair};
use process::{files_under, free_udp_port, spawn_broker};
use support::Identity;

const HOUR: Duration = Duration::from_secs(3600);

fn options(port: u16, ca: &Path, identity: &Identity) -> ClientOptions {
    let mut connect = ConnectConfig::new(format!("127.0.0.1:{port}"), Trust::CaFile(ca.into()));
    connect.server_name = Some("localhost".into());
    let mut options = ClientOptions::primary(
        connect,
        identity.signing.clone(),
        identity.encryption.clone(),
    );
    options.request_timeout = Duration::from_secs(10);
    options
}

async fn connect(port: u16, ca: &Path, identity: &Identity) -> Client {
    let client = Client::connect(options(port, ca, identity))
        .await
        .expect("connects");
    client.publish_card().await.expect("publishes its card");
    client
}

/// The rows of the audit table: the first cell's text inside backticks, and
/// the whole row.
fn audit_table() -> Vec<(String, String)> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/security.md");
    let text = std::fs::read_to_string(&path).expect("docs/security.md");
    let section = text
        .split("\n## Metadata audit")
        .nth(1)
        .expect("docs/security.md has a \"Metadata audit\" section");
    let section = section.split("\n## ").next().expect("section text");
    section
        .lines()
        .filter(|line| line.starts_with("| `"))
        .map(|line| {
            let id = line
                .split('`')
                .nth(1)
                .expect("a backticked record name")
                .to_owned();
            (id, line.to_owned())
        })
        .collect()
}

/// Which audited record a sled record is.
fn classify_record(tree: &str, key: &[u8]) -> String {
    match (tree, key.len()) {
        ("log_index", 32) => "log_index".into(),
        ("cursors", 64) => "cursors".into(),
        ("cards", 32) => "cards".into(),
        ("devices", 64) => "devices".into(),
        ("capabilities", 64) => "capabilities".into(),
        ("policies", 32) => "policies".into(),
        ("relationships", 64) => "relationships".into(),
        ("tokens", 32) => "tokens".into(),
        ("token_owners", 64) => "token_owners".into(),
        ("token_expiry", 72) => "token_expiry".into(),
        ("files", 32) => "files".into(),
        ("file_owners", 64) => "file_owners".into(),
        ("file_expiry", 72) => "file_expiry".into(),
        ("deletions", 32) => "deletions".into(),
        ("deletion_index", 40) => "deletion_index".into(),
        ("meta", _) => match std::str::from_utf8(key) {
            Ok("server_id") => "meta server_id".into(),
            Ok("write_epoch") => "meta write_epoch".into(),
            Ok("log_checkpoint") => "meta log_checkpoint".into(),
            Ok(name) if name.starts_with("node/handoff/") => "meta node/handoff".into(),
            _ => format!("unaudited meta key {key:?}"),
        },
        _ => format!(
            "unaudited record in tree {tree:?} with a {}-byte key",
            key.len()
        ),
    }
}

/// Which audited file a file of the data directory is.
fn classify_file(relative: &Path) -> String {
    let text = relative.to_string_lossy();
    let name = match text.as_ref() {
        "tls/cert.pem"
        | "tls/key.pem"
        | "tls/reset.key"
        | "store/backbone.epoch"
        | "store/conf"
        | "store/db" => text.as_ref(),
        other if other.starts_with("store/blobs/") => "store/blobs",
        other if other.starts_with("store/snap.") => "store/snap",
        other
            if other.strip_prefix("log/").is_some_and(|name| {
                name.strip_suffix(".log").is_some_and(|digits| {
                    digits.len() == 20 && digits.bytes().all(|b| b.is_ascii_digit())
                })
            }) =>
        {
            "log/<position>.log"
        }
        other
            if other
                .strip_prefix("files/")
                .is_some_and(|name| name.len() == 64 && hex::decode(name).is_ok()) =>
        {
            "files/<id>"
        }
        other => return format!("unaudited file {other}"),
    };
    format!("file {name}")
}

/// The field names serde writes for `value`.
fn field_names<T: serde::Serialize>(value: &T) -> Vec<String> {
    match serde_json::to_value(value).expect("serializes") {
        serde_json::Value::Object(map) => map.keys().cloned().collect(),
        other => panic!("not a struct: {other}"),
    }
}

/// Every object key and unit variant name serde writes for `value`, at any depth.
fn names_within(value: &serde_json::Value, names: &mut BTreeSet<String>) {
    match value {
        serde_json::Value::Object(map) => {
            for (key, inner) in map {
                names.insert(key.clone());
                names_within(inner, names);
            }
        }
        serde_json::Value::Array(items) => items.iter().for_each(|item| names_within(item, names)),
        serde_json::Value::String(name) => {
            names.insert(name.clone());
        }
        _ => {}
    }
}

/// Ways a log line could show `bytes`: hex, and Rust's `Debug` of a byte slice.
fn renderings(bytes: &[u8]) -> Vec<String> {
    let prefix = &bytes[..bytes.len().min(12)];
    vec![
        hex::encode(prefix),
        format!("{prefix:?}").trim_end_matches(']').to_owned(),
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn everything_stored_or_logged_is_in_the_audit_table() {
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().join("data");
    let log_path = dir.path().join("broker.log");
    let port = free_udp_port();
    // A short grace period, so that an identity is purged during the scenario.
    let broker = spawn_broker(
        &data,
        port,
        log_path.clone(),
        "127.0.0.1:0",
        "debug",
        &[("BACKBONE__IDENTITY__DELETION_GRACE", "1s")],
    );
    broker.wait_listening();
    let ca = data.join("tls/cert.pem");

    // Erin asks for her deletion first, with a card, a capability and a
    // token to purge; she is gone by the end, only her tombstone is left.
    let erin = Identity::new();
    let erin_client = connect(port, &ca, &erin).await;
    erin_client
        .register_capability(&DeliveryCapability::random())
        .await
        .expect("registers a capability");
    erin_client
        .create_token(b"erin's", HOUR, None)
        .await
        .expect("creates a token");
    erin_client.delete_identity().await.expect("schedules");

    // The scenario: two identities with cards, a second device of bob's,
    // sends with a canary, an ack, a delete, and an envelope that expires.
    let (alice, bob) = (Identity::new(), Identity::new());
    let canary = format!("audit-canary-{}", hex::encode(rand_bytes()));
    let alice_client = connect(port, &ca, &alice).await;
    let bob_client = connect(port, &ca, &bob).await;
    let device = Keypair::generate();
    let certificate = DeviceCertificate::issue(&bob.signing, device.public(), 1);
    bob_client
        .register_device(certificate)
        .await
        .expect("registers a device");
    let mut sent = Vec::new();
    for n in 0..3 {
        let ack = alice_client
            .send(&[bob.address()], format!("{canary} {n}").as_bytes(), HOUR)
            .await
            .expect("sent");
        assert!(ack.failed.is_empty());
    }
    alice_client
        .send(&[bob.address()], canary.as_bytes(), Duration::from_secs(1))
        .await
        .expect("sent");
    // Carol sends sealed: she never authenticates, only proves bob gave her
    // a capability.
    let carol = Identity::new();
    let capability = DeliveryCapability::random();
    bob_client
        .register_capability(&capability)
        .await
        .expect("registers a capability");
    let mut connect = ConnectConfig::new(format!("127.0.0.1:{port}"), Trust::CaFile(ca.clone()));
    connect.server_name = Some("localhost".into());
    let sealed = SealedSender::connect(connect, SealedOptions::new(carol.signing.clone()))
        .await
        .expect("anonymous session");
    let ack = sealed
        .send_sealed(&bob.address(), &capability, canary.as_bytes(), HOUR)
        .await
        .expect("sealed send");
    assert!(ack.failed.is_empty(), "{ack:?}");
    let sealed_seq = ack.stored[0].seq;
    sealed.close().await;

    // Dave takes only relationships; Alice asks through his template (a
    // capability) and he accepts.
    let dave = Identity::new();
    let dave_client = self::connect(port, &ca, &dave).await;
    dave_client
        .set_inbound_policy(InboundPolicy::RelationshipsOnly)
        .await
        .expect("sets the policy");
    let template = DeliveryCapability::random();
    dave_client
        .register_capability(&template)
        .await
        .expect("registers a template capability");
    alice_client
        .request_relationship(&dave.address(), &template, canary.as_bytes())
        .await
        .expect("requests a relationship");
    dave_client
        .decide_relationship(&alice.address(), Decision::Accept)
        .await
        .expect("accepts");

    // Bob shares a password-protected token; Alice fetches it as herself and
    // someone without an identity fetches it too (once with a wrong
    // password). A second token is deleted again.
    let token_password = format!("{canary}-password");
    let token = bob_client
        .create_token(canary.as_bytes(), HOUR, Some(&token_password))
        .await
        .expect("creates a token");
    let mut connect = ConnectConfig::new(format!("127.0.0.1:{port}"), Trust::CaFile(ca.clone()));
    connect.server_name = Some("localhost".into());
    let fetcher = TokenFetcher::connect(connect)
        .await
        .expect("anonymous session");
    assert_eq!(
        fetcher
            .get(&token, Some(&token_password))
            .await
            .expect("fetched anonymously"),
        canary.as_bytes()
    );
    assert!(fetcher.get(&token, Some("wrong")).await.is_err());
    fetcher.close().await;
    assert_eq!(
        alice_client
            .get_token(&token, Some(&token_password))
            .await
            .expect("fetched by alice"),
        canary.as_bytes()
    );
    let deleted = bob_client
        .create_token(b"short-lived", HOUR, None)
        .await
        .expect("creates a token");
    bob_client
        .delete_token(&deleted.id)
        .await
        .expect("deletes it");

    // Bob shares a file (its reference would travel in a message); Alice
    // downloads it. A second file is deleted again.
    let file_plain = format!("{canary} in a file").repeat(100).into_bytes();
    let file = bob_client
        .put_file(FileSource::Bytes(file_plain.clone().into()), HOUR)
        .await
        .expect("uploads a file");
    let mut downloaded = Vec::new();
    alice_client
        .get_file(&file, &mut downloaded)
        .await
        .expect("downloads the file");
    assert_eq!(downloaded, file_plain);
    let deleted_file = bob_client
        .put_file(FileSource::Bytes(b"short-lived".to_vec().into()), HOUR)
        .await
        .expect("uploads a file");
    bob_client
        .delete_file(&deleted_file.id)
        .await
        .expect("deletes it");

    let mut last = 0;
    for _ in 0..5 {
        let message = tokio::time::timeout(Duration::from_secs(10), bob_client.next_message())
            .await
            .expect("in time")
            .expect("running")
            .expect("opens");
        sent.push(message.delivery.envelope.clone());
        last = message.delivery.seq;
        if last == sealed_seq {
            // The receiver learns and verifies the sender from the envelope.
            assert_eq!(message.opened.sender, carol.address());
            assert_eq!(message.delivery.sender, None);
        }
    }
    bob_client.ack(last).await.expect("ack");
    // One more, deleted again with the first: removing bob's highest
    // envelope makes the store record his mailbox's head.
    let extra = alice_client
        .send(&[bob.address()], b"deleted again", HOUR)
        .await
        .expect("sent");
    let extra_seq = extra.stored[0].seq;
    bob_client.delete(vec![1, extra_seq]).await.expect("delete");
    // Past the short TTL, Erin's grace period and a few expiry sweeps.
    tokio::time::sleep(Duration::from_millis(2_500)).await;
    // Frank asks for his deletion just before the broker stops: it is
    // still scheduled then.
    let frank = Identity::new();
    self::connect(port, &ca, &frank)
        .await
        .delete_identity()
        .await
        .expect("schedules");
    drop((alice_client, bob_client, erin_client));

    // Stop cleanly, so everything is flushed.
    let mut broker = broker;
    let pid = broker.child.id().to_string();
    assert!(
        Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .expect("kill runs")
            .success()
    );
    let deadline = Instant::now() + Duration::from_secs(20);
    while broker.child.try_wait().expect("wait").is_none() {
        assert!(Instant::now() < deadline, "broker did not stop");
        std::thread::sleep(Duration::from_millis(50));
    }

    let table = audit_table();
    let documented: BTreeSet<&str> = table.iter().map(|(id, _)| id.as_str()).collect();
    let row = |id: &str| -> &str {
        &table
            .iter()
            .find(|(name, _)| name == id)
            .unwrap_or_else(|| panic!("docs/security.md has no audit row `{id}`"))
            .1
    };
    let mut found = BTreeSet::new();

    for path in files_under(&data) {
        let relative = path.strip_prefix(&data).expect("inside").to_owned();
        found.insert(classify_file(&relative));
    }
    let store = SledStore::open(&data.join("store")).expect("open the store");
    let records = store.dump().expect("dump");
    assert!(!records.is_empty());
    for record in &records {
        found.insert(classify_record(&record.tree, &record.key));
    }
    for id in &found {
        assert!(
            documented.contains(id.as_str()),
            "{id} is stored but not in the audit table of docs/security.md"
        );
    }
    // Rows this scenario cannot produce: a fleet handover, and sled files
    // that only appear with large values or after a snapshot.
    let elsewhere = ["meta node/handoff", "file store/blobs", "file store/snap"];
    for id in &documented {
        assert!(
            id.starts_with("log ") || found.contains(*id) || elsewhere.contains(id),
            "the audit table lists `{id}`, which the scenario did not store"
        );
    }

    drop(store);
    let stores = support::open_stores(&data);
    let store = stores.directory.clone();
    // Every field of every stored type is named in its row.
    let stored = support::export(&stores, &bob.address());
    let envelope: &StoredEnvelope = stored.envelopes.first().expect("an envelope is left");
    let card: IdentityCard = store.card(&bob.address()).expect("read").expect("card");
    let device_record = stored.devices.first().expect("a device");
    let [token_record] = &stored.tokens[..] else {
        panic!("one token is left: {:?}", stored.tokens);
    };
    assert_eq!(token_record.id, token.id);
    assert_eq!(token_record.failed_attempts, 1);
    let [file_record] = &store.files_of(&bob.address()).expect("bob's files")[..] else {
        panic!("one file is left");
    };
    assert_eq!(file_record.id, file.id);
    let dave_record = support::export(&stores, &dave.address());
    assert_eq!(dave_record.policy, Some(InboundPolicy::RelationshipsOnly));
    let [dave_side] = &dave_record.relationships[..] else {
        panic!("one relationship: {:?}", dave_record.relationships);
    };
    // Deletions: Erin's bare tombstone, Frank's schedule; every variant and
    // field name of the record is in its row.
    assert_eq!(store.deletion(&erin.address()), Ok(Some(Deletion::Deleted)));
    assert!(matches!(
        store.deletion(&frank.address()),
        Ok(Some(Deletion::Scheduled { .. }))
    ));
    let mut deletion_names = BTreeSet::new();
    for record in [
        Deletion::Scheduled { purge_at_ms: 1 },
        Deletion::Purging {
            purge_at_ms: 1,
            to_tell: vec![PeerToTell {
                peer: alice.address(),
                relationship: dave_side.id,
            }],
        },
        Deletion::Deleted,
    ] {
        names_within(
            &serde_json::to_value(&record).expect("serializes"),
            &mut deletion_names,
        );
    }
    for name in deletion_names {
        assert!(
            row("deletions").contains(&format!("`{name}`")),
            "`{name}` of `deletions` is not in its audit row"
        );
    }
    for (id, fields) in [
        ("file log/<position>.log", field_names(envelope)),
        ("cards", field_names(&card)),
        ("devices", field_names(device_record)),
        ("tokens", field_names(token_record)),
        ("files", field_names(file_record)),
        ("relationships", field_names(dave_side)),
    ] {
        for field in fields {
            assert!(
                row(id).contains(&format!("`{field}`")),
                "field `{field}` of `{id}` is not in its audit row"
            );
        }
    }
    // The broker stored the sender it authenticated, and none for the
    // sealed send.
    assert_eq!(envelope.sender, Some(alice.address()));
    let sealed_record = stored
        .envelopes
        .iter()
        .find(|envelope| envelope.seq == sealed_seq)
        .expect("the sealed envelope is stored");
    assert_eq!(sealed_record.sender, None);

    // The sealed sender is nowhere: no file of the data directory and no
    // log line holds her address or key, in any usual form.
    let carol_forms: Vec<Vec<u8>> = vec![
        carol.address().0.to_vec(),
        carol.signing.public().as_bytes().to_vec(),
        carol.address().to_string().into_bytes(),
        hex::encode(carol.address().0).into_bytes(),
        hex::encode(carol.signing.public().as_bytes()).into_bytes(),
    ];
    let capability_forms: Vec<Vec<u8>> = vec![
        capability.to_hex().into_bytes(),
        hex::decode(capability.to_hex()).expect("hex"),
    ];
    // What only the token's holders know: its reference (with the content
    // key), the key itself, the password and the verifier derived from it.
    let salt = token.salt.expect("a password salt");
    let verifier = backbone_client::token::derive_verifier(&token_password, &salt)
        .expect("derives the verifier");
    let token_secret_forms: Vec<Vec<u8>> = vec![
        token.to_text().into_bytes(),
        token.key.to_vec(),
        hex::encode(token.key).into_bytes(),
        token_password.clone().into_bytes(),
        verifier.0.to_vec(),
        hex::encode(verifier.0).into_bytes(),
    ];
    // What only a file's holders know: its reference, key and secret, and
    // its plaintext.
    let file_secret_forms: Vec<Vec<u8>> = vec![
        file.to_text().into_bytes(),
        file.key.to_vec(),
        hex::encode(file.key).into_bytes(),
        file.secret.0.to_vec(),
        hex::encode(file.secret.0).into_bytes(),
        file_plain[..64].to_vec(),
    ];
    for path in files_under(&data).into_iter().chain([log_path.clone()]) {
        let bytes = std::fs::read(&path).expect("read");
        for (what, forms) in [
            ("the sealed sender", &carol_forms),
            ("a capability", &capability_forms),
            ("a token's key, password or verifier", &token_secret_forms),
            ("a file's key, secret or plaintext", &file_secret_forms),
        ] {
            for form in forms {
                assert!(
                    !bytes
                        .windows(form.len())
                        .any(|window| window == form.as_slice()),
                    "{} holds {what}",
                    path.display()
                );
            }
        }
    }

    // The log: no plaintext, no envelope bytes, no card contents.
    let log = std::fs::read_to_string(&log_path).expect("log");
    assert!(log.contains("DEBUG"), "the broker logged at debug level");
    assert!(!log.contains(&canary), "the log holds the plaintext");
    let mut secrets: Vec<(String, Vec<u8>)> = sent
        .iter()
        .map(|bytes| ("envelope bytes".to_owned(), bytes[200..].to_vec()))
        .collect();
    for identity in [&alice, &bob] {
        let card = store
            .card(&identity.address())
            .expect("read")
            .expect("card");
        secrets.push(("card encryption key".into(), card.encryption_key.0.to_vec()));
        secrets.push(("card signature".into(), card.signature.0.to_vec()));
    }
    // Token ids are bearer secrets: stored, but never logged; nor is a
    // token's (encrypted) content.
    secrets.push(("a token id".into(), token.id.0.to_vec()));
    secrets.push(("a token id".into(), deleted.id.0.to_vec()));
    secrets.push(("token content".into(), token_record.content.clone()));
    for (what, bytes) in secrets {
        for rendering in renderings(&bytes) {
            assert!(
                !log.contains(&rendering),
                "the log holds {what}: {rendering}"
            );
        }
    }
}

fn rand_bytes() -> [u8; 8] {
    Keypair::generate().public().as_bytes()[..8]
        .try_into()
        .expect("8 bytes")
}
