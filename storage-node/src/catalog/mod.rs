//! The catalog: tenants, access keys, buckets, nodes and the versions of the partition
//! layout.
//!
//! One trait, [`Catalog`], and one implementation over sqlx's `Any` driver that runs on
//! Postgres (production, shared by every node) and SQLite (the embedded default). The
//! same test suite runs against both (`tests/catalog.rs`).

pub mod seal;

use std::str::FromStr;
use std::time::Duration;

use async_trait::async_trait;
use rand::Rng;
use serde::{Deserialize, Serialize};
use sqlx::any::{AnyPoolOptions, AnyRow};
use sqlx::{AnyPool, Row};

pub use seal::MasterKey;

use crate::types::{BucketId, Epoch, NodeId, PartitionId, TenantId, now_millis};

#[derive(Debug, thiserror::Error)]
pub enum CatalogError {
    #[error("{0} already exists")]
    Conflict(String),
    #[error("{0} not found")]
    NotFound(String),
    #[error("catalog database: {0}")]
    Db(#[from] sqlx::Error),
    #[error("catalog migration: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    #[error("catalog record is corrupt: {0}")]
    Corrupt(String),
    #[error("invalid catalog change: {0}")]
    Invalid(String),
}

pub type Result<T, E = CatalogError> = std::result::Result<T, E>;

/// Everything a tenant is configured with. Stored as JSON so new policy fields need no
/// schema migration; enforcement lives in `tenancy/`.
///
/// Read leniently: a stored spec may carry fields this version does not know (written
/// through a newer node during a rolling upgrade, or before a rollback), and they are
/// ignored rather than making the tenant unreadable. Input through the admin API is
/// strict instead ([`TenantSpec::from_input`]): an unknown field there is a typo.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct TenantSpec {
    #[serde(default)]
    pub quotas: Quotas,
    #[serde(default)]
    pub qos: Qos,
    #[serde(default)]
    pub placement: Placement,
    #[serde(default)]
    pub tiering: Tiering,
    /// Every access key of a suspended tenant is refused (as if unknown); its buckets,
    /// keys and data stay. The operator suspends the tenants of a namespace that loses
    /// its permission to use the cluster.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub suspended: bool,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Quotas {
    pub storage_bytes: Option<u64>,
    pub objects: Option<u64>,
    pub buckets: Option<u64>,
    pub kv_keys: Option<u64>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Qos {
    pub weight: Option<u32>,
    pub requests_per_second: Option<u64>,
    pub bandwidth_bytes_per_second: Option<u64>,
    pub max_concurrent_requests: Option<u32>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Placement {
    #[serde(default)]
    pub zones: Vec<String>,
    pub replication_factor: Option<u8>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Tiering {
    pub cold_after_seconds: Option<u64>,
    pub min_object_size: Option<u64>,
    /// Restore on read: a cold object read this many times (on its partition's
    /// primary, since it went cold or the node started) is brought back to the hot
    /// tier by the mover. None: cold objects stay cold until overwritten.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub restore_after_reads: Option<u32>,
    /// The policy covers only these buckets (empty or null: all the tenant's buckets).
    #[serde(
        default,
        skip_serializing_if = "Vec::is_empty",
        deserialize_with = "null_as_default"
    )]
    pub buckets: Vec<String>,
    /// The policy covers only keys starting with this (empty or null: every key).
    #[serde(
        default,
        skip_serializing_if = "String::is_empty",
        deserialize_with = "null_as_default"
    )]
    pub prefix: String,
}

impl TenantSpec {
    /// Parses a spec given through the API, refusing fields this version does not know
    /// (named with their path, as `qos.weigth`), which reading from the catalog ignores.
    pub fn from_input(v: serde_json::Value) -> std::result::Result<Self, String> {
        let mut unknown = Vec::new();
        let spec: Self = serde_ignored::deserialize(v, |path| unknown.push(path.to_string()))
            .map_err(|e| e.to_string())?;
        match unknown.as_slice() {
            [] => Ok(spec),
            [field] => Err(format!("unknown field `{field}`")),
            fields => Err(format!("unknown fields `{}`", fields.join("`, `"))),
        }
    }
}

/// A field given as `null` takes its default, as an absent one does.
fn null_as_default<'de, D, T>(d: D) -> std::result::Result<T, D::Error>
where
    D: serde::Deserializer<'de>,
    T: Default + Deserialize<'de>,
{
    Ok(Option::<T>::deserialize(d)?.unwrap_or_default())
}

#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Tenant {
    pub id: TenantId,
    pub name: String,
    pub spec: TenantSpec,
    pub created_at: i64,
    pub updated_at: i64,
}

#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct AccessKey {
    pub access_key_id: String,
    pub tenant_id: TenantId,
    pub description: String,
    pub created_at: i64,
    pub revoked_at: Option<i64>,
}

