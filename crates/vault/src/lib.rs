//! bulwark-vault: where Bulwark keeps recovery points, on any `object_store` backend.
//!
//! # Layout
//!
//! ```text
//! bulwark-vault.json                    format version, block size, hash and compression params
//! blocks/<2 hex>/<64 hex>               one block, addressed by the BLAKE3 of its content
//! manifests/<vm>/<disk>/<point>.bmap    the complete block map of one disk at one point
//! points/<vm>/<point>.json              a recovery point: consistency, disks → manifest digests
//! ```
//!
//! Every object but the configuration is stored in an [envelope](envelope) that records its
//! kind, length and BLAKE3 digest; every read verifies it, so corruption is an error naming the
//! key, never wrong bytes. A point pins the digest of each disk's manifest, and a manifest the
//! address of each block: a chain of hashes from the point to every byte.
//!
//! # Write order
//!
//! Blocks, then manifests, then the point (written with `PutMode::Create`, once). A point exists
//! only when everything it references exists, so a backup killed at any moment leaves at most
//! unreferenced objects behind, and every committed point stays restorable.
//!
//! ```
//! use bulwark_vault::{Vault, CreateOptions};
//! # #[tokio::main] async fn main() -> Result<(), bulwark_vault::Error> {
//! let dir = tempfile::tempdir().expect("tempdir");
//! let location = dir.path().to_str().expect("utf-8 path");
//! let vault = Vault::create(location, &CreateOptions::default()).await?;
//! let data = bytes::Bytes::from(vec![7u8; 4096]);
//! let address = bulwark_blockdiff::content_address(&data, None);
//! vault.put_block(address, data.clone()).await?;
//! assert_eq!(vault.get_block(address).await?, data);
//!
//! // Anyone pointing at the same location sees the same vault.
//! let again = Vault::open(location).await?;
//! assert_eq!(again.config().id, vault.config().id);
//! # Ok(()) }
//! ```

pub mod envelope;
mod model;
mod verify;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;

use bulwark_blockdiff::{Address, BlockMap, BlockSize, ScanOptions};
use bytes::Bytes;
use futures::{StreamExt, TryStreamExt};
use object_store::path::Path as ObjPath;
use object_store::{ObjectStore, ObjectStoreExt, PutMode, PutOptions, PutPayload};

use envelope::Kind;
pub use model::{
    ChangeHash, Compression, ConsistencyRecord, DiskRecord, DiskStats, ManifestRef, RecoveryPoint,
    VAULT_FORMAT_VERSION, VaultConfig, new_point_id, validate_name,
};
pub use verify::{Problem, VerifyReport};

/// The key of the vault configuration object.
pub const CONFIG_KEY: &str = "bulwark-vault.json";

/// Errors of the vault.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// No vault at this location.
    #[error("no Bulwark vault at {location}: {why}")]
    NoVault {
        /// The location.
        location: String,
        /// Why not.
        why: String,
    },
    /// `create` found a vault already there.
    #[error("a Bulwark vault already exists at {location}")]
    VaultExists {
        /// The location.
        location: String,
    },
    /// A location this build cannot open.
    #[error("cannot use vault location {location:?}: {why}")]
    UnsupportedLocation {
        /// The location.
        location: String,
        /// Why not.
        why: String,
    },
    /// The vault was written by a newer (or unknown) format.
    #[error("vault format version {found} is not supported (this build reads version {supported})")]
    UnsupportedVaultVersion {
        /// The version found.
        found: u32,
        /// The version supported.
        supported: u32,
    },
    /// An object with an envelope version this build does not know.
    #[error("{key}: object format version {found} is not supported")]
    UnsupportedObjectVersion {
        /// The object key.
        key: String,
        /// The version found.
        found: u8,
    },
    /// An object is corrupt: it does not verify.
    #[error("{key}: corrupt: {why}")]
    Corrupt {
        /// The object key.
        key: String,
        /// What is wrong.
        why: String,
    },
    /// An object that should exist does not.
    #[error("{key}: missing from the vault")]
    Missing {
        /// The object key.
        key: String,
    },
    /// A manifest whose block map does not decode.
    #[error("{key}: invalid block map: {source}")]
    Manifest {
        /// The object key.
        key: String,
        /// The decoding error.
        #[source]
        source: bulwark_blockdiff::Error,
    },
    /// The storage backend failed.
    #[error("{key}: storage error: {source}")]
    Store {
        /// The object key (or prefix).
        key: String,
        /// The backend's error.
        #[source]
        source: object_store::Error,
    },
    /// A VM, disk or point name that cannot be used.
    #[error("invalid {what} name {name:?}: {why}")]
    InvalidName {
        /// What the name is for.
        what: &'static str,
        /// The name.
        name: String,
        /// What is wrong.
        why: &'static str,
    },
    /// A point with this id was already committed.
    #[error("{key}: a recovery point with this id already exists")]
    PointExists {
        /// The object key.
        key: String,
    },
    /// No such recovery point.
    #[error("VM {vm:?} has no recovery point {point:?}")]
    NoSuchPoint {
        /// The VM.
        vm: String,
        /// The point asked for.
        point: String,
    },
    /// A recovery point has no such disk.
    #[error("recovery point {point} of VM {vm:?} has no disk {disk:?} (it has: {available})")]
    NoSuchDisk {
        /// The VM.
        vm: String,
        /// The point.
        point: String,
        /// The disk asked for.
        disk: String,
        /// The disks it has.
        available: String,
    },
    /// A worker task failed.
    #[error("vault worker failed: {0}")]
    Worker(String),
}

