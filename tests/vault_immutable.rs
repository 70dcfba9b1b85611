//! Immutable vaults on a real S3 server (moto) with Object Lock, in compliance mode:
//! - `init --immutable-days`: the bucket's default retention locks every object the vault
//!   writes; deleting a locked version of a point or a block fails with the vault's own
//!   credentials; a plain delete or an overwrite only hides the original, which stays
//!   readable by its version id, and GC names such objects;
//! - prune and GC run without error on objects they may not delete yet, and the space comes
//!   back only after the retention (seconds-long here, per-object retention);
//! - GC extends the locks of referenced blocks, so a block still needed stays protected after
//!   its first retention has run out, while an unreferenced block of the same age does not;
//! - local directories, Azure and buckets without Object Lock are refused.
#![allow(clippy::unwrap_used)] // test helpers outside #[test] functions

mod vault_servers;

use std::sync::Arc;
use std::time::{Duration, Instant};

use bulwark_blockdiff::BlockSize;
use bulwark_controller::{
    BackupRequest, NoObserver, RestoreFrom, RestoreRequest, run_backup, run_restore,
};
use bulwark_snapshot::{ImageDisk, ImageSnapshotter};
use bulwark_vault::immutable::{Retention, VersionDelete};
use bulwark_vault::{CreateOptions, Error, GcOptions, Lease, LeaseKind, LeaseOptions, Vault};
use object_store::ObjectStoreExt;
use object_store::path::Path as ObjPath;
use vault_servers::{Place, noise, s3_bucket_place};

const BLOCK: usize = 256 << 10;

fn create_options() -> CreateOptions {
    CreateOptions {
        block_size: BlockSize::new(BLOCK as u32).unwrap(),
        zstd_level: Some(1),
    }
}

async fn immutable_vault(place: &Place, retention: Retention) -> Vault {
    Vault::create_immutable_with(
        &place.location,
        &create_options(),
        &place.options,
        retention,
    )
    .await
    .unwrap_or_else(|e| panic!("create immutable vault at {}: {e}", place.location))
}

/// Backs up `data` as disk `os` of vm1; returns the point id.
async fn backup(vault: &Vault, place: &Place, data: &[u8]) -> String {
    let img = place.dir.path().join("disk.img");
    std::fs::write(&img, data).unwrap();
    let req = BackupRequest::new(
        "vm1",
        Arc::new(
            ImageSnapshotter::new(vec![
                ImageDisk::parse(&format!("os={}", img.display())).unwrap(),
            ])
            .unwrap(),
        ),
    );
    run_backup(req, vault).await.unwrap().point
}

async fn restore(vault: &Vault, place: &Place, point: &str) -> Vec<u8> {
    let to = place.dir.path().join(format!("restored-{point}.img"));
    run_restore(
        RestoreRequest {
            vm: "vm1".into(),
            point: point.into(),
            disk: "os".into(),
            to: to.clone(),
            force: true,
            concurrency: 4,
            from: RestoreFrom::Vault,
            snapshots: None,
            observer: Arc::new(NoObserver),
        },
        vault,
    )
    .await
    .unwrap_or_else(|e| panic!("restore of {point}: {e}"));
    std::fs::read(&to).unwrap()
}

fn block_key(vault: &Vault, data: &[u8]) -> String {
    let hex = vault.address_of(data).to_hex();
    format!("blocks/{}/{hex}", &hex[..2])
}

/// The data versions (not delete markers) of `key`.
async fn data_versions(vault: &Vault, key: &str) -> Vec<(String, u64)> {
    let client = vault.object_lock().unwrap();
    client
        .list_versions(key)
        .await
        .unwrap()
        .into_iter()
        .filter(|v| v.key == key && !v.delete_marker)
        .map(|v| (v.version_id, v.size))
        .collect()
}

fn no_grace() -> GcOptions {
    GcOptions {
        grace: Duration::ZERO,
        ..GcOptions::default()
    }
}

