//! Target `frame_buffer`: a byte stream fed in chunks into
//! `protocol::codec::FrameBuffer`, every outcome checked against a reference
//! that decodes the whole stream with `codec::decode_frame`.
//!
//! The reference is written from the buffer's documented contract, not from
//! its implementation, so that it keeps holding when the buffer's internals
//! change (for example a buffer that skips an invalid frame as soon as its
//! header shows it is invalid, without buffering its body):
//!
//! - frames come out whole, in stream order, each equal to what
//!   `decode_frame` decodes at that position, and never before their last
//!   byte was fed;
//! - an invalid frame whose length prefix was readable is skipped with the
//!   typed error `decode_frame` gives for it, and the stream goes on after
//!   it; the error may be reported early only if the bytes fed so far already
//!   determine it (the frame's header);
//! - an oversize length or a frame not allowed before authentication is
//!   fatal, with its typed error;
//! - a complete frame or error is never held back: after the fed bytes are
//!   drained, what remains at the reference position is incomplete, and the
//!   buffer holds at most those bytes (none while it discards the body of a
//!   frame it skipped);
//! - `take_buffered` right after a frame returns exactly the bytes fed after
//!   it, and the buffer then behaves as a fresh one.

use backbone_protocol::codec::{
    BufferError, DecodeError, FrameBuffer, MAX_FRAME_LEN, decode_frame, frame_to_vec,
};
use backbone_protocol::frame::Ping;
use backbone_protocol::{Decoded, Frame, PROTOCOL_VERSION, Phase};

/// The frame limits an input chooses from: small ones, so that both the
/// limit check and multi-chunk frames are exercised with short inputs.
const LIMITS: [usize; 4] = [32, 128, 1024, 4096];

/// The longest chunk pattern an input carries.
const MAX_PATTERN: u8 = 16;

/// Target `frame_buffer`; see the module documentation and [`run_frame_buffer`].
pub fn frame_buffer_target(data: &[u8]) {
    run_frame_buffer(data);
}

/// How a `frame_buffer` input ended, for the tests.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct FrameBufferOutcome {
    /// Frames taken out.
    pub frames: usize,
    /// Invalid frames skipped.
    pub skipped: usize,
    /// Whether the stream ended with a fatal error.
    pub fatal: bool,
    /// What `take_buffered` returned, if it was called.
    pub taken: Option<Vec<u8>>,
}

/// The input's settings: its first two bytes and the chunk pattern.
struct Settings<'a> {
    limit: usize,
    /// Outcomes read in `Phase::PreAuth` before the phase becomes `Any`, as
    /// the broker reads the handshake and then the session.
    pre_auth_outcomes: usize,
    /// Call `take_buffered` right after this many frames (0: never).
    take_after_frames: usize,
    /// Chunk sizes, used in turn; empty for the whole stream at once.
    pattern: &'a [u8],
}

/// Interprets `data` as:
///
/// - byte 0: bits 0–2 the number of outcomes read in `Phase::PreAuth` before
///   switching to `Phase::Any` (0: `Any` from the start), bits 3–4 the frame
///   limit (32, 128, 1024 or 4096 bytes), bits 5–7 after how many frames
///   `take_buffered` is called (0: never);
/// - byte 1: the length `n` (mod 16) of the chunk pattern that follows;
/// - `n` bytes: chunk sizes, used in turn (0 is an empty chunk; a pattern of
///   zeros only, or none, feeds the stream at once);
/// - the rest: the stream.
///
/// After each chunk every outcome the buffer yields is checked against the
/// reference (see the module documentation); the run stops at a fatal error.
pub fn run_frame_buffer(data: &[u8]) -> FrameBufferOutcome {
    let mut outcome = FrameBufferOutcome::default();
    let Some((&config, rest)) = data.split_first() else {
        return outcome;
    };
    let Some((&pattern_len, rest)) = rest.split_first() else {
        return outcome;
    };
    let Some((pattern, stream)) = rest.split_at_checked(usize::from(pattern_len % MAX_PATTERN))
    else {
        return outcome;
    };
    let settings = Settings {
        limit: LIMITS[usize::from((config >> 3) & 3)],
        pre_auth_outcomes: usize::from(config & 7),
        take_after_frames: usize::from(config >> 5),
        pattern: if pattern.iter().all(|&size| size == 0) {
            &[]
        } else {
            pattern
        },
    };

    let mut buffer = FrameBuffer::new(settings.limit);
    // Bytes of the stream fed so far.
    let mut fed = 0;
    // Where the reference's next outcome starts. It runs ahead of `fed`
    // while a buffer discards the body of a frame it skipped early.
    let mut position = 0;
    let mut outcomes = 0;
    let mut chunks = 0;
    loop {
        let size = match settings.pattern {
            [] => stream.len() - fed,
            pattern => usize::from(pattern[chunks % pattern.len()]).min(stream.len() - fed),
        };
        chunks += 1;
        buffer.extend(&stream[fed..fed + size]);
        fed += size;
        loop {
            let phase = phase_after(&settings, outcomes);
            let got = buffer.next_frame(phase);
            if got == Ok(None) {
                break;
            }
            outcomes += 1;
            let expected = reference_outcome(stream, position, fed, settings.limit, phase);
            assert_eq!(
                got, expected.result,
                "outcome {outcomes} at byte {position}"
            );
            assert!(
                expected.known_at <= fed,
                "outcome {outcomes} reported after {fed} bytes, before byte {} that determines it",
                expected.known_at
            );
            match expected.result {
                Ok(_) => outcome.frames += 1,
                Err(BufferError::Skipped(_)) => outcome.skipped += 1,
                Err(BufferError::Fatal(_)) => {
                    outcome.fatal = true;
                    return outcome;
                }
            }
            position = expected.next;
            if expected.result.is_ok() && outcome.frames == settings.take_after_frames {
                let taken = buffer.take_buffered();
                assert_eq!(
                    taken,
                    stream[position..fed],
                    "take_buffered returns the bytes after the frame"
                );
                assert_eq!(buffer.buffered(), 0, "take_buffered empties the buffer");
                outcome.taken = Some(taken);
                // What follows is read as a new stream from here.
                position = fed;
            }
        }
        check_drained(&buffer, stream, position, fed, &settings, outcomes);
        if fed == stream.len() {
            return outcome;
        }
    }
}

