//! The cold tier: object data moved out of the node's chunk files into any object store,
//! through the `object_store` crate (S3 and S3-compatible stores, including another
//! Granary; Google Cloud Storage; Azure Blob Storage; a local directory).
//!
//! A cold copy is one object in the store, named by the partition it belongs to, its
//! bucket, the version it holds and a random suffix
//! (`<root>/p<partition>/b<bucket>/<version>-<random>`), so a partition's copies can be
//! listed (the orphan sweep) and no two moves ever write the same name. Its manifest in
//! the object record ([`ColdRef`]) names it and carries a CRC32C per piece, so every byte
//! read back is verified, a ranged read included.
//!
//! Every call has a deadline: an unreachable or stalled store fails the request with
//! [`ColdError::Unavailable`] (S3 `ServiceUnavailable`, 503) instead of hanging, and
//! [`ColdTier::reachable`] tells the mover to pause.

use std::ops::Range;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use bytes::Bytes;
use futures::StreamExt;
use object_store::path::Path;
use object_store::{ObjectStore, ObjectStoreExt, WriteMultipart};
use serde::{Deserialize, Serialize};

/// Smallest verified piece of a cold copy; larger objects use larger pieces so that a
/// manifest holds at most [`MAX_PIECES`] checksums, up to [`MAX_PIECE`] (a read fetches
/// whole pieces, so a piece bounds what a one-byte range costs).
pub const MIN_PIECE: u64 = 1024 * 1024;
const MAX_PIECES: u64 = 4096;
const MAX_PIECE: u64 = 64 * 1024 * 1024;
/// Objects up to this size go up in one PUT, larger ones as a multipart upload.
const SINGLE_PUT_MAX: u64 = 16 * 1024 * 1024;
/// Part size of multipart uploads to the cold store.
const UPLOAD_PART: usize = 8 * 1024 * 1024;

/// Where a cold object's data is: the manifest stored in its record.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ColdRef {
    /// Name in the cold store, below its root.
    pub key: String,
    pub len: u64,
    /// Bytes per verified piece (the last one may be shorter).
    pub piece: u64,
    /// CRC32C of each piece.
    pub crcs: Vec<u32>,
}

/// The piece size for an object of `len` bytes: a whole number of MiB, at most
/// [`MAX_PIECES`] pieces.
pub fn piece_size(len: u64) -> u64 {
    let pieces_of_min = len.div_ceil(MIN_PIECE);
    let mib = pieces_of_min.div_ceil(MAX_PIECES).max(1);
    (mib * MIN_PIECE).min(MAX_PIECE)
}

/// Part size of a multipart upload of `len` bytes: [`UPLOAD_PART`], or more so that no
/// upload needs more than 10000 parts (the S3, GCS and Azure limit).
fn part_size(len: u64) -> usize {
    let need = len.div_ceil(10_000).next_multiple_of(MIN_PIECE);
    (need as usize).max(UPLOAD_PART)
}

/// Extra deadline per byte moved in one call: 4 MiB/s, the slowest link the defaults
/// allow for.
fn deadline_for(base: Duration, bytes: u64) -> Duration {
    base + Duration::from_secs(bytes / (4 * 1024 * 1024))
}

#[derive(Debug, thiserror::Error)]
pub enum ColdError {
    /// The store did not answer in time or refused the request: retry later.
    #[error("the cold tier is unavailable: {0}")]
    Unavailable(String),
    /// What the store returned does not match the manifest.
    #[error("cold data is corrupt: {0}")]
    Corrupt(String),
    /// The store has no such object.
    #[error("cold object {0} is missing")]
    Missing(String),
    /// The node's own data could not be read (its hot copy stays as it is).
    #[error("reading the local copy: {0}")]
    Local(String),
}

