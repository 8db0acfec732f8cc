//! Secrets at rest. Environment keys, integration webhook secrets and connection
//! credentials are sealed with XChaCha20-Poly1305 under the key in
//! `HOOKYARD_ENCRYPTION_KEY` before they reach the database.
//!
//! A sealed value is `v1:` + base64(24-byte random nonce ‖ ciphertext ‖ tag). The column
//! it belongs to is the associated data, so a value copied into another column (an
//! environment key pasted over a webhook secret) fails to open instead of leaking.
//!
//! To change the key, a cipher also opens (never seals) with the keys in
//! `HOOKYARD_DECRYPTION_KEYS`, and `hookyard reseal` moves every secret to the current
//! key (deploy/README.md, "Changing the encryption key").

use std::fmt;
use std::sync::Arc;

use base64::engine::general_purpose::{STANDARD, STANDARD_NO_PAD};
use base64::Engine;
use chacha20poly1305::aead::{Aead, KeyInit, Payload};
use chacha20poly1305::{XChaCha20Poly1305, XNonce};
use sha2::{Digest, Sha256};

const PREFIX: &str = "v1:";
const NONCE_LEN: usize = 24;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SecretError {
    #[error(
        "the encryption key is invalid: give 32 random bytes as base64 (44 characters) or hex \
         (64 characters); `hookyard keygen` prints one"
    )]
    BadKey,
    #[error("a sealed {0} cannot be opened: it is damaged, or was sealed under another encryption key")]
    CannotOpen(&'static str),
}

/// What a sealed value is, bound into it as associated data.
#[derive(Debug, Clone, Copy)]
pub enum Purpose {
    EnvironmentSecretKey,
    EnvironmentSigningKey,
    WebhookSecret,
    OAuthClientSecret,
    Credentials,
    ForwardSigningKey,
    EnvironmentVariable,
}

impl Purpose {
    fn label(self) -> &'static str {
        match self {
            Purpose::EnvironmentSecretKey => "environment secret key",
            Purpose::EnvironmentSigningKey => "environment webhook signing key",
            Purpose::WebhookSecret => "integration webhook secret",
            Purpose::OAuthClientSecret => "integration OAuth2 client secret",
            Purpose::Credentials => "connection credentials",
            Purpose::ForwardSigningKey => "forwarding signing key",
            Purpose::EnvironmentVariable => "environment variable",
        }
    }
}

/// Seals secrets under one key and opens them with it, or with the keys it also opens
/// with while the key changes. Cheap to clone.
#[derive(Clone)]
pub struct Cipher {
    aead: XChaCha20Poly1305,
    also_opens: Arc<[XChaCha20Poly1305]>,
}

impl fmt::Debug for Cipher {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Cipher(***)")
    }
}

impl Cipher {
    pub fn from_bytes(key: [u8; 32]) -> Cipher {
        Cipher {
            aead: XChaCha20Poly1305::new(&key.into()),
            also_opens: Arc::new([]),
        }
    }

    /// This cipher, also opening what `others` sealed (it still seals under its own key).
    pub fn also_opening(self, others: impl IntoIterator<Item = Cipher>) -> Cipher {
        Cipher {
            also_opens: others.into_iter().map(|other| other.aead).collect(),
            ..self
        }
    }

    /// Parses a key written as base64 (padded or not) or hex.
    pub fn from_text(text: &str) -> Result<Cipher, SecretError> {
        let text = text.trim();
        let bytes = if text.len() == 64 && text.bytes().all(|b| b.is_ascii_hexdigit()) {
            hex::decode(text).ok()
        } else {
            STANDARD.decode(text).or_else(|_| STANDARD_NO_PAD.decode(text)).ok()
        };
        let key: [u8; 32] = bytes.and_then(|b| b.try_into().ok()).ok_or(SecretError::BadKey)?;
        Ok(Cipher::from_bytes(key))
    }

    /// A new random key, as base64 text for `HOOKYARD_ENCRYPTION_KEY`.
    pub fn generate_key_text() -> String {
        STANDARD.encode(random_bytes::<32>())
    }

    pub fn seal(&self, purpose: Purpose, plaintext: &str) -> String {
        let nonce = random_bytes::<NONCE_LEN>();
        let sealed = self
            .aead
            .encrypt(
                XNonce::from_slice(&nonce),
                Payload {
                    msg: plaintext.as_bytes(),
                    aad: purpose.label().as_bytes(),
                },
            )
            .expect("XChaCha20-Poly1305 encryption does not fail for in-memory buffers");
        let mut out = Vec::with_capacity(NONCE_LEN + sealed.len());
        out.extend_from_slice(&nonce);
        out.extend_from_slice(&sealed);
        format!("{PREFIX}{}", STANDARD_NO_PAD.encode(out))
    }

    pub fn open(&self, purpose: Purpose, sealed: &str) -> Result<String, SecretError> {
        self.open_telling(purpose, sealed).map(|(plain, _)| plain)
    }

