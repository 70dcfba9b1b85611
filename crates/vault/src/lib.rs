//! bulwark-vault: where Bulwark keeps recovery points, on any `object_store` backend.
//!
//! # Layout
//!
//! ```text
//! bulwark-vault.json                    format version, block size, hash and compression params
//! blocks/<2 hex>/<64 hex>               one block, addressed by the BLAKE3 of its content
//! manifests/<vm>/<disk>/<point>.bmap    the complete block map of one disk at one point
//! points/<vm>/<point>.json              a recovery point: consistency, disks → manifest digests
//! deleted/points/<vm>/<point>.json      a soft-deleted point (tombstone), see [`Vault::soft_delete`]
//! locks/<backup|prune|gc>-<id>          leases that keep GC and backups apart, see [`lease`]
//! owners/<vm>.json                      which host backs the VM up (first claim), see [`owner`]
//! owners/takeovers/<vm>/<n>.json        take-over n of the VM (create-only; the highest wins)
//! ```
//!
//! Retention: prune soft-deletes points (`deleted/`), purges them after the policy's days, and
//! [`Vault::gc`] frees what no live or soft-deleted point references.
//!
//! Every object but the configuration is stored in an [envelope] that records its
//! kind, length and BLAKE3 digest; every read verifies it, so corruption is an error naming the
//! key, never wrong bytes. A point pins the digest of each disk's manifest, and a manifest the
//! address of each block: a chain of hashes from the point to every byte.
//!
//! # Locations, encryption, faults
//!
//! A vault lives at a local path, `file://PATH`, `az://CONTAINER[/PREFIX]` (Azure Blob, also
//! `azure://`) or `s3://BUCKET[/PREFIX]`; [`location`] turns each into one `ObjectStore`, with
//! credentials, endpoints, timeouts and retries from [`StoreOptions`]. Every vault counts its
//! requests and bytes ([`Vault::store_stats`]). A vault created with a [`MasterKey`]
//! ([`Vault::create_with`]) is encrypted: see [`crypto`]. [`fault::FaultyStore`] injects storage
//! faults for tests; the vault retries idempotent requests ([`retry`]).
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

pub mod bounded;
pub mod conditional;
pub mod crypto;
pub mod envelope;
mod error;
pub mod fault;
mod gc;
pub mod health;
pub mod immutable;
mod immutable_gc;
pub mod lease;
pub mod location;
mod model;
pub mod owner;
mod prune;
mod report;
pub mod retry;
pub mod stats;
pub mod unhide;
mod verify;

use std::collections::BTreeMap;
use std::sync::Arc;

use bulwark_blockdiff::{Address, BlockMap, BlockSize, ScanOptions};
use bytes::Bytes;
use futures::{StreamExt, TryStreamExt};
use jiff::Timestamp;
use object_store::path::Path as ObjPath;
use object_store::{ObjectStore, ObjectStoreExt, PutMode, PutOptions, PutPayload};

pub use crypto::MasterKey;
use envelope::Kind;
pub use error::Error;
pub use gc::{GcOptions, GcReport};
pub use immutable_gc::ImmutableGcReport;
pub use lease::{Lease, LeaseKind, LeaseOptions, LeaseRecord};
pub use location::{Location, StoreOptions};
pub use model::{
    ChangeHash, Compression, ConsistencyRecord, DiskRecord, DiskStats, Encryption, ManifestRef,
    RecoveryPoint, VAULT_FORMAT_VERSION, VaultConfig, new_point_id, validate_name,
};
pub use prune::{DeletedList, DeletedPoint, deleted_key};
pub use report::{HumanBytes, LeaseListing};
pub use retry::RetryPolicy;
pub use stats::StoreStats;
pub use verify::{Problem, VerifyReport};

/// The key of the vault configuration object.
pub const CONFIG_KEY: &str = "bulwark-vault.json";

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
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PutBlock {
    /// The vault already held the block: nothing was uploaded.
    pub existed: bool,
    /// Bytes uploaded (0 when it existed).
    pub stored_bytes: u64,
    /// Plain bytes whose compressed frames came from the replaced block
    /// ([`Vault::put_block_replacing`]) instead of being compressed again.
    pub reused_bytes: u64,
}

/// The block a changed block replaces, and what change tracking says of it, for
/// [`Vault::put_block_replacing`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Replaced {
    /// The address the same block had at the previous point.
    pub address: Address,
    /// Byte ranges of the block (from its start) that change tracking reports unchanged
    /// since then; empty without tracking (every span is then compared byte for byte).
    pub untouched: Vec<std::ops::Range<u64>>,
}

/// The points of a vault, and the point objects that could not be read.
#[derive(Debug, Default)]
pub struct PointList {
    /// Readable points, by VM then time.
    pub points: Vec<RecoveryPoint>,
    /// Point objects that failed to load, with the error.
    pub broken: Vec<(String, Error)>,
    /// Points (`vm/point`) that need blocks `verify` recorded as bad, with those records
    /// (filled by [`Vault::list_points_with_health`] only).
    pub damaged: BTreeMap<String, Vec<health::BadBlock>>,
}

