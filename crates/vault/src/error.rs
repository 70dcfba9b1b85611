//! The vault's error type: one enum naming what failed and where (location, key, VM, point).

use object_store::path::Path as ObjPath;

/// Errors of the vault.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
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
    /// An Object Lock request of an immutable vault failed (see [`crate::immutable`]).
    #[error("{key}: S3 Object Lock: {why}")]
    ObjectLock {
        /// The object key, or the bucket.
        key: String,
        /// What failed.
        why: String,
    },
    /// Another controller owns the VM (see [`crate::owner`]).
    #[error(
        "VM {vm} is backed up by {owner}, not by this host ({me}): refused (take it over \
         with --take-over, once {owner} no longer backs it up)"
    )]
    NotOwner {
        /// The VM.
        vm: String,
        /// Its owner.
        owner: String,
        /// This host.
        me: String,
    },
    /// Another host claimed or took over the VM at the same moment, and its write won (see
    /// [`crate::owner`]): this host does not own the VM and wrote nothing.
    #[error(
        "VM {vm}: {winner} claimed it at the same moment as this host ({me}) and won \
         (ownership generation {generation}): refused, nothing written; {winner} now backs it up"
    )]
    ClaimLost {
        /// The VM.
        vm: String,
        /// The host whose claim won.
        winner: String,
        /// This host.
        me: String,
        /// The ownership generation both tried to write.
        generation: u64,
    },
    /// An immutable vault cannot be made or used here.
    #[error("immutable vault at {location}: {why}")]
    Immutable {
        /// The location.
        location: String,
        /// Why not.
        why: String,
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
    /// A cloud location without the credentials it needs.
    #[error("vault location {location}: missing credentials: {why}")]
    MissingCredentials {
        /// The location.
        location: String,
        /// What to set.
        why: String,
    },
    /// A storage setting that cannot be used.
    #[error("storage setting {what}: {why}")]
    StoreConfig {
        /// The setting (or file:line).
        what: String,
        /// What is wrong.
        why: String,
    },
    /// A key file that cannot be used.
    #[error("key file {path}: {why}")]
    KeyFile {
        /// The file.
        path: String,
        /// What is wrong.
        why: String,
    },
    /// A passphrase-protected key file was given without a passphrase.
    #[error(
        "key file {path} is protected by a passphrase: set it in the environment (BULWARK_PASSPHRASE)"
    )]
    PassphraseRequired {
        /// The file.
        path: String,
    },
    /// The passphrase does not open the key file.
    #[error("key file {path}: wrong passphrase")]
    WrongPassphrase {
        /// The file.
        path: String,
    },
    /// An encrypted vault opened without its key.
    #[error(
        "the vault at {location} is encrypted: give its key file (--key-file or BULWARK_KEY_FILE)"
    )]
    KeyRequired {
        /// The location.
        location: String,
    },
    /// The key given is not the vault's key.
    #[error(
        "wrong key for the vault at {location}: the vault's key has fingerprint {expected}, the key given has {given}; nothing was read or written"
    )]
    WrongKey {
        /// The location.
        location: String,
        /// Fingerprint recorded in the vault.
        expected: String,
        /// Fingerprint of the key given.
        given: String,
    },
    /// A key was given for a vault that is not encrypted.
    #[error(
        "the vault at {location} is not encrypted, but a key was given (remove --key-file / BULWARK_KEY_FILE)"
    )]
    NotEncrypted {
        /// The location.
        location: String,
    },
    /// A conflicting lease is live (see [`crate::lease`]).
    #[error("cannot take a {wanted} lease: {key} is live ({holder}); gave up after {waited_ms} ms")]
    LeaseConflict {
        /// The kind of lease wanted.
        wanted: &'static str,
        /// The key of the conflicting lease.
        key: String,
        /// Who holds it, until when.
        holder: String,
        /// How long we waited.
        waited_ms: u64,
    },
    /// A lease object that cannot be read.
    #[error("{key}: corrupt lease: {why}; if no Bulwark job is running, delete this object")]
    CorruptLease {
        /// The object key.
        key: String,
        /// What is wrong.
        why: String,
    },
    /// A lease we held ran out: the job must stop.
    #[error("{key}: lease lost: {why}")]
    LeaseLost {
        /// The lease key.
        key: String,
        /// Why.
        why: String,
    },
    /// No such soft-deleted point.
    #[error("VM {vm:?} has no soft-deleted point {point:?}{hint}")]
    NoSuchDeletedPoint {
        /// The VM.
        vm: String,
        /// The point asked for.
        point: String,
        /// More help (e.g. that the point is live).
        hint: String,
    },
    /// Garbage collection stopped before freeing anything: it could not learn every reference.
    #[error("garbage collection aborted, nothing was deleted: {why}")]
    GcAborted {
        /// The object that could not be read.
        key: String,
        /// Why (the read error, which names the key).
        why: String,
    },
}

impl Error {
    pub(crate) fn store(key: &ObjPath, source: object_store::Error) -> Error {
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
