//! Client-side encryption: the master key, its key file, and the keys derived from it.
//!
//! A vault is encrypted when it is created with a [`MasterKey`]. Three keys are derived from
//! the master key with BLAKE3's key derivation, each for one purpose:
//!
//! - the **object key** encrypts every block, manifest and point with XChaCha20-Poly1305
//!   (random 192-bit nonce per object), with the envelope header and the object's key (its
//!   name in the vault) as associated data: an object moved to another name, or any byte
//!   changed, fails to decrypt;
//! - the **address key** makes block addresses keyed BLAKE3, so stored names reveal nothing
//!   about content (and the digests of manifests and points are keyed too);
//! - the **check key** computes the key check value kept in `bulwark-vault.json`, so a wrong
//!   key is refused when the vault is opened, before anything is read or written.
//!
//! # Key file
//!
//! JSON, mode 0600: `{"format": "bulwark-key", "version": 1, "fingerprint": …, "key": hex}` or,
//! protected by a passphrase, `"kdf": {argon2id parameters, salt}` and `"wrapped": hex` (the
//! master key sealed with XChaCha20-Poly1305 under the Argon2id-derived key) instead of
//! `"key"`. The fingerprint identifies the key without revealing it.

use std::path::Path;

use chacha20poly1305::aead::{Aead, KeyInit, Payload};
use chacha20poly1305::{XChaCha20Poly1305, XNonce};
use serde::{Deserialize, Serialize};
use zeroize::Zeroizing;

use crate::Error;

const KEY_FORMAT: &str = "bulwark-key";
const KEY_VERSION: u32 = 1;
const WRAP_AAD: &[u8] = b"bulwark-key v1 wrapped master key";
/// The AEAD of encrypted vaults, as recorded in `bulwark-vault.json`.
pub const CIPHER_NAME: &str = "xchacha20-poly1305";
/// The address hash of encrypted vaults.
pub const KEYED_ADDRESS_HASH: &str = "blake3-keyed";

/// Argon2id cost used when wrapping a key with a passphrase.
const ARGON_MEMORY_KIB: u32 = 64 * 1024;
const ARGON_ITERATIONS: u32 = 3;
const ARGON_PARALLELISM: u32 = 1;

/// A vault master key: 32 random bytes, wiped from memory when dropped.
#[derive(Clone)]
pub struct MasterKey(Zeroizing<[u8; 32]>);

impl std::fmt::Debug for MasterKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "MasterKey({})", self.fingerprint())
    }
}

#[derive(Debug, Serialize, Deserialize)]
struct KeyFile {
    format: String,
    version: u32,
    fingerprint: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    key: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    kdf: Option<Kdf>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    wrapped: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Kdf {
    algorithm: String,
    memory_kib: u32,
    iterations: u32,
    parallelism: u32,
    salt: String,
}

fn key_err(path: &Path, why: impl Into<String>) -> Error {
    Error::KeyFile {
        path: path.display().to_string(),
        why: why.into(),
    }
}

fn derive_wrapping_key(
    path: &Path,
    kdf: &Kdf,
    passphrase: &str,
) -> Result<Zeroizing<[u8; 32]>, Error> {
    if kdf.algorithm != "argon2id" {
        return Err(key_err(path, format!("unknown KDF {:?}", kdf.algorithm)));
    }
    let salt = hex::decode(&kdf.salt).map_err(|_| key_err(path, "salt is not hex"))?;
    let params = argon2::Params::new(kdf.memory_kib, kdf.iterations, kdf.parallelism, Some(32))
        .map_err(|e| key_err(path, format!("bad KDF parameters: {e}")))?;
    let argon = argon2::Argon2::new(argon2::Algorithm::Argon2id, argon2::Version::V0x13, params);
    let mut out = Zeroizing::new([0u8; 32]);
    argon
        .hash_password_into(passphrase.as_bytes(), &salt, out.as_mut())
        .map_err(|e| key_err(path, format!("KDF failed: {e}")))?;
    Ok(out)
}

impl MasterKey {
    /// A new random key.
    pub fn generate() -> MasterKey {
        MasterKey(Zeroizing::new(rand::random()))
    }

