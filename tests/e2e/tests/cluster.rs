//! Cluster membership and layout with real processes: three `granary-node serve`
//! processes in three zones, each in its own network namespace with its own address, on
//! one real Postgres catalog, register, probe each other over the authenticated RPC
//! port, agree on one partition layout, and react to a cut link (suspected from across
//! the cut only, never failed, no layout change) and to a node that stops (SIGSTOP:
//! suspected, then failed and left out of the next layout) and comes back (SIGCONT: the
//! layout it left).

use std::time::{Duration, Instant};

use granary_e2e::NodeProc;
use granary_e2e::cluster::{SECRET, Settings, TestCluster, admin, eventually, signal, state_of};
use serde_json::Value;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_nodes_agree_on_a_zone_aware_layout_and_handle_a_failed_node() {
    let c = TestCluster::start(3, Settings::default()).unwrap();
    let net = &c.net;
    let (n1, n2, n3) = (&c.nodes[0], &c.nodes[1], &c.nodes[2]);

    // All three see each other alive and use one layout that puts a replica of every
    // partition in every zone.
    let first = eventually("3 alive members in one layout", 30, || async {
        let nodes = admin(&n1.proc, "/nodes").await;
        let layout = admin(&n1.proc, "/layout?partitions=true").await;
        (nodes["alive"] == 3
            && layout["members"].as_array().unwrap().len() == 3
            && layout["partitionsWithoutPrimary"] == 0)
            .then_some(layout)
    })
    .await;
    assert_eq!(first["underReplicatedPartitions"], 0);
    assert_eq!(first["replicationFactor"], 3);
    let sets = first["replicaSets"].as_array().unwrap();
    assert_eq!(sets.len(), 64);
    for s in sets {
        let mut ids: Vec<&str> = s
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_str().unwrap())
            .collect();
        ids.sort();
        assert_eq!(ids, ["n1", "n2", "n3"], "one replica per zone");
    }
    let primaries: Vec<u64> = first["members"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["primaryPartitions"].as_u64().unwrap())
        .collect();
    assert_eq!(primaries.iter().sum::<u64>(), 64);
    assert!(
        primaries.iter().all(|&p| p >= 8),
        "primaries spread: {primaries:?}"
    );
    let v1 = first["version"].as_u64().unwrap();
    for other in [n2, n3] {
        let v = eventually("the same layout on every node", 10, || async {
            let l = admin(&other.proc, "/layout").await;
            (l["version"].as_u64() == Some(v1) && l["members"] == first["members"]).then_some(l)
        })
        .await;
        assert_eq!(v["members"], first["members"]);
    }

    // The RPC port answers peers with the secret only.
    let http = reqwest::Client::new();
    let ping = format!("{}/rpc/v1/ping", n2.rpc);
    assert_eq!(http.get(&ping).send().await.unwrap().status(), 401);
    let wrong = http.get(&ping).bearer_auth("not-the-secret-000000").send();
    assert_eq!(wrong.await.unwrap().status(), 401);
    let ok: Value = http
        .get(&ping)
        .bearer_auth(SECRET)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(ok["nodeId"], "n2");

    // A cut link between n1 and n3: each suspects the other (its probes fail), n2 sees
    // both alive, and since both still heartbeat to the catalog nobody is failed and the
    // layout does not change.
    net.cut(0, 2).unwrap();
    eventually(
        "n1 and n3 suspect each other across the cut",
        20,
        || async {
            let from1 = state_of(&admin(&n1.proc, "/nodes").await, "n3");
            let from3 = state_of(&admin(&n3.proc, "/nodes").await, "n1");
            (from1 == "suspected" && from3 == "suspected").then_some(())
        },
    )
    .await;
    // Twice fail_after: long enough for a wrong failure verdict to show.
    tokio::time::sleep(Duration::from_secs(12)).await;
    for (node, peer) in [(n1, "n3"), (n3, "n1")] {
        assert_eq!(
            state_of(&admin(&node.proc, "/nodes").await, peer),
            "suspected"
        );
    }
    let seen_by_n2 = admin(&n2.proc, "/nodes").await;
    assert_eq!(seen_by_n2["alive"], 3, "{seen_by_n2}");
    assert_eq!(
        admin(&n2.proc, "/layout").await["version"].as_u64(),
        Some(v1)
    );
    net.heal(0, 2).unwrap();
    eventually("n1 sees n3 alive after the heal", 20, || async {
        let s = state_of(&admin(&n1.proc, "/nodes").await, "n3");
        (s == "alive").then_some(())
    })
    .await;

    // n3 stops answering: suspected first (probes and heartbeat), then failed once its
    // catalog heartbeat is older than fail_after; the next layout leaves it out and
    // reports every partition under-replicated (two nodes for a factor of 3).
    signal(&n3.proc, "-STOP");
    let stopped = Instant::now();
    eventually("n3 suspected", 20, || async {
        let s = state_of(&admin(&n1.proc, "/nodes").await, "n3");
        (s == "suspected").then_some(())
    })
    .await;
    let suspected_after = stopped.elapsed();
    let without = eventually("a layout without n3", 40, || async {
        let l = admin(&n2.proc, "/layout").await;
        (l["members"].as_array().unwrap().len() == 2).then_some(l)
    })
    .await;
    let failed_after = stopped.elapsed();
    assert_eq!(state_of(&admin(&n1.proc, "/nodes").await, "n3"), "failed");
    assert!(without["version"].as_u64().unwrap() > v1);
    assert_eq!(without["underReplicatedPartitions"], 64);
    let metrics = n1.proc.metrics().await.unwrap();
    assert!(
        metrics.contains("granary_cluster_nodes{state=\"failed\"} 1"),
        "{metrics}"
    );
    assert!(metrics.contains("granary_cluster_under_replicated_partitions 64"));
    println!(
        "failure detection: suspected after {:.1} s, out of the layout after {:.1} s \
         (suspect_after 2 s, fail_after 6 s, interval 0.3 s)",
        suspected_after.as_secs_f64(),
        failed_after.as_secs_f64()
    );

    // n3 resumes: alive again and back in the layout, with exactly the placement it
    // had before (the layout is a function of the members alone).
    signal(&n3.proc, "-CONT");
    let back = eventually("n3 back in the layout", 40, || async {
        let l = admin(&n1.proc, "/layout?partitions=true").await;
        (l["members"].as_array().unwrap().len() == 3).then_some(l)
    })
    .await;
    assert_eq!(back["underReplicatedPartitions"], 0);
    assert!(back["version"].as_u64().unwrap() > without["version"].as_u64().unwrap());
    assert_eq!(back["replicaSets"], first["replicaSets"]);
    // The same placement; which node acts as primary may have changed (n3's partitions
    // were promoted to replicas while it was failed).
    let placement = |l: &Value| -> Vec<Value> {
        l["members"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| {
                let mut m = m.clone();
                m.as_object_mut().unwrap().remove("actingPrimaryPartitions");
                m
            })
            .collect()
    };
    assert_eq!(placement(&back), placement(&first));
    assert_eq!(state_of(&admin(&n1.proc, "/nodes").await, "n3"), "alive");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dev_node_is_a_one_node_cluster_with_every_partition() {
    let dir = tempfile::tempdir().unwrap();
    let node = NodeProc::start(dir.path()).unwrap();
    let url = format!("{}/admin/v1", node.admin);
    let http = reqwest::Client::new();
    let get = |p: &str| {
        http.get(format!("{url}{p}"))
            .bearer_auth(&node.admin_token)
            .send()
    };
    let layout: Value = get("/layout").await.unwrap().json().await.unwrap();
    assert_eq!(layout["replicationFactor"], 1);
    assert_eq!(layout["underReplicatedPartitions"], 0);
    assert_eq!(layout["members"][0]["primaryPartitions"], 1024);
    assert_eq!(layout["members"][0]["actingPrimaryPartitions"], 1024);
    assert_eq!(layout["partitionsWithoutPrimary"], 0);
    let nodes: Value = get("/nodes").await.unwrap().json().await.unwrap();
    assert_eq!(nodes["alive"], 1);
    assert_eq!(nodes["nodes"][0]["isSelf"], true);
    // Unauthenticated callers learn nothing about the cluster.
    let anon = http.get(format!("{url}/nodes")).send().await.unwrap();
    assert_eq!(anon.status(), 401);
}

