//! A backend that fails in every way a network peer can: the client gets a 502/504 problem
//! (or, once a response has started, a cleanly aborted one) within the configured timeouts,
//! a cut-short body is never tagged, and no fault leaves a URL's write lock held.

mod common;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::backend::{raw_backend, respond};
use common::faults::{Fault, FaultyBackend};
use common::proxy::route;
use common::{Client, Proxy, ScriptedBackend};

const ROUTE: &str = "upstream_timeout = \"300ms\"\nlock_timeout = \"100ms\"";

/// Every request kind against one fault: (status or aborted) and the state left behind.
async fn check(fault: Fault, want: u16) {
    let backend = FaultyBackend::start(fault).await;
    let proxy = Proxy::start(&route("/", ROUTE), &backend.origin()).await;
    let c = Client::new();
    let started = Instant::now();
    let cases: [(&str, &[(&str, &str)]); 4] = [
        ("GET", &[]),
        ("HEAD", &[]),
        ("PUT", &[]),                        // forwarded straight away
        ("PUT", &[("if-match", "\"tag\"")]), // the revalidation GET meets the fault
    ];
    for (method, headers) in cases {
        let r = c
            .try_send(method, &proxy.url("/doc"), headers, "body")
            .await;
        let streamed = method == "PUT" && headers.is_empty();
        let body_fault = matches!(
            fault,
            Fault::ResetMidBody | Fault::CutShort | Fault::StallBody
        );
        if streamed && body_fault {
            // A forwarded write's answer streams through: its head is already on its way
            // when the body fails, so the response is aborted, visibly.
            assert!(
                r.is_err(),
                "{fault:?} {method}: expected an aborted response, got {r:?}"
            );
        } else {
            let r = r.unwrap_or_else(|e| panic!("{fault:?} {method}: {e}"));
            if method == "HEAD" {
                // A HEAD answer has no body, even a problem one.
                assert_eq!(r.status, want, "{fault:?} HEAD");
                assert_eq!(r.header("content-type"), Some("application/problem+json"));
            } else {
                let p = r.assert_problem(want);
                let detail = p["detail"].as_str().unwrap();
                assert!(
                    detail.contains(&backend.addr.to_string()),
                    "{fault:?} {method}: {p}"
                );
            }
        }
        // A write that went up whole and got no answer at all keeps its URL locked for
        // `settle_timeout` (the route's `upstream_timeout` by default, 300 ms) in case the
        // backend lands it late, then lets go; every other fault's lets go at once.
        if matches!(fault, Fault::NoHeaders) && method == "PUT" && headers.is_empty() {
            assert!(
                !proxy.state.locks.is_empty(),
                "{fault:?} {method}: held while the backend may still land it"
            );
            let gone = common::eventually(Duration::from_secs(2), || proxy.state.locks.is_empty());
            assert!(
                gone.await,
                "{fault:?} {method}: lock left held past its settle"
            );
        } else {
            assert!(
                proxy.state.locks.is_empty(),
                "{fault:?} {method}: lock left held"
            );
        }
    }
    let key = common::proxy::key(&backend.origin(), "/doc");
    assert!(
        proxy.state.tags.get(&key).is_none(),
        "{fault:?}: nothing was tagged"
    );
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "{fault:?}: bounded by the timeouts"
    );
}

#[tokio::test]
async fn a_reset_before_the_response_head_is_a_502() {
    check(Fault::ResetBeforeHead, 502).await;
}

#[tokio::test]
async fn a_reset_in_the_middle_of_a_body_being_tagged_is_a_502() {
    check(Fault::ResetMidBody, 502).await;
}

#[tokio::test]
async fn a_body_cut_short_is_a_502_and_never_tagged() {
    check(Fault::CutShort, 502).await;
}

#[tokio::test]
async fn headers_that_never_come_are_a_504() {
    check(Fault::NoHeaders, 504).await;
}

#[tokio::test]
async fn a_body_that_stalls_while_being_tagged_is_a_504() {
    check(Fault::StallBody, 504).await;
}

/// The upstream timeout bounds the wait for each chunk, not the whole body.
#[tokio::test]
async fn a_slow_body_whose_every_chunk_comes_in_time_is_tagged_whole() {
    let backend = FaultyBackend::start(Fault::Trickle).await;
    let proxy = Proxy::start(&route("/", ROUTE), &backend.origin()).await;
    let started = Instant::now();
    let r = Client::new().get(&proxy.url("/doc"), &[]).await;
    assert!(
        started.elapsed() >= Duration::from_millis(400),
        "the body trickled"
    );
    assert_eq!(r.status, 200);
    assert_eq!(r.body, vec![b'x'; 1000]);
    assert_eq!(r.etag(), proxy.tag_of(vec![b'x'; 1000]));
}

#[tokio::test]
async fn an_answer_that_is_not_http_is_a_502() {
    check(Fault::NotHttp, 502).await;
}

/// Over the tagging limit the head is already on its way to the client when the fault hits:
/// the response must end in an error the client can see, not hang and not look complete.
#[tokio::test]
async fn a_transfer_coding_besides_chunked_is_a_502() {
    // Passed on, the gzip coding would be lost with the hop-by-hop field and its bytes
    // taken as the content itself (and tagged so).
    let gzip =
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\n\r\n5\r\n\x1f\x8bABC\r\n0\r\n\r\n";
    check(Fault::Answer(gzip), 502).await;
}

/// `Content-Length: 5` beside `Transfer-Encoding: chunked` and a chunked body of 20 bytes:
/// the chunks frame it (RFC 9112 §6.3), and the length must not go on with it.
const LENGTH_AND_CHUNKED: &[u8] = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n14\r\nHELLOhello-world-20b\r\n0\r\n\r\n";

#[tokio::test]
async fn a_response_with_a_length_and_chunks_is_sent_whole_as_its_chunks_frame_it() {
    let two_gets = b"GET /doc HTTP/1.1\r\nHost: a\r\n\r\nGET /doc HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n";
    let strong = b"HTTP/1.1 200 OK\r\nETag: \"v1\"\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n14\r\nHELLOhello-world-20b\r\n0\r\n\r\n";
    // Streamed (the backend's own strong tag) and tagged (read whole and hashed).
    for (answer, tagged) in [(&strong[..], false), (LENGTH_AND_CHUNKED, true)] {
        let backend = FaultyBackend::start(Fault::Answer(answer)).await;
        let proxy = Proxy::start(&route("/", ROUTE), &backend.origin()).await;
        let out = common::raw_exchange(proxy.addr, two_gets).await;
        assert_eq!(out.matches("HTTP/1.1 200 OK").count(), 2, "{out}");
        assert_eq!(
            out.matches("HELLOhello-world-20b").count(),
            2,
            "whole: {out}"
        );
        assert!(
            !out.to_ascii_lowercase().contains("content-length: 5\r\n"),
            "{out}"
        );
        if tagged {
            let tag = proxy.state.tag_key().tag_of(b"HELLOhello-world-20b");
            assert_eq!(
                Client::new().get(&proxy.url("/doc"), &[]).await.etag(),
                tag.to_string()
            );
        }
    }
}

