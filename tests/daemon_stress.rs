//! Two daemons on one vault, with clocks ten minutes apart, while prune and GC run (issue 14,
//! item 8).
//!
//! Two real `bulwark-controller serve` processes stand in for two hosts (`BULWARK_HOST`
//! host-a and host-b, state directories of their own). Their wall clocks are skewed by
//! libfaketime (`LD_PRELOAD`): host-a runs 5 minutes ahead, host-b 5 minutes behind, and the
//! CLI's garbage collections 2 minutes behind (monotonic clocks are left alone). Each daemon
//! backs up its VMs every second; their VM sets overlap (`shared` is in both
//! configurations), and ownership keeps `shared` host-a's: host-b's jobs for it are refused.
//!
//! The VMs' images are rewritten whole (atomic rename) every round from a small universe of
//! blocks, so blocks keep falling out of every live point and coming back: `a1` and `b1`
//! (one per daemon) share one universe and are pruned every round (all but the newest point
//! soft-deleted, earlier ones purged) so GC frees their blocks while backups deduplicate
//! against them; `shared` and `b2` share another and keep every point. Each round a CLI
//! `gc --grace 0` runs while the daemons back up, each VM gets a new point, the newest points
//! of the pruned VMs are restored at once (while backups go on) and a CLI `prune` runs.
//!
//! Afterwards: `verify` is clean, and every point that was ever seen restores to exactly one
//! of the images its VM had, in the order they were written (the pruned VMs' points when
//! they were seen, every other point at the end). A GC that freed a block a running backup
//! relied on breaks one of these.
//!
//! Rounds: `BULWARK_STRESS_ROUNDS` (default 20 on a local vault, 4 on S3).
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod vault_servers;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use bulwark_tests::{Needs, skip, stderr_of};
use bulwark_vault::Vault;
use vault_servers::{Backend, Place, noise, place};

const BLOCK: usize = 64 << 10;
const BLOCKS: usize = 16;
/// The skews, as libfaketime's `FAKETIME` says them, and in seconds.
const SKEW_A: (&str, i64) = ("+5m", 300);
const SKEW_B: (&str, i64) = ("-5m", -300);
const SKEW_GC: &str = "-2m";

const LIBFAKETIME: [&str; 2] = [
    "/usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1",
    "/usr/lib/aarch64-linux-gnu/faketime/libfaketime.so.1",
];

fn libfaketime(test: &str) -> Option<PathBuf> {
    let found = LIBFAKETIME.iter().map(PathBuf::from).find(|p| p.exists());
    if found.is_none() {
        skip(
            test,
            Needs::Servers,
            "libfaketime not installed (Debian package faketime; tests/run.sh installs it)",
        );
    }
    found
}

/// A command of the controller with the store's variables, and a skewed wall clock when `skew`.
fn command(place: &Place, faketime: &Path, skew: Option<&str>, args: &[&str]) -> Command {
    let mut c = place.controller(args);
    c.env("NO_COLOR", "1");
    if let Some(skew) = skew {
        c.env("LD_PRELOAD", faketime)
            .env("FAKETIME", skew)
            .env("FAKETIME_DONT_FAKE_MONOTONIC", "1")
            .env("FAKETIME_NO_CACHE", "1");
    }
    c
}

fn finished(out: Output, what: &str) -> Output {
    assert!(out.status.success(), "{what} failed: {}", stderr_of(&out));
    out
}

/// A daemon, stopped with SIGTERM (by its pid) and then killed if it lingers.
struct Daemon {
    child: Child,
    log: PathBuf,
}