/// A vault: the object store plus its configuration.
#[derive(Debug, Clone)]
pub struct Vault {
    store: Arc<dyn ObjectStore>,
    counting: Arc<stats::CountingStore>,
    location: String,
    config: VaultConfig,
    concurrency: usize,
    cipher: Option<Arc<crypto::ObjectCipher>>,
    retry: RetryPolicy,
    /// Aligned buffers for blocks read back (`bulwark_blockdiff::buffers`).
    buffers: Arc<bulwark_blockdiff::buffers::Pool>,
    /// The host name recorded in this process's leases.
    host: Arc<str>,
    /// The Object Lock client of an immutable vault opened from its location.
    locker: Option<Arc<immutable::ObjectLockClient>>,
    /// Whether [`Vault::put_block_replacing`] reads the replaced block to reuse its frames.
    reuse_frames: bool,
}

/// How to open (or create) a vault: storage settings, the key of an encrypted vault, the
/// retry policy of the vault's own requests and the host name its leases record.
///
/// The library never reads the environment: a binary builds these once, from its flags and
/// its environment, and passes them to [`Vault::open_with`] and friends.
///
/// ```
/// use bulwark_vault::{MasterKey, OpenOptions, StoreOptions};
///
/// let options = OpenOptions {
///     store: StoreOptions::default().with_var("BULWARK_STORE_MAX_RETRIES", "1"),
///     host: Some("backup01".into()),
///     ..OpenOptions::default()
/// }
/// .with_key(MasterKey::generate());
/// assert!(options.key.is_some());
/// ```
#[derive(Debug, Clone, Default)]
pub struct OpenOptions {
    /// Credentials, endpoints, timeouts ([`StoreOptions::from_vars`] builds them from the
    /// environment's variables).
    pub store: StoreOptions,
    /// The master key: required to open an encrypted vault; creating with a key makes the
    /// new vault encrypted. [`OpenOptions::with_key_file`] loads one.
    pub key: Option<MasterKey>,
    /// Retries of the vault's own requests after transient failures. On a cloud location
    /// the default becomes [`RetryPolicy::remote`]: the cloud client retries each request
    /// itself, so the vault adds one round, not four, and a dead endpoint fails the job soon.
    pub retry: RetryPolicy,
    /// The host name written into the leases this process takes (who holds a lease); `None`:
    /// the kernel's (`/proc/sys/kernel/hostname`), or "unknown".
    pub host: Option<String>,
}

impl OpenOptions {
    /// With the key in `file`, unwrapped with `passphrase` when the file is protected by one.
    pub fn with_key_file(
        self,
        file: &std::path::Path,
        passphrase: Option<&str>,
    ) -> Result<OpenOptions, Error> {
        Ok(self.with_key(MasterKey::load(file, passphrase)?))
    }

    /// With this key.
    pub fn with_key(mut self, key: MasterKey) -> Self {
        self.key = Some(key);
        self
    }
}

/// `options`, with the default retry policy replaced by [`RetryPolicy::remote`] on a cloud
/// location.
fn for_location(location: &str, options: &OpenOptions) -> OpenOptions {
    let mut o = options.clone();
    if o.retry == RetryPolicy::default() && Location::parse(location).is_ok_and(|l| l.is_remote()) {
        o.retry = RetryPolicy::remote();
    }
    o
}

/// Writes with `PutMode::Create`, retrying transient failures. An "already exists" answer to a
/// retry (the earlier attempt may have landed before its reply was lost) counts as success
/// when the stored bytes are ours; `Ok(false)` means the object existed before.
async fn put_create(
    store: &Arc<dyn ObjectStore>,
    policy: &RetryPolicy,
    key: &ObjPath,
    bytes: Bytes,
) -> Result<bool, Error> {
    let opts = || PutOptions {
        mode: PutMode::Create,
        ..Default::default()
    };
    let r = retry::retry(policy, key.as_ref(), |attempt| {
        let bytes = bytes.clone();
        async move {
            match store
                .put_opts(key, PutPayload::from(bytes.clone()), opts())
                .await
            {
                Ok(_) => Ok(true),
                Err(object_store::Error::AlreadyExists { .. }) if attempt > 0 => {
                    // Ours only if it has our bytes: anything longer is not read.
                    let limit = bytes.len() as u64;
                    match bounded::get_capped(store.as_ref(), &RetryPolicy::none(), key, limit)
                        .await?
                    {
                        bounded::Capped::Read(theirs) => Ok(theirs == bytes),
                        bounded::Capped::TooLarge(_) => Ok(false),
                    }
                }
                Err(object_store::Error::AlreadyExists { .. }) => Ok(false),
                Err(e) => Err(e),
            }
        }
    })
    .await;
    r.map_err(|e| Error::store(key, e))
}

