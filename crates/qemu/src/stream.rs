//! Instant recovery's QEMU side: a qcow2 overlay whose backing file is an NBD export, and the
//! `block-stream` job that copies every block of that backing into the overlay while the VM runs
//! on it, so that the overlay ends standalone.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use qapi::qmp::JobStatus;

use crate::{Error, Qmp, VmDisk, discover};

/// How long QEMU's NBD client keeps retrying (requests queued, not failed) when the export
/// goes away, e.g. while the serving process is restarted.
pub const NBD_RECONNECT_DELAY_SECS: u64 = 60;

/// The backing file name an overlay records for the NBD export `export` on the Unix socket
/// `socket` (a `json:` file name, so that any path is quoted correctly; with a reconnect delay,
/// so that a restarted export does not fail the guest's reads).
pub fn nbd_backing_name(socket: &Path, export: &str) -> String {
    let spec = serde_json::json!({
        "driver": "raw",
        "file": {
            "driver": "nbd",
            "server": { "type": "unix", "path": socket.to_string_lossy() },
            "export": export,
            "reconnect-delay": NBD_RECONNECT_DELAY_SECS,
        },
    });
    format!("json:{spec}")
}

/// Creates the qcow2 `overlay` of `size` bytes whose backing file is the raw NBD export
/// `export` on `socket` (which must serve now: `qemu-img` opens it to check it). The overlay
/// must not exist. Writes of a VM running on the overlay go to the overlay only; the backing
/// is opened read-only.
pub async fn create_overlay(
    qemu_img: &Path,
    overlay: &Path,
    socket: &Path,
    export: &str,
    size: u64,
) -> Result<(), Error> {
    if overlay.exists() {
        return Err(Error::File {
            path: overlay.to_path_buf(),
            source: std::io::Error::new(
                std::io::ErrorKind::AlreadyExists,
                "the overlay exists already: remove it or choose another path",
            ),
        });
    }
    let args = vec![
        "create".to_string(),
        "-q".into(),
        "-f".into(),
        "qcow2".into(),
        "-F".into(),
        "raw".into(),
        "-b".into(),
        nbd_backing_name(socket, export),
        overlay.to_string_lossy().into_owned(),
        size.to_string(),
    ];
    let tool = |reason: String| Error::Tool {
        program: qemu_img.display().to_string(),
        args: args.join(" "),
        reason,
    };
    let out = tokio::process::Command::new(qemu_img)
        .args(&args)
        .kill_on_drop(true)
        .output()
        .await
        .map_err(|e| tool(e.to_string()))?;
    if !out.status.success() {
        return Err(tool(format!(
            "{}: {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    Ok(())
}

/// The disk of the VM whose image is `overlay`, or whose name is `name` when given.
pub async fn find_disk(qmp: &Qmp, overlay: &Path, name: Option<&str>) -> Result<VmDisk, Error> {
    let disks = discover(qmp).await?;
    let wanted = std::fs::canonicalize(overlay).unwrap_or_else(|_| overlay.to_path_buf());
    let found = disks.iter().find(|d| match name {
        Some(n) => d.name == n,
        None => std::fs::canonicalize(&d.file).unwrap_or_else(|_| PathBuf::from(&d.file)) == wanted,
    });
    found.cloned().ok_or_else(|| Error::NoSuchDisk {
        socket: qmp.socket().to_path_buf(),
        disk: name.map_or_else(|| overlay.display().to_string(), str::to_string),
        known: disks
            .iter()
            .map(|d| format!("{} ({})", d.name, d.file))
            .collect::<Vec<_>>()
            .join(", "),
    })
}

/// The backing file QEMU reports for the disk whose top node is `node` (None: standalone).
pub async fn backing_file(qmp: &Qmp, node: &str) -> Result<Option<String>, Error> {
    let blocks = qmp.run(qapi::qmp::query_block {}, "").await?;
    for b in blocks {
        if let Some(inserted) = b.inserted
            && inserted.node_name.as_deref() == Some(node)
        {
            return Ok(inserted.backing_file);
        }
    }
    Err(Error::Disk {
        socket: qmp.socket().to_path_buf(),
        disk: node.to_string(),
        reason: "no longer in query-block".into(),
    })
}

/// How [`stream`] runs its job.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct StreamOptions {
    /// The job id (a job of that id left by a killed run is taken over, not duplicated).
    pub job_id: String,
    /// Bytes per second the job may copy (0: as fast as it can). The guest's own I/O is not
    /// limited.
    pub speed: u64,
    /// How often the job's state is polled (`query-jobs`).
    pub poll: Duration,
}

impl StreamOptions {
    /// Job `job_id`, no speed limit, polled every 200 ms.
    pub fn new(job_id: impl Into<String>) -> StreamOptions {
        StreamOptions {
            job_id: job_id.into(),
            speed: 0,
            poll: Duration::from_millis(200),
        }
    }
}

/// What [`stream`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct StreamReport {
    /// False when the disk had no backing file any more (an earlier run finished): nothing ran.
    pub ran: bool,
    /// The job's total progress (bytes of the disk it went over).
    pub bytes: u64,
    /// Wall-clock time of the job.
    pub elapsed: Duration,
}

/// Streams every block of `disk`'s backing chain into its top image with `block-stream`, then
/// checks that QEMU reports no backing file any more. `progress(done, total)` is called at each
/// poll. The job is created with `auto-dismiss: false`, so that its outcome (and error) stay
/// readable in `query-jobs` until this dismisses it.
pub async fn stream(
    qmp: &Qmp,
    disk: &VmDisk,
    options: &StreamOptions,
    progress: &(dyn Fn(u64, u64) + Send + Sync),
) -> Result<StreamReport, Error> {
    let started = Instant::now();
    let job_err = |reason: String| Error::Job {
        socket: qmp.socket().to_path_buf(),
        job: options.job_id.clone(),
        reason,
    };
    let jobs = qmp.run(qapi::qmp::query_jobs {}, &options.job_id).await?;
    let existing = jobs.iter().find(|j| j.id == options.job_id);
    if existing.is_none() {
        if backing_file(qmp, &disk.node).await?.is_none() {
            return Ok(StreamReport {
                ran: false,
                bytes: 0,
                elapsed: started.elapsed(),
            });
        }
        let speed = i64::try_from(options.speed)
            .map_err(|_| job_err(format!("speed {} out of range", options.speed)))?;
        qmp.run(
            qapi::qmp::block_stream {
                device: disk.node.clone(),
                job_id: Some(options.job_id.clone()),
                speed: (speed > 0).then_some(speed),
                auto_dismiss: Some(false),
                auto_finalize: None,
                backing_file: None,
                backing_mask_protocol: None,
                base: None,
                base_node: None,
                bottom: None,
                filter_node_name: None,
                on_error: None,
            },
            &disk.name,
        )
        .await?;
        tracing::info!(disk = %disk.name, job = %options.job_id, "block-stream started");
    } else {
        tracing::info!(job = %options.job_id, "taking over a block-stream job left running");
    }
    let bytes = loop {
        let jobs = qmp.run(qapi::qmp::query_jobs {}, &options.job_id).await?;
        let Some(job) = jobs.into_iter().find(|j| j.id == options.job_id) else {
            return Err(job_err(
                "the job disappeared (dismissed by someone else?)".into(),
            ));
        };
        let done = u64::try_from(job.current_progress).unwrap_or(0);
        let total = u64::try_from(job.total_progress).unwrap_or(0);
        progress(done, total);
        if matches!(job.status, JobStatus::concluded | JobStatus::null) {
            let dismissed = qmp
                .run(
                    qapi::qmp::job_dismiss {
                        id: options.job_id.clone(),
                    },
                    &options.job_id,
                )
                .await;
            if let Some(e) = job.error {
                return Err(job_err(format!("failed: {e}")));
            }
            dismissed?;
            break total;
        }
        tokio::time::sleep(options.poll).await;
    };
    if let Some(b) = backing_file(qmp, &disk.node).await? {
        return Err(job_err(format!(
            "completed, but the disk still has the backing file {b}"
        )));
    }
    let report = StreamReport {
        ran: true,
        bytes,
        elapsed: started.elapsed(),
    };
    tracing::info!(disk = %disk.name, bytes, elapsed = ?report.elapsed, "block-stream complete");
    Ok(report)
}

/// Cancels the job `job_id` (the overlay keeps its backing file; what was copied stays).
pub async fn cancel_stream(qmp: &Qmp, job_id: &str) -> Result<(), Error> {
    qmp.run(
        qapi::qmp::block_job_cancel {
            device: job_id.to_string(),
            force: Some(true),
        },
        job_id,
    )
    .await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backing_name_is_quoted_json() {
        let name = nbd_backing_name(Path::new("/run/a \"b\".sock"), "os");
        let json: serde_json::Value =
            serde_json::from_str(name.strip_prefix("json:").unwrap_or_default())
                .unwrap_or_default();
        assert_eq!(json["driver"], "raw");
        assert_eq!(json["file"]["server"]["path"], "/run/a \"b\".sock");
        assert_eq!(json["file"]["export"], "os");
        assert_eq!(json["file"]["driver"], "nbd");
    }
}
