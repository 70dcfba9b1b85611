//! Leases: how backups, prunes and garbage collection keep out of each other's way.
//!
//! A lease is a small JSON object `locks/<kind>-<id>` (kind `backup`, `prune` or `gc`, id
//! unique per attempt) holding `{kind, id, holder, pid, host, created, expires}`. It is written
//! with `PutMode::Create`, renewed by a background task every `ttl / 3` while its job runs, and
//! deleted when the job ends ([`Lease::release`], or best effort on drop). A process that
//! crashes stops renewing, so its lease expires after at most `ttl` and never blocks anyone
//! forever.
//!
//! # Who conflicts with whom
//!
//! | holder \ other | backup | prune | gc |
//! |---|---|---|---|
//! | backup | —  | —  | ✗ |
//! | prune  | —  | ✗  | ✗ |
//! | gc     | ✗  | ✗  | ✗ |
//!
//! Backups share (any number run at once); garbage collection is exclusive; prune/undelete
//! (which move points between `points/` and `deleted/`) exclude GC and each other.
//!
//! # Protocol: write first, then look
//!
//! To acquire a lease of kind K:
//!
//! 1. write our own lease object (a fresh key, `PutMode::Create`);
//! 2. only then list `locks/` and read every lease of a kind that conflicts with K;
//! 3. if any of them is unexpired, delete our own lease and back off: fail at once, or retry
//!    after a short random pause until `wait` has passed ([`LeaseOptions::wait`]); otherwise
//!    we hold the lease.
//!
//! Why this is safe with no compare-and-swap: take two conflicting acquirers A and B, and say
//! A's write completed before B's. B lists after its own write, so after A's: B sees A's
//! lease and backs off. A may or may not see B; if it does, both back off (and retry with
//! random pauses), which is safe. So two conflicting leases are never both held, as long as
//! the store lists what was written before (local directories and today's object stores do).
//! "Backup checks for a gc lease, then gc checks for backup leases" cannot interleave into
//! both proceeding: whoever wrote second sees the first.
//!
//! A holder whose lease ran out (the process was suspended, renewal failed) must not go on:
//! [`Lease::ensure_held`] fails from `ttl / 4` before the expiry on, and jobs call it before
//! every step that relies on exclusion (GC before each delete, a backup before committing
//! its point). [`Lease::held`] runs such a step under a deadline: the step, with all its
//! retries, is abandoned before the lease could look expired to anyone.
//!
//! # Whose clock
//!
//! Expiry is judged on the object store's clock, never on a host's: a lease is live while
//! the store's time is before the `last_modified` of the lease object (stamped by the store
//! at the last write, acquisition or renewal) plus the lease's `ttl_ms`. The acquirer's
//! notion of the store's time is the `last_modified` of its own lease object, written just
//! before it lists: a lower bound of the store's time at the listing, so a lease is never
//! judged expired early. The holder, for its part, counts on its monotonic clock from the
//! moment before each successful write: the store stamped that write later, so the lease
//! lasts at least `ttl` from then on the store's clock (less one second for stores that
//! truncate `last_modified` to seconds). Wall clocks, which may be minutes apart between
//! hosts, only fill the informational `created` and `expires` fields ([`LeaseOptions::
//! clock_offset`] injects skew into them in tests).
//!
//! A lease object that does not parse is never ignored by an acquirer it could conflict
//! with: the acquirer backs off with [`Error::CorruptLease`] naming the key, so that an
//! operator looks (and deletes it if no job runs).
//!
//! # Waiting
//!
//! A backup waits (bounded, `wait`, 10 minutes by default for a backup job) while a GC holds
//! its lease; GC does not wait by default: it refuses with [`Error::LeaseConflict`] while any
//! backup or prune is running, and the next scheduled run does the work.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::TryStreamExt;
use jiff::Timestamp;
use object_store::path::Path as ObjPath;
use object_store::{ObjectStore, ObjectStoreExt, PutMode, PutOptions, PutPayload};
use serde::{Deserialize, Serialize};

