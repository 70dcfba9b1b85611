//! Unit tests of leases, soft delete and GC on the in-memory store.

use std::time::Duration;

use super::*;
use crate::lease::{LeaseKind, LeaseOptions, LeaseRecord, list_leases, write_lease_record};
use crate::tests::{commit_map, mem};
use bulwark_blockdiff::{Entry, content_address};
use jiff::Timestamp;

/// Commits a point of `vm` whose single disk holds `blocks` (each one block).
async fn point_with(v: &Vault, vm: &str, blocks: &[&[u8]]) -> RecoveryPoint {
    let bs = BlockSize::new(bulwark_blockdiff::MIN_BLOCK_SIZE).unwrap();
    let mut entries = Vec::new();
    for data in blocks {
        let mut full = data.to_vec();
        full.resize(bs.get() as usize, 0xAB);
        let address = content_address(&full, None);
        v.put_block(address, Bytes::from(full)).await.unwrap();
        entries.push(Entry::Data { change: 1, address });
    }
    let size = bs.bytes() * blocks.len() as u64;
    let map = BlockMap::new(bs, size, entries).unwrap();
    commit_map(v, vm, &map).await
}

fn addr(data: &[u8]) -> Address {
    let mut full = data.to_vec();
    full.resize(bulwark_blockdiff::MIN_BLOCK_SIZE as usize, 0xAB);
    content_address(&full, None)
}

fn gc0() -> GcOptions {
    GcOptions {
        grace: Duration::ZERO,
        ..GcOptions::default()
    }
}

async fn prune_lease(v: &Vault) -> Lease {
    Lease::acquire(v, LeaseKind::Prune, "test prune", &LeaseOptions::default())
        .await
        .unwrap()
}

#[tokio::test]
async fn soft_delete_undelete_round_trip_is_byte_exact() {
    let v = mem().await;
    let p = point_with(&v, "vm", &[b"a", b"b"]).await;
    let before = v
        .get_raw(&point_key("vm", &p.id), crate::envelope::Kind::Point)
        .await
        .unwrap();
    let lease = prune_lease(&v).await;
    let now = Timestamp::now();
    assert!(
        v.soft_delete(&lease, "vm", &p.id, "test", now)
            .await
            .unwrap()
    );
    // Idempotent.
    assert!(
        !v.soft_delete(&lease, "vm", &p.id, "test", now)
            .await
            .unwrap()
    );
    assert!(matches!(
        v.get_point("vm", &p.id).await,
        Err(Error::NoSuchPoint { .. })
    ));
    let list = v.list_deleted(Some("vm")).await.unwrap();
    assert_eq!(list.points.len(), 1);
    assert_eq!(list.points[0].point, p);
    assert_eq!(list.points[0].reason, "test");
    assert_eq!(list.points[0].deleted, now);

    let back = v.undelete(&lease, "vm", &p.id).await.unwrap();
    assert_eq!(back, p);
    assert_eq!(
        v.get_raw(&point_key("vm", &p.id), crate::envelope::Kind::Point)
            .await
            .unwrap(),
        before
    );
    assert!(v.list_deleted(None).await.unwrap().points.is_empty());
    let e = v.undelete(&lease, "vm", &p.id).await.unwrap_err();
    assert!(e.to_string().contains("it is live"), "{e}");
    let e = v
        .undelete(&lease, "vm", "20990101T000000.000Z-abcdef")
        .await
        .unwrap_err();
    assert!(matches!(e, Error::NoSuchDeletedPoint { .. }), "{e}");
    lease.release().await.unwrap();
}

#[tokio::test]
async fn moving_points_needs_a_prune_lease() {
    let v = mem().await;
    let p = point_with(&v, "vm", &[b"a"]).await;
    let backup = Lease::acquire(&v, LeaseKind::Backup, "b", &LeaseOptions::default())
        .await
        .unwrap();
    let e = v
        .soft_delete(&backup, "vm", &p.id, "x", Timestamp::now())
        .await
        .unwrap_err();
    assert!(matches!(e, Error::LeaseLost { .. }), "{e}");
    backup.release().await.unwrap();
}

