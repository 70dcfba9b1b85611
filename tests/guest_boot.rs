//! A real guest under QEMU (TCG) with two virtio disks on a loop-mounted ext4 host directory — an
//! ext4 file system in a qcow2 image (`os`) and a raw image (`data`) — runs the point-in-time
//! writer over both disks; after it stops and the guest shuts down, the checker must find every
//! slot of both images at the writer's last generation, and the file system disk must pass
//! e2fsck. Root only (loop mounts).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::HashMap;
use std::path::Path;
use std::time::Duration;

use bulwark_tests::guest::{
    DiskFormat, GUEST_TOOLS, Guest, GuestSpec, WriterEvent, WriterSpec, create_os_and_data_disks,
    image_fs, verify_point,
};
use bulwark_tests::root_or_skip;

const SLOTS: u32 = 64;
const DISK_SIZE: u64 = 64 << 20;

fn writer_spec() -> WriterSpec {
    WriterSpec::os_files_and_data_blocks(SLOTS)
}

#[test]
fn guest_writer_leaves_one_point_in_time_on_qcow2_and_raw_disks_on_ext4() {
    if !root_or_skip("guest_boot", GUEST_TOOLS) {
        return;
    }
    let tmp = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let fs = image_fs(tmp.path(), 512 << 20);
    let spec = writer_spec();
    let (os, data) = create_os_and_data_disks(fs.path(), &spec, DISK_SIZE, DISK_SIZE);

    let mut guest = Guest::boot(
        &GuestSpec::default()
            .disk("os", &os, DiskFormat::Qcow2)
            .disk("data", &data, DiskFormat::Raw)
            .port("org.bulwark.test.0")
            .forward(7000)
            .with_writer(Path::new(env!("CARGO_BIN_EXE_bulwark-guest-writer"))),
    );
    eprintln!(
        "guest boot (QEMU start to ready marker): {:.2?} wall, {:.2?} of QEMU CPU time",
        guest.boot_time(),
        guest.boot_cpu_time()
    );
    // Wall time depends on how loaded the 2 shared cores are; QEMU's own CPU time does not.
    if let Some(cpu) = guest.boot_cpu_time() {
        assert!(
            cpu < Duration::from_secs(10),
            "the boot took {cpu:?} of CPU"
        );
    }
    assert!(guest.qmp_socket().exists(), "no QMP socket");
    let (st, out) = guest.sh("ls /dev/disk/by-serial/; exit 7");
    assert_eq!(st, 7);
    assert_eq!(out.split_whitespace().collect::<Vec<_>>(), ["data", "os"]);

    // An extra virtio-serial port reaches the host's Unix socket.
    let mut port = std::os::unix::net::UnixStream::connect(guest.port_socket("org.bulwark.test.0"))
        .expect("connect to the extra port");
    guest.sh_ok("echo via-port > /dev/virtio-ports/org.bulwark.test.0");
    let mut line = String::new();
    port.set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    std::io::BufRead::read_line(&mut std::io::BufReader::new(&mut port), &mut line).unwrap();
    assert_eq!(line, "via-port\n");
    // User networking forwards 127.0.0.1:<port> to the guest's TCP port 7000.
    guest.sh_ok("setsid nc -l -p 7000 -e echo via-net </dev/null >/dev/null 2>&1 &");
    let mut got = String::new();
    for _ in 0..100 {
        if let Ok(mut c) = std::net::TcpStream::connect(("127.0.0.1", guest.forwarded_port(7000))) {
            c.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
            got.clear();
            let _ = std::io::Read::read_to_string(&mut c, &mut got);
            if !got.is_empty() {
                break;
            }
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    assert_eq!(got, "via-net\n");

    // A fresh state: the writer starts after generation 0.
    assert_eq!(guest.start_writer(&spec), 0);
    std::thread::sleep(Duration::from_secs(3));

    // Pause: no write happens until resume.
    let paused = guest.writer_pause();
    assert!(paused > 0, "the writer wrote nothing in 3 s");
    std::thread::sleep(Duration::from_millis(500));
    guest.writer_resume();
    let log = guest.writer_log();
    assert!(
        log.contains(&WriterEvent::Resumed {
            generation: paused,
            t_ns: match log
                .iter()
                .find(|e| matches!(e, WriterEvent::Resumed { .. }))
            {
                Some(WriterEvent::Resumed { t_ns, .. }) => *t_ns,
                _ => panic!("no resume in the log: {log:?}"),
            }
        }),
        "the writer wrote while paused: {log:?}"
    );
    std::thread::sleep(Duration::from_secs(3));

    let summary = guest.writer_stop();
    eprintln!(
        "writer: {} writes in {:.1} s = {:.0} writes/s (4 KiB, O_DIRECT|O_DSYNC, alternating \
         ext4 file / raw block), longest gap {} ms, last generation {}",
        summary.writes, summary.secs, summary.rate, summary.max_gap_ms, summary.last_generation
    );
    assert!(
        summary.writes > 2 * u64::from(SLOTS),
        "too few writes: {summary:?}"
    );
    assert!(summary.last_generation > paused);
    let progress = guest
        .writer_log()
        .iter()
        .filter(|e| matches!(e, WriterEvent::Progress { .. }))
        .count();
    assert!(progress > 10, "the writer logged little progress");

    guest.shutdown();
    assert!(!guest.is_running());
    drop(guest);

    let images = HashMap::from([
        ("os".to_string(), (os.clone(), DiskFormat::Qcow2)),
        ("data".to_string(), (data.clone(), DiskFormat::Raw)),
    ]);
    let scratch = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let cut = verify_point(&spec, &images, scratch.path()).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(
        cut.cut, summary.last_generation,
        "the images hold an older point than the writer's last write"
    );
    drop(fs);
}
