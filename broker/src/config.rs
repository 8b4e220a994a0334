//! Broker configuration: serde structs with defaults, a TOML file, environment
//! overrides and validation.
//!
//! Precedence, lowest first: embedded defaults, the config file,
//! `BACKBONE__SECTION__KEY=value` environment variables, command-line flags.
//! Every key is described in the shipped `config/backbone.toml`.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use backbone_protocol::relationship::InboundPolicy;
use bytesize::ByteSize;
use serde::{Deserialize, Serialize};
use thiserror::Error;

/// Prefix of environment variables that override config keys.
pub const ENV_PREFIX: &str = "BACKBONE__";

/// The whole broker configuration.
#[derive(Clone, Debug, Default, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// Where to listen and store data.
    pub server: ServerConfig,
    /// Certificate and key.
    pub tls: TlsConfig,
    /// Metrics and health endpoint.
    pub metrics: MetricsConfig,
    /// Authentication timing.
    pub auth: AuthConfig,
    /// Limits on requests.
    pub limits: LimitsConfig,
    /// The file service.
    pub files: FilesConfig,
    /// Mailbox actors.
    pub mailbox: MailboxConfig,
    /// The expiry sweep.
    pub expiry: ExpiryConfig,
    /// The mailbox log's files.
    pub store: StoreConfig,
    /// QUIC transport tuning.
    pub transport: TransportConfig,
    /// Membership of a sharded fleet.
    pub fleet: FleetConfig,
    /// Relationships and inbound policies.
    pub relationships: RelationshipsConfig,
    /// Identity deletion.
    pub identity: IdentityConfig,
}

/// `[files]`: large encrypted blobs on their own streams.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct FilesConfig {
    /// Largest file; a larger one is refused with `FileTooLarge`.
    pub max_size: ByteSize,
    /// Most unexpired files one identity may hold.
    pub max_files_per_identity: usize,
    /// Most declared bytes one identity's unexpired files may add up to.
    pub max_bytes_per_identity: ByteSize,
    /// Longest time to live of a file.
    #[serde(with = "humantime_serde")]
    pub max_ttl: Duration,
}

impl Default for FilesConfig {
    fn default() -> Self {
        Self {
            max_size: ByteSize::mib(100),
            max_files_per_identity: 100,
            max_bytes_per_identity: ByteSize::gib(1),
            max_ttl: Duration::from_secs(30 * 24 * 3600),
        }
    }
}

/// `[server]`.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct ServerConfig {
    /// UDP address for QUIC.
    pub listen: SocketAddr,
    /// Directory for the store and the generated certificate.
    pub data_dir: PathBuf,
    /// How long shutdown waits for in-flight requests.
    #[serde(with = "humantime_serde")]
    pub shutdown_grace: Duration,
    /// Most threads the `backbone` binary's runtime keeps for blocking work
    /// (store reads, file I/O, sweeps); unset: see [`ServerConfig::blocking_threads()`].
    pub blocking_threads: Option<usize>,
}

impl ServerConfig {
    /// The blocking-thread limit: the configured one, else four per core
    /// and at least 16.
    pub fn blocking_threads(&self) -> usize {
        self.blocking_threads.unwrap_or_else(|| {
            let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
            (4 * cores).max(16)
        })
    }
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 7700)),
            data_dir: PathBuf::from("./backbone-data"),
            shutdown_grace: Duration::from_secs(10),
            blocking_threads: None,
        }
    }
}

/// `[tls]`: without both paths, a self-signed certificate is generated under `<data_dir>/tls/`.
#[derive(Clone, Debug, Default, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct TlsConfig {
    /// PEM certificate chain.
    pub cert: Option<PathBuf>,
    /// PEM private key.
    pub key: Option<PathBuf>,
    /// Extra DNS names or IPs for the generated certificate, besides `localhost` and `127.0.0.1`.
    pub generated_names: Vec<String>,
}

/// `[metrics]`.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct MetricsConfig {
    /// TCP address serving `/metrics` and `/health`; `None` disables it.
    pub listen: Option<SocketAddr>,
}

impl Default for MetricsConfig {
    fn default() -> Self {
        Self {
            listen: Some(SocketAddr::from(([127, 0, 0, 1], 9700))),
        }
    }
}

