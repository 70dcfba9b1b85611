//! Restore target safety through the CLI: a symbolic link (dangling or not) is refused, with
//! `--force` or `--in-place` too; a regular file is repaired with `--in-place` or replaced with
//! `--force`; a block device is refused without `--in-place` (and `--force` never
//! replaces the node); with `--in-place` an unmounted loop device receives the disk bit-exact
//! (old data in zero blocks overwritten); a mounted one is refused as mounted. The device half
//! needs root (loop devices), and skips visibly without it.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::os::unix::fs::FileTypeExt;
use std::path::Path;
use std::process::Command;

use bulwark_tests::{FsType, LoopFs, TestEnv, root_or_skip, stderr_of, write_random};

const MIB: u64 = 1 << 20;

/// A loop device over `image`, detached on drop.
struct Loop(String);

impl Loop {
    fn attach(image: &Path) -> Loop {
        let out = Command::new("losetup")
            .args(["-f", "--show"])
            .arg(image)
            .output()
            .unwrap();
        assert!(out.status.success(), "losetup: {}", stderr_of(&out));
        Loop(String::from_utf8_lossy(&out.stdout).trim().to_string())
    }
}

impl Drop for Loop {
    fn drop(&mut self) {
        let _ = Command::new("losetup").args(["-d", &self.0]).output();
    }
}

fn setup() -> (TestEnv, std::path::PathBuf, String) {
    let env = TestEnv::new();
    let img = env.path("d.img");
    // Data, then a zero block in the middle, then data.
    write_random(&img, 0, (4 * MIB) as usize, 7);
    std::fs::OpenOptions::new()
        .write(true)
        .open(&img)
        .and_then(|f| {
            use std::os::unix::fs::FileExt;
            f.write_all_at(&vec![0u8; MIB as usize], MIB)
        })
        .unwrap();
    let point = env.backup(
        "vm",
        &[format!("d={}", img.display())],
        &[
            "--snapshot",
            "copy",
            "--snapshot-dir",
            env.path("s").to_str().unwrap(),
        ],
    )["point"]
        .as_str()
        .unwrap()
        .to_string();
    (env, img, point)
}

#[test]
fn symlink_targets_are_refused() {
    let (env, img, point) = setup();
    let real = env.path("real.img");
    std::fs::write(&real, b"keep me").unwrap();
    let link = env.path("link.img");
    std::os::unix::fs::symlink(&real, &link).unwrap();
    let dangling = env.path("dangling.img");
    std::os::unix::fs::symlink(env.path("nowhere.img"), &dangling).unwrap();
    for (to, extra) in [
        (&link, &[][..]),
        (&link, &["--force"][..]),
        (&dangling, &[][..]),
        (&dangling, &["--force"][..]),
        (&link, &["--in-place"][..]),
        (&dangling, &["--in-place"][..]),
    ] {
        let out = env.restore("vm", &point, "d", to, extra);
        assert!(
            !out.status.success(),
            "restore to {} {extra:?} succeeded",
            to.display()
        );
        assert!(
            stderr_of(&out).contains("symbolic link"),
            "{}",
            stderr_of(&out)
        );
        assert!(
            std::fs::symlink_metadata(to)
                .unwrap()
                .file_type()
                .is_symlink()
        );
    }
    assert_eq!(std::fs::read(&real).unwrap(), b"keep me");
    assert!(!env.path("nowhere.img").exists());
    // A regular file (not a link) is repaired block by block with --in-place, or replaced
    // whole with --force.
    let out = env.restore("vm", &point, "d", &real, &["--in-place"]);
    assert!(out.status.success(), "{}", stderr_of(&out));
    assert_eq!(std::fs::read(&real).unwrap(), std::fs::read(&img).unwrap());
    std::fs::write(&real, b"replace me").unwrap();
    let out = env.restore("vm", &point, "d", &real, &["--force"]);
    assert!(out.status.success(), "{}", stderr_of(&out));
    assert_eq!(std::fs::read(&real).unwrap(), std::fs::read(&img).unwrap());
}

#[test]
fn block_devices_only_in_place_and_never_mounted() {
    if !root_or_skip(
        "restore_target::block_devices",
        &["losetup", "mkfs.ext4", "mount"],
    ) {
        return;
    }
    let (env, img, point) = setup();
    let backing = env.path("dev.img");
    write_random(&backing, 0, (5 * MIB) as usize, 99); // old data everywhere
    let dev = Loop::attach(&backing);
    let to = Path::new(&dev.0);
    for extra in [&[][..], &["--force"][..]] {
        let out = env.restore("vm", &point, "d", to, extra);
        assert!(!out.status.success(), "device restore {extra:?} succeeded");
        assert!(
            stderr_of(&out).contains("--in-place"),
            "{}",
            stderr_of(&out)
        );
        assert!(std::fs::metadata(to).unwrap().file_type().is_block_device());
    }
    let out = env.restore("vm", &point, "d", to, &["--in-place"]);
    assert!(out.status.success(), "{}", stderr_of(&out));
    let got = std::fs::read(&backing).unwrap();
    let want = std::fs::read(&img).unwrap();
    assert_eq!(
        &got[..want.len()],
        &want[..],
        "device content after an in-place restore"
    );

    // A mounted device is in use: refused, and its file system untouched.
    let mut fs = LoopFs::create(&env.root, "mounted", 64 * MIB, FsType::Ext4);
    std::fs::write(fs.path().join("f"), b"still here").unwrap();
    let mounted = fs.device().to_string();
    let out = env.restore("vm", &point, "d", Path::new(&mounted), &["--in-place"]);
    assert!(
        !out.status.success(),
        "restore into a mounted device succeeded"
    );
    assert!(stderr_of(&out).contains("mounted"), "{}", stderr_of(&out));
    assert_eq!(std::fs::read(fs.path().join("f")).unwrap(), b"still here");
    fs.unmount();
}
