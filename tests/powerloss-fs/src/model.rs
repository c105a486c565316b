//! The in-memory model: what every process sees now, and what a power cut would leave.
//!
//! Each file has its current bytes and its durable bytes; each directory its current
//! entries and its durable entries. Changes are visible at once. They become durable as
//! follows ([`Mode::Strict`]):
//! - file data and size: on fsync/fdatasync of that file, or on a write through a
//!   handle opened with `O_SYNC`/`O_DSYNC` (the whole file is then made durable);
//! - a directory's entries (create, mkdir, unlink, rmdir, rename in or out): on fsync of
//!   that directory, which makes all of its current entries durable at once. A new
//!   directory's own entries need an fsync of the new directory as well.
//!
//! [`Mode::Journal`] is the looser model of a journalling file system: any fsync (of a
//! file or a directory) also makes every pending name change in the whole tree durable,
//! as one journal commit would. File data still needs an fsync of the file.
//!
//! [`Fs::power_cut`] rebuilds the visible tree from the durable state: files get their
//! durable bytes back, directories their durable entries, nodes no durable entry reaches
//! disappear, and every open handle fails with EIO from then on.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::ffi::{OsStr, OsString};
use std::fmt::Write as _;
use std::io::Write;
use std::time::SystemTime;

/// The root directory's inode number (as FUSE numbers it).
pub const ROOT: u64 = 1;
const PAGE: u64 = 4096;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// Names durable only on fsync of their directory.
    Strict,
    /// Any fsync makes every pending name durable (a journal commit).
    Journal,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    File,
    Dir,
}

/// An errno, as the FUSE layer replies it.
pub type Errno = i32;

#[derive(Debug)]
pub struct Node {
    pub kind: Kind,
    pub perm: u16,
    pub mtime: SystemTime,
    data: Vec<u8>,
    durable: Vec<u8>,
    /// Pages changed since the last sync (the durable copy lags on exactly these).
    dirty: BTreeSet<u64>,
    entries: BTreeMap<OsString, u64>,
    durable_entries: BTreeMap<OsString, u64>,
    /// Where the node is in the current tree (for logs; no hard links).
    parent: u64,
    name: OsString,
    /// References from current entries, durable entries and open handles: a node with
    /// none can never be seen again and is dropped.
    cur_refs: u32,
    dur_refs: u32,
    open: u32,
}

impl Node {
    fn new(kind: Kind, perm: u16, parent: u64, name: &OsStr) -> Self {
        Self {
            kind,
            perm,
            mtime: SystemTime::now(),
            data: Vec::new(),
            durable: Vec::new(),
            dirty: BTreeSet::new(),
            entries: BTreeMap::new(),
            durable_entries: BTreeMap::new(),
            parent,
            name: name.to_os_string(),
            cur_refs: 0,
            dur_refs: 0,
            open: 0,
        }
    }

    pub fn size(&self) -> u64 {
        self.data.len() as u64
    }

    fn mark(&mut self, from: u64, to: u64) {
        if to > from {
            self.dirty.extend(from / PAGE..=(to - 1) / PAGE);
        }
    }

    /// Makes the current bytes durable; returns how many pages were copied.
    fn sync_data(&mut self) -> usize {
        let n = self.dirty.len();
        let len = self.data.len();
        self.durable.resize(len, 0);
        for p in std::mem::take(&mut self.dirty) {
            let (a, b) = ((p * PAGE) as usize, (((p + 1) * PAGE) as usize).min(len));
            if a < b {
                self.durable[a..b].copy_from_slice(&self.data[a..b]);
            }
        }
        n
    }
}

/// What one handle refers to. Handles do not survive a power cut.
#[derive(Debug, Clone, Copy)]
struct Handle {
    ino: u64,
    sync_writes: bool,
}

#[derive(Debug, Default, Clone)]
pub struct Stats {
    pub fsyncs: u64,
    pub dir_fsyncs: u64,
    pub cuts: u64,
}

