//! The command line: every subcommand, flag and its `--help` text.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use backbone_protocol::relationship::InboundPolicy;
use clap::{Args, Parser, Subcommand};

/// Command-line client for the Backbone broker: end-to-end encrypted messages
/// between identities, addressed by `bb1...` addresses.
#[derive(Parser)]
#[command(name = "backbone-cli", version, about, long_about = None)]
pub(crate) struct Cli {
    /// Print results as JSON for scripts: one object per line on standard
    /// output, with the field names docs/operations.md lists. An error is
    /// one JSON object on standard error (`error`, `message`, `code`), and
    /// the exit code stays what it is without --json.
    #[arg(long, global = true)]
    pub(crate) json: bool,
    #[command(subcommand)]
    pub(crate) command: Command,
}

#[derive(Subcommand)]
pub(crate) enum Command {
    /// Create a new identity key file and print its address.
    Keygen {
        /// Where to write the key file (created with mode 0600).
        #[arg(long)]
        out: PathBuf,
        /// Replace an existing file.
        #[arg(long)]
        force: bool,
    },
    /// Print the address of a key file.
    Address {
        /// The key file.
        #[arg(long)]
        key: PathBuf,
    },
    /// Encrypt a message to one or more addresses and send it.
    Send(SendArgs),
    /// Receive messages: prints each decrypted message and acknowledges it.
    /// Works with the identity key file or a device key file (`device add`).
    /// With --json, one JSON object per line for each message and notice.
    Listen(ListenArgs),
    /// Devices: give another computer or phone a key of its own to receive
    /// your messages with, so the identity key file can stay on one safe
    /// machine; list your devices; revoke a lost or stolen one. Every
    /// device command needs the identity key file.
    #[command(subcommand)]
    Device(DeviceCommand),
    /// Delivery capabilities: let a contact send to you without the broker
    /// learning who sends (see `send --sealed`).
    #[command(subcommand)]
    Capability(CapabilityCommand),
    /// Tokens: share a small encrypted blob (a note, a file) through a side
    /// channel such as a QR code. Whoever holds the printed reference can
    /// fetch it, without an identity, until it expires or you delete it.
    #[command(subcommand)]
    Token(TokenCommand),
    /// Relationships: publish a template, ask its owner, accept, reject or
    /// end relationships, and choose who may send to you.
    #[command(subcommand)]
    Relationship(RelationshipCommand),
    /// Files: upload a large file encrypted (resumable), download it with
    /// the reference the upload printed, delete it.
    #[command(subcommand)]
    File(FileCommand),
    /// Delete your identity from the broker. After the broker's grace
    /// period (the time printed), everything it stores for the identity is
    /// deleted (messages, devices, card, capabilities, tokens, files,
    /// relationships), peers you have a relationship with are told, and the
    /// key can never connect again. Until then the identity works as before
    /// and `--cancel` takes the deletion back.
    DeleteIdentity(DeleteIdentityArgs),
    /// Print a shell completion script on standard output. For bash:
    /// `backbone-cli completions bash > ~/.local/share/bash-completion/completions/backbone-cli`;
    /// zsh: write `_backbone-cli` into a directory of your `$fpath`; fish:
    /// `~/.config/fish/completions/backbone-cli.fish`.
    Completions {
        /// The shell to complete in.
        shell: clap_complete::Shell,
    },
    /// Write a man page for backbone-cli and one for each of its
    /// subcommands (`backbone-cli-token-create.1`, ...) into a directory,
    /// for example `/usr/local/share/man/man1`.
    Man {
        /// The directory to write the pages into (created if missing).
        #[arg(long)]
        out: PathBuf,
    },
}

#[derive(Subcommand)]
pub(crate) enum DeviceCommand {
    /// Create keys for a new device, certify them with your identity key,
    /// register the device with the broker, and print its device id. The
    /// device key file (written with mode 0600) holds the device's own key
    /// and your identity's decryption key: copy it to the device and use it
    /// there with `listen --key`. If the device is lost or stolen, `device
    /// revoke` shuts it out.
    Add {
        #[command(flatten)]
        server: ServerArgs,
        /// Where to write the new device's key file.
        #[arg(long)]
        out: PathBuf,
        /// Replace an existing file at --out.
        #[arg(long)]
        force: bool,
    },
    /// Unregister a device, for example a lost or stolen one: the broker
    /// closes its connections at once and refuses its key from then on.
    /// Messages it already received stay readable to whoever holds it.
    Revoke {
        #[command(flatten)]
        server: ServerArgs,
        /// The device's id (64 hex characters), as `device add` and `device
        /// list` print it.
        device_id: String,
    },
    /// Print your registered devices, one per line: the device id, then when
    /// your identity key certified it.
    List(ServerArgs),
}

