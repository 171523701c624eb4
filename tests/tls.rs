//! TLS: the listener's certificates (RSA, ECDSA, Ed25519; TLS 1.2 and 1.3; refused at load
//! when broken; swapped by SIGHUP) and https:// upstreams (a private CA through ca_file, and
//! a 502 that says "certificate" when the upstream's is not trusted).

mod common;

use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use common::binary::Binary;
use common::proxy::route;
use common::tls::{client_tls, HttpsBackend, KeyType, Pki};
use common::{Backend, Client, Proxy};
use ifmatch::config::Config;

#[tokio::test]
async fn rsa_ecdsa_and_ed25519_keys_all_serve() {
    let backend = Backend::start().await;
    backend.store.put("/docs/a", "v1");
    for kt in [KeyType::Rsa, KeyType::EcdsaP256, KeyType::Ed25519] {
        let pki = Pki::new(&format!("{kt:?}"), kt);
        let proxy =
            Proxy::start_with(&route("/docs/", ""), &backend.origin(), &pki.server_toml()).await;
        let r = Client::tls(&pki.ca_pem, false)
            .get(&proxy.https_url("/docs/a"), &[])
            .await;
        assert_eq!(r.status, 200, "{kt:?}");
        assert_eq!(r.etag(), proxy.tag_of("v1"), "{kt:?}");
    }
}

#[tokio::test]
async fn tls_1_2_and_1_3_both_handshake() {
    let backend = Backend::start().await;
    backend.store.put("/docs/a", "v1");
    let pki = Pki::new("versions", KeyType::EcdsaP256);
    let proxy =
        Proxy::start_with(&route("/docs/", ""), &backend.origin(), &pki.server_toml()).await;
    for v in [&rustls::version::TLS12, &rustls::version::TLS13] {
        let c = Client::tls_with(client_tls(&pki.ca_pem, &[v]), false);
        assert_eq!(
            c.get(&proxy.https_url("/docs/a"), &[]).await.status,
            200,
            "{v:?}"
        );
    }
}

/// A client that opens TCP and never starts its handshake is closed within the time a head
/// has (`header_read_timeout`), not held for the fixed 10 s cap.
#[tokio::test]
async fn a_client_that_never_starts_its_handshake_is_closed_after_the_head_timeout() {
    use tokio::io::AsyncReadExt;
    let backend = Backend::start().await;
    let pki = Pki::new("no-handshake", KeyType::EcdsaP256);
    let server = format!("header_read_timeout = \"500ms\"\n{}", pki.server_toml());
    let proxy = Proxy::start_with(&route("/docs/", ""), &backend.origin(), &server).await;
    let mut silent = tokio::net::TcpStream::connect(proxy.addr).await.unwrap();
    let started = std::time::Instant::now();
    let mut buf = [0u8; 64];
    let read = tokio::time::timeout(Duration::from_secs(5), silent.read(&mut buf)).await;
    assert!(matches!(read, Ok(Ok(0)) | Ok(Err(_))), "closed: {read:?}");
    let took = started.elapsed();
    assert!(took < Duration::from_secs(2), "closed after {took:?}");
}

/// `curl http://` to the TLS listener, the usual slip, gets a 400 that says what is
/// wrong, as nginx answers (before, it got a TLS alert no HTTP client can read); a
/// TLS client on the same listener is served as ever.
#[tokio::test]
async fn plain_http_on_the_tls_listener_is_told_to_use_https() {
    let backend = Backend::start().await;
    backend.store.put("/docs/a", "v1");
    let pki = Pki::new("plain-on-tls", KeyType::EcdsaP256);
    let proxy =
        Proxy::start_with(&route("/docs/", ""), &backend.origin(), &pki.server_toml()).await;
    let mut plain = tokio::net::TcpStream::connect(proxy.addr).await.unwrap();
    plain
        .write_all(b"GET /docs/a HTTP/1.1\r\nHost: a\r\nUser-Agent: curl/8\r\n\r\n")
        .await
        .unwrap();
    let mut got = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(5), plain.read_to_end(&mut got)).await;
    assert!(read.is_ok(), "answered and closed at once");
    let got = String::from_utf8_lossy(&got);
    assert!(got.starts_with("HTTP/1.1 400 Bad Request\r\n"), "{got:?}");
    assert!(got.contains("application/problem+json"), "{got:?}");
    assert!(got.contains("use https://"), "{got:?}");
    assert_eq!(backend.store.reads(), 0, "nothing forwarded");
    let r = Client::tls(&pki.ca_pem, false)
        .get(&proxy.https_url("/docs/a"), &[])
        .await;
    assert_eq!(r.status, 200);
}

/// A listener certificate past its date starts (the proxy cannot renew it), but says so
/// in a WARN, and its expiry is a gauge to alert on; a SIGHUP with a renewed certificate
/// moves the gauge to the new date.
#[tokio::test]
async fn the_listener_certificates_expiry_is_warned_of_and_a_gauge() {
    let backend = Backend::start().await;
    let expired = Pki::valid(
        "expired",
        KeyType::EcdsaP256,
        Some([(2020, 1, 1), (2021, 1, 1)]),
    );
    let renewed = Pki::valid(
        "renewed",
        KeyType::EcdsaP256,
        Some([(2020, 1, 1), (2051, 6, 1)]),
    );
    let dir = common::TempDir::new("expiry");
    let (cert, key) = (dir.join("cert.pem"), dir.join("key.pem"));
    std::fs::copy(expired.cert(), &cert).unwrap();
    std::fs::copy(expired.key(), &key).unwrap();
    let config = format!(
        "[server]\nlisten = \"{{listen}}\"\n[server.tls]\ncert = \"{}\"\nkey = \"{}\"\n[admin]\nlisten = \"127.0.0.1:0\"\n[[route]]\nprefix = \"/\"\nupstream = \"{}\"\n",
        cert.display(),
        key.display(),
        backend.origin()
    );
    let bin = Binary::start(&config, &[]).await;
    let warned = bin
        .wait_for_log("certificate has expired", Duration::from_secs(5))
        .await;
    assert!(warned.contains("WARN"), "{warned}");
    assert!(
        warned.contains("Fri, 01 Jan 2021 00:00:00 GMT"),
        "names the date: {warned}"
    );
    let admin = bin.logged_addr("admin endpoints").await;
    let gauge = |text: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix("ifmatch_tls_certificate_expiry_timestamp_seconds "))
            .map(str::to_owned)
    };
    let metrics = Client::new()
        .get(&format!("http://{admin}/metrics"), &[])
        .await
        .text();
    assert_eq!(gauge(&metrics).as_deref(), Some("1609459200"), "{metrics}");

    std::fs::copy(renewed.cert(), &cert).unwrap();
    std::fs::copy(renewed.key(), &key).unwrap();
    bin.signal("HUP");
    bin.wait_for_log("config reloaded", Duration::from_secs(5))
        .await;
    let metrics = Client::new()
        .get(&format!("http://{admin}/metrics"), &[])
        .await
        .text();
    assert_eq!(gauge(&metrics).as_deref(), Some("2569190400"), "{metrics}");
    let expired_warnings = bin
        .log()
        .iter()
        .filter(|l| l.contains("certificate has expired"))
        .count();
    assert_eq!(expired_warnings, 1, "the renewed one is not warned of");
}

