//! `/flotilla/chunk/2`: the chunk request/response protocol and its length-bounded codec.
//!
//! A request names a run of chunks (DESIGN.md: about 1–4 MiB per request): a big-endian u16
//! count, 1 to [`MAX_RUN_CHUNKS`], then per chunk its 32-byte id and the length the index gives
//! it (big-endian u32), so a server can refuse lengths it never stores. A run of more than one
//! chunk names at most [`MAX_RUN_BYTES`]; a single chunk may be as long as [`MAX_CHUNK_LEN`].
//! The answer is one tag byte: [`ChunkResponse::Busy`], or a run answer with a big-endian u16
//! count (the request's), then per chunk a tag byte and, for an object, a big-endian u32 length
//! and the chunk object (zstd or raw, as `flotilla_core::object` encodes it). Each object is
//! verified by the asker on its own. The stock request-response codecs cap messages at 1 MiB /
//! 10 MiB and trust the declared length; this one reads exactly what it declares and refuses
//! anything over [`MAX_OBJECT_LEN`] in all before allocating.
//!
//! `/flotilla/chunk-pipe/1` ([`PIPE_PROTOCOL`]) carries the same requests and answers on one
//! stream per asker and server that stays open: no stream to open, negotiate and close per
//! request. Nodes ask a peer on a pipe when identify says the peer takes them.
//!
//! `/flotilla/release/1` ([`RELEASE_PROTOCOL`]) carries what peers need about a release
//! besides its chunks: its chunk index (by [`IndexId`], verified by the asker against the id
//! and then against the signed manifest) and have-maps (one bit per index entry, set when the
//! peer holds that entry's chunk). A request is a tag byte, the 32-byte index id and the
//! largest answer the asker accepts (big-endian u32); an exchange of have-maps
//! ([`ReleaseAsk::Exchange`]) then carries the asker's own map: a big-endian u32 length, at
//! most that bound, and the bytes. The answer is a tag byte, then for
//! [`ReleaseResponse::Found`] a big-endian u32 length and the bytes, at most the asker's
//! bound and [`MAX_RELEASE_DATA`]. A node that predates exchanges refuses the request (its
//! codec knows tags 0 and 1 only), and the asker falls back to plain have-map requests.

use std::io;

use flotilla_core::ids::{ChunkId, IndexId};
use futures::{AsyncRead, AsyncReadExt as _, AsyncWrite, AsyncWriteExt as _};
use libp2p::StreamProtocol;

/// The protocol name.
pub const PROTOCOL: StreamProtocol = StreamProtocol::new("/flotilla/chunk/2");

/// The pipe protocol's name: the requests and answers of [`PROTOCOL`] and of
/// [`RELEASE_PROTOCOL`], back to back on one long-lived stream from an asker to a server. Each
/// request starts with its kind ([`PIPE_CHUNKS`] or [`PIPE_RELEASE`]), then its protocol's
/// request. The server first writes [`PIPE_HELLO`], then answers each request in order, in
/// its protocol's answer format; the asker may send the next before an answer arrives.
pub const PIPE_PROTOCOL: StreamProtocol = StreamProtocol::new("/flotilla/chunk-pipe/1");

/// The first byte a server writes on a pipe it takes.
pub const PIPE_HELLO: u8 = 0xf1;
/// A pipe request's kind: a chunk request.
pub const PIPE_CHUNKS: u8 = 0;
/// A pipe request's kind: a release request (have-maps).
pub const PIPE_RELEASE: u8 = 1;

/// Largest chunk length a request may name (the chunker's maximum is far below it).
pub const MAX_CHUNK_LEN: u32 = 16 << 20;

/// Largest object an answer may carry: a raw chunk of [`MAX_CHUNK_LEN`] plus its flag byte.
/// It bounds the objects of one answer together too.
pub const MAX_OBJECT_LEN: u32 = MAX_CHUNK_LEN + 1;

/// Chunks one request may name.
pub const MAX_RUN_CHUNKS: usize = 64;

/// Chunk bytes a request of more than one chunk may name.
pub const MAX_RUN_BYTES: u32 = 4 << 20;

const TAG_OBJECT: u8 = 0;
const TAG_NOT_FOUND: u8 = 1;
const TAG_BUSY: u8 = 2;
const TAG_RUN: u8 = 3;
/// Bytes of one chunk's entry in a request.
const WANT_LEN: usize = 36;

