//! `bulwark-controller mount` with the real CLI and the kernel's FUSE: an ext4 image with
//! known files is backed up, the point is mounted, and the image file under the mount has the
//! original's sha256, passes `e2fsck -fn`, and refuses writes; SIGTERM unmounts (exit 0, the
//! mountpoint gone from /proc/mounts). Then one block object in the vault is damaged: reading
//! that range of the mounted image fails with EIO (never other bytes) while the rest still
//! reads back right.

#![allow(clippy::unwrap_used)] // test helpers outside #[test] functions

use std::collections::HashMap;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use bulwark_tests::{
    Needs, controller, controller_bin, controller_json, file_digest, pseudo_random, root_or_skip,
    run, skip, stderr_of,
};

const MIB: u64 = 1 << 20;
/// The vault's block size.
const BS: u64 = 64 << 10;

/// Whether `mountpoint` is listed in /proc/mounts.
fn is_mounted(mountpoint: &Path) -> bool {
    let mounts = std::fs::read_to_string("/proc/mounts").unwrap();
    let want = mountpoint.to_str().unwrap();
    mounts
        .lines()
        .any(|l| l.split_whitespace().nth(1) == Some(want))
}

/// The mount child: killed by pid if the test ends early, and its mountpoint then detached
/// lazily (a killed FUSE server leaves a dead mount behind).
struct Mount {
    child: Option<Child>,
    mountpoint: PathBuf,
}

impl Mount {
    fn start(vault: &str, mountpoint: &Path, log: &Path) -> Mount {
        std::fs::create_dir_all(mountpoint).unwrap();
        let child = Command::new(controller_bin())
            .args(["mount", "--vault", vault, "--vm", "vm", "--disk", "os"])
            .arg(mountpoint)
            .stdin(Stdio::null())
            .stderr(File::create(log).unwrap())
            .spawn()
            .unwrap();
        let mut m = Mount {
            child: Some(child),
            mountpoint: mountpoint.to_path_buf(),
        };
        let start = Instant::now();
        while !is_mounted(mountpoint) {
            if let Some(status) = m.child.as_mut().unwrap().try_wait().unwrap() {
                panic!(
                    "mount exited early: {status}: {}",
                    std::fs::read_to_string(log).unwrap_or_default()
                );
            }
            assert!(start.elapsed() < Duration::from_secs(60), "not mounted");
            std::thread::sleep(Duration::from_millis(50));
        }
        m
    }

    /// SIGTERM, then the exit status and whether the mountpoint is gone.
    fn terminate(&mut self) {
        let mut child = self.child.take().unwrap();
        run("kill", ["-TERM", &child.id().to_string()]);
        let start = Instant::now();
        let status = loop {
            if let Some(s) = child.try_wait().unwrap() {
                break s;
            }
            if start.elapsed() > Duration::from_secs(30) {
                let _ = child.kill();
                panic!("mount did not stop on SIGTERM");
            }
            std::thread::sleep(Duration::from_millis(50));
        };
        assert!(status.success(), "mount exited with {status}");
        assert!(
            !is_mounted(&self.mountpoint),
            "{} still mounted after SIGTERM",
            self.mountpoint.display()
        );
    }
}

impl Drop for Mount {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        if is_mounted(&self.mountpoint) {
            let _ = Command::new("umount")
                .arg("-l")
                .arg(&self.mountpoint)
                .output();
        }
    }
}