    /// A key from its bytes.
    pub fn from_bytes(bytes: [u8; 32]) -> MasterKey {
        MasterKey(Zeroizing::new(bytes))
    }

    /// A short public identifier of the key (hex, 32 characters).
    pub fn fingerprint(&self) -> String {
        let fp = blake3::derive_key("bulwark 2026 master key fingerprint", self.0.as_ref());
        hex::encode(&fp[..16])
    }

    fn derive(&self, purpose: &str) -> [u8; 32] {
        blake3::derive_key(purpose, self.0.as_ref())
    }

    /// The key block addresses are keyed with (`ScanOptions::address_key`).
    pub fn address_key(&self) -> [u8; 32] {
        self.derive("bulwark 2026 block address key")
    }

    /// The key check value recorded for vault `vault_id`.
    pub fn check_value(&self, vault_id: &str) -> String {
        let k = self.derive("bulwark 2026 vault key check");
        let mac = blake3::keyed_hash(&k, format!("bulwark-vault key check {vault_id}").as_bytes());
        hex::encode(mac.as_bytes())
    }

    /// The cipher for vault objects.
    pub fn cipher(&self) -> ObjectCipher {
        let k = Zeroizing::new(self.derive("bulwark 2026 object encryption key"));
        ObjectCipher {
            aead: XChaCha20Poly1305::new(k.as_ref().into()),
            hash_key: self.address_key(),
        }
    }

    /// A new random key, written to a new file at `path` (see [`MasterKey::write_file`]).
    pub fn create_file(path: &Path, passphrase: Option<&str>) -> Result<MasterKey, Error> {
        let key = MasterKey::generate();
        key.write_file(path, passphrase)?;
        Ok(key)
    }

    /// Writes the key to a new file at `path` (mode 0600; never overwrites), protected by
    /// `passphrase` when given.
    pub fn write_file(&self, path: &Path, passphrase: Option<&str>) -> Result<(), Error> {
        let text = self.encode(path, passphrase)?;
        write_new(path, &text)
    }

    fn encode(&self, path: &Path, passphrase: Option<&str>) -> Result<String, Error> {
        let mut file = KeyFile {
            format: KEY_FORMAT.into(),
            version: KEY_VERSION,
            fingerprint: self.fingerprint(),
            key: None,
            kdf: None,
            wrapped: None,
        };
        match passphrase {
            None => file.key = Some(hex::encode(self.0.as_ref())),
            Some("") => return Err(key_err(path, "the passphrase is empty")),
            Some(p) => {
                let salt: [u8; 16] = rand::random();
                let kdf = Kdf {
                    algorithm: "argon2id".into(),
                    memory_kib: ARGON_MEMORY_KIB,
                    iterations: ARGON_ITERATIONS,
                    parallelism: ARGON_PARALLELISM,
                    salt: hex::encode(salt),
                };
                let wk = derive_wrapping_key(path, &kdf, p)?;
                let aead = XChaCha20Poly1305::new(wk.as_ref().into());
                let nonce: [u8; 24] = rand::random();
                let ct = aead
                    .encrypt(
                        XNonce::from_slice(&nonce),
                        Payload {
                            msg: self.0.as_ref(),
                            aad: WRAP_AAD,
                        },
                    )
                    .map_err(|_| key_err(path, "cannot wrap the key"))?;
                let mut w = nonce.to_vec();
                w.extend_from_slice(&ct);
                file.kdf = Some(kdf);
                file.wrapped = Some(hex::encode(w));
            }
        }
        let mut text =
            serde_json::to_string_pretty(&file).map_err(|e| key_err(path, e.to_string()))?;
        text.push('\n');
        Ok(text)
    }

