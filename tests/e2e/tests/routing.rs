//! One store across three nodes: any node serves any bucket and KV namespace, by
//! forwarding the request to the node that leads its partition (three `serve`
//! processes in three network namespaces on one real Postgres catalog, real AWS SDK and
//! SigV4 clients). Covers reads and writes through every node, DeleteBucket emptiness
//! and tenant usage cluster-wide, KV compare-and-set through a non-primary, a 1 GiB
//! object through a node that is not its primary (its memory stays flat), what clients
//! see while a primary is stopped, and a cluster-wide tenant purge.

use std::collections::BTreeMap;
use std::io::Write;
use std::time::{Duration, Instant};

use aws_sdk_s3::primitives::ByteStream;
use granary_e2e::cluster::{Settings, TestCluster, admin, eventually, metric, peak_rss, signal};
use granary_e2e::{Admin, KvClient, s3_client};
use granary_node::types::{PartitionId, TenantId};
use serde_json::Value;

const PARTITIONS: u16 = 64;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_node_serves_every_bucket_and_namespace() {
    let c = TestCluster::start(
        3,
        Settings {
            partitions: PARTITIONS,
            ..Settings::default()
        },
    )
    .unwrap();
    let ids: Vec<String> = c.nodes.iter().map(|m| m.id.clone()).collect();

    // Every node knows every partition's acting primary, the layout's preferred one.
    let mut acting = Value::Null;
    for m in &c.nodes {
        let l = eventually(
            &format!("{} knows every partition's primary", m.id),
            30,
            || async {
                let l = admin(&m.proc, "/layout?partitions=true").await;
                (l["members"].as_array().unwrap().len() == 3 && l["partitionsWithoutPrimary"] == 0)
                    .then_some(l)
            },
        )
        .await;
        for (p, set) in l["replicaSets"].as_array().unwrap().iter().enumerate() {
            assert_eq!(l["actingPrimaries"][p], set[0], "partition {p}");
        }
        if !acting.is_null() {
            assert_eq!(
                l["actingPrimaries"], acting,
                "every node sees the same primaries"
            );
        }
        acting = l["actingPrimaries"].clone();
    }

    let (ak, sk, id) = c.tenant("acme").await;
    let tenant: TenantId = id.parse().unwrap();
    let primary_of = |container: &str| {
        let p = PartitionId::of(tenant, container.as_bytes(), PARTITIONS);
        acting[p.0 as usize].as_str().unwrap().to_string()
    };
    // One bucket and one KV namespace led by each node.
    let pick = |prefix: &str| {
        let mut by_primary = BTreeMap::new();
        for i in 0.. {
            let name = format!("{prefix}-{i}");
            by_primary.entry(primary_of(&name)).or_insert(name);
            if by_primary.len() == 3 {
                return by_primary;
            }
        }
        unreachable!()
    };
    let buckets = pick("bucket");
    // KV namespaces are placed as the container "kv:<namespace>".
    let namespaces: BTreeMap<String, String> = {
        let mut by_primary = BTreeMap::new();
        for i in 0.. {
            let ns = format!("ns-{i}");
            by_primary
                .entry(primary_of(&format!("kv:{ns}")))
                .or_insert(ns);
            if by_primary.len() == 3 {
                break;
            }
        }
        by_primary
    };
    println!("buckets by primary: {buckets:?}; namespaces by primary: {namespaces:?}");
    let s3: Vec<_> = c
        .nodes
        .iter()
        .map(|m| s3_client(&m.proc.s3, &ak, &sk))
        .collect();

    // Created and written through n1: forwarded for the buckets n2 and n3 lead.
    for b in buckets.values() {
        s3[0].create_bucket().bucket(b).send().await.unwrap();
        s3[0]
            .put_object()
            .bucket(b)
            .key("k")
            .body(ByteStream::from(format!("stored in {b}").into_bytes()))
            .send()
            .await
            .unwrap();
    }
    // Read through every node: GET, HEAD and LIST agree.
    for (i, client) in s3.iter().enumerate() {
        for b in buckets.values() {
            let want = format!("stored in {b}");
            let got = client
                .get_object()
                .bucket(b)
                .key("k")
                .send()
                .await
                .unwrap_or_else(|e| panic!("GET {b} through {}: {e:?}", ids[i]));
            let body = got.body.collect().await.unwrap().into_bytes();
            assert_eq!(body, want.as_bytes(), "GET {b} through {}", ids[i]);
            let head = client
                .head_object()
                .bucket(b)
                .key("k")
                .send()
                .await
                .unwrap();
            assert_eq!(head.content_length(), Some(want.len() as i64));
            let list = client.list_objects_v2().bucket(b).send().await.unwrap();
            let keys: Vec<&str> = list.contents().iter().filter_map(|o| o.key()).collect();
            assert_eq!(keys, ["k"], "LIST {b} through {}", ids[i]);
        }
        let listed = client.list_buckets().send().await.unwrap();
        assert_eq!(listed.buckets().len(), 3);
    }
    // DeleteBucket through a node that does not lead the bucket sees its object.
    for (primary, b) in &buckets {
        let other = ids.iter().position(|id| id != primary).unwrap();
        let err = s3[other]
            .delete_bucket()
            .bucket(b)
            .send()
            .await
            .expect_err("a bucket with an object is not empty");
        let what = format!("DeleteBucket {b} through {}: {err:?}", ids[other]);
        assert_eq!(
            err.into_service_error().meta().code(),
            Some("BucketNotEmpty"),
            "{what}"
        );
    }

    // KV through any node: written through n1, read through n2 and n3, and a
    // compare-and-set through n3 that is decided by the primary.
    let kv: Vec<KvClient> = c
        .nodes
        .iter()
        .map(|m| KvClient::new(&m.proc.kv, &ak, &sk))
        .collect();
    for ns in namespaces.values() {
        let path = format!("/kv/v1/{ns}/key");
        let put = kv[0].send("PUT", &path, &[], b"v1".to_vec()).await.unwrap();
        assert_eq!(put.status(), 200, "PUT {ns} through n1");
        let version: Value = put.json().await.unwrap();
        let version = version["version"].as_u64().unwrap().to_string();
        for client in &kv[1..] {
            let got = client.send("GET", &path, &[], vec![]).await.unwrap();
            assert_eq!(got.status(), 200);
            assert_eq!(got.bytes().await.unwrap().as_ref(), b"v1");
        }
        let stale = kv[2]
            .send("PUT", &path, &[("if-match", "1")], b"lost".to_vec())
            .await
            .unwrap();
        assert_eq!(stale.status(), 412, "a stale version loses");
        let cas = kv[2]
            .send("PUT", &path, &[("if-match", &version)], b"v2".to_vec())
            .await
            .unwrap();
        assert_eq!(cas.status(), 200, "the current version wins");
        let got = kv[1].send("GET", &path, &[], vec![]).await.unwrap();
        assert_eq!(got.bytes().await.unwrap().as_ref(), b"v2");
    }

    // Usage is the same whichever node answers (each primary counts its partitions).
    let mut usages = Vec::new();
    for m in &c.nodes {
        usages.push(admin(&m.proc, "/tenants/acme/usage").await);
    }
    println!("usage: {}", usages[0]);
    assert_eq!(usages[0]["buckets"], 3);
    assert_eq!(usages[0]["objects"], 3);
    assert_eq!(usages[0]["kvKeys"], 3);
    assert!(usages.iter().all(|u| *u == usages[0]), "{usages:?}");

    // Every node both forwarded requests and served forwarded ones.
    for m in &c.nodes {
        let page = m.proc.metrics().await.unwrap();
        let s3_ok = metric(
            &page,
            "granary_forwarded_requests_total{front=\"s3\",outcome=\"ok\"}",
        );
        let kv_ok = metric(
            &page,
            "granary_forwarded_requests_total{front=\"kv\",outcome=\"ok\"}",
        );
        println!("{}: forwarded {s3_ok} S3 and {kv_ok} KV requests", m.id);
        assert!(s3_ok > 0.0 && kv_ok > 0.0, "{}: {page}", m.id);
        assert_eq!(metric(&page, "granary_cluster_partitions_led"), {
            let n = acting
                .as_array()
                .unwrap()
                .iter()
                .filter(|a| **a == m.id.as_str())
                .count();
            n as f64
        });
    }

    // A browser form upload (POST Object) through any node reaches the bucket's
    // primary: the node that takes it verifies the policy, then forwards the form.
    let b3 = &buckets["n3"];
    for (via, m) in c.nodes.iter().enumerate() {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs();
        let (y, mo, d) = granary_e2e::civil_from_days((now / 86400) as i64);
        let date = format!("{y:04}{mo:02}{d:02}");
        let credential = format!("{ak}/{date}/us-east-1/s3/aws4_request");
        let key = format!("form-{via}");
        let policy = serde_json::json!({
            "expiration": format!("{:04}-12-31T00:00:00Z", y + 1),
            "conditions": [
                {"bucket": b3}, {"key": key},
                {"x-amz-algorithm": "AWS4-HMAC-SHA256"},
                {"x-amz-credential": credential},
                {"x-amz-date": format!("{date}T000000Z")},
            ],
        });
        let policy = base64::Engine::encode(
            &base64::engine::general_purpose::STANDARD,
            policy.to_string(),
        );
        let sig = granary_node::tenancy::sigv4::sign_policy(&sk, &date, "us-east-1", "s3", &policy);
        let boundary = "formboundary7MA4YWxk";
        let mut body = Vec::new();
        for (k, v) in [
            ("key", key.as_str()),
            ("x-amz-algorithm", "AWS4-HMAC-SHA256"),
            ("x-amz-credential", credential.as_str()),
            ("x-amz-date", &format!("{date}T000000Z")),
            ("policy", policy.as_str()),
            ("x-amz-signature", sig.as_str()),
        ] {
            body.extend_from_slice(
                format!(
                    "--{boundary}\r\nContent-Disposition: form-data; name=\"{k}\"\r\n\r\n{v}\r\n"
                )
                .as_bytes(),
            );
        }
        let file = vec![via as u8 + 1; 300_000];
        body.extend_from_slice(
            format!(
                "--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; \
                 filename=\"f\"\r\nContent-Type: application/octet-stream\r\n\r\n"
            )
            .as_bytes(),
        );
        body.extend_from_slice(&file);
        body.extend_from_slice(format!("\r\n--{boundary}--\r\n").as_bytes());
        let r = reqwest::Client::new()
            .post(format!("{}/{b3}", m.proc.s3))
            .header(
                "content-type",
                format!("multipart/form-data; boundary={boundary}"),
            )
            .body(body)
            .send()
            .await
            .unwrap();
        let status = r.status().as_u16();
        assert_eq!(
            status,
            204,
            "form upload via {}: {:?}",
            m.id,
            r.text().await
        );
        let got = s3[(via + 1) % 3]
            .get_object()
            .bucket(b3)
            .key(&key)
            .send()
            .await
            .unwrap();
        assert_eq!(
            got.body.collect().await.unwrap().into_bytes().to_vec(),
            file
        );
    }

    // CopyObject works through any node, within one primary's buckets and between
    // buckets on different primaries (the destination's primary reads the source from
    // the source's primary, streamed); so does a ranged UploadPartCopy. Conditions and
    // missing sources answer as for a local source.
    let (b2, b3) = (&buckets["n2"], &buckets["n3"]);
    // The source's tags travel with a copy to another primary (they are not in the
    // record's own serde form, see cluster/rpc.rs `RemoteHead`).
    let tag = aws_sdk_s3::types::Tag::builder()
        .key("team")
        .value("web")
        .build()
        .unwrap();
    s3[1]
        .put_object_tagging()
        .bucket(b2)
        .key("k")
        .tagging(
            aws_sdk_s3::types::Tagging::builder()
                .tag_set(tag)
                .build()
                .unwrap(),
        )
        .send()
        .await
        .unwrap();
    let source = s3[1].get_object().bucket(b2).key("k").send().await.unwrap();
    let source_etag = source.e_tag().unwrap().to_string();
    let source = source.body.collect().await.unwrap().into_bytes();
    s3[0]
        .copy_object()
        .bucket(b2)
        .key("copied")
        .copy_source(format!("{b2}/k"))
        .send()
        .await
        .expect("a copy within one primary");
    for via in 0..3 {
        s3[via]
            .copy_object()
            .bucket(b3)
            .key(format!("copied-{via}"))
            .copy_source(format!("{b2}/k"))
            .copy_source_if_match(&source_etag)
            .send()
            .await
            .expect("a copy across primaries");
        let got = s3[(via + 1) % 3]
            .get_object()
            .bucket(b3)
            .key(format!("copied-{via}"))
            .send()
            .await
            .unwrap();
        assert_eq!(got.body.collect().await.unwrap().into_bytes(), source);
        let tags = s3[via]
            .get_object_tagging()
            .bucket(b3)
            .key(format!("copied-{via}"))
            .send()
            .await
            .unwrap();
        assert_eq!(
            tags.tag_set()
                .iter()
                .map(|t| (t.key(), t.value()))
                .collect::<Vec<_>>(),
            [("team", "web")],
            "the copy across primaries lost the source's tags"
        );
    }
    let err = s3[0]
        .copy_object()
        .bucket(b3)
        .key("nope")
        .copy_source(format!("{b2}/k"))
        .copy_source_if_match("\"0123456789abcdef0123456789abcdef\"")
        .send()
        .await
        .expect_err("a failed copy-source condition");
    assert_eq!(err.raw_response().map(|r| r.status().as_u16()), Some(412));
    let err = s3[0]
        .copy_object()
        .bucket(b3)
        .key("nope")
        .copy_source(format!("{b2}/missing"))
        .send()
        .await
        .expect_err("a missing copy source");
    assert_eq!(err.raw_response().map(|r| r.status().as_u16()), Some(404));
    let up = s3[0]
        .create_multipart_upload()
        .bucket(b3)
        .key("parts")
        .send()
        .await
        .unwrap();
    let upload = up.upload_id().unwrap();
    let part = s3[0]
        .upload_part_copy()
        .bucket(b3)
        .key("parts")
        .upload_id(upload)
        .part_number(1)
        .copy_source(format!("{b2}/k"))
        .copy_source_range("bytes=1-3")
        .send()
        .await
        .expect("a ranged part copy across primaries");
    let etag = part
        .copy_part_result()
        .unwrap()
        .e_tag()
        .unwrap()
        .to_string();
    s3[0]
        .complete_multipart_upload()
        .bucket(b3)
        .key("parts")
        .upload_id(upload)
        .multipart_upload(
            aws_sdk_s3::types::CompletedMultipartUpload::builder()
                .parts(
                    aws_sdk_s3::types::CompletedPart::builder()
                        .part_number(1)
                        .e_tag(etag)
                        .build(),
                )
                .build(),
        )
        .send()
        .await
        .unwrap();
    let got = s3[2]
        .get_object()
        .bucket(b3)
        .key("parts")
        .send()
        .await
        .unwrap();
    assert_eq!(got.body.collect().await.unwrap().into_bytes(), source[1..4]);
    // A chunked source, longer to stream than a heartbeat: copied whole, ETag the MD5.
    let big: Vec<u8> = (0..24u32 << 20).map(|i| (i % 251) as u8).collect();
    s3[1]
        .put_object()
        .bucket(b2)
        .key("big")
        .body(ByteStream::from(big.clone()))
        .send()
        .await
        .unwrap();
    let copied = s3[0]
        .copy_object()
        .bucket(b3)
        .key("big-copy")
        .copy_source(format!("{b2}/big"))
        .send()
        .await
        .expect("a 24 MiB copy across primaries");
    let md5 = format!(
        "\"{}\"",
        hex::encode(<md5::Md5 as md5::Digest>::digest(&big))
    );
    assert_eq!(
        copied.copy_object_result().unwrap().e_tag(),
        Some(md5.as_str())
    );
    let got = s3[2]
        .get_object()
        .bucket(b3)
        .key("big-copy")
        .send()
        .await
        .unwrap();
    assert!(got.body.collect().await.unwrap().into_bytes() == big);
    // Another tenant cannot name this tenant's bucket as a copy source.
    let (ak2, sk2, _) = c.tenant("other").await;
    let other = s3_client(&c.nodes[0].proc.s3, &ak2, &sk2);
    let mine = format!("mine-{}", &buckets["n3"]);
    other.create_bucket().bucket(&mine).send().await.unwrap();
    let err = other
        .copy_object()
        .bucket(&mine)
        .key("stolen")
        .copy_source(format!("{b2}/k"))
        .send()
        .await
        .expect_err("another tenant's bucket as a copy source");
    assert_eq!(err.raw_response().map(|r| r.status().as_u16()), Some(404));

    // A request that reaches a node which does not lead its bucket is never served
    // from that node's data, whatever the routing step made of it: a presigned GET with
    // a decoy Authorization header naming an unknown key is not forwarded (no tenant to
    // place it by), is authenticated by its presigned query, and refused by the
    // partition guard.
    let presigned = s3[0]
        .get_object()
        .bucket(b2)
        .key("k")
        .presigned(
            aws_sdk_s3::presigning::PresigningConfig::expires_in(Duration::from_secs(300)).unwrap(),
        )
        .await
        .unwrap();
    let decoy = reqwest::Client::new()
        .get(presigned.uri())
        .header(
            "authorization",
            "AWS4-HMAC-SHA256 Credential=NOSUCHKEY/20261127/us-east-1/s3/aws4_request, \
             SignedHeaders=host, Signature=00",
        )
        .send()
        .await
        .unwrap();
    let status = decoy.status().as_u16();
    let text = decoy.text().await.unwrap();
    assert_eq!(status, 503, "refused, not served from n1's data: {text}");
    println!("presigned GET with a decoy header through a non-primary: {status}");

    // A 1 GiB object through n1 to a bucket n2 leads and back: it streams through n1,
    // whose peak memory stays far below the object's size.
    let big_bucket = &buckets["n2"];
    let big = c.dir.path().join("big.bin");
    let mut hasher_in = Md5Sum::default();
    {
        let mut f = std::io::BufWriter::new(std::fs::File::create(&big).unwrap());
        let mut block = vec![0u8; 1 << 20];
        for i in 0..1024u32 {
            for (j, chunk) in block.chunks_mut(4).enumerate() {
                chunk.copy_from_slice(&(i.wrapping_mul(2_654_435_761) ^ j as u32).to_le_bytes());
            }
            hasher_in.update(&block);
            f.write_all(&block).unwrap();
        }
        f.flush().unwrap();
    }
    let n1_pid = c.nodes[0].proc.pid().unwrap();
    let before = peak_rss(n1_pid).unwrap();
    let started = Instant::now();
    s3[0]
        .put_object()
        .bucket(big_bucket)
        .key("big")
        .body(ByteStream::from_path(&big).await.unwrap())
        .send()
        .await
        .unwrap();
    let put_secs = started.elapsed().as_secs_f64();
    let started = Instant::now();
    let got = s3[0]
        .get_object()
        .bucket(big_bucket)
        .key("big")
        .send()
        .await
        .unwrap();
    assert_eq!(got.content_length(), Some(1 << 30));
    let mut body = got.body;
    let mut hasher_out = Md5Sum::default();
    let mut n = 0usize;
    while let Some(b) = body.try_next().await.unwrap() {
        n += b.len();
        hasher_out.update(&b);
    }
    let get_secs = started.elapsed().as_secs_f64();
    assert_eq!(n, 1 << 30);
    assert_eq!(hasher_in.finish(), hasher_out.finish(), "1 GiB round trip");
    let peak = peak_rss(n1_pid).unwrap();
    println!(
        "1 GiB through non-primary n1: PUT {put_secs:.1} s, GET {get_secs:.1} s; n1 peak RSS \
         {} MiB before, {} MiB after",
        before >> 20,
        peak >> 20
    );
    assert!(
        peak < 300 << 20,
        "the forwarding node's peak RSS is {} MiB",
        peak >> 20
    );
    std::fs::remove_file(&big).unwrap();
    // Replicated (factor 3): the primary n2 and both replicas hold the same files.
    let held: Vec<usize> = (0..3)
        .map(|i| granary_e2e::chunk_files(&c.data_dir(i)).len())
        .collect();
    assert!(
        held[1] > 0 && held.iter().all(|h| *h == held[1]),
        "{held:?}"
    );

    // n3 stops: once it is suspected, requests for what it leads fail fast with 503
    // through the other nodes, while the others' buckets keep working; it resumes and
    // its buckets are served again.
    let n3_bucket = &buckets["n3"];
    signal(&c.nodes[2].proc, "-STOP");
    // The first request may already be waiting on n3: it fails once n3 is suspected.
    eventually("503 for n3's bucket through n1", 20, || async {
        let r = tokio::time::timeout(
            Duration::from_secs(10),
            s3[0].get_object().bucket(n3_bucket).key("k").send(),
        )
        .await
        .expect("a request for a stopped primary's bucket fails once it is suspected");
        match r {
            Err(e) => {
                let status = e.raw_response().map(|r| r.status().as_u16());
                (status == Some(503)).then_some(())
            }
            Ok(_) => None,
        }
    })
    .await;
    let started = Instant::now();
    let err = s3[1]
        .get_object()
        .bucket(n3_bucket)
        .key("k")
        .send()
        .await
        .expect_err("n3 is stopped");
    assert_eq!(
        err.raw_response().map(|r| r.status().as_u16()),
        Some(503),
        "{err:?}"
    );
    assert!(started.elapsed() < Duration::from_secs(5), "fails fast");
    s3[1]
        .get_object()
        .bucket(&buckets["n1"])
        .key("k")
        .send()
        .await
        .expect("n1's bucket through n2 while n3 is stopped");
    signal(&c.nodes[2].proc, "-CONT");
    eventually("n3's bucket served again through n1", 30, || async {
        tokio::time::timeout(
            Duration::from_secs(10),
            s3[0].get_object().bucket(n3_bucket).key("k").send(),
        )
        .await
        .ok()?
        .ok()
        .map(|_| ())
    })
    .await;

    // Key rotation: a second key works through every node; revoked through n2 it is
    // refused there at once and on every node within the key cache's 5 s, while the
    // first key keeps working.
    let admin2 = Admin::new(&c.nodes[1].proc);
    let (status, v) = admin2
        .call(reqwest::Method::POST, "/tenants/acme/keys", None)
        .await
        .unwrap();
    assert_eq!(status, 201, "{v}");
    let (ak2, sk2) = (
        v["accessKeyId"].as_str().unwrap().to_string(),
        v["secretAccessKey"].as_str().unwrap().to_string(),
    );
    for m in &c.nodes {
        s3_client(&m.proc.s3, &ak2, &sk2)
            .list_buckets()
            .send()
            .await
            .expect("the new key works on every node");
    }
    let (status, v) = admin2
        .call(
            reqwest::Method::DELETE,
            &format!("/tenants/acme/keys/{ak2}"),
            None,
        )
        .await
        .unwrap();
    assert_eq!(status, 204, "{v}");
    let revoked_at = Instant::now();
    let e = s3_client(&c.nodes[1].proc.s3, &ak2, &sk2)
        .list_buckets()
        .send()
        .await
        .expect_err("refused at once where it was revoked");
    assert_eq!(
        aws_sdk_s3::error::ProvideErrorMetadata::code(&e),
        Some("InvalidAccessKeyId")
    );
    for m in &c.nodes {
        loop {
            match s3_client(&m.proc.s3, &ak2, &sk2)
                .list_buckets()
                .send()
                .await
            {
                Err(e) => {
                    assert_eq!(
                        aws_sdk_s3::error::ProvideErrorMetadata::code(&e),
                        Some("InvalidAccessKeyId"),
                        "{}: {e:?}",
                        m.id
                    );
                    break;
                }
                Ok(_) => {
                    assert!(
                        revoked_at.elapsed() < Duration::from_secs(7),
                        "{}: the revoked key still works after {:?}",
                        m.id,
                        revoked_at.elapsed()
                    );
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
            }
        }
    }
    println!(
        "revoked key refused everywhere {:?} after the revocation",
        revoked_at.elapsed()
    );
    for s in &s3 {
        s.list_buckets()
            .send()
            .await
            .expect("the first key still works");
    }

    // A purge through n2 removes the tenant's data on every node.
    let (status, v) = Admin::new(&c.nodes[1].proc)
        .call(reqwest::Method::DELETE, "/tenants/acme?purge=true", None)
        .await
        .unwrap();
    assert_eq!(status, 204, "{v}");
    for m in &c.nodes {
        let (s, _) = Admin::new(&m.proc)
            .call(reqwest::Method::GET, "/tenants/acme", None)
            .await
            .unwrap();
        assert_eq!(s, 404);
    }
    // Its data is gone from the primary and its replicas too: the 1 GiB object's chunk
    // files are removed everywhere (after the grace period for reads in flight).
    eventually(
        "the purged object's chunk files removed on every node",
        30,
        || async {
            (0..3)
                .all(|i| granary_e2e::chunk_files(&c.data_dir(i)).is_empty())
                .then_some(())
        },
    )
    .await;
}

/// A streaming MD5 (the e2e crate has md-5 as a dev-dependency).
#[derive(Default)]
struct Md5Sum(md5::Md5);

impl Md5Sum {
    fn update(&mut self, b: &[u8]) {
        use md5::Digest;
        self.0.update(b);
    }
    fn finish(self) -> Vec<u8> {
        use md5::Digest;
        self.0.finalize().to_vec()
    }
}

/// A request forwarded to its partition's primary is one trace: the primary's span
/// continues the forwarding node's, which continues the client's `traceparent`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forwarded_request_is_one_trace_across_nodes() {
    let (port, got) = granary_e2e::otlp::collector_on("0.0.0.0");
    let c = TestCluster::start(
        2,
        Settings {
            partitions: 16,
            replication_factor: 2,
            otlp_port: Some(port),
            ..Settings::default()
        },
    )
    .unwrap();
    let layout = c.wait_ready().await;
    let (ak, sk, id) = c.tenant("acme").await;
    let tenant: TenantId = id.parse().unwrap();
    // A namespace n2 leads, asked through n1.
    let ns = (0..)
        .map(|i| format!("tr-{i}"))
        .find(|ns| {
            let p = PartitionId::of(tenant, format!("kv:{ns}").as_bytes(), 16);
            layout["actingPrimaries"][p.0 as usize] == "n2"
        })
        .unwrap();
    let trace_id = "4bf92f3577b34da6a3ce929d0e0e4736";
    let kv = KvClient::new(&c.nodes[0].proc.kv, &ak, &sk);
    // Retried (same value, same trace) while a 5xx says the write could not be confirmed:
    // once in a fresh-clone CI run the first write just after the cluster formed was
    // answered 500 under load (its body is printed, to tell why).
    let mut status = 0;
    for _ in 0..5 {
        let r = kv
            .send(
                "PUT",
                &format!("/kv/v1/{ns}/k"),
                &[("traceparent", &format!("00-{trace_id}-00f067aa0ba902b7-01"))],
                b"traced".to_vec(),
            )
            .await
            .unwrap();
        status = r.status().as_u16();
        if status < 500 {
            break;
        }
        println!(
            "PUT answered {status}: {}",
            r.text().await.unwrap_or_default()
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    assert_eq!(status, 200);
    // The primary's span (forwarded = true) is exported in the client's trace.
    let id: Vec<u8> = (0..16)
        .map(|i| u8::from_str_radix(&trace_id[2 * i..2 * i + 2], 16).unwrap())
        .collect();
    let forwarded_true: &[u8] = b"\x0a\x09forwarded\x12\x02\x10\x01";
    eventually("the primary's span in the client's trace", 30, || async {
        granary_e2e::otlp::one_export_contains(&got, &[&id, forwarded_true]).then_some(())
    })
    .await;
    // And the forwarding node's span too (it names the primary it forwarded to), whose
    // parent is the client's span ...
    let primary_n2: &[u8] = b"\x0a\x07primary\x12\x04\x0a\x02n2";
    let client_parent: &[u8] = b"\x22\x08\x00\xf0\x67\xaa\x0b\xa9\x02\xb7";
    eventually(
        "the forwarding node's span in the client's trace",
        30,
        || async {
            granary_e2e::otlp::one_export_contains(&got, &[&id, primary_n2, client_parent])
                .then_some(())
        },
    )
    .await;
    // ... while the primary's span is the forwarding span's child, not the client's.
    assert!(!granary_e2e::otlp::one_export_contains(
        &got,
        &[forwarded_true, client_parent]
    ));
}

/// Backpressure: a node forwards at most `max_forwards_per_peer` requests to one peer at
/// once (each counted until its answer has streamed back); more are refused at once with
/// 503 SlowDown, nothing sent, and served again when slots free up. Other peers are not
/// affected.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forwards_to_one_peer_are_bounded() {
    let c = TestCluster::start(
        3,
        Settings {
            partitions: PARTITIONS,
            extra_config: "max_forwards_per_peer = 2".into(),
            ..Settings::default()
        },
    )
    .unwrap();
    let layout = c.wait_ready().await;
    let (ak, sk, id) = c.tenant("acme").await;
    let tenant: TenantId = id.parse().unwrap();
    let led_by = |node: &str| {
        (0..)
            .map(|i| format!("bp-{i}"))
            .find(|b| {
                let p = PartitionId::of(tenant, b.as_bytes(), PARTITIONS);
                layout["actingPrimaries"][p.0 as usize] == node
            })
            .unwrap()
    };
    let (on_n3, on_n2) = (led_by("n3"), led_by("n2"));
    let via_n1 = s3_client(&c.nodes[0].proc.s3, &ak, &sk);
    for b in [&on_n3, &on_n2] {
        via_n1.create_bucket().bucket(b).send().await.unwrap();
        via_n1
            .put_object()
            .bucket(b)
            .key("big")
            .body(ByteStream::from(vec![7u8; 32 << 20]))
            .send()
            .await
            .unwrap();
    }

    // Two GETs through n1 of n3's object, their bodies left unread: both slots to n3
    // stay taken while the answers wait to stream.
    let mut held = Vec::new();
    for _ in 0..2 {
        held.push(
            via_n1
                .get_object()
                .bucket(&on_n3)
                .key("big")
                .send()
                .await
                .unwrap(),
        );
    }
    let refused = via_n1
        .head_object()
        .bucket(&on_n3)
        .key("big")
        .send()
        .await
        .unwrap_err();
    let raw = refused.raw_response().unwrap();
    assert_eq!(raw.status().as_u16(), 503);
    let page = c.nodes[0].proc.metrics().await.unwrap();
    assert!(
        metric(
            &page,
            "granary_forwarded_requests_total{front=\"s3\",outcome=\"busy\"}"
        ) >= 1.0,
        "{page}"
    );
    // A SigV4 GET with a raw client shows the S3 error code.
    let mut raw_s3 = KvClient::new(&c.nodes[0].proc.s3, &ak, &sk);
    raw_s3.service = "s3";
    let r = raw_s3
        .send("GET", &format!("/{on_n3}/big"), &[], vec![])
        .await
        .unwrap();
    assert_eq!(r.status(), 503);
    assert!(r.text().await.unwrap().contains("<Code>SlowDown</Code>"));
    // n2's bucket is not affected.
    via_n1
        .head_object()
        .bucket(&on_n2)
        .key("big")
        .send()
        .await
        .unwrap();

    // The held answers are read to the end: their slots free up and n3's bucket is
    // served through n1 again.
    for o in held {
        assert_eq!(o.body.collect().await.unwrap().into_bytes().len(), 32 << 20);
    }
    eventually("n3's bucket served through n1 again", 10, || async {
        via_n1
            .head_object()
            .bucket(&on_n3)
            .key("big")
            .send()
            .await
            .ok()
    })
    .await;
}
