//! Test vault locations on every backend: a local directory, Azurite and an S3-compatible
//! server started by `tests/servers.sh`. The servers' endpoints come from
//! `BULWARK_TEST_AZURITE_URL` / `BULWARK_TEST_S3_URL` (or, when unset, the env file
//! `target/test-servers.env` that `tests/servers.sh start` writes). Without them a test skips
//! with a message, unless `BULWARK_REQUIRE_SERVERS=1`, which makes it fail.
#![allow(dead_code)]

use std::time::{SystemTime, UNIX_EPOCH};

use bulwark_vault::{OpenOptions, StoreOptions};

/// The shared container and bucket that `tests/servers.sh` creates; each test works under a
/// prefix of its own inside it.
pub const TEST_BUCKET: &str = "bulwark-test";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Local,
    Azurite,
    S3,
}

impl Backend {
    pub const ALL: [Backend; 3] = [Backend::Local, Backend::Azurite, Backend::S3];

    fn var(self) -> &'static str {
        match self {
            Backend::Local => "",
            Backend::Azurite => "BULWARK_TEST_AZURITE_URL",
            Backend::S3 => "BULWARK_TEST_S3_URL",
        }
    }
}

/// A variable from the environment, or from the env file `tests/servers.sh` writes.
pub fn server_var(name: &str) -> Option<String> {
    if let Ok(v) = std::env::var(name)
        && !v.is_empty()
    {
        return Some(v);
    }
    let file = std::env::var("BULWARK_TEST_SERVERS_ENV")
        .unwrap_or_else(|_| format!("{}/target/test-servers.env", env!("CARGO_MANIFEST_DIR")));
    let text = std::fs::read_to_string(file).ok()?;
    text.lines()
        .filter_map(|l| l.split_once('='))
        .find(|(k, _)| k.trim() == name)
        .map(|(_, v)| v.trim().to_string())
        .filter(|v| !v.is_empty())
}

/// The endpoint of `backend`'s server, or `None` after printing why the test skips (panics
/// instead when servers are required).
pub fn endpoint(backend: Backend, test: &str) -> Option<String> {
    match server_var(backend.var()) {
        Some(u) => Some(u),
        None => {
            bulwark_tests::skip(
                &format!("{test} on {backend:?}"),
                bulwark_tests::Needs::Servers,
                &format!(
                    "{} not set (run `bash tests/servers.sh start`)",
                    backend.var()
                ),
            );
            None
        }
    }
}

/// A fresh, unique name part.
pub fn unique(test: &str) -> String {
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    format!("{test}-{nanos:x}-{:08x}", rand::random::<u32>())
}

pub fn azurite_options(url: &str) -> StoreOptions {
    StoreOptions::default()
        .with_var("AZURE_STORAGE_USE_EMULATOR", "true")
        .with_var("AZURITE_BLOB_STORAGE_URL", url)
}

pub fn s3_options(url: &str) -> StoreOptions {
    StoreOptions::default()
        .with_var("AWS_ENDPOINT_URL", url)
        .with_var("AWS_ACCESS_KEY_ID", "test")
        .with_var("AWS_SECRET_ACCESS_KEY", "test")
        .with_var("AWS_REGION", "us-east-1")
        .with_var("AWS_ALLOW_HTTP", "true")
}

/// A vault location of its own on `backend`.
#[derive(Debug)]
pub struct Place {
    pub backend: Backend,
    pub location: String,
    pub options: OpenOptions,
    pub dir: tempfile::TempDir,
}

impl Place {
    /// `bulwark-controller ARGS` with this place's store settings (the server's endpoint and
    /// credentials) in its environment and no inherited `BULWARK_VAULT`.
    pub fn controller(&self, args: &[&str]) -> std::process::Command {
        let mut c = std::process::Command::new(bulwark_tests::controller_bin());
        c.args(args).env_remove("BULWARK_VAULT");
        for (k, v) in &self.options.store.vars {
            c.env(k, v);
        }
        c
    }

    /// The arguments of `backup --vault THIS --vm VM --disk DISK --snapshot copy
    /// --snapshot-dir SNAPS`, then `extra`.
    pub fn copy_backup_args<'a>(
        &'a self,
        vm: &'a str,
        disk: &'a str,
        snaps: &'a str,
        extra: &[&'a str],
    ) -> Vec<&'a str> {
        let mut args = vec![
            "backup",
            "--vault",
            self.location.as_str(),
            "--vm",
            vm,
            "--disk",
            disk,
            "--snapshot",
            "copy",
            "--snapshot-dir",
            snaps,
        ];
        args.extend(extra);
        args
    }
}

/// A new, empty place for a vault on `backend` (`None`: skip).
pub fn place(backend: Backend, test: &str) -> Option<Place> {
    let dir = tempfile::tempdir().expect("tempdir");
    let name = unique(test);
    let (location, store) = match backend {
        Backend::Local => (
            dir.path().join("vault").to_string_lossy().into_owned(),
            StoreOptions::default(),
        ),
        Backend::Azurite => {
            let url = endpoint(backend, test)?;
            (format!("az://{TEST_BUCKET}/{name}"), azurite_options(&url))
        }
        Backend::S3 => {
            let url = endpoint(backend, test)?;
            (format!("s3://{TEST_BUCKET}/{name}"), s3_options(&url))
        }
    };
    Some(Place {
        backend,
        location,
        options: OpenOptions {
            store,
            ..Default::default()
        },
        dir,
    })
}

/// Deterministic pseudo-random bytes.
pub fn noise(seed: u64, len: usize) -> Vec<u8> {
    let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            (s >> 24) as u8
        })
        .collect()
}

/// A new bucket of its own on the test S3 server, with Object Lock enabled when
/// `object_lock`, and a vault location inside it (`None`: skip).
pub async fn s3_bucket_place(test: &str, object_lock: bool) -> Option<Place> {
    let url = endpoint(Backend::S3, test)?;
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    // Bucket names: lower case, digits and '-', at most 63 characters.
    let bucket = format!("bw-{:x}-{:08x}", nanos, rand::random::<u32>());
    let store = s3_options(&url);
    bulwark_vault::immutable::ObjectLockClient::for_location(&format!("s3://{bucket}"), &store)
        .unwrap_or_else(|e| panic!("{test}: client: {e}"))
        .create_bucket(object_lock)
        .await
        .unwrap_or_else(|e| panic!("{test}: create bucket {bucket}: {e}"));
    Some(Place {
        backend: Backend::S3,
        location: format!("s3://{bucket}/vault"),
        options: OpenOptions {
            store,
            ..Default::default()
        },
        dir: tempfile::tempdir().expect("tempdir"),
    })
}
