//! Retries of idempotent vault requests after transient storage failures.
//!
//! The cloud clients retry by themselves; a local directory or a wrapping store does not, and a
//! request can still fail after the client gave up. The vault retries reads, existence checks,
//! listings and create-only writes (where an "already exists" answer after a retry means an
//! earlier attempt landed) a few times with exponential backoff.

use std::future::Future;
use std::time::Duration;

/// How the vault retries its own requests.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetryPolicy {
    /// Attempts in all (1 = no retry).
    pub attempts: u32,
    /// Backoff before the second attempt; doubles each time.
    pub initial_backoff: Duration,
    /// Largest backoff.
    pub max_backoff: Duration,
}

impl Default for RetryPolicy {
    /// 5 attempts, 50 ms doubling up to 1 s: about 2 s of patience in all.
    fn default() -> Self {
        RetryPolicy {
            attempts: 5,
            initial_backoff: Duration::from_millis(50),
            max_backoff: Duration::from_secs(1),
        }
    }
}

impl RetryPolicy {
    /// For cloud stores, whose client already retries each request: 2 attempts.
    pub fn remote() -> Self {
        RetryPolicy {
            attempts: 2,
            initial_backoff: Duration::from_millis(200),
            max_backoff: Duration::from_secs(1),
        }
    }

    /// No retries.
    pub fn none() -> Self {
        RetryPolicy {
            attempts: 1,
            ..Default::default()
        }
    }
}

/// Whether an error may go away by itself: network and server failures, timeouts. Answers
/// about the object (not found, exists, precondition) and configuration errors are final.
pub fn is_transient(e: &object_store::Error) -> bool {
    matches!(
        e,
        object_store::Error::Generic { .. } | object_store::Error::JoinError { .. }
    )
}

/// Runs `op(attempt)` (attempt counts from 0) until it succeeds, fails with a final error, or
/// the attempts are used up.
pub async fn retry<T, F, Fut>(
    policy: &RetryPolicy,
    what: &str,
    mut op: F,
) -> Result<T, object_store::Error>
where
    F: FnMut(u32) -> Fut,
    Fut: Future<Output = Result<T, object_store::Error>>,
{
    let mut backoff = policy.initial_backoff;
    let mut attempt = 0;
    loop {
        match op(attempt).await {
            Ok(v) => return Ok(v),
            Err(e) if is_transient(&e) && attempt + 1 < policy.attempts.max(1) => {
                tracing::debug!(what, attempt, error = %e, "transient storage error, retrying");
                // Jitter so parallel requests do not retry in lockstep.
                let jitter = backoff.mul_f64(rand::random::<f64>() * 0.5);
                tokio::time::sleep(backoff + jitter).await;
                backoff = (backoff * 2).min(policy.max_backoff);
                attempt += 1;
            }
            Err(e) => return Err(e),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU32, Ordering};

    fn generic() -> object_store::Error {
        object_store::Error::Generic {
            store: "t",
            source: "boom".into(),
        }
    }

    #[tokio::test]
    async fn retries_transient_until_success_and_stops_on_final() {
        let p = RetryPolicy {
            initial_backoff: Duration::from_millis(1),
            ..Default::default()
        };
        let n = AtomicU32::new(0);
        let r = retry(&p, "x", |_| async {
            if n.fetch_add(1, Ordering::SeqCst) < 3 {
                Err(generic())
            } else {
                Ok(7)
            }
        })
        .await;
        assert_eq!(r.unwrap(), 7);
        assert_eq!(n.load(Ordering::SeqCst), 4);

        let n = AtomicU32::new(0);
        let r: Result<(), _> = retry(&p, "x", |_| async {
            n.fetch_add(1, Ordering::SeqCst);
            Err(object_store::Error::NotFound {
                path: "x".into(),
                source: "no".into(),
            })
        })
        .await;
        assert!(r.is_err());
        assert_eq!(n.load(Ordering::SeqCst), 1, "not found is final");

        let n = AtomicU32::new(0);
        let r: Result<(), _> = retry(&p, "x", |_| async {
            n.fetch_add(1, Ordering::SeqCst);
            Err(generic())
        })
        .await;
        assert!(r.is_err());
        assert_eq!(n.load(Ordering::SeqCst), 5, "gives up after the attempts");
    }
}
