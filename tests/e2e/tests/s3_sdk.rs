//! Every S3 operation Granary supports, driven by the AWS SDK for Rust against a real
//! `granary-node` process.

use std::time::Duration;

use aws_sdk_s3::Client;
use aws_sdk_s3::presigning::PresigningConfig;
use aws_sdk_s3::primitives::ByteStream;
use aws_sdk_s3::types::{
    CompletedMultipartUpload, CompletedPart, Delete, MetadataDirective, ObjectIdentifier,
};
use granary_e2e::NodeProc;

use granary_e2e::s3_client as client;

fn code<E: aws_sdk_s3::error::ProvideErrorMetadata>(e: &aws_sdk_s3::error::SdkError<E>) -> String {
    e.as_service_error()
        .and_then(|s| s.code())
        .unwrap_or("<no code>")
        .to_string()
}

fn status<E>(e: &aws_sdk_s3::error::SdkError<E, aws_sdk_s3::config::http::HttpResponse>) -> u16 {
    e.raw_response().map(|r| r.status().as_u16()).unwrap_or(0)
}

fn data(n: usize, seed: u8) -> Vec<u8> {
    (0..n)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}

async fn get_bytes(c: &Client, b: &str, k: &str) -> Vec<u8> {
    let o = c.get_object().bucket(b).key(k).send().await.expect("get");
    o.body.collect().await.expect("body").into_bytes().to_vec()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s3_operations_with_the_aws_sdk() {
    let dir = tempfile::tempdir().unwrap();
    let node = NodeProc::start(dir.path()).unwrap();
    let c = client(&node.s3, &node.access_key, &node.secret_key);

    // Buckets.
    c.create_bucket().bucket("photos").send().await.unwrap();
    let e = c.create_bucket().bucket("photos").send().await.unwrap_err();
    assert_eq!(code(&e), "BucketAlreadyOwnedByYou");
    let e = c
        .create_bucket()
        .bucket("Bad_Name")
        .send()
        .await
        .unwrap_err();
    assert_eq!(code(&e), "InvalidBucketName");
    c.head_bucket().bucket("photos").send().await.unwrap();
    let e = c.head_bucket().bucket("missing").send().await.unwrap_err();
    assert_eq!(status(&e), 404);
    let names: Vec<_> = c
        .list_buckets()
        .send()
        .await
        .unwrap()
        .buckets()
        .iter()
        .filter_map(|b| b.name().map(str::to_string))
        .collect();
    assert_eq!(names, ["photos"]);
    c.get_bucket_location()
        .bucket("photos")
        .send()
        .await
        .unwrap();

    // Put and get with metadata and headers.
    let body = data(100_000, 1);
    let put = c
        .put_object()
        .bucket("photos")
        .key("a/b/c.bin")
        .body(ByteStream::from(body.clone()))
        .content_type("application/x-test")
        .cache_control("max-age=60")
        .content_disposition("attachment")
        .content_encoding("identity")
        .metadata("owner", "alice")
        .send()
        .await
        .unwrap();
    let etag = put.e_tag().unwrap().to_string();
    assert_eq!(
        etag.trim_matches('"'),
        format!("{:x}", md5::Md5::digest(&body))
    );
    let got = c
        .get_object()
        .bucket("photos")
        .key("a/b/c.bin")
        .send()
        .await
        .unwrap();
    assert_eq!(got.content_type(), Some("application/x-test"));
    assert_eq!(got.cache_control(), Some("max-age=60"));
    assert_eq!(got.content_disposition(), Some("attachment"));
    assert_eq!(
        got.metadata().unwrap().get("owner").map(String::as_str),
        Some("alice")
    );
    assert_eq!(
        got.body.collect().await.unwrap().into_bytes().to_vec(),
        body
    );
    let head = c
        .head_object()
        .bucket("photos")
        .key("a/b/c.bin")
        .send()
        .await
        .unwrap();
    assert_eq!(head.content_length(), Some(100_000));
    assert_eq!(head.e_tag(), Some(etag.as_str()));
    let e = c
        .get_object()
        .bucket("photos")
        .key("nope")
        .send()
        .await
        .unwrap_err();
    assert_eq!(code(&e), "NoSuchKey");
    let e = c
        .get_object()
        .bucket("missing")
        .key("x")
        .send()
        .await
        .unwrap_err();
    assert_eq!(code(&e), "NoSuchBucket");

    // Ranges.
    let r = c
        .get_object()
        .bucket("photos")
        .key("a/b/c.bin")
        .range("bytes=10-19")
        .send()
        .await
        .unwrap();
    assert_eq!(r.content_range(), Some("bytes 10-19/100000"));
    assert_eq!(
        r.body.collect().await.unwrap().into_bytes().to_vec(),
        &body[10..20]
    );
    let r = c
        .get_object()
        .bucket("photos")
        .key("a/b/c.bin")
        .range("bytes=-5")
        .send()
        .await
        .unwrap();
    assert_eq!(
        r.body.collect().await.unwrap().into_bytes().to_vec(),
        &body[99_995..]
    );
    let e = c
        .get_object()
        .bucket("photos")
        .key("a/b/c.bin")
        .range("bytes=200000-")
        .send()
        .await
        .unwrap_err();
    assert_eq!(code(&e), "InvalidRange");

    // Conditional reads.
    c.get_object()
        .bucket("photos")
        .key("a/b/c.bin")
        .if_match(&etag)
        .send()
        .await
        .unwrap();
    let e = c
        .get_object()
        .bucket("photos")
        .key("a/b/c.bin")
        .if_match("\"abc\"")
        .send()
        .await
        .unwrap_err();
    assert_eq!(status(&e), 412);
    let e = c
        .get_object()
        .bucket("photos")
        .key("a/b/c.bin")
        .if_none_match(&etag)
        .send()
        .await
        .unwrap_err();
    assert_eq!(status(&e), 304);
    let future = aws_sdk_s3::primitives::DateTime::from_secs(4_000_000_000);
    let past = aws_sdk_s3::primitives::DateTime::from_secs(1_000_000_000);
    let e = c
        .get_object()
        .bucket("photos")
        .key("a/b/c.bin")
        .if_modified_since(future)
        .send()
        .await
        .unwrap_err();
    assert_eq!(status(&e), 304);
    c.get_object()
        .bucket("photos")
        .key("a/b/c.bin")
        .if_modified_since(past)
        .send()
        .await
        .unwrap();
    let e = c
        .get_object()
        .bucket("photos")
        .key("a/b/c.bin")
        .if_unmodified_since(past)
        .send()
        .await
        .unwrap_err();
    assert_eq!(status(&e), 412);

    // Conditional create.
    c.put_object()
        .bucket("photos")
        .key("once")
        .if_none_match("*")
        .body(ByteStream::from_static(b"1"))
        .send()
        .await
        .unwrap();
    let e = c
        .put_object()
        .bucket("photos")
        .key("once")
        .if_none_match("*")
        .body(ByteStream::from_static(b"2"))
        .send()
        .await
        .unwrap_err();
    assert_eq!(status(&e), 412);
    assert_eq!(get_bytes(&c, "photos", "once").await, b"1");

    // Copy: metadata copied, or replaced.
    c.copy_object()
        .bucket("photos")
        .key("copy1")
        .copy_source("photos/a/b/c.bin")
        .send()
        .await
        .unwrap();
    let h = c
        .head_object()
        .bucket("photos")
        .key("copy1")
        .send()
        .await
        .unwrap();
    assert_eq!(
        h.metadata().unwrap().get("owner").map(String::as_str),
        Some("alice")
    );
    assert_eq!(h.content_type(), Some("application/x-test"));
    c.copy_object()
        .bucket("photos")
        .key("copy2")
        .copy_source("photos/a/b/c.bin")
        .metadata_directive(MetadataDirective::Replace)
        .metadata("owner", "bob")
        .content_type("text/plain")
        .send()
        .await
        .unwrap();
    let h = c
        .head_object()
        .bucket("photos")
        .key("copy2")
        .send()
        .await
        .unwrap();
    assert_eq!(
        h.metadata().unwrap().get("owner").map(String::as_str),
        Some("bob")
    );
    assert_eq!(h.content_type(), Some("text/plain"));
    assert_eq!(get_bytes(&c, "photos", "copy2").await, body);

    // Listings: prefix, delimiter, pagination, start-after, V1 marker.
    for k in ["list/a", "list/b/1", "list/b/2", "list/c", "list/d/1"] {
        c.put_object()
            .bucket("photos")
            .key(k)
            .body(ByteStream::from_static(b"x"))
            .send()
            .await
            .unwrap();
    }
    let l = c
        .list_objects_v2()
        .bucket("photos")
        .prefix("list/")
        .delimiter("/")
        .send()
        .await
        .unwrap();
    let keys: Vec<_> = l.contents().iter().filter_map(|o| o.key()).collect();
    let cps: Vec<_> = l
        .common_prefixes()
        .iter()
        .filter_map(|p| p.prefix())
        .collect();
    assert_eq!(keys, ["list/a", "list/c"]);
    assert_eq!(cps, ["list/b/", "list/d/"]);
    let mut all = Vec::new();
    let mut token = None;
    loop {
        let l = c
            .list_objects_v2()
            .bucket("photos")
            .prefix("list/")
            .max_keys(2)
            .set_continuation_token(token)
            .send()
            .await
            .unwrap();
        all.extend(
            l.contents()
                .iter()
                .filter_map(|o| o.key().map(str::to_string)),
        );
        if l.is_truncated() != Some(true) {
            break;
        }
        token = l.next_continuation_token().map(str::to_string);
    }
    assert_eq!(
        all,
        ["list/a", "list/b/1", "list/b/2", "list/c", "list/d/1"]
    );
    let l = c
        .list_objects_v2()
        .bucket("photos")
        .prefix("list/")
        .start_after("list/b/2")
        .send()
        .await
        .unwrap();
    assert_eq!(
        l.contents()
            .iter()
            .filter_map(|o| o.key())
            .collect::<Vec<_>>(),
        ["list/c", "list/d/1"]
    );
    let l = c
        .list_objects()
        .bucket("photos")
        .prefix("list/")
        .marker("list/b/1")
        .max_keys(2)
        .send()
        .await
        .unwrap();
    assert_eq!(
        l.contents()
            .iter()
            .filter_map(|o| o.key())
            .collect::<Vec<_>>(),
        ["list/b/2", "list/c"]
    );
    assert_eq!(l.is_truncated(), Some(true));

    // DeleteObjects.
    let ids = ["list/a", "list/c", "never-existed"]
        .map(|k| ObjectIdentifier::builder().key(k).build().unwrap());
    let d = c
        .delete_objects()
        .bucket("photos")
        .delete(
            Delete::builder()
                .set_objects(Some(ids.to_vec()))
                .build()
                .unwrap(),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(d.deleted().len(), 3);
    let e = c
        .get_object()
        .bucket("photos")
        .key("list/a")
        .send()
        .await
        .unwrap_err();
    assert_eq!(code(&e), "NoSuchKey");
    c.delete_object()
        .bucket("photos")
        .key("list/b/1")
        .send()
        .await
        .unwrap();

    // Multipart: 3 parts of 5 MiB + a tail, one part copied.
    let part = 5 * 1024 * 1024;
    let big: Vec<u8> = data(3 * part + 1234, 7);
    let up = c
        .create_multipart_upload()
        .bucket("photos")
        .key("big")
        .content_type("video/mp4")
        .metadata("k", "v")
        .send()
        .await
        .unwrap();
    let uid = up.upload_id().unwrap().to_string();
    let mut done = Vec::new();
    for (i, chunk) in big.chunks(part).enumerate() {
        let n = i as i32 + 1;
        let r = c
            .upload_part()
            .bucket("photos")
            .key("big")
            .upload_id(&uid)
            .part_number(n)
            .body(ByteStream::from(chunk.to_vec()))
            .send()
            .await
            .unwrap();
        done.push(
            CompletedPart::builder()
                .part_number(n)
                .e_tag(r.e_tag().unwrap())
                .build(),
        );
    }
    let ups = c
        .list_multipart_uploads()
        .bucket("photos")
        .send()
        .await
        .unwrap();
    assert_eq!(ups.uploads().len(), 1);
    assert_eq!(ups.uploads()[0].upload_id(), Some(uid.as_str()));
    let parts = c
        .list_parts()
        .bucket("photos")
        .key("big")
        .upload_id(&uid)
        .send()
        .await
        .unwrap();
    assert_eq!(parts.parts().len(), 4);
    assert_eq!(parts.parts()[0].size(), Some(part as i64));
    // Wrong order, wrong ETag, too-small part: all refused, upload intact.
    let mut bad = done.clone();
    bad.swap(0, 1);
    let e = c
        .complete_multipart_upload()
        .bucket("photos")
        .key("big")
        .upload_id(&uid)
        .multipart_upload(
            CompletedMultipartUpload::builder()
                .set_parts(Some(bad))
                .build(),
        )
        .send()
        .await
        .unwrap_err();
    assert_eq!(code(&e), "InvalidPartOrder");
    let mut bad = done.clone();
    bad[1] = CompletedPart::builder()
        .part_number(2)
        .e_tag("\"00000000000000000000000000000000\"")
        .build();
    let e = c
        .complete_multipart_upload()
        .bucket("photos")
        .key("big")
        .upload_id(&uid)
        .multipart_upload(
            CompletedMultipartUpload::builder()
                .set_parts(Some(bad))
                .build(),
        )
        .send()
        .await
        .unwrap_err();
    assert_eq!(code(&e), "InvalidPart");
    // Part 4 is the 1234-byte tail: not allowed anywhere but last.
    let bad = vec![
        CompletedPart::builder()
            .part_number(4)
            .e_tag(done[3].e_tag().unwrap())
            .build(),
        CompletedPart::builder()
            .part_number(5)
            .e_tag(done[0].e_tag().unwrap())
            .build(),
    ];
    let e = c
        .complete_multipart_upload()
        .bucket("photos")
        .key("big")
        .upload_id(&uid)
        .multipart_upload(
            CompletedMultipartUpload::builder()
                .set_parts(Some(bad))
                .build(),
        )
        .send()
        .await
        .unwrap_err();
    assert_eq!(code(&e), "EntityTooSmall");
    let fin = c
        .complete_multipart_upload()
        .bucket("photos")
        .key("big")
        .upload_id(&uid)
        .multipart_upload(
            CompletedMultipartUpload::builder()
                .set_parts(Some(done.clone()))
                .build(),
        )
        .send()
        .await
        .unwrap();
    assert!(fin.e_tag().unwrap().ends_with("-4\""), "{:?}", fin.e_tag());
    assert_eq!(get_bytes(&c, "photos", "big").await, big);
    let h = c
        .head_object()
        .bucket("photos")
        .key("big")
        .send()
        .await
        .unwrap();
    assert_eq!(h.content_type(), Some("video/mp4"));
    assert_eq!(h.parts_count(), Some(4));
    let r = c
        .get_object()
        .bucket("photos")
        .key("big")
        .range(format!("bytes={}-{}", part - 10, part + 10))
        .send()
        .await
        .unwrap();
    assert_eq!(
        r.body.collect().await.unwrap().into_bytes().to_vec(),
        &big[part - 10..=part + 10]
    );
    let e = c
        .list_parts()
        .bucket("photos")
        .key("big")
        .upload_id(&uid)
        .send()
        .await
        .unwrap_err();
    assert_eq!(code(&e), "NoSuchUpload");

    // UploadPartCopy and Abort.
    let up = c
        .create_multipart_upload()
        .bucket("photos")
        .key("copied")
        .send()
        .await
        .unwrap();
    let uid2 = up.upload_id().unwrap().to_string();
    let p1 = c
        .upload_part_copy()
        .bucket("photos")
        .key("copied")
        .upload_id(&uid2)
        .part_number(1)
        .copy_source("photos/big")
        .copy_source_range(format!("bytes=0-{}", part - 1))
        .send()
        .await
        .unwrap();
    let p2 = c
        .upload_part_copy()
        .bucket("photos")
        .key("copied")
        .upload_id(&uid2)
        .part_number(2)
        .copy_source("photos/a/b/c.bin")
        .send()
        .await
        .unwrap();
    let parts = vec![
        CompletedPart::builder()
            .part_number(1)
            .e_tag(p1.copy_part_result().unwrap().e_tag().unwrap())
            .build(),
        CompletedPart::builder()
            .part_number(2)
            .e_tag(p2.copy_part_result().unwrap().e_tag().unwrap())
            .build(),
    ];
    c.complete_multipart_upload()
        .bucket("photos")
        .key("copied")
        .upload_id(&uid2)
        .multipart_upload(
            CompletedMultipartUpload::builder()
                .set_parts(Some(parts))
                .build(),
        )
        .send()
        .await
        .unwrap();
    let mut expect = big[..part].to_vec();
    expect.extend_from_slice(&body);
    assert_eq!(get_bytes(&c, "photos", "copied").await, expect);
    let up = c
        .create_multipart_upload()
        .bucket("photos")
        .key("aborted")
        .send()
        .await
        .unwrap();
    let uid3 = up.upload_id().unwrap().to_string();
    c.upload_part()
        .bucket("photos")
        .key("aborted")
        .upload_id(&uid3)
        .part_number(1)
        .body(ByteStream::from_static(b"zz"))
        .send()
        .await
        .unwrap();
    c.abort_multipart_upload()
        .bucket("photos")
        .key("aborted")
        .upload_id(&uid3)
        .send()
        .await
        .unwrap();
    let e = c
        .abort_multipart_upload()
        .bucket("photos")
        .key("aborted")
        .upload_id(&uid3)
        .send()
        .await
        .unwrap_err();
    assert_eq!(code(&e), "NoSuchUpload");

    // Presigned GET and PUT, and an expired presigned URL.
    let http = reqwest::Client::new();
    let pre = c
        .get_object()
        .bucket("photos")
        .key("once")
        .presigned(PresigningConfig::expires_in(Duration::from_secs(300)).unwrap())
        .await
        .unwrap();
    let r = http.get(pre.uri()).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.bytes().await.unwrap().as_ref(), b"1");
    let pre = c
        .put_object()
        .bucket("photos")
        .key("presigned-put")
        .presigned(PresigningConfig::expires_in(Duration::from_secs(300)).unwrap())
        .await
        .unwrap();
    let r = http
        .put(pre.uri())
        .body("via presigned url")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200, "{:?}", r.text().await);
    assert_eq!(
        get_bytes(&c, "photos", "presigned-put").await,
        b"via presigned url"
    );
    let old = PresigningConfig::builder()
        .start_time(std::time::SystemTime::now() - Duration::from_secs(3600))
        .expires_in(Duration::from_secs(60))
        .build()
        .unwrap();
    let pre = c
        .get_object()
        .bucket("photos")
        .key("once")
        .presigned(old)
        .await
        .unwrap();
    let r = http.get(pre.uri()).send().await.unwrap();
    assert_eq!(r.status(), 403);
    assert!(
        r.text()
            .await
            .unwrap()
            .contains("<Code>AccessDenied</Code>")
    );

    // Streaming upload of unknown length (aws-chunked with a trailing checksum).
    let stream_body = data(3 * 1024 * 1024 + 5, 9);
    let tmp = dir.path().join("upload.bin");
    std::fs::write(&tmp, &stream_body).unwrap();
    c.put_object()
        .bucket("photos")
        .key("streamed")
        .body(ByteStream::from_path(&tmp).await.unwrap())
        .send()
        .await
        .unwrap();
    assert_eq!(get_bytes(&c, "photos", "streamed").await, stream_body);

    // Empty objects and deletion of the bucket once empty.
    c.put_object()
        .bucket("photos")
        .key("empty")
        .body(ByteStream::from_static(b""))
        .send()
        .await
        .unwrap();
    assert_eq!(get_bytes(&c, "photos", "empty").await, b"");
    let mut token = None;
    loop {
        let l = c
            .list_objects_v2()
            .bucket("photos")
            .set_continuation_token(token)
            .send()
            .await
            .unwrap();
        for o in l.contents() {
            c.delete_object()
                .bucket("photos")
                .key(o.key().unwrap())
                .send()
                .await
                .unwrap();
        }
        if l.is_truncated() != Some(true) {
            break;
        }
        token = l.next_continuation_token().map(str::to_string);
    }
    c.delete_bucket().bucket("photos").send().await.unwrap();
    let e = c.head_bucket().bucket("photos").send().await.unwrap_err();
    assert_eq!(status(&e), 404);
}

