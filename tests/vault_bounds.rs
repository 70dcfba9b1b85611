//! Bounded reads: a 4 GiB object planted at a block key, a lease key and the configuration key
//! of a local vault. Each command that meets it fails fast with an error naming the key, its
//! size and the limit, and the CLI's peak memory (maximum resident set size, measured by
//! `/usr/bin/time`) stays under 256 MiB. The planted objects are sparse files: cheap to make,
//! 4 GiB when read.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use bulwark_tests::{controller, controller_bin, stderr_of, write_random};

const FOUR_GIB: u64 = 4 << 30;
const MAX_RSS_KIB: u64 = 256 * 1024;

/// `/usr/bin/time` (the Debian package `time`, which tests/run.sh installs), or `None` with
/// a visible skip message (a failure when BULWARK_REQUIRE_SERVERS=1).
fn gnu_time() -> Option<&'static Path> {
    let p = Path::new("/usr/bin/time");
    if p.is_file() {
        return Some(p);
    }
    let why = "vault_bounds: needs /usr/bin/time (Debian package `time`) to measure peak memory";
    if std::env::var("BULWARK_REQUIRE_SERVERS").is_ok_and(|v| v == "1") {
        panic!("{why}, and BULWARK_REQUIRE_SERVERS=1 forbids skipping");
    }
    eprintln!("SKIPPED {why}");
    None
}

/// Runs the controller with `args` under `/usr/bin/time`: its output, peak RSS (KiB) and
/// wall time.
fn measured(time: &Path, dir: &Path, args: &[&str]) -> (std::process::Output, u64, Duration) {
    let rss_file = dir.join("rss");
    let started = Instant::now();
    let out = Command::new(time)
        .arg("-f")
        .arg("%M")
        .arg("-o")
        .arg(&rss_file)
        .arg(controller_bin())
        .args(args)
        .env("NO_COLOR", "1")
        .output()
        .expect("run bulwark-controller under /usr/bin/time");
    let took = started.elapsed();
    let rss: u64 = std::fs::read_to_string(&rss_file)
        .expect("read /usr/bin/time output")
        .lines()
        .last()
        .and_then(|l| l.trim().parse().ok())
        .expect("peak RSS in KiB");
    (out, rss, took)
}

/// Replaces `path` by a sparse file of `len` bytes.
fn plant(path: &Path, len: u64) {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).unwrap();
    }
    let _ = std::fs::remove_file(path);
    let f = std::fs::File::create(path).unwrap();
    f.set_len(len).unwrap();
}

fn expect_refused(
    time: &Path,
    dir: &Path,
    what: &str,
    args: &[&str],
    key: &str,
    limit_words: &str,
) {
    let (out, rss, took) = measured(time, dir, args);
    // Errors go to standard error; verify reports what it found on standard output.
    let err = format!(
        "{}{}",
        stderr_of(&out),
        String::from_utf8_lossy(&out.stdout)
    );
    assert!(
        !out.status.success(),
        "{what}: must fail, got success:\n{err}"
    );
    assert!(
        err.contains(key),
        "{what}: the error names the key {key}:\n{err}"
    );
    assert!(
        err.contains(&format!("{FOUR_GIB} bytes")) && err.contains(limit_words),
        "{what}: the error gives the size and the limit:\n{err}"
    );
    assert!(
        rss < MAX_RSS_KIB,
        "{what}: peak RSS {rss} KiB, over {MAX_RSS_KIB} KiB"
    );
    assert!(took < Duration::from_secs(60), "{what}: took {took:?}");
    eprintln!("{what}: refused in {took:?}, peak RSS {rss} KiB");
}

#[test]
fn oversized_objects_are_refused_unread_with_bounded_memory() {
    let Some(time) = gnu_time() else {
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let vault = dir.join("vault");
    let v = vault.to_str().unwrap();
    let image = dir.join("disk.img");
    std::fs::File::create(&image)
        .unwrap()
        .set_len(4 << 20)
        .unwrap();
    write_random(&image, 0, 4 << 20, 7);
    let img = format!("d={}", image.display());
    let out = controller(["backup", "--vault", v, "--vm", "vm1", "--disk", &img]);
    assert!(out.status.success(), "backup: {}", stderr_of(&out));

    // A block key: restore must refuse the block before reading it.
    let block = walk(&vault.join("blocks"))
        .into_iter()
        .next()
        .expect("the backup stored a block");
    let block_key = block
        .strip_prefix(&vault)
        .unwrap()
        .to_str()
        .unwrap()
        .to_string();
    let saved = std::fs::read(&block).unwrap();
    plant(&block, FOUR_GIB);
    let to = dir.join("restored.img");
    let to = to.to_str().unwrap();
    expect_refused(
        time,
        dir,
        "restore over a 4 GiB block",
        &[
            "restore", "--vault", v, "--vm", "vm1", "--disk", "d", "--to", to,
        ],
        &block_key,
        "limit of a block",
    );
    expect_refused(
        time,
        dir,
        "verify over a 4 GiB block",
        &["verify", "--vault", v],
        &block_key,
        "limit of a block",
    );
    std::fs::write(&block, saved).unwrap();

    // A lease key: a backup (which must read every gc lease) and gc refuse it.
    let lease_id = bulwark_vault::new_point_id(jiff::Timestamp::now());
    let lease = vault.join(format!("locks/gc-{lease_id}"));
    plant(&lease, FOUR_GIB);
    let lease_key = format!("locks/gc-{lease_id}");
    expect_refused(
        time,
        dir,
        "backup with a 4 GiB lease",
        &["backup", "--vault", v, "--vm", "vm1", "--disk", &img],
        &lease_key,
        "limit of a lease",
    );
    expect_refused(
        time,
        dir,
        "gc with a 4 GiB lease",
        &["gc", "--vault", v],
        &lease_key,
        "limit of a lease",
    );
    std::fs::remove_file(&lease).unwrap();

    // The configuration: every command reads it first.
    plant(&vault.join("bulwark-vault.json"), FOUR_GIB);
    expect_refused(
        time,
        dir,
        "list with a 4 GiB configuration",
        &["list", "--vault", v],
        "bulwark-vault.json",
        "limit of a vault configuration",
    );
}

fn walk(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let p = e.path();
        if p.is_dir() {
            out.extend(walk(&p));
        } else {
            out.push(p);
        }
    }
    out.sort();
    out
}