#[tokio::test]
async fn days_retention_locks_every_object_and_refuses_deletes() {
    let Some(place) = s3_bucket_place("immutable_days", true).await else {
        return;
    };
    let vault = immutable_vault(&place, Retention::Days(1)).await;
    let client = vault.object_lock().unwrap().clone();
    // Recorded in the vault configuration, and seen again by whoever opens it.
    let again = Vault::open_with(&place.location, &place.options)
        .await
        .unwrap();
    let imm = again.immutability().expect("recorded as immutable").clone();
    assert_eq!(
        (
            imm.mechanism.as_str(),
            imm.mode.as_str(),
            imm.retention_secs
        ),
        ("s3-object-lock", "compliance", 86_400)
    );
    assert_eq!(imm.applied, "bucket-default");
    let conf = client.lock_configuration().await.unwrap();
    assert!(conf.enabled);
    assert_eq!(conf.default, Some(("COMPLIANCE".to_string(), 1)));

    let data = noise(7, 4 * BLOCK);
    let point = backup(&vault, &place, &data).await;
    let point_key = format!("points/vm1/{point}.json");
    let block = block_key(&vault, &data[..BLOCK]);
    let started = jiff::Timestamp::now();
    for key in [point_key.as_str(), block.as_str(), "bulwark-vault.json"] {
        let until = client.retention(key, None).await.unwrap();
        let until = until.unwrap_or_else(|| panic!("{key} has no retention"));
        let left = until.duration_since(started).as_secs();
        assert!(
            (86_400 - 120..=86_400 + 120).contains(&left),
            "{key}: locked for {left} s, not a day"
        );
    }

    // The same credentials cannot delete a locked version of a point or a block.
    for key in [point_key.as_str(), block.as_str()] {
        let versions = data_versions(&vault, key).await;
        assert_eq!(versions.len(), 1, "{key}: {versions:?}");
        let (version, _) = &versions[0];
        let original = client.get_version(key, version).await.unwrap();
        assert_eq!(
            client.delete_version(key, version).await.unwrap(),
            VersionDelete::Retained,
            "{key}: a locked version was deleted"
        );
        // A plain delete (the point) or an overwrite (the block) only hides it.
        let path = ObjPath::from(key);
        if key == point_key {
            vault.store().delete(&path).await.unwrap();
        } else {
            vault
                .store()
                .put(&path, bytes::Bytes::from_static(b"garbage").into())
                .await
                .unwrap();
        }
        assert_eq!(
            client.get_version(key, version).await.unwrap(),
            original,
            "{key}: the locked original changed"
        );
        assert_eq!(
            client.delete_version(key, version).await.unwrap(),
            VersionDelete::Retained
        );
    }
    // GC runs, names what was hidden and overwritten, and keeps the hidden point's blocks
    // (a stolen credential cannot erase them by way of GC either).
    let r = vault.gc(&no_grace()).await.unwrap();
    assert_eq!((r.blocks_freed, r.manifests_freed), (0, 0), "{r:?}");
    let imm = r.immutable.expect("an immutable report");
    assert!(imm.hidden.contains(&point_key), "{imm:?}");
    assert!(imm.overwritten.contains(&block), "{imm:?}");
    assert_eq!(imm.versions_freed, 0, "{imm:?}");
    assert_eq!(data_versions(&vault, &block).await.len(), 2);
}

#[tokio::test]
async fn prune_and_gc_free_space_only_after_the_retention() {
    let Some(place) = s3_bucket_place("immutable_gc", true).await else {
        return;
    };
    let retention = 8;
    let vault = immutable_vault(&place, Retention::Seconds(retention)).await;
    assert_eq!(vault.immutability().unwrap().applied, "per-object");
    let mut data = noise(11, 4 * BLOCK);
    let p1 = backup(&vault, &place, &data).await;
    let only_p1 = block_key(&vault, &data[..BLOCK]);
    data[..BLOCK].copy_from_slice(&noise(12, BLOCK));
    let p2 = backup(&vault, &place, &data).await;

    // Prune p1: moved to a tombstone, then purged.
    let lease = Lease::acquire(&vault, LeaseKind::Prune, "test", &LeaseOptions::default())
        .await
        .unwrap();
    assert!(
        vault
            .soft_delete(&lease, "vm1", &p1, "test", jiff::Timestamp::now())
            .await
            .unwrap()
    );
    vault.purge_deleted(&lease, "vm1", &p1).await.unwrap();
    lease.release().await.unwrap();
    let pruned = Instant::now();

    // GC at once: no error, the block is gone from the vault's view, its space is not.
    let r = vault.gc(&no_grace()).await.unwrap();
    assert_eq!(r.blocks_freed, 1, "{r:?}");
    let imm = r.immutable.clone().unwrap();
    assert_eq!(imm.versions_freed, 0, "{imm:?}");
    assert_eq!(imm.version_bytes_freed, 0, "{imm:?}");
    assert!(
        imm.versions_retained >= 4,
        "block, manifest, point, tombstone: {imm:?}"
    );
    assert!(
        !vault
            .has_block(&vault.address_of(&noise(11, BLOCK)))
            .await
            .unwrap()
    );
    assert_eq!(data_versions(&vault, &only_p1).await.len(), 1);

    // After the retention: the next GC frees the versions.
    let wait = Duration::from_secs(retention + 2).saturating_sub(pruned.elapsed());
    tokio::time::sleep(wait).await;
    let r = vault.gc(&no_grace()).await.unwrap();
    let imm = r.immutable.clone().unwrap();
    assert!(imm.versions_freed >= 4, "{imm:?}");
    assert!(imm.version_bytes_freed >= BLOCK as u64 / 2, "{imm:?}");
    assert_eq!(imm.versions_retained, 0, "{imm:?}");
    assert!(data_versions(&vault, &only_p1).await.is_empty());
    assert!(
        vault
            .object_lock()
            .unwrap()
            .list_versions(&format!("points/vm1/{p1}.json"))
            .await
            .unwrap()
            .is_empty(),
        "the pruned point's versions and markers are gone"
    );
    // The live point is whole.
    assert_eq!(restore(&vault, &place, &p2).await, data);
}

