//! The running VM as a Bulwark disk source: [`QemuSnapshotter`] takes every disk of a VM at one
//! instant through QMP, and each disk is read over NBD from QEMU's export of that instant.

use std::io;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use bulwark_blockdiff::BlockSource;
use bulwark_blockdiff::buffers::Pool;
use bulwark_nbd::{Address, BASE_ALLOCATION, Client, ClientOptions, STATE_DIRTY, STATE_ZERO};
use bulwark_snapshot::{
    Changes, DiskSource, Outcome, PendingSnapshot, PreviousDisk, Released, Snapshotter, Tracking,
};
use bytes::Bytes;

use crate::fleece::{FleeceOptions, Fleecing, TakenDisk};
use crate::tracking::{Trust, UnchangedBuilder};
use crate::{Error, Qmp};

/// Most unchanged ranges one disk's [`DiskSource::changes_since`] keeps (16 bytes each: 16 MiB).
/// A bitmap more fragmented than that gives up its shortest clean ranges (they are read again).
pub const MAX_UNCHANGED_RANGES: usize = 1 << 20;

/// How to back up a running VM through its QMP socket.
#[derive(Debug, Clone)]
pub struct QemuOptions {
    /// The VM's QMP socket (`unix:PATH` or a path).
    pub qmp: String,
    /// Fleecing and NBD socket places, the disks to take.
    pub fleece: FleeceOptions,
    /// Time limit of each QMP command.
    pub qmp_timeout: Duration,
    /// NBD connections per disk (parallel reads).
    pub nbd_connections: usize,
}

impl QemuOptions {
    /// Every disk of the VM at `qmp`, with the NBD socket and (next to the images) fleecing
    /// images, 10 s per QMP command, 4 NBD connections per disk.
    pub fn new(qmp: impl Into<String>, socket_dir: impl Into<PathBuf>) -> Self {
        QemuOptions {
            qmp: qmp.into(),
            fleece: FleeceOptions::new(socket_dir),
            qmp_timeout: Duration::from_secs(10),
            nbd_connections: 4,
        }
    }
}

/// Takes every disk of a running QEMU VM at one instant (see the crate docs for the QMP steps).
#[derive(Debug, Clone)]
pub struct QemuSnapshotter {
    options: QemuOptions,
}

impl QemuSnapshotter {
    /// A snapshotter for the VM behind `options.qmp`.
    pub fn new(options: QemuOptions) -> Self {
        QemuSnapshotter { options }
    }
}

fn to_snapshot(socket: &str, e: Error) -> bulwark_snapshot::Error {
    bulwark_snapshot::Error::Io {
        path: PathBuf::from(socket.strip_prefix("unix:").unwrap_or(socket)),
        source: io::Error::other(e),
    }
}

#[async_trait::async_trait]
impl Snapshotter for QemuSnapshotter {
    async fn prepare(
        &self,
        vm: &str,
        _point: &str,
    ) -> Result<Box<dyn PendingSnapshot>, bulwark_snapshot::Error> {
        let socket = &self.options.qmp;
        let qmp = Qmp::connect(socket, self.options.qmp_timeout)
            .await
            .map_err(|e| to_snapshot(socket, e))?;
        let fleecing = Fleecing::prepare(Arc::new(qmp), &self.options.fleece)
            .await
            .map_err(|e| to_snapshot(socket, e))?;
        tracing::info!(
            vm,
            disks = fleecing.disks().len(),
            "QEMU point in time prepared"
        );
        Ok(Box::new(PendingQemu {
            fleecing,
            options: self.options.clone(),
        }))
    }
}

#[derive(Debug)]
struct PendingQemu {
    fleecing: Fleecing,
    options: QemuOptions,
}