fn phase_after(settings: &Settings<'_>, outcomes: usize) -> Phase {
    if outcomes < settings.pre_auth_outcomes {
        Phase::PreAuth
    } else {
        Phase::Any
    }
}

/// After the buffer answered `Ok(None)`: nothing complete was held back, and
/// it holds no more than the bytes after the last outcome.
fn check_drained(
    buffer: &FrameBuffer,
    stream: &[u8],
    position: usize,
    fed: usize,
    settings: &Settings<'_>,
    outcomes: usize,
) {
    if position >= fed {
        assert_eq!(
            buffer.buffered(),
            0,
            "bytes of a skipped frame are still buffered"
        );
        return;
    }
    let phase = phase_after(settings, outcomes);
    assert!(
        matches!(
            decode_frame(&stream[position..fed], settings.limit, phase),
            Ok(Decoded::Incomplete { .. })
        ),
        "the buffer answered None over a complete frame or error at byte {position}"
    );
    // At most the bytes since the last outcome: a buffer may already be
    // discarding an invalid frame it has not reported yet, but never holds
    // bytes it has passed on or that were never fed.
    assert!(
        buffer.buffered() <= fed - position,
        "{} bytes buffered, {} fed since the last outcome",
        buffer.buffered(),
        fed - position
    );
}

/// What the buffer must yield for the frame starting at `position`.
struct Expected {
    result: Result<Option<Frame>, BufferError>,
    /// The stream offset by which the outcome can be known.
    known_at: usize,
    /// Where the next outcome starts.
    next: usize,
}

/// The reference: `decode_frame` on the whole stream from `position`, with
/// skipping and fatality as documented. When the frame does not end inside
/// the stream, only an error its header already determines can be reported.
fn reference_outcome(
    stream: &[u8],
    position: usize,
    fed: usize,
    limit: usize,
    phase: Phase,
) -> Expected {
    let rest = stream.get(position..).unwrap_or_default();
    let header = header_verdict(rest, limit, phase);
    match decode_frame(rest, limit, phase) {
        Ok(Decoded::Frame { frame, consumed }) => {
            assert_eq!(
                header, None,
                "the decoder accepted a frame its header rules out"
            );
            Expected {
                result: Ok(Some(frame)),
                known_at: position + consumed,
                next: position + consumed,
            }
        }
        Err(error) => {
            let len = frame_len(rest).expect("an error needs the length prefix");
            let known_at = match &header {
                Some((header_error, needed)) => {
                    assert_eq!(
                        *header_error, error,
                        "the decoder checks the header before the body"
                    );
                    position + needed
                }
                None => position + len,
            };
            Expected {
                result: Err(classify(error)),
                known_at,
                next: position + len,
            }
        }
        Ok(Decoded::Incomplete { .. }) => {
            // The stream ends inside this frame; it can only have been
            // reported if what was fed of its header already rules it out.
            let seen = &stream[position.min(fed)..fed];
            let Some((error, needed)) = header_verdict(seen, limit, phase) else {
                panic!("an outcome at byte {position}, where the stream holds no complete frame");
            };
            let len = frame_len(rest).expect("a header verdict needs the length prefix");
            Expected {
                result: Err(classify(error)),
                known_at: position + needed,
                next: position + len,
            }
        }
    }
}

