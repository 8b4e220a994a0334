//! Handing slots over to a new owner (growing a fleet).
//!
//! A fleet map may list `[[move]]` entries: slots that `from` owned in the
//! previous epoch and `to` owns in this one. Once both nodes run this epoch:
//!
//! 1. `to` owns the slots but refuses to serve them (`ShardUnavailable`,
//!    retryable) until the handover completes; `from` no longer owns them, so
//!    it accepts no writes for them either and redirects their clients.
//! 2. `from` sends every mailbox of those slots (envelopes with their
//!    sequence numbers, head, cursors, card, devices, capability hashes,
//!    tokens, policy, relationships, and a scheduled deletion or the
//!    tombstone of a deleted identity) in [`Import`] batches; `to` merges
//!    each batch and flushes before acknowledging it. Then it sends each
//!    file of those mailboxes in [`ImportFile`] parts; `to` makes each part
//!    durable before acknowledging it, and stores the file's record with
//!    the last part.
//! 3. `from` sends [`HandoffDone`]; `to` records it durably and starts
//!    serving the slots.
//! 4. `from` records the move as done and deletes its copies, file bytes
//!    included.
//!
//! Every step is idempotent, so a crash or a broken link anywhere just means
//! the task starts over: imports merge (heads and cursors only grow), and the
//! copies on `from` are deleted only after `to` confirmed the whole move.

use std::sync::Arc;
use std::time::Duration;

use backbone_protocol::bytes::Blob;
use backbone_protocol::fleet::{
    HandoffDone, Import, ImportFile, MailboxTransfer, PeerFrame, TransferEnvelope, TransferFile,
    TransferToken, slot_of,
};
use tracing::{info, warn};

use super::Move;
use crate::shared::Shared;
use crate::store::MailboxExport;
use crate::store::run_blocking as blocking;

/// Envelope bytes per [`Import`] frame, well under the frame limit.
const BATCH_BYTES: usize = 2 * 1024 * 1024;
/// How long `to` may take to store one batch.
const BATCH_TIMEOUT: Duration = Duration::from_secs(60);
/// Pause before starting over after a failure.
const RETRY_PAUSE: Duration = Duration::from_secs(1);

/// Runs the handover of `m` from this node until it is complete (or the
/// broker shuts down), retrying after any failure.
pub async fn hand_over(shared: Arc<Shared>, m: Move) {
    let mut shutdown = shared.shutdown.clone();
    loop {
        let attempt = tokio::select! {
            attempt = attempt(&shared, &m) => attempt,
            _ = shutdown.wait_for(|stop| *stop) => return,
        };
        match attempt {
            Ok(moved) => {
                info!(to = %m.to, mailboxes = moved, "slot handover complete");
                shared.fleet.set_handoff_state(&m, "done".into());
                return;
            }
            Err(reason) => {
                warn!(to = %m.to, %reason, "slot handover interrupted; retrying");
                shared
                    .fleet
                    .set_handoff_state(&m, format!("retrying: {reason}"));
                tokio::time::sleep(RETRY_PAUSE).await;
            }
        }
    }
}

