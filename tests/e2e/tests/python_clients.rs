//! boto3, the AWS CLI and curl (virtual-host style) against a real node.

use granary_e2e::{NodeProc, workspace_root};

#[test]
fn boto3_aws_cli_and_curl_work_against_a_node() {
    let dir = tempfile::tempdir().unwrap();
    let node = NodeProc::start(dir.path()).unwrap();
    let script = workspace_root().join("tests/e2e/python/s3_clients.py");
    let out = std::process::Command::new("python3")
        .arg(script)
        .env("GRANARY_S3", &node.s3)
        .env("AWS_ACCESS_KEY_ID", &node.access_key)
        .env("AWS_SECRET_ACCESS_KEY", &node.secret_key)
        .env_remove("AWS_PROFILE")
        .output()
        .expect("python3 runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "python clients failed:\n{stdout}\n{stderr}"
    );
    assert!(stdout.contains("all checks passed"), "{stdout}");
}
