//! Target `file_token_logic`: the pure rules under the broker's token and
//! file requests and the client's file and token handling, which the
//! request handlers themselves (async, over QUIC) only reach through a
//! connection. The input is a sequence of operations, each an op byte and
//! its arguments:
//!
//! - sizes: `file::plain_len` of any sealed size gives a plain size that
//!   `file::sealed_len` maps back, and the other way round for every plain
//!   size whose sealed size fits a `u64`;
//! - the download `file::Opener` with any announced size, start position
//!   and sealed bytes (fed in pieces): it is created exactly for possible
//!   sizes and chunk-boundary positions inside the file, never panics,
//!   only moves forward by whole chunks, and opens nothing but chunks sealed
//!   with its key for exactly that index and last-chunk flag (the seeds'
//!   chunks carry their index and flag in their plaintext, so a chunk
//!   accepted at another place is caught), and finishes exactly at the end.
//!   A chunk is 64 KiB and its tag, more than an input holds, so what opens
//!   here are one-chunk files; of longer files only the first partial chunk
//!   is fed;
//! - upload offsets: `protocol::file::upload_room` against the rule in its
//!   documentation;
//! - token passwords: a sequence of verifiers presented to a
//!   `StoredToken` (`StoredToken::attempt`, the rule both stores apply)
//!   against a model of counting and locking, and `VerifierHash::matches`
//!   as equality;
//! - file quotas: `FileQuota::admits` against its rule;
//! - token content: `token::open_content` with a fixed key opens only what
//!   `seal_content` sealed, which re-seals to exactly the same bytes;
//! - slot routing: a token id drawn with `token::token_id_in_slot_of` (from
//!   a stream seeded by the input, which offers the owner's own bytes after
//!   256 draws to bound the cost) routes to its owner's slot.

use backbone_broker::store::{FilePut, FileQuota, StoredFile, StoredToken, TokenAttempt};
use backbone_client::file::{self, Opener, PLAIN_CHUNK, SEALED_CHUNK, TAG_LEN};
use backbone_client::token::{open_content, seal_content};
use backbone_protocol::Address;
use backbone_protocol::bytes::{ContentHash, FileId, FileSecret, PasswordVerifier, TokenId};
use backbone_protocol::file::{UploadError, upload_room};
use backbone_protocol::fleet::slot_of;
use backbone_protocol::token::{VerifierHash, token_id_in_slot_of};

/// The key of every file and token content the target opens.
const KEY: [u8; 32] = [0x5a; 32];

/// Reads the input a few bytes at a time; an input that runs out ends.
struct Input<'a>(&'a [u8]);

impl Input<'_> {
    fn byte(&mut self) -> Option<u8> {
        let (&byte, rest) = self.0.split_first()?;
        self.0 = rest;
        Some(byte)
    }

    fn bytes<const N: usize>(&mut self) -> Option<[u8; N]> {
        let (bytes, rest) = self.0.split_first_chunk::<N>()?;
        self.0 = rest;
        Some(*bytes)
    }

    fn u16(&mut self) -> Option<u16> {
        self.bytes().map(u16::from_le_bytes)
    }

    fn u64(&mut self) -> Option<u64> {
        self.bytes().map(u64::from_le_bytes)
    }

    /// A size: small (a `u16`) or anything (a `u64`), so that both everyday
    /// and boundary values come up.
    fn size(&mut self) -> Option<u64> {
        if self.byte()? % 2 == 0 {
            self.u16().map(u64::from)
        } else {
            self.u64()
        }
    }
}

/// Target `file_token_logic`: see the module documentation.
pub fn file_token_logic_target(data: &[u8]) {
    run_file_token_logic(data);
}

