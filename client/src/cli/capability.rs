//! `capability create|revoke|list`: delivery capabilities for sealed sends.

use anyhow::Context;
use backbone_client::{CapabilityHash, DeliveryCapability};
use serde::Serialize;

use super::args::CapabilityCommand;
use super::connect::connect;
use super::output::Output;

/// `capability create --json`: the capability to give one contact, and the
/// hash the broker knows it by.
#[derive(Serialize)]
struct Created {
    capability: String,
    hash: String,
}

/// `capability revoke --json`.
#[derive(Serialize)]
struct Revoked {
    hash: String,
    revoked: bool,
}

/// `capability list --json`.
#[derive(Serialize)]
struct Listed {
    capabilities: Vec<Registered>,
}

/// One registered capability, known to the broker only by its hash.
#[derive(Serialize)]
struct Registered {
    hash: String,
}

/// `capability ...`.
pub(crate) async fn capability(output: Output, command: CapabilityCommand) -> anyhow::Result<()> {
    match command {
        CapabilityCommand::Create(server) => {
            let client = connect(&server).await?;
            let capability = DeliveryCapability::random();
            let hash = client.register_capability(&capability).await?;
            let created = Created {
                capability: capability.to_hex(),
                hash: hash.to_string(),
            };
            output.result(&created, || created.capability.clone())?;
            output.note(format_args!(
                "registered capability {hash}; give the line above to one contact, \
                 inside an end-to-end encrypted message"
            ));
        }
        CapabilityCommand::Revoke {
            server,
            hash,
            secret,
        } => {
            let hash = if secret {
                DeliveryCapability::from_hex(&hash)
                    .context("capability")?
                    .hash()
            } else {
                hash.parse::<CapabilityHash>().context("capability hash")?
            };
            let client = connect(&server).await?;
            client.revoke_capability(&hash).await?;
            let revoked = Revoked {
                hash: hash.to_string(),
                revoked: true,
            };
            output.result(&revoked, String::new)?;
            output.note(format_args!("revoked capability {hash}"));
        }
        CapabilityCommand::List(server) => {
            let client = connect(&server).await?;
            let capabilities = client
                .list_capabilities()
                .await?
                .iter()
                .map(|hash| Registered {
                    hash: hash.to_string(),
                })
                .collect();
            let listed = Listed { capabilities };
            output.result(&listed, || {
                listed
                    .capabilities
                    .iter()
                    .map(|registered| registered.hash.clone())
                    .collect::<Vec<_>>()
                    .join("\n")
            })?;
        }
    }
    Ok(())
}
