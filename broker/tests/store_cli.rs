//! `backbone store verify` and `backbone store repair` against a data
//! directory with a damaged record in the middle of its mailbox log.

use std::path::Path;
use std::process::{Command, Output};
use std::sync::Arc;

use backbone_broker::config::StoreConfig;
use backbone_broker::store::{Append, StoredEnvelope, open, wait_for};
use backbone_protocol::Address;
use backbone_protocol::bytes::MessageId;

const NOW_MS: u64 = 1_800_000_000_000;

fn backbone(args: &[&str], data: &Path) -> Output {
    Command::new(env!("CARGO_BIN_EXE_backbone"))
        .args(args)
        .arg("--data-dir")
        .arg(data)
        .output()
        .expect("backbone runs")
}

fn text(output: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

fn envelope(seq: u64, payload: &[u8]) -> Arc<StoredEnvelope> {
    Arc::new(StoredEnvelope {
        seq,
        message_id: MessageId([seq as u8; 16]),
        sender: None,
        stored_at_ms: NOW_MS,
        expires_at_ms: NOW_MS + 3_600_000,
        envelope: payload.to_vec(),
    })
}

/// The seqs the log holds for `address`.
fn seqs(data: &Path, address: &Address) -> Vec<u64> {
    let (stores, _) = open::open(data, &StoreConfig::default(), NOW_MS).expect("opens");
    let seqs = stores
        .log
        .export(address)
        .expect("export")
        .iter()
        .map(|envelope| envelope.seq)
        .collect();
    stores.log.close().expect("closes");
    seqs
}

#[test]
fn verify_finds_a_damaged_record_and_repair_drops_only_it() {
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path();
    let (alice, bob) = (Address([1; 32]), Address([2; 32]));
    let marker = [0xa5u8; 64];
    {
        let (stores, _) = open::open(data, &StoreConfig::default(), NOW_MS).expect("opens");
        for seq in 1..=5 {
            let payload: &[u8] = if seq == 3 { &marker } else { b"fine" };
            let items = vec![
                Append {
                    address: alice,
                    envelope: envelope(seq, payload),
                },
                Append {
                    address: bob,
                    envelope: envelope(seq, b"bob's"),
                },
            ];
            wait_for(|done| stores.log.append(items, done)).expect("appended");
        }
        // A clean close checkpoints the index, so verify can name mailboxes.
        stores.log.close().expect("closes");
    }
    let verified = backbone(&["store", "verify"], data);
    assert!(verified.status.success(), "{}", text(&verified));
    assert!(text(&verified).contains("the mailbox log is whole"));

    // Damage one byte of alice's third envelope, in the middle of the log.
    let segment = std::fs::read_dir(data.join("log"))
        .expect("log dir")
        .map(|entry| entry.expect("entry").path())
        .find(|path| path.extension().is_some_and(|ext| ext == "log"))
        .expect("a segment");
    let mut bytes = std::fs::read(&segment).expect("read");
    let at = bytes
        .windows(marker.len())
        .position(|window| window == marker)
        .expect("the marked envelope is in the segment");
    bytes[at + 10] ^= 0xff;
    std::fs::write(&segment, &bytes).expect("write");

    let verified = backbone(&["store", "verify"], data);
    let report = text(&verified);
    assert_eq!(verified.status.code(), Some(1), "{report}");
    assert!(report.contains("offset"), "{report}");
    assert!(
        report.contains(&format!("envelopes of {alice} are in it")),
        "{report}"
    );
    assert!(!report.contains(&bob.to_string()), "{report}");

    // Repair without --yes asks, and an empty answer changes nothing.
    let refused = backbone(&["store", "repair"], data);
    assert!(!refused.status.success(), "{}", text(&refused));
    assert_eq!(backbone(&["store", "verify"], data).status.code(), Some(1));

    let repaired = backbone(&["store", "repair", "--yes"], data);
    assert!(repaired.status.success(), "{}", text(&repaired));
    assert!(
        text(&repaired).contains("1 indexed envelope(s) dropped"),
        "{}",
        text(&repaired)
    );
    let verified = backbone(&["store", "verify"], data);
    assert!(verified.status.success(), "{}", text(&verified));
    assert_eq!(
        seqs(data, &alice),
        [1, 2, 4, 5],
        "only the damaged one is gone"
    );
    assert_eq!(seqs(data, &bob), [1, 2, 3, 4, 5], "bob lost nothing");
}
