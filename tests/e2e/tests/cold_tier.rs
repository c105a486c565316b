//! The cold tier (`object_store`): bucket lifecycle rules and tenant `tiering` policies
//! move object data to a local directory or to another Granary over S3; reads (full,
//! ranged, CopyObject source) are unchanged; overwrites, deletes and a tenant purge
//! remove the cold copies; an unreachable cold tier fails cold reads fast with 503 while
//! hot data is served; SIGKILL while objects move loses nothing and leaves no orphan.

use std::path::Path;
use std::time::{Duration, Instant};

use aws_sdk_s3::types::{
    BucketLifecycleConfiguration, ExpirationStatus, LifecycleExpiration, LifecycleRule,
    LifecycleRuleFilter, Transition, TransitionStorageClass,
};
use granary_e2e::{Admin, NodeProc, chunk_files, s3_client};
use md5::Digest;

fn data(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| ((i as u64).wrapping_mul(2_654_435_761) >> 13) as u8 ^ seed)
        .collect()
}

fn files_under(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(d).into_iter().flatten().flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else if !p.to_string_lossy().contains("#") {
                out.push(p);
            }
        }
    }
    out
}

/// Env of a node whose cold tier is `url`, with a fast mover (1 s passes, 2 s grace).
fn cold_env(url: &str) -> Vec<(&'static str, String)> {
    vec![
        ("GRANARY_COLD_TIER", url.to_string()),
        ("GRANARY_COLD_TIER_PERIOD_SECS", "1".into()),
        ("GRANARY_COLD_TIER_ORPHAN_GRACE_SECS", "2".into()),
        ("GRANARY_COLD_TIER_TIMEOUT_SECS", "3".into()),
    ]
}

