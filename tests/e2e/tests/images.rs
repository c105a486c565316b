//! The container images `scripts/images.sh` builds (no container engine: mmdebstrap,
//! umoci, skopeo), checked as a registry and a kubelet would see them and run with
//! Debian's `runc`: the node image serves S3 (to the AWS CLI) and KV from its own network
//! namespace, runs as its non-root user on a read-only root file system, stops cleanly
//! on SIGTERM and keeps its data across a restart; the operator image prints its CRDs
//! and version.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use granary_e2e::netns::Net;
use granary_e2e::{KvClient, node_binary, operator_binary, workspace_root};
use serde_json::{Value, json};

/// The OCI layout and archives: `$GRANARY_IMAGES_DIR` (the test command builds them
/// first), else built here from the binaries the other tests use.
fn images_dir() -> PathBuf {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        if let Ok(d) = std::env::var("GRANARY_IMAGES_DIR") {
            return PathBuf::from(d);
        }
        let node = node_binary();
        let operator = operator_binary();
        let bin_dir = node.parent().expect("binary directory");
        assert_eq!(
            Some(bin_dir),
            operator.parent(),
            "granary-node and granary-operator must be in one directory"
        );
        let out = workspace_root().join("target/e2e-images");
        let status = Command::new("bash")
            .arg(workspace_root().join("scripts/images.sh"))
            .arg("--bin-dir")
            .arg(bin_dir)
            .env("IMAGES_OUT", &out)
            .status()
            .expect("running scripts/images.sh");
        assert!(status.success(), "scripts/images.sh failed: {status}");
        out
    })
    .clone()
}

