//! The QUIC endpoint, tuned on purpose: explicit windows (quinn's connection
//! receive window is unbounded by default), stream limits, idle timeout,
//! keep-alive, and large UDP socket buffers (with the kernel's default of
//! about 208 KiB, handshakes stall under load).
//!
//! A client connection starts small: until it authenticates it may open one
//! stream and have [`PRE_AUTH_WINDOW`] bytes in flight each way, enough for
//! `Hello`, `Challenge` and `Auth` many times over, so a connection that
//! never authenticates cannot make the broker buffer more. Authentication
//! grants the configured windows and streams ([`grant_authenticated`]); an
//! anonymous session gets smaller ones ([`grant_anonymous`]).

use std::net::SocketAddr;
use std::sync::Arc;

use anyhow::Context;
use quinn::crypto::rustls::QuicServerConfig;
use quinn::{IdleTimeout, VarInt};
use socket2::{Domain, Protocol, Socket, Type};
use tracing::{info, warn};

use crate::config::{Config, TransportConfig};

/// The QUIC transport parameters derived from the config.
pub fn transport_config(config: &TransportConfig) -> anyhow::Result<quinn::TransportConfig> {
    let mut transport = quinn::TransportConfig::default();
    transport
        .receive_window(VarInt::from_u64(config.receive_window.as_u64())?)
        .stream_receive_window(VarInt::from_u64(config.stream_receive_window.as_u64())?)
        .send_window(config.send_window.as_u64())
        .max_concurrent_bidi_streams(VarInt::from_u32(config.max_concurrent_bidi_streams))
        .max_concurrent_uni_streams(VarInt::from_u32(0))
        .max_idle_timeout(Some(IdleTimeout::try_from(config.idle_timeout)?))
        .keep_alive_interval(Some(config.keep_alive));
    if !config.mtu_discovery {
        transport.mtu_discovery_config(None);
    }
    Ok(transport)
}

/// Bytes a connection may have in flight each way before it authenticates.
pub const PRE_AUTH_WINDOW: u32 = 64 * 1024;

/// The transport parameters every client connection starts with: the
/// configured ones, but with [`PRE_AUTH_WINDOW`] as the connection windows
/// and one stream. Each stream keeps the configured stream window, so that
/// raising the connection window later is all authentication takes.
pub fn pre_auth_transport_config(
    config: &TransportConfig,
) -> anyhow::Result<quinn::TransportConfig> {
    let mut transport = transport_config(config)?;
    transport
        .receive_window(VarInt::from_u32(PRE_AUTH_WINDOW))
        .send_window(u64::from(PRE_AUTH_WINDOW))
        .max_concurrent_bidi_streams(VarInt::from_u32(1));
    Ok(transport)
}

/// Grants an authenticated connection the configured windows and streams.
pub fn grant_authenticated(connection: &quinn::Connection, config: &TransportConfig) {
    grant(
        connection,
        config.receive_window.as_u64(),
        config.send_window.as_u64(),
        config.max_concurrent_bidi_streams,
    );
}

/// Grants an anonymous session its (smaller) windows and the configured
/// streams (for file downloads).
pub fn grant_anonymous(connection: &quinn::Connection, config: &TransportConfig) {
    grant(
        connection,
        config.anonymous_receive_window.as_u64(),
        config.anonymous_send_window.as_u64(),
        config.max_concurrent_bidi_streams,
    );
}

fn grant(connection: &quinn::Connection, receive: u64, send: u64, streams: u32) {
    // The config validation keeps windows far below QUIC's 2^62 limit.
    if let Ok(receive) = VarInt::from_u64(receive) {
        connection.set_receive_window(receive);
    }
    connection.set_send_window(send);
    connection.set_max_concurrent_bi_streams(VarInt::from_u32(streams));
}

/// Binds the client-facing endpoint on `server.listen`; its connections
/// start with [`pre_auth_transport_config`].
pub fn server_endpoint(
    config: &Config,
    tls: rustls::ServerConfig,
    reset_key: &[u8],
) -> anyhow::Result<quinn::Endpoint> {
    bind_endpoint_with(
        &config.transport,
        pre_auth_transport_config(&config.transport)?,
        config.server.listen,
        tls,
        reset_key,
    )
}

/// Binds a UDP socket on `listen` with the configured buffers and builds an
/// endpoint serving `tls` with the configured transport parameters.
pub fn bind_endpoint(
    transport: &TransportConfig,
    listen: SocketAddr,
    tls: rustls::ServerConfig,
    reset_key: &[u8],
) -> anyhow::Result<quinn::Endpoint> {
    bind_endpoint_with(
        transport,
        transport_config(transport)?,
        listen,
        tls,
        reset_key,
    )
}

/// [`bind_endpoint`] with the given transport parameters for its connections.
fn bind_endpoint_with(
    transport: &TransportConfig,
    parameters: quinn::TransportConfig,
    listen: SocketAddr,
    tls: rustls::ServerConfig,
    reset_key: &[u8],
) -> anyhow::Result<quinn::Endpoint> {
    let crypto = QuicServerConfig::try_from(tls).context("TLS config unusable for QUIC")?;
    let mut server = quinn::ServerConfig::with_crypto(Arc::new(crypto));
    server.transport_config(Arc::new(parameters));
    let socket = Socket::new(
        Domain::for_address(listen),
        Type::DGRAM,
        Some(Protocol::UDP),
    )?;
    let wanted_recv = transport.udp_recv_buffer.as_u64() as usize;
    let wanted_send = transport.udp_send_buffer.as_u64() as usize;
    // Failing to enlarge the buffers is not fatal; the sizes obtained are logged.
    let _ = socket.set_recv_buffer_size(wanted_recv);
    let _ = socket.set_send_buffer_size(wanted_send);
    socket
        .bind(&listen.into())
        .with_context(|| format!("cannot bind UDP {listen}"))?;
    let got_recv = socket.recv_buffer_size().unwrap_or(0);
    let got_send = socket.send_buffer_size().unwrap_or(0);
    if got_recv < wanted_recv || got_send < wanted_send {
        warn!(
            got_recv,
            got_send,
            wanted_recv,
            wanted_send,
            "kernel capped the UDP buffers; raise net.core.rmem_max and net.core.wmem_max"
        );
    } else {
        info!(got_recv, got_send, "UDP socket buffers");
    }
    let socket: std::net::UdpSocket = socket.into();
    // A reset key kept across restarts lets the next run reset the previous
    // run's connections (see `tls::reset_key`). The next run must also
    // recognise the previous run's connection ids as its own, or it drops
    // their packets without a reset; so the id generator's key is derived
    // from the same secret.
    let cid_key = blake3::derive_key("backbone 2026 quic connection id key", reset_key);
    let cid_key = u64::from_le_bytes(cid_key[..8].try_into().expect("8 of 32 bytes"));
    let mut endpoint_config = quinn::EndpointConfig::new(Arc::new(ring::hmac::Key::new(
        ring::hmac::HMAC_SHA256,
        reset_key,
    )));
    endpoint_config.cid_generator(move || {
        Box::new(quinn_proto::HashedConnectionIdGenerator::from_key(cid_key))
    });
    let endpoint = quinn::Endpoint::new(
        endpoint_config,
        Some(server),
        socket,
        Arc::new(quinn::TokioRuntime),
    )?;
    Ok(endpoint)
}
