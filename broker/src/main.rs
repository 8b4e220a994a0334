//! `backbone`: the broker binary.

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::Context;
use backbone_broker::{Broker, Config, StartOptions};
use clap::{Parser, Subcommand};

/// Backbone: a zero-knowledge message broker.
#[derive(Parser)]
#[command(version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the broker. With no flags it uses embedded defaults: data in
    /// ./backbone-data, QUIC on 127.0.0.1:7700, metrics on 127.0.0.1:9700.
    Serve(ServeArgs),
}

#[derive(clap::Args)]
struct ServeArgs {
    /// Config file (see config/backbone.toml for every key).
    #[arg(long, env = "BACKBONE_CONFIG")]
    config: Option<PathBuf>,
    /// Data directory (overrides server.data_dir).
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// QUIC listen address, UDP (overrides server.listen).
    #[arg(long)]
    listen: Option<SocketAddr>,
    /// Metrics and health listen address, TCP (overrides metrics.listen).
    #[arg(long)]
    metrics_listen: Option<SocketAddr>,
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .init();
    let Command::Serve(args) = cli.command;
    let mut config = Config::load(args.config.as_deref(), std::env::vars())?;
    if let Some(dir) = args.data_dir {
        config.server.data_dir = dir;
    }
    if let Some(listen) = args.listen {
        config.server.listen = listen;
    }
    if let Some(listen) = args.metrics_listen {
        config.metrics.listen = Some(listen);
    }
    config.validate()?;
    let runtime = tokio::runtime::Runtime::new().context("cannot start the async runtime")?;
    runtime.block_on(async move {
        backbone_broker::metrics_http::handle();
        let broker = Broker::start(config, StartOptions::default()).await?;
        println!("backbone listening on {} (udp)", broker.quic_addr);
        println!("certificate: {}", broker.cert_path.display());
        println!("fingerprint: {}", broker.fingerprint);
        if let Some(addr) = broker.metrics_addr {
            println!("metrics: http://{addr}/metrics  health: http://{addr}/health");
        }
        wait_for_signal().await?;
        broker.shutdown().await
    })
}

async fn wait_for_signal() -> anyhow::Result<()> {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        result = tokio::signal::ctrl_c() => result?,
        _ = term.recv() => {}
    }
    Ok(())
}
