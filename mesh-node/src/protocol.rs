//! `/flotilla/chunk/1`: the chunk request/response protocol and its length-bounded codec.
//!
//! A request names one chunk: its 32-byte id and the length the index gives it (big-endian
//! u32), so a server can refuse lengths it never stores. The answer is one tag byte, then for
//! [`ChunkResponse::Object`] a big-endian u32 length and the chunk object (zstd or raw, as
//! `flotilla_core::object` encodes it). The stock request-response codecs cap messages at
//! 1 MiB / 10 MiB and trust the declared length; this one reads exactly what it declares and
//! refuses anything over [`MAX_OBJECT_LEN`] before allocating.
//!
//! `/flotilla/release/1` ([`RELEASE_PROTOCOL`]) carries what peers need about a release
//! besides its chunks: its chunk index (by [`IndexId`], verified by the asker against the id
//! and then against the signed manifest) and have-maps (one bit per index entry, set when the
//! peer holds that entry's chunk). A request is a tag byte, the 32-byte index id and the
//! largest answer the asker accepts (big-endian u32); the answer is a tag byte, then for
//! [`ReleaseResponse::Found`] a big-endian u32 length and the bytes, at most the asker's
//! bound and [`MAX_RELEASE_DATA`].

use std::io;

use flotilla_core::ids::{ChunkId, IndexId};
use futures::{AsyncRead, AsyncReadExt as _, AsyncWrite, AsyncWriteExt as _};
use libp2p::StreamProtocol;

/// The protocol name.
pub const PROTOCOL: StreamProtocol = StreamProtocol::new("/flotilla/chunk/1");

/// Largest chunk length a request may name (the chunker's maximum is far below it).
pub const MAX_CHUNK_LEN: u32 = 16 << 20;

/// Largest object an answer may carry: a raw chunk of [`MAX_CHUNK_LEN`] plus its flag byte.
pub const MAX_OBJECT_LEN: u32 = MAX_CHUNK_LEN + 1;

const TAG_OBJECT: u8 = 0;
const TAG_NOT_FOUND: u8 = 1;
const TAG_BUSY: u8 = 2;

/// A request for one chunk object.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChunkRequest {
    /// The chunk.
    pub id: ChunkId,
    /// Its length in the index (uncompressed).
    pub len: u32,
}

/// The answer to a [`ChunkRequest`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ChunkResponse {
    /// The chunk object; the receiver verifies it against the id before using it.
    Object(Vec<u8>),
    /// The peer does not hold the chunk (or holds it for no release it verified).
    NotFound,
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
        let mut buf = [0u8; 36];
        io.read_exact(&mut buf).await?;
        decode_request(&buf)
    }

    async fn read_response<T>(&mut self, _: &StreamProtocol, io: &mut T) -> io::Result<ChunkResponse>
    where
        T: AsyncRead + Unpin + Send,
    {
        let mut tag = [0u8; 1];
        io.read_exact(&mut tag).await?;
        match tag[0] {
            TAG_OBJECT => {
                let mut len = [0u8; 4];
                io.read_exact(&mut len).await?;
                let len = u32::from_be_bytes(len);
                if len == 0 || len > MAX_OBJECT_LEN {
                    return Err(invalid(format!("object of {len} bytes (limit {MAX_OBJECT_LEN})")));
                }
                let mut obj = vec![0u8; len as usize];
                io.read_exact(&mut obj).await?;
                Ok(ChunkResponse::Object(obj))
            }
            TAG_NOT_FOUND => Ok(ChunkResponse::NotFound),
            TAG_BUSY => Ok(ChunkResponse::Busy),
            other => Err(invalid(format!("unknown answer tag {other}"))),
        }
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
        match res {
            ChunkResponse::Object(obj) => {
                let len = u32::try_from(obj.len())
                    .ok()
                    .filter(|l| *l > 0 && *l <= MAX_OBJECT_LEN)
                    .ok_or_else(|| invalid(format!("object of {} bytes", obj.len())))?;
                // One write: every write to a stream is a frame of its own on the connection.
                let mut out = Vec::with_capacity(5 + obj.len());
                out.push(TAG_OBJECT);
                out.extend_from_slice(&len.to_be_bytes());
                out.extend_from_slice(&obj);
                io.write_all(&out).await?;
            }
            ChunkResponse::NotFound => io.write_all(&[TAG_NOT_FOUND]).await?,
            ChunkResponse::Busy => io.write_all(&[TAG_BUSY]).await?,
        }
        io.close().await
    }
}

