//! Backups of a running VM through QEMU (issue 11), on a real guest under TCG: `QemuSnapshotter`
//! takes both disks of the VM at one instant (one QMP transaction), each disk is read over NBD
//! through its `BlockSource`, unchanged blocks come from the dirty bitmap (`changes_since`), and
//! the image files the test assembles must hold one instant of the guest's writer on both disks
//! (`verify_point`: one cut over both disks, e2fsck clean after the journal replays).
//!
//! One guest for the whole file (booting one costs ~10 s of CPU under TCG), so the scenarios run
//! in ONE test, in this order, and each inherits the state the previous one left:
//!
//! 1. boot: `os` = qcow2 holding an ext4 file system with the writer's slot files, `data` = raw
//!    (writer slots from 1 MiB), both on a loop-mounted ext4 host directory; 16 MiB of random
//!    filler on each disk so that a full read and an incremental differ clearly; the writer runs
//!    from here to the restart (5.) and again after it;
//! 2. baseline: the writer's stalls with no backup running (the TCG margin of the stall check);
//! 3. point 1 (full), point 2 and point 3 (incrementals): each one instant on both disks and
//!    fsck-clean; each incremental trusts the bitmap on both disks and reads at most twice the
//!    guest's dirty bytes (rounded up to blocks); the writer's longest stall during each backup
//!    stays within the take (the QMP transaction, exports, NBD connections) plus the margin;
//! 4. `data` (raw) grown with `block_resize`: point 4 reads `data` in full, the reason names the
//!    resize; `os` still uses its bitmap;
//! 5. the VM shut down and booted again (a new QEMU process): point 5 reads `data` (raw, its
//!    bitmap lived in the old QEMU's memory) in full with the reason; `os` (qcow2, persistent
//!    bitmap stored in the image at shutdown) still uses its bitmap;
//! 6. through the real CLI and a vault (`init --block-size 64KiB`): a full and an incremental
//!    point with `backup --qmp unix:PATH`, each disk restored with `restore` and checked as one
//!    instant; the incremental trusts the bitmap on both disks and reads at most twice the
//!    guest's dirty bytes;
//! 7. `restore --format qcow2` passes `qemu-img check` and `qemu-img compare` with the raw restore;
//! 8. 16 MiB written to `data`, then a controller SIGKILLed mid-transfer (the fleecing images
//!    exist and new blocks reached the vault, and afterwards no point was committed): the writer
//!    goes on; the next backup removes the leftovers, trusts the bitmaps (rolled back), and reads
//!    the 16 MiB the killed backup never committed;
//! 9. nothing named `bulwark-` is left in QEMU or next to the images;
//! 10. the VM shut down: `backup --disk os=IMAGE.qcow2 --disk data=IMAGE.raw` reads both in place
//!     (the qcow2 through qemu-storage-daemon, the raw image directly; both under QEMU's locks)
//!     with the image file system's used space watched throughout (no growth beyond 4 MiB, no
//!     new file beside the images), and both restore (raw and qcow2)
//!     to exactly the guest's view of the images (`qemu-img compare`).
//!
//! Root only (loop mount), and QEMU 7.2 (tests/run.sh installs it).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::{BTreeSet, HashMap};
use std::ffi::OsStr;
use std::fs::File;
use std::ops::Range;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bulwark_blockdiff::BlockSource;
use bulwark_blockdiff::buffers::Pool;
use bulwark_qemu::{PREFIX, QemuOptions, QemuSnapshotter, Qmp};
use bulwark_snapshot::{Changes, Outcome, PreviousDisk, Snapshotter};
use bulwark_tests::guest::slots::{BLOCK_BASE, SLOT_SIZE, slot_file_name};
use bulwark_tests::guest::{
    DiskFormat, GUEST_TOOLS, Guest, GuestSpec, SLOT_DIR, WriterEvent, WriterSpec, WriterTarget,
    create_os_and_data_disks, image_fs, verify_point,
};
use bulwark_tests::root_or_skip;
use bytes::Bytes;

const SLOTS: u32 = 64;
const MIB: u64 = 1 << 20;
const OS_SIZE: u64 = 128 * MIB;
const DATA_SIZE: u64 = 64 * MIB;
/// The test's read block: QEMU's bitmap granularity here (64 KiB clusters / default).
const BLOCK: u64 = 64 * 1024;

fn writer_spec() -> WriterSpec {
    WriterSpec::os_files_and_data_blocks(SLOTS)
}

