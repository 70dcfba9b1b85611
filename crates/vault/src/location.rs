//! Vault locations: a local path, `file://PATH`, `memory:`, `az://container/prefix`
//! (also `azure://`) or `s3://bucket/prefix`, all turned into one `Arc<dyn ObjectStore>` so
//! that every backend runs the same vault code.
//!
//! Cloud settings come from [`StoreOptions::vars`]: normally the process environment, which the
//! binary hands over with [`StoreOptions::from_vars`] (the variables object_store documents: `AZURE_STORAGE_ACCOUNT_NAME`, `AZURE_STORAGE_ACCOUNT_KEY`,
//! `AZURE_STORAGE_SAS_KEY`, `AZURE_STORAGE_USE_EMULATOR` + `AZURITE_BLOB_STORAGE_URL`,
//! `AZURE_STORAGE_ENDPOINT`; `AWS_ENDPOINT`/`AWS_ENDPOINT_URL`, `AWS_REGION`,
//! `AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`, `AWS_SESSION_TOKEN`, `AWS_ALLOW_HTTP`), overlaid
//! by a `KEY=VALUE` file named by `BULWARK_STORE_CONFIG`. Timeouts and retries:
//! `BULWARK_STORE_CONNECT_TIMEOUT`, `BULWARK_STORE_REQUEST_TIMEOUT`,
//! `BULWARK_STORE_MAX_RETRIES`, `BULWARK_STORE_RETRY_TIMEOUT` (seconds, fractions allowed).
//!
//! Credentials are never looked up anywhere else: without an account key, SAS token or access
//! key the location is refused with a clear error, instead of probing instance-metadata
//! endpoints.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use object_store::ObjectStore;
use object_store::prefix::PrefixStore;
use object_store::{BackoffConfig, ClientOptions, RetryConfig};

use crate::Error;

#[path = "local_sync.rs"]
mod local_sync;

/// The Azurite development account and its well-known key.
pub const AZURITE_ACCOUNT: &str = "devstoreaccount1";
const AZURITE_KEY: &str =
    "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw==";

/// A parsed vault location.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Location {
    /// A local directory.
    Local(PathBuf),
    /// An empty in-memory store (tests).
    Memory,
    /// An Azure Blob container, with an optional prefix inside it.
    Azure {
        /// The container.
        container: String,
        /// The prefix ("" for the container's root).
        prefix: String,
    },
    /// An S3 bucket, with an optional prefix inside it.
    S3 {
        /// The bucket.
        bucket: String,
        /// The prefix ("" for the bucket's root).
        prefix: String,
    },
}

impl Location {
    /// Parses a location string.
    pub fn parse(location: &str) -> Result<Location, Error> {
        let unsupported = |why: String| Error::UnsupportedLocation {
            location: location.into(),
            why,
        };
        if location == "memory:" || location == "memory://" {
            return Ok(Location::Memory);
        }
        if let Some(rest) = location.strip_prefix("file://") {
            if rest.is_empty() {
                return Err(unsupported("the path is empty".into()));
            }
            return Ok(Location::Local(PathBuf::from(rest)));
        }
        let Some((scheme, rest)) = location.split_once("://") else {
            if location.is_empty() {
                return Err(unsupported("the path is empty".into()));
            }
            return Ok(Location::Local(PathBuf::from(location)));
        };
        let (name, prefix) = match rest.split_once('/') {
            Some((n, p)) => (n, p.trim_matches('/')),
            None => (rest, ""),
        };
        let check_name = |what: &str| -> Result<(), Error> {
            if name.is_empty() {
                return Err(unsupported(format!("no {what} name after {scheme}://")));
            }
            if !name
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.')
            {
                return Err(unsupported(format!(
                    "{what} name {name:?} may only contain lower-case letters, digits, '-' and '.'"
                )));
            }
            Ok(())
        };
        if prefix.split('/').any(|p| p == "." || p == "..") {
            return Err(unsupported("the prefix may not contain '.' or '..'".into()));
        }
        match scheme {
            "az" | "azure" => {
                check_name("container")?;
                Ok(Location::Azure {
                    container: name.into(),
                    prefix: prefix.into(),
                })
            }
            "s3" => {
                check_name("bucket")?;
                Ok(Location::S3 {
                    bucket: name.into(),
                    prefix: prefix.into(),
                })
            }
            other => Err(unsupported(format!(
                "unknown URL scheme {other:?}: use a local path, file://PATH, az://CONTAINER[/PREFIX], \
                 azure://CONTAINER[/PREFIX] or s3://BUCKET[/PREFIX]"
            ))),
        }
    }

