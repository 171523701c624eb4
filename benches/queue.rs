//! Turns under `upstream_max_connections`: how evenly clients that queue for a capped
//! backend are served. 20 clients loop over GETs through the upstream pool (`ifmatch::pool`,
//! in process) to a backend on 127.0.0.1 that answers after 5 ms, with 2 connections
//! allowed and a 2 s connect timeout (the queue's bound); then 6 clients, one connection
//! allowed, 300 KiB answers at once: more than a connection reads ahead, so that the connection is
//! still busy with its body when handed back, and comes free later. Prints requests per client (min and max), the 503s
//! (`Saturated`), and the mean and longest time a request took.
//!
//!     cargo bench --bench queue -- --seconds 10
//!
//! With turns in the order requests came, every client gets its share and the longest
//! request takes about the mean; without, some wait out the connect timeout.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::Request;
use http_body_util::{BodyExt, Either, Full};
use hyper::service::service_fn;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioIo;
use ifmatch::config::{Upstream, DEFAULT_MAX_HEADER_FIELDS, DEFAULT_UPSTREAM_READ_BUFFER};
use ifmatch::pool::{ConnectionCap, Pool, ReadLimits, SendError};

fn main() {
    let args: Vec<String> = std::env::args().collect();
    // `cargo bench` passes --bench; only --seconds matters here.
    let seconds: u64 = args
        .iter()
        .position(|a| a == "--seconds")
        .and_then(|i| args.get(i + 1)?.parse().ok())
        .unwrap_or(10);
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
        .block_on(async {
            let ms = Duration::from_millis;
            run(Duration::from_secs(seconds), 20, 2, 2, ms(5)).await;
            run(Duration::from_secs(seconds), 6, 1, 300 << 10, ms(0)).await;
        });
}

/// A backend that answers every request with `body` bytes after `service`.
async fn backend(body: usize, service: Duration) -> String {
    let body = Bytes::from(vec![b'x'; body]);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let origin = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let body = body.clone();
            let service = service_fn(move |_req| {
                let body = body.clone();
                async move {
                    tokio::time::sleep(service).await;
                    Ok::<_, Infallible>(hyper::Response::new(Full::new(body)))
                }
            });
            tokio::spawn(async move {
                let conn = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service);
                let _ = conn.await;
            });
        }
    });
    origin
}

async fn run(duration: Duration, n: usize, cap: usize, body: usize, service: Duration) {
    let origin = backend(body, service).await;
    let uri: http::Uri = origin.parse().unwrap();
    let upstream = Arc::new(Upstream::new(
        uri.scheme().unwrap().clone(),
        uri.authority().unwrap().clone(),
    ));
    let limits = ReadLimits {
        read_buffer: DEFAULT_UPSTREAM_READ_BUFFER as usize,
        max_header_fields: DEFAULT_MAX_HEADER_FIELDS,
    };
    let pool = Pool::new(
        HttpConnector::new(),
        Duration::from_secs(60),
        256,
        Some(ConnectionCap::new(cap)),
        limits,
        Duration::from_secs(2),
    );
    let end = Instant::now() + duration;
    let mut clients = tokio::task::JoinSet::new();
    for _ in 0..n {
        let (pool, upstream) = (pool.clone(), upstream.clone());
        let host = uri.authority().unwrap().to_string();
        clients.spawn(async move {
            let (mut done, mut refused, mut total, mut longest) =
                (0u64, 0u64, Duration::ZERO, Duration::ZERO);
            while Instant::now() < end {
                let req = Request::builder()
                    .uri("/")
                    .header(http::header::HOST, &host)
                    .body(Either::Right(Full::<Bytes>::default()))
                    .unwrap();
                let t = Instant::now();
                match pool
                    .send(&upstream, Box::new(req), Duration::from_secs(10))
                    .await
                {
                    Ok(rsp) => {
                        rsp.into_body().collect().await.unwrap();
                        done += 1;
                    }
                    Err(SendError::Saturated { .. }) => refused += 1,
                    Err(e) => panic!("{e:?}"),
                }
                total += t.elapsed();
                longest = longest.max(t.elapsed());
            }
            (done, refused, total, longest)
        });
    }
    let mut rows = Vec::new();
    while let Some(row) = clients.join_next().await {
        rows.push(row.unwrap());
    }
    let done: Vec<u64> = rows.iter().map(|r| r.0).collect();
    let refused: u64 = rows.iter().map(|r| r.1).sum();
    let requests = done.iter().sum::<u64>() + refused;
    let mean = rows.iter().map(|r| r.2).sum::<Duration>() / u32::try_from(requests.max(1)).unwrap();
    let longest = rows.iter().map(|r| r.3).max().unwrap();
    println!(
        "{n} clients, cap {cap}, {body} B answers after {service:?}, {duration:?}: {} answered, per client {}–{}; {refused} refused (503); mean {:.1} ms, longest {:.1} ms",
        done.iter().sum::<u64>(),
        done.iter().min().unwrap(),
        done.iter().max().unwrap(),
        mean.as_secs_f64() * 1e3,
        longest.as_secs_f64() * 1e3,
    );
}