/// Runs the operations of `data`; returns how many ran.
pub fn run_file_token_logic(data: &[u8]) -> usize {
    let mut input = Input(data);
    let mut operations = 0;
    let mut routed = false;
    while let Some(op) = input.byte() {
        let ran = match op % 8 {
            0 => sizes(&mut input),
            1 => opener(&mut input),
            2 => upload(&mut input),
            3 => token_attempts(&mut input),
            4 => quota(&mut input),
            5 => token_content(&mut input),
            // Up to 257 hashes: once per input, so inputs repeating it do
            // not slow the run down.
            6 if !routed => {
                routed = true;
                slot_routing(&mut input)
            }
            6 => Some(()),
            _ => verifier_hashes(&mut input),
        };
        if ran.is_none() {
            break;
        }
        operations += 1;
    }
    operations
}

/// `plain_len` and `sealed_len` are inverse on every size that fits.
fn sizes(input: &mut Input<'_>) -> Option<()> {
    let size = input.size()?;
    if let Some(plain) = file::plain_len(size) {
        assert_eq!(
            file::sealed_len(plain),
            size,
            "sealed_len(plain_len({size}))"
        );
        assert_eq!(
            size - plain,
            file::chunk_count(plain) * TAG_LEN as u64,
            "one tag per chunk"
        );
    }
    // As a plain size: a file that large seals to `size + 16 per chunk`,
    // when that fits in a u64 (no file can be larger).
    let chunks = size.div_ceil(PLAIN_CHUNK as u64).max(1);
    assert_eq!(file::chunk_count(size), chunks);
    if let Some(sealed) = size.checked_add(chunks * TAG_LEN as u64) {
        assert_eq!(file::sealed_len(size), sealed);
        assert_eq!(file::plain_len(sealed), Some(size));
    }
    Some(())
}

/// The plaintext of chunk `index` (with its last-chunk flag) of the seed
/// files: it starts with the index and the flag, so a chunk that opens at
/// another place shows it, and runs on with a pattern for `len` bytes.
pub fn seed_chunk_plaintext(index: u64, last: bool, len: usize) -> Vec<u8> {
    let mut plain: Vec<u8> = index.to_le_bytes().to_vec();
    plain.push(u8::from(last));
    plain.extend(
        (0..)
            .map(|i: u32| (i * 7 % 251) as u8)
            .take(len.saturating_sub(9)),
    );
    plain.truncate(len);
    plain
}

/// The download opener. Reads the announced sealed size, the start (a
/// chunk index, or any position), the piece sizes, then takes the rest of
/// the input as the sealed bytes: this operation ends the input.
fn opener(input: &mut Input<'_>) -> Option<()> {
    let sealed_len = input.size()?;
    let position = match input.byte()? {
        mode if mode % 2 == 0 => u64::from(mode / 2) * SEALED_CHUNK,
        _ => input.u64()?,
    };
    let mut pieces: Vec<usize> = (0..input.byte()? % 8)
        .map(|_| input.u16().map(usize::from))
        .collect::<Option<_>>()?;
    // Pieces of zero bytes push nothing; if all are, the bytes go at once.
    if pieces.iter().all(|&piece| piece == 0) {
        pieces.clear();
    }
    let mut bytes = std::mem::take(&mut input.0);

    let valid = file::plain_len(sealed_len).is_some()
        && position.is_multiple_of(SEALED_CHUNK)
        && position <= sealed_len;
    let mut opener = match Opener::new(&KEY, sealed_len, position) {
        Ok(opener) => opener,
        Err(error) => {
            assert!(
                !valid,
                "an opener refused for {sealed_len} bytes at {position}: {error}"
            );
            return None;
        }
    };
    assert!(valid, "an opener made for {sealed_len} bytes at {position}");
    assert_eq!(opener.position(), position);
    let mut piece = 0;
    loop {
        let size = match pieces.as_slice() {
            [] => bytes.len(),
            pieces => pieces[piece % pieces.len()].min(bytes.len()),
        };
        piece += 1;
        let (now, rest) = bytes.split_at(size);
        bytes = rest;
        let before = opener.position();
        let mut plain = Vec::new();
        let pushed = opener.push(now, &mut plain);
        check_opened(before, opener.position(), sealed_len, &plain);
        if pushed.is_err() || bytes.is_empty() {
            break;
        }
    }
    let end = opener.position();
    assert_eq!(
        opener.finish().is_ok(),
        end == sealed_len,
        "finish at {end} of {sealed_len}"
    );
    None
}

