//! Linearizability under real faults, checked by Porcupine.
//!
//! Three `serve` nodes (network namespaces, one real Postgres catalog, replication
//! factor 3, `minInSync` 2). Concurrent clients treat KV keys (get, put, compare-and-set
//! on the version they read, create-if-absent, delete) and small S3 objects (GET, PUT,
//! DELETE with the AWS SDK) as registers, each request through a randomly chosen node,
//! while a nemesis, one fault at a time:
//! - kills a node with SIGKILL and restarts it on its data directory;
//! - stops a node with SIGSTOP (sometimes past `fail_after`, so it is failed over while
//!   frozen) and resumes it;
//! - cuts the primary of a hot partition off from the other nodes;
//! - cuts that primary off from the other nodes and the catalog, while its clients
//!   still reach it (a deposed primary that must not serve).
//!
//! Every operation is recorded with its invocation and completion times; a request
//! whose outcome is not known (a timeout, a 5xx for a write) is recorded as such and may
//! take effect at any later time or never. Clients move to fresh keys every 10 s, which
//! keeps each key's check small. After the faults heal, every key is read
//! through every node (so an acknowledged write that was lost shows as a stale read),
//! the replicas must converge, and the history goes to Porcupine
//! (`tests/e2e/tools/lincheck`). A violation fails the test with the offending key's
//! history; the full history and Porcupine's drawing are kept.
//!
//! `GRANARY_NEMESIS_SECS` sets how long the faults run (60 s here; `scripts/soak.sh`
//! runs 600 s).

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use aws_sdk_s3::primitives::ByteStream;
use granary_e2e::cluster::{Settings, TestCluster, signal};
use granary_e2e::{KvClient, s3_client};
use granary_node::types::{PartitionId, TenantId};
use rand::Rng;
use serde_json::{Value, json};

const PARTITIONS: u16 = 8;
const NODES: usize = 3;
const WORKERS: usize = 6;
/// How long a client waits for one answer before recording the outcome as unknown.
const OP_TIMEOUT: Duration = Duration::from_secs(4);
const NAMESPACES: [&str; 3] = ["lin0", "lin1", "lin2"];
const BUCKETS: [&str; 2] = ["lin-b0", "lin-b1"];
/// Clients move to fresh keys every `GENERATION` (as Jepsen's independent keys do):
/// an operation whose outcome is unknown stays open to the end of the history, and a
/// key with dozens of them (a long fault) makes the checker's search explode. Fresh
/// keys bound that per key; every generation's keys are still read through every node
/// after the faults heal, so a lost write shows in any generation.
const GENERATION: Duration = Duration::from_secs(10);

