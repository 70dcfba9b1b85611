use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use super::*;

fn me() -> u32 {
    rustix::process::geteuid().as_raw()
}

fn opts() -> RunOptions {
    RunOptions {
        expected_owner: me(),
        retry_delay: Duration::from_millis(10),
        output_grace: Duration::from_millis(300),
        ..RunOptions::default()
    }
}

/// Writes an executable `/bin/sh` script into `dir`.
fn script(dir: &Path, name: &str, body: &str) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, format!("#!/bin/sh\n{body}\n")).unwrap();
    std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap();
    p
}

/// True when `pid` no longer runs (gone, or a zombie waiting to be reaped).
fn dead(pid: i32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => true,
        Ok(s) => s
            .rsplit(')')
            .next()
            .is_some_and(|rest| rest.trim_start().starts_with('Z')),
    }
}

fn read_pid(p: &Path) -> i32 {
    std::fs::read_to_string(p).unwrap().trim().parse().unwrap()
}

#[tokio::test]
async fn a_script_that_succeeds() {
    let d = tempfile::tempdir().unwrap();
    let s = script(
        d.path(),
        "ok.sh",
        r#"echo "hello $1-$2 $BULWARK_SCRIPT_PHASE $PWD""#,
    );
    let r = run_script(
        Phase::Pre,
        &ScriptSpec::new(&s).params(["a", "b c"]),
        &opts(),
    )
    .await;
    assert!(r.succeeded(), "{r:?}");
    assert_eq!(r.attempts, 1);
    assert_eq!(r.stdout_tail, "hello a-b c pre /\n");
    assert_eq!(
        r.describe(),
        format!(
            "pre-script {} succeeded (stdout: hello a-b c pre /)",
            s.display()
        )
    );
}

#[tokio::test]
async fn a_script_that_fails_with_a_status() {
    let d = tempfile::tempdir().unwrap();
    let s = script(
        d.path(),
        "fail.sh",
        "echo 'some output'\necho 'database is locked' >&2\nexit 3",
    );
    let r = run_script(Phase::Pre, &ScriptSpec::new(&s), &opts()).await;
    assert_eq!(r.failure, Some(ScriptFailure::Exited { code: 3 }));
    assert_eq!(
        r.describe(),
        format!(
            "pre-script {} exited with status 3 (stderr: database is locked)",
            s.display()
        )
    );
}

#[tokio::test]
async fn a_script_killed_by_a_signal() {
    let d = tempfile::tempdir().unwrap();
    let s = script(d.path(), "sig.sh", "kill -TERM $$\nsleep 5");
    let r = run_script(Phase::Post, &ScriptSpec::new(&s), &opts()).await;
    assert_eq!(r.failure, Some(ScriptFailure::Signaled { signal: 15 }));
    assert!(r.describe().contains("was killed by signal 15"));
}

#[tokio::test]
async fn a_script_that_times_out_is_killed_with_its_process_group() {
    let d = tempfile::tempdir().unwrap();
    let dir = d.path().display();
    let s = script(
        d.path(),
        "slow.sh",
        &format!("echo $$ > {dir}/script.pid\nsleep 1000 &\necho $! > {dir}/child.pid\nwait"),
    );
    let started = Instant::now();
    let spec = ScriptSpec::new(&s).timeout(Duration::from_millis(500));
    let r = run_script(Phase::Pre, &spec, &opts()).await;
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "took {:?}",
        started.elapsed()
    );
    assert_eq!(r.failure, Some(ScriptFailure::TimedOut { after_ms: 500 }));
    assert!(
        r.describe()
            .contains("timed out after 500ms and was killed"),
        "{}",
        r.describe()
    );
    let script_pid = read_pid(&d.path().join("script.pid"));
    let child_pid = read_pid(&d.path().join("child.pid"));
    let deadline = Instant::now() + Duration::from_secs(5);
    while !(dead(script_pid) && dead(child_pid)) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(
        dead(script_pid),
        "the script {script_pid} survived its timeout"
    );
    assert!(
        dead(child_pid),
        "the script's child {child_pid} survived: process group not killed"
    );
}

#[tokio::test]
async fn retries_then_succeeds() {
    let d = tempfile::tempdir().unwrap();
    let count = d.path().join("count");
    let body = format!(
        "n=$(cat {c} 2>/dev/null || echo 0)\nn=$((n+1))\necho $n > {c}\necho \"try $n\" >&2\n[ $n -ge 3 ]",
        c = count.display()
    );
    let s = script(d.path(), "flaky.sh", &body);
    let r = run_script(Phase::Pre, &ScriptSpec::new(&s).retries(2), &opts()).await;
    assert!(r.succeeded(), "{r:?}");
    assert_eq!(r.attempts, 3);
    // Not enough retries: fails, and says how many attempts were made.
    std::fs::remove_file(&count).unwrap();
    let r = run_script(Phase::Pre, &ScriptSpec::new(&s).retries(1), &opts()).await;
    assert_eq!(r.failure, Some(ScriptFailure::Exited { code: 1 }));
    assert_eq!(r.attempts, 2);
    assert!(
        r.describe()
            .ends_with("exited with status 1 after 2 attempts (stderr: try 2)"),
        "{}",
        r.describe()
    );
}

