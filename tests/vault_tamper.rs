//! Tampering with an encrypted vault: a modified, swapped (two blocks' objects exchanged, two
//! points' manifests exchanged) or truncated block, manifest or point is an error naming the
//! object on restore and on verify, never a wrong restore. A wrong key decrypts nothing and is
//! refused before anything is written.
#![allow(clippy::unwrap_used)] // test helpers outside #[test] functions

mod vault_servers;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use bulwark_blockdiff::BlockSize;
use bulwark_controller::{
    BackupReport, BackupRequest, NoObserver, RestoreFrom, RestoreRequest, run_backup, run_restore,
};
use bulwark_snapshot::{ImageDisk, ImageSnapshotter};
use bulwark_vault::{CreateOptions, Error, MasterKey, OpenOptions, Vault};
use vault_servers::noise;

const BLOCK: usize = 64 << 10;

struct Fixture {
    dir: tempfile::TempDir,
    vault_dir: PathBuf,
    key: MasterKey,
    points: Vec<BackupReport>,
}

impl Fixture {
    async fn new() -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        let vault_dir = dir.path().join("vault");
        let key = MasterKey::generate();
        let opts = OpenOptions::default().with_key(key.clone());
        let create = CreateOptions {
            block_size: BlockSize::new(BLOCK as u32).unwrap(),
            zstd_level: Some(1),
        };
        let vault = Vault::create_with(vault_dir.to_str().unwrap(), &create, &opts)
            .await
            .unwrap();
        let img = dir.path().join("disk.img");
        let mut data = noise(9, 1 << 20);
        std::fs::write(&img, &data).unwrap();
        let req = BackupRequest::new(
            "vm1",
            Arc::new(
                ImageSnapshotter::new(vec![
                    ImageDisk::parse(&format!("os={}", img.display())).unwrap(),
                ])
                .unwrap(),
            ),
        );
        let mut points = vec![run_backup(req.clone(), &vault).await.unwrap()];
        data[3 * BLOCK..4 * BLOCK].fill(0x33);
        std::fs::write(&img, &data).unwrap();
        points.push(run_backup(req.clone(), &vault).await.unwrap());
        Fixture {
            dir,
            vault_dir,
            key,
            points,
        }
    }

    async fn vault(&self) -> Vault {
        Vault::open_with(
            self.vault_dir.to_str().unwrap(),
            &OpenOptions::default().with_key(self.key.clone()),
        )
        .await
        .unwrap()
    }

    fn path(&self, key: &str) -> PathBuf {
        self.vault_dir.join(key)
    }

    fn blocks(&self) -> Vec<String> {
        let mut out = Vec::new();
        for d in std::fs::read_dir(self.vault_dir.join("blocks")).unwrap() {
            let d = d.unwrap();
            for f in std::fs::read_dir(d.path()).unwrap() {
                let f = f.unwrap();
                out.push(format!(
                    "blocks/{}/{}",
                    d.file_name().to_string_lossy(),
                    f.file_name().to_string_lossy()
                ));
            }
        }
        out.sort();
        out
    }

    fn manifest(&self, i: usize) -> String {
        format!("manifests/vm1/os/{}.bmap", self.points[i].point)
    }

    fn point(&self, i: usize) -> String {
        format!("points/vm1/{}.json", self.points[i].point)
    }

    /// Restores every point; returns the errors.
    async fn restore_errors(&self) -> Vec<String> {
        let vault = self.vault().await;
        let mut errors = Vec::new();
        for p in &self.points {
            let to = self.dir.path().join(format!("r-{}.img", p.point));
            let r = run_restore(
                RestoreRequest {
                    vm: "vm1".into(),
                    point: p.point.clone(),
                    disk: "os".into(),
                    to: to.clone(),
                    force: true,
                    concurrency: 4,
                    from: RestoreFrom::Vault,
                    snapshots: None,
                    observer: Arc::new(NoObserver),
                },
                &vault,
            )
            .await;
            if let Err(e) = r {
                errors.push(e.to_string());
                assert!(!to.exists(), "no restored image after an error");
            }
        }
        errors
    }

    async fn verify_problems(&self) -> Vec<(String, String)> {
        let rep = self.vault().await.verify(None, &|_, _| {}).await.unwrap();
        rep.problems
            .into_iter()
            .map(|p| (p.key, p.message))
            .collect()
    }
}

fn swap(a: &Path, b: &Path) {
    let x = std::fs::read(a).unwrap();
    let y = std::fs::read(b).unwrap();
    std::fs::write(a, y).unwrap();
    std::fs::write(b, x).unwrap();
}

fn flip(p: &Path, at: usize) {
    let mut x = std::fs::read(p).unwrap();
    let i = at.min(x.len() - 1);
    x[i] ^= 0x01;
    std::fs::write(p, x).unwrap();
}

