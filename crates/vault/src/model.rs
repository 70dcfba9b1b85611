//! The vault's records: its configuration, recovery points, and name rules.

use std::fmt;

use bulwark_blockdiff::BlockSize;
use bulwark_consistency::Level;
use jiff::Timestamp;
use serde::{Deserialize, Serialize};

use crate::Error;

/// The vault format this build writes, in `bulwark-vault.json`.
pub const VAULT_FORMAT_VERSION: u32 = 1;
const VAULT_FORMAT_NAME: &str = "bulwark-vault";

/// The configuration of a vault, fixed when it is created (`bulwark-vault.json`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VaultConfig {
    /// Always `"bulwark-vault"`.
    pub format: String,
    /// The format version.
    pub version: u32,
    /// A random identifier of this vault.
    pub id: String,
    /// When the vault was created.
    pub created: Timestamp,
    /// Default block size for disks backed up into this vault, in bytes.
    pub block_size: u32,
    /// Change detection: `xxh3-128` with this vault's random seed.
    pub change_hash: ChangeHash,
    /// Content addresses: `blake3`.
    pub address_hash: String,
    /// Compression of stored objects.
    pub compression: Compression,
    /// Client-side encryption, when the vault was created with a key.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub encryption: Option<Encryption>,
    /// Whether the store refused a second create-only write of the same key when the vault
    /// was created (see [`crate::conditional`]); absent in older vaults (taken as `true`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub conditional_writes: Option<bool>,
    /// Every object is write-once for a retention period (see [`crate::immutable`]); absent
    /// in ordinary vaults.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub immutable: Option<crate::immutable::Immutability>,
}

/// Encryption parameters of an encrypted vault (see [`crate::crypto`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Encryption {
    /// The AEAD: `"xchacha20-poly1305"`.
    pub cipher: String,
    /// How the keys are derived from the master key: `"blake3-derive-key"`.
    pub key_derivation: String,
    /// Fingerprint of the master key (public).
    pub key_fingerprint: String,
    /// Keyed BLAKE3 of a fixed string naming this vault, under a key derived from the master
    /// key: a wrong key is refused before anything is read or written.
    pub key_check: String,
}

/// Change-detection hash parameters.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChangeHash {
    /// Always `"xxh3-128"`.
    pub algorithm: String,
    /// The seed.
    pub seed: u64,
}

/// Compression parameters.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Compression {
    /// `"zstd"` or `"none"`.
    pub algorithm: String,
    /// The zstd level.
    pub level: i32,
}

impl VaultConfig {
    /// A new configuration with a fresh id and seed.
    pub fn new(block_size: BlockSize, zstd_level: Option<i32>) -> VaultConfig {
        VaultConfig {
            format: VAULT_FORMAT_NAME.into(),
            version: VAULT_FORMAT_VERSION,
            id: random_hex(16),
            created: Timestamp::now(),
            block_size: block_size.get(),
            change_hash: ChangeHash {
                algorithm: "xxh3-128".into(),
                seed: rand::random(),
            },
            address_hash: "blake3".into(),
            compression: match zstd_level {
                Some(level) => Compression {
                    algorithm: "zstd".into(),
                    level,
                },
                None => Compression {
                    algorithm: "none".into(),
                    level: 0,
                },
            },
            encryption: None,
            conditional_writes: None,
            immutable: None,
        }
    }

    /// Parses and checks `bulwark-vault.json`.
    pub fn parse(key: &str, bytes: &[u8]) -> Result<VaultConfig, Error> {
        let cfg: VaultConfig = serde_json::from_slice(bytes).map_err(|e| Error::Corrupt {
            key: key.into(),
            why: format!("not a valid vault configuration: {e}"),
        })?;
        if cfg.format != VAULT_FORMAT_NAME {
            return Err(Error::Corrupt {
                key: key.into(),
                why: format!("format is {:?}, not {VAULT_FORMAT_NAME:?}", cfg.format),
            });
        }
        if cfg.version != VAULT_FORMAT_VERSION {
            return Err(Error::UnsupportedVaultVersion {
                found: cfg.version,
                supported: VAULT_FORMAT_VERSION,
            });
        }
        let bad = |why: String| Error::Corrupt {
            key: key.into(),
            why,
        };
        BlockSize::new(cfg.block_size).map_err(|e| bad(e.to_string()))?;
        // An encrypted vault names its keyed address hash, which older builds refuse.
        let address_ok = match &cfg.encryption {
            None => cfg.address_hash == "blake3",
            Some(e) => {
                if e.cipher != crate::crypto::CIPHER_NAME {
                    return Err(bad(format!("unknown cipher {:?}", e.cipher)));
                }
                cfg.address_hash == crate::crypto::KEYED_ADDRESS_HASH
            }
        };
        if cfg.change_hash.algorithm != "xxh3-128" || !address_ok {
            return Err(bad("unknown hash algorithms".into()));
        }
        match cfg.compression.algorithm.as_str() {
            "none" => {}
            "zstd" if (1..=22).contains(&cfg.compression.level) => {}
            other => {
                return Err(bad(format!(
                    "unknown compression {other} level {}",
                    cfg.compression.level
                )));
            }
        }
        if let Some(i) = &cfg.immutable {
            i.check(key)?;
        }
        Ok(cfg)
    }