#[tokio::test]
async fn a_point_in_both_places_is_live() {
    let v = mem().await;
    let p = point_with(&v, "vm", &[b"a"]).await;
    let lease = prune_lease(&v).await;
    v.soft_delete(&lease, "vm", &p.id, "x", Timestamp::now())
        .await
        .unwrap();
    // Simulate an undelete cut short after its copy: the point is back, the tombstone too.
    let (_, object) = v.get_deleted_raw("vm", &p.id).await.unwrap();
    v.store
        .put(&point_key("vm", &p.id), PutPayload::from(object))
        .await
        .unwrap();
    assert_eq!(v.get_point("vm", &p.id).await.unwrap(), p);
    let list = v.list_deleted(None).await.unwrap();
    assert!(list.points.is_empty());
    assert_eq!(list.stale, vec![("vm".to_string(), p.id.clone())]);
    // Purging it only drops the stale tombstone; the manifest stays.
    assert_eq!(v.purge_deleted(&lease, "vm", &p.id).await.unwrap(), 0);
    assert!(v.verify(None, &|_, _| {}).await.unwrap().is_ok());
    assert!(v.list_deleted(None).await.unwrap().stale.is_empty());
    lease.release().await.unwrap();
}

#[tokio::test]
async fn gc_frees_only_blocks_of_purged_points() {
    let v = mem().await;
    let p1 = point_with(&v, "vm", &[b"shared", b"only-p1"]).await;
    let p2 = point_with(&v, "vm", &[b"shared", b"only-p2"]).await;
    let p3 = point_with(&v, "vm", &[b"only-p3"]).await;
    let lease = prune_lease(&v).await;
    let now = Timestamp::now();
    v.soft_delete(&lease, "vm", &p1.id, "x", now).await.unwrap();
    v.soft_delete(&lease, "vm", &p3.id, "x", now).await.unwrap();
    lease.release().await.unwrap();

    // Soft-deleted points keep their blocks.
    let r = v.gc(&gc0()).await.unwrap();
    assert_eq!((r.live_points, r.deleted_points), (1, 2));
    assert_eq!(
        (r.blocks_seen, r.blocks_freed, r.manifests_freed),
        (4, 0, 0)
    );

    // Purge p1: only its own block goes; the shared one stays (p2 is live).
    let lease = prune_lease(&v).await;
    assert_eq!(v.purge_deleted(&lease, "vm", &p1.id).await.unwrap(), 1);
    lease.release().await.unwrap();
    let only_p1 = block_key(&addr(b"only-p1"));
    let size = v.store.head(&only_p1).await.unwrap().size;
    let dry = v
        .gc(&GcOptions {
            dry_run: true,
            ..gc0()
        })
        .await
        .unwrap();
    assert_eq!((dry.blocks_freed, dry.bytes_freed), (1, size));
    assert!(
        v.has_block(&addr(b"only-p1")).await.unwrap(),
        "dry run deletes nothing"
    );
    let r = v.gc(&gc0()).await.unwrap();
    assert_eq!(
        (r.blocks_freed, r.bytes_freed, r.blocks_referenced),
        (1, size, 3)
    );
    assert!(!v.has_block(&addr(b"only-p1")).await.unwrap());
    for kept in [b"shared".as_slice(), b"only-p2", b"only-p3"] {
        assert!(v.has_block(&addr(kept)).await.unwrap());
    }
    assert!(v.verify(None, &|_, _| {}).await.unwrap().is_ok());
    // The soft-deleted p3 still comes back whole.
    let lease = prune_lease(&v).await;
    v.undelete(&lease, "vm", &p3.id).await.unwrap();
    lease.release().await.unwrap();
    let r = v.verify(None, &|_, _| {}).await.unwrap();
    assert!(r.is_ok() && r.points == 2, "{:?}", r.problems);
    let _ = p2;
}

