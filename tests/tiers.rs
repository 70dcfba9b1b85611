//! Two tiers through the real CLI: a backup that keeps its snapshots lists as "snapshot and
//! vault" and restores through the fast path, bit-exact; a corrupted kept snapshot is caught by
//! the verification and the disk comes from the vault instead — never wrong bytes; a point whose
//! transfer never finished lists as "snapshot".

// Test helpers, like the tests themselves, panic on failure.
#![allow(clippy::unwrap_used)]

use std::os::unix::fs::FileExt;
use std::path::PathBuf;

use bulwark_tests::{TestEnv, controller, controller_json, file_digest, stderr_of, write_random};
use serde_json::Value;

struct Setup {
    env: TestEnv,
    snaps: PathBuf,
    image: PathBuf,
}

impl std::ops::Deref for Setup {
    type Target = TestEnv;
    fn deref(&self) -> &TestEnv {
        &self.env
    }
}

fn setup() -> Setup {
    let env = TestEnv::new();
    let image = env.path("os.img");
    // Data, a hole in the middle, more data: zero blocks are verified too.
    write_random(&image, 0, 3 << 20, 7);
    write_random(&image, 8 << 20, (2 << 20) + 4321, 8);
    Setup {
        snaps: env.path("snaps"),
        image,
        env,
    }
}

fn backup(s: &Setup, keep: bool) -> Value {
    let snaps = s.snaps.display().to_string();
    let mut extra = vec!["--snapshot-dir", &snaps];
    if keep {
        extra.extend(["--keep-snapshot-days", "2"]);
    }
    s.env
        .backup("web01", &[format!("os={}", s.image.display())], &extra)
}

fn tiers(s: &Setup) -> Vec<(String, String)> {
    let v = controller_json([
        "list",
        "--vault",
        &s.vault,
        "--snapshot-dir",
        s.snaps.to_str().unwrap(),
        "--json",
    ]);
    v["points"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| {
            (
                p["id"].as_str().unwrap().to_string(),
                p["tier"].as_str().unwrap().to_string(),
            )
        })
        .collect()
}

fn restore(s: &Setup, point: &str, to: &str) -> Value {
    controller_json([
        "restore",
        "--vault",
        &s.vault,
        "--vm",
        "web01",
        "--point",
        point,
        "--disk",
        "os",
        "--to",
        s.root.join(to).to_str().unwrap(),
        "--snapshot-dir",
        s.snaps.to_str().unwrap(),
        "--json",
    ])
}

#[test]
fn kept_snapshot_fast_path_and_tiers() {
    let s = setup();
    let want = file_digest(&s.image);
    // Default backup: the snapshot is removed after the transfer ("vault").
    let plain = backup(&s, false)["point"].as_str().unwrap().to_string();
    // Kept for instant restore ("snapshot and vault").
    let kept = backup(&s, true)["point"].as_str().unwrap().to_string();
    assert_eq!(
        tiers(&s),
        [
            (plain.clone(), "vault".to_string()),
            (kept.clone(), "snapshot and vault".to_string())
        ]
    );
    // The live image changes afterwards; restores give the point's bytes.
    write_random(&s.image, 1 << 20, 4096, 99);

    let r = restore(&s, &kept, "fast.img");
    assert_eq!(r["source"], "snapshot", "{r}");
    assert_eq!(r["verified"], true);
    assert!(r.get("snapshot_rejected").is_none());
    assert_eq!(file_digest(&s.root.join("fast.img")), want);

    let r = restore(&s, &plain, "vault.img");
    assert_eq!(r["source"], "vault");
    assert_eq!(file_digest(&s.root.join("vault.img")), want);

    // Text output says which path was taken.
    let out = controller([
        "restore",
        "--vault",
        &s.vault,
        "--vm",
        "web01",
        "--point",
        &kept,
        "--disk",
        "os",
        "--to",
        s.root.join("text.img").to_str().unwrap(),
        "--snapshot-dir",
        s.snaps.to_str().unwrap(),
    ]);
    assert!(out.status.success());
    assert!(
        stderr_of(&out).contains("from the kept snapshot (fast path), every block verified"),
        "{}",
        stderr_of(&out)
    );
}

