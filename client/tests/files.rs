//! Files end to end: upload and download (authenticated, anonymous, through
//! another node of a fleet), resumable uploads across a broker restart, the
//! content hash check, a source that changes between or during upload
//! attempts (never sealed under the old key), capability-gated downloads,
//! owner-only status and delete, size and quota limits, expiry, and bytes
//! left by a crash.

mod support;

use std::sync::Arc;
use std::time::Duration;

use backbone_client::file::{self, FileRef, FileSource};
use backbone_client::transport::RawConnection;
use backbone_client::{ClientError, FileFetcher};
use backbone_protocol::bytes::{ContentHash, FileId, FileSecret};
use backbone_protocol::codec;
use backbone_protocol::fleet::slot_of;
use backbone_protocol::frame::UploadFile;
use backbone_protocol::{ErrorCode, Frame};
use bytesize::ByteSize;
use support::{Identity, TestBroker, TestFleet};

const TTL: Duration = Duration::from_secs(3600);

/// Bytes that do not repeat within a chunk, so a plaintext window found on
/// disk would mean the broker stored plaintext.
fn content(len: usize, seed: u8) -> Vec<u8> {
    let mut bytes = vec![0u8; len];
    blake3::Hasher::new()
        .update(&[seed])
        .finalize_xof()
        .fill(&mut bytes);
    bytes
}

/// The sealed form of `plain` under `key`, as `put_file` uploads it.
fn seal(key: &[u8; 32], plain: &[u8]) -> Vec<u8> {
    let chunks = file::chunk_count(plain.len() as u64);
    let mut sealed = Vec::new();
    for index in 0..chunks {
        let start = (index as usize * file::PLAIN_CHUNK).min(plain.len());
        let end = (start + file::PLAIN_CHUNK).min(plain.len());
        sealed.extend(file::seal_chunk(
            key,
            index,
            index + 1 == chunks,
            &plain[start..end],
        ));
    }
    sealed
}

fn code<T: std::fmt::Debug>(result: Result<T, ClientError>) -> ErrorCode {
    match result {
        Err(error) => error
            .code()
            .unwrap_or_else(|| panic!("no error code in {error}")),
        Ok(value) => panic!("expected an error, got {value:?}"),
    }
}

async fn download(client: &backbone_client::Client, reference: &FileRef) -> Vec<u8> {
    let mut out = Vec::new();
    client
        .get_file(reference, &mut out)
        .await
        .expect("downloads");
    out
}

fn bytes_path(broker: &TestBroker, id: &FileId) -> std::path::PathBuf {
    broker.dir.path().join("files").join(hex::encode(id.0))
}

#[tokio::test]
async fn a_file_round_trips_and_the_broker_holds_only_ciphertext() {
    let broker = TestBroker::start().await;
    let (alice, bob) = (Identity::new(), Identity::new());
    let alice_client = alice.connect(&broker).await;
    let plain = content(3 * file::PLAIN_CHUNK + 1234, 1);
    let reference = alice_client
        .put_file(FileSource::Bytes(Arc::from(plain.clone())), TTL)
        .await
        .expect("uploads");
    // The shared text round-trips.
    let reference: FileRef = reference.to_text().parse().expect("parses");
    assert_eq!(
        slot_of(&reference.id.route_address()),
        slot_of(&alice.address())
    );

    let bob_client = bob.connect(&broker).await;
    assert_eq!(download(&bob_client, &reference).await, plain);
    let mut anonymous = Vec::new();
    FileFetcher::new(broker.connect_config())
        .get(&reference, &mut anonymous)
        .await
        .expect("downloads anonymously");
    assert_eq!(anonymous, plain);

    let state = alice_client
        .file_status(&reference.id)
        .await
        .expect("status");
    assert!(state.complete);
    assert_eq!(state.size, file::sealed_len(plain.len() as u64));
    assert_eq!(state.received, state.size);

    // On disk: the sealed bytes, no window of the plaintext.
    let on_disk = std::fs::read(bytes_path(&broker, &reference.id)).expect("bytes on disk");
    assert_eq!(on_disk.len() as u64, state.size);
    assert_eq!(on_disk, seal(&reference.key, &plain));
    for window in plain.chunks(64).step_by(97) {
        assert!(
            !on_disk.windows(window.len()).any(|w| w == window),
            "plaintext on disk"
        );
    }
    broker.shutdown().await;
}

