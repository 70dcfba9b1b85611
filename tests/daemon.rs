//! The scheduled daemon as a real process: jobs at their time into a local vault, the job
//! history, SIGKILL and restart (the interrupted job is failed, catch-up runs, new jobs run),
//! SIGTERM for a clean exit; bad configurations refused before anything runs; kept snapshots
//! expired at start.

// Test helpers, like the tests themselves, panic on failure.
#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use bulwark_tests::{controller, controller_bin, controller_json, stderr_of, write_random};
use serde_json::Value;

const POLICY: &str = r#"{ time_zone = "UTC", schedule = { frequency = "daily", times = ["02:00"] }, retention = { daily = 7 } }"#;

struct Setup {
    _dir: tempfile::TempDir,
    root: PathBuf,
    config: PathBuf,
    vault: String,
    state: PathBuf,
}

fn setup(big_mib: usize) -> Setup {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().to_path_buf();
    write_random(&root.join("web-os.img"), 0, 3 << 20, 1);
    write_random(&root.join("web-data.img"), 0, 2 << 20, 2);
    write_random(&root.join("db-os.img"), 0, big_mib << 20, 3);
    let config = root.join("bulwark.toml");
    std::fs::write(
        &config,
        format!(
            r#"vault = "vault"
state_dir = "state"
concurrency = 2
upload_concurrency = 1
shutdown_timeout_seconds = 30

[[vm]]
name = "web01"
disks = [{{ name = "os", path = "web-os.img" }}, {{ name = "data", path = "web-data.img" }}]
policy = {POLICY}
schedule_override_seconds = 2

[[vm]]
name = "db01"
agent = "unix:{root}/no-agent.sock"
keep_snapshots = false
disks = [{{ name = "os", path = "db-os.img" }}]
policy = {POLICY}
schedule_override_seconds = 2
"#,
            root = root.display()
        ),
    )
    .unwrap();
    Setup {
        vault: root.join("vault").display().to_string(),
        state: root.join("state"),
        config,
        root,
        _dir: dir,
    }
}

/// A daemon process that is killed if the test ends (or panics) while it runs.
struct Running(Child);

impl std::ops::Deref for Running {
    type Target = Child;
    fn deref(&self) -> &Child {
        &self.0
    }
}

