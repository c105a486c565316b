//! Hostile input against real granary-node processes: bodies that must never be read
//! before authentication, memory that must stay bounded whatever clients send or how
//! slowly they read, requests whose meaning must not change after signing, and store
//! damage the node must survive without deleting data. RSS is measured from /proc.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use granary_e2e::{KvClient, NodeProc, chunk_files, civil_from_days, s3_client};
use granary_node::engine::Record;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Resident set size of a process, in bytes.
fn rss(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .unwrap_or(0)
        * 1024
}

/// Samples a process's RSS every few milliseconds until dropped; `peak()` is the most
/// seen.
struct RssSampler {
    stop: Arc<AtomicBool>,
    peak: Arc<AtomicU64>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl RssSampler {
    fn start(pid: u32) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let peak = Arc::new(AtomicU64::new(rss(pid)));
        let thread = std::thread::spawn({
            let (stop, peak) = (stop.clone(), peak.clone());
            move || {
                while !stop.load(Ordering::Relaxed) {
                    peak.fetch_max(rss(pid), Ordering::Relaxed);
                    std::thread::sleep(Duration::from_millis(3));
                }
            }
        });
        Self {
            stop,
            peak,
            thread: Some(thread),
        }
    }

    fn peak(&mut self) -> u64 {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        self.peak.load(Ordering::Relaxed)
    }
}

const MIB: u64 = 1024 * 1024;

/// The head of an HTTP/1.1 request to `addr` signed by `signer` for `body` (whole),
/// with its `Content-Length`: for clients that then send less than they announced.
fn signed_head(
    signer: &KvClient,
    addr: &str,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> String {
    let signed = signer.signed_headers(method, path, headers, body).unwrap();
    let mut h = format!(
        "{method} {path} HTTP/1.1\r\nContent-Length: {}\r\n",
        body.len()
    );
    if !signed.iter().any(|(k, _)| k == "host") {
        h.push_str(&format!("Host: {addr}\r\n"));
    }
    for (k, v) in signed {
        h.push_str(&format!("{k}: {v}\r\n"));
    }
    h.push_str("\r\n");
    h
}

/// Sends `head` and then up to `body_len` zero bytes on a raw connection while
/// reading the answer; returns what the server answered (until it closed).
async fn raw_request(addr: &str, head: String, body_len: u64) -> String {
    let stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let (mut rd, mut wr) = stream.into_split();
    let writer = tokio::spawn(async move {
        if wr.write_all(head.as_bytes()).await.is_err() {
            return 0;
        }
        let piece = vec![0u8; MIB as usize];
        let mut sent = 0u64;
        while sent < body_len {
            if wr.write_all(&piece).await.is_err() {
                break;
            }
            sent += MIB;
        }
        sent
    });
    let mut answer = Vec::new();
    let mut buf = vec![0u8; 16 * 1024];
    let deadline = Instant::now() + Duration::from_secs(20);
    while Instant::now() < deadline {
        match tokio::time::timeout(Duration::from_secs(5), rd.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) | Err(_) => break,
            Ok(Ok(n)) => {
                answer.extend_from_slice(&buf[..n]);
                if answer.windows(8).any(|w| w == b"</Error>")
                    || (answer.ends_with(b"}") && answer.windows(9).any(|w| w == b"\"error\":"))
                {
                    break;
                }
            }
        }
    }
    writer.abort();
    String::from_utf8_lossy(&answer).into_owned()
}

/// Stores 1 MiB values under the first `stored` of the keys `v000`, `v001`, ... in
/// `namespace`; the body of a `batchGet` naming `keys` of them.
async fn batch_of_values(kv: &KvClient, namespace: &str, keys: usize, stored: usize) -> Vec<u8> {
    let keys: Vec<String> = (0..keys).map(|i| format!("v{i:03}")).collect();
    for k in keys.iter().take(stored) {
        let r = kv
            .send(
                "PUT",
                &format!("/kv/v1/{namespace}/{k}"),
                &[],
                vec![1u8; MIB as usize],
            )
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
    }
    serde_json::json!({ "keys": keys.iter().map(|k| b64(k)).collect::<Vec<_>>() })
        .to_string()
        .into_bytes()
}

/// A KV `batchGet` of `batch` in `namespace`, signed by `kv`, as raw HTTP/1.1 bytes for
/// `addr`.
fn raw_batch_get(kv: &KvClient, addr: &str, namespace: &str, batch: &[u8]) -> Vec<u8> {
    let path = format!("/kv/v1/{namespace}?batchGet");
    let mut bytes = signed_head(kv, addr, "POST", &path, &[], batch).into_bytes();
    bytes.extend_from_slice(batch);
    bytes
}

