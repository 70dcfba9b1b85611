//! The agent's configuration file (TOML).
//!
//! ```toml
//! # Where the controller reaches the agent: "unix:/run/bulwark/agent.sock" (root-only socket,
//! # mode 0600), "tcp:0.0.0.0:7070" (mutual TLS; needs [tls]) or
//! # "virtio-serial:org.bulwark.agent.0" (a virtio-serial port: only the host can reach it).
//! listen = "tcp:0.0.0.0:7070"
//! # Where the frozen-state file and the single-instance lock live (not on a frozen mount!).
//! state_dir = "/var/lib/bulwark-agent"
//! # Optional: the name announced in Hello (default: the kernel's host name).
//! # hostname = "web1"
//!
//! [tls]                      # the three files `bulwark-controller enroll` issued for this guest
//! ca = "/etc/bulwark-agent/tls/ca.pem"
//! cert = "/etc/bulwark-agent/tls/web1.pem"
//! key = "/etc/bulwark-agent/tls/web1.key"
//!
//! [freeze]
//! enabled = true
//! # The mount points to freeze. Absent or empty: EVERY writable ext3/ext4/XFS/btrfs mount of the
//! # guest, including `/` — that is what a backup of a whole VM wants, but it also blocks every
//! # writer of the guest (logs included) for the freeze window. List mounts explicitly when in
//! # doubt; the agent refuses a listed path that is not a mount point.
//! mounts = ["/srv/data"]
//! skip = ["/boot"]
//! # Cap on the freeze timeout a controller may ask for.
//! max_timeout_ms = 60000
//!
//! [scripts]
//! continue_on_failure = false   # a failed pre-script stops the backup (true: drop to file_system)
//! max_timeout = 600             # seconds; cap on any script's timeout
//! [[scripts.pre]]
//! path = "/etc/bulwark-agent/pre-freeze.sh"
//! params = ["--database", "main"]
//! timeout = 30                  # seconds per attempt
//! retries = 1
//! [[scripts.post]]
//! path = "/etc/bulwark-agent/post-thaw.sh"
//! ```
//!
//! The file itself and every script must be owned by root and not writable by group or
//! others (checked on every `Hello` and `Prepare`); otherwise the scripts are refused and the
//! agent offers `file_system` at most, with the reason.

use std::path::{Path, PathBuf};
use std::time::Duration;

use bulwark_quiesce::scripts::{MAX_TIMEOUT, ScriptSpec};
use serde::Deserialize;

use crate::Error;

/// Default cap on a freeze: one minute.
pub const DEFAULT_MAX_FREEZE_MS: u64 = 60_000;

/// Where the agent listens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Listen {
    /// A Unix socket (mode 0600, root only).
    Unix(PathBuf),
    /// TCP with mutual TLS, `HOST:PORT` (port 0 picks a free port; the agent prints it).
    Tcp(String),
    /// The virtio-serial port of this name (`virtio-serial:org.bulwark.agent.0`), reached by
    /// the controller through QEMU's chardev socket on the host (see
    /// [`VirtioPortListener`](bulwark_protocol::VirtioPortListener) for what it authenticates).
    VirtioSerial(String),
}

impl Listen {
    /// Parses `unix:/path`, `tcp:HOST:PORT` or `virtio-serial:PORT_NAME`; [`Error::Listen`]
    /// otherwise.
    pub fn parse(s: &str) -> Result<Listen, Error> {
        let bad = |reason: &'static str| Error::Listen {
            given: s.to_owned(),
            reason,
        };
        if let Some(name) = s.strip_prefix("virtio-serial:") {
            if name.is_empty() || name.contains('/') || name.starts_with('.') {
                return Err(bad("expected virtio-serial:PORT_NAME (no '/')"));
            }
            return Ok(Listen::VirtioSerial(name.to_owned()));
        }
        if let Some(p) = s.strip_prefix("unix:") {
            let p = PathBuf::from(p);
            if !p.is_absolute() {
                return Err(bad("the socket path must be absolute"));
            }
            Ok(Listen::Unix(p))
        } else if let Some(a) = s.strip_prefix("tcp:") {
            match a.rsplit_once(':') {
                Some((host, port)) if !host.is_empty() && port.parse::<u16>().is_ok() => {
                    Ok(Listen::Tcp(a.to_owned()))
                }
                _ => Err(bad("expected tcp:HOST:PORT")),
            }
        } else {
            Err(bad(
                "expected unix:/PATH, tcp:HOST:PORT or virtio-serial:PORT_NAME",
            ))
        }
    }
}