/// One chunk of a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ChunkWant {
    /// The chunk.
    pub id: ChunkId,
    /// Its length in the index (uncompressed).
    pub len: u32,
}

/// A request for a run of chunk objects; build it with [`ChunkRequest::new`], which checks
/// the bounds the reader enforces.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChunkRequest(Vec<ChunkWant>);

impl ChunkRequest {
    /// A request for `wants`, or why the protocol cannot carry it.
    ///
    /// # Errors
    /// An `InvalidData` error: no chunk, too many, a length of 0 or over [`MAX_CHUNK_LEN`], or
    /// a run over [`MAX_RUN_BYTES`].
    pub fn new(wants: Vec<ChunkWant>) -> io::Result<Self> {
        if wants.is_empty() || wants.len() > MAX_RUN_CHUNKS {
            return Err(invalid(format!("a request for {} chunks (1 to {MAX_RUN_CHUNKS})", wants.len())));
        }
        if let Some(w) = wants.iter().find(|w| w.len == 0 || w.len > MAX_CHUNK_LEN) {
            return Err(invalid(format!("request for a chunk of {} bytes (limit {MAX_CHUNK_LEN})", w.len)));
        }
        let total: u64 = wants.iter().map(|w| u64::from(w.len)).sum();
        if wants.len() > 1 && total > u64::from(MAX_RUN_BYTES) {
            return Err(invalid(format!("a run of {total} chunk bytes (limit {MAX_RUN_BYTES})")));
        }
        Ok(Self(wants))
    }

    /// The chunks asked for, in order.
    pub fn wants(&self) -> &[ChunkWant] {
        &self.0
    }
}

/// The answer to a [`ChunkRequest`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ChunkResponse {
    /// One entry per chunk asked for, in order: the object (which the receiver verifies
    /// against the id before using it), or `None` when the peer does not hold the chunk (or
    /// holds it for no release it verified).
    Run(Vec<Option<Vec<u8>>>),
    /// The peer is over its upload budget; ask someone else.
    Busy,
}

/// The codec of [`PROTOCOL`] (stateless).
#[derive(Debug, Clone, Copy, Default)]
pub struct ChunkCodec;

impl libp2p::request_response::Codec for ChunkCodec {
    type Protocol = StreamProtocol;
    type Request = ChunkRequest;
    type Response = ChunkResponse;

    async fn read_request<T>(&mut self, _: &StreamProtocol, io: &mut T) -> io::Result<ChunkRequest>
    where
        T: AsyncRead + Unpin + Send,
    {
        read_request(io).await
    }

    async fn read_response<T>(&mut self, _: &StreamProtocol, io: &mut T) -> io::Result<ChunkResponse>
    where
        T: AsyncRead + Unpin + Send,
    {
        read_response(io).await
    }

    async fn write_request<T>(&mut self, _: &StreamProtocol, io: &mut T, req: ChunkRequest) -> io::Result<()>
    where
        T: AsyncWrite + Unpin + Send,
    {
        io.write_all(&encode_request(&req)).await?;
        io.close().await
    }

    async fn write_response<T>(&mut self, _: &StreamProtocol, io: &mut T, res: ChunkResponse) -> io::Result<()>
    where
        T: AsyncWrite + Unpin + Send,
    {
        // One write: every write to a stream is a frame of its own on the connection.
        io.write_all(&encode_response(&res)?).await?;
        io.close().await
    }
}

/// Reads one chunk request (of either chunk protocol), within the protocol's bounds.
pub(crate) async fn read_request<T>(io: &mut T) -> io::Result<ChunkRequest>
where
    T: AsyncRead + Unpin + Send,
{
    let mut count = [0u8; 2];
    io.read_exact(&mut count).await?;
    let count = usize::from(u16::from_be_bytes(count));
    if count == 0 || count > MAX_RUN_CHUNKS {
        return Err(invalid(format!("a request for {count} chunks (1 to {MAX_RUN_CHUNKS})")));
    }
    let mut buf = vec![0u8; count * WANT_LEN];
    io.read_exact(&mut buf).await?;
    ChunkRequest::new(buf.chunks_exact(WANT_LEN).map(decode_want).collect())
}

