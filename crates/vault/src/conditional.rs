//! Stores that ignore conditional writes.
//!
//! Commits rely on create-only writes (`PutMode::Create`: a point is written once, a second
//! writer of the same key is refused). Some S3-compatible servers accept `If-None-Match: *`
//! and overwrite anyway. [`Vault::create_store_with`](crate::Vault::create_store_with)
//! probes the store before writing the configuration: it creates a probe object twice and
//! expects the second attempt to be refused. The answer is recorded in the configuration
//! ([`VaultConfig::conditional_writes`](crate::VaultConfig::conditional_writes); absent in
//! vaults made before the probe, which are taken as safe).
//!
//! On a store found to ignore them, backups, lists, restores and verification still work
//! (their objects are content-addressed or have fresh keys), and opening the vault warns once
//! per process that concurrent writers are unsafe there. Prune and GC, which delete, take
//! their lease only with [`LeaseOptions::single_writer`](crate::LeaseOptions::single_writer):
//! the operator's word that no other Bulwark process writes to the vault meanwhile.
//!
//! [`IgnoresCreate`] is such a store for tests: any `object_store` backend with the
//! condition dropped.

use std::fmt;
use std::ops::Range;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use async_trait::async_trait;
use bytes::Bytes;
use futures::stream::BoxStream;
use object_store::path::Path;
use object_store::{
    CopyOptions, GetOptions, GetResult, ListResult, MultipartUpload, ObjectMeta, ObjectStore,
    ObjectStoreExt, PutMode, PutMultipartOptions, PutOptions, PutPayload, PutResult, Result,
};

use crate::retry::{RetryPolicy, retry};
use crate::{Error, VaultConfig};

/// Creates a probe object twice with `PutMode::Create` and removes it: `true` when the store
/// refused the second create (it honours conditional writes), `false` when it overwrote.
pub(crate) async fn probe(
    store: &Arc<dyn ObjectStore>,
    policy: &RetryPolicy,
) -> Result<bool, Error> {
    let key = Path::from(format!(
        "probe/conditional-write-{}",
        crate::model::random_hex(12)
    ));
    let create = || PutOptions {
        mode: PutMode::Create,
        ..Default::default()
    };
    // A fresh key: "already exists" on a retry means our first attempt landed.
    retry(policy, key.as_ref(), |_| async {
        match store
            .put_opts(&key, PutPayload::from_static(b"first"), create())
            .await
        {
            Ok(_) | Err(object_store::Error::AlreadyExists { .. }) => Ok(()),
            Err(e) => Err(e),
        }
    })
    .await
    .map_err(|e| Error::store(&key, e))?;
    let second = store
        .put_opts(&key, PutPayload::from_static(b"second"), create())
        .await;
    let honoured = match second {
        Err(
            object_store::Error::AlreadyExists { .. } | object_store::Error::Precondition { .. },
        ) => true,
        Ok(_) => false,
        Err(e) => {
            tracing::warn!(key = %key, error = %e, "conditional-write probe failed; taking the store as ignoring conditional writes");
            false
        }
    };
    if let Err(e) = store.delete(&key).await {
        tracing::warn!(key = %key, error = %e, "cannot remove the conditional-write probe");
    }
    Ok(honoured)
}

static WARNED: AtomicBool = AtomicBool::new(false);

/// Warns once per process when `config` records a store that ignores conditional writes.
pub(crate) fn warn_once(location: &str, config: &VaultConfig) {
    if config.conditional_writes == Some(false) && !WARNED.swap(true, Ordering::Relaxed) {
        tracing::warn!(
            vault = location,
            "this store ignores conditional writes (found when the vault was created): \
             concurrent writers are unsafe here; prune and gc need --single-writer"
        );
    }
}

/// Whether a lease of a kind that deletes may be taken on this vault.
pub(crate) fn check_single_writer(
    location: &str,
    config: &VaultConfig,
    single_writer: bool,
    what: &str,
) -> Result<(), Error> {
    if config.conditional_writes == Some(false) && !single_writer {
        return Err(Error::StoreConfig {
            what: format!("vault {location}"),
            why: format!(
                "the store ignores conditional writes (create-only writes overwrite), so {what} \
                 is refused unless no other Bulwark process writes to this vault meanwhile: \
                 say so with --single-writer (LeaseOptions::single_writer)"
            ),
        });
    }
    Ok(())
}

/// An object store that drops the condition of create-only writes (`PutMode::Create` becomes
/// an overwrite), like S3-compatible servers that ignore `If-None-Match: *`. For tests.
#[derive(Debug)]
pub struct IgnoresCreate<T: ObjectStore> {
    inner: T,
}

impl<T: ObjectStore> IgnoresCreate<T> {
    /// `inner`, ignoring create-only conditions.
    pub fn new(inner: T) -> Self {
        IgnoresCreate { inner }
    }
}

impl<T: ObjectStore> fmt::Display for IgnoresCreate<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "IgnoresCreate({})", self.inner)
    }
}

#[async_trait]
impl<T: ObjectStore> ObjectStore for IgnoresCreate<T> {
    async fn put_opts(
        &self,
        location: &Path,
        payload: PutPayload,
        mut opts: PutOptions,
    ) -> Result<PutResult> {
        if matches!(opts.mode, PutMode::Create) {
            opts.mode = PutMode::Overwrite;
        }
        self.inner.put_opts(location, payload, opts).await
    }

