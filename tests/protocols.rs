//! The conditional-write behaviour is the same on every protocol: HTTP/1.1, HTTP/2 with prior
//! knowledge (h2c), and both over TLS (HTTP/2 chosen by ALPN).

mod common;

use common::proxy::route;
use common::tls::{KeyType, Pki};
use common::{Backend, Client, Proxy};
use http::Version;

struct Case {
    name: &'static str,
    client: Client,
    version: Version,
    tls: bool,
}

fn cases(pki: &Pki) -> Vec<Case> {
    vec![
        Case {
            name: "HTTP/1.1",
            client: Client::new(),
            version: Version::HTTP_11,
            tls: false,
        },
        Case {
            name: "h2c",
            client: Client::h2(),
            version: Version::HTTP_2,
            tls: false,
        },
        Case {
            name: "HTTP/1.1 over TLS",
            client: Client::tls(&pki.ca_pem, false),
            version: Version::HTTP_11,
            tls: true,
        },
        Case {
            name: "h2 over TLS",
            client: Client::tls(&pki.ca_pem, true),
            version: Version::HTTP_2,
            tls: true,
        },
    ]
}

impl Case {
    /// A backend holding `/docs/a` = "v1", and a proxy in front of it with `routes`, on
    /// TLS if the case is.
    async fn start(&self, pki: &Pki, routes: &str) -> (Backend, Proxy) {
        let backend = Backend::start().await;
        backend.store.put("/docs/a", "v1");
        let extra = if self.tls {
            pki.server_toml()
        } else {
            String::new()
        };
        let proxy = Proxy::start_with(routes, &backend.origin(), &extra).await;
        (backend, proxy)
    }

    fn url(&self, proxy: &Proxy, path: &str) -> String {
        match self.tls {
            true => proxy.https_url(path),
            false => proxy.url(path),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_core_cases_behave_alike_on_every_protocol() {
    let pki = Pki::new("protocols", KeyType::EcdsaP256);
    for case in cases(&pki) {
        let (backend, proxy) = case.start(&pki, &route("/docs/", "")).await;
        let url = |p: &str| case.url(&proxy, p);
        let c = &case.client;
        let n = case.name;

        let r = c.get(&url("/docs/a"), &[]).await;
        assert_eq!((r.status, r.version), (200, case.version), "{n}");
        let tag = r.etag();
        assert_eq!(tag, proxy.tag_of("v1"), "{n}");
        let r = c.get(&url("/docs/a"), &[("if-none-match", &tag)]).await;
        assert_eq!(r.status, 304, "{n}");
        let r = c
            .put(&url("/docs/a"), &[("if-match", "\"stale\"")], "x")
            .await;
        assert_eq!(r.status, 412, "{n}");
        assert_eq!(
            backend.store.writes(),
            0,
            "{n}: the stale write was not forwarded"
        );
        let r = c.put(&url("/docs/a"), &[("if-match", &tag)], "v2").await;
        assert_eq!(r.status, 204, "{n}");
        assert_eq!(r.version, case.version, "{n}");

        let tag = c.get(&url("/docs/a"), &[]).await.etag();
        let before = backend.store.writes();
        let (won, lost) = common::client::race(c, &url("/docs/a"), &tag, 32, 0).await;
        assert_eq!((won, lost), (1, 31), "{n}");
        assert_eq!(backend.store.writes(), before + 1, "{n}");
    }
}

/// A HEAD that the proxy answers itself (404, 400, 412, 502) gets the problem's head and no
/// body on every protocol. hyper's HTTP/1 code leaves the body out by itself; over HTTP/2
/// it was sent, and clients (curl, python-h2, hyper) took the stream for a protocol error
/// and never saw the status.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_head_the_proxy_refuses_gets_the_problems_head_and_no_body_on_every_protocol() {
    let pki = Pki::new("protocols-head", KeyType::EcdsaP256);
    let dead = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        format!("http://{}", l.local_addr().unwrap())
    };
    for case in cases(&pki) {
        let routes = format!(
            "{}\n[[route]]\nprefix = \"/dead/\"\nupstream = \"{dead}\"\n",
            route("/docs/", "")
        );
        let (_backend, proxy) = case.start(&pki, &routes).await;
        let url = |p: &str| case.url(&proxy, p);
        let n = case.name;
        let asks = [
            ("/elsewhere", None, 404),
            ("/docs/a", Some("not a tag"), 400),
            ("/docs/a", Some("\"stale\""), 412),
            ("/dead/a", None, 502),
        ];
        for (path, if_match, status) in asks {
            let headers: Vec<(&str, &str)> =
                if_match.map(|t| ("if-match", t)).into_iter().collect();
            let r = case
                .client
                .try_send("HEAD", &url(path), &headers, bytes::Bytes::new())
                .await
                .unwrap_or_else(|e| panic!("{n}: HEAD {path}: {e}"));
            assert_eq!(r.status, status, "{n}: HEAD {path}");
            assert!(r.body.is_empty(), "{n}: HEAD {path}: {:?}", r.body);
            assert_eq!(
                r.header("content-type"),
                Some("application/problem+json"),
                "{n}: HEAD {path}"
            );
            // The length the GET's problem would have.
            let length: usize = r.header("content-length").unwrap().parse().unwrap();
            assert!(length > 0, "{n}: HEAD {path}");
        }
    }
}

/// A raw HTTP/2 (prior knowledge) connection to `addr`: its sender, and the connection's
/// task, which ends when the connection does.
async fn h2_connection(
    addr: std::net::SocketAddr,
) -> (
    hyper::client::conn::http2::SendRequest<http_body_util::Empty<bytes::Bytes>>,
    tokio::task::JoinHandle<hyper::Result<()>>,
) {
    let io = tokio::net::TcpStream::connect(addr).await.unwrap();
    let (sender, conn) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        hyper_util::rt::TokioIo::new(io),
    )
    .await
    .unwrap();
    (sender, tokio::spawn(conn))
}

