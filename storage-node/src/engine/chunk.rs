//! Checksummed chunk files: the on-disk home of object data.
//!
//! Layout of one file: a 16-byte header (`GRC1`, data length u64 LE, header CRC32C) and
//! then the data in blocks of [`BLOCK`] bytes, each followed by its CRC32C (u32 LE). Every
//! read verifies the CRC of each block it touches, so a flipped bit yields
//! [`ChunkError::Corrupt`], never wrong bytes. The header is written last, just before
//! the fsync: a file torn by a crash has no valid header and is never referenced, because
//! metadata only points at a chunk after its fsync returned.
//!
//! Names are made durable too: a chunk directory is used only once its own entry (and
//! its parent's) has been fsynced by this process, whoever created it; the commit that
//! makes a chunk reachable fsyncs the chunk's directory; removals fsync the directories
//! they changed, and the orphan sweep at start-up collects any file a power cut brought
//! back.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::fs::{self, File};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};

use serde::{Deserialize, Serialize};

use super::direct::DirectFile;
use crate::types::{ChunkId, PartitionId};

/// Bytes of data per checksummed block.
pub const BLOCK: usize = 64 * 1024;
/// Maximum data bytes in one chunk file; larger objects span several chunks.
pub const CHUNK_MAX: u64 = 8 * 1024 * 1024;
const HEADER: u64 = 16;
const MAGIC: &[u8; 4] = b"GRC1";
const BLOCK_ON_DISK: u64 = BLOCK as u64 + 4;
/// How the name of a chunk file being received from another node ends until it is
/// whole and verified (then it takes the chunk's name).
pub const TEMPORARY_SUFFIX: &str = ".import";

#[derive(Debug, thiserror::Error)]
pub enum ChunkError {
    #[error("chunk {id} is corrupt: {what}")]
    Corrupt { id: ChunkId, what: String },
    #[error("chunk {id} is missing")]
    Missing { id: ChunkId },
    #[error("chunk i/o: {0}")]
    Io(#[from] io::Error),
}

/// Where a piece of object data lives.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChunkRef {
    pub id: ChunkId,
    pub partition: PartitionId,
    pub len: u64,
}

/// The header of a chunk file holding `len` bytes of data.
fn header_for(len: u64) -> [u8; HEADER as usize] {
    let mut header = [0u8; HEADER as usize];
    header[..4].copy_from_slice(MAGIC);
    header[4..12].copy_from_slice(&len.to_le_bytes());
    let crc = crc32c::crc32c(&header[..12]);
    header[12..].copy_from_slice(&crc.to_le_bytes());
    header
}

/// Reads and checks the header of an open chunk file; returns its data length.
fn header_len(file: &File, id: ChunkId) -> Result<u64, ChunkError> {
    let mut header = [0u8; HEADER as usize];
    file.read_exact_at(&mut header, 0)?;
    parse_header(&header, id)
}

/// Checks a chunk file's header; returns its data length.
fn parse_header(header: &[u8; HEADER as usize], id: ChunkId) -> Result<u64, ChunkError> {
    let crc = u32::from_le_bytes([header[12], header[13], header[14], header[15]]);
    if &header[..4] != MAGIC || crc32c::crc32c(&header[..12]) != crc {
        return Err(ChunkError::Corrupt {
            id,
            what: "bad header".into(),
        });
    }
    let mut len = [0u8; 8];
    len.copy_from_slice(&header[4..12]);
    Ok(u64::from_le_bytes(len))
}

#[derive(Clone, Debug)]
pub struct ChunkStore {
    root: PathBuf,
    pins: Arc<Mutex<Pins>>,
    /// Chunk directories whose entries (and their parents') this process has fsynced.
    /// A directory enters only after its syncs succeeded, so a writer that finds its
    /// directory missing here syncs it itself, even when another writer created it and
    /// is still syncing, and a failed sync is tried again by the next writer.
    durable_dirs: Arc<Mutex<HashSet<PathBuf>>>,
    sync: fn(&Path) -> io::Result<()>,
}

/// Chunk files that reads are using, and those to remove once the last such read ends.
#[derive(Debug, Default)]
struct Pins {
    readers: HashMap<ChunkId, usize>,
    /// Removal waits for readers; since when.
    doomed: HashMap<ChunkId, (ChunkRef, std::time::Instant)>,
}