#[tokio::test]
async fn gc_extends_the_locks_of_referenced_blocks() {
    let Some(place) = s3_bucket_place("immutable_extend", true).await else {
        return;
    };
    let retention = 6;
    let vault = immutable_vault(&place, Retention::Seconds(retention)).await;
    let data = noise(21, 2 * BLOCK);
    let point = backup(&vault, &place, &data).await;
    // An unreferenced block of the same age (GC's grace period keeps it from being freed).
    let loose = noise(22, BLOCK);
    let loose_address = vault.address_of(&loose);
    vault
        .put_block(loose_address, loose.clone().into())
        .await
        .unwrap();
    let written = Instant::now();
    let used = block_key(&vault, &data[..BLOCK]);
    let loose_key = block_key(&vault, &loose);

    // After half the retention, GC extends what is referenced.
    tokio::time::sleep(Duration::from_secs(retention / 2 + 1)).await;
    let r = vault.gc(&GcOptions::default()).await.unwrap();
    let imm = r.immutable.unwrap();
    assert!(
        imm.locks_extended >= 4,
        "config, point, manifest, blocks: {imm:?}"
    );

    // Past the first retention: the referenced block is still locked, the loose one not.
    let wait = Duration::from_secs(retention + 1).saturating_sub(written.elapsed());
    tokio::time::sleep(wait).await;
    let client = vault.object_lock().unwrap();
    let (v_used, _) = data_versions(&vault, &used).await.remove(0);
    assert_eq!(
        client.delete_version(&used, &v_used).await.unwrap(),
        VersionDelete::Retained,
        "a referenced block lost its lock"
    );
    let (v_loose, _) = data_versions(&vault, &loose_key).await.remove(0);
    assert_eq!(
        client.delete_version(&loose_key, &v_loose).await.unwrap(),
        VersionDelete::Deleted,
        "the unreferenced block's retention should have run out"
    );
    assert_eq!(restore(&vault, &place, &point).await, data);
}

#[tokio::test]
async fn immutability_is_refused_where_it_cannot_be_enforced() {
    let dir = tempfile::tempdir().unwrap();
    let local = dir.path().join("v");
    let e = Vault::create_immutable_with(
        local.to_str().unwrap(),
        &create_options(),
        &Default::default(),
        Retention::Days(7),
    )
    .await
    .unwrap_err();
    assert!(matches!(e, Error::Immutable { .. }), "{e}");
    assert!(e.to_string().contains("cannot enforce"), "{e}");
    assert!(!local.exists(), "nothing written");
    let e = Vault::create_immutable_with(
        "az://c/v",
        &create_options(),
        &Default::default(),
        Retention::Days(7),
    )
    .await
    .unwrap_err();
    assert!(e.to_string().contains("Azure"), "{e}");

    // A bucket without Object Lock.
    let Some(place) = s3_bucket_place("immutable_nolock", false).await else {
        return;
    };
    let e = Vault::create_immutable_with(
        &place.location,
        &create_options(),
        &place.options,
        Retention::Days(1),
    )
    .await
    .unwrap_err();
    assert!(e.to_string().contains("Object Lock enabled"), "{e}");
    assert!(matches!(
        Vault::open_with(&place.location, &place.options).await,
        Err(Error::NoVault { .. })
    ));
}
