//! Frame I/O over one QUIC stream: a reader feeding the protocol's sans-IO
//! [`FrameBuffer`], and a writer task that batches outgoing frames into few
//! stream writes, with the bytes waiting for it bounded ([`Outbox`]).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

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
#[derive(Clone, Debug)]
pub struct Outbox {
    tx: mpsc::Sender<Bytes>,
    budget: Arc<Budget>,
}

/// The bytes queued for one connection and its limit.
#[derive(Debug)]
struct Budget {
    limit: AtomicUsize,
    queued: AtomicUsize,
    /// Set when the writer has stopped: nothing will drain any more.
    closed: AtomicBool,
    drained: Notify,
}

impl Budget {
    /// Waits until the queue is under the limit; `Err` once the writer
    /// has stopped.
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
            if self.queued.load(Ordering::Acquire) < self.limit.load(Ordering::Relaxed) {
                return Ok(());
            }
            notified.await;
        }
    }

    fn release(&self, bytes: usize) {
        self.queued.fetch_sub(bytes, Ordering::AcqRel);
        self.drained.notify_waiters();
    }

    fn close(&self) {
        self.closed.store(true, Ordering::Release);
        self.drained.notify_waiters();
    }
}

/// The connection's writer has stopped; the frame was not sent.
#[derive(Debug, thiserror::Error)]
#[error("the connection's writer has stopped")]
pub struct OutboxClosed;

impl Outbox {
    /// Queues `frame`, waiting while the connection's output is at its
    /// budget or the queue is full.
    pub async fn send(&self, frame: Frame) -> Result<(), OutboxClosed> {
        let mut bytes = Vec::new();
        if let Err(error) = codec::encode_frame(&frame, &mut bytes) {
            tracing::error!(%error, tag = frame.tag(), "cannot encode outgoing frame");
            return Ok(());
        }
        self.budget.room().await?;
        self.budget.queued.fetch_add(bytes.len(), Ordering::AcqRel);
        let len = bytes.len();
        if self.tx.send(Bytes::from(bytes)).await.is_err() {
            self.budget.release(len);
            return Err(OutboxClosed);
        }
        Ok(())
    }

    /// Waits until the connection's output is under its budget: the session
    /// reads the next request only then.
    pub async fn room(&self) -> Result<(), OutboxClosed> {
        self.budget.room().await
    }

    /// Changes the budget (an authenticated session gets a larger one
    /// than a connection still in its handshake).
    pub fn set_budget(&self, bytes: usize) {
        self.budget.limit.store(bytes, Ordering::Relaxed);
        self.budget.drained.notify_waiters();
    }

    /// Bytes queued and not yet taken by QUIC.
    pub fn queued(&self) -> usize {
        self.budget.queued.load(Ordering::Acquire)
    }
}

/// How a connection's outbox behaves.
#[derive(Clone, Copy, Debug)]
pub struct OutboxLimits {
    /// Frames queued at most (the channel's capacity).
    pub frames: usize,
    /// Bytes queued above which senders wait (see [`Outbox`]).
    pub budget: usize,
    /// A write that takes no byte for this long closes the connection.
    pub stall_timeout: std::time::Duration,
}

/// An [`Outbox`] with `limits` and the task writing it to `send`. The task
/// coalesces whatever is queued into one write, ends when every sender is
/// dropped or the stream fails, and finishes the stream on the way out. A
/// write that makes no progress for `limits.stall_timeout` (the client
/// neither reads nor acknowledges) closes `connection` with `Overloaded`.
pub fn outbox(
    connection: quinn::Connection,
    mut send: quinn::SendStream,
    limits: OutboxLimits,
) -> Outbox {
    let (tx, mut rx) = mpsc::channel::<Bytes>(limits.frames);
    let budget = Arc::new(Budget {
        limit: AtomicUsize::new(limits.budget),
        queued: AtomicUsize::new(0),
        closed: AtomicBool::new(false),
        drained: Notify::new(),
    });
    let writer_budget = budget.clone();
    tokio::spawn(async move {
        let budget = writer_budget;
        let mut chunks: Vec<Bytes> = Vec::new();
        'frames: while let Some(first) = rx.recv().await {
            let mut batch = first.len();
            chunks.push(first);
            while batch < 256 * 1024 {
                match rx.try_recv() {
                    Ok(frame) => {
                        batch += frame.len();
                        chunks.push(frame);
                    }
                    Err(_) => break,
                }
            }
            let mut at = 0;
            while at < chunks.len() {
                let written = tokio::time::timeout(
                    limits.stall_timeout,
                    send.write_chunks(&mut chunks[at..]),
                )
                .await;
                match written {
                    Ok(Ok(written)) => {
                        at += written.chunks;
                        budget.release(written.bytes);
                    }
                    Ok(Err(_)) => break 'frames,
                    Err(_) => {
                        metrics::counter!("backbone_connections_closed_total", "reason" => "output_stalled")
                            .increment(1);
                        tracing::debug!("output stalled; closing the connection");
                        connection.close(
                            quinn::VarInt::from_u32(ErrorCode::Overloaded as u32),
                            b"output not drained in time",
                        );
                        break 'frames;
                    }
                }
            }
            chunks.clear();
        }
        // Wakes every sender waiting for room: nothing drains any more.
        budget.close();
        let _ = send.finish();
    });
    Outbox { tx, budget }
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
