//! `listen`: print each decrypted message (and notice) and acknowledge it.

use std::time::Duration;

use backbone_client::{Event, Message};
use backbone_protocol::relationship::Notice;
use serde::Serialize;

use super::args::ListenArgs;
use super::connect::connect_any;
use super::output::{ListenTimedOut, Output};
use super::relationship::RelationshipRecord;

/// One line of `listen --json`, told apart by `event`.
#[derive(Serialize)]
#[serde(tag = "event", rename_all = "snake_case")]
enum Line {
    /// A message, verified and decrypted.
    Message {
        seq: u64,
        message_id: String,
        sender: String,
        sent_at_ms: u64,
        /// The plaintext as UTF-8 (invalid sequences replaced).
        text: String,
    },
    /// A relationship changed (a request, an acceptance, an end).
    Relationship {
        seq: u64,
        relationship: RelationshipRecord,
    },
    /// A peer identity was deleted, which ended the relationship with it.
    IdentityDeleted {
        seq: u64,
        relationship: RelationshipRecord,
    },
    /// An envelope that could not be opened or verified.
    Unreadable { seq: u64, error: String },
}

/// `listen`: until `--count` messages arrived or `--timeout` passed.
pub(crate) async fn listen(output: Output, args: ListenArgs) -> anyhow::Result<()> {
    let client = connect_any(&args.server).await?;
    output.note(format_args!("listening as {}", client.address()));
    let deadline = args
        .timeout
        .map(|timeout| tokio::time::Instant::now() + timeout);
    let mut received = 0u64;
    while args.count.is_none_or(|count| received < count) {
        let next = client.next_event();
        let event = match deadline {
            Some(deadline) => match tokio::time::timeout_at(deadline, next).await {
                Ok(event) => event,
                Err(_) => break,
            },
            None => next.await,
        };
        let Some(event) = event else {
            // A broker that ended the session for good (the device was
            // revoked, the identity deleted) says why, with its code.
            client.wait_connected().await?;
            anyhow::bail!("connection to the broker ended")
        };
        let seq = match &event {
            Event::Message(message) => {
                received += 1;
                message.delivery.seq
            }
            Event::Notice(delivery, _) | Event::Unreadable(delivery, _) => delivery.seq,
        };
        print_event(output, event)?;
        client.ack(seq).await?;
    }
    // Give the last ack a moment to leave before the connection closes.
    tokio::time::sleep(Duration::from_millis(100)).await;
    if let Some(count) = args.count
        && received < count
    {
        return Err(ListenTimedOut { received, count }.into());
    }
    Ok(())
}

/// Prints one event: as a JSON line, or as text with the messages on
/// standard output and everything else on standard error, so that standard
/// output stays the messages alone.
fn print_event(output: Output, event: Event) -> anyhow::Result<()> {
    let (line, text) = match event {
        Event::Message(message) => return print_message(output, &message),
        Event::Notice(delivery, Notice::Relationship { relationship, .. }) => {
            let relationship = RelationshipRecord::from(&relationship);
            let text = format!("relationship notice: {}", relationship.text());
            let seq = delivery.seq;
            (Line::Relationship { seq, relationship }, text)
        }
        Event::Notice(delivery, Notice::IdentityDeleted { relationship }) => {
            let relationship = RelationshipRecord::from(&relationship);
            let text = format!(
                "identity deleted, relationship ended: {}",
                relationship.text()
            );
            let seq = delivery.seq;
            (Line::IdentityDeleted { seq, relationship }, text)
        }
        Event::Unreadable(delivery, error) => {
            let text = format!("rejected envelope seq {}: {error}", delivery.seq);
            let error = error.to_string();
            (
                Line::Unreadable {
                    seq: delivery.seq,
                    error,
                },
                text,
            )
        }
    };
    if output.is_json() {
        output.result(&line, String::new)
    } else {
        eprintln!("{text}");
        Ok(())
    }
}

fn print_message(output: Output, message: &Message) -> anyhow::Result<()> {
    let line = Line::Message {
        seq: message.delivery.seq,
        message_id: hex::encode(message.delivery.message_id.as_bytes()),
        sender: message.opened.sender.to_string(),
        sent_at_ms: message.opened.sent_at_ms,
        text: String::from_utf8_lossy(&message.opened.plaintext).into_owned(),
    };
    output.result(&line, || {
        format!(
            "from {}: {}",
            message.opened.sender,
            String::from_utf8_lossy(&message.opened.plaintext)
        )
    })
}
