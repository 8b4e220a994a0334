//! The Backbone broker.
//!
//! Layout:
//! - [`admission`]: which connections are accepted, retried or refused, with per-source counts.
//! - [`config`]: the configuration, its file, environment overrides and validation.
//! - [`server`]: wiring and the accept loop; [`server::Broker`] is the running broker.
//! - [`session`]: one connection — handshake, auth, requests, delivery to a device.
//! - [`wire`]: frame I/O over a QUIC stream.
//! - [`route`]: storing an accepted envelope for local and remote recipients.
//! - [`token`]: creating, fetching (here or on the owning node) and deleting tokens.
//! - [`relationships`]: relationship requests and decisions across the fleet.
//! - [`deletion`]: scheduling identity deletion and the sweep that purges.
//! - [`devices`]: registering, listing and unregistering an identity's devices.
//! - [`files`]: the file service — records in the store, bytes under `<data_dir>/files/`, uploads and downloads on their own streams.
//! - [`fleet`]: sharding — the fleet map, certificates, node-to-node links.
//! - [`mailbox`]: mailbox actors and the registry spawning them on demand.
//! - [`supervisor`]: the root of the supervision tree and the expiry actor.
//! - [`store`]: storage behind a narrow trait; the only module naming sled, and the group-commit writer.
//! - [`tls`], [`transport`]: certificates and QUIC tuning.
//! - [`metrics_http`]: `/metrics` and `/health`.
//! - [`telemetry`]: every exported metric's name, kind, unit, labels and help text.

pub mod admission;
pub mod config;
pub mod deletion;
pub mod devices;
pub mod files;
pub mod fleet;
pub mod mailbox;
pub mod metrics_http;
pub mod relationships;
pub mod route;
pub mod server;
pub mod session;
pub mod store;
pub mod supervisor;
pub mod telemetry;
pub mod tls;
pub mod token;
pub mod transport;
pub mod wire;

pub use config::Config;
pub use server::{Broker, StartOptions};
