//! The demo job: the whole cycle on a sample disk image, with nothing prepared beforehand —
//! make an image, full backup, scattered writes, incremental backup, restore both points and
//! compare them bit for bit with the disk at backup time, verify the vault.

use std::fmt;
use std::fs::{File, OpenOptions};
use std::io::Read;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use bulwark_snapshot::{ImageDisk, ImageSnapshotter};
use bulwark_vault::{CreateOptions, HumanBytes, OpenOptions as VaultOptions, Vault, VerifyReport};

use crate::{
    BackupReport, BackupRequest, Error, Observer, RestoreReport, RestoreRequest, run_backup,
    run_restore,
};

/// What the demo needs: a directory to work in, a disk size, how to open the vault.
#[derive(Debug, Clone)]
pub struct DemoRequest {
    /// The working directory (created if missing; kept afterwards).
    pub dir: PathBuf,
    /// The size of the sample disk image.
    pub size: u64,
    /// Options of the vault created in `dir/vault`.
    pub vault: VaultOptions,
    /// Progress of the backups and restores.
    pub observer: Arc<dyn Observer>,
}

/// What the demo did, step by step.
#[derive(Debug)]
pub struct DemoReport {
    /// The working directory.
    pub dir: PathBuf,
    /// The sample image.
    pub image: PathBuf,
    /// The vault's location.
    pub vault: String,
    /// The image size.
    pub size: u64,
    /// The full and the incremental backup.
    pub backups: [BackupReport; 2],
    /// The restores of both points, and whether each is bit-identical to the disk then.
    pub restores: Vec<(RestoreReport, bool)>,
    /// The final verification of the vault.
    pub verify: VerifyReport,
}

impl DemoReport {
    /// Every restore was identical and the vault verified.
    pub fn is_ok(&self) -> bool {
        self.restores.iter().all(|(_, same)| *same) && self.verify.is_ok()
    }
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> Error + '_ {
    move |source| Error::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Deterministic filler: text-like (compressible) or noise (incompressible) bytes.
fn fill(buf: &mut [u8], seed: u64, compressible: bool) {
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
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut i = 0;
    while i < buf.len() {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let le = x.to_le_bytes();
        let word: &[u8] = if compressible {
            WORDS[(x % 8) as usize]
        } else {
            &le
        };
        for &b in word.iter().take(buf.len() - i) {
            buf[i] = b;
            i += 1;
        }
    }
}

/// The first quarter holds "system files" (compressible), then scattered incompressible
/// "data" every 8 MiB; the rest stays a hole, as on a fresh thin-provisioned disk.
fn make_image(path: &Path, size: u64) -> Result<(), Error> {
    let f = File::create(path).map_err(io(path))?;
    f.set_len(size).map_err(io(path))?;
    let mut buf = vec![0u8; 1 << 20];
    let quarter = size / 4;
    let mut off = 0;
    while off < quarter {
        fill(&mut buf, off, true);
        let n = (quarter - off).min(buf.len() as u64) as usize;
        f.write_all_at(&buf[..n], off).map_err(io(path))?;
        off += n as u64;
    }
    let mut off = quarter;
    while off + (1 << 20) <= size {
        fill(&mut buf, off, false);
        f.write_all_at(&buf, off).map_err(io(path))?;
        off += 8 << 20;
    }
    f.sync_all().map_err(io(path))
}

fn scatter_writes(path: &Path, size: u64, count: u64) -> Result<(), Error> {
    let f = OpenOptions::new()
        .write(true)
        .open(path)
        .map_err(io(path))?;
    let mut buf = [0u8; 4096];
    for i in 0..count {
        fill(&mut buf, 1000 + i, false);
        let off = (i.wrapping_mul(0x2545_F491_4F6C_DD1D) % (size / 4096).max(1)) * 4096;
        f.write_all_at(&buf, off).map_err(io(path))?;
    }
    f.sync_all().map_err(io(path))
}

fn digest(path: &Path) -> Result<blake3::Hash, Error> {
    let mut f = File::open(path).map_err(io(path))?;
    let mut h = blake3::Hasher::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf).map_err(io(path))?;
        if n == 0 {
            return Ok(h.finalize());
        }
        h.update(&buf[..n]);
    }
}

