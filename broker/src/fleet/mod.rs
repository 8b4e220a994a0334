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

pub mod link;
pub mod map;
pub mod peer;
pub mod pki;

use std::time::Duration;

use anyhow::Context;
use backbone_protocol::Address;
use backbone_protocol::fleet::SLOT_COUNT;
use tokio::sync::watch;

use crate::config::Config;
pub use link::{LinkState, Links};
pub use map::{FleetMap, Node};

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
}

impl Fleet {
    /// The fleet of a broker: a single node without `fleet.file`, else the
    /// loaded map with this node in it and links to every peer (dialed lazily
    /// in the background once [`Fleet::start_links`] runs).
    pub fn from_config(config: &Config, public: String) -> anyhow::Result<Fleet> {
        let fleet = &config.fleet;
        let (Some(file), Some(node), Some(pki_dir)) = (&fleet.file, &fleet.node, &fleet.pki_dir)
        else {
            return Ok(Fleet {
                map: FleetMap::single(public),
                local: "local".into(),
                links: None,
                credentials: None,
                retry_after: fleet.retry_after,
            });
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
        Ok(Fleet {
            map,
            local: node.clone(),
            links: None,
            credentials: Some(credentials),
            retry_after: fleet.retry_after,
        })
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
    ) -> anyhow::Result<Option<(quinn::Endpoint, std::net::SocketAddr)>> {
        let Some(credentials) = &self.credentials else {
            return Ok(None);
        };
        let endpoint = crate::transport::bind_endpoint(
            &config.transport,
            config.fleet.listen,
            pki::peer_server_config(credentials)?,
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
        serde_json::json!({
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
