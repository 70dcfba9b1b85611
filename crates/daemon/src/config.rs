//! The daemon's configuration file (`bulwark-controller serve --config FILE`).
//!
//! ```toml
//! vault = "/srv/bulwark/vault"          # directory or file://PATH
//! state_dir = "/var/lib/bulwark"        # job history (jobs.db), kept snapshots, the daemon lock
//! # snapshot_dir = "/var/lib/libvirt/images/.bulwark"  # default: <state_dir>/snapshots; put it on
//! #                                     # the images' file system so snapshots are reflinks
//! snapshot_provider = "auto"            # auto | reflink | copy
//! concurrency = 2                       # VMs backed up at once (disks of one VM always in parallel)
//! upload_concurrency = 16               # blocks uploaded at once per disk
//! catch_up_hours = 24                   # a run missed while the daemon was down is made once at
//!                                       # start if it is at most this old (0: never)
//! shutdown_timeout_seconds = 60         # on SIGTERM, running jobs get this long, then are cancelled
//! prune = true                          # apply each VM's policy retention after its jobs
//! gc_interval_hours = 24                # garbage collection this often (0: never)
//! tls_dir = "/etc/bulwark/ca/controller" # the controller's identity from `enroll` (for tcp agents)
//! runtime_dir = "/run/bulwark"          # private directory for the NBD sockets of QEMU's exports
//!
//! [http]                                # the HTTP API, metrics and console (optional)
//! listen = "127.0.0.1:8470"             # not loopback: tls_cert and tls_key are required
//! # tls_cert = "/etc/bulwark/http.pem"  # PEM certificate chain, served through rustls
//! # tls_key = "/etc/bulwark/http.key"   # PEM private key
//! # overdue_grace_seconds = 3600        # overdue: a run passed this long ago, no success since
//! # tokens from `bulwark-controller token create --scope read|operator`: only their SHA-256
//! # [[http.token]]
//! # name = "ops"
//! # scope = "operator"                  # read: resources only; operator: also actions
//! # sha256 = "9f86d08...64 hex digits"
//!
//! [notify]                              # notifications (optional): webhooks and mail per event
//! # overdue_grace_seconds = 3600        # default: [http]'s, else 3600
//! # [[notify.webhook]]                  # JSON POST, HMAC-SHA256 of "TIMESTAMP.BODY" in a header
//! # url = "https://hooks.example.org/bulwark"
//! # secret_file = "/etc/bulwark/webhook.secret"
//! # events = ["job_failed", "job_warnings", "consistency_below", "vm_overdue", "verify_damage"]
//! # [[notify.smtp]]                     # see bulwark_notify::config for every field
//! # server = "smtp.example.org"
//! # from = "bulwark@example.org"
//! # to = ["ops@example.org"]
//! # events = ["job_failed", "vm_overdue"]
//!
//! [[vm]]
//! name = "web01"
//! disks = [
//!   { name = "os", path = "/var/lib/libvirt/images/web01.img" },
//!   { name = "data", path = "/var/lib/libvirt/images/web01-data.img" },
//! ]
//! agent = "tcp:192.0.2.10:7070"         # the guest agent (or unix:/PATH, virtio-serial:unix:/PATH); tcp needs tls_dir
//! policy = "policies/daily.toml"        # a policy file (relative to this file) ...
//!
//! [[vm]]
//! name = "db01"
//! disks = [{ name = "os", path = "/var/lib/libvirt/images/db01.img" }]
//! # ... or an inline policy, the same fields as a policy file:
//! policy = { time_zone = "UTC", schedule = { frequency = "hourly", every_hours = 4 }, retention = { daily = 7 } }
//! # keep_snapshots = false            # do not keep snapshots for instant restore on this host
//! # For tests and ad-hoc use only: run every N seconds (aligned to the Unix epoch) instead of
//! # the policy's schedule. Retention and instant-restore days still come from the policy.
//! # schedule_override_seconds = 30
//!
//! [[vm]]
//! name = "app01"                        # a running QEMU VM, through its QMP socket:
//! qmp = "unix:/run/qemu/app01.qmp"      # every writable disk at one instant (fleecing), or
//! disks = [{ name = "os" }]             # only these block devices (as query-block names them)
//! agent = "qga:unix:/run/qemu/app01-qga.sock"  # qemu-guest-agent; or the Bulwark agent on a
//! #       "virtio-serial:unix:/run/qemu/app01-agent.sock"   virtio-serial port
//! policy = "policies/daily.toml"
//! ```
//!
//! Unknown fields are errors, and so are: no `[[vm]]`, a VM without disks (or `qmp`), two VMs
//! or two disks of one VM with the same name, an invalid name, a disk image that is not a
//! regular file, a disk `path` on a `qmp` VM (its disks are block device names), a `qmp` that
//! is not `unix:PATH`, `keep_snapshots = true` on a `qmp` VM (QEMU's point in time is not a
//! file to keep), an agent address that does not parse, and any policy error (which names the
//! policy file, line and field). Relative paths are resolved against the configuration file's
//! directory.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use bulwark_policy::Policy;
use bulwark_snapshot::Provider;
use bulwark_vault::validate_name;
use serde::Deserialize;
use toml::Spanned;

use bulwark_snapshot::ImageDisk;

use bulwark_controller::{AgentAddress, AgentTarget};

use crate::Error;

