//! Bad vault locations are clear errors within seconds, never hangs: an unknown URL scheme,
//! missing credentials, an unreachable endpoint (a closed loopback port), a bucket or container
//! that does not exist. Plus: a prefix inside a bucket is a vault of its own.
#![allow(clippy::unwrap_used)] // test helpers outside #[test] functions

mod vault_servers;

use std::time::{Duration, Instant};

use bulwark_vault::{CreateOptions, Error, OpenOptions, StoreOptions, Vault};
use vault_servers::{Backend, azurite_options, endpoint, s3_options, unique};

const LIMIT: Duration = Duration::from_secs(20);

fn closed_port() -> u16 {
    // Bind, read the port, close: nothing listens there afterwards.
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn opts(store: StoreOptions) -> OpenOptions {
    OpenOptions {
        store,
        ..Default::default()
    }
}

async fn timed<T>(f: impl std::future::Future<Output = T>) -> T {
    let t = Instant::now();
    let r = tokio::time::timeout(LIMIT * 2, f).await.expect("hangs");
    assert!(t.elapsed() < LIMIT, "took {:?}", t.elapsed());
    r
}

#[tokio::test]
async fn unknown_scheme_and_bad_names() {
    for (loc, want) in [
        ("gs://bucket/x", "unknown URL scheme \"gs\""),
        ("ftp://host/x", "unknown URL scheme \"ftp\""),
        ("s3://", "no bucket name"),
        ("az://Upper/x", "container name"),
    ] {
        let e = timed(Vault::open_with(loc, &OpenOptions::default()))
            .await
            .unwrap_err();
        assert!(matches!(e, Error::UnsupportedLocation { .. }), "{loc}: {e}");
        assert!(e.to_string().contains(want), "{loc}: {e}");
    }
}

#[tokio::test]
async fn missing_credentials() {
    for loc in ["az://c/p", "azure://c", "s3://b/p"] {
        let e = timed(Vault::open_with(loc, &OpenOptions::default()))
            .await
            .unwrap_err();
        assert!(matches!(e, Error::MissingCredentials { .. }), "{loc}: {e}");
        let e = timed(Vault::create_with(
            loc,
            &CreateOptions::default(),
            &OpenOptions::default(),
        ))
        .await
        .unwrap_err();
        assert!(matches!(e, Error::MissingCredentials { .. }), "{loc}: {e}");
    }
    let e = timed(Vault::open_with(
        "s3://b",
        &opts(StoreOptions::default().with_var("AWS_ACCESS_KEY_ID", "only-the-id")),
    ))
    .await
    .unwrap_err();
    assert!(e.to_string().contains("AWS_SECRET_ACCESS_KEY"), "{e}");
}

#[tokio::test]
async fn unreachable_endpoint_fails_fast() {
    let url = format!("http://127.0.0.1:{}", closed_port());
    for (loc, store) in [
        ("s3://bucket/p", s3_options(&url)),
        ("az://container/p", azurite_options(&url)),
    ] {
        let e = timed(Vault::open_with(loc, &opts(store.clone())))
            .await
            .unwrap_err();
        let text = e.to_string();
        assert!(matches!(e, Error::Store { .. }), "{loc}: {text}");
        assert!(text.contains("bulwark-vault.json"), "{loc}: {text}");
        eprintln!("{loc} unreachable: {text}");
        let e = timed(Vault::create_with(
            loc,
            &CreateOptions::default(),
            &opts(store),
        ))
        .await
        .unwrap_err();
        assert!(matches!(e, Error::Store { .. }), "{loc}: {e}");
    }
}

#[tokio::test]
async fn missing_bucket_and_container() {
    for backend in [Backend::S3, Backend::Azurite] {
        let Some(url) = endpoint(backend, "missing_bucket_and_container") else {
            continue;
        };
        let name = unique("nobucket").to_lowercase();
        let name = &name[..name.len().min(60)];
        let (loc, store) = match backend {
            Backend::S3 => (format!("s3://{name}/p"), s3_options(&url)),
            _ => (format!("az://{name}/p"), azurite_options(&url)),
        };
        let e = timed(Vault::open_with(&loc, &opts(store.clone())))
            .await
            .unwrap_err();
        eprintln!("{loc} open: {e}");
        assert!(matches!(e, Error::NoVault { .. }), "{loc}: {e}");
        assert!(e.to_string().contains("does it exist?"), "{loc}: {e}");
        let e = timed(Vault::create_with(
            &loc,
            &CreateOptions::default(),
            &opts(store),
        ))
        .await
        .unwrap_err();
        eprintln!("{loc} create: {e}");
        assert!(e.to_string().contains("does not exist"), "{loc}: {e}");
    }
}

#[tokio::test]
async fn prefixes_are_separate_vaults() {
    for backend in [Backend::S3, Backend::Azurite] {
        let Some(url) = endpoint(backend, "prefixes_are_separate_vaults") else {
            continue;
        };
        let store = match backend {
            Backend::S3 => s3_options(&url),
            _ => azurite_options(&url),
        };
        let scheme = if backend == Backend::S3 { "s3" } else { "az" };
        let base = unique("prefixes");
        let a = format!("{scheme}://{}/{base}/a", vault_servers::TEST_BUCKET);
        let b = format!("{scheme}://{}/{base}/a/b", vault_servers::TEST_BUCKET);
        let va = Vault::create_with(&a, &CreateOptions::default(), &opts(store.clone()))
            .await
            .unwrap();
        let vb = Vault::create_with(&b, &CreateOptions::default(), &opts(store.clone()))
            .await
            .unwrap();
        assert_ne!(va.config().id, vb.config().id);
        assert_eq!(
            Vault::open_with(&b, &opts(store))
                .await
                .unwrap()
                .config()
                .id,
            vb.config().id
        );
    }
}

/// An endpoint that accepts connections and never answers: the request timeout bounds it.
#[tokio::test]
async fn silent_endpoint_times_out() {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    // Accept and hold every connection, answering nothing, until the test ends.
    std::thread::spawn(move || {
        let mut held = Vec::new();
        for c in listener.incoming().take(64) {
            match c {
                Ok(c) => held.push(c),
                Err(_) => break,
            }
        }
    });
    let mut store = s3_options(&url);
    store.request_timeout = Duration::from_secs(2);
    store.max_retries = 1;
    let t = Instant::now();
    let e = timed(Vault::open_with("s3://bucket/p", &opts(store)))
        .await
        .unwrap_err();
    eprintln!("silent endpoint after {:?}: {e}", t.elapsed());
    assert!(matches!(e, Error::Store { .. }), "{e}");
}
