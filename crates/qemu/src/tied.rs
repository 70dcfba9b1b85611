//! Helper processes (`qemu-storage-daemon`) that never outlive the controller that started them.
//!
//! Two layers, because a controller can be killed with SIGKILL at any moment and then runs no
//! `Drop`:
//!
//! * [`spawn_tied`] starts the helper with a parent-death signal (`PR_SET_PDEATHSIG`, SIGKILL).
//!   The kernel sends it when the *thread* that forked the child ends, not only the process, so
//!   every helper is forked by one thread that lives as long as the process: a tokio blocking
//!   thread would end after some idle seconds and take a helper that is still in use with it.
//! * [`write_record`] / [`remove_stale`]: a record beside each helper's socket names its owner
//!   (the controller's pid and start time) and the helper's pid. The next start removes the
//!   records, sockets and helpers whose owner is gone; a helper is killed only by its pid, and
//!   only when that pid's command line still names the record's socket (never by name).

use std::io;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::sync::{OnceLock, mpsc};
use std::time::{Duration, Instant, SystemTime};

use crate::qmp::parse_start_time;

type Request = (Command, mpsc::Sender<io::Result<Child>>);

/// The spawner thread's queue; the thread lives until the process ends (its sender is never
/// dropped).
static SPAWNER: OnceLock<mpsc::Sender<Request>> = OnceLock::new();

fn spawner() -> io::Result<&'static mpsc::Sender<Request>> {
    if let Some(s) = SPAWNER.get() {
        return Ok(s);
    }
    let (tx, rx) = mpsc::channel::<Request>();
    std::thread::Builder::new()
        .name("bulwark-spawner".into())
        .spawn(move || {
            for (mut command, reply) in rx {
                let _ = reply.send(command.spawn());
            }
        })?;
    // Two first callers at once: one sender is kept; the other's thread ends when its sender
    // (never used) is dropped here.
    let _ = SPAWNER.set(tx);
    SPAWNER
        .get()
        .ok_or_else(|| io::Error::other("the spawner thread is not registered"))
}

/// Starts `command` so that the kernel kills it (SIGKILL) when this process ends, however it
/// ends. The fork happens on a thread that lives as long as the process.
pub(crate) fn spawn_tied(mut command: Command) -> io::Result<Child> {
    use std::os::unix::process::CommandExt;
    let parent = std::process::id();
    let pre_exec = move || {
        // SAFETY: prctl(PR_SET_PDEATHSIG) is a plain system call on the child's own state with
        // integer arguments; nothing is allocated or locked (we run between fork and exec).
        let r = unsafe {
            libc::prctl(
                libc::PR_SET_PDEATHSIG,
                libc::SIGKILL as libc::c_ulong,
                0 as libc::c_ulong,
                0 as libc::c_ulong,
                0 as libc::c_ulong,
            )
        };
        if r != 0 {
            return Err(io::Error::last_os_error());
        }
        // The parent may have died before the signal was armed: then nobody would send it.
        // SAFETY: getppid is async-signal-safe and has no arguments.
        if unsafe { libc::getppid() } as u32 != parent {
            return Err(io::Error::from_raw_os_error(libc::ESRCH));
        }
        Ok(())
    };
    // SAFETY: the hook runs in the forked child before exec, where only async-signal-safe work
    // is allowed: it makes two system calls (prctl, getppid) and builds an io::Error from an
    // errno value, which allocates nothing.
    unsafe {
        command.pre_exec(pre_exec);
    }
    let (tx, rx) = mpsc::channel();
    spawner()?
        .send((command, tx))
        .map_err(|_| io::Error::other("the spawner thread is gone"))?;
    rx.recv()
        .map_err(|_| io::Error::other("the spawner thread did not answer"))?
}

/// `(pid, start time)` of a live process, or `None`.
fn start_time(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    parse_start_time(&stat)
}

