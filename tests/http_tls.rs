//! The daemon's API off loopback: TLS through rustls with a certificate made in the test
//! (rcgen), against the real `bulwark-controller serve` process.
//!
//! A configuration listening on a non-loopback address (0.0.0.0) without `tls_cert` is refused
//! at start; with it, the CLI (`run-now --api https://… --ca CERT`, reqwest verifying the
//! chain and the address) starts a backup; the same CLI without `--ca` refuses the unknown
//! certificate; plain HTTP to the TLS port gets no HTTP answer. About 3 s once the binaries
//! are built.

// Test helpers, like the tests themselves, panic on failure.
#![allow(clippy::unwrap_used)]

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use bulwark_tests::daemon::{create_token, serve, wait_for};
use bulwark_tests::{controller_bin, stderr_of, write_random};

/// The port of this test's daemon (the console helper's range is 21300-21399).
const PORT: u16 = 21312;

fn config(root: &Path, tls: &str) -> std::path::PathBuf {
    let config = root.join("bulwark.toml");
    std::fs::write(
        &config,
        format!(
            r#"vault = "vault"
state_dir = "state"
gc_interval_hours = 0

[[vm]]
name = "web01"
disks = [{{ name = "os", path = "web-os.img" }}]
policy = {{ time_zone = "UTC", schedule = {{ frequency = "daily", times = ["02:00"] }}, retention = {{ daily = 7 }}, consistency = {{ wanted = "crash", minimum = "crash" }} }}

[http]
listen = "0.0.0.0:{PORT}"
{tls}
"#
        ),
    )
    .unwrap();
    config
}

fn run_now(token: &str, args: &[&str]) -> std::process::Output {
    Command::new(controller_bin())
        .args(["run-now", "web01"])
        .args(args)
        .env("BULWARK_API_TOKEN", token)
        .output()
        .unwrap()
}

#[test]
fn api_off_loopback_is_tls_only() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    write_random(&root.join("web-os.img"), 0, 2 << 20, 1);

    // Off loopback without a certificate: refused before anything is served.
    let plain = config(root, "");
    let mut refused = serve(&plain, &root.join("refused.log"));
    let status = wait_for("serve to refuse", Duration::from_secs(30), || {
        refused.0.try_wait().unwrap()
    });
    let log = std::fs::read_to_string(root.join("refused.log")).unwrap();
    assert!(
        !status.success(),
        "serve must refuse plain HTTP off loopback"
    );
    assert!(log.contains("not a loopback address"), "{log}");

    // A certificate for the address the client uses.
    let ck = rcgen::generate_simple_self_signed(vec!["127.0.0.1".to_string()]).unwrap();
    let cert = root.join("http.pem");
    let key = root.join("http.key");
    std::fs::write(&cert, ck.cert.pem()).unwrap();
    std::fs::write(&key, ck.signing_key.serialize_pem()).unwrap();
    let config = config(root, &format!("tls_cert = {:?}\ntls_key = {:?}", cert, key));
    let token = create_token(&config, "operator", "tls-test");
    let _daemon = serve(&config, &root.join("serve.log"));
    wait_for("the API", Duration::from_secs(60), || {
        TcpStream::connect(("127.0.0.1", PORT)).ok()
    });

    // A client that verifies the certificate against the test's CA.
    let api = format!("https://127.0.0.1:{PORT}");
    let out = run_now(&token, &["--api", &api, "--ca", cert.to_str().unwrap()]);
    assert!(
        out.status.success(),
        "run-now over TLS: {}",
        stderr_of(&out)
    );
    let id: i64 = String::from_utf8_lossy(&out.stdout).trim().parse().unwrap();
    assert!(id > 0);

    // Without the CA the same client refuses the server.
    let out = run_now(&token, &["--api", &api]);
    assert!(
        !out.status.success(),
        "an unknown certificate must be refused"
    );
    let err = stderr_of(&out).to_lowercase();
    assert!(
        err.contains("certificate") || err.contains("tls") || err.contains("error sending request"),
        "{err}"
    );

    // Plain HTTP to the TLS port: no HTTP answer.
    let mut s = TcpStream::connect(("127.0.0.1", PORT)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(15))).unwrap();
    s.write_all(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
        .unwrap();
    let mut got = Vec::new();
    let _ = s.read_to_end(&mut got);
    assert!(
        !got.starts_with(b"HTTP/"),
        "plain HTTP was answered: {:?}",
        String::from_utf8_lossy(&got)
    );
}
