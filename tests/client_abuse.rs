//! Hostile clients, over raw sockets where a well-behaved HTTP client would refuse to send
//! the bytes: size limits, slow and idle connections, too many connections, and requests whose
//! framing could be read two ways (smuggling). None of them reaches the backend.

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use common::backend::respond;
use common::proxy::route;
use common::{Client, Proxy, ScriptedBackend};
use proptest::prelude::*;

/// A backend that answers every request with 200 "ok", and the proxy in front of it with
/// these extra `[server]` keys.
async fn proxy_with(server_keys: &str) -> (ScriptedBackend, Proxy) {
    let backend = ScriptedBackend::start(|_| async { respond(200, &[], "ok") }).await;
    let proxy = Proxy::start_with(&route("/", ""), &backend.origin(), server_keys).await;
    (backend, proxy)
}

/// Sends `bytes` and reads until the proxy closes or `wait` passes.
async fn raw(addr: SocketAddr, bytes: Vec<u8>, wait: Duration) -> String {
    tokio::task::spawn_blocking(move || raw_blocking(addr, bytes, wait))
        .await
        .unwrap()
}

fn raw_blocking(addr: SocketAddr, bytes: Vec<u8>, wait: Duration) -> String {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(wait)).unwrap();
    // The proxy may refuse and close before it has read all: the rest is not needed.
    let _ = s.write_all(&bytes);
    let mut out = Vec::new();
    let mut buf = [0u8; 8192];
    loop {
        match s.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => out.extend_from_slice(&buf[..n]),
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// A chunked PUT of `path` (its head carrying `extra` lines) in `chunks` chunks of `size`
/// bytes of `byte` each.
fn chunked_put(path: &str, extra: &str, chunks: usize, size: usize, byte: u8) -> Vec<u8> {
    let mut req =
        format!("PUT {path} HTTP/1.1\r\nHost: a\r\n{extra}Transfer-Encoding: chunked\r\n\r\n")
            .into_bytes();
    for _ in 0..chunks {
        req.extend_from_slice(format!("{size:x}\r\n").as_bytes());
        req.extend(std::iter::repeat_n(byte, size));
        req.extend_from_slice(b"\r\n");
    }
    req.extend_from_slice(b"0\r\n\r\n");
    req
}

fn status_line(rsp: &str) -> &str {
    rsp.lines().next().unwrap_or("(closed without a response)")
}

/// The paths of the requests the backend received, from the `from`-th on.
fn forwarded_paths(backend: &ScriptedBackend, from: usize) -> Vec<String> {
    backend.requests()[from..]
        .iter()
        .map(|r| r.uri.path().to_owned())
        .collect()
}

#[tokio::test]
async fn smuggling_shaped_requests_are_refused_and_never_forwarded() {
    let (backend, proxy) = proxy_with("").await;
    let cases: &[(&str, &[u8], &str)] = &[
        ("repeated Content-Length", b"PUT /x HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\nContent-Length: 3\r\n\r\nabc", "400"),
        ("different Content-Lengths", b"PUT /x HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\nContent-Length: 5\r\n\r\nabcde", "400"),
        ("Transfer-Encoding and Content-Length", b"PUT /x HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n", "400"),
        ("a coding before chunked", b"PUT /x HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: gzip, chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n", "501"),
        ("chunked not last", b"PUT /x HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked, gzip\r\n\r\n3\r\nabc\r\n0\r\n\r\n", "400"),
        ("obsolete line folding", b"PUT /x HTTP/1.1\r\nHost: a\r\nX-A: 1\r\n  folded\r\nContent-Length: 3\r\n\r\nabc", "400"),
        ("bare LF", b"PUT /x HTTP/1.1\nHost: a\nContent-Length: 3\n\nabc", "400"),
        ("one bare LF among CRLFs", b"PUT /x HTTP/1.1\r\nHost: a\nContent-Length: 3\r\n\r\nabc", "400"),
        ("a second, smuggled request after a good one", b"GET /ok HTTP/1.1\r\nHost: a\r\n\r\nPUT /x HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\nContent-Length: 3\r\n\r\nabc", "400"),
    ];
    for (name, bytes, want) in cases {
        let before = backend.requests().len();
        let rsp = raw(proxy.addr, bytes.to_vec(), Duration::from_secs(2)).await;
        // The refusal may follow a good response on the same connection.
        assert!(rsp.contains(&format!("HTTP/1.1 {want} ")), "{name}: {rsp}");
        let forwarded = forwarded_paths(&backend, before);
        assert!(
            !forwarded.contains(&"/x".to_owned()),
            "{name}: forwarded {forwarded:?}"
        );
    }
}

/// RFC 9112 §3.2: an HTTP/1.1 request without `Host`, any request with two, and one whose
/// `Host` is not a host name get 400, a problem that names the header, and never reach the
/// backend. The connection stays usable: its framing was sound.
#[tokio::test]
async fn a_missing_repeated_or_malformed_host_is_refused_before_the_backend() {
    let (backend, proxy) = proxy_with("").await;
    let cases: &[(&str, &str)] = &[
        ("no Host", "PUT /x HTTP/1.1\r\nContent-Length: 3\r\n\r\nabc"),
        ("two Hosts", "PUT /x HTTP/1.1\r\nHost: a.example\r\nHost: b.example\r\nContent-Length: 3\r\n\r\nabc"),
        ("two Hosts, absolute-form", "GET http://a.example/x HTTP/1.1\r\nHost: a.example\r\nHost: b.example\r\n\r\n"),
        ("two Hosts, HTTP/1.0", "GET /x HTTP/1.0\r\nHost: a.example\r\nHost: b.example\r\nConnection: keep-alive\r\n\r\n"),
        ("userinfo", "GET /x HTTP/1.1\r\nHost: user@a.example\r\n\r\n"),
        ("a path", "GET /x HTTP/1.1\r\nHost: a.example/evil\r\n\r\n"),
        ("empty", "GET /x HTTP/1.1\r\nHost:\r\n\r\n"),
        ("a port that is no number", "GET /x HTTP/1.1\r\nHost: a.example:http\r\n\r\n"),
    ];
    for (name, head) in cases {
        // The refused request, then a good one on the same connection.
        let bytes =
            format!("{head}GET /after HTTP/1.1\r\nHost: a.example\r\nConnection: close\r\n\r\n");
        let rsp = raw(proxy.addr, bytes.into_bytes(), Duration::from_secs(2)).await;
        assert!(
            status_line(&rsp).ends_with(" 400 Bad Request"),
            "{name}: {rsp}"
        );
        let first = rsp.split("\r\n\r\n").nth(1).unwrap_or_default();
        assert!(rsp.contains("application/problem+json"), "{name}: {rsp}");
        assert!(first.contains("malformed host header"), "{name}: {rsp}");
        assert!(
            rsp.contains(" 200 OK\r\n"),
            "{name}: the next request: {rsp}"
        );
        let forwarded = forwarded_paths(&backend, 0);
        assert!(
            !forwarded.contains(&"/x".to_owned()),
            "{name}: forwarded {forwarded:?}"
        );
    }
    // HTTP/1.0 may omit it: the backend gets the route's upstream host.
    let rsp = raw(
        proxy.addr,
        b"GET /x HTTP/1.0\r\n\r\n".to_vec(),
        Duration::from_secs(2),
    )
    .await;
    assert!(status_line(&rsp).ends_with(" 200 OK"), "{rsp}");
    let seen = backend.last();
    assert_eq!(seen.uri.path(), "/x");
    assert_eq!(seen.headers.get_all("host").iter().count(), 1);
}

/// RFC 9110 §7.2: a request carries `Host` unless it carries `:authority` (an `http` URI has
/// a host, §4.2.1). An HTTP/2 one with neither is refused as HTTP/1.1's without `Host` is
/// (nginx refuses it too): the router would only guess its host. With `Host` alone, served.
#[tokio::test]
async fn an_http2_request_without_authority_or_host_is_refused_before_the_backend() {
    let (backend, proxy) = proxy_with("").await;
    let client = common::h2_client(proxy.addr).await;
    let send = |host: Option<&str>| {
        let mut req = http::Request::get("/x").body(()).unwrap();
        if let Some(host) = host {
            req.headers_mut().insert("host", host.parse().unwrap());
        }
        let client = client.clone();
        async move {
            let (answer, _) = client.ready().await?.send_request(req, true)?;
            let (head, mut body) = answer.await?.into_parts();
            let mut text = Vec::new();
            while let Some(chunk) = body.data().await {
                text.extend_from_slice(&chunk?);
            }
            Ok::<_, h2::Error>((head.status, String::from_utf8_lossy(&text).into_owned()))
        }
    };
    let (status, detail) = send(None).await.unwrap();
    assert_eq!(status, 400, "{detail}");
    assert!(detail.contains(":authority"), "{detail}");
    assert!(backend.requests().is_empty(), "forwarded");
    let (status, body) = send(Some("a.example")).await.unwrap();
    assert_eq!((status.as_u16(), body.as_str()), (200, "ok"));
}

/// A chunk size written with more leading zeros than the framing inspector buffers of a
/// line (4 KiB): hyper reads the size as it is; the inspector must too, or it would take
/// the chunk's data for request heads, and the verdicts of later requests would shift onto
/// the wrong requests.
#[tokio::test]
async fn a_long_zero_padded_chunk_size_cannot_shift_the_framing_verdicts() {
    let (backend, proxy) = proxy_with("").await;
    // Chunk data that looks like the end of a trailer and a request head, if read as such.
    let data = "x\r\n\r\nGET /s HTTP/1.1\r\n\r\n";
    let mut bytes =
        b"PUT /chunked HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n".to_vec();
    bytes.extend(std::iter::repeat_n(b'0', 5000));
    bytes.extend(format!("{:x}\r\n{data}\r\n0\r\n\r\n", data.len()).as_bytes());
    // Then a request the inspector must refuse.
    bytes
        .extend(b"PUT /x HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\nContent-Length: 3\r\n\r\nabc");
    let rsp = raw(proxy.addr, bytes, Duration::from_secs(2)).await;
    let forwarded: Vec<_> = backend
        .requests()
        .iter()
        .map(|r| (r.uri.path().to_owned(), r.body.clone()))
        .collect();
    assert!(
        !forwarded.iter().any(|(p, _)| p == "/x"),
        "the refused request was forwarded: {rsp}"
    );
    assert!(rsp.contains("HTTP/1.1 400 "), "{rsp}");
    // The padded chunk itself is well formed: forwarded with its data.
    assert_eq!(forwarded.len(), 1, "{forwarded:?}");
    assert_eq!(forwarded[0].0, "/chunked");
    assert_eq!(forwarded[0].1, data.as_bytes());
}

/// An absolute-form target's authority is routed by and sent upstream as `Host`: a
/// `user@` in it is refused as in `Host` (it once reached the backend as `Host: user@a:1`).
#[tokio::test]
async fn an_absolute_form_authority_with_userinfo_is_refused_like_such_a_host() {
    let (backend, proxy) = proxy_with("").await;
    let bytes = b"GET http://user@a:1/b HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n".to_vec();
    let rsp = raw(proxy.addr, bytes, Duration::from_secs(2)).await;
    assert_eq!(status_line(&rsp), "HTTP/1.1 400 Bad Request", "{rsp}");
    assert!(rsp.contains("authority"), "{rsp}");
    assert!(backend.requests().is_empty());
}

/// CONNECT asks for a tunnel, which the proxy does not open: a 501 problem, nothing
/// forwarded (it once went to the backend as `CONNECT /`), and the connection goes on.
#[tokio::test]
async fn connect_is_refused_with_a_501_and_never_forwarded() {
    let (backend, proxy) = proxy_with("").await;
    let bytes = b"CONNECT example.com:443 HTTP/1.1\r\nHost: example.com:443\r\n\r\n\
GET /after HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n"
        .to_vec();
    let rsp = raw(proxy.addr, bytes, Duration::from_secs(2)).await;
    assert_eq!(status_line(&rsp), "HTTP/1.1 501 Not Implemented", "{rsp}");
    assert!(rsp.contains("application/problem+json"), "{rsp}");
    assert!(
        rsp.contains("HTTP/1.1 200 OK"),
        "the next request is answered: {rsp}"
    );
    assert_eq!(forwarded_paths(&backend, 0), ["/after"]);
}

/// Authority-form (`GET b:80`) is CONNECT's alone, and asterisk-form (`*`) OPTIONS's (RFC
/// 9112 §3.2.3-4). Another method's `GET b:80` went up as `GET /` with `Host: b:80`: the
/// client chose the backend's `Host` through a form no client sends. Both are refused with a
/// 400 and never forwarded; `OPTIONS *` goes on as it is.
#[tokio::test]
async fn a_target_form_of_another_method_is_refused() {
    let (backend, proxy) = proxy_with("").await;
    for (request, names) in [
        ("GET b:80 HTTP/1.1\r\nHost: a\r\n\r\n", "authority-form"),
        (
            "PUT b:80 HTTP/1.1\r\nHost: a\r\nContent-Length: 0\r\n\r\n",
            "authority-form",
        ),
        ("GET * HTTP/1.1\r\nHost: a\r\n\r\n", "only OPTIONS"),
    ] {
        let bytes = format!("{request}GET /after HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n");
        let rsp = raw(proxy.addr, bytes.into_bytes(), Duration::from_secs(2)).await;
        assert_eq!(
            status_line(&rsp),
            "HTTP/1.1 400 Bad Request",
            "{request}: {rsp}"
        );
        assert!(rsp.contains(names), "{request}: {rsp}");
        assert!(
            rsp.contains("HTTP/1.1 200 OK"),
            "{request}: the next is answered: {rsp}"
        );
    }
    assert_eq!(forwarded_paths(&backend, 0), ["/after", "/after", "/after"]);
    let rsp = raw(
        proxy.addr,
        b"OPTIONS * HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n".to_vec(),
        Duration::from_secs(2),
    )
    .await;
    assert_eq!(status_line(&rsp), "HTTP/1.1 200 OK", "{rsp}");
    let last = backend.requests().pop().unwrap();
    assert_eq!(
        (last.method.as_str(), last.uri.to_string()),
        ("OPTIONS", "*".into())
    );
}

/// TRACE makes a backend that implements it echo the request back, `Cookie` and
/// `Authorization` included (cross-site tracing): refused like CONNECT, never forwarded, as
/// nginx refuses it. The connection goes on.
#[tokio::test]
async fn trace_is_refused_and_never_forwarded() {
    let (backend, proxy) = proxy_with("").await;
    // In any case: a backend that upper-cases methods would run `trace` as TRACE.
    let rsp = raw(
        proxy.addr,
        b"trace / HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n".to_vec(),
        Duration::from_secs(2),
    )
    .await;
    assert_eq!(status_line(&rsp), "HTTP/1.1 501 Not Implemented", "{rsp}");
    let bytes = b"TRACE /docs/a HTTP/1.1\r\nHost: a\r\nCookie: session=secret\r\n\r\n\
GET /after HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n"
        .to_vec();
    let rsp = raw(proxy.addr, bytes, Duration::from_secs(2)).await;
    assert_eq!(status_line(&rsp), "HTTP/1.1 501 Not Implemented", "{rsp}");
    assert!(rsp.contains("application/problem+json"), "{rsp}");
    assert!(rsp.contains("does not forward TRACE"), "{rsp}");
    assert!(!rsp.contains("secret"), "{rsp}");
    assert!(
        rsp.contains("HTTP/1.1 200 OK"),
        "the next request is answered: {rsp}"
    );
    assert_eq!(forwarded_paths(&backend, 0), ["/after"]);
}

/// `Max-Forwards` on OPTIONS (RFC 9110 §7.6.2): 0 makes the proxy the final recipient, which
/// answers and forwards nothing; any other value reaches the backend one lower; one that
/// cannot be counted down is a 400 naming the field. Other methods carry it untouched.
#[tokio::test]
async fn max_forwards_on_options_is_counted_down_and_zero_is_answered_here() {
    let (backend, proxy) = proxy_with("").await;
    let c = Client::new();
    let url = proxy.url("/docs/a");
    let send = |method: &'static str, value: &'static str| {
        let (c, url) = (c.clone(), url.clone());
        async move { c.send(method, &url, &[("max-forwards", value)], "").await }
    };
    let here = send("OPTIONS", "0").await;
    assert_eq!(here.status, 200);
    assert!(here.body.is_empty());
    assert!(
        backend.requests().is_empty(),
        "an OPTIONS with 0 hops left went up"
    );

    assert_eq!(send("OPTIONS", "3").await.status, 200);
    assert_eq!(send("GET", "0").await.status, 200);
    let bad = send("OPTIONS", "-1").await;
    assert_eq!(bad.status, 400);
    assert!(bad.text().contains("max-forwards"), "{}", bad.text());
    let seen: Vec<(String, String)> = backend
        .requests()
        .iter()
        .map(|r| {
            let hops = r.headers.get("max-forwards").unwrap().to_str().unwrap();
            (r.method.to_string(), hops.to_owned())
        })
        .collect();
    assert_eq!(
        seen,
        [("OPTIONS".into(), "2".into()), ("GET".into(), "0".into())],
        "what the backend got"
    );
}

/// A bare LF after the last chunk starts a trailer line to hyper (which then takes the
/// request behind it for trailers); the inspector once took it for the end of the body and
/// the next bytes for a head, and from then on judged each request by the verdict of the
/// one before: a request it must refuse reached the backend.
#[tokio::test]
async fn a_bare_lf_in_a_chunked_body_cannot_shift_the_framing_verdicts() {
    let (backend, proxy) = proxy_with("").await;
    let mut bytes =
        b"PUT /chunked HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n".to_vec();
    bytes.extend(b"0\r\n\nGET /hidden HTTP/1.1\r\nHost: a\r\n\r\n");
    bytes
        .extend(b"PUT /x HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\nContent-Length: 3\r\n\r\nabc");
    bytes.extend(b"PUT /y HTTP/1.1\r\nHost: a\r\nContent-Length: 1\r\n\r\ny");
    let rsp = raw(proxy.addr, bytes, Duration::from_secs(2)).await;
    let forwarded = forwarded_paths(&backend, 0);
    assert!(
        !forwarded.iter().any(|p| p == "/x" || p == "/hidden"),
        "forwarded: {forwarded:?}\n{rsp}"
    );
}

/// The framing checks cover heads of any size the proxy accepts, not only the default's:
/// with `max_header_bytes` raised past 1 MiB, the inspector once stopped following a
/// connection at 1 MiB while hyper read on, and let such a head through unjudged.
#[tokio::test]
async fn a_head_larger_than_a_mebibyte_is_still_judged_when_the_limit_allows_it() {
    let (backend, proxy) = proxy_with("max_header_bytes = \"2MiB\"").await;
    let big = "a".repeat(1536 * 1024);
    let head = |lengths: &str| {
        format!(
            "PUT /big HTTP/1.1\r\nHost: a\r\nX-Big: {big}\r\n{lengths}Connection: close\r\n\r\nabc"
        )
    };
    let twice = head("Content-Length: 3\r\nContent-Length: 3\r\n");
    let rsp = raw(proxy.addr, twice.into_bytes(), Duration::from_secs(5)).await;
    assert!(
        status_line(&rsp).contains(" 400 "),
        "{}",
        &rsp[..rsp.len().min(600)]
    );
    assert!(
        rsp.contains("Content-Length"),
        "the refusal says why: {rsp}"
    );
    assert!(
        backend.requests().is_empty(),
        "the ambiguous request was forwarded"
    );
    // The same head, framed once, is within the limit and goes through.
    let once = head("Content-Length: 3\r\n");
    let rsp = raw(proxy.addr, once.into_bytes(), Duration::from_secs(5)).await;
    assert!(status_line(&rsp).contains(" 200 "), "{}", status_line(&rsp));
    assert_eq!(backend.last().body, "abc".as_bytes());
}

#[tokio::test]
async fn a_head_over_the_limit_gets_a_431_problem() {
    let (backend, proxy) = proxy_with("max_header_bytes = \"4KiB\"").await;
    let big = "a".repeat(6000);
    let c = Client::new();
    let r = c.get(&proxy.url("/x"), &[("x-big", &big)]).await;
    r.assert_problem(431);
    // Far over the limit hyper itself answers 431, before any parsing.
    let huge = format!(
        "GET /x HTTP/1.1\r\nHost: a\r\nX-Huge: {}\r\n\r\n",
        "a".repeat(200_000)
    );
    let rsp = raw(proxy.addr, huge.into_bytes(), Duration::from_secs(2)).await;
    assert!(status_line(&rsp).contains("431"), "{rsp}");
    assert!(backend.requests().is_empty());
    assert_eq!(
        c.get(&proxy.url("/x"), &[]).await.status,
        200,
        "normal heads still pass"
    );
}

#[tokio::test]
async fn a_body_over_the_limit_gets_a_413_problem_declared_or_streamed() {
    let (backend, proxy) = proxy_with("max_request_body = \"1KiB\"").await;
    let c = Client::new();
    let r = c.put(&proxy.url("/x"), &[], vec![b'x'; 4096]).await;
    // RFC 9110's name for 413, which RFC 9457 has the title follow.
    assert_eq!(r.assert_problem(413)["title"], "Content Too Large");
    assert!(
        backend.requests().is_empty(),
        "a declared length over the limit is refused up front"
    );

    // Chunked, so the size is only known while streaming.
    let chunked = chunked_put("/y", "", 4, 1024, b'y');
    let rsp = raw(proxy.addr, chunked, Duration::from_secs(3)).await;
    assert!(status_line(&rsp).contains("413"), "{rsp}");
    assert!(
        backend.requests().iter().all(|r| r.body.len() <= 1024),
        "the backend never got the whole oversized body"
    );
    assert!(proxy.state.locks.is_empty());
}

#[tokio::test]
async fn a_client_that_sends_its_head_too_slowly_is_cut_off() {
    let (backend, proxy) = proxy_with("header_read_timeout = \"300ms\"").await;
    let started = Instant::now();
    // Half a head, then silence (slowloris).
    let rsp = raw(
        proxy.addr,
        b"GET /x HTTP/1.1\r\nHost: a\r\n".to_vec(),
        Duration::from_secs(5),
    )
    .await;
    let took = started.elapsed();
    assert!(
        took < Duration::from_secs(3),
        "closed after the header timeout, took {took:?}"
    );
    assert!(!rsp.contains("200 OK"), "{rsp}");
    assert!(backend.requests().is_empty());
}

/// A client whose head, begun before the idle timer fired, comes whole in the grace that
/// follows (and is answered), and which then reads nothing: it is still cut off as one
/// that stopped reading, and gives back its `max_connections` slot.
#[tokio::test]
async fn a_head_finished_in_the_idle_grace_then_never_read_is_still_cut_off() {
    let backend =
        ScriptedBackend::start(|_| async { respond(200, &[], vec![b'x'; 32 << 20]) }).await;
    let limits = "header_read_timeout = \"500ms\"\nmax_connections = 1";
    let proxy = Proxy::start_with(&route("/", ""), &backend.origin(), limits).await;
    let mut client = TcpStream::connect(proxy.addr).unwrap();
    client
        .write_all(b"GET /big HTTP/1.1\r\nHost: a\r\n")
        .unwrap();
    // The idle timer fires at 500 ms; its grace runs to 1.5 s.
    tokio::time::sleep(Duration::from_millis(800)).await;
    client.write_all(b"\r\n").unwrap();
    tokio::time::sleep(Duration::from_secs(4)).await;
    assert_eq!(backend.requests().len(), 1, "the head was answered");
    let next = b"GET /small HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n";
    let rsp = raw(proxy.addr, next.to_vec(), Duration::from_secs(2)).await;
    assert_eq!(
        status_line(&rsp),
        "HTTP/1.1 200 OK",
        "the slot was given back"
    );
    assert!(closed(&proxy, "stalled", 1), "counted");
    drop(client);
}

/// Whether `ifmatch_connections_closed_total` says `n` for `reason`.
fn closed(proxy: &Proxy, reason: &str, n: u64) -> bool {
    let s = &proxy.state;
    let text = s.metrics.render(&s.tags, &s.memo, &s.budget);
    text.contains(&format!(
        "\nifmatch_connections_closed_total{{reason=\"{reason}\"}} {n}\n"
    ))
}

/// Writes `first`, then one more header line every 100 ms (a slowloris that never stops
/// sending), and says how long until the proxy closed the connection (`None`: not in 5 s).
/// The bytes the proxy sent before closing come with it.
fn trickle(addr: SocketAddr, first: &[u8]) -> (Option<Duration>, String) {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_millis(100)))
        .unwrap();
    let started = Instant::now();
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    let _ = s.write_all(first);
    while started.elapsed() < Duration::from_secs(5) {
        match s.read(&mut buf) {
            Ok(0) => {
                return (
                    Some(started.elapsed()),
                    String::from_utf8_lossy(&got).into(),
                )
            }
            Ok(n) => got.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {
                return (
                    Some(started.elapsed()),
                    String::from_utf8_lossy(&got).into(),
                )
            }
            Err(_) => {
                if s.write_all(b"X-Slow: a\r\n").is_err() {
                    return (
                        Some(started.elapsed()),
                        String::from_utf8_lossy(&got).into(),
                    );
                }
            }
        }
    }
    (None, String::from_utf8_lossy(&got).into())
}

