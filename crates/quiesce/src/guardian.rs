//! The freeze guardian: a tiny separate process that thaws the mounts at the deadline even when
//! the agent process is killed with SIGKILL.
//!
//! # How it works
//!
//! 1. Before freezing, the agent runs [`spawn_guardian`]: it starts `program [args] --timeout-ms
//!    <ms> -- <mount>...` in its own process group, with a pipe on its stdin and on its stdout.
//!    `args` is normally just [`GUARDIAN_ARG`]: the agent binary re-executes itself.
//! 2. The guardian ([`guardian_main`]) opens every mount, writes one byte `R` ("armed") on stdout,
//!    and waits on its stdin until its deadline (`timeout` after it started, on the monotonic
//!    clock).
//! 3. After the agent thawed, [`Guardian::disarm`] writes one byte `T` ("thawed"); the guardian
//!    exits with status 0 ([`EXIT_DISARMED`]) without touching anything.
//! 4. Otherwise the guardian thaws every mount (FITHAW; EINVAL, "not frozen", is fine) and exits
//!    with [`EXIT_FIRED`]:
//!    * at the deadline;
//!    * at once when its stdin reaches end-of-file without the `T` byte: the agent died (SIGKILL
//!      closes its end of the pipe) or dropped the guardian without disarming it;
//!    * at once on SIGTERM, SIGINT or SIGHUP.
//!
//! The guardian writes nothing (not even to stderr) before it has thawed: a log file on a frozen
//! file system would block it.
//!
//! # Dispatch in the agent binary
//!
//! The first thing `main` does, before starting a tokio runtime or parsing the command line:
//!
//! ```no_run
//! use std::process::ExitCode;
//!
//! fn main() -> ExitCode {
//!     // The library never reads the process's arguments itself: the binary passes them.
//!     if let Some(code) = bulwark_quiesce::guardian::dispatch_guardian(std::env::args_os().skip(1)) {
//!         return code;
//!     }
//!     // ... the agent proper ...
//!     ExitCode::SUCCESS
//! }
//! ```
//!
//! and the agent arms freezes with [`GuardianCommand::current_exe`]. Under systemd, use
//! `KillMode=mixed` (or `process`) so that stopping the agent does not SIGKILL the guardian with
//! it; a guardian killed anyway leaves the frozen-state file, which the next agent start thaws
//! ([`crate::watchdog::recover_frozen_state`]).

use std::ffi::{OsStr, OsString};
use std::io::{Read, Write};
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, ExitCode, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use rustix::event::{PollFd, PollFlags, Timespec};
use rustix::io::Errno;

use crate::freeze::{open_mount, thaw_fd};
use crate::{Error, Result};

/// The hidden first argument that makes the agent binary run as the guardian.
pub const GUARDIAN_ARG: &str = "__bulwark-freeze-guardian";
/// Exit status: disarmed by the agent, nothing done.
pub const EXIT_DISARMED: u8 = 0;
/// Exit status: bad arguments.
pub const EXIT_USAGE: u8 = 2;
/// Exit status: could not open a mount; nothing was armed.
pub const EXIT_SETUP: u8 = 3;
/// Exit status: the guardian thawed the mounts (deadline, agent gone, or signal).
pub const EXIT_FIRED: u8 = 10;

/// How long [`spawn_guardian`] waits for the guardian to arm itself.
const ARM_TIMEOUT: Duration = Duration::from_secs(10);

/// How to start the guardian: a program and the arguments that put it in guardian mode.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GuardianCommand {
    /// The program (normally the agent binary itself).
    pub program: PathBuf,
    /// Arguments before the guardian's own (normally `[GUARDIAN_ARG]`).
    pub args: Vec<OsString>,
}

impl GuardianCommand {
    /// `program GUARDIAN_ARG ...`.
    pub fn new(program: impl Into<PathBuf>) -> Self {
        GuardianCommand {
            program: program.into(),
            args: vec![GUARDIAN_ARG.into()],
        }
    }

