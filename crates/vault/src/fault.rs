//! Storage fault injection: [`FaultyStore`] wraps any `ObjectStore` and, driven by a seeded
//! generator, fails requests, answers them after a long stall, slows them down, loses the
//! reply of a request that did happen, or cuts listings short. Tests use it to prove that a
//! backup survives a flaky backend; embedders can use it the same way.
//!
//! ```
//! use std::sync::Arc;
//! use bulwark_vault::fault::{FaultConfig, FaultyStore};
//! let store = FaultyStore::new(object_store::memory::InMemory::new(), FaultConfig {
//!     error_rate: 0.05, timeout_rate: 0.05, ..FaultConfig::seeded(7)
//! });
//! store.set_down(true); // every request fails until set_down(false)
//! # let _ = Arc::new(store);
//! ```

use std::fmt;
use std::ops::Range;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use futures::StreamExt;
use futures::stream::BoxStream;
use object_store::path::Path;
use object_store::{
    CopyOptions, GetOptions, GetResult, ListResult, MultipartUpload, ObjectMeta, ObjectStore,
    PutMultipartOptions, PutOptions, PutPayload, PutResult, Result,
};

/// What [`FaultyStore`] injects. Rates are probabilities per request, in `0.0..=1.0`.
#[derive(Debug, Clone)]
pub struct FaultConfig {
    /// Seed of the generator: the same seed and request order give the same faults.
    pub seed: u64,
    /// Requests failed before they reach the store.
    pub error_rate: f64,
    /// Requests that reach the store but whose reply is lost (an error is returned although
    /// the write happened).
    pub lost_reply_rate: f64,
    /// Requests that stall for `timeout` and then fail, as a client timeout would.
    pub timeout_rate: f64,
    /// How long a timed-out request stalls.
    pub timeout: Duration,
    /// Requests delayed by `slow` and then served.
    pub slow_rate: f64,
    /// The delay of a slow request.
    pub slow: Duration,
    /// Listings cut short: some entries, then an error.
    pub truncated_list_rate: f64,
}

impl FaultConfig {
    /// No faults, with this seed.
    pub fn seeded(seed: u64) -> Self {
        FaultConfig {
            seed,
            error_rate: 0.0,
            lost_reply_rate: 0.0,
            timeout_rate: 0.0,
            timeout: Duration::from_millis(200),
            slow_rate: 0.0,
            slow: Duration::from_millis(50),
            truncated_list_rate: 0.0,
        }
    }
}

/// Counts of what was injected.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct FaultStats {
    /// Requests seen.
    pub requests: u64,
    /// Errors injected before the request reached the store.
    pub errors: u64,
    /// Replies lost after the request reached the store.
    pub lost_replies: u64,
    /// Timeouts injected.
    pub timeouts: u64,
    /// Slow requests.
    pub slow: u64,
    /// Listings cut short.
    pub truncated_lists: u64,
    /// Requests refused while the store was down.
    pub refused_down: u64,
}

#[derive(Debug, Default)]
struct Counters {
    requests: AtomicU64,
    errors: AtomicU64,
    lost_replies: AtomicU64,
    timeouts: AtomicU64,
    slow: AtomicU64,
    truncated_lists: AtomicU64,
    refused_down: AtomicU64,
}

/// An `ObjectStore` that injects faults into the requests it forwards to `inner`.
#[derive(Debug)]
pub struct FaultyStore<T: ObjectStore> {
    inner: T,
    config: FaultConfig,
    rng: Mutex<u64>,
    down: AtomicBool,
    enabled: AtomicBool,
    counters: Counters,
}

enum Before {
    Pass,
    Slow(Duration),
    Fail(&'static str),
    Timeout(Duration),
}

fn injected(what: &str, location: &str) -> object_store::Error {
    object_store::Error::Generic {
        store: "FaultyStore",
        source: format!("injected fault: {what} ({location})").into(),
    }
}

fn bump(c: &AtomicU64) {
    c.fetch_add(1, Ordering::Relaxed);
}

impl<T: ObjectStore> FaultyStore<T> {
    /// Wraps `inner`.
    pub fn new(inner: T, config: FaultConfig) -> Self {
        FaultyStore {
            inner,
            rng: Mutex::new(config.seed ^ 0x9E37_79B9_7F4A_7C15),
            config,
            down: AtomicBool::new(false),
            enabled: AtomicBool::new(true),
            counters: Counters::default(),
        }
    }

