//! Partition snapshots: a whole partition (every record of every table in its key range,
//! and its chunk files) as one byte stream, and the import that installs such a stream on
//! another node. This is how a new or returning replica catches up when the primary's log
//! no longer reaches back far enough, and how a partition moves when the layout changes
//! (docs/cluster.md).
//!
//! Stream: frames of `u32` big-endian length + postcard [`Frame`]. Records come from one
//! read transaction, so they are one consistent state of the partition. Chunk files are
//! sent as stored (header, data and per-block CRCs) and verified on arrival before they
//! are made visible; the chunk files of the partition are pinned for the whole export, so
//! none that the snapshot references can be removed while it is sent. Chunk files that
//! became garbage or were written after the snapshot began may travel too: they are
//! unreferenced on the receiver and its orphan sweep removes them.
//!
//! Import is crash-safe in the sense that matters: chunk files are fsynced (and their
//! directories) before any record referring to them commits, and the partition carries an
//! `importing` mark from the first record batch to the last, so a node that crashed
//! half-way knows the partition is incomplete ([`Engine::importing`]) and fetches it again.

use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use bytes::Bytes;
use futures::{Stream, StreamExt, stream};
use redb::{ReadableDatabase, ReadableTable, TableDefinition};
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use super::chunk::{self, ChunkRef, ImageCheck};
use super::direct::{self, DirectFile};
use super::keys::{partition_prefix, prefix_end};
use super::replog::{PART_LSN, REPL_LOG};
use super::usage::{USAGE, UsageDeltas};
use super::{
    DEAD_BUCKETS, Engine, EngineError, KV, KV_EXPIRY, META, OBJECTS, PARTS, Record, UPLOADS,
    UPLOADS_BY_AGE, UPLOADS_BY_KEY,
};
use crate::types::{ChunkId, PartitionId};

type ValueTable = TableDefinition<'static, &'static [u8], Record>;
type KeyTable = TableDefinition<'static, &'static [u8], ()>;
/// A record in transit: table number, key, value (None in key-only tables).
type Rec = (u8, Vec<u8>, Option<Vec<u8>>);

/// Tables with values, by their number in the stream.
pub(super) const VALUE_TABLES: [(u8, ValueTable); 4] =
    [(0, OBJECTS), (1, UPLOADS), (2, PARTS), (3, KV)];
/// Tables that are sets of keys, each key starting with its partition.
pub(super) const KEY_TABLES: [(u8, KeyTable); 3] =
    [(4, KV_EXPIRY), (5, DEAD_BUCKETS), (6, UPLOADS_BY_KEY)];
/// The uploads-by-age index: keys are `initiated (8) | upload key`, so its partition
/// follows the time and it is filtered rather than range-scanned.
pub(super) const AGE_TABLE: u8 = 7;
pub(super) const AGE_PREFIX: usize = 8;
/// The replication log ([`REPL_LOG`]) and log positions ([`PART_LSN`], value: the u64 as
/// redb stores it, 8 bytes little-endian).
const LOG_TABLE: u8 = 8;
const LSN_TABLE: u8 = 9;

/// Records per frame batch read from the database, and per import commit.
const BATCH: usize = 1024;
/// Largest piece of a chunk file in one frame.
const CHUNK_PIECE: usize = 1 << 20;
/// Bytes per item of a chunk file's frames as sent (see [`Engine::chunk_frames`]).
const SEND_SLICE: usize = 64 << 10;
/// Largest chunk file there can be: header, data, one CRC per block.
const MAX_CHUNK_FILE: u64 =
    16 + chunk::CHUNK_MAX + (chunk::CHUNK_MAX / chunk::BLOCK as u64 + 1) * 4;
/// Largest frame accepted (a record is at most a few MiB: KV values and inline data are
/// bounded far below this).
const MAX_FRAME: u32 = 16 << 20;
/// Record bytes buffered before an import commits them.
const BATCH_BYTES: usize = 8 << 20;

/// Version of the stream format; an importer refuses any other.
const FORMAT: u16 = 1;

