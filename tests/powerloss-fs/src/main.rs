//! `granary-powerloss-fs [--mode strict|journal] [--log FILE] MOUNTPOINT`
//!
//! Mounts the power-loss model (see the crate docs) over MOUNTPOINT and takes commands,
//! one a line, on standard input; each gets one line of answer on standard output:
//! - `cut`: power loss now; answers `ok` and what was discarded (details in the log);
//! - `stats`: answers `ok fsyncs=N dir_fsyncs=N cuts=N`;
//! - `quit` (or end of input): unmounts and exits.
//!
//! Prints `ready` once the file system is mounted.

use std::ffi::OsStr;
use std::io::{BufRead, Write};
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, SystemTime};

use anyhow::{Context, bail};
use fuser::{
    Config, Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags, Generation, INodeNo,
    LockOwner, MountOption, OpenFlags, RenameFlags, ReplyAttr, ReplyCreate, ReplyData,
    ReplyDirectory, ReplyEmpty, ReplyEntry, ReplyOpen, ReplyStatfs, ReplyWrite, Request, TimeOrNow,
    WriteFlags,
};
use granary_powerloss_fs::model::{Fs, Kind, Mode};

/// Nothing is cached by the kernel beyond one request: after a power cut every lookup
/// and every attribute comes from the rebuilt tree.
const TTL: Duration = Duration::ZERO;

struct PowerLossFs(Arc<Mutex<Fs>>);

impl PowerLossFs {
    fn fs(&self) -> MutexGuard<'_, Fs> {
        self.0.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

fn attr(fs: &Fs, ino: u64) -> Result<FileAttr, Errno> {
    let n = fs.node(ino).map_err(Errno::from_i32)?;
    let (kind, nlink) = match n.kind {
        Kind::File => (FileType::RegularFile, 1),
        Kind::Dir => (FileType::Directory, 2),
    };
    // SAFETY: getuid/getgid cannot fail.
    let (uid, gid) = unsafe { (libc::getuid(), libc::getgid()) };
    Ok(FileAttr {
        ino: INodeNo(ino),
        size: n.size(),
        blocks: n.size().div_ceil(512),
        atime: n.mtime,
        mtime: n.mtime,
        ctime: n.mtime,
        crtime: n.mtime,
        kind,
        perm: n.perm,
        nlink,
        uid,
        gid,
        rdev: 0,
        blksize: 4096,
        flags: 0,
    })
}

fn err(e: i32) -> Errno {
    Errno::from_i32(e)
}

impl Filesystem for PowerLossFs {
    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        let fs = self.fs();
        match fs
            .lookup(parent.0, name)
            .map_err(err)
            .and_then(|i| attr(&fs, i))
        {
            Ok(a) => reply.entry(&TTL, &a, Generation(0)),
            Err(e) => reply.error(e),
        }
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        match attr(&self.fs(), ino.0) {
            Ok(a) => reply.attr(&TTL, &a),
            Err(e) => reply.error(e),
        }
    }

    fn setattr(
        &self,
        _req: &Request,
        ino: INodeNo,
        mode: Option<u32>,
        _uid: Option<u32>,
        _gid: Option<u32>,
        size: Option<u64>,
        _atime: Option<TimeOrNow>,
        _mtime: Option<TimeOrNow>,
        _ctime: Option<SystemTime>,
        fh: Option<FileHandle>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<fuser::BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        let mut fs = self.fs();
        let r = (|| {
            if let Some(size) = size {
                fs.set_size(fh.map(|h| h.0), ino.0, size)?;
            }
            if let Some(mode) = mode {
                fs.set_perm(ino.0, (mode & 0o7777) as u16)?;
            }
            Ok(())
        })();
        match r.map_err(err).and_then(|()| attr(&fs, ino.0)) {
            Ok(a) => reply.attr(&TTL, &a),
            Err(e) => reply.error(e),
        }
    }

    fn mknod(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        _rdev: u32,
        reply: ReplyEntry,
    ) {
        if mode & libc::S_IFMT != libc::S_IFREG {
            return reply.error(Errno::EPERM);
        }
        let mut fs = self.fs();
        let perm = (mode & !umask & 0o7777) as u16;
        match fs
            .create(parent.0, name, Kind::File, perm)
            .map_err(err)
            .and_then(|i| attr(&fs, i))
        {
            Ok(a) => reply.entry(&TTL, &a, Generation(0)),
            Err(e) => reply.error(e),
        }
    }

