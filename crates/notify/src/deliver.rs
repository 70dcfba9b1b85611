//! Delivery: one bounded queue and one worker task per route, retries with exponential
//! backoff. [`Notifier::notify`] never waits: when a route's queue is full (a dead receiver
//! while events keep coming) the event is dropped for that route, logged and counted.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::sync::mpsc;

use crate::config::{NotifyConfig, RETRY_MAX, SmtpRoute, SmtpTls, WebhookRoute};
use crate::event::{Event, EventKind};
use crate::sign;

/// How long one webhook attempt may take.
const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(15);

/// The wait before attempt `attempt + 1` (after `attempt` failed, counting from 0):
/// `initial * 2^attempt`, at most `max`.
pub fn backoff(attempt: u32, initial: Duration, max: Duration) -> Duration {
    let factor = 1u32.checked_shl(attempt.min(31)).unwrap_or(u32::MAX);
    initial.checked_mul(factor).unwrap_or(max).min(max)
}

/// Why one attempt failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Failure {
    /// Worth another attempt (connection refused, timeout, 5xx, 429, a transient SMTP reply).
    Retry(String),
    /// Not worth another (4xx, a refused address, a bad message).
    Permanent(String),
}

pub(crate) type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// One route's way of sending.
pub(crate) trait Transport: Send + Sync + 'static {
    /// For logs: `webhook https://...`, `smtp mail.example.org:587`.
    fn name(&self) -> String;
    /// One attempt.
    fn send<'a>(&'a self, event: &'a Event) -> BoxFuture<'a, Result<(), Failure>>;
}

/// Counts since the daemon started, over every route.
#[derive(Debug, Default)]
struct Counters {
    sent: AtomicU64,
    failed: AtomicU64,
    dropped: AtomicU64,
    retries: AtomicU64,
}

/// What the notifier did since it started (over every route).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Stats {
    /// Deliveries a receiver accepted.
    pub sent: u64,
    /// Deliveries given up (attempts exhausted, or refused for good).
    pub failed: u64,
    /// Deliveries dropped because the route's queue was full.
    pub dropped: u64,
    /// Attempts that failed and were retried.
    pub retries: u64,
}

struct Route {
    events: Vec<EventKind>,
    name: String,
    queue: mpsc::Sender<Arc<Event>>,
}

/// The handle the daemon sends events to (cheap to clone).
#[derive(Clone)]
pub struct Notifier {
    routes: Arc<[Route]>,
    counters: Arc<Counters>,
}

impl std::fmt::Debug for Notifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Notifier")
            .field(
                "routes",
                &self.routes.iter().map(|r| &r.name).collect::<Vec<_>>(),
            )
            .finish_non_exhaustive()
    }
}

#[derive(Clone, Copy)]
struct Retry {
    max_attempts: u32,
    initial: Duration,
}

impl Notifier {
    /// Starts a worker per route of `config` (on the current tokio runtime).
    pub fn start(config: &NotifyConfig) -> Result<Notifier, crate::Error> {
        let mut transports: Vec<(Vec<EventKind>, Arc<dyn Transport>)> = Vec::new();
        if !config.webhooks.is_empty() {
            let client = http_client()?;
            for w in &config.webhooks {
                transports.push((
                    w.events.clone(),
                    Arc::new(Webhook {
                        route: w.clone(),
                        client: client.clone(),
                    }),
                ));
            }
        }
        for s in &config.smtp {
            transports.push((s.events.clone(), Arc::new(Smtp::new(s)?)));
        }
        let retry = Retry {
            max_attempts: config.max_attempts,
            initial: config.retry_initial,
        };
        Ok(Notifier::with_transports(transports, config.queue, retry))
    }

    fn with_transports(
        transports: Vec<(Vec<EventKind>, Arc<dyn Transport>)>,
        queue: usize,
        retry: Retry,
    ) -> Notifier {
        let counters = Arc::new(Counters::default());
        let routes: Vec<Route> = transports
            .into_iter()
            .map(|(events, t)| {
                let (tx, rx) = mpsc::channel(queue.max(1));
                let name = t.name();
                tokio::spawn(worker(t, rx, retry, counters.clone()));
                Route {
                    events,
                    name,
                    queue: tx,
                }
            })
            .collect();
        Notifier {
            routes: routes.into(),
            counters,
        }
    }

