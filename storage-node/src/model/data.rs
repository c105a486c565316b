//! Moving object data between request bodies, chunk files and response bodies, in
//! bounded pieces: nothing here holds a whole large object in memory.

use std::io;
use std::ops::Range;
use std::path::PathBuf;

use bytes::{Bytes, BytesMut};
use futures::stream::StreamExt;
use md5::{Digest, Md5};
use serde::{Deserialize, Serialize};

use super::{Error, Result};
use crate::engine::chunk::CHUNK_MAX;
use crate::engine::{ChunkError, ChunkRef, ChunkStore, ChunkWriter};
use crate::types::PartitionId;

/// A request or response body: a stream of byte pieces.
pub type ByteStream =
    std::pin::Pin<Box<dyn futures::Stream<Item = Result<Bytes, io::Error>> + Send + Sync>>;

/// Objects up to this size are stored inline in the metadata engine: one group commit,
/// no chunk file, no extra fsync.
pub const INLINE_MAX: usize = 64 * 1024;
/// Size of the pieces handed to the blocking writer and read back on GET.
const IO_PIECE: usize = 1024 * 1024;
/// Body buffers at least this large are written from where they are; smaller ones are
/// copied together first.
const KEEP_AT_LEAST: usize = 16 * 1024;

/// Whose I/O a body transfer is, for the node's I/O scheduler: each piece read from or
/// written to a chunk file waits for a slot in its class's fair turn.
#[derive(Clone)]
pub struct Io {
    pub sched: crate::tenancy::sched::IoScheduler,
    pub class: crate::tenancy::sched::Class,
    pub weight: u32,
    /// Told of each chunk file once it is complete and durable.
    pub announce: Option<super::ChunkHook>,
}

impl Io {
    async fn slot(&self, bytes: usize) -> crate::tenancy::sched::Slot {
        self.sched.slot(self.class, self.weight, bytes as u64).await
    }

    /// Waits for the class's fair turn for `bytes` of I/O that is not the node's disk
    /// (a piece read from the cold tier): ordered and charged like a piece, but holding
    /// no disk slot while the remote store answers.
    pub async fn turn(&self, bytes: u64) {
        self.sched.turn(self.class, bytes).await
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum ObjectData {
    Inline {
        #[serde(with = "serde_bytes")]
        bytes: Vec<u8>,
        crc: u32,
    },
    Chunks(Vec<ChunkRef>),
    /// Moved to the cold tier (see `model::tiering`).
    Cold(crate::cold::ColdRef),
}

impl ObjectData {
    pub fn chunks(&self) -> &[ChunkRef] {
        match self {
            ObjectData::Inline { .. } | ObjectData::Cold(_) => &[],
            ObjectData::Chunks(c) => c,
        }
    }

    pub fn into_chunks(self) -> Vec<ChunkRef> {
        match self {
            ObjectData::Inline { .. } | ObjectData::Cold(_) => Vec::new(),
            ObjectData::Chunks(c) => c,
        }
    }

    /// Whether the data is in the cold tier.
    pub fn is_cold(&self) -> bool {
        matches!(self, ObjectData::Cold(_))
    }

    pub fn inline(bytes: Vec<u8>) -> Self {
        let crc = crc32c::crc32c(&bytes);
        ObjectData::Inline { bytes, crc }
    }
}

/// Data written for one object or part, durable on disk but not yet referenced.
pub struct Written {
    pub data: ObjectData,
    pub size: u64,
    pub md5: [u8; 16],
    /// Directories of new chunk files, to be fsynced by the commit that references them.
    pub dirs: Vec<PathBuf>,
}

/// The state carried between blocking write steps.
struct Sink {
    store: ChunkStore,
    partition: PartitionId,
    current: Option<ChunkWriter>,
    done: Vec<ChunkRef>,
    dirs: Vec<PathBuf>,
    md5: Md5,
    size: u64,
    announce: Option<super::ChunkHook>,
}

impl Sink {
    fn write(&mut self, mut data: &[u8]) -> io::Result<()> {
        self.md5.update(data);
        self.size += data.len() as u64;
        while !data.is_empty() {
            if self.current.is_none() {
                let w = self.store.create(self.partition)?;
                if !self.dirs.iter().any(|d| d == w.dir()) {
                    self.dirs.push(w.dir().to_path_buf());
                }
                self.current = Some(w);
            }
            let Some(w) = self.current.as_mut() else {
                continue;
            };
            let n = w.append(data)?;
            data = &data[n..];
            if w.len() >= CHUNK_MAX
                && let Some(full) = self.current.take()
            {
                let c = full.finish()?;
                if let Some(a) = &self.announce {
                    a(&c);
                }
                self.done.push(c);
            }
        }
        Ok(())
    }

    fn finish(mut self) -> io::Result<Written> {
        if let Some(w) = self.current.take() {
            let c = w.finish()?;
            if let Some(a) = &self.announce {
                a(&c);
            }
            self.done.push(c);
        }
        Ok(Written {
            data: ObjectData::Chunks(self.done),
            size: self.size,
            md5: self.md5.finalize().into(),
            dirs: self.dirs,
        })
    }

    fn abandon(mut self) {
        if let Some(w) = self.current.take() {
            w.abandon();
        }
        self.store.remove_files(&self.done);
    }
}

async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> Result<T> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| Error::Invalid(format!("worker failed: {e}")))
}

