use std::sync::Arc;

use bulwark_blockdiff::{BlockSize, MIN_BLOCK_SIZE};
use bulwark_vault::CreateOptions;
use object_store::ObjectStoreExt;
use object_store::memory::InMemory;
use object_store::path::Path as ObjPath;

use super::*;

const BS: u64 = MIN_BLOCK_SIZE as u64;

fn pattern(index: u64) -> Vec<u8> {
    (0..BS)
        .map(|i| (i as u8) ^ (index as u8).wrapping_mul(31) ^ 0x5A)
        .collect()
}

/// A vault holding a disk of `blocks` blocks whose even blocks are data and odd ones zero.
async fn disk(blocks: u64, options: DiskOptions) -> (PointDisk, Arc<InMemory>, Vec<Address>) {
    let store = Arc::new(InMemory::new());
    let vault = Vault::create_store(store.clone(), "memory:", &CreateOptions::default())
        .await
        .unwrap();
    let mut entries = Vec::new();
    let mut addresses = Vec::new();
    for i in 0..blocks {
        if i % 2 == 1 {
            entries.push(Entry::Zero);
            continue;
        }
        let data = pattern(i);
        let address = vault.address_of(&data);
        vault.put_block(address, data.into()).await.unwrap();
        entries.push(Entry::Data { change: 0, address });
        addresses.push(address);
    }
    let map = BlockMap::new(
        BlockSize::new(MIN_BLOCK_SIZE).unwrap(),
        blocks * BS,
        entries,
    )
    .unwrap();
    (
        PointDisk::from_map(vault, map, "t".into(), options),
        store,
        addresses,
    )
}

use bulwark_blockdiff::Address;

fn expected(offset: u64, len: u64) -> Vec<u8> {
    let mut out = Vec::with_capacity(len as usize);
    let mut o = offset;
    while o < offset + len {
        let i = o / BS;
        let end = ((i + 1) * BS).min(offset + len);
        if i % 2 == 1 {
            out.resize(out.len() + (end - o) as usize, 0);
        } else {
            out.extend_from_slice(&pattern(i)[(o % BS) as usize..(end - i * BS) as usize]);
        }
        o = end;
    }
    out
}

fn no_readahead() -> DiskOptions {
    DiskOptions {
        readahead_blocks: 0,
        ..DiskOptions::default()
    }
}

#[tokio::test]
async fn reads_across_blocks_and_zero_blocks_fetch_nothing() {
    let (d, _, _) = disk(6, no_readahead()).await;
    let got = d.read(BS - 10, (BS * 3) as usize).await.unwrap();
    assert_eq!(got, expected(BS - 10, BS * 3));
    let s = d.stats();
    assert_eq!(s.blocks_fetched, 2, "{s:?}"); // blocks 0 and 2; 1 and 3 are zero
    assert_eq!(s.bytes_fetched, 2 * BS);
    assert_eq!(s.zero_blocks, 2);
    // Only zero blocks: nothing fetched.
    let z = d.read(5 * BS, 100).await.unwrap();
    assert!(z.iter().all(|b| *b == 0));
    assert_eq!(d.stats().blocks_fetched, 2);
    // Again: from the cache.
    d.read(0, 10).await.unwrap();
    assert_eq!(d.stats().blocks_fetched, 2);
    assert_eq!(d.stats().cache_hits, 1);
}

#[tokio::test]
async fn reads_past_the_end_are_refused() {
    let (d, _, _) = disk(2, no_readahead()).await;
    assert!(matches!(
        d.read(2 * BS - 1, 2).await,
        Err(Error::ReadPastEnd { .. })
    ));
    assert!(matches!(
        d.read(u64::MAX, 2).await,
        Err(Error::ReadPastEnd { .. })
    ));
    assert!(d.read(2 * BS, 0).await.is_ok());
}

#[tokio::test]
async fn the_cache_stays_within_its_bound() {
    let opts = DiskOptions {
        cache_bytes: 3 * BS,
        readahead_blocks: 0,
        concurrency: 4,
    };
    let (d, _, _) = disk(40, opts).await;
    let all = d.read(0, (40 * BS) as usize).await.unwrap();
    assert_eq!(all, expected(0, 40 * BS));
    assert!(d.cached_bytes() <= 3 * BS, "{}", d.cached_bytes());
    assert_eq!(d.stats().blocks_fetched, 20);
    // The last block read is still cached; the first is not.
    d.read(38 * BS, 1).await.unwrap();
    assert_eq!(d.stats().blocks_fetched, 20);
    d.read(0, 1).await.unwrap();
    assert_eq!(d.stats().blocks_fetched, 21);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_readers_of_one_block_share_one_fetch() {
    let (d, _, _) = disk(2, no_readahead()).await;
    let mut tasks = Vec::new();
    for i in 0..16u64 {
        let d = d.clone();
        tasks.push(tokio::spawn(async move { d.read(i * 100, 50).await }));
    }
    for t in tasks {
        t.await.unwrap().unwrap();
    }
    assert_eq!(d.stats().blocks_fetched, 1);
}

#[tokio::test]
async fn a_block_that_does_not_match_its_address_is_an_error() {
    let (d, store, addresses) = disk(4, no_readahead()).await;
    let key = |a: &Address| {
        let h = a.to_hex();
        ObjPath::from(format!("blocks/{}/{h}", &h[..2]))
    };
    // Block 2's stored object under block 0's key.
    let other = store
        .get(&key(&addresses[1]))
        .await
        .unwrap()
        .bytes()
        .await
        .unwrap();
    store.put(&key(&addresses[0]), other.into()).await.unwrap();
    let err = d.read(0, 10).await.unwrap_err();
    assert!(err.to_string().contains("another address"), "{err}");
    // The good block still reads.
    assert_eq!(d.read(2 * BS, 10).await.unwrap(), expected(2 * BS, 10));
}

#[tokio::test]
async fn sequential_readers_get_blocks_fetched_ahead() {
    let opts = DiskOptions {
        readahead_blocks: 4,
        ..DiskOptions::default()
    };
    let (d, _, _) = disk(20, opts).await;
    d.read(0, 4096).await.unwrap();
    d.read(4096, 4096).await.unwrap(); // sequential: blocks 1..=4 are fetched ahead
    for _ in 0..100 {
        if d.stats().readahead_blocks >= 2 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    assert_eq!(d.stats().readahead_blocks, 2, "{:?}", d.stats()); // blocks 2 and 4 hold data
    let before = d.stats().blocks_fetched;
    d.read(2 * BS, 10).await.unwrap();
    assert_eq!(
        d.stats().blocks_fetched,
        before,
        "block 2 came from the read-ahead"
    );
}

#[tokio::test]
async fn extents_merge_runs_and_respect_the_limit() {
    let (d, _, _) = disk(6, no_readahead()).await;
    let e = d.extents(10, 3 * BS, 16);
    assert_eq!(e.len(), 4);
    assert_eq!(
        e[0],
        Extent {
            offset: 10,
            len: BS - 10,
            zero: false
        }
    );
    assert_eq!(
        e[1],
        Extent {
            offset: BS,
            len: BS,
            zero: true
        }
    );
    assert_eq!(e[3].offset + e[3].len, 3 * BS + 10);
    assert_eq!(d.extents(0, u64::MAX, 2).len(), 2);
    assert!(d.extents(6 * BS, 10, 4).is_empty());
}
