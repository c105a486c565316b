//! The on-disk format of metadata records (objects, uploads, parts, KV values).
//!
//! Two levels of versioning, so that neither an upgrade nor a rollback can misread data:
//!
//! - **Store format**, in the redb type name of the record tables ([`Record`]). redb
//!   refuses to open a table under another type name, so a binary whose store format
//!   differs from the one on disk fails at open ("refuses to start") instead of reading
//!   records it does not understand. An incompatible change bumps [`STORE_FORMAT`] and
//!   migrates in [`migrate_legacy_tables`]' fashion.
//! - **Record version**, the first byte of every record ([`seal`] / [`open`]). A record
//!   whose version this binary does not know is reported as [`RecordError::Newer`]
//!   (or [`RecordError::Corrupt`]); readers of that record get an error, and the orphan
//!   sweep aborts rather than treating the record's data as unreferenced.
//! - Every version-1 record ends with a CRC32C of everything before it, so a flipped
//!   bit is detected ([`RecordError::Checksum`]) instead of decoding into another
//!   chunk id (postcard alone would accept most flips).
//!
//! Stores written before versioning existed (record tables typed `&[u8]`, records bare
//! postcard) are recognised by their table type and migrated once, in one transaction,
//! at open: every record gets the version-1 prefix (the layout of version 1 is the
//! unversioned layout). A crash during that transaction leaves the store unmigrated.

use redb::{TableDefinition, TableError, TableHandle, TypeName, Value};

use super::EngineError;

/// The store format this binary reads and writes. Part of the record tables' type name.
pub const STORE_FORMAT: u32 = 1;
/// The record version this binary writes for records without extension fields.
pub const RECORD_VERSION: u8 = 1;
/// Version 2: the version-1 body followed by the record's extension fields (fields added
/// after version 1, see `model::object::Extended`). Written only when a record has
/// them, so records that do not stay readable by binaries that predate version 2, and a
/// binary that predates it refuses an extended record ([`RecordError::Newer`]) instead
/// of silently dropping its extension.
pub const EXTENDED_VERSION: u8 = 2;
/// The newest record version this binary reads.
pub const NEWEST_RECORD_VERSION: u8 = EXTENDED_VERSION;

/// The value type of the record tables: raw bytes under a type name that carries the
/// store format `F`.
#[derive(Debug)]
pub struct RecordFormat<const F: u32>;

/// The record tables of this binary's store format.
pub type Record = RecordFormat<STORE_FORMAT>;

impl<const F: u32> Value for RecordFormat<F> {
    type SelfType<'a>
        = &'a [u8]
    where
        Self: 'a;
    type AsBytes<'a>
        = &'a [u8]
    where
        Self: 'a;

    fn fixed_width() -> Option<usize> {
        None
    }

    fn from_bytes<'a>(data: &'a [u8]) -> &'a [u8]
    where
        Self: 'a,
    {
        data
    }

    fn as_bytes<'a, 'b: 'a>(value: &'a &'b [u8]) -> &'a [u8]
    where
        Self: 'b,
    {
        value
    }

    fn type_name() -> TypeName {
        // Changing this name is a store format change: see the module documentation.
        TypeName::new(&format!("granary.record.store-format-{F}"))
    }
}

#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum RecordError {
    #[error("record is empty")]
    Empty,
    #[error(
        "record version {0} is newer than this binary reads (up to {NEWEST_RECORD_VERSION}); \
         it was written by a newer Granary"
    )]
    Newer(u8),
    #[error("record version byte {0} is not valid")]
    Corrupt(u8),
    #[error("record fails its checksum")]
    Checksum,
}

/// Frames an encoded record: the current record version, the body, then a CRC32C
/// (little-endian) of the version and body.
pub fn seal(body: &[u8]) -> Vec<u8> {
    seal_version(RECORD_VERSION, body)
}

/// [`seal`] under record version `version`.
pub fn seal_version(version: u8, body: &[u8]) -> Vec<u8> {
    let mut v = Vec::with_capacity(body.len() + 5);
    v.push(version);
    v.extend_from_slice(body);
    let crc = crc32c::crc32c(&v);
    v.extend_from_slice(&crc.to_le_bytes());
    v
}

/// The body of a stored record, if its version is one this binary reads and its
/// checksum holds.
pub fn open(bytes: &[u8]) -> Result<&[u8], RecordError> {
    open_versioned(bytes).map(|(_, body)| body)
}

/// [`open`], with the record's version.
pub fn open_versioned(bytes: &[u8]) -> Result<(u8, &[u8]), RecordError> {
    match bytes.first() {
        None => Err(RecordError::Empty),
        Some(&version @ (RECORD_VERSION | EXTENDED_VERSION)) => {
            let Some(split) = bytes.len().checked_sub(4).filter(|n| *n >= 1) else {
                return Err(RecordError::Checksum);
            };
            let (framed, crc) = bytes.split_at(split);
            let mut stored = [0u8; 4];
            stored.copy_from_slice(crc);
            if crc32c::crc32c(framed) != u32::from_le_bytes(stored) {
                return Err(RecordError::Checksum);
            }
            Ok((version, &framed[1..]))
        }
        Some(&v) if v > NEWEST_RECORD_VERSION => Err(RecordError::Newer(v)),
        Some(&v) => Err(RecordError::Corrupt(v)),
    }
}

