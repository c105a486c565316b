//! A FUSE file system that models a power cut, for Granary's crash tests (in the style
//! of LazyFS): every change is visible at once, but only what was made durable by
//! fsync survives a [power cut](PowerLossFs::power_cut). The model and how it compares
//! with ext4 are in [`model`] and in `docs/design.md` ("Power-loss testing").
//!
//! [`PowerLossFs`] runs the `granary-powerloss-fs` daemon as a child process owned by
//! the caller: mounted on start, unmounted and killed (by pid) on drop.

pub mod model;

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

pub use model::Mode;

/// A mounted power-loss file system; unmounted when dropped.
pub struct PowerLossFs {
    child: Option<Child>,
    stdin: Option<ChildStdin>,
    stdout: BufReader<ChildStdout>,
    mountpoint: PathBuf,
    log: PathBuf,
}

impl PowerLossFs {
    /// Mounts the daemon `bin` on `mountpoint` (an empty directory) and logs every sync
    /// and every power cut to `log`. Fails, never skips, when FUSE is not available.
    pub fn mount(bin: &Path, mountpoint: &Path, mode: Mode, log: &Path) -> Result<Self> {
        if !Path::new("/dev/fuse").exists() {
            bail!(
                "/dev/fuse is missing: the power-loss tests need FUSE (load the fuse module, \
                 or give the container /dev/fuse); they fail rather than skip"
            );
        }
        std::fs::create_dir_all(mountpoint)?;
        let stderr = std::fs::File::create(log.with_extension("stderr"))?;
        let mode_arg = match mode {
            Mode::Strict => "strict",
            Mode::Journal => "journal",
        };
        let mut child = Command::new(bin)
            .args(["--mode", mode_arg, "--log"])
            .arg(log)
            .arg(mountpoint)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(stderr)
            .spawn()
            .with_context(|| format!("spawning {}", bin.display()))?;
        let stdin = child.stdin.take().context("daemon stdin")?;
        let stdout = BufReader::new(child.stdout.take().context("daemon stdout")?);
        let mut fs = Self {
            child: Some(child),
            stdin: Some(stdin),
            stdout,
            mountpoint: mountpoint.to_path_buf(),
            log: log.to_path_buf(),
        };
        let mut line = String::new();
        fs.stdout.read_line(&mut line)?;
        if line.trim() != "ready" {
            let err = std::fs::read_to_string(log.with_extension("stderr")).unwrap_or_default();
            bail!(
                "the power-loss file system did not mount on {}: {err}",
                mountpoint.display()
            );
        }
        Ok(fs)
    }

    pub fn mountpoint(&self) -> &Path {
        &self.mountpoint
    }

    /// The log of syncs and power cuts.
    pub fn log_path(&self) -> &Path {
        &self.log
    }

    fn command(&mut self, cmd: &str) -> Result<String> {
        let stdin = self.stdin.as_mut().context("daemon already stopped")?;
        writeln!(stdin, "{cmd}")?;
        stdin.flush()?;
        let mut line = String::new();
        self.stdout.read_line(&mut line)?;
        match line.trim().strip_prefix("ok") {
            Some(rest) => Ok(rest.trim().to_string()),
            None => bail!("power-loss daemon answered {cmd:?} with {line:?}"),
        }
    }

    /// Power loss: everything not durable is discarded at this moment and open handles
    /// fail with EIO. Returns a summary of what was discarded.
    pub fn power_cut(&mut self) -> Result<String> {
        self.command("cut")
    }

    /// `fsyncs=N dir_fsyncs=N cuts=N`.
    pub fn stats(&mut self) -> Result<String> {
        self.command("stats")
    }
}

impl Drop for PowerLossFs {
    fn drop(&mut self) {
        // Closing stdin asks the daemon to unmount and exit.
        drop(self.stdin.take());
        if let Some(mut c) = self.child.take() {
            let deadline = Instant::now() + Duration::from_secs(5);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = c.try_wait() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = c.kill();
            let _ = c.wait();
        }
        // A killed daemon leaves a dead mount behind; detach it whatever state it is in.
        let mounted = std::fs::read_to_string("/proc/self/mountinfo")
            .unwrap_or_default()
            .lines()
            .any(|l| l.split(' ').nth(4) == self.mountpoint.to_str());
        if mounted {
            let _ = Command::new("umount")
                .arg("-l")
                .arg(&self.mountpoint)
                .status();
        }
    }
}
