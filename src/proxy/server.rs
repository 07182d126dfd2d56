//! Accepting connections: HTTP/1.1 and h2c (prior knowledge) on one port, optionally
//! behind TLS with ALPN `h2,http/1.1`.
//!
//! Every hyper / h2 knob that HARDENING.md lists under "Defaults to set explicitly" is set
//! here, in one place ([`http_builder`]), so a reader can audit the limits without chasing
//! library defaults. The accept loop survives `EMFILE` (it backs off and continues rather than
//! returning), and shutdown is graceful: listeners close, h1 connections finish their
//! response with `Connection: close`, h2 connections get GOAWAY and finish their streams.

use std::convert::Infallible;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::{GracefulShutdown, Watcher};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio_rustls::TlsAcceptor;

use super::body::RespBody;

/// Time a client has to send a complete request head (slowloris defence).
pub const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);
/// Read buffer cap: bounds the request head to 64 KiB (431 beyond), as Envoy's 60 KiB.
pub const MAX_BUF_SIZE: usize = 64 * 1024;
/// Headers per request (431 beyond).
pub const MAX_HEADERS: usize = 100;
/// h2 streams per connection; further streams queue on the client.
pub const H2_MAX_CONCURRENT_STREAMS: u32 = 100;
/// Time a TLS client has to finish its handshake.
pub const TLS_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// HTTP/1.1 requests served on one connection before it is closed gracefully (the last
/// response carries `Connection: close`), as nginx's `keepalive_requests`: bounds what one
/// client connection can pin, and lets a load balancer rebalance long-lived clients.
pub const MAX_REQUESTS_PER_CONNECTION: u32 = 1000;
/// Back-off after an accept error such as EMFILE, so the loop does not spin.
const ACCEPT_ERROR_BACKOFF: Duration = Duration::from_millis(50);

/// The hyper-util connection builder with every limit set explicitly.
pub fn http_builder() -> auto::Builder<TokioExecutor> {
    let mut b = auto::Builder::new(TokioExecutor::new());
    b.http1()
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_READ_TIMEOUT)
        .max_buf_size(MAX_BUF_SIZE)
        .max_headers(MAX_HEADERS)
        .keep_alive(true)
        .half_close(false);
    b.http2()
        .timer(TokioTimer::new())
        .max_concurrent_streams(H2_MAX_CONCURRENT_STREAMS)
        .max_pending_accept_reset_streams(20)
        .max_local_error_reset_streams(1024)
        .initial_stream_window_size(64 * 1024)
        .initial_connection_window_size(1024 * 1024)
        .keep_alive_interval(Duration::from_secs(30))
        .keep_alive_timeout(Duration::from_secs(20))
        .max_header_list_size(64 * 1024);
    b
}

/// A server certificate that can be replaced while connections keep being accepted
/// (a bad PEM on reload keeps the old one).
#[derive(Debug)]
pub struct CertStore {
    current: ArcSwap<CertifiedKey>,
}

impl CertStore {
    pub fn load(cert: &Path, key: &Path) -> io::Result<Arc<CertStore>> {
        Ok(Arc::new(CertStore {
            current: ArcSwap::from_pointee(read_certified_key(cert, key)?),
        }))
    }

    /// Replaces the certificate if the new files parse; otherwise keeps the old one.
    pub fn reload(&self, cert: &Path, key: &Path) -> io::Result<()> {
        self.current.store(Arc::new(read_certified_key(cert, key)?));
        Ok(())
    }

    /// A TLS acceptor: TLS 1.2/1.3 only, ALPN `h2, http/1.1`, no 0-RTT.
    pub fn acceptor(self: &Arc<Self>) -> TlsAcceptor {
        let provider = super::client::crypto_provider();
        let mut config = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .expect("ring supports the default protocol versions")
            .with_no_client_auth()
            .with_cert_resolver(self.clone());
        config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        config.max_early_data_size = 0;
        TlsAcceptor::from(Arc::new(config))
    }
}

impl ResolvesServerCert for CertStore {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.current.load_full())
    }
}