/// An access key together with its secret; only ever returned at creation and to auth.
#[derive(Clone)]
pub struct Credentials {
    pub access_key_id: String,
    pub secret_access_key: String,
    pub tenant_id: TenantId,
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Credentials")
            .field("access_key_id", &self.access_key_id)
            .field("tenant_id", &self.tenant_id)
            .finish_non_exhaustive()
    }
}

#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Bucket {
    pub tenant_id: TenantId,
    pub name: String,
    pub id: BucketId,
    pub created_at: i64,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct NodeRecord {
    pub id: NodeId,
    pub region: String,
    pub zone: String,
    pub s3_addr: String,
    pub kv_addr: String,
    pub admin_addr: String,
    pub rpc_addr: String,
    /// The last heartbeat, in the catalog's clock (Unix milliseconds).
    pub heartbeat_at: i64,
    /// Relative weight in partition placement (for example GiB of data volume).
    pub capacity: u64,
}

/// One stored version of the partition layout (its body is `cluster::layout::Layout`
/// as JSON; the catalog does not interpret it).
#[derive(Clone, Debug, PartialEq)]
pub struct StoredLayout {
    pub version: u64,
    pub body: String,
}

/// Who leads a partition, under which epoch, and which replicas hold every acknowledged
/// write (the primary included).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PartitionState {
    pub partition: PartitionId,
    pub epoch: Epoch,
    pub primary: NodeId,
    pub in_sync: Vec<NodeId>,
}

/// Postgres channel on which a new layout version is announced.
pub const LAYOUT_CHANNEL: &str = "granary_layout";

#[async_trait]
pub trait Catalog: Send + Sync + 'static {
    async fn create_tenant(&self, name: &str, spec: &TenantSpec) -> Result<Tenant>;
    async fn tenant_by_name(&self, name: &str) -> Result<Option<Tenant>>;
    async fn tenant_by_id(&self, id: TenantId) -> Result<Option<Tenant>>;
    async fn list_tenants(&self) -> Result<Vec<Tenant>>;
    async fn update_tenant(&self, name: &str, spec: &TenantSpec) -> Result<Tenant>;
    /// Suspends a tenant (or ends its suspension) and changes nothing else of its stored
    /// spec, not even fields this version does not know (which a read, change and
    /// [`Catalog::update_tenant`] would drop).
    async fn set_suspended(&self, name: &str, suspended: bool) -> Result<Tenant> {
        let mut t = self
            .tenant_by_name(name)
            .await?
            .ok_or_else(|| CatalogError::NotFound(format!("tenant {name:?}")))?;
        t.spec.suspended = suspended;
        self.update_tenant(name, &t.spec).await
    }
    /// Removes the tenant, its keys and its bucket records (not the data in the engine).
    async fn delete_tenant(&self, id: TenantId) -> Result<()>;

    /// Issues a new key; the secret is returned once and stored sealed.
    async fn create_access_key(&self, tenant: TenantId, description: &str) -> Result<Credentials>;
    async fn list_access_keys(&self, tenant: TenantId) -> Result<Vec<AccessKey>>;
    /// Returns false when the key does not exist, belongs to another tenant or was revoked.
    async fn revoke_access_key(&self, tenant: TenantId, access_key_id: &str) -> Result<bool>;
    /// The live (not revoked) key with its secret, for request authentication.
    async fn lookup_access_key(&self, access_key_id: &str) -> Result<Option<Credentials>>;

    async fn create_bucket(&self, tenant: TenantId, name: &str) -> Result<Bucket>;
    async fn bucket(&self, tenant: TenantId, name: &str) -> Result<Option<Bucket>>;
    async fn list_buckets(&self, tenant: TenantId) -> Result<Vec<Bucket>>;
    async fn delete_bucket(&self, tenant: TenantId, id: BucketId) -> Result<()>;
    /// A bucket setting of `kind` (a JSON document), if set.
    async fn bucket_setting(&self, bucket: BucketId, kind: &str) -> Result<Option<String>>;
    /// Sets (`Some`) or removes (`None`) a bucket setting of `kind`.
    async fn set_bucket_setting(
        &self,
        bucket: BucketId,
        kind: &str,
        value: Option<&str>,
    ) -> Result<()>;

    async fn upsert_node(&self, node: &NodeRecord) -> Result<()>;
    async fn list_nodes(&self) -> Result<Vec<NodeRecord>>;
    /// Records a heartbeat of `id` at the catalog's clock; false if `id` is not registered.
    async fn heartbeat(&self, id: &NodeId) -> Result<bool>;
    /// The catalog's clock, Unix milliseconds: the one clock heartbeats are judged by, so
    /// the nodes' clocks may drift apart without anyone being declared failed.
    async fn now_millis(&self) -> Result<i64>;
    /// The highest layout version, if any.
    async fn latest_layout(&self) -> Result<Option<StoredLayout>>;
    /// Just the number of [`Catalog::latest_layout`], for cheap polling.
    async fn latest_layout_version(&self) -> Result<Option<u64>>;
    /// Stores `layout` if its version is still free; false when another node stored
    /// that version first. Announces it on [`LAYOUT_CHANNEL`] (Postgres).
    async fn insert_layout(&self, layout: &StoredLayout, partitions: u16) -> Result<bool>;
    /// Every partition's replication state that has been set.
    async fn partition_states(&self) -> Result<Vec<PartitionState>>;
    /// Installs `next` if the partition's stored epoch is still `expected` (None: no state
    /// yet) and `next` takes the following epoch; false when another change won. This
    /// compare-and-set is the only way a partition changes hands.
    async fn cas_partition_state(
        &self,
        expected: Option<Epoch>,
        next: &PartitionState,
    ) -> Result<bool>;
    /// Stores the first state (epoch 1) of every partition in `initial` that has none yet,
    /// in one transaction; partitions already set keep theirs. Returns how many were set.
    async fn init_partition_states(&self, initial: &[PartitionState]) -> Result<u64>;

    /// Returns the stored value of a cluster setting, storing `default` first if absent.
    async fn setting_or_init(&self, key: &str, default: &str) -> Result<String>;
}