#[derive(Debug, Serialize, Deserialize)]
enum Frame {
    Start {
        format: u16,
        partition: u16,
    },
    Record {
        table: u8,
        key: Vec<u8>,
        value: Option<Vec<u8>>,
    },
    ChunkStart {
        id: ChunkId,
        size: u64,
    },
    ChunkPiece(#[serde(with = "serde_bytes")] Vec<u8>),
    /// `seq`: the sender's version counter at the snapshot; the receiver's continues
    /// above it, so versions never repeat or go back on the new holder.
    End {
        records: u64,
        chunks: u64,
        seq: u64,
    },
}

/// What an import installed.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Imported {
    pub records: u64,
    pub chunks: u64,
}

fn invalid(msg: impl Into<String>) -> EngineError {
    EngineError::Io(io::Error::new(io::ErrorKind::InvalidData, msg.into()))
}

fn importing_key(p: PartitionId) -> String {
    format!("importing:{}", p.0)
}

async fn write_frame<W: AsyncWrite + Unpin>(w: &mut W, f: &Frame) -> Result<(), EngineError> {
    w.write_all(&frame_bytes(f)?).await?;
    Ok(())
}

/// A frame as sent: body length (u32 BE), body (postcard), the body's CRC32C (BE).
fn frame_bytes(f: &Frame) -> Result<Vec<u8>, EngineError> {
    let body = postcard::to_stdvec(f).map_err(|e| invalid(e.to_string()))?;
    let mut out = Vec::with_capacity(body.len() + 8);
    out.extend_from_slice(&(body.len() as u32).to_be_bytes());
    out.extend_from_slice(&body);
    out.extend_from_slice(&crc32c::crc32c(&body).to_be_bytes());
    Ok(out)
}

/// Postcard's index of `Frame::ChunkPiece`.
const CHUNK_PIECE_VARIANT: u8 = 3;

/// The bytes around `data` that make it a `Frame::ChunkPiece` frame, byte for byte what
/// [`frame_bytes`] makes of it (postcard: the variant's index, then the length as a
/// varint, then the bytes), so a piece is sent without copying it.
fn piece_frame(data: &[u8]) -> (Bytes, Bytes) {
    let mut head = vec![0u8; 4];
    head.push(CHUNK_PIECE_VARIANT);
    let mut n = data.len();
    loop {
        let byte = (n & 0x7f) as u8;
        n >>= 7;
        if n == 0 {
            head.push(byte);
            break;
        }
        head.push(byte | 0x80);
    }
    let body_len = (head.len() - 4 + data.len()) as u32;
    head[..4].copy_from_slice(&body_len.to_be_bytes());
    let crc = crc32c::crc32c_append(crc32c::crc32c(&head[4..]), data);
    (
        Bytes::from(head),
        Bytes::copy_from_slice(&crc.to_be_bytes()),
    )
}

/// Reads a frame that must be a `Frame::ChunkPiece`; returns its body and where the
/// piece's bytes start in it (read in place, not copied out).
async fn read_piece<R: AsyncRead + Unpin>(r: &mut R) -> Result<(Vec<u8>, usize), EngineError> {
    let body = read_frame_body(r).await?;
    let cut_short = || invalid("chunk file cut short in the snapshot");
    if body.first() != Some(&CHUNK_PIECE_VARIANT) {
        return Err(cut_short());
    }
    let (mut n, mut shift, mut at) = (0u64, 0u32, 1usize);
    loop {
        let byte = *body.get(at).ok_or_else(cut_short)?;
        at += 1;
        if shift > 63 {
            return Err(cut_short());
        }
        n |= u64::from(byte & 0x7f) << shift;
        if byte & 0x80 == 0 {
            break;
        }
        shift += 7;
    }
    if n != (body.len() - at) as u64 {
        return Err(invalid(
            "bad snapshot frame: piece length differs from the frame's",
        ));
    }
    Ok((body, at))
}

async fn read_frame<R: AsyncRead + Unpin>(r: &mut R) -> Result<Frame, EngineError> {
    let body = read_frame_body(r).await?;
    postcard::from_bytes(&body).map_err(|e| invalid(format!("bad snapshot frame: {e}")))
}

