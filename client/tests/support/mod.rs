//! Shared test harness: a real broker on 127.0.0.1:0 with a temporary data dir.
#![allow(dead_code, missing_docs)]

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use backbone_broker::shared::Clock;
use backbone_broker::{Broker, Config, StartOptions};
use backbone_client::envelope::EncryptionKeypair;
use backbone_client::{Client, ClientOptions, ConnectConfig, Trust};
use backbone_protocol::Keypair;

pub struct TestBroker {
    pub broker: Option<Broker>,
    /// Stores to use instead of the data dir's.
    pub store: Option<backbone_broker::store::Stores>,
    pub dir: tempfile::TempDir,
    pub config: Config,
    pub clock: Arc<AtomicU64>,
}

pub fn test_config(dir: &std::path::Path) -> Config {
    let mut config = Config::default();
    config.server.listen = "127.0.0.1:0".parse().expect("addr");
    config.server.data_dir = dir.to_owned();
    config.server.shutdown_grace = Duration::from_secs(2);
    config.metrics.listen = None;
    config.expiry.interval = Duration::from_millis(50);
    config
}

impl TestBroker {
    pub async fn start() -> TestBroker {
        Self::start_with(|_| {}).await
    }

    /// A broker serving from `store` (to play a misbehaving broker's data).
    pub async fn start_with_store(store: Arc<backbone_broker::store::MemoryStore>) -> TestBroker {
        let dir = tempfile::tempdir().expect("tempdir");
        let config = test_config(dir.path());
        let clock = Arc::new(AtomicU64::new(backbone_protocol::unix_millis_now()));
        let mut broker = TestBroker {
            broker: None,
            store: Some(backbone_broker::store::Stores::memory(store)),
            dir,
            config,
            clock,
        };
        broker.restart().await;
        broker
    }

    pub async fn start_with(adjust: impl FnOnce(&mut Config)) -> TestBroker {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut config = test_config(dir.path());
        adjust(&mut config);
        let clock = Arc::new(AtomicU64::new(backbone_protocol::unix_millis_now()));
        let mut broker = TestBroker {
            broker: None,
            store: None,
            dir,
            config,
            clock,
        };
        broker.restart().await;
        broker
    }

    /// Starts (again) on the same data dir; a previous instance must be shut down.
    pub async fn restart(&mut self) {
        let clock = self.clock.clone();
        let clock: Clock = Arc::new(move || clock.load(Ordering::SeqCst));
        let mut config = self.config.clone();
        if let Some(old) = self.broker.take() {
            config.server.listen = old.quic_addr;
            old.shutdown().await.expect("clean shutdown");
        }
        // The previous instance's UDP socket closes when its endpoint driver
        // finishes, a moment after shutdown returns.
        let mut attempts = 0;
        let broker = loop {
            match Broker::start(
                config.clone(),
                StartOptions {
                    store: self.store.clone(),
                    clock: Some(clock.clone()),
                },
            )
            .await
            {
                Ok(broker) => break broker,
                Err(error) if attempts < 50 && format!("{error:#}").contains("in use") => {
                    attempts += 1;
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                Err(error) => panic!("broker starts: {error:#}"),
            }
        };
        self.config.server.listen = broker.quic_addr;
        self.broker = Some(broker);
    }

    pub fn broker(&self) -> &Broker {
        self.broker.as_ref().expect("running")
    }

    pub fn advance_clock(&self, by: Duration) {
        self.clock
            .fetch_add(by.as_millis() as u64, Ordering::SeqCst);
    }

    pub fn connect_config(&self) -> ConnectConfig {
        let mut config = ConnectConfig::new(
            self.broker().quic_addr.to_string(),
            Trust::CaFile(self.broker().cert_path.clone()),
        );
        config.server_name = Some("localhost".into());
        config
    }

    pub async fn shutdown(mut self) {
        if let Some(broker) = self.broker.take() {
            broker.shutdown().await.expect("clean shutdown");
        }
    }
}

pub struct Identity {
    pub signing: Keypair,
    pub encryption: EncryptionKeypair,
}

impl Identity {
    pub fn new() -> Self {
        Self {
            signing: Keypair::generate(),
            encryption: EncryptionKeypair::generate(),
        }
    }

    pub fn address(&self) -> backbone_protocol::Address {
        self.signing.address()
    }

    pub fn options(&self, broker: &TestBroker) -> ClientOptions {
        let mut options = ClientOptions::primary(
            broker.connect_config(),
            self.signing.clone(),
            self.encryption.clone(),
        );
        options.request_timeout = Duration::from_secs(10);
        options
    }

