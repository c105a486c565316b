//! One catalog test suite, run against SQLite and against a real Postgres server the
//! harness starts (initdb + pg_ctl in a temporary directory).

use granary_e2e::PgServer;
use granary_node::catalog::{
    Backend, Catalog, CatalogError, MasterKey, NodeRecord, PartitionState, SqlCatalog,
    StoredLayout, TenantSpec,
};
use granary_node::types::{Epoch, NodeId, PartitionId};

async fn suite(cat: &SqlCatalog) {
    // Tenants.
    let spec: TenantSpec = serde_json::from_value(
        serde_json::json!({"quotas": {"objects": 10}, "qos": {"weight": 200}}),
    )
    .unwrap();
    let a = cat.create_tenant("alpha", &spec).await.unwrap();
    let b = cat
        .create_tenant("beta", &TenantSpec::default())
        .await
        .unwrap();
    assert!(matches!(
        cat.create_tenant("alpha", &spec).await,
        Err(CatalogError::Conflict(_))
    ));
    assert_eq!(
        cat.tenant_by_name("alpha").await.unwrap().unwrap().spec,
        spec
    );
    assert_eq!(cat.tenant_by_id(b.id).await.unwrap().unwrap().name, "beta");
    assert!(cat.tenant_by_name("gamma").await.unwrap().is_none());
    let names: Vec<_> = cat
        .list_tenants()
        .await
        .unwrap()
        .into_iter()
        .map(|t| t.name)
        .collect();
    assert_eq!(names, ["alpha", "beta"]);
    let spec2: TenantSpec =
        serde_json::from_value(serde_json::json!({"quotas": {"objects": 20}})).unwrap();
    assert_eq!(
        cat.update_tenant("alpha", &spec2).await.unwrap().spec,
        spec2
    );
    assert!(matches!(
        cat.update_tenant("gamma", &spec2).await,
        Err(CatalogError::NotFound(_))
    ));
    // Suspension changes the flag alone.
    let t = cat.set_suspended("alpha", true).await.unwrap();
    assert!(t.spec.suspended);
    assert_eq!(t.spec.quotas, spec2.quotas);
    let t = cat.set_suspended("alpha", false).await.unwrap();
    assert_eq!(t.spec, spec2);
    assert!(matches!(
        cat.set_suspended("gamma", true).await,
        Err(CatalogError::NotFound(_))
    ));

    // Keys: secret sealed at rest, revocation, tenant scoping.
    let k = cat.create_access_key(a.id, "ci").await.unwrap();
    let found = cat
        .lookup_access_key(&k.access_key_id)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        (found.tenant_id, found.secret_access_key.as_str()),
        (a.id, k.secret_access_key.as_str())
    );
    assert!(
        !cat.revoke_access_key(b.id, &k.access_key_id).await.unwrap(),
        "another tenant cannot revoke it"
    );
    // A suspended tenant's keys are refused as unknown; resuming brings them back.
    let suspended: TenantSpec =
        serde_json::from_value(serde_json::json!({"quotas": {"objects": 20}, "suspended": true}))
            .unwrap();
    cat.update_tenant("alpha", &suspended).await.unwrap();
    assert!(
        cat.lookup_access_key(&k.access_key_id)
            .await
            .unwrap()
            .is_none(),
        "suspended"
    );
    cat.update_tenant("alpha", &spec2).await.unwrap();
    assert!(
        cat.lookup_access_key(&k.access_key_id)
            .await
            .unwrap()
            .is_some(),
        "resumed"
    );
    let keys = cat.list_access_keys(a.id).await.unwrap();
    assert_eq!(keys.len(), 1);
    assert_eq!(keys[0].description, "ci");
    assert!(cat.revoke_access_key(a.id, &k.access_key_id).await.unwrap());
    assert!(
        cat.lookup_access_key(&k.access_key_id)
            .await
            .unwrap()
            .is_none()
    );
    assert!(
        !cat.revoke_access_key(a.id, &k.access_key_id).await.unwrap(),
        "already revoked"
    );
    assert!(
        cat.list_access_keys(a.id).await.unwrap()[0]
            .revoked_at
            .is_some()
    );

    // Buckets are per tenant.
    let ba = cat.create_bucket(a.id, "logs").await.unwrap();
    let bb = cat.create_bucket(b.id, "logs").await.unwrap();
    assert_ne!(ba.id, bb.id);
    assert!(matches!(
        cat.create_bucket(a.id, "logs").await,
        Err(CatalogError::Conflict(_))
    ));
    assert_eq!(cat.bucket(a.id, "logs").await.unwrap().unwrap().id, ba.id);
    cat.create_bucket(a.id, "archive").await.unwrap();
    let names: Vec<_> = cat
        .list_buckets(a.id)
        .await
        .unwrap()
        .into_iter()
        .map(|b| b.name)
        .collect();
    assert_eq!(names, ["archive", "logs"]);
    // Bucket settings: set, replaced, removed, and gone with their bucket.
    assert_eq!(cat.bucket_setting(ba.id, "tagging").await.unwrap(), None);
    cat.set_bucket_setting(ba.id, "tagging", Some("[1]"))
        .await
        .unwrap();
    cat.set_bucket_setting(ba.id, "tagging", Some("[2]"))
        .await
        .unwrap();
    cat.set_bucket_setting(ba.id, "other", Some("{}"))
        .await
        .unwrap();
    assert_eq!(
        cat.bucket_setting(ba.id, "tagging")
            .await
            .unwrap()
            .as_deref(),
        Some("[2]")
    );
    cat.set_bucket_setting(ba.id, "other", None).await.unwrap();
    assert_eq!(cat.bucket_setting(ba.id, "other").await.unwrap(), None);
    cat.delete_bucket(a.id, ba.id).await.unwrap();
    assert_eq!(cat.bucket_setting(ba.id, "tagging").await.unwrap(), None);
    assert!(cat.bucket(a.id, "logs").await.unwrap().is_none());
    assert!(cat.bucket(b.id, "logs").await.unwrap().is_some());

    // Nodes and settings.
    let mut n = NodeRecord {
        id: NodeId("n1".into()),
        region: "r".into(),
        zone: "a".into(),
        s3_addr: "1:9000".into(),
        kv_addr: "1:9100".into(),
        admin_addr: "1:9200".into(),
        rpc_addr: String::new(),
        heartbeat_at: 1,
        capacity: 500,
    };
    cat.upsert_node(&n).await.unwrap();
    n.heartbeat_at = 2;
    n.zone = "b".into();
    cat.upsert_node(&n).await.unwrap();
    assert_eq!(cat.list_nodes().await.unwrap(), vec![n.clone()]);
    // Heartbeats are stamped with the catalog's clock, not the node's.
    let before = cat.now_millis().await.unwrap();
    assert!((before - granary_node::types::now_millis()).abs() < 60_000);
    assert!(cat.heartbeat(&n.id).await.unwrap());
    assert!(!cat.heartbeat(&NodeId("unknown".into())).await.unwrap());
    let hb = cat.list_nodes().await.unwrap()[0].heartbeat_at;
    assert!(
        hb >= before && hb <= cat.now_millis().await.unwrap(),
        "{before} {hb}"
    );

    // Layout versions: the first writer of a version wins, the newest is current.
    assert_eq!(cat.latest_layout().await.unwrap(), None);
    assert_eq!(cat.latest_layout_version().await.unwrap(), None);
    let l1 = StoredLayout {
        version: 1,
        body: "{\"a\":1}".into(),
    };
    assert!(cat.insert_layout(&l1, 64).await.unwrap());
    let rival = StoredLayout {
        version: 1,
        body: "{\"b\":2}".into(),
    };
    assert!(
        !cat.insert_layout(&rival, 64).await.unwrap(),
        "version 1 is taken"
    );
    assert_eq!(cat.latest_layout().await.unwrap(), Some(l1));
    let l2 = StoredLayout {
        version: 2,
        body: "{}".into(),
    };
    assert!(cat.insert_layout(&l2, 64).await.unwrap());
    assert_eq!(cat.latest_layout().await.unwrap(), Some(l2));
    assert_eq!(cat.latest_layout_version().await.unwrap(), Some(2));

    // Partition leadership: a compare-and-set on the epoch. The first claim wins, a change
    // based on a stale epoch loses (a deposed primary cannot take its partition back),
    // and epochs only ever move up by one.
    let state = |epoch: u64, primary: &str, in_sync: &[&str]| PartitionState {
        partition: PartitionId(7),
        epoch: Epoch(epoch),
        primary: NodeId(primary.into()),
        in_sync: in_sync.iter().map(|n| NodeId(n.to_string())).collect(),
    };
    assert!(cat.partition_states().await.unwrap().is_empty());
    let e1 = state(1, "n1", &["n1", "n2", "n3"]);
    assert!(cat.cas_partition_state(None, &e1).await.unwrap());
    assert!(
        !cat.cas_partition_state(None, &state(1, "n2", &["n2"]))
            .await
            .unwrap(),
        "a second first claim loses"
    );
    let e2 = state(2, "n2", &["n2", "n3"]);
    assert!(cat.cas_partition_state(Some(Epoch(1)), &e2).await.unwrap());
    assert!(
        !cat.cas_partition_state(Some(Epoch(1)), &state(2, "n1", &["n1"]))
            .await
            .unwrap(),
        "the old primary's change, based on epoch 1, is fenced"
    );
    assert!(matches!(
        cat.cas_partition_state(Some(Epoch(2)), &state(4, "n3", &["n3"]))
            .await,
        Err(CatalogError::Invalid(_))
    ));
    assert!(matches!(
        cat.cas_partition_state(Some(Epoch(2)), &state(3, "n3", &["n2"]))
            .await,
        Err(CatalogError::Invalid(_)),
    ));
    assert_eq!(cat.partition_states().await.unwrap(), vec![e2.clone()]);
    // The bulk first assignment sets only partitions without a state.
    let first = |p: u16, primary: &str| PartitionState {
        partition: PartitionId(p),
        ..state(1, primary, &[primary])
    };
    assert_eq!(
        cat.init_partition_states(&[first(7, "n9"), first(8, "n1"), first(9, "n2")])
            .await
            .unwrap(),
        2
    );
    assert_eq!(
        cat.partition_states().await.unwrap(),
        vec![e2, first(8, "n1"), first(9, "n2")],
        "partition 7 keeps its state"
    );
    assert!(matches!(
        cat.init_partition_states(&[state(2, "n1", &["n1"])]).await,
        Err(CatalogError::Invalid(_))
    ));
    assert_eq!(
        cat.setting_or_init("partitions", "1024").await.unwrap(),
        "1024"
    );
    assert_eq!(
        cat.setting_or_init("partitions", "64").await.unwrap(),
        "1024",
        "first value wins"
    );

    // Deleting a tenant removes its keys and buckets.
    let k2 = cat.create_access_key(b.id, "").await.unwrap();
    cat.delete_tenant(b.id).await.unwrap();
    assert!(
        cat.lookup_access_key(&k2.access_key_id)
            .await
            .unwrap()
            .is_none()
    );
    assert!(cat.list_buckets(b.id).await.unwrap().is_empty());
    assert!(cat.tenant_by_id(b.id).await.unwrap().is_none());
}

