//! The local directory store: `object_store`'s [`LocalFileSystem`], but blocks are not
//! fsynced one by one.
//!
//! With `with_fsync(true)` every object costs two fsyncs (the file and its directory), each a
//! journal commit; for the blocks of a backup that was 40% of a full backup's wall time and
//! half of an incremental's (see BENCHMARKS.md). Here a block is written, without fsync, to
//! `staging/`, where no reader of `blocks/` sees it; it is published later, in batches:
//! `syncfs` (every staged block's data is durable), rename each into `blocks/…`, `syncfs`
//! again (the renames are durable). A batch is published before any other object is written
//! (a manifest, a point, the configuration, a lease), in the background every [`FLUSH_EVERY`]
//! blocks, and when the store is dropped. So the vault's rule still holds, stronger than before: a key under
//! `blocks/` exists only when its content is durable, and a manifest is written only after its
//! blocks are durable; a crash leaves at most unpublished files in `staging/`, never a block
//! key whose content was lost (which a later backup would take as present and reference).
//!
//! Until a block is published, reads of it (`head`, `get`) in this process are served from its
//! staged file: the store reads its own writes.
//!
//! # Modes
//!
//! A vault holds disk contents (in clear unless encrypted): its directories are made 0700 and
//! its files 0600, whatever the process's umask. The root is made 0700 when the store is
//! opened, so no other user can reach a file in the moment between its creation (with the
//! umask's mode) and its `chmod`; every write then sets its file to 0600 and any directory it
//! created to 0700.

use std::collections::HashMap;
use std::fmt;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use futures::StreamExt;
use futures::stream::BoxStream;
use object_store::local::LocalFileSystem;
use object_store::path::Path;
use object_store::{
    CopyOptions, GetOptions, GetResult, ListResult, MultipartUpload, ObjectMeta, ObjectStore,
    PutMode, PutMultipartOptions, PutOptions, PutPayload, PutResult, RenameOptions, Result,
};

/// Blocks staged before a batch is published regardless.
pub(crate) const FLUSH_EVERY: usize = 1024;
const STAGING: &str = "staging";

/// A local directory store with batched durability for blocks (see the module docs).
#[derive(Debug)]
pub(crate) struct LocalStore {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    root: PathBuf,
    /// Without fsync: staged blocks.
    fast: LocalFileSystem,
    /// With fsync: every other object.
    durable: LocalFileSystem,
    /// Final block key → staged key, for blocks not yet published.
    pending: Mutex<HashMap<Path, Path>>,
    counter: AtomicU64,
    /// One publication at a time.
    flushing: tokio::sync::Mutex<()>,
    /// A background publication is running.
    background: AtomicBool,
}

fn is_block(location: &Path) -> bool {
    location.as_ref().starts_with("blocks/")
}

fn is_staging(location: &Path) -> bool {
    location
        .parts()
        .next()
        .is_some_and(|p| p.as_ref() == STAGING)
}

fn generic(e: std::io::Error) -> object_store::Error {
    object_store::Error::Generic {
        store: "LocalStore",
        source: Box::new(e),
    }
}

/// Sets `path`'s permission bits to `mode` unless they are already.
fn set_mode(path: &std::path::Path, mode: u32) -> std::io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let meta = std::fs::symlink_metadata(path)?;
    if meta.file_type().is_symlink() || meta.permissions().mode() & 0o7777 == mode {
        return Ok(());
    }
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
}

/// Makes the object at `key` 0600 and the directories between it and `root` 0700.
fn secure(root: &std::path::Path, key: &str) -> Result<()> {
    let path = root.join(key);
    set_mode(&path, 0o600).map_err(generic)?;
    let mut dir = path.parent();
    while let Some(d) = dir {
        if d == root || !d.starts_with(root) {
            break;
        }
        set_mode(d, 0o700).map_err(generic)?;
        dir = d.parent();
    }
    Ok(())
}

