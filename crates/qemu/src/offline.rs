//! Offline images (no VM running): each disk is read through `qemu-storage-daemon`, read-only,
//! with QEMU's own image locking, so that a VM cannot start writing the image meanwhile. A
//! qcow2 image is read as the guest sees it (never its file bytes); a raw image likewise. No
//! copy of the disk is made.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use bulwark_blockdiff::BlockSource;
use bulwark_nbd::{Address, BASE_ALLOCATION, Client, ClientOptions};
use bulwark_snapshot::{
    Changes, DiskSource, Outcome, PendingSnapshot, PreviousDisk, Released, Snapshotter, Tracking,
};

use crate::fleece::PREFIX;
use crate::source::NbdReader;

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
}

impl OfflineOptions {
    /// `disks` through `qemu-storage-daemon` from the PATH, the socket in `socket_dir`.
    pub fn new(disks: Vec<(String, PathBuf)>, socket_dir: impl Into<PathBuf>) -> Self {
        OfflineOptions {
            disks,
            socket_dir: socket_dir.into(),
            storage_daemon: PathBuf::from("qemu-storage-daemon"),
            nbd_connections: 4,
        }
    }
}

/// Reads offline images through `qemu-storage-daemon` (read-only, locked).
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
            disks.push((name.clone(), path.clone(), detect_format(path)?));
        }
        tracing::info!(vm, disks = disks.len(), "offline images prepared");
        Ok(Box::new(PendingOffline {
            disks,
            options: self.options.clone(),
        }))
    }
}

