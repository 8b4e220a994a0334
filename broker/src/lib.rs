//! The Backbone broker.
//!
//! Layout, from the bottom up:
//! - [`config`]: the configuration, its file, environment overrides and validation.
//! - [`store`]: storage behind narrow traits: the mailbox log, the directory (the only module naming sled), the group-commit writer, the bytes of files.
//! - [`shared`]: the state every connection and service shares ([`shared::Shared`]), the clock, and the live sessions of each address.
//! - [`mailbox`]: mailbox actors around a plain core of rules, and the registry spawning them on demand.
//! - [`fleet`]: sharding — the fleet map, certificates, node-to-node links, slot handover, and the peer listener.
//! - [`route`]: storing an accepted envelope for local and remote recipients.
//! - [`cmd`]: the command table — every request's rules in one place, one dispatch, and one file per request family (sends, cards, capabilities, envelopes, relationships, tokens, files, devices, deletion, rate limits).
//! - [`session`]: one client connection — handshake, the request loops of authenticated and anonymous sessions, delivery to a device.
//! - [`admission`]: which connections are accepted, retried or refused, with per-source counts.
//! - [`wire`]: frame I/O over a QUIC stream.
//! - [`supervisor`]: the root of the supervision tree and the expiry actor.
//! - [`server`]: wiring and the accept loop; [`server::Broker`] is the running broker.
//! - [`tls`], [`transport`]: certificates and QUIC tuning.
//! - [`metrics_http`]: `/metrics` and `/health`.
//! - [`telemetry`]: every exported metric's name, kind, unit, labels and help text.
//!
//! **Architecture Invariant:** no module but `main` and `lib` imports
//! [`server`]; services take the shared state from [`shared`].

pub mod admission;
pub mod cmd;
pub mod config;
pub mod fleet;
pub mod mailbox;
pub mod metrics_http;
pub mod route;
pub mod server;
pub mod session;
pub mod shared;
pub mod store;
pub mod supervisor;
pub mod telemetry;
pub mod tls;
pub mod transport;
pub mod wire;

pub use config::Config;
pub use server::{Broker, StartOptions};
