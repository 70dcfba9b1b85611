//! PostgreSQL application consistency inside a real guest, under pgbench (issue 12, item 4): ONE
//! Debian guest (`tests/guest/debian.sh`: systemd as PID 1, the suite's PostgreSQL, Debian 12:
//! 15) booted under TCG on a qcow2 overlay of the cached image, with a raw ext4 disk `pg` holding
//! the cluster (`/mnt/pg/data`, copied from the image's initdb'd template), `bulwark-agent` on
//! the virtio-serial port `org.bulwark.agent.0` freezing `/mnt/pg`, and its pre/post scripts.
//!
//! The mechanism, and why: the pre-script runs a `CHECKPOINT` while the cluster still serves
//! (so that the shutdown checkpoint has little left to write), then stops the cluster cleanly and
//! fast (`pg_ctl stop -m fast`: sessions are ended, their open transactions roll back, the
//! shutdown checkpoint writes every committed transaction into the data files) and checks that
//! `pg_control` says `shut down`; the post-script starts it again. A copy of that disk is a
//! cluster that starts without any WAL replay. The price is an outage, measured below (from the
//! stop to the end of the post-script's start), during which clients are disconnected and must
//! reconnect (the pgbench loop does). `pg_backup_start`/`pg_backup_stop` would keep the server up, but its copy
//! only starts through recovery from a `backup_label` that the backup tool must write into the
//! restored data directory (it comes from `pg_backup_stop`, after the snapshot): not "starts
//! without recovery", and not something a block-level backup can put in the image.
//!
//! The workload: a loop running `pgbench` (2 clients, 20 transactions/s) with a custom script,
//! pgbench's TPC-B-like transaction plus one row in a `ledger` table (the transaction's
//! `txid_current()` and `clock_timestamp()`), in the same transaction; the loop restarts pgbench
//! when the pre-script's stop ends its sessions. The scripts log their start and end times (the
//! guest's clock, as the ledger's) outside the frozen disk.
//!
//! In order:
//! 1. 3 `application` points of the running VM: `backup --qmp unix:QMP --agent
//!    virtio-serial:unix:SOCK --disk pg --min-consistency application`, a few seconds of
//!    pgbench between them;
//! 2. a `crash` point of the same workload (no agent: no scripts, no freeze);
//! 3. the live ledger, after pgbench is stopped: the reference of what was committed when;
//! 4. each point restored and hot-plugged into the SAME guest (QMP `blockdev-add` +
//!    `device_add` into a free PCIe root port), mounted, and its cluster started on another
//!    port as a second server, then checked:
//!    * application points: `pg_control` says `shut down` and there is no `postmaster.pid`
//!      before the start; the server log has no crash-recovery line (`was not properly shut
//!      down`, `automatic recovery in progress`, `was interrupted`, `redo starts at`) and says
//!      `database system was shut down at`; `pg_amcheck --all --heapallindexed` passes; the
//!      restored ledger holds every transaction of the live ledger stamped before the
//!      pre-script started, and is exactly the live ledger's rows stamped before the
//!      post-script started (the cluster was down in between); pgbench committed again after
//!      each post-script;
//!    * the crash point: `pg_control` says `in production` and the server log shows the crash
//!      recovery (the contrast: the same check that the application points pass fails here);
//!      after the recovery `pg_amcheck` passes and every restored ledger row is in the live
//!      ledger.
//!
//! Broken once on purpose (the pre-script made to log its times and exit 0, the post-script
//! likewise): the backup still reported `application` (the agent cannot tell a script that
//! quiesces from one that does nothing), and the test failed at the first check: "app1: the
//! restored cluster needed crash recovery (pg_control said \"in production\" ...)".
//!
//! Printed: the freeze window of each point, the pre-script's duration (checkpoint, stop) and
//! the outage (stop, the agent's freeze/snapshot/thaw between the scripts, start), the
//! transaction counts. Root only (mmdebstrap, QEMU; no loop device: the images are plain
//! files); skips otherwise, fails instead under `BULWARK_REQUIRE_ROOT_TESTS=1`. About 6.5 minutes
//! here (2 cores shared with other builds, load average 13 to 15, TCG) with the image cached and
//! the binaries built.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::time::{Duration, Instant};

