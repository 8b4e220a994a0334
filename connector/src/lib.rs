//! The Backbone Connector: an organisation's client of the Backbone, with
//! a REST API, a local SQLite database and webhooks.
//!
//! It holds the organisation's identity, stays connected to the Backbone,
//! records every pushed envelope in its database before acknowledging it,
//! and tells business systems about new messages and relationship changes
//! through webhooks and an event stream. Business systems never touch keys
//! or QUIC: they call the API. See `docs/connector.md`.
//!
//! Layout:
//! - [`config`]: the TOML configuration with environment overrides.
//! - [`db`]: the SQLite database and its migrations.
//! - [`content`]: what a message's plaintext holds (text, bytes, attachments).
//! - [`sync`]: the receive loop (record, then acknowledge).
//! - [`webhook`]: the outbox worker and the signature scheme.
//! - [`api`]: the REST API, one module per resource.
//! - [`Connector`]: starts all of it and stops it.

pub mod api;
pub mod config;
pub mod content;
pub mod db;
pub mod sync;
pub mod webhook;

use std::net::SocketAddr;
use std::sync::Arc;

use anyhow::Context;
use backbone_client::keyfile;
use backbone_client::transport::default_server_name;
use backbone_client::{Client, ClientOptions, ConnectConfig, Credentials, Trust};
use metrics_exporter_prometheus::PrometheusBuilder;
use tokio::sync::{Notify, watch};
use tokio::task::JoinSet;

use crate::api::AppState;
use crate::config::Config;
use crate::db::Database;

/// A running Connector.
pub struct Connector {
    /// Where the API listens (the bound address, so port 0 is resolved).
    pub api_addr: SocketAddr,
    /// The identity's address.
    pub address: String,
    shutdown: watch::Sender<bool>,
    tasks: JoinSet<()>,
    /// The UDP endpoint of the Backbone connection, closed at shutdown so
    /// that the Backbone learns at once that this session ended.
    endpoint: quinn::Endpoint,
}

impl Connector {
    /// Opens the database, binds the API, and starts connecting to the
    /// Backbone (retrying until it answers), the receive loop and the
    /// webhook worker.
    pub async fn start(config: Config) -> anyhow::Result<Connector> {
        let keys = keyfile::load_identity(&config.storage.key_file).with_context(|| {
            format!(
                "loading the identity key {} (backbone-connector init makes one)",
                config.storage.key_file.display()
            )
        })?;
        let address = keys.address().to_string();
        std::fs::create_dir_all(&config.storage.data_dir)
            .with_context(|| format!("creating {}", config.storage.data_dir.display()))?;
        let db = Database::open(&config.storage.data_dir)
            .await
            .context("opening the database")?;
        db.claim_identity(address.clone()).await?;
        remove_stale_uploads(&config.storage.data_dir.join("uploads"));
        let recorder = PrometheusBuilder::new().build_recorder();
        let metrics = recorder.handle();
        // A process has one global recorder; a second Connector in the same
        // process (tests) keeps the first one's.
        let _ = metrics::set_global_recorder(recorder);

        let listener = tokio::net::TcpListener::bind(config.api.listen)
            .await
            .with_context(|| format!("binding the API to {}", config.api.listen))?;
        let api_addr = listener.local_addr()?;

        let (shutdown, shutdown_rx) = watch::channel(false);
        let (backbone_tx, backbone) = watch::channel::<Option<Arc<Client>>>(None);
        let last_position = db.last_event_position().await?;
        let (events_tx, events) = watch::channel(last_position);
        let webhooks = Arc::new(Notify::new());
        let stalled = Arc::new(std::sync::Mutex::new(None));
        let config = Arc::new(config);
        let state = AppState {
            config: config.clone(),
            db: db.clone(),
            backbone: backbone.clone(),
            address: address.clone(),
            events,
            webhooks: webhooks.clone(),
            metrics,
            key_hashes: Arc::new(config.api.key_hashes()),
            stalled: stalled.clone(),
            uploads: Arc::new(tokio::sync::Semaphore::new(api::PARALLEL_UPLOADS)),
        };
        let mut tasks = JoinSet::new();

        let router = api::router(state.clone());
        let mut stop_api = shutdown_rx.clone();
        tasks.spawn(async move {
            let served = axum::serve(listener, router)
                .with_graceful_shutdown(async move {
                    let _ = stop_api.wait_for(|stop| *stop).await;
                })
                .await;
            if let Err(error) = served {
                tracing::error!(%error, "the API server failed");
            }
        });

        let worker = webhook::Worker::new(db.clone(), config.webhooks.clone(), webhooks.clone())?;
        tasks.spawn(worker.run(shutdown_rx.clone()));

        let options = client_options(&config, keys)?;
        let endpoint = options
            .connect
            .endpoint
            .clone()
            .context("the client options carry the endpoint")?;
        let endpoints = state.endpoints();
        let mut stop_connecting = shutdown_rx.clone();
        tasks.spawn(async move {
            let connect = connect_until_connected(options);
            let client = tokio::select! {
                client = connect => client,
                _ = stop_connecting.wait_for(|stop| *stop) => return,
            };
            backbone_tx.send_replace(Some(client.clone()));
            let receiver = sync::Receiver {
                client,
                db,
                endpoints,
                events: events_tx.clone(),
                webhooks,
                stalled,
            };
            receiver.run(stop_connecting.clone()).await;
            // Event streams follow the database: they stay open after the
            // session ended, until the Connector stops.
            let _ = stop_connecting.wait_for(|stop| *stop).await;
            drop(events_tx);
        });
        tracing::info!(%api_addr, %address, "the Connector is running");
        Ok(Connector {
            api_addr,
            address,
            shutdown,
            tasks,
            endpoint,
        })
    }