/// Keeps the chunk files of one read on disk until it is dropped (the body is sent or
/// the client went away), however long the read takes.
#[derive(Debug)]
pub struct ChunkPin {
    store: ChunkStore,
    ids: Vec<ChunkId>,
}

impl Drop for ChunkPin {
    fn drop(&mut self) {
        let mut free = Vec::new();
        {
            let mut pins = self
                .store
                .pins
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            for id in &self.ids {
                if let Some(n) = pins.readers.get_mut(id) {
                    *n -= 1;
                    if *n == 0 {
                        pins.readers.remove(id);
                        free.extend(pins.doomed.remove(id).map(|(c, _)| c));
                    }
                }
            }
        }
        self.store.remove_all(free);
    }
}

impl ChunkStore {
    /// Opens (or durably creates) the chunk root `root`.
    pub fn open(root: PathBuf) -> io::Result<Self> {
        super::dirs::create_dir_all_durable(&root)?;
        Ok(Self {
            root,
            pins: Arc::default(),
            durable_dirs: Arc::default(),
            sync: sync_dir,
        })
    }

    /// Creates `dir` (a chunk directory, `root/partition/xx`) if missing and makes its
    /// name and its parent's durable, once per process.
    pub(super) fn ensure_dir(&self, dir: &Path) -> io::Result<()> {
        let known = |d: &Path| {
            self.durable_dirs
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .contains(d)
        };
        let remember = |d: &Path| {
            self.durable_dirs
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .insert(d.to_path_buf())
        };
        if known(dir) {
            return Ok(());
        }
        fs::create_dir_all(dir)?;
        // `xx` is named in the partition directory, which is named in the root (whose
        // own name is synced when the engine opens); the root once per partition.
        if let Some(partition) = dir.parent() {
            (self.sync)(partition)?;
            if !known(partition) {
                (self.sync)(&self.root)?;
                remember(partition);
            }
        }
        remember(dir);
        Ok(())
    }

    /// Marks `chunks` as in use by a read until the returned pin is dropped.
    pub fn pin(&self, chunks: &[ChunkRef]) -> ChunkPin {
        let mut pins = self.pins.lock().unwrap_or_else(PoisonError::into_inner);
        for c in chunks {
            *pins.readers.entry(c.id).or_default() += 1;
        }
        ChunkPin {
            store: self.clone(),
            ids: chunks.iter().map(|c| c.id).collect(),
        }
    }

    /// Removes chunk files no longer referenced by metadata: at once when no read uses
    /// them, else when the last read using them ends. (Pending removals lost to a crash
    /// are done by the orphan sweep at the next start.)
    pub fn remove_when_unused(&self, chunks: Vec<ChunkRef>) {
        let mut now = Vec::new();
        {
            let mut pins = self.pins.lock().unwrap_or_else(PoisonError::into_inner);
            for c in chunks {
                if pins.readers.contains_key(&c.id) {
                    pins.doomed.insert(c.id, (c, std::time::Instant::now()));
                } else {
                    now.push(c);
                }
            }
        }
        self.remove_all(now);
    }

    /// Unlinks files off the async worker threads when called from one.
    fn remove_all(&self, chunks: Vec<ChunkRef>) {
        if chunks.is_empty() {
            return;
        }
        let store = self.clone();
        let work = move || {
            store.remove_files(&chunks);
        };
        match tokio::runtime::Handle::try_current() {
            Ok(rt) => drop(rt.spawn_blocking(work)),
            Err(_) => work(),
        }
    }

    /// Removes files that have waited more than `max_age` for their readers: a client
    /// that stops reading must not hold deleted data on disk for ever. Those readers'
    /// bodies then end with an error. Returns how many files went.
    pub fn remove_long_pinned(&self, max_age: std::time::Duration) -> usize {
        let stale: Vec<ChunkRef> = self
            .pins
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .doomed
            .extract_if(|_, (_, since)| since.elapsed() >= max_age)
            .map(|(_, (c, _))| c)
            .collect();
        let n = stale.len();
        self.remove_all(stale);
        n
    }

