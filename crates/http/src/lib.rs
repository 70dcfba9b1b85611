//! bulwark-http: the control plane the daemon serves (`[http]` in its configuration).
//!
//! * `GET /healthz`: anonymous liveness.
//! * JSON resources under `/api/v1` (any valid token): `vms`, `vms/{vm}` (with its points),
//!   `vms/{vm}/points`, `jobs` (`?vm=&limit=`, live progress of running jobs), `jobs/{id}`,
//!   `storage`, `policies`, `leases`.
//! * Actions (an `operator` token): `POST vms/{vm}/run`, `POST jobs/{id}/cancel`,
//!   `POST verify`, `POST vms/{vm}/prune`, `POST vms/{vm}/restore`.
//!
//! * `GET /metrics` (any valid token): Prometheus metrics (OpenMetrics text).
//!
//! Read requests are served from an in-memory view the daemon keeps, not from the job
//! database or the vault (so 200 clients polling cost neither SQLite nor vault listings, and
//! never wait behind a running backup). How fresh it is:
//! * jobs (states, phases, the VMs' last job and protection, `/metrics` job series): a job
//!   that starts or changes phase shows within 250 ms (plus one read of the database); a job
//!   whose end was announced is never served as running: such a request waits for the read
//!   that includes the end (at most 2 s). `GET /jobs/{id}` of a job the view does not hold
//!   yet, and `GET /jobs?vm=` beyond the latest 200 jobs of a configured VM, read the database.
//!   Live progress and cancel requests of running jobs are read per request.
//! * points and leases: read again as soon as a job starts or ends and after a prune through
//!   the API; changes made outside this daemon (CLI, another controller) within 10 s.
//! * storage (`/storage`, the vault series of `/metrics`): measured after each job and, while
//!   someone reads it, whenever the last measurement is 15 s old; a reader is served the last
//!   measurement while a new one is made.
//!
//! When a read of the view fails (the database, the vault's listing), the resources it feeds
//! answer 500 with that error until a read succeeds: the history is tried again every 250 ms,
//! the vault at the next job start or end, API prune, or after 10 s.
//! * `GET /console/` (no token): the web console, static files built into the binary; the
//!   data it shows comes from the API with the token the user pastes into it.
//!
//! Every route but `/healthz` and the console's static files needs `Authorization: Bearer
//! TOKEN`; tokens come from [`new_token`] and the configuration stores only their
//! [`token_sha256`]. Refusals are logged. Off loopback the API is served over TLS (rustls),
//! which the configuration enforces.
//!
//! ```
//! use bulwark_http::{new_token, token_sha256};
//! let token = new_token();
//! assert!(token.starts_with("bwk_"));
//! assert_eq!(token_sha256(&token), token_sha256(&token.clone()));
//! ```

mod api;
mod auth;
mod console;
mod metrics;
mod notify;
mod samples;
mod view;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use axum::Router;
use axum::routing::{get, post};
use bulwark_daemon::Handles;
use bulwark_daemon::config::HttpConfig;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;

pub use auth::{Caller, TOKEN_PREFIX, new_token, token_sha256};

/// Errors of the HTTP front end.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The address cannot be listened on.
    #[error("http listen {addr}: {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// The error.
        #[source]
        source: std::io::Error,
    },
    /// A TLS file cannot be read or used.
    #[error("http TLS {path}: {why}")]
    Tls {
        /// The certificate or key file.
        path: PathBuf,
        /// What is wrong.
        why: String,
    },
}

/// The API, bound to its address and ready to serve.
pub struct Api {
    listener: TcpListener,
    tls: Option<tokio_rustls::TlsAcceptor>,
    router: Router,
}

impl std::fmt::Debug for Api {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Api")
            .field("listener", &self.listener)
            .field("tls", &self.tls.is_some())
            .finish_non_exhaustive()
    }
}

fn tls_acceptor(cert: &Path, key: &Path) -> Result<tokio_rustls::TlsAcceptor, Error> {
    let read = |p: &Path| {
        std::fs::read(p).map_err(|e| Error::Tls {
            path: p.to_path_buf(),
            why: e.to_string(),
        })
    };
    let cert_pem = read(cert)?;
    let key_pem = read(key)?;
    let certs: Vec<_> = rustls_pemfile::certs(&mut cert_pem.as_slice())
        .collect::<Result<_, _>>()
        .map_err(|e| Error::Tls {
            path: cert.to_path_buf(),
            why: e.to_string(),
        })?;
    if certs.is_empty() {
        return Err(Error::Tls {
            path: cert.to_path_buf(),
            why: "no PEM certificate in it".into(),
        });
    }
    let key_der = rustls_pemfile::private_key(&mut key_pem.as_slice())
        .map_err(|e| Error::Tls {
            path: key.to_path_buf(),
            why: e.to_string(),
        })?
        .ok_or_else(|| Error::Tls {
            path: key.to_path_buf(),
            why: "no PEM private key in it".into(),
        })?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .and_then(|b| b.with_no_client_auth().with_single_cert(certs, key_der))
        .map_err(|e| Error::Tls {
            path: cert.to_path_buf(),
            why: e.to_string(),
        })?;
    Ok(tokio_rustls::TlsAcceptor::from(Arc::new(config)))
}