    pub async fn connect(&self, broker: &TestBroker) -> Client {
        let client = Client::connect(self.options(broker))
            .await
            .expect("connects");
        client.publish_card().await.expect("publishes card");
        client
    }
}

/// Waits for the next delivery, failing the test after `limit`.
pub async fn next_delivery(client: &Client, limit: Duration) -> backbone_client::Delivery {
    tokio::time::timeout(limit, client.next_delivery())
        .await
        .expect("a delivery arrives in time")
        .expect("client is running")
}

/// Polls `check` until it holds, failing the test after `limit`.
pub async fn eventually(what: &str, limit: Duration, mut check: impl AsyncFnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + limit;
    while !check().await {
        assert!(tokio::time::Instant::now() < deadline, "never: {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Asserts that no delivery arrives within `wait`.
pub async fn assert_no_delivery(client: &Client, wait: Duration) {
    if let Ok(Some(delivery)) = tokio::time::timeout(wait, client.next_delivery()).await {
        panic!("unexpected delivery of seq {}", delivery.seq);
    }
}

/// A fleet of brokers on loopback sharing a fleet map and a fleet CA.
pub struct TestFleet {
    pub nodes: Vec<TestBroker>,
    pub pki: tempfile::TempDir,
    pub map: backbone_broker::fleet::FleetMap,
}

/// Ports the OS hands out now; used right away for the fleet map, so another
/// process taking one in between is unlikely (and fails the start loudly).
pub fn free_udp_ports(count: usize) -> Vec<u16> {
    let sockets: Vec<_> = (0..count)
        .map(|_| std::net::UdpSocket::bind("127.0.0.1:0").expect("bind"))
        .collect();
    sockets
        .iter()
        .map(|s| s.local_addr().expect("addr").port())
        .collect()
}

/// The text of a fleet map over `names` splitting the slots evenly.
pub fn fleet_map_text(epoch: u64, nodes: &[(String, u16, u16)]) -> String {
    let slots = usize::from(backbone_protocol::fleet::SLOT_COUNT);
    let per = slots.div_ceil(nodes.len());
    let mut text = format!("epoch = {epoch}\n");
    for (i, (name, public, peer)) in nodes.iter().enumerate() {
        let first = i * per;
        let last = ((i + 1) * per).min(slots) - 1;
        text.push_str(&format!(
            "[[node]]\nname = \"{name}\"\npeer = \"127.0.0.1:{peer}\"\npublic = \"127.0.0.1:{public}\"\nslots = [\"{first}-{last}\"]\n"
        ));
    }
    text
}

/// Makes `config` the node `name` of a loopback fleet.
fn fleet_node_config(
    config: &mut Config,
    name: &str,
    public: u16,
    peer: u16,
    map_path: &std::path::Path,
    pki: &std::path::Path,
) {
    config.server.listen = format!("127.0.0.1:{public}").parse().expect("addr");
    config.fleet.file = Some(map_path.to_owned());
    config.fleet.node = Some(name.to_owned());
    config.fleet.listen = format!("127.0.0.1:{peer}").parse().expect("addr");
    config.fleet.pki_dir = Some(pki.to_owned());
    config.fleet.forward_timeout = Duration::from_secs(3);
}

impl TestFleet {
    /// Starts `count` nodes and waits until every link is up.
    pub async fn start(count: usize) -> TestFleet {
        let fleet = Self::start_with(count, |_, _| {}).await;
        fleet.wait_links_up().await;
        fleet
    }

    /// Starts `count` nodes without waiting for links; `adjust(index, config)`
    /// may change each config.
    pub async fn start_with(count: usize, adjust: impl Fn(usize, &mut Config)) -> TestFleet {
        let pki = tempfile::tempdir().expect("tempdir");
        let ports = free_udp_ports(count * 2);
        let names: Vec<String> = (0..count).map(|i| format!("node-{i}")).collect();
        let entries: Vec<(String, u16, u16)> = names
            .iter()
            .enumerate()
            .map(|(i, name)| (name.clone(), ports[2 * i], ports[2 * i + 1]))
            .collect();
        let map_path = pki.path().join("fleet.toml");
        std::fs::write(&map_path, fleet_map_text(1, &entries)).expect("write map");
        backbone_broker::fleet::pki::generate(pki.path(), &names, &[]).expect("pki");
        let map = backbone_broker::fleet::FleetMap::load(&map_path).expect("map");
        let mut nodes = Vec::new();
        for (i, (name, public, peer)) in entries.iter().enumerate() {
            let node = TestBroker::start_with(|config| {
                fleet_node_config(config, name, *public, *peer, &map_path, pki.path());
                adjust(i, config);
            })
            .await;
            nodes.push(node);
        }
        TestFleet { nodes, pki, map }
    }

    /// The fleet map file every node loads.
    pub fn map_path(&self) -> std::path::PathBuf {
        self.pki.path().join("fleet.toml")
    }

    /// Issues a certificate for `name` and starts it as a new node on the
    /// given ports with the (already rewritten) map file.
    pub async fn add_node(&mut self, name: &str, public: u16, peer: u16) {
        backbone_broker::fleet::pki::generate(self.pki.path(), &[name.to_owned()], &[])
            .expect("pki");
        let (map_path, pki) = (self.map_path(), self.pki.path().to_owned());
        let node = TestBroker::start_with(|config| {
            fleet_node_config(config, name, public, peer, &map_path, &pki);
        })
        .await;
        self.nodes.push(node);
        self.map = backbone_broker::fleet::FleetMap::load(&self.map_path()).expect("map");
    }

    /// Grows a two-node fleet (node-0 owning 0-2047, node-1 2048-4095) to
    /// epoch 2: a new node-2 takes 1024-2047 over from node-0. Writes the
    /// map, starts node-2, restarts node-0 and node-1 onto the new map one
    /// after the other, and waits for the links; the handover then runs.
    pub async fn grow_by_node_2_taking_1024_2047(&mut self) {
        let ports = free_udp_ports(2);
        let old = std::fs::read_to_string(self.map_path()).expect("map");
        let node0 = old
            .split("[[node]]")
            .nth(1)
            .expect("node-0")
            .replace("0-2047", "0-1023");
        let node1 = old.split("[[node]]").nth(2).expect("node-1");
        let epoch2 = format!(
            "epoch = 2\n[[node]]{node0}[[node]]{node1}[[node]]\nname = \"node-2\"\npeer = \"127.0.0.1:{}\"\npublic = \"127.0.0.1:{}\"\nslots = [\"1024-2047\"]\n\n[[move]]\nfrom = \"node-0\"\nto = \"node-2\"\nslots = [\"1024-2047\"]\n",
            ports[1], ports[0]
        );
        std::fs::write(self.map_path(), epoch2).expect("write map");
        self.add_node("node-2", ports[0], ports[1]).await;
        // Rolling restart of the old nodes onto the new map.
        for index in 0..2 {
            self.nodes[index].restart().await;
        }
        self.wait_links_up().await;
    }

    pub fn ca(&self) -> std::path::PathBuf {
        self.pki.path().join("ca.pem")
    }

    /// Index of the node owning `address`.
    pub fn home_of(&self, address: &backbone_protocol::Address) -> usize {
        let owner = &self.map.owner(address).name;
        owner
            .strip_prefix("node-")
            .and_then(|i| i.parse().ok())
            .expect("node-N")
    }

    /// A fresh identity whose mailbox lives on node `index`.
    pub fn identity_on(&self, index: usize) -> Identity {
        loop {
            let identity = Identity::new();
            if self.home_of(&identity.address()) == index {
                return identity;
            }
        }
    }

    /// Connection settings for node `index` (possibly not the home node).
    pub fn connect_config(&self, index: usize) -> ConnectConfig {
        ConnectConfig::new(
            self.nodes[index].config.server.listen.to_string(),
            Trust::CaFile(self.ca()),
        )
    }

    /// Client options for `identity` entering the fleet through node `index`.
    pub fn options(&self, identity: &Identity, index: usize) -> ClientOptions {
        let mut options = ClientOptions::primary(
            self.connect_config(index),
            identity.signing.clone(),
            identity.encryption.clone(),
        );
        options.request_timeout = Duration::from_secs(10);
        options
    }

    /// Connects through node `index` and publishes the card.
    pub async fn connect(&self, identity: &Identity, index: usize) -> Client {
        let client = Client::connect(self.options(identity, index))
            .await
            .expect("connects");
        client.publish_card().await.expect("publishes card");
        client
    }

    /// Waits until every running node has every link to a running peer up.
    pub async fn wait_links_up(&self) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
        loop {
            let running: Vec<String> = self
                .nodes
                .iter()
                .enumerate()
                .filter(|(_, n)| n.broker.is_some())
                .map(|(i, _)| format!("node-{i}"))
                .collect();
            let all_up = self
                .nodes
                .iter()
                .filter_map(|n| n.broker.as_ref())
                .all(|b| {
                    b.link_states()
                        .iter()
                        .filter(|(name, _)| running.contains(name))
                        .all(|(_, state)| *state == backbone_broker::fleet::LinkState::Up)
                });
            if all_up {
                return;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "fleet links did not come up"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    pub async fn stop(&mut self, index: usize) {
        if let Some(broker) = self.nodes[index].broker.take() {
            broker.shutdown().await.expect("clean shutdown");
        }
    }

    pub async fn shutdown(self) {
        for node in self.nodes {
            node.shutdown().await;
        }
    }
}

/// Opens a stopped broker's stores (mailbox log and directory) in `data_dir`.
pub fn open_stores(data_dir: &std::path::Path) -> backbone_broker::store::Stores {
    backbone_broker::store::open::open(
        data_dir,
        &backbone_broker::config::StoreConfig::default(),
        backbone_protocol::unix_millis_now(),
    )
    .expect("opens the stores")
    .0
}

/// Everything stored for `address` in `stores`, from the log and the directory.
pub fn export(
    stores: &backbone_broker::store::Stores,
    address: &backbone_protocol::Address,
) -> backbone_broker::store::MailboxExport {
    backbone_broker::store::export_mailbox(stores.log.as_ref(), stores.directory.as_ref(), address)
        .expect("export")
}
