//! Terminal output: logging, progress bars, sizes.

use std::collections::HashMap;
use std::io::IsTerminal;
use std::sync::{Arc, Mutex};

use bulwark_controller::Observer;
use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};

/// Logs to stderr; `BULWARK_LOG` (an env-filter) wins over `-v`.
pub fn init_logging(verbose: u8) {
    let default = match verbose {
        0 => "warn",
        1 => "info,bulwark_controller=debug,bulwark_vault=debug",
        _ => "debug",
    };
    let filter = tracing_subscriber::EnvFilter::try_from_env("BULWARK_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
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
        self.bar(item, total, true).set_length(total);
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

/// A size for people: 1.5 GiB.
pub fn human(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = bytes as f64;
    let mut u = 0;
    while v >= 1024.0 && u < UNITS.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{bytes} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("1MiB"), Ok(1 << 20));
        assert_eq!(parse_size("64k"), Ok(64 << 10));
        assert_eq!(parse_size("4096"), Ok(4096));
        assert!(parse_size("1 parsec").is_err());
        assert_eq!(human(1536), "1.5 KiB");
        assert_eq!(human(10), "10 B");
    }
}
