//! Hostile guest file systems: a small real ext4 image (`mkfs.ext4 -d`), with and without
//! metadata checksums, is damaged in memory — superblock, group descriptors, inode table,
//! directory blocks — stored as a recovery point, and read through `bulwark_recovery::files`
//! (list every directory, cat every file, get everything). Each case must end, within a time
//! bound, in an answer or a clear error: never a panic, never a hang.

#![allow(clippy::unwrap_used)] // test helpers outside #[test] functions

use std::fs;
use std::sync::{Arc, OnceLock, mpsc};
use std::time::Duration;

use bulwark_blockdiff::{BlockMap, BlockSize, Entry, MIN_BLOCK_SIZE};
use bulwark_recovery::files::{self, GetOptions, Kind, Source};
use bulwark_recovery::{DiskOptions, Error};
use bulwark_tests::{pseudo_random, root_or_skip, run};
use bulwark_vault::{
    ConsistencyRecord, CreateOptions, DiskRecord, DiskStats, ManifestRef, RecoveryPoint, Vault,
    new_point_id,
};
use proptest::prelude::*;

const IMAGE: u64 = 8 << 20;
const CASE_TIME: Duration = Duration::from_secs(60);

/// A pristine image and the byte ranges of its metadata.
struct Pristine {
    image: Vec<u8>,
    /// Superblock and group descriptors.
    super_gd: (usize, usize),
    /// The first inodes of the inode table.
    inodes: (usize, usize),
    /// Directory blocks (root and a large directory).
    dirs: Vec<(usize, usize)>,
}

fn make(csum: bool) -> Pristine {
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("src");
    fs::create_dir_all(src.join("a/b/c")).unwrap();
    fs::create_dir_all(src.join("big")).unwrap();
    for i in 0..300u64 {
        fs::write(
            src.join(format!("big/entry-with-a-long-name-{i:04}")),
            pseudo_random(i as usize % 300, i),
        )
        .unwrap();
    }
    fs::write(src.join("a/b/c/deep"), pseudo_random(70_000, 9)).unwrap();
    fs::write(src.join("a/file"), b"hello").unwrap();
    std::os::unix::fs::symlink("../a/file", src.join("a/b/link")).unwrap();
    let img = tmp.path().join("fs.img");
    fs::File::create(&img).unwrap().set_len(IMAGE).unwrap();
    let features = if csum {
        "metadata_csum"
    } else {
        "^metadata_csum"
    };
    run(
        "mkfs.ext4",
        [
            "-q",
            "-F",
            "-b",
            "4096",
            "-O",
            features,
            "-d",
            src.to_str().unwrap(),
            img.to_str().unwrap(),
        ],
    );
    let blocks_of = |path: &str| -> Vec<(usize, usize)> {
        let out = run(
            "debugfs",
            ["-R", &format!("blocks {path}"), img.to_str().unwrap()],
        );
        String::from_utf8_lossy(&out.stdout)
            .split_whitespace()
            .filter_map(|b| b.parse::<usize>().ok())
            .map(|b| (b * 4096, 4096))
            .collect()
    };
    let mut dirs = blocks_of("/");
    dirs.extend(blocks_of("/big"));
    dirs.extend(blocks_of("/a/b"));
    let image = fs::read(&img).unwrap();
    // The inode table of group 0, from its descriptor (block 1 with 4 KiB blocks).
    let table = u32::from_le_bytes(image[4096 + 8..4096 + 12].try_into().unwrap()) as usize;
    Pristine {
        image,
        super_gd: (1024, 4096 + 64),
        inodes: (table * 4096, 64 * 256),
        dirs,
    }
}

fn pristine(csum: bool) -> &'static Pristine {
    static WITH: OnceLock<Pristine> = OnceLock::new();
    static WITHOUT: OnceLock<Pristine> = OnceLock::new();
    if csum {
        WITH.get_or_init(|| make(true))
    } else {
        WITHOUT.get_or_init(|| make(false))
    }
}