/// Without TLS there is no certificate gauge.
#[tokio::test]
async fn a_plain_listener_has_no_certificate_gauge() {
    let backend = Backend::start().await;
    let config = format!(
        "[server]\nlisten = \"{{listen}}\"\n[admin]\nlisten = \"127.0.0.1:0\"\n[[route]]\nprefix = \"/\"\nupstream = \"{}\"\n",
        backend.origin()
    );
    let bin = Binary::start(&config, &[]).await;
    let admin = bin.logged_addr("admin endpoints").await;
    let metrics = Client::new()
        .get(&format!("http://{admin}/metrics"), &[])
        .await
        .text();
    assert!(metrics.contains("ifmatch_connections_open"), "{metrics}");
    assert!(!metrics.contains("certificate"), "{metrics}");
}

fn with_tls(cert: &str, key: &str) -> String {
    format!(
        "[server]\nlisten = \"127.0.0.1:1\"\n[server.tls]\ncert = \"{cert}\"\nkey = \"{key}\"\n[[route]]\nprefix = \"/\"\nupstream = \"http://a:1\"\n"
    )
}

#[test]
fn broken_certificates_are_refused_at_load_naming_key_and_line() {
    let a = Pki::new("load-a", KeyType::EcdsaP256);
    let b = Pki::new("load-b", KeyType::EcdsaP256);
    // Each problem on the line of the file it is with; a key that does not fit: the key.
    let (cert, key) = ("t.toml:4: server.tls.cert: ", "t.toml:5: server.tls.key: ");
    let cases = [
        (
            with_tls(a.cert().to_str().unwrap(), b.key().to_str().unwrap()),
            key,
            "does not fit",
        ),
        (
            with_tls("/nonexistent/cert.pem", a.key().to_str().unwrap()),
            cert,
            "cannot read /nonexistent/cert.pem",
        ),
        (
            with_tls(a.key().to_str().unwrap(), a.key().to_str().unwrap()),
            cert,
            "holds no PEM certificate",
        ),
        (
            with_tls(a.cert().to_str().unwrap(), a.cert().to_str().unwrap()),
            key,
            "no usable private key",
        ),
        (
            with_tls(a.cert().to_str().unwrap(), "/nonexistent/key.pem"),
            key,
            "cannot read /nonexistent/key.pem",
        ),
    ];
    for (text, at, needle) in cases {
        let e = Config::parse(&text, "t.toml").unwrap_err().to_string();
        assert!(e.starts_with(at), "{e}");
        assert!(e.contains(needle), "{needle:?} not in {e}");
    }
}

/// Both files wrong are both named in one round (`--check`'s promise), not the key only once
/// the certificate is mended; a good key beside a bad certificate is not blamed.
#[test]
fn a_listener_whose_certificate_and_key_are_both_wrong_is_told_of_both() {
    let a = Pki::new("load-both", KeyType::EcdsaP256);
    let text = with_tls("/nonexistent/cert.pem", "/nonexistent/key.pem");
    let e = Config::parse(&text, "t.toml").unwrap_err().to_string();
    assert!(
        e.contains("t.toml:4: server.tls.cert: cannot read /nonexistent/cert.pem"),
        "{e}"
    );
    assert!(
        e.contains("t.toml:5: server.tls.key: cannot read /nonexistent/key.pem"),
        "{e}"
    );
    let text = with_tls("/nonexistent/cert.pem", a.key().to_str().unwrap());
    let e = Config::parse(&text, "t.toml").unwrap_err().to_string();
    assert!(!e.contains("server.tls.key"), "{e}");
}

/// A certificate file whose PEM block holds no certificate (a truncated paste, another
/// object's DER under a CERTIFICATE label) is the certificate's fault: the error names the
/// cert file, not the key that was checked against it.
#[test]
fn a_certificate_that_cannot_be_parsed_is_refused_naming_the_cert_not_the_key() {
    let a = Pki::new("load-garbage", KeyType::EcdsaP256);
    let garbage = a.dir.join("garbage.pem");
    let pem = "-----BEGIN CERTIFICATE-----\nAAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=\n-----END CERTIFICATE-----\n";
    std::fs::write(&garbage, pem).unwrap();
    let text = with_tls(garbage.to_str().unwrap(), a.key().to_str().unwrap());
    let e = Config::parse(&text, "t.toml").unwrap_err().to_string();
    assert!(e.starts_with("t.toml:4: server.tls.cert: "), "{e}");
    assert!(!e.contains("does not fit"), "{e}");
}