#[async_trait::async_trait]
impl PendingSnapshot for PendingQemu {
    async fn take(self: Box<Self>) -> Result<Vec<Box<dyn DiskSource>>, bulwark_snapshot::Error> {
        let socket = self.options.qmp.clone();
        let taken = self
            .fleecing
            .take()
            .await
            .map_err(|e| to_snapshot(&socket, e))?;
        let mut sources: Vec<Box<dyn DiskSource>> = Vec::new();
        let mut rest = taken.into_iter();
        while let Some(disk) = rest.next() {
            let connections = self.options.nbd_connections;
            match QemuDisk::open(disk, connections).await {
                Ok(d) => sources.push(Box::new(d)),
                Err((disk, e)) => {
                    // Everything goes back as for a failed backup.
                    let _ = disk.release(false).await;
                    for d in rest {
                        let _ = d.release(false).await;
                    }
                    for s in sources {
                        let _ = s.release(Outcome::Failed { keep: false }).await;
                    }
                    return Err(to_snapshot(&socket, e));
                }
            }
        }
        Ok(sources)
    }
}

/// One disk of the VM at the instant: read over NBD from QEMU's export.
#[derive(Debug)]
pub struct QemuDisk {
    name: String,
    reader: Arc<NbdReader>,
    taken: Option<TakenDisk>,
}

impl QemuDisk {
    async fn open(disk: TakenDisk, connections: usize) -> Result<QemuDisk, (TakenDisk, Error)> {
        let address = Address::Unix(disk.socket().to_path_buf());
        let export = disk.info().disk.name.clone();
        let options = ClientOptions::new(export.clone())
            .meta_context(BASE_ALLOCATION)
            .connections(connections);
        let uri = disk.uri();
        let connected =
            tokio::task::spawn_blocking(move || Client::connect(address, options)).await;
        let client = match connected {
            Ok(Ok(c)) => c,
            Ok(Err(e)) => return Err((disk, nbd_error(&uri, e))),
            Err(e) => return Err((disk, nbd_error(&uri, e))),
        };
        Ok(QemuDisk {
            name: export,
            reader: Arc::new(NbdReader::new(client, uri)),
            taken: Some(disk),
        })
    }

    fn taken(&self) -> Result<&TakenDisk, bulwark_snapshot::Error> {
        self.taken
            .as_ref()
            .ok_or_else(|| bulwark_snapshot::Error::Io {
                path: PathBuf::from(&self.name),
                source: io::Error::other("the disk was already released"),
            })
    }
}

fn nbd_error(uri: &str, e: impl std::fmt::Display) -> Error {
    Error::Io {
        socket: PathBuf::from(uri),
        what: "NBD".into(),
        source: io::Error::other(e.to_string()),
    }
}

/// Reads the dirty extents of `bitmap` from the export and turns them into unchanged ranges,
/// block status reply by block status reply (memory stays bounded on any disk size).
pub(crate) fn unchanged_from_bitmap(
    socket: PathBuf,
    export: String,
    uri: String,
    bitmap: &str,
) -> Result<Vec<std::ops::Range<u64>>, Error> {
    let context = bulwark_nbd::dirty_bitmap_context(bitmap);
    let client = Client::connect(
        Address::Unix(socket),
        ClientOptions::new(export)
            .meta_context(context.clone())
            .connections(1),
    )
    .map_err(|e| nbd_error(&uri, e))?;
    let size = client.size();
    let mut builder = UnchangedBuilder::new(size, MAX_UNCHANGED_RANGES);
    while builder.position() < size {
        let at = builder.position();
        let status = client
            .block_status(at, size - at)
            .map_err(|e| nbd_error(&uri, e))?;
        let extents = status.extents(&context).unwrap_or(&[]);
        if extents.is_empty() {
            break;
        }
        for e in extents {
            if !builder.push(e.offset, e.length, e.flags & STATE_DIRTY != 0) {
                return Err(nbd_error(
                    &uri,
                    format!("block status of {context} at {at}: extents out of order"),
                ));
            }
        }
    }
    if builder.position() != size {
        return Err(nbd_error(
            &uri,
            format!("block status of {context} ended at {}", builder.position()),
        ));
    }
    Ok(builder.finish())
}