/// Sends `request` on a socket with a tiny receive buffer and reads the first bytes of
/// the answer; the socket reads nothing more unless the caller does.
async fn slow_reader(addr: &str, request: &[u8]) -> (tokio::net::TcpStream, String) {
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    let mut c = socket.connect(addr.parse().unwrap()).await.unwrap();
    c.write_all(request).await.unwrap();
    let mut head = vec![0u8; 512];
    let n = tokio::time::timeout(Duration::from_secs(10), c.read(&mut head))
        .await
        .expect("an answer")
        .unwrap();
    let text = String::from_utf8_lossy(&head[..n]).into_owned();
    (c, text)
}

/// 8 parallel anonymous POST Object requests announcing 1 GiB each, refused at the
/// file field for want of a signed policy (and an unsigned
/// PUT, an unsigned XML POST, and KV PUTs of 1 GiB without credentials or with an
/// unknown key): every one is refused with a clear protocol error, the
/// node reads no body (its RSS grows by less than 100 MiB) and keeps serving.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn anonymous_uploads_are_refused_before_their_body_is_read() {
    let dir = tempfile::tempdir().unwrap();
    let node = NodeProc::start(dir.path()).unwrap();
    let c = s3_client(&node.s3, &node.access_key, &node.secret_key);
    c.create_bucket().bucket("uploads").send().await.unwrap();
    let addr = node.s3.trim_start_matches("http://").to_string();
    let pid = node.pid().unwrap();
    let before = rss(pid);
    let mut sampler = RssSampler::start(pid);

    let gib = 1024 * MIB;
    let boundary = "granaryboundary";
    let form_head = format!(
        "--{boundary}\r\nContent-Disposition: form-data; name=\"key\"\r\n\r\nbig\r\n\
         --{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"f\"\r\n\
         Content-Type: application/octet-stream\r\n\r\n"
    );
    let mut tasks = Vec::new();
    for _ in 0..8 {
        let head = format!(
            "POST /uploads HTTP/1.1\r\nHost: {addr}\r\n\
             Content-Type: multipart/form-data; boundary={boundary}\r\n\
             Content-Length: {}\r\n\r\n{form_head}",
            gib + form_head.len() as u64
        );
        tasks.push(tokio::spawn({
            let addr = addr.clone();
            async move { raw_request(&addr, head, gib).await }
        }));
    }
    // Unsigned PUT Object and unsigned DeleteObjects (an XML body s3s would buffer).
    for head in [
        format!("PUT /uploads/k HTTP/1.1\r\nHost: {addr}\r\nContent-Length: {gib}\r\n\r\n"),
        format!(
            "POST /uploads?delete HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/xml\r\n\
             Content-Length: {}\r\n\r\n",
            20 * MIB
        ),
    ] {
        tasks.push(tokio::spawn({
            let addr = addr.clone();
            async move { raw_request(&addr, head, 20 * MIB).await }
        }));
    }
    // KV: 1 GiB announced without credentials, and with an unknown access key.
    let kv_addr = node.kv.trim_start_matches("http://").to_string();
    for auth in [
        String::new(),
        "Authorization: AWS4-HMAC-SHA256 Credential=NOSUCHKEY/20260101/us-east-1/kv/aws4_request, \
         SignedHeaders=host;x-amz-date, Signature=0000000000000000000000000000000000000000000000000000000000000000\r\n"
            .to_string(),
    ] {
        let date = {
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_secs();
            // The date only has to be within the skew window for the key lookup to run.
            let days = now / 86400;
            let (y, m, d) = civil_from_days(days as i64);
            let secs = now % 86400;
            format!(
                "{y:04}{m:02}{d:02}T{:02}{:02}{:02}Z",
                secs / 3600,
                secs / 60 % 60,
                secs % 60
            )
        };
        let auth = auth.replace("20260101", &date[..8]);
        let head = format!(
            "PUT /kv/v1/ns/k HTTP/1.1\r\nHost: {kv_addr}\r\nx-amz-date: {date}\r\n{auth}\
             Content-Length: {gib}\r\n\r\n"
        );
        tasks.push(tokio::spawn({
            let kv_addr = kv_addr.clone();
            async move { raw_request(&kv_addr, head, gib).await }
        }));
    }
    // Forms that never reach a file: part headers that never end, and a preamble with
    // no boundary. The bytes before the file are bounded (320 KiB), so both are refused
    // early rather than buffered.
    let pad = "a".repeat(400 * 1024);
    for prefix in [
        format!("--{boundary}\r\nContent-Disposition: form-data; name=\"x\"\r\nX-Pad: {pad}"),
        pad.clone(),
    ] {
        let head = format!(
            "POST /uploads HTTP/1.1\r\nHost: {addr}\r\n\
             Content-Type: multipart/form-data; boundary={boundary}\r\n\
             Content-Length: {}\r\n\r\n{prefix}",
            gib + prefix.len() as u64
        );
        tasks.push(tokio::spawn({
            let addr = addr.clone();
            async move { raw_request(&addr, head, gib).await }
        }));
    }
    let started = Instant::now();
    let answers = futures::future::join_all(tasks).await;
    let peak = sampler.peak();
    let elapsed = started.elapsed();
    for (i, a) in answers.into_iter().enumerate() {
        let a = a.unwrap();
        if i < 8 {
            // The form's fields are read (bounded) up to the file; without a signed
            // policy it is refused there, before any byte of the file.
            assert!(a.starts_with("HTTP/1.1 403"), "POST Object {i}: {a:?}");
            assert!(a.contains("<Code>AccessDenied</Code>"), "{a}");
        } else if i >= 12 {
            assert!(a.starts_with("HTTP/1.1 400"), "endless form {i}: {a:?}");
            assert!(a.contains("MaxPostPreDataLengthExceeded"), "{a}");
        } else if i == 10 {
            assert!(
                a.starts_with("HTTP/1.1 401"),
                "KV without credentials: {a:?}"
            );
            assert!(a.contains("MissingAuthentication"), "{a}");
        } else if i == 11 {
            assert!(
                a.starts_with("HTTP/1.1 403"),
                "KV with an unknown key: {a:?}"
            );
            assert!(a.contains("InvalidAccessKeyId"), "{a}");
        } else {
            assert!(a.starts_with("HTTP/1.1 403"), "unsigned request {i}: {a:?}");
            assert!(a.contains("<Code>AccessDenied</Code>"), "{a}");
        }
    }
    let growth = peak.saturating_sub(before);
    eprintln!(
        "anonymous uploads: RSS before {} MiB, peak {} MiB, growth {} KiB, {elapsed:?}",
        before / MIB,
        peak / MIB,
        growth / 1024
    );
    assert!(growth < 100 * MIB, "RSS grew by {} MiB", growth / MIB);
    assert!(elapsed < Duration::from_secs(20));

    // Still serving, and nothing was stored.
    let listed = c.list_objects_v2().bucket("uploads").send().await.unwrap();
    assert_eq!(listed.key_count(), Some(0));
}