#[tokio::test]
async fn a_timeout_is_retried_too() {
    let d = tempfile::tempdir().unwrap();
    let count = d.path().join("count");
    let body = format!(
        "n=$(cat {c} 2>/dev/null || echo 0)\nn=$((n+1))\necho $n > {c}\n[ $n -ge 2 ] || sleep 100",
        c = count.display()
    );
    let s = script(d.path(), "hang-once.sh", &body);
    let spec = ScriptSpec::new(&s)
        .retries(1)
        .timeout(Duration::from_millis(300));
    let r = run_script(Phase::Pre, &spec, &opts()).await;
    assert!(r.succeeded(), "{r:?}");
    assert_eq!(r.attempts, 2);
}

#[tokio::test]
async fn lots_of_output_is_drained_and_only_the_tail_kept() {
    let d = tempfile::tempdir().unwrap();
    let s = script(
        d.path(),
        "loud.sh",
        "yes 'a line of output' | head -c 5000000\necho END\nyes err | head -c 3000000 >&2\necho ERR-END >&2\nexit 7",
    );
    let o = RunOptions {
        output_tail: 1000,
        ..opts()
    };
    let r = run_script(
        Phase::Pre,
        &ScriptSpec::new(&s).timeout(Duration::from_secs(30)),
        &o,
    )
    .await;
    assert_eq!(r.failure, Some(ScriptFailure::Exited { code: 7 }));
    assert_eq!(r.stdout_tail.len(), 1000);
    assert!(r.stdout_tail.ends_with("END\n"));
    assert_eq!(r.stderr_tail.len(), 1000);
    assert!(r.stderr_tail.ends_with("ERR-END\n"));
    assert_eq!(r.output_bytes, 5_000_000 + 4 + 3_000_000 + 8);
    // The reason text stays short.
    let text = r.describe();
    assert!(text.len() < 400, "{text}");
    assert!(text.ends_with("err | ERR-END)"), "{text}");
}

#[tokio::test]
async fn a_background_process_holding_stdout_does_not_hang_the_runner() {
    let d = tempfile::tempdir().unwrap();
    let pidfile = d.path().join("daemon.pid");
    let s = script(
        d.path(),
        "daemon.sh",
        &format!("sleep 30 &\necho $! > {}\necho started", pidfile.display()),
    );
    let started = Instant::now();
    let r = run_script(Phase::Pre, &ScriptSpec::new(&s), &opts()).await;
    let took = started.elapsed();
    let pid = read_pid(&pidfile);
    // What a successful script leaves running is not killed (it may hold a lock on purpose).
    assert!(!dead(pid));
    let _ = rustix::process::kill_process(
        rustix::process::Pid::from_raw(pid).unwrap(),
        rustix::process::Signal::KILL,
    );
    assert!(r.succeeded(), "{r:?}");
    assert!(took < Duration::from_secs(5), "took {took:?}");
}

#[tokio::test]
async fn a_missing_script_is_refused() {
    let d = tempfile::tempdir().unwrap();
    let r = run_script(
        Phase::Pre,
        &ScriptSpec::new(d.path().join("nope.sh")),
        &opts(),
    )
    .await;
    assert!(
        matches!(r.failure, Some(ScriptFailure::Refused { .. })),
        "{r:?}"
    );
    assert_eq!(r.attempts, 0);
}

