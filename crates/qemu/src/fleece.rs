//! The point in time of a running VM's disks: fleecing images, one QMP `transaction`, NBD
//! exports of the fleecing nodes, and the dirty-bitmap handover.
//!
//! The QMP sequence (QEMU 7.2):
//!
//! * prepare: `query-block` (disks), `query-named-block-nodes` (bitmaps); per disk the
//!   fleecing image, made by QEMU itself (no `qemu-img` process: that process was the largest
//!   fixed cost of a backup): an empty file, a `file` node on it (`bulwark-file-…`, with
//!   `cache.no-flush`: scratch space, never needed after a crash), a
//!   `blockdev-create` job of qcow2 on that node (`bulwark-create-…`, dismissed once
//!   concluded), and `blockdev-add` of a qcow2 node on the `file` node whose backing is the
//!   live disk's node;
//! * take: one `transaction` of, per disk, `block-dirty-bitmap-add` (the new bitmap:
//!   persistent on qcow2), `block-dirty-bitmap-disable` of each enabled `bulwark-` bitmap (the
//!   base, now frozen: the changes since the previous point), and `blockdev-backup sync=none`
//!   from the disk into the fleecing node (copy-before-write: a guest write first copies the old
//!   data into the fleecing image); then `nbd-server-start` on a Unix socket and, per disk,
//!   `block-export-add` of the fleecing node, read-only, with the frozen bitmaps;
//! * end of the reads (before the point is committed, [`TakenDisk::end_read`]): `query-jobs`
//!   (a copy-before-write job that stopped fails the backup: the export no longer held the
//!   point), then `block-export-del` (hard), `block-job-cancel`, `blockdev-del` of the qcow2
//!   node and then of its `file` node, remove the file, `nbd-server-stop` after the last disk:
//!   the guest's writes stop paying for copy-before-write while the point is committed;
//! * release: the same removals if the reads were not ended; then either
//!   `block-dirty-bitmap-remove` of the frozen
//!   bases (committed: the new bitmap is the next base) or `block-dirty-bitmap-merge` of the new
//!   bitmap into each base, `block-dirty-bitmap-enable` of the bases and
//!   `block-dirty-bitmap-remove` of the new one (failed: the next backup still sees every change
//!   since the last committed point).
//!
//! Every object it makes is named `bulwark-...`, so [`cleanup_leftovers`] can remove what a
//! killed controller left. Nothing here pauses the VM.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use serde_json::json;
use tokio::sync::Mutex;

use crate::disks::{VmDisk, discover, select};
use crate::{Error, Qmp};

/// The prefix of every object Bulwark makes in QEMU (nodes, jobs, exports, bitmaps, files).
pub const PREFIX: &str = "bulwark-";

/// The start of a fleecing (qcow2) node's name.
const FLEECE_NODE: &str = "bulwark-fleece-";
/// The start of the name of the `file` node under a fleecing node.
const FILE_NODE: &str = "bulwark-file-";
/// The start of a fleecing image's file name, `bulwark-fleece-PID-START-TOKEN-I.qcow2`: named
/// after the QEMU process it is made for (see [`qemu_tag`]), like the NBD socket, so that the
/// cleanup for one VM only ever touches that VM's files.
const FLEECE_FILE: &str = "bulwark-fleece-";

/// `PID-START` of the QEMU process (its pid and start time), the part of the names of the
/// files Bulwark makes for it; `0-0` when the kernel did not tell who the peer is (such files
/// are never found by [`cleanup_leftovers`]: they could be any VM's).
fn qemu_tag(qmp: &Qmp) -> String {
    match qmp.identity() {
        Some(id) => format!("{}-{}", id.pid, id.start_time),
        None => "0-0".into(),
    }
}

/// Where and how to make the point in time.
#[derive(Debug, Clone)]
pub struct FleeceOptions {
    /// Directory for the temporary fleecing images; `None`: next to each disk's image.
    pub fleece_dir: Option<PathBuf>,
    /// Directory for the NBD server's Unix socket.
    pub socket_dir: PathBuf,
    /// The disks to take (names as [`VmDisk::name`]); empty: every writable disk.
    pub disks: Vec<String>,
    /// Refuse to start unless each fleecing directory has room for the whole of its disks
    /// (default). QEMU 7.2's copy-before-write job fails the *guest's* write when the fleecing
    /// image cannot grow (measured: `write failed: No space left on device` inside the VM), so
    /// a fleecing image that may need the whole disk must have the room for it.
    pub require_space: bool,
}

impl FleeceOptions {
    /// Defaults: fleecing images next to the images, every disk.
    pub fn new(socket_dir: impl Into<PathBuf>) -> Self {
        FleeceOptions {
            fleece_dir: None,
            socket_dir: socket_dir.into(),
            disks: Vec::new(),
            require_space: true,
        }
    }
}

/// A dirty bitmap as QEMU reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BitmapInfo {
    /// Its name.
    pub name: String,
    /// Whether it records writes (enabled).
    pub recording: bool,
    /// Whether it is stored in the image.
    pub persistent: bool,
    /// Whether QEMU marks it inconsistent (e.g. QEMU died while it was in use).
    pub inconsistent: bool,
    /// Whether an operation holds it.
    pub busy: bool,
    /// Its granularity in bytes.
    pub granularity: u32,
    /// Dirty bytes.
    pub count: u64,
}