async fn h2_get(
    sender: &mut hyper::client::conn::http2::SendRequest<http_body_util::Empty<bytes::Bytes>>,
    url: &str,
) -> u16 {
    use http_body_util::BodyExt;
    let req = http::Request::get(url)
        .body(http_body_util::Empty::new())
        .unwrap();
    let rsp = sender.send_request(req).await.unwrap();
    let status = rsp.status().as_u16();
    rsp.into_body().collect().await.unwrap();
    status
}

#[tokio::test]
async fn an_idle_http2_connection_is_closed_with_a_goaway_after_the_idle_timeout() {
    let backend = Backend::start().await;
    backend.store.put("/docs/a", "v1");
    let proxy = Proxy::start_with(
        &route("/docs/", ""),
        &backend.origin(),
        "header_read_timeout = \"500ms\"",
    )
    .await;
    let (mut sender, conn) = h2_connection(proxy.addr).await;
    assert_eq!(h2_get(&mut sender, &proxy.url("/docs/a")).await, 200);
    let idle_from = std::time::Instant::now();
    // hyper's client answers the server's keep-alive pings: only the proxy's idle timeout
    // can end this connection.
    let ended = tokio::time::timeout(std::time::Duration::from_secs(5), conn)
        .await
        .expect("the idle connection was closed")
        .unwrap();
    assert!(ended.is_ok(), "closed with a GOAWAY, not reset: {ended:?}");
    assert!(
        idle_from.elapsed() >= std::time::Duration::from_millis(400),
        "not before the idle timeout: {:?}",
        idle_from.elapsed()
    );
}

#[tokio::test]
async fn an_http2_request_in_flight_outlasts_the_idle_timeout() {
    let slow = common::ScriptedBackend::slow(std::time::Duration::from_millis(1500), "slow").await;
    let proxy = Proxy::start_with(
        &route("/", ""),
        &slow.origin(),
        "header_read_timeout = \"500ms\"",
    )
    .await;
    let (mut sender, conn) = h2_connection(proxy.addr).await;
    // Three times the idle timeout in flight, then idle: the answer arrives, then the close.
    assert_eq!(h2_get(&mut sender, &proxy.url("/x")).await, 200);
    assert!(!conn.is_finished(), "closed while a stream was open");
    let ended = tokio::time::timeout(std::time::Duration::from_secs(5), conn).await;
    assert!(ended.is_ok(), "closed once idle");
}

