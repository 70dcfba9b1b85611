//! The key commands and encrypted vaults through the real CLI: key files with and without a
//! passphrase (passed only through the environment), `init --encrypt`, backup/list/restore
//! with the key, clear refusals without it, and passphrase changes.
#![allow(clippy::unwrap_used)] // test helpers outside #[test] functions

use std::path::Path;
use std::process::{Command, Output};

fn run(args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut c = Command::new(bulwark_tests::controller_bin());
    c.args(args)
        .env_remove("BULWARK_KEY_FILE")
        .env_remove("BULWARK_PASSPHRASE");
    for (k, v) in env {
        c.env(k, v);
    }
    c.output().expect("run bulwark-controller")
}

fn ok(o: &Output) -> String {
    assert!(
        o.status.success(),
        "stdout: {}\nstderr: {}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn fails(o: &Output, needle: &str) {
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success(), "should fail: {err}");
    assert!(err.contains(needle), "expected {needle:?} in: {err}");
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

#[test]
fn keys_and_encrypted_vault_through_the_cli() {
    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("vault.key");
    let vault = dir.path().join("vault");
    let img = dir.path().join("disk.img");
    std::fs::write(&img, bulwark_tests::pseudo_random(3 << 20, 5)).unwrap();
    let disk = format!("os={}", img.display());
    let pass = [("MY_PASS", "correct horse")];

    // A passphrase-protected key; the passphrase never appears on the command line.
    let fp = ok(&run(
        &[
            "key",
            "create",
            "--key-file",
            s(&key),
            "--passphrase-env",
            "MY_PASS",
        ],
        &pass,
    ));
    let fp = fp.trim();
    assert_eq!(fp.len(), 32);
    assert!(
        !std::fs::read_to_string(&key)
            .unwrap()
            .contains("correct horse")
    );
    assert_eq!(
        ok(&run(&["key", "fingerprint", "--key-file", s(&key)], &[])).trim(),
        fp
    );
    fails(
        &run(&["key", "create", "--key-file", s(&key)], &[]),
        "File exists",
    );

    // init: --encrypt and a key go together.
    fails(
        &run(&["init", "--vault", s(&vault), "--encrypt"], &[]),
        "--encrypt needs --key-file",
    );
    fails(
        &run(
            &["init", "--vault", s(&vault), "--key-file", s(&key)],
            &pass,
        ),
        "pass --encrypt",
    );
    fails(
        &run(
            &[
                "init",
                "--vault",
                s(&vault),
                "--encrypt",
                "--key-file",
                s(&key),
            ],
            &[],
        ),
        "protected by a passphrase",
    );
    let with_pass = [("BULWARK_PASSPHRASE", "correct horse")];
    ok(&run(
        &[
            "init",
            "--vault",
            s(&vault),
            "--encrypt",
            "--key-file",
            s(&key),
        ],
        &with_pass,
    ));
    let config = std::fs::read_to_string(vault.join("bulwark-vault.json")).unwrap();
    assert!(
        config.contains("xchacha20-poly1305") && config.contains(fp),
        "{config}"
    );

    // Backup and restore with the key (file from the environment this time).
    let env = [
        ("BULWARK_PASSPHRASE", "correct horse"),
        ("BULWARK_KEY_FILE", s(&key)),
    ];
    ok(&run(
        &[
            "backup",
            "--vault",
            s(&vault),
            "--vm",
            "vm1",
            "--disk",
            &disk,
        ],
        &env,
    ));
    let out = dir.path().join("out.img");
    ok(&run(
        &[
            "restore",
            "--vault",
            s(&vault),
            "--vm",
            "vm1",
            "--disk",
            "os",
            "--to",
            s(&out),
        ],
        &env,
    ));
    assert!(std::fs::read(&out).unwrap() == std::fs::read(&img).unwrap());
    ok(&run(&["verify", "--vault", s(&vault)], &env));

    // Without the key, or with a wrong passphrase: clear errors.
    fails(&run(&["list", "--vault", s(&vault)], &[]), "is encrypted");
    fails(
        &run(
            &["list", "--vault", s(&vault), "--key-file", s(&key)],
            &[("BULWARK_PASSPHRASE", "wrong")],
        ),
        "wrong passphrase",
    );

    // Change the passphrase: the old one stops working, the key stays the same.
    ok(&run(
        &["key", "change-passphrase", "--key-file", s(&key)],
        &[
            ("BULWARK_PASSPHRASE", "correct horse"),
            ("BULWARK_NEW_PASSPHRASE", "battery staple"),
        ],
    ));
    fails(
        &run(
            &["list", "--vault", s(&vault), "--key-file", s(&key)],
            &with_pass,
        ),
        "wrong passphrase",
    );
    let listed = ok(&run(
        &["list", "--vault", s(&vault), "--key-file", s(&key)],
        &[("BULWARK_PASSPHRASE", "battery staple")],
    ));
    assert!(listed.contains("vm1"), "{listed}");
    assert_eq!(
        ok(&run(&["key", "fingerprint", "--key-file", s(&key)], &[])).trim(),
        fp
    );
}
