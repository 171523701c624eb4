//! A small legacy document store: the backend of `ifmatch --demo` and of the test suite.
//!
//! It behaves like the services ifmatch is meant to sit in front of: no ETags and no
//! conditional requests at all, last write wins. It sends `Last-Modified`, counts every write
//! it receives, and answers 409 Conflict when a write targets an archived document (a
//! refusal that no retry will fix).

use std::collections::HashMap;
use std::convert::Infallible;
use std::future::Future;
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use http::header::{ALLOW, CONTENT_TYPE, LAST_MODIFIED, LOCATION};
use http::{HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use tokio::net::TcpListener;

/// Request bodies the store accepts at most.
const MAX_BODY: usize = 64 << 20;

#[derive(Clone, Debug)]
struct Doc {
    body: Bytes,
    content_type: HeaderValue,
    modified: SystemTime,
    archived: bool,
}

/// The store's documents and counters. Share it with [`serve`] through an `Arc`.
#[derive(Debug, Default)]
pub struct LegacyStore {
    docs: Mutex<HashMap<String, Doc>>,
    writes: AtomicU64,
    reads: AtomicU64,
    next_id: AtomicU64,
    delay_ms: AtomicU64,
}

// === impl LegacyStore ===

impl LegacyStore {
    pub fn new() -> Arc<Self> {
        Arc::default()
    }

    fn docs(&self) -> MutexGuard<'_, HashMap<String, Doc>> {
        self.docs.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Writes a document directly, behind any proxy's back (not counted as a write).
    pub fn put(&self, path: &str, body: impl Into<Bytes>) {
        let archived = self.docs().get(path).is_some_and(|d| d.archived);
        self.docs().insert(
            path.to_owned(),
            Doc {
                body: body.into(),
                content_type: HeaderValue::from_static("application/json"),
                modified: SystemTime::now(),
                archived,
            },
        );
    }

    /// The document's current bytes.
    pub fn get(&self, path: &str) -> Option<Bytes> {
        self.docs().get(path).map(|d| d.body.clone())
    }

    /// Marks a document archived: every write to it gets 409 Conflict from now on.
    pub fn archive(&self, path: &str) {
        if let Some(d) = self.docs().get_mut(path) {
            d.archived = true;
        }
    }

    /// Requests other than GET and HEAD received so far (refused ones included).
    pub fn writes(&self) -> u64 {
        self.writes.load(Ordering::SeqCst)
    }

    /// GET and HEAD requests received so far.
    pub fn reads(&self) -> u64 {
        self.reads.load(Ordering::SeqCst)
    }

    /// Makes every answer wait this long first (a slow backend).
    pub fn set_delay(&self, delay: Duration) {
        self.delay_ms
            .store(delay.as_millis() as u64, Ordering::SeqCst);
    }

    async fn handle(&self, req: Request<Incoming>) -> Response<Full<Bytes>> {
        let delay = self.delay_ms.load(Ordering::SeqCst);
        if delay > 0 {
            tokio::time::sleep(Duration::from_millis(delay)).await;
        }
        let method = req.method().clone();
        let path = req.uri().path().to_owned();
        if matches!(method, Method::GET | Method::HEAD) {
            self.reads.fetch_add(1, Ordering::SeqCst);
            return match self.docs().get(&path) {
                Some(doc) => document(doc),
                None => json(StatusCode::NOT_FOUND, "no such document", &path),
            };
        }
        self.writes.fetch_add(1, Ordering::SeqCst);
        let content_type = req
            .headers()
            .get(CONTENT_TYPE)
            .cloned()
            .unwrap_or(HeaderValue::from_static("application/octet-stream"));
        let body = match Limited::new(req.into_body(), MAX_BODY).collect().await {
            Ok(b) => b.to_bytes(),
            Err(_) => return json(StatusCode::BAD_REQUEST, "unreadable body", &path),
        };
        let mut docs = self.docs();
        if docs.get(&path).is_some_and(|d| d.archived) {
            return json(StatusCode::CONFLICT, "document is archived", &path);
        }
        let now = SystemTime::now();
        match method {
            Method::PUT => {
                let doc = Doc {
                    body,
                    content_type,
                    modified: now,
                    archived: false,
                };
                match docs.insert(path, doc) {
                    Some(_) => status(StatusCode::NO_CONTENT),
                    None => status(StatusCode::CREATED),
                }
            }
            Method::PATCH => match docs.get_mut(&path) {
                // Legacy PATCH appends: not idempotent, so a lost update shows at once.
                Some(doc) => {
                    let mut joined = doc.body.to_vec();
                    joined.extend_from_slice(&body);
                    doc.body = joined.into();
                    doc.modified = now;
                    status(StatusCode::NO_CONTENT)
                }
                None => json(StatusCode::NOT_FOUND, "no such document", &path),
            },
            Method::DELETE => match docs.remove(&path) {
                Some(_) => status(StatusCode::NO_CONTENT),
                None => json(StatusCode::NOT_FOUND, "no such document", &path),
            },
            Method::POST if path.ends_with('/') => {
                let id = self.next_id.fetch_add(1, Ordering::SeqCst) + 1;
                let new = format!("{path}{id}");
                let doc = Doc {
                    body,
                    content_type,
                    modified: now,
                    archived: false,
                };
                docs.insert(new.clone(), doc);
                let mut rsp = status(StatusCode::CREATED);
                if let Ok(v) = HeaderValue::from_str(&new) {
                    rsp.headers_mut().insert(LOCATION, v);
                }
                rsp
            }
            _ => {
                let mut rsp = json(StatusCode::METHOD_NOT_ALLOWED, "method not allowed", &path);
                rsp.headers_mut().insert(
                    ALLOW,
                    HeaderValue::from_static("GET, HEAD, PUT, PATCH, DELETE, POST"),
                );
                rsp
            }
        }
    }
}

fn document(doc: &Doc) -> Response<Full<Bytes>> {
    let mut rsp = Response::new(Full::new(doc.body.clone()));
    let h = rsp.headers_mut();
    h.insert(CONTENT_TYPE, doc.content_type.clone());
    if let Ok(v) = HeaderValue::from_str(&httpdate::fmt_http_date(doc.modified)) {
        h.insert(LAST_MODIFIED, v);
    }
    rsp
}

fn status(status: StatusCode) -> Response<Full<Bytes>> {
    let mut rsp = Response::new(Full::default());
    *rsp.status_mut() = status;
    rsp
}

fn json(status: StatusCode, error: &str, path: &str) -> Response<Full<Bytes>> {
    let body = serde_json::json!({ "error": error, "path": path }).to_string();
    let mut rsp = Response::new(Full::new(Bytes::from(body)));
    *rsp.status_mut() = status;
    rsp.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    rsp
}

/// Serves `store` on `listener` (HTTP/1.1 and h2c) until `shutdown` completes.
pub async fn serve(
    listener: TcpListener,
    store: Arc<LegacyStore>,
    shutdown: impl Future<Output = ()>,
) -> io::Result<()> {
    let builder = auto::Builder::new(TokioExecutor::new());
    let failures = crate::telemetry::Every::new(Duration::from_secs(60));
    tokio::pin!(shutdown);
    loop {
        let (stream, _) = tokio::select! {
            conn = crate::server::accept(&listener, "demo store: accept failed", &failures) => conn,
            () = &mut shutdown => return Ok(()),
        };
        let store = store.clone();
        let service = service_fn(move |req| {
            let store = store.clone();
            async move { Ok::<_, Infallible>(store.handle(req).await) }
        });
        let builder = builder.clone();
        tokio::spawn(async move {
            let _ = builder
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

/// `ifmatch --demo`: a legacy store on a free port, the proxy on `listen` in front of it, and
/// a walk-through printed to stdout. Runs until `shutdown` completes.
pub async fn run_demo(
    listen: SocketAddr,
    shutdown: impl Future<Output = ()>,
) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    let store = LegacyStore::new();
    let hello = r#"{"title":"hello","body":"edit me"}"#;
    store.put("/docs/hello", hello);
    store.put("/docs/archived", r#"{"title":"old news"}"#);
    store.archive("/docs/archived");

    let backend = TcpListener::bind("127.0.0.1:0").await?;
    let backend_addr = backend.local_addr()?;
    let proxy = TcpListener::bind(listen)
        .await
        .map_err(|e| format!("cannot listen on {listen}: {e} (pick another with --listen)"))?;
    let listen = proxy.local_addr()?;
    // A key of its own, written into the config, so that the tags printed below are right.
    let mut secret = [0u8; 16];
    getrandom::fill(&mut secret).map_err(|e| format!("no random source: {e}"))?;
    let tag_key: String = secret.iter().map(|b| format!("{b:02x}")).collect();
    let toml = format!(
        r#"
[server]
listen = "{listen}"
tag_key = "{tag_key}"

[[route]]
prefix = "/docs/"
upstream = "http://{backend_addr}"
validation = "revalidate"
require_precondition = true
"#
    );
    let config = crate::config::Config::parse(&toml, "demo")?;
    let tag = crate::etag::TagKey::new(tag_key.as_bytes()).tag_of(hello.as_bytes());
    // Written, not `print!`ed: stdout piped into a reader that has gone (`--demo | head`)
    // must not end the demo with a panic.
    let text = walkthrough(listen, backend_addr, &toml, &tag.to_string());
    {
        let mut out = std::io::stdout().lock();
        let _ = std::io::Write::write_all(&mut out, text.as_bytes())
            .and_then(|()| std::io::Write::flush(&mut out));
    }
    let store_task = tokio::spawn(serve(backend, store, std::future::pending()));
    crate::server::run(proxy, config, shutdown).await?;
    store_task.abort();
    Ok(())
}

/// The demo's banner and walk-through: where the proxy is, the config it runs, and curl
/// commands to try, each with the answer it gets. A wildcard `listen` (`0.0.0.0:8080` in a
/// container) is named by its loopback address: the wildcard is where to bind, not where to
/// connect (Windows refuses it, browsers block it); the config printed keeps it.
fn walkthrough(listen: SocketAddr, backend_addr: SocketAddr, toml: &str, tag: &str) -> String {
    let mut listen = listen;
    if listen.ip().is_unspecified() {
        listen.set_ip(match listen.ip() {
            IpAddr::V4(_) => Ipv4Addr::LOCALHOST.into(),
            IpAddr::V6(_) => Ipv6Addr::LOCALHOST.into(),
        });
    }
    let u = format!("http://{listen}/docs/hello");
    format!(
        r#"ifmatch demo: proxy on http://{listen}  ->  legacy store on http://{backend_addr} (no ETags)

The config it runs:{toml}
Try, in another terminal:

  curl -i {u}
      200, with ETag: {tag}   (keyed SHA-256 of the body)
  curl -i {u} -H 'If-None-Match: {tag}'
      304 Not Modified
  curl -i -X PUT {u} -H 'If-Match: {tag}' -H 'Content-Type: application/json' -d '{{"title":"v2"}}'
      204: your write reached the backend
  curl -i -X PUT {u} -H 'If-Match: {tag}' -H 'Content-Type: application/json' -d '{{"title":"v3"}}'
      412 Precondition Failed: the tag is stale, nothing was forwarded (re-fetch, retry)
  curl -i -X PUT {u} -H 'Content-Type: application/json' -d '{{"title":"v4"}}'
      428 Precondition Required: this route refuses blind writes
  curl -i -X PUT http://{listen}/docs/archived -H 'If-Match: *' -H 'Content-Type: application/json' -d '{{}}'
      409 Conflict from the backend, passed through unchanged (retrying will not help)

Ctrl-C stops it.
"#
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `docker run -p 8080:8080 ifmatch --demo --listen 0.0.0.0:8080` (the README's way to
    /// see the image work): the proxy binds every address, but 0.0.0.0 is no address to send
    /// to (Windows refuses to connect to it, browsers block it), so the commands to paste
    /// name loopback, which `-p` publishes on the host.
    #[test]
    fn a_wildcard_listen_address_is_shown_as_loopback_in_the_commands() {
        let backend: SocketAddr = "127.0.0.1:9000".parse().unwrap();
        for (listen, shown) in [
            ("0.0.0.0:8080", "http://127.0.0.1:8080/"),
            ("[::]:8080", "http://[::1]:8080/"),
            ("127.0.0.1:8080", "http://127.0.0.1:8080/"),
            ("10.1.2.3:8080", "http://10.1.2.3:8080/"),
        ] {
            let text = walkthrough(listen.parse().unwrap(), backend, "", "\"t\"");
            assert!(
                text.starts_with(&format!(
                    "ifmatch demo: proxy on {}",
                    shown.trim_end_matches('/')
                )),
                "{listen}: {text}"
            );
            let curls: Vec<&str> = text
                .lines()
                .filter(|l| l.trim_start().starts_with("curl"))
                .collect();
            assert_eq!(curls.len(), 6, "{text}");
            for line in curls {
                assert!(line.contains(shown), "{listen}: {line}");
            }
        }
    }
}