/// Reads one answer to a chunk request, refusing more than [`MAX_OBJECT_LEN`] of objects in
/// all before allocating.
pub(crate) async fn read_response<T>(io: &mut T) -> io::Result<ChunkResponse>
where
    T: AsyncRead + Unpin + Send,
{
    let mut head = [0u8; 1];
    io.read_exact(&mut head).await?;
    match head[0] {
        TAG_RUN => {}
        TAG_BUSY => return Ok(ChunkResponse::Busy),
        other => return Err(invalid(format!("unknown answer tag {other}"))),
    }
    let mut count = [0u8; 2];
    io.read_exact(&mut count).await?;
    let count = usize::from(u16::from_be_bytes(count));
    if count == 0 || count > MAX_RUN_CHUNKS {
        return Err(invalid(format!("an answer for {count} chunks (1 to {MAX_RUN_CHUNKS})")));
    }
    let mut objects = Vec::with_capacity(count);
    let mut total = 0u64;
    for _ in 0..count {
        let mut tag = [0u8; 1];
        io.read_exact(&mut tag).await?;
        match tag[0] {
            TAG_OBJECT => {
                let obj = read_sized(io, |len| {
                    total += u64::from(len);
                    (len == 0 || total > u64::from(MAX_OBJECT_LEN))
                        .then(|| format!("object of {len} bytes ({total} in the answer, limit {MAX_OBJECT_LEN})"))
                })
                .await?;
                objects.push(Some(obj));
            }
            TAG_NOT_FOUND => objects.push(None),
            other => return Err(invalid(format!("unknown chunk tag {other}"))),
        }
    }
    Ok(ChunkResponse::Run(objects))
}

/// The wire form of an answer, or why the protocol cannot carry it.
pub(crate) fn encode_response(res: &ChunkResponse) -> io::Result<Vec<u8>> {
    let objects = match res {
        ChunkResponse::Busy => return Ok(vec![TAG_BUSY]),
        ChunkResponse::Run(objects) => objects,
    };
    let count = u16::try_from(objects.len())
        .ok()
        .filter(|c| *c > 0 && usize::from(*c) <= MAX_RUN_CHUNKS)
        .ok_or_else(|| invalid(format!("an answer for {} chunks", objects.len())))?;
    let total: usize = objects.iter().flatten().map(Vec::len).sum();
    if total > MAX_OBJECT_LEN as usize || objects.iter().flatten().any(Vec::is_empty) {
        return Err(invalid(format!("an answer of {total} object bytes")));
    }
    let mut out = Vec::with_capacity(3 + objects.len() * 5 + total);
    out.push(TAG_RUN);
    out.extend_from_slice(&count.to_be_bytes());
    for obj in objects {
        match obj {
            Some(obj) => {
                out.push(TAG_OBJECT);
                out.extend_from_slice(&(obj.len() as u32).to_be_bytes());
                out.extend_from_slice(obj);
            }
            None => out.push(TAG_NOT_FOUND),
        }
    }
    Ok(out)
}

/// The release protocol's name.
pub const RELEASE_PROTOCOL: StreamProtocol = StreamProtocol::new("/flotilla/release/1");

/// Largest index or have-map answer (an index of 16 MiB lists about 466 000 chunks).
pub const MAX_RELEASE_DATA: u32 = 16 << 20;

/// What a [`ReleaseRequest`] asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReleaseAsk {
    /// The encoded chunk index.
    Index,
    /// The have-map over the index's entries.
    HaveMap,
    /// The have-map, in exchange for the asker's own (at most the request's bound): one
    /// round trip tells both peers what the other holds.
    Exchange(Vec<u8>),
}

/// A request about one release, named by its index id.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReleaseRequest {
    /// What is asked for.
    pub ask: ReleaseAsk,
    /// The release's index.
    pub index: IndexId,
    /// The largest answer accepted.
    pub max_len: u32,
}

/// The answer to a [`ReleaseRequest`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReleaseResponse {
    /// The bytes asked for.
    Found(Vec<u8>),
    /// The peer does not know the release.
    NotFound,
}

/// The codec of [`RELEASE_PROTOCOL`] (stateless).
#[derive(Debug, Clone, Copy, Default)]
pub struct ReleaseCodec;