#[derive(Debug)]
struct PendingOffline {
    disks: Vec<(String, PathBuf, &'static str)>,
    options: OfflineOptions,
}

/// QEMU's image locking (block/file-posix.c): an OFD lock on byte `100 + bit` says "I hold
/// permission bit", on `200 + bit` "I don't let others have it". Bits: 0 consistent read,
/// 1 write, 2 write unchanged, 3 resize.
const LOCK_PERM_BASE: i64 = 100;
const LOCK_SHARED_BASE: i64 = 200;
const PERM_CONSISTENT_READ: i64 = 0;
const PERM_WRITE: i64 = 1;
const PERM_RESIZE: i64 = 3;

fn ofd_lock(
    file: &std::fs::File,
    byte: i64,
    kind: libc::c_short,
    test: bool,
) -> std::io::Result<bool> {
    use std::os::fd::AsRawFd;
    // SAFETY: `flock` is plain data; all-zero is a valid value before the fields are set.
    let mut fl: libc::flock = unsafe { std::mem::zeroed() };
    fl.l_type = kind;
    fl.l_whence = libc::SEEK_SET as libc::c_short;
    fl.l_start = byte;
    fl.l_len = 1;
    let cmd = if test {
        libc::F_OFD_GETLK
    } else {
        libc::F_OFD_SETLK
    };
    // SAFETY: the descriptor is open for the call's duration and `fl` is a valid, exclusively
    // borrowed `flock` the kernel reads (and, for GETLK, writes).
    let r = unsafe { libc::fcntl(file.as_raw_fd(), cmd, &mut fl as *mut libc::flock) };
    if r < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(!test || fl.l_type == libc::F_UNLCK as libc::c_short)
}

/// Locks `path` the way a read-only QEMU that shares nothing but reading would: refused when a
/// writer (a running VM) holds it; while held, QEMU refuses to open it for writing or resizing.
fn lock_image(path: &Path) -> Result<std::fs::File, bulwark_snapshot::Error> {
    let file = std::fs::File::open(path).map_err(|e| bulwark_snapshot::Error::Io {
        path: path.to_path_buf(),
        source: e,
    })?;
    let io = |e: std::io::Error| bulwark_snapshot::Error::Io {
        path: path.to_path_buf(),
        source: e,
    };
    let rd = libc::F_RDLCK as libc::c_short;
    let wr = libc::F_WRLCK as libc::c_short;
    if !ofd_lock(&file, LOCK_PERM_BASE + PERM_WRITE, wr, true).map_err(io)? {
        return Err(err(
            path,
            "the image is open for writing (\"write\" lock held): a VM is using it; an offline backup needs it stopped, or back up the running VM through QMP",
        ));
    }
    for byte in [
        LOCK_PERM_BASE + PERM_CONSISTENT_READ,
        LOCK_SHARED_BASE + PERM_WRITE,
        LOCK_SHARED_BASE + PERM_RESIZE,
    ] {
        ofd_lock(&file, byte, rd, false).map_err(io)?;
    }
    Ok(file)
}

/// The storage daemon, killed (by its pid) when the last disk lets go of it, and the image
/// locks held meanwhile. A controller killed outright takes the daemon with it (parent-death
/// signal, see [`crate::tied`]); its record and socket go at the next start.
#[derive(Debug)]
struct Daemon {
    child: std::sync::Mutex<Option<std::process::Child>>,
    socket: PathBuf,
    record: PathBuf,
    locks: std::sync::Mutex<Vec<std::fs::File>>,
}

impl Daemon {
    fn stop(&self) {
        if let Ok(mut guard) = self.child.lock()
            && let Some(mut child) = guard.take()
        {
            let _ = child.kill();
            let _ = child.wait();
        }
        let _ = std::fs::remove_file(&self.socket);
        let _ = std::fs::remove_file(&self.record);
        if let Ok(mut locks) = self.locks.lock() {
            locks.clear();
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.stop();
    }
}

fn start_daemon(
    options: &OfflineOptions,
    disks: &[(String, PathBuf, &'static str)],
) -> Result<Arc<Daemon>, bulwark_snapshot::Error> {
    for stale in crate::tied::remove_stale(&options.socket_dir, &format!("{PREFIX}offline-")) {
        tracing::warn!(socket = %stale.display(), "removed what a killed controller left");
    }
    let mut locks = Vec::new();
    for (_, path, _) in disks {
        locks.push(lock_image(path)?);
    }
    let token = format!("{:012x}", rand::random::<u64>() & 0xffff_ffff_ffff);
    let socket = options
        .socket_dir
        .join(format!("{PREFIX}offline-{token}.sock"));
    // The NBD server first: exports need it.
    let mut args: Vec<String> = vec![
        "--nbd-server".into(),
        format!(
            "addr.type=unix,addr.path={}",
            socket.to_string_lossy().replace(',', ",,")
        ),
    ];
    for (i, (name, path, format)) in disks.iter().enumerate() {
        // QEMU's key=value syntax doubles commas inside values.
        let file = path.to_string_lossy().replace(',', ",,");
        args.push("--blockdev".into());
        args.push(format!(
            "driver=file,node-name=f{i},filename={file},read-only=on,locking=on"
        ));
        args.push("--blockdev".into());
        args.push(format!(
            "driver={format},node-name=d{i},file=f{i},read-only=on"
        ));
        args.push("--export".into());
        args.push(format!(
            "type=nbd,id=e{i},node-name=d{i},name={},writable=off",
            name.replace(',', ",,")
        ));
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
        record: record.clone(),
        locks: std::sync::Mutex::new(locks),
    };
    if let Err(e) = written {
        daemon.child = std::sync::Mutex::new(Some(child));
        return Err(err(&record, e.to_string()));
    }
    for _ in 0..500 {
        if socket.exists() {
            daemon.child = std::sync::Mutex::new(Some(child));
            return Ok(Arc::new(daemon));
        }
        if let Ok(Some(status)) = child.try_wait() {
            let mut stderr = String::new();
            if let Some(mut e) = child.stderr.take() {
                let _ = e.read_to_string(&mut stderr);
            }
            let path = disks.first().map_or(PathBuf::new(), |d| d.1.clone());
            return Err(err(
                &path,
                format!(
                    "qemu-storage-daemon {status}: {}{}",
                    stderr.trim(),
                    if stderr.contains("lock") {
                        " (a VM is using the image: an offline backup needs it stopped, or back up the running VM through QMP)"
                    } else {
                        ""
                    }
                ),
            ));
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

#[async_trait::async_trait]
impl PendingSnapshot for PendingOffline {
    async fn take(self: Box<Self>) -> Result<Vec<Box<dyn DiskSource>>, bulwark_snapshot::Error> {
        let PendingOffline { disks, options } = *self;
        tokio::task::spawn_blocking(move || {
            let daemon = start_daemon(&options, &disks)?;
            let mut sources: Vec<Box<dyn DiskSource>> = Vec::new();
            for (name, path, format) in &disks {
                let client = Client::connect(
                    Address::Unix(daemon.socket.clone()),
                    ClientOptions::new(name.clone())
                        .meta_context(BASE_ALLOCATION)
                        .connections(options.nbd_connections),
                )
                .map_err(|e| err(path, e.to_string()))?;
                let uri = client.describe();
                let mut reader = NbdReader::new(client, uri);
                if *format == "raw" {
                    let len = std::fs::metadata(path)
                        .map_err(|e| err(path, e.to_string()))?
                        .len();
                    reader = reader.with_size(len);
                }
                sources.push(Box::new(OfflineDisk {
                    name: name.clone(),
                    reader: Arc::new(reader),
                    daemon: daemon.clone(),
                }));
            }
            Ok(sources)
        })
        .await
        .map_err(|e| err(Path::new("qemu-storage-daemon"), e.to_string()))?
    }
}

/// An offline image read through `qemu-storage-daemon`.
#[derive(Debug)]
struct OfflineDisk {
    name: String,
    reader: Arc<NbdReader>,
    daemon: Arc<Daemon>,
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
        _previous: &PreviousDisk,
    ) -> Result<Changes, bulwark_snapshot::Error> {
        Ok(Changes::Unknown {
            reason: "offline image: no change tracking yet (every block is read)".into(),
        })
    }

    fn tracking(&self) -> Option<Tracking> {
        None
    }

    async fn release(
        self: Box<Self>,
        _outcome: Outcome,
    ) -> Result<Released, bulwark_snapshot::Error> {
        let OfflineDisk { reader, daemon, .. } = *self;
        drop(reader);
        // The last disk's release stops the daemon (its Drop).
        if Arc::strong_count(&daemon) == 1 {
            daemon.stop();
        }
        Ok(Released::default())
    }
}
