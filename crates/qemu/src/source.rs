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

/// QEMU's error as the snapshot's: it names the socket (or the image) itself, so it is not
/// prefixed with the socket again.
fn to_snapshot(e: Error) -> bulwark_snapshot::Error {
    bulwark_snapshot::Error::Provider(Box::new(e))
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
            .map_err(to_snapshot)?;
        let fleecing = Fleecing::prepare(Arc::new(qmp), &self.options.fleece)
            .await
            .map_err(to_snapshot)?;
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
        let taken = self.fleecing.take().await.map_err(to_snapshot)?;
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
                    return Err(to_snapshot(e));
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

    /// Fails if the copy-before-write job stopped during the reads; else ends the fleecing
    /// (see [`TakenDisk::end_read`]).
    async fn end_read(&self) -> Result<(), bulwark_snapshot::Error> {
        self.taken()?.end_read().await.map_err(to_snapshot)
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
        let committed = matches!(outcome, Outcome::Committed { .. });
        // A copy-before-write job that stopped means the export stopped holding the instant.
        // `end_read` checked that before the commit; a caller that skipped it is checked here.
        let job = if committed && !taken.read_ended() {
            taken.check_job().await
        } else {
            Ok(())
        };
        taken.release(committed).await.map_err(to_snapshot)?;
        job.map_err(to_snapshot)?;
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
    /// The last `base:allocation` answer: the export is a frozen point in time, so what it
    /// said stays true, and the scanner's next questions (the following blocks) are answered
    /// from it instead of with one BLOCK_STATUS round trip per block.
    allocation: std::sync::Mutex<Allocation>,
    buffers: Arc<Buffers>,
}

/// Initialised buffers for [`NbdReader::read`], reused: the client reads into `&mut [u8]`.
#[derive(Debug)]
struct Buffers {
    free: std::sync::Mutex<Vec<Vec<u8>>>,
}

/// Idle buffers kept (at most this many blocks' worth of memory stays allocated).
const KEEP_BUFFERS: usize = 32;

impl Buffers {
    fn take(self: &Arc<Self>, len: usize) -> Reused {
        let mut buf = self
            .free
            .lock()
            .ok()
            .and_then(|mut f| f.pop())
            .unwrap_or_default();
        // Only growth is zeroed; a buffer of the same size is handed out as it is (every byte
        // of it is overwritten by the read, or the read fails and the buffer is dropped).
        buf.resize(len, 0);
        Reused {
            buf,
            home: self.clone(),
        }
    }
}

/// A buffer of [`Buffers`], returned to it when dropped.
#[derive(Debug)]
struct Reused {
    buf: Vec<u8>,
    home: Arc<Buffers>,
}

impl AsRef<[u8]> for Reused {
    fn as_ref(&self) -> &[u8] {
        &self.buf
    }
}

impl AsMut<[u8]> for Reused {
    fn as_mut(&mut self) -> &mut [u8] {
        &mut self.buf
    }
}

impl Drop for Reused {
    fn drop(&mut self) {
        if let Ok(mut free) = self.home.free.lock()
            && free.len() < KEEP_BUFFERS
        {
            free.push(std::mem::take(&mut self.buf));
        }
    }
}

/// `base:allocation` extents of `[start, end)`: contiguous, in order, from `start`.
#[derive(Debug, Default)]
struct Allocation {
    extents: Vec<bulwark_nbd::Extent>,
}

/// What [`Allocation::next_data`] knows.
#[derive(Debug, PartialEq, Eq)]
enum Known {
    /// Data may start here (the first extent at or after the offset without the zero flag).
    Data(u64),
    /// No data from the offset up to here, the end of what is known.
    ZeroUntil(u64),
    /// The offset is outside what is known.
    Unknown,
}

impl Allocation {
    fn next_data(&self, offset: u64) -> Known {
        let (Some(first), Some(last)) = (self.extents.first(), self.extents.last()) else {
            return Known::Unknown;
        };
        let end = last.offset + last.length;
        if offset < first.offset || offset >= end {
            return Known::Unknown;
        }
        let i = self
            .extents
            .partition_point(|e| e.offset + e.length <= offset);
        match self.extents[i..].iter().find(|e| e.flags & STATE_ZERO == 0) {
            Some(e) => Known::Data(e.offset.max(offset)),
            None => Known::ZeroUntil(end),
        }
    }
}

impl NbdReader {
    /// A reader over `client`, described as `uri` in errors.
    pub fn new(client: Client, uri: String) -> Self {
        let size = client.size();
        NbdReader {
            client,
            uri,
            size,
            allocation: std::sync::Mutex::new(Allocation::default()),
            buffers: Arc::new(Buffers {
                free: std::sync::Mutex::new(Vec::new()),
            }),
        }
    }

    fn known(&self, offset: u64) -> Known {
        self.allocation
            .lock()
            .map_or(Known::Unknown, |a| a.next_data(offset))
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

    /// Reads into a reused buffer (no page faults and zeroing of a fresh one per block); it
    /// goes back to the reader when the block's last `Bytes` is dropped.
    fn read(&self, offset: u64, len: usize, _pool: &Arc<Pool>) -> io::Result<Bytes> {
        let mut buf = self.buffers.take(len);
        self.client
            .read(offset, buf.as_mut())
            .map_err(|e| io::Error::other(format!("{}: {e}", self.uri)))?;
        Ok(Bytes::from_owner(buf))
    }

    /// One BLOCK_STATUS from `offset` to the end of the disk answers this call and the
    /// following ones up to where QEMU's answer ends (it describes as much as it can at once).
    fn next_data(&self, offset: u64) -> io::Result<u64> {
        let size = self.size;
        let mut at = offset;
        while at < size {
            match self.known(at) {
                Known::Data(d) => return Ok(d.min(size)),
                Known::ZeroUntil(end) if end > at => {
                    at = end;
                    continue;
                }
                Known::ZeroUntil(_) | Known::Unknown => {}
            }
            let status = self
                .client
                .block_status(at, size - at)
                .map_err(|e| io::Error::other(format!("{}: {e}", self.uri)))?;
            let extents = match status.extents(BASE_ALLOCATION) {
                Some(e) if !e.is_empty() => e.to_vec(),
                // Nothing said: read it.
                _ => return Ok(at),
            };
            let answer = Allocation { extents };
            let known = answer.next_data(at);
            if let Ok(mut a) = self.allocation.lock() {
                *a = answer;
            }
            match known {
                Known::Data(d) => return Ok(d.min(size)),
                Known::ZeroUntil(end) if end > at => at = end,
                // The client checks that the extents start at the request: not reached.
                Known::ZeroUntil(_) | Known::Unknown => return Ok(at),
            }
        }
        Ok(size)
    }

    fn describe(&self) -> String {
        self.uri.clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bulwark_nbd::Extent;

    fn ext(offset: u64, length: u64, zero: bool) -> Extent {
        Extent {
            offset,
            length,
            flags: if zero { STATE_ZERO | 1 } else { 0 },
        }
    }

    #[test]
    fn allocation_answers_from_what_it_was_told() {
        // [100, 200) data, [200, 500) zero, [500, 600) data, [600, 900) zero.
        let a = Allocation {
            extents: vec![
                ext(100, 100, false),
                ext(200, 300, true),
                ext(500, 100, false),
                ext(600, 300, true),
            ],
        };
        assert_eq!(a.next_data(99), Known::Unknown);
        assert_eq!(a.next_data(100), Known::Data(100));
        assert_eq!(a.next_data(150), Known::Data(150));
        assert_eq!(a.next_data(200), Known::Data(500));
        assert_eq!(a.next_data(499), Known::Data(500));
        assert_eq!(a.next_data(550), Known::Data(550));
        assert_eq!(a.next_data(600), Known::ZeroUntil(900));
        assert_eq!(a.next_data(899), Known::ZeroUntil(900));
        assert_eq!(a.next_data(900), Known::Unknown);
        assert_eq!(Allocation::default().next_data(0), Known::Unknown);
    }

    #[test]
    fn read_buffers_are_reused_and_sized_to_the_request() {
        let buffers = Arc::new(Buffers {
            free: std::sync::Mutex::new(Vec::new()),
        });
        let mut a = buffers.take(8);
        a.as_mut().copy_from_slice(b"abcdefgh");
        let first = a.as_ref().as_ptr();
        let bytes = Bytes::from_owner(a);
        assert_eq!(&bytes[..], b"abcdefgh");
        drop(bytes);
        let b = buffers.take(4);
        assert_eq!(
            b.as_ref().as_ptr(),
            first,
            "the dropped buffer is handed out again"
        );
        assert_eq!(b.as_ref().len(), 4);
        let c = buffers.take(16);
        assert_eq!(c.as_ref().len(), 16);
        assert_eq!(c.as_ref(), &[0u8; 16], "a new buffer is zeroed");
        drop((b, c));
        let kept = (0..KEEP_BUFFERS + 8)
            .map(|_| buffers.take(1))
            .collect::<Vec<_>>();
        drop(kept);
        assert_eq!(buffers.free.lock().unwrap().len(), KEEP_BUFFERS);
    }
}
