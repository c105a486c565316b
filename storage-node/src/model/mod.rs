//! The storage model: what buckets, objects, multipart uploads and KV namespaces mean,
//! independent of any wire protocol. Front ends translate requests into calls here and
//! [`Error`] back into their protocol's errors; nothing here knows about HTTP.

pub mod bucket;
pub mod data;
pub mod kv;
pub mod multipart;
pub mod object;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use redb::ReadableTable;
use tokio::sync::{Mutex, RwLock};

use crate::catalog::{Bucket, Catalog, CatalogError};
use crate::engine::{ChunkRef, Engine, EngineError, OBJECTS, PARTS};
use crate::types::{PartitionId, TenantId};

pub use data::{ByteStream, ObjectBody};
pub use object::{Conditions, ObjectMeta, ObjectRecord};

/// Everything that can go wrong below the front ends, in protocol-neutral terms.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("the bucket does not exist")]
    NoSuchBucket,
    #[error("the bucket already exists and is yours")]
    BucketAlreadyOwnedByYou,
    #[error("the bucket is not empty")]
    BucketNotEmpty,
    #[error("the key does not exist")]
    NoSuchKey,
    #[error("the upload does not exist")]
    NoSuchUpload,
    #[error("a precondition failed")]
    PreconditionFailed,
    #[error("not modified")]
    NotModified,
    #[error("the range is not satisfiable for an object of {size} bytes")]
    InvalidRange { size: u64 },
    #[error("part {0} was not uploaded or its ETag differs")]
    InvalidPart(u32),
    #[error("parts must be listed in ascending order")]
    InvalidPartOrder,
    #[error("part {part} is {size} bytes; every part but the last must be at least 5 MiB")]
    EntityTooSmall { part: u32, size: u64 },
    #[error("the Content-MD5 you specified did not match what was received")]
    BadDigest,
    #[error("version mismatch: the current version is {current:?}")]
    VersionMismatch { current: Option<u64> },
    #[error("{0}")]
    Invalid(String),
    #[error("the request body ended early or could not be read: {0}")]
    IncompleteBody(String),
    #[error("stored data is corrupt: {0}")]
    Corrupt(String),
    #[error(transparent)]
    Engine(#[from] EngineError),
    #[error(transparent)]
    Catalog(#[from] CatalogError),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Replaced chunk files are handed to the pin registry only after this delay, which
/// covers the moment between a read resolving an object's metadata and pinning its
/// chunks. From then on a file stays while any read uses it, however long that read
/// takes. Files left behind by a crash are removed at the next start.
const CHUNK_GRACE: Duration = Duration::from_secs(5);

/// The model's entry point, shared by every front end.
#[derive(Clone)]
pub struct Store {
    inner: Arc<Inner>,
}

struct Inner {
    engine: Engine,
    catalog: Arc<dyn Catalog>,
    partitions: u16,
    buckets: RwLock<HashMap<(TenantId, String), Bucket>>,
    /// Bumped (under the `buckets` write lock) whenever a bucket is created or deleted:
    /// a cache fill that read the catalog before the change is dropped, so a deleted
    /// incarnation can never be cached after its deletion.
    bucket_epoch: std::sync::atomic::AtomicU64,
    /// Serialises bucket creation and deletion against each other.
    bucket_ddl: Mutex<()>,
}

impl Store {
    pub fn new(engine: Engine, catalog: Arc<dyn Catalog>, partitions: u16) -> Self {
        Self {
            inner: Arc::new(Inner {
                engine,
                catalog,
                partitions,
                buckets: RwLock::new(HashMap::new()),
                bucket_epoch: Default::default(),
                bucket_ddl: Mutex::new(()),
            }),
        }
    }

    pub fn engine(&self) -> &Engine {
        &self.inner.engine
    }

    pub fn catalog(&self) -> &Arc<dyn Catalog> {
        &self.inner.catalog
    }

    pub fn partition(&self, tenant: TenantId, container: &str) -> PartitionId {
        PartitionId::of(tenant, container.as_bytes(), self.inner.partitions)
    }

    /// Removes chunk files no metadata references any more, once no read uses them.
    pub(crate) fn discard_chunks(&self, chunks: Vec<ChunkRef>) {
        if chunks.is_empty() {
            return;
        }
        let store = self.inner.engine.chunks().clone();
        tokio::spawn(async move {
            tokio::time::sleep(CHUNK_GRACE).await;
            store.remove_when_unused(chunks);
        });
    }

    /// Deletes chunk files that no object or part references: left by a crash between
    /// writing data and committing metadata, or by a stop inside the grace period.
    /// Runs before the node serves, so no write is in flight.
    pub async fn sweep_orphan_chunks(&self) -> Result<usize> {
        let chunks = self.inner.engine.chunks().clone();
        let live = self
            .inner
            .engine
            .read(|txn| {
                let mut live = std::collections::HashSet::new();
                for (table, is_part) in [(OBJECTS, false), (PARTS, true)] {
                    let t = txn.open_table(table).map_err(EngineError::from)?;
                    for entry in t.iter().map_err(EngineError::from)? {
                        let (_, v) = entry.map_err(EngineError::from)?;
                        let refs = if is_part {
                            postcard::from_bytes::<multipart::PartRecord>(v.value())
                                .map(|p| p.chunks)
                                .ok()
                        } else {
                            postcard::from_bytes::<ObjectRecord>(v.value())
                                .map(|o| o.data.chunks().to_vec())
                                .ok()
                        };
                        live.extend(refs.unwrap_or_default().into_iter().map(|c| c.id));
                    }
                }
                Ok(live)
            })
            .await?;
        let removed = tokio::task::spawn_blocking(move || -> std::io::Result<usize> {
            let orphans: Vec<_> = chunks
                .list_all()?
                .into_iter()
                .filter(|c| !live.contains(&c.id))
                .collect();
            // Durable removals: a power cut cannot bring them back (and if a sync
            // fails, the next start sweeps again).
            Ok(chunks.remove_files(&orphans))
        })
        .await
        .map_err(|e| Error::Invalid(e.to_string()))?
        .map_err(EngineError::from)?;
        Ok(removed)
    }
}

/// A store over a fresh engine in `dir` and an in-memory SQLite catalog, for unit tests.
#[cfg(test)]
pub(crate) async fn test_store(dir: &std::path::Path) -> Store {
    use crate::catalog::{MasterKey, SqlCatalog};
    let catalog = SqlCatalog::connect("sqlite::memory:", MasterKey::generate())
        .await
        .expect("in-memory catalog");
    Store::new(Engine::open(dir).expect("engine"), Arc::new(catalog), 16)
}
