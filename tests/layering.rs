//! The crates' layering, checked against `Cargo.toml` (through `cargo metadata`): dependencies
//! only point down, guest-side code stays out of the host-side model crates, and the pure crates
//! stay free of system-call crates.
//!
//! The ranks below are the diagram of the README's "Crates" section (and of the lead's layering
//! contract), including crates planned but not yet in the workspace (`bulwark-daemon`,
//! `bulwark-qemu`, `bulwark-nbd`, `bulwark-recovery`): a rank for an absent crate is harmless.
//! A new workspace crate must be given a rank here, or this test fails.
#![allow(clippy::unwrap_used)]

use std::collections::{BTreeMap, BTreeSet};
use std::process::Command;

use serde_json::Value;

/// Layer of each workspace package: a normal or build dependency on another workspace package
/// must go to a strictly lower rank.
const RANKS: &[(&str, u32)] = &[
    // Pure models and the block format: no Bulwark dependencies.
    ("bulwark-consistency", 0),
    ("bulwark-blockdiff", 0),
    // Man pages and completions of the binaries (clap only).
    ("bulwark-cli-assets", 0),
    // On the consistency model only.
    ("bulwark-policy", 1),
    ("bulwark-protocol", 1),
    ("bulwark-quiesce", 1),
    // Storage and disk access.
    ("bulwark-vault", 2),
    ("bulwark-nbd", 2),
    // Notifications (webhooks, SMTP): the event model and delivery, no Bulwark dependencies.
    ("bulwark-notify", 2),
    ("bulwark-snapshot", 4),
    // A running QEMU's and offline images' disk sources (implements bulwark-snapshot's traits).
    ("bulwark-qemu", 5),
    // Guest agent; instant recovery (vault + NBD + kept snapshots).
    ("bulwark-agent", 5),
    ("bulwark-recovery", 5),
    // A point's disk as a read-only file over FUSE (on bulwark-recovery's reader).
    ("bulwark-fuse", 6),
    // Jobs, then the scheduler over them.
    ("bulwark-controller", 6),
    ("bulwark-daemon", 7),
    // Front ends over the daemon and the jobs (the HTTP API and console).
    ("bulwark-http", 8),
    // Thin binaries.
    ("bulwark-controller-bin", 9),
    ("bulwark-agent-bin", 9),
    // The test kit (the root package): it may use everything in its dev-dependencies, which
    // this test does not check; its normal dependencies must be no Bulwark crate.
    ("bulwark-tests", 10),
];

/// Guest-side crates and the only workspace packages that may depend on them.
const GUEST_SIDE: &[&str] = &["bulwark-quiesce", "bulwark-agent"];
const GUEST_USERS: &[&str] = &["bulwark-agent", "bulwark-agent-bin"];

/// Crates that must never reach guest-side code, even indirectly.
const HOST_MODEL: &[&str] = &[
    "bulwark-vault",
    "bulwark-policy",
    "bulwark-protocol",
    "bulwark-consistency",
];

/// Pure crates (no system calls, no I/O) and the crates they must not depend on.
const PURE: &[&str] = &["bulwark-consistency", "bulwark-policy"];
const SYSTEM_CRATES: &[&str] = &["libc", "rustix", "nix", "tokio", "mio", "object_store"];

/// Workspace package name -> its normal and build dependencies (package names).
fn workspace_dependencies() -> BTreeMap<String, BTreeSet<String>> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let out = Command::new(cargo)
        .args([
            "metadata",
            "--format-version",
            "1",
            "--no-deps",
            "--offline",
        ])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "cargo metadata failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let meta: Value = serde_json::from_slice(&out.stdout).unwrap();
    let mut graph = BTreeMap::new();
    for p in meta["packages"].as_array().unwrap() {
        let deps = p["dependencies"]
            .as_array()
            .unwrap()
            .iter()
            // `kind` is null for normal dependencies, "build" or "dev" otherwise.
            .filter(|d| d["kind"].as_str() != Some("dev"))
            .map(|d| d["name"].as_str().unwrap().to_string())
            .collect();
        graph.insert(p["name"].as_str().unwrap().to_string(), deps);
    }
    graph
}

