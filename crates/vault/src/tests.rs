//! Unit tests of the vault on the in-memory store and a local directory.

use super::*;
use bulwark_blockdiff::{Entry, content_address};
use jiff::Timestamp;

pub(crate) async fn mem() -> Vault {
    Vault::create_store(
        Arc::new(object_store::memory::InMemory::new()),
        "memory:",
        &CreateOptions::default(),
    )
    .await
    .unwrap()
}

async fn one_point(v: &Vault, vm: &str, data: &[u8]) -> RecoveryPoint {
    let bs = BlockSize::new(bulwark_blockdiff::MIN_BLOCK_SIZE).unwrap();
    let address = content_address(data, None);
    v.put_block(address, Bytes::copy_from_slice(data))
        .await
        .unwrap();
    let map = BlockMap::new(
        bs,
        data.len() as u64,
        vec![Entry::Data { change: 1, address }],
    )
    .unwrap();
    commit_map(v, vm, &map).await
}

/// Commits a crash-consistent point of `vm` whose single disk `d0` has the block map `map`
/// (its blocks already stored).
pub(crate) async fn commit_map(v: &Vault, vm: &str, map: &BlockMap) -> RecoveryPoint {
    let id = new_point_id(Timestamp::now());
    let (digest, _) = v
        .put_manifest(
            &ManifestRef {
                vm,
                disk: "d0",
                point: &id,
            },
            map,
        )
        .await
        .unwrap();
    let p = RecoveryPoint {
        id,
        vm: vm.into(),
        created: Timestamp::now(),
        committed: Timestamp::now(),
        consistency: ConsistencyRecord::crash(),
        disks: vec![DiskRecord {
            name: "d0".into(),
            size: map.disk_size(),
            block_size: map.block_size().get(),
            manifest_digest: digest,
            source: String::new(),
            stats: DiskStats::default(),
            tracking: None,
        }],
        policy: None,
        agent: None,
    };
    v.commit_point(&p).await.unwrap();
    p
}

#[tokio::test]
async fn put_get_dedup() {
    let v = mem().await;
    let data = Bytes::from(vec![3u8; 10_000]);
    let a = content_address(&data, None);
    let first = v.put_block(a, data.clone()).await.unwrap();
    assert!(!first.existed && first.stored_bytes > 0 && first.stored_bytes < 10_000);
    let second = v.put_block(a, data.clone()).await.unwrap();
    assert!(second.existed && second.stored_bytes == 0);
    assert_eq!(v.get_block(a).await.unwrap(), data);
}

#[tokio::test]
async fn points_list_resolve_verify() {
    let v = mem().await;
    let p1 = one_point(&v, "vm1", b"first").await;
    let p2 = one_point(&v, "vm1", b"second").await;
    one_point(&v, "vm2", b"other").await;
    let list = v.list_points(Some("vm1")).await.unwrap();
    assert_eq!(
        list.points.iter().map(|p| &p.id).collect::<Vec<_>>(),
        vec![&p1.id, &p2.id]
    );
    assert_eq!(v.resolve_point("vm1", "latest").await.unwrap(), p2);
    assert_eq!(v.resolve_point("vm1", &p1.id).await.unwrap(), p1);
    assert!(matches!(
        v.resolve_point("vm3", "latest").await,
        Err(Error::NoSuchPoint { .. })
    ));
    assert_eq!(
        v.vms().await.unwrap().into_iter().collect::<Vec<_>>(),
        vec![("vm1".into(), 2), ("vm2".into(), 1)]
    );
    let r = v.verify(None, &|_, _| {}).await.unwrap();
    assert!(r.is_ok(), "{:?}", r.problems);
    assert_eq!((r.points, r.manifests, r.blocks), (3, 3, 3));
}

#[tokio::test]
async fn committing_a_point_twice_is_refused() {
    let v = mem().await;
    let p = one_point(&v, "vm", b"x").await;
    assert!(matches!(
        v.commit_point(&p).await,
        Err(Error::PointExists { .. })
    ));
}

#[tokio::test]
async fn corrupt_and_missing_objects_are_named() {
    let v = mem().await;
    let p = one_point(&v, "vm", b"payload payload payload").await;
    let address = content_address(b"payload payload payload", None);
    let key = block_key(&address);
    // Flip a byte of the stored block.
    let mut raw = v
        .store
        .get(&key)
        .await
        .unwrap()
        .bytes()
        .await
        .unwrap()
        .to_vec();
    let last = raw.len() - 1;
    raw[last] ^= 0x40;
    v.store.put(&key, PutPayload::from(raw)).await.unwrap();
    let e = v.get_block(address).await.unwrap_err();
    assert!(e.to_string().contains(&key.to_string()), "{e}");
    let r = v.verify(Some("vm"), &|_, _| {}).await.unwrap();
    assert_eq!(r.problems.len(), 1);
    assert_eq!(r.problems[0].key, key.to_string());
    assert_eq!(r.problems[0].points, vec![format!("vm/{}", p.id)]);

    // Missing block.
    v.store.delete(&key).await.unwrap();
    let r = v.verify(Some("vm"), &|_, _| {}).await.unwrap();
    assert!(
        r.problems[0].message.contains("missing"),
        "{:?}",
        r.problems
    );
}

