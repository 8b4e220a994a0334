//! `token create|get|delete`: small encrypted blobs shared by reference.

use std::path::Path;

use anyhow::Context;
use backbone_client::{TokenFetcher, TokenRef};
use serde::Serialize;

use super::args::{ServerArgs, TokenCommand};
use super::connect::{connect, connect_config};
use super::output::Output;

/// `token create --json` and `relationship template --json`: the reference
/// that fetches (and decrypts) what was published.
#[derive(Serialize)]
pub(crate) struct Published {
    pub(crate) reference: String,
    /// Whether fetching also needs the password.
    pub(crate) password_protected: bool,
}

/// `token get --json`. The content is in `text` and `content_hex`, or, with
/// `--out`, in the file `out` names (and both are null).
#[derive(Serialize)]
struct Fetched {
    size: usize,
    out: Option<String>,
    /// The content when it is UTF-8.
    text: Option<String>,
    content_hex: Option<String>,
}

/// `token delete --json` and `file delete --json`.
#[derive(Serialize)]
pub(crate) struct Deleted {
    pub(crate) reference: String,
    pub(crate) deleted: bool,
}

/// `token ...`.
pub(crate) async fn token(output: Output, command: TokenCommand) -> anyhow::Result<()> {
    match command {
        TokenCommand::Create(args) => {
            let content = match (&args.text, &args.file) {
                (Some(text), _) => text.clone().into_bytes(),
                (None, Some(path)) => {
                    std::fs::read(path).with_context(|| format!("reading {}", path.display()))?
                }
                (None, None) => unreachable!("clap requires --text or --file"),
            };
            let password = args.password.read()?;
            let client = connect(&args.server).await?;
            let reference = client
                .create_token(&content, args.ttl, password.as_deref())
                .await?;
            let published = Published {
                reference: reference.to_text(),
                password_protected: password.is_some(),
            };
            output.result(&published, || published.reference.clone())?;
            output.note(format_args!(
                "created a token{}; the line above fetches and decrypts it: share it only with \
                 whoever should read the content",
                if published.password_protected {
                    " (the password is needed too)"
                } else {
                    ""
                }
            ));
        }
        TokenCommand::Get(args) => {
            let reference = parse_reference(&args.reference)?;
            let password = args.password.read()?;
            let content = match &args.key {
                Some(key) => {
                    let server = ServerArgs {
                        connect: args.connect,
                        key: key.clone(),
                    };
                    let client = connect(&server).await?;
                    client.get_token(&reference, password.as_deref()).await?
                }
                None => {
                    let fetcher = TokenFetcher::connect(connect_config(&args.connect)?).await?;
                    let content = fetcher.get(&reference, password.as_deref()).await;
                    fetcher.close().await;
                    content?
                }
            };
            print_content(output, &content, args.out.as_deref())?;
        }
        TokenCommand::Delete { server, reference } => {
            let parsed = parse_reference(&reference)?;
            let client = connect(&server).await?;
            client.delete_token(&parsed.id).await?;
            let deleted = Deleted {
                reference,
                deleted: true,
            };
            output.result(&deleted, String::new)?;
            output.note("deleted the token");
        }
    }
    Ok(())
}

/// Writes a token's content to `out`, or prints it: as it is in text mode,
/// inside the JSON object with `--json`.
fn print_content(output: Output, content: &[u8], out: Option<&Path>) -> anyhow::Result<()> {
    if let Some(path) = out {
        std::fs::write(path, content).with_context(|| format!("writing {}", path.display()))?;
    }
    if output.is_json() {
        let inline = out.is_none();
        let fetched = Fetched {
            size: content.len(),
            out: out.map(|path| path.display().to_string()),
            text: inline
                .then(|| std::str::from_utf8(content).ok().map(str::to_owned))
                .flatten(),
            content_hex: inline.then(|| hex::encode(content)),
        };
        return output.result(&fetched, String::new);
    }
    if out.is_none() {
        use std::io::Write;
        let mut stdout = std::io::stdout().lock();
        stdout.write_all(content)?;
        stdout.flush()?;
    }
    Ok(())
}

/// A token reference from the command line; a parse error says what kind
/// of text was expected.
pub(crate) fn parse_reference(text: &str) -> anyhow::Result<TokenRef> {
    text.parse::<TokenRef>()
        .context("token reference (as `token create` printed it)")
}
