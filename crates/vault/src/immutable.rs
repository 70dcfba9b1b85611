//! Immutable vaults: every object write-once for a retention period, in compliance mode, so
//! that whoever holds the vault's credentials (a thief, ransomware) cannot erase the past.
//!
//! # S3: Object Lock
//!
//! [`Vault::create_immutable_with`](crate::Vault::create_immutable_with) needs a bucket created
//! with Object Lock enabled (Object Lock implies versioning; it cannot be turned on later for
//! a bucket's existing objects here). With [`Retention::Days`] it sets the bucket's **default
//! retention** to `COMPLIANCE` for that many days and records the immutability in the vault
//! configuration ([`Immutability`]). The bucket default is what locks each object: S3 applies
//! it atomically as it stores the object, for every writer, with no extra request and no
//! window in which a new object is unlocked (a per-object `PutObjectRetention` after each PUT
//! would leave one, and `object_store` has no way to send the lock headers with a PUT: its
//! client signs only the headers it knows). Compliance mode: nobody, the root account
//! included, can shorten the retention or delete a locked version before it ends.
//!
//! What S3 then guarantees, and what the tests (`tests/vault_immutable.rs`) show on moto:
//! deleting a locked *version* fails (`AccessDenied`) with the vault's own credentials. A
//! plain DELETE still "succeeds" by adding a delete marker, and a PUT over a key adds a newer
//! version: both hide the locked original, neither destroys it; it stays readable by its
//! version id until its retention ends, and GC reports such objects (see below).
//!
//! Retention in days is the bucket default's unit. [`Retention::Seconds`] (a hidden, test-only
//! option of `init`) sets no bucket default; each object gets its own `RetainUntilDate` right
//! after its PUT instead (a short unlocked window per object, acceptable only in tests), so a
//! test can watch retention expire.
//!
//! The few calls `object_store` has no API for go through [`ObjectLockClient`]: SigV4-signed
//! requests (the `rusty-s3` crate signs them) sent with `reqwest`: `GetObjectLockConfiguration`,
//! `PutObjectLockConfiguration`, `PutObjectRetention`, `HeadObject` (the retention of a
//! version), `ListObjectVersions`, `DeleteObject?versionId`, `GetObject?versionId`, and
//! `CreateBucket` with Object Lock (operators and tests).
//!
//! # Prune and GC on an immutable vault
//!
//! They never rewrite an object. Prune's moves and GC's frees are DELETEs, which on a locked
//! bucket become delete markers: the soft delete. Space is freed by a later sweep (every GC
//! runs it): for each key whose newest version is a delete marker and that nothing live
//! references, it deletes the key's versions one by one; a version still under retention is
//! refused by the store and counted as retained, to be retried by the next GC. Referenced
//! blocks, manifests, points and tombstones get their locks extended (to now + the retention)
//! once less than half the retention could remain, like kopia's `--extend-object-locks`, so a
//! block that every new point still deduplicates against never becomes deletable.
//!
//! # Azure Blob and local directories
//!
//! Refused. A local directory cannot enforce anything against its owner (root can always
//! delete files), so an "immutable" local vault would be a false promise. Azure Blob has
//! version-level immutability (WORM policies on blob versions), but Azurite, the only Azure
//! server the tests can run, answers its immutability-policy and legal-hold APIs with
//! "not implemented" (Azure/Azurite#2648), so no code path could be tested against a server;
//! this build refuses `--immutable-days` on `az://` rather than claim what it cannot show.

use std::fmt;
use std::ops::Range;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use base64::Engine as _;
use bytes::Bytes;
use futures::stream::BoxStream;
use jiff::Timestamp;
use md5::Digest as _;
use object_store::path::Path;
use object_store::{
    CopyOptions, GetOptions, GetResult, ListResult, MultipartUpload, ObjectMeta, ObjectStore,
    PutMultipartOptions, PutOptions, PutPayload, PutResult,
};
use rusty_s3::{Bucket, Credentials, S3Action, UrlStyle};
use serde::{Deserialize, Serialize};

use crate::Error;
use crate::location::{Location, StoreOptions};

/// The only mechanism this build implements.
pub const S3_OBJECT_LOCK: &str = "s3-object-lock";
/// The only mode: compliance (no one can shorten a retention or delete a locked version).
pub const COMPLIANCE: &str = "compliance";
/// Objects are locked by the bucket's default retention.
pub const BY_BUCKET_DEFAULT: &str = "bucket-default";
/// Objects are locked one by one right after their PUT (test-only seconds retention).
pub const PER_OBJECT: &str = "per-object";