#[tokio::test]
async fn a_shutdown_lets_an_http2_request_in_flight_finish_then_closes_with_a_goaway() {
    let slow = common::ScriptedBackend::slow(std::time::Duration::from_millis(500), "slow").await;
    let proxy = Proxy::start(&route("/", ""), &slow.origin()).await;
    let url = proxy.url("/x");
    let (sender, conn) = h2_connection(proxy.addr).await;
    // A second handle: the client's connection would end by itself once none were left.
    let mut second = sender.clone();
    let in_flight = tokio::spawn(async move { h2_get(&mut second, &url).await });
    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    let drained = tokio::spawn(proxy.shutdown());
    assert_eq!(
        in_flight.await.unwrap(),
        200,
        "the request in flight was answered"
    );
    // At once, not when the drain gives up (5 s here).
    let ended = tokio::time::timeout(std::time::Duration::from_secs(2), conn)
        .await
        .expect("the connection was closed")
        .unwrap();
    assert!(ended.is_ok(), "closed with a GOAWAY, not reset: {ended:?}");
    tokio::time::timeout(std::time::Duration::from_secs(5), drained)
        .await
        .expect("the drain ended once the connection had")
        .unwrap();
    drop(sender);
}

/// An HTTP/1.1 keep-alive connection with nothing in flight is closed as soon as the proxy
/// stops, rather than holding the drain until `header_read_timeout` or the drain's limit.
#[tokio::test]
async fn a_shutdown_closes_an_idle_http1_keep_alive_connection_at_once() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let backend =
        common::ScriptedBackend::start(|_| async { common::backend::respond(200, &[], "ok") })
            .await;
    let proxy = Proxy::start_with(
        &route("/", ""),
        &backend.origin(),
        "header_read_timeout = \"30s\"",
    )
    .await;
    let mut s = tokio::net::TcpStream::connect(proxy.addr).await.unwrap();
    s.write_all(b"GET /x HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    while !got.ends_with(b"\r\n\r\nok") {
        let n = tokio::time::timeout(std::time::Duration::from_secs(5), s.read(&mut buf))
            .await
            .expect("the response came")
            .unwrap();
        assert!(n > 0, "closed before the response ended");
        got.extend_from_slice(&buf[..n]);
    }
    assert!(got.starts_with(b"HTTP/1.1 200"));
    let started = std::time::Instant::now();
    let drained = tokio::spawn(proxy.shutdown());
    // At once, not when the drain gives up (5 s here) or `header_read_timeout` (30 s) ends it.
    let n = tokio::time::timeout(std::time::Duration::from_secs(2), s.read(&mut buf))
        .await
        .expect("the idle connection was closed")
        .unwrap_or(0);
    assert_eq!(n, 0, "closed, with nothing more sent");
    tokio::time::timeout(std::time::Duration::from_secs(2), drained)
        .await
        .expect("the drain ended once the connection had")
        .unwrap();
    assert!(started.elapsed() < std::time::Duration::from_secs(2));
}