/// One pass: transfer (unless already confirmed), then delete the local
/// copies. Returns how many mailboxes were deleted here.
async fn attempt(shared: &Arc<Shared>, m: &Move) -> Result<usize, String> {
    let store = shared.directory.clone();
    let done_key = shared.fleet.handoff_out_key(m);
    let done = {
        let (store, key) = (store.clone(), done_key.clone());
        blocking(move || store.meta(&key)).await?.is_some()
    };
    let slots = m.clone();
    let addresses = {
        let (store, log) = (store.clone(), shared.log.clone());
        blocking(move || {
            let filter = |address: &backbone_protocol::Address| slots.contains(slot_of(address));
            let mut all: std::collections::BTreeSet<_> =
                store.addresses(&filter)?.into_iter().collect();
            all.extend(log.mailboxes(&filter));
            Ok::<_, crate::store::StoreError>(all.into_iter().collect::<Vec<_>>())
        })
        .await?
    };
    if !done {
        transfer(shared, m, &addresses).await?;
        let store = store.clone();
        blocking(move || {
            store.put_meta(&done_key, b"done")?;
            store.sync()
        })
        .await?;
    }
    shared
        .fleet
        .set_handoff_state(m, format!("deleting {} local copies", addresses.len()));
    let count = addresses.len();
    for address in &addresses {
        let log = shared.log.clone();
        crate::store::completed(|done| log.drop_mailbox(*address, done))
            .await
            .map_err(|error| format!("dropping a handed-over mailbox's envelopes: {error}"))?;
    }
    let files = blocking(move || {
        let mut files = Vec::new();
        for address in &addresses {
            files.extend(store.files_of(address)?.into_iter().map(|file| file.id));
            store.purge_directory(address)?;
            store.remove_deletion(address)?;
        }
        store.sync()?;
        Ok(files)
    })
    .await?;
    // The records are gone, durably; now their bytes.
    for id in &files {
        shared.files.remove(id);
    }
    Ok(count)
}

async fn transfer(
    shared: &Arc<Shared>,
    m: &Move,
    addresses: &[backbone_protocol::Address],
) -> Result<(), String> {
    let links = shared
        .fleet
        .links()
        .ok_or_else(|| "no fleet links".to_owned())?;
    let epoch = shared.fleet.map().epoch();
    let mut batch: Vec<MailboxTransfer> = Vec::new();
    let mut batch_bytes = 0;
    for (done, address) in addresses.iter().enumerate() {
        shared.fleet.set_handoff_state(
            m,
            format!("transferring {done}/{} mailboxes", addresses.len()),
        );
        let export = {
            let (store, log, address) = (shared.directory.clone(), shared.log.clone(), *address);
            blocking(move || crate::store::export_mailbox(log.as_ref(), store.as_ref(), &address))
                .await?
        };
        for part in split(export) {
            batch_bytes += part
                .envelopes
                .iter()
                .map(|e| e.envelope.0.len() + 128)
                .sum::<usize>()
                + 256;
            batch.push(part);
            if batch_bytes >= BATCH_BYTES {
                send_import(links, &m.to, epoch, std::mem::take(&mut batch)).await?;
                batch_bytes = 0;
            }
        }
    }
    if !batch.is_empty() {
        send_import(links, &m.to, epoch, batch).await?;
    }
    for address in addresses {
        transfer_files(shared, links, m, epoch, *address).await?;
    }
    let answer = links
        .request_with_timeout(&m.to, BATCH_TIMEOUT, |request_id| {
            PeerFrame::HandoffDone(HandoffDone {
                request_id,
                epoch,
                slots: m.slots.clone(),
            })
        })
        .await
        .map_err(|error| error.to_string())?;
    check_ack(answer)
}

/// Sends every file of `owner` in [`ImportFile`] parts of at most
/// [`BATCH_BYTES`], each acknowledged once durable.
async fn transfer_files(
    shared: &Arc<Shared>,
    links: &super::Links,
    m: &Move,
    epoch: u64,
    owner: backbone_protocol::Address,
) -> Result<(), String> {
    let files = {
        let store = shared.directory.clone();
        blocking(move || store.files_of(&owner)).await?
    };
    for file in files {
        let held = shared
            .files
            .held(&file.id)
            .await
            .map_err(|error| format!("file bytes: {error}"))?
            .min(file.size);
        let record = TransferFile {
            id: file.id,
            owner: file.owner,
            size: file.size,
            content_hash: file.content_hash,
            secret_hash: file.secret_hash,
            expires_at_ms: file.expires_at_ms,
            complete: file.complete,
        };
        let mut offset = 0;
        loop {
            let len = (held - offset).min(BATCH_BYTES as u64) as usize;
            let bytes = {
                let (files, id) = (shared.files.clone(), file.id);
                tokio::task::spawn_blocking(move || files.read_part(&id, offset, len))
                    .await
                    .map_err(|error| format!("blocking task failed: {error}"))?
                    .map_err(|error| format!("file bytes: {error}"))?
            };
            if bytes.len() != len {
                return Err("a file's bytes changed during the handover".into());
            }
            let last = offset + len as u64 == held;
            let part = ImportFile {
                request_id: 0,
                epoch,
                file: record.clone(),
                offset,
                bytes: Blob::from(bytes),
                last,
            };
            let answer = links
                .request_with_timeout(&m.to, BATCH_TIMEOUT, |request_id| {
                    PeerFrame::ImportFile(ImportFile { request_id, ..part })
                })
                .await
                .map_err(|error| error.to_string())?;
            check_ack(answer)?;
            metrics::counter!("backbone_fleet_handoff_file_sent_bytes_total").increment(len as u64);
            if last {
                break;
            }
            offset += len as u64;
        }
    }
    Ok(())
}

