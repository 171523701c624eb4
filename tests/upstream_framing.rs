//! How the proxy reads a backend's answer to a body-less GET or HEAD: framing, 1xx, the
//! connection's fate. Raw backends on 127.0.0.1:0 write exact bytes; each test says what
//! the client gets (status, body, `ETag` or none), whether the next request on the same
//! client connection still works, and whether the backend saw a new TCP connection for it
//! (the upstream connection reused or not). They pin today's behaviour (hyper's client in
//! `src/pool.rs`) so that any other upstream client can be held to it.
//!
//! Most run each answer on two `cached` routes: `/` tags what it can, `/stream/` (a
//! `max_tag_body` of 4 bytes) streams every body through untagged. (There is no untagged
//! route mode: the streaming path is what a `pass` route would take.) Every 502 below is a
//! problem+json and leaves the client's connection usable.
//!
//! What each test pins:
//! - `chunk_extensions_and_either_case_of_hex_frame_a_whole_body_and_the_connection_is_reused`:
//!   `5;name=value`, `A`/`a`/`1F`/`1f` sizes: the whole body, tagged (and streamed whole on
//!   an untagged route); the upstream connection reused.
//! - `a_chunked_body_ending_in_trailers_is_whole_and_the_connection_is_reused`: tagged and
//!   streamed.
//! - `informational_answers_before_the_200_are_skipped`: `100 Continue` and `103 Early Hints`
//!   before the 200: the client gets the 200 and its tag; the connection reused.
//! - `a_body_delimited_by_the_close_is_whole_and_the_next_request_gets_a_new_connection`.
//! - `connection_close_on_a_length_answer_is_not_reused`: the backend keeps the socket open,
//!   so only the proxy's reading of `Connection: close` makes the new connection.
//! - `an_http_1_0_answer_is_never_reused_with_or_without_keep_alive`: without keep-alive as
//!   HTTP/1.0 says; with `Connection: keep-alive` not reused either (deliberate in
//!   `pool.rs::checkin_after`: hyper would send the next request as HTTP/1.0).
//! - `a_head_is_sent_up_as_a_get_and_answered_with_the_length_and_no_body`: the client's
//!   HEAD gets the length and the tag, no body; the next GET on its connection works and the
//!   upstream connection is reused.
//! - `bodiless_304_and_204_keep_the_connection`: passed to a plain GET as they came.
//! - `two_different_lengths_are_a_502`: as two fields and as a list.
//! - `a_length_that_is_not_a_number_is_a_502`: `12abc`, `-1`, `+5`, `1 2` and an empty one.
//! - `a_head_over_upstream_read_buffer_or_over_max_header_fields_is_a_502`: 100 fields pass,
//!   101 do not.
//! - `stray_bytes_after_a_length_body_never_reach_the_next_request`: bytes that are not a
//!   response, in the same write as the body (a planted response: upstream_faults.rs).
//! - `a_backend_closing_an_idle_kept_alive_connection_costs_the_next_get_nothing`.
//! - `a_body_over_max_tag_body_streams_whole_untagged_and_one_under_it_is_tagged`: 4 MiB
//!   written in 64 KiB pieces against a 1 MiB `max_tag_body`.
//! - `a_status_line_without_a_reason_or_with_obs_text_in_it_is_a_200`: `HTTP/1.1 200` with
//!   no reason, and a reason past ASCII.
//! - `many_chunks_with_short_extensions_under_hypers_limit_frame_a_whole_body`: 9000 chunks
//!   each with `;x`, under hyper's 16 KiB of extension bytes.
//! - `a_length_with_many_leading_zeros_is_its_number`: 21 digits, the number 5.
//! - `trailers_are_bounded_by_max_header_fields_as_heads_are`: 150 trailer fields under a
//!   `max_header_fields` of 200.
//!
//! Left to tests/upstream_faults.rs: a body cut short after its head
//! (`a_body_cut_short_is_a_502_and_never_tagged`, `a_streamed_body_that_fails_aborts_the_response_cleanly`),
//! `Transfer-Encoding: gzip, chunked` (`a_transfer_coding_besides_chunked_is_a_502`), a
//! whole response planted after the body (`a_response_no_request_asked_for_never_answers_the_next_request`).

