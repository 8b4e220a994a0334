//! The `backbone-cli` binary's modules, one per command group:
//!
//! - `args`: the command line (clap), every flag and its help text.
//! - `output`: results as text or `--json`, errors, exit codes.
//! - `connect`: reaching the broker from the flags.
//! - `identity`: `keygen`, `address`, `delete-identity`.
//! - `send`, `listen`: messages.
//! - `device`, `capability`, `token`, `relationship`, `file`: the other
//!   subcommands, one file each.
//! - `generate`: shell completions and man pages.
//!
//! None of this is part of the library: it only calls its public API.

pub(crate) mod args;
pub(crate) mod capability;
pub(crate) mod connect;
pub(crate) mod device;
pub(crate) mod file;
pub(crate) mod generate;
pub(crate) mod identity;
pub(crate) mod listen;
pub(crate) mod output;
pub(crate) mod relationship;
pub(crate) mod send;
pub(crate) mod token;