/// Settings of the cold tier (node config `cold_tier`, `granary-node dev --cold-tier`).
#[derive(Clone, Debug)]
pub struct ColdConfig {
    /// `file:///dir`, `s3://bucket/prefix`, `gs://bucket/prefix`, `az://container/prefix`.
    pub url: String,
    /// Store options (`object_store` keys such as `aws_endpoint`, `aws_access_key_id`,
    /// `aws_secret_access_key`, `aws_region`, `aws_allow_http`); the standard
    /// environment variables of each cloud are read as well.
    pub options: Vec<(String, String)>,
    /// Deadline of one store call (a piece of a read, one part of an upload).
    pub timeout: Duration,
    /// How long a replaced or deleted copy stays (reads of it that began before have
    /// no pin on a remote object).
    pub delete_grace: Duration,
    /// How long a copy replaced by a restore from the cold tier stays (the orphan
    /// grace: the object was read often, maybe by long reads).
    pub retire_grace: Duration,
}

/// An open cold tier.
pub struct ColdTier {
    store: Arc<dyn ObjectStore>,
    root: Path,
    /// The URL without credentials, for logs and status.
    pub url: String,
    timeout: Duration,
    reachable: AtomicBool,
    /// See [`ColdConfig::delete_grace`].
    pub delete_grace: Duration,
    /// See [`ColdConfig::retire_grace`].
    pub retire_grace: Duration,
}

impl std::fmt::Debug for ColdTier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ColdTier").field("url", &self.url).finish()
    }
}

fn unavailable(e: object_store::Error) -> ColdError {
    match e {
        object_store::Error::NotFound { path, .. } => ColdError::Missing(path),
        other => ColdError::Unavailable(other.to_string()),
    }
}

impl ColdTier {
    /// Opens the store named by `cfg.url` (nothing is contacted yet).
    pub fn open(cfg: &ColdConfig) -> Result<ColdTier, String> {
        let url =
            url::Url::parse(&cfg.url).map_err(|e| format!("cold tier URL {:?}: {e}", cfg.url))?;
        // A moved object's only copy is in the cold tier: never in this process's memory.
        if url.scheme() == "memory" {
            return Err(format!(
                "cold tier URL {:?}: memory:// keeps cold copies in the node's memory, the only \
                 copy of every moved object would be lost at the next restart; use file://, \
                 s3://, gs:// or az://",
                cfg.url
            ));
        }
        let (store, root): (Arc<dyn ObjectStore>, Path) = if url.scheme() == "file" {
            let dir = url
                .to_file_path()
                .map_err(|()| format!("cold tier URL {:?} is not a local path", cfg.url))?;
            crate::engine::dirs::create_dir_all_durable(&dir)
                .map_err(|e| format!("creating the cold tier directory {}: {e}", dir.display()))?;
            // A moved object's only copy: durable (file and directories) before the
            // switch that frees its hot data commits.
            let fs = object_store::local::LocalFileSystem::new_with_prefix(&dir)
                .map_err(|e| format!("cold tier {}: {e}", dir.display()))?
                .with_fsync(true);
            (Arc::new(fs), Path::default())
        } else {
            // A mistyped option would otherwise be dropped silently (and, say, send the
            // traffic meant for another endpoint to AWS).
            for (k, _) in &cfg.options {
                let known = match url.scheme() {
                    "s3" | "s3a" => k.parse::<object_store::aws::AmazonS3ConfigKey>().is_ok(),
                    "gs" => k.parse::<object_store::gcp::GoogleConfigKey>().is_ok(),
                    "az" | "azure" | "abfs" | "abfss" | "adl" => {
                        k.parse::<object_store::azure::AzureConfigKey>().is_ok()
                    }
                    _ => false,
                } || k.parse::<object_store::ClientConfigKey>().is_ok();
                if !known {
                    return Err(format!(
                        "cold_tier_options: {k:?} is not an option of {} stores",
                        url.scheme()
                    ));
                }
            }
            // (A variable that is not UTF-8 cannot be an option: skipped, not a panic.)
            let vars = std::env::vars_os()
                .filter_map(|(k, v)| Some((k.into_string().ok()?, v.into_string().ok()?)));
            let mut opts = credentials_from(vars);
            opts.extend(cfg.options.iter().cloned());
            let (store, root) = object_store::parse_url_opts(&url, opts)
                .map_err(|e| format!("cold tier {}: {e}", redact(&url)))?;
            (Arc::from(store), root)
        };
        Ok(ColdTier {
            store,
            root,
            url: redact(&url),
            timeout: cfg.timeout,
            reachable: AtomicBool::new(true),
            delete_grace: cfg.delete_grace,
            retire_grace: cfg.retire_grace,
        })
    }