fn rank(name: &str) -> Option<u32> {
    RANKS.iter().find(|(n, _)| *n == name).map(|(_, r)| *r)
}

/// Every rule broken by `graph`, one line each.
fn violations(graph: &BTreeMap<String, BTreeSet<String>>) -> Vec<String> {
    let mut bad = Vec::new();
    for (pkg, deps) in graph {
        let Some(r) = rank(pkg) else {
            bad.push(format!(
                "{pkg} has no rank in tests/layering.rs (give it one)"
            ));
            continue;
        };
        for dep in deps.iter().filter(|d| graph.contains_key(*d)) {
            match rank(dep) {
                Some(dr) if dr < r => {}
                Some(dr) => bad.push(format!(
                    "{pkg} (rank {r}) depends on {dep} (rank {dr}): dependencies must point down"
                )),
                None => {} // reported as unranked on its own line
            }
            if GUEST_SIDE.contains(&dep.as_str()) && !GUEST_USERS.contains(&pkg.as_str()) {
                bad.push(format!(
                    "{pkg} depends on the guest-side {dep}: only {GUEST_USERS:?} may"
                ));
            }
        }
        if PURE.contains(&pkg.as_str()) {
            for dep in deps.iter().filter(|d| SYSTEM_CRATES.contains(&d.as_str())) {
                bad.push(format!(
                    "{pkg} must stay pure (no I/O) but depends on {dep}"
                ));
            }
        }
    }
    for model in HOST_MODEL {
        let reach = reachable(graph, model);
        for guest in GUEST_SIDE.iter().filter(|g| reach.contains(**g)) {
            bad.push(format!("{model} reaches the guest-side {guest}"));
        }
    }
    bad
}

/// The workspace packages `from` depends on, directly or not.
fn reachable(graph: &BTreeMap<String, BTreeSet<String>>, from: &str) -> BTreeSet<String> {
    let mut seen = BTreeSet::new();
    let mut todo = vec![from.to_string()];
    while let Some(p) = todo.pop() {
        for d in graph.get(&p).into_iter().flatten() {
            if graph.contains_key(d) && seen.insert(d.clone()) {
                todo.push(d.clone());
            }
        }
    }
    seen
}

#[test]
fn dependencies_point_down_and_guest_code_stays_in_the_guest() {
    let graph = workspace_dependencies();
    // The test really sees the workspace.
    for known in ["bulwark-vault", "bulwark-consistency", "bulwark-quiesce"] {
        assert!(graph.contains_key(known), "{known} missing from {graph:?}");
    }
    let bad = violations(&graph);
    assert!(bad.is_empty(), "layering broken:\n  {}", bad.join("\n  "));
}

/// The rules catch each kind of mistake (on a made-up graph, so this needs no broken
/// Cargo.toml).
#[test]
fn the_rules_catch_upward_guest_side_and_impure_dependencies() {
    let mut graph = workspace_dependencies();
    let mut add = |pkg: &str, dep: &str| {
        graph.get_mut(pkg).unwrap().insert(dep.to_string());
    };
    add("bulwark-vault", "bulwark-snapshot"); // up
    add("bulwark-protocol", "bulwark-quiesce"); // guest side, same rank
    add("bulwark-consistency", "rustix"); // impure
    let bad = violations(&graph).join("\n");
    assert!(
        bad.contains("bulwark-vault (rank 2) depends on bulwark-snapshot"),
        "{bad}"
    );
    assert!(
        bad.contains("bulwark-protocol depends on the guest-side bulwark-quiesce"),
        "{bad}"
    );
    assert!(
        bad.contains("bulwark-protocol reaches the guest-side bulwark-quiesce"),
        "{bad}"
    );
    assert!(bad.contains("bulwark-consistency must stay pure"), "{bad}");
}