    /// Opens a sealed value, and tells whether it is sealed under this cipher's own key
    /// (`false`: under one it only opens with).
    pub fn open_telling(&self, purpose: Purpose, sealed: &str) -> Result<(String, bool), SecretError> {
        let fail = || SecretError::CannotOpen(purpose.label());
        let bytes = sealed
            .strip_prefix(PREFIX)
            .and_then(|b64| STANDARD_NO_PAD.decode(b64).ok())
            .filter(|bytes| bytes.len() > NONCE_LEN)
            .ok_or_else(fail)?;
        let (nonce, ciphertext) = bytes.split_at(NONCE_LEN);
        let payload = || Payload {
            msg: ciphertext,
            aad: purpose.label().as_bytes(),
        };
        let nonce = XNonce::from_slice(nonce);
        let (plain, own) = match self.aead.decrypt(nonce, payload()) {
            Ok(plain) => (plain, true),
            Err(_) => self
                .also_opens
                .iter()
                .find_map(|aead| aead.decrypt(nonce, payload()).ok())
                .map(|plain| (plain, false))
                .ok_or_else(fail)?,
        };
        String::from_utf8(plain).map(|plain| (plain, own)).map_err(|_| fail())
    }
}

/// The lookup hash of a bearer secret key: SHA-256, hex. Keys are 256 random bits, so
/// an unsalted hash cannot be searched backwards.
pub fn key_hash(secret_key: &str) -> String {
    hex::encode(Sha256::digest(secret_key.as_bytes()))
}

pub fn random_bytes<const N: usize>() -> [u8; N] {
    let mut bytes = [0u8; N];
    getrandom::fill(&mut bytes).expect("the OS random source is unavailable");
    bytes
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_and_hides_the_plaintext() {
        let cipher = Cipher::from_text(&Cipher::generate_key_text()).unwrap();
        let sealed = cipher.seal(Purpose::WebhookSecret, "s3cret");
        assert!(sealed.starts_with("v1:") && !sealed.contains("s3cret"));
        assert_ne!(sealed, cipher.seal(Purpose::WebhookSecret, "s3cret"), "random nonce");
        assert_eq!(cipher.open(Purpose::WebhookSecret, &sealed).unwrap(), "s3cret");
    }

    #[test]
    fn refuses_another_key_another_column_and_damage() {
        let cipher = Cipher::from_bytes([1; 32]);
        let sealed = cipher.seal(Purpose::Credentials, "{}");
        let other = Cipher::from_bytes([2; 32]);
        assert!(other.open(Purpose::Credentials, &sealed).is_err());
        assert!(cipher.open(Purpose::WebhookSecret, &sealed).is_err());
        let mut damaged = sealed.clone();
        damaged.pop();
        damaged.push(if sealed.ends_with('A') { 'B' } else { 'A' });
        assert!(cipher.open(Purpose::Credentials, &damaged).is_err());
        assert!(cipher.open(Purpose::Credentials, "plaintext").is_err());
    }

    #[test]
    fn opens_with_the_keys_it_also_opens_with_and_seals_with_its_own() {
        let (old, new) = (Cipher::from_bytes([1; 32]), Cipher::from_bytes([2; 32]));
        let sealed_old = old.seal(Purpose::Credentials, "old");
        let changing = new.clone().also_opening([old.clone()]);
        assert_eq!(
            changing.open_telling(Purpose::Credentials, &sealed_old).unwrap(),
            ("old".to_string(), false)
        );
        let sealed_new = changing.seal(Purpose::Credentials, "new");
        assert_eq!(
            changing.open_telling(Purpose::Credentials, &sealed_new).unwrap(),
            ("new".to_string(), true)
        );
        assert_eq!(new.open(Purpose::Credentials, &sealed_new).unwrap(), "new");
        assert!(old.open(Purpose::Credentials, &sealed_new).is_err());
        assert!(
            changing.open(Purpose::WebhookSecret, &sealed_old).is_err(),
            "still bound to its column"
        );
        let stranger = Cipher::from_bytes([3; 32]).seal(Purpose::Credentials, "x");
        assert!(changing.open(Purpose::Credentials, &stranger).is_err());
    }

    #[test]
    fn parses_base64_and_hex_keys_only_of_32_bytes() {
        assert!(Cipher::from_text(&STANDARD.encode([7u8; 32])).is_ok());
        assert!(Cipher::from_text(&STANDARD_NO_PAD.encode([7u8; 32])).is_ok());
        assert!(Cipher::from_text(&hex::encode([7u8; 32])).is_ok());
        for bad in ["", "short", &STANDARD.encode([7u8; 16]), &"z".repeat(64)] {
            assert_eq!(Cipher::from_text(bad).unwrap_err(), SecretError::BadKey, "{bad}");
        }
    }
}
