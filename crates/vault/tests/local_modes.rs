//! A local vault is private whatever the umask: directories 0700, files 0600. Its own test
//! binary, because the umask is per process.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use bulwark_blockdiff::{BlockMap, BlockSize, Entry};
use bulwark_vault::lease::{Lease, LeaseKind, LeaseOptions};
use bulwark_vault::{
    ConsistencyRecord, CreateOptions, DiskRecord, DiskStats, ManifestRef, OpenOptions,
    RecoveryPoint, Vault, new_point_id,
};
use bytes::Bytes;

/// Every directory and file under `dir` whose mode is not 0700 / 0600.
fn loose(dir: &Path, out: &mut Vec<String>) {
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        let meta = std::fs::symlink_metadata(&p).unwrap();
        let mode = meta.permissions().mode() & 0o7777;
        let want = if meta.is_dir() { 0o700 } else { 0o600 };
        if mode != want {
            out.push(format!("{} is {mode:o}, not {want:o}", p.display()));
        }
        if meta.is_dir() {
            loose(&p, out);
        }
    }
}

async fn fill(location: &str) -> usize {
    let v = Vault::create_with(location, &CreateOptions::default(), &OpenOptions::default())
        .await
        .unwrap();
    let bs = BlockSize::new(bulwark_blockdiff::MIN_BLOCK_SIZE).unwrap();
    let data = vec![3u8; bs.get() as usize];
    let address = v.address_of(&data);
    v.put_block(address, Bytes::from(data)).await.unwrap();
    let map = BlockMap::new(bs, bs.bytes(), vec![Entry::Data { change: 1, address }]).unwrap();
    let id = new_point_id(jiff::Timestamp::now());
    let m = ManifestRef {
        vm: "vm",
        disk: "d0",
        point: &id,
    };
    let (digest, _) = v.put_manifest(&m, &map).await.unwrap();
    let point = RecoveryPoint {
        id: id.clone(),
        vm: "vm".into(),
        created: jiff::Timestamp::now(),
        committed: jiff::Timestamp::now(),
        consistency: ConsistencyRecord::crash(),
        disks: vec![DiskRecord {
            name: "d0".into(),
            size: map.disk_size(),
            block_size: bs.get(),
            manifest_digest: digest,
            source: String::new(),
            stats: DiskStats::default(),
            tracking: None,
        }],
        policy: None,
        agent: None,
    };
    v.commit_point(&point).await.unwrap();
    // A tombstone (deleted/…) and a lease (locks/…), held while the tree is checked.
    let lease = Lease::acquire(&v, LeaseKind::Prune, "test", &LeaseOptions::default())
        .await
        .unwrap();
    v.soft_delete(&lease, "vm", &id, "test", jiff::Timestamp::now())
        .await
        .unwrap();
    let n = walk_count(Path::new(location));
    let mut bad = Vec::new();
    loose(Path::new(location), &mut bad);
    lease.release().await.unwrap();
    assert!(bad.is_empty(), "{}", bad.join("\n"));
    n
}

fn walk_count(dir: &Path) -> usize {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| {
            let p = e.unwrap().path();
            if p.is_dir() { 1 + walk_count(&p) } else { 1 }
        })
        .sum()
}

#[tokio::test]
async fn local_vault_is_private_whatever_the_umask() {
    for umask in [0o022, 0o000] {
        // SAFETY: umask only sets the process's file-creation mask; this test binary runs
        // this one test.
        unsafe { libc::umask(umask) };
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("vault");
        let n = fill(root.to_str().unwrap()).await;
        // config, blocks/xx/…, manifests/vm/d0/…, deleted/points/vm/…, locks/…, staging/
        assert!(n >= 12, "umask {umask:o}: only {n} entries checked");
        let mode = std::fs::metadata(&root).unwrap().permissions().mode() & 0o7777;
        assert_eq!(mode, 0o700, "umask {umask:o}: the vault directory");
    }
}