    /// Runs until `signal` completes, then stops.
    pub async fn run_until(self, signal: impl std::future::Future<Output = ()>) {
        signal.await;
        self.shutdown().await;
    }

    /// Stops the API (letting requests in flight finish), the webhook
    /// worker and the receive loop, and closes the Backbone connection.
    pub async fn shutdown(mut self) {
        self.shutdown.send_replace(true);
        while self.tasks.join_next().await.is_some() {}
        self.endpoint
            .close(quinn::VarInt::from_u32(0), b"shutting down");
        let _ = tokio::time::timeout(std::time::Duration::from_secs(1), self.endpoint.wait_idle())
            .await;
    }
}

/// Connects and publishes the identity's card, retrying with backoff.
async fn connect_until_connected(options: ClientOptions) -> Arc<Client> {
    let backoff = options.backoff;
    let mut attempt = 0;
    loop {
        match Client::connect(options.clone()).await {
            Ok(client) => match client.publish_card().await {
                Ok(_) => {
                    tracing::info!("connected to the Backbone; card published");
                    return Arc::new(client);
                }
                Err(error) => tracing::warn!(%error, "publishing the identity's card"),
            },
            Err(error) => tracing::warn!(%error, attempt, "connecting to the Backbone"),
        }
        tokio::time::sleep(backoff.delay(attempt)).await;
        attempt = attempt.saturating_add(1);
    }
}

fn client_options(config: &Config, keys: keyfile::IdentityKeys) -> anyhow::Result<ClientOptions> {
    let backbone = &config.backbone;
    let trust = match (&backbone.fingerprint, &backbone.ca) {
        (Some(fingerprint), _) => Trust::Fingerprint(fingerprint.clone()),
        (None, Some(ca)) => Trust::CaFile(ca.clone()),
        (None, None) => anyhow::bail!("backbone.ca or backbone.fingerprint must be set"),
    };
    let mut connect = ConnectConfig::new(backbone.server.clone(), trust);
    let bind: SocketAddr = match std::net::ToSocketAddrs::to_socket_addrs(&backbone.server)
        .ok()
        .and_then(|mut addrs| addrs.next())
    {
        Some(addr) if addr.is_ipv6() => (std::net::Ipv6Addr::UNSPECIFIED, 0).into(),
        _ => (std::net::Ipv4Addr::UNSPECIFIED, 0).into(),
    };
    connect.endpoint = Some(quinn::Endpoint::client(bind).context("binding a UDP socket")?);
    connect.server_name = backbone
        .server_name
        .clone()
        .or_else(|| default_server_name(&backbone.server));
    let mut options =
        ClientOptions::primary(connect, keys.signing.clone(), keys.encryption.clone());
    options.credentials = Credentials::primary(&keys.signing);
    Ok(options)
}

/// Removes the staged uploads a previous process left (it was killed
/// mid-upload): nothing refers to them any more.
fn remove_stale_uploads(dir: &std::path::Path) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        if path
            .extension()
            .is_some_and(|extension| extension == "part")
            && let Err(error) = std::fs::remove_file(&path)
        {
            tracing::warn!(%error, path = %path.display(), "removing a stale upload");
        }
    }
}