mod common;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use common::proxy::route;
use common::{Proxy, Reply};
use http_body_util::{BodyExt, Empty};
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// What the backend does with its connection once an answer is written.
#[derive(Clone, Copy, Debug)]
enum Then {
    /// Waits for the next request.
    Keep,
    /// Closes (FIN).
    Close,
    /// Waits for the next request, and closes if none comes within this long.
    CloseIdleAfter(Duration),
}

/// A raw backend: each request head (no body: GET and HEAD) gets the bytes `answer` makes of
/// its request line, written in pieces of at most 64 KiB. It counts the connections it
/// accepted and records each request line with the number of its connection (from 1).
struct RawBackend {
    origin: String,
    accepted: Arc<AtomicUsize>,
    seen: Arc<Mutex<Vec<(usize, String)>>>,
}

// === impl RawBackend ===

impl RawBackend {
    async fn start(answer: fn(&str) -> (Vec<u8>, Then)) -> Self {
        let accepted = Arc::new(AtomicUsize::new(0));
        let seen = Arc::new(Mutex::new(Vec::new()));
        let (count, log) = (accepted.clone(), seen.clone());
        let origin = common::backend::raw_backend(move |s| {
            let conn = count.fetch_add(1, Ordering::SeqCst) + 1;
            serve(s, conn, answer, log.clone())
        })
        .await;
        Self {
            origin,
            accepted,
            seen,
        }
    }

    fn connections(&self) -> usize {
        self.accepted.load(Ordering::SeqCst)
    }

    fn requests(&self) -> Vec<(usize, String)> {
        self.seen.lock().unwrap().clone()
    }
}

async fn serve(
    mut s: tokio::net::TcpStream,
    conn: usize,
    answer: fn(&str) -> (Vec<u8>, Then),
    log: Arc<Mutex<Vec<(usize, String)>>>,
) {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    let mut idle = None;
    loop {
        let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") else {
            let read = s.read(&mut chunk);
            let n = match idle {
                Some(after) => match tokio::time::timeout(after, read).await {
                    Ok(n) => n,
                    Err(_) => return, // idle too long: closed
                },
                None => read.await,
            };
            match n {
                Ok(0) | Err(_) => return,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
            continue;
        };
        let head = String::from_utf8_lossy(&buf[..end]).into_owned();
        buf.drain(..end + 4);
        let line = head.lines().next().unwrap_or("").to_owned();
        log.lock().unwrap().push((conn, line.clone()));
        let (bytes, then) = answer(&line);
        for piece in bytes.chunks(64 << 10) {
            if s.write_all(piece).await.is_err() {
                return;
            }
        }
        match then {
            Then::Keep => idle = None,
            Then::Close => {
                let _ = s.shutdown().await;
                return;
            }
            Then::CloseIdleAfter(after) => idle = Some(after),
        }
    }
}

/// The path of a request line `GET /path HTTP/1.1`.
fn path(line: &str) -> &str {
    line.split(' ').nth(1).unwrap_or("")
}

/// A plain answer: 200 with the body `ok`, framed by its length, connection kept.
fn ok() -> (Vec<u8>, Then) {
    (
        b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok".to_vec(),
        Then::Keep,
    )
}

/// One client connection to the proxy, and only one: a request fails if it has closed.
struct ClientConn {
    addr: SocketAddr,
    send: SendRequest<Empty<Bytes>>,
}

// === impl ClientConn ===

impl ClientConn {
    async fn open(addr: SocketAddr) -> Self {
        let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
        // Room for more fields than the proxy takes from a backend, and adds to them.
        let (send, conn) = hyper::client::conn::http1::Builder::new()
            .max_headers(200)
            .handshake(TokioIo::new(tcp))
            .await
            .unwrap();
        tokio::spawn(conn);
        Self { addr, send }
    }