    /// Queues `event` for every route that takes its kind; never waits.
    pub fn notify(&self, event: Event) {
        let event = Arc::new(event);
        tracing::info!(id = %event.id, kind = %event.kind, summary = %event.summary, "notification");
        for r in self
            .routes
            .iter()
            .filter(|r| r.events.contains(&event.kind))
        {
            if let Err(e) = r.queue.try_send(event.clone()) {
                self.counters.dropped.fetch_add(1, Ordering::Relaxed);
                let why = match e {
                    mpsc::error::TrySendError::Full(_) => "its queue is full",
                    mpsc::error::TrySendError::Closed(_) => "its worker stopped",
                };
                tracing::error!(route = %r.name, id = %event.id, "notification dropped: {why}");
            }
        }
    }

    /// Whether any route takes `kind`.
    pub fn wants(&self, kind: EventKind) -> bool {
        self.routes.iter().any(|r| r.events.contains(&kind))
    }

    /// What was delivered, given up and dropped so far.
    pub fn stats(&self) -> Stats {
        let c = &self.counters;
        Stats {
            sent: c.sent.load(Ordering::Relaxed),
            failed: c.failed.load(Ordering::Relaxed),
            dropped: c.dropped.load(Ordering::Relaxed),
            retries: c.retries.load(Ordering::Relaxed),
        }
    }
}

async fn worker(
    t: Arc<dyn Transport>,
    mut rx: mpsc::Receiver<Arc<Event>>,
    retry: Retry,
    counters: Arc<Counters>,
) {
    let name = t.name();
    while let Some(event) = rx.recv().await {
        let mut attempt = 0u32;
        loop {
            match t.send(&event).await {
                Ok(()) => {
                    counters.sent.fetch_add(1, Ordering::Relaxed);
                    tracing::debug!(route = %name, id = %event.id, attempt, "notification delivered");
                    break;
                }
                Err(Failure::Retry(why)) if attempt + 1 < retry.max_attempts => {
                    let wait = backoff(attempt, retry.initial, RETRY_MAX);
                    counters.retries.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(route = %name, id = %event.id, attempt, error = %why, wait_ms = wait.as_millis() as u64, "notification failed; retrying");
                    tokio::time::sleep(wait).await;
                    attempt += 1;
                }
                Err(Failure::Retry(why) | Failure::Permanent(why)) => {
                    counters.failed.fetch_add(1, Ordering::Relaxed);
                    tracing::error!(route = %name, id = %event.id, attempts = attempt + 1, error = %why, "notification given up");
                    break;
                }
            }
        }
    }
}

fn http_client() -> Result<reqwest::Client, crate::Error> {
    // reqwest is built without a TLS provider of its own; ring's is the process's (as the
    // vault installs it too). Already installed is fine.
    let _ = rustls::crypto::ring::default_provider().install_default();
    reqwest::Client::builder()
        .timeout(ATTEMPT_TIMEOUT)
        .redirect(reqwest::redirect::Policy::none())
        .user_agent(concat!("bulwark/", env!("CARGO_PKG_VERSION")))
        .build()
        .map_err(|e| crate::Error::Client(e.to_string()))
}

struct Webhook {
    route: WebhookRoute,
    client: reqwest::Client,
}

impl Transport for Webhook {
    fn name(&self) -> String {
        format!("webhook {}", self.route.url)
    }

    fn send<'a>(&'a self, event: &'a Event) -> BoxFuture<'a, Result<(), Failure>> {
        Box::pin(async move {
            let body = event.body();
            let ts = jiff::Timestamp::now().as_second();
            let sig = sign::signature(&self.route.secret, ts, &body);
            let resp = self
                .client
                .post(self.route.url.clone())
                .header(reqwest::header::CONTENT_TYPE, "application/json")
                .header(sign::TIMESTAMP_HEADER, ts.to_string())
                .header(sign::SIGNATURE_HEADER, sig)
                .header(sign::EVENT_ID_HEADER, event.id.as_str())
                .header(sign::EVENT_HEADER, event.kind.as_str())
                .body(body)
                .send()
                .await
                .map_err(|e| Failure::Retry(e.to_string()))?;
            let status = resp.status();
            if status.is_success() {
                Ok(())
            } else if status.is_server_error()
                || status == reqwest::StatusCode::TOO_MANY_REQUESTS
                || status == reqwest::StatusCode::REQUEST_TIMEOUT
            {
                Err(Failure::Retry(format!("HTTP {status}")))
            } else {
                Err(Failure::Permanent(format!("HTTP {status}")))
            }
        })
    }
}