fn start(dir: &Path, env: &[(&'static str, String)]) -> NodeProc {
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    NodeProc::start_with_env(dir, &env).expect("starting the node")
}

async fn storage_class(s3: &aws_sdk_s3::Client, bucket: &str, key: &str) -> Option<String> {
    s3.head_object()
        .bucket(bucket)
        .key(key)
        .send()
        .await
        .ok()
        .and_then(|h| h.storage_class().map(|c| c.as_str().to_string()))
}

async fn wait_cold(s3: &aws_sdk_s3::Client, bucket: &str, keys: &[&str], secs: u64) {
    let t0 = Instant::now();
    loop {
        let mut all = true;
        for k in keys {
            if storage_class(s3, bucket, k).await.as_deref() != Some("GLACIER_IR") {
                all = false;
            }
        }
        if all {
            return;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(secs),
            "{keys:?} did not all move to the cold tier within {secs} s"
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

async fn get(s3: &aws_sdk_s3::Client, bucket: &str, key: &str, range: Option<&str>) -> Vec<u8> {
    let mut r = s3.get_object().bucket(bucket).key(key);
    if let Some(range) = range {
        r = r.range(range);
    }
    let out = r
        .send()
        .await
        .unwrap_or_else(|e| panic!("GET {key} {range:?}: {e:?}"));
    out.body.collect().await.unwrap().into_bytes().to_vec()
}

async fn wait_until(what: &str, secs: u64, mut f: impl AsyncFnMut() -> bool) {
    let t0 = Instant::now();
    while !f().await {
        assert!(
            t0.elapsed() < Duration::from_secs(secs),
            "timed out after {secs} s waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

fn cold_rule(prefix: &str, class: &str) -> LifecycleRule {
    LifecycleRule::builder()
        .id(format!("to-{class}"))
        .status(ExpirationStatus::Enabled)
        .filter(LifecycleRuleFilter::builder().prefix(prefix).build())
        .transitions(
            Transition::builder()
                .days(0)
                .storage_class(TransitionStorageClass::from(class))
                .build(),
        )
        .build()
        .unwrap()
}

/// Sets `rule` as the bucket's only lifecycle rule.
async fn put_rule(s3: &aws_sdk_s3::Client, bucket: &str, rule: LifecycleRule) {
    s3.put_bucket_lifecycle_configuration()
        .bucket(bucket)
        .lifecycle_configuration(
            BucketLifecycleConfiguration::builder()
                .rules(rule)
                .build()
                .unwrap(),
        )
        .send()
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lifecycle_rules_move_objects_to_a_local_cold_tier_and_reads_are_unchanged() {
    let dir = tempfile::tempdir().unwrap();
    let cold = dir.path().join("cold");
    let node = start(
        &dir.path().join("node"),
        &cold_env(&format!("file://{}", cold.display())),
    );
    let s3 = s3_client(&node.s3, &node.access_key, &node.secret_key);
    s3.create_bucket().bucket("lc-bucket").send().await.unwrap();

    // Unsupported lifecycle elements are refused, not ignored.
    let expiring = LifecycleRule::builder()
        .id("expire")
        .status(ExpirationStatus::Enabled)
        .filter(LifecycleRuleFilter::builder().prefix("").build())
        .expiration(LifecycleExpiration::builder().days(1).build())
        .build()
        .unwrap();
    let err = s3
        .put_bucket_lifecycle_configuration()
        .bucket("lc-bucket")
        .lifecycle_configuration(
            BucketLifecycleConfiguration::builder()
                .rules(expiring)
                .build()
                .unwrap(),
        )
        .send()
        .await
        .expect_err("an Expiration rule is not supported");
    assert_eq!(
        err.raw_response().map(|r| r.status().as_u16()),
        Some(501),
        "{err:?}"
    );
    let err = s3
        .put_bucket_lifecycle_configuration()
        .bucket("lc-bucket")
        .lifecycle_configuration(
            BucketLifecycleConfiguration::builder()
                .rules(cold_rule("cold/", "REDUCED_REDUNDANCY"))
                .build()
                .unwrap(),
        )
        .send()
        .await
        .expect_err("not a cold storage class");
    assert_eq!(
        err.raw_response().map(|r| r.status().as_u16()),
        Some(400),
        "{err:?}"
    );

    // Objects under cold/ move at the mover's next pass (Days: 0); hot/ stays.
    let small = data(4096, 1);
    let mid = data(8 << 20, 2);
    let big = data(100 << 20, 3);
    for (k, v) in [
        ("cold/small", &small),
        ("cold/mid", &mid),
        ("cold/big", &big),
        ("hot/x", &small),
    ] {
        s3.put_object()
            .bucket("lc-bucket")
            .key(k)
            .body(v.clone().into())
            .send()
            .await
            .unwrap();
    }
    let hot_files = chunk_files(&node.data_dir).len();
    assert!(
        hot_files >= 2,
        "the 8 and 100 MiB objects are in chunk files"
    );
    put_rule(&s3, "lc-bucket", cold_rule("cold/", "GLACIER")).await;
    let lc = s3
        .get_bucket_lifecycle_configuration()
        .bucket("lc-bucket")
        .send()
        .await
        .unwrap();
    let rule = &lc.rules()[0];
    assert_eq!(rule.transitions()[0].days(), Some(0));
    assert_eq!(
        rule.transitions()[0].storage_class().map(|c| c.as_str()),
        Some("GLACIER")
    );
    assert_eq!(
        rule.filter().and_then(|f| f.prefix()),
        Some("cold/"),
        "{lc:?}"
    );

    let t0 = Instant::now();
    wait_cold(
        &s3,
        "lc-bucket",
        &["cold/small", "cold/mid", "cold/big"],
        120,
    )
    .await;
    eprintln!(
        "cold tier: 108 MiB moved to a local directory within {:.1?}",
        t0.elapsed()
    );
    assert_eq!(
        storage_class(&s3, "lc-bucket", "hot/x").await,
        None,
        "hot/x stays hot"
    );
    // The local chunk files are freed (after the grace for reads in flight); the cold
    // directory holds one copy per object.
    wait_until("the local chunk files to be freed", 60, async || {
        chunk_files(&node.data_dir).is_empty()
    })
    .await;
    assert_eq!(files_under(&cold).len(), 3, "{:?}", files_under(&cold));

    // Reads: whole, ranges across piece boundaries, the last bytes, a CopyObject source.
    assert_eq!(get(&s3, "lc-bucket", "cold/small", None).await, small);
    assert_eq!(get(&s3, "lc-bucket", "cold/mid", None).await, mid);
    assert_eq!(get(&s3, "lc-bucket", "cold/big", None).await, big);
    for (range, lo, hi) in [
        ("bytes=1048570-1048590", 1048570usize, 1048591usize),
        ("bytes=52428800-55574527", 52428800, 55574528),
        ("bytes=-10", big.len() - 10, big.len()),
        ("bytes=0-0", 0, 1),
    ] {
        assert_eq!(
            get(&s3, "lc-bucket", "cold/big", Some(range)).await,
            big[lo..hi],
            "range {range}"
        );
    }
    assert_eq!(
        get(&s3, "lc-bucket", "cold/small", Some("bytes=100-199")).await,
        small[100..200]
    );
    s3.copy_object()
        .bucket("lc-bucket")
        .key("hot/big-copy")
        .copy_source("lc-bucket/cold/big")
        .send()
        .await
        .unwrap();
    assert_eq!(get(&s3, "lc-bucket", "hot/big-copy", None).await, big);
    assert_eq!(storage_class(&s3, "lc-bucket", "hot/big-copy").await, None);

    // An overwrite and a delete remove the old copies; the new version moves too.
    let small2 = data(5000, 9);
    s3.put_object()
        .bucket("lc-bucket")
        .key("cold/small")
        .body(small2.clone().into())
        .send()
        .await
        .unwrap();
    s3.delete_object()
        .bucket("lc-bucket")
        .key("cold/mid")
        .send()
        .await
        .unwrap();
    wait_cold(&s3, "lc-bucket", &["cold/small"], 60).await;
    assert_eq!(get(&s3, "lc-bucket", "cold/small", None).await, small2);
    wait_until(
        "the replaced and deleted cold copies to go",
        60,
        async || files_under(&cold).len() == 2,
    )
    .await;

    s3.delete_bucket_lifecycle()
        .bucket("lc-bucket")
        .send()
        .await
        .unwrap();
    let err = s3
        .get_bucket_lifecycle_configuration()
        .bucket("lc-bucket")
        .send()
        .await
        .expect_err("deleted");
    assert!(
        format!("{err:?}").contains("NoSuchLifecycleConfiguration"),
        "{err:?}"
    );
    // Emptying the bucket empties the cold tier.
    for k in ["cold/small", "cold/big", "hot/x", "hot/big-copy"] {
        s3.delete_object()
            .bucket("lc-bucket")
            .key(k)
            .send()
            .await
            .unwrap();
    }
    wait_until("the cold tier to be empty", 60, async || {
        files_under(&cold).is_empty()
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tenant_policy_moves_objects_to_another_granary_over_s3_which_may_stall() {
    // The cold tier: another node's bucket, through object_store's S3 client.
    let dir = tempfile::tempdir().unwrap();
    let mut target = NodeProc::start(&dir.path().join("target")).unwrap();
    let target_s3 = s3_client(&target.s3, &target.access_key, &target.secret_key);
    target_s3
        .create_bucket()
        .bucket("cold")
        .send()
        .await
        .unwrap();
    let mut env = cold_env("s3://cold/tier");
    env.extend([
        ("AWS_ACCESS_KEY_ID", target.access_key.clone()),
        ("AWS_SECRET_ACCESS_KEY", target.secret_key.clone()),
        ("AWS_ENDPOINT", target.s3.clone()),
        ("AWS_ALLOW_HTTP", "true".into()),
        ("AWS_REGION", "us-east-1".into()),
    ]);
    let node = start(&dir.path().join("node"), &env);
    let admin = Admin::new(&node);
    let (ak, sk) = admin
        .tenant_with_spec(
            "archive",
            serde_json::json!({"tiering": {"coldAfterSeconds": 1, "minObjectSize": 1000}}),
        )
        .await
        .unwrap();
    let s3 = s3_client(&node.s3, &ak, &sk);
    s3.create_bucket().bucket("docs").send().await.unwrap();
    let small = data(4096, 4);
    let mid = data(8 << 20, 5);
    let tiny = data(100, 6);
    for (k, v) in [("small", &small), ("mid", &mid), ("tiny", &tiny)] {
        s3.put_object()
            .bucket("docs")
            .key(k)
            .body(v.clone().into())
            .send()
            .await
            .unwrap();
    }
    wait_cold(&s3, "docs", &["small", "mid"], 120).await;
    assert_eq!(
        storage_class(&s3, "docs", "tiny").await,
        None,
        "below minObjectSize: stays hot"
    );
    let listed = |s3: aws_sdk_s3::Client| async move {
        s3.list_objects_v2()
            .bucket("cold")
            .send()
            .await
            .map(|o| o.contents().len())
            .unwrap_or(usize::MAX)
    };
    assert_eq!(
        listed(target_s3.clone()).await,
        2,
        "two copies in the cold bucket"
    );
    // Usage splits hot from cold (the total, which quotas limit, counts both), in the
    // admin API and the node's metrics.
    let (st, u) = admin
        .call(reqwest::Method::GET, "/tenants/archive/usage", None)
        .await
        .unwrap();
    assert_eq!(st, 200, "{u}");
    let cold_bytes = (4096 + (8 << 20)) as u64;
    assert_eq!(u["coldBytes"], cold_bytes, "{u}");
    assert_eq!(u["hotBytes"], 100, "{u}");
    assert_eq!(u["storageBytes"], cold_bytes + 100, "{u}");
    // (The gauges are refreshed every 5 s.)
    let series = format!("granary_stored_bytes{{tier=\"cold\"}} {cold_bytes}");
    wait_until("the cold-bytes gauge", 30, async || {
        node.metrics().await.unwrap().contains(&series)
    })
    .await;
    assert_eq!(get(&s3, "docs", "small", None).await, small);
    assert_eq!(
        get(&s3, "docs", "mid", Some("bytes=4194300-4194400")).await,
        mid[4194300..4194401]
    );

    // The cold tier stalls (SIGSTOP): cold reads answer 503 within the timeout (3 s)
    // instead of hanging; hot objects and new writes are served.
    let target_pid = target.pid().expect("target pid").to_string();
    assert!(
        std::process::Command::new("kill")
            .args(["-STOP", &target_pid])
            .status()
            .unwrap()
            .success()
    );
    let t0 = Instant::now();
    let err = s3
        .get_object()
        .bucket("docs")
        .key("mid")
        .send()
        .await
        .expect_err("the cold tier does not answer");
    let waited = t0.elapsed();
    assert_eq!(
        err.raw_response().map(|r| r.status().as_u16()),
        Some(503),
        "{err:?}"
    );
    assert!(
        waited < Duration::from_secs(15),
        "the cold read took {waited:?}"
    );
    eprintln!(
        "cold tier: a read of a cold object failed after {waited:.1?} while the tier was stopped"
    );
    assert_eq!(get(&s3, "docs", "tiny", None).await, tiny);
    s3.put_object()
        .bucket("docs")
        .key("new")
        .body(vec![1u8; 10].into())
        .send()
        .await
        .unwrap();
    assert!(
        std::process::Command::new("kill")
            .args(["-CONT", &target_pid])
            .status()
            .unwrap()
            .success()
    );
    wait_until("cold reads to work again", 60, async || {
        s3.get_object()
            .bucket("docs")
            .key("mid")
            .send()
            .await
            .is_ok()
    })
    .await;
    assert_eq!(get(&s3, "docs", "mid", None).await, mid);

    // A copy no record names (as an interrupted move leaves) is swept once older than
    // the grace, under the store's prefix ("tier/").
    target_s3
        .put_object()
        .bucket("cold")
        .key("tier/p00000/bstray/0000000000000001-0000000000000002")
        .body(vec![7u8; 100].into())
        .send()
        .await
        .unwrap();
    assert_eq!(listed(target_s3.clone()).await, 3);
    wait_until("the unnamed copy to be swept", 60, async || {
        listed(target_s3.clone()).await == 2
    })
    .await;
    assert_eq!(
        get(&s3, "docs", "small", None).await,
        small,
        "named copies stay"
    );

    // A tenant purge leaves nothing in the cold bucket.
    let (status, v) = admin
        .call(reqwest::Method::DELETE, "/tenants/archive?purge=true", None)
        .await
        .unwrap();
    assert!(status == 204 || status == 200, "purge: {status} {v}");
    wait_until("the cold bucket to be empty", 60, async || {
        listed(target_s3.clone()).await == 0
    })
    .await;
    target.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_while_objects_move_loses_nothing_and_leaves_no_orphan() {
    let dir = tempfile::tempdir().unwrap();
    let cold = dir.path().join("cold");
    let data_dir = dir.path().join("node");
    let env = cold_env(&format!("file://{}", cold.display()));
    let mut node = start(&data_dir, &env);
    let mut s3 = s3_client(&node.s3, &node.access_key, &node.secret_key);
    s3.create_bucket().bucket("lc-bucket").send().await.unwrap();
    put_rule(&s3, "lc-bucket", cold_rule("", "GLACIER")).await;
    let mut objects: Vec<(String, [u8; 16])> = Vec::new();
    let cycles = std::env::var("GRANARY_CRASH_CYCLES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(5usize)
        .clamp(5, 50);
    for cycle in 0..cycles {
        for i in 0..3 {
            let key = format!("c{cycle}/o{i}");
            let v = data(if i == 0 { 3000 } else { 20 << 20 }, (cycle * 3 + i) as u8);
            s3.put_object()
                .bucket("lc-bucket")
                .key(&key)
                .body(v.clone().into())
                .send()
                .await
                .unwrap();
            objects.push((key, md5::Md5::digest(&v).into()));
        }
        // Kill at a random point of the next passes (1 s apart).
        let wait = 200 + rand::random::<u64>() % 2500;
        tokio::time::sleep(Duration::from_millis(wait)).await;
        node.kill9();
        node = start(&data_dir, &env);
        s3 = s3_client(&node.s3, &node.access_key, &node.secret_key);
        for (k, sum) in &objects {
            let got = get(&s3, "lc-bucket", k, None).await;
            assert_eq!(
                <[u8; 16]>::from(md5::Md5::digest(&got)),
                *sum,
                "{k} changed after the kill in cycle {cycle} (killed {wait} ms after the writes)"
            );
        }
    }
    // Every object ends up cold, exactly one copy each; no local chunk file is left.
    let keys: Vec<&str> = objects.iter().map(|(k, _)| k.as_str()).collect();
    wait_cold(&s3, "lc-bucket", &keys, 300).await;
    wait_until(
        "one cold copy per object (orphans swept) and no local chunk file",
        120,
        async || files_under(&cold).len() == objects.len() && chunk_files(&data_dir).is_empty(),
    )
    .await;
    for (k, sum) in &objects {
        let got = get(&s3, "lc-bucket", k, None).await;
        assert_eq!(<[u8; 16]>::from(md5::Md5::digest(&got)), *sum, "{k}");
    }
}

/// On a cluster (three `serve` nodes in network namespaces, replication factor 3, one
/// cold directory every node reaches): only each partition's primary moves objects (one
/// cold copy per object, one move each), the replicas switch through replication (every
/// node frees its chunk files and counts the bytes as cold), cold objects read back
/// identical through any node and after their primary is SIGKILLed, and a node that
/// joins takes its partitions without their cold data (its chunk store stays empty).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_a_cluster_primaries_move_and_replicas_follow() {
    use granary_e2e::cluster::{Settings, TestCluster, admin, eventually, metric};

    let cold_dir = tempfile::tempdir().unwrap();
    let mut c = TestCluster::start(
        4,
        Settings {
            partitions: 16,
            start_nodes: 3,
            extra_config: format!(
                "cold_tier = \"file://{}\"\ncold_tier_period_secs = 1\ncold_tier_timeout_secs = 5\n",
                cold_dir.path().display()
            ),
            ..Settings::default()
        },
    )
    .unwrap();
    c.wait_ready().await;
    let (ak, sk, _) = c.tenant("archive").await;
    let client = |c: &TestCluster, i: usize| s3_client(&c.nodes[i].proc.s3, &ak, &sk);
    let s3 = client(&c, 1);
    let buckets: Vec<String> = (0..6).map(|i| format!("cold-{i}")).collect();
    let mut objects = Vec::new();
    for (i, b) in buckets.iter().enumerate() {
        s3.create_bucket().bucket(b).send().await.unwrap();
        for (k, v) in [
            ("big", data(3 << 20, i as u8)),
            ("small", data(2048, 100 + i as u8)),
        ] {
            s3.put_object()
                .bucket(b)
                .key(k)
                .body(v.clone().into())
                .send()
                .await
                .unwrap();
            objects.push((b.clone(), k, v));
        }
    }
    let total: u64 = objects.iter().map(|(_, _, v)| v.len() as u64).sum();
    for i in 0..3 {
        assert!(
            !chunk_files(&c.nodes[i].proc.data_dir).is_empty(),
            "n{} holds chunk files of the replicated objects",
            i + 1
        );
    }

    for b in &buckets {
        put_rule(&s3, b, cold_rule("", "GLACIER")).await;
    }
    let t0 = Instant::now();
    for b in &buckets {
        wait_cold(&s3, b, &["big", "small"], 120).await;
    }
    println!(
        "cluster: {} objects ({total} bytes) moved within {:.1?}",
        objects.len(),
        t0.elapsed()
    );

    // One cold copy per object, made once, by the object's primary.
    assert_eq!(
        files_under(cold_dir.path()).len(),
        objects.len(),
        "{:?}",
        files_under(cold_dir.path())
    );
    let mut moved = 0.0;
    for m in &c.nodes {
        moved += metric(
            &m.proc.metrics().await.unwrap(),
            "granary_cold_moved_objects_total",
        );
    }
    assert_eq!(moved as usize, objects.len(), "one move per object");

    // Every replica applied the switch: its chunk files are freed and it counts the
    // objects' bytes as cold.
    for m in &c.nodes {
        let dir = m.proc.data_dir.clone();
        eventually(&format!("{} frees its chunk files", m.id), 60, || async {
            chunk_files(&dir).is_empty().then_some(())
        })
        .await;
        // (The gauges are refreshed every 5 s.)
        eventually(
            &format!("{}: every copy it holds counted cold", m.id),
            30,
            || async {
                let page = m.proc.metrics().await.ok()?;
                let tiers = (
                    metric(&page, "granary_stored_bytes{tier=\"cold\"}") as u64,
                    metric(&page, "granary_stored_bytes{tier=\"hot\"}") as u64,
                );
                (tiers == (total, 0)).then_some(())
            },
        )
        .await;
        let u = admin(&m.proc, "/tenants/archive/usage").await;
        assert_eq!(
            (u["coldBytes"].as_u64(), u["hotBytes"].as_u64()),
            (Some(total), Some(0)),
            "{u}"
        );
    }

    // Reads through every node: whole and ranged.
    for i in 0..3 {
        let s3 = client(&c, i);
        for (b, k, v) in &objects {
            assert_eq!(&get(&s3, b, k, None).await, v, "{b}/{k} through n{}", i + 1);
        }
        assert_eq!(
            get(&s3, &buckets[0], "big", Some("bytes=1048570-2097160")).await,
            objects[0].2[1048570..2097161]
        );
    }

    // n1 is SIGKILLed: its partitions get new primaries, which read the same cold
    // copies.
    c.nodes[0].proc.kill9();
    let s3 = client(&c, 2);
    for (b, k, v) in &objects {
        let got = eventually(&format!("{b}/{k} readable without n1"), 60, || async {
            let r = s3.get_object().bucket(b).key(*k).send().await.ok()?;
            Some(r.body.collect().await.ok()?.into_bytes().to_vec())
        })
        .await;
        assert_eq!(&got, v, "{b}/{k} after n1 was killed");
    }
    let m = c.start_node(0).unwrap();
    c.nodes[0] = m;

    // n4 joins: it receives its partitions' records, not their cold data.
    c.add_node().unwrap();
    c.wait_balanced(120).await;
    let n4 = &c.nodes[3].proc;
    let n4_cold = eventually("n4 counts the cold objects it took", 30, || async {
        let page = n4.metrics().await.ok()?;
        let cold = metric(&page, "granary_stored_bytes{tier=\"cold\"}") as u64;
        (cold > 0).then_some(cold)
    })
    .await;
    assert!(
        chunk_files(&n4.data_dir).is_empty(),
        "n4 took {n4_cold} cold bytes' records and no chunk file"
    );
    let s3 = client(&c, 3);
    for (b, k, v) in &objects {
        assert_eq!(&get(&s3, b, k, None).await, v, "{b}/{k} through n4");
    }
    assert_eq!(files_under(cold_dir.path()).len(), objects.len());
    println!("cluster: n4 joined and holds {n4_cold} cold bytes' records, no chunk file");

    // Restore on read on the cluster: the first bucket loses its Days-0 rule, and the
    // tenant's policy restores an object after two reads (and moves it again only an
    // hour later). Reads go through n2, which forwards them to the primary, which
    // counts them.
    let (st, v) = Admin::new(&c.nodes[1].proc)
        .call(
            reqwest::Method::PUT,
            "/tenants/archive",
            Some(
                serde_json::json!({"tiering": {"coldAfterSeconds": 3600, "restoreAfterReads": 2}}),
            ),
        )
        .await
        .unwrap();
    assert_eq!(st, 200, "{v}");
    let s3 = client(&c, 1);
    s3.delete_bucket_lifecycle()
        .bucket(&buckets[0])
        .send()
        .await
        .unwrap();
    let (b, _, big) = &objects[0];
    // (Reads count once a pass has seen the policy: read until the restore happens.)
    eventually("the often-read object to be restored", 60, || async {
        assert_eq!(&get(&s3, b, "big", None).await, big);
        let head = s3.head_object().bucket(b).key("big").send().await.ok()?;
        head.storage_class().is_none().then_some(())
    })
    .await;
    // Its chunk files reach its three replicas (the switch waits for them).
    eventually("the restored chunk files on three nodes", 60, || async {
        let holding = c
            .nodes
            .iter()
            .filter(|m| !chunk_files(&m.proc.data_dir).is_empty())
            .count();
        (holding == 3).then_some(())
    })
    .await;
    let mut restored = 0.0;
    for (i, m) in c.nodes.iter().enumerate() {
        restored += metric(
            &m.proc.metrics().await.unwrap(),
            "granary_cold_restored_objects_total",
        );
        assert_eq!(
            &get(&client(&c, i), b, "big", None).await,
            big,
            "{b}/big restored, through n{}",
            i + 1
        );
    }
    assert_eq!(restored, 1.0, "restored once, by its primary");
    let u = admin(&c.nodes[2].proc, "/tenants/archive/usage").await;
    assert_eq!(
        u["hotBytes"].as_u64(),
        Some(big.len() as u64),
        "usage counts it hot again: {u}"
    );
}

/// Restore on read (the tenant's `restoreAfterReads`): a cold object read that many
/// times comes back to the hot tier at the mover's next pass (STANDARD again, its
/// chunk files back, its cold copy deleted after the grace, bytes identical), an
/// object read fewer times stays cold, and a restored object's age counts from its
/// restore, after which the policy moves it again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn objects_read_often_come_back_to_the_hot_tier() {
    let dir = tempfile::tempdir().unwrap();
    let cold = dir.path().join("cold");
    let node = start(
        &dir.path().join("node"),
        &cold_env(&format!("file://{}", cold.display())),
    );
    let node_dir = node.data_dir.clone();
    let admin = Admin::new(&node);
    let (st, v) = admin
        .call(
            reqwest::Method::POST,
            "/tenants",
            Some(serde_json::json!({"name": "zero", "tiering": {"restoreAfterReads": 0}})),
        )
        .await
        .unwrap();
    assert_eq!(st, 400, "restoreAfterReads 0 is refused: {v}");
    let (ak, sk) = admin
        .tenant_with_spec(
            "readers",
            serde_json::json!({"tiering": {"coldAfterSeconds": 3, "restoreAfterReads": 2}}),
        )
        .await
        .unwrap();
    let s3 = s3_client(&node.s3, &ak, &sk);
    s3.create_bucket().bucket("hot-again").send().await.unwrap();
    let small = data(4096, 7);
    let big = data(8 << 20, 8);
    for (k, v) in [("small", &small), ("big", &big)] {
        s3.put_object()
            .bucket("hot-again")
            .key(k)
            .body(v.clone().into())
            .send()
            .await
            .unwrap();
    }
    wait_cold(&s3, "hot-again", &["small", "big"], 60).await;
    assert_eq!(files_under(&cold).len(), 2, "two cold copies");
    wait_until("the local chunk files to be freed", 60, async || {
        chunk_files(&node_dir).is_empty()
    })
    .await;

    let copies_before = files_under(&cold);
    // Two reads of "big" (one whole, one ranged), one of "small".
    assert_eq!(get(&s3, "hot-again", "big", None).await, big);
    assert_eq!(
        get(&s3, "hot-again", "big", Some("bytes=1000-2000999")).await,
        big[1000..2_001_000]
    );
    assert_eq!(get(&s3, "hot-again", "small", None).await, small);
    wait_until("big to be restored", 30, async || {
        let head = s3.head_object().bucket("hot-again").key("big").send().await;
        head.expect("HEAD big").storage_class().is_none()
    })
    .await;
    assert_eq!(
        storage_class(&s3, "hot-again", "small").await.as_deref(),
        Some("GLACIER_IR"),
        "read once: stays cold"
    );
    assert!(
        !chunk_files(&node_dir).is_empty(),
        "big's chunk files are back"
    );
    assert_eq!(get(&s3, "hot-again", "big", None).await, big);
    assert_eq!(
        get(&s3, "hot-again", "big", Some("bytes=-5")).await,
        big[big.len() - 5..]
    );
    wait_until("the restore to be counted", 30, async || {
        let m = node.metrics().await.unwrap();
        m.contains("granary_cold_restored_objects_total 1")
    })
    .await;
    // The replaced cold copy goes after the grace (2 s); small's stays.
    wait_until("big's cold copy to be deleted", 30, async || {
        copies_before.iter().filter(|f| f.exists()).count() == 1
    })
    .await;

    // Cold again once its age, counted from the restore, passes the policy's 3 s.
    wait_cold(&s3, "hot-again", &["big"], 60).await;
    assert_eq!(get(&s3, "hot-again", "big", None).await, big);
    assert_eq!(files_under(&cold).len(), 2);
}