    /// Whether the last call to the store succeeded.
    pub fn reachable(&self) -> bool {
        self.reachable.load(Ordering::Relaxed)
    }

    fn note<T>(&self, r: Result<T, ColdError>) -> Result<T, ColdError> {
        match &r {
            Ok(_) | Err(ColdError::Missing(_)) | Err(ColdError::Corrupt(_)) => {
                self.reachable.store(true, Ordering::Relaxed)
            }
            Err(ColdError::Local(_)) => {}
            Err(ColdError::Unavailable(_)) => self.reachable.store(false, Ordering::Relaxed),
        }
        r
    }

    async fn timed<T>(
        &self,
        what: &str,
        f: impl std::future::Future<Output = object_store::Result<T>>,
    ) -> Result<T, ColdError> {
        self.timed_for(what, self.timeout, f).await
    }

    /// [`Self::timed`] with another deadline.
    async fn timed_for<T>(
        &self,
        what: &str,
        limit: Duration,
        f: impl std::future::Future<Output = object_store::Result<T>>,
    ) -> Result<T, ColdError> {
        let r = self.untracked(what, limit, f).await;
        self.note(r)
    }

    /// A call whose failure says nothing about the store's health for the mover (a
    /// listing that is merely long).
    async fn untracked<T>(
        &self,
        what: &str,
        limit: Duration,
        f: impl std::future::Future<Output = object_store::Result<T>>,
    ) -> Result<T, ColdError> {
        match tokio::time::timeout(limit, f).await {
            Ok(r) => r.map_err(unavailable),
            Err(_) => Err(ColdError::Unavailable(format!(
                "{what} took longer than {limit:?}"
            ))),
        }
    }

    fn path(&self, key: &str) -> Path {
        let mut p = self.root.clone();
        for part in key.split('/').filter(|s| !s.is_empty()) {
            p = p.join(part);
        }
        p
    }

    /// The prefix of partition `p`'s cold copies.
    pub fn partition_prefix(p: u16) -> String {
        format!("p{p:05}")
    }

    /// A fresh name for a copy of version `version` of an object of bucket `bucket`.
    pub fn new_key(p: u16, bucket: &str, version: u64) -> String {
        format!(
            "{}/b{bucket}/{version:016x}-{:016x}",
            Self::partition_prefix(p),
            rand::random::<u64>()
        )
    }