fn read_json(path: &Path) -> Value {
    let text = std::fs::read(path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
    serde_json::from_slice(&text).unwrap_or_else(|e| panic!("parsing {}: {e}", path.display()))
}

/// The image config (`config` of the OCI image configuration) tagged `tag` in the layout.
fn image_config(layout: &Path, tag: &str) -> Value {
    let blob = |digest: &str| {
        let hex = digest.strip_prefix("sha256:").expect("sha256 digest");
        read_json(&layout.join("blobs/sha256").join(hex))
    };
    let index = read_json(&layout.join("index.json"));
    let manifest = index["manifests"]
        .as_array()
        .expect("manifests")
        .iter()
        .find(|m| m["annotations"]["org.opencontainers.image.ref.name"] == tag)
        .unwrap_or_else(|| panic!("no image tagged {tag} in {}", layout.display()));
    let manifest = blob(manifest["digest"].as_str().expect("digest"));
    let config = blob(
        manifest["config"]["digest"]
            .as_str()
            .expect("config digest"),
    );
    assert_eq!(config["os"], "linux");
    config["config"].clone()
}

/// The reference a docker archive is tagged with (what `docker load` names the image).
fn archive_tag(archive: &Path) -> String {
    let out = Command::new("tar")
        .arg("-xOf")
        .arg(archive)
        .arg("manifest.json")
        .output()
        .expect("tar runs");
    assert!(
        out.status.success(),
        "{} has no manifest.json",
        archive.display()
    );
    let m: Value = serde_json::from_slice(&out.stdout).expect("manifest.json parses");
    m[0]["RepoTags"][0].as_str().unwrap_or_default().to_string()
}

fn yaml_value(text: &str, key: &str) -> String {
    text.lines()
        .find_map(|l| l.trim().strip_prefix(&format!("{key}:")))
        .map(|v| v.trim().trim_matches('"').to_string())
        .unwrap_or_else(|| panic!("no {key} in the chart"))
}

/// The exec-form `instruction` (ENTRYPOINT, CMD) of Dockerfile stage `stage`, and the
/// USER it inherits from the runtime stage.
fn dockerfile(stage: &str, instruction: &str) -> Value {
    let text = std::fs::read_to_string(workspace_root().join("Dockerfile")).unwrap();
    let mut current = "";
    for line in text.lines() {
        if let Some(from) = line.strip_prefix("FROM ") {
            current = from.rsplit(" AS ").next().unwrap_or_default();
        } else if current == stage
            && let Some(v) = line.strip_prefix(&format!("{instruction} "))
        {
            return if v.starts_with('[') {
                serde_json::from_str(v).expect("exec form")
            } else {
                json!(v.trim())
            };
        }
    }
    panic!("no {instruction} in Dockerfile stage {stage}")
}

#[test]
fn images_carry_an_entrypoint_a_non_root_user_and_the_references_the_chart_uses() {
    let dir = images_dir();
    let root = workspace_root();
    let chart = std::fs::read_to_string(root.join("helm/granary/Chart.yaml")).unwrap();
    let values = std::fs::read_to_string(root.join("helm/granary/values.yaml")).unwrap();
    let app_version = yaml_value(&chart, "appVersion");
    let operator_repo = yaml_value(&values, "repository");
    let operator_src = std::fs::read_to_string(root.join("operator/src/build/mod.rs")).unwrap();
    let node_default = operator_src
        .lines()
        .find_map(|l| l.strip_prefix("pub const DEFAULT_IMAGE: &str = \""))
        .and_then(|l| l.strip_suffix("\";"))
        .expect("the operator's DEFAULT_IMAGE")
        .to_string();
    for (name, binary, reference) in [
        ("granary-node", "granary-node", node_default.clone()),
        (
            "granary-operator",
            "granary-operator",
            format!("{operator_repo}:{app_version}"),
        ),
    ] {
        let c = image_config(&dir.join("oci"), name);
        let entrypoint = c["Entrypoint"].as_array().cloned().unwrap_or_default();
        assert_eq!(
            entrypoint,
            vec![json!(format!("/usr/local/bin/{binary}"))],
            "{name}: entrypoint"
        );
        let user = c["User"].as_str().unwrap_or_default();
        let uid = user.split(':').next().unwrap_or_default();
        assert!(
            !uid.is_empty() && uid != "0" && uid != "root",
            "{name} runs as root (User {user:?})"
        );
        assert!(
            uid.parse::<u32>().is_ok(),
            "{name}: User {user:?} is not numeric (runAsNonRoot cannot verify a name)"
        );
        // The Dockerfile (for engines) builds the same images.
        let stage = name.strip_prefix("granary-").unwrap();
        assert_eq!(c["Entrypoint"], dockerfile(stage, "ENTRYPOINT"), "{name}");
        assert_eq!(
            c["Cmd"],
            dockerfile(stage, "CMD"),
            "{name}: default command"
        );
        assert_eq!(c["User"], dockerfile("runtime", "USER"), "{name}: user");
        for label in ["title", "version", "revision", "source", "licenses"] {
            let key = format!("org.opencontainers.image.{label}");
            assert!(
                c["Labels"][&key].as_str().is_some_and(|v| !v.is_empty()),
                "{name}: label {key} missing"
            );
        }
        assert_eq!(c["Labels"]["org.opencontainers.image.version"], app_version);
        // What the chart (operator) and the operator (nodes) pull by default is what the
        // archives are tagged with.
        assert_eq!(
            archive_tag(&dir.join(format!("{name}.docker.tar"))),
            reference,
            "{name}: docker archive tag"
        );
        assert!(
            reference.ends_with(&format!(":{app_version}")),
            "{reference} is not tagged with the chart's appVersion {app_version}"
        );
        let oci_index = Command::new("tar")
            .arg("-xOf")
            .arg(dir.join(format!("{name}.oci.tar")))
            .arg("index.json")
            .output()
            .unwrap();
        assert!(
            String::from_utf8_lossy(&oci_index.stdout).contains(&reference),
            "{name}: OCI archive not named {reference}"
        );
    }
}

/// runc's state directory for the test containers: fixed, so the test command can remove
/// containers a killed test run left behind (ids `granary-e2e-*`).
const RUNC_ROOT: &str = "/run/granary-e2e-runc";

/// One `runc` container from an image; deleted on drop.
struct Container {
    id: String,
    bundle: PathBuf,
    child: Option<Child>,
    stdout: PathBuf,
}

impl Container {
    /// Unpacks `image` into `dir/bundle` and adjusts the runtime spec umoci generated
    /// from the image config with `edit`.
    fn prepare(image: &str, dir: &Path, edit: impl FnOnce(&mut Value)) -> Self {
        let bundle = dir.join("bundle");
        let layout = images_dir().join("oci");
        let out = Command::new("umoci")
            .args(["unpack", "--image"])
            .arg(format!("{}:{image}", layout.display()))
            .arg(&bundle)
            .output()
            .expect("umoci runs");
        assert!(
            out.status.success(),
            "umoci unpack {image}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let spec_path = bundle.join("config.json");
        let mut spec = read_json(&spec_path);
        spec["process"]["terminal"] = json!(false);
        // As the pods run them (readOnlyRootFilesystem; no writable /tmp either).
        spec["root"]["readonly"] = json!(true);
        edit(&mut spec);
        std::fs::write(&spec_path, serde_json::to_vec_pretty(&spec).unwrap()).unwrap();
        let r: u32 = rand::random();
        Container {
            id: format!("granary-e2e-{r:08x}"),
            bundle,
            child: None,
            stdout: dir.join("stdout.log"),
        }
    }

    fn runc(&self) -> Command {
        let mut c = Command::new("runc");
        c.args(["--root", RUNC_ROOT]);
        c
    }

    /// Starts the container in the foreground of a child process (its stdout to a file).
    fn start(&mut self) {
        let out = std::fs::File::create(&self.stdout).unwrap();
        let child = self
            .runc()
            .args(["run", "--bundle"])
            .arg(&self.bundle)
            .arg(&self.id)
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(std::fs::File::create(self.stdout.with_file_name("stderr.log")).unwrap())
            .spawn()
            .expect("runc runs");
        self.child = Some(child);
    }

    /// Runs the container to its end; its exit status and stdout.
    fn run(&mut self) -> (std::process::ExitStatus, String) {
        self.start();
        let status = self.wait(Duration::from_secs(60));
        assert!(status.success(), "{status}: {}", self.output());
        (status, std::fs::read_to_string(&self.stdout).unwrap())
    }

    fn wait(&mut self, limit: Duration) -> std::process::ExitStatus {
        let child = self.child.as_mut().expect("started");
        let deadline = Instant::now() + limit;
        loop {
            if let Some(s) = child.try_wait().unwrap() {
                self.child = None;
                let _ = self.runc().args(["delete", "--force", &self.id]).output();
                return s;
            }
            assert!(
                Instant::now() < deadline,
                "container {} still running after {limit:?}",
                self.id
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// What the container (and runc) printed.
    fn output(&self) -> String {
        let read = |p: &Path| std::fs::read_to_string(p).unwrap_or_default();
        format!(
            "stdout:\n{}\nstderr:\n{}",
            read(&self.stdout),
            read(&self.stdout.with_file_name("stderr.log"))
        )
    }

    /// The container's init process as the host sees it.
    fn pid(&self) -> u32 {
        let out = self.runc().args(["state", &self.id]).output().unwrap();
        let state: Value = serde_json::from_slice(&out.stdout).expect("runc state");
        state["pid"].as_u64().expect("pid") as u32
    }

    fn signal(&self, sig: &str) {
        let out = self.runc().args(["kill", &self.id, sig]).output().unwrap();
        assert!(
            out.status.success(),
            "runc kill {sig}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// Waits for `prefix` in the container's stdout; the rest of that line.
    fn stdout_line(&mut self, prefix: &str) -> String {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Ok(f) = std::fs::File::open(&self.stdout) {
                for line in BufReader::new(f).lines().map_while(Result::ok) {
                    if let Some(v) = line.trim().strip_prefix(prefix) {
                        return v.trim().to_string();
                    }
                }
            }
            if let Some(s) = self.child.as_mut().and_then(|c| c.try_wait().unwrap()) {
                panic!(
                    "the container exited ({s}) before printing {prefix:?}:\n{}",
                    self.output()
                );
            }
            assert!(Instant::now() < deadline, "no {prefix:?} within 60 s");
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Container {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = self.runc().args(["kill", &self.id, "KILL"]).output();
            let _ = c.kill();
            let _ = c.wait();
        }
        let _ = self.runc().args(["delete", "--force", &self.id]).output();
    }
}

fn aws(endpoint: &str, key: &str, secret: &str, args: &[&str]) -> String {
    let out = Command::new("aws")
        .arg("--endpoint-url")
        .arg(endpoint)
        .args(args)
        .env("AWS_ACCESS_KEY_ID", key)
        .env("AWS_SECRET_ACCESS_KEY", secret)
        .env("AWS_DEFAULT_REGION", "us-east-1")
        .env_remove("AWS_PROFILE")
        .output()
        .expect("the AWS CLI runs");
    assert!(
        out.status.success(),
        "aws {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_node_image_serves_s3_and_kv_under_runc_stops_on_sigterm_and_keeps_its_data() {
    let dir = tempfile::tempdir().unwrap();
    let net = Net::create(1).unwrap();
    let addr = net.addr(0);
    // The data volume, owned by the image's user as a kubelet's fsGroup would make it.
    let data = dir.path().join("volume");
    std::fs::create_dir_all(&data).unwrap();
    std::os::unix::fs::chown(&data, Some(65532), Some(65532)).unwrap();
    let ns_path = format!("/var/run/netns/{}", net.namespace(0));
    let start = |run: &str| {
        let run_dir = dir.path().join(run);
        std::fs::create_dir_all(&run_dir).unwrap();
        let mut c = Container::prepare("granary-node", &run_dir, |spec| {
            // The image's entrypoint, with the embedded single-node setup listening on
            // the container's own address.
            let entrypoint = spec["process"]["args"][0].clone();
            assert_eq!(entrypoint, "/usr/local/bin/granary-node");
            spec["process"]["args"] = json!([
                entrypoint,
                "dev",
                "--data-dir",
                "/var/lib/granary/data",
                "--s3-listen",
                "0.0.0.0:9000",
                "--kv-listen",
                "0.0.0.0:9100",
                "--admin-listen",
                "0.0.0.0:9200",
                "--rpc-listen",
                format!("{addr}:9300")
            ]);
            for n in spec["linux"]["namespaces"].as_array_mut().unwrap() {
                if n["type"] == "network" {
                    n["path"] = json!(ns_path);
                }
            }
            spec["mounts"].as_array_mut().unwrap().push(json!({
                "destination": "/var/lib/granary", "type": "bind",
                "source": data, "options": ["rbind", "rw"]
            }));
        });
        c.start();
        c
    };

    let mut c = start("first");
    // The runtime base: CA certificates, no shell or package manager, nothing of the
    // build machine's network setup.
    let root = c.bundle.join("rootfs");
    let ca = std::fs::read_to_string(root.join("etc/ssl/certs/ca-certificates.crt")).unwrap();
    assert!(ca.matches("BEGIN CERTIFICATE").count() > 100, "CA bundle");
    for absent in [
        "bin/sh",
        "bin/bash",
        "usr/bin/apt",
        "usr/bin/dpkg",
        "usr/bin/mawk",
    ] {
        assert!(!root.join(absent).exists(), "{absent} in the runtime image");
    }
    assert_eq!(std::fs::read(root.join("etc/resolv.conf")).unwrap(), b"");
    assert!(
        root.join("var/lib/dpkg/status.d/libc6").exists(),
        "package list for scanners"
    );
    let key = c.stdout_line("Access key id");
    let secret = c.stdout_line("Secret key");
    let pid = c.pid();
    let proc_status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let uid = proc_status
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))
        .unwrap()
        .split_whitespace()
        .next()
        .unwrap()
        .to_string();
    assert_eq!(uid, "65532", "the node runs as the image's non-root user");
    let s3 = format!("http://{addr}:9000");

    // The AWS CLI, from the host: bucket, upload (multipart: 20 MiB), listing, download.
    let payload: Vec<u8> = (0..20 * 1024 * 1024u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 24) as u8)
        .collect();
    let file = dir.path().join("payload.bin");
    std::fs::write(&file, &payload).unwrap();
    let cli = |args: &[&str]| aws(&s3, &key, &secret, args);
    let back = dir.path().join("back.bin");
    let back_path = back.to_str().unwrap();
    let download_matches = |what: &str| {
        cli(&["s3", "cp", "s3://images/payload.bin", back_path]);
        assert!(std::fs::read(&back).unwrap() == payload, "{what} differs");
    };
    cli(&["s3", "mb", "s3://images"]);
    cli(&[
        "s3",
        "cp",
        file.to_str().unwrap(),
        "s3://images/payload.bin",
    ]);
    let listing = cli(&["s3", "ls", "s3://images"]);
    assert!(listing.contains("payload.bin"), "{listing}");
    download_matches("the object read back");

    let kv = KvClient::new(&format!("http://{addr}:9100"), &key, &secret);
    let r = kv
        .send(
            "PUT",
            "/kv/v1/app/greeting",
            &[("content-type", "text/plain")],
            b"hello".to_vec(),
        )
        .await
        .unwrap();
    assert_eq!(r.status(), 200, "{}", r.text().await.unwrap_or_default());
    kv.assert_value("/kv/v1/app/greeting", b"hello", "the key read back")
        .await;

    // SIGTERM (what a kubelet sends): the node drains and exits 0.
    c.signal("TERM");
    let exit = c.wait(Duration::from_secs(30));
    assert!(
        exit.success(),
        "the node exited with {exit} on SIGTERM: {}",
        c.output()
    );
    drop(c);

    // The same volume in a new container: the same tenant, the object and the key.
    let mut c = start("second");
    assert_eq!(c.stdout_line("Access key id"), key);
    download_matches("the object after a restart");
    kv.assert_value("/kv/v1/app/greeting", b"hello", "the key after a restart")
        .await;
    c.signal("TERM");
    assert!(c.wait(Duration::from_secs(30)).success());
}

#[test]
fn the_operator_image_prints_its_crds_and_version() {
    let dir = tempfile::tempdir().unwrap();
    let run = |name: &str, args: &[&str]| {
        let d = dir.path().join(name);
        std::fs::create_dir_all(&d).unwrap();
        let mut c = Container::prepare("granary-operator", &d, |spec| {
            let mut a = vec![spec["process"]["args"][0].clone()];
            a.extend(args.iter().map(|s| json!(s)));
            spec["process"]["args"] = json!(a);
        });
        c.run()
    };
    let (status, out) = run("version", &["--version"]);
    assert!(status.success(), "--version: {status}");
    let version = env!("CARGO_PKG_VERSION");
    assert_eq!(out.trim(), format!("granary-operator {version}"));
    let (status, out) = run("crd", &["crd"]);
    assert!(status.success(), "crd: {status}");
    for kind in [
        "kind: CustomResourceDefinition",
        "kind: Tenant",
        "kind: StorageCluster",
    ] {
        assert!(
            out.contains(kind),
            "no {kind:?} in the CRDs the image printed"
        );
    }
}