use crate::{Error, Vault, validate_name};

/// The prefix under which leases live.
pub const LOCKS_PREFIX: &str = "locks";

/// What a lease is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LeaseKind {
    /// A backup job (shared with other backups).
    Backup,
    /// Prune, purge or undelete (excludes GC and other prunes).
    Prune,
    /// Garbage collection (exclusive).
    Gc,
}

impl LeaseKind {
    /// The kind's name in keys and records.
    pub fn as_str(self) -> &'static str {
        match self {
            LeaseKind::Backup => "backup",
            LeaseKind::Prune => "prune",
            LeaseKind::Gc => "gc",
        }
    }

    fn parse(s: &str) -> Option<LeaseKind> {
        match s {
            "backup" => Some(LeaseKind::Backup),
            "prune" => Some(LeaseKind::Prune),
            "gc" => Some(LeaseKind::Gc),
            _ => None,
        }
    }

    /// Whether a lease of this kind and one of `other` cannot be held at the same time.
    pub fn conflicts_with(self, other: LeaseKind) -> bool {
        use LeaseKind::*;
        !matches!(
            (self, other),
            (Backup, Backup) | (Backup, Prune) | (Prune, Backup)
        )
    }
}

impl std::fmt::Display for LeaseKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The content of a lease object.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LeaseRecord {
    /// What the lease is for.
    pub kind: LeaseKind,
    /// Unique id of this acquisition (also in the key).
    pub id: String,
    /// Who holds it (a short description of the job).
    pub holder: String,
    /// The holder's process id.
    pub pid: u32,
    /// The holder's host name.
    pub host: String,
    /// When it was acquired.
    pub created: Timestamp,
    /// When it expires unless renewed, on the writer's clock (informational: expiry is
    /// judged on the store's clock, see the module documentation).
    pub expires: Timestamp,
    /// How long after its last write (the object's `last_modified`, on the store's clock) the
    /// lease lasts. Records without it (older writers) last `expires - created`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ttl_ms: Option<u64>,
}

impl LeaseRecord {
    /// Whether the lease is still live at `now` by its writer's own `expires` (informational;
    /// acquirers use [`LeaseRecord::is_live_on_store`]).
    pub fn is_live(&self, now: Timestamp) -> bool {
        now < self.expires
    }

    /// How long the lease lasts after each write of its object.
    pub fn ttl(&self) -> Duration {
        match self.ttl_ms {
            Some(ms) => Duration::from_millis(ms),
            None => self
                .expires
                .duration_since(self.created)
                .try_into()
                .unwrap_or(Duration::ZERO),
        }
    }

    /// Whether the lease is live at `store_now`, given `written`, the `last_modified` the
    /// store gave its object; both on the store's clock.
    pub fn is_live_on_store(&self, written: Timestamp, store_now: Timestamp) -> bool {
        store_now < plus(written, self.ttl())
    }

    /// "gc lease of bulwark gc (pid 12, host h) until 2026-…".
    pub fn describe(&self) -> String {
        format!(
            "{} lease held by {} (pid {} on {}) until {}",
            self.kind, self.holder, self.pid, self.host, self.expires
        )
    }
}

/// How to acquire and keep a lease.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LeaseOptions {
    /// How long the lease lasts without renewal (renewed every `ttl / 3`).
    pub ttl: Duration,
    /// How long to keep retrying while a conflicting lease is live (0: fail at once).
    pub wait: Duration,
    /// The pause between attempts (a random part is added).
    pub retry: Duration,
    /// Added to this host's wall clock where a lease reads it (the informational `created`
    /// and `expires` fields): clock skew between hosts, injected in tests. Expiry never
    /// depends on it.
    pub clock_offset: jiff::SignedDuration,
    /// The operator's word that no other Bulwark process writes to the vault meanwhile:
    /// required for prune and GC leases on a store that ignores conditional writes (see
    /// [`crate::conditional`]).
    pub single_writer: bool,
}

