//! Cluster membership and layout with real processes: three `granary-node serve`
//! processes in three zones, each in its own network namespace with its own address, on
//! one real Postgres catalog, register, probe each other over the authenticated RPC
//! port, agree on one partition layout, and react to a cut link (suspected from across
//! the cut only, never failed, no layout change) and to a node that stops (SIGSTOP:
//! suspected, then failed and left out of the next layout) and comes back (SIGCONT: the
//! layout it left).

use std::time::{Duration, Instant};

use granary_e2e::netns::Net;
use granary_e2e::{NodeProc, PgServer, node_binary};
use serde_json::Value;

const TOKEN: &str = "cluster-test-admin-token-0123456789";
const SECRET: &str = "cluster-test-peer-secret-0123456789";

struct Member {
    proc: NodeProc,
    rpc: String,
}

fn start_node(
    net: &Net,
    i: usize,
    dir: &std::path::Path,
    zone: &str,
    url: &str,
    master: &str,
) -> Member {
    let id = format!("n{}", i + 1);
    let addr = net.addr(i);
    let data = dir.join(&id);
    let config = dir.join(format!("{id}.toml"));
    std::fs::write(
        &config,
        format!(
            "node_id = \"{id}\"\nregion = \"eu-west-1\"\nzone = \"{zone}\"\ndata_dir = \"{}\"\n\
             s3_listen = \"{addr}:0\"\nkv_listen = \"{addr}:0\"\nadmin_listen = \"{addr}:0\"\n\
             rpc_listen = \"{addr}:0\"\npartitions = 64\nreplication_factor = 3\n\
             heartbeat_interval_ms = 200\nsuspect_after_ms = 1000\nfail_after_ms = 3000\n",
            data.display()
        ),
    )
    .unwrap();
    let env = [
        ("GRANARY_CATALOG_URL", url),
        ("GRANARY_MASTER_KEY", master),
        ("GRANARY_ADMIN_TOKEN", TOKEN),
        ("GRANARY_CLUSTER_SECRET", SECRET),
    ];
    let proc = NodeProc::serve_in(Some(net.namespace(i)), &data, &config, &env, TOKEN).unwrap();
    let endpoints: Value =
        serde_json::from_str(&std::fs::read_to_string(data.join("endpoints.json")).unwrap())
            .unwrap();
    let rpc = endpoints["rpc"].as_str().unwrap().to_string();
    Member { proc, rpc }
}

async fn admin(node: &NodeProc, path: &str) -> Value {
    let r = reqwest::Client::new()
        .get(format!("{}/admin/v1{path}", node.admin))
        .bearer_auth(TOKEN)
        .send()
        .await
        .unwrap();
    assert!(r.status().is_success(), "{path}: {}", r.status());
    r.json().await.unwrap()
}