    fn mkdir(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        reply: ReplyEntry,
    ) {
        let mut fs = self.fs();
        let perm = (mode & !umask & 0o7777) as u16;
        match fs
            .create(parent.0, name, Kind::Dir, perm)
            .map_err(err)
            .and_then(|i| attr(&fs, i))
        {
            Ok(a) => reply.entry(&TTL, &a, Generation(0)),
            Err(e) => reply.error(e),
        }
    }

    fn unlink(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        match self.fs().unlink(parent.0, name, false) {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(err(e)),
        }
    }

    fn rmdir(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        match self.fs().unlink(parent.0, name, true) {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(err(e)),
        }
    }

    fn rename(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        newparent: INodeNo,
        newname: &OsStr,
        flags: RenameFlags,
        reply: ReplyEmpty,
    ) {
        if flags.intersects(RenameFlags::RENAME_EXCHANGE | RenameFlags::RENAME_WHITEOUT) {
            return reply.error(Errno::EINVAL);
        }
        let no_replace = flags.contains(RenameFlags::RENAME_NOREPLACE);
        match self
            .fs()
            .rename(parent.0, name, newparent.0, newname, no_replace)
        {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(err(e)),
        }
    }

    fn open(&self, _req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        let mut fs = self.fs();
        let r = (|| {
            if fs.node(ino.0)?.kind == Kind::Dir {
                return Err(libc::EISDIR);
            }
            if flags.0 & libc::O_TRUNC != 0 {
                fs.set_size(None, ino.0, 0)?;
            }
            fs.open(ino.0, flags.0)
        })();
        match r {
            // No FOPEN_KEEP_CACHE: the kernel drops cached pages at every open.
            Ok(fh) => reply.opened(FileHandle(fh), FopenFlags::empty()),
            Err(e) => reply.error(err(e)),
        }
    }

    fn create(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        flags: i32,
        reply: ReplyCreate,
    ) {
        let mut fs = self.fs();
        let perm = (mode & !umask & 0o7777) as u16;
        let r = fs
            .create(parent.0, name, Kind::File, perm)
            .and_then(|i| Ok((i, fs.open(i, flags)?)));
        match r.map_err(err).and_then(|(i, fh)| Ok((attr(&fs, i)?, fh))) {
            Ok((a, fh)) => {
                reply.created(&TTL, &a, Generation(0), FileHandle(fh), FopenFlags::empty())
            }
            Err(e) => reply.error(e),
        }
    }

    fn read(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        match self.fs().read(fh.0, offset, size) {
            Ok(d) => reply.data(&d),
            Err(e) => reply.error(err(e)),
        }
    }

    fn write(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        data: &[u8],
        _write_flags: WriteFlags,
        flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        match self.fs().write(fh.0, offset, data, flags.0) {
            Ok(()) => reply.written(data.len() as u32),
            Err(e) => reply.error(err(e)),
        }
    }

    fn flush(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _lock_owner: LockOwner,
        reply: ReplyEmpty,
    ) {
        // close() makes nothing durable.
        reply.ok();
    }

    fn release(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        _flush: bool,
        reply: ReplyEmpty,
    ) {
        self.fs().release(fh.0);
        reply.ok();
    }

    fn fsync(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        datasync: bool,
        reply: ReplyEmpty,
    ) {
        match self.fs().fsync(Some(fh.0), ino.0, datasync) {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(err(e)),
        }
    }

    fn opendir(&self, _req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        let mut fs = self.fs();
        let r = (|| {
            if fs.node(ino.0)?.kind != Kind::Dir {
                return Err(libc::ENOTDIR);
            }
            fs.open(ino.0, flags.0)
        })();
        match r {
            Ok(fh) => reply.opened(FileHandle(fh), FopenFlags::empty()),
            Err(e) => reply.error(err(e)),
        }
    }