/// A key rustls (ring) cannot sign with, for its type (ECDSA on P-521, Ed448) or its size
/// (RSA under 2048 or over 4096 bits), is refused on the key's line saying so, naming what
/// serves: not as a key that "does not fit" the certificate made for it, nor as one "of a
/// type ifmatch cannot use" beside "it takes RSA".
#[test]
fn a_key_ring_cannot_sign_with_is_refused_naming_the_keys_that_serve() {
    let cases: [(&str, &[&str], &str); 2] = [
        (
            "p521",
            &["ec", "-pkeyopt", "ec_paramgen_curve:P-521"],
            "P-256",
        ),
        ("rsa1024", &["rsa:1024"], "2048 to 4096 bits"),
    ];
    for (name, newkey, names) in cases {
        let dir = common::TempDir::new(&format!("tls-{name}"));
        let (cert, key) = (dir.join("cert.pem"), dir.join("key.pem"));
        let ok = std::process::Command::new("openssl")
            .args(["req", "-x509", "-newkey"])
            .args(newkey)
            .args(["-nodes", "-days", "1", "-subj", "/CN=localhost", "-keyout"])
            .arg(&key)
            .arg("-out")
            .arg(&cert)
            .stderr(std::process::Stdio::null())
            .status()
            .expect("openssl is needed to make the test keys")
            .success();
        assert!(ok, "{name}: openssl req failed");
        let text = with_tls(cert.to_str().unwrap(), key.to_str().unwrap());
        let e = Config::parse(&text, "t.toml").unwrap_err().to_string();
        assert!(e.starts_with("t.toml:5: server.tls.key: "), "{name}: {e}");
        assert!(!e.contains("does not fit"), "{name}: {e}");
        assert!(
            e.contains(names),
            "{name}: the keys that serve are named: {e}"
        );
    }
}

#[tokio::test]
async fn an_https_upstream_with_a_private_ca_works_and_without_it_is_a_502_about_the_certificate() {
    let pki = Pki::new("upstream", KeyType::EcdsaP256);
    let backend = HttpsBackend::start(pki.server_config()).await;
    let trusted = format!("ca_file = \"{}\"", pki.ca().display());
    let proxy = Proxy::start(&route("/", &trusted), &backend.origin()).await;
    let c = Client::new();
    let r = c.get(&proxy.url("/doc"), &[]).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.etag(), proxy.tag_of("doc"));
    assert_eq!(
        c.put(&proxy.url("/doc"), &[("if-match", "\"stale\"")], "x")
            .await
            .status,
        412
    );
    assert_eq!(
        c.put(&proxy.url("/doc"), &[("if-match", &r.etag())], "x")
            .await
            .status,
        204
    );
    assert_eq!(backend.writes.load(std::sync::atomic::Ordering::SeqCst), 1);

    let untrusted = Proxy::start(&route("/", ""), &backend.origin()).await;
    let r = c.get(&untrusted.url("/doc"), &[]).await;
    let p = r.assert_problem(502);
    let detail = p["detail"].as_str().unwrap();
    assert!(
        detail.contains("certificate") && detail.contains("ca_file"),
        "{detail}"
    );
}

#[test]
fn ca_file_is_refused_on_a_plain_http_route() {
    let text = "[server]\nlisten = \"127.0.0.1:1\"\n[[route]]\nprefix = \"/\"\nupstream = \"http://a:1\"\nca_file = \"ca.pem\"\n";
    let e = Config::parse(text, "t.toml").unwrap_err().to_string();
    assert!(
        e.contains("t.toml:6: route.ca_file: ca_file is for https:// upstreams"),
        "{e}"
    );
}

#[tokio::test]
async fn sighup_swaps_in_a_new_certificate() {
    let backend = Backend::start().await;
    backend.store.put("/docs/a", "v1");
    let old = Pki::new("reload-old", KeyType::EcdsaP256);
    let new = Pki::new("reload-new", KeyType::EcdsaP256);
    let dir = common::TempDir::new("reload-cert");
    let (cert, key) = (dir.join("cert.pem"), dir.join("key.pem"));
    std::fs::copy(old.cert(), &cert).unwrap();
    std::fs::copy(old.key(), &key).unwrap();
    let config = format!(
        "[server]\nlisten = \"{{listen}}\"\n[server.tls]\ncert = \"{}\"\nkey = \"{}\"\n[[route]]\nprefix = \"/docs/\"\nupstream = \"{}\"\n",
        cert.display(),
        key.display(),
        backend.origin()
    );
    let bin = Binary::start(&config, &[]).await;
    let url = format!("https://localhost:{}/docs/a", bin.addr.port());
    let trusts_new = Client::tls(&new.ca_pem, false);
    assert_eq!(
        Client::tls(&old.ca_pem, false).get(&url, &[]).await.status,
        200
    );
    assert!(
        trusts_new.try_send("GET", &url, &[], "").await.is_err(),
        "the old certificate is served"
    );

    std::fs::copy(new.cert(), &cert).unwrap();
    std::fs::copy(new.key(), &key).unwrap();
    bin.signal("HUP");
    bin.wait_for_log("config reloaded", Duration::from_secs(5))
        .await;
    let fresh = Client::tls(&new.ca_pem, false);
    assert_eq!(
        fresh.get(&url, &[]).await.status,
        200,
        "new connections get the new certificate"
    );

    // A reload that turns TLS off is refused that part, and keeps the certificate in use
    // now, not the one the process started with.
    let plain = config.replace(
        &format!(
            "[server.tls]\ncert = \"{}\"\nkey = \"{}\"\n",
            cert.display(),
            key.display()
        ),
        "",
    );
    assert!(!plain.contains("[server.tls]"));
    bin.reload(&plain).await;
    bin.wait_for_log("server.tls (on or off) changed", Duration::from_secs(1))
        .await;
    assert_eq!(
        Client::tls(&new.ca_pem, false).get(&url, &[]).await.status,
        200,
        "the certificate in use is kept"
    );
    assert!(
        Client::tls(&old.ca_pem, false)
            .try_send("GET", &url, &[], "")
            .await
            .is_err(),
        "the certificate from start is not served again"
    );
}

/// A listener that accepts connections and holds them, reading nothing and answering never
/// (a TLS upstream stuck before its handshake): its address, and its task to abort.
async fn silent_listener() -> (std::net::SocketAddr, tokio::task::JoinHandle<()>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let silent = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((socket, _)) = listener.accept().await {
            held.push(socket);
        }
    });
    (addr, silent)
}