impl Daemon {
    fn stop(&mut self) {
        if self.child.try_wait().unwrap().is_some() {
            return;
        }
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        let until = Instant::now() + Duration::from_secs(30);
        while Instant::now() < until {
            if self.child.try_wait().unwrap().is_some() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.stop();
    }
}

/// The image of `vm` at `version`: 15 blocks from the VM's universe of 40, a window that
/// moves with the version (and repeats every 8 versions), so blocks leave every live point
/// and come back later; and one block of the version's own, so no two versions are alike.
fn image(universe: u64, version: u64) -> Vec<u8> {
    let mut out = Vec::with_capacity(BLOCK * BLOCKS);
    for i in 0..BLOCKS as u64 - 1 {
        let seed = universe * 1000 + (version * 5 + i * 7) % 40;
        out.extend_from_slice(&noise(seed, BLOCK));
    }
    out.extend_from_slice(&noise(universe * 1000 + 500 + version, BLOCK));
    out
}

struct Vm {
    name: &'static str,
    universe: u64,
    path: PathBuf,
    /// Digests of every version written, in order.
    versions: Vec<[u8; 32]>,
    pruned: bool,
}

impl Vm {
    /// Writes the next version whole and renames it over the image, so a snapshot sees one
    /// version or the other, never a mix.
    fn next_version(&mut self) {
        let data = image(self.universe, self.versions.len() as u64);
        let tmp = self.path.with_extension("new");
        std::fs::write(&tmp, &data).unwrap();
        std::fs::rename(&tmp, &self.path).unwrap();
        self.versions.push(*blake3::hash(&data).as_bytes());
    }

    /// The version a restored image is, if it is one.
    fn version_of(&self, restored: &Path) -> Option<usize> {
        let digest = *blake3::hash(&std::fs::read(restored).unwrap()).as_bytes();
        self.versions.iter().position(|d| *d == digest)
    }
}

fn policy() -> &'static str {
    r#"{ time_zone = "UTC", schedule = { frequency = "daily", times = ["02:00"] }, retention = { daily = 1, soft_delete_days = 1 }, consistency = { wanted = "crash", minimum = "crash" } }"#
}

fn write_config(dir: &Path, host: &str, vault: &str, vms: &[&Vm]) -> PathBuf {
    let state = dir.join(host);
    std::fs::create_dir_all(&state).unwrap();
    let mut text = format!(
        "vault = {vault:?}\nstate_dir = {:?}\nruntime_dir = {:?}\nsnapshot_provider = \"copy\"\n\
         concurrency = 3\ncatch_up_hours = 0\nprune = false\ngc_interval_hours = 0\n\
         shutdown_timeout_seconds = 20\n",
        state.join("state").display().to_string(),
        state.join("run").display().to_string(),
    );
    for vm in vms {
        text.push_str(&format!(
            "\n[[vm]]\nname = {:?}\ndisks = [{{ name = \"os\", path = {:?} }}]\npolicy = {}\n\
             schedule_override_seconds = 1\nkeep_snapshots = false\n",
            vm.name,
            vm.path.display().to_string(),
            policy()
        ));
    }
    let file = state.join("bulwark.toml");
    std::fs::write(&file, text).unwrap();
    file
}

fn start(place: &Place, faketime: &Path, skew: &str, host: &str, config: &Path) -> Daemon {
    let log = config.with_file_name("serve.log");
    let child = command(
        place,
        faketime,
        Some(skew),
        &["serve", "--config", &config.display().to_string()],
    )
    .env("BULWARK_HOST", host)
    .env("BULWARK_LOG", "info")
    .stdout(Stdio::null())
    .stderr(std::fs::File::create(&log).unwrap())
    .spawn()
    .expect("start serve");
    Daemon { child, log }
}

/// Restores `vm`'s point `id` from the vault only, in this process, and says which version
/// of the VM's image it is (panics when it is none).
async fn restored_version(vault: &Vault, vm: &Vm, id: &str, dir: &Path) -> usize {
    let to = dir.join(format!("restore-{}-{id}.img", vm.name));
    let mut req = bulwark_controller::RestoreRequest::new(vm.name, id, "os", &to);
    req.from = bulwark_controller::RestoreFrom::Vault;
    req.force = true;
    bulwark_controller::run_restore(req, vault)
        .await
        .unwrap_or_else(|e| panic!("restore of {}/{id}: {e}", vm.name));
    let version = vm.version_of(&to);
    std::fs::remove_file(&to).unwrap();
    version.unwrap_or_else(|| {
        panic!(
            "{}/{id} restored to bytes that no version of its image ever had",
            vm.name
        )
    })
}

