//! The agent inside a real guest (QEMU under TCG), one guest for the whole file:
//!
//! 1. `bulwark-agent` in the guest listening on the virtio-serial port `org.bulwark.agent.0`,
//!    reached from the host through QEMU's chardev socket, with the point-in-time writer
//!    running on the guest's ext4 `os` disk: while frozen the guest's writes block; 5 quiesces
//!    (freeze + immediate thaw) and the guest's I/O freeze window of each, from the writer's
//!    stall log; a controller that dies in the middle of a frame while the guest is frozen:
//!    the guest thaws and the next session resynchronises; the agent SIGKILLed inside the guest
//!    while frozen: the guardian thaws within deadline + 1 s.
//! 2. The same agent over TCP + mutual TLS through QEMU user networking (127.0.0.1 forward).
//! 3. The guest with only qemu-ga (Debian's binary): freeze-list / status / thaw through
//!    `bulwark_qemu::qga`, and a freezing process SIGSTOPped while the guest is frozen: its
//!    watchdog process thaws within deadline + 1 s.
//!
//! Root only (the guest disks live on a loop-mounted ext4 image).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::{BufRead, BufReader, Write};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use bulwark_protocol::{
    AgentState, Client, Connection, client_config, connect_tcp, connect_virtio_serial,
    enroll_agent, enroll_controller, ensure_ca,
};
use bulwark_qemu::qga::{FreezeStatus, Qga};
use bulwark_tests::guest::{
    DiskFormat, GUEST_TOOLS, Guest, GuestSpec, WriterSpec, base64_encode, create_os_and_data_disks,
    image_fs, last_generation, qemu_ga_binary, stalls, start_guest_agent, stop_guest_agent,
    stripped,
};
use bulwark_tests::{agent_bin, root_or_skip};
use tokio::io::AsyncWriteExt;

const SLOTS: u32 = 64;
const DISK_SIZE: u64 = 64 << 20;
const AGENT_PORT: &str = "org.bulwark.agent.0";
const QGA_PORT: &str = "org.qemu.guest_agent.0";
const TLS_PORT: u16 = 7070;

fn writer_spec() -> WriterSpec {
    WriterSpec::os_files_and_data_blocks(SLOTS)
}

/// The longest writer stall that appeared after the first `before` stalls (the freeze window
/// of one quiesce; `None`: no gap over the writer's 100 ms threshold).
fn new_stall(guest: &mut Guest, before: usize) -> Option<u64> {
    // Give the writer time to complete the blocked write and log it.
    std::thread::sleep(Duration::from_millis(700));
    stalls(&guest.writer_log())[before..].iter().copied().max()
}

fn median(mut v: Vec<u64>) -> u64 {
    v.sort_unstable();
    v[v.len() / 2]
}

fn virtio_config() -> String {
    format!(
        "listen = \"virtio-serial:{AGENT_PORT}\"\nstate_dir = \"/run/bulwark-agent\"\n\
         hostname = \"guest-under-test\"\n\n[freeze]\nmounts = [\"/mnt/os\"]\n"
    )
}

async fn virtio_client(socket: &Path) -> Client<tokio::net::UnixStream> {
    let mut client = Client::new(connect_virtio_serial(socket).await.unwrap());
    client.set_reply_timeout(Some(Duration::from_secs(60)));
    let hello = client.hello("guest-agent-test", "0", &[]).await.unwrap();
    assert_eq!(hello.agent.hostname, "guest-under-test");
    client
}

