//! `backbone-connector`: `init` makes an identity and a config, `serve`
//! runs the Connector. `main` parses the command line, sets up logging and
//! hands over to the library.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context;
use backbone_client::keyfile::{self, IdentityKeys, KeyFile, SaveOptions};
use backbone_connector::Connector;
use backbone_connector::config::{self, Config};
use clap::{Parser, Subcommand};

/// An organisation's client of the Backbone: a REST API, a local database
/// and webhooks, so business systems exchange end-to-end encrypted
/// messages without touching keys or QUIC.
#[derive(Parser)]
#[command(version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Creates the identity's key file and a commented config with a new
    /// API key, printed once (only its hash is stored).
    Init {
        /// The data directory (database, key file).
        #[arg(long, default_value = "connector-data")]
        data_dir: PathBuf,
        /// Where to write the config.
        #[arg(long, default_value = "connector.toml")]
        config: PathBuf,
        /// The Backbone's host:port.
        #[arg(long)]
        server: Option<String>,
        /// A PEM file with the Backbone's certificate or CA.
        #[arg(long, conflicts_with = "fingerprint")]
        ca: Option<PathBuf>,
        /// The SHA-256 fingerprint of the Backbone's certificate.
        #[arg(long)]
        fingerprint: Option<String>,
    },
    /// Runs the Connector until SIGINT or SIGTERM.
    Serve {
        /// The config file; without one, the defaults and
        /// BACKBONE_CONNECTOR__* variables.
        #[arg(long, short, env = "BACKBONE_CONNECTOR_CONFIG")]
        config: Option<PathBuf>,
    },
    /// Prints the `api.api_keys` entry for an API key read from standard input.
    HashKey,
    /// Prints the OpenAPI document of the REST API.
    Openapi,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        // Colours only on a terminal, not in a container's or a service's log.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .init();
    let outcome = match cli.command {
        Command::Init {
            data_dir,
            config,
            server,
            ca,
            fingerprint,
        } => init(&data_dir, &config, server, ca, fingerprint),
        Command::Serve { config } => serve(config.as_deref()),
        Command::HashKey => hash_key(),
        Command::Openapi => backbone_connector::api::openapi_document()
            .to_pretty_json()
            .map(|json| println!("{json}"))
            .map_err(anyhow::Error::from),
    };
    match outcome {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("error: {error:#}");
            ExitCode::FAILURE
        }
    }
}

fn init(
    data_dir: &Path,
    config_path: &Path,
    server: Option<String>,
    ca: Option<PathBuf>,
    fingerprint: Option<String>,
) -> anyhow::Result<()> {
    if config_path.exists() {
        anyhow::bail!(
            "{} exists: init never overwrites a config",
            config_path.display()
        );
    }
    std::fs::create_dir_all(data_dir)
        .with_context(|| format!("creating {}", data_dir.display()))?;
    let keys = IdentityKeys::generate();
    let key_path = data_dir.join("identity.key");
    keyfile::save(
        &key_path,
        &KeyFile::Identity(keys.clone()),
        SaveOptions::default(),
    )
    .with_context(|| format!("saving the identity key to {}", key_path.display()))?;
    let api_key = format!("bbk_{}", hex::encode(rand::random::<[u8; 24]>()));
    let mut text = config::commented_template(&config::hash_key(&api_key), data_dir);
    let quote = |value: &str| toml::Value::String(value.to_owned()).to_string();
    if let Some(server) = server {
        text = text.replace(
            "server = \"127.0.0.1:7700\"",
            &format!("server = {}", quote(&server)),
        );
    }
    if let Some(ca) = ca {
        text = text.replace(
            "# ca = \"/etc/backbone/cert.pem\"",
            &format!("ca = {}", quote(&ca.display().to_string())),
        );
    }
    if let Some(fingerprint) = fingerprint {
        text = text.replace(
            "# fingerprint = \"...\"",
            &format!("fingerprint = {}", quote(&fingerprint)),
        );
    }
    std::fs::write(config_path, text)
        .with_context(|| format!("writing {}", config_path.display()))?;
    eprintln!(
        "identity {} (key in {}); config in {}",
        keys.address(),
        key_path.display(),
        config_path.display()
    );
    eprintln!("the API key (shown once; the config keeps only its hash):");
    println!("{api_key}");
    Ok(())
}

fn serve(config_path: Option<&Path>) -> anyhow::Result<()> {
    let config = Config::load(config_path, std::env::vars())?;
    let runtime = tokio::runtime::Runtime::new().context("starting the async runtime")?;
    runtime.block_on(async {
        let connector = Connector::start(config).await?;
        connector.run_until(shutdown_signal()).await;
        Ok(())
    })
}

/// SIGINT or SIGTERM.
async fn shutdown_signal() {
    let interrupt = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut terminate =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(signal) => signal,
                Err(error) => {
                    tracing::warn!(%error, "cannot listen for SIGTERM");
                    let _ = interrupt.await;
                    return;
                }
            };
        tokio::select! {
            _ = interrupt => {}
            _ = terminate.recv() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = interrupt.await;
}

fn hash_key() -> anyhow::Result<()> {
    let mut key = String::new();
    std::io::stdin()
        .read_line(&mut key)
        .context("reading the key from standard input")?;
    let key = key.trim();
    if key.is_empty() {
        anyhow::bail!("no key on standard input");
    }
    println!("{}", config::hash_key(key));
    Ok(())
}
