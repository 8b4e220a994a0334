//! Framing, and the only module in the workspace that names `bincode`.
//!
//! A frame on the wire is:
//!
//! ```text
//! length: u32 big-endian   number of bytes that follow (version + body)
//! version: u8              PROTOCOL_VERSION
//! body                     the Frame, bincode 2 "fixed-int little-endian" layout:
//!                          tag u32 LE, then the variant's fields in order
//! ```
//!
//! Decoding is a pure function over a byte slice. It returns
//! [`Decoded::Incomplete`] when more bytes are needed, never panics, rejects a
//! length above the caller's limit before buffering it, and borrows variable
//! fields from the input first so a forged inner length cannot make it
//! allocate more than the bytes actually present.

use std::cell::RefCell;

use bincode::config::{Configuration, Fixint, Limit, LittleEndian};
use bytes::Bytes;
use serde::Serialize;
use serde::de::DeserializeOwned;
use thiserror::Error;

use crate::PROTOCOL_VERSION;
use crate::bytes::Blob;
use crate::fleet::PeerFrame;
use crate::frame::{ErrorCode, Frame};

/// The largest frame length any peer may configure: 16 MiB.
pub const MAX_FRAME_LEN: usize = 16 * 1024 * 1024;

/// Bytes before the body: the length prefix and the version byte.
pub const HEADER_LEN: usize = 5;

/// The frame limit a broker applies before authentication: `Hello`,
/// `Auth` and `Anonymous` are a few hundred bytes, so a client cannot make
/// an unauthenticated connection buffer more than this.
pub const PRE_AUTH_MAX_FRAME_LEN: usize = 4096;

/// A [`FrameBuffer`] gives its memory back once it is empty and holds more
/// than this (after one large frame, say).
const RETAINED_CAPACITY: usize = 64 * 1024;

/// A frame body at least this long is copied once into shared bytes and
/// decoded from them, so that a [`Blob`] that is most of it (an envelope,
/// see `shared_slice`) is a slice of it instead of a copy, never copied
/// again on its way through a broker. A shorter body is decoded in place
/// and its blobs copied: for a few hundred bytes the copy costs less than
/// the shared allocation.
pub const SHARE_FROM: usize = 512;

/// A [`Blob`] at least this long is written by [`encode_frame_shared`] as
/// its own piece, shared, instead of being copied into the frame's buffer.
pub const SEND_SHARED_FROM: usize = 512;

type Config = Configuration<LittleEndian, Fixint, Limit<MAX_FRAME_LEN>>;

const CONFIG: Config = bincode::config::standard()
    .with_little_endian()
    .with_fixed_int_encoding()
    .with_limit::<MAX_FRAME_LEN>();

/// Which frames a decoder accepts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Phase {
    /// A broker reading an unauthenticated client: only Hello, Auth and Anonymous.
    PreAuth,
    /// Any frame.
    Any,
}

/// The result of a successful decode attempt.
#[derive(Debug, PartialEq, Eq)]
pub enum Decoded {
    /// The input holds no complete frame yet; at least `needed` more bytes are required.
    Incomplete {
        /// How many more bytes are needed at least.
        needed: usize,
    },
    /// One frame, and how many input bytes it used.
    Frame {
        /// The frame.
        frame: Frame,
        /// Bytes consumed from the input.
        consumed: usize,
    },
}

/// Why input could not be decoded. Each maps to a stable [`ErrorCode`].
#[derive(Debug, Error, PartialEq, Eq, Clone)]
pub enum DecodeError {
    /// The length prefix exceeds the limit.
    #[error("frame of {len} bytes exceeds the limit of {max} bytes")]
    FrameTooLarge {
        /// Declared length.
        len: usize,
        /// The limit in force.
        max: usize,
    },
    /// The version byte is not one this crate speaks.
    #[error("unsupported protocol version {version}")]
    UnsupportedVersion {
        /// The version byte found.
        version: u8,
    },
    /// The frame tag is unknown.
    #[error("unknown frame type {tag}")]
    UnknownFrameType {
        /// The tag found.
        tag: u32,
    },
    /// A frame other than Hello, Auth or Anonymous before authentication.
    #[error("frame type {tag} is not allowed before authentication")]
    NotAuthenticated {
        /// The tag found.
        tag: u32,
    },
    /// The body ended before its fields did (or an inner length points past the end).
    #[error("frame body is truncated")]
    Truncated,
    /// Bytes remain after the body.
    #[error("{extra} trailing bytes after the frame body")]
    TrailingBytes {
        /// How many.
        extra: usize,
    },
    /// The body does not decode for another reason (bad option tag, bad UTF-8, ...).
    #[error("malformed frame body: {0}")]
    Malformed(String),
}

