//! Frame I/O over one QUIC stream: a reader feeding the protocol's sans-IO
//! [`FrameBuffer`], and an [`Outbox`] whose senders write the stream
//! themselves, batching what is queued into few stream writes, with the
//! bytes waiting bounded.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use backbone_protocol::codec::{self, BufferError, FrameBuffer, Phase};
use backbone_protocol::{ErrorCode, Frame};
use bytes::Bytes;
use tokio::sync::{Notify, mpsc};

/// Reads frames from a receive stream.
pub struct FrameReader {
    recv: quinn::RecvStream,
    buffer: FrameBuffer,
}

/// What went wrong reading a frame.
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    /// The peer finished or reset the stream, or the connection closed.
    #[error("stream closed")]
    Closed,
    /// The frame was invalid (skipped or fatal).
    #[error(transparent)]
    Frame(#[from] BufferError),
}

impl FrameReader {
    /// A reader with the given frame size limit.
    pub fn new(recv: quinn::RecvStream, max_frame_len: usize) -> Self {
        Self {
            recv,
            buffer: FrameBuffer::new(max_frame_len),
        }
    }

    /// The stream and the bytes read past the last frame taken: an upload
    /// stream's first raw bytes.
    pub fn into_parts(mut self) -> (quinn::RecvStream, Vec<u8>) {
        let rest = self.buffer.take_buffered();
        (self.recv, rest)
    }

    /// Changes the frame limit (raised once the client authenticates).
    pub fn set_max_frame_len(&mut self, max_frame_len: usize) {
        self.buffer.set_max_frame_len(max_frame_len);
    }

    /// The next frame.
    pub async fn next(&mut self, phase: Phase) -> Result<Frame, ReadError> {
        loop {
            if let Some(frame) = self.buffer.next_frame(phase)? {
                return Ok(frame);
            }
            match self.recv.read_chunk(64 * 1024, true).await {
                Ok(Some(chunk)) => self.buffer.extend(&chunk.bytes),
                Ok(None) | Err(_) => return Err(ReadError::Closed),
            }
        }
    }
}

/// The sending end of a connection's outgoing frames, bounded in bytes.
///
/// Frames are encoded by the sender and queued as bytes, so the queue knows
/// exactly what it holds. [`Outbox::send`] waits while the bytes queued and
/// not yet taken by QUIC are at the connection's budget: a client that does
/// not read makes its answers and pushes wait instead of piling up, and the
/// session stops reading its requests ([`Outbox::room`]). A frame is let in
/// whenever the queue is under the budget, so a frame larger than the
/// budget still passes, alone.
///
/// There is no writer task: the sender that finds the stream free writes
/// what is queued itself, for itself and for every frame queued meanwhile,
/// and puts the stream back when the queue is empty. So a frame costs no
/// hand-off to another task (one wake-up fewer for each answer and push),
/// an idle connection holds no writer task and channel, and frames queued
/// together still go out in one write. Only when QUIC cannot take a write
/// at once (the peer's window is full) does a task take over the stream
/// and wait for the peer; the sender returns.
#[derive(Clone, Debug)]
pub struct Outbox {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    budget: Budget,
    pending: Mutex<Pending>,
    /// Closed with `Overloaded` when a write makes no progress in time.
    connection: quinn::Connection,
    stall_timeout: std::time::Duration,
}

/// What waits for the stream, and the stream while no sender writes.
#[derive(Debug)]
struct Pending {
    frames: Vec<Bytes>,
    stream: Option<quinn::SendStream>,
}

/// The bytes and frames queued for one connection and their limits.
#[derive(Debug)]
struct Budget {
    limit: AtomicUsize,
    queued: AtomicUsize,
    frame_limit: usize,
    frames: AtomicUsize,
    /// Set when writing has failed: nothing will drain any more.
    closed: AtomicBool,
    drained: Notify,
}

impl Budget {
    /// Waits until the queue is under its limits; `Err` once writing has
    /// failed.
    async fn room(&self) -> Result<(), OutboxClosed> {
        loop {
            let notified = self.drained.notified();
            tokio::pin!(notified);
            // Registered before the check, so a drain between the check and
            // the wait still wakes us.
            notified.as_mut().enable();
            if self.closed.load(Ordering::Acquire) {
                return Err(OutboxClosed);
            }
            if self.queued.load(Ordering::Acquire) < self.limit.load(Ordering::Relaxed)
                && self.frames.load(Ordering::Acquire) < self.frame_limit
            {
                return Ok(());
            }
            notified.await;
        }
    }