/// `[auth]`.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct AuthConfig {
    /// How long a challenge nonce stays valid (at most 60 s).
    #[serde(with = "humantime_serde")]
    pub challenge_ttl: Duration,
    /// A connection not authenticated by then is closed.
    #[serde(with = "humantime_serde")]
    pub deadline: Duration,
}

impl Default for AuthConfig {
    fn default() -> Self {
        Self {
            challenge_ttl: Duration::from_secs(60),
            deadline: Duration::from_secs(10),
        }
    }
}

/// `[limits]`.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct LimitsConfig {
    /// Most recipients in one send.
    pub max_recipients: usize,
    /// Largest envelope.
    pub max_envelope_size: ByteSize,
    /// Longest TTL; longer requests are capped to it.
    #[serde(with = "humantime_serde")]
    pub max_ttl: Duration,
    /// Unacknowledged pushes in flight per device.
    pub push_window: usize,
    /// Requests one connection may have in progress before the broker stops reading from it.
    pub max_inflight_requests: usize,
    /// Most simultaneous connections.
    pub max_connections: usize,
    /// Most connections still in their handshake or not yet authenticated;
    /// more are refused (handshake floods, slowloris clients).
    pub max_unauthenticated: usize,
    /// New connections per second above which clients must prove their
    /// address with a QUIC Retry first (0: always).
    pub retry_above_rate: u32,
    /// Unauthenticated connections at or above which every new client must
    /// prove its address with a QUIC Retry first, so half-open handshakes
    /// from forged sources cannot fill `max_unauthenticated`.
    pub retry_above_unauthenticated: usize,
    /// Most anonymous sessions at once.
    pub max_anonymous: usize,
    /// Requests one anonymous connection may have in progress.
    pub anonymous_max_inflight_requests: usize,
    /// Bytes of answers and pushes queued for one authenticated connection
    /// and not yet taken by QUIC; at it the broker stops reading the
    /// connection's requests and holds its pushes until the queue drains.
    pub output_budget: ByteSize,
    /// The same for an anonymous connection, and for any connection before
    /// it authenticates.
    pub anonymous_output_budget: ByteSize,
    /// A connection whose queued output makes no progress for this long
    /// (its client neither reads nor acknowledges) is closed.
    #[serde(with = "humantime_serde")]
    pub output_stall_timeout: Duration,
    /// Limits per source address.
    pub per_source: PerSourceConfig,
    /// Envelope copies (one per recipient) an identity may send per second,
    /// on average; 0 disables the limit.
    pub send_rate: u32,
    /// Envelope copies an identity may send at once after being idle.
    pub send_burst: u32,
    /// Most unexpired envelopes one mailbox may hold; 0: no limit.
    pub mailbox_max_envelopes: u64,
    /// Most envelope bytes one mailbox may hold; 0: no limit.
    pub mailbox_max_bytes: ByteSize,
    /// Sealed sends one delivery capability may admit per second, on
    /// average, counted on the recipient's node; 0 disables the limit.
    pub sealed_rate: u32,
    /// Sealed sends one delivery capability may admit at once after being idle.
    pub sealed_burst: u32,
    /// Requests (sealed sends, card lookups, token fetches, file
    /// downloads) one anonymous connection may make per second, and at
    /// once; 0 disables the limit.
    pub anonymous_rate: u32,
    /// Most delivery capability hashes one mailbox may hold.
    pub max_capabilities: usize,
    /// Most devices one identity may register (the identity key itself
    /// not counted).
    pub max_devices: usize,
    /// Largest token content. A token's TTL is capped by `max_ttl`.
    pub token_max_bytes: ByteSize,
    /// Most unexpired tokens one identity may hold.
    pub max_tokens_per_identity: usize,
    /// Wrong passwords after which a token is locked for good.
    pub token_password_attempts: u32,
}

