//! Horizontal sharding: the fleet map, node-to-node links and routing.
//!
//! Every address hashes to one of 4,096 slots; the fleet map (one file every
//! node loads) assigns each slot to a node. A node stores envelopes only for
//! the slots it owns. A client may connect to any node: if its own mailbox
//! lives elsewhere it gets a `Redirect` to its home node; a send to
//! recipients elsewhere is forwarded over a mutually authenticated QUIC link
//! (one per peer), and the sender's ack waits for each owner's durable ack.
//! An owner that cannot be reached fails just its recipients with the
//! retryable `ShardUnavailable`.
//!
//! - [`map`]: the fleet file and slot ownership.
//! - [`pki`]: the fleet CA and node certificates.
//! - [`link`]: outgoing links, one per peer, with reconnect.
//! - [`peer`]: the node-to-node listener serving forwarded requests.

pub mod handoff;
pub mod link;
pub mod map;
pub mod peer;
pub mod pki;

use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::Context;
use backbone_protocol::Address;
use backbone_protocol::fleet::{SLOT_COUNT, slot_of};
use tokio::sync::watch;

use crate::config::Config;
use crate::store::StoreError;
use crate::store::prelude::*;
pub use link::{LinkState, Links};
pub use map::{FleetMap, Move, Node};

/// Where an address's mailbox lives.
#[derive(Debug)]
pub enum Route<'a> {
    /// On this node.
    Local,
    /// On another node.
    Remote(&'a Node),
}

/// This node's view of the fleet.
pub struct Fleet {
    map: FleetMap,
    local: String,
    links: Option<Links>,
    credentials: Option<pki::NodeCredentials>,
    retry_after: Duration,
    /// Slots this node owns but does not serve yet: their previous owner has
    /// not finished handing them over.
    importing: Vec<AtomicBool>,
    /// Progress of each move this node takes part in, for `/health`.
    handoffs: Mutex<Vec<(Move, String)>>,
}

/// The store key recording that a move finished, on this node's side
/// (`in`: every mailbox arrived; `out`: the new owner confirmed them all).
fn handoff_key(direction: &str, epoch: u64, peer: &str) -> String {
    format!("handoff/{direction}/{epoch}/{peer}")
}