use md5::Digest as _;

/// ListMultipartUploads pages through many uploads with the SDK's markers: every
/// upload once, ordered by key then initiation time, `max-uploads` respected.
#[tokio::test]
async fn multipart_uploads_page_with_markers() {
    let dir = tempfile::tempdir().unwrap();
    let node = granary_e2e::NodeProc::start(dir.path()).unwrap();
    let c = granary_e2e::s3_client(&node.s3, &node.access_key, &node.secret_key);
    c.create_bucket().bucket("pages").send().await.unwrap();
    let mut made = Vec::new();
    for i in 0..23 {
        let key = format!("k/{}", i % 5);
        let id = c
            .create_multipart_upload()
            .bucket("pages")
            .key(&key)
            .send()
            .await
            .unwrap()
            .upload_id
            .unwrap();
        made.push((key, id));
    }
    let mut listed: Vec<(String, String)> = Vec::new();
    let mut initiated: Vec<i64> = Vec::new();
    let (mut key_marker, mut id_marker): (Option<String>, Option<String>) = (None, None);
    loop {
        let page = c
            .list_multipart_uploads()
            .bucket("pages")
            .prefix("k/")
            .max_uploads(4)
            .set_key_marker(key_marker.clone())
            .set_upload_id_marker(id_marker.clone())
            .send()
            .await
            .unwrap();
        let ups = page.uploads();
        assert!(ups.len() <= 4);
        for u in ups {
            listed.push((u.key().unwrap().into(), u.upload_id().unwrap().into()));
            initiated.push(u.initiated().unwrap().secs());
        }
        if !page.is_truncated().unwrap_or(false) {
            break;
        }
        key_marker = page.next_key_marker().map(str::to_string);
        id_marker = page.next_upload_id_marker().map(str::to_string);
    }
    assert_eq!(listed.len(), made.len());
    let keys: Vec<&String> = listed.iter().map(|(k, _)| k).collect();
    let mut sorted = keys.clone();
    sorted.sort();
    assert_eq!(keys, sorted, "ordered by key");
    let mut a: Vec<_> = listed.iter().map(|(_, id)| id.clone()).collect();
    let mut b: Vec<_> = made.iter().map(|(_, id)| id.clone()).collect();
    a.sort();
    b.sort();
    assert_eq!(a, b, "every upload exactly once");
    // Within one key, uploads come in initiation order.
    for i in 1..listed.len() {
        if listed[i - 1].0 == listed[i].0 {
            assert!(
                initiated[i] >= initiated[i - 1],
                "order within {}",
                listed[i].0
            );
        }
    }
}

