//! One conformance suite of vault scenarios, written once and run on every backend (a local
//! directory, Azurite, an S3-compatible server), plain and encrypted: backup, incremental
//! backup, restore (bit-exact), verify, conditional commit, reopen, prune + GC, and request
//! statistics in the job report.
#![allow(clippy::unwrap_used)] // test helpers outside #[test] functions

mod vault_servers;

use std::path::Path;
use std::sync::Arc;

use bulwark_blockdiff::BlockSize;
use bulwark_controller::{
    BackupRequest, NoObserver, RestoreFrom, RestoreRequest, run_backup, run_restore,
};
use bulwark_snapshot::{ImageDisk, ImageSnapshotter};
use bulwark_vault::{
    CreateOptions, Error, GcOptions, Lease, LeaseKind, LeaseOptions, MasterKey, Vault,
};
use vault_servers::{Backend, Place, noise, place};

const BLOCK: usize = 256 << 10;

async fn restore_to(vault: &Vault, point: &str, to: &Path) -> Vec<u8> {
    run_restore(
        RestoreRequest {
            vm: "vm1".into(),
            point: point.into(),
            disk: "os".into(),
            to: to.to_path_buf(),
            force: true,
            concurrency: 8,
            from: RestoreFrom::Vault,
            snapshots: None,
            observer: Arc::new(NoObserver),
        },
        vault,
    )
    .await
    .unwrap_or_else(|e| panic!("restore of {point}: {e}"));
    std::fs::read(to).unwrap()
}

