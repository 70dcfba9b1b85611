//! The `[notify]` section of the daemon's configuration: routes per event kind.
//!
//! ```toml
//! [notify]
//! # overdue_grace_seconds = 3600   # overdue: a scheduled run passed this long ago, no success since
//! # queue = 256                    # events waiting per route; more are dropped (and counted)
//! # max_attempts = 6               # per event and route, with exponential backoff between
//! # retry_initial_ms = 1000        # the first wait; doubled each attempt, at most 5 minutes
//!
//! [[notify.webhook]]
//! url = "https://hooks.example.org/bulwark"
//! secret_file = "/etc/bulwark/webhook.secret"  # or secret = "..." (HMAC-SHA256 key)
//! events = ["job_failed", "job_warnings", "consistency_below", "vm_overdue", "verify_damage"]
//!
//! [[notify.smtp]]
//! server = "smtp.example.org"
//! # port = 587                     # default: 587 starttls, 465 tls, 25 none
//! # tls = "starttls"               # starttls | tls | none (none only to a loopback server)
//! # username = "bulwark"
//! # password_file = "/etc/bulwark/smtp.password"   # or password = "..."
//! from = "Bulwark <bulwark@example.org>"
//! to = ["ops@example.org"]
//! events = ["job_failed", "vm_overdue", "verify_damage"]
//! ```
//!
//! [`RawNotify`] is what the TOML holds (with spans); [`RawNotify::validate`] checks it and
//! reads the secret files, returning errors with the byte offset they concern, which the
//! daemon turns into `file:line`.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;
use toml::Spanned;

use crate::event::EventKind;

/// Default events waiting per route.
pub const QUEUE_DEFAULT: usize = 256;
/// Default attempts per event and route.
pub const MAX_ATTEMPTS_DEFAULT: u32 = 6;
/// Default first wait before a retry.
pub const RETRY_INITIAL_DEFAULT: Duration = Duration::from_secs(1);
/// The longest wait between attempts.
pub const RETRY_MAX: Duration = Duration::from_secs(300);

/// The `[notify]` table as written (spans kept for error lines).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawNotify {
    overdue_grace_seconds: Option<u64>,
    queue: Option<Spanned<usize>>,
    max_attempts: Option<Spanned<u32>>,
    retry_initial_ms: Option<Spanned<u64>>,
    #[serde(default)]
    webhook: Vec<Spanned<RawWebhook>>,
    #[serde(default)]
    smtp: Vec<Spanned<RawSmtp>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawWebhook {
    url: Spanned<String>,
    secret: Option<Spanned<String>>,
    secret_file: Option<Spanned<PathBuf>>,
    events: Spanned<Vec<Spanned<String>>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSmtp {
    server: Spanned<String>,
    port: Option<u16>,
    tls: Option<Spanned<String>>,
    username: Option<String>,
    password: Option<Spanned<String>>,
    password_file: Option<Spanned<PathBuf>>,
    from: Spanned<String>,
    to: Spanned<Vec<Spanned<String>>>,
    events: Spanned<Vec<Spanned<String>>>,
}

/// A configuration error: the byte offset in the file it concerns (when known) and what is
/// wrong.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    /// Byte offset into the configuration text.
    pub offset: Option<usize>,
    /// What is wrong, naming the field.
    pub message: String,
}

fn err(offset: usize, message: impl Into<String>) -> ConfigError {
    ConfigError {
        offset: Some(offset),
        message: message.into(),
    }
}

/// How mail reaches the server.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SmtpTls {
    /// Plain connection upgraded with STARTTLS (required).
    StartTls,
    /// TLS from the first byte (SMTPS).
    Tls,
    /// No TLS (only to a loopback server).
    None,
}

/// A webhook route.
#[derive(Clone)]
pub struct WebhookRoute {
    /// Where events are POSTed.
    pub url: url::Url,
    /// The HMAC-SHA256 key.
    pub secret: Vec<u8>,
    /// The kinds sent here.
    pub events: Vec<EventKind>,
}

impl std::fmt::Debug for WebhookRoute {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WebhookRoute")
            .field("url", &self.url.as_str())
            .field("events", &self.events)
            .finish_non_exhaustive()
    }
}