#[tokio::test]
async fn grace_period_keeps_young_orphans() {
    let v = mem().await;
    point_with(&v, "vm", &[b"kept"]).await;
    // An in-flight backup's block and manifest: not referenced by any point yet.
    let data = Bytes::from(vec![5u8; 70_000]);
    let a = content_address(&data, None);
    v.put_block(a, data).await.unwrap();
    let bs = BlockSize::new(bulwark_blockdiff::MIN_BLOCK_SIZE).unwrap();
    let map = BlockMap::new(bs, 1, vec![Entry::Zero]).unwrap();
    v.put_manifest(
        &ManifestRef {
            vm: "vm",
            disk: "d0",
            point: "20990101T000000.000Z-000000",
        },
        &map,
    )
    .await
    .unwrap();
    let r = v.gc(&GcOptions::default()).await.unwrap();
    assert_eq!(
        (
            r.blocks_freed,
            r.blocks_young,
            r.manifests_freed,
            r.manifests_young
        ),
        (0, 1, 0, 1)
    );
    assert!(v.has_block(&a).await.unwrap());
    let r = v.gc(&gc0()).await.unwrap();
    assert_eq!((r.blocks_freed, r.manifests_freed), (1, 1));
    assert!(!v.has_block(&a).await.unwrap());
}

#[tokio::test]
async fn gc_aborts_on_an_unreadable_manifest_of_a_deleted_point() {
    let v = mem().await;
    let p = point_with(&v, "vm", &[b"x"]).await;
    let lease = prune_lease(&v).await;
    v.soft_delete(&lease, "vm", &p.id, "x", Timestamp::now())
        .await
        .unwrap();
    lease.release().await.unwrap();
    let mkey = manifest_key(&ManifestRef {
        vm: "vm",
        disk: "d0",
        point: &p.id,
    });
    v.store
        .put(&mkey, PutPayload::from(vec![1u8; 60]))
        .await
        .unwrap();
    // An unreferenced old block that would otherwise be freed.
    let e = v.gc(&gc0()).await.unwrap_err();
    assert!(matches!(e, Error::GcAborted { .. }), "{e}");
    assert!(e.to_string().contains(&mkey.to_string()), "{e}");
    assert!(v.has_block(&addr(b"x")).await.unwrap());
    // Nothing is left locked.
    assert!(list_leases(&v).await.unwrap().is_empty());
}

#[tokio::test]
async fn gc_aborts_on_an_unreadable_live_point() {
    let v = mem().await;
    let p = point_with(&v, "vm", &[b"x"]).await;
    v.store
        .put(
            &point_key("vm", &p.id),
            PutPayload::from(b"garbage".to_vec()),
        )
        .await
        .unwrap();
    let e = v.gc(&gc0()).await.unwrap_err();
    assert!(matches!(e, Error::GcAborted { .. }), "{e}");
    assert!(v.has_block(&addr(b"x")).await.unwrap());
}

#[tokio::test]
async fn leases_exclude_by_kind() {
    let v = mem().await;
    let opts = LeaseOptions::default();
    let b1 = Lease::acquire(&v, LeaseKind::Backup, "b1", &opts)
        .await
        .unwrap();
    let b2 = Lease::acquire(&v, LeaseKind::Backup, "b2", &opts)
        .await
        .unwrap();
    let p = Lease::acquire(&v, LeaseKind::Prune, "p", &opts)
        .await
        .unwrap();
    // Prunes exclude each other.
    let e = Lease::acquire(&v, LeaseKind::Prune, "p2", &opts)
        .await
        .unwrap_err();
    assert!(matches!(e, Error::LeaseConflict { .. }), "{e}");
    // GC is refused while backups or a prune run.
    let e = v.gc(&gc0()).await.unwrap_err();
    assert!(e.to_string().contains("cannot take a gc lease"), "{e}");
    b1.release().await.unwrap();
    b2.release().await.unwrap();
    let e = v.gc(&gc0()).await.unwrap_err();
    assert!(e.to_string().contains("prune lease held by p"), "{e}");
    p.release().await.unwrap();
    v.gc(&gc0()).await.unwrap();
    assert!(list_leases(&v).await.unwrap().is_empty());

    // A backup is refused while GC holds its lease, and waits for it when allowed to.
    let gc = Lease::acquire(&v, LeaseKind::Gc, "gc", &opts)
        .await
        .unwrap();
    let e = Lease::acquire(&v, LeaseKind::Backup, "b", &opts)
        .await
        .unwrap_err();
    assert!(e.to_string().contains("gc lease held by gc"), "{e}");
    let v2 = v.clone();
    let waiter = tokio::spawn(async move {
        let opts = LeaseOptions {
            retry: Duration::from_millis(20),
            ..LeaseOptions::default().waiting(Duration::from_secs(10))
        };
        Lease::acquire(&v2, LeaseKind::Backup, "b", &opts).await
    });
    tokio::time::sleep(Duration::from_millis(200)).await;
    gc.release().await.unwrap();
    let b = waiter.await.unwrap().unwrap();
    b.release().await.unwrap();
}

