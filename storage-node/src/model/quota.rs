//! Quota admission of the model's writes ([`crate::tenancy::quota`]): each write that
//! adds data asks the gate for what it adds at most, after its body is stored and
//! before it commits, and a refusal removes what it stored.

use redb::TableDefinition;

use super::{Error, Result, Store};
use crate::engine::usage;
use crate::engine::{KV, OBJECTS, PARTS, Record};
use crate::tenancy::quota::{Amount, QuotaGate, Reservation};
use crate::types::TenantId;

impl Store {
    /// The node's quota gate.
    pub fn quotas(&self) -> &QuotaGate {
        &self.inner.quotas
    }

    /// Admits a write of `tenant` that adds at most `amount`.
    pub(crate) async fn admit(&self, tenant: TenantId, amount: Amount) -> Result<Reservation> {
        self.inner
            .quotas
            .admit(tenant, amount)
            .await
            .map_err(|e| match e {
                Ok(q) => Error::QuotaExceeded(q),
                Err(m) => Error::QuotaUndecided(m),
            })
    }

    /// Admits storing a record of `size` (an object's or part's size, a KV value's
    /// length) at engine key `key`: it adds its size less that of the record it replaces
    /// (a new KV entry also its namespace and key), and one object or KV key where there
    /// is none.
    pub(crate) async fn admit_record(
        &self,
        tenant: TenantId,
        kind: RecordKind,
        key: &[u8],
        size: u64,
    ) -> Result<Reservation> {
        match self.record_amount(tenant, kind, key, size).await? {
            Some((amount, old)) => {
                // A completed upload (size 0) adds no bytes whatever it replaces.
                let admitted = if size == 0 { u64::MAX } else { amount.bytes };
                Ok(self
                    .admit(tenant, amount)
                    .await?
                    .replacing(old.is_some(), size, admitted))
            }
            None => Ok(Reservation::none()),
        }
    }

    /// Refuses early (before its body is read) a write of a record of `size` at `key`
    /// that cannot fit; admits nothing ([`Self::admit_record`] decides at commit).
    pub(crate) async fn precheck_record(
        &self,
        tenant: TenantId,
        kind: RecordKind,
        key: &[u8],
        size: u64,
    ) -> Result<()> {
        if let Some((amount, _)) = self.record_amount(tenant, kind, key, size).await? {
            self.inner.quotas.precheck(tenant, amount).await?;
        }
        Ok(())
    }

    /// What storing a record of `size` at `key` adds, and the size of the record it
    /// replaces (None: absent); None when no quota applies.
    async fn record_amount(
        &self,
        tenant: TenantId,
        kind: RecordKind,
        key: &[u8],
        size: u64,
    ) -> Result<Option<(Amount, Option<u64>)>> {
        if !self.inner.quotas.applies(tenant).await {
            return Ok(None);
        }
        let k = key.to_vec();
        let old = self
            .engine()
            .read(move |txn| {
                let t = txn.open_table(kind.table())?;
                Ok(t.get(k.as_slice())?.map(|v| kind.size_of(v.value())))
            })
            .await?;
        let new = u64::from(old.is_none());
        let grows = size.saturating_sub(old.unwrap_or(0));
        Ok(Some((
            match kind {
                RecordKind::Object => Amount {
                    bytes: grows,
                    objects: new,
                    ..Default::default()
                },
                RecordKind::Part => Amount {
                    bytes: grows,
                    ..Default::default()
                },
                // A new entry also stores its namespace and key.
                RecordKind::Kv => Amount {
                    bytes: grows + new * key.len().saturating_sub(usage::KV_KEY_OVERHEAD) as u64,
                    kv_keys: new,
                    ..Default::default()
                },
            },
            old,
        )))
    }
}

/// The records a quota admission is about.
#[derive(Clone, Copy)]
pub(crate) enum RecordKind {
    Object,
    Part,
    Kv,
}

impl RecordKind {
    fn table(self) -> TableDefinition<'static, &'static [u8], Record> {
        match self {
            RecordKind::Object => OBJECTS,
            RecordKind::Part => PARTS,
            RecordKind::Kv => KV,
        }
    }