/// A TLS upstream that accepts the connection and never answers the handshake: the route's
/// `upstream_timeout` counts from before the connection is made, so the client gets a 504
/// at that timeout, not a hang (`connect_timeout`, 5 s here, is the longer).
#[tokio::test]
async fn an_https_upstream_that_never_finishes_its_handshake_is_a_504_at_the_timeout() {
    let (addr, silent) = silent_listener().await;
    let pki = Pki::new("silent", KeyType::EcdsaP256);
    let extra = format!(
        "ca_file = \"{}\"\nupstream_timeout = \"300ms\"",
        pki.ca().display()
    );
    let proxy = Proxy::start(&route("/", &extra), &format!("https://{addr}")).await;
    let c = Client::new();
    for method in ["GET", "PUT"] {
        let started = std::time::Instant::now();
        let r = tokio::time::timeout(
            Duration::from_secs(3),
            c.try_send(method, &proxy.url("/doc"), &[], "x"),
        )
        .await
        .unwrap_or_else(|_| panic!("{method}: no answer within 3 s"))
        .unwrap_or_else(|e| panic!("{method}: {e}"));
        let waited = started.elapsed();
        let p = r.assert_problem(504);
        assert!(
            p["detail"].as_str().unwrap().contains("300ms"),
            "{method}: {p}"
        );
        assert!(
            waited >= Duration::from_millis(300) && waited < Duration::from_millis(1500),
            "{method}: answered after {waited:?}"
        );
    }
    silent.abort();
}

/// Over `max_connections`, a plain listener answers a 503 in plain text; on a TLS listener
/// those bytes reached clients as a broken handshake ("wrong version number"), while the log
/// and the metric said 503. A TLS client is closed at once, with no byte, and counted.
#[tokio::test]
async fn over_max_connections_a_tls_client_is_closed_not_sent_plain_text() {
    use tokio::io::AsyncReadExt;
    let backend = Backend::start().await;
    let pki = Pki::new("refused", KeyType::EcdsaP256);
    let server = format!("max_connections = 1\n{}", pki.server_toml());
    let proxy = Proxy::start_with(&route("/docs/", ""), &backend.origin(), &server).await;
    // Holds the one slot (its handshake not begun: the head timeout is 30 s).
    let _held = tokio::net::TcpStream::connect(proxy.addr).await.unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    let mut refused = tokio::net::TcpStream::connect(proxy.addr).await.unwrap();
    let mut got = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(5), refused.read_to_end(&mut got)).await;
    assert!(read.is_ok(), "closed at once");
    assert!(
        got.is_empty(),
        "no plain text on a TLS port: {:?}",
        String::from_utf8_lossy(&got)
    );
}

/// An HTTP/1.0 client whose ALPN offers only `http/1.0` (curl --http1.0) got a fatal
/// "no application protocol" alert: the listener offered h2 and http/1.1 alone.
#[tokio::test]
async fn an_http_1_0_client_offering_only_http_1_0_by_alpn_is_served() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let backend = Backend::start().await;
    backend.store.put("/docs/a", "v1");
    let pki = Pki::new("alpn-1-0", KeyType::EcdsaP256);
    let proxy =
        Proxy::start_with(&route("/docs/", ""), &backend.origin(), &pki.server_toml()).await;
    let mut config = client_tls(&pki.ca_pem, rustls::ALL_VERSIONS);
    config.alpn_protocols = vec![b"http/1.0".to_vec()];
    let tcp = tokio::net::TcpStream::connect(proxy.addr).await.unwrap();
    let name = rustls_pki_types::ServerName::try_from("localhost").unwrap();
    let mut tls = tokio_rustls::TlsConnector::from(std::sync::Arc::new(config))
        .connect(name, tcp)
        .await
        .expect("the handshake succeeds");
    tls.write_all(b"GET /docs/a HTTP/1.0\r\nHost: localhost\r\n\r\n")
        .await
        .unwrap();
    let mut got = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), tls.read_to_end(&mut got)).await;
    let got = String::from_utf8_lossy(&got);
    assert!(
        got.starts_with("HTTP/1.0 200") || got.starts_with("HTTP/1.1 200"),
        "{got}"
    );
    assert!(got.ends_with("v1"), "{got}");
}

/// An HTTPS backend on raw TLS streams (`tls`): `serve` gets each connection, and what the
/// handshake settled (the protocol ALPN chose). Its origin, by the name its certificate has.
async fn raw_https_backend<F, Fut>(tls: rustls::ServerConfig, serve: F) -> String
where
    F: Fn(tokio_rustls::server::TlsStream<tokio::net::TcpStream>, Option<Vec<u8>>) -> Fut
        + Send
        + Sync
        + 'static,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let origin = format!(
        "https://localhost:{}",
        listener.local_addr().unwrap().port()
    );
    let acceptor = tokio_rustls::TlsAcceptor::from(std::sync::Arc::new(tls));
    let serve = std::sync::Arc::new(serve);
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let (acceptor, serve) = (acceptor.clone(), serve.clone());
            tokio::spawn(async move {
                if let Ok(stream) = acceptor.accept(tcp).await {
                    let alpn = stream.get_ref().1.alpn_protocol().map(<[u8]>::to_vec);
                    serve(stream, alpn).await;
                }
            });
        }
    });
    origin
}

/// Reads one request head from `s`; false once the connection has ended.
async fn read_head(s: &mut tokio_rustls::server::TlsStream<tokio::net::TcpStream>) -> bool {
    use tokio::io::AsyncReadExt;
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    while !got.windows(4).any(|w| w == b"\r\n\r\n") {
        match s.read(&mut buf).await {
            Ok(0) | Err(_) => return false,
            Ok(n) => got.extend_from_slice(&buf[..n]),
        }
    }
    true
}