    /// `method path` on this connection, read whole (5 s at most).
    async fn try_send(&mut self, method: &str, path: &str) -> Result<Reply, String> {
        let exchange = async {
            self.send
                .ready()
                .await
                .map_err(|e| format!("connection unusable: {e}"))?;
            let req = http::Request::builder()
                .method(method)
                .uri(path)
                .header("host", self.addr.to_string())
                .body(Empty::<Bytes>::new())
                .unwrap();
            let rsp = self
                .send
                .send_request(req)
                .await
                .map_err(|e| format!("{e:?}"))?;
            let (parts, body) = rsp.into_parts();
            let body = body
                .collect()
                .await
                .map_err(|e| format!("status {}, body cut off: {e:?}", parts.status))?
                .to_bytes();
            Ok(Reply {
                status: parts.status.as_u16(),
                version: parts.version,
                headers: parts.headers,
                body,
            })
        };
        tokio::time::timeout(Duration::from_secs(5), exchange)
            .await
            .map_err(|_| format!("{method} {path}: no answer in 5 s"))?
    }

    async fn send(&mut self, method: &str, path: &str) -> Reply {
        self.try_send(method, path)
            .await
            .unwrap_or_else(|e| panic!("{method} {path}: {e}"))
    }

    async fn get(&mut self, path: &str) -> Reply {
        self.send("GET", path).await
    }
}

/// Two routes to the backend, both `cached`: `/stream/` tags nothing (`max_tag_body` of 4
/// bytes, so every body streams through as it comes), `/` tags what it can.
fn routes(extra: &str) -> String {
    let timeout = "validation = \"cached\"\nupstream_timeout = \"2s\"";
    format!(
        "{}{}",
        route(
            "/stream/",
            &format!("{timeout}\nmax_tag_body = \"4B\"\n{extra}")
        ),
        route("/", &format!("{timeout}\n{extra}")),
    )
}

async fn start(answer: fn(&str) -> (Vec<u8>, Then)) -> (RawBackend, Proxy) {
    let backend = RawBackend::start(answer).await;
    let proxy = Proxy::start(&routes(""), &backend.origin).await;
    (backend, proxy)
}

/// GETs `path` on a tagging route, then `/stream{path}` on a streaming one, then `/next`
/// (answered `ok`), all on one client connection; each 200 with `body` (tagged on the first
/// route, untagged on the second). Returns how many connections the backend accepted.
async fn get_both_ways(backend: &RawBackend, proxy: &Proxy, path: &str, body: &[u8]) -> usize {
    let mut c = ClientConn::open(proxy.addr).await;
    let r = c.get(path).await;
    assert_eq!((r.status, r.body.as_ref()), (200, body), "{path}: {r:?}");
    assert_eq!(r.etag(), proxy.tag_of(body), "{path}: tagged");
    let streamed = format!("/stream{path}");
    let r = c.get(&streamed).await;
    assert_eq!(
        (r.status, r.body.as_ref()),
        (200, body),
        "{streamed}: {r:?}"
    );
    assert_eq!(r.header("etag"), None, "{streamed}: streamed untagged");
    let r = c.get("/next").await;
    assert_eq!((r.status, r.text().as_str()), (200, "ok"), "/next");
    backend.connections()
}

/// Chunk sizes in either case of hex, and chunk extensions (RFC 9112 §7.1.1), which a
/// recipient must ignore: they are no part of the body.
#[tokio::test]
async fn chunk_extensions_and_either_case_of_hex_frame_a_whole_body_and_the_connection_is_reused() {
    let (backend, proxy) = start(|line| {
        if path(line).ends_with("/chunks") {
            let mut out = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n".to_vec();
            out.extend_from_slice(b"5;name=value\r\nhello\r\n");
            out.extend_from_slice(b"A;quoted=\"a;b\";bare\r\n0123456789\r\n");
            out.extend_from_slice(b"a\r\nabcdefghij\r\n");
            out.extend_from_slice(b"1F\r\n");
            out.extend_from_slice(&[b'U'; 0x1f]);
            out.extend_from_slice(b"\r\n1f ; x = y\r\n");
            out.extend_from_slice(&[b'l'; 0x1f]);
            out.extend_from_slice(b"\r\n0;last=1\r\n\r\n");
            (out, Then::Keep)
        } else {
            ok()
        }
    })
    .await;
    let mut body = b"hello0123456789abcdefghij".to_vec();
    body.extend_from_slice(&[b'U'; 0x1f]);
    body.extend_from_slice(&[b'l'; 0x1f]);
    let connections = get_both_ways(&backend, &proxy, "/chunks", &body).await;
    assert_eq!(connections, 1, "one upstream connection for all three GETs");
}

