//! Self-healing vaults, through the CLI, on a local vault and on the S3 test server (moto):
//! `verify` records what it finds bad, `list` names the broken points (disk and block keys),
//! a restore of a broken point fails naming the block and writes nothing, and the next
//! backup of the unchanged disk re-reads the damaged blocks and stores them again, so that
//! the new point and every point healed with it verify and restore bit-exact. A block whose
//! data is no longer on the disk cannot be healed: its points stay listed as broken.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod vault_servers;

use std::path::Path;
use std::process::Output;

use bulwark_tests::{file_digest, stderr_of, write_random};
use object_store::ObjectStoreExt;
use object_store::path::Path as ObjPath;
use vault_servers::{Backend, Place, place};

const MIB: u64 = 1 << 20;

/// Runs the controller with the place's store settings in its environment.
fn cli(place: &Place, args: &[&str]) -> Output {
    place
        .controller(args)
        .output()
        .expect("run bulwark-controller")
}

fn json_of(out: &Output) -> serde_json::Value {
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "not JSON ({e}): {}\nstderr: {}",
            String::from_utf8_lossy(&out.stdout),
            stderr_of(out)
        )
    })
}

fn ok_json(place: &Place, args: &[&str]) -> serde_json::Value {
    let out = cli(place, args);
    assert!(out.status.success(), "{args:?} failed: {}", stderr_of(&out));
    json_of(&out)
}

/// The key of block `index` of `image` in an unencrypted vault (1 MiB blocks).
fn block_key_of(image: &Path, index: u64) -> String {
    let data = std::fs::read(image).unwrap();
    let start = (index * MIB) as usize;
    let a = bulwark_blockdiff::content_address(&data[start..start + MIB as usize], None);
    let hex = a.to_hex();
    format!("blocks/{}/{hex}", &hex[..2])
}

/// Deletes the blocks `delete` and overwrites `corrupt` with garbage, behind the vault's back.
fn damage(place: &Place, delete: &[&str], corrupt: &str) {
    let v = place.location.as_str();
    if place.backend == Backend::Local {
        for k in delete {
            std::fs::remove_file(Path::new(v).join(k)).unwrap();
        }
        std::fs::write(Path::new(v).join(corrupt), b"BWOB not a block").unwrap();
        return;
    }
    let store = bulwark_vault::location::open_store(v, &place.options.store, false).unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        for k in delete {
            store.delete(&ObjPath::from(*k)).await.unwrap();
        }
        store
            .put(&ObjPath::from(corrupt), b"BWOB not a block".to_vec().into())
            .await
            .unwrap();
    });
}