/// The release protocol's name.
pub const RELEASE_PROTOCOL: StreamProtocol = StreamProtocol::new("/flotilla/release/1");

/// Largest index or have-map answer (an index of 16 MiB lists about 466 000 chunks).
pub const MAX_RELEASE_DATA: u32 = 16 << 20;

/// What a [`ReleaseRequest`] asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReleaseAsk {
    /// The encoded chunk index.
    Index,
    /// The have-map over the index's entries.
    HaveMap,
}

/// A request about one release, named by its index id.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
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
        let mut buf = [0u8; 37];
        io.read_exact(&mut buf).await?;
        let ask = match buf[0] {
            0 => ReleaseAsk::Index,
            1 => ReleaseAsk::HaveMap,
            other => return Err(invalid(format!("unknown release request {other}"))),
        };
        let mut id = [0u8; 32];
        id.copy_from_slice(&buf[1..33]);
        let max_len = u32::from_be_bytes([buf[33], buf[34], buf[35], buf[36]]);
        if max_len == 0 || max_len > MAX_RELEASE_DATA {
            return Err(invalid(format!("release request bound of {max_len} bytes (limit {MAX_RELEASE_DATA})")));
        }
        Ok(ReleaseRequest { ask, index: IndexId::from_bytes(id), max_len })
    }

    async fn read_response<T>(&mut self, _: &StreamProtocol, io: &mut T) -> io::Result<ReleaseResponse>
    where
        T: AsyncRead + Unpin + Send,
    {
        let mut tag = [0u8; 1];
        io.read_exact(&mut tag).await?;
        match tag[0] {
            TAG_OBJECT => {
                let mut len = [0u8; 4];
                io.read_exact(&mut len).await?;
                let len = u32::from_be_bytes(len);
                if len == 0 || len > MAX_RELEASE_DATA {
                    return Err(invalid(format!("release answer of {len} bytes (limit {MAX_RELEASE_DATA})")));
                }
                let mut data = vec![0u8; len as usize];
                io.read_exact(&mut data).await?;
                Ok(ReleaseResponse::Found(data))
            }
            TAG_NOT_FOUND => Ok(ReleaseResponse::NotFound),
            other => Err(invalid(format!("unknown answer tag {other}"))),
        }
    }

    async fn write_request<T>(&mut self, _: &StreamProtocol, io: &mut T, req: ReleaseRequest) -> io::Result<()>
    where
        T: AsyncWrite + Unpin + Send,
    {
        let mut buf = [0u8; 37];
        buf[0] = match req.ask {
            ReleaseAsk::Index => 0,
            ReleaseAsk::HaveMap => 1,
        };
        buf[1..33].copy_from_slice(req.index.as_bytes());
        buf[33..].copy_from_slice(&req.max_len.to_be_bytes());
        io.write_all(&buf).await?;
        io.close().await
    }

    async fn write_response<T>(&mut self, _: &StreamProtocol, io: &mut T, res: ReleaseResponse) -> io::Result<()>
    where
        T: AsyncWrite + Unpin + Send,
    {
        match res {
            ReleaseResponse::Found(data) => {
                let len = u32::try_from(data.len())
                    .ok()
                    .filter(|l| *l > 0 && *l <= MAX_RELEASE_DATA)
                    .ok_or_else(|| invalid(format!("release answer of {} bytes", data.len())))?;
                let mut out = Vec::with_capacity(5 + data.len());
                out.push(TAG_OBJECT);
                out.extend_from_slice(&len.to_be_bytes());
                out.extend_from_slice(&data);
                io.write_all(&out).await?;
            }
            ReleaseResponse::NotFound => io.write_all(&[TAG_NOT_FOUND]).await?,
        }
        io.close().await
    }
}