    /// How many chunk files wait for reads to end before removal.
    pub fn pending_removals(&self) -> usize {
        self.pins
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .doomed
            .len()
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    pub fn path(&self, partition: PartitionId, id: ChunkId) -> PathBuf {
        let hex = id.0.simple().to_string();
        self.root
            .join(partition.to_string())
            .join(&hex[..2])
            .join(hex)
    }

    /// Creates a new chunk file. The caller must pass its directory to the commit that
    /// makes the chunk reachable, so the directory entry is durable too.
    pub fn create(&self, partition: PartitionId) -> io::Result<ChunkWriter> {
        let id = ChunkId::random();
        let path = self.path(partition, id);
        let dir = path.parent().map(Path::to_path_buf).unwrap_or_default();
        self.ensure_dir(&dir)?;
        let mut file = DirectFile::create_new(&path)?;
        // The header's place; it is written last, by `finish`.
        file.append(&[0u8; HEADER as usize])?;
        Ok(ChunkWriter {
            file,
            path,
            dir,
            r#ref: ChunkRef {
                id,
                partition,
                len: 0,
            },
            block_fill: 0,
            block_crc: 0,
        })
    }

    /// Reads `[start, end)` of a chunk's data, verifying every block it touches.
    pub fn read_range(
        &self,
        chunk: &ChunkRef,
        start: u64,
        end: u64,
    ) -> Result<Vec<u8>, ChunkError> {
        read_range_at(&self.path(chunk.partition, chunk.id), chunk, start, end)
    }

    /// Verifies a whole chunk; used by the scrubber and tests.
    pub fn verify(&self, chunk: &ChunkRef) -> Result<(), ChunkError> {
        let mut pos = 0;
        while pos < chunk.len {
            let end = (pos + 4 * BLOCK as u64).min(chunk.len);
            self.read_range(chunk, pos, end)?;
            pos = end;
        }
        Ok(())
    }

    /// Unlinks chunk files, then fsyncs the directories that held them so the removals
    /// survive a power cut. Blocking. Returns how many files went. A failure is logged
    /// and left to the orphan sweep at the next start.
    pub fn remove_files(&self, chunks: &[ChunkRef]) -> usize {
        let mut dirs = BTreeSet::new();
        let mut removed = 0;
        for c in chunks {
            let path = self.path(c.partition, c.id);
            match fs::remove_file(&path) {
                Ok(()) => {
                    removed += 1;
                    dirs.extend(path.parent().map(Path::to_path_buf));
                }
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => {
                    tracing::warn!(chunk = %c.id, error = %e, "could not remove chunk file");
                }
            }
        }
        for d in dirs {
            if let Err(e) = (self.sync)(&d) {
                tracing::warn!(dir = %d.display(), error = %e, "could not sync a chunk directory after removals");
            }
        }
        removed
    }

    /// Every chunk file on disk, for the orphan sweep at start-up.
    pub fn list_all(&self) -> io::Result<Vec<ChunkRef>> {
        let mut out = Vec::new();
        for pdir in fs::read_dir(&self.root)? {
            let pdir = pdir?;
            if let Some(partition) = pdir
                .file_name()
                .to_str()
                .and_then(|s| u16::from_str_radix(s, 16).ok())
            {
                out.extend(self.list_partition(PartitionId(partition))?);
            }
        }
        Ok(out)
    }

    /// Removes the files of chunk transfers that never finished (their temporary names
    /// end in [`TEMPORARY_SUFFIX`]; nothing references them), in `partition` or, with
    /// `None`, in every partition. Returns how many went. The caller makes sure no
    /// transfer is in flight there. Not made durable: a removal a power cut brings back
    /// goes at the next start.
    pub fn remove_temporaries(&self, partition: Option<PartitionId>) -> io::Result<usize> {
        let pdirs = match partition {
            Some(p) => vec![self.root.join(p.to_string())],
            None => fs::read_dir(&self.root)?
                .map(|d| d.map(|d| d.path()))
                .collect::<io::Result<_>>()?,
        };
        let mut removed = 0;
        for pdir in pdirs {
            let subs = match fs::read_dir(&pdir) {
                Ok(s) => s,
                Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                Err(e) => return Err(e),
            };
            for sub in subs {
                let sub = sub?.path();
                if !sub.is_dir() {
                    continue;
                }
                for f in fs::read_dir(sub)? {
                    let f = f?;
                    if f.file_name().to_string_lossy().ends_with(TEMPORARY_SUFFIX) {
                        match fs::remove_file(f.path()) {
                            Ok(()) => removed += 1,
                            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                            Err(e) => return Err(e),
                        }
                    }
                }
            }
        }
        Ok(removed)
    }