/// Between two positions the opener went forward by whole chunks, and the
/// plaintext it gave is those chunks' seed plaintext.
fn check_opened(before: u64, after: u64, sealed_len: u64, plain: &[u8]) {
    assert!(
        before <= after && after <= sealed_len,
        "{before} → {after} of {sealed_len}"
    );
    assert!(
        after == sealed_len || after.is_multiple_of(SEALED_CHUNK),
        "the opener stopped inside a chunk at {after}"
    );
    let mut expected = Vec::new();
    let mut position = before;
    while position < after {
        let chunk = SEALED_CHUNK.min(sealed_len - position);
        let last = position + chunk == sealed_len;
        expected.extend(seed_chunk_plaintext(
            position / SEALED_CHUNK,
            last,
            (chunk - TAG_LEN as u64) as usize,
        ));
        position += chunk;
    }
    assert!(
        plain == expected.as_slice(),
        "the opener gave plaintext that was not sealed for chunks {before}..{after} of {sealed_len}"
    );
}

/// `upload_room(size, held, offset)` against its documentation: a complete
/// file takes nothing; otherwise the stream must start where the held
/// bytes end, and may carry the rest of the declared size.
fn upload(input: &mut Input<'_>) -> Option<()> {
    let size = input.size()?;
    let held = input.size()?;
    let offset = match input.byte()? {
        0 => input.size()?,
        _ => held,
    };
    let result = upload_room(size, held, offset);
    if held > size || (held == size && size > 0) {
        assert_eq!(result, Err(UploadError::Complete), "{size} {held} {offset}");
    } else if offset != held {
        assert_eq!(result, Err(UploadError::WrongOffset { held, offset }));
    } else {
        assert_eq!(result, Ok(size - held));
    }
    Some(())
}

/// A token with an optional password, then verifiers presented in turn:
/// the model counts wrong ones and locks at the limit, for good.
fn token_attempts(input: &mut Input<'_>) -> Option<()> {
    let password = input.byte()? % 3;
    let max_attempts = u32::from(input.byte()? % 5);
    let failed_before = u32::from(input.byte()?) << 24;
    let stored = (password > 0).then(|| PasswordVerifier([password; 32]).hash());
    let mut token = StoredToken {
        id: TokenId([1; 32]),
        owner: Address([2; 32]),
        created_at_ms: 0,
        expires_at_ms: 1,
        content: vec![3],
        verifier_hash: stored,
        failed_attempts: failed_before,
        locked: false,
    };
    let (mut failed, mut locked) = (failed_before, false);
    for _ in 0..input.byte()? % 8 {
        let presented = PasswordVerifier([input.byte()? % 3; 32]).hash();
        let expected = if locked {
            TokenAttempt::Locked
        } else if stored.is_some_and(|stored| stored != presented) {
            failed = failed.saturating_add(1);
            locked = failed >= max_attempts;
            TokenAttempt::Refused {
                failed_attempts: failed,
                locked,
            }
        } else {
            TokenAttempt::Opened(token.clone())
        };
        assert_eq!(token.attempt(&presented, max_attempts), expected);
        assert_eq!((token.failed_attempts, token.locked), (failed, locked));
    }
    Some(())
}

/// `FileQuota::admits` against its rule: the count limit first, then the
/// declared bytes (saturating).
fn quota(input: &mut Input<'_>) -> Option<()> {
    let quota = FileQuota {
        max_files: usize::from(input.byte()? % 8),
        max_bytes: input.size()?,
    };
    let file = |size| StoredFile {
        id: FileId([0; 32]),
        owner: Address([0; 32]),
        size,
        content_hash: ContentHash([0; 32]),
        secret_hash: FileSecret([0; 32]).hash(),
        expires_at_ms: 0,
        complete: false,
    };
    let held: Vec<StoredFile> = (0..input.byte()? % 8)
        .map(|_| input.size().map(file))
        .collect::<Option<_>>()?;
    let new = file(input.size()?);
    let bytes = held
        .iter()
        .fold(new.size, |sum, held| sum.saturating_add(held.size));
    let expected = if held.len() >= quota.max_files {
        FilePut::TooManyFiles
    } else if bytes > quota.max_bytes {
        FilePut::TooManyBytes
    } else {
        FilePut::Stored
    };
    assert_eq!(quota.admits(&held, &new), expected);
    Some(())
}