/// Which SQL dialect a URL points at.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Backend {
    Postgres,
    Sqlite,
}

impl Backend {
    pub fn of_url(url: &str) -> Option<Self> {
        if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            Some(Backend::Postgres)
        } else if url.starts_with("sqlite:") {
            Some(Backend::Sqlite)
        } else {
            None
        }
    }
}

pub struct SqlCatalog {
    pool: AnyPool,
    backend: Backend,
    master: MasterKey,
}

impl std::fmt::Debug for SqlCatalog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SqlCatalog")
            .field("backend", &self.backend)
            .finish_non_exhaustive()
    }
}

/// The directory of the database file of a `sqlite:PATH[?query]` URL (None for an
/// in-memory database).
fn sqlite_dir(url: &str) -> Option<std::path::PathBuf> {
    let path = url.strip_prefix("sqlite:")?;
    let path = path.split('?').next().unwrap_or(path);
    let path = path.strip_prefix("//").unwrap_or(path);
    if path.is_empty() || path.contains(":memory:") || url.contains("mode=memory") {
        return None;
    }
    Some(crate::engine::dirs::parent_of(std::path::Path::new(path)))
}

impl SqlCatalog {
    /// Connects and brings the schema up to date. `url` is `postgres://...` or
    /// `sqlite:PATH` (created if missing). It is never logged: it may hold a password.
    pub async fn connect(url: &str, master: MasterKey) -> Result<Self> {
        sqlx::any::install_default_drivers();
        let backend = Backend::of_url(url).ok_or_else(|| {
            CatalogError::Corrupt("catalog URL must start with postgres:// or sqlite:".into())
        })?;
        let url = match backend {
            Backend::Sqlite if !url.contains("mode=") => {
                format!("{url}{}mode=rwc", if url.contains('?') { "&" } else { "?" })
            }
            _ => url.to_string(),
        };
        let mut opts = AnyPoolOptions::new().acquire_timeout(Duration::from_secs(10));
        opts = match backend {
            // SQLite allows one writer; one connection avoids SQLITE_BUSY between our own tasks.
            // synchronous=FULL (SQLite's default, pinned here for every connection the
            // pool opens): in WAL mode each commit fsyncs the WAL before it returns, so an
            // acknowledged catalog change survives a power cut; NORMAL would not.
            Backend::Sqlite => opts.max_connections(1).after_connect(|conn, _| {
                Box::pin(async move {
                    sqlx::Executor::execute(conn, "PRAGMA synchronous = FULL").await?;
                    Ok(())
                })
            }),
            Backend::Postgres => opts.max_connections(8),
        };
        let pool = opts.connect(&url).await?;
        match backend {
            Backend::Sqlite => {
                sqlx::query("PRAGMA foreign_keys = ON")
                    .execute(&pool)
                    .await?;
                sqlx::query("PRAGMA journal_mode = WAL")
                    .execute(&pool)
                    .await?;
                sqlx::migrate!("./migrations/sqlite").run(&pool).await?;
                // SQLite fsyncs the directory when it creates the WAL, which makes the
                // database file's name durable too; syncing the directory here once
                // does not depend on that detail.
                if let Some(dir) = sqlite_dir(&url) {
                    crate::engine::dirs::sync_dir(&dir).map_err(sqlx::Error::Io)?;
                }
            }
            Backend::Postgres => sqlx::migrate!("./migrations/postgres").run(&pool).await?,
        }
        Ok(Self {
            pool,
            backend,
            master,
        })
    }

    pub fn backend(&self) -> Backend {
        self.backend
    }

    /// SQL for the database's clock in Unix milliseconds.
    fn now_sql(&self) -> &'static str {
        match self.backend {
            Backend::Postgres => "CAST(EXTRACT(EPOCH FROM clock_timestamp()) * 1000 AS BIGINT)",
            Backend::Sqlite => "CAST((julianday('now') - 2440587.5) * 86400000.0 AS INTEGER)",
        }
    }

    pub async fn close(&self) {
        self.pool.close().await;
    }
}

