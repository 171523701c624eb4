//! A reference for the load runs: the least a hyper-based tagging proxy can do. It forwards
//! each GET over kept-alive HTTP/1.1 connections, reads the whole body, adds an HMAC-SHA256
//! `ETag` (the same hashing as ifmatch's) and answers; nothing else (no routing, no
//! preconditions, no framing checks, no tag cache, no metrics, no logs). Run beside ifmatch
//! and nginx, it splits the gap to nginx into what hyper and hashing cost and what ifmatch's
//! own work costs (BENCHMARKS.md, *A floor*).
//!
//! ```sh
//! cargo bench --bench reference_proxy -- --listen 127.0.0.1:19087 --upstream 127.0.0.1:19081
//! cargo bench --bench reference_proxy -- --listen 127.0.0.1:19088 --upstream 127.0.0.1:19081 --no-hash
//! ```
//!
//! Without `--listen` (as under a plain `cargo bench`) it says how to run it and exits.

use std::collections::VecDeque;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use bytes::Bytes;
use clap::Parser;
use hmac::{Hmac, Mac};
use http::header::{HeaderValue, ETAG, HOST};
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Empty};
use hyper::body::{Body, Frame, Incoming, SizeHint};
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;
use sha2::Sha256;
use tokio::net::{TcpListener, TcpStream};

#[derive(Parser)]
struct Args {
    /// Where to listen; without it the bench only prints how to run it.
    #[arg(long)]
    listen: Option<SocketAddr>,
    /// The backend, host:port (plain HTTP/1.1).
    #[arg(long, default_value = "127.0.0.1:19081")]
    upstream: SocketAddr,
    /// Pass bodies on untagged: what the same proxy costs without hashing.
    #[arg(long)]
    no_hash: bool,
    /// `cargo bench` passes this to every bench target.
    #[arg(long, hide = true)]
    bench: bool,
}

/// Idle upstream connections; each one's connection task is spawned, as hyper documents.
struct Upstream {
    addr: SocketAddr,
    host: HeaderValue,
    idle: Mutex<Vec<SendRequest<Empty<Bytes>>>>,
    hash: bool,
    /// Keyed once: each request starts from a copy, as ifmatch's tag hasher does.
    keyed: Hmac<Sha256>,
}

impl Upstream {
    async fn sender(&self) -> Result<SendRequest<Empty<Bytes>>, Box<dyn std::error::Error>> {
        loop {
            let Some(sender) = self.idle.lock().unwrap().pop() else {
                break;
            };
            if sender.is_ready() {
                return Ok(sender);
            }
        }
        let io = TcpStream::connect(self.addr).await?;
        io.set_nodelay(true)?;
        let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(io)).await?;
        tokio::spawn(conn);
        Ok(sender)
    }

    async fn forward(
        &self,
        req: Request<Incoming>,
    ) -> Result<Response<Chunks>, Box<dyn std::error::Error>> {
        let (mut parts, _) = req.into_parts();
        parts.headers.insert(HOST, self.host.clone());
        let mut sender = self.sender().await?;
        let rsp = sender
            .send_request(Request::from_parts(parts, Empty::new()))
            .await?;
        self.idle.lock().unwrap().push(sender);
        let (mut parts, mut body) = rsp.into_parts();
        // Chunks are hashed as they come and sent on as they are, never joined (as ifmatch).
        let mut mac = self.keyed.clone();
        let mut chunks = VecDeque::new();
        while let Some(frame) = body.frame().await {
            if let Ok(chunk) = frame?.into_data() {
                if self.hash {
                    mac.update(&chunk);
                }
                chunks.push_back(chunk);
            }
        }
        if self.hash {
            let tag = URL_SAFE_NO_PAD.encode(mac.finalize().into_bytes());
            parts.headers.insert(ETAG, format!("\"{tag}\"").parse()?);
        }
        Ok(Response::from_parts(parts, Chunks(chunks)))
    }
}

/// A body read in full, sent on chunk by chunk.
struct Chunks(VecDeque<Bytes>);

impl Body for Chunks {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        _: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        Poll::Ready(self.0.pop_front().map(|c| Ok(Frame::data(c))))
    }

    fn is_end_stream(&self) -> bool {
        self.0.is_empty()
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::with_exact(self.0.iter().map(|c| c.len() as u64).sum())
    }
}

async fn handle(req: Request<Incoming>, up: Arc<Upstream>) -> Result<Response<Chunks>, Infallible> {
    Ok(up.forward(req).await.unwrap_or_else(|e| {
        let mut rsp = Response::new(Chunks(VecDeque::from([Bytes::from(e.to_string())])));
        *rsp.status_mut() = StatusCode::BAD_GATEWAY;
        rsp
    }))
}

fn main() {
    let args = Args::parse();
    let Some(listen) = args.listen else {
        println!(
            "reference_proxy: a load-run reference, not a measurement; run it with \
             `cargo bench --bench reference_proxy -- --listen ADDR [--upstream ADDR] [--no-hash]`"
        );
        return;
    };
    let up = Arc::new(Upstream {
        addr: args.upstream,
        host: HeaderValue::from_str(&args.upstream.to_string())
            .expect("an address is a valid Host"),
        idle: Mutex::default(),
        hash: !args.no_hash,
        keyed: Hmac::new_from_slice(b"reference-proxy-key-0123456789ab")
            .expect("HMAC takes any key length"),
    });
    // One thread, like ifmatch's `workers = 1` and nginx's one worker.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a runtime");
    rt.block_on(async move {
        let listener = match TcpListener::bind(listen).await {
            Ok(l) => l,
            Err(e) => {
                eprintln!("reference_proxy: cannot listen on {listen}: {e}");
                std::process::exit(1);
            }
        };
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            let _ = stream.set_nodelay(true);
            let up = up.clone();
            tokio::spawn(async move {
                let service = hyper::service::service_fn(move |req| handle(req, up.clone()));
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    });
}