    /// The zstd level to store objects with, if compression is on.
    pub fn zstd_level(&self) -> Option<i32> {
        (self.compression.algorithm == "zstd").then_some(self.compression.level)
    }
}

/// The consistency a recovery point reached and how it got there.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConsistencyRecord {
    /// The level reached.
    pub reached: Level,
    /// The level wanted.
    pub wanted: Level,
    /// Why the level reached is below the level wanted (every fallback), or notes.
    #[serde(default)]
    pub reasons: Vec<String>,
    /// How long the guest was frozen, in milliseconds, when it was.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub freeze_window_ms: Option<u64>,
}

impl ConsistencyRecord {
    /// A crash-consistent record: nothing was asked of the guest.
    pub fn crash() -> Self {
        ConsistencyRecord {
            reached: Level::Crash,
            wanted: Level::Crash,
            reasons: Vec::new(),
            freeze_window_ms: None,
        }
    }
}

/// What happened to one disk during a backup.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiskStats {
    /// Blocks in the disk.
    pub blocks: u64,
    /// Blocks that were new or changed since the previous point.
    pub changed_blocks: u64,
    /// Blocks whose entry was reused from the previous point.
    pub unchanged_blocks: u64,
    /// Blocks that were zero (written zeros or holes).
    pub zero_blocks: u64,
    /// Of the zero blocks, those that were holes and not read.
    pub hole_blocks: u64,
    /// Bytes read from the disk snapshot.
    pub bytes_read: u64,
    /// Unchanged blocks that were not read at all: change tracking knew them unchanged.
    #[serde(default)]
    pub blocks_not_read: u64,
    /// Plain bytes of changed blocks.
    pub bytes_changed: u64,
    /// Changed blocks that the vault already held (deduplicated).
    pub blocks_deduplicated: u64,
    /// Blocks uploaded.
    pub blocks_uploaded: u64,
    /// Blocks the vault held damaged or not at all (recorded by `verify`, or found missing),
    /// read from the disk again and stored anew.
    #[serde(default)]
    pub blocks_healed: u64,
    /// Plain bytes of the blocks uploaded.
    pub bytes_new: u64,
    /// Of `bytes_new`, those not compressed again: their compressed frames were taken from
    /// the block they replace (spans change tracking reported unchanged).
    #[serde(default)]
    pub bytes_reused: u64,
    /// Stored bytes uploaded (after compression), blocks and manifest.
    pub bytes_uploaded: u64,
    /// Wall time of the transfer, milliseconds.
    pub duration_ms: u64,
}

/// One disk in a recovery point.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiskRecord {
    /// The disk's name within the VM.
    pub name: String,
    /// Size in bytes.
    pub size: u64,
    /// Block size in bytes.
    pub block_size: u32,
    /// BLAKE3 of the disk's block map: the point pins exactly one manifest.
    pub manifest_digest: String,
    /// The image path the disk was read from (informational).
    #[serde(default)]
    pub source: String,
    /// Transfer statistics.
    #[serde(default)]
    pub stats: DiskStats,
    /// The disk source's change-tracking record, handed back to it on the next backup
    /// (absent in points written before it existed, and for sources that track nothing).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tracking: Option<bulwark_blockdiff::Tracking>,
}

/// A committed recovery point of one VM.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RecoveryPoint {
    /// The point id (time-ordered).
    pub id: String,
    /// The VM.
    pub vm: String,
    /// When the snapshot was taken.
    pub created: Timestamp,
    /// When the point was committed.
    pub committed: Timestamp,
    /// The consistency reached.
    pub consistency: ConsistencyRecord,
    /// The disks, each pinned to its block map.
    pub disks: Vec<DiskRecord>,
    /// The policy the job ran under, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub policy: Option<String>,
    /// The guest agent that quiesced the VM, if any (identity, version, capabilities).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub agent: Option<serde_json::Value>,
}