#[tokio::test]
async fn a_chunked_body_ending_in_trailers_is_whole_and_the_connection_is_reused() {
    let (backend, proxy) = start(|line| {
        if path(line).ends_with("/trailers") {
            let out =
                b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nTrailer: x-sum, x-more\r\n\r\n\
                        5\r\nhello\r\n6\r\n world\r\n0\r\nx-sum: 42\r\nx-more: a\r\n\r\n";
            (out.to_vec(), Then::Keep)
        } else {
            ok()
        }
    })
    .await;
    let connections = get_both_ways(&backend, &proxy, "/trailers", b"hello world").await;
    assert_eq!(connections, 1, "one upstream connection for all three GETs");
}

/// hyper's client reads past 1xx answers (RFC 9110 §15.2) to the final one; neither
/// reaches the client as its answer, nor is taken for the 200's body.
#[tokio::test]
async fn informational_answers_before_the_200_are_skipped() {
    let (backend, proxy) = start(|line| {
        if path(line).ends_with("/early") {
            let out = b"HTTP/1.1 100 Continue\r\n\r\n\
                        HTTP/1.1 103 Early Hints\r\nLink: </style.css>; rel=preload\r\n\r\n\
                        HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello";
            (out.to_vec(), Then::Keep)
        } else {
            ok()
        }
    })
    .await;
    let connections = get_both_ways(&backend, &proxy, "/early", b"hello").await;
    assert_eq!(connections, 1, "one upstream connection for all three GETs");
}

/// No length and no chunks in an HTTP/1.1 answer: the body runs to the close (RFC 9112
/// §6.3, rule 8), whole, and the next request needs a connection of its own.
#[tokio::test]
async fn a_body_delimited_by_the_close_is_whole_and_the_next_request_gets_a_new_connection() {
    let (backend, proxy) = start(|line| {
        if path(line).ends_with("/toclose") {
            (
                b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n\r\nread to the close".to_vec(),
                Then::Close,
            )
        } else {
            ok()
        }
    })
    .await;
    let mut c = ClientConn::open(proxy.addr).await;
    for (n, path, tagged) in [(1, "/toclose", true), (2, "/stream/toclose", false)] {
        let r = c.get(path).await;
        assert_eq!((r.status, r.text().as_str()), (200, "read to the close"));
        assert_eq!(r.header("etag").is_some(), tagged, "{path}: {r:?}");
        assert_eq!(backend.connections(), n, "{path}");
        let r = c.get("/next").await;
        assert_eq!((r.status, r.text().as_str()), (200, "ok"));
        assert_eq!(
            backend.connections(),
            n + 1,
            "after {path}: a new connection"
        );
    }
}

/// The backend says `Connection: close` but keeps its socket open and would answer the next
/// request on it: only the proxy's reading of the field makes it open another.
#[tokio::test]
async fn connection_close_on_a_length_answer_is_not_reused() {
    let (backend, proxy) = start(|line| {
        if path(line).ends_with("/closing") {
            (
                b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 5\r\n\r\nhello".to_vec(),
                Then::Keep,
            )
        } else {
            ok()
        }
    })
    .await;
    let mut c = ClientConn::open(proxy.addr).await;
    for (n, path) in [(1, "/closing"), (2, "/stream/closing")] {
        let r = c.get(path).await;
        assert_eq!((r.status, r.text().as_str()), (200, "hello"), "{path}");
        let r = c.get("/next").await;
        assert_eq!((r.status, r.text().as_str()), (200, "ok"));
        // `/next` went on a new connection, kept: the next round's first GET takes it.
        assert_eq!(
            backend.connections(),
            n + 1,
            "after {path}: a new connection"
        );
    }
    let lines: Vec<_> = backend.requests().into_iter().map(|(c, _)| c).collect();
    assert_eq!(lines, [1, 2, 2, 3], "which connection each request came on");
}

