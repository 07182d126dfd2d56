//! A throwaway certificate authority (rcgen) for https upstreams: CA PEM written to a temp
//! file the proxy can be pointed at (`ca_file`), and leaf certificates for `localhost`.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};

pub struct TestCa {
    cert_der: CertificateDer<'static>,
    issuer: Issuer<'static, KeyPair>,
    pem_path: PathBuf,
    _dir: tempfile::TempDir,
}

impl TestCa {
    pub fn new(common_name: &str) -> TestCa {
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(DnType::CommonName, common_name);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let key = KeyPair::generate().unwrap();
        let cert = params.self_signed(&key).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let pem_path = dir.path().join("ca.pem");
        std::fs::write(&pem_path, cert.pem()).unwrap();
        TestCa {
            cert_der: cert.der().clone(),
            issuer: Issuer::new(params, key),
            pem_path,
            _dir: dir,
        }
    }

    /// Path of the CA certificate in PEM form (what a version's `ca_file` points at).
    pub fn pem_path(&self) -> &Path {
        &self.pem_path
    }

    pub fn cert_der(&self) -> CertificateDer<'static> {
        self.cert_der.clone()
    }

    /// A server certificate chain and key for `names` (DNS names or IP literals), signed by this CA.
    pub fn leaf(&self, names: &[&str]) -> (Vec<CertificateDer<'static>>, PrivateKeyDer<'static>) {
        let mut params =
            CertificateParams::new(names.iter().map(|s| s.to_string()).collect::<Vec<_>>())
                .unwrap();
        params.distinguished_name.push(DnType::CommonName, names[0]);
        params.is_ca = IsCa::NoCa;
        params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        let key = KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        let key_der = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
        (vec![cert.der().clone(), self.cert_der.clone()], key_der)
    }

    /// A rustls server config for `localhost` (and 127.0.0.1), ALPN h2 + http/1.1.
    pub fn server_config(&self) -> Arc<rustls::ServerConfig> {
        let leaf = self.leaf(&["localhost", "127.0.0.1"]);
        server_config(&leaf, vec![b"h2".to_vec(), b"http/1.1".to_vec()])
    }
}

/// A rustls server config presenting `leaf` (from [`TestCa::leaf`]) and offering `alpn`.
pub fn server_config(
    leaf: &(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>),
    alpn: Vec<Vec<u8>>,
) -> Arc<rustls::ServerConfig> {
    let mut cfg = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_no_client_auth()
    .with_single_cert(leaf.0.clone(), leaf.1.clone_key())
    .unwrap();
    cfg.alpn_protocols = alpn;
    Arc::new(cfg)
}

fn base64(data: &[u8]) -> String {
    const T: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::new();
    for c in data.chunks(3) {
        let n = (u32::from(c[0]) << 16)
            | (u32::from(*c.get(1).unwrap_or(&0)) << 8)
            | u32::from(*c.get(2).unwrap_or(&0));
        for i in 0..4 {
            if i <= c.len() {
                out.push(T[(n >> (18 - 6 * i)) as usize & 63] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

fn pem(label: &str, der: &[u8]) -> String {
    let mut s = format!("-----BEGIN {label}-----\n");
    for line in base64(der).as_bytes().chunks(64) {
        s.push_str(std::str::from_utf8(line).unwrap());
        s.push('\n');
    }
    s.push_str(&format!("-----END {label}-----\n"));
    s
}

/// Writes a `localhost` certificate chain and key signed by `ca` into `dir`.
pub fn write_tls_files(ca: &TestCa, dir: &Path) -> (PathBuf, PathBuf) {
    let (chain, key) = ca.leaf(&["localhost"]);
    let cert = dir.join("tls.crt");
    let key_path = dir.join("tls.key");
    let chain: String = chain.iter().map(|c| pem("CERTIFICATE", c)).collect();
    std::fs::write(&cert, chain).unwrap();
    std::fs::write(&key_path, pem("PRIVATE KEY", key.secret_der())).unwrap();
    (cert, key_path)
}

/// The config line that serves TLS from `cert` and `key`.
pub fn tls_top(cert: &Path, key: &Path) -> String {
    format!(
        "tls: {{cert: \"{}\", key: \"{}\"}}",
        cert.display(),
        key.display()
    )
}

/// A TLS client connection to `addr` trusting `ca`, offering `alpn` (5 s to handshake).
pub async fn tls_connect(
    addr: std::net::SocketAddr,
    ca: &TestCa,
    alpn: &[&[u8]],
) -> tokio_rustls::client::TlsStream<tokio::net::TcpStream> {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(ca.cert_der()).unwrap();
    let mut cfg = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    cfg.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
    tokio::time::timeout(
        std::time::Duration::from_secs(5),
        tokio_rustls::TlsConnector::from(Arc::new(cfg)).connect(name, tcp),
    )
    .await
    .expect("TLS handshake timed out")
    .expect("TLS handshake")
}
