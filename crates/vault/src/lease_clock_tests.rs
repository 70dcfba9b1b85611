//! Leases on the store's clock: holders whose wall clocks are minutes apart, and a held
//! step that may not outlive its lease.

use std::time::Duration;

use jiff::{SignedDuration, Timestamp};

use super::*;
use crate::lease::{LeaseKind, LeaseOptions, LeaseRecord, list_leases, write_lease_record};
use crate::tests::mem;

const SKEW: SignedDuration = SignedDuration::from_secs(5 * 60);

fn opts(ttl_ms: u64, offset: SignedDuration) -> LeaseOptions {
    LeaseOptions {
        ttl: Duration::from_millis(ttl_ms),
        clock_offset: offset,
        ..LeaseOptions::default()
    }
}

fn gc(offset: SignedDuration) -> GcOptions {
    GcOptions {
        grace: Duration::ZERO,
        lease: opts(1500, offset),
        ..GcOptions::default()
    }
}

/// A backup on one host dedups against an unreferenced block; GC on another host, its clock
/// 5 minutes off either way, runs again and again meanwhile. It must never free the block
/// while the backup's lease is renewed, and must free it once the backup is gone.
#[tokio::test]
async fn skewed_clocks_never_let_gc_free_a_block_a_running_backup_holds() {
    for (backup_skew, gc_skew) in [(-SKEW, SKEW), (SKEW, -SKEW)] {
        let v = mem().await;
        let data = Bytes::from(vec![5u8; 4096]);
        let address = v.address_of(&data);
        v.put_block(address, data.clone()).await.unwrap();
        let backup = Lease::acquire(&v, LeaseKind::Backup, "backup", &opts(1500, backup_skew))
            .await
            .unwrap();
        // The backup reuses the block it found: from now on its point will reference it.
        assert!(v.has_block(&address).await.unwrap());
        // Over several ttls (the lease is renewed in the background meanwhile).
        for round in 0..8 {
            let r = v.gc(&gc(gc_skew)).await;
            assert!(
                matches!(r, Err(Error::LeaseConflict { .. })),
                "round {round}, backup skew {backup_skew:?}, gc skew {gc_skew:?}: GC ran \
                 during the backup: {r:?}"
            );
            assert!(v.has_block(&address).await.unwrap(), "round {round}");
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        backup.ensure_held().unwrap();
        backup.release().await.unwrap();
        let r = v.gc(&gc(gc_skew)).await.unwrap();
        assert_eq!(r.blocks_freed, 1, "freed once the backup is gone");
    }
}

/// A holder that crashed with its clock 5 minutes ahead does not block GC for 5 minutes: its
/// lease ends `ttl` after its last write, on the store's clock.
#[tokio::test]
async fn a_crashed_holder_ahead_of_time_expires_on_the_store_clock() {
    let v = mem().await;
    let ahead = Timestamp::now().checked_add(SKEW).unwrap();
    let rec = LeaseRecord {
        kind: LeaseKind::Backup,
        id: "crashed".into(),
        holder: "a backup that crashed".into(),
        pid: 1,
        host: "fast-clock".into(),
        created: ahead,
        expires: ahead.checked_add(Duration::from_millis(800)).unwrap(),
        ttl_ms: Some(800),
    };
    write_lease_record(&v, &rec).await.unwrap();
    assert!(matches!(
        v.gc(&gc(SignedDuration::ZERO)).await,
        Err(Error::LeaseConflict { .. })
    ));
    tokio::time::sleep(Duration::from_millis(1200)).await;
    let r = v.gc(&gc(SignedDuration::ZERO)).await.unwrap();
    assert_eq!(r.expired_leases_removed, 1);
    assert!(list_leases(&v).await.unwrap().is_empty());
}

/// A step run under a lease is abandoned before the lease could look expired to others,
/// however long its retries would go on.
#[tokio::test]
async fn a_held_step_cannot_outlive_its_lease() {
    let v = mem().await;
    let lease = Lease::acquire(&v, LeaseKind::Gc, "gc", &opts(2000, SignedDuration::ZERO))
        .await
        .unwrap();
    let started = std::time::Instant::now();
    let r: Result<(), Error> = lease
        .held("a stuck delete", async {
            tokio::time::sleep(Duration::from_secs(30)).await;
            Ok(())
        })
        .await;
    let e = r.unwrap_err();
    assert!(matches!(e, Error::LeaseLost { .. }), "{e}");
    assert!(e.to_string().contains("a stuck delete"), "{e}");
    // ttl 2 s: abandoned a quarter of the ttl before the end, at about 1.5 s.
    let took = started.elapsed();
    assert!(took < Duration::from_millis(1800), "{took:?}");
    // A quick step goes through.
    lease.held("a quick step", async { Ok(()) }).await.unwrap();
    lease.release().await.unwrap();
}