impl Default for LimitsConfig {
    fn default() -> Self {
        Self {
            max_recipients: 100,
            max_envelope_size: ByteSize::mib(1),
            max_ttl: Duration::from_secs(30 * 24 * 3600),
            push_window: 256,
            max_inflight_requests: 256,
            max_connections: 100_000,
            max_unauthenticated: 2_000,
            retry_above_rate: 2_000,
            retry_above_unauthenticated: 200,
            max_anonymous: 1_000,
            anonymous_max_inflight_requests: 4,
            output_budget: ByteSize::mib(4),
            anonymous_output_budget: ByteSize::kib(256),
            output_stall_timeout: Duration::from_secs(30),
            per_source: PerSourceConfig::default(),
            send_rate: 1_000,
            send_burst: 2_000,
            mailbox_max_envelopes: 100_000,
            mailbox_max_bytes: ByteSize::mib(512),
            sealed_rate: 10,
            sealed_burst: 50,
            anonymous_rate: 100,
            max_capabilities: 1_000,
            max_devices: 100,
            token_max_bytes: ByteSize::kib(64),
            max_tokens_per_identity: 1_000,
            token_password_attempts: 5,
        }
    }
}

impl LimitsConfig {
    /// The frame limit: the largest envelope plus room for the largest
    /// recipient list, or the largest token if that is larger, plus room for
    /// the other fields.
    pub fn max_frame_len(&self) -> usize {
        let send = self.max_envelope_size.as_u64() as usize + self.max_recipients * 32;
        send.max(self.token_max_bytes.as_u64() as usize) + 4096
    }
}

/// `[limits.per_source]`: limits per source address (an IPv4 address, or
/// an IPv6 /64), so one host cannot take the places meant for everyone.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct PerSourceConfig {
    /// Networks exempt from the per-source limits (clients behind a NAT
    /// the operator trusts, a load generator).
    pub exempt: Vec<ipnet::IpNet>,
    /// New connections one source may open per second on average; 0
    /// disables the limit.
    pub handshake_rate: u32,
    /// New connections one source may open at once after an idle spell.
    pub handshake_burst: u32,
    /// Most connections of one source in their handshake or not yet
    /// authenticated.
    pub max_unauthenticated: usize,
    /// Most anonymous sessions of one source.
    pub max_anonymous: usize,
    /// Requests all anonymous sessions of one source may make per second,
    /// and at once; 0 disables the limit.
    pub anonymous_rate: u32,
    /// Relationship requests all identities of one source may make per
    /// minute on average, and at once; 0 disables the limit.
    pub relationship_requests_per_minute: u32,
}

impl Default for PerSourceConfig {
    fn default() -> Self {
        Self {
            exempt: Vec::new(),
            handshake_rate: 100,
            handshake_burst: 500,
            max_unauthenticated: 200,
            max_anonymous: 32,
            anonymous_rate: 200,
            relationship_requests_per_minute: 60,
        }
    }
}

/// `[mailbox]`.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct MailboxConfig {
    /// A mailbox actor with no activity for this long stops, connected devices
    /// or not.
    #[serde(with = "humantime_serde")]
    pub idle_timeout: Duration,
}

impl Default for MailboxConfig {
    fn default() -> Self {
        Self {
            idle_timeout: Duration::from_secs(60),
        }
    }
}

/// `[relationships]`.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct RelationshipsConfig {
    /// The inbound policy of identities that never set one.
    #[serde(with = "policy_name")]
    pub default_inbound_policy: InboundPolicy,
    /// Relationship requests one identity may make per minute, on average;
    /// 0 disables the limit.
    pub requests_per_minute: u32,
    /// Relationship requests one identity may make at once after being idle.
    pub request_burst: u32,
}

impl Default for RelationshipsConfig {
    fn default() -> Self {
        Self {
            default_inbound_policy: InboundPolicy::Anyone,
            requests_per_minute: 10,
            request_burst: 10,
        }
    }
}

/// `[identity]`.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct IdentityConfig {
    /// How long after `DeleteIdentity` the identity is purged; until then
    /// it works as before and may cancel. 0 purges at the next sweep.
    #[serde(with = "humantime_serde")]
    pub deletion_grace: Duration,
}

impl Default for IdentityConfig {
    fn default() -> Self {
        Self {
            deletion_grace: Duration::from_secs(7 * 24 * 3600),
        }
    }
}

/// The longest `identity.deletion_grace`: ten years.
const MAX_DELETION_GRACE: Duration = Duration::from_secs(3650 * 24 * 3600);