impl LocalStore {
    /// A store rooted at `root` (an existing directory), which is made 0700.
    pub(crate) fn new(root: &std::path::Path) -> Result<LocalStore> {
        if let Err(e) = set_mode(root, 0o700) {
            // Not ours to change (e.g. read by another user): reads still work.
            tracing::warn!(root = %root.display(), error = %e, "cannot make the vault directory 0700");
        }
        Ok(LocalStore {
            inner: Arc::new(Inner {
                root: root.to_path_buf(),
                fast: LocalFileSystem::new_with_prefix(root)?,
                durable: LocalFileSystem::new_with_prefix(root)?.with_fsync(true),
                pending: Mutex::new(HashMap::new()),
                counter: AtomicU64::new(0),
                flushing: tokio::sync::Mutex::new(()),
                background: AtomicBool::new(false),
            }),
        })
    }

    fn staged_of(&self, location: &Path) -> Option<Path> {
        self.inner
            .pending
            .lock()
            .ok()
            .and_then(|p| p.get(location).cloned())
    }

    /// Publishes every staged block: syncfs, rename into place, syncfs.
    async fn flush(&self) -> Result<()> {
        Inner::flush(self.inner.clone()).await
    }
}

impl Inner {
    async fn flush(inner: Arc<Inner>) -> Result<()> {
        let _one = inner.flushing.lock().await;
        let i = inner.clone();
        tokio::task::spawn_blocking(move || i.publish())
            .await
            .map_err(|e| generic(std::io::Error::other(e.to_string())))?
    }

    fn publish(&self) -> Result<()> {
        let batch: Vec<(Path, Path)> = match self.pending.lock() {
            Ok(p) if !p.is_empty() => p.iter().map(|(a, b)| (a.clone(), b.clone())).collect(),
            _ => return Ok(()),
        };
        let root = std::fs::File::open(&self.root).map_err(generic)?;
        rustix::fs::syncfs(&root).map_err(|e| generic(e.into()))?;
        for (key, staged) in &batch {
            let to = self.root.join(key.as_ref());
            let from = self.root.join(staged.as_ref());
            if let Some(dir) = to.parent() {
                std::fs::create_dir_all(dir).map_err(generic)?;
            }
            // The same content under the same key: replacing a block another writer
            // published meanwhile changes nothing.
            match std::fs::rename(&from, &to) {
                Ok(()) => {}
                // A concurrent publication (a background batch while the store is dropped)
                // moved it already.
                Err(e) if e.kind() == std::io::ErrorKind::NotFound && to.exists() => {}
                Err(e) => return Err(generic(e)),
            }
            // The staged file was 0600 already; `blocks/<xx>/` may be new.
            secure(&self.root, key.as_ref())?;
        }
        rustix::fs::syncfs(&root).map_err(|e| generic(e.into()))?;
        if let Ok(mut p) = self.pending.lock() {
            for (key, staged) in &batch {
                if p.get(key) == Some(staged) {
                    p.remove(key);
                }
            }
        }
        tracing::debug!(blocks = batch.len(), "published staged blocks");
        Ok(())
    }
}

/// Asks the kernel to start writing back a file's dirty pages, without waiting for them.
/// Best effort: durability still comes from the publication's syncfs.
fn start_writeback(path: &std::path::Path) {
    use std::os::fd::AsRawFd;
    let Ok(file) = std::fs::File::open(path) else {
        return;
    };
    // SAFETY: `file` is an open descriptor for the duration of the call; sync_file_range only
    // reads its arguments and touches no user memory.
    let _ = unsafe { libc::sync_file_range(file.as_raw_fd(), 0, 0, libc::SYNC_FILE_RANGE_WRITE) };
}

impl Drop for LocalStore {
    fn drop(&mut self) {
        if let Err(e) = self.inner.publish() {
            tracing::warn!(error = %e, "publishing staged blocks on close failed");
        }
    }
}

impl fmt::Display for LocalStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "LocalStore({})", self.inner.root.display())
    }
}

