//! Terminal output: logging, progress bars, sizes.

use std::collections::HashMap;
use std::io::IsTerminal;
use std::sync::{Arc, Mutex};

use std::time::Duration;

use bulwark_controller::{DemoRequest, Observer};
use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};

/// Logs to stderr; `BULWARK_LOG` (an env-filter) wins over `-v`. With `BULWARK_LOG_SPANS=1`
/// every span logs its busy and idle time when it closes (for profiling a backup's phases).
pub fn init_logging(verbose: u8) {
    let default = match verbose {
        0 => "warn",
        1 => "info,bulwark_controller=debug,bulwark_vault=debug",
        _ => "debug",
    };
    let filter = tracing_subscriber::EnvFilter::try_from_env("BULWARK_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    let spans = if std::env::var_os("BULWARK_LOG_SPANS").is_some_and(|v| v == "1") {
        tracing_subscriber::fmt::format::FmtSpan::CLOSE
    } else {
        tracing_subscriber::fmt::format::FmtSpan::NONE
    };
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_span_events(spans)
        .with_writer(std::io::stderr)
        .with_target(false)
        .try_init();
}

/// One progress bar per disk, on stderr, only when it is a terminal.
#[derive(Debug)]
pub struct Bars {
    multi: MultiProgress,
    bars: Mutex<HashMap<String, ProgressBar>>,
}

impl Bars {
    /// Bars that draw only when `show` and stderr is a terminal.
    pub fn new(show: bool) -> Arc<Bars> {
        let target = if show && std::io::stderr().is_terminal() {
            ProgressDrawTarget::stderr()
        } else {
            ProgressDrawTarget::hidden()
        };
        Arc::new(Bars {
            multi: MultiProgress::with_draw_target(target),
            bars: Mutex::new(HashMap::new()),
        })
    }

    fn bar(&self, item: &str, total: u64, bytes: bool) -> ProgressBar {
        let Ok(mut bars) = self.bars.lock() else {
            return ProgressBar::hidden();
        };
        bars.entry(item.to_string())
            .or_insert_with(|| {
                let template = if bytes {
                    "{prefix:>12} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta}"
                } else {
                    "{prefix:>12} [{bar:30}] {pos}/{len} eta {eta}"
                };
                let style = ProgressStyle::with_template(template)
                    .unwrap_or_else(|_| ProgressStyle::default_bar())
                    .progress_chars("=> ");
                let pb = self.multi.add(ProgressBar::new(total).with_style(style));
                pb.set_prefix(item.to_string());
                pb
            })
            .clone()
    }

    /// Sets a counting bar (`verify`).
    pub fn set(&self, item: &str, done: u64, total: u64) {
        let pb = self.bar(item, total, false);
        pb.set_length(total);
        pb.set_position(done);
    }

    /// Removes every bar.
    pub fn clear(&self) {
        if let Ok(bars) = self.bars.lock() {
            for pb in bars.values() {
                pb.finish_and_clear();
            }
        }
        let _ = self.multi.clear();
    }
}

impl Observer for Bars {
    fn start(&self, item: &str, total: u64) {
        let bar = self.bar(item, total, true);
        bar.reset();
        bar.set_length(total);
    }
    fn advance(&self, item: &str, bytes: u64) {
        self.bar(item, 0, true).inc(bytes);
    }
    fn finish(&self, item: &str) {
        self.bar(item, 0, true).finish();
    }
}

/// Parses sizes like `4096`, `64KiB`, `1MiB`, `8G` (binary units).
pub fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: u64 = num
        .parse()
        .map_err(|_| format!("{s:?} is not a size (e.g. 64KiB, 1MiB, 8GiB)"))?;
    let mult: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kb" | "kib" => 1 << 10,
        "m" | "mb" | "mib" => 1 << 20,
        "g" | "gb" | "gib" => 1 << 30,
        "t" | "tb" | "tib" => 1 << 40,
        _ => return Err(format!("{s:?}: unknown unit (use KiB, MiB, GiB, TiB)")),
    };
    n.checked_mul(mult)
        .ok_or_else(|| format!("{s:?} is too large"))
}

/// Prints `value` as JSON, or `text` (with `none` on stderr first when `empty`).
pub fn show(
    json: bool,
    value: &serde_json::Value,
    text: &impl std::fmt::Display,
    empty: bool,
    none: &str,
) -> anyhow::Result<()> {
    if json {
        println!("{}", serde_json::to_string_pretty(value)?);
        return Ok(());
    }
    if empty {
        eprintln!("{none}");
    }
    let text = text.to_string();
    if !text.is_empty() {
        println!("{}", text.trim_end());
    }
    Ok(())
}

