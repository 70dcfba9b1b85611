//! The web console in a real browser: headless Chromium (Debian's `chromium`) driven through
//! the DevTools protocol (tests/support/browser.rs) against the real daemon process.
//!
//! It signs in with an operator token typed into the login form (Enter submits), sees every VM
//! on the overview (the overdue badge of a VM whose runs fail), a VM's point with its
//! consistency, tier, size and verify state, verifies them from the page, starts a run-now
//! and watches it finish on the Jobs page, and sees the storage plot. Any error the page
//! shows (the error banner) or reports (an uncaught exception, `console.error`, a failed
//! request) fails the test at once. A screenshot of each page is saved under
//! `target/console-screenshots/`.
//!
//! About 11 s once the binaries are built (Chromium starts in under 1 s of it).

// Test helpers, like the tests themselves, panic on failure.
#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use bulwark_tests::browser::{Browser, chromium};
use bulwark_tests::daemon::{create_token, http, http_full, serve, wait_for};
use bulwark_tests::{Needs, skip, target_dir, write_random};
use serde_json::Value;

/// The port of this test's daemon (the console helper's range is 21300-21399).
const PORT: u16 = 21311;

const DAILY: &str = r#"{ name = "daily-crash", time_zone = "UTC", schedule = { frequency = "daily", times = ["02:00"] }, retention = { daily = 7 }, consistency = { wanted = "crash", minimum = "crash" } }"#;
/// Wants file-system consistency without an agent: its runs fail, so it becomes overdue.
const STRICT: &str = r#"{ name = "strict-fs", time_zone = "UTC", schedule = { frequency = "daily", times = ["02:00"] }, retention = { daily = 7 }, consistency = { wanted = "file_system", minimum = "file_system" } }"#;

fn config(root: &Path) -> PathBuf {
    write_random(&root.join("web-os.img"), 0, 8 << 20, 1);
    // The data disk repeats the start of the OS disk: the vault stores those blocks once.
    write_random(&root.join("web-data.img"), 0, 4 << 20, 1);
    write_random(&root.join("db.img"), 0, 96 << 20, 3);
    write_random(&root.join("late.img"), 0, 1 << 20, 4);
    let config = root.join("bulwark.toml");
    std::fs::write(
        &config,
        format!(
            r#"vault = "vault"
state_dir = "state"
concurrency = 2
upload_concurrency = 1
shutdown_timeout_seconds = 10
gc_interval_hours = 0

[[vm]]
name = "web01"
disks = [{{ name = "os", path = "web-os.img" }}, {{ name = "data", path = "web-data.img" }}]
policy = {DAILY}

[[vm]]
name = "db01"
disks = [{{ name = "os", path = "db.img" }}]
policy = {DAILY}

[[vm]]
name = "late01"
disks = [{{ name = "os", path = "late.img" }}]
policy = {STRICT}
schedule_override_seconds = 5

[http]
listen = "127.0.0.1:{PORT}"
overdue_grace_seconds = 1
"#
        ),
    )
    .unwrap();
    config
}

/// Waits until the JavaScript condition `cond` holds; fails at once when the page shows its
/// error banner or reports an error.
fn wait(b: &mut Browser, what: &str, limit: Duration, cond: &str) -> Value {
    let expr = format!(
        "(() => {{ const e = document.getElementById('error'); \
         if (e && !e.hidden) return {{ banner: e.textContent }}; \
         const v = ({cond}); return v ? {{ ok: v }} : null; }})()"
    );
    let v = b.wait_until(what, limit, &expr);
    if let Some(banner) = v.get("banner") {
        panic!("waiting for {what}: the page shows an error: {banner}");
    }
    v["ok"].clone()
}

fn click(b: &mut Browser, selector: &str) {
    let found = b.eval(&format!(
        "(() => {{ const e = document.querySelector({}); if (!e) return false; e.click(); return true; }})()",
        serde_json::to_string(selector).unwrap()
    ));
    assert_eq!(found, Value::Bool(true), "nothing to click at {selector}");
}

fn text(b: &mut Browser, selector: &str) -> String {
    b.eval(&format!(
        "(document.querySelector({}) || {{}}).textContent || ''",
        serde_json::to_string(selector).unwrap()
    ))
    .as_str()
    .unwrap_or_default()
    .to_string()
}