    /// Reads a key file. A passphrase-protected file needs `passphrase`.
    pub fn load(path: &Path, passphrase: Option<&str>) -> Result<MasterKey, Error> {
        let file = read_key_file(path)?;
        let key = match (&file.key, &file.kdf, &file.wrapped) {
            (Some(hex_key), None, None) => {
                let bytes = Zeroizing::new(
                    hex::decode(hex_key).map_err(|_| key_err(path, "key is not hex"))?,
                );
                let arr: [u8; 32] = bytes
                    .as_slice()
                    .try_into()
                    .map_err(|_| key_err(path, "key is not 32 bytes"))?;
                MasterKey::from_bytes(arr)
            }
            (None, Some(kdf), Some(wrapped)) => {
                let Some(p) = passphrase else {
                    return Err(Error::PassphraseRequired {
                        path: path.display().to_string(),
                    });
                };
                let wk = derive_wrapping_key(path, kdf, p)?;
                let w =
                    hex::decode(wrapped).map_err(|_| key_err(path, "wrapped key is not hex"))?;
                if w.len() != 24 + 32 + 16 {
                    return Err(key_err(path, "wrapped key has the wrong length"));
                }
                let aead = XChaCha20Poly1305::new(wk.as_ref().into());
                let plain = Zeroizing::new(
                    aead.decrypt(
                        XNonce::from_slice(&w[..24]),
                        Payload {
                            msg: &w[24..],
                            aad: WRAP_AAD,
                        },
                    )
                    .map_err(|_| Error::WrongPassphrase {
                        path: path.display().to_string(),
                    })?,
                );
                let arr: [u8; 32] = plain
                    .as_slice()
                    .try_into()
                    .map_err(|_| key_err(path, "key is not 32 bytes"))?;
                MasterKey::from_bytes(arr)
            }
            _ => {
                return Err(key_err(
                    path,
                    "needs either \"key\" or \"kdf\" and \"wrapped\"",
                ));
            }
        };
        if key.fingerprint() != file.fingerprint {
            return Err(key_err(
                path,
                "the key does not match the file's fingerprint",
            ));
        }
        Ok(key)
    }

    /// Rewrites the key file at `path` under a new passphrase (or none), atomically.
    pub fn change_passphrase(
        path: &Path,
        old: Option<&str>,
        new: Option<&str>,
    ) -> Result<MasterKey, Error> {
        let key = MasterKey::load(path, old)?;
        let text = key.encode(path, new)?;
        let tmp = path.with_extension("tmp-rewrap");
        let _ = std::fs::remove_file(&tmp);
        write_new(&tmp, &text)?;
        std::fs::rename(&tmp, path).map_err(|e| key_err(path, e.to_string()))?;
        Ok(key)
    }
}

/// Whether the key file at `path` needs a passphrase, and its fingerprint.
pub fn key_file_info(path: &Path) -> Result<(bool, String), Error> {
    let f = read_key_file(path)?;
    Ok((f.wrapped.is_some(), f.fingerprint))
}

fn read_key_file(path: &Path) -> Result<KeyFile, Error> {
    let text = std::fs::read_to_string(path).map_err(|e| key_err(path, e.to_string()))?;
    let file: KeyFile = serde_json::from_str(&text)
        .map_err(|e| key_err(path, format!("not a Bulwark key file: {e}")))?;
    if file.format != KEY_FORMAT {
        return Err(key_err(path, "not a Bulwark key file"));
    }
    if file.version != KEY_VERSION {
        return Err(key_err(
            path,
            format!("key file version {} is not supported", file.version),
        ));
    }
    Ok(file)
}

fn write_new(path: &Path, text: &str) -> Result<(), Error> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(|e| key_err(path, e.to_string()))?;
    f.write_all(text.as_bytes())
        .and_then(|_| f.sync_all())
        .map_err(|e| key_err(path, e.to_string()))
}