/// The largest response body read from the Object Lock API (a page of 1000 versions is a
/// few hundred KiB).
const MAX_RESPONSE: usize = 16 << 20;
/// The largest object version [`ObjectLockClient::get_version`] reads.
pub const MAX_VERSION_READ: usize = 64 << 20;
/// Signed URLs are valid this long.
const SIGNED_FOR: Duration = Duration::from_secs(300);

/// How long objects stay write-once, as asked of `init`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Retention {
    /// Whole days, through the bucket's default retention (production).
    Days(u32),
    /// Seconds, through a per-object retention set after each PUT (tests only).
    Seconds(u64),
}

impl Retention {
    /// The retention as a duration.
    pub fn duration(self) -> Duration {
        match self {
            Retention::Days(d) => Duration::from_secs(u64::from(d) * 86_400),
            Retention::Seconds(s) => Duration::from_secs(s),
        }
    }
}

/// The immutability of a vault, recorded in its configuration (`immutable`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Immutability {
    /// How: `"s3-object-lock"`.
    pub mechanism: String,
    /// `"compliance"`.
    pub mode: String,
    /// How long each object stays locked after its write (or its last extension), seconds.
    pub retention_secs: u64,
    /// `"bucket-default"` or `"per-object"` (see the module documentation).
    pub applied: String,
}

impl Immutability {
    /// The retention period.
    pub fn retention(&self) -> Duration {
        Duration::from_secs(self.retention_secs)
    }

    /// Whether each object is locked by a request of its own after its PUT.
    pub fn per_object(&self) -> bool {
        self.applied == PER_OBJECT
    }

    pub(crate) fn check(&self, key: &str) -> Result<(), Error> {
        if self.mechanism != S3_OBJECT_LOCK
            || self.mode != COMPLIANCE
            || !(self.applied == BY_BUCKET_DEFAULT || self.applied == PER_OBJECT)
            || self.retention_secs == 0
        {
            return Err(Error::Corrupt {
                key: key.into(),
                why: format!("unknown immutability {self:?}"),
            });
        }
        Ok(())
    }
}

/// The Object Lock configuration of a bucket.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct LockConfiguration {
    /// Object Lock is enabled on the bucket.
    pub enabled: bool,
    /// The default retention: mode (`COMPLIANCE` or `GOVERNANCE`) and days, if any.
    pub default: Option<(String, u64)>,
}

/// One version of an object (or a delete marker), from `ListObjectVersions`.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ObjectVersion {
    /// The vault key (the location's prefix removed).
    pub key: String,
    /// The version id.
    pub version_id: String,
    /// The newest version of its key.
    pub is_latest: bool,
    /// A delete marker, not data.
    pub delete_marker: bool,
    /// Stored bytes (0 for a delete marker).
    pub size: u64,
}

/// What [`ObjectLockClient::delete_version`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VersionDelete {
    /// The version is gone.
    Deleted,
    /// The store refused: the version is under retention.
    Retained,
}

/// A small S3 client for the Object Lock calls `object_store` has no API for.
pub struct ObjectLockClient {
    bucket: Bucket,
    credentials: Credentials,
    prefix: String,
    label: String,
    http: reqwest::Client,
}

impl fmt::Debug for ObjectLockClient {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Never the credentials.
        f.debug_struct("ObjectLockClient")
            .field("bucket", &self.bucket.name())
            .field("prefix", &self.prefix)
            .finish()
    }
}

fn lock_error(key: &str, why: impl Into<String>) -> Error {
    Error::ObjectLock {
        key: key.into(),
        why: why.into(),
    }
}