/// The pool speaks HTTP/1.1 only. hyper-rustls offers no protocol by ALPN unless HTTP/2 is
/// on too (and refuses a config that names one), so a backend that prefers h2 picks none,
/// and HTTP/1.1 is spoken.
#[tokio::test]
async fn an_https_upstream_that_prefers_h2_is_spoken_http_1_1() {
    let pki = Pki::new("alpn", KeyType::EcdsaP256);
    let mut tls = (*pki.server_config()).clone();
    tls.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    let chosen = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let seen = chosen.clone();
    let origin = raw_https_backend(tls, move |mut s, alpn| {
        seen.lock().unwrap().push(alpn);
        async move {
            use tokio::io::AsyncWriteExt;
            while read_head(&mut s).await {
                let _ = s
                    .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
                    .await;
            }
        }
    })
    .await;
    let trusted = format!("ca_file = \"{}\"", pki.ca().display());
    let proxy = Proxy::start(&route("/", &trusted), &origin).await;
    let r = Client::new().get(&proxy.url("/doc"), &[]).await;
    assert_eq!((r.status, r.text().as_str()), (200, "ok"));
    assert_eq!(*chosen.lock().unwrap(), [None]);
}

/// Many HTTPS servers close an idle kept-alive connection without a TLS close_notify. A GET
/// that went out on it just then is sent again on a new connection, as over plain HTTP
/// (`upstream_pool`'s test of the same race): it got a 502 "peer closed connection without
/// sending TLS close_notify".
#[tokio::test]
async fn a_get_meeting_an_https_backend_closing_without_close_notify_is_sent_again() {
    use std::sync::atomic::{AtomicUsize, Ordering};
    let pki = Pki::new("eof", KeyType::EcdsaP256);
    let accepted = std::sync::Arc::new(AtomicUsize::new(0));
    let count = accepted.clone();
    let origin = raw_https_backend((*pki.server_config()).clone(), move |mut s, _| {
        count.fetch_add(1, Ordering::SeqCst);
        async move {
            use tokio::io::AsyncWriteExt;
            if !read_head(&mut s).await {
                return;
            }
            let _ = s
                .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
                .await;
            let _ = s.flush().await;
            // The next request, then a close with no close_notify: the stream is dropped.
            read_head(&mut s).await;
        }
    })
    .await;
    let trusted = format!("ca_file = \"{}\"", pki.ca().display());
    let proxy = Proxy::start(&route("/", &trusted), &origin).await;
    let c = Client::new();
    assert_eq!(c.get(&proxy.url("/a"), &[]).await.status, 200);
    // Idle long enough to meet a keep-alive timeout (`REPLAY_AFTER`).
    tokio::time::sleep(Duration::from_millis(600)).await;
    let r = c.get(&proxy.url("/b"), &[]).await;
    assert_eq!((r.status, r.text().as_str()), (200, "ok"), "{}", r.text());
    assert_eq!(accepted.load(Ordering::SeqCst), 2);
}

/// `connect_timeout` bounds the TLS handshake as well as the TCP connect (nginx's
/// `proxy_connect_timeout` does): a backend that takes the connection and never answers
/// its ClientHello is a 504 then, not after the whole `upstream_timeout`, during which a
/// write would hold its URL's lock.
#[tokio::test]
async fn an_https_upstream_handshake_is_bounded_by_connect_timeout() {
    let (addr, silent) = silent_listener().await;
    let pki = Pki::new("slow-handshake", KeyType::EcdsaP256);
    let extra = format!(
        "ca_file = \"{}\"\nupstream_timeout = \"10s\"",
        pki.ca().display()
    );
    let proxy = Proxy::start_with(
        &route("/", &extra),
        &format!("https://{addr}"),
        "connect_timeout = \"300ms\"",
    )
    .await;
    let started = std::time::Instant::now();
    let r = Client::new().put(&proxy.url("/doc"), &[], "x").await;
    let waited = started.elapsed();
    let problem = r.assert_problem(504);
    // Named apart from a backend slow to answer: an operator tunes another key for it.
    let detail = problem["detail"].as_str().unwrap();
    assert!(
        detail.contains("could not be connected to (connect_timeout) within 300ms"),
        "{detail}"
    );
    assert!(waited < Duration::from_secs(3), "answered after {waited:?}");
    assert!(proxy.state.locks.is_empty());
    silent.abort();
}

/// A TLS failure's detail says what to do where that is one thing: set `ca_file` for an
/// unknown issuer; the `ca_file` does not hold the issuer; the certificate is a CA's (what
/// `openssl req -x509` makes unless told otherwise), which webpki refuses to see serve.
#[tokio::test]
async fn an_https_upstreams_certificate_failure_says_what_to_do() {
    let pki = Pki::new("hint", KeyType::EcdsaP256);
    let other = Pki::new("hint-other", KeyType::EcdsaP256);
    let backend = HttpsBackend::start(pki.server_config()).await;
    let c = Client::new();
    let detail = |proxy: Proxy| {
        let c = c.clone();
        async move {
            let r = c.get(&proxy.url("/doc"), &[]).await;
            r.assert_problem(502)["detail"].as_str().unwrap().to_owned()
        }
    };
    let none = Proxy::start(&route("/", ""), &backend.origin()).await;
    assert!(detail(none).await.contains("set the route's ca_file"));
    let wrong = format!("ca_file = \"{}\"", other.ca().display());
    let wrong = Proxy::start(&route("/", &wrong), &backend.origin()).await;
    let said = detail(wrong).await;
    assert!(
        said.contains("ca_file holds no CA that issued it"),
        "{said}"
    );

    // A self-signed certificate that is a CA, trusted as its own ca_file.
    let mut params = rcgen::CertificateParams::new(vec!["localhost".to_owned()]).unwrap();
    params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let key = rcgen::KeyPair::generate().unwrap();
    let cert = params.self_signed(&key).unwrap();
    let (cert_path, key_path) = (
        pki.dir.join("ca-as-leaf.pem"),
        pki.dir.join("ca-as-leaf.key"),
    );
    std::fs::write(&cert_path, cert.pem()).unwrap();
    std::fs::write(&key_path, key.serialize_pem()).unwrap();
    let (tls, _) = ifmatch::tls::server_config(&cert_path, &key_path).unwrap();
    let backend = HttpsBackend::start(tls).await;
    let trusted = format!("ca_file = \"{}\"", cert_path.display());
    let proxy = Proxy::start(&route("/", &trusted), &backend.origin()).await;
    let said = detail(proxy).await;
    assert!(
        said.contains("basicConstraints=critical,CA:FALSE"),
        "{said}"
    );
}