type SmtpTransport = lettre::AsyncSmtpTransport<lettre::Tokio1Executor>;

struct Smtp {
    route: SmtpRoute,
    transport: SmtpTransport,
}

impl Smtp {
    fn new(route: &SmtpRoute) -> Result<Smtp, crate::Error> {
        use lettre::transport::smtp::authentication::Credentials;
        let _ = rustls::crypto::ring::default_provider().install_default();
        let bad = |e: lettre::transport::smtp::Error| {
            crate::Error::Client(format!("smtp {}: {e}", route.server))
        };
        let builder = match route.tls {
            SmtpTls::StartTls => SmtpTransport::starttls_relay(&route.server).map_err(bad)?,
            SmtpTls::Tls => SmtpTransport::relay(&route.server).map_err(bad)?,
            SmtpTls::None => SmtpTransport::builder_dangerous(&route.server),
        };
        let mut builder = builder.port(route.port).timeout(Some(ATTEMPT_TIMEOUT));
        if let Some((u, p)) = &route.credentials {
            builder = builder.credentials(Credentials::new(u.clone(), p.clone()));
        }
        Ok(Smtp {
            route: route.clone(),
            transport: builder.build(),
        })
    }
}

impl Transport for Smtp {
    fn name(&self) -> String {
        format!("smtp {}:{}", self.route.server, self.route.port)
    }

