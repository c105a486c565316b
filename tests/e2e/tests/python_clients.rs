//! boto3, the AWS CLI and curl against a real node: the everyday operations
//! (`s3_clients.py`) and the S3 behaviours conformance suites check (`s3_compat.py`).

use granary_e2e::{NodeProc, workspace_root};

/// Runs `tests/e2e/python/<script>` against a fresh node; it must end with `marker`.
fn run_script(script: &str, marker: &str) {
    let dir = tempfile::tempdir().unwrap();
    let node = NodeProc::start(dir.path()).unwrap();
    let script = workspace_root().join("tests/e2e/python").join(script);
    let out = std::process::Command::new("python3")
        .arg(script)
        .env("GRANARY_S3", &node.s3)
        .env("GRANARY_KV", &node.kv)
        .env("GRANARY_ADMIN", &node.admin)
        .env("GRANARY_ADMIN_TOKEN", &node.admin_token)
        .env("AWS_ACCESS_KEY_ID", &node.access_key)
        .env("AWS_SECRET_ACCESS_KEY", &node.secret_key)
        .env_remove("AWS_PROFILE")
        .output()
        .expect("python3 runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "{marker}: failed:\n{stdout}\n{stderr}"
    );
    assert!(stdout.contains(marker), "{stdout}");
}

#[test]
fn boto3_aws_cli_and_curl_work_against_a_node() {
    run_script("s3_clients.py", "python clients: all checks passed");
}

/// DeleteBucket with uploads in progress (also `aws s3 rb --force`), ListObjects V1
/// fields, `aws-chunked` Content-Encoding, request ids in errors, presigned expiry,
/// anonymous answers, chunked uploads without a length, conditional writes and reads,
/// ListBuckets pagination.
#[test]
fn s3_behaviours_conformance_suites_check() {
    run_script("s3_compat.py", "s3 compatibility: all checks passed");
}

/// Tenant isolation: tenant A's credentials aimed at tenant B's buckets, objects,
/// upload ids, copy sources, presigned URLs, form uploads and KV keys answer exactly as
/// for resources that do not exist (50 probes; at least 40 asserted), and B finds nothing changed.
#[test]
fn another_tenants_resources_answer_as_if_they_did_not_exist() {
    run_script("tenant_probes.py", "tenant probes: all");
}
