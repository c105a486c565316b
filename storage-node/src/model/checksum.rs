//! Flexible checksums (`x-amz-checksum-crc32`, `-crc32c`, `-crc64nvme`, `-sha1`,
//! `-sha256`): computed while a body streams in, compared with the value the client
//! declared (in a header, or in an `aws-chunked` trailer that arrives after the body),
//! and stored with the object or part. A multipart object's checksum is composed from
//! its parts': `COMPOSITE` (the checksum of the parts' digests, `-N` appended) or, for
//! the CRCs, `FULL_OBJECT` (the parts' CRCs combined, as if computed over the whole).

use std::sync::{Arc, Mutex};

use base64::Engine as _;
use futures::TryStreamExt;
use s3s::crypto::Checksum as _;

use super::data::ByteStream;
use super::object::{Checksum, ChecksumAlgorithm};
use super::{Error, Result};

impl ChecksumAlgorithm {
    /// The S3 name (`CRC32`, `CRC64NVME`, ...).
    pub fn name(self) -> &'static str {
        match self {
            ChecksumAlgorithm::Crc32 => "CRC32",
            ChecksumAlgorithm::Crc32c => "CRC32C",
            ChecksumAlgorithm::Sha1 => "SHA1",
            ChecksumAlgorithm::Sha256 => "SHA256",
            ChecksumAlgorithm::Crc64Nvme => "CRC64NVME",
        }
    }

    pub fn from_name(name: &str) -> Option<Self> {
        Some(match name.to_ascii_uppercase().as_str() {
            "CRC32" => ChecksumAlgorithm::Crc32,
            "CRC32C" => ChecksumAlgorithm::Crc32c,
            "SHA1" => ChecksumAlgorithm::Sha1,
            "SHA256" => ChecksumAlgorithm::Sha256,
            "CRC64NVME" => ChecksumAlgorithm::Crc64Nvme,
            _ => return None,
        })
    }

    /// Whether a multipart object can carry a `FULL_OBJECT` checksum of this algorithm
    /// (CRCs combine; SHAs do not).
    pub fn combines(self) -> bool {
        self.crc().is_some()
    }

    fn crc(self) -> Option<crc_fast::CrcAlgorithm> {
        match self {
            ChecksumAlgorithm::Crc32 => Some(crc_fast::CrcAlgorithm::Crc32IsoHdlc),
            ChecksumAlgorithm::Crc32c => Some(crc_fast::CrcAlgorithm::Crc32Iscsi),
            ChecksumAlgorithm::Crc64Nvme => Some(crc_fast::CrcAlgorithm::Crc64Nvme),
            ChecksumAlgorithm::Sha1 | ChecksumAlgorithm::Sha256 => None,
        }
    }
}

enum Hasher {
    Crc32(s3s::crypto::Crc32),
    Crc32c(s3s::crypto::Crc32c),
    Crc64Nvme(s3s::crypto::Crc64Nvme),
    Sha1(s3s::crypto::Sha1),
    Sha256(s3s::crypto::Sha256),
}

impl Hasher {
    fn new(a: ChecksumAlgorithm) -> Self {
        match a {
            ChecksumAlgorithm::Crc32 => Hasher::Crc32(s3s::crypto::Crc32::new()),
            ChecksumAlgorithm::Crc32c => Hasher::Crc32c(s3s::crypto::Crc32c::new()),
            ChecksumAlgorithm::Crc64Nvme => Hasher::Crc64Nvme(s3s::crypto::Crc64Nvme::new()),
            ChecksumAlgorithm::Sha1 => Hasher::Sha1(s3s::crypto::Sha1::new()),
            ChecksumAlgorithm::Sha256 => Hasher::Sha256(s3s::crypto::Sha256::new()),
        }
    }

    fn update(&mut self, b: &[u8]) {
        match self {
            Hasher::Crc32(h) => h.update(b),
            Hasher::Crc32c(h) => h.update(b),
            Hasher::Crc64Nvme(h) => h.update(b),
            Hasher::Sha1(h) => h.update(b),
            Hasher::Sha256(h) => h.update(b),
        }
    }

    fn finalize(self) -> Vec<u8> {
        match self {
            Hasher::Crc32(h) => h.finalize().to_vec(),
            Hasher::Crc32c(h) => h.finalize().to_vec(),
            Hasher::Crc64Nvme(h) => h.finalize().to_vec(),
            Hasher::Sha1(h) => h.finalize().as_ref().to_vec(),
            Hasher::Sha256(h) => h.finalize().as_ref().to_vec(),
        }
    }
}