impl DecodeError {
    /// The stable wire code for this error.
    pub fn code(&self) -> ErrorCode {
        match self {
            DecodeError::FrameTooLarge { .. } => ErrorCode::FrameTooLarge,
            DecodeError::UnsupportedVersion { .. } => ErrorCode::UnsupportedVersion,
            DecodeError::UnknownFrameType { .. } => ErrorCode::UnknownFrameType,
            DecodeError::NotAuthenticated { .. } => ErrorCode::NotAuthenticated,
            DecodeError::Truncated => ErrorCode::TruncatedFrame,
            DecodeError::TrailingBytes { .. } => ErrorCode::TrailingBytes,
            DecodeError::Malformed(_) => ErrorCode::MalformedFrame,
        }
    }
}

/// Why a value could not be encoded.
#[derive(Debug, Error)]
pub enum EncodeError {
    /// The encoded frame would exceed [`MAX_FRAME_LEN`].
    #[error("encoded frame exceeds {MAX_FRAME_LEN} bytes")]
    TooLarge,
    /// The serializer failed.
    #[error("encoding failed: {0}")]
    Serializer(String),
}

impl From<bincode::error::EncodeError> for EncodeError {
    fn from(error: bincode::error::EncodeError) -> Self {
        EncodeError::Serializer(error.to_string())
    }
}

fn map_decode_error(error: bincode::error::DecodeError) -> DecodeError {
    use bincode::error::DecodeError as E;
    match error {
        E::UnexpectedEnd { .. } => DecodeError::Truncated,
        E::LimitExceeded => DecodeError::Truncated,
        other => DecodeError::Malformed(other.to_string()),
    }
}

/// Appends one frame, header included, to `out`.
pub fn encode_frame(frame: &Frame, out: &mut Vec<u8>) -> Result<(), EncodeError> {
    encode_framed(frame, out)
}

/// Appends `value` with the frame header (length, version) to `out`.
fn encode_framed<T: Serialize>(value: &T, out: &mut Vec<u8>) -> Result<(), EncodeError> {
    let start = out.len();
    out.extend_from_slice(&[0, 0, 0, 0, PROTOCOL_VERSION]);
    if let Err(error) = bincode::serde::encode_into_std_write(value, out, CONFIG) {
        out.truncate(start);
        return Err(error.into());
    }
    let len = out.len() - start - 4;
    if len > MAX_FRAME_LEN {
        out.truncate(start);
        return Err(EncodeError::TooLarge);
    }
    out[start..start + 4].copy_from_slice(&(len as u32).to_be_bytes());
    Ok(())
}

/// Encodes one frame for a writer that takes pieces (QUIC's
/// `write_chunks`): appends the frame to `out`, header included, except for
/// a [`Frame::Deliver`]'s envelope of at least [`SEND_SHARED_FROM`] bytes,
/// which is returned instead (shared, not copied) to be written right after
/// `out`'s bytes. `out` followed by the returned bytes is exactly what
/// [`encode_frame`] writes.
pub fn encode_frame_shared(frame: &Frame, out: &mut Vec<u8>) -> Result<Option<Bytes>, EncodeError> {
    let Frame::Deliver(deliver) = frame else {
        return encode_frame(frame, out).map(|()| None);
    };
    if deliver.envelope.len() < SEND_SHARED_FROM {
        return encode_frame(frame, out).map(|()| None);
    }
    let payload = deliver.envelope.0.clone();
    // The envelope is `Deliver`'s last field, a `u64` length and the bytes:
    // encoded empty, the frame ends in that length, which is patched.
    let start = out.len();
    let head = Frame::Deliver(crate::frame::Deliver {
        envelope: Blob::default(),
        ..deliver.clone()
    });
    encode_frame(&head, out)?;
    let frame_len = out.len() - start - 4 + payload.len();
    if frame_len > MAX_FRAME_LEN {
        out.truncate(start);
        return Err(EncodeError::TooLarge);
    }
    let end = out.len();
    out[end - 8..].copy_from_slice(&(payload.len() as u64).to_le_bytes());
    out[start..start + 4].copy_from_slice(&(frame_len as u32).to_be_bytes());
    Ok(Some(payload))
}

/// Encodes one frame into a fresh buffer.
pub fn frame_to_vec(frame: &Frame) -> Result<Vec<u8>, EncodeError> {
    let mut out = Vec::new();
    encode_frame(frame, &mut out)?;
    Ok(out)
}

