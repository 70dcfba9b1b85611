//! File-level restore from a recovery point, with the real CLI: a 4 GiB sparse ext4 image made
//! with `mkfs.ext4 -d` (owners, modes, times, symlinks, nested directories), backed up, then
//! `files get` of 100 named files, checked against the originals, reading < 5% of the point's
//! stored bytes. Also a GPT-partitioned disk (sgdisk) and an MBR partition past the disk's end.

#![allow(clippy::unwrap_used)] // test helpers outside #[test] functions

use std::fs::{self, File, FileTimes};
use std::io::Write;
use std::os::unix::fs::{MetadataExt, PermissionsExt, symlink};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use bulwark_tests::{controller, controller_json, pseudo_random, root_or_skip, run, stderr_of};

const GIB: u64 = 1 << 30;

/// The access and modification time given to file `i` (whole seconds: `mkfs.ext4 -d` stores
/// no nanoseconds).
fn file_time(i: u64) -> u64 {
    1_600_000_000 + i * 86_400
}

/// Builds the source tree: 100 named small files in nested directories (varied sizes, modes,
/// owners and times), symlinks, and `filler` bytes of incompressible data in large files.
/// Returns the guest paths of the 100 files and of the symlinks.
fn source_tree(src: &Path, filler: u64) -> (Vec<String>, Vec<String>) {
    let mut files = Vec::new();
    for i in 0..100u64 {
        let rel = format!("d{}/sub{}/file{i:03}.dat", i % 7, i % 3);
        let path = src.join(&rel);
        fs::create_dir_all(path.parent().unwrap()).unwrap();
        let len = (i as usize * 997) % 20_000 + 1;
        fs::write(&path, pseudo_random(len, i + 1)).unwrap();
        let mode = [0o644, 0o600, 0o755, 0o640, 0o4755][i as usize % 5];
        fs::set_permissions(&path, fs::Permissions::from_mode(mode)).unwrap();
        std::os::unix::fs::chown(&path, Some(1000 + i as u32), Some(2000 + i as u32 % 4)).unwrap();
        let f = File::options().write(true).open(&path).unwrap();
        let t = SystemTime::UNIX_EPOCH + Duration::new(file_time(i), 0);
        f.set_times(FileTimes::new().set_accessed(t).set_modified(t))
            .unwrap();
        files.push(format!("/{rel}"));
    }
    let mut links = Vec::new();
    for (name, target) in [
        ("d0/abs-link", "/etc/passwd"),
        ("d1/rel-link", "../d0/sub0/file000.dat"),
        ("d2/escape-link", "../../../../../../tmp/outside"),
        ("d3/dangling", "no/such/file"),
        ("top-link", "d4"),
    ] {
        symlink(target, src.join(name)).unwrap();
        links.push(format!("/{name}"));
    }
    // Filler: files nobody asks for, most of the point's stored bytes.
    fs::create_dir_all(src.join("filler")).unwrap();
    let chunk = 32 << 20;
    for i in 0..filler.div_ceil(chunk) {
        let mut f = File::create(src.join(format!("filler/big{i}"))).unwrap();
        let mut urandom = File::open("/dev/urandom").unwrap();
        std::io::copy(&mut std::io::Read::take(&mut urandom, chunk), &mut f).unwrap();
        f.flush().unwrap();
    }
    (files, links)
}

fn mkfs_ext4(image: &Path, size: u64, src: &Path) {
    File::create(image).unwrap().set_len(size).unwrap();
    run(
        "mkfs.ext4",
        [
            "-q".as_ref(),
            "-F".as_ref(),
            "-b".as_ref(),
            "4096".as_ref(),
            "-d".as_ref(),
            src.as_os_str(),
            image.as_os_str(),
        ],
    );
}

fn stored_bytes(dir: &Path) -> u64 {
    let mut total = 0;
    for e in fs::read_dir(dir).unwrap() {
        let e = e.unwrap();
        let md = e.metadata().unwrap();
        total += if md.is_dir() {
            stored_bytes(&e.path())
        } else {
            md.len()
        };
    }
    total
}

fn sha256s(paths: &[PathBuf]) -> Vec<String> {
    let out = run("sha256sum", paths);
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| l.split_whitespace().next().unwrap_or_default().to_string())
        .collect()
}

