//! Offline images (no VM running), under QEMU's own image locking, so that a VM cannot start
//! writing an image meanwhile (and an image a VM writes is refused). A qcow2 image is read
//! through `qemu-storage-daemon`, as the guest sees it (never its file bytes). A raw image *is*
//! what the guest sees: it is read directly, in place, with the reader a reflink snapshot gets
//! (holes skipped, `O_DIRECT`), while Bulwark itself holds QEMU's locks on it ([`ImageLock`]).
//! No copy of the disk is made.
//!
//! # Change tracking of offline qcow2 images
//!
//! A qcow2 image carries persistent dirty bitmaps, and every QEMU program that opens it for
//! writing (a VM, `qemu-io`, `qemu-nbd`, `qemu-img`, `qemu-storage-daemon`) keeps them up to
//! date. So an offline qcow2 is opened read-write by the daemon (the NBD export stays
//! read-only; nothing writes the guest's data) and, through the daemon's QMP monitor, handled
//! like a running VM's disk ([`crate::Fleecing`]):
//!
//! * `bulwark-` bitmaps QEMU marks inconsistent (in use when a QEMU died) are removed; disabled
//!   ones (a backup killed between the hand-over and its release) get the recording ones merged
//!   back in and record again, as a failed backup would have left them;
//! * one `transaction`: `block-dirty-bitmap-add` of a new persistent bitmap `bulwark-bitmap-TOKEN`
//!   (the next backup's base) and `block-dirty-bitmap-disable` of the recording `bulwark-`
//!   bitmaps (the changes since the previous point);
//! * the image is exported with those bitmaps, and an incremental reads only the extents
//!   `qemu:dirty-bitmap:NAME` marks dirty, after [`crate::judge_bitmaps`] (the same rules as a
//!   running VM's, plus the granularity and backing file the point recorded) trusts the bitmap;
//! * release: committed, the old bitmaps go; failed, the new one is merged back into them. The
//!   daemon then ends with SIGTERM, which stores the bitmaps in the image.
//!
//! The bitmap names and the record are the running-VM path's: a backup of the running VM after
//! an offline one (or the reverse) uses the bitmap the other left. A daemon killed outright (its
//! controller SIGKILLed) leaves the bitmaps marked in use: the next backup reads the whole disk
//! and says why. A raw image has nowhere to keep a bitmap between QEMU runs: it is read in full
//! every time (read-only, locked). So is a qcow2 image this user cannot write, or with
//! [`OfflineOptions::track_qcow2`] off.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use bulwark_blockdiff::BlockSource;
use bulwark_nbd::{Address, BASE_ALLOCATION, Client, ClientOptions};
use bulwark_snapshot::{
    Changes, DiskSource, Outcome, PendingSnapshot, PreviousDisk, Released, Snapshotter, Tracking,
};

use serde_json::json;

use crate::fleece::{
    BitmapInfo, PREFIX, bitmaps, del_export, random_token, remove_bitmap, roll_back_bitmaps,
};
use crate::source::{NbdReader, unchanged_from_bitmap};
use crate::tracking::{BitmapRecord, Trust, judge_bitmaps};
use crate::{ImageLock, Qmp, VmDisk};

/// Why a raw offline image is always read in full.
pub const RAW_UNTRACKED: &str = "raw image: a raw file has nowhere to keep a dirty bitmap between QEMU runs (only qcow2 stores one), so every block is read";

/// How to read offline images.
#[derive(Debug, Clone)]
pub struct OfflineOptions {
    /// The disks: name and image path.
    pub disks: Vec<(String, PathBuf)>,
    /// Directory for the NBD socket.
    pub socket_dir: PathBuf,
    /// The `qemu-storage-daemon` program.
    pub storage_daemon: PathBuf,
    /// NBD connections per disk.
    pub nbd_connections: usize,
    /// Keep a persistent dirty bitmap in qcow2 images (opened read-write for it) so that the
    /// next backup reads only what changed (default). Off: qcow2 images are opened read-only
    /// and read in full.
    pub track_qcow2: bool,
    /// Time limit of each QMP command to the daemon.
    pub qmp_timeout: Duration,
}

impl OfflineOptions {
    /// `disks` through `qemu-storage-daemon` from the PATH, the socket in `socket_dir`.
    pub fn new(disks: Vec<(String, PathBuf)>, socket_dir: impl Into<PathBuf>) -> Self {
        OfflineOptions {
            disks,
            socket_dir: socket_dir.into(),
            storage_daemon: PathBuf::from("qemu-storage-daemon"),
            nbd_connections: 4,
            track_qcow2: true,
            qmp_timeout: Duration::from_secs(10),
        }
    }
}