impl Default for LeaseOptions {
    fn default() -> Self {
        LeaseOptions {
            ttl: Duration::from_secs(60),
            wait: Duration::ZERO,
            retry: Duration::from_millis(500),
            clock_offset: jiff::SignedDuration::ZERO,
            single_writer: false,
        }
    }
}

impl LeaseOptions {
    /// These options, waiting up to `wait` for conflicting leases.
    pub fn waiting(mut self, wait: Duration) -> Self {
        self.wait = wait;
        self
    }

    /// This host's wall clock, shifted by [`LeaseOptions::clock_offset`].
    fn wall_now(&self) -> Timestamp {
        Timestamp::now()
            .checked_add(self.clock_offset)
            .unwrap_or(Timestamp::now())
    }
}

/// Stores that keep `last_modified` to the second only (S3's `Last-Modified`) make a lease
/// look up to this much older than it is: the holder gives it up this much earlier. Such a
/// store needs a ttl of several seconds (the default is a minute).
const STORE_TIME_RESOLUTION: Duration = Duration::from_secs(1);

/// The store's `last_modified` as a timestamp.
fn store_time(meta: &object_store::ObjectMeta) -> Timestamp {
    Timestamp::from_millisecond(meta.last_modified.timestamp_millis()).unwrap_or(Timestamp::MIN)
}

pub(crate) fn plus(t: Timestamp, d: Duration) -> Timestamp {
    t.checked_add(d).unwrap_or(Timestamp::MAX)
}

pub(crate) fn minus(t: Timestamp, d: Duration) -> Timestamp {
    t.checked_sub(d).unwrap_or(Timestamp::MIN)
}

/// The kernel's host name, or "unknown": the lease host when [`crate::OpenOptions::host`] is
/// not set.
pub(crate) fn kernel_host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "unknown".into())
}

fn lease_id() -> String {
    crate::new_point_id(Timestamp::now())
}

/// The key of a lease.
pub fn lease_key(kind: LeaseKind, id: &str) -> ObjPath {
    ObjPath::from(format!("{LOCKS_PREFIX}/{}-{id}", kind.as_str()))
}

/// Parses the file name of a lease key into its kind and id.
fn parse_lease_name(name: &str) -> Option<(LeaseKind, &str)> {
    let (kind, id) = name.split_once('-')?;
    let kind = LeaseKind::parse(kind)?;
    validate_name("lease", id).ok()?;
    Some((kind, id))
}

/// Parses and checks a lease object stored under `key`.
pub fn parse_lease(key: &str, bytes: &[u8]) -> Result<LeaseRecord, Error> {
    let corrupt = |why: String| Error::CorruptLease {
        key: key.into(),
        why,
    };
    let record: LeaseRecord =
        serde_json::from_slice(bytes).map_err(|e| corrupt(format!("not a lease record: {e}")))?;
    let name = key.rsplit('/').next().unwrap_or(key);
    match parse_lease_name(name) {
        Some((kind, id)) if kind == record.kind && id == record.id => Ok(record),
        _ => Err(corrupt(format!(
            "the record says {} lease {:?}, which does not match its key",
            record.kind, record.id
        ))),
    }
}

/// A conflicting lease found while acquiring.
#[derive(Debug, Clone)]
struct Found {
    key: String,
    record: LeaseRecord,
}

/// Lists the leases of the vault: each key with its record, or the error reading it.
pub async fn list_leases(
    vault: &Vault,
) -> Result<Vec<(String, Result<LeaseRecord, Error>)>, Error> {
    let store = vault.store();
    let prefix = ObjPath::from(LOCKS_PREFIX);
    let metas: Vec<_> = store
        .list(Some(&prefix))
        .try_collect()
        .await
        .map_err(|e| Error::store(&prefix, e))?;
    let mut out = Vec::new();
    for meta in metas {
        let key = meta.location.to_string();
        match read_lease(store, &meta.location).await {
            Ok(Some(r)) => out.push((key, Ok(r))),
            Ok(None) => {}
            Err(e) => out.push((key, Err(e))),
        }
    }
    out.sort_by(|a, b| a.0.cmp(&b.0));
    Ok(out)
}