#[test]
fn files_get_of_100_files_from_a_4gib_point_reads_under_5_percent() {
    if !root_or_skip(
        "files_get_of_100_files_from_a_4gib_point_reads_under_5_percent",
        &["mkfs.ext4", "sha256sum"],
    ) {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("src");
    let (files, links) = source_tree(&src, 256 << 20);
    let image = tmp.path().join("os.img");
    mkfs_ext4(&image, 4 * GIB, &src);
    // The filler is in the image now; its source copy only costs disk space.
    fs::remove_dir_all(src.join("filler")).unwrap();
    let vault = tmp.path().join("vault");
    let v = vault.to_str().unwrap();
    let out = controller(["init", "--vault", v, "--block-size", "64KiB"]);
    assert!(out.status.success(), "{}", stderr_of(&out));
    let disk = format!("os={}", image.display());
    controller_json([
        "backup", "--vault", v, "--vm", "vm", "--disk", &disk, "--json",
    ]);
    let stored = stored_bytes(&vault.join("blocks"));
    assert!(stored > 256 << 20, "the point stores {stored} bytes");

    let to = tmp.path().join("out");
    fs::create_dir(&to).unwrap();
    let mut args: Vec<String> = ["files", "get", "--vault", v, "--vm", "vm", "--disk", "os"]
        .map(String::from)
        .to_vec();
    args.extend(files.iter().cloned());
    args.extend(links.iter().cloned());
    args.extend(["--to".into(), to.display().to_string(), "--json".into()]);
    let report = controller_json(&args);
    assert_eq!(report["files"], 100, "{report}");
    assert_eq!(report["symlinks"], links.len() as u64, "{report}");

    // Contents, modes, owners and times equal the originals'.
    let originals: Vec<PathBuf> = files.iter().map(|f| src.join(&f[1..])).collect();
    let copies: Vec<PathBuf> = files.iter().map(|f| to.join(&f[1..])).collect();
    for (i, (o, c)) in originals.iter().zip(&copies).enumerate() {
        let (mo, mc) = (fs::metadata(o).unwrap(), fs::symlink_metadata(c).unwrap());
        assert!(mc.file_type().is_file(), "{}", c.display());
        assert_eq!(mo.mode(), mc.mode(), "mode of {}", c.display());
        assert_eq!(
            (mo.uid(), mo.gid()),
            (mc.uid(), mc.gid()),
            "owner of {}",
            c.display()
        );
        assert_eq!(
            (mo.mtime(), mo.mtime_nsec()),
            (mc.mtime(), mc.mtime_nsec()),
            "mtime of {}",
            c.display()
        );
        // The host's original was read since (by mkfs): its atime moved, the guest's did not.
        assert_eq!(
            mc.atime() as u64,
            file_time(i as u64),
            "atime of {}",
            c.display()
        );
    }
    // Hashed after the times were checked: reading moves a copy's atime.
    assert_eq!(sha256s(&originals), sha256s(&copies));
    // Symlinks stay symlinks with their targets, and nothing was written outside `to`.
    for l in &links {
        let c = to.join(&l[1..]);
        assert!(
            fs::symlink_metadata(&c).unwrap().file_type().is_symlink(),
            "{}",
            c.display()
        );
        assert_eq!(
            fs::read_link(&c).unwrap(),
            fs::read_link(src.join(&l[1..])).unwrap()
        );
    }
    assert!(!Path::new("/tmp/outside").exists());

    // Bytes from the vault: under 5% of what the point stores.
    let down = report["vault_bytes_down"].as_u64().unwrap();
    let fetched = report["fetch"]["bytes_fetched"].as_u64().unwrap();
    eprintln!(
        "files get: {} blocks, {fetched} plain bytes, {down} bytes from the store; the point stores {stored} bytes ({:.2}%)",
        report["fetch"]["blocks_fetched"],
        down as f64 * 100.0 / stored as f64
    );
    assert!(down > 0);
    assert!(down * 20 < stored, "read {down} of {stored} stored bytes");

    // ls shows a directory with owners and a symlink's target; cat writes a file's bytes.
    let ls = controller_json([
        "files", "ls", "--vault", v, "--vm", "vm", "--disk", "os", "/d0", "--json",
    ]);
    let entries = ls["entries"].as_array().unwrap();
    let link = entries
        .iter()
        .find(|e| e["path"] == "/d0/abs-link")
        .unwrap();
    assert_eq!(link["target"], "/etc/passwd");
    let out = controller([
        "files", "cat", "--vault", v, "--vm", "vm", "--disk", "os", &files[7],
    ]);
    assert!(out.status.success(), "{}", stderr_of(&out));
    assert_eq!(out.stdout, fs::read(&originals[7]).unwrap());

    // Nothing already there is replaced; `..` is refused.
    let again = controller([
        "files",
        "get",
        "--vault",
        v,
        "--vm",
        "vm",
        "--disk",
        "os",
        &files[0],
        "--to",
        to.to_str().unwrap(),
    ]);
    assert!(!again.status.success());
    let up = controller([
        "files",
        "get",
        "--vault",
        v,
        "--vm",
        "vm",
        "--disk",
        "os",
        "/d0/../../etc",
        "--to",
        to.to_str().unwrap(),
    ]);
    assert!(!up.status.success());
    assert!(
        stderr_of(&up).contains("`..` is not allowed"),
        "{}",
        stderr_of(&up)
    );
}

/// Writes an MBR with one partition entry into the first sector of `image`.
fn write_mbr(image: &Path, kind: u8, first: u32, sectors: u32) {
    let mut s = vec![0u8; 512];
    s[446 + 4] = kind;
    s[446 + 8..446 + 12].copy_from_slice(&first.to_le_bytes());
    s[446 + 12..446 + 16].copy_from_slice(&sectors.to_le_bytes());
    s[510] = 0x55;
    s[511] = 0xAA;
    let f = File::options().write(true).open(image).unwrap();
    std::os::unix::fs::FileExt::write_all_at(&f, &s, 0).unwrap();
}

#[test]
fn partitions_gpt_is_read_and_a_partition_past_the_end_is_refused() {
    if !root_or_skip(
        "partitions_gpt_is_read_and_a_partition_past_the_end_is_refused",
        &["mkfs.ext4", "sgdisk"],
    ) {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("src");
    fs::create_dir_all(src.join("etc")).unwrap();
    fs::write(src.join("etc/hostname"), b"guest-on-p2\n").unwrap();
    // A GPT disk: partition 1 (16 MiB, empty), partition 2 holds the ext4 file system.
    let disk = tmp.path().join("gpt.img");
    File::create(&disk).unwrap().set_len(128 << 20).unwrap();
    run(
        "sgdisk",
        ["-n", "1:2048:+16M", "-n", "2:0:0", disk.to_str().unwrap()],
    );
    let out = run("sgdisk", ["-i", "2", disk.to_str().unwrap()]);
    let info = String::from_utf8_lossy(&out.stdout).into_owned();
    let sector = |key: &str| -> u64 {
        info.lines()
            .find(|l| l.starts_with(key))
            .and_then(|l| l.split(':').nth(1))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("no {key} in {info}"))
    };
    let (first, last) = (sector("First sector"), sector("Last sector"));
    let part = tmp.path().join("p2.img");
    mkfs_ext4(&part, (last - first + 1) * 512, &src);
    let data = fs::read(&part).unwrap();
    let f = File::options().write(true).open(&disk).unwrap();
    std::os::unix::fs::FileExt::write_all_at(&f, &data, first * 512).unwrap();
    drop(f);

    let vault = tmp.path().join("vault");
    let v = vault.to_str().unwrap();
    let spec = format!("os={}", disk.display());
    controller_json([
        "backup", "--vault", v, "--vm", "g", "--disk", &spec, "--json",
    ]);
    let out = controller([
        "files",
        "cat",
        "--vault",
        v,
        "--vm",
        "g",
        "--disk",
        "os",
        "--partition",
        "2",
        "/etc/hostname",
    ]);
    assert!(out.status.success(), "{}", stderr_of(&out));
    assert_eq!(out.stdout, b"guest-on-p2\n");
    // The whole disk is not a file system: the error names the partitions.
    let out = controller(["files", "ls", "--vault", v, "--vm", "g", "--disk", "os"]);
    assert!(!out.status.success());
    assert!(
        stderr_of(&out).contains("partitions 1, 2"),
        "{}",
        stderr_of(&out)
    );
    let out = controller([
        "files",
        "ls",
        "--vault",
        v,
        "--vm",
        "g",
        "--disk",
        "os",
        "--partition",
        "3",
    ]);
    assert!(
        stderr_of(&out).contains("no partition 3"),
        "{}",
        stderr_of(&out)
    );

    // An MBR whose partition reaches past the disk's end is refused, not read.
    let bad = tmp.path().join("bad.img");
    fs::copy(&part, &bad).unwrap();
    let len = fs::metadata(&bad).unwrap().len();
    File::options()
        .write(true)
        .open(&bad)
        .unwrap()
        .set_len(len + (1 << 20))
        .unwrap();
    let sectors = ((len + (1 << 20)) / 512) as u32;
    write_mbr(&bad, 0x83, 2048, sectors); // starts at 1 MiB, as long as the whole disk
    let spec = format!("os={}", bad.display());
    controller_json([
        "backup", "--vault", v, "--vm", "b", "--disk", &spec, "--json",
    ]);
    let out = controller([
        "files",
        "ls",
        "--vault",
        v,
        "--vm",
        "b",
        "--disk",
        "os",
        "--partition",
        "1",
    ]);
    assert!(!out.status.success());
    assert!(
        stderr_of(&out).contains("past the end of the disk"),
        "{}",
        stderr_of(&out)
    );
}
