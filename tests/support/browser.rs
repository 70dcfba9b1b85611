//! Headless Chromium (Debian's `chromium` package) driven through the Chrome DevTools
//! Protocol over its websocket (the `tungstenite` crate), for the web console's test.
//!
//! [`Browser::launch`] starts Chromium with a profile of its own in a temporary directory and
//! `--remote-debugging-port=0`, reads the port it chose from `DevToolsActivePort`, opens one
//! page and attaches to it (flat session mode). Every uncaught exception, `console.error` and
//! error log entry (such as a failed request) of the page is collected in
//! [`Browser::errors`]; [`Browser::wait_until`] fails the test as soon as there is one.
//! The process is killed by its pid when the `Browser` is dropped.

use std::io::ErrorKind;
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use base64::Engine;
use serde_json::{Value, json};
use tungstenite::{Message, WebSocket};

use crate::which;

/// The Chromium binary, if installed.
pub fn chromium() -> Option<PathBuf> {
    which("chromium").or_else(|| which("chromium-browser"))
}

/// A headless Chromium with one page attached.
#[derive(Debug)]
pub struct Browser {
    child: Child,
    profile: tempfile::TempDir,
    ws: WebSocket<TcpStream>,
    next_id: u64,
    session: String,
    /// What the page reported as errors so far (exceptions, console errors, failed loads).
    pub errors: Vec<String>,
}

impl Drop for Browser {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Browser {
    /// Starts `chromium` headless with a `width`×`height` window and attaches to a blank page.
    pub fn launch(chromium: &Path, width: u32, height: u32) -> Browser {
        let profile = tempfile::tempdir().expect("a profile directory");
        let log = std::fs::File::create(profile.path().join("chromium.log")).expect("log file");
        let mut cmd = Command::new(chromium);
        cmd.args([
            "--headless",
            "--disable-gpu",
            "--no-first-run",
            "--no-default-browser-check",
            "--disable-extensions",
            "--disable-background-networking",
            "--disable-sync",
            "--disable-component-update",
            "--disable-crash-reporter",
            "--disable-default-apps",
            "--mute-audio",
            "--hide-scrollbars",
            "--remote-debugging-address=127.0.0.1",
            "--remote-debugging-port=0",
        ])
        .arg(format!("--user-data-dir={}", profile.path().display()))
        .arg(format!("--window-size={width},{height}"))
        .arg("about:blank")
        // Its crash database and caches stay in the temporary profile, not in the user's home.
        .env("HOME", profile.path())
        .env("XDG_CONFIG_HOME", profile.path().join(".config"))
        .env("XDG_CACHE_HOME", profile.path().join(".cache"))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log);
        if rustix::process::geteuid().is_root() {
            // Chromium's sandbox refuses to run as root.
            cmd.arg("--no-sandbox");
        }
        let child = cmd.spawn().expect("start chromium");
        let mut b = Browser::connect(child, profile);
        b.session = b.attach_page(width, height);
        b
    }

    fn connect(mut child: Child, profile: tempfile::TempDir) -> Browser {
        let port_file = profile.path().join("DevToolsActivePort");
        let start = Instant::now();
        let (port, path) = loop {
            if let Ok(text) = std::fs::read_to_string(&port_file) {
                let mut lines = text.lines();
                if let (Some(port), Some(path)) = (lines.next(), lines.next())
                    && let Ok(port) = port.trim().parse::<u16>()
                {
                    break (port, path.trim().to_string());
                }
            }
            if let Ok(Some(status)) = child.try_wait() {
                let log = std::fs::read_to_string(profile.path().join("chromium.log"))
                    .unwrap_or_default();
                panic!("chromium exited ({status}) before its DevTools port was open:\n{log}");
            }
            assert!(
                start.elapsed() < Duration::from_secs(60),
                "chromium did not open its DevTools port within 60 s"
            );
            std::thread::sleep(Duration::from_millis(50));
        };
        let tcp = TcpStream::connect(("127.0.0.1", port)).expect("connect to DevTools");
        let url = format!("ws://127.0.0.1:{port}{path}");
        let (ws, _) = tungstenite::client(url.as_str(), tcp).expect("DevTools websocket");
        ws.get_ref()
            .set_read_timeout(Some(Duration::from_millis(200)))
            .expect("read timeout");
        Browser {
            child,
            profile,
            ws,
            next_id: 0,
            session: String::new(),
            errors: Vec::new(),
        }
    }