    /// True for the cloud backends.
    pub fn is_remote(&self) -> bool {
        matches!(self, Location::Azure { .. } | Location::S3 { .. })
    }
}

/// How the vault reaches its storage: credentials and endpoints (`vars`), timeouts, retries.
#[derive(Clone)]
pub struct StoreOptions {
    /// Settings by environment-variable name (`AZURE_…`, `AWS_…`, `AZURITE_BLOB_STORAGE_URL`).
    pub vars: BTreeMap<String, String>,
    /// Time allowed to open a connection.
    pub connect_timeout: Duration,
    /// Time allowed for one request, start to end.
    pub request_timeout: Duration,
    /// Retries of a failed request by the object_store client (cloud backends).
    pub max_retries: usize,
    /// No retry starts after this long since the first attempt.
    pub retry_timeout: Duration,
    /// First retry backoff; doubles up to `max_backoff`.
    pub initial_backoff: Duration,
    /// Largest retry backoff.
    pub max_backoff: Duration,
}

impl std::fmt::Debug for StoreOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print secrets: only the variable names.
        f.debug_struct("StoreOptions")
            .field("vars", &self.vars.keys().collect::<Vec<_>>())
            .field("connect_timeout", &self.connect_timeout)
            .field("request_timeout", &self.request_timeout)
            .field("max_retries", &self.max_retries)
            .field("retry_timeout", &self.retry_timeout)
            .finish()
    }
}

impl Default for StoreOptions {
    /// No variables, default timeouts: 5 s to connect, 60 s per request, 3 retries within 20 s.
    fn default() -> Self {
        StoreOptions {
            vars: BTreeMap::new(),
            connect_timeout: Duration::from_secs(5),
            request_timeout: Duration::from_secs(60),
            max_retries: 3,
            retry_timeout: Duration::from_secs(20),
            initial_backoff: Duration::from_millis(100),
            max_backoff: Duration::from_secs(5),
        }
    }
}

fn wanted_var(k: &str) -> bool {
    k.starts_with("AZURE_")
        || k.starts_with("AWS_")
        || k == "AZURITE_BLOB_STORAGE_URL"
        || k.starts_with("BULWARK_STORE_")
}

impl StoreOptions {
    /// Options from `KEY=VALUE` pairs, normally the process's environment, which the binary
    /// passes (`StoreOptions::from_vars(std::env::vars())`; the library never reads the
    /// environment itself). Only the store's settings are kept (`AWS_*`, `AZURE_*`,
    /// `AZURITE_BLOB_STORAGE_URL`, `BULWARK_STORE_*`); the `KEY=VALUE` file named by
    /// `BULWARK_STORE_CONFIG` among them is read too (its values win).
    ///
    /// ```
    /// use std::time::Duration;
    /// use bulwark_vault::StoreOptions;
    ///
    /// let vars = [("BULWARK_STORE_CONNECT_TIMEOUT", "2.5"), ("HOME", "/root")];
    /// let o = StoreOptions::from_vars(vars.map(|(k, v)| (k.to_string(), v.to_string())))?;
    /// assert_eq!(o.connect_timeout, Duration::from_millis(2500));
    /// # Ok::<(), bulwark_vault::Error>(())
    /// ```
    pub fn from_vars<I>(vars: I) -> Result<StoreOptions, Error>
    where
        I: IntoIterator<Item = (String, String)>,
    {
        let mut o = StoreOptions::default();
        for (k, v) in vars {
            if wanted_var(&k) {
                o.vars.insert(k, v);
            }
        }
        if let Some(path) = o.vars.get("BULWARK_STORE_CONFIG").cloned() {
            o.load_file(Path::new(&path))?;
        }
        o.apply_tuning()?;
        Ok(o)
    }

