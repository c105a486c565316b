//! Crash safety (SIGKILL and power loss during writes), corruption detection and bad
//! input, against real `granary-node` processes. The power-loss tests put the data
//! directory on the power-loss file system (`tests/powerloss-fs`), which discards
//! everything not made durable by fsync at the moment of the cut.

use std::collections::HashMap;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use aws_sdk_s3::primitives::ByteStream;
use granary_e2e::{
    Admin, KvClient, NodeProc, PowerLossFs, PowerLossMode, chunk_files, mount_powerloss,
};
use rand::Rng;

use granary_e2e::s3_client as client;

fn payload(tag: &str, len: usize) -> Vec<u8> {
    let seed = tag
        .bytes()
        .fold(7u8, |a, b| a.wrapping_mul(31).wrapping_add(b));
    (0..len)
        .map(|i| (i as u8).wrapping_mul(13).wrapping_add(seed))
        .collect()
}

#[derive(Default, Clone)]
struct History {
    acked_objects: HashMap<String, Vec<u8>>,
    attempted_objects: HashMap<String, Vec<u8>>,
    acked_kv: HashMap<String, Vec<u8>>,
    attempted_kv: HashMap<String, Vec<u8>>,
    acked_buckets: Vec<String>,
    acked_tenants: Vec<String>,
}

/// How each cycle of [`crash_cycles`] ends.
enum Crash {
    /// SIGKILL: the page cache survives, so only missing ordering shows.
    Kill,
    /// Power loss: unsynced data and names are discarded at the moment of the kill.
    PowerCut(PowerLossFs),
}

