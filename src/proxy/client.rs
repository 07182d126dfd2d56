//! Upstream connections: one pooled hyper-util client per version, over plain TCP
//! (`http://`), rustls (`https://`, certificate and SNI verified) or HTTP/2 prior knowledge
//! (`h2c://`).
//!
//! Settings follow ../shared/HARDENING.md "Defaults to set explicitly": connect timeout and
//! TCP_NODELAY on the connector, pool idle timeout below the usual upstream keep-alive of
//! 5 s with a pool timer, a bounded idle pool.

use std::cell::Cell;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use http::uri::Authority;
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioTimer};

use super::body::ReqBody;
use crate::config::{Endpoint, EndpointScheme, VersionConfig};

pub type HttpClient = Client<HttpsConnector<HttpConnector>, ReqBody>;

/// Idle upstream connections are closed after this, below the 5 s keep-alive of gunicorn
/// and Node, so the pool never hands out a connection the upstream is closing.
const POOL_IDLE_TIMEOUT: Duration = Duration::from_secs(4);
const POOL_MAX_IDLE_PER_HOST: usize = 64;

/// Data-plane worker threads (see `app::DataPlane`); 0 when the data plane runs on the
/// caller's runtime. Set once at start-up, before the first routing table is compiled.
static DATA_WORKERS: AtomicUsize = AtomicUsize::new(0);

thread_local! {
    /// 1..=DATA_WORKERS on a data-plane worker thread, 0 elsewhere.
    static WORKER: Cell<usize> = const { Cell::new(0) };
}

/// Declares how many data-plane worker threads will run, so each endpoint gets one
/// connection pool per worker (plus one for everything else: health checks, inline
/// serving). Call before building the store.
pub fn set_data_workers(n: usize) {
    DATA_WORKERS.store(n, Ordering::Relaxed);
}

/// Marks the calling thread as data-plane worker `index` (0-based).
pub fn enter_worker(index: usize) {
    WORKER.with(|w| w.set(index + 1));
}

/// One endpoint of a version.
pub struct EndpointRt {
    pub endpoint: Endpoint,
    /// One pool per data-plane worker thread, so an upstream connection is only ever driven
    /// by the thread whose requests use it (no cross-thread wake-ups, no shared pool lock);
    /// slot 0 serves every other thread.
    clients: Box<[HttpClient]>,
    /// Kept by the health checker; unhealthy endpoints are skipped while others remain.
    pub healthy: AtomicBool,
    /// Consecutive failed / passed active health checks.
    pub failures: AtomicU32,
    pub successes: AtomicU32,
}

/// A version's endpoints. Shared by every table that contains the version unchanged, so
/// connection pools survive table swaps.
pub struct Upstream {
    pub endpoints: Box<[EndpointRt]>,
    next: AtomicUsize,
}

impl std::fmt::Debug for Upstream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let urls: Vec<_> = self
            .endpoints
            .iter()
            .map(|e| e.endpoint.url.as_str())
            .collect();
        f.debug_struct("Upstream")
            .field("endpoints", &urls)
            .finish()
    }
}

impl EndpointRt {
    /// The calling thread's connection pool for this endpoint.
    #[inline]
    pub fn client(&self) -> &HttpClient {
        let i = WORKER.with(Cell::get);
        self.clients.get(i).unwrap_or(&self.clients[0])
    }
}

impl Upstream {
    pub fn new(v: &VersionConfig, connect_timeout: Duration) -> std::io::Result<Self> {
        let tls = client_tls(v.ca_file.as_deref())?;
        let endpoints = v
            .endpoints
            .iter()
            .map(|e| EndpointRt {
                endpoint: e.clone(),
                clients: (0..=DATA_WORKERS.load(Ordering::Relaxed))
                    .map(|_| build_client(e, connect_timeout, tls.clone()))
                    .collect(),
                healthy: AtomicBool::new(true),
                failures: AtomicU32::new(0),
                successes: AtomicU32::new(0),
            })
            .collect();
        Ok(Upstream {
            endpoints,
            next: AtomicUsize::new(0),
        })
    }

