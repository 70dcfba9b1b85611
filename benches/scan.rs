//! The block-diff engine on an unchanged disk: how fast `scan` compares a disk with its
//! previous block map (read from the page cache + XXH3-128 per block), with one worker (per
//! core) and with the default parallelism, beside raw XXH3 speed over the same bytes.
//! Also a first scan (every block changed: BLAKE3 addresses).
//!
//! `cargo bench --bench scan`. The disk is a 256 MiB file of random data in a temporary
//! directory (set BULWARK_BENCH_DIR to put it elsewhere), just written, so in the page cache:
//! the `cached` variants read buffered from it (the engine's own speed), the `direct` ones
//! with O_DIRECT from the device, as a backup reads a fresh snapshot.

use std::hint::black_box;
use std::sync::Arc;
use std::time::Duration;

use bulwark_blockdiff::{
    BlockEvent, BlockMap, BlockMapBuilder, BlockSize, BlockSource, Disk, ScanOptions, scan,
};
use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use futures::StreamExt;

const DISK: usize = 256 << 20;

fn random_bytes(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        out.extend_from_slice(&x.wrapping_mul(0x2545_f491_4f6c_dd1d).to_le_bytes());
    }
    out.truncate(len);
    out
}

async fn run(disk: &Disk, prev: Option<Arc<BlockMap>>, options: &ScanOptions) -> BlockMap {
    let source: Arc<dyn BlockSource> = Arc::new(disk.clone());
    let mut map = BlockMapBuilder::new(options.block_size, disk.size(), prev.clone());
    let mut events = std::pin::pin!(scan(source, prev, options));
    let mut changed = 0u64;
    while let Some(e) = events.next().await {
        let e = e.expect("scan");
        if matches!(e, BlockEvent::Changed { .. }) {
            changed += 1;
        }
        map.push_event(&e).expect("in order");
    }
    black_box(changed);
    map.finish().expect("map")
}

fn scan_unchanged(c: &mut Criterion) {
    let base = std::env::var_os("BULWARK_BENCH_DIR").map(std::path::PathBuf::from);
    let dir = match &base {
        Some(b) => tempfile::tempdir_in(b),
        None => tempfile::tempdir(),
    }
    .expect("tempdir");
    let path = dir.path().join("disk.img");
    let data = random_bytes(DISK, 9);
    std::fs::write(&path, &data).expect("write disk");
    let disk = Disk::open(&path).expect("open");
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");

    let mut g = c.benchmark_group("scan");
    g.throughput(Throughput::Bytes(DISK as u64));
    g.bench_function("raw_xxh3_128_1MiB_blocks_1core", |b| {
        b.iter(|| {
            for chunk in data.chunks(1 << 20) {
                black_box(xxhash_rust::xxh3::xxh3_128_with_seed(chunk, 42));
            }
        })
    });
    for bs in [1u32 << 20, 4 << 20] {
        let block_size = BlockSize::new(bs).expect("block size");
        let label = format!("{}MiB", bs >> 20);
        let all = ScanOptions {
            block_size,
            change_seed: 42,
            ..ScanOptions::default()
        };
        let first = rt.block_on(run(&disk, None, &all));
        let prev = Arc::new(first);
        // Buffered: from the page cache (the file was just written), the engine's own speed.
        // Direct (the default, what a backup of a fresh snapshot does): from the device.
        for (name, parallelism, direct_io) in [
            ("1_worker_cached", 1, false),
            ("default_cached", all.parallelism, false),
            ("1_worker_direct", 1, true),
            ("default_direct", all.parallelism, true),
        ] {
            let opts = ScanOptions {
                parallelism,
                ..all.clone()
            };
            let disk = disk.clone().with_direct_io(direct_io);
            g.bench_function(BenchmarkId::new(format!("unchanged_{name}"), &label), |b| {
                b.iter(|| rt.block_on(run(&disk, Some(prev.clone()), &opts)))
            });
        }
        g.bench_function(BenchmarkId::new("first_full_default", &label), |b| {
            b.iter(|| rt.block_on(run(&disk, None, &all)))
        });
    }
    g.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .sample_size(10)
        .warm_up_time(Duration::from_millis(300))
        .measurement_time(Duration::from_secs(2));
    targets = scan_unchanged
}
criterion_main!(benches);
