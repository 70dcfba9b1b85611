//! Golden vaults: vaults written by an earlier version, committed under
//! `tests/data/golden-vault/`, must stay readable by every later version (README,
//! "Compatibility"). For each (a plain one and an encrypted one), through the real CLI: `list`
//! shows exactly the recorded points, `restore` gives back each point's image bit-exact (its
//! recorded SHA-256), and `verify` passes.
//!
//! A change of the on-disk format (`bulwark_vault::VAULT_FORMAT_VERSION`, the manifest's
//! `bulwark_blockdiff::FORMAT_VERSION`, an object's layout, the encryption) that leaves no reader
//! for these vaults fails this test. Never regenerate them to make it pass: add a reader or a
//! migration, then ADD a vault of the new version (`tests/data/golden-vault/regenerate.sh`).
//! `manifest-v2/` holds the same two vaults written with manifest format version 2 (one record
//! per data block and per run of zero blocks); the ones beside it have version 1 manifests.

#![allow(clippy::unwrap_used)] // test helpers outside #[test] functions

use std::path::{Path, PathBuf};

use bulwark_tests::{controller_bin, file_digest, stderr_of};

const PASSPHRASE: &str = "golden-vault-passphrase";

/// The golden vaults of one format generation: `""` for the first (manifest format version 1),
/// `"manifest-v2"` for those written with manifest format version 2 (runs of zero blocks).
fn data_dir(set: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/data/golden-vault")
        .join(set)
}

/// One line of expected.txt: the vault, a point, its disk, the SHA-256 of the restored image.
#[derive(Debug)]
struct Expected {
    vault: String,
    point: String,
    disk: String,
    sha256: String,
}

fn expected(set: &str) -> Vec<Expected> {
    let text = std::fs::read_to_string(data_dir(set).join("expected.txt")).unwrap();
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            assert_eq!(f.len(), 4, "expected.txt: bad line {l:?}");
            Expected {
                vault: f[0].into(),
                point: f[1].into(),
                disk: f[2].into(),
                sha256: f[3].into(),
            }
        })
        .collect()
}

/// Copies a committed vault to a temporary directory (reading a vault may take leases; the
/// committed copy stays untouched).
fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let target = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), &target).unwrap();
        }
    }
}

/// The global arguments that open `vault` (the key file for the encrypted one).
fn key_args(set: &str, vault: &str) -> Vec<String> {
    match vault {
        "encrypted" => vec![
            "--key-file".into(),
            data_dir(set).join("encrypted.key").display().to_string(),
        ],
        _ => Vec::new(),
    }
}

fn check_vault(set: &str, name: &str) {
    let all = expected(set);
    let points: Vec<&Expected> = all.iter().filter(|e| e.vault == name).collect();
    assert!(
        points.len() >= 2,
        "expected.txt: {name}: fewer than two points"
    );
    let tmp = tempfile::tempdir().unwrap();
    let vault = tmp.path().join(name);
    copy_dir(&data_dir(set).join(name), &vault);
    let vault_arg = vault.display().to_string();
    let with_key = |args: &[&str]| -> Vec<String> {
        let mut v = key_args(set, name);
        v.extend(args.iter().map(|s| s.to_string()));
        v
    };

    // list: exactly the recorded points, in order, each with the recorded disk.
    let listed = run_json(&with_key(&[
        "list", "--vault", &vault_arg, "--vm", "golden", "--json",
    ]));
    let ids: Vec<&str> = listed["points"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["id"].as_str().unwrap())
        .collect();
    let want: Vec<&str> = points.iter().map(|e| e.point.as_str()).collect();
    assert_eq!(ids, want, "{name}: list shows other points than recorded");
    assert_eq!(
        listed["broken"].as_array().map(Vec::len),
        Some(0),
        "{name}: {listed}"
    );

    // restore: every point bit-exact.
    for e in &points {
        let to = tmp.path().join(format!("{}.img", e.point));
        let out = run(&with_key(&[
            "restore",
            "--vault",
            &vault_arg,
            "--vm",
            "golden",
            "--point",
            &e.point,
            "--disk",
            &e.disk,
            "--to",
            &to.display().to_string(),
        ]));
        assert!(
            out.status.success(),
            "{name}: restore {} failed: {}",
            e.point,
            stderr_of(&out)
        );
        assert_eq!(
            file_digest(&to),
            e.sha256,
            "{name}: point {} did not restore bit-exact",
            e.point
        );
    }

    // verify: every object of every point.
    let out = run(&with_key(&["verify", "--vault", &vault_arg]));
    assert!(
        out.status.success(),
        "{name}: verify failed: {}",
        stderr_of(&out)
    );
}

/// Runs the real `bulwark-controller`, with the encrypted vault's passphrase in its environment.
fn run(args: &[String]) -> std::process::Output {
    std::process::Command::new(controller_bin())
        .args(args)
        .env("BULWARK_PASSPHRASE", PASSPHRASE)
        .env("NO_COLOR", "1")
        .output()
        .unwrap()
}

fn run_json(args: &[String]) -> serde_json::Value {
    let out = run(args);
    assert!(
        out.status.success(),
        "bulwark-controller {args:?} failed ({}): {}",
        out.status,
        stderr_of(&out)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

#[test]
fn golden_plain_vault_lists_restores_bit_exact_and_verifies() {
    check_vault("", "plain");
}

#[test]
fn golden_encrypted_vault_lists_restores_bit_exact_and_verifies() {
    check_vault("", "encrypted");
}

#[test]
fn golden_manifest_v2_vaults_list_restore_bit_exact_and_verify() {
    check_vault("manifest-v2", "plain");
    check_vault("manifest-v2", "encrypted");
}
