//! Quiesced backups through the real agent and controller (root): an ext4 guest on a
//! loop-mounted XFS (reflink) datastore, written to throughout the backups.
//!
//! * `file_system`: every restored image is clean (`e2fsck -fn`, no `needs_recovery`), run after
//!   run; the same scenario with `crash` is recorded as crash.
//! * `application`: SQLite in WAL mode, paused and checkpointed by a pre-script; the restored
//!   database passes `integrity_check` and holds every transaction committed before it.
//! * every fallback and its recorded reason: pre-script failing (with and without
//!   continue_on_failure), timing out (killed with its process group), refused for unsafe
//!   ownership/modes, the freeze deadline expiring during the snapshot, the agent absent.

#![allow(clippy::unwrap_used)] // test helpers outside #[test] functions

#[path = "agent_common/mod.rs"]
mod agent_common;

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use agent_common::*;
use bulwark_tests::*;
use serde_json::Value;

const TOOLS: &[&str] = &[
    "mkfs.ext4",
    "mkfs.xfs",
    "losetup",
    "e2fsck",
    "dumpe2fs",
    "fsfreeze",
];

fn guest_and_agent(dir: &Path, extra: &str) -> (Guest, AgentProc) {
    let guest = Guest::new(dir, 128 * MIB, 1024 * MIB);
    let config = write_config(
        dir,
        "agent.toml",
        &unix_config(dir, guest.mnt(), extra),
        0o600,
    );
    let agent = AgentProc::start(&config);
    (guest, agent)
}

fn point_of<'a>(points: &'a [Value], id: &str) -> &'a Value {
    points
        .iter()
        .find(|p| p["id"] == id)
        .unwrap_or_else(|| panic!("point {id} not listed"))
}