fn scenario(backend: Backend) {
    let Some(place) = place(backend, "self_heal") else {
        return;
    };
    let root = place.dir.path();
    let v = place.location.as_str();
    let image = root.join("os.img");
    write_random(&image, 0, (8 * MIB) as usize, 11);
    let disk = format!("os={}", image.display());
    let snaps = root.join("snaps").display().to_string();
    let backup = |extra: &[&str]| {
        let args = place.copy_backup_args("vm1", &disk, &snaps, &[&["--json"], extra].concat());
        ok_json(&place, &args)
    };
    assert!(cli(&place, &["init", "--vault", v]).status.success());
    let a = backup(&[]);
    let old7 = block_key_of(&image, 7);
    write_random(&image, 7 * MIB, MIB as usize, 12);
    let b = backup(&[]);
    let (a, b) = (a["point"].as_str().unwrap(), b["point"].as_str().unwrap());
    let (k2, k3) = (block_key_of(&image, 2), block_key_of(&image, 3));

    // Damage: block 2 deleted, block 3 overwritten with garbage (both still on the disk),
    // and the old block 7 (only point A needs it; the disk no longer holds its data).
    damage(&place, &[&k2, &old7], &k3);

    // verify fails, names the three blocks, and records them.
    let out = cli(&place, &["verify", "--vault", v, "--json"]);
    assert!(!out.status.success(), "verify passed a damaged vault");
    let report = json_of(&out);
    let keys: Vec<&str> = report["problems"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["key"].as_str().unwrap())
        .collect();
    let mut want = vec![k2.as_str(), k3.as_str(), old7.as_str()];
    want.sort();
    assert_eq!(keys, want, "{report}");
    assert_eq!(report["bad_blocks_recorded"], 3, "{report}");

    // list names the broken points, with the disk and the keys each needs.
    let list = ok_json(&place, &["list", "--vault", v, "--json"]);
    let needs = |p: &str| -> Vec<String> {
        let mut k: Vec<String> = list["damaged"][format!("vm1/{p}")]
            .as_array()
            .map(|a| {
                a.iter()
                    .inspect(|r| assert_eq!(r["disks"], serde_json::json!(["os"]), "{r}"))
                    .map(|r| r["key"].as_str().unwrap().to_string())
                    .collect()
            })
            .unwrap_or_default();
        k.sort();
        k
    };
    assert_eq!(needs(a), want, "{list}");
    let mut want_b = vec![k2.clone(), k3.clone()];
    want_b.sort();
    assert_eq!(needs(b), want_b, "{list}");
    let text = cli(&place, &["list", "--vault", v]);
    let text = String::from_utf8_lossy(&text.stdout).to_string();
    assert!(
        text.contains(&format!("BROKEN: disk os needs {k2}")),
        "{text}"
    );

    // A restore of a broken point fails, naming a block it needs, and writes nothing.
    let to = root.join("b.img");
    let to_s = to.display().to_string();
    let r = cli(
        &place,
        &[
            "restore", "--vault", v, "--vm", "vm1", "--point", b, "--disk", "os", "--to", &to_s,
        ],
    );
    assert!(!r.status.success(), "restore of a broken point succeeded");
    let err = stderr_of(&r);
    assert!(err.contains(&k2) || err.contains(&k3), "{err}");
    assert!(!to.exists(), "a failed restore left {}", to.display());

    // A backup of the unchanged disk heals the two blocks it still holds.
    let c = backup(&[]);
    assert_eq!(c["disks"][0]["blocks_healed"], 2, "{c}");
    let c = c["point"].as_str().unwrap();

    // Only point A stays broken: it needs the old block 7, which no disk holds any more.
    let out = cli(&place, &["verify", "--vault", v, "--json"]);
    let report = json_of(&out);
    assert!(!out.status.success());
    let problems = report["problems"].as_array().unwrap();
    assert_eq!(problems.len(), 1, "{report}");
    assert_eq!(problems[0]["key"], old7.as_str());
    assert_eq!(
        problems[0]["points"],
        serde_json::json!([format!("vm1/{a}")])
    );
    let list = ok_json(&place, &["list", "--vault", v, "--json"]);
    let damaged = list["damaged"].as_object().unwrap();
    assert_eq!(
        damaged.keys().collect::<Vec<_>>(),
        vec![&format!("vm1/{a}")],
        "{list}"
    );
    assert!(
        cli(&place, &["verify", "--vault", v, "--vm", "vm1"])
            .status
            .code()
            == Some(1),
        "verify must keep failing while A is broken"
    );

    // B and C restore bit-exact; A fails naming the block it lacks.
    for p in [b, c] {
        let to = root.join(format!("{p}.img"));
        let to_s = to.display().to_string();
        let r = cli(
            &place,
            &[
                "restore", "--vault", v, "--vm", "vm1", "--point", p, "--disk", "os", "--to", &to_s,
            ],
        );
        assert!(r.status.success(), "restore {p}: {}", stderr_of(&r));
        assert_eq!(file_digest(&to), file_digest(&image), "point {p}");
        std::fs::remove_file(&to).unwrap();
    }
    let r = cli(
        &place,
        &[
            "restore", "--vault", v, "--vm", "vm1", "--point", a, "--disk", "os", "--to", &to_s,
        ],
    );
    assert!(!r.status.success());
    assert!(stderr_of(&r).contains(&old7), "{}", stderr_of(&r));
    assert!(!to.exists());
}

#[test]
fn damaged_blocks_are_recorded_listed_and_healed_local() {
    scenario(Backend::Local);
}

#[test]
fn damaged_blocks_are_recorded_listed_and_healed_s3() {
    scenario(Backend::S3);
}

/// `--check-known`: a block deleted behind verify's back (no record) is found by the backup's
/// HEADs and stored again; without the flag the backup reuses the entry and the point stays
/// broken.
#[test]
fn check_known_heals_a_block_nobody_recorded() {
    let Some(place) = place(Backend::Local, "check_known") else {
        return;
    };
    let root = place.dir.path();
    let v = place.location.as_str();
    let image = root.join("d.img");
    write_random(&image, 0, (4 * MIB) as usize, 21);
    let disk = format!("d={}", image.display());
    let snaps = root.join("snaps").display().to_string();
    let backup = |extra: &[&str]| {
        let args = place.copy_backup_args("vm", &disk, &snaps, &[&["--json"], extra].concat());
        ok_json(&place, &args)
    };
    backup(&[]);
    let k1 = block_key_of(&image, 1);
    std::fs::remove_file(Path::new(v).join(&k1)).unwrap();
    let plain = backup(&[]);
    assert_eq!(plain["disks"][0]["blocks_healed"], 0, "{plain}");
    assert!(!cli(&place, &["verify", "--vault", v]).status.success());
    let checked = backup(&["--check-known"]);
    assert_eq!(checked["disks"][0]["blocks_healed"], 1, "{checked}");
    assert!(Path::new(v).join(&k1).exists());
}