/// The dirty bitmaps of a node.
pub async fn bitmaps(qmp: &Qmp, node: &str) -> Result<Vec<BitmapInfo>, Error> {
    let nodes = qmp
        .run(
            qapi::qmp::query_named_block_nodes { flat: Some(true) },
            node,
        )
        .await?;
    let Some(info) = nodes
        .into_iter()
        .find(|n| n.node_name.as_deref() == Some(node))
    else {
        return Err(Error::Disk {
            socket: qmp.socket().to_path_buf(),
            disk: node.to_string(),
            reason: "node not found in query-named-block-nodes".into(),
        });
    };
    Ok(info
        .dirty_bitmaps
        .unwrap_or_default()
        .into_iter()
        .filter_map(|b| {
            Some(BitmapInfo {
                name: b.name?,
                recording: b.recording,
                persistent: b.persistent,
                inconsistent: b.inconsistent.unwrap_or(false),
                busy: b.busy,
                granularity: b.granularity,
                count: u64::try_from(b.count).unwrap_or(0),
            })
        })
        .collect())
}

pub(crate) fn random_token() -> String {
    format!("{:012x}", rand::random::<u64>() & 0xffff_ffff_ffff)
}

/// One disk's part of a point in time.
#[derive(Debug, Clone)]
pub struct FleeceDisk {
    /// The disk.
    pub disk: VmDisk,
    /// The fleecing node.
    pub fleece_node: String,
    /// The fleecing image file.
    pub fleece_file: PathBuf,
    /// The copy-before-write job.
    pub job: String,
    /// The NBD export id (the export's NBD name is the disk name).
    pub export: String,
    /// The bitmap that starts at this point.
    pub new_bitmap: String,
    /// The bitmaps frozen at this point (the enabled `bulwark-` bitmaps before it: the changes
    /// since the previous point), as QEMU reported them just before.
    pub frozen: Vec<BitmapInfo>,
    /// `bulwark-` bitmaps QEMU marked inconsistent, removed before the instant (they can't be
    /// used, nor disabled in a transaction).
    pub inconsistent: Vec<String>,
    /// Whether QEMU holds its bitmaps in the image (qcow2).
    pub persistent: bool,
    /// When the instant was taken (ms since the Unix epoch); 0 before.
    pub taken_at_ms: u64,
}

impl FleeceDisk {
    /// The `file` node under the fleecing node, `bulwark-file-TOKEN-I` (QEMU takes node names
    /// of at most 31 bytes).
    fn file_node(&self) -> String {
        self.fleece_node.replacen(FLEECE_NODE, FILE_NODE, 1)
    }

    /// The `blockdev-create` job that formats the fleecing image.
    fn create_job(&self) -> String {
        self.fleece_node.replacen(FLEECE_NODE, "bulwark-create-", 1)
    }
}

/// What the controller's side shares between a point's disks: the QMP session and the NBD server.
#[derive(Debug)]
struct Shared {
    qmp: Arc<Qmp>,
    /// This QEMU process's lock, held until the last disk is released (see [`lock_vm`]).
    _lock: Option<std::fs::File>,
    socket: PathBuf,
    server_started: Mutex<bool>,
    live_disks: AtomicUsize,
}

/// Made by [`Fleecing::prepare`]: fleecing images and nodes are ready, nothing is frozen yet.
#[derive(Debug)]
pub struct Fleecing {
    shared: Arc<Shared>,
    token: String,
    disks: Vec<FleeceDisk>,
    /// Which disks have their fleecing node added (they need cleaning up).
    armed: bool,
}

/// One disk of a taken point in time: exported over NBD until released.
#[derive(Debug)]
pub struct TakenDisk {
    shared: Arc<Shared>,
    info: FleeceDisk,
    released: bool,
    /// The read side (export, job, fleecing image; the server after the last disk) is
    /// removed, by [`TakenDisk::end_read`] or the release.
    read_released: AtomicBool,
}

async fn remove_quietly(qmp: &Qmp, what: &str, r: Result<(), Error>) {
    if let Err(e) = r {
        tracing::warn!(socket = %qmp.socket().display(), "cleanup: {what}: {e}");
    }
}