/// Writes the record `path` (atomically: a temporary file renamed over it): this process as the
/// owner, and `helper`'s pid once it runs.
pub(crate) fn write_record(path: &Path, helper: Option<u32>) -> io::Result<()> {
    let me = std::process::id();
    let start = start_time(me).ok_or_else(|| io::Error::other("no /proc/self/stat"))?;
    let mut text = format!("{me} {start}");
    if let Some(pid) = helper {
        text.push_str(&format!(" {pid}"));
    }
    text.push('\n');
    let tmp = path.with_extension("pid-new");
    std::fs::write(&tmp, text)?;
    std::fs::rename(&tmp, path)
}

/// A parsed record: owner pid, owner start time, helper pid.
fn parse_record(text: &str) -> Option<(u32, u64, Option<u32>)> {
    let mut it = text.split_whitespace();
    let owner = it.next()?.parse().ok()?;
    let start = it.next()?.parse().ok()?;
    let helper = match it.next() {
        Some(p) => Some(p.parse().ok()?),
        None => None,
    };
    if it.next().is_some() {
        return None;
    }
    Some((owner, start, helper))
}

/// Whether `pid` is a process whose command line has an argument containing `needle`.
fn runs_with(pid: u32, needle: &str) -> bool {
    std::fs::read(format!("/proc/{pid}/cmdline")).is_ok_and(|cmdline| {
        cmdline
            .split(|b| *b == 0)
            .any(|arg| String::from_utf8_lossy(arg).contains(needle))
    })
}

/// Whether `pid` is gone (or a zombie, which holds no locks and no sockets).
fn gone(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => true,
        Ok(stat) => stat
            .rfind(')')
            .and_then(|i| stat[i + 1..].split_whitespace().next())
            .is_some_and(|state| state == "Z" || state == "X"),
    }
}

/// A socket older than this with no record and nobody listening is a leftover of a controller
/// from before records existed (younger ones may be a helper that is binding right now).
const UNRECORDED_AGE: Duration = Duration::from_secs(60);