impl ObjectLockClient {
    /// A client for the bucket of `location` (`s3://BUCKET[/PREFIX]`), with the endpoint,
    /// region and keys of `options` (the same variables the vault's store uses).
    pub fn for_location(location: &str, options: &StoreOptions) -> Result<Self, Error> {
        let Location::S3 { bucket, prefix } = Location::parse(location)? else {
            return Err(Error::UnsupportedLocation {
                location: location.into(),
                why: "S3 Object Lock needs an s3:// location".into(),
            });
        };
        let region = options
            .var(&["AWS_REGION", "AWS_DEFAULT_REGION"])
            .unwrap_or("us-east-1")
            .to_string();
        let custom = options.var(&["AWS_ENDPOINT_URL", "AWS_ENDPOINT"]);
        let endpoint = custom
            .map(str::to_string)
            .unwrap_or_else(|| format!("https://s3.{region}.amazonaws.com"));
        let bad = |why: String| Error::UnsupportedLocation {
            location: location.into(),
            why,
        };
        let url: url::Url = endpoint
            .parse()
            .map_err(|e| bad(format!("endpoint {endpoint:?}: {e}")))?;
        if url.scheme() == "http" && !options.flag("AWS_ALLOW_HTTP") {
            return Err(bad(format!(
                "endpoint {endpoint} is plain http: set AWS_ALLOW_HTTP=true to allow it"
            )));
        }
        let style = if options.flag("AWS_VIRTUAL_HOSTED_STYLE_REQUEST") {
            UrlStyle::VirtualHost
        } else {
            UrlStyle::Path
        };
        let bucket_handle = Bucket::new(url, style, bucket.clone(), region)
            .map_err(|e| bad(format!("bucket {bucket:?}: {e}")))?;
        let (Some(key), Some(secret)) = (
            options.var(&["AWS_ACCESS_KEY_ID"]),
            options.var(&["AWS_SECRET_ACCESS_KEY"]),
        ) else {
            return Err(Error::MissingCredentials {
                location: location.into(),
                why: "S3 Object Lock calls need AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY".into(),
            });
        };
        let credentials = match options.var(&["AWS_SESSION_TOKEN"]) {
            Some(t) => Credentials::new_with_token(key, secret, t),
            None => Credentials::new(key, secret),
        };
        crate::location::install_tls_provider();
        let http = reqwest::Client::builder()
            .connect_timeout(options.connect_timeout)
            .timeout(options.request_timeout)
            .build()
            .map_err(|e| bad(format!("HTTP client: {e}")))?;
        Ok(ObjectLockClient {
            bucket: bucket_handle,
            credentials,
            prefix,
            label: location.into(),
            http,
        })
    }

    /// The bucket's key of vault key `key`.
    fn full(&self, key: &str) -> String {
        if self.prefix.is_empty() {
            key.to_string()
        } else {
            format!("{}/{key}", self.prefix)
        }
    }

