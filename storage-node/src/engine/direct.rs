//! Files written once, front to back, around the page cache (`O_DIRECT`), and read
//! the same way when they are sent on.
//!
//! Chunk files are written once and read later (often much later), so copying their
//! bytes into the page cache on the way to the disk buys little and costs much: on the
//! machines measured (docs/benchmarks.md, "Chunk files written around the page cache")
//! a buffered write of a GiB took 1.6 to 2.4 s of kernel CPU against 0.2 to 0.5 s for the
//! same bytes written with `O_DIRECT`, and a large PUT on a three-node cluster writes
//! every byte three times.
//!
//! `O_DIRECT` wants every write aligned: its memory, its file offset and its length to
//! [`ALIGN`] bytes. [`DirectFile`] copies what it is given into one aligned buffer and
//! writes whole buffers; the last one is padded with zeros and the file cut back to its
//! true length before the data sync. The file's first [`ALIGN`] bytes (which hold a
//! chunk file's header, written last) stay in memory until [`DirectFile::finish`], so a
//! header can be patched in at the end ([`DirectFile::patch_start`]) and is on disk only
//! after everything else was written, just before the sync.
//!
//! Where the filesystem refuses `O_DIRECT` (tmpfs before Linux 6.6, some network file
//! systems) the same code runs with ordinary buffered writes.
//!
//! It is the node's `direct_io` setting, off by default: on a three-node cluster a tenant
//! flooding large PUTs then puts its writes on the disk at once (no page cache absorbs
//! them), and another tenant's p99 under that flood was several times worse than with
//! buffered writes (docs/benchmarks.md). Off, the same code writes through the page
//! cache.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};

use bytes::Bytes;

/// Alignment of `O_DIRECT` writes: memory, offsets and lengths (the largest logical
/// block size in common use).
pub const ALIGN: usize = 4096;
/// Bytes buffered before a write.
const CAP: usize = 1 << 20;

/// A new file written front to back; see the module documentation.
pub struct DirectFile {
    file: File,
    direct: bool,
    /// `CAP` bytes of buffer then `ALIGN` bytes of head, from `base` (aligned).
    mem: Vec<u8>,
    base: usize,
    /// Bytes in the buffer.
    filled: usize,
    /// File offset of the buffer's first byte (a multiple of `CAP`).
    at: u64,
    /// Bytes appended in all.
    len: u64,
}

impl DirectFile {
    /// Creates `path`, which must not exist; written around the page cache when the
    /// node is configured so ([`set_direct_io`]).
    pub fn create_new(path: &Path) -> io::Result<Self> {
        Self::create(path, DIRECT_IO.load(Ordering::Relaxed))
    }

    /// Creates `path` with `O_DIRECT` if `try_direct` and the filesystem does it.
    fn create(path: &Path, try_direct: bool) -> io::Result<Self> {
        // Created first, then switched: an `open` with `O_DIRECT` on a filesystem
        // without it fails only after creating the file.
        let file = OpenOptions::new().write(true).create_new(true).open(path)?;
        let direct = try_direct && set_direct(&file)?;
        let mem = vec![0u8; CAP + 2 * ALIGN];
        let base = mem.as_ptr().align_offset(ALIGN);
        if base >= ALIGN {
            return Err(io::Error::other("could not align a write buffer"));
        }
        Ok(Self {
            file,
            direct,
            mem,
            base,
            filled: 0,
            at: 0,
            len: 0,
        })
    }

    /// Whether writes bypass the page cache (false where the filesystem refused it).
    #[cfg(test)]
    fn is_direct(&self) -> bool {
        self.direct
    }

    /// Appends `data`, writing every buffer that fills.
    pub fn append(&mut self, mut data: &[u8]) -> io::Result<()> {
        while !data.is_empty() {
            let take = data.len().min(CAP - self.filled);
            let at = self.base + self.filled;
            self.mem[at..at + take].copy_from_slice(&data[..take]);
            self.filled += take;
            self.len += take as u64;
            data = &data[take..];
            if self.filled == CAP {
                self.write_buffer(CAP)?;
                self.at += CAP as u64;
                self.filled = 0;
            }
        }
        Ok(())
    }

    /// Overwrites the file's first `bytes.len()` bytes (at most [`ALIGN`], already
    /// appended).
    pub fn patch_start(&mut self, bytes: &[u8]) -> io::Result<()> {
        if bytes.len() > ALIGN || bytes.len() as u64 > self.len {
            return Err(io::Error::other("patch beyond the first block or the data"));
        }
        // The first block is in the buffer until the first buffer is written, then in
        // the head.
        let start = if self.at == 0 {
            self.base
        } else {
            self.base + CAP
        };
        self.mem[start..start + bytes.len()].copy_from_slice(bytes);
        Ok(())
    }