    /// The running binary re-executed as `self GUARDIAN_ARG ...`.
    pub fn current_exe() -> Result<Self> {
        let exe = std::env::current_exe()
            .map_err(|e| Error::io("find the current executable", "/proc/self/exe", e))?;
        Ok(Self::new(exe))
    }
}

/// How a guardian ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GuardianExit {
    /// Disarmed before its deadline: it did nothing.
    Disarmed,
    /// It thawed the mounts itself (deadline, or it believed the agent gone).
    Fired,
    /// Something else (bad exit status, killed, could not be waited for).
    Failed(String),
}

/// A running guardian. Dropping it without [`disarm`](Guardian::disarm) closes its stdin, which
/// makes it thaw at once.
#[derive(Debug)]
pub struct Guardian {
    child: Option<Child>,
    stdin: Option<ChildStdin>,
    program: PathBuf,
}

impl Guardian {
    /// The guardian's process id.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Tells the guardian the mounts were thawed, and waits for it to exit.
    pub fn disarm(mut self) -> GuardianExit {
        if let Some(mut stdin) = self.stdin.take() {
            // EPIPE means it already exited (it fired): its status says so.
            let _ = stdin.write_all(b"T");
        }
        let Some(mut child) = self.child.take() else {
            return GuardianExit::Failed("already waited for".into());
        };
        let started = Instant::now();
        loop {
            match child.try_wait() {
                Ok(Some(status)) => {
                    return match status.code() {
                        Some(c) if c == i32::from(EXIT_DISARMED) => GuardianExit::Disarmed,
                        Some(c) if c == i32::from(EXIT_FIRED) => GuardianExit::Fired,
                        _ => GuardianExit::Failed(format!("guardian ended with {status}")),
                    };
                }
                Ok(None) if started.elapsed() < Duration::from_secs(10) => {
                    std::thread::sleep(Duration::from_millis(5));
                }
                Ok(None) => {
                    let _ = child.kill();
                    let _ = child.wait();
                    return GuardianExit::Failed("guardian did not exit after disarm".into());
                }
                Err(e) => return GuardianExit::Failed(format!("cannot wait for guardian: {e}")),
            }
        }
    }
}

impl Drop for Guardian {
    fn drop(&mut self) {
        // Closing stdin without the "thawed" byte: the guardian thaws now and exits.
        drop(self.stdin.take());
        if let Some(mut child) = self.child.take() {
            let _ = std::thread::Builder::new()
                .name("bulwark-guardian-reaper".into())
                .spawn(move || child.wait());
        }
        let _ = &self.program;
    }
}

/// Starts a guardian for `mounts` (in freeze order) that fires `timeout` from now, and waits
/// until it has armed itself (opened every mount).
pub fn spawn_guardian<P: AsRef<Path>>(
    cmd: &GuardianCommand,
    mounts: &[P],
    timeout: Duration,
) -> Result<Guardian> {
    let fail = |reason: String| Error::Guardian {
        program: cmd.program.clone(),
        reason,
    };
    let mut child = std::process::Command::new(&cmd.program)
        .args(&cmd.args)
        .arg("--timeout-ms")
        .arg(timeout.as_millis().max(1).to_string())
        .arg("--")
        .args(mounts.iter().map(|m| m.as_ref().as_os_str()))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        // Its own process group: a signal to the agent's group does not reach it.
        .process_group(0)
        .spawn()
        .map_err(|e| fail(format!("cannot start: {e}")))?;
    let stdin = child.stdin.take();
    let stdout = child.stdout.take();
    let mut guardian = Guardian {
        child: Some(child),
        stdin,
        program: cmd.program.clone(),
    };
    let Some(mut stdout) = stdout else {
        return Err(fail("no stdout pipe".into()));
    };
    let mut fds = [PollFd::new(&stdout, PollFlags::IN)];
    let timeout_ts = Timespec {
        tv_sec: ARM_TIMEOUT.as_secs() as _,
        tv_nsec: 0,
    };
    let ready = loop {
        match rustix::event::poll(&mut fds, Some(&timeout_ts)) {
            Err(Errno::INTR) => continue,
            Err(e) => break Err(format!("poll: {e}")),
            Ok(0) => break Err(format!("did not arm within {ARM_TIMEOUT:?}")),
            Ok(_) => break Ok(()),
        }
    };
    let mut byte = [0u8; 1];
    let ready = ready.and_then(|()| match stdout.read(&mut byte) {
        Ok(1) if byte[0] == b'R' => Ok(()),
        Ok(_) => Err("exited before arming (could it open every mount?)".to_string()),
        Err(e) => Err(format!("read: {e}")),
    });
    if let Err(reason) = ready {
        // Kill and reap it: it armed nothing, so there is nothing to thaw.
        if let Some(mut c) = guardian.child.take() {
            let _ = c.kill();
            let status = c.wait().map(|s| s.to_string()).unwrap_or_default();
            return Err(fail(format!("{reason} ({status})")));
        }
        return Err(fail(reason));
    }
    Ok(guardian)
}

