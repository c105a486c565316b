//! The storage model: what buckets, objects, multipart uploads and KV namespaces mean,
//! independent of any wire protocol. Front ends translate requests into calls here and
//! [`Error`] back into their protocol's errors; nothing here knows about HTTP.

pub mod bucket;
pub mod checksum;
pub mod data;
pub mod kv;
pub mod multipart;
pub mod object;
mod quota;
pub mod tiering;

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
    /// A conditional write whose condition held when the request arrived but no longer
    /// held when it committed: another write got there first (AWS answers 409; retry).
    #[error("a conflicting write changed the object while this conditional write ran")]
    ConditionalRequestConflict,
    /// A read's `If-None-Match` / `If-Modified-Since` held: 304, with the validators of
    /// the version the conditions were checked against.
    #[error("not modified")]
    NotModified { etag: String, last_modified: i64 },
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
    /// A flexible checksum (named by its algorithm) that does not match the data.
    #[error("the {0} you specified did not match the calculated checksum")]
    BadChecksum(&'static str),
    #[error("{0}")]
    InvalidTag(String),
    #[error("part {0} does not exist in this object")]
    InvalidPartNumber(u32),
    #[error("version mismatch: the current version is {current:?}")]
    VersionMismatch { current: Option<u64> },
    #[error("{0}")]
    Invalid(String),
    #[error("the request body ended early or could not be read: {0}")]
    IncompleteBody(String),
    #[error("stored data is corrupt: {0}")]
    Corrupt(String),
    /// This node does not lead the partition (the request reached it on a stale or
    /// forged route); retrying through any node finds the primary.
    #[error("{0}")]
    NotPrimary(String),
    /// A copy whose source bucket another node leads (not supported yet).
    #[error(
        "the copy source bucket is stored on another node; copying between buckets on \
         different nodes is not supported yet (copy with GET and PUT instead)"
    )]
    CopySourceElsewhere,
    /// A write to a partition whose in-sync set is smaller than `min_in_sync`, refused
    /// before it started (as Kafka's `NotEnoughReplicas`): nothing was written.
    #[error("{0}")]
    NotEnoughReplicas(String),
    /// The write would take its tenant past a quota; nothing was stored.
    #[error(transparent)]
    QuotaExceeded(#[from] crate::tenancy::quota::QuotaExceeded),
    /// The tenant has quotas and whether the write fits could not be decided (its usage
    /// or quotas were unreadable, or the quota authority did not answer); nothing was
    /// stored, retry.
    #[error("{0}")]
    QuotaUndecided(String),
    /// The object's data is in the cold tier and the cold tier did not answer (or is
    /// not configured): retry later.
    #[error("{0}")]
    ColdTierUnavailable(String),
    #[error(transparent)]
    Engine(#[from] EngineError),
    #[error(transparent)]
    Catalog(#[from] CatalogError),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// An error reading a copy's source: a source this node does not lead is another
    /// node's, which a copy cannot read yet.
    pub fn for_copy_source(self) -> Self {
        match self {
            Error::NotPrimary(_) => Error::CopySourceElsewhere,
            e => e,
        }
    }
}

/// What the model notes about the request running in a task (see [`tracking_partitions`]).
struct RequestScope {
    /// The partitions it accessed, each with the number of its last log entry visible
    /// when it was first accessed.
    touched: std::cell::RefCell<Vec<(PartitionId, u64)>>,
    /// It may write: the partitions it accesses must accept writes.
    write: bool,
}

tokio::task_local! {
    static SCOPE: RequestScope;
}

/// Runs `f` and returns, with its output, the partitions it accessed through the model,
/// each with the number of its last visible log entry at that moment (so the answer can
/// wait until what it may have seen or written is durable on the replicas). With
/// `write`, every partition it accesses is also checked by the write guard first (see
/// [`Store::set_write_guard`]).
pub async fn tracking_partitions<F: std::future::Future>(
    write: bool,
    f: F,
) -> (F::Output, Vec<(PartitionId, u64)>) {
    let scope = RequestScope {
        touched: std::cell::RefCell::new(Vec::new()),
        write,
    };
    SCOPE
        .scope(scope, async move {
            let out = f.await;
            (out, SCOPE.with(|s| s.touched.take()))
        })
        .await
}

/// Why this node may not serve a partition, or None when it may.
pub type PartitionGuard = Arc<dyn Fn(PartitionId) -> Option<String> + Send + Sync>;
/// Told of every chunk file as soon as an upload has finished and fsynced it (before the
/// write that references it commits): the replication layer starts sending it to the
/// partition's replicas while the rest of the body arrives. Called on a blocking thread;
/// must not block.
pub type ChunkHook = Arc<dyn Fn(&crate::engine::ChunkRef) + Send + Sync>;

/// Waits until what the listed partitions' logs held (each with the entry number the
/// caller saw first) is durable on their in-sync replicas; Err says why that is not
/// known (see `Replicator::barrier`).
pub type BarrierHook = Arc<
    dyn Fn(Vec<(PartitionId, u64)>) -> futures::future::BoxFuture<'static, Result<(), String>>
        + Send
        + Sync,
>;

/// A set of partitions: the share of a tenant-wide job one node does.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PartitionSet(Vec<bool>);

impl PartitionSet {
    pub fn none(partitions: u16) -> Self {
        Self(vec![false; partitions as usize])
    }

    /// Adds `p`; false if it is out of range.
    pub fn insert(&mut self, p: PartitionId) -> bool {
        match self.0.get_mut(p.0 as usize) {
            Some(slot) => {
                *slot = true;
                true
            }
            None => false,
        }
    }

    pub fn contains(&self, p: PartitionId) -> bool {
        self.0.get(p.0 as usize).copied().unwrap_or(false)
    }
}

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
    /// Says why this node may not serve a partition (None: it may). Set by the node to
    /// the cluster's routing; absent (everything served) in a store without a cluster.
    guard: std::sync::OnceLock<PartitionGuard>,
    write_guard: std::sync::OnceLock<PartitionGuard>,
    chunk_hook: std::sync::OnceLock<ChunkHook>,
    remote_reader: std::sync::OnceLock<object::RemoteReader>,
    /// Bumped (under the `buckets` write lock) whenever a bucket is created or deleted:
    /// a cache fill that read the catalog before the change is dropped, so a deleted
    /// incarnation can never be cached after its deletion.
    bucket_epoch: std::sync::atomic::AtomicU64,
    /// Serialises bucket creation and deletion against each other.
    bucket_ddl: Mutex<()>,
    /// Quota enforcement: every write that adds data is admitted here first.
    quotas: crate::tenancy::quota::QuotaGate,
    /// The node's I/O scheduler (object body pieces and request turns).
    io: crate::tenancy::sched::IoScheduler,
    /// Where cold object data lives (none: no cold tier).
    cold: std::sync::OnceLock<Arc<crate::cold::ColdTier>>,
    /// Reads of cold objects counted for the tenants' restore-on-read policies.
    restore: tiering::RestoreOnRead,
    /// Waits until a partition's log, as of the call, is durable on its in-sync
    /// replicas (none without a cluster: a local commit is all there is).
    barrier: std::sync::OnceLock<BarrierHook>,
}

/// A handle on a [`Store`] that does not keep it alive (for callbacks the store holds).
#[derive(Clone)]
pub struct WeakStore(std::sync::Weak<Inner>);

impl WeakStore {
    pub fn upgrade(&self) -> Option<Store> {
        self.0.upgrade().map(|inner| Store { inner })
    }
}

impl Store {
    pub fn downgrade(&self) -> WeakStore {
        WeakStore(Arc::downgrade(&self.inner))
    }

    pub fn new(engine: Engine, catalog: Arc<dyn Catalog>, partitions: u16) -> Self {
        Self {
            inner: Arc::new_cyclic(|me: &std::sync::Weak<Inner>| Inner {
                quotas: crate::tenancy::quota::QuotaGate::new(catalog.clone(), {
                    let me = me.clone();
                    Arc::new(move |tenant| {
                        let me = me.clone();
                        Box::pin(async move {
                            let inner = me.upgrade().ok_or("the store is gone")?;
                            let s = Store { inner };
                            s.tenant_usage_in(tenant, &s.all_partitions())
                                .await
                                .map_err(|e| e.to_string())
                        })
                    })
                }),
                io: crate::tenancy::sched::IoScheduler::new(
                    crate::tenancy::sched::DEFAULT_SLOTS,
                    Some(catalog.clone()),
                ),
                engine,
                catalog,
                partitions,
                buckets: RwLock::new(HashMap::new()),
                guard: std::sync::OnceLock::new(),
                write_guard: std::sync::OnceLock::new(),
                chunk_hook: std::sync::OnceLock::new(),
                remote_reader: std::sync::OnceLock::new(),
                bucket_epoch: Default::default(),
                bucket_ddl: Mutex::new(()),
                cold: std::sync::OnceLock::new(),
                restore: Default::default(),
                barrier: std::sync::OnceLock::new(),
            }),
        }
    }

    pub fn engine(&self) -> &Engine {
        &self.inner.engine
    }

    /// The node's I/O scheduler.
    pub fn io_scheduler(&self) -> &crate::tenancy::sched::IoScheduler {
        &self.inner.io
    }

    /// Waits for a turn of background work (an expiry batch of `records` records) in
    /// the I/O scheduler, at the background weight.
    pub(crate) async fn background_turn(&self, records: usize) {
        let cost = (records as u64).saturating_mul(crate::tenancy::sched::TURN_COST);
        self.inner
            .io
            .turn(crate::tenancy::sched::Class::Background, cost)
            .await;
    }

    /// Background work's place in the I/O scheduler (the mover's reads).
    pub(crate) fn background_io(&self) -> data::Io {
        data::Io {
            sched: self.inner.io.clone(),
            class: crate::tenancy::sched::Class::Background,
            weight: crate::tenancy::sched::DEFAULT_WEIGHT,
            announce: None,
        }
    }

    /// `tenant`'s place in the I/O scheduler.
    pub(crate) async fn io(&self, tenant: TenantId) -> data::Io {
        let class = crate::tenancy::sched::Class::Tenant(tenant);
        data::Io {
            sched: self.inner.io.clone(),
            class,
            weight: self.inner.io.weight(class).await,
            announce: self.inner.chunk_hook.get().cloned(),
        }
    }

    pub fn catalog(&self) -> &Arc<dyn Catalog> {
        &self.inner.catalog
    }

    pub fn partition(&self, tenant: TenantId, container: &str) -> PartitionId {
        PartitionId::of(tenant, container.as_bytes(), self.inner.partitions)
    }

    /// Makes every bucket and namespace access check `guard` first: a request that
    /// reached a node that does not lead its partition is refused, never served from
    /// whatever that node holds. Set once, by the node, before it serves.
    pub fn set_partition_guard(&self, guard: PartitionGuard) {
        let _ = self.inner.guard.set(guard);
    }

    /// Makes every bucket and namespace access of a request that may write (see
    /// [`tracking_partitions`]) check `guard` as well: a partition that cannot take a
    /// write now is refused before anything is written. Set once, by the node.
    pub fn set_write_guard(&self, guard: PartitionGuard) {
        let _ = self.inner.write_guard.set(guard);
    }

    /// Calls `hook` for every chunk file an upload finishes (see [`ChunkHook`]). Set once,
    /// by the node.
    /// Sets how background work that replaces data (a restore from the cold tier)
    /// waits for its write to reach the replicas before it deletes what it replaced.
    /// Set once, by the node, before it serves.
    pub fn set_barrier(&self, hook: BarrierHook) {
        let _ = self.inner.barrier.set(hook);
    }

    pub fn set_chunk_hook(&self, hook: ChunkHook) {
        let _ = self.inner.chunk_hook.set(hook);
    }

    /// Lets copies read a source object whose bucket another node leads (through
    /// `reader`, which asks that node). Set once, by the node.
    pub fn set_remote_reader(&self, reader: object::RemoteReader) {
        let _ = self.inner.remote_reader.set(reader);
    }

    /// The partition of `container`, if this node may serve it.
    pub(crate) fn led_partition(&self, tenant: TenantId, container: &str) -> Result<PartitionId> {
        let p = self.partition(tenant, container);
        if let Some(why) = self.inner.guard.get().and_then(|g| g(p)) {
            return Err(Error::NotPrimary(why));
        }
        let write = SCOPE.try_with(|s| s.write).unwrap_or(false);
        if write && let Some(why) = self.inner.write_guard.get().and_then(|g| g(p)) {
            return Err(Error::NotEnoughReplicas(why));
        }
        let _ = SCOPE.try_with(|s| {
            let mut t = s.touched.borrow_mut();
            if !t.iter().any(|(q, _)| *q == p) {
                t.push((p, self.inner.engine.visible_lsn(p)));
            }
        });
        Ok(p)
    }

    /// The partitions this node may serve (all of them without a guard): background
    /// work changes only these, so a replica never writes what its primary did not.
    pub fn led_partitions(&self) -> PartitionSet {
        let mut set = PartitionSet::none(self.inner.partitions);
        for p in (0..self.inner.partitions).map(PartitionId) {
            if self.inner.guard.get().is_none_or(|g| g(p).is_none()) {
                set.insert(p);
            }
        }
        set
    }

    pub fn all_partitions(&self) -> PartitionSet {
        PartitionSet(vec![true; self.inner.partitions as usize])
    }

    /// Removes chunk files no metadata references any more, once no read uses them.
    pub(crate) fn discard_chunks(&self, chunks: Vec<ChunkRef>) {
        if chunks.is_empty() {
            return;
        }
        let engine = self.inner.engine.clone();
        tokio::spawn(async move {
            // The replicas hold these files too: tell them (through the log) to let go.
            if let Err(e) = engine.log_freed(chunks.clone()).await {
                tracing::warn!(error = %e, "could not log replaced data for the replicas; they keep it until their next start");
            }
            tokio::time::sleep(CHUNK_GRACE).await;
            engine.chunks().remove_when_unused(chunks);
        });
    }

    /// Deletes chunk files that no object or part references: left by a crash between
    /// writing data and committing metadata, or by a stop inside the grace period.
    /// Runs before the node serves, so no write is in flight.
    ///
    /// Never deletes a file a record might reference: if any object or part record
    /// cannot be read (corrupt, or written by a newer format), nothing is deleted and
    /// the outcome names the first such record.
    pub async fn sweep_orphan_chunks(&self) -> Result<SweepOutcome> {
        let chunks = self.inner.engine.chunks().clone();
        // Files of transfers from other nodes that a stop interrupted: never referenced
        // under their temporary names, whatever the records say.
        let c = chunks.clone();
        let temporaries = tokio::task::spawn_blocking(move || c.remove_temporaries(None))
            .await
            .map_err(|e| Error::Invalid(e.to_string()))?
            .map_err(EngineError::from)?;
        if temporaries > 0 {
            tracing::info!(
                files = temporaries,
                "removed chunk files whose transfer from another node an earlier stop interrupted"
            );
        }
        let live = self
            .inner
            .engine
            .read(|txn| {
                let mut live = std::collections::HashSet::new();
                for (table, name) in [(OBJECTS, "objects"), (PARTS, "parts")] {
                    let t = txn.open_table(table).map_err(EngineError::from)?;
                    for entry in t.iter().map_err(EngineError::from)? {
                        let (k, v) = entry.map_err(EngineError::from)?;
                        let refs = if name == "parts" {
                            object::decode_stored::<multipart::PartRecord>("part", v.value())
                                .map(|p| p.chunks)
                        } else {
                            object::decode_stored::<ObjectRecord>("object", v.value())
                                .map(|o| o.data.into_chunks())
                        };
                        match refs {
                            Ok(refs) => live.extend(refs.into_iter().map(|c| c.id)),
                            Err(reason) => {
                                return Ok(Err(SweepOutcome::Aborted {
                                    table: name,
                                    key: hex::encode(k.value()),
                                    reason,
                                }));
                            }
                        }
                    }
                }
                Ok(Ok(live))
            })
            .await?;
        let live = match live {
            Ok(live) => live,
            Err(aborted) => return Ok(aborted),
        };
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
        Ok(SweepOutcome::Removed(removed))
    }
}

/// What the startup orphan sweep did.
#[derive(Debug, PartialEq, Eq)]
pub enum SweepOutcome {
    /// This many unreferenced chunk files were removed.
    Removed(usize),
    /// A record could not be read, so no file was removed: which data it references is
    /// unknown. `key` is the record's engine key in hex.
    Aborted {
        table: &'static str,
        key: String,
        reason: String,
    },
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

/// [`test_store`] with one tenant `t` (default spec) created in its catalog.
#[cfg(test)]
pub(crate) async fn test_store_with_tenant(dir: &std::path::Path) -> (Store, TenantId) {
    let s = test_store(dir).await;
    let t = s
        .catalog()
        .create_tenant("t", &crate::catalog::TenantSpec::default())
        .await
        .expect("tenant")
        .id;
    (s, t)
}

#[cfg(test)]
mod sweep_tests {
    use bytes::Bytes;

    use super::*;
    use crate::engine::record::{NEWEST_RECORD_VERSION, seal};

    async fn put(s: &Store, tenant: TenantId, key: &str, len: usize) {
        let body: ByteStream = Box::pin(futures::stream::iter([Ok(Bytes::from(vec![
            key.len()
                as u8;
            len
        ]))]));
        s.put_object(
            tenant,
            "b",
            key,
            body,
            None,
            ObjectMeta::default(),
            Conditions::default(),
        )
        .await
        .unwrap();
    }

    async fn chunk_count(s: &Store) -> usize {
        let c = s.engine().chunks().clone();
        tokio::task::spawn_blocking(move || c.list_all().unwrap().len())
            .await
            .unwrap()
    }

    /// Replaces the stored record of object `key` with `f(current bytes)`.
    async fn rewrite(s: &Store, tenant: TenantId, key: &str, f: fn(&[u8]) -> Vec<u8>) {
        let b = s.bucket(tenant, "b").await.unwrap();
        let k = crate::engine::keys::object_key(s.partition(tenant, "b"), b.id, key);
        s.engine()
            .write(vec![], move |ctx| {
                let mut t = ctx.txn.open_table(OBJECTS)?;
                let old = t.get(k.as_slice())?.map(|v| v.value().to_vec()).unwrap();
                t.insert(k.as_slice(), f(&old).as_slice())?;
                Ok(())
            })
            .await
            .unwrap();
    }

    /// A chunk file whose transfer from another node a stop interrupted (its temporary
    /// name) goes at the next start, even when a record cannot be read; the chunk it
    /// was a copy of stays.
    #[tokio::test]
    async fn the_sweep_removes_interrupted_transfers() {
        let dir = tempfile::tempdir().unwrap();
        let (s, tenant) = test_store_with_tenant(dir.path()).await;
        s.create_bucket(tenant, "b").await.unwrap();
        put(&s, tenant, "a", 300 * 1024).await;
        let c = s.engine().chunks().clone();
        let live = tokio::task::spawn_blocking(move || c.list_all().unwrap())
            .await
            .unwrap();
        assert_eq!(live.len(), 1);
        let path = s.engine().chunks().path(live[0].partition, live[0].id);
        let mut names = path.file_name().unwrap().to_os_string();
        names.push(format!(".0123{}", crate::engine::chunk::TEMPORARY_SUFFIX));
        let tmp = path.with_file_name(names);
        std::fs::write(&tmp, b"half a transfer").unwrap();
        // An unreadable record stops the orphan sweep, not the removal of temporaries.
        rewrite(&s, tenant, "a", |old| {
            let mut v = old.to_vec();
            let n = v.len();
            v[n - 10] ^= 0x01;
            v
        })
        .await;
        assert!(matches!(
            s.sweep_orphan_chunks().await.unwrap(),
            SweepOutcome::Aborted { .. }
        ));
        assert!(
            !tmp.exists(),
            "the interrupted transfer's file is still there"
        );
        assert!(path.exists(), "the chunk itself went");
        assert_eq!(chunk_count(&s).await, 1);
    }

    /// A bit flip in one record, or a record written by a newer format, must not turn
    /// into the deletion of chunked objects' data: the sweep removes nothing (not even a
    /// true orphan) and says which record it could not read; other objects still read.
    #[tokio::test]
    async fn the_sweep_deletes_nothing_when_a_record_cannot_be_read() {
        let dir = tempfile::tempdir().unwrap();
        let (s, tenant) = test_store_with_tenant(dir.path()).await;
        s.create_bucket(tenant, "b").await.unwrap();
        for k in ["a", "bb", "ccc"] {
            put(&s, tenant, k, 200 * 1024).await;
        }
        // A true orphan: data written, never referenced.
        let p = s.partition(tenant, "b");
        let chunks = s.engine().chunks().clone();
        tokio::task::spawn_blocking(move || {
            let mut w = chunks.create(p).unwrap();
            w.append(b"orphan").unwrap();
            w.finish().unwrap();
        })
        .await
        .unwrap();
        let before = chunk_count(&s).await;
        assert_eq!(before, 4);

        // One flipped bit inside the chunk list (postcard alone would read another id).
        rewrite(&s, tenant, "a", |old| {
            let mut v = old.to_vec();
            let n = v.len();
            v[n - 10] ^= 0x01;
            v
        })
        .await;
        match s.sweep_orphan_chunks().await.unwrap() {
            SweepOutcome::Aborted { table, reason, .. } => {
                assert_eq!(table, "objects");
                assert!(reason.contains("checksum"), "{reason}");
            }
            other => panic!("the sweep went ahead: {other:?}"),
        }
        assert_eq!(chunk_count(&s).await, before, "a chunk file was deleted");

        // A record written by a newer record version.
        rewrite(&s, tenant, "a", |_| {
            let mut v = seal(b"whatever a newer layout holds");
            v[0] = NEWEST_RECORD_VERSION + 1;
            v
        })
        .await;
        match s.sweep_orphan_chunks().await.unwrap() {
            SweepOutcome::Aborted { reason, .. } => {
                assert!(reason.contains("newer"), "{reason}")
            }
            other => panic!("the sweep went ahead: {other:?}"),
        }
        assert_eq!(chunk_count(&s).await, before, "a chunk file was deleted");
        let err = s.head_object(tenant, "b", "a").await.unwrap_err();
        assert!(matches!(err, Error::Corrupt(_)), "{err:?}");
        for k in ["bb", "ccc"] {
            let (rec, _, body) = s
                .get_object(tenant, "b", k, None, &Conditions::default())
                .await
                .unwrap();
            let got: Vec<u8> = futures::StreamExt::collect::<Vec<_>>(body.stream)
                .await
                .into_iter()
                .flat_map(|b| b.unwrap().to_vec())
                .collect();
            assert_eq!(got.len() as u64, rec.size);
            assert!(got.iter().all(|b| *b == k.len() as u8));
        }

        // Once every record reads again (here: the bad one is removed), the sweep
        // goes ahead: the removed object's chunk and the true orphan go.
        let b = s.bucket(tenant, "b").await.unwrap();
        let k = crate::engine::keys::object_key(s.partition(tenant, "b"), b.id, "a");
        s.engine()
            .write(vec![], move |ctx| {
                ctx.txn.open_table(OBJECTS)?.remove(k.as_slice())?;
                Ok(())
            })
            .await
            .unwrap();
        assert_eq!(
            s.sweep_orphan_chunks().await.unwrap(),
            SweepOutcome::Removed(2)
        );
        assert_eq!(chunk_count(&s).await, 2);
    }
}

#[cfg(test)]
mod replication_log_tests {
    use bytes::Bytes;
    use rand::{Rng, SeedableRng};

    use super::kv::KvCondition;
    use super::*;
    use crate::catalog::TenantSpec;

    fn body(len: usize, fill: u8) -> ByteStream {
        Box::pin(futures::stream::iter([Ok(Bytes::from(vec![fill; len]))]))
    }

    /// Every change the model makes reaches the partitions' replication logs: replaying
    /// each partition's log on an empty engine (with the chunk files its entries name,
    /// as a replica receives them) reproduces the partition exactly, log included.
    #[tokio::test]
    async fn replaying_the_logs_reproduces_every_partition() {
        let dir = tempfile::tempdir().unwrap();
        let s = test_store(&dir.path().join("a")).await;
        let t = s
            .catalog()
            .create_tenant("t", &TenantSpec::default())
            .await
            .unwrap()
            .id;
        let buckets = ["b0", "b1", "b2", "gone"];
        for b in buckets {
            s.create_bucket(t, b).await.unwrap();
        }
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        for i in 0..300u32 {
            let ns = format!("ns{}", rng.random_range(0..4));
            let key = format!("k{}", rng.random_range(0..8));
            let b = buckets[rng.random_range(0..3)];
            let fill = (i % 251) as u8;
            match rng.random_range(0..9) {
                0 => {
                    s.kv_put(
                        t,
                        &ns,
                        key.as_bytes(),
                        vec![fill; 10],
                        KvCondition::None,
                        None,
                    )
                    .await
                    .unwrap();
                }
                1 => {
                    let ttl = Some(rng.random_range(1..3));
                    s.kv_put(
                        t,
                        &ns,
                        key.as_bytes(),
                        vec![fill; 3],
                        KvCondition::None,
                        ttl,
                    )
                    .await
                    .unwrap();
                }
                2 => {
                    let _ = s.kv_delete(t, &ns, key.as_bytes(), KvCondition::None).await;
                }
                3 => {
                    let cond = KvCondition::IfVersion(rng.random_range(0..600));
                    let _ = s
                        .kv_put(t, &ns, key.as_bytes(), vec![fill], cond, None)
                        .await;
                }
                4 => {
                    let meta = ObjectMeta::default();
                    s.put_object(
                        t,
                        b,
                        &key,
                        body(100, fill),
                        None,
                        meta,
                        Conditions::default(),
                    )
                    .await
                    .unwrap();
                }
                5 => {
                    let meta = ObjectMeta::default();
                    let len = data::INLINE_MAX + 10;
                    s.put_object(
                        t,
                        b,
                        &key,
                        body(len, fill),
                        None,
                        meta,
                        Conditions::default(),
                    )
                    .await
                    .unwrap();
                }
                6 => {
                    let _ = s.delete_object(t, b, &key).await;
                }
                _ => {
                    let meta = ObjectMeta::default();
                    let u = s.create_upload(t, b, &key, meta).await.unwrap();
                    let part = s
                        .upload_part(t, b, &key, u, 1, body(data::INLINE_MAX + 1, fill), None)
                        .await
                        .unwrap();
                    if rng.random_bool(0.5) {
                        s.complete_upload(
                            t,
                            b,
                            &key,
                            u,
                            vec![(1, part.etag())],
                            Conditions::default(),
                        )
                        .await
                        .unwrap();
                    } else if rng.random_bool(0.5) {
                        s.abort_upload(t, b, &key, u).await.unwrap();
                    }
                }
            }
        }
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        assert!(s.kv_sweep_expired().await.unwrap() > 0, "some TTLs expired");
        s.delete_bucket(t, "gone").await.unwrap();

        let replica = Engine::open(&dir.path().join("b")).unwrap();
        let (from, to) = (s.engine().chunks(), replica.chunks());
        let mut replayed = 0;
        for p in (0..16).map(PartitionId) {
            let last = s.engine().committed_lsn(p);
            let mine = s.engine().partition_digest(p).await.unwrap();
            if last == 0 {
                assert_eq!(mine.0, 0, "partition {p} changed without a log entry");
                continue;
            }
            let entries = s
                .engine()
                .read_log(p, 1, usize::MAX, usize::MAX)
                .await
                .unwrap()
                .expect("the whole log is kept");
            assert_eq!(entries.len() as u64, last);
            assert_eq!(s.engine().log_position(p).await.unwrap().lsn, last);
            // An entry that does not follow the replica's last one is refused.
            if entries.len() > 1 {
                assert!(replica.apply_log(p, entries[1..2].to_vec()).await.is_err());
            }
            for batch in entries.chunks(7) {
                for c in batch.iter().flat_map(|(_, e)| &e.chunks) {
                    let dst = to.path(c.partition, c.id);
                    std::fs::create_dir_all(dst.parent().unwrap()).unwrap();
                    // Replaced data may already be gone on the primary (nothing refers to it).
                    let _ = std::fs::copy(from.path(c.partition, c.id), dst);
                }
                replica.apply_log(p, batch.to_vec()).await.unwrap();
            }
            assert_eq!(replica.committed_lsn(p), last);
            assert_eq!(
                replica.partition_digest(p).await.unwrap(),
                mine,
                "partition {p}"
            );
            replayed += 1;
        }
        assert!(replayed >= 4, "{replayed} partitions replayed");

        // Every object reads the same from the replica: the chunk files its data lives
        // in travelled with the entries that made them reachable.
        let r = Store::new(replica, s.catalog().clone(), 16);
        let read = |st: Store, b: &'static str, k: String| async move {
            use futures::TryStreamExt;
            let (_, _, body) = st
                .get_object(t, b, &k, None, &Conditions::default())
                .await
                .unwrap();
            let pieces: Vec<Bytes> = body.stream.try_collect().await.unwrap();
            pieces.concat()
        };
        let mut objects = 0;
        for b in &buckets[..3] {
            let page = s.list_objects(t, b, "", None, None, 1000).await.unwrap();
            let theirs = r.list_objects(t, b, "", None, None, 1000).await.unwrap();
            assert_eq!(page.objects.len(), theirs.objects.len());
            for (k, _) in &page.objects {
                let a = read(s.clone(), b, k.clone()).await;
                assert_eq!(a, read(r.clone(), b, k.clone()).await, "{b}/{k}");
                objects += 1;
            }
        }
        assert!(objects > 5, "{objects} objects compared");

        // Usage counters: a recount agrees with the primary's, and the replica derived
        // the same ones from the log alone.
        assert_eq!(s.engine().verify_usage().await.unwrap(), vec![]);
        assert_eq!(
            r.engine().usage_rows().await.unwrap(),
            s.engine().usage_rows().await.unwrap()
        );
        assert!(!s.engine().usage_rows().await.unwrap().is_empty());
    }
}

#[cfg(test)]
mod early_shipping_tests {
    use super::kv::KvCondition;
    use super::*;

    /// With early shipping on, what a shipper is offered for any range of a partition's
    /// log is exactly the stored log: from memory for the newest entries, from the table
    /// for older ones; memory stays bounded, and entries a node applies from another
    /// primary are never offered as its own.
    #[tokio::test]
    async fn entries_offered_for_shipping_are_the_stored_log() {
        let dir = tempfile::tempdir().unwrap();
        let (s, t) = test_store_with_tenant(&dir.path().join("a")).await;
        for p in 0..16 {
            s.engine().ship_early(PartitionId(p));
        }
        // Concurrent puts, so group commits hold several writes and partitions.
        let mut tasks = Vec::new();
        for w in 0..8u8 {
            let s = s.clone();
            tasks.push(tokio::spawn(async move {
                for i in 0..40u32 {
                    let ns = format!("ns{}", (u32::from(w) + i) % 3);
                    let key = format!("k{}", i % 5);
                    s.kv_put(
                        t,
                        &ns,
                        key.as_bytes(),
                        vec![w; 8 << 10],
                        KvCondition::None,
                        None,
                    )
                    .await
                    .unwrap();
                }
            }));
        }
        for task in tasks {
            task.await.unwrap();
        }
        let replica = Engine::open(&dir.path().join("b")).unwrap();
        for p in 0..16 {
            replica.ship_early(PartitionId(p));
        }
        let mut trimmed = 0;
        let mut compared = 0;
        for p in (0..16).map(PartitionId) {
            let last = s.engine().committed_lsn(p);
            if last == 0 {
                continue;
            }
            assert_eq!(s.engine().shippable_lsn(p), last, "nothing is under way");
            let stored = s
                .engine()
                .read_log(p, 1, usize::MAX, usize::MAX)
                .await
                .unwrap()
                .unwrap();
            for from in 1..=last {
                let offered = s
                    .engine()
                    .entries_to_ship(p, from, 3, usize::MAX)
                    .await
                    .unwrap()
                    .unwrap();
                let want: Vec<_> = stored
                    .iter()
                    .skip(from as usize - 1)
                    .take(3)
                    .cloned()
                    .collect();
                assert_eq!(offered, want, "partition {p} from {from}");
                compared += 1;
            }
            let newest = stored.last().map(|(_, e)| e.epoch);
            assert_eq!(
                s.engine().recent_epoch(p, last),
                newest,
                "the newest is kept"
            );
            if s.engine().recent_epoch(p, 1).is_none() {
                trimmed += 1;
            }
            // Applied from a primary: stored, and not offered from memory.
            replica.apply_log(p, stored).await.unwrap();
            assert_eq!(replica.committed_lsn(p), last);
            assert_eq!(replica.recent_epoch(p, last), None);
            assert_eq!(replica.shippable_lsn(p), last);
        }
        assert!(compared >= 40, "{compared} ranges compared");
        assert!(trimmed >= 1, "no partition's kept entries were trimmed");
    }
}

#[cfg(test)]
mod usage_tests {
    use bytes::Bytes;

    use super::kv::KvCondition;
    use super::*;
    use crate::catalog::TenantSpec;
    use crate::engine::usage::Counters;

    fn body(len: usize) -> ByteStream {
        Box::pin(futures::stream::iter([Ok(Bytes::from(vec![7u8; len]))]))
    }

    async fn usage(s: &Store, t: TenantId) -> bucket::Usage {
        s.tenant_usage_in(t, &s.all_partitions()).await.unwrap()
    }

    /// Every kind of write moves the counters by exactly what it stores or frees: parts
    /// of uploads in progress count, complete turns them into object bytes, abort, delete,
    /// overwrite and TTL expiry give back; KV counts namespace, key and value.
    #[tokio::test]
    async fn every_write_moves_the_counters_by_what_it_stores() {
        let dir = tempfile::tempdir().unwrap();
        let s = test_store(dir.path()).await;
        let t = s
            .catalog()
            .create_tenant("t", &TenantSpec::default())
            .await
            .unwrap()
            .id;
        let other = s
            .catalog()
            .create_tenant("o", &TenantSpec::default())
            .await
            .unwrap()
            .id;
        s.create_bucket(t, "b").await.unwrap();
        s.create_bucket(other, "b").await.unwrap();
        assert_eq!(usage(&s, t).await.buckets, 1);

        // A part of an upload in progress counts before the upload completes.
        let big = multipart::MIN_PART_SIZE as usize * 3 / 2;
        let small = multipart::MIN_PART_SIZE as usize;
        let u = s
            .create_upload(t, "b", "mp", ObjectMeta::default())
            .await
            .unwrap();
        s.upload_part(t, "b", "mp", u, 1, body(big), None)
            .await
            .unwrap();
        let got = usage(&s, t).await;
        assert_eq!(
            (
                got.multipart_uploads,
                got.multipart_bytes,
                got.storage_bytes
            ),
            (1, big as u64, big as u64)
        );
        // Replacing the part counts the new one only.
        let p1 = s
            .upload_part(t, "b", "mp", u, 1, body(small), None)
            .await
            .unwrap();
        let p2 = s
            .upload_part(t, "b", "mp", u, 2, body(10), None)
            .await
            .unwrap();
        assert_eq!(usage(&s, t).await.multipart_bytes, (small + 10) as u64);
        s.complete_upload(
            t,
            "b",
            "mp",
            u,
            vec![(1, p1.etag()), (2, p2.etag())],
            Conditions::default(),
        )
        .await
        .unwrap();
        let got = usage(&s, t).await;
        assert_eq!(
            (
                got.objects,
                got.object_bytes,
                got.multipart_uploads,
                got.multipart_bytes
            ),
            (1, (small + 10) as u64, 0, 0)
        );
        // An aborted upload gives its parts back.
        let u2 = s
            .create_upload(t, "b", "x", ObjectMeta::default())
            .await
            .unwrap();
        s.upload_part(t, "b", "x", u2, 1, body(1000), None)
            .await
            .unwrap();
        assert_eq!(usage(&s, t).await.multipart_bytes, 1000);
        s.abort_upload(t, "b", "x", u2).await.unwrap();
        assert_eq!(usage(&s, t).await.multipart_bytes, 0);

        // Overwrites count the new size; deletes give back.
        for (len, objects, bytes) in [
            (100, 2, small + 110),
            (40, 2, small + 50),
            (big, 2, small + 10 + big),
        ] {
            s.put_object(
                t,
                "b",
                "o",
                body(len),
                None,
                ObjectMeta::default(),
                Conditions::default(),
            )
            .await
            .unwrap();
            let got = usage(&s, t).await;
            assert_eq!((got.objects, got.object_bytes), (objects, bytes as u64));
        }
        s.delete_object(t, "b", "o").await.unwrap();
        s.delete_object(t, "b", "mp").await.unwrap();
        let got = usage(&s, t).await;
        assert_eq!((got.objects, got.object_bytes), (0, 0));

        // KV: namespace, key and value; overwrite, delete and expiry give back.
        s.kv_put(t, "ns", b"key", vec![1; 100], KvCondition::None, None)
            .await
            .unwrap();
        s.kv_put(t, "ns", b"k2", vec![1; 10], KvCondition::None, Some(1))
            .await
            .unwrap();
        let got = usage(&s, t).await;
        assert_eq!(
            (got.kv_keys, got.kv_bytes),
            (2, (2 + 3 + 100) + (2 + 2 + 10))
        );
        s.kv_put(t, "ns", b"key", vec![1; 5], KvCondition::None, None)
            .await
            .unwrap();
        assert_eq!(usage(&s, t).await.kv_bytes, (2 + 3 + 5) + (2 + 2 + 10));
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        assert_eq!(s.kv_sweep_expired().await.unwrap(), 1);
        let got = usage(&s, t).await;
        assert_eq!((got.kv_keys, got.kv_bytes), (1, 2 + 3 + 5));
        assert_eq!(got.storage_bytes, got.kv_bytes);
        s.kv_delete(t, "ns", b"key", KvCondition::None)
            .await
            .unwrap();
        assert_eq!(usage(&s, t).await.kv_keys, 0);

        // The other tenant saw none of it.
        assert_eq!(
            usage(&s, other).await,
            bucket::Usage {
                buckets: 1,
                ..Default::default()
            }
        );
        assert_eq!(s.engine().verify_usage().await.unwrap(), vec![]);
    }

    /// A store whose counters are missing (written before they existed) gets them at
    /// open, equal to what the writes left.
    #[tokio::test]
    async fn counters_are_rebuilt_at_open_when_missing() {
        let dir = tempfile::tempdir().unwrap();
        let s = test_store(dir.path()).await;
        let t = s
            .catalog()
            .create_tenant("t", &TenantSpec::default())
            .await
            .unwrap()
            .id;
        s.create_bucket(t, "b").await.unwrap();
        for i in 0..20 {
            s.put_object(
                t,
                "b",
                &format!("o{i}"),
                body(i * 1000),
                None,
                ObjectMeta::default(),
                Conditions::default(),
            )
            .await
            .unwrap();
            s.kv_put(
                t,
                "ns",
                format!("k{i}").as_bytes(),
                vec![0; i],
                KvCondition::None,
                None,
            )
            .await
            .unwrap();
        }
        let before = s.engine().usage_rows().await.unwrap();
        let total: Counters = before.iter().fold(Counters::default(), |mut a, (_, c)| {
            a += *c;
            a
        });
        assert_eq!((total.objects, total.kv_keys), (20, 20));
        s.engine().shutdown().await;
        drop(s);
        {
            let db = redb::Database::create(dir.path().join("meta.redb")).unwrap();
            let txn = db.begin_write().unwrap();
            txn.delete_table(crate::engine::usage::USAGE).unwrap();
            txn.open_table(crate::engine::META)
                .unwrap()
                .remove("usage_version")
                .unwrap();
            txn.commit().unwrap();
        }
        let e = Engine::open(dir.path()).unwrap();
        assert_eq!(e.usage_rows().await.unwrap(), before);
        assert_eq!(e.verify_usage().await.unwrap(), vec![]);

        // A binary without counters (a rollback) writes a partition: its log position
        // moves, the counters' does not, and the next open counts again.
        e.shutdown().await;
        drop(e);
        {
            let db = redb::Database::create(dir.path().join("meta.redb")).unwrap();
            let txn = db.begin_write().unwrap();
            let mut objects = txn.open_table(crate::engine::OBJECTS).unwrap();
            let (first, v) = {
                let mut it = objects.iter().unwrap();
                let (k, v) = it.next().unwrap().unwrap();
                (k.value().to_vec(), v.value().to_vec())
            };
            let mut k = first.clone();
            k.extend_from_slice(b"-written-by-an-old-binary");
            objects.insert(k.as_slice(), v.as_slice()).unwrap();
            drop(objects);
            let mut lsn = txn.open_table(crate::engine::replog::PART_LSN).unwrap();
            let p = &first[..2];
            let at = lsn.get(p).unwrap().map(|v| v.value()).unwrap();
            lsn.insert(p, at + 1).unwrap();
            drop(lsn);
            txn.commit().unwrap();
        }
        let e = Engine::open(dir.path()).unwrap();
        assert_eq!(e.verify_usage().await.unwrap(), vec![]);
        let total = |rows: &[(Vec<u8>, Counters)]| rows.iter().fold(0, |a, (_, c)| a + c.objects);
        assert_eq!(total(&e.usage_rows().await.unwrap()), total(&before) + 1);
    }
}