#[tokio::test]
async fn empty_and_from_disk_files_round_trip() {
    let broker = TestBroker::start().await;
    let alice = Identity::new();
    let client = alice.connect(&broker).await;
    let empty = client
        .put_file(FileSource::Bytes(Arc::from(Vec::new())), TTL)
        .await
        .expect("uploads an empty file");
    assert_eq!(download(&client, &empty).await, Vec::<u8>::new());

    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("report.bin");
    let plain = content(2 * file::PLAIN_CHUNK, 2);
    std::fs::write(&path, &plain).expect("writes");
    let reference = client
        .put_file(FileSource::Path(path), TTL)
        .await
        .expect("uploads from disk");
    assert_eq!(download(&client, &reference).await, plain);
    broker.shutdown().await;
}

#[tokio::test]
async fn downloading_needs_the_capability_and_a_complete_file() {
    let broker = TestBroker::start().await;
    let (alice, bob) = (Identity::new(), Identity::new());
    let alice_client = alice.connect(&broker).await;
    let bob_client = bob.connect(&broker).await;
    let reference = alice_client
        .put_file(FileSource::Bytes(Arc::from(content(5000, 3))), TTL)
        .await
        .expect("uploads");
    let mut sink = Vec::new();

    // The id without its secret is not enough.
    let guessed = FileRef {
        secret: FileSecret([0; 32]),
        ..reference
    };
    assert_eq!(
        code(bob_client.get_file(&guessed, &mut sink).await),
        ErrorCode::Forbidden
    );
    let unknown = FileRef {
        id: FileId([9; 32]),
        ..reference
    };
    assert_eq!(
        code(bob_client.get_file(&unknown, &mut sink).await),
        ErrorCode::NotFound
    );
    // The right secret with the wrong key: the broker serves, nothing opens.
    let wrong_key = FileRef {
        key: [0; 32],
        ..reference
    };
    assert!(matches!(
        bob_client.get_file(&wrong_key, &mut sink).await,
        Err(ClientError::File(file::FileError::Undecryptable))
    ));
    assert!(sink.is_empty(), "nothing unverified reaches the sink");

    // A file still uploading cannot be downloaded.
    let secret = FileSecret::random();
    let created = alice_client
        .create_file(100, ContentHash::of(&[1; 100]), secret.hash(), TTL)
        .await
        .expect("creates");
    let partial = FileRef {
        id: created.file_id,
        secret,
        key: [0; 32],
    };
    assert_eq!(
        code(bob_client.get_file(&partial, &mut sink).await),
        ErrorCode::FileIncomplete
    );
    broker.shutdown().await;
}

#[tokio::test]
async fn an_upload_resumes_where_the_brokers_copy_ends_even_across_a_restart() {
    let mut broker = TestBroker::start().await;
    let alice = Identity::new();
    let client = alice.connect(&broker).await;
    let plain = content(4 * file::PLAIN_CHUNK + 77, 4);
    let key = [5u8; 32];
    let sealed = seal(&key, &plain);
    let secret = FileSecret::random();
    let created = client
        .create_file(
            sealed.len() as u64,
            ContentHash::of(&sealed),
            secret.hash(),
            TTL,
        )
        .await
        .expect("creates");
    let id = created.file_id;
    let reference = FileRef { id, secret, key };

    // Part of the bytes, then the stream ends.
    let first = 100_000;
    let state = client
        .upload_file_part(&id, 0, &sealed[..first])
        .await
        .expect("uploads a part");
    assert_eq!((state.received, state.complete), (first as u64, false));
    // Resuming anywhere but the end of the broker's copy is refused.
    for offset in [0, first as u64 - 1, first as u64 + 1] {
        assert_eq!(
            code(client.upload_file_part(&id, offset, b"x").await),
            ErrorCode::InvalidOffset
        );
    }
    drop(client);

    // The held bytes survive a restart; the library resumes from them.
    broker.restart().await;
    let client = alice.connect(&broker).await;
    assert_eq!(
        client.file_status(&id).await.expect("status").received,
        first as u64
    );
    client
        .resume_file_upload(&reference, FileSource::Bytes(Arc::from(plain.clone())))
        .await
        .expect("resumes");
    let state = client.file_status(&id).await.expect("status");
    assert!(state.complete);
    assert_eq!(download(&client, &reference).await, plain);
    // A complete file takes no more bytes.
    assert_eq!(
        code(client.upload_file_part(&id, state.size, b"x").await),
        ErrorCode::InvalidOffset
    );
    broker.shutdown().await;
}

