//! Restore: one disk of one recovery point to a sparse raw image.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use bulwark_blockdiff::Entry;
use bulwark_vault::{Error as VaultError, Vault};
use futures::StreamExt;
use serde::Serialize;

use crate::tiers::{SnapshotStore, Tier};
use crate::{Error, NoObserver, Observer};

/// Where a restore reads from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum RestoreFrom {
    /// A kept snapshot of the point when there is one (verified block by block against the
    /// vault's manifest; a mismatch falls back to the vault), else the vault.
    #[default]
    Auto,
    /// The vault only.
    Vault,
    /// A kept snapshot only (verified when the point is in the vault): an error when there is
    /// none or it does not match.
    KeptSnapshot,
}

/// A restore to run. Build it with [`RestoreRequest::new`] and set what differs.
#[derive(Debug, Clone)]
pub struct RestoreRequest {
    /// The VM.
    pub vm: String,
    /// `latest` or a point id.
    pub point: String,
    /// The disk's name.
    pub disk: String,
    /// Where to write the raw image.
    pub to: PathBuf,
    /// Replace `to` if it exists (a regular file only). An existing disk (image file or
    /// block device) is repaired in place by [`crate::run_restore_in_place`] instead.
    pub force: bool,
    /// Blocks fetched at once.
    pub concurrency: usize,
    /// Which tier to read.
    pub from: RestoreFrom,
    /// The kept snapshots (the daemon's `snapshot_dir`, or backup's `--snapshot-dir`); without
    /// it only the vault is read.
    pub snapshots: Option<SnapshotStore>,
    /// Progress.
    pub observer: std::sync::Arc<dyn Observer>,
}

impl RestoreRequest {
    /// Restores `disk` of `vm`'s `point` (`latest` or an id) to `to`, from the vault, 16 blocks
    /// at a time, refusing to replace `to`.
    pub fn new(
        vm: impl Into<String>,
        point: impl Into<String>,
        disk: impl Into<String>,
        to: impl Into<PathBuf>,
    ) -> RestoreRequest {
        RestoreRequest {
            vm: vm.into(),
            point: point.into(),
            disk: disk.into(),
            to: to.into(),
            force: false,
            concurrency: 16,
            from: RestoreFrom::Auto,
            snapshots: None,
            observer: std::sync::Arc::new(NoObserver),
        }
    }
}

/// Restores one disk of one recovery point to a sparse raw image: from a kept snapshot or
/// from the vault, as [`RestoreRequest::from`] says. Every block is verified (against its
/// content address) except when the point exists only as a kept snapshot (its transfer never
/// finished): then the report says `verified: false`. The image is written to a hidden
/// partial file beside the target, synced, and renamed into place only when complete.
pub async fn run_restore(req: RestoreRequest, vault: &Vault) -> Result<RestoreReport, Error> {
    let span = tracing::info_span!("restore", vm = %req.vm, point = %req.point, disk = %req.disk);
    let _enter = span.enter();
    check_target(&req)?;
    match (&req.snapshots, req.from) {
        (_, RestoreFrom::Vault) | (None, RestoreFrom::Auto) => from_vault(vault, &req).await,
        (None, _) => Err(Error::RestoreTarget {
            path: req.to.clone(),
            why: "a restore from a kept snapshot needs the snapshot directory".into(),
        }),
        (Some(store), from) => {
            crate::tiers::restore_tiered(vault, store, &req, from == RestoreFrom::Auto).await
        }
    }
}

/// What a restore did.
#[derive(Debug, Clone, Serialize)]
#[non_exhaustive]
pub struct RestoreReport {
    /// The point restored.
    pub point: String,
    /// The VM.
    pub vm: String,
    /// The disk.
    pub disk: String,
    /// The file written.
    pub to: PathBuf,
    /// Disk size in bytes.
    pub size: u64,
    /// Blocks written.
    pub data_blocks: u64,
    /// Blocks left as holes.
    pub zero_blocks: u64,
    /// Bytes written.
    pub bytes_written: u64,
    /// Wall time, milliseconds.
    pub duration_ms: u64,
    /// Where the data came from: [`Tier::Snapshot`] (a kept snapshot) or [`Tier::Vault`].
    pub source: Tier,
    /// Whether every block was verified (against its content address).
    pub verified: bool,
    /// Why a kept snapshot was not used, when one was there.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub snapshot_rejected: Option<String>,
}

/// Removes the partial file unless disarmed: a failed restore leaves nothing that looks done.
/// A file being written beside its target, removed on drop unless disarmed (once renamed
/// into place).
pub(crate) struct Partial {
    pub(crate) path: PathBuf,
    pub(crate) armed: bool,
}

