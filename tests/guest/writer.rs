//! `bulwark-guest-writer`: the point-in-time workload that runs inside the test guest.
//!
//! ```text
//! bulwark-guest-writer [--control DIR] TARGET...
//!   TARGET = block:DEVICE:SLOTS | dir:DIRECTORY:SLOTS     (in write order)
//! bulwark-guest-writer format-dir DIRECTORY SLOTS INDEX    (generation-0 slot files of target INDEX)
//! ```
//!
//! It cycles generation numbers over fixed 4 KiB slots of all targets in one global order (see
//! `bulwark_tests::guest::slots`), each write O_DIRECT | O_DSYNC and complete before the next. On
//! start it reads every slot, checks that they form one prefix of the order (it refuses to run on
//! a torn state), and continues after the newest generation.
//!
//! Control, through files in the control directory (default /run/bulwark-writer):
//! `pause` (present: the writer stops between two writes and writes `paused` with the last
//! generation; removing `pause` resumes), `stop` (finish, write the summary, create `stopped`).
//! The log `DIR/log` holds `gen=G t=UNIX_NS` progress lines every 100 ms, `stall` lines for gaps
//! over 100 ms between two completed writes, and a final `summary` line.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bulwark_tests::guest::slots::{self, Layout, SLOT_SIZE};

enum Target {
    Block { file: File },
    Dir { files: Vec<File> },
}

impl Target {
    fn write_slot(&self, slot: u32, buf: &[u8]) -> std::io::Result<()> {
        match self {
            Target::Block { file } => {
                file.write_all_at(buf, slots::BLOCK_BASE + u64::from(slot) * SLOT_SIZE as u64)
            }
            Target::Dir { files } => files[slot as usize].write_all_at(buf, 0),
        }
    }
    fn read_slot(&self, slot: u32, buf: &mut [u8]) -> std::io::Result<()> {
        match self {
            Target::Block { file } => {
                file.read_exact_at(buf, slots::BLOCK_BASE + u64::from(slot) * SLOT_SIZE as u64)
            }
            Target::Dir { files } => files[slot as usize].read_exact_at(buf, 0),
        }
    }
}

fn direct_flags() -> i32 {
    (rustix::fs::OFlags::DIRECT | rustix::fs::OFlags::DSYNC).bits() as i32
}

fn open_direct(path: &Path) -> Result<File, String> {
    OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(direct_flags())
        .open(path)
        .map_err(|e| format!("open {} (O_DIRECT|O_DSYNC): {e}", path.display()))
}

/// A 4 KiB-aligned buffer of one slot (O_DIRECT needs alignment), without unsafe code.
struct Aligned {
    raw: Vec<u8>,
    off: usize,
}

impl Aligned {
    fn new() -> Aligned {
        let raw = vec![0u8; SLOT_SIZE * 2];
        let off = raw.as_ptr().align_offset(SLOT_SIZE);
        Aligned { raw, off }
    }
    fn get(&mut self) -> &mut [u8] {
        &mut self.raw[self.off..self.off + SLOT_SIZE]
    }
}

fn now_ns() -> u128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0)
}

fn parse_targets(args: &[String]) -> Result<(Layout, Vec<Target>), String> {
    let mut names = Vec::new();
    let mut targets = Vec::new();
    for a in args {
        let (kind, rest) = a.split_once(':').ok_or(format!("bad target {a}"))?;
        let (path, n) = rest.rsplit_once(':').ok_or(format!("bad target {a}"))?;
        let n: u32 = n.parse().map_err(|_| format!("bad slot count in {a}"))?;
        if n == 0 {
            return Err(format!("{a}: no slots"));
        }
        let target = match kind {
            "block" => Target::Block {
                file: open_direct(Path::new(path))?,
            },
            "dir" => Target::Dir {
                files: (0..n)
                    .map(|i| open_direct(&Path::new(path).join(slots::slot_file_name(i))))
                    .collect::<Result<_, _>>()?,
            },
            _ => return Err(format!("unknown target kind {kind} in {a}")),
        };
        names.push((path.to_string(), n));
        targets.push(target);
    }
    if targets.is_empty() {
        return Err("no targets".into());
    }
    Ok((Layout::new(names), targets))
}

fn format_dir(dir: &Path, n: u32, index: u32) -> Result<(), String> {
    std::fs::create_dir_all(dir).map_err(|e| format!("mkdir {}: {e}", dir.display()))?;
    let mut buf = vec![0u8; SLOT_SIZE];
    for i in 0..n {
        slots::encode(&mut buf, 0, index, i);
        let p = dir.join(slots::slot_file_name(i));
        let mut f = File::create(&p).map_err(|e| format!("create {}: {e}", p.display()))?;
        f.write_all(&buf)
            .and_then(|()| f.sync_all())
            .map_err(|e| format!("write {}: {e}", p.display()))?;
    }
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| format!("fsync {}: {e}", dir.display()))
}

