//! Outgoing node-to-node links: one QUIC connection per peer, one stream,
//! requests multiplexed by id, reconnected with backoff.
//!
//! A caller never waits on a link that is not up: [`Links::request`] fails at
//! once with [`LinkError::Unavailable`], which the session turns into the
//! retryable `ShardUnavailable` for the recipients behind that peer. Frames
//! queued when a link drops are failed the same way.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use backbone_protocol::bytes::Text;
use backbone_protocol::codec;
use backbone_protocol::fleet::{PeerFrame, PeerHello};
use quinn::crypto::rustls::QuicClientConfig;
use tokio::sync::{mpsc, oneshot, watch};
use tracing::{debug, info, warn};

use super::map::{FleetMap, Node};
use crate::config::TransportConfig;
use crate::wire::spawn_writer_with;

/// Frames queued per link before callers see back-pressure.
const LINK_QUEUE: usize = 4096;
/// How long dialing a peer (QUIC + TLS + hello) may take.
const DIAL_TIMEOUT: Duration = Duration::from_secs(3);
/// Longest pause between reconnect attempts.
const MAX_BACKOFF: Duration = Duration::from_secs(2);
/// A peer silent this long is considered gone (keep-alives run every second).
const PEER_IDLE_TIMEOUT: Duration = Duration::from_secs(5);

/// The state of a link, as `/health` shows it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum LinkState {
    /// Dialing.
    Connecting,
    /// Open; requests flow.
    Up,
    /// The peer could not be reached or the link broke.
    Down(String),
    /// The peer refused the link (for example a different fleet map).
    Refused(String),
}

impl LinkState {
    /// A short name: `connecting`, `up`, `down`, `refused`.
    pub fn name(&self) -> &'static str {
        match self {
            LinkState::Connecting => "connecting",
            LinkState::Up => "up",
            LinkState::Down(_) => "down",
            LinkState::Refused(_) => "refused",
        }
    }

    /// Why it is down or refused; empty otherwise.
    pub fn detail(&self) -> String {
        match self {
            LinkState::Down(reason) | LinkState::Refused(reason) => reason.clone(),
            LinkState::Connecting | LinkState::Up => String::new(),
        }
    }
}

/// Why a request over a link failed.
#[derive(Debug, thiserror::Error)]
pub enum LinkError {
    /// The link is not up (down, refused, or still connecting).
    #[error("node {node} unavailable: {reason}")]
    Unavailable {
        /// The peer.
        node: String,
        /// Its link state.
        reason: String,
    },
    /// The peer did not answer within `fleet.forward_timeout`.
    #[error("node {node} did not answer in time")]
    Timeout {
        /// The peer.
        node: String,
    },
    /// No such peer in the map (a bug: routing chose a node the map lacks).
    #[error("node {0} is not a peer")]
    UnknownNode(String),
}

struct Link {
    node: Node,
    state: Mutex<LinkState>,
    tx: mpsc::Sender<PeerFrame>,
    pending: Mutex<HashMap<u64, oneshot::Sender<PeerFrame>>>,
    next_id: AtomicU64,
}

impl Link {
    fn set_state(&self, state: LinkState) {
        let up = state == LinkState::Up;
        let mut current = self.state.lock().unwrap_or_else(|e| e.into_inner());
        if *current != state {
            match &state {
                LinkState::Up => info!(peer = %self.node.name, "fleet link up"),
                LinkState::Down(reason) if *current == LinkState::Up => {
                    warn!(peer = %self.node.name, %reason, "fleet link down")
                }
                // A link that fails to come up is logged once per new reason,
                // not once per attempt.
                LinkState::Down(reason) if !matches!(&*current, LinkState::Down(old) if old == reason) =>
                {
                    warn!(peer = %self.node.name, %reason, "fleet link cannot be established")
                }
                LinkState::Refused(reason) => {
                    warn!(peer = %self.node.name, %reason, "fleet link refused")
                }
                _ => {}
            }
        }
        *current = state;
        metrics::gauge!("backbone_fleet_link_up", "peer" => self.node.name.clone()).set(if up {
            1.0
        } else {
            0.0
        });
    }

