//! `demo`: the whole cycle on a sample disk image, with nothing prepared beforehand.

use std::fs::{File, OpenOptions};
use std::io::Read;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::{Context, Result};
use bulwark_controller::{BackupReport, BackupRequest, RestoreRequest, run_backup, run_restore};
use bulwark_snapshot::{ImageDisk, ImageSnapshotter};
use bulwark_vault::{CreateOptions, Vault};
use clap::Args;

use crate::ui;

#[derive(Debug, Args)]
pub struct DemoArgs {
    /// Working directory for the sample image, vault and restores (default: a new directory
    /// under the system's temporary directory). It is kept, so you can look around.
    #[arg(long, value_name = "DIR")]
    dir: Option<PathBuf>,
    /// Size of the sample disk image.
    #[arg(long, default_value = "256MiB", value_parser = ui::parse_size)]
    size: u64,
}

/// Deterministic filler: text-like (compressible) or noise (incompressible) bytes.
fn fill(buf: &mut [u8], seed: u64, compressible: bool) {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    const WORDS: [&[u8]; 8] = [
        b"kernel ",
        b"backup ",
        b"block ",
        b"vault ",
        b"guest ",
        b"snapshot ",
        b"disk ",
        b"\n",
    ];
    let mut i = 0;
    while i < buf.len() {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        if compressible {
            for &b in WORDS[(x % 8) as usize] {
                if i < buf.len() {
                    buf[i] = b;
                    i += 1;
                }
            }
        } else {
            for b in x.to_le_bytes() {
                if i < buf.len() {
                    buf[i] = b;
                    i += 1;
                }
            }
        }
    }
}

fn make_image(path: &Path, size: u64) -> Result<()> {
    let f = File::create(path).with_context(|| format!("create {}", path.display()))?;
    f.set_len(size)?;
    // The first quarter holds "system files" (compressible), then scattered incompressible
    // "data" every 8 MiB; the rest stays a hole, as on a fresh thin-provisioned disk.
    let mut buf = vec![0u8; 1 << 20];
    let quarter = size / 4;
    let mut off = 0;
    while off < quarter {
        fill(&mut buf, off, true);
        let n = (quarter - off).min(buf.len() as u64) as usize;
        f.write_all_at(&buf[..n], off)?;
        off += n as u64;
    }
    let mut off = quarter;
    while off + (1 << 20) <= size {
        fill(&mut buf, off, false);
        f.write_all_at(&buf, off)?;
        off += 8 << 20;
    }
    f.sync_all()?;
    Ok(())
}

fn scatter_writes(path: &Path, size: u64, count: u64) -> Result<()> {
    let f = OpenOptions::new().write(true).open(path)?;
    let mut buf = [0u8; 4096];
    for i in 0..count {
        fill(&mut buf, 1000 + i, false);
        let off = (i.wrapping_mul(0x2545_F491_4F6C_DD1D) % (size / 4096)) * 4096;
        f.write_all_at(&buf, off)?;
    }
    f.sync_all()?;
    Ok(())
}

fn digest(path: &Path) -> Result<String> {
    let mut f = File::open(path).with_context(|| format!("open {}", path.display()))?;
    let mut h = blake3::Hasher::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(h.finalize().to_hex().to_string())
}

fn show(step: &str, r: &BackupReport) {
    let d = &r.disks[0];
    println!(
        "{step}: point {} ({}): {} blocks, {} changed, {} holes/zero; read {}, uploaded {} in {} ms",
        r.point,
        r.consistency,
        d.stats.blocks,
        d.stats.changed_blocks,
        d.stats.zero_blocks,
        ui::human(d.stats.bytes_read),
        ui::human(d.stats.bytes_uploaded),
        r.duration_ms
    );
}

pub async fn run(a: DemoArgs) -> Result<ExitCode> {
    let dir = match a.dir {
        Some(d) => {
            std::fs::create_dir_all(&d).with_context(|| format!("create {}", d.display()))?;
            d
        }
        None => {
            let d = std::env::temp_dir().join(format!("bulwark-demo-{}", std::process::id()));
            std::fs::create_dir_all(&d)?;
            d
        }
    };
    println!("demo directory: {}", dir.display());
    let image = dir.join("demo-disk.img");
    let vault_dir = dir.join("vault");
    let vault_loc = vault_dir
        .to_str()
        .context("the demo directory must be valid UTF-8")?;

    println!(
        "1. making a {} sample disk image {}",
        ui::human(a.size),
        image.display()
    );
    if image.exists() {
        std::fs::remove_file(&image)?;
    }
    make_image(&image, a.size)?;
    let first_digest = digest(&image)?;

    let (vault, _) = Vault::open_or_create_with(
        vault_loc,
        &CreateOptions::default(),
        &crate::keys::vault_options()?,
    )
    .await?;
    let disks = ImageSnapshotter::new(vec![ImageDisk::parse(&format!(
        "disk0={}",
        image.display()
    ))?])?;
    let mut req = BackupRequest::new("demo-vm", Arc::new(disks));
    let progress = ui::Bars::new(true);
    req.observer = progress.clone();
    let first = run_backup(req.clone(), &vault).await?;
    progress.clear();
    show("2. full backup       ", &first);

    scatter_writes(&image, a.size, 24)?;
    let second_digest = digest(&image)?;
    println!("3. the guest wrote 24 scattered 4 KiB blocks");
    let progress = ui::Bars::new(true);
    req.observer = progress.clone();
    let second = run_backup(req, &vault).await?;
    progress.clear();
    show("4. incremental backup", &second);

    let mut ok = true;
    for (n, (report, expected)) in [(&first, &first_digest), (&second, &second_digest)]
        .into_iter()
        .enumerate()
    {
        let to = dir.join(format!("restored-{}.img", n + 1));
        let mut rr = RestoreRequest::new("demo-vm", report.point.clone(), "disk0", &to);
        rr.force = true;
        let progress = ui::Bars::new(true);
        rr.observer = progress.clone();
        let r = run_restore(rr, &vault).await?;
        progress.clear();
        let same = digest(&to)? == *expected;
        ok &= same;
        println!(
            "{}. restore of {} to {}: {} in {} ms, {}",
            5 + n,
            r.point,
            to.display(),
            ui::human(r.size),
            r.duration_ms,
            if same {
                "bit-identical to the disk at backup time"
            } else {
                "DIFFERENT (bug!)"
            }
        );
    }
    let report = vault.verify(None, &|_, _| {}).await?;
    ok &= report.is_ok();
    println!(
        "7. verify: {} points, {} blocks checked, {} problems",
        report.points,
        report.blocks,
        report.problems.len()
    );
    println!();
    println!("Try it yourself:");
    println!("  bulwark-controller list --vault {vault_loc}");
    println!("  bulwark-controller verify --vault {vault_loc}");
    Ok(if ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}