fn crash_cycle_count() -> usize {
    // 5 in the test command; `scripts/soak.sh` runs many more.
    std::env::var("GRANARY_CRASH_CYCLES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(5)
}

/// Runs `cycles` rounds of: start the node on `data_dir`, check every acknowledged
/// write (objects both inline and chunked, KV keys, buckets, tenants) and that nothing
/// unacknowledged is torn, start writers, crash while they are in flight.
async fn crash_cycles(data_dir: &Path, log_dir: &Path, mut crash: Crash, cycles: usize) {
    let label = match crash {
        Crash::Kill => "crash test",
        Crash::PowerCut(_) => "power-loss test",
    };
    let history = Arc::new(Mutex::new(History::default()));
    let mut rng = rand::rng();
    let mut credentials: Option<(String, String, String)> = None;
    for cycle in 0..=cycles {
        if cycles > 5 {
            eprintln!("{label}: cycle {cycle}/{cycles}");
        }
        let mut node = match crash {
            Crash::Kill => NodeProc::start(data_dir).unwrap(),
            Crash::PowerCut(_) => NodeProc::start_logged(data_dir, log_dir).unwrap(),
        };
        // The node keeps its identity: same admin token and dev key after every crash.
        let creds = (
            node.access_key.clone(),
            node.secret_key.clone(),
            node.admin_token.clone(),
        );
        assert_eq!(
            credentials.get_or_insert_with(|| creds.clone()),
            &creds,
            "credentials changed after crash {cycle}"
        );
        let c = client(&node.s3, &node.access_key, &node.secret_key);
        let kv = KvClient::new(&node.kv, &node.access_key, &node.secret_key);
        let admin = Admin::new(&node);
        if cycle == 0 {
            c.create_bucket().bucket("crash").send().await.unwrap();
        }
        // Everything acknowledged before any crash reads back byte-identical; anything
        // attempted but not acknowledged is either absent or complete.
        {
            let h = history.lock().unwrap().clone();
            for (k, v) in &h.acked_objects {
                let got = c
                    .get_object()
                    .bucket("crash")
                    .key(k)
                    .send()
                    .await
                    .unwrap_or_else(|e| panic!("{label}: acked {k} lost: {e:?}"));
                assert_eq!(
                    &got.body.collect().await.unwrap().into_bytes().to_vec(),
                    v,
                    "acked {k} differs"
                );
            }
            for (k, v) in &h.attempted_objects {
                if let Ok(got) = c.get_object().bucket("crash").key(k).send().await {
                    assert_eq!(
                        &got.body.collect().await.unwrap().into_bytes().to_vec(),
                        v,
                        "unacked {k} is torn"
                    );
                }
            }
            for (k, v) in &h.acked_kv {
                let r = kv
                    .send("GET", &format!("/kv/v1/crash/{k}"), &[], vec![])
                    .await
                    .unwrap();
                assert_eq!(r.status(), 200, "{label}: acked kv {k} lost");
                assert_eq!(&r.bytes().await.unwrap().to_vec(), v);
            }
            for (k, v) in &h.attempted_kv {
                let r = kv
                    .send("GET", &format!("/kv/v1/crash/{k}"), &[], vec![])
                    .await
                    .unwrap();
                if r.status() == 200 {
                    assert_eq!(
                        &r.bytes().await.unwrap().to_vec(),
                        v,
                        "unacked kv {k} is torn"
                    );
                }
            }
            for b in &h.acked_buckets {
                c.head_bucket()
                    .bucket(b)
                    .send()
                    .await
                    .unwrap_or_else(|e| panic!("{label}: acked bucket {b} lost: {e:?}"));
            }
            for t in &h.acked_tenants {
                let (s, v) = admin
                    .call(reqwest::Method::GET, &format!("/tenants/{t}"), None)
                    .await
                    .unwrap();
                assert_eq!(s, 200, "{label}: acked tenant {t} lost: {v}");
            }
            let l = c.list_objects_v2().bucket("crash").send().await.unwrap();
            assert!(l.contents().len() >= h.acked_objects.len().min(1000));
        }
        if cycle == cycles {
            assert!(node.stop(), "graceful stop after the last cycle");
            break;
        }
        // Writers: objects inline and chunked, KV keys, buckets and tenants, until the
        // crash.
        let mut tasks = Vec::new();
        for w in 0..7 {
            let (c, kv, history) = (c.clone(), kv.clone(), history.clone());
            let admin = Admin::new(&node);
            tasks.push(tokio::spawn(async move {
                for i in 0.. {
                    let key = format!("c{cycle}-w{w}-{i}");
                    if w == 6 {
                        // Catalog writes: a bucket and a tenant per round.
                        let b = format!("b{cycle}-{i}");
                        if c.create_bucket().bucket(&b).send().await.is_err() {
                            break;
                        }
                        history.lock().unwrap().acked_buckets.push(b);
                        let t = format!("t{cycle}-{i}");
                        match admin
                            .call(
                                reqwest::Method::POST,
                                "/tenants",
                                Some(serde_json::json!({"name": t})),
                            )
                            .await
                        {
                            Ok((201, _)) => history.lock().unwrap().acked_tenants.push(t),
                            _ => break,
                        }
                    } else if w % 3 == 2 {
                        let v = payload(&key, 100);
                        history
                            .lock()
                            .unwrap()
                            .attempted_kv
                            .insert(key.clone(), v.clone());
                        match kv
                            .send("PUT", &format!("/kv/v1/crash/{key}"), &[], v.clone())
                            .await
                        {
                            Ok(r) if r.status() == 200 => {
                                history.lock().unwrap().acked_kv.insert(key, v);
                            }
                            _ => break,
                        }
                    } else {
                        // Inline (3 kB) and chunked (from 300 kB up), across the boundary.
                        let len = if w % 3 == 0 { 3_000 } else { 300_000 + i * 977 };
                        let v = payload(&key, len);
                        history
                            .lock()
                            .unwrap()
                            .attempted_objects
                            .insert(key.clone(), v.clone());
                        match c
                            .put_object()
                            .bucket("crash")
                            .key(&key)
                            .body(ByteStream::from(v.clone()))
                            .send()
                            .await
                        {
                            Ok(_) => {
                                history.lock().unwrap().acked_objects.insert(key, v);
                            }
                            Err(_) => break,
                        }
                    }
                }
            }));
        }
        tokio::time::sleep(Duration::from_millis(rng.random_range(300..1200))).await;
        if let Crash::PowerCut(fs) = &mut crash {
            // The cut first: from this instant nothing more becomes durable and the
            // node's open files fail; then the process goes.
            let report = fs.power_cut().unwrap();
            if cycles > 5 {
                eprintln!("{label}: cut {cycle}: {report}");
            }
        }
        node.kill9();
        for t in tasks {
            let _ = t.await;
        }
    }
    let h = history.lock().unwrap();
    assert!(
        h.acked_objects.len() > 20 && h.acked_kv.len() > 20,
        "too few writes to mean anything: {} objects, {} kv",
        h.acked_objects.len(),
        h.acked_kv.len()
    );
    eprintln!(
        "{label}: {} objects, {} KV keys, {} buckets and {} tenants acknowledged across {cycles} crashes",
        h.acked_objects.len(),
        h.acked_kv.len(),
        h.acked_buckets.len(),
        h.acked_tenants.len()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_during_writes_loses_no_acknowledged_write() {
    let dir = tempfile::tempdir().unwrap();
    crash_cycles(dir.path(), dir.path(), Crash::Kill, crash_cycle_count()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn power_loss_during_writes_loses_no_acknowledged_write() {
    let dir = tempfile::tempdir().unwrap();
    let fs = mount_powerloss(dir.path(), PowerLossMode::Strict).unwrap();
    // The node creates its data directory itself, inside the power-loss mount.
    let data = fs.mountpoint().join("data");
    crash_cycles(
        &data,
        &dir.path().join("logs"),
        Crash::PowerCut(fs),
        crash_cycle_count(),
    )
    .await;
}

/// A fresh power-loss mount, and a durable, empty data directory in it for tests that
/// look at one gap at a time.
fn powerloss_with_data_dir() -> (tempfile::TempDir, PowerLossFs, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let fs = mount_powerloss(dir.path(), PowerLossMode::Strict).unwrap();
    let data = fs.mountpoint().join("data");
    std::fs::create_dir(&data).unwrap();
    std::fs::File::open(fs.mountpoint())
        .unwrap()
        .sync_all()
        .unwrap();
    (dir, fs, data)
}

/// Gap: the engine directory (`data/engine/`, with `meta.redb` and `chunks/`) was never
/// fsynced, so a power cut took the whole engine while the catalog survived.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn power_loss_keeps_the_engine_layout_and_its_first_writes() {
    let (dir, mut fs, data) = powerloss_with_data_dir();
    let logs = dir.path().join("logs");
    let mut node = NodeProc::start_logged(&data, &logs).unwrap();
    let c = client(&node.s3, &node.access_key, &node.secret_key);
    c.create_bucket().bucket("first").send().await.unwrap();
    let big = payload("big", 1_000_000);
    for (k, v) in [("small", payload("small", 100)), ("big", big.clone())] {
        c.put_object()
            .bucket("first")
            .key(k)
            .body(ByteStream::from(v))
            .send()
            .await
            .unwrap();
    }
    let kv = KvClient::new(&node.kv, &node.access_key, &node.secret_key);
    let r = kv
        .send("PUT", "/kv/v1/first/k", &[], b"v".to_vec())
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    eprintln!("cut: {}", fs.power_cut().unwrap());
    node.kill9();
    let node = NodeProc::start_logged(&data, &logs).unwrap();
    let c = client(&node.s3, &node.access_key, &node.secret_key);
    let got = c
        .get_object()
        .bucket("first")
        .key("big")
        .send()
        .await
        .expect("acknowledged object lost in the power cut");
    assert!(got.body.collect().await.unwrap().into_bytes().to_vec() == big);
    c.head_object()
        .bucket("first")
        .key("small")
        .send()
        .await
        .expect("acknowledged inline object lost in the power cut");
    let kv = KvClient::new(&node.kv, &node.access_key, &node.secret_key);
    let r = kv.send("GET", "/kv/v1/first/k", &[], vec![]).await.unwrap();
    assert_eq!(r.status(), 200, "acknowledged KV key lost in the power cut");
}

/// Gap: the data directory's parent was never fsynced when the node created the data
/// directory, so a power cut removed all of it and the restart minted new credentials.
/// Also cuts at random moments of the very first start: the restart must come up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn power_loss_during_first_start_keeps_the_credentials() {
    let mut rng = rand::rng();
    // 3 in the test command; more under `scripts/soak.sh`.
    let rounds = (crash_cycle_count() / 5).max(3);
    for round in 0..rounds {
        let dir = tempfile::tempdir().unwrap();
        let mut fs = mount_powerloss(dir.path(), PowerLossMode::Strict).unwrap();
        let data = fs.mountpoint().join("data");
        let logs = dir.path().join("logs");
        if round > 0 {
            // Cut somewhere inside the first start, before it finished.
            std::fs::create_dir_all(&logs).unwrap();
            let child = std::process::Command::new(granary_e2e::node_binary())
                .args(NodeProc::dev_args(&data))
                .stdout(std::fs::File::create(logs.join("first.log")).unwrap())
                .stderr(std::process::Stdio::null())
                .spawn()
                .unwrap();
            let child = granary_e2e::ChildGuard::new(child);
            tokio::time::sleep(Duration::from_millis(rng.random_range(0..400))).await;
            eprintln!("cut during first start: {}", fs.power_cut().unwrap());
            drop(child);
        }
        let mut node = NodeProc::start_logged(&data, &logs).unwrap();
        let before = (
            node.access_key.clone(),
            node.secret_key.clone(),
            node.admin_token.clone(),
        );
        eprintln!("cut after first start: {}", fs.power_cut().unwrap());
        node.kill9();
        let node = NodeProc::start_logged(&data, &logs).unwrap();
        let after = (
            node.access_key.clone(),
            node.secret_key.clone(),
            node.admin_token.clone(),
        );
        assert_eq!(before, after, "credentials changed across the power cut");
        let c = client(&node.s3, &node.access_key, &node.secret_key);
        c.create_bucket().bucket("works").send().await.unwrap();
    }
}

/// Gap: unlinks of chunk files were not followed by a directory fsync, so deleted chunk
/// files came back after a power cut.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deleted_chunk_files_stay_deleted_after_a_power_loss() {
    let (dir, mut fs, data) = powerloss_with_data_dir();
    let logs = dir.path().join("logs");
    let mut node = NodeProc::start_logged(&data, &logs).unwrap();
    let c = client(&node.s3, &node.access_key, &node.secret_key);
    c.create_bucket().bucket("del").send().await.unwrap();
    c.put_object()
        .bucket("del")
        .key("k")
        .body(ByteStream::from(payload("del", 3_000_000)))
        .send()
        .await
        .unwrap();
    let files = chunk_files(&data);
    assert_eq!(files.len(), 1);
    let name = files[0].file_name().unwrap().to_string_lossy().into_owned();
    c.delete_object()
        .bucket("del")
        .key("k")
        .send()
        .await
        .unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !chunk_files(&data).is_empty() {
        assert!(std::time::Instant::now() < deadline, "chunk not removed");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // The removal syncs its directory right after the unlink: wait for that fsync in
    // the file system's log (at most 5 s; without it the check below fails).
    let synced = || {
        std::fs::read_to_string(fs.log_path())
            .unwrap_or_default()
            .lines()
            .any(|l| {
                l.starts_with("fsyncdir ")
                    && l.split_once("removed=")
                        .is_some_and(|(_, r)| r.contains(&name))
            })
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while !synced() && std::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    eprintln!("cut: {}", fs.power_cut().unwrap());
    node.kill9();
    assert_eq!(
        chunk_files(&data),
        Vec::<PathBuf>::new(),
        "deleted chunk files are back after the power cut"
    );
}

/// Gap: `endpoints.json` (temporary file and rename) was not followed by a directory
/// fsync, so a power cut brought back the previous run's file, or none.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_endpoints_file_is_durable_once_written() {
    let (dir, mut fs, data) = powerloss_with_data_dir();
    let logs = dir.path().join("logs");
    let mut node = NodeProc::start_logged(&data, &logs).unwrap();
    assert!(node.stop());
    let mut node = NodeProc::start_logged(&data, &logs).unwrap();
    let pid = node.pid().unwrap();
    fs.power_cut().unwrap();
    node.kill9();
    let text = std::fs::read_to_string(data.join("endpoints.json"))
        .expect("endpoints.json gone after the power cut");
    let v: serde_json::Value = serde_json::from_str(&text).unwrap();
    assert_eq!(v["pid"], pid, "endpoints.json reverted to an older run");
}

/// A fresh node in its own directory holding one object `bucket/key` of `len` bytes.
async fn node_with_object(
    bucket: &str,
    key: &str,
    len: usize,
) -> (tempfile::TempDir, NodeProc, aws_sdk_s3::Client, Vec<u8>) {
    let dir = tempfile::tempdir().unwrap();
    let node = NodeProc::start(dir.path()).unwrap();
    let c = client(&node.s3, &node.access_key, &node.secret_key);
    c.create_bucket().bucket(bucket).send().await.unwrap();
    let v = payload(bucket, len);
    c.put_object()
        .bucket(bucket)
        .key(key)
        .body(ByteStream::from(v.clone()))
        .send()
        .await
        .unwrap();
    (dir, node, c, v)
}

/// Starts a plain HTTP GET of an object (through a presigned URL) and returns the
/// response with its first piece read, the rest still to come.
async fn start_slow_get(
    c: &aws_sdk_s3::Client,
    bucket: &str,
    key: &str,
) -> (reqwest::Response, Vec<u8>) {
    use aws_sdk_s3::presigning::PresigningConfig;
    let url = c
        .get_object()
        .bucket(bucket)
        .key(key)
        .presigned(PresigningConfig::expires_in(Duration::from_secs(300)).unwrap())
        .await
        .unwrap();
    let mut resp = reqwest::get(url.uri()).await.unwrap();
    assert_eq!(resp.status(), 200);
    let first = resp.chunk().await.unwrap().unwrap().to_vec();
    (resp, first)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flipped_bytes_in_a_chunk_fail_the_read_and_are_never_served() {
    let (dir, _node, c, v) = node_with_object("rot", "early", 3 * 1024 * 1024).await;
    let files = chunk_files(dir.path());
    assert_eq!(files.len(), 1);
    // Flip one byte early in the data (first piece read) ...
    let mut raw = std::fs::read(&files[0]).unwrap();
    raw[16 + 1000] ^= 0x01;
    std::fs::write(&files[0], &raw).unwrap();
    let r = c.get_object().bucket("rot").key("early").send().await;
    match r {
        Err(e) => assert_eq!(e.raw_response().map(|r| r.status().as_u16()), Some(500)),
        Ok(o) => assert!(o.body.collect().await.is_err(), "corrupt data was served"),
    }
    // ... and one late in a second object, read after the response has started.
    c.put_object()
        .bucket("rot")
        .key("late")
        .body(ByteStream::from(v.clone()))
        .send()
        .await
        .unwrap();
    let late = chunk_files(dir.path())
        .into_iter()
        .find(|p| *p != files[0])
        .unwrap();
    let mut raw = std::fs::read(&late).unwrap();
    let at = raw.len() - 100_000;
    raw[at] ^= 0x80;
    std::fs::write(&late, &raw).unwrap();
    let r = c.get_object().bucket("rot").key("late").send().await;
    if let Ok(o) = r {
        assert!(o.body.collect().await.is_err(), "corrupt tail was served");
    }
    // A ranged read of the intact part still works; the node keeps serving.
    let ok = c
        .get_object()
        .bucket("rot")
        .key("late")
        .range("bytes=0-999")
        .send()
        .await
        .unwrap();
    assert_eq!(
        ok.body.collect().await.unwrap().into_bytes().to_vec(),
        &v[..1000]
    );
}

/// Sends raw bytes to the S3 port and returns the response head and body.
fn raw_http(addr: &str, request: &[u8], close_early: bool) -> String {
    let addr = addr.trim_start_matches("http://");
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(request).unwrap();
    if close_early {
        let _ = s.shutdown(std::net::Shutdown::Both);
        return String::new();
    }
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    String::from_utf8_lossy(&out).to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_gets_the_right_error_and_changes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let node = NodeProc::start(dir.path()).unwrap();
    let c = client(&node.s3, &node.access_key, &node.secret_key);
    c.create_bucket().bucket("safe").send().await.unwrap();
    c.put_object()
        .bucket("safe")
        .key("keep")
        .body(ByteStream::from_static(b"original"))
        .send()
        .await
        .unwrap();
    let mut raw = KvClient::new(&node.s3, &node.access_key, &node.secret_key);
    raw.service = "s3";
    let text = |r: reqwest::Response| async move { (r.status().as_u16(), r.text().await.unwrap()) };

    // Malformed XML.
    let (s, b) = text(
        raw.send(
            "POST",
            "/safe?delete",
            &[("content-type", "application/xml")],
            b"<Delete><Object><Key>keep".to_vec(),
        )
        .await
        .unwrap(),
    )
    .await;
    assert_eq!(s, 400, "{b}");
    assert!(b.contains("MalformedXML"), "{b}");
    // Wrong signature, no signature.
    let mut wrong = raw.clone();
    wrong.secret_key = "nope".into();
    let (s, b) = text(wrong.send("GET", "/safe/keep", &[], vec![]).await.unwrap()).await;
    assert_eq!(s, 403);
    assert!(b.contains("SignatureDoesNotMatch"), "{b}");
    let mut unknown = raw.clone();
    unknown.access_key = "GKUNKNOWNUNKNOWN".into();
    let (s, b) = text(
        unknown
            .send("GET", "/safe/keep", &[], vec![])
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(s, 403);
    assert!(b.contains("InvalidAccessKeyId"), "{b}");
    let (s, b) = text(
        reqwest::get(format!("{}/safe/keep", node.s3))
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(s, 403);
    assert!(b.contains("AccessDenied"), "{b}");
    // Key over 1024 bytes.
    let long = "k".repeat(1025);
    let e = c
        .put_object()
        .bucket("safe")
        .key(&long)
        .body(ByteStream::from_static(b"x"))
        .send()
        .await
        .unwrap_err();
    assert_eq!(
        e.as_service_error()
            .and_then(aws_sdk_s3::error::ProvideErrorMetadata::code),
        Some("KeyTooLongError")
    );
    // Wrong Content-MD5 on an overwrite: refused, old data kept.
    let e = c
        .put_object()
        .bucket("safe")
        .key("keep")
        .content_md5("1B2M2Y8AsgTpgAmY7PhCfg==")
        .body(ByteStream::from_static(b"replacement"))
        .send()
        .await
        .unwrap_err();
    assert_eq!(
        e.as_service_error()
            .and_then(aws_sdk_s3::error::ProvideErrorMetadata::code),
        Some("BadDigest")
    );
    let e = c
        .put_object()
        .bucket("safe")
        .key("keep")
        .content_md5("not-base64!")
        .body(ByteStream::from_static(b"replacement"))
        .send()
        .await
        .unwrap_err();
    assert_eq!(
        e.as_service_error()
            .and_then(aws_sdk_s3::error::ProvideErrorMetadata::code),
        Some("InvalidDigest")
    );
    // Oversized headers.
    let host = node.s3.trim_start_matches("http://");
    let big = format!(
        "GET /safe/keep HTTP/1.1\r\nHost: {host}\r\nX-Big: {}\r\nConnection: close\r\n\r\n",
        "a".repeat(128 * 1024)
    );
    let resp = raw_http(&node.s3, big.as_bytes(), false);
    assert!(
        resp.is_empty() || resp.starts_with("HTTP/1.1 431") || resp.starts_with("HTTP/1.1 400"),
        "{resp:.200}"
    );
    // Truncated body: the connection closes mid-upload; nothing becomes visible.
    let head =
        format!("PUT /safe/truncated HTTP/1.1\r\nHost: {host}\r\nContent-Length: 200000\r\n\r\n");
    let mut req = head.into_bytes();
    req.extend(std::iter::repeat_n(b'z', 1000));
    raw_http(&node.s3, &req, true);
    let mut trunc_signed = raw.clone();
    trunc_signed.service = "s3";
    tokio::time::sleep(Duration::from_millis(300)).await;
    let e = c
        .head_object()
        .bucket("safe")
        .key("truncated")
        .send()
        .await
        .unwrap_err();
    assert_eq!(e.raw_response().map(|r| r.status().as_u16()), Some(404));
    // Garbage that is not HTTP at all.
    raw_http(&node.s3, b"\x00\x01\x02 not http\r\n\r\n", false);

    // The node still serves and nothing stored changed.
    let got = c
        .get_object()
        .bucket("safe")
        .key("keep")
        .send()
        .await
        .unwrap();
    assert_eq!(
        got.body.collect().await.unwrap().into_bytes().as_ref(),
        b"original"
    );
    let l = c.list_objects_v2().bucket("safe").send().await.unwrap();
    assert_eq!(
        l.contents()
            .iter()
            .filter_map(|o| o.key())
            .collect::<Vec<_>>(),
        ["keep"]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_lets_in_flight_requests_finish() {
    let (_dir, mut node, c, v) = node_with_object("drain", "big", 24 * 1024 * 1024).await;
    let (mut resp, mut got) = start_slow_get(&c, "drain", "big").await;
    // SIGTERM while the response is still streaming.
    let pid = node.pid().unwrap().to_string();
    assert!(
        std::process::Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .unwrap()
            .success()
    );
    while let Some(piece) = resp
        .chunk()
        .await
        .expect("the in-flight response is not cut off")
    {
        tokio::time::sleep(Duration::from_millis(2)).await;
        got.extend_from_slice(&piece);
    }
    assert_eq!(got.len(), v.len());
    assert!(got == v, "in-flight GET returned other bytes");
    assert!(
        node.stop(),
        "the node exits cleanly once the request is done"
    );
    // And new connections are refused once it stopped.
    assert!(reqwest::get(format!("{}/", node.s3)).await.is_err());
}

/// A slow reader keeps the bytes it started reading although the object is overwritten
/// and then deleted meanwhile; the old chunk files go as soon as the reader is done.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_get_survives_overwrite_and_delete_then_space_is_freed() {
    // 40 MiB: five chunk files, far more than the socket buffers hold.
    let (dir, _node, c, old) = node_with_object("slow", "k", 40 * 1024 * 1024).await;
    assert_eq!(chunk_files(dir.path()).len(), 5);
    let (mut resp, mut got) = start_slow_get(&c, "slow", "k").await;
    // Overwrite (with an inline object) and delete while the reader stalls, then wait
    // well past the removal delay.
    c.put_object()
        .bucket("slow")
        .key("k")
        .body(ByteStream::from_static(b"new"))
        .send()
        .await
        .unwrap();
    c.delete_object()
        .bucket("slow")
        .key("k")
        .send()
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_secs(8)).await;
    assert!(
        chunk_files(dir.path()).len() == 5,
        "chunks still being read were removed"
    );
    while let Some(piece) = resp
        .chunk()
        .await
        .expect("the slow response is not cut off")
    {
        got.extend_from_slice(&piece);
    }
    assert_eq!(got.len(), old.len());
    assert!(got == old, "the slow reader got other bytes");
    // Nothing references the old chunks and nobody reads them: they go promptly.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !chunk_files(dir.path()).is_empty() {
        assert!(
            std::time::Instant::now() < deadline,
            "{} chunk files left after the reader finished",
            chunk_files(dir.path()).len()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