#[tokio::test]
async fn trailers_of_a_streamed_body_reach_a_client_that_accepts_them() {
    let answer = b"HTTP/1.1 200 OK\r\nETag: \"v1\"\r\nTrailer: x-sum\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\nx-sum: 42\r\n\r\n";
    let backend = FaultyBackend::start(Fault::Answer(answer)).await;
    let proxy = Proxy::start(&route("/", ROUTE), &backend.origin()).await;
    let get = b"GET /doc HTTP/1.1\r\nHost: a\r\nTE: trailers\r\nConnection: close\r\n\r\n";
    let out = common::raw_exchange(proxy.addr, get).await;
    assert!(out.contains("\r\n0\r\nx-sum: 42\r\n\r\n"), "{out}");

    // A body the proxy tags is read whole and sent with a length, its trailers dropped:
    // they are not announced either.
    let tagged = b"HTTP/1.1 200 OK\r\nTrailer: x-sum\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\nx-sum: 42\r\n\r\n";
    let backend = FaultyBackend::start(Fault::Answer(tagged)).await;
    let proxy = Proxy::start(&route("/", ROUTE), &backend.origin()).await;
    let out = common::raw_exchange(proxy.addr, get)
        .await
        .to_ascii_lowercase();
    let head = &out[..out.find("\r\n\r\n").unwrap()];
    assert!(
        head.contains("etag:") && head.contains("content-length: 5"),
        "{out}"
    );
    assert!(!head.contains("trailer:"), "{out}");
}

/// A backend's trailers with a connection-specific field (`Keep-Alive`, `Connection`, which
/// RFC 9110 §6.5.1 does not allow there): HTTP/1.1 clients get only the trailers `Trailer`
/// announced, but h2 refuses to send such a field and reset the HTTP/2 client's stream after
/// the whole body, which it then saw cut off. They go, as in a head; the others reach it.
#[tokio::test]
async fn a_streamed_bodys_hop_by_hop_trailers_do_not_cut_an_http2_response() {
    let answer = b"HTTP/1.1 200 OK\r\nETag: \"v1\"\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\nx-sum: 42\r\nKeep-Alive: timeout=5\r\nConnection: x-secret\r\nX-Secret: 1\r\n\r\n";
    let backend = FaultyBackend::start(Fault::Answer(answer)).await;
    let proxy = Proxy::start(&route("/", ROUTE), &backend.origin()).await;
    let mut h2 = common::h2_client(proxy.addr).await;
    let req = http::Request::get(proxy.url("/doc")).body(()).unwrap();
    let (rsp, _) = h2.send_request(req, true).unwrap();
    let mut body = rsp.await.unwrap().into_body();
    let mut got = Vec::new();
    while let Some(chunk) = body.data().await {
        got.extend_from_slice(&chunk.expect("the body is not cut off"));
    }
    assert_eq!(got, b"hello");
    let trailers = body.trailers().await.expect("the stream ends cleanly");
    let names: Vec<_> = trailers.iter().flat_map(|t| t.keys()).collect();
    assert_eq!(names, ["x-sum"], "{trailers:?}");
}

#[tokio::test]
async fn a_streamed_body_that_fails_aborts_the_response_cleanly() {
    for fault in [Fault::ResetMidBody, Fault::CutShort, Fault::StallBody] {
        let backend = FaultyBackend::start(fault).await;
        let proxy = Proxy::start(
            &route("/", "upstream_timeout = \"300ms\"\nmax_tag_body = \"100B\""),
            &backend.origin(),
        )
        .await;
        let started = Instant::now();
        let r = Client::new()
            .try_send("GET", &proxy.url("/big"), &[], "")
            .await;
        assert!(
            r.is_err(),
            "{fault:?}: the client must see the abort, got {r:?}"
        );
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "{fault:?}: no hang"
        );
        assert!(proxy.state.tags.is_empty(), "{fault:?}: nothing recorded");
    }
}

/// A backend whose GETs or writes take `delay`; it counts the writes it receives.
async fn slow(get_delay: Duration, write_delay: Duration) -> (ScriptedBackend, Arc<AtomicUsize>) {
    let writes = Arc::new(AtomicUsize::new(0));
    let w = writes.clone();
    let backend = ScriptedBackend::start(move |r| {
        let w = w.clone();
        async move {
            if r.method == "GET" {
                tokio::time::sleep(get_delay).await;
                respond(200, &[], "doc")
            } else {
                w.fetch_add(1, Ordering::SeqCst);
                tokio::time::sleep(write_delay).await;
                respond(204, &[], "")
            }
        }
    })
    .await;
    (backend, writes)
}

