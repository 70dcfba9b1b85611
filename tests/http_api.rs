//! The daemon's HTTP API against the real `bulwark-controller serve` process: every resource
//! and action, the token refusals (none, unknown, read-only on an action), the CLI's
//! `token create`, `run-now` and `jobs cancel`, a running backup cancelled cleanly (recorded
//! Cancelled, no point, snapshots released, the next run succeeds), an overdue VM, verify
//! finding damage, and TLS off loopback.
//!
//! One daemon serves all the checks of the first test (about 20 s in a debug build).

// Test helpers, like the tests themselves, panic on failure.
#![allow(clippy::unwrap_used)]

use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use bulwark_tests::daemon::{self, Running, create_token, http, http_text, wait_for};
use bulwark_tests::{controller_bin, stderr_of, write_random};
use serde_json::{Value, json};

/// The port of this test's daemon (the API helper's range is 18400-18499).
const PORT: u16 = 18411;

const DAILY: &str = r#"{ time_zone = "UTC", schedule = { frequency = "daily", times = ["02:00"] }, retention = { daily = 7 }, consistency = { wanted = "crash", minimum = "crash" } }"#;
/// A VM whose jobs always fail: it wants file-system consistency and has no agent.
const STRICT: &str = r#"{ name = "strict", time_zone = "UTC", schedule = { frequency = "daily", times = ["02:00"] }, retention = { daily = 7 }, consistency = { wanted = "file_system", minimum = "file_system" } }"#;

struct Setup {
    _dir: tempfile::TempDir,
    root: PathBuf,
    config: PathBuf,
}

fn setup(http: &str) -> Setup {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().to_path_buf();
    write_random(&root.join("web-os.img"), 0, 3 << 20, 1);
    write_random(&root.join("web-data.img"), 0, 2 << 20, 2);
    write_random(&root.join("big.img"), 0, 160 << 20, 3);
    write_random(&root.join("late.img"), 0, 1 << 20, 4);
    let config = root.join("bulwark.toml");
    std::fs::write(
        &config,
        format!(
            r#"vault = "vault"
state_dir = "state"
concurrency = 3
upload_concurrency = 1
shutdown_timeout_seconds = 10
gc_interval_hours = 0

[[vm]]
name = "web01"
disks = [{{ name = "os", path = "web-os.img" }}, {{ name = "data", path = "web-data.img" }}]
policy = {DAILY}

[[vm]]
name = "big01"
disks = [{{ name = "os", path = "big.img" }}]
policy = {DAILY}

[[vm]]
name = "late01"
disks = [{{ name = "os", path = "late.img" }}]
policy = {STRICT}
schedule_override_seconds = 2

{http}
"#
        ),
    )
    .unwrap();
    Setup {
        root,
        config,
        _dir: dir,
    }
}

fn serve(s: &Setup) -> Running {
    daemon::serve(&s.config, &s.root.join("serve.log"))
}

fn log_of(s: &Setup) -> String {
    std::fs::read_to_string(s.root.join("serve.log")).unwrap_or_default()
}

fn get(token: &str, path: &str) -> Value {
    let (status, v) = http(PORT, "GET", path, Some(token), None);
    assert_eq!(status, 200, "GET {path}: {v}");
    v
}

fn job_end(token: &str, id: i64, limit: Duration) -> Value {
    wait_for(&format!("job {id} to end"), limit, || {
        let j = get(token, &format!("/api/v1/jobs/{id}"));
        (j["state"] != "InProgress").then_some(j)
    })
}

/// The CLI's `run-now` and `jobs cancel` against the daemon (address from --config).
fn cli(config: &Path, token: &str, args: &[&str]) -> std::process::Output {
    Command::new(controller_bin())
        .args(args)
        .arg("--config")
        .arg(config)
        .env("BULWARK_API_TOKEN", token)
        .output()
        .unwrap()
}

fn snapshot_files(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let Ok(rd) = std::fs::read_dir(dir) else {
        return out;
    };
    for e in rd.flatten() {
        let p = e.path();
        if e.file_name().to_string_lossy().starts_with(".base") {
            continue;
        }
        if p.is_dir() {
            out.extend(snapshot_files(&p));
        } else if p.extension().is_some_and(|x| x == "img") {
            out.push(p);
        }
    }
    out
}