/// Stores `image` as the single disk `os` of a point of VM `vm` in a new in-memory vault.
async fn point(image: &[u8]) -> Vault {
    let vault = Vault::create_store(
        Arc::new(object_store::memory::InMemory::new()),
        "memory:",
        &CreateOptions::default(),
    )
    .await
    .unwrap();
    let bs = BlockSize::new(MIN_BLOCK_SIZE).unwrap();
    let mut entries = Vec::new();
    for block in image.chunks(bs.bytes() as usize) {
        if block.iter().all(|b| *b == 0) {
            entries.push(Entry::Zero);
            continue;
        }
        let address = vault.address_of(block);
        vault
            .put_block(address, bytes::Bytes::copy_from_slice(block))
            .await
            .unwrap();
        entries.push(Entry::Data { change: 0, address });
    }
    let map = BlockMap::new(bs, image.len() as u64, entries).unwrap();
    let id = new_point_id(jiff::Timestamp::now());
    let (digest, _) = vault
        .put_manifest(
            &ManifestRef {
                vm: "vm",
                disk: "os",
                point: &id,
            },
            &map,
        )
        .await
        .unwrap();
    let p = RecoveryPoint {
        id,
        vm: "vm".into(),
        created: jiff::Timestamp::now(),
        committed: jiff::Timestamp::now(),
        consistency: ConsistencyRecord::crash(),
        disks: vec![DiskRecord {
            name: "os".into(),
            size: map.disk_size(),
            block_size: bs.get(),
            manifest_digest: digest,
            source: String::new(),
            stats: DiskStats::default(),
            tracking: None,
        }],
        policy: None,
        agent: None,
    };
    vault.commit_point(&p).await.unwrap();
    vault
}

/// Lists every directory (bounded), cats every file, gets everything. Returns how many
/// operations failed with a clear error. A panic in a worker (the parser runs on the blocking
/// pool, where a panic would come back as an error) fails the test.
async fn exercise(vault: &Vault) -> usize {
    let src = Source {
        vm: "vm".into(),
        point: "latest".into(),
        disk: "os".into(),
        partition: None,
        options: DiskOptions {
            cache_bytes: 4 << 20,
            ..DiskOptions::default()
        },
    };
    let mut errors = 0;
    let mut queue = vec!["/".to_string()];
    let mut seen = 0;
    while let Some(dir) = queue.pop() {
        seen += 1;
        if seen > 64 {
            break;
        }
        match files::list(vault, &src, &dir).await {
            Ok((entries, _)) => {
                for e in entries.into_iter().take(20) {
                    match e.kind {
                        Kind::Dir => queue.push(e.path),
                        Kind::File => {
                            if let Err(e) = files::cat(vault, &src, &e.path, std::io::sink()).await
                            {
                                no_panic(&e);
                                errors += 1;
                            }
                        }
                        _ => {}
                    }
                }
            }
            Err(e) => {
                no_panic(&e);
                errors += 1;
            }
        }
    }
    let to = tempfile::tempdir().unwrap();
    if let Err(e) = files::get(vault, &src, &["/".into()], to.path(), GetOptions::default()).await {
        no_panic(&e);
        errors += 1;
    }
    errors
}

fn no_panic(e: &Error) {
    assert!(!matches!(e, Error::Worker(_)), "a worker panicked: {e}");
}

/// Runs one damaged image on its own thread and runtime; fails on a panic or a hang.
fn check(image: Vec<u8>) -> usize {
    on_point(image, |vault, _| {
        Box::pin(async move { exercise(&vault).await })
    })
}