impl Fleet {
    /// The fleet of a broker: a single node without `fleet.file`, else the
    /// loaded map with this node in it; [`Fleet::start_links`] then dials
    /// every peer in the background.
    pub fn from_config(config: &Config, public: String) -> anyhow::Result<Fleet> {
        let fleet = &config.fleet;
        let (Some(file), Some(node), Some(pki_dir)) = (&fleet.file, &fleet.node, &fleet.pki_dir)
        else {
            return Ok(Fleet::new(
                FleetMap::single(public),
                "local".into(),
                None,
                fleet.retry_after,
            ));
        };
        let map = FleetMap::load(file)?;
        if map.node(node).is_none() {
            anyhow::bail!(
                "fleet.node = {node:?} is not in the fleet map {} (nodes: {})",
                file.display(),
                map.nodes()
                    .iter()
                    .map(|n| n.name.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            );
        }
        let credentials = pki::load(pki_dir, node)
            .with_context(|| format!("cannot load fleet certificates for {node}"))?;
        Ok(Fleet::new(
            map,
            node.clone(),
            Some(credentials),
            fleet.retry_after,
        ))
    }

    fn new(
        map: FleetMap,
        local: String,
        credentials: Option<pki::NodeCredentials>,
        retry_after: Duration,
    ) -> Fleet {
        Fleet {
            map,
            local,
            links: None,
            credentials,
            retry_after,
            importing: (0..SLOT_COUNT).map(|_| AtomicBool::new(false)).collect(),
            handoffs: Mutex::new(Vec::new()),
        }
    }

    /// Reads handoff progress from the store: slots moving here whose import
    /// is not complete stop being served until it is. Returns the moves out
    /// of this node, which [`handoff::hand_over`] runs (or finishes).
    pub fn init_handoffs(&self, store: &dyn Directory) -> Result<Vec<Move>, StoreError> {
        let epoch = self.map.epoch();
        let mut outgoing = Vec::new();
        let mut progress = Vec::new();
        for m in self.map.moves() {
            if m.to == self.local {
                let done = store.meta(&handoff_key("in", epoch, &m.from))?.is_some();
                if !done {
                    for slot in (0..SLOT_COUNT).filter(|&slot| m.contains(slot)) {
                        self.importing[usize::from(slot)].store(true, Ordering::Release);
                    }
                }
                let state = if done { "imported" } else { "importing" };
                progress.push((m.clone(), state.to_owned()));
            } else if m.from == self.local {
                outgoing.push(m.clone());
                progress.push((m.clone(), "pending".to_owned()));
            }
        }
        *self.handoffs.lock().unwrap_or_else(|e| e.into_inner()) = progress;
        Ok(outgoing)
    }

    /// Whether `address` lives here but is still being handed over to this node.
    pub fn is_importing(&self, address: &Address) -> bool {
        self.importing[usize::from(slot_of(address))].load(Ordering::Acquire)
    }

    /// Whether the slots of `m` (a move to this node) still wait for their mailboxes.
    pub fn is_move_importing(&self, m: &Move) -> bool {
        m.slots
            .first()
            .is_some_and(|&(first, _)| self.importing[usize::from(first)].load(Ordering::Acquire))
    }

    /// The move bringing slots from `peer` to this node, if this epoch has one.
    pub fn move_from(&self, peer: &str) -> Option<&Move> {
        self.map
            .moves()
            .iter()
            .find(|m| m.from == peer && m.to == self.local)
    }

    /// Records that every mailbox of `m` arrived (durably, in `store`) and
    /// starts serving its slots.
    pub fn finish_import(&self, m: &Move, store: &dyn Directory) -> Result<(), StoreError> {
        store.put_meta(&handoff_key("in", self.map.epoch(), &m.from), b"done")?;
        store.sync()?;
        for slot in (0..SLOT_COUNT).filter(|&slot| m.contains(slot)) {
            self.importing[usize::from(slot)].store(false, Ordering::Release);
        }
        self.set_handoff_state(m, "imported".into());
        Ok(())
    }

    /// Handoffs of this epoch not yet finished on this node's side: moves
    /// out not `done`, moves in not `imported`.
    pub fn unfinished_handoffs(&self) -> usize {
        self.handoffs
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .filter(|(_, state)| state != "done" && state != "imported")
            .count()
    }

    /// Updates the progress shown for `m`.
    pub fn set_handoff_state(&self, m: &Move, state: String) {
        let mut handoffs = self.handoffs.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(entry) = handoffs.iter_mut().find(|(known, _)| known == m) {
            entry.1 = state;
        }
    }

    /// The store key marking `m` as fully handed over by this node.
    pub fn handoff_out_key(&self, m: &Move) -> String {
        handoff_key("out", self.map.epoch(), &m.to)
    }

    /// Whether this broker is part of a multi-node fleet.
    pub fn is_sharded(&self) -> bool {
        self.credentials.is_some()
    }

    /// The node certificate and fleet CA, when sharded.
    pub fn credentials(&self) -> Option<&pki::NodeCredentials> {
        self.credentials.as_ref()
    }

    /// Binds the peer listener and prepares links to every other node.
    /// Returns the bound peer address. Single nodes have nothing to start.
    pub fn start_links(
        &mut self,
        config: &Config,
        shutdown: watch::Receiver<bool>,
        reset_key: &[u8],
    ) -> anyhow::Result<Option<(quinn::Endpoint, std::net::SocketAddr)>> {
        let Some(credentials) = &self.credentials else {
            return Ok(None);
        };
        let endpoint = crate::transport::bind_endpoint(
            &config.transport,
            config.fleet.listen,
            pki::peer_server_config(credentials)?,
            reset_key,
        )
        .context("cannot bind the fleet listener (fleet.listen)")?;
        let bound = endpoint.local_addr()?;
        let client = pki::peer_client_config(credentials)?;
        let links = Links::new(
            &self.map,
            &self.local,
            endpoint.clone(),
            client,
            &config.transport,
            config.fleet.forward_timeout,
            shutdown,
        )?;
        self.links = Some(links);
        Ok(Some((endpoint, bound)))
    }

    /// The map in force.
    pub fn map(&self) -> &FleetMap {
        &self.map
    }

    /// This node's name (`local` for a single node).
    pub fn local_name(&self) -> &str {
        &self.local
    }

    /// How many slots this node owns.
    pub fn local_slots(&self) -> usize {
        self.map.node(&self.local).map_or(0, |node| node.slot_count)
    }

    /// Where `address` lives.
    pub fn route(&self, address: &Address) -> Route<'_> {
        let owner = self.map.owner(address);
        if owner.name == self.local {
            Route::Local
        } else {
            Route::Remote(owner)
        }
    }

    /// The links to peers (`None` for a single node).
    pub fn links(&self) -> Option<&Links> {
        self.links.as_ref()
    }

    /// The retry-after for `ShardUnavailable`, in milliseconds.
    pub fn retry_after_ms(&self) -> u32 {
        self.retry_after.as_millis().min(u128::from(u32::MAX)) as u32
    }

    /// Status for `/health`: this node, the map's epoch and digest, the
    /// slots owned, and each peer link's state.
    pub fn health(&self) -> serde_json::Value {
        let peers: Vec<_> = self
            .links
            .as_ref()
            .map(Links::states)
            .unwrap_or_default()
            .into_iter()
            .map(|(node, state)| {
                serde_json::json!({"node": node, "state": state.name(), "detail": state.detail()})
            })
            .collect();
        let slots: Vec<String> = self
            .map
            .slot_ranges(&self.local)
            .into_iter()
            .map(|(first, last)| format!("{first}-{last}"))
            .collect();
        let importing = self
            .importing
            .iter()
            .filter(|flag| flag.load(Ordering::Acquire))
            .count();
        let handoffs: Vec<_> = self
            .handoffs
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .map(|(m, state)| {
                serde_json::json!({"from": m.from, "to": m.to, "slots": m.slots, "state": state})
            })
            .collect();
        serde_json::json!({
            "importing_slots": importing,
            "handoffs": handoffs,
            "node": self.local,
            "epoch": self.map.epoch(),
            "map_digest": hex::encode(self.map.digest()),
            "slots_owned": self.local_slots(),
            "slot_count": SLOT_COUNT,
            "slots": slots,
            "peers": peers,
        })
    }
}