/// Default VMs backed up at once.
pub const CONCURRENCY_DEFAULT: usize = 2;
/// Default catch-up window, hours.
pub const CATCH_UP_HOURS_DEFAULT: u32 = 24;
/// Default directory for the NBD sockets of QEMU's exports.
pub const RUNTIME_DIR_DEFAULT: &str = "/run/bulwark";
/// Default time running jobs get at shutdown.
pub const SHUTDOWN_TIMEOUT_DEFAULT: Duration = Duration::from_secs(60);

/// A validated daemon configuration.
#[derive(Debug, Clone)]
pub struct Config {
    /// The file it was read from (for messages).
    pub file: PathBuf,
    /// The vault location.
    pub vault: String,
    /// Job history, kept snapshots and the daemon lock live here.
    pub state_dir: PathBuf,
    /// Where snapshots are taken and kept for instant restore.
    pub snapshot_dir: PathBuf,
    /// The snapshot provider.
    pub snapshot_provider: Provider,
    /// VMs backed up at once.
    pub concurrency: usize,
    /// Blocks uploaded at once per disk.
    pub upload_concurrency: usize,
    /// How old a missed run may be and still be made up at start (zero: never).
    pub catch_up: Duration,
    /// How long running jobs get at shutdown before they are cancelled.
    pub shutdown_timeout: Duration,
    /// Apply each VM's retention (prune) at housekeeping.
    pub prune: bool,
    /// Run garbage collection this often (`None`: never).
    pub gc_interval: Option<Duration>,
    /// The controller's TLS identity for agents over TCP (`ca.pem`, `controller.pem`,
    /// `controller.key` from `enroll`).
    pub tls_dir: Option<PathBuf>,
    /// Private directory for the NBD sockets of QEMU's exports (`qmp` VMs); a later job finds
    /// there what a killed one left behind.
    pub runtime_dir: PathBuf,
    /// The VMs, in file order.
    pub vms: Vec<VmConfig>,
    /// The HTTP API (`[http]`), if configured.
    pub http: Option<HttpConfig>,
    /// Notification routes (`[notify]`, see [`bulwark_notify::config`]), if configured.
    pub notify: Option<bulwark_notify::NotifyConfig>,
}

/// What an API token may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Scope {
    /// Read every resource; no action.
    Read,
    /// Read, and run actions (run now, cancel, verify, prune, restore).
    Operator,
}

impl std::fmt::Display for Scope {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Scope::Read => "read",
            Scope::Operator => "operator",
        })
    }
}

/// An API token as the configuration stores it: its SHA-256, never the token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiToken {
    /// A name for logs.
    pub name: String,
    /// What it may do.
    pub scope: Scope,
    /// SHA-256 of the token, 32 bytes.
    pub sha256: [u8; 32],
}

/// The `[http]` section.
#[derive(Debug, Clone)]
pub struct HttpConfig {
    /// The address to listen on.
    pub listen: std::net::SocketAddr,
    /// PEM certificate chain and key for TLS (both or neither; required off loopback).
    pub tls: Option<(PathBuf, PathBuf)>,
    /// The accepted tokens.
    pub tokens: Vec<ApiToken>,
    /// A VM is overdue when a scheduled run passed more than this long ago with no successful
    /// job since (`overdue_grace_seconds`, default 3600).
    pub overdue_grace: Duration,
}

/// One VM of the configuration.
#[derive(Debug, Clone)]
pub struct VmConfig {
    /// The VM's name.
    pub name: String,
    /// Its disk images (empty for a `qmp` VM).
    pub disks: Vec<ImageDisk>,
    /// A running QEMU VM backed up through its QMP socket (instead of image files).
    pub qmp: Option<QmpSource>,
    /// The guest agent, if configured: jobs quiesce the guest through it for the policy's
    /// consistency, falling back as far as the policy's minimum allows.
    pub agent: Option<AgentTarget>,
    /// The policy (schedule, retention, instant-restore days, consistency).
    pub policy: Arc<Policy>,
    /// Test/ad-hoc override: run every this often instead of the policy's schedule.
    pub schedule_override: Option<Duration>,
    /// Keep each job's snapshots for the policy's instant-restore days (default true).
    pub keep_snapshots: bool,
}