/// Token content under the fixed key: whatever opens re-seals to exactly
/// the same bytes (the nonce is fixed per key), so nothing but a sealing
/// opens. Takes a length byte, then that many bytes.
fn token_content(input: &mut Input<'_>) -> Option<()> {
    let len = usize::from(input.byte()?);
    let (sealed, rest) = input.0.split_at_checked(len)?;
    input.0 = rest;
    if let Ok(plain) = open_content(&KEY, sealed) {
        assert_eq!(
            seal_content(&KEY, &plain).expect("sealing succeeds"),
            sealed,
            "opened content that is not its own sealing"
        );
    }
    Some(())
}

/// A token id drawn for an owner routes to the owner's slot.
fn slot_routing(input: &mut Input<'_>) -> Option<()> {
    let owner = Address(input.bytes()?);
    let mut state = u64::from_le_bytes(input.bytes()?) | 1;
    // xorshift64: a cheap deterministic stream, so the input reproduces the
    // draws. One slot in 4096 matches, and each draw costs a hash; after
    // 256 draws the stream offers the owner's own bytes (in its slot by
    // definition), so an input costs at most 257 hashes here while the
    // search still runs, and still must return only an id in the slot.
    let mut draws = 0;
    let id = token_id_in_slot_of(&owner, |bytes| {
        draws += 1;
        if draws > 256 {
            *bytes = owner.0;
            return;
        }
        for chunk in bytes.chunks_mut(8) {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            chunk.copy_from_slice(&state.to_le_bytes()[..chunk.len()]);
        }
    });
    assert_eq!(slot_of(&id.route_address()), slot_of(&owner));
    assert_eq!(id.route_address(), Address(id.0));
    Some(())
}

/// `VerifierHash::matches` is equality; equal verifiers hash equally.
fn verifier_hashes(input: &mut Input<'_>) -> Option<()> {
    let a = VerifierHash(input.bytes()?);
    let b = VerifierHash(input.bytes()?);
    assert_eq!(a.matches(&b), a == b);
    assert!(a.matches(&a));
    let verifier = PasswordVerifier(a.0);
    assert!(verifier.hash().matches(&PasswordVerifier(a.0).hash()));
    Some(())
}

/// The sealed chunk `index` of a seed file of `plain_len` plain bytes.
fn seed_chunk(plain_len: u64, index: u64) -> Vec<u8> {
    let chunks = file::chunk_count(plain_len);
    let last = index + 1 == chunks;
    let len = if last {
        plain_len - index * PLAIN_CHUNK as u64
    } else {
        PLAIN_CHUNK as u64
    };
    file::seal_chunk(
        &KEY,
        index,
        last,
        &seed_chunk_plaintext(index, last, len as usize),
    )
}