/// One backed-up point: the assembled raw images and what the next backup gets of it.
#[derive(Debug)]
struct Point {
    name: String,
    images: HashMap<String, PathBuf>,
    previous: HashMap<String, PreviousDisk>,
    changes: HashMap<String, Changes>,
    bytes_read: HashMap<String, u64>,
    take: Duration,
    /// The writer's longest stall whose end it logged after the backup began.
    max_stall_ms: u64,
    /// The writer's longest stall in a window as long, with no backup, just before it.
    control_stall_ms: u64,
    /// From `prepare` to the last `release`.
    window: Duration,
    cut: u64,
}

/// Guest time (ns) of the newest writer log line.
fn last_log_time(log: &[WriterEvent]) -> u128 {
    log.iter()
        .filter_map(|e| match e {
            WriterEvent::Start { t_ns, .. }
            | WriterEvent::Progress { t_ns, .. }
            | WriterEvent::Stall { t_ns, .. }
            | WriterEvent::Paused { t_ns, .. }
            | WriterEvent::Resumed { t_ns, .. } => Some(*t_ns),
            WriterEvent::Summary(_) => None,
        })
        .max()
        .unwrap_or(0)
}

/// Host time now, ns since the Unix epoch.
fn host_ns() -> i128 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as i128
}

/// Guest clock minus host clock, in ns (to place the writer's stalls among the backup's
/// phases): the guest's `adjtimex` time against the middle of the round trip.
fn guest_clock_offset(guest: &mut Guest) -> i128 {
    let a = host_ns();
    let out = guest.sh_ok("busybox adjtimex");
    let b = host_ns();
    let field = |k: &str| -> i128 {
        out.lines()
            .find_map(|l| l.trim().strip_prefix(k))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or_else(|| panic!("no {k} in adjtimex output: {out}"))
    };
    field("time.tv_sec:") * 1_000_000_000 + field("time.tv_usec:") * 1000 - (a + b) / 2
}

/// The stalls logged after guest time `after`: (start, end) in host ns, gap ms.
fn stalls_after(log: &[WriterEvent], after: u128, offset: i128) -> Vec<(i128, i128, u64)> {
    log.iter()
        .filter_map(|e| match e {
            WriterEvent::Stall { gap_ms, t_ns, .. } if *t_ns > after => {
                let end = *t_ns as i128 - offset;
                Some((end - i128::from(*gap_ms) * 1_000_000, end, *gap_ms))
            }
            _ => None,
        })
        .collect()
}

/// The longest stall logged after guest time `after`.
fn max_stall_after(log: &[WriterEvent], after: u128) -> u64 {
    log.iter()
        .filter_map(|e| match e {
            WriterEvent::Stall { gap_ms, t_ns, .. } if *t_ns > after => Some(*gap_ms),
            _ => None,
        })
        .max()
        .unwrap_or(0)
}

fn is_zero(b: &[u8]) -> bool {
    b.iter().all(|&x| x == 0)
}

/// What a backup's scan does with one disk: unchanged blocks are not read, holes (`next_data`)
/// are not read, everything else is read from the source. Returns the blocks read (offset,
/// bytes); their total is what the reader returned.
fn read_changed(reader: &Arc<dyn BlockSource>, unchanged: &[Range<u64>]) -> Vec<(u64, Bytes)> {
    let size = reader.size();
    let pool = Pool::new(BLOCK as usize, 4);
    let mut out = Vec::new();
    let mut next_data = 0;
    let mut ui = 0;
    let mut at = 0;
    while at < size {
        let end = (at + BLOCK).min(size);
        while ui < unchanged.len() && unchanged[ui].end <= at {
            ui += 1;
        }
        if ui < unchanged.len() && unchanged[ui].start <= at && end <= unchanged[ui].end {
            at = end; // unchanged: the previous point's block
            continue;
        }
        if next_data <= at {
            next_data = reader.next_data(at).unwrap();
            assert!(next_data >= at && next_data <= size);
        }
        if next_data >= end {
            at = end; // a hole: zeros, not read
            continue;
        }
        let data = reader.read(at, (end - at) as usize, &pool).unwrap();
        assert_eq!(data.len() as u64, end - at);
        out.push((at, data));
        at = end;
    }
    out
}

/// Writes the point's raw image (sparse) to `out`: the blocks read, the unchanged blocks from
/// the previous point's image, zeros elsewhere. After the backup, so that the test's own work
/// does not compete with the guest while the backup runs.
fn write_image(
    size: u64,
    read: &[(u64, Bytes)],
    unchanged: &[Range<u64>],
    previous: Option<&Path>,
    out: &Path,
) {
    let file = File::create(out).unwrap();
    file.set_len(size).unwrap();
    if let Some(prev) = previous {
        let prev = File::open(prev).unwrap();
        let mut buf = vec![0u8; BLOCK as usize];
        for r in unchanged {
            let mut at = r.start.div_ceil(BLOCK) * BLOCK;
            while at + BLOCK <= r.end || (at < r.end && r.end == size) {
                let end = (at + BLOCK).min(size);
                let b = &mut buf[..(end - at) as usize];
                prev.read_exact_at(b, at).unwrap();
                if !is_zero(b) {
                    file.write_all_at(b, at).unwrap();
                }
                at = end;
            }
        }
    }
    for (at, data) in read {
        if !is_zero(data) {
            file.write_all_at(data, *at).unwrap();
        }
    }
    file.sync_all().unwrap();
}