impl Drop for Partial {
    fn drop(&mut self) {
        if self.armed {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

fn partial_path(to: &Path) -> PathBuf {
    let name = to
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    to.with_file_name(format!(".{name}.bulwark-partial-{}", std::process::id()))
}

/// Restores one disk from the vault: every block is fetched, verified against its address and
/// written at its offset; zero blocks stay holes. The image is written to a hidden partial
/// file, synced, and renamed into place only when complete.
pub(crate) async fn from_vault(
    vault: &Vault,
    req: &RestoreRequest,
) -> Result<RestoreReport, Error> {
    let progress = &req.observer;
    let start = Instant::now();
    let point = vault.resolve_point(&req.vm, &req.point).await?;
    let map = vault.disk_manifest(&point, &req.disk).await?;
    refuse_known_bad(vault, &point, &req.disk, &map).await?;
    check_target(req)?;
    if let Some(parent) = req.to.parent().filter(|p| !p.as_os_str().is_empty())
        && !parent.is_dir()
    {
        return Err(Error::RestoreTarget {
            path: req.to.clone(),
            why: format!("directory {} does not exist", parent.display()),
        });
    }
    let tmp = partial_path(&req.to);
    let file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&tmp)
        .map_err(|source| Error::Io {
            path: tmp.clone(),
            source,
        })?;
    let mut guard = Partial {
        path: tmp.clone(),
        armed: true,
    };
    file.set_len(map.disk_size()).map_err(|source| Error::Io {
        path: tmp.clone(),
        source,
    })?;
    let file = Arc::new(Writer::new(file, &tmp));

    progress.start(&req.disk, map.disk_size());
    let mut report = RestoreReport {
        point: point.id.clone(),
        vm: req.vm.clone(),
        disk: req.disk.clone(),
        to: req.to.clone(),
        size: map.disk_size(),
        data_blocks: 0,
        zero_blocks: 0,
        bytes_written: 0,
        duration_ms: 0,
        source: Tier::Vault,
        verified: true,
        snapshot_rejected: None,
    };
    let bs = map.block_size().bytes();
    let mut writes = futures::stream::iter(map.iter().enumerate())
        .map(|(i, e)| {
            let file = file.clone();
            let tmp = tmp.clone();
            let index = i as u64;
            let expected = map.block_len(index);
            async move {
                let Entry::Data { address, .. } = e else {
                    return Ok::<_, Error>((expected, false));
                };
                let data = vault.get_block(address).await?;
                if data.len() as u64 != expected {
                    return Err(VaultError::Corrupt {
                        key: format!("blocks/{}/{}", &address.to_hex()[..2], address.to_hex()),
                        why: format!(
                            "block {index} is {} bytes, the manifest needs {expected}",
                            data.len()
                        ),
                    }
                    .into());
                }
                tokio::task::spawn_blocking(move || file.write_at(&data, index * bs))
                    .await
                    .map_err(|e| Error::Worker(e.to_string()))?
                    .map_err(|source| Error::Io { path: tmp, source })?;
                Ok((expected, true))
            }
        })
        .buffered(req.concurrency.max(1));
    while let Some(r) = writes.next().await {
        let (len, data) = r?;
        if data {
            report.data_blocks += 1;
            report.bytes_written += len;
        } else {
            report.zero_blocks += 1;
        }
        progress.advance(&req.disk, len);
    }
    drop(writes);
    let sync_file = file.clone();
    tokio::task::spawn_blocking(move || sync_file.file.sync_all())
        .await
        .map_err(|e| Error::Worker(e.to_string()))?
        .map_err(|source| Error::Io {
            path: tmp.clone(),
            source,
        })?;
    std::fs::rename(&tmp, &req.to).map_err(|source| Error::Io {
        path: req.to.clone(),
        source,
    })?;
    guard.armed = false;
    sync_parent(&req.to);
    progress.finish(&req.disk);
    report.duration_ms = start.elapsed().as_millis() as u64;
    Ok(report)
}

/// Checks the target of a restore into a new file, without following a symbolic link: a
/// symlink (dangling or not) is refused; an existing regular file needs `force`; a block
/// device, or any other kind of file, is refused (an existing disk is repaired with
/// [`crate::run_restore_in_place`], which compares before it writes).
pub(crate) fn check_target(req: &RestoreRequest) -> Result<(), Error> {
    let refuse = |why: &str| Error::RestoreTarget {
        path: req.to.clone(),
        why: why.into(),
    };
    let meta = match std::fs::symlink_metadata(&req.to) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(source) => {
            return Err(Error::Io {
                path: req.to.clone(),
                source,
            });
        }
    };
    let t = meta.file_type();
    if t.is_symlink() {
        return Err(refuse(
            "is a symbolic link: refused (a restore never writes through a link; give the real path)",
        ));
    }
    if std::os::unix::fs::FileTypeExt::is_block_device(&t) {
        return Err(refuse(
            "is a block device: overwrite it only with --in-place (--force never replaces a device node)",
        ));
    }
    if t.is_file() {
        return if req.force {
            Ok(())
        } else {
            Err(refuse("already exists (use --force to replace it)"))
        };
    }
    Err(refuse(
        "is not a regular file (a directory, device, FIFO or socket): refused",
    ))
}

/// Fails, before anything is written, when the disk needs blocks `verify` recorded as bad
/// (a restore would fail on them anyway, later and less clearly).
pub(crate) async fn refuse_known_bad(
    vault: &Vault,
    point: &bulwark_vault::RecoveryPoint,
    disk: &str,
    map: &bulwark_blockdiff::BlockMap,
) -> Result<(), Error> {
    let bad = vault.known_bad_blocks().await?;
    if bad.is_empty() {
        return Ok(());
    }
    let recorded: std::collections::BTreeSet<_> =
        map.addresses().filter(|a| bad.contains_key(*a)).collect();
    // A record is a hint: a block that reads back verified now (healed since) is no obstacle.
    let mut hits = Vec::new();
    for a in recorded {
        if vault.get_block(*a).await.is_err() {
            hits.push(a);
        }
    }
    if hits.is_empty() {
        return Ok(());
    }
    Err(Error::KnownBad {
        what: format!("VM {} point {} disk {disk}", point.vm, point.id),
        blocks: hits
            .into_iter()
            .map(|a| format!("{} ({})", bad[a].key, bad[a].why))
            .collect(),
    })
}

/// Alignment of direct writes (buffer, offset, length): covers 512-byte and 4 KiB sectors.
const DIRECT_ALIGN: usize = 4096;

/// Writes restored blocks at their offsets: with `O_DIRECT` where the file system accepts it,
/// else buffered. Direct writes of whole blocks skip the page cache: buffered, 16 writers
/// copying a whole disk into the page cache of one file contend for its lock, and the copy
/// and the writeback were most of a restore's time (BENCHMARKS.md). Writes that are not
/// aligned (a short last block) go through the page cache; the final `sync_all` covers both.
struct Writer {
    file: File,
    direct: Option<File>,
    direct_failed: AtomicBool,
}

impl Writer {
    fn new(file: File, path: &Path) -> Writer {
        let direct = OpenOptions::new()
            .write(true)
            .custom_flags(rustix::fs::OFlags::DIRECT.bits() as i32)
            .open(path)
            .ok();
        Writer {
            file,
            direct,
            direct_failed: AtomicBool::new(false),
        }
    }

