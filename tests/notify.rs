//! Notifications from the real `bulwark-controller serve` process (`[notify]`):
//!
//! * a webhook receiver in the test (axum on port 0) gets exactly one accepted, signed
//!   delivery per failed job (the HMAC-SHA256 of `TIMESTAMP.BODY` checked here with the
//!   test's own HMAC, the timestamp fresh); its first delivery is refused with 503 and comes
//!   again (retry), once;
//! * a VM that misses its schedule (every 2 s, every job failing, grace 1 s) is reported
//!   overdue exactly once while it stays overdue over many checks;
//! * a job completed with warnings gives `job_warnings` and `consistency_below`; a verify that
//!   finds a damaged block gives `verify_damage`;
//! * an SMTP sink in the test (a few lines of tokio speaking SMTP) gets one mail per failed job
//!   and one for the overdue VM;
//! * a second webhook route to a dead port holds nothing up: jobs end at once, the live
//!   receiver gets everything, the daemon logs the retries.
//!
//! About 15 s in a debug build; no root, no servers.

// Test helpers, like the tests themselves, panic on failure.
#![allow(clippy::unwrap_used)]

use std::collections::HashMap;
use std::net::TcpStream;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::http::{HeaderMap, StatusCode};
use bulwark_tests::daemon::{self, wait_for};
use bulwark_tests::write_random;
use hmac::{Hmac, Mac};
use serde_json::{Value, json};
use sha2::Sha256;

/// This test's API port (the notify helper's range is 21400-21499).
const PORT: u16 = 21411;
const SECRET: &str = "test-webhook-secret-0123456789";

const DAILY: &str = r#"{ time_zone = "UTC", schedule = { frequency = "daily", times = ["02:00"] }, retention = { daily = 7 }, consistency = { wanted = "crash", minimum = "crash" } }"#;
/// Jobs always fail: file-system consistency is required and there is no agent.
const STRICT: &str = r#"{ name = "strict", time_zone = "UTC", schedule = { frequency = "daily", times = ["02:00"] }, retention = { daily = 7 }, consistency = { wanted = "file_system", minimum = "file_system" } }"#;
/// Jobs complete with warnings: file-system consistency wanted, crash accepted, no agent.
const HOPEFUL: &str = r#"{ name = "hopeful", time_zone = "UTC", schedule = { frequency = "daily", times = ["02:00"] }, retention = { daily = 7 }, consistency = { wanted = "file_system", minimum = "crash" } }"#;

/// One webhook delivery as received.
#[derive(Debug, Clone)]
struct Delivery {
    accepted: bool,
    timestamp: String,
    signature: String,
    event_id: String,
    body: Vec<u8>,
}

impl Delivery {
    fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap()
    }

    /// The signature checked with the test's own HMAC-SHA256 (not the crate's code).
    fn signed_with(&self, secret: &str) -> bool {
        let mut m = Hmac::<Sha256>::new_from_slice(secret.as_bytes()).unwrap();
        m.update(self.timestamp.as_bytes());
        m.update(b".");
        m.update(&self.body);
        let want = format!("sha256={}", hex::encode(m.finalize().into_bytes()));
        want == self.signature
    }
}

type Received = Arc<Mutex<Vec<Delivery>>>;

/// The webhook receiver: records every POST /hook; refuses the very first with 503.
async fn receiver(listener: tokio::net::TcpListener, got: Received) {
    let app = axum::Router::new().route(
        "/hook",
        axum::routing::post(move |headers: HeaderMap, body: axum::body::Bytes| {
            let got = got.clone();
            async move {
                let h = |n: &str| {
                    headers
                        .get(n)
                        .and_then(|v| v.to_str().ok())
                        .unwrap_or("")
                        .to_string()
                };
                let mut list = got.lock().unwrap();
                let accepted = !list.is_empty();
                list.push(Delivery {
                    accepted,
                    timestamp: h("x-bulwark-timestamp"),
                    signature: h("x-bulwark-signature"),
                    event_id: h("x-bulwark-event-id"),
                    body: body.to_vec(),
                });
                if accepted {
                    StatusCode::OK
                } else {
                    StatusCode::SERVICE_UNAVAILABLE
                }
            }
        }),
    );
    axum::serve(listener, app).await.unwrap();
}

