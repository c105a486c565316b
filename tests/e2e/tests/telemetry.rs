//! Traces leave the node over OTLP/HTTP when OTEL_EXPORTER_OTLP_ENDPOINT is set, with a
//! span per request naming the operation; metrics count requests.

use std::time::Duration;

use aws_sdk_s3::primitives::ByteStream;
use granary_e2e::otlp::collector;
use granary_e2e::{NodeProc, s3_client};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spans_are_exported_over_otlp_and_requests_are_counted() {
    let (endpoint, got) = collector();
    // SAFETY-free: the harness passes the variable to the child process only.
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(dir.path()).unwrap();
    let mut node = NodeProc::start_with_env(
        dir.path(),
        &[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint.as_str()),
            ("OTEL_BSP_SCHEDULE_DELAY", "200"),
        ],
    )
    .unwrap();
    let c = s3_client(&node.s3, &node.access_key, &node.secret_key);
    c.create_bucket().bucket("traced").send().await.unwrap();
    c.put_object()
        .bucket("traced")
        .key("k")
        .body(ByteStream::from_static(b"v"))
        .send()
        .await
        .unwrap();
    let _ = c.get_object().bucket("traced").key("missing").send().await;
    let m = node.metrics().await.unwrap();
    assert!(
        m.contains(r#"granary_requests_total{front="s3",operation="PutObject",status="200"} 1"#),
        "{m}"
    );
    assert!(m.contains(r#"operation="GetObject",status="404""#), "{m}");
    assert!(node.stop(), "graceful stop flushes the exporter");
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let bodies = got.lock().unwrap().clone();
        let traces: Vec<_> = bodies.iter().filter(|(p, _)| p == "/v1/traces").collect();
        let all: Vec<u8> = traces.iter().flat_map(|(_, b)| b.clone()).collect();
        let has = |s: &[u8]| all.windows(s.len()).any(|w| w == s);
        if has(b"PutObject") && has(b"granary-node") && has(b"traced") {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no OTLP spans with PutObject received ({} posts); node stderr:\n{}",
            bodies.len(),
            std::fs::read_to_string(dir.path().join("stderr.log")).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}