/// Blocks (indexes) whose bytes differ between two raw images of the same size.
fn differing_blocks(a: &Path, b: &Path) -> BTreeSet<u64> {
    let (fa, fb) = (File::open(a).unwrap(), File::open(b).unwrap());
    let size = fa.metadata().unwrap().len();
    assert_eq!(size, fb.metadata().unwrap().len());
    let (mut ba, mut bb) = (vec![0u8; BLOCK as usize], vec![0u8; BLOCK as usize]);
    let mut out = BTreeSet::new();
    let mut at = 0;
    while at < size {
        let n = (size - at).min(BLOCK) as usize;
        fa.read_exact_at(&mut ba[..n], at).unwrap();
        fb.read_exact_at(&mut bb[..n], at).unwrap();
        if ba[..n] != bb[..n] {
            out.insert(at / BLOCK);
        }
        at += BLOCK;
    }
    out
}

/// Byte ranges of each slot file of the ext4 image `raw` (debugfs, read-only).
fn slot_file_extents(raw: &Path) -> Vec<Vec<Range<u64>>> {
    let debugfs = |req: &str| {
        let o = Command::new("debugfs")
            .arg("-R")
            .arg(req)
            .arg(raw)
            .output()
            .unwrap();
        assert!(o.status.success(), "debugfs {req}");
        String::from_utf8_lossy(&o.stdout).into_owned()
    };
    let bs: u64 = debugfs("stats")
        .lines()
        .find_map(|l| l.strip_prefix("Block size:"))
        .and_then(|v| v.trim().parse().ok())
        .expect("block size from debugfs stats");
    (0..SLOTS)
        .map(|s| {
            let blocks = debugfs(&format!("blocks /{SLOT_DIR}/{}", slot_file_name(s)));
            let v: Vec<Range<u64>> = blocks
                .split_whitespace()
                .map(|b| {
                    let b: u64 = b.parse().unwrap();
                    b * bs..(b + 1) * bs
                })
                .collect();
            assert_eq!(
                v.iter().map(|r| r.end - r.start).sum::<u64>(),
                SLOT_SIZE as u64,
                "slot file {s}: blocks {blocks:?}"
            );
            v
        })
        .collect()
}

/// The blocks the writer dirtied on each disk between cuts `from` (exclusive) and `to`
/// (inclusive), from the write order: raw slots at their offsets, slot files at their blocks.
fn writer_dirty_blocks(
    spec: &WriterSpec,
    from: u64,
    to: u64,
    os_slot_extents: &[Vec<Range<u64>>],
) -> HashMap<String, BTreeSet<u64>> {
    let layout = spec.layout();
    let order = layout.order();
    let mut out: HashMap<String, BTreeSet<u64>> = HashMap::new();
    // One cycle touches every slot; more adds nothing.
    let to = to.min(from + layout.total());
    for g in from + 1..=to {
        let (t, s) = layout.slot_of(&order, g);
        let disk = spec.targets[t].disk().to_string();
        let ranges = match &spec.targets[t] {
            WriterTarget::Block { .. } => {
                let off = BLOCK_BASE + u64::from(s) * SLOT_SIZE as u64;
                let slot: Range<u64> = off..off + SLOT_SIZE as u64;
                vec![slot]
            }
            WriterTarget::Ext4Files { .. } => os_slot_extents[s as usize].clone(),
        };
        let set = out.entry(disk).or_default();
        for r in ranges {
            for b in r.start / BLOCK..r.end.div_ceil(BLOCK) {
                set.insert(b);
            }
        }
    }
    out
}

struct Scenario {
    rt: tokio::runtime::Runtime,
    spec: WriterSpec,
    scratch: tempfile::TempDir,
    sockets: tempfile::TempDir,
    n: u32,
    /// How long the last backup ran (the next control window).
    window: Duration,
}

impl Scenario {
    fn snapshotter(&self, guest: &Guest) -> QemuSnapshotter {
        QemuSnapshotter::new(QemuOptions::new(
            format!("unix:{}", guest.qmp_socket().display()),
            self.sockets.path(),
        ))
    }

