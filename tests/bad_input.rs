//! Bad input gets a clear error naming the object or path, `verify` and `restore` exit
//! non-zero, and nothing committed earlier is lost.
#![allow(clippy::unwrap_used)] // test helpers outside #[test] functions

use std::fs::OpenOptions;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use bulwark_tests::*;
use serde_json::Value;

const MIB: u64 = 1 << 20;

struct Fixture {
    env: TestEnv,
    /// Point of VM "a" (disk "d") and its image digest.
    a_point: String,
    a_digest: String,
    /// Point of VM "b" (disk "d"), sharing no block with "a".
    b_point: String,
    b_digest: String,
}

fn image(path: &Path, blocks: u64, seed: u64) {
    let f = std::fs::File::create(path).unwrap();
    f.set_len(blocks * MIB).unwrap();
    for b in 0..blocks {
        f.write_all_at(&pseudo_random(MIB as usize, seed * 1000 + b), b * MIB)
            .unwrap();
    }
}

impl std::ops::Deref for Fixture {
    type Target = TestEnv;
    fn deref(&self) -> &TestEnv {
        &self.env
    }
}

impl Fixture {
    fn new() -> Fixture {
        let env = TestEnv::new();
        let a = env.path("a.img");
        let b = env.path("b.img");
        image(&a, 3, 1);
        image(&b, 2, 2);
        let point = |vm: &str, disk: &Path| {
            let r = env.backup(vm, &[format!("d={}", disk.display())], &[]);
            r["point"].as_str().unwrap().to_string()
        };
        let (a_point, b_point) = (point("a", &a), point("b", &b));
        Fixture {
            a_digest: file_digest(&a),
            b_digest: file_digest(&b),
            env,
            a_point,
            b_point,
        }
    }

    fn vault_path(&self, rel: &str) -> PathBuf {
        Path::new(&self.vault).join(rel)
    }

    fn manifest(&self, vm: &str, point: &str) -> PathBuf {
        self.vault_path(&format!("manifests/{vm}/d/{point}.bmap"))
    }

    /// The block files that `vm`'s point references, read from its manifest.
    fn blocks_of(&self, vm: &str, point: &str) -> Vec<PathBuf> {
        // The manifest is zstd-compressed inside its envelope; decode it with the library.
        let raw = std::fs::read(self.manifest(vm, point)).unwrap();
        let (plain, _) =
            bulwark_vault::envelope::open(bulwark_vault::envelope::Kind::Manifest, "m", &raw)
                .unwrap();
        let map = bulwark_blockdiff::BlockMap::decode(&plain).unwrap();
        map.addresses()
            .map(|a| {
                let h = a.to_hex();
                self.vault_path(&format!("blocks/{}/{h}", &h[..2]))
            })
            .collect()
    }

    fn verify(&self) -> (bool, String) {
        let out = controller(["verify", "--vault", &self.vault]);
        (
            out.status.success(),
            format!("{}{}", stdout_of(&out), stderr_of(&out)),
        )
    }

    fn restore(&self, vm: &str, point: &str, to: &Path) -> (bool, String) {
        let out = controller([
            "restore",
            "--vault",
            &self.vault,
            "--vm",
            vm,
            "--point",
            point,
            "--disk",
            "d",
            "--to",
            to.to_str().unwrap(),
        ]);
        (out.status.success(), stderr_of(&out))
    }

    /// VM "b" is untouched by the damage done to "a": it still verifies and restores.
    fn assert_b_intact(&self) {
        let to = self.root.join("b-check.img");
        let _ = std::fs::remove_file(&to);
        let (ok, err) = self.restore("b", &self.b_point, &to);
        assert!(ok, "b must still restore: {err}");
        assert_eq!(file_digest(&to), self.b_digest);
        let out = controller(["verify", "--vault", &self.vault, "--vm", "b"]);
        assert!(out.status.success(), "{}", stdout_of(&out));
    }

    fn assert_failed_restore_leaves_nothing(&self, vm: &str, point: &str, must_name: &str) {
        let to = self.root.join("restored").join("x.img");
        std::fs::create_dir_all(to.parent().unwrap()).unwrap();
        let (ok, err) = self.restore(vm, point, &to);
        assert!(!ok, "restore of damaged point must fail");
        assert!(
            err.contains(must_name),
            "error must name {must_name}: {err}"
        );
        let left: Vec<_> = std::fs::read_dir(to.parent().unwrap()).unwrap().collect();
        assert!(
            left.is_empty(),
            "a failed restore leaves no file behind: {left:?}"
        );
    }
}