#[test]
fn agent_in_a_real_guest_over_virtio_serial_tls_and_qemu_guest_agent() {
    if !root_or_skip("guest_agent", GUEST_TOOLS) {
        return;
    }
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let tmp = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let fs = image_fs(tmp.path(), 512 << 20);
    let spec = writer_spec();
    let (os, data) = create_os_and_data_disks(fs.path(), &spec, DISK_SIZE, DISK_SIZE);
    let qga_bin = qemu_ga_binary(Path::new(env!("CARGO_TARGET_TMPDIR")));

    let mut guest = Guest::boot(
        &GuestSpec {
            memory_mib: 384,
            ..GuestSpec::default()
        }
        .disk("os", &os, DiskFormat::Qcow2)
        .disk("data", &data, DiskFormat::Raw)
        .port(AGENT_PORT)
        .port(QGA_PORT)
        .forward(TLS_PORT)
        .binary(
            &stripped(&agent_bin(), Path::new(env!("CARGO_TARGET_TMPDIR"))),
            "/bin/bulwark-agent",
        )
        .binary(&qga_bin, "/bin/qemu-ga")
        .with_writer(Path::new(env!("CARGO_BIN_EXE_bulwark-guest-writer"))),
    );
    eprintln!("guest booted in {:.1?}", guest.boot_time());
    guest.start_writer(&spec);
    let agent_socket = guest.port_socket(AGENT_PORT);

    // ---- 1. bulwark-agent over virtio-serial ----------------------------------------------
    start_guest_agent(&mut guest, &virtio_config());

    // A first session, with the agent's log on failure.
    let first = rt.block_on(async {
        let conn = connect_virtio_serial(&agent_socket).await?;
        let mut c = Client::new(conn);
        c.set_reply_timeout(Some(Duration::from_secs(30)));
        c.hello("guest-agent-test", "0", &[]).await
    });
    if let Err(e) = first {
        let (_, log) = guest.sh("cat /run/agent.out /run/agent.err");
        panic!("first session failed: {e}\nagent log:\n{log}");
    }

    // While frozen, the guest's writes to the frozen fs block.
    let before = stalls(&guest.writer_log()).len();
    rt.block_on(async {
        let mut c = virtio_client(&agent_socket).await;
        let frozen = c.freeze(Duration::from_secs(20)).await.unwrap();
        assert_eq!(frozen.mounts, ["/mnt/os"]);
        std::thread::sleep(Duration::from_millis(300));
        let g1 = last_generation(&guest.writer_log());
        std::thread::sleep(Duration::from_millis(1500));
        let g2 = last_generation(&guest.writer_log());
        assert_eq!(g1, g2, "the guest wrote to its frozen file system");
        let thawed = c.thaw().await.unwrap();
        assert!(thawed.held_continuously, "{thawed:?}");
    });
    let blocked = new_stall(&mut guest, before).expect("no stall while frozen for 1.8 s");
    assert!(blocked >= 1500, "the writer stalled only {blocked} ms");

    // 5 quiesces, thawed as soon as frozen (the QMP snapshot would go in between).
    let mut windows = Vec::new();
    let mut agent_windows = Vec::new();
    let mut round_trips = Vec::new();
    for i in 0..5 {
        let before = stalls(&guest.writer_log()).len();
        let (agent_ms, rt_ms) = rt.block_on(async {
            let mut c = virtio_client(&agent_socket).await;
            let t = Instant::now();
            c.freeze(Duration::from_secs(20)).await.unwrap();
            let thawed = c.thaw().await.unwrap();
            assert!(thawed.held_continuously, "quiesce {i}: {thawed:?}");
            assert_eq!(c.status().await.unwrap().state, AgentState::Idle);
            (thawed.frozen_for_ms, t.elapsed().as_millis() as u64)
        });
        // No stall over 100 ms: the window was under the writer's threshold; count it as 100.
        windows.push(new_stall(&mut guest, before).unwrap_or(100));
        agent_windows.push(agent_ms);
        round_trips.push(rt_ms);
    }
    eprintln!(
        "virtio-serial quiesces: guest I/O freeze window (writer stall, ms; 100 = under the \
         threshold) {windows:?} median {} max {}; agent frozen_for_ms {agent_windows:?}; host \
         freeze+thaw round trip ms {round_trips:?}",
        median(windows.clone()),
        windows.iter().max().unwrap()
    );

    // A controller dies in the middle of a frame while the guest is frozen: the agent ends the
    // session (the host side disconnected), which thaws; the next controller resynchronises.
    let before = stalls(&guest.writer_log()).len();
    rt.block_on(async {
        let mut c = virtio_client(&agent_socket).await;
        c.freeze(Duration::from_secs(30)).await.unwrap();
        let mut raw = c.into_inner();
        let stream: &mut tokio::net::UnixStream = raw_stream(&mut raw);
        stream
            .write_all(&[0, 0, 1, 0, b'{', b'"', b'v'])
            .await
            .unwrap();
        stream.flush().await.unwrap();
        drop(raw);
        // A new session at once: stale bytes in the stream must not confuse it.
        let mut c = virtio_client(&agent_socket).await;
        c.ping().await.unwrap();
        let t = Instant::now();
        loop {
            if c.status().await.unwrap().state == AgentState::Idle {
                break;
            }
            assert!(t.elapsed() < Duration::from_secs(10), "still frozen");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    });
    let dead_window = new_stall(&mut guest, before).unwrap_or(100);
    assert!(
        dead_window < 10_000,
        "frozen {dead_window} ms after the controller died"
    );
    eprintln!("controller died mid-frame while frozen: the guest was frozen {dead_window} ms");

    // The agent SIGKILLed in the guest while frozen (deadline 3 s): the guardian thaws.
    let deadline_ms = 3000;
    let before = stalls(&guest.writer_log()).len();
    rt.block_on(async {
        let mut c = virtio_client(&agent_socket).await;
        c.freeze(Duration::from_millis(deadline_ms)).await.unwrap();
        guest.sh_ok("kill -KILL $(cat /run/agent.pid)");
        drop(c);
    });
    std::thread::sleep(Duration::from_millis(deadline_ms + 1000));
    // The freeze call succeeded, so the file system was frozen; a thaw quicker than the
    // writer's stall threshold (100 ms) logs no stall at all.
    let killed_window = new_stall(&mut guest, before).unwrap_or(0);
    // Thawed for real: the writer goes on.
    let g0 = last_generation(&guest.writer_log());
    std::thread::sleep(Duration::from_millis(1000));
    let g1 = last_generation(&guest.writer_log());
    assert!(
        g1 > g0,
        "the writer made no progress ({g0} -> {g1}): still frozen after the agent was killed"
    );
    eprintln!(
        "agent SIGKILLed while frozen (deadline {deadline_ms} ms): the guest was frozen \
         {killed_window} ms"
    );
    assert!(
        killed_window <= deadline_ms + 1000,
        "the guest stayed frozen {killed_window} ms after its agent was killed"
    );
    let (_, out) = guest.sh("grep ' /mnt/os ' /proc/mounts; cat /run/agent.err | tail -5");
    assert!(out.contains("/mnt/os"), "{out}");

    // ---- 2. TCP + mutual TLS through user networking ---------------------------------------
    let pki = tmp.path().join("pki");
    ensure_ca(&pki.join("ca"), "bulwark test CA").unwrap();
    let agent_tls =
        enroll_agent(&pki.join("ca"), &pki.join("agent"), "guest-under-test", &[]).unwrap();
    let ctl_tls = enroll_controller(&pki.join("ca"), &pki.join("ctl"), "controller").unwrap();
    for (name, path) in [
        ("ca.pem", &agent_tls.ca_cert),
        ("agent.pem", &agent_tls.cert),
        ("agent.key", &agent_tls.key),
    ] {
        let b64 = base64_encode(&std::fs::read(path).unwrap());
        guest.sh_ok(&format!(
            "mkdir -p /etc/bulwark-agent/tls && echo {b64} | base64 -d > /etc/bulwark-agent/tls/{name} && chmod 600 /etc/bulwark-agent/tls/{name}"
        ));
    }
    start_guest_agent(
        &mut guest,
        &format!(
            "listen = \"tcp:0.0.0.0:{TLS_PORT}\"\nstate_dir = \"/run/bulwark-agent\"\n\
             hostname = \"guest-under-test\"\n\n[tls]\nca = \"/etc/bulwark-agent/tls/ca.pem\"\n\
             cert = \"/etc/bulwark-agent/tls/agent.pem\"\nkey = \"/etc/bulwark-agent/tls/agent.key\"\n\n\
             [freeze]\nmounts = [\"/mnt/os\"]\n"
        ),
    );
    let before = stalls(&guest.writer_log()).len();
    let tls_agent_ms = rt.block_on(async {
        let addr = format!("127.0.0.1:{}", guest.forwarded_port(TLS_PORT));
        let conn = connect_tcp(addr, "guest-under-test", client_config(&ctl_tls).unwrap())
            .await
            .unwrap();
        let mut c = Client::new(conn);
        c.set_reply_timeout(Some(Duration::from_secs(60)));
        let hello = c.hello("guest-agent-test", "0", &[]).await.unwrap();
        assert_eq!(hello.agent.hostname, "guest-under-test");
        let frozen = c.freeze(Duration::from_secs(20)).await.unwrap();
        assert_eq!(frozen.mounts, ["/mnt/os"]);
        let thawed = c.thaw().await.unwrap();
        assert!(thawed.held_continuously);
        thawed.frozen_for_ms
    });
    let tls_window = new_stall(&mut guest, before).unwrap_or(100);
    eprintln!(
        "TCP + mTLS quiesce: agent frozen_for_ms {tls_agent_ms}, writer stall {tls_window} ms"
    );
    // A client without a certificate from this CA is refused.
    rt.block_on(async {
        let other = tmp.path().join("other");
        ensure_ca(&other.join("ca"), "another CA").unwrap();
        let stranger =
            enroll_controller(&other.join("ca"), &other.join("ctl"), "stranger").unwrap();
        let addr = format!("127.0.0.1:{}", guest.forwarded_port(TLS_PORT));
        let refused =
            match connect_tcp(addr, "guest-under-test", client_config(&stranger).unwrap()).await {
                Err(_) => true,
                Ok(conn) => Client::new(conn).hello("x", "0", &[]).await.is_err(),
            };
        assert!(refused, "a controller of another CA was served");
    });
    stop_guest_agent(&mut guest);

    // ---- 3. only qemu-ga ---------------------------------------------------------------------
    guest.sh_ok(&format!(
        "mkdir -p /run/qga && (setsid /bin/qemu-ga -m virtio-serial -p /dev/virtio-ports/{QGA_PORT} \
         -t /run/qga -f /run/qga/pid </dev/null >/run/qga/out 2>&1 &)"
    ));
    let qga_socket = guest.port_socket(QGA_PORT);
    let before = stalls(&guest.writer_log()).len();
    let version = rt.block_on(async {
        let mut qga = Qga::connect(&qga_socket, Duration::from_secs(60))
            .await
            .unwrap();
        let info = qga.info().await.unwrap();
        assert!(info.fsfreeze, "{info:?}");
        assert_eq!(qga.status().await.unwrap(), FreezeStatus::Thawed);
        let n = qga.freeze(Some(&["/mnt/os".to_string()])).await.unwrap();
        assert_eq!(n, 1);
        assert_eq!(qga.status().await.unwrap(), FreezeStatus::Frozen);
        assert_eq!(qga.thaw().await.unwrap(), 1);
        assert_eq!(qga.status().await.unwrap(), FreezeStatus::Thawed);
        info.version
    });
    let qga_window = new_stall(&mut guest, before).unwrap_or(100);
    eprintln!("qemu-ga {version}: freeze-list/status/thaw, writer stall {qga_window} ms");

    // The freezing process is SIGSTOPped while the guest is frozen: its watchdog thaws.
    let deadline_ms: u64 = 3000;
    let before = stalls(&guest.writer_log()).len();
    let mut freezer = Command::new(env!("CARGO_BIN_EXE_bulwark-qga-freeze"))
        .arg(&qga_socket)
        .arg(deadline_ms.to_string())
        .arg("20000")
        .arg("/mnt/os")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let pid = rustix::process::Pid::from_raw(freezer.id() as i32).unwrap();
    let mut lines = BufReader::new(freezer.stdout.take().unwrap()).lines();
    let info = lines.next().unwrap().unwrap();
    assert!(info.starts_with("info "), "{info}");
    assert_eq!(lines.next().unwrap().unwrap(), "frozen 1");
    rustix::process::kill_process(pid, rustix::process::Signal::STOP).unwrap();
    std::thread::sleep(Duration::from_millis(deadline_ms + 1500));
    let watchdog_window = new_stall(&mut guest, before).unwrap_or_else(|| {
        panic!(
            "the guest is still frozen {deadline_ms} ms + 1.5 s after the freeze (or never froze)"
        )
    });
    rustix::process::kill_process(pid, rustix::process::Signal::CONT).unwrap();
    eprintln!(
        "qemu-ga freezer SIGSTOPped while frozen (deadline {deadline_ms} ms): the guest was \
         frozen {watchdog_window} ms"
    );
    assert!(
        watchdog_window <= deadline_ms + 1000,
        "the watchdog did not thaw in time: frozen {watchdog_window} ms"
    );
    assert!(
        watchdog_window >= deadline_ms - 1000,
        "frozen only {watchdog_window} ms"
    );
    // Resumed, it finds the watchdog fired and says so.
    let done = lines.next().unwrap().unwrap();
    assert!(
        done.contains("fired=true") && done.contains("Thawed"),
        "{done}"
    );
    let mut err = String::new();
    std::io::Read::read_to_string(&mut freezer.stderr.take().unwrap(), &mut err).unwrap();
    assert!(freezer.wait().unwrap().success(), "{err}");
    eprint!("{err}");
    assert!(
        err.contains("thawed 1 file system(s)"),
        "the watchdog did not report its thaw: {err}"
    );
    let _ = std::io::stderr().flush();

    let summary = guest.writer_stop();
    eprintln!("writer: {summary:?}");
    guest.shutdown();
    drop(guest);
    drop(fs);
}

fn raw_stream(conn: &mut Connection<tokio::net::UnixStream>) -> &mut tokio::net::UnixStream {
    conn.get_mut()
}