    /// Adds one setting.
    pub fn with_var(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.vars.insert(key.into(), value.into());
        self
    }

    /// Reads `KEY=VALUE` lines (blank lines and `#` comments skipped, `export ` allowed).
    pub fn load_file(&mut self, path: &Path) -> Result<(), Error> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::StoreConfig {
            what: path.display().to_string(),
            why: e.to_string(),
        })?;
        for (n, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let line = line.strip_prefix("export ").unwrap_or(line);
            let Some((k, v)) = line.split_once('=') else {
                return Err(Error::StoreConfig {
                    what: format!("{}:{}", path.display(), n + 1),
                    why: "expected KEY=VALUE".into(),
                });
            };
            let v = v.trim().trim_matches('"').trim_matches('\'');
            self.vars.insert(k.trim().to_string(), v.to_string());
        }
        self.apply_tuning()
    }

    /// Applies `BULWARK_STORE_*` tuning variables found in `vars`.
    fn apply_tuning(&mut self) -> Result<(), Error> {
        let secs = |name: &str| -> Result<Option<Duration>, Error> {
            match self.vars.get(name) {
                None => Ok(None),
                Some(v) => v
                    .trim()
                    .parse::<f64>()
                    .ok()
                    .filter(|s| s.is_finite() && *s > 0.0)
                    .map(|s| Some(Duration::from_secs_f64(s)))
                    .ok_or_else(|| Error::StoreConfig {
                        what: name.into(),
                        why: format!("{v:?} is not a positive number of seconds"),
                    }),
            }
        };
        if let Some(d) = secs("BULWARK_STORE_CONNECT_TIMEOUT")? {
            self.connect_timeout = d;
        }
        if let Some(d) = secs("BULWARK_STORE_REQUEST_TIMEOUT")? {
            self.request_timeout = d;
        }
        if let Some(d) = secs("BULWARK_STORE_RETRY_TIMEOUT")? {
            self.retry_timeout = d;
        }
        if let Some(v) = self.vars.get("BULWARK_STORE_MAX_RETRIES") {
            self.max_retries = v.trim().parse().map_err(|_| Error::StoreConfig {
                what: "BULWARK_STORE_MAX_RETRIES".into(),
                why: format!("{v:?} is not a count"),
            })?;
        }
        Ok(())
    }

    pub(crate) fn var(&self, names: &[&str]) -> Option<&str> {
        names
            .iter()
            .find_map(|n| self.vars.get(*n))
            .map(String::as_str)
            .filter(|v| !v.is_empty())
    }

    pub(crate) fn flag(&self, name: &str) -> bool {
        self.var(&[name])
            .is_some_and(|v| matches!(v.to_ascii_lowercase().as_str(), "1" | "true" | "yes"))
    }

    fn retry(&self) -> RetryConfig {
        RetryConfig {
            backoff: BackoffConfig {
                init_backoff: self.initial_backoff,
                max_backoff: self.max_backoff,
                base: 2.0,
            },
            max_retries: self.max_retries,
            retry_timeout: self.retry_timeout,
        }
    }

    fn client(&self, allow_http: bool) -> ClientOptions {
        ClientOptions::new()
            .with_connect_timeout(self.connect_timeout)
            .with_timeout(self.request_timeout)
            .with_allow_http(allow_http)
    }
}

/// Installs rustls' ring provider once (reqwest is built without a bundled one).
pub(crate) fn install_tls_provider() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        // An error means a provider is installed already: fine.
        let _ = rustls::crypto::ring::default_provider().install_default();
    });
}