/// HTTP/1.0 without keep-alive closes after the answer (RFC 9112 §9.3); with
/// `Connection: keep-alive` it might be kept, but the proxy does not keep it
/// (`pool.rs::checkin_after`): hyper would send the next request on it as HTTP/1.0, which
/// cannot frame a body of unknown length. Either way the client's connection stays, and the
/// backend, which keeps its socket open here, sees the next request on a new one.
#[tokio::test]
async fn an_http_1_0_answer_is_never_reused_with_or_without_keep_alive() {
    let (backend, proxy) = start(|line| match path(line) {
        p if p.ends_with("/old") => (
            b"HTTP/1.0 200 OK\r\nContent-Length: 5\r\n\r\nhello".to_vec(),
            Then::Keep,
        ),
        p if p.ends_with("/old-kept") => (
            b"HTTP/1.0 200 OK\r\nConnection: keep-alive\r\nContent-Length: 5\r\n\r\nhello".to_vec(),
            Then::Keep,
        ),
        _ => ok(),
    })
    .await;
    let mut c = ClientConn::open(proxy.addr).await;
    let mut expected = 0;
    for path in ["/old", "/old-kept", "/stream/old", "/stream/old-kept"] {
        let r = c.get(path).await;
        assert_eq!((r.status, r.text().as_str()), (200, "hello"), "{path}");
        assert_eq!(r.version, http::Version::HTTP_11, "{path}");
        assert_eq!(
            r.header("etag").is_some(),
            !path.starts_with("/stream"),
            "{path}"
        );
        let r = c.get("/next").await;
        assert_eq!((r.status, r.text().as_str()), (200, "ok"));
        expected += if expected == 0 { 2 } else { 1 };
        assert_eq!(backend.connections(), expected, "after {path}: a new one");
    }
}

/// A HEAD goes up as a GET (so it gets the tag a GET would): the backend sends the body, and
/// the client gets the length and the tag without it. The upstream connection is reused and
/// the client's next GET on its connection is answered.
#[tokio::test]
async fn a_head_is_sent_up_as_a_get_and_answered_with_the_length_and_no_body() {
    let (backend, proxy) = start(|line| {
        if path(line).ends_with("/doc") {
            (
                b"HTTP/1.1 200 OK\r\nContent-Length: 11\r\n\r\nhello world".to_vec(),
                Then::Keep,
            )
        } else {
            ok()
        }
    })
    .await;
    let mut c = ClientConn::open(proxy.addr).await;
    let r = c.send("HEAD", "/doc").await;
    assert_eq!(r.status, 200);
    assert_eq!(r.header("content-length"), Some("11"));
    assert_eq!(r.body.len(), 0);
    assert_eq!(r.etag(), proxy.tag_of("hello world"));
    let r = c.send("HEAD", "/stream/doc").await;
    assert_eq!(r.status, 200);
    assert_eq!(r.header("content-length"), Some("11"));
    assert_eq!(r.body.len(), 0);
    let r = c.get("/doc").await;
    assert_eq!((r.status, r.text().as_str()), (200, "hello world"));
    assert_eq!(backend.connections(), 1, "one upstream connection");
    let methods: Vec<_> = backend
        .requests()
        .into_iter()
        .map(|(_, line)| line.split(' ').next().unwrap().to_owned())
        .collect();
    assert_eq!(methods, ["GET", "GET", "GET"], "HEAD went up as GET");
}

#[tokio::test]
async fn bodiless_304_and_204_keep_the_connection() {
    let (backend, proxy) = start(|line| match path(line) {
        p if p.ends_with("/304") => (
            b"HTTP/1.1 304 Not Modified\r\nETag: \"v1\"\r\n\r\n".to_vec(),
            Then::Keep,
        ),
        p if p.ends_with("/204") => (b"HTTP/1.1 204 No Content\r\n\r\n".to_vec(), Then::Keep),
        _ => ok(),
    })
    .await;
    let mut c = ClientConn::open(proxy.addr).await;
    for path in ["/304", "/204", "/stream/304", "/stream/204"] {
        let r = c.get(path).await;
        let status: u16 = path.rsplit('/').next().unwrap().parse().unwrap();
        assert_eq!(r.status, status, "{path}: {r:?}");
        assert!(r.body.is_empty(), "{path}");
        let r = c.get("/next").await;
        assert_eq!((r.status, r.text().as_str()), (200, "ok"), "after {path}");
    }
    assert_eq!(backend.connections(), 1, "one upstream connection for all");
}