impl Fleecing {
    /// The slow part, before any freeze: removes leftovers of a killed run, finds the disks,
    /// creates and opens the fleecing images.
    pub async fn prepare(qmp: Arc<Qmp>, options: &FleeceOptions) -> Result<Fleecing, Error> {
        // First the lock: the cleanup below removes every `bulwark-` object of this QEMU,
        // which must not be those of a run still working on it.
        let lock = lock_vm(&qmp, &options.socket_dir)?;
        cleanup_leftovers(&qmp, options).await?;
        let disks = select(&qmp, discover(&qmp).await?, &options.disks)?;
        if options.require_space {
            check_space(&disks, options)?;
        }
        let token = random_token();
        let owner = qemu_tag(&qmp);
        let socket_name = format!("{PREFIX}nbd-{owner}-{token}.sock");
        let shared = Arc::new(Shared {
            qmp: qmp.clone(),
            _lock: lock,
            socket: socket_path(&options.socket_dir, &socket_name)?,
            server_started: Mutex::new(false),
            live_disks: AtomicUsize::new(0),
        });
        let mut fleecing = Fleecing {
            shared,
            token: token.clone(),
            disks: Vec::new(),
            armed: true,
        };
        for (i, disk) in disks.into_iter().enumerate() {
            let dir = fleece_dir(&disk, options);
            let ours: Vec<BitmapInfo> = bitmaps(&qmp, &disk.node)
                .await?
                .into_iter()
                .filter(|b| b.name.starts_with(PREFIX))
                .collect();
            let mut inconsistent = Vec::new();
            for b in ours.iter().filter(|b| b.inconsistent) {
                tracing::warn!(disk = %disk.name, bitmap = %b.name, "removing an inconsistent bitmap");
                if let Err(e) = remove_bitmap(&qmp, &disk.node, &b.name).await {
                    fleecing.abort().await;
                    return Err(e);
                }
                inconsistent.push(b.name.clone());
            }
            let frozen: Vec<BitmapInfo> = ours
                .into_iter()
                .filter(|b| b.recording && !b.inconsistent)
                .collect();
            let fd = FleeceDisk {
                fleece_node: format!("{FLEECE_NODE}{token}-{i}"),
                fleece_file: dir.join(format!("{FLEECE_FILE}{owner}-{token}-{i}.qcow2")),
                job: format!("{PREFIX}job-{token}-{i}"),
                export: format!("{PREFIX}export-{token}-{i}"),
                new_bitmap: format!("{PREFIX}bitmap-{token}"),
                persistent: disk.persistent_bitmaps(),
                taken_at_ms: 0,
                inconsistent,
                frozen,
                disk,
            };
            // Armed before anything is made: `abort` removes whatever of it exists.
            fleecing.disks.push(fd.clone());
            let created = create_fleece_image(&qmp, &fd).await;
            if let Err(e) = created {
                fleecing.abort().await;
                return Err(e);
            }
            let added = qmp
                .run_json::<qapi::qmp::blockdev_add>(
                    json!({
                        "driver": "qcow2",
                        "node-name": fd.fleece_node,
                        "file": fd.file_node(),
                        "backing": fd.disk.node,
                        "read-only": false,
                    }),
                    &fd.fleece_node,
                )
                .await;
            if let Err(e) = added {
                fleecing.abort().await;
                return Err(e);
            }
        }
        // The NBD server now, so that the instant is followed only by the exports.
        if let Err(e) = start_server(&fleecing.shared).await {
            fleecing.abort().await;
            return Err(e);
        }
        tracing::info!(token = %fleecing.token, disks = fleecing.disks.len(), "fleecing prepared");
        Ok(fleecing)
    }

    /// The disks this point will take.
    pub fn disks(&self) -> &[FleeceDisk] {
        &self.disks
    }

    /// The fast part: one QMP `transaction` over all disks (the instant), then the NBD exports.
    pub async fn take(mut self) -> Result<Vec<TakenDisk>, Error> {
        let qmp = self.shared.qmp.clone();
        let mut actions = Vec::new();
        for d in &self.disks {
            actions.push(json!({"type": "block-dirty-bitmap-add", "data": {
                "node": d.disk.node, "name": d.new_bitmap, "persistent": d.persistent}}));
            for b in &d.frozen {
                actions.push(json!({"type": "block-dirty-bitmap-disable", "data": {
                    "node": d.disk.node, "name": b.name}}));
            }
            actions.push(json!({"type": "blockdev-backup", "data": {
                "job-id": d.job, "device": d.disk.node, "target": d.fleece_node,
                "sync": "none", "auto-finalize": true, "auto-dismiss": true}}));
        }
        let started = std::time::Instant::now();
        let result = qmp
            .run_json::<qapi::qmp::transaction>(json!({ "actions": actions }), &self.token)
            .await;
        if let Err(e) = result {
            self.abort().await;
            return Err(e);
        }
        tracing::info!(token = %self.token, micros = started.elapsed().as_micros() as u64, "point in time taken");
        // From here the disks own their cleanup (bitmaps included).
        self.armed = false;
        let now_ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0);
        for d in &mut self.disks {
            d.taken_at_ms = now_ms;
        }
        let disks: Vec<TakenDisk> = std::mem::take(&mut self.disks)
            .into_iter()
            .map(|info| {
                self.shared.live_disks.fetch_add(1, Ordering::SeqCst);
                TakenDisk {
                    shared: self.shared.clone(),
                    info,
                    released: false,
                    read_released: AtomicBool::new(false),
                }
            })
            .collect();
        let exported = export_all(&self.shared, &disks).await;
        if let Err(e) = exported {
            for d in disks {
                remove_quietly(
                    &qmp,
                    "releasing after a failed export",
                    d.release(false).await,
                )
                .await;
            }
            return Err(e);
        }
        Ok(disks)
    }

    /// Removes what `prepare` made (nodes and files).
    async fn abort(&mut self) {
        if !self.armed {
            return;
        }
        self.armed = false;
        let qmp = self.shared.qmp.clone();
        remove_quietly(&qmp, "NBD server", stop_server(&self.shared).await).await;
        for d in std::mem::take(&mut self.disks) {
            remove_quietly(&qmp, &d.job, cancel_job(&qmp, &d.job).await).await;
            remove_quietly(&qmp, "fleecing image", remove_fleece(&qmp, &d).await).await;
            remove_quietly(
                &qmp,
                &d.new_bitmap,
                remove_bitmap(&qmp, &d.disk.node, &d.new_bitmap).await,
            )
            .await;
        }
    }
}

impl Drop for Fleecing {
    fn drop(&mut self) {
        if !self.armed || self.disks.is_empty() {
            return;
        }
        self.armed = false;
        let disks = std::mem::take(&mut self.disks);
        let qmp = self.shared.qmp.clone();
        let shared = self.shared.clone();
        spawn_cleanup(async move {
            remove_quietly(&qmp, "NBD server", stop_server(&shared).await).await;
            for d in disks {
                remove_quietly(&qmp, "fleecing image", remove_fleece(&qmp, &d).await).await;
            }
        });
    }
}

