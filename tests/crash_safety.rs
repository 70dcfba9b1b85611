//! A backup process killed with SIGKILL at random moments leaves a vault where `verify`
//! passes, every earlier point restores, and the next backup succeeds.
#![allow(clippy::unwrap_used)] // test helpers outside #[test] functions

use std::os::unix::fs::FileExt;
use std::os::unix::process::ExitStatusExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Instant;

use bulwark_tests::*;

const MIB: u64 = 1 << 20;

#[test]
fn sigkill_during_backup_never_breaks_committed_points() {
    let dir = tempfile::tempdir().unwrap();
    let vault = dir.path().join("vault");
    let vault = vault.to_str().unwrap();
    let img = dir.path().join("disk.img");
    let blocks = 48;
    let f = std::fs::File::create(&img).unwrap();
    for b in 0..blocks {
        f.write_all_at(&pseudo_random(MIB as usize, b), b * MIB)
            .unwrap();
    }
    // The raw image itself, read in place: each round below writes into it.
    let disk = format!("d={}", img.display());
    let backup_args = [
        "backup", "--vault", vault, "--vm", "vm", "--disk", &disk, "--json",
    ];

    // A committed first point, and how long a full backup takes here.
    let t = Instant::now();
    let first = controller_json(backup_args);
    let full = t.elapsed();
    let mut committed = vec![(
        first["point"].as_str().unwrap().to_string(),
        file_digest(&img),
    )];

    // Kill moments spread over the whole duration of a backup, deterministically.
    let mut x: u64 = 0x1234_5678;
    // Rounds whose kill landed mid-backup: the process died of the SIGKILL after it had
    // begun storing blocks and before it committed a point. Without some, this test would
    // check nothing.
    let mut mid_backup = 0;
    for round in 0..8u64 {
        let stored_before = count_files(&Path::new(vault).join("blocks"))
            + count_files(&Path::new(vault).join("staging"));
        let points_before = count_files(&Path::new(vault).join("points"));
        // New data in a third of the blocks, so each backup has real work to do.
        for b in (round % 3..blocks).step_by(3) {
            f.write_all_at(
                &pseudo_random(MIB as usize, 1000 * (round + 1) + b),
                b * MIB,
            )
            .unwrap();
        }
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let delay = full.mul_f64((x % 1000) as f64 / 1000.0 * 1.2);
        let mut child = Command::new(controller_bin())
            .args(backup_args)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        if round % 2 == 0 {
            // Even rounds: kill the moment the backup has stored its first new block, so that
            // some kills surely land between storing and committing (a random moment alone
            // mostly misses that window: most of a small backup is start-up and scanning).
            let deadline = Instant::now() + full * 20 + std::time::Duration::from_secs(30);
            while Instant::now() < deadline && child.try_wait().unwrap().is_none() {
                let stored = count_files(&Path::new(vault).join("blocks"))
                    + count_files(&Path::new(vault).join("staging"));
                if stored > stored_before {
                    break;
                }
                std::thread::sleep(std::time::Duration::from_millis(1));
            }
        } else {
            std::thread::sleep(delay);
        }
        let _ = child.kill(); // SIGKILL; the backup may already have finished
        let out = child.wait_with_output().unwrap();
        let killed = out.status.signal() == Some(9);
        let stored_after = count_files(&Path::new(vault).join("blocks"))
            + count_files(&Path::new(vault).join("staging"));
        let points_after = count_files(&Path::new(vault).join("points"));
        if killed && stored_after > stored_before && points_after == points_before {
            mid_backup += 1;
        }
        if out.status.success() {
            let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
            committed.push((v["point"].as_str().unwrap().to_string(), file_digest(&img)));
        }

        let v = controller(["verify", "--vault", vault]);
        assert!(
            v.status.success(),
            "round {round} (killed after {delay:?}): verify failed:\n{}",
            stdout_of(&v)
        );
        // Every listed point is one we saw committed: none half-written.
        let list = controller_json(["list", "--vault", vault, "--json"]);
        assert!(list["broken"].as_array().unwrap().is_empty(), "{list}");
        for p in list["points"].as_array().unwrap() {
            let id = p["id"].as_str().unwrap();
            // A point whose process was killed after commit but before printing is real too.
            if !committed.iter().any(|(c, _)| c == id) {
                eprintln!("round {round}: point {id} committed just before the kill");
            }
        }
    }

    assert!(
        mid_backup >= 2,
        "only {mid_backup} of 8 kills landed mid-backup (after blocks were stored, before the \
         commit): the test did not exercise a crash"
    );
    eprintln!("{mid_backup} of 8 kills landed mid-backup");

    // Every point we know the content of restores bit-exact.
    for (i, (point, digest)) in committed.iter().enumerate() {
        let to = dir.path().join(format!("r{i}.img"));
        let out = controller([
            "restore",
            "--vault",
            vault,
            "--vm",
            "vm",
            "--point",
            point,
            "--disk",
            "d",
            "--to",
            to.to_str().unwrap(),
        ]);
        assert!(out.status.success(), "{}", stderr_of(&out));
        assert_eq!(&file_digest(&to), digest, "point {point}");
    }
    // And the next backup succeeds and restores.
    let last = controller_json(backup_args);
    let to = dir.path().join("last.img");
    let out = controller([
        "restore",
        "--vault",
        vault,
        "--vm",
        "vm",
        "--point",
        last["point"].as_str().unwrap(),
        "--disk",
        "d",
        "--to",
        to.to_str().unwrap(),
    ]);
    assert!(out.status.success(), "{}", stderr_of(&out));
    assert_eq!(file_digest(&to), file_digest(&img));
}