    /// The size a stored record of this kind counts (as `engine::usage` counts it).
    fn size_of(self, v: &[u8]) -> u64 {
        match self {
            RecordKind::Kv => usage::kv_value_len(v),
            RecordKind::Object | RecordKind::Part => usage::leading_size(v),
        }
        .unwrap_or(0)
    }
}

#[cfg(test)]
mod tests {
    use bytes::Bytes;

    use super::super::kv::KvCondition;
    use super::super::{ByteStream, Conditions, ObjectMeta, test_store};
    use super::*;
    use crate::catalog::{Quotas, TenantSpec};

    fn body(len: usize) -> ByteStream {
        Box::pin(futures::stream::iter([Ok(Bytes::from(vec![1u8; len]))]))
    }

    async fn tenant(s: &Store, q: Quotas) -> TenantId {
        let spec = TenantSpec {
            quotas: q,
            ..Default::default()
        };
        s.catalog().create_tenant("t", &spec).await.unwrap().id
    }

    async fn put(s: &Store, t: TenantId, key: &str, len: usize) -> Result<()> {
        s.put_object(
            t,
            "b",
            key,
            body(len),
            None,
            ObjectMeta::default(),
            Conditions::default(),
        )
        .await
        .map(|_| ())
    }

    fn files(dir: &std::path::Path) -> usize {
        walk(&dir.join("chunks"))
    }

    fn walk(p: &std::path::Path) -> usize {
        std::fs::read_dir(p).map_or(0, |rd| {
            rd.flatten()
                .map(|e| {
                    if e.path().is_dir() {
                        walk(&e.path())
                    } else {
                        1
                    }
                })
                .sum()
        })
    }