/// What one power cut discarded.
#[derive(Debug, Default, Clone)]
pub struct CutReport {
    /// Files whose unsynced data (or size) was rolled back, with the pages lost.
    pub files_rolled_back: Vec<(String, usize)>,
    /// Names that existed but were not durable, so are gone.
    pub names_lost: Vec<String>,
    /// Names removed or renamed away without a directory fsync, so are back.
    pub names_restored: Vec<String>,
    /// Open handles that now fail with EIO.
    pub handles_invalidated: usize,
}

impl CutReport {
    pub fn summary(&self) -> String {
        format!(
            "files_rolled_back={} names_lost={} names_restored={} handles_invalidated={}",
            self.files_rolled_back.len(),
            self.names_lost.len(),
            self.names_restored.len(),
            self.handles_invalidated
        )
    }
}

pub struct Fs {
    mode: Mode,
    nodes: HashMap<u64, Node>,
    next_ino: u64,
    handles: HashMap<u64, Handle>,
    next_fh: u64,
    pub stats: Stats,
    log: Option<Box<dyn Write + Send>>,
}

impl Fs {
    pub fn new(mode: Mode, log: Option<Box<dyn Write + Send>>) -> Self {
        let mut root = Node::new(Kind::Dir, 0o755, ROOT, OsStr::new(""));
        // The root always exists (the mount point is durable by definition).
        root.cur_refs = 1;
        root.dur_refs = 1;
        Self {
            mode,
            nodes: HashMap::from([(ROOT, root)]),
            next_ino: ROOT + 1,
            handles: HashMap::new(),
            next_fh: 1,
            stats: Stats::default(),
            log,
        }
    }

    fn logln(&mut self, line: String) {
        if let Some(l) = self.log.as_mut() {
            let _ = writeln!(l, "{line}");
            let _ = l.flush();
        }
    }

    pub fn node(&self, ino: u64) -> Result<&Node, Errno> {
        self.nodes.get(&ino).ok_or(libc::ENOENT)
    }

    fn node_mut(&mut self, ino: u64) -> Result<&mut Node, Errno> {
        self.nodes.get_mut(&ino).ok_or(libc::ENOENT)
    }

    /// The node's path in the current tree (for logs).
    pub fn path(&self, mut ino: u64) -> String {
        let mut parts = Vec::new();
        while ino != ROOT {
            let Some(n) = self.nodes.get(&ino) else {
                parts.push("?".to_string());
                break;
            };
            parts.push(n.name.to_string_lossy().into_owned());
            ino = n.parent;
        }
        parts.reverse();
        format!("/{}", parts.join("/"))
    }

    fn dir(&self, ino: u64) -> Result<&Node, Errno> {
        let n = self.node(ino)?;
        if n.kind != Kind::Dir {
            return Err(libc::ENOTDIR);
        }
        Ok(n)
    }

    pub fn lookup(&self, parent: u64, name: &OsStr) -> Result<u64, Errno> {
        self.dir(parent)?
            .entries
            .get(name)
            .copied()
            .ok_or(libc::ENOENT)
    }

    /// Current entries of a directory, in name order.
    pub fn entries(&self, ino: u64) -> Result<Vec<(OsString, u64, Kind)>, Errno> {
        Ok(self
            .dir(ino)?
            .entries
            .iter()
            .map(|(n, i)| (n.clone(), *i, self.nodes[i].kind))
            .collect())
    }

    /// Creates a file or directory `name` in `parent`.
    pub fn create(
        &mut self,
        parent: u64,
        name: &OsStr,
        kind: Kind,
        perm: u16,
    ) -> Result<u64, Errno> {
        if self.dir(parent)?.entries.contains_key(name) {
            return Err(libc::EEXIST);
        }
        let ino = self.next_ino;
        self.next_ino += 1;
        let mut n = Node::new(kind, perm, parent, name);
        n.cur_refs = 1;
        self.nodes.insert(ino, n);
        let p = self.node_mut(parent)?;
        p.entries.insert(name.to_os_string(), ino);
        p.mtime = SystemTime::now();
        Ok(ino)
    }