#[tokio::test]
async fn a_swapped_manifest_is_detected() {
    let v = mem().await;
    let p1 = one_point(&v, "vm", b"one").await;
    let p2 = one_point(&v, "vm", b"two").await;
    let k1 = manifest_key(&ManifestRef {
        vm: "vm",
        disk: "d0",
        point: &p1.id,
    });
    let k2 = manifest_key(&ManifestRef {
        vm: "vm",
        disk: "d0",
        point: &p2.id,
    });
    let b2 = v.store.get(&k2).await.unwrap().bytes().await.unwrap();
    v.store.put(&k1, PutPayload::from(b2)).await.unwrap();
    let e = v
        .get_manifest(
            &ManifestRef {
                vm: "vm",
                disk: "d0",
                point: &p1.id,
            },
            &p1.disks[0].manifest_digest,
        )
        .await
        .unwrap_err();
    assert!(e.to_string().contains("pinned"), "{e}");
}

#[tokio::test]
async fn local_locations() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("nope");
    let e = Vault::open(missing.to_str().unwrap()).await.unwrap_err();
    assert!(matches!(e, Error::NoVault { .. }), "{e}");
    assert!(e.to_string().contains("nope"), "{e}");

    let loc = dir.path().join("vault");
    let loc = loc.to_str().unwrap();
    let (v, created) = Vault::open_or_create(loc, &CreateOptions::default())
        .await
        .unwrap();
    assert!(created);
    assert!(matches!(
        Vault::create(loc, &CreateOptions::default()).await,
        Err(Error::VaultExists { .. })
    ));
    let (again, created) =
        Vault::open_or_create(&format!("file://{loc}"), &CreateOptions::default())
            .await
            .unwrap();
    assert!(!created);
    assert_eq!(again.config(), v.config());

    let e = Vault::open("ftp://x/y").await.unwrap_err();
    assert!(e.to_string().contains("unknown URL scheme"), "{e}");
}

#[tokio::test]
async fn unknown_vault_version_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let loc = dir.path().to_str().unwrap();
    Vault::create(loc, &CreateOptions::default()).await.unwrap();
    let cfg = dir.path().join(CONFIG_KEY);
    let mut v: serde_json::Value = serde_json::from_slice(&std::fs::read(&cfg).unwrap()).unwrap();
    v["version"] = 2.into();
    std::fs::write(&cfg, serde_json::to_vec(&v).unwrap()).unwrap();
    let e = Vault::open(loc).await.unwrap_err();
    assert!(
        matches!(e, Error::UnsupportedVaultVersion { found: 2, .. }),
        "{e}"
    );
}

#[tokio::test]
async fn bad_names_are_refused() {
    let v = mem().await;
    assert!(matches!(
        v.list_points(Some("../etc")).await,
        Err(Error::InvalidName { .. })
    ));
    assert!(matches!(
        v.get_point("vm", "a/b").await,
        Err(Error::InvalidName { .. })
    ));
}

#[tokio::test]
async fn leases_record_the_host_the_options_name() {
    use crate::lease::{Lease, LeaseKind, LeaseOptions, list_leases};
    let open = OpenOptions {
        host: Some("backup-host-7".into()),
        ..OpenOptions::default()
    };
    let v = Vault::create_store_with(
        Arc::new(object_store::memory::InMemory::new()),
        "memory:",
        &CreateOptions::default(),
        &open,
    )
    .await
    .unwrap();
    let lease = Lease::acquire(&v, LeaseKind::Backup, "job", &LeaseOptions::default())
        .await
        .unwrap();
    let leases = list_leases(&v).await.unwrap();
    let record = leases[0].1.as_ref().unwrap();
    assert_eq!(record.host, "backup-host-7");
    lease.release().await.unwrap();
}

#[test]
fn store_options_come_from_the_variables_given() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("store.env");
    std::fs::write(&file, "BULWARK_STORE_MAX_RETRIES=7\nAWS_REGION=file-wins\n").unwrap();
    let vars = [
        ("AWS_REGION", "from-vars"),
        ("HOME", "/root"),
        ("BULWARK_STORE_CONFIG", file.to_str().unwrap()),
    ]
    .map(|(k, v)| (k.to_string(), v.to_string()));
    let o = StoreOptions::from_vars(vars).unwrap();
    assert_eq!(o.max_retries, 7);
    assert_eq!(
        o.vars.get("AWS_REGION").map(String::as_str),
        Some("file-wins")
    );
    assert!(!o.vars.contains_key("HOME"));
    // Nothing given: defaults, whatever this process's environment holds.
    assert_eq!(
        StoreOptions::from_vars(Vec::new()).unwrap().max_retries,
        StoreOptions::default().max_retries
    );
}

