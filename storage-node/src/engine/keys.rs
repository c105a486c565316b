//! Byte layout of engine keys. Every key starts with its partition (big-endian), so a
//! partition is one contiguous range of each table: it can be snapshotted, streamed and
//! dropped as a unit.

use crate::types::{BucketId, PartitionId, TenantId, UploadId};

pub fn partition_prefix(p: PartitionId) -> Vec<u8> {
    p.0.to_be_bytes().to_vec()
}

/// Length of [`bucket_prefix`]: partition (2) and bucket id (16).
pub const BUCKET_PREFIX_LEN: usize = 18;

/// Prefix of every object and upload of a bucket incarnation.
pub fn bucket_prefix(p: PartitionId, bucket: BucketId) -> Vec<u8> {
    let mut k = Vec::with_capacity(BUCKET_PREFIX_LEN);
    k.extend_from_slice(&p.0.to_be_bytes());
    k.extend_from_slice(bucket.as_bytes());
    k
}

pub fn object_key(p: PartitionId, bucket: BucketId, key: &str) -> Vec<u8> {
    let mut k = bucket_prefix(p, bucket);
    k.extend_from_slice(key.as_bytes());
    k
}

pub fn upload_key(p: PartitionId, bucket: BucketId, upload: UploadId) -> Vec<u8> {
    let mut k = bucket_prefix(p, bucket);
    k.extend_from_slice(upload.as_bytes());
    k
}

pub fn part_key(p: PartitionId, bucket: BucketId, upload: UploadId, part: u32) -> Vec<u8> {
    let mut k = upload_key(p, bucket, upload);
    k.extend_from_slice(&part.to_be_bytes());
    k
}

/// Appends `key` so that the result sorts like `key` and no escaped key is a prefix of
/// another: 0x00 becomes 0x00 0xFF, and 0x00 0x00 ends it.
fn push_escaped(out: &mut Vec<u8>, key: &[u8], terminate: bool) {
    for &b in key {
        out.push(b);
        if b == 0 {
            out.push(0xff);
        }
    }
    if terminate {
        out.extend_from_slice(&[0, 0]);
    }
}

/// Entry of the uploads-by-key index: `bucket prefix | escaped object key | initiated
/// ms (8, big-endian) | upload id (16)`.
/// `upload_key` is the upload's record key ([`upload_key`]: bucket prefix | upload id).
pub fn upload_index_key(upload_key: &[u8], key: &str, initiated: i64) -> Vec<u8> {
    let (bucket, id) = upload_key.split_at(upload_key.len().min(BUCKET_PREFIX_LEN));
    let mut k = bucket.to_vec();
    push_escaped(&mut k, key.as_bytes(), true);
    k.extend_from_slice(&(initiated.max(0) as u64).to_be_bytes());
    k.extend_from_slice(id);
    k
}

/// Where the uploads-by-key index entries of keys starting with `prefix` begin.
pub fn upload_index_prefix(bucket_prefix: &[u8], prefix: &str) -> Vec<u8> {
    let mut k = bucket_prefix.to_vec();
    push_escaped(&mut k, prefix.as_bytes(), false);
    k
}

/// The smallest index entry after every entry of object key `key`.
pub fn upload_index_after_key(bucket_prefix: &[u8], key: &str) -> Vec<u8> {
    let mut k = bucket_prefix.to_vec();
    push_escaped(&mut k, key.as_bytes(), true);
    k.extend_from_slice(&[0xff; 24]);
    k
}

/// Splits an uploads-by-key index entry (without its bucket prefix) into the object
/// key bytes, initiation time and upload id.
pub fn parse_upload_index(rest: &[u8]) -> Option<(Vec<u8>, i64, UploadId)> {
    let mut key = Vec::new();
    let mut i = 0;
    loop {
        match (rest.get(i)?, rest.get(i + 1)) {
            (0, Some(0)) => break,
            (0, Some(0xff)) => {
                key.push(0);
                i += 2;
            }
            (0, _) => return None,
            (&b, _) => {
                key.push(b);
                i += 1;
            }
        }
    }
    let tail = rest.get(i + 2..)?;
    if tail.len() != 24 {
        return None;
    }
    let initiated = u64::from_be_bytes(tail[..8].try_into().ok()?) as i64;
    let id: [u8; 16] = tail[8..].try_into().ok()?;
    Some((key, initiated, UploadId(uuid::Uuid::from_bytes(id))))
}