/// An [`InboundPolicy`] by its name (`anyone`, `relationships-only`).
mod policy_name {
    use backbone_protocol::relationship::InboundPolicy;
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(policy: &InboundPolicy, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(policy.as_str())
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<InboundPolicy, D::Error> {
        let name = String::deserialize(d)?;
        name.parse().map_err(serde::de::Error::custom)
    }
}

/// `[expiry]`.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct ExpiryConfig {
    /// How often the sweep runs.
    #[serde(with = "humantime_serde")]
    pub interval: Duration,
    /// Most envelopes deleted per storage call.
    pub batch: usize,
}

impl Default for ExpiryConfig {
    fn default() -> Self {
        Self {
            interval: Duration::from_secs(1),
            batch: 1000,
        }
    }
}

/// `[store]`: the mailbox log (envelopes), under `<data_dir>/log/`.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct StoreConfig {
    /// Size of one segment file (preallocated); a full one is closed and a
    /// new one started.
    pub segment_size: ByteSize,
    /// A segment whose live envelopes take less than this fraction of it
    /// is compacted (its live records copied forward, then deleted).
    pub compact_below: f64,
    /// How often the log's index is checkpointed and compaction runs.
    #[serde(with = "humantime_serde")]
    pub checkpoint_interval: Duration,
}

impl Default for StoreConfig {
    fn default() -> Self {
        Self {
            segment_size: ByteSize::mib(16),
            compact_below: 0.5,
            checkpoint_interval: Duration::from_secs(10),
        }
    }
}

/// `[transport]`.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct TransportConfig {
    /// Connection-level receive window (quinn's default is unbounded).
    pub receive_window: ByteSize,
    /// Per-stream receive window.
    pub stream_receive_window: ByteSize,
    /// Send window per connection.
    pub send_window: ByteSize,
    /// Bidirectional streams a client may open at once: its session's
    /// stream and file transfers (at least 2).
    pub max_concurrent_bidi_streams: u32,
    /// Idle connections are closed after this long.
    #[serde(with = "humantime_serde")]
    pub idle_timeout: Duration,
    /// The broker sends keep-alives this often.
    #[serde(with = "humantime_serde")]
    pub keep_alive: Duration,
    /// Connection receive window of an anonymous session.
    pub anonymous_receive_window: ByteSize,
    /// Send window of an anonymous session.
    pub anonymous_send_window: ByteSize,
    /// UDP socket receive buffer; the kernel may cap it (net.core.rmem_max).
    pub udp_recv_buffer: ByteSize,
    /// UDP socket send buffer; the kernel may cap it (net.core.wmem_max).
    pub udp_send_buffer: ByteSize,
    /// Probe each connection's path for packets above QUIC's 1,200-byte
    /// minimum (quinn's MTU discovery): about six probes and their acks per
    /// connection after the handshake and again every ten minutes.
    pub mtu_discovery: bool,
}

impl Default for TransportConfig {
    fn default() -> Self {
        Self {
            receive_window: ByteSize::mib(8),
            stream_receive_window: ByteSize::mib(4),
            send_window: ByteSize::mib(8),
            max_concurrent_bidi_streams: 4,
            anonymous_receive_window: ByteSize::mib(2),
            anonymous_send_window: ByteSize::mib(1),
            idle_timeout: Duration::from_secs(60),
            keep_alive: Duration::from_secs(15),
            udp_recv_buffer: ByteSize::mib(4),
            udp_send_buffer: ByteSize::mib(4),
            mtu_discovery: false,
        }
    }
}

/// `[fleet]`: without `file`, the broker is a single node owning every slot.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct FleetConfig {
    /// The fleet map shared by every node (see `config/fleet.toml`).
    pub file: Option<PathBuf>,
    /// This node's name in the fleet map.
    pub node: Option<String>,
    /// UDP address of the node-to-node listener.
    pub listen: SocketAddr,
    /// Directory with `ca.pem` and `<node>.pem`/`<node>.key` (`backbone fleet pki`).
    pub pki_dir: Option<PathBuf>,
    /// How long a forwarded request may wait for the owner's durable ack.
    #[serde(with = "humantime_serde")]
    pub forward_timeout: Duration,
    /// The retry-after sent with `ShardUnavailable`.
    #[serde(with = "humantime_serde")]
    pub retry_after: Duration,
}