    fn release(&self, bytes: usize, frames: usize) {
        self.queued.fetch_sub(bytes, Ordering::AcqRel);
        self.frames.fetch_sub(frames, Ordering::AcqRel);
        self.drained.notify_waiters();
    }

    fn close(&self) {
        self.closed.store(true, Ordering::Release);
        self.drained.notify_waiters();
    }
}

/// The connection's output has failed; the frame was not sent.
#[derive(Debug, thiserror::Error)]
#[error("the connection's writer has stopped")]
pub struct OutboxClosed;

impl Outbox {
    /// Queues `frame`, waiting while the connection's output is at its
    /// budget, and writes the queue if no other sender is writing.
    ///
    /// A push's envelope is queued as it is, shared, after the frame's
    /// other bytes ([`codec::encode_frame_shared`]): QUIC takes the pieces
    /// without the envelope being copied into the frame.
    pub async fn send(&self, frame: Frame) -> Result<(), OutboxClosed> {
        let mut bytes = Vec::new();
        let payload = match codec::encode_frame_shared(&frame, &mut bytes) {
            Ok(payload) => payload,
            Err(error) => {
                tracing::error!(%error, tag = frame.tag(), "cannot encode outgoing frame");
                return Ok(());
            }
        };
        drop(frame);
        let len = bytes.len() + payload.as_ref().map_or(0, Bytes::len);
        let pieces = 1 + usize::from(payload.is_some());
        self.inner.budget.room().await?;
        let stream = {
            let mut pending = self.inner.lock();
            if self.inner.budget.closed.load(Ordering::Acquire) {
                return Err(OutboxClosed);
            }
            self.inner.budget.queued.fetch_add(len, Ordering::AcqRel);
            self.inner.budget.frames.fetch_add(pieces, Ordering::AcqRel);
            pending.frames.push(Bytes::from(bytes));
            pending.frames.extend(payload);
            match pending.stream.take() {
                Some(stream) => stream,
                // Another sender is writing and takes this frame too.
                None => return Ok(()),
            }
        };
        Writing::new(self.inner.clone(), stream).write_now()
    }

    /// Waits until the connection's output is under its budget: the session
    /// reads the next request only then.
    pub async fn room(&self) -> Result<(), OutboxClosed> {
        self.inner.budget.room().await
    }

    /// Changes the budget (an authenticated session gets a larger one
    /// than a connection still in its handshake).
    pub fn set_budget(&self, bytes: usize) {
        self.inner.budget.limit.store(bytes, Ordering::Relaxed);
        self.inner.budget.drained.notify_waiters();
    }

    /// Bytes queued and not yet taken by QUIC.
    pub fn queued(&self) -> usize {
        self.inner.budget.queued.load(Ordering::Acquire)
    }
}

impl Inner {
    fn lock(&self) -> std::sync::MutexGuard<'_, Pending> {
        // Nothing panics while holding it; a poisoned lock still holds a
        // consistent queue.
        self.pending
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

impl Drop for Inner {
    /// The last sender is gone and nothing is being written: the stream
    /// ends after what was written.
    fn drop(&mut self) {
        let pending = self
            .pending
            .get_mut()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(stream) = &mut pending.stream {
            let _ = stream.finish();
        }
    }
}

/// A sender holding the stream, writing the queue until it is empty.
struct Writing {
    inner: Arc<Inner>,
    stream: Option<quinn::SendStream>,
    /// The frames taken from the queue, written up to `at`.
    chunks: Vec<Bytes>,
    at: usize,
}

impl Writing {
    fn new(inner: Arc<Inner>, stream: quinn::SendStream) -> Self {
        Self {
            inner,
            stream: Some(stream),
            chunks: Vec::new(),
            at: 0,
        }
    }