/// Streams `body` to durable storage: inline if it is small, chunk files otherwise.
/// While one piece is written the next is received (one write in flight). On any error
/// every file written so far is removed.
pub async fn write_body(
    store: &ChunkStore,
    partition: PartitionId,
    body: ByteStream,
    io: &Io,
) -> Result<Written> {
    write_body_inner(store, partition, body, INLINE_MAX, io).await
}

/// Like [`write_body`] but always to chunk files (multipart parts are stitched by
/// reference, so they cannot be inline).
pub async fn write_body_chunked(
    store: &ChunkStore,
    partition: PartitionId,
    body: ByteStream,
    io: &Io,
) -> Result<Written> {
    write_body_inner(store, partition, body, 0, io).await
}

async fn write_body_inner(
    store: &ChunkStore,
    partition: PartitionId,
    mut body: ByteStream,
    inline_max: usize,
    io: &Io,
) -> Result<Written> {
    let mut buf = BytesMut::new();
    let mut ended = false;
    // Small bodies never touch a chunk file.
    while buf.len() <= inline_max || (inline_max == 0 && buf.is_empty()) {
        match body.next().await {
            Some(Ok(b)) => buf.extend_from_slice(&b),
            Some(Err(e)) => return Err(body_error(e)),
            None if inline_max == 0 => {
                ended = true;
                break;
            }
            None => {
                let md5: [u8; 16] = Md5::digest(&buf).into();
                return Ok(Written {
                    size: buf.len() as u64,
                    md5,
                    data: ObjectData::inline(buf.to_vec()),
                    dirs: vec![],
                });
            }
        }
    }
    let sink = Sink {
        store: store.clone(),
        partition,
        current: None,
        done: Vec::new(),
        dirs: Vec::new(),
        md5: Md5::new(),
        size: 0,
        announce: io.announce.clone(),
    };
    let slot = io.slot(buf.len()).await;
    let mut in_flight: tokio::task::JoinHandle<(Sink, io::Result<()>)> =
        tokio::task::spawn_blocking(move || {
            let mut sink = sink;
            let r = sink.write(&buf);
            drop(slot);
            (sink, r)
        });
    // The body's own buffers, written from where they are (not copied together); small
    // ones are copied together, so a client sending tiny pieces cannot pin much more
    // memory than the piece's size.
    let mut next: Vec<Bytes> = Vec::new();
    let mut small = BytesMut::new();
    let mut next_len = 0;
    let mut failure: Option<Error> = None;
    loop {
        let item = if ended { None } else { body.next().await };
        let end = match item {
            Some(Ok(b)) => {
                next_len += b.len();
                if b.len() < KEEP_AT_LEAST {
                    small.extend_from_slice(&b);
                } else {
                    if !small.is_empty() {
                        next.push(small.split().freeze());
                    }
                    next.push(b);
                }
                false
            }
            Some(Err(e)) => {
                failure = Some(body_error(e));
                true
            }
            None => true,
        };
        if next_len >= IO_PIECE || end {
            let (mut sink, r) = in_flight
                .await
                .map_err(|e| Error::Invalid(format!("worker failed: {e}")))?;
            if let Err(e) = r {
                blocking(move || sink.abandon()).await?;
                return Err(Error::Engine(e.into()));
            }
            if let Some(f) = failure {
                blocking(move || sink.abandon()).await?;
                return Err(f);
            }
            if !small.is_empty() {
                next.push(small.split().freeze());
            }
            let pieces = std::mem::take(&mut next);
            let slot = io.slot(std::mem::take(&mut next_len)).await;
            in_flight = tokio::task::spawn_blocking(move || {
                let r = pieces.iter().try_for_each(|p| sink.write(p));
                drop(slot);
                (sink, r)
            });
            if end {
                break;
            }
        }
    }
    let (sink, r) = in_flight
        .await
        .map_err(|e| Error::Invalid(format!("worker failed: {e}")))?;
    if let Err(e) = r {
        blocking(move || sink.abandon()).await?;
        return Err(Error::Engine(e.into()));
    }
    // The last chunk's fsync is disk time too.
    let slot = io.slot(IO_PIECE).await;
    let written = blocking(move || {
        let r = sink.finish();
        drop(slot);
        r
    })
    .await?
    .map_err(|e| Error::Engine(e.into()))?;
    Ok(written)
}