    pub fn unlink(&mut self, parent: u64, name: &OsStr, want_dir: bool) -> Result<(), Errno> {
        let ino = self.lookup(parent, name)?;
        let n = self.node(ino)?;
        match (n.kind, want_dir) {
            (Kind::Dir, false) => return Err(libc::EISDIR),
            (Kind::File, true) => return Err(libc::ENOTDIR),
            (Kind::Dir, true) if !n.entries.is_empty() => return Err(libc::ENOTEMPTY),
            _ => {}
        }
        let p = self.node_mut(parent)?;
        p.entries.remove(name);
        p.mtime = SystemTime::now();
        self.node_mut(ino)?.cur_refs -= 1;
        self.collect(ino);
        Ok(())
    }

    pub fn rename(
        &mut self,
        parent: u64,
        name: &OsStr,
        new_parent: u64,
        new_name: &OsStr,
        no_replace: bool,
    ) -> Result<(), Errno> {
        let ino = self.lookup(parent, name)?;
        self.dir(new_parent)?;
        let kind = self.node(ino)?.kind;
        // A directory cannot move below itself.
        let mut up = new_parent;
        while kind == Kind::Dir && up != ROOT {
            if up == ino {
                return Err(libc::EINVAL);
            }
            up = self.node(up)?.parent;
        }
        if let Ok(old) = self.lookup(new_parent, new_name) {
            if old == ino {
                return Ok(());
            }
            if no_replace {
                return Err(libc::EEXIST);
            }
            let o = self.node(old)?;
            match (kind, o.kind) {
                (Kind::File, Kind::Dir) => return Err(libc::EISDIR),
                (Kind::Dir, Kind::File) => return Err(libc::ENOTDIR),
                (Kind::Dir, Kind::Dir) if !o.entries.is_empty() => return Err(libc::ENOTEMPTY),
                _ => {}
            }
            self.node_mut(old)?.cur_refs -= 1;
            self.collect(old);
        }
        let now = SystemTime::now();
        let p = self.node_mut(parent)?;
        p.entries.remove(name);
        p.mtime = now;
        let np = self.node_mut(new_parent)?;
        np.entries.insert(new_name.to_os_string(), ino);
        np.mtime = now;
        let n = self.node_mut(ino)?;
        n.parent = new_parent;
        n.name = new_name.to_os_string();
        Ok(())
    }

    pub fn open(&mut self, ino: u64, flags: i32) -> Result<u64, Errno> {
        let n = self.node_mut(ino)?;
        n.open += 1;
        let fh = self.next_fh;
        self.next_fh += 1;
        let sync_writes = flags & (libc::O_SYNC | libc::O_DSYNC) != 0;
        self.handles.insert(fh, Handle { ino, sync_writes });
        Ok(fh)
    }

    /// The inode behind a handle; EIO for handles from before a power cut.
    fn handle(&self, fh: u64) -> Result<Handle, Errno> {
        self.handles.get(&fh).copied().ok_or(libc::EIO)
    }

    pub fn release(&mut self, fh: u64) {
        if let Some(h) = self.handles.remove(&fh)
            && let Some(n) = self.nodes.get_mut(&h.ino)
        {
            n.open -= 1;
            self.collect(h.ino);
        }
    }

    pub fn read(&self, fh: u64, offset: u64, size: u32) -> Result<Vec<u8>, Errno> {
        let h = self.handle(fh)?;
        let n = self.node(h.ino)?;
        let len = n.data.len() as u64;
        let (a, b) = (offset.min(len), (offset + u64::from(size)).min(len));
        Ok(n.data[a as usize..b as usize].to_vec())
    }