/// Opens the object store for `location`. A local directory is created when `create_dirs`.
pub fn open_store(
    location: &str,
    options: &StoreOptions,
    create_dirs: bool,
) -> Result<Arc<dyn ObjectStore>, Error> {
    let unsupported = |why: String| Error::UnsupportedLocation {
        location: location.into(),
        why,
    };
    match Location::parse(location)? {
        Location::Memory => Ok(Arc::new(object_store::memory::InMemory::new())),
        Location::Local(path) => local_store(location, &path, create_dirs),
        Location::Azure { container, prefix } => {
            install_tls_provider();
            let mut b = object_store::azure::MicrosoftAzureBuilder::new()
                .with_container_name(&container)
                .with_retry(options.retry());
            let emulator =
                options.flag("AZURE_STORAGE_USE_EMULATOR") || options.flag("AZURE_USE_EMULATOR");
            for (k, v) in &options.vars {
                if k.starts_with("AZURE_")
                    && k != "AZURE_STORAGE_USE_EMULATOR"
                    && k != "AZURE_USE_EMULATOR"
                    && let Ok(key) = k.to_ascii_lowercase().parse()
                {
                    b = b.with_config(key, v);
                }
            }
            let account = options.var(&["AZURE_STORAGE_ACCOUNT_NAME", "AZURE_STORAGE_ACCOUNT"]);
            let has_secret = options
                .var(&[
                    "AZURE_STORAGE_ACCOUNT_KEY",
                    "AZURE_STORAGE_ACCESS_KEY",
                    "AZURE_STORAGE_MASTER_KEY",
                    "AZURE_STORAGE_SAS_KEY",
                    "AZURE_STORAGE_SAS_TOKEN",
                    "AZURE_STORAGE_TOKEN",
                    "AZURE_CLIENT_SECRET",
                ])
                .is_some();
            let http;
            if emulator {
                // Azurite: path-style URL http://host:port/<account>/<container>. Built as a
                // plain endpoint so the URL comes from these options, not the process.
                let base = options
                    .var(&["AZURITE_BLOB_STORAGE_URL"])
                    .unwrap_or("http://127.0.0.1:10000")
                    .trim_end_matches('/')
                    .to_string();
                let account = account.unwrap_or(AZURITE_ACCOUNT).to_string();
                b = b
                    .with_account(&account)
                    .with_endpoint(format!("{base}/{account}"));
                if !has_secret {
                    b = b.with_access_key(AZURITE_KEY);
                }
                http = base.starts_with("http://");
            } else {
                if account.is_none() {
                    return Err(Error::MissingCredentials {
                        location: location.into(),
                        why: "set AZURE_STORAGE_ACCOUNT_NAME (and a key or SAS token), or \
                              AZURE_STORAGE_USE_EMULATOR=true for Azurite"
                            .into(),
                    });
                }
                if !has_secret {
                    return Err(Error::MissingCredentials {
                        location: location.into(),
                        why: "set AZURE_STORAGE_ACCOUNT_KEY or AZURE_STORAGE_SAS_KEY".into(),
                    });
                }
                http = options
                    .var(&["AZURE_STORAGE_ENDPOINT", "AZURE_ENDPOINT"])
                    .is_some_and(|e| e.starts_with("http://"))
                    && options.flag("AZURE_ALLOW_HTTP");
            }
            let store = b
                .with_client_options(options.client(http || options.flag("AZURE_ALLOW_HTTP")))
                .build()
                .map_err(|e| unsupported(e.to_string()))?;
            Ok(with_prefix(store, &prefix))
        }
        Location::S3 { bucket, prefix } => {
            install_tls_provider();
            let mut b = object_store::aws::AmazonS3Builder::new()
                .with_bucket_name(&bucket)
                .with_retry(options.retry());
            for (k, v) in &options.vars {
                if k.starts_with("AWS_")
                    && let Ok(key) = k.to_ascii_lowercase().parse()
                {
                    b = b.with_config(key, v);
                }
            }
            if let Some(e) = options.var(&["AWS_ENDPOINT_URL", "AWS_ENDPOINT"]) {
                b = b.with_endpoint(e);
            }
            let has_keys = options.var(&["AWS_ACCESS_KEY_ID"]).is_some()
                && options.var(&["AWS_SECRET_ACCESS_KEY"]).is_some();
            if !has_keys && !options.flag("AWS_SKIP_SIGNATURE") {
                return Err(Error::MissingCredentials {
                    location: location.into(),
                    why: "set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (and AWS_ENDPOINT_URL, \
                          AWS_ALLOW_HTTP=true for a local S3-compatible server)"
                        .into(),
                });
            }
            if options.var(&["AWS_REGION", "AWS_DEFAULT_REGION"]).is_none() {
                b = b.with_region("us-east-1");
            }
            let store = b
                .with_http_connector(crate::immutable::ContentMd5Connector)
                .with_client_options(options.client(options.flag("AWS_ALLOW_HTTP")))
                .build()
                .map_err(|e| unsupported(e.to_string()))?;
            Ok(with_prefix(store, &prefix))
        }
    }
}