async fn json(r: reqwest::Response) -> (u16, serde_json::Value) {
    let s = r.status().as_u16();
    let t = r.text().await.unwrap();
    (
        s,
        serde_json::from_str(&t).unwrap_or(serde_json::Value::Null),
    )
}

fn b64(k: &str) -> String {
    STANDARD.encode(k)
}

/// A scan or batch over large values is cut by bytes, not only by count: every page
/// carries at most 4 MiB of entries and a continuation, and following it returns
/// every key once. A batch listing one key many times is refused.
#[tokio::test]
async fn kv_pages_are_capped_in_bytes_and_continue() {
    let dir = tempfile::tempdir().unwrap();
    let node = NodeProc::start(dir.path()).unwrap();
    let kv = KvClient::new(&node.kv, &node.access_key, &node.secret_key);
    let value = vec![7u8; 1024 * 1024];
    let keys: Vec<String> = (0..10).map(|i| format!("k{i:02}")).collect();
    for k in &keys {
        let r = kv
            .send("PUT", &format!("/kv/v1/big/{k}"), &[], value.clone())
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
    }

    // Scan with the largest count limit: pages are cut by bytes.
    let mut seen = Vec::new();
    let mut cursor: Option<String> = None;
    let mut pages = 0;
    loop {
        let path = match &cursor {
            Some(c) => format!("/kv/v1/big?limit=1000&cursor={c}"),
            None => "/kv/v1/big?limit=1000".to_string(),
        };
        let (s, v) = json(kv.send("GET", &path, &[], vec![]).await.unwrap()).await;
        assert_eq!(s, 200, "{v}");
        let entries = v["entries"].as_array().unwrap();
        assert!(
            !entries.is_empty() && entries.len() <= 4,
            "{}",
            entries.len()
        );
        for e in entries {
            assert_eq!(
                STANDARD.decode(e["value"].as_str().unwrap()).unwrap(),
                value
            );
            seen.push(e["keyText"].as_str().unwrap().to_string());
        }
        pages += 1;
        match v["cursor"].as_str() {
            Some(c) => cursor = Some(c.to_string()),
            None => break,
        }
    }
    assert_eq!(seen, keys, "every key once, in order");
    assert!(pages >= 3, "{pages} pages");

    // Batch: the answer is cut too; the unprocessed keys continue it.
    let mut want: Vec<String> = keys.iter().map(|k| b64(k)).collect();
    let mut got = Vec::new();
    while !want.is_empty() {
        let body = serde_json::json!({ "keys": want }).to_string().into_bytes();
        let (s, v) = json(
            kv.send("POST", "/kv/v1/big?batchGet", &[], body)
                .await
                .unwrap(),
        )
        .await;
        assert_eq!(s, 200, "{v}");
        let entries = v["entries"].as_array().unwrap();
        assert!(!entries.is_empty() && entries.len() <= 4);
        for e in entries {
            assert_eq!(e["found"], true);
            got.push(e["keyText"].as_str().unwrap().to_string());
        }
        want = v["unprocessedKeys"]
            .as_array()
            .unwrap()
            .iter()
            .map(|k| k.as_str().unwrap().to_string())
            .collect();
    }
    assert_eq!(got, keys);

    // One 1 MiB value listed 100 times: refused, not answered 100 times.
    let dup = serde_json::json!({ "keys": vec![b64("k00"); 100] })
        .to_string()
        .into_bytes();
    let (s, v) = json(
        kv.send("POST", "/kv/v1/big?batchGet", &[], dup)
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(
        (s, v["error"].as_str()),
        (400, Some("InvalidArgument")),
        "{v}"
    );
}

/// Slow readers of batch answers hold their memory until the answer is sent; once the
/// node's budget is taken, further requests get SlowDown (503) at once, RSS stays
/// within the budget, and the budget comes back when the readers go.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn slow_readers_exhaust_the_memory_budget_and_get_slow_down() {
    let budget = 32 * MIB;
    let dir = tempfile::tempdir().unwrap();
    let node = NodeProc::start_with_env(
        dir.path(),
        &[("GRANARY_MEMORY_BUDGET", &budget.to_string())],
    )
    .unwrap();
    let kv = KvClient::new(&node.kv, &node.access_key, &node.secret_key);
    let batch = batch_of_values(&kv, "slow", 100, 8).await;
    let pid = node.pid().unwrap();
    let before = rss(pid);
    let mut sampler = RssSampler::start(pid);
    // Each reader sends its batch by hand on a socket with a tiny receive buffer, reads
    // the response head and then nothing: the kernel cannot absorb the answer (about
    // 5 MiB of JSON), so the node keeps most of it, and its reservation, while the
    // reader waits.
    let addr = node.kv.trim_start_matches("http://").to_string();
    let request = raw_batch_get(&kv, &addr, "slow", &batch);
    let mut held = Vec::new();
    let mut slowed = 0;
    for _ in 0..16 {
        let (mut c, text) = slow_reader(&addr, &request).await;
        if text.starts_with("HTTP/1.1 200") {
            held.push(c);
        } else {
            assert!(text.starts_with("HTTP/1.1 503"), "{text}");
            assert!(
                text.contains("SlowDown") || {
                    let mut more = vec![0u8; 4096];
                    let m = c.read(&mut more).await.unwrap_or(0);
                    String::from_utf8_lossy(&more[..m]).contains("SlowDown")
                }
            );
            slowed += 1;
        }
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let peak = sampler.peak();
    let growth = peak.saturating_sub(before);
    eprintln!(
        "slow readers: {} held, {slowed} SlowDown; RSS before {} MiB, peak {} MiB, growth {} MiB (budget {} MiB)",
        held.len(),
        before / MIB,
        peak / MIB,
        growth / MIB,
        budget / MIB
    );
    assert!(held.len() >= 2, "{} held", held.len());
    assert!(slowed >= 1, "{slowed} refused");
    assert_eq!(held.len() + slowed, 16);
    // Readers are admitted until the budget is spent, so the held answers alone come to
    // about the budget; the allocator's and the threads' own overhead on top is allowed
    // a quarter of it. Without the budget all 16 would be held (about 80 MiB).
    assert!(
        growth < budget + budget / 4,
        "RSS grew by {} MiB",
        growth / MIB
    );

    // The readers finally read (or go away): the budget is back.
    let mut first = held.remove(0);
    let mut answer = Vec::new();
    let mut buf = vec![0u8; 64 * 1024];
    // (Streamed: chunked, so it ends with the last chunk.)
    while !answer.ends_with(b"0\r\n\r\n") && !answer.ends_with(b"}") {
        let n = tokio::time::timeout(Duration::from_secs(10), first.read(&mut buf))
            .await
            .expect("the held answer streams once read")
            .unwrap();
        assert!(n > 0, "the answer ended early");
        answer.extend_from_slice(&buf[..n]);
    }
    // (Its head was read before: the rest is the entries, 1 MiB values in base64.)
    assert!(answer.len() as u64 > MIB, "{} bytes", answer.len());
    drop(first);
    drop(held);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let r = kv
        .send("GET", "/kv/v1/slow/v000", &[], vec![])
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.bytes().await.unwrap().len(), 1024 * 1024);
}