/// CLI garbage collections (grace 0, clock 2 minutes behind), one after the other.
struct GcLoop<'a> {
    place: &'a Place,
    faketime: &'a Path,
    vault: &'a str,
    child: Child,
    runs: u64,
    freed: u64,
}

impl<'a> GcLoop<'a> {
    fn spawn(place: &Place, faketime: &Path, vault: &str) -> Child {
        command(
            place,
            faketime,
            Some(SKEW_GC),
            &[
                "gc", "--vault", vault, "--grace", "0", "--wait", "30s", "--json",
            ],
        )
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
    }

    fn start(place: &'a Place, faketime: &'a Path, vault: &'a str) -> Self {
        let child = Self::spawn(place, faketime, vault);
        GcLoop {
            place,
            faketime,
            vault,
            child,
            runs: 0,
            freed: 0,
        }
    }

    /// Counts a finished GC and starts the next.
    fn poll(&mut self, round: u64) {
        if self.child.try_wait().unwrap().is_some() {
            let next = Self::spawn(self.place, self.faketime, self.vault);
            let done = std::mem::replace(&mut self.child, next);
            self.count(done, round);
        }
    }

    fn count(&mut self, child: Child, round: u64) {
        if let Some(freed) = gc_result(child, round) {
            self.freed += freed;
            self.runs += 1;
        }
    }

    /// Waits for the running GC: (GCs run, blocks freed).
    fn finish(self, round: u64) -> (u64, u64) {
        let GcLoop {
            child, runs, freed, ..
        } = self;
        match gc_result(child, round) {
            Some(f) => (runs + 1, freed + f),
            None => (runs, freed),
        }
    }
}

/// The blocks a finished GC freed; `None` when it gave up waiting for the backups' leases
/// (GC yields to backups by design: under backups every second it may find no gap).
fn gc_result(child: Child, round: u64) -> Option<u64> {
    let out = child.wait_with_output().unwrap();
    if !out.status.success() && stderr_of(&out).contains("cannot take a gc lease") {
        eprintln!("round {round}: a GC found no gap between backups and gave up");
        return None;
    }
    let out = finished(out, &format!("round {round}: gc"));
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    Some(report["blocks_freed"].as_u64().unwrap())
}

fn rounds(default: u64) -> u64 {
    std::env::var("BULWARK_STRESS_ROUNDS")
        .ok()
        .and_then(|r| r.parse().ok())
        .unwrap_or(default)
}

