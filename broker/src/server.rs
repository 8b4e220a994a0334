//! Wiring: store, writer, supervision tree, QUIC endpoint, metrics; the accept
//! loop; graceful shutdown.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;

use dashmap::DashMap;
use tokio::sync::watch;
use tracing::{debug, info, warn};

use crate::admission::{Admission, Decision};
use crate::config::Config;
use crate::fleet::Fleet;
use crate::mailbox::{MailboxContext, MailboxQuota};
use crate::shared::{Clock, Shared};
use crate::store::{Stores, Writer};
use crate::supervisor::{ExpiryArgs, RootSupervisor};
use crate::{metrics_http, tls, transport};

fn quota(rate: u32, burst: u32) -> Option<governor::Quota> {
    let rate = std::num::NonZeroU32::new(rate)?;
    let burst = std::num::NonZeroU32::new(burst.max(1)).unwrap_or(rate);
    Some(governor::Quota::per_second(rate).allow_burst(burst))
}

/// Options for starting a broker beyond its config (tests and embedding).
#[derive(Clone, Default)]
pub struct StartOptions {
    /// Use these stores instead of opening the data dir's.
    pub store: Option<Stores>,
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
    /// The certificate file clients can trust (the fleet CA in a fleet).
    pub cert_path: PathBuf,
    /// The bound node-to-node address, in a fleet.
    pub peer_addr: Option<SocketAddr>,
    shared: Arc<Shared>,
    endpoint: quinn::Endpoint,
    stop: watch::Sender<bool>,
    accept: tokio::task::JoinHandle<()>,
    peer_server: Option<tokio::task::JoinHandle<()>>,
    deletions: tokio::task::JoinHandle<()>,
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
        let mut fleet = Fleet::from_config(&config, config.server.listen.to_string())?;
        // A fleet node serves its fleet certificate to clients too (unless a
        // certificate is configured), so clients trust one CA for every node.
        let (material, cert_path) = match (fleet.credentials(), &config.tls.cert) {
            (Some(credentials), None) => {
                let ca_path = config
                    .fleet
                    .pki_dir
                    .as_ref()
                    .map(|dir| dir.join("ca.pem"))
                    .unwrap_or_default();
                let material = tls::TlsMaterial {
                    chain: credentials.material.chain.clone(),
                    key: credentials.material.key.clone_key(),
                    cert_path: credentials.material.cert_path.clone(),
                };
                (material, ca_path)
            }
            _ => {
                let material = tls::load_or_generate(&config.tls, data_dir)?;
                let path = material.cert_path.clone();
                (material, path)
            }
        };
        let fingerprint = tls::fingerprint(&material.chain[0]);
        let tls_config = tls::server_config(material)?;
        let reset_key = tls::reset_key(data_dir)?;
        let endpoint = transport::server_endpoint(&config, tls_config, &reset_key)?;
        let quic_addr = endpoint.local_addr()?;

        let send_limiter = quota(config.limits.send_rate, config.limits.send_burst)
            .map(governor::RateLimiter::dashmap);
        let sealed_limiter = quota(config.limits.sealed_rate, config.limits.sealed_burst)
            .map(governor::RateLimiter::dashmap);
        let anonymous_quota = quota(config.limits.anonymous_rate, config.limits.anonymous_rate);
        let relationship_limiter =
            std::num::NonZeroU32::new(config.relationships.requests_per_minute).map(|rate| {
                let burst = std::num::NonZeroU32::new(config.relationships.request_burst.max(1))
                    .unwrap_or(rate);
                governor::RateLimiter::dashmap(governor::Quota::per_minute(rate).allow_burst(burst))
            });
        let source_relationship_limiter =
            std::num::NonZeroU32::new(config.limits.per_source.relationship_requests_per_minute)
                .map(|rate| governor::RateLimiter::dashmap(governor::Quota::per_minute(rate)));
        let source_anonymous_limiter = quota(
            config.limits.per_source.anonymous_rate,
            config.limits.per_source.anonymous_rate,
        )
        .map(governor::RateLimiter::dashmap);
        let admission = Admission::new(&config);
        let (stop, shutdown) = watch::channel(false);
        let peer = fleet.start_links(&config, shutdown.clone(), &reset_key)?;
        let peer_addr = peer.as_ref().map(|(_, addr)| *addr);