    /// The vault key of the bucket's `key`, if it is inside the vault's prefix.
    fn vault_key<'k>(&self, key: &'k str) -> Option<&'k str> {
        if self.prefix.is_empty() {
            Some(key)
        } else {
            key.strip_prefix(self.prefix.as_str())?.strip_prefix('/')
        }
    }

    /// Sends a signed request; retries transport errors and 5xx answers twice. Returns the
    /// status, the headers and the body (at most `MAX_RESPONSE` bytes).
    async fn send(
        &self,
        what: &str,
        key: &str,
        method: reqwest::Method,
        url: url::Url,
        headers: &[(&'static str, String)],
        body: Option<Bytes>,
    ) -> Result<(reqwest::StatusCode, reqwest::header::HeaderMap, Bytes), Error> {
        let mut last = String::new();
        for attempt in 0..3u32 {
            if attempt > 0 {
                tokio::time::sleep(Duration::from_millis(200 << attempt)).await;
            }
            let mut req = self.http.request(method.clone(), url.clone());
            for (k, v) in headers {
                req = req.header(*k, v);
            }
            match &body {
                Some(b) => req = req.body(b.clone()),
                // Servers want a length on every PUT.
                None if method == reqwest::Method::PUT => {
                    req = req.header("content-length", "0").body(Bytes::new())
                }
                None => {}
            }
            let resp = match req.send().await {
                Ok(r) => r,
                Err(e) => {
                    last = format!("{what}: {e}");
                    continue;
                }
            };
            let status = resp.status();
            let head = resp.headers().clone();
            let body = match read_capped(resp, MAX_RESPONSE).await {
                Ok(b) => b,
                Err(e) => {
                    last = format!("{what}: {e}");
                    continue;
                }
            };
            if status.is_server_error() {
                last = format!("{what}: HTTP {status}: {}", snippet(&body));
                continue;
            }
            return Ok((status, head, body));
        }
        Err(lock_error(key, last))
    }

    fn failed(what: &str, key: &str, status: reqwest::StatusCode, body: &[u8]) -> Error {
        lock_error(key, format!("{what}: HTTP {status}: {}", snippet(body)))
    }

    /// Creates the bucket, with Object Lock enabled (and so versioning) when `object_lock`.
    pub async fn create_bucket(&self, object_lock: bool) -> Result<(), Error> {
        let mut a = self.bucket.create_bucket(&self.credentials);
        let mut h = Vec::new();
        if object_lock {
            a.headers_mut()
                .insert("x-amz-bucket-object-lock-enabled", "true");
            h.push(("x-amz-bucket-object-lock-enabled", "true".to_string()));
        }
        let url = a.sign(SIGNED_FOR);
        let name = self.bucket.name().to_string();
        let (status, _, body) = self
            .send("CreateBucket", &name, reqwest::Method::PUT, url, &h, None)
            .await?;
        if !status.is_success() {
            return Err(Self::failed("CreateBucket", &name, status, &body));
        }
        Ok(())
    }

    /// The bucket's Object Lock configuration.
    pub async fn lock_configuration(&self) -> Result<LockConfiguration, Error> {
        let mut a = self.bucket.get_object(Some(&self.credentials), "");
        a.query_mut().insert("object-lock", "");
        let url = a.sign(SIGNED_FOR);
        let name = self.bucket.name().to_string();
        let what = "GetObjectLockConfiguration";
        let (status, _, body) = self
            .send(what, &name, reqwest::Method::GET, url, &[], None)
            .await?;
        if status == reqwest::StatusCode::NOT_FOUND {
            // ObjectLockConfigurationNotFoundError (or no bucket): not enabled.
            if String::from_utf8_lossy(&body).contains("NoSuchBucket") {
                return Err(Self::failed(what, &name, status, &body));
            }
            return Ok(LockConfiguration::default());
        }
        if !status.is_success() {
            return Err(Self::failed(what, &name, status, &body));
        }
        let fields = xml_fields(&body).map_err(|e| lock_error(&name, format!("{what}: {e}")))?;
        let get = |n: &str| fields.iter().find(|(k, _)| k == n).map(|(_, v)| v.clone());
        let enabled = get("ObjectLockEnabled").is_some_and(|v| v == "Enabled");
        let default = match (get("Mode"), get("Days"), get("Years")) {
            (Some(m), Some(d), _) => d.parse().ok().map(|d| (m, d)),
            (Some(m), None, Some(y)) => y.parse::<u64>().ok().map(|y| (m, y * 365)),
            _ => None,
        };
        Ok(LockConfiguration { enabled, default })
    }

    /// Sets the bucket's default retention: compliance mode, `days` days.
    pub async fn set_default_retention(&self, days: u32) -> Result<(), Error> {
        let body = format!(
            "<ObjectLockConfiguration xmlns=\"http://s3.amazonaws.com/doc/2006-03-01/\">\
             <ObjectLockEnabled>Enabled</ObjectLockEnabled><Rule><DefaultRetention>\
             <Mode>COMPLIANCE</Mode><Days>{days}</Days></DefaultRetention></Rule>\
             </ObjectLockConfiguration>"
        );
        let name = self.bucket.name().to_string();
        self.put_xml(
            "PutObjectLockConfiguration",
            &name,
            "",
            "object-lock",
            None,
            body,
        )
        .await
    }

    async fn put_xml(
        &self,
        what: &str,
        label: &str,
        object: &str,
        sub: &'static str,
        version: Option<&str>,
        body: String,
    ) -> Result<(), Error> {
        let md5 = base64::engine::general_purpose::STANDARD.encode(md5::Md5::digest(&body));
        let mut a = self.bucket.put_object(Some(&self.credentials), object);
        a.query_mut().insert(sub, "");
        if let Some(v) = version {
            a.query_mut().insert("versionId", v.to_string());
        }
        a.headers_mut().insert("content-md5", md5.clone());
        let url = a.sign(SIGNED_FOR);
        let h = [
            ("content-md5", md5),
            ("content-type", "application/xml".to_string()),
        ];
        let (status, _, resp) = self
            .send(
                what,
                label,
                reqwest::Method::PUT,
                url,
                &h,
                Some(body.into()),
            )
            .await?;
        if !status.is_success() {
            return Err(Self::failed(what, label, status, &resp));
        }
        Ok(())
    }

    /// Sets the retention of the newest version of vault key `key` to compliance mode until
    /// `until` (S3 refuses to shorten a compliance retention).
    pub async fn put_retention(&self, key: &str, until: Timestamp) -> Result<(), Error> {
        let body = format!(
            "<Retention xmlns=\"http://s3.amazonaws.com/doc/2006-03-01/\">\
             <Mode>COMPLIANCE</Mode><RetainUntilDate>{}</RetainUntilDate></Retention>",
            // Whole seconds, rounded up: never shorter than asked.
            Timestamp::from_second(until.as_second().saturating_add(1)).unwrap_or(until)
        );
        let full = self.full(key);
        self.put_xml("PutObjectRetention", key, &full, "retention", None, body)
            .await
    }

    /// The retain-until date of the newest version of `key` (or of `version`), if it has one;
    /// `Ok(None)` also when the object does not exist.
    pub async fn retention(
        &self,
        key: &str,
        version: Option<&str>,
    ) -> Result<Option<Timestamp>, Error> {
        let full = self.full(key);
        let mut a = self.bucket.head_object(Some(&self.credentials), &full);
        if let Some(v) = version {
            a.query_mut().insert("versionId", v.to_string());
        }
        let url = a.sign(SIGNED_FOR);
        let (status, head, _) = self
            .send("HeadObject", key, reqwest::Method::HEAD, url, &[], None)
            .await?;
        if status == reqwest::StatusCode::NOT_FOUND {
            return Ok(None);
        }
        if !status.is_success() {
            return Err(Self::failed("HeadObject", key, status, b""));
        }
        let Some(v) = head.get("x-amz-object-lock-retain-until-date") else {
            return Ok(None);
        };
        let text = v.to_str().unwrap_or_default();
        parse_time(text)
            .map(Some)
            .ok_or_else(|| lock_error(key, format!("unreadable retain-until date {text:?}")))
    }

    /// Every version and delete marker under vault prefix `prefix` (`""`: the whole vault),
    /// in the store's order (by key; each key's versions newest first), page by page.
    pub async fn list_versions(&self, prefix: &str) -> Result<Vec<ObjectVersion>, Error> {
        let full_prefix = if prefix.is_empty() {
            if self.prefix.is_empty() {
                String::new()
            } else {
                format!("{}/", self.prefix)
            }
        } else {
            self.full(prefix)
        };
        let mut out = Vec::new();
        let (mut key_marker, mut version_marker) = (None::<String>, None::<String>);
        loop {
            let mut a = self.bucket.get_object(Some(&self.credentials), "");
            a.query_mut().insert("versions", "");
            a.query_mut().insert("max-keys", "1000");
            if !full_prefix.is_empty() {
                a.query_mut().insert("prefix", full_prefix.clone());
            }
            if let Some(k) = &key_marker {
                a.query_mut().insert("key-marker", k.clone());
            }
            if let Some(v) = &version_marker {
                a.query_mut().insert("version-id-marker", v.clone());
            }
            let url = a.sign(SIGNED_FOR);
            let what = "ListObjectVersions";
            let (status, _, body) = self
                .send(what, prefix, reqwest::Method::GET, url, &[], None)
                .await?;
            if !status.is_success() {
                return Err(Self::failed(what, prefix, status, &body));
            }
            let page =
                parse_versions(&body).map_err(|e| lock_error(prefix, format!("{what}: {e}")))?;
            for mut v in page.versions {
                if let Some(k) = self.vault_key(&v.key) {
                    v.key = k.to_string();
                    out.push(v);
                }
            }
            if !page.truncated {
                return Ok(out);
            }
            if page.next_key.is_none() {
                return Err(lock_error(
                    prefix,
                    format!("{what}: truncated page without a marker"),
                ));
            }
            key_marker = page.next_key;
            version_marker = page.next_version;
        }
    }

    /// Deletes one version of vault key `key` for good; [`VersionDelete::Retained`] when the
    /// store refuses because it is locked.
    pub async fn delete_version(&self, key: &str, version: &str) -> Result<VersionDelete, Error> {
        let full = self.full(key);
        let mut a = self.bucket.delete_object(Some(&self.credentials), &full);
        a.query_mut().insert("versionId", version.to_string());
        let url = a.sign(SIGNED_FOR);
        let (status, _, body) = self
            .send("DeleteObject", key, reqwest::Method::DELETE, url, &[], None)
            .await?;
        if status.is_success() || status == reqwest::StatusCode::NOT_FOUND {
            Ok(VersionDelete::Deleted)
        } else if status == reqwest::StatusCode::FORBIDDEN {
            Ok(VersionDelete::Retained)
        } else {
            Err(Self::failed("DeleteObject", key, status, &body))
        }
    }

    /// Reads one version of vault key `key` (at most [`MAX_VERSION_READ`] bytes).
    pub async fn get_version(&self, key: &str, version: &str) -> Result<Bytes, Error> {
        let full = self.full(key);
        let mut a = self.bucket.get_object(Some(&self.credentials), &full);
        a.query_mut().insert("versionId", version.to_string());
        let url = a.sign(SIGNED_FOR);
        let resp = self
            .http
            .get(url)
            .send()
            .await
            .map_err(|e| lock_error(key, format!("GetObject: {e}")))?;
        let status = resp.status();
        let body = read_capped(resp, MAX_VERSION_READ)
            .await
            .map_err(|e| lock_error(key, format!("GetObject: {e}")))?;
        if !status.is_success() {
            return Err(Self::failed("GetObject", key, status, &body));
        }
        Ok(body)
    }

    /// The location this client serves.
    pub fn location(&self) -> &str {
        &self.label
    }
}

async fn read_capped(mut resp: reqwest::Response, limit: usize) -> Result<Bytes, String> {
    let mut out = Vec::new();
    while let Some(chunk) = resp.chunk().await.map_err(|e| e.to_string())? {
        if out.len() + chunk.len() > limit {
            return Err(format!("response larger than {limit} bytes; not read"));
        }
        out.extend_from_slice(&chunk);
    }
    Ok(Bytes::from(out))
}

fn snippet(body: &[u8]) -> String {
    let s = String::from_utf8_lossy(&body[..body.len().min(300)]);
    s.split_whitespace().collect::<Vec<_>>().join(" ")
}

fn parse_time(s: &str) -> Option<Timestamp> {
    s.parse::<Timestamp>().ok().or_else(|| {
        // HTTP dates ("Sun, 29 Nov 2026 18:36:13 GMT") in some servers' headers.
        jiff::fmt::rfc2822::parse(s).ok().map(|z| z.timestamp())
    })
}

/// Every `(element, text)` of a small XML document, in document order.
fn xml_fields(xml: &[u8]) -> Result<Vec<(String, String)>, String> {
    let mut out = Vec::new();
    walk_xml(xml, |path, text| {
        if let Some(name) = path.last() {
            out.push((name.clone(), text.to_string()));
        }
    })?;
    Ok(out)
}

/// Calls `leaf(path, text)` at the end of every element, with the element's path and text.
fn walk_xml(xml: &[u8], mut leaf: impl FnMut(&[String], &str)) -> Result<(), String> {
    use quick_xml::events::Event;
    let mut reader = quick_xml::Reader::from_reader(xml);
    let mut path: Vec<String> = Vec::new();
    let mut text = String::new();
    loop {
        match reader.read_event().map_err(|e| e.to_string())? {
            Event::Start(e) => {
                if path.len() > 16 {
                    return Err("XML nested too deeply".into());
                }
                path.push(String::from_utf8_lossy(e.local_name().as_ref()).into_owned());
                text.clear();
            }
            Event::Text(t) => text.push_str(&t.decode().map_err(|e| e.to_string())?),
            Event::CData(t) => text.push_str(&t.decode().map_err(|e| e.to_string())?),
            Event::GeneralRef(r) => {
                let name = r.decode().map_err(|e| e.to_string())?;
                let c = match name.as_ref() {
                    "amp" => '&',
                    "lt" => '<',
                    "gt" => '>',
                    "quot" => '"',
                    "apos" => '\'',
                    _ => r
                        .resolve_char_ref()
                        .map_err(|e| e.to_string())?
                        .ok_or_else(|| format!("unknown entity &{name};"))?,
                };
                text.push(c);
            }
            Event::End(_) => {
                leaf(&path, &text);
                path.pop();
                text.clear();
            }
            Event::Eof => return Ok(()),
            _ => {}
        }
    }
}

#[derive(Debug, Default)]
struct VersionPage {
    versions: Vec<ObjectVersion>,
    truncated: bool,
    next_key: Option<String>,
    next_version: Option<String>,
}

/// Parses a `ListVersionsResult`.
fn parse_versions(xml: &[u8]) -> Result<VersionPage, String> {
    let mut page = VersionPage::default();
    let mut cur = ObjectVersion::default();
    walk_xml(xml, |path, text| {
        let n = path.len();
        if n == 0 {
            return;
        }
        let name = path[n - 1].as_str();
        let parent = if n >= 2 { path[n - 2].as_str() } else { "" };
        match (parent, name) {
            ("Version" | "DeleteMarker", "Key") => cur.key = text.to_string(),
            ("Version" | "DeleteMarker", "VersionId") => cur.version_id = text.to_string(),
            ("Version" | "DeleteMarker", "IsLatest") => cur.is_latest = text == "true",
            ("Version" | "DeleteMarker", "Size") => cur.size = text.parse().unwrap_or(0),
            ("ListVersionsResult", "Version" | "DeleteMarker") => {
                let mut v = std::mem::take(&mut cur);
                v.delete_marker = name == "DeleteMarker";
                page.versions.push(v);
            }
            ("ListVersionsResult", "IsTruncated") => page.truncated = text == "true",
            ("ListVersionsResult", "NextKeyMarker") => page.next_key = Some(text.to_string()),
            ("ListVersionsResult", "NextVersionIdMarker") => {
                page.next_version = Some(text.to_string())
            }
            _ => {}
        }
    })?;
    if page
        .versions
        .iter()
        .any(|v| v.key.is_empty() || v.version_id.is_empty())
    {
        return Err("a version without a key or version id".into());
    }
    Ok(page)
}

/// Adds a `Content-MD5` header to every PUT the vault's S3 client sends. S3 requires it (or a
/// checksum header the SDKs send) on every PUT into a bucket whose default retention locks
/// new objects, and `object_store` sends neither; an unsigned `Content-MD5` is valid under
/// SigV4 (only `host` and `x-amz-*` headers must be signed), and S3 checks the body against
/// it, so every S3 vault gets it.
#[derive(Debug, Default)]
pub(crate) struct ContentMd5Connector;

impl object_store::client::HttpConnector for ContentMd5Connector {
    fn connect(
        &self,
        options: &object_store::ClientOptions,
    ) -> object_store::Result<object_store::client::HttpClient> {
        use object_store::client::{HttpClient, ReqwestConnector};
        let inner = ReqwestConnector::default().connect(options)?;
        Ok(HttpClient::new(ContentMd5 { inner }))
    }
}

#[derive(Debug)]
struct ContentMd5 {
    inner: object_store::client::HttpClient,
}

#[async_trait]
impl object_store::client::HttpService for ContentMd5 {
    async fn call(
        &self,
        req: object_store::client::HttpRequest,
    ) -> Result<object_store::client::HttpResponse, object_store::client::HttpError> {
        use object_store::client::{HttpError, HttpErrorKind, HttpRequest, HttpRequestBody};
        if req.method() != http::Method::PUT || req.headers().contains_key("content-md5") {
            return self.inner.execute(req).await;
        }
        let (mut parts, body) = req.into_parts();
        let bytes = match body.as_bytes() {
            Some(b) => b.clone(),
            None => http_body_util::BodyExt::collect(body).await?.to_bytes(),
        };
        let md5 = base64::engine::general_purpose::STANDARD.encode(md5::Md5::digest(&bytes));
        let value = http::HeaderValue::from_str(&md5)
            .map_err(|e| HttpError::new(HttpErrorKind::Request, e))?;
        parts.headers.insert("content-md5", value);
        let req = HttpRequest::from_parts(parts, HttpRequestBody::from(bytes));
        self.inner.execute(req).await
    }
}

/// Whether objects at `key` are locked when written: everything but leases (rewritten on
/// every renewal) and the conditional-write probe.
pub(crate) fn locked_key(key: &str) -> bool {
    !(key.starts_with("locks/") || key.starts_with("probe/"))
}

/// A store that sets each new object's retention right after its PUT (per-object retention,
/// the test-only seconds mode; see the module documentation).
#[derive(Debug)]
pub(crate) struct RetainingStore {
    inner: Arc<dyn ObjectStore>,
    client: Arc<ObjectLockClient>,
    retention: Duration,
}

impl RetainingStore {
    pub(crate) fn new(
        inner: Arc<dyn ObjectStore>,
        client: Arc<ObjectLockClient>,
        retention: Duration,
    ) -> Self {
        RetainingStore {
            inner,
            client,
            retention,
        }
    }
}

impl fmt::Display for RetainingStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "RetainingStore({})", self.inner)
    }
}