/// A frame's body, its length and checksum checked.
async fn read_frame_body<R: AsyncRead + Unpin>(r: &mut R) -> Result<Vec<u8>, EngineError> {
    let len = r.read_u32().await?;
    if len > MAX_FRAME {
        return Err(invalid(format!(
            "snapshot frame of {len} bytes is too large"
        )));
    }
    let mut body = vec![0u8; len as usize];
    r.read_exact(&mut body).await?;
    if r.read_u32().await? != crc32c::crc32c(&body) {
        return Err(invalid("snapshot frame fails its checksum"));
    }
    Ok(body)
}

/// Sends every entry of `def` in `range` as a record of table `n` (with its value unless
/// the table is a key set). False when the receiver went away.
fn send_range<V: redb::Value + 'static>(
    txn: &redb::ReadTransaction,
    def: TableDefinition<&'static [u8], V>,
    n: u8,
    (start, end): (&[u8], Option<&[u8]>),
    with_value: bool,
    send: &impl Fn(Result<Frame, EngineError>) -> bool,
) -> Result<bool, EngineError> {
    let t = txn.open_table(def)?;
    let range = match end {
        Some(e) => t.range::<&[u8]>(start..e)?,
        None => t.range::<&[u8]>(start..)?,
    };
    for entry in range {
        let (k, v) = entry?;
        let value = with_value.then(|| V::as_bytes(&v.value()).as_ref().to_vec());
        let f = Frame::Record {
            table: n,
            key: k.value().to_vec(),
            value,
        };
        if !send(Ok(f)) {
            return Ok(false);
        }
    }
    Ok(true)
}

/// Sends the uploads-by-age keys of the partition whose prefix is `start`: a whole-table
/// filter (in-progress uploads are few). False when the receiver went away.
fn send_age_keys(
    txn: &redb::ReadTransaction,
    start: &[u8],
    send: &impl Fn(Result<Frame, EngineError>) -> bool,
) -> Result<bool, EngineError> {
    for entry in txn.open_table(UPLOADS_BY_AGE)?.iter()? {
        let (k, _) = entry?;
        let key = k.value();
        if key
            .get(AGE_PREFIX..)
            .is_some_and(|rest| rest.starts_with(start))
        {
            let f = Frame::Record {
                table: AGE_TABLE,
                key: key.to_vec(),
                value: None,
            };
            if !send(Ok(f)) {
                return Ok(false);
            }
        }
    }
    Ok(true)
}

/// Deletes every entry of `def` in `range`.
fn clear_range<V: redb::Value + 'static>(
    txn: &redb::WriteTransaction,
    def: TableDefinition<&'static [u8], V>,
    (start, end): (&[u8], Option<&[u8]>),
) -> Result<(), EngineError> {
    let mut t = txn.open_table(def)?;
    match end {
        Some(e) => t.retain_in::<&[u8], _>(start..e, |_, _| false)?,
        None => t.retain_in::<&[u8], _>(start.., |_, _| false)?,
    }
    Ok(())
}

impl Engine {
    /// A digest of everything partition `p` holds in the metadata engine (every record
    /// of every replicated table, its log and log position; not chunk file contents,
    /// which carry their own checksums): equal digests mean equal partitions. Returns
    /// the number of records and the SHA-256.
    pub async fn partition_digest(&self, p: PartitionId) -> Result<(u64, String), EngineError> {
        use sha2::{Digest, Sha256};
        self.read(move |txn| {
            let hasher = std::cell::RefCell::new((0u64, Sha256::new()));
            let hash = |f: Result<Frame, EngineError>| {
                if let Ok(Frame::Record { table, key, value }) = f {
                    let mut h = hasher.borrow_mut();
                    h.0 += 1;
                    h.1.update([table]);
                    h.1.update((key.len() as u64).to_be_bytes());
                    h.1.update(&key);
                    match value {
                        Some(v) => {
                            h.1.update([1]);
                            h.1.update((v.len() as u64).to_be_bytes());
                            h.1.update(&v);
                        }
                        None => h.1.update([0]),
                    }
                }
                true
            };
            let start = partition_prefix(p);
            let end = prefix_end(&start);
            let range = (start.as_slice(), end.as_deref());
            for (n, def) in VALUE_TABLES {
                send_range(txn, def, n, range, true, &hash)?;
            }
            for (n, def) in KEY_TABLES {
                send_range(txn, def, n, range, false, &hash)?;
            }
            send_age_keys(txn, &start, &hash)?;
            send_range(txn, REPL_LOG, LOG_TABLE, range, true, &hash)?;
            send_range(txn, PART_LSN, LSN_TABLE, range, true, &hash)?;
            let (n, h) = hasher.into_inner();
            Ok((n, hex::encode(h.finalize())))
        })
        .await
    }