    /// Uploads `len` bytes from `body` as `key`, computing the piece checksums. On any
    /// error nothing is left behind that a manifest names (a partial multipart upload
    /// is aborted; a complete object is deleted if the length did not match).
    pub async fn upload(
        &self,
        key: &str,
        len: u64,
        mut body: impl futures::Stream<Item = std::io::Result<Bytes>> + Unpin,
    ) -> Result<ColdRef, ColdError> {
        let piece = piece_size(len);
        let mut crcs = Vec::with_capacity(len.div_ceil(piece) as usize);
        let mut in_piece = 0u64;
        let mut crc = 0u32;
        let mut total = 0u64;
        let mut account = |bytes: &[u8]| {
            let mut rest = bytes;
            while !rest.is_empty() {
                let n = ((piece - in_piece) as usize).min(rest.len());
                crc = crc32c::crc32c_append(crc, &rest[..n]);
                in_piece += n as u64;
                rest = &rest[n..];
                if in_piece == piece {
                    crcs.push(crc);
                    crc = 0;
                    in_piece = 0;
                }
            }
        };
        let path = self.path(key);
        let read_err = |e: std::io::Error| ColdError::Local(e.to_string());
        if len <= SINGLE_PUT_MAX {
            let mut buf = Vec::with_capacity(len as usize);
            while let Some(b) = body.next().await {
                let b = b.map_err(read_err)?;
                account(&b);
                total += b.len() as u64;
                buf.extend_from_slice(&b);
            }
            if total != len {
                return Err(ColdError::Corrupt(format!(
                    "local data is {total} bytes, not {len}"
                )));
            }
            self.timed_for(
                "a PUT",
                deadline_for(self.timeout, len),
                self.store.put(&path, buf.into()),
            )
            .await?;
        } else {
            let upload = self
                .timed(
                    "starting a multipart upload",
                    self.store.put_multipart(&path),
                )
                .await?;
            let part = part_size(len);
            let mut w = WriteMultipart::new_with_chunk_size(upload, part);
            let r: Result<(), ColdError> = async {
                while let Some(b) = body.next().await {
                    let b = b.map_err(read_err)?;
                    account(&b);
                    total += b.len() as u64;
                    self.timed_for(
                        "uploading a part",
                        deadline_for(self.timeout, part as u64),
                        w.wait_for_capacity(2),
                    )
                    .await?;
                    w.put(b);
                }
                if total != len {
                    return Err(ColdError::Corrupt(format!(
                        "local data is {total} bytes, not {len}"
                    )));
                }
                Ok(())
            }
            .await;
            let done = match r {
                Ok(()) => {
                    let limit = deadline_for(self.timeout, 2 * part as u64);
                    let done = self
                        .timed_for("completing a multipart upload", limit, w.finish())
                        .await;
                    if let Err(e) = &done {
                        // The upload may or may not have completed: the name is deleted
                        // (nothing names it yet) so no half-made copy stays behind.
                        tracing::debug!(key, error = %e, "completing a cold upload failed; deleting it");
                        let _ = tokio::time::timeout(self.timeout, self.store.delete(&path)).await;
                    }
                    done.map(|_| ())
                }
                Err(e) => {
                    let _ = tokio::time::timeout(self.timeout, w.abort()).await;
                    Err(e)
                }
            };
            done?;
        }
        if in_piece > 0 {
            crcs.push(crc);
        }
        // The copy is checked before anything frees the hot data: a store that
        // acknowledged and kept something else is caught here, not at read time.
        let meta = self.timed("a HEAD", self.store.head(&path)).await?;
        if meta.size != len {
            let _ = self.delete(key).await;
            return Err(ColdError::Corrupt(format!(
                "the store kept {} bytes of {key} after a {len}-byte upload",
                meta.size
            )));
        }
        Ok(ColdRef {
            key: key.to_string(),
            len,
            piece,
            crcs,
        })
    }

    /// Reads and verifies piece `i` of `r`, returning its bytes.
    async fn read_piece(&self, r: &ColdRef, i: u64) -> Result<Bytes, ColdError> {
        let start = i * r.piece;
        let end = (start + r.piece).min(r.len);
        let bytes = self
            .timed_for(
                "a ranged GET",
                deadline_for(self.timeout, end - start),
                self.store.get_range(&self.path(&r.key), start..end),
            )
            .await?;
        let expect = r.crcs.get(i as usize).copied();
        if bytes.len() as u64 != end - start || expect != Some(crc32c::crc32c(&bytes)) {
            return Err(ColdError::Corrupt(format!(
                "piece {i} of cold object {} fails its checksum",
                r.key
            )));
        }
        Ok(bytes)
    }

    /// Reads `range` of `r`: the first piece before this returns (a store that is down
    /// fails the request cleanly), the rest as a stream of verified pieces fetched by a
    /// task one piece ahead of the reader (it stops when the reader goes away).
    pub async fn read(
        self: &Arc<Self>,
        r: &ColdRef,
        range: Range<u64>,
        io: crate::model::data::Io,
    ) -> Result<(u64, crate::model::data::ByteStream), ColdError> {
        let len = range.end - range.start;
        if len == 0 || r.len == 0 {
            return Ok((0, Box::pin(futures::stream::empty())));
        }
        let (start, end, piece) = (range.start, range.end, r.piece);
        let first = start / piece;
        let last = (end - 1) / piece;
        let slice = move |i: u64, b: Bytes| -> Bytes {
            let base = i * piece;
            let s = start.saturating_sub(base) as usize;
            let e = ((end - base) as usize).min(b.len());
            b.slice(s.min(e)..e)
        };
        // Each piece takes the reader's fair turn at the node's I/O scheduler, as a piece
        // of a hot object does, charged for the bytes of the range it serves.
        let served = move |i: u64| (end.min((i + 1) * piece)).saturating_sub(start.max(i * piece));
        io.turn(served(first)).await;
        let head = slice(first, self.read_piece(r, first).await?);
        let (mut tx, rx) = futures::channel::mpsc::channel::<std::io::Result<Bytes>>(1);
        if first < last {
            let (me, r) = (self.clone(), r.clone());
            tokio::spawn(async move {
                use futures::SinkExt;
                for i in first + 1..=last {
                    // The reader went away: nothing more is fetched.
                    if tx.is_closed() {
                        return;
                    }
                    io.turn(served(i)).await;
                    let item = me
                        .read_piece(&r, i)
                        .await
                        .map(|b| slice(i, b))
                        .map_err(std::io::Error::other);
                    let failed = item.is_err();
                    if tx.send(item).await.is_err() || failed {
                        return;
                    }
                }
            });
        }
        let stream = futures::stream::once(async move { Ok(head) }).chain(rx);
        Ok((len, Box::pin(stream)))
    }