impl libp2p::request_response::Codec for ReleaseCodec {
    type Protocol = StreamProtocol;
    type Request = ReleaseRequest;
    type Response = ReleaseResponse;

    async fn read_request<T>(&mut self, _: &StreamProtocol, io: &mut T) -> io::Result<ReleaseRequest>
    where
        T: AsyncRead + Unpin + Send,
    {
        read_release_request(io).await
    }

    async fn read_response<T>(&mut self, _: &StreamProtocol, io: &mut T) -> io::Result<ReleaseResponse>
    where
        T: AsyncRead + Unpin + Send,
    {
        read_release_response(io).await
    }

    async fn write_request<T>(&mut self, _: &StreamProtocol, io: &mut T, req: ReleaseRequest) -> io::Result<()>
    where
        T: AsyncWrite + Unpin + Send,
    {
        io.write_all(&encode_release_request(&req)?).await?;
        io.close().await
    }

    async fn write_response<T>(&mut self, _: &StreamProtocol, io: &mut T, res: ReleaseResponse) -> io::Result<()>
    where
        T: AsyncWrite + Unpin + Send,
    {
        io.write_all(&encode_release_response(&res)?).await?;
        io.close().await
    }
}

/// Reads one release request (of either protocol that carries them), within its bounds.
pub(crate) async fn read_release_request<T>(io: &mut T) -> io::Result<ReleaseRequest>
where
    T: AsyncRead + Unpin + Send,
{
    let mut buf = [0u8; 37];
    io.read_exact(&mut buf).await?;
    let mut id = [0u8; 32];
    id.copy_from_slice(&buf[1..33]);
    let max_len = u32::from_be_bytes([buf[33], buf[34], buf[35], buf[36]]);
    if max_len == 0 || max_len > MAX_RELEASE_DATA {
        return Err(invalid(format!("release request bound of {max_len} bytes (limit {MAX_RELEASE_DATA})")));
    }
    let ask = match buf[0] {
        0 => ReleaseAsk::Index,
        1 => ReleaseAsk::HaveMap,
        // Both maps cover the same index: the asker's is no longer than it accepts.
        2 => ReleaseAsk::Exchange(
            read_sized(io, |len| {
                (len == 0 || len > max_len).then(|| format!("exchanged have-map of {len} bytes (bound {max_len})"))
            })
            .await?,
        ),
        other => return Err(invalid(format!("unknown release request {other}"))),
    };
    Ok(ReleaseRequest { ask, index: IndexId::from_bytes(id), max_len })
}

/// Reads one answer to a release request, at most [`MAX_RELEASE_DATA`].
pub(crate) async fn read_release_response<T>(io: &mut T) -> io::Result<ReleaseResponse>
where
    T: AsyncRead + Unpin + Send,
{
    let mut tag = [0u8; 1];
    io.read_exact(&mut tag).await?;
    match tag[0] {
        TAG_OBJECT => {
            let data = read_sized(io, |len| {
                (len == 0 || len > MAX_RELEASE_DATA)
                    .then(|| format!("release answer of {len} bytes (limit {MAX_RELEASE_DATA})"))
            })
            .await?;
            Ok(ReleaseResponse::Found(data))
        }
        TAG_NOT_FOUND => Ok(ReleaseResponse::NotFound),
        other => Err(invalid(format!("unknown answer tag {other}"))),
    }
}

/// The wire form of a release request, or why the protocol cannot carry it.
pub(crate) fn encode_release_request(req: &ReleaseRequest) -> io::Result<Vec<u8>> {
    let mut buf = Vec::with_capacity(41);
    buf.push(match req.ask {
        ReleaseAsk::Index => 0,
        ReleaseAsk::HaveMap => 1,
        ReleaseAsk::Exchange(_) => 2,
    });
    buf.extend_from_slice(req.index.as_bytes());
    buf.extend_from_slice(&req.max_len.to_be_bytes());
    if let ReleaseAsk::Exchange(map) = &req.ask {
        let len = u32::try_from(map.len())
            .ok()
            .filter(|l| *l > 0 && *l <= req.max_len)
            .ok_or_else(|| invalid(format!("exchanged have-map of {} bytes (bound {})", map.len(), req.max_len)))?;
        buf.extend_from_slice(&len.to_be_bytes());
        buf.extend_from_slice(map);
    }
    Ok(buf)
}