/// A 1 MiB block of varied, compressible bytes.
fn block_text(seed: u64) -> Vec<u8> {
    let mut out = Vec::with_capacity((1 << 20) + 64);
    let mut i = 0u64;
    while out.len() < 1 << 20 {
        out.extend_from_slice(
            format!("{seed:>6} {i:>12} {:>20}\n", i.wrapping_mul(seed | 1)).as_bytes(),
        );
        i += 1;
    }
    out.truncate(1 << 20);
    out
}

/// Stores the 1 MiB text block of `seed`, then makes a copy changed by `edit`: the old
/// block's address, the new block and its address.
async fn stored_and_changed(
    v: &Vault,
    seed: u64,
    edit: impl FnOnce(&mut [u8]),
) -> (Address, Vec<u8>, Address) {
    let old = block_text(seed);
    let old_address = v.address_of(&old);
    v.put_block(old_address, Bytes::from(old.clone()))
        .await
        .unwrap();
    let mut new = old;
    edit(&mut new);
    let address = v.address_of(&new);
    (old_address, new, address)
}

async fn replace_one_span(v: &Vault) -> (PutBlock, Vec<u8>, Address) {
    // The first 128 KiB only.
    let (old_address, new, address) =
        stored_and_changed(v, 1, |b| b[10..20].copy_from_slice(b"0123456789")).await;
    let put = v
        .put_block_replacing(
            address,
            Bytes::from(new.clone()),
            Some(Replaced {
                address: old_address,
                // Out of order, and touching inside a frame (200 KiB): their union counts.
                untouched: vec![200 << 10..1 << 20, 128 << 10..200 << 10],
            }),
        )
        .await
        .unwrap();
    (put, new, address)
}

#[tokio::test]
async fn a_changed_block_reuses_the_untouched_frames_of_the_one_it_replaces() {
    for key in [None, Some(MasterKey::from_bytes([7; 32]))] {
        let open = OpenOptions {
            key: key.clone(),
            ..OpenOptions::default()
        };
        let create = CreateOptions::default();
        let store = Arc::new(object_store::memory::InMemory::new());
        let v = Vault::create_store_with(store, "memory:", &create, &open)
            .await
            .unwrap()
            .with_frame_reuse(true);
        let (put, new, address) = replace_one_span(&v).await;
        assert!(!put.existed, "encrypted: {}", key.is_some());
        assert_eq!(
            put.reused_bytes,
            7 << 17,
            "7 of the 8 frames, encrypted: {}",
            key.is_some()
        );
        assert_eq!(v.get_block(address).await.unwrap(), new);
    }
    // Off (an object store): the whole block is compressed, to the same bytes.
    let v = mem().await;
    let (put, new, address) = replace_one_span(&v).await;
    assert_eq!(put.reused_bytes, 0);
    assert_eq!(v.get_block(address).await.unwrap(), new);
}

#[tokio::test]
async fn a_local_vault_reuses_frames_by_default() {
    let dir = tempfile::tempdir().unwrap();
    let loc = dir.path().join("v");
    let loc = loc.to_str().unwrap();
    Vault::create(loc, &CreateOptions::default()).await.unwrap();
    let v = Vault::open(loc).await.unwrap();
    let (put, new, address) = replace_one_span(&v).await;
    assert_eq!(put.reused_bytes, 7 << 17);
    assert_eq!(v.get_block(address).await.unwrap(), new);
}

#[tokio::test]
async fn spans_tracking_does_not_vouch_for_are_taken_when_their_bytes_are_equal() {
    // Untouched spans, none of which covers a whole 128 KiB frame; no tracking at all; and no
    // replaced block (nothing is read).
    let partial: Vec<_> = (0..8u64)
        .map(|i| i * (128 << 10) + 4096..(i + 1) * (128 << 10) - 4096)
        .collect();
    for (untouched, reused, gets) in [
        (Some(partial), 7 << 17, 1),
        (Some(Vec::new()), 7 << 17, 1),
        (None, 0, 0),
    ] {
        let v = mem().await.with_frame_reuse(true);
        let (old_address, new, address) = stored_and_changed(&v, 2, |b| b[0] ^= 1).await;
        let before = v.store_stats();
        let replaced = untouched.clone().map(|untouched| Replaced {
            address: old_address,
            untouched,
        });
        let put = v
            .put_block_replacing(address, Bytes::from(new.clone()), replaced)
            .await
            .unwrap();
        assert_eq!(put.reused_bytes, reused, "untouched: {untouched:?}");
        assert_eq!(v.store_stats().since(&before).gets, gets, "{untouched:?}");
        assert_eq!(v.get_block(address).await.unwrap(), new);
    }
}