/// Reads offline images under QEMU's image locks: qcow2 through `qemu-storage-daemon`
/// (read-only export), raw directly in place.
#[derive(Debug, Clone)]
pub struct OfflineSnapshotter {
    options: OfflineOptions,
}

impl OfflineSnapshotter {
    /// A snapshotter for `options.disks`.
    pub fn new(options: OfflineOptions) -> Self {
        OfflineSnapshotter { options }
    }
}

fn err(path: &Path, msg: impl Into<String>) -> bulwark_snapshot::Error {
    bulwark_snapshot::Error::Io {
        path: path.to_path_buf(),
        source: std::io::Error::other(msg.into()),
    }
}

/// `qcow2` when the file starts with the qcow2 magic, else `raw`. Never guessed from content
/// beyond that (a raw guest disk could hold anything, but not a valid qcow2 header at 0 that
/// QEMU would also take for one: QEMU's own probe does the same).
fn detect_format(path: &Path) -> Result<&'static str, bulwark_snapshot::Error> {
    let mut magic = [0u8; 4];
    let mut f = std::fs::File::open(path).map_err(|e| bulwark_snapshot::Error::Io {
        path: path.to_path_buf(),
        source: e,
    })?;
    let meta = f.metadata().map_err(|e| bulwark_snapshot::Error::Io {
        path: path.to_path_buf(),
        source: e,
    })?;
    if !meta.is_file() && !rustix::fs::FileType::from_raw_mode(meta_mode(&meta)).is_block_device() {
        return Err(bulwark_snapshot::Error::NotAFile {
            path: path.to_path_buf(),
        });
    }
    match f.read_exact(&mut magic) {
        Ok(()) if &magic == b"QFI\xfb" => Ok("qcow2"),
        _ => Ok("raw"),
    }
}

/// A disk whose image cannot be locked; the message names the image (and the lock in conflict).
fn lock_err(disk: &str, e: crate::Error) -> bulwark_snapshot::Error {
    bulwark_snapshot::Error::InvalidDisk {
        spec: disk.to_string(),
        why: e.to_string(),
    }
}

fn meta_mode(meta: &std::fs::Metadata) -> rustix::fs::RawMode {
    use std::os::unix::fs::MetadataExt;
    meta.mode() as rustix::fs::RawMode
}

#[async_trait::async_trait]
impl Snapshotter for OfflineSnapshotter {
    async fn prepare(
        &self,
        vm: &str,
        _point: &str,
    ) -> Result<Box<dyn PendingSnapshot>, bulwark_snapshot::Error> {
        let mut disks = Vec::new();
        for (name, path) in &self.options.disks {
            let format = detect_format(path)?;
            let track = if format == "raw" {
                Err(RAW_UNTRACKED.to_string())
            } else if !self.options.track_qcow2 {
                Err("change tracking of offline qcow2 images is off: every block is read".into())
            } else if rustix::fs::access(path, rustix::fs::Access::WRITE_OK).is_err() {
                Err("the qcow2 image is not writable here, so no dirty bitmap can be kept in it: every block is read".into())
            } else {
                Ok(())
            };
            disks.push(Planned {
                name: name.clone(),
                path: path.clone(),
                format,
                track,
            });
        }
        tracing::info!(vm, disks = disks.len(), "offline images prepared");
        Ok(Box::new(PendingOffline {
            disks,
            options: self.options.clone(),
        }))
    }
}

/// One disk as `prepare` found it.
#[derive(Debug, Clone)]
struct Planned {
    name: String,
    path: PathBuf,
    format: &'static str,
    /// `Ok`: opened read-write to keep a dirty bitmap; `Err(why not)`: read-only, read in full.
    track: Result<(), String>,
}

#[derive(Debug)]
struct PendingOffline {
    disks: Vec<Planned>,
    options: OfflineOptions,
}

/// The storage daemon, killed (by its pid) when the last disk lets go of it, and the image
/// locks held meanwhile. A controller killed outright takes the daemon with it (parent-death
/// signal, see [`crate::tied`]); its record and socket go at the next start.
#[derive(Debug)]
struct Daemon {
    child: std::sync::Mutex<Option<std::process::Child>>,
    socket: PathBuf,
    /// The QMP monitor's socket, when an image is open read-write (change tracking).
    qmp_socket: Option<PathBuf>,
    record: PathBuf,
    locks: std::sync::Mutex<Vec<ImageLock>>,
}

