//! A request without a body that a node forwards to a partition's primary, and that the
//! primary refuses as not its own (a handover the forwarding node had not seen yet), is
//! decided again and resent by the forwarding node, not handed to the client as a 503.
//! One real `Cluster` on a SQLite catalog, two stand-in peers on loopback: the first
//! answers [`NOT_PRIMARY`] (and, in one case, moves the partition to the second in the
//! catalog, as a handover does), the second serves.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use axum::Router;
use axum::routing::{any, get};
use granary_node::catalog::{
    Catalog, MasterKey, NodeRecord, PartitionState, SqlCatalog, TenantSpec,
};
use granary_node::cluster::forward::{Decision, Forwarder, NOT_PRIMARY, NOT_PRIMARY_RETRIES};
use granary_node::cluster::{Cluster, ClusterConfig, Thresholds};
use granary_node::telemetry::Metrics;
use granary_node::tenancy::Authenticator;
use granary_node::types::{Epoch, NodeId, PartitionId};

const PARTITIONS: u16 = 8;
const SECRET: &str = "forward-retry-secret-0123456789";

fn record(id: &str, rpc_addr: &str) -> NodeRecord {
    NodeRecord {
        id: NodeId(id.into()),
        region: "r".into(),
        zone: format!("z-{id}"),
        s3_addr: String::new(),
        kv_addr: String::new(),
        admin_addr: String::new(),
        rpc_addr: rpc_addr.into(),
        heartbeat_at: 0,
        capacity: 1,
    }
}

/// A stand-in peer: answers probes as `id`, and forwarded requests with `answer`
/// (counted in `hits`).
async fn peer(
    id: &'static str,
    hits: Arc<AtomicUsize>,
    answer: impl Fn(usize) -> futures::future::BoxFuture<'static, axum::response::Response>
    + Clone
    + Send
    + Sync
    + 'static,
) -> String {
    let router = Router::new()
        .route(
            "/rpc/v1/ping",
            get(move || async move {
                axum::Json(serde_json::json!({"nodeId": id, "incarnation": "1"}))
            }),
        )
        .route(
            "/rpc/v1/forward/{front}",
            any(move || {
                let (hits, answer) = (hits.clone(), answer.clone());
                async move { answer(hits.fetch_add(1, Ordering::SeqCst)).await }
            }),
        );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    tokio::spawn(async move { axum::serve(listener, router).await });
    addr
}

fn not_primary() -> axum::response::Response {
    let mut r = axum::response::Response::new(axum::body::Body::from("not mine"));
    *r.status_mut() = http::StatusCode::SERVICE_UNAVAILABLE;
    r.headers_mut()
        .insert(NOT_PRIMARY, http::HeaderValue::from_static("1"));
    r
}

fn get_request(access_key: &str) -> http::request::Parts {
    let auth = format!(
        "AWS4-HMAC-SHA256 Credential={access_key}/20261128/us-east-1/s3/aws4_request, \
         SignedHeaders=host, Signature=00"
    );
    http::Request::get("/photos/cat.jpg")
        .header(http::header::AUTHORIZATION, auth)
        .body(())
        .unwrap()
        .into_parts()
        .0
}