impl RecoveryPoint {
    /// The disk record named `name`.
    pub fn disk(&self, name: &str) -> Option<&DiskRecord> {
        self.disks.iter().find(|d| d.name == name)
    }
}

/// Checks a VM, disk or point name: 1–128 characters from `A–Z a–z 0–9 . _ -`, not starting
/// with `.` or `-`. Names become parts of object keys, so nothing else is allowed.
pub fn validate_name(what: &'static str, name: &str) -> Result<(), Error> {
    let why = if name.is_empty() {
        Some("is empty")
    } else if name.len() > 128 {
        Some("is longer than 128 characters")
    } else if name.starts_with('.') || name.starts_with('-') {
        Some("starts with '.' or '-'")
    } else if !name
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
    {
        Some("may only contain letters, digits, '.', '_' and '-'")
    } else {
        None
    };
    match why {
        Some(why) => Err(Error::InvalidName {
            what,
            name: name.to_string(),
            why,
        }),
        None => Ok(()),
    }
}

/// A new point id: UTC time to the millisecond and a random suffix, so ids sort by time.
pub fn new_point_id(at: Timestamp) -> String {
    format!(
        "{}{:03}Z-{}",
        at.strftime("%Y%m%dT%H%M%S."),
        at.subsec_millisecond(),
        random_hex(3)
    )
}

pub(crate) fn random_hex(bytes: usize) -> String {
    let mut s = String::with_capacity(bytes * 2);
    for _ in 0..bytes {
        let b: u8 = rand::random();
        s.push_str(&format!("{b:02x}"));
    }
    s
}

/// Identifies a block map in the vault.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ManifestRef<'a> {
    /// VM name.
    pub vm: &'a str,
    /// Disk name.
    pub disk: &'a str,
    /// Point id.
    pub point: &'a str,
}

impl fmt::Display for ManifestRef<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "manifests/{}/{}/{}.bmap", self.vm, self.disk, self.point)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        assert!(validate_name("vm", "web-01.prod_a").is_ok());
        for bad in ["", "..", ".x", "-x", "a/b", "a b", "ä", &"x".repeat(129)] {
            let e = validate_name("vm", bad).unwrap_err();
            assert!(e.to_string().contains("vm name"), "{e}");
        }
    }

    #[test]
    fn point_ids_sort_by_time() {
        let a = new_point_id(Timestamp::from_second(1_700_000_000).unwrap());
        let b = new_point_id(Timestamp::from_millisecond(1_700_000_000_001).unwrap());
        assert!(a < b, "{a} {b}");
        assert!(validate_name("point", &a).is_ok(), "{a}");
        assert!(a.starts_with("20231114T221320.000Z-"), "{a}");
    }

    #[test]
    fn config_round_trip_and_checks() {
        let c = VaultConfig::new(BlockSize::default(), Some(3));
        let bytes = serde_json::to_vec(&c).unwrap();
        assert_eq!(VaultConfig::parse("k", &bytes).unwrap(), c);
        let mut v: serde_json::Value = serde_json::from_slice(&bytes).unwrap();
        v["version"] = 99.into();
        let e = VaultConfig::parse("k", &serde_json::to_vec(&v).unwrap()).unwrap_err();
        assert!(e.to_string().contains("version 99"), "{e}");
        assert!(VaultConfig::parse("k", b"{not json").is_err());
    }

    #[test]
    fn disk_tracking_is_optional() {
        // A disk entry written before tracking records existed still reads.
        let old = r#"{"name":"os","size":10,"block_size":65536,"manifest_digest":"ab"}"#;
        let d: DiskRecord = serde_json::from_str(old).unwrap();
        assert_eq!(d.tracking, None);
        assert!(!serde_json::to_string(&d).unwrap().contains("tracking"));
        let with = DiskRecord {
            tracking: Some(bulwark_blockdiff::Tracking {
                kind: "qemu-dirty-bitmap".into(),
                fields: [("name".to_string(), "b1".to_string())].into(),
            }),
            ..d
        };
        let back: DiskRecord =
            serde_json::from_str(&serde_json::to_string(&with).unwrap()).unwrap();
        assert_eq!(back, with);
    }
}