#[tokio::test]
async fn a_group_writable_script_is_refused_and_not_run() {
    let d = tempfile::tempdir().unwrap();
    let marker = d.path().join("ran");
    let s = script(d.path(), "gw.sh", &format!("touch {}", marker.display()));
    std::fs::set_permissions(&s, std::fs::Permissions::from_mode(0o775)).unwrap();
    let r = run_script(Phase::Pre, &ScriptSpec::new(&s), &opts()).await;
    match &r.failure {
        Some(ScriptFailure::Refused { reason }) => {
            assert!(reason.contains("writable by group (mode 0775)"), "{reason}")
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(r.attempts, 0);
    assert!(!marker.exists(), "a refused script ran");
    assert!(
        r.describe().contains("was refused: refusing"),
        "{}",
        r.describe()
    );
}

#[tokio::test]
async fn a_script_owned_by_another_user_is_refused() {
    let d = tempfile::tempdir().unwrap();
    let marker = d.path().join("ran");
    let s = script(
        d.path(),
        "theirs.sh",
        &format!("touch {}", marker.display()),
    );
    // The check takes the expected owner: another uid than the file's is refused.
    let err = check_script(&s, me() + 1).unwrap_err();
    assert!(
        err.to_string()
            .contains(&format!("owned by uid {}, expected uid {}", me(), me() + 1))
    );
    if rustix::process::geteuid().is_root() {
        // As root: really give it to nobody (65534) and run it the way the agent does.
        std::os::unix::fs::chown(&s, Some(65534), None).unwrap();
        let o = RunOptions {
            expected_owner: 0,
            ..opts()
        };
        let r = run_script(Phase::Pre, &ScriptSpec::new(&s), &o).await;
        match &r.failure {
            Some(ScriptFailure::Refused { reason }) => {
                assert!(
                    reason.contains("owned by uid 65534, expected uid 0"),
                    "{reason}"
                )
            }
            other => panic!("{other:?}"),
        }
        assert!(!marker.exists(), "a refused script ran");
    } else {
        bulwark_tests::skip(
            "quiesce scripts::tests::a_script_owned_by_another_user_is_refused (chown half)",
            bulwark_tests::Needs::Root,
            "needs root to give a script to uid 65534",
        );
    }
}

#[test]
fn other_unsafe_scripts_are_refused() {
    let d = tempfile::tempdir().unwrap();
    let s = script(d.path(), "ok.sh", "true");
    check_script(&s, me()).unwrap();
    // Writable by others.
    std::fs::set_permissions(&s, std::fs::Permissions::from_mode(0o757)).unwrap();
    assert!(
        check_script(&s, me())
            .unwrap_err()
            .to_string()
            .contains("writable by others")
    );
    // Not executable.
    std::fs::set_permissions(&s, std::fs::Permissions::from_mode(0o644)).unwrap();
    assert!(
        check_script(&s, me())
            .unwrap_err()
            .to_string()
            .contains("not executable")
    );
    std::fs::set_permissions(&s, std::fs::Permissions::from_mode(0o700)).unwrap();
    check_script(&s, me()).unwrap();
    // Relative path.
    assert!(check_script(Path::new("ok.sh"), me()).is_err());
    // A directory is not a script.
    assert!(
        check_script(d.path(), me())
            .unwrap_err()
            .to_string()
            .contains("not a regular file")
    );
}

#[test]
fn a_script_in_a_world_writable_directory_is_refused() {
    let d = tempfile::tempdir().unwrap();
    let open = d.path().join("open");
    std::fs::create_dir(&open).unwrap();
    let s = script(&open, "s.sh", "true");
    std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o777)).unwrap();
    let e = check_script(&s, me()).unwrap_err().to_string();
    assert!(e.contains("is writable by others (mode 0777)"), "{e}");
    // Nor through a symlink from a safe directory.
    let link = d.path().join("link.sh");
    std::os::unix::fs::symlink(&s, &link).unwrap();
    assert!(check_script(&link, me()).is_err());
    // A symlink in a world-writable directory to a safe script is refused too.
    std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o755)).unwrap();
    let safe = script(d.path(), "safe.sh", "true");
    let link2 = open.join("link2.sh");
    std::os::unix::fs::symlink(&safe, &link2).unwrap();
    check_script(&link2, me()).unwrap();
    std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o777)).unwrap();
    assert!(check_script(&link2, me()).is_err());
    std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o755)).unwrap();
}

#[test]
fn config_file_checks() {
    let d = tempfile::tempdir().unwrap();
    let c = d.path().join("agent.toml");
    std::fs::write(&c, "fsfreeze = true\n").unwrap();
    std::fs::set_permissions(&c, std::fs::Permissions::from_mode(0o644)).unwrap();
    check_config_file(&c, me()).unwrap();
    assert!(
        check_config_file(&c, me() + 1)
            .unwrap_err()
            .to_string()
            .contains("owned by uid")
    );
    std::fs::set_permissions(&c, std::fs::Permissions::from_mode(0o664)).unwrap();
    let e = check_config_file(&c, me()).unwrap_err();
    assert!(
        matches!(&e, Error::UnsafePermissions { path, .. } if path.ends_with("agent.toml")),
        "{e}"
    );
    assert!(e.to_string().contains("writable by group"));
}