    /// Writes the queue for as long as QUIC takes it at once. A write that
    /// would wait for the peer (its flow-control window is full) is left to
    /// a task that waits for it, so a sender (a session, its delivery task)
    /// never waits inside a write: like with a writer task, it waits only
    /// for room in the budget, and the session goes on reading requests
    /// until the budget is full.
    fn write_now(mut self) -> Result<(), OutboxClosed> {
        while self.take_queue() {
            while self.at < self.chunks.len() {
                let polled = {
                    let stream = self.stream.as_mut().expect("held while writing");
                    let mut write =
                        std::pin::pin!(stream.write_chunks(&mut self.chunks[self.at..]));
                    // One poll: quinn writes what the windows allow now, or
                    // nothing and keeps the waker, which the task's first
                    // poll replaces.
                    write
                        .as_mut()
                        .poll(&mut std::task::Context::from_waker(std::task::Waker::noop()))
                };
                match polled {
                    std::task::Poll::Ready(Ok(written)) => self.wrote(written),
                    std::task::Poll::Ready(Err(_)) => return Err(self.fail()),
                    std::task::Poll::Pending => {
                        tokio::spawn(self.write_all());
                        return Ok(());
                    }
                }
            }
        }
        Ok(())
    }

    /// Writes the queue until it is empty, waiting for the peer; a write
    /// that takes no byte for the stall timeout closes the connection.
    async fn write_all(mut self) {
        loop {
            while self.at < self.chunks.len() {
                let stream = self.stream.as_mut().expect("held while writing");
                let written = tokio::time::timeout(
                    self.inner.stall_timeout,
                    stream.write_chunks(&mut self.chunks[self.at..]),
                )
                .await;
                match written {
                    Ok(Ok(written)) => self.wrote(written),
                    Ok(Err(_)) => {
                        self.fail();
                        return;
                    }
                    Err(_) => {
                        metrics::counter!("backbone_connections_closed_total", "reason" => "output_stalled")
                            .increment(1);
                        tracing::debug!("output stalled; closing the connection");
                        self.inner.connection.close(
                            quinn::VarInt::from_u32(ErrorCode::Overloaded as u32),
                            b"output not drained in time",
                        );
                        self.fail();
                        return;
                    }
                }
            }
            if !self.take_queue() {
                return;
            }
        }
    }

    /// Takes what is queued; when nothing is, gives the stream back and
    /// returns `false`.
    fn take_queue(&mut self) -> bool {
        let mut pending = self.inner.lock();
        if pending.frames.is_empty() {
            pending.stream = self.stream.take();
            return false;
        }
        self.chunks.clear();
        self.at = 0;
        std::mem::swap(&mut self.chunks, &mut pending.frames);
        true
    }

    fn wrote(&mut self, written: quinn::Written) {
        self.at += written.chunks;
        self.inner.budget.release(written.bytes, written.chunks);
    }

    /// The stream failed: senders waiting for room are woken with
    /// `OutboxClosed`, and what is queued is dropped.
    fn fail(&mut self) -> OutboxClosed {
        self.stream = None;
        self.chunks.clear();
        let mut pending = self.inner.lock();
        self.inner.budget.close();
        pending.frames.clear();
        OutboxClosed
    }
}

/// How a connection's outbox behaves.
#[derive(Clone, Copy, Debug)]
pub struct OutboxLimits {
    /// Pieces queued at most: a frame is one, a push whose envelope is
    /// queued as it is two (see [`Outbox::send`]).
    pub frames: usize,
    /// Bytes queued above which senders wait (see [`Outbox`]).
    pub budget: usize,
    /// A write that takes no byte for this long closes the connection.
    pub stall_timeout: std::time::Duration,
}

/// An [`Outbox`] with `limits` writing to `send`. Frames queued together
/// go out in one write; the stream is finished when every sender is
/// dropped. A write that makes no progress for `limits.stall_timeout` (the
/// client neither reads nor acknowledges) closes `connection` with
/// `Overloaded`.
pub fn outbox(
    connection: quinn::Connection,
    send: quinn::SendStream,
    limits: OutboxLimits,
) -> Outbox {
    Outbox {
        inner: Arc::new(Inner {
            budget: Budget {
                limit: AtomicUsize::new(limits.budget),
                queued: AtomicUsize::new(0),
                frame_limit: limits.frames,
                frames: AtomicUsize::new(0),
                closed: AtomicBool::new(false),
                drained: Notify::new(),
            },
            pending: Mutex::new(Pending {
                frames: Vec::new(),
                stream: Some(send),
            }),
            connection,
            stall_timeout: limits.stall_timeout,
        }),
    }
}

/// Spawns the task that writes frames from `rx` to `send`, each encoded by
/// `encode`, coalescing whatever is queued into one write (node-to-node
/// links, whose queues the links bound themselves). It ends when every
/// sender is dropped or the stream fails, and finishes the stream on the
/// way out.
pub fn spawn_writer_with<T: Send + 'static>(
    mut send: quinn::SendStream,
    mut rx: mpsc::Receiver<T>,
    encode: fn(&T, &mut Vec<u8>),
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        // Grows with the largest batch written; idle connections keep it empty.
        let mut buf = Vec::new();
        while let Some(frame) = rx.recv().await {
            buf.clear();
            encode(&frame, &mut buf);
            while buf.len() < 256 * 1024 {
                match rx.try_recv() {
                    Ok(frame) => encode(&frame, &mut buf),
                    Err(_) => break,
                }
            }
            if send.write_all(&buf).await.is_err() {
                return;
            }
        }
        let _ = send.finish();
    })
}