    fn write_at(&self, data: &[u8], offset: u64) -> std::io::Result<()> {
        let aligned = data.len() % DIRECT_ALIGN == 0 && offset % DIRECT_ALIGN as u64 == 0;
        if let Some(direct) = &self.direct
            && aligned
            && !self.direct_failed.load(Ordering::Relaxed)
        {
            match write_direct(direct, data, offset) {
                Ok(done) if done == data.len() => return Ok(()),
                // A short direct write: the rest goes through the page cache.
                Ok(done) => return self.file.write_all_at(&data[done..], offset + done as u64),
                Err(e) if e.raw_os_error() == Some(rustix::io::Errno::INVAL.raw_os_error()) => {
                    tracing::debug!("O_DIRECT write refused: writing buffered");
                    self.direct_failed.store(true, Ordering::Relaxed);
                }
                Err(e) => return Err(e),
            }
        }
        self.file.write_all_at(data, offset)
    }
}

/// Writes `data` with `O_DIRECT`: straight from `data` when it is page-aligned already (the
/// vault hands out blocks in aligned buffers), else from an aligned copy. Returns the bytes
/// written: all of them, unless a write came back short at an unaligned length.
fn write_direct(file: &File, data: &[u8], offset: u64) -> std::io::Result<usize> {
    let copy: Vec<u8>;
    let aligned = if data.as_ptr().align_offset(DIRECT_ALIGN) == 0 {
        data
    } else {
        let mut buf: Vec<u8> = Vec::with_capacity(data.len() + DIRECT_ALIGN);
        let pad = buf.as_ptr().align_offset(DIRECT_ALIGN).min(DIRECT_ALIGN);
        buf.resize(pad, 0);
        buf.extend_from_slice(data);
        copy = buf;
        &copy[pad..]
    };
    let mut done = 0;
    while done < aligned.len() {
        match rustix::io::pwrite(file, &aligned[done..], offset + done as u64) {
            Ok(0) => return Err(std::io::ErrorKind::WriteZero.into()),
            Ok(n) => {
                done += n;
                if done % DIRECT_ALIGN != 0 {
                    break;
                }
            }
            Err(rustix::io::Errno::INTR) => {}
            Err(e) => return Err(e.into()),
        }
    }
    Ok(done.min(data.len()))
}

fn sync_parent(path: &Path) {
    if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty())
        && let Ok(dir) = File::open(parent)
    {
        let _ = dir.sync_all();
    }
}