/// One mail as the sink got it: the DATA text.
type Mails = Arc<Mutex<Vec<String>>>;

/// An SMTP sink: enough of RFC 5321 for one client (greeting, EHLO, MAIL, RCPT, DATA, RSET,
/// NOOP, QUIT), every connection served, every message kept.
async fn smtp_sink(listener: tokio::net::TcpListener, mails: Mails) {
    use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
    loop {
        let (conn, _) = listener.accept().await.unwrap();
        let mails = mails.clone();
        tokio::spawn(async move {
            let (r, mut w) = conn.into_split();
            let mut lines = BufReader::new(r).lines();
            w.write_all(b"220 sink ESMTP\r\n").await.unwrap();
            while let Ok(Some(line)) = lines.next_line().await {
                let verb = line.get(..4).unwrap_or("").to_ascii_uppercase();
                let reply: &[u8] = match verb.as_str() {
                    "EHLO" => b"250-sink\r\n250 8BITMIME\r\n",
                    "DATA" => {
                        w.write_all(b"354 go on\r\n").await.unwrap();
                        let mut text = String::new();
                        while let Ok(Some(l)) = lines.next_line().await {
                            if l == "." {
                                break;
                            }
                            text.push_str(&l);
                            text.push('\n');
                        }
                        mails.lock().unwrap().push(text);
                        b"250 kept\r\n"
                    }
                    "QUIT" => {
                        let _ = w.write_all(b"221 bye\r\n").await;
                        return;
                    }
                    _ => b"250 ok\r\n",
                };
                if w.write_all(reply).await.is_err() {
                    return;
                }
            }
        });
    }
}

fn http(method: &str, path: &str, token: &str, body: Option<Value>) -> (u16, Value) {
    daemon::http(PORT, method, path, Some(token), body)
}

/// Runs `vm` now through the API and waits for its job to end; the job.
fn run_now(token: &str, vm: &str) -> Value {
    let (st, r) = http("POST", &format!("/api/v1/vms/{vm}/run"), token, None);
    assert_eq!(st, 202, "run {vm}: {r}");
    let id = r["job"].as_i64().unwrap();
    wait_for(&format!("job {id}"), Duration::from_secs(60), || {
        let (_, j) = http("GET", &format!("/api/v1/jobs/{id}"), token, None);
        (j["state"] != "InProgress").then_some(j)
    })
}