/// Reads a lease; `None` if it vanished in between.
async fn read_lease(
    store: &Arc<dyn ObjectStore>,
    key: &ObjPath,
) -> Result<Option<LeaseRecord>, Error> {
    let limit = crate::bounded::MAX_LEASE_BYTES;
    let none = crate::retry::RetryPolicy::none();
    let bytes = match crate::bounded::get_capped(store.as_ref(), &none, key, limit).await {
        Ok(crate::bounded::Capped::Read(b)) => b,
        Ok(crate::bounded::Capped::TooLarge(size)) => {
            return Err(Error::CorruptLease {
                key: key.to_string(),
                why: format!(
                    "the object is {size} bytes, more than the {limit}-byte limit of a lease;                      not read"
                ),
            });
        }
        Err(object_store::Error::NotFound { .. }) => return Ok(None),
        Err(e) => return Err(Error::store(key, e)),
    };
    parse_lease(key.as_ref(), &bytes).map(Some)
}

/// Looks for a live lease that conflicts with `kind`, ignoring `own`. Expired conflicting
/// leases are returned too, so that GC can remove them.
async fn find_conflict(
    vault: &Vault,
    own: &ObjPath,
    kind: LeaseKind,
) -> Result<(Option<Found>, Vec<String>, Timestamp), Error> {
    let store = vault.store();
    let prefix = ObjPath::from(LOCKS_PREFIX);
    let metas: Vec<_> = crate::retry::retry(&vault.retry, prefix.as_ref(), |_| {
        store.list(Some(&prefix)).try_collect::<Vec<_>>()
    })
    .await
    .map_err(|e| Error::store(&prefix, e))?;
    // The store's time: the stamp of our own lease, written before this listing.
    let now = match metas.iter().find(|m| &m.location == own) {
        Some(m) => store_time(m),
        None => {
            let head = crate::retry::retry(&vault.retry, own.as_ref(), |_| store.head(own))
                .await
                .map_err(|e| Error::store(own, e))?;
            store_time(&head)
        }
    };
    let mut expired = Vec::new();
    for meta in metas {
        if &meta.location == own {
            continue;
        }
        let key = meta.location.to_string();
        let name = meta.location.filename().unwrap_or_default();
        match parse_lease_name(name) {
            Some((other, _)) if !kind.conflicts_with(other) => continue,
            Some(_) => {}
            // A key that is not a lease at all: whoever could be excluded by it must look.
            None => {
                return Err(Error::CorruptLease {
                    key,
                    why: "not a lease key (locks/<backup|prune|gc>-<id>)".into(),
                });
            }
        }
        match read_lease(store, &meta.location).await? {
            None => {}
            Some(record) if record.is_live_on_store(store_time(&meta), now) => {
                return Ok((Some(Found { key, record }), expired, now));
            }
            Some(_) => expired.push(key),
        }
    }
    Ok((None, expired, now))
}

#[derive(Debug)]
struct State {
    /// Until when (monotonic) the lease certainly lasts on the store's clock.
    valid_until: Mutex<Instant>,
    /// How much older the store may make a write look (its `last_modified` resolution).
    resolution_ms: AtomicU64,
    lost: AtomicBool,
    why_lost: Mutex<Option<String>>,
}

impl State {
    fn valid_until(&self) -> Instant {
        match self.valid_until.lock() {
            Ok(t) => *t,
            // A poisoned lock: take the lease as already ended.
            Err(_) => Instant::now(),
        }
    }

    /// A write of the lease object that started at `sent` succeeded.
    fn written(&self, sent: Instant, ttl: Duration) {
        if let Ok(mut t) = self.valid_until.lock() {
            let resolution = Duration::from_millis(self.resolution_ms.load(Ordering::SeqCst));
            *t = sent + ttl.saturating_sub(resolution);
        }
    }