    fn state(&self) -> LinkState {
        self.state.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Drops every waiting caller's reply channel: they see the link fail.
    fn fail_pending(&self) {
        self.pending
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clear();
    }

    fn complete(&self, frame: PeerFrame) {
        let Some(id) = frame.request_id() else {
            return;
        };
        let waiter = self
            .pending
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&id);
        if let Some(waiter) = waiter {
            let _ = waiter.send(frame);
        }
    }

    fn forget(&self, id: u64) {
        self.pending
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&id);
    }
}

/// Links to every other node of the fleet.
pub struct Links {
    links: HashMap<String, Arc<Link>>,
    timeout: Duration,
}

impl Links {
    /// Creates a link per peer in `map` and starts dialing them from `endpoint`.
    pub fn new(
        map: &FleetMap,
        local: &str,
        endpoint: quinn::Endpoint,
        tls: rustls::ClientConfig,
        transport: &TransportConfig,
        timeout: Duration,
        shutdown: watch::Receiver<bool>,
    ) -> anyhow::Result<Links> {
        let crypto = QuicClientConfig::try_from(tls)?;
        let mut client = quinn::ClientConfig::new(Arc::new(crypto));
        let mut params = crate::transport::transport_config(transport)?;
        params
            .keep_alive_interval(Some(Duration::from_secs(1)))
            .max_idle_timeout(Some(quinn::IdleTimeout::try_from(PEER_IDLE_TIMEOUT)?));
        client.transport_config(Arc::new(params));
        let hello = PeerHello {
            node: Text(local.to_owned()),
            epoch: map.epoch(),
            map_digest: map.digest(),
        };
        let mut links = HashMap::new();
        for node in map.nodes().iter().filter(|node| node.name != local) {
            let (tx, rx) = mpsc::channel(LINK_QUEUE);
            let link = Arc::new(Link {
                node: node.clone(),
                state: Mutex::new(LinkState::Connecting),
                tx,
                pending: Mutex::new(HashMap::new()),
                next_id: AtomicU64::new(1),
            });
            link.set_state(LinkState::Connecting);
            tokio::spawn(run_link(
                link.clone(),
                rx,
                endpoint.clone(),
                client.clone(),
                hello.clone(),
                shutdown.clone(),
            ));
            links.insert(node.name.clone(), link);
        }
        Ok(Links { links, timeout })
    }

    /// Each peer's link state, sorted by name.
    pub fn states(&self) -> Vec<(String, LinkState)> {
        let mut states: Vec<_> = self
            .links
            .iter()
            .map(|(name, link)| (name.clone(), link.state()))
            .collect();
        states.sort_by(|a, b| a.0.cmp(&b.0));
        states
    }

    /// Sends the request `build(id)` to `node` and waits for its answer, at
    /// most `fleet.forward_timeout`.
    pub async fn request(
        &self,
        node: &str,
        build: impl FnOnce(u64) -> PeerFrame,
    ) -> Result<PeerFrame, LinkError> {
        self.request_with_timeout(node, self.timeout, build).await
    }

