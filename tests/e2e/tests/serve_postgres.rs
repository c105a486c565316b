//! `granary-node serve --config` on a Postgres catalog: configuration from a file with
//! environment overrides, tenants through the admin CLI, data through S3, a graceful
//! SIGTERM and a restart that keeps everything.

use aws_sdk_s3::primitives::ByteStream;
use granary_e2e::{NodeProc, PgServer, node_binary, s3_client};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_on_postgres_with_config_file_and_cli_admin() {
    let pg = PgServer::start().unwrap();
    let url = pg.create_db("granary_serve").unwrap();
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let out = std::process::Command::new(node_binary())
        .arg("gen-master-key")
        .output()
        .unwrap();
    let master = String::from_utf8(out.stdout).unwrap().trim().to_string();
    let token = "serve-test-admin-token-0123456789";
    let config = dir.path().join("node.toml");
    std::fs::write(
        &config,
        format!(
            "node_id = \"node-a\"\nregion = \"eu-west-1\"\nzone = \"a\"\ndata_dir = \"{}\"\n\
             s3_listen = \"127.0.0.1:0\"\nkv_listen = \"127.0.0.1:0\"\nadmin_listen = \"127.0.0.1:0\"\nrpc_listen = \"127.0.0.1:0\"\n\
             admin_token = \"{token}\"\npartitions = 64\n",
            data.display()
        ),
    )
    .unwrap();
    // Secrets come from the environment, as from a Kubernetes Secret.
    let env = [
        ("GRANARY_CATALOG_URL", url.as_str()),
        ("GRANARY_MASTER_KEY", master.as_str()),
    ];
    let mut node = NodeProc::serve(&data, &config, &env, token).unwrap();

    let cli = |args: &[&str]| {
        let out = std::process::Command::new(node_binary())
            .args(args)
            .env("GRANARY_ADMIN_URL", &node.admin)
            .env("GRANARY_ADMIN_TOKEN", token)
            .output()
            .unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).to_string(),
            String::from_utf8_lossy(&out.stderr).to_string(),
        )
    };
    let (ok, _, err) = cli(&[
        "tenant",
        "create",
        "analytics",
        "--spec",
        r#"{"quotas":{"objects":5}}"#,
    ]);
    assert!(ok, "{err}");
    let (ok, _, err) = cli(&["tenant", "create", "analytics"]);
    assert!(
        !ok && err.contains("409"),
        "duplicate tenant must fail visibly: {err}"
    );
    let (ok, _, err) = cli(&[
        "tenant",
        "create",
        "x",
        "--spec",
        r#"{"quotas":{"nope":1}}"#,
    ]);
    assert!(!ok && err.contains("nope"), "{err}");
    let (ok, out, err) = cli(&["key", "create", "analytics"]);
    assert!(ok, "{err}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    let (ak, sk) = (
        v["accessKeyId"].as_str().unwrap().to_string(),
        v["secretAccessKey"].as_str().unwrap().to_string(),
    );

    let c = s3_client(&node.s3, &ak, &sk);
    c.create_bucket().bucket("reports").send().await.unwrap();
    c.put_object()
        .bucket("reports")
        .key("q1.csv")
        .body(ByteStream::from_static(b"a,b\n1,2\n"))
        .send()
        .await
        .unwrap();
    let loc = c
        .get_bucket_location()
        .bucket("reports")
        .send()
        .await
        .unwrap();
    assert_eq!(
        loc.location_constraint().map(|l| l.as_str()),
        Some("eu-west-1")
    );

    // The node registered itself in the Postgres catalog.
    let pool = sqlx::PgPool::connect(&url).await.unwrap();
    let row: (String, String) = sqlx::query_as("SELECT id, zone FROM nodes")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(row, ("node-a".to_string(), "a".to_string()));
    let (secret_col,): (String,) =
        sqlx::query_as("SELECT secret_sealed FROM access_keys WHERE access_key_id = $1")
            .bind(&ak)
            .fetch_one(&pool)
            .await
            .unwrap();
    assert!(!secret_col.contains(&sk), "secret stored in clear");

    // SIGTERM: graceful exit with status 0; a restart keeps data and keys.
    assert!(node.stop(), "graceful shutdown exits 0");
    let node = NodeProc::serve(&data, &config, &env, token).unwrap();
    let c = s3_client(&node.s3, &ak, &sk);
    let got = c
        .get_object()
        .bucket("reports")
        .key("q1.csv")
        .send()
        .await
        .unwrap();
    assert_eq!(
        got.body.collect().await.unwrap().into_bytes().as_ref(),
        b"a,b\n1,2\n"
    );

    // serve refuses to start without the secrets it needs, with a clear message.
    let out = std::process::Command::new(node_binary())
        .args(["serve", "--config"])
        .arg(&config)
        .env("GRANARY_CATALOG_URL", &url)
        .env_remove("GRANARY_MASTER_KEY")
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("no master key"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