    /// Writes a snapshot of partition `p` to `out`.
    pub async fn export_partition<W: AsyncWrite + Unpin>(
        &self,
        p: PartitionId,
        out: &mut W,
    ) -> Result<Imported, EngineError> {
        let (tx, mut rx) = tokio::sync::mpsc::channel::<Result<Frame, EngineError>>(4);
        let db = self.db.clone();
        let chunks = self.chunks.clone();
        // Records: one read transaction, walked off the runtime with backpressure.
        let reader = tokio::task::spawn_blocking(move || {
            let send = |f: Result<Frame, EngineError>| tx.blocking_send(f).is_ok();
            // Some(seq) when everything was sent; None when the receiver went away.
            let run = || -> Result<Option<u64>, EngineError> {
                let txn = db.begin_read()?;
                // Pinned after the snapshot began: every file it references is on disk
                // now (removal waits 5 s after the commit that unreferenced a file) and
                // stays until the export ends.
                let files = chunks.list_partition(p)?;
                let pin = chunks.pin(&files);
                // The version counter of this state: the receiver continues above it.
                let seq = txn
                    .open_table(META)?
                    .get("seq")?
                    .map(|v| v.value())
                    .unwrap_or(0);
                // Files first, so the importer has every file on disk before a record
                // referring to it commits.
                let start = partition_prefix(p);
                let end = prefix_end(&start);
                for c in &files {
                    let path = chunks.path(c.partition, c.id);
                    let data = match std::fs::read(&path) {
                        Ok(d) => d,
                        // Removed before we pinned it: it was garbage, not referenced.
                        Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                        Err(e) => return Err(e.into()),
                    };
                    let size = data.len() as u64;
                    if !send(Ok(Frame::ChunkStart { id: c.id, size })) {
                        return Ok(None);
                    }
                    for piece in data.chunks(CHUNK_PIECE) {
                        if !send(Ok(Frame::ChunkPiece(piece.to_vec()))) {
                            return Ok(None);
                        }
                    }
                }
                let range = (start.as_slice(), end.as_deref());
                for (n, def) in VALUE_TABLES {
                    if !send_range(&txn, def, n, range, true, &send)? {
                        return Ok(None);
                    }
                }
                for (n, def) in KEY_TABLES {
                    if !send_range(&txn, def, n, range, false, &send)? {
                        return Ok(None);
                    }
                }
                if !send_age_keys(&txn, &start, &send)? {
                    return Ok(None);
                }
                // The partition's replication log and its position travel with it, so
                // the receiver continues from the log where the snapshot left off.
                if !send_range(&txn, REPL_LOG, LOG_TABLE, range, true, &send)?
                    || !send_range(&txn, PART_LSN, LSN_TABLE, range, true, &send)?
                {
                    return Ok(None);
                }
                drop(pin);
                Ok(Some(seq))
            };
            match run() {
                Ok(Some(seq)) => {
                    let _ = tx.blocking_send(Ok(Frame::End {
                        records: 0,
                        chunks: 0,
                        seq,
                    }));
                }
                Ok(None) => {}
                Err(e) => {
                    let _ = tx.blocking_send(Err(e));
                }
            }
        });
        write_frame(
            out,
            &Frame::Start {
                format: FORMAT,
                partition: p.0,
            },
        )
        .await?;
        let mut n = Imported::default();
        let mut ended = false;
        while let Some(f) = rx.recv().await {
            let mut f = f?;
            match &mut f {
                Frame::Record { .. } => n.records += 1,
                Frame::ChunkStart { .. } => n.chunks += 1,
                Frame::End {
                    records, chunks, ..
                } => {
                    (*records, *chunks) = (n.records, n.chunks);
                    ended = true;
                }
                _ => {}
            }
            write_frame(out, &f).await?;
        }
        reader
            .await
            .map_err(|e| EngineError::Db(format!("snapshot reader failed: {e}")))?;
        if !ended {
            return Err(EngineError::Closed);
        }
        out.flush().await?;
        Ok(n)
    }