#[tokio::test]
async fn catalog_suite_on_sqlite() {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite:{}", dir.path().join("c.db").display());
    let key = MasterKey::generate();
    let cat = SqlCatalog::connect(&url, key.clone()).await.unwrap();
    assert_eq!(cat.backend(), Backend::Sqlite);
    suite(&cat).await;
    cat.close().await;
    // Reopening runs no migration twice and keeps the data; another master key cannot
    // open the sealed secrets.
    let cat = SqlCatalog::connect(&url, key).await.unwrap();
    assert_eq!(cat.list_tenants().await.unwrap().len(), 1);
    let t = cat.tenant_by_name("alpha").await.unwrap().unwrap();
    let k = cat.create_access_key(t.id, "").await.unwrap();
    cat.close().await;
    let other = SqlCatalog::connect(&url, MasterKey::generate())
        .await
        .unwrap();
    assert!(other.lookup_access_key(&k.access_key_id).await.is_err());
    let raw = std::fs::read(dir.path().join("c.db")).unwrap();
    let wal = std::fs::read(dir.path().join("c.db-wal")).unwrap_or_default();
    let needle = k.secret_access_key.as_bytes();
    assert!(
        !raw.windows(needle.len()).any(|w| w == needle)
            && !wal.windows(needle.len()).any(|w| w == needle),
        "secret stored in clear"
    );
}