#[derive(Subcommand)]
pub(crate) enum FileCommand {
    /// Encrypt a file, upload it and print its reference (`bbf1:...`) on
    /// standard output as soon as the broker has recorded it, before the
    /// upload. The reference holds the key: share it only with whoever
    /// should read the file (in a message). If the upload is interrupted,
    /// `file put PATH --resume REFERENCE` finishes it.
    Put {
        #[command(flatten)]
        server: ServerArgs,
        /// The file to upload.
        path: PathBuf,
        /// How long the broker keeps the file (capped by the broker's maximum).
        #[arg(long, default_value = "7days", value_parser = humantime::parse_duration)]
        ttl: Duration,
        /// Finish the interrupted upload of this reference from the same,
        /// unchanged PATH. A PATH that changed since is refused (exit code
        /// 1): upload it anew without --resume.
        #[arg(long)]
        resume: Option<String>,
    },
    /// Download and decrypt a file. Needs no key file: without --key the
    /// connection is anonymous.
    Get {
        #[command(flatten)]
        connect: ConnectArgs,
        /// Download as this identity instead of anonymously.
        #[arg(long)]
        key: Option<PathBuf>,
        /// The file's reference (`bbf1:...`).
        reference: String,
        /// Write the file here (through `OUT.part`, renamed once complete)
        /// instead of standard output.
        #[arg(long)]
        out: Option<PathBuf>,
    },
    /// Print how much of a file you created the broker holds:
    /// `received size complete|incomplete`.
    Status {
        #[command(flatten)]
        server: ServerArgs,
        /// The file's reference.
        reference: String,
    },
    /// Delete a file you created.
    Delete {
        #[command(flatten)]
        server: ServerArgs,
        /// The file's reference.
        reference: String,
    },
}

#[derive(Args)]
pub(crate) struct DeleteIdentityArgs {
    #[command(flatten)]
    pub(crate) server: ServerArgs,
    /// Cancel the scheduled deletion instead.
    #[arg(long)]
    pub(crate) cancel: bool,
    /// Do not ask for confirmation (for scripts).
    #[arg(long, conflicts_with = "cancel")]
    pub(crate) yes: bool,
}

#[derive(Subcommand)]
pub(crate) enum RelationshipCommand {
    /// Publish a relationship template and print its token reference: share
    /// it (a QR code, a link); whoever holds it can ask you for a
    /// relationship until it expires.
    Template {
        #[command(flatten)]
        server: ServerArgs,
        /// How long the template's token lives (capped by the broker's maximum).
        #[arg(long, default_value = "7days", value_parser = humantime::parse_duration)]
        ttl: Duration,
        #[command(flatten)]
        password: PasswordArgs,
    },
    /// Ask the owner of a template for a relationship.
    Request {
        #[command(flatten)]
        server: ServerArgs,
        /// The template's reference (`bbt1:...`).
        reference: String,
        /// An introduction, encrypted to the owner.
        #[arg(long, default_value = "")]
        message: String,
        #[command(flatten)]
        password: PasswordArgs,
    },
    /// Accept a pending request from ADDRESS.
    Accept(DecideArgs),
    /// Reject a pending request from ADDRESS.
    Reject(DecideArgs),
    /// End the relationship with ADDRESS (or withdraw your pending request).
    Terminate(DecideArgs),
    /// Print your inbound policy and every relationship, one per line:
    /// state, role, peer address, id.
    List {
        #[command(flatten)]
        server: ServerArgs,
    },
    /// Choose who may send to you: `anyone`, or `relationships-only`
    /// (identities with an active relationship, and sealed sends presenting
    /// a capability you registered).
    Policy {
        #[command(flatten)]
        server: ServerArgs,
        /// `anyone` or `relationships-only`.
        policy: InboundPolicy,
    },
}

#[derive(Args)]
pub(crate) struct DecideArgs {
    #[command(flatten)]
    pub(crate) server: ServerArgs,
    /// The other identity's address.
    pub(crate) peer: String,
}

#[derive(Subcommand)]
pub(crate) enum TokenCommand {
    /// Encrypt a text or file, store it as a token and print its reference
    /// (`bbt1:...`). The reference holds the decryption key: share it only
    /// with whoever should read the content.
    Create(TokenCreateArgs),
    /// Fetch and decrypt a token. Needs no key file: without --key the
    /// connection is anonymous.
    Get(TokenGetArgs),
    /// Delete a token you created.
    Delete {
        #[command(flatten)]
        server: ServerArgs,
        /// The token's reference, as `token create` printed it.
        reference: String,
    },
}

#[derive(Args)]
pub(crate) struct TokenCreateArgs {
    #[command(flatten)]
    pub(crate) server: ServerArgs,
    /// The content, as text.
    #[arg(long, conflicts_with = "file", required_unless_present = "file")]
    pub(crate) text: Option<String>,
    /// The content, from this file.
    #[arg(long)]
    pub(crate) file: Option<PathBuf>,
    /// How long the broker keeps the token (capped by the broker's maximum).
    #[arg(long, default_value = "1day", value_parser = humantime::parse_duration)]
    pub(crate) ttl: Duration,
    #[command(flatten)]
    pub(crate) password: PasswordArgs,
}

#[derive(Args)]
pub(crate) struct TokenGetArgs {
    #[command(flatten)]
    pub(crate) connect: ConnectArgs,
    /// Fetch as this identity instead of anonymously.
    #[arg(long)]
    pub(crate) key: Option<PathBuf>,
    /// The token's reference (`bbt1:...`).
    pub(crate) reference: String,
    #[command(flatten)]
    pub(crate) password: PasswordArgs,
    /// Write the content to this file instead of standard output.
    #[arg(long)]
    pub(crate) out: Option<PathBuf>,
}

