//! The real daemon (`bulwark-controller serve`) as a child process, and a plain HTTP/1.1
//! client for its API: shared by the API test (`tests/http_api.rs`) and the console's browser
//! test (`tests/console.rs`).

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::{controller, controller_bin, stderr_of};

/// A daemon process that is killed (by its pid) when the test ends or panics.
#[derive(Debug)]
pub struct Running(pub Child);

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Starts `bulwark-controller serve --config CONFIG`, its log (`BULWARK_LOG=info`) written to
/// `log`.
pub fn serve(config: &Path, log: &Path) -> Running {
    let log = std::fs::File::create(log).expect("create the daemon's log file");
    Running(
        Command::new(controller_bin())
            .args(["serve", "--config"])
            .arg(config)
            .env("BULWARK_LOG", "info")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start serve"),
    )
}

/// `token create --config`: the token on stdout, its hash appended to the configuration.
pub fn create_token(config: &Path, scope: &str, name: &str) -> String {
    let config = config.to_string_lossy();
    let out = controller([
        "token", "create", "--scope", scope, "--name", name, "--config", &config,
    ]);
    assert!(out.status.success(), "token create: {}", stderr_of(&out));
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// Polls `f` every 20 ms until it gives a value; panics naming `what` after `limit`.
pub fn wait_for<T>(what: &str, limit: Duration, mut f: impl FnMut() -> Option<T>) -> T {
    let start = Instant::now();
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(start.elapsed() < limit, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// One HTTP/1.1 request to `127.0.0.1:port` over plain TCP; the status and the body parsed
/// as JSON (Null if it is not JSON).
pub fn http(
    port: u16,
    method: &str,
    path: &str,
    token: Option<&str>,
    body: Option<Value>,
) -> (u16, Value) {
    let (status, text) = http_text(port, method, path, token, body);
    (status, serde_json::from_str(&text).unwrap_or(Value::Null))
}

/// One HTTP/1.1 request to `127.0.0.1:port` over plain TCP; the status and the body as text.
pub fn http_text(
    port: u16,
    method: &str,
    path: &str,
    token: Option<&str>,
    body: Option<Value>,
) -> (u16, String) {
    let (status, _, body) = http_full(port, method, path, token, body);
    (status, body)
}

/// One HTTP/1.1 request to `127.0.0.1:port`; the status, the response head and the body.
pub fn http_full(
    port: u16,
    method: &str,
    path: &str,
    token: Option<&str>,
    body: Option<Value>,
) -> (u16, String, String) {
    let mut s = TcpStream::connect(("127.0.0.1", port)).expect("connect to the daemon");
    s.set_read_timeout(Some(Duration::from_secs(120)))
        .expect("set a read timeout");
    let body = body.map(|b| b.to_string()).unwrap_or_default();
    let mut req = format!("{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n");
    if let Some(t) = token {
        req.push_str(&format!("Authorization: Bearer {t}\r\n"));
    }
    if !body.is_empty() {
        req.push_str("Content-Type: application/json\r\n");
    }
    req.push_str(&format!("Content-Length: {}\r\n\r\n{body}", body.len()));
    s.write_all(req.as_bytes()).expect("send the request");
    let mut out = Vec::new();
    s.read_to_end(&mut out).expect("read the response");
    let text = String::from_utf8_lossy(&out);
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let status: u16 = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no status line in {text:?}"));
    (status, head.to_string(), body.to_string())
}

/// `promtool check metrics` on `text` (a `/metrics` body); without promtool, a visible skip
/// (a failure under `BULWARK_REQUIRE_SERVERS=1`) named after `test`.
pub fn promtool_check(test: &str, text: &str) {
    let Some(promtool) = crate::which("promtool") else {
        crate::skip(
            &format!("{test} promtool"),
            crate::Needs::Servers,
            "promtool (Debian package prometheus) is not installed",
        );
        return;
    };
    let mut child = Command::new(promtool)
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start promtool");
    child
        .stdin
        .take()
        .expect("promtool's stdin")
        .write_all(text.as_bytes())
        .expect("write to promtool");
    let out = child.wait_with_output().expect("wait for promtool");
    assert!(
        out.status.success(),
        "promtool check metrics: {}{}\n{text}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The first file under `dir`, in name order, depth first (a block object of a local vault,
/// to damage).
pub fn first_file(dir: &Path) -> std::path::PathBuf {
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let mut entries: Vec<_> = std::fs::read_dir(&d)
            .expect("read a directory")
            .flatten()
            .collect();
        entries.sort_by_key(|e| e.file_name());
        for e in entries {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else {
                return p;
            }
        }
    }
    panic!("no file under {}", dir.display());
}