#[test]
fn a_flipped_byte_in_a_block_is_named_by_verify_and_fails_restore() {
    let f = Fixture::new();
    let block = f.blocks_of("a", &f.a_point)[1].clone();
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .open(&block)
        .unwrap();
    let len = file.metadata().unwrap().len();
    let mut b = [0u8; 1];
    file.read_exact_at(&mut b, len - 100).unwrap();
    file.write_all_at(&[b[0] ^ 0x01], len - 100).unwrap();
    drop(file);

    let key = block
        .strip_prefix(&f.vault)
        .unwrap()
        .to_str()
        .unwrap()
        .to_string();
    let (ok, out) = f.verify();
    assert!(!ok, "verify must fail:\n{out}");
    assert!(
        out.contains(&format!("BAD {key}")),
        "verify names the block:\n{out}"
    );
    assert!(
        out.contains(&format!("a/{}", f.a_point)),
        "and the point it breaks:\n{out}"
    );
    f.assert_failed_restore_leaves_nothing("a", &f.a_point, &key);
    f.assert_b_intact();
}

#[test]
fn a_missing_block_is_named() {
    let f = Fixture::new();
    let block = f.blocks_of("a", &f.a_point)[0].clone();
    std::fs::remove_file(&block).unwrap();
    let key = block
        .strip_prefix(&f.vault)
        .unwrap()
        .to_str()
        .unwrap()
        .to_string();
    let (ok, out) = f.verify();
    assert!(!ok);
    assert!(out.contains(&key) && out.contains("missing"), "{out}");
    f.assert_failed_restore_leaves_nothing("a", &f.a_point, &key);
    f.assert_b_intact();
}

#[test]
fn a_truncated_manifest_is_named() {
    let f = Fixture::new();
    let m = f.manifest("a", &f.a_point);
    let len = std::fs::metadata(&m).unwrap().len();
    OpenOptions::new()
        .write(true)
        .open(&m)
        .unwrap()
        .set_len(len / 2)
        .unwrap();
    let key = format!("manifests/a/d/{}.bmap", f.a_point);
    let (ok, out) = f.verify();
    assert!(!ok);
    assert!(out.contains(&key) && out.contains("corrupt"), "{out}");
    f.assert_failed_restore_leaves_nothing("a", &f.a_point, &key);
    f.assert_b_intact();
}

#[test]
fn a_point_naming_a_missing_manifest_is_named() {
    let f = Fixture::new();
    std::fs::remove_file(f.manifest("a", &f.a_point)).unwrap();
    let key = format!("manifests/a/d/{}.bmap", f.a_point);
    let (ok, out) = f.verify();
    assert!(!ok);
    assert!(out.contains(&key) && out.contains("missing"), "{out}");
    f.assert_failed_restore_leaves_nothing("a", &f.a_point, &key);
    f.assert_b_intact();
}

#[test]
fn a_corrupt_point_is_listed_as_broken_and_fails_verify() {
    let f = Fixture::new();
    let p = f.vault_path(&format!("points/a/{}.json", f.a_point));
    let mut bytes = std::fs::read(&p).unwrap();
    // Change a digit of the disk size inside the (uncompressed, readable) point record.
    let text = String::from_utf8_lossy(&bytes).into_owned();
    let at = text.find("\"size\": ").unwrap() + 8;
    bytes[at] = if bytes[at] == b'9' {
        b'1'
    } else {
        bytes[at] + 1
    };
    std::fs::write(&p, bytes).unwrap();
    let (ok, out) = f.verify();
    assert!(!ok);
    assert!(
        out.contains(&format!("points/a/{}.json", f.a_point)) && out.contains("digest"),
        "{out}"
    );
    let list = controller(["list", "--vault", &f.vault]);
    assert!(stdout_of(&list).contains("BROKEN"), "{}", stdout_of(&list));
    f.assert_b_intact();
}

#[test]
fn an_unknown_vault_format_version_is_refused() {
    let f = Fixture::new();
    let cfg = f.vault_path("bulwark-vault.json");
    let mut v: Value = serde_json::from_slice(&std::fs::read(&cfg).unwrap()).unwrap();
    v["version"] = 99.into();
    std::fs::write(&cfg, serde_json::to_vec(&v).unwrap()).unwrap();
    for args in [vec!["list"], vec!["verify"]] {
        let mut a: Vec<&str> = args.clone();
        a.extend(["--vault", &f.vault]);
        let out = controller(&a);
        assert!(!out.status.success());
        assert!(
            stderr_of(&out).contains("vault format version 99 is not supported"),
            "{}",
            stderr_of(&out)
        );
    }
    let img = f.root.join("c.img");
    image(&img, 1, 3);
    let out = controller([
        "backup",
        "--vault",
        &f.vault,
        "--vm",
        "c",
        "--disk",
        img.to_str().unwrap(),
    ]);
    assert!(
        !out.status.success(),
        "no backup into a vault of an unknown format"
    );
}

