//! The authenticated sessions of each address, with their connections, so
//! that the purge of a deleted identity, or the removal of a device, can
//! close them and wait until they are over.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use backbone_protocol::frame::ErrorCode;
use backbone_protocol::{Address, DeviceId};
use dashmap::DashMap;
use tokio::sync::watch;
use tracing::warn;

/// Closes the connection with an error code as the QUIC application close code.
pub(crate) fn close(connection: &quinn::Connection, code: ErrorCode, reason: &str) {
    metrics::counter!("backbone_errors_total", "code" => code.name()).increment(1);
    connection.close(quinn::VarInt::from_u32(code as u32), reason.as_bytes());
}

/// Extra time, beyond `server.shutdown_grace`, that closing sessions (an
/// identity's purge, a device's unregistration) waits for them to finish
/// their requests.
pub(crate) const SESSION_END_SLACK: std::time::Duration = std::time::Duration::from_secs(1);

/// The authenticated sessions of each address, with their connections.
#[derive(Default)]
pub struct LiveSessions {
    next_id: AtomicU64,
    by_address: Arc<DashMap<Address, HashMap<u64, Listed>>>,
}

/// One listed session: its connection, the certified device it belongs to
/// (`None` for the identity key), and a channel whose sender the session
/// holds, so that it closes when the session is over.
struct Listed {
    connection: quinn::Connection,
    device: Option<DeviceId>,
    over: watch::Receiver<()>,
}

/// A session's place in [`LiveSessions`]; leaves it when dropped.
pub(crate) struct LiveSession {
    address: Address,
    id: u64,
    by_address: Arc<DashMap<Address, HashMap<u64, Listed>>>,
    _over: watch::Sender<()>,
}

impl Drop for LiveSession {
    fn drop(&mut self) {
        self.by_address.remove_if_mut(&self.address, |_, sessions| {
            sessions.remove(&self.id);
            sessions.is_empty()
        });
    }
}

impl LiveSessions {
    pub(crate) fn register(
        &self,
        address: Address,
        device: Option<DeviceId>,
        connection: &quinn::Connection,
    ) -> LiveSession {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (over_tx, over) = watch::channel(());
        self.by_address.entry(address).or_default().insert(
            id,
            Listed {
                connection: connection.clone(),
                device,
                over,
            },
        );
        LiveSession {
            address,
            id,
            by_address: self.by_address.clone(),
            _over: over_tx,
        }
    }

    /// Closes every connection of `address` with `code` and waits, at most
    /// `limit`, until each of its sessions is over: its requests in
    /// progress finished and its delivery stopped. Returns how many
    /// sessions there were.
    pub async fn close_all(
        &self,
        address: &Address,
        code: ErrorCode,
        reason: &str,
        limit: std::time::Duration,
    ) -> usize {
        self.close_where(address, |_| true, code, reason, limit)
            .await
    }

    /// [`LiveSessions::close_all`] for the sessions of one certified
    /// `device` of `address` only; the identity key's sessions and other
    /// devices' go on.
    pub async fn close_device(
        &self,
        address: &Address,
        device: &DeviceId,
        code: ErrorCode,
        reason: &str,
        limit: std::time::Duration,
    ) -> usize {
        self.close_where(
            address,
            |listed| listed.device.as_ref() == Some(device),
            code,
            reason,
            limit,
        )
        .await
    }

    async fn close_where(
        &self,
        address: &Address,
        chosen: impl Fn(&Listed) -> bool,
        code: ErrorCode,
        reason: &str,
        limit: std::time::Duration,
    ) -> usize {
        let sessions: Vec<(quinn::Connection, watch::Receiver<()>)> = self
            .by_address
            .get(address)
            .map(|sessions| {
                sessions
                    .values()
                    .filter(|listed| chosen(listed))
                    .map(|listed| (listed.connection.clone(), listed.over.clone()))
                    .collect()
            })
            .unwrap_or_default();
        for (connection, _) in &sessions {
            close(connection, code, reason);
        }
        let count = sessions.len();
        let all_over = async {
            for (_, mut over) in sessions {
                // Fails once the session dropped its sender: it is over.
                while over.changed().await.is_ok() {}
            }
        };
        if tokio::time::timeout(limit, all_over).await.is_err() {
            warn!(code = code.name(), "sessions still busy after closing them");
        }
        count
    }
}