#[async_trait]
impl ObjectStore for LocalStore {
    async fn put_opts(
        &self,
        location: &Path,
        payload: PutPayload,
        opts: PutOptions,
    ) -> Result<PutResult> {
        if !is_block(location) {
            self.flush().await?;
            let r = self.inner.durable.put_opts(location, payload, opts).await?;
            secure(&self.inner.root, location.as_ref())?;
            return Ok(r);
        }
        if matches!(opts.mode, PutMode::Create) {
            let exists = self.staged_of(location).is_some()
                || std::fs::symlink_metadata(self.inner.root.join(location.as_ref())).is_ok();
            if exists {
                return Err(object_store::Error::AlreadyExists {
                    path: location.to_string(),
                    source: "the block exists".into(),
                });
            }
        }
        let n = self.inner.counter.fetch_add(1, Ordering::Relaxed);
        let name = location.filename().unwrap_or("block");
        let staged = Path::from(format!("{STAGING}/{name}.{}-{n}", std::process::id()));
        let put = PutOptions {
            mode: PutMode::Overwrite,
            ..PutOptions::default()
        };
        let r = self.inner.fast.put_opts(&staged, payload, put).await?;
        secure(&self.inner.root, staged.as_ref())?;
        // Start the writeback now, so that it overlaps with the blocks still being read and
        // compressed and the publication's syncfs finds little left to write.
        let file = self.inner.root.join(staged.as_ref());
        let _ = tokio::task::spawn_blocking(move || start_writeback(&file)).await;
        let count = match self.inner.pending.lock() {
            Ok(mut p) => {
                p.insert(location.clone(), staged);
                p.len()
            }
            Err(_) => 0,
        };
        // A full batch is published in the background: the writer goes on staging blocks (a
        // syncfs waits for the data's writeback). Whatever is pending when a manifest or any
        // other object is written is published first, so the ordering rule does not depend on
        // this; a failure here leaves the blocks pending, and that publication retries them.
        if count >= FLUSH_EVERY && !self.inner.background.swap(true, Ordering::AcqRel) {
            let inner = self.inner.clone();
            tokio::spawn(async move {
                if let Err(e) = Inner::flush(inner.clone()).await {
                    tracing::warn!(error = %e, "publishing staged blocks failed (retried later)");
                }
                inner.background.store(false, Ordering::Release);
            });
        }
        Ok(r)
    }

    async fn put_multipart_opts(
        &self,
        location: &Path,
        opts: PutMultipartOptions,
    ) -> Result<Box<dyn MultipartUpload>> {
        self.flush().await?;
        self.inner.durable.put_multipart_opts(location, opts).await
    }

    async fn get_opts(&self, location: &Path, options: GetOptions) -> Result<GetResult> {
        if let Some(staged) = self.staged_of(location) {
            match self.inner.fast.get_opts(&staged, options.clone()).await {
                // Published meanwhile: read it where it is now.
                Err(object_store::Error::NotFound { .. }) => {}
                r => return r,
            }
        }
        self.inner.durable.get_opts(location, options).await
    }