    /// Replaces partition `p` with the snapshot read from `input`. Nothing of the
    /// partition may be served while this runs.
    pub async fn import_partition<R: AsyncRead + Unpin>(
        &self,
        p: PartitionId,
        input: &mut R,
    ) -> Result<Imported, EngineError> {
        self.log_state().forget(p);
        match read_frame(input).await? {
            Frame::Start { format, partition } if format == FORMAT && partition == p.0 => {}
            other => {
                return Err(invalid(format!(
                    "snapshot does not start with partition {p}: {other:?}"
                )));
            }
        }
        // Temporary files of an import a crash interrupted are never referenced.
        let chunks = self.chunks.clone();
        off_runtime(move || chunks.remove_temporaries(Some(p))).await?;
        // Clear the partition and mark it incomplete, durably, before anything lands.
        let mark = importing_key(p);
        self.write(Vec::new(), move |ctx| {
            clear_partition(ctx.txn.untracked(), p)?;
            ctx.txn
                .untracked()
                .open_table(META)?
                .insert(mark.as_str(), 1)?;
            Ok(())
        })
        .await?;
        let mut got = Imported::default();
        let mut batch: Vec<Rec> = Vec::new();
        let mut batch_bytes = 0usize;
        let mut dirs: Vec<PathBuf> = Vec::new();
        let sender_seq = loop {
            match read_frame(input).await? {
                Frame::Record { table, key, value } => {
                    let own = if table == AGE_TABLE {
                        key.get(AGE_PREFIX..).unwrap_or_default()
                    } else {
                        &key
                    };
                    if !own.starts_with(&partition_prefix(p)) {
                        return Err(invalid("snapshot record outside its partition"));
                    }
                    batch_bytes += key.len() + value.as_ref().map_or(0, Vec::len);
                    batch.push((table, key, value));
                    got.records += 1;
                    if batch.len() >= BATCH || batch_bytes >= BATCH_BYTES {
                        batch_bytes = 0;
                        self.apply_records(std::mem::take(&mut batch), std::mem::take(&mut dirs))
                            .await?;
                    }
                }
                Frame::ChunkStart { id, size } => {
                    let dir = self.receive_chunk(p, id, size, input).await?;
                    if !dirs.contains(&dir) {
                        dirs.push(dir);
                    }
                    got.chunks += 1;
                }
                Frame::End {
                    records,
                    chunks,
                    seq,
                } => {
                    if (records, chunks) != (got.records, got.chunks) {
                        return Err(invalid(format!(
                            "snapshot ended after {} records and {} chunks, announced {records} and {chunks}",
                            got.records, got.chunks
                        )));
                    }
                    break seq;
                }
                other => return Err(invalid(format!("unexpected snapshot frame {other:?}"))),
            }
        };
        // The last batch also syncs every chunk directory and lifts the mark: from this
        // commit on the partition is complete.
        let mark = importing_key(p);
        let last = std::mem::take(&mut batch);
        self.write(dirs, move |ctx| {
            apply(ctx.txn.untracked(), last, &mut ctx.txn.usage().borrow_mut())?;
            let lsn = super::replog::last_lsn(ctx.txn.untracked(), p)?;
            ctx.logged(p, lsn);
            ctx.raise_seq_to(sender_seq);
            ctx.txn
                .untracked()
                .open_table(META)?
                .remove(mark.as_str())?;
            Ok(())
        })
        .await?;
        Ok(got)
    }

    /// Partitions whose import started and did not finish (a crash or a failed stream).
    pub async fn partitions_importing(&self) -> Result<Vec<PartitionId>, EngineError> {
        self.read(|txn| {
            let t = txn.open_table(META)?;
            let mut out = Vec::new();
            for entry in t.range("importing:".."importing;")? {
                let (k, _) = entry?;
                if let Some(p) = k
                    .value()
                    .strip_prefix("importing:")
                    .and_then(|n| n.parse().ok())
                {
                    out.push(PartitionId(p));
                }
            }
            Ok(out)
        })
        .await
    }