/// `raw` converted to the qcow2 image `qcow` (`qemu-img convert`); gives `qcow` back.
fn to_qcow2(raw: &Path, qcow: &Path) -> std::path::PathBuf {
    let converted = Command::new("qemu-img")
        .args(["convert", "-q", "-f", "raw", "-O", "qcow2"])
        .arg(raw)
        .arg(qcow)
        .status()
        .unwrap();
    assert!(converted.success(), "qemu-img convert {}", raw.display());
    qcow.to_path_buf()
}

/// Files under `dir`, recursively (0 when it does not exist).
fn count_files(dir: &Path) -> usize {
    std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| {
            let p = e.path();
            if p.is_dir() { count_files(&p) } else { 1 }
        })
        .sum()
}

/// Processes whose command line has an argument containing `needle` (by /proc, this test's own
/// run directory: nothing else can name it).
fn pids_naming(needle: &str) -> Vec<u32> {
    std::fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            let state = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
            let zombie = state
                .rfind(')')
                .is_some_and(|i| state[i + 1..].trim_start().starts_with('Z'));
            !zombie
                && std::fs::read(format!("/proc/{pid}/cmdline")).is_ok_and(|c| {
                    c.split(|b| *b == 0)
                        .any(|a| String::from_utf8_lossy(a).contains(needle))
                })
        })
        .collect()
}

/// Kills (by pid) what a failed check left running: only processes naming the test's own run
/// directory, which only the daemons this test's controllers started do.
struct KillLeftovers(String);

impl Drop for KillLeftovers {
    fn drop(&mut self) {
        for pid in pids_naming(&self.0) {
            let _ = Command::new("kill").args(["-9", &pid.to_string()]).status();
        }
    }
}