/// Polls `f` until it returns Some, or fails after `secs` with `what`.
async fn eventually<T, F, Fut>(what: &str, secs: u64, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let started = Instant::now();
    let deadline = started + Duration::from_secs(secs);
    loop {
        if let Some(v) = f().await {
            println!("{what}: {:.1} s", started.elapsed().as_secs_f64());
            return v;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn state_of(nodes: &Value, id: &str) -> String {
    nodes["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|n| n["id"] == id)
        .map(|n| n["state"].as_str().unwrap().to_string())
        .unwrap_or_default()
}

fn signal(node: &NodeProc, sig: &str) {
    let pid = node.pid().unwrap().to_string();
    let ok = std::process::Command::new("kill")
        .args([sig, &pid])
        .status()
        .unwrap()
        .success();
    assert!(ok, "kill {sig} {pid}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_nodes_agree_on_a_zone_aware_layout_and_handle_a_failed_node() {
    let net = Net::create(3).expect("network namespaces for the cluster test");
    println!(
        "network: namespaces {}, {}, {} on {} (catalog at {})",
        net.namespace(0),
        net.namespace(1),
        net.namespace(2),
        net.subnet(),
        net.bridge_addr()
    );
    let pg = PgServer::start_listening(Some((net.bridge_addr(), &net.subnet()))).unwrap();
    pg.create_db("granary_cluster").unwrap();
    let url = pg.url_at(net.bridge_addr(), "granary_cluster");
    let dir = tempfile::tempdir().unwrap();
    let out = std::process::Command::new(node_binary())
        .arg("gen-master-key")
        .output()
        .unwrap();
    let master = String::from_utf8(out.stdout).unwrap().trim().to_string();
    let n1 = start_node(&net, 0, dir.path(), "a", &url, &master);
    let n2 = start_node(&net, 1, dir.path(), "b", &url, &master);
    let n3 = start_node(&net, 2, dir.path(), "c", &url, &master);

    // All three see each other alive and use one layout that puts a replica of every
    // partition in every zone.
    let first = eventually("3 alive members in one layout", 30, || async {
        let nodes = admin(&n1.proc, "/nodes").await;
        let layout = admin(&n1.proc, "/layout?partitions=true").await;
        (nodes["alive"] == 3 && layout["members"].as_array().unwrap().len() == 3).then_some(layout)
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
    for other in [&n2, &n3] {
        let v = eventually("the same layout on every node", 10, || async {
            let l = admin(&other.proc, "/layout").await;
            (l["version"].as_u64() == Some(v1)).then_some(l)
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
        10,
        || async {
            let from1 = state_of(&admin(&n1.proc, "/nodes").await, "n3");
            let from3 = state_of(&admin(&n3.proc, "/nodes").await, "n1");
            (from1 == "suspected" && from3 == "suspected").then_some(())
        },
    )
    .await;
    // Three times fail_after: long enough for a wrong failure verdict to show.
    tokio::time::sleep(Duration::from_secs(9)).await;
    for (node, peer) in [(&n1, "n3"), (&n3, "n1")] {
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
    eventually("n1 sees n3 alive after the heal", 10, || async {
        let s = state_of(&admin(&n1.proc, "/nodes").await, "n3");
        (s == "alive").then_some(())
    })
    .await;

    // n3 stops answering: suspected first (probes and heartbeat), then failed once its
    // catalog heartbeat is older than fail_after; the next layout leaves it out and
    // reports every partition under-replicated (two nodes for a factor of 3).
    signal(&n3.proc, "-STOP");
    let stopped = Instant::now();
    eventually("n3 suspected", 10, || async {
        let s = state_of(&admin(&n1.proc, "/nodes").await, "n3");
        (s == "suspected").then_some(())
    })
    .await;
    let suspected_after = stopped.elapsed();
    let without = eventually("a layout without n3", 20, || async {
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
         (suspect_after 1 s, fail_after 3 s, interval 0.2 s)",
        suspected_after.as_secs_f64(),
        failed_after.as_secs_f64()
    );

    // n3 resumes: alive again and back in the layout, with exactly the placement it
    // had before (the layout is a function of the members alone).
    signal(&n3.proc, "-CONT");
    let back = eventually("n3 back in the layout", 20, || async {
        let l = admin(&n1.proc, "/layout?partitions=true").await;
        (l["members"].as_array().unwrap().len() == 3).then_some(l)
    })
    .await;
    assert_eq!(back["underReplicatedPartitions"], 0);
    assert!(back["version"].as_u64().unwrap() > without["version"].as_u64().unwrap());
    assert_eq!(back["replicaSets"], first["replicaSets"]);
    assert_eq!(back["members"], first["members"]);
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
    let nodes: Value = get("/nodes").await.unwrap().json().await.unwrap();
    assert_eq!(nodes["alive"], 1);
    assert_eq!(nodes["nodes"][0]["isSelf"], true);
    // Unauthenticated callers learn nothing about the cluster.
    let anon = http.get(format!("{url}/nodes")).send().await.unwrap();
    assert_eq!(anon.status(), 401);
}