fn is_unique_violation(e: &sqlx::Error) -> bool {
    match e {
        sqlx::Error::Database(d) => {
            d.is_unique_violation()
                || d.message().contains("UNIQUE constraint")
                || d.code().as_deref() == Some("23505")
        }
        _ => false,
    }
}

fn parse_id<T: FromStr>(s: &str) -> Result<T> {
    s.parse()
        .map_err(|_| CatalogError::Corrupt(format!("bad id {s:?}")))
}

fn tenant_from_row(r: &AnyRow) -> Result<Tenant> {
    let spec: String = r.try_get("spec")?;
    Ok(Tenant {
        id: parse_id(&r.try_get::<String, _>("id")?)?,
        name: r.try_get("name")?,
        spec: serde_json::from_str(&spec).map_err(|e| CatalogError::Corrupt(e.to_string()))?,
        created_at: r.try_get("created_at")?,
        updated_at: r.try_get("updated_at")?,
    })
}

fn bucket_from_row(r: &AnyRow) -> Result<Bucket> {
    Ok(Bucket {
        tenant_id: parse_id(&r.try_get::<String, _>("tenant_id")?)?,
        name: r.try_get("name")?,
        id: parse_id(&r.try_get::<String, _>("id")?)?,
        created_at: r.try_get("created_at")?,
    })
}

fn random_string(alphabet: &[u8], n: usize) -> String {
    let mut rng = rand::rng();
    (0..n)
        .map(|_| alphabet[rng.random_range(0..alphabet.len())] as char)
        .collect()
}

macro_rules! select_tenants {
    ($tail:literal) => {
        concat!(
            "SELECT id, name, spec, created_at, updated_at FROM tenants ",
            $tail
        )
    };
}

#[async_trait]
impl Catalog for SqlCatalog {
    async fn create_tenant(&self, name: &str, spec: &TenantSpec) -> Result<Tenant> {
        let now = now_millis();
        let t = Tenant {
            id: TenantId::random(),
            name: name.to_string(),
            spec: spec.clone(),
            created_at: now,
            updated_at: now,
        };
        let spec_json =
            serde_json::to_string(spec).map_err(|e| CatalogError::Corrupt(e.to_string()))?;
        sqlx::query("INSERT INTO tenants (id, name, spec, created_at, updated_at) VALUES ($1, $2, $3, $4, $5)")
            .bind(t.id.to_string())
            .bind(name)
            .bind(spec_json)
            .bind(now)
            .bind(now)
            .execute(&self.pool)
            .await
            .map_err(|e| if is_unique_violation(&e) { CatalogError::Conflict(format!("tenant {name:?}")) } else { e.into() })?;
        Ok(t)
    }

    async fn tenant_by_name(&self, name: &str) -> Result<Option<Tenant>> {
        let row = sqlx::query(select_tenants!("WHERE name = $1"))
            .bind(name)
            .fetch_optional(&self.pool)
            .await?;
        row.as_ref().map(tenant_from_row).transpose()
    }

    async fn tenant_by_id(&self, id: TenantId) -> Result<Option<Tenant>> {
        let row = sqlx::query(select_tenants!("WHERE id = $1"))
            .bind(id.to_string())
            .fetch_optional(&self.pool)
            .await?;
        row.as_ref().map(tenant_from_row).transpose()
    }

    async fn list_tenants(&self) -> Result<Vec<Tenant>> {
        let rows = sqlx::query(select_tenants!("ORDER BY name"))
            .fetch_all(&self.pool)
            .await?;
        rows.iter().map(tenant_from_row).collect()
    }

    async fn update_tenant(&self, name: &str, spec: &TenantSpec) -> Result<Tenant> {
        let spec_json =
            serde_json::to_string(spec).map_err(|e| CatalogError::Corrupt(e.to_string()))?;
        let done = sqlx::query("UPDATE tenants SET spec = $1, updated_at = $2 WHERE name = $3")
            .bind(spec_json)
            .bind(now_millis())
            .bind(name)
            .execute(&self.pool)
            .await?;
        if done.rows_affected() == 0 {
            return Err(CatalogError::NotFound(format!("tenant {name:?}")));
        }
        self.tenant_by_name(name)
            .await?
            .ok_or_else(|| CatalogError::NotFound(format!("tenant {name:?}")))
    }