#[tokio::test]
async fn a_head_trickled_in_forever_is_cut_off_first_request_or_later() {
    let (backend, proxy) = proxy_with("header_read_timeout = \"300ms\"").await;
    let addr = proxy.addr;
    // The first head of a connection, a byte-stream that never ends.
    let (closed, _) = tokio::task::spawn_blocking(move || trickle(addr, b"GET /x HTTP/1.1\r\n"))
        .await
        .unwrap();
    let closed = closed.expect("a slowloris on a new connection was never cut off");
    assert!(closed < Duration::from_secs(3), "cut off after {closed:?}");
    // The second head of a kept-alive connection, after a request answered in full.
    let (closed, got) = tokio::task::spawn_blocking(move || {
        trickle(
            addr,
            b"GET /x HTTP/1.1\r\nHost: a\r\n\r\nGET /y HTTP/1.1\r\n",
        )
    })
    .await
    .unwrap();
    let closed = closed.expect("a slowloris after a first request was never cut off");
    assert!(closed < Duration::from_secs(3), "cut off after {closed:?}");
    assert!(
        status_line(&got).contains("200"),
        "the first request was answered: {got}"
    );
    assert_eq!(forwarded_paths(&backend, 0), ["/x"]);
}

#[tokio::test]
async fn a_connection_that_keeps_sending_requests_is_not_idle() {
    let (_backend, proxy) = proxy_with("header_read_timeout = \"300ms\"").await;
    let addr = proxy.addr;
    let answered = tokio::task::spawn_blocking(move || {
        let mut s = TcpStream::connect(addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
        let mut answered = 0;
        for _ in 0..8 {
            // Less than the timeout apart, for longer than it in all.
            std::thread::sleep(Duration::from_millis(150));
            if s.write_all(b"GET /x HTTP/1.1\r\nHost: a\r\n\r\n").is_err() {
                break;
            }
            let mut got = Vec::new();
            let mut buf = [0u8; 4096];
            while !got.ends_with(b"ok") {
                match s.read(&mut buf) {
                    Ok(n) if n > 0 => got.extend_from_slice(&buf[..n]),
                    _ => return answered,
                }
            }
            answered += 1;
        }
        answered
    })
    .await
    .unwrap();
    assert_eq!(answered, 8, "all on one connection");
}

#[tokio::test]
async fn an_idle_keep_alive_connection_is_closed() {
    let (_backend, proxy) = proxy_with("header_read_timeout = \"300ms\"").await;
    let started = Instant::now();
    let rsp = raw(
        proxy.addr,
        b"GET /x HTTP/1.1\r\nHost: a\r\n\r\n".to_vec(),
        Duration::from_secs(5),
    )
    .await;
    assert!(status_line(&rsp).contains("200"), "{rsp}");
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "the idle connection was closed"
    );
}

