//! Chunk pipes ([`PIPE_PROTOCOL`]): the requests and answers of the chunk protocol, and the
//! have-map requests of the release protocol, on one long-lived stream from an asker to a
//! server, instead of a stream per request.
//!
//! A stream per request costs, for every chunk, the stream's opening and closing frames, a
//! protocol negotiation, and four timers on libp2p's timer thread (each set and dropped with a
//! wake-up of that thread). On a pipe a request is one frame and its answer follows it.
//!
//! The server writes [`PIPE_HELLO`] when it takes the stream (a stream libp2p-stream could
//! not hand over is dropped, and the asker opens another), then answers requests one at a time
//! in order; the asker may send more before the first is answered. Every request goes through
//! the actor, as one on the request-response protocols does (upload slots, `Busy`, bans).

use std::collections::VecDeque;
use std::io;
use std::sync::Mutex;
use std::time::Duration;

use futures::{AsyncReadExt as _, AsyncWriteExt as _, StreamExt as _};
use libp2p::{PeerId, Stream};
use libp2p_stream::{Control, OpenStreamError};
use tokio::sync::{Notify, mpsc, oneshot};

use crate::protocol::{
    ChunkRequest, ChunkResponse, PIPE_CHUNKS, PIPE_HELLO, PIPE_PROTOCOL, PIPE_RELEASE, ReleaseRequest, ReleaseResponse,
    encode_release_request, encode_release_response, encode_request, encode_response, read_release_request,
    read_release_response, read_request, read_response,
};

/// A request on a pipe.
#[derive(Debug)]
pub(super) enum PipeAsk {
    Chunks(ChunkRequest),
    Release(ReleaseRequest),
}

/// The answer to a [`PipeAsk`], of the same kind.
#[derive(Debug)]
pub(super) enum PipeAnswer {
    Chunks(ChunkResponse),
    Release(ReleaseResponse),
}

/// Attempts at opening a pipe whose stream the server dropped before its hello.
const OPEN_ATTEMPTS: usize = 3;

/// What pipes tell the actor.
#[derive(Debug)]
pub(super) enum PipeEvent {
    /// The answer of `peer` to pipe request `id`; `None` when the pipe broke before it.
    Answer(PeerId, u64, Option<PipeAnswer>),
    /// `peer` did not answer a request on its pipe in time (its pipe is closed).
    Stalled(PeerId),
    /// `peer` does not take pipes: ask it on the request-response protocol.
    Unsupported(PeerId),
    /// A request from `peer` on its pipe to this node; the answer goes to `reply` (dropped
    /// unanswered, the pipe closes).
    Request(PeerId, ChunkRequest, oneshot::Sender<ChunkResponse>),
    /// A release request from `peer` on its pipe to this node, answered the same way.
    Release(PeerId, ReleaseRequest, oneshot::Sender<ReleaseResponse>),
}

/// The asking end of a pipe to one peer; the stream closes when it is dropped.
#[derive(Debug)]
pub(super) struct Pipe {
    tx: mpsc::UnboundedSender<(u64, PipeAsk)>,
}

impl Pipe {
    /// Opens a pipe to `peer` (in the background: requests wait until it is open).
    pub(super) fn open(
        control: Control,
        peer: PeerId,
        timeout: Duration,
        events: mpsc::UnboundedSender<PipeEvent>,
    ) -> Self {
        let (tx, rx) = mpsc::unbounded_channel();
        tokio::spawn(run(control, peer, rx, events, timeout));
        Self { tx }
    }

    /// Sends request `id`; gives it back when the pipe has closed.
    pub(super) fn send(&self, id: u64, req: PipeAsk) -> Result<(), PipeAsk> {
        self.tx.send((id, req)).map_err(|e| e.0.1)
    }
}

async fn run(
    mut control: Control,
    peer: PeerId,
    mut rx: mpsc::UnboundedReceiver<(u64, PipeAsk)>,
    events: mpsc::UnboundedSender<PipeEvent>,
    timeout: Duration,
) {
    // Shared by the writer and the reader of `carry`, both borrowing it.
    let sent = Mutex::new(VecDeque::new());
    match open(&mut control, peer, timeout).await {
        Ok(stream) => {
            if let Err(e) = carry(stream, &mut rx, &sent, &events, peer, timeout).await {
                tracing::debug!(%peer, error = %e, "chunk pipe closed");
            }
        }
        Err(OpenStreamError::UnsupportedProtocol(_)) => {
            let _ = events.send(PipeEvent::Unsupported(peer));
        }
        Err(e) => tracing::debug!(%peer, error = %e, "chunk pipe not opened"),
    }
    // Whatever was sent or is still queued fails: the asker tries again.
    rx.close();
    let mut failed: Vec<u64> = sent.lock().unwrap_or_else(|e| e.into_inner()).drain(..).map(|(id, _)| id).collect();
    while let Ok((id, _)) = rx.try_recv() {
        failed.push(id);
    }
    for id in failed {
        let _ = events.send(PipeEvent::Answer(peer, id, None));
    }
}