fn invalid(msg: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg)
}

fn encode_request(req: &ChunkRequest) -> [u8; 36] {
    let mut buf = [0u8; 36];
    buf[..32].copy_from_slice(req.id.as_bytes());
    buf[32..].copy_from_slice(&req.len.to_be_bytes());
    buf
}

fn decode_request(buf: &[u8; 36]) -> io::Result<ChunkRequest> {
    let mut id = [0u8; 32];
    id.copy_from_slice(&buf[..32]);
    let len = u32::from_be_bytes([buf[32], buf[33], buf[34], buf[35]]);
    if len == 0 || len > MAX_CHUNK_LEN {
        return Err(invalid(format!("request for a chunk of {len} bytes (limit {MAX_CHUNK_LEN})")));
    }
    Ok(ChunkRequest { id: ChunkId::from_bytes(id), len })
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

    #[test]
    fn request_roundtrips() {
        let req = ChunkRequest { id: ChunkId::of(b"x"), len: 4096 };
        let mut wire = futures::io::Cursor::new(Vec::new());
        block_on(ChunkCodec.write_request(&PROTOCOL, &mut wire, req)).unwrap();
        let mut rd = futures::io::Cursor::new(wire.into_inner());
        assert_eq!(block_on(ChunkCodec.read_request(&PROTOCOL, &mut rd)).unwrap(), req);
    }

    #[test]
    fn responses_roundtrip() {
        for res in [ChunkResponse::Object(vec![0, 1, 2, 3]), ChunkResponse::NotFound, ChunkResponse::Busy] {
            assert_eq!(roundtrip_response(res.clone()).unwrap(), res);
        }
    }

    #[test]
    fn oversized_declarations_are_refused_before_allocating() {
        let mut wire = vec![TAG_OBJECT];
        wire.extend_from_slice(&(MAX_OBJECT_LEN + 1).to_be_bytes());
        let mut rd = futures::io::Cursor::new(wire);
        let e = block_on(ChunkCodec.read_response(&PROTOCOL, &mut rd)).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::InvalidData);

        let mut req = encode_request(&ChunkRequest { id: ChunkId::of(b"x"), len: 1 });
        req[32..].copy_from_slice(&(MAX_CHUNK_LEN + 1).to_be_bytes());
        assert!(decode_request(&req).is_err());
        req[32..].copy_from_slice(&0u32.to_be_bytes());
        assert!(decode_request(&req).is_err());
    }

    #[test]
    fn release_messages_roundtrip_and_are_bounded() {
        let req = ReleaseRequest { ask: ReleaseAsk::HaveMap, index: IndexId::of(b"i"), max_len: 512 };
        let mut wire = futures::io::Cursor::new(Vec::new());
        block_on(ReleaseCodec.write_request(&RELEASE_PROTOCOL, &mut wire, req)).unwrap();
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
    fn truncated_and_junk_answers_are_errors() {
        let mut rd = futures::io::Cursor::new(vec![TAG_OBJECT, 0, 0, 0, 9, 1, 2]);
        assert!(block_on(ChunkCodec.read_response(&PROTOCOL, &mut rd)).is_err());
        let mut rd = futures::io::Cursor::new(vec![7u8]);
        assert!(block_on(ChunkCodec.read_response(&PROTOCOL, &mut rd)).is_err());
        let mut rd = futures::io::Cursor::new(Vec::new());
        assert!(block_on(ChunkCodec.read_response(&PROTOCOL, &mut rd)).is_err());
    }
}
