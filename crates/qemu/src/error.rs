//! The crate's error type.

use std::path::PathBuf;

/// What went wrong talking to QEMU, and where.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The QMP socket could not be reached.
    #[error("QMP {socket}: cannot connect: {source}")]
    Connect {
        /// The socket path.
        socket: PathBuf,
        /// The error.
        #[source]
        source: std::io::Error,
    },
    /// The QMP stream broke or sent something unreadable.
    #[error("QMP {socket}: {what}: {source}")]
    Io {
        /// The socket path.
        socket: PathBuf,
        /// What was being done.
        what: String,
        /// The error.
        #[source]
        source: std::io::Error,
    },
    /// QEMU answered a command with an error.
    #[error("QMP {socket}: {command} failed: {class}: {desc}")]
    Command {
        /// The socket path.
        socket: PathBuf,
        /// The command (and its subject, e.g. `block-export-add bulwark-exp-...`).
        command: String,
        /// QEMU's error class.
        class: String,
        /// QEMU's description.
        desc: String,
    },
    /// QEMU did not answer in time.
    #[error("QMP {socket}: {command}: no answer within {secs} s")]
    Timeout {
        /// The socket path.
        socket: PathBuf,
        /// The command.
        command: String,
        /// The limit.
        secs: u64,
    },
    /// A disk asked for is not a writable disk of the VM.
    #[error("VM at {socket}: no writable disk named {disk:?} (writable disks: {known})")]
    NoSuchDisk {
        /// The socket path.
        socket: PathBuf,
        /// The name asked for.
        disk: String,
        /// The names found.
        known: String,
    },
    /// The VM has no writable disk at all.
    #[error("VM at {socket}: no writable disk with an inserted medium")]
    NoDisks {
        /// The socket path.
        socket: PathBuf,
    },
    /// QEMU's view of a disk is not usable (no node name, negative size, ...).
    #[error("VM at {socket}: disk {disk}: {reason}")]
    Disk {
        /// The socket path.
        socket: PathBuf,
        /// The disk.
        disk: String,
        /// What is wrong.
        reason: String,
    },
    /// A helper program (qemu-img) failed.
    #[error("{program} {args}: {reason}")]
    Tool {
        /// The program.
        program: String,
        /// Its arguments.
        args: String,
        /// Its error output or exit status.
        reason: String,
    },
    /// A file operation failed.
    #[error("{path}: {source}")]
    File {
        /// The path.
        path: PathBuf,
        /// The error.
        #[source]
        source: std::io::Error,
    },
    /// An image file is in use by a QEMU process (QEMU's image locks, see [`crate::ImageLock`]).
    #[error(
        "{path}: the image is in use: {why}; an offline backup needs the VM stopped (or back up the running VM through its QMP socket)"
    )]
    ImageLocked {
        /// The image.
        path: PathBuf,
        /// Which lock conflicts.
        why: String,
    },
    /// The qemu-guest-agent channel failed or qemu-ga refused a command.
    #[error("QGA {socket}: {what}: {message}")]
    Qga {
        /// The chardev socket path.
        socket: PathBuf,
        /// The command or step (e.g. `guest-fsfreeze-freeze`).
        what: String,
        /// What went wrong.
        message: String,
    },
    /// A block job ended in an error or another state than expected.
    #[error("QMP {socket}: job {job}: {reason}")]
    Job {
        /// The socket path.
        socket: PathBuf,
        /// The job id.
        job: String,
        /// What happened.
        reason: String,
    },
    /// Another Bulwark run holds this QEMU process's lock (see `Fleecing::prepare`).
    #[error(
        "VM at {socket}: another Bulwark backup of this VM (QEMU pid {pid}) is running (lock {lock}); try again when it ends"
    )]
    Busy {
        /// The socket path.
        socket: PathBuf,
        /// The QEMU process.
        pid: u32,
        /// The lock file.
        lock: PathBuf,
    },
}

impl Error {
    /// QEMU's error description, when QEMU refused a command.
    pub fn qemu_desc(&self) -> Option<&str> {
        match self {
            Error::Command { desc, .. } => Some(desc),
            _ => None,
        }
    }
}
