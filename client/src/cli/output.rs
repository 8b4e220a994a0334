//! How results and errors reach the terminal: text for people, or, with
//! `--json`, one JSON object per line for scripts. The JSON field names are
//! part of the command line's contract: docs/operations.md lists them, and a
//! rename is a breaking change.

use std::fmt::Display;
use std::io::Write;
use std::process::ExitCode;

use backbone_client::ClientError;
use backbone_protocol::ErrorCode;
use serde::Serialize;

/// Where a command prints its results, and in which form.
#[derive(Clone, Copy)]
pub(crate) struct Output {
    json: bool,
}

impl Output {
    /// Text for people, or JSON when `json`.
    pub(crate) fn new(json: bool) -> Self {
        Self { json }
    }

    /// Whether results are printed as JSON.
    pub(crate) fn is_json(self) -> bool {
        self.json
    }

    /// Prints one result on standard output: `value` as one JSON line, or
    /// the lines `text` returns (nothing when it returns an empty string).
    pub(crate) fn result<T: Serialize>(
        self,
        value: &T,
        text: impl FnOnce() -> String,
    ) -> anyhow::Result<()> {
        let mut stdout = std::io::stdout().lock();
        if self.json {
            serde_json::to_writer(&mut stdout, value)?;
            writeln!(stdout)?;
        } else {
            let text = text();
            if !text.is_empty() {
                writeln!(stdout, "{text}")?;
            }
        }
        // Flushed at once: `file put` prints its reference before a long
        // upload, and `listen` prints while it waits for more.
        stdout.flush()?;
        Ok(())
    }

    /// A remark for people on standard error, such as what to do next.
    /// JSON output has none: everything a script needs is in the result.
    pub(crate) fn note(self, text: impl Display) {
        if !self.json {
            eprintln!("{text}");
        }
    }
}

/// Exit codes, documented in the README.
pub(crate) mod exit {
    /// Anything not listed below.
    pub const FAILURE: u8 = 1;
    /// The command line does not parse (clap's own code).
    pub const USAGE: u8 = 2;
    /// The broker could not be reached.
    pub const UNREACHABLE: u8 = 3;
    /// The broker's certificate is not the one trusted.
    pub const CERTIFICATE: u8 = 4;
    /// The broker refused the request.
    pub const REFUSED: u8 = 5;
    /// A request or `listen --count` timed out.
    pub const TIMEOUT: u8 = 6;
}

/// `listen --count N --timeout T` ended with fewer than N messages.
#[derive(Debug, thiserror::Error)]
#[error("timed out after {received} of {count} messages")]
pub(crate) struct ListenTimedOut {
    /// Messages received.
    pub(crate) received: u64,
    /// Messages asked for.
    pub(crate) count: u64,
}

/// What kind of failure ended a command: the stable `error` field of a JSON
/// error, one for each exit code.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub(crate) enum ErrorKind {
    /// The command line does not parse (exit code 2).
    Usage,
    /// Anything else (exit code 1): a bad argument, a local file, a
    /// recipient that was not delivered to.
    Failed,
    /// The broker could not be reached (exit code 3).
    Unreachable,
    /// The broker's certificate is not the one trusted (exit code 4).
    CertificateMismatch,
    /// The broker refused the request (exit code 5); `code` names why.
    Refused,
    /// No answer in time, or `listen --count` timed out (exit code 6).
    Timeout,
}

impl ErrorKind {
    /// The kind of `error`, from the client error it carries, if any.
    pub(crate) fn of(error: &anyhow::Error) -> Self {
        if error.downcast_ref::<ListenTimedOut>().is_some() {
            return ErrorKind::Timeout;
        }
        match error.downcast_ref::<ClientError>() {
            Some(ClientError::Unreachable(_)) => ErrorKind::Unreachable,
            Some(ClientError::CertificateMismatch(_)) => ErrorKind::CertificateMismatch,
            Some(ClientError::Timeout) => ErrorKind::Timeout,
            Some(ClientError::Server { .. } | ClientError::Closed { .. }) => ErrorKind::Refused,
            Some(ClientError::Token(error)) if error.code().is_some() => ErrorKind::Refused,
            _ => ErrorKind::Failed,
        }
    }

    /// The process's exit code for this kind.
    pub(crate) fn exit_code(self) -> u8 {
        match self {
            ErrorKind::Usage => exit::USAGE,
            ErrorKind::Failed => exit::FAILURE,
            ErrorKind::Unreachable => exit::UNREACHABLE,
            ErrorKind::CertificateMismatch => exit::CERTIFICATE,
            ErrorKind::Refused => exit::REFUSED,
            ErrorKind::Timeout => exit::TIMEOUT,
        }
    }
}

/// An error as `--json` prints it on standard error.
#[derive(Serialize)]
struct ErrorReport<'a> {
    error: ErrorKind,
    message: &'a str,
    /// The broker's error code name (`UnknownCapability`, ...), when it sent one.
    code: Option<&'static str>,
}

/// Prints `error` on standard error, as text or as one JSON object, and
/// returns the exit code for it.
pub(crate) fn report_error(output: Output, error: &anyhow::Error) -> ExitCode {
    let kind = ErrorKind::of(error);
    let message = format!("{error:#}");
    if output.is_json() {
        let code = error
            .downcast_ref::<ClientError>()
            .and_then(ClientError::code)
            .map(ErrorCode::name);
        print_json_error(kind, &message, code);
    } else {
        eprintln!("error: {message}");
    }
    ExitCode::from(kind.exit_code())
}

/// Prints one JSON error object on standard error.
pub(crate) fn print_json_error(kind: ErrorKind, message: &str, code: Option<&'static str>) {
    let report = ErrorReport {
        error: kind,
        message,
        code,
    };
    // An error object is small and has only strings: it always serializes.
    let line = serde_json::to_string(&report).unwrap_or_default();
    eprintln!("{line}");
}

/// The command line failed to parse. With `--json` among the arguments the
/// error is printed as JSON (`--help` and `--version` print as usual);
/// otherwise clap prints it.
pub(crate) fn usage_error(error: clap::Error) -> ExitCode {
    let json_asked = std::env::args_os()
        .skip(1)
        .take_while(|arg| arg != "--")
        .any(|arg| arg == "--json");
    if !json_asked || !error.use_stderr() {
        error.exit()
    }
    let rendered = error.render().to_string();
    let message = rendered
        .lines()
        .next()
        .unwrap_or_default()
        .trim_start_matches("error: ");
    print_json_error(ErrorKind::Usage, message, None);
    ExitCode::from(exit::USAGE)
}