/// Ports `base + 10 * listener + node` for 4 listeners of 3 nodes, all free now.
fn free_port_block() -> u16 {
    loop {
        // Below the kernel's ephemeral range (32768 and up): a port checked free here
        // cannot be taken meanwhile by another test's outgoing connection.
        let base = 20_000 + rand::random::<u16>() % 12_000;
        let free = (0..4).all(|l| {
            (0..3).all(|n| std::net::TcpListener::bind(("127.0.0.1", base + 10 * l + n)).is_ok())
        });
        if free {
            return base;
        }
    }
}

/// `granary-node dev --nodes 3`: one command gives a working three-node cluster on
/// loopback (shared SQLite catalog); data written through one node reads through the
/// others, a killed primary is failed over and reported, and Ctrl-C (SIGTERM) stops
/// every node.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dev_with_three_nodes_is_a_cluster_that_fails_over() {
    use granary_e2e::{KvClient, s3_client};
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let base = free_port_block();
    let addr = |l: u16| format!("127.0.0.1:{}", base + 10 * l);
    let out = dir.path().join("stdout.log");
    let parent = std::process::Command::new(granary_e2e::node_binary())
        .arg("dev")
        .arg("--nodes")
        .arg("3")
        .arg("--data-dir")
        .arg(&data)
        .args(["--s3-listen", &addr(0), "--kv-listen", &addr(1)])
        .args(["--admin-listen", &addr(2), "--rpc-listen", &addr(3)])
        .stdout(std::fs::File::create(&out).unwrap())
        .stderr(std::fs::File::create(dir.path().join("stderr.log")).unwrap())
        .spawn()
        .unwrap();
    let mut parent = granary_e2e::ChildGuard::new(parent);
    let started = Instant::now();
    let banner = loop {
        let text = std::fs::read_to_string(&out).unwrap_or_default();
        if text.contains("Secret key") {
            break text;
        }
        // The launcher gives up (a node that exits during start-up, or no cluster within
        // its own 120 s): say why rather than wait on.
        let exited = parent.try_wait().unwrap();
        if exited.is_some() || started.elapsed() > Duration::from_secs(150) {
            let err = std::fs::read_to_string(dir.path().join("stderr.log")).unwrap_or_default();
            panic!("the dev cluster did not start ({exited:?}): {err}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    println!(
        "the dev cluster's banner: {:.1} s",
        started.elapsed().as_secs_f64()
    );
    println!("{banner}");
    let field = |name: &str| {
        banner
            .lines()
            .find_map(|l| l.trim().strip_prefix(name))
            .unwrap()
            .trim()
            .to_string()
    };
    let (ak, sk) = (field("Access key id"), field("Secret key"));
    let listing: Value =
        serde_json::from_str(&std::fs::read_to_string(data.join("cluster.json")).unwrap()).unwrap();
    let nodes = listing["nodes"].as_array().unwrap().clone();
    assert_eq!(nodes.len(), 3);
    let ep = |i: usize, k: &str| nodes[i][k].as_str().unwrap().to_string();
    let s3: Vec<_> = (0..3).map(|i| s3_client(&ep(i, "s3"), &ak, &sk)).collect();
    let kv: Vec<_> = (0..3)
        .map(|i| KvClient::new(&ep(i, "kv"), &ak, &sk))
        .collect();

    // One store: written through one node, read through the others.
    s3[0].create_bucket().bucket("demo").send().await.unwrap();
    s3[1]
        .put_object()
        .bucket("demo")
        .key("hello")
        .body(b"from n2".to_vec().into())
        .send()
        .await
        .unwrap();
    let got = s3[2]
        .get_object()
        .bucket("demo")
        .key("hello")
        .send()
        .await
        .unwrap();
    assert_eq!(got.body.collect().await.unwrap().to_vec(), b"from n2");
    let r = kv[2]
        .send("PUT", "/kv/v1/app/k", &[], b"v".to_vec())
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let r = kv[0]
        .send("GET", "/kv/v1/app/k", &[], vec![])
        .await
        .unwrap();
    assert_eq!(r.bytes().await.unwrap().as_ref(), b"v");

    // The bucket's primary is killed: the others take over and say so.
    let token = std::fs::read_to_string(data.join("admin.token")).unwrap();
    let http = reqwest::Client::new();
    let (_, t) = granary_e2e::Admin {
        base: ep(0, "admin"),
        token: token.trim().to_string(),
        http: http.clone(),
    }
    .call(reqwest::Method::GET, "/tenants/default", None)
    .await
    .unwrap();
    let tenant: granary_node::types::TenantId = t["id"].as_str().unwrap().parse().unwrap();
    let p = granary_node::types::PartitionId::of(tenant, b"demo", 1024);
    let layout: Value = http
        .get(format!(
            "{}/admin/v1/layout?partitions=true",
            ep(0, "admin")
        ))
        .bearer_auth(token.trim())
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let primary = layout["actingPrimaries"][p.0 as usize]
        .as_str()
        .unwrap()
        .to_string();
    let victim = nodes.iter().position(|n| n["id"] == primary).unwrap();
    let other = (victim + 1) % 3;
    let pid = nodes[victim]["pid"].as_u64().unwrap();
    assert!(
        std::process::Command::new("kill")
            .args(["-9", &pid.to_string()])
            .status()
            .unwrap()
            .success()
    );
    let killed = Instant::now();
    eventually(
        "a write to the bucket after its primary was killed",
        60,
        || async {
            s3[other]
                .put_object()
                .bucket("demo")
                .key("after")
                .body(b"after".to_vec().into())
                .send()
                .await
                .ok()
        },
    )
    .await;
    println!(
        "dev cluster: {primary} killed, writes to its bucket resumed after {:.1} s",
        killed.elapsed().as_secs_f64()
    );
    let got = s3[other]
        .get_object()
        .bucket("demo")
        .key("hello")
        .send()
        .await
        .unwrap();
    assert_eq!(got.body.collect().await.unwrap().to_vec(), b"from n2");
    let text = std::fs::read_to_string(&out).unwrap();
    assert!(
        text.contains(&format!("{primary} exited")) && text.contains("serve --config"),
        "{text}"
    );

    // SIGTERM stops the whole cluster.
    let status = parent.terminate(Duration::from_secs(60)).unwrap();
    assert!(status.success(), "{status}");
    for n in &nodes {
        let pid = n["pid"].as_u64().unwrap().to_string();
        let alive = std::process::Command::new("kill")
            .args(["-0", &pid])
            .stderr(std::process::Stdio::null())
            .status()
            .unwrap()
            .success();
        assert!(!alive, "node {} (pid {pid}) still runs", n["id"]);
    }
}