    /// The chunk files of one partition (any state: a reader verifies them).
    pub fn list_partition(&self, partition: PartitionId) -> io::Result<Vec<ChunkRef>> {
        let mut out = Vec::new();
        let subs = match fs::read_dir(self.root.join(partition.to_string())) {
            Ok(s) => s,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(out),
            Err(e) => return Err(e),
        };
        for sub in subs {
            for f in fs::read_dir(sub?.path())? {
                if let Some(id) = f?.file_name().to_str().and_then(|s| s.parse().ok()) {
                    out.push(ChunkRef {
                        id: ChunkId(id),
                        partition,
                        len: 0,
                    });
                }
            }
        }
        Ok(out)
    }
}

/// Appends data to a new chunk file. Blocking; run it off the async runtime.
pub struct ChunkWriter {
    file: DirectFile,
    path: PathBuf,
    dir: PathBuf,
    r#ref: ChunkRef,
    block_fill: usize,
    block_crc: u32,
}

impl ChunkWriter {
    pub fn len(&self) -> u64 {
        self.r#ref.len
    }

    pub fn is_empty(&self) -> bool {
        self.r#ref.len == 0
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Appends up to `CHUNK_MAX - len()` bytes of `data`; returns how many were taken.
    pub fn append(&mut self, data: &[u8]) -> io::Result<usize> {
        let room = (CHUNK_MAX - self.r#ref.len) as usize;
        let data = &data[..data.len().min(room)];
        let mut rest = data;
        while !rest.is_empty() {
            let take = rest.len().min(BLOCK - self.block_fill);
            let (piece, tail) = rest.split_at(take);
            self.file.append(piece)?;
            self.block_crc = crc32c::crc32c_append(self.block_crc, piece);
            self.block_fill += take;
            if self.block_fill == BLOCK {
                self.file.append(&self.block_crc.to_le_bytes())?;
                self.block_fill = 0;
                self.block_crc = 0;
            }
            rest = tail;
        }
        self.r#ref.len += data.len() as u64;
        Ok(data.len())
    }

    /// Seals the file (last block CRC, header) and makes its contents durable.
    pub fn finish(mut self) -> io::Result<ChunkRef> {
        if self.block_fill > 0 {
            self.file.append(&self.block_crc.to_le_bytes())?;
        }
        self.file.patch_start(&header_for(self.r#ref.len))?;
        self.file.finish()?;
        Ok(self.r#ref.clone())
    }

    /// Drops an unfinished chunk.
    pub fn abandon(self) {
        let _ = fs::remove_file(&self.path);
    }
}

/// Reads `[start, end)` of the chunk file at `path` (holding `chunk`), verifying every
/// block it touches.
fn read_range_at(
    path: &Path,
    chunk: &ChunkRef,
    start: u64,
    end: u64,
) -> Result<Vec<u8>, ChunkError> {
    let file = match File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            return Err(ChunkError::Missing { id: chunk.id });
        }
        Err(e) => return Err(e.into()),
    };
    let corrupt = |what: &str| ChunkError::Corrupt {
        id: chunk.id,
        what: what.to_string(),
    };
    let len = header_len(&file, chunk.id)?;
    if len != chunk.len {
        return Err(corrupt("length differs from the manifest"));
    }
    let end = end.min(len);
    if start >= end {
        return Ok(Vec::new());
    }
    let first_block = start / BLOCK as u64;
    let last_block = (end - 1) / BLOCK as u64;
    let mut out = Vec::with_capacity((end - start) as usize);
    let mut buf = vec![0u8; BLOCK + 4];
    for b in first_block..=last_block {
        let block_start = b * BLOCK as u64;
        let data_len = (len - block_start).min(BLOCK as u64) as usize;
        let raw = &mut buf[..data_len + 4];
        file.read_exact_at(raw, HEADER + b * BLOCK_ON_DISK)
            .map_err(|e| {
                if e.kind() == io::ErrorKind::UnexpectedEof {
                    corrupt("truncated")
                } else {
                    e.into()
                }
            })?;
        let (data, crc) = raw.split_at(data_len);
        if crc32c::crc32c(data) != u32::from_le_bytes([crc[0], crc[1], crc[2], crc[3]]) {
            return Err(corrupt(&format!("checksum mismatch in block {b}")));
        }
        let from = start.saturating_sub(block_start) as usize;
        let to = ((end - block_start) as usize).min(data_len);
        out.extend_from_slice(&data[from..to]);
    }
    Ok(out)
}

/// Checks the bytes of a chunk file as they arrive from another node, front to back,
/// so the received file never has to be read back: its header, every block's checksum,
/// and that it ends exactly where its header says.
pub struct ImageCheck {
    id: ChunkId,
    header: [u8; HEADER as usize],
    header_fill: usize,
    /// Data length, once the header is in.
    len: u64,
    /// Data bytes seen (whole blocks and the current one).
    data: u64,
    block_fill: usize,
    block_crc: u32,
    trailer: [u8; 4],
    trailer_fill: usize,
}

impl ImageCheck {
    pub fn new(id: ChunkId) -> Self {
        Self {
            id,
            header: [0; HEADER as usize],
            header_fill: 0,
            len: 0,
            data: 0,
            block_fill: 0,
            block_crc: 0,
            trailer: [0; 4],
            trailer_fill: 0,
        }
    }

    /// The next bytes of the file.
    pub fn feed(&mut self, mut bytes: &[u8]) -> Result<(), ChunkError> {
        while !bytes.is_empty() {
            if self.header_fill < HEADER as usize {
                let take = bytes.len().min(HEADER as usize - self.header_fill);
                self.header[self.header_fill..self.header_fill + take]
                    .copy_from_slice(&bytes[..take]);
                self.header_fill += take;
                bytes = &bytes[take..];
                if self.header_fill == HEADER as usize {
                    self.len = parse_header(&self.header, self.id)?;
                }
                continue;
            }
            let block_start = self.data - self.block_fill as u64;
            let block_len = (self.len - block_start).min(BLOCK as u64) as usize;
            if block_len == 0 {
                return Err(self.corrupt("longer than its header says"));
            }
            if self.block_fill < block_len {
                let take = bytes.len().min(block_len - self.block_fill);
                self.block_crc = crc32c::crc32c_append(self.block_crc, &bytes[..take]);
                self.block_fill += take;
                self.data += take as u64;
                bytes = &bytes[take..];
                continue;
            }
            let take = bytes.len().min(4 - self.trailer_fill);
            self.trailer[self.trailer_fill..self.trailer_fill + take]
                .copy_from_slice(&bytes[..take]);
            self.trailer_fill += take;
            bytes = &bytes[take..];
            if self.trailer_fill == 4 {
                if u32::from_le_bytes(self.trailer) != self.block_crc {
                    let b = block_start / BLOCK as u64;
                    return Err(self.corrupt(&format!("checksum mismatch in block {b}")));
                }
                self.block_fill = 0;
                self.block_crc = 0;
                self.trailer_fill = 0;
            }
        }
        Ok(())
    }

    /// Checks that the file ended where its header says; returns its data length.
    pub fn finish(&self) -> Result<u64, ChunkError> {
        if self.header_fill < HEADER as usize
            || self.data < self.len
            || self.block_fill > 0
            || self.trailer_fill > 0
        {
            return Err(self.corrupt("truncated"));
        }
        Ok(self.len)
    }

    fn corrupt(&self, what: &str) -> ChunkError {
        ChunkError::Corrupt {
            id: self.id,
            what: what.to_string(),
        }
    }
}

pub use super::dirs::sync_dir;

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(n: usize) -> Vec<u8> {
        (0..n).map(|i| (i * 31 % 251) as u8).collect()
    }

    #[test]
    fn ranges_round_trip_across_blocks() {
        let dir = tempfile::tempdir().unwrap();
        let store = ChunkStore::open(dir.path().to_path_buf()).unwrap();
        let data = sample(3 * BLOCK + 123);
        let mut w = store.create(PartitionId(7)).unwrap();
        // Uneven appends exercise the block boundary bookkeeping.
        for piece in data.chunks(10_000) {
            assert_eq!(w.append(piece).unwrap(), piece.len());
        }
        let r = w.finish().unwrap();
        assert_eq!(r.len, data.len() as u64);
        for (s, e) in [
            (0, data.len()),
            (5, 6),
            (BLOCK - 1, BLOCK + 1),
            (2 * BLOCK, data.len()),
            (100, 3 * BLOCK),
        ] {
            assert_eq!(
                store.read_range(&r, s as u64, e as u64).unwrap(),
                &data[s..e],
                "range {s}..{e}"
            );
        }
        store.verify(&r).unwrap();
    }

    #[test]
    fn received_files_are_checked_as_they_arrive() {
        let dir = tempfile::tempdir().unwrap();
        let store = ChunkStore::open(dir.path().to_path_buf()).unwrap();
        for size in [1, BLOCK - 1, BLOCK, BLOCK + 1, 3 * BLOCK + 123] {
            let mut w = store.create(PartitionId(3)).unwrap();
            w.append(&sample(size)).unwrap();
            let r = w.finish().unwrap();
            let image = fs::read(store.path(r.partition, r.id)).unwrap();
            let check = |bytes: &[u8], piece: usize| {
                let mut c = ImageCheck::new(r.id);
                for p in bytes.chunks(piece) {
                    c.feed(p)?;
                }
                c.finish()
            };
            for piece in [1, 3, 4096, 70_000, image.len()] {
                assert_eq!(check(&image, piece).unwrap(), size as u64, "{size}/{piece}");
            }
            let refused = |bytes: &[u8], why: &str| {
                let e = check(bytes, 5000).expect_err(why);
                assert!(matches!(e, ChunkError::Corrupt { .. }), "{why}: {e}");
            };
            refused(&image[..image.len() - 1], "cut short in the last checksum");
            refused(&image[..image.len() - 5], "cut short in the data");
            refused(&image[..10], "cut short in the header");
            refused(&[image.clone(), vec![0]].concat(), "one byte too many");
            for at in [0, 5, 13, 16, 17, image.len() / 2, image.len() - 1] {
                let mut bad = image.clone();
                bad[at] ^= 0x40;
                refused(&bad, &format!("byte {at} flipped"));
            }
        }
    }

    #[test]
    fn flipped_byte_is_detected_never_returned() {
        let dir = tempfile::tempdir().unwrap();
        let store = ChunkStore::open(dir.path().to_path_buf()).unwrap();
        let data = sample(2 * BLOCK);
        let mut w = store.create(PartitionId(1)).unwrap();
        w.append(&data).unwrap();
        let r = w.finish().unwrap();
        let path = store.path(r.partition, r.id);
        let mut raw = fs::read(&path).unwrap();
        let at = HEADER as usize + BLOCK + 4 + 10; // inside the second block
        raw[at] ^= 0x40;
        fs::write(&path, raw).unwrap();
        // The first block is intact and still readable; the second is refused.
        assert_eq!(store.read_range(&r, 0, 100).unwrap(), &data[..100]);
        assert!(matches!(
            store.read_range(&r, 0, 2 * BLOCK as u64),
            Err(ChunkError::Corrupt { .. })
        ));
        assert!(store.verify(&r).is_err());
    }

    /// Counts directory syncs, and fails the first `FAIL` of them.
    static SYNCS: std::sync::Mutex<Vec<PathBuf>> = std::sync::Mutex::new(Vec::new());
    static FAIL: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    fn counting_sync(dir: &Path) -> io::Result<()> {
        use std::sync::atomic::Ordering;
        if FAIL
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
            .is_ok()
        {
            return Err(io::Error::other("injected fsync failure"));
        }
        SYNCS.lock().unwrap().push(dir.to_path_buf());
        sync_dir(dir)
    }

    #[test]
    fn every_writer_syncs_a_chunk_directory_it_has_not_seen_synced_and_failures_are_retried() {
        let dir = tempfile::tempdir().unwrap();
        let mut store = ChunkStore::open(dir.path().to_path_buf()).unwrap();
        store.sync = counting_sync;
        let synced = |p: PartitionId| {
            let part = store.root.join(p.to_string());
            let s = SYNCS.lock().unwrap();
            s.contains(&part) && s.contains(&store.root)
        };
        // The directories exist already (another writer made them and may still be
        // syncing, or an earlier run did), but this store has not synced them: the
        // first chunk there syncs them before it can be committed.
        for b in 0..=255u8 {
            fs::create_dir_all(
                store
                    .root
                    .join(PartitionId(9).to_string())
                    .join(hex::encode([b])),
            )
            .unwrap();
        }
        let w = store.create(PartitionId(9)).unwrap();
        assert!(synced(PartitionId(9)));
        let known = w.dir().to_path_buf();
        w.abandon();
        SYNCS.lock().unwrap().clear();
        // Known directories are not synced again.
        store.ensure_dir(&known).unwrap();
        assert!(SYNCS.lock().unwrap().is_empty());
        // A failed sync fails the write and is retried by the next one.
        FAIL.store(1, std::sync::atomic::Ordering::SeqCst);
        assert!(store.create(PartitionId(3)).is_err());
        assert!(!synced(PartitionId(3)));
        let w = store.create(PartitionId(3)).unwrap();
        assert!(synced(PartitionId(3)), "the failed sync was retried");
        // Removal syncs the directory it changed.
        let r = w.finish().unwrap();
        SYNCS.lock().unwrap().clear();
        assert_eq!(store.remove_files(std::slice::from_ref(&r)), 1);
        let chunk_dir = store
            .path(r.partition, r.id)
            .parent()
            .unwrap()
            .to_path_buf();
        assert_eq!(*SYNCS.lock().unwrap(), vec![chunk_dir]);
    }

    #[test]
    fn chunk_stops_at_its_maximum() {
        let dir = tempfile::tempdir().unwrap();
        let store = ChunkStore::open(dir.path().to_path_buf()).unwrap();
        let mut w = store.create(PartitionId(0)).unwrap();
        let big = vec![7u8; CHUNK_MAX as usize + 10];
        assert_eq!(w.append(&big).unwrap(), CHUNK_MAX as usize);
        assert_eq!(w.append(&big).unwrap(), 0);
    }

    #[test]
    fn pinned_chunks_outlive_their_removal_until_the_last_reader_lets_go() {
        let dir = tempfile::tempdir().unwrap();
        let store = ChunkStore::open(dir.path().to_path_buf()).unwrap();
        let mk = |b: u8| {
            let mut w = store.create(PartitionId(3)).unwrap();
            w.append(&[b; 1000]).unwrap();
            w.finish().unwrap()
        };
        let (a, b) = (mk(1), mk(2));
        let exists = |c: &ChunkRef| store.path(c.partition, c.id).exists();
        let r1 = store.pin(std::slice::from_ref(&a));
        let r2 = store.pin(&[a.clone(), b.clone()]);
        store.remove_when_unused(vec![a.clone(), b.clone()]);
        assert!(exists(&a) && exists(&b), "pinned files stay");
        assert_eq!(store.pending_removals(), 2);
        drop(r2);
        assert!(!exists(&b), "b had one reader, now gone");
        assert!(exists(&a), "a still has a reader");
        assert_eq!(store.read_range(&a, 0, 10).unwrap(), vec![1u8; 10]);
        drop(r1);
        assert!(!exists(&a));
        assert_eq!(store.pending_removals(), 0);
        // Unpinned files go at once.
        let c = mk(3);
        store.remove_when_unused(vec![c.clone()]);
        assert!(!exists(&c));
        // A reader that never finishes holds a file only up to the maximum age.
        let d = mk(4);
        let stuck = store.pin(std::slice::from_ref(&d));
        store.remove_when_unused(vec![d.clone()]);
        assert_eq!(
            store.remove_long_pinned(std::time::Duration::from_secs(3600)),
            0
        );
        assert!(exists(&d));
        assert_eq!(store.remove_long_pinned(std::time::Duration::ZERO), 1);
        assert!(!exists(&d));
        assert!(matches!(
            store.read_range(&d, 0, 10),
            Err(ChunkError::Missing { .. } | ChunkError::Io(_))
        ));
        drop(stuck);
        assert_eq!(store.pending_removals(), 0);
    }
}