/// Removes what controllers that are gone left in `dir` under names starting with `prefix`:
/// their helpers (SIGKILL by pid, only when the pid's command line names the record's socket),
/// sockets and records. Returns the removed socket paths. Records of live owners (this process
/// included) are left alone.
pub(crate) fn remove_stale(dir: &Path, prefix: &str) -> Vec<PathBuf> {
    let mut removed = Vec::new();
    let Ok(entries) = std::fs::read_dir(dir) else {
        return removed;
    };
    let names: Vec<String> = entries
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with(prefix))
        .collect();
    for name in &names {
        let Some(stem) = name.strip_suffix(".pid") else {
            continue;
        };
        let record = dir.join(name);
        let socket = dir.join(format!("{stem}.sock"));
        let Some((owner, start, helper)) = std::fs::read_to_string(&record)
            .ok()
            .and_then(|t| parse_record(&t))
        else {
            tracing::warn!(record = %record.display(), "unreadable helper record left alone");
            continue;
        };
        if start_time(owner) == Some(start) {
            continue; // its controller still runs
        }
        if let Some(pid) = helper
            && !gone(pid)
            && runs_with(pid, &socket.to_string_lossy())
        {
            tracing::warn!(pid, socket = %socket.display(), "killing the helper of a controller that is gone");
            // SAFETY: kill(2) with a pid and a signal number; no memory is involved.
            unsafe {
                libc::kill(pid as libc::pid_t, libc::SIGKILL);
            }
            let deadline = Instant::now() + Duration::from_secs(5);
            while !gone(pid) && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(10));
            }
        }
        let _ = std::fs::remove_file(&socket);
        let _ = std::fs::remove_file(&record);
        removed.push(socket);
    }
    // Sockets without a record: only old ones that nobody listens on.
    for name in &names {
        let Some(stem) = name.strip_suffix(".sock") else {
            continue;
        };
        let socket = dir.join(name);
        if names.iter().any(|n| *n == format!("{stem}.pid")) || removed.contains(&socket) {
            continue;
        }
        let old = std::fs::symlink_metadata(&socket)
            .and_then(|m| m.modified())
            .ok()
            .and_then(|t| SystemTime::now().duration_since(t).ok())
            .is_some_and(|age| age > UNRECORDED_AGE);
        let refused = matches!(
            std::os::unix::net::UnixStream::connect(&socket),
            Err(e) if e.kind() == io::ErrorKind::ConnectionRefused
        );
        if old && refused {
            let _ = std::fs::remove_file(&socket);
            removed.push(socket);
        }
    }
    removed
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn records_parse_strictly() {
        assert_eq!(parse_record("12 345\n"), Some((12, 345, None)));
        assert_eq!(parse_record("12 345 678\n"), Some((12, 345, Some(678))));
        for bad in ["", "12", "x 1", "1 2 y", "1 2 3 4", "-1 2"] {
            assert_eq!(parse_record(bad), None, "{bad:?}");
        }
    }

    /// The helper survives the thread that asked for it (PDEATHSIG fires on the forking
    /// thread's exit; the long-lived spawner thread forks).
    #[test]
    fn a_tied_child_outlives_the_thread_that_started_it() {
        let child = std::thread::spawn(|| {
            let mut c = Command::new("sleep");
            c.arg("30");
            spawn_tied(c).unwrap()
        })
        .join()
        .unwrap();
        std::thread::sleep(Duration::from_millis(300));
        let mut child = child;
        assert!(
            child.try_wait().unwrap().is_none(),
            "the child died with the thread that asked for it"
        );
        child.kill().unwrap();
        child.wait().unwrap();
    }

    #[test]
    fn records_of_live_owners_stay_and_dead_owners_go() {
        let dir = tempfile::tempdir().unwrap();
        let mine = dir.path().join("bulwark-offline-a.pid");
        write_record(&mine, Some(1)).unwrap();
        std::fs::write(dir.path().join("bulwark-offline-a.sock"), "").unwrap();
        // An owner that is gone: pid 1 with a start time it never had. Its "helper" is this
        // test process, whose command line does not name the socket: it must not be killed.
        std::fs::write(
            dir.path().join("bulwark-offline-b.pid"),
            format!("1 999999999999 {}\n", std::process::id()),
        )
        .unwrap();
        std::fs::write(dir.path().join("bulwark-offline-b.sock"), "").unwrap();
        let removed = remove_stale(dir.path(), "bulwark-offline-");
        assert_eq!(removed, vec![dir.path().join("bulwark-offline-b.sock")]);
        assert!(mine.exists() && dir.path().join("bulwark-offline-a.sock").exists());
        assert!(!dir.path().join("bulwark-offline-b.pid").exists());
    }

    /// A helper of a dead owner whose command line names the record's socket is killed.
    #[test]
    fn the_helper_of_a_dead_owner_is_killed_by_pid() {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("bulwark-offline-c.sock");
        std::fs::write(&socket, "").unwrap();
        let mut helper = Command::new("bash")
            .args(["-c", "while :; do sleep 0.1; done"])
            .arg(&socket)
            .spawn()
            .unwrap();
        // `spawn` returns once the exec has begun, before the kernel has set up the new
        // command line: until then /proc shows none, and the helper would not be recognised
        // (a real record is written only after its helper has made its socket).
        let deadline = Instant::now() + Duration::from_secs(10);
        while !runs_with(helper.id(), &socket.to_string_lossy()) {
            assert!(
                Instant::now() < deadline,
                "the helper never showed its command line"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
        std::fs::write(
            dir.path().join("bulwark-offline-c.pid"),
            format!("1 999999999999 {}\n", helper.id()),
        )
        .unwrap();
        assert_eq!(
            remove_stale(dir.path(), "bulwark-offline-"),
            vec![socket.clone()]
        );
        // Bounded: a helper left running fails the test instead of hanging it.
        let deadline = Instant::now() + Duration::from_secs(10);
        let status = loop {
            if let Some(status) = helper.try_wait().unwrap() {
                break status;
            }
            if Instant::now() >= deadline {
                let _ = helper.kill();
                let _ = helper.wait();
                panic!("the helper of a dead owner was not killed");
            }
            std::thread::sleep(Duration::from_millis(10));
        };
        use std::os::unix::process::ExitStatusExt;
        assert_eq!(status.signal(), Some(libc::SIGKILL), "{status}");
        assert!(!socket.exists());
    }
}