        // The store is opened only once every socket is bound: a start that
        // fails on a busy port leaves the store untouched.
        let clock = options
            .clock
            .unwrap_or_else(|| Arc::new(backbone_protocol::unix_millis_now));
        let stores = match options.store {
            Some(stores) => stores,
            None => {
                let now = clock();
                let (dir, config) = (data_dir.clone(), config.store.clone());
                tokio::task::spawn_blocking(move || crate::store::open::open(&dir, &config, now))
                    .await?
                    .with_context(|| format!("cannot open the stores in {}", data_dir.display()))?
                    .0
            }
        };
        let (store, log) = (stores.directory.clone(), stores.log.clone());
        let server_id = store.server_id()?;
        let outgoing_moves = fleet.init_handoffs(store.as_ref())?;
        let files = Arc::new(crate::store::Files::open(data_dir).with_context(|| {
            format!("cannot open the file directory in {}", data_dir.display())
        })?);
        let orphans = files.remove_orphans(store.as_ref())?;
        if orphans > 0 {
            info!(
                orphans,
                "deleted file bytes without a record (left by a crash)"
            );
        }
        let (writer, write_handle) = Writer::start(log.clone(), store.clone());

        let context = Arc::new(MailboxContext {
            directory: store.clone(),
            log: log.clone(),
            writer: write_handle.clone(),
            idle_timeout: config.mailbox.idle_timeout,
            actors: DashMap::new(),
            watches: Arc::default(),
            quota: MailboxQuota {
                max_envelopes: config.limits.mailbox_max_envelopes,
                max_bytes: config.limits.mailbox_max_bytes.as_u64(),
            },
            clock: clock.clone(),
            assigned: DashMap::new(),
            forgotten: Default::default(),
            default_policy: config.relationships.default_inbound_policy,
            notice_ttl: config.limits.max_ttl,
        });
        let expiry = ExpiryArgs {
            directory: store.clone(),
            log: log.clone(),
            interval: config.expiry.interval,
            batch: config.expiry.batch,
            clock: clock.clone(),
            files: files.clone(),
        };
        let (supervisor, registry) = RootSupervisor::start(context, expiry).await?;

        let shared = Arc::new(Shared {
            max_frame_len: config.limits.max_frame_len(),
            config,
            directory: store,
            log,
            writer: write_handle,
            registry,
            server_id,
            clock,
            shutdown,
            fleet,
            send_limiter,
            sealed_limiter,
            relationship_limiter,
            anonymous_quota,
            source_relationship_limiter,
            source_anonymous_limiter,
            admission,
            files,
            sessions: crate::shared::LiveSessions::default(),
        });
        tokio::spawn(forget_idle_senders(shared.clone()));
        metrics::gauge!("backbone_fleet_epoch").set(shared.fleet.map().epoch() as f64);
        metrics::gauge!("backbone_fleet_slots_owned").set(shared.fleet.local_slots() as f64);
        for m in outgoing_moves {
            tokio::spawn(crate::fleet::handoff::hand_over(shared.clone(), m));
        }
        let deletions = tokio::spawn(crate::cmd::deletion::sweep(shared.clone()));
        let mut peer_server = None;
        if let Some((peer_endpoint, peer_addr)) = peer {
            peer_server = Some(tokio::spawn(crate::fleet::peer::serve(
                shared.clone(),
                peer_endpoint,
            )));
            info!(%peer_addr, node = shared.fleet.local_name(), epoch = shared.fleet.map().epoch(),
                slots = shared.fleet.local_slots(), "fleet listener up");
        }
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
            peer_addr,
            shared,
            endpoint,
            stop,
            accept,
            peer_server,
            deletions,
            writer,
            supervisor,
        })
    }

    /// Each peer link's state (empty for a single node).
    pub fn link_states(&self) -> Vec<(String, crate::fleet::LinkState)> {
        self.shared
            .fleet
            .links()
            .map(crate::fleet::Links::states)
            .unwrap_or_default()
    }

    /// The fleet section of `/health`: node, epoch, slots, links, handoffs.
    pub fn fleet_status(&self) -> serde_json::Value {
        self.shared.fleet.health()
    }

    /// QUIC Retry packets sent so far (address validation).
    pub fn retries(&self) -> u64 {
        self.shared.admission.retries()
    }

    /// Connections not yet authenticated (in their handshake or before
    /// `Auth`), for tests and status.
    pub fn unauthenticated(&self) -> usize {
        self.shared.admission.unauthenticated()
    }

    /// Anonymous sessions, for tests and status.
    pub fn anonymous_sessions(&self) -> usize {
        self.shared.admission.anonymous()
    }

    /// Active mailbox actors (for tests and status).
    pub fn active_mailboxes(&self) -> usize {
        self.shared.registry.active()
    }

    /// Mailboxes with an actor or a subscribed device (for tests and status).
    pub fn watched_mailboxes(&self) -> usize {
        self.shared.registry.watched()
    }

    /// Graceful shutdown: stop accepting, let in-flight requests finish, flush, stop.
    pub async fn shutdown(self) -> anyhow::Result<()> {
        info!("shutting down");
        let _ = self.stop.send(true);
        self.endpoint.set_server_config(None);
        let _ = self.accept.await;
        if let Some(peer_server) = self.peer_server {
            let _ = peer_server.await;
        }
        // A purge in progress finishes its step; the next run resumes it.
        let _ = self.deletions.await;
        self.endpoint.close(
            quinn::VarInt::from_u32(backbone_protocol::ErrorCode::ShuttingDown as u32),
            b"shutdown",
        );
        let _ = tokio::time::timeout(Duration::from_secs(2), self.endpoint.wait_idle()).await;
        self.shared.registry.stop_all();
        self.supervisor.stop(None);
        tokio::task::spawn_blocking(move || self.writer.shutdown()).await??;
        // The log last: what is queued is made durable and checkpointed.
        let log = self.shared.log.clone();
        tokio::task::spawn_blocking(move || log.close()).await??;
        info!("shutdown complete");
        Ok(())
    }
}