#[tokio::test]
async fn expired_leases_do_not_block_and_gc_removes_them() {
    let v = mem().await;
    let past = Timestamp::now()
        .checked_sub(Duration::from_secs(5))
        .unwrap();
    let rec = LeaseRecord {
        kind: LeaseKind::Backup,
        id: "crashed".into(),
        holder: "a backup that crashed".into(),
        pid: 1,
        host: "h".into(),
        created: past,
        expires: past,
        ttl_ms: None,
    };
    write_lease_record(&v, &rec).await.unwrap();
    let r = v.gc(&gc0()).await.unwrap();
    assert_eq!(r.expired_leases_removed, 1);
    assert!(list_leases(&v).await.unwrap().is_empty());
    // A live one does block.
    let live = LeaseRecord {
        expires: Timestamp::now()
            .checked_add(Duration::from_secs(60))
            .unwrap(),
        ..rec
    };
    write_lease_record(&v, &live).await.unwrap();
    assert!(matches!(
        v.gc(&gc0()).await,
        Err(Error::LeaseConflict { .. })
    ));
}

#[tokio::test]
async fn a_corrupt_lease_is_a_clear_error() {
    let v = mem().await;
    let key = ObjPath::from("locks/backup-broken");
    v.store
        .put(&key, PutPayload::from(b"{\"kind\": \"backup\"".to_vec()))
        .await
        .unwrap();
    let e = v.gc(&gc0()).await.unwrap_err();
    assert!(matches!(e, Error::CorruptLease { .. }), "{e}");
    assert!(e.to_string().contains("locks/backup-broken"), "{e}");
    assert!(e.to_string().contains("delete this object"), "{e}");
    // The failed acquirer removed its own lease again.
    let left = list_leases(&v).await.unwrap();
    assert_eq!(left.len(), 1, "{left:?}");
    // A backup does not care about other backups' leases.
    let b = Lease::acquire(&v, LeaseKind::Backup, "b", &LeaseOptions::default())
        .await
        .unwrap();
    b.release().await.unwrap();
    // A record that does not match its key.
    v.store.delete(&key).await.unwrap();
    let rec = LeaseRecord {
        kind: LeaseKind::Gc,
        id: "x".into(),
        holder: "h".into(),
        pid: 1,
        host: "h".into(),
        created: Timestamp::now(),
        expires: Timestamp::now(),
        ttl_ms: None,
    };
    v.store
        .put(
            &ObjPath::from("locks/gc-y"),
            PutPayload::from(serde_json::to_vec(&rec).unwrap()),
        )
        .await
        .unwrap();
    let e = Lease::acquire(&v, LeaseKind::Backup, "b", &LeaseOptions::default())
        .await
        .unwrap_err();
    assert!(e.to_string().contains("does not match its key"), "{e}");
}