#[tokio::test]
async fn a_resumed_upload_over_damaged_bytes_starts_over_and_completes() {
    let broker = TestBroker::start().await;
    let client = Identity::new().connect(&broker).await;
    let plain = content(3 * file::PLAIN_CHUNK, 11);
    let source = FileSource::Bytes(Arc::from(plain.clone()));
    let reference = client
        .announce_file(source.clone(), TTL)
        .await
        .expect("announces");
    let sealed = seal(&reference.key, &plain);
    client
        .upload_file_part(&reference.id, 0, &sealed[..100_000])
        .await
        .expect("a part");
    // What a crash can leave: the held bytes are not what was sent.
    let path = bytes_path(&broker, &reference.id);
    let mut held = std::fs::read(&path).expect("held bytes");
    held[50_000] ^= 0xff;
    std::fs::write(&path, &held).expect("damages");
    client
        .resume_file_upload(&reference, source)
        .await
        .expect("starts over and completes");
    assert_eq!(download(&client, &reference).await, plain);
    broker.shutdown().await;
}

/// Flips one byte of the file at `path`, in place, with a single write: a
/// reader holding the file open sees the old byte or the new one.
fn flip_byte(path: &std::path::Path, at: u64) {
    use std::io::{Read, Seek, SeekFrom, Write};
    let mut file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .expect("opens the source");
    let mut byte = [0u8];
    file.seek(SeekFrom::Start(at)).expect("seeks");
    file.read_exact(&mut byte).expect("reads");
    file.seek(SeekFrom::Start(at)).expect("seeks");
    file.write_all(&[byte[0] ^ 0x5a]).expect("writes");
}