#[test]
fn webhooks_and_mail_for_failures_warnings_overdue_and_damage() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let hooks: Received = Arc::default();
    let mails: Mails = Arc::default();
    let (hook_port, smtp_port, dead_port) = rt.block_on(async {
        let h = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let m = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        // A port nobody listens on: bound, then closed.
        let dead = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let ports = (
            h.local_addr().unwrap().port(),
            m.local_addr().unwrap().port(),
            dead.local_addr().unwrap().port(),
        );
        drop(dead);
        tokio::spawn(receiver(h, hooks.clone()));
        tokio::spawn(smtp_sink(m, mails.clone()));
        ports
    });

    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    write_random(&root.join("web.img"), 0, 2 << 20, 1);
    write_random(&root.join("other.img"), 0, 1 << 20, 2);
    std::fs::write(root.join("hook.secret"), format!("{SECRET}\n")).unwrap();
    // An agent nobody listens on: the job falls back to crash consistency (warnings).
    let agent_sock = root.join("no-agent.sock").display().to_string();
    let config = root.join("bulwark.toml");
    std::fs::write(
        &config,
        format!(
            r#"vault = "vault"
state_dir = "state"
concurrency = 4
gc_interval_hours = 0

[http]
listen = "127.0.0.1:{PORT}"

[notify]
overdue_grace_seconds = 1
retry_initial_ms = 200

[[notify.webhook]]
url = "http://127.0.0.1:{hook_port}/hook"
secret_file = "hook.secret"
events = ["job_failed", "job_warnings", "consistency_below", "vm_overdue", "verify_damage"]

[[notify.webhook]]
url = "http://127.0.0.1:{dead_port}/dead"
secret = "another-secret-0123456789"
events = ["job_failed", "vm_overdue"]

[[notify.smtp]]
server = "127.0.0.1"
port = {smtp_port}
tls = "none"
from = "Bulwark <bulwark@example.org>"
to = ["ops@example.org"]
events = ["job_failed", "vm_overdue"]

[[vm]]
name = "web01"
disks = [{{ name = "os", path = "web.img" }}]
policy = {DAILY}

[[vm]]
name = "fail01"
disks = [{{ name = "os", path = "other.img" }}]
policy = {STRICT}

[[vm]]
name = "warn01"
disks = [{{ name = "os", path = "other.img" }}]
agent = "unix:{agent_sock}"
policy = {HOPEFUL}

[[vm]]
name = "late01"
disks = [{{ name = "os", path = "other.img" }}]
policy = {STRICT}
schedule_override_seconds = 2
"#
        ),
    )
    .unwrap();
    let token = daemon::create_token(&config, "operator", "t");

    let started = Instant::now();
    let _daemon = daemon::serve(&config, &root.join("serve.log"));
    let log_text = || std::fs::read_to_string(root.join("serve.log")).unwrap_or_default();
    wait_for("the API", Duration::from_secs(60), || {
        TcpStream::connect(("127.0.0.1", PORT)).ok()
    });

    // Three failed jobs; each ends at once although one route's receiver is dead.
    for _ in 0..3 {
        let t = Instant::now();
        let j = run_now(&token, "fail01");
        assert_eq!(j["state"], "Failed", "{j}");
        assert!(t.elapsed() < Duration::from_secs(10), "{:?}", t.elapsed());
    }
    let j = run_now(&token, "warn01");
    assert_eq!(j["state"], "CompletedWithWarnings", "{j}");
    let warn_job = j["id"].as_i64().unwrap();
    let j = run_now(&token, "web01");
    assert_eq!(j["state"], "Completed", "{j}");
    // A damaged block: the verify finds it.
    let block = daemon::first_file(&root.join("vault/blocks"));
    let mut bytes = std::fs::read(&block).unwrap();
    let n = bytes.len();
    bytes[n / 2] ^= 0xff;
    std::fs::write(&block, bytes).unwrap();
    let (st, r) = http("POST", "/api/v1/verify", &token, Some(json!({})));
    assert_eq!((st, &r["ok"]), (200, &json!(false)), "{r}");

    // late01 stays overdue for a while: many overdue checks (every second), one report.
    wait_for("8 s of the daemon", Duration::from_secs(30), || {
        (started.elapsed() > Duration::from_secs(8)).then_some(())
    });

    // Every job that failed so far, by id.
    let (_, jobs) = http("GET", "/api/v1/jobs?limit=1000", &token, None);
    let failed: Vec<i64> = jobs["jobs"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|j| j["state"] == "Failed")
        .map(|j| j["id"].as_i64().unwrap())
        .collect();
    assert!(failed.len() >= 6, "3 of fail01 and some of late01: {jobs}");
    let accepted = |kind: &str| -> Vec<Value> {
        hooks
            .lock()
            .unwrap()
            .iter()
            .filter(|d| d.accepted)
            .map(Delivery::json)
            .filter(|e| e["kind"] == kind)
            .collect()
    };
    wait_for(
        "a webhook delivery of every failed job",
        Duration::from_secs(30),
        || {
            let got: Vec<i64> = accepted("job_failed")
                .iter()
                .map(|e| e["job"].as_i64().unwrap())
                .collect();
            failed.iter().all(|id| got.contains(id)).then_some(())
        },
    );
    wait_for("the mails", Duration::from_secs(30), || {
        let m = mails.lock().unwrap();
        failed
            .iter()
            .all(|id| m.iter().any(|t| t.contains(&format!("(job {id})"))))
            .then_some(())
    });
    // Late deliveries would show up as duplicates now.
    std::thread::sleep(Duration::from_secs(2));

    let all = hooks.lock().unwrap().clone();
    // Every delivery is signed with the route's secret, at a fresh timestamp, and carries
    // its event's id.
    let now = jiff::Timestamp::now().as_second();
    for d in &all {
        assert!(
            d.signed_with(SECRET),
            "bad signature on {}",
            String::from_utf8_lossy(&d.body)
        );
        let ts: i64 = d.timestamp.parse().unwrap();
        assert!((now - ts).abs() < 300, "stale timestamp {ts}");
        assert_eq!(d.json()["id"], d.event_id.as_str());
    }
    // The refused first delivery came again, and was accepted once.
    let first = &all[0];
    assert!(!first.accepted);
    assert_eq!(
        all.iter()
            .filter(|d| d.event_id == first.event_id && d.accepted)
            .count(),
        1,
        "the retried delivery of {}",
        first.event_id
    );
    // Exactly one accepted job_failed per failed job, none for any other job.
    let (_, jobs) = http("GET", "/api/v1/jobs?limit=1000", &token, None);
    let failed_now: Vec<i64> = jobs["jobs"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|j| j["state"] == "Failed")
        .map(|j| j["id"].as_i64().unwrap())
        .collect();
    let mut per_job: HashMap<i64, usize> = HashMap::new();
    for e in accepted("job_failed") {
        *per_job.entry(e["job"].as_i64().unwrap()).or_default() += 1;
    }
    for id in &failed {
        assert_eq!(per_job.get(id), Some(&1), "job {id}: {per_job:?}");
    }
    for (id, n) in &per_job {
        assert!(failed_now.contains(id), "job {id} did not fail");
        assert_eq!(*n, 1, "job {id} notified {n} times");
    }
    // Overdue: late01 once, nobody else.
    let overdue = accepted("vm_overdue");
    assert_eq!(overdue.len(), 1, "{overdue:?}");
    assert_eq!(overdue[0]["vm"], "late01");
    assert!(
        overdue[0]["id"]
            .as_str()
            .unwrap()
            .starts_with("overdue-late01-")
    );
    // Warnings and consistency of warn01's job; the verify's damage.
    for kind in ["job_warnings", "consistency_below"] {
        let e = accepted(kind);
        assert_eq!(e.len(), 1, "{kind}: {e:?}");
        assert_eq!(e[0]["job"], warn_job);
        assert_eq!(e[0]["vm"], "warn01");
    }
    let damage = accepted("verify_damage");
    assert_eq!(damage.len(), 1, "{damage:?}");
    assert!(
        !damage[0]["details"]["problems"]
            .as_array()
            .unwrap()
            .is_empty()
    );

    // The mails: one per failed job, one for the overdue VM.
    let m = mails.lock().unwrap().clone();
    for id in &failed {
        let n = m
            .iter()
            .filter(|t| t.contains(&format!("(job {id})")))
            .count();
        assert_eq!(n, 1, "mails of job {id}");
    }
    let overdue_mails: Vec<&String> = m
        .iter()
        .filter(|t| t.contains("Subject: [bulwark] VM overdue: late01"))
        .collect();
    assert_eq!(overdue_mails.len(), 1, "{m:?}");
    assert!(overdue_mails[0].contains("To: ops@example.org"));

    // /metrics: the agent's reachability from its last attempt, lease refusals (none here),
    // the notifications' outcomes; Prometheus' own checker accepts the text.
    let (st, metrics) = daemon::http_text(PORT, "GET", "/metrics", Some(&token), None);
    assert_eq!(st, 200, "{metrics}");
    for want in [
        "bulwark_agent_reachable{vm=\"warn01\"} 0\n",
        "bulwark_lease_conflicts_total{operation=\"gc\"} 0\n",
        "bulwark_notifications_total{outcome=\"retried\"}",
    ] {
        assert!(
            metrics.contains(want),
            "/metrics lacks {want:?}:\n{metrics}"
        );
    }
    assert!(!metrics.contains("bulwark_agent_reachable{vm=\"web01\"}"));
    let sent: u64 = metrics
        .lines()
        .find_map(|l| l.strip_prefix("bulwark_notifications_total{outcome=\"sent\"} "))
        .unwrap()
        .parse()
        .unwrap();
    assert!(sent as usize >= failed.len() * 2, "{metrics}");
    daemon::promtool_check("notify", &metrics);

    // The dead route was tried and retried, and held nothing up (checked above).
    let log = log_text();
    assert!(
        log.contains(&format!("webhook http://127.0.0.1:{dead_port}/dead"))
            && log.contains("notification failed; retrying"),
        "{log}"
    );
}