/// Two lengths that disagree leave the body's end in doubt (RFC 9112 §6.3, rule 5): a 502
/// problem, never the 200 with either reading of it. The client's connection stays.
#[tokio::test]
async fn two_different_lengths_are_a_502() {
    let (_backend, proxy) = start(|line| match path(line) {
        p if p.ends_with("/fields") => (
            b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\nhello!".to_vec(),
            Then::Keep,
        ),
        p if p.ends_with("/list") => (
            b"HTTP/1.1 200 OK\r\nContent-Length: 5, 6\r\n\r\nhello!".to_vec(),
            Then::Keep,
        ),
        _ => ok(),
    })
    .await;
    let mut c = ClientConn::open(proxy.addr).await;
    for path in ["/fields", "/list", "/stream/fields", "/stream/list"] {
        c.get(path).await.assert_problem(502);
        let r = c.get("/next").await;
        assert_eq!((r.status, r.text().as_str()), (200, "ok"), "after {path}");
    }
}

/// `Content-Length = 1*DIGIT` (RFC 9110 §8.6): anything else is a 502 problem.
#[tokio::test]
async fn a_length_that_is_not_a_number_is_a_502() {
    let (_backend, proxy) = start(|line| {
        let p = path(line);
        let length = match p.rsplit('/').next().unwrap() {
            "letters" => "12abc",
            "negative" => "-1",
            "plus" => "+5",
            "empty" => "",
            "space" => "1 2",
            _ => return ok(),
        };
        let out = format!("HTTP/1.1 200 OK\r\nContent-Length: {length}\r\n\r\nhello");
        (out.into_bytes(), Then::Keep)
    })
    .await;
    let mut c = ClientConn::open(proxy.addr).await;
    for name in ["letters", "negative", "plus", "empty", "space"] {
        for prefix in ["", "/stream"] {
            let path = format!("{prefix}/{name}");
            let r = c.get(&path).await;
            assert_eq!(r.status, 502, "{path}: {r:?}");
            r.assert_problem(502);
            let r = c.get("/next").await;
            assert_eq!((r.status, r.text().as_str()), (200, "ok"), "after {path}");
        }
    }
}

/// A head of 48 KiB against the smallest `upstream_read_buffer` (16 KiB; hyper checks it
/// between reads, so up to about twice that may pass), and 101 header fields against
/// `max_header_fields` (100, which pass): 502 problems that name both limits.
#[tokio::test]
async fn a_head_over_upstream_read_buffer_or_over_max_header_fields_is_a_502() {
    let backend = RawBackend::start(|line| {
        let fields = |n: usize| -> String { (0..n).map(|i| format!("x-f{i}: {i}\r\n")).collect() };
        let extra = match path(line).rsplit('/').next().unwrap() {
            "big" => format!("x-big: {}\r\n", "v".repeat(48 << 10)),
            // With `Content-Length`: 100 fields, and 101.
            "fields100" => fields(99),
            "fields101" => fields(100),
            _ => return ok(),
        };
        let out = format!("HTTP/1.1 200 OK\r\n{extra}Content-Length: 5\r\n\r\nhello");
        (out.into_bytes(), Then::Keep)
    })
    .await;
    let proxy = Proxy::start_with(
        &routes(""),
        &backend.origin,
        "upstream_read_buffer = \"16KiB\"",
    )
    .await;
    let mut c = ClientConn::open(proxy.addr).await;
    for prefix in ["", "/stream"] {
        let r = c.get(&format!("{prefix}/fields100")).await;
        assert_eq!((r.status, r.text().as_str()), (200, "hello"), "{prefix}");
        for name in ["big", "fields101"] {
            let path = format!("{prefix}/{name}");
            let p = c.get(&path).await.assert_problem(502);
            let detail = p["detail"].as_str().unwrap();
            assert!(
                detail.contains("upstream_read_buffer (16384 bytes)")
                    && detail.contains("max_header_fields (100)"),
                "{path}: {detail}"
            );
            let r = c.get("/next").await;
            assert_eq!((r.status, r.text().as_str()), (200, "ok"), "after {path}");
        }
    }
}