    /// The wrapped store.
    pub fn inner(&self) -> &T {
        &self.inner
    }

    /// Takes the store "down" (every request fails at once) or back up.
    pub fn set_down(&self, down: bool) {
        self.down.store(down, Ordering::SeqCst);
    }

    /// Turns random faults on or off (the "down" switch works either way).
    pub fn set_enabled(&self, on: bool) {
        self.enabled.store(on, Ordering::SeqCst);
    }

    /// What was injected so far.
    pub fn stats(&self) -> FaultStats {
        let l = |a: &AtomicU64| a.load(Ordering::Relaxed);
        let c = &self.counters;
        FaultStats {
            requests: l(&c.requests),
            errors: l(&c.errors),
            lost_replies: l(&c.lost_replies),
            timeouts: l(&c.timeouts),
            slow: l(&c.slow),
            truncated_lists: l(&c.truncated_lists),
            refused_down: l(&c.refused_down),
        }
    }

    /// A uniform number in [0, 1) from the seeded SplitMix64 generator.
    fn roll(&self) -> f64 {
        let mut s = match self.rng.lock() {
            Ok(g) => g,
            Err(poisoned) => poisoned.into_inner(),
        };
        *s = s.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = *s;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^= z >> 31;
        (z >> 11) as f64 / (1u64 << 53) as f64
    }

    fn decide(&self) -> Before {
        bump(&self.counters.requests);
        if self.down.load(Ordering::SeqCst) {
            bump(&self.counters.refused_down);
            return Before::Fail("store is down");
        }
        if !self.enabled.load(Ordering::SeqCst) {
            return Before::Pass;
        }
        let c = &self.config;
        let x = self.roll();
        if x < c.error_rate {
            bump(&self.counters.errors);
            Before::Fail("request failed")
        } else if x < c.error_rate + c.timeout_rate {
            bump(&self.counters.timeouts);
            Before::Timeout(c.timeout)
        } else if x < c.error_rate + c.timeout_rate + c.slow_rate {
            bump(&self.counters.slow);
            Before::Slow(c.slow)
        } else {
            Before::Pass
        }
    }

    async fn before(&self, location: &Path) -> Result<()> {
        match self.decide() {
            Before::Pass => Ok(()),
            Before::Slow(d) => {
                tokio::time::sleep(d).await;
                Ok(())
            }
            Before::Fail(what) => Err(injected(what, location.as_ref())),
            Before::Timeout(d) => {
                tokio::time::sleep(d).await;
                Err(injected("request timed out", location.as_ref()))
            }
        }
    }

    fn after<R>(&self, location: &Path, r: Result<R>) -> Result<R> {
        if r.is_ok()
            && self.enabled.load(Ordering::SeqCst)
            && self.roll() < self.config.lost_reply_rate
        {
            bump(&self.counters.lost_replies);
            return Err(injected(
                "connection reset before the reply",
                location.as_ref(),
            ));
        }
        r
    }
}

impl<T: ObjectStore> fmt::Display for FaultyStore<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Faulty({})", self.inner)
    }
}

#[async_trait]
impl<T: ObjectStore> ObjectStore for FaultyStore<T> {
    async fn put_opts(
        &self,
        location: &Path,
        payload: PutPayload,
        opts: PutOptions,
    ) -> Result<PutResult> {
        self.before(location).await?;
        let r = self.inner.put_opts(location, payload, opts).await;
        self.after(location, r)
    }

    async fn put_multipart_opts(
        &self,
        location: &Path,
        opts: PutMultipartOptions,
    ) -> Result<Box<dyn MultipartUpload>> {
        self.before(location).await?;
        self.inner.put_multipart_opts(location, opts).await
    }

    async fn get_opts(&self, location: &Path, options: GetOptions) -> Result<GetResult> {
        self.before(location).await?;
        let r = self.inner.get_opts(location, options).await;
        self.after(location, r)
    }

    async fn get_ranges(&self, location: &Path, ranges: &[Range<u64>]) -> Result<Vec<Bytes>> {
        self.before(location).await?;
        self.inner.get_ranges(location, ranges).await
    }

