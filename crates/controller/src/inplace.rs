//! In-place repair: a restore onto an existing disk (image file or block device) that reads the
//! target, compares each block with the point's manifest, and writes only the blocks that
//! differ.
//!
//! Each block is compared by its content address (the vault's hash of the block, as the
//! manifest records it; all zeros for a zero block). Writes are idempotent: a run that is
//! interrupted at any moment leaves a target that a second run compares again and finishes.

use std::fs::{File, OpenOptions};
use std::io::{Seek, SeekFrom};
use std::os::unix::fs::{FileExt, FileTypeExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use bulwark_blockdiff::Entry;
use bulwark_vault::{Error as VaultError, Vault};
use futures::StreamExt;
use serde::Serialize;

use crate::{Error, RestoreRequest};

/// What an in-place restore did.
#[derive(Debug, Clone, Serialize)]
#[non_exhaustive]
pub struct InPlaceReport {
    /// The point restored.
    pub point: String,
    /// The VM.
    pub vm: String,
    /// The disk.
    pub disk: String,
    /// The target.
    pub to: PathBuf,
    /// Whether the target is a block device.
    pub block_device: bool,
    /// The disk's size in bytes.
    pub size: u64,
    /// Blocks of the disk (all of them are compared).
    pub blocks: u64,
    /// Bytes read from the target to compare.
    pub bytes_compared: u64,
    /// Blocks that differed and were written.
    pub blocks_written: u64,
    /// Bytes written to the target.
    pub bytes_written: u64,
    /// The target's size before, when it was changed to the disk's size (image files only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub resized_from: Option<u64>,
    /// Bytes of a larger block device after the disk's end, left as they were.
    pub tail_left: u64,
    /// Wall time, milliseconds.
    pub duration_ms: u64,
}

impl std::fmt::Display for InPlaceReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(
            f,
            "restored {}/{}/{} in place onto {} ({}, {} blocks) in {:.1} s",
            self.vm,
            self.point,
            self.disk,
            self.to.display(),
            bulwark_vault::HumanBytes(self.size),
            self.blocks,
            self.duration_ms as f64 / 1000.0
        )?;
        writeln!(
            f,
            "  compared {} read from the target; wrote {} blocks ({})",
            bulwark_vault::HumanBytes(self.bytes_compared),
            self.blocks_written,
            bulwark_vault::HumanBytes(self.bytes_written)
        )?;
        if let Some(from) = self.resized_from {
            writeln!(
                f,
                "  resized the image from {} to {} bytes",
                from, self.size
            )?;
        }
        if self.tail_left > 0 {
            writeln!(
                f,
                "  the device is {} larger than the disk: that tail was left as it was",
                bulwark_vault::HumanBytes(self.tail_left)
            )?;
        }
        Ok(())
    }
}

/// Refuses a block device that is mounted or held (a partition of it mounted, a device-mapper
/// or RAID device on it): `/proc/self/mountinfo` and `/sys/dev/block/M:m/holders`. The
/// exclusive open that follows is the kernel's own check.
fn check_not_in_use(path: &Path, rdev: u64) -> Result<(), Error> {
    let refuse = |why: String| Error::RestoreTarget {
        path: path.to_path_buf(),
        why,
    };
    let (major, minor) = (rustix::fs::major(rdev), rustix::fs::minor(rdev));
    let sys = |maj: u32, min: u32| std::fs::canonicalize(format!("/sys/dev/block/{maj}:{min}"));
    let ours = sys(major, minor).map_err(|e| refuse(format!("no sysfs entry: {e}")))?;
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo")
        .map_err(|e| refuse(format!("cannot read /proc/self/mountinfo: {e}")))?;
    for line in mountinfo.lines() {
        let f: Vec<&str> = line.split_whitespace().collect();
        let (Some(devno), Some(mountpoint)) = (f.get(2), f.get(4)) else {
            continue;
        };
        let Some((ma, mi)) = devno.split_once(':') else {
            continue;
        };
        let (Ok(ma), Ok(mi)) = (ma.parse::<u32>(), mi.parse::<u32>()) else {
            continue;
        };
        if ma == 0 {
            continue; // tmpfs, proc, ...: no block device
        }
        if let Ok(dev) = sys(ma, mi)
            && (dev == ours || dev.starts_with(&ours))
        {
            return Err(refuse(format!(
                "mounted at {mountpoint} (unmount it first: an in-place restore rewrites the device under the file system)"
            )));
        }
    }
    let mut held = Vec::new();
    let mut dirs = vec![ours.clone()];
    // The device's partitions are subdirectories holding a `partition` file.
    if let Ok(rd) = std::fs::read_dir(&ours) {
        for e in rd.flatten() {
            if e.path().join("partition").exists() {
                dirs.push(e.path());
            }
        }
    }
    for d in dirs {
        if let Ok(rd) = std::fs::read_dir(d.join("holders")) {
            held.extend(
                rd.flatten()
                    .map(|e| e.file_name().to_string_lossy().into_owned()),
            );
        }
    }
    if !held.is_empty() {
        return Err(refuse(format!("in use by {}", held.join(", "))));
    }
    Ok(())
}

