//! Retention, soft delete, undelete, garbage collection and leases, through the real
//! `bulwark-controller` binary on a local vault (and the controller library for the stress
//! test, where backups, prunes and GC run at the same time).

// Test code: a failed unwrap is a failed test, helpers included.
#![allow(clippy::unwrap_used)]

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use bulwark_blockdiff::{Address, BlockMap, BlockSize, Entry, content_address};
use bulwark_controller::{
    BackupRequest, NoObserver, RestoreFrom, RestoreRequest, run_backup, run_restore,
};
use bulwark_policy::{PointInfo, Policy};
use bulwark_snapshot::{ImageDisk, ImageSnapshotter};
use bulwark_tests::*;
use bulwark_vault::lease::{LeaseRecord, write_lease_record};
use bulwark_vault::{
    ConsistencyRecord, CreateOptions, DiskRecord, DiskStats, GcOptions, LeaseKind, LeaseOptions,
    ManifestRef, RecoveryPoint, Vault,
};
use jiff::Timestamp;
use serde_json::Value;

const BLOCK: usize = 64 * 1024;

/// The shared test environment, with a 64 KiB-block vault, and this file's helpers.
struct Env(TestEnv);

impl std::ops::Deref for Env {
    type Target = TestEnv;
    fn deref(&self) -> &TestEnv {
        &self.0
    }
}

impl Env {
    fn new() -> Env {
        Env(TestEnv::init(&["--block-size", "64KiB"]))
    }

    fn write_policy(&self, name: &str, retention: &str) -> PathBuf {
        let p = self.path(name);
        let text = format!(
            "time_zone = \"UTC\"\n\n[schedule]\nfrequency = \"daily\"\ntimes = [\"02:30\"]\n\n[retention]\n{retention}\n"
        );
        std::fs::write(&p, text).unwrap();
        p
    }

    fn run(&self, args: &[&str]) -> Value {
        let mut all: Vec<&str> = args.to_vec();
        all.extend(["--vault", &self.vault, "--json"]);
        controller_json(&all)
    }

    fn fails(&self, args: &[&str]) -> String {
        let mut all: Vec<&str> = args.to_vec();
        all.extend(["--vault", &self.vault]);
        let out = controller(&all);
        assert!(
            !out.status.success(),
            "{all:?} should fail; stdout: {}",
            stdout_of(&out)
        );
        stderr_of(&out)
    }

    fn backup(&self, vm: &str, image: &Path) -> String {
        let r = self.0.backup(vm, &[format!("d0={}", image.display())], &[]);
        r["point"].as_str().unwrap().to_string()
    }

    fn points(&self, vm: &str) -> Vec<RecoveryPoint> {
        let r = self.run(&["list", "--vm", vm]);
        serde_json::from_value(r["points"].clone()).unwrap()
    }

    fn deleted_ids(&self, vm: &str) -> BTreeSet<String> {
        let r = self.run(&["list", "--deleted", "--vm", vm]);
        r["deleted"]
            .as_array()
            .unwrap()
            .iter()
            .map(|d| d["point"]["id"].as_str().unwrap().to_string())
            .collect()
    }

    fn verify_ok(&self) {
        let r = self.run(&["verify"]);
        assert_eq!(r["ok"], true, "{r}");
    }
}

fn ids(points: &[RecoveryPoint]) -> BTreeSet<String> {
    points.iter().map(|p| p.id.clone()).collect()
}

