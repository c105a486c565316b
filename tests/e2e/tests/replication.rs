//! Replication with real processes: three `serve` nodes in three zones (network
//! namespaces, real Postgres), replication factor 3. Every acknowledged write is on all
//! in-sync replicas (partition digests equal on every node right after the writes); a
//! stopped replica leaves the in-sync set and writes go on; resumed, it catches up from
//! the log, and after more writes than the log keeps, from a snapshot; a replica that
//! lost its disk is rebuilt.

use std::time::{Duration, Instant};

use aws_sdk_s3::primitives::ByteStream;
use futures::StreamExt;
use granary_e2e::cluster::{Settings, TestCluster, admin, eventually, metric, signal};
use granary_e2e::{KvClient, s3_client};
use granary_node::types::{PartitionId, TenantId};
use serde_json::Value;

const PARTITIONS: u16 = 16;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_reach_every_in_sync_replica_and_a_lagging_one_catches_up() {
    let c = TestCluster::start(
        3,
        Settings {
            partitions: PARTITIONS,
            ..Settings::default()
        },
    )
    .unwrap();
    let layout = c.wait_ready().await;
    for set in layout["inSync"].as_array().unwrap() {
        assert_eq!(set.as_array().unwrap().len(), 3, "{set}");
    }

    let (ak, sk, id) = c.tenant("acme").await;
    let tenant: TenantId = id.parse().unwrap();
    // Namespaces whose primary is not n3 (n3 will be stopped; its own partitions wait
    // for it, as failover is not there yet).
    let not_n3: Vec<String> = (0..)
        .map(|i| format!("live-{i}"))
        .filter(|ns| {
            let p = PartitionId::of(tenant, format!("kv:{ns}").as_bytes(), PARTITIONS);
            layout["actingPrimaries"][p.0 as usize] != "n3"
        })
        .take(3)
        .collect();
    let s3: Vec<_> = c
        .nodes
        .iter()
        .map(|m| s3_client(&m.proc.s3, &ak, &sk))
        .collect();
    let kv: Vec<KvClient> = c
        .nodes
        .iter()
        .map(|m| KvClient::new(&m.proc.kv, &ak, &sk))
        .collect();

    // Writes through every node: small and chunked objects, KV values.
    for b in 0..6 {
        let bucket = format!("bucket-{b}");
        s3[b % 3]
            .create_bucket()
            .bucket(&bucket)
            .send()
            .await
            .unwrap();
        for k in 0..4 {
            let len = if k == 0 { 300_000 } else { 1000 };
            s3[(b + k) % 3]
                .put_object()
                .bucket(&bucket)
                .key(format!("k{k}"))
                .body(ByteStream::from(vec![(b * 10 + k) as u8; len]))
                .send()
                .await
                .unwrap();
        }
    }
    for i in 0..60 {
        let r = kv[i % 3]
            .send(
                "PUT",
                &format!("/kv/v1/ns-{}/key-{i}", i % 7),
                &[],
                format!("v{i}").into_bytes(),
            )
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
    }
    // Acknowledged means on every in-sync replica: the digests agree at once.
    assert_eq!(c.differing(&[0, 1, 2]).await, Vec::<u16>::new());
    let d = c.digests(0).await;
    let written = d.iter().filter(|p| p["lsn"].as_u64().unwrap() > 0).count();
    assert!(written >= 5, "{written} partitions written");
    // The chunked objects' data is on every node.
    for m in &c.nodes {
        let files = granary_e2e::chunk_files(&m.proc.data_dir).len();
        assert!(files >= 6, "{}: {files} chunk files", m.id);
    }

    // n3 stops. Writes to every partition (n3 replicates all of them) go on once it
    // has left the in-sync sets.
    signal(&c.nodes[2].proc, "-STOP");
    let stopped = Instant::now();
    let r = kv[0]
        .send(
            "PUT",
            &format!("/kv/v1/{}/while-stopped", not_n3[0]),
            &[],
            b"x".to_vec(),
        )
        .await
        .unwrap();
    assert_eq!(r.status(), 200, "{}", r.text().await.unwrap());
    println!(
        "first write after a replica stopped: acknowledged after {:.1} s (suspect_after 2 s)",
        stopped.elapsed().as_secs_f64()
    );
    // More writes than a partition's log keeps (1024 entries), to one namespace: n3
    // will need a snapshot of that partition.
    let started = Instant::now();
    for i in 0..1100 {
        let r = kv[i % 2]
            .send(
                "PUT",
                &format!("/kv/v1/{}/key-{}", not_n3[1], i % 50),
                &[],
                format!("{i}").into_bytes(),
            )
            .await
            .unwrap();
        let status = r.status();
        assert_eq!(status, 200, "write {i}: {}", r.text().await.unwrap());
    }
    println!(
        "1100 writes with n3 stopped: {:.0} writes/s",
        1100.0 / started.elapsed().as_secs_f64()
    );
    for i in 0..40 {
        let r = kv[1]
            .send(
                "PUT",
                &format!("/kv/v1/{}/late-{i}", not_n3[2]),
                &[],
                vec![1],
            )
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
    }
    let l = admin(&c.nodes[0].proc, "/layout?partitions=true").await;
    assert!(l["partitionsOutOfSync"].as_u64().unwrap() > 0, "{l}");
    assert_eq!(
        c.differing(&[0, 1]).await,
        Vec::<u16>::new(),
        "n1 and n2 agree"
    );

    // n2 stops as well: a partition n1 leads is left with one in-sync replica, fewer
    // than min_in_sync (2). A write caught while n2 leaves the in-sync set is not
    // acknowledged (500 NotDurable: it may or may not last); once n2 is out, writes are
    // refused before they start (503 NotEnoughReplicas: nothing written).
    let n1_ns = (0..)
        .map(|i| format!("solo-{i}"))
        .find(|ns| {
            let p = PartitionId::of(tenant, format!("kv:{ns}").as_bytes(), PARTITIONS);
            layout["actingPrimaries"][p.0 as usize] == "n1"
        })
        .unwrap();
    signal(&c.nodes[1].proc, "-STOP");
    let not_durable = std::sync::atomic::AtomicU32::new(0);
    let path = format!("/kv/v1/{n1_ns}/k");
    let refused = eventually(
        "a write with too few in-sync replicas refused",
        30,
        || async {
            let r = kv[0]
                .send("PUT", &path, &[], b"one copy".to_vec())
                .await
                .unwrap();
            let status = r.status();
            let text = r.text().await.unwrap();
            assert!(
                [200, 500, 503].contains(&status.as_u16()),
                "{status}: {text}"
            );
            if status == 500 {
                assert!(text.contains("NotDurable"), "{text}");
                not_durable.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            }
            (status == 503).then_some(text)
        },
    )
    .await;
    assert!(refused.contains("NotEnoughReplicas"), "{refused}");
    println!(
        "{} writes answered NotDurable while n2 left the in-sync set",
        not_durable.into_inner()
    );
    let r = kv[0]
        .send(
            "PUT",
            &format!("/kv/v1/{n1_ns}/k"),
            &[],
            b"refused".to_vec(),
        )
        .await
        .unwrap();
    assert_eq!(r.status(), 503);
    signal(&c.nodes[1].proc, "-CONT");
    c.converge(&[0, 1], 60, "n2 caught up").await;
    let r = kv[0]
        .send("GET", &format!("/kv/v1/{n1_ns}/k"), &[], vec![])
        .await
        .unwrap();
    assert_ne!(
        r.bytes().await.unwrap().as_ref(),
        b"refused",
        "a refused write took effect"
    );

    // n3 resumes: it catches up (from the log, and from a snapshot where the log no
    // longer reaches back) and rejoins every in-sync set; all three agree.
    signal(&c.nodes[2].proc, "-CONT");
    c.converge(&[0, 1, 2], 60, "n3 caught up").await;
    eventually("n3 back in every in-sync set", 30, || async {
        let l = admin(&c.nodes[0].proc, "/layout?partitions=true").await;
        (l["partitionsOutOfSync"] == 0).then_some(())
    })
    .await;
    let got = kv[2]
        .send("GET", &format!("/kv/v1/{}/key-49", not_n3[1]), &[], vec![])
        .await
        .unwrap();
    assert_eq!(got.bytes().await.unwrap().as_ref(), b"1099");
    // The partition that took 1100 writes was reinstalled from a snapshot (its log
    // keeps 1024 entries); the others caught up from the log.
    let page = c.nodes[2].proc.metrics().await.unwrap();
    let resyncs = metric(&page, "granary_replica_resyncs_total");
    println!("n3 reinstalled {resyncs} partitions from snapshots");
    assert!(resyncs >= 1.0, "{page}");
    // The snapshots were streamed as background work through the primaries' I/O
    // schedulers.
    let mut background = 0.0;
    for m in &c.nodes[..2] {
        background += metric(
            &m.proc.metrics().await.unwrap(),
            "granary_background_io_bytes_total",
        );
    }
    println!("background work admitted on n1 and n2: {background} bytes");
    assert!(background > 0.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_that_lost_its_disk_is_rebuilt_from_its_primaries() {
    let mut c = TestCluster::start(
        3,
        Settings {
            partitions: PARTITIONS,
            ..Settings::default()
        },
    )
    .unwrap();
    c.wait_ready().await;
    let (ak, sk, _) = c.tenant("acme").await;
    let kv = KvClient::new(&c.nodes[0].proc.kv, &ak, &sk);
    for i in 0..80 {
        let r = kv
            .send(
                "PUT",
                &format!("/kv/v1/ns-{}/k{i}", i % 9),
                &[],
                vec![i as u8],
            )
            .await
            .unwrap();
        let status = r.status();
        assert_eq!(status, 200, "{}", r.text().await.unwrap());
    }
    // n2 dies and loses its data directory (the engine; its identity and config stay).
    c.nodes[1].proc.kill9();
    std::fs::remove_dir_all(c.data_dir(1).join("engine")).unwrap();
    let m = c.start_node(1).unwrap();
    c.nodes[1] = m;
    c.converge(&[0, 1, 2], 60, "n2 rebuilt from its peers")
        .await;
    // It handed its partitions to peers when it found itself empty; once rebuilt it gets
    // them back. Every value reads back through the rebuilt node.
    c.wait_balanced(60).await;
    let kv2 = KvClient::new(&c.nodes[1].proc.kv, &ak, &sk);
    for i in 0..80 {
        kv2.assert_value(
            &format!("/kv/v1/ns-{}/k{i}", i % 9),
            &[i as u8],
            &format!("k{i}"),
        )
        .await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_primary_is_replaced_and_no_acknowledged_write_is_lost() {
    let mut c = TestCluster::start(
        3,
        Settings {
            partitions: PARTITIONS,
            ..Settings::default()
        },
    )
    .unwrap();
    let layout = c.wait_ready().await;
    let (ak, sk, id) = c.tenant("acme").await;
    let tenant: TenantId = id.parse().unwrap();
    let partition_of =
        |ns: &str| PartitionId::of(tenant, format!("kv:{ns}").as_bytes(), PARTITIONS);
    let ns = (0..)
        .map(|i| format!("fo-{i}"))
        .find(|ns| layout["actingPrimaries"][partition_of(ns).0 as usize] == "n3")
        .unwrap();
    let p = partition_of(&ns).0 as usize;
    let kv = KvClient::new(&c.nodes[0].proc.kv, &ak, &sk);
    for i in 0..50 {
        let r = kv
            .send(
                "PUT",
                &format!("/kv/v1/{ns}/k{i}"),
                &[],
                format!("v{i}").into_bytes(),
            )
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
    }

    // The primary dies. Writes through n1 fail until a replica is promoted, then go on.
    c.nodes[2].proc.kill9();
    let killed = Instant::now();
    let mut refused = 0;
    loop {
        let r = kv
            .send("PUT", &format!("/kv/v1/{ns}/after"), &[], b"after".to_vec())
            .await
            .unwrap();
        if r.status() == 200 {
            break;
        }
        assert!(
            r.status().is_server_error(),
            "{}: {}",
            r.status(),
            r.text().await.unwrap()
        );
        refused += 1;
        assert!(
            killed.elapsed() < Duration::from_secs(60),
            "no failover within 60 s"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    println!(
        "primary killed: writes to its partition resumed after {:.1} s ({refused} refused; \
         fail_after 6 s, heartbeat 0.3 s)",
        killed.elapsed().as_secs_f64()
    );
    let l = admin(&c.nodes[0].proc, "/layout?partitions=true").await;
    let primary = l["actingPrimaries"][p].as_str().unwrap().to_string();
    assert!(primary == "n1" || primary == "n2", "{primary}");
    assert!(!l["inSync"][p].as_array().unwrap().iter().any(|n| n == "n3"));
    // Every acknowledged write survived, read through both live nodes.
    for node in &c.nodes[..2] {
        let kv = KvClient::new(&node.proc.kv, &ak, &sk);
        for i in 0..50 {
            kv.assert_value(
                &format!("/kv/v1/{ns}/k{i}"),
                format!("v{i}").as_bytes(),
                &format!("k{i} through {}", node.id),
            )
            .await;
        }
    }

    // The old primary returns: it catches up as a replica, all three hold the same
    // again, and then the partition's primary hands it back (n3 is the layout's
    // preferred primary for it) with every write intact.
    let m = c.start_node(2).unwrap();
    c.nodes[2] = m;
    c.converge(&[0, 1, 2], 60, "the old primary caught up as a replica")
        .await;
    eventually("the partition handed back to n3", 60, || async {
        let l = admin(&c.nodes[0].proc, "/layout?partitions=true").await;
        (l["actingPrimaries"][p] == "n3").then_some(())
    })
    .await;
    // (n3 serves it once its own table shows the change, within a heartbeat or two.)
    let kv3 = KvClient::new(&c.nodes[2].proc.kv, &ak, &sk);
    eventually("n3 serves the partition it got back", 10, || async {
        let r = kv3
            .send("GET", &format!("/kv/v1/{ns}/k0"), &[], vec![])
            .await
            .unwrap();
        (r.status() == 200).then_some(())
    })
    .await;
    for i in 0..50 {
        kv3.assert_value(
            &format!("/kv/v1/{ns}/k{i}"),
            format!("v{i}").as_bytes(),
            &format!("k{i} through n3 after the hand-back"),
        )
        .await;
    }
}

/// Scale-out: a fourth node joins a three-node cluster (factor 3) under a steady stream
/// of writes; the layout gives it replicas, it catches up, and the partitions it is the
/// preferred primary of are handed to it one by one. Every acknowledged write, from
/// before and during the move, reads back through the new node.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_that_joins_takes_over_its_share_of_primaries() {
    let mut c = TestCluster::start(
        4,
        Settings {
            partitions: PARTITIONS,
            start_nodes: 3,
            ..Settings::default()
        },
    )
    .unwrap();
    c.wait_ready().await;
    let (ak, sk, _) = c.tenant("acme").await;
    let kv1 = KvClient::new(&c.nodes[0].proc.kv, &ak, &sk);
    for i in 0..300 {
        let r = kv1
            .send(
                "PUT",
                &format!("/kv/v1/ns-{}/k{i}", i % 12),
                &[],
                format!("v{i}").into_bytes(),
            )
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
    }

    // A writer goes on through n1 and n2 while n4 joins: each key written once, retried
    // while refused (503) or unconfirmed (500), kept when acknowledged.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let writer = {
        let kv = [kv1.clone(), KvClient::new(&c.nodes[1].proc.kv, &ak, &sk)];
        let stop = stop.clone();
        tokio::spawn(async move {
            let (mut acked, mut refused) = (Vec::new(), 0u32);
            let mut i = 0;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let path = format!("/kv/v1/ns-{}/live{i}", i % 12);
                match kv[i % 2]
                    .send("PUT", &path, &[], format!("w{i}").into_bytes())
                    .await
                {
                    Ok(r) if r.status() == 200 => {
                        acked.push(i);
                        i += 1;
                    }
                    _ => {
                        refused += 1;
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                }
            }
            (acked, refused)
        })
    };

    let joined = Instant::now();
    c.add_node().unwrap();
    let n4 = &c.nodes[3].proc;
    let l = c.wait_balanced(120).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let (acked, refused) = writer.await.unwrap();
    let mut handoffs = 0.0;
    for m in &c.nodes {
        handoffs += metric(
            &m.proc.metrics().await.unwrap(),
            "granary_primary_handoffs_total",
        );
    }
    let led_by_n4 = l["actingPrimaries"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|p| *p == "n4")
        .count();
    println!(
        "n4 joined: every partition with its preferred primary after {:.1} s; n4 leads \
         {led_by_n4} of {PARTITIONS}; {handoffs} hand-overs; the writer had {} writes \
         acknowledged and {refused} refused or unconfirmed (retried)",
        joined.elapsed().as_secs_f64(),
        acked.len()
    );
    assert!(led_by_n4 > 0 && handoffs >= led_by_n4 as f64, "{l}");
    // The old primaries handed over cleanly: every replica set holds the same. A node
    // the layout no longer places a partition on leaves its in-sync set (writes stop
    // waiting for it).
    c.replicas_agree(60).await;
    eventually(
        "every in-sync set is its layout replica set",
        30,
        || async {
            let l = admin(&c.nodes[0].proc, "/layout?partitions=true").await;
            let sorted = |v: &Value| {
                let mut ids: Vec<String> = v
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|n| n.as_str().unwrap().to_string())
                    .collect();
                ids.sort();
                ids
            };
            l["replicaSets"]
                .as_array()?
                .iter()
                .zip(l["inSync"].as_array()?)
                .all(|(set, in_sync)| sorted(set) == sorted(in_sync))
                .then_some(())
        },
    )
    .await;
    assert!(!acked.is_empty());

    // Everything reads back through the new node.
    let kv4 = KvClient::new(&n4.kv, &ak, &sk);
    for i in 0..300 {
        kv4.assert_value(
            &format!("/kv/v1/ns-{}/k{i}", i % 12),
            format!("v{i}").as_bytes(),
            &format!("k{i}"),
        )
        .await;
    }
    for i in acked {
        kv4.assert_value(
            &format!("/kv/v1/ns-{}/live{i}", i % 12),
            format!("w{i}").as_bytes(),
            &format!("live{i}"),
        )
        .await;
    }

    // The old nodes drop their copies of the partitions the layout moved to n4 (records,
    // log and chunk files), and keep every other.
    let l = admin(&c.nodes[0].proc, "/layout?partitions=true").await;
    let placed = |i: usize, p: usize| {
        l["replicaSets"][p]
            .as_array()
            .unwrap()
            .iter()
            .any(|n| *n == c.nodes[i].id.as_str())
    };
    let moved: Vec<(usize, usize)> = (0..3)
        .flat_map(|i| (0..PARTITIONS as usize).map(move |p| (i, p)))
        .filter(|(i, p)| !placed(*i, *p))
        .collect();
    assert!(!moved.is_empty(), "the layout moved nothing off n1..n3");
    let started = Instant::now();
    eventually("the moved copies are dropped", 90, || async {
        for (i, p) in &moved {
            let d = &c.digests(*i).await[*p];
            if d["records"] != 0 || d["lsn"] != 0 {
                return None;
            }
        }
        Some(())
    })
    .await;
    let mut dropped = 0.0;
    for m in &c.nodes[..3] {
        dropped += metric(
            &m.proc.metrics().await.unwrap(),
            "granary_replication_retired_copies_total",
        );
    }
    println!(
        "{} moved copies dropped after {:.1} s more ({dropped} drops counted)",
        moved.len(),
        started.elapsed().as_secs_f64()
    );
    assert!(dropped >= 1.0);
    // Every partition still placed on a node is whole there.
    c.replicas_agree(30).await;
    for i in 0..300 {
        kv1.assert_value(
            &format!("/kv/v1/ns-{}/k{i}", i % 12),
            format!("v{i}").as_bytes(),
            &format!("k{i} after the copies were dropped"),
        )
        .await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_primary_stopped_past_its_failover_never_serves_stale_data() {
    let c = TestCluster::start(
        3,
        Settings {
            partitions: PARTITIONS,
            ..Settings::default()
        },
    )
    .unwrap();
    let layout = c.wait_ready().await;
    let (ak, sk, id) = c.tenant("acme").await;
    let tenant: TenantId = id.parse().unwrap();
    let ns = (0..)
        .map(|i| format!("st-{i}"))
        .find(|ns| {
            let p = PartitionId::of(tenant, format!("kv:{ns}").as_bytes(), PARTITIONS);
            layout["actingPrimaries"][p.0 as usize] == "n3"
        })
        .unwrap();
    let path = format!("/kv/v1/{ns}/k");
    let via_n1 = KvClient::new(&c.nodes[0].proc.kv, &ak, &sk);
    let via_n3 = KvClient::new(&c.nodes[2].proc.kv, &ak, &sk);
    let r = via_n1
        .send("PUT", &path, &[], b"old".to_vec())
        .await
        .unwrap();
    assert_eq!(r.status(), 200);

    // The primary n3 freezes; a replica is promoted and takes a newer write.
    signal(&c.nodes[2].proc, "-STOP");
    let stopped = Instant::now();
    loop {
        let r = via_n1
            .send("PUT", &path, &[], b"new".to_vec())
            .await
            .unwrap();
        if r.status() == 200 {
            break;
        }
        assert!(stopped.elapsed() < Duration::from_secs(60), "no failover");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    println!(
        "promoted while n3 was stopped: {:.1} s",
        stopped.elapsed().as_secs_f64()
    );
    // n3 wakes up believing it leads the partition. Asked directly, it must answer with
    // the newer value (forwarding to the new primary) or refuse: never the old one.
    signal(&c.nodes[2].proc, "-CONT");
    let woke = Instant::now();
    let mut refused = 0;
    while woke.elapsed() < Duration::from_secs(5) {
        let r = via_n3.send("GET", &path, &[], vec![]).await.unwrap();
        let status = r.status();
        let body = r.bytes().await.unwrap();
        assert_ne!(body.as_ref(), b"old", "stale read from the deposed primary");
        if status == 200 {
            assert_eq!(body.as_ref(), b"new");
        } else {
            refused += 1;
        }
    }
    println!("deposed primary after waking: {refused} reads refused, the rest forwarded");
    // (Once caught up, n3 gets the partition back by a hand-over: a read may meet its
    // short pause, 503.)
    let body = eventually("a read through n3 answers", 30, || async {
        let r = via_n3.send("GET", &path, &[], vec![]).await.unwrap();
        (r.status() == 200).then_some(r.bytes().await.unwrap())
    })
    .await;
    assert_eq!(body.as_ref(), b"new");
}

/// The catch-up acceptance: a replica killed before 10,000 writes (KV keys and
/// S3 objects, through the two live nodes) restarts, catches up, and then, as the only
/// node left, serves every key and object exactly as acknowledged.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_killed_during_10000_writes_catches_up_and_serves_identical_data() {
    const WRITES: usize = 10_000;
    const OBJECT_EVERY: usize = 5; // every fifth write is an S3 object
    let mut c = TestCluster::start(
        3,
        Settings {
            partitions: PARTITIONS,
            ..Settings::default()
        },
    )
    .unwrap();
    c.wait_ready().await;
    let (ak, sk, _) = c.tenant("acme").await;
    let s3: Vec<_> = c
        .nodes
        .iter()
        .map(|m| s3_client(&m.proc.s3, &ak, &sk))
        .collect();
    let kv: Vec<KvClient> = c
        .nodes
        .iter()
        .map(|m| KvClient::new(&m.proc.kv, &ak, &sk))
        .collect();
    let buckets: Vec<String> = (0..4).map(|b| format!("catch-{b}")).collect();
    for b in &buckets {
        s3[0].create_bucket().bucket(b).send().await.unwrap();
    }
    let key = |i: usize| (format!("ns-{}", i % 8), format!("k{i}"));
    let object = |i: usize| (buckets[i % buckets.len()].clone(), format!("o{i}"));
    let value = |i: usize| format!("value {i} {}", "x".repeat(i % 200)).into_bytes();

    c.nodes[2].proc.kill9();
    let started = Instant::now();
    let results: Vec<Result<(), String>> = futures::stream::iter(0..WRITES)
        .map(|i| {
            let (s3, kv) = (s3[i % 2].clone(), kv[i % 2].clone());
            let (ns, k) = key(i);
            let (b, o) = object(i);
            async move {
                // A write may be refused while n3 leaves the in-sync sets (503: not
                // applied; 500: not confirmed), or be forwarded to n3 while it is still
                // taken for a primary and lost with it (502 OutcomeUnknown: a pooled
                // connection to the killed node): rewriting the same value is harmless.
                for _ in 0..100 {
                    let ok = if i % OBJECT_EVERY == 0 {
                        s3.put_object()
                            .bucket(&b)
                            .key(&o)
                            .body(ByteStream::from(value(i)))
                            .send()
                            .await
                            .map_err(|e| format!("{e:?}"))
                            .map(|_| ())
                    } else {
                        let r = kv
                            .send("PUT", &format!("/kv/v1/{ns}/{k}"), &[], value(i))
                            .await
                            .map_err(|e| e.to_string())?;
                        match r.status().as_u16() {
                            200 => Ok(()),
                            s => Err(format!("{s}: {}", r.text().await.unwrap_or_default())),
                        }
                    };
                    match ok {
                        Ok(()) => return Ok(()),
                        Err(e)
                            if ["503", "500", "502", "ServiceUnavailable", "InternalError"]
                                .iter()
                                .any(|s| e.contains(s)) =>
                        {
                            tokio::time::sleep(Duration::from_millis(200)).await
                        }
                        Err(e) => return Err(format!("write {i}: {e}")),
                    }
                }
                Err(format!("write {i} refused 100 times"))
            }
        })
        .buffer_unordered(16)
        .collect()
        .await;
    let failed: Vec<_> = results.into_iter().filter_map(Result::err).collect();
    assert!(failed.is_empty(), "{failed:?}");
    println!(
        "{WRITES} writes with n3 down: {:.1} s",
        started.elapsed().as_secs_f64()
    );

    // n3 returns and catches up; all three agree and n3 is back in every in-sync set.
    let restarted = Instant::now();
    let m = c.start_node(2).unwrap();
    c.nodes[2] = m;
    c.converge(&[0, 1, 2], 120, "n3 caught up after 10,000 writes")
        .await;
    eventually("n3 back in every in-sync set", 60, || async {
        let l = admin(&c.nodes[0].proc, "/layout?partitions=true").await;
        (l["partitionsOutOfSync"] == 0).then_some(())
    })
    .await;
    let page = c.nodes[2].proc.metrics().await.unwrap();
    println!(
        "catch-up: {WRITES} writes in {:.1} s from restart to equal digests and full \
         in-sync sets ({} partitions from snapshots, the rest from the log)",
        restarted.elapsed().as_secs_f64(),
        metric(&page, "granary_replica_resyncs_total")
    );

    // n1 and n2 die: n3 is promoted for every partition and serves every key and
    // object exactly as acknowledged, read one by one.
    c.nodes[0].proc.kill9();
    c.nodes[1].proc.kill9();
    let n3 = &c.nodes[2].proc;
    eventually("n3 leads every partition", 60, || async {
        let l = admin(n3, "/layout?partitions=true").await;
        l["actingPrimaries"]
            .as_array()
            .unwrap()
            .iter()
            .all(|p| p == "n3")
            .then_some(())
    })
    .await;
    let (s3, kv) = (s3[2].clone(), kv[2].clone());
    let mismatches: Vec<String> = futures::stream::iter(0..WRITES)
        .map(|i| {
            let (s3, kv) = (s3.clone(), kv.clone());
            async move {
                // The partitions' take-over check may still be running: retry 503s.
                for _ in 0..100 {
                    let got = if i % OBJECT_EVERY == 0 {
                        let (b, o) = object(i);
                        match s3.get_object().bucket(&b).key(&o).send().await {
                            Ok(r) => Ok(r.body.collect().await.unwrap().into_bytes().to_vec()),
                            Err(e) => Err(format!("{e:?}")),
                        }
                    } else {
                        let (ns, k) = key(i);
                        let r = kv
                            .send("GET", &format!("/kv/v1/{ns}/{k}"), &[], vec![])
                            .await
                            .unwrap();
                        match r.status().as_u16() {
                            200 => Ok(r.bytes().await.unwrap().to_vec()),
                            s => Err(format!("{s} {}", r.text().await.unwrap_or_default())),
                        }
                    };
                    match got {
                        Ok(v) if v == value(i) => return None,
                        Ok(_) => return Some(format!("write {i}: another value")),
                        Err(e) if e.contains("503") || e.contains("ServiceUnavailable") => {
                            tokio::time::sleep(Duration::from_millis(200)).await
                        }
                        Err(e) => return Some(format!("write {i}: {e}")),
                    }
                }
                Some(format!("write {i}: refused 100 times"))
            }
        })
        .buffer_unordered(16)
        .filter_map(|m| async move { m })
        .collect()
        .await;
    assert!(
        mismatches.is_empty(),
        "{} of {WRITES} differ on the caught-up node: {:?}",
        mismatches.len(),
        &mismatches[..mismatches.len().min(10)]
    );
    println!("all {WRITES} keys and objects read back from n3 alone");
}

/// A large object's chunk files reach the replicas while its upload still runs (sent
/// ahead of the log entry, counted in the primary's metrics), every node ends up with the
/// same chunk files, and a replica refuses an entry whose chunk file has not arrived
/// rather than applying it (the primary then sends the file again).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chunks_reach_replicas_during_the_upload_and_missing_ones_are_refused() {
    use granary_node::cluster::replication::{SKIPPED_HEADER, Shipment};
    use granary_node::engine::ChunkRef;
    use granary_node::engine::replog::LogEntry;
    use granary_node::types::{ChunkId, NodeId};

    let c = TestCluster::start(
        3,
        Settings {
            partitions: PARTITIONS,
            ..Settings::default()
        },
    )
    .unwrap();
    let layout = c.wait_ready().await;
    let (ak, sk, id) = c.tenant("acme").await;
    let tenant: TenantId = id.parse().unwrap();
    let p = PartitionId::of(tenant, b"big", PARTITIONS);
    let primary = layout["actingPrimaries"][p.0 as usize]
        .as_str()
        .unwrap()
        .to_string();
    let at = |id: &str| c.nodes.iter().position(|m| m.id == id).unwrap();
    let replica = (0..3).find(|i| c.nodes[*i].id != primary).unwrap();
    // Through a node that is not the primary: the body streams on to it.
    let s3 = s3_client(&c.nodes[replica].proc.s3, &ak, &sk);
    s3.create_bucket().bucket("big").send().await.unwrap();
    // A first small write: the primary learns from the replicas' answers that they check
    // every chunk has arrived (only then does it trust a chunk sent ahead).
    s3.put_object()
        .bucket("big")
        .key("small")
        .body(ByteStream::from(vec![1u8; 1000]))
        .send()
        .await
        .unwrap();
    let body: Vec<u8> = (0..40u32 << 20).map(|i| (i % 251) as u8).collect();
    s3.put_object()
        .bucket("big")
        .key("obj")
        .body(ByteStream::from(body.clone()))
        .send()
        .await
        .unwrap();
    // Acknowledged: on every in-sync replica, chunk files included.
    assert_eq!(c.differing(&[0, 1, 2]).await, Vec::<u16>::new());
    let names = |i: usize| {
        let mut n: Vec<String> = granary_e2e::chunk_files(&c.nodes[i].proc.data_dir)
            .iter()
            .map(|f| f.file_name().unwrap().to_string_lossy().into_owned())
            .collect();
        n.sort();
        n
    };
    assert!(names(0).len() >= 5, "{:?}", names(0));
    assert_eq!(names(0), names(1));
    assert_eq!(names(0), names(2));
    let page = c.nodes[at(&primary)].proc.metrics().await.unwrap();
    let ahead = metric(&page, "granary_replication_chunks_sent_ahead_total");
    println!("chunk files sent ahead of their entry: {ahead} (5 chunks, 2 replicas)");
    assert!(ahead >= 1.0, "no chunk file was sent during the upload");
    let got = s3
        .get_object()
        .bucket("big")
        .key("obj")
        .send()
        .await
        .unwrap()
        .body
        .collect()
        .await
        .unwrap()
        .into_bytes();
    assert!(
        got.as_ref() == body.as_slice(),
        "the object reads back identical"
    );

    // A shipment whose entry references a chunk file the replica does not hold is
    // refused, and nothing of it is applied. (An epoch above every real one passes the
    // fence without being remembered, since the shipment is refused.)
    let http = reqwest::Client::new();
    let rpc = &c.nodes[replica].rpc;
    let lsn = c.digests(replica).await[p.0 as usize]["lsn"]
        .as_u64()
        .unwrap();
    let ghost = ChunkRef {
        id: ChunkId(uuid::Uuid::new_v4()),
        partition: p,
        len: 1,
    };
    let shipment = Shipment {
        epoch: 1 << 40,
        primary: NodeId(primary.clone()),
        entries: vec![(
            lsn + 1,
            LogEntry {
                epoch: 1 << 40,
                seq: 1,
                changes: Vec::new(),
                chunks: vec![ghost],
                freed: Vec::new(),
            },
        )],
    };
    let r = http
        .post(format!("{rpc}/rpc/v1/partitions/{}/log", p.0))
        .bearer_auth(granary_e2e::cluster::SECRET)
        .header(SKIPPED_HEADER, "")
        .body(postcard::to_allocvec(&shipment).unwrap())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 409);
    let refusal: Value = r.json().await.unwrap();
    assert!(
        refusal["reason"]
            .as_str()
            .unwrap()
            .contains("has not arrived"),
        "{refusal}"
    );
    assert_eq!(
        refusal["position"]["lsn"].as_u64(),
        Some(lsn),
        "nothing applied"
    );
    let page = c.nodes[replica].proc.metrics().await.unwrap();
    assert_eq!(
        metric(&page, "granary_replication_missing_chunk_refusals_total"),
        1.0
    );
    // The real primary still ships to it: a later write is acknowledged everywhere.
    s3.put_object()
        .bucket("big")
        .key("after")
        .body(ByteStream::from(vec![9u8; 12 << 20]))
        .send()
        .await
        .unwrap();
    assert_eq!(c.differing(&[0, 1, 2]).await, Vec::<u16>::new());
}

/// A primary serves a partition again after a restart only under a new epoch: before a
/// crash it may have sent replicas entries it never committed (they are shipped while its
/// own fsync runs), and the entries it writes again under the same numbers must not
/// carry the epoch those carry. The primary of a partition is killed and restarted at
/// once, with no writes meanwhile and failure detection slow enough that nothing else
/// changes the partition's epoch; it leads the partition again, and its next entry
/// carries a higher epoch than the last one before the kill.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_primary_writes_under_a_new_epoch() {
    let mut c = TestCluster::start(
        3,
        Settings {
            partitions: PARTITIONS,
            suspect_after_ms: 15_000,
            fail_after_ms: 60_000,
            ..Settings::default()
        },
    )
    .unwrap();
    let layout = c.wait_ready().await;
    let (ak, sk, id) = c.tenant("acme").await;
    let tenant: TenantId = id.parse().unwrap();
    let ns = "epochs";
    let p = PartitionId::of(tenant, format!("kv:{ns}").as_bytes(), PARTITIONS).0 as usize;
    let primary = layout["actingPrimaries"][p].as_str().unwrap().to_string();
    let i = c.nodes.iter().position(|m| m.id == primary).unwrap();
    let other = (i + 1) % 3;
    let put = |endpoint: String, v: &'static str| {
        let kv = KvClient::new(&endpoint, &ak, &sk);
        async move {
            match kv
                .send("PUT", &format!("/kv/v1/{ns}/k"), &[], v.as_bytes().to_vec())
                .await
            {
                Ok(r) => r.status().as_u16(),
                Err(_) => 0,
            }
        }
    };
    assert_eq!(put(c.nodes[other].proc.kv.clone(), "before").await, 200);
    let before = c.digests(i).await[p]["epoch"].as_u64().unwrap();
    c.nodes[i].proc.kill9();
    let m = c.start_node(i).unwrap();
    c.nodes[i] = m;
    let endpoint = c.nodes[other].proc.kv.clone();
    eventually("a write after the restart", 60, || {
        let put = put(endpoint.clone(), "after");
        async move { (put.await == 200).then_some(()) }
    })
    .await;
    let l = admin(&c.nodes[other].proc, "/layout?partitions=true").await;
    assert_eq!(l["actingPrimaries"][p], primary.as_str(), "no failover");
    let after = c.digests(i).await[p]["epoch"].as_u64().unwrap();
    println!("partition {p}: last entry's epoch {before} before the restart, {after} after");
    assert!(
        after > before,
        "epoch {after} after the restart, {before} before"
    );
}