#[tokio::test]
async fn connections_over_the_limit_get_a_503_problem() {
    let (_backend, proxy) = proxy_with("max_connections = 2").await;
    let addr = proxy.addr;
    let held: Vec<TcpStream> = (0..2).map(|_| TcpStream::connect(addr).unwrap()).collect();
    tokio::time::sleep(Duration::from_millis(100)).await;
    let rsp = raw(
        addr,
        b"GET /x HTTP/1.1\r\nHost: a\r\n\r\n".to_vec(),
        Duration::from_secs(2),
    )
    .await;
    assert!(status_line(&rsp).contains("503"), "{rsp}");
    assert!(
        rsp.contains("application/problem+json") && rsp.contains("\"status\":503"),
        "{rsp}"
    );
    // Told when to come back (as the proxy's other 503s do), so that clients and load
    // balancers that honour it back off instead of reconnecting in a tight loop.
    let head = rsp.split("\r\n\r\n").next().unwrap().to_ascii_lowercase();
    assert!(head.contains("\r\nretry-after: 1\r\n"), "{rsp}");
    assert!(head.contains("\r\nconnection: close\r\n"), "{rsp}");
    // Each refusal is counted (the log says so once a minute, not once each).
    for _ in 0..2 {
        raw(
            addr,
            b"GET /x HTTP/1.1\r\nHost: a\r\n\r\n".to_vec(),
            Duration::from_secs(2),
        )
        .await;
    }
    let s = &proxy.state;
    let text = s.metrics.render(&s.tags, &s.memo, &s.budget);
    assert!(
        text.contains("\nifmatch_connections_refused_total 3\n"),
        "{text}"
    );
    drop(held);
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(
        Client::new().get(&proxy.url("/x"), &[]).await.status,
        200,
        "a freed slot serves again"
    );
}

