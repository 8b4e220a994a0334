//! `completions` and `man`: shell completion scripts and man pages,
//! generated from the command line's own definition so that they always
//! match `--help`.

use std::io::Write;
use std::path::Path;

use anyhow::Context;
use clap::CommandFactory;
use serde::Serialize;

use super::args::Cli;
use super::output::Output;

/// The name the scripts complete and the pages document.
const BIN_NAME: &str = "backbone-cli";

/// `man --json`: every page written.
#[derive(Serialize)]
struct Written {
    pages: Vec<String>,
}

/// `completions SHELL`: the script on standard output. It is not JSON, so
/// `--json` does not change it.
pub(crate) fn completions(shell: clap_complete::Shell) -> anyhow::Result<()> {
    let mut command = Cli::command();
    let mut stdout = std::io::stdout().lock();
    clap_complete::generate(shell, &mut command, BIN_NAME, &mut stdout);
    stdout.flush()?;
    Ok(())
}

/// `man --out DIR`: one page for backbone-cli and one for each subcommand,
/// named as man expects (`backbone-cli-token-create.1`).
pub(crate) fn man(output: Output, out: &Path) -> anyhow::Result<()> {
    std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
    // Built once from the top, so that every subcommand's page is titled
    // with its full name (`backbone-cli-token-create`), not just `create`.
    let mut command = Cli::command().disable_help_subcommand(true);
    command.build();
    let mut pages = Vec::new();
    write_pages(&command, out, &mut pages)?;
    let written = Written { pages };
    output.result(&written, || {
        written
            .pages
            .iter()
            .map(|page| format!("wrote {page}"))
            .collect::<Vec<_>>()
            .join("\n")
    })
}

fn write_pages(command: &clap::Command, out: &Path, pages: &mut Vec<String>) -> anyhow::Result<()> {
    let page = clap_mangen::Man::new(command.clone());
    let path = page
        .generate_to(out)
        .with_context(|| format!("writing {} in {}", page.get_filename(), out.display()))?;
    pages.push(path.display().to_string());
    for subcommand in command.get_subcommands().filter(|sub| !sub.is_hide_set()) {
        write_pages(subcommand, out, pages)?;
    }
    Ok(())
}