fn read_certified_key(cert: &Path, key: &Path) -> io::Result<CertifiedKey> {
    use rustls_pki_types::pem::PemObject;
    use rustls_pki_types::{CertificateDer, PrivateKeyDer};
    let invalid = |what: &Path, e: &dyn std::fmt::Display| {
        io::Error::new(
            io::ErrorKind::InvalidData,
            format!("{}: {e}", what.display()),
        )
    };
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert)
        .map_err(|e| invalid(cert, &e))?
        .collect::<Result<_, _>>()
        .map_err(|e| invalid(cert, &e))?;
    if certs.is_empty() {
        return Err(invalid(cert, &"no certificate in file"));
    }
    let key_der = PrivateKeyDer::from_pem_file(key).map_err(|e| invalid(key, &e))?;
    let provider = super::client::crypto_provider();
    CertifiedKey::from_der(certs, key_der, &provider).map_err(|e| invalid(key, &e))
}

/// Serves `listener` with `handler` until `shutdown` turns true, then drains for at most
/// `drain` and returns. `handler` is called once per request with the peer address.
pub async fn serve<H, F>(
    listener: TcpListener,
    tls: Option<TlsAcceptor>,
    handler: H,
    mut shutdown: watch::Receiver<bool>,
    drain: Duration,
) where
    H: Fn(SocketAddr, bool, Request<Incoming>) -> F + Clone + Send + Sync + 'static,
    F: Future<Output = Response<RespBody>> + Send + 'static,
{
    let builder = Arc::new(http_builder());
    let graceful = GracefulShutdown::new();
    loop {
        let accepted = tokio::select! {
            biased;
            _ = shutdown.wait_for(|stop| *stop) => break,
            r = listener.accept() => r,
        };
        let (stream, peer) = match accepted {
            Ok(x) => x,
            Err(e) => {
                // EMFILE/ENFILE/ECONNABORTED: keep serving the connections we have.
                tracing::warn!(error = %e, "accept failed; backing off");
                tokio::time::sleep(ACCEPT_ERROR_BACKOFF).await;
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let watcher = graceful.watcher();
        tokio::spawn(serve_connection(
            stream,
            peer,
            tls.clone(),
            builder.clone(),
            handler.clone(),
            watcher,
        ));
    }
    drop(listener);
    if tokio::time::timeout(drain, graceful.shutdown())
        .await
        .is_err()
    {
        tracing::warn!(?drain, "drain timeout reached with connections still open");
    }
}

async fn serve_connection<H, F>(
    stream: TcpStream,
    peer: SocketAddr,
    tls: Option<TlsAcceptor>,
    builder: Arc<auto::Builder<TokioExecutor>>,
    handler: H,
    watcher: Watcher,
) where
    H: Fn(SocketAddr, bool, Request<Incoming>) -> F + Clone + Send + Sync + 'static,
    F: Future<Output = Response<RespBody>> + Send + 'static,
{
    let is_tls = tls.is_some();
    let served = Arc::new(std::sync::atomic::AtomicU32::new(0));
    let service = service_fn(move |req: Request<Incoming>| {
        let last = req.version() < hyper::Version::HTTP_2
            && served.fetch_add(1, std::sync::atomic::Ordering::Relaxed) + 1
                >= MAX_REQUESTS_PER_CONNECTION;
        let fut = handler(peer, is_tls, req);
        async move {
            let mut resp = fut.await;
            if last {
                resp.headers_mut().insert(
                    hyper::header::CONNECTION,
                    hyper::header::HeaderValue::from_static("close"),
                );
            }
            Ok::<_, Infallible>(resp)
        }
    });
    let result = match tls {
        None => {
            watcher
                .watch(
                    builder
                        .serve_connection(TokioIo::new(stream), service)
                        .into_owned(),
                )
                .await
        }
        Some(acceptor) => {
            match tokio::time::timeout(TLS_HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await {
                Ok(Ok(tls_stream)) => {
                    watcher
                        .watch(
                            builder
                                .serve_connection(TokioIo::new(tls_stream), service)
                                .into_owned(),
                        )
                        .await
                }
                Ok(Err(e)) => {
                    tracing::debug!(%peer, error = %e, "TLS handshake failed");
                    return;
                }
                Err(_) => {
                    tracing::debug!(%peer, "TLS handshake timed out");
                    return;
                }
            }
        }
    };
    if let Err(e) = result {
        tracing::debug!(%peer, error = %e, "connection ended with an error");
    }
}