impl Default for FleetConfig {
    fn default() -> Self {
        Self {
            file: None,
            node: None,
            listen: SocketAddr::from(([127, 0, 0, 1], 7701)),
            pki_dir: None,
            forward_timeout: Duration::from_secs(5),
            retry_after: Duration::from_secs(1),
        }
    }
}

/// Why configuration could not be loaded.
#[derive(Debug, Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read config file {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// The file, or the file merged with the environment, is not valid.
    #[error("invalid configuration{}: {message}", origin.as_ref().map(|p| format!(" in {}", p.display())).unwrap_or_default())]
    Parse {
        /// The file, if any.
        origin: Option<PathBuf>,
        /// What is wrong, with the key.
        message: String,
    },
    /// An environment override is not usable.
    #[error("environment variable {name}: {message}")]
    Env {
        /// The variable.
        name: String,
        /// What is wrong.
        message: String,
    },
    /// A value is out of its allowed range.
    #[error("invalid configuration: {key}: {message}")]
    Invalid {
        /// The key, as `section.key`.
        key: &'static str,
        /// What is wrong.
        message: String,
    },
}

impl Config {
    /// Loads the file (if any), applies `BACKBONE__...` overrides from `env`, and validates.
    pub fn load(
        path: Option<&Path>,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Self, ConfigError> {
        let mut table = match path {
            Some(path) => {
                let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
                    path: path.to_owned(),
                    source,
                })?;
                text.parse::<toml::Table>()
                    .map_err(|error| ConfigError::Parse {
                        origin: Some(path.to_owned()),
                        message: error.to_string(),
                    })?
            }
            None => toml::Table::new(),
        };
        for (name, value) in env {
            if let Some(key) = name.strip_prefix(ENV_PREFIX) {
                apply_env_override(&mut table, &name, key, &value)?;
            }
        }
        let config: Config =
            toml::Value::Table(table)
                .try_into()
                .map_err(|error: toml::de::Error| ConfigError::Parse {
                    origin: path.map(Path::to_owned),
                    message: error.to_string(),
                })?;
        config.validate()?;
        Ok(config)
    }

    /// Checks ranges and relations between keys.
    pub fn validate(&self) -> Result<(), ConfigError> {
        fn invalid(key: &'static str, message: impl Into<String>) -> Result<(), ConfigError> {
            Err(ConfigError::Invalid {
                key,
                message: message.into(),
            })
        }
        if self.auth.challenge_ttl.is_zero() || self.auth.challenge_ttl > Duration::from_secs(60) {
            return invalid("auth.challenge_ttl", "must be between 1ms and 60s");
        }
        if self.auth.deadline.is_zero() {
            return invalid("auth.deadline", "must be greater than zero");
        }
        if self.limits.max_recipients == 0 {
            return invalid("limits.max_recipients", "must be at least 1");
        }
        if self.limits.max_envelope_size.as_u64() == 0 {
            return invalid("limits.max_envelope_size", "must be greater than zero");
        }
        let largest_token = (backbone_protocol::codec::MAX_FRAME_LEN - 4096) as u64;
        if self.limits.token_max_bytes.as_u64() == 0
            || self.limits.token_max_bytes.as_u64() > largest_token
        {
            return invalid(
                "limits.token_max_bytes",
                format!(
                    "must be between 1 byte and {} (a token travels in one frame)",
                    ByteSize(largest_token)
                ),
            );
        }
        if self.limits.max_frame_len() > backbone_protocol::codec::MAX_FRAME_LEN {
            return invalid(
                "limits.max_envelope_size",
                format!(
                    "with limits.max_recipients the frame limit exceeds the protocol maximum of {}",
                    ByteSize(backbone_protocol::codec::MAX_FRAME_LEN as u64)
                ),
            );
        }
        if self.files.max_size.as_u64() == 0 {
            return invalid("files.max_size", "must be greater than zero");
        }
        if self.files.max_bytes_per_identity < self.files.max_size {
            return invalid(
                "files.max_bytes_per_identity",
                "must be at least files.max_size, or no file of the largest size fits",
            );
        }
        if self.files.max_ttl < Duration::from_secs(1) {
            return invalid("files.max_ttl", "must be at least 1s");
        }
        if self.limits.max_ttl < Duration::from_secs(1) {
            return invalid("limits.max_ttl", "must be at least 1s");
        }
        if self.limits.push_window == 0 || self.limits.push_window > 65_536 {
            return invalid("limits.push_window", "must be between 1 and 65536");
        }
        if self.limits.max_inflight_requests == 0 {
            return invalid("limits.max_inflight_requests", "must be at least 1");
        }
        if self.limits.max_connections == 0 {
            return invalid("limits.max_connections", "must be at least 1");
        }
        if self.limits.max_unauthenticated == 0 {
            return invalid("limits.max_unauthenticated", "must be at least 1");
        }
        if self.limits.max_anonymous == 0 {
            return invalid("limits.max_anonymous", "must be at least 1");
        }
        if self.limits.anonymous_max_inflight_requests == 0 {
            return invalid(
                "limits.anonymous_max_inflight_requests",
                "must be at least 1",
            );
        }
        if self.limits.output_budget.as_u64() < 64 * 1024
            || self.limits.anonymous_output_budget.as_u64() < 64 * 1024
        {
            return invalid(
                "limits.output_budget",
                "output budgets must be at least 64 KiB",
            );
        }
        if self.limits.output_stall_timeout < Duration::from_secs(1) {
            return invalid("limits.output_stall_timeout", "must be at least 1s");
        }
        let per_source = &self.limits.per_source;
        if per_source.max_unauthenticated == 0 || per_source.max_anonymous == 0 {
            return invalid(
                "limits.per_source",
                "max_unauthenticated and max_anonymous must be at least 1 (exempt a network instead)",
            );
        }
        if per_source.handshake_rate > 0 && per_source.handshake_burst == 0 {
            return invalid(
                "limits.per_source.handshake_burst",
                "must be at least 1 while handshake_rate is set, or no connection could pass",
            );
        }
        if self.limits.send_rate > 0 && self.limits.send_burst < self.limits.max_recipients as u32 {
            return invalid(
                "limits.send_burst",
                "must be at least limits.max_recipients, or a send to many recipients could never pass",
            );
        }
        if self.limits.sealed_rate > 0 && self.limits.sealed_burst == 0 {
            return invalid(
                "limits.sealed_burst",
                "must be at least 1 while limits.sealed_rate is set, or no sealed send could pass",
            );
        }
        if self.limits.max_capabilities == 0 || self.limits.max_capabilities > 100_000 {
            return invalid(
                "limits.max_capabilities",
                "must be between 1 and 100000 (a mailbox lists its hashes in one frame)",
            );
        }
        if self.limits.max_devices == 0 || self.limits.max_devices > 10_000 {
            return invalid(
                "limits.max_devices",
                "must be between 1 and 10000 (an identity lists its devices in one frame)",
            );
        }
        if self.limits.max_tokens_per_identity == 0 {
            return invalid("limits.max_tokens_per_identity", "must be at least 1");
        }
        if self.limits.token_password_attempts == 0 {
            return invalid(
                "limits.token_password_attempts",
                "must be at least 1, or no password could ever be tried",
            );
        }
        if self.relationships.requests_per_minute > 0 && self.relationships.request_burst == 0 {
            return invalid(
                "relationships.request_burst",
                "must be at least 1 while relationships.requests_per_minute is set, or no request could pass",
            );
        }
        if self.identity.deletion_grace > MAX_DELETION_GRACE {
            return invalid(
                "identity.deletion_grace",
                "must be at most 3650 days (ten years)",
            );
        }
        if self.store.segment_size.as_u64() < 1024 * 1024
            || self.store.segment_size.as_u64() > 1 << 40
        {
            return invalid("store.segment_size", "must be between 1 MiB and 1 TiB");
        }
        if !(0.0..1.0).contains(&self.store.compact_below) {
            return invalid(
                "store.compact_below",
                "must be at least 0 (never compact) and below 1",
            );
        }
        if self.store.checkpoint_interval < Duration::from_millis(100) {
            return invalid("store.checkpoint_interval", "must be at least 100ms");
        }
        if self.expiry.interval.is_zero() || self.expiry.batch == 0 {
            return invalid("expiry", "interval and batch must be greater than zero");
        }
        if self.transport.receive_window.as_u64() < 64 * 1024
            || self.transport.stream_receive_window.as_u64() < 64 * 1024
        {
            return invalid(
                "transport.receive_window",
                "windows must be at least 64 KiB",
            );
        }
        if self.transport.anonymous_receive_window.as_u64() < 64 * 1024
            || self.transport.anonymous_send_window.as_u64() < 64 * 1024
        {
            return invalid(
                "transport.anonymous_receive_window",
                "anonymous windows must be at least 64 KiB",
            );
        }
        if self.transport.stream_receive_window > self.transport.receive_window {
            return invalid(
                "transport.stream_receive_window",
                "must not exceed transport.receive_window",
            );
        }
        if self.transport.max_concurrent_bidi_streams < 2 {
            return invalid(
                "transport.max_concurrent_bidi_streams",
                "must be at least 2: the session's stream and one file transfer",
            );
        }
        if self.server.blocking_threads == Some(0) {
            return invalid("server.blocking_threads", "must be at least 1");
        }
        if self.transport.keep_alive >= self.transport.idle_timeout {
            return invalid(
                "transport.keep_alive",
                "must be shorter than transport.idle_timeout",
            );
        }
        if self.tls.cert.is_some() != self.tls.key.is_some() {
            return invalid("tls", "set both cert and key, or neither");
        }
        if self.fleet.file.is_some() && (self.fleet.node.is_none() || self.fleet.pki_dir.is_none())
        {
            return invalid(
                "fleet",
                "with fleet.file set, fleet.node and fleet.pki_dir are required",
            );
        }
        if self.fleet.forward_timeout.is_zero() || self.fleet.retry_after.is_zero() {
            return invalid(
                "fleet",
                "forward_timeout and retry_after must be greater than zero",
            );
        }
        Ok(())
    }
}