#[tokio::test]
async fn catalog_suite_on_postgres() {
    let pg = PgServer::start()
        .expect("starting a private Postgres (the test command installs postgresql)");
    let url = pg.create_db("granary_catalog").unwrap();
    let cat = SqlCatalog::connect(&url, MasterKey::generate())
        .await
        .unwrap();
    assert_eq!(cat.backend(), Backend::Postgres);
    suite(&cat).await;
    // A spec with a field a newer node wrote: read, and kept by a suspension.
    let pool = sqlx::PgPool::connect(&url).await.unwrap();
    let newer = serde_json::json!({"quotas": {"objects": 20}, "futureField": {"x": 1}});
    sqlx::query("UPDATE tenants SET spec = $1 WHERE name = 'alpha'")
        .bind(newer.to_string())
        .execute(&pool)
        .await
        .unwrap();
    let t = cat.set_suspended("alpha", true).await.unwrap();
    assert_eq!(t.spec.quotas.objects, Some(20));
    let (stored,): (String,) = sqlx::query_as("SELECT spec FROM tenants WHERE name = 'alpha'")
        .fetch_one(&pool)
        .await
        .unwrap();
    let stored: serde_json::Value = serde_json::from_str(&stored).unwrap();
    assert_eq!(stored["futureField"], newer["futureField"], "{stored}");
    assert_eq!(stored["suspended"], true, "{stored}");
    pool.close().await;
    cat.close().await;
}