/// Opens the target for reading and writing: an existing regular file, or a block device that
/// is not in use (opened `O_EXCL`, which the kernel refuses while it is mounted).
fn open_target(path: &Path) -> Result<(File, bool), Error> {
    let io = |source| Error::Io {
        path: path.to_path_buf(),
        source,
    };
    // Never through a link: the write would land wherever it points.
    let meta = std::fs::symlink_metadata(path).map_err(io)?;
    let ft = meta.file_type();
    if ft.is_symlink() {
        return Err(Error::RestoreTarget {
            path: path.to_path_buf(),
            why: "is a symbolic link: refused (a restore never writes through a link; give the real path)".into(),
        });
    }
    if ft.is_block_device() {
        use std::os::unix::fs::MetadataExt;
        check_not_in_use(path, meta.rdev())?;
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc_excl() | nofollow())
            .open(path)
            .map_err(|e| {
                if e.raw_os_error() == Some(rustix::io::Errno::BUSY.raw_os_error()) {
                    Error::RestoreTarget {
                        path: path.to_path_buf(),
                        why: "busy (mounted or held by another user of the device)".into(),
                    }
                } else {
                    io(e)
                }
            })?;
        Ok((file, true))
    } else if ft.is_file() {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(nofollow())
            .open(path)
            .map_err(io)?;
        Ok((file, false))
    } else {
        Err(Error::RestoreTarget {
            path: path.to_path_buf(),
            why: "neither a regular file nor a block device".into(),
        })
    }
}

fn libc_excl() -> i32 {
    rustix::fs::OFlags::EXCL.bits() as i32
}

/// A link swapped in between the check and the open is refused by the open itself.
fn nofollow() -> i32 {
    rustix::fs::OFlags::NOFOLLOW.bits() as i32
}

/// Restores `req`'s disk onto the existing target `req.to`, writing only the blocks that
/// differ (see the module docs). An image file is first set to the disk's size; a block device
/// must be at least that large.
pub async fn run_restore_in_place(
    req: RestoreRequest,
    vault: &Vault,
) -> Result<InPlaceReport, Error> {
    let span =
        tracing::info_span!("restore_in_place", vm = %req.vm, point = %req.point, disk = %req.disk);
    let _enter = span.enter();
    let start = Instant::now();
    let point = vault.resolve_point(&req.vm, &req.point).await?;
    let map = vault.disk_manifest(&point, &req.disk).await?;
    crate::restore::refuse_known_bad(vault, &point, &req.disk, &map).await?;
    let path = req.to.clone();
    let io = |source| Error::Io {
        path: path.clone(),
        source,
    };
    let (mut file, block_device) = open_target(&path)?;
    let size = map.disk_size();
    let current = file.seek(SeekFrom::End(0)).map_err(io)?;
    let mut resized_from = None;
    let mut tail_left = 0;
    if block_device {
        if current < size {
            return Err(Error::RestoreTarget {
                path,
                why: format!("the device holds {current} bytes, the disk needs {size}"),
            });
        }
        tail_left = current - size;
    } else if current != size {
        file.set_len(size).map_err(io)?;
        resized_from = Some(current);
    }
    let file = Arc::new(file);
    let progress = &req.observer;
    progress.start(&req.disk, size);
    let mut report = InPlaceReport {
        point: point.id.clone(),
        vm: req.vm.clone(),
        disk: req.disk.clone(),
        to: path.clone(),
        block_device,
        size,
        blocks: map.block_count(),
        bytes_compared: 0,
        blocks_written: 0,
        bytes_written: 0,
        resized_from,
        tail_left,
        duration_ms: 0,
    };
    let bs = map.block_size().bytes();
    let mut blocks = futures::stream::iter(map.iter().enumerate())
        .map(|(i, e)| {
            let file = file.clone();
            let path = path.clone();
            let vault = vault.clone();
            let index = i as u64;
            let len = map.block_len(index);
            let entry = e;
            async move {
                let io = |source| Error::Io {
                    path: path.clone(),
                    source,
                };
                // Read and hash off the async threads.
                let (file2, vault2) = (file.clone(), vault.clone());
                let same = tokio::task::spawn_blocking(move || {
                    let mut buf = vec![0u8; len as usize];
                    file2.read_exact_at(&mut buf, index * bs)?;
                    Ok::<_, std::io::Error>(match entry {
                        Entry::Zero => buf.iter().all(|&b| b == 0),
                        Entry::Data { address, .. } => vault2.address_of(&buf) == address,
                    })
                })
                .await
                .map_err(|e| Error::Worker(e.to_string()))?
                .map_err(io)?;
                if same {
                    return Ok::<_, Error>((len, false));
                }
                let data = match entry {
                    Entry::Zero => bytes::Bytes::from(vec![0u8; len as usize]),
                    Entry::Data { address, .. } => {
                        let data = vault.get_block(address).await?;
                        if data.len() as u64 != len {
                            return Err(VaultError::Corrupt {
                                key: format!(
                                    "blocks/{}/{}",
                                    &address.to_hex()[..2],
                                    address.to_hex()
                                ),
                                why: format!(
                                    "block {index} is {} bytes, the manifest needs {len}",
                                    data.len()
                                ),
                            }
                            .into());
                        }
                        data
                    }
                };
                tokio::task::spawn_blocking(move || file.write_all_at(&data, index * bs))
                    .await
                    .map_err(|e| Error::Worker(e.to_string()))?
                    .map_err(io)?;
                tracing::debug!(block = index, "rewritten");
                Ok((len, true))
            }
        })
        .buffer_unordered(req.concurrency.max(1));
    while let Some(r) = blocks.next().await {
        let (len, written) = r?;
        report.bytes_compared += len;
        if written {
            report.blocks_written += 1;
            report.bytes_written += len;
        }
        progress.advance(&req.disk, len);
    }
    drop(blocks);
    let sync = file.clone();
    tokio::task::spawn_blocking(move || sync.sync_all())
        .await
        .map_err(|e| Error::Worker(e.to_string()))?
        .map_err(io)?;
    progress.finish(&req.disk);
    report.duration_ms = start.elapsed().as_millis() as u64;
    Ok(report)
}
