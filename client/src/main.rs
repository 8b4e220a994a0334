//! `backbone-cli`: keys, sending and listening from a terminal.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use backbone_client::envelope::Padding;
use backbone_client::keyfile::{self, DeviceKeys, IdentityKeys, KeyFile, SaveOptions};
use backbone_client::{
    CapabilityHash, Client, ClientError, ClientOptions, ConnectConfig, Credentials,
    DeliveryCapability, Event, FileFetcher, FileRef, FileSource, SealedOptions, SealedSender,
    TokenFetcher, TokenRef, Trust,
};
use backbone_protocol::relationship::{Decision, InboundPolicy, Notice, Relationship, Role, State};
use backbone_protocol::{Address, DeviceId, ErrorCode};
use clap::{Args, Parser, Subcommand};

/// Command-line client for the Backbone broker: end-to-end encrypted messages
/// between identities, addressed by `bb1...` addresses.
#[derive(Parser)]
#[command(version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
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
}

#[derive(Subcommand)]
enum DeviceCommand {
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
enum FileCommand {
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
struct DeleteIdentityArgs {
    #[command(flatten)]
    server: ServerArgs,
    /// Cancel the scheduled deletion instead.
    #[arg(long)]
    cancel: bool,
    /// Do not ask for confirmation (for scripts).
    #[arg(long, conflicts_with = "cancel")]
    yes: bool,
}

#[derive(Subcommand)]
enum RelationshipCommand {
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
struct DecideArgs {
    #[command(flatten)]
    server: ServerArgs,
    /// The other identity's address.
    peer: String,
}

#[derive(Subcommand)]
enum TokenCommand {
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
struct TokenCreateArgs {
    #[command(flatten)]
    server: ServerArgs,
    /// The content, as text.
    #[arg(long, conflicts_with = "file", required_unless_present = "file")]
    text: Option<String>,
    /// The content, from this file.
    #[arg(long)]
    file: Option<PathBuf>,
    /// How long the broker keeps the token (capped by the broker's maximum).
    #[arg(long, default_value = "1day", value_parser = humantime::parse_duration)]
    ttl: Duration,
    #[command(flatten)]
    password: PasswordArgs,
}

#[derive(Args)]
struct TokenGetArgs {
    #[command(flatten)]
    connect: ConnectArgs,
    /// Fetch as this identity instead of anonymously.
    #[arg(long)]
    key: Option<PathBuf>,
    /// The token's reference (`bbt1:...`).
    reference: String,
    #[command(flatten)]
    password: PasswordArgs,
    /// Write the content to this file instead of standard output.
    #[arg(long)]
    out: Option<PathBuf>,
}

/// A token password, read from a file or an environment variable: never a
/// command-line argument, which other users of the machine can see.
#[derive(Args)]
struct PasswordArgs {
    /// Read the token's password from this file (one trailing newline is
    /// ignored).
    #[arg(long, conflicts_with = "password_env")]
    password_file: Option<PathBuf>,
    /// Read the token's password from this environment variable.
    #[arg(long)]
    password_env: Option<String>,
}

impl PasswordArgs {
    fn read(&self) -> anyhow::Result<Option<String>> {
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
enum CapabilityCommand {
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
struct ServerArgs {
    #[command(flatten)]
    connect: ConnectArgs,
    /// Your identity key file (`listen` also takes a device key file).
    #[arg(long)]
    key: PathBuf,
}

#[derive(Args)]
struct ConnectArgs {
    /// Broker address, host:port (UDP).
    #[arg(long, default_value = "127.0.0.1:7700")]
    server: String,
    /// Certificate to trust (the broker prints its path; default: the one a
    /// broker with default settings generates in ./backbone-data).
    #[arg(long, conflicts_with = "fingerprint")]
    ca: Option<PathBuf>,
    /// SHA-256 fingerprint of the broker's certificate (the broker prints it), instead of --ca.
    #[arg(long)]
    fingerprint: Option<String>,
    /// TLS server name to verify (default: the host of --server, or localhost for an IP).
    #[arg(long)]
    server_name: Option<String>,
}

#[derive(Args)]
struct SendArgs {
    #[command(flatten)]
    server: ServerArgs,
    /// Recipient address (repeat for several).
    #[arg(long = "to", required = true)]
    to: Vec<String>,
    /// How long the broker keeps the message.
    #[arg(long, default_value = "7days", value_parser = humantime::parse_duration)]
    ttl: Duration,
    /// The message text.
    #[arg(long, conflicts_with = "file", required_unless_present = "file")]
    message: Option<String>,
    /// Send this file's contents instead.
    #[arg(long)]
    file: Option<PathBuf>,
    /// Smallest padding bucket in bytes: the sealed envelope is padded to
    /// the next power of two at least this large, so the broker learns only
    /// a size bucket.
    #[arg(long, default_value_t = 256, conflicts_with = "no_padding")]
    pad_min: usize,
    /// Do not pad: the envelope's length reveals the message's.
    #[arg(long)]
    no_padding: bool,
    /// Send over an anonymous connection: the broker learns neither who
    /// sends nor stores a sender; the recipient still verifies it from the
    /// signature inside the envelope. Needs --capability and exactly one --to.
    #[arg(long, requires = "capability")]
    sealed: bool,
    /// The delivery capability (hex) the recipient gave you, for --sealed.
    #[arg(long, requires = "sealed")]
    capability: Option<String>,
}

#[derive(Args)]
struct ListenArgs {
    #[command(flatten)]
    server: ServerArgs,
    /// Exit after this many messages.
    #[arg(long)]
    count: Option<u64>,
    /// Exit after this long (with --count: fail if fewer arrived).
    #[arg(long, value_parser = humantime::parse_duration)]
    timeout: Option<Duration>,
    /// One JSON object per message instead of text.
    #[arg(long)]
    json: bool,
}

/// Exit codes, documented in `--help` of the README.
mod exit {
    pub const FAILURE: u8 = 1;
    pub const UNREACHABLE: u8 = 3;
    pub const CERTIFICATE: u8 = 4;
    pub const REFUSED: u8 = 5;
    pub const TIMEOUT: u8 = 6;
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .init();
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("error: cannot start the async runtime: {error}");
            return ExitCode::from(exit::FAILURE);
        }
    };
    let outcome = runtime.block_on(async {
        let outcome = run(cli.command).await;
        close_connections().await;
        outcome
    });
    match outcome {
        Ok(code) => code,
        Err(error) => {
            eprintln!("error: {error:#}");
            ExitCode::from(exit_code(&error))
        }
    }
}

/// The one UDP endpoint every connection of this run uses, so that
/// [`close_connections`] can close them all before the process exits.
static ENDPOINT: std::sync::OnceLock<quinn::Endpoint> = std::sync::OnceLock::new();

/// The run's endpoint, bound on first use for the address family of
/// `server`; `None` when `server` does not resolve (connecting reports that).
fn endpoint_for(server: &str) -> anyhow::Result<Option<quinn::Endpoint>> {
    if let Some(endpoint) = ENDPOINT.get() {
        return Ok(Some(endpoint.clone()));
    }
    let Some(addr) = std::net::ToSocketAddrs::to_socket_addrs(server)
        .ok()
        .and_then(|mut addrs| addrs.next())
    else {
        return Ok(None);
    };
    let bind: std::net::SocketAddr = if addr.is_ipv6() {
        (std::net::Ipv6Addr::UNSPECIFIED, 0).into()
    } else {
        (std::net::Ipv4Addr::UNSPECIFIED, 0).into()
    };
    let endpoint = quinn::Endpoint::client(bind).context("binding a UDP socket")?;
    Ok(Some(ENDPOINT.get_or_init(|| endpoint).clone()))
}

/// Closes this run's connections and waits, up to a second, until the
/// broker was told: a process that exits without this leaves its sessions
/// open on the broker until the broker's idle timeout.
async fn close_connections() {
    if let Some(endpoint) = ENDPOINT.get() {
        endpoint.close(quinn::VarInt::from_u32(0), b"bye");
        let _ = tokio::time::timeout(Duration::from_secs(1), endpoint.wait_idle()).await;
    }
}

fn exit_code(error: &anyhow::Error) -> u8 {
    match error.downcast_ref::<ClientError>() {
        Some(ClientError::Unreachable(_)) => exit::UNREACHABLE,
        Some(ClientError::CertificateMismatch(_)) => exit::CERTIFICATE,
        Some(ClientError::Timeout) => exit::TIMEOUT,
        Some(ClientError::Server { .. } | ClientError::Closed { .. }) => exit::REFUSED,
        Some(ClientError::Token(error)) if error.code().is_some() => exit::REFUSED,
        _ => exit::FAILURE,
    }
}

async fn run(command: Command) -> anyhow::Result<ExitCode> {
    match command {
        Command::Keygen { out, force } => {
            let keys = IdentityKeys::generate();
            let address = keys.address();
            keyfile::save(
                &out,
                &KeyFile::Identity(keys),
                SaveOptions { overwrite: force },
            )?;
            println!("{address}");
        }
        Command::Address { key } => println!("{}", keyfile::load_identity(&key)?.address()),
        Command::Send(args) => send(args).await?,
        Command::Listen(args) => return listen(args).await,
        Command::Device(command) => device(command).await?,
        Command::Capability(command) => capability(command).await?,
        Command::Token(command) => token(command).await?,
        Command::Relationship(command) => relationship(command).await?,
        Command::File(command) => file(command).await?,
        Command::DeleteIdentity(args) => delete_identity(args).await?,
    }
    Ok(ExitCode::SUCCESS)
}

async fn connect(args: &ServerArgs) -> anyhow::Result<Client> {
    connect_padded(args, Padding::default()).await
}

/// Where and how to reach the broker, from the flags.
fn connect_config(args: &ConnectArgs) -> anyhow::Result<ConnectConfig> {
    let trust = match (&args.fingerprint, &args.ca) {
        (Some(fingerprint), _) => Trust::Fingerprint(fingerprint.clone()),
        (None, Some(ca)) => Trust::CaFile(ca.clone()),
        (None, None) => {
            let default = PathBuf::from("./backbone-data/tls/cert.pem");
            if !default.exists() {
                anyhow::bail!(
                    "no --ca or --fingerprint given and {} does not exist",
                    default.display()
                );
            }
            Trust::CaFile(default)
        }
    };
    let mut connect = ConnectConfig::new(args.server.clone(), trust);
    connect.endpoint = endpoint_for(&args.server)?;
    connect.server_name = args.server_name.clone().or_else(|| {
        let host = args
            .server
            .rsplit_once(':')
            .map(|(h, _)| h)
            .unwrap_or(&args.server);
        host.trim_matches(['[', ']'])
            .parse::<std::net::IpAddr>()
            .is_ok()
            .then(|| "localhost".to_owned())
    });
    Ok(connect)
}

async fn connect_padded(args: &ServerArgs, padding: Padding) -> anyhow::Result<Client> {
    let client = connect_unpublished(args, padding).await?;
    client
        .publish_card()
        .await
        .context("publishing this identity's card")?;
    Ok(client)
}

/// Connects without publishing the identity's card.
async fn connect_unpublished(args: &ServerArgs, padding: Padding) -> anyhow::Result<Client> {
    let keys = keyfile::load_identity(&args.key)?;
    let connect = connect_config(&args.connect)?;
    let mut options =
        ClientOptions::primary(connect, keys.signing.clone(), keys.encryption.clone());
    options.credentials = Credentials::primary(&keys.signing);
    options.padding = padding;
    Ok(Client::connect(options).await?)
}

/// Connects with an identity key file, as [`connect`] does, or with a
/// device key file. A device cannot sign the identity's card, so it
/// publishes none; it can open envelopes sealed to the identity.
async fn connect_any(args: &ServerArgs) -> anyhow::Result<Client> {
    let keys = match keyfile::load(&args.key)? {
        KeyFile::Identity(_) => return connect(args).await,
        KeyFile::Device(keys) => keys,
    };
    let mut options = ClientOptions::primary(
        connect_config(&args.connect)?,
        keys.device.clone(),
        keys.encryption.clone(),
    );
    options.credentials = Credentials {
        identity_key: keys.identity_key,
        device: keys.device.clone(),
        certificate: Some(keys.certificate),
    };
    // Only the identity key signs messages and cards.
    options.identity = None;
    Ok(Client::connect(options).await?)
}

async fn device(command: DeviceCommand) -> anyhow::Result<()> {
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
            println!("{id}");
            eprintln!(
                "registered device {id}; copy {} to the device and run `backbone-cli listen --key` \
                 with it there. `device revoke` shuts it out if it is ever lost.",
                out.display()
            );
        }
        DeviceCommand::Revoke { server, device_id } => {
            let id: DeviceId = device_id
                .parse()
                .context("device id (as `device list` prints it)")?;
            let client = connect_unpublished(&server, Padding::default()).await?;
            client.unregister_device(&id).await?;
            eprintln!("revoked device {id}: its connections are closed and the broker refuses it");
        }
        DeviceCommand::List(server) => {
            let client = connect_unpublished(&server, Padding::default()).await?;
            for certificate in client.list_devices().await? {
                let issued =
                    std::time::UNIX_EPOCH + Duration::from_millis(certificate.issued_at_ms);
                println!(
                    "{} {}",
                    certificate.device_key.device_id(),
                    humantime::format_rfc3339_seconds(issued)
                );
            }
        }
    }
    Ok(())
}

async fn delete_identity(args: DeleteIdentityArgs) -> anyhow::Result<()> {
    let address = keyfile::load_identity(&args.server.key)?.address();
    if args.cancel {
        let client = connect_unpublished(&args.server, Padding::default()).await?;
        client
            .cancel_deletion()
            .await
            .context("cancelling the deletion")?;
        eprintln!("the deletion of {address} is cancelled");
        return Ok(());
    }
    if !args.yes && !confirm_deletion(&address, &args.server.connect.server)? {
        anyhow::bail!("not confirmed: nothing was deleted");
    }
    let client = connect_unpublished(&args.server, Padding::default()).await?;
    let purge_at_ms = client.delete_identity().await?;
    let purge_at = std::time::UNIX_EPOCH + Duration::from_millis(purge_at_ms);
    println!("{}", humantime::format_rfc3339_seconds(purge_at));
    eprintln!(
        "{address} will be deleted at the time above, with everything the broker stores for \
         it; until then it works as before, and `delete-identity --cancel` takes it back"
    );
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

async fn send(args: SendArgs) -> anyhow::Result<()> {
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
    for stored in &ack.stored {
        println!("delivered to {} (seq {})", stored.address, stored.seq);
    }
    for failed in &ack.failed {
        let name = ErrorCode::from_u16(failed.code)
            .map(ErrorCode::name)
            .unwrap_or("unknown");
        eprintln!("not delivered to {}: {name}", failed.address);
    }
    if !ack.failed.is_empty() {
        anyhow::bail!(
            "{} of {} recipients failed",
            ack.failed.len(),
            recipients.len()
        );
    }
    Ok(())
}

async fn capability(command: CapabilityCommand) -> anyhow::Result<()> {
    match command {
        CapabilityCommand::Create(server) => {
            let client = connect(&server).await?;
            let capability = DeliveryCapability::random();
            let hash = client.register_capability(&capability).await?;
            println!("{}", capability.to_hex());
            eprintln!(
                "registered capability {hash}; give the line above to one contact, \
                 inside an end-to-end encrypted message"
            );
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
            eprintln!("revoked capability {hash}");
        }
        CapabilityCommand::List(server) => {
            let client = connect(&server).await?;
            for hash in client.list_capabilities().await? {
                println!("{hash}");
            }
        }
    }
    Ok(())
}

async fn token(command: TokenCommand) -> anyhow::Result<()> {
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
            println!("{}", reference.to_text());
            eprintln!(
                "created a token{}; the line above fetches and decrypts it: share it only with \
                 whoever should read the content",
                if password.is_some() {
                    " (the password is needed too)"
                } else {
                    ""
                }
            );
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
            match &args.out {
                Some(path) => std::fs::write(path, &content)
                    .with_context(|| format!("writing {}", path.display()))?,
                None => {
                    use std::io::Write;
                    let mut stdout = std::io::stdout().lock();
                    stdout.write_all(&content)?;
                    stdout.flush()?;
                }
            }
        }
        TokenCommand::Delete { server, reference } => {
            let reference = parse_reference(&reference)?;
            let client = connect(&server).await?;
            client.delete_token(&reference.id).await?;
            eprintln!("deleted the token");
        }
    }
    Ok(())
}

async fn relationship(command: RelationshipCommand) -> anyhow::Result<()> {
    let decide = |args: DecideArgs, decision: Decision| async move {
        let peer: Address = args.peer.parse().context("the other identity's address")?;
        let client = connect(&args.server).await?;
        let record = client.decide_relationship(&peer, decision).await?;
        print_relationship(&record);
        anyhow::Ok(())
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
            println!("{}", reference.to_text());
            eprintln!(
                "published a relationship template: whoever holds the line above can ask you \
                 for a relationship (`relationship request`)"
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
            print_relationship(&record);
        }
        RelationshipCommand::Accept(args) => decide(args, Decision::Accept).await?,
        RelationshipCommand::Reject(args) => decide(args, Decision::Reject).await?,
        RelationshipCommand::Terminate(args) => decide(args, Decision::Terminate).await?,
        RelationshipCommand::List { server } => {
            let client = connect(&server).await?;
            let (policy, records) = client.relationships().await?;
            println!("policy {policy}");
            for record in &records {
                print_relationship(record);
            }
        }
        RelationshipCommand::Policy { server, policy } => {
            let client = connect(&server).await?;
            client.set_inbound_policy(policy).await?;
            eprintln!("inbound policy: {policy}");
        }
    }
    Ok(())
}

fn print_relationship(record: &Relationship) {
    print_relationship_to(&mut std::io::stdout(), record);
}

fn print_relationship_to(out: &mut impl std::io::Write, record: &Relationship) {
    let state = match record.state {
        State::Pending => "pending",
        State::Active => "active",
        State::Rejected => "rejected",
        State::Terminated => "terminated",
    };
    let role = match record.role {
        Role::Requester => "requester",
        Role::Owner => "owner",
    };
    let _ = writeln!(
        out,
        "{state} {role} {} {}",
        record.peer,
        hex::encode(record.id.0)
    );
}

async fn file(command: FileCommand) -> anyhow::Result<()> {
    let parse = |text: &str| {
        text.parse::<FileRef>()
            .context("file reference (as `file put` printed it)")
    };
    match command {
        FileCommand::Put {
            server,
            path,
            ttl,
            resume,
        } => {
            let source = FileSource::Path(path.clone());
            let resumed = resume.as_deref().map(parse).transpose()?;
            let client = connect(&server).await?;
            let reference = match resumed {
                Some(reference) => reference,
                None => {
                    let reference = client.announce_file(source.clone(), ttl).await?;
                    use std::io::Write;
                    let mut stdout = std::io::stdout().lock();
                    writeln!(stdout, "{}", reference.to_text())?;
                    stdout.flush()?;
                    reference
                }
            };
            if let Err(error) = client.resume_file_upload(&reference, source).await {
                let path = path.display();
                let context = match (&error, resumed) {
                    // The reference stays valid: the original content would
                    // still resume it.
                    (ClientError::SourceChanged, Some(_)) => format!(
                        "cannot resume: {path} is not what this reference was announced with; \
                         run `file put {path}` without --resume, which prints a new reference"
                    ),
                    (ClientError::SourceChanged, None) => {
                        // The reference printed above cannot be completed
                        // from the file as it is now: delete its file (best
                        // effort; it expires anyway) so it holds no quota.
                        let _ = client.delete_file(&reference.id).await;
                        format!(
                            "{path} changed during the upload; the reference printed is void \
                             and its file deleted: run `file put {path}` again"
                        )
                    }
                    _ => format!("uploading {path} (finish it with --resume and the reference)"),
                };
                return Err(anyhow::Error::new(error).context(context));
            }
            eprintln!(
                "uploaded {}; the reference downloads and decrypts it: share it only with \
                 whoever should read the file",
                path.display()
            );
        }
        FileCommand::Get {
            connect: connect_args,
            key,
            reference,
            out,
        } => {
            let reference = parse(&reference)?;
            let mut sink: Box<dyn tokio::io::AsyncWrite + Unpin> = match &out {
                Some(path) => Box::new(
                    tokio::fs::File::create(part_path(path))
                        .await
                        .with_context(|| format!("creating {}", part_path(path).display()))?,
                ),
                None => Box::new(tokio::io::stdout()),
            };
            match key {
                Some(key) => {
                    let server = ServerArgs {
                        connect: connect_args,
                        key,
                    };
                    let client = connect(&server).await?;
                    client.get_file(&reference, &mut sink).await?;
                }
                None => {
                    FileFetcher::new(connect_config(&connect_args)?)
                        .get(&reference, &mut sink)
                        .await?;
                }
            }
            drop(sink);
            if let Some(path) = &out {
                std::fs::rename(part_path(path), path)
                    .with_context(|| format!("renaming to {}", path.display()))?;
            }
        }
        FileCommand::Status { server, reference } => {
            let reference = parse(&reference)?;
            let client = connect(&server).await?;
            let state = client.file_status(&reference.id).await?;
            println!(
                "{} {} {}",
                state.received,
                state.size,
                if state.complete {
                    "complete"
                } else {
                    "incomplete"
                }
            );
        }
        FileCommand::Delete { server, reference } => {
            let reference = parse(&reference)?;
            let client = connect(&server).await?;
            client.delete_file(&reference.id).await?;
            eprintln!("deleted the file");
        }
    }
    Ok(())
}

/// Where `file get --out PATH` writes until the download is complete.
fn part_path(path: &std::path::Path) -> PathBuf {
    let mut name = path.as_os_str().to_owned();
    name.push(".part");
    PathBuf::from(name)
}

/// A token reference from the command line; a parse error says what kind
/// of text was expected.
fn parse_reference(text: &str) -> anyhow::Result<TokenRef> {
    text.parse::<TokenRef>()
        .context("token reference (as `token create` printed it)")
}

async fn listen(args: ListenArgs) -> anyhow::Result<ExitCode> {
    let client = connect_any(&args.server).await?;
    if !args.json {
        eprintln!("listening as {}", client.address());
    }
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
        match event {
            Event::Message(message) => {
                received += 1;
                print_message(&message, args.json);
                client.ack(message.delivery.seq).await?;
            }
            Event::Notice(delivery, Notice::Relationship { relationship, .. }) => {
                // Notices go to standard error: standard output stays the
                // messages (and their JSON lines).
                eprint!("relationship notice: ");
                print_relationship_to(&mut std::io::stderr(), &relationship);
                client.ack(delivery.seq).await?;
            }
            Event::Notice(delivery, Notice::IdentityDeleted { relationship }) => {
                eprint!("identity deleted, relationship ended: ");
                print_relationship_to(&mut std::io::stderr(), &relationship);
                client.ack(delivery.seq).await?;
            }
            Event::Unreadable(delivery, error) => {
                eprintln!("rejected envelope seq {}: {error}", delivery.seq);
                client.ack(delivery.seq).await?;
            }
        }
    }
    // Give the last ack a moment to leave before the connection closes.
    tokio::time::sleep(Duration::from_millis(100)).await;
    if let Some(count) = args.count
        && received < count
    {
        eprintln!("timed out after {received} of {count} messages");
        return Ok(ExitCode::from(exit::TIMEOUT));
    }
    Ok(ExitCode::SUCCESS)
}

fn print_message(message: &backbone_client::Message, json: bool) {
    let text = String::from_utf8_lossy(&message.opened.plaintext);
    if json {
        let value = serde_json::json!({
            "seq": message.delivery.seq,
            "message_id": hex::encode(message.delivery.message_id.as_bytes()),
            "sender": message.opened.sender.to_string(),
            "sent_at_ms": message.opened.sent_at_ms,
            "text": text,
        });
        println!("{value}");
    } else {
        println!("from {}: {text}", message.opened.sender);
    }
}
