//! Certificates made at run time (rcgen; never committed), a TLS-capable client, and an
//! HTTPS backend.

use std::convert::Infallible;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::service::service_fn;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair, SignatureAlgorithm};
use tokio::net::TcpListener;
use tokio::sync::oneshot;

use super::client::Client;

/// The key types a listener must accept.
#[derive(Clone, Copy, Debug)]
pub enum KeyType {
    EcdsaP256,
    Ed25519,
    Rsa,
}

/// A CA and a leaf certificate for `localhost` and 127.0.0.1, as PEM files in a temp dir.
pub struct Pki {
    pub dir: PathBuf,
    pub ca_pem: String,
}

impl Pki {
    pub fn new(name: &str, key_type: KeyType) -> Self {
        Self::valid(name, key_type, None)
    }

    /// A PKI whose leaf is valid from the first date (year, month, day) to the second
    /// (rcgen's defaults, 1975 to 4096, without).
    #[allow(dead_code)]
    pub fn valid(name: &str, key_type: KeyType, dates: Option<[(i32, u8, u8); 2]>) -> Self {
        // A number per Pki as well as the name: tests of one binary run side by side, and two
        // that picked one name would delete each other's files.
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let dir =
            std::env::temp_dir().join(format!("ifmatch-pki-{}-{n}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca_params
            .distinguished_name
            .push(rcgen::DnType::CommonName, format!("ifmatch test CA {name}"));
        let ca_key = KeyPair::generate().unwrap();
        let ca_cert = ca_params.self_signed(&ca_key).unwrap();
        let issuer = Issuer::new(ca_params, ca_key);

        let leaf_key = match key_type {
            KeyType::EcdsaP256 => KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap(),
            KeyType::Ed25519 => KeyPair::generate_for(&rcgen::PKCS_ED25519).unwrap(),
            KeyType::Rsa => rsa_key(&dir, &rcgen::PKCS_RSA_SHA256),
        };
        let mut leaf =
            CertificateParams::new(vec!["localhost".to_owned(), "127.0.0.1".to_owned()]).unwrap();
        leaf.distinguished_name
            .push(rcgen::DnType::CommonName, "localhost");
        if let Some([(y, m, d), (y2, m2, d2)]) = dates {
            leaf.not_before = rcgen::date_time_ymd(y, m, d);
            leaf.not_after = rcgen::date_time_ymd(y2, m2, d2);
        }
        let leaf_cert = leaf.signed_by(&leaf_key, &issuer).unwrap();
        // The file holds the chain: leaf, then the CA.
        std::fs::write(
            dir.join("cert.pem"),
            format!("{}{}", leaf_cert.pem(), ca_cert.pem()),
        )
        .unwrap();
        std::fs::write(dir.join("key.pem"), leaf_key.serialize_pem()).unwrap();
        std::fs::write(dir.join("ca.pem"), ca_cert.pem()).unwrap();
        Self {
            dir,
            ca_pem: ca_cert.pem(),
        }
    }

    pub fn cert(&self) -> PathBuf {
        self.dir.join("cert.pem")
    }

    pub fn key(&self) -> PathBuf {
        self.dir.join("key.pem")
    }

    pub fn ca(&self) -> PathBuf {
        self.dir.join("ca.pem")
    }

    /// `[server.tls]` lines for these files.
    pub fn server_toml(&self) -> String {
        format!(
            "[server.tls]\ncert = \"{}\"\nkey = \"{}\"\n",
            self.cert().display(),
            self.key().display()
        )
    }

    /// A rustls server config for a test backend.
    pub fn server_config(&self) -> Arc<rustls::ServerConfig> {
        ifmatch::tls::server_config(&self.cert(), &self.key())
            .unwrap()
            .0
    }
}

impl Drop for Pki {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// ring cannot generate RSA keys: `openssl genrsa` makes one, rcgen signs with it.
fn rsa_key(dir: &Path, alg: &'static SignatureAlgorithm) -> KeyPair {
    let path = dir.join("rsa.pem");
    let ok = Command::new("openssl")
        .args([
            "genpkey",
            "-algorithm",
            "RSA",
            "-pkeyopt",
            "rsa_keygen_bits:2048",
            "-out",
        ])
        .arg(&path)
        .stderr(std::process::Stdio::null())
        .status()
        .expect("openssl is needed to make an RSA test key")
        .success();
    assert!(ok, "openssl genpkey failed");
    let pem = std::fs::read_to_string(&path).unwrap();
    KeyPair::from_pem_and_sign_algo(&pem, alg).unwrap()
}

/// A rustls client config trusting `ca_pem`, limited to `versions`, offering `alpn`.
pub fn client_tls(
    ca_pem: &str,
    versions: &[&'static rustls::SupportedProtocolVersion],
) -> rustls::ClientConfig {
    use rustls_pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    for c in rustls_pki_types::CertificateDer::pem_slice_iter(ca_pem.as_bytes()) {
        roots.add(c.unwrap()).unwrap();
    }
    rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_protocol_versions(versions)
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth()
}

impl Client {
    /// An HTTPS client trusting `ca_pem`; `h2` picks HTTP/2 (by ALPN), else HTTP/1.1.
    pub fn tls(ca_pem: &str, h2: bool) -> Self {
        Self::tls_with(client_tls(ca_pem, rustls::ALL_VERSIONS), h2)
    }

    pub fn tls_with(config: rustls::ClientConfig, h2: bool) -> Self {
        let mut http = HttpConnector::new();
        http.enforce_http(false);
        let b = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(config)
            .https_only();
        let https = if h2 {
            b.enable_http2().wrap_connector(http)
        } else {
            b.enable_http1().wrap_connector(http)
        };
        let inner = hyper_util::client::legacy::Client::builder(TokioExecutor::new())
            .http2_only(h2)
            .build(https);
        Self::from_inner(inner)
    }
}

/// An HTTPS backend: GET answers `doc`, anything else 204; it counts writes.
pub struct HttpsBackend {
    pub port: u16,
    pub writes: Arc<AtomicUsize>,
    _stop: oneshot::Sender<()>,
}

impl HttpsBackend {
    pub async fn start(tls: Arc<rustls::ServerConfig>) -> Self {
        Self::start_after(tls, Duration::ZERO).await
    }

    /// One that holds each connection's TLS handshake for `handshake` before it answers it:
    /// a connection being made for that long.
    pub async fn start_after(tls: Arc<rustls::ServerConfig>, handshake: Duration) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let writes = Arc::new(AtomicUsize::new(0));
        let (stop, mut stopped) = oneshot::channel::<()>();
        let w = writes.clone();
        tokio::spawn(async move {
            let acceptor = tokio_rustls::TlsAcceptor::from(tls);
            loop {
                let (tcp, _) = tokio::select! {
                    a = listener.accept() => a.unwrap(),
                    _ = &mut stopped => return,
                };
                let (acceptor, w) = (acceptor.clone(), w.clone());
                tokio::spawn(async move {
                    tokio::time::sleep(handshake).await;
                    let Ok(stream) = acceptor.accept(tcp).await else {
                        return;
                    };
                    let service = service_fn(move |req: http::Request<hyper::body::Incoming>| {
                        let w = w.clone();
                        async move {
                            let get = req.method() == http::Method::GET;
                            let _ = req.into_body().collect().await;
                            let mut rsp =
                                http::Response::new(Full::new(Bytes::from_static(if get {
                                    b"doc"
                                } else {
                                    b""
                                })));
                            if !get {
                                w.fetch_add(1, Ordering::SeqCst);
                                *rsp.status_mut() = http::StatusCode::NO_CONTENT;
                            }
                            Ok::<_, Infallible>(rsp)
                        }
                    });
                    let _ = auto::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        Self {
            port,
            writes,
            _stop: stop,
        }
    }

    /// The origin by name, so that the certificate's `localhost` matches (SNI).
    pub fn origin(&self) -> String {
        format!("https://localhost:{}", self.port)
    }
}