/// A running VM's QMP socket and the disks to back up.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QmpSource {
    /// `unix:PATH`.
    pub socket: String,
    /// Block device names as `query-block` reports them (empty: every writable disk).
    pub disks: Vec<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    vault: String,
    state_dir: PathBuf,
    snapshot_dir: Option<PathBuf>,
    snapshot_provider: Option<String>,
    concurrency: Option<usize>,
    upload_concurrency: Option<usize>,
    catch_up_hours: Option<u32>,
    shutdown_timeout_seconds: Option<u64>,
    prune: Option<bool>,
    gc_interval_hours: Option<u64>,
    tls_dir: Option<PathBuf>,
    runtime_dir: Option<PathBuf>,
    #[serde(default)]
    vm: Vec<Spanned<RawVm>>,
    http: Option<Spanned<RawHttp>>,
    notify: Option<bulwark_notify::RawNotify>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawHttp {
    listen: String,
    tls_cert: Option<PathBuf>,
    tls_key: Option<PathBuf>,
    overdue_grace_seconds: Option<u64>,
    #[serde(default)]
    token: Vec<Spanned<RawToken>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawToken {
    name: String,
    scope: Scope,
    sha256: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawVm {
    name: Spanned<String>,
    #[serde(default)]
    disks: Vec<Spanned<RawDisk>>,
    qmp: Option<Spanned<String>>,
    agent: Option<Spanned<String>>,
    policy: Option<Spanned<toml::Value>>,
    schedule_override_seconds: Option<u64>,
    keep_snapshots: Option<bool>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawDisk {
    name: String,
    path: Option<PathBuf>,
}

fn line_of(text: &str, offset: usize) -> usize {
    text.get(..offset)
        .map(|t| t.bytes().filter(|b| *b == b'\n').count() + 1)
        .unwrap_or(1)
}

impl Config {
    /// Reads and validates a configuration file.
    pub fn load(path: &Path) -> Result<Config, Error> {
        let text = std::fs::read_to_string(path).map_err(|source| Error::Io {
            path: path.to_path_buf(),
            source,
        })?;
        Config::from_toml_str(&text, path)
    }

    /// Validates a configuration text; `path` names it in errors and anchors relative paths.
    pub fn from_toml_str(text: &str, path: &Path) -> Result<Config, Error> {
        let base = path.parent().filter(|p| !p.as_os_str().is_empty());
        let cx = Parse {
            text,
            file: path.display().to_string(),
            base: base.unwrap_or(Path::new(".")).to_path_buf(),
        };
        let raw: RawConfig = toml::from_str(text).map_err(|e| {
            let line = e.span().map(|s| line_of(text, s.start));
            cx.err(line, e.message().trim().to_string())
        })?;
        let settings = cx.settings(&raw)?;
        if raw.vm.is_empty() {
            let why = "no [[vm]] entries: the daemon has nothing to back up";
            return Err(cx.err(None, why.into()));
        }
        let mut seen: HashMap<String, usize> = HashMap::new();
        let mut vms = Vec::with_capacity(raw.vm.len());
        for vm in &raw.vm {
            let name = vm.get_ref().name.get_ref();
            let name_line = cx.line(vm.get_ref().name.span().start);
            if let Some(first) = seen.insert(name.clone(), name_line) {
                let why =
                    format!("vm {name:?}: a VM of this name is already configured at line {first}");
                return Err(cx.err(Some(name_line), why));
            }
            vms.push(cx.vm(vm, settings.tls_dir.as_deref())?);
        }
        let http = raw.http.as_ref().map(|h| cx.http(h)).transpose()?;
        let notify = raw
            .notify
            .as_ref()
            .map(|n| {
                n.validate(&|p| cx.resolve(p))
                    .map_err(|e| cx.err(e.offset.map(|o| cx.line(o)), e.message))
            })
            .transpose()?;
        Ok(Config {
            file: path.to_path_buf(),
            vms,
            http,
            notify,
            ..settings
        })
    }
}

/// The state of one parse: the text (for line numbers), the file's name (for errors) and the
/// directory relative paths are resolved against.
struct Parse<'a> {
    text: &'a str,
    file: String,
    base: PathBuf,
}

impl Parse<'_> {
    fn err(&self, line: Option<usize>, message: String) -> Error {
        let at = match line {
            Some(l) => format!("{}:{l}", self.file),
            None => self.file.clone(),
        };
        Error::Config { at, message }
    }

    fn line(&self, offset: usize) -> usize {
        line_of(self.text, offset)
    }

    fn resolve(&self, p: &Path) -> PathBuf {
        if p.is_absolute() {
            p.to_path_buf()
        } else {
            self.base.join(p)
        }
    }

    /// Everything but the VMs (left empty).
    fn settings(&self, raw: &RawConfig) -> Result<Config, Error> {
        if raw.vault.trim().is_empty() {
            return Err(self.err(None, "vault: must name a vault location".into()));
        }
        if raw.state_dir.as_os_str().is_empty() {
            return Err(self.err(None, "state_dir: must name a directory".into()));
        }
        let state_dir = self.resolve(&raw.state_dir);
        let snapshot_dir = match raw.snapshot_dir.as_deref() {
            Some(d) => self.resolve(d),
            None => state_dir.join("snapshots"),
        };
        let snapshot_provider = match raw.snapshot_provider.as_deref() {
            None => Provider::Auto,
            Some(p) => p.parse().map_err(|e: bulwark_snapshot::Error| {
                self.err(None, format!("snapshot_provider: {e}"))
            })?,
        };
        let concurrency = raw.concurrency.unwrap_or(CONCURRENCY_DEFAULT);
        if concurrency == 0 {
            return Err(self.err(None, "concurrency: must be at least 1".into()));
        }
        let upload_concurrency = raw.upload_concurrency.unwrap_or(16);
        if upload_concurrency == 0 {
            return Err(self.err(None, "upload_concurrency: must be at least 1".into()));
        }
        // A vault location that is a plain relative path is relative to the config file too.
        let vault = if raw.vault.contains("://") || raw.vault.starts_with("memory:") {
            raw.vault.clone()
        } else {
            self.resolve(Path::new(&raw.vault)).display().to_string()
        };
        let catch_up_hours = u64::from(raw.catch_up_hours.unwrap_or(CATCH_UP_HOURS_DEFAULT));
        Ok(Config {
            file: PathBuf::new(),
            vault,
            state_dir,
            snapshot_dir,
            snapshot_provider,
            concurrency,
            upload_concurrency,
            catch_up: Duration::from_secs(catch_up_hours * 3600),
            shutdown_timeout: raw
                .shutdown_timeout_seconds
                .map(Duration::from_secs)
                .unwrap_or(SHUTDOWN_TIMEOUT_DEFAULT),
            prune: raw.prune.unwrap_or(true),
            tls_dir: raw.tls_dir.as_deref().map(|d| self.resolve(d)),
            runtime_dir: match raw.runtime_dir.as_deref() {
                Some(d) if d.as_os_str().is_empty() => {
                    return Err(self.err(None, "runtime_dir: must name a directory".into()));
                }
                Some(d) => self.resolve(d),
                None => PathBuf::from(RUNTIME_DIR_DEFAULT),
            },
            gc_interval: match raw.gc_interval_hours.unwrap_or(24) {
                0 => None,
                h => Some(Duration::from_secs(h.saturating_mul(3600))),
            },
            vms: Vec::new(),
            http: None,
            notify: None,
        })
    }

    /// The `[http]` section: a socket address, TLS files off loopback, well-formed tokens.
    fn http(&self, h: &Spanned<RawHttp>) -> Result<HttpConfig, Error> {
        let line = Some(self.line(h.span().start));
        let h = h.get_ref();
        let listen: std::net::SocketAddr = h.listen.parse().map_err(|e| {
            let why = format!("http.listen {:?}: {e} (want IP:PORT)", h.listen);
            self.err(line, why)
        })?;
        let tls = match (&h.tls_cert, &h.tls_key) {
            (Some(c), Some(k)) => Some((self.resolve(c), self.resolve(k))),
            (None, None) => None,
            _ => {
                let why = "http: tls_cert and tls_key go together";
                return Err(self.err(line, why.into()));
            }
        };
        if tls.is_none() && !listen.ip().is_loopback() {
            let why = format!(
                "http.listen {listen} is not a loopback address: set tls_cert and tls_key (the API is served over TLS off this host)"
            );
            return Err(self.err(line, why));
        }
        let mut tokens: Vec<ApiToken> = Vec::new();
        for t in &h.token {
            let tline = Some(self.line(t.span().start));
            let t = t.get_ref();
            if t.name.trim().is_empty() || tokens.iter().any(|o| o.name == t.name) {
                let why = format!(
                    "http.token {:?}: names must be unique and not empty",
                    t.name
                );
                return Err(self.err(tline, why));
            }
            let mut sha256 = [0u8; 32];
            let hex = t.sha256.trim();
            let ok = hex.len() == 64
                && hex.is_ascii()
                && sha256.iter_mut().enumerate().all(|(i, b)| {
                    hex.get(2 * i..2 * i + 2)
                        .and_then(|h| u8::from_str_radix(h, 16).ok())
                        .map(|v| *b = v)
                        .is_some()
                });
            if !ok {
                let why = format!(
                    "http.token {:?}: sha256 must be 64 hex digits (from `bulwark-controller token create`)",
                    t.name
                );
                return Err(self.err(tline, why));
            }
            tokens.push(ApiToken {
                name: t.name.clone(),
                scope: t.scope,
                sha256,
            });
        }
        Ok(HttpConfig {
            listen,
            tls,
            tokens,
            overdue_grace: Duration::from_secs(h.overdue_grace_seconds.unwrap_or(3600)),
        })
    }

    /// One `[[vm]]` entry: its name, disks, policy, schedule override and agent.
    fn vm(&self, vm: &Spanned<RawVm>, tls_dir: Option<&Path>) -> Result<VmConfig, Error> {
        let vm_line = self.line(vm.span().start);
        let vm = vm.get_ref();
        let name = vm.name.get_ref().clone();
        let name_line = self.line(vm.name.span().start);
        validate_name("vm", &name)
            .map_err(|e| self.err(Some(name_line), format!("vm.name: {e}")))?;
        let qmp = match &vm.qmp {
            None => None,
            Some(q) => Some(self.qmp(&name, q)?),
        };
        if vm.disks.is_empty() && qmp.is_none() {
            let why = format!(
                "vm {name}: no disks; add disks = [{{ name = \"os\", path = \"/path/to/image\" }}] (or qmp = \"unix:PATH\" for a running VM)"
            );
            return Err(self.err(Some(vm_line), why));
        }
        let mut disk_names: HashMap<String, usize> = HashMap::new();
        let mut disks = Vec::with_capacity(vm.disks.len());
        let mut block_devices = Vec::new();
        for d in &vm.disks {
            let line = self.line(d.span().start);
            if let Some(first) = disk_names.insert(d.get_ref().name.clone(), line) {
                let why = format!(
                    "vm {name}: two disks are named {:?} (first at line {first})",
                    d.get_ref().name
                );
                return Err(self.err(Some(line), why));
            }
            if qmp.is_some() {
                block_devices.push(self.block_device(&name, d.get_ref(), line)?);
            } else {
                disks.push(self.disk(&name, d.get_ref(), line)?);
            }
        }
        let qmp = qmp.map(|socket| QmpSource {
            socket,
            disks: block_devices,
        });
        let Some(policy) = &vm.policy else {
            let why = format!(
                "vm {name}: no policy; set policy = \"FILE\" or an inline table policy = {{ ... }}"
            );
            return Err(self.err(Some(vm_line), why));
        };
        let policy = self.policy(&name, policy)?;
        let schedule_override = match vm.schedule_override_seconds {
            None => None,
            Some(0) => {
                let why = format!("vm {name}: schedule_override_seconds must be at least 1");
                return Err(self.err(Some(vm_line), why));
            }
            Some(s) => Some(Duration::from_secs(s)),
        };
        let agent = match &vm.agent {
            None => None,
            Some(a) => {
                let line = self.line(a.span().start);
                Some(self.agent(&name, line, a.get_ref().trim(), tls_dir)?)
            }
        };
        let keep_snapshots = match (vm.keep_snapshots, &qmp) {
            (Some(true), Some(q)) => {
                let why = format!(
                    "vm {name}: keep_snapshots = true: a VM backed up through QMP ({}) has no snapshot file to keep (QEMU's point in time ends with the backup)",
                    q.socket
                );
                return Err(self.err(Some(vm_line), why));
            }
            (keep, None) => keep.unwrap_or(true),
            (_, Some(_)) => false,
        };
        Ok(VmConfig {
            name,
            disks,
            qmp,
            agent,
            policy: Arc::new(policy),
            schedule_override,
            keep_snapshots,
        })
    }

    /// The QMP socket of VM `vm`: `unix:PATH` (an absolute path, or relative to the file).
    fn qmp(&self, vm: &str, q: &Spanned<String>) -> Result<String, Error> {
        let line = self.line(q.span().start);
        match q.get_ref().trim().strip_prefix("unix:") {
            Some(p) if !p.is_empty() => {
                Ok(format!("unix:{}", self.resolve(Path::new(p)).display()))
            }
            _ => {
                let why = format!(
                    "vm {vm}: qmp = {:?}: expected unix:PATH (the VM's QMP socket, e.g. -qmp unix:/run/qemu/{vm}.qmp,server=on,wait=off)",
                    q.get_ref()
                );
                Err(self.err(Some(line), why))
            }
        }
    }

    /// A disk of `qmp` VM `vm`: a block device name, no path.
    fn block_device(&self, vm: &str, d: &RawDisk, line: usize) -> Result<String, Error> {
        let name = &d.name;
        if let Some(p) = &d.path {
            let why = format!(
                "vm {vm}: disk {name}: path = {:?} with qmp: the disks of a running VM are its block device names as query-block reports them (leave path out)",
                p.display().to_string()
            );
            return Err(self.err(Some(line), why));
        }
        if name.is_empty() || name.contains('/') || name.contains('=') {
            let why = format!("vm {vm}: disk {name:?}: not a block device name");
            return Err(self.err(Some(line), why));
        }
        Ok(name.clone())
    }

    /// One disk of VM `vm`: a valid name and an existing regular file.
    fn disk(&self, vm: &str, d: &RawDisk, line: usize) -> Result<ImageDisk, Error> {
        let name = &d.name;
        validate_name("disk", name)
            .map_err(|e| self.err(Some(line), format!("vm {vm}: disks: {e}")))?;
        let Some(path) = d.path.as_deref().filter(|p| !p.as_os_str().is_empty()) else {
            let why = format!(
                "vm {vm}: disk {name}: no path (an image file; or set qmp = \"unix:PATH\" to back up a running VM by block device name)"
            );
            return Err(self.err(Some(line), why));
        };
        let p = self.resolve(path);
        let shown = p.display().to_string();
        match std::fs::metadata(&p) {
            Ok(m) if m.is_file() => Ok(ImageDisk {
                name: name.clone(),
                path: p,
            }),
            Ok(_) => {
                let why = "is not a regular file (a disk image is needed)";
                Err(self.err(Some(line), format!("vm {vm}: disk {name}: {shown} {why}")))
            }
            Err(e) => Err(self.err(Some(line), format!("vm {vm}: disk {name}: {shown}: {e}"))),
        }
    }

    /// The policy of VM `vm`: a file path or an inline table.
    fn policy(&self, vm: &str, policy: &Spanned<toml::Value>) -> Result<Policy, Error> {
        let line = Some(self.line(policy.span().start));
        match policy.get_ref() {
            toml::Value::String(p) => {
                let ppath = self.resolve(Path::new(p));
                let ptext = std::fs::read_to_string(&ppath).map_err(|e| {
                    self.err(
                        line,
                        format!("vm {vm}: policy file {}: {e}", ppath.display()),
                    )
                })?;
                Policy::from_toml_str(&ptext, &ppath.display().to_string())
                    .map_err(|e| self.err(line, format!("vm {vm}: policy file {e}")))
            }
            toml::Value::Table(t) => {
                let ptext = toml::to_string(t)
                    .map_err(|e| self.err(line, format!("vm {vm}: inline policy: {e}")))?;
                const INLINE: &str = "<inline>";
                Policy::from_toml_str(&ptext, INLINE).map_err(|e| {
                    // The line of the re-serialised table means nothing to the user: point at
                    // the `policy` key and keep the field and the message.
                    let shown = e.to_string();
                    let prefix = format!("{INLINE}:{}: ", e.line());
                    let rest = shown.strip_prefix(&prefix).unwrap_or(&shown);
                    self.err(line, format!("vm {vm}: policy.{rest}"))
                })
            }
            other => {
                let why = format!(
                    "vm {vm}: policy must be a file path or an inline table, got a {}",
                    other.type_str()
                );
                Err(self.err(line, why))
            }
        }
    }

    /// The agent of VM `vm`: `unix:PATH`, `tcp:HOST:PORT` or a bare `HOST:PORT` (TCP, which
    /// needs the configuration's `tls_dir`), `virtio-serial:unix:PATH` or `qga:unix:PATH`.
    fn agent(
        &self,
        vm: &str,
        line: usize,
        agent: &str,
        tls_dir: Option<&Path>,
    ) -> Result<AgentTarget, Error> {
        if agent.is_empty() {
            let why = format!("vm {vm}: agent is empty (leave it out when there is no agent)");
            return Err(self.err(Some(line), why));
        }
        let spelled = if ["unix:", "tcp:", "virtio-serial:", "qga:"]
            .iter()
            .any(|p| agent.starts_with(p))
        {
            agent.to_string()
        } else {
            format!("tcp:{agent}")
        };
        let address: AgentAddress = spelled.parse().map_err(|e: bulwark_controller::Error| {
            self.err(Some(line), format!("vm {vm}: agent: {e}"))
        })?;
        let tls = match (&address, tls_dir) {
            (AgentAddress::Tcp { .. }, Some(dir)) => Some(AgentTarget::tls_dir(dir)),
            (AgentAddress::Tcp { .. }, None) => {
                let why = format!(
                    "vm {vm}: agent {address} is reached over TCP with mutual TLS: set tls_dir (the controller's files from `bulwark-controller enroll`)"
                );
                return Err(self.err(Some(line), why));
            }
            _ => None,
        };
        Ok(AgentTarget {
            address,
            tls,
            server_name: None,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const POLICY: &str = r#"{ time_zone = "UTC", schedule = { frequency = "daily", times = ["02:00"] }, retention = { daily = 7 } }"#;

    fn setup() -> (tempfile::TempDir, PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("a.img"), vec![1u8; 4096]).unwrap();
        std::fs::write(dir.path().join("b.img"), vec![2u8; 4096]).unwrap();
        let cfg = dir.path().join("bulwark.toml");
        (dir, cfg)
    }

    fn parse(cfg: &Path, text: &str) -> Result<Config, String> {
        Config::from_toml_str(text, cfg).map_err(|e| e.to_string())
    }

    #[test]
    fn full_config() {
        let (dir, cfg) = setup();
        std::fs::write(
            dir.path().join("hourly.toml"),
            "time_zone = \"Europe/Berlin\"\n[schedule]\nfrequency = \"hourly\"\nevery_hours = 4\n[retention]\ndaily = 3\ninstant_restore_days = 3\n",
        )
        .unwrap();
        let text = format!(
            r#"vault = "vault"
state_dir = "state"
concurrency = 3
catch_up_hours = 6
tls_dir = "tls"

[[vm]]
name = "web01"
agent = "127.0.0.1:7443"
disks = [{{ name = "os", path = "a.img" }}, {{ name = "data", path = "b.img" }}]
policy = "hourly.toml"

[[vm]]
name = "db01"
disks = [{{ name = "os", path = "a.img" }}]
policy = {POLICY}
schedule_override_seconds = 5
"#
        );
        let c = parse(&cfg, &text).unwrap();
        assert_eq!(c.concurrency, 3);
        assert_eq!(c.catch_up, Duration::from_secs(6 * 3600));
        assert_eq!(c.state_dir, dir.path().join("state"));
        assert_eq!(c.snapshot_dir, dir.path().join("state/snapshots"));
        assert_eq!(c.vault, dir.path().join("vault").display().to_string());
        assert_eq!(c.vms.len(), 2);
        assert_eq!(c.vms[0].disks[1].path, dir.path().join("b.img"));
        assert_eq!(c.vms[0].policy.retention().instant_restore_days, 3);
        let agent = c.vms[0].agent.as_ref().unwrap();
        assert_eq!(agent.address.to_string(), "tcp:127.0.0.1:7443");
        assert_eq!(
            agent.tls.as_ref().unwrap().cert,
            dir.path().join("tls/controller.pem")
        );
        assert!(c.vms[1].agent.is_none());
        assert_eq!(c.vms[1].schedule_override, Some(Duration::from_secs(5)));
        assert!(c.prune && c.vms[0].keep_snapshots);
        assert_eq!(c.gc_interval, Some(Duration::from_secs(24 * 3600)));
    }

    #[test]
    fn agents_need_tls_over_tcp_but_not_over_unix() {
        let (_dir, cfg) = setup();
        let base = format!(
            "vault = \"v\"\nstate_dir = \"s\"\n[[vm]]\nname = \"a\"\ndisks = [{{ name = \"os\", path = \"a.img\" }}]\npolicy = {POLICY}\n"
        );
        let e = parse(&cfg, &format!("{base}agent = \"tcp:10.0.0.1:7070\"\n")).unwrap_err();
        assert!(e.contains("set tls_dir"), "{e}");
        let e = parse(&cfg, &format!("{base}agent = \"tcp:nohostport\"\n")).unwrap_err();
        assert!(e.contains("vm a: agent:"), "{e}");
        let c = parse(&cfg, &format!("{base}agent = \"unix:/run/agent.sock\"\n")).unwrap();
        let agent = c.vms[0].agent.as_ref().unwrap();
        assert_eq!(agent.address.to_string(), "unix:/run/agent.sock");
        assert!(agent.tls.is_none());
    }

    fn vm_block(extra: &str) -> String {
        format!(
            "vault = \"v\"\nstate_dir = \"s\"\n\n[[vm]]\nname = \"web01\"\ndisks = [{{ name = \"os\", path = \"a.img\" }}]\npolicy = {POLICY}\n{extra}"
        )
    }

    #[test]
    fn bad_configs_have_clear_errors() {
        let (_dir, cfg) = setup();
        let cases: Vec<(String, &str)> = vec![
            ("vault = \"v\"\nstate_dir = \n".into(), "bulwark.toml:2:"),
            (
                "vault = \"v\"\nstate_dir = \"s\"\nconcurency = 2\n".into(),
                "bulwark.toml:3: unknown field `concurency`",
            ),
            ("vault = \"v\"\nstate_dir = \"s\"\n".into(), "no [[vm]] entries"),
            (
                "vault = \"v\"\nstate_dir = \"s\"\n[[vm]]\nname = \"x\"\npolicy = \"p.toml\"\n".into(),
                "bulwark.toml:3: vm x: no disks",
            ),
            (
                vm_block(&format!(
                    "[[vm]]\nname = \"web01\"\ndisks = [{{ name = \"os\", path = \"b.img\" }}]\npolicy = {POLICY}\n"
                )),
                "bulwark.toml:9: vm \"web01\": a VM of this name is already configured at line 5",
            ),
            (
                vm_block("").replace(
                    "disks = [{ name = \"os\", path = \"a.img\" }]",
                    "disks = [{ name = \"os\", path = \"a.img\" },\n { name = \"os\", path = \"b.img\" }]",
                ),
                "vm web01: two disks are named \"os\"",
            ),
            (
                vm_block("").replace("a.img", "missing.img"),
                "vm web01: disk os:",
            ),
            (
                vm_block("").replace("\"02:00\"", "\"25:00\""),
                "bulwark.toml:7: vm web01: policy.schedule.times",
            ),
            (
                vm_block("").replace("\"UTC\"", "\"Mars/Olympus\""),
                "unknown time zone \"Mars/Olympus\"",
            ),
            (
                vm_block("").replace("policy = {", "policy = { bogus = 1,"),
                "policy.bogus: unknown field",
            ),
            (
                vm_block("schedule_override_seconds = 0\n"),
                "schedule_override_seconds must be at least 1",
            ),
            (vm_block("").replace("web01", "../x"), "vm.name"),
            (
                vm_block("").replace(&format!("policy = {POLICY}"), "policy = \"nope.toml\""),
                "vm web01: policy file",
            ),
        ];
        for (text, want) in cases {
            let got = parse(&cfg, &text).expect_err(&text);
            assert!(
                got.contains(want),
                "for\n{text}\nwanted {want:?}, got {got:?}"
            );
        }
    }

    #[test]
    fn qmp_vms_and_guest_agents() {
        let (dir, cfg) = setup();
        let text = format!(
            "vault = \"v\"\nstate_dir = \"s\"\nruntime_dir = \"run\"\n\n[[vm]]\nname = \"vm1\"\nqmp = \"unix:/run/vm1.qmp\"\nagent = \"qga:unix:/run/vm1-qga.sock\"\npolicy = {POLICY}\n\n[[vm]]\nname = \"vm2\"\nqmp = \"unix:vm2.qmp\"\ndisks = [{{ name = \"os\" }}, {{ name = \"data\" }}]\nagent = \"virtio-serial:unix:/run/vm2-agent.sock\"\npolicy = {POLICY}\n"
        );
        let c = parse(&cfg, &text).unwrap();
        assert_eq!(c.runtime_dir, dir.path().join("run"));
        let q1 = c.vms[0].qmp.as_ref().unwrap();
        assert_eq!(q1.socket, "unix:/run/vm1.qmp");
        assert!(q1.disks.is_empty() && c.vms[0].disks.is_empty());
        assert!(!c.vms[0].keep_snapshots);
        let a1 = c.vms[0].agent.as_ref().unwrap();
        assert_eq!(a1.address, AgentAddress::Qga("/run/vm1-qga.sock".into()));
        assert!(a1.tls.is_none());
        let q2 = c.vms[1].qmp.as_ref().unwrap();
        assert_eq!(
            q2.socket,
            format!("unix:{}", dir.path().join("vm2.qmp").display())
        );
        assert_eq!(q2.disks, ["os", "data"]);
        assert_eq!(
            c.vms[1].agent.as_ref().unwrap().address,
            AgentAddress::VirtioSerial("/run/vm2-agent.sock".into())
        );
        // Without runtime_dir: /run/bulwark.
        let plain = vm_block("");
        assert_eq!(
            parse(&cfg, &plain).unwrap().runtime_dir,
            Path::new(RUNTIME_DIR_DEFAULT)
        );
        let qmp_vm = |extra: &str| {
            format!(
                "vault = \"v\"\nstate_dir = \"s\"\n\n[[vm]]\nname = \"vm1\"\npolicy = {POLICY}\n{extra}"
            )
        };
        let cases: Vec<(String, &str)> = vec![
            (
                qmp_vm("qmp = \"/run/vm1.qmp\"\n"),
                "bulwark.toml:7: vm vm1: qmp = \"/run/vm1.qmp\": expected unix:PATH",
            ),
            (qmp_vm("qmp = \"unix:\"\n"), "bulwark.toml:7: vm vm1: qmp"),
            (
                qmp_vm("qmp = \"unix:/q\"\ndisks = [{ name = \"os\", path = \"a.img\" }]\n"),
                "bulwark.toml:8: vm vm1: disk os: path = ",
            ),
            (
                qmp_vm("qmp = \"unix:/q\"\nkeep_snapshots = true\n"),
                "bulwark.toml:4: vm vm1: keep_snapshots = true",
            ),
            (
                qmp_vm("qmp = \"unix:/q\"\nagent = \"qga:/run/qga.sock\"\n"),
                "bulwark.toml:8: vm vm1: agent: ",
            ),
            (
                qmp_vm("qmp = \"unix:/q\"\n\nagent = \"virtio-serial:org.bulwark.agent.0\"\n"),
                "bulwark.toml:9: vm vm1: agent: ",
            ),
            (
                qmp_vm("disks = [{ name = \"os\" }]\n"),
                "bulwark.toml:7: vm vm1: disk os: no path",
            ),
            (qmp_vm("qmp = 5\n"), "bulwark.toml:7:"),
            (
                "vault = \"v\"\nstate_dir = \"s\"\nruntime_dir = \"\"\n".into(),
                "runtime_dir: must name a directory",
            ),
        ];
        for (text, want) in cases {
            let got = parse(&cfg, &text).expect_err(&text);
            assert!(
                got.contains(want),
                "for\n{text}\nwanted {want:?}, got {got:?}"
            );
        }
    }

    #[test]
    fn http_section() {
        let (_dir, cfg) = setup();
        let hash = "ab".repeat(32);
        let c = parse(
            &cfg,
            &vm_block(&format!(
                "[http]\nlisten = \"127.0.0.1:8470\"\n[[http.token]]\nname = \"ops\"\nscope = \"operator\"\nsha256 = \"{hash}\"\n"
            )),
        )
        .unwrap();
        let h = c.http.unwrap();
        assert_eq!(h.listen.port(), 8470);
        assert_eq!(h.tokens[0].scope, Scope::Operator);
        assert_eq!(h.tokens[0].sha256, [0xab; 32]);
        let e = parse(&cfg, &vm_block("[http]\nlisten = \"0.0.0.0:8470\"\n")).unwrap_err();
        assert!(e.contains("not a loopback address"), "{e}");
        let e = parse(&cfg, &vm_block("[http]\nlisten = \"localhost\"\n")).unwrap_err();
        assert!(e.contains("want IP:PORT"), "{e}");
        let e = parse(
            &cfg,
            &vm_block("[http]\nlisten = \"127.0.0.1:1\"\n[[http.token]]\nname = \"a\"\nscope = \"read\"\nsha256 = \"xyz\"\n"),
        )
        .unwrap_err();
        assert!(e.contains("64 hex digits"), "{e}");
        let e = parse(
            &cfg,
            &vm_block("[http]\nlisten = \"127.0.0.1:1\"\n[[http.token]]\nname = \"a\"\nscope = \"admin\"\nsha256 = \"\"\n"),
        )
        .unwrap_err();
        assert!(e.contains("unknown variant"), "{e}");
    }

    #[test]
    fn notify_section() {
        let (dir, cfg) = setup();
        std::fs::write(dir.path().join("hook.secret"), "0123456789abcdef\n").unwrap();
        let c = parse(
            &cfg,
            &vm_block("[notify]\noverdue_grace_seconds = 60\n[[notify.webhook]]\nurl = \"http://127.0.0.1:9/h\"\nsecret_file = \"hook.secret\"\nevents = [\"job_failed\"]\n"),
        )
        .unwrap();
        let n = c.notify.unwrap();
        assert_eq!(n.webhooks[0].secret, b"0123456789abcdef");
        assert_eq!(n.overdue_grace, Some(Duration::from_secs(60)));
        // Errors name the configuration file and the line of the field.
        let e = parse(
            &cfg,
            &vm_block("[notify]\n[[notify.webhook]]\nurl = \"http://127.0.0.1:9/h\"\nsecret_file = \"nope.secret\"\nevents = [\"job_failed\"]\n"),
        )
        .unwrap_err();
        assert!(
            e.contains("bulwark.toml:11: notify.webhook[0]: secret_file"),
            "{e}"
        );
        let e = parse(
            &cfg,
            &vm_block("[notify]\n[[notify.webhook]]\nurl = \"http://127.0.0.1:9/h\"\nsecret = \"0123456789abcdef\"\nevents = [\"job_failed\",\n \"vm_late\"]\n"),
        )
        .unwrap_err();
        assert!(
            e.contains("bulwark.toml:13: notify.webhook[0]: events: unknown event \"vm_late\""),
            "{e}"
        );
        let e = parse(&cfg, &vm_block("[notify]\nretries = 3\n")).unwrap_err();
        assert!(
            e.contains("bulwark.toml:9:") && e.contains("unknown field `retries`"),
            "{e}"
        );
    }

    #[test]
    fn policy_file_errors_name_the_policy_file() {
        let (dir, cfg) = setup();
        std::fs::write(
            dir.path().join("p.toml"),
            "time_zone = \"UTC\"\n[schedule]\nfrequency = \"hourly\"\nevery_hours = 5\n[retention]\ndaily = 1\n",
        )
        .unwrap();
        let text = vm_block("").replace(&format!("policy = {POLICY}"), "policy = \"p.toml\"");
        let got = parse(&cfg, &text).unwrap_err();
        assert!(got.contains("p.toml:4: schedule.every_hours"), "got {got}");
    }
}