/// Sends a request and gives up (drops the connection) after `after`.
async fn abandon(url: String, headers: Vec<(&'static str, String)>, after: Duration) {
    let c = Client::new();
    let h: Vec<(&str, &str)> = headers.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let r = tokio::time::timeout(after, c.try_send("PUT", &url, &h, "abandoned")).await;
    assert!(r.is_err(), "the request should still have been running");
}

/// Under `upstream_max_connections`, a write whose client leaves while it waits for a turn
/// at the backend has not been sent: like one that leaves while waiting for the URL's lock,
/// it is never forwarded, and nothing is left to settle. It was: the exchange ran on in a
/// task of its own, kept the URL locked, counted as settling (a stop waited for it), and
/// sent the write once the turn came, after its client had gone.
#[tokio::test]
async fn a_client_that_leaves_while_waiting_for_a_turn_at_the_backend_is_never_forwarded() {
    // A write that would settle after a 504, and one that would not.
    for settle in ["", "settle_timeout = \"0s\""] {
        a_client_leaves_while_waiting_for_a_turn(settle).await;
    }
}

async fn a_client_leaves_while_waiting_for_a_turn(settle: &str) {
    let backend = ScriptedBackend::start(|r| async move {
        if r.uri.path() == "/slow" {
            tokio::time::sleep(Duration::from_millis(1000)).await;
        }
        respond(if r.method == "PUT" { 204 } else { 200 }, &[], "")
    })
    .await;
    let proxy = Proxy::start_with(
        &route("/", settle),
        &backend.origin(),
        "upstream_max_connections = 1\nconnect_timeout = \"3s\"",
    )
    .await;
    let slow = {
        let url = proxy.url("/slow");
        tokio::spawn(async move { Client::new().get(&url, &[]).await.status })
    };
    let sent = || backend.requests().iter().any(|r| r.uri.path() == "/slow");
    assert!(common::eventually(Duration::from_secs(5), sent).await);
    abandon(proxy.url("/doc"), vec![], Duration::from_millis(300)).await;
    assert_eq!(slow.await.unwrap(), 200);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let puts = backend
        .requests()
        .iter()
        .filter(|r| r.method == "PUT")
        .count();
    assert_eq!(
        puts, 0,
        "{settle:?}: the abandoned write was never sent, and is not sent now"
    );
    assert_eq!(proxy.state.settling.count(), 0, "nothing left to settle");
    assert!(proxy.state.locks.is_empty());
}

#[tokio::test]
async fn a_client_that_leaves_while_waiting_for_the_lock_leaves_nothing_behind() {
    let (backend, writes) = slow(Duration::ZERO, Duration::from_millis(600)).await;
    let proxy = Proxy::start(&route("/", "lock_timeout = \"5s\""), &backend.origin()).await;
    let url = proxy.url("/doc");
    let holder = {
        let url = url.clone();
        tokio::spawn(async move { Client::new().put(&url, &[], "first").await.status })
    };
    tokio::time::sleep(Duration::from_millis(100)).await;
    abandon(url.clone(), vec![], Duration::from_millis(100)).await;
    assert_eq!(holder.await.unwrap(), 204);
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(
        writes.load(Ordering::SeqCst),
        1,
        "the abandoned write was never forwarded"
    );
    assert!(proxy.state.locks.is_empty());
}

#[tokio::test]
async fn a_client_that_leaves_during_revalidation_frees_the_lock_at_once() {
    let (backend, writes) = slow(Duration::from_millis(1500), Duration::ZERO).await;
    let proxy = Proxy::start(&route("/", "lock_timeout = \"200ms\""), &backend.origin()).await;
    let url = proxy.url("/doc");
    abandon(
        url.clone(),
        vec![("if-match", "\"t\"".into())],
        Duration::from_millis(100),
    )
    .await;
    // The next write must not wait for the abandoned one's revalidation GET.
    let r = Client::new().put(&url, &[], "next").await;
    assert_eq!(r.status, 204, "{}", r.text());
    assert_eq!(writes.load(Ordering::SeqCst), 1);
    assert!(proxy.state.locks.is_empty());
}

#[tokio::test]
async fn a_client_that_leaves_while_the_backend_answers_frees_the_lock_once_it_has() {
    // The write was sent: the backend may still carry it out, so the next writer waits for
    // its answer (`tests/concurrency.rs` shows the lost update this prevents), and no longer.
    let (backend, writes) = slow(Duration::ZERO, Duration::from_millis(1500)).await;
    let proxy = Proxy::start(&route("/", "lock_timeout = \"200ms\""), &backend.origin()).await;
    let url = proxy.url("/doc");
    let sent = Instant::now();
    abandon(url.clone(), vec![], Duration::from_millis(200)).await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(
        !proxy.state.locks.is_empty(),
        "held while the backend works"
    );
    let r = Client::new().put(&url, &[], "next").await;
    r.assert_problem(503);
    assert!(
        common::eventually(Duration::from_secs(3), || proxy.state.locks.is_empty()).await,
        "the abandoned write's lock is gone once the backend has answered"
    );
    assert!(sent.elapsed() >= Duration::from_millis(1500));
    assert_eq!(writes.load(Ordering::SeqCst), 1);
    let r = Client::new().put(&url, &[], "next").await;
    assert_eq!(r.status, 204, "{}", r.text());
}

/// A body that pauses longer than `header_read_timeout` between chunks, but within
/// `upstream_timeout`, waits on the backend, not on the client: the connection is not cut
/// off as one whose client stopped reading would be, and the body arrives whole. Here the
/// pause comes before the proxy has sent the head (the body not yet past `max_tag_body`).
#[tokio::test]
async fn a_streamed_body_waiting_on_a_slow_backend_is_not_taken_for_a_stalled_client() {
    paused_body(1000, 1000, &[(Client::new(), "HTTP/1.1")]).await;
}

/// The same, once the response is streaming to the client (its head sent, its body past
/// `max_tag_body`): a pause of the backend's longer than `header_read_timeout` is still not
/// the client's. Over HTTP/2 the connection is idle between frames while the stream waits.
#[tokio::test]
async fn a_response_streaming_when_its_backend_pauses_is_not_taken_for_a_stalled_client() {
    let clients = [(Client::new(), "HTTP/1.1"), (Client::h2(), "HTTP/2")];
    paused_body(2000, 1000, &clients).await;
}

/// GETs through a route with a 1 KiB `max_tag_body`, `header_read_timeout` 1 s, of a body
/// the backend sends as `before` bytes, a pause of 2.5 s, then `after` bytes: each client
/// gets all of it.
async fn paused_body(before: usize, after: usize, clients: &[(Client, &str)]) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let origin = raw_backend(move |mut s| async move {
        let mut buf = [0u8; 4096];
        let _ = s.read(&mut buf).await;
        let head = format!(
            "HTTP/1.1 200 OK\r\ncontent-length: {}\r\n\r\n",
            before + after
        );
        let _ = s.write_all(head.as_bytes()).await;
        let _ = s.write_all(&vec![b'a'; before]).await;
        tokio::time::sleep(Duration::from_millis(2500)).await;
        let _ = s.write_all(&vec![b'b'; after]).await;
    })
    .await;
    let proxy = common::Proxy::start_with(
        &route("/", "upstream_timeout = \"5s\"\nmax_tag_body = \"1KiB\""),
        &origin,
        "header_read_timeout = \"1s\"",
    )
    .await;
    for (client, name) in clients {
        let r = client.try_send("GET", &proxy.url("/slow"), &[], "").await;
        let r = r.unwrap_or_else(|e| panic!("{name}: cut off: {e}"));
        assert_eq!((r.status, r.body.len()), (200, before + after), "{name}");
    }
}

/// Sends a streamed PUT (declared length over `max_tag_body`, so not read whole first) of
/// `chunks` × 1000 bytes, one every 100 ms, then waits for the proxy to answer and close.
async fn trickled_put(proxy: &Proxy, declared: usize, chunks: usize) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(proxy.addr).await.unwrap();
    let head = format!(
        "PUT /doc HTTP/1.1\r\nHost: a\r\nContent-Length: {declared}\r\nConnection: close\r\n\r\n"
    );
    s.write_all(head.as_bytes()).await.unwrap();
    for _ in 0..chunks {
        if s.write_all(&[b'a'; 1000]).await.is_err() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let mut out = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut out)).await;
    String::from_utf8_lossy(&out).into_owned()
}

#[tokio::test]
async fn a_slow_upload_is_timed_by_its_chunks_not_taken_for_a_slow_backend() {
    let backend = ScriptedBackend::start(|_| async { respond(204, &[], "") }).await;
    let limits = "upstream_timeout = \"1s\"\nmax_tag_body = \"1KiB\"";
    let proxy = Proxy::start(&route("/", limits), &backend.origin()).await;

    // 20 KB over 2 s, twice the timeout, each chunk well within it: the backend gets all
    // of it and answers. On a new upstream connection, then on the one kept from it.
    for (i, chunks) in [20, 15].into_iter().enumerate() {
        let out = trickled_put(&proxy, chunks * 1000, chunks).await;
        assert!(out.starts_with("HTTP/1.1 204"), "{out}");
        assert_eq!(backend.requests()[i].body.len(), chunks * 1000);
    }
    assert_eq!(
        backend.connections(),
        1,
        "the second upload went on the kept connection"
    );

    // One that stops sending halfway is still cut off, one timeout after its last chunk,
    // and as the client's doing (408, nginx's `client_body_timeout`), not the backend's.
    let started = Instant::now();
    let out = trickled_put(&proxy, 20_000, 5).await;
    let took = started.elapsed();
    assert!(out.starts_with("HTTP/1.1 408"), "{out}");
    assert!(out.contains("application/problem+json"), "{out}");
    assert!(took < Duration::from_secs(3), "cut off after {took:?}");
    assert!(proxy.state.locks.is_empty());
    assert_eq!(backend.requests().len(), 2, "the cut upload got no answer");
}

/// The other side of the same timer: a backend that stops taking an upload the client keeps
/// sending is the backend's fault, a 504.
#[tokio::test]
async fn an_upload_the_backend_stops_taking_is_a_504() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    // Reads the head and a little, then neither reads nor answers for 20 s.
    let origin = raw_backend(|mut s| async move {
        let mut buf = [0u8; 4096];
        let _ = s.read(&mut buf).await;
        tokio::time::sleep(Duration::from_secs(20)).await;
    })
    .await;
    let limits = "upstream_timeout = \"1s\"\nmax_tag_body = \"1KiB\"";
    let proxy = Proxy::start(&route("/", limits), &origin).await;

    // 48 MiB, as fast as the proxy takes it: more than the sockets between it and the
    // backend hold, so the proxy stops with chunks in hand, not waiting for more.
    const DECLARED: usize = 48 << 20;
    let s = tokio::net::TcpStream::connect(proxy.addr).await.unwrap();
    let (mut rx, mut tx) = s.into_split();
    let sender = tokio::spawn(async move {
        let head = format!(
            "PUT /doc HTTP/1.1\r\nHost: a\r\nContent-Length: {DECLARED}\r\nConnection: close\r\n\r\n"
        );
        tx.write_all(head.as_bytes()).await?;
        let chunk = vec![b'a'; 64 << 10];
        for _ in 0..DECLARED / chunk.len() {
            tx.write_all(&chunk).await?;
        }
        std::io::Result::Ok(())
    });
    let started = Instant::now();
    // The answer, then the end of the connection: its upload can never be finished.
    let mut out = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(10), rx.read_to_end(&mut out)).await;
    let took = started.elapsed();
    sender.abort();
    let out = String::from_utf8_lossy(&out);
    assert!(out.starts_with("HTTP/1.1 504"), "{out}");
    assert!(took < Duration::from_secs(5), "cut off after {took:?}");
    assert!(proxy.state.locks.is_empty());
}

