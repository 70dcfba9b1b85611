//! Root tests of the guardian process, on loop-mounted file systems of the tests' own.
//!
//! This test binary has its own `main` (`harness = false`) because it plays the agent binary: it
//! dispatches to [`guardian::dispatch_guardian`] when re-executed as the guardian, and to a fake
//! agent (freeze, then sleep until SIGKILLed) for the crash tests.
#![allow(clippy::unwrap_used)]

mod common;

use std::io::{BufRead, BufReader};
use std::panic::AssertUnwindSafe;
use std::path::Path;
use std::process::{Command, ExitCode, Stdio};
use std::time::{Duration, Instant};

use bulwark_quiesce::guardian::{self, GuardianCommand, GuardianExit, spawn_guardian};
use bulwark_quiesce::{Error, FreezeOptions, FrozenSet, WatchedFreeze, recover_frozen_state};
use bulwark_tests::{FsType, root_or_skip};
use common::{KillOnDrop, assert_frozen, loop_fs};

const FAKE_AGENT: &str = "__bulwark-test-fake-agent";
const SECS: Duration = Duration::from_secs(10);

/// The fake agent: `FAKE_AGENT <guardian|noguardian> <timeout_ms> <mount> <state file>`. Freezes
/// with a watched freeze, prints `frozen <guardian pid or 0>`, then sleeps until killed.
fn fake_agent(args: &[String]) -> ExitCode {
    let [mode, ms, mount, state] = args else {
        eprintln!("fake agent: bad arguments {args:?}");
        return ExitCode::from(2);
    };
    let mut opts = FreezeOptions::new(Duration::from_millis(ms.parse().unwrap())).state_file(state);
    if mode == "guardian" {
        opts = opts.guardian(GuardianCommand::current_exe().unwrap());
    }
    let wf = match WatchedFreeze::start(&[Path::new(mount)], opts) {
        Ok(wf) => wf,
        Err(e) => {
            eprintln!("fake agent: {e}");
            return ExitCode::from(1);
        }
    };
    println!("frozen {}", wf.guardian_pid().unwrap_or(0));
    loop {
        std::thread::sleep(Duration::from_secs(3600));
    }
}

/// True when `pid` no longer runs (gone, or a zombie).
fn dead(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => true,
        Ok(s) => s
            .rsplit(')')
            .next()
            .is_some_and(|rest| rest.trim_start().starts_with('Z')),
    }
}