    fn attach_page(&mut self, width: u32, height: u32) -> String {
        let target = self.send(None, "Target.createTarget", json!({"url": "about:blank"}));
        let target_id = target["targetId"]
            .as_str()
            .expect("a target id")
            .to_string();
        let attached = self.send(
            None,
            "Target.attachToTarget",
            json!({"targetId": target_id, "flatten": true}),
        );
        let session = attached["sessionId"]
            .as_str()
            .expect("a session id")
            .to_string();
        for domain in ["Page.enable", "Runtime.enable", "Log.enable"] {
            self.send(Some(&session), domain, json!({}));
        }
        self.send(
            Some(&session),
            "Emulation.setDeviceMetricsOverride",
            json!({"width": width, "height": height, "deviceScaleFactor": 1, "mobile": false}),
        );
        session
    }

    /// The directory of Chromium's profile (its log is `chromium.log` there).
    pub fn profile_dir(&self) -> &Path {
        self.profile.path()
    }

    /// Sends one command (to the page's session unless `session` is None: the browser) and
    /// waits for its result, collecting the events that arrive meanwhile.
    fn send(&mut self, session: Option<&str>, method: &str, params: Value) -> Value {
        self.next_id += 1;
        let id = self.next_id;
        let mut msg = json!({"id": id, "method": method, "params": params});
        if let Some(s) = session {
            msg["sessionId"] = json!(s);
        }
        self.ws
            .send(Message::text(msg.to_string()))
            .unwrap_or_else(|e| panic!("DevTools {method}: {e}"));
        let start = Instant::now();
        loop {
            assert!(
                start.elapsed() < Duration::from_secs(60),
                "DevTools {method}: no answer within 60 s"
            );
            let Some(v) = self.read_one() else { continue };
            if v["id"].as_u64() == Some(id) {
                if let Some(e) = v.get("error") {
                    panic!("DevTools {method}: {e}");
                }
                return v["result"].clone();
            }
            self.event(&v);
        }
    }

