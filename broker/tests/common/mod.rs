//! What the tests that run the `backbone` binary on a data directory share.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::Output;
use std::sync::Arc;

use backbone_broker::store::StoredEnvelope;
use backbone_protocol::bytes::MessageId;

/// The clock of the envelopes the tests write.
pub const NOW_MS: u64 = 1_800_000_000_000;

/// A command's standard output and error, for assertion messages and
/// searches.
pub fn text(output: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

/// An envelope stored at `NOW_MS` for an hour.
pub fn envelope(seq: u64, payload: &[u8]) -> Arc<StoredEnvelope> {
    Arc::new(StoredEnvelope {
        seq,
        message_id: MessageId([seq as u8; 16]),
        sender: None,
        stored_at_ms: NOW_MS,
        expires_at_ms: NOW_MS + 3_600_000,
        envelope: payload.to_vec().into(),
    })
}

/// Flips one byte inside the record whose payload is `marker`, in the
/// stopped broker's log under `data`: damage in the middle of the log.
/// Returns the segment file it damaged.
pub fn damage_marked_record(data: &Path, marker: &[u8]) -> PathBuf {
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
    segment
}