    /// [`Links::request`] with its own timeout.
    pub async fn request_with_timeout(
        &self,
        node: &str,
        timeout: Duration,
        build: impl FnOnce(u64) -> PeerFrame,
    ) -> Result<PeerFrame, LinkError> {
        let link = self
            .links
            .get(node)
            .ok_or_else(|| LinkError::UnknownNode(node.to_owned()))?;
        let unavailable = |link: &Link| LinkError::Unavailable {
            node: node.to_owned(),
            reason: match link.state() {
                LinkState::Up => "link closed".to_owned(),
                LinkState::Connecting => "connecting".to_owned(),
                state => state.detail(),
            },
        };
        if link.state() != LinkState::Up {
            return Err(unavailable(link));
        }
        let id = link.next_id.fetch_add(1, Ordering::Relaxed);
        let (reply, answer) = oneshot::channel();
        link.pending
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(id, reply);
        let deadline = tokio::time::Instant::now() + timeout;
        match tokio::time::timeout_at(deadline, link.tx.send(build(id))).await {
            Ok(Ok(())) => {}
            Ok(Err(_)) => {
                link.forget(id);
                return Err(unavailable(link));
            }
            Err(_) => {
                link.forget(id);
                return Err(LinkError::Timeout {
                    node: node.to_owned(),
                });
            }
        }
        match tokio::time::timeout_at(deadline, answer).await {
            Ok(Ok(frame)) => Ok(frame),
            Ok(Err(_)) => Err(unavailable(link)),
            Err(_) => {
                link.forget(id);
                Err(LinkError::Timeout {
                    node: node.to_owned(),
                })
            }
        }
    }
}

/// Why dialing failed.
enum DialError {
    Refused(String),
    Failed(String),
}

fn failed(what: &str, error: impl std::fmt::Display) -> DialError {
    DialError::Failed(format!("{what}: {error}"))
}

async fn run_link(
    link: Arc<Link>,
    mut rx: mpsc::Receiver<PeerFrame>,
    endpoint: quinn::Endpoint,
    client: quinn::ClientConfig,
    hello: PeerHello,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut backoff = Duration::from_millis(100);
    loop {
        let dialed = tokio::select! {
            dialed = tokio::time::timeout(DIAL_TIMEOUT, dial(&endpoint, &client, &link.node, &hello)) => {
                dialed.unwrap_or_else(|_| Err(DialError::Failed("dial timed out".into())))
            }
            _ = stopped(&mut shutdown) => return,
        };
        match dialed {
            Ok((connection, send, recv)) => {
                backoff = Duration::from_millis(100);
                link.set_state(LinkState::Up);
                let reason =
                    serve_link(&link, &connection, send, recv, &mut rx, &mut shutdown).await;
                link.set_state(LinkState::Down(reason));
                link.fail_pending();
                if *shutdown.borrow() {
                    connection.close(quinn::VarInt::from_u32(0), b"shutdown");
                    return;
                }
            }
            Err(DialError::Refused(reason)) => link.set_state(LinkState::Refused(reason)),
            Err(DialError::Failed(reason)) => {
                debug!(peer = %link.node.name, %reason, "dialing peer failed");
                link.set_state(LinkState::Down(reason));
            }
        }
        // Back off; whatever is queued meanwhile fails at once.
        let pause = tokio::time::sleep(backoff);
        tokio::pin!(pause);
        backoff = (backoff * 2).min(MAX_BACKOFF);
        loop {
            tokio::select! {
                _ = &mut pause => break,
                frame = rx.recv() => match frame {
                    Some(frame) => {
                        if let Some(id) = frame.request_id() {
                            link.forget(id);
                        }
                    }
                    None => return,
                },
                _ = stopped(&mut shutdown) => return,
            }
        }
    }
}

async fn dial(
    endpoint: &quinn::Endpoint,
    client: &quinn::ClientConfig,
    node: &Node,
    hello: &PeerHello,
) -> Result<(quinn::Connection, quinn::SendStream, PeerReader), DialError> {
    let addr: SocketAddr = tokio::net::lookup_host(&node.peer)
        .await
        .map_err(|e| failed("cannot resolve", e))?
        .next()
        .ok_or_else(|| DialError::Failed(format!("{} resolves to nothing", node.peer)))?;
    let connection = endpoint
        .connect_with(client.clone(), addr, &node.name)
        .map_err(|e| failed("cannot connect", e))?
        .await
        .map_err(|e| failed("handshake failed", e))?;
    let (mut send, recv) = connection
        .open_bi()
        .await
        .map_err(|e| failed("cannot open stream", e))?;
    let mut bytes = Vec::new();
    codec::encode_peer_frame(&PeerFrame::Hello(hello.clone()), &mut bytes)
        .map_err(|e| failed("cannot encode hello", e))?;
    send.write_all(&bytes)
        .await
        .map_err(|e| failed("cannot send hello", e))?;
    let mut reader = PeerReader::new(recv, codec::MAX_FRAME_LEN);
    match reader.next().await {
        Ok(PeerFrame::Welcome(_)) => Ok((connection, send, reader)),
        Ok(PeerFrame::Refuse(refuse)) => Err(DialError::Refused(refuse.reason.0)),
        Ok(_) => Err(DialError::Failed("unexpected answer to hello".into())),
        Err(error) => Err(failed("no answer to hello", error)),
    }
}

