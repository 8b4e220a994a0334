//! `send`: encrypt a message to one or more addresses, over an
//! authenticated connection or, with `--sealed`, an anonymous one.

use anyhow::Context;
use backbone_client::envelope::Padding;
use backbone_client::keyfile;
use backbone_client::{DeliveryCapability, SealedOptions, SealedSender};
use backbone_protocol::{Address, ErrorCode};
use serde::Serialize;

use super::args::SendArgs;
use super::connect::{connect_config, connect_padded};
use super::output::Output;

/// `send --json`: the broker's id for the message and where it went.
#[derive(Serialize)]
struct Sent {
    message_id: String,
    delivered: Vec<Delivered>,
    failed: Vec<NotDelivered>,
}

/// A recipient whose mailbox holds the message durably.
#[derive(Serialize)]
struct Delivered {
    address: String,
    seq: u64,
}

/// A recipient the message was not stored for.
#[derive(Serialize)]
struct NotDelivered {
    address: String,
    /// The broker's error code name (`QuotaExceeded`, ...).
    error: &'static str,
    retry_after_ms: Option<u32>,
}

/// `send`: fails (exit code 1) when any recipient was not delivered to.
pub(crate) async fn send(output: Output, args: SendArgs) -> anyhow::Result<()> {
    let recipients = args
        .to
        .iter()
        .map(|text| {
            text.parse::<Address>()
                .with_context(|| format!("recipient {text:?}"))
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    let body = match (&args.message, &args.file) {
        (Some(message), _) => message.clone().into_bytes(),
        (None, Some(path)) => {
            std::fs::read(path).with_context(|| format!("reading {}", path.display()))?
        }
        (None, None) => unreachable!("clap requires --message or --file"),
    };
    let padding = if args.no_padding {
        Padding::None
    } else {
        Padding::PowersOfTwo { min: args.pad_min }
    };
    let ack = match &args.capability {
        Some(capability) => {
            let [recipient] = recipients[..] else {
                anyhow::bail!("--sealed sends to exactly one --to");
            };
            let capability = DeliveryCapability::from_hex(capability).context("--capability")?;
            let keys = keyfile::load_identity(&args.server.key)?;
            let mut options = SealedOptions::new(keys.signing.clone());
            options.padding = padding;
            let sender =
                SealedSender::connect(connect_config(&args.server.connect)?, options).await?;
            let ack = sender
                .send_sealed(&recipient, &capability, &body, args.ttl)
                .await?;
            sender.close().await;
            ack
        }
        None => {
            let client = connect_padded(&args.server, padding).await?;
            client.send(&recipients, &body, args.ttl).await?
        }
    };
    let sent = Sent {
        message_id: hex::encode(ack.message_id.as_bytes()),
        delivered: ack
            .stored
            .iter()
            .map(|stored| Delivered {
                address: stored.address.to_string(),
                seq: stored.seq,
            })
            .collect(),
        failed: ack
            .failed
            .iter()
            .map(|failed| NotDelivered {
                address: failed.address.to_string(),
                error: ErrorCode::from_u16(failed.code)
                    .map(ErrorCode::name)
                    .unwrap_or("unknown"),
                retry_after_ms: failed.retry_after_ms,
            })
            .collect(),
    };
    output.result(&sent, || {
        sent.delivered
            .iter()
            .map(|to| format!("delivered to {} (seq {})", to.address, to.seq))
            .collect::<Vec<_>>()
            .join("\n")
    })?;
    for failed in &sent.failed {
        output.note(format_args!(
            "not delivered to {}: {}",
            failed.address, failed.error
        ));
    }
    if !sent.failed.is_empty() {
        anyhow::bail!(
            "{} of {} recipients failed",
            sent.failed.len(),
            recipients.len()
        );
    }
    Ok(())
}