    fn readdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        let fs = self.fs();
        let entries = match fs.entries(ino.0) {
            Ok(e) => e,
            Err(e) => return reply.error(err(e)),
        };
        // The kernel resolves ".." itself; its inode number here is not used.
        let mut all = vec![
            (OsStr::new(".").to_os_string(), ino.0, Kind::Dir),
            (OsStr::new("..").to_os_string(), ino.0, Kind::Dir),
        ];
        all.extend(entries);
        for (i, (name, child, kind)) in all.into_iter().enumerate().skip(offset as usize) {
            let t = match kind {
                Kind::File => FileType::RegularFile,
                Kind::Dir => FileType::Directory,
            };
            if reply.add(INodeNo(child), (i + 1) as u64, t, name) {
                break;
            }
        }
        reply.ok();
    }

    fn releasedir(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        reply: ReplyEmpty,
    ) {
        self.fs().release(fh.0);
        reply.ok();
    }

    fn fsyncdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        match self.fs().fsync_dir(Some(fh.0), ino.0) {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(err(e)),
        }
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        reply.statfs(1 << 24, 1 << 23, 1 << 23, 1 << 20, 1 << 19, 4096, 255, 4096);
    }

    fn access(&self, _req: &Request, ino: INodeNo, _mask: fuser::AccessFlags, reply: ReplyEmpty) {
        match self.fs().node(ino.0) {
            Ok(_) => reply.ok(),
            Err(e) => reply.error(err(e)),
        }
    }

    fn fallocate(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        length: u64,
        mode: i32,
        reply: ReplyEmpty,
    ) {
        if mode != 0 {
            return reply.error(Errno::from_i32(libc::EOPNOTSUPP));
        }
        let mut fs = self.fs();
        let r = fs.node(ino.0).map(|n| n.size()).and_then(|size| {
            if offset + length > size {
                fs.set_size(Some(fh.0), ino.0, offset + length)
            } else {
                Ok(())
            }
        });
        match r {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(err(e)),
        }
    }
}

fn main() -> anyhow::Result<()> {
    let mut mode = Mode::Strict;
    let mut log: Option<PathBuf> = None;
    let mut mountpoint: Option<PathBuf> = None;
    let mut args = std::env::args_os().skip(1);
    while let Some(a) = args.next() {
        match a.to_str() {
            Some("--mode") => {
                mode = match args.next().as_deref().and_then(OsStr::to_str) {
                    Some("strict") => Mode::Strict,
                    Some("journal") => Mode::Journal,
                    other => bail!("--mode takes strict or journal, not {other:?}"),
                }
            }
            Some("--log") => log = Some(args.next().context("--log takes a file")?.into()),
            _ if mountpoint.is_none() => mountpoint = Some(a.into()),
            _ => {
                bail!("usage: granary-powerloss-fs [--mode strict|journal] [--log FILE] MOUNTPOINT")
            }
        }
    }
    let mountpoint = mountpoint.context("no mount point given")?;
    if !std::path::Path::new("/dev/fuse").exists() {
        bail!("/dev/fuse is missing: this machine cannot mount FUSE file systems");
    }
    let log: Option<Box<dyn Write + Send>> = match &log {
        Some(p) => Some(Box::new(
            std::fs::File::create(p).with_context(|| format!("creating {}", p.display()))?,
        )),
        None => None,
    };
    let fs = Arc::new(Mutex::new(Fs::new(mode, log)));
    let mut config = Config::default();
    config.mount_options = vec![
        MountOption::FSName("granary-powerloss".into()),
        MountOption::Subtype("powerloss".into()),
    ];
    let session = fuser::spawn_mount(PowerLossFs(fs.clone()), &mountpoint, &config)
        .with_context(|| format!("mounting FUSE on {}", mountpoint.display()))?;
    let mut out = std::io::stdout().lock();
    writeln!(out, "ready")?;
    out.flush()?;
    for line in std::io::stdin().lock().lines() {
        let line = line?;
        let answer = match line.trim() {
            "cut" => {
                let report = fs
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .power_cut();
                format!("ok {}", report.summary())
            }
            "stats" => {
                let s = fs
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .stats
                    .clone();
                format!(
                    "ok fsyncs={} dir_fsyncs={} cuts={}",
                    s.fsyncs, s.dir_fsyncs, s.cuts
                )
            }
            "quit" => break,
            other => format!("error unknown command {other:?}"),
        };
        writeln!(out, "{answer}")?;
        out.flush()?;
    }
    if let Err(e) = session.umount_and_join() {
        // Busy (a process still has a file open): detach it; the kernel finishes later.
        eprintln!("unmount: {e}; detaching");
        let c = std::ffi::CString::new(mountpoint.as_os_str().as_encoded_bytes())?;
        // SAFETY: a valid NUL-terminated path.
        unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) };
    }
    Ok(())
}