impl std::ops::DerefMut for Running {
    fn deref_mut(&mut self) -> &mut Child {
        &mut self.0
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn serve(s: &Setup, tag: &str) -> Running {
    let log = std::fs::File::create(s.root.join(format!("serve-{tag}.log"))).unwrap();
    Running(
        Command::new(controller_bin())
            .args(["serve", "--config"])
            .arg(&s.config)
            .env("BULWARK_LOG", "info")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start serve"),
    )
}

fn log_of(s: &Setup, tag: &str) -> String {
    std::fs::read_to_string(s.root.join(format!("serve-{tag}.log"))).unwrap_or_default()
}

fn jobs(s: &Setup) -> Vec<Value> {
    let out = controller([
        "jobs",
        "--state-dir",
        s.state.to_str().unwrap(),
        "--limit",
        "1000",
        "--json",
    ]);
    if !out.status.success() {
        return Vec::new();
    }
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    v["jobs"].as_array().cloned().unwrap_or_default()
}

fn points(s: &Setup, vm: &str) -> Vec<Value> {
    let out = controller(["list", "--vault", &s.vault, "--vm", vm, "--json"]);
    if !out.status.success() {
        return Vec::new();
    }
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    v["points"].as_array().cloned().unwrap_or_default()
}

/// Whether a prune lease object is in the vault now.
fn prune_lease_held(s: &Setup) -> bool {
    std::fs::read_dir(Path::new(&s.vault).join("locks")).is_ok_and(|d| {
        d.flatten()
            .any(|e| e.file_name().to_string_lossy().starts_with("prune-"))
    })
}

fn wait_for<T>(what: &str, limit: Duration, mut f: impl FnMut() -> Option<T>) -> T {
    let start = Instant::now();
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(start.elapsed() < limit, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn terminate(child: &mut Child) {
    let pid = rustix::process::Pid::from_child(child);
    rustix::process::kill_process(pid, rustix::process::Signal::TERM).unwrap();
}

fn wait_exit(child: &mut Child, limit: Duration) -> std::process::ExitStatus {
    wait_for("the daemon to exit", limit, || child.try_wait().unwrap())
}

#[test]
fn daemon_runs_jobs_survives_sigkill_and_stops_on_sigterm() {
    let s = setup(64);

    // A kept snapshot that expired while no daemon ran: removed at start.
    let snapshots = s.state.join("snapshots");
    let old = controller_json([
        "backup",
        "--vault",
        &s.vault,
        "--vm",
        "old01",
        "--disk",
        &format!("os={}", s.root.join("web-os.img").display()),
        "--snapshot-dir",
        snapshots.to_str().unwrap(),
        "--keep-snapshot-days",
        "1",
        "--json",
    ]);
    let old_point = old["point"].as_str().unwrap().to_string();
    let index = snapshots.join("old01").join(format!("{old_point}.json"));
    let mut kept: Value = serde_json::from_slice(&std::fs::read(&index).unwrap()).unwrap();
    let old_snap = PathBuf::from(kept["disks"][0]["path"].as_str().unwrap());
    assert!(old_snap.is_file());
    kept["expires"] = "2020-01-01T00:00:00Z".into();
    std::fs::write(&index, serde_json::to_vec(&kept).unwrap()).unwrap();

    // First life: both VMs get points; catch the big VM's first job mid-transfer and SIGKILL.
    let mut daemon = serve(&s, "1");
    wait_for("a completed web01 job", Duration::from_secs(60), || {
        jobs(&s)
            .into_iter()
            .find(|j| j["vm"] == "web01" && j["state"] == "CompletedWithWarnings")
    });
    // Housekeeping prunes after every job, often while db01's transfer runs: a kill during a
    // prune would leave its lease for 60 s (see the wait for retention below), so the kill
    // waits for a moment without one.
    let interrupted = wait_for(
        "a db01 job in its transfer phase, and no prune running",
        Duration::from_secs(60),
        || {
            jobs(&s)
                .into_iter()
                .find(|j| {
                    j["vm"] == "db01" && j["state"] == "InProgress" && j["transfer"] == "running"
                })
                .filter(|_| !prune_lease_held(&s))
        },
    );
    daemon.kill().unwrap();
    daemon.wait().unwrap();
    let id = interrupted["id"].as_i64().unwrap();
    let after_kill = jobs(&s);
    let j = after_kill.iter().find(|j| j["id"] == id).unwrap();
    assert_eq!(
        j["state"], "InProgress",
        "the job finished before the SIGKILL landed: {j}"
    );
    assert!(
        !index.exists() && !old_snap.exists(),
        "the expired kept snapshot was removed at start"
    );
    let web_jobs: Vec<_> = after_kill
        .iter()
        .filter(|j| j["vm"] == "web01" && j["state"] == "CompletedWithWarnings")
        .collect();
    assert!(
        !web_jobs.is_empty(),
        "web01 ran: {after_kill:#?}\n{}",
        log_of(&s, "1")
    );
    let w = web_jobs[0];
    assert_eq!(w["snapshot"], "completed");
    assert_eq!(w["transfer"], "completed");
    assert_eq!(w["consistency"], "crash");
    assert!(w["bytes_read"].as_u64().unwrap() >= 5 << 20);
    let point = w["point"].as_str().unwrap();
    let web_points = points(&s, "web01");
    assert!(web_points.iter().any(|p| p["id"] == point));
    // db01's agent is configured but not running: its jobs fall back to crash consistency.
    assert!(
        log_of(&s, "1").contains("quiesced through the agent at unix:"),
        "{}",
        log_of(&s, "1")
    );

    // Each completed job's snapshots are kept: the tier is "snapshot and vault".
    let listed = controller_json([
        "list",
        "--vault",
        &s.vault,
        "--vm",
        "web01",
        "--snapshot-dir",
        snapshots.to_str().unwrap(),
        "--json",
    ]);
    let p = listed["points"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["id"] == point)
        .unwrap();
    assert_eq!(p["tier"], "snapshot and vault");

    // Down for longer than one run interval, so a run is missed.
    std::thread::sleep(Duration::from_millis(2500));

    // Second life: the interrupted job is failed, a catch-up job and new jobs run.
    let mut daemon = serve(&s, "2");
    let db_done = wait_for("a new completed db01 job", Duration::from_secs(90), || {
        jobs(&s).into_iter().find(|j| {
            j["vm"] == "db01"
                && j["id"].as_i64() > Some(id)
                && j["state"] == "CompletedWithWarnings"
        })
    });
    let all = jobs(&s);
    let j = all.iter().find(|j| j["id"] == id).unwrap();
    assert_eq!(j["state"], "Failed");
    assert_eq!(j["error"], "controller stopped during the job");
    assert_eq!(j["transfer"], "failed");
    assert!(
        all.iter()
            .any(|j| j["trigger"] == "catch-up" && j["id"].as_i64() > Some(id)),
        "a catch-up job ran after the restart: {all:#?}"
    );
    assert!(
        points(&s, "db01")
            .iter()
            .any(|p| p["id"] == db_done["point"])
    );
    assert!(log_of(&s, "2").contains("marked Failed"));
    // The fallback says why: the configured agent did not answer.
    let reasons = db_done["consistency_reasons"].to_string();
    assert!(reasons.contains("unreachable"), "{db_done:#}");
    assert_eq!(db_done["consistency"], "crash");

    // A second daemon on the same state directory is refused.
    let out = controller(["serve", "--config", s.config.to_str().unwrap()]);
    assert!(!out.status.success());
    assert!(
        stderr_of(&out).contains("another bulwark-controller daemon"),
        "{}",
        stderr_of(&out)
    );

    // Enough web01 jobs for retention to have something to prune.
    wait_for(
        "three completed web01 jobs",
        Duration::from_secs(60),
        || {
            let n = jobs(&s)
                .iter()
                .filter(|j| j["vm"] == "web01" && j["state"] == "CompletedWithWarnings")
                .count();
            (n >= 3).then_some(())
        },
    );

    // Retention has caught up with the second life's jobs. A SIGKILL that landed while a
    // housekeeping pass held its prune lease (a prune starting between the check above and
    // the kill) leaves that lease for its TTL (60 s): prunes wait for it, by design, so this
    // can take that long (and a SIGTERM meanwhile would cut the waiting pass short at the
    // shutdown timeout).
    wait_for(
        "retention to keep at most two web01 points",
        Duration::from_secs(150),
        || {
            let live = points(&s, "web01");
            (!live.is_empty() && live.len() <= 2).then_some(())
        },
    );

    // SIGTERM: a clean exit, nothing left in progress.
    let sigterm_at = jiff::Timestamp::now();
    terminate(&mut daemon);
    let status = wait_exit(&mut daemon, Duration::from_secs(60));
    assert!(status.success(), "exit {status}: {}", log_of(&s, "2"));
    assert!(log_of(&s, "2").contains("stopped:"));
    let all = jobs(&s);
    assert!(all.iter().all(|j| j["state"] != "InProgress"), "{all:#?}");
    // Retention ran after the jobs: the policy keeps one point a day (and the newest), so
    // older web01 points were soft-deleted, and their kept snapshots removed with them.
    let completed = all
        .iter()
        .filter(|j| j["vm"] == "web01" && j["state"] == "CompletedWithWarnings")
        .count();
    let live = points(&s, "web01");
    let deleted = controller_json([
        "list",
        "--deleted",
        "--vault",
        &s.vault,
        "--vm",
        "web01",
        "--json",
    ]);
    let deleted = deleted["deleted"].as_array().unwrap();
    assert!(completed >= 3, "{completed} web01 jobs");
    assert!(
        live.len() <= 2,
        "{} live web01 points: {live:#?}\n{}",
        live.len(),
        log_of(&s, "2")
    );
    // (A web01 job killed by the SIGKILL may have committed its point too.)
    let total = live.len() + deleted.len();
    assert!(
        total == completed || total == completed + 1,
        "{completed} jobs, {live:#?}\n{deleted:#?}"
    );
    for d in deleted {
        let id = d["point"]["id"].as_str().unwrap();
        assert!(!snapshots.join("web01").join(format!("{id}.json")).exists());
    }
    // Overlap: with a 2 s schedule and a slow big disk, some runs found db01 still busy.
    // Not vacuous: a db01 job that ran for two periods or more while the scheduler was live
    // (before the SIGTERM; after it no run falls due) had a run fall due meanwhile, which
    // must have been recorded as skipped.
    let ran_secs = |j: &serde_json::Value| -> Option<f64> {
        let started: jiff::Timestamp = j["started"].as_str()?.parse().ok()?;
        let ended: jiff::Timestamp = j["ended"].as_str()?.parse().ok()?;
        Some(ended.min(sigterm_at).duration_since(started).as_secs_f64())
    };
    let longest_db = all
        .iter()
        .filter(|j| {
            j["vm"] == "db01"
                && j["state"]
                    .as_str()
                    .is_some_and(|s| s.starts_with("Completed"))
        })
        .filter_map(ran_secs)
        .fold(0.0, f64::max);
    let skipped: Vec<_> = all.iter().filter(|j| j["state"] == "Skipped").collect();
    if longest_db >= 4.0 {
        assert!(
            skipped.iter().any(|j| j["vm"] == "db01"),
            "a db01 job ran {longest_db:.1} s on a 2 s schedule, yet no db01 run was skipped"
        );
    } else {
        eprintln!("no db01 job outlasted two periods ({longest_db:.1} s): no skip was due");
    }
    for j in &skipped {
        assert!(
            j["error"].as_str().unwrap().contains("still running"),
            "{j}"
        );
    }
}

fn refused(dir: &Path, config: &str, want: &str) {
    let file = dir.join("bad.toml");
    std::fs::write(&file, config).unwrap();
    controller_bin(); // built before the clock starts
    let start = Instant::now();
    let out = controller(["serve", "--config", file.to_str().unwrap()]);
    let err = stderr_of(&out);
    assert!(!out.status.success(), "accepted:\n{config}");
    assert!(
        err.contains(want),
        "for\n{config}\nwanted {want:?} in:\n{err}"
    );
    assert!(
        !dir.join("state").exists(),
        "the refused daemon created its state directory"
    );
    assert!(start.elapsed() < Duration::from_secs(20));
}

#[test]
fn bad_configurations_are_refused_before_anything_runs() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    write_random(&d.join("a.img"), 0, 1 << 20, 1);
    let good_vm = format!(
        "[[vm]]\nname = \"web01\"\ndisks = [{{ name = \"os\", path = \"a.img\" }}]\npolicy = {POLICY}\n"
    );
    let head = "vault = \"vault\"\nstate_dir = \"state\"\n";
    refused(d, "vault = \"vault\"\nstate_dir = [\n", "bad.toml:2:");
    refused(
        d,
        &format!("{head}concurrency = 2\nparallel = 3\n{good_vm}"),
        "bad.toml:4: unknown field `parallel`",
    );
    refused(
        d,
        &format!("{head}[[vm]]\nname = \"web01\"\npolicy = {POLICY}\n"),
        "vm web01: no disks",
    );
    refused(
        d,
        &format!("{head}{good_vm}{good_vm}"),
        "a VM of this name is already configured at line 4",
    );
    refused(
        d,
        &format!("{head}{}", good_vm.replace("\"02:00\"", "\"26:00\"")),
        "policy.schedule.times",
    );
    refused(
        d,
        &format!(
            "{head}{}",
            good_vm.replace(
                "frequency = \"daily\", times = [\"02:00\"]",
                "frequency = \"hourly\", every_hours = 5"
            )
        ),
        "policy.schedule.every_hours",
    );
    refused(
        d,
        &format!(
            "{head}{}",
            good_vm.replace("\"UTC\"", "\"Europe/Atlantis\"")
        ),
        "unknown time zone \"Europe/Atlantis\"",
    );
    refused(
        d,
        &format!("{head}{}", good_vm.replace("a.img", "missing.img")),
        "vm web01: disk os:",
    );
    // `serve --check` validates without starting.
    let good = d.join("good.toml");
    std::fs::write(&good, format!("{head}{good_vm}")).unwrap();
    let out = controller(["serve", "--check", "--config", good.to_str().unwrap()]);
    assert!(out.status.success(), "{}", stderr_of(&out));
    assert!(stderr_of(&out).contains("vm web01: 1 disk(s), daily at 02:00"));
    assert!(!d.join("state").exists());
}