/// `BACKBONE__LIMITS__MAX_RECIPIENTS=50` sets `limits.max_recipients`. The value is
/// parsed as a TOML value when it is one (numbers, booleans, arrays) and taken
/// as a string otherwise (`127.0.0.1:7700`, `10s`, `1 MiB`).
fn apply_env_override(
    table: &mut toml::Table,
    name: &str,
    key: &str,
    value: &str,
) -> Result<(), ConfigError> {
    let parts: Vec<String> = key.split("__").map(str::to_ascii_lowercase).collect();
    if parts.iter().any(String::is_empty) {
        return Err(ConfigError::Env {
            name: name.to_owned(),
            message: "empty key segment".into(),
        });
    }
    let parsed = format!("v = {value}")
        .parse::<toml::Table>()
        .ok()
        .and_then(|mut t| t.remove("v"))
        .unwrap_or_else(|| toml::Value::String(value.to_owned()));
    let (leaf, sections) = parts.split_last().expect("split yields at least one part");
    let mut current = table;
    for section in sections {
        let entry = current
            .entry(section.clone())
            .or_insert_with(|| toml::Value::Table(toml::Table::new()));
        current = entry.as_table_mut().ok_or_else(|| ConfigError::Env {
            name: name.to_owned(),
            message: format!("{section} is not a section"),
        })?;
    }
    current.insert(leaf.clone(), parsed);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid_and_match_the_documented_ones() {
        let config = Config::load(None, []).expect("defaults load");
        assert_eq!(
            config.server.listen,
            "127.0.0.1:7700".parse().expect("addr")
        );
        assert_eq!(
            config.metrics.listen,
            Some("127.0.0.1:9700".parse().expect("addr"))
        );
        assert_eq!(config.auth.deadline, Duration::from_secs(10));
        assert_eq!(config.limits.max_recipients, 100);
        assert_eq!(config.limits.max_envelope_size, ByteSize::mib(1));
    }

    #[test]
    fn the_shipped_config_file_parses_and_equals_the_defaults() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../config/backbone.toml");
        let shipped = Config::load(Some(&path), []).expect("shipped config loads");
        let defaults = Config::default();
        assert_eq!(
            toml::to_string(&shipped).expect("serializes"),
            toml::to_string(&defaults).expect("serializes")
        );
    }

    #[test]
    fn environment_overrides_apply_with_types() {
        let env = [
            (
                "BACKBONE__LIMITS__MAX_RECIPIENTS".to_owned(),
                "7".to_owned(),
            ),
            (
                "BACKBONE__SERVER__LISTEN".to_owned(),
                "127.0.0.1:9999".to_owned(),
            ),
            ("BACKBONE__AUTH__DEADLINE".to_owned(), "3s".to_owned()),
            (
                "BACKBONE__LIMITS__MAX_ENVELOPE_SIZE".to_owned(),
                "64 KiB".to_owned(),
            ),
            ("UNRELATED".to_owned(), "x".to_owned()),
        ];
        let config = Config::load(None, env).expect("loads");
        assert_eq!(config.limits.max_recipients, 7);
        assert_eq!(config.server.listen.port(), 9999);
        assert_eq!(config.auth.deadline, Duration::from_secs(3));
        assert_eq!(config.limits.max_envelope_size, ByteSize::kib(64));
    }

    #[test]
    fn the_blocking_thread_limit_is_the_configured_one_or_four_per_core() {
        let mut server = ServerConfig::default();
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        assert_eq!(server.blocking_threads(), (4 * cores).max(16));
        server.blocking_threads = Some(3);
        assert_eq!(server.blocking_threads(), 3);
    }

    #[test]
    fn bad_values_get_clear_errors_naming_the_key() {
        let cases = [
            ("BACKBONE__AUTH__CHALLENGE_TTL", "2m", "auth.challenge_ttl"),
            (
                "BACKBONE__LIMITS__MAX_RECIPIENTS",
                "0",
                "limits.max_recipients",
            ),
            (
                "BACKBONE__LIMITS__MAX_ENVELOPE_SIZE",
                "1 GiB",
                "limits.max_envelope_size",
            ),
            ("BACKBONE__LIMITS__NO_SUCH_KEY", "1", "no_such_key"),
            ("BACKBONE__SERVER__LISTEN", "not-an-address", "listen"),
            (
                "BACKBONE__SERVER__BLOCKING_THREADS",
                "0",
                "server.blocking_threads",
            ),
            (
                "BACKBONE__TRANSPORT__KEEP_ALIVE",
                "2m",
                "transport.keep_alive",
            ),
            (
                "BACKBONE__LIMITS__TOKEN_MAX_BYTES",
                "20 MiB",
                "limits.token_max_bytes",
            ),
            (
                "BACKBONE__LIMITS__MAX_DEVICES",
                "10001",
                "limits.max_devices",
            ),
            (
                "BACKBONE__LIMITS__MAX_TOKENS_PER_IDENTITY",
                "0",
                "limits.max_tokens_per_identity",
            ),
            (
                "BACKBONE__LIMITS__TOKEN_PASSWORD_ATTEMPTS",
                "0",
                "limits.token_password_attempts",
            ),
            (
                "BACKBONE__IDENTITY__DELETION_GRACE",
                "20years",
                "identity.deletion_grace",
            ),
            (
                "BACKBONE__TRANSPORT__MAX_CONCURRENT_BIDI_STREAMS",
                "1",
                "transport.max_concurrent_bidi_streams",
            ),
            ("BACKBONE__FILES__MAX_SIZE", "0 B", "files.max_size"),
            (
                "BACKBONE__FILES__MAX_BYTES_PER_IDENTITY",
                "1 MiB",
                "files.max_bytes_per_identity",
            ),
            ("BACKBONE__FILES__MAX_TTL", "0s", "files.max_ttl"),
        ];
        for (name, value, expected) in cases {
            let error = Config::load(None, [(name.to_owned(), value.to_owned())])
                .expect_err("must be rejected");
            assert!(
                error.to_string().contains(expected),
                "{name}={value}: {error}"
            );
        }
    }

    #[test]
    fn an_unreadable_file_names_the_path() {
        let error =
            Config::load(Some(Path::new("/nonexistent/backbone.toml")), []).expect_err("fails");
        assert!(error.to_string().contains("/nonexistent/backbone.toml"));
    }
}