    fn lose(&self, why: String) {
        if let Ok(mut w) = self.why_lost.lock()
            && w.is_none()
        {
            *w = Some(why);
        }
        self.lost.store(true, Ordering::SeqCst);
    }
}

/// A held lease. Renewed in the background until released; dropping it stops the renewal
/// and deletes the lease object in the background (when a tokio runtime is running).
#[derive(Debug)]
pub struct Lease {
    store: Arc<dyn ObjectStore>,
    key: ObjPath,
    record: LeaseRecord,
    ttl: Duration,
    clock_offset: jiff::SignedDuration,
    state: Arc<State>,
    stop: Option<tokio::sync::watch::Sender<bool>>,
    task: Option<tokio::task::JoinHandle<()>>,
    /// Expired leases of conflicting kinds seen while acquiring.
    expired_seen: Vec<String>,
    /// The store's time when acquired (the stamp of our lease) and the local instant the
    /// acquisition's listing returned.
    store_clock: (Timestamp, Instant),
    /// When the acquiring write was sent.
    sent: Instant,
    released: bool,
}

impl Lease {
    /// Acquires a lease of `kind` for `holder` (see the module documentation for the
    /// protocol). Fails with [`Error::LeaseConflict`] if a conflicting lease stays live for
    /// longer than `options.wait`, or [`Error::CorruptLease`] if one cannot be read.
    pub async fn acquire(
        vault: &Vault,
        kind: LeaseKind,
        holder: &str,
        options: &LeaseOptions,
    ) -> Result<Lease, Error> {
        if kind != LeaseKind::Backup {
            crate::conditional::check_single_writer(
                vault.location(),
                vault.config(),
                options.single_writer,
                if kind == LeaseKind::Gc {
                    "garbage collection"
                } else {
                    "prune"
                },
            )?;
        }
        let started = std::time::Instant::now();
        let ttl = options.ttl.max(Duration::from_millis(100));
        loop {
            let mut lease = Self::write(vault, kind, holder, ttl, options).await?;
            let (found, expired, store_now) = match find_conflict(vault, &lease.key, kind).await {
                Ok(r) => r,
                Err(e) => {
                    let _ = lease.delete_now().await;
                    return Err(e);
                }
            };
            match found {
                None => {
                    lease.expired_seen = expired;
                    lease.store_clock = (store_now, Instant::now());
                    // A stamp with milliseconds comes from a store that keeps them: no
                    // second-granularity allowance is needed (one that truncates to seconds
                    // always stamps .000; a true .000 only costs a second of margin).
                    if store_now.subsec_millisecond() != 0 {
                        lease.state.resolution_ms.store(0, Ordering::SeqCst);
                        lease.state.written(lease.sent, ttl);
                    }
                    lease.start_renewal();
                    tracing::debug!(key = %lease.key, "lease acquired");
                    return Ok(lease);
                }
                Some(found) => {
                    lease.delete_now().await?;
                    let waited = started.elapsed();
                    if waited >= options.wait {
                        return Err(Error::LeaseConflict {
                            wanted: kind.as_str(),
                            key: found.key,
                            holder: found.record.describe(),
                            waited_ms: waited.as_millis() as u64,
                        });
                    }
                    tracing::debug!(conflict = %found.key, "lease busy, retrying");
                    let jitter = Duration::from_millis(rand::random::<u64>() % 100);
                    let pause = (options.retry + jitter).min(options.wait - waited);
                    tokio::time::sleep(pause.max(Duration::from_millis(1))).await;
                }
            }
        }
    }

