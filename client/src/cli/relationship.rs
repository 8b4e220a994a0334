//! `relationship ...`: templates, requests, decisions, the list and the
//! inbound policy.

use anyhow::Context;
use backbone_protocol::Address;
use backbone_protocol::relationship::{Decision, Relationship, Role, State};
use serde::Serialize;

use super::args::{DecideArgs, RelationshipCommand};
use super::connect::connect;
use super::output::Output;
use super::token::{Published, parse_reference};

/// A relationship as this side sees it, in `--json` output (and, through
/// [`RelationshipRecord::text`], in text).
#[derive(Serialize)]
pub(crate) struct RelationshipRecord {
    /// The relationship's id, shared by both sides (hex).
    id: String,
    /// The other identity's address.
    peer: String,
    /// `owner` (of the template) or `requester`.
    role: &'static str,
    /// `pending`, `active`, `rejected` or `terminated`.
    state: &'static str,
    /// When it last changed, milliseconds since the Unix epoch.
    changed_at_ms: u64,
}

impl From<&Relationship> for RelationshipRecord {
    fn from(record: &Relationship) -> Self {
        Self {
            id: hex::encode(record.id.0),
            peer: record.peer.to_string(),
            role: match record.role {
                Role::Requester => "requester",
                Role::Owner => "owner",
            },
            state: match record.state {
                State::Pending => "pending",
                State::Active => "active",
                State::Rejected => "rejected",
                State::Terminated => "terminated",
            },
            changed_at_ms: record.changed_at_ms,
        }
    }
}

impl RelationshipRecord {
    /// One line: state, role, peer address, id.
    pub(crate) fn text(&self) -> String {
        format!("{} {} {} {}", self.state, self.role, self.peer, self.id)
    }
}

/// `relationship list --json`.
#[derive(Serialize)]
struct Listed {
    policy: String,
    relationships: Vec<RelationshipRecord>,
}

/// `relationship policy --json`.
#[derive(Serialize)]
struct PolicySet {
    policy: String,
}

/// `relationship ...`.
pub(crate) async fn relationship(
    output: Output,
    command: RelationshipCommand,
) -> anyhow::Result<()> {
    let print = |record: &Relationship| {
        let record = RelationshipRecord::from(record);
        output.result(&record, || record.text())
    };
    let decide = |args: DecideArgs, decision: Decision| async move {
        let peer: Address = args.peer.parse().context("the other identity's address")?;
        let client = connect(&args.server).await?;
        let record = client.decide_relationship(&peer, decision).await?;
        print(&record)
    };
    match command {
        RelationshipCommand::Template {
            server,
            ttl,
            password,
        } => {
            let password = password.read()?;
            let client = connect(&server).await?;
            let (reference, _) = client
                .create_relationship_template(ttl, password.as_deref())
                .await?;
            let published = Published {
                reference: reference.to_text(),
                password_protected: password.is_some(),
            };
            output.result(&published, || published.reference.clone())?;
            output.note(
                "published a relationship template: whoever holds the line above can ask you \
                 for a relationship (`relationship request`)",
            );
        }
        RelationshipCommand::Request {
            server,
            reference,
            message,
            password,
        } => {
            let reference = parse_reference(&reference)?;
            let password = password.read()?;
            let client = connect(&server).await?;
            let record = client
                .request_relationship_with_template(
                    &reference,
                    password.as_deref(),
                    message.as_bytes(),
                )
                .await?;
            print(&record)?;
        }
        RelationshipCommand::Accept(args) => decide(args, Decision::Accept).await?,
        RelationshipCommand::Reject(args) => decide(args, Decision::Reject).await?,
        RelationshipCommand::Terminate(args) => decide(args, Decision::Terminate).await?,
        RelationshipCommand::List { server } => {
            let client = connect(&server).await?;
            let (policy, records) = client.relationships().await?;
            let listed = Listed {
                policy: policy.to_string(),
                relationships: records.iter().map(RelationshipRecord::from).collect(),
            };
            output.result(&listed, || {
                std::iter::once(format!("policy {}", listed.policy))
                    .chain(listed.relationships.iter().map(RelationshipRecord::text))
                    .collect::<Vec<_>>()
                    .join("\n")
            })?;
        }
        RelationshipCommand::Policy { server, policy } => {
            let client = connect(&server).await?;
            client.set_inbound_policy(policy).await?;
            output.result(
                &PolicySet {
                    policy: policy.to_string(),
                },
                String::new,
            )?;
            output.note(format_args!("inbound policy: {policy}"));
        }
    }
    Ok(())
}