/// A TLS ClientHello (TLS 1.3's one suite) naming `name` by SNI.
fn client_hello(name: &str) -> Vec<u8> {
    let name = name.as_bytes();
    let len = |n: usize| u16::try_from(n).unwrap().to_be_bytes();
    let mut sni = len(name.len() + 3).to_vec();
    sni.push(0); // host_name
    sni.extend(len(name.len()));
    sni.extend(name);
    let mut ext = vec![0, 0]; // server_name
    ext.extend(len(sni.len()));
    ext.extend(sni);
    let mut hello = vec![3, 3];
    hello.extend([7; 32]); // random
    hello.push(0); // no session id
    hello.extend([0, 2, 0x13, 0x01]); // TLS_AES_128_GCM_SHA256
    hello.extend([1, 0]); // no compression
    hello.extend(len(ext.len()));
    hello.extend(ext);
    let mut handshake = vec![1]; // ClientHello
    handshake.extend(&u32::try_from(hello.len()).unwrap().to_be_bytes()[1..]);
    handshake.extend(hello);
    let mut record = vec![0x16, 3, 1];
    record.extend(len(handshake.len()));
    record.extend(handshake);
    record
}

/// What a client does wrong in its handshake is its own business: rustls logs an IP address
/// sent as SNI (wrk and `openssl s_client` send one) at `warn`, once per handshake, which
/// any client could use to fill the log. Kept to errors, also when `RUST_LOG` names crates
/// whose names only contain rustls's, unless it names rustls itself (the operator asking
/// for its warnings); and a `RUST_LOG` that cannot be read is said so, not dropped in
/// silence.
#[tokio::test]
async fn a_client_cannot_fill_the_log_through_rustls_and_a_bad_rust_log_is_named() {
    let backend = Backend::start().await;
    let pki = Pki::new("sni", KeyType::EcdsaP256);
    let config = format!(
        "[server]\nlisten = \"{{listen}}\"\n[server.tls]\ncert = \"{}\"\nkey = \"{}\"\n[[route]]\nprefix = \"/\"\nupstream = \"{}\"\n",
        pki.cert().display(),
        pki.key().display(),
        backend.origin()
    );
    // Each `RUST_LOG`, and whether the client's mistakes are logged under it.
    for (rust_log, shown) in [
        ("info", false),
        ("debug,hyper=info,h2=info", false),
        (
            "debug,hyper=info,h2=info,hyper_rustls=debug,tokio_rustls=debug",
            false,
        ),
        ("info,ifmatch=nope", false),
        // Not read, so `info` is used: rustls is kept to errors as with no RUST_LOG.
        ("info,rustls=nope", false),
        ("info,rustls=warn", true),
    ] {
        let bin = Binary::start_with(&config, &[], |c| {
            c.env("RUST_LOG", rust_log);
        })
        .await;
        for _ in 0..5 {
            let mut s = tokio::net::TcpStream::connect(bin.addr).await.unwrap();
            s.write_all(&client_hello("127.0.0.1")).await.unwrap();
            let mut answer = Vec::new();
            let _ = tokio::time::timeout(Duration::from_secs(2), s.read_to_end(&mut answer)).await;
            assert!(!answer.is_empty(), "the server answered the hello");
        }
        let url = format!("https://localhost:{}/", bin.addr.port());
        assert_eq!(
            Client::tls(&pki.ca_pem, false).get(&url, &[]).await.status,
            404
        );
        bin.wait_for_log("status=404", Duration::from_secs(5)).await;
        let log = bin.log();
        assert_eq!(
            log.iter().any(|l| l.contains("SNI")),
            shown,
            "RUST_LOG={rust_log}: {log:#?}"
        );
        let named = log.iter().any(|l| l.contains("RUST_LOG cannot be read"));
        assert_eq!(
            named,
            rust_log.contains("nope"),
            "RUST_LOG={rust_log}: {log:#?}"
        );
    }
}

/// A client offering both h2 and http/1.1 by ALPN, as browsers and curl do, is spoken
/// HTTP/2: the listener lists h2 first, and the server's order settles it.
#[tokio::test]
async fn a_client_offering_h2_and_http_1_1_by_alpn_is_spoken_h2() {
    let backend = Backend::start().await;
    let pki = Pki::new("alpn-both", KeyType::EcdsaP256);
    let proxy =
        Proxy::start_with(&route("/docs/", ""), &backend.origin(), &pki.server_toml()).await;
    for offer in [["h2", "http/1.1"], ["http/1.1", "h2"]] {
        let mut config = client_tls(&pki.ca_pem, rustls::ALL_VERSIONS);
        config.alpn_protocols = offer.iter().map(|p| p.as_bytes().to_vec()).collect();
        let tcp = tokio::net::TcpStream::connect(proxy.addr).await.unwrap();
        let name = rustls_pki_types::ServerName::try_from("localhost").unwrap();
        let tls = tokio_rustls::TlsConnector::from(std::sync::Arc::new(config))
            .connect(name, tcp)
            .await
            .expect("the handshake succeeds");
        assert_eq!(
            tls.get_ref().1.alpn_protocol(),
            Some(&b"h2"[..]),
            "offered {offer:?}"
        );
    }
}

/// Two routes to https upstreams, each with its own private CA, each trust their own: the
/// pools are kept apart by the roots they trust, and one route's CA is not the other's.
#[tokio::test]
async fn routes_with_different_ca_files_each_trust_their_own_ca() {
    let (pa, pb) = (
        Pki::new("ca-a", KeyType::EcdsaP256),
        Pki::new("ca-b", KeyType::EcdsaP256),
    );
    let (a, b) = (
        HttpsBackend::start(pa.server_config()).await,
        HttpsBackend::start(pb.server_config()).await,
    );
    let routes = format!(
        "[[route]]\nprefix = \"/a/\"\nupstream = \"{}\"\nca_file = \"{}\"\n\
         [[route]]\nprefix = \"/b/\"\nupstream = \"{}\"\nca_file = \"{}\"\n",
        a.origin(),
        pa.ca().display(),
        b.origin(),
        pb.ca().display()
    );
    let proxy = Proxy::start(&routes, &a.origin()).await;
    let c = Client::new();
    for path in ["/a/doc", "/b/doc", "/a/doc"] {
        let r = c.get(&proxy.url(path), &[]).await;
        assert_eq!((r.status, r.text()), (200, "doc".to_owned()), "{path}");
    }
}