#[cfg(test)]
mod tests {
    use std::net::SocketAddr;
    use std::time::Duration;

    use backbone_protocol::frame::Ping;
    use quinn::crypto::rustls::QuicClientConfig;

    use super::*;
    use crate::config::{TlsConfig, TransportConfig};

    /// A server and a client endpoint on loopback and one bidirectional
    /// stream between them: the server's send half, the client's receive
    /// half. The client's stream window is `window` bytes, so a test can
    /// make the server's writes wait by not reading.
    struct Pair {
        server_connection: quinn::Connection,
        server_send: quinn::SendStream,
        client_recv: quinn::RecvStream,
        _client_send: quinn::SendStream,
        _endpoints: (quinn::Endpoint, quinn::Endpoint),
        _dir: tempfile::TempDir,
    }

    async fn pair(window: u32) -> Pair {
        let dir = tempfile::tempdir().expect("tempdir");
        let material =
            crate::tls::load_or_generate(&TlsConfig::default(), dir.path()).expect("cert");
        let mut roots = rustls::RootCertStore::empty();
        roots.add(material.chain[0].clone()).expect("root");
        let server_tls = crate::tls::server_config(material).expect("server tls");
        let server = crate::transport::bind_endpoint(
            &TransportConfig::default(),
            SocketAddr::from(([127, 0, 0, 1], 0)),
            server_tls,
            &[7u8; 32],
        )
        .expect("server endpoint");
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut client_tls = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .expect("versions")
            .with_root_certificates(roots)
            .with_no_client_auth();
        client_tls.alpn_protocols = vec![backbone_protocol::ALPN.to_vec()];
        let mut transport = quinn::TransportConfig::default();
        transport.stream_receive_window(quinn::VarInt::from_u32(window));
        let mut client_config = quinn::ClientConfig::new(Arc::new(
            QuicClientConfig::try_from(client_tls).expect("quic tls"),
        ));
        client_config.transport_config(Arc::new(transport));
        let mut client = quinn::Endpoint::client(SocketAddr::from(([127, 0, 0, 1], 0)))
            .expect("client endpoint");
        client.set_default_client_config(client_config);
        let server_addr = server.local_addr().expect("addr");
        let (client_connection, server_connection) = tokio::join!(
            async {
                client
                    .connect(server_addr, "localhost")
                    .expect("connect")
                    .await
                    .expect("handshake")
            },
            async {
                server
                    .accept()
                    .await
                    .expect("incoming")
                    .await
                    .expect("accepted")
            }
        );
        let (mut client_send, client_recv) = client_connection.open_bi().await.expect("open");
        // A stream is announced to the peer with its first byte.
        client_send.write_all(b"x").await.expect("announce");
        let (server_send, _server_recv) = server_connection.accept_bi().await.expect("accept");
        Pair {
            server_connection,
            server_send,
            client_recv,
            _client_send: client_send,
            _endpoints: (server, client),
            _dir: dir,
        }
    }

    fn limits() -> OutboxLimits {
        OutboxLimits {
            frames: 1024,
            budget: 1 << 20,
            stall_timeout: Duration::from_secs(10),
        }
    }

    fn ping(nonce: u64) -> Frame {
        Frame::Ping(Ping { nonce })
    }

    /// Reads frames until the stream ends.
    async fn read_all(recv: quinn::RecvStream) -> Vec<Frame> {
        let mut reader = FrameReader::new(recv, codec::MAX_FRAME_LEN);
        let mut frames = Vec::new();
        loop {
            match reader.next(Phase::Any).await {
                Ok(frame) => frames.push(frame),
                Err(ReadError::Closed) => return frames,
                Err(error) => panic!("a bad frame: {error}"),
            }
        }
    }