fn wait_dead(pid: u32, d: Duration) -> bool {
    let deadline = Instant::now() + d;
    while Instant::now() < deadline {
        if dead(pid) {
            return true;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    dead(pid)
}

/// Starts the fake agent and waits until it has frozen `mount`; returns it and the guardian pid.
fn start_fake_agent(mode: &str, mount: &Path, state: &Path) -> (KillOnDrop, u32) {
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args([FAKE_AGENT, mode, "60000"])
        .arg(mount)
        .arg(state)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let agent = KillOnDrop(Some(child));
    let pid = line
        .strip_prefix("frozen ")
        .unwrap_or_else(|| panic!("the fake agent did not freeze: {line:?}"))
        .trim()
        .parse()
        .unwrap();
    (agent, pid)
}

fn sigkill(agent: &mut KillOnDrop) {
    let mut c = agent.0.take().unwrap();
    c.kill().unwrap();
    c.wait().unwrap();
}

fn guardian_thaws_when_its_agent_is_sigkilled() {
    if !root_or_skip("guardian_thaws_when_its_agent_is_sigkilled", &["mkfs.ext4"]) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let fs = loop_fs(dir.path(), "fs", FsType::Ext4);
    let state = dir.path().join("frozen.json");
    let (mut agent, guardian_pid) = start_fake_agent("guardian", fs.path(), &state);
    assert_ne!(guardian_pid, 0);
    let mut w = assert_frozen(fs.path(), "w");
    let killed = Instant::now();
    sigkill(&mut agent);
    // The deadline is 60 s away: the guardian thaws because its agent is gone.
    assert!(
        w.finishes_within(SECS),
        "still frozen after the agent was SIGKILLed"
    );
    assert!(killed.elapsed() < Duration::from_secs(10));
    assert!(
        wait_dead(guardian_pid, SECS),
        "the guardian did not exit after firing"
    );
    // The killed agent left its state file; recovery finds nothing left frozen and removes it.
    let report = recover_frozen_state(&state).unwrap().unwrap();
    assert!(report.thawed.is_empty());
    assert_eq!(report.not_frozen, [fs.path().to_path_buf()]);
    assert!(!state.exists());
}

fn recovery_thaws_after_an_agent_without_guardian_is_sigkilled() {
    if !root_or_skip(
        "recovery_thaws_after_an_agent_without_guardian_is_sigkilled",
        &["mkfs.ext4"],
    ) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let fs = loop_fs(dir.path(), "fs", FsType::Ext4);
    let state = dir.path().join("frozen.json");
    let (mut agent, _) = start_fake_agent("noguardian", fs.path(), &state);
    sigkill(&mut agent);
    // Its in-process watchdog died with it: still frozen.
    let mut w = assert_frozen(fs.path(), "w");
    // The next agent start recovers.
    let report = recover_frozen_state(&state).unwrap().unwrap();
    assert_eq!(report.thawed, [fs.path().to_path_buf()]);
    assert!(w.finishes_within(SECS));
    assert!(!state.exists());
}

fn guardian_fires_at_the_deadline() {
    if !root_or_skip("guardian_fires_at_the_deadline", &["mkfs.ext4"]) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let fs = loop_fs(dir.path(), "fs", FsType::Ext4);
    let mut set = FrozenSet::new(&[fs.path()]).unwrap();
    let started = Instant::now();
    let g = spawn_guardian(
        &GuardianCommand::current_exe().unwrap(),
        &set.mounts(),
        Duration::from_millis(1200),
    )
    .unwrap();
    set.freeze().unwrap();
    // A hung agent: alive, never thaws, never disarms. The guardian thaws at the deadline.
    let mut w = assert_frozen(fs.path(), "w");
    assert!(w.finishes_within(SECS));
    assert!(
        started.elapsed() >= Duration::from_millis(1100),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(g.disarm(), GuardianExit::Fired);
    let report = set.thaw();
    assert_eq!(report.thawed_by_someone_else, [fs.path().to_path_buf()]);
}

fn a_disarmed_guardian_does_nothing() {
    if !root_or_skip("a_disarmed_guardian_does_nothing", &["mkfs.ext4"]) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let fs = loop_fs(dir.path(), "fs", FsType::Ext4);
    let opts = FreezeOptions::new(Duration::from_secs(30))
        .guardian(GuardianCommand::current_exe().unwrap());
    let mut wf = WatchedFreeze::start(&[fs.path()], opts).unwrap();
    let pid = wf.guardian_pid().unwrap();
    let mut w = assert_frozen(fs.path(), "w");
    let report = wf.thaw();
    assert!(report.held_continuously, "{report:?}");
    assert_eq!(report.guardian, Some(GuardianExit::Disarmed));
    assert!(w.finishes_within(SECS));
    assert!(wait_dead(pid, SECS));
}

fn watchdog_and_guardian_at_the_same_deadline() {
    if !root_or_skip("watchdog_and_guardian_at_the_same_deadline", &["mkfs.ext4"]) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let fs = loop_fs(dir.path(), "fs", FsType::Ext4);
    let opts = FreezeOptions::new(Duration::from_millis(800))
        .guardian(GuardianCommand::current_exe().unwrap());
    let mut wf = WatchedFreeze::start(&[fs.path()], opts).unwrap();
    let mut w = assert_frozen(fs.path(), "w");
    assert!(w.finishes_within(SECS));
    std::thread::sleep(Duration::from_millis(200));
    let report = wf.thaw();
    assert!(!report.held_continuously);
    assert!(report.watchdog_fired);
    // Whichever thawed first, the other found nothing to do; both are fine.
    assert!(
        matches!(
            report.guardian,
            Some(GuardianExit::Fired | GuardianExit::Disarmed)
        ),
        "{report:?}"
    );
}

fn a_signalled_guardian_thaws_at_once() {
    if !root_or_skip("a_signalled_guardian_thaws_at_once", &["mkfs.ext4"]) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let fs = loop_fs(dir.path(), "fs", FsType::Ext4);
    let mut set = FrozenSet::new(&[fs.path()]).unwrap();
    let g = spawn_guardian(
        &GuardianCommand::current_exe().unwrap(),
        &set.mounts(),
        SECS * 6,
    )
    .unwrap();
    set.freeze().unwrap();
    let mut w = assert_frozen(fs.path(), "w");
    let pid = rustix::process::Pid::from_raw(g.pid().unwrap() as i32).unwrap();
    rustix::process::kill_process(pid, rustix::process::Signal::TERM).unwrap();
    assert!(w.finishes_within(SECS));
    assert_eq!(g.disarm(), GuardianExit::Fired);
    assert!(set.thaw().thawed_by_someone_else.len() == 1);
}

fn a_guardian_that_cannot_arm_is_an_error() {
    // No root needed: nothing is frozen.
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("missing");
    let err =
        spawn_guardian(&GuardianCommand::current_exe().unwrap(), &[&missing], SECS).unwrap_err();
    assert!(
        matches!(&err, Error::Guardian { reason, .. } if reason.contains("before arming")),
        "{err}"
    );
    // Bad arguments: usage error.
    let out = Command::new(std::env::current_exe().unwrap())
        .args([guardian::GUARDIAN_ARG, "--timeout-ms"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(i32::from(guardian::EXIT_USAGE)));
}

fn main() -> ExitCode {
    if let Some(code) = guardian::dispatch_guardian(std::env::args_os().skip(1)) {
        return code;
    }
    let args: Vec<String> = std::env::args().collect();
    if args.get(1).map(String::as_str) == Some(FAKE_AGENT) {
        return fake_agent(&args[2..]);
    }
    let tests: &[(&str, fn())] = &[
        (
            "guardian_thaws_when_its_agent_is_sigkilled",
            guardian_thaws_when_its_agent_is_sigkilled,
        ),
        (
            "recovery_thaws_after_an_agent_without_guardian_is_sigkilled",
            recovery_thaws_after_an_agent_without_guardian_is_sigkilled,
        ),
        (
            "guardian_fires_at_the_deadline",
            guardian_fires_at_the_deadline,
        ),
        (
            "a_disarmed_guardian_does_nothing",
            a_disarmed_guardian_does_nothing,
        ),
        (
            "watchdog_and_guardian_at_the_same_deadline",
            watchdog_and_guardian_at_the_same_deadline,
        ),
        (
            "a_signalled_guardian_thaws_at_once",
            a_signalled_guardian_thaws_at_once,
        ),
        (
            "a_guardian_that_cannot_arm_is_an_error",
            a_guardian_that_cannot_arm_is_an_error,
        ),
    ];
    if args.iter().any(|a| a == "--list") {
        for (name, _) in tests {
            println!("{name}: test");
        }
        return ExitCode::SUCCESS;
    }
    let exact = args.iter().any(|a| a == "--exact");
    let filters: Vec<&String> = args[1..].iter().filter(|a| !a.starts_with('-')).collect();
    let selected: Vec<_> = tests
        .iter()
        .filter(|(name, _)| {
            filters.is_empty()
                || filters.iter().any(|f| {
                    if exact {
                        name == f
                    } else {
                        name.contains(f.as_str())
                    }
                })
        })
        .collect();
    let started = Instant::now();
    println!("\nrunning {} tests", selected.len());
    let (mut passed, mut failed) = (0, Vec::new());
    for (name, test) in &selected {
        match std::panic::catch_unwind(AssertUnwindSafe(test)) {
            Ok(()) => {
                println!("test {name} ... ok");
                passed += 1;
            }
            Err(_) => {
                println!("test {name} ... FAILED");
                failed.push(*name);
            }
        }
    }
    if !failed.is_empty() {
        println!("\nfailures:\n    {}", failed.join("\n    "));
    }
    println!(
        "\ntest result: {}. {passed} passed; {} failed; 0 ignored; 0 measured; {} filtered out; finished in {:.2}s\n",
        if failed.is_empty() { "ok" } else { "FAILED" },
        failed.len(),
        tests.len() - selected.len(),
        started.elapsed().as_secs_f64()
    );
    if failed.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}