    /// True while an import of `p` has started and not finished (also after a crash).
    pub async fn importing(&self, p: PartitionId) -> Result<bool, EngineError> {
        let key = importing_key(p);
        self.read(move |txn| Ok(txn.open_table(META)?.get(key.as_str())?.is_some()))
            .await
    }

    async fn apply_records(
        &self,
        records: Vec<Rec>,
        dirs: Vec<PathBuf>,
    ) -> Result<(), EngineError> {
        self.write(dirs, move |ctx| {
            apply(
                ctx.txn.untracked(),
                records,
                &mut ctx.txn.usage().borrow_mut(),
            )
        })
        .await
    }

    /// Chunk file `c` as snapshot frames (its start, then its pieces) for a replica:
    /// read around the page cache when the node writes chunk files that way
    /// (`direct_io`), and handed on without user-space copies. None if the file no
    /// longer exists (its data was replaced since, and the replica will never need it).
    pub async fn chunk_frames(
        &self,
        c: &ChunkRef,
    ) -> Result<Option<impl Stream<Item = io::Result<Bytes>> + Send + 'static>, EngineError> {
        let path = self.chunks.path(c.partition, c.id);
        let opened = off_runtime(move || match direct::open_read(&path) {
            Ok(f) => {
                let size = f.metadata()?.len();
                Ok(Some((f, size)))
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e),
        })
        .await?;
        let Some((file, size)) = opened else {
            return Ok(None);
        };
        if size > MAX_CHUNK_FILE {
            return Err(invalid(format!("chunk file {} of {size} bytes", c.id.0)));
        }
        let start = Bytes::from(frame_bytes(&Frame::ChunkStart { id: c.id, size })?);
        let file = Arc::new(file);
        // One piece read ahead while the one before is sent.
        let read = move |pos: u64| {
            let file = file.clone();
            let n = ((size - pos) as usize).min(CHUNK_PIECE);
            tokio::task::spawn_blocking(move || {
                let want = n.next_multiple_of(direct::ALIGN);
                let data = direct::read_aligned(&file, pos, want)?;
                if data.len() < n {
                    return Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "chunk file shorter than when it was opened",
                    ));
                }
                Ok(data.slice(..n))
            })
        };
        let first = (size > 0).then(|| read(0));
        let pieces = stream::unfold((0u64, first), move |(pos, pending)| {
            let read = read.clone();
            async move {
                let pending = pending?;
                let data = match pending.await.map_err(io::Error::other).and_then(|r| r) {
                    Ok(data) => data,
                    // After an error the stream ends.
                    Err(e) => return Some((vec![Err(e)], (size, None))),
                };
                let next = pos + data.len() as u64;
                let ahead = (next < size).then(|| read(next));
                let (head, tail) = piece_frame(&data);
                // Handed on in small slices (no copies): the sender counts what the
                // connection takes to tell a stalled replica from a slow one.
                let mut parts = vec![Ok(head)];
                let mut at = 0;
                while at < data.len() {
                    let to = (at + SEND_SLICE).min(data.len());
                    parts.push(Ok(data.slice(at..to)));
                    at = to;
                }
                parts.push(Ok(tail));
                Some((parts, (next, ahead)))
            }
        })
        .flat_map(stream::iter);
        Ok(Some(
            stream::once(futures::future::ready(Ok(start))).chain(pieces),
        ))
    }

    /// Receives one chunk file of partition `p` sent by [`Engine::chunk_frames`], verified
    /// against its own checksums and fsynced; it becomes reachable (and its directory
    /// durable) with the log entry that references it.
    pub async fn receive_sent_chunk<R: AsyncRead + Unpin>(
        &self,
        p: PartitionId,
        input: &mut R,
    ) -> Result<(), EngineError> {
        let Frame::ChunkStart { id, size } = read_frame(input).await? else {
            return Err(invalid("a shipped chunk starts with its header frame"));
        };
        self.receive_chunk(p, id, size, input).await.map(|_| ())
    }

    /// Streams one chunk file into place: temporary name, verified against its own
    /// header and block checksums as it arrives, fsynced, renamed. Returns its directory
    /// (to be synced by the commit that makes it reachable).
    async fn receive_chunk<R: AsyncRead + Unpin>(
        &self,
        p: PartitionId,
        id: ChunkId,
        size: u64,
        input: &mut R,
    ) -> Result<PathBuf, EngineError> {
        let path = self.chunks.path(p, id);
        let dir = path
            .parent()
            .map(Path::to_path_buf)
            .ok_or_else(|| invalid("chunk path without a directory"))?;
        if size > MAX_CHUNK_FILE {
            return Err(invalid(format!(
                "chunk file of {size} bytes announced; at most {MAX_CHUNK_FILE} exist"
            )));
        }
        // A name of its own per transfer: two transfers of one chunk (sent ahead, then
        // again with its entry) never write or rename each other's file.
        let tmp = dir.join(format!(
            "{}.{}{}",
            id.0.simple(),
            uuid::Uuid::new_v4().simple(),
            chunk::TEMPORARY_SUFFIX
        ));
        // Durably created like any chunk directory; the file's own name is made durable
        // by the commit that first references it (its directory is passed to it).
        let (chunks, d) = (self.chunks.clone(), dir.clone());
        tokio::task::spawn_blocking(move || chunks.ensure_dir(&d))
            .await
            .map_err(|e| EngineError::Db(format!("chunk directory task failed: {e}")))??;
        // Removed however this ends (an error, or the transfer dropped midway), unless
        // it took the chunk's name. A transfer dropped while its file is being created
        // leaves the creation running on a blocking thread: `dropped` tells that thread
        // to remove what it created (it checks after creating, the guard sets it before
        // removing, so one of the two always sees the file).
        struct Temporary {
            path: Option<PathBuf>,
            dropped: Arc<AtomicBool>,
        }
        impl Drop for Temporary {
            fn drop(&mut self) {
                if let Some(t) = self.path.take() {
                    self.dropped.store(true, Ordering::SeqCst);
                    let _ = std::fs::remove_file(t);
                }
            }
        }
        let dropped = Arc::new(AtomicBool::new(false));
        let mut guard = Temporary {
            path: Some(tmp.clone()),
            dropped: dropped.clone(),
        };
        let received = async {
            let t = tmp.clone();
            let mut file = off_runtime(move || {
                let file = DirectFile::create_new(&t)?;
                if dropped.load(Ordering::SeqCst) {
                    drop(file);
                    let _ = std::fs::remove_file(&t);
                    return Err(io::Error::other("chunk transfer dropped"));
                }
                Ok(file)
            })
            .await?;
            let mut check = ImageCheck::new(id);
            let mut left = size;
            while left > 0 {
                let (body, at) = read_piece(input).await?;
                let piece = body.len() - at;
                if piece as u64 > left {
                    return Err(invalid("chunk file longer than announced"));
                }
                left -= piece as u64;
                // Checked as it arrives, so the file is never read back.
                check.feed(&body[at..])?;
                file = off_runtime(move || file.append(&body[at..]).map(|()| file)).await?;
            }
            check.finish()?;
            off_runtime(move || file.finish()).await?;
            Ok(())
        }
        .await;
        if let Err(e) = received {
            // A temporary name is never collected by the orphan sweep: remove it now.
            let _ = tokio::fs::remove_file(&tmp).await;
            return Err(e);
        }
        // Verified under its temporary name: only a whole, intact file ever takes the
        // chunk's name (replacing a copy already there with the same bytes).
        let (tmp2, path2) = (tmp.clone(), path.clone());
        off_runtime(move || std::fs::rename(&tmp2, &path2)).await?;
        guard.path = None;
        Ok(dir)
    }
}