/// How long the daemon has to store its bitmaps and exit after SIGTERM before it is killed.
const STOP_GRACE: Duration = Duration::from_secs(10);

impl Daemon {
    /// Ends the daemon: SIGTERM, so that it closes the images cleanly (a read-write qcow2
    /// stores its dirty bitmaps then); SIGKILL after [`STOP_GRACE`].
    fn stop(&self) {
        if let Ok(mut guard) = self.child.lock()
            && let Some(mut child) = guard.take()
        {
            if let Ok(pid) = libc::pid_t::try_from(child.id()) {
                // SAFETY: kill(2) with the pid of our own child, not yet reaped (so not reused).
                unsafe {
                    libc::kill(pid, libc::SIGTERM);
                }
            }
            let deadline = std::time::Instant::now() + STOP_GRACE;
            loop {
                match child.try_wait() {
                    Ok(Some(status)) => {
                        if !status.success() {
                            tracing::warn!(%status, "qemu-storage-daemon did not exit cleanly");
                        }
                        break;
                    }
                    Ok(None) if std::time::Instant::now() < deadline => {
                        std::thread::sleep(Duration::from_millis(5));
                    }
                    _ => {
                        tracing::warn!(
                            "qemu-storage-daemon did not exit after SIGTERM: killed (its qcow2 bitmaps are left marked in use; the next backup reads those disks in full)"
                        );
                        let _ = child.kill();
                        let _ = child.wait();
                        break;
                    }
                }
            }
        }
        let _ = std::fs::remove_file(&self.socket);
        if let Some(q) = &self.qmp_socket {
            let _ = std::fs::remove_file(q);
        }
        let _ = std::fs::remove_file(&self.record);
        if let Ok(mut locks) = self.locks.lock() {
            locks.clear();
        }
    }
}

