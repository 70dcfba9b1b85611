//! Instant recovery: a VM runs from a recovery point within seconds, and its disk moves to
//! local storage while it runs.
//!
//! 1. [`InstantExport::start`] serves the point's disk read-only over NBD on a Unix socket
//!    (blocks fetched from the vault on demand and verified) and creates a qcow2 overlay whose
//!    backing file is that export. A VM started on the overlay runs at once; its writes go to
//!    the overlay, never to the vault.
//! 2. [`InstantExport::stream`] drives QEMU's `block-stream` job through the VM's QMP socket
//!    until the overlay holds every block and QEMU reports no backing file.
//! 3. [`InstantExport::stop`] stops the export. The VM goes on running on the standalone
//!    overlay.

use std::path::{Path, PathBuf};

use bulwark_nbd::{Address, ShutdownHandle};
use bulwark_qemu::{Qmp, StreamOptions, StreamReport};
use bulwark_recovery::{DiskOptions, ExportOptions, FetchStats, NbdBackend};
use bulwark_vault::Vault;

use crate::Error;

/// The prefix of the `block-stream` job's id (followed by the disk's name).
pub const JOB_PREFIX: &str = "bulwark-instant-";

/// An instant recovery to start. Build it with [`InstantRequest::new`].
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct InstantRequest {
    /// The VM.
    pub vm: String,
    /// `latest` or a point id.
    pub point: String,
    /// The disk's name in the point (also the NBD export's name).
    pub disk: String,
    /// The qcow2 overlay to create (must not exist).
    pub overlay: PathBuf,
    /// The export's Unix socket (default: the overlay's path with `.nbd` appended). The overlay
    /// records it as its backing file.
    pub socket: Option<PathBuf>,
    /// Cache, read-ahead and fetch concurrency of the reads from the vault.
    pub disk_options: DiskOptions,
    /// The `qemu-img` program.
    pub qemu_img: PathBuf,
}

impl InstantRequest {
    /// Disk `disk` of `vm`'s `point` onto a new overlay `overlay`.
    pub fn new(
        vm: impl Into<String>,
        point: impl Into<String>,
        disk: impl Into<String>,
        overlay: impl Into<PathBuf>,
    ) -> InstantRequest {
        InstantRequest {
            vm: vm.into(),
            point: point.into(),
            disk: disk.into(),
            overlay: overlay.into(),
            socket: None,
            disk_options: DiskOptions::default(),
            qemu_img: PathBuf::from("qemu-img"),
        }
    }

    fn socket_path(&self) -> PathBuf {
        self.socket.clone().unwrap_or_else(|| {
            let mut s = self.overlay.clone().into_os_string();
            s.push(".nbd");
            PathBuf::from(s)
        })
    }
}

/// A running export of a point with its overlay (see the module docs).
#[derive(Debug)]
pub struct InstantExport {
    overlay: PathBuf,
    socket: PathBuf,
    disk: String,
    backend: NbdBackend,
    stop: ShutdownHandle,
    server: tokio::task::JoinHandle<Result<(), bulwark_nbd::Error>>,
}

impl InstantExport {
    /// Serves the point over NBD on the request's socket and creates the overlay on it. On an
    /// error nothing is left behind (no server, no overlay).
    pub async fn start(vault: &Vault, req: &InstantRequest) -> Result<InstantExport, Error> {
        let overlay = req.overlay.clone();
        if overlay.exists() {
            return Err(Error::RestoreTarget {
                path: overlay,
                why: "exists already (an overlay is created new; remove it or choose another path)"
                    .into(),
            });
        }
        let socket = req.socket_path();
        let mut options = ExportOptions::default();
        options.disk = req.disk_options.clone();
        let (server, backend) = bulwark_recovery::export(
            vault,
            &req.vm,
            &req.point,
            &req.disk,
            &Address::Unix(socket.clone()),
            options,
        )
        .await?;
        let stop = server.shutdown_handle();
        let server = tokio::spawn(server.run());
        let size = backend.disk().size();
        if let Err(e) =
            bulwark_qemu::create_overlay(&req.qemu_img, &overlay, &socket, &req.disk, size).await
        {
            stop.shutdown();
            let _ = server.await;
            return Err(e.into());
        }
        tracing::info!(overlay = %overlay.display(), socket = %socket.display(), "instant recovery export ready");
        Ok(InstantExport {
            overlay,
            socket,
            disk: req.disk.clone(),
            backend,
            stop,
            server,
        })
    }

    /// The overlay.
    pub fn overlay(&self) -> &Path {
        &self.overlay
    }

    /// The export's Unix socket.
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// The point's disk (`vm/point/disk`).
    pub fn label(&self) -> &str {
        self.backend.disk().label()
    }

    /// The disk's size in bytes.
    pub fn size(&self) -> u64 {
        self.backend.disk().size()
    }

    /// What was fetched from the vault so far.
    pub fn stats(&self) -> FetchStats {
        self.backend.disk().stats()
    }

    /// QEMU arguments attaching the overlay as a virtio disk whose drive id is `id`.
    pub fn qemu_args(&self, id: &str) -> Vec<String> {
        vec![
            "-drive".into(),
            format!(
                "id={id},file={},format=qcow2,if=none",
                self.overlay.display().to_string().replace(',', ",,")
            ),
            "-device".into(),
            format!("virtio-blk-pci,drive={id}"),
        ]
    }

    /// Streams the whole point into the overlay through the QMP session of the VM running on
    /// it (its disk found by the overlay's path, or by `device`), with the job's speed limit
    /// `speed` (bytes/s, 0: none). Returns when QEMU reports the overlay standalone. Running it
    /// again after that does nothing (`ran: false`).
    pub async fn stream(
        &self,
        qmp: &Qmp,
        device: Option<&str>,
        speed: u64,
        progress: &(dyn Fn(u64, u64) + Send + Sync),
    ) -> Result<StreamReport, Error> {
        let disk = bulwark_qemu::find_disk(qmp, &self.overlay, device).await?;
        let mut options = StreamOptions::new(format!("{JOB_PREFIX}{}", self.disk));
        options.speed = speed;
        Ok(bulwark_qemu::stream(qmp, &disk, &options, progress).await?)
    }

    /// Stops the export (the socket is removed) and returns what was fetched from the vault.
    pub async fn stop(self) -> Result<FetchStats, Error> {
        self.stop.shutdown();
        self.server
            .await
            .map_err(|e| Error::Worker(e.to_string()))?
            .map_err(|e| bulwark_recovery::Error::Nbd {
                disk: self.backend.disk().label().to_string(),
                source: Box::new(e),
            })?;
        Ok(self.backend.disk().stats())
    }

    /// A handle that stops the export from elsewhere (e.g. a signal handler).
    pub fn shutdown_handle(&self) -> ShutdownHandle {
        self.stop.clone()
    }
}
