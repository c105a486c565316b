//! Per-tenant rate limits against a real node: requests/s and bytes/s from the Tenant's
//! QoS, refused with `SlowDown` and `Retry-After` (S3 and KV), admitted at most at the
//! limit, retried successfully by the AWS SDK, and changed without a restart.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use aws_sdk_s3::primitives::ByteStream;
use granary_e2e::{Admin, KvClient, NodeProc, s3_client};
use serde_json::json;

async fn limited_tenant(admin: &Admin, name: &str, qos: serde_json::Value) -> (String, String) {
    admin
        .tenant_with_spec(name, json!({"qos": qos}))
        .await
        .unwrap()
}

/// A tenant limited to R requests/s, hammered by 8 clients for 30 s, is admitted at most
/// 1.1 R/s (and not much less than R); every refusal is `SlowDown` with `Retry-After`.
/// The AWS SDK with its standard retries then gets every request through; an unlimited
/// tenant on the same node is never refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tenant_is_admitted_at_its_request_rate() {
    const R: u64 = 20;
    const SECS: u64 = 30;
    let dir = tempfile::tempdir().unwrap();
    let node = NodeProc::start(dir.path()).unwrap();
    let admin = Admin::new(&node);
    let (ak, sk) = limited_tenant(&admin, "limited", json!({"requestsPerSecond": R})).await;
    let c = s3_client(&node.s3, &ak, &sk);
    // Creating the bucket spends a token or two: wait for a full bucket.
    c.create_bucket().bucket("rlim").send().await.unwrap();
    tokio::time::sleep(Duration::from_secs(2)).await;

    let admitted = Arc::new(AtomicU64::new(0));
    let refused = Arc::new(AtomicU64::new(0));
    let deadline = Instant::now() + Duration::from_secs(SECS);
    let mut tasks = Vec::new();
    for _ in 0..8 {
        let (c, admitted, refused) = (c.clone(), admitted.clone(), refused.clone());
        tasks.push(tokio::spawn(async move {
            while Instant::now() < deadline {
                match c.head_bucket().bucket("rlim").send().await {
                    Ok(_) => {
                        admitted.fetch_add(1, Ordering::Relaxed);
                    }
                    Err(e) => {
                        let raw = e.raw_response().expect("an HTTP answer");
                        assert_eq!(raw.status().as_u16(), 503, "{e:?}");
                        let retry: u64 = raw
                            .headers()
                            .get("retry-after")
                            .expect("Retry-After")
                            .parse()
                            .unwrap();
                        assert!((1..=2).contains(&retry), "Retry-After {retry}");
                        refused.fetch_add(1, Ordering::Relaxed);
                        tokio::time::sleep(Duration::from_millis(20)).await;
                    }
                }
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let (ok, no) = (
        admitted.load(Ordering::Relaxed),
        refused.load(Ordering::Relaxed),
    );
    let rate = ok as f64 / SECS as f64;
    println!("admitted {ok} ({rate:.1}/s against a limit of {R}/s), refused {no}");
    assert!(ok as f64 <= 1.1 * (R * SECS) as f64, "admitted {ok}");
    assert!(ok as f64 >= 0.8 * (R * SECS) as f64, "admitted only {ok}");
    assert!(no > 0);

    // A refusal through GET carries the S3 error code too.
    let burst: Vec<_> = (0..60)
        .map(|_| {
            let c = c.clone();
            tokio::spawn(async move { c.list_objects_v2().bucket("rlim").send().await })
        })
        .collect();
    let mut codes = Vec::new();
    for b in burst {
        if let Err(e) = b.await.unwrap() {
            codes.push(
                aws_sdk_s3::error::ProvideErrorMetadata::code(&e)
                    .unwrap_or("?")
                    .to_string(),
            );
        }
    }
    assert!(
        !codes.is_empty() && codes.iter().all(|c| c == "SlowDown"),
        "{codes:?}"
    );

    // The SDK's standard retries (with backoff) get every request through.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let retrying = aws_sdk_s3::Client::from_conf(
        c.config()
            .to_builder()
            .retry_config(aws_sdk_s3::config::retry::RetryConfig::standard().with_max_attempts(10))
            .build(),
    );
    let mut sdk = Vec::new();
    for i in 0..40 {
        let c = retrying.clone();
        sdk.push(tokio::spawn(async move {
            c.put_object()
                .bucket("rlim")
                .key(format!("k{i}"))
                .body(ByteStream::from_static(b"x"))
                .send()
                .await
        }));
    }
    for s in sdk {
        s.await.unwrap().expect("the SDK's retries get through");
    }

    // The tenant's series count what happened (labels: the tenant's name only).
    let page = node.metrics().await.unwrap();
    let admitted_series =
        granary_e2e::cluster::metric(&page, "granary_tenant_requests_total{tenant=\"limited\"}");
    let throttled_series = granary_e2e::cluster::metric(
        &page,
        "granary_tenant_throttled_total{tenant=\"limited\",limit=\"requests\"}",
    );
    assert!(admitted_series >= ok as f64, "{admitted_series} < {ok}");
    assert!(throttled_series >= no as f64, "{throttled_series} < {no}");

    // Another tenant on the same node is not limited by this one.
    let free = s3_client(&node.s3, &node.access_key, &node.secret_key);
    free.create_bucket().bucket("free").send().await.unwrap();
    for _ in 0..200 {
        free.head_bucket().bucket("free").send().await.unwrap();
    }
}

/// A tenant limited in bytes/s may take one large transfer into debt, then waits it out
/// (S3 and KV answer `SlowDown` with a `Retry-After` that covers the debt); lifting the
/// limit takes effect within the QoS re-read interval (5 s), without a restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tenant_is_held_to_its_bandwidth() {
    let dir = tempfile::tempdir().unwrap();
    let node = NodeProc::start(dir.path()).unwrap();
    let admin = Admin::new(&node);
    let mib = 1u64 << 20;
    // 4 MiB at 256 KiB/s: 16 s of debt, far more than the PUT itself can take.
    let (ak, sk) = limited_tenant(
        &admin,
        "narrow",
        json!({"bandwidthBytesPerSecond": 256 * 1024}),
    )
    .await;
    let c = s3_client(&node.s3, &ak, &sk);
    c.create_bucket().bucket("bwlim").send().await.unwrap();
    c.put_object()
        .bucket("bwlim")
        .key("big")
        .body(ByteStream::from(vec![7u8; 4 * mib as usize]))
        .send()
        .await
        .expect("one transfer may go into debt");
    let e = c
        .head_object()
        .bucket("bwlim")
        .key("big")
        .send()
        .await
        .unwrap_err();
    let raw = e.raw_response().unwrap();
    assert_eq!(raw.status().as_u16(), 503);
    let retry: u64 = raw.headers().get("retry-after").unwrap().parse().unwrap();
    assert!(
        (5..=17).contains(&retry),
        "Retry-After {retry} for 4 MiB at 256 KiB/s"
    );
    // The KV API answers the same way, in JSON.
    let kv = KvClient::new(&node.kv, &ak, &sk);
    let r = kv.send("GET", "/kv/v1/ns/k", &[], vec![]).await.unwrap();
    assert_eq!(r.status(), 503);
    assert!(r.headers().contains_key("retry-after"));
    let body: serde_json::Value = r.json().await.unwrap();
    assert_eq!(body["error"], "SlowDown", "{body}");
    assert!(body["retryAfterSeconds"].as_u64().unwrap() >= 1, "{body}");

    // Lifting the limit: admitted again within the re-read interval (and the debt).
    let (s, v) = admin
        .call(
            reqwest::Method::PUT,
            "/tenants/narrow",
            Some(json!({"qos": {}})),
        )
        .await
        .unwrap();
    assert_eq!(s, 200, "{v}");
    // Within the re-read interval (5 s) every node reads the new QoS: no limit then.
    tokio::time::sleep(Duration::from_secs(6)).await;
    for _ in 0..20 {
        let o = c
            .get_object()
            .bucket("bwlim")
            .key("big")
            .send()
            .await
            .expect("no bandwidth limit any more");
        assert_eq!(o.body.collect().await.unwrap().into_bytes().len(), 4 << 20);
    }
}

/// A tenant's concurrent requests are capped (`maxConcurrentRequests`): a request is
/// held from its admission until its response body is done, so two unread downloads
/// keep a third request out (`SlowDown`) until one of them is dropped; other tenants
/// are not held back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tenants_concurrent_requests_are_capped() {
    let dir = tempfile::tempdir().unwrap();
    let node = NodeProc::start(dir.path()).unwrap();
    let admin = Admin::new(&node);
    let (ak, sk) = limited_tenant(&admin, "twoatatime", json!({"maxConcurrentRequests": 2})).await;
    let c = s3_client(&node.s3, &ak, &sk);
    c.create_bucket().bucket("capped").send().await.unwrap();
    c.put_object()
        .bucket("capped")
        .key("big")
        .body(ByteStream::from(vec![1u8; 48 << 20]))
        .send()
        .await
        .unwrap();
    // Two downloads whose bodies are not read: both stay in flight.
    let g1 = c
        .get_object()
        .bucket("capped")
        .key("big")
        .send()
        .await
        .unwrap();
    let g2 = c
        .get_object()
        .bucket("capped")
        .key("big")
        .send()
        .await
        .unwrap();
    let e = c
        .head_object()
        .bucket("capped")
        .key("big")
        .send()
        .await
        .unwrap_err();
    let raw = e.raw_response().unwrap();
    assert_eq!(raw.status().as_u16(), 503, "{e:?}");
    assert_eq!(raw.headers().get("retry-after"), Some("1"));
    // The KV API counts the same slots.
    let kv = KvClient::new(&node.kv, &ak, &sk);
    let r = kv.send("GET", "/kv/v1/ns/k", &[], vec![]).await.unwrap();
    assert_eq!(r.status(), 503);
    assert_eq!(r.headers().get("retry-after").unwrap(), "1");
    // Another tenant is not affected.
    let other = s3_client(&node.s3, &node.access_key, &node.secret_key);
    other.create_bucket().bucket("other").send().await.unwrap();
    other.head_bucket().bucket("other").send().await.unwrap();
    // Dropping one download gives its slot back.
    drop(g1);
    let started = Instant::now();
    loop {
        match c.head_object().bucket("capped").key("big").send().await {
            Ok(_) => break,
            Err(_) if started.elapsed() < Duration::from_secs(10) => {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(e) => panic!("the slot was not given back: {e:?}"),
        }
    }
    let body = g2.body.collect().await.unwrap().into_bytes();
    assert_eq!(body.len(), 48 << 20);
}

/// Counts one answer to a limited tenant's request: admitted, or refused. Every
/// refusal must be a 503; the rate limit's carry Retry-After (a forward refused for a
/// busy peer would not, and is not counted). After a refusal, waits `pause`.
async fn tally<T, E: std::fmt::Debug>(
    answer: Result<T, aws_sdk_s3::error::SdkError<E, aws_sdk_s3::config::http::HttpResponse>>,
    admitted: &AtomicU64,
    refused: &AtomicU64,
    pause: Duration,
) {
    match answer {
        Ok(_) => {
            admitted.fetch_add(1, Ordering::Relaxed);
        }
        Err(e) => {
            let raw = e.raw_response().expect("an HTTP answer");
            assert_eq!(raw.status().as_u16(), 503, "{e:?}");
            if raw.headers().get("retry-after").is_some() {
                refused.fetch_add(1, Ordering::Relaxed);
            }
            tokio::time::sleep(pause).await;
        }
    }
}

/// HEAD requests of a rate-limited tenant against three nodes (each client on its own
/// node) for `secs`; what was admitted and refused (every refusal a 503; the rate
/// limit's carry Retry-After, a forward refused for a busy peer would not).
async fn hammer(clients: &[aws_sdk_s3::Client], buckets: &[String], secs: u64) -> (u64, u64) {
    let admitted = Arc::new(AtomicU64::new(0));
    let refused = Arc::new(AtomicU64::new(0));
    let deadline = Instant::now() + Duration::from_secs(secs);
    let mut tasks = Vec::new();
    for i in 0..9 {
        let c = clients[i % clients.len()].clone();
        let (admitted, refused) = (admitted.clone(), refused.clone());
        let buckets = buckets.to_vec();
        tasks.push(tokio::spawn(async move {
            let mut n = i;
            while Instant::now() < deadline {
                n += 1;
                let b = &buckets[n % buckets.len()];
                let answer = c.head_bucket().bucket(b).send().await;
                tally(answer, &admitted, &refused, Duration::from_millis(20)).await;
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    (
        admitted.load(Ordering::Relaxed),
        refused.load(Ordering::Relaxed),
    )
}

/// On three nodes a tenant limited to R requests/s gets its limit, not a third of it
/// nor three times it: the nodes share the limit by demand. Requests for one bucket all
/// end on its partition's primary (forwarded there by the other two nodes), which then
/// admits nearly all of R; requests for buckets led by every node are admitted at most
/// 1.1 R/s in aggregate over 30 s.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_three_nodes_a_tenant_gets_its_request_rate_in_aggregate() {
    use granary_e2e::cluster::{Settings, TestCluster};
    const R: u64 = 30;
    const PARTITIONS: u16 = 16;
    let c = TestCluster::start(
        3,
        Settings {
            partitions: PARTITIONS,
            ..Settings::default()
        },
    )
    .unwrap();
    c.wait_balanced(60).await;
    let admin = Admin::new(&c.nodes[0].proc);
    let (ak, sk) = limited_tenant(&admin, "limited", json!({"requestsPerSecond": R})).await;
    let clients: Vec<_> = c
        .nodes
        .iter()
        .map(|m| s3_client(&m.proc.s3, &ak, &sk))
        .collect();
    let buckets: Vec<String> = (0..6).map(|i| format!("rate-{i}")).collect();
    for b in &buckets {
        clients[0].create_bucket().bucket(b).send().await.unwrap();
    }
    tokio::time::sleep(Duration::from_secs(2)).await;

    // One bucket, one primary (counted once the nodes have told each other where the
    // demand is).
    hammer(&clients, &buckets[..1], 5).await;
    let secs = 15;
    let (ok, no) = hammer(&clients, &buckets[..1], secs).await;
    let rate = ok as f64 / secs as f64;
    println!("one bucket through 3 nodes: admitted {ok} ({rate:.1}/s against {R}/s), refused {no}");
    assert!(no > 0);
    assert!(ok as f64 <= 1.1 * (R * secs) as f64, "admitted {ok}");
    // Not a third of the limit (as when each node admitted 1/N).
    assert!(ok as f64 >= 0.75 * (R * secs) as f64, "admitted only {ok}");

    // Six buckets, spread over the partitions (and so, as a rule, over every node's
    // primaries): the limit holds in aggregate.
    hammer(&clients, &buckets, 5).await;
    let secs = 30;
    let (ok, no) = hammer(&clients, &buckets, secs).await;
    let rate = ok as f64 / secs as f64;
    println!("6 buckets through 3 nodes: admitted {ok} ({rate:.1}/s against {R}/s), refused {no}");
    assert!(no > 0);
    assert!(ok as f64 <= 1.1 * (R * secs) as f64, "admitted {ok}");
    assert!(ok as f64 >= 0.75 * (R * secs) as f64, "admitted only {ok}");

    // Bandwidth is shared by its own demand: a tenant limited to BW bytes/s writing to
    // one bucket through all three nodes gets about BW at the bucket's primary, not a
    // third of it. Bound: BW over the window, plus a second's burst and one body per
    // node that may overdraw.
    const BW: u64 = 1 << 20;
    const BODY: usize = 128 << 10;
    let clients = limited_clients(
        &c,
        &admin,
        "bw-limited",
        json!({"bandwidthBytesPerSecond": BW}),
        "bw-bucket",
    )
    .await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    pump(&clients, "bw-bucket", BODY, 5).await;
    let secs = 15;
    let (ok, no) = pump(&clients, "bw-bucket", BODY, secs).await;
    let bytes = ok * BODY as u64;
    println!(
        "one bucket through 3 nodes, bandwidth: admitted {bytes} bytes ({:.0} B/s against \
         {BW} B/s), refused {no}",
        bytes as f64 / secs as f64
    );
    assert!(no > 0, "the limit refused nothing");
    let bound = 1.1 * (BW * secs) as f64 + BW as f64 + 3.0 * BODY as f64;
    assert!(
        bytes as f64 <= bound,
        "admitted {bytes} bytes, bound {bound}"
    );
    // Not a third of the limit (as when each node admitted 1/N).
    assert!(
        bytes as f64 >= 0.6 * (BW * secs) as f64,
        "admitted only {bytes} bytes"
    );

    // maxConcurrentRequests is shared by its own demand too: downloads of one bucket
    // (so all on its primary), whose bodies nobody reads, through all three nodes, get
    // the whole cap there within seconds (each node held ceil(cap / 3) before), and
    // never more than the cap: the next one is refused (through every node: each
    // forwards it to that primary).
    const CAP: usize = 6;
    const BIG: usize = 48 << 20;
    let clients = limited_clients(
        &c,
        &admin,
        "conc-limited",
        json!({"maxConcurrentRequests": CAP}),
        "conc-bucket",
    )
    .await;
    let (_, t) = admin
        .call(reqwest::Method::GET, "/tenants/conc-limited", None)
        .await
        .unwrap();
    let tenant: granary_node::types::TenantId = t["id"].as_str().unwrap().parse().unwrap();
    let primary_of = |bucket: &str| {
        c.acting_primary(
            granary_node::types::PartitionId::of(tenant, bucket.as_bytes(), PARTITIONS).0,
        )
    };
    // A second bucket led by another node.
    let first = primary_of("conc-bucket").await.unwrap();
    let mut other = None;
    for i in 0..16 {
        let b = format!("conc-{i}");
        clients[0].create_bucket().bucket(&b).send().await.unwrap();
        if primary_of(&b).await.is_some_and(|p| p != first) {
            other = Some(b);
            break;
        }
    }
    let other = other.expect("a bucket led by another node");
    for b in ["conc-bucket", other.as_str()] {
        clients[0]
            .put_object()
            .bucket(b)
            .key("big")
            .body(ByteStream::from(vec![7u8; BIG]))
            .send()
            .await
            .unwrap();
    }
    // Holds downloads of `bucket` through every node in turn until `want` are held or
    // `secs` pass; every refusal must be a 503.
    let hold = |bucket: String, want: usize, secs: u64| {
        let clients = clients.clone();
        async move {
            let started = Instant::now();
            let (mut held, mut refused) = (Vec::new(), 0);
            while held.len() < want && started.elapsed() < Duration::from_secs(secs) {
                let get = clients[(held.len() + refused) % clients.len()]
                    .get_object()
                    .bucket(&bucket)
                    .key("big")
                    .send()
                    .await;
                match get {
                    Ok(g) => held.push(g),
                    Err(e) => {
                        let raw = e.raw_response().expect("an HTTP answer");
                        assert_eq!(raw.status().as_u16(), 503, "{e:?}");
                        refused += 1;
                        tokio::time::sleep(Duration::from_millis(200)).await;
                    }
                }
            }
            println!(
                "concurrency, {bucket}: {} downloads held after {:.1} s ({refused} refused)",
                held.len(),
                started.elapsed().as_secs_f64()
            );
            held
        }
    };
    let mut held = hold("conc-bucket".into(), CAP, 30).await;
    assert_eq!(held.len(), CAP, "the primary never held the whole cap");
    for client in &clients {
        let e = client
            .head_object()
            .bucket("conc-bucket")
            .key("big")
            .send()
            .await
            .unwrap_err();
        let raw = e.raw_response().expect("an HTTP answer");
        assert_eq!(raw.status().as_u16(), 503, "{e:?}");
        assert_eq!(raw.headers().get("retry-after"), Some("1"));
    }
    // The other bucket's primary hears that the cap is held (the nodes tell each other
    // every heartbeat) and grants one slot, its floor, however long the tenant keeps
    // asking there (its demand grows with every refusal): the slots held in all are
    // within cap + N - 1.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let elsewhere = hold(other.clone(), CAP, 6).await;
    assert_eq!(
        elsewhere.len(),
        1,
        "slots held elsewhere were granted again"
    );
    // Once the first downloads are done, their slots move to where the demand is.
    let body = held
        .pop()
        .unwrap()
        .body
        .collect()
        .await
        .unwrap()
        .into_bytes();
    assert_eq!(body.len(), BIG, "the body was held back, not lost");
    drop(held);
    let more = hold(other, CAP - 1, 20).await;
    assert_eq!(more.len(), CAP - 1, "the slots did not follow the demand");
}

/// A tenant with `qos`, one S3 client of it per node of `c`, and its bucket `bucket`.
async fn limited_clients(
    c: &granary_e2e::cluster::TestCluster,
    admin: &Admin,
    name: &str,
    qos: serde_json::Value,
    bucket: &str,
) -> Vec<aws_sdk_s3::Client> {
    let (ak, sk) = limited_tenant(admin, name, qos).await;
    let clients: Vec<_> = c
        .nodes
        .iter()
        .map(|m| s3_client(&m.proc.s3, &ak, &sk))
        .collect();
    clients[0]
        .create_bucket()
        .bucket(bucket)
        .send()
        .await
        .unwrap();
    clients
}

/// PUTs of `body` bytes by a bandwidth-limited tenant through three nodes (two clients
/// per node) for `secs`: how many were admitted and refused (each refusal a 503 with
/// Retry-After).
async fn pump(clients: &[aws_sdk_s3::Client], bucket: &str, body: usize, secs: u64) -> (u64, u64) {
    let admitted = Arc::new(AtomicU64::new(0));
    let refused = Arc::new(AtomicU64::new(0));
    let deadline = Instant::now() + Duration::from_secs(secs);
    let mut tasks = Vec::new();
    for i in 0..6 {
        let c = clients[i % clients.len()].clone();
        let (admitted, refused, bucket) = (admitted.clone(), refused.clone(), bucket.to_string());
        tasks.push(tokio::spawn(async move {
            let data = vec![i as u8; body];
            let mut n = 0;
            while Instant::now() < deadline {
                n += 1;
                let put = c
                    .put_object()
                    .bucket(&bucket)
                    .key(format!("o{i}-{}", n % 4))
                    .body(ByteStream::from(data.clone()))
                    .send()
                    .await;
                tally(put, &admitted, &refused, Duration::from_millis(50)).await;
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    (
        admitted.load(Ordering::Relaxed),
        refused.load(Ordering::Relaxed),
    )
}

/// The I/O scheduler's sum of seconds `tenant` waited, from a node's metrics page.
fn queue_wait(page: &str, tenant: &str) -> f64 {
    granary_e2e::cluster::metric(
        page,
        &format!("granary_tenant_queue_wait_seconds_total{{tenant=\"{tenant}\"}}"),
    )
}

/// Weighted-fair I/O (issue 10): while tenant A floods the node with concurrent 8 MiB
/// PUTs and GETs, so that its pieces queue for the scheduler's disk slots, tenant B's
/// small requests do not queue behind them: a request's turn takes no slot, and B's is
/// due first, so it goes at once (B's summed queue wait stays near zero) while A's
/// pieces wait. Before turns went ahead, B's each waited for the next slot release,
/// a whole piece write or chunk fsync of A's. The latency figures this gives are in
/// `bench/noisy.sh` (docs/benchmarks.md), not asserted here.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flooding_tenant_does_not_queue_a_quiet_one() {
    let dir = tempfile::tempdir().unwrap();
    // One disk slot: A's flood queues for certain.
    let node = NodeProc::start_with_env(dir.path(), &[("GRANARY_IO_SLOTS", "1")]).unwrap();
    let admin = Admin::new(&node);
    let (a_ak, a_sk) = admin.tenant_with_spec("flood-a", json!({})).await.unwrap();
    let (b_ak, b_sk) = admin.tenant_with_spec("quiet-b", json!({})).await.unwrap();
    let a = s3_client(&node.s3, &a_ak, &a_sk);
    let b = s3_client(&node.s3, &b_ak, &b_sk);
    a.create_bucket().bucket("flood").send().await.unwrap();
    b.create_bucket().bucket("quiet").send().await.unwrap();
    let big: Vec<u8> = (0..8u32 << 20).map(|i| (i % 253) as u8).collect();
    a.put_object()
        .bucket("flood")
        .key("big")
        .body(big.clone().into())
        .send()
        .await
        .unwrap();
    b.put_object()
        .bucket("quiet")
        .key("small")
        .body(vec![7u8; 4096].into())
        .send()
        .await
        .unwrap();

    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let moved = Arc::new(AtomicU64::new(0));
    let mut flood = Vec::new();
    for i in 0..12 {
        let (a, big, stop, moved) = (a.clone(), big.clone(), stop.clone(), moved.clone());
        flood.push(tokio::spawn(async move {
            let mut n = 0u64;
            while !stop.load(Ordering::Relaxed) {
                if (i + n).is_multiple_of(2) {
                    a.put_object()
                        .bucket("flood")
                        .key(format!("k{i}"))
                        .body(big.clone().into())
                        .send()
                        .await
                        .expect("A's PUT");
                } else {
                    let got = a.get_object().bucket("flood").key("big").send().await;
                    let body = got.expect("A's GET").body.collect().await.unwrap();
                    assert_eq!(body.into_bytes().len(), big.len());
                }
                moved.fetch_add(big.len() as u64, Ordering::Relaxed);
                n += 1;
            }
        }));
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    let page = node.metrics().await.unwrap();
    let (a0, b0) = (queue_wait(&page, "flood-a"), queue_wait(&page, "quiet-b"));
    let t0 = Instant::now();
    let mut b_requests = 0u32;
    let mut slowest = Duration::ZERO;
    for j in 0..150 {
        let t = Instant::now();
        let got = b.get_object().bucket("quiet").key("small").send().await;
        assert_eq!(
            got.unwrap()
                .body
                .collect()
                .await
                .unwrap()
                .into_bytes()
                .len(),
            4096
        );
        b.put_object()
            .bucket("quiet")
            .key(format!("s{}", j % 10))
            .body(vec![j as u8; 4096].into())
            .send()
            .await
            .unwrap();
        b_requests += 2;
        slowest = slowest.max(t.elapsed());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let b_secs = t0.elapsed();
    let page = node.metrics().await.unwrap();
    let (a_wait, b_wait) = (
        queue_wait(&page, "flood-a") - a0,
        queue_wait(&page, "quiet-b") - b0,
    );
    stop.store(true, Ordering::Relaxed);
    for f in flood {
        f.await.unwrap();
    }
    println!(
        "noisy neighbour (debug build): A moved {:.0} MiB; over {b_secs:.1?} A's pieces waited \
         {a_wait:.2} s in the I/O scheduler, B's {b_requests} requests {:.3} ms in all \
         (slowest GET+PUT pair {slowest:.1?})",
        moved.load(Ordering::Relaxed) as f64 / 1048576.0,
        b_wait * 1000.0
    );
    // B's series are there under its name (a wrong label would make the wait 0 too).
    assert!(
        granary_e2e::cluster::metric(&page, "granary_tenant_requests_total{tenant=\"quiet-b\"}")
            >= f64::from(b_requests),
        "B's requests are counted under its name"
    );
    assert!(
        a_wait > 1.0,
        "A's flood must have queued for the disk slots for this to test anything: {a_wait} s"
    );
    assert!(
        b_wait < 0.0005 * f64::from(b_requests),
        "B's small requests waited {b_wait} s in the I/O scheduler behind A's flood \
         ({b_requests} requests; A's pieces waited {a_wait} s)"
    );
}
