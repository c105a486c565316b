//! Property tests against a real granary-node: generated KV requests and admin API
//! calls (bounded number of cases, one node per property). Whatever is sent, the
//! answer is a protocol-correct JSON error or a success that reads back, never a 5xx.

use std::sync::Arc;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use granary_e2e::{Admin, KvClient, NodeProc};
use proptest::prelude::*;
use proptest::test_runner::{Config, TestRunner};

fn pct(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("%{b:02X}")).collect()
}

async fn answer(r: reqwest::Response) -> (u16, Vec<u8>) {
    let s = r.status().as_u16();
    (s, r.bytes().await.unwrap_or_default().to_vec())
}

fn json_error(body: &[u8]) -> Option<String> {
    serde_json::from_slice::<serde_json::Value>(body)
        .ok()
        .and_then(|v| v["error"].as_str().map(str::to_string))
}

#[derive(Debug, Clone)]
enum Header {
    IfMatch(String),
    IfNoneMatch(String),
    Ttl(String),
    Other(String, String),
}

fn header() -> impl Strategy<Value = Header> {
    prop_oneof![
        "[0-9]{0,3}|\"[0-9]{1,2}\"|[ -~]{0,6}".prop_map(Header::IfMatch),
        prop_oneof![Just("*".to_string()), "[ -~]{0,4}"].prop_map(Header::IfNoneMatch),
        "-?[0-9]{0,12}|[ -~]{0,6}".prop_map(Header::Ttl),
        ("x-granary-[a-z]{1,6}", "[a-z0-9]{0,6}").prop_map(|(k, v)| Header::Other(k, v)),
    ]
}

/// Generated KV requests (binary keys, values up to 8 KiB, conditions, TTLs, scans
/// with arbitrary query strings, batch bodies of arbitrary bytes), each signed and
/// sometimes with one header added after signing: every answer is 2xx or a 4xx JSON
/// error naming its code; a header added after signing is always refused; a put that
/// succeeded reads back byte for byte.
#[test]
fn generated_kv_requests_get_correct_answers() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let node = NodeProc::start(dir.path()).unwrap();
    let kv = Arc::new(KvClient::new(&node.kv, &node.access_key, &node.secret_key));
    let ran = std::sync::atomic::AtomicUsize::new(0);
    let mut runner = TestRunner::new(Config {
        cases: 48,
        failure_persistence: None,
        ..Config::default()
    });
    let strategy = (
        proptest::collection::vec(any::<u8>(), 0..40),
        proptest::collection::vec(any::<u8>(), 0..8192),
        proptest::option::of(header()),
        any::<bool>(),
        "(prefix|start|end|cursor|limit|x)=[A-Za-z0-9%._~-]{0,12}(&(limit|cursor|prefix)=[A-Za-z0-9%._~-]{0,8})?",
        proptest::collection::vec(any::<u8>(), 0..200),
    );
    runner
        .run(
            &strategy,
            |(key, value, hdr, add_unsigned, query, batch_body)| {
                ran.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                rt.block_on(async {
                    let path = format!("/kv/v1/prop/{}", pct(&key));
                    let owned: Vec<(String, String)> = match &hdr {
                        Some(Header::IfMatch(v)) => vec![("if-match".into(), v.clone())],
                        Some(Header::IfNoneMatch(v)) => {
                            vec![("if-none-match".into(), v.clone())]
                        }
                        Some(Header::Ttl(v)) => vec![("x-granary-ttl".into(), v.clone())],
                        Some(Header::Other(k, v)) => vec![(k.clone(), v.clone())],
                        None => vec![],
                    };
                    let hs: Vec<(&str, &str)> = owned
                        .iter()
                        .map(|(k, v)| (k.as_str(), v.as_str()))
                        .collect();
                    let none: Vec<(&str, &str)> = Vec::new();
                    let (signed, unsigned) = if add_unsigned {
                        (&none, &hs)
                    } else {
                        (&hs, &none)
                    };
                    let (s, body) = answer(
                        kv.send_with_unsigned("PUT", &path, signed, unsigned, value.clone())
                            .await
                            .unwrap(),
                    )
                    .await;
                    prop_assert!(s < 500, "PUT {s} {:?}", String::from_utf8_lossy(&body));
                    if s >= 400 {
                        prop_assert!(json_error(&body).is_some(), "{s} without a JSON error");
                    }
                    if add_unsigned && !hs.is_empty() {
                        prop_assert_eq!(s, 403, "a header added after signing was accepted");
                        let code = json_error(&body);
                        prop_assert_eq!(code.as_deref(), Some("SignatureDoesNotMatch"));
                    }
                    if key.is_empty() {
                        prop_assert!(s >= 400, "an empty key was accepted");
                    }
                    if s == 200 {
                        let (gs, got) =
                            answer(kv.send("GET", &path, &[], vec![]).await.unwrap()).await;
                        prop_assert_eq!(gs, 200);
                        prop_assert_eq!(got, value);
                    }

                    let (s, body) = answer(
                        kv.send("GET", &format!("/kv/v1/prop?{query}"), &[], vec![])
                            .await
                            .unwrap(),
                    )
                    .await;
                    prop_assert!(
                        s == 200 || (400..500).contains(&s),
                        "scan ?{query}: {s} {:?}",
                        String::from_utf8_lossy(&body)
                    );
                    if s != 200 {
                        prop_assert!(json_error(&body).is_some());
                    }

                    let (s, body) = answer(
                        kv.send("POST", "/kv/v1/prop?batchGet", &[], batch_body.clone())
                            .await
                            .unwrap(),
                    )
                    .await;
                    prop_assert!(s == 200 || (400..500).contains(&s), "batch {s}");
                    if s != 200 {
                        prop_assert!(json_error(&body).is_some());
                    }
                    // The same key in a batch as sent and encoded.
                    let b64 = STANDARD.encode(&key);
                    let dup = serde_json::json!({"keys": [b64, b64]}).to_string();
                    let (s, _) = answer(
                        kv.send("POST", "/kv/v1/prop?batchGet", &[], dup.into_bytes())
                            .await
                            .unwrap(),
                    )
                    .await;
                    prop_assert_eq!(s, 400, "duplicate keys in a batch");
                    Ok(())
                })
            },
        )
        .unwrap();
    assert!(ran.into_inner() >= 48);
}