/// Reads from `s` into `buf` until `found` finds where what is wanted ends in it (that
/// offset), or the connection ends (`None`).
async fn read_until(
    s: &mut tokio::net::TcpStream,
    buf: &mut Vec<u8>,
    found: impl Fn(&[u8]) -> Option<usize>,
) -> Option<usize> {
    use tokio::io::AsyncReadExt;
    let mut chunk = [0u8; 4096];
    loop {
        if let Some(end) = found(buf) {
            return Some(end);
        }
        match s.read(&mut chunk).await {
            Ok(0) | Err(_) => return None,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    }
}

/// One short answer read from `c`: its head, and for a 200 its body, `ok`.
async fn short_answer(c: &mut tokio::net::TcpStream) -> String {
    let mut got = Vec::new();
    let whole = |b: &[u8]| {
        let ok = !b.starts_with(b"HTTP/1.1 200") || b.ends_with(b"ok");
        head_end(b).filter(|_| ok)
    };
    let read = tokio::time::timeout(Duration::from_secs(5), read_until(c, &mut got, whole));
    let end = read.await.expect("answered");
    assert!(end.is_some(), "the connection was closed after {got:?}");
    String::from_utf8_lossy(&got).into_owned()
}

/// Where a request or response head ends in `buf`, once it has all of it.
fn head_end(buf: &[u8]) -> Option<usize> {
    buf.windows(4).position(|w| w == b"\r\n\r\n").map(|i| i + 4)
}

/// A backend that sends a response no request asked for after its answer (in the same
/// write, or a moment later while the connection is idle) never has it taken for the answer
/// to the next request sent on that connection: that client would get a response made for
/// nobody (response-queue poisoning). The connection is found spoilt and not used again,
/// so each GET gets its own answer. (One planted at the very moment a pooled connection is
/// given a request stays a race no HTTP/1.1 proxy can close: the requests here are 300 ms
/// apart.)
#[tokio::test]
async fn a_response_no_request_asked_for_never_answers_the_next_request() {
    use tokio::io::AsyncWriteExt;
    const PLANTED: &str = "HTTP/1.1 200 OK\r\nContent-Length: 7\r\n\r\nplanted";
    for pause in [None, Some(Duration::from_millis(50))] {
        let origin = raw_backend(move |mut s| async move {
            let mut buf = Vec::new();
            while let Some(end) = read_until(&mut s, &mut buf, head_end).await {
                let head = String::from_utf8_lossy(&buf[..end]).into_owned();
                buf.drain(..end);
                // The path, as the body: "/a" answers "/a".
                let path = head.split(' ').nth(1).unwrap_or("?").to_owned();
                let mut answer = format!(
                    "HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n{path}",
                    path.len()
                );
                if pause.is_none() {
                    answer.push_str(PLANTED);
                }
                if s.write_all(answer.as_bytes()).await.is_err() {
                    return;
                }
                if let Some(pause) = pause {
                    tokio::time::sleep(pause).await;
                    if s.write_all(PLANTED.as_bytes()).await.is_err() {
                        return;
                    }
                }
            }
        })
        .await;
        let proxy = Proxy::start(&route("/", ""), &origin).await;
        let c = Client::new();
        for n in 0..6 {
            let path = format!("/doc{n}");
            let r = c.get(&proxy.url(&path), &[]).await;
            assert_eq!(
                (r.status, r.text()),
                (200, path.clone()),
                "{pause:?}: GET {path}"
            );
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
    }
}

/// A body in one-byte chunks (a hostile or odd backend) is held copied together past its
/// first chunks (`body::hold`), and still goes out whole under the tag of its bytes.
#[tokio::test]
async fn a_body_of_tiny_chunks_goes_out_whole_under_its_tag() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    const LEN: usize = 3000;
    let body: Vec<u8> = (0..LEN).map(|i| b'a' + (i % 26) as u8).collect();
    let sent = body.clone();
    let origin = raw_backend(move |mut s| {
        let body = sent.clone();
        async move {
            let mut buf = [0u8; 4096];
            let _ = s.read(&mut buf).await;
            let mut out = b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n".to_vec();
            for b in &body {
                out.extend_from_slice(b"1\r\n");
                out.push(*b);
                out.extend_from_slice(b"\r\n");
            }
            out.extend_from_slice(b"0\r\n\r\n");
            let _ = s.write_all(&out).await;
            let _ = s.shutdown().await;
        }
    })
    .await;
    let proxy = Proxy::start(&route("/", ""), &origin).await;
    let r = Client::new().get(&proxy.url("/tiny"), &[]).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.body, body);
    assert_eq!(r.etag(), proxy.tag_of(&body));
}

/// A backend that speaks HTTP/1.0 (`python3 -m http.server`, old appliances) answers one
/// request per connection. The HTTP version is hop-by-hop: the proxy's HTTP/1.1 client
/// still gets HTTP/1.1 answers on a connection kept open, not the backend's 1.0 and a close.
#[tokio::test]
async fn an_http_1_0_backend_does_not_make_the_client_connection_http_1_0() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let origin = raw_backend(|mut s| async move {
        let mut buf = [0u8; 4096];
        let n = s.read(&mut buf).await.unwrap_or(0);
        let answer: &[u8] = if buf[..n].starts_with(b"GET ") {
            b"HTTP/1.0 200 OK\r\nContent-Length: 2\r\n\r\nok"
        } else {
            b"HTTP/1.0 204 No Content\r\n\r\n"
        };
        let _ = s.write_all(answer).await;
        let _ = s.shutdown().await;
    })
    .await;
    let proxy = Proxy::start(&route("/", ""), &origin).await;
    let mut c = tokio::net::TcpStream::connect(proxy.addr).await.unwrap();
    let requests = [
        "GET /a HTTP/1.1\r\nHost: a\r\n\r\n",
        "PUT /a HTTP/1.1\r\nHost: a\r\nContent-Length: 1\r\n\r\nx",
        "GET /a HTTP/1.1\r\nHost: a\r\n\r\n",
    ];
    for (i, req) in requests.iter().enumerate() {
        c.write_all(req.as_bytes()).await.unwrap();
        let text = short_answer(&mut c).await.to_ascii_lowercase();
        assert!(text.starts_with("http/1.1 "), "request {i}: {text}");
        assert!(!text.contains("connection: close"), "request {i}: {text}");
    }
}