static SIGNALLED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    SIGNALLED.store(true, Ordering::SeqCst);
}

fn install_signal_handlers() {
    for sig in [libc::SIGTERM, libc::SIGINT, libc::SIGHUP] {
        // SAFETY: `action` is a fully initialised sigaction (zeroed, then the handler and an empty
        // mask set); the handler only stores to an atomic, which is async-signal-safe. Without
        // SA_RESTART, poll() returns EINTR so the main loop sees the flag at once.
        unsafe {
            let mut action: libc::sigaction = std::mem::zeroed();
            action.sa_sigaction = on_signal as *const () as libc::sighandler_t;
            libc::sigemptyset(&mut action.sa_mask);
            action.sa_flags = 0;
            libc::sigaction(sig, &action, std::ptr::null_mut());
        }
    }
}

struct Args {
    timeout: Duration,
    mounts: Vec<PathBuf>,
}

fn parse_args(args: &[OsString]) -> std::result::Result<Args, String> {
    let mut it = args.iter();
    let mut timeout = None;
    loop {
        match it.next().map(OsString::as_os_str) {
            Some(a) if a == OsStr::new("--timeout-ms") => {
                let v = it
                    .next()
                    .and_then(|v| v.to_str())
                    .ok_or("--timeout-ms needs a value")?;
                let ms: u64 = v.parse().map_err(|_| format!("bad --timeout-ms {v:?}"))?;
                timeout = Some(Duration::from_millis(ms));
            }
            Some(a) if a == OsStr::new("--") => break,
            Some(a) => return Err(format!("unexpected argument {a:?}")),
            None => return Err("missing `--` before the mounts".into()),
        }
    }
    let timeout = timeout.ok_or("missing --timeout-ms")?;
    let mounts: Vec<PathBuf> = it.map(PathBuf::from).collect();
    if mounts.is_empty() {
        return Err("no mount given".into());
    }
    Ok(Args { timeout, mounts })
}

/// If this process was started as a guardian (the first of `args`, the process's arguments
/// after the program name, is [`GUARDIAN_ARG`]), runs the guardian and returns its exit code;
/// otherwise returns `None` at once.
pub fn dispatch_guardian<I: IntoIterator<Item = OsString>>(args: I) -> Option<ExitCode> {
    let mut args = args.into_iter();
    if args.next().is_some_and(|a| a == OsStr::new(GUARDIAN_ARG)) {
        Some(guardian_main(args))
    } else {
        None
    }
}