/// The `[tls]` table: the agent's files from enrollment.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    /// The controller's CA certificate (the only trust anchor).
    pub ca: PathBuf,
    /// The agent's certificate.
    pub cert: PathBuf,
    /// The agent's private key (mode 0600).
    pub key: PathBuf,
}

/// The `[freeze]` table.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FreezeConfig {
    /// Whether fsfreeze is used at all (default true).
    #[serde(default = "yes")]
    pub enabled: bool,
    /// Mount points to freeze; empty: every freezable local file system (see the module docs).
    #[serde(default)]
    pub mounts: Vec<PathBuf>,
    /// Mount points never to freeze.
    #[serde(default)]
    pub skip: Vec<PathBuf>,
    /// Cap on the freeze timeout, in milliseconds.
    #[serde(default = "default_max_freeze")]
    pub max_timeout_ms: u64,
}

impl Default for FreezeConfig {
    fn default() -> Self {
        FreezeConfig {
            enabled: true,
            mounts: Vec::new(),
            skip: Vec::new(),
            max_timeout_ms: DEFAULT_MAX_FREEZE_MS,
        }
    }
}

/// The `[scripts]` table.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ScriptsConfig {
    /// Run before the freeze, in order; the first failure stops them.
    #[serde(default)]
    pub pre: Vec<ScriptSpec>,
    /// Run after the thaw, all of them.
    #[serde(default)]
    pub post: Vec<ScriptSpec>,
    /// A failed pre-script lowers the level to file_system instead of stopping the backup.
    #[serde(default)]
    pub continue_on_failure: bool,
    /// Cap on any script's timeout, in seconds (default and upper bound: 600).
    #[serde(default = "default_script_cap")]
    pub max_timeout: f64,
}

impl Default for ScriptsConfig {
    fn default() -> Self {
        ScriptsConfig {
            pre: Vec::new(),
            post: Vec::new(),
            continue_on_failure: false,
            max_timeout: MAX_TIMEOUT.as_secs_f64(),
        }
    }
}

impl ScriptsConfig {
    /// Whether any script is configured.
    pub fn any(&self) -> bool {
        !self.pre.is_empty() || !self.post.is_empty()
    }

    /// The cap as a duration (never above [`MAX_TIMEOUT`]).
    pub fn max_timeout(&self) -> Duration {
        Duration::try_from_secs_f64(self.max_timeout)
            .unwrap_or(MAX_TIMEOUT)
            .min(MAX_TIMEOUT)
    }
}

fn yes() -> bool {
    true
}
fn default_max_freeze() -> u64 {
    DEFAULT_MAX_FREEZE_MS
}
fn default_script_cap() -> f64 {
    MAX_TIMEOUT.as_secs_f64()
}
fn default_state_dir() -> PathBuf {
    PathBuf::from("/var/lib/bulwark-agent")
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    listen: String,
    #[serde(default)]
    tls: Option<TlsConfig>,
    #[serde(default)]
    freeze: FreezeConfig,
    #[serde(default)]
    scripts: ScriptsConfig,
    #[serde(default = "default_state_dir")]
    state_dir: PathBuf,
    #[serde(default)]
    hostname: Option<String>,
}

/// The agent's configuration.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    /// The file it was read from (checked for safe ownership and mode before scripts run).
    pub path: PathBuf,
    /// Where to listen.
    pub listen: Listen,
    /// TLS files (required for TCP).
    pub tls: Option<TlsConfig>,
    /// fsfreeze settings.
    pub freeze: FreezeConfig,
    /// Pre/post scripts.
    pub scripts: ScriptsConfig,
    /// The state directory (frozen-state file, lock).
    pub state_dir: PathBuf,
    /// Name announced in `Hello` instead of the kernel's host name.
    pub hostname: Option<String>,
}

impl Config {
    /// Reads and validates the configuration file at `path`.
    pub fn load(path: &Path) -> Result<Config, Error> {
        let text = std::fs::read_to_string(path).map_err(|source| Error::Io {
            path: path.to_owned(),
            action: "reading the configuration",
            source,
        })?;
        Config::parse(&text, path)
    }