/// Fatal errors end the stream; every other error skips the frame.
fn classify(error: DecodeError) -> BufferError {
    match error {
        DecodeError::FrameTooLarge { .. } | DecodeError::NotAuthenticated { .. } => {
            BufferError::Fatal(error)
        }
        other => BufferError::Skipped(other),
    }
}

/// The whole frame's length (prefix included), once the prefix is readable.
fn frame_len(bytes: &[u8]) -> Option<usize> {
    let prefix: [u8; 4] = bytes.get(..4)?.try_into().ok()?;
    Some(u32::from_be_bytes(prefix) as usize + 4)
}

/// The error that a frame's first bytes alone determine, written from the
/// wire format in `docs/protocol.md`, with the number of bytes it needs:
/// the length prefix (over the limit, or zero), the version byte, a body too
/// short for a tag, an unknown tag, a tag not allowed before authentication.
/// `None` if the bytes given rule nothing out (yet).
fn header_verdict(bytes: &[u8], limit: usize, phase: Phase) -> Option<(DecodeError, usize)> {
    let len = frame_len(bytes)? - 4;
    let max = limit.min(MAX_FRAME_LEN);
    if len > max {
        return Some((DecodeError::FrameTooLarge { len, max }, 4));
    }
    if len == 0 {
        return Some((DecodeError::Truncated, 4));
    }
    let &version = bytes.get(4)?;
    if version != PROTOCOL_VERSION {
        return Some((DecodeError::UnsupportedVersion { version }, 5));
    }
    if len < 5 {
        // The body cannot hold the four bytes of a tag.
        return Some((DecodeError::Truncated, 5));
    }
    let tag = u32::from_le_bytes(bytes.get(5..9)?.try_into().ok()?);
    let Some(name) = Frame::TAG_NAMES.get(tag as usize) else {
        return Some((DecodeError::UnknownFrameType { tag }, 9));
    };
    if phase == Phase::PreAuth && !["Hello", "Auth", "Anonymous"].contains(name) {
        return Some((DecodeError::NotAuthenticated { tag }, 9));
    }
    None
}

/// Seeds: streams of valid frames with an invalid one of each kind between
/// them, under every limit, fed at once, byte by byte and in uneven chunks,
/// in both phases, with and without `take_buffered`.
pub fn frame_buffer_seeds() -> Vec<Vec<u8>> {
    let frame = |frame: &Frame| frame_to_vec(frame).expect("sample frames encode");
    let ping = frame(&Frame::Ping(Ping { nonce: 7 }));
    let mut unknown_tag = ping.clone();
    unknown_tag[5..9].copy_from_slice(&200u32.to_le_bytes());
    let mut bad_version = ping.clone();
    bad_version[4] = PROTOCOL_VERSION + 1;
    let mut trailing = ping.clone();
    trailing.push(0);
    let len = (trailing.len() - 4) as u32;
    trailing[..4].copy_from_slice(&len.to_be_bytes());
    let short_body = vec![0, 0, 0, 2, PROTOCOL_VERSION, 0];
    let empty = vec![0, 0, 0, 0];
    let oversize = [&4097u32.to_be_bytes()[..], &[PROTOCOL_VERSION]].concat();
    let samples = crate::sample_frames();
    let hello = frame(&samples[0]);
    let auth = frame(&samples[2]);
    let mixed = [
        &hello[..],
        &ping,
        &unknown_tag,
        &auth,
        &bad_version,
        &trailing,
        &short_body,
        &ping,
        &empty,
        &ping,
    ]
    .concat();
    let every_frame: Vec<u8> = samples.iter().flat_map(frame).collect();

    let mut seeds = Vec::new();
    let patterns: [&[u8]; 3] = [&[], &[1], &[3, 0, 17, 250, 5]];
    for (index, pattern) in patterns.iter().enumerate() {
        for limit in 0..4u8 {
            let index = index as u8;
            // Any phase; take_buffered after the second frame, except when
            // fed byte by byte (nothing follows the frame yet then).
            let take = if index == 1 { 0 } else { 2 << 5 };
            seeds.push(seed(take | (limit << 3), pattern, &mixed));
            // The handshake's frames in PreAuth, then a Ping in Any; then a
            // Ping in PreAuth, which is fatal.
            seeds.push(seed(
                2 | (limit << 3),
                pattern,
                &[&hello[..], &auth, &ping].concat(),
            ));
            seeds.push(seed(
                2 | (limit << 3),
                pattern,
                &[&hello[..], &ping].concat(),
            ));
        }
        seeds.push(seed(3 << 3, pattern, &[&ping[..], &oversize].concat()));
        seeds.push(seed(3 << 3, pattern, &every_frame));
    }
    seeds
}