#[test]
fn an_unknown_object_version_is_named() {
    let f = Fixture::new();
    let block = f.blocks_of("a", &f.a_point)[0].clone();
    let file = OpenOptions::new().write(true).open(&block).unwrap();
    file.write_all_at(&[9], 4).unwrap();
    drop(file);
    let (ok, out) = f.verify();
    assert!(!ok);
    assert!(
        out.contains("object format version 9 is not supported"),
        "{out}"
    );
}

#[test]
fn a_missing_vault_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let nowhere = dir.path().join("no-such-vault");
    let nowhere = nowhere.to_str().unwrap();
    for cmd in ["list", "verify"] {
        let out = controller([cmd, "--vault", nowhere]);
        assert!(!out.status.success());
        assert!(
            stderr_of(&out).contains(&format!("no Bulwark vault at {nowhere}")),
            "{}",
            stderr_of(&out)
        );
        // Named once (the reason used to repeat the path).
        assert_eq!(
            stderr_of(&out).matches(nowhere).count(),
            1,
            "{}",
            stderr_of(&out)
        );
    }
    let out = controller([
        "restore",
        "--vault",
        nowhere,
        "--vm",
        "x",
        "--disk",
        "d",
        "--to",
        "/tmp/never-written.img",
    ]);
    assert!(!out.status.success());
    assert!(
        stderr_of(&out).contains("no Bulwark vault"),
        "{}",
        stderr_of(&out)
    );
    assert!(!Path::new("/tmp/never-written.img").exists());
}

/// A running VM's QMP socket that is not there: the error names the socket and says what
/// failed, each once (the snapshot layer used to prefix QEMU's message, which names the socket
/// itself, with the socket again, and the CLI then printed each layer's cause again).
#[test]
fn a_missing_qmp_socket_is_named_once() {
    let env = TestEnv::init(&[]);
    let socket = env.path("no-such-vm.qmp");
    let out = controller([
        "backup",
        "--vault",
        &env.vault,
        "--vm",
        "a",
        "--qmp",
        &format!("unix:{}", socket.display()),
    ]);
    let err = stderr_of(&out);
    assert!(!out.status.success(), "{err}");
    for once in [socket.to_str().unwrap(), "cannot connect", "No such file"] {
        assert_eq!(err.matches(once).count(), 1, "{once:?} not once in:\n{err}");
    }
}

#[test]
fn a_directory_as_disk_is_refused_and_nothing_is_lost() {
    let f = Fixture::new();
    let out = controller([
        "backup",
        "--vault",
        &f.vault,
        "--vm",
        "a",
        "--disk",
        f.root.to_str().unwrap(),
    ]);
    assert!(!out.status.success());
    assert!(
        stderr_of(&out).contains("not a regular file"),
        "{}",
        stderr_of(&out)
    );
    assert!(
        stderr_of(&out).contains(f.root.to_str().unwrap()),
        "{}",
        stderr_of(&out)
    );
    let out = controller([
        "backup",
        "--vault",
        &f.vault,
        "--vm",
        "a",
        "--disk",
        "/no/such/disk.img",
    ]);
    assert!(!out.status.success());
    assert!(
        stderr_of(&out).contains("/no/such/disk.img"),
        "{}",
        stderr_of(&out)
    );
    let (ok, out) = f.verify();
    assert!(ok, "{out}");
    let to = f.root.join("a-again.img");
    assert!(f.restore("a", &f.a_point, &to).0);
    assert_eq!(file_digest(&to), f.a_digest);
}

#[test]
fn restore_does_not_overwrite_without_force_and_names_unknown_things() {
    let f = Fixture::new();
    let to = f.root.join("exists.img");
    std::fs::write(&to, b"precious").unwrap();
    let (ok, err) = f.restore("a", "latest", &to);
    assert!(!ok && err.contains("already exists"), "{err}");
    assert_eq!(std::fs::read(&to).unwrap(), b"precious");

    let (ok, err) = f.restore("a", "20200101T000000.000Z-000000", &f.root.join("n.img"));
    assert!(!ok && err.contains("no recovery point"), "{err}");
    let out = controller([
        "restore",
        "--vault",
        &f.vault,
        "--vm",
        "a",
        "--disk",
        "nope",
        "--to",
        f.root.join("n.img").to_str().unwrap(),
    ]);
    assert!(
        !out.status.success() && stderr_of(&out).contains("has no disk \"nope\" (it has: d)"),
        "{}",
        stderr_of(&out)
    );
    let out = controller(["list", "--vault", &f.vault, "--vm", "../etc"]);
    assert!(
        !out.status.success() && stderr_of(&out).contains("invalid vm name"),
        "{}",
        stderr_of(&out)
    );
}