/// Opens the stream and waits for the server's hello.
async fn open(control: &mut Control, peer: PeerId, timeout: Duration) -> Result<Stream, OpenStreamError> {
    let mut last = None;
    for _ in 0..OPEN_ATTEMPTS {
        let mut stream = control.open_stream(peer, PIPE_PROTOCOL).await?;
        let mut hello = [0u8; 1];
        match tokio::time::timeout(timeout, stream.read_exact(&mut hello)).await {
            Ok(Ok(())) if hello[0] == PIPE_HELLO => return Ok(stream),
            Ok(Ok(())) => return Err(OpenStreamError::Io(invalid("a pipe that did not start with its hello"))),
            Ok(Err(e)) => last = Some(e),
            Err(_) => return Err(OpenStreamError::Io(io::ErrorKind::TimedOut.into())),
        }
    }
    Err(OpenStreamError::Io(last.unwrap_or_else(|| io::ErrorKind::ConnectionReset.into())))
}

/// Writes requests as they come and reads their answers in order, until either side stops.
async fn carry(
    stream: Stream,
    rx: &mut mpsc::UnboundedReceiver<(u64, PipeAsk)>,
    sent: &Mutex<VecDeque<(u64, bool)>>,
    events: &mpsc::UnboundedSender<PipeEvent>,
    peer: PeerId,
    timeout: Duration,
) -> io::Result<()> {
    let (mut r, mut w) = stream.split();
    let asked = Notify::new();
    let writer = async {
        while let Some((id, req)) = rx.recv().await {
            let wire = match &req {
                PipeAsk::Chunks(req) => [&[PIPE_CHUNKS][..], &encode_request(req)].concat(),
                PipeAsk::Release(req) => [&[PIPE_RELEASE][..], &encode_release_request(req)?].concat(),
            };
            sent.lock().unwrap_or_else(|e| e.into_inner()).push_back((id, matches!(req, PipeAsk::Release(_))));
            asked.notify_one();
            w.write_all(&wire).await?;
            w.flush().await?;
        }
        // The actor dropped the pipe.
        w.close().await
    };
    let reader = async {
        loop {
            // Read only with an answer due, so the timeout is always that answer's.
            let release = loop {
                if let Some(&(_, release)) = sent.lock().unwrap_or_else(|e| e.into_inner()).front() {
                    break release;
                }
                asked.notified().await;
            };
            let read = async {
                Ok::<_, io::Error>(match release {
                    true => PipeAnswer::Release(read_release_response(&mut r).await?),
                    false => PipeAnswer::Chunks(read_response(&mut r).await?),
                })
            };
            let answer = match tokio::time::timeout(timeout, read).await {
                Ok(answer) => answer?,
                Err(_) => {
                    let _ = events.send(PipeEvent::Stalled(peer));
                    return Err(io::Error::from(io::ErrorKind::TimedOut));
                }
            };
            let Some((id, _)) = sent.lock().unwrap_or_else(|e| e.into_inner()).pop_front() else { continue };
            let _ = events.send(PipeEvent::Answer(peer, id, Some(answer)));
        }
    };
    tokio::select! {
        r = writer => r,
        r = reader => r,
    }
}

/// Takes the pipes peers open to this node, for as long as the actor runs.
pub(super) fn accept(mut control: Control, events: mpsc::UnboundedSender<PipeEvent>) {
    let Ok(mut incoming) = control.accept(PIPE_PROTOCOL) else {
        tracing::warn!("chunk pipes already taken; peers ask on the request-response protocol");
        return;
    };
    tokio::spawn(async move {
        while let Some((peer, stream)) = incoming.next().await {
            if events.is_closed() {
                break;
            }
            let events = events.clone();
            tokio::spawn(async move {
                if let Err(e) = serve(peer, stream, events).await {
                    tracing::debug!(%peer, error = %e, "serving a chunk pipe ended");
                }
            });
        }
    });
}

/// Answers the requests of one pipe, one at a time, through the actor.
async fn serve(peer: PeerId, mut stream: Stream, events: mpsc::UnboundedSender<PipeEvent>) -> io::Result<()> {
    stream.write_all(&[PIPE_HELLO]).await?;
    stream.flush().await?;
    loop {
        let mut kind = [0u8; 1];
        match stream.read_exact(&mut kind).await {
            Ok(()) => {}
            // The asker closed its pipe.
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(()),
            Err(e) => return Err(e),
        }
        // Dropped unanswered: the peer is banned, or the node stops.
        let wire = match kind[0] {
            PIPE_CHUNKS => {
                let (tx, rx) = oneshot::channel();
                let _ = events.send(PipeEvent::Request(peer, read_request(&mut stream).await?, tx));
                let Ok(answer) = rx.await else { return Ok(()) };
                encode_response(&answer)?
            }
            PIPE_RELEASE => {
                let (tx, rx) = oneshot::channel();
                let _ = events.send(PipeEvent::Release(peer, read_release_request(&mut stream).await?, tx));
                let Ok(answer) = rx.await else { return Ok(()) };
                encode_release_response(&answer)?
            }
            other => return Err(invalid(&format!("a pipe request of unknown kind {other}"))),
        };
        stream.write_all(&wire).await?;
        stream.flush().await?;
    }
}

fn invalid(msg: &str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg)
}
