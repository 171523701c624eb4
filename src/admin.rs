//! The admin listener, apart from the proxy's: `/healthz` (the process answers), `/readyz`
//! (the config is loaded and the proxy listener bound, and no shutdown has begun) and
//! `/metrics` (Prometheus text format).

use std::collections::HashMap;
use std::convert::Infallible;
use std::future::Future;
use std::io;
use std::net::IpAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::header::{self, CONTENT_TYPE};
use http::{HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio::time::Instant;

use crate::proxy::Proxy;

/// Whether the proxy should get traffic: set once its listener is bound, cleared when a
/// shutdown begins (so that a load balancer stops sending before connections close).
pub type Ready = Arc<AtomicBool>;

/// Admin connections open at once: probes and scrapes need a few. More are closed at once,
/// so that the admin port cannot take the descriptors the proxy serves with.
const MAX_CONNECTIONS: usize = 64;

/// Admin connections open at once from one address: a client that holds its share open
/// (reconnecting every `header_read_timeout`) leaves room for the kubelet's probes and the
/// scraper, which come from elsewhere.
const PER_CLIENT: usize = 8;

/// Admin connections open per client address.
#[derive(Default)]
struct PerClient(Mutex<HashMap<IpAddr, usize>>);

/// One connection's place in [`PerClient`], given back when it closes.
struct Place {
    all: Arc<PerClient>,
    ip: IpAddr,
}

impl PerClient {
    fn take(self: &Arc<Self>, ip: IpAddr) -> Option<Place> {
        let mut open = self.0.lock().unwrap_or_else(|p| p.into_inner());
        let n = open.entry(ip).or_default();
        if *n >= PER_CLIENT {
            return None;
        }
        *n += 1;
        Some(Place {
            all: self.clone(),
            ip,
        })
    }
}

impl Drop for Place {
    fn drop(&mut self) {
        let mut open = self.all.0.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = open.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                open.remove(&self.ip);
            }
        }
    }
}

/// Serves the admin endpoints on `listener` until `shutdown` completes. A connection that
/// completes no request head for `header_read_timeout` (`[server]`'s) is closed, whether it
/// sends nothing, sends slowly, or sits idle after an answer: the proxy listener's rule.
pub async fn serve(
    listener: TcpListener,
    proxy: Arc<Proxy>,
    ready: Ready,
    header_read_timeout: Duration,
    shutdown: impl Future<Output = ()>,
) -> io::Result<()> {
    let builder = auto::Builder::new(TokioExecutor::new());
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    let per_client = Arc::new(PerClient::default());
    let failures = crate::telemetry::Every::new(Duration::from_secs(60));
    tokio::pin!(shutdown);
    loop {
        let (stream, addr) = tokio::select! {
            conn = crate::server::accept(&listener, "admin accept failed", &failures) => conn,
            () = &mut shutdown => return Ok(()),
        };
        let Some(place) = per_client.take(addr.ip()) else {
            continue;
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            continue;
        };
        let (proxy, ready) = (proxy.clone(), ready.clone());
        // Answers are made at once, so a request is in flight for no time: when the last
        // head came is all there is to know.
        let last_head = Arc::new(Mutex::new(Instant::now()));
        let heads = last_head.clone();
        let service = service_fn(move |req: Request<Incoming>| {
            *heads.lock().unwrap_or_else(|p| p.into_inner()) = Instant::now();
            let rsp = answer(&req, &proxy, &ready);
            async move { Ok::<_, Infallible>(rsp) }
        });
        let builder = builder.clone();
        tokio::spawn(async move {
            let conn = builder.serve_connection(TokioIo::new(stream), service);
            tokio::pin!(conn);
            loop {
                let since = *last_head.lock().unwrap_or_else(|p| p.into_inner());
                tokio::select! {
                    _ = &mut conn => break,
                    () = tokio::time::sleep_until(since + header_read_timeout) => {
                        if *last_head.lock().unwrap_or_else(|p| p.into_inner()) == since {
                            break;
                        }
                    }
                }
            }
            drop((slot, place));
        });
    }
}

fn answer(req: &Request<Incoming>, proxy: &Proxy, ready: &Ready) -> Response<Full<Bytes>> {
    let mut rsp = answer_get(req, proxy, ready);
    // A HEAD gets the GET's head, its length too, and no body: hyper's HTTP/1 code leaves
    // the body out itself, its HTTP/2 code sends it, which h2c clients take for a protocol
    // error (RFC 9113 §8.1.1) and never see the status.
    if req.method() == Method::HEAD {
        let length = http_body::Body::size_hint(rsp.body()).exact().unwrap_or(0);
        rsp.headers_mut()
            .insert(header::CONTENT_LENGTH, HeaderValue::from(length));
        *rsp.body_mut() = Full::default();
    }
    rsp
}

fn answer_get(req: &Request<Incoming>, proxy: &Proxy, ready: &Ready) -> Response<Full<Bytes>> {
    if !matches!(*req.method(), Method::GET | Method::HEAD) {
        // The body names what `Allow` does: a HEAD is answered too.
        let mut rsp = text(StatusCode::METHOD_NOT_ALLOWED, "GET or HEAD only\n");
        // RFC 9110 §15.5.6: a 405 names the methods that are allowed.
        rsp.headers_mut()
            .insert(header::ALLOW, HeaderValue::from_static("GET, HEAD"));
        return rsp;
    }
    match req.uri().path() {
        "/healthz" => text(StatusCode::OK, "ok\n"),
        "/readyz" if ready.load(Ordering::Acquire) => text(StatusCode::OK, "ready\n"),
        "/readyz" => text(StatusCode::SERVICE_UNAVAILABLE, "not ready\n"),
        "/metrics" => {
            let mut rsp = text(StatusCode::OK, "");
            *rsp.body_mut() = Full::new(Bytes::from(proxy.render_metrics()));
            rsp.headers_mut().insert(
                CONTENT_TYPE,
                HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
            );
            rsp
        }
        _ => text(StatusCode::NOT_FOUND, "/healthz, /readyz or /metrics\n"),
    }
}

fn text(status: StatusCode, body: &'static str) -> Response<Full<Bytes>> {
    let mut rsp = Response::new(Full::new(Bytes::from_static(body.as_bytes())));
    *rsp.status_mut() = status;
    rsp.headers_mut().insert(
        CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    rsp
}