/// The wire form of a release answer, or why the protocol cannot carry it.
pub(crate) fn encode_release_response(res: &ReleaseResponse) -> io::Result<Vec<u8>> {
    match res {
        ReleaseResponse::Found(data) => {
            let len = u32::try_from(data.len())
                .ok()
                .filter(|l| *l > 0 && *l <= MAX_RELEASE_DATA)
                .ok_or_else(|| invalid(format!("release answer of {} bytes", data.len())))?;
            let mut out = Vec::with_capacity(5 + data.len());
            out.push(TAG_OBJECT);
            out.extend_from_slice(&len.to_be_bytes());
            out.extend_from_slice(data);
            Ok(out)
        }
        ReleaseResponse::NotFound => Ok(vec![TAG_NOT_FOUND]),
    }
}

/// Reads a big-endian u32 length, lets `refuse` turn it down (its message) before anything is
/// allocated, then reads that many bytes.
async fn read_sized<T>(io: &mut T, refuse: impl FnOnce(u32) -> Option<String>) -> io::Result<Vec<u8>>
where
    T: AsyncRead + Unpin + Send,
{
    let mut len = [0u8; 4];
    io.read_exact(&mut len).await?;
    let len = u32::from_be_bytes(len);
    if let Some(msg) = refuse(len) {
        return Err(invalid(msg));
    }
    let mut data = vec![0u8; len as usize];
    io.read_exact(&mut data).await?;
    Ok(data)
}

fn invalid(msg: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg)
}

/// The wire form of a request.
pub(crate) fn encode_request(req: &ChunkRequest) -> Vec<u8> {
    let mut buf = Vec::with_capacity(2 + req.0.len() * WANT_LEN);
    buf.extend_from_slice(&(req.0.len() as u16).to_be_bytes());
    for w in &req.0 {
        buf.extend_from_slice(w.id.as_bytes());
        buf.extend_from_slice(&w.len.to_be_bytes());
    }
    buf
}

fn decode_want(buf: &[u8]) -> ChunkWant {
    let mut id = [0u8; 32];
    id.copy_from_slice(&buf[..32]);
    ChunkWant { id: ChunkId::from_bytes(id), len: u32::from_be_bytes([buf[32], buf[33], buf[34], buf[35]]) }
}

#[cfg(test)]
mod tests {
    use futures::executor::block_on;
    use libp2p::request_response::Codec as _;

    use super::*;

    fn roundtrip_response(res: ChunkResponse) -> io::Result<ChunkResponse> {
        let mut wire = futures::io::Cursor::new(Vec::new());
        block_on(ChunkCodec.write_response(&PROTOCOL, &mut wire, res))?;
        let mut rd = futures::io::Cursor::new(wire.into_inner());
        block_on(ChunkCodec.read_response(&PROTOCOL, &mut rd))
    }

    fn want(data: &[u8], len: u32) -> ChunkWant {
        ChunkWant { id: ChunkId::of(data), len }
    }

    fn read_request(wire: Vec<u8>) -> io::Result<ChunkRequest> {
        block_on(ChunkCodec.read_request(&PROTOCOL, &mut futures::io::Cursor::new(wire)))
    }

    #[test]
    fn requests_roundtrip() {
        for wants in
            [vec![want(b"x", 4096)], (0..MAX_RUN_CHUNKS as u32).map(|i| want(&i.to_be_bytes(), 65_536)).collect()]
        {
            let req = ChunkRequest::new(wants).unwrap();
            let mut wire = futures::io::Cursor::new(Vec::new());
            block_on(ChunkCodec.write_request(&PROTOCOL, &mut wire, req.clone())).unwrap();
            assert_eq!(read_request(wire.into_inner()).unwrap(), req);
        }
    }

