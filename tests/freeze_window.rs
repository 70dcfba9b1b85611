//! The freeze window with the reflink provider does not grow with the disk size (root).
//!
//! A 1 GiB and an 8 GiB ext4 guest (sparse images on a loop-mounted XFS with reflink), the same
//! 256 MiB of data in each, backed up file-system-consistently through the real agent and
//! controller several times. The freeze window (from the agent's `Frozen` reply to its `Thawed`
//! reply, as recorded on the point) is printed per size:
//!
//! ```text
//! cargo test --release --test freeze_window -- --nocapture
//! ```
//!
//! Asserted: every median is under 50 ms, and the 8 GiB median is at most 3× the 1 GiB median
//! (+10 ms of scheduling noise).

#![allow(clippy::unwrap_used)] // test helpers outside #[test] functions

#[path = "agent_common/mod.rs"]
mod agent_common;

use std::path::Path;

use agent_common::*;
use bulwark_tests::*;

const GIB: u64 = 1 << 30;
const RUNS: usize = 7;

fn windows(dir: &Path, size: u64) -> Vec<u64> {
    let guest = Guest::new(dir, size, size + 2 * GIB);
    // The same data in both guests: 64 files of 4 MiB.
    let data = guest.mnt().join("data");
    std::fs::create_dir_all(&data).unwrap();
    for i in 0..64u64 {
        std::fs::write(data.join(format!("f{i}")), pseudo_random(4 << 20, i)).unwrap();
    }
    let config = write_config(
        dir,
        "agent.toml",
        &unix_config(dir, guest.mnt(), "max_timeout_ms = 30000"),
        0o600,
    );
    let agent = AgentProc::start(&config);
    let vault = dir.join("vault");
    let mut out = Vec::new();
    for run in 0..RUNS {
        // A little change between runs, like a live guest.
        write_random(
            &data.join("f0"),
            (run as u64) << 16,
            65536,
            1000 + run as u64,
        );
        let r = backup_json(
            &vault,
            "vm",
            &guest,
            &["--agent", &agent.listen, "--consistency", "file_system"],
        );
        assert_eq!(r["consistency"], "file_system", "{r:#}");
        assert_eq!(r["disks"][0]["snapshot"], "reflink");
        out.push(r["freeze_window_ms"].as_u64().unwrap());
    }
    drop(agent);
    out
}

#[test]
fn freeze_window_does_not_grow_with_disk_size() {
    if !root_or_skip(
        "freeze_window",
        &["mkfs.ext4", "mkfs.xfs", "losetup", "fsfreeze"],
    ) {
        return;
    }
    let mut medians = Vec::new();
    for size in [GIB, 8 * GIB] {
        let tmp = tempfile::tempdir().unwrap();
        let w = windows(tmp.path(), size);
        let m = median(w.clone());
        println!(
            "freeze window, reflink, {} GiB disk: median {m} ms over {RUNS} runs (all: {w:?})",
            size / GIB
        );
        medians.push(m);
    }
    let (small, big) = (medians[0], medians[1]);
    assert!(
        small < 50 && big < 50,
        "medians {medians:?} ms: not under 50 ms"
    );
    assert!(
        big <= 3 * small + 10,
        "the freeze window grew with the disk: 1 GiB {small} ms, 8 GiB {big} ms"
    );
}