/// A register: a KV key or an S3 object.
#[derive(Clone, Debug)]
enum Reg {
    Kv { ns: &'static str, key: String },
    S3 { bucket: &'static str, key: String },
}

impl Reg {
    fn all() -> Vec<Reg> {
        let mut r = Vec::new();
        for ns in NAMESPACES {
            for key in ["a", "b"] {
                r.push(Reg::Kv {
                    ns,
                    key: key.into(),
                });
            }
        }
        for bucket in BUCKETS {
            for key in ["o0", "o1"] {
                r.push(Reg::S3 {
                    bucket,
                    key: key.into(),
                });
            }
        }
        r
    }

    /// This register's key in generation `g` (see [`GENERATION`]).
    fn at(&self, g: u64) -> Reg {
        match self {
            Reg::Kv { ns, key } => Reg::Kv {
                ns,
                key: format!("{key}.g{g}"),
            },
            Reg::S3 { bucket, key } => Reg::S3 {
                bucket,
                key: format!("{key}.g{g}"),
            },
        }
    }

    fn name(&self) -> String {
        match self {
            Reg::Kv { ns, key } => format!("kv/{ns}/{key}"),
            Reg::S3 { bucket, key } => format!("s3/{bucket}/{key}"),
        }
    }
}

/// One node's clients.
#[derive(Clone)]
struct Endpoint {
    kv: KvClient,
    s3: aws_sdk_s3::Client,
}

/// What an operation saw.
enum Outcome {
    Ok,
    /// A definite refusal: the condition did not hold.
    Fail,
    /// The outcome is open; why (a status, a timeout, an error).
    Unknown(String),
    /// A definite "not applied": 503 (the server's contract) or a refused connection.
    /// It has no effect, so it is left out of the history (as a failed read is).
    NotApplied,
    Read(Option<(Vec<u8>, u64)>),
    /// A read that failed: it tells nothing and is left out of the history.
    NoRead,
}

struct History {
    started: Instant,
    ops: Mutex<Vec<Value>>,
    no_reads: Mutex<u64>,
    not_applied: Mutex<u64>,
    /// Why outcomes were unknown, with counts.
    unknown_why: Mutex<BTreeMap<String, u64>>,
}

impl History {
    fn now(&self) -> u64 {
        self.started.elapsed().as_nanos() as u64
    }

    #[allow(clippy::too_many_arguments)]
    fn record(
        &self,
        client: usize,
        reg: &Reg,
        op: &str,
        value: &str,
        expect: &str,
        outcome: &Outcome,
        call: u64,
    ) {
        let ret = self.now();
        let mut rec = json!({
            "client": client, "key": reg.name(), "op": op, "value": value,
            "expect": expect, "call": call, "ret": ret,
        });
        rec["result"] = json!(match outcome {
            Outcome::Ok | Outcome::Read(_) => "ok",
            Outcome::Fail => "fail",
            Outcome::Unknown(why) => {
                *self
                    .unknown_why
                    .lock()
                    .unwrap()
                    .entry(why.clone())
                    .or_default() += 1;
                "unknown"
            }
            Outcome::NoRead => {
                *self.no_reads.lock().unwrap() += 1;
                return;
            }
            Outcome::NotApplied => {
                *self.not_applied.lock().unwrap() += 1;
                return;
            }
        });
        if let Outcome::Read(r) = outcome {
            rec["found"] = json!(r.is_some());
            rec["read"] = json!(r.as_ref().map(|(v, _)| String::from_utf8_lossy(v)));
        }
        self.ops.lock().unwrap().push(rec);
    }
}

/// Whether an error says the connection was refused: the request was never sent.
fn refused(e: &(dyn std::error::Error + 'static)) -> bool {
    let mut cur = Some(e);
    while let Some(e) = cur {
        if e.downcast_ref::<std::io::Error>()
            .is_some_and(|e| e.kind() == std::io::ErrorKind::ConnectionRefused)
        {
            return true;
        }
        cur = e.source();
    }
    false
}

/// A write's outcome from a KV answer: 200 ok; 412 (condition) or 404 (delete of an
/// absent key) a definite refusal; 503 or a refused connection not applied; anything
/// else unknown (a 500 NotDurable, a 502, a timeout: the write may have been applied).
fn kv_write_outcome(
    r: Result<anyhow::Result<reqwest::Response>, tokio::time::error::Elapsed>,
) -> Outcome {
    match r {
        Ok(Ok(r)) => match r.status().as_u16() {
            200 => Outcome::Ok,
            412 | 404 => Outcome::Fail,
            503 => Outcome::NotApplied,
            s => Outcome::Unknown(format!("KV {s}")),
        },
        Ok(Err(e)) if refused(e.as_ref()) => Outcome::NotApplied,
        Ok(Err(_)) => Outcome::Unknown("KV connection error".into()),
        Err(_) => Outcome::Unknown("timeout".into()),
    }
}

/// An S3 write's outcome, with the same rules.
fn s3_write_outcome<T, E>(
    r: Result<
        Result<T, aws_sdk_s3::error::SdkError<E, aws_sdk_s3::config::http::HttpResponse>>,
        tokio::time::error::Elapsed,
    >,
) -> Outcome
where
    E: std::error::Error + Send + Sync + 'static,
{
    use aws_sdk_s3::error::SdkError;
    match r {
        Ok(Ok(_)) => Outcome::Ok,
        Ok(Err(SdkError::ServiceError(e))) => match e.raw().status().as_u16() {
            503 => Outcome::NotApplied,
            s => Outcome::Unknown(format!("S3 {s}")),
        },
        Ok(Err(e)) if refused(&e) => Outcome::NotApplied,
        Ok(Err(e)) => Outcome::Unknown(format!("S3 {e}")),
        Err(_) => Outcome::Unknown("timeout".into()),
    }
}

async fn kv_get(ep: &Endpoint, ns: &str, key: &str) -> Outcome {
    let path = format!("/kv/v1/{ns}/{key}");
    let r = tokio::time::timeout(OP_TIMEOUT, async {
        let r = ep.kv.send("GET", &path, &[], vec![]).await?;
        let status = r.status().as_u16();
        let version = r
            .headers()
            .get("x-granary-version")
            .and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
        let body = r.bytes().await?;
        anyhow::Ok((status, version, body))
    })
    .await;
    match r {
        Ok(Ok((200, Some(version), body))) => Outcome::Read(Some((body.to_vec(), version))),
        Ok(Ok((404, _, _))) => Outcome::Read(None),
        _ => Outcome::NoRead,
    }
}

async fn s3_get(ep: &Endpoint, bucket: &str, key: &str) -> Outcome {
    let r = tokio::time::timeout(OP_TIMEOUT, async {
        match ep.s3.get_object().bucket(bucket).key(key).send().await {
            Ok(o) => Ok(Some(o.body.collect().await?.into_bytes().to_vec())),
            Err(e) if e.as_service_error().is_some_and(|e| e.is_no_such_key()) => Ok(None),
            Err(e) => Err(anyhow::Error::from(e)),
        }
    })
    .await;
    match r {
        Ok(Ok(v)) => Outcome::Read(v.map(|v| (v, 0))),
        _ => Outcome::NoRead,
    }
}

/// Reads `reg` through `ep` and records the read.
async fn read(h: &History, client: usize, ep: &Endpoint, reg: &Reg) -> Outcome {
    let call = h.now();
    let o = match reg {
        Reg::Kv { ns, key } => kv_get(ep, ns, key).await,
        Reg::S3 { bucket, key } => s3_get(ep, bucket, key).await,
    };
    h.record(client, reg, "get", "", "", &o, call);
    o
}

/// One client: random operations on random registers through random nodes until `stop`.
/// After an operation with an unknown outcome the client takes a new id (the old one
/// may still have that operation pending).
async fn client(
    worker: usize,
    h: Arc<History>,
    eps: Vec<Endpoint>,
    regs: Vec<Reg>,
    stop: Arc<AtomicBool>,
) {
    let mut id = worker;
    let mut seq = 0u64;
    while !stop.load(Ordering::Relaxed) {
        let (node, reg, dice, pause) = {
            let mut rng = rand::rng();
            (
                rng.random_range(0..eps.len()),
                regs[rng.random_range(0..regs.len())].at(h.now() / GENERATION.as_nanos() as u64),
                rng.random_range(0..10u32),
                rng.random_range(5..40u64),
            )
        };
        let ep = &eps[node];
        seq += 1;
        let value = format!("c{worker}-{seq}");
        let outcome = match &reg {
            Reg::Kv { ns, key } => {
                let path = format!("/kv/v1/{ns}/{key}");
                match dice {
                    0..=3 => read(&h, id, ep, &reg).await,
                    4..=5 => {
                        let call = h.now();
                        let r = tokio::time::timeout(
                            OP_TIMEOUT,
                            ep.kv.send("PUT", &path, &[], value.clone().into_bytes()),
                        )
                        .await;
                        let o = kv_write_outcome(r);
                        h.record(id, &reg, "put", &value, "", &o, call);
                        o
                    }
                    6..=8 => {
                        // Compare-and-set on the version just read (create if absent).
                        match read(&h, id, ep, &reg).await {
                            Outcome::Read(seen) => {
                                let (op, expect, cond) = match &seen {
                                    Some((v, version)) => (
                                        "cas",
                                        String::from_utf8_lossy(v).to_string(),
                                        ("if-match", version.to_string()),
                                    ),
                                    None => {
                                        ("create", String::new(), ("if-none-match", "*".into()))
                                    }
                                };
                                let call = h.now();
                                let r = tokio::time::timeout(
                                    OP_TIMEOUT,
                                    ep.kv.send(
                                        "PUT",
                                        &path,
                                        &[(cond.0, cond.1.as_str())],
                                        value.clone().into_bytes(),
                                    ),
                                )
                                .await;
                                let o = kv_write_outcome(r);
                                h.record(id, &reg, op, &value, &expect, &o, call);
                                o
                            }
                            o => o,
                        }
                    }
                    _ => {
                        let call = h.now();
                        let r = tokio::time::timeout(
                            OP_TIMEOUT,
                            ep.kv.send("DELETE", &path, &[], vec![]),
                        )
                        .await;
                        let o = kv_write_outcome(r);
                        h.record(id, &reg, "delete", "", "", &o, call);
                        o
                    }
                }
            }
            Reg::S3 { bucket, key } => match dice {
                0..=4 => read(&h, id, ep, &reg).await,
                5..=8 => {
                    let call = h.now();
                    let r = tokio::time::timeout(
                        OP_TIMEOUT,
                        ep.s3
                            .put_object()
                            .bucket(*bucket)
                            .key(key)
                            .body(ByteStream::from(value.clone().into_bytes()))
                            .send(),
                    )
                    .await;
                    let o = s3_write_outcome(r);
                    h.record(id, &reg, "put", &value, "", &o, call);
                    o
                }
                _ => {
                    let call = h.now();
                    let r = tokio::time::timeout(
                        OP_TIMEOUT,
                        ep.s3.delete_object().bucket(*bucket).key(key).send(),
                    )
                    .await;
                    let o = s3_write_outcome(r);
                    h.record(id, &reg, "clear", "", "", &o, call);
                    o
                }
            },
        };
        if matches!(outcome, Outcome::Unknown(_)) {
            id += WORKERS;
        }
        tokio::time::sleep(Duration::from_millis(pause)).await;
    }
}

/// The Porcupine checker: `$GRANARY_LINCHECK_BIN`, or built by `tools/lincheck.sh`.
fn lincheck_bin() -> PathBuf {
    match std::env::var("GRANARY_LINCHECK_BIN") {
        Ok(p) => PathBuf::from(p),
        Err(_) => granary_e2e::build_tool("lincheck.sh").expect("building the Porcupine checker"),
    }
}

/// Runs the checker on a history file; returns its exit code and output.
fn check(history: &std::path::Path, html: &std::path::Path) -> (i32, String) {
    // Per key; a 60 s history checks in well under a second.
    let timeout = std::env::var("GRANARY_LINCHECK_TIMEOUT").unwrap_or_else(|_| "120s".into());
    let out = std::process::Command::new(lincheck_bin())
        .arg("--timeout")
        .arg(timeout)
        .arg("--html")
        .arg(html)
        .arg(history)
        .output()
        .expect("running lincheck");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.code().unwrap_or(-1), text)
}

/// The checker itself must catch what it is there to catch: a read of an overwritten
/// value, a compare-and-set that succeeded against a value no longer there, and a
/// lost acknowledged write; and must accept an unknown write that took effect late.
#[test]
fn the_checker_finds_violations_and_accepts_late_unknown_writes() {
    let dir = tempfile::tempdir().unwrap();
    let run = |name: &str, lines: &[Value]| {
        let p = dir.path().join(format!("{name}.jsonl"));
        let text: Vec<String> = lines.iter().map(Value::to_string).collect();
        std::fs::write(&p, text.join("\n")).unwrap();
        check(&p, &dir.path().join(format!("{name}.html")))
    };
    let op = |op: &str, value: &str, expect: &str, result: &str, call: u64, ret: u64| {
        json!({"client": call, "key": "k", "op": op, "value": value, "expect": expect,
               "result": result, "call": call, "ret": ret})
    };
    let get = |read: Option<&str>, call: u64, ret: u64| {
        json!({"client": call, "key": "k", "op": "get", "result": "ok",
               "found": read.is_some(), "read": read, "call": call, "ret": ret})
    };
    let stale = [
        op("put", "x", "", "ok", 1, 2),
        op("put", "y", "", "ok", 3, 4),
        get(Some("x"), 5, 6),
    ];
    let (code, out) = run("stale", &stale);
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("get() -> x"), "{out}");
    let bad_cas = [
        op("put", "x", "", "ok", 1, 2),
        op("put", "y", "", "ok", 3, 4),
        op("cas", "z", "x", "ok", 5, 6),
    ];
    assert_eq!(run("cas", &bad_cas).0, 1);
    let lost = [
        op("create", "x", "", "ok", 1, 2),
        op("delete", "", "", "fail", 3, 4),
    ];
    assert_eq!(run("lost", &lost).0, 1);
    let late = [
        op("put", "x", "", "ok", 1, 2),
        op("cas", "y", "x", "unknown", 3, 4),
        get(Some("x"), 5, 6),
        get(Some("y"), 7, 8),
        op("delete", "", "", "ok", 9, 10),
        get(None, 11, 12),
    ];
    let (code, out) = run("late", &late);
    assert_eq!(code, 0, "{out}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kv_and_s3_registers_stay_linearizable_under_kills_stops_and_partitions() {
    let secs: u64 = std::env::var("GRANARY_NEMESIS_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(60);
    let checker = tokio::task::spawn_blocking(lincheck_bin).await.unwrap();
    println!("checker: {}", checker.display());
    let mut c = TestCluster::start(
        NODES,
        Settings {
            partitions: PARTITIONS,
            ..Settings::default()
        },
    )
    .unwrap();
    c.wait_ready().await;
    let (ak, sk, id) = c.tenant("lin").await;
    let tenant: TenantId = id.parse().unwrap();
    let eps: Vec<Endpoint> = c
        .nodes
        .iter()
        .map(|m| Endpoint {
            kv: KvClient::new(&m.proc.kv, &ak, &sk),
            s3: s3_client(&m.proc.s3, &ak, &sk),
        })
        .collect();
    for b in BUCKETS {
        eps[0].s3.create_bucket().bucket(b).send().await.unwrap();
    }

    let h = Arc::new(History {
        started: Instant::now(),
        ops: Mutex::new(Vec::new()),
        no_reads: Mutex::new(0),
        not_applied: Mutex::new(0),
        unknown_why: Mutex::new(BTreeMap::new()),
    });
    let stop = Arc::new(AtomicBool::new(false));
    let regs = Reg::all();
    let workers: Vec<_> = (0..WORKERS)
        .map(|w| {
            tokio::spawn(client(
                w,
                h.clone(),
                eps.clone(),
                regs.clone(),
                stop.clone(),
            ))
        })
        .collect();

    // The nemesis: one fault at a time, each healed before the next.
    let mut faults: BTreeMap<&str, u32> = BTreeMap::new();
    let deadline = Instant::now() + Duration::from_secs(secs);
    let sleep = |lo: u64, hi: u64| {
        let ms = rand::rng().random_range(lo..hi);
        tokio::time::sleep(Duration::from_millis(ms))
    };
    // Faults in rounds of all four kinds, each round shuffled.
    let mut schedule: Vec<u32> = Vec::new();
    while Instant::now() < deadline {
        sleep(1500, 4000).await;
        if schedule.is_empty() {
            schedule = vec![0, 1, 2, 3];
            rand::seq::SliceRandom::shuffle(schedule.as_mut_slice(), &mut rand::rng());
        }
        let kind = schedule.pop().unwrap();
        let t = h.now() as f64 / 1e9;
        match kind {
            0 => {
                let i = rand::rng().random_range(0..NODES);
                println!("{t:7.1} s  nemesis: kill -9 n{}", i + 1);
                c.nodes[i].proc.kill9();
                sleep(1000, 8000).await;
                let m = tokio::task::block_in_place(|| c.start_node(i)).unwrap();
                c.nodes[i] = m;
                println!(
                    "{:7.1} s  nemesis: n{} restarted",
                    h.now() as f64 / 1e9,
                    i + 1
                );
                *faults.entry("kill -9 and restart").or_default() += 1;
            }
            1 => {
                let i = rand::rng().random_range(0..NODES);
                println!("{t:7.1} s  nemesis: SIGSTOP n{}", i + 1);
                signal(&c.nodes[i].proc, "-STOP");
                sleep(1000, 9000).await;
                signal(&c.nodes[i].proc, "-CONT");
                println!(
                    "{:7.1} s  nemesis: SIGCONT n{}",
                    h.now() as f64 / 1e9,
                    i + 1
                );
                *faults.entry("SIGSTOP and resume").or_default() += 1;
            }
            _ => {
                // A hot partition: that of a random namespace or bucket.
                let containers: Vec<String> = NAMESPACES
                    .iter()
                    .map(|ns| format!("kv:{ns}"))
                    .chain(BUCKETS.iter().map(|b| b.to_string()))
                    .collect();
                let hot = &containers[rand::rng().random_range(0..containers.len())];
                let Some(p) = c
                    .acting_primary(PartitionId::of(tenant, hot.as_bytes(), PARTITIONS).0)
                    .await
                else {
                    continue;
                };
                let also_catalog = kind == 3;
                println!(
                    "{t:7.1} s  nemesis: cut n{} (primary of {hot}) from its peers{}",
                    p + 1,
                    if also_catalog { " and the catalog" } else { "" }
                );
                for o in (0..NODES).filter(|&o| o != p) {
                    c.net.cut(p, o).unwrap();
                }
                if also_catalog {
                    c.net.isolate_from_catalog(p, true).unwrap();
                }
                // Cut from the catalog too, it is failed over after about 9 s
                // (`fail_after` and the take-over wait): long enough, often.
                if also_catalog {
                    sleep(4000, 14000).await;
                } else {
                    sleep(2000, 9000).await;
                }
                for o in (0..NODES).filter(|&o| o != p) {
                    c.net.heal(p, o).unwrap();
                }
                if also_catalog {
                    c.net.isolate_from_catalog(p, false).unwrap();
                }
                println!("{:7.1} s  nemesis: healed", h.now() as f64 / 1e9);
                *faults
                    .entry(if also_catalog {
                        "primary cut from peers and catalog"
                    } else {
                        "primary cut from peers"
                    })
                    .or_default() += 1;
            }
        }
    }
    // Calm: clients go on for a while on the healed cluster, then stop.
    sleep(3000, 3001).await;
    stop.store(true, Ordering::Relaxed);
    for w in workers {
        w.await.unwrap();
    }
    c.wait_ready().await;

    // Every register read through every node: an acknowledged write that was lost, or a
    // node that serves an old value, shows here.
    // (A read that fails, say on a partition still being taken up, is retried; only
    // reads that answered are in the history.)
    let generations = h.now() / GENERATION.as_nanos() as u64;
    for reg in (0..=generations).flat_map(|g| regs.iter().map(move |r| r.at(g))) {
        for (i, ep) in eps.iter().enumerate() {
            let started = Instant::now();
            while !matches!(
                read(&h, WORKERS * 1000 + i, ep, &reg).await,
                Outcome::Read(_)
            ) {
                assert!(
                    started.elapsed() < Duration::from_secs(30),
                    "final read of {} through n{} failed for 30 s",
                    reg.name(),
                    i + 1
                );
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    }
    c.converge(&[0, 1, 2], 60, "replicas converged after the faults")
        .await;

    let ops = std::mem::take(&mut *h.ops.lock().unwrap());
    let mut counts: BTreeMap<(String, String), u64> = BTreeMap::new();
    for o in &ops {
        let kind = format!(
            "{} {}",
            &o["key"].as_str().unwrap()[..2],
            o["op"].as_str().unwrap()
        );
        *counts
            .entry((kind, o["result"].as_str().unwrap().to_string()))
            .or_default() += 1;
    }
    println!("faults: {faults:?}");
    let mut handoffs = 0.0;
    for m in &c.nodes {
        if let Ok(page) = m.proc.metrics().await {
            handoffs += granary_e2e::cluster::metric(&page, "granary_primary_handoffs_total");
        }
    }
    println!(
        "orderly hand-overs during the run (returning nodes getting their partitions back, \
         counted since each node's last start): {handoffs}"
    );
    println!(
        "{} operations recorded, {} failed reads left out:",
        ops.len(),
        h.no_reads.lock().unwrap()
    );
    for ((kind, result), n) in &counts {
        println!("  {kind:<12} {result:<8} {n}");
    }
    let unknown: u64 = counts
        .iter()
        .filter(|((_, r), _)| r == "unknown")
        .map(|(_, n)| n)
        .sum();
    println!(
        "indeterminate: {unknown} {:?}; not applied (503, refused connections, left out): {}",
        h.unknown_why.lock().unwrap(),
        h.not_applied.lock().unwrap()
    );
    let ok_writes: u64 = counts
        .iter()
        .filter(|((k, r), _)| r == "ok" && !k.ends_with("get"))
        .map(|(_, n)| n)
        .sum();
    assert!(
        ok_writes > 100,
        "too few acknowledged writes to judge: {ok_writes}"
    );

    let dir = tempfile::Builder::new()
        .prefix("granary-nemesis")
        .tempdir()
        .unwrap();
    let history = dir.path().join("history.jsonl");
    let lines: Vec<String> = ops.iter().map(Value::to_string).collect();
    std::fs::write(&history, lines.join("\n")).unwrap();
    let html = dir.path().join("violation.html");
    let (code, out) = tokio::task::spawn_blocking(move || check(&history, &html))
        .await
        .unwrap();
    println!("{out}");
    if code != 0 {
        let kept = dir.keep();
        if code != 1 {
            panic!(
                "the checker could not decide (exit {code}: a key's check timed out, or bad \
                 input); history kept in {}",
                kept.display()
            );
        }
        c.print_logs();
        panic!(
            "the history is not linearizable; history and drawing kept in {}",
            kept.display()
        );
    }
}
