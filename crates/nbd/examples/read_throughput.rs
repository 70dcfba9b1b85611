//! Reads a whole NBD export with several threads sharing one [`Client`] and prints MB/s.
//!
//! ```sh
//! qemu-nbd --read-only --persistent --shared=8 -k /tmp/t.sock -x disk -f raw disk.raw &
//! cargo run --release -p bulwark-nbd --example read_throughput -- /tmp/t.sock disk 4 4 1048576
//! ```
//! Arguments: socket, export, connections, threads, bytes per read.
#![allow(clippy::unwrap_used)]

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use bulwark_nbd::{Address, Client, ClientOptions};

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.len() != 6 {
        eprintln!("usage: read_throughput SOCKET EXPORT CONNECTIONS THREADS READ_SIZE");
        std::process::exit(2);
    }
    let connections: usize = args[3].parse().unwrap();
    let threads: u64 = args[4].parse().unwrap();
    let read_size: u64 = args[5].parse().unwrap();
    let client = Arc::new(
        Client::connect(
            Address::Unix(args[1].clone().into()),
            ClientOptions::new(args[2].clone()).connections(connections),
        )
        .unwrap(),
    );
    let size = client.size();
    let next = Arc::new(AtomicU64::new(0));
    let start = Instant::now();
    let handles: Vec<_> = (0..threads)
        .map(|_| {
            let (client, next) = (client.clone(), next.clone());
            std::thread::spawn(move || {
                let mut buf = vec![0u8; read_size as usize];
                let mut checksum = 0u64;
                loop {
                    let at = next.fetch_add(read_size, Ordering::Relaxed);
                    if at >= size {
                        return checksum;
                    }
                    let n = read_size.min(size - at) as usize;
                    client.read(at, &mut buf[..n]).unwrap();
                    checksum = checksum.wrapping_add(u64::from(buf[0]));
                }
            })
        })
        .collect();
    let checksum: u64 = handles.into_iter().map(|h| h.join().unwrap()).sum();
    let secs = start.elapsed().as_secs_f64();
    println!(
        "read {size} bytes in {secs:.3} s: {:.0} MB/s (connections {connections}, threads {threads}, read size {read_size}, checksum {checksum})",
        size as f64 / secs / 1e6
    );
}
