//! Wiring: store, writer, supervision tree, QUIC endpoint, metrics; the accept
//! loop; graceful shutdown.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use anyhow::Context;
use backbone_protocol::bytes::ServerId;
use dashmap::DashMap;
use ractor::Actor;
use tokio::sync::watch;
use tracing::{info, warn};

use crate::config::Config;
use crate::mailbox::{MailboxContext, Registry};
use crate::store::{SledStore, Store, WriteHandle, Writer};
use crate::supervisor::{ExpiryArgs, RootArgs, RootSupervisor};
use crate::{metrics_http, tls, transport};

/// A clock in Unix milliseconds; injectable so tests can move time.
pub type Clock = Arc<dyn Fn() -> u64 + Send + Sync>;

/// State shared by every connection.
pub struct Shared {
    /// The validated configuration.
    pub config: Config,
    /// The store, for reads.
    pub store: Arc<dyn Store>,
    /// The group-commit writer.
    pub writer: WriteHandle,
    /// Mailbox actors.
    pub registry: Registry,
    /// This node's persistent id.
    pub server_id: ServerId,
    /// Frame size limit derived from the config.
    pub max_frame_len: usize,
    /// The clock.
    pub clock: Clock,
    /// Becomes `true` when shutdown begins.
    pub shutdown: watch::Receiver<bool>,
}

/// Options for starting a broker beyond its config (tests and embedding).
#[derive(Clone, Default)]
pub struct StartOptions {
    /// Use this store instead of opening sled under the data dir.
    pub store: Option<Arc<dyn Store>>,
    /// Use this clock instead of the system clock.
    pub clock: Option<Clock>,
}

/// A running broker.
pub struct Broker {
    /// The bound QUIC address.
    pub quic_addr: SocketAddr,
    /// The bound metrics address, if enabled.
    pub metrics_addr: Option<SocketAddr>,
    /// SHA-256 fingerprint of the certificate served.
    pub fingerprint: String,
    /// The certificate file clients can trust.
    pub cert_path: PathBuf,
    shared: Arc<Shared>,
    endpoint: quinn::Endpoint,
    stop: watch::Sender<bool>,
    accept: tokio::task::JoinHandle<()>,
    writer: Writer,
    supervisor: ractor::ActorRef<crate::supervisor::RootMsg>,
}

impl Broker {
    /// Starts a broker: binds, spawns the supervision tree, and accepts connections.
    pub async fn start(config: Config, options: StartOptions) -> anyhow::Result<Broker> {
        config.validate()?;
        let data_dir = &config.server.data_dir;
        std::fs::create_dir_all(data_dir)
            .with_context(|| format!("cannot create data directory {}", data_dir.display()))?;
        let store: Arc<dyn Store> = match options.store {
            Some(store) => store,
            None => {
                let path = data_dir.join("store");
                Arc::new(
                    SledStore::open(&path)
                        .with_context(|| format!("cannot open store at {}", path.display()))?,
                )
            }
        };
        let clock = options
            .clock
            .unwrap_or_else(|| Arc::new(backbone_protocol::unix_millis_now));
        let server_id = store.server_id()?;
        let (writer, write_handle) = Writer::start(store.clone());

        let material = tls::load_or_generate(&config.tls, data_dir)?;
        let fingerprint = tls::fingerprint(&material.chain[0]);
        let cert_path = material.cert_path.clone();
        let tls_config = tls::server_config(material)?;
        let endpoint = transport::server_endpoint(&config, tls_config)?;
        let quic_addr = endpoint.local_addr()?;

        let context = Arc::new(MailboxContext {
            store: store.clone(),
            writer: write_handle.clone(),
            idle_timeout: config.mailbox.idle_timeout,
            actors: DashMap::new(),
        });
        let expiry = ExpiryArgs {
            store: store.clone(),
            interval: config.expiry.interval,
            batch: config.expiry.batch,
            clock: clock.clone(),
        };
        let (supervisor, _) = Actor::spawn(
            None,
            RootSupervisor,
            RootArgs {
                mailboxes: context.clone(),
                expiry,
            },
        )
        .await?;
        let registry = Registry::new(context, Some(supervisor.get_cell()));

        let (stop, shutdown) = watch::channel(false);
        let shared = Arc::new(Shared {
            max_frame_len: config.limits.max_frame_len(),
            config,
            store,
            writer: write_handle,
            registry,
            server_id,
            clock,
            shutdown,
        });
        let metrics_addr = match shared.config.metrics.listen {
            Some(addr) => Some(metrics_http::serve(addr, shared.clone()).await?),
            None => None,
        };
        let accept = tokio::spawn(accept_loop(shared.clone(), endpoint.clone()));
        info!(%quic_addr, fingerprint = %fingerprint, cert = %cert_path.display(), "backbone broker listening");
        Ok(Broker {
            quic_addr,
            metrics_addr,
            fingerprint,
            cert_path,
            shared,
            endpoint,
            stop,
            accept,
            writer,
            supervisor,
        })
    }

    /// Active mailbox actors (for tests and status).
    pub fn active_mailboxes(&self) -> usize {
        self.shared.registry.active()
    }

    /// Graceful shutdown: stop accepting, let in-flight requests finish, flush, stop.
    pub async fn shutdown(self) -> anyhow::Result<()> {
        info!("shutting down");
        let _ = self.stop.send(true);
        self.endpoint.set_server_config(None);
        let _ = self.accept.await;
        self.endpoint.close(
            quinn::VarInt::from_u32(backbone_protocol::ErrorCode::ShuttingDown as u32),
            b"shutdown",
        );
        let _ = tokio::time::timeout(Duration::from_secs(2), self.endpoint.wait_idle()).await;
        self.shared.registry.stop_all();
        self.supervisor.stop(None);
        tokio::task::spawn_blocking(move || self.writer.shutdown()).await??;
        info!("shutdown complete");
        Ok(())
    }
}

async fn accept_loop(shared: Arc<Shared>, endpoint: quinn::Endpoint) {
    let mut shutdown = shared.shutdown.clone();
    let connections = Arc::new(AtomicUsize::new(0));
    let mut sessions = tokio::task::JoinSet::new();
    loop {
        let incoming = tokio::select! {
            incoming = endpoint.accept() => incoming,
            _ = shutdown.wait_for(|stop| *stop) => break,
            // Reap finished sessions so the set does not grow with history.
            Some(_) = sessions.join_next(), if !sessions.is_empty() => continue,
        };
        let Some(incoming) = incoming else { break };
        if connections.load(Ordering::Relaxed) >= shared.config.limits.max_connections {
            warn!("connection limit reached; refusing a connection");
            metrics::counter!("backbone_connections_refused_total").increment(1);
            incoming.refuse();
            continue;
        }
        connections.fetch_add(1, Ordering::Relaxed);
        let (shared, connections) = (shared.clone(), connections.clone());
        sessions.spawn(async move {
            crate::session::serve(shared, incoming).await;
            connections.fetch_sub(1, Ordering::Relaxed);
        });
    }
    // Sessions see the shutdown signal, finish their in-flight requests and
    // close their connections; wait for them (bounded by the grace period).
    let grace = shared.config.server.shutdown_grace + Duration::from_secs(1);
    if tokio::time::timeout(grace, async {
        while sessions.join_next().await.is_some() {}
    })
    .await
    .is_err()
    {
        warn!(
            remaining = sessions.len(),
            "sessions still busy after the grace period; aborting them"
        );
        sessions.abort_all();
    }
}