// === framing, differentially: the inspector and hyper over random pipelines ===

/// A request of a generated pipeline, before it is given its path.
#[derive(Clone, Debug)]
enum Shape {
    /// A GET with no body, and a few more fields.
    Get { fields: Vec<&'static str> },
    /// A `Content-Length` body, the field name in any case.
    Length { body: Vec<u8>, name: &'static str },
    /// A chunked body: chunks of (data, leading zeros of the size, upper-case hex,
    /// extension), zeros before the last chunk's 0, and a trailer.
    Chunked {
        chunks: Vec<(Vec<u8>, usize, bool, &'static str)>,
        last_zeros: usize,
        trailer: bool,
        coding: &'static str,
    },
    /// A head that must be refused, whole (one of `REFUSED`).
    Refused(usize),
}

/// Heads that can be read two ways, or not at all: the inspector or hyper refuses each.
const REFUSED: &[&str] = &[
    "PUT {path} HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\nContent-Length: 3\r\n\r\nabc",
    "PUT {path} HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\nabcd",
    "PUT {path} HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n",
    "PUT {path} HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\ncontent-length: 3\r\n\r\n3\r\nabc\r\n0\r\n\r\n",
    "PUT {path} HTTP/1.1\r\nHost: a\r\nContent-Length: 3\n\r\nabc",
    "PUT {path} HTTP/1.1\nHost: a\nContent-Length: 3\n\nabc",
    "GET {path} HTTP/1.1\r\nHost: a\n\r\n",
    "PUT {path} HTTP/1.1\r\nHost: a\r\nContent-Length: 3a\r\n\r\nabc",
    "PUT {path} HTTP/1.1\r\nHost: a\r\nContent-Length: +3\r\n\r\nabc",
    "PUT {path} HTTP/1.1\r\nHost: a\r\nContent-Length: 3, 3\r\n\r\nabc",
    "PUT {path} HTTP/1.1\r\nHost: a\r\nContent-Length : 3\r\n\r\nabc",
    "PUT {path} HTTP/1.1\r\nHost: a\r\nX-A: 1\r\n folded\r\nContent-Length: 3\r\n\r\nabc",
    "PUT {path} HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: gzip\r\n\r\nabc",
    "PUT {path} HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked, gzip\r\n\r\n3\r\nabc\r\n0\r\n\r\n",
];

fn shape() -> impl Strategy<Value = Shape> {
    let field = prop_oneof![
        Just("Accept: */*"),
        Just("X-Empty:"),
        Just("X-Tab:\tv\t"),
        Just("x-content-length: 5"),
        Just("X-Transfer-Encoding: chunked"),
        Just("Cookie: a=b; content-length=9"),
    ];
    let data = prop::collection::vec(
        prop_oneof![
            Just(b"\r\n".to_vec()),
            Just(b"\n".to_vec()),
            Just(b"0\r\n\r\n".to_vec()),
            Just(b"GET /smuggled HTTP/1.1\r\nHost: a\r\n\r\n".to_vec()),
            prop::collection::vec(any::<u8>(), 1..12),
        ],
        0..4,
    )
    .prop_map(|parts| parts.concat());
    let chunk = (
        data.clone()
            .prop_filter("a chunk has data", |d| !d.is_empty()),
        prop_oneof![0usize..3, 4000usize..6000],
        any::<bool>(),
        prop_oneof![Just(""), Just(";a=b"), Just(";a=\"x;y\""), Just(" ;a")],
    );
    prop_oneof![
        prop::collection::vec(field, 0..3).prop_map(|fields| Shape::Get { fields }),
        (
            data,
            prop_oneof![
                Just("Content-Length"),
                Just("content-length"),
                Just("CONTENT-LENGTH")
            ]
        )
            .prop_map(|(body, name)| Shape::Length { body, name }),
        (
            prop::collection::vec(chunk, 0..3),
            0usize..3,
            any::<bool>(),
            prop_oneof![Just("chunked"), Just("Chunked"), Just(" chunked ")]
        )
            .prop_map(|(chunks, last_zeros, trailer, coding)| Shape::Chunked {
                chunks,
                last_zeros,
                trailer,
                coding,
            }),
        (0..REFUSED.len()).prop_map(Shape::Refused),
    ]
}

/// The request's bytes, and the body the backend must get (`None`: it must get nothing).
fn render(shape: &Shape, path: &str, last: bool) -> (Vec<u8>, Option<Vec<u8>>) {
    let close = if last { "Connection: close\r\n" } else { "" };
    let mut head = format!("Host: a\r\n{close}");
    match shape {
        Shape::Get { fields } => {
            for f in fields {
                head.push_str(&format!("{f}\r\n"));
            }
            let bytes = format!("GET {path} HTTP/1.1\r\n{head}\r\n").into_bytes();
            (bytes, Some(Vec::new()))
        }
        Shape::Length { body, name } => {
            let mut bytes = format!(
                "PUT {path} HTTP/1.1\r\n{head}{name}: {}\r\n\r\n",
                body.len()
            )
            .into_bytes();
            bytes.extend(body);
            (bytes, Some(body.clone()))
        }
        Shape::Chunked {
            chunks,
            last_zeros,
            trailer,
            coding,
        } => {
            let mut bytes =
                format!("POST {path} HTTP/1.1\r\n{head}Transfer-Encoding:{coding}\r\n\r\n")
                    .into_bytes();
            let mut body = Vec::new();
            for (data, zeros, upper, ext) in chunks {
                bytes.extend(std::iter::repeat_n(b'0', *zeros));
                let size = match upper {
                    true => format!("{:X}", data.len()),
                    false => format!("{:x}", data.len()),
                };
                bytes.extend(format!("{size}{ext}\r\n").as_bytes());
                bytes.extend(data);
                bytes.extend(b"\r\n");
                body.extend(data);
            }
            bytes.extend(std::iter::repeat_n(b'0', last_zeros + 1));
            bytes.extend(b"\r\n");
            if *trailer {
                bytes.extend(b"X-Trailer: 1\r\n");
            }
            bytes.extend(b"\r\n");
            (bytes, Some(body))
        }
        Shape::Refused(i) => (REFUSED[*i].replace("{path}", path).into_bytes(), None),
    }
}

/// Random pipelines of well-framed requests and refused heads, sent whole over one
/// connection to the real proxy. The backend must get exactly the well-framed requests before
/// the first refused head, in order and with their bodies, and the client one 200 for each,
/// then a single refusal and the end of the connection. A verdict that lands on the wrong
/// request, or an inspector that loses its place while hyper goes on, fails this.
#[test]
fn the_proxy_forwards_exactly_the_well_framed_requests_before_a_refused_one() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let (backend, proxy) = rt.block_on(proxy_with(""));
    let config = proptest::test_runner::Config {
        cases: 256,
        failure_persistence: None,
        ..Default::default()
    };
    let mut runner = proptest::test_runner::TestRunner::new(config);
    let pipelines = prop::collection::vec(shape(), 1..6);
    let result = runner.run(&pipelines, |shapes| {
        let run = backend.requests().len();
        let mut stream = Vec::new();
        let mut expected = Vec::new();
        let mut refused = false;
        for (i, shape) in shapes.iter().enumerate() {
            let path = format!("/r{run}-{i}");
            let (bytes, body) = render(shape, &path, i + 1 == shapes.len());
            stream.extend(bytes);
            match body {
                Some(body) if !refused => expected.push((path, body)),
                Some(_) => {}
                None => refused = true,
            }
        }
        let rsp = raw_blocking(proxy.addr, stream, Duration::from_secs(5));
        let forwarded: Vec<_> = backend.requests()[run..]
            .iter()
            .map(|r| (r.uri.path().to_owned(), r.body.to_vec()))
            .collect();
        prop_assert_eq!(&forwarded, &expected, "answers: {}", rsp);
        let statuses: Vec<_> = rsp
            .match_indices("HTTP/1.1 ")
            .map(|(at, _)| &rsp[at + 9..at + 12])
            .collect();
        let oks = statuses.iter().take_while(|s| **s == "200").count();
        prop_assert_eq!(oks, expected.len(), "answers: {}", rsp);
        prop_assert_eq!(
            statuses.len(),
            oks + usize::from(refused),
            "answers: {}",
            rsp
        );
        Ok(())
    });
    if let Err(e) = result {
        panic!("{e}");
    }
}

/// A client that reads a large response slowly but steadily (a throttled or mobile
/// download) is not taken for one that stopped reading: the proxy is asked for a chunk only
/// once the kernel has drained a third of the socket's send buffer (megabytes), which at
/// this rate takes longer than `header_read_timeout`, but the socket's send queue goes down.
/// Once the client stops reading for good, it is cut off all the same.
#[tokio::test]
async fn a_slow_but_steady_reader_is_not_cut_off_one_that_stops_is() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let backend =
        ScriptedBackend::start(|_| async { respond(200, &[], vec![b'x'; 64 << 20]) }).await;
    let config = format!(
        "[server]\nlisten = \"{{listen}}\"\nheader_read_timeout = \"1s\"\n[[route]]\nprefix = \"/\"\nupstream = \"{}\"\nmax_tag_body = \"64KiB\"\n",
        backend.origin()
    );
    let bin = common::binary::Binary::start(&config, &[]).await;
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(16 * 1024).unwrap();
    let mut s = socket.connect(bin.addr).await.unwrap();
    s.write_all(b"GET /big HTTP/1.1\r\nHost: a\r\n\r\n")
        .await
        .unwrap();
    // About 200 KB/s for 5 s: five periods of the timeout.
    let started = Instant::now();
    let mut buf = [0u8; 4096];
    let mut got = 0;
    while started.elapsed() < Duration::from_secs(5) {
        let n = s.read(&mut buf).await.unwrap();
        assert!(n > 0, "closed after {got} bytes");
        got += n;
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let cut = "its client stopped reading";
    assert!(
        !bin.log().iter().any(|l| l.contains(cut)),
        "cut off while reading steadily ({got} bytes in 5 s)"
    );
    // Now it stops reading.
    bin.wait_for_log(cut, Duration::from_secs(10)).await;
    drop(s);
}

/// A client still draining a large response slowly when its connection goes idle (the
/// proxy has handed the whole body to hyper, so no request is in flight) is not cut off
/// while it keeps reading: each grace that sees the socket's send queue go down earns
/// another, and the body arrives whole. Cut off, the connection loses what hyper still
/// holds (the kernel sends its own queue before the FIN, not what waits for room in it).
/// The sizes are the stop test's (the queue holds about 3.4–3.8 MB with a 16 KiB receive
/// buffer), so that some end in hyper's buffer. The client reads about 160 KB/s through the
/// idle timeout and two graces: well under the third of the send buffer that must drain
/// before the kernel takes more from hyper (at 1 MB/s hyper had flushed all before the
/// first grace ended, and the test passed without the renewal); then fast, to stay short.
#[tokio::test]
async fn a_slow_reader_still_draining_its_last_response_is_not_cut_off_when_idle() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let sizes: Vec<usize> = (0..12).map(|i| 3_400_000 + i * 50_000).collect();
    let backend = ScriptedBackend::start(|r| async move {
        let n: usize = r.uri.path()[1..].parse().unwrap();
        respond(200, &[], vec![b'x'; n])
    })
    .await;
    let config = format!(
        "[server]\nlisten = \"{{listen}}\"\nheader_read_timeout = \"1s\"\n[[route]]\nprefix = \"/\"\nupstream = \"{}\"\nmax_tag_body = \"64KiB\"\n",
        backend.origin()
    );
    let bin = common::binary::Binary::start(&config, &[]).await;
    let clients: Vec<_> = sizes
        .iter()
        .map(|&n| {
            let addr = bin.addr;
            tokio::spawn(async move {
                let socket = tokio::net::TcpSocket::new_v4().unwrap();
                socket.set_recv_buffer_size(16 * 1024).unwrap();
                let mut s = socket.connect(addr).await.unwrap();
                let head = format!("GET /{n} HTTP/1.1\r\nHost: a\r\n\r\n");
                s.write_all(head.as_bytes()).await.unwrap();
                let started = Instant::now();
                let mut got = Vec::new();
                let mut buf = [0u8; 4096];
                // Slowly for 3.5 s: a body that fits the queue and hyper's buffer is taken
                // at once, the connection is idle 1 s later, its grace ends at 2 s, the
                // next at 3 s.
                while started.elapsed() < Duration::from_millis(3500) {
                    let read = tokio::time::timeout(Duration::from_secs(2), s.read(&mut buf));
                    match read.await.expect("a read within 2 s") {
                        Ok(0) | Err(_) => return (n, got),
                        Ok(k) => got.extend_from_slice(&buf[..k]),
                    }
                    tokio::time::sleep(Duration::from_millis(25)).await;
                }
                // Then the rest, up to the close once the connection is idle.
                let rest = tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut got));
                let _ = rest.await.expect("the connection closes");
                (n, got)
            })
        })
        .collect();
    let mut short = Vec::new();
    for client in clients {
        let (n, got) = client.await.unwrap();
        assert!(got.starts_with(b"HTTP/1.1 200 "), "{n}: no response head");
        let head_end = got.windows(4).position(|w| w == b"\r\n\r\n").unwrap() + 4;
        if got.len() - head_end != n {
            short.push((n, got.len() - head_end));
        }
    }
    assert!(short.is_empty(), "bodies cut short (size, got): {short:?}");
}

