//! `backbone-cli`: keys, sending and listening from a terminal.
//!
//! `main` parses the command line, sets up logging and the runtime, and
//! hands the command to its module under `cli/`; every result is printed
//! through `cli::output`, as text or, with `--json`, as JSON.

mod cli;

use std::process::ExitCode;

use clap::Parser;

use cli::args::{Cli, Command};
use cli::output::{Output, report_error, usage_error};

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(error) => return usage_error(error),
    };
    let output = Output::new(cli.json);
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
            let error = anyhow::Error::new(error).context("cannot start the async runtime");
            return report_error(output, &error);
        }
    };
    let outcome = runtime.block_on(async {
        let outcome = run(output, cli.command).await;
        cli::connect::close_connections().await;
        outcome
    });
    match outcome {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => report_error(output, &error),
    }
}

async fn run(output: Output, command: Command) -> anyhow::Result<()> {
    match command {
        Command::Keygen { out, force } => cli::identity::keygen(output, &out, force),
        Command::Address { key } => cli::identity::address(output, &key),
        Command::Send(args) => cli::send::send(output, args).await,
        Command::Listen(args) => cli::listen::listen(output, args).await,
        Command::Device(command) => cli::device::device(output, command).await,
        Command::Capability(command) => cli::capability::capability(output, command).await,
        Command::Token(command) => cli::token::token(output, command).await,
        Command::Relationship(command) => cli::relationship::relationship(output, command).await,
        Command::File(command) => cli::file::file(output, command).await,
        Command::DeleteIdentity(args) => cli::identity::delete_identity(output, args).await,
        Command::Completions { shell } => cli::generate::completions(shell),
        Command::Man { out } => cli::generate::man(output, &out),
    }
}