/// An SMTP route.
#[derive(Clone)]
pub struct SmtpRoute {
    /// The server's host name or address.
    pub server: String,
    /// Its port.
    pub port: u16,
    /// How the connection is protected.
    pub tls: SmtpTls,
    /// Login, when the server wants one.
    pub credentials: Option<(String, String)>,
    /// The sender.
    pub from: lettre::message::Mailbox,
    /// The recipients.
    pub to: Vec<lettre::message::Mailbox>,
    /// The kinds sent here.
    pub events: Vec<EventKind>,
}

impl std::fmt::Debug for SmtpRoute {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SmtpRoute")
            .field("server", &self.server)
            .field("port", &self.port)
            .field("tls", &self.tls)
            .field("events", &self.events)
            .finish_non_exhaustive()
    }
}

/// A validated `[notify]` section.
#[derive(Debug, Clone)]
pub struct NotifyConfig {
    /// `overdue_grace_seconds`, if given.
    pub overdue_grace: Option<Duration>,
    /// Events waiting per route.
    pub queue: usize,
    /// Attempts per event and route.
    pub max_attempts: u32,
    /// The first wait before a retry (doubled each attempt, at most [`RETRY_MAX`]).
    pub retry_initial: Duration,
    /// Webhook routes.
    pub webhooks: Vec<WebhookRoute>,
    /// SMTP routes.
    pub smtp: Vec<SmtpRoute>,
}

fn events(list: &Spanned<Vec<Spanned<String>>>, what: &str) -> Result<Vec<EventKind>, ConfigError> {
    if list.get_ref().is_empty() {
        return Err(err(
            list.span().start,
            format!("{what}: events is empty (name at least one event)"),
        ));
    }
    let mut out = Vec::new();
    for e in list.get_ref() {
        let k: EventKind = e
            .get_ref()
            .parse()
            .map_err(|m| err(e.span().start, format!("{what}: events: {m}")))?;
        if !out.contains(&k) {
            out.push(k);
        }
    }
    Ok(out)
}

/// A secret given inline or in a file (exactly one); a file's trailing newline is dropped.
fn secret(
    inline: Option<&Spanned<String>>,
    file: Option<&Spanned<PathBuf>>,
    names: (&str, &str),
    at: usize,
    what: &str,
    resolve: &dyn Fn(&Path) -> PathBuf,
) -> Result<Option<Vec<u8>>, ConfigError> {
    let (inline_name, file_name) = names;
    match (inline, file) {
        (Some(_), Some(f)) => Err(err(
            f.span().start,
            format!("{what}: give {inline_name} or {file_name}, not both"),
        )),
        (Some(s), None) => Ok(Some(s.get_ref().as_bytes().to_vec())),
        (None, Some(f)) => {
            let path = resolve(f.get_ref());
            let mut bytes = std::fs::read(&path).map_err(|e| {
                err(
                    f.span().start,
                    format!("{what}: {file_name} {}: {e}", path.display()),
                )
            })?;
            while bytes.last().is_some_and(|b| *b == b'\n' || *b == b'\r') {
                bytes.pop();
            }
            Ok(Some(bytes))
        }
        (None, None) => {
            let _ = at;
            Ok(None)
        }
    }
}