/// Entry of the uploads-by-age index.
pub fn upload_age_key(initiated: i64, upload_key: &[u8]) -> Vec<u8> {
    let mut k = Vec::with_capacity(8 + upload_key.len());
    k.extend_from_slice(&(initiated.max(0) as u64).to_be_bytes());
    k.extend_from_slice(upload_key);
    k
}

/// Prefix of one KV namespace of one tenant.
pub fn kv_namespace_prefix(p: PartitionId, tenant: TenantId, namespace: &str) -> Vec<u8> {
    let mut k = Vec::with_capacity(19 + namespace.len());
    k.extend_from_slice(&p.0.to_be_bytes());
    k.extend_from_slice(tenant.as_bytes());
    // Namespaces are at most 63 bytes; the length byte keeps `ns` from being a prefix of `ns2`.
    k.push(namespace.len() as u8);
    k.extend_from_slice(namespace.as_bytes());
    k
}

pub fn kv_key(p: PartitionId, tenant: TenantId, namespace: &str, key: &[u8]) -> Vec<u8> {
    let mut k = kv_namespace_prefix(p, tenant, namespace);
    k.extend_from_slice(key);
    k
}

/// The smallest key greater than every key starting with `prefix`, or None if there is none.
pub fn prefix_end(prefix: &[u8]) -> Option<Vec<u8>> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return Some(end);
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefix_end_bounds_every_extension() {
        assert_eq!(prefix_end(b"ab"), Some(b"ac".to_vec()));
        assert_eq!(prefix_end(&[1, 0xff]), Some(vec![2]));
        assert_eq!(prefix_end(&[0xff, 0xff]), None);
    }

    #[test]
    fn upload_index_sorts_by_key_then_time_and_round_trips() {
        let (p, b) = (PartitionId(1), BucketId(uuid::Uuid::from_u128(2)));
        let bp = bucket_prefix(p, b);
        let u = |n| upload_key(p, b, UploadId(uuid::Uuid::from_u128(n)));
        let mut entries = [
            upload_index_key(&u(1), "a\0", 1),
            upload_index_key(&u(2), "a", 9),
            upload_index_key(&u(3), "a", 3),
            upload_index_key(&u(4), "ab", 0),
            upload_index_key(&u(5), "", 5),
        ];
        entries.sort();
        let parsed: Vec<_> = entries
            .iter()
            .map(|e| parse_upload_index(&e[BUCKET_PREFIX_LEN..]).unwrap())
            .collect();
        let order: Vec<(Vec<u8>, i64)> = parsed.iter().map(|(k, t, _)| (k.clone(), *t)).collect();
        assert_eq!(
            order,
            vec![
                (b"".to_vec(), 5),
                (b"a".to_vec(), 3),
                (b"a".to_vec(), 9),
                (b"a\0".to_vec(), 1),
                (b"ab".to_vec(), 0)
            ]
        );
        assert_eq!(parsed[0].2, UploadId(uuid::Uuid::from_u128(5)));
        let after_a = upload_index_after_key(&bp, "a");
        assert!(entries.iter().filter(|e| **e > after_a).count() == 2);
        assert!(upload_index_key(&u(4), "ab", 0).starts_with(&upload_index_prefix(&bp, "a")));
        assert!(parse_upload_index(b"x\0").is_none());
    }

    #[test]
    fn namespaces_do_not_nest() {
        let t = TenantId(uuid::Uuid::from_u128(1));
        let p = PartitionId(3);
        let a = kv_namespace_prefix(p, t, "ns");
        let b = kv_key(p, t, "ns2", b"x");
        assert!(!b.starts_with(&a));
    }
}