/// The value a client declared for a body's checksum.
pub enum Expected {
    /// None: the checksum is computed and stored (`x-amz-checksum-algorithm` alone, or
    /// a part of an upload created with an algorithm).
    Compute,
    /// From a header (base64).
    Value(String),
    /// From an `aws-chunked` trailer, readable once the whole body has been read;
    /// `None` then means it was declared (`x-amz-trailer`) but never sent.
    Trailer(Box<dyn FnOnce() -> Option<String> + Send>),
}

/// A body's checksum to compute and verify.
pub struct ChecksumCheck {
    pub algorithm: ChecksumAlgorithm,
    pub expected: Expected,
}

/// A checksum being computed over a body as it streams through [`hashing`].
pub struct Running {
    check: ChecksumCheck,
    hasher: Arc<Mutex<Option<Hasher>>>,
}

/// Wraps `body` so that its bytes are hashed as they pass (no copy).
pub fn hashing(body: ByteStream, check: Option<ChecksumCheck>) -> (ByteStream, Option<Running>) {
    let Some(check) = check else {
        return (body, None);
    };
    let hasher = Arc::new(Mutex::new(Some(Hasher::new(check.algorithm))));
    let h = hasher.clone();
    let body: ByteStream = Box::pin(body.inspect_ok(move |b| {
        if let Ok(mut g) = h.lock()
            && let Some(h) = g.as_mut()
        {
            h.update(b);
        }
    }));
    (body, Some(Running { check, hasher }))
}

impl Running {
    /// The checksum of everything that streamed through, if it matches what the client
    /// declared: `BadChecksum` when not, `Invalid` when a declared trailer never came.
    pub fn finish(self) -> Result<Checksum> {
        let digest = self
            .hasher
            .lock()
            .ok()
            .and_then(|mut g| g.take())
            .map(Hasher::finalize)
            .ok_or_else(|| Error::Invalid("checksum state lost".into()))?;
        let value = base64::engine::general_purpose::STANDARD.encode(digest);
        let algorithm = self.check.algorithm;
        let expected = match self.check.expected {
            Expected::Compute => None,
            Expected::Value(v) => Some(v),
            Expected::Trailer(read) => Some(read().ok_or_else(|| {
                Error::Invalid(format!(
                    "the trailer x-amz-checksum-{} was declared but not sent",
                    algorithm.name().to_ascii_lowercase()
                ))
            })?),
        };
        if let Some(e) = expected
            && e.trim() != value
        {
            return Err(Error::BadChecksum(algorithm.name()));
        }
        Ok(Checksum {
            algorithm,
            value,
            full_object: true,
        })
    }
}

fn raw(c: &Checksum) -> Result<Vec<u8>> {
    base64::engine::general_purpose::STANDARD
        .decode(c.value.as_bytes())
        .map_err(|_| Error::Corrupt("a stored part checksum is not base64".into()))
}