/// Runs the demo in `req.dir`: every step goes through [`run_backup`] and [`run_restore`].
pub async fn run_demo(req: DemoRequest) -> Result<DemoReport, Error> {
    std::fs::create_dir_all(&req.dir).map_err(io(&req.dir))?;
    let image = req.dir.join("demo-disk.img");
    let vault_dir = req.dir.join("vault");
    let location = vault_dir.to_string_lossy().into_owned();
    if image.exists() {
        std::fs::remove_file(&image).map_err(io(&image))?;
    }
    make_image(&image, req.size)?;
    let mut digests = vec![digest(&image)?];
    let (vault, _) =
        Vault::open_or_create_with(&location, &CreateOptions::default(), &req.vault).await?;
    let disk = ImageDisk {
        name: "disk0".into(),
        path: image.clone(),
    };
    let disks = ImageSnapshotter::new(vec![disk]).map_err(|source| Error::Snapshot {
        vm: "demo-vm".into(),
        source,
    })?;
    let mut backup = BackupRequest::new("demo-vm", Arc::new(disks));
    backup.observer = req.observer.clone();
    let first = run_backup(backup.clone(), &vault).await?;
    scatter_writes(&image, req.size, 24)?;
    digests.push(digest(&image)?);
    let second = run_backup(backup, &vault).await?;
    let mut restores = Vec::new();
    for (n, (point, expected)) in [&first.point, &second.point]
        .iter()
        .zip(&digests)
        .enumerate()
    {
        let to = req.dir.join(format!("restored-{}.img", n + 1));
        let mut r = RestoreRequest::new("demo-vm", point.as_str(), "disk0", &to);
        r.force = true;
        r.observer = req.observer.clone();
        let report = run_restore(r, &vault).await?;
        restores.push((report, digest(&to)? == *expected));
    }
    let verify = vault.verify(None, &|_, _| {}).await?;
    Ok(DemoReport {
        dir: req.dir,
        image,
        vault: location,
        size: req.size,
        backups: [first, second],
        restores,
        verify,
    })
}

fn backup_line(f: &mut fmt::Formatter<'_>, step: &str, r: &BackupReport) -> fmt::Result {
    for d in &r.disks {
        let s = &d.stats;
        writeln!(
            f,
            "{step}: point {} ({}): {} blocks, {} changed, {} holes/zero; read {}, uploaded {} in \
             {} ms",
            r.point,
            r.consistency,
            s.blocks,
            s.changed_blocks,
            s.zero_blocks,
            HumanBytes(s.bytes_read),
            HumanBytes(s.bytes_uploaded),
            r.duration_ms
        )?;
    }
    Ok(())
}

/// The numbered steps, then how to look at the vault.
impl fmt::Display for DemoReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "demo directory: {}", self.dir.display())?;
        let (size, image) = (HumanBytes(self.size), self.image.display());
        writeln!(f, "1. making a {size} sample disk image {image}")?;
        backup_line(f, "2. full backup       ", &self.backups[0])?;
        writeln!(f, "3. the guest wrote 24 scattered 4 KiB blocks")?;
        backup_line(f, "4. incremental backup", &self.backups[1])?;
        for (n, (r, same)) in self.restores.iter().enumerate() {
            let verdict = if *same {
                "bit-identical to the disk at backup time"
            } else {
                "DIFFERENT (bug!)"
            };
            let (point, to) = (&r.point, r.to.display());
            let (size, ms) = (HumanBytes(r.size), r.duration_ms);
            writeln!(
                f,
                "{}. restore of {point} to {to}: {size} in {ms} ms, {verdict}",
                5 + n
            )?;
        }
        let v = &self.verify;
        writeln!(
            f,
            "7. verify: {} points, {} blocks checked, {} problems",
            v.points,
            v.blocks,
            v.problems.len()
        )?;
        writeln!(f, "\nTry it yourself:")?;
        writeln!(f, "  bulwark-controller list --vault {}", self.vault)?;
        write!(f, "  bulwark-controller verify --vault {}", self.vault)
    }
}