/// Commits a point of `vm` at `created` with one block of its own and one shared by all.
async fn synthetic_point(v: &Vault, vm: &str, n: u64, created: Timestamp) -> RecoveryPoint {
    let bs = BlockSize::new(BLOCK as u32).unwrap();
    let mut entries = Vec::new();
    for data in [pseudo_random(BLOCK, 1_000_000), pseudo_random(BLOCK, n)] {
        let address = content_address(&data, None);
        v.put_block(address, data.into()).await.unwrap();
        entries.push(Entry::Data { change: 1, address });
    }
    let map = BlockMap::new(bs, 2 * BLOCK as u64, entries).unwrap();
    let id = bulwark_vault::new_point_id(created);
    let (digest, _) = v
        .put_manifest(
            &ManifestRef {
                vm,
                disk: "d0",
                point: &id,
            },
            &map,
        )
        .await
        .unwrap();
    let p = RecoveryPoint {
        id,
        vm: vm.into(),
        created,
        committed: created,
        consistency: ConsistencyRecord::crash(),
        disks: vec![DiskRecord {
            name: "d0".into(),
            size: 2 * BLOCK as u64,
            block_size: BLOCK as u32,
            manifest_digest: digest,
            source: String::new(),
            stats: DiskStats::default(),
            tracking: None,
        }],
        policy: None,
        agent: None,
    };
    v.commit_point(&p).await.unwrap();
    p
}

