//! A two-party chat over a running broker: every line typed on stdin is
//! encrypted and sent to one address, and every message received is printed
//! and acknowledged.
//!
//! Start a broker with default settings (it listens on 127.0.0.1:7700 and
//! writes its certificate to `backbone-data/tls/cert.pem`), make a key for
//! each side, and run one chat per terminal, each pointed at the other's
//! address (`keygen` prints it):
//!
//! ```text
//! cargo run -p backbone-client --bin backbone-cli -- keygen --out alice.key
//! cargo run -p backbone-client --bin backbone-cli -- keygen --out bob.key
//!
//! # terminal 1
//! cargo run -p backbone-client --example chat -- \
//!     --server 127.0.0.1:7700 --ca backbone-data/tls/cert.pem \
//!     --key alice.key --to <bob's bb1 address>
//! # terminal 2
//! cargo run -p backbone-client --example chat -- \
//!     --server 127.0.0.1:7700 --ca backbone-data/tls/cert.pem \
//!     --key bob.key --to <alice's bb1 address>
//! ```
//!
//! Each side publishes its card on connect, and a message can only be sealed
//! to an address whose card is published, so start both before typing.
//! Messages sent while the other side is offline wait in its mailbox.
//! End a chat with Ctrl-D.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use backbone_client::{Client, ClientOptions, ConnectConfig, Trust, keyfile};
use backbone_protocol::Address;
use clap::Parser;
use tokio::io::{AsyncBufReadExt, BufReader};

/// Chat with one address through a Backbone broker.
#[derive(Parser)]
struct Args {
    /// Broker address, host:port (UDP).
    #[arg(long, default_value = "127.0.0.1:7700")]
    server: String,
    /// The broker's certificate, trusted as a root.
    #[arg(long, default_value = "backbone-data/tls/cert.pem")]
    ca: PathBuf,
    /// The TLS name the certificate must be issued for (a generated one is
    /// issued for `localhost`).
    #[arg(long, default_value = "localhost")]
    server_name: String,
    /// Your identity key file, from `backbone-cli keygen`.
    #[arg(long)]
    key: PathBuf,
    /// The address to chat with.
    #[arg(long)]
    to: Address,
}

/// How long the broker keeps a message for a peer that is offline.
const TTL: Duration = Duration::from_secs(24 * 3600);

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .init();

    let keys = keyfile::load_identity(&args.key)?;
    let mut connect = ConnectConfig::new(args.server, Trust::CaFile(args.ca));
    connect.server_name = Some(args.server_name);
    let client = Client::connect(ClientOptions::primary(
        connect,
        keys.signing,
        keys.encryption,
    ))
    .await?;
    client
        .publish_card()
        .await
        .context("publishing this identity's card")?;
    eprintln!("chatting as {} with {}", client.address(), args.to);

    let mut lines = BufReader::new(tokio::io::stdin()).lines();
    loop {
        // Both futures are cancel-safe: a line or a message not yet taken
        // when the other branch wins stays buffered for the next turn.
        tokio::select! {
            line = lines.next_line() => {
                let Some(line) = line? else { break };
                match client.send(&[args.to], line.as_bytes(), TTL).await {
                    Ok(ack) if ack.failed.is_empty() => {}
                    Ok(_) => eprintln!("the broker refused to store the message for {}", args.to),
                    Err(error) => eprintln!("not sent: {error}"),
                }
            }
            message = client.next_message() => {
                let Some(message) = message else {
                    anyhow::bail!("the client stopped: {:?}", client.status())
                };
                let seq = match message {
                    Ok(message) => {
                        let text = String::from_utf8_lossy(&message.opened.plaintext);
                        println!("from {}: {text}", message.opened.sender);
                        message.delivery.seq
                    }
                    // An envelope that does not open never will; acking it
                    // stops the broker from pushing it again.
                    Err((delivery, error)) => {
                        eprintln!("rejected envelope seq {}: {error}", delivery.seq);
                        delivery.seq
                    }
                };
                client.ack(seq).await?;
            }
        }
    }
    // Acks are sent in the background; give the last one a moment to leave
    // before dropping the client closes the connection.
    tokio::time::sleep(Duration::from_millis(100)).await;
    Ok(())
}
