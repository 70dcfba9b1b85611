//! The vault write path: `put_block` of new 1 MiB blocks into a local directory vault, as a
//! backup does (16 at once): the production local store (blocks staged without fsync and
//! published in batches with syncfs, see crates/vault/src/local_sync.rs), the former store
//! (`LocalFileSystem` with an fsync per object and directory), no fsync at all (the lower
//! bound) and the in-memory store (compression and hashing only). Also the dedup hit.
//!
//! `cargo bench --bench vault_write`. The vault lives in a temporary directory (set
//! BULWARK_BENCH_DIR to put it on another file system, e.g. the XFS datastore).

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bulwark_vault::{CreateOptions, Vault};
use bytes::Bytes;
use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use futures::StreamExt;

const BLOCK: usize = 1 << 20;
const BATCH: u64 = 32;

fn block(seed: u64) -> Bytes {
    // Half compressible, half random: about what a used guest block looks like.
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    let mut out = Vec::with_capacity(BLOCK);
    while out.len() < BLOCK / 2 {
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        out.extend_from_slice(&x.wrapping_mul(0x2545_f491_4f6c_dd1d).to_le_bytes());
    }
    while out.len() < BLOCK {
        out.extend_from_slice(b"usr/share/doc/bulwark/README ");
    }
    out.truncate(BLOCK);
    Bytes::from(out)
}

fn blocks(seeds: std::ops::Range<u64>) -> Vec<(bulwark_blockdiff::Address, Bytes)> {
    seeds
        .map(|s| {
            let b = block(s);
            (bulwark_blockdiff::content_address(&b, None), b)
        })
        .collect()
}

fn put_many(
    rt: &tokio::runtime::Runtime,
    vault: &Vault,
    blocks: Vec<(bulwark_blockdiff::Address, Bytes)>,
) {
    rt.block_on(async {
        let mut s = std::pin::pin!(
            futures::stream::iter(blocks)
                .map(|(a, b)| vault.put_block(a, b))
                .buffer_unordered(16)
        );
        while let Some(r) = s.next().await {
            r.expect("put_block");
        }
    });
}

fn vault_write(c: &mut Criterion) {
    let base = std::env::var_os("BULWARK_BENCH_DIR").map(std::path::PathBuf::from);
    let tmp = || {
        match &base {
            Some(b) => tempfile::tempdir_in(b),
            None => tempfile::tempdir(),
        }
        .expect("tempdir")
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let opts = CreateOptions::default();

    let d1 = tmp();
    let fsync_vault = rt
        .block_on(Vault::create(d1.path().to_str().expect("utf-8"), &opts))
        .expect("vault");
    let d0 = tmp();
    let each = object_store::local::LocalFileSystem::new_with_prefix(d0.path())
        .expect("store")
        .with_fsync(true);
    let each_vault = rt
        .block_on(Vault::create_store(Arc::new(each), "fsync-each", &opts))
        .expect("vault");
    let d2 = tmp();
    let store = object_store::local::LocalFileSystem::new_with_prefix(d2.path()).expect("store");
    let nosync_vault = rt
        .block_on(Vault::create_store(Arc::new(store), "nosync", &opts))
        .expect("vault");
    let mem_vault = rt.block_on(Vault::create("memory:", &opts)).expect("vault");

    let seed = AtomicU64::new(1 << 32);
    let mut g = c.benchmark_group("put_block");
    g.throughput(Throughput::Bytes(BATCH * BLOCK as u64));
    for (name, vault) in [
        ("local_vault", &fsync_vault),
        ("local_fsync_each_object", &each_vault),
        ("local_no_fsync", &nosync_vault),
        ("memory", &mem_vault),
    ] {
        g.bench_function(format!("{name}_new_1MiB_x{BATCH}"), |b| {
            b.iter_custom(|iters| {
                let mut total = Duration::ZERO;
                for _ in 0..iters {
                    let s = seed.fetch_add(BATCH, Ordering::Relaxed);
                    let batch = blocks(s..s + BATCH);
                    let start = Instant::now();
                    put_many(&rt, vault, batch);
                    total += start.elapsed();
                }
                total
            })
        });
    }
    g.bench_function(format!("local_vault_existing_1MiB_x{BATCH}"), |b| {
        let existing = blocks(0..BATCH);
        put_many(&rt, &fsync_vault, existing.clone());
        b.iter(|| put_many(&rt, &fsync_vault, existing.clone()))
    });
    g.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .sample_size(10)
        .warm_up_time(Duration::from_millis(300))
        .measurement_time(Duration::from_secs(3));
    targets = vault_write
}
criterion_main!(benches);