/// Encrypts and authenticates vault objects, and computes keyed digests.
#[derive(Clone)]
pub struct ObjectCipher {
    aead: XChaCha20Poly1305,
    hash_key: [u8; 32],
}

impl std::fmt::Debug for ObjectCipher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ObjectCipher(..)")
    }
}

impl ObjectCipher {
    /// The key block addresses and digests are keyed with.
    pub(crate) fn address_key(&self) -> [u8; 32] {
        self.hash_key
    }

    /// Keyed BLAKE3 of `data`.
    pub fn digest(&self, data: &[u8]) -> [u8; 32] {
        *blake3::keyed_hash(&self.hash_key, data).as_bytes()
    }

    /// Encrypts `msg` with a fresh random nonce; returns nonce ‖ ciphertext ‖ tag.
    pub(crate) fn seal(&self, msg: &[u8], aad: &[u8]) -> Option<Vec<u8>> {
        let nonce: [u8; 24] = rand::random();
        let ct = self
            .aead
            .encrypt(XNonce::from_slice(&nonce), Payload { msg, aad })
            .ok()?;
        let mut out = Vec::with_capacity(24 + ct.len());
        out.extend_from_slice(&nonce);
        out.extend_from_slice(&ct);
        Some(out)
    }

    /// Decrypts nonce ‖ ciphertext ‖ tag; `None` if it does not authenticate.
    pub(crate) fn open(&self, sealed: &[u8], aad: &[u8]) -> Option<Vec<u8>> {
        if sealed.len() < 24 + 16 {
            return None;
        }
        self.aead
            .decrypt(
                XNonce::from_slice(&sealed[..24]),
                Payload {
                    msg: &sealed[24..],
                    aad,
                },
            )
            .ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_files_plain_and_wrapped() {
        let dir = tempfile::tempdir().unwrap();
        let k = MasterKey::generate();
        let plain = dir.path().join("plain.key");
        k.write_file(&plain, None).unwrap();
        assert!(k.write_file(&plain, None).is_err(), "never overwrites");
        assert_eq!(
            MasterKey::load(&plain, None).unwrap().fingerprint(),
            k.fingerprint()
        );
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(
            std::fs::metadata(&plain).unwrap().permissions().mode() & 0o777,
            0o600
        );

        let wrapped = dir.path().join("wrapped.key");
        k.write_file(&wrapped, Some("correct horse")).unwrap();
        let text = std::fs::read_to_string(&wrapped).unwrap();
        assert!(!text.contains(&hex::encode(k.0.as_ref())), "no plain key");
        assert!(matches!(
            MasterKey::load(&wrapped, None),
            Err(Error::PassphraseRequired { .. })
        ));
        assert!(matches!(
            MasterKey::load(&wrapped, Some("wrong")),
            Err(Error::WrongPassphrase { .. })
        ));
        let back = MasterKey::load(&wrapped, Some("correct horse")).unwrap();
        assert_eq!(back.address_key(), k.address_key());
        assert_eq!(key_file_info(&wrapped).unwrap(), (true, k.fingerprint()));

        MasterKey::change_passphrase(&wrapped, Some("correct horse"), Some("battery")).unwrap();
        assert!(MasterKey::load(&wrapped, Some("correct horse")).is_err());
        assert_eq!(
            MasterKey::load(&wrapped, Some("battery"))
                .unwrap()
                .fingerprint(),
            k.fingerprint()
        );
    }

    #[test]
    fn derived_keys_differ_and_check_values_bind_the_vault() {
        let k = MasterKey::generate();
        assert_ne!(
            k.address_key(),
            k.derive("bulwark 2026 object encryption key")
        );
        assert_ne!(k.check_value("a"), k.check_value("b"));
        assert_ne!(k.check_value("a"), MasterKey::generate().check_value("a"));
        let c = k.cipher();
        let s = c.seal(b"hello", b"k1").unwrap();
        assert_eq!(c.open(&s, b"k1").unwrap(), b"hello");
        assert!(c.open(&s, b"k2").is_none());
    }
}
