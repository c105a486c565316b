//! The local, crash-safe store: a redb database for metadata and KV values plus
//! checksummed chunk files for object data.
//!
//! Promises:
//! - A write returns only after it is durable (fsync of the chunk files, their
//!   directories and the redb commit). Concurrent writers share fsyncs: the
//!   [`commit`] thread folds every write waiting at that moment into one transaction.
//! - Writes are applied one after the other inside that transaction, so each sees
//!   the effect of the ones before it: compare-and-set is linearizable.
//! - Reads see every acknowledged write.
//! - Keys start with their partition, so a partition is a contiguous range.

pub mod chunk;
mod commit;
mod direct;
pub mod dirs;
pub mod keys;
pub mod record;
pub mod replog;
mod snapshot;
pub mod usage;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use redb::{ReadableDatabase, TableDefinition};

pub use chunk::{ChunkError, ChunkRef, ChunkStore, ChunkWriter};
pub use commit::WriteCtx;
pub use direct::set_direct_io;
pub use record::Record;
pub use replog::{LogEntry, LogPosition};
pub use snapshot::Imported;

pub const OBJECTS: TableDefinition<&[u8], Record> = TableDefinition::new("objects");
pub const UPLOADS: TableDefinition<&[u8], Record> = TableDefinition::new("uploads");
pub const PARTS: TableDefinition<&[u8], Record> = TableDefinition::new("parts");
pub const KV: TableDefinition<&[u8], Record> = TableDefinition::new("kv");
/// KV keys with a TTL, by partition then expiry time: `partition (2) | expires_at ms (8,
/// big-endian) | the KV key without its partition`. Lets the sweep find what expired
/// without reading live data, and keeps each partition a contiguous range.
pub const KV_EXPIRY: TableDefinition<&[u8], ()> = TableDefinition::new("kv_expiry");
/// Bucket incarnations deleted (key: the bucket prefix, `partition | bucket id`). A write
/// into one is refused inside the same group commit that would make it visible, so no
/// data can land under a bucket after its delete was decided.
pub const DEAD_BUCKETS: TableDefinition<&[u8], ()> = TableDefinition::new("dead_buckets");
/// Multipart uploads in listing order (key, then initiation time, then id): see
/// [`keys::upload_index_key`]. Lets ListMultipartUploads read one page, not the bucket.
pub const UPLOADS_BY_KEY: TableDefinition<&[u8], ()> = TableDefinition::new("uploads_by_key");
/// Multipart uploads by age: `initiated ms (8, big-endian) | upload key`. Lets the
/// expiry of abandoned uploads find the old ones without reading the others.
pub const UPLOADS_BY_AGE: TableDefinition<&[u8], ()> = TableDefinition::new("uploads_by_age");
pub(crate) const META: TableDefinition<&str, u64> = TableDefinition::new("meta");

#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error("storage engine: {0}")]
    Db(String),
    #[error(transparent)]
    Chunk(#[from] ChunkError),
    #[error("i/o: {0}")]
    Io(#[from] std::io::Error),
    #[error("the engine is shutting down")]
    Closed,
    /// The store (or a table of it) is in a format this binary does not read.
    #[error("storage format: {0}")]
    Format(String),
}

macro_rules! db_err {
    ($($t:ty),*) => {$(
        impl From<$t> for EngineError {
            fn from(e: $t) -> Self { EngineError::Db(e.to_string()) }
        }
    )*};
}
db_err!(
    redb::Error,
    redb::DatabaseError,
    redb::TransactionError,
    redb::TableError,
    redb::StorageError,
    redb::CommitError
);

pub type ReadTxn = redb::ReadTransaction;

#[derive(Clone)]
pub struct Engine {
    db: Arc<redb::Database>,
    chunks: ChunkStore,
    committer: commit::Committer,
    logs: Arc<replog::LogState>,
}

impl Engine {
    /// Opens (or creates) the engine under `dir`: `dir/meta.redb` and `dir/chunks/`.
    /// The layout is durable before this returns: `dir` is synced into its parent, and
    /// `dir` itself once `meta.redb` and `chunks/` are in it (redb syncs the file's
    /// contents, not its name).
    pub fn open(dir: &Path) -> Result<Self, EngineError> {
        dirs::create_dir_all_durable(dir)?;
        let db = Arc::new(redb::Database::create(dir.join("meta.redb"))?);
        {
            let txn = db.begin_write()?;
            for t in [OBJECTS, UPLOADS, PARTS, KV] {
                record::open_record_table(&txn, t)?;
            }
            txn.open_table(KV_EXPIRY)?;
            txn.open_table(DEAD_BUCKETS)?;
            txn.open_table(UPLOADS_BY_KEY)?;
            txn.open_table(UPLOADS_BY_AGE)?;
            txn.open_table(META)?;
            txn.open_table(replog::REPL_LOG)?;
            txn.open_table(replog::PART_LSN)?;
            txn.open_table(usage::USAGE)?;
            txn.commit()?;
        }
        usage::rebuild_if_needed(&db)?;
        let chunks = ChunkStore::open(dir.join("chunks"))?;
        dirs::sync_dir(dir)?;
        let logs = Arc::new(replog::LogState::load(&db)?);
        let committer = commit::Committer::start(db.clone(), logs.clone())?;
        Ok(Self {
            db,
            chunks,
            committer,
            logs,
        })
    }

    pub(crate) fn log_state(&self) -> &replog::LogState {
        &self.logs
    }

    pub fn chunks(&self) -> &ChunkStore {
        &self.chunks
    }

    /// Runs `f` inside the next group commit and returns its result once the commit is
    /// durable. `sync_dirs` are directories holding new chunk files `f` makes reachable.
    ///
    /// Contract: `f` shares one transaction with the other writes of its batch, and
    /// there is no per-write rollback (redb savepoints need a clean transaction). So `f`
    /// must read and validate everything first and return `Err` only before its first
    /// change; a refusal after validation is `Ok(Err(..))` with nothing changed.
    pub async fn write<T, F>(&self, sync_dirs: Vec<PathBuf>, f: F) -> Result<T, EngineError>
    where
        T: Send + 'static,
        F: FnOnce(&mut WriteCtx<'_>) -> Result<T, EngineError> + Send + 'static,
    {
        self.committer.submit(sync_dirs, f).await
    }

    /// Runs a read-only closure against a consistent snapshot, off the async runtime.
    pub async fn read<T, F>(&self, f: F) -> Result<T, EngineError>
    where
        T: Send + 'static,
        F: FnOnce(&ReadTxn) -> Result<T, EngineError> + Send + 'static,
    {
        let db = self.db.clone();
        tokio::task::spawn_blocking(move || {
            let txn = db.begin_read()?;
            f(&txn)
        })
        .await
        .map_err(|e| EngineError::Db(format!("read task failed: {e}")))?
    }

    /// Stops accepting writes after the ones already queued are committed.
    pub async fn shutdown(&self) {
        self.committer.shutdown().await;
    }
}