/// Tries to decode one frame from the start of `input`.
///
/// `max_frame_len` is the caller's limit on the length prefix (at most
/// [`MAX_FRAME_LEN`]); `phase` restricts which frame types are accepted.
pub fn decode_frame(
    input: &[u8],
    max_frame_len: usize,
    phase: Phase,
) -> Result<Decoded, DecodeError> {
    let max = max_frame_len.min(MAX_FRAME_LEN);
    let Some(prefix) = input.get(..4) else {
        return Ok(Decoded::Incomplete {
            needed: 4 - input.len(),
        });
    };
    let len = u32::from_be_bytes([prefix[0], prefix[1], prefix[2], prefix[3]]) as usize;
    if len > max {
        return Err(DecodeError::FrameTooLarge { len, max });
    }
    if len == 0 {
        return Err(DecodeError::Truncated);
    }
    let total = 4 + len;
    // The version and the tag are checked as soon as they are in, before
    // the rest of the body: a frame that will be skipped or refused need
    // not be buffered (see `FrameBuffer`). A body shorter than a tag is
    // judged once complete, as the tag bytes would belong to the next frame.
    if let Some(&version) = input.get(4)
        && version != PROTOCOL_VERSION
    {
        return Err(DecodeError::UnsupportedVersion { version });
    }
    if len >= 5
        && let Some(tag) = input.get(5..9)
    {
        check_tag(u32::from_le_bytes([tag[0], tag[1], tag[2], tag[3]]), phase)?;
    }
    let Some(frame_bytes) = input.get(4..total) else {
        return Ok(Decoded::Incomplete {
            needed: total - input.len(),
        });
    };
    let body = &frame_bytes[1..];
    check_tag(peek_tag(body)?, phase)?;
    let frame = decode_shared::<Frame>(body)?;
    Ok(Decoded::Frame {
        frame,
        consumed: total,
    })
}

/// Refuses a tag no frame has, or one not allowed in `phase`.
fn check_tag(tag: u32, phase: Phase) -> Result<(), DecodeError> {
    if tag as usize >= Frame::TAG_NAMES.len() {
        return Err(DecodeError::UnknownFrameType { tag });
    }
    if phase == Phase::PreAuth && !Frame::tag_allowed_before_auth(tag) {
        return Err(DecodeError::NotAuthenticated { tag });
    }
    Ok(())
}

/// The frame tag at the start of a body.
pub fn peek_tag(body: &[u8]) -> Result<u32, DecodeError> {
    body.get(..4)
        .map(|tag| u32::from_le_bytes([tag[0], tag[1], tag[2], tag[3]]))
        .ok_or(DecodeError::Truncated)
}

thread_local! {
    /// The shared bytes being decoded by [`decode_shared`] on this thread.
    static SOURCE: RefCell<Option<Bytes>> = const { RefCell::new(None) };
}

/// `slice` as a slice of the shared bytes [`decode_shared`] is decoding on
/// this thread, if it lies within them (a [`Blob`]'s bytes do) and is at
/// least half of them.
///
/// A slice keeps all of its source alive, while whoever holds it (an
/// outbox's byte budget, QUIC's send window, a quota) counts only the
/// slice: sharing only a blob that is most of its frame keeps what is held
/// within twice what is counted. A small blob in a large frame (a 512-byte
/// envelope beside a hundred recipients, one token of a mailbox's
/// handover) is copied instead.
pub(crate) fn shared_slice(slice: &[u8]) -> Option<Bytes> {
    if slice.is_empty() {
        return None;
    }
    SOURCE.with_borrow(|source| {
        let source = source.as_ref()?;
        let start = source.as_ptr() as usize;
        let at = slice.as_ptr() as usize;
        (at >= start && at + slice.len() <= start + source.len() && slice.len() * 2 >= source.len())
            .then(|| source.slice_ref(slice))
    })
}

/// [`decode_exact`], with the [`Blob`]s of a body of at least
/// [`SHARE_FROM`] bytes sliced from one shared copy of it (see
/// [`SHARE_FROM`]).
fn decode_shared<T: DeserializeOwned>(body: &[u8]) -> Result<T, DecodeError> {
    if body.len() < SHARE_FROM {
        return decode_exact(body);
    }
    decode_from_shared(&Bytes::copy_from_slice(body))
}

/// Decodes `shared` as [`decode_exact`] does, with every [`Blob`] a slice
/// of `shared` instead of a copy.
fn decode_from_shared<T: DeserializeOwned>(shared: &Bytes) -> Result<T, DecodeError> {
    /// Puts back what the thread decoded before, also if decoding panics.
    struct Restore(Option<Bytes>);
    impl Drop for Restore {
        fn drop(&mut self) {
            let previous = self.0.take();
            SOURCE.with_borrow_mut(|source| *source = previous);
        }
    }
    let _restore = Restore(SOURCE.with_borrow_mut(|source| source.replace(shared.clone())));
    decode_exact(shared)
}

fn decode_exact<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, DecodeError> {
    let (value, used): (T, usize) =
        bincode::serde::borrow_decode_from_slice(bytes, CONFIG).map_err(map_decode_error)?;
    if used != bytes.len() {
        return Err(DecodeError::TrailingBytes {
            extra: bytes.len() - used,
        });
    }
    Ok(value)
}

/// Appends one node-to-node frame, header included, to `out`.
pub fn encode_peer_frame(frame: &PeerFrame, out: &mut Vec<u8>) -> Result<(), EncodeError> {
    encode_framed(frame, out)
}

