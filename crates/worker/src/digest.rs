//! sha256 helpers for op digests and cache keys.

use sha2::{Digest as _, Sha256};

/// Lower-case hex sha256 of `data`.
pub(crate) fn sha256_hex(data: &[u8]) -> String {
    hex::encode(Sha256::digest(data))
}

/// `sha256:<hex>` of `data` (the OCI/LLB digest form).
pub(crate) fn sha256_digest(data: &[u8]) -> String {
    format!("sha256:{}", sha256_hex(data))
}

/// Incremental hasher producing `sha256:<hex>`, with length-prefixed fields so that
/// concatenations cannot collide.
#[derive(Default, Clone)]
pub(crate) struct KeyHasher(Sha256);

impl KeyHasher {
    pub(crate) fn new(domain: &str) -> Self {
        let mut h = KeyHasher(Sha256::new());
        h.field(domain.as_bytes());
        h
    }

    /// Adds one length-prefixed field.
    pub(crate) fn field(&mut self, data: &[u8]) -> &mut Self {
        self.0.update((data.len() as u64).to_le_bytes());
        self.0.update(data);
        self
    }

    pub(crate) fn finish(self) -> String {
        format!("sha256:{}", hex::encode(self.0.finalize()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_digest() {
        assert_eq!(
            sha256_digest(b""),
            "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
        );
    }

    #[test]
    fn fields_are_delimited() {
        let mut a = KeyHasher::new("x");
        a.field(b"ab").field(b"c");
        let mut b = KeyHasher::new("x");
        b.field(b"a").field(b"bc");
        assert_ne!(a.finish(), b.finish());
    }
}