/// Bytes after a length-framed body, in the same write, that are no response at all: the
/// client gets the body its length frames, and the next request its own answer (not a 502
/// from reading them as its answer's head); the spoilt connection is not used again.
#[tokio::test]
async fn stray_bytes_after_a_length_body_never_reach_the_next_request() {
    let (backend, proxy) = start(|line| {
        if path(line).ends_with("/stray") {
            (
                b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhelloGARBAGE\r\n".to_vec(),
                Then::Keep,
            )
        } else {
            ok()
        }
    })
    .await;
    let mut c = ClientConn::open(proxy.addr).await;
    let mut expected = 1;
    for path in ["/stray", "/stream/stray"] {
        let r = c.get(path).await;
        assert_eq!((r.status, r.text().as_str()), (200, "hello"), "{path}");
        let r = c.get("/next").await;
        assert_eq!((r.status, r.text().as_str()), (200, "ok"), "after {path}");
        expected += 1;
        assert_eq!(
            backend.connections(),
            expected,
            "after {path}: a new connection"
        );
    }
}

/// A backend with a keep-alive timeout (600 ms here) closes a pooled connection between two
/// GETs: the second is answered all the same, on a new connection.
#[tokio::test]
async fn a_backend_closing_an_idle_kept_alive_connection_costs_the_next_get_nothing() {
    let (backend, proxy) = start(|_| {
        (
            b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok".to_vec(),
            Then::CloseIdleAfter(Duration::from_millis(600)),
        )
    })
    .await;
    let mut c = ClientConn::open(proxy.addr).await;
    for (n, path) in [(1, "/doc"), (2, "/stream/doc"), (3, "/doc")] {
        let r = c.get(path).await;
        assert_eq!((r.status, r.text().as_str()), (200, "ok"), "GET {n}");
        assert_eq!(backend.connections(), n, "GET {n}");
        tokio::time::sleep(Duration::from_millis(900)).await;
    }
}

/// 4 MiB with a `Content-Length`, written in 64 KiB pieces, against a 1 MiB `max_tag_body`:
/// streamed whole and untagged. 512 KiB: tagged. The connection is reused after both.
#[tokio::test]
async fn a_body_over_max_tag_body_streams_whole_untagged_and_one_under_it_is_tagged() {
    fn body(len: usize) -> Vec<u8> {
        (0..len).map(|i| b'a' + (i % 26) as u8).collect()
    }
    let backend = RawBackend::start(|line| {
        let len = match path(line) {
            "/big" => 4 << 20,
            "/small" => 512 << 10,
            _ => return ok(),
        };
        let mut out = format!("HTTP/1.1 200 OK\r\nContent-Length: {len}\r\n\r\n").into_bytes();
        out.extend_from_slice(&body(len));
        (out, Then::Keep)
    })
    .await;
    let proxy = Proxy::start(
        &route(
            "/",
            "validation = \"cached\"\nupstream_timeout = \"2s\"\nmax_tag_body = \"1MiB\"",
        ),
        &backend.origin,
    )
    .await;
    let mut c = ClientConn::open(proxy.addr).await;
    let r = c.get("/big").await;
    assert_eq!(r.status, 200);
    assert_eq!(r.body.len(), 4 << 20);
    assert!(r.body == body(4 << 20), "the whole body, in order");
    assert_eq!(r.header("etag"), None, "over max_tag_body: untagged");
    let r = c.get("/small").await;
    assert_eq!(r.status, 200);
    assert!(r.body == body(512 << 10), "the whole body, in order");
    assert_eq!(r.etag(), proxy.tag_of(body(512 << 10)));
    let r = c.get("/next").await;
    assert_eq!((r.status, r.text().as_str()), (200, "ok"));
    assert_eq!(backend.connections(), 1, "one upstream connection");
}