/// The NBD socket's path, made absolute: QEMU resolves a relative path against its own working
/// directory, not the controller's (a relative `--runtime-dir` would put the socket elsewhere).
/// Takes this QEMU process's lock: an exclusive `flock` on `.bulwark-vm-PID-START.lock` in
/// `dir` (the runtime directory, `/run/bulwark` by default for the CLI and the daemon alike),
/// held by the returned file until it is dropped. Two runs on one VM (a CLI backup while the
/// daemon's job runs) would otherwise remove each other's nodes and files as leftovers; the
/// second now fails at once with [`Error::Busy`] and touches nothing. `None` when the kernel
/// did not tell which process QEMU is (nothing to name the lock after). The file stays (empty;
/// removing a lock file races with its next taker); the runtime directory is usually a tmpfs.
fn lock_vm(qmp: &Qmp, dir: &Path) -> Result<Option<std::fs::File>, Error> {
    use std::os::unix::fs::OpenOptionsExt;
    let Some(id) = qmp.identity() else {
        return Ok(None);
    };
    // Hidden, and not `bulwark-…`: it is not a leftover, and stays.
    let path = dir.join(format!(".{PREFIX}vm-{}.lock", qemu_tag(qmp)));
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(&path)
        .map_err(|source| Error::File {
            path: path.clone(),
            source,
        })?;
    match rustix::fs::flock(&file, rustix::fs::FlockOperation::NonBlockingLockExclusive) {
        Ok(()) => Ok(Some(file)),
        Err(rustix::io::Errno::WOULDBLOCK) => Err(Error::Busy {
            socket: qmp.socket().to_path_buf(),
            pid: id.pid,
            lock: path,
        }),
        Err(e) => Err(Error::File {
            path,
            source: e.into(),
        }),
    }
}

fn socket_path(dir: &Path, name: &str) -> Result<PathBuf, Error> {
    let path = dir.join(name);
    std::path::absolute(&path).map_err(|source| Error::File { path, source })
}

fn fleece_dir(disk: &VmDisk, options: &FleeceOptions) -> PathBuf {
    match &options.fleece_dir {
        Some(d) => d.clone(),
        None => image_dir(disk),
    }
}

/// The directory of a disk's image file.
fn image_dir(disk: &VmDisk) -> PathBuf {
    Path::new(&disk.file)
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("."))
}

/// Each fleecing directory must hold the whole of its disks (plus qcow2 metadata: 1/8192 of
/// the size for L2 tables and refcounts at 64 KiB clusters, and 1 MiB).
fn check_space(disks: &[VmDisk], options: &FleeceOptions) -> Result<(), Error> {
    let mut need: Vec<(PathBuf, u64)> = Vec::new();
    for d in disks {
        let dir = fleece_dir(d, options);
        let bytes = d.size.saturating_add(d.size / 8192).saturating_add(1 << 20);
        match need.iter_mut().find(|(p, _)| p == &dir) {
            Some((_, n)) => *n = n.saturating_add(bytes),
            None => need.push((dir, bytes)),
        }
    }
    for (dir, bytes) in need {
        let st = rustix::fs::statvfs(&dir).map_err(|e| Error::File {
            path: dir.clone(),
            source: e.into(),
        })?;
        let free = st.f_bavail.saturating_mul(st.f_frsize);
        if free < bytes {
            return Err(Error::File {
                path: dir,
                source: std::io::Error::new(
                    std::io::ErrorKind::StorageFull,
                    format!(
                        "{free} bytes free, the fleecing images may need {bytes}: QEMU would fail the guest's writes if they filled the file system (choose a fleecing directory with room)"
                    ),
                ),
            });
        }
    }
    Ok(())
}

fn spawn_cleanup(f: impl std::future::Future<Output = ()> + Send + 'static) {
    match tokio::runtime::Handle::try_current() {
        Ok(handle) => {
            handle.spawn(f);
        }
        Err(_) => tracing::warn!(
            "dropped outside a tokio runtime: QEMU-side bulwark- objects stay until the next backup's cleanup"
        ),
    }
}

fn path_str(p: &Path) -> String {
    p.to_string_lossy().into_owned()
}