    pub fn write(&mut self, fh: u64, offset: u64, data: &[u8], flags: i32) -> Result<(), Errno> {
        let h = self.handle(fh)?;
        let n = self.node_mut(h.ino)?;
        if n.kind != Kind::File {
            return Err(libc::EISDIR);
        }
        let end = offset + data.len() as u64;
        let old = n.data.len() as u64;
        if end > old {
            n.data.resize(end as usize, 0);
            n.mark(old, end);
        }
        n.data[offset as usize..end as usize].copy_from_slice(data);
        n.mark(offset, end);
        n.mtime = SystemTime::now();
        if h.sync_writes || flags & (libc::O_SYNC | libc::O_DSYNC) != 0 {
            self.fsync(Some(fh), h.ino, true)?;
        }
        Ok(())
    }

    /// Truncates or extends a file (through a handle when `fh` is given).
    pub fn set_size(&mut self, fh: Option<u64>, ino: u64, size: u64) -> Result<(), Errno> {
        if let Some(fh) = fh {
            self.handle(fh)?;
        }
        let n = self.node_mut(ino)?;
        if n.kind != Kind::File {
            return Err(libc::EISDIR);
        }
        let old = n.data.len() as u64;
        n.data.resize(size as usize, 0);
        n.mark(old.min(size), old.max(size));
        // The page holding the new end changed too when it shrank.
        n.mark(size.saturating_sub(1), size);
        n.mtime = SystemTime::now();
        Ok(())
    }

    pub fn set_perm(&mut self, ino: u64, perm: u16) -> Result<(), Errno> {
        self.node_mut(ino)?.perm = perm;
        Ok(())
    }

    /// fsync/fdatasync of a file (fsync of a directory goes to [`Fs::fsync_dir`]).
    pub fn fsync(&mut self, fh: Option<u64>, ino: u64, datasync: bool) -> Result<(), Errno> {
        if let Some(fh) = fh {
            self.handle(fh)?;
        }
        let pages = self.node_mut(ino)?.sync_data();
        self.stats.fsyncs += 1;
        let line = format!("fsync {} datasync={datasync} pages={pages}", self.path(ino));
        self.logln(line);
        if self.mode == Mode::Journal {
            self.commit_all_names();
        }
        Ok(())
    }

    pub fn fsync_dir(&mut self, fh: Option<u64>, ino: u64) -> Result<(), Errno> {
        if let Some(fh) = fh {
            self.handle(fh)?;
        }
        self.dir(ino)?;
        self.stats.dir_fsyncs += 1;
        let (added, removed) = self.commit_names(ino);
        let line = format!(
            "fsyncdir {} added={added:?} removed={removed:?}",
            self.path(ino)
        );
        self.logln(line);
        if self.mode == Mode::Journal {
            self.commit_all_names();
        }
        Ok(())
    }

    /// Makes a directory's current entries durable; returns the names added and removed.
    fn commit_names(&mut self, ino: u64) -> (Vec<OsString>, Vec<OsString>) {
        let Some(d) = self.nodes.get_mut(&ino) else {
            return (Vec::new(), Vec::new());
        };
        if d.entries == d.durable_entries {
            return (Vec::new(), Vec::new());
        }
        let old = std::mem::replace(&mut d.durable_entries, d.entries.clone());
        let new = d.durable_entries.clone();
        let mut added = Vec::new();
        let mut removed = Vec::new();
        for (name, i) in &new {
            if old.get(name) != Some(i) {
                added.push(name.clone());
                if let Some(n) = self.nodes.get_mut(i) {
                    n.dur_refs += 1;
                }
            }
        }
        for (name, i) in &old {
            if new.get(name) != Some(i) {
                removed.push(name.clone());
                if let Some(n) = self.nodes.get_mut(i) {
                    n.dur_refs -= 1;
                }
                self.collect(*i);
            }
        }
        (added, removed)
    }

    fn commit_all_names(&mut self) {
        let dirs: Vec<u64> = self
            .nodes
            .iter()
            .filter(|(_, n)| n.kind == Kind::Dir && n.entries != n.durable_entries)
            .map(|(i, _)| *i)
            .collect();
        for d in dirs {
            self.commit_names(d);
        }
    }

