//! Frame I/O over one QUIC stream: a reader feeding the protocol's sans-IO
//! [`FrameBuffer`], and a writer task that batches outgoing frames into few
//! stream writes.

use backbone_protocol::Frame;
use backbone_protocol::codec::{self, BufferError, FrameBuffer, Phase};
use tokio::sync::mpsc;

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

/// The sending end of a connection's outgoing frames. Frames travel boxed:
/// a channel allocates its first block of slots up front, and boxing keeps
/// that block at 32 pointers per connection instead of 32 frames (a
/// `Frame` is about 240 bytes), which idle connections would pay for.
#[derive(Clone, Debug)]
pub struct Outbox(mpsc::Sender<Box<Frame>>);

/// The connection's writer has stopped; the frame was not sent.
#[derive(Debug, thiserror::Error)]
#[error("the connection's writer has stopped")]
pub struct OutboxClosed;

impl Outbox {
    /// Queues `frame`, waiting while the queue is full.
    pub async fn send(&self, frame: Frame) -> Result<(), OutboxClosed> {
        self.0.send(Box::new(frame)).await.map_err(|_| OutboxClosed)
    }
}

/// An [`Outbox`] of `capacity` frames and the task writing them to `send`
/// (see [`spawn_writer`]).
pub fn outbox(send: quinn::SendStream, capacity: usize) -> Outbox {
    let (tx, rx) = mpsc::channel(capacity);
    spawn_writer(send, rx);
    Outbox(tx)
}

/// Spawns the task that writes frames from `rx` to `send`, coalescing
/// whatever is queued into one write. It ends when every sender is dropped or
/// the stream fails, and finishes the stream on the way out.
pub fn spawn_writer(
    send: quinn::SendStream,
    rx: mpsc::Receiver<Box<Frame>>,
) -> tokio::task::JoinHandle<()> {
    spawn_writer_with(send, rx, |frame, buf| encode_logged(frame, buf))
}

/// [`spawn_writer`] for any frame type, encoded by `encode`.
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

fn encode_logged(frame: &Frame, buf: &mut Vec<u8>) {
    if let Err(error) = codec::encode_frame(frame, buf) {
        tracing::error!(%error, tag = frame.tag(), "cannot encode outgoing frame");
    }
}
