//! TCP with mutual TLS (rustls, ring provider, TLS 1.3 only).
//!
//! Both sides trust exactly one CA, the controller's (created at enrollment): the agent
//! requires a client certificate signed by it with the `clientAuth` usage, the controller
//! requires the agent's certificate to be signed by it, to carry the `serverAuth` usage and to
//! name the host it dialled. No system roots are used.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::server::WebPkiClientVerifier;
use rustls::{ClientConfig, RootCertStore, ServerConfig};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::{TlsAcceptor, TlsConnector};

use crate::codec::{Connection, io_error};
use crate::error::Error;
use crate::server::{Handler, ServeOptions, serve};

/// The TLS stream of an agent's connection.
pub type ServerTlsStream = tokio_rustls::server::TlsStream<TcpStream>;
/// The TLS stream of a controller's connection.
pub type ClientTlsStream = tokio_rustls::client::TlsStream<TcpStream>;

/// Default limit of [`connect_tcp`]: TCP connect and TLS handshake together.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// The three PEM files of one side of a connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    /// The controller's CA certificate: the only trust anchor.
    pub ca_cert: PathBuf,
    /// This side's certificate (chain), signed by the CA.
    pub cert: PathBuf,
    /// This side's private key (PKCS#8, SEC1 or PKCS#1 PEM).
    pub key: PathBuf,
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn load_roots(path: &Path) -> Result<Arc<RootCertStore>, Error> {
    let certs = load_certs(path, "CA certificate")?;
    let mut roots = RootCertStore::empty();
    for cert in certs {
        roots.add(cert).map_err(|e| Error::Pem {
            path: path.to_owned(),
            what: "CA certificate",
            message: e.to_string(),
        })?;
    }
    Ok(Arc::new(roots))
}

fn load_certs(path: &Path, what: &'static str) -> Result<Vec<CertificateDer<'static>>, Error> {
    let pem_error = |message: String| Error::Pem {
        path: path.to_owned(),
        what,
        message,
    };
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|e| pem_error(e.to_string()))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| pem_error(e.to_string()))?;
    if certs.is_empty() {
        return Err(pem_error("no CERTIFICATE section found".to_owned()));
    }
    Ok(certs)
}

fn load_key(path: &Path) -> Result<PrivateKeyDer<'static>, Error> {
    warn_if_key_readable_by_others(path);
    PrivateKeyDer::from_pem_file(path).map_err(|e| Error::Pem {
        path: path.to_owned(),
        what: "private key",
        message: e.to_string(),
    })
}

fn warn_if_key_readable_by_others(path: &Path) {
    use std::os::unix::fs::PermissionsExt;
    if let Ok(meta) = std::fs::metadata(path) {
        let mode = meta.permissions().mode();
        if mode & 0o077 != 0 {
            tracing::warn!(path = %path.display(), mode = format_args!("{mode:o}"), "private key is accessible to group or others; expected mode 0600");
        }
    }
}

fn tls_error(what: &'static str) -> impl FnOnce(rustls::Error) -> Error {
    move |source| Error::TlsConfig { what, source }
}

/// Builds the agent's TLS configuration: its own certificate and key, and a client verifier
/// that demands a certificate signed by the CA in `files.ca_cert` (no anonymous clients).
pub fn server_config(files: &TlsFiles) -> Result<Arc<ServerConfig>, Error> {
    let provider = provider();
    let roots = load_roots(&files.ca_cert)?;
    let verifier = WebPkiClientVerifier::builder_with_provider(roots, provider.clone()).build()?;
    let certs = load_certs(&files.cert, "agent certificate")?;
    let key = load_key(&files.key)?;
    let config = ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(tls_error("protocol versions"))?
        .with_client_cert_verifier(verifier)
        .with_single_cert(certs, key)
        .map_err(tls_error("agent certificate and key"))?;
    Ok(Arc::new(config))
}

/// Builds the controller's TLS configuration: the CA in `files.ca_cert` as the only trust
/// anchor for agents, and the controller's client certificate and key.
pub fn client_config(files: &TlsFiles) -> Result<Arc<ClientConfig>, Error> {
    let provider = provider();
    let roots = load_roots(&files.ca_cert)?;
    let certs = load_certs(&files.cert, "controller certificate")?;
    let key = load_key(&files.key)?;
    let config = ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(tls_error("protocol versions"))?
        .with_root_certificates(roots)
        .with_client_auth_cert(certs, key)
        .map_err(tls_error("controller certificate and key"))?;
    Ok(Arc::new(config))
}

/// Connects to an agent at `addr` (a `SocketAddr`, or `"host:port"` which is resolved) and
/// completes the TLS handshake within [`CONNECT_TIMEOUT`].
///
/// `server_name` is the DNS name or IP address the agent's certificate must carry (the name
/// given at enrollment). Note that with TLS 1.3 the agent checks the controller's certificate
/// after the client considers the handshake done: a refused controller certificate shows up
/// as an error on the first call, not here.
pub async fn connect_tcp<A>(
    addr: A,
    server_name: &str,
    config: Arc<ClientConfig>,
) -> Result<Connection<ClientTlsStream>, Error>
where
    A: tokio::net::ToSocketAddrs + std::fmt::Display,
{
    let peer = addr.to_string();
    let name =
        ServerName::try_from(server_name.to_owned()).map_err(|e| Error::InvalidServerName {
            name: server_name.to_owned(),
            message: e.to_string(),
        })?;
    let connect = async {
        let tcp = TcpStream::connect(addr)
            .await
            .map_err(|source| io_error(&peer, "connecting", source))?;
        let _ = tcp.set_nodelay(true);
        TlsConnector::from(config)
            .connect(name, tcp)
            .await
            .map_err(|source| Error::Handshake {
                peer: peer.clone(),
                source,
            })
    };
    let tls = tokio::time::timeout(CONNECT_TIMEOUT, connect)
        .await
        .map_err(|_| Error::Timeout {
            peer: peer.clone(),
            action: "connecting",
            after: CONNECT_TIMEOUT,
        })??;
    Ok(Connection::new(tls, peer))
}