#[async_trait::async_trait]
impl DiskSource for QemuDisk {
    fn kind(&self) -> &str {
        "qemu"
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
        let taken = self.taken()?;
        match taken.judge(previous) {
            Trust::Unknown(reason) => Ok(Changes::Unknown { reason }),
            Trust::Bitmap(bitmap) => {
                let (socket, export, uri) = (
                    taken.socket().to_path_buf(),
                    taken.info().disk.name.clone(),
                    taken.uri(),
                );
                let result = tokio::task::spawn_blocking(move || {
                    unchanged_from_bitmap(socket, export, uri, &bitmap)
                })
                .await;
                match result {
                    Ok(Ok(ranges)) => Ok(Changes::Unchanged(ranges)),
                    Ok(Err(e)) => Ok(Changes::Unknown {
                        reason: format!("reading the dirty bitmap failed: {e}"),
                    }),
                    Err(e) => Ok(Changes::Unknown {
                        reason: format!("reading the dirty bitmap failed: {e}"),
                    }),
                }
            }
        }
    }

    fn tracking(&self) -> Option<Tracking> {
        self.taken.as_ref().map(|t| t.record().to_tracking())
    }

    async fn release(
        mut self: Box<Self>,
        outcome: Outcome,
    ) -> Result<Released, bulwark_snapshot::Error> {
        let taken = self
            .taken
            .take()
            .ok_or_else(|| bulwark_snapshot::Error::Io {
                path: PathBuf::from(&self.name),
                source: io::Error::other("released twice"),
            })?;
        let socket = taken.qmp().socket().display().to_string();
        let committed = matches!(outcome, Outcome::Committed { .. });
        // A copy-before-write job that stopped means the export stopped holding the instant.
        let job = if committed {
            taken.check_job().await
        } else {
            Ok(())
        };
        taken
            .release(committed)
            .await
            .map_err(|e| to_snapshot(&socket, e))?;
        job.map_err(|e| to_snapshot(&socket, e))?;
        Ok(Released::default())
    }
}

/// A [`BlockSource`] over an NBD export: reads in parallel over the client's connections,
/// holes from `base:allocation`.
#[derive(Debug)]
pub struct NbdReader {
    client: Client,
    uri: String,
    size: u64,
}

impl NbdReader {
    /// A reader over `client`, described as `uri` in errors.
    pub fn new(client: Client, uri: String) -> Self {
        let size = client.size();
        NbdReader { client, uri, size }
    }

    /// The disk ends at `size` when that is before the export's end: QEMU's raw driver
    /// rounds an image's size up to whole 512-byte sectors, and the guest-visible disk of a
    /// raw image file is exactly the file.
    pub fn with_size(mut self, size: u64) -> Self {
        self.size = self.size.min(size);
        self
    }
}

impl BlockSource for NbdReader {
    fn size(&self) -> u64 {
        self.size
    }

    fn read(&self, offset: u64, len: usize, _pool: &Arc<Pool>) -> io::Result<Bytes> {
        let mut buf = vec![0u8; len];
        self.client
            .read(offset, &mut buf)
            .map_err(|e| io::Error::other(format!("{}: {e}", self.uri)))?;
        Ok(Bytes::from(buf))
    }

    fn next_data(&self, offset: u64) -> io::Result<u64> {
        let size = self.size;
        let mut at = offset;
        while at < size {
            let status = self
                .client
                .block_status(at, size - at)
                .map_err(|e| io::Error::other(format!("{}: {e}", self.uri)))?;
            let Some(extents) = status.extents(BASE_ALLOCATION) else {
                return Ok(at);
            };
            let mut next = at;
            for e in extents {
                if e.offset + e.length <= at {
                    continue;
                }
                if e.flags & STATE_ZERO == 0 {
                    return Ok(e.offset.max(at));
                }
                next = e.offset + e.length;
            }
            if next <= at {
                return Ok(at);
            }
            at = next;
        }
        Ok(size)
    }

    fn describe(&self) -> String {
        self.uri.clone()
    }
}