async fn send_import(
    links: &super::Links,
    to: &str,
    epoch: u64,
    mailboxes: Vec<MailboxTransfer>,
) -> Result<(), String> {
    let count = mailboxes.len();
    let answer = links
        .request_with_timeout(to, BATCH_TIMEOUT, |request_id| {
            PeerFrame::Import(Import {
                request_id,
                epoch,
                mailboxes,
            })
        })
        .await
        .map_err(|error| error.to_string())?;
    check_ack(answer)?;
    metrics::counter!("backbone_fleet_handoff_transfers_sent_total").increment(count as u64);
    Ok(())
}

fn check_ack(answer: PeerFrame) -> Result<(), String> {
    match answer {
        PeerFrame::HandoffAck(ack) => ack
            .result
            .map_err(|(code, reason)| format!("refused ({code}): {}", reason.0)),
        _ => Err("unexpected answer".into()),
    }
}

/// A mailbox as transfers of at most [`BATCH_BYTES`] of envelopes and
/// token contents each; the first carries the head, cursors, card, devices,
/// capability hashes, policy, relationships and deletion record.
fn split(export: MailboxExport) -> Vec<MailboxTransfer> {
    let empty_part = || MailboxTransfer {
        address: export.address,
        head: export.head,
        envelopes: Vec::new(),
        cursors: Vec::new(),
        card: None,
        devices: Vec::new(),
        capabilities: Vec::new(),
        tokens: Vec::new(),
        policy: None,
        relationships: Vec::new(),
        deletion: None,
    };
    let mut parts = vec![MailboxTransfer {
        cursors: export.cursors.clone(),
        card: export.card,
        devices: export.devices.clone(),
        capabilities: export.capabilities.clone(),
        policy: export.policy,
        relationships: export.relationships.clone(),
        deletion: export.deletion.clone(),
        ..empty_part()
    }];
    // The part with room for `len` more bytes: the last one, or a new one.
    let mut bytes = 0;
    let mut part_for = |parts: &mut Vec<MailboxTransfer>, len: usize| {
        if bytes + len > BATCH_BYTES && bytes > 0 {
            parts.push(empty_part());
            bytes = 0;
        }
        bytes += len;
        parts.len() - 1
    };
    for token in export.tokens {
        let last = part_for(&mut parts, token.content.len());
        parts[last].tokens.push(TransferToken {
            id: token.id,
            created_at_ms: token.created_at_ms,
            expires_at_ms: token.expires_at_ms,
            content: Blob::from(token.content),
            verifier_hash: token.verifier_hash,
            failed_attempts: token.failed_attempts,
            locked: token.locked,
        });
    }
    for envelope in export.envelopes {
        let last = part_for(&mut parts, envelope.envelope.len());
        parts[last].envelopes.push(TransferEnvelope {
            seq: envelope.seq,
            message_id: envelope.message_id,
            sender: envelope.sender,
            stored_at_ms: envelope.stored_at_ms,
            expires_at_ms: envelope.expires_at_ms,
            envelope: Blob(envelope.envelope),
        });
    }
    parts
}

