//! Identity deletion: scheduling and cancelling it, and the sweep that
//! purges identities whose grace period is over.
//!
//! `DeleteIdentity` records a schedule (`identity.deletion_grace` from now)
//! in the store's deletion index; the identity works as before and may
//! `CancelDeletion` until then. The [`sweep`] task finds due deletions
//! through the index and runs [`purge_identity`] on each: the address
//! becomes a tombstone (refused everywhere, for good), every record of it
//! is deleted, and each peer with a pending or active relationship has its
//! side ended and is told. Each step can be repeated, so a failure or a
//! crash anywhere only means the sweep runs the purge again; a peer that
//! cannot be reached (its node is down) stays on the tombstone's list and
//! is retried until told.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Instant;

use backbone_protocol::Address;
use backbone_protocol::deletion::{Deletion, PeerToTell};
use backbone_protocol::frame::{DeletionScheduled, Done, ErrorCode, Frame};
use backbone_protocol::relationship::SideChange;
use tracing::{debug, info, warn};

use crate::cmd::error_frame as error;
use crate::fleet::Route;
use crate::shared::Shared;
use crate::shared::live::SESSION_END_SLACK;
use crate::store::run_blocking as blocking;

/// `DeleteIdentity`: schedules the deletion of `address`, durably, and
/// answers when it will be purged. Asking again answers the same time.
pub async fn schedule(shared: &Arc<Shared>, address: Address, request_id: u64) -> Frame {
    let grace = shared.config.identity.deletion_grace;
    let purge_at_ms = (shared.clock)().saturating_add(grace.as_millis() as u64);
    let store = shared.directory.clone();
    let scheduled = blocking(move || {
        let record = store.schedule_deletion(&address, purge_at_ms)?;
        store.sync()?;
        Ok(record)
    })
    .await;
    match scheduled {
        Ok(Deletion::Scheduled { purge_at_ms }) => {
            metrics::counter!("backbone_identity_deletions_scheduled_total").increment(1);
            Frame::DeletionScheduled(DeletionScheduled {
                request_id,
                purge_at_ms,
            })
        }
        // The purge began while this request was on its way.
        Ok(_) => error(
            request_id,
            ErrorCode::IdentityDeleted,
            "this identity was deleted",
        ),
        Err(message) => error(request_id, ErrorCode::StorageFailure, message),
    }
}

/// `CancelDeletion`: removes the scheduled deletion of `address`;
/// `NotFound` when none is scheduled (never, cancelled, or already purging).
pub async fn cancel(shared: &Arc<Shared>, address: Address, request_id: u64) -> Frame {
    let store = shared.directory.clone();
    let cancelled = blocking(move || {
        let cancelled = store.cancel_deletion(&address)?;
        store.sync()?;
        Ok(cancelled)
    })
    .await;
    match cancelled {
        Ok(true) => {
            metrics::counter!("backbone_identity_deletions_cancelled_total").increment(1);
            Frame::Done(Done { request_id })
        }
        Ok(false) => error(
            request_id,
            ErrorCode::NotFound,
            "no deletion of this identity is scheduled",
        ),
        Err(message) => error(request_id, ErrorCode::StorageFailure, message),
    }
}

/// What [`purge_identity`] did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Purge {
    /// No deletion of the address is due: it was cancelled, or is not due yet.
    NotDue,
    /// The address is a tombstone and its records are deleted; `untold`
    /// peers could not be told yet (0 when the deletion is complete).
    Purged {
        /// Peers told in this run.
        told: usize,
        /// Peers still to tell.
        untold: usize,
    },
}

