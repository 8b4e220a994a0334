//! Shared test harness: a real broker on 127.0.0.1:0 with a temporary data dir.
#![allow(dead_code, missing_docs)]

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use backbone_broker::server::Clock;
use backbone_broker::{Broker, Config, StartOptions};
use backbone_client::envelope::EncryptionKeypair;
use backbone_client::{Client, ClientOptions, ConnectConfig, Trust};
use backbone_protocol::Keypair;

pub struct TestBroker {
    pub broker: Option<Broker>,
    /// A store to use instead of sled under the data dir.
    pub store: Option<Arc<dyn backbone_broker::store::Store>>,
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
    pub async fn start_with_store(store: Arc<dyn backbone_broker::store::Store>) -> TestBroker {
        let dir = tempfile::tempdir().expect("tempdir");
        let config = test_config(dir.path());
        let clock = Arc::new(AtomicU64::new(backbone_protocol::unix_millis_now()));
        let mut broker = TestBroker {
            broker: None,
            store: Some(store),
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

/// Asserts that no delivery arrives within `wait`.
pub async fn assert_no_delivery(client: &Client, wait: Duration) {
    if let Ok(Some(delivery)) = tokio::time::timeout(wait, client.next_delivery()).await {
        panic!("unexpected delivery of seq {}", delivery.seq);
    }
}