#[async_trait]
impl ObjectStore for RetainingStore {
    async fn put_opts(
        &self,
        location: &Path,
        payload: PutPayload,
        opts: PutOptions,
    ) -> object_store::Result<PutResult> {
        let r = self.inner.put_opts(location, payload, opts).await?;
        if locked_key(location.as_ref()) {
            let until = crate::lease::plus(Timestamp::now(), self.retention);
            self.client
                .put_retention(location.as_ref(), until)
                .await
                .map_err(|e| object_store::Error::Generic {
                    store: "S3 Object Lock",
                    source: Box::new(e),
                })?;
        }
        Ok(r)
    }

    async fn put_multipart_opts(
        &self,
        location: &Path,
        opts: PutMultipartOptions,
    ) -> object_store::Result<Box<dyn MultipartUpload>> {
        // The vault never uploads in parts; a part upload would escape the lock.
        let _ = opts;
        Err(object_store::Error::NotSupported {
            source: format!("multipart upload of {location} in a per-object locked vault").into(),
        })
    }

    async fn get_opts(
        &self,
        location: &Path,
        options: GetOptions,
    ) -> object_store::Result<GetResult> {
        self.inner.get_opts(location, options).await
    }

    async fn get_ranges(
        &self,
        location: &Path,
        ranges: &[Range<u64>],
    ) -> object_store::Result<Vec<Bytes>> {
        self.inner.get_ranges(location, ranges).await
    }