/// A `ca_file` holding a certificate that cannot be used as a root is refused at load,
/// naming the file, not found out at the first request as a 502.
#[test]
fn a_ca_file_whose_certificate_cannot_be_read_is_refused_at_load() {
    let dir = common::TempDir::new("bad-ca");
    let ca = dir.join("ca.pem");
    // Valid PEM around three bytes that are no DER certificate.
    std::fs::write(
        &ca,
        "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n",
    )
    .unwrap();
    let text = format!(
        "[server]\nlisten = \"127.0.0.1:1\"\n[[route]]\nprefix = \"/\"\nupstream = \"https://a:1\"\nca_file = \"{}\"\n",
        ca.display()
    );
    let e = Config::parse(&text, "t.toml").unwrap_err().to_string();
    assert!(e.starts_with("t.toml:6: route.ca_file: "), "{e}");
    assert!(e.contains(&ca.display().to_string()), "{e}");
}

/// The protocol a new TLS connection to `addr` settles on by ALPN when its client offers
/// `offer`; `Err` when the handshake fails.
async fn negotiated(
    addr: std::net::SocketAddr,
    ca_pem: &str,
    offer: &[&str],
) -> std::io::Result<Option<String>> {
    let mut config = client_tls(ca_pem, rustls::ALL_VERSIONS);
    config.alpn_protocols = offer.iter().map(|p| p.as_bytes().to_vec()).collect();
    let tcp = tokio::net::TcpStream::connect(addr).await?;
    let name = rustls_pki_types::ServerName::try_from("localhost").unwrap();
    let tls = tokio_rustls::TlsConnector::from(std::sync::Arc::new(config))
        .connect(name, tcp)
        .await?;
    let alpn = tls.get_ref().1.alpn_protocol();
    Ok(alpn.map(|p| String::from_utf8_lossy(p).into_owned()))
}

/// With `server.http2 = false` a TLS listener offers HTTP/1.1 alone by ALPN: a client
/// offering h2 and http/1.1, in either order, is spoken HTTP/1.1; one offering only h2 is
/// refused at the handshake (RFC 7301's `no_application_protocol`), as nginx's `http2 off`
/// does. A reload that turns HTTP/2 on offers h2 again, with the same certificates.
#[tokio::test]
async fn with_http2_off_a_tls_listener_offers_http_1_1_alone_by_alpn() {
    let backend = Backend::start().await;
    backend.store.put("/docs/a", "v1");
    let pki = Pki::new("alpn-off", KeyType::EcdsaP256);
    let text = |http2: bool| {
        format!(
            "[server]\nlisten = \"127.0.0.1:0\"\nhttp2 = {http2}\n{}{}",
            pki.server_toml(),
            route("/docs/", "").replace("{upstream}", &backend.origin())
        )
    };
    let proxy = Proxy::start_with(
        &route("/docs/", ""),
        &backend.origin(),
        &format!("http2 = false\n{}", pki.server_toml()),
    )
    .await;
    for offer in [["h2", "http/1.1"], ["http/1.1", "h2"]] {
        let alpn = negotiated(proxy.addr, &pki.ca_pem, &offer).await.unwrap();
        assert_eq!(alpn.as_deref(), Some("http/1.1"), "offered {offer:?}");
    }
    let refused = negotiated(proxy.addr, &pki.ca_pem, &["h2"]).await;
    let e = refused.expect_err("a client offering only h2 is refused");
    assert!(e.to_string().contains("NoApplicationProtocol"), "{e}");
    let r = Client::tls(&pki.ca_pem, false)
        .get(&proxy.https_url("/docs/a"), &[])
        .await;
    assert_eq!((r.status, r.version), (200, http::Version::HTTP_11));
    assert_eq!(r.etag(), proxy.tag_of("v1"));

    let dir = common::TempDir::new("alpn-reload");
    let path = dir.join("ifmatch.toml");
    std::fs::write(&path, text(true)).unwrap();
    let running = Config::parse(&text(false), "t.toml").unwrap();
    ifmatch::lifecycle::reload(&path, &proxy.state, &running);
    let alpn = negotiated(proxy.addr, &pki.ca_pem, &["h2", "http/1.1"]).await;
    assert_eq!(
        alpn.unwrap().as_deref(),
        Some("h2"),
        "on again after the reload"
    );
    let r = Client::tls(&pki.ca_pem, true)
        .get(&proxy.https_url("/docs/a"), &[])
        .await;
    assert_eq!((r.status, r.version), (200, http::Version::HTTP_2));
}

/// A write whose client leaves while its upstream connection is still being made (here a
/// TLS handshake the backend holds) has not been sent: it is never forwarded, nothing is
/// left to settle, and its URL's lock goes at once, with a cap on connections or without.
/// It was taken for sent: the exchange ran on in a task of its own with the URL locked, and
/// sent the write once the handshake was done, after its client had gone.
#[tokio::test]
async fn a_client_that_leaves_while_the_upstream_connection_is_made_is_never_forwarded() {
    for cap in ["", "upstream_max_connections = 4"] {
        let pki = Pki::new("held-handshake", KeyType::EcdsaP256);
        let handshake = Duration::from_millis(1000);
        let backend = HttpsBackend::start_after(pki.server_config(), handshake).await;
        let keys = format!(
            "ca_file = \"{}\"\nlock_timeout = \"300ms\"",
            pki.ca().display()
        );
        let proxy = Proxy::start_with(&route("/", &keys), &backend.origin(), cap).await;
        let c = Client::new();
        let url = proxy.url("/doc");
        let left = tokio::time::timeout(
            Duration::from_millis(300),
            c.try_send("PUT", &url, &[], "abandoned"),
        )
        .await;
        assert!(
            left.is_err(),
            "{cap:?}: the write should still have been connecting"
        );
        // The next writer finds the URL free: it waits for its own handshake, not for the
        // abandoned write's.
        let next = c.put(&url, &[], "next").await;
        assert_eq!(next.status, 204, "{cap:?}: the next writer was held up");
        tokio::time::sleep(handshake).await;
        assert_eq!(
            backend.writes.load(std::sync::atomic::Ordering::SeqCst),
            1,
            "{cap:?}: only the next writer's write was sent"
        );
        assert_eq!(proxy.state.settling.count(), 0, "nothing left to settle");
        assert!(proxy.state.locks.is_empty());
    }
}

