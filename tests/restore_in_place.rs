//! `restore --in-place`: a restored image is damaged in a few known blocks (garbage in data
//! blocks, one write across a block boundary, data in a zero block, a data block zeroed, and
//! the file grown); the in-place restore must read the whole target, write exactly the damaged
//! blocks, and leave it bit-exact; a second run writes nothing. As root the same runs onto a
//! loop device, and a loop device with a mounted file system is refused.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::os::unix::fs::FileExt;
use std::path::Path;

use bulwark_tests::{FsType, LoopFs, TestEnv, file_digest, root_or_skip, run, stderr_of};

const KIB: u64 = 1024;
const MIB: u64 = 1 << 20;
const BS: u64 = 64 * KIB;
const SIZE: u64 = 16 * MIB;

fn random_bytes(len: u64) -> Vec<u8> {
    let mut v = Vec::new();
    std::io::Read::read_to_end(
        &mut std::io::Read::take(std::fs::File::open("/dev/urandom").unwrap(), len),
        &mut v,
    )
    .unwrap();
    v
}

/// Damages `target` (a restored copy of the disk); returns the number of blocks damaged.
fn damage(target: &Path) -> u64 {
    let f = std::fs::File::options().write(true).open(target).unwrap();
    // Garbage inside data block 3 and block 40.
    f.write_all_at(&random_bytes(100), 3 * BS + 17).unwrap();
    f.write_all_at(&random_bytes(4096), 40 * BS).unwrap();
    // Across the boundary of blocks 10 and 11.
    f.write_all_at(&random_bytes(8192), 11 * BS - 4096).unwrap();
    // Data in a zero block (block 100 is in the hole, see `make_disk`).
    f.write_all_at(&random_bytes(512), 100 * BS + 1000).unwrap();
    // A data block zeroed.
    f.write_all_at(&vec![0u8; BS as usize], 20 * BS).unwrap();
    6
}

/// 16 MiB: random data in [0, 4 MiB), a hole in [4, 8 MiB), random data in [8, 16 MiB).
fn make_disk(path: &Path) {
    let f = std::fs::File::create(path).unwrap();
    f.set_len(SIZE).unwrap();
    f.write_all_at(&random_bytes(4 * MIB), 0).unwrap();
    f.write_all_at(&random_bytes(8 * MIB), 8 * MIB).unwrap();
}

fn in_place(env: &TestEnv, to: &Path) -> serde_json::Value {
    let out = env.restore("vm", "latest", "os", to, &["--in-place", "--json"]);
    assert!(
        out.status.success(),
        "restore --in-place: {}",
        stderr_of(&out)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

#[test]
fn in_place_restore_writes_only_the_damaged_blocks() {
    let env = TestEnv::init(&["--block-size", "64KiB"]);
    let image = env.path("os.img");
    make_disk(&image);
    let original = file_digest(&image);
    env.backup("vm", &[format!("os={}", image.display())], &[]);

    let target = env.path("target.img");
    let out = env.restore("vm", "latest", "os", &target, &[]);
    assert!(out.status.success(), "restore: {}", stderr_of(&out));
    let damaged = damage(&target);
    // Also grown by 1 MiB of garbage: set back to the disk's size.
    std::fs::File::options()
        .write(true)
        .open(&target)
        .unwrap()
        .write_all_at(&random_bytes(MIB), SIZE)
        .unwrap();
    assert_ne!(file_digest(&target), original);

    let r = in_place(&env, &target);
    assert_eq!(r["blocks_written"], damaged, "{r}");
    assert_eq!(r["bytes_written"], damaged * BS, "{r}");
    assert_eq!(r["bytes_compared"], SIZE, "{r}");
    assert_eq!(r["resized_from"], SIZE + MIB, "{r}");
    assert_eq!(
        file_digest(&target),
        original,
        "not bit-exact after in-place restore"
    );

    // Nothing left to do: a rerun (e.g. after an interrupted run) writes nothing.
    let r = in_place(&env, &target);
    assert_eq!(r["blocks_written"], 0, "{r}");
    assert_eq!(file_digest(&target), original);

    // A target that does not exist, or is a directory, is refused.
    let out = env.restore(
        "vm",
        "latest",
        "os",
        &env.path("missing.img"),
        &["--in-place"],
    );
    assert!(!out.status.success());
    let out = env.restore("vm", "latest", "os", &env.root, &["--in-place"]);
    assert!(!out.status.success());
    assert!(
        stderr_of(&out).contains("neither a regular file nor a block device"),
        "{}",
        stderr_of(&out)
    );

    // As root: the same onto a loop device, and a mounted one is refused.
    if !root_or_skip("in_place_restore_block_device", &["losetup", "mkfs.ext4"]) {
        return;
    }
    let backing = env.path("loop.img");
    let out = env.restore("vm", "latest", "os", &backing, &[]);
    assert!(out.status.success());
    let damaged = damage(&backing);
    let dev = Loop::attach(&backing);
    let r = in_place(&env, Path::new(&dev.0));
    assert_eq!(r["block_device"], true, "{r}");
    assert_eq!(r["blocks_written"], damaged, "{r}");
    drop(dev);
    assert_eq!(file_digest(&backing), original, "loop device not bit-exact");

    let mounted = LoopFs::create(&env.root, "mounted", 32 * MIB, FsType::Ext4);
    let out = env.restore(
        "vm",
        "latest",
        "os",
        Path::new(mounted.device()),
        &["--in-place"],
    );
    assert!(!out.status.success(), "a mounted device was restored onto");
    assert!(stderr_of(&out).contains("mounted"), "{}", stderr_of(&out));
    drop(mounted);
}

/// A loop device attached to a file; detached on drop.
struct Loop(String);

impl Loop {
    fn attach(file: &Path) -> Loop {
        let out = run("losetup", ["--find", "--show", file.to_str().unwrap()]);
        Loop(String::from_utf8_lossy(&out.stdout).trim().to_string())
    }
}

impl Drop for Loop {
    fn drop(&mut self) {
        let _ = std::process::Command::new("losetup")
            .args(["-d", &self.0])
            .status();
    }
}