    async fn write(
        vault: &Vault,
        kind: LeaseKind,
        holder: &str,
        ttl: Duration,
        options: &LeaseOptions,
    ) -> Result<Lease, Error> {
        let now = options.wall_now();
        let record = LeaseRecord {
            kind,
            id: lease_id(),
            holder: holder.to_string(),
            pid: std::process::id(),
            host: vault.host.to_string(),
            created: now,
            expires: plus(now, ttl),
            ttl_ms: Some(ttl.as_millis() as u64),
        };
        let key = lease_key(kind, &record.id);
        let json = serde_json::to_vec_pretty(&record).map_err(|e| Error::Worker(e.to_string()))?;
        let opts = PutOptions {
            mode: PutMode::Create,
            ..Default::default()
        };
        // Transient failures are retried on the same key. The key is this attempt's own
        // (a fresh random id), so "already exists" on a retry means the earlier write landed.
        let payload = bytes::Bytes::from(json);
        let sent = Instant::now();
        crate::retry::retry(&vault.retry, key.as_ref(), |_| {
            let payload = payload.clone();
            let opts = opts.clone();
            let key = &key;
            async move {
                match vault
                    .store()
                    .put_opts(key, PutPayload::from(payload), opts)
                    .await
                {
                    Ok(_) | Err(object_store::Error::AlreadyExists { .. }) => Ok(()),
                    Err(e) => Err(e),
                }
            }
        })
        .await
        .map_err(|e| Error::store(&key, e))?;
        let state = State {
            valid_until: Mutex::new(sent),
            resolution_ms: AtomicU64::new(STORE_TIME_RESOLUTION.as_millis() as u64),
            lost: AtomicBool::new(false),
            why_lost: Mutex::new(None),
        };
        state.written(sent, ttl);
        Ok(Lease {
            store: vault.store().clone(),
            key,
            ttl,
            clock_offset: options.clock_offset,
            state: Arc::new(state),
            record,
            stop: None,
            task: None,
            expired_seen: Vec::new(),
            store_clock: (Timestamp::MIN, Instant::now()),
            sent,
            released: false,
        })
    }

    fn start_renewal(&mut self) {
        let (tx, mut rx) = tokio::sync::watch::channel(false);
        let store = self.store.clone();
        let key = self.key.clone();
        let mut record = self.record.clone();
        let state = self.state.clone();
        let ttl = self.ttl;
        let period = ttl / 3;
        let margin = ttl / 4;
        let wall = LeaseOptions {
            clock_offset: self.clock_offset,
            ..LeaseOptions::default()
        };
        let task = tokio::spawn(async move {
            loop {
                tokio::select! {
                    r = rx.changed() => {
                        // Released (or the lease was dropped): stop renewing.
                        let _ = r;
                        break;
                    }
                    _ = tokio::time::sleep(period) => {}
                }
                // Same threshold as `ensure_held`: a lease that may already look expired to
                // others is never revived.
                let sent = Instant::now();
                if sent + margin >= state.valid_until() {
                    state.lose(
                        "it expired before it could be renewed (the process was stalled?)".into(),
                    );
                    break;
                }
                let now = wall.wall_now();
                record.expires = plus(now, ttl);
                let Ok(json) = serde_json::to_vec_pretty(&record) else {
                    break;
                };
                // Not inside the select: a renewal in flight always completes before release
                // deletes the object, so a release is never undone by a late renewal.
                match store.put(&key, PutPayload::from(json)).await {
                    Ok(_) => state.written(sent, ttl),
                    Err(e) => tracing::warn!(key = %key, error = %e, "cannot renew lease"),
                }
            }
        });
        self.stop = Some(tx);
        self.task = Some(task);
    }

    /// The lease's key.
    pub fn key(&self) -> &str {
        self.key.as_ref()
    }

    /// The lease's kind.
    pub fn kind(&self) -> LeaseKind {
        self.record.kind
    }

    /// The record as acquired.
    pub fn record(&self) -> &LeaseRecord {
        &self.record
    }

    /// Expired conflicting leases seen while acquiring (GC removes them).
    pub fn expired_seen(&self) -> &[String] {
        &self.expired_seen
    }