/// A host with no CA roots of its own (a distroless or scratch image) is fine for a proxy
/// whose upstreams are all `http://`, or `https://` with a `ca_file`: it is not told at
/// every start and reload that its https upstreams need a `ca_file`. One with an https
/// route that would use the platform's roots is told, at start and on reload.
#[tokio::test]
async fn no_platform_roots_are_warned_of_only_where_an_https_route_needs_them() {
    let dir = common::TempDir::new("no-roots");
    std::fs::create_dir_all(dir.join("certs")).unwrap();
    std::fs::write(dir.join("roots.pem"), "not a certificate\n").unwrap();
    let no_roots = |c: &mut std::process::Command| {
        c.env("SSL_CERT_FILE", dir.join("roots.pem"))
            .env("SSL_CERT_DIR", dir.join("certs"));
    };
    let warned = |bin: &Binary| {
        bin.log()
            .iter()
            .any(|l| l.contains("https upstreams need ca_file"))
    };
    let pki = Pki::new("no-roots", KeyType::EcdsaP256);
    let config = |routes: &str| format!("[server]\nlisten = \"{{listen}}\"\n{routes}");
    let plain = "[[route]]\nprefix = \"/\"\nupstream = \"http://127.0.0.1:9\"\n";
    let private = format!(
        "[[route]]\nprefix = \"/p/\"\nupstream = \"https://localhost:9\"\nca_file = \"{}\"\n",
        pki.ca().display()
    );
    let bin = Binary::start_with(&config(&format!("{plain}{private}")), &[], no_roots).await;
    bin.reload(&config(plain)).await;
    assert!(!warned(&bin), "{:#?}", bin.log());

    let public = "[[route]]\nprefix = \"/x/\"\nupstream = \"https://localhost:9\"\n";
    bin.reload(&config(&format!("{plain}{public}"))).await;
    assert!(warned(&bin), "{:#?}", bin.log());
    let bin = Binary::start_with(&config(public), &[], no_roots).await;
    assert!(warned(&bin), "{:#?}", bin.log());
}

/// An upload to an https backend that takes none of its body, whose HTTP/2 client resets
/// its stream before any answer: the request is dropped while it has a timer of its own,
/// and hyper, closing the connection, waits for good on TLS's close_notify, which the
/// backend never reads. The connection's watch must still end it once its writes have not
/// moved for `upstream_timeout`: it held the connection, and its place under
/// `upstream_max_connections`, for good (every later request 503 at `connect_timeout`).
#[tokio::test]
async fn an_upload_reset_by_its_client_leaves_no_https_connection_stuck_on_a_backend_that_reads_nothing(
) {
    use hyper::body::Frame;
    /// A body of the chunks sent down a channel.
    struct Chunks(tokio::sync::mpsc::Receiver<bytes::Bytes>);
    impl hyper::body::Body for Chunks {
        type Data = bytes::Bytes;
        type Error = std::io::Error;
        fn poll_frame(
            mut self: std::pin::Pin<&mut Self>,
            cx: &mut std::task::Context<'_>,
        ) -> std::task::Poll<Option<Result<Frame<bytes::Bytes>, std::io::Error>>> {
            self.0.poll_recv(cx).map(|c| c.map(|c| Ok(Frame::data(c))))
        }
    }
    let pki = Pki::new("stuck", KeyType::EcdsaP256);
    let origin = raw_https_backend((*pki.server_config()).clone(), move |mut s, _| async move {
        let mut got = Vec::new();
        let mut buf = [0u8; 4096];
        while !got.windows(4).any(|w| w == b"\r\n\r\n") {
            match s.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => got.extend_from_slice(&buf[..n]),
            }
        }
        if got.starts_with(b"GET /upload") {
            // Reads nothing more, answers nothing, keeps the connection.
            tokio::time::sleep(Duration::from_secs(30)).await;
        } else {
            let _ = s
                .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
                .await;
        }
    })
    .await;
    let trusted = format!("ca_file = \"{}\"", pki.ca().display());
    let proxy = Proxy::start_with(
        &route("/", &format!("{trusted}\nupstream_timeout = \"300ms\"")),
        &origin,
        "upstream_max_connections = 1\nconnect_timeout = \"2s\"",
    )
    .await;
    let tcp = tokio::net::TcpStream::connect(proxy.addr).await.unwrap();
    let (mut sender, conn) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        hyper_util::rt::TokioIo::new(tcp),
    )
    .await
    .unwrap();
    tokio::spawn(conn);
    let (tx, rx) = tokio::sync::mpsc::channel(1);
    let body = Chunks(rx);
    let req = hyper::Request::get(format!("http://{}/upload", proxy.addr))
        .body(body)
        .unwrap();
    let feeder = tokio::spawn(async move {
        let chunk = bytes::Bytes::from(vec![b'x'; 64 * 1024]);
        while tx.send(chunk.clone()).await.is_ok() {}
    });
    let exchange = tokio::spawn(sender.send_request(req));
    // Long enough for the kernel's buffers to the backend to fill and the writes to stall,
    // short of the request's own timeout.
    tokio::time::sleep(Duration::from_millis(150)).await;
    exchange.abort(); // the client resets its stream
    feeder.abort();
    // A period for the stall to be judged, and some.
    tokio::time::sleep(Duration::from_millis(800)).await;
    let started = std::time::Instant::now();
    let r = Client::new().get(&proxy.url("/next"), &[]).await;
    assert_eq!(
        (r.status, r.text().as_str()),
        (200, "ok"),
        "after {:?}",
        started.elapsed()
    );
}