/// After an HTTP/1.0 response, hyper sends the connection's next request as HTTP/1.0 too
/// (RFC 9112 §2.5: a 1.0 peer is not known to read 1.1 framing), and a body of unknown
/// length, which HTTP/1.0 cannot frame, went up as no body at all: a backend that keeps
/// 1.0 connections alive got `PUT /doc HTTP/1.0` and nothing else, stored an empty document
/// and said 204. Such a connection is not reused, so every request goes up as HTTP/1.1.
#[tokio::test]
async fn a_chunked_write_after_an_http_1_0_keep_alive_answer_keeps_its_body() {
    use tokio::io::AsyncWriteExt;
    let received = Arc::new(std::sync::Mutex::new(Vec::<u8>::new()));
    let log = received.clone();
    let origin = raw_backend(move |mut s| {
        let log = log.clone();
        async move {
            let mut buf = Vec::new();
            loop {
                // One request: its head, then its body as its head frames it.
                let Some(head_end) = read_until(&mut s, &mut buf, head_end).await else {
                    return;
                };
                let head = String::from_utf8_lossy(&buf[..head_end]).to_ascii_lowercase();
                let length = head
                    .lines()
                    .find_map(|l| l.strip_prefix("content-length: "))
                    .and_then(|n| n.trim().parse::<usize>().ok());
                let body_end = |b: &[u8]| match length {
                    _ if head.contains("transfer-encoding: chunked") => b[head_end..]
                        .windows(5)
                        .position(|w| w == b"0\r\n\r\n")
                        .map(|i| head_end + i + 5),
                    Some(n) => (b.len() >= head_end + n).then_some(head_end + n),
                    None => Some(head_end),
                };
                let Some(end) = read_until(&mut s, &mut buf, body_end).await else {
                    return;
                };
                log.lock().unwrap().extend_from_slice(&buf[..end]);
                let answer: &[u8] = if head.starts_with("get ") {
                    b"HTTP/1.0 200 OK\r\nConnection: keep-alive\r\nContent-Length: 2\r\n\r\nok"
                } else {
                    b"HTTP/1.0 204 No Content\r\nConnection: keep-alive\r\n\r\n"
                };
                buf.drain(..end);
                if s.write_all(answer).await.is_err() {
                    return;
                }
            }
        }
    })
    .await;
    let proxy = Proxy::start(&route("/", ""), &origin).await;
    let mut c = tokio::net::TcpStream::connect(proxy.addr).await.unwrap();
    let mut exchange = async |req: &[u8]| {
        c.write_all(req).await.unwrap();
        short_answer(&mut c).await
    };
    let got = exchange(b"GET /doc HTTP/1.1\r\nHost: a\r\n\r\n").await;
    assert!(got.starts_with("HTTP/1.1 200"), "{got}");
    let got = exchange(
        b"PUT /doc HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n\
          1b\r\nimportant document contents\r\n0\r\n\r\n",
    )
    .await;
    assert!(got.starts_with("HTTP/1.1 204"), "{got}");
    let received = String::from_utf8_lossy(&received.lock().unwrap()).into_owned();
    assert!(
        received.contains("important document contents"),
        "the backend never got the body:\n{received}"
    );
    assert!(
        !received.contains("HTTP/1.0\r\n"),
        "a request went up as HTTP/1.0:\n{received}"
    );
}

/// Not reusing a connection after an HTTP/1.0 answer must not cut that answer's own body:
/// the connection is let go once the body is read, not torn down at its head. A body that
/// streams in slowly (over `max_tag_body`, so sent on as it comes) arrives whole.
#[tokio::test]
async fn an_http_1_0_answer_whose_body_streams_in_slowly_arrives_whole() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    const PIECE: usize = 16 * 1024;
    const PIECES: usize = 8;
    let origin = raw_backend(|mut s| async move {
        let mut buf = [0u8; 4096];
        if s.read(&mut buf).await.unwrap_or(0) == 0 {
            return;
        }
        let head = format!(
            "HTTP/1.0 200 OK\r\nConnection: keep-alive\r\nContent-Length: {}\r\n\r\n",
            PIECE * PIECES
        );
        let _ = s.write_all(head.as_bytes()).await;
        for i in 0..PIECES {
            tokio::time::sleep(Duration::from_millis(20)).await;
            let _ = s.write_all(&vec![b'a' + i as u8; PIECE]).await;
        }
        // Kept open, as a 1.0 keep-alive backend does, until the proxy lets go.
        let _ = s.read(&mut buf).await;
    })
    .await;
    let proxy = Proxy::start(&route("/", "max_tag_body = \"1KiB\""), &origin).await;
    for _ in 0..2 {
        let r = Client::new().get(&proxy.url("/big"), &[]).await;
        assert_eq!(r.status, 200);
        assert_eq!(r.body.len(), PIECE * PIECES, "the whole body");
        assert!(r.body.starts_with(b"a") && r.body.ends_with(b"h"));
    }
}

/// A whole response, planted by a backend after an answer that frames its body wrongly.
const STRAY: &[u8] = b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nEVIL";

/// A raw backend that answers a request whose head `spoiled` picks with the bytes it gives,
/// then, 50 ms later, [`STRAY`] on the same connection; every other request with 200 "ok".
/// Returns its origin and a count of the connections it accepted.
async fn stray_bytes_backend(spoiled: fn(&[u8]) -> Option<Vec<u8>>) -> (String, Arc<AtomicUsize>) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let accepted = Arc::new(AtomicUsize::new(0));
    let counted = accepted.clone();
    let origin = raw_backend(move |mut s| {
        counted.fetch_add(1, Ordering::SeqCst);
        async move {
            let mut buf = [0u8; 4096];
            loop {
                let n = s.read(&mut buf).await.unwrap_or(0);
                if n == 0 {
                    return;
                }
                match spoiled(&buf[..n]) {
                    Some(answer) => {
                        let _ = s.write_all(&answer).await;
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        let _ = s.write_all(STRAY).await;
                    }
                    None => {
                        let _ = s
                            .write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
                            .await;
                    }
                }
            }
        }
    })
    .await;
    (origin, accepted)
}

/// A backend that answers 204 with a `Content-Length` (which RFC 9110 §8.6 forbids on a
/// 204) and then sends those bytes: hyper reads the 204 as bodiless, so on a reused
/// connection the stray bytes would begin the next request's answer, another client's 502
/// or, shaped as a response, another client's wrong answer. The connection is not reused;
/// nor is it after a 304 with `Transfer-Encoding`.
#[tokio::test]
async fn a_204_that_declares_content_spoils_its_connection() {
    let (origin, accepted) = stray_bytes_backend(|head| {
        let answer: &[u8] = if head.starts_with(b"DELETE /late") {
            b"HTTP/1.1 204 No Content\r\nContent-Length: 48\r\n\r\n"
        } else if head.starts_with(b"GET /late") {
            b"HTTP/1.1 304 Not Modified\r\nTransfer-Encoding: chunked\r\n\r\n"
        } else {
            return None;
        };
        Some(answer.to_vec())
    })
    .await;
    let proxy = Proxy::start(&route("/", ""), &origin).await;
    let c = Client::new();
    assert_eq!(
        c.send("DELETE", &proxy.url("/late"), &[], "").await.status,
        204
    );
    // Sent before the stray bytes come: on the same connection, it would read them.
    let r = c.get(&proxy.url("/innocent"), &[]).await;
    assert_eq!((r.status, r.body.as_ref()), (200, &b"ok"[..]));
    assert_eq!(accepted.load(Ordering::SeqCst), 2, "a new connection");
    // A 304 with `Transfer-Encoding` (which it cannot have, RFC 9110 §15.4.5) is as suspect.
    assert_eq!(c.get(&proxy.url("/late"), &[]).await.status, 304);
    let r = c.get(&proxy.url("/innocent"), &[]).await;
    assert_eq!((r.status, r.body.as_ref()), (200, &b"ok"[..]));
    assert_eq!(accepted.load(Ordering::SeqCst), 3, "a new connection");
}

/// A backend that sends `Content-Length` beside `Transfer-Encoding: chunked` frames its body
/// one way while hyper reads it the other (the chunks win, RFC 9112 §6.3): what the backend
/// counted as body past the last chunk (here a whole response, a moment later) would begin
/// the next request's answer on a reused connection, another client's. RFC 9112 §6.3 has
/// such a message handled as an error: the connection is not reused.
#[tokio::test]
async fn a_response_with_a_length_and_chunks_spoils_its_connection() {
    let (origin, accepted) = stray_bytes_backend(|head| {
        // The length counts the last chunk and the planted response.
        head.starts_with(b"GET /both").then(|| {
            let length = 5 + STRAY.len();
            format!("HTTP/1.1 200 OK\r\nContent-Length: {length}\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n")
                .into_bytes()
        })
    })
    .await;
    let proxy = Proxy::start(&route("/", ""), &origin).await;
    let c = Client::new();
    assert_eq!(c.get(&proxy.url("/both"), &[]).await.status, 200);
    // Sent before the stray bytes come: on the same connection, it would read them.
    let r = c.get(&proxy.url("/innocent"), &[]).await;
    assert_eq!((r.status, r.text()), (200, "ok".to_owned()));
    assert_eq!(accepted.load(Ordering::SeqCst), 2, "a new connection");
}