fn job_end(token: &str, id: i64) -> Value {
    wait_for(
        &format!("job {id} to end"),
        Duration::from_secs(120),
        || {
            let (st, j) = http(
                PORT,
                "GET",
                &format!("/api/v1/jobs/{id}"),
                Some(token),
                None,
            );
            assert_eq!(st, 200, "{j}");
            (j["state"] != "InProgress").then_some(j)
        },
    )
}

fn run_now(token: &str, vm: &str) -> i64 {
    let (st, v) = http(
        PORT,
        "POST",
        &format!("/api/v1/vms/{vm}/run"),
        Some(token),
        None,
    );
    assert_eq!(st, 202, "run {vm}: {v}");
    v["job"].as_i64().unwrap()
}

#[test]
fn console_in_headless_chromium() {
    let Some(chromium) = chromium() else {
        skip(
            "console_in_headless_chromium",
            Needs::Servers,
            "needs the `chromium` command (Debian package chromium)",
        );
        return;
    };
    let t0 = Instant::now();
    let step = |what: &str| eprintln!("[{:>6.1}s] {what}", t0.elapsed().as_secs_f64());
    let dir = tempfile::tempdir().unwrap();
    let config = config(dir.path());
    let token = create_token(&config, "operator", "console-test");
    let _daemon = serve(&config, &dir.path().join("serve.log"));
    wait_for("the API", Duration::from_secs(60), || {
        std::net::TcpStream::connect(("127.0.0.1", PORT)).ok()
    });

    step("The console is public static files with a strict CSP; the API still needs a token.");
    let (st, head, body) = http_full(PORT, "GET", "/console/", None, None);
    assert_eq!(st, 200, "{head}");
    assert!(body.contains("<main") && body.contains("console.js"));
    assert!(
        head.to_ascii_lowercase()
            .contains("content-security-policy: default-src 'none'"),
        "{head}"
    );
    let (st, _) = http(PORT, "GET", "/api/v1/vms", None, None);
    assert_eq!(st, 401);

    step("A point of web01 (through the API) before the browser comes.");
    let id = run_now(&token, "web01");
    assert_eq!(job_end(&token, id)["state"], "Completed");

    let shots = target_dir().join("console-screenshots");
    let _ = std::fs::remove_dir_all(&shots);
    step("Chromium: sign in by typing the token and pressing Enter.");
    let mut b = Browser::launch(&chromium, 1280, 900);
    b.goto(&format!("http://127.0.0.1:{PORT}/"));
    wait(
        &mut b,
        "the login form, focused",
        Duration::from_secs(10),
        "!document.getElementById('login').hidden && document.activeElement.id === 'token'",
    );
    b.screenshot(&shots.join("0-login.png"));
    b.type_text(&token);
    b.press("Enter");

    step("Overview: every VM, web01 protected, late01 overdue.");
    wait(
        &mut b,
        "the overview's three VMs",
        Duration::from_secs(20),
        "document.querySelectorAll('#vms tbody tr[data-vm]').length === 3",
    );
    assert_eq!(
        b.eval("sessionStorage.getItem('bulwark.token')").as_str(),
        Some(token.as_str()),
        "the token is kept in the tab's session storage"
    );
    wait(
        &mut b,
        "late01's overdue badge and web01's completed job",
        Duration::from_secs(30),
        "document.querySelector('tr[data-vm=late01] [data-state=overdue]') && \
         document.querySelector('tr[data-vm=late01] [data-state=Failed]') && \
         document.querySelector('tr[data-vm=web01] [data-state=protected]') && \
         document.querySelector('tr[data-vm=web01] [data-state=Completed]')",
    );
    let row = text(&mut b, "tr[data-vm=web01]");
    assert!(
        row.contains("crash / crash") && row.contains("daily-crash"),
        "{row}"
    );
    assert!(text(&mut b, "#overview-summary").contains("1 overdue"));
    b.screenshot(&shots.join("1-overview.png"));

    step("web01's page: its points, verify them from the page.");
    click(&mut b, "a[href='#/vm/web01']");
    wait(
        &mut b,
        "web01's point",
        Duration::from_secs(20),
        "document.querySelectorAll('#points-table tr[data-point]').length === 1",
    );
    let points = text(&mut b, "#points-table tbody");
    assert!(points.contains("crash / crash"), "{points}");
    assert!(
        points.contains("snapshot + vault") || points.contains("vault"),
        "{points}"
    );
    assert!(points.contains("12.0 MiB"), "sizes: {points}");
    assert!(points.contains("unverified"), "{points}");
    let cli = text(&mut b, "#restore-cli");
    assert!(
        cli.contains("bulwark-controller restore --vault")
            && cli.contains("--vm web01 --point latest --disk os"),
        "{cli}"
    );
    click(&mut b, "#vm-verify");
    wait(
        &mut b,
        "the verify result and the point verified",
        Duration::from_secs(60),
        "document.querySelector('#verify-result [data-state=ok]') && \
         document.querySelectorAll('#points-table [data-state=ok]').length === 1",
    );
    click(&mut b, "#points-table tr[data-point] button");
    let picked = b.eval("document.getElementById('restore-point').value");
    let row_point = b.eval("document.querySelector('#points-table tr[data-point]').dataset.point");
    assert!(
        row_point.as_str().is_some_and(|p| p.len() > 8),
        "{row_point}"
    );
    assert_eq!(picked, row_point, "Restore… picks its point");
    assert_eq!(
        b.eval("document.activeElement.id").as_str(),
        Some("restore-to"),
        "Restore… moves the focus to the path field"
    );
    b.type_text("/srv/restore/web01-os.img");
    let cli = text(&mut b, "#restore-cli");
    assert!(
        cli.contains(&format!("--point {}", picked.as_str().unwrap()))
            && cli.contains("--to /srv/restore/web01-os.img"),
        "the command follows the form: {cli}"
    );
    b.screenshot(&shots.join("2-vm-web01.png"));

    step("Run now on db01 from the overview, watch it on the Jobs page.");
    b.eval("location.hash = '#/'");
    wait(
        &mut b,
        "the overview",
        Duration::from_secs(10),
        "document.getElementById('run-db01')",
    );
    click(&mut b, "#run-db01");
    let started = wait(
        &mut b,
        "the run-now's job id",
        Duration::from_secs(10),
        "(/job (\\d+)/.exec(document.getElementById('status').textContent) || [])[1]",
    );
    let job: i64 = started.as_str().unwrap().parse().unwrap();
    click(&mut b, "#status a[href='#/jobs']");
    let row = format!("#jobs tr[data-job='{job}']");
    let seen_running = b.eval(&format!(
        "new Promise(ok => {{ const t0 = Date.now(); const f = () => {{ \
           const r = document.querySelector(\"{row}\"); \
           if (r && r.dataset.jobState === 'InProgress' && r.querySelector('progress')) ok(true); \
           else if (r && r.dataset.jobState !== 'InProgress') ok(false); \
           else if (Date.now() - t0 > 20000) ok(false); else setTimeout(f, 50); }}; f(); }})"
    ));
    if seen_running == Value::Bool(true) {
        b.screenshot(&shots.join("3-jobs-running.png"));
    } else {
        eprintln!("db01's job ended before the Jobs page showed it running");
    }
    wait(
        &mut b,
        "db01's run-now to complete on the Jobs page",
        Duration::from_secs(120),
        &format!(
            "document.querySelector(\"{row}[data-job-state=Completed]\") && \
             document.querySelector(\"{row}\").textContent.includes('100%')"
        ),
    );
    let r = text(&mut b, &row);
    assert!(r.contains("manual") && r.contains("db01"), "{r}");
    let failed = text(&mut b, "#jobs tr[data-vm=late01][data-job-state=Failed]");
    assert!(
        failed.contains("file_system") || failed.contains("file-system"),
        "a failed job shows its error: {failed}"
    );
    b.screenshot(&shots.join("4-jobs.png"));

    step("Storage: usage and dedup factor over time.");
    click(&mut b, "a[href='#/storage']");
    wait(
        &mut b,
        "the storage plot with a measurement per job",
        Duration::from_secs(30),
        "document.querySelector('#storage-svg path.stored') && \
         document.querySelector('#storage-svg path.dedup') && \
         document.querySelectorAll('#storage-samples tbody tr').length >= 2",
    );
    let dedup = text(&mut b, "#dedup-factor");
    let factor: f64 = dedup.trim_end_matches('×').parse().unwrap_or(0.0);
    assert!(
        factor > 1.02,
        "web01's two disks share half their blocks: {dedup}"
    );
    b.screenshot(&shots.join("5-storage.png"));

    step("Sign out: the token is forgotten.");
    click(&mut b, "#logout");
    wait(
        &mut b,
        "the login form",
        Duration::from_secs(10),
        "!document.getElementById('login').hidden && sessionStorage.getItem('bulwark.token') === null",
    );
    b.assert_no_errors("at the end");
    step("done");
}