#[test]
fn file_system_consistency_under_writes_restores_clean_ext4_every_run() {
    if !root_or_skip("file_system_consistency_under_writes", TOOLS) {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let vault = dir.join("vault");
    let (guest, agent) = guest_and_agent(dir, "max_timeout_ms = 20000");
    let writer = Writer::start(guest.mnt());
    let addr = agent.listen.clone();

    for run in 0..4 {
        let report = backup_json(
            &vault,
            "vm1",
            &guest,
            &["--agent", &addr, "--consistency", "file_system"],
        );
        assert_eq!(
            report["consistency"], "file_system",
            "run {run}: {report:#}"
        );
        assert_eq!(report["consistency_wanted"], "file_system");
        assert_eq!(reasons(&report), "", "run {run}");
        let window = report["freeze_window_ms"].as_u64().expect("freeze window");
        assert!(
            writer.progresses(Duration::from_secs(10)),
            "writer stuck after run {run}"
        );

        let point = report["point"].as_str().unwrap();
        let restored = dir.join(format!("restored-{run}.img"));
        restore(&vault, "vm1", point, &restored);
        let features = ext4_features(&restored);
        assert!(
            !features.contains("needs_recovery"),
            "run {run}: journal recovery pending in a file-system-consistent point: {features}"
        );
        let (ok, out) = e2fsck(&restored);
        assert!(ok, "run {run}: e2fsck -fn failed:\n{out}");
        eprintln!("run {run}: point {point}, freeze window {window} ms, e2fsck clean");
        std::fs::remove_file(&restored).unwrap();
    }

    // The point records the agent; the first contact is flagged once.
    let listed_points = points(&vault, "vm1");
    assert_eq!(listed_points.len(), 4);
    let agents: Vec<&Value> = listed_points.iter().map(|p| &p["agent"]).collect();
    assert_eq!(agents[0]["hostname"], "guest-under-test");
    assert_eq!(agents[0]["agent_version"], env!("CARGO_PKG_VERSION"));
    assert!(
        agents[0]["capabilities"]
            .as_array()
            .unwrap()
            .iter()
            .any(|c| c == "fsfreeze")
    );
    let first: Vec<bool> = agents
        .iter()
        .map(|a| a["first_contact"].as_bool().unwrap())
        .collect();
    assert_eq!(first, [true, false, false, false]);
    assert!(
        listed_points
            .iter()
            .all(|p| p["consistency"]["reached"] == "file_system")
    );

    // Same scenario, crash consistency: recorded as crash, nothing frozen.
    let report = backup_json(
        &vault,
        "vm1",
        &guest,
        &["--agent", &addr, "--consistency", "crash"],
    );
    assert_eq!(report["consistency"], "crash");
    assert_eq!(report["consistency_wanted"], "crash");
    assert!(report.get("freeze_window_ms").is_none_or(Value::is_null));
    let point = report["point"].as_str().unwrap().to_owned();
    let listed = points(&vault, "vm1");
    assert_eq!(point_of(&listed, &point)["consistency"]["reached"], "crash");
    let restored = dir.join("restored-crash.img");
    restore(&vault, "vm1", &point, &restored);
    // A live ext4 keeps needs_recovery set while mounted; only the freeze clears it.
    let features = ext4_features(&restored);
    eprintln!("crash-consistent point under writes: {features}");
    assert!(features.contains("needs_recovery"), "{features}");
    writer.stop();
    assert!(agent.log_text().contains("thawed"));
}

const SQLITE_WRITER: &str = r#"
import os, sqlite3, sys, time
db, log, flag, ack, stop = sys.argv[1:6]
con = sqlite3.connect(db, isolation_level=None, timeout=30)
con.execute("PRAGMA journal_mode=WAL")
con.execute("CREATE TABLE IF NOT EXISTS t(id INTEGER PRIMARY KEY, payload BLOB NOT NULL)")
out = open(log, "a")
i = 0
while not os.path.exists(stop):
    if os.path.exists(flag):
        # Paused by the pre-script: no transaction is open now. Acknowledge, wait for the resume.
        open(ack, "w").close()
        while os.path.exists(flag) and not os.path.exists(stop):
            time.sleep(0.002)
        if os.path.exists(ack):
            os.unlink(ack)
        continue
    i += 1
    con.execute("BEGIN IMMEDIATE")
    con.execute("INSERT INTO t VALUES (?, ?)", (i, os.urandom(1500)))
    if i % 3 == 0:
        con.execute("UPDATE t SET payload = ? WHERE id = ?", (os.urandom(800), i // 2))
    con.execute("COMMIT")
    out.write(f"{i}\n")
    out.flush()
"#;

const PRE_SCRIPT: &str = r#"#!/bin/sh
# Pause the writer, checkpoint the WAL into the database, record what was committed.
set -e
db=$1 log=$2 flag=$3 ack=$4 mark=$5
: > "$flag"
n=0
while [ ! -e "$ack" ]; do
    n=$((n + 1))
    if [ "$n" -gt 2000 ]; then echo "the writer did not pause" >&2; exit 1; fi
    sleep 0.005
done
result=$(sqlite3 "$db" "PRAGMA wal_checkpoint(TRUNCATE);")
case "$result" in
    0\|*) ;;
    *) echo "checkpoint busy: $result" >&2; exit 1 ;;
esac
cp "$log" "$mark"
echo "paused and checkpointed: $result"
"#;

const POST_SCRIPT: &str = "#!/bin/sh\nrm -f \"$1\"\necho resumed\n";

const CHECK_DB: &str = r#"
import json, sqlite3, sys
con = sqlite3.connect(sys.argv[1])
ic = con.execute("PRAGMA integrity_check").fetchall()
ids = [r[0] for r in con.execute("SELECT id FROM t ORDER BY id")]
print(json.dumps({"integrity": [r[0] for r in ic], "ids": ids, "mode": con.execute("PRAGMA journal_mode").fetchone()[0]}))
"#;

#[test]
fn application_consistency_sqlite_wal_holds_every_commit_before_the_pre_script() {
    if !root_or_skip(
        "application_consistency_sqlite",
        &[TOOLS, &["python3", "sqlite3"]].concat(),
    ) {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let vault = dir.join("vault");
    let guest = Guest::new(dir, 128 * MIB, 1024 * MIB);
    let db = guest.mnt().join("app.db");
    let (log, flag, ack, mark, stop) = (
        dir.join("committed.log"),
        dir.join("pause.flag"),
        dir.join("pause.ack"),
        dir.join("committed-before-pre.log"),
        dir.join("stop"),
    );
    write_script(&dir.join("pre.sh"), PRE_SCRIPT, 0o755);
    write_script(&dir.join("post.sh"), POST_SCRIPT, 0o755);
    let p = |x: &Path| format!("{:?}", x.display().to_string());
    let extra = format!(
        "max_timeout_ms = 20000\n[scripts]\ncontinue_on_failure = false\n\
         [[scripts.pre]]\npath = {}\nparams = [{}, {}, {}, {}, {}]\ntimeout = 30\n\
         [[scripts.post]]\npath = {}\nparams = [{}]\ntimeout = 30\n",
        p(&dir.join("pre.sh")),
        p(&db),
        p(&log),
        p(&flag),
        p(&ack),
        p(&mark),
        p(&dir.join("post.sh")),
        p(&flag),
    );
    let config = write_config(
        dir,
        "agent.toml",
        &unix_config(dir, guest.mnt(), &extra),
        0o600,
    );
    let agent = AgentProc::start(&config);
    std::fs::write(dir.join("writer.py"), SQLITE_WRITER).unwrap();
    let mut writer = Command::new("python3")
        .arg(dir.join("writer.py"))
        .args([&db, &log, &flag, &ack, &stop])
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    struct Stop<'a>(&'a Path, &'a mut std::process::Child);
    impl Drop for Stop<'_> {
        fn drop(&mut self) {
            let _ = std::fs::write(self.0, "");
            let _ = self.1.wait();
        }
    }
    let writer = Stop(&stop, &mut writer);
    let start = Instant::now();
    while std::fs::read_to_string(&log)
        .unwrap_or_default()
        .lines()
        .count()
        < 200
    {
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "the writer does not commit"
        );
        std::thread::sleep(Duration::from_millis(20));
    }

    for run in 0..3 {
        let report = backup_json(&vault, "db", &guest, &["--agent", &agent.listen]);
        assert_eq!(report["consistency_wanted"], "application", "{report:#}");
        assert_eq!(
            report["consistency"], "application",
            "run {run}: {report:#}"
        );
        let committed_before: Vec<u64> = std::fs::read_to_string(&mark)
            .unwrap()
            .lines()
            .map(|l| l.parse().unwrap())
            .collect();
        assert!(!committed_before.is_empty());

        let restored = dir.join("restored.img");
        let _ = std::fs::remove_file(&restored);
        restore(&vault, "db", report["point"].as_str().unwrap(), &restored);
        assert!(!ext4_features(&restored).contains("needs_recovery"));
        let (ok, out) = e2fsck(&restored);
        assert!(ok, "e2fsck: {out}");
        let check = {
            let rmnt = dir.join("rmnt");
            let fs = LoopFs::mount_image(&restored, &rmnt);
            let copy = dir.join("check");
            let _ = std::fs::remove_dir_all(&copy);
            std::fs::create_dir_all(&copy).unwrap();
            for name in ["app.db", "app.db-wal"] {
                if fs.path().join(name).exists() {
                    std::fs::copy(fs.path().join(name), copy.join(name)).unwrap();
                }
            }
            drop(fs);
            let out = Command::new("python3")
                .arg("-c")
                .arg(CHECK_DB)
                .arg(copy.join("app.db"))
                .output()
                .unwrap();
            assert!(out.status.success(), "check: {}", stderr_of(&out));
            serde_json::from_slice::<Value>(&out.stdout).unwrap()
        };
        assert_eq!(check["integrity"], serde_json::json!(["ok"]), "{check}");
        assert_eq!(check["mode"], "wal");
        let ids: std::collections::BTreeSet<u64> = check["ids"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_u64().unwrap())
            .collect();
        let missing: Vec<_> = committed_before
            .iter()
            .filter(|i| !ids.contains(i))
            .collect();
        assert!(
            missing.is_empty(),
            "run {run}: {} committed transactions missing from the restore, e.g. {:?}",
            missing.len(),
            &missing[..missing.len().min(5)]
        );
        eprintln!(
            "run {run}: {} transactions committed before the pre-script, {} in the restore, freeze {} ms",
            committed_before.len(),
            ids.len(),
            report["freeze_window_ms"]
        );
        // The writer was resumed by the post-script.
        let n = std::fs::read_to_string(&log).unwrap().lines().count();
        let t = Instant::now();
        while std::fs::read_to_string(&log).unwrap().lines().count() <= n + 10 {
            assert!(t.elapsed() < Duration::from_secs(20), "writer not resumed");
            std::thread::sleep(Duration::from_millis(10));
        }
    }
    drop(writer);
    drop(agent);
}