/// A write whose body was streaming to the backend when the exchange failed (here the
/// backend refuses the connection) leaves the rest of the body unread, and hyper then closes
/// the client's connection: the answer says so (`Connection: close`), so a client does not
/// send its next request on a connection that will never answer it.
#[tokio::test]
async fn a_failed_write_with_its_body_part_read_says_the_connection_closes() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let dead = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap()
    };
    let proxy = Proxy::start(
        &route("/", "max_tag_body = \"1KiB\""),
        &format!("http://{dead}"),
    )
    .await;
    let mut c = tokio::net::TcpStream::connect(proxy.addr).await.unwrap();
    let mut req = b"PUT /x HTTP/1.1\r\nHost: a\r\nContent-Length: 60000\r\n\r\n".to_vec();
    req.extend(std::iter::repeat_n(b'y', 60000));
    req.extend(b"GET /next HTTP/1.1\r\nHost: a\r\n\r\n");
    let _ = c.write_all(&req).await;
    let mut got = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), c.read_to_end(&mut got)).await;
    let got = String::from_utf8_lossy(&got).to_ascii_lowercase();
    assert!(got.starts_with("http/1.1 502"), "{got}");
    let head = got.split("\r\n\r\n").next().unwrap();
    assert!(head.contains("connection: close"), "{head}");
}

/// A guarded write whose body (of unknown length, past `max_tag_body`) was part read before
/// the lock, and whose revalidation got an answer the writer is given as it is (a 403):
/// the rest of the body is left unread and hyper closes the client's connection after the
/// answer, which must say so, or the client's next request on it goes unanswered.
#[tokio::test]
async fn a_revalidation_answer_to_a_write_with_its_body_part_read_says_the_connection_closes() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let backend = ScriptedBackend::start(|r| async move {
        match r.method.as_str() {
            "GET" if r.uri.path() == "/x" => respond(403, &[], "no"),
            _ => respond(200, &[], "ok"),
        }
    })
    .await;
    let proxy = Proxy::start(&route("/", "max_tag_body = \"1KiB\""), &backend.origin()).await;
    let mut c = tokio::net::TcpStream::connect(proxy.addr).await.unwrap();
    let mut req =
        b"PUT /x HTTP/1.1\r\nHost: a\r\nIf-Match: \"v1\"\r\nTransfer-Encoding: chunked\r\n\r\n"
            .to_vec();
    for _ in 0..3 {
        req.extend(b"800\r\n");
        req.extend(std::iter::repeat_n(b'y', 0x800));
        req.extend(b"\r\n");
    }
    req.extend(b"0\r\n\r\nGET /next HTTP/1.1\r\nHost: a\r\n\r\n");
    let _ = c.write_all(&req).await;
    let mut got = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), c.read_to_end(&mut got)).await;
    let got = String::from_utf8_lossy(&got).to_ascii_lowercase();
    assert!(got.starts_with("http/1.1 403"), "{got}");
    // Either the next request is answered, or the 403 said the connection ends.
    let head = got.split("\r\n\r\n").next().unwrap();
    assert!(
        got.matches("http/1.1 ").count() == 2 || head.contains("connection: close"),
        "{got}"
    );
}

/// A legacy handler on raw sockets that answers a PUT 409 from its head, without reading
/// its body, keeps the connection, and answers every other head it then reads (the body's
/// bytes among them, taken for a request) with `answer(head)`. Its origin.
async fn early_409_handler<F, Fut>(answer: F) -> String
where
    F: Fn(Vec<u8>) -> Fut + Clone + Send + Sync + 'static,
    Fut: std::future::Future<Output = Vec<u8>> + Send + 'static,
{
    early_answer_handler(
        b"HTTP/1.1 409 Conflict\r\nContent-Length: 2\r\n\r\nno",
        answer,
    )
    .await
}

/// The same handler, answering a PUT with `early` instead.
async fn early_answer_handler<F, Fut>(early: &'static [u8], answer: F) -> String
where
    F: Fn(Vec<u8>) -> Fut + Clone + Send + Sync + 'static,
    Fut: std::future::Future<Output = Vec<u8>> + Send + 'static,
{
    use tokio::io::AsyncWriteExt;
    raw_backend(move |mut s| {
        let answer = answer.clone();
        async move {
            let mut buf = Vec::new();
            while let Some(end) = read_until(&mut s, &mut buf, head_end).await {
                let head: Vec<u8> = buf.drain(..end).collect();
                let reply = match head.starts_with(b"PUT ") {
                    true => early.to_vec(),
                    false => answer(head).await,
                };
                if s.write_all(&reply).await.is_err() {
                    return;
                }
            }
        }
    })
    .await
}

/// A legacy handler that answers a write (409, or 201 for what it stored) without reading
/// its body, and keeps the
/// connection: the body still going up then reaches it as the next "request", and the
/// connection, back in the pool, carried another client's GET behind it: that client got
/// the handler's error page about the first client's body. A connection whose answer came
/// before the request's body had all gone up is not reused.
#[tokio::test]
async fn an_answer_before_the_upload_ended_does_not_put_its_connection_back() {
    // An error, and a success: a handler that stores what it has and answers 201 at once
    // leaves the rest of the body unread just the same.
    for (early, status) in [
        (
            &b"HTTP/1.1 409 Conflict\r\nContent-Length: 2\r\n\r\nno"[..],
            "HTTP/1.1 409",
        ),
        (
            &b"HTTP/1.1 201 Created\r\nContent-Length: 0\r\n\r\n"[..],
            "HTTP/1.1 201",
        ),
    ] {
        an_answer_before_the_upload_ended(early, status).await;
    }
}

async fn an_answer_before_the_upload_ended(early: &'static [u8], status: &str) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let origin = early_answer_handler(early, |head| async move {
        if head.starts_with(b"GET /other ") {
            return b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nother".to_vec();
        }
        // What it took for a request line: the first write's body.
        let mut a = format!(
            "HTTP/1.1 400 Bad Request\r\nContent-Length: {}\r\n\r\n",
            head.len()
        )
        .into_bytes();
        a.extend_from_slice(&head);
        a
    })
    .await;
    // A body over `max_tag_body` streams up as it comes.
    let proxy = Proxy::start(&route("/", "max_tag_body = \"4B\""), &origin).await;
    let mut a = tokio::net::TcpStream::connect(proxy.addr).await.unwrap();
    a.write_all(b"PUT /doc HTTP/1.1\r\nHost: a\r\nContent-Length: 10\r\n\r\n")
        .await
        .unwrap();
    let mut got = [0u8; 1024];
    let n = tokio::time::timeout(Duration::from_secs(5), a.read(&mut got))
        .await
        .expect("answered")
        .unwrap();
    assert!(
        got[..n].starts_with(status.as_bytes()),
        "{status}: {:?}",
        String::from_utf8_lossy(&got[..n])
    );
    // The body, after the answer (no line end in it: the handler waits for the rest of
    // what it takes for a head); then another client's GET.
    a.write_all(b"helloworld").await.unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let r = Client::new().get(&proxy.url("/other"), &[]).await;
    assert_eq!(
        (r.status, r.body.as_ref()),
        (200, &b"other"[..]),
        "{status}"
    );
}