async fn body_of(answer: http::Response<reqwest::Body>) -> (u16, String) {
    let status = answer.status().as_u16();
    let body = http_body_util::BodyExt::collect(answer.into_body())
        .await
        .unwrap()
        .to_bytes();
    (status, String::from_utf8_lossy(&body).into_owned())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bodiless_request_refused_as_not_the_primarys_is_resent_to_the_new_primary() {
    let catalog: Arc<dyn Catalog> = Arc::new(
        SqlCatalog::connect("sqlite::memory:", MasterKey::generate())
            .await
            .unwrap(),
    );
    let tenant = catalog
        .create_tenant("t", &TenantSpec::default())
        .await
        .unwrap()
        .id;
    let key = catalog.create_access_key(tenant, "test").await.unwrap();
    let p = PartitionId::of(tenant, b"photos", PARTITIONS);

    // b led the partition and handed it to c: its first answer moves it in the catalog
    // (epoch 2) before refusing, as a primary that has just handed over would; later
    // ones only refuse.
    let (b_hits, c_hits) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let handed = catalog.clone();
    let led_by = |primary: &str, epoch: u64, partition: u16| PartitionState {
        partition: PartitionId(partition),
        epoch: Epoch(epoch),
        primary: NodeId(primary.into()),
        in_sync: vec![NodeId("b".into()), NodeId("c".into())],
    };
    let b = peer("b", b_hits.clone(), move |hit| {
        let handed = handed.clone();
        Box::pin(async move {
            if hit == 0 {
                let next = led_by("c", 2, p.0);
                assert!(
                    handed
                        .cas_partition_state(Some(Epoch(1)), &next)
                        .await
                        .unwrap()
                );
            }
            not_primary()
        })
    })
    .await;
    let c = peer("c", c_hits.clone(), |_| {
        Box::pin(async { axum::response::Response::new(axum::body::Body::from("served by c")) })
    })
    .await;
    let me = record("a", "");
    for n in [&me, &record("b", &b), &record("c", &c)] {
        catalog.upsert_node(n).await.unwrap();
        assert!(catalog.heartbeat(&n.id).await.unwrap());
    }
    let initial: Vec<PartitionState> = (0..PARTITIONS).map(|q| led_by("b", 1, q)).collect();
    catalog.init_partition_states(&initial).await.unwrap();

    let cluster = Cluster::new(
        ClusterConfig {
            me,
            partitions: PARTITIONS,
            replication_factor: 2,
            bootstrap_expect: 1,
            // Only a refresh asked for by the forwarder reads the new table in time.
            interval: Duration::from_secs(3600),
            thresholds: Thresholds {
                suspect_after: Duration::from_secs(3600),
                fail_after: Duration::from_secs(7200),
            },
            secret: Some(Arc::from(SECRET)),
            listen_url: None,
        },
        catalog.clone(),
        Arc::new(Metrics::default()),
    );
    let (stop, shutdown) = tokio::sync::watch::channel(false);
    let task = cluster.start(shutdown).await.unwrap();
    let forwarder = Forwarder::new(
        cluster.clone(),
        Authenticator::new(catalog.clone()),
        Arc::new(Metrics::default()),
        8,
    );
    let parts = get_request(&key.access_key_id);

    // Sent to b, refused, decided again once the table changed, served by c.
    let answer = forwarder
        .decide_bodiless("s3", &parts, Some("photos"))
        .await
        .expect_err("forwarded, not decided here");
    assert_eq!(body_of(answer.unwrap()).await, (200, "served by c".into()));
    assert_eq!(b_hits.load(Ordering::SeqCst), 1);
    assert_eq!(c_hits.load(Ordering::SeqCst), 1);

    // A partition whose primary keeps refusing: resent a bounded number of times, then
    // its 503 (with NOT_PRIMARY) reaches the client.
    let other = (0u32..)
        .map(|i| format!("bucket-{i}"))
        .find(|name| PartitionId::of(tenant, name.as_bytes(), PARTITIONS) != p)
        .unwrap();
    let answer = forwarder
        .decide_bodiless("s3", &parts, Some(&other))
        .await
        .expect_err("forwarded, not decided here");
    let answer = answer.unwrap();
    assert!(answer.headers().contains_key(NOT_PRIMARY));
    assert_eq!(body_of(answer).await.0, 503);
    assert_eq!(
        b_hits.load(Ordering::SeqCst),
        1 + 1 + NOT_PRIMARY_RETRIES as usize
    );

    // A request forwarded to this node is never forwarded again: refused here.
    let mut forwarded = get_request(&key.access_key_id);
    forwarded
        .extensions
        .insert(granary_node::cluster::forward::Forwarded);
    match forwarder
        .decide_bodiless("s3", &forwarded, Some("photos"))
        .await
    {
        Ok(Decision::Refuse { not_primary, .. }) => assert!(not_primary),
        other => panic!("a forwarded request is refused, not {other:?}"),
    }
    assert_eq!(c_hits.load(Ordering::SeqCst), 1);

    stop.send(true).unwrap();
    task.await.unwrap();
}