/// Removes freshly written data that will not be committed.
pub async fn abandon(store: &ChunkStore, data: ObjectData) {
    let store = store.clone();
    let chunks = data.into_chunks();
    if !chunks.is_empty() {
        let _ = blocking(move || store.remove_files(&chunks)).await;
    }
}

/// The error a body stream carries when its *source* failed (a copy source streamed
/// from another node), not the client: the write is refused as retryable (503), not
/// blamed on the request (400).
#[derive(Debug)]
pub struct SourceFailed(pub String);

impl std::fmt::Display for SourceFailed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for SourceFailed {}

/// A body stream's error as the model reports it.
fn body_error(e: io::Error) -> Error {
    match e.get_ref().and_then(|i| i.downcast_ref::<SourceFailed>()) {
        Some(SourceFailed(why)) => Error::NotPrimary(why.clone()),
        None => Error::IncompleteBody(e.to_string()),
    }
}

/// A readable object body: a verified first piece plus the rest as a lazy stream.
pub struct ObjectBody {
    pub len: u64,
    pub stream: ByteStream,
}

fn chunk_err(e: ChunkError) -> Error {
    match e {
        ChunkError::Io(e) => Error::Engine(e.into()),
        other => Error::Corrupt(other.to_string()),
    }
}

/// Reads `range` of `data`. The first piece is read (and verified) before this returns,
/// so a damaged start of an object fails the request cleanly instead of mid-body; a
/// damaged later piece ends the body stream with an error. Never yields unverified bytes.
pub async fn read_body(
    store: &ChunkStore,
    data: &ObjectData,
    range: Range<u64>,
    io: &Io,
) -> Result<ObjectBody> {
    let len = range.end - range.start;
    match data {
        ObjectData::Inline { bytes, crc } => {
            if crc32c::crc32c(bytes) != *crc {
                return Err(Error::Corrupt(
                    "inline object data fails its checksum".into(),
                ));
            }
            let piece = Bytes::copy_from_slice(&bytes[range.start as usize..range.end as usize]);
            Ok(ObjectBody {
                len,
                stream: Box::pin(futures::stream::once(async move { Ok(piece) })),
            })
        }
        ObjectData::Cold(_) => Err(Error::ColdTierUnavailable(
            "cold data is read through the store's cold tier".into(),
        )),
        ObjectData::Chunks(chunks) => {
            // The files stay on disk until the body is sent or dropped, even if the
            // object is overwritten or deleted meanwhile.
            let pin = store.pin(chunks);
            // Plan the reads: (chunk, start, end) pieces of at most IO_PIECE bytes.
            let mut plan = Vec::new();
            let mut offset = 0u64;
            for c in chunks {
                let (cs, ce) = (offset, offset + c.len);
                let s = range.start.max(cs);
                let e = range.end.min(ce);
                let mut pos = s;
                while pos < e {
                    let stop = (pos + IO_PIECE as u64).min(e);
                    plan.push((c.clone(), pos - cs, stop - cs));
                    pos = stop;
                }
                offset = ce;
            }
            let mut plan = plan.into_iter();
            let first = match plan.next() {
                None => Bytes::new(),
                Some((c, s, e)) => {
                    let st = store.clone();
                    let slot = io.slot((e - s) as usize).await;
                    Bytes::from(
                        blocking(move || {
                            let r = st.read_range(&c, s, e);
                            drop(slot);
                            r
                        })
                        .await?
                        .map_err(chunk_err)?,
                    )
                }
            };
            let store = store.clone();
            let io = io.clone();
            let rest = futures::stream::unfold((plan, pin), move |(mut plan, pin)| {
                let (store, io) = (store.clone(), io.clone());
                async move {
                    let (c, s, e) = plan.next()?;
                    let slot = io.slot((e - s) as usize).await;
                    let r = tokio::task::spawn_blocking(move || {
                        let r = store.read_range(&c, s, e);
                        drop(slot);
                        r
                    })
                    .await
                    .map_err(io::Error::other)
                    .and_then(|r| r.map_err(io::Error::other))
                    .map(Bytes::from);
                    Some((r, (plan, pin)))
                }
            });
            let stream: ByteStream =
                Box::pin(futures::stream::once(async move { Ok(first) }).chain(rest));
            Ok(ObjectBody { len, stream })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Bodies arrive in pieces of every size (tiny ones are copied together, large ones
    /// written from where they are): what is stored is the body, byte for byte.
    #[tokio::test]
    async fn bodies_in_pieces_of_every_size_are_stored_exactly() {
        let dir = tempfile::tempdir().unwrap();
        let store = ChunkStore::open(dir.path().to_path_buf()).unwrap();
        let io = Io {
            sched: crate::tenancy::sched::IoScheduler::new(2, None),
            class: crate::tenancy::sched::Class::Background,
            weight: 1,
            announce: None,
        };
        let mut data = Vec::new();
        let mut pieces = Vec::new();
        let sizes = [
            1,
            3,
            100_000,
            7,
            KEEP_AT_LEAST - 1,
            KEEP_AT_LEAST,
            1 << 20,
            5,
        ];
        for i in 0..400 {
            let n = sizes[i % sizes.len()] + i % 13;
            let piece: Vec<u8> = (0..n).map(|j| (i * 31 + j) as u8).collect();
            data.extend_from_slice(&piece);
            pieces.push(Ok(Bytes::from(piece)));
        }
        let body: ByteStream = Box::pin(futures::stream::iter(pieces));
        let w = write_body_chunked(&store, PartitionId(1), body, &io)
            .await
            .unwrap();
        assert_eq!(w.size, data.len() as u64);
        assert_eq!(w.md5, <[u8; 16]>::from(Md5::digest(&data)));
        let mut back = Vec::new();
        for c in w.data.chunks() {
            back.extend_from_slice(&store.read_range(c, 0, c.len).unwrap());
        }
        assert!(back == data, "stored bytes differ from the body");
    }
}