/// The AWS SDK for Rust with its default checksum settings (a CRC32 of every upload,
/// sent in an `aws-chunked` trailer when the body streams; checksum validation of
/// reads), and with CRC64NVME: uploads are verified and stored, reads with checksum
/// mode return the checksum and the SDK validates the bytes against it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flexible_checksums_with_the_sdk_defaults() {
    use aws_sdk_s3::types::{ChecksumAlgorithm, ChecksumMode};
    let dir = tempfile::tempdir().unwrap();
    let node = NodeProc::start(dir.path()).unwrap();
    let c = client(&node.s3, &node.access_key, &node.secret_key);
    c.create_bucket().bucket("sums").send().await.unwrap();
    let body = data(3 << 20, 5);
    let put = c
        .put_object()
        .bucket("sums")
        .key("a")
        .body(ByteStream::from(body.clone()))
        .send()
        .await
        .unwrap();
    let crc = put
        .checksum_crc32()
        .expect("the SDK's default CRC32 is stored")
        .to_string();
    let got = c
        .get_object()
        .bucket("sums")
        .key("a")
        .checksum_mode(ChecksumMode::Enabled)
        .send()
        .await
        .unwrap();
    assert_eq!(got.checksum_crc32(), Some(crc.as_str()));
    assert_eq!(
        got.body.collect().await.unwrap().into_bytes().to_vec(),
        body
    );

    // A streamed body (from a file): the CRC32 travels in a trailer.
    let path = dir.path().join("upload.bin");
    std::fs::write(&path, &body).unwrap();
    let put = c
        .put_object()
        .bucket("sums")
        .key("from-file")
        .body(ByteStream::from_path(&path).await.unwrap())
        .send()
        .await
        .unwrap();
    assert_eq!(put.checksum_crc32(), Some(crc.as_str()));

    // CRC64NVME, single part and multipart (FULL_OBJECT by default).
    c.put_object()
        .bucket("sums")
        .key("one")
        .checksum_algorithm(ChecksumAlgorithm::Crc64Nvme)
        .body(ByteStream::from(body.clone()))
        .send()
        .await
        .unwrap()
        .checksum_crc64_nvme()
        .expect("stored");
    let up = c
        .create_multipart_upload()
        .bucket("sums")
        .key("mp")
        .checksum_algorithm(ChecksumAlgorithm::Crc64Nvme)
        .send()
        .await
        .unwrap();
    let uid = up.upload_id().unwrap();
    let big = [body.clone(), body.clone()].concat();
    let mut done = Vec::new();
    for (n, range) in [(1, 0..(5 << 20)), (2, (5 << 20)..big.len())] {
        let p = c
            .upload_part()
            .bucket("sums")
            .key("mp")
            .upload_id(uid)
            .part_number(n)
            .checksum_algorithm(ChecksumAlgorithm::Crc64Nvme)
            .body(ByteStream::from(big[range].to_vec()))
            .send()
            .await
            .unwrap();
        done.push(
            CompletedPart::builder()
                .part_number(n)
                .e_tag(p.e_tag().unwrap())
                .checksum_crc64_nvme(p.checksum_crc64_nvme().unwrap())
                .build(),
        );
    }
    let fin = c
        .complete_multipart_upload()
        .bucket("sums")
        .key("mp")
        .upload_id(uid)
        .multipart_upload(
            CompletedMultipartUpload::builder()
                .set_parts(Some(done))
                .build(),
        )
        .send()
        .await
        .unwrap();
    let single_big = c
        .put_object()
        .bucket("sums")
        .key("big-one")
        .checksum_algorithm(ChecksumAlgorithm::Crc64Nvme)
        .body(ByteStream::from(big.clone()))
        .send()
        .await
        .unwrap();
    assert_eq!(
        fin.checksum_crc64_nvme(),
        single_big.checksum_crc64_nvme(),
        "the parts' CRC64NVMEs combine into the whole object's"
    );
    let got = c
        .get_object()
        .bucket("sums")
        .key("mp")
        .checksum_mode(ChecksumMode::Enabled)
        .send()
        .await
        .unwrap();
    assert_eq!(got.checksum_crc64_nvme(), fin.checksum_crc64_nvme());
    assert_eq!(
        got.body.collect().await.unwrap().into_bytes().len(),
        big.len()
    );

    // A wrong checksum is refused and stores nothing.
    let e = c
        .put_object()
        .bucket("sums")
        .key("bad")
        .checksum_crc32("AAAAAA==")
        .body(ByteStream::from(body.clone()))
        .send()
        .await
        .unwrap_err();
    assert_eq!(code(&e), "BadDigest", "{e:?}");
    let e = c
        .head_object()
        .bucket("sums")
        .key("bad")
        .send()
        .await
        .unwrap_err();
    assert_eq!(status(&e), 404);
}