    /// One backup of the running VM through the traits, then its check as one instant.
    fn backup(&mut self, guest: &mut Guest, previous: Option<&Point>) -> Point {
        self.n += 1;
        let name = format!("p{}", self.n);
        let snapshotter: Arc<dyn Snapshotter> = Arc::new(self.snapshotter(guest));
        // The control: the same guest, the same log reads, no backup, as long as the last one.
        let before = last_log_time(&guest.writer_log());
        std::thread::sleep(self.window);
        let control_stall_ms = max_stall_after(&guest.writer_log(), before);
        let offset = guest_clock_offset(guest);
        let before = last_log_time(&guest.writer_log());
        let begun = Instant::now();
        let mut phases = vec![("prepare", host_ns())];
        let pending = self.rt.block_on(snapshotter.prepare("vm1", &name)).unwrap();
        phases.push(("take", host_ns()));
        let started = Instant::now();
        let sources = self.rt.block_on(pending.take()).unwrap();
        let take = started.elapsed();
        phases.push(("read", host_ns()));
        let mut point = Point {
            name: name.clone(),
            images: HashMap::new(),
            previous: HashMap::new(),
            changes: HashMap::new(),
            bytes_read: HashMap::new(),
            take,
            max_stall_ms: 0,
            control_stall_ms,
            window: Duration::ZERO,
            cut: 0,
        };
        let mut read_blocks = Vec::new();
        for s in &sources {
            let disk = s.name().to_string();
            let changes = match previous.and_then(|p| p.previous.get(&disk)) {
                Some(prev) => self.rt.block_on(s.changes_since(prev)).unwrap(),
                None => Changes::Unknown {
                    reason: "first point".into(),
                },
            };
            let unchanged: &[Range<u64>] = match &changes {
                Changes::Unchanged(r) => r,
                Changes::Unknown { .. } => &[],
            };
            let blocks = read_changed(&s.reader(), unchanged);
            let read: u64 = blocks.iter().map(|(_, b)| b.len() as u64).sum();
            point.previous.insert(
                disk.clone(),
                PreviousDisk {
                    point: name.clone(),
                    manifest_digest: String::new(),
                    size: s.reader().size(),
                    tracking: s.tracking(),
                },
            );
            point.bytes_read.insert(disk.clone(), read);
            read_blocks.push((disk.clone(), s.reader().size(), blocks));
            point.changes.insert(disk, changes);
        }
        phases.push(("release", host_ns()));
        for s in sources {
            self.rt
                .block_on(s.release(Outcome::Committed {
                    point: name.clone(),
                    manifest_digest: String::new(),
                    keep: false,
                }))
                .unwrap();
        }
        phases.push(("done", host_ns()));
        point.window = begun.elapsed();
        let log = guest.writer_log();
        for (start, end, gap) in stalls_after(&log, before, offset) {
            let at = |t: i128| {
                let i = phases.iter().rposition(|(_, p)| *p <= t).unwrap_or(0);
                format!("{} +{} ms", phases[i].0, (t - phases[i].1) / 1_000_000)
            };
            eprintln!(
                "{name}: writer stall {gap} ms from {} to {}",
                at(start),
                at(end)
            );
        }
        self.window = point.window.max(Duration::from_secs(1));
        point.max_stall_ms = max_stall_after(&guest.writer_log(), before);

        for (disk, size, blocks) in read_blocks {
            let image = self.scratch.path().join(format!("{name}-{disk}.raw"));
            let unchanged: &[Range<u64>] = match &point.changes[&disk] {
                Changes::Unchanged(r) => r,
                Changes::Unknown { .. } => &[],
            };
            let prev_image = previous.and_then(|p| p.images.get(&disk).map(PathBuf::as_path));
            write_image(size, &blocks, unchanged, prev_image, &image);
            point.images.insert(disk, image);
        }
        let images: HashMap<String, (PathBuf, DiskFormat)> = point
            .images
            .iter()
            .map(|(d, p)| (d.clone(), (p.clone(), DiskFormat::Raw)))
            .collect();
        let check = tempfile::tempdir_in(self.scratch.path()).unwrap();
        point.cut = verify_point(&self.spec, &images, check.path())
            .unwrap_or_else(|e| panic!("{name} is not one instant of both disks: {e}"))
            .cut;
        eprintln!(
            "{name}: cut {} | take {:?} | backup {:?} | longest writer stall {} ms (control {} ms) | read {:?} | {}",
            point.cut,
            take,
            point.window,
            point.max_stall_ms,
            point.control_stall_ms,
            point.bytes_read,
            point
                .changes
                .iter()
                .map(|(d, c)| match c {
                    Changes::Unchanged(r) => format!("{d}: bitmap ({} unchanged ranges)", r.len()),
                    Changes::Unknown { reason } => format!("{d}: full ({reason})"),
                })
                .collect::<Vec<_>>()
                .join("; ")
        );
        point
    }
}