fn with_prefix<T: ObjectStore>(store: T, prefix: &str) -> Arc<dyn ObjectStore> {
    if prefix.is_empty() {
        Arc::new(store)
    } else {
        Arc::new(PrefixStore::new(store, prefix))
    }
}

fn local_store(
    location: &str,
    path: &Path,
    create_dirs: bool,
) -> Result<Arc<dyn ObjectStore>, Error> {
    let unsupported = |why: String| Error::UnsupportedLocation {
        location: location.into(),
        why,
    };
    if create_dirs {
        std::fs::create_dir_all(path)
            .map_err(|e| unsupported(format!("cannot create directory {}: {e}", path.display())))?;
    }
    // The path only when the location does not already say it (a plain path does).
    let named = if Path::new(location) == path {
        String::new()
    } else {
        format!("{}: ", path.display())
    };
    match std::fs::metadata(path) {
        Ok(m) if m.is_dir() => {}
        Ok(_) => {
            return Err(Error::NoVault {
                location: location.into(),
                why: format!("{named}not a directory"),
            });
        }
        Err(e) => {
            return Err(Error::NoVault {
                location: location.into(),
                why: format!("{named}{e}"),
            });
        }
    }
    // Blocks are made durable in batches before anything that references them is written
    // (see local_sync); every other object is fsynced as it is written.
    let fs = local_sync::LocalStore::new(path).map_err(|e| unsupported(e.to_string()))?;
    Ok(Arc::new(fs))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_locations() {
        assert_eq!(
            Location::parse("/srv/v").unwrap(),
            Location::Local("/srv/v".into())
        );
        assert_eq!(
            Location::parse("file:///srv/v").unwrap(),
            Location::Local("/srv/v".into())
        );
        assert_eq!(
            Location::parse("az://backups/site-a/vault/").unwrap(),
            Location::Azure {
                container: "backups".into(),
                prefix: "site-a/vault".into()
            }
        );
        assert_eq!(
            Location::parse("azure://c").unwrap(),
            Location::Azure {
                container: "c".into(),
                prefix: "".into()
            }
        );
        assert_eq!(
            Location::parse("s3://b-1/p").unwrap(),
            Location::S3 {
                bucket: "b-1".into(),
                prefix: "p".into()
            }
        );
        for bad in ["gs://b", "s3://", "s3://B", "az://c/../x", "", "ftp://x"] {
            let e = Location::parse(bad).unwrap_err();
            assert!(e.to_string().contains("cannot use vault location"), "{e}");
        }
        assert!(
            Location::parse("gs://b")
                .unwrap_err()
                .to_string()
                .contains("unknown URL scheme \"gs\"")
        );
    }

    #[test]
    fn missing_credentials_are_refused_before_any_request() {
        let o = StoreOptions::default();
        for loc in ["az://c", "s3://b"] {
            let e = open_store(loc, &o, false).unwrap_err();
            assert!(matches!(e, Error::MissingCredentials { .. }), "{e}");
        }
        let o = StoreOptions::default().with_var("AZURE_STORAGE_ACCOUNT_NAME", "acct");
        let e = open_store("az://c", &o, false).unwrap_err();
        assert!(e.to_string().contains("AZURE_STORAGE_ACCOUNT_KEY"), "{e}");
    }

    #[test]
    fn tuning_variables() {
        let mut o = StoreOptions::default()
            .with_var("BULWARK_STORE_CONNECT_TIMEOUT", "1.5")
            .with_var("BULWARK_STORE_MAX_RETRIES", "0");
        o.apply_tuning().unwrap();
        assert_eq!(o.connect_timeout, Duration::from_millis(1500));
        assert_eq!(o.max_retries, 0);
        let mut o = StoreOptions::default().with_var("BULWARK_STORE_REQUEST_TIMEOUT", "soon");
        assert!(o.apply_tuning().is_err());
    }
}
