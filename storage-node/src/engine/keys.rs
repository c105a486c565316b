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
    fn namespaces_do_not_nest() {
        let t = TenantId(uuid::Uuid::from_u128(1));
        let p = PartitionId(3);
        let a = kv_namespace_prefix(p, t, "ns");
        let b = kv_key(p, t, "ns2", b"x");
        assert!(!b.starts_with(&a));
    }
}