use bulwark_tests::guest::{
    DiskFormat, GUEST_TOOLS, Guest, GuestSpec, build_debian_guest, create_overlay,
    create_payload_disk, start_guest_agent, stripped,
};
use bulwark_tests::{agent_bin, controller, controller_json, root_or_skip, stderr_of};
use serde_json::Value;

const VM: &str = "pgvm";
const AGENT_PORT: &str = "org.bulwark.agent.0";
const PG_DISK_SIZE: u64 = 384 << 20;
const APP_POINTS: usize = 3;
/// The guest's PostgreSQL binaries (a link tests/guest/debian/customize.sh makes).
const PG_BIN: &str = "/usr/local/lib/bulwark-pg-bin";
/// The workload's directory in the guest (tmpfs: never frozen, never backed up).
const WORK: &str = "/run/bulwark-pg";
/// Where the scripts log their start and end times.
const SCRIPT_LOG: &str = "/run/bulwark-pg-scripts.log";

const AGENT_TOML: &str = "listen = \"virtio-serial:org.bulwark.agent.0\"
state_dir = \"/run/bulwark-agent\"
[freeze]
mounts = [\"/mnt/pg\"]
max_timeout_ms = 60000
[scripts]
continue_on_failure = false
[[scripts.pre]]
path = \"/etc/bulwark-agent/pg-pre.sh\"
timeout = 120
[[scripts.post]]
path = \"/etc/bulwark-agent/pg-post.sh\"
timeout = 300
";

/// The pre-script: a checkpoint while the cluster still serves (so that the shutdown checkpoint
/// has little left to write), then a clean, fast stop, and proof of it from `pg_control`.
const PRE_SCRIPT: &str = r#"#!/bin/sh
# Bulwark pre-script: stops the PostgreSQL cluster cleanly (fast: sessions are ended, their open
# transactions roll back; the shutdown checkpoint writes every committed one to the data files),
# so that a copy of the disk starts without recovery. Fails unless pg_control says "shut down".
# The CHECKPOINT first, while clients are still served, shortens the outage.
set -eu
B=/usr/local/lib/bulwark-pg-bin
echo "pre-start $(date +%s.%N)" >>/run/bulwark-pg-scripts.log
/usr/sbin/runuser -u postgres -- "$B/psql" -h /run/postgresql -X -q -d postgres -c CHECKPOINT
echo "pre-stop $(date +%s.%N)" >>/run/bulwark-pg-scripts.log
/usr/sbin/runuser -u postgres -- "$B/pg_ctl" -D /mnt/pg/data -m fast -w -t 60 stop >/dev/null
state=$(/usr/sbin/runuser -u postgres -- "$B/pg_controldata" -D /mnt/pg/data | sed -n 's/^Database cluster state: *//p')
[ "$state" = "shut down" ] || { echo "cluster state after the stop: $state" >&2; exit 1; }
echo "pre-end $(date +%s.%N)" >>/run/bulwark-pg-scripts.log
"#;

/// The post-script: start the cluster again.
const POST_SCRIPT: &str = r#"#!/bin/sh
# Bulwark post-script: starts the PostgreSQL cluster the pre-script stopped.
set -eu
B=/usr/local/lib/bulwark-pg-bin
echo "post-start $(date +%s.%N)" >>/run/bulwark-pg-scripts.log
/usr/sbin/runuser -u postgres -- "$B/pg_ctl" -D /mnt/pg/data -l /var/lib/postgresql/live.log -w -t 300 start >/dev/null
echo "post-end $(date +%s.%N)" >>/run/bulwark-pg-scripts.log
"#;

/// pgbench's built-in TPC-B-like transaction plus one ledger row in the same transaction.
const LEDGER_SQL: &str = r#"\set aid random(1, 100000 * :scale)
\set bid random(1, 1 * :scale)
\set tid random(1, 10 * :scale)
\set delta random(-5000, 5000)
BEGIN;
UPDATE pgbench_accounts SET abalance = abalance + :delta WHERE aid = :aid;
SELECT abalance FROM pgbench_accounts WHERE aid = :aid;
UPDATE pgbench_tellers SET tbalance = tbalance + :delta WHERE tid = :tid;
UPDATE pgbench_branches SET bbalance = bbalance + :delta WHERE bid = :bid;
INSERT INTO pgbench_history (tid, bid, aid, delta, mtime) VALUES (:tid, :bid, :aid, :delta, CURRENT_TIMESTAMP);
INSERT INTO ledger (txid, t) VALUES (txid_current(), clock_timestamp());
END;
"#;

/// Runs pgbench again whenever it ends (the pre-script's stop ends its sessions; while the
/// cluster is down it fails to connect at once) until `stop` exists.
const WORKLOAD_SH: &str = r#"#!/bin/sh
B=/usr/local/lib/bulwark-pg-bin
d=/run/bulwark-pg
while [ ! -e $d/stop ]; do
    /usr/sbin/runuser -u postgres -- /bin/sh -c "echo \$\$ >$d/pgbench.pid; exec $B/pgbench -n -c 2 -j 1 -R 20 -T 100000 -f $d/ledger.sql -h /run/postgresql bench" >>$d/pgbench.log 2>&1
    echo "pgbench ended $(date +%s.%N)" >>$d/pgbench.log
    sleep 0.2
done
"#;

/// Lines of a server log that say it replayed WAL after a crash.
const RECOVERY_MARKERS: &[&str] = &[
    "was not properly shut down",
    "automatic recovery in progress",
    "was interrupted",
    "redo starts at",
];

/// Writes `content` to `path` in the guest with mode `mode`.
fn put(guest: &mut Guest, path: &str, mode: &str, content: &str) {
    guest.sh_ok(&format!(
        "cat >{path} <<'BULWARK_EOF'\n{content}BULWARK_EOF\nchmod {mode} {path}"
    ));
}

/// An empty raw ext4 disk.
fn empty_ext4(image: &Path, size: u64) {
    let f = std::fs::File::create(image).unwrap();
    f.set_len(size).unwrap();
    drop(f);
    bulwark_tests::run(
        "mkfs.ext4",
        ["-q".as_ref(), "-F".as_ref(), image.as_os_str()],
    );
}

/// The script log's times: the last `pre-start`, `pre-end`, `post-start`, `post-end`.
#[derive(Debug, Clone, Copy)]
struct ScriptTimes {
    pre_start: f64,
    pre_stop: f64,
    pre_end: f64,
    post_start: f64,
    post_end: f64,
}

impl ScriptTimes {
    fn last(log: &str) -> ScriptTimes {
        let last = |what: &str| -> f64 {
            log.lines()
                .rev()
                .find_map(|l| {
                    l.strip_prefix(what)
                        .map(|v| v.trim().parse::<f64>().unwrap())
                })
                .unwrap_or_else(|| panic!("no {what} line in the scripts' log:\n{log}"))
        };
        let t = ScriptTimes {
            pre_start: last("pre-start "),
            pre_stop: last("pre-stop "),
            pre_end: last("pre-end "),
            post_start: last("post-start "),
            post_end: last("post-end "),
        };
        assert!(
            t.pre_start <= t.pre_stop
                && t.pre_stop <= t.pre_end
                && t.pre_end <= t.post_start
                && t.post_start <= t.post_end,
            "the scripts' times are out of order: {t:?}"
        );
        t
    }
}

/// One backup of the test: its report, and the scripts' times for an application point.
struct Point {
    id: String,
    report: Value,
    scripts: Option<ScriptTimes>,
}

struct Env {
    vault: String,
    qmp: String,
    agent: String,
    run: String,
}

impl Env {
    fn backup(&self, with_agent: bool) -> (Value, Duration) {
        let mut args = vec![
            "backup",
            "--vault",
            &self.vault,
            "--vm",
            VM,
            "--qmp",
            &self.qmp,
            "--disk",
            "pg",
            "--runtime-dir",
            &self.run,
            "--json",
        ];
        if with_agent {
            args.extend([
                "--agent",
                &self.agent,
                "--consistency",
                "application",
                "--min-consistency",
                "application",
            ]);
        }
        let t = Instant::now();
        let report = controller_json(&args);
        (report, t.elapsed())
    }

    fn restore(&self, point: &str, to: &Path) {
        let out = controller([
            "restore",
            "--vault",
            &self.vault,
            "--vm",
            VM,
            "--point",
            point,
            "--disk",
            "pg",
            "--to",
            to.to_str().unwrap(),
        ]);
        assert!(out.status.success(), "restore {point}: {}", stderr_of(&out));
    }
}

/// What the restored cluster showed.
struct Checked {
    /// `pg_control`'s state before the start.
    state: String,
    /// A `postmaster.pid` was on the disk.
    pid_file: bool,
    /// The server log of the start.
    log: String,
    /// `pg_amcheck`'s status and output.
    amcheck: (i32, String),
    /// The ledger's transaction ids.
    ledger: BTreeSet<u64>,
}

/// Plugs the restored image into the guest as disk `name`, mounts it and starts its cluster as a
/// second server (port 5433), checks it, stops it and unmounts.
fn check_restored(guest: &mut Guest, name: &str, image: &Path) -> Checked {
    guest.hot_add_disk(name, image, DiskFormat::Raw);
    let d = format!("/mnt/{name}");
    let state = guest.sh_ok(&format!(
        "set -e; end=$(($(date +%s) + 60)); while [ ! -e /dev/disk/by-id/virtio-{name} ]; do \
         [ $(date +%s) -lt $end ] || {{ echo 'the hot-plugged disk did not appear' >&2; exit 1; }}; sleep 0.1; done; \
         mkdir -p {d}; mount -t ext4 /dev/disk/by-id/virtio-{name} {d}; \
         /usr/sbin/runuser -u postgres -- {PG_BIN}/pg_controldata -D {d}/data | sed -n 's/^Database cluster state: *//p'"
    ));
    // A copy of a running cluster holds the lock file of its postmaster, which is alive in this
    // guest: the server would refuse to start. A restored VM boots without that process; the
    // file goes, as on a fresh boot.
    let pid_file = guest
        .sh_ok(&format!(
            "if [ -e {d}/data/postmaster.pid ]; then rm {d}/data/postmaster.pid; echo yes; else echo no; fi"
        ))
        .trim()
        == "yes";
    let log_path = format!("{WORK}/{name}.log");
    let (st, out) = guest.sh(&format!(
        "/usr/sbin/runuser -u postgres -- {PG_BIN}/pg_ctl -D {d}/data -o '-p 5433' -l {log_path} -w -t 300 start 2>&1"
    ));
    let log = guest.sh_ok(&format!("cat {log_path}"));
    assert_eq!(
        st, 0,
        "{name}: the restored cluster did not start: {out}\n{log}"
    );
    let t = Instant::now();
    let amcheck = guest.sh(&format!(
        "/usr/sbin/runuser -u postgres -- {PG_BIN}/pg_amcheck -h /run/postgresql -p 5433 --all \
         --install-missing --heapallindexed 2>&1"
    ));
    eprintln!("{name}: pg_amcheck in {:.1?}", t.elapsed());
    let ledger = guest
        .sh_ok(&format!(
            "/usr/sbin/runuser -u postgres -- {PG_BIN}/psql -h /run/postgresql -p 5433 -X -At \
             -v ON_ERROR_STOP=1 -d bench -c 'SELECT txid FROM ledger ORDER BY txid'"
        ))
        .lines()
        .map(|l| l.trim().parse::<u64>().unwrap())
        .collect();
    guest.sh_ok(&format!(
        "/usr/sbin/runuser -u postgres -- {PG_BIN}/pg_ctl -D {d}/data -m fast -w -t 120 stop >/dev/null && umount {d}"
    ));
    Checked {
        state: state.trim().to_string(),
        pid_file,
        log,
        amcheck,
        ledger,
    }
}

fn recovery_lines(log: &str) -> Vec<&str> {
    log.lines()
        .filter(|l| RECOVERY_MARKERS.iter().any(|m| l.contains(m)))
        .collect()
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

#[test]
fn postgres_in_a_guest_application_points_start_without_recovery() {
    if !root_or_skip(
        "guest_postgres",
        &[GUEST_TOOLS, &["mmdebstrap", "strip"]].concat(),
    ) {
        return;
    }
    let test_started = Instant::now();
    let image = build_debian_guest();
    if image.build_time > Duration::ZERO {
        eprintln!("Debian guest image built in {:.1?}", image.build_time);
    }
    let tmp = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let t = tmp.path();

    // Disks: an overlay of the cached root, the cluster's disk, the payload (the agent).
    let overlay = t.join("root.qcow2");
    create_overlay(&overlay, &image.root);
    let pg_disk = t.join("pg.raw");
    empty_ext4(&pg_disk, PG_DISK_SIZE);
    let payload_dir = t.join("payload");
    std::fs::create_dir_all(&payload_dir).unwrap();
    let agent = stripped(&agent_bin(), Path::new(env!("CARGO_TARGET_TMPDIR")));
    std::fs::copy(&agent, payload_dir.join("bulwark-agent")).unwrap();
    let payload = t.join("payload.raw");
    create_payload_disk(&payload_dir, &payload, 32 << 20);
    std::fs::remove_dir_all(&payload_dir).unwrap();

    let mut guest = Guest::boot(
        &GuestSpec {
            memory_mib: 768,
            boot_timeout: Duration::from_secs(300),
            system: Some(image.system.clone()),
            hotplug_slots: APP_POINTS as u32 + 1,
            ..GuestSpec::default()
        }
        .disk("root", &overlay, DiskFormat::Qcow2)
        .disk("pg", &pg_disk, DiskFormat::Raw)
        .disk("payload", &payload, DiskFormat::Raw)
        .port(AGENT_PORT),
    );
    eprintln!("Debian guest booted in {:.1?}", guest.boot_time());

    // ---- the cluster, the workload, the agent ------------------------------------------------
    let t_setup = Instant::now();
    let version = guest.sh_ok(&format!(
        "set -e; mkdir -p /mnt/payload /mnt/pg; \
         mount -o ro /dev/disk/by-id/virtio-payload /mnt/payload; \
         install -m 0755 /mnt/payload/bulwark-agent /usr/bin/bulwark-agent; umount /mnt/payload; \
         mount -t ext4 /dev/disk/by-id/virtio-pg /mnt/pg; \
         cp -a /var/lib/postgresql/bulwark-template /mnt/pg/data; \
         install -d -o postgres -g postgres /run/postgresql {WORK}; \
         R='/usr/sbin/runuser -u postgres --'; \
         $R {PG_BIN}/pg_ctl -D /mnt/pg/data -l /var/lib/postgresql/live.log -w -t 300 start >/dev/null; \
         $R {PG_BIN}/createdb -h /run/postgresql bench; \
         $R {PG_BIN}/pgbench -h /run/postgresql -i -s 1 -q bench 2>/dev/null; \
         $R {PG_BIN}/psql -h /run/postgresql -X -q -v ON_ERROR_STOP=1 -d bench \
            -c 'CREATE TABLE ledger (txid bigint PRIMARY KEY, t timestamptz NOT NULL)'; \
         $R {PG_BIN}/postgres --version"
    ));
    eprintln!(
        "cluster on /mnt/pg initialised (pgbench -i -s 1) in {:.1?}: {}",
        t_setup.elapsed(),
        version.trim()
    );
    put(
        &mut guest,
        &format!("{WORK}/ledger.sql"),
        "0644",
        LEDGER_SQL,
    );
    put(
        &mut guest,
        &format!("{WORK}/workload.sh"),
        "0755",
        WORKLOAD_SH,
    );
    guest.sh_ok("mkdir -p /etc/bulwark-agent");
    put(
        &mut guest,
        "/etc/bulwark-agent/pg-pre.sh",
        "0755",
        PRE_SCRIPT,
    );
    put(
        &mut guest,
        "/etc/bulwark-agent/pg-post.sh",
        "0755",
        POST_SCRIPT,
    );
    start_guest_agent(&mut guest, AGENT_TOML);
    guest.sh_ok(&format!(
        "setsid {WORK}/workload.sh >/dev/null 2>&1 </dev/null & echo $! >{WORK}/loop.pid"
    ));

    let ledger_count = |guest: &mut Guest| -> u64 {
        guest
            .sh_ok(&format!(
                "/usr/sbin/runuser -u postgres -- {PG_BIN}/psql -h /run/postgresql -X -At -d bench \
                 -c 'SELECT count(*) FROM ledger'"
            ))
            .trim()
            .parse()
            .unwrap()
    };
    let wait_commits = |guest: &mut Guest, more_than: u64| {
        let t = Instant::now();
        loop {
            let n = ledger_count(guest);
            if n > more_than {
                return n;
            }
            let (_, log) = guest.sh(&format!("tail -5 {WORK}/pgbench.log"));
            assert!(
                t.elapsed() < Duration::from_secs(120),
                "pgbench committed nothing in 120 s ({n} ledger rows):\n{log}"
            );
            std::thread::sleep(Duration::from_millis(500));
        }
    };
    wait_commits(&mut guest, 0);
    std::thread::sleep(Duration::from_secs(5));

    let env = Env {
        vault: t.join("vault").display().to_string(),
        qmp: format!("unix:{}", guest.qmp_socket().display()),
        agent: format!(
            "virtio-serial:unix:{}",
            guest.port_socket(AGENT_PORT).display()
        ),
        run: {
            let r = t.join("run");
            std::fs::create_dir_all(&r).unwrap();
            r.display().to_string()
        },
    };

    // ---- 3 application points, then a crash point --------------------------------------------
    let mut points = Vec::new();
    for i in 1..=APP_POINTS {
        let before = ledger_count(&mut guest);
        let (report, took) = env.backup(true);
        assert_eq!(report["consistency"], "application", "{report:#}");
        let scripts = ScriptTimes::last(&guest.sh_ok(&format!("cat {SCRIPT_LOG}")));
        let ms = |a: f64, b: f64| (b - a) * 1000.0;
        eprintln!(
            "application point {i}: {} in {took:.1?}; freeze window {} ms; pre-script {:.0} ms \
             (CHECKPOINT {:.0} ms, clean stop {:.0} ms); cluster down {:.0} ms (stop {:.0} ms, \
             pre-script end to post-script start {:.0} ms, start {:.0} ms)",
            report["point"],
            report["freeze_window_ms"],
            ms(scripts.pre_start, scripts.pre_end),
            ms(scripts.pre_start, scripts.pre_stop),
            ms(scripts.pre_stop, scripts.pre_end),
            ms(scripts.pre_stop, scripts.post_end),
            ms(scripts.pre_stop, scripts.pre_end),
            ms(scripts.pre_end, scripts.post_start),
            ms(scripts.post_start, scripts.post_end),
        );
        points.push(Point {
            id: report["point"].as_str().unwrap().to_string(),
            report,
            scripts: Some(scripts),
        });
        // pgbench reconnects and commits again after the post-script.
        let now = wait_commits(&mut guest, before);
        eprintln!("  ledger rows: {before} before the backup, {now} after");
        std::thread::sleep(Duration::from_secs(3));
    }
    let (report, took) = env.backup(false);
    assert_eq!(report["consistency"], "crash", "{report:#}");
    eprintln!("crash point: {} in {took:.1?}", report["point"]);
    points.push(Point {
        id: report["point"].as_str().unwrap().to_string(),
        report,
        scripts: None,
    });

    // ---- the live ledger: what was committed, when --------------------------------------------
    guest.sh_ok(&format!(
        "touch {WORK}/stop; loop=$(cat {WORK}/loop.pid); end=$(($(date +%s) + 120)); \
         while kill -0 $loop 2>/dev/null; do kill -TERM $(cat {WORK}/pgbench.pid) 2>/dev/null; \
         [ $(date +%s) -lt $end ] || exit 1; sleep 0.2; done"
    ));
    let live: BTreeMap<u64, f64> = guest
        .sh_ok(&format!(
            "/usr/sbin/runuser -u postgres -- {PG_BIN}/psql -h /run/postgresql -X -At -F ' ' -d bench \
             -c 'SELECT txid, extract(epoch FROM t) FROM ledger ORDER BY txid'"
        ))
        .lines()
        .map(|l| {
            let (id, t) = l.split_once(' ').unwrap();
            (id.parse().unwrap(), t.parse().unwrap())
        })
        .collect();
    let (_, ended) = guest.sh(&format!("grep -c 'pgbench ended' {WORK}/pgbench.log"));
    eprintln!(
        "live ledger: {} transactions committed; pgbench restarted {} times",
        live.len(),
        ended.trim()
    );

    // ---- each point restored into the same guest and checked -----------------------------------
    let mut freeze = Vec::new();
    let mut pre = Vec::new();
    let mut down = Vec::new();
    for (i, p) in points.iter().enumerate() {
        let name = if p.scripts.is_some() {
            format!("app{}", i + 1)
        } else {
            "crash".to_string()
        };
        let restored = t.join(format!("{name}.raw"));
        env.restore(&p.id, &restored);
        let c = check_restored(&mut guest, &name, &restored);
        let recovery = recovery_lines(&c.log);
        let not_live: Vec<_> = c.ledger.iter().filter(|x| !live.contains_key(x)).collect();
        assert!(
            not_live.is_empty(),
            "{name}: {} restored ledger rows were never committed in the live cluster: {:?}",
            not_live.len(),
            &not_live[..not_live.len().min(10)]
        );
        assert_eq!(
            c.amcheck.0, 0,
            "{name}: pg_amcheck failed on the restored cluster:\n{}",
            c.amcheck.1
        );
        match p.scripts {
            Some(s) => {
                assert!(
                    recovery.is_empty(),
                    "{name}: the restored cluster needed crash recovery (pg_control said {:?} \
                     before the start):\n{}",
                    c.state,
                    recovery.join("\n")
                );
                assert_eq!(
                    c.state, "shut down",
                    "{name}: pg_control of the restored cluster is not 'shut down'"
                );
                assert!(
                    !c.pid_file,
                    "{name}: a postmaster.pid was on the restored disk"
                );
                assert!(
                    c.log.contains("database system was shut down at"),
                    "{name}: the server log does not say it was shut down:\n{}",
                    c.log
                );
                let before_pre: Vec<u64> = live
                    .iter()
                    .filter(|(_, t)| **t < s.pre_start)
                    .map(|(id, _)| *id)
                    .collect();
                let missing: Vec<_> = before_pre
                    .iter()
                    .filter(|id| !c.ledger.contains(id))
                    .collect();
                assert!(
                    missing.is_empty(),
                    "{name}: {} of the {} transactions committed before the pre-script are not \
                     in the restored cluster: {:?}",
                    missing.len(),
                    before_pre.len(),
                    &missing[..missing.len().min(10)]
                );
                let before_post: BTreeSet<u64> = live
                    .iter()
                    .filter(|(_, t)| **t < s.post_start)
                    .map(|(id, _)| *id)
                    .collect();
                assert_eq!(
                    c.ledger, before_post,
                    "{name}: the restored ledger is not exactly what was committed before the \
                     post-script restarted the cluster"
                );
                let after = live.values().filter(|t| **t > s.post_end).count();
                assert!(
                    after > 0,
                    "{name}: pgbench committed nothing after the post-script"
                );
                eprintln!(
                    "{name}: clean start (pg_control 'shut down', no recovery in the log), \
                     pg_amcheck clean, {} of {} transactions committed before the pre-script \
                     present, {} in the restore, {} committed after the post-script",
                    before_pre.len(),
                    before_pre.len(),
                    c.ledger.len(),
                    after
                );
                freeze.push(p.report["freeze_window_ms"].as_f64().unwrap());
                pre.push((s.pre_end - s.pre_start) * 1000.0);
                down.push((s.post_end - s.pre_stop) * 1000.0);
            }
            None => {
                assert_eq!(
                    c.state, "in production",
                    "{name}: pg_control of a crash copy should say 'in production'"
                );
                assert!(
                    !recovery.is_empty(),
                    "{name}: the crash-level copy started without recovery?\n{}",
                    c.log
                );
                eprintln!(
                    "{name}: pg_control 'in production', postmaster.pid left: {}, recovery needed:\n  {}\n  \
                     then pg_amcheck clean, {} ledger rows restored",
                    c.pid_file,
                    recovery.join("\n  "),
                    c.ledger.len()
                );
            }
        }
        std::fs::remove_file(&restored).unwrap();
    }
    eprintln!(
        "application points: freeze window median {:.0} ms, max {:.0} ms; pre-script median \
         {:.0} ms, max {:.0} ms; cluster down median {:.0} ms, max {:.0} ms (guest clock)",
        median(&mut freeze.clone()),
        freeze.iter().copied().fold(0.0, f64::max),
        median(&mut pre.clone()),
        pre.iter().copied().fold(0.0, f64::max),
        median(&mut down.clone()),
        down.iter().copied().fold(0.0, f64::max),
    );
    guest.sh_ok(&format!(
        "/usr/sbin/runuser -u postgres -- {PG_BIN}/pg_ctl -D /mnt/pg/data -m fast -w -t 120 stop >/dev/null"
    ));
    guest.shutdown();
    drop(guest);
    eprintln!("guest_postgres: {:.1?} in all", test_started.elapsed());
}