    fn delete_stream(
        &self,
        locations: BoxStream<'static, object_store::Result<Path>>,
    ) -> BoxStream<'static, object_store::Result<Path>> {
        self.inner.delete_stream(locations)
    }

    fn list(&self, prefix: Option<&Path>) -> BoxStream<'static, object_store::Result<ObjectMeta>> {
        self.inner.list(prefix)
    }

    fn list_with_offset(
        &self,
        prefix: Option<&Path>,
        offset: &Path,
    ) -> BoxStream<'static, object_store::Result<ObjectMeta>> {
        self.inner.list_with_offset(prefix, offset)
    }

    async fn list_with_delimiter(&self, prefix: Option<&Path>) -> object_store::Result<ListResult> {
        self.inner.list_with_delimiter(prefix).await
    }

    async fn copy_opts(
        &self,
        from: &Path,
        to: &Path,
        options: CopyOptions,
    ) -> object_store::Result<()> {
        self.inner.copy_opts(from, to, options).await?;
        if locked_key(to.as_ref()) {
            let until = crate::lease::plus(Timestamp::now(), self.retention);
            self.client
                .put_retention(to.as_ref(), until)
                .await
                .map_err(|e| object_store::Error::Generic {
                    store: "S3 Object Lock",
                    source: Box::new(e),
                })?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_a_version_listing() {
        let xml = br#"<?xml version="1.0" encoding="UTF-8"?>
<ListVersionsResult xmlns="http://s3.amazonaws.com/doc/2006-03-01/">
  <Name>b</Name><Prefix>v/</Prefix><IsTruncated>true</IsTruncated>
  <NextKeyMarker>v/blocks/ab/x&amp;y</NextKeyMarker><NextVersionIdMarker>3</NextVersionIdMarker>
  <DeleteMarker><Key>v/points/vm/p.json</Key><VersionId>1</VersionId><IsLatest>true</IsLatest></DeleteMarker>
  <Version><Key>v/points/vm/p.json</Key><VersionId>2</VersionId><IsLatest>false</IsLatest><Size>120</Size></Version>
  <Version><Key>v/blocks/ab/x&amp;y</Key><VersionId>3</VersionId><IsLatest>true</IsLatest><Size>7</Size></Version>
</ListVersionsResult>"#;
        let p = parse_versions(xml).unwrap();
        assert!(p.truncated);
        assert_eq!(p.next_key.as_deref(), Some("v/blocks/ab/x&y"));
        assert_eq!(p.next_version.as_deref(), Some("3"));
        assert_eq!(p.versions.len(), 3);
        assert!(p.versions[0].delete_marker && p.versions[0].is_latest);
        assert_eq!(p.versions[1].size, 120);
        assert!(!p.versions[1].delete_marker && !p.versions[1].is_latest);
        assert_eq!(p.versions[2].key, "v/blocks/ab/x&y");
    }

    #[test]
    fn refuses_bad_listings() {
        assert!(
            parse_versions(
                b"<ListVersionsResult><Version><Key>k</Key></Version></ListVersionsResult>"
            )
            .is_err()
        );
        assert!(parse_versions(b"<a><b></a>").is_err());
        let deep = "<a>".repeat(40);
        assert!(
            parse_versions(deep.as_bytes()).is_err()
                || parse_versions(deep.as_bytes()).unwrap().versions.is_empty()
        );
    }

    #[test]
    fn only_leases_and_probes_are_left_unlocked() {
        assert!(locked_key("blocks/ab/abcd"));
        assert!(locked_key("points/vm/p.json"));
        assert!(locked_key("bulwark-vault.json"));
        assert!(!locked_key("locks/backup-1"));
        assert!(!locked_key("probe/conditional-write-1"));
    }
}
