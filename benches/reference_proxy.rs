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
//! cargo bench --bench reference_proxy -- --listen 127.0.0.1:19089 --upstream 127.0.0.1:19081 --raw-upstream
//! ```
//!
//! `--raw-upstream` replaces hyper's client with the least an HTTP/1.1 client can be: the
//! request head written and the answer read on the request's own task, over kept-alive
//! sockets, parsed by httparse, `Content-Length` bodies only (what the bench's backend
//! sends). Not a client anyone should ship (no chunked bodies, no timeouts, no error
//! handling to speak of): it measures how much of a request hyper's client and its
//! connection task cost, to say whether a leaner one could close the gap to nginx.
//!
//! `--inline-conn` keeps hyper's client but drives each connection from the request that
//! uses it, instead of from a task of its own: the request's future polls the connection
//! future beside its response and body, and the pair goes back to the idle list when the
//! body has ended (not polled while idle). What hyper's framing costs without the hop
//! between tasks.
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
    /// Speak to the upstream without hyper's client (see the module's doc).
    #[arg(long)]
    raw_upstream: bool,
    /// hyper's client, its connections driven by the requests (see the module's doc).
    #[arg(long)]
    inline_conn: bool,
    /// ifmatch's own runtime with one worker (`ifmatch::runtime::build`, as `workers = 1`:
    /// multi-thread, its LIFO slot off); without it, a current-thread runtime.
    #[arg(long)]
    multi_thread: bool,
    /// `cargo bench` passes this to every bench target.
    #[arg(long, hide = true)]
    bench: bool,
}

/// Idle upstream connections; each one's connection task is spawned, as hyper documents.
struct Upstream {
    addr: SocketAddr,
    host: HeaderValue,
    idle: Mutex<Vec<SendRequest<Empty<Bytes>>>>,
    raw_idle: Mutex<Vec<Raw>>,
    raw: bool,
    inline_idle: Mutex<Vec<Inline>>,
    inline: bool,
    hash: bool,
    /// Keyed once: each request starts from a copy, as ifmatch's tag hasher does.
    keyed: Hmac<Sha256>,
}

impl Upstream {
    /// The `ETag` of the body `mac` has hashed, unless hashing is off.
    fn set_tag(
        &self,
        headers: &mut http::HeaderMap,
        mac: Hmac<Sha256>,
    ) -> Result<(), Box<dyn std::error::Error>> {
        if self.hash {
            let tag = URL_SAFE_NO_PAD.encode(mac.finalize().into_bytes());
            headers.insert(ETAG, format!("\"{tag}\"").parse()?);
        }
        Ok(())
    }

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
        self.set_tag(&mut parts.headers, mac)?;
        Ok(Response::from_parts(parts, Chunks(chunks)))
    }
}

/// A hyper client connection whose future nobody else polls.
type Inline = (
    SendRequest<Empty<Bytes>>,
    hyper::client::conn::http1::Connection<TokioIo<TcpStream>, Empty<Bytes>>,
);

impl Upstream {
    /// hyper's exchange, with the connection polled here rather than by a spawned task.
    async fn forward_inline(
        &self,
        req: Request<Incoming>,
    ) -> Result<Response<Chunks>, Box<dyn std::error::Error>> {
        use std::future::{poll_fn, Future as _};

        let (mut parts, _) = req.into_parts();
        parts.headers.insert(HOST, self.host.clone());
        let popped = self.inline_idle.lock().unwrap().pop();
        let (mut sender, mut conn) = match popped {
            Some(pair) => pair,
            None => {
                let io = TcpStream::connect(self.addr).await?;
                io.set_nodelay(true)?;
                hyper::client::conn::http1::handshake(TokioIo::new(io)).await?
            }
        };
        let mut sent =
            std::pin::pin!(sender.send_request(Request::from_parts(parts, Empty::new())));
        let rsp = poll_fn(|cx| {
            if let Poll::Ready(r) = sent.as_mut().poll(cx) {
                return Poll::Ready(r.map_err(Box::<dyn std::error::Error>::from));
            }
            match Pin::new(&mut conn).poll(cx) {
                Poll::Ready(_) => Poll::Ready(Err("the upstream connection ended".into())),
                Poll::Pending => Poll::Pending,
            }
        })
        .await?;
        let (mut parts, mut body) = rsp.into_parts();
        let mut mac = self.keyed.clone();
        let mut chunks = VecDeque::new();
        loop {
            let frame = poll_fn(|cx| {
                if let Poll::Ready(f) = Pin::new(&mut body).poll_frame(cx) {
                    return Poll::Ready(f);
                }
                match Pin::new(&mut conn).poll(cx) {
                    Poll::Ready(_) => Poll::Ready(None),
                    Poll::Pending => Poll::Pending,
                }
            })
            .await;
            let Some(frame) = frame else { break };
            if let Ok(chunk) = frame?.into_data() {
                if self.hash {
                    mac.update(&chunk);
                }
                chunks.push_back(chunk);
            }
        }
        self.inline_idle.lock().unwrap().push((sender, conn));
        self.set_tag(&mut parts.headers, mac)?;
        Ok(Response::from_parts(parts, Chunks(chunks)))
    }
}

