//! `backbone store verify` and `backbone store repair` against a data
//! directory with a damaged record in the middle of its mailbox log.

mod common;

use std::path::Path;
use std::process::{Command, Output};

use backbone_broker::config::StoreConfig;
use backbone_broker::store::{Append, open, wait_for};
use backbone_protocol::Address;
use common::{NOW_MS, damage_marked_record, envelope, text};

fn backbone(args: &[&str], data: &Path) -> Output {
    Command::new(env!("CARGO_BIN_EXE_backbone"))
        .args(args)
        .arg("--data-dir")
        .arg(data)
        .output()
        .expect("backbone runs")
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
    damage_marked_record(data, &marker);

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