/// Runs blocking file work off the async worker threads.
async fn off_runtime<T: Send + 'static>(
    f: impl FnOnce() -> io::Result<T> + Send + 'static,
) -> Result<T, EngineError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| EngineError::Db(format!("chunk file task failed: {e}")))?
        .map_err(EngineError::from)
}

impl Engine {
    /// Removes everything this node holds of partition `p`: records, log, usage rows and
    /// chunk files (a copy the layout no longer places here). Returns how many chunk files
    /// were removed. The caller makes sure nothing else writes `p` meanwhile.
    pub async fn drop_partition(&self, p: PartitionId) -> Result<usize, EngineError> {
        self.log_state().forget(p);
        self.write(vec![], move |ctx| {
            clear_partition(ctx.txn.untracked(), p)?;
            ctx.logged(p, 0);
            Ok(())
        })
        .await?;
        let chunks = self.chunks.clone();
        tokio::task::spawn_blocking(move || -> Result<usize, EngineError> {
            let files = chunks.list_partition(p)?;
            let n = files.len();
            // A read still streaming one (it began while this node led the partition)
            // keeps it until it is done. The directories stay: they are known durable, and
            // the partition may be placed here again.
            chunks.remove_when_unused(files);
            Ok(n)
        })
        .await
        .map_err(|e| EngineError::Db(format!("chunk removal task failed: {e}")))?
    }
}