async fn serve_link(
    link: &Arc<Link>,
    connection: &quinn::Connection,
    send: quinn::SendStream,
    mut reader: PeerReader,
    rx: &mut mpsc::Receiver<PeerFrame>,
    shutdown: &mut watch::Receiver<bool>,
) -> String {
    let (out, out_rx) = mpsc::channel(LINK_QUEUE);
    let writer = spawn_writer_with(send, out_rx, encode_peer_logged);
    let reading = {
        let link = link.clone();
        async move {
            loop {
                match reader.next().await {
                    Ok(frame) => link.complete(frame),
                    Err(error) => return error.to_string(),
                }
            }
        }
    };
    tokio::pin!(reading);
    let reason = loop {
        tokio::select! {
            reason = &mut reading => break reason,
            frame = rx.recv() => match frame {
                Some(frame) => {
                    if out.send(frame).await.is_err() {
                        break "link writer stopped".to_owned();
                    }
                }
                None => break "links dropped".to_owned(),
            },
            _ = stopped(shutdown) => break "shutting down".to_owned(),
            _ = connection.closed() => break "connection closed".to_owned(),
        }
    };
    drop(out);
    writer.abort();
    connection.close(quinn::VarInt::from_u32(0), b"link closed");
    reason
}

/// Encodes a peer frame for [`spawn_writer_with`], logging failures.
pub(crate) fn encode_peer_logged(frame: &PeerFrame, buf: &mut Vec<u8>) {
    if let Err(error) = codec::encode_peer_frame(frame, buf) {
        tracing::error!(%error, "cannot encode a peer frame");
    }
}

/// Why reading a peer frame failed.
#[derive(Debug, thiserror::Error)]
pub enum PeerReadError {
    /// The stream ended.
    #[error("stream closed")]
    Closed,
    /// A frame could not be decoded; the link cannot continue.
    #[error("invalid peer frame: {0}")]
    Invalid(#[from] backbone_protocol::DecodeError),
}

/// Reads [`PeerFrame`]s from a receive stream.
pub struct PeerReader {
    recv: quinn::RecvStream,
    buf: Vec<u8>,
    start: usize,
    max_frame_len: usize,
}

impl PeerReader {
    /// A reader with a frame length limit.
    pub fn new(recv: quinn::RecvStream, max_frame_len: usize) -> Self {
        Self {
            recv,
            buf: Vec::new(),
            start: 0,
            max_frame_len,
        }
    }

    /// The next frame.
    pub async fn next(&mut self) -> Result<PeerFrame, PeerReadError> {
        loop {
            if let Some((frame, used)) =
                codec::decode_peer_frame(&self.buf[self.start..], self.max_frame_len)?
            {
                self.start += used;
                if self.start == self.buf.len() {
                    self.buf.clear();
                    self.start = 0;
                }
                return Ok(frame);
            }
            if self.start > 0 {
                self.buf.drain(..self.start);
                self.start = 0;
            }
            match self.recv.read_chunk(64 * 1024, true).await {
                Ok(Some(chunk)) => self.buf.extend_from_slice(&chunk.bytes),
                Ok(None) | Err(_) => return Err(PeerReadError::Closed),
            }
        }
    }
}

/// Resolves once shutdown begins (without holding the watch guard across awaits).
async fn stopped(shutdown: &mut watch::Receiver<bool>) {
    let _ = shutdown.wait_for(|stop| *stop).await;
}