impl Error {
    fn store(key: &ObjPath, source: object_store::Error) -> Error {
        match source {
            object_store::Error::NotFound { .. } => Error::Missing {
                key: key.to_string(),
            },
            source => Error::Store {
                key: key.to_string(),
                source,
            },
        }
    }
}

/// Options for [`Vault::create`].
#[derive(Debug, Clone)]
pub struct CreateOptions {
    /// Default block size of the disks backed up into the vault.
    pub block_size: BlockSize,
    /// zstd level, or `None` to store uncompressed.
    pub zstd_level: Option<i32>,
}

impl Default for CreateOptions {
    fn default() -> Self {
        CreateOptions {
            block_size: BlockSize::default(),
            zstd_level: Some(1),
        }
    }
}

/// What [`Vault::put_block`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PutBlock {
    /// The vault already held the block: nothing was uploaded.
    pub existed: bool,
    /// Bytes uploaded (0 when it existed).
    pub stored_bytes: u64,
}

/// The points of a vault, and the point objects that could not be read.
#[derive(Debug, Default)]
pub struct PointList {
    /// Readable points, by VM then time.
    pub points: Vec<RecoveryPoint>,
    /// Point objects that failed to load, with the error.
    pub broken: Vec<(String, Error)>,
}

/// A vault: the object store plus its configuration.
#[derive(Debug, Clone)]
pub struct Vault {
    store: Arc<dyn ObjectStore>,
    location: String,
    config: VaultConfig,
    concurrency: usize,
}

/// Turns a location (a path, `file://…`, or `memory:` for tests) into an object store.
fn store_for(location: &str, create_dirs: bool) -> Result<Arc<dyn ObjectStore>, Error> {
    let unsupported = |why: String| Error::UnsupportedLocation {
        location: location.into(),
        why,
    };
    if location == "memory:" || location == "memory://" {
        return Ok(Arc::new(object_store::memory::InMemory::new()));
    }
    let path = if let Some(rest) = location.strip_prefix("file://") {
        PathBuf::from(rest)
    } else if let Some((scheme, _)) = location.split_once("://") {
        return Err(unsupported(format!(
            "unknown URL scheme {scheme:?}: this build supports a local path, file://PATH and memory:"
        )));
    } else {
        PathBuf::from(location)
    };
    if path.as_os_str().is_empty() {
        return Err(unsupported("the path is empty".into()));
    }
    if create_dirs {
        std::fs::create_dir_all(&path)
            .map_err(|e| unsupported(format!("cannot create directory {}: {e}", path.display())))?;
    }
    match std::fs::metadata(&path) {
        Ok(m) if m.is_dir() => {}
        Ok(_) => {
            return Err(Error::NoVault {
                location: location.into(),
                why: format!("{} is not a directory", path.display()),
            });
        }
        Err(e) => {
            return Err(Error::NoVault {
                location: location.into(),
                why: format!("{}: {e}", path.display()),
            });
        }
    }
    let fs = object_store::local::LocalFileSystem::new_with_prefix(&path)
        .map_err(|e| unsupported(e.to_string()))?
        .with_fsync(true);
    Ok(Arc::new(fs))
}

fn block_key(address: &Address) -> ObjPath {
    let hex = address.to_hex();
    ObjPath::from(format!("blocks/{}/{hex}", &hex[..2]))
}