    #[test]
    fn requests_out_of_bounds_are_refused_on_both_sides() {
        // Built locally: refused before anything is sent.
        assert!(ChunkRequest::new(Vec::new()).is_err());
        assert!(ChunkRequest::new(vec![want(b"x", 0)]).is_err());
        assert!(ChunkRequest::new(vec![want(b"x", MAX_CHUNK_LEN + 1)]).is_err());
        assert!(ChunkRequest::new(vec![want(b"x", 1); MAX_RUN_CHUNKS + 1]).is_err());
        assert!(ChunkRequest::new(vec![want(b"x", MAX_RUN_BYTES / 2 + 1), want(b"y", MAX_RUN_BYTES / 2)]).is_err());
        // One chunk may be as long as the chunker allows; a run may not.
        assert!(ChunkRequest::new(vec![want(b"x", MAX_CHUNK_LEN)]).is_ok());

        // Read off the wire: the same bounds, before the entries are allocated.
        let encoded = |wants: &[ChunkWant]| encode_request(&ChunkRequest(wants.to_vec()));
        for bad in [
            encoded(&[want(b"x", 0)]),
            encoded(&[want(b"x", MAX_CHUNK_LEN + 1)]),
            encoded(&[want(b"x", MAX_RUN_BYTES), want(b"y", 1)]),
            encoded(&vec![want(b"x", 1); MAX_RUN_CHUNKS + 1]),
            vec![0, 0],
        ] {
            let e = read_request(bad).unwrap_err();
            assert_eq!(e.kind(), io::ErrorKind::InvalidData, "{e}");
        }
        // A count of 65 535 with nothing behind it: refused by the count, not by a failed read.
        let e = read_request(vec![0xff, 0xff]).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::InvalidData, "{e}");
        // Truncated: fewer entries than the count.
        let mut short = encoded(&[want(b"x", 1), want(b"y", 1)]);
        short.truncate(2 + WANT_LEN + 10);
        assert_eq!(read_request(short).unwrap_err().kind(), io::ErrorKind::UnexpectedEof);
    }

    #[test]
    fn responses_roundtrip() {
        for res in [
            ChunkResponse::Run(vec![Some(vec![0, 1, 2, 3])]),
            ChunkResponse::Run(vec![None, Some(vec![9; 70_000]), None, Some(vec![7])]),
            ChunkResponse::Busy,
        ] {
            assert_eq!(roundtrip_response(res.clone()).unwrap(), res);
        }
        // What the reader would refuse is not written either.
        assert!(roundtrip_response(ChunkResponse::Run(Vec::new())).is_err());
        assert!(roundtrip_response(ChunkResponse::Run(vec![Some(Vec::new())])).is_err());
        assert!(roundtrip_response(ChunkResponse::Run(vec![None; MAX_RUN_CHUNKS + 1])).is_err());
    }

    #[test]
    fn oversized_declarations_are_refused_before_allocating() {
        // One object over the limit.
        let mut wire = vec![TAG_RUN, 0, 1, TAG_OBJECT];
        wire.extend_from_slice(&(MAX_OBJECT_LEN + 1).to_be_bytes());
        let mut rd = futures::io::Cursor::new(wire);
        let e = block_on(ChunkCodec.read_response(&PROTOCOL, &mut rd)).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::InvalidData);

        // Objects each within the limit, over it together: refused at the second declaration.
        let half = MAX_OBJECT_LEN / 2 + 1;
        let mut wire = vec![TAG_RUN, 0, 2, TAG_OBJECT];
        wire.extend_from_slice(&half.to_be_bytes());
        wire.extend(std::iter::repeat_n(0u8, half as usize));
        wire.push(TAG_OBJECT);
        wire.extend_from_slice(&half.to_be_bytes());
        let mut rd = futures::io::Cursor::new(wire);
        let e = block_on(ChunkCodec.read_response(&PROTOCOL, &mut rd)).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::InvalidData, "{e}");

        // Counts out of bounds, and an empty object.
        for wire in [vec![TAG_RUN, 0, 0], vec![TAG_RUN, 0xff, 0xff], vec![TAG_RUN, 0, 1, TAG_OBJECT, 0, 0, 0, 0]] {
            let mut rd = futures::io::Cursor::new(wire);
            let e = block_on(ChunkCodec.read_response(&PROTOCOL, &mut rd)).unwrap_err();
            assert_eq!(e.kind(), io::ErrorKind::InvalidData, "{e}");
        }
    }

    #[test]
    fn release_messages_roundtrip_and_are_bounded() {
        let req = ReleaseRequest { ask: ReleaseAsk::HaveMap, index: IndexId::of(b"i"), max_len: 512 };
        let mut wire = futures::io::Cursor::new(Vec::new());
        block_on(ReleaseCodec.write_request(&RELEASE_PROTOCOL, &mut wire, req.clone())).unwrap();
        let mut bytes = wire.into_inner();
        let mut rd = futures::io::Cursor::new(bytes.clone());
        assert_eq!(block_on(ReleaseCodec.read_request(&RELEASE_PROTOCOL, &mut rd)).unwrap(), req);
        bytes[33..].copy_from_slice(&(MAX_RELEASE_DATA + 1).to_be_bytes());
        let mut rd = futures::io::Cursor::new(bytes);
        assert!(block_on(ReleaseCodec.read_request(&RELEASE_PROTOCOL, &mut rd)).is_err());

        for res in [ReleaseResponse::Found(vec![1, 2, 3]), ReleaseResponse::NotFound] {
            let mut wire = futures::io::Cursor::new(Vec::new());
            block_on(ReleaseCodec.write_response(&RELEASE_PROTOCOL, &mut wire, res.clone())).unwrap();
            let mut rd = futures::io::Cursor::new(wire.into_inner());
            assert_eq!(block_on(ReleaseCodec.read_response(&RELEASE_PROTOCOL, &mut rd)).unwrap(), res);
        }
        let mut wire = vec![TAG_OBJECT];
        wire.extend_from_slice(&(MAX_RELEASE_DATA + 1).to_be_bytes());
        let mut rd = futures::io::Cursor::new(wire);
        assert!(block_on(ReleaseCodec.read_response(&RELEASE_PROTOCOL, &mut rd)).is_err());
    }

    #[test]
    fn exchanges_carry_the_askers_map_within_its_bound() {
        let read =
            |wire: Vec<u8>| block_on(ReleaseCodec.read_request(&RELEASE_PROTOCOL, &mut futures::io::Cursor::new(wire)));
        let req = ReleaseRequest { ask: ReleaseAsk::Exchange(vec![0xff, 0x01]), index: IndexId::of(b"i"), max_len: 2 };
        let mut wire = futures::io::Cursor::new(Vec::new());
        block_on(ReleaseCodec.write_request(&RELEASE_PROTOCOL, &mut wire, req.clone())).unwrap();
        let bytes = wire.into_inner();
        assert_eq!(bytes.len(), 37 + 4 + 2);
        assert_eq!(read(bytes.clone()).unwrap(), req);
        // Cut anywhere: an error, never a shorter map.
        for cut in 0..bytes.len() {
            assert!(read(bytes[..cut].to_vec()).is_err(), "cut at {cut}");
        }
        // A map longer than the bound (or empty) is refused by the reader and the writer.
        let mut over = bytes[..37].to_vec();
        over.extend_from_slice(&3u32.to_be_bytes());
        over.extend_from_slice(&[1, 2, 3]);
        assert!(read(over).unwrap_err().to_string().contains("bound 2"));
        let mut empty = bytes[..37].to_vec();
        empty.extend_from_slice(&0u32.to_be_bytes());
        assert!(read(empty).is_err());
        for map in [vec![1, 2, 3], Vec::new()] {
            let req = ReleaseRequest { ask: ReleaseAsk::Exchange(map), index: IndexId::of(b"i"), max_len: 2 };
            let mut wire = futures::io::Cursor::new(Vec::new());
            assert!(block_on(ReleaseCodec.write_request(&RELEASE_PROTOCOL, &mut wire, req)).is_err());
        }
    }

    #[test]
    fn truncated_and_junk_answers_are_errors() {
        for wire in [
            // An object shorter than declared.
            vec![TAG_RUN, 0, 1, TAG_OBJECT, 0, 0, 0, 9, 1, 2],
            // Fewer entries than the count.
            vec![TAG_RUN, 0, 3, TAG_NOT_FOUND, TAG_NOT_FOUND],
            // Unknown tags, at the head and per chunk.
            vec![7u8],
            vec![TAG_RUN, 0, 1, 9],
            vec![TAG_OBJECT],
            Vec::new(),
        ] {
            let mut rd = futures::io::Cursor::new(wire.clone());
            assert!(block_on(ChunkCodec.read_response(&PROTOCOL, &mut rd)).is_err(), "{wire:?}");
        }
    }
}