fn truncate(p: &Path) {
    let x = std::fs::read(p).unwrap();
    std::fs::write(p, &x[..x.len() - 7]).unwrap();
}

/// Runs one tampering and checks that both restore and verify name `expect_key`.
async fn check(name: &str, tamper: impl FnOnce(&Fixture) -> Vec<String>) {
    let f = Fixture::new().await;
    assert!(f.verify_problems().await.is_empty());
    let keys = tamper(&f);
    let restore = f.restore_errors().await;
    assert!(!restore.is_empty(), "{name}: some restore fails");
    for e in &restore {
        assert!(
            keys.iter().any(|k| e.contains(k.as_str())),
            "{name}: restore error names the object {keys:?}: {e}"
        );
    }
    let problems = f.verify_problems().await;
    assert!(!problems.is_empty(), "{name}: verify finds it");
    for k in &keys {
        assert!(
            problems.iter().any(|(key, _)| key == k),
            "{name}: verify names {k}: {problems:?}"
        );
    }
    eprintln!("{name}: restore: {restore:?}\n  verify: {problems:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn modified_block() {
    check("modified block", |f| {
        let b = f.blocks()[0].clone();
        flip(&f.path(&b), 100);
        vec![b]
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn modified_block_header() {
    check("modified block header", |f| {
        let b = f.blocks()[1].clone();
        flip(&f.path(&b), 20); // inside the digest field, authenticated as associated data
        vec![b]
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn swapped_blocks() {
    check("swapped blocks", |f| {
        let b = f.blocks();
        swap(&f.path(&b[0]), &f.path(&b[1]));
        vec![b[0].clone(), b[1].clone()]
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn truncated_block() {
    check("truncated block", |f| {
        let b = f.blocks()[2].clone();
        truncate(&f.path(&b));
        vec![b]
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn modified_manifest() {
    check("modified manifest", |f| {
        let m = f.manifest(0);
        flip(&f.path(&m), 80);
        vec![m]
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn swapped_manifests() {
    check("swapped manifests", |f| {
        let (a, b) = (f.manifest(0), f.manifest(1));
        swap(&f.path(&a), &f.path(&b));
        vec![a, b]
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn truncated_manifest() {
    check("truncated manifest", |f| {
        let m = f.manifest(1);
        truncate(&f.path(&m));
        vec![m]
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn modified_point() {
    check("modified point", |f| {
        let p = f.point(0);
        flip(&f.path(&p), 90);
        vec![p]
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn swapped_points() {
    check("swapped points", |f| {
        let (a, b) = (f.point(0), f.point(1));
        swap(&f.path(&a), &f.path(&b));
        vec![a, b]
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn truncated_point() {
    check("truncated point", |f| {
        let p = f.point(1);
        truncate(&f.path(&p));
        vec![p]
    })
    .await;
}

fn tree(dir: &Path) -> Vec<(PathBuf, Vec<u8>)> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                stack.push(p);
            } else {
                out.push((p.clone(), std::fs::read(&p).unwrap()));
            }
        }
    }
    out.sort();
    out
}

/// A wrong key opens nothing and writes nothing, through the library and the CLI.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_key_is_refused_before_any_write() {
    let f = Fixture::new().await;
    let before = tree(&f.vault_dir);
    let wrong = MasterKey::generate();
    let loc = f.vault_dir.to_str().unwrap();
    let e = Vault::open_with(loc, &OpenOptions::default().with_key(wrong.clone()))
        .await
        .unwrap_err();
    assert!(matches!(e, Error::WrongKey { .. }), "{e}");
    assert!(e.to_string().contains("nothing was read or written"), "{e}");
    let e = Vault::open_or_create_with(
        loc,
        &CreateOptions::default(),
        &OpenOptions::default().with_key(wrong.clone()),
    )
    .await
    .unwrap_err();
    assert!(matches!(e, Error::WrongKey { .. }), "{e}");

    // The CLI: backup and restore with a wrong key file fail before touching anything.
    let kf = f.dir.path().join("wrong.key");
    wrong.write_file(&kf, None).unwrap();
    let target = f.dir.path().join("out.img");
    let img = f.dir.path().join("disk.img");
    for args in [
        vec!["backup", "--vault", loc, "--vm", "vm1", "--disk"],
        vec![
            "restore", "--vault", loc, "--vm", "vm1", "--disk", "os", "--to",
        ],
    ] {
        let last = if args[0] == "backup" {
            format!("os={}", img.display())
        } else {
            target.display().to_string()
        };
        let out = std::process::Command::new(bulwark_tests::controller_bin())
            .args(&args)
            .arg(&last)
            .arg("--key-file")
            .arg(&kf)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{err}");
        assert!(err.contains("wrong key"), "{err}");
    }
    assert!(!target.exists());
    assert!(tree(&f.vault_dir) == before, "nothing in the vault changed");
}