fn is_loopback(host: &str) -> bool {
    host == "localhost"
        || host
            .trim_start_matches('[')
            .trim_end_matches(']')
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

impl RawNotify {
    /// Checks every route and reads the secret files (relative paths through `resolve`).
    pub fn validate(
        &self,
        resolve: &dyn Fn(&Path) -> PathBuf,
    ) -> Result<NotifyConfig, ConfigError> {
        let queue = match &self.queue {
            Some(q) if *q.get_ref() == 0 => {
                return Err(err(q.span().start, "notify.queue: must be at least 1"));
            }
            Some(q) if *q.get_ref() > 100_000 => {
                return Err(err(q.span().start, "notify.queue: at most 100000"));
            }
            Some(q) => *q.get_ref(),
            None => QUEUE_DEFAULT,
        };
        let max_attempts = match &self.max_attempts {
            Some(a) if !(1..=20).contains(a.get_ref()) => {
                return Err(err(a.span().start, "notify.max_attempts: from 1 to 20"));
            }
            Some(a) => *a.get_ref(),
            None => MAX_ATTEMPTS_DEFAULT,
        };
        let retry_initial = match &self.retry_initial_ms {
            Some(r) if *r.get_ref() == 0 || *r.get_ref() > 300_000 => {
                return Err(err(
                    r.span().start,
                    "notify.retry_initial_ms: from 1 to 300000",
                ));
            }
            Some(r) => Duration::from_millis(*r.get_ref()),
            None => RETRY_INITIAL_DEFAULT,
        };
        let mut webhooks = Vec::new();
        for (i, w) in self.webhook.iter().enumerate() {
            let at = w.span().start;
            let w = w.get_ref();
            let what = format!("notify.webhook[{i}]");
            let url = url::Url::parse(w.url.get_ref())
                .map_err(|e| err(w.url.span().start, format!("{what}: url: {e}")))?;
            if !matches!(url.scheme(), "http" | "https") || url.host_str().is_none() {
                return Err(err(
                    w.url.span().start,
                    format!("{what}: url {url}: want http://HOST/... or https://HOST/..."),
                ));
            }
            let secret = secret(
                w.secret.as_ref(),
                w.secret_file.as_ref(),
                ("secret", "secret_file"),
                at,
                &what,
                resolve,
            )?
            .ok_or_else(|| {
                err(
                    at,
                    format!("{what}: set secret or secret_file (the HMAC-SHA256 key)"),
                )
            })?;
            if secret.len() < 16 {
                let at = w
                    .secret
                    .as_ref()
                    .map(|s| s.span().start)
                    .or(w.secret_file.as_ref().map(|s| s.span().start))
                    .unwrap_or(at);
                return Err(err(
                    at,
                    format!(
                        "{what}: the secret is {} bytes; use at least 16",
                        secret.len()
                    ),
                ));
            }
            webhooks.push(WebhookRoute {
                url,
                secret,
                events: events(&w.events, &what)?,
            });
        }
        let mut smtp = Vec::new();
        for (i, s) in self.smtp.iter().enumerate() {
            let at = s.span().start;
            let s = s.get_ref();
            let what = format!("notify.smtp[{i}]");
            let server = s.server.get_ref().trim().to_string();
            if server.is_empty() {
                return Err(err(
                    s.server.span().start,
                    format!("{what}: server is empty"),
                ));
            }
            let tls = match s
                .tls
                .as_ref()
                .map(|t| (t.get_ref().as_str(), t.span().start))
            {
                None | Some(("starttls", _)) => SmtpTls::StartTls,
                Some(("tls", _)) => SmtpTls::Tls,
                Some(("none", at)) => {
                    if !is_loopback(&server) {
                        return Err(err(
                            at,
                            format!(
                                "{what}: tls = \"none\" sends mail in clear: only to a loopback server, not {server}"
                            ),
                        ));
                    }
                    SmtpTls::None
                }
                Some((other, at)) => {
                    return Err(err(
                        at,
                        format!("{what}: tls = {other:?}: want starttls, tls or none"),
                    ));
                }
            };
            let port = s.port.unwrap_or(match tls {
                SmtpTls::StartTls => 587,
                SmtpTls::Tls => 465,
                SmtpTls::None => 25,
            });
            let password = secret(
                s.password.as_ref(),
                s.password_file.as_ref(),
                ("password", "password_file"),
                at,
                &what,
                resolve,
            )?;
            let credentials = match (&s.username, password) {
                (Some(u), Some(p)) => Some((
                    u.clone(),
                    String::from_utf8(p)
                        .map_err(|_| err(at, format!("{what}: the password is not UTF-8")))?,
                )),
                (None, None) => None,
                _ => {
                    return Err(err(
                        at,
                        format!("{what}: username and password (or password_file) go together"),
                    ));
                }
            };
            let from = s
                .from
                .get_ref()
                .parse()
                .map_err(|e| err(s.from.span().start, format!("{what}: from: {e}")))?;
            if s.to.get_ref().is_empty() {
                return Err(err(s.to.span().start, format!("{what}: to is empty")));
            }
            let mut to = Vec::new();
            for t in s.to.get_ref() {
                to.push(t.get_ref().parse().map_err(|e| {
                    err(t.span().start, format!("{what}: to {:?}: {e}", t.get_ref()))
                })?);
            }
            smtp.push(SmtpRoute {
                server,
                port,
                tls,
                credentials,
                from,
                to,
                events: events(&s.events, &what)?,
            });
        }
        Ok(NotifyConfig {
            overdue_grace: self.overdue_grace_seconds.map(Duration::from_secs),
            queue,
            max_attempts,
            retry_initial,
            webhooks,
            smtp,
        })
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn parse(text: &str, dir: &Path) -> Result<NotifyConfig, (usize, String)> {
        let raw: RawNotify = toml::from_str(text).map_err(|e| (0, e.to_string()))?;
        raw.validate(&|p| dir.join(p)).map_err(|e| {
            let line = text[..e.offset.unwrap_or(0)].matches('\n').count() + 1;
            (line, e.message)
        })
    }

    #[test]
    fn routes_and_secret_files() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("hook.secret"), "0123456789abcdef-secret\n").unwrap();
        std::fs::write(dir.path().join("smtp.pw"), "pw\n").unwrap();
        let c = parse(
            r#"queue = 8
max_attempts = 3
[[webhook]]
url = "https://hooks.example.org/b"
secret_file = "hook.secret"
events = ["job_failed", "vm_overdue", "job_failed"]
[[smtp]]
server = "127.0.0.1"
port = 2525
tls = "none"
username = "u"
password_file = "smtp.pw"
from = "Bulwark <b@example.org>"
to = ["ops@example.org"]
events = ["verify_damage"]
"#,
            dir.path(),
        )
        .unwrap();
        assert_eq!((c.queue, c.max_attempts), (8, 3));
        assert_eq!(c.webhooks[0].secret, b"0123456789abcdef-secret");
        assert_eq!(
            c.webhooks[0].events,
            [EventKind::JobFailed, EventKind::VmOverdue]
        );
        let s = &c.smtp[0];
        assert_eq!((s.port, s.tls), (2525, SmtpTls::None));
        assert_eq!(s.credentials, Some(("u".into(), "pw".into())));
        assert_eq!(s.events, [EventKind::VerifyDamage]);
    }

    #[test]
    fn errors_name_the_line_and_field() {
        let dir = tempfile::tempdir().unwrap();
        let hook = |extra: &str| format!("[[webhook]]\nurl = \"http://127.0.0.1:1/h\"\n{extra}");
        let cases: Vec<(String, usize, &str)> = vec![
            (
                hook("secret = \"0123456789abcdef\"\nevents = [\"job_failed\", \"job_exploded\"]\n"),
                4,
                "notify.webhook[0]: events: unknown event \"job_exploded\"",
            ),
            (
                hook("secret = \"0123456789abcdef\"\nevents = []\n"),
                4,
                "events is empty",
            ),
            (hook("events = [\"job_failed\"]\n"), 1, "set secret or secret_file"),
            (
                hook("secret = \"short\"\nevents = [\"job_failed\"]\n"),
                3,
                "use at least 16",
            ),
            (
                hook("secret_file = \"missing\"\nevents = [\"job_failed\"]\n"),
                3,
                "secret_file",
            ),
            (
                "[[webhook]]\nurl = \"ftp://h/x\"\nsecret = \"0123456789abcdef\"\nevents = [\"job_failed\"]\n".into(),
                2,
                "want http://HOST",
            ),
            (
                "[[smtp]]\nserver = \"mail.example.org\"\ntls = \"none\"\nfrom = \"a@b.c\"\nto = [\"d@e.f\"]\nevents = [\"job_failed\"]\n".into(),
                3,
                "only to a loopback server",
            ),
            (
                "[[smtp]]\nserver = \"mail.example.org\"\nfrom = \"a@b.c\"\nto = [\"not an address\"]\nevents = [\"job_failed\"]\n".into(),
                4,
                "notify.smtp[0]: to \"not an address\"",
            ),
            (
                "[[smtp]]\nserver = \"m\"\nusername = \"u\"\nfrom = \"a@b.c\"\nto = [\"d@e.f\"]\nevents = [\"job_failed\"]\n".into(),
                1,
                "username and password",
            ),
            ("queue = 0\n".into(), 1, "notify.queue"),
        ];
        for (text, line, want) in cases {
            let (got_line, got) = parse(&text, dir.path()).unwrap_err();
            assert!(
                got.contains(want),
                "for\n{text}\nwanted {want:?}, got {got:?}"
            );
            assert_eq!(got_line, line, "for\n{text}\n{got}");
        }
    }
}
