//! What a message's plaintext holds.
//!
//! A plain text message without attachments is sent as its UTF-8 bytes, as
//! `backbone-cli send` sends one, so people's apps and the CLI read it as
//! is. Anything else (bytes with a media type, attachments) is sent as
//! [`MAGIC`] followed by a JSON document ([`Structured`]). On receipt, a
//! plaintext that starts with [`MAGIC`] and parses is taken apart; any
//! other plaintext is kept as it came, as text when it is UTF-8 and as
//! `application/octet-stream` otherwise.

use serde::{Deserialize, Serialize};

use crate::db::Attachment;

/// The first bytes of a structured message: a NUL (which no text message
/// starts with), `BBC1` and a newline.
pub const MAGIC: &[u8] = b"\0BBC1\n";

/// The media type of a plain text message.
pub const TEXT: &str = "text/plain; charset=utf-8";

/// The media type of bytes of no declared type.
pub const OCTETS: &str = "application/octet-stream";

/// A message's content, taken apart.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Content {
    /// The media type.
    pub content_type: String,
    /// The content.
    pub body: Vec<u8>,
    /// Attached files.
    pub attachments: Vec<Attachment>,
}

/// The JSON document after [`MAGIC`].
#[derive(Serialize, Deserialize)]
struct Structured {
    content_type: String,
    /// The body, in base64.
    body: String,
    #[serde(default)]
    attachments: Vec<Attachment>,
}

impl Content {
    /// The plaintext to seal.
    pub fn encode(&self) -> Vec<u8> {
        if self.attachments.is_empty()
            && self.content_type == TEXT
            && std::str::from_utf8(&self.body).is_ok()
            && !self.body.starts_with(MAGIC)
        {
            return self.body.clone();
        }
        let structured = Structured {
            content_type: self.content_type.clone(),
            body: data_encoding::BASE64.encode(&self.body),
            attachments: self.attachments.clone(),
        };
        let mut plaintext = MAGIC.to_vec();
        plaintext.extend_from_slice(
            serde_json::to_string(&structured)
                .expect("a JSON document of strings serialises")
                .as_bytes(),
        );
        plaintext
    }

    /// Takes a received plaintext apart.
    pub fn decode(plaintext: Vec<u8>) -> Content {
        if let Some(json) = plaintext.strip_prefix(MAGIC)
            && let Ok(structured) = serde_json::from_slice::<Structured>(json)
            && let Ok(body) = data_encoding::BASE64.decode(structured.body.as_bytes())
        {
            return Content {
                content_type: structured.content_type,
                body,
                attachments: structured.attachments,
            };
        }
        let content_type = if std::str::from_utf8(&plaintext).is_ok() {
            TEXT
        } else {
            OCTETS
        };
        Content {
            content_type: content_type.into(),
            body: plaintext,
            attachments: Vec::new(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_text_goes_as_is_and_everything_else_round_trips() {
        let text = Content {
            content_type: TEXT.into(),
            body: b"hello".to_vec(),
            attachments: vec![],
        };
        assert_eq!(text.encode(), b"hello");
        assert_eq!(Content::decode(text.encode()), text);

        let with_file = Content {
            content_type: "application/pdf".into(),
            body: vec![0, 255, 1],
            attachments: vec![Attachment {
                reference: "bbf1:x".into(),
                name: Some("a.pdf".into()),
                size: 3,
            }],
        };
        assert!(with_file.encode().starts_with(MAGIC));
        assert_eq!(Content::decode(with_file.encode()), with_file);

        // Text that happens to start with the magic bytes is not mistaken.
        let tricky = Content {
            content_type: TEXT.into(),
            body: [MAGIC, b"{}"].concat(),
            attachments: vec![],
        };
        assert_eq!(Content::decode(tricky.encode()), tricky);
    }

    #[test]
    fn foreign_plaintexts_are_kept_as_they_came() {
        assert_eq!(Content::decode(vec![0xff, 0xfe]).content_type, OCTETS);
        let broken = [MAGIC, b"not json"].concat();
        let decoded = Content::decode(broken.clone());
        assert_eq!(decoded.body, broken);
        assert_eq!(decoded.content_type, TEXT);
    }
}