#[test]
fn mount_serves_the_point_as_a_read_only_image_and_fails_damaged_blocks_with_eio() {
    let test = "mount_serves_the_point_as_a_read_only_image_and_fails_damaged_blocks_with_eio";
    if !root_or_skip(
        test,
        &["mkfs.ext4", "e2fsck", "sha256sum", "kill", "umount"],
    ) {
        return;
    }
    if !Path::new("/dev/fuse").exists() {
        skip(
            test,
            Needs::Root,
            "needs /dev/fuse (the fuse kernel module)",
        );
        return;
    }
    let t0 = Instant::now();
    let phase = |what: &str| eprintln!("fuse_mount: {what} at {} ms", t0.elapsed().as_millis());
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();

    // An ext4 image made from a directory of known files (mkfs.ext4 -d: no mount needed).
    let files = root.join("files");
    std::fs::create_dir_all(files.join("etc")).unwrap();
    std::fs::write(files.join("etc/hostname"), "fuse-test\n").unwrap();
    std::fs::write(files.join("big.bin"), pseudo_random(3 * MIB as usize, 7)).unwrap();
    std::fs::write(files.join("small.bin"), pseudo_random(100_000, 8)).unwrap();
    let image = root.join("disk.img");
    File::create(&image).unwrap().set_len(32 * MIB).unwrap();
    run(
        "mkfs.ext4",
        [
            "-q".as_ref(),
            "-F".as_ref(),
            "-d".as_ref(),
            files.as_os_str(),
            image.as_os_str(),
        ],
    );

    // Uncompressed blocks: a flipped byte in an object is a wrong byte of the disk, which
    // only the content address can catch.
    let vault = root.join("vault");
    let v = vault.to_str().unwrap();
    let out = controller([
        "init",
        "--vault",
        v,
        "--block-size",
        "64KiB",
        "--compression-level",
        "0",
    ]);
    assert!(out.status.success(), "{}", stderr_of(&out));
    let disk = format!("os={}", image.display());
    controller_json([
        "backup", "--vault", v, "--vm", "vm", "--disk", &disk, "--json",
    ]);

    phase("backed up");
    // --help warns about mounting the guest's file system.
    let help = controller(["mount", "--help"]);
    let help = String::from_utf8_lossy(&help.stdout).to_string();
    assert!(
        help.contains("untrusted") && help.contains("own risk"),
        "{help}"
    );

    // 1. The whole image, through the mount.
    let mnt = root.join("mnt");
    let mut mount = Mount::start(v, &mnt, &root.join("mount1.log"));
    phase("mounted");
    let img = mnt.join("os.img");
    let meta = std::fs::metadata(&img).unwrap();
    assert_eq!(meta.len(), 32 * MIB);
    assert_eq!(file_digest(&img), file_digest(&image), "sha256 differs");
    let fsck = Command::new("e2fsck")
        .arg("-fn")
        .arg(&img)
        .output()
        .unwrap();
    assert!(
        fsck.status.success(),
        "e2fsck -fn through the mount: {}{}",
        String::from_utf8_lossy(&fsck.stdout),
        String::from_utf8_lossy(&fsck.stderr)
    );

    phase("sha256 and e2fsck done");
    // Writes are refused: opening for writing, creating a file, truncating.
    let refused = |e: std::io::Error| {
        let code = e.raw_os_error();
        assert!(
            code == Some(libc_erofs()) || code == Some(libc_eacces()),
            "expected EROFS or EACCES, got {e}"
        );
    };
    refused(
        std::fs::OpenOptions::new()
            .write(true)
            .open(&img)
            .unwrap_err(),
    );
    refused(File::create(mnt.join("new.img")).unwrap_err());
    refused(std::fs::remove_file(&img).unwrap_err());
    assert_eq!(file_digest(&img), file_digest(&image), "changed by a write");

    // SIGTERM: exit 0, unmounted.
    mount.terminate();
    drop(mount);
    phase("unmounted");

    // 2. Damage one block object: a block of big.bin's data (unique in the disk), at least
    // 1 MiB from the start so that reads near the start never touch it.
    let data = std::fs::read(&image).unwrap();
    let mut seen: HashMap<String, u32> = HashMap::new();
    let key_of = |i: u64| {
        let block = &data[(i * BS) as usize..((i + 1) * BS) as usize];
        bulwark_blockdiff::content_address(block, None).to_hex()
    };
    let blocks = data.len() as u64 / BS;
    for i in 0..blocks {
        *seen.entry(key_of(i)).or_default() += 1;
    }
    let big = pseudo_random(3 * MIB as usize, 7);
    let damaged = (MIB / BS..blocks)
        .find(|&i| {
            let block = &data[(i * BS) as usize..((i + 1) * BS) as usize];
            seen[&key_of(i)] == 1 && big.windows(64).any(|w| w == &block[..64])
        })
        .expect("a block of big.bin");
    let hex = key_of(damaged);
    let object = vault.join(format!("blocks/{}/{hex}", &hex[..2]));
    let mut bytes = std::fs::read(&object).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 0x40;
    std::fs::write(&object, &bytes).unwrap();

    phase("block damaged");
    let log = root.join("mount2.log");
    let mut mount = Mount::start(v, &mnt, &log);
    let f = File::open(&img).unwrap();
    // The start of the disk still reads back right.
    let mut head = vec![0u8; (4 * BS) as usize];
    f.read_exact_at(&mut head, 0).unwrap();
    assert_eq!(head, data[..head.len()]);
    // The damaged block: EIO, never bytes.
    let mut buf = vec![0u8; 4096];
    let err = f
        .read_exact_at(&mut buf, damaged * BS + 4096)
        .expect_err("read of a damaged block succeeded");
    assert_eq!(err.raw_os_error(), Some(libc_eio()), "{err}");
    // A whole-image reader fails too.
    let sum = Command::new("sha256sum").arg(&img).output().unwrap();
    assert!(!sum.status.success(), "sha256sum read the damaged image");
    drop(f);
    mount.terminate();
    let log = std::fs::read_to_string(&log).unwrap();
    assert!(log.contains("read failed"), "{log}");
    phase("done");
}

fn libc_eio() -> i32 {
    rustix::io::Errno::IO.raw_os_error()
}

fn libc_eacces() -> i32 {
    rustix::io::Errno::ACCESS.raw_os_error()
}

fn libc_erofs() -> i32 {
    rustix::io::Errno::ROFS.raw_os_error()
}