    /// The nonces of the frames `reading` got, once the stream ended.
    async fn nonces_to_end(reading: tokio::task::JoinHandle<Vec<Frame>>) -> Vec<u64> {
        let frames = tokio::time::timeout(Duration::from_secs(10), reading)
            .await
            .expect("what was queued is written and the stream ends when the last sender is gone")
            .expect("reader");
        nonces(&frames)
    }

    fn nonces(frames: &[Frame]) -> Vec<u64> {
        frames
            .iter()
            .map(|frame| match frame {
                Frame::Ping(ping) => ping.nonce,
                other => panic!("unexpected {other:?}"),
            })
            .collect()
    }

    #[tokio::test]
    async fn concurrent_senders_share_the_stream_in_order_and_the_last_drop_ends_it() {
        let pair = pair(1 << 20).await;
        let out = outbox(pair.server_connection.clone(), pair.server_send, limits());
        let reading = tokio::spawn(read_all(pair.client_recv));
        let mut senders = Vec::new();
        for sender in 0..20u64 {
            let out = out.clone();
            senders.push(tokio::spawn(async move {
                for n in 0..100u64 {
                    out.send(ping(sender << 32 | n)).await.expect("sent");
                    if n % 7 == 0 {
                        tokio::task::yield_now().await;
                    }
                }
            }));
        }
        for sender in senders {
            sender.await.expect("sender");
        }
        drop(out);
        let nonces = nonces_to_end(reading).await;
        assert_eq!(nonces.len(), 2000);
        for sender in 0..20u64 {
            let own: Vec<u64> = nonces
                .iter()
                .filter(|nonce| *nonce >> 32 == sender)
                .map(|nonce| nonce & 0xffff_ffff)
                .collect();
            assert_eq!(own, (0..100).collect::<Vec<_>>(), "sender {sender}");
        }
    }

    #[tokio::test]
    async fn a_sender_never_waits_for_the_peer_inside_a_write() {
        // A 16 KiB window the client does not read yet, and a budget that
        // holds everything: about 84 KB of frames, one send each, so some
        // write cannot go through until the client reads.
        let pair = pair(16 * 1024).await;
        let limits = OutboxLimits {
            frames: 100_000,
            ..limits()
        };
        let out = outbox(pair.server_connection.clone(), pair.server_send, limits);
        tokio::time::timeout(Duration::from_secs(2), async {
            for nonce in 0..6000u64 {
                out.send(ping(nonce)).await.expect("sent");
            }
        })
        .await
        .expect("every send returns while the peer reads nothing");
        assert!(out.queued() > 0, "what the window refused is still queued");
        let reading = tokio::spawn(read_all(pair.client_recv));
        out.send(ping(u64::MAX)).await.expect("sent");
        drop(out);
        let nonces = nonces_to_end(reading).await;
        let mut expected: Vec<u64> = (0..6000).collect();
        expected.push(u64::MAX);
        assert_eq!(nonces, expected, "every frame, whole and in order");
    }

    #[tokio::test]
    async fn pushes_whose_envelope_is_queued_apart_arrive_whole_between_other_frames() {
        use backbone_protocol::bytes::{Blob, MessageId};
        use backbone_protocol::frame::Deliver;
        let pair = pair(64 * 1024).await;
        let out = outbox(pair.server_connection.clone(), pair.server_send, limits());
        let reading = tokio::spawn(read_all(pair.client_recv));
        // Sizes on both sides of the size from which an envelope is its own
        // piece, and a window smaller than what is queued, so that some
        // write stops between a push's head and its envelope.
        let sizes = [0, 1, 511, 512, 513, 1024, 40_000, 100_000];
        let mut sent = Vec::new();
        for (n, len) in sizes.iter().cycle().take(40).enumerate() {
            let deliver = Frame::Deliver(Deliver {
                seq: n as u64 + 1,
                message_id: MessageId([n as u8; 16]),
                sender: None,
                stored_at_ms: 1,
                expires_at_ms: 2,
                envelope: Blob::from(vec![n as u8; *len]),
            });
            out.send(deliver.clone()).await.expect("sent");
            out.send(ping(n as u64)).await.expect("sent");
            sent.push(deliver);
            sent.push(ping(n as u64));
        }
        drop(out);
        let frames = tokio::time::timeout(Duration::from_secs(10), reading)
            .await
            .expect("the stream ends")
            .expect("reader");
        assert_eq!(frames, sent, "every frame, whole and in order");
    }
}