/// HTTP/2 runs several requests of one connection at once, each with its own future (the
/// connection keeps one spare box for them, `reuse`): each gets its own answer, and the
/// connection serves more after them.
#[tokio::test]
async fn http2_requests_at_once_on_one_connection_each_get_their_own_answer() {
    use http_body_util::BodyExt;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;
    const AT_ONCE: usize = 6;
    // The first AT_ONCE requests are answered only once all of them are at the backend:
    // they were in flight together.
    let barrier = Arc::new(tokio::sync::Barrier::new(AT_ONCE));
    let seen = Arc::new(AtomicUsize::new(0));
    let backend = common::ScriptedBackend::start(move |r| {
        let (barrier, seen) = (barrier.clone(), seen.clone());
        async move {
            if seen.fetch_add(1, Ordering::SeqCst) < AT_ONCE {
                let all = barrier.wait();
                if tokio::time::timeout(std::time::Duration::from_secs(5), all)
                    .await
                    .is_err()
                {
                    return common::backend::respond(500, &[], "not all at once");
                }
            }
            common::backend::respond(200, &[], format!("body of {}", r.uri.path()))
        }
    })
    .await;
    let proxy = Proxy::start(&route("/", ""), &backend.origin()).await;
    let (sender, _conn) = h2_connection(proxy.addr).await;
    let get = |path: String| {
        let (mut sender, url) = (sender.clone(), proxy.url(&path));
        async move {
            let req = http::Request::get(url)
                .body(http_body_util::Empty::new())
                .unwrap();
            let rsp = sender.send_request(req).await.unwrap();
            let (status, tag) = (rsp.status().as_u16(), rsp.headers().get("etag").cloned());
            let body = rsp.into_body().collect().await.unwrap().to_bytes();
            (path, status, tag, body)
        }
    };
    let tasks: Vec<_> = (0..AT_ONCE)
        .map(|i| tokio::spawn(get(format!("/d/{i}"))))
        .collect();
    let mut answers = Vec::new();
    for task in tasks {
        answers.push(task.await.unwrap());
    }
    let mut tags = std::collections::HashSet::new();
    for (path, status, tag, body) in answers {
        assert_eq!(status, 200, "{path}: {body:?}");
        assert_eq!(body, format!("body of {path}"));
        let tag = tag.expect("a strong ETag");
        assert!(tags.insert(tag), "{path}: a tag of its own");
    }
    let (path, status, _, body) = get("/d/after".into()).await;
    assert_eq!((status, body), (200, format!("body of {path}").into()));
}

/// `http2_max_concurrent_streams` bounds the requests one HTTP/2 connection has in flight:
/// the proxy announces it, so a client queues the rest, and each is served once a stream
/// frees. 128 by default (nginx's), which the 8 requests here would not reach.
#[tokio::test]
async fn an_http2_connection_has_at_most_its_configured_streams_in_flight() {
    use http_body_util::BodyExt;
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
    use std::sync::Arc;
    const SENT: usize = 8;
    // Requests wait at the backend until `open`: the count there is what is in flight.
    let (inflight, most, open) = (
        Arc::new(AtomicUsize::new(0)),
        Arc::new(AtomicUsize::new(0)),
        Arc::new(AtomicBool::new(false)),
    );
    let (i, m, o) = (inflight.clone(), most.clone(), open.clone());
    let backend = common::ScriptedBackend::start(move |r| {
        let (inflight, most, open) = (i.clone(), m.clone(), o.clone());
        async move {
            let now = inflight.fetch_add(1, Ordering::SeqCst) + 1;
            most.fetch_max(now, Ordering::SeqCst);
            let freed = common::eventually(std::time::Duration::from_secs(10), || {
                open.load(Ordering::SeqCst)
            });
            freed.await;
            inflight.fetch_sub(1, Ordering::SeqCst);
            common::backend::respond(200, &[], format!("body of {}", r.uri.path()))
        }
    })
    .await;
    let proxy = Proxy::start_with(
        &route("/", ""),
        &backend.origin(),
        "http2_max_concurrent_streams = 3",
    )
    .await;
    let (mut sender, _conn) = h2_connection(proxy.addr).await;
    // One exchange first, so that the client has the proxy's settings before the burst.
    open.store(true, Ordering::SeqCst);
    assert_eq!(h2_get(&mut sender, &proxy.url("/first")).await, 200);
    open.store(false, Ordering::SeqCst);
    most.store(0, Ordering::SeqCst);

    let tasks: Vec<_> = (0..SENT)
        .map(|n| {
            let (mut sender, url) = (sender.clone(), proxy.url(&format!("/d/{n}")));
            tokio::spawn(async move {
                let req = http::Request::get(url)
                    .body(http_body_util::Empty::new())
                    .unwrap();
                let rsp = sender.send_request(req).await.unwrap();
                let status = rsp.status().as_u16();
                (status, rsp.into_body().collect().await.unwrap().to_bytes())
            })
        })
        .collect();
    let three = common::eventually(std::time::Duration::from_secs(5), || {
        inflight.load(Ordering::SeqCst) >= 3
    });
    assert!(three.await, "three requests reach the backend");
    // Time for more to arrive, were they let through.
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    assert_eq!(
        inflight.load(Ordering::SeqCst),
        3,
        "no more than three in flight"
    );
    open.store(true, Ordering::SeqCst);
    for (n, task) in tasks.into_iter().enumerate() {
        let (status, body) = task.await.unwrap();
        assert_eq!((status, body), (200, format!("body of /d/{n}").into()));
    }
    assert_eq!(most.load(Ordering::SeqCst), 3);
}

