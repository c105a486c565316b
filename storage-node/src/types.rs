//! Identifier newtypes shared by every layer. Parsed once at the edge, carried typed inside.

use std::fmt;

use serde::{Deserialize, Serialize};
use uuid::Uuid;

macro_rules! uuid_id {
    ($(#[$m:meta])* $name:ident) => {
        $(#[$m])*
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
        #[serde(transparent)]
        pub struct $name(pub Uuid);

        impl $name {
            pub fn random() -> Self {
                Self(Uuid::new_v4())
            }
            pub fn as_bytes(&self) -> &[u8; 16] {
                self.0.as_bytes()
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                self.0.fmt(f)
            }
        }

        impl std::str::FromStr for $name {
            type Err = uuid::Error;
            fn from_str(s: &str) -> Result<Self, Self::Err> {
                Uuid::parse_str(s).map(Self)
            }
        }
    };
}

uuid_id!(
    /// A tenant's stable identity; names may be reused after deletion, ids never are.
    TenantId
);
uuid_id!(
    /// One incarnation of a bucket. Objects are keyed by it, so objects of a deleted
    /// bucket can never reappear in a new bucket of the same name.
    BucketId
);
uuid_id!(
    /// A chunk file holding part of an object's data.
    ChunkId
);
uuid_id!(
    /// A multipart upload in progress.
    UploadId
);

/// One of the cluster's P partitions. Every piece of state belongs to exactly one.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct PartitionId(pub u16);

impl PartitionId {
    /// Stable mapping of a (tenant, container) pair to a partition. A bucket's (or KV
    /// namespace's) whole index lives in one partition so ordered listings stay a single
    /// range scan; see docs/design.md ("Partitioning").
    pub fn of(tenant: TenantId, container: &[u8], partitions: u16) -> Self {
        let mut h = crc32c::crc32c(tenant.as_bytes());
        h = crc32c::crc32c_append(h, &[0]);
        h = crc32c::crc32c_append(h, container);
        PartitionId((h % u32::from(partitions.max(1))) as u16)
    }
}

impl fmt::Display for PartitionId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:04x}", self.0)
    }
}

/// A partition's leadership term. Every change of primary or in-sync set takes the next
/// epoch, and replicas refuse messages of an older one: a deposed primary is fenced.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Epoch(pub u64);

/// The name a node is known by in the cluster.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct NodeId(pub String);

impl fmt::Display for NodeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Compares secrets without leaking, through timing, how much of a guess was right.
pub fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Milliseconds since the Unix epoch; the unit every stored timestamp uses.
pub fn now_millis() -> i64 {
    let d = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn partition_is_stable_and_in_range() {
        let t = TenantId(Uuid::from_u128(42));
        let p = PartitionId::of(t, b"logs", 1024);
        assert_eq!(p, PartitionId::of(t, b"logs", 1024));
        assert!(p.0 < 1024);
        let other = TenantId(Uuid::from_u128(43));
        // Different tenants with the same bucket name spread independently.
        let spread: std::collections::HashSet<_> = (0..64u128)
            .map(|i| PartitionId::of(TenantId(Uuid::from_u128(i)), b"logs", 1024))
            .collect();
        assert!(spread.len() > 32, "poor spread: {}", spread.len());
        let _ = other;
    }
}