/// Makes the fleecing image inside QEMU: an empty file of ours (handed to QEMU's user), a
/// `file` node on it, and a `blockdev-create` job that formats it as qcow2 of the disk's size.
/// What it made stays for [`remove_fleece`] (or [`cleanup_leftovers`]) on any failure.
async fn create_fleece_image(qmp: &Qmp, d: &FleeceDisk) -> Result<(), Error> {
    let file_err = |e: std::io::Error| Error::File {
        path: d.fleece_file.clone(),
        source: e,
    };
    {
        use std::os::unix::fs::OpenOptionsExt;
        // A random name, never an existing file: no one else's file is ever opened.
        std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&d.fleece_file)
            .map_err(file_err)?;
    }
    // QEMU opens the file itself: give it to QEMU's user when that is another one.
    if let Some(id) = qmp.identity()
        && let Some((uid, gid)) = id.owner
        && uid != rustix::process::geteuid().as_raw()
    {
        rustix::fs::chown(
            &d.fleece_file,
            Some(rustix::fs::Uid::from_raw(uid)),
            Some(rustix::fs::Gid::from_raw(gid)),
        )
        .map_err(|e| file_err(e.into()))?;
    }
    let file_node = d.file_node();
    // No flushes: the image is scratch space that nothing reads after a crash (the next backup
    // removes it). Its creation's flush cost 10-150 ms on a loaded host, and without this every
    // guest flush during the backup would also flush the fleecing file.
    qmp.run_json::<qapi::qmp::blockdev_add>(
        json!({"driver": "file", "node-name": file_node, "filename": path_str(&d.fleece_file),
               "cache": {"no-flush": true}}),
        &file_node,
    )
    .await?;
    let job = d.create_job();
    qmp.run_json::<qapi::qmp::blockdev_create>(
        json!({"job-id": job, "options": {"driver": "qcow2", "file": file_node, "size": d.disk.size}}),
        &job,
    )
    .await?;
    // The job formats a few clusters: it ends within milliseconds. Polled (a QMP round trip
    // costs ~0.1 ms), then dismissed; an error leaves it to the caller's cleanup.
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    let mut pause = Duration::from_micros(500);
    loop {
        let jobs = qmp.run(qapi::qmp::query_jobs {}, &job).await?;
        let Some(j) = jobs.iter().find(|j| j.id == job) else {
            return Err(Error::Job {
                socket: qmp.socket().to_path_buf(),
                job,
                reason: "the job creating the fleecing image vanished".into(),
            });
        };
        if matches!(j.status, qapi::qmp::JobStatus::concluded) {
            if let Some(e) = &j.error {
                return Err(Error::Job {
                    socket: qmp.socket().to_path_buf(),
                    job,
                    reason: format!(
                        "creating the fleecing image {}: {e}",
                        d.fleece_file.display()
                    ),
                });
            }
            qmp.run(qapi::qmp::job_dismiss { id: job.clone() }, &job)
                .await?;
            return Ok(());
        }
        if std::time::Instant::now() > deadline {
            return Err(Error::Job {
                socket: qmp.socket().to_path_buf(),
                job,
                reason: format!(
                    "creating the fleecing image took over 60 s (status {:?})",
                    j.status
                ),
            });
        }
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(Duration::from_millis(20));
    }
}

/// Removes a disk's fleecing image: the creation job if it is still there, the qcow2 node, then
/// its `file` node (a node in use by another cannot go first), then the file. Each step is
/// done even when an earlier one failed; the first error is returned.
async fn remove_fleece(qmp: &Qmp, d: &FleeceDisk) -> Result<(), Error> {
    let steps = [
        cancel_job(qmp, &d.create_job()).await,
        del_node(qmp, &d.fleece_node).await,
        del_node(qmp, &d.file_node()).await,
        remove_file(&d.fleece_file),
    ];
    steps.into_iter().collect()
}

async fn start_server(shared: &Shared) -> Result<(), Error> {
    let mut started = shared.server_started.lock().await;
    if !*started {
        shared
            .qmp
            .run_json::<qapi::qmp::nbd_server_start>(
                json!({"addr": {"type": "unix", "data": {"path": path_str(&shared.socket)}}}),
                &path_str(&shared.socket),
            )
            .await?;
        *started = true;
    }
    Ok(())
}

async fn stop_server(shared: &Shared) -> Result<(), Error> {
    let mut started = shared.server_started.lock().await;
    if *started {
        ok_if_missing(
            shared
                .qmp
                .run(qapi::qmp::nbd_server_stop {}, "")
                .await
                .map(|_| ()),
        )?;
        *started = false;
    }
    remove_file(&shared.socket)
}

async fn export_all(shared: &Shared, disks: &[TakenDisk]) -> Result<(), Error> {
    let qmp = &shared.qmp;
    start_server(shared).await?;
    for d in disks {
        let bitmaps: Vec<&str> = d.info.frozen.iter().map(|b| b.name.as_str()).collect();
        qmp.run_json::<qapi::qmp::block_export_add>(
            json!({"type": "nbd", "id": d.info.export, "node-name": d.info.fleece_node,
                   "name": d.info.disk.name, "writable": false, "bitmaps": bitmaps}),
            &d.info.export,
        )
        .await?;
    }
    Ok(())
}

impl TakenDisk {
    /// What this disk's point is made of.
    pub fn info(&self) -> &FleeceDisk {
        &self.info
    }

    /// The NBD server's Unix socket.
    pub fn socket(&self) -> &Path {
        &self.shared.socket
    }

    /// The QMP session.
    pub fn qmp(&self) -> &Arc<Qmp> {
        &self.shared.qmp
    }

    /// The export as an NBD URI (`nbd+unix:///NAME?socket=PATH`).
    pub fn uri(&self) -> String {
        format!(
            "nbd+unix:///{}?socket={}",
            self.info.disk.name,
            self.shared.socket.display()
        )
    }

    /// The record to keep in this point, for the next backup's [`TakenDisk::judge`].
    pub fn record(&self) -> crate::BitmapRecord {
        crate::BitmapRecord {
            bitmap: self.info.new_bitmap.clone(),
            disk: self.info.disk.name.clone(),
            size: self.info.disk.size,
            persistent: self.info.persistent,
            started_at_ms: self.info.taken_at_ms,
            qemu: if self.info.persistent {
                None
            } else {
                self.shared.qmp.identity().cloned()
            },
            granularity: None,
            backing: None,
        }
    }

    /// Whether the bitmap `previous` recorded covers every change since it (see
    /// [`crate::judge`]).
    pub fn judge(&self, previous: &bulwark_snapshot::PreviousDisk) -> crate::Trust {
        crate::judge(previous, &self.info, self.shared.qmp.identity())
    }