#[tokio::test]
async fn resuming_from_a_changed_source_is_refused_and_sends_nothing_under_the_old_key() {
    let broker = TestBroker::start().await;
    let client = Identity::new().connect(&broker).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("report.bin");
    let plain = content(4 * file::PLAIN_CHUNK + 77, 12);
    std::fs::write(&path, &plain).expect("writes");
    let source = FileSource::Path(path.clone());
    let reference = client
        .announce_file(source.clone(), TTL)
        .await
        .expect("announces");
    // An upload cut off in the middle of the second chunk.
    let sealed = seal(&reference.key, &plain);
    let held = 100_000;
    assert!(held > file::SEALED_CHUNK as usize && held < 2 * file::SEALED_CHUNK as usize);
    client
        .upload_file_part(&reference.id, 0, &sealed[..held])
        .await
        .expect("a part");

    // The source changes after the resume point, in the chunk it falls in:
    // the old code sealed that chunk's tail again from the new content
    // under the same key and nonce, then, on the hash mismatch, the whole
    // file.
    let changed_at = file::PLAIN_CHUNK as u64 + 40_000;
    flip_byte(&path, changed_at);
    let resumed = client.resume_file_upload(&reference, source.clone()).await;

    // Nothing reached the broker: its copy is the prefix of the original,
    // byte for byte, and it still resumes there.
    let bytes = bytes_path(&broker, &reference.id);
    assert!(
        std::fs::read(&bytes).ok().as_deref() == Some(&sealed[..held]),
        "the broker's copy changed: bytes sealed from the changed source were sent under the \
         old key"
    );
    let state = client.file_status(&reference.id).await.expect("status");
    assert_eq!((state.received, state.complete), (held as u64, false));
    assert!(
        matches!(resumed, Err(ClientError::SourceChanged)),
        "expected SourceChanged, got {resumed:?}"
    );
    let message = resumed.expect_err("refused").to_string();
    assert!(message.contains("upload it anew"), "{message}");

    // A source of another length is refused as well.
    std::fs::write(&path, &plain[..plain.len() - 1]).expect("writes");
    assert!(matches!(
        client.resume_file_upload(&reference, source.clone()).await,
        Err(ClientError::SourceChanged)
    ));

    // The original content resumes where the broker's copy ends.
    std::fs::write(&path, &plain).expect("writes");
    client
        .resume_file_upload(&reference, source.clone())
        .await
        .expect("resumes from the original");
    assert_eq!(download(&client, &reference).await, plain);
    // A complete file is not "resumed" from a changed source either.
    flip_byte(&path, 0);
    assert!(matches!(
        client.resume_file_upload(&reference, source).await,
        Err(ClientError::SourceChanged)
    ));
    broker.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn put_file_uploads_a_source_changed_mid_upload_as_a_new_file_and_deletes_the_old_one() {
    // The smallest stream window keeps the client within a chunk or two of
    // what the broker has written, so the change below comes long before
    // the upload reaches the last chunk.
    let broker = TestBroker::start_with(|config| {
        config.transport.stream_receive_window = ByteSize::kib(64);
    })
    .await;
    let client = Arc::new(Identity::new().connect(&broker).await);
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("report.bin");
    let mut plain = content(4 * 1024 * 1024, 15);
    std::fs::write(&path, &plain).expect("writes");
    let upload = {
        let (client, path) = (client.clone(), path.clone());
        tokio::spawn(async move { client.put_file(FileSource::Path(path), TTL).await })
    };

    // The first file's bytes start arriving: change the source's last chunk.
    let files = broker.dir.path().join("files");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    let first = loop {
        let started = std::fs::read_dir(&files)
            .expect("the file directory")
            .filter_map(Result::ok)
            .find(|entry| entry.metadata().is_ok_and(|metadata| metadata.len() > 0));
        if let Some(entry) = started {
            break entry.file_name();
        }
        assert!(tokio::time::Instant::now() < deadline, "no upload started");
        tokio::time::sleep(Duration::from_millis(5)).await;
    };
    let changed_at = plain.len() as u64 - 10;
    flip_byte(&path, changed_at);
    plain[changed_at as usize] ^= 0x5a;

    let reference = tokio::time::timeout(Duration::from_secs(120), upload)
        .await
        .expect("the upload finishes in time")
        .expect("the task ran")
        .expect("put_file uploads the changed source as a new file");
    let first = FileId(
        hex::decode(first.to_str().expect("hex"))
            .expect("hex")
            .try_into()
            .expect("32 bytes"),
    );
    assert_ne!(
        reference.id, first,
        "a new file, not the one announced first"
    );
    assert_eq!(download(&client, &reference).await, plain);
    // The first file is gone, bytes and record.
    assert!(!bytes_path(&broker, &first).exists());
    assert_eq!(code(client.file_status(&first).await), ErrorCode::NotFound);
    let left: Vec<_> = std::fs::read_dir(&files)
        .expect("the file directory")
        .filter_map(Result::ok)
        .map(|entry| entry.file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(
        left,
        [hex::encode(reference.id.0)],
        "only the new file's bytes"
    );
    broker.shutdown().await;
}

#[tokio::test]
async fn bytes_that_do_not_match_the_hash_are_discarded_and_bytes_past_the_size_refused() {
    let broker = TestBroker::start().await;
    let client = Identity::new().connect(&broker).await;
    let good = content(10_000, 5);
    let mut bad = good.clone();
    bad[9_999] ^= 1;
    let created = client
        .create_file(
            10_000,
            ContentHash::of(&good),
            FileSecret::random().hash(),
            TTL,
        )
        .await
        .expect("creates");
    let id = created.file_id;
    assert_eq!(
        code(client.upload_file_part(&id, 0, &bad).await),
        ErrorCode::ContentMismatch
    );
    let state = client.file_status(&id).await.expect("status");
    assert_eq!((state.received, state.complete), (0, false));
    // Too long: nothing of the stream is kept.
    client
        .upload_file_part(&id, 0, &good[..4_000])
        .await
        .expect("a part");
    assert_eq!(
        code(
            client
                .upload_file_part(&id, 4_000, &[good.as_slice(), b"!"].concat()[4_000..])
                .await
        ),
        ErrorCode::InvalidOffset
    );
    assert_eq!(
        client.file_status(&id).await.expect("status").received,
        4_000
    );
    let state = client
        .upload_file_part(&id, 4_000, &good[4_000..])
        .await
        .expect("the rest");
    assert!(state.complete);
    broker.shutdown().await;
}

#[tokio::test]
async fn only_the_owner_sees_or_deletes_a_file_and_deleting_removes_its_bytes() {
    let broker = TestBroker::start().await;
    let (alice, bob) = (Identity::new(), Identity::new());
    let alice_client = alice.connect(&broker).await;
    let bob_client = bob.connect(&broker).await;
    let reference = alice_client
        .put_file(FileSource::Bytes(Arc::from(content(1000, 6))), TTL)
        .await
        .expect("uploads");
    let path = bytes_path(&broker, &reference.id);
    assert!(path.exists());
    assert_eq!(
        code(bob_client.file_status(&reference.id).await),
        ErrorCode::NotFound
    );
    assert_eq!(
        code(bob_client.delete_file(&reference.id).await),
        ErrorCode::NotFound
    );
    assert_eq!(
        code(bob_client.upload_file_part(&reference.id, 0, b"x").await),
        ErrorCode::NotFound
    );
    alice_client
        .delete_file(&reference.id)
        .await
        .expect("deletes");
    assert!(!path.exists(), "the bytes are gone");
    let mut sink = Vec::new();
    assert_eq!(
        code(bob_client.get_file(&reference, &mut sink).await),
        ErrorCode::NotFound
    );
    assert_eq!(
        code(alice_client.delete_file(&reference.id).await),
        ErrorCode::NotFound
    );
    broker.shutdown().await;
}

#[tokio::test]
async fn the_size_limit_and_the_quota_hold() {
    let broker = TestBroker::start_with(|config| {
        config.files.max_size = ByteSize::kib(64);
        config.files.max_files_per_identity = 2;
        config.files.max_bytes_per_identity = ByteSize::kib(100);
    })
    .await;
    let client = Identity::new().connect(&broker).await;
    let create = |size: u64| {
        let client = &client;
        async move {
            client
                .create_file(size, ContentHash::of(b""), FileSecret::random().hash(), TTL)
                .await
        }
    };
    assert_eq!(code(create(64 * 1024 + 1).await), ErrorCode::FileTooLarge);
    let first = create(60 * 1024).await.expect("first fits");
    // 60 KiB + 60 KiB would pass the 100 KiB of the identity.
    assert_eq!(code(create(60 * 1024).await), ErrorCode::QuotaExceeded);
    create(10 * 1024).await.expect("second fits");
    assert_eq!(code(create(1).await), ErrorCode::QuotaExceeded);
    // Deleting frees room.
    client.delete_file(&first.file_id).await.expect("deletes");
    create(60 * 1024).await.expect("fits again");
    broker.shutdown().await;
}

#[tokio::test]
async fn a_file_expires_with_its_bytes() {
    let broker = TestBroker::start().await;
    let client = Identity::new().connect(&broker).await;
    let reference = client
        .put_file(
            FileSource::Bytes(Arc::from(content(2000, 7))),
            Duration::from_secs(60),
        )
        .await
        .expect("uploads");
    let path = bytes_path(&broker, &reference.id);
    assert!(path.exists());
    broker.advance_clock(Duration::from_secs(61));
    let mut sink = Vec::new();
    assert_eq!(
        code(client.get_file(&reference, &mut sink).await),
        ErrorCode::NotFound
    );
    // The sweep (every 50 ms in tests) deletes the bytes too.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while path.exists() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "expired bytes still on disk"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    broker.shutdown().await;
}

#[tokio::test]
async fn bytes_without_a_record_are_deleted_at_start() {
    let mut broker = TestBroker::start().await;
    let client = Identity::new().connect(&broker).await;
    let kept = client
        .put_file(FileSource::Bytes(Arc::from(content(100, 8))), TTL)
        .await
        .expect("uploads");
    drop(client);
    let files = broker.dir.path().join("files");
    let orphan = files.join(hex::encode([0xab; 32]));
    std::fs::write(&orphan, b"left by a crash").expect("writes");
    std::fs::write(files.join("not-a-file-id"), b"junk").expect("writes");
    broker.restart().await;
    assert!(!orphan.exists());
    assert!(!files.join("not-a-file-id").exists());
    assert!(
        bytes_path(&broker, &kept.id).exists(),
        "a recorded file stays"
    );
    broker.shutdown().await;
}

#[tokio::test]
async fn an_anonymous_session_may_download_but_not_upload() {
    let broker = TestBroker::start().await;
    let client = Identity::new().connect(&broker).await;
    let reference = client
        .put_file(FileSource::Bytes(Arc::from(content(10, 9))), TTL)
        .await
        .expect("uploads");
    let mut raw = RawConnection::connect(&broker.connect_config())
        .await
        .expect("connects");
    raw.open_anonymous().await.expect("anonymous");
    let (mut send, mut recv) = raw.connection().open_bi().await.expect("stream");
    let header = codec::frame_to_vec(&Frame::UploadFile(UploadFile {
        request_id: 7,
        file_id: reference.id,
        offset: 0,
    }))
    .expect("encodes");
    send.write_all(&header).await.expect("writes");
    send.finish().expect("finishes");
    let answer = recv.read_to_end(4096).await.expect("an answer");
    match codec::decode_frame(&answer, 4096, codec::Phase::Any) {
        Ok(codec::Decoded::Frame {
            frame: Frame::Error(error),
            ..
        }) => {
            assert_eq!(error.request_id, 7);
            assert_eq!(error.code, ErrorCode::NotAuthenticated as u16);
        }
        other => panic!("expected NotAuthenticated, got {other:?}"),
    }
    raw.close().await;
    broker.shutdown().await;
}

#[tokio::test]
async fn a_file_is_downloaded_through_another_node_of_a_fleet() {
    let fleet = TestFleet::start(2).await;
    let alice = fleet.identity_on(1);
    let bob = fleet.identity_on(0);
    let alice_client = fleet.connect(&alice, 1).await;
    let plain = content(file::PLAIN_CHUNK + 5, 10);
    let reference = alice_client
        .put_file(FileSource::Bytes(Arc::from(plain.clone())), TTL)
        .await
        .expect("uploads");
    assert_eq!(fleet.home_of(&reference.id.route_address()), 1);
    // Bob's session is on node 0: the broker redirects the download.
    let bob_client = fleet.connect(&bob, 0).await;
    assert_eq!(download(&bob_client, &reference).await, plain);
    // So does an anonymous fetch entering through node 0.
    let mut anonymous = Vec::new();
    FileFetcher::new(fleet.connect_config(0))
        .get(&reference, &mut anonymous)
        .await
        .expect("downloads");
    assert_eq!(anonymous, plain);
    fleet.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn put_file_survives_a_broker_restart_in_the_middle_of_the_upload() {
    let mut broker = TestBroker::start().await;
    let alice = Identity::new();
    let mut options = alice.options(&broker);
    options.backoff = backbone_client::Backoff {
        initial: Duration::from_millis(50),
        max: Duration::from_millis(200),
    };
    let client = Arc::new(
        backbone_client::Client::connect(options)
            .await
            .expect("connects"),
    );
    let plain = content(48 * 1024 * 1024, 14);
    let upload = {
        let (client, plain) = (client.clone(), plain.clone());
        tokio::spawn(async move {
            client
                .put_file(FileSource::Bytes(Arc::from(plain)), TTL)
                .await
        })
    };
    // Wait until some of the bytes are on disk, then restart the broker.
    let files = broker.dir.path().join("files");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    let held_before = loop {
        let held: u64 = std::fs::read_dir(&files)
            .expect("the file directory")
            .filter_map(|entry| entry.ok()?.metadata().ok())
            .map(|metadata| metadata.len())
            .sum();
        if held > 0 {
            break held;
        }
        assert!(tokio::time::Instant::now() < deadline, "no upload started");
        tokio::time::sleep(Duration::from_millis(5)).await;
    };
    broker.restart().await;
    let reference = tokio::time::timeout(Duration::from_secs(120), upload)
        .await
        .expect("the upload finishes in time")
        .expect("the task ran")
        .expect("the upload completes across the restart");
    let sealed_size = file::sealed_len(plain.len() as u64);
    assert!(
        held_before < sealed_size,
        "the restart came in the middle of the upload"
    );
    assert_eq!(download(&client, &reference).await, plain);
    broker.shutdown().await;
}