fn manifest_key(m: &ManifestRef<'_>) -> ObjPath {
    ObjPath::from(m.to_string())
}

fn point_key(vm: &str, id: &str) -> ObjPath {
    ObjPath::from(format!("points/{vm}/{id}.json"))
}

async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> Result<T, Error> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| Error::Worker(e.to_string()))
}

impl Vault {
    /// Opens the vault at `location`: a directory path, `file://PATH`, or `memory:` (empty,
    /// for tests).
    pub async fn open(location: &str) -> Result<Vault, Error> {
        let store = store_for(location, false)?;
        Self::open_store(store, location).await
    }

    /// Opens the vault held by `store` (any `object_store` backend). `label` names it in errors.
    pub async fn open_store(store: Arc<dyn ObjectStore>, label: &str) -> Result<Vault, Error> {
        let key = ObjPath::from(CONFIG_KEY);
        let bytes = match store.get(&key).await {
            Ok(r) => r.bytes().await.map_err(|e| Error::store(&key, e))?,
            Err(object_store::Error::NotFound { .. }) => {
                return Err(Error::NoVault {
                    location: label.into(),
                    why: format!(
                        "{CONFIG_KEY} not found (create one with `bulwark-controller init`)"
                    ),
                });
            }
            Err(e) => return Err(Error::store(&key, e)),
        };
        let config = VaultConfig::parse(CONFIG_KEY, &bytes)?;
        Ok(Vault {
            store,
            location: label.into(),
            config,
            concurrency: 16,
        })
    }

    /// Creates a vault at `location` (creating the directory of a local path).
    pub async fn create(location: &str, options: &CreateOptions) -> Result<Vault, Error> {
        let store = store_for(location, true)?;
        Self::create_store(store, location, options).await
    }

    /// Creates a vault in `store`. Fails with [`Error::VaultExists`] if one is there already.
    pub async fn create_store(
        store: Arc<dyn ObjectStore>,
        label: &str,
        options: &CreateOptions,
    ) -> Result<Vault, Error> {
        let config = VaultConfig::new(options.block_size, options.zstd_level);
        let key = ObjPath::from(CONFIG_KEY);
        let mut json =
            serde_json::to_vec_pretty(&config).map_err(|e| Error::Worker(e.to_string()))?;
        json.push(b'\n');
        let opts = PutOptions {
            mode: PutMode::Create,
            ..Default::default()
        };
        match store.put_opts(&key, PutPayload::from(json), opts).await {
            Ok(_) => {}
            Err(object_store::Error::AlreadyExists { .. }) => {
                return Err(Error::VaultExists {
                    location: label.into(),
                });
            }
            Err(e) => return Err(Error::store(&key, e)),
        }
        Ok(Vault {
            store,
            location: label.into(),
            config,
            concurrency: 16,
        })
    }

    /// Opens the vault at `location`, creating it if there is none. Returns whether it was
    /// created.
    pub async fn open_or_create(
        location: &str,
        options: &CreateOptions,
    ) -> Result<(Vault, bool), Error> {
        match Self::open(location).await {
            Ok(v) => Ok((v, false)),
            Err(Error::NoVault { .. }) => match Self::create(location, options).await {
                Ok(v) => Ok((v, true)),
                // Someone else created it in between: use theirs.
                Err(Error::VaultExists { .. }) => Ok((Self::open(location).await?, false)),
                Err(e) => Err(e),
            },
            Err(e) => Err(e),
        }
    }

    /// The location this vault was opened from.
    pub fn location(&self) -> &str {
        &self.location
    }

    /// The vault's configuration.
    pub fn config(&self) -> &VaultConfig {
        &self.config
    }

    /// The underlying object store.
    pub fn store(&self) -> &Arc<dyn ObjectStore> {
        &self.store
    }

    /// How many object requests the vault runs at once for verify and listing.
    pub fn with_concurrency(mut self, n: usize) -> Self {
        self.concurrency = n.max(1);
        self
    }

    /// The concurrency set by [`Vault::with_concurrency`].
    pub fn concurrency(&self) -> usize {
        self.concurrency
    }

    /// Scan options matching this vault (block size, change seed, address key).
    pub fn scan_options(&self) -> ScanOptions {
        ScanOptions {
            block_size: BlockSize::new(self.config.block_size).unwrap_or_default(),
            change_seed: self.config.change_hash.seed,
            address_key: None,
            ..ScanOptions::default()
        }
    }

