//! Encryption at rest for secrets stored in the catalog (tenant secret keys).
//! XChaCha20-Poly1305 under the node master key, a random nonce per value, and the
//! owning record's id as associated data so a sealed value cannot be moved to another row.

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use chacha20poly1305::aead::{Aead, KeyInit, Payload};
use chacha20poly1305::{XChaCha20Poly1305, XNonce};
use rand::RngCore;

#[derive(Clone)]
pub struct MasterKey([u8; 32]);

impl std::fmt::Debug for MasterKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("MasterKey(<redacted>)")
    }
}

#[derive(Debug, thiserror::Error)]
pub enum SealError {
    #[error("master key must be 32 bytes, base64-encoded")]
    BadKey,
    #[error("sealed value is malformed or was encrypted under another master key")]
    Open,
}

impl MasterKey {
    pub fn generate() -> Self {
        let mut k = [0u8; 32];
        rand::rng().fill_bytes(&mut k);
        Self(k)
    }

    pub fn from_base64(s: &str) -> Result<Self, SealError> {
        let v = STANDARD.decode(s.trim()).map_err(|_| SealError::BadKey)?;
        let k: [u8; 32] = v.try_into().map_err(|_| SealError::BadKey)?;
        Ok(Self(k))
    }

    pub fn to_base64(&self) -> String {
        STANDARD.encode(self.0)
    }

    pub fn seal(&self, plaintext: &str, aad: &str) -> String {
        let cipher = XChaCha20Poly1305::new((&self.0).into());
        let mut nonce = [0u8; 24];
        rand::rng().fill_bytes(&mut nonce);
        let ct = cipher
            .encrypt(
                XNonce::from_slice(&nonce),
                Payload {
                    msg: plaintext.as_bytes(),
                    aad: aad.as_bytes(),
                },
            )
            .unwrap_or_default();
        let mut out = nonce.to_vec();
        out.extend_from_slice(&ct);
        format!("v1:{}", STANDARD.encode(out))
    }

    pub fn open(&self, sealed: &str, aad: &str) -> Result<String, SealError> {
        let raw = sealed.strip_prefix("v1:").ok_or(SealError::Open)?;
        let raw = STANDARD.decode(raw).map_err(|_| SealError::Open)?;
        if raw.len() < 24 + 16 {
            return Err(SealError::Open);
        }
        let (nonce, ct) = raw.split_at(24);
        let cipher = XChaCha20Poly1305::new((&self.0).into());
        let pt = cipher
            .decrypt(
                XNonce::from_slice(nonce),
                Payload {
                    msg: ct,
                    aad: aad.as_bytes(),
                },
            )
            .map_err(|_| SealError::Open)?;
        String::from_utf8(pt).map_err(|_| SealError::Open)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sealed_secret_opens_only_with_same_key_and_row() {
        let k = MasterKey::generate();
        let s = k.seal("s3cr3t", "GKA");
        assert!(!s.contains("s3cr3t"));
        assert_eq!(k.open(&s, "GKA").unwrap(), "s3cr3t");
        assert!(k.open(&s, "GKB").is_err(), "moved to another row");
        assert!(
            MasterKey::generate().open(&s, "GKA").is_err(),
            "other master key"
        );
        let k2 = MasterKey::from_base64(&k.to_base64()).unwrap();
        assert_eq!(k2.open(&s, "GKA").unwrap(), "s3cr3t");
    }
}