/// A kept-alive upstream socket and what was read from it past the last answer.
struct Raw {
    io: TcpStream,
    buf: bytes::BytesMut,
}

impl Upstream {
    /// The exchange on the request's own task: no connection task, no channel.
    async fn forward_raw(
        &self,
        req: Request<Incoming>,
    ) -> Result<Response<Chunks>, Box<dyn std::error::Error>> {
        use std::io::Write as _;
        use tokio::io::{AsyncReadExt, AsyncWriteExt};

        let (parts, _) = req.into_parts();
        let mut head = Vec::with_capacity(512);
        let target = parts.uri.path_and_query().map_or("/", |p| p.as_str());
        write!(
            head,
            "{} {target} HTTP/1.1\r\nhost: {}\r\n",
            parts.method, self.addr
        )?;
        for (name, value) in &parts.headers {
            if name != HOST && name != http::header::CONNECTION {
                head.extend_from_slice(name.as_str().as_bytes());
                head.extend_from_slice(b": ");
                head.extend_from_slice(value.as_bytes());
                head.extend_from_slice(b"\r\n");
            }
        }
        head.extend_from_slice(b"\r\n");
        let popped = self.raw_idle.lock().unwrap().pop();
        let mut conn = match popped {
            Some(conn) => conn,
            None => {
                let io = TcpStream::connect(self.addr).await?;
                io.set_nodelay(true)?;
                Raw {
                    io,
                    buf: bytes::BytesMut::with_capacity(16 * 1024),
                }
            }
        };
        conn.io.write_all(&head).await?;
        let (mut rsp, head_len, length) = loop {
            let mut headers = [httparse::EMPTY_HEADER; 64];
            let mut parsed = httparse::Response::new(&mut headers);
            if let httparse::Status::Complete(n) = parsed.parse(&conn.buf)? {
                let mut rsp = Response::new(());
                *rsp.status_mut() = StatusCode::from_u16(parsed.code.unwrap_or(502))?;
                let mut length = 0;
                for h in parsed.headers.iter() {
                    let name = http::HeaderName::from_bytes(h.name.as_bytes())?;
                    if name == http::header::CONTENT_LENGTH {
                        length = std::str::from_utf8(h.value)?.trim().parse()?;
                    }
                    rsp.headers_mut()
                        .append(name, HeaderValue::from_bytes(h.value)?);
                }
                break (rsp, n, length);
            }
            if conn.io.read_buf(&mut conn.buf).await? == 0 {
                return Err("the upstream closed".into());
            }
        };
        let _ = conn.buf.split_to(head_len);
        while conn.buf.len() < length {
            conn.buf.reserve(length - conn.buf.len());
            if conn.io.read_buf(&mut conn.buf).await? == 0 {
                return Err("the upstream closed mid-body".into());
            }
        }
        let body = conn.buf.split_to(length).freeze();
        self.raw_idle.lock().unwrap().push(conn);
        let mut mac = self.keyed.clone();
        if self.hash {
            mac.update(&body);
        }
        self.set_tag(rsp.headers_mut(), mac)?;
        let (parts, ()) = rsp.into_parts();
        Ok(Response::from_parts(parts, Chunks(VecDeque::from([body]))))
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
    let forwarded = match (up.raw, up.inline) {
        (true, _) => up.forward_raw(req).await,
        (_, true) => up.forward_inline(req).await,
        _ => up.forward(req).await,
    };
    Ok(forwarded.unwrap_or_else(|e| {
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
             `cargo bench --bench reference_proxy -- --listen ADDR [--upstream ADDR] [--no-hash] [--raw-upstream | --inline-conn] [--multi-thread]`"
        );
        return;
    };
    let up = Arc::new(Upstream {
        addr: args.upstream,
        host: HeaderValue::from_str(&args.upstream.to_string())
            .expect("an address is a valid Host"),
        idle: Mutex::default(),
        raw_idle: Mutex::default(),
        raw: args.raw_upstream,
        inline_idle: Mutex::default(),
        inline: args.inline_conn,
        hash: !args.no_hash,
        keyed: Hmac::new_from_slice(b"reference-proxy-key-0123456789ab")
            .expect("HMAC takes any key length"),
    });
    // One thread running requests, like ifmatch's `workers = 1` and nginx's one worker.
    let rt = if args.multi_thread {
        ifmatch::runtime::build(Some(1))
    } else {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
    }
    .expect("a runtime");
    let server = async move {
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
    };
    // On the worker, as ifmatch runs its server: `block_on` polls on the main thread.
    rt.block_on(async move {
        let _ = tokio::spawn(server).await;
    });
}