    /// Whether the copy-before-write job still runs. If it stopped (e.g. the fleecing image's
    /// file system is full), the export no longer holds the point's bytes and must not be trusted.
    pub async fn check_job(&self) -> Result<(), Error> {
        let jobs = self
            .shared
            .qmp
            .run(qapi::qmp::query_jobs {}, &self.info.job)
            .await?;
        match jobs.iter().find(|j| j.id == self.info.job) {
            Some(j)
                if j.error.is_none()
                    && matches!(
                        j.status,
                        qapi::qmp::JobStatus::running
                            | qapi::qmp::JobStatus::ready
                            | qapi::qmp::JobStatus::paused
                    ) =>
            {
                Ok(())
            }
            Some(j) => Err(Error::Job {
                socket: self.shared.qmp.socket().to_path_buf(),
                job: self.info.job.clone(),
                reason: format!("status {:?}, error {:?}", j.status, j.error),
            }),
            None => Err(Error::Job {
                socket: self.shared.qmp.socket().to_path_buf(),
                job: self.info.job.clone(),
                reason: "the job is gone: the export no longer holds the point in time".into(),
            }),
        }
    }

    /// Ends the reads, before the point is committed: fails if the copy-before-write job
    /// stopped (see [`TakenDisk::check_job`]; the export then no longer held the point), else
    /// removes the export, the job and the fleecing image (the NBD server after the last
    /// disk), so the guest's writes stop paying for copy-before-write while the point is
    /// committed. The bitmaps stay until [`TakenDisk::release`]. A removal that fails is
    /// logged and left to the next backup's [`cleanup_leftovers`]: the point is sound. Once
    /// it succeeded, a second call does nothing.
    pub async fn end_read(&self) -> Result<(), Error> {
        if self.read_ended() {
            return Ok(());
        }
        self.check_job().await?;
        if !self.read_released.swap(true, Ordering::SeqCst) {
            remove_quietly(
                &self.shared.qmp,
                "ending the reads",
                release_read(&self.shared, &self.info).await,
            )
            .await;
        }
        Ok(())
    }

    /// Whether [`TakenDisk::end_read`] succeeded (the job was checked, the reads are over).
    pub fn read_ended(&self) -> bool {
        self.read_released.load(Ordering::SeqCst)
    }

    /// Ends this disk's point: removes the export, job, node and file (the NBD server with the
    /// last disk) unless [`TakenDisk::end_read`] did, then hands the bitmaps over: `committed`
    /// makes the new bitmap the only base; otherwise the new bitmap is merged back into the
    /// frozen bases, which record again.
    pub async fn release(mut self, committed: bool) -> Result<(), Error> {
        self.released = true;
        let read = !self.read_released.swap(true, Ordering::SeqCst);
        release_disk(self.shared.clone(), self.info.clone(), committed, read).await
    }
}

impl Drop for TakenDisk {
    fn drop(&mut self) {
        if self.released {
            return;
        }
        self.released = true;
        let shared = self.shared.clone();
        let info = self.info.clone();
        let read = !self.read_released.swap(true, Ordering::SeqCst);
        spawn_cleanup(async move {
            let qmp = shared.qmp.clone();
            remove_quietly(
                &qmp,
                "releasing a dropped disk",
                release_disk(shared, info, false, read).await,
            )
            .await;
        });
    }
}

/// Removes what served a disk's reads: its export, its copy-before-write job and its fleecing
/// image, then the NBD server if no other disk's reads are left. Called once per disk. Each
/// step is done even when an earlier one failed; the first error is returned.
async fn release_read(shared: &Shared, d: &FleeceDisk) -> Result<(), Error> {
    let qmp = &shared.qmp;
    let mut steps = vec![
        del_export(qmp, &d.export).await,
        cancel_job(qmp, &d.job).await,
        remove_fleece(qmp, d).await,
    ];
    if shared.live_disks.fetch_sub(1, Ordering::SeqCst) == 1 {
        steps.push(stop_server(shared).await);
    }
    steps.into_iter().collect()
}

/// Ends a disk's point: its read side first when `read` (see [`release_read`]), then its
/// bitmaps (see [`TakenDisk::release`]).
async fn release_disk(
    shared: Arc<Shared>,
    d: FleeceDisk,
    committed: bool,
    read: bool,
) -> Result<(), Error> {
    let qmp = &shared.qmp;
    let mut first: Option<Error> = None;
    let mut note = |r: Result<(), Error>| {
        if let Err(e) = r {
            tracing::warn!("release {}: {e}", d.disk.name);
            first.get_or_insert(e);
        }
    };
    if read {
        note(release_read(&shared, &d).await);
    }
    if committed {
        for b in &d.frozen {
            note(remove_bitmap(qmp, &d.disk.node, &b.name).await);
        }
    } else {
        note(
            roll_back_bitmaps(
                qmp,
                &d.disk.node,
                &d.new_bitmap,
                &d.frozen.iter().map(|b| b.name.clone()).collect::<Vec<_>>(),
            )
            .await,
        );
    }
    match first {
        None => Ok(()),
        Some(e) => Err(e),
    }
}

/// Merges `new` into each of `bases`, enables them, removes `new`: no change since the bases'
/// point is lost, whatever happened to the point that started `new`.
pub(crate) async fn roll_back_bitmaps(
    qmp: &Qmp,
    node: &str,
    new: &str,
    bases: &[String],
) -> Result<(), Error> {
    let present: Vec<String> = bitmaps(qmp, node)
        .await?
        .into_iter()
        .map(|b| b.name)
        .collect();
    if present.iter().any(|n| n == new) {
        for base in bases.iter().filter(|b| present.contains(b)) {
            qmp.run_json::<qapi::qmp::transaction>(
                json!({"actions": [
                    {"type": "block-dirty-bitmap-merge", "data": {"node": node, "target": base, "bitmaps": [new]}},
                    {"type": "block-dirty-bitmap-enable", "data": {"node": node, "name": base}},
                ]}),
                base,
            )
            .await?;
        }
        remove_bitmap(qmp, node, new).await?;
    } else {
        for base in bases.iter().filter(|b| present.contains(b)) {
            qmp.run(
                qapi::qmp::block_dirty_bitmap_enable(qapi::qmp::BlockDirtyBitmap {
                    node: node.into(),
                    name: base.clone(),
                }),
                base,
            )
            .await?;
        }
    }
    Ok(())
}