    async fn set_suspended(&self, name: &str, suspended: bool) -> Result<Tenant> {
        // The stored JSON is changed in place and written back only if nobody changed it
        // meanwhile (compare and set on the whole spec), so fields a newer node wrote
        // stay.
        for _ in 0..8 {
            let row = sqlx::query("SELECT spec FROM tenants WHERE name = $1")
                .bind(name)
                .fetch_optional(&self.pool)
                .await?
                .ok_or_else(|| CatalogError::NotFound(format!("tenant {name:?}")))?;
            let old: String = row.try_get("spec")?;
            let mut spec: serde_json::Value =
                serde_json::from_str(&old).map_err(|e| CatalogError::Corrupt(e.to_string()))?;
            let fields = spec.as_object_mut().ok_or_else(|| {
                CatalogError::Corrupt(format!("tenant {name:?}: the spec is not an object"))
            })?;
            // As the spec is serialized: `suspended` only when true.
            if suspended {
                fields.insert("suspended".into(), serde_json::Value::Bool(true));
            } else {
                fields.remove("suspended");
            }
            let done = sqlx::query(
                "UPDATE tenants SET spec = $1, updated_at = $2 WHERE name = $3 AND spec = $4",
            )
            .bind(spec.to_string())
            .bind(now_millis())
            .bind(name)
            .bind(&old)
            .execute(&self.pool)
            .await?;
            if done.rows_affected() == 1 {
                return self
                    .tenant_by_name(name)
                    .await?
                    .ok_or_else(|| CatalogError::NotFound(format!("tenant {name:?}")));
            }
        }
        Err(CatalogError::Invalid(format!(
            "tenant {name:?} kept changing while being suspended; try again"
        )))
    }

    async fn delete_tenant(&self, id: TenantId) -> Result<()> {
        let mut tx = self.pool.begin().await?;
        for sql in [
            "DELETE FROM access_keys WHERE tenant_id = $1",
            "DELETE FROM buckets WHERE tenant_id = $1",
            "DELETE FROM tenants WHERE id = $1",
        ] {
            sqlx::query(sql)
                .bind(id.to_string())
                .execute(&mut *tx)
                .await?;
        }
        tx.commit().await?;
        Ok(())
    }

    async fn create_access_key(&self, tenant: TenantId, description: &str) -> Result<Credentials> {
        let access_key_id = format!(
            "GK{}",
            random_string(b"ABCDEFGHIJKLMNOPQRSTUVWXYZ234567", 20)
        );
        let secret = random_string(
            b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/",
            40,
        );
        let sealed = self.master.seal(&secret, &access_key_id);
        sqlx::query(
            "INSERT INTO access_keys (access_key_id, tenant_id, secret_sealed, description, created_at) \
             VALUES ($1, $2, $3, $4, $5)",
        )
        .bind(&access_key_id)
        .bind(tenant.to_string())
        .bind(sealed)
        .bind(description)
        .bind(now_millis())
        .execute(&self.pool)
        .await?;
        Ok(Credentials {
            access_key_id,
            secret_access_key: secret,
            tenant_id: tenant,
        })
    }