/// Headers that change a KV request's meaning must be signed, and the credential scope
/// must name this node's date, region and service exactly.
#[tokio::test]
async fn kv_requests_cannot_be_changed_after_signing() {
    let dir = tempfile::tempdir().unwrap();
    let node = NodeProc::start(dir.path()).unwrap();
    let kv = KvClient::new(&node.kv, &node.access_key, &node.secret_key);
    let (s, v) = json(
        kv.send("PUT", "/kv/v1/cas/k", &[], b"v1".to_vec())
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(s, 200);
    let v1 = v["version"].as_u64().unwrap();

    // A TTL, a condition or a content type added to a signed request: refused, and
    // the value is unchanged.
    for (name, value) in [
        ("x-granary-ttl", "1"),
        ("if-match", "999"),
        ("if-none-match", "*"),
        ("content-type", "text/plain"),
        ("x-amz-meta-x", "y"),
    ] {
        let (s, v) = json(
            kv.send_with_unsigned("PUT", "/kv/v1/cas/k", &[], &[(name, value)], b"v2".to_vec())
                .await
                .unwrap(),
        )
        .await;
        assert_eq!(
            (s, v["error"].as_str()),
            (403, Some("SignatureDoesNotMatch")),
            "{name}: {v}"
        );
        assert!(v["message"].as_str().unwrap().contains(name), "{v}");
    }
    // The same headers signed are accepted.
    let (s, _) = json(
        kv.send(
            "PUT",
            "/kv/v1/cas/k",
            &[("if-match", &v1.to_string()), ("x-granary-ttl", "3600")],
            b"v2".to_vec(),
        )
        .await
        .unwrap(),
    )
    .await;
    assert_eq!(s, 200);

    // Scope: another region or service is refused before anything else.
    let mut other = kv.clone();
    other.region = "eu-west-1".into();
    let (s, v) = json(
        other
            .send("GET", "/kv/v1/cas/k", &[], vec![])
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(
        (s, v["error"].as_str()),
        (400, Some("AuthorizationHeaderMalformed")),
        "{v}"
    );
    let mut other = kv.clone();
    other.service = "s3";
    let (s, v) = json(
        other
            .send("GET", "/kv/v1/cas/k", &[], vec![])
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(
        (s, v["error"].as_str()),
        (400, Some("AuthorizationHeaderMalformed")),
        "{v}"
    );
    let r = kv.send("GET", "/kv/v1/cas/k", &[], vec![]).await.unwrap();
    assert_eq!(r.bytes().await.unwrap().as_ref(), b"v2");
}

/// A bit flip in one object record and a record written by a (simulated) newer record
/// version: the node restarts, deletes no chunk file, reports the problem (log line
/// and metric), and every other object still reads.
#[tokio::test]
async fn damaged_records_never_cost_other_data() {
    use redb::ReadableTable;
    let dir = tempfile::tempdir().unwrap();
    let mut node = NodeProc::start(dir.path()).unwrap();
    let c = s3_client(&node.s3, &node.access_key, &node.secret_key);
    c.create_bucket().bucket("damaged").send().await.unwrap();
    for (k, fill) in [("flip", 1u8), ("newer", 2), ("ok1", 3), ("ok2", 4)] {
        c.put_object()
            .bucket("damaged")
            .key(k)
            .body(vec![fill; 300 * 1024].into())
            .send()
            .await
            .unwrap();
    }
    assert!(node.stop());
    let files = chunk_files(dir.path()).len();
    assert_eq!(files, 4);

    let db = redb::Database::create(dir.path().join("engine").join("meta.redb")).unwrap();
    let objects: redb::TableDefinition<&[u8], Record> = redb::TableDefinition::new("objects");
    let txn = db.begin_write().unwrap();
    {
        let mut t = txn.open_table(objects).unwrap();
        let all: Vec<(Vec<u8>, Vec<u8>)> = t
            .iter()
            .unwrap()
            .map(|e| {
                let (k, v) = e.unwrap();
                (k.value().to_vec(), v.value().to_vec())
            })
            .collect();
        assert_eq!(all.len(), 4);
        for (k, mut v) in all {
            if k.ends_with(b"flip") {
                // One flipped bit inside the chunk list: postcard alone would decode
                // it as another chunk id; the record checksum catches it.
                let n = v.len();
                v[n - 12] ^= 0x01;
            } else if k.ends_with(b"newer") {
                // A record version newer than any this binary reads (2 is the
                // extended version, which it reads).
                v[0] = 3;
            } else {
                continue;
            }
            t.insert(k.as_slice(), v.as_slice()).unwrap();
        }
    }
    txn.commit().unwrap();
    drop(db);

    let node = NodeProc::start(dir.path()).unwrap();
    assert_eq!(
        chunk_files(dir.path()).len(),
        files,
        "the restart deleted chunk files"
    );
    let metrics = node.metrics().await.unwrap();
    assert!(
        metrics.contains("granary_orphan_sweep_aborted_total 1"),
        "{metrics}"
    );
    let log = std::fs::read_to_string(dir.path().join("stderr.log")).unwrap();
    assert!(log.contains("orphan chunk sweep aborted"), "{log}");
    let c = s3_client(&node.s3, &node.access_key, &node.secret_key);
    for (k, fill) in [("ok1", 3u8), ("ok2", 4)] {
        let got = c
            .get_object()
            .bucket("damaged")
            .key(k)
            .send()
            .await
            .unwrap();
        let body = got.body.collect().await.unwrap().into_bytes();
        assert_eq!(body.len(), 300 * 1024);
        assert!(body.iter().all(|b| *b == fill));
    }
    for k in ["flip", "newer"] {
        let err = c
            .get_object()
            .bucket("damaged")
            .key(k)
            .send()
            .await
            .unwrap_err();
        let status = err.raw_response().map(|r| r.status().as_u16());
        assert_eq!(status, Some(500), "{k}: {err:?}");
    }
    // A listing that meets the corrupt record reports it rather than skipping it
    // silently; one that ends before it still works.
    let err = c
        .list_objects_v2()
        .bucket("damaged")
        .send()
        .await
        .unwrap_err();
    assert_eq!(err.raw_response().map(|r| r.status().as_u16()), Some(500));
    let listed = c
        .list_objects_v2()
        .bucket("damaged")
        .start_after("newer")
        .send()
        .await
        .unwrap();
    assert_eq!(listed.key_count(), Some(2));
}

/// XML bodies (DeleteObjects, CompleteMultipartUpload, subresource PUTs), which s3s reads
/// whole once the signature in the head checks out, count in the node's memory budget:
/// with a budget of 8 MiB, of 40 signed DeleteObjects requests that send all but the last
/// byte of a 3 MiB body, two are held (6 MiB) and the others are refused at once with
/// 503 SlowDown, nothing read, and the node's RSS grows by far less than the 120 MiB they
/// announced; a PutObject (streamed, holding at most 2 MiB of the budget) still works;
/// once the stalled ones go
/// away, XML requests are served again.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn stalled_xml_bodies_count_in_the_memory_budget() {
    let dir = tempfile::tempdir().unwrap();
    let node =
        NodeProc::start_with_env(dir.path(), &[("GRANARY_MEMORY_BUDGET", "8388608")]).unwrap();
    let addr = node.s3.trim_start_matches("http://").to_string();
    let s3 = s3_client(&node.s3, &node.access_key, &node.secret_key);
    s3.create_bucket().bucket("xml").send().await.unwrap();
    // Signed (with a valid key) for a 3 MiB body: s3s checks the signature from the
    // head, then reads the body whole.
    let mut signer = KvClient::new(&node.s3, &node.access_key, &node.secret_key);
    signer.service = "s3";
    let body = vec![b' '; 3 * MIB as usize];
    let head = |_len: u64| {
        signed_head(
            &signer,
            &addr,
            "POST",
            "/xml?delete",
            &[("content-type", "application/xml")],
            &body,
        )
    };
    // 40 signed DeleteObjects requests send all but the last byte of a 3 MiB body and
    // stall. Without the budget each would hold its 3 MiB in s3s's buffer (120 MiB in
    // all); with it, two fit (6 of 8 MiB) and the others are refused from their head.
    let before = rss(node.pid().unwrap());
    let mut stalled = Vec::new();
    let mut refused = 0;
    for _ in 0..40 {
        let mut c = tokio::net::TcpStream::connect(&addr).await.unwrap();
        let _ = c.write_all(head(3 * MIB).as_bytes()).await;
        let _ = c.write_all(&body[..body.len() - 1]).await;
        let mut answer = vec![0u8; 512];
        match tokio::time::timeout(Duration::from_millis(300), c.read(&mut answer)).await {
            Ok(Ok(n)) if n > 0 => {
                let text = String::from_utf8_lossy(&answer[..n]).into_owned();
                assert!(text.starts_with("HTTP/1.1 503"), "{text}");
                refused += 1;
            }
            _ => stalled.push(c),
        }
    }
    let grown = rss(node.pid().unwrap()).saturating_sub(before);
    println!(
        "40 stalled 3 MiB XML bodies: {} held, {refused} refused (503 SlowDown); RSS grew \
         {:.1} MiB",
        stalled.len(),
        grown as f64 / MIB as f64
    );
    assert!(
        stalled.len() <= 2 && refused >= 38,
        "{} held",
        stalled.len()
    );
    assert!(grown < 48 * MIB, "RSS grew {grown} bytes");
    let refused = raw_request(&addr, head(3 * MIB), 0).await;
    assert!(refused.starts_with("HTTP/1.1 503"), "{refused}");
    assert!(refused.contains("<Code>SlowDown</Code>"), "{refused}");
    // An upload holds at most 2 MiB of its data (its pieces): that still fits.
    s3.put_object()
        .bucket("xml")
        .key("k")
        .body(vec![1u8; 2 * MIB as usize].into())
        .send()
        .await
        .unwrap();
    // The stalled clients leave: their reservations go back, and a real DeleteObjects
    // works again.
    drop(stalled);
    let mut deleted = false;
    for _ in 0..50 {
        let r = s3
            .delete_objects()
            .bucket("xml")
            .delete(
                aws_sdk_s3::types::Delete::builder()
                    .objects(
                        aws_sdk_s3::types::ObjectIdentifier::builder()
                            .key("k")
                            .build()
                            .unwrap(),
                    )
                    .build()
                    .unwrap(),
            )
            .send()
            .await;
        if r.is_ok() {
            deleted = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(deleted, "DeleteObjects after the stalled clients left");
}

/// Object uploads that send part of their body and stall hold what their pieces hold
/// (up to 2 MiB each) in the memory budget: once it is spent, further uploads are
/// refused from their head with 503 SlowDown, and the budget comes back when the
/// stalled clients leave. Without it, every stalled upload would pin its pieces for as
/// long as its client liked, however many connections it opened.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn stalled_uploads_count_in_the_memory_budget() {
    let dir = tempfile::tempdir().unwrap();
    let node =
        NodeProc::start_with_env(dir.path(), &[("GRANARY_MEMORY_BUDGET", "8388608")]).unwrap();
    let addr = node.s3.trim_start_matches("http://").to_string();
    let s3 = s3_client(&node.s3, &node.access_key, &node.secret_key);
    s3.create_bucket().bucket("uploads").send().await.unwrap();
    let mut signer = KvClient::new(&node.s3, &node.access_key, &node.secret_key);
    signer.service = "s3";
    let body: Vec<u8> = (0..3 * MIB as usize).map(|i| (i % 251) as u8).collect();
    let head = |key: &str| {
        signed_head(
            &signer,
            &addr,
            "PUT",
            &format!("/uploads/{key}"),
            &[],
            &body,
        )
    };
    // 30 signed 3 MiB PUTs send 2 MiB less a byte and stall: each has a piece written
    // and nearly another gathered. 2 MiB each, four fit in the 8 MiB budget.
    let before = rss(node.pid().unwrap());
    let mut stalled = Vec::new();
    let mut refused = 0;
    for i in 0..30 {
        let mut c = tokio::net::TcpStream::connect(&addr).await.unwrap();
        let _ = c.write_all(head(&format!("k{i}")).as_bytes()).await;
        let _ = tokio::time::timeout(
            Duration::from_secs(5),
            c.write_all(&body[..2 * MIB as usize - 1]),
        )
        .await;
        let mut answer = vec![0u8; 1024];
        match tokio::time::timeout(Duration::from_millis(300), c.read(&mut answer)).await {
            Ok(Ok(n)) if n > 0 => {
                let text = String::from_utf8_lossy(&answer[..n]).into_owned();
                assert!(text.starts_with("HTTP/1.1 503"), "{text}");
                assert!(text.contains("SlowDown"), "{text}");
                refused += 1;
            }
            _ => stalled.push(c),
        }
    }
    let grown = rss(node.pid().unwrap()).saturating_sub(before);
    println!(
        "30 stalled 3 MiB uploads: {} held, {refused} refused (503 SlowDown); RSS grew {:.1} MiB",
        stalled.len(),
        grown as f64 / MIB as f64
    );
    assert!(
        (1..=4).contains(&stalled.len()) && refused >= 26,
        "{} held, {refused} refused",
        stalled.len()
    );
    // Nothing of the stalled uploads was stored.
    let listed = s3.list_objects_v2().bucket("uploads").send().await.unwrap();
    assert_eq!(listed.key_count(), Some(0));
    // The stalled clients leave: their reservations go back, and an upload works again.
    drop(stalled);
    let mut stored = false;
    for _ in 0..50 {
        let r = s3
            .put_object()
            .bucket("uploads")
            .key("after")
            .body(body.clone().into())
            .send()
            .await;
        if r.is_ok() {
            stored = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(stored, "PutObject after the stalled clients left");
    let got = s3
        .get_object()
        .bucket("uploads")
        .key("after")
        .send()
        .await
        .unwrap()
        .body
        .collect()
        .await
        .unwrap()
        .into_bytes();
    assert!(
        got == body,
        "the upload after the stall reads back different bytes"
    );
}

/// Clients that stop moving are disconnected after `client_stall_timeout_secs`, and what
/// their answers held goes back: readers that stop reading KV batch answers (which spend
/// the memory budget, so others get 503 SlowDown), a request head that never ends,
/// connections that send nothing (on the S3 and KV ports), and a KV body that stops. Without it all of them would
/// be held for as long as the clients liked.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn stalled_clients_are_disconnected_and_their_memory_comes_back() {
    let budget = 16 * MIB;
    let stall = 5;
    let dir = tempfile::tempdir().unwrap();
    let node = NodeProc::start_with_env(
        dir.path(),
        &[
            ("GRANARY_MEMORY_BUDGET", &budget.to_string()),
            ("GRANARY_CLIENT_STALL_TIMEOUT_SECS", &stall.to_string()),
        ],
    )
    .unwrap();
    let kv = KvClient::new(&node.kv, &node.access_key, &node.secret_key);
    let batch = batch_of_values(&kv, "stall", 8, 8).await;
    let addr = node.kv.trim_start_matches("http://").to_string();
    let request = raw_batch_get(&kv, &addr, "stall", &batch);
    // Readers on sockets with a tiny receive buffer read the answer's head and then
    // nothing: what each answer (about 11 MiB of JSON) holds stays in the node,
    // reserved, until the budget is spent and the next reader is refused.
    let mut held = Vec::new();
    let mut refused = 0;
    while refused == 0 && held.len() < 32 {
        let (c, text) = slow_reader(&addr, &request).await;
        if text.starts_with("HTTP/1.1 200") {
            held.push(c);
        } else {
            assert!(text.starts_with("HTTP/1.1 503"), "{text}");
            refused += 1;
        }
    }
    assert!(
        !held.is_empty() && refused >= 1,
        "{} held, {refused} refused",
        held.len()
    );

    // Slow-loris heads and silent connections, on both ports.
    let s3_addr = node.s3.trim_start_matches("http://").to_string();
    let mut quiet = Vec::new();
    for a in [&s3_addr, &addr] {
        let mut c = tokio::net::TcpStream::connect(a).await.unwrap();
        c.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n").await.unwrap();
        quiet.push(("a head that never ends", a.clone(), c));
        let c = tokio::net::TcpStream::connect(a).await.unwrap();
        quiet.push(("a connection that sends nothing", a.clone(), c));
    }
    // A signed KV PUT that announces 1 MiB, sends 1000 bytes of it and goes quiet: its
    // reservation is held until the body fails.
    let value = vec![5u8; MIB as usize];
    let head = signed_head(&kv, &addr, "PUT", "/kv/v1/stall/quiet", &[], &value);
    let mut c = tokio::net::TcpStream::connect(&addr).await.unwrap();
    c.write_all(head.as_bytes()).await.unwrap();
    c.write_all(&value[..1000]).await.unwrap();
    quiet.push(("a body that stops", addr.clone(), c));

    // Past the stall timeout every one of them has been closed by the node.
    tokio::time::sleep(Duration::from_secs(stall + 2)).await;
    for (i, mut c) in held.into_iter().enumerate() {
        let mut got = 0usize;
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            match tokio::time::timeout(Duration::from_secs(10), c.read(&mut buf)).await {
                Ok(Ok(0)) | Ok(Err(_)) => break,
                Ok(Ok(n)) => got += n,
                Err(_) => panic!(
                    "stalled reader {i}: the node still holds its connection ({got} bytes read)"
                ),
            }
        }
        // 8 MiB of values in base64 are more than 10 MiB: the reader got only what the
        // kernels had buffered when the node gave up on it (its own 4 KiB receive buffer
        // and the node's unsent data, kept to about 1 MiB, plus what was in flight).
        assert!(got < 8 * MIB as usize, "stalled reader {i} got {got} bytes");
    }
    for (what, a, mut c) in quiet {
        let mut buf = vec![0u8; 4096];
        // (A body that stops may be answered with an error before the close.)
        loop {
            match tokio::time::timeout(Duration::from_secs(10), c.read(&mut buf)).await {
                Ok(Ok(0)) | Ok(Err(_)) => break,
                Ok(Ok(_)) => {}
                Err(_) => panic!("{what} on {a}: still open past the stall timeout"),
            }
        }
    }
    // The budget is back: the same batch is answered again (its first page holds a
    // value or more, 1 MiB each).
    let r = kv
        .send("POST", "/kv/v1/stall?batchGet", &[], batch.clone())
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert!(r.bytes().await.unwrap().len() as u64 > MIB);
}