/// Purges the identity `address` once its deletion is due: the one place
/// that decides what deleting an identity removes. Every step can be
/// repeated, so after any failure the sweep simply runs it again:
///
/// 1. Its mailbox actor records the tombstone, with every peer of a pending
///    or active relationship to tell, flushes, refuses everything from then
///    on, waits for its writes in flight, and stops
///    ([`crate::mailbox::MailboxMsg::Retire`]). From here on the address is
///    refused everywhere: authentication, sends, cards, relationships.
/// 2. Its connections are closed with `IdentityDeleted`, and their requests
///    in progress finish.
/// 3. A writer flush orders the purge after every write those made
///    (cursor moves go through the writer).
/// 4. Every record of the address is deleted: envelopes, head, cursors,
///    card, devices, capability hashes, tokens, file records, policy,
///    relationships ([`crate::store::Store::purge_mailbox`]), flushed; then
///    the files' bytes.
/// 5. Each peer to tell has its side of the relationship ended, with a
///    `Notice::IdentityDeleted` in its mailbox, on whichever node owns it.
/// 6. The tombstone keeps only the peers that could not be told; with none
///    left it is bare and the deletion is complete.
pub async fn purge_identity(shared: &Arc<Shared>, address: Address) -> Result<Purge, String> {
    // 1.
    let now_ms = (shared.clock)();
    let tombstone = shared
        .registry
        .retire(&address, now_ms)
        .await
        .map_err(|error| format!("beginning the purge: {error}"))?;
    let to_tell = match tombstone {
        None => return Ok(Purge::NotDue),
        Some(Deletion::Purging { to_tell, .. }) => to_tell,
        Some(Deletion::Scheduled { .. } | Deletion::Deleted) => Vec::new(),
    };
    // 2.
    let limit = shared.config.server.shutdown_grace + SESSION_END_SLACK;
    let closed = shared
        .sessions
        .close_all(
            &address,
            ErrorCode::IdentityDeleted,
            "this identity was deleted",
            limit,
        )
        .await;
    // 3.
    shared
        .writer
        .flush()
        .await
        .map_err(|error| format!("flushing the writer: {error}"))?;
    // 4. Everything else stored for the identity, file records included,
    // flushed; then the files' bytes (a crash in between leaves bytes
    // without a record, which the next start deletes).
    let store = shared.directory.clone();
    let files = blocking(move || {
        let files = store.files_of(&address)?;
        store.purge_directory(&address)?;
        store.sync()?;
        Ok(files)
    })
    .await?;
    // The envelopes, durably (their head stays: the address is a tombstone).
    let log = shared.log.clone();
    crate::store::completed(|done| log.drop_mailbox(address, done))
        .await
        .map_err(|error| format!("dropping the mailbox's envelopes: {error}"))?;
    for file in &files {
        shared.files.remove(&file.id);
    }
    // 5.
    let mut untold: Vec<PeerToTell> = Vec::new();
    for peer in &to_tell {
        if !tell(shared, address, peer).await {
            untold.push(*peer);
        }
    }
    // 6.
    let store = shared.directory.clone();
    let left = untold.clone();
    blocking(move || {
        store.settle_purge(&address, &left)?;
        store.sync()
    })
    .await?;
    let told = to_tell.len() - untold.len();
    if untold.is_empty() {
        metrics::counter!("backbone_identities_purged_total").increment(1);
        // The address stays out of the info log: the identity asked to be forgotten.
        info!(
            sessions_closed = closed,
            peers_told = told,
            "an identity was purged"
        );
        debug!(%address, "identity purged");
    }
    Ok(Purge::Purged {
        told,
        untold: untold.len(),
    })
}

/// Ends `peer`'s side of the relationship with the deleted `address` and
/// tells it; whether that is done (or there is nothing to do).
async fn tell(shared: &Arc<Shared>, address: Address, peer: &PeerToTell) -> bool {
    let change = SideChange::PeerDeleted {
        id: peer.relationship,
    };
    match super::relationships::apply(shared, peer.peer, address, change).await {
        Ok(_) => true,
        // The peer's side is gone, or the peer was deleted too: nobody to tell.
        Err((ErrorCode::NotFound | ErrorCode::IdentityDeleted, _)) => true,
        Err((code, reason)) => {
            debug!(code = code.name(), %reason, "a peer of a deleted identity could not be told yet");
            false
        }
    }
}

/// Whether this node serves `address` now (it owns the slot and is not
/// still importing it).
fn served_here(shared: &Shared, address: &Address) -> bool {
    matches!(shared.fleet.route(address), Route::Local) && !shared.fleet.is_importing(address)
}

/// The deletion sweep: every `expiry.interval`, purges the identities whose
/// deletion is due on this node, until the broker shuts down.
pub async fn sweep(shared: Arc<Shared>) {
    let mut shutdown = shared.shutdown.clone();
    let mut tick = tokio::time::interval(shared.config.expiry.interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // Purges with peers left to tell (their nodes are down, most likely),
    // and when to try them again: after `fleet.retry_after`, the pause a
    // client is told to take when an owner node is down.
    let mut resting: HashMap<Address, Instant> = HashMap::new();
    let retry_untold = shared.config.fleet.retry_after;
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = shutdown.wait_for(|stop| *stop) => return,
        }
        let (store, now_ms) = (shared.directory.clone(), (shared.clock)());
        let batch = shared.config.expiry.batch;
        let due = match blocking(move || store.due_deletions(now_ms, batch)).await {
            Ok(due) => due,
            Err(error) => {
                warn!(%error, "finding due identity deletions failed");
                continue;
            }
        };
        resting.retain(|_, until| *until > Instant::now());
        for address in due {
            if *shared.shutdown.borrow() {
                return;
            }
            // A slot this node does not serve now is purged by its owner
            // (a handover carries the deletion along).
            if !served_here(&shared, &address) || resting.contains_key(&address) {
                continue;
            }
            match purge_identity(&shared, address).await {
                Ok(Purge::Purged { untold, .. }) if untold > 0 => {
                    resting.insert(address, Instant::now() + retry_untold);
                }
                Ok(_) => {}
                Err(error) => {
                    warn!(%error, "purging a deleted identity failed; retrying later");
                    resting.insert(address, Instant::now() + retry_untold);
                }
            }
        }
    }
}
