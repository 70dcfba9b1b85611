//! The scheduled daemon quiesces a VM through its real guest agent (root): an ext4 guest on an
//! XFS reflink datastore, the agent on a Unix socket freezing the guest's mount, a writer
//! going on throughout. The scheduled jobs reach file-system consistency, record the agent on
//! the point, and restore to images that need no journal recovery.
#![allow(clippy::unwrap_used)] // test helpers outside #[test] functions

#[path = "agent_common/mod.rs"]
mod agent_common;

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use agent_common::*;
use bulwark_tests::*;
use serde_json::Value;

struct Daemon(Child);

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn jobs(state: &std::path::Path) -> Vec<Value> {
    let out = controller(["jobs", "--state-dir", state.to_str().unwrap(), "--json"]);
    if !out.status.success() {
        return Vec::new();
    }
    let v: Value = serde_json::from_slice(&out.stdout).unwrap_or(Value::Null);
    v["jobs"].as_array().cloned().unwrap_or_default()
}

#[test]
fn scheduled_jobs_are_quiesced_through_the_agent() {
    if !root_or_skip(
        "scheduled_jobs_are_quiesced_through_the_agent",
        &["mkfs.xfs", "mkfs.ext4", "e2fsck", "dumpe2fs"],
    ) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let guest = Guest::new(dir.path(), 64 * MIB, 512 * MIB);
    std::fs::write(guest.mnt().join("hello.txt"), "before the first backup\n").unwrap();
    let agent_cfg = write_config(
        dir.path(),
        "agent.toml",
        &unix_config(dir.path(), guest.mnt(), ""),
        0o600,
    );
    let agent = AgentProc::start(&agent_cfg);
    let writer = Writer::start(guest.mnt());

    let state = dir.path().join("state");
    let vault = dir.path().join("vault");
    let config = dir.path().join("controller.toml");
    std::fs::write(
        &config,
        format!(
            r#"vault = "{vault}"
state_dir = "{state}"
snapshot_dir = "{snaps}"
snapshot_provider = "reflink"
concurrency = 1

[[vm]]
name = "guest"
disks = [{{ name = "guest", path = "{image}" }}]
agent = "{agent}"
schedule_override_seconds = 2
policy = {{ time_zone = "UTC", schedule = {{ frequency = "daily", times = ["02:00"] }}, retention = {{ daily = 7 }}, consistency = {{ wanted = "file_system", minimum = "file_system" }} }}
"#,
            vault = vault.display(),
            state = state.display(),
            snaps = guest.ds.path().join("snapshots").display(),
            image = guest.image().display(),
            agent = agent.listen,
        ),
    )
    .unwrap();
    let log = std::fs::File::create(dir.path().join("serve.log")).unwrap();
    let daemon = Daemon(
        Command::new(controller_bin())
            .args(["serve", "--config"])
            .arg(&config)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap(),
    );

    // Two completed, quiesced jobs (bounded wait).
    let start = Instant::now();
    let done = loop {
        let done: Vec<Value> = jobs(&state)
            .into_iter()
            .filter(|j| j["state"] == "Completed")
            .collect();
        if done.len() >= 2 {
            break done;
        }
        assert!(
            start.elapsed() < Duration::from_secs(90),
            "no two completed jobs in 90 s: {:?}\n{}",
            jobs(&state),
            std::fs::read_to_string(dir.path().join("serve.log")).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(200));
    };
    drop(daemon);
    assert!(
        writer.progresses(Duration::from_secs(10)),
        "the guest is thawed after the jobs"
    );
    writer.stop();
    for j in &done {
        assert_eq!(j["consistency"], "file_system", "{j}");
    }

    let list = controller_json([
        "list",
        "--vault",
        vault.to_str().unwrap(),
        "--vm",
        "guest",
        "--json",
    ]);
    let points = list["points"].as_array().unwrap();
    // Retention (daily = 7 keeps the newest point of each day) soft-deletes the older ones.
    assert!(!points.is_empty(), "{list}");
    for p in points {
        assert_eq!(p["consistency"]["reached"], "file_system", "{p}");
        assert_eq!(p["consistency"]["wanted"], "file_system", "{p}");
        assert!(p["consistency"]["freeze_window_ms"].is_u64(), "{p}");
        assert_eq!(p["agent"]["hostname"], "guest-under-test", "{p}");
    }
    // Its quiesced snapshot is kept on the host for instant restore.
    let snaps = guest.ds.path().join("snapshots");
    let tiers = controller_json([
        "list",
        "--vault",
        vault.to_str().unwrap(),
        "--vm",
        "guest",
        "--snapshot-dir",
        snaps.to_str().unwrap(),
        "--json",
    ]);
    // Snapshot-only entries (kept snapshots of points retention just soft-deleted) are
    // listed too: look up the newest live point by its id.
    let newest = points.last().unwrap()["id"].clone();
    let latest = tiers["points"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["id"] == newest)
        .unwrap_or_else(|| panic!("{newest} not in {tiers}"));
    assert_eq!(latest["tier"], "snapshot and vault", "{tiers}");
    // The latest point restores to a clean file system: no journal recovery pending.
    let to = dir.path().join("restored.img");
    restore(&vault, "guest", "latest", &to);
    let (clean, out) = e2fsck(&to);
    assert!(clean, "{out}");
    assert!(
        !ext4_features(&to).contains("needs_recovery"),
        "{}",
        ext4_features(&to)
    );
    drop(agent);
}
