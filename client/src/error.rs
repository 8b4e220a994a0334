//! The client's error type.

use backbone_protocol::ErrorCode;
use thiserror::Error;

/// Everything a client operation can fail with.
#[derive(Debug, Error)]
pub enum ClientError {
    /// The broker could not be reached (DNS, routing, timeout).
    #[error("server unreachable: {0}")]
    Unreachable(String),
    /// The broker's certificate did not match the configured CA or fingerprint.
    #[error("certificate mismatch: the broker's certificate is not the one trusted ({0})")]
    CertificateMismatch(String),
    /// The fingerprint text is not 32 bytes of hex.
    #[error("invalid fingerprint {0:?}: expected 64 hex characters (colons allowed)")]
    InvalidFingerprint(String),
    /// TLS setup failed.
    #[error("TLS: {0}")]
    Tls(String),
    /// The broker answered with an error.
    #[error("{}", describe_server_error(*code, message))]
    Server {
        /// The stable error code.
        code: u16,
        /// The broker's message.
        message: String,
        /// When to retry, if retrying makes sense.
        retry_after_ms: Option<u32>,
    },
    /// The broker closed the connection with an error code.
    #[error("connection closed by broker: {}", describe_server_error(*code, reason))]
    Closed {
        /// The stable error code used as the QUIC close code.
        code: u16,
        /// The close reason.
        reason: String,
    },
    /// The connection dropped.
    #[error("disconnected: {0}")]
    Disconnected(String),
    /// The broker sent a frame the client cannot use.
    #[error("protocol error: {0}")]
    Protocol(String),
    /// The broker redirected to another node.
    #[error("redirected to {0}")]
    Redirect(String),
    /// No answer in time.
    #[error("request timed out")]
    Timeout,
    /// A card failed verification: the broker served a card that is not the address's.
    #[error("identity card rejected: {0}")]
    Card(#[from] backbone_protocol::card::CardError),
    /// An envelope could not be sealed or opened.
    #[error("envelope: {0}")]
    Envelope(#[from] crate::envelope::EnvelopeError),
    /// A token could not be created, fetched, opened or deleted.
    #[error("token: {0}")]
    Token(#[from] crate::token::TokenError),
    /// A file could not be opened or was cut short.
    #[error("file: {0}")]
    File(#[from] crate::file::FileError),
    /// A file's source no longer holds the content the file was announced
    /// with (its bytes or its length changed). Resuming would encrypt
    /// different content under the file's key and the same nonces, so
    /// nothing sealed from the changed source was sent; the file can only
    /// be finished from the original content. Upload the source anew as a
    /// new file (a new key and reference).
    #[error(
        "the file changed since its upload began; resuming would encrypt different content \
         under the same key, so nothing of it was sent: upload it anew as a new file"
    )]
    SourceChanged,
    /// Local I/O failed.
    #[error("I/O: {0}")]
    Io(String),
}

fn describe_server_error(code: u16, message: &str) -> String {
    match ErrorCode::from_u16(code) {
        Some(ErrorCode::UnknownAddress) => {
            format!("unknown address: no identity card is published for it ({message})")
        }
        Some(ErrorCode::QuotaExceeded) => format!("quota exceeded ({message})"),
        Some(ErrorCode::IdentityDeleted) => {
            format!("the identity was deleted; its address is closed for good ({message})")
        }
        Some(ErrorCode::DeviceNotRegistered) => format!(
            "this device is not registered for its identity: never registered, or \
             unregistered by the identity key ({message})"
        ),
        Some(ErrorCode::IdentityKeyRequired) => format!(
            "only the identity key may do this, not a device: connect with the identity key \
             ({message})"
        ),
        Some(known) => format!("{} (code {code}): {message}", known.name()),
        None => format!("error code {code}: {message}"),
    }
}

impl ClientError {
    pub(crate) fn server(code: u16, message: String, retry_after_ms: Option<u32>) -> Self {
        ClientError::Server {
            code,
            message,
            retry_after_ms,
        }
    }

    /// The stable code, when the broker sent one.
    pub fn code(&self) -> Option<ErrorCode> {
        match self {
            ClientError::Server { code, .. } | ClientError::Closed { code, .. } => {
                ErrorCode::from_u16(*code)
            }
            ClientError::Token(error) => error.code(),
            _ => None,
        }
    }

    /// Whether retrying later may succeed.
    pub fn is_retryable(&self) -> bool {
        match self {
            ClientError::Unreachable(_) | ClientError::Disconnected(_) | ClientError::Timeout => {
                true
            }
            ClientError::Server { code, .. } | ClientError::Closed { code, .. } => {
                ErrorCode::from_u16(*code).is_some_and(ErrorCode::is_retryable)
            }
            _ => false,
        }
    }

    pub(crate) fn from_connection(error: quinn::ConnectionError, server: &str) -> Self {
        match error {
            quinn::ConnectionError::ApplicationClosed(close) => ClientError::Closed {
                code: u16::try_from(close.error_code.into_inner()).unwrap_or(u16::MAX),
                reason: String::from_utf8_lossy(&close.reason).into_owned(),
            },
            quinn::ConnectionError::TransportError(error)
                if error.to_string().contains("certificate") =>
            {
                ClientError::CertificateMismatch(error.to_string())
            }
            quinn::ConnectionError::ConnectionClosed(close)
                if close.to_string().contains("certificate") =>
            {
                ClientError::CertificateMismatch(close.to_string())
            }
            quinn::ConnectionError::TimedOut => {
                ClientError::Unreachable(format!("{server}: timed out"))
            }
            other => ClientError::Disconnected(other.to_string()),
        }
    }
}