fn seed(config: u8, pattern: &[u8], stream: &[u8]) -> Vec<u8> {
    let mut seed = vec![config, pattern.len() as u8];
    seed.extend_from_slice(pattern);
    seed.extend_from_slice(stream);
    seed
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seeds_reach_frames_skips_fatal_errors_and_take_buffered() {
        let outcomes: Vec<FrameBufferOutcome> = frame_buffer_seeds()
            .iter()
            .map(|seed| run_frame_buffer(seed))
            .collect();
        assert!(outcomes.iter().any(|o| o.frames >= 5 && o.skipped >= 5));
        assert!(outcomes.iter().any(|o| o.fatal && o.frames == 1));
        assert!(
            outcomes
                .iter()
                .any(|o| o.taken.as_ref().is_some_and(|t| !t.is_empty()))
        );
        assert!(
            outcomes
                .iter()
                .any(|o| o.frames == Frame::TAG_NAMES.len() && !o.fatal)
        );
    }

    #[test]
    fn the_header_verdict_agrees_with_the_decoder_on_the_seeds() {
        // reference_outcome asserts the agreement; run every seed's stream
        // through it at every frame boundary the decoder finds.
        for seed in frame_buffer_seeds() {
            let stream = &seed[2 + usize::from(seed[1])..];
            let mut position = 0;
            while position < stream.len() {
                let expected = reference_outcome(stream, position, stream.len(), 4096, Phase::Any);
                if matches!(expected.result, Err(BufferError::Fatal(_))) {
                    break;
                }
                position = expected.next;
            }
        }
    }

    #[test]
    fn a_buffer_that_held_back_a_frame_would_be_caught() {
        // Two Pings fed at once: a buffer yielding only the first and then
        // None would leave a complete frame behind, which check_drained
        // refuses.
        let ping = frame_to_vec(&Frame::Ping(Ping { nonce: 1 })).expect("encodes");
        let stream = [&ping[..], &ping].concat();
        let mut buffer = FrameBuffer::new(1024);
        buffer.extend(&stream);
        assert!(matches!(buffer.next_frame(Phase::Any), Ok(Some(_))));
        let settings = Settings {
            limit: 1024,
            pre_auth_outcomes: 0,
            take_after_frames: 0,
            pattern: &[],
        };
        let caught = std::panic::catch_unwind(|| {
            check_drained(&buffer, &stream, ping.len(), stream.len(), &settings, 1)
        });
        assert!(caught.is_err());
        // The honest state passes: the first frame taken, three bytes of
        // the second fed.
        let mut buffer = FrameBuffer::new(1024);
        let fed = ping.len() + 3;
        buffer.extend(&stream[..fed]);
        assert!(matches!(buffer.next_frame(Phase::Any), Ok(Some(_))));
        check_drained(&buffer, &stream, ping.len(), fed, &settings, 1);
    }

    #[test]
    fn an_early_skip_is_accepted_only_once_its_header_was_fed() {
        let mut unknown = frame_to_vec(&Frame::Ping(Ping { nonce: 1 })).expect("encodes");
        unknown[5..9].copy_from_slice(&99u32.to_le_bytes());
        // The whole frame is in the stream, 9 bytes fed: an early skip is fine.
        let expected = reference_outcome(&unknown, 0, 9, 1024, Phase::Any);
        assert_eq!(
            expected.result,
            Err(BufferError::Skipped(DecodeError::UnknownFrameType {
                tag: 99
            }))
        );
        assert_eq!(expected.known_at, 9);
        // A stream cut after the tag: still determined by the header.
        let expected = reference_outcome(&unknown[..10], 0, 10, 1024, Phase::Any);
        assert_eq!(expected.known_at, 9);
        assert_eq!(expected.next, unknown.len());
        // A trailing-bytes error needs the whole frame.
        let mut trailing = frame_to_vec(&Frame::Ping(Ping { nonce: 1 })).expect("encodes");
        trailing.push(0);
        let len = (trailing.len() - 4) as u32;
        trailing[..4].copy_from_slice(&len.to_be_bytes());
        let expected = reference_outcome(&trailing, 0, trailing.len(), 1024, Phase::Any);
        assert_eq!(expected.known_at, trailing.len());
    }
}