    async fn list_access_keys(&self, tenant: TenantId) -> Result<Vec<AccessKey>> {
        let rows = sqlx::query(
            "SELECT access_key_id, tenant_id, description, created_at, revoked_at FROM access_keys \
             WHERE tenant_id = $1 ORDER BY created_at, access_key_id",
        )
        .bind(tenant.to_string())
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|r| {
                Ok(AccessKey {
                    access_key_id: r.try_get("access_key_id")?,
                    tenant_id: parse_id(&r.try_get::<String, _>("tenant_id")?)?,
                    description: r.try_get("description")?,
                    created_at: r.try_get("created_at")?,
                    revoked_at: r.try_get("revoked_at")?,
                })
            })
            .collect()
    }

    async fn revoke_access_key(&self, tenant: TenantId, access_key_id: &str) -> Result<bool> {
        let done = sqlx::query(
            "UPDATE access_keys SET revoked_at = $1 WHERE access_key_id = $2 AND tenant_id = $3 AND revoked_at IS NULL",
        )
        .bind(now_millis())
        .bind(access_key_id)
        .bind(tenant.to_string())
        .execute(&self.pool)
        .await?;
        Ok(done.rows_affected() == 1)
    }

    async fn lookup_access_key(&self, access_key_id: &str) -> Result<Option<Credentials>> {
        let row = sqlx::query(
            "SELECT k.tenant_id, k.secret_sealed, t.spec FROM access_keys k \
             JOIN tenants t ON t.id = k.tenant_id \
             WHERE k.access_key_id = $1 AND k.revoked_at IS NULL",
        )
        .bind(access_key_id)
        .fetch_optional(&self.pool)
        .await?;
        let Some(row) = row else { return Ok(None) };
        // Only the flag is read, leniently: a spec with fields this version does not know
        // (written by a newer node during a rolling upgrade) must not lock its keys out.
        let spec: serde_json::Value =
            serde_json::from_str(&row.try_get::<String, _>("spec")?).unwrap_or_default();
        if spec.get("suspended").and_then(serde_json::Value::as_bool) == Some(true) {
            return Ok(None);
        }
        let sealed: String = row.try_get("secret_sealed")?;
        let secret = self
            .master
            .open(&sealed, access_key_id)
            .map_err(|e| CatalogError::Corrupt(format!("access key {access_key_id}: {e}")))?;
        Ok(Some(Credentials {
            access_key_id: access_key_id.to_string(),
            secret_access_key: secret,
            tenant_id: parse_id(&row.try_get::<String, _>("tenant_id")?)?,
        }))
    }

    async fn create_bucket(&self, tenant: TenantId, name: &str) -> Result<Bucket> {
        let b = Bucket {
            tenant_id: tenant,
            name: name.to_string(),
            id: BucketId::random(),
            created_at: now_millis(),
        };
        sqlx::query(
            "INSERT INTO buckets (tenant_id, name, id, created_at) VALUES ($1, $2, $3, $4)",
        )
        .bind(tenant.to_string())
        .bind(name)
        .bind(b.id.to_string())
        .bind(b.created_at)
        .execute(&self.pool)
        .await
        .map_err(|e| {
            if is_unique_violation(&e) {
                CatalogError::Conflict(format!("bucket {name:?}"))
            } else {
                e.into()
            }
        })?;
        Ok(b)
    }

    async fn bucket(&self, tenant: TenantId, name: &str) -> Result<Option<Bucket>> {
        let row = sqlx::query("SELECT tenant_id, name, id, created_at FROM buckets WHERE tenant_id = $1 AND name = $2")
            .bind(tenant.to_string())
            .bind(name)
            .fetch_optional(&self.pool)
            .await?;
        row.as_ref().map(bucket_from_row).transpose()
    }

    async fn list_buckets(&self, tenant: TenantId) -> Result<Vec<Bucket>> {
        let rows = sqlx::query("SELECT tenant_id, name, id, created_at FROM buckets WHERE tenant_id = $1 ORDER BY name")
            .bind(tenant.to_string())
            .fetch_all(&self.pool)
            .await?;
        rows.iter().map(bucket_from_row).collect()
    }

    async fn bucket_setting(&self, bucket: BucketId, kind: &str) -> Result<Option<String>> {
        let row =
            sqlx::query("SELECT value FROM bucket_settings WHERE bucket_id = $1 AND kind = $2")
                .bind(bucket.to_string())
                .bind(kind)
                .fetch_optional(&self.pool)
                .await?;
        Ok(row.map(|r| r.try_get::<String, _>("value")).transpose()?)
    }

    async fn set_bucket_setting(
        &self,
        bucket: BucketId,
        kind: &str,
        value: Option<&str>,
    ) -> Result<()> {
        match value {
            Some(v) => {
                sqlx::query(
                    "INSERT INTO bucket_settings (bucket_id, kind, value) VALUES ($1, $2, $3) \
                     ON CONFLICT (bucket_id, kind) DO UPDATE SET value = excluded.value",
                )
                .bind(bucket.to_string())
                .bind(kind)
                .bind(v)
                .execute(&self.pool)
                .await?;
            }
            None => {
                sqlx::query("DELETE FROM bucket_settings WHERE bucket_id = $1 AND kind = $2")
                    .bind(bucket.to_string())
                    .bind(kind)
                    .execute(&self.pool)
                    .await?;
            }
        }
        Ok(())
    }

    async fn delete_bucket(&self, tenant: TenantId, id: BucketId) -> Result<()> {
        // Its settings go with it (ON DELETE CASCADE; SQLite runs with foreign_keys on).
        sqlx::query("DELETE FROM buckets WHERE tenant_id = $1 AND id = $2")
            .bind(tenant.to_string())
            .bind(id.to_string())
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    async fn upsert_node(&self, n: &NodeRecord) -> Result<()> {
        sqlx::query(
            "INSERT INTO nodes (id, region, zone, s3_addr, kv_addr, admin_addr, rpc_addr, heartbeat_at, capacity) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9) \
             ON CONFLICT (id) DO UPDATE SET region = excluded.region, zone = excluded.zone, \
             s3_addr = excluded.s3_addr, kv_addr = excluded.kv_addr, admin_addr = excluded.admin_addr, \
             rpc_addr = excluded.rpc_addr, heartbeat_at = excluded.heartbeat_at, capacity = excluded.capacity",
        )
        .bind(&n.id.0)
        .bind(&n.region)
        .bind(&n.zone)
        .bind(&n.s3_addr)
        .bind(&n.kv_addr)
        .bind(&n.admin_addr)
        .bind(&n.rpc_addr)
        .bind(n.heartbeat_at)
        .bind(i64::try_from(n.capacity).unwrap_or(i64::MAX))
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    async fn list_nodes(&self) -> Result<Vec<NodeRecord>> {
        let rows = sqlx::query(
            "SELECT id, region, zone, s3_addr, kv_addr, admin_addr, rpc_addr, heartbeat_at, capacity FROM nodes ORDER BY id",
        )
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|r| {
                Ok(NodeRecord {
                    id: NodeId(r.try_get("id")?),
                    region: r.try_get("region")?,
                    zone: r.try_get("zone")?,
                    s3_addr: r.try_get("s3_addr")?,
                    kv_addr: r.try_get("kv_addr")?,
                    admin_addr: r.try_get("admin_addr")?,
                    rpc_addr: r.try_get("rpc_addr")?,
                    heartbeat_at: r.try_get("heartbeat_at")?,
                    capacity: r.try_get::<i64, _>("capacity")?.max(1) as u64,
                })
            })
            .collect()
    }

    async fn heartbeat(&self, id: &NodeId) -> Result<bool> {
        let sql = format!(
            "UPDATE nodes SET heartbeat_at = {} WHERE id = $1",
            self.now_sql()
        );
        let r = sqlx::query(sqlx::AssertSqlSafe(sql))
            .bind(&id.0)
            .execute(&self.pool)
            .await?;
        Ok(r.rows_affected() > 0)
    }

    async fn now_millis(&self) -> Result<i64> {
        let row = sqlx::query(sqlx::AssertSqlSafe(format!(
            "SELECT {} AS now",
            self.now_sql()
        )))
        .fetch_one(&self.pool)
        .await?;
        Ok(row.try_get("now")?)
    }

    async fn latest_layout(&self) -> Result<Option<StoredLayout>> {
        let row = sqlx::query("SELECT version, body FROM layouts ORDER BY version DESC LIMIT 1")
            .fetch_optional(&self.pool)
            .await?;
        row.map(|r| {
            Ok(StoredLayout {
                version: r.try_get::<i64, _>("version")? as u64,
                body: r.try_get("body")?,
            })
        })
        .transpose()
    }

    async fn latest_layout_version(&self) -> Result<Option<u64>> {
        let row = sqlx::query("SELECT MAX(version) AS version FROM layouts")
            .fetch_one(&self.pool)
            .await?;
        Ok(row.try_get::<Option<i64>, _>("version")?.map(|v| v as u64))
    }

    async fn insert_layout(&self, layout: &StoredLayout, partitions: u16) -> Result<bool> {
        let version = i64::try_from(layout.version)
            .map_err(|_| CatalogError::Corrupt("layout version out of range".into()))?;
        let sql = format!(
            "INSERT INTO layouts (version, partitions, body, created_at) VALUES ($1, $2, $3, {}) \
             ON CONFLICT (version) DO NOTHING",
            self.now_sql()
        );
        let r = sqlx::query(sqlx::AssertSqlSafe(sql))
            .bind(version)
            .bind(partitions as i64)
            .bind(&layout.body)
            .execute(&self.pool)
            .await?;
        if r.rows_affected() == 0 {
            return Ok(false);
        }
        if self.backend == Backend::Postgres {
            // Wakes every node's listener; polling covers a lost notification.
            sqlx::query("SELECT pg_notify($1, $2)")
                .bind(LAYOUT_CHANNEL)
                .bind(version.to_string())
                .execute(&self.pool)
                .await?;
        }
        Ok(true)
    }

    async fn partition_states(&self) -> Result<Vec<PartitionState>> {
        let rows = sqlx::query(
            "SELECT partition, epoch, primary_node, in_sync FROM partition_states ORDER BY partition",
        )
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|r| {
                let partition: i64 = r.try_get("partition")?;
                let epoch: i64 = r.try_get("epoch")?;
                let in_sync: String = r.try_get("in_sync")?;
                Ok(PartitionState {
                    partition: PartitionId(u16::try_from(partition).map_err(|_| {
                        CatalogError::Corrupt(format!("partition {partition} out of range"))
                    })?),
                    epoch: Epoch(epoch as u64),
                    primary: NodeId(r.try_get("primary_node")?),
                    in_sync: serde_json::from_str(&in_sync)
                        .map_err(|e| CatalogError::Corrupt(format!("in-sync set: {e}")))?,
                })
            })
            .collect()
    }

    async fn cas_partition_state(
        &self,
        expected: Option<Epoch>,
        next: &PartitionState,
    ) -> Result<bool> {
        let want = expected.map_or(1, |e| e.0 + 1);
        if next.epoch.0 != want || !next.in_sync.contains(&next.primary) {
            return Err(CatalogError::Invalid(format!(
                "a partition change must take epoch {want} and keep its primary in sync"
            )));
        }
        let in_sync = serde_json::to_string(&next.in_sync)
            .map_err(|e| CatalogError::Corrupt(e.to_string()))?;
        let epoch = i64::try_from(next.epoch.0)
            .map_err(|_| CatalogError::Corrupt("epoch out of range".into()))?;
        let r = match expected {
            None => {
                let sql = format!(
                    "INSERT INTO partition_states (partition, epoch, primary_node, in_sync, updated_at) \
                     VALUES ($1, $2, $3, $4, {}) ON CONFLICT (partition) DO NOTHING",
                    self.now_sql()
                );
                sqlx::query(sqlx::AssertSqlSafe(sql))
                    .bind(next.partition.0 as i64)
                    .bind(epoch)
                    .bind(&next.primary.0)
                    .bind(&in_sync)
                    .execute(&self.pool)
                    .await?
            }
            Some(old) => {
                let sql = format!(
                    "UPDATE partition_states SET epoch = $1, primary_node = $2, in_sync = $3, \
                     updated_at = {} WHERE partition = $4 AND epoch = $5",
                    self.now_sql()
                );
                sqlx::query(sqlx::AssertSqlSafe(sql))
                    .bind(epoch)
                    .bind(&next.primary.0)
                    .bind(&in_sync)
                    .bind(next.partition.0 as i64)
                    .bind(old.0 as i64)
                    .execute(&self.pool)
                    .await?
            }
        };
        Ok(r.rows_affected() == 1)
    }

    async fn init_partition_states(&self, initial: &[PartitionState]) -> Result<u64> {
        let sql = format!(
            "INSERT INTO partition_states (partition, epoch, primary_node, in_sync, updated_at) \
             VALUES ($1, 1, $2, $3, {}) ON CONFLICT (partition) DO NOTHING",
            self.now_sql()
        );
        let mut tx = self.pool.begin().await?;
        let mut set = 0;
        for s in initial {
            if s.epoch != Epoch(1) || !s.in_sync.contains(&s.primary) {
                return Err(CatalogError::Invalid(
                    "a first partition state takes epoch 1 and keeps its primary in sync".into(),
                ));
            }
            let in_sync = serde_json::to_string(&s.in_sync)
                .map_err(|e| CatalogError::Corrupt(e.to_string()))?;
            set += sqlx::query(sqlx::AssertSqlSafe(sql.clone()))
                .bind(s.partition.0 as i64)
                .bind(&s.primary.0)
                .bind(&in_sync)
                .execute(&mut *tx)
                .await?
                .rows_affected();
        }
        tx.commit().await?;
        Ok(set)
    }

    async fn setting_or_init(&self, key: &str, default: &str) -> Result<String> {
        sqlx::query("INSERT INTO cluster_settings (key, value) VALUES ($1, $2) ON CONFLICT (key) DO NOTHING")
            .bind(key)
            .bind(default)
            .execute(&self.pool)
            .await?;
        let row = sqlx::query("SELECT value FROM cluster_settings WHERE key = $1")
            .bind(key)
            .fetch_one(&self.pool)
            .await?;
        Ok(row.try_get("value")?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A spec stored with fields this version does not know (by a newer node) is read,
    /// with what it knows intact; the same fields given through the API are refused.
    #[tokio::test]
    async fn stored_specs_are_read_leniently_and_input_is_strict() {
        let cat = SqlCatalog::connect("sqlite::memory:", MasterKey::generate())
            .await
            .unwrap();
        cat.create_tenant("t", &TenantSpec::default())
            .await
            .unwrap();
        let newer: serde_json::Value = serde_json::json!({
            "quotas": {"storageBytes": 1000, "futureQuota": 7},
            "qos": {"weight": 3, "burst": {"seconds": 2}},
            "tiering": {"coldAfterSeconds": 60, "futurePolicy": "x"},
            "futureSection": [1, 2],
        });
        sqlx::query("UPDATE tenants SET spec = $1 WHERE name = $2")
            .bind(newer.to_string())
            .bind("t")
            .execute(&cat.pool)
            .await
            .unwrap();
        let t = cat.tenant_by_name("t").await.unwrap().unwrap();
        assert_eq!(t.spec.quotas.storage_bytes, Some(1000));
        assert_eq!(t.spec.qos.weight, Some(3));
        assert_eq!(t.spec.tiering.cold_after_seconds, Some(60));
        assert_eq!(cat.list_tenants().await.unwrap().len(), 1);

        let e = TenantSpec::from_input(newer.clone()).unwrap_err();
        for f in [
            "quotas.futureQuota",
            "qos.burst",
            "tiering.futurePolicy",
            "futureSection",
        ] {
            assert!(e.contains(&format!("`{f}`")), "{e}");
        }
        let e = TenantSpec::from_input(serde_json::json!({"qos": {"weigth": 3}})).unwrap_err();
        assert!(e.contains("qos.weigth"), "{e}");
        let e = TenantSpec::from_input(serde_json::json!({"qos": {"weight": "3"}})).unwrap_err();
        assert!(e.contains("invalid type"), "{e}");
        let ok = TenantSpec::from_input(serde_json::json!({"qos": {"weight": 3}})).unwrap();
        assert_eq!(ok.qos.weight, Some(3));

        // Suspending (and resuming) keeps the fields this version does not know.
        let t = cat.set_suspended("t", true).await.unwrap();
        assert!(t.spec.suspended);
        async fn stored(cat: &SqlCatalog) -> serde_json::Value {
            let row = sqlx::query("SELECT spec FROM tenants WHERE name = $1")
                .bind("t")
                .fetch_one(&cat.pool)
                .await
                .unwrap();
            serde_json::from_str(&row.try_get::<String, _>("spec").unwrap()).unwrap()
        }
        let mut expect = newer.clone();
        expect["suspended"] = serde_json::json!(true);
        assert_eq!(stored(&cat).await, expect);
        let t = cat.set_suspended("t", false).await.unwrap();
        assert!(!t.spec.suspended);
        assert_eq!(stored(&cat).await, newer);
        assert!(matches!(
            cat.set_suspended("nobody", true).await,
            Err(CatalogError::NotFound(_))
        ));
    }
}