#[test]
fn corrupted_kept_snapshot_falls_back_to_the_vault() {
    let s = setup();
    let want = file_digest(&s.image);
    let point = backup(&s, true)["point"].as_str().unwrap().to_string();
    let index: Value = serde_json::from_slice(
        &std::fs::read(s.snaps.join("web01").join(format!("{point}.json"))).unwrap(),
    )
    .unwrap();
    let snap = PathBuf::from(index["disks"][0]["path"].as_str().unwrap());
    // Snapshots are read-only (0400); make it writable so that this also works without root.
    std::fs::set_permissions(&snap, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();

    // One flipped byte in a data block (block 2).
    let f = std::fs::OpenOptions::new().write(true).open(&snap).unwrap();
    let mut b = [0u8; 1];
    std::fs::File::open(&snap)
        .unwrap()
        .read_exact_at(&mut b, (2 << 20) + 17)
        .unwrap();
    f.write_all_at(&[b[0] ^ 0x40], (2 << 20) + 17).unwrap();
    drop(f);
    let r = restore(&s, &point, "a.img");
    assert_eq!(r["source"], "vault", "{r}");
    assert!(
        r["snapshot_rejected"]
            .as_str()
            .unwrap()
            .contains("block 2 (offset 2097152) differs"),
        "{r}"
    );
    assert_eq!(file_digest(&s.root.join("a.img")), want);

    // Data written into a hole (a zero block) is caught too.
    let f = std::fs::OpenOptions::new().write(true).open(&snap).unwrap();
    f.write_all_at(&[b[0]], (2 << 20) + 17).unwrap(); // block 2 repaired
    f.write_all_at(b"tampered", 5 << 20).unwrap();
    drop(f);
    let r = restore(&s, &point, "b.img");
    assert_eq!(r["source"], "vault", "{r}");
    assert!(r["snapshot_rejected"].as_str().unwrap().contains("block 5"));
    assert_eq!(file_digest(&s.root.join("b.img")), want);

    // A truncated snapshot is rejected by its size.
    std::fs::OpenOptions::new()
        .write(true)
        .open(&snap)
        .unwrap()
        .set_len(1 << 20)
        .unwrap();
    let r = restore(&s, &point, "c.img");
    assert_eq!(r["source"], "vault");
    assert!(r["snapshot_rejected"].as_str().unwrap().contains("size"));
    assert_eq!(file_digest(&s.root.join("c.img")), want);
    // No partial files are left behind.
    let leftovers: Vec<_> = std::fs::read_dir(&s.root)
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().contains("partial"))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
}

/// Records a kept point `id` (state `state`) whose disk `os` is the snapshot file `path`,
/// from the index of the kept point `from`.
fn forge_index(s: &Setup, from: &str, id: &str, state: &str, path: &std::path::Path) {
    let dir = s.snaps.join("web01");
    let mut index: Value =
        serde_json::from_slice(&std::fs::read(dir.join(format!("{from}.json"))).unwrap()).unwrap();
    index["point"] = id.into();
    index["state"] = state.into();
    index["disks"][0]["path"] = path.to_str().unwrap().into();
    std::fs::write(
        dir.join(format!("{id}.json")),
        serde_json::to_vec(&index).unwrap(),
    )
    .unwrap();
}

fn kept_path(s: &Setup, point: &str) -> PathBuf {
    let index: Value = serde_json::from_slice(
        &std::fs::read(s.snaps.join("web01").join(format!("{point}.json"))).unwrap(),
    )
    .unwrap();
    PathBuf::from(index["disks"][0]["path"].as_str().unwrap())
}

fn restore_out(s: &Setup, point: &str, to: &str, extra: &[&str]) -> std::process::Output {
    let to = s.root.join(to);
    let mut args = vec![
        "restore",
        "--vault",
        &s.vault,
        "--vm",
        "web01",
        "--point",
        point,
        "--disk",
        "os",
        "--to",
        to.to_str().unwrap(),
        "--snapshot-dir",
        s.snaps.to_str().unwrap(),
        "--json",
    ];
    args.extend_from_slice(extra);
    controller(args)
}