/// The largest stored manifest of the disk `record` describes: a block map of its size and
/// block size (64 bytes of header and checksum, 49 per block) in an envelope, and never more
/// than the format's hard cap.
pub(crate) fn manifest_limit(record: &DiskRecord) -> u64 {
    let blocks = record.size.div_ceil(u64::from(record.block_size.max(1)));
    let plain = blocks.saturating_mul(49).saturating_add(64);
    envelope::stored_len_for(plain).min(Kind::Manifest.max_stored_len())
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
    /// Opens the vault at `location`: a directory path, `file://PATH`, `memory:` (empty, for
    /// tests), `az://CONTAINER[/PREFIX]`, `azure://…` or `s3://BUCKET[/PREFIX]`, with default
    /// options: no key, no cloud credentials (see [`Vault::open_with`] and [`location`]).
    pub async fn open(location: &str) -> Result<Vault, Error> {
        Self::open_with(location, &OpenOptions::default()).await
    }

    /// Opens the vault at `location` with explicit options (storage settings, key).
    pub async fn open_with(location: &str, options: &OpenOptions) -> Result<Vault, Error> {
        let store = location::open_store(location, &options.store, false)?;
        Ok(
            Self::open_store_with(store.clone(), location, &for_location(location, options))
                .await?
                .attach_locker(location, &options.store, store)?
                .with_frame_reuse(is_local(location)),
        )
    }

    /// Whether [`Vault::put_block_replacing`] reads the block a changed block replaces, to
    /// take the compressed frames of its unchanged spans instead of compressing them again.
    /// On by default for a local directory vault (a read from the local disk costs far less
    /// than compressing), off for object stores, where it would be one more request per
    /// changed block.
    pub fn with_frame_reuse(mut self, on: bool) -> Self {
        self.reuse_frames = on;
        self
    }

    /// Opens the vault held by `store` (any `object_store` backend). `label` names it in errors.
    pub async fn open_store(store: Arc<dyn ObjectStore>, label: &str) -> Result<Vault, Error> {
        Self::open_store_with(store, label, &OpenOptions::default()).await
    }

    /// Opens the vault held by `store` with a key (required when the vault is encrypted; it
    /// is checked against the vault's key check value before anything else happens).
    pub async fn open_store_with(
        store: Arc<dyn ObjectStore>,
        label: &str,
        options: &OpenOptions,
    ) -> Result<Vault, Error> {
        let counting = Arc::new(stats::CountingStore::new(store));
        let store: Arc<dyn ObjectStore> = counting.clone();
        let key = ObjPath::from(CONFIG_KEY);
        let got = bounded::get_capped(
            store.as_ref(),
            &options.retry,
            &key,
            bounded::MAX_CONFIG_BYTES,
        )
        .await;
        let bytes = match got {
            Ok(bounded::Capped::Read(b)) => b,
            Ok(bounded::Capped::TooLarge(size)) => {
                return Err(bounded::too_large(
                    CONFIG_KEY,
                    "vault configuration",
                    size,
                    bounded::MAX_CONFIG_BYTES,
                ));
            }
            Err(object_store::Error::NotFound { .. }) => {
                // Tell a missing vault from a missing bucket or container.
                let why = match store.list_with_delimiter(None).await {
                    Ok(_) => format!(
                        "{CONFIG_KEY} not found (create one with `bulwark-controller init`)"
                    ),
                    Err(e) => format!(
                        "{CONFIG_KEY} not found, and the bucket or container cannot be listed \
                         (does it exist?): {e}"
                    ),
                };
                return Err(Error::NoVault {
                    location: label.into(),
                    why,
                });
            }
            Err(e) => return Err(Error::store(&key, e)),
        };
        let config = VaultConfig::parse(CONFIG_KEY, &bytes)?;
        Self::assemble(counting, label, config, options)
    }

    fn assemble(
        counting: Arc<stats::CountingStore>,
        label: &str,
        config: VaultConfig,
        options: &OpenOptions,
    ) -> Result<Vault, Error> {
        let cipher = match (&config.encryption, &options.key) {
            (None, None) => None,
            (None, Some(_)) => {
                return Err(Error::NotEncrypted {
                    location: label.into(),
                });
            }
            (Some(_), None) => {
                return Err(Error::KeyRequired {
                    location: label.into(),
                });
            }
            (Some(enc), Some(key)) => {
                if key.check_value(&config.id) != enc.key_check {
                    return Err(Error::WrongKey {
                        location: label.into(),
                        expected: enc.key_fingerprint.clone(),
                        given: key.fingerprint(),
                    });
                }
                Some(Arc::new(key.cipher()))
            }
        };
        conditional::warn_once(label, &config);
        Ok(Vault {
            store: counting.clone(),
            counting,
            location: label.into(),
            buffers: bulwark_blockdiff::buffers::Pool::new(config.block_size as usize, 32),
            config,
            concurrency: 16,
            cipher,
            retry: options.retry,
            host: options
                .host
                .clone()
                .unwrap_or_else(lease::kernel_host_name)
                .into(),
            locker: None,
            reuse_frames: false,
        })
    }

    /// Gives an immutable vault its Object Lock client (and, with per-object retention, a
    /// store that locks each object it writes). `raw` is the store before any wrapping.
    fn attach_locker(
        mut self,
        location: &str,
        options: &StoreOptions,
        raw: Arc<dyn ObjectStore>,
    ) -> Result<Vault, Error> {
        let Some(imm) = self.config.immutable.clone() else {
            return Ok(self);
        };
        let client = Arc::new(immutable::ObjectLockClient::for_location(
            location, options,
        )?);
        if imm.per_object() {
            let locking: Arc<dyn ObjectStore> = Arc::new(immutable::RetainingStore::new(
                raw,
                client.clone(),
                imm.retention(),
            ));
            let counting = Arc::new(stats::CountingStore::new(locking));
            self.store = counting.clone();
            self.counting = counting;
        }
        self.locker = Some(client);
        Ok(self)
    }

    /// The immutability of this vault, if it is immutable (see [`immutable`]).
    pub fn immutability(&self) -> Option<&immutable::Immutability> {
        self.config.immutable.as_ref()
    }

    /// The Object Lock client of an immutable vault opened from its location.
    pub fn object_lock(&self) -> Option<&Arc<immutable::ObjectLockClient>> {
        self.locker.as_ref()
    }

    /// Creates an immutable vault at `location`: every object write-once for `retention`, in
    /// compliance mode. Only S3 with Object Lock is supported; a local directory, Azure Blob
    /// and memory are refused (see [`immutable`] for why and how).
    pub async fn create_immutable_with(
        location: &str,
        options: &CreateOptions,
        open: &OpenOptions,
        retention: immutable::Retention,
    ) -> Result<Vault, Error> {
        let refuse = |why: &str| Error::Immutable {
            location: location.into(),
            why: why.into(),
        };
        match Location::parse(location)? {
            Location::S3 { .. } => {}
            Location::Local(_) | Location::Memory => {
                return Err(refuse(
                    "a local directory cannot enforce immutability (its owner and root can always                      delete files): refused; use an s3:// bucket with Object Lock",
                ));
            }
            Location::Azure { .. } => {
                return Err(refuse(
                    "Azure Blob version-level immutability is not supported by this build (Azurite,                      the only Azure server it can be tested on, does not implement it): refused;                      use an s3:// bucket with Object Lock",
                ));
            }
        }
        if retention.duration().is_zero() {
            return Err(refuse(
                "the retention must be at least one day (or second, in tests)",
            ));
        }
        let client = immutable::ObjectLockClient::for_location(location, &open.store)?;
        let found = client.lock_configuration().await?;
        if !found.enabled {
            return Err(refuse(
                "the bucket does not have Object Lock enabled (it can only be enabled when the                  bucket is created: create it with Object Lock)",
            ));
        }
        let applied = match retention {
            immutable::Retention::Days(days) => {
                client.set_default_retention(days).await?;
                immutable::BY_BUCKET_DEFAULT
            }
            immutable::Retention::Seconds(_) => {
                if found.default.is_some() {
                    return Err(refuse(
                        "per-object (seconds) retention needs a bucket without a default retention",
                    ));
                }
                immutable::PER_OBJECT
            }
        };
        let store = location::open_store(location, &open.store, true)?;
        let open2 = for_location(location, open);
        let mut config = VaultConfig::new(options.block_size, options.zstd_level);
        config.immutable = Some(immutable::Immutability {
            mechanism: immutable::S3_OBJECT_LOCK.into(),
            mode: immutable::COMPLIANCE.into(),
            retention_secs: retention.duration().as_secs(),
            applied: applied.into(),
        });
        let vault = Self::create_store_config(store.clone(), location, config, &open2).await?;
        let vault = vault.attach_locker(location, &open.store, store)?;
        if let (Some(imm), Some(client)) = (vault.immutability(), vault.object_lock())
            && imm.per_object()
        {
            // Written before the locking store was attached.
            let until = lease::plus(Timestamp::now(), imm.retention());
            client.put_retention(CONFIG_KEY, until).await?;
        }
        Ok(vault)
    }

    /// Creates a vault at `location` (creating the directory of a local path), with default
    /// open options: unencrypted, no cloud credentials (see [`Vault::create_with`]).
    pub async fn create(location: &str, options: &CreateOptions) -> Result<Vault, Error> {
        Self::create_with(location, options, &OpenOptions::default()).await
    }

    /// Creates a vault at `location`; encrypted when `open.key` is set.
    pub async fn create_with(
        location: &str,
        options: &CreateOptions,
        open: &OpenOptions,
    ) -> Result<Vault, Error> {
        let store = location::open_store(location, &open.store, true)?;
        Ok(
            Self::create_store_with(store, location, options, &for_location(location, open))
                .await?
                .with_frame_reuse(is_local(location)),
        )
    }

    /// Creates a vault in `store`. Fails with [`Error::VaultExists`] if one is there already.
    pub async fn create_store(
        store: Arc<dyn ObjectStore>,
        label: &str,
        options: &CreateOptions,
    ) -> Result<Vault, Error> {
        Self::create_store_with(store, label, options, &OpenOptions::default()).await
    }

    /// Creates a vault in `store`, encrypted when `open.key` is set.
    pub async fn create_store_with(
        store: Arc<dyn ObjectStore>,
        label: &str,
        options: &CreateOptions,
        open: &OpenOptions,
    ) -> Result<Vault, Error> {
        let config = VaultConfig::new(options.block_size, options.zstd_level);
        Self::create_store_config(store, label, config, open).await
    }

    /// Creates a vault in `store` with `config` (its encryption filled from `open.key`).
    async fn create_store_config(
        store: Arc<dyn ObjectStore>,
        label: &str,
        mut config: VaultConfig,
        open: &OpenOptions,
    ) -> Result<Vault, Error> {
        let counting = Arc::new(stats::CountingStore::new(store));
        let store: Arc<dyn ObjectStore> = counting.clone();
        if let Some(k) = &open.key {
            config.address_hash = crypto::KEYED_ADDRESS_HASH.into();
            config.encryption = Some(Encryption {
                cipher: crypto::CIPHER_NAME.into(),
                key_derivation: "blake3-derive-key".into(),
                key_fingerprint: k.fingerprint(),
                key_check: k.check_value(&config.id),
            });
        }
        let key = ObjPath::from(CONFIG_KEY);
        let probed = match conditional::probe(&store, &open.retry).await {
            Ok(honoured) => Ok(honoured),
            Err(Error::Missing { .. }) => {
                return Err(Error::NoVault {
                    location: label.into(),
                    why: "the bucket or container does not exist (create it first)".into(),
                });
            }
            Err(e) => Err(e),
        }?;
        config.conditional_writes = Some(probed);
        let mut json =
            serde_json::to_vec_pretty(&config).map_err(|e| Error::Worker(e.to_string()))?;
        json.push(b'\n');
        match put_create(&store, &open.retry, &key, Bytes::from(json)).await {
            Ok(true) => {}
            Ok(false) => {
                return Err(Error::VaultExists {
                    location: label.into(),
                });
            }
            Err(Error::Missing { .. }) => {
                return Err(Error::NoVault {
                    location: label.into(),
                    why: "the bucket or container does not exist (create it first)".into(),
                });
            }
            Err(e) => return Err(e),
        }
        Self::assemble(counting, label, config, open)
    }

    /// Opens the vault at `location`, creating it if there is none. Returns whether it was
    /// created.
    pub async fn open_or_create(
        location: &str,
        options: &CreateOptions,
    ) -> Result<(Vault, bool), Error> {
        Self::open_or_create_with(location, options, &OpenOptions::default()).await
    }

    /// [`Vault::open_or_create`] with explicit options; a created vault is encrypted when
    /// `open.key` is set.
    pub async fn open_or_create_with(
        location: &str,
        options: &CreateOptions,
        open: &OpenOptions,
    ) -> Result<(Vault, bool), Error> {
        match Self::open_with(location, open).await {
            Ok(v) => Ok((v, false)),
            Err(Error::NoVault { .. }) => match Self::create_with(location, options, open).await {
                Ok(v) => Ok((v, true)),
                // Someone else created it in between: use theirs.
                Err(Error::VaultExists { .. }) => {
                    Ok((Self::open_with(location, open).await?, false))
                }
                Err(e) => Err(e),
            },
            Err(e) => Err(e),
        }
    }

    /// Request and byte counts of this vault's store since it was opened. A job reports
    /// `after.since(&before)`.
    pub fn store_stats(&self) -> StoreStats {
        self.counting.stats()
    }

    /// Whether the vault is encrypted.
    pub fn is_encrypted(&self) -> bool {
        self.cipher.is_some()
    }

    /// The retry policy of the vault's own requests.
    pub fn with_retry(mut self, policy: RetryPolicy) -> Self {
        self.retry = policy;
        self
    }

    /// The digest manifests are pinned by: BLAKE3, keyed in an encrypted vault.
    pub fn digest(&self, data: &[u8]) -> [u8; 32] {
        match &self.cipher {
            Some(c) => c.digest(data),
            None => *blake3::hash(data).as_bytes(),
        }
    }

    /// The content address of a block in this vault (keyed BLAKE3 when encrypted).
    pub fn address_of(&self, data: &[u8]) -> Address {
        let key = self.cipher.as_ref().map(|c| c.address_key());
        bulwark_blockdiff::content_address(data, key.as_ref())
    }

    fn seal(
        &self,
        kind: Kind,
        key: &ObjPath,
        plain: &[u8],
        level: Option<i32>,
        digest: Option<[u8; 32]>,
    ) -> Result<envelope::Sealed, Error> {
        let compressed = level.and_then(|l| envelope::compress_kind(kind, plain, l));
        self.seal_payload(kind, key, plain, compressed, digest)
    }

    /// Seals `plain` with its compressed payload already made (`None`: raw), encrypted when
    /// the vault is.
    fn seal_payload(
        &self,
        kind: Kind,
        key: &ObjPath,
        plain: &[u8],
        compressed: Option<Vec<u8>>,
        digest: Option<[u8; 32]>,
    ) -> Result<envelope::Sealed, Error> {
        match &self.cipher {
            Some(c) => envelope::seal_encrypted_compressed(
                kind,
                key.as_ref(),
                plain,
                compressed,
                digest,
                c,
            ),
            None => Ok(envelope::seal_compressed(kind, plain, compressed, digest)),
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
            address_key: self.cipher.as_ref().map(|c| c.address_key()),
            ..ScanOptions::default()
        }
    }

    /// Whether the vault holds the block at `address`.
    pub async fn has_block(&self, address: &Address) -> Result<bool, Error> {
        let key = block_key(address);
        let r = retry::retry(&self.retry, key.as_ref(), |_| async {
            match self.store.head(&key).await {
                Ok(_) => Ok(true),
                Err(object_store::Error::NotFound { .. }) => Ok(false),
                Err(e) => Err(e),
            }
        })
        .await;
        r.map_err(|e| Error::store(&key, e))
    }

    /// Stores a block under its address, unless the vault already holds it. Compression runs
    /// on the blocking pool. `address` must be the content address of `data`.
    pub async fn put_block(&self, address: Address, data: Bytes) -> Result<PutBlock, Error> {
        self.put_block_replacing(address, data, None).await
    }

    /// [`Vault::put_block`] for a changed block: with frame reuse on (see
    /// [`Vault::with_frame_reuse`]) and `replaced` given, the replaced block's object is read,
    /// and its compressed frames are taken for the spans that change tracking reports
    /// untouched and whose checksums match, and for the other spans whose old frame holds
    /// exactly the new bytes; only the rest is compressed (see
    /// [`envelope::compress_block_reusing`]). The object is the same as `put_block` would
    /// store, frame for frame where a span was compressed, and opens to `data` exactly; a
    /// replaced block that cannot be read or is not framed only means compressing it all.
    pub async fn put_block_replacing(
        &self,
        address: Address,
        data: Bytes,
        replaced: Option<Replaced>,
    ) -> Result<PutBlock, Error> {
        if self.has_block(&address).await? {
            return Ok(PutBlock {
                existed: true,
                ..PutBlock::default()
            });
        }
        let key = block_key(&address);
        let level = self.config.zstd_level();
        let old = match (&replaced, level) {
            (Some(r), Some(_)) if self.reuse_frames && r.address != address => {
                let old_key = block_key(&r.address);
                match self.get_raw(&old_key, Kind::Block).await {
                    Ok(raw) => Some(OldBlock {
                        key: old_key,
                        raw,
                        untouched: untouched_frames(&r.untouched, data.len()),
                    }),
                    Err(e) => {
                        tracing::debug!(block = %r.address.to_hex(), error = %e, "replaced block unreadable: compressing the whole block");
                        None
                    }
                }
            }
            _ => None,
        };
        let this = self.clone();
        let k2 = key.clone();
        let (sealed, reused_bytes) =
            blocking(move || this.seal_block(&k2, &data, level, address, old)).await??;
        let stored = sealed.bytes.len() as u64;
        // Converted once: each attempt clones the handle, not the (up to 16 MiB) bytes.
        let sealed = Bytes::from(sealed.bytes);
        // Content-addressed: whoever wrote the block first wrote the same content, so an
        // existing block is success whatever the attempt.
        let r = retry::retry(&self.retry, key.as_ref(), |_| {
            let bytes = sealed.clone();
            async {
                let opts = PutOptions {
                    mode: PutMode::Create,
                    ..Default::default()
                };
                match self
                    .store
                    .put_opts(&key, PutPayload::from(bytes), opts)
                    .await
                {
                    Ok(_) => Ok(false),
                    Err(object_store::Error::AlreadyExists { .. }) => Ok(true),
                    Err(e) => Err(e),
                }
            }
        })
        .await
        .map_err(|e| Error::store(&key, e))?;
        Ok(if r {
            PutBlock {
                existed: true,
                ..PutBlock::default()
            }
        } else {
            PutBlock {
                existed: false,
                stored_bytes: stored,
                reused_bytes,
            }
        })
    }

    /// Seals a block, reusing the frames of `old` where its untouched spans and the checksums
    /// allow. Returns the object and the plain bytes reused.
    fn seal_block(
        &self,
        key: &ObjPath,
        data: &[u8],
        level: Option<i32>,
        address: Address,
        old: Option<OldBlock>,
    ) -> Result<(envelope::Sealed, u64), Error> {
        let reused = match (level, old) {
            (Some(level), Some(old)) => {
                envelope::block_payload(old.key.as_ref(), &old.raw, self.cipher.as_deref())
                    .filter(|(_, len)| *len == data.len() as u64)
                    .and_then(|(payload, _)| {
                        envelope::compress_block_reusing(data, level, &payload, &old.untouched)
                    })
            }
            _ => None,
        };
        let Some((compressed, reused)) = reused else {
            return Ok((
                self.seal(Kind::Block, key, data, level, Some(address.0))?,
                0,
            ));
        };
        if reused.mismatched > 0 {
            tracing::warn!(
                block = %address.to_hex(),
                spans = reused.mismatched,
                "spans that change tracking called unchanged differ from the previous block; compressed anew"
            );
        }
        let sealed =
            self.seal_payload(Kind::Block, key, data, Some(compressed), Some(address.0))?;
        Ok((sealed, reused.bytes))
    }

    /// Reads and verifies a block: decompressed, hashed and compared with its address. The bytes
    /// start page-aligned (for `O_DIRECT` writes without a copy) in a pooled buffer.
    pub async fn get_block(&self, address: Address) -> Result<Bytes, Error> {
        let key = block_key(&address);
        let raw = self.get_raw(&key, Kind::Block).await?;
        let cipher = self.cipher.clone();
        let pool = self.buffers.clone();
        blocking(move || {
            let key = key.to_string();
            let (plain, digest) =
                envelope::open_aligned(Kind::Block, &key, &raw, cipher.as_deref(), &pool)?;
            if digest != address.0 {
                return Err(Error::Corrupt {
                    key,
                    why: "block is stored under another address".into(),
                });
            }
            Ok(Bytes::from_owner(plain))
        })
        .await?
    }

    /// Reads the object of `kind` at `key`, refusing it unread when it is larger than any
    /// object of that kind can be (see [`bounded`]).
    async fn get_raw(&self, key: &ObjPath, kind: Kind) -> Result<Bytes, Error> {
        self.get_raw_within(key, kind.name(), kind.max_stored_len())
            .await
    }

    /// Reads the object at `key`, refusing it unread when it is larger than `limit`.
    async fn get_raw_within(&self, key: &ObjPath, what: &str, limit: u64) -> Result<Bytes, Error> {
        bounded::read_bounded(self.store.as_ref(), &self.retry, key, what, limit).await
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
        let this = self.clone();
        let k2 = key.clone();
        let sealed =
            blocking(move || this.seal(Kind::Manifest, &k2, &encoded, level, None)).await??;
        let stored = sealed.bytes.len() as u64;
        let digest = hex::encode(sealed.digest);
        if !put_create(&self.store, &self.retry, &key, Bytes::from(sealed.bytes)).await? {
            return Err(Error::Corrupt {
                key: key.to_string(),
                why: "a different manifest is already stored under this key".into(),
            });
        }
        Ok((digest, stored))
    }

    /// Reads a block map and checks it is exactly the one the point pinned (`digest`).
    /// The read is bounded by the format's hard cap (see [`bounded`]); reading a manifest
    /// through [`Vault::disk_manifest`] bounds it by the disk the point records.
    pub async fn get_manifest(&self, m: &ManifestRef<'_>, digest: &str) -> Result<BlockMap, Error> {
        self.get_manifest_within(m, digest, Kind::Manifest.max_stored_len())
            .await
    }

    /// [`Vault::get_manifest`], refusing unread a manifest larger than the one of the disk
    /// `record` describes.
    pub(crate) async fn get_manifest_of(
        &self,
        m: &ManifestRef<'_>,
        record: &DiskRecord,
    ) -> Result<BlockMap, Error> {
        self.get_manifest_within(m, &record.manifest_digest, manifest_limit(record))
            .await
    }

    async fn get_manifest_within(
        &self,
        m: &ManifestRef<'_>,
        digest: &str,
        limit: u64,
    ) -> Result<BlockMap, Error> {
        let key = manifest_key(m);
        let raw = self.get_raw_within(&key, "manifest", limit).await?;
        let expected = digest.to_string();
        let cipher = self.cipher.clone();
        blocking(move || {
            let key = key.to_string();
            let (plain, got) = envelope::open_with(Kind::Manifest, &key, &raw, cipher.as_deref())?;
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

    /// The block map of disk `disk` of `point`: the manifest the point pinned (digest checked),
    /// describing a disk of the size the point recorded.
    pub async fn disk_manifest(
        &self,
        point: &RecoveryPoint,
        disk: &str,
    ) -> Result<BlockMap, Error> {
        let record = point.disk(disk).ok_or_else(|| Error::NoSuchDisk {
            vm: point.vm.clone(),
            point: point.id.clone(),
            disk: disk.to_string(),
            available: point
                .disks
                .iter()
                .map(|d| d.name.as_str())
                .collect::<Vec<_>>()
                .join(", "),
        })?;
        let m = ManifestRef {
            vm: &point.vm,
            disk,
            point: &point.id,
        };
        let map = self.get_manifest_of(&m, record).await?;
        if map.disk_size() != record.size {
            return Err(Error::Corrupt {
                key: m.to_string(),
                why: format!(
                    "manifest describes {} bytes, the point says {}",
                    map.disk_size(),
                    record.size
                ),
            });
        }
        Ok(map)
    }

    /// Commits a recovery point. Call it only after every manifest it names is stored.
    pub async fn commit_point(&self, point: &RecoveryPoint) -> Result<(), Error> {
        validate_name("vm", &point.vm)?;
        validate_name("point", &point.id)?;
        let key = point_key(&point.vm, &point.id);
        let mut json =
            serde_json::to_vec_pretty(point).map_err(|e| Error::Worker(e.to_string()))?;
        json.push(b'\n');
        // Points stay uncompressed, so an operator can read them (unless encrypted).
        let sealed = self.seal(Kind::Point, &key, &json, None, None)?;
        if put_create(&self.store, &self.retry, &key, Bytes::from(sealed.bytes)).await? {
            Ok(())
        } else {
            Err(Error::PointExists {
                key: key.to_string(),
            })
        }
    }

    /// [`Vault::commit_point`] under `lease` (a backup lease): the lease is checked first, and
    /// the commit, retries included, is abandoned with [`Error::LeaseLost`] before the lease
    /// could look expired to a GC on another host (see [`Lease::held`]).
    pub async fn commit_point_held(
        &self,
        lease: &Lease,
        point: &RecoveryPoint,
    ) -> Result<(), Error> {
        lease
            .held("committing the point", self.commit_point(point))
            .await
    }

    /// Reads one recovery point.
    pub async fn get_point(&self, vm: &str, id: &str) -> Result<RecoveryPoint, Error> {
        validate_name("vm", vm)?;
        validate_name("point", id)?;
        let key = point_key(vm, id);
        match self.get_raw(&key, Kind::Point).await {
            Err(Error::Missing { .. }) => Err(Error::NoSuchPoint {
                vm: vm.into(),
                point: id.into(),
            }),
            Err(e) => Err(e),
            Ok(raw) => self.parse_point(key.as_ref(), vm, id, &raw),
        }
    }

    /// Parses a point object read from `key` (its own key, or where a copy of it is kept);
    /// an encrypted point is bound to its original key `points/<vm>/<id>.json`.
    fn parse_point(
        &self,
        key: &str,
        vm: &str,
        id: &str,
        raw: &[u8],
    ) -> Result<RecoveryPoint, Error> {
        let (plain, _) = match &self.cipher {
            None => envelope::open(Kind::Point, key, raw)?,
            Some(c) => {
                let home = point_key(vm, id).to_string();
                envelope::open_with(Kind::Point, &home, raw, Some(c)).map_err(|e| match e {
                    Error::Corrupt { why, .. } if home != key => Error::Corrupt {
                        key: key.into(),
                        why,
                    },
                    e => e,
                })?
            }
        };
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
        let metas: Vec<_> = retry::retry(&self.retry, prefix.as_ref(), |_| {
            self.store.list(Some(&prefix)).try_collect::<Vec<_>>()
        })
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
mod gc_tests;
#[cfg(test)]
mod lease_clock_tests;
#[cfg(test)]
mod tests;

/// The block a changed block replaces, read for [`Vault::put_block_replacing`]: its key, its
/// stored bytes, and which of its [`envelope::FRAME_LEN`] spans change tracking reports
/// untouched.
struct OldBlock {
    key: ObjPath,
    raw: Bytes,
    untouched: Vec<bool>,
}

/// Whether `location` is a local directory (where frame reuse is on by default).
fn is_local(location: &str) -> bool {
    matches!(Location::parse(location), Ok(Location::Local(_)))
}

/// For each [`envelope::FRAME_LEN`] span of a block of `len` bytes: whether it lies wholly in
/// the union of `untouched` (ranges from the block's start, in any order).
fn untouched_frames(untouched: &[std::ops::Range<u64>], len: usize) -> Vec<bool> {
    let union = bulwark_blockdiff::union_of(untouched.to_vec());
    let frame = envelope::FRAME_LEN as u64;
    (0..(len as u64).div_ceil(frame))
        .map(|i| {
            let span = i * frame..((i + 1) * frame).min(len as u64);
            union
                .iter()
                .any(|r| r.start <= span.start && span.end <= r.end)
        })
        .collect()
}