fn fallback_case(
    extra: &str,
    scripts: &[(&str, &str, u32)],
    args: &[&str],
) -> (Value, tempfile::TempDir) {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().to_owned();
    for (name, body, mode) in scripts {
        write_script(&dir.join(name), body, *mode);
    }
    let extra = extra.replace("$DIR", dir.to_str().unwrap());
    let (guest, agent) = guest_and_agent(&dir, &extra);
    let mut all = vec!["--agent", agent.listen.as_str()];
    all.extend_from_slice(args);
    let out = backup(&dir.join("vault"), "vm", &guest, &all);
    let v = if out.status.success() {
        serde_json::from_slice(&out.stdout).unwrap()
    } else {
        serde_json::json!({"failed": true, "stderr": stderr_of(&out), "points": points(&dir.join("vault"), "vm").len()})
    };
    drop(agent);
    drop(guest);
    (v, tmp)
}

const FAILING: &str = "#!/bin/sh\necho 'cannot flush the tables' >&2\nexit 3\n";
const POST_MARK: &str = "#!/bin/sh\ndate > \"$0.ran\"\n";

#[test]
fn pre_script_failure_with_continue_on_failure_falls_back_to_file_system() {
    if !root_or_skip("pre_script_failure_continue", TOOLS) {
        return;
    }
    let extra = "[scripts]\ncontinue_on_failure = true\n[[scripts.pre]]\npath = \"$DIR/pre.sh\"\n[[scripts.post]]\npath = \"$DIR/post.sh\"\n";
    let (r, tmp) = fallback_case(
        extra,
        &[("pre.sh", FAILING, 0o755), ("post.sh", POST_MARK, 0o755)],
        &["--consistency", "application"],
    );
    assert_eq!(r["consistency"], "file_system", "{r:#}");
    let why = reasons(&r);
    assert!(why.contains("exited with status 3"), "{why}");
    // The script's output stays on the agent (logged, bounded): it never reaches the point,
    // which an unencrypted vault stores in plaintext.
    assert!(!why.contains("cannot flush the tables"), "{why}");
    assert!(
        why.contains("continue_on_failure is set: falling back to file_system"),
        "{why}"
    );
    assert!(r["freeze_window_ms"].as_u64().is_some());
    assert!(
        tmp.path().join("post.sh.ran").exists(),
        "post-script did not run"
    );
}