    /// Whether the vault holds the block at `address`.
    pub async fn has_block(&self, address: &Address) -> Result<bool, Error> {
        let key = block_key(address);
        match self.store.head(&key).await {
            Ok(_) => Ok(true),
            Err(object_store::Error::NotFound { .. }) => Ok(false),
            Err(e) => Err(Error::store(&key, e)),
        }
    }

    /// Stores a block under its address, unless the vault already holds it. Compression runs
    /// on the blocking pool. `address` must be the content address of `data`.
    pub async fn put_block(&self, address: Address, data: Bytes) -> Result<PutBlock, Error> {
        if self.has_block(&address).await? {
            return Ok(PutBlock {
                existed: true,
                stored_bytes: 0,
            });
        }
        let key = block_key(&address);
        let level = self.config.zstd_level();
        let sealed =
            blocking(move || envelope::seal(Kind::Block, &data, level, Some(address.0))).await?;
        let stored = sealed.bytes.len() as u64;
        let opts = PutOptions {
            mode: PutMode::Create,
            ..Default::default()
        };
        match self
            .store
            .put_opts(&key, PutPayload::from(sealed.bytes), opts)
            .await
        {
            Ok(_) => Ok(PutBlock {
                existed: false,
                stored_bytes: stored,
            }),
            Err(object_store::Error::AlreadyExists { .. }) => Ok(PutBlock {
                existed: true,
                stored_bytes: 0,
            }),
            Err(e) => Err(Error::store(&key, e)),
        }
    }

    /// Reads and verifies a block: decompressed, hashed and compared with its address.
    pub async fn get_block(&self, address: Address) -> Result<Bytes, Error> {
        let key = block_key(&address);
        let raw = self.get_raw(&key).await?;
        blocking(move || {
            let key = key.to_string();
            let (plain, digest) = envelope::open(Kind::Block, &key, &raw)?;
            if digest != address.0 {
                return Err(Error::Corrupt {
                    key,
                    why: "block is stored under another address".into(),
                });
            }
            Ok(Bytes::from(plain))
        })
        .await?
    }

    async fn get_raw(&self, key: &ObjPath) -> Result<Bytes, Error> {
        let r = self
            .store
            .get(key)
            .await
            .map_err(|e| Error::store(key, e))?;
        r.bytes().await.map_err(|e| Error::store(key, e))
    }

    /// Stores the block map of one disk at one point. Returns its digest (hex), which the
    /// point pins, and the stored size.
    pub async fn put_manifest(
        &self,
        m: &ManifestRef<'_>,
        map: &BlockMap,
    ) -> Result<(String, u64), Error> {
        validate_name("vm", m.vm)?;
        validate_name("disk", m.disk)?;
        validate_name("point", m.point)?;
        let key = manifest_key(m);
        let encoded = map.encode();
        let level = self.config.zstd_level();
        let sealed =
            blocking(move || envelope::seal(Kind::Manifest, &encoded, level, None)).await?;
        let stored = sealed.bytes.len() as u64;
        let digest = hex::encode(sealed.digest);
        let opts = PutOptions {
            mode: PutMode::Create,
            ..Default::default()
        };
        self.store
            .put_opts(&key, PutPayload::from(sealed.bytes), opts)
            .await
            .map_err(|e| Error::store(&key, e))?;
        Ok((digest, stored))
    }

    /// Reads a block map and checks it is exactly the one the point pinned (`digest`).
    pub async fn get_manifest(&self, m: &ManifestRef<'_>, digest: &str) -> Result<BlockMap, Error> {
        let key = manifest_key(m);
        let raw = self.get_raw(&key).await?;
        let expected = digest.to_string();
        blocking(move || {
            let key = key.to_string();
            let (plain, got) = envelope::open(Kind::Manifest, &key, &raw)?;
            if hex::encode(got) != expected {
                return Err(Error::Corrupt {
                    key,
                    why: "manifest is not the one its recovery point pinned (digest mismatch)"
                        .into(),
                });
            }
            BlockMap::decode(&plain).map_err(|source| Error::Manifest { key, source })
        })
        .await?
    }