/// Opens the record table `def` in `txn`, first migrating it from the unversioned
/// layout if it is still in it. Fails with a clear message when the table was written
/// in another store format (by a newer or an incompatible binary).
pub(crate) fn open_record_table(
    txn: &redb::WriteTransaction,
    def: TableDefinition<&[u8], Record>,
) -> Result<(), EngineError> {
    let name = def.name().to_string();
    let legacy: TableDefinition<&[u8], &[u8]> = TableDefinition::new(&name);
    // Does a table in the unversioned layout exist? `list_tables` gives names only, so
    // try to open it with the legacy types: a type mismatch means it is not legacy.
    let exists = txn.list_tables()?.any(|t| t.name() == name);
    if exists {
        match txn.open_table(legacy) {
            Ok(t) => {
                drop(t);
                migrate_legacy_table(txn, &name)?;
            }
            Err(TableError::TableTypeMismatch { .. }) => {}
            Err(e) => return Err(e.into()),
        }
    }
    match txn.open_table(def) {
        Ok(_) => Ok(()),
        Err(TableError::TableTypeMismatch { value, .. }) => Err(EngineError::Format(format!(
            "table {name:?} holds records of type {value:?}, but this binary reads \
             granary.record.store-format-{STORE_FORMAT}: it was written by a newer (or \
             incompatible) Granary; refusing to start rather than misread it"
        ))),
        Err(e) => Err(e.into()),
    }
}

/// Rewrites the unversioned table `name` into the versioned layout, inside `txn`.
fn migrate_legacy_table(txn: &redb::WriteTransaction, name: &str) -> Result<(), EngineError> {
    use redb::ReadableTable;
    let legacy: TableDefinition<&[u8], &[u8]> = TableDefinition::new(name);
    let tmp_name = format!("{name}.migrating");
    let tmp: TableDefinition<&[u8], Record> = TableDefinition::new(&tmp_name);
    let mut n = 0u64;
    {
        let src = txn.open_table(legacy)?;
        let mut dst = txn.open_table(tmp)?;
        for entry in src.iter()? {
            let (k, v) = entry?;
            dst.insert(k.value(), seal(v.value()).as_slice())?;
            n += 1;
        }
    }
    txn.delete_table(legacy)?;
    txn.rename_table(tmp, TableDefinition::<&[u8], Record>::new(name))?;
    if n > 0 {
        tracing::info!(
            table = name,
            records = n,
            "migrated records to store format {STORE_FORMAT}"
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_are_told_apart() {
        assert_eq!(open(&seal(b"abc")), Ok(&b"abc"[..]));
        assert_eq!(open(&seal(b"")), Ok(&b""[..]));
        assert_eq!(open(&[]), Err(RecordError::Empty));
        assert_eq!(open(&[RECORD_VERSION, 1, 2]), Err(RecordError::Checksum));
        for i in 0..(seal(b"abcdef").len() * 8) {
            let mut v = seal(b"abcdef");
            v[i / 8] ^= 1 << (i % 8);
            assert!(open(&v).is_err(), "flip of bit {i} not detected");
        }
        assert_eq!(
            open_versioned(&seal_version(EXTENDED_VERSION, b"ab")),
            Ok((EXTENDED_VERSION, &b"ab"[..]))
        );
        assert_eq!(
            open(&[NEWEST_RECORD_VERSION + 1, 1]),
            Err(RecordError::Newer(3))
        );
        assert_eq!(open(&[0, 1]), Err(RecordError::Corrupt(0)));
    }

    /// A store written before records were versioned opens, its records read as
    /// version 1, and opening it again does not migrate twice.
    #[tokio::test]
    async fn an_unversioned_store_is_migrated_once() {
        let dir = tempfile::tempdir().unwrap();
        {
            let db = redb::Database::create(dir.path().join("meta.redb")).unwrap();
            let txn = db.begin_write().unwrap();
            for name in ["objects", "parts"] {
                let legacy: TableDefinition<&[u8], &[u8]> = TableDefinition::new(name);
                txn.open_table(legacy)
                    .unwrap()
                    .insert(&b"k"[..], &b"old layout"[..])
                    .unwrap();
            }
            txn.commit().unwrap();
        }
        for _ in 0..2 {
            let e = crate::engine::Engine::open(dir.path()).unwrap();
            let got = e
                .read(|txn| {
                    let t = txn.open_table(crate::engine::OBJECTS)?;
                    Ok(t.get(&b"k"[..])?.map(|v| v.value().to_vec()))
                })
                .await
                .unwrap();
            assert_eq!(got.as_deref(), Some(seal(b"old layout").as_slice()));
            assert_eq!(open(got.as_deref().unwrap()), Ok(&b"old layout"[..]));
            e.shutdown().await;
        }
    }

    type FutureRecord = RecordFormat<{ STORE_FORMAT + 1 }>;

    /// A store a newer binary migrated to another store format: this binary refuses to
    /// open it (and so to start) rather than misread it, and changes nothing.
    #[tokio::test]
    async fn a_store_in_a_newer_format_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        {
            let db = redb::Database::create(dir.path().join("meta.redb")).unwrap();
            let txn = db.begin_write().unwrap();
            let def: TableDefinition<&[u8], FutureRecord> = TableDefinition::new("objects");
            txn.open_table(def)
                .unwrap()
                .insert(&b"k"[..], &b"v2"[..])
                .unwrap();
            txn.commit().unwrap();
        }
        let err = crate::engine::Engine::open(dir.path()).err().unwrap();
        let msg = err.to_string();
        assert!(matches!(err, EngineError::Format(_)), "{msg}");
        assert!(msg.contains("refusing to start"), "{msg}");
        let db = redb::Database::create(dir.path().join("meta.redb")).unwrap();
        let txn = redb::ReadableDatabase::begin_read(&db).unwrap();
        let def: TableDefinition<&[u8], FutureRecord> = TableDefinition::new("objects");
        let t = txn.open_table(def).unwrap();
        assert_eq!(t.get(&b"k"[..]).unwrap().unwrap().value(), b"v2");
    }
}