fn valid_tenant_name(n: &str) -> bool {
    !n.is_empty()
        && n.len() <= 128
        && n.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"-_.".contains(&b))
        && n.as_bytes()[0].is_ascii_alphanumeric()
}

/// Generated admin API calls (tenant names, create and update bodies of arbitrary
/// JSON, key revocations of arbitrary ids): never a 5xx, errors are JSON, a tenant is
/// created only under a valid name, and what was created reads back.
#[test]
fn generated_admin_calls_get_correct_answers() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let node = NodeProc::start(dir.path()).unwrap();
    let admin = Admin::new(&node);
    let ran = std::sync::atomic::AtomicUsize::new(0);
    let mut runner = TestRunner::new(Config {
        cases: 48,
        failure_persistence: None,
        ..Config::default()
    });
    let json_value = prop_oneof![
        Just(serde_json::json!(null)),
        any::<i64>().prop_map(|n| serde_json::json!(n)),
        "[ -~]{0,12}".prop_map(|s| serde_json::json!(s)),
        Just(serde_json::json!({"quotas": {"storage": "1Gi"}})),
        Just(serde_json::json!({"quotas": {"storage": -1}})),
        Just(serde_json::json!({"quotas": {"objects": "many"}})),
        Just(serde_json::json!({"unknown": 1})),
        Just(serde_json::json!({"qos": {"weight": 0}})),
    ];
    let strategy = (
        "[a-z0-9._-]{1,12}|[ -~]{0,20}",
        json_value,
        "[A-Za-z0-9]{0,24}",
    );
    runner
        .run(&strategy, |(name, spec, key_id)| {
            ran.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            rt.block_on(async {
                let body = match &spec {
                    serde_json::Value::Object(m) => {
                        let mut m = m.clone();
                        m.insert("name".into(), serde_json::json!(name));
                        serde_json::Value::Object(m)
                    }
                    other => serde_json::json!({"name": name, "quotas": other}),
                };
                let (s, v) = admin
                    .call(reqwest::Method::POST, "/tenants", Some(body))
                    .await
                    .unwrap();
                prop_assert!(s < 500, "create {name:?}: {s} {v}");
                if s >= 400 {
                    prop_assert!(v["error"].is_string(), "{s} {v}");
                }
                if s == 201 {
                    prop_assert!(valid_tenant_name(&name), "created {name:?}");
                }
                let enc: String = name
                    .bytes()
                    .map(|b| {
                        if b.is_ascii_alphanumeric() {
                            (b as char).to_string()
                        } else {
                            format!("%{b:02X}")
                        }
                    })
                    .collect();
                let (gs, gv) = admin
                    .call(reqwest::Method::GET, &format!("/tenants/{enc}"), None)
                    .await
                    .unwrap();
                prop_assert!(gs < 500, "get {name:?}: {gs} {gv}");
                if s == 201 {
                    prop_assert_eq!(gs, 200);
                    prop_assert_eq!(gv["name"].as_str(), Some(name.as_str()));
                }
                let (us, uv) = admin
                    .call(
                        reqwest::Method::PUT,
                        &format!("/tenants/{enc}"),
                        Some(spec.clone()),
                    )
                    .await
                    .unwrap();
                prop_assert!(us < 500, "update {name:?}: {us} {uv}");
                let (rs, rv) = admin
                    .call(
                        reqwest::Method::DELETE,
                        &format!("/tenants/{enc}/keys/{key_id}"),
                        None,
                    )
                    .await
                    .unwrap();
                prop_assert!(rs < 500 && rs != 204, "revoke {key_id:?}: {rs} {rv}");
                Ok(())
            })
        })
        .unwrap();
    assert!(ran.into_inner() >= 48);
}