/// An HTTP/2 client that reads nothing and pings now and then makes its socket's queue
/// grow (the pings' acks): that is no progress, and its idle connection is still closed,
/// giving back its `max_connections` slot.
#[tokio::test]
async fn a_client_that_pings_and_reads_nothing_does_not_keep_its_slot() {
    use tokio::io::AsyncWriteExt;
    let backend = ScriptedBackend::start(|_| async { respond(200, &[], "ok") }).await;
    let limits = "header_read_timeout = \"500ms\"\nmax_connections = 1";
    let proxy = Proxy::start_with(&route("/", ""), &backend.origin(), limits).await;
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(2048).unwrap();
    let mut s = socket.connect(proxy.addr).await.unwrap();
    let mut start = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
    start.extend_from_slice(&[0, 0, 0, 4, 0, 0, 0, 0, 0]); // SETTINGS, empty
    for _ in 0..400 {
        start.extend_from_slice(&PING);
    }
    s.write_all(&start).await.unwrap();
    slot_given_back_while_it_pings(s, proxy.addr, 50, Duration::from_secs(6)).await;
}

/// Pings on `s` (the only connection `max_connections` lets `addr` hold) every 200 ms,
/// `pings` times, while a plain HTTP/1.1 GET is tried every 200 ms: it must be served within
/// 4 s, the pinging connection's slot given back (none after `give_up`: the slot is held).
async fn slot_given_back_while_it_pings(
    mut s: tokio::net::TcpStream,
    addr: SocketAddr,
    pings: usize,
    give_up: Duration,
) {
    use tokio::io::AsyncWriteExt;
    let pinger = tokio::spawn(async move {
        for _ in 0..pings {
            tokio::time::sleep(Duration::from_millis(200)).await;
            if s.write_all(&PING).await.is_err() {
                return;
            }
        }
    });
    let started = Instant::now();
    let served = loop {
        let rsp = raw(
            addr,
            b"GET /x HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n".to_vec(),
            Duration::from_secs(2),
        )
        .await;
        if status_line(&rsp) == "HTTP/1.1 200 OK" {
            break started.elapsed();
        }
        assert!(started.elapsed() < give_up, "the slot is still held: {rsp}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert!(served < Duration::from_secs(4), "served after {served:?}");
    pinger.abort();
}

/// An HTTP/2 PING frame (8 bytes of opaque data), as a client sends one.
const PING: [u8; 17] = [0, 0, 8, 6, 0, 0, 0, 0, 0, 1, 2, 3, 4, 5, 6, 7, 8];

/// HEADERS with END_STREAM and END_HEADERS on stream `id`: a request for `path` on authority
/// `a`, by a client writing raw frames (HPACK: `GET` indexed or another method literal,
/// `:scheme http` indexed, `:path` and `:authority` literal without indexing).
fn h2_headers(id: u32, method: &str, path: &str) -> Vec<u8> {
    let mut block = match method {
        "GET" => vec![0x82],
        m => [&[0x02, m.len() as u8], m.as_bytes()].concat(),
    };
    block.push(0x86);
    block.extend([0x04, path.len() as u8]);
    block.extend(path.as_bytes());
    block.extend([0x01, 1, b'a']);
    let mut frame = (block.len() as u32).to_be_bytes()[1..].to_vec();
    frame.extend([1, 0x5]);
    frame.extend(id.to_be_bytes());
    frame.extend(block);
    frame
}

/// An HTTP/2 client that reads nothing (its receive buffer full) but sends a cheap request
/// now and then: each answer begun counted as progress, so the connection was never taken
/// for stalled, and its tagged bodies held their share of `max_buffered_bytes` for as long as
/// it kept asking (every other client's GET then went out untagged). A client whose TCP
/// stack acknowledges not one byte for a whole period is now cut off, whatever it sends.
#[tokio::test]
async fn an_http2_client_that_reads_nothing_but_keeps_asking_is_still_cut_off() {
    use tokio::io::AsyncWriteExt;
    let backend = ScriptedBackend::start(|r| async move {
        match r.uri.path() {
            "/big" => respond(200, &[], vec![b'x'; 600 << 10]),
            _ => respond(200, &[], "ok"),
        }
    })
    .await;
    let limits = "header_read_timeout = \"500ms\"\nmax_buffered_bytes = \"1MiB\"";
    let routes = route("/", "max_tag_body = \"1MiB\"");
    let proxy = Proxy::start_with(&routes, &backend.origin(), limits).await;
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(2048).unwrap();
    let mut s = socket.connect(proxy.addr).await.unwrap();
    let mut start = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
    start.extend_from_slice(&[0, 0, 0, 4, 0, 0, 0, 0, 0]); // SETTINGS, empty
    start.extend(h2_headers(1, "GET", "/big"));
    s.write_all(&start).await.unwrap();
    let budget = proxy.state.budget.clone();
    let held = || budget.held() > 0;
    assert!(
        common::eventually(Duration::from_secs(2), held).await,
        "the tagged body is held"
    );
    // A TRACE every 100 ms (the proxy answers it itself, 501) for 4 s: eight periods.
    let asker = tokio::spawn(async move {
        for i in 0..40 {
            tokio::time::sleep(Duration::from_millis(100)).await;
            if s.write_all(&h2_headers(3 + 2 * i, "TRACE", "/t"))
                .await
                .is_err()
            {
                return;
            }
        }
    });
    let freed = common::eventually(Duration::from_secs(3), || budget.held() == 0).await;
    asker.abort();
    assert!(
        freed,
        "its share was never given back: {} held",
        budget.held()
    );
}

/// An HTTP/2 client that starves one stream of window while it reads its other streams
/// held that stream's body, and its share of `max_buffered_bytes`, for as long as it kept
/// the connection (the connection-wide check saw the other streams move): every other
/// client's GET then went out untagged. A stream not waiting on its upstream that takes
/// nothing for `header_read_timeout` is now cut off alone, its share given back; the
/// connection's other streams go on.
#[tokio::test]
async fn an_http2_stream_starved_of_window_is_cut_off_alone_and_gives_its_budget_back() {
    const BIG: usize = 4 << 20;
    let backend = ScriptedBackend::start(|r| async move {
        match r.uri.path() {
            "/big" => respond(200, &[], vec![b'x'; BIG]),
            _ => respond(200, &[], "ok"),
        }
    })
    .await;
    // Room for one big body in flight, not two.
    let limits = "header_read_timeout = \"500ms\"\nmax_buffered_bytes = \"6MiB\"";
    let proxy = Proxy::start_with(
        &route("/", "max_tag_body = \"6MiB\""),
        &backend.origin(),
        limits,
    )
    .await;
    let tcp = tokio::net::TcpStream::connect(proxy.addr).await.unwrap();
    // Small stream windows, a large connection window: the big body's stream is stuck once
    // its first KiB is in, and the small ones still flow.
    let (client, conn) = h2::client::Builder::new()
        .initial_window_size(1024)
        .initial_connection_window_size(8 << 20)
        .handshake::<_, bytes::Bytes>(tcp)
        .await
        .unwrap();
    tokio::spawn(conn);
    let mut client = client.ready().await.unwrap();
    let get = |path: &str| http::Request::get(proxy.url(path)).body(()).unwrap();
    let (big, _) = client.send_request(get("/big"), true).unwrap();
    let big = big.await.unwrap();
    assert_eq!(big.status(), 200);
    let mut starved = big.into_body(); // not read: its window is not given back
    let other = Client::new();
    let r = other.get(&proxy.url("/big"), &[]).await;
    assert!(
        r.header("etag").is_none(),
        "no room while the starved body is held"
    );

    let started = Instant::now();
    let mut tagged = false;
    while started.elapsed() < Duration::from_secs(3) {
        let small = async {
            let mut c = client.clone().ready().await.ok()?;
            let (rsp, _) = c.send_request(get("/small"), true).ok()?;
            let mut body = rsp.await.ok()?.into_body();
            while let Some(chunk) = body.data().await {
                let chunk = chunk.ok()?;
                let _ = body.flow_control().release_capacity(chunk.len());
            }
            Some(())
        };
        let served = tokio::time::timeout(Duration::from_secs(2), small).await;
        assert!(
            matches!(served, Ok(Some(()))),
            "the connection's other streams go on"
        );
        if !tagged {
            tagged = other
                .get(&proxy.url("/big"), &[])
                .await
                .header("etag")
                .is_some();
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(tagged, "the starved stream's share was never given back");
    // Given window now, the starved stream is found reset, short of its body.
    let mut got = 0;
    let ended = loop {
        match tokio::time::timeout(Duration::from_secs(2), starved.data()).await {
            Ok(Some(Ok(chunk))) => {
                got += chunk.len();
                let _ = starved.flow_control().release_capacity(chunk.len());
            }
            Ok(Some(Err(e))) => break Some(e),
            Ok(None) | Err(_) => break None,
        }
    };
    assert!(
        ended.is_some() && got < BIG,
        "reset after {got} bytes: {ended:?}"
    );
}

/// Opens an HTTP/2 stream for `GET /slow` on `client`, waits until the backend has it (the
/// proxy sent it upstream), then resets it. `Err` once the connection takes no more streams.
async fn open_and_reset(
    client: &mut h2::client::SendRequest<bytes::Bytes>,
    proxy: &Proxy,
    backend: &ScriptedBackend,
) -> Result<(), h2::Error> {
    let seen = backend.requests().len();
    let mut ready = client.clone().ready().await?;
    let req = http::Request::get(proxy.url("/slow")).body(()).unwrap();
    let (_answer, mut stream) = ready.send_request(req, true)?;
    *client = ready;
    let arrived = common::eventually(Duration::from_secs(5), || backend.requests().len() > seen);
    assert!(arrived.await, "the request reached the backend");
    stream.send_reset(h2::Reason::CANCEL);
    Ok(())
}

/// A backend that answers `/slow` after 10 s and anything else at once, and the proxy in
/// front of it with `route_keys`.
async fn slow_path_backend(route_keys: &str) -> (ScriptedBackend, Proxy) {
    let backend = ScriptedBackend::start(|r| async move {
        if r.uri.path() == "/slow" {
            tokio::time::sleep(Duration::from_secs(10)).await;
        }
        respond(200, &[], "ok")
    })
    .await;
    let proxy = Proxy::start(&route("/", route_keys), &backend.origin()).await;
    (backend, proxy)
}

/// The status of a `method` request for `url` on HTTP/2 connection `client`, waited for.
async fn h2_status(
    client: h2::client::SendRequest<bytes::Bytes>,
    method: &str,
    url: String,
) -> Result<http::StatusCode, h2::Error> {
    let mut ready = client.ready().await?;
    let req = http::Request::builder().method(method).uri(url);
    let (answer, _) = ready.send_request(req.body(()).unwrap(), true)?;
    answer.await.map(|a| a.status())
}

/// A client that resets each HTTP/2 request once the proxy has sent it upstream (the rapid
/// reset pattern, past h2's own guard, which counts only streams reset before they are
/// handed over) keeps the backend working on requests nobody waits for, thousands of them
/// from one connection. Past `MAX_RESETS` resets within `EARLY_RESET` of their request,
/// half of its requests or more, the connection gets a GOAWAY. A client that resets fewer,
/// or as many among more answered requests, or only after waiting a while, keeps it.
#[tokio::test]
async fn an_http2_client_resetting_its_requests_in_progress_is_sent_away() {
    let (backend, proxy) = slow_path_backend("").await;
    let answered =
        |client: &h2::client::SendRequest<_>| h2_status(client.clone(), "GET", proxy.url("/fast"));
    let max = ifmatch::activity::MAX_RESETS as usize;

    // Fewer resets than that: the connection stays.
    let mut client = common::h2_client(proxy.addr).await;
    for _ in 0..max - 1 {
        open_and_reset(&mut client, &proxy, &backend).await.unwrap();
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
    open_and_reset(&mut client, &proxy, &backend)
        .await
        .expect("still open after one reset fewer than the limit");

    // As many among more answered requests: the connection stays.
    let mut client = common::h2_client(proxy.addr).await;
    for _ in 0..max + 2 {
        assert_eq!(answered(&client).await.unwrap(), 200);
    }
    for _ in 0..max {
        open_and_reset(&mut client, &proxy, &backend).await.unwrap();
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
    let still = answered(&client).await;
    assert_eq!(still.expect("open: under half were reset"), 200);

    // As many reset after waiting past `EARLY_RESET`: the connection stays.
    let client = common::h2_client(proxy.addr).await;
    let before = backend.requests().len();
    let mut streams = Vec::new();
    for _ in 0..max {
        let mut ready = client.clone().ready().await.unwrap();
        let req = http::Request::get(proxy.url("/slow")).body(()).unwrap();
        streams.push(ready.send_request(req, true).unwrap());
    }
    let arrived = common::eventually(Duration::from_secs(5), || {
        backend.requests().len() == before + max
    });
    assert!(arrived.await);
    tokio::time::sleep(ifmatch::activity::EARLY_RESET + Duration::from_millis(100)).await;
    for (_, stream) in &mut streams {
        stream.send_reset(h2::Reason::CANCEL);
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
    let still = answered(&client).await;
    assert_eq!(still.expect("open: the resets came late"), 200);

    // A new connection resetting every request is sent away at the limit.
    let mut client = common::h2_client(proxy.addr).await;
    let before = backend.requests().len();
    let mut opened = 0;
    let refused = loop {
        if opened == 3 * max {
            break false;
        }
        match open_and_reset(&mut client, &proxy, &backend).await {
            Ok(()) => opened += 1,
            Err(_) => break true,
        }
        // The GOAWAY reaches the client's side of the connection between two requests.
        tokio::task::yield_now().await;
    };
    assert!(
        refused,
        "{opened} requests reset and the connection still open"
    );
    assert!(
        opened <= max + 5,
        "{opened} requests sent upstream before the GOAWAY"
    );
    assert_eq!(backend.requests().len() - before, opened);
    // The first connection, at its 100th reset, and this one: counted for operators.
    assert!(closed(&proxy, "rapid_reset", 2), "counted");
}

/// Requests the proxy answers itself (a TRACE refused, a 404, a 412 from a remembered tag)
/// cost the backend nothing: counted among a connection's requests, two of them after each
/// reset kept its resets under half, and hundreds of requests reset in flight reached the
/// backend from one connection. They are not counted.
#[tokio::test]
async fn requests_answered_without_the_backend_do_not_hide_a_client_resetting_the_rest() {
    let (backend, proxy) = slow_path_backend("").await;
    let trace =
        |client: &h2::client::SendRequest<_>| h2_status(client.clone(), "TRACE", proxy.url("/t"));
    let max = ifmatch::activity::MAX_RESETS as usize;
    let mut client = common::h2_client(proxy.addr).await;
    let mut opened = 0;
    let refused = 'cycles: loop {
        if opened == 3 * max {
            break false;
        }
        match open_and_reset(&mut client, &proxy, &backend).await {
            Ok(()) => opened += 1,
            Err(_) => break true,
        }
        for _ in 0..2 {
            match trace(&client).await {
                Ok(status) => assert_eq!(status, 501),
                Err(_) => break 'cycles true,
            }
        }
    };
    assert!(
        refused,
        "{opened} requests reset and the connection still open"
    );
    assert!(
        opened <= max + 5,
        "{opened} requests sent upstream before the GOAWAY"
    );
}

/// A request the backend failed to answer in time (504) still cost it a request: it counts
/// among the connection's requests, so a client whose backend is slow does not reach "half
/// reset" sooner for the requests it did not reset.
#[tokio::test]
async fn requests_the_backend_failed_count_among_a_connections_requests() {
    let (backend, proxy) = slow_path_backend("upstream_timeout = \"200ms\"").await;
    let max = ifmatch::activity::MAX_RESETS as usize;
    let mut client = common::h2_client(proxy.addr).await;
    let mut timed_out = tokio::task::JoinSet::new();
    for _ in 0..max + 2 {
        let (client, url) = (client.clone(), proxy.url("/slow"));
        timed_out.spawn(h2_status(client, "GET", url));
    }
    while let Some(status) = timed_out.join_next().await {
        assert_eq!(status.unwrap().unwrap(), 504);
    }
    for _ in 0..max {
        open_and_reset(&mut client, &proxy, &backend).await.unwrap();
    }
    // The GOAWAY, had it come, would be in by now: the next request still goes up.
    tokio::time::sleep(Duration::from_millis(100)).await;
    let seen = backend.requests().len();
    let ready = client.ready().await;
    let mut ready = ready.expect("open: under half of its requests were reset");
    let req = http::Request::get(proxy.url("/after")).body(()).unwrap();
    let _answer = ready.send_request(req, true).expect("open");
    let arrived = common::eventually(Duration::from_secs(5), || backend.requests().len() > seen);
    assert!(
        arrived.await,
        "the request after the resets reached the backend"
    );
}

/// A chunked write body hyper cannot read (a chunk size that is not hexadecimal, a chunk
/// longer than its size) gets a 400 whose detail says what was wrong with it, not only that
/// it "could not be read", and nothing reaches the backend.
#[tokio::test]
async fn a_broken_chunked_body_gets_a_400_that_says_what_broke() {
    let (backend, proxy) = proxy_with("").await;
    for (body, why) in [
        ("zz\r\nhello\r\n0\r\n\r\n", "chunk size"),
        ("2\r\nhello\r\n0\r\n\r\n", "chunk body"),
    ] {
        let head = "PUT /doc HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n";
        let rsp = raw(
            proxy.addr,
            format!("{head}{body}").into_bytes(),
            Duration::from_secs(2),
        )
        .await;
        assert_eq!(
            status_line(&rsp),
            "HTTP/1.1 400 Bad Request",
            "{body:?}: {rsp}"
        );
        let detail = rsp.split("\"detail\":").nth(1).unwrap_or("");
        assert!(detail.to_ascii_lowercase().contains(why), "{body:?}: {rsp}");
    }
    assert!(backend.requests().is_empty());
    // So does one that breaks after it began to stream upstream (past `max_tag_body`).
    let backend = ScriptedBackend::start(|_| async { respond(204, &[], "") }).await;
    let proxy = Proxy::start(&route("/", "max_tag_body = \"1KiB\""), &backend.origin()).await;
    let mut req =
        b"PUT /doc HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\nbb8\r\n".to_vec();
    req.extend(std::iter::repeat_n(b'x', 3000));
    req.extend(b"\r\n2\r\nhello\r\n0\r\n\r\n");
    let rsp = raw(proxy.addr, req, Duration::from_secs(5)).await;
    assert_eq!(status_line(&rsp), "HTTP/1.1 400 Bad Request", "{rsp}");
    let detail = rsp.split("\"detail\":").nth(1).unwrap_or("");
    assert!(detail.to_ascii_lowercase().contains("chunk body"), "{rsp}");
}

/// `ifmatch_malformed_requests_total` tells heads too large for the parser (431 or 414:
/// a client or attacker sending huge heads) from heads it could not parse (400: a broken
/// client), each under its own reason: an operator alerting on one must not see the other.
#[tokio::test]
async fn malformed_heads_are_counted_under_their_own_reason() {
    let (backend, proxy) = proxy_with("").await;
    let folded = b"GET /x HTTP/1.1\r\nHost: a\r\nX-A: 1\r\n folded\r\n\r\n".to_vec();
    for _ in 0..2 {
        let rsp = raw(proxy.addr, folded.clone(), Duration::from_secs(2)).await;
        assert!(status_line(&rsp).contains("400"), "{rsp}");
    }
    let huge = format!(
        "GET /x HTTP/1.1\r\nHost: a\r\nX-Huge: {}\r\n\r\n",
        "a".repeat(200_000)
    );
    let rsp = raw(proxy.addr, huge.into_bytes(), Duration::from_secs(2)).await;
    assert!(status_line(&rsp).contains("431"), "{rsp}");
    // Counted once each connection has ended, which the client may see first.
    let s = proxy.state.clone();
    let render = move || s.metrics.render(&s.tags, &s.memo, &s.budget);
    let want = [
        "\nifmatch_malformed_requests_total{reason=\"invalid\"} 2\n",
        "\nifmatch_malformed_requests_total{reason=\"too_large\"} 1\n",
    ];
    let counted = common::eventually(Duration::from_secs(5), || {
        let text = render();
        want.iter().all(|w| text.contains(w))
    })
    .await;
    assert!(counted, "{}", render());
    assert!(backend.requests().is_empty());
}

/// A backend answering 200, behind a proxy that takes bodies up to 1 KiB
/// (`max_request_body`) and reads them whole up to 256 bytes (`max_tag_body`).
async fn behind_a_1kib_limit() -> (ScriptedBackend, Proxy) {
    let backend = ScriptedBackend::start(|_| async { respond(200, &[], "ok") }).await;
    let proxy = Proxy::start_with(
        &route("/", "max_tag_body = 256"),
        &backend.origin(),
        "max_request_body = \"1KiB\"",
    )
    .await;
    (backend, proxy)
}

/// `max_request_body` is the largest body taken, not the first one refused: a body of
/// exactly that many bytes reaches the backend whole, declared up front or chunked (its
/// size known only as it streams, past a `max_tag_body` that stops it being read whole),
/// and one byte more is a 413.
#[tokio::test]
async fn a_body_of_exactly_the_limit_is_forwarded_declared_or_streamed() {
    let (backend, proxy) = behind_a_1kib_limit().await;
    let c = Client::new();
    let r = c.put(&proxy.url("/declared"), &[], vec![b'x'; 1024]).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(backend.last().body.len(), 1024);

    let chunked = chunked_put("/chunked", "Connection: close\r\n", 4, 256, b'y');
    let rsp = raw(proxy.addr, chunked, Duration::from_secs(3)).await;
    assert!(status_line(&rsp).contains(" 200 "), "{rsp}");
    assert_eq!(backend.last().body, vec![b'y'; 1024]);

    let r = c.put(&proxy.url("/over"), &[], vec![b'x'; 1025]).await;
    r.assert_problem(413);
}

/// A chunked body whose first `max_tag_body` and more, read before it streams, come to
/// exactly `max_request_body`: what follows is still over the limit (413), and the backend
/// is never given those first bytes as a whole body. (Sent up with the length read so far
/// as its `Content-Length`, it once reached the backend complete and was stored, and the
/// client was told 200 for a body cut short.)
#[tokio::test]
async fn a_chunked_body_read_to_exactly_the_limit_before_it_streams_is_still_cut_at_it() {
    let (backend, proxy) = behind_a_1kib_limit().await;
    let addr = proxy.addr;
    let rsp = tokio::task::spawn_blocking(move || {
        let mut s = TcpStream::connect(addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
        let mut first =
            b"PUT /doc HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n400\r\n".to_vec();
        first.extend(std::iter::repeat_n(b'a', 1024));
        first.extend_from_slice(b"\r\n");
        s.write_all(&first).unwrap();
        // The first chunk is read (past `max_tag_body`, up to the limit) before the rest.
        std::thread::sleep(Duration::from_millis(300));
        let _ = s.write_all(b"10\r\nbbbbbbbbbbbbbbbb\r\n0\r\n\r\n");
        let mut out = Vec::new();
        let mut buf = [0u8; 8192];
        while let Ok(n @ 1..) = s.read(&mut buf) {
            out.extend_from_slice(&buf[..n]);
        }
        String::from_utf8_lossy(&out).into_owned()
    })
    .await
    .unwrap();
    assert!(status_line(&rsp).contains(" 413 "), "{rsp}");
    // The upstream request may have begun (its head, chunked) before the byte over the
    // limit came: it is then cut off, and the backend's read of its body fails (recorded
    // empty here). What must never reach it is a body framed whole.
    let framed_whole = |r: &common::backend::Recorded| {
        r.headers.contains_key("content-length") || !r.body.is_empty()
    };
    assert!(
        !backend.requests().iter().any(framed_whole),
        "the backend was given a body cut short as whole: {:?}",
        backend
            .requests()
            .iter()
            .map(|r| (r.headers.clone(), r.body.len()))
            .collect::<Vec<_>>()
    );
}

/// A head a little over `max_header_bytes` gets the proxy's own 431 problem, which names
/// the limit, whatever the limit: hyper's read buffer must sit above it (here 32 KiB, over
/// hyper's 16 KiB floor), or hyper answers a bare 431 with no body and the client and the
/// access log never learn which limit it hit.
#[tokio::test]
async fn a_head_just_over_a_raised_limit_gets_the_proxys_problem_not_a_bare_431() {
    let (backend, proxy) = proxy_with("max_header_bytes = \"32KiB\"").await;
    let big = "a".repeat(40_000);
    let r = Client::new()
        .get(&proxy.url("/x"), &[("x-big", &big)])
        .await;
    let p = r.assert_problem(431);
    assert!(
        p["detail"].as_str().unwrap().contains("32768"),
        "names the limit: {p}"
    );
    assert!(backend.requests().is_empty());
}

/// Six clients (64 KiB receive buffers) each ask a binary with a 1 s send timeout and a
/// 16 MiB `upstream_read_buffer` for a `len`-byte body, sent untagged, and read it in reads
/// of up to `read` bytes 32 ms apart until the connection closes (`closing`: they ask for
/// the close; else it closes once idle); each body must arrive whole. With so large a read
/// buffer hyper holds megabytes of the response at a time, and the kernel refills the
/// socket's queue from them as fast as the client drains it. Returns the binary's log.
async fn steady_readers_of(len: usize, read: usize, closing: bool) -> Vec<String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let backend =
        ScriptedBackend::start(move |_| async move { respond(200, &[], vec![b'x'; len]) }).await;
    let config = format!(
        "[server]\nlisten = \"{{listen}}\"\nheader_read_timeout = \"1s\"\nupstream_read_buffer = \"16MiB\"\n[[route]]\nprefix = \"/\"\nupstream = \"{}\"\nmax_tag_body = \"64KiB\"\n",
        backend.origin()
    );
    let bin = common::binary::Binary::start(&config, &[]).await;
    let head = match closing {
        true => "GET /big HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n",
        false => "GET /big HTTP/1.1\r\nHost: a\r\n\r\n",
    };
    let clients: Vec<_> = (0..6)
        .map(|_| {
            let addr = bin.addr;
            tokio::spawn(async move {
                let socket = tokio::net::TcpSocket::new_v4().unwrap();
                socket.set_recv_buffer_size(64 * 1024).unwrap();
                let mut s = socket.connect(addr).await.unwrap();
                s.write_all(head.as_bytes()).await.unwrap();
                let mut got = Vec::with_capacity(len + 1024);
                let mut buf = vec![0u8; read];
                loop {
                    let next = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf));
                    match next.await.expect("a read within 5 s") {
                        Ok(0) | Err(_) => return got,
                        Ok(k) => got.extend_from_slice(&buf[..k]),
                    }
                    tokio::time::sleep(Duration::from_millis(32)).await;
                }
            })
        })
        .collect();
    for client in clients {
        let got = client.await.unwrap();
        assert!(got.starts_with(b"HTTP/1.1 200 "), "no response head");
        let head_end = got.windows(4).position(|w| w == b"\r\n\r\n").unwrap() + 4;
        assert_eq!(got.len() - head_end, len, "the body, whole");
    }
    bin.log()
}

/// The same while the proxy still has much of the response to write: the queue's length
/// then says nothing of the client's progress, and a reader taking ~1.5 MB/s was cut off
/// at a grace's end whenever the queue happened to stand no lower than when the grace
/// began. The bytes the client acknowledged say it: they only grow while it reads.
#[tokio::test]
async fn a_reader_draining_a_response_the_proxy_still_holds_is_not_cut_off_when_idle() {
    steady_readers_of(8_000_000, 48 * 1024, false).await;
}

/// A steady reader of a response still in flight, while no chunk of it moves for a whole
/// send timeout (hyper holds megabytes of one, and the kernel refills the socket from it as
/// the client reads), is not taken for one that stopped reading: the bytes it acknowledges
/// grow, whatever the queue's length says. Before, ~3 MB/s readers of 24 MB bodies were
/// cut off as stalled.
#[tokio::test]
async fn a_steady_reader_of_a_response_whose_chunks_stand_still_is_not_cut_off() {
    let log = steady_readers_of(24_000_000, 96 * 1024, true).await;
    let cut = "its client stopped reading";
    assert!(
        !log.iter().any(|l| l.contains(cut)),
        "a steady reader was cut off"
    );
}

/// An HTTP/2 client that reads nothing but whose receive buffer still has room (the
/// default) and pings now and then: its TCP stack acknowledges the proxy's PING acks, which
/// is not a client taking a response. Its idle connection is closed all the same, giving
/// back its `max_connections` slot.
#[tokio::test]
async fn a_client_that_pings_with_room_to_spare_does_not_keep_its_slot() {
    use tokio::io::AsyncWriteExt;
    let backend = ScriptedBackend::start(|_| async { respond(200, &[], "ok") }).await;
    let limits = "header_read_timeout = \"500ms\"\nmax_connections = 1";
    let proxy = Proxy::start_with(&route("/", ""), &backend.origin(), limits).await;
    let mut s = tokio::net::TcpStream::connect(proxy.addr).await.unwrap();
    let mut start = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
    start.extend_from_slice(&[0, 0, 0, 4, 0, 0, 0, 0, 0]); // SETTINGS, empty
    s.write_all(&start).await.unwrap();
    slot_given_back_while_it_pings(s, proxy.addr, 100, Duration::from_secs(8)).await;
}

/// A rapid-reset client that does not answer the PING of the GOAWAY it is sent (h2 sends
/// the final GOAWAY, which names the last stream it takes, only once that PING is acked;
/// the first one allows every stream) is closed all the same: else it goes on opening and
/// resetting requests, each sent upstream, for as long as it likes.
#[tokio::test]
async fn a_rapid_reset_client_that_ignores_the_goaway_s_ping_is_closed_all_the_same() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let (backend, proxy) = slow_path_backend("").await;
    let max = ifmatch::activity::MAX_RESETS as usize;
    let frame = |kind: u8, flags: u8, stream: u32, payload: &[u8]| {
        let mut f = (payload.len() as u32).to_be_bytes()[1..].to_vec();
        f.extend([kind, flags]);
        f.extend(stream.to_be_bytes());
        f.extend(payload);
        f
    };
    let tcp = tokio::net::TcpStream::connect(proxy.addr).await.unwrap();
    let (mut rd, mut wr) = tcp.into_split();
    let mut hello = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
    hello.extend(frame(4, 0, 0, &[]));
    wr.write_all(&hello).await.unwrap();
    // Reads the proxy's frames: acks its SETTINGS (nothing else), until it closes.
    let (acks, mut to_ack) = tokio::sync::mpsc::unbounded_channel::<()>();
    let mut reader = tokio::spawn(async move {
        let mut buf = Vec::new();
        let mut chunk = [0u8; 16384];
        loop {
            match rd.read(&mut chunk).await {
                Ok(0) | Err(_) => return,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
            while buf.len() >= 9 {
                let len = u32::from_be_bytes([0, buf[0], buf[1], buf[2]]) as usize;
                if buf.len() < 9 + len {
                    break;
                }
                if buf[3] == 4 && buf[4] & 1 == 0 {
                    let _ = acks.send(());
                }
                buf.drain(..9 + len);
            }
        }
    });
    let mut headers = vec![0x82, 0x86, 0x04, 5];
    headers.extend(b"/slow");
    headers.extend([0x01, 1, b'a']);
    let started = Instant::now();
    let mut opened = 0;
    let mut id = 1u32;
    while !reader.is_finished() && opened < 4 * max && started.elapsed() < Duration::from_secs(8) {
        while to_ack.try_recv().is_ok() {
            let _ = wr.write_all(&frame(4, 1, 0, &[])).await;
        }
        let seen = backend.requests().len();
        if wr.write_all(&frame(1, 0x5, id, &headers)).await.is_err() {
            // The proxy's reset of the connection, seen first by this write: the reader,
            // on this same thread, has not run since and sees it only on its next poll
            // (asserting at once failed on a loaded CI machine with the connection closed).
            let _ = tokio::time::timeout(Duration::from_secs(5), &mut reader).await;
            break;
        }
        // Each request reaches the backend in well under a millisecond; the bound is for a
        // loaded machine (a missed one ended the loop with the connection open, a false alarm).
        let arrived = common::eventually(Duration::from_secs(5), || {
            backend.requests().len() > seen || reader.is_finished()
        });
        if !arrived.await || reader.is_finished() {
            break;
        }
        opened += 1;
        let _ = wr.write_all(&frame(3, 0, id, &8u32.to_be_bytes())).await;
        id += 2;
    }
    // Closed within the grace after its GOAWAY (100 ms: a few more requests at most).
    assert!(
        reader.is_finished() && opened < 2 * max,
        "{opened} requests sent upstream and reset, the connection still open: {}",
        !reader.is_finished()
    );
    assert!(closed(&proxy, "rapid_reset", 1), "counted");
}