/// Success or failure.
pub fn exit(ok: bool) -> std::process::ExitCode {
    if ok {
        std::process::ExitCode::SUCCESS
    } else {
        std::process::ExitCode::FAILURE
    }
}

/// Parses `90s`, `30m`, `1h`, `2d`, `0` (seconds without a unit).
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: u64 = num
        .parse()
        .map_err(|_| format!("{s:?} is not a duration like 90s, 30m, 1h or 2d"))?;
    let secs = match unit.trim() {
        "" | "s" => 1,
        "m" | "min" => 60,
        "h" => 3600,
        "d" => 86_400,
        other => {
            return Err(format!(
                "unknown duration unit {other:?} (use s, m, h or d)"
            ));
        }
    };
    n.checked_mul(secs)
        .map(Duration::from_secs)
        .ok_or_else(|| format!("{s:?} is too long"))
}

/// `demo`.
#[derive(Debug, clap::Args)]
pub struct DemoArgs {
    /// Working directory for the sample image, vault and restores (default: a new directory
    /// under the system's temporary directory). It is kept, so you can look around.
    #[arg(long, value_name = "DIR")]
    dir: Option<std::path::PathBuf>,
    /// Size of the sample disk image.
    #[arg(long, default_value = "256MiB", value_parser = parse_size)]
    size: u64,
}

impl DemoArgs {
    /// The demo job these options ask for.
    pub fn request(self) -> anyhow::Result<DemoRequest> {
        let name = format!("bulwark-demo-{}", std::process::id());
        Ok(DemoRequest {
            dir: self.dir.unwrap_or_else(|| std::env::temp_dir().join(name)),
            size: self.size,
            vault: crate::keys::vault_options()?,
            observer: Bars::new(true),
        })
    }
}

/// An error and its causes on one line, each piece of text once: a cause whose text the line
/// already holds is left out. The library errors name their cause in their own message (their
/// `Display` is what the daemon's history, the HTTP API and the logs show) and also return it
/// as their `source()`, so anyhow's `{:#}` printed the same text once per layer (a locked
/// image's reason two or three times); a context added here with `.context(..)` still gets its
/// cause appended.
pub fn error_text(e: &anyhow::Error) -> String {
    let mut line = String::new();
    for cause in e.chain() {
        let text = cause.to_string();
        if text.is_empty() || line.contains(&text) {
            continue;
        }
        if !line.is_empty() {
            line.push_str(": ");
        }
        line.push_str(&text);
    }
    line
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Like the library errors: names its cause in its message and returns it as source.
    #[derive(Debug)]
    struct Embeds {
        name: &'static str,
        source: std::io::Error,
    }

    impl std::fmt::Display for Embeds {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            write!(f, "outer {}: {}", self.name, self.source)
        }
    }

    impl std::error::Error for Embeds {
        fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
            Some(&self.source)
        }
    }

    #[test]
    fn each_cause_is_shown_once() {
        let inner = || std::io::Error::other("the image is in use");
        // A library error that names its cause and returns it as its source, twice over.
        let e = anyhow::Error::new(Embeds {
            name: "a",
            source: std::io::Error::other(Embeds {
                name: "b",
                source: inner(),
            }),
        });
        assert_eq!(
            error_text(&e),
            "outer a: outer b: the image is in use",
            "{e:#}"
        );
        assert_eq!(format!("{e:#}").matches("the image is in use").count(), 3);
        // A context added by the binary keeps its cause.
        let e = anyhow::Error::new(inner()).context("reading the config");
        assert_eq!(error_text(&e), "reading the config: the image is in use");
        let e = anyhow::anyhow!("plain");
        assert_eq!(error_text(&e), "plain");
    }

    #[test]
    fn sizes_and_durations() {
        assert_eq!(parse_size("1MiB"), Ok(1 << 20));
        assert_eq!(parse_size("64k"), Ok(64 << 10));
        assert_eq!(parse_size("4096"), Ok(4096));
        assert!(parse_size("1 parsec").is_err());
        assert_eq!(parse_duration("0"), Ok(Duration::ZERO));
        assert_eq!(parse_duration("90s"), Ok(Duration::from_secs(90)));
        assert_eq!(parse_duration("2d"), Ok(Duration::from_secs(172_800)));
        assert!(parse_duration("5y").unwrap_err().contains("unit"));
        assert!(parse_duration("99999999999999999999d").is_err());
    }
}
