//! Reaching the broker from the flags: the run's one UDP endpoint, trust
//! (a CA file or a fingerprint), and connecting with an identity or a
//! device key file.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use backbone_client::envelope::Padding;
use backbone_client::keyfile::{self, KeyFile};
use backbone_client::transport::default_server_name;
use backbone_client::{Client, ClientOptions, ConnectConfig, Credentials, Trust};

use super::args::{ConnectArgs, ServerArgs};

/// The one UDP endpoint every connection of this run uses, so that
/// [`close_connections`] can close them all before the process exits.
static ENDPOINT: std::sync::OnceLock<quinn::Endpoint> = std::sync::OnceLock::new();

/// The run's endpoint, bound on first use for the address family of
/// `server`; `None` when `server` does not resolve (connecting reports that).
fn endpoint_for(server: &str) -> anyhow::Result<Option<quinn::Endpoint>> {
    if let Some(endpoint) = ENDPOINT.get() {
        return Ok(Some(endpoint.clone()));
    }
    let Some(addr) = std::net::ToSocketAddrs::to_socket_addrs(server)
        .ok()
        .and_then(|mut addrs| addrs.next())
    else {
        return Ok(None);
    };
    let bind: std::net::SocketAddr = if addr.is_ipv6() {
        (std::net::Ipv6Addr::UNSPECIFIED, 0).into()
    } else {
        (std::net::Ipv4Addr::UNSPECIFIED, 0).into()
    };
    let endpoint = quinn::Endpoint::client(bind).context("binding a UDP socket")?;
    Ok(Some(ENDPOINT.get_or_init(|| endpoint).clone()))
}

/// Closes this run's connections and waits, up to a second, until the
/// broker was told: a process that exits without this leaves its sessions
/// open on the broker until the broker's idle timeout.
pub(crate) async fn close_connections() {
    if let Some(endpoint) = ENDPOINT.get() {
        endpoint.close(quinn::VarInt::from_u32(0), b"bye");
        let _ = tokio::time::timeout(Duration::from_secs(1), endpoint.wait_idle()).await;
    }
}

/// Connects with an identity key file and publishes its card, so that
/// others can send to it.
pub(crate) async fn connect(args: &ServerArgs) -> anyhow::Result<Client> {
    connect_padded(args, Padding::default()).await
}

/// Where and how to reach the broker, from the flags.
pub(crate) fn connect_config(args: &ConnectArgs) -> anyhow::Result<ConnectConfig> {
    let trust = match (&args.fingerprint, &args.ca) {
        (Some(fingerprint), _) => Trust::Fingerprint(fingerprint.clone()),
        (None, Some(ca)) => Trust::CaFile(ca.clone()),
        (None, None) => {
            let default = PathBuf::from("./backbone-data/tls/cert.pem");
            if !default.exists() {
                anyhow::bail!(
                    "no --ca or --fingerprint given and {} does not exist",
                    default.display()
                );
            }
            Trust::CaFile(default)
        }
    };
    let mut connect = ConnectConfig::new(args.server.clone(), trust);
    connect.endpoint = endpoint_for(&args.server)?;
    connect.server_name = args
        .server_name
        .clone()
        .or_else(|| default_server_name(&args.server));
    Ok(connect)
}

/// Connects as [`connect`] does, padding sent envelopes as `padding` says.
pub(crate) async fn connect_padded(args: &ServerArgs, padding: Padding) -> anyhow::Result<Client> {
    let client = connect_unpublished(args, padding).await?;
    client
        .publish_card()
        .await
        .context("publishing this identity's card")?;
    Ok(client)
}

/// Connects without publishing the identity's card.
pub(crate) async fn connect_unpublished(
    args: &ServerArgs,
    padding: Padding,
) -> anyhow::Result<Client> {
    let keys = keyfile::load_identity(&args.key)?;
    let connect = connect_config(&args.connect)?;
    let mut options =
        ClientOptions::primary(connect, keys.signing.clone(), keys.encryption.clone());
    options.credentials = Credentials::primary(&keys.signing);
    options.padding = padding;
    Ok(Client::connect(options).await?)
}

/// Connects with an identity key file, as [`connect`] does, or with a
/// device key file. A device cannot sign the identity's card, so it
/// publishes none; it can open envelopes sealed to the identity.
pub(crate) async fn connect_any(args: &ServerArgs) -> anyhow::Result<Client> {
    let keys = match keyfile::load(&args.key)? {
        KeyFile::Identity(_) => return connect(args).await,
        KeyFile::Device(keys) => keys,
    };
    let mut options = ClientOptions::primary(
        connect_config(&args.connect)?,
        keys.device.clone(),
        keys.encryption.clone(),
    );
    options.credentials = Credentials {
        identity_key: keys.identity_key,
        device: keys.device.clone(),
        certificate: Some(keys.certificate),
    };
    // Only the identity key signs messages and cards.
    options.identity = None;
    Ok(Client::connect(options).await?)
}