/// An HTTP/2 stream reset with `NO_ERROR` ends hyper's request body as if it were complete
/// (hyper#3681). An upload of unknown length must not then be taken for a whole body: read
/// whole before the lock (up to `max_tag_body`), it would go up with the length of the half
/// that came; streamed upstream chunked (past it), it would be ended cleanly there. Either
/// way the backend would store the half. It is refused, or cut off, the document is
/// unchanged, and the URL's lock is free for the next writer at once.
#[tokio::test]
async fn an_http2_upload_reset_midway_is_not_stored_truncated() {
    use bytes::Bytes;
    // Read whole (the default `max_tag_body`), and streamed (past a tiny one).
    for (max_tag_body, streamed) in [("8MiB", false), ("8B", true)] {
        let backend = Backend::start().await;
        backend.store.put("/docs/a", "v1");
        let extra = format!("max_tag_body = \"{max_tag_body}\"");
        let proxy = Proxy::start(&route("/docs/", &extra), &backend.origin()).await;
        let tag = Client::h2().get(&proxy.url("/docs/a"), &[]).await.etag();
        for reason in [h2::Reason::NO_ERROR, h2::Reason::CANCEL] {
            let mut client = common::h2_client(proxy.addr).await;
            // No content-length.
            let req = http::Request::put(proxy.url("/docs/a"))
                .header("if-match", &tag)
                .body(())
                .unwrap();
            let (_rsp, mut stream) = client.send_request(req, false).unwrap();
            stream
                .send_data(Bytes::from_static(b"the first half of v2"), false)
                .unwrap();
            if streamed {
                // Until the backend has the request and the first chunk.
                let arrived = common::eventually(std::time::Duration::from_secs(5), || {
                    !proxy.state.locks.is_empty()
                });
                assert!(arrived.await, "{reason:?}: the write took its lock");
            }
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
            stream.send_reset(reason);
            let freed = common::eventually(std::time::Duration::from_secs(5), || {
                proxy.state.locks.is_empty()
            });
            assert!(freed.await, "{reason:?}: the lock is let go");
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
            assert_eq!(
                backend.store.get("/docs/a").as_deref(),
                Some(&b"v1"[..]),
                "{reason:?}, streamed {streamed}: the abandoned upload was not stored"
            );
        }
        let r = Client::h2()
            .put(&proxy.url("/docs/a"), &[("if-match", &tag)], "v2")
            .await;
        assert_eq!(r.status, 204, "the tag is still current");
    }
}