#[test]
fn pre_script_failure_without_continue_on_failure_fails_the_job() {
    if !root_or_skip("pre_script_failure_stop", TOOLS) {
        return;
    }
    let extra = "[scripts]\n[[scripts.pre]]\npath = \"$DIR/pre.sh\"\n[[scripts.post]]\npath = \"$DIR/post.sh\"\n";
    let (r, tmp) = fallback_case(
        extra,
        &[("pre.sh", FAILING, 0o755), ("post.sh", POST_MARK, 0o755)],
        &["--consistency", "application"],
    );
    assert_eq!(r["failed"], true, "{r:#}");
    let err = r["stderr"].as_str().unwrap();
    assert!(err.contains("pre-scripts failed"), "{err}");
    assert!(err.contains("exited with status 3"), "{err}");
    assert!(err.contains("continue_on_failure is not set"), "{err}");
    assert_eq!(r["points"], 0, "a point was committed");
    // The application is resumed even so.
    assert!(tmp.path().join("post.sh.ran").exists());
}

#[test]
fn pre_script_timeout_kills_it_and_falls_back() {
    if !root_or_skip("pre_script_timeout", TOOLS) {
        return;
    }
    // The script starts a child and hangs; both must die at the timeout.
    let hang = "#!/bin/sh\nsleep 300 &\necho $! > \"$0.child\"\nsleep 300\n";
    let extra = "[scripts]\ncontinue_on_failure = true\n[[scripts.pre]]\npath = \"$DIR/hang.sh\"\ntimeout = 0.5\n";
    let started = Instant::now();
    let (r, tmp) = fallback_case(
        extra,
        &[("hang.sh", hang, 0o755)],
        &["--consistency", "application"],
    );
    assert!(started.elapsed() < Duration::from_secs(60));
    assert_eq!(r["consistency"], "file_system", "{r:#}");
    let why = reasons(&r);
    assert!(why.contains("timed out"), "{why}");
    assert!(why.contains("killed with its process group"), "{why}");
    let child: i32 = std::fs::read_to_string(tmp.path().join("hang.sh.child"))
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    let t = Instant::now();
    loop {
        let status = std::fs::read_to_string(format!("/proc/{child}/stat")).unwrap_or_default();
        // Gone, or a zombie waiting for its (new) parent to reap it.
        if status.is_empty() || status.split_whitespace().nth(2) == Some("Z") {
            break;
        }
        assert!(
            t.elapsed() < Duration::from_secs(5),
            "the script's child {child} survived"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn scripts_with_unsafe_modes_are_refused() {
    if !root_or_skip("scripts_unsafe_modes", TOOLS) {
        return;
    }
    let ran = "#!/bin/sh\ndate > \"$0.ran\"\n";
    let extra = "[scripts]\n[[scripts.pre]]\npath = \"$DIR/pre.sh\"\n";
    // A group-writable script.
    let (r, tmp) = fallback_case(
        extra,
        &[("pre.sh", ran, 0o775)],
        &["--consistency", "application"],
    );
    assert_eq!(r["consistency"], "file_system", "{r:#}");
    let why = reasons(&r);
    assert!(why.contains("refused"), "{why}");
    assert!(why.contains("writable by group"), "{why}");
    assert!(
        !tmp.path().join("pre.sh.ran").exists(),
        "a refused script ran"
    );

    // A world-writable configuration file refuses every script.
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    write_script(&dir.join("pre.sh"), ran, 0o755);
    let guest = Guest::new(dir, 64 * MIB, 512 * MIB);
    let text = unix_config(
        dir,
        guest.mnt(),
        &extra.replace("$DIR", dir.to_str().unwrap()),
    );
    let config = write_config(dir, "agent.toml", &text, 0o646);
    let agent = AgentProc::start(&config);
    let r = backup_json(
        &dir.join("vault"),
        "vm",
        &guest,
        &["--agent", &agent.listen, "--consistency", "application"],
    );
    assert_eq!(r["consistency"], "file_system", "{r:#}");
    let why = reasons(&r);
    assert!(why.contains("configuration file"), "{why}");
    assert!(why.contains("writable by others"), "{why}");
    assert!(!dir.join("pre.sh.ran").exists());
    // Default level: the agent no longer offers application.
    let r = backup_json(
        &dir.join("vault"),
        "vm",
        &guest,
        &["--agent", &agent.listen],
    );
    assert_eq!(r["consistency_wanted"], "file_system");
}

#[test]
fn freeze_deadline_expiring_during_the_snapshot_downgrades_to_crash() {
    if !root_or_skip("freeze_deadline_expires", TOOLS) {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let (guest, agent) = guest_and_agent(dir, "max_timeout_ms = 300");
    let writer = Writer::start(guest.mnt());
    let vault = dir.join("vault");
    let slow = [
        "--agent",
        agent.listen.as_str(),
        "--consistency",
        "file_system",
        "--test-snapshot-delay-ms",
        "1500",
    ];
    let r = backup_json(&vault, "vm", &guest, &slow);
    assert_eq!(r["consistency"], "crash", "{r:#}");
    assert_eq!(r["consistency_wanted"], "file_system");
    let why = reasons(&r);
    assert!(why.contains("not held continuously"), "{why}");
    assert!(
        why.contains("watchdog thawed at the 300ms deadline"),
        "{why}"
    );
    assert!(writer.progresses(Duration::from_secs(5)));
    // With a minimum of file_system the same job fails and commits nothing.
    let mut strict = slow.to_vec();
    strict.extend(["--min-consistency", "file_system"]);
    let out = backup(&vault, "vm", &guest, &strict);
    assert!(!out.status.success());
    let err = stderr_of(&out);
    assert!(
        err.contains("below the policy's minimum file_system"),
        "{err}"
    );
    assert_eq!(points(&vault, "vm").len(), 1);
    writer.stop();
}

#[test]
fn absent_agent_falls_back_to_crash_or_fails_below_the_minimum() {
    if !root_or_skip("absent_agent", TOOLS) {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let guest = Guest::new(dir, 64 * MIB, 512 * MIB);
    let vault = dir.join("vault");
    let sock = format!("unix:{}", dir.join("nobody.sock").display());
    let r = backup_json(
        &vault,
        "vm",
        &guest,
        &["--agent", &sock, "--consistency", "file_system"],
    );
    assert_eq!(r["consistency"], "crash", "{r:#}");
    let why = reasons(&r);
    assert!(why.contains("agent unreachable"), "{why}");
    assert!(why.contains("nobody.sock"), "{why}");
    let out = backup(
        &vault,
        "vm",
        &guest,
        &["--agent", &sock, "--min-consistency", "file_system"],
    );
    assert!(!out.status.success());
    assert!(
        stderr_of(&out).contains("agent unreachable"),
        "{}",
        stderr_of(&out)
    );
    assert_eq!(points(&vault, "vm").len(), 1);
}