    /// One message, or None after the read timeout.
    fn read_one(&mut self) -> Option<Value> {
        match self.ws.read() {
            Ok(Message::Text(t)) => serde_json::from_str(t.as_str()).ok(),
            Ok(_) => None,
            Err(tungstenite::Error::Io(e))
                if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) =>
            {
                None
            }
            Err(e) => panic!("DevTools websocket: {e}"),
        }
    }

    fn event(&mut self, v: &Value) {
        let p = &v["params"];
        match v["method"].as_str() {
            Some("Runtime.exceptionThrown") => {
                let d = &p["exceptionDetails"];
                let what = d["exception"]["description"]
                    .as_str()
                    .or(d["text"].as_str())
                    .unwrap_or("exception");
                self.errors.push(format!("uncaught exception: {what}"));
            }
            Some("Runtime.consoleAPICalled")
                if matches!(p["type"].as_str(), Some("error" | "assert")) =>
            {
                let args: Vec<String> = p["args"]
                    .as_array()
                    .map(|a| {
                        a.iter()
                            .map(|x| {
                                x["value"]
                                    .as_str()
                                    .map(str::to_string)
                                    .or_else(|| x["description"].as_str().map(str::to_string))
                                    .unwrap_or_else(|| x["value"].to_string())
                            })
                            .collect()
                    })
                    .unwrap_or_default();
                self.errors
                    .push(format!("console.error: {}", args.join(" ")));
            }
            Some("Log.entryAdded") if p["entry"]["level"] == "error" => {
                let e = &p["entry"];
                self.errors.push(format!(
                    "log error: {} {}",
                    e["text"].as_str().unwrap_or(""),
                    e["url"].as_str().unwrap_or("")
                ));
            }
            _ => {}
        }
    }

    /// Reads the events that have arrived (without waiting beyond one read timeout).
    pub fn pump(&mut self) {
        while let Some(v) = self.read_one() {
            self.event(&v);
        }
    }

    /// Panics listing the page's errors, if any.
    pub fn assert_no_errors(&mut self, context: &str) {
        self.pump();
        assert!(
            self.errors.is_empty(),
            "{context}: the page reported errors:\n{}",
            self.errors.join("\n")
        );
    }

    /// A command on the page's session.
    pub fn call(&mut self, method: &str, params: Value) -> Value {
        let session = self.session.clone();
        self.send(Some(&session), method, params)
    }

    /// Evaluates `expr` in the page (promises awaited) and returns its value as JSON; panics
    /// if it throws.
    pub fn eval(&mut self, expr: &str) -> Value {
        let r = self.call(
            "Runtime.evaluate",
            json!({"expression": expr, "returnByValue": true, "awaitPromise": true}),
        );
        if let Some(d) = r.get("exceptionDetails") {
            panic!("evaluating {expr:?} threw: {d}");
        }
        r["result"]["value"].clone()
    }

    /// Opens `url` and waits for its document to be loaded.
    pub fn goto(&mut self, url: &str) {
        let r = self.call("Page.navigate", json!({"url": url}));
        if let Some(e) = r.get("errorText") {
            panic!("navigating to {url}: {e}");
        }
        self.wait_until(
            &format!("{url} to load"),
            Duration::from_secs(30),
            "document.readyState === 'complete'",
        );
    }

    /// Evaluates `expr` every 100 ms until its value is neither null nor false; fails at once
    /// when the page reports an error, and after `limit`.
    pub fn wait_until(&mut self, what: &str, limit: Duration, expr: &str) -> Value {
        let start = Instant::now();
        loop {
            let v = self.eval(expr);
            self.assert_no_errors(&format!("waiting for {what}"));
            if !v.is_null() && v != Value::Bool(false) {
                return v;
            }
            if start.elapsed() >= limit {
                let shown = self.eval("document.body.innerText.slice(0, 4000)");
                panic!(
                    "timed out after {limit:?} waiting for {what}; the page shows:\n{}",
                    shown.as_str().unwrap_or_default()
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Types `text` into the focused element.
    pub fn type_text(&mut self, text: &str) {
        self.call("Input.insertText", json!({"text": text}));
    }

    /// Presses a key (`"Enter"`, `"Tab"`, ...) on the focused element.
    pub fn press(&mut self, key: &str) {
        let (code, text) = match key {
            "Enter" => (13, "\r"),
            "Tab" => (9, ""),
            " " => (32, " "),
            _ => (0, ""),
        };
        for kind in ["keyDown", "keyUp"] {
            let mut p =
                json!({"type": kind, "key": key, "code": key, "windowsVirtualKeyCode": code});
            if kind == "keyDown" && !text.is_empty() {
                p["text"] = json!(text);
            }
            self.call("Input.dispatchKeyEvent", p);
        }
    }

    /// Saves a PNG of the whole page (beyond the window's height) to `path`.
    pub fn screenshot(&mut self, path: &Path) {
        let m = self.call("Page.getLayoutMetrics", json!({}));
        let size = &m["cssContentSize"];
        let width = size["width"].as_f64().unwrap_or(1280.0).max(1.0);
        let height = size["height"].as_f64().unwrap_or(800.0).max(1.0);
        let r = self.call(
            "Page.captureScreenshot",
            json!({
                "format": "png",
                "captureBeyondViewport": true,
                "clip": {"x": 0, "y": 0, "width": width, "height": height, "scale": 1},
            }),
        );
        let data = r["data"].as_str().expect("screenshot data");
        let png = base64::engine::general_purpose::STANDARD
            .decode(data)
            .expect("screenshot base64");
        assert!(png.starts_with(b"\x89PNG"), "the screenshot is not a PNG");
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).expect("screenshot directory");
        }
        std::fs::write(path, png).expect("write the screenshot");
    }
}