/// A streamed upload that waits for its URL's lock keeps what its client has sent of it in
/// its own stream's window, not in the whole connection's: the upload holding the lock, on
/// the same HTTP/2 connection, sends the rest of its body and is answered at once, not when
/// the waiter gives up at its `lock_timeout` (10 s). With hyper's default windows (1 MiB a
/// stream, 1 MiB the connection) the waiter's megabyte stalled the holder until then.
#[tokio::test]
async fn http2_uploads_queued_for_one_url_on_one_connection_do_not_stall_each_other() {
    use bytes::Bytes;
    use std::time::Duration;
    const MIB: usize = 1 << 20;
    let backend = Backend::start().await;
    backend.store.put("/docs/a", "v1");
    // A body declared past `max_tag_body` streams: one waiting for the lock is left unread.
    let proxy = Proxy::start(
        &route("/docs/", "max_tag_body = \"1KiB\""),
        &backend.origin(),
    )
    .await;
    let tag = Client::h2().get(&proxy.url("/docs/a"), &[]).await.etag();
    let put = |n: usize| {
        http::Request::put(proxy.url("/docs/a"))
            .header("if-match", &tag)
            .header("content-length", n)
            .body(())
            .unwrap()
    };
    let mut client = common::h2_client(proxy.addr).await;
    let (holder, mut holder_body) = client.send_request(put(4096 + 2 * MIB), false).unwrap();
    holder_body
        .send_data(Bytes::from(vec![b'a'; 4096]), false)
        .unwrap();
    let locked = common::eventually(Duration::from_secs(5), || !proxy.state.locks.is_empty());
    assert!(locked.await, "the first upload holds the URL's lock");
    let mut client = client.ready().await.unwrap();
    let (waiter, mut waiter_body) = client.send_request(put(2 * MIB), false).unwrap();
    waiter_body
        .send_data(Bytes::from(vec![b'b'; 2 * MIB]), true)
        .unwrap();
    // Time for the waiter's bytes to take what window they can.
    tokio::time::sleep(Duration::from_millis(300)).await;
    holder_body
        .send_data(Bytes::from(vec![b'a'; 2 * MIB]), true)
        .unwrap();
    let holder = tokio::time::timeout(Duration::from_secs(3), holder)
        .await
        .expect("the lock's holder is answered long before the waiter's lock_timeout")
        .unwrap();
    assert_eq!(holder.status(), 204);
    assert_eq!(
        backend.store.get("/docs/a").map(|b| b.len()),
        Some(4096 + 2 * MIB),
        "the holder's whole body was stored"
    );
    // The waiter then takes the lock, and its tag is no longer the document's.
    let waiter = tokio::time::timeout(Duration::from_secs(3), waiter)
        .await
        .expect("the waiter is answered once the lock is free")
        .unwrap();
    assert_eq!(waiter.status(), 412);
}

/// HTTP/2 clients split `Cookie` into several fields; an HTTP/1.1 backend gets them as one,
/// joined with "; " (RFC 9113 §8.2.3). An equal `Content-Length` repeated goes up once.
#[tokio::test]
async fn http2_fields_an_http1_backend_expects_once_reach_it_once() {
    use bytes::Bytes;
    let backend =
        common::ScriptedBackend::start(|_| async { common::backend::respond(200, &[], "ok") })
            .await;
    let proxy = Proxy::start(&route("/", ""), &backend.origin()).await;
    let mut client = common::h2_client(proxy.addr).await;
    let req = http::Request::post(proxy.url("/x"))
        .header("cookie", "a=1")
        .header("cookie", "b=2")
        .header("cookie", "c=3")
        .header("content-length", "2")
        .header("content-length", "2")
        .body(())
        .unwrap();
    let (rsp, mut stream) = client.send_request(req, false).unwrap();
    stream.send_data(Bytes::from_static(b"hi"), true).unwrap();
    assert_eq!(rsp.await.unwrap().status(), 200);
    let seen = backend.last();
    let all = |name: &str| -> Vec<String> {
        let values = seen.headers.get_all(name).iter();
        values.map(|v| v.to_str().unwrap().to_owned()).collect()
    };
    assert_eq!(all("cookie"), ["a=1; b=2; c=3"]);
    assert_eq!(all("content-length"), ["2"]);
    assert_eq!(seen.body, "hi");
}

