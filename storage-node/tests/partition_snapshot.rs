//! A partition moved between two engines through a snapshot stream: the receiver serves
//! exactly the sender's objects (inline and chunked), KV keys and TTL index for that
//! partition, touches no other partition, and refuses damaged streams without making
//! anything of them visible. The same over the RPC port: streamed over HTTP, refused
//! without the cluster secret.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures::StreamExt;
use granary_node::catalog::{Catalog, MasterKey, NodeRecord, SqlCatalog, TenantSpec};
use granary_node::cluster::{Cluster, ClusterConfig, Thresholds, rpc};
use granary_node::engine::Engine;
use granary_node::model::kv::KvCondition;
use granary_node::model::{ByteStream, Conditions, ObjectMeta, Store};
use granary_node::telemetry::Metrics;
use granary_node::types::{NodeId, PartitionId};

const PARTITIONS: u16 = 16;

fn body(bytes: Vec<u8>) -> ByteStream {
    Box::pin(futures::stream::iter([Ok(Bytes::from(bytes))]))
}

async fn read_all(s: &Store, t: granary_node::types::TenantId, key: &str) -> Vec<u8> {
    let (_, _, b) = s
        .get_object(t, "photos", key, None, &Conditions::default())
        .await
        .unwrap();
    let mut out = Vec::new();
    let mut st = b.stream;
    while let Some(piece) = st.next().await {
        out.extend_from_slice(&piece.unwrap());
    }
    out
}

