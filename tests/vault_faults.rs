//! Storage faults: a backup through a store that fails or stalls one request in ten completes
//! and restores bit-exact; a store that goes down fails the job cleanly, leaves every committed
//! point whole, and the next job completes without re-uploading what was stored; the same with
//! a real Azurite server killed in the middle of a backup and restarted.
#![allow(clippy::unwrap_used)] // test helpers outside #[test] functions

mod vault_servers;

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bulwark_blockdiff::BlockSize;
use bulwark_controller::{
    BackupRequest, NoObserver, RestoreFrom, RestoreRequest, run_backup, run_restore,
};
use bulwark_snapshot::{ImageDisk, ImageSnapshotter};
use bulwark_vault::fault::{FaultConfig, FaultyStore};
use bulwark_vault::{CreateOptions, MasterKey, OpenOptions, RetryPolicy, StoreOptions, Vault};
use object_store::ObjectStore;
use vault_servers::{Backend, noise, server_var};

const BLOCK: usize = 64 << 10;

fn create_options() -> CreateOptions {
    CreateOptions {
        block_size: BlockSize::new(BLOCK as u32).unwrap(),
        zstd_level: Some(1),
    }
}

fn request(img: &Path) -> BackupRequest {
    let mut r = BackupRequest::new(
        "vm1",
        Arc::new(
            ImageSnapshotter::new(vec![
                ImageDisk::parse(&format!("os={}", img.display())).unwrap(),
            ])
            .unwrap(),
        ),
    );
    r.upload_concurrency = 8;
    r
}

async fn restored(vault: &Vault, point: &str, dir: &Path) -> Vec<u8> {
    let to = dir.join(format!("restore-{point}.img"));
    run_restore(
        RestoreRequest {
            vm: "vm1".into(),
            point: point.into(),
            disk: "os".into(),
            to: to.clone(),
            force: true,
            concurrency: 8,
            from: RestoreFrom::Vault,
            snapshots: None,
            observer: Arc::new(NoObserver),
        },
        vault,
    )
    .await
    .unwrap_or_else(|e| panic!("restore {point}: {e}"));
    std::fs::read(&to).unwrap()
}

fn ten_percent(seed: u64) -> FaultConfig {
    FaultConfig {
        error_rate: 0.04,
        lost_reply_rate: 0.03,
        timeout_rate: 0.03,
        timeout: Duration::from_millis(100),
        slow_rate: 0.05,
        slow: Duration::from_millis(20),
        truncated_list_rate: 0.2,
        ..FaultConfig::seeded(seed)
    }
}