    /// Fails with [`Error::LeaseLost`] unless the lease is certainly still held: renewed, and
    /// not within `ttl / 4` of its expiry. Call it before every step that relies on it.
    pub fn ensure_held(&self) -> Result<(), Error> {
        if self.released {
            return Err(self.lost("it was released".into()));
        }
        if self.state.lost.load(Ordering::SeqCst) {
            let why = self
                .state
                .why_lost
                .lock()
                .ok()
                .and_then(|w| w.clone())
                .unwrap_or_else(|| "renewal failed".into());
            return Err(self.lost(why));
        }
        if self.safe_for() == Duration::ZERO {
            return Err(self.lost(
                "it was not renewed in time (it is within a quarter of its ttl of expiring)".into(),
            ));
        }
        Ok(())
    }

    /// How long from now the lease certainly stays held, keeping `ttl / 4` in hand: zero
    /// when [`Lease::ensure_held`] would fail on time.
    fn safe_for(&self) -> Duration {
        let end = self.state.valid_until();
        end.saturating_duration_since(Instant::now() + self.ttl / 4)
    }

    /// Runs `step` (a commit or a delete, retries included) only while the lease is certainly
    /// held: checks it first, and abandons the step with [`Error::LeaseLost`] if it has not
    /// finished a quarter of the ttl before the lease could look expired to others. Renewals
    /// during the step extend the deadline they were made before, not this one: the step
    /// never outlives the validity known when it started.
    pub async fn held<T, F>(&self, what: &str, step: F) -> Result<T, Error>
    where
        F: std::future::Future<Output = Result<T, Error>>,
    {
        self.ensure_held()?;
        let budget = self.safe_for();
        match tokio::time::timeout(budget, step).await {
            Ok(r) => r,
            Err(_) => Err(self.lost(format!(
                "{what} did not finish within the {} ms the lease was certainly held for; \
                 abandoned",
                budget.as_millis()
            ))),
        }
    }

    /// The object store's current time, as known from this lease: the `last_modified` of
    /// its object at acquisition (a lower bound of the store's time then) plus the time
    /// elapsed since. Never ahead of the store's clock.
    pub fn store_now(&self) -> Timestamp {
        let (t, at) = self.store_clock;
        plus(t, at.elapsed())
    }

    /// Checks that this is a lease of `kind` that is still held.
    pub fn ensure_kind(&self, kind: LeaseKind) -> Result<(), Error> {
        if self.record.kind != kind {
            return Err(self.lost(format!(
                "a {} lease is needed here, this is a {} lease",
                kind, self.record.kind
            )));
        }
        self.ensure_held()
    }

    fn lost(&self, why: String) -> Error {
        Error::LeaseLost {
            key: self.key.to_string(),
            why,
        }
    }

    async fn delete_now(&mut self) -> Result<(), Error> {
        self.released = true;
        match self.store.delete(&self.key).await {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(e) => Err(Error::store(&self.key, e)),
        }
    }

    /// Stops renewing and deletes the lease object.
    pub async fn release(mut self) -> Result<(), Error> {
        self.stop.take();
        if let Some(task) = self.task.take() {
            let _ = task.await;
        }
        let r = self.delete_now().await;
        tracing::debug!(key = %self.key, "lease released");
        r
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        if self.released {
            return;
        }
        self.stop.take();
        let task = self.task.take();
        let store = self.store.clone();
        let key = self.key.clone();
        if let Ok(handle) = tokio::runtime::Handle::try_current() {
            handle.spawn(async move {
                if let Some(task) = task {
                    let _ = task.await;
                }
                if let Err(e) = store.delete(&key).await
                    && !matches!(e, object_store::Error::NotFound { .. })
                {
                    tracing::warn!(key = %key, error = %e, "cannot remove lease; it will expire");
                }
            });
        }
    }
}

/// Writes a lease record as is (for tests and repair tools: e.g. an expired lease).
pub async fn write_lease_record(vault: &Vault, record: &LeaseRecord) -> Result<String, Error> {
    let key = lease_key(record.kind, &record.id);
    let json = serde_json::to_vec_pretty(record).map_err(|e| Error::Worker(e.to_string()))?;
    vault
        .store()
        .put(&key, PutPayload::from(json))
        .await
        .map_err(|e| Error::store(&key, e))?;
    Ok(key.to_string())
}
