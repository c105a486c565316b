//! Directory durability: creating directories, and replacing small files, so that the
//! result survives a power loss and not only a crash of the process.
//!
//! A file's data is durable after an fsync of the file; its name (create, rename,
//! unlink) only after an fsync of the directory holding it, and a new directory's own
//! name only after an fsync of its parent. `docs/design.md` ("Durability on disk") has
//! the whole argument.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

/// fsync of a directory: makes the names in it (creates, renames, unlinks) durable.
pub fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

/// `path`'s parent directory, `.` for a bare relative name.
pub fn parent_of(path: &Path) -> PathBuf {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    }
}

/// Creates `dir` and its missing ancestors durably: every directory created is followed
/// by an fsync of its parent. `dir` and its parent are synced even when they existed,
/// since an earlier run may have stopped between creating and syncing them.
pub fn create_dir_all_durable(dir: &Path) -> io::Result<()> {
    let mut missing = Vec::new();
    let mut p = dir.to_path_buf();
    while !p.exists() {
        missing.push(p.clone());
        match p.parent() {
            Some(q) if !q.as_os_str().is_empty() => p = q.to_path_buf(),
            _ => break,
        }
    }
    for d in missing.iter().rev() {
        match fs::create_dir(d) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(e),
        }
        sync_dir(&parent_of(d))?;
    }
    sync_dir(dir)?;
    if missing.is_empty() {
        // Created by someone else, perhaps in a directory we may not read: the
        // creator's business then.
        match sync_dir(&parent_of(dir)) {
            Err(e) if e.kind() == io::ErrorKind::PermissionDenied => {}
            r => r?,
        }
    }
    Ok(())
}

/// Creates `path` holding `data`, durably, only if it does not exist yet: concurrent
/// creators never replace each other's file (the loser gets `AlreadyExists`). The data is
/// written and fsynced under a private temporary name, then renamed to `path` with
/// `RENAME_NOREPLACE` (which fails if the name is taken) and the directory fsynced.
pub fn create_new_durable(path: &Path, data: &[u8], mode: u32) -> io::Result<()> {
    let dir = parent_of(path);
    let mut tmp_name = path.file_name().unwrap_or_default().to_os_string();
    tmp_name.push(format!(
        ".tmp.{}.{:x}",
        std::process::id(),
        rand::random::<u64>()
    ));
    let tmp = dir.join(tmp_name);
    let mut f = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(&tmp)?;
    let written = f.write_all(data).and_then(|()| f.sync_all());
    drop(f);
    let renamed = written.and_then(|()| rename_noreplace(&tmp, path));
    if renamed.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    renamed?;
    sync_dir(&dir)
}

/// `rename(2)` that fails with `AlreadyExists` instead of replacing `to`.
fn rename_noreplace(from: &Path, to: &Path) -> io::Result<()> {
    use std::ffi::CString;
    use std::os::unix::ffi::OsStrExt;
    let from = CString::new(from.as_os_str().as_bytes())?;
    let to = CString::new(to.as_os_str().as_bytes())?;
    // SAFETY: both are valid NUL-terminated paths that outlive the call; renameat2 only
    // reads them.
    let r = unsafe {
        libc::renameat2(
            libc::AT_FDCWD,
            from.as_ptr(),
            libc::AT_FDCWD,
            to.as_ptr(),
            libc::RENAME_NOREPLACE,
        )
    };
    if r == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Replaces `path` with `data` atomically and durably: a temporary file in the same
/// directory, fsynced, renamed over `path`, then the directory fsynced. After a crash
/// `path` holds either the old or the new content, never a mix or nothing.
pub fn write_file_durable(path: &Path, data: &[u8], mode: u32) -> io::Result<()> {
    let dir = parent_of(path);
    let mut tmp_name = path.file_name().unwrap_or_default().to_os_string();
    tmp_name.push(".tmp");
    let tmp = dir.join(tmp_name);
    let mut f = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(mode)
        .open(&tmp)?;
    f.write_all(data)?;
    f.sync_all()?;
    drop(f);
    fs::rename(&tmp, path)?;
    sync_dir(&dir)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_new_file_is_created_once_and_never_replaced() {
        let t = tempfile::tempdir().unwrap();
        let f = t.path().join("secret");
        create_new_durable(&f, b"first", 0o600).unwrap();
        let again = create_new_durable(&f, b"second", 0o600).unwrap_err();
        assert_eq!(again.kind(), io::ErrorKind::AlreadyExists);
        assert_eq!(fs::read(&f).unwrap(), b"first");
        let names: Vec<_> = fs::read_dir(t.path()).unwrap().flatten().collect();
        assert_eq!(names.len(), 1, "no temporary file left behind");
    }

    #[test]
    fn creates_nested_directories_and_replaces_files() {
        let t = tempfile::tempdir().unwrap();
        let d = t.path().join("a/b/c");
        create_dir_all_durable(&d).unwrap();
        assert!(d.is_dir());
        // Again on an existing directory: fine.
        create_dir_all_durable(&d).unwrap();
        let f = d.join("state.json");
        write_file_durable(&f, b"one", 0o600).unwrap();
        write_file_durable(&f, b"two", 0o600).unwrap();
        assert_eq!(fs::read(&f).unwrap(), b"two");
        assert!(!d.join("state.json.tmp").exists());
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(
            fs::metadata(&f).unwrap().permissions().mode() & 0o777,
            0o600
        );
    }
}
