//! `device add|revoke|list`: keys of their own for an identity's other
//! computers and phones.

use std::time::Duration;

use anyhow::Context;
use backbone_client::envelope::Padding;
use backbone_client::keyfile::{self, DeviceKeys, KeyFile, SaveOptions};
use backbone_protocol::DeviceId;
use serde::Serialize;

use super::args::DeviceCommand;
use super::connect::connect_unpublished;
use super::output::Output;

/// `device add --json`.
#[derive(Serialize)]
struct Added {
    device_id: String,
    key_file: String,
}

/// `device revoke --json`.
#[derive(Serialize)]
struct Revoked {
    device_id: String,
    revoked: bool,
}

/// `device list --json`.
#[derive(Serialize)]
struct Listed {
    devices: Vec<Device>,
}

/// One registered device.
#[derive(Serialize)]
struct Device {
    device_id: String,
    /// When the identity key certified it (RFC 3339, UTC).
    issued_at: String,
    issued_at_ms: u64,
}

/// `device ...`.
pub(crate) async fn device(output: Output, command: DeviceCommand) -> anyhow::Result<()> {
    match command {
        DeviceCommand::Add { server, out, force } => {
            let identity = keyfile::load_identity(&server.key)?;
            let keys = DeviceKeys::issue(&identity, backbone_protocol::unix_millis_now());
            let (id, certificate) = (keys.device.public().device_id(), keys.certificate);
            // Written first, so a device is never registered whose key
            // could not be kept; removed again if the broker refuses it.
            keyfile::save(
                &out,
                &KeyFile::Device(keys),
                SaveOptions { overwrite: force },
            )?;
            let registered = async {
                let client = connect_unpublished(&server, Padding::default()).await?;
                client.register_device(certificate).await?;
                anyhow::Ok(())
            }
            .await;
            if let Err(error) = registered {
                let _ = std::fs::remove_file(&out);
                return Err(error.context(format!(
                    "registering the device (nothing was kept: {} was removed)",
                    out.display()
                )));
            }
            let added = Added {
                device_id: id.to_string(),
                key_file: out.display().to_string(),
            };
            output.result(&added, || added.device_id.clone())?;
            output.note(format_args!(
                "registered device {id}; copy {} to the device and run `backbone-cli listen --key` \
                 with it there. `device revoke` shuts it out if it is ever lost.",
                out.display()
            ));
        }
        DeviceCommand::Revoke { server, device_id } => {
            let id: DeviceId = device_id
                .parse()
                .context("device id (as `device list` prints it)")?;
            let client = connect_unpublished(&server, Padding::default()).await?;
            client.unregister_device(&id).await?;
            let revoked = Revoked {
                device_id: id.to_string(),
                revoked: true,
            };
            output.result(&revoked, String::new)?;
            output.note(format_args!(
                "revoked device {id}: its connections are closed and the broker refuses it"
            ));
        }
        DeviceCommand::List(server) => {
            let client = connect_unpublished(&server, Padding::default()).await?;
            let devices = client
                .list_devices()
                .await?
                .into_iter()
                .map(|certificate| {
                    let issued =
                        std::time::UNIX_EPOCH + Duration::from_millis(certificate.issued_at_ms);
                    Device {
                        device_id: certificate.device_key.device_id().to_string(),
                        issued_at: humantime::format_rfc3339_seconds(issued).to_string(),
                        issued_at_ms: certificate.issued_at_ms,
                    }
                })
                .collect();
            let listed = Listed { devices };
            output.result(&listed, || {
                listed
                    .devices
                    .iter()
                    .map(|device| format!("{} {}", device.device_id, device.issued_at))
                    .collect::<Vec<_>>()
                    .join("\n")
            })?;
        }
    }
    Ok(())
}