/// No request goes up asking for an upgrade, so a backend's 101 is a broken answer: a 502
/// problem, over HTTP/1.1 and HTTP/2 alike (h2 has no 101; HTTP/1.1 would be switched to a
/// protocol nobody agreed on).
#[tokio::test]
async fn a_switch_of_protocols_nobody_asked_for_is_a_502() {
    let backend = common::faults::FaultyBackend::start(common::faults::Fault::Answer(
        b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: upgrade\r\n\r\n",
    ))
    .await;
    let proxy = Proxy::start(&route("/", ""), &backend.origin()).await;
    for c in [Client::new(), Client::h2()] {
        let r = c.get(&proxy.url("/ws"), &[]).await;
        let problem = r.assert_problem(502);
        assert!(
            problem["detail"].as_str().unwrap().contains("101"),
            "{problem}"
        );
    }
}

/// A 408 for one HTTP/2 upload that stalls is that stream's answer, not its connection's:
/// a request on another stream of the same connection, while the upload stalls and after
/// its 408 (and after the client sends the rest of it too late), is answered as usual. For
/// a body read whole before it is judged, and for one that streams to the backend.
#[tokio::test]
async fn an_http2_upload_that_stalls_gets_its_408_and_the_connection_serves_on() {
    use bytes::Bytes;
    for (max_tag_body, streamed) in [("8MiB", false), ("2B", true)] {
        let backend = Backend::start().await;
        backend.store.put("/docs/a", "v1");
        let extra = format!("upstream_timeout = \"300ms\"\nmax_tag_body = \"{max_tag_body}\"");
        let proxy = Proxy::start(&route("/docs/", &extra), &backend.origin()).await;
        let mut client = common::h2_client(proxy.addr).await;
        let req = http::Request::put(proxy.url("/docs/a")).body(()).unwrap();
        let (rsp, mut stream) = client.send_request(req, false).unwrap();
        stream
            .send_data(Bytes::from_static(b"half"), false)
            .unwrap();
        // Another stream of the connection while the upload stalls.
        let mut other = client.clone().ready().await.unwrap();
        let get = http::Request::get(proxy.url("/docs/a")).body(()).unwrap();
        let (during, _) = other.send_request(get, true).unwrap();
        assert_eq!(
            during.await.unwrap().status(),
            200,
            "{streamed}: a GET beside the upload"
        );
        let rsp = tokio::time::timeout(std::time::Duration::from_secs(5), rsp)
            .await
            .expect("the stalled upload is answered")
            .unwrap();
        assert_eq!(rsp.status(), 408, "streamed {streamed}");
        // The rest, too late: the stream is over, the connection is not.
        let _ = stream.send_data(Bytes::from_static(b" and the rest"), true);
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        let mut after = client
            .ready()
            .await
            .expect("the connection takes new streams");
        let get = http::Request::get(proxy.url("/docs/a")).body(()).unwrap();
        let (rsp, _) = after
            .send_request(get, true)
            .expect("a stream after the 408");
        assert_eq!(
            rsp.await.unwrap().status(),
            200,
            "{streamed}: a GET after the 408"
        );
        assert_eq!(backend.store.get("/docs/a").as_deref(), Some(&b"v1"[..]));
    }
}