fn clear_partition(txn: &redb::WriteTransaction, p: PartitionId) -> Result<(), EngineError> {
    let start = partition_prefix(p);
    let end = prefix_end(&start);
    let range = (start.as_slice(), end.as_deref());
    for (_, def) in VALUE_TABLES {
        clear_range(txn, def, range)?;
    }
    for (_, def) in KEY_TABLES {
        clear_range(txn, def, range)?;
    }
    clear_range(txn, REPL_LOG, range)?;
    clear_range(txn, PART_LSN, range)?;
    // The partition's usage rows go with its records (their keys start with it too).
    clear_range(txn, USAGE, range)?;
    txn.open_table(UPLOADS_BY_AGE)?.retain(|k, _| {
        !k.get(AGE_PREFIX..)
            .is_some_and(|rest| rest.starts_with(&start))
    })?;
    Ok(())
}

fn apply(
    txn: &redb::WriteTransaction,
    records: Vec<Rec>,
    usage: &mut UsageDeltas,
) -> Result<(), EngineError> {
    // Validate all first: a write closure may fail only before its first change.
    for (table, _, value) in &records {
        let ok = match value {
            Some(v) if *table == LSN_TABLE => v.len() == 8,
            Some(_) => (*table as usize) < VALUE_TABLES.len() || *table == LOG_TABLE,
            None => (4..=AGE_TABLE).contains(table),
        };
        if !ok {
            return Err(invalid(format!(
                "snapshot record for unknown table {table}"
            )));
        }
    }
    for (table, key, value) in records {
        match (table, value) {
            (LOG_TABLE, Some(v)) => {
                txn.open_table(REPL_LOG)?
                    .insert(key.as_slice(), v.as_slice())?;
            }
            (LSN_TABLE, Some(v)) => {
                let mut b = [0; 8];
                b.copy_from_slice(&v);
                txn.open_table(PART_LSN)?
                    .insert(key.as_slice(), u64::from_le_bytes(b))?;
            }
            (n, Some(v)) if (n as usize) < VALUE_TABLES.len() => {
                let mut t = txn.open_table(VALUE_TABLES[n as usize].1)?;
                let old = t.insert(key.as_slice(), v.as_slice())?;
                usage.observe(n, &key, old.as_ref().map(|o| o.value()), Some(&v));
            }
            (AGE_TABLE, None) => {
                txn.open_table(UPLOADS_BY_AGE)?.insert(key.as_slice(), ())?;
            }
            (n, None) if (4..AGE_TABLE).contains(&n) => {
                txn.open_table(KEY_TABLES[n as usize - 4].1)?
                    .insert(key.as_slice(), ())?;
            }
            _ => unreachable!("validated above"),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn pieces_are_framed_exactly_as_postcard_frames_them() {
        for n in [0, 1, 127, 128, 16_383, 16_384, 1 << 20] {
            let data: Vec<u8> = (0..n).map(|i| (i % 251) as u8).collect();
            let framed = frame_bytes(&Frame::ChunkPiece(data.clone())).unwrap();
            let (head, tail) = piece_frame(&data);
            assert_eq!([&head[..], &data, &tail[..]].concat(), framed, "{n} bytes");
            let (body, at) = read_piece(&mut framed.as_slice()).await.unwrap();
            assert_eq!(&body[at..], &data[..]);
        }
        // Any other frame where a piece must come is refused.
        let start = frame_bytes(&Frame::ChunkStart {
            id: ChunkId::random(),
            size: 1,
        })
        .unwrap();
        assert!(read_piece(&mut start.as_slice()).await.is_err());
    }
}