/// The checksum of a multipart object from its parts' `(checksum, size)`, in order:
/// `FULL_OBJECT` combines CRCs; otherwise `COMPOSITE`. `None` when a part has none (or
/// another algorithm), so the object carries none.
pub fn of_parts(
    algorithm: ChecksumAlgorithm,
    full_object: bool,
    parts: &[(Option<&Checksum>, u64)],
) -> Result<Option<Checksum>> {
    let mut digests = Vec::with_capacity(parts.len());
    for (c, size) in parts {
        match c {
            Some(c) if c.algorithm == algorithm => digests.push((raw(c)?, *size)),
            _ => return Ok(None),
        }
    }
    if full_object {
        let Some(crc) = algorithm.crc() else {
            return Ok(None);
        };
        let mut acc: Option<u64> = None;
        for (d, size) in &digests {
            let v = d.iter().fold(0u64, |a, b| (a << 8) | u64::from(*b));
            acc = Some(match acc {
                None => v,
                Some(a) => crc_fast::checksum_combine(crc, a, v, *size),
            });
        }
        let width = if algorithm == ChecksumAlgorithm::Crc64Nvme {
            8
        } else {
            4
        };
        let bytes = acc.unwrap_or(0).to_be_bytes();
        return Ok(Some(Checksum {
            algorithm,
            value: base64::engine::general_purpose::STANDARD.encode(&bytes[8 - width..]),
            full_object: true,
        }));
    }
    let mut h = Hasher::new(algorithm);
    for (d, _) in &digests {
        h.update(d);
    }
    Ok(Some(Checksum {
        algorithm,
        value: format!(
            "{}-{}",
            base64::engine::general_purpose::STANDARD.encode(h.finalize()),
            digests.len()
        ),
        full_object: false,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;
    use futures::StreamExt;

    async fn sum(a: ChecksumAlgorithm, data: &[u8], expected: Expected) -> Result<Checksum> {
        let body: ByteStream = Box::pin(futures::stream::iter(
            data.chunks(7)
                .map(|c| Ok(Bytes::copy_from_slice(c)))
                .collect::<Vec<_>>(),
        ));
        let (mut body, run) = hashing(
            body,
            Some(ChecksumCheck {
                algorithm: a,
                expected,
            }),
        );
        while body.next().await.is_some() {}
        run.unwrap().finish()
    }

    #[tokio::test]
    async fn known_values_verify_and_mismatches_are_refused() {
        // CRC32 of "123456789" is 0xCBF43926; CRC32C 0xE3069283.
        let c = sum(ChecksumAlgorithm::Crc32, b"123456789", Expected::Compute)
            .await
            .unwrap();
        assert_eq!(c.value, "y/Q5Jg==");
        let c = sum(ChecksumAlgorithm::Crc32c, b"123456789", Expected::Compute)
            .await
            .unwrap();
        assert_eq!(c.value, "4waSgw==");
        let ok = sum(
            ChecksumAlgorithm::Sha256,
            b"abc",
            Expected::Value("ungWv48Bz+pBQUDeXa4iI7ADYaOWF3qctBD/YfIAFa0=".into()),
        )
        .await
        .unwrap();
        assert!(ok.full_object);
        let bad = sum(
            ChecksumAlgorithm::Crc32,
            b"abc",
            Expected::Value("AAAAAA==".into()),
        )
        .await;
        assert!(matches!(bad, Err(Error::BadChecksum("CRC32"))), "{bad:?}");
        let missing = sum(
            ChecksumAlgorithm::Crc32,
            b"abc",
            Expected::Trailer(Box::new(|| None)),
        )
        .await;
        assert!(matches!(missing, Err(Error::Invalid(_))), "{missing:?}");
    }

    #[tokio::test]
    async fn part_checksums_compose_and_combine() {
        let a = sum(ChecksumAlgorithm::Crc32, b"1234", Expected::Compute)
            .await
            .unwrap();
        let b = sum(ChecksumAlgorithm::Crc32, b"56789", Expected::Compute)
            .await
            .unwrap();
        let whole = sum(ChecksumAlgorithm::Crc32, b"123456789", Expected::Compute)
            .await
            .unwrap();
        let full = of_parts(
            ChecksumAlgorithm::Crc32,
            true,
            &[(Some(&a), 4), (Some(&b), 5)],
        )
        .unwrap()
        .unwrap();
        assert_eq!(full.value, whole.value, "combined CRC = CRC of the whole");
        let comp = of_parts(
            ChecksumAlgorithm::Crc32,
            false,
            &[(Some(&a), 4), (Some(&b), 5)],
        )
        .unwrap()
        .unwrap();
        assert!(comp.value.ends_with("-2") && !comp.full_object, "{comp:?}");
        let c64a = sum(ChecksumAlgorithm::Crc64Nvme, b"1234", Expected::Compute)
            .await
            .unwrap();
        let c64b = sum(ChecksumAlgorithm::Crc64Nvme, b"56789", Expected::Compute)
            .await
            .unwrap();
        let c64 = sum(
            ChecksumAlgorithm::Crc64Nvme,
            b"123456789",
            Expected::Compute,
        )
        .await
        .unwrap();
        let full = of_parts(
            ChecksumAlgorithm::Crc64Nvme,
            true,
            &[(Some(&c64a), 4), (Some(&c64b), 5)],
        )
        .unwrap()
        .unwrap();
        assert_eq!(full.value, c64.value);
        assert!(
            of_parts(ChecksumAlgorithm::Crc32, true, &[(Some(&a), 4), (None, 5)])
                .unwrap()
                .is_none()
        );
    }
}