/// The guardian process: `args` are those after [`GUARDIAN_ARG`]: `--timeout-ms <ms> --
/// <mount>...` (mounts in freeze order; they are thawed in reverse). Blocks until disarmed or
/// fired; see the module documentation.
pub fn guardian_main<I: IntoIterator<Item = OsString>>(args: I) -> ExitCode {
    let started = Instant::now();
    install_signal_handlers();
    let args: Vec<OsString> = args.into_iter().collect();
    let args = match parse_args(&args) {
        Ok(a) => a,
        Err(e) => {
            eprintln!("bulwark freeze guardian: {e}");
            return ExitCode::from(EXIT_USAGE);
        }
    };
    let deadline = started + args.timeout;
    let mut fds: Vec<(PathBuf, OwnedFd)> = Vec::new();
    for m in &args.mounts {
        match open_mount(m) {
            Ok(fd) => fds.push((m.clone(), fd)),
            Err(e) => {
                eprintln!("bulwark freeze guardian: {e}");
                return ExitCode::from(EXIT_SETUP);
            }
        }
    }
    let mut out = std::io::stdout();
    if out.write_all(b"R").and_then(|()| out.flush()).is_err() {
        // The agent is gone before we even armed: nothing can have been frozen by it yet, but
        // thawing what we were given is harmless.
        return fire(&fds, "the agent went away before the guardian armed");
    }
    let stdin = std::io::stdin();
    let stdin = stdin.as_fd();
    let mut buf = [0u8; 64];
    loop {
        if SIGNALLED.load(Ordering::SeqCst) {
            return fire(&fds, "the guardian was signalled");
        }
        let now = Instant::now();
        if now >= deadline {
            return fire(&fds, "the freeze deadline passed");
        }
        let left = (deadline - now).min(Duration::from_secs(3600));
        let ts = Timespec {
            tv_sec: left.as_secs() as _,
            tv_nsec: left.subsec_nanos() as _,
        };
        let mut pfd = [PollFd::new(&stdin, PollFlags::IN)];
        match rustix::event::poll(&mut pfd, Some(&ts)) {
            Ok(0) | Err(Errno::INTR) => continue,
            Err(_) => return fire(&fds, "the guardian could not watch its agent"),
            Ok(_) => {}
        }
        match rustix::io::read(stdin, &mut buf) {
            Ok(0) => return fire(&fds, "the agent went away without confirming the thaw"),
            Ok(n) if buf[..n].contains(&b'T') => return ExitCode::from(EXIT_DISARMED),
            Ok(_) | Err(Errno::INTR) | Err(Errno::AGAIN) => continue,
            Err(_) => return fire(&fds, "the guardian lost its pipe to the agent"),
        }
    }
}

fn fire(fds: &[(PathBuf, OwnedFd)], why: &str) -> ExitCode {
    // Thaw first, talk after: stderr may be a file on one of these file systems.
    let results: Vec<_> = fds
        .iter()
        .rev()
        .map(|(p, fd)| (p, thaw_fd(fd.as_fd(), p)))
        .collect();
    for (p, r) in results {
        match r {
            Ok(true) => eprintln!("bulwark freeze guardian: {why}: thawed {}", p.display()),
            Ok(false) => {}
            Err(e) => eprintln!("bulwark freeze guardian: {why}: {e}"),
        }
    }
    ExitCode::from(EXIT_FIRED)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn os(v: &[&str]) -> Vec<OsString> {
        v.iter().map(OsString::from).collect()
    }

    #[test]
    fn parses_arguments() {
        let a = parse_args(&os(&["--timeout-ms", "1500", "--", "/a", "/b"])).unwrap();
        assert_eq!(a.timeout, Duration::from_millis(1500));
        assert_eq!(a.mounts, [PathBuf::from("/a"), PathBuf::from("/b")]);
        assert!(parse_args(&os(&["--timeout-ms", "x", "--", "/a"])).is_err());
        assert!(parse_args(&os(&["--", "/a"])).is_err());
        assert!(parse_args(&os(&["--timeout-ms", "5", "--"])).is_err());
        assert!(parse_args(&os(&["--timeout-ms", "5", "/a"])).is_err());
    }

    #[test]
    fn spawn_fails_cleanly_when_the_program_does_not_arm() {
        let cmd = GuardianCommand {
            program: "/bin/true".into(),
            args: vec![],
        };
        let err = spawn_guardian(&cmd, &["/nonexistent"], Duration::from_secs(5)).unwrap_err();
        assert!(matches!(err, Error::Guardian { .. }), "{err}");
        let cmd = GuardianCommand::new("/nonexistent/bulwark-agent");
        assert!(spawn_guardian(&cmd, &["/x"], Duration::from_secs(5)).is_err());
    }
}