fn is_not_found(e: &Error) -> bool {
    matches!(e, Error::Command { class, desc, .. }
        if class.contains("DeviceNotFound") || desc.contains("not found") || desc.contains("No export") || desc.contains("Cannot find") || desc.contains("not running") || desc.contains("No job"))
}

fn ok_if_missing(r: Result<(), Error>) -> Result<(), Error> {
    match r {
        Err(e) if is_not_found(&e) => Ok(()),
        other => other,
    }
}

async fn wait_until<F, Fut>(qmp: &Qmp, what: &str, mut gone: F) -> Result<(), Error>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<bool, Error>>,
{
    for _ in 0..600 {
        if gone().await? {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    Err(Error::Job {
        socket: qmp.socket().to_path_buf(),
        job: what.to_string(),
        reason: "still there after 6 s".into(),
    })
}

pub(crate) async fn del_export(qmp: &Qmp, id: &str) -> Result<(), Error> {
    ok_if_missing(
        qmp.run(
            qapi::qmp::block_export_del {
                id: id.into(),
                mode: Some(qapi::qmp::BlockExportRemoveMode::hard),
            },
            id,
        )
        .await
        .map(|_| ()),
    )?;
    wait_until(qmp, id, || async {
        Ok(!qmp
            .run(qapi::qmp::query_block_exports {}, id)
            .await?
            .iter()
            .any(|e| e.id == id))
    })
    .await
}

async fn cancel_job(qmp: &Qmp, id: &str) -> Result<(), Error> {
    let jobs = qmp.run(qapi::qmp::query_jobs {}, id).await?;
    let Some(job) = jobs.iter().find(|j| j.id == id) else {
        return Ok(());
    };
    use qapi::qmp::JobStatus as S;
    if matches!(job.status, S::concluded) {
        ok_if_missing(
            qmp.run(qapi::qmp::job_dismiss { id: id.into() }, id)
                .await
                .map(|_| ()),
        )?;
    } else if !matches!(job.status, S::aborting | S::null) {
        ok_if_missing(
            qmp.run(
                qapi::qmp::block_job_cancel {
                    device: id.into(),
                    force: Some(true),
                },
                id,
            )
            .await
            .map(|_| ()),
        )?;
    }
    wait_until(qmp, id, || async {
        let jobs = qmp.run(qapi::qmp::query_jobs {}, id).await?;
        match jobs.iter().find(|j| j.id == id) {
            None => Ok(true),
            Some(j) if matches!(j.status, S::concluded) => {
                ok_if_missing(
                    qmp.run(qapi::qmp::job_dismiss { id: id.into() }, id)
                        .await
                        .map(|_| ()),
                )?;
                Ok(false)
            }
            Some(_) => Ok(false),
        }
    })
    .await
}

async fn del_node(qmp: &Qmp, node: &str) -> Result<(), Error> {
    ok_if_missing(
        qmp.run(
            qapi::qmp::blockdev_del {
                node_name: node.into(),
            },
            node,
        )
        .await
        .map(|_| ()),
    )
}

pub(crate) async fn remove_bitmap(qmp: &Qmp, node: &str, name: &str) -> Result<(), Error> {
    ok_if_missing(
        qmp.run(
            qapi::qmp::block_dirty_bitmap_remove(qapi::qmp::BlockDirtyBitmap {
                node: node.into(),
                name: name.into(),
            }),
            name,
        )
        .await
        .map(|_| ()),
    )
}

fn remove_file(path: &Path) -> Result<(), Error> {
    match std::fs::remove_file(path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(Error::File {
            path: path.to_path_buf(),
            source: e,
        }),
        _ => Ok(()),
    }
}

/// What [`cleanup_leftovers`] removed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Leftovers {
    /// Export ids deleted.
    pub exports: Vec<String>,
    /// Job ids cancelled.
    pub jobs: Vec<String>,
    /// Node names deleted.
    pub nodes: Vec<String>,
    /// Files removed (fleecing images, sockets).
    pub files: Vec<PathBuf>,
    /// Whether an NBD server Bulwark started was stopped.
    pub nbd_server: bool,
    /// Bitmaps rolled back: `(node, new bitmap merged into the frozen ones and removed)`.
    pub bitmaps: Vec<(String, String)>,
}

impl Leftovers {
    /// Whether nothing was left.
    pub fn is_empty(&self) -> bool {
        self == &Leftovers::default()
    }
}

/// Removes what a killed run left in this QEMU: `bulwark-` exports, jobs, fleecing nodes and
/// their files, the NBD server Bulwark started (known by its socket in `options.socket_dir`,
/// named after this QEMU process), and rolls the bitmaps back as a failed backup would (enabled
/// `bulwark-` bitmaps are merged into the frozen ones, which record again). Never pauses the VM.
///
/// Fleecing files of this QEMU process that no node holds (a run killed between creating the
/// file and handing it to QEMU) are removed too: they are looked for next to each of the VM's
/// writable disks' images and in `options.fleece_dir`, by the name that ties them to this
/// QEMU's pid and start time; another VM's files, and any other file, are left alone.
///
/// Everything of this VM named `bulwark-` is taken for a leftover: [`Fleecing::prepare`] calls
/// this only while holding the QEMU process's lock (see `lock_vm`), so never during another
/// run's backup of the same VM; a caller of its own must ensure the same.
pub async fn cleanup_leftovers(qmp: &Qmp, options: &FleeceOptions) -> Result<Leftovers, Error> {
    let socket_dir = options.socket_dir.as_path();
    let mut left = Leftovers::default();
    for e in qmp.run(qapi::qmp::query_block_exports {}, "").await? {
        if e.id.starts_with(PREFIX) {
            del_export(qmp, &e.id).await?;
            left.exports.push(e.id);
        }
    }
    for j in qmp.run(qapi::qmp::query_jobs {}, "").await? {
        if j.id.starts_with(PREFIX) {
            cancel_job(qmp, &j.id).await?;
            left.jobs.push(j.id);
        }
    }
    // A fleecing node's own `file` reads `json:{...}` (its backing is overridden): the image
    // path is that of its protocol child, a `file` node.
    let nodes = qmp
        .run(qapi::qmp::query_named_block_nodes { flat: Some(true) }, "")
        .await?;
    let fleece_files: Vec<PathBuf> = nodes
        .iter()
        .filter(|n| n.drv == "file")
        .map(|n| PathBuf::from(&n.file))
        .filter(|f| {
            f.file_name()
                .is_some_and(|f| f.to_string_lossy().starts_with(&format!("{PREFIX}fleece-")))
        })
        .collect();
    // A fleecing node first, then the `file` node under it (in use until then).
    let mut ours: Vec<String> = nodes
        .into_iter()
        .filter_map(|n| n.node_name)
        .filter(|name| name.starts_with(PREFIX))
        .collect();
    ours.sort_by_key(|name| name.starts_with(FILE_NODE));
    for name in ours {
        del_node(qmp, &name).await?;
        left.nodes.push(name);
    }
    for file in fleece_files {
        remove_file(&file)?;
        left.files.push(file);
    }
    // Files of this QEMU that no node holds: every node of ours is gone by now.
    let disks = discover(qmp).await?;
    if qmp.identity().is_some() {
        let mine = format!("{FLEECE_FILE}{}-", qemu_tag(qmp));
        let mut dirs: Vec<PathBuf> = disks
            .iter()
            .map(image_dir)
            .chain(options.fleece_dir.clone())
            .collect();
        dirs.sort();
        dirs.dedup();
        for dir in dirs {
            // A directory that cannot be listed holds nothing we made.
            let Ok(entries) = std::fs::read_dir(&dir) else {
                continue;
            };
            for entry in entries.flatten() {
                let name = entry.file_name().to_string_lossy().into_owned();
                // Only regular files (never a symlink's target) by the exact name we give.
                if name.starts_with(&mine)
                    && name.ends_with(".qcow2")
                    && entry.file_type().is_ok_and(|t| t.is_file())
                {
                    remove_file(&entry.path())?;
                    left.files.push(entry.path());
                }
            }
        }
    }
    if qmp.identity().is_some() {
        let mine = format!("{PREFIX}nbd-{}-", qemu_tag(qmp));
        if let Ok(entries) = std::fs::read_dir(socket_dir) {
            for entry in entries.flatten() {
                let name = entry.file_name().to_string_lossy().into_owned();
                if name.starts_with(&mine) && name.ends_with(".sock") {
                    ok_if_missing(qmp.run(qapi::qmp::nbd_server_stop {}, "").await.map(|_| ()))?;
                    left.nbd_server = true;
                    remove_file(&entry.path())?;
                    left.files.push(entry.path());
                }
            }
        }
    }
    for disk in disks {
        let ours: Vec<BitmapInfo> = bitmaps(qmp, &disk.node)
            .await?
            .into_iter()
            // Inconsistent ones can be neither merged nor enabled: `prepare` removes them.
            .filter(|b| b.name.starts_with(PREFIX) && !b.inconsistent)
            .collect();
        let frozen: Vec<String> = ours
            .iter()
            .filter(|b| !b.recording)
            .map(|b| b.name.clone())
            .collect();
        if frozen.is_empty() {
            continue;
        }
        for new in ours.iter().filter(|b| b.recording) {
            roll_back_bitmaps(qmp, &disk.node, &new.name, &frozen).await?;
            left.bitmaps.push((disk.node.clone(), new.name.clone()));
        }
        if ours.iter().all(|b| !b.recording) {
            roll_back_bitmaps(qmp, &disk.node, "", &frozen).await?;
            left.bitmaps.push((disk.node.clone(), String::new()));
        }
    }
    if !left.is_empty() {
        tracing::warn!(socket = %qmp.socket().display(), ?left, "removed leftovers of an earlier run");
    }
    Ok(left)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_relative_socket_dir_gives_an_absolute_socket_path() {
        let p = socket_path(Path::new("run/bulwark"), "bulwark-nbd-1.sock").unwrap();
        assert!(p.is_absolute(), "{}", p.display());
        assert!(p.ends_with("run/bulwark/bulwark-nbd-1.sock"));
        let cwd = std::env::current_dir().unwrap();
        assert!(
            p.starts_with(&cwd),
            "{} not under {}",
            p.display(),
            cwd.display()
        );
        let abs = socket_path(Path::new("/run/bulwark"), "s.sock").unwrap();
        assert_eq!(abs, Path::new("/run/bulwark/s.sock"));
    }
}
