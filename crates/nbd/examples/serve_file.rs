//! Serves a file read-only over NBD on a Unix socket until Ctrl-C (for measuring the server with
//! real clients).
//!
//! ```sh
//! cargo run --release -p bulwark-nbd --example serve_file -- disk.raw /tmp/s.sock disk &
//! time nbdcopy --connections=4 'nbd+unix:///disk?socket=/tmp/s.sock' /tmp/copy.raw
//! ```
#![allow(clippy::unwrap_used)]

use std::os::unix::fs::FileExt;
use std::sync::Arc;

use bulwark_nbd::{Address, Backend, Piece, Server, ServerOptions};

#[derive(Debug)]
struct FileBackend {
    file: Arc<std::fs::File>,
    size: u64,
}

#[bulwark_nbd::async_trait]
impl Backend for FileBackend {
    fn size(&self) -> u64 {
        self.size
    }
    async fn read(&self, offset: u64, len: u32) -> std::io::Result<Vec<Piece>> {
        let file = self.file.clone();
        let data = tokio::task::spawn_blocking(move || {
            let mut buf = vec![0u8; len as usize];
            file.read_exact_at(&mut buf, offset).map(|()| buf)
        })
        .await??;
        Ok(vec![Piece::Data(data.into())])
    }
}

#[tokio::main]
async fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.len() != 4 {
        eprintln!("usage: serve_file FILE SOCKET EXPORT");
        std::process::exit(2);
    }
    let file = std::fs::File::open(&args[1]).unwrap();
    let size = file.metadata().unwrap().len();
    let backend = Arc::new(FileBackend {
        file: Arc::new(file),
        size,
    });
    let server = Server::bind(
        &Address::Unix(args[2].clone().into()),
        backend,
        ServerOptions::new(args[3].clone()),
    )
    .await
    .unwrap();
    let stop = server.shutdown_handle();
    tokio::spawn(async move {
        let _ = tokio::signal::ctrl_c().await;
        stop.shutdown();
    });
    server.run().await.unwrap();
}