async fn accept_loop(shared: Arc<Shared>, endpoint: quinn::Endpoint) {
    let mut shutdown = shared.shutdown.clone();
    let mut sessions = tokio::task::JoinSet::new();
    loop {
        let incoming = tokio::select! {
            incoming = endpoint.accept() => incoming,
            _ = shutdown.wait_for(|stop| *stop) => break,
            // Reap finished sessions so the set does not grow with history.
            Some(_) = sessions.join_next(), if !sessions.is_empty() => continue,
        };
        let Some(incoming) = incoming else { break };
        let ticket = match shared.admission.admit(
            incoming.remote_address(),
            incoming.remote_address_validated(),
            incoming.may_retry(),
        ) {
            Ok(ticket) => ticket,
            Err(Decision::Retry(_)) => {
                // Fails only if the client already answered a Retry, which
                // `may_retry` ruled out.
                let _ = incoming.retry();
                continue;
            }
            Err(decision) => {
                debug!(remote = %incoming.remote_address(), ?decision, "refusing a connection");
                incoming.refuse();
                continue;
            }
        };
        let shared = shared.clone();
        sessions.spawn(crate::session::serve(shared, incoming, ticket));
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

/// Drops rate-limit state of identities and sources that have not sent or
/// connected for a while, so the limiters' memory follows active ones.
async fn forget_idle_senders(shared: Arc<Shared>) {
    let mut shutdown = shared.shutdown.clone();
    let mut tick = tokio::time::interval(Duration::from_secs(30));
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = shutdown.wait_for(|stop| *stop) => return,
        }
        if let Some(limiter) = &shared.send_limiter {
            limiter.retain_recent();
            limiter.shrink_to_fit();
        }
        if let Some(limiter) = &shared.sealed_limiter {
            limiter.retain_recent();
            limiter.shrink_to_fit();
        }
        if let Some(limiter) = &shared.relationship_limiter {
            limiter.retain_recent();
            limiter.shrink_to_fit();
        }
        if let Some(limiter) = &shared.source_relationship_limiter {
            limiter.retain_recent();
            limiter.shrink_to_fit();
        }
        if let Some(limiter) = &shared.source_anonymous_limiter {
            limiter.retain_recent();
            limiter.shrink_to_fit();
        }
        shared.admission.forget_idle_sources();
    }
}