    async fn put_multipart_opts(
        &self,
        location: &Path,
        opts: PutMultipartOptions,
    ) -> Result<Box<dyn MultipartUpload>> {
        self.inner.put_multipart_opts(location, opts).await
    }

    async fn get_opts(&self, location: &Path, options: GetOptions) -> Result<GetResult> {
        self.inner.get_opts(location, options).await
    }

    async fn get_ranges(&self, location: &Path, ranges: &[Range<u64>]) -> Result<Vec<Bytes>> {
        self.inner.get_ranges(location, ranges).await
    }

    fn delete_stream(
        &self,
        locations: BoxStream<'static, Result<Path>>,
    ) -> BoxStream<'static, Result<Path>> {
        self.inner.delete_stream(locations)
    }

    fn list(&self, prefix: Option<&Path>) -> BoxStream<'static, Result<ObjectMeta>> {
        self.inner.list(prefix)
    }

    fn list_with_offset(
        &self,
        prefix: Option<&Path>,
        offset: &Path,
    ) -> BoxStream<'static, Result<ObjectMeta>> {
        self.inner.list_with_offset(prefix, offset)
    }

    async fn list_with_delimiter(&self, prefix: Option<&Path>) -> Result<ListResult> {
        self.inner.list_with_delimiter(prefix).await
    }

    async fn copy_opts(&self, from: &Path, to: &Path, options: CopyOptions) -> Result<()> {
        self.inner.copy_opts(from, to, options).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::lease::{Lease, LeaseKind, LeaseOptions};
    use crate::{CreateOptions, GcOptions, Vault};
    use bulwark_blockdiff::{BlockMap, BlockSize, Entry};
    use object_store::memory::InMemory;

    #[tokio::test]
    async fn init_records_whether_the_store_honours_create_only_writes() {
        let good: Arc<dyn ObjectStore> = Arc::new(InMemory::new());
        let v = Vault::create_store(good.clone(), "good:", &CreateOptions::default())
            .await
            .unwrap();
        assert_eq!(v.config().conditional_writes, Some(true));
        // The probe leaves nothing behind.
        let left: Vec<_> = futures::StreamExt::collect::<Vec<_>>(good.list(None)).await;
        assert_eq!(left.len(), 1, "{left:?}");

        let bad: Arc<dyn ObjectStore> = Arc::new(IgnoresCreate::new(InMemory::new()));
        let v = Vault::create_store(bad.clone(), "bad:", &CreateOptions::default())
            .await
            .unwrap();
        assert_eq!(v.config().conditional_writes, Some(false));
        let again = Vault::open_store(bad.clone(), "bad:").await.unwrap();
        assert_eq!(again.config().conditional_writes, Some(false));

        // Backups, lists and reads still work there.
        let bs = BlockSize::new(bulwark_blockdiff::MIN_BLOCK_SIZE).unwrap();
        let data = vec![9u8; bs.get() as usize];
        let address = v.address_of(&data);
        v.put_block(address, Bytes::from(data.clone()))
            .await
            .unwrap();
        let map = BlockMap::new(bs, bs.bytes(), vec![Entry::Data { change: 1, address }]).unwrap();
        let p = crate::tests::commit_map(&v, "vm", &map).await;
        assert_eq!(v.list_points(None).await.unwrap().points, vec![p.clone()]);
        let m = v.disk_manifest(&p, "d0").await.unwrap();
        assert_eq!(m, map);
        assert_eq!(v.get_block(address).await.unwrap(), data);
        let b = Lease::acquire(&v, LeaseKind::Backup, "b", &LeaseOptions::default())
            .await
            .unwrap();
        b.release().await.unwrap();

        // Prune and GC need the operator's word.
        for kind in [LeaseKind::Prune, LeaseKind::Gc] {
            let e = Lease::acquire(&v, kind, "x", &LeaseOptions::default())
                .await
                .unwrap_err();
            assert!(e.to_string().contains("--single-writer"), "{e}");
        }
        let e = v.gc(&GcOptions::default()).await.unwrap_err();
        assert!(e.to_string().contains("ignores conditional writes"), "{e}");
        let single = LeaseOptions {
            single_writer: true,
            ..LeaseOptions::default()
        };
        let r = v
            .gc(&GcOptions {
                lease: single,
                ..GcOptions::default()
            })
            .await
            .unwrap();
        assert_eq!(r.live_points, 1);
        let l = Lease::acquire(&v, LeaseKind::Prune, "x", &single)
            .await
            .unwrap();
        l.release().await.unwrap();
    }

    #[test]
    fn a_config_from_before_the_probe_still_reads() {
        let mut json =
            serde_json::to_value(VaultConfig::new(BlockSize::default(), Some(1))).unwrap();
        assert!(json.get("conditional_writes").is_none());
        json["conditional_writes"] = serde_json::Value::Bool(false);
        let c = VaultConfig::parse("k", json.to_string().as_bytes()).unwrap();
        assert_eq!(c.conditional_writes, Some(false));
        let old = VaultConfig::new(BlockSize::default(), Some(1));
        let c = VaultConfig::parse("k", &serde_json::to_vec(&old).unwrap()).unwrap();
        assert_eq!(c.conditional_writes, None);
        assert!(check_single_writer("v", &c, false, "gc").is_ok());
    }
}