/// The routes over the daemon's handles (after a first read of the view they serve).
async fn router(handles: Handles, http: &HttpConfig) -> Router {
    let app: api::Shared = Arc::new(api::App::new(handles, http.overdue_grace));
    samples::start(app.clone());
    view::start(app.clone()).await;
    let tokens = auth::Tokens(Arc::new(http.tokens.clone()));
    let protected = Router::new()
        .route("/api/v1/vms", get(api::vms))
        .route("/api/v1/vms/{vm}", get(api::vm))
        .route("/api/v1/vms/{vm}/points", get(api::points))
        .route("/api/v1/vms/{vm}/run", post(api::run_now))
        .route("/api/v1/vms/{vm}/prune", post(api::prune))
        .route("/api/v1/vms/{vm}/restore", post(api::restore))
        .route("/api/v1/jobs", get(api::jobs))
        .route("/api/v1/jobs/{id}", get(api::job))
        .route("/api/v1/jobs/{id}/cancel", post(api::cancel))
        .route("/api/v1/verify", post(api::verify))
        .route("/api/v1/storage", get(api::storage))
        .route("/api/v1/policies", get(api::policies))
        .route("/api/v1/leases", get(api::leases))
        .route("/metrics", get(metrics::metrics))
        .route_layer(axum::middleware::from_fn_with_state(
            tokens,
            auth::require_token,
        ))
        .with_state(app);
    Router::new()
        .route("/healthz", get(api::healthz))
        .merge(protected)
        .merge(console::routes())
}

impl Api {
    /// Binds `http.listen` (and loads the TLS certificate and key when configured) for the
    /// daemon whose `handles` are given. Fails before anything is served.
    pub async fn bind(handles: Handles, http: &HttpConfig) -> Result<Api, Error> {
        let tls = match &http.tls {
            Some((cert, key)) => Some(tls_acceptor(cert, key)?),
            None => None,
        };
        let listener = TcpListener::bind(http.listen)
            .await
            .map_err(|source| Error::Bind {
                addr: http.listen,
                source,
            })?;
        Ok(Api {
            listener,
            tls,
            router: router(handles, http).await,
        })
    }

    /// The address actually bound (port 0 picks one).
    pub fn local_addr(&self) -> Option<SocketAddr> {
        self.listener.local_addr().ok()
    }

    /// Whether it serves TLS.
    pub fn is_tls(&self) -> bool {
        self.tls.is_some()
    }

    /// Serves connections until the future is dropped (HTTP/1.1 and HTTP/2; TLS when
    /// configured). A failed handshake or connection ends only that connection.
    pub async fn serve(self) {
        loop {
            let (tcp, peer) = match self.listener.accept().await {
                Ok(c) => c,
                Err(e) => {
                    // Out of file descriptors and the like: wait a little, go on.
                    tracing::warn!(error = %e, "http accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                    continue;
                }
            };
            let _ = tcp.set_nodelay(true);
            let router = self.router.clone().layer(axum::Extension(auth::Peer(peer)));
            let tls = self.tls.clone();
            tokio::spawn(async move {
                let service = TowerToHyperService::new(router);
                let builder = auto::Builder::new(TokioExecutor::new());
                let served = match tls {
                    Some(acceptor) => match tokio::time::timeout(
                        std::time::Duration::from_secs(10),
                        acceptor.accept(tcp),
                    )
                    .await
                    {
                        Ok(Ok(stream)) => {
                            builder
                                .serve_connection(TokioIo::new(stream), service)
                                .await
                        }
                        Ok(Err(e)) => {
                            tracing::debug!(%peer, error = %e, "TLS handshake failed");
                            return;
                        }
                        Err(_) => return,
                    },
                    None => builder.serve_connection(TokioIo::new(tcp), service).await,
                };
                if let Err(e) = served {
                    tracing::debug!(%peer, error = %e, "http connection ended with an error");
                }
            });
        }
    }
}
