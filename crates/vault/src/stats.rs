//! Request accounting: an `ObjectStore` wrapper that counts requests and bytes by kind.
//!
//! Every vault wraps its store in a [`CountingStore`]; [`crate::Vault::store_stats`] returns
//! the totals, and a job reports the difference between two readings
//! ([`StoreStats::since`]).

use std::fmt;
use std::ops::Range;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use async_trait::async_trait;
use bytes::Bytes;
use futures::StreamExt;
use futures::stream::BoxStream;
use object_store::path::Path;
use object_store::{
    CopyOptions, GetOptions, GetResult, ListResult, MultipartUpload, ObjectMeta, ObjectStore,
    PutMultipartOptions, PutOptions, PutPayload, PutResult, Result,
};
use serde::Serialize;

/// Request and byte counts of a store (or of one job: see [`StoreStats::since`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct StoreStats {
    /// GET requests (object reads).
    pub gets: u64,
    /// PUT requests (object writes, including conditional ones).
    pub puts: u64,
    /// HEAD requests (existence checks).
    pub heads: u64,
    /// LIST requests (one per listing call).
    pub lists: u64,
    /// DELETE requests (objects deleted).
    pub deletes: u64,
    /// Requests answered "not found" (a HEAD before uploading a new block, for one).
    pub not_found: u64,
    /// Requests that failed otherwise (network, server, precondition errors).
    pub errors: u64,
    /// Bytes sent in PUT bodies.
    pub bytes_up: u64,
    /// Bytes received in GET bodies.
    pub bytes_down: u64,
}

impl StoreStats {
    /// The counts accumulated since `earlier` (a reading of the same store).
    pub fn since(&self, earlier: &StoreStats) -> StoreStats {
        StoreStats {
            gets: self.gets.saturating_sub(earlier.gets),
            puts: self.puts.saturating_sub(earlier.puts),
            heads: self.heads.saturating_sub(earlier.heads),
            lists: self.lists.saturating_sub(earlier.lists),
            deletes: self.deletes.saturating_sub(earlier.deletes),
            not_found: self.not_found.saturating_sub(earlier.not_found),
            errors: self.errors.saturating_sub(earlier.errors),
            bytes_up: self.bytes_up.saturating_sub(earlier.bytes_up),
            bytes_down: self.bytes_down.saturating_sub(earlier.bytes_down),
        }
    }

    /// All requests.
    pub fn requests(&self) -> u64 {
        self.gets + self.puts + self.heads + self.lists + self.deletes
    }
}

#[derive(Debug, Default)]
struct Counters {
    gets: AtomicU64,
    puts: AtomicU64,
    heads: AtomicU64,
    lists: AtomicU64,
    deletes: AtomicU64,
    not_found: AtomicU64,
    errors: AtomicU64,
    bytes_up: AtomicU64,
    bytes_down: AtomicU64,
}

fn add(c: &AtomicU64, n: u64) {
    c.fetch_add(n, Ordering::Relaxed);
}

/// Counts the requests made through it, then forwards them to `inner`.
#[derive(Debug)]
pub struct CountingStore {
    inner: Arc<dyn ObjectStore>,
    counters: Arc<Counters>,
}

impl CountingStore {
    /// Wraps `inner`.
    pub fn new(inner: Arc<dyn ObjectStore>) -> Self {
        CountingStore {
            inner,
            counters: Arc::default(),
        }
    }

    /// The totals so far.
    pub fn stats(&self) -> StoreStats {
        let c = &self.counters;
        let l = |a: &AtomicU64| a.load(Ordering::Relaxed);
        StoreStats {
            gets: l(&c.gets),
            puts: l(&c.puts),
            heads: l(&c.heads),
            lists: l(&c.lists),
            deletes: l(&c.deletes),
            not_found: l(&c.not_found),
            errors: l(&c.errors),
            bytes_up: l(&c.bytes_up),
            bytes_down: l(&c.bytes_down),
        }
    }

    fn count<T>(&self, r: Result<T>) -> Result<T> {
        match &r {
            Ok(_) => {}
            Err(object_store::Error::NotFound { .. }) => add(&self.counters.not_found, 1),
            Err(_) => add(&self.counters.errors, 1),
        }
        r
    }
}

impl fmt::Display for CountingStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Counting({})", self.inner)
    }
}

#[async_trait]
impl ObjectStore for CountingStore {
    async fn put_opts(
        &self,
        location: &Path,
        payload: PutPayload,
        opts: PutOptions,
    ) -> Result<PutResult> {
        add(&self.counters.puts, 1);
        add(&self.counters.bytes_up, payload.content_length() as u64);
        let r = self.inner.put_opts(location, payload, opts).await;
        self.count(r)
    }

    async fn put_multipart_opts(
        &self,
        location: &Path,
        opts: PutMultipartOptions,
    ) -> Result<Box<dyn MultipartUpload>> {
        add(&self.counters.puts, 1);
        let r = self.inner.put_multipart_opts(location, opts).await;
        self.count(r)
    }

    async fn get_opts(&self, location: &Path, options: GetOptions) -> Result<GetResult> {
        let head = options.head;
        add(
            if head {
                &self.counters.heads
            } else {
                &self.counters.gets
            },
            1,
        );
        let r = self.inner.get_opts(location, options).await;
        if let Ok(g) = &r
            && !head
        {
            add(&self.counters.bytes_down, g.range.end - g.range.start);
        }
        self.count(r)
    }

    async fn get_ranges(&self, location: &Path, ranges: &[Range<u64>]) -> Result<Vec<Bytes>> {
        add(&self.counters.gets, 1);
        let r = self.inner.get_ranges(location, ranges).await;
        if let Ok(v) = &r {
            add(
                &self.counters.bytes_down,
                v.iter().map(|b| b.len() as u64).sum(),
            );
        }
        self.count(r)
    }

    fn delete_stream(
        &self,
        locations: BoxStream<'static, Result<Path>>,
    ) -> BoxStream<'static, Result<Path>> {
        let counters = self.counters.clone();
        let counted = locations
            .inspect(move |_| add(&counters.deletes, 1))
            .boxed();
        self.inner.delete_stream(counted)
    }

    fn list(&self, prefix: Option<&Path>) -> BoxStream<'static, Result<ObjectMeta>> {
        add(&self.counters.lists, 1);
        let counters = self.counters.clone();
        self.inner
            .list(prefix)
            .inspect(move |r| {
                if r.is_err() {
                    add(&counters.errors, 1);
                }
            })
            .boxed()
    }

    fn list_with_offset(
        &self,
        prefix: Option<&Path>,
        offset: &Path,
    ) -> BoxStream<'static, Result<ObjectMeta>> {
        add(&self.counters.lists, 1);
        self.inner.list_with_offset(prefix, offset)
    }

    async fn list_with_delimiter(&self, prefix: Option<&Path>) -> Result<ListResult> {
        add(&self.counters.lists, 1);
        let r = self.inner.list_with_delimiter(prefix).await;
        self.count(r)
    }

    async fn copy_opts(&self, from: &Path, to: &Path, options: CopyOptions) -> Result<()> {
        add(&self.counters.puts, 1);
        let r = self.inner.copy_opts(from, to, options).await;
        self.count(r)
    }
}