    /// Round-robin over healthy endpoints (over all of them when none is healthy).
    #[inline]
    pub fn pick(&self) -> &EndpointRt {
        let n = self.endpoints.len();
        if n == 1 {
            return &self.endpoints[0];
        }
        let start = self.next.fetch_add(1, Ordering::Relaxed);
        for i in 0..n {
            let e = &self.endpoints[(start + i) % n];
            if e.healthy.load(Ordering::Relaxed) {
                return e;
            }
        }
        &self.endpoints[start % n]
    }

    /// Another endpoint than `not`, if the version has one that is healthy.
    pub fn pick_other(&self, not: &Authority) -> Option<&EndpointRt> {
        self.endpoints
            .iter()
            .find(|e| &e.endpoint.authority != not && e.healthy.load(Ordering::Relaxed))
    }

    pub fn any_healthy(&self) -> bool {
        self.endpoints
            .iter()
            .any(|e| e.healthy.load(Ordering::Relaxed))
    }
}

/// The process-wide rustls crypto provider: exactly one is installed (rustls #2148).
pub fn crypto_provider() -> Arc<rustls::crypto::CryptoProvider> {
    let _ = rustls::crypto::ring::default_provider().install_default();
    rustls::crypto::CryptoProvider::get_default()
        .cloned()
        .unwrap_or_else(|| Arc::new(rustls::crypto::ring::default_provider()))
}

fn client_tls(ca_file: Option<&Path>) -> std::io::Result<rustls::ClientConfig> {
    use rustls_pki_types::pem::PemObject;
    use rustls_pki_types::CertificateDer;
    let mut roots = rustls::RootCertStore::empty();
    roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
    if let Some(path) = ca_file {
        let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(path)
            .map_err(|e| std::io::Error::other(format!("{}: {e}", path.display())))?
            .collect::<Result<_, _>>()
            .map_err(|e| std::io::Error::other(format!("{}: {e}", path.display())))?;
        for c in certs {
            roots
                .add(c)
                .map_err(|e| std::io::Error::other(format!("{}: {e}", path.display())))?;
        }
    }
    let cfg = rustls::ClientConfig::builder_with_provider(crypto_provider())
        .with_safe_default_protocol_versions()
        .map_err(std::io::Error::other)?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(cfg)
}

fn build_client(e: &Endpoint, connect_timeout: Duration, tls: rustls::ClientConfig) -> HttpClient {
    let mut http = HttpConnector::new();
    http.enforce_http(false);
    http.set_nodelay(true);
    http.set_connect_timeout(Some(connect_timeout));
    http.set_keepalive(Some(Duration::from_secs(30)));
    let b = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(tls)
        .https_or_http();
    let connector = match e.scheme {
        EndpointScheme::Https => b.enable_all_versions().wrap_connector(http),
        EndpointScheme::Http | EndpointScheme::H2c => b.enable_http1().wrap_connector(http),
    };
    let mut builder = Client::builder(TokioExecutor::new());
    builder
        .pool_idle_timeout(POOL_IDLE_TIMEOUT)
        .pool_max_idle_per_host(POOL_MAX_IDLE_PER_HOST)
        .pool_timer(TokioTimer::new())
        .timer(TokioTimer::new());
    if e.scheme == EndpointScheme::H2c {
        builder
            .http2_only(true)
            .http2_keep_alive_interval(Duration::from_secs(30))
            .http2_keep_alive_timeout(Duration::from_secs(20))
            .http2_adaptive_window(true);
    }
    builder.build(connector)
}

/// Body bytes kept for a retry: bodies up to this size are read before the first attempt
/// and replayed on a retry; larger ones stream and are never retried once sent (Linkerd
/// never retries bodies over 64 KiB either).
pub const RETRY_BUFFER: u64 = 64 * 1024;

/// A client for the proxy's own outgoing calls (webhooks): http and https (public roots),
/// HTTP/1.1, connect timeout 2 s.
pub fn control_client() -> std::io::Result<HttpClient> {
    let mut http = HttpConnector::new();
    http.enforce_http(false);
    http.set_nodelay(true);
    http.set_connect_timeout(Some(Duration::from_secs(2)));
    let connector = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(client_tls(None)?)
        .https_or_http()
        .enable_http1()
        .wrap_connector(http);
    Ok(Client::builder(TokioExecutor::new())
        .pool_idle_timeout(POOL_IDLE_TIMEOUT)
        .pool_timer(TokioTimer::new())
        .build(connector))
}