#[tokio::test]
async fn pre_scripts_refuse_all_when_one_is_unsafe_and_stop_at_the_first_failure() {
    let d = tempfile::tempdir().unwrap();
    let m1 = d.path().join("m1");
    let good = script(d.path(), "good.sh", &format!("touch {}", m1.display()));
    let bad = script(d.path(), "bad.sh", "true");
    std::fs::set_permissions(&bad, std::fs::Permissions::from_mode(0o777)).unwrap();
    let specs = [ScriptSpec::new(&good), ScriptSpec::new(&bad)];
    match run_pre_scripts(&specs, &opts()).await {
        PreScripts::Failed(r) => {
            assert_eq!(r.path, bad);
            assert!(matches!(r.failure, Some(ScriptFailure::Refused { .. })));
        }
        other => panic!("{other:?}"),
    }
    assert!(!m1.exists(), "nothing may run when one script is refused");

    let m2 = d.path().join("m2");
    let fails = script(d.path(), "fails.sh", "exit 4");
    let after = script(d.path(), "after.sh", &format!("touch {}", m2.display()));
    let specs = [
        ScriptSpec::new(&good),
        ScriptSpec::new(&fails),
        ScriptSpec::new(&after),
    ];
    match run_pre_scripts(&specs, &opts()).await {
        PreScripts::Failed(r) => assert_eq!(r.failure, Some(ScriptFailure::Exited { code: 4 })),
        other => panic!("{other:?}"),
    }
    assert!(m1.exists() && !m2.exists());

    assert_eq!(run_pre_scripts(&[], &opts()).await, PreScripts::NotRun);
    assert_eq!(
        run_pre_scripts(&[ScriptSpec::new(&good)], &opts()).await,
        PreScripts::Succeeded
    );
}

#[tokio::test]
async fn post_scripts_all_run_and_failures_are_returned() {
    let d = tempfile::tempdir().unwrap();
    let m = d.path().join("m");
    let fails = script(d.path(), "fails.sh", "exit 2");
    let after = script(d.path(), "after.sh", &format!("touch {}", m.display()));
    let failed =
        run_post_scripts(&[ScriptSpec::new(&fails), ScriptSpec::new(&after)], &opts()).await;
    assert_eq!(failed.len(), 1);
    assert_eq!(failed[0].phase, Phase::Post);
    assert!(m.exists());
}

#[test]
fn timeouts_are_capped() {
    let s = ScriptSpec::new("/x").timeout(Duration::from_secs(100_000));
    let o = RunOptions::default();
    assert_eq!(s.timeout.min(o.max_timeout), MAX_TIMEOUT);
}

#[test]
fn spec_deserializes_from_config_json() {
    let s: ScriptSpec = serde_json::from_str(
        r#"{"path": "/etc/bulwark/pre.sh", "params": ["--db", "main"], "timeout": 2.5, "retries": 1}"#,
    )
    .unwrap();
    assert_eq!(s.timeout, Duration::from_millis(2500));
    assert_eq!(s.params, ["--db", "main"]);
    let s: ScriptSpec = serde_json::from_str(r#"{"path": "/p"}"#).unwrap();
    assert_eq!((s.timeout, s.retries), (DEFAULT_TIMEOUT, 0));
    assert!(serde_json::from_str::<ScriptSpec>(r#"{"path": "/p", "command": "rm"}"#).is_err());
}

#[test]
fn availability_checks_the_config_file_and_every_script() {
    let d = tempfile::tempdir().unwrap();
    let c = d.path().join("agent.toml");
    std::fs::write(&c, "").unwrap();
    std::fs::set_permissions(&c, std::fs::Permissions::from_mode(0o600)).unwrap();
    let s = script(d.path(), "pre.sh", "true");
    let specs = [ScriptSpec::new(&s)];
    assert_eq!(
        availability(Some(&c), &[], me()),
        ScriptsAvailability::NotConfigured
    );
    assert_eq!(
        availability(Some(&c), &specs, me()),
        ScriptsAvailability::Configured
    );
    assert_eq!(
        availability(None, &specs, me()),
        ScriptsAvailability::Configured
    );
    std::fs::set_permissions(&c, std::fs::Permissions::from_mode(0o666)).unwrap();
    match availability(Some(&c), &specs, me()) {
        ScriptsAvailability::Refused { reason } => {
            assert!(reason.contains("agent.toml"), "{reason}")
        }
        other => panic!("{other:?}"),
    }
    assert!(matches!(
        availability(None, &specs, me() + 1),
        ScriptsAvailability::Refused { .. }
    ));
}

#[test]
fn the_guard_types_can_move_between_threads() {
    fn send_sync<T: Send + Sync>() {}
    send_sync::<crate::WatchedFreeze>();
    send_sync::<crate::FrozenSet>();
    send_sync::<crate::guardian::Guardian>();
    send_sync::<ScriptReport>();
}
