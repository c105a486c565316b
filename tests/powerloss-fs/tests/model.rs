//! Self-tests of the power-loss file system through a real FUSE mount: plain file
//! system calls from this process, then a power cut, then what is left is checked.
//! They pin the model the crash tests rely on; see `docs/design.md`.

use std::fs::{self, File, OpenOptions};
use std::io::{Read, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use granary_powerloss_fs::{Mode, PowerLossFs};

/// A mounted file system in a temporary directory (the mount goes first on drop).
struct Mounted {
    fs: PowerLossFs,
    _dir: tempfile::TempDir,
}

impl Mounted {
    fn new(mode: Mode) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let fs = PowerLossFs::mount(
            Path::new(env!("CARGO_BIN_EXE_granary-powerloss-fs")),
            &dir.path().join("mnt"),
            mode,
            &dir.path().join("sync.log"),
        )
        .expect("mounting the power-loss file system");
        Self { fs, _dir: dir }
    }

    fn p(&self, rel: &str) -> PathBuf {
        self.fs.mountpoint().join(rel)
    }

    fn cut(&mut self) -> String {
        self.fs.power_cut().unwrap()
    }

    fn log(&self) -> String {
        fs::read_to_string(self.fs.log_path()).unwrap()
    }
}

fn write_file(path: &Path, body: &[u8], sync: bool) {
    let mut f = File::create(path).unwrap();
    f.write_all(body).unwrap();
    if sync {
        f.sync_all().unwrap();
    }
}

fn sync_dir(path: &Path) {
    File::open(path).unwrap().sync_all().unwrap();
}

#[test]
fn a_write_without_fsync_is_lost() {
    let mut m = Mounted::new(Mode::Strict);
    write_file(&m.p("f"), b"durable", true);
    sync_dir(m.fs.mountpoint());
    let mut f = OpenOptions::new().append(true).open(m.p("f")).unwrap();
    f.write_all(b" and more").unwrap();
    drop(f);
    assert_eq!(
        fs::read(m.p("f")).unwrap(),
        b"durable and more",
        "visible at once"
    );
    let report = m.cut();
    assert!(report.contains("files_rolled_back=1"), "{report}");
    assert_eq!(fs::read(m.p("f")).unwrap(), b"durable");
    assert!(m.log().contains("data rolled back: /f"), "{}", m.log());
}

#[test]
fn a_new_file_with_file_fsync_but_no_directory_fsync_is_gone() {
    let mut m = Mounted::new(Mode::Strict);
    write_file(&m.p("new"), b"data", true);
    let report = m.cut();
    assert!(report.contains("names_lost=1"), "{report}");
    assert!(!m.p("new").exists(), "the name was never made durable");
}

#[test]
fn a_new_file_with_file_and_directory_fsync_is_kept() {
    let mut m = Mounted::new(Mode::Strict);
    fs::create_dir(m.p("d")).unwrap();
    sync_dir(m.fs.mountpoint());
    write_file(&m.p("d/new"), b"data", true);
    sync_dir(&m.p("d"));
    m.cut();
    assert_eq!(fs::read(m.p("d/new")).unwrap(), b"data");
    let log = m.log();
    assert!(log.contains("fsync /d/new"), "{log}");
    assert!(log.contains("fsyncdir /d added=[\"new\"]"), "{log}");
}

#[test]
fn a_new_directory_needs_its_parent_synced() {
    let mut m = Mounted::new(Mode::Strict);
    fs::create_dir_all(m.p("a/b")).unwrap();
    write_file(&m.p("a/b/f"), b"x", true);
    sync_dir(&m.p("a/b"));
    sync_dir(&m.p("a"));
    m.cut();
    assert!(!m.p("a").exists(), "the root was never synced: a/ is gone");
}

#[test]
fn rename_over_an_old_file_reverts_without_directory_fsync() {
    let mut m = Mounted::new(Mode::Strict);
    write_file(&m.p("state"), b"old", true);
    sync_dir(m.fs.mountpoint());
    write_file(&m.p("state.tmp"), b"new", true);
    fs::rename(m.p("state.tmp"), m.p("state")).unwrap();
    assert_eq!(fs::read(m.p("state")).unwrap(), b"new");
    m.cut();
    assert_eq!(fs::read(m.p("state")).unwrap(), b"old");
    assert!(
        !m.p("state.tmp").exists(),
        "its name was never durable either"
    );
    // With the directory fsync the new content stays.
    write_file(&m.p("state.tmp"), b"new", true);
    fs::rename(m.p("state.tmp"), m.p("state")).unwrap();
    sync_dir(m.fs.mountpoint());
    m.cut();
    assert_eq!(fs::read(m.p("state")).unwrap(), b"new");
    assert!(!m.p("state.tmp").exists());
}

#[test]
fn an_unlink_without_directory_fsync_comes_back() {
    let mut m = Mounted::new(Mode::Strict);
    write_file(&m.p("gone"), b"bytes", true);
    sync_dir(m.fs.mountpoint());
    fs::remove_file(m.p("gone")).unwrap();
    let report = m.cut();
    assert!(report.contains("names_restored=1"), "{report}");
    assert_eq!(fs::read(m.p("gone")).unwrap(), b"bytes");
    fs::remove_file(m.p("gone")).unwrap();
    sync_dir(m.fs.mountpoint());
    m.cut();
    assert!(!m.p("gone").exists());
}

#[test]
fn open_handles_fail_with_eio_after_a_power_cut() {
    let mut m = Mounted::new(Mode::Strict);
    write_file(&m.p("f"), b"abc", true);
    sync_dir(m.fs.mountpoint());
    let mut f = OpenOptions::new()
        .read(true)
        .write(true)
        .open(m.p("f"))
        .unwrap();
    m.cut();
    let e = f.write_all(b"zzz").and_then(|()| f.sync_all()).unwrap_err();
    assert_eq!(e.raw_os_error(), Some(libc::EIO), "{e}");
    let mut buf = Vec::new();
    // A fresh open sees the durable file.
    File::open(m.p("f")).unwrap().read_to_end(&mut buf).unwrap();
    assert_eq!(buf, b"abc");
}

#[test]
fn o_dsync_writes_are_durable_without_fsync() {
    let mut m = Mounted::new(Mode::Strict);
    write_file(&m.p("f"), b"", true);
    sync_dir(m.fs.mountpoint());
    let mut f = OpenOptions::new()
        .write(true)
        .custom_flags(libc::O_DSYNC)
        .open(m.p("f"))
        .unwrap();
    f.write_all(b"synced").unwrap();
    m.cut();
    assert_eq!(fs::read(m.p("f")).unwrap(), b"synced");
}

#[test]
fn journal_mode_makes_every_pending_name_durable_on_any_fsync() {
    let mut m = Mounted::new(Mode::Journal);
    fs::create_dir(m.p("d")).unwrap();
    write_file(&m.p("d/unsynced"), b"data", false);
    write_file(&m.p("synced"), b"data", true);
    m.cut();
    assert_eq!(fs::read(m.p("synced")).unwrap(), b"data");
    assert!(
        m.p("d/unsynced").exists(),
        "its name rode along with the journal"
    );
    assert_eq!(
        fs::read(m.p("d/unsynced")).unwrap(),
        b"",
        "but its data was never synced"
    );
}