#[tokio::test]
async fn leases_renew_and_release_on_drop() {
    let v = mem().await;
    let opts = LeaseOptions {
        ttl: Duration::from_millis(300),
        ..LeaseOptions::default()
    };
    let lease = Lease::acquire(&v, LeaseKind::Backup, "long job", &opts)
        .await
        .unwrap();
    let first = lease.record().expires;
    tokio::time::sleep(Duration::from_millis(700)).await;
    // Still held long after the first expiry: the background task renewed it.
    lease.ensure_held().unwrap();
    let leases = list_leases(&v).await.unwrap();
    let rec = leases[0].1.as_ref().unwrap();
    assert!(rec.expires > first, "{rec:?}");
    assert!(rec.is_live(Timestamp::now()));
    drop(lease);
    for _ in 0..50 {
        if list_leases(&v).await.unwrap().is_empty() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("a dropped lease was not removed");
}

#[tokio::test]
async fn a_lease_that_cannot_be_renewed_is_lost_and_its_holder_stops() {
    let faulty = Arc::new(crate::fault::FaultyStore::new(
        object_store::memory::InMemory::new(),
        crate::fault::FaultConfig::seeded(1),
    ));
    let v = Vault::create_store(faulty.clone(), "faulty:", &CreateOptions::default())
        .await
        .unwrap();
    let p = point_with(&v, "vm", &[b"a"]).await;
    let opts = LeaseOptions {
        ttl: Duration::from_millis(400),
        ..LeaseOptions::default()
    };
    let lease = Lease::acquire(&v, LeaseKind::Prune, "stalled prune", &opts)
        .await
        .unwrap();
    lease.ensure_held().unwrap();
    // The store goes away: renewals fail, and the lease runs out.
    faulty.set_down(true);
    tokio::time::sleep(Duration::from_millis(450)).await;
    faulty.set_down(false);
    let e = lease.ensure_held().unwrap_err();
    assert!(matches!(e, Error::LeaseLost { .. }), "{e}");
    // Everything that relies on the lease refuses to go on.
    let e = v
        .soft_delete(&lease, "vm", &p.id, "x", Timestamp::now())
        .await
        .unwrap_err();
    assert!(e.to_string().contains("lease lost"), "{e}");
    assert_eq!(v.get_point("vm", &p.id).await.unwrap(), p);
    // Meanwhile others see it expired: GC may run.
    v.gc(&gc0()).await.unwrap();
    lease.release().await.unwrap();
}

/// GC on a store that fails requests and cuts listings short, over and over: whatever it
/// manages, it never frees a block that a live or soft-deleted point needs.
#[tokio::test]
async fn gc_under_store_faults_never_frees_a_needed_block() {
    let faulty = Arc::new(crate::fault::FaultyStore::new(
        object_store::memory::InMemory::new(),
        crate::fault::FaultConfig {
            error_rate: 0.02,
            truncated_list_rate: 0.2,
            ..crate::fault::FaultConfig::seeded(7)
        },
    ));
    faulty.set_enabled(false);
    let v = Vault::create_store(faulty.clone(), "faulty:", &CreateOptions::default())
        .await
        .unwrap();
    let mut points = Vec::new();
    for i in 0..6u8 {
        let own = vec![i; 8];
        points.push(point_with(&v, "vm", &[b"shared", &own]).await);
    }
    let lease = prune_lease(&v).await;
    for p in &points[..3] {
        v.soft_delete(&lease, "vm", &p.id, "x", Timestamp::now())
            .await
            .unwrap();
    }
    v.purge_deleted(&lease, "vm", &points[0].id).await.unwrap();
    lease.release().await.unwrap();
    let needed: Vec<Address> = [b"shared".to_vec()]
        .into_iter()
        .chain((1..6u8).map(|i| vec![i; 8]))
        .map(|d| addr(&d))
        .collect();
    let options = GcOptions {
        grace: Duration::ZERO,
        lease: LeaseOptions {
            ttl: Duration::from_millis(150),
            ..LeaseOptions::default()
        },
        ..GcOptions::default()
    };
    let (mut ok, mut failed) = (0, 0);
    for _ in 0..30 {
        faulty.set_enabled(true);
        match v.gc(&options).await {
            Ok(_) => ok += 1,
            Err(_) => {
                failed += 1;
                // A lease whose delete failed stays until it expires.
                tokio::time::sleep(Duration::from_millis(170)).await;
            }
        }
        faulty.set_enabled(false);
        for a in &needed {
            assert!(v.has_block(a).await.unwrap(), "GC freed a needed block");
        }
        let r = v.verify(None, &|_, _| {}).await.unwrap();
        assert!(r.is_ok(), "{:?}", r.problems);
    }
    eprintln!("gc under faults: {ok} succeeded, {failed} failed");
    assert!(ok > 0 && failed > 0, "{ok} succeeded, {failed} failed");
    assert!(!v.has_block(&addr(&[0u8; 8])).await.unwrap());
    // The soft-deleted points still come back whole.
    let lease = prune_lease(&v).await;
    for p in &points[1..3] {
        v.undelete(&lease, "vm", &p.id).await.unwrap();
    }
    lease.release().await.unwrap();
    let r = v.verify(None, &|_, _| {}).await.unwrap();
    assert!(r.is_ok() && r.points == 5, "{:?}", r.problems);
}