/// Seeds: each operation with typical arguments; openers over genuine
/// one-chunk files (empty, short, a few hundred bytes) whole and in pieces,
/// a chunk sealed as not the last where it is, a start past the end; a
/// token locked by wrong passwords; genuine token content.
pub fn file_token_logic_seeds() -> Vec<Vec<u8>> {
    let mut seeds = Vec::new();
    // Sizes: small, a chunk boundary, u64::MAX.
    seeds.push([&[0, 0][..], &16u16.to_le_bytes()].concat());
    seeds.push([&[0, 1][..], &(SEALED_CHUNK + 17).to_le_bytes()].concat());
    seeds.push([&[0, 1][..], &u64::MAX.to_le_bytes()].concat());
    for plain_len in [0u64, 1, 9, 300] {
        let sealed = seed_chunk(plain_len, 0);
        let sealed_len = u16::try_from(sealed.len()).expect("one chunk");
        let opener = |position: u8, pieces: &[u16], bytes: &[u8]| {
            let mut seed = vec![1, 0];
            seed.extend(sealed_len.to_le_bytes());
            seed.push(position);
            seed.push(pieces.len() as u8);
            for piece in pieces {
                seed.extend(piece.to_le_bytes());
            }
            seed.extend_from_slice(bytes);
            seed
        };
        seeds.push(opener(0, &[], &sealed));
        seeds.push(opener(0, &[1, 7], &sealed));
        // Start past the end of the file: chunk 1 of a one-chunk file.
        seeds.push(opener(2, &[], &sealed));
        // Cut short, and one byte too many.
        seeds.push(opener(0, &[], &sealed[..sealed.len() - 1]));
        seeds.push(opener(0, &[], &[&sealed[..], &[0]].concat()));
        // The same bytes announced as the start of a two-chunk file: the
        // opener waits for a whole first chunk (64 KiB and its tag, more
        // than an input holds), so nothing may open.
        let mut longer = vec![1, 1];
        longer.extend((SEALED_CHUNK + 100).to_le_bytes());
        longer.extend([0, 0]);
        longer.extend_from_slice(&sealed);
        seeds.push(longer);
    }
    // Upload offsets: resuming, a wrong offset, complete, an empty file.
    for (size, held, offset) in [
        (100u16, 40u16, None),
        (100, 40, Some(0u16)),
        (100, 100, None),
        (0, 0, None),
    ] {
        let mut seed = vec![2, 0];
        seed.extend(size.to_le_bytes());
        seed.push(0);
        seed.extend(held.to_le_bytes());
        match offset {
            Some(offset) => {
                seed.extend([0, 0]);
                seed.extend(offset.to_le_bytes());
            }
            None => seed.push(1),
        }
        seeds.push(seed);
    }
    // A password token: three wrong verifiers with a limit of 2, then the
    // right one; and a token without a password.
    seeds.push(vec![3, 1, 2, 0, 4, 2, 2, 2, 1]);
    seeds.push(vec![3, 0, 2, 0, 2, 1, 2]);
    // Quotas: within, over the count, over the bytes.
    seeds.push(vec![4, 3, 0, 100, 0, 2, 0, 10, 0, 0, 20, 0, 0, 30, 0]);
    seeds.push(vec![4, 1, 0, 100, 0, 1, 0, 10, 0, 0, 20, 0]);
    seeds.push(vec![4, 3, 0, 100, 0, 1, 0, 90, 0, 0, 20, 0]);
    // Token content: genuine, and another key's.
    for (key, plain) in [(KEY, &b"a token's content"[..]), ([1; 32], b"other")] {
        let sealed = seal_content(&key, plain).expect("seal");
        seeds.push([&[5, sealed.len() as u8][..], &sealed].concat());
    }
    seeds.push([&[6][..], &[0x42; 32], &7u64.to_le_bytes()].concat());
    seeds.push([&[7][..], &[1; 32], &[1; 32]].concat());
    seeds
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_genuine_seed_file_opens_whole_and_in_pieces() {
        let sealed = seed_chunk(300, 0);
        let mut opener = Opener::new(&KEY, sealed.len() as u64, 0).expect("a one-chunk file");
        let mut plain = Vec::new();
        opener.push(&sealed[..7], &mut plain).expect("a piece");
        opener.push(&sealed[7..], &mut plain).expect("the rest");
        assert_eq!(plain, seed_chunk_plaintext(0, true, 300));
        assert!(opener.finish().is_ok());
    }

    #[test]
    fn the_seeds_run() {
        let seeds = file_token_logic_seeds();
        for seed in &seeds {
            run_file_token_logic(seed);
        }
    }

    #[test]
    fn a_chunk_opened_at_the_wrong_place_is_caught() {
        // Plaintext of chunk 0 sealed as the last, claimed for a chunk that
        // is not the last: check_opened refuses it.
        let plain = seed_chunk_plaintext(0, true, 100);
        let caught =
            std::panic::catch_unwind(|| check_opened(0, SEALED_CHUNK, 2 * SEALED_CHUNK, &plain));
        assert!(caught.is_err());
    }
}