/// A token password, read from a file or an environment variable: never a
/// command-line argument, which other users of the machine can see.
#[derive(Args)]
pub(crate) struct PasswordArgs {
    /// Read the token's password from this file (one trailing newline is
    /// ignored).
    #[arg(long, conflicts_with = "password_env")]
    pub(crate) password_file: Option<PathBuf>,
    /// Read the token's password from this environment variable.
    #[arg(long)]
    pub(crate) password_env: Option<String>,
}

impl PasswordArgs {
    pub(crate) fn read(&self) -> anyhow::Result<Option<String>> {
        let password = match (&self.password_file, &self.password_env) {
            (Some(path), _) => {
                let text = std::fs::read_to_string(path)
                    .with_context(|| format!("reading the password from {}", path.display()))?;
                let text = text.strip_suffix('\n').unwrap_or(&text);
                text.strip_suffix('\r').unwrap_or(text).to_owned()
            }
            (None, Some(name)) => {
                std::env::var(name).with_context(|| format!("reading the password from ${name}"))?
            }
            (None, None) => return Ok(None),
        };
        if password.is_empty() {
            anyhow::bail!("the token password is empty");
        }
        Ok(Some(password))
    }
}

#[derive(Subcommand)]
pub(crate) enum CapabilityCommand {
    /// Create a capability, register its hash with your mailbox and print
    /// the capability (hex) once. Give it to exactly one contact, inside an
    /// end-to-end encrypted message; the broker only ever sees its hash.
    Create(ServerArgs),
    /// Revoke a capability: sealed sends presenting it are refused from now on.
    Revoke {
        #[command(flatten)]
        server: ServerArgs,
        /// The capability's hash as `capability list` prints it (or, with
        /// --secret, the capability itself).
        hash: String,
        /// The argument is the capability itself, not its hash.
        #[arg(long)]
        secret: bool,
    },
    /// Print the hashes of your registered capabilities, one per line.
    List(ServerArgs),
}

#[derive(Args)]
pub(crate) struct ServerArgs {
    #[command(flatten)]
    pub(crate) connect: ConnectArgs,
    /// Your identity key file (`listen` also takes a device key file).
    #[arg(long)]
    pub(crate) key: PathBuf,
}

#[derive(Args)]
pub(crate) struct ConnectArgs {
    /// Broker address, host:port (UDP).
    #[arg(long, default_value = "127.0.0.1:7700")]
    pub(crate) server: String,
    /// Certificate to trust (the broker prints its path; default: the one a
    /// broker with default settings generates in ./backbone-data).
    #[arg(long, conflicts_with = "fingerprint")]
    pub(crate) ca: Option<PathBuf>,
    /// SHA-256 fingerprint of the broker's certificate (the broker prints it), instead of --ca.
    #[arg(long)]
    pub(crate) fingerprint: Option<String>,
    /// TLS server name to verify (default: the host of --server, or localhost for an IP).
    #[arg(long)]
    pub(crate) server_name: Option<String>,
}

#[derive(Args)]
pub(crate) struct SendArgs {
    #[command(flatten)]
    pub(crate) server: ServerArgs,
    /// Recipient address (repeat for several).
    #[arg(long = "to", required = true)]
    pub(crate) to: Vec<String>,
    /// How long the broker keeps the message.
    #[arg(long, default_value = "7days", value_parser = humantime::parse_duration)]
    pub(crate) ttl: Duration,
    /// The message text.
    #[arg(long, conflicts_with = "file", required_unless_present = "file")]
    pub(crate) message: Option<String>,
    /// Send this file's contents instead.
    #[arg(long)]
    pub(crate) file: Option<PathBuf>,
    /// Smallest padding bucket in bytes: the sealed envelope is padded to
    /// the next power of two at least this large, so the broker learns only
    /// a size bucket.
    #[arg(long, default_value_t = 256, conflicts_with = "no_padding")]
    pub(crate) pad_min: usize,
    /// Do not pad: the envelope's length reveals the message's.
    #[arg(long)]
    pub(crate) no_padding: bool,
    /// Send over an anonymous connection: the broker learns neither who
    /// sends nor stores a sender; the recipient still verifies it from the
    /// signature inside the envelope. Needs --capability and exactly one --to.
    #[arg(long, requires = "capability")]
    pub(crate) sealed: bool,
    /// The delivery capability (hex) the recipient gave you, for --sealed.
    #[arg(long, requires = "sealed")]
    pub(crate) capability: Option<String>,
}

#[derive(Args)]
pub(crate) struct ListenArgs {
    #[command(flatten)]
    pub(crate) server: ServerArgs,
    /// Exit after this many messages.
    #[arg(long)]
    pub(crate) count: Option<u64>,
    /// Exit after this long (with --count: fail if fewer arrived).
    #[arg(long, value_parser = humantime::parse_duration)]
    pub(crate) timeout: Option<Duration>,
}