/// The whole suite against one place.
async fn conformance(place: &Place, key: Option<MasterKey>) {
    let what = format!("{:?} encrypted={}", place.backend, key.is_some());
    let mut opts = place.options.clone();
    opts.key = key.clone();
    let create = CreateOptions {
        block_size: BlockSize::new(BLOCK as u32).unwrap(),
        zstd_level: Some(1),
    };
    let vault = Vault::create_with(&place.location, &create, &opts)
        .await
        .unwrap_or_else(|e| panic!("{what}: create: {e}"));
    assert_eq!(vault.is_encrypted(), key.is_some());
    // init's probe: a second create-only write of the same key is refused here.
    assert_eq!(
        vault.config().conditional_writes,
        Some(true),
        "{what}: the store honours conditional writes"
    );
    assert!(matches!(
        Vault::create_with(&place.location, &create, &opts).await,
        Err(Error::VaultExists { .. })
    ));

    // A 4 MiB disk: noise, with a zero megabyte in the middle.
    let img = place.dir.path().join("disk.img");
    let mut data = noise(1, 4 << 20);
    data[1 << 20..2 << 20].fill(0);
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
    let r1 = run_backup(req.clone(), &vault)
        .await
        .unwrap_or_else(|e| panic!("{what}: first backup: {e}"));
    let s1 = &r1.disks[0].stats;
    assert_eq!((s1.blocks, s1.zero_blocks), (16, 4), "{what}");
    assert_eq!(s1.blocks_uploaded, 12, "{what}");
    assert!(r1.storage.puts >= 14, "{what}: {:?}", r1.storage);
    assert!(r1.storage.heads >= 12, "{what}: {:?}", r1.storage);
    assert!(
        r1.storage.not_found >= 12,
        "{what}: new blocks: {:?}",
        r1.storage
    );
    assert_eq!(r1.storage.errors, 0, "{what}: {:?}", r1.storage);
    assert!(
        r1.storage.bytes_up >= 12 * BLOCK as u64,
        "{what}: {:?}",
        r1.storage
    );
    let v1 = data.clone();

    // Incremental: two blocks change, only they are uploaded.
    data[10..20].fill(0xAB);
    data[12 * BLOCK + 5] ^= 0xFF;
    std::fs::write(&img, &data).unwrap();
    let r2 = run_backup(req.clone(), &vault)
        .await
        .unwrap_or_else(|e| panic!("{what}: second backup: {e}"));
    let s2 = &r2.disks[0].stats;
    assert_eq!(
        r2.disks[0].previous_point.as_deref(),
        Some(r1.point.as_str())
    );
    assert_eq!((s2.changed_blocks, s2.blocks_uploaded), (2, 2), "{what}");
    assert!(
        r2.storage.bytes_up < 3 * BLOCK as u64,
        "{what}: {:?}",
        r2.storage
    );

    // Restore both points bit-exact.
    let out = place.dir.path().join("restored.img");
    assert!(
        restore_to(&vault, &r1.point, &out).await == v1,
        "{what}: point 1"
    );
    assert!(
        restore_to(&vault, &r2.point, &out).await == data,
        "{what}: point 2"
    );

    // Verify reads everything.
    let rep = vault.verify(None, &|_, _| {}).await.unwrap();
    assert!(rep.is_ok(), "{what}: {:?}", rep.problems);
    assert_eq!(
        (rep.points, rep.manifests, rep.blocks),
        (2, 2, 14),
        "{what}"
    );

    // Anyone opening the location sees the same vault.
    let again = Vault::open_with(&place.location, &opts).await.unwrap();
    assert_eq!(again.config().id, vault.config().id);
    let list = again.list_points(Some("vm1")).await.unwrap();
    assert_eq!(list.points.len(), 2, "{what}");
    assert!(list.broken.is_empty(), "{what}: {:?}", list.broken);

    // Conditional commit: a point is written once.
    let p1 = again.get_point("vm1", &r1.point).await.unwrap();
    let e = again.commit_point(&p1).await.unwrap_err();
    assert!(matches!(e, Error::PointExists { .. }), "{what}: {e}");

    if let Some(k) = &key {
        // Stored names are keyed: the plain BLAKE3 of a block is not in the vault.
        let plain = bulwark_blockdiff::content_address(&v1[..BLOCK], None);
        assert!(!vault.has_block(&plain).await.unwrap(), "{what}");
        assert!(
            vault
                .has_block(&vault.address_of(&v1[..BLOCK]))
                .await
                .unwrap()
        );
        let mut no_key = place.options.clone();
        no_key.key = None;
        let e = Vault::open_with(&place.location, &no_key)
            .await
            .unwrap_err();
        assert!(matches!(e, Error::KeyRequired { .. }), "{what}: {e}");
        let mut wrong = place.options.clone();
        wrong.key = Some(MasterKey::generate());
        let e = Vault::open_with(&place.location, &wrong).await.unwrap_err();
        assert!(matches!(e, Error::WrongKey { .. }), "{what}: {e}");
        assert!(e.to_string().contains(&k.fingerprint()), "{e}");
    } else {
        let mut keyed = place.options.clone();
        keyed.key = Some(MasterKey::generate());
        let e = Vault::open_with(&place.location, &keyed).await.unwrap_err();
        assert!(matches!(e, Error::NotEncrypted { .. }), "{what}: {e}");
    }

    // Prune point 1 and collect garbage: the two blocks only it used are freed, point 2 stays
    // whole.
    let lease = Lease::acquire(
        &vault,
        LeaseKind::Prune,
        "test prune",
        &LeaseOptions::default(),
    )
    .await
    .unwrap();
    assert!(
        vault
            .soft_delete(&lease, "vm1", &r1.point, "test", jiff::Timestamp::now())
            .await
            .unwrap()
    );
    let deleted = vault.get_deleted("vm1", &r1.point).await.unwrap();
    assert_eq!(deleted.point.id, r1.point, "{what}");
    vault.purge_deleted(&lease, "vm1", &r1.point).await.unwrap();
    lease.release().await.unwrap();
    let gc = vault
        .gc(&GcOptions {
            grace: std::time::Duration::ZERO,
            ..Default::default()
        })
        .await
        .unwrap_or_else(|e| panic!("{what}: gc: {e}"));
    assert_eq!(gc.blocks_freed, 2, "{what}: {gc:?}");
    assert!(
        restore_to(&vault, &r2.point, &out).await == data,
        "{what}: after gc"
    );
    let rep = vault.verify(None, &|_, _| {}).await.unwrap();
    assert!(rep.is_ok(), "{what}: {:?}", rep.problems);
    assert_eq!(rep.points, 1);
}

async fn run(backend: Backend, encrypted: bool) {
    let test = format!("conformance-{backend:?}-{encrypted}").to_lowercase();
    let Some(place) = place(backend, &test) else {
        return;
    };
    conformance(&place, encrypted.then(MasterKey::generate)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn local_plain() {
    run(Backend::Local, false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn local_encrypted() {
    run(Backend::Local, true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn azurite_plain() {
    run(Backend::Azurite, false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn azurite_encrypted() {
    run(Backend::Azurite, true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn s3_plain() {
    run(Backend::S3, false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn s3_encrypted() {
    run(Backend::S3, true).await;
}