fn damage(csum: bool, region: usize, flips: &[(usize, u8)]) -> Vec<u8> {
    let p = pristine(csum);
    let mut image = p.image.clone();
    let ranges: Vec<(usize, usize)> = match region {
        0 => vec![p.super_gd],
        1 => vec![p.inodes],
        _ => p.dirs.clone(),
    };
    for (i, (at, v)) in flips.iter().enumerate() {
        let (start, len) = ranges[i % ranges.len()];
        image[start + at % len] = *v;
    }
    image
}

fn tools() -> bool {
    root_or_skip("recovery_hostile", &["mkfs.ext4", "debugfs"])
}

#[test]
fn the_pristine_images_read_without_errors() {
    if !tools() {
        return;
    }
    for csum in [true, false] {
        assert_eq!(check(pristine(csum).image.clone()), 0, "csum={csum}");
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 96, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn damaged_ext4_metadata_gives_errors_not_panics_or_hangs(
        csum in any::<bool>(),
        region in 0usize..3,
        flips in proptest::collection::vec((any::<usize>(), any::<u8>()), 1..24),
    ) {
        if !tools() {
            return Ok(());
        }
        check(damage(csum, region, &flips));
    }
}

/// An inode whose size says 1 TiB (on an 8 MiB file system) is refused at once: without the
/// check, `cat` and `get` read the "file" as a hole and stream zeros for hours (a CI run of the
/// property test above hung on such a case).
#[test]
fn a_file_claiming_more_than_its_file_system_is_refused() {
    if !tools() {
        return;
    }
    let image = debugfs_damaged(&["sif /a/file size 0x10000000000"]);
    let r = on_point(image, |vault, src| {
        Box::pin(async move {
            files::cat(&vault, &src, "/a/file", std::io::sink())
                .await
                .map(|(_, report)| report.bytes_written)
        })
    });
    match r {
        Err(e) => assert!(
            e.to_string().contains("more than its whole file system"),
            "{e}"
        ),
        Ok(n) => panic!("a file claiming 1 TiB was read: {n} bytes"),
    }
}

/// Two directory entries that point back at the root (a loop no real ext4 can hold): `get`
/// copies each directory once and names the loop in its report. Without the check it recursed
/// until the stack overflowed, aborting the process (a CI run of the property test did), and
/// two such entries would have copied the tree 2^depth times.
#[test]
fn a_directory_loop_is_copied_once() {
    if !tools() {
        return;
    }
    let image = debugfs_damaged(&["ln / /a/b/up1", "ln / /a/b/up2"]);
    let (dirs, skipped) = on_point(image, |vault, src| {
        Box::pin(async move {
            let to = tempfile::tempdir().unwrap();
            files::get(
                &vault,
                &src,
                &["/".into()],
                to.path(),
                GetOptions::default(),
            )
            .await
            .map(|report| (report.dirs, report.skipped))
        })
    })
    .unwrap_or_else(|e| panic!("get failed on a directory loop: {e}"));
    // lost+found, a, a/b, a/b/c, big: each once.
    assert_eq!(dirs, 5, "{skipped:?}");
    let loops: Vec<_> = skipped.iter().filter(|s| s.contains("loop")).collect();
    assert_eq!(loops.len(), 2, "{skipped:?}");
}

/// A legitimate tree as deep as `get` allows (255 directories) is copied whole on the blocking
/// pool's stack: the walk is not a recursion that a deep tree can overflow.
#[test]
fn the_deepest_allowed_tree_is_copied() {
    if !tools() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("src");
    let deep = |root: &std::path::Path| (0..255).fold(root.to_path_buf(), |p, _| p.join("d"));
    fs::create_dir_all(deep(&src)).unwrap();
    fs::write(deep(&src).join("leaf"), b"bottom").unwrap();
    let img = tmp.path().join("deep.img");
    fs::File::create(&img).unwrap().set_len(IMAGE).unwrap();
    run(
        "mkfs.ext4",
        [
            "-q",
            "-F",
            "-b",
            "4096",
            "-d",
            src.to_str().unwrap(),
            img.to_str().unwrap(),
        ],
    );
    let (dirs, leaf) = on_point(fs::read(&img).unwrap(), move |vault, src| {
        Box::pin(async move {
            let to = tempfile::tempdir().unwrap();
            let report = files::get(
                &vault,
                &src,
                &["/".into()],
                to.path(),
                GetOptions::default(),
            )
            .await?;
            Ok::<_, Error>((report.dirs, fs::read(deep(to.path()).join("leaf")).unwrap()))
        })
    })
    .unwrap_or_else(|e| panic!("get failed on a deep tree: {e}"));
    assert_eq!(dirs, 256, "255 levels and lost+found");
    assert_eq!(leaf, b"bottom");
}

/// Runs `f` on the vault of a point holding `image` on its own runtime, within `CASE_TIME`.
fn on_point<T: Send + 'static>(
    image: Vec<u8>,
    f: impl FnOnce(Vault, Source) -> std::pin::Pin<Box<dyn std::future::Future<Output = T> + Send>>
    + Send
    + 'static,
) -> T {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        let r = rt.block_on(async {
            let vault = point(&image).await;
            let src = Source {
                vm: "vm".into(),
                point: "latest".into(),
                disk: "os".into(),
                partition: None,
                options: DiskOptions::default(),
            };
            f(vault, src).await
        });
        let _ = tx.send(r);
    });
    rx.recv_timeout(CASE_TIME)
        .expect("the case neither finished nor failed in time (or the reader aborted)")
}