/// Partition `p` on two engines holds the same records, log and log position.
async fn assert_same_partition(a: &Engine, b: &Engine, p: PartitionId) {
    let (da, db) = (
        a.partition_digest(p).await.unwrap(),
        b.partition_digest(p).await.unwrap(),
    );
    assert!(da.0 > 0);
    assert_eq!(da, db, "partition {p} differs");
    assert_eq!(
        a.log_position(p).await.unwrap(),
        b.log_position(p).await.unwrap()
    );
    assert_eq!(
        a.committed_lsn(p),
        b.committed_lsn(p),
        "the log position travelled"
    );
    // The usage counters are derived on each node: the partition's rows agree, and each
    // node's counters agree with a recount of what it holds.
    let rows = |e: &Engine| {
        let e = e.clone();
        async move {
            let mut r = e.usage_rows().await.unwrap();
            r.retain(|(k, _)| k.starts_with(&p.0.to_be_bytes()));
            r
        }
    };
    let ra = rows(a).await;
    assert!(!ra.is_empty());
    assert_eq!(ra, rows(b).await, "usage of partition {p}");
    for e in [a, b] {
        assert_eq!(e.verify_usage().await.unwrap(), vec![]);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_partition_snapshot_reproduces_the_partition_on_another_engine() {
    let dir = tempfile::tempdir().unwrap();
    let catalog: Arc<dyn Catalog> = Arc::new(
        SqlCatalog::connect("sqlite::memory:", MasterKey::generate())
            .await
            .unwrap(),
    );
    let a = Store::new(
        Engine::open(&dir.path().join("a")).unwrap(),
        catalog.clone(),
        PARTITIONS,
    );
    let b = Store::new(
        Engine::open(&dir.path().join("b")).unwrap(),
        catalog.clone(),
        PARTITIONS,
    );
    let t = catalog
        .create_tenant("t", &TenantSpec::default())
        .await
        .unwrap()
        .id;
    a.create_bucket(t, "photos").await.unwrap();
    let p = a.partition(t, "photos");
    // Inline, just past the inline limit, and several chunk files.
    let objects: Vec<(String, Vec<u8>)> = [10usize, 64 * 1024 + 1, 9 << 20, 17 << 20]
        .iter()
        .enumerate()
        .map(|(i, &n)| {
            (
                format!("obj-{i}"),
                (0..n).map(|j| (j * 7 + i) as u8).collect(),
            )
        })
        .collect();
    for (k, v) in &objects {
        a.put_object(
            t,
            "photos",
            k,
            body(v.clone()),
            None,
            ObjectMeta::default(),
            Conditions::default(),
        )
        .await
        .unwrap();
    }
    // An upload in progress (its record and both upload indexes).
    let upload = a
        .create_upload(t, "photos", "big/video", ObjectMeta::default())
        .await
        .unwrap();
    // A KV namespace in the same partition (KV namespaces hash as `kv:<ns>`; found by
    // trying names), with and without TTL.
    let ns = (0..1000)
        .map(|i| format!("ns{i}"))
        .find(|n| a.partition(t, &format!("kv:{n}")) == p)
        .unwrap();
    a.kv_put(t, &ns, b"plain", b"v1".to_vec(), KvCondition::None, None)
        .await
        .unwrap();
    a.kv_put(
        t,
        &ns,
        b"leased",
        b"v2".to_vec(),
        KvCondition::None,
        Some(3_600_000),
    )
    .await
    .unwrap();
    // Something in another partition of b that the import must leave alone.
    let other_bucket = (0..1000)
        .map(|i| format!("other{i}"))
        .find(|n| a.partition(t, n) != p)
        .unwrap();
    b.create_bucket(t, &other_bucket).await.unwrap();
    b.put_object(
        t,
        &other_bucket,
        "keep",
        body(b"mine".to_vec()),
        None,
        ObjectMeta::default(),
        Conditions::default(),
    )
    .await
    .unwrap();
    // And stale data of partition p on b, which the import replaces.
    b.put_object(
        t,
        "photos",
        "stale",
        body(vec![9u8; 100]),
        None,
        ObjectMeta::default(),
        Conditions::default(),
    )
    .await
    .unwrap();

    let mut stream = Vec::new();
    let sent = a.engine().export_partition(p, &mut stream).await.unwrap();
    assert!(sent.records >= 6, "{sent:?}");
    assert!(
        sent.chunks >= 4,
        "two chunked objects span at least 4 files: {sent:?}"
    );
    let got = b
        .engine()
        .import_partition(p, &mut stream.as_slice())
        .await
        .unwrap();
    assert_eq!((got.records, got.chunks), (sent.records, sent.chunks));
    assert!(!b.engine().importing(p).await.unwrap());

    assert_same_partition(a.engine(), b.engine(), p).await;
    for (k, v) in &objects {
        assert_eq!(&read_all(&b, t, k).await, v, "{k}");
    }
    assert!(
        b.head_object(t, "photos", "stale").await.is_err(),
        "replaced, not merged"
    );
    let uploads = b
        .list_uploads_page(t, "photos", "", None, None, 10)
        .await
        .unwrap();
    assert_eq!(uploads.uploads.len(), 1, "the upload in progress moved too");
    assert_eq!(uploads.uploads[0].upload_id, upload);
    assert_eq!(
        b.kv_get(t, &ns, b"leased").await.unwrap().unwrap().value,
        b"v2"
    );
    let kept = b.head_object(t, &other_bucket, "keep").await.unwrap();
    assert_eq!(kept.size, 4, "other partitions untouched");
    // Versions continue above the sender's: b had made fewer writes than a, and a new
    // write there must not reuse a number a compare-and-set could mistake.
    let imported = b.kv_get(t, &ns, b"plain").await.unwrap().unwrap().version;
    let next = b
        .kv_put(
            t,
            &ns,
            b"plain",
            b"v3".to_vec(),
            KvCondition::IfVersion(imported),
            None,
        )
        .await
        .unwrap();
    let sender_next = a
        .kv_put(t, &ns, b"probe", b"x".to_vec(), KvCondition::None, None)
        .await
        .unwrap();
    assert!(
        next > imported && next >= sender_next,
        "{imported} {next} {sender_next}"
    );

    // A damaged stream: one flipped byte inside a chunk file's data is refused, the
    // partition stays marked incomplete, and nothing torn is served as good data.
    let mut bad = stream.clone();
    let at = bad.len() - 4096;
    bad[at] ^= 0x55;
    let c = Store::new(
        Engine::open(&dir.path().join("c")).unwrap(),
        catalog.clone(),
        PARTITIONS,
    );
    let r = c.engine().import_partition(p, &mut bad.as_slice()).await;
    assert!(r.is_err(), "corrupt chunk accepted");
    assert!(c.engine().importing(p).await.unwrap());
    // A truncated stream is refused too.
    let cut = &stream[..stream.len() / 2];
    let d = Store::new(
        Engine::open(&dir.path().join("d")).unwrap(),
        catalog.clone(),
        PARTITIONS,
    );
    assert!(d.engine().import_partition(p, &mut &cut[..]).await.is_err());
    assert!(d.engine().importing(p).await.unwrap());
    assert_eq!(d.engine().partitions_importing().await.unwrap(), vec![p]);
    assert!(b.engine().partitions_importing().await.unwrap().is_empty());
    fn files(dir: &std::path::Path, out: &mut Vec<String>) {
        for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
            if e.path().is_dir() {
                files(&e.path(), out);
            } else {
                out.push(e.file_name().to_string_lossy().into_owned());
            }
        }
    }
    let mut left = Vec::new();
    files(&dir.path().join("d"), &mut left);
    files(&dir.path().join("c"), &mut left);
    assert!(
        !left.iter().any(|f| f.ends_with(".import")),
        "temporary files left behind: {left:?}"
    );

    // Over the RPC port: a peer pulls the partition with the cluster secret.
    let secret = "snapshot-test-secret-0123456789";
    let me = NodeRecord {
        id: NodeId("a".into()),
        region: "r".into(),
        zone: "z".into(),
        s3_addr: String::new(),
        kv_addr: String::new(),
        admin_addr: String::new(),
        rpc_addr: String::new(),
        heartbeat_at: 0,
        capacity: 1,
    };
    let cluster = Cluster::new(
        ClusterConfig {
            me,
            partitions: PARTITIONS,
            replication_factor: 1,
            bootstrap_expect: 1,
            interval: Duration::from_secs(1),
            thresholds: Thresholds {
                suspect_after: Duration::from_secs(5),
                fail_after: Duration::from_secs(30),
            },
            secret: Some(Arc::from(secret)),
            listen_url: None,
        },
        catalog.clone(),
        Arc::new(Metrics::default()),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let router = rpc::router(rpc::RpcState::new(cluster, a.engine().clone()));
    let server = tokio::spawn(async move { axum::serve(listener, router).await });
    let e = Store::new(
        Engine::open(&dir.path().join("e")).unwrap(),
        catalog,
        PARTITIONS,
    );
    let http = reqwest::Client::new();
    let t30 = Duration::from_secs(30);
    let refused =
        rpc::pull_partition(&http, &addr, "wrong-secret-0000000000", p, e.engine(), t30).await;
    assert!(refused.unwrap_err().to_string().contains("401"));
    assert!(!e.engine().importing(p).await.unwrap(), "nothing started");
    let pulled = rpc::pull_partition(&http, &addr, secret, p, e.engine(), t30)
        .await
        .unwrap();
    // Two records more than before: the probe key written on a since, and its log entry.
    assert_eq!(
        (pulled.records, pulled.chunks),
        (sent.records + 2, sent.chunks)
    );
    assert_same_partition(a.engine(), e.engine(), p).await;
    for (k, v) in &objects {
        assert_eq!(&read_all(&e, t, k).await, v, "{k} over RPC");
    }
    server.abort();
}

/// A chunk file sent ahead to a replica (`Engine::chunk_frames` into
/// `Engine::receive_sent_chunk`, as the RPC does) arrives byte for byte; a damaged or
/// cut stream is refused and leaves no file, not even a temporary one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_chunk_file_sent_to_a_replica_arrives_intact_or_not_at_all() {
    // Both ways chunk files can be written and read: through the page cache (the
    // default) and around it (`direct_io`).
    for direct in [false, true] {
        granary_node::engine::set_direct_io(direct);
        chunk_file_round_trip().await;
    }
    granary_node::engine::set_direct_io(false);
}

async fn chunk_file_round_trip() {
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = (
        Engine::open(&dir.path().join("a")).unwrap(),
        Engine::open(&dir.path().join("b")).unwrap(),
    );
    let p = PartitionId(5);
    // More than one frame's piece (1 MiB), not a multiple of the block or the alignment.
    let data: Vec<u8> = (0..2_500_017u32).map(|i| (i * 7 % 253) as u8).collect();
    let mut w = a.chunks().create(p).unwrap();
    w.append(&data).unwrap();
    let c = w.finish().unwrap();
    let file = |e: &Engine| e.chunks().path(c.partition, c.id);
    let sent = |e: Engine| {
        let c = c.clone();
        async move {
            let frames = e
                .chunk_frames(&c)
                .await
                .unwrap()
                .expect("the file is there");
            let parts: Vec<Bytes> = frames.map(|r| r.unwrap()).collect().await;
            parts.concat()
        }
    };
    let stream = sent(a.clone()).await;
    let receive = |bytes: Vec<u8>| {
        let b = b.clone();
        async move { b.receive_sent_chunk(p, &mut bytes.as_slice()).await }
    };
    let leftovers = || {
        std::fs::read_dir(file(&b).parent().unwrap())
            .map(|d| d.count())
            .unwrap_or(0)
    };
    // Damaged: a flipped byte in the data (caught by the frame's checksum), a cut stream.
    let mut flipped = stream.clone();
    let at = flipped.len() / 2;
    flipped[at] ^= 1;
    assert!(receive(flipped).await.is_err());
    assert!(receive(stream[..stream.len() - 3].to_vec()).await.is_err());
    assert!(receive(stream[..stream.len() / 3].to_vec()).await.is_err());
    assert_eq!(leftovers(), 0, "nothing of a refused transfer stays");
    receive(stream).await.unwrap();
    assert_eq!(
        std::fs::read(file(&b)).unwrap(),
        std::fs::read(file(&a)).unwrap()
    );
    assert_eq!(b.chunks().read_range(&c, 0, c.len).unwrap(), data);
    // Gone on the sender: nothing to send.
    a.chunks().remove_files(std::slice::from_ref(&c));
    assert!(a.chunk_frames(&c).await.unwrap().is_none());
}
