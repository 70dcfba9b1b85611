//! VM ownership through the real CLI: two controllers (two host names, `BULWARK_HOST`) share
//! one vault; the first backup of a VM claims it, the other host's backup of it is refused and
//! commits nothing, `--take-over` moves it, and then the old owner is refused.

// Test helpers, like the tests themselves, panic on failure.
#![allow(clippy::unwrap_used)]

use std::process::Output;

use bulwark_tests::{TestEnv, controller_bin, stderr_of, write_random};

fn backup_as(env: &TestEnv, host: &str, vm: &str, image: &str, extra: &[&str]) -> Output {
    std::process::Command::new(controller_bin())
        .args([
            "backup", "--vault", &env.vault, "--vm", vm, "--disk", image, "--json",
        ])
        .args(extra)
        .env("NO_COLOR", "1")
        .env("BULWARK_HOST", host)
        .output()
        .unwrap()
}

fn points(env: &TestEnv, vm: &str) -> usize {
    let v = bulwark_tests::controller_json(["list", "--vault", &env.vault, "--vm", vm, "--json"]);
    v["points"].as_array().unwrap().len()
}

#[test]
fn each_vm_is_backed_up_by_its_owner_only() {
    let env = TestEnv::new();
    let image = env.path("os.img");
    write_random(&image, 0, 1 << 20, 3);
    let image = format!("os={}", image.display());

    let out = backup_as(&env, "host-a", "web01", &image, &[]);
    assert!(out.status.success(), "{}", stderr_of(&out));
    // Another host: refused, nothing committed.
    let out = backup_as(&env, "host-b", "web01", &image, &[]);
    assert!(!out.status.success());
    let err = stderr_of(&out);
    assert!(
        err.contains("backed up by host-a") && err.contains("--take-over"),
        "{err}"
    );
    assert_eq!(points(&env, "web01"), 1);
    // Its own VMs are fine.
    let out = backup_as(&env, "host-b", "db01", &image, &[]);
    assert!(out.status.success(), "{}", stderr_of(&out));
    // Taken over: now host-a is refused.
    let out = backup_as(&env, "host-b", "web01", &image, &["--take-over"]);
    assert!(out.status.success(), "{}", stderr_of(&out));
    assert_eq!(points(&env, "web01"), 2);
    let out = backup_as(&env, "host-a", "web01", &image, &[]);
    assert!(!out.status.success());
    assert!(
        stderr_of(&out).contains("backed up by host-b"),
        "{}",
        stderr_of(&out)
    );
    assert_eq!(points(&env, "web01"), 2);
}
