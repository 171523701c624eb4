//! The admin listener, apart from the proxy's: `/healthz` (the process answers), `/readyz`
//! (the config is loaded and the proxy listener bound, and no shutdown has begun) and
//! `/metrics` (Prometheus text format).

use std::convert::Infallible;
use std::future::Future;
use std::io;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use bytes::Bytes;
use http::header::CONTENT_TYPE;
use http::{HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use tokio::net::TcpListener;

use crate::proxy::Proxy;

/// Whether the proxy should get traffic: set once its listener is bound, cleared when a
/// shutdown begins (so that a load balancer stops sending before connections close).
pub type Ready = Arc<AtomicBool>;

/// Serves the admin endpoints on `listener` until `shutdown` completes.
pub async fn serve(
    listener: TcpListener,
    proxy: Arc<Proxy>,
    ready: Ready,
    shutdown: impl Future<Output = ()>,
) -> io::Result<()> {
    let builder = auto::Builder::new(TokioExecutor::new());
    tokio::pin!(shutdown);
    loop {
        let (stream, _) = tokio::select! {
            conn = crate::server::accept(&listener, "admin accept failed") => conn,
            () = &mut shutdown => return Ok(()),
        };
        let (proxy, ready) = (proxy.clone(), ready.clone());
        let service = service_fn(move |req: Request<Incoming>| {
            let rsp = answer(&req, &proxy, &ready);
            async move { Ok::<_, Infallible>(rsp) }
        });
        let builder = builder.clone();
        tokio::spawn(async move {
            let _ = builder
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

fn answer(req: &Request<Incoming>, proxy: &Proxy, ready: &Ready) -> Response<Full<Bytes>> {
    if !matches!(*req.method(), Method::GET | Method::HEAD) {
        return text(StatusCode::METHOD_NOT_ALLOWED, "GET only\n");
    }
    match req.uri().path() {
        "/healthz" => text(StatusCode::OK, "ok\n"),
        "/readyz" if ready.load(Ordering::Acquire) => text(StatusCode::OK, "ready\n"),
        "/readyz" => text(StatusCode::SERVICE_UNAVAILABLE, "not ready\n"),
        "/metrics" => {
            let mut rsp = text(StatusCode::OK, "");
            *rsp.body_mut() = Full::new(Bytes::from(proxy.metrics.render(
                &proxy.tags,
                &proxy.memo,
                &proxy.budget,
            )));
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
