//! Backends: the legacy document store (no ETags, counts writes, answers 409 for archived
//! documents), a scripted server that records every request it receives, and a raw one
//! whose connections a test serves byte by byte.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use http::{HeaderMap, Method, Request, Response, Uri};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use ifmatch::demo::LegacyStore;
use tokio::net::TcpListener;
use tokio::sync::oneshot;

/// The legacy document store, served on 127.0.0.1:0 until dropped.
pub struct Backend {
    pub store: Arc<LegacyStore>,
    pub addr: SocketAddr,
    _stop: oneshot::Sender<()>,
}

impl Backend {
    pub async fn start() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let store = LegacyStore::new();
        let (stop, stopped) = oneshot::channel::<()>();
        tokio::spawn(ifmatch::demo::serve(listener, store.clone(), async {
            let _ = stopped.await;
        }));
        Self {
            store,
            addr,
            _stop: stop,
        }
    }

    pub fn origin(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }
}

/// One request as the scripted backend received it.
#[derive(Clone, Debug)]
pub struct Recorded {
    pub method: Method,
    pub uri: Uri,
    pub headers: HeaderMap,
    pub body: Bytes,
}

type Handler = Arc<
    dyn Fn(Recorded) -> Pin<Box<dyn Future<Output = Response<Full<Bytes>>> + Send>> + Send + Sync,
>;

/// A backend whose answers a test writes; it records requests and counts connections.
pub struct ScriptedBackend {
    pub addr: SocketAddr,
    seen: Arc<Mutex<Vec<Recorded>>>,
    connections: Arc<AtomicUsize>,
    /// Connections open now, and the most open at once.
    open: Arc<(AtomicUsize, AtomicUsize)>,
    _stop: oneshot::Sender<()>,
}

impl ScriptedBackend {
    pub async fn start<F, Fut>(handler: F) -> Self
    where
        F: Fn(Recorded) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Response<Full<Bytes>>> + Send + 'static,
    {
        let handler: Handler = Arc::new(move |r| Box::pin(handler(r)));
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let connections = Arc::new(AtomicUsize::new(0));
        let open = Arc::new((AtomicUsize::new(0), AtomicUsize::new(0)));
        let (stop, mut stopped) = oneshot::channel::<()>();
        let (seen2, conns2, open2) = (seen.clone(), connections.clone(), open.clone());
        tokio::spawn(async move {
            let mut builder = auto::Builder::new(TokioExecutor::new());
            // Heads as large as any the proxy can be configured to pass on.
            builder.http1().max_buf_size(4 << 20).max_headers(1000);
            loop {
                let (stream, _) = tokio::select! {
                    a = listener.accept() => a.unwrap(),
                    _ = &mut stopped => return,
                };
                conns2.fetch_add(1, Ordering::SeqCst);
                let now = open2.0.fetch_add(1, Ordering::SeqCst) + 1;
                open2.1.fetch_max(now, Ordering::SeqCst);
                let open = open2.clone();
                let (handler, seen) = (handler.clone(), seen2.clone());
                let service = service_fn(move |req: Request<Incoming>| {
                    let (handler, seen) = (handler.clone(), seen.clone());
                    async move {
                        let (parts, body) = req.into_parts();
                        let body = body
                            .collect()
                            .await
                            .map(|b| b.to_bytes())
                            .unwrap_or_default();
                        let rec = Recorded {
                            method: parts.method,
                            uri: parts.uri,
                            headers: parts.headers,
                            body,
                        };
                        seen.lock().unwrap().push(rec.clone());
                        Ok::<_, Infallible>(handler(rec).await)
                    }
                });
                let builder = builder.clone();
                tokio::spawn(async move {
                    let _ = builder
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                    open.0.fetch_sub(1, Ordering::SeqCst);
                });
            }
        });
        Self {
            addr,
            seen,
            connections,
            open,
            _stop: stop,
        }
    }

    pub fn origin(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Every request received so far.
    pub fn requests(&self) -> Vec<Recorded> {
        self.seen.lock().unwrap().clone()
    }

    pub fn last(&self) -> Recorded {
        self.requests()
            .pop()
            .expect("the backend received a request")
    }

    /// A backend that answers every request with 200 and `body` after `delay`: a request
    /// that stays in flight.
    pub async fn slow(delay: std::time::Duration, body: &'static str) -> Self {
        Self::start(move |_| async move {
            tokio::time::sleep(delay).await;
            respond(200, &[], body)
        })
        .await
    }

    /// TCP connections accepted so far.
    pub fn connections(&self) -> usize {
        self.connections.load(Ordering::SeqCst)
    }

    /// The most TCP connections that were open at once.
    pub fn most_open(&self) -> usize {
        self.open.1.load(Ordering::SeqCst)
    }
}

/// A raw TCP backend on 127.0.0.1:0, for answers hyper would not give: it accepts until the
/// test ends and runs `serve` on a task of its own for each connection. `serve` is called
/// in the accept loop, in the order connections come, so it may count or tell them apart
/// before its future runs. Returns the origin.
pub async fn raw_backend<F, Fut>(mut serve: F) -> String
where
    F: FnMut(tokio::net::TcpStream) -> Fut + Send + 'static,
    Fut: Future<Output = ()> + Send + 'static,
{
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let origin = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move {
        while let Ok((s, _)) = listener.accept().await {
            tokio::spawn(serve(s));
        }
    });
    origin
}

/// A response with a status, headers and body, for scripted handlers.
pub fn respond(
    status: u16,
    headers: &[(&str, &str)],
    body: impl Into<Bytes>,
) -> Response<Full<Bytes>> {
    let mut rsp = Response::new(Full::new(body.into()));
    *rsp.status_mut() = http::StatusCode::from_u16(status).unwrap();
    for (k, v) in headers {
        rsp.headers_mut().append(
            http::HeaderName::from_bytes(k.as_bytes()).unwrap(),
            http::HeaderValue::from_str(v).unwrap(),
        );
    }
    rsp
}
