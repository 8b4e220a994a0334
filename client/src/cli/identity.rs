//! `keygen`, `address` and `delete-identity`: an identity's key file and
//! its end.

use std::path::Path;
use std::time::Duration;

use anyhow::Context;
use backbone_client::envelope::Padding;
use backbone_client::keyfile::{self, IdentityKeys, KeyFile, SaveOptions};
use backbone_protocol::Address;
use serde::Serialize;

use super::args::DeleteIdentityArgs;
use super::connect::connect_unpublished;
use super::output::Output;

/// `keygen --json`.
#[derive(Serialize)]
struct Generated {
    address: String,
    key_file: String,
}

/// `address --json`.
#[derive(Serialize)]
struct Shown {
    address: String,
}

/// `delete-identity --json`: when the broker deletes everything.
#[derive(Serialize)]
struct DeletionScheduled {
    address: String,
    purge_at: String,
    purge_at_ms: u64,
}

/// `delete-identity --cancel --json`.
#[derive(Serialize)]
struct DeletionCancelled {
    address: String,
    cancelled: bool,
}

/// `keygen`: a new identity key file, and its address.
pub(crate) fn keygen(output: Output, out: &Path, force: bool) -> anyhow::Result<()> {
    let keys = IdentityKeys::generate();
    let address = keys.address();
    keyfile::save(
        out,
        &KeyFile::Identity(keys),
        SaveOptions { overwrite: force },
    )?;
    let generated = Generated {
        address: address.to_string(),
        key_file: out.display().to_string(),
    };
    output.result(&generated, || generated.address.clone())
}

/// `address`: the address of an identity key file.
pub(crate) fn address(output: Output, key: &Path) -> anyhow::Result<()> {
    let shown = Shown {
        address: keyfile::load_identity(key)?.address().to_string(),
    };
    output.result(&shown, || shown.address.clone())
}

/// `delete-identity`: asks, then schedules the deletion (or cancels it).
pub(crate) async fn delete_identity(
    output: Output,
    args: DeleteIdentityArgs,
) -> anyhow::Result<()> {
    let address = keyfile::load_identity(&args.server.key)?.address();
    if args.cancel {
        let client = connect_unpublished(&args.server, Padding::default()).await?;
        client
            .cancel_deletion()
            .await
            .context("cancelling the deletion")?;
        let cancelled = DeletionCancelled {
            address: address.to_string(),
            cancelled: true,
        };
        output.result(&cancelled, String::new)?;
        output.note(format_args!("the deletion of {address} is cancelled"));
        return Ok(());
    }
    if !args.yes && !confirm_deletion(&address, &args.server.connect.server)? {
        anyhow::bail!("not confirmed: nothing was deleted");
    }
    let client = connect_unpublished(&args.server, Padding::default()).await?;
    let purge_at_ms = client.delete_identity().await?;
    let purge_at = std::time::UNIX_EPOCH + Duration::from_millis(purge_at_ms);
    let scheduled = DeletionScheduled {
        address: address.to_string(),
        purge_at: humantime::format_rfc3339_seconds(purge_at).to_string(),
        purge_at_ms,
    };
    output.result(&scheduled, || scheduled.purge_at.clone())?;
    output.note(format_args!(
        "{address} will be deleted at the time above, with everything the broker stores for \
         it; until then it works as before, and `delete-identity --cancel` takes it back"
    ));
    Ok(())
}

/// Asks on the terminal (standard error, standard input) before a deletion;
/// only `yes` confirms. Without an answer (standard input closed) nothing
/// is confirmed.
fn confirm_deletion(address: &Address, server: &str) -> anyhow::Result<bool> {
    use std::io::Write;
    let mut stderr = std::io::stderr().lock();
    write!(
        stderr,
        "Delete identity {address} from {server}? After the broker's grace period everything \
         it stores for this identity is deleted and the key can never connect again. \
         Type yes to confirm: "
    )?;
    stderr.flush()?;
    let mut answer = String::new();
    std::io::stdin()
        .read_line(&mut answer)
        .context("reading the confirmation")?;
    Ok(answer.trim().eq_ignore_ascii_case("yes"))
}