    /// The case: a large part under a 1-byte quota is refused, and nothing of it
    /// stays (usage and chunk files unchanged).
    #[tokio::test]
    async fn a_part_over_the_storage_quota_is_refused_and_leaves_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let s = test_store(dir.path()).await;
        let t = tenant(
            &s,
            Quotas {
                storage_bytes: Some(1),
                ..Default::default()
            },
        )
        .await;
        s.create_bucket(t, "b").await.unwrap();
        let u = s
            .create_upload(t, "b", "big", ObjectMeta::default())
            .await
            .unwrap();
        let before = files(dir.path());
        let e = s
            .upload_part(t, "b", "big", u, 1, body(3 << 20), None)
            .await
            .unwrap_err();
        assert!(
            matches!(&e, Error::QuotaExceeded(q) if q.what == "storageBytes" && q.limit == 1),
            "{e:?}"
        );
        assert_eq!(files(dir.path()), before, "the part's data was removed");
        let u2 = s.tenant_usage_in(t, &s.all_partitions()).await.unwrap();
        assert_eq!(u2.storage_bytes, 0);
        // Refused early too, from the declared size, before any body is read.
        let e = s
            .upload_part_ext(t, "b", "big", u, 1, body(0), None, None, Some(3 << 20))
            .await
            .unwrap_err();
        assert!(matches!(e, Error::QuotaExceeded(_)), "{e:?}");
        put(&s, t, "one", 1).await.unwrap();
        assert!(matches!(
            put(&s, t, "two", 1).await,
            Err(Error::QuotaExceeded(_))
        ));
    }

    /// Writes fill the quota exactly; deletes, smaller overwrites and aborts give back;
    /// concurrent writes never take a tenant past it on one node.
    #[tokio::test]
    async fn quotas_hold_exactly_and_give_back() {
        let dir = tempfile::tempdir().unwrap();
        let s = test_store(dir.path()).await;
        let t = tenant(
            &s,
            Quotas {
                storage_bytes: Some(1000),
                objects: Some(8),
                buckets: Some(1),
                kv_keys: Some(2),
            },
        )
        .await;
        s.create_bucket(t, "b").await.unwrap();
        let e = s.create_bucket(t, "c").await.unwrap_err();
        assert!(
            matches!(&e, Error::QuotaExceeded(q) if q.what == "buckets"),
            "{e:?}"
        );
        assert!(matches!(
            s.create_bucket(t, "b").await,
            Err(Error::BucketAlreadyOwnedByYou)
        ));

        // Concurrent writers: exactly what fits is admitted.
        let mut tasks = Vec::new();
        for i in 0..20 {
            let s = s.clone();
            tasks.push(tokio::spawn(async move {
                put(&s, t, &format!("c{i}"), 300).await
            }));
        }
        let mut ok = 0;
        for task in tasks {
            match task.await.unwrap() {
                Ok(()) => ok += 1,
                Err(Error::QuotaExceeded(_)) => {}
                Err(e) => panic!("{e:?}"),
            }
        }
        assert_eq!(ok, 3, "3 x 300 bytes fit in 1000");
        let used =
            |s: Store| async move { s.tenant_usage_in(t, &s.all_partitions()).await.unwrap() };
        assert_eq!(used(s.clone()).await.storage_bytes, 900);
        // An overwrite adds only what it grows by.
        let keys: Vec<String> = s
            .list_objects(t, "b", "", None, None, 100)
            .await
            .unwrap()
            .objects
            .into_iter()
            .map(|(k, _)| k)
            .collect();
        put(&s, t, &keys[0], 400).await.unwrap();
        assert!(matches!(
            put(&s, t, &keys[0], 401).await,
            Err(Error::QuotaExceeded(_))
        ));
        // A copy counts as a write of its size.
        let e = s
            .copy_object(
                t,
                "b",
                &keys[0],
                &Conditions::default(),
                "b",
                "copy",
                None,
                None,
            )
            .await
            .unwrap_err();
        assert!(matches!(e, Error::QuotaExceeded(_)), "{e:?}");
        // Deletes give back (seen at the next measurement).
        s.delete_object(t, "b", &keys[1]).await.unwrap();
        tokio::time::sleep(crate::tenancy::quota::REMEASURE_MIN).await;
        put(&s, t, "after-delete", 300).await.unwrap();
        assert_eq!(used(s.clone()).await.storage_bytes, 1000);

        // Objects: 3 stored; small objects up to 8.
        s.delete_object(t, "b", "after-delete").await.unwrap();
        s.delete_object(t, "b", &keys[0]).await.unwrap();
        tokio::time::sleep(crate::tenancy::quota::REMEASURE_MIN).await;
        for i in 0..7 {
            put(&s, t, &format!("s{i}"), 1).await.unwrap();
        }
        let e = put(&s, t, "s7", 1).await.unwrap_err();
        assert!(
            matches!(&e, Error::QuotaExceeded(q) if q.what == "objects"),
            "{e:?}"
        );
        // Completing an upload onto an existing key adds no object; onto a new one it does.
        for (key, fits) in [("s0", true), ("new", false)] {
            let u = s
                .create_upload(t, "b", key, ObjectMeta::default())
                .await
                .unwrap();
            let p = s
                .upload_part(t, "b", key, u, 1, body(1), None)
                .await
                .unwrap();
            let r = s
                .complete_upload(t, "b", key, u, vec![(1, p.etag())], Conditions::default())
                .await;
            assert_eq!(r.is_ok(), fits, "{key}: {r:?}");
            if !fits {
                assert!(matches!(r, Err(Error::QuotaExceeded(_))));
                s.abort_upload(t, "b", key, u).await.unwrap();
            }
        }

        // KV keys: new keys count, overwrites of existing ones do not.
        for k in [&b"a"[..], b"b"] {
            s.kv_put(t, "ns", k, vec![0; 4], KvCondition::None, None)
                .await
                .unwrap();
        }
        let e = s
            .kv_put(t, "ns", b"c", vec![0; 4], KvCondition::None, None)
            .await
            .unwrap_err();
        assert!(
            matches!(&e, Error::QuotaExceeded(q) if q.what == "kvKeys"),
            "{e:?}"
        );
        s.kv_put(t, "ns", b"a", vec![0; 4], KvCondition::None, None)
            .await
            .unwrap();
        assert_eq!(s.engine().verify_usage().await.unwrap(), vec![]);
    }
}