/// The agent's TCP listener with mutual TLS.
pub struct TlsListener {
    listener: TcpListener,
    acceptor: TlsAcceptor,
}

impl std::fmt::Debug for TlsListener {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsListener")
            .field("listener", &self.listener)
            .finish_non_exhaustive()
    }
}

/// An accepted TCP connection whose TLS handshake has not run yet. Run it with
/// [`handshake`](PendingTls::handshake), ideally in a task of its own, so that a slow client
/// does not hold up the others.
pub struct PendingTls {
    tcp: TcpStream,
    peer: SocketAddr,
    acceptor: TlsAcceptor,
}

impl std::fmt::Debug for PendingTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PendingTls")
            .field("peer", &self.peer)
            .finish_non_exhaustive()
    }
}

impl PendingTls {
    /// The client's address.
    pub fn peer_addr(&self) -> SocketAddr {
        self.peer
    }

    /// Runs the TLS handshake within `timeout`. Fails with [`Error::Handshake`] when the client
    /// sends no certificate or one not signed by the CA.
    pub async fn handshake(self, timeout: Duration) -> Result<Connection<ServerTlsStream>, Error> {
        let peer = self.peer.to_string();
        let tls = tokio::time::timeout(timeout, self.acceptor.accept(self.tcp))
            .await
            .map_err(|_| Error::Timeout {
                peer: peer.clone(),
                action: "TLS handshake",
                after: timeout,
            })?
            .map_err(|source| Error::Handshake {
                peer: peer.clone(),
                source,
            })?;
        Ok(Connection::new(tls, peer))
    }
}

impl TlsListener {
    /// Listens on `addr` (port 0 picks a free port; see [`local_addr`](TlsListener::local_addr)).
    pub async fn bind(addr: SocketAddr, config: Arc<ServerConfig>) -> Result<TlsListener, Error> {
        let listener = TcpListener::bind(addr)
            .await
            .map_err(|source| io_error(&addr.to_string(), "binding", source))?;
        Ok(TlsListener {
            listener,
            acceptor: TlsAcceptor::from(config),
        })
    }

    /// The address listened on.
    pub fn local_addr(&self) -> Result<SocketAddr, Error> {
        self.listener
            .local_addr()
            .map_err(|source| io_error("listener", "reading the local address", source))
    }

    /// Accepts one TCP connection; the handshake is left to [`PendingTls::handshake`].
    pub async fn accept(&self) -> Result<PendingTls, Error> {
        let (tcp, peer) = self
            .listener
            .accept()
            .await
            .map_err(|source| io_error("listener", "accepting", source))?;
        let _ = tcp.set_nodelay(true);
        Ok(PendingTls {
            tcp,
            peer,
            acceptor: self.acceptor.clone(),
        })
    }

    /// Serves forever: each connection gets its own task, its own handshake (bounded by
    /// `options.handshake_timeout`) and its own handler from `make_handler(peer)`, and is
    /// served by [`serve`]. `make_handler` runs on accept, before the handshake: it must only
    /// build the handler (e.g. clone an `Arc`), never act; the handler itself is only called
    /// after a successful handshake. Failed handshakes and protocol errors are logged and end only their
    /// connection. Stop it by dropping the future (connections already accepted run on).
    pub async fn run<F, H>(&self, options: ServeOptions, mut make_handler: F)
    where
        F: FnMut(&str) -> H,
        H: Handler + 'static,
    {
        let unauthenticated = Arc::new(tokio::sync::Semaphore::new(
            options.max_unauthenticated.max(1),
        ));
        loop {
            let pending = match self.accept().await {
                Ok(p) => p,
                Err(e) => {
                    // EMFILE and friends: back off instead of spinning.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            // At most `max_unauthenticated` handshakes at once: past that, the connection is
            // closed here, before it costs a task.
            let Ok(permit) = unauthenticated.clone().try_acquire_owned() else {
                tracing::warn!(
                    peer = %pending.peer_addr(),
                    limit = options.max_unauthenticated,
                    "too many connections not yet authenticated: closed"
                );
                drop(pending);
                continue;
            };
            let handler = make_handler(&pending.peer_addr().to_string());
            tokio::spawn(async move {
                let handshake = pending.handshake(options.handshake_timeout).await;
                drop(permit);
                let conn = match handshake {
                    Ok(c) => c,
                    Err(e) => {
                        tracing::warn!(error = ?e, "TLS handshake refused");
                        return;
                    }
                };
                if let Err(e) = serve(conn, handler, options).await {
                    tracing::warn!(error = ?e, "connection ended with an error");
                }
            });
        }
    }
}