/// `server.http2 = false` makes a plain listener speak HTTP/1.1 alone, as nginx's `http2
/// off`: a client with HTTP/2 prior knowledge has its connection closed without an answer,
/// and nothing reaches the backend. A reload (SIGHUP's) turns it off and on for new
/// connections; one already speaking HTTP/2 goes on doing so.
#[tokio::test]
async fn http2_turned_off_and_on_by_a_reload_applies_to_new_connections() {
    let backend =
        common::ScriptedBackend::start(|_| async { common::backend::respond(200, &[], "doc") })
            .await;
    let routes = route("/", "");
    let proxy = Proxy::start(&routes, &backend.origin()).await;
    let url = proxy.url("/doc");
    let text = |http2: bool| {
        let routes = routes.replace("{upstream}", &backend.origin());
        format!("[server]\nlisten = \"127.0.0.1:0\"\nhttp2 = {http2}\n{routes}")
    };
    let running = ifmatch::config::Config::parse(&text(true), "t.toml").unwrap();
    let dir = common::TempDir::new("http2-switch");
    let path = dir.join("ifmatch.toml");
    let reload = |http2: bool| {
        std::fs::write(&path, text(http2)).unwrap();
        ifmatch::lifecycle::reload(&path, &proxy.state, &running);
    };
    let (mut before, _conn) = h2_connection(proxy.addr).await;
    assert_eq!(h2_get(&mut before, &url).await, 200, "on by default");

    reload(false);
    let seen = backend.requests().len();
    let preface = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x00\x04\x00\x00\x00\x00\x00";
    let answer = common::raw_exchange(proxy.addr, preface).await;
    assert_eq!(
        answer, "",
        "an HTTP/2 preface is closed on without an answer"
    );
    let refused = Client::h2().try_send("GET", &url, &[], "").await;
    assert!(
        refused.is_err(),
        "HTTP/2 prior knowledge is refused: {refused:?}"
    );
    assert_eq!(
        backend.requests().len(),
        seen,
        "no HTTP/2 request was forwarded"
    );
    let metrics = proxy.state.render_metrics();
    assert!(
        metrics.contains("\nifmatch_malformed_requests_total{reason=\"invalid\"} 2\n"),
        "both prefaces counted as heads refused: {metrics}"
    );
    let r = Client::new().get(&url, &[]).await;
    assert_eq!(
        (r.status, r.version, r.text()),
        (200, Version::HTTP_11, "doc".to_owned())
    );
    assert_eq!(r.etag(), proxy.tag_of("doc"));
    assert_eq!(
        h2_get(&mut before, &url).await,
        200,
        "a connection speaking HTTP/2 before the reload goes on"
    );

    reload(true);
    let r = Client::h2().get(&url, &[]).await;
    assert_eq!((r.status, r.version), (200, Version::HTTP_2), "on again");
}

/// The h2 library reads an empty `content-length` as 0 (its number parser takes no digits
/// for zero) and lets the field through, alone or beside a `0`; hyper then finds no length
/// in it. Forwarded, an HTTP/1.1 backend would be sent `Content-Length: ` with no number, a
/// head it must refuse or may read its own way (RFC 9110 §8.6, RFC 9112 §6.3). Refused with
/// a 400 instead, and nothing reaches the backend.
#[tokio::test]
async fn an_http2_request_with_an_empty_content_length_is_refused_and_not_forwarded() {
    use std::sync::{Arc, Mutex};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let received = Arc::new(Mutex::new(Vec::<u8>::new()));
    let seen = received.clone();
    let origin = common::backend::raw_backend(move |mut s| {
        let seen = seen.clone();
        async move {
            let mut buf = [0u8; 4096];
            while let Ok(Ok(n @ 1..)) =
                tokio::time::timeout(std::time::Duration::from_millis(200), s.read(&mut buf)).await
            {
                seen.lock().unwrap().extend_from_slice(&buf[..n]);
            }
            let ok = b"HTTP/1.1 204 No Content\r\nconnection: close\r\n\r\n";
            let _ = s.write_all(ok).await;
        }
    })
    .await;
    let proxy = Proxy::start(&route("/", ""), &origin).await;
    let mut client = common::h2_client(proxy.addr).await;
    for (method, lengths) in [
        ("PUT", &[""][..]),
        ("PUT", &["", "0"]),
        ("GET", &[""]),
        ("DELETE", &[""]),
    ] {
        let mut req = http::Request::builder()
            .method(method)
            .uri(proxy.url("/docs/a"));
        for l in lengths {
            req = req.header("content-length", *l);
        }
        let (rsp, _) = client.send_request(req.body(()).unwrap(), true).unwrap();
        let rsp = rsp.await.unwrap();
        assert_eq!(
            rsp.status(),
            400,
            "{method} with content-length {lengths:?}"
        );
    }
    assert_eq!(
        String::from_utf8_lossy(&received.lock().unwrap()),
        "",
        "the backend got a request"
    );
}