    /// Writes what is buffered and the head (direct writes padded, and the file cut
    /// back to its length after them) and syncs its data. Returns the length.
    pub fn finish(mut self) -> io::Result<u64> {
        // Direct writes are padded to whole blocks and the file cut back after; buffered
        // ones write exactly the data.
        let pad = self.direct;
        if self.filled > 0 || self.at == 0 {
            let n = if pad {
                let padded = self.filled.div_ceil(ALIGN).max(1) * ALIGN;
                let (from, to) = (self.base + self.filled, self.base + padded);
                self.mem[from..to].fill(0);
                padded
            } else {
                self.filled
            };
            self.write_buffer(n)?;
        }
        let head = self.base + CAP;
        let head_len = if pad {
            ALIGN
        } else {
            (ALIGN as u64).min(self.len) as usize
        };
        self.write_at(head, head_len, 0)?;
        if pad {
            self.file.set_len(self.len)?;
        }
        self.file.sync_data()?;
        Ok(self.len)
    }

    /// Writes the buffer's first `n` bytes (a multiple of `ALIGN` for direct writes)
    /// at its offset; when that offset is 0, the first block goes to the head instead,
    /// to be written last.
    fn write_buffer(&mut self, n: usize) -> io::Result<()> {
        let mut skip = 0;
        if self.at == 0 {
            let (b, h) = (self.base, self.base + CAP);
            self.mem.copy_within(b..b + ALIGN, h);
            skip = ALIGN;
        }
        if n > skip {
            self.write_at(self.base + skip, n - skip, self.at + skip as u64)?;
        }
        Ok(())
    }

    fn write_at(&mut self, from: usize, n: usize, offset: u64) -> io::Result<()> {
        match self.file.write_all_at(&self.mem[from..from + n], offset) {
            // A filesystem that opened with `O_DIRECT` but refuses this write (a larger
            // block size): go on buffered. What was written stays valid.
            Err(e) if self.direct && e.raw_os_error() == Some(libc::EINVAL) => {
                self.stop_direct()?;
                self.file.write_all_at(&self.mem[from..from + n], offset)
            }
            r => r,
        }
    }

    fn stop_direct(&mut self) -> io::Result<()> {
        clear_direct(&self.file)?;
        self.direct = false;
        Ok(())
    }
}

/// Turns `O_DIRECT` on or off on an open file. Ok(false): the filesystem does not do it
/// (the file is unchanged).
fn switch_direct(file: &File, on: bool) -> io::Result<bool> {
    let fd = file.as_raw_fd();
    // SAFETY: `fd` is an open file's descriptor, borrowed for the call; F_GETFL/F_SETFL
    // only change its status flags.
    let flags = unsafe { libc::fcntl(fd, libc::F_GETFL) };
    if flags < 0 {
        return Err(io::Error::last_os_error());
    }
    let flags = if on {
        flags | libc::O_DIRECT
    } else {
        flags & !libc::O_DIRECT
    };
    // SAFETY: as above.
    if unsafe { libc::fcntl(fd, libc::F_SETFL, flags) } < 0 {
        let e = io::Error::last_os_error();
        return match e.raw_os_error() {
            Some(libc::EINVAL) => Ok(false),
            _ => Err(e),
        };
    }
    Ok(true)
}

/// Turns `O_DIRECT` on where the filesystem does it; whether it is on.
fn set_direct(file: &File) -> io::Result<bool> {
    switch_direct(file, true)
}

fn clear_direct(file: &File) -> io::Result<()> {
    switch_direct(file, false).map(|_| ())
}

/// Opens `path` for reading, around the page cache when the node is configured so and
/// the filesystem allows (for a file read once, front to back: a chunk file sent to a
/// replica).
pub fn open_read(path: &Path) -> io::Result<File> {
    let file = File::open(path)?;
    if DIRECT_IO.load(Ordering::Relaxed) {
        set_direct(&file)?;
    }
    Ok(file)
}

/// Whether chunk files are written (and read for replicas) with `O_DIRECT`: the node's
/// `direct_io` setting, off by default (docs/operations.md).
static DIRECT_IO: AtomicBool = AtomicBool::new(false);

/// Sets how this process writes chunk files from now on (the node's `direct_io`).
pub fn set_direct_io(on: bool) {
    DIRECT_IO.store(on, Ordering::Relaxed);
}

