//! Reading a session's requests, and accepting the file streams the
//! client opens meanwhile.

use std::sync::Arc;

use backbone_protocol::Frame;
use backbone_protocol::codec::{BufferError, Phase};
use tokio::sync::watch;
use tracing::{Instrument, debug};

use crate::cmd::rate::AnonymousBudget;
use crate::cmd::{Caller, Rules, error_frame};
use crate::shared::Shared;
use crate::shared::live::close;
use crate::wire::{FrameReader, Outbox, ReadError};

/// The file streams a client opens next to its first stream. The request
/// loop accepts them (a task per connection just to accept them cost about
/// 1 KB of every idle connection) and serves each in a task of its own.
pub(super) struct FileStreams {
    /// The session, as the command table admits its streams' headers.
    caller: Caller,
    /// An anonymous session's request budgets, which every stream counts
    /// against like a request.
    budget: Option<Arc<AnonymousBudget>>,
    /// Until the connection stops accepting streams.
    open: bool,
}

impl FileStreams {
    pub(super) fn new(caller: Caller) -> Self {
        Self {
            caller,
            budget: None,
            open: true,
        }
    }

    pub(super) fn anonymous(budget: Arc<AnonymousBudget>) -> Self {
        Self {
            caller: Caller::Anonymous,
            budget: Some(budget),
            open: true,
        }
    }

    pub(super) fn accepted(
        &mut self,
        shared: &Arc<Shared>,
        stream: Result<(quinn::SendStream, quinn::RecvStream), quinn::ConnectionError>,
    ) {
        match stream {
            Ok((send, recv)) => {
                if let Some(Err(refusal)) = self.budget.as_ref().map(|budget| budget.spend(shared))
                {
                    drop(recv);
                    let answer = refusal.answer_id(0);
                    tokio::spawn(crate::cmd::files::answer_stream(send, answer).in_current_span());
                    return;
                }
                tokio::spawn(
                    crate::cmd::files::serve_stream(shared.clone(), self.caller, send, recv)
                        .in_current_span(),
                );
            }
            Err(error) => {
                debug!(%error, "no more file streams");
                self.open = false;
            }
        }
    }
}

/// The next frame of a session that the command table admits for
/// `caller`, with its rules, or `None` when the session ends: the client
/// closed, the broker shuts down, the stream cannot be read on, or the
/// answer to a refused or skipped frame cannot be sent. A refused frame,
/// and an invalid frame that can be skipped, are answered with their error
/// and reading goes on. File streams the client opens meanwhile are
/// accepted and served.
///
/// While the connection's output is at its budget (the client does not
/// read its answers), no request is read: QUIC flow control then stops the
/// client, and the outbox's writer closes a connection that never drains.
pub(super) async fn next_request(
    shared: &Arc<Shared>,
    caller: &Caller,
    connection: &quinn::Connection,
    reader: &mut FrameReader,
    out: &Outbox,
    files: &mut FileStreams,
    shutdown: &mut watch::Receiver<bool>,
) -> Option<(Frame, Rules)> {
    loop {
        tokio::select! {
            room = out.room() => room.ok()?,
            _ = shutdown.wait_for(|stop| *stop) => return None,
        }
        let frame = tokio::select! {
            frame = reader.next(Phase::Any) => frame,
            stream = connection.accept_bi(), if files.open => {
                files.accepted(shared, stream);
                continue;
            }
            _ = shutdown.wait_for(|stop| *stop) => return None,
        };
        match frame {
            Ok(frame) => match crate::cmd::gate(shared, caller, &frame) {
                Ok(rules) => return Some((frame, rules)),
                Err(refusal) => {
                    debug!(%refusal, "request refused");
                    out.send(refusal.answer(&frame)).await.ok()?;
                }
            },
            Err(ReadError::Closed) => return None,
            Err(ReadError::Frame(BufferError::Skipped(error))) => {
                debug!(%error, "invalid frame skipped");
                out.send(error_frame(0, error.code(), error.to_string()))
                    .await
                    .ok()?;
            }
            Err(ReadError::Frame(BufferError::Fatal(error))) => {
                close(connection, error.code(), &error.to_string());
                return None;
            }
        }
    }
}