/// A controller SIGKILLed while `qemu-storage-daemon` reads its offline qcow2 image (no Drop runs)
/// leaves no daemon behind: the kernel kills it with its parent (parent-death signal). The next
/// backup removes the socket and record that were left, and succeeds.
#[test]
fn sigkill_during_offline_backup_leaves_no_storage_daemon() {
    let test = "sigkill_during_offline_backup_leaves_no_storage_daemon";
    if which("qemu-storage-daemon").is_none() || which("qemu-img").is_none() {
        skip(
            test,
            Needs::Root,
            "needs the `qemu-storage-daemon` and `qemu-img` commands",
        );
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let vault = dir.path().join("vault");
    let vault = vault.to_str().unwrap();
    let run_dir = dir.path().join("run");
    let run_dir_s = run_dir.to_str().unwrap().to_string();
    let _guard = KillLeftovers(run_dir_s.clone());
    let img = dir.path().join("disk.img");
    let f = std::fs::File::create(&img).unwrap();
    for b in 0..128 {
        f.write_all_at(&pseudo_random(MIB as usize, b), b * MIB)
            .unwrap();
    }
    // A qcow2 image: only those go through qemu-storage-daemon (a raw one is read in place).
    let qcow = to_qcow2(&img, &dir.path().join("disk.qcow2"));
    let disk = format!("d={}", qcow.display());
    let backup_args = [
        "backup",
        "--vault",
        vault,
        "--vm",
        "vm",
        "--disk",
        &disk,
        "--snapshot",
        "in-place",
        "--runtime-dir",
        &run_dir_s,
        "--json",
    ];

    let mut daemon = None;
    for attempt in 0..3 {
        let mut child = Command::new(controller_bin())
            .args(backup_args)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        // Wait for the daemon's record (owner pid, start time, daemon pid) and its socket.
        let deadline = Instant::now() + std::time::Duration::from_secs(60);
        let mut found = None;
        while found.is_none() && Instant::now() < deadline && child.try_wait().unwrap().is_none() {
            for e in std::fs::read_dir(&run_dir).into_iter().flatten().flatten() {
                let name = e.file_name().to_string_lossy().into_owned();
                let Some(stem) = name.strip_suffix(".pid") else {
                    continue;
                };
                let text = std::fs::read_to_string(e.path()).unwrap_or_default();
                let fields: Vec<&str> = text.split_whitespace().collect();
                if fields.len() == 3 && run_dir.join(format!("{stem}.sock")).exists() {
                    let pid = fields[2].parse::<u32>().unwrap();
                    // Read while the controller (and so the daemon) surely lives.
                    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
                    let cmdline = String::from_utf8_lossy(&cmdline);
                    assert!(
                        cmdline.contains("qemu-storage-daemon") && cmdline.contains(&run_dir_s),
                        "the record's pid {pid} is not our qemu-storage-daemon: {cmdline:?}"
                    );
                    found = Some(pid);
                }
            }
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        let _ = child.kill(); // SIGKILL
        let status = child.wait().unwrap();
        if let Some(pid) = found
            && status.signal() == Some(9)
        {
            daemon = Some(pid);
            break;
        }
        eprintln!("attempt {attempt}: the backup ended ({status}) before its daemon was seen");
    }
    let daemon = daemon.expect("no backup was killed while its qemu-storage-daemon ran");

    // The daemon dies with the controller (give the kernel and init a moment).
    let deadline = Instant::now() + std::time::Duration::from_secs(5);
    while !pids_naming(&run_dir_s).is_empty() && Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let left = pids_naming(&run_dir_s);
    assert!(
        left.is_empty(),
        "qemu-storage-daemon survived its killed controller: pids {left:?} (daemon {daemon})"
    );
    // What it left: a socket and a record, for the next start to remove.
    let leftovers = count_files(&run_dir);
    assert!(leftovers > 0, "the killed backup left no socket or record?");

    // The next backup succeeds and removes them; nothing of ours stays in the run directory.
    let point = controller_json(backup_args);
    assert!(point["point"].as_str().is_some(), "{point}");
    let names: Vec<String> = std::fs::read_dir(&run_dir)
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    assert!(
        names.is_empty(),
        "left in the run directory after the next backup: {names:?}"
    );
    assert!(pids_naming(&run_dir_s).is_empty());
    let to = dir.path().join("restored.img");
    let out = controller([
        "restore",
        "--vault",
        vault,
        "--vm",
        "vm",
        "--point",
        point["point"].as_str().unwrap(),
        "--disk",
        "d",
        "--to",
        to.to_str().unwrap(),
    ]);
    assert!(out.status.success(), "{}", stderr_of(&out));
    assert_eq!(file_digest(&to), file_digest(&img));
}