/// A legacy handler that answers a PUT early (409 from its head) and then takes no more of
/// its body while it keeps the connection open (a stuck worker); other requests get 200
/// "ok". Behind a proxy allowed one connection to it, with `upstream_timeout` 300 ms and
/// `max_tag_body` as given.
async fn one_connection_to_a_handler_that_answers_puts_early(max_tag_body: &str) -> Proxy {
    use tokio::io::AsyncWriteExt;
    let origin = raw_backend(|mut s| async move {
        let mut buf = Vec::new();
        let Some(end) = read_until(&mut s, &mut buf, head_end).await else {
            return;
        };
        if buf[..end].starts_with(b"PUT ") {
            let _ = s
                .write_all(b"HTTP/1.1 409 Conflict\r\nContent-Length: 2\r\n\r\nno")
                .await;
            // Reads nothing more, and keeps the connection.
            tokio::time::sleep(Duration::from_secs(20)).await;
        } else {
            let _ = s
                .write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
                .await;
        }
    })
    .await;
    Proxy::start_with(
        &route(
            "/",
            &format!("upstream_timeout = \"300ms\"\nmax_tag_body = \"{max_tag_body}\""),
        ),
        &origin,
        "upstream_max_connections = 1\nconnect_timeout = \"3s\"",
    )
    .await
}

/// Reads the 409 the handler gave the PUT on `rd`, then asserts that another request gets
/// the one connection allowed once the body has not moved for `upstream_timeout`: well
/// before `connect_timeout`, after which it would have been a 503.
async fn the_409_comes_and_the_connection_comes_free(
    proxy: &Proxy,
    rd: &mut tokio::net::tcp::OwnedReadHalf,
) {
    use tokio::io::AsyncReadExt;
    let mut got = [0u8; 1024];
    let n = tokio::time::timeout(Duration::from_secs(5), rd.read(&mut got))
        .await
        .expect("answered")
        .unwrap();
    assert!(
        got[..n].starts_with(b"HTTP/1.1 409"),
        "{:?}",
        String::from_utf8_lossy(&got[..n])
    );
    let started = Instant::now();
    let r = Client::new().get(&proxy.url("/other"), &[]).await;
    assert_eq!(
        (r.status, r.text().as_str()),
        (200, "ok"),
        "the connection stuck on the body was freed (after {:?})",
        started.elapsed()
    );
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "{:?}",
        started.elapsed()
    );
}

/// The handler above, given a streamed upload. The connection, still sending the rest, was
/// held for good: nothing timed it once the answer had come, so under
/// `upstream_max_connections = 1` every later request got 503 at `connect_timeout` (and
/// without a cap the connection and its task leaked). The rest of an upload answered early
/// must go up within `upstream_timeout`, as before the answer; then the connection is closed
/// and the next request gets its turn.
#[tokio::test]
async fn a_backend_that_answers_an_upload_early_and_takes_no_more_of_it_holds_no_connection() {
    use tokio::io::AsyncWriteExt;
    let proxy = one_connection_to_a_handler_that_answers_puts_early("4B").await;
    let a = tokio::net::TcpStream::connect(proxy.addr).await.unwrap();
    let (mut rd, mut wr) = a.into_split();
    // A large body, sent as fast as the proxy takes it, until the backend's buffers are full.
    let uploader = tokio::spawn(async move {
        wr.write_all(b"PUT /doc HTTP/1.1\r\nHost: a\r\nContent-Length: 67108864\r\n\r\n")
            .await
            .unwrap();
        let chunk = vec![b'x'; 64 * 1024];
        while let Ok(Ok(())) =
            tokio::time::timeout(Duration::from_secs(5), wr.write_all(&chunk)).await
        {}
    });
    the_409_comes_and_the_connection_comes_free(&proxy, &mut rd).await;
    uploader.abort();
}

/// The same handler, with a body the proxy read whole before sending it (within
/// `max_tag_body`): hyper goes on writing it after the 409, and the backend takes none of
/// it. No request waits on the connection any more, so only the connection's own watch can
/// end it: once its writes have not moved for `upstream_timeout`.
#[tokio::test]
async fn a_backend_that_answers_a_whole_body_early_and_takes_no_more_of_it_holds_no_connection() {
    use tokio::io::AsyncWriteExt;
    let proxy = one_connection_to_a_handler_that_answers_puts_early("8MiB").await;
    // More than the kernel's buffers between the proxy and the backend hold, read whole.
    let len = 8 * 1024 * 1024;
    let a = tokio::net::TcpStream::connect(proxy.addr).await.unwrap();
    let (mut rd, mut wr) = a.into_split();
    let uploader = tokio::spawn(async move {
        let head = format!("PUT /doc HTTP/1.1\r\nHost: a\r\nContent-Length: {len}\r\n\r\n");
        wr.write_all(head.as_bytes()).await.unwrap();
        wr.write_all(&vec![b'x'; len]).await.unwrap();
        wr
    });
    let _wr = tokio::time::timeout(Duration::from_secs(5), uploader)
        .await
        .expect("the proxy read the whole body")
        .unwrap();
    the_409_comes_and_the_connection_comes_free(&proxy, &mut rd).await;
}

