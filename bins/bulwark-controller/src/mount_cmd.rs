//! `bulwark-controller mount`: one disk of a recovery point as a read-only image file under a
//! FUSE mount, until SIGTERM or SIGINT (see the `bulwark-fuse` crate).

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, Result};
use bulwark_fuse::MountOptions;
use bulwark_recovery::PointDisk;
use clap::Args;
use tokio::signal::unix::{SignalKind, signal};

#[derive(Debug, Args)]
#[command(
    after_help = "MOUNTPOINT then holds one file, DISK.img, as large as the disk, whose \
bytes are the point's: every block is fetched from the vault when first read and verified \
(a block that does not verify gives EIO, never other bytes). The mount is read-only: opening \
the file for writing, writing and creating files fail with EROFS. SIGTERM or Ctrl-C unmounts \
(lazily when the file is still open) and exits 0. Mounting needs root (or fusermount3).

WARNING: the file system inside the image is the guest's, untrusted input. Mounting it on the \
host (for example `mount -o ro,loop MOUNTPOINT/os.img /mnt`) hands the host kernel a file \
system the guest controlled: do it at your own risk, ideally in a throwaway VM. To read files \
without mounting anything, use `bulwark-controller files`, which reads ext4 in user space.

Example:
  bulwark-controller mount --vault /srv/vault --vm web01 --disk os /mnt/web01 &
  e2fsck -fn /mnt/web01/os.img
  kill %1"
)]
pub struct MountArgs {
    #[command(flatten)]
    at: crate::PointDiskArg,
    /// An existing directory to mount on.
    #[arg(value_name = "MOUNTPOINT")]
    mountpoint: PathBuf,
    #[command(flatten)]
    reader: crate::ReaderArgs,
    /// Threads answering the kernel (reads served at once).
    #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u16).range(1..=64))]
    threads: u16,
}

/// Runs `mount`.
pub async fn run(a: MountArgs) -> Result<ExitCode> {
    let mut term = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    let mut int = signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;
    let vault = crate::open(&a.at.vault).await?;
    let point = vault.resolve_point(&a.at.vm, &a.at.point).await?;
    let disk = PointDisk::open(&vault, &a.at.vm, &point.id, &a.at.disk, a.reader.options()).await?;
    let mut mount_options = MountOptions::new(format!("{}.img", a.at.disk));
    mount_options.threads = usize::from(a.threads);
    // The image's mtime is the point's time (points before 1970 do not exist).
    let since_epoch = u64::try_from(point.created.as_nanosecond()).unwrap_or(0);
    mount_options.mtime = std::time::UNIX_EPOCH + Duration::from_nanos(since_epoch);
    let handle = tokio::runtime::Handle::current();
    let mountpoint = a.mountpoint.clone();
    let mounted = tokio::task::spawn_blocking(move || {
        bulwark_fuse::mount(disk, &mountpoint, handle, mount_options)
    })
    .await
    .context("mount task failed")??;
    eprintln!(
        "mounted {} ({}, read-only) as {}; SIGTERM or Ctrl-C unmounts",
        mounted.disk().label(),
        bulwark_vault::HumanBytes(mounted.disk().size()),
        mounted.image_path().display()
    );
    // Also ends when someone unmounts it with umount(8).
    let mut poll = tokio::time::interval(Duration::from_millis(500));
    loop {
        tokio::select! {
            _ = term.recv() => break,
            _ = int.recv() => break,
            _ = poll.tick() => if mounted.is_finished() { break },
        }
    }
    let s = mounted.disk().stats();
    let mountpoint = mounted.mountpoint().to_path_buf();
    tokio::task::spawn_blocking(move || mounted.unmount())
        .await
        .context("unmount task failed")??;
    eprintln!(
        "unmounted {}; fetched {} blocks ({}) from the vault, {} cache hits",
        mountpoint.display(),
        s.blocks_fetched,
        bulwark_vault::HumanBytes(s.bytes_fetched),
        s.cache_hits
    );
    Ok(ExitCode::SUCCESS)
}