fn unknown_reason<'a>(p: &'a Point, disk: &str) -> &'a str {
    match &p.changes[disk] {
        Changes::Unknown { reason } => reason,
        c => panic!("{}: {disk} was not read in full: {c:?}", p.name),
    }
}

fn assert_trusted(p: &Point, disk: &str) {
    assert!(
        matches!(p.changes[disk], Changes::Unchanged(_)),
        "{}: {disk}'s bitmap was not used: {:?}",
        p.name,
        p.changes[disk]
    );
}

fn boot(os: &Path, data: &Path) -> Guest {
    Guest::boot(
        &GuestSpec::default()
            .disk("os", os, DiskFormat::Qcow2)
            .disk("data", data, DiskFormat::Raw)
            .with_writer(Path::new(env!("CARGO_BIN_EXE_bulwark-guest-writer"))),
    )
}

// ---- the same through the real CLI and a vault --------------------------------------------

fn files_under(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in entries.flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else {
                out.push(p);
            }
        }
    }
    out.sort();
    out
}

fn used_bytes(dir: &Path) -> u64 {
    let s = rustix::fs::statvfs(dir).unwrap();
    (s.f_blocks - s.f_bfree) * s.f_frsize
}

fn os_str(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// `restore` of one disk of `point` to `to`; `format` raw or qcow2.
fn cli_restore(vault: &Path, vm: &str, point: &str, disk: &str, to: &Path, format: &str) {
    let out = bulwark_tests::controller([
        "restore",
        "--vault",
        os_str(vault),
        "--vm",
        vm,
        "--point",
        point,
        "--disk",
        disk,
        "--to",
        os_str(to),
        "--format",
        format,
    ]);
    assert!(
        out.status.success(),
        "restore {point} {disk}: {}",
        bulwark_tests::stderr_of(&out)
    );
}

struct Cli {
    vault: PathBuf,
    run: tempfile::TempDir,
    scratch: PathBuf,
}

impl Cli {
    fn backup_args<'a>(&'a self, vault: &'a Path, qmp: &'a str) -> Vec<&'a str> {
        vec![
            "backup",
            "--vault",
            os_str(vault),
            "--vm",
            "vm1",
            "--qmp",
            qmp,
            "--runtime-dir",
            os_str(self.run.path()),
            "--json",
        ]
    }

    /// A backup through `backup --qmp`, each disk restored and checked as one instant.
    fn backup(
        &self,
        guest: &mut Guest,
        spec: &WriterSpec,
    ) -> (serde_json::Value, HashMap<String, PathBuf>, u64) {
        let qmp = format!("unix:{}", guest.qmp_socket().display());
        let report = bulwark_tests::controller_json(self.backup_args(&self.vault, &qmp));
        let point = report["point"].as_str().unwrap().to_string();
        let mut images = HashMap::new();
        for disk in ["os", "data"] {
            let to = self.scratch.join(format!("cli-{point}-{disk}.raw"));
            cli_restore(&self.vault, "vm1", &point, disk, &to, "raw");
            images.insert(disk.to_string(), to);
        }
        let check = tempfile::tempdir_in(&self.scratch).unwrap();
        let cut = verify_point(
            spec,
            &images
                .iter()
                .map(|(d, p)| (d.clone(), (p.clone(), DiskFormat::Raw)))
                .collect(),
            check.path(),
        )
        .unwrap_or_else(|e| panic!("CLI point {point} is not one instant: {e}"))
        .cut;
        eprintln!("CLI {point}: cut {cut}: {}", report["disks"]);
        (report, images, cut)
    }
}

fn disk_report<'a>(report: &'a serde_json::Value, disk: &str) -> &'a serde_json::Value {
    report["disks"]
        .as_array()
        .unwrap()
        .iter()
        .find(|d| d["name"] == disk)
        .unwrap_or_else(|| panic!("no disk {disk} in {report}"))
}