    fn delete_stream(
        &self,
        locations: BoxStream<'static, Result<Path>>,
    ) -> BoxStream<'static, Result<Path>> {
        if self.down.load(Ordering::SeqCst) {
            bump(&self.counters.refused_down);
            return futures::stream::once(async { Err(injected("store is down", "delete")) })
                .boxed();
        }
        self.inner.delete_stream(locations)
    }

    fn list(&self, prefix: Option<&Path>) -> BoxStream<'static, Result<ObjectMeta>> {
        let at = prefix.map(|p| p.to_string()).unwrap_or_default();
        let before = self.decide();
        let truncate = matches!(before, Before::Pass)
            && self.enabled.load(Ordering::SeqCst)
            && self.roll() < self.config.truncated_list_rate;
        let keep = (self.roll() * 8.0) as usize;
        let inner = self.inner.list(prefix);
        match before {
            Before::Fail(what) => {
                futures::stream::once(async move { Err(injected(what, &at)) }).boxed()
            }
            Before::Timeout(d) => futures::stream::once(async move {
                tokio::time::sleep(d).await;
                Err(injected("listing timed out", &at))
            })
            .boxed(),
            Before::Slow(d) => futures::stream::once(async move {
                tokio::time::sleep(d).await;
                inner
            })
            .flatten()
            .boxed(),
            Before::Pass if truncate => {
                bump(&self.counters.truncated_lists);
                inner
                    .take(keep)
                    .chain(futures::stream::once(async move {
                        Err(injected("listing cut short", &at))
                    }))
                    .boxed()
            }
            Before::Pass => inner,
        }
    }

    async fn list_with_delimiter(&self, prefix: Option<&Path>) -> Result<ListResult> {
        let at = prefix.cloned().unwrap_or_default();
        self.before(&at).await?;
        self.inner.list_with_delimiter(prefix).await
    }

    async fn copy_opts(&self, from: &Path, to: &Path, options: CopyOptions) -> Result<()> {
        self.before(to).await?;
        let r = self.inner.copy_opts(from, to, options).await;
        self.after(to, r)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use object_store::ObjectStoreExt;
    use object_store::memory::InMemory;

    #[tokio::test]
    async fn same_seed_same_faults_and_down_switch() {
        let cfg = FaultConfig {
            error_rate: 0.3,
            ..FaultConfig::seeded(42)
        };
        let mut outcomes = Vec::new();
        for _ in 0..2 {
            let s = FaultyStore::new(InMemory::new(), cfg.clone());
            let mut o = Vec::new();
            for i in 0..50 {
                let p = Path::from(format!("k{i}"));
                o.push(s.put(&p, PutPayload::from_static(b"x")).await.is_ok());
            }
            outcomes.push(o);
        }
        assert_eq!(outcomes[0], outcomes[1]);
        let fails = outcomes[0].iter().filter(|ok| !**ok).count();
        assert!((5..=30).contains(&fails), "{fails} of 50 failed at 30%");

        let s = FaultyStore::new(InMemory::new(), FaultConfig::seeded(1));
        s.set_down(true);
        assert!(s.head(&Path::from("x")).await.is_err());
        s.set_down(false);
        assert!(matches!(
            s.head(&Path::from("x")).await,
            Err(object_store::Error::NotFound { .. })
        ));
    }

    #[tokio::test]
    async fn lost_replies_still_write_and_listings_get_cut() {
        let s = FaultyStore::new(
            InMemory::new(),
            FaultConfig {
                lost_reply_rate: 1.0,
                ..FaultConfig::seeded(3)
            },
        );
        let p = Path::from("a");
        assert!(s.put(&p, PutPayload::from_static(b"x")).await.is_err());
        s.set_enabled(false);
        assert!(s.head(&p).await.is_ok(), "the write happened");

        let s = FaultyStore::new(
            InMemory::new(),
            FaultConfig {
                truncated_list_rate: 1.0,
                ..FaultConfig::seeded(4)
            },
        );
        for i in 0..20 {
            s.inner()
                .put(&Path::from(format!("d/{i}")), PutPayload::from_static(b"x"))
                .await
                .unwrap();
        }
        let items: Vec<_> = s.list(Some(&Path::from("d"))).collect().await;
        assert!(items.last().unwrap().is_err());
        assert!(items.len() <= 9);
    }
}