    fn delete_stream(
        &self,
        locations: BoxStream<'static, Result<Path>>,
    ) -> BoxStream<'static, Result<Path>> {
        let inner = self.inner.clone();
        let locations = locations
            .map(move |l| {
                if let Ok(l) = &l
                    && let Ok(mut p) = inner.pending.lock()
                    && let Some(staged) = p.remove(l)
                {
                    let _ = std::fs::remove_file(inner.root.join(staged.as_ref()));
                }
                l
            })
            .boxed();
        self.inner.durable.delete_stream(locations)
    }

    fn list(&self, prefix: Option<&Path>) -> BoxStream<'static, Result<ObjectMeta>> {
        self.inner
            .durable
            .list(prefix)
            .filter(|m| futures::future::ready(!matches!(m, Ok(m) if is_staging(&m.location))))
            .boxed()
    }

    fn list_with_offset(
        &self,
        prefix: Option<&Path>,
        offset: &Path,
    ) -> BoxStream<'static, Result<ObjectMeta>> {
        self.inner
            .durable
            .list_with_offset(prefix, offset)
            .filter(|m| futures::future::ready(!matches!(m, Ok(m) if is_staging(&m.location))))
            .boxed()
    }

    async fn list_with_delimiter(&self, prefix: Option<&Path>) -> Result<ListResult> {
        let mut r = self.inner.durable.list_with_delimiter(prefix).await?;
        r.common_prefixes.retain(|p| !is_staging(p));
        r.objects.retain(|m| !is_staging(&m.location));
        Ok(r)
    }

    async fn copy_opts(&self, from: &Path, to: &Path, options: CopyOptions) -> Result<()> {
        self.flush().await?;
        self.inner.durable.copy_opts(from, to, options).await?;
        secure(&self.inner.root, to.as_ref())
    }

    async fn rename_opts(&self, from: &Path, to: &Path, options: RenameOptions) -> Result<()> {
        self.flush().await?;
        self.inner.durable.rename_opts(from, to, options).await?;
        secure(&self.inner.root, to.as_ref())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use object_store::ObjectStoreExt;

    #[tokio::test]
    async fn blocks_are_staged_then_published_before_other_objects() {
        let dir = tempfile::tempdir().unwrap();
        let store = LocalStore::new(dir.path()).unwrap();
        let block = Path::from("blocks/ab/abcdef");
        let create = PutOptions {
            mode: PutMode::Create,
            ..PutOptions::default()
        };
        store
            .put_opts(&block, PutPayload::from_static(b"data"), create.clone())
            .await
            .unwrap();
        // Not published yet, but this store reads its own write; a second create fails.
        assert!(!dir.path().join("blocks/ab/abcdef").exists());
        assert_eq!(
            store.get(&block).await.unwrap().bytes().await.unwrap(),
            &b"data"[..]
        );
        assert!(store.head(&block).await.is_ok());
        let again = store
            .put_opts(&block, PutPayload::from_static(b"data"), create.clone())
            .await;
        assert!(matches!(
            again,
            Err(object_store::Error::AlreadyExists { .. })
        ));
        // Staging is invisible to listings.
        let all: Vec<_> = store.list(None).collect().await;
        assert!(all.is_empty(), "{all:?}");

        // Any other object publishes the staged blocks first.
        store
            .put(&Path::from("manifests/m"), PutPayload::from_static(b"m"))
            .await
            .unwrap();
        assert_eq!(
            std::fs::read(dir.path().join("blocks/ab/abcdef")).unwrap(),
            b"data"
        );
        assert_eq!(
            std::fs::read_dir(dir.path().join(STAGING)).unwrap().count(),
            0
        );
        let again = store
            .put_opts(&block, PutPayload::from_static(b"data"), create)
            .await;
        assert!(matches!(
            again,
            Err(object_store::Error::AlreadyExists { .. })
        ));
    }

    #[tokio::test]
    async fn drop_publishes_and_delete_unstages() {
        let dir = tempfile::tempdir().unwrap();
        let kept = Path::from("blocks/01/0102");
        let deleted = Path::from("blocks/02/0203");
        {
            let store = LocalStore::new(dir.path()).unwrap();
            store
                .put(&kept, PutPayload::from_static(b"kept"))
                .await
                .unwrap();
            store
                .put(&deleted, PutPayload::from_static(b"gone"))
                .await
                .unwrap();
            let _ = store.delete(&deleted).await;
        }
        assert_eq!(
            std::fs::read(dir.path().join("blocks/01/0102")).unwrap(),
            b"kept"
        );
        assert!(!dir.path().join("blocks/02/0203").exists());
        assert_eq!(
            std::fs::read_dir(dir.path().join(STAGING)).unwrap().count(),
            0
        );
    }
}