    /// Writes, reads back and deletes a small object under `_granary/` (outside every
    /// partition's names): tells at start whether the URL and credentials work.
    pub async fn probe(&self) -> Result<(), ColdError> {
        let key = format!("_granary/probe-{:016x}", rand::random::<u64>());
        let path = self.path(&key);
        let body = Bytes::from_static(b"granary cold tier probe");
        self.timed("a PUT", self.store.put(&path, body.clone().into()))
            .await?;
        let got = self
            .timed("a GET", self.store.get_range(&path, 0..body.len() as u64))
            .await;
        let _ = self.timed("a DELETE", self.store.delete(&path)).await;
        if got? != body {
            return Err(ColdError::Corrupt(
                "the probe object read back differently".into(),
            ));
        }
        Ok(())
    }

    /// Deletes `key` (a missing one is fine).
    pub async fn delete(&self, key: &str) -> Result<(), ColdError> {
        match self
            .timed("a DELETE", self.store.delete(&self.path(key)))
            .await
        {
            Ok(()) | Err(ColdError::Missing(_)) => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// Names (below the root) and last-modified times of the copies under `prefix`.
    pub async fn list(&self, prefix: &str) -> Result<Vec<(String, i64)>, ColdError> {
        let base = self.path(prefix);
        let root = self.root.clone();
        let listing = async {
            let mut out = Vec::new();
            let mut s = self.store.list(Some(&base));
            while let Some(m) = s.next().await {
                let m = m?;
                let full = m.location.as_ref().to_string();
                let rel = match root.as_ref() {
                    "" => full,
                    r => full
                        .strip_prefix(r)
                        .map(|s| s.trim_start_matches('/').to_string())
                        .unwrap_or(full),
                };
                out.push((rel, m.last_modified.timestamp_millis()));
            }
            Ok(out)
        };
        // A long listing is not an outage: its deadline is generous and its failure does
        // not pause the mover.
        self.untracked("a LIST", self.timeout * 30, listing).await
    }
}

/// Prefix of the variables the operator makes of the cold tier's credentials Secret
/// (`envFrom` with this prefix), so no key of that Secret can set any other variable of
/// the node (a `GRANARY_*` setting, say).
pub const CREDENTIAL_ENV_PREFIX: &str = "GRANARY_COLD_CREDENTIAL_";

/// The object store options among `vars`: `AWS_*`, `GOOGLE_*` and `AZURE_*` variables,
/// as set by hand or, with [`CREDENTIAL_ENV_PREFIX`] (which wins), from the Secret.
/// Lower-cased, as `object_store` names its options.
fn credentials_from(vars: impl Iterator<Item = (String, String)>) -> Vec<(String, String)> {
    let store_option =
        |k: &str| k.starts_with("AWS_") || k.starts_with("GOOGLE_") || k.starts_with("AZURE_");
    let (mut plain, mut prefixed) = (Vec::new(), Vec::new());
    for (k, v) in vars {
        match k.strip_prefix(CREDENTIAL_ENV_PREFIX) {
            Some(name) if store_option(name) => prefixed.push((name.to_ascii_lowercase(), v)),
            Some(_) => {}
            None if store_option(&k) => plain.push((k.to_ascii_lowercase(), v)),
            None => {}
        }
    }
    // Applied in order: a later value of the same option replaces an earlier one.
    plain.extend(prefixed);
    plain
}

/// The URL without user info or query (which may hold credentials).
fn redact(url: &url::Url) -> String {
    let mut u = url.clone();
    let _ = u.set_username("");
    let _ = u.set_password(None);
    u.set_query(None);
    u.to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_store_options_are_taken_from_the_environment_and_the_secrets_win() {
        let vars = [
            ("AWS_REGION", "by-hand"),
            ("GRANARY_COLD_CREDENTIAL_AWS_REGION", "from-secret"),
            ("GRANARY_COLD_CREDENTIAL_AWS_ACCESS_KEY_ID", "AK"),
            ("GRANARY_COLD_CREDENTIAL_GRANARY_MEMORY_BUDGET", "1"),
            ("GRANARY_COLD_CREDENTIAL_PATH", "/x"),
            ("GRANARY_MEMORY_BUDGET", "2"),
            ("AZURE_STORAGE_ACCOUNT_NAME", "acct"),
            ("HOME", "/root"),
        ]
        .map(|(k, v)| (k.to_string(), v.to_string()));
        let opts = credentials_from(vars.into_iter());
        let s3: Vec<(String, String)> = opts
            .iter()
            .filter(|(k, _)| k.starts_with("aws_"))
            .cloned()
            .collect();
        assert_eq!(
            s3,
            [
                ("aws_region", "by-hand"),
                ("aws_region", "from-secret"),
                ("aws_access_key_id", "AK")
            ]
            .map(|(k, v)| (k.to_string(), v.to_string()))
        );
        assert_eq!(opts.len(), 4, "{opts:?}");
        // Applied in order, the Secret's value is the one the store gets.
        let store = object_store::aws::AmazonS3Builder::new().with_bucket_name("b");
        let store = opts
            .iter()
            .filter_map(|(k, v)| Some((k.parse::<object_store::aws::AmazonS3ConfigKey>().ok()?, v)))
            .fold(store, |b, (k, v)| b.with_config(k, v));
        assert_eq!(
            store
                .get_config_value(&object_store::aws::AmazonS3ConfigKey::Region)
                .as_deref(),
            Some("from-secret")
        );
    }

    #[test]
    fn pieces_keep_a_manifest_within_its_bound() {
        assert_eq!(piece_size(0), MIN_PIECE);
        assert_eq!(piece_size(1), MIN_PIECE);
        assert_eq!(piece_size(MAX_PIECES * MIN_PIECE), MIN_PIECE);
        assert_eq!(piece_size(MAX_PIECES * MIN_PIECE + 1), 2 * MIN_PIECE);
        for len in [123_456_789_012, 7 << 30] {
            let p = piece_size(len);
            assert_eq!(p % MIN_PIECE, 0);
            assert!(len.div_ceil(p) <= MAX_PIECES, "{len}: {p}");
        }
        // Past 256 GiB the piece stops growing: a range read never fetches more.
        assert_eq!(piece_size(5 << 40), MAX_PIECE);
        assert_eq!(part_size(1 << 30), UPLOAD_PART);
        assert!((5u64 << 40).div_ceil(part_size(5 << 40) as u64) <= 10_000);
    }

    #[test]
    fn an_in_memory_store_is_refused() {
        let err = ColdTier::open(&ColdConfig {
            url: "memory:///".into(),
            options: vec![],
            timeout: Duration::from_secs(1),
            delete_grace: Duration::ZERO,
            retire_grace: Duration::ZERO,
        })
        .expect_err("memory:// refused");
        assert!(err.contains("lost at the next restart"), "{err}");
    }

    #[test]
    fn a_mistyped_option_is_refused() {
        let cfg = |k: &str| ColdConfig {
            url: "s3://bucket/prefix".into(),
            options: vec![(k.to_string(), "http://127.0.0.1:1".to_string())],
            timeout: Duration::from_secs(1),
            delete_grace: Duration::ZERO,
            retire_grace: Duration::ZERO,
        };
        let err = ColdTier::open(&cfg("aws_endpont")).unwrap_err();
        assert!(
            err.contains("aws_endpont") && err.contains("not an option"),
            "{err}"
        );
        ColdTier::open(&cfg("aws_endpoint")).unwrap();
    }

    /// An I/O identity for reads (a tenant's class on a scheduler of its own).
    fn io() -> crate::model::data::Io {
        crate::model::data::Io {
            sched: crate::tenancy::sched::IoScheduler::new(2, None),
            class: crate::tenancy::sched::Class::Tenant(crate::types::TenantId(
                uuid::Uuid::from_u128(1),
            )),
            weight: 100,
            announce: None,
        }
    }

    async fn collect(s: crate::model::data::ByteStream) -> std::io::Result<Vec<u8>> {
        let mut out = Vec::new();
        let mut s = s;
        while let Some(b) = s.next().await {
            out.extend_from_slice(&b?);
        }
        Ok(out)
    }

    #[tokio::test]
    async fn a_copy_reads_back_by_range_and_a_damaged_piece_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let tier = Arc::new(
            ColdTier::open(&ColdConfig {
                url: format!("file://{}", dir.path().display()),
                options: vec![],
                timeout: Duration::from_secs(10),
                delete_grace: Duration::ZERO,
                retire_grace: Duration::ZERO,
            })
            .unwrap(),
        );
        // 3.5 MiB in uneven pieces: the checksums follow piece boundaries, not writes.
        let data: Vec<u8> = (0..(7u32 << 19)).map(|i| (i * 31 % 251) as u8).collect();
        let body = futures::stream::iter(
            data.chunks(300_001)
                .map(|c| Ok(Bytes::copy_from_slice(c)))
                .collect::<Vec<_>>(),
        );
        let key = ColdTier::new_key(7, "bucket", 42);
        let r = tier.upload(&key, data.len() as u64, body).await.unwrap();
        assert_eq!(
            (r.len, r.piece, r.crcs.len()),
            (data.len() as u64, MIN_PIECE, 4)
        );
        for (s, e) in [
            (0u64, 1u64),
            (1_048_570, 1_048_590),
            (0, 3_670_016),
            (3_000_000, 3_670_016),
        ] {
            let (len, stream) = tier.read(&r, s..e, io()).await.unwrap();
            assert_eq!(len, e - s);
            assert_eq!(
                collect(stream).await.unwrap(),
                data[s as usize..e as usize],
                "{s}..{e}"
            );
        }
        let listed = tier.list(&ColdTier::partition_prefix(7)).await.unwrap();
        assert_eq!(
            listed.iter().map(|(k, _)| k.as_str()).collect::<Vec<_>>(),
            vec![key.as_str()]
        );

        // One byte of the third piece changes on the store: reads of it fail, reads of
        // other pieces still work.
        let file = dir.path().join(&key);
        let mut bytes = std::fs::read(&file).unwrap();
        bytes[2 * MIN_PIECE as usize + 5] ^= 0xff;
        std::fs::write(&file, bytes).unwrap();
        let (_, stream) = tier.read(&r, 0..3_670_016, io()).await.unwrap();
        assert!(
            collect(stream).await.is_err(),
            "a damaged piece must end the body with an error"
        );
        assert!(matches!(
            tier.read(&r, 2 * MIN_PIECE..2 * MIN_PIECE + 10, io()).await,
            Err(ColdError::Corrupt(_))
        ));
        let (_, stream) = tier.read(&r, 10..20, io()).await.unwrap();
        assert_eq!(collect(stream).await.unwrap(), data[10..20]);

        // A wrong length is refused and nothing the caller could name is kept.
        let short = futures::stream::iter(vec![Ok(Bytes::from_static(b"abc"))]);
        assert!(matches!(
            tier.upload("p00007/x/y", 4, short).await,
            Err(ColdError::Corrupt(_))
        ));
        tier.delete(&key).await.unwrap();
        tier.delete(&key).await.unwrap();
        assert!(
            tier.list(&ColdTier::partition_prefix(7))
                .await
                .unwrap()
                .is_empty()
        );
    }
}
