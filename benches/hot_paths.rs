//! Criterion benches of Bulwark's CPU hot paths: block hashing (XXH3-128 against BLAKE3 per
//! block size), zero detection, and zstd compression of compressible and random blocks.
//!
//! `cargo bench --bench hot_paths`. Short by design (10 samples, ~1 s each): numbers on a
//! shared machine are noisy; see BENCHMARKS.md.

use std::hint::black_box;
use std::time::Duration;

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};

/// Deterministic incompressible bytes (xorshift64*).
pub fn random_bytes(len: usize, seed: u64) -> Vec<u8> {
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

/// Compressible bytes: text-like, what system files look like to zstd level 1 (about 3:1).
pub fn compressible_bytes(len: usize, seed: u64) -> Vec<u8> {
    let words: Vec<&[u8]> = [
        "the ",
        "block ",
        "vault ",
        "disk ",
        "point ",
        "0x7f45 ",
        "ELF ",
        "lib",
        "usr/share/",
        "\n",
        "manifest ",
        "snapshot ",
        "config=",
        "{\"id\": ",
        "00000000 ",
        "return ",
        "static ",
    ]
    .iter()
    .map(|w| w.as_bytes())
    .collect();
    let noise = random_bytes(len, seed);
    let mut out = Vec::with_capacity(len + 16);
    let mut i = 0;
    while out.len() < len {
        let r = noise[i % len] as usize;
        if r < 24 {
            out.push(noise[(i * 7) % len]); // a little entropy
        } else {
            out.extend_from_slice(words[r % words.len()]);
        }
        i += 1;
    }
    out.truncate(len);
    out
}

fn config() -> Criterion {
    Criterion::default()
        .sample_size(10)
        .warm_up_time(Duration::from_millis(300))
        .measurement_time(Duration::from_secs(1))
}

fn hashing(c: &mut Criterion) {
    let mut g = c.benchmark_group("hash");
    for size in [64 << 10, 1 << 20, 4 << 20] {
        let data = random_bytes(size, 1);
        g.throughput(Throughput::Bytes(size as u64));
        let label = format!("{}KiB", size >> 10);
        g.bench_with_input(BenchmarkId::new("xxh3_128", &label), &data, |b, d| {
            b.iter(|| xxhash_rust::xxh3::xxh3_128_with_seed(black_box(d), 42))
        });
        g.bench_with_input(BenchmarkId::new("blake3", &label), &data, |b, d| {
            b.iter(|| blake3::hash(black_box(d)))
        });
        g.bench_with_input(BenchmarkId::new("blake3_keyed", &label), &data, |b, d| {
            b.iter(|| blake3::keyed_hash(&[7; 32], black_box(d)))
        });
    }
    g.finish();
}

fn zero_detection(c: &mut Criterion) {
    let mut g = c.benchmark_group("is_zero");
    let size = 1 << 20;
    g.throughput(Throughput::Bytes(size as u64));
    let zeros = vec![0u8; size];
    g.bench_function("1MiB_all_zero", |b| {
        b.iter(|| bulwark_blockdiff::is_zero(black_box(&zeros)))
    });
    let mut last = vec![0u8; size];
    last[size - 1] = 1;
    g.bench_function("1MiB_last_byte_set", |b| {
        b.iter(|| bulwark_blockdiff::is_zero(black_box(&last)))
    });
    g.finish();
}

fn compression(c: &mut Criterion) {
    let mut g = c.benchmark_group("zstd");
    let size = 1 << 20;
    g.throughput(Throughput::Bytes(size as u64));
    let inputs = [
        ("compressible", compressible_bytes(size, 3)),
        ("random", random_bytes(size, 4)),
    ];
    for (name, data) in &inputs {
        for level in [1, 3] {
            let ratio = zstd::bulk::compress(data, level)
                .map_or(0.0, |c| data.len() as f64 / c.len() as f64);
            eprintln!("zstd level {level} on 1 MiB {name}: ratio {ratio:.2}");
            let mut comp = zstd::bulk::Compressor::new(level).expect("compressor");
            g.bench_function(BenchmarkId::new(format!("level{level}"), name), |b| {
                b.iter(|| comp.compress(black_box(data)).expect("compress"))
            });
        }
        let sealed = bulwark_vault::envelope::seal(
            bulwark_vault::envelope::Kind::Block,
            data,
            Some(1),
            None,
        );
        g.bench_function(BenchmarkId::new("envelope_seal_level1", name), |b| {
            b.iter(|| {
                bulwark_vault::envelope::seal(
                    bulwark_vault::envelope::Kind::Block,
                    black_box(data),
                    Some(1),
                    Some(sealed.digest),
                )
            })
        });
        g.bench_function(BenchmarkId::new("envelope_open_verify", name), |b| {
            b.iter(|| {
                bulwark_vault::envelope::open(
                    bulwark_vault::envelope::Kind::Block,
                    "k",
                    black_box(&sealed.bytes),
                )
                .expect("open")
            })
        });
    }
    g.finish();
}

criterion_group! {
    name = benches;
    config = config();
    targets = hashing, zero_detection, compression
}
criterion_main!(benches);