/// The receiving side: a [`MailboxTransfer`] as the store's import format.
pub fn to_export(transfer: MailboxTransfer) -> MailboxExport {
    MailboxExport {
        address: transfer.address,
        head: transfer.head,
        envelopes: transfer
            .envelopes
            .into_iter()
            .map(|e| crate::store::StoredEnvelope {
                seq: e.seq,
                message_id: e.message_id,
                sender: e.sender,
                stored_at_ms: e.stored_at_ms,
                expires_at_ms: e.expires_at_ms,
                envelope: e.envelope.0,
            })
            .collect(),
        cursors: transfer.cursors,
        card: transfer.card,
        devices: transfer.devices,
        capabilities: transfer.capabilities,
        tokens: transfer
            .tokens
            .into_iter()
            .map(|token| crate::store::StoredToken {
                id: token.id,
                owner: transfer.address,
                created_at_ms: token.created_at_ms,
                expires_at_ms: token.expires_at_ms,
                content: token.content.0.to_vec(),
                verifier_hash: token.verifier_hash,
                failed_attempts: token.failed_attempts,
                locked: token.locked,
            })
            .collect(),
        policy: transfer.policy,
        relationships: transfer.relationships,
        deletion: transfer.deletion,
    }
}

#[cfg(test)]
mod tests {
    use backbone_protocol::Address;
    use backbone_protocol::bytes::{MessageId, TokenId, VerifierHash};

    use super::*;
    use crate::store::{StoredEnvelope, StoredToken};

    #[test]
    fn a_large_mailbox_splits_and_round_trips() {
        let envelopes: Vec<StoredEnvelope> = (1..=5)
            .map(|seq| StoredEnvelope {
                seq,
                message_id: MessageId([seq as u8; 16]),
                sender: None,
                stored_at_ms: 1,
                expires_at_ms: 2,
                envelope: vec![seq as u8; 1024 * 1024].into(),
            })
            .collect();
        let export = MailboxExport {
            address: Address([1; 32]),
            head: 9,
            envelopes: envelopes.clone(),
            cursors: vec![],
            card: None,
            devices: vec![],
            capabilities: vec![],
            tokens: vec![],
            policy: None,
            relationships: vec![],
            deletion: None,
        };
        let parts = split(export.clone());
        assert_eq!(parts.len(), 3, "2 MiB of envelopes per part");
        assert!(parts.iter().all(|p| p.head == 9));
        let rejoined: Vec<StoredEnvelope> = parts
            .into_iter()
            .flat_map(|part| to_export(part).envelopes)
            .collect();
        assert_eq!(rejoined, envelopes);
    }

    #[test]
    fn tokens_split_by_size_and_round_trip_with_their_owner() {
        let owner = Address([1; 32]);
        let tokens: Vec<StoredToken> = (1..=3)
            .map(|n| StoredToken {
                id: TokenId([n; 32]),
                owner,
                created_at_ms: 1,
                expires_at_ms: 2,
                content: vec![n; 1024 * 1024],
                verifier_hash: (n == 2).then_some(VerifierHash([n; 32])),
                failed_attempts: u32::from(n),
                locked: n == 3,
            })
            .collect();
        let export = MailboxExport {
            address: owner,
            head: 0,
            envelopes: vec![],
            cursors: vec![],
            card: None,
            devices: vec![],
            capabilities: vec![],
            tokens: tokens.clone(),
            policy: None,
            relationships: vec![],
            deletion: None,
        };
        let parts = split(export);
        assert_eq!(parts.len(), 2, "2 MiB of token contents per part");
        let rejoined: Vec<StoredToken> = parts
            .into_iter()
            .flat_map(|part| to_export(part).tokens)
            .collect();
        assert_eq!(rejoined, tokens);
    }
}