#[tokio::test(flavor = "multi_thread")]
async fn prune_keeps_exactly_the_policy_keep_set() {
    let env = Env::new();
    let vault = Vault::open(&env.vault).await.unwrap();
    // 40 daily points, one a day at 01:30 UTC.
    let first: Timestamp = "2026-10-01T01:30:00Z".parse().unwrap();
    let mut all = Vec::new();
    for d in 0..40u64 {
        let t = first.checked_add(Duration::from_secs(d * 86_400)).unwrap();
        all.push(synthetic_point(&vault, "synth", d, t).await);
    }
    let text = "daily = 5\nweekly = { count = 3, weekday = \"sunday\" }\nmonthly = { count = 2, day = 1 }\nsoft_delete_days = 7";
    let policy_file = env.write_policy("p.toml", text);
    let policy =
        Policy::from_toml_str(&std::fs::read_to_string(&policy_file).unwrap(), "p.toml").unwrap();
    let now: Timestamp = "2026-11-09T12:00:00Z".parse().unwrap();
    let infos: Vec<_> = all
        .iter()
        .map(|p| PointInfo::new(p.id.clone(), p.created))
        .collect();
    let keep = policy.keep_set(&infos, now);
    let expected: BTreeSet<String> = keep.ids().map(str::to_string).collect();
    assert!(expected.len() >= 5 && expected.len() < 40, "{expected:?}");
    let policy_arg = policy_file.to_str().unwrap();
    let now_arg = now.to_string();

    // A dry run changes nothing.
    let dry = env.run(&[
        "prune",
        "--vm",
        "synth",
        "--policy",
        policy_arg,
        "--now",
        &now_arg,
        "--dry-run",
    ]);
    assert_eq!(dry["dry_run"], true);
    assert_eq!(
        dry["deleted"].as_array().unwrap().len(),
        40 - expected.len()
    );
    assert_eq!(env.points("synth").len(), 40);

    let r = env.run(&[
        "prune", "--vm", "synth", "--policy", policy_arg, "--now", &now_arg,
    ]);
    let kept: BTreeSet<String> = r["kept"]
        .as_array()
        .unwrap()
        .iter()
        .map(|k| k["id"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(kept, expected);
    assert_eq!(ids(&env.points("synth")), expected);
    let all_ids = ids(&all);
    let gone: BTreeSet<String> = all_ids.difference(&expected).cloned().collect();
    assert_eq!(env.deleted_ids("synth"), gone);
    // Pruning again at the same instant changes nothing (idempotent).
    let again = env.run(&[
        "prune", "--vm", "synth", "--policy", policy_arg, "--now", &now_arg,
    ]);
    assert!(again["deleted"].as_array().unwrap().is_empty(), "{again}");
    assert!(again["purged"].as_array().unwrap().is_empty(), "{again}");

    // Six days later nothing is purged yet; eight days later every soft-deleted point is.
    let six = now.checked_add(Duration::from_secs(6 * 86_400)).unwrap();
    let r = env.run(&[
        "prune",
        "--vm",
        "synth",
        "--policy",
        policy_arg,
        "--now",
        &six.to_string(),
        "--dry-run",
    ]);
    assert!(r["purged"].as_array().unwrap().is_empty(), "{r}");
    let eight = now.checked_add(Duration::from_secs(8 * 86_400)).unwrap();
    let r = env.run(&[
        "prune",
        "--vm",
        "synth",
        "--policy",
        policy_arg,
        "--now",
        &eight.to_string(),
    ]);
    let purged: BTreeSet<String> = r["purged"]
        .as_array()
        .unwrap()
        .iter()
        .map(|k| k.as_str().unwrap().to_string())
        .collect();
    assert_eq!(purged, gone);
    assert_eq!(r["manifests_purged"], gone.len());
    // What is soft-deleted now are the points the policy stopped keeping at `eight`.
    let newly: BTreeSet<String> = r["deleted"]
        .as_array()
        .unwrap()
        .iter()
        .map(|k| k.as_str().unwrap().to_string())
        .collect();
    assert!(!newly.is_empty() && newly.is_subset(&expected), "{newly:?}");
    assert_eq!(env.deleted_ids("synth"), newly);
    for id in &gone {
        let m = env.path(&format!("vault/manifests/synth/d0/{id}.bmap"));
        assert!(!m.exists(), "{} survived its purge", m.display());
    }

    // GC frees exactly the purged points' own blocks; the shared block stays.
    let r = env.run(&["gc", "--grace", "0"]);
    let freed_own: u64 = gone.len() as u64;
    assert_eq!(r["blocks_freed"], freed_own, "{r}");
    assert_eq!(r["manifests_freed"], 0, "{r}");
    env.verify_ok();
}

#[tokio::test(flavor = "multi_thread")]
async fn soft_deleted_points_restore_after_undelete_and_gc_frees_only_purged_blocks() {
    let env = Env::new();
    let image = env.path("disk.img");
    let blocks = 8;
    let mut data = pseudo_random(blocks * BLOCK, 7);
    std::fs::write(&image, &data).unwrap();
    // Four backups; each gives block 1 a content of its own.
    let mut states: BTreeMap<String, Vec<u8>> = BTreeMap::new();
    let mut order = Vec::new();
    for i in 0..4u64 {
        if i > 0 {
            let at = BLOCK;
            data[at..at + BLOCK].copy_from_slice(&pseudo_random(BLOCK, 100 + i));
            std::fs::write(&image, &data).unwrap();
        }
        let id = env.backup("web", &image);
        states.insert(id.clone(), data.clone());
        order.push(id);
    }
    // daily = 1 keeps today's last point (the newest) only.
    let policy = env.write_policy("p.toml", "daily = 1\nsoft_delete_days = 14");
    let policy_arg = policy.to_str().unwrap();
    let now = Timestamp::now().to_string();
    let r = env.run(&[
        "prune", "--vm", "web", "--policy", policy_arg, "--now", &now,
    ]);
    assert_eq!(r["kept"].as_array().unwrap().len(), 1, "{r}");
    assert_eq!(r["kept"][0]["id"], order[3].as_str());
    assert_eq!(
        env.deleted_ids("web"),
        order[..3].iter().cloned().collect::<BTreeSet<_>>()
    );

    // A soft-deleted point does not restore.
    let to = env.path("r0.img");
    let out = controller([
        "restore",
        "--vault",
        &env.vault,
        "--vm",
        "web",
        "--point",
        &order[0],
        "--disk",
        "d0",
        "--to",
        to.to_str().unwrap(),
    ]);
    assert!(!out.status.success());
    assert!(
        stderr_of(&out).contains("has no recovery point"),
        "{}",
        stderr_of(&out)
    );
    // Until it is undeleted: then it restores bit-exact.
    let back = env.run(&["undelete", "--vm", "web", "--point", &order[0]]);
    assert_eq!(back["id"], order[0].as_str());
    let out = controller([
        "restore",
        "--vault",
        &env.vault,
        "--vm",
        "web",
        "--point",
        &order[0],
        "--disk",
        "d0",
        "--to",
        to.to_str().unwrap(),
    ]);
    assert!(out.status.success(), "{}", stderr_of(&out));
    assert_eq!(read_all(&to), states[&order[0]]);
    assert_eq!(env.deleted_ids("web").len(), 2);

    // The blocks only order[1] and order[2] reference: freed once they are purged.
    let vault = Vault::open(&env.vault).await.unwrap();
    let mut refs: HashMap<String, BTreeSet<Address>> = HashMap::new();
    for id in &order {
        let (m, digest) = match vault.get_point("web", id).await {
            Ok(p) => (p.id.clone(), p.disks[0].manifest_digest.clone()),
            Err(_) => {
                let d = vault.get_deleted("web", id).await.unwrap();
                (d.point.id.clone(), d.point.disks[0].manifest_digest.clone())
            }
        };
        let map = vault
            .get_manifest(
                &ManifestRef {
                    vm: "web",
                    disk: "d0",
                    point: &m,
                },
                &digest,
            )
            .await
            .unwrap();
        refs.insert(id.clone(), map.addresses().copied().collect());
    }
    let live: BTreeSet<Address> = refs[&order[0]].union(&refs[&order[3]]).copied().collect();
    let doomed: BTreeSet<Address> = refs[&order[1]]
        .union(&refs[&order[2]])
        .filter(|a| !live.contains(a))
        .copied()
        .collect();
    assert_eq!(doomed.len(), 2, "block 1 as written by backups 1 and 2");
    let block_file = |a: &Address| {
        let hex = a.to_hex();
        env.path(&format!("vault/blocks/{}/{hex}", &hex[..2]))
    };
    let doomed_bytes: u64 = doomed
        .iter()
        .map(|a| std::fs::metadata(block_file(a)).unwrap().len())
        .sum();

    // GC before the purge frees nothing: soft-deleted points keep their blocks.
    let r = env.run(&["gc", "--grace", "0"]);
    assert_eq!(
        (r["blocks_freed"].as_u64(), r["deleted_points"].as_u64()),
        (Some(0), Some(2))
    );

    // Purge 15 days later, then GC.
    let later = Timestamp::now()
        .checked_add(Duration::from_secs(15 * 86_400))
        .unwrap()
        .to_string();
    let r = env.run(&[
        "prune", "--vm", "web", "--policy", policy_arg, "--now", &later,
    ]);
    // order[0] was undeleted and is older than today at `later`: it is soft-deleted now.
    assert_eq!(r["purged"].as_array().unwrap().len(), 2, "{r}");
    assert_eq!(r["deleted"][0], order[0].as_str());
    // Everything so far is two hours old; then a young orphan block (as from an in-flight
    // backup) appears: it survives the grace period.
    let vault_dir = env.path("vault");
    run(
        "sh",
        [
            "-c",
            &format!(
                "find '{}/blocks' '{}/manifests' -type f -exec touch -d '2 hours ago' {{}} +",
                vault_dir.display(),
                vault_dir.display()
            ),
        ],
    );
    let orphan = pseudo_random(BLOCK, 999);
    let orphan_address = content_address(&orphan, None);
    vault
        .put_block(orphan_address, orphan.into())
        .await
        .unwrap();
    // A local vault publishes staged blocks in batches; closing it publishes them.
    drop(vault);
    let vault = Vault::open(&env.vault).await.unwrap();
    let dry = env.run(&["gc", "--dry-run", "--grace", "0"]);
    assert_eq!(dry["blocks_freed"], doomed.len() + 1, "{dry}");
    let r = env.run(&["gc"]); // default grace: 1 hour
    assert_eq!(r["blocks_freed"], doomed.len(), "{r}");
    assert_eq!(r["bytes_freed"], doomed_bytes, "{r}");
    assert_eq!(r["blocks_young"], 1, "{r}");
    for a in &doomed {
        assert!(!block_file(a).exists());
    }
    for a in &live {
        assert!(
            block_file(a).exists(),
            "a block of a live or soft-deleted point was freed"
        );
    }
    assert!(vault.has_block(&orphan_address).await.unwrap());
    env.verify_ok();
    // order[0] (soft-deleted again) still comes back whole after GC.
    env.run(&["undelete", "--vm", "web", "--point", &order[0]]);
    let to = env.path("r0b.img");
    let out = controller([
        "restore",
        "--vault",
        &env.vault,
        "--vm",
        "web",
        "--point",
        &order[0],
        "--disk",
        "d0",
        "--to",
        to.to_str().unwrap(),
    ]);
    assert!(out.status.success(), "{}", stderr_of(&out));
    assert_eq!(read_all(&to), states[&order[0]]);
    let to = env.path("r3.img");
    let out = controller([
        "restore",
        "--vault",
        &env.vault,
        "--vm",
        "web",
        "--point",
        "latest",
        "--disk",
        "d0",
        "--to",
        to.to_str().unwrap(),
    ]);
    assert!(out.status.success(), "{}", stderr_of(&out));
    assert_eq!(read_all(&to), states[&order[3]]);
    let r = env.run(&["gc", "--grace", "0"]);
    assert_eq!(r["blocks_freed"], 1, "only the orphan is left to free: {r}");
    env.verify_ok();
}

fn lease(kind: LeaseKind, id: &str, expires_in: i64) -> LeaseRecord {
    let now = Timestamp::now();
    let expires = if expires_in >= 0 {
        now.checked_add(Duration::from_secs(expires_in as u64))
    } else {
        now.checked_sub(Duration::from_secs(expires_in.unsigned_abs()))
    }
    .unwrap();
    LeaseRecord {
        kind,
        id: id.into(),
        holder: format!("test {id}"),
        pid: 4242,
        host: "testhost".into(),
        created: now,
        expires,
        ttl_ms: None,
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn leases_keep_gc_and_backups_apart() {
    let env = Env::new();
    let vault = Vault::open(&env.vault).await.unwrap();
    let image = env.path("disk.img");
    std::fs::write(&image, pseudo_random(4 * BLOCK, 3)).unwrap();

    // A live backup lease: GC refuses, naming it.
    let key = write_lease_record(&vault, &lease(LeaseKind::Backup, "running", 60))
        .await
        .unwrap();
    let err = env.fails(&["gc", "--grace", "0"]);
    assert!(err.contains("cannot take a gc lease"), "{err}");
    assert!(err.contains(&key) && err.contains("test running"), "{err}");
    // Backups share: another backup runs fine meanwhile.
    env.backup("vm", &image);
    // `locks` shows it.
    let locks = env.run(&["locks"]);
    assert_eq!(locks.as_array().unwrap().len(), 1, "{locks}");
    assert_eq!(locks[0]["live"], true);

    // An expired lease (a crashed backup) does not block, and GC removes it.
    write_lease_record(&vault, &lease(LeaseKind::Backup, "running", -5))
        .await
        .unwrap();
    let r = env.run(&["gc", "--grace", "0"]);
    assert_eq!(r["expired_leases_removed"], 1, "{r}");
    assert!(env.run(&["locks"]).as_array().unwrap().is_empty());

    // A live gc lease: a backup that may not wait refuses with a clear error…
    write_lease_record(&vault, &lease(LeaseKind::Gc, "sweeping", 3))
        .await
        .unwrap();
    let disk = format!("d0={}", image.display());
    let err = env.fails(&["backup", "--vm", "vm", "--disk", &disk, "--lease-wait", "0"]);
    assert!(
        err.contains("cannot take a backup lease") && err.contains("test sweeping"),
        "{err}"
    );
    // …and one that may wait goes ahead once the gc lease has expired (bounded wait).
    let started = Instant::now();
    let out = controller([
        "backup",
        "--vault",
        &env.vault,
        "--vm",
        "vm",
        "--disk",
        &disk,
        "--lease-wait",
        "30s",
    ]);
    assert!(out.status.success(), "{}", stderr_of(&out));
    assert!(
        started.elapsed() >= Duration::from_secs(1),
        "it did not wait"
    );
    // The library: the same refusal, as an error value.
    write_lease_record(&vault, &lease(LeaseKind::Gc, "sweeping2", 60))
        .await
        .unwrap();
    let mut req = BackupRequest::new(
        "vm",
        Arc::new(ImageSnapshotter::new(vec![ImageDisk::parse(&disk).unwrap()]).unwrap()),
    );
    req.lease = LeaseOptions::default();
    let e = run_backup(req.clone(), &vault).await.unwrap_err();
    assert!(
        matches!(
            e,
            bulwark_controller::Error::Vault(bulwark_vault::Error::LeaseConflict { .. })
        ),
        "{e}"
    );
    // No lease of ours is left behind by the refusals.
    let locks = env.run(&["locks"]);
    assert_eq!(locks.as_array().unwrap().len(), 2, "{locks}");
    env.verify_ok();
}

#[test]
fn bad_input_gives_clear_errors() {
    let env = Env::new();
    // A corrupt lease object stops GC and backups, naming the key.
    let locks = env.path("vault/locks");
    std::fs::create_dir_all(&locks).unwrap();
    std::fs::write(locks.join("gc-x1"), b"{ not json").unwrap();
    let err = env.fails(&["gc"]);
    assert!(
        err.contains("locks/gc-x1: corrupt lease") && err.contains("delete this object"),
        "{err}"
    );
    let image = env.path("disk.img");
    std::fs::write(&image, pseudo_random(BLOCK, 1)).unwrap();
    let disk = format!("d0={}", image.display());
    let err = env.fails(&["backup", "--vm", "vm", "--disk", &disk, "--lease-wait", "0"]);
    assert!(err.contains("locks/gc-x1: corrupt lease"), "{err}");
    std::fs::remove_file(locks.join("gc-x1")).unwrap();
    env.backup("vm", &image);

    // Undelete of an unknown point, and of a live one.
    let err = env.fails(&[
        "undelete",
        "--vm",
        "vm",
        "--point",
        "20260101T000000.000Z-abcdef",
    ]);
    assert!(
        err.contains("has no soft-deleted point \"20260101T000000.000Z-abcdef\""),
        "{err}"
    );
    let live = env.points("vm")[0].id.clone();
    let err = env.fails(&["undelete", "--vm", "vm", "--point", &live]);
    assert!(err.contains("it is live, not deleted"), "{err}");
    let err = env.fails(&["undelete", "--vm", "vm", "--point", "../x"]);
    assert!(err.contains("invalid point name"), "{err}");

    // A policy that does not parse: prune and `policy check` say where and why.
    let bad = env.path("bad.toml");
    std::fs::write(
        &bad,
        "time_zone = \"UTC\"\n[schedule]\nfrequency = \"hourly\"\nevery_hours = 5\n[retention]\ndaily = 3\n",
    )
    .unwrap();
    let bad_arg = bad.to_str().unwrap();
    let err = env.fails(&["prune", "--vm", "vm", "--policy", bad_arg]);
    assert!(err.contains("bad.toml:4: schedule.every_hours"), "{err}");
    let out = controller(["policy", "check", bad_arg]);
    assert!(!out.status.success());
    assert!(
        stderr_of(&out).contains("bad.toml:4: schedule.every_hours"),
        "{}",
        stderr_of(&out)
    );
    let out = controller([
        "policy",
        "check",
        env.path("missing.toml").to_str().unwrap(),
    ]);
    assert!(!out.status.success());
    assert!(
        stderr_of(&out).contains("cannot read policy file"),
        "{}",
        stderr_of(&out)
    );
    // Nothing was pruned.
    assert_eq!(env.points("vm").len(), 1);

    // A good policy: check prints the summary, next the runs in the policy's zone.
    let good = env.path("good.toml");
    std::fs::write(
        &good,
        "name = \"gold\"\ntime_zone = \"Europe/Berlin\"\n[schedule]\nfrequency = \"daily\"\ntimes = [\"02:30\"]\n[retention]\ndaily = 7\n",
    )
    .unwrap();
    let out = controller(["policy", "check", good.to_str().unwrap()]);
    assert!(out.status.success(), "{}", stderr_of(&out));
    assert!(
        stdout_of(&out).starts_with("policy gold"),
        "{}",
        stdout_of(&out)
    );
    let out = controller([
        "policy",
        "next",
        good.to_str().unwrap(),
        "--count",
        "3",
        "--after",
        "2026-03-28T12:00:00Z",
    ]);
    assert!(out.status.success(), "{}", stderr_of(&out));
    assert_eq!(
        stdout_of(&out).lines().collect::<Vec<_>>(),
        [
            "2026-03-29T03:00:00+02:00[Europe/Berlin]",
            "2026-03-30T02:30:00+02:00[Europe/Berlin]",
            "2026-03-31T02:30:00+02:00[Europe/Berlin]",
        ]
    );
    // A bad grace period.
    let err = env.fails(&["gc", "--grace", "5y"]);
    assert!(err.contains("unknown duration unit"), "{err}");
}

/// Backups of two VMs (random changes drawn from a small pool of block contents, so new
/// backups keep finding blocks that purged points left behind), prunes that soft-delete and
/// purge, and an aggressive GC (grace 0) retrying all the time, concurrently, round after
/// round. After each round every committed live point verifies and restores bit-exact.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn stress_backups_prunes_and_gc_concurrently() {
    let dir = tempfile::tempdir().unwrap();
    let vault = Vault::create(
        dir.path().join("vault").to_str().unwrap(),
        &CreateOptions {
            block_size: BlockSize::new(BLOCK as u32).unwrap(),
            zstd_level: Some(1),
        },
    )
    .await
    .unwrap();
    let policy = Policy::from_toml_str(
        "time_zone = \"UTC\"\n[schedule]\nfrequency = \"daily\"\ntimes = [\"02:30\"]\n[retention]\ndaily = 1\nsoft_delete_days = 1\n",
        "stress.toml",
    )
    .unwrap();
    const VMS: usize = 2;
    const BLOCKS: usize = 12;
    const POOL: u64 = 40;
    let pool: Arc<Vec<Vec<u8>>> =
        Arc::new((0..POOL).map(|k| pseudo_random(BLOCK, 50 + k)).collect());
    let mut images = Vec::new();
    for v in 0..VMS {
        let path = dir.path().join(format!("vm{v}.img"));
        let mut data = Vec::new();
        for b in 0..BLOCKS {
            data.extend_from_slice(&pool[(b + v) % POOL as usize]);
        }
        std::fs::write(&path, &data).unwrap();
        images.push((path, data));
    }
    let expected: Arc<std::sync::Mutex<HashMap<String, Vec<u8>>>> = Default::default();
    let gc_runs = Arc::new(AtomicUsize::new(0));
    let gc_refused = Arc::new(AtomicUsize::new(0));
    let blocks_freed = Arc::new(AtomicUsize::new(0));
    let final_freed = AtomicUsize::new(0);
    let started = Instant::now();
    let mut base = Timestamp::now();
    let mut round = 0u64;
    let mut seed = 12345u64;
    let mut next = move || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed
    };
    while round < 20 && started.elapsed() < Duration::from_secs(40) {
        round += 1;
        let done = Arc::new(AtomicBool::new(false));
        // GC: as aggressive as possible, retrying whenever a backup or prune holds a lease.
        let gc_task = {
            let (vault, done, runs, refused, freed) = (
                vault.clone(),
                done.clone(),
                gc_runs.clone(),
                gc_refused.clone(),
                blocks_freed.clone(),
            );
            tokio::spawn(async move {
                let options = GcOptions {
                    grace: Duration::ZERO,
                    ..GcOptions::default()
                };
                while !done.load(Ordering::SeqCst) {
                    match vault.gc(&options).await {
                        Ok(r) => {
                            runs.fetch_add(1, Ordering::SeqCst);
                            freed.fetch_add(r.blocks_freed, Ordering::SeqCst);
                        }
                        Err(bulwark_vault::Error::LeaseConflict { .. }) => {
                            refused.fetch_add(1, Ordering::SeqCst);
                        }
                        Err(e) => panic!("gc failed: {e}"),
                    }
                    tokio::time::sleep(Duration::from_millis(3)).await;
                }
            })
        };
        // Prune with a clock that moves two days a round: everything but the newest point is
        // soft-deleted, and the previous round's soft-deleted points are purged.
        base = base.checked_add(Duration::from_secs(2 * 86_400)).unwrap();
        let prune_task = {
            let (vault, policy, now) = (vault.clone(), policy.clone(), base);
            tokio::spawn(async move {
                for v in 0..VMS {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    bulwark_controller::prune(&vault, &format!("vm{v}"), &policy, now, false)
                        .await
                        .unwrap();
                }
            })
        };
        let mut backups = Vec::new();
        for (v, (path, data)) in images.iter().enumerate() {
            let mut changes = Vec::new();
            for _ in 0..2 {
                let n = 1 + next() % 4;
                let mut c = Vec::new();
                for _ in 0..n {
                    c.push(((next() % BLOCKS as u64) as usize, (next() % POOL) as usize));
                }
                changes.push(c);
            }
            let (vault, path, mut data, pool, expected) = (
                vault.clone(),
                path.clone(),
                data.clone(),
                pool.clone(),
                expected.clone(),
            );
            backups.push(tokio::spawn(async move {
                for c in changes {
                    for (b, k) in c {
                        data[b * BLOCK..(b + 1) * BLOCK].copy_from_slice(&pool[k]);
                    }
                    std::fs::write(&path, &data).unwrap();
                    let spec = ImageDisk::parse(&format!("d0={}", path.display())).unwrap();
                    let mut req = BackupRequest::new(
                        format!("vm{v}"),
                        Arc::new(ImageSnapshotter::new(vec![spec]).unwrap()),
                    );
                    req.lease = LeaseOptions {
                        retry: Duration::from_millis(10),
                        ..LeaseOptions::default().waiting(Duration::from_secs(30))
                    };
                    let r = run_backup(req.clone(), &vault).await.unwrap();
                    expected.lock().unwrap().insert(r.point, data.clone());
                }
                data
            }));
        }
        for (i, b) in backups.into_iter().enumerate() {
            images[i].1 = b.await.unwrap();
        }
        prune_task.await.unwrap();
        done.store(true, Ordering::SeqCst);
        gc_task.await.unwrap();
        // A final aggressive GC with nothing else running must succeed.
        let r = vault
            .gc(&GcOptions {
                grace: Duration::ZERO,
                ..GcOptions::default()
            })
            .await
            .unwrap();
        final_freed.fetch_add(r.blocks_freed, Ordering::SeqCst);

        let report = vault.verify(None, &|_, _| {}).await.unwrap();
        assert!(report.is_ok(), "round {round}: {:?}", report.problems);
        let points = vault.list_points(None).await.unwrap();
        assert!(points.broken.is_empty());
        for p in &points.points {
            let to = dir.path().join(format!("restore-{}.img", p.id));
            run_restore(
                RestoreRequest {
                    vm: p.vm.clone(),
                    point: p.id.clone(),
                    disk: "d0".into(),
                    to: to.clone(),
                    force: true,
                    concurrency: 8,
                    from: RestoreFrom::Vault,
                    snapshots: None,
                    observer: Arc::new(NoObserver),
                },
                &vault,
            )
            .await
            .unwrap_or_else(|e| panic!("round {round}: restore {}/{}: {e}", p.vm, p.id));
            let want = expected.lock().unwrap()[&p.id].clone();
            assert!(
                read_all(&to) == want,
                "round {round}: {}/{} restored wrong bytes",
                p.vm,
                p.id
            );
            std::fs::remove_file(&to).unwrap();
        }
        // The newest point of each VM is live.
        for (v, (_, data)) in images.iter().enumerate() {
            let latest = vault
                .latest_point(&format!("vm{v}"))
                .await
                .unwrap()
                .unwrap();
            assert!(expected.lock().unwrap()[&latest.id] == *data);
        }
    }
    let runs = gc_runs.load(Ordering::SeqCst);
    eprintln!(
        "stress: {round} rounds in {:?}: {runs} concurrent GC runs completed ({} blocks freed), {} refused by leases; {} blocks freed by the GC closing each round",
        started.elapsed(),
        blocks_freed.load(Ordering::SeqCst),
        gc_refused.load(Ordering::SeqCst),
        final_freed.load(Ordering::SeqCst)
    );
    assert!(round >= 3, "too few rounds: {round}");
    assert!(runs > 0);
    assert!(blocks_freed.load(Ordering::SeqCst) + final_freed.load(Ordering::SeqCst) > 0);
}