fn run(args: &[String]) -> Result<(), String> {
    if args.first().map(String::as_str) == Some("format-dir") {
        const USAGE: &str = "format-dir DIRECTORY SLOTS INDEX";
        let dir = args.get(1).ok_or(USAGE)?;
        let n = args.get(2).and_then(|s| s.parse().ok()).ok_or(USAGE)?;
        let index = args.get(3).and_then(|s| s.parse().ok()).ok_or(USAGE)?;
        return format_dir(Path::new(dir), n, index);
    }
    let mut control = PathBuf::from("/run/bulwark-writer");
    let mut rest = args;
    if rest.first().map(String::as_str) == Some("--control") {
        control = PathBuf::from(rest.get(1).ok_or("--control DIR")?);
        rest = &rest[2..];
    }
    let (layout, targets) = parse_targets(rest)?;
    std::fs::create_dir_all(&control).map_err(|e| format!("mkdir {}: {e}", control.display()))?;
    for f in ["paused", "stopped", "stop"] {
        let _ = std::fs::remove_file(control.join(f));
    }
    let mut log = OpenOptions::new()
        .create(true)
        .append(true)
        .open(control.join("log"))
        .map_err(|e| format!("open log: {e}"))?;

    // Where are we? Read every slot and insist on one prefix of the order.
    let mut buf = Aligned::new();
    let mut observed = Vec::new();
    for (t, target) in targets.iter().enumerate() {
        let mut states = Vec::new();
        for s in 0..layout.targets[t].1 {
            target
                .read_slot(s, buf.get())
                .map_err(|e| format!("read {} slot {s}: {e}", layout.targets[t].0))?;
            states.push(slots::decode(buf.get(), t as u32, s));
        }
        observed.push(states);
    }
    let start = slots::check(&layout, &observed)
        .map_err(|e| format!("refusing to write over a torn state: {e}"))?;
    let order = layout.order();
    let _ = writeln!(log, "start gen={} t={}", start.cut, now_ns());

    let began = Instant::now();
    let mut last = start.cut;
    let mut last_done = Instant::now();
    let mut last_log = Instant::now();
    let mut max_gap = Duration::ZERO;
    let mut writes = 0u64;
    let stall = Duration::from_millis(100);
    loop {
        if control.join("stop").exists() {
            break;
        }
        if control.join("pause").exists() {
            let _ = writeln!(log, "paused gen={last} t={}", now_ns());
            std::fs::write(control.join("paused"), format!("{last}\n"))
                .map_err(|e| format!("write paused: {e}"))?;
            while control.join("pause").exists() && !control.join("stop").exists() {
                std::thread::sleep(Duration::from_millis(5));
            }
            let _ = std::fs::remove_file(control.join("paused"));
            let _ = writeln!(log, "resumed gen={last} t={}", now_ns());
            last_done = Instant::now();
            continue;
        }
        let g = last + 1;
        let (t, s) = layout.slot_of(&order, g);
        slots::encode(buf.get(), g, t as u32, s);
        targets[t].write_slot(s, buf.get()).map_err(|e| {
            format!(
                "write generation {g} to {} slot {s}: {e}",
                layout.targets[t].0
            )
        })?;
        let done = Instant::now();
        let gap = done - last_done;
        if gap > max_gap {
            max_gap = gap;
        }
        if gap > stall {
            let _ = writeln!(
                log,
                "stall gen={g} gap_ms={} t={}",
                gap.as_millis(),
                now_ns()
            );
        }
        last_done = done;
        last = g;
        writes += 1;
        if done - last_log >= Duration::from_millis(100) {
            let _ = writeln!(log, "gen={g} t={}", now_ns());
            last_log = done;
        }
    }
    let secs = began.elapsed().as_secs_f64();
    let _ = writeln!(
        log,
        "summary last_gen={last} writes={writes} secs={secs:.3} rate={:.1} max_gap_ms={} t={}",
        writes as f64 / secs.max(1e-9),
        max_gap.as_millis(),
        now_ns()
    );
    std::fs::write(control.join("stopped"), format!("{last}\n"))
        .map_err(|e| format!("write stopped: {e}"))?;
    Ok(())
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if let Err(e) = run(&args) {
        eprintln!("bulwark-guest-writer: {e}");
        std::process::exit(1);
    }
}
