//! `Delete`: the owner deletes envelopes from its mailbox, durably before
//! `Done` (a delete is a record in the mailbox log).

use std::sync::Arc;

use backbone_protocol::frame::{Delete, Done, ErrorCode};
use backbone_protocol::{Address, Frame};

use super::error_frame;
use crate::shared::Shared;

/// `owner` deletes the envelopes `delete.seqs` of its mailbox; seqs that
/// are not stored are ignored.
pub async fn delete(shared: &Arc<Shared>, owner: Address, delete: Delete) -> Frame {
    let id = delete.request_id;
    match shared.writer.delete(owner, delete.seqs).await {
        Ok(count) => {
            metrics::counter!("backbone_envelopes_deleted_total").increment(count as u64);
            if count > 0 {
                shared.registry.freed(&owner);
            }
            Frame::Done(Done { request_id: id })
        }
        Err(error) => error_frame(id, ErrorCode::StorageFailure, error.to_string()),
    }
}