    /// Drops a node nothing can reach any more (and what only it reached).
    fn collect(&mut self, ino: u64) {
        let mut stack = vec![ino];
        while let Some(i) = stack.pop() {
            let dead = self
                .nodes
                .get(&i)
                .is_some_and(|n| i != ROOT && n.cur_refs == 0 && n.dur_refs == 0 && n.open == 0);
            if !dead {
                continue;
            }
            let Some(n) = self.nodes.remove(&i) else {
                continue;
            };
            for c in n.entries.values() {
                if let Some(cn) = self.nodes.get_mut(c) {
                    cn.cur_refs -= 1;
                    stack.push(*c);
                }
            }
            for c in n.durable_entries.values() {
                if let Some(cn) = self.nodes.get_mut(c) {
                    cn.dur_refs -= 1;
                    stack.push(*c);
                }
            }
        }
    }

    /// The power cut: everything not durable is gone, every handle fails with EIO.
    pub fn power_cut(&mut self) -> CutReport {
        let mut report = CutReport {
            handles_invalidated: self.handles.len(),
            ..CutReport::default()
        };
        self.handles.clear();
        // What is lost, described in the tree as it was just before.
        let mut inos: Vec<u64> = self.nodes.keys().copied().collect();
        inos.sort_unstable();
        for &i in &inos {
            let n = &self.nodes[&i];
            if n.kind == Kind::File && (!n.dirty.is_empty() || n.data.len() != n.durable.len()) {
                report.files_rolled_back.push((self.path(i), n.dirty.len()));
            }
            if n.kind == Kind::Dir {
                let base = self.path(i);
                for (name, c) in &n.entries {
                    if n.durable_entries.get(name) != Some(c) {
                        report.names_lost.push(join(&base, name));
                    }
                }
                for (name, c) in &n.durable_entries {
                    if n.entries.get(name) != Some(c) {
                        report.names_restored.push(join(&base, name));
                    }
                }
            }
        }
        // Rebuild from the durable state: only what durable entries reach from the root.
        let mut keep = HashMap::new();
        let mut stack = vec![(ROOT, ROOT, OsString::new())];
        while let Some((i, parent, name)) = stack.pop() {
            let Some(mut n) = self.nodes.remove(&i) else {
                continue;
            };
            n.data = n.durable.clone();
            n.dirty.clear();
            n.entries = n.durable_entries.clone();
            n.parent = parent;
            n.name = name;
            n.open = 0;
            n.cur_refs = u32::from(i == ROOT);
            n.dur_refs = n.cur_refs;
            for (cname, c) in &n.entries {
                stack.push((*c, i, cname.clone()));
            }
            keep.insert(i, n);
        }
        let children: Vec<u64> = keep
            .values()
            .flat_map(|n| n.entries.values().copied())
            .collect();
        for c in children {
            if let Some(n) = keep.get_mut(&c) {
                n.cur_refs += 1;
                n.dur_refs += 1;
            }
        }
        self.nodes = keep;
        self.stats.cuts += 1;
        let mut line = format!("POWER CUT {}: {}", self.stats.cuts, report.summary());
        for (p, pages) in &report.files_rolled_back {
            let _ = write!(line, "\n  data rolled back: {p} ({pages} dirty pages)");
        }
        for p in &report.names_lost {
            let _ = write!(line, "\n  name lost: {p}");
        }
        for p in &report.names_restored {
            let _ = write!(line, "\n  name restored: {p}");
        }
        self.logln(line);
        report
    }
}