    /// Parses configuration text; `path` is where it came from (for messages and checks).
    pub fn parse(text: &str, path: &Path) -> Result<Config, Error> {
        let bad = |message: String| Error::Config {
            path: path.to_owned(),
            message,
        };
        let raw: RawConfig = toml::from_str(text).map_err(|e| bad(e.to_string()))?;
        let listen = Listen::parse(&raw.listen).map_err(|m| bad(format!("listen: {m}")))?;
        if matches!(listen, Listen::Tcp(_)) && raw.tls.is_none() {
            return Err(bad(
                "listen = \"tcp:...\" needs a [tls] table (ca, cert, key from enrollment): \
                 the agent never serves TCP without mutual TLS"
                    .into(),
            ));
        }
        if raw.freeze.max_timeout_ms == 0 {
            return Err(bad("freeze.max_timeout_ms must be at least 1".into()));
        }
        for m in raw.freeze.mounts.iter().chain(&raw.freeze.skip) {
            if !m.is_absolute() {
                return Err(bad(format!(
                    "freeze: mount {} is not an absolute path",
                    m.display()
                )));
            }
        }
        for s in raw.scripts.pre.iter().chain(&raw.scripts.post) {
            if !s.path.is_absolute() {
                return Err(bad(format!(
                    "scripts: {} is not an absolute path",
                    s.path.display()
                )));
            }
        }
        if !raw.state_dir.is_absolute() {
            return Err(bad("state_dir must be an absolute path".into()));
        }
        let path = std::path::absolute(path).unwrap_or_else(|_| path.to_owned());
        Ok(Config {
            path,
            listen,
            tls: raw.tls,
            freeze: raw.freeze,
            scripts: raw.scripts,
            state_dir: raw.state_dir,
            hostname: raw.hostname,
        })
    }

    /// The frozen-state file: `<state_dir>/frozen.json`.
    pub fn state_file(&self) -> PathBuf {
        self.state_dir.join("frozen.json")
    }

    /// The single-instance lock: `<state_dir>/agent.lock`.
    pub fn lock_file(&self) -> PathBuf {
        self.state_dir.join("agent.lock")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_documented_example() {
        let text = r#"
listen = "tcp:0.0.0.0:7070"
state_dir = "/var/lib/bulwark-agent"
[tls]
ca = "/etc/t/ca.pem"
cert = "/etc/t/web1.pem"
key = "/etc/t/web1.key"
[freeze]
mounts = ["/srv/data"]
skip = ["/boot"]
max_timeout_ms = 5000
[scripts]
continue_on_failure = true
[[scripts.pre]]
path = "/etc/pre.sh"
params = ["a", "b"]
timeout = 2.5
retries = 1
[[scripts.post]]
path = "/etc/post.sh"
"#;
        let c = Config::parse(text, Path::new("/etc/agent.toml")).unwrap();
        assert_eq!(c.listen, Listen::Tcp("0.0.0.0:7070".into()));
        assert!(c.freeze.enabled);
        assert_eq!(c.freeze.max_timeout_ms, 5000);
        assert_eq!(c.scripts.pre[0].timeout, Duration::from_millis(2500));
        assert_eq!(c.scripts.pre[0].params, ["a", "b"]);
        assert!(c.scripts.continue_on_failure);
        assert_eq!(
            c.state_file(),
            Path::new("/var/lib/bulwark-agent/frozen.json")
        );
    }

    #[test]
    fn refuses_tcp_without_tls_and_bad_values() {
        let p = Path::new("/a.toml");
        let e = Config::parse("listen = \"tcp:127.0.0.1:0\"", p).unwrap_err();
        assert!(e.to_string().contains("[tls]"), "{e}");
        assert!(Config::parse("listen = \"udp:x\"", p).is_err());
        assert!(Config::parse("listen = \"unix:rel.sock\"", p).is_err());
        assert!(Config::parse("listen = \"unix:/s\"\nbogus = 1", p).is_err());
        assert!(Config::parse("listen = \"unix:/s\"\n[freeze]\nmounts = [\"rel\"]", p).is_err());
        assert!(Config::parse("listen = \"virtio-serial:\"", p).is_err());
        assert!(Config::parse("listen = \"virtio-serial:../x\"", p).is_err());
        let v = Config::parse("listen = \"virtio-serial:org.bulwark.agent.0\"", p).unwrap();
        assert_eq!(v.listen, Listen::VirtioSerial("org.bulwark.agent.0".into()));
        let c = Config::parse("listen = \"unix:/s\"", p).unwrap();
        assert!(c.freeze.enabled && c.freeze.mounts.is_empty());
        assert!(!c.scripts.any());
    }
}