#[test]
fn running_vm_full_and_incremental_points_through_qemu() {
    if !root_or_skip("qemu_backup", GUEST_TOOLS)
        || !root_or_skip("qemu_backup", &["qemu-storage-daemon"])
    {
        return;
    }
    let tmp = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let fs = image_fs(tmp.path(), 768 * MIB);
    let spec = writer_spec();
    let (os, data) = create_os_and_data_disks(fs.path(), &spec, OS_SIZE, DATA_SIZE);
    let mut sc = Scenario {
        rt: tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap(),
        spec: spec.clone(),
        scratch: tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap(),
        sockets: tempfile::tempdir().unwrap(),
        n: 0,
        window: Duration::from_secs(3),
    };

    // 1. Boot; random filler on both disks (outside the writer's slots), then the writer.
    let mut guest = boot(&os, &data);
    guest.mount_ext4("os");
    guest.sh_ok(
        "dd if=/dev/urandom of=/mnt/os/filler bs=1M count=16 2>/dev/null && sync && \
         dd if=/dev/urandom of=/dev/disk/by-serial/data bs=1M seek=8 count=16 2>/dev/null && sync",
    );
    assert_eq!(guest.start_writer(&spec), 0);

    // 2. Baseline: the writer's stalls with no backup. Each backup also measures a control
    // window just before it (same length, same log reads, no backup): under TCG on 2 shared
    // cores the guest loses the CPU now and then whatever Bulwark does, and by how much depends
    // on the machine's load at that moment. Stalls under 100 ms are not logged.
    let before = last_log_time(&guest.writer_log());
    std::thread::sleep(Duration::from_secs(3));
    let baseline = max_stall_after(&guest.writer_log(), before);
    eprintln!("baseline: longest writer stall without a backup over 3 s: {baseline} ms");

    // 3. Full, then two incrementals.
    let p1 = sc.backup(&mut guest, None);
    std::thread::sleep(Duration::from_secs(2));
    let p2 = sc.backup(&mut guest, Some(&p1));
    std::thread::sleep(Duration::from_secs(2));
    let p3 = sc.backup(&mut guest, Some(&p2));
    let full_os = p1.bytes_read["os"];
    let full_data = p1.bytes_read["data"];
    assert!(
        full_data >= 16 * MIB,
        "the full point read {full_data} bytes of data"
    );
    // The margin a backup's stall may exceed its take by: twice the longest stall seen with
    // no backup (the baseline and every control window), at least 2 x 100 ms.
    let margin_ms = 2 * [&p1, &p2, &p3]
        .iter()
        .map(|p| p.control_stall_ms)
        .fold(baseline.max(100), u64::max);
    for p in [&p1, &p2, &p3] {
        assert!(
            p.max_stall_ms as u128 <= p.take.as_millis() + margin_ms as u128,
            "{}: the writer stalled {} ms during the backup; take {:?} + margin {margin_ms} ms",
            p.name,
            p.max_stall_ms,
            p.take
        );
    }
    let os_slots = slot_file_extents(&p1.images["os"]);
    for (prev, p) in [(&p1, &p2), (&p2, &p3)] {
        assert!(p.cut > prev.cut, "{}: the writer made no progress", p.name);
        let from_writer = writer_dirty_blocks(&spec, prev.cut, p.cut, &os_slots);
        for disk in ["os", "data"] {
            assert_trusted(p, disk);
            // The guest's dirty blocks: the writer's slots written between the two cuts (from
            // its write order), plus whatever else the guest changed (ext4's journal, inodes),
            // seen as the blocks that differ between the two restored points.
            let mut dirty = differing_blocks(&prev.images[disk], &p.images[disk]);
            dirty.extend(from_writer.get(disk).into_iter().flatten());
            let dirty_bytes = dirty.len() as u64 * BLOCK;
            let read = p.bytes_read[disk];
            eprintln!(
                "{}: {disk}: read {read} bytes; guest dirtied {} blocks of {BLOCK} ({dirty_bytes} bytes); full read {}",
                p.name,
                dirty.len(),
                if disk == "os" { full_os } else { full_data }
            );
            assert!(
                read <= 2 * dirty_bytes,
                "{}: {disk}: the incremental read {read} bytes, the guest dirtied {dirty_bytes}",
                p.name
            );
        }
    }

    // 4. A resized disk is read in full, with the reason.
    {
        let qmp = sc
            .rt
            .block_on(Qmp::connect(
                &format!("unix:{}", guest.qmp_socket().display()),
                Duration::from_secs(10),
            ))
            .unwrap();
        // HMP sizes without a suffix are MiB.
        let said = sc
            .rt
            .block_on(qmp.hmp(&format!(
                "block_resize data {}M",
                (DATA_SIZE + 32 * MIB) / MIB
            )))
            .unwrap();
        assert!(said.trim().is_empty(), "block_resize: {said}");
    }
    let p4 = sc.backup(&mut guest, Some(&p3));
    assert!(
        unknown_reason(&p4, "data").contains("resized"),
        "{:?}",
        p4.changes["data"]
    );
    assert!(p4.bytes_read["data"] >= 16 * MIB);
    assert_eq!(p4.previous["data"].size, DATA_SIZE + 32 * MIB);
    assert_trusted(&p4, "os");

    // 5. A new QEMU process: the raw disk's in-memory bitmap is gone; qcow2's persisted.
    let last = guest.writer_stop().last_generation;
    guest.shutdown();
    drop(guest);
    let mut guest = boot(&os, &data);
    assert_eq!(guest.start_writer(&spec), last);
    std::thread::sleep(Duration::from_secs(2));
    let p5 = sc.backup(&mut guest, Some(&p4));
    assert!(
        unknown_reason(&p5, "data").contains("restarted"),
        "{:?}",
        p5.changes["data"]
    );
    assert!(p5.bytes_read["data"] >= 16 * MIB);
    assert_trusted(&p5, "os");
    assert!(p5.cut > last);

    // 6. The same through the real CLI and a vault (64 KiB blocks, as above): a full and an
    // incremental point through `backup --qmp`, each disk restored with `restore`.
    let cli = Cli {
        vault: sc.scratch.path().join("vault"),
        run: tempfile::tempdir().unwrap(),
        scratch: sc.scratch.path().to_path_buf(),
    };
    let init = bulwark_tests::controller([
        "init",
        "--vault",
        os_str(&cli.vault),
        "--block-size",
        "64KiB",
    ]);
    assert!(init.status.success(), "{}", bulwark_tests::stderr_of(&init));
    let (r1, c1, cut1) = cli.backup(&mut guest, &spec);
    std::thread::sleep(Duration::from_secs(2));
    let (r2, c2, cut2) = cli.backup(&mut guest, &spec);
    assert!(cut2 > cut1);
    let os_slots = slot_file_extents(&c1["os"]);
    let from_writer = writer_dirty_blocks(&spec, cut1, cut2, &os_slots);
    for disk in ["os", "data"] {
        let d = disk_report(&r2, disk);
        assert!(
            d.get("change_tracking").is_none_or(|v| v.is_null()),
            "CLI incremental: {disk} was read in full: {d}"
        );
        let mut dirty = differing_blocks(&c1[disk], &c2[disk]);
        dirty.extend(from_writer.get(disk).into_iter().flatten());
        let dirty_bytes = dirty.len() as u64 * BLOCK;
        let read = d["bytes_read"].as_u64().unwrap();
        let full = disk_report(&r1, disk)["bytes_read"].as_u64().unwrap();
        eprintln!(
            "CLI incremental: {disk}: read {read}, guest dirtied {dirty_bytes}, full read {full}"
        );
        assert!(
            read <= 2 * dirty_bytes,
            "CLI incremental: {disk}: read {read} bytes, the guest dirtied {dirty_bytes}"
        );
    }

    // 7. restore --format qcow2: passes `qemu-img check`, equals the raw restore.
    let p2 = r2["point"].as_str().unwrap();
    let q = sc.scratch.path().join("cli-os.qcow2");
    cli_restore(&cli.vault, "vm1", p2, "os", &q, "qcow2");
    bulwark_tests::run(
        "qemu-img",
        [OsStr::new("check"), OsStr::new("-q"), q.as_os_str()],
    );
    let cmp = Command::new("qemu-img")
        .args(["compare", "-q", "-f", "raw", "-F", "qcow2"])
        .args([&c2["os"], &q])
        .status()
        .unwrap();
    assert!(
        cmp.success(),
        "the qcow2 restore differs from the raw restore"
    );
    std::fs::remove_file(&q).unwrap();

    // 8. A controller SIGKILLed mid-transfer: the VM runs on, and the next backup removes the
    // leftovers, succeeds, and still covers what the guest wrote before the killed one.
    guest.sh_ok(
        "dd if=/dev/urandom of=/dev/disk/by-serial/data bs=1M seek=40 count=16 2>/dev/null && sync",
    );
    let points = |v: &Path| {
        bulwark_tests::controller_json(["list", "--vault", os_str(v), "--json"])["points"]
            .as_array()
            .unwrap()
            .len()
    };
    let points_before = points(&cli.vault);
    let files_before = files_under(&cli.vault).len();
    let qmp = format!("unix:{}", guest.qmp_socket().display());
    let mut args = cli.backup_args(&cli.vault, &qmp);
    args.extend(["--upload-concurrency", "1"]);
    let mut child = Command::new(bulwark_tests::controller_bin())
        .args(&args)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let fleece = |dir: &Path| -> Vec<PathBuf> {
        files_under(dir)
            .into_iter()
            .filter(|p| {
                p.file_name()
                    .unwrap()
                    .to_string_lossy()
                    .starts_with("bulwark-fleece-")
            })
            .collect()
    };
    let deadline = Instant::now() + Duration::from_secs(60);
    // Mid-transfer: the fleecing images exist and new blocks have reached the vault.
    while fleece(fs.path()).is_empty() || files_under(&cli.vault).len() < files_before + 4 {
        assert!(
            child.try_wait().unwrap().is_none(),
            "the backup ended before it could be killed"
        );
        assert!(
            Instant::now() < deadline,
            "the backup never started transferring"
        );
        std::thread::sleep(Duration::from_millis(2));
    }
    child.kill().unwrap(); // SIGKILL
    let status = child.wait().unwrap();
    assert_eq!(
        std::os::unix::process::ExitStatusExt::signal(&status),
        Some(9)
    );
    assert!(
        !fleece(fs.path()).is_empty(),
        "no leftovers: the kill did not land mid-transfer"
    );
    assert_eq!(
        points(&cli.vault),
        points_before,
        "the killed backup committed its point: the kill did not land mid-transfer"
    );
    // The VM was never paused: the writer goes on.
    let newest = |guest: &mut Guest| {
        guest
            .writer_log()
            .iter()
            .filter_map(|e| match e {
                WriterEvent::Progress { generation, .. } => Some(*generation),
                _ => None,
            })
            .max()
            .unwrap()
    };
    let g0 = newest(&mut guest);
    std::thread::sleep(Duration::from_secs(1));
    assert!(
        newest(&mut guest) > g0,
        "the writer stopped after the controller was killed"
    );
    let (r3, _, cut3) = cli.backup(&mut guest, &spec);
    assert!(cut3 > cut2);
    assert!(
        fleece(fs.path()).is_empty(),
        "leftovers after the next backup: {:?}",
        fleece(fs.path())
    );
    for disk in ["os", "data"] {
        let d = disk_report(&r3, disk);
        assert!(
            d.get("change_tracking").is_none_or(|v| v.is_null()),
            "after the kill: {disk} was read in full: {d}"
        );
    }
    let read = disk_report(&r3, "data")["bytes_read"].as_u64().unwrap();
    assert!(
        read >= 16 * MIB,
        "the backup after the kill read {read} bytes of data: the 16 MiB written before the killed backup are lost"
    );

    // 9. Nothing left behind.
    let left: Vec<String> = std::fs::read_dir(fs.path())
        .unwrap()
        .chain(std::fs::read_dir(sc.sockets.path()).unwrap())
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with(PREFIX))
        .collect();
    assert!(left.is_empty(), "left behind: {left:?}");
    let leftovers = sc
        .rt
        .block_on(async {
            let qmp = Qmp::connect(
                &format!("unix:{}", guest.qmp_socket().display()),
                Duration::from_secs(10),
            )
            .await?;
            bulwark_qemu::cleanup_leftovers(
                &qmp,
                &bulwark_qemu::FleeceOptions::new(sc.sockets.path()),
            )
            .await
        })
        .unwrap();
    assert!(leftovers.is_empty(), "QEMU still holds {leftovers:?}");

    // 10. Offline: with the VM shut down, the qcow2 and the raw image on ext4 back up through
    // `--disk NAME=PATH` (read in place, locked), with nothing of a disk's size written beside
    // them (df of the image file system watched throughout), and restore to the guest's bytes.
    guest.writer_stop();
    guest.shutdown();
    drop(guest);
    let files_before = files_under(fs.path());
    let used_before = used_bytes(fs.path());
    let os_arg = format!("os={}", os.display());
    let data_arg = format!("data={}", data.display());
    let mut child = Command::new(bulwark_tests::controller_bin())
        .args([
            "backup",
            "--vault",
            os_str(&cli.vault),
            "--vm",
            "vm1off",
            "--disk",
            &os_arg,
            "--disk",
            &data_arg,
            "--runtime-dir",
            os_str(cli.run.path()),
            "--json",
        ])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut peak = used_before;
    while child.try_wait().unwrap().is_none() {
        peak = peak.max(used_bytes(fs.path()));
        std::thread::sleep(Duration::from_millis(2));
    }
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "offline backup: {}",
        bulwark_tests::stderr_of(&out)
    );
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    eprintln!(
        "offline backup: image file system grew by at most {} KiB during it: {}",
        (peak - used_before) / 1024,
        report["disks"]
    );
    assert!(
        peak - used_before < 4 * MIB,
        "{} bytes were written beside the images during an offline backup",
        peak - used_before
    );
    assert_eq!(
        files_under(fs.path()),
        files_before,
        "files appeared beside the images"
    );
    let point = report["point"].as_str().unwrap();
    for (disk, image, format) in [("os", &os, "qcow2"), ("data", &data, "raw")] {
        for restore_format in ["raw", "qcow2"] {
            let to = sc
                .scratch
                .path()
                .join(format!("off-{disk}.{restore_format}"));
            cli_restore(&cli.vault, "vm1off", point, disk, &to, restore_format);
            let same = Command::new("qemu-img")
                .args(["compare", "-q", "-f", restore_format, "-F", format])
                .args([&to, image])
                .status()
                .unwrap();
            assert!(
                same.success(),
                "offline {disk}: the {restore_format} restore differs from the image"
            );
            std::fs::remove_file(&to).unwrap();
        }
    }
    drop(fs);
}