/// Tries to decode one node-to-node frame from the start of `input`:
/// `Ok(None)` when more bytes are needed, else the frame and the bytes it used.
/// Any error is fatal for the link.
pub fn decode_peer_frame(
    input: &[u8],
    max_frame_len: usize,
) -> Result<Option<(PeerFrame, usize)>, DecodeError> {
    let max = max_frame_len.min(MAX_FRAME_LEN);
    let Some(prefix) = input.get(..4) else {
        return Ok(None);
    };
    let len = u32::from_be_bytes([prefix[0], prefix[1], prefix[2], prefix[3]]) as usize;
    if len > max {
        return Err(DecodeError::FrameTooLarge { len, max });
    }
    if len == 0 {
        return Err(DecodeError::Truncated);
    }
    let Some(frame_bytes) = input.get(4..4 + len) else {
        return Ok(None);
    };
    if frame_bytes[0] != PROTOCOL_VERSION {
        return Err(DecodeError::UnsupportedVersion {
            version: frame_bytes[0],
        });
    }
    let body = &frame_bytes[1..];
    let tag = peek_tag(body)?;
    if tag as usize >= PeerFrame::TAG_NAMES.len() {
        return Err(DecodeError::UnknownFrameType { tag });
    }
    let frame = decode_shared::<PeerFrame>(body)?;
    Ok(Some((frame, 4 + len)))
}

/// Encodes any serde value with the wire layout, without a frame header.
///
/// The broker uses this for its stored records so that the serialization
/// library stays named in this one module.
pub fn encode_value<T: Serialize>(value: &T) -> Result<Vec<u8>, EncodeError> {
    Ok(bincode::serde::encode_to_vec(value, CONFIG)?)
}