fn join(dir: &str, name: &OsStr) -> String {
    format!("{}/{}", dir.trim_end_matches('/'), name.to_string_lossy())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn name(s: &str) -> &OsStr {
        OsStr::new(s)
    }

    fn content(fs: &Fs, path: &[&str]) -> Option<Vec<u8>> {
        let mut ino = ROOT;
        for p in path {
            ino = fs.lookup(ino, name(p)).ok()?;
        }
        Some(fs.node(ino).ok()?.data.clone())
    }

    #[test]
    fn unsynced_write_is_lost_and_synced_file_needs_its_directory() {
        let mut fs = Fs::new(Mode::Strict, None);
        let a = fs.create(ROOT, name("a"), Kind::File, 0o644).unwrap();
        let fh = fs.open(a, libc::O_RDWR).unwrap();
        fs.write(fh, 0, b"hello", 0).unwrap();
        fs.fsync(Some(fh), a, false).unwrap();
        let r = fs.power_cut();
        assert_eq!(r.names_lost, ["/a"]);
        assert_eq!(content(&fs, &["a"]), None, "no directory fsync: name gone");
        assert_eq!(fs.read(fh, 0, 5), Err(libc::EIO), "old handle fails");

        let a = fs.create(ROOT, name("a"), Kind::File, 0o644).unwrap();
        let fh = fs.open(a, libc::O_RDWR).unwrap();
        fs.write(fh, 0, b"hello", 0).unwrap();
        fs.fsync(Some(fh), a, false).unwrap();
        fs.fsync_dir(None, ROOT).unwrap();
        fs.write(fh, 3, b"p!!", 0).unwrap();
        assert_eq!(content(&fs, &["a"]).unwrap(), b"help!!");
        fs.power_cut();
        assert_eq!(
            content(&fs, &["a"]).unwrap(),
            b"hello",
            "unsynced write lost"
        );
    }

    #[test]
    fn rename_over_reverts_without_directory_fsync_and_journal_mode_keeps_it() {
        for mode in [Mode::Strict, Mode::Journal] {
            let mut fs = Fs::new(mode, None);
            let mk = |fs: &mut Fs, n: &str, body: &[u8]| {
                let i = fs.create(ROOT, name(n), Kind::File, 0o644).unwrap();
                let fh = fs.open(i, libc::O_RDWR).unwrap();
                fs.write(fh, 0, body, 0).unwrap();
                fs.fsync(Some(fh), i, true).unwrap();
                fs.release(fh);
            };
            mk(&mut fs, "state", b"old");
            fs.fsync_dir(None, ROOT).unwrap();
            mk(&mut fs, "state.tmp", b"new");
            fs.rename(ROOT, name("state.tmp"), ROOT, name("state"), false)
                .unwrap();
            // An fsync of some other file: a journal commit carries the rename along.
            mk(&mut fs, "other", b"x");
            let r = fs.power_cut();
            let want: &[u8] = if mode == Mode::Strict { b"old" } else { b"new" };
            assert_eq!(content(&fs, &["state"]).unwrap(), want, "{mode:?} {r:?}");
        }
    }

    #[test]
    fn a_new_directory_needs_its_parent_synced_and_unlinks_come_back() {
        let mut fs = Fs::new(Mode::Strict, None);
        let d = fs.create(ROOT, name("d"), Kind::Dir, 0o755).unwrap();
        let f = fs.create(d, name("f"), Kind::File, 0o644).unwrap();
        fs.fsync(None, f, false).unwrap();
        fs.fsync_dir(None, d).unwrap();
        fs.power_cut();
        assert!(fs.lookup(ROOT, name("d")).is_err(), "parent never synced");
        let d = fs.create(ROOT, name("d"), Kind::Dir, 0o755).unwrap();
        let f = fs.create(d, name("f"), Kind::File, 0o644).unwrap();
        fs.fsync(None, f, false).unwrap();
        fs.fsync_dir(None, d).unwrap();
        fs.fsync_dir(None, ROOT).unwrap();
        fs.unlink(d, name("f"), false).unwrap();
        let r = fs.power_cut();
        assert_eq!(r.names_restored, ["/d/f"]);
        assert!(content(&fs, &["d", "f"]).is_some(), "unlink not durable");
        fs.unlink(d, name("f"), false).unwrap();
        fs.fsync_dir(None, d).unwrap();
        fs.power_cut();
        assert!(content(&fs, &["d", "f"]).is_none());
        // Nothing unreachable is kept.
        assert_eq!(fs.nodes.len(), 2);
    }
}