    fn send<'a>(&'a self, event: &'a Event) -> BoxFuture<'a, Result<(), Failure>> {
        Box::pin(async move {
            use lettre::AsyncTransport;
            let mut m = lettre::Message::builder()
                .from(self.route.from.clone())
                .subject(event.subject())
                .header(lettre::message::header::ContentType::TEXT_PLAIN);
            for to in &self.route.to {
                m = m.to(to.clone());
            }
            let message = m
                .body(event.text())
                .map_err(|e| Failure::Permanent(format!("message: {e}")))?;
            match self.transport.send(message).await {
                Ok(_) => Ok(()),
                Err(e) if e.is_permanent() => Err(Failure::Permanent(e.to_string())),
                Err(e) => Err(Failure::Retry(e.to_string())),
            }
        })
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use std::sync::Mutex;

    use super::*;

    #[test]
    fn backoff_doubles_up_to_the_cap() {
        let s = Duration::from_secs(1);
        let waits: Vec<u64> = (0..12)
            .map(|a| backoff(a, s, RETRY_MAX).as_secs())
            .collect();
        assert_eq!(waits, [1, 2, 4, 8, 16, 32, 64, 128, 256, 300, 300, 300]);
        assert_eq!(backoff(u32::MAX, s, RETRY_MAX), RETRY_MAX);
        assert_eq!(
            backoff(3, Duration::from_millis(100), RETRY_MAX),
            Duration::from_millis(800)
        );
    }

    /// Fails the first `fail` attempts of each event (retryable), records every attempt with
    /// its time; `hang` never answers.
    struct Fake {
        fail: u32,
        hang: bool,
        attempts: Mutex<Vec<(String, tokio::time::Instant)>>,
    }

    impl Transport for Fake {
        fn name(&self) -> String {
            "fake".into()
        }
        fn send<'a>(&'a self, event: &'a Event) -> BoxFuture<'a, Result<(), Failure>> {
            Box::pin(async move {
                if self.hang {
                    std::future::pending::<()>().await;
                }
                let mut a = self.attempts.lock().unwrap();
                a.push((event.id.clone(), tokio::time::Instant::now()));
                let n = a.iter().filter(|(id, _)| *id == event.id).count() as u32;
                if n <= self.fail {
                    Err(Failure::Retry("503".into()))
                } else {
                    Ok(())
                }
            })
        }
    }

    fn fake(fail: u32, hang: bool) -> Arc<Fake> {
        Arc::new(Fake {
            fail,
            hang,
            attempts: Mutex::new(Vec::new()),
        })
    }

    fn event(id: &str, kind: EventKind) -> Event {
        Event {
            id: id.into(),
            kind,
            at: jiff::Timestamp::UNIX_EPOCH,
            vm: Some("vm".into()),
            job: None,
            summary: "s".into(),
            details: serde_json::Value::Null,
        }
    }

    const RETRY: Retry = Retry {
        max_attempts: 4,
        initial: Duration::from_secs(1),
    };

    async fn settle() {
        for _ in 0..50 {
            tokio::task::yield_now().await;
        }
    }

    #[tokio::test(start_paused = true)]
    async fn retries_with_backoff_then_delivers_once() {
        let f = fake(2, false);
        let n = Notifier::with_transports(vec![(vec![EventKind::JobFailed], f.clone())], 8, RETRY);
        let start = tokio::time::Instant::now();
        n.notify(event("a", EventKind::JobFailed));
        tokio::time::sleep(Duration::from_secs(10)).await;
        let at: Vec<u64> = f
            .attempts
            .lock()
            .unwrap()
            .iter()
            .map(|(_, t)| t.duration_since(start).as_secs())
            .collect();
        // Fails at 0 s, waits 1 s, fails, waits 2 s, succeeds.
        assert_eq!(at, [0, 1, 3]);
        assert_eq!(
            n.stats(),
            Stats {
                sent: 1,
                failed: 0,
                dropped: 0,
                retries: 2
            }
        );
    }

    #[tokio::test(start_paused = true)]
    async fn gives_up_after_max_attempts() {
        let f = fake(100, false);
        let n = Notifier::with_transports(vec![(vec![EventKind::JobFailed], f.clone())], 8, RETRY);
        n.notify(event("a", EventKind::JobFailed));
        tokio::time::sleep(Duration::from_secs(60)).await;
        assert_eq!(f.attempts.lock().unwrap().len(), 4);
        assert_eq!(n.stats().failed, 1);
        assert_eq!(n.stats().sent, 0);
    }

    #[tokio::test(start_paused = true)]
    async fn routes_by_kind() {
        let failed = fake(0, false);
        let overdue = fake(0, false);
        let n = Notifier::with_transports(
            vec![
                (vec![EventKind::JobFailed], failed.clone()),
                (
                    vec![EventKind::VmOverdue, EventKind::JobFailed],
                    overdue.clone(),
                ),
            ],
            8,
            RETRY,
        );
        n.notify(event("f", EventKind::JobFailed));
        n.notify(event("o", EventKind::VmOverdue));
        n.notify(event("w", EventKind::JobWarnings));
        settle().await;
        let ids = |f: &Fake| -> Vec<String> {
            f.attempts
                .lock()
                .unwrap()
                .iter()
                .map(|(i, _)| i.clone())
                .collect()
        };
        assert_eq!(ids(&failed), ["f"]);
        assert_eq!(ids(&overdue), ["f", "o"]);
        assert!(n.wants(EventKind::VmOverdue) && !n.wants(EventKind::VerifyDamage));
    }

    #[tokio::test(start_paused = true)]
    async fn a_dead_receiver_never_blocks_and_memory_stays_bounded() {
        let dead = fake(0, true);
        let alive = fake(0, false);
        let n = Notifier::with_transports(
            vec![
                (vec![EventKind::JobFailed], dead.clone()),
                (vec![EventKind::JobFailed], alive.clone()),
            ],
            4,
            RETRY,
        );
        for i in 0..1000 {
            // notify returns at once even though the dead route never answers.
            n.notify(event(&format!("e{i}"), EventKind::JobFailed));
            // Let the live route's worker drain its queue between events.
            settle().await;
        }
        let s = n.stats();
        // The dead route holds one in its worker and 4 queued; the rest were dropped there.
        assert_eq!(s.dropped, 1000 - 5, "{s:?}");
        // The live route got every event, each once.
        assert_eq!(alive.attempts.lock().unwrap().len(), 1000);
        assert_eq!(s.sent, 1000);
        assert!(dead.attempts.lock().unwrap().is_empty());
    }
}