#[test]
fn snapshot_only_point_lists_as_snapshot_and_restores_only_when_trusted() {
    let s = setup();
    let want = file_digest(&s.image);
    let point = backup(&s, true)["point"].as_str().unwrap().to_string();
    // Make it look like a job whose transfer never finished: the index says so, and the
    // point is not in the vault (a kept point under another id).
    let pending = "20991231T000000.000Z-abcdef";
    forge_index(
        &s,
        &point,
        pending,
        "transfer_pending",
        &kept_path(&s, &point),
    );
    let t = tiers(&s);
    assert!(
        t.contains(&(pending.to_string(), "snapshot".to_string())),
        "{t:?}"
    );
    // Nothing to verify it against: refused, nothing written.
    let out = restore_out(&s, pending, "refused.img", &[]);
    assert!(!out.status.success());
    assert!(
        stderr_of(&out).contains("--trust-unverified-snapshot"),
        "{}",
        stderr_of(&out)
    );
    assert!(!s.root.join("refused.img").exists());
    // Only when the operator says so, and then it says it is not verified.
    let out = restore_out(&s, pending, "p.img", &["--trust-unverified-snapshot"]);
    assert!(out.status.success(), "{}", stderr_of(&out));
    let r: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(r["source"], "snapshot");
    assert_eq!(r["verified"], false);
    assert_eq!(file_digest(&s.root.join("p.img")), want);
}

#[test]
fn kept_snapshots_are_trusted_only_inside_the_snapshot_directory() {
    let s = setup();
    let want = file_digest(&s.image);
    let point = backup(&s, true)["point"].as_str().unwrap().to_string();
    let inside = kept_path(&s, &point);
    // A file with the very same bytes outside the snapshot directory, and a symbolic link
    // to it inside: neither is read, even for a point the vault can verify.
    let outside = s.root.join("elsewhere.img");
    std::fs::copy(&inside, &outside).unwrap();
    let link = s.snaps.join("web01").join("link.snap");
    std::os::unix::fs::symlink(&outside, &link).unwrap();
    let dotdot = s
        .snaps
        .join("web01")
        .join("..")
        .join("..")
        .join("elsewhere.img");
    for (n, path) in [&outside, &link, &dotdot].into_iter().enumerate() {
        // Index the real point with its disk at `path`.
        let dir = s.snaps.join("web01");
        let index_file = dir.join(format!("{point}.json"));
        let mut index: Value =
            serde_json::from_slice(&std::fs::read(&index_file).unwrap()).unwrap();
        index["disks"][0]["path"] = path.to_str().unwrap().into();
        std::fs::write(&index_file, serde_json::to_vec(&index).unwrap()).unwrap();
        let to = format!("r{n}.img");
        let r = restore(&s, &point, &to);
        assert_eq!(r["source"], "vault", "{}: {r}", path.display());
        let why = r["snapshot_rejected"].as_str().unwrap_or_default();
        assert!(why.contains("not trusted"), "{}: {why}", path.display());
        assert_eq!(file_digest(&s.root.join(&to)), want);

        // A point only on the host, indexed there: refused even with the flag.
        let pending = format!("20991231T000000.000Z-00000{n}");
        forge_index(&s, &point, &pending, "transfer_pending", path);
        let out = restore_out(
            &s,
            &pending,
            &format!("u{n}.img"),
            &["--trust-unverified-snapshot"],
        );
        assert!(!out.status.success(), "{}", path.display());
        assert!(
            stderr_of(&out).contains("not trusted"),
            "{}",
            stderr_of(&out)
        );
        assert!(!s.root.join(format!("u{n}.img")).exists());
    }
}

#[test]
fn keep_snapshot_days_needs_a_snapshot_dir() {
    let s = setup();
    let out = controller([
        "backup",
        "--vault",
        &s.vault,
        "--vm",
        "web01",
        "--disk",
        s.image.to_str().unwrap(),
        "--keep-snapshot-days",
        "2",
    ]);
    assert!(!out.status.success());
    assert!(
        stderr_of(&out).contains("--snapshot-dir"),
        "{}",
        stderr_of(&out)
    );
}