/// The same handler, with a body the proxy read whole and sent with its head: the handler
/// answers 409 without reading it, then takes the body for the next request on the
/// connection (here a GET it answers after a while) and answers that too. Put back in the
/// pool, the connection carried another client's GET, which got the answer to the first
/// client's body, with the proxy's tag on it. A connection whose request carried a body
/// and was answered with anything but a 2xx is not reused: the backend may not have read
/// that body.
#[tokio::test]
async fn an_error_answer_to_a_write_whose_body_went_up_whole_does_not_put_its_connection_back() {
    let origin = early_409_handler(|head| async move {
        if !head.starts_with(b"GET /secret ") {
            return b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nother".to_vec();
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
        b"HTTP/1.1 200 OK\r\nContent-Length: 6\r\n\r\nsecret".to_vec()
    })
    .await;
    let proxy = Proxy::start(&route("/", ""), &origin).await;
    let c = Client::new();
    let body = "GET /secret HTTP/1.1\r\nHost: a\r\n\r\n";
    let r = c.put(&proxy.url("/doc"), &[], body).await;
    assert_eq!(r.status, 409);
    let r = Client::new().get(&proxy.url("/other"), &[]).await;
    assert_eq!((r.status, r.body.as_ref()), (200, &b"other"[..]));
}

/// A legacy handler that never reads a body it has no use for (Python's `http.server`, a
/// route that expects none) and keeps its connections, closing one only after a request
/// that asks it to. A GET, HEAD, DELETE or OPTIONS body (or an extension method's) shaped
/// like a request was then read as the connection's next request: a write nobody judged or
/// locked (here a DELETE the route would answer 428), carried out behind a 200. Each goes up
/// asking the backend to close after it, so the backend parses the one request it was
/// sent, and a later request gets its own answer.
#[tokio::test]
async fn a_body_a_handler_may_ignore_is_never_read_as_a_request_of_its_own() {
    use tokio::io::AsyncWriteExt;
    let heads = Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
    let seen = heads.clone();
    let origin = raw_backend(move |mut s| {
        let seen = seen.clone();
        async move {
            let mut buf = Vec::new();
            while let Some(end) = read_until(&mut s, &mut buf, head_end).await {
                let head: Vec<u8> = buf.drain(..end).collect();
                let head = String::from_utf8_lossy(&head).to_ascii_lowercase();
                seen.lock()
                    .unwrap()
                    .push(head.lines().next().unwrap_or("").to_owned());
                let reply: &[u8] = match head.starts_with("get ") {
                    true => b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\ndoc",
                    false => b"HTTP/1.1 204 No Content\r\n\r\n",
                };
                if s.write_all(reply).await.is_err() || head.contains("connection: close") {
                    return;
                }
            }
        }
    })
    .await;
    let proxy = Proxy::start(&route("/", "require_precondition = true"), &origin).await;
    let c = Client::new();
    let smuggled = "DELETE /victim HTTP/1.1\r\nHost: a\r\n\r\n";
    let any = [("if-match", "*")];
    let cases = [
        ("GET", 200),
        ("HEAD", 200),
        ("OPTIONS", 204),
        ("DELETE", 204),
        // In any case (Werkzeug upper-cases it), and an extension method.
        ("delete", 204),
        ("get", 200),
        ("PURGE", 204),
    ];
    for (method, want) in cases {
        heads.lock().unwrap().clear();
        let deletes = method.eq_ignore_ascii_case("delete");
        let headers: &[_] = if deletes { &any } else { &[] };
        let r = c.send(method, &proxy.url("/doc"), headers, smuggled).await;
        assert_eq!(r.status, want, "{method}");
        let r = c.get(&proxy.url("/other"), &[]).await;
        assert_eq!((r.status, r.body.as_ref()), (200, &b"doc"[..]), "{method}");
        let seen = heads.lock().unwrap().clone();
        assert!(
            !seen.iter().any(|h| h.contains("/victim")),
            "{method}: the body was read as a request: {seen:?}"
        );
    }
}

/// A backend that repeats its `Content-Length` as a list (`5, 5`, as some frameworks do when
/// two layers each add it): hyper reads it as one length (RFC 9112 §6.3 lets a recipient),
/// but sent on as it came, clients that parse one number (Python's `http.client`, Go) find
/// no length and read to the close, which on a kept-alive connection never comes. The
/// client gets the one number, on a tagged 200 and on an answer passed through.
#[tokio::test]
async fn a_length_repeated_as_a_list_reaches_the_client_as_one_number() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let origin = raw_backend(|mut s| async move {
        let mut buf = [0u8; 4096];
        loop {
            let n = s.read(&mut buf).await.unwrap_or(0);
            if n == 0 {
                return;
            }
            let answer: &[u8] = if buf[..n].starts_with(b"GET /nothing ") {
                b"HTTP/1.1 204 No Content\r\nContent-Length: 5, 5\r\n\r\n"
            } else if buf[..n].starts_with(b"GET ") {
                b"HTTP/1.1 200 OK\r\nContent-Length: 5, 5\r\n\r\nhello"
            } else {
                b"HTTP/1.1 409 Conflict\r\nContent-Length: 5\r\nContent-Length: 5\r\n\r\nnope!"
            };
            let _ = s.write_all(answer).await;
        }
    })
    .await;
    let proxy = Proxy::start(&route("/", ""), &origin).await;
    let get = "GET /doc HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n";
    let put = "PUT /doc HTTP/1.1\r\nHost: a\r\nContent-Length: 1\r\nConnection: close\r\n\r\nx";
    for (req, status, body) in [(get, "200", "hello"), (put, "409", "nope!")] {
        let out = common::raw_exchange(proxy.addr, req.as_bytes()).await;
        let lower = out.to_ascii_lowercase();
        assert!(out.starts_with(&format!("HTTP/1.1 {status}")), "{out}");
        assert_eq!(lower.matches("content-length:").count(), 1, "{out}");
        assert!(lower.contains("content-length: 5\r\n"), "{out}");
        assert!(out.ends_with(&format!("\r\n\r\n{body}")), "{out}");
    }
    // A 204 has no length at all (RFC 9110 §8.6), to a HEAD (sent up as a GET) too.
    let head = "HEAD /nothing HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n";
    let out = common::raw_exchange(proxy.addr, head.as_bytes()).await;
    assert!(out.starts_with("HTTP/1.1 204"), "{out}");
    assert!(
        !out.to_ascii_lowercase().contains("content-length"),
        "{out}"
    );
}

/// An HTTP/2 client may send the last bytes of its declared length and end its stream only
/// later, in an empty frame. hyper's HTTP/1.1 client stops taking the body once the length
/// has gone up, so that is when the upload has ended: the connection goes back to the pool
/// when the answer comes, and the next request reuses it.
#[tokio::test]
async fn an_http2_upload_ended_by_a_late_empty_frame_leaves_its_connection_reusable() {
    let backend = ScriptedBackend::start(|_| async { respond(204, &[], "") }).await;
    // A body over `max_tag_body` streams up as it comes.
    let proxy = Proxy::start(&route("/", "max_tag_body = \"4B\""), &backend.origin()).await;
    let mut client = common::h2_client(proxy.addr).await;
    let req = http::Request::put(proxy.url("/doc"))
        .header("content-length", "10")
        .body(())
        .unwrap();
    let (answer, mut upload) = client.send_request(req, false).unwrap();
    upload
        .send_data(bytes::Bytes::from("helloworld"), false)
        .unwrap();
    let answer = tokio::time::timeout(Duration::from_secs(5), answer);
    assert_eq!(answer.await.expect("answered").unwrap().status(), 204);
    // Too late, maybe: the proxy may have reset the stream's upload half once answered.
    let _ = upload.send_data(bytes::Bytes::new(), true);
    assert_eq!(backend.last().body, "helloworld");

    // Another write (a GET would go up on a connection of its own client's: `h1.rs`).
    let r = Client::new().put(&proxy.url("/other"), &[], "x").await;
    assert_eq!(r.status, 204);
    assert_eq!(
        backend.connections(),
        1,
        "the write's connection was reused"
    );
}

/// A backend that answers the first request of each connection and closes it a moment
/// later without `Connection: close` (a server that serves one request per connection and
/// does not say so, or one closing its kept-alive connections as it restarts): a request
/// sent on the pooled connection in that moment is never read. A GET or HEAD is safe to
/// send again. The replay was kept for connections idle past `REPLAY_AFTER` (500 ms, a
/// keep-alive timeout), so every other GET here got a 502 ("connection closed before
/// message completed"); now, once the origin has been seen closing a connection on a
/// request it did not answer, such GETs are sent again on a new connection. A PUT is not:
/// the backend may have carried it out.
#[tokio::test]
async fn a_get_that_meets_a_close_just_after_an_answer_is_sent_again() {
    use tokio::io::AsyncWriteExt;
    let requests = Arc::new(AtomicUsize::new(0));
    let seen = requests.clone();
    let origin = raw_backend(move |mut s| {
        let seen = seen.clone();
        async move {
            let mut buf = Vec::new();
            if read_until(&mut s, &mut buf, head_end).await.is_none() {
                return;
            }
            seen.fetch_add(1, Ordering::SeqCst);
            let answer = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok";
            if s.write_all(answer).await.is_ok() {
                // Closed unannounced, with whatever came next unread.
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    })
    .await;
    let proxy = Proxy::start(&route("/", ""), &origin).await;
    let c = Client::new();
    let mut lost = Vec::new();
    for n in 0..8 {
        let method = if n % 2 == 0 { "GET" } else { "HEAD" };
        let r = c.send(method, &proxy.url("/doc"), &[], "").await;
        if r.status != 200 {
            lost.push((n, method, r.status));
        }
    }
    // None is lost: a body-less GET or HEAD that a reused connection closed on unanswered
    // is sent again (`h1.rs`), the first one too.
    assert!(lost.is_empty(), "safe requests lost: {lost:?}");
    // A PUT on such a connection is not sent again, even though this backend never read it:
    // the first PUT opens the connection the second goes up on, just before its close.
    let before = requests.load(Ordering::SeqCst);
    assert_eq!(c.put(&proxy.url("/doc"), &[], "x").await.status, 200);
    let r = c.put(&proxy.url("/doc"), &[], "x").await;
    r.assert_problem(502);
    assert_eq!(
        requests.load(Ordering::SeqCst),
        before + 1,
        "the second PUT was not sent again"
    );
}