async fn scenario(backend: Backend, rounds: u64) {
    let test = format!("daemon_stress on {backend:?}");
    let Some(faketime) = libfaketime(&test) else {
        return;
    };
    let Some(place) = place(backend, "daemon_stress") else {
        return;
    };
    let started = Instant::now();
    let real_start = jiff::Timestamp::now();
    let root = place.dir.path().to_path_buf();
    let v = place.location.clone();
    finished(
        command(
            &place,
            &faketime,
            None,
            &["init", "--vault", &v, "--block-size", "64KiB"],
        )
        .output()
        .unwrap(),
        "init",
    );
    let vault = Vault::open_with(&v, &place.options).await.unwrap();
    let mk = |name: &'static str, universe: u64, pruned: bool| {
        let mut vm = Vm {
            name,
            universe,
            path: root.join(format!("{name}.img")),
            versions: Vec::new(),
            pruned,
        };
        vm.next_version();
        vm
    };
    // a1 and b1 (pruned) share universe 1; shared and b2 (kept) universe 2.
    let mut vms = [
        mk("a1", 1, true),
        mk("shared", 2, false),
        mk("b1", 1, true),
        mk("b2", 2, false),
    ];
    let config_a = write_config(&root, "host-a", &v, &[&vms[0], &vms[1]]);
    let config_b = write_config(&root, "host-b", &v, &[&vms[2], &vms[3], &vms[1]]);
    let policy_file = root.join("policy.toml");
    std::fs::write(
        &policy_file,
        "time_zone = \"UTC\"\n[schedule]\nfrequency = \"daily\"\ntimes = [\"02:00\"]\n\
         [retention]\ndaily = 1\nsoft_delete_days = 1\n",
    )
    .unwrap();

    let list = |vault: &Vault, vm: &'static str| {
        let vault = vault.clone();
        async move {
            let l = vault.list_points(Some(vm)).await.unwrap();
            assert!(l.broken.is_empty(), "{vm}: broken points {:?}", l.broken);
            l.points
        }
    };
    // host-a first, so that it claims `shared`; then host-b.
    let mut a = start(&place, &faketime, SKEW_A.0, "host-a", &config_a);
    let until = Instant::now() + Duration::from_secs(60);
    while list(&vault, "shared").await.is_empty() {
        assert!(
            Instant::now() < until,
            "host-a made no point of shared: {}",
            a.log()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let mut b = start(&place, &faketime, SKEW_B.0, "host-b", &config_b);

    // Every point seen, and the version it restored to (pruned VMs: at once).
    let mut seen: BTreeMap<&'static str, BTreeSet<String>> = BTreeMap::new();
    let mut checked: BTreeMap<(&'static str, String), usize> = BTreeMap::new();
    let (mut freed, mut gcs_that_ran, mut purged) = (0u64, 0u64, 0u64);
    let base = jiff::Timestamp::now();
    for round in 0..rounds {
        for vm in vms.iter_mut() {
            vm.next_version();
        }
        // GC with grace 0, one after the other, while both daemons back up.
        let mut gc = GcLoop::start(&place, &faketime, &v);
        // Every VM gets a new point.
        let until = Instant::now() + Duration::from_secs(90);
        let mut fresh: BTreeMap<&'static str, Vec<String>> = BTreeMap::new();
        for vm in &vms {
            loop {
                let new: Vec<String> = list(&vault, vm.name)
                    .await
                    .into_iter()
                    .map(|p| p.id)
                    .filter(|id| !seen.get(vm.name).is_some_and(|s| s.contains(id)))
                    .collect();
                if !new.is_empty() {
                    fresh.insert(vm.name, new);
                    break;
                }
                assert!(
                    Instant::now() < until,
                    "round {round}: no new point of {}\nhost-a: {}\nhost-b: {}",
                    vm.name,
                    a.log(),
                    b.log()
                );
                gc.poll(round);
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
        // The pruned VMs' new points restore now, before the next prune; backups go on.
        for vm in vms.iter().filter(|vm| vm.pruned) {
            for id in &fresh[vm.name] {
                match vault.get_point(vm.name, id).await {
                    Ok(_) => {
                        gc.poll(round);
                        let version = restored_version(&vault, vm, id, &root).await;
                        checked.insert((vm.name, id.clone()), version);
                    }
                    // Listed, then pruned before we read it: only an earlier prune can do that,
                    // and the newest point is never pruned.
                    Err(e) => panic!("round {round}: {}/{id}: {e}", vm.name),
                }
            }
        }
        for (vm, ids) in fresh {
            seen.entry(vm).or_default().extend(ids);
        }
        let (runs, blocks) = gc.finish(round);
        gcs_that_ran += runs;
        freed += blocks;
        // Prune the pruned VMs as of a later day each round: all but the newest point
        // soft-deleted, those soft-deleted in earlier rounds purged.
        let now = base
            .checked_add(jiff::SignedDuration::from_hours(48 * (round as i64 + 1)))
            .unwrap()
            .to_string();
        for vm in vms.iter().filter(|vm| vm.pruned) {
            let out = finished(
                command(
                    &place,
                    &faketime,
                    None,
                    &[
                        "prune",
                        "--vault",
                        &v,
                        "--vm",
                        vm.name,
                        "--policy",
                        &policy_file.display().to_string(),
                        "--now",
                        &now,
                        "--json",
                    ],
                )
                .output()
                .unwrap(),
                &format!("round {round}: prune {}", vm.name),
            );
            let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
            purged += report["purged"].as_array().unwrap().len() as u64;
        }
        eprintln!(
            "round {round}: {:.1} s, {gcs_that_ran} GCs so far, blocks freed {freed}, points purged {purged}",
            started.elapsed().as_secs_f64()
        );
    }
    a.stop();
    b.stop();
    let (log_a, log_b) = (a.log(), b.log());

    // The end: one more GC, verify clean, every point restores to a version, in order.
    finished(
        command(
            &place,
            &faketime,
            None,
            &["gc", "--vault", &v, "--grace", "0"],
        )
        .output()
        .unwrap(),
        "final gc",
    );
    finished(
        command(&place, &faketime, None, &["verify", "--vault", &v])
            .output()
            .unwrap(),
        "verify",
    );
    for vm in &vms {
        let points = list(&vault, vm.name).await;
        if !vm.pruned {
            assert!(
                points.len() as u64 >= rounds,
                "{}: {} points after {rounds} rounds",
                vm.name,
                points.len()
            );
        }
        for p in &points {
            let version = restored_version(&vault, vm, &p.id, &root).await;
            checked.insert((vm.name, p.id.clone()), version);
        }
        // Points in the order their owner made them restore to versions in the order they
        // were written.
        let mut by_time: Vec<_> = checked
            .iter()
            .filter(|((name, _), _)| *name == vm.name)
            .map(|((_, id), version)| (id.clone(), *version))
            .collect();
        by_time.sort();
        assert!(
            by_time.windows(2).all(|w| w[0].1 <= w[1].1),
            "{}: versions out of order: {by_time:?}",
            vm.name
        );
        // Round r writes version r + 1 and waits for a point, which may have been taken
        // just before: the last round's point is version `rounds - 1` or later.
        assert!(
            by_time.last().is_some_and(|(_, v)| *v as u64 + 1 >= rounds),
            "{}: the last point is not of the last rounds: {by_time:?}",
            vm.name
        );
        // Whose clock made each point: host-a's points are 5 minutes ahead, host-b's behind.
        let skew = if ["a1", "shared"].contains(&vm.name) {
            SKEW_A.1
        } else {
            SKEW_B.1
        };
        for p in &points {
            let ahead = p.created.as_second() - real_start.as_second();
            let behind_now = p.created.as_second() - jiff::Timestamp::now().as_second();
            assert!(
                if skew > 0 {
                    ahead > skew - 60
                } else {
                    behind_now < skew + 60
                },
                "{}/{}: created {} is not on its owner's clock ({skew:+} s)",
                vm.name,
                p.id,
                p.created
            );
        }
    }
    // `shared` is host-a's: host-b's jobs for it were refused, naming the owner.
    assert!(
        log_b.contains("backed up by host-a"),
        "host-b never refused shared: {log_b}"
    );
    assert!(!log_a.contains("backed up by host-b"), "{log_a}");
    assert!(freed > 0, "GC never freed a block: the test proved nothing");
    assert!(purged > 0, "prune never purged a point");
    let total: usize = seen.values().map(BTreeSet::len).sum();
    eprintln!(
        "daemon_stress on {backend:?}: {rounds} rounds, {total} points seen, {} restored \
         bit-exact, {gcs_that_ran} GCs freed {freed} blocks, {purged} points purged, {:.1} s",
        checked.len(),
        started.elapsed().as_secs_f64()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_skewed_daemons_prune_and_gc_local() {
    scenario(Backend::Local, rounds(20)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_skewed_daemons_prune_and_gc_s3() {
    scenario(Backend::S3, rounds(4)).await;
}