/// The catalog over TLS (sqlx with rustls): `sslmode=verify-full` with the server's CA
/// connects; without that CA the certificate is refused with a clear error.
#[tokio::test]
async fn catalog_connects_to_postgres_over_verified_tls() {
    let pg = PgServer::start_tls().expect("a private Postgres with TLS");
    pg.create_db("granary_tls").unwrap();
    let ca = pg.ca_cert().expect("the test CA");
    let url = format!(
        "postgres://granary@localhost:{}/granary_tls?sslmode=verify-full&sslrootcert={}",
        pg.port,
        ca.display()
    );
    let cat = SqlCatalog::connect(&url, MasterKey::generate())
        .await
        .expect("verified TLS connection");
    cat.create_tenant("over-tls", &TenantSpec::default())
        .await
        .unwrap();
    cat.close().await;
    let untrusted = format!(
        "postgres://granary@localhost:{}/granary_tls?sslmode=verify-full",
        pg.port
    );
    let err = match SqlCatalog::connect(&untrusted, MasterKey::generate()).await {
        Ok(_) => panic!("a certificate from an unknown CA must be refused"),
        Err(e) => format!("{e:#}"),
    };
    assert!(
        err.to_lowercase().contains("certificate"),
        "the error should name the certificate: {err}"
    );
}