/// Decodes a value written by [`encode_value`]; the whole input must be used.
pub fn decode_value<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, DecodeError> {
    decode_exact(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bytes::Text;
    use crate::frame::{ErrorFrame, Hello, Ping, Send};
    use crate::identity::Address;

    fn ping() -> Vec<u8> {
        frame_to_vec(&Frame::Ping(Ping { nonce: 7 })).expect("encodes")
    }

    #[test]
    fn a_frame_round_trips_and_partial_input_is_incomplete() {
        let bytes = ping();
        for cut in 0..bytes.len() {
            assert!(matches!(
                decode_frame(&bytes[..cut], 1024, Phase::Any),
                Ok(Decoded::Incomplete { .. })
            ));
        }
        assert_eq!(
            decode_frame(&bytes, 1024, Phase::Any),
            Ok(Decoded::Frame {
                frame: Frame::Ping(Ping { nonce: 7 }),
                consumed: bytes.len()
            })
        );
    }

    #[test]
    fn two_frames_back_to_back_decode_one_at_a_time() {
        let mut bytes = ping();
        let first_len = bytes.len();
        encode_frame(
            &Frame::Hello(Hello {
                min_version: 1,
                max_version: 1,
            }),
            &mut bytes,
        )
        .expect("encodes");
        let Ok(Decoded::Frame { consumed, .. }) = decode_frame(&bytes, 1024, Phase::Any) else {
            panic!("first frame must decode");
        };
        assert_eq!(consumed, first_len);
        assert!(matches!(
            decode_frame(&bytes[consumed..], 1024, Phase::PreAuth),
            Ok(Decoded::Frame {
                frame: Frame::Hello(_),
                ..
            })
        ));
    }

    #[test]
    fn oversize_length_is_rejected_before_the_body_arrives() {
        let mut bytes = ping();
        bytes[..4].copy_from_slice(&2000u32.to_be_bytes());
        assert_eq!(
            decode_frame(&bytes[..6], 1024, Phase::Any),
            Err(DecodeError::FrameTooLarge {
                len: 2000,
                max: 1024
            })
        );
    }

    #[test]
    fn trailing_bytes_unknown_tags_versions_and_empty_frames_are_typed_errors() {
        let mut bytes = ping();
        bytes.push(0xff);
        let len = (bytes.len() - 4) as u32;
        bytes[..4].copy_from_slice(&len.to_be_bytes());
        assert_eq!(
            decode_frame(&bytes, 1024, Phase::Any),
            Err(DecodeError::TrailingBytes { extra: 1 })
        );

        let mut unknown = ping();
        unknown[5..9].copy_from_slice(&99u32.to_le_bytes());
        assert_eq!(
            decode_frame(&unknown, 1024, Phase::Any),
            Err(DecodeError::UnknownFrameType { tag: 99 })
        );

        let mut version = ping();
        version[4] = 9;
        assert_eq!(
            decode_frame(&version, 1024, Phase::Any),
            Err(DecodeError::UnsupportedVersion { version: 9 })
        );

        assert_eq!(
            decode_frame(&[0, 0, 0, 0], 1024, Phase::Any),
            Err(DecodeError::Truncated)
        );
        assert_eq!(
            decode_frame(&[0, 0, 0, 1, 1], 1024, Phase::Any),
            Err(DecodeError::Truncated)
        );
    }

    #[test]
    fn only_hello_auth_and_anonymous_pass_before_authentication() {
        let anonymous =
            frame_to_vec(&Frame::Anonymous(crate::frame::Anonymous {})).expect("encodes");
        assert!(matches!(
            decode_frame(&anonymous, 1024, Phase::PreAuth),
            Ok(Decoded::Frame {
                frame: Frame::Anonymous(_),
                ..
            })
        ));
        assert_eq!(
            decode_frame(&ping(), 1024, Phase::PreAuth),
            Err(DecodeError::NotAuthenticated { tag: 16 })
        );
        let error = frame_to_vec(&Frame::Error(ErrorFrame::new(0, ErrorCode::Internal, "x")))
            .expect("encodes");
        assert_eq!(
            decode_frame(&error, 1024, Phase::PreAuth),
            Err(DecodeError::NotAuthenticated { tag: 14 })
        );
    }

    #[test]
    fn a_forged_inner_length_is_truncated_not_an_allocation() {
        let send = Frame::Send(Send {
            request_id: 1,
            ttl_secs: 60,
            recipients: vec![Address([1; 32])],
            envelope: Blob::from(vec![5; 8]),
        });
        let mut bytes = frame_to_vec(&send).expect("encodes");
        // The envelope length is the u64 right before its 8 bytes at the end.
        let at = bytes.len() - 8 - 8;
        bytes[at..at + 8].copy_from_slice(&(u64::MAX / 2).to_le_bytes());
        assert_eq!(
            decode_frame(&bytes, 1024, Phase::Any),
            Err(DecodeError::Truncated)
        );
        // Same for the recipient list's length.
        let mut bytes = frame_to_vec(&send).expect("encodes");
        bytes[5 + 4 + 8 + 4..5 + 4 + 8 + 4 + 8].copy_from_slice(&(1u64 << 40).to_le_bytes());
        assert!(decode_frame(&bytes, 1024, Phase::Any).is_err());
    }

    #[test]
    fn bad_utf8_and_bad_option_tags_are_malformed() {
        let error = Frame::Error(ErrorFrame {
            request_id: 0,
            code: 1,
            retry_after_ms: None,
            message: Text("ab".into()),
        });
        let mut bytes = frame_to_vec(&error).expect("encodes");
        let last = bytes.len() - 1;
        bytes[last] = 0xff;
        assert!(matches!(
            decode_frame(&bytes, 1024, Phase::Any),
            Err(DecodeError::Malformed(_))
        ));

        let mut bytes = frame_to_vec(&error).expect("encodes");
        // The option tag follows tag (4), request_id (8) and code (2).
        bytes[5 + 4 + 8 + 2] = 7;
        assert!(matches!(
            decode_frame(&bytes, 1024, Phase::Any),
            Err(DecodeError::Malformed(_))
        ));
    }

    fn deliver(len: usize) -> Frame {
        Frame::Deliver(crate::frame::Deliver {
            seq: 7,
            message_id: crate::bytes::MessageId([3; 16]),
            sender: Some(Address([4; 32])),
            stored_at_ms: 5,
            expires_at_ms: 6,
            envelope: Blob::from((0..len).map(|i| i as u8).collect::<Vec<_>>()),
        })
    }

    #[test]
    fn a_shared_encoding_is_the_frame_in_two_pieces_from_the_threshold_on() {
        for len in [0, 1, SEND_SHARED_FROM - 1, SEND_SHARED_FROM, 70_000] {
            let frame = deliver(len);
            let whole = frame_to_vec(&frame).expect("encodes");
            let mut head = vec![9, 9];
            let payload = encode_frame_shared(&frame, &mut head).expect("encodes");
            assert_eq!(payload.is_some(), len >= SEND_SHARED_FROM, "{len} bytes");
            let Frame::Deliver(sent) = &frame else {
                unreachable!()
            };
            if let Some(payload) = &payload {
                assert_eq!(
                    payload.as_ptr(),
                    sent.envelope.as_ptr(),
                    "the envelope is shared, not copied"
                );
            }
            let mut joined = head[2..].to_vec();
            joined.extend_from_slice(payload.as_deref().unwrap_or_default());
            assert_eq!(joined, whole, "{len} bytes");
            assert_eq!(&head[..2], &[9, 9], "appended after what was there");
        }
        // Other frames are written whole.
        let mut out = Vec::new();
        let ping_frame = Frame::Ping(Ping { nonce: 7 });
        assert!(matches!(
            encode_frame_shared(&ping_frame, &mut out),
            Ok(None)
        ));
        assert_eq!(out, ping());
    }

    #[test]
    fn blobs_decoded_from_shared_bytes_are_slices_of_them_and_the_source_is_put_back() {
        let frame = deliver(600);
        let bytes = frame_to_vec(&frame).expect("encodes");
        let shared = Bytes::copy_from_slice(&bytes[HEADER_LEN..]);
        let decoded: Frame = decode_from_shared(&shared).expect("decodes");
        assert_eq!(decoded, frame);
        let Frame::Deliver(decoded) = decoded else {
            unreachable!()
        };
        let range = shared.as_ptr_range();
        assert!(
            range.contains(&decoded.envelope.as_ptr()),
            "the envelope is a slice of the frame's bytes, not a copy"
        );
        assert!(SOURCE.with_borrow(Option::is_none), "nothing left behind");
        // A blob that is less than half of its frame is copied: a slice would
        // keep the whole frame alive while counted as the blob.
        let send = Frame::Send(crate::frame::Send {
            request_id: 1,
            recipients: (0..100u8).map(|i| Address([i; 32])).collect(),
            ttl_secs: 60,
            envelope: Blob::from(vec![5; 600]),
        });
        let bytes = frame_to_vec(&send).expect("encodes");
        let shared = Bytes::copy_from_slice(&bytes[HEADER_LEN..]);
        assert!(shared.len() > 2 * 600);
        let decoded: Frame = decode_from_shared(&shared).expect("decodes");
        assert_eq!(decoded, send);
        let Frame::Send(decoded) = decoded else {
            unreachable!()
        };
        assert!(
            !shared.as_ptr_range().contains(&decoded.envelope.as_ptr()),
            "a small envelope in a large frame is a copy"
        );
        // Large frames are decoded that way, small ones in place; both the same.
        for len in [10, SHARE_FROM, 5000] {
            let frame = deliver(len);
            let bytes = frame_to_vec(&frame).expect("encodes");
            match decode_frame(&bytes, MAX_FRAME_LEN, Phase::Any) {
                Ok(Decoded::Frame { frame: decoded, .. }) => assert_eq!(decoded, frame),
                other => panic!("{other:?}"),
            }
        }
    }

    #[test]
    fn every_decode_error_has_a_distinct_code() {
        let errors = [
            DecodeError::FrameTooLarge { len: 0, max: 0 },
            DecodeError::UnsupportedVersion { version: 0 },
            DecodeError::UnknownFrameType { tag: 0 },
            DecodeError::NotAuthenticated { tag: 0 },
            DecodeError::Truncated,
            DecodeError::TrailingBytes { extra: 0 },
            DecodeError::Malformed(String::new()),
        ];
        let codes: std::collections::HashSet<_> = errors.iter().map(DecodeError::code).collect();
        assert_eq!(codes.len(), errors.len());
    }
}

/// A sans-IO receive buffer: feed it bytes as they arrive, take frames out.
///
/// Invalid frames whose length prefix was readable are skipped, so one bad
/// frame costs the peer an error response rather than the whole stream; an
/// oversize length or a pre-auth violation is fatal. A frame whose version
/// or tag is bad is reported as soon as those bytes arrive, and the rest of
/// its body is dropped as it comes in, never buffered.
///
/// Memory follows what is buffered: after a large frame is taken out, the
/// buffer's capacity is given back (above 64 KiB).
#[derive(Debug)]
pub struct FrameBuffer {
    buf: Vec<u8>,
    start: usize,
    max_frame_len: usize,
    /// Bytes of a skipped frame still to arrive and be dropped.
    skip: usize,
}

/// A frame that could not be taken from a [`FrameBuffer`].
#[derive(Debug, Error, PartialEq, Eq, Clone)]
pub enum BufferError {
    /// The frame was invalid and has been skipped; the stream can continue.
    #[error("invalid frame skipped: {0}")]
    Skipped(DecodeError),
    /// The stream cannot continue.
    #[error("fatal frame error: {0}")]
    Fatal(DecodeError),
}

impl BufferError {
    /// The decode error behind it.
    pub fn decode_error(&self) -> &DecodeError {
        match self {
            BufferError::Skipped(error) | BufferError::Fatal(error) => error,
        }
    }
}

impl FrameBuffer {
    /// An empty buffer with a frame length limit.
    pub fn new(max_frame_len: usize) -> Self {
        // No capacity up front: an idle connection should cost next to nothing.
        Self {
            buf: Vec::new(),
            start: 0,
            max_frame_len,
            skip: 0,
        }
    }

    /// Changes the frame length limit (a broker raises it once a client
    /// has authenticated).
    pub fn set_max_frame_len(&mut self, max_frame_len: usize) {
        self.max_frame_len = max_frame_len;
    }

    /// Appends received bytes.
    pub fn extend(&mut self, mut bytes: &[u8]) {
        if self.skip > 0 {
            let dropped = self.skip.min(bytes.len());
            self.skip -= dropped;
            bytes = &bytes[dropped..];
        }
        if bytes.is_empty() {
            return;
        }
        if self.start > 0 && self.start * 2 >= self.buf.len() {
            self.buf.drain(..self.start);
            self.start = 0;
            if self.buf.capacity() > RETAINED_CAPACITY
                && self.buf.len() + bytes.len() < self.buf.capacity() / 4
            {
                self.buf
                    .shrink_to((self.buf.len() + bytes.len()).max(RETAINED_CAPACITY));
            }
        }
        self.buf.extend_from_slice(bytes);
    }

    /// Bytes the buffer holds memory for (for tests of its memory use).
    pub fn capacity(&self) -> usize {
        self.buf.capacity()
    }

    /// Marks `len` bytes from `start` as consumed; once nothing is left,
    /// the memory of a large buffer is given back.
    fn consume(&mut self, len: usize) {
        self.start += len;
        if self.start >= self.buf.len() {
            if self.buf.capacity() > RETAINED_CAPACITY {
                self.buf = Vec::new();
            } else {
                self.buf.clear();
            }
            self.start = 0;
        }
    }

    /// Bytes buffered and not yet consumed.
    pub fn buffered(&self) -> usize {
        self.buf.len() - self.start
    }

    /// Takes the bytes buffered and not yet consumed, leaving the buffer
    /// empty: what followed a stream's header frame (an upload's raw bytes).
    pub fn take_buffered(&mut self) -> Vec<u8> {
        let rest = self.buf.split_off(self.start);
        self.buf = Vec::new();
        self.start = 0;
        rest
    }

    /// The next complete frame, `Ok(None)` if more bytes are needed.
    pub fn next_frame(&mut self, phase: Phase) -> Result<Option<Frame>, BufferError> {
        let available = &self.buf[self.start..];
        match decode_frame(available, self.max_frame_len, phase) {
            Ok(Decoded::Frame { frame, consumed }) => {
                self.consume(consumed);
                Ok(Some(frame))
            }
            Ok(Decoded::Incomplete { .. }) => Ok(None),
            Err(error) => {
                let recoverable = !matches!(
                    error,
                    DecodeError::FrameTooLarge { .. } | DecodeError::NotAuthenticated { .. }
                );
                let len = available
                    .get(..4)
                    .map(|p| u32::from_be_bytes([p[0], p[1], p[2], p[3]]) as usize + 4);
                match len {
                    Some(len) if recoverable => {
                        // A bad version or tag is found before the body is
                        // in: what is missing is dropped as it arrives.
                        let held = available.len();
                        self.skip = len.saturating_sub(held);
                        self.consume(len.min(held));
                        Err(BufferError::Skipped(error))
                    }
                    _ => Err(BufferError::Fatal(error)),
                }
            }
        }
    }
}

#[cfg(test)]
mod buffer_tests {
    use super::*;
    use crate::frame::Ping;

    #[test]
    fn the_bytes_after_a_header_frame_can_be_taken_out() {
        let mut bytes = frame_to_vec(&Frame::Ping(Ping { nonce: 1 })).expect("encodes");
        bytes.extend_from_slice(b"raw file bytes");
        let mut buffer = FrameBuffer::new(1024);
        buffer.extend(&bytes);
        assert_eq!(
            buffer.next_frame(Phase::Any),
            Ok(Some(Frame::Ping(Ping { nonce: 1 })))
        );
        assert_eq!(buffer.take_buffered(), b"raw file bytes");
        assert_eq!(buffer.buffered(), 0);
        assert_eq!(buffer.take_buffered(), b"");
    }

    #[test]
    fn frames_split_across_chunks_come_out_whole_and_bad_ones_are_skipped() {
        let mut bytes = frame_to_vec(&Frame::Ping(Ping { nonce: 1 })).expect("encodes");
        let mut bad = frame_to_vec(&Frame::Ping(Ping { nonce: 2 })).expect("encodes");
        bad[5..9].copy_from_slice(&77u32.to_le_bytes());
        bytes.extend_from_slice(&bad);
        bytes.extend_from_slice(&frame_to_vec(&Frame::Ping(Ping { nonce: 3 })).expect("encodes"));
        let mut buffer = FrameBuffer::new(1024);
        let mut seen = Vec::new();
        for byte in bytes {
            buffer.extend(&[byte]);
            loop {
                match buffer.next_frame(Phase::Any) {
                    Ok(Some(frame)) => seen.push(Ok(frame)),
                    Ok(None) => break,
                    Err(error) => seen.push(Err(error)),
                }
            }
        }
        assert_eq!(
            seen,
            vec![
                Ok(Frame::Ping(Ping { nonce: 1 })),
                Err(BufferError::Skipped(DecodeError::UnknownFrameType {
                    tag: 77
                })),
                Ok(Frame::Ping(Ping { nonce: 3 })),
            ]
        );
        assert_eq!(buffer.buffered(), 0);
    }

    #[test]
    fn oversize_and_pre_auth_violations_are_fatal() {
        let mut buffer = FrameBuffer::new(8);
        buffer.extend(&frame_to_vec(&Frame::Ping(Ping { nonce: 1 })).expect("encodes"));
        assert!(matches!(
            buffer.next_frame(Phase::Any),
            Err(BufferError::Fatal(DecodeError::FrameTooLarge { .. }))
        ));
        let mut buffer = FrameBuffer::new(1024);
        buffer.extend(&frame_to_vec(&Frame::Ping(Ping { nonce: 1 })).expect("encodes"));
        assert!(matches!(
            buffer.next_frame(Phase::PreAuth),
            Err(BufferError::Fatal(DecodeError::NotAuthenticated { .. }))
        ));
    }

    /// The first 9 bytes of a frame declaring `len` bytes after its prefix,
    /// with `tag`.
    fn header(len: u32, tag: u32) -> Vec<u8> {
        let mut bytes = len.to_be_bytes().to_vec();
        bytes.push(PROTOCOL_VERSION);
        bytes.extend_from_slice(&tag.to_le_bytes());
        bytes
    }

    #[test]
    fn a_frame_with_an_unknown_tag_is_skipped_as_it_arrives_without_being_buffered() {
        let len = 1024 * 1024;
        let mut buffer = FrameBuffer::new(2 * 1024 * 1024);
        buffer.extend(&header(len, 9_999));
        assert_eq!(
            buffer.next_frame(Phase::Any),
            Err(BufferError::Skipped(DecodeError::UnknownFrameType {
                tag: 9_999
            }))
        );
        // The rest of its body arrives in pieces and is dropped.
        let piece = vec![0xAB; 64 * 1024];
        for _ in 0..(len as usize - 5) / piece.len() {
            buffer.extend(&piece);
            assert_eq!(buffer.next_frame(Phase::Any), Ok(None));
        }
        assert!(
            buffer.capacity() <= 64 * 1024,
            "held {} bytes",
            buffer.capacity()
        );
        // The body's last bytes and the next frame in one piece.
        let rest = (len as usize - 5) % piece.len();
        let mut tail = vec![0xAB; rest];
        tail.extend_from_slice(&frame_to_vec(&Frame::Ping(Ping { nonce: 5 })).expect("encodes"));
        buffer.extend(&tail);
        assert_eq!(
            buffer.next_frame(Phase::Any),
            Ok(Some(Frame::Ping(Ping { nonce: 5 })))
        );
        assert_eq!(buffer.buffered(), 0);
    }

    #[test]
    fn a_bad_version_or_a_pre_auth_violation_is_judged_from_the_header_alone() {
        let mut bytes = header(100_000, 16);
        bytes[4] = 9;
        let mut buffer = FrameBuffer::new(200_000);
        buffer.extend(&bytes);
        assert_eq!(
            buffer.next_frame(Phase::Any),
            Err(BufferError::Skipped(DecodeError::UnsupportedVersion {
                version: 9
            }))
        );
        let mut buffer = FrameBuffer::new(200_000);
        buffer.extend(&header(100_000, 16));
        assert_eq!(
            buffer.next_frame(Phase::PreAuth),
            Err(BufferError::Fatal(DecodeError::NotAuthenticated {
                tag: 16
            }))
        );
    }

    #[test]
    fn a_body_shorter_than_a_tag_is_not_judged_by_the_next_frames_bytes() {
        // A 2-byte body: version and one byte. The bytes after it are a
        // valid frame, not this frame's tag.
        let mut bytes = vec![0, 0, 0, 2, PROTOCOL_VERSION, 0];
        bytes.extend_from_slice(&frame_to_vec(&Frame::Ping(Ping { nonce: 2 })).expect("encodes"));
        let mut buffer = FrameBuffer::new(1024);
        buffer.extend(&bytes);
        assert_eq!(
            buffer.next_frame(Phase::Any),
            Err(BufferError::Skipped(DecodeError::Truncated))
        );
        assert_eq!(
            buffer.next_frame(Phase::Any),
            Ok(Some(Frame::Ping(Ping { nonce: 2 })))
        );
    }

    #[test]
    fn memory_is_given_back_after_a_large_frame() {
        let large = frame_to_vec(&Frame::Error(crate::frame::ErrorFrame::new(
            0,
            ErrorCode::Internal,
            "x".repeat(1024 * 1024),
        )))
        .expect("encodes");
        let mut buffer = FrameBuffer::new(2 * 1024 * 1024);
        for piece in large.chunks(64 * 1024) {
            buffer.extend(piece);
        }
        assert!(matches!(buffer.next_frame(Phase::Any), Ok(Some(_))));
        assert!(
            buffer.capacity() <= 64 * 1024,
            "held {} bytes",
            buffer.capacity()
        );
        // A large frame followed by the start of a small one keeps only what
        // the small one needs once the buffer compacts.
        let mut bytes = large.clone();
        let ping = frame_to_vec(&Frame::Ping(Ping { nonce: 3 })).expect("encodes");
        bytes.extend_from_slice(&ping[..3]);
        buffer.extend(&bytes);
        assert!(matches!(buffer.next_frame(Phase::Any), Ok(Some(_))));
        assert_eq!(buffer.next_frame(Phase::Any), Ok(None));
        buffer.extend(&ping[3..]);
        assert_eq!(
            buffer.next_frame(Phase::Any),
            Ok(Some(Frame::Ping(Ping { nonce: 3 })))
        );
        assert!(
            buffer.capacity() <= 64 * 1024,
            "held {} bytes",
            buffer.capacity()
        );
    }
}