/// Reads `n` bytes (a multiple of [`ALIGN`]) of `file` at `offset` (a multiple of
/// [`ALIGN`]) into memory aligned for `O_DIRECT`, fewer only where the file ends. The
/// bytes are handed over without a copy.
pub fn read_aligned(file: &File, offset: u64, n: usize) -> io::Result<Bytes> {
    if !n.is_multiple_of(ALIGN) || !offset.is_multiple_of(ALIGN as u64) {
        return Err(io::Error::other("unaligned read"));
    }
    let mut mem = vec![0u8; n + ALIGN];
    let base = mem.as_ptr().align_offset(ALIGN);
    if base >= ALIGN {
        return Err(io::Error::other("could not align a read buffer"));
    }
    let mut got = 0;
    let mut retried = false;
    while got < n {
        match file.read_at(&mut mem[base + got..base + n], offset + got as u64) {
            Ok(0) => break,
            Ok(k) => got += k,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            // Opened with `O_DIRECT` but refused for this read: go on buffered.
            Err(e) if !retried && e.raw_os_error() == Some(libc::EINVAL) => {
                clear_direct(file)?;
                retried = true;
            }
            Err(e) => return Err(e),
        }
        // A short direct read ends at the file's end; the next read answers 0.
    }
    Ok(Bytes::from(mem).slice(base..base + got))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(n: usize) -> Vec<u8> {
        (0..n)
            .map(|i| (i * 131 % 251) as u8 ^ (i >> 12) as u8)
            .collect()
    }

    #[test]
    fn files_of_every_shape_read_back_exactly() {
        let dir = tempfile::tempdir().unwrap();
        for (i, size) in [
            1,
            17,
            ALIGN - 1,
            ALIGN,
            ALIGN + 1,
            CAP - 1,
            CAP,
            CAP + 1,
            CAP + ALIGN,
            3 * CAP + 12_345,
        ]
        .into_iter()
        .enumerate()
        {
            for direct in [true, false] {
                let path = dir.path().join(format!("f{i}-{direct}"));
                let data = sample(size);
                // Buffered: what runs where the filesystem refuses O_DIRECT.
                let mut f = DirectFile::create(&path, direct).unwrap();
                assert!(direct || !f.is_direct());
                // Uneven appends cross the buffer's and the blocks' boundaries.
                for piece in data.chunks(70_001) {
                    f.append(piece).unwrap();
                }
                let header = [0xa5u8; 16];
                let patch = &header[..16.min(size)];
                f.patch_start(patch).unwrap();
                assert_eq!(f.finish().unwrap(), size as u64);
                let mut want = data.clone();
                want[..patch.len()].copy_from_slice(patch);
                assert_eq!(std::fs::read(&path).unwrap(), want, "size {size}");
            }
        }
    }

    #[test]
    fn aligned_reads_return_the_file_up_to_its_end() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        let data = sample(3 * ALIGN + 100);
        let mut f = DirectFile::create_new(&path).unwrap();
        f.append(&data).unwrap();
        f.finish().unwrap();
        let file = open_read(&path).unwrap();
        let mut back = Vec::new();
        for at in (0..data.len()).step_by(2 * ALIGN) {
            back.extend_from_slice(&read_aligned(&file, at as u64, 2 * ALIGN).unwrap());
        }
        assert_eq!(back, data);
        assert!(
            read_aligned(&file, 4 * ALIGN as u64, ALIGN)
                .unwrap()
                .is_empty()
        );
        assert!(read_aligned(&file, 1, ALIGN).is_err(), "unaligned offset");
        assert!(
            read_aligned(&file, 0, ALIGN + 1).is_err(),
            "unaligned length"
        );
    }

    #[test]
    fn an_existing_file_is_never_replaced() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        std::fs::write(&path, b"kept").unwrap();
        let e = DirectFile::create_new(&path).err().expect("refused");
        assert_eq!(e.kind(), io::ErrorKind::AlreadyExists);
        assert_eq!(std::fs::read(&path).unwrap(), b"kept");
    }

    #[test]
    fn patches_beyond_the_data_or_the_first_block_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let mut f = DirectFile::create_new(&dir.path().join("f")).unwrap();
        f.append(&[1, 2, 3]).unwrap();
        assert!(f.patch_start(&[9; 4]).is_err());
        f.append(&sample(2 * ALIGN)).unwrap();
        assert!(f.patch_start(&vec![9; ALIGN + 1]).is_err());
        f.patch_start(&[9; 4]).unwrap();
    }

    #[test]
    fn writes_bypass_the_page_cache_where_the_filesystem_allows() {
        // The test directory is on the repository's filesystem (ext4 here and in CI),
        // which does O_DIRECT; where it does not, the fallback is what runs.
        let dir = tempfile::tempdir_in(env!("CARGO_MANIFEST_DIR")).unwrap();
        let f = DirectFile::create(&dir.path().join("f"), true).unwrap();
        let fs_does_direct = {
            use std::os::unix::fs::OpenOptionsExt;
            let probe = dir.path().join("probe");
            OpenOptions::new()
                .write(true)
                .create_new(true)
                .custom_flags(libc::O_DIRECT)
                .open(&probe)
                .is_ok()
        };
        assert_eq!(f.is_direct(), fs_does_direct);
    }
}
