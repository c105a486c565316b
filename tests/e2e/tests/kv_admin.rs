//! KV API and admin API against a real node: versions, compare-and-set under
//! concurrency, scans, TTL, batch get, tenant isolation and key revocation.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use granary_e2e::{Admin, KvClient, NodeProc};
use reqwest::Method;
use serde_json::Value;

mod s3 {
    pub use granary_e2e::s3_client as client;
}

async fn json(r: reqwest::Response) -> (u16, Value) {
    let s = r.status().as_u16();
    let t = r.text().await.unwrap();
    (s, serde_json::from_str(&t).unwrap_or(Value::String(t)))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kv_versions_conditions_scans_and_concurrent_cas() {
    let dir = tempfile::tempdir().unwrap();
    let node = NodeProc::start(dir.path()).unwrap();
    let kv = KvClient::new(&node.kv, &node.access_key, &node.secret_key);

    // Create-only put, then versions increase.
    let (s, v) = json(
        kv.send(
            "PUT",
            "/kv/v1/app/user%2F1",
            &[("if-none-match", "*")],
            b"alice".to_vec(),
        )
        .await
        .unwrap(),
    )
    .await;
    assert_eq!(s, 200, "{v}");
    let v1 = v["version"].as_u64().unwrap();
    let (s, v) = json(
        kv.send(
            "PUT",
            "/kv/v1/app/user%2F1",
            &[("if-none-match", "*")],
            b"again".to_vec(),
        )
        .await
        .unwrap(),
    )
    .await;
    assert_eq!((s, v["error"].as_str()), (412, Some("VersionMismatch")));
    assert_eq!(v["currentVersion"].as_u64(), Some(v1));
    let r = kv
        .send("GET", "/kv/v1/app/user%2F1", &[], vec![])
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(
        r.headers()["x-granary-version"].to_str().unwrap(),
        v1.to_string()
    );
    assert_eq!(r.bytes().await.unwrap().as_ref(), b"alice");
    // CAS with the right and a wrong version; unknown versions are refused.
    let (s, v) = json(
        kv.send(
            "PUT",
            "/kv/v1/app/user%2F1",
            &[("if-match", &v1.to_string())],
            b"alice2".to_vec(),
        )
        .await
        .unwrap(),
    )
    .await;
    assert_eq!(s, 200);
    let v2 = v["version"].as_u64().unwrap();
    assert!(v2 > v1);
    let (s, _) = json(
        kv.send(
            "PUT",
            "/kv/v1/app/user%2F1",
            &[("if-match", &v1.to_string())],
            b"lost".to_vec(),
        )
        .await
        .unwrap(),
    )
    .await;
    assert_eq!(s, 412);
    let (s, _) = json(
        kv.send(
            "DELETE",
            "/kv/v1/app/user%2F1",
            &[("if-match", "999999")],
            vec![],
        )
        .await
        .unwrap(),
    )
    .await;
    assert_eq!(s, 412);
    let r = kv
        .send("GET", "/kv/v1/app/user%2F1", &[], vec![])
        .await
        .unwrap();
    assert_eq!(
        r.bytes().await.unwrap().as_ref(),
        b"alice2",
        "failed conditions change nothing"
    );
    // Delete, then read-after-delete and version monotonic across re-create.
    let (s, v) = json(
        kv.send("DELETE", "/kv/v1/app/user%2F1", &[], vec![])
            .await
            .unwrap(),
    )
    .await;
    assert_eq!((s, v["deletedVersion"].as_u64()), (200, Some(v2)));
    assert_eq!(
        kv.send("GET", "/kv/v1/app/user%2F1", &[], vec![])
            .await
            .unwrap()
            .status(),
        404
    );
    let (_, v) = json(
        kv.send("PUT", "/kv/v1/app/user%2F1", &[], b"back".to_vec())
            .await
            .unwrap(),
    )
    .await;
    assert!(v["version"].as_u64().unwrap() > v2);

    // Binary keys and values round-trip.
    let bin: Vec<u8> = (0u8..=255).collect();
    let (s, _) = json(
        kv.send("PUT", "/kv/v1/app/bin%00%FF%01", &[], bin.clone())
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(s, 200);
    let r = kv
        .send("GET", "/kv/v1/app/bin%00%FF%01", &[], vec![])
        .await
        .unwrap();
    assert_eq!(r.bytes().await.unwrap().to_vec(), bin);

    // Scans: prefix, limit and cursor, range bounds.
    for i in 0..25 {
        kv.send(
            "PUT",
            &format!("/kv/v1/scan/item%2F{i:03}"),
            &[],
            format!("v{i}").into_bytes(),
        )
        .await
        .unwrap();
    }
    kv.send("PUT", "/kv/v1/scan/other", &[], b"o".to_vec())
        .await
        .unwrap();
    let mut seen = Vec::new();
    let mut cursor: Option<String> = None;
    loop {
        let q = match &cursor {
            Some(c) => format!("/kv/v1/scan?prefix=item%2F&limit=10&cursor={c}"),
            None => "/kv/v1/scan?prefix=item%2F&limit=10".to_string(),
        };
        let (s, v) = json(kv.send("GET", &q, &[], vec![]).await.unwrap()).await;
        assert_eq!(s, 200, "{v}");
        for e in v["entries"].as_array().unwrap() {
            seen.push(e["keyText"].as_str().unwrap().to_string());
        }
        match v["cursor"].as_str() {
            Some(c) => cursor = Some(c.to_string()),
            None => break,
        }
    }
    let expected: Vec<String> = (0..25).map(|i| format!("item/{i:03}")).collect();
    assert_eq!(seen, expected);
    let (_, v) = json(
        kv.send(
            "GET",
            "/kv/v1/scan?start=item%2F005&end=item%2F008",
            &[],
            vec![],
        )
        .await
        .unwrap(),
    )
    .await;
    let keys: Vec<_> = v["entries"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["keyText"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(keys, ["item/005", "item/006", "item/007"]);

    // Batch get from one snapshot.
    use base64::Engine as _;
    let b64 = |s: &[u8]| base64::engine::general_purpose::STANDARD.encode(s);
    let body = serde_json::json!({"keys": [b64(b"item/001"), b64(b"nope")]});
    let (s, v) = json(
        kv.send(
            "POST",
            "/kv/v1/scan?batchGet",
            &[("content-type", "application/json")],
            body.to_string().into_bytes(),
        )
        .await
        .unwrap(),
    )
    .await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["entries"][0]["found"], true);
    assert_eq!(v["entries"][0]["value"].as_str(), Some(b64(b"v1").as_str()));
    assert_eq!(v["entries"][1]["found"], false);

    // TTL: readable before expiry, gone after.
    kv.send(
        "PUT",
        "/kv/v1/app/ephemeral",
        &[("x-granary-ttl", "1")],
        b"soon gone".to_vec(),
    )
    .await
    .unwrap();
    assert_eq!(
        kv.send("GET", "/kv/v1/app/ephemeral", &[], vec![])
            .await
            .unwrap()
            .status(),
        200
    );
    tokio::time::sleep(std::time::Duration::from_millis(1300)).await;
    assert_eq!(
        kv.send("GET", "/kv/v1/app/ephemeral", &[], vec![])
            .await
            .unwrap()
            .status(),
        404
    );

    // Bad input: oversize value, oversize key, bad namespace, bad condition, bad signature.
    let (s, _) = json(
        kv.send("PUT", "/kv/v1/app/big", &[], vec![0u8; 1024 * 1024 + 1])
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(s, 400);
    let long = "k".repeat(1025);
    let (s, _) = json(
        kv.send("PUT", &format!("/kv/v1/app/{long}"), &[], b"x".to_vec())
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(s, 400);
    let (s, _) = json(
        kv.send("PUT", "/kv/v1/bad%20ns/k", &[], b"x".to_vec())
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(s, 400);
    let (s, _) = json(
        kv.send(
            "PUT",
            "/kv/v1/app/k",
            &[("if-match", "not-a-number")],
            b"x".to_vec(),
        )
        .await
        .unwrap(),
    )
    .await;
    assert_eq!(s, 400);
    let wrong = KvClient::new(&node.kv, &node.access_key, "wrong-secret");
    let (s, v) = json(
        wrong
            .send("GET", "/kv/v1/app/user%2F1", &[], vec![])
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(
        (s, v["error"].as_str()),
        (403, Some("SignatureDoesNotMatch"))
    );
    let (s, v) = json(
        reqwest::get(format!("{}/kv/v1/app/user%2F1", node.kv))
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(
        (s, v["error"].as_str()),
        (401, Some("MissingAuthentication"))
    );
    let (s, v) = json(
        reqwest::get(format!("{}/kv/v1/openapi.json", node.kv))
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(s, 200);
    assert_eq!(v["openapi"], "3.0.3");

    // 8 concurrent compare-and-set incrementers on one key: no lost update.
    kv.send("PUT", "/kv/v1/app/counter", &[], b"0".to_vec())
        .await
        .unwrap();
    let successes = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    for _ in 0..8 {
        let kv = kv.clone();
        let successes = successes.clone();
        tasks.push(tokio::spawn(async move {
            for _ in 0..25 {
                let r = kv
                    .send("GET", "/kv/v1/app/counter", &[], vec![])
                    .await
                    .unwrap();
                let ver = r.headers()["x-granary-version"]
                    .to_str()
                    .unwrap()
                    .to_string();
                let n: u64 = std::str::from_utf8(&r.bytes().await.unwrap())
                    .unwrap()
                    .parse()
                    .unwrap();
                let r = kv
                    .send(
                        "PUT",
                        "/kv/v1/app/counter",
                        &[("if-match", &ver)],
                        (n + 1).to_string().into_bytes(),
                    )
                    .await
                    .unwrap();
                match r.status().as_u16() {
                    200 => {
                        successes.fetch_add(1, Ordering::SeqCst);
                    }
                    412 => {}
                    other => panic!("unexpected status {other}"),
                }
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let r = kv
        .send("GET", "/kv/v1/app/counter", &[], vec![])
        .await
        .unwrap();
    let final_value: u64 = std::str::from_utf8(&r.bytes().await.unwrap())
        .unwrap()
        .parse()
        .unwrap();
    let ok = successes.load(Ordering::SeqCst);
    assert!(ok > 0);
    assert_eq!(
        final_value, ok,
        "every successful CAS is counted exactly once"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tenants_are_isolated_and_revoked_keys_are_refused_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let node = NodeProc::start(dir.path()).unwrap();
    let admin = Admin::new(&node);
    let (ak1, sk1) = admin.tenant_with_key("team-a").await.unwrap();
    let (ak2, sk2) = admin.tenant_with_key("team-b").await.unwrap();
    let a = s3::client(&node.s3, &ak1, &sk1);
    let b = s3::client(&node.s3, &ak2, &sk2);
    use aws_sdk_s3::primitives::ByteStream;
    // Same bucket name in both tenants, different data.
    a.create_bucket().bucket("logs").send().await.unwrap();
    b.create_bucket().bucket("logs").send().await.unwrap();
    a.put_object()
        .bucket("logs")
        .key("k")
        .body(ByteStream::from_static(b"from a"))
        .send()
        .await
        .unwrap();
    b.put_object()
        .bucket("logs")
        .key("k")
        .body(ByteStream::from_static(b"from b"))
        .send()
        .await
        .unwrap();
    a.create_bucket().bucket("only-a").send().await.unwrap();
    let ga = a
        .get_object()
        .bucket("logs")
        .key("k")
        .send()
        .await
        .unwrap()
        .body
        .collect()
        .await
        .unwrap()
        .into_bytes();
    let gb = b
        .get_object()
        .bucket("logs")
        .key("k")
        .send()
        .await
        .unwrap()
        .body
        .collect()
        .await
        .unwrap()
        .into_bytes();
    assert_eq!((ga.as_ref(), gb.as_ref()), (&b"from a"[..], &b"from b"[..]));
    let names = |c: aws_sdk_s3::operation::list_buckets::ListBucketsOutput| {
        c.buckets()
            .iter()
            .filter_map(|b| b.name().map(str::to_string))
            .collect::<Vec<_>>()
    };
    assert_eq!(
        names(a.list_buckets().send().await.unwrap()),
        ["logs", "only-a"]
    );
    assert_eq!(names(b.list_buckets().send().await.unwrap()), ["logs"]);
    // B cannot see, read, list or write A's bucket: it simply does not exist for B.
    let e = b.head_bucket().bucket("only-a").send().await.unwrap_err();
    assert_eq!(e.raw_response().map(|r| r.status().as_u16()), Some(404));
    let e = b
        .put_object()
        .bucket("only-a")
        .key("x")
        .body(ByteStream::from_static(b"x"))
        .send()
        .await
        .unwrap_err();
    assert_eq!(
        e.as_service_error()
            .and_then(aws_sdk_s3::error::ProvideErrorMetadata::code),
        Some("NoSuchBucket")
    );
    // KV namespaces are per tenant too.
    let ka = KvClient::new(&node.kv, &ak1, &sk1);
    let kb = KvClient::new(&node.kv, &ak2, &sk2);
    ka.send("PUT", "/kv/v1/shared/key", &[], b"a".to_vec())
        .await
        .unwrap();
    assert_eq!(
        kb.send("GET", "/kv/v1/shared/key", &[], vec![])
            .await
            .unwrap()
            .status(),
        404
    );
    let (_, v) = json(kb.send("GET", "/kv/v1/shared", &[], vec![]).await.unwrap()).await;
    assert_eq!(v["entries"].as_array().unwrap().len(), 0);

    // Usage per tenant.
    let (s, u) = admin
        .call(Method::GET, "/tenants/team-b/usage", None)
        .await
        .unwrap();
    assert_eq!(s, 200);
    assert_eq!(
        (
            u["buckets"].as_u64(),
            u["objects"].as_u64(),
            u["storageBytes"].as_u64()
        ),
        (Some(1), Some(1), Some(6))
    );
    let (_, u) = admin
        .call(Method::GET, "/tenants/team-a/usage", None)
        .await
        .unwrap();
    assert_eq!(
        (
            u["buckets"].as_u64(),
            u["objects"].as_u64(),
            u["kvKeys"].as_u64()
        ),
        (Some(2), Some(1), Some(1))
    );

    // Admin API: auth, listing, update, errors.
    let (s, _) = Admin {
        token: "wrong-token-wrong-token".into(),
        ..Admin::new(&node)
    }
    .call(Method::GET, "/tenants", None)
    .await
    .unwrap();
    assert_eq!(s, 401);
    let (s, v) = admin.call(Method::GET, "/tenants", None).await.unwrap();
    assert_eq!(s, 200);
    let tnames: Vec<_> = v["tenants"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["name"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(tnames, ["default", "team-a", "team-b"]);
    let (s, v) = admin
        .call(
            Method::PUT,
            "/tenants/team-a",
            Some(serde_json::json!({"quotas": {"storageBytes": 1000}})),
        )
        .await
        .unwrap();
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["spec"]["quotas"]["storageBytes"], 1000);
    let (s, v) = admin
        .call(
            Method::PUT,
            "/tenants/team-a",
            Some(serde_json::json!({"quotas": {"bogus": 1}})),
        )
        .await
        .unwrap();
    assert_eq!(s, 400);
    assert!(v.to_string().contains("quotas.bogus"), "{v}");
    // Suspension changes the flag alone (the operator suspends through it).
    let (s, v) = admin
        .call(
            Method::PUT,
            "/tenants/team-a/suspended",
            Some(serde_json::json!({"suspended": true})),
        )
        .await
        .unwrap();
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["spec"]["suspended"], true);
    assert_eq!(v["spec"]["quotas"]["storageBytes"], 1000);
    let (s, v) = admin
        .call(
            Method::PUT,
            "/tenants/team-a/suspended",
            Some(serde_json::json!({"suspended": false})),
        )
        .await
        .unwrap();
    assert_eq!(s, 200, "{v}");
    assert!(v["spec"].get("suspended").is_none(), "{v}");
    assert_eq!(v["spec"]["quotas"]["storageBytes"], 1000);
    for (path, body, status) in [
        (
            "/tenants/team-a/suspended",
            serde_json::json!({"suspended": "yes"}),
            400,
        ),
        (
            "/tenants/team-a/suspended",
            serde_json::json!({"suspend": true}),
            400,
        ),
        (
            "/tenants/nobody/suspended",
            serde_json::json!({"suspended": true}),
            404,
        ),
    ] {
        let (s, v) = admin.call(Method::PUT, path, Some(body)).await.unwrap();
        assert_eq!(s, status, "{path}: {v}");
        if status == 404 {
            // What the operator tells apart from a node without the route.
            assert_eq!(v["error"], "NoSuchTenant", "{v}");
        }
    }
    let (s, v) = admin
        .call(
            Method::PUT,
            "/tenants/team-a/no-such-route",
            Some(serde_json::json!({})),
        )
        .await
        .unwrap();
    assert_eq!(s, 404);
    assert_ne!(v["error"], "NoSuchTenant", "{v}");
    let (s, _) = admin
        .call(
            Method::POST,
            "/tenants",
            Some(serde_json::json!({"name": "team-a"})),
        )
        .await
        .unwrap();
    assert_eq!(s, 409);
    let (s, _) = admin
        .call(
            Method::POST,
            "/tenants",
            Some(serde_json::json!({"name": "Bad Name"})),
        )
        .await
        .unwrap();
    assert_eq!(s, 400);

    // Revocation takes effect on the next request.
    let (s, _) = admin
        .call(Method::DELETE, &format!("/tenants/team-b/keys/{ak2}"), None)
        .await
        .unwrap();
    assert_eq!(s, 204);
    let e = b.list_buckets().send().await.unwrap_err();
    assert_eq!(
        e.as_service_error()
            .and_then(aws_sdk_s3::error::ProvideErrorMetadata::code),
        Some("InvalidAccessKeyId")
    );
    assert_eq!(
        kb.send("GET", "/kv/v1/shared/key", &[], vec![])
            .await
            .unwrap()
            .status(),
        403
    );

    // Deleting a tenant with data needs purge; purge removes everything.
    let (s, _) = admin
        .call(Method::DELETE, "/tenants/team-a", None)
        .await
        .unwrap();
    assert_eq!(s, 409);
    let (s, _) = admin
        .call(Method::DELETE, "/tenants/team-a?purge=true", None)
        .await
        .unwrap();
    assert_eq!(s, 204);
    let (s, _) = admin
        .call(Method::GET, "/tenants/team-a", None)
        .await
        .unwrap();
    assert_eq!(s, 404);
    assert!(a.list_buckets().send().await.is_err());
    // Team B's data is untouched (read with a fresh key).
    let (s, v) = admin
        .call(Method::POST, "/tenants/team-b/keys", None)
        .await
        .unwrap();
    assert_eq!(s, 201);
    let b2 = s3::client(
        &node.s3,
        v["accessKeyId"].as_str().unwrap(),
        v["secretAccessKey"].as_str().unwrap(),
    );
    let gb = b2
        .get_object()
        .bucket("logs")
        .key("k")
        .send()
        .await
        .unwrap()
        .body
        .collect()
        .await
        .unwrap()
        .into_bytes();
    assert_eq!(gb.as_ref(), b"from b");
    // Metrics and health.
    let m = node.metrics().await.unwrap();
    assert!(
        m.contains("granary_requests_total{front=\"s3\",operation=\"GetObject\",status=\"200\"}"),
        "{m}"
    );
    assert_eq!(
        reqwest::get(format!("{}/readyz", node.admin))
            .await
            .unwrap()
            .status(),
        200
    );
}

/// Expired values are removed from disk by the node's sweep (usage stops counting them),
/// while keys rewritten without a TTL, or with a later one, stay.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expired_values_are_swept_and_rewritten_keys_survive() {
    let dir = tempfile::tempdir().unwrap();
    let node = NodeProc::start(dir.path()).unwrap();
    let admin = Admin::new(&node);
    let (ak, sk) = admin.tenant_with_key("ttl-team").await.unwrap();
    let kv = KvClient::new(&node.kv, &ak, &sk);
    let put = |path: String, ttl: Option<&'static str>, body: &'static [u8]| {
        let kv = &kv;
        async move {
            let headers: Vec<(&str, &str)> =
                ttl.map(|t| ("x-granary-ttl", t)).into_iter().collect();
            let r = kv
                .send("PUT", &path, &headers, body.to_vec())
                .await
                .unwrap();
            assert_eq!(r.status(), 200, "{path}");
        }
    };
    // 4 s TTLs: long enough that none expires before the count below on a slow disk.
    for i in 0..50 {
        put(format!("/kv/v1/cache/k{i:02}"), Some("4"), b"short-lived").await;
    }
    put("/kv/v1/cache/forever".into(), None, b"stays").await;
    put(
        "/kv/v1/cache/made-permanent".into(),
        Some("4"),
        b"was short",
    )
    .await;
    put("/kv/v1/cache/made-permanent".into(), None, b"now stays").await;
    put("/kv/v1/cache/extended".into(), Some("4"), b"was short").await;
    put("/kv/v1/cache/extended".into(), Some("3600"), b"an hour").await;
    let kv_keys = || async {
        let (s, u) = admin
            .call(Method::GET, "/tenants/ttl-team/usage", None)
            .await
            .unwrap();
        assert_eq!(s, 200, "{u}");
        u["kvKeys"].as_u64().unwrap()
    };
    assert_eq!(kv_keys().await, 53);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while kv_keys().await != 3 {
        assert!(
            std::time::Instant::now() < deadline,
            "expired values still on disk: {} keys",
            kv_keys().await
        );
        tokio::time::sleep(std::time::Duration::from_millis(250)).await;
    }
    for (key, want) in [
        ("forever", &b"stays"[..]),
        ("made-permanent", b"now stays"),
        ("extended", b"an hour"),
    ] {
        let r = kv
            .send("GET", &format!("/kv/v1/cache/{key}"), &[], vec![])
            .await
            .unwrap();
        assert_eq!(r.status(), 200, "{key}");
        assert_eq!(&r.bytes().await.unwrap()[..], want, "{key}");
    }
    // A later sweep leaves them alone.
    tokio::time::sleep(std::time::Duration::from_secs(6)).await;
    assert_eq!(kv_keys().await, 3);
}