/// A status line with no reason phrase (`HTTP/1.1 200` and its CRLF: httparse then gives a
/// reason of its own, a static empty string), and one whose reason has bytes past ASCII
/// (obs-text, for which httparse gives the same): hyper's client takes both as an empty
/// reason, and so the 200 goes on whole, and the connection is reused.
#[tokio::test]
async fn a_status_line_without_a_reason_or_with_obs_text_in_it_is_a_200() {
    let (backend, proxy) = start(|line| {
        let p = path(line);
        if p.ends_with("/bare") {
            let out = b"HTTP/1.1 200\r\nContent-Length: 5\r\n\r\nhello";
            (out.to_vec(), Then::Keep)
        } else if p.ends_with("/latin") {
            let out = "HTTP/1.1 200 \u{c7}a va\r\nContent-Length: 5\r\n\r\nhello";
            (out.as_bytes().to_vec(), Then::Keep)
        } else {
            ok()
        }
    })
    .await;
    let connections = get_both_ways(&backend, &proxy, "/bare", b"hello").await;
    assert_eq!(connections, 1, "one upstream connection for all three GETs");
    let connections = get_both_ways(&backend, &proxy, "/latin", b"hello").await;
    assert_eq!(connections, 1, "one upstream connection for all six GETs");
}

/// hyper bounds a body's chunk extensions at 16 KiB of extension bytes, the `;` and the
/// line's CR not counted: 9000 one-byte chunks each with `;x` are 9000 bytes, under it, and
/// the body is whole.
#[tokio::test]
async fn many_chunks_with_short_extensions_under_hypers_limit_frame_a_whole_body() {
    let (backend, proxy) = start(|line| {
        if path(line).ends_with("/many") {
            let mut out = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n".to_vec();
            for _ in 0..9000 {
                out.extend_from_slice(b"1;x\r\na\r\n");
            }
            out.extend_from_slice(b"0\r\n\r\n");
            (out, Then::Keep)
        } else {
            ok()
        }
    })
    .await;
    let connections = get_both_ways(&backend, &proxy, "/many", &[b'a'; 9000]).await;
    assert_eq!(connections, 1, "one upstream connection for all three GETs");
}

/// `Content-Length` is `1*DIGIT` with no bound on the digits (RFC 9110 §8.6): hyper takes
/// any that fit 64 bits, leading zeros and all. 21 digits, 5 bytes: a whole 200.
#[tokio::test]
async fn a_length_with_many_leading_zeros_is_its_number() {
    let (backend, proxy) = start(|line| {
        if path(line).ends_with("/zeros") {
            let out = b"HTTP/1.1 200 OK\r\nContent-Length: 000000000000000000005\r\n\r\nhello";
            (out.to_vec(), Then::Keep)
        } else {
            ok()
        }
    })
    .await;
    let connections = get_both_ways(&backend, &proxy, "/zeros", b"hello").await;
    assert_eq!(connections, 1, "one upstream connection for all three GETs");
}

/// hyper's client takes as many trailer fields as `max_header_fields` allows head fields:
/// raised to 200, a body ending in 150 trailer fields is whole.
#[tokio::test]
async fn trailers_are_bounded_by_max_header_fields_as_heads_are() {
    let backend = RawBackend::start(|line| {
        if path(line).ends_with("/trailers") {
            let mut out =
                b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n"
                    .to_vec();
            for i in 0..150 {
                out.extend_from_slice(format!("x-t{i}: {i}\r\n").as_bytes());
            }
            out.extend_from_slice(b"\r\n");
            (out, Then::Keep)
        } else {
            ok()
        }
    })
    .await;
    let proxy = Proxy::start_with(&routes(""), &backend.origin, "max_header_fields = 200").await;
    let connections = get_both_ways(&backend, &proxy, "/trailers", b"hello").await;
    assert_eq!(connections, 1, "one upstream connection for all three GETs");
}