impl Daemon {
    /// When the daemon has exited: its status and what it said, for an error message.
    fn exited(&self) -> Option<String> {
        let Ok(mut guard) = self.child.lock() else {
            return None;
        };
        let child = guard.as_mut()?;
        for _ in 0..100 {
            if let Ok(Some(status)) = child.try_wait() {
                let mut stderr = String::new();
                if let Some(mut e) = child.stderr.take() {
                    let _ = e.read_to_string(&mut stderr);
                }
                return Some(daemon_exit_text(status, &stderr));
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        None
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.stop();
    }
}

/// What an exited qemu-storage-daemon said, with a hint when it failed on an image's lock.
fn daemon_exit_text(status: std::process::ExitStatus, stderr: &str) -> String {
    format!(
        "qemu-storage-daemon {status}: {}{}",
        stderr.trim(),
        if stderr.contains("lock") {
            " (a VM is using the image: an offline backup needs it stopped, or back up the running VM through QMP)"
        } else {
            ""
        }
    )
}

fn start_daemon(
    options: &OfflineOptions,
    disks: &[Planned],
) -> Result<Arc<Daemon>, bulwark_snapshot::Error> {
    for stale in crate::tied::remove_stale(&options.socket_dir, &format!("{PREFIX}offline-")) {
        let _ = std::fs::remove_file(stale.with_extension("qmp"));
        tracing::warn!(socket = %stale.display(), "removed what a killed controller left");
    }
    let mut locks = Vec::new();
    for d in disks {
        // An image opened read-write is locked by the daemon itself (a writable qcow2 node
        // takes the write permission and shares neither write nor resize); our own read lock
        // would keep the daemon from taking it.
        if d.track.is_err() {
            locks.push(ImageLock::read_only(&d.path).map_err(|e| lock_err(&d.name, e))?);
        } else {
            // Only a probe, released at once: a VM holding the image is refused with the same
            // clear error as for a read-only image, not through the daemon's failure to start
            // (which stays the guard for a VM that takes the image in between).
            drop(ImageLock::read_only(&d.path).map_err(|e| lock_err(&d.name, e))?);
        }
    }
    let token = random_token();
    let socket = options
        .socket_dir
        .join(format!("{PREFIX}offline-{token}.sock"));
    let qmp_socket = disks
        .iter()
        .any(|d| d.track.is_ok())
        .then(|| socket.with_extension("qmp"));
    // The NBD server first: exports need it.
    let mut args: Vec<String> = vec![
        "--nbd-server".into(),
        format!(
            "addr.type=unix,addr.path={}",
            socket.to_string_lossy().replace(',', ",,")
        ),
    ];
    if let Some(q) = &qmp_socket {
        args.push("--chardev".into());
        args.push(format!(
            "socket,id=bulwark-qmp,path={},server=on,wait=off",
            q.to_string_lossy().replace(',', ",,")
        ));
        args.push("--monitor".into());
        args.push("chardev=bulwark-qmp".into());
    }
    for (i, d) in disks.iter().enumerate() {
        // QEMU's key=value syntax doubles commas inside values.
        let file = d.path.to_string_lossy().replace(',', ",,");
        let ro = if d.track.is_ok() { "off" } else { "on" };
        args.push("--blockdev".into());
        args.push(format!(
            "driver=file,node-name=f{i},filename={file},read-only={ro},locking=on"
        ));
        args.push("--blockdev".into());
        args.push(format!(
            "driver={},node-name=d{i},file=f{i},read-only={ro}",
            d.format
        ));
        // A tracked image is exported over QMP once its bitmaps are handed over.
        if d.track.is_err() {
            args.push("--export".into());
            args.push(format!(
                "type=nbd,id=e{i},node-name=d{i},name={},writable=off",
                d.name.replace(',', ",,")
            ));
        }
    }
    // The record first (owner only), so that a controller killed right after the spawn still
    // leaves a record for the next start to clean up after.
    let record = socket.with_extension("pid");
    crate::tied::write_record(&record, None).map_err(|e| err(&record, e.to_string()))?;
    let mut command = std::process::Command::new(&options.storage_daemon);
    command
        .args(&args)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped());
    let mut child = match crate::tied::spawn_tied(command) {
        Ok(child) => child,
        Err(e) => {
            let _ = std::fs::remove_file(&record);
            return Err(err(&options.storage_daemon, format!("cannot start: {e}")));
        }
    };
    // From here on the Daemon's Drop kills the child and removes socket and record.
    let written = crate::tied::write_record(&record, Some(child.id()));
    let mut daemon = Daemon {
        child: std::sync::Mutex::new(None),
        socket: socket.clone(),
        qmp_socket: qmp_socket.clone(),
        record: record.clone(),
        locks: std::sync::Mutex::new(locks),
    };
    if let Err(e) = written {
        daemon.child = std::sync::Mutex::new(Some(child));
        return Err(err(&record, e.to_string()));
    }
    for _ in 0..500 {
        if socket.exists() && qmp_socket.as_ref().is_none_or(|q| q.exists()) {
            daemon.child = std::sync::Mutex::new(Some(child));
            return Ok(Arc::new(daemon));
        }
        if let Ok(Some(status)) = child.try_wait() {
            let mut stderr = String::new();
            if let Some(mut e) = child.stderr.take() {
                let _ = e.read_to_string(&mut stderr);
            }
            let path = disks.first().map_or(PathBuf::new(), |d| d.path.clone());
            return Err(err(&path, daemon_exit_text(status, &stderr)));
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    let _ = child.kill();
    let _ = child.wait();
    Err(err(
        &socket,
        "qemu-storage-daemon did not open its NBD socket within 5 s",
    ))
}

/// The daemon's monitor: its socket file appears at `bind`, a moment before it listens, so a
/// refused connection is tried again (for up to 2 s).
async fn connect_qmp(socket: &Path, timeout: Duration) -> Result<Qmp, crate::Error> {
    let mut tries = 0;
    loop {
        match Qmp::connect(&socket.to_string_lossy(), timeout).await {
            Err(crate::Error::Connect { source, .. })
                if source.kind() == std::io::ErrorKind::ConnectionRefused && tries < 200 =>
            {
                tries += 1;
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            r => return r,
        }
    }
}

fn qmp_err(path: &Path, e: crate::Error) -> bulwark_snapshot::Error {
    err(path, e.to_string())
}

/// What a tracked disk's point handed over: the new bitmap and the frozen ones.
#[derive(Debug)]
struct Tracked {
    qmp: Arc<Qmp>,
    /// The disk now (node `d<i>` in the daemon), for [`judge_bitmaps`].
    disk: VmDisk,
    /// The NBD export's id (it holds the frozen bitmaps busy until deleted).
    export: String,
    /// The bitmap that starts at this point.
    new_bitmap: String,
    /// Its granularity.
    granularity: u32,
    /// The image's backing file ("" for none).
    backing: String,
    /// The `bulwark-` bitmaps that recorded until this point (now disabled).
    frozen: Vec<BitmapInfo>,
    /// `bulwark-` bitmaps QEMU marked inconsistent, removed.
    inconsistent: Vec<String>,
    /// When the bitmap started (ms since the Unix epoch).
    started_at_ms: u64,
}

/// The bitmap hand-over on node `node` of the daemon (see the module docs). `Err` means the
/// image stays untracked this time (e.g. a qcow2 v2 image cannot store bitmaps): nothing
/// changed in it then, the transaction being all or nothing.
async fn hand_over(
    qmp: &Arc<Qmp>,
    node: &str,
    export: &str,
    d: &Planned,
) -> Result<Tracked, crate::Error> {
    let ours = |all: Vec<BitmapInfo>| -> Vec<BitmapInfo> {
        all.into_iter()
            .filter(|b| b.name.starts_with(PREFIX))
            .collect()
    };
    let mut inconsistent = Vec::new();
    for b in ours(bitmaps(qmp, node).await?)
        .iter()
        .filter(|b| b.inconsistent)
    {
        tracing::warn!(disk = %d.name, bitmap = %b.name, "removing an inconsistent bitmap");
        remove_bitmap(qmp, node, &b.name).await?;
        inconsistent.push(b.name.clone());
    }
    // Disabled `bulwark-` bitmaps are what a backup killed after its hand-over left: undo it
    // as its failure would have (no change since their point is lost).
    let present = ours(bitmaps(qmp, node).await?);
    let disabled: Vec<String> = present
        .iter()
        .filter(|b| !b.recording)
        .map(|b| b.name.clone())
        .collect();
    if !disabled.is_empty() {
        tracing::warn!(disk = %d.name, ?disabled, "rolling back the bitmaps of an unfinished backup");
        let recording: Vec<&BitmapInfo> = present.iter().filter(|b| b.recording).collect();
        for new in &recording {
            roll_back_bitmaps(qmp, node, &new.name, &disabled).await?;
        }
        if recording.is_empty() {
            roll_back_bitmaps(qmp, node, "", &disabled).await?;
        }
    }
    let frozen: Vec<BitmapInfo> = ours(bitmaps(qmp, node).await?)
        .into_iter()
        .filter(|b| b.recording && !b.inconsistent)
        .collect();
    let new_bitmap = format!("{PREFIX}bitmap-{}", random_token());
    let mut actions = vec![json!({"type": "block-dirty-bitmap-add", "data": {
        "node": node, "name": new_bitmap, "persistent": true}})];
    for b in &frozen {
        actions.push(json!({"type": "block-dirty-bitmap-disable", "data": {
            "node": node, "name": b.name}}));
    }
    qmp.run_json::<qapi::qmp::transaction>(json!({ "actions": actions }), &new_bitmap)
        .await?;
    let started_at_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0);
    let nodes = qmp
        .run(
            qapi::qmp::query_named_block_nodes { flat: Some(true) },
            node,
        )
        .await?;
    let info = nodes
        .into_iter()
        .find(|n| n.node_name.as_deref() == Some(node));
    let backing = info
        .as_ref()
        .and_then(|n| n.backing_file.clone())
        .unwrap_or_default();
    let size = info
        .as_ref()
        .and_then(|n| u64::try_from(n.image.base.virtual_size).ok())
        .unwrap_or(0);
    let granularity = bitmaps(qmp, node)
        .await?
        .into_iter()
        .find(|b| b.name == new_bitmap)
        .map(|b| b.granularity)
        .unwrap_or(0);
    Ok(Tracked {
        qmp: qmp.clone(),
        disk: VmDisk {
            name: d.name.clone(),
            node: node.to_string(),
            format: d.format.to_string(),
            file: d.path.to_string_lossy().into_owned(),
            size,
        },
        export: export.to_string(),
        new_bitmap,
        granularity,
        backing,
        frozen,
        inconsistent,
        started_at_ms,
    })
}

#[async_trait::async_trait]
impl PendingSnapshot for PendingOffline {
    async fn take(self: Box<Self>) -> Result<Vec<Box<dyn DiskSource>>, bulwark_snapshot::Error> {
        let PendingOffline { disks, options } = *self;
        // Raw images first: each locked and opened in place (no daemon, no copy).
        let (raw, qcow2): (Vec<_>, Vec<_>) = disks.into_iter().partition(|d| d.format == "raw");
        let mut sources: Vec<Box<dyn DiskSource>> = tokio::task::spawn_blocking(move || {
            raw.into_iter()
                .map(|d| InPlaceDisk::open(d).map(|d| Box::new(d) as Box<dyn DiskSource>))
                .collect::<Result<Vec<_>, _>>()
        })
        .await
        .map_err(|e| bulwark_snapshot::Error::Worker(e.to_string()))??;
        if !qcow2.is_empty() {
            sources.extend(through_daemon(qcow2, options).await?);
        }
        Ok(sources)
    }
}

/// The qcow2 images, through one `qemu-storage-daemon` (see the module docs).
async fn through_daemon(
    disks: Vec<Planned>,
    options: OfflineOptions,
) -> Result<Vec<Box<dyn DiskSource>>, bulwark_snapshot::Error> {
    let daemon = {
        let (options, disks) = (options.clone(), disks.clone());
        tokio::task::spawn_blocking(move || start_daemon(&options, &disks))
            .await
            .map_err(|e| err(Path::new("qemu-storage-daemon"), e.to_string()))??
    };
    let qmp = match &daemon.qmp_socket {
        Some(q) => match connect_qmp(q, options.qmp_timeout).await {
            Ok(qmp) => Some(Arc::new(qmp)),
            Err(e) => {
                // A daemon that exited (e.g. an image's lock taken meanwhile) says why; the
                // refused connection to its monitor is only the consequence.
                return Err(match daemon.exited() {
                    Some(why) => err(q, why),
                    // It names the monitor's socket itself.
                    None => bulwark_snapshot::Error::Provider(Box::new(e)),
                });
            }
        },
        None => None,
    };
    let mut tracked: Vec<Result<Tracked, String>> = Vec::new();
    for (i, d) in disks.iter().enumerate() {
        let node = format!("d{i}");
        let t = match (&d.track, &qmp) {
            (Err(why), _) => Err(why.clone()),
            (Ok(()), None) => Err("no QMP monitor to keep a bitmap with".into()),
            (Ok(()), Some(qmp)) => hand_over(qmp, &node, &format!("e{i}"), d)
                .await
                .map_err(|e| {
                    tracing::warn!(disk = %d.name, error = %e, "no dirty bitmap kept in the image");
                    format!("no dirty bitmap could be kept in the image ({e}): every block is read")
                }),
        };
        if let (Ok(()), Some(qmp)) = (&d.track, &qmp) {
            let bitmaps: Vec<&str> = match &t {
                Ok(t) => t.frozen.iter().map(|b| b.name.as_str()).collect(),
                Err(_) => Vec::new(),
            };
            let exported = qmp
                .run_json::<qapi::qmp::block_export_add>(
                    json!({"type": "nbd", "id": format!("e{i}"), "node-name": node,
                               "name": d.name, "writable": false, "bitmaps": bitmaps}),
                    &d.name,
                )
                .await;
            if let Err(e) = exported {
                tracked.push(t);
                roll_back_all(tracked).await;
                return Err(qmp_err(&d.path, e));
            }
        }
        tracked.push(t);
    }
    let socket = daemon.socket.clone();
    let connected = tokio::task::spawn_blocking(move || {
        let mut readers = Vec::new();
        for d in &disks {
            let client = Client::connect(
                Address::Unix(socket.clone()),
                ClientOptions::new(d.name.clone())
                    .meta_context(BASE_ALLOCATION)
                    .connections(options.nbd_connections),
            )
            .map_err(|e| err(&d.path, e.to_string()))?;
            let uri = client.describe();
            readers.push((d.name.clone(), NbdReader::new(client, uri)));
        }
        Ok::<_, bulwark_snapshot::Error>(readers)
    })
    .await
    .map_err(|e| err(Path::new("qemu-storage-daemon"), e.to_string()))?;
    let mut sources: Vec<Box<dyn DiskSource>> = Vec::new();
    let readers = match connected {
        Ok(r) => r,
        Err(e) => {
            roll_back_all(tracked).await;
            return Err(e);
        }
    };
    for ((name, reader), mut tracked) in readers.into_iter().zip(tracked) {
        // The size the guest sees is what the NBD export says.
        if let Ok(t) = &mut tracked {
            t.disk.size = reader.size();
        }
        sources.push(Box::new(OfflineDisk {
            name,
            reader: Arc::new(reader),
            daemon: daemon.clone(),
            tracked,
        }));
    }
    Ok(sources)
}

/// A failed start: the bitmaps go back as for a failed backup.
async fn roll_back_all(tracked: Vec<Result<Tracked, String>>) {
    for t in tracked.into_iter().flatten() {
        t.roll_back().await;
    }
}

impl Tracked {
    async fn roll_back(&self) {
        if let Err(e) = del_export(&self.qmp, &self.export).await {
            tracing::warn!(disk = %self.disk.name, error = %e, "deleting the export failed");
        }
        let names: Vec<String> = self.frozen.iter().map(|b| b.name.clone()).collect();
        if let Err(e) =
            roll_back_bitmaps(&self.qmp, &self.disk.node, &self.new_bitmap, &names).await
        {
            tracing::warn!(disk = %self.disk.name, error = %e, "rolling the bitmaps back failed (the next backup does it)");
        }
    }

    fn record(&self) -> BitmapRecord {
        BitmapRecord {
            bitmap: self.new_bitmap.clone(),
            disk: self.disk.name.clone(),
            size: self.disk.size,
            persistent: true,
            started_at_ms: self.started_at_ms,
            qemu: None,
            granularity: Some(self.granularity),
            backing: Some(self.backing.clone()),
        }
    }
}

/// An offline qcow2 image read through `qemu-storage-daemon`.
#[derive(Debug)]
struct OfflineDisk {
    name: String,
    reader: Arc<NbdReader>,
    daemon: Arc<Daemon>,
    /// The bitmap hand-over, or why the image is not tracked.
    tracked: Result<Tracked, String>,
}

#[async_trait::async_trait]
impl DiskSource for OfflineDisk {
    fn kind(&self) -> &str {
        "qemu-offline"
    }

    fn name(&self) -> &str {
        &self.name
    }

    fn reader(&self) -> Arc<dyn BlockSource> {
        self.reader.clone()
    }

    async fn changes_since(
        &self,
        previous: &PreviousDisk,
    ) -> Result<Changes, bulwark_snapshot::Error> {
        let t = match &self.tracked {
            Ok(t) => t,
            Err(reason) => {
                return Ok(Changes::Unknown {
                    reason: reason.clone(),
                });
            }
        };
        if let Some(tracking) = &previous.tracking
            && let Ok(record) = BitmapRecord::from_tracking(tracking)
            && let Some(backing) = &record.backing
            && backing != &t.backing
        {
            return Ok(Changes::Unknown {
                reason: format!(
                    "the image's backing file changed from {backing:?} to {:?} since the previous point (what the guest sees changed without a write the bitmap records)",
                    t.backing
                ),
            });
        }
        match judge_bitmaps(previous, &t.disk, &t.frozen, &t.inconsistent, None) {
            Trust::Unknown(reason) => Ok(Changes::Unknown { reason }),
            Trust::Bitmap(bitmap) => {
                let (socket, export, uri) = (
                    self.daemon.socket.clone(),
                    self.name.clone(),
                    self.reader.describe(),
                );
                let result = tokio::task::spawn_blocking(move || {
                    unchanged_from_bitmap(socket, export, uri, &bitmap)
                })
                .await;
                Ok(match result {
                    Ok(Ok(ranges)) => Changes::Unchanged(ranges),
                    Ok(Err(e)) => Changes::Unknown {
                        reason: format!("reading the dirty bitmap failed: {e}"),
                    },
                    Err(e) => Changes::Unknown {
                        reason: format!("reading the dirty bitmap failed: {e}"),
                    },
                })
            }
        }
    }

    fn tracking(&self) -> Option<Tracking> {
        self.tracked.as_ref().ok().map(|t| t.record().to_tracking())
    }

    async fn release(
        self: Box<Self>,
        outcome: Outcome,
    ) -> Result<Released, bulwark_snapshot::Error> {
        let OfflineDisk {
            reader,
            daemon,
            tracked,
            ..
        } = *self;
        drop(reader);
        let mut failed = None;
        if let Ok(t) = &tracked {
            if matches!(outcome, Outcome::Committed { .. }) {
                // The export holds the frozen bitmaps busy.
                if let Err(e) = del_export(&t.qmp, &t.export).await {
                    failed.get_or_insert(qmp_err(Path::new(&t.disk.file), e));
                }
                // The new bitmap is the next backup's base; the old ones are done.
                for b in &t.frozen {
                    if let Err(e) = remove_bitmap(&t.qmp, &t.disk.node, &b.name).await {
                        tracing::warn!(disk = %t.disk.name, bitmap = %b.name, error = %e, "removing a used bitmap failed");
                        failed.get_or_insert(qmp_err(Path::new(&t.disk.file), e));
                    }
                }
            } else {
                t.roll_back().await;
            }
        }
        drop(tracked);
        // The last disk's release stops the daemon (SIGTERM: the bitmaps are stored).
        if Arc::strong_count(&daemon) == 1 {
            tokio::task::spawn_blocking(move || daemon.stop())
                .await
                .map_err(|e| err(Path::new("qemu-storage-daemon"), e.to_string()))?;
        }
        match failed {
            Some(e) => Err(e),
            None => Ok(Released::default()),
        }
    }
}

/// A raw offline image read in place: QEMU's image locks held ([`ImageLock`]) for as long as
/// the source lives, the file read directly with the reader a reflink snapshot gets (holes
/// skipped with `SEEK_DATA`, `O_DIRECT` where the file system allows it, bounded buffers).
#[derive(Debug)]
struct InPlaceDisk {
    name: String,
    reader: Arc<bulwark_blockdiff::Disk>,
    /// Held until the source is released or dropped.
    lock: ImageLock,
    /// The image's size, modification and change times once locked: a program that ignores
    /// QEMU's locks and writes the image during the reads changes them.
    stamp: Stamp,
}

/// What a write to a file changes: its size, its modification and change times (to the
/// nanosecond).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Stamp {
    len: u64,
    mtime: (i64, i64),
    ctime: (i64, i64),
}

impl Stamp {
    fn of(meta: &std::fs::Metadata) -> Stamp {
        use std::os::unix::fs::MetadataExt;
        Stamp {
            len: meta.len(),
            mtime: (meta.mtime(), meta.mtime_nsec()),
            ctime: (meta.ctime(), meta.ctime_nsec()),
        }
    }
}

impl InPlaceDisk {
    /// Locks `d`'s image, then opens it for reading. The path must still name the locked file
    /// after the open (an image renamed or replaced meanwhile is refused, not read unlocked).
    fn open(d: Planned) -> Result<InPlaceDisk, bulwark_snapshot::Error> {
        use std::os::unix::fs::MetadataExt;
        let lock = ImageLock::read_only(&d.path).map_err(|e| lock_err(&d.name, e))?;
        let reader =
            bulwark_blockdiff::Disk::open(&d.path).map_err(|e| err(&d.path, e.to_string()))?;
        let locked = lock
            .file()
            .metadata()
            .map_err(|e| err(&d.path, e.to_string()))?;
        let now = std::fs::metadata(&d.path).map_err(|e| err(&d.path, e.to_string()))?;
        if (locked.dev(), locked.ino()) != (now.dev(), now.ino()) {
            return Err(err(
                &d.path,
                "the image was replaced while it was being locked; try again",
            ));
        }
        tracing::info!(disk = %d.name, path = %d.path.display(), size = reader.size(), "raw image read in place, locked");
        Ok(InPlaceDisk {
            name: d.name,
            reader: Arc::new(reader),
            lock,
            stamp: Stamp::of(&locked),
        })
    }
}

#[async_trait::async_trait]
impl DiskSource for InPlaceDisk {
    fn kind(&self) -> &str {
        "in-place"
    }

    fn name(&self) -> &str {
        &self.name
    }

    fn origin(&self) -> String {
        self.lock.path().display().to_string()
    }

    fn reader(&self) -> Arc<dyn BlockSource> {
        self.reader.clone()
    }

    async fn changes_since(
        &self,
        _previous: &PreviousDisk,
    ) -> Result<Changes, bulwark_snapshot::Error> {
        Ok(Changes::Unknown {
            reason: RAW_UNTRACKED.to_string(),
        })
    }

    fn tracking(&self) -> Option<Tracking> {
        None
    }

    /// Fails when the image was written while it was read: its size or times moved since it
    /// was locked (a program that ignores QEMU's locks, `dd` or `cp` say). What was read may
    /// then mix two states of the disk, and is not committed. A change of owner or mode moves
    /// the change time too, and fails the same way: nothing is lost, the next backup reads
    /// it again. On a kernel whose file times are coarse (without multigrain timestamps), a
    /// write within the same clock tick as the lock can go unseen.
    async fn end_read(&self) -> Result<(), bulwark_snapshot::Error> {
        let path = self.lock.path();
        let now = self
            .lock
            .file()
            .metadata()
            .map_err(|e| err(path, e.to_string()))?;
        if Stamp::of(&now) != self.stamp {
            return Err(err(
                path,
                "the image changed during the backup (its size, modification or change time \
                 moved), though it was locked the way QEMU locks images: a program that \
                 ignores those locks wrote or changed it; nothing is committed, back it up \
                 again once it is left alone",
            ));
        }
        Ok(())
    }

    async fn release(
        self: Box<Self>,
        _outcome: Outcome,
    ) -> Result<Released, bulwark_snapshot::Error> {
        // The reader's descriptors close first; the locks go with `lock`'s.
        let InPlaceDisk { reader, lock, .. } = *self;
        drop(reader);
        drop(lock);
        Ok(Released::default())
    }
}