#[test]
fn api_resources_actions_auth_and_cancel() {
    let s = setup(&format!(
        "[http]\nlisten = \"127.0.0.1:{PORT}\"\noverdue_grace_seconds = 1\n"
    ));
    let op = create_token(&s.config, "operator", "ops");
    let ro = create_token(&s.config, "read", "dashboard");
    assert_ne!(op, ro);
    let cfg_text = std::fs::read_to_string(&s.config).unwrap();
    assert!(
        !cfg_text.contains(&op) && !cfg_text.contains(&ro),
        "the configuration must hold only the tokens' hashes"
    );
    let t0 = Instant::now();
    let step = |what: &str| eprintln!("[{:>6.1}s] {what}", t0.elapsed().as_secs_f64());
    let _daemon = serve(&s);
    wait_for("the API", Duration::from_secs(60), || {
        TcpStream::connect(("127.0.0.1", PORT)).ok()
    });

    step("Anonymous: only /healthz.");
    // Anonymous: only /healthz.
    let (st, v) = http(PORT, "GET", "/healthz", None, None);
    assert_eq!((st, v["status"].as_str()), (200, Some("ok")));
    for path in [
        "/api/v1/vms",
        "/api/v1/jobs",
        "/api/v1/storage",
        "/api/v1/leases",
    ] {
        let (st, _) = http(PORT, "GET", path, None, None);
        assert_eq!(st, 401, "GET {path} without a token");
        let (st, _) = http(PORT, "GET", path, Some("bwk_wrong"), None);
        assert_eq!(st, 401, "GET {path} with an unknown token");
    }
    let (st, _) = http(PORT, "POST", "/api/v1/vms/web01/run", None, None);
    assert_eq!(st, 401);
    // Read-only scope: resources yes, actions no.
    let (st, _) = http(PORT, "GET", "/api/v1/vms", Some(&ro), None);
    assert_eq!(st, 200);
    for (path, body) in [
        ("/api/v1/vms/web01/run", None),
        ("/api/v1/jobs/1/cancel", None),
        ("/api/v1/verify", Some(json!({}))),
        ("/api/v1/vms/web01/prune", Some(json!({"dry_run": true}))),
        (
            "/api/v1/vms/web01/restore",
            Some(json!({"disk": "os", "to": "/tmp/x.img"})),
        ),
    ] {
        let (st, v) = http(PORT, "POST", path, Some(&ro), body);
        assert_eq!(st, 403, "POST {path} with a read token: {v}");
    }
    let log = log_of(&s);
    assert!(
        log.contains("request refused") && log.contains("no bearer token"),
        "refusals are logged:\n{log}"
    );
    assert!(log.contains("unknown token") && log.contains("has read scope"));

    step("Run now (CLI");
    // Run now (CLI, address from the configuration) and watch it finish.
    let out = cli(&s.config, &op, &["run-now", "web01"]);
    assert!(out.status.success(), "run-now: {}", stderr_of(&out));
    let id: i64 = String::from_utf8_lossy(&out.stdout).trim().parse().unwrap();
    let j = job_end(&ro, id, Duration::from_secs(60));
    assert_eq!(j["state"], "Completed", "{j}");
    assert_eq!(j["trigger"], "manual");
    let point = j["point"].as_str().unwrap().to_string();
    // A second run-now while one runs is refused; unknown VMs too.
    let (st, v) = http(PORT, "POST", "/api/v1/vms/big01/run", Some(&op), None);
    assert_eq!(st, 202, "{v}");
    let big_job = v["job"].as_i64().unwrap();
    let (st, _) = http(PORT, "POST", "/api/v1/vms/big01/run", Some(&op), None);
    assert_eq!(st, 409, "run-now while the VM's job runs");
    let (st, _) = http(PORT, "POST", "/api/v1/vms/nope/run", Some(&op), None);
    assert_eq!(st, 404);

    step("Cancel it mid-transfer");
    // Cancel it mid-transfer through the CLI: recorded Cancelled, no point, snapshots gone.
    wait_for("big01 transferring", Duration::from_secs(60), || {
        let j = get(&ro, &format!("/api/v1/jobs/{big_job}"));
        assert_eq!(
            j["state"], "InProgress",
            "big01 ended before the cancel: {j}"
        );
        (j["progress"]["done"].as_u64().unwrap_or(0) > 0).then_some(())
    });
    let out = cli(&s.config, &op, &["jobs", "cancel", &big_job.to_string()]);
    assert!(out.status.success(), "jobs cancel: {}", stderr_of(&out));
    let j = job_end(&ro, big_job, Duration::from_secs(60));
    assert_eq!(j["state"], "Cancelled", "{j}");
    assert_eq!(j["transfer"], "cancelled", "{j}");
    assert!(j["point"].is_null());
    assert!(j["error"].as_str().unwrap().contains("cancelled"), "{j}");
    let pts = get(&ro, "/api/v1/vms/big01/points");
    assert_eq!(pts["points"].as_array().unwrap().len(), 0, "{pts}");
    let snaps = snapshot_files(&s.root.join("state/snapshots"));
    assert!(
        !snaps.iter().any(|p| p.to_string_lossy().contains("big01")),
        "the cancelled job's snapshots are released: {snaps:?}"
    );
    let (st, _) = http(
        PORT,
        "POST",
        &format!("/api/v1/jobs/{big_job}/cancel"),
        Some(&op),
        None,
    );
    assert_eq!(st, 409, "cancel of an ended job");
    let (st, _) = http(PORT, "POST", "/api/v1/jobs/999999/cancel", Some(&op), None);
    assert_eq!(st, 404);
    step("The next run succeeds.");
    // The next run succeeds.
    let (st, v) = http(PORT, "POST", "/api/v1/vms/big01/run", Some(&op), None);
    assert_eq!(st, 202);
    let j = job_end(&ro, v["job"].as_i64().unwrap(), Duration::from_secs(120));
    assert_eq!(j["state"], "Completed", "the run after the cancel: {j}");

    step("VMs: policy");
    // VMs: policy, next run, last job, protection; late01 fails every 2 s and is overdue.
    let vms = get(&ro, "/api/v1/vms");
    let vm = |name: &str| {
        vms["vms"]
            .as_array()
            .unwrap()
            .iter()
            .find(|v| v["name"] == name)
            .cloned()
            .unwrap()
    };
    let web = vm("web01");
    assert_eq!(web["protection"]["state"], "protected", "{web}");
    assert_eq!(web["last_job"]["id"], id);
    assert!(web["next_run"].as_str().unwrap().ends_with("T02:00:00Z"));
    assert_eq!(web["consistency_wanted"], "crash");
    let late = wait_for("late01 overdue", Duration::from_secs(30), || {
        let v = get(&ro, "/api/v1/vms/late01");
        (v["protection"]["overdue"] == true).then_some(v)
    });
    assert_eq!(late["protection"]["state"], "overdue");
    assert_eq!(late["last_job"]["state"], "Failed", "{late}");
    assert_eq!(late["policy"], "strict");

    step("Points of a VM");
    // Points of a VM: consistency, tiers, size, verify state.
    let v = get(&ro, "/api/v1/vms/web01");
    let p = &v["points"]["points"][0];
    assert_eq!(p["id"], point.as_str());
    assert_eq!(p["size"], 5 << 20);
    assert_eq!(p["consistency"]["reached"], "crash");
    assert_eq!(p["tiers"], json!(["snapshot", "vault"]));
    assert_eq!(p["verify"]["state"], "unverified");

    // Jobs: history with a filter.
    let jobs = get(&ro, "/api/v1/jobs?vm=late01&limit=2");
    let list = jobs["jobs"].as_array().unwrap();
    assert!(!list.is_empty() && list.len() <= 2);
    assert!(list.iter().all(|j| j["vm"] == "late01"));

    step("Storage, policies");
    // Storage, policies, leases.
    // The storage figures follow a job's end after one measurement of the vault (made in the
    // background: a reader is served the previous one meanwhile).
    let st = wait_for(
        "the measurement after big01's run",
        Duration::from_secs(30),
        || {
            let st = get(&ro, "/api/v1/storage");
            (st["points"] == 2).then_some(st)
        },
    );
    let (stored, logical) = (
        st["stored_bytes"].as_u64().unwrap(),
        st["logical_bytes"].as_u64().unwrap(),
    );
    assert_eq!(logical, (5 << 20) + (160 << 20), "{st}");
    assert!(stored > 0 && st["points"] == 2, "{st}");
    let f = st["dedup_factor"].as_f64().unwrap();
    assert!((f - logical as f64 / stored as f64).abs() < 1e-9);
    let pol = get(&ro, "/api/v1/policies");
    let strict = pol["policies"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["name"] == "strict")
        .unwrap();
    assert_eq!(strict["vms"], json!(["late01"]));
    assert_eq!(strict["consistency_minimum"], "file_system");
    let leases = get(&ro, "/api/v1/leases");
    assert!(leases["leases"].is_array());

    step("Restore a disk");
    // Restore a disk to a host path: bit-exact; relative or existing targets refused.
    let to = s.root.join("restored-os.img");
    let body = json!({"point": point, "disk": "os", "to": to});
    let (st, r) = http(
        PORT,
        "POST",
        "/api/v1/vms/web01/restore",
        Some(&op),
        Some(body.clone()),
    );
    assert_eq!(st, 200, "{r}");
    assert_eq!(
        std::fs::read(&to).unwrap(),
        std::fs::read(s.root.join("web-os.img")).unwrap()
    );
    let (st, _) = http(
        PORT,
        "POST",
        "/api/v1/vms/web01/restore",
        Some(&op),
        Some(body),
    );
    assert_eq!(st, 409, "an existing target is not replaced");
    let (st, _) = http(
        PORT,
        "POST",
        "/api/v1/vms/web01/restore",
        Some(&op),
        Some(json!({"disk": "os", "to": "relative.img"})),
    );
    assert_eq!(st, 400);

    step("Prune (dry");
    // Prune (dry run keeps everything, says so).
    let (st, r) = http(
        PORT,
        "POST",
        "/api/v1/vms/web01/prune",
        Some(&op),
        Some(json!({"dry_run": true})),
    );
    assert_eq!(st, 200, "{r}");
    assert_eq!(r["dry_run"], true);
    assert_eq!(r["kept"].as_array().unwrap().len(), 1, "{r}");

    step("Metrics");
    let (st, _) = http_text(PORT, "GET", "/metrics", None, None);
    assert_eq!(st, 401, "/metrics needs a token");
    let (st, text) = http_text(PORT, "GET", "/metrics", Some(&ro), None);
    assert_eq!(st, 200, "{text}");
    for want in [
        "bulwark_jobs{vm=\"big01\",state=\"Cancelled\"} 1",
        "bulwark_jobs{vm=\"web01\",state=\"Completed\"} 1",
        "bulwark_vm_overdue{vm=\"late01\"} 1",
        "bulwark_vm_overdue{vm=\"web01\"} 0",
        "bulwark_last_success_timestamp_seconds{vm=\"web01\"}",
        "bulwark_backup_uploaded_bytes_total{vm=\"big01\"}",
        "bulwark_job_duration_seconds_count{vm=\"big01\"} 2",
        &format!("bulwark_vault_stored_bytes {stored}"),
    ] {
        assert!(text.contains(want), "/metrics lacks {want:?}:\n{text}");
    }
    daemon::promtool_check("http_api", &text);

    step("Verify: clean");
    // Verify: clean, then a damaged block makes web01's point "damaged".
    let (st, r) = http(
        PORT,
        "POST",
        "/api/v1/verify",
        Some(&op),
        Some(json!({"vm": "web01"})),
    );
    assert_eq!((st, &r["ok"]), (200, &json!(true)), "{r}");
    let p = &get(&ro, "/api/v1/vms/web01/points")["points"][0];
    assert_eq!(p["verify"]["state"], "ok");
    let block = daemon::first_file(&s.root.join("vault/blocks"));
    let mut bytes = std::fs::read(&block).unwrap();
    let n = bytes.len();
    bytes[n / 2] ^= 0xff;
    std::fs::write(&block, bytes).unwrap();
    let (st, r) = http(PORT, "POST", "/api/v1/verify", Some(&op), Some(json!({})));
    assert_eq!((st, &r["ok"]), (200, &json!(false)), "{r}");
    let damaged: Vec<&str> = r["broken_points"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(Value::as_str)
        .collect();
    assert!(!damaged.is_empty(), "{r}");
    let states: Vec<Value> = ["web01", "big01"]
        .iter()
        .flat_map(|vm| {
            get(&ro, &format!("/api/v1/vms/{vm}/points"))["points"]
                .as_array()
                .unwrap()
                .clone()
        })
        .map(|p| {
            json!([
                format!(
                    "{}/{}",
                    p["vm"].as_str().unwrap(),
                    p["id"].as_str().unwrap()
                ),
                p["verify"]["state"]
            ])
        })
        .collect();
    for s in &states {
        let key = s[0].as_str().unwrap();
        let want = if damaged.contains(&key) {
            "damaged"
        } else {
            "ok"
        };
        assert_eq!(s[1], want, "{states:?}");
    }
}