/// Backups, restore and verify through a store failing 10% of requests.
async fn flaky_round(inner: Arc<dyn ObjectStore>, key: Option<MasterKey>, dir: &Path, seed: u64) {
    let faulty = Arc::new(FaultyStore::new(inner, ten_percent(seed)));
    let opts = OpenOptions {
        key,
        retry: RetryPolicy {
            attempts: 8,
            initial_backoff: Duration::from_millis(10),
            max_backoff: Duration::from_millis(200),
        },
        ..Default::default()
    };
    let vault = Vault::create_store_with(faulty.clone(), "faulty", &create_options(), &opts)
        .await
        .unwrap();
    let img = dir.join("disk.img");
    let mut data = noise(seed, 8 << 20);
    std::fs::write(&img, &data).unwrap();
    let r1 = run_backup(request(&img), &vault).await.unwrap();
    for i in 0..10 {
        let n = data.len();
        data[i * 700_001 % n] ^= 0x5A;
    }
    std::fs::write(&img, &data).unwrap();
    let r2 = run_backup(request(&img), &vault).await.unwrap();
    assert!(r2.disks[0].stats.blocks_uploaded <= 10);
    assert!(restored(&vault, &r2.point, dir).await == data);
    let rep = vault.verify(None, &|_, _| {}).await.unwrap();
    assert!(rep.is_ok(), "{:?}", rep.problems);
    assert_eq!(rep.points, 2);
    let f = faulty.stats();
    eprintln!(
        "faults injected: {f:?}; store requests: {:?}",
        vault.store_stats()
    );
    assert!(
        f.errors + f.timeouts + f.lost_replies >= f.requests / 20,
        "about 10% of requests fail: {f:?}"
    );
    assert!(
        f.lost_replies > 0 && f.timeouts > 0 && f.errors > 0,
        "{f:?}"
    );
    let _ = r1;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn ten_percent_faults_local_plain_and_encrypted() {
    for (seed, key) in [(11, None), (12, Some(MasterKey::generate()))] {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("v")).unwrap();
        let fs =
            object_store::local::LocalFileSystem::new_with_prefix(dir.path().join("v")).unwrap();
        flaky_round(Arc::new(fs), key, dir.path(), seed).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn ten_percent_faults_on_s3_and_azurite() {
    for backend in [Backend::S3, Backend::Azurite] {
        let Some(place) = vault_servers::place(backend, "faults") else {
            continue;
        };
        let store =
            bulwark_vault::location::open_store(&place.location, &place.options.store, false)
                .unwrap();
        flaky_round(store, None, place.dir.path(), 21).await;
    }
}

/// Storage goes down in the middle of a backup: the job fails (within bounded time), the
/// committed point stays whole, and the next job completes without re-uploading the blocks
/// that were stored before the outage.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn storage_down_fails_cleanly_and_next_job_resumes() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("v")).unwrap();
    let fs = object_store::local::LocalFileSystem::new_with_prefix(dir.path().join("v")).unwrap();
    let faulty = Arc::new(FaultyStore::new(fs, FaultConfig::seeded(5)));
    let opts = OpenOptions {
        retry: RetryPolicy {
            attempts: 3,
            initial_backoff: Duration::from_millis(10),
            max_backoff: Duration::from_millis(50),
        },
        ..Default::default()
    };
    let vault = Vault::create_store_with(faulty.clone(), "down", &create_options(), &opts)
        .await
        .unwrap();
    let img = dir.path().join("disk.img");
    let small = noise(1, 1 << 20);
    std::fs::write(&img, &small).unwrap();
    let r1 = run_backup(request(&img), &vault).await.unwrap();

    // A bigger disk; the store goes down once some of its blocks are stored.
    let data = noise(2, 16 << 20);
    std::fs::write(&img, &data).unwrap();
    let v = vault.clone();
    let req = request(&img);
    let job = tokio::spawn(async move { run_backup(req.clone(), &v).await });
    let start_puts = vault.store_stats().puts;
    let t = Instant::now();
    while vault.store_stats().puts < start_puts + 60 && t.elapsed() < Duration::from_secs(30) {
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    faulty.set_down(true);
    let t = Instant::now();
    let e = job.await.unwrap().unwrap_err();
    assert!(t.elapsed() < Duration::from_secs(20), "{:?}", t.elapsed());
    assert!(e.to_string().contains("store is down"), "{e}");
    faulty.set_down(false);

    // Nothing committed is broken; the failed job left no point.
    let rep = vault.verify(None, &|_, _| {}).await.unwrap();
    assert!(rep.is_ok(), "{:?}", rep.problems);
    assert_eq!(rep.points, 1);
    assert!(restored(&vault, &r1.point, dir.path()).await == small);

    let r3 = run_backup(request(&img), &vault).await.unwrap();
    let s = &r3.disks[0].stats;
    assert!(
        s.blocks_deduplicated >= 40,
        "blocks stored before the outage are not uploaded again: {s:?}"
    );
    assert_eq!(s.blocks_deduplicated + s.blocks_uploaded, 256, "{s:?}");
    assert!(restored(&vault, &r3.point, dir.path()).await == data);
}

struct Azurite {
    child: Child,
}

impl Drop for Azurite {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start_azurite(bin: &str, port: u16, data: &Path) -> Azurite {
    let child = Command::new(bin)
        .args([
            "--blobHost",
            "127.0.0.1",
            "--blobPort",
            &port.to_string(),
            "--location",
        ])
        .arg(data)
        .args(["--skipApiVersionCheck", "--loose", "--silent"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start azurite");
    let t = Instant::now();
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(
            t.elapsed() < Duration::from_secs(30),
            "azurite did not start"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    Azurite { child }
}

/// A real Azurite killed (SIGKILL) in the middle of a backup, then restarted on its data.
///
/// Azurite saves its metadata every 5 s (LokiJS autosave), so a SIGKILL loses the last
/// seconds of writes, as a real outage with a lagging replica would. The test therefore lets the
/// first point settle for 6 s, and slows the second backup (50 ms per request) so that it runs
/// long enough for its early blocks to be saved before the kill.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn azurite_killed_mid_backup_and_restarted() {
    let (Some(bin), Some(script)) = (
        server_var("BULWARK_TEST_AZURITE_BIN"),
        server_var("BULWARK_TEST_SERVERS_SH"),
    ) else {
        bulwark_tests::skip(
            "azurite_killed_mid_backup_and_restarted",
            bulwark_tests::Needs::Servers,
            "BULWARK_TEST_AZURITE_BIN not set (run `bash tests/servers.sh start`)",
        );
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let data_dir = dir.path().join("azurite");
    std::fs::create_dir(&data_dir).unwrap();
    let url = format!("http://127.0.0.1:{port}");
    let mut server = start_azurite(&bin, port, &data_dir);
    let ok = Command::new("bash")
        .args([&script, "azure-container", &url, "killtest"])
        .status()
        .unwrap();
    assert!(ok.success());

    let mut store = vault_servers::azurite_options(&url);
    store.max_retries = 1;
    store.connect_timeout = Duration::from_secs(2);
    store.request_timeout = Duration::from_secs(10);
    let opts = OpenOptions {
        store,
        key: Some(MasterKey::generate()),
        retry: RetryPolicy {
            attempts: 2,
            initial_backoff: Duration::from_millis(50),
            max_backoff: Duration::from_millis(100),
        },
        ..OpenOptions::default()
    };
    let location = "az://killtest/vault";
    let vault = Vault::create_with(location, &create_options(), &opts)
        .await
        .unwrap();
    let img = dir.path().join("disk.img");
    let small = noise(3, 1 << 20);
    std::fs::write(&img, &small).unwrap();
    let r1 = run_backup(request(&img), &vault).await.unwrap();
    tokio::time::sleep(Duration::from_secs(6)).await;

    let data = noise(4, 24 << 20);
    std::fs::write(&img, &data).unwrap();
    let raw = bulwark_vault::location::open_store(location, &opts.store, false).unwrap();
    let slow = Arc::new(FaultyStore::new(
        raw,
        FaultConfig {
            slow_rate: 1.0,
            slow: Duration::from_millis(50),
            ..FaultConfig::seeded(8)
        },
    ));
    let v = Vault::open_store_with(slow, location, &opts).await.unwrap();
    let mut req = request(&img);
    req.upload_concurrency = 4;
    let job = tokio::spawn(async move { run_backup(req.clone(), &v).await });
    // At least 384 × 2 requests × 50 ms / 4 = 9.6 s in all; Azurite saved its metadata at
    // least once in the first 5 s, so blocks stored in the 3 s before that are durable.
    tokio::time::sleep(Duration::from_secs(8)).await;
    assert!(
        !job.is_finished(),
        "the backup is still running when the server dies"
    );
    server.child.kill().unwrap(); // SIGKILL
    server.child.wait().unwrap();
    let t = Instant::now();
    let e = job.await.unwrap().unwrap_err();
    eprintln!(
        "backup with the server killed failed after {:?}: {e}",
        t.elapsed()
    );
    assert!(t.elapsed() < Duration::from_secs(30), "{:?}", t.elapsed());
    drop(server);

    let _server = start_azurite(&bin, port, &data_dir);
    let vault = Vault::open_with(location, &opts).await.unwrap();
    let rep = vault.verify(None, &|_, _| {}).await.unwrap();
    assert!(rep.is_ok(), "{:?}", rep.problems);
    assert_eq!(rep.points, 1, "the killed job committed nothing");
    assert!(restored(&vault, &r1.point, dir.path()).await == small);

    let r3 = run_backup(request(&img), &vault).await.unwrap();
    let s = &r3.disks[0].stats;
    eprintln!("after restart: {s:?}");
    assert!(
        s.blocks_deduplicated >= 20,
        "stored blocks are not uploaded again: {s:?}"
    );
    assert_eq!(s.blocks_deduplicated + s.blocks_uploaded, 384, "{s:?}");
    assert!(restored(&vault, &r3.point, dir.path()).await == data);
    let rep = vault.verify(None, &|_, _| {}).await.unwrap();
    assert!(rep.is_ok(), "{:?}", rep.problems);
    let _ = StoreOptions::default();
}