/// The pristine image (without metadata checksums) changed by debugfs `requests`.
fn debugfs_damaged(requests: &[&str]) -> Vec<u8> {
    let tmp = tempfile::tempdir().unwrap();
    let img = tmp.path().join("damaged.img");
    fs::write(&img, &pristine(false).image).unwrap();
    for r in requests {
        run("debugfs", ["-w", "-R", r, img.to_str().unwrap()]);
    }
    fs::read(&img).unwrap()
}

/// A superblock claiming billions of blocks in groups of 8: the parser would allocate one
/// descriptor per group (60 GB; a CI run aborted on such a case). Refused before it loads.
#[test]
fn a_superblock_claiming_more_than_its_partition_is_refused() {
    if !tools() {
        return;
    }
    // Written straight into the superblock: debugfs refuses to reopen such a file system.
    let mut image = pristine(false).image.clone();
    image[1024 + 0x04..1024 + 0x08].copy_from_slice(&u32::MAX.to_le_bytes()); // blocks
    image[1024 + 0x20..1024 + 0x24].copy_from_slice(&8u32.to_le_bytes()); // blocks per group
    let e = on_point(image, |vault, src| {
        Box::pin(async move { files::list(&vault, &src, "/").await.map(|_| ()) })
    })
    .expect_err("a superblock claiming 16 TiB on 8 MiB was read");
    assert!(e.to_string().contains("more than the partition"), "{e}");
}

/// A symlink whose inode claims a 1 TiB target: the parser reads a link's target whole, so
/// `ls` of its directory, `cat` through it and `get` of it must refuse it before reading.
#[test]
fn a_symlink_claiming_a_huge_target_is_refused() {
    if !tools() {
        return;
    }
    let image = debugfs_damaged(&["sif /a/b/link size 0x10000000000"]);
    let errors = on_point(image, |vault, src| {
        Box::pin(async move {
            let to = tempfile::tempdir().unwrap();
            [
                files::list(&vault, &src, "/a/b").await.err(),
                files::cat(&vault, &src, "/a/b/link", std::io::sink())
                    .await
                    .err(),
                files::get(
                    &vault,
                    &src,
                    &["/a".into()],
                    to.path(),
                    GetOptions::default(),
                )
                .await
                .err(),
            ]
        })
    });
    for e in errors {
        let e = e.expect("a symlink claiming a 1 TiB target was read");
        assert!(e.to_string().contains("symlink claims"), "{e}");
    }
}