    /// Commits a recovery point. Call it only after every manifest it names is stored.
    pub async fn commit_point(&self, point: &RecoveryPoint) -> Result<(), Error> {
        validate_name("vm", &point.vm)?;
        validate_name("point", &point.id)?;
        let key = point_key(&point.vm, &point.id);
        let mut json =
            serde_json::to_vec_pretty(point).map_err(|e| Error::Worker(e.to_string()))?;
        json.push(b'\n');
        // Points stay uncompressed, so an operator can read them.
        let sealed = envelope::seal(Kind::Point, &json, None, None);
        let opts = PutOptions {
            mode: PutMode::Create,
            ..Default::default()
        };
        match self
            .store
            .put_opts(&key, PutPayload::from(sealed.bytes), opts)
            .await
        {
            Ok(_) => Ok(()),
            Err(object_store::Error::AlreadyExists { .. }) => Err(Error::PointExists {
                key: key.to_string(),
            }),
            Err(e) => Err(Error::store(&key, e)),
        }
    }

    /// Reads one recovery point.
    pub async fn get_point(&self, vm: &str, id: &str) -> Result<RecoveryPoint, Error> {
        validate_name("vm", vm)?;
        validate_name("point", id)?;
        let key = point_key(vm, id);
        match self.get_raw(&key).await {
            Err(Error::Missing { .. }) => Err(Error::NoSuchPoint {
                vm: vm.into(),
                point: id.into(),
            }),
            Err(e) => Err(e),
            Ok(raw) => Self::parse_point(key.as_ref(), vm, id, &raw),
        }
    }

    fn parse_point(key: &str, vm: &str, id: &str, raw: &[u8]) -> Result<RecoveryPoint, Error> {
        let (plain, _) = envelope::open(Kind::Point, key, raw)?;
        let p: RecoveryPoint = serde_json::from_slice(&plain).map_err(|e| Error::Corrupt {
            key: key.into(),
            why: format!("invalid point record: {e}"),
        })?;
        if p.vm != vm || p.id != id {
            return Err(Error::Corrupt {
                key: key.into(),
                why: format!(
                    "record says VM {:?} point {:?}: stored under the wrong key",
                    p.vm, p.id
                ),
            });
        }
        Ok(p)
    }

    /// Lists the recovery points of one VM, or of all VMs, oldest first within each VM.
    pub async fn list_points(&self, vm: Option<&str>) -> Result<PointList, Error> {
        if let Some(vm) = vm {
            validate_name("vm", vm)?;
        }
        let prefix = ObjPath::from(match vm {
            Some(vm) => format!("points/{vm}"),
            None => "points".to_string(),
        });
        let metas: Vec<_> = self
            .store
            .list(Some(&prefix))
            .try_collect()
            .await
            .map_err(|e| Error::store(&prefix, e))?;
        let mut ids: Vec<(String, String)> = Vec::new();
        for meta in metas {
            let parts: Vec<_> = meta.location.parts().collect();
            // points/<vm>/<id>.json; anything else (e.g. a staging file) is not a point.
            if let [_, vm, file] = parts.as_slice()
                && let Some(id) = file.as_ref().strip_suffix(".json")
                && validate_name("point", id).is_ok()
            {
                ids.push((vm.as_ref().to_string(), id.to_string()));
            }
        }
        let loaded: Vec<_> = futures::stream::iter(ids)
            .map(|(vm, id)| async move {
                let key = point_key(&vm, &id).to_string();
                (key, self.get_point(&vm, &id).await)
            })
            .buffer_unordered(self.concurrency)
            .collect()
            .await;
        let mut list = PointList::default();
        for (key, r) in loaded {
            match r {
                Ok(p) => list.points.push(p),
                Err(e) => list.broken.push((key, e)),
            }
        }
        list.points
            .sort_by(|a, b| (&a.vm, a.created, &a.id).cmp(&(&b.vm, b.created, &b.id)));
        list.broken.sort_by(|a, b| a.0.cmp(&b.0));
        Ok(list)
    }

    /// The newest readable point of `vm`, if any.
    pub async fn latest_point(&self, vm: &str) -> Result<Option<RecoveryPoint>, Error> {
        Ok(self.list_points(Some(vm)).await?.points.pop())
    }

    /// Resolves `selector` (`latest` or a point id) to a point of `vm`.
    pub async fn resolve_point(&self, vm: &str, selector: &str) -> Result<RecoveryPoint, Error> {
        if selector == "latest" {
            self.latest_point(vm)
                .await?
                .ok_or_else(|| Error::NoSuchPoint {
                    vm: vm.into(),
                    point: "latest".into(),
                })
        } else {
            self.get_point(vm, selector).await
        }
    }

    /// The VMs that have points, with their point counts.
    pub async fn vms(&self) -> Result<BTreeMap<String, usize>, Error> {
        let mut out = BTreeMap::new();
        for p in self.list_points(None).await?.points {
            *out.entry(p.vm).or_insert(0) += 1;
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests;
