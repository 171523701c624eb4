//! `server.max_buffered_bytes`: the body bytes all requests together may hold. Backends
//! here send part of a body and then wait at a gate the test opens, so that several bodies
//! are held at once; a GET that finds no room streams through untagged and whole, and a
//! write is still judged by the current tag while the budget is full.

mod common;

use std::net::SocketAddr;
use std::sync::atomic::AtomicUsize;
use std::sync::atomic::Ordering::SeqCst;
use std::time::Duration;

use bytes::Bytes;
use common::proxy::route;
use common::{eventually, Client, Proxy};
use http::{HeaderMap, Request};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client as HyperClient;
use hyper_util::rt::TokioExecutor;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpListener;
use tokio::sync::{mpsc, watch};

const KIB: usize = 1024;

/// How many `/docs/fresh-*` bodies the backend has served.
static FRESH: AtomicUsize = AtomicUsize::new(0);
/// How many `/docs/emptied-*` requests the backend has had.
static EMPTIED: AtomicUsize = AtomicUsize::new(0);

/// The body served for `path`: `len` bytes that differ between paths.
fn body_of(path: &str, len: usize) -> Vec<u8> {
    let seed = path
        .bytes()
        .fold(7u8, |a, b| a.wrapping_mul(31).wrapping_add(b));
    (0..len)
        .map(|i| seed.wrapping_add((i % 251) as u8))
        .collect()
}

/// A backend on a raw socket, one response per connection:
/// - `GET /docs/held-*`: `Content-Length: 64 KiB`, 48 KiB at once, the rest once the gate opens;
/// - `GET /docs/chunked-*`: chunked, five 16 KiB chunks at once, a sixth once the gate opens;
/// - `GET /docs/chunkedbig-*`: chunked, twelve 16 KiB chunks (192 KiB) at once;
/// - `GET /docs/fresh-*`: 64 KiB at once, different on every request;
/// - `GET /docs/emptied-*`: 64 KiB the first time any such path is asked for, then empty;
/// - `GET /docs/streamed-*`: chunked, 64 KiB at once (four 16 KiB chunks);
/// - `GET /docs/varied-*`: 64 KiB at once, `text/plain` with `Vary: Accept`;
/// - any other GET: 64 KiB at once; a PUT: its body read, then 204.
async fn gated_backend() -> (SocketAddr, watch::Sender<bool>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (gate, opened) = watch::channel(false);
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                return;
            };
            let mut opened = opened.clone();
            tokio::spawn(async move {
                let mut stream = BufReader::new(stream);
                let (mut line, mut length) = (String::new(), 0usize);
                stream.read_line(&mut line).await.unwrap();
                let mut words = line.split_whitespace();
                let (method, path) = (words.next().unwrap().to_owned(), words.next().unwrap());
                let path = path.to_owned();
                loop {
                    let mut header = String::new();
                    stream.read_line(&mut header).await.unwrap();
                    if header == "\r\n" {
                        break;
                    }
                    if let Some(v) = header.to_ascii_lowercase().strip_prefix("content-length:") {
                        length = v.trim().parse().unwrap();
                    }
                }
                if method == "PUT" {
                    let mut body = vec![0; length];
                    stream.read_exact(&mut body).await.unwrap();
                    let done = b"HTTP/1.1 204 No Content\r\nConnection: close\r\n\r\n";
                    let _ = stream.get_mut().write_all(done).await;
                    return;
                }
                let mut gate = async || {
                    let _ = opened.wait_for(|open| *open).await;
                };
                let s = stream.get_mut();
                if path.starts_with("/docs/streamed-") {
                    let body = body_of(&path, 64 * KIB);
                    let head = "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n";
                    let _ = s.write_all(head.as_bytes()).await;
                    for chunk in body.chunks(16 * KIB) {
                        let size = format!("{:x}\r\n", chunk.len());
                        let _ = s.write_all(size.as_bytes()).await;
                        let _ = s.write_all(chunk).await;
                        let _ = s.write_all(b"\r\n").await;
                    }
                    let _ = s.write_all(b"0\r\n\r\n").await;
                    return;
                }
                if path.starts_with("/docs/chunked") {
                    let big = path.starts_with("/docs/chunkedbig-");
                    let body = body_of(&path, if big { 192 * KIB } else { 96 * KIB });
                    let head = "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n";
                    let _ = s.write_all(head.as_bytes()).await;
                    for (i, chunk) in body.chunks(16 * KIB).enumerate() {
                        if i == 5 && !big {
                            gate().await;
                        }
                        let _ = s
                            .write_all(format!("{:x}\r\n", chunk.len()).as_bytes())
                            .await;
                        let _ = s.write_all(chunk).await;
                        let _ = s.write_all(b"\r\n").await;
                        let _ = s.flush().await;
                    }
                    let _ = s.write_all(b"0\r\n\r\n").await;
                    return;
                }
                let body = if path.starts_with("/docs/fresh-") {
                    body_of(&format!("{path}#{}", FRESH.fetch_add(1, SeqCst)), 64 * KIB)
                } else if path.starts_with("/docs/emptied-") && EMPTIED.fetch_add(1, SeqCst) > 0 {
                    Vec::new()
                } else {
                    body_of(&path, 64 * KIB)
                };
                // A variant by `Accept`, whose tag is keyed by its metadata too.
                let varied = match path.starts_with("/docs/varied-") {
                    true => "Content-Type: text/plain\r\nVary: Accept\r\n",
                    false => "",
                };
                let head = format!(
                    "HTTP/1.1 200 OK\r\nContent-Length: {}\r\n{varied}Connection: close\r\n\r\n",
                    body.len()
                );
                let _ = s.write_all(head.as_bytes()).await;
                let split = if path.starts_with("/docs/held-") {
                    48 * KIB
                } else {
                    body.len()
                };
                let _ = s.write_all(&body[..split]).await;
                let _ = s.flush().await;
                gate().await;
                let _ = s.write_all(&body[split..]).await;
            });
        }
    });
    (addr, gate)
}

type Http = HyperClient<HttpConnector, Full<Bytes>>;

fn http1() -> Http {
    HyperClient::builder(TokioExecutor::new()).build_http()
}

/// A proxy in front of the gated backend: its `/docs/` route tags bodies up to 128 KiB, and
/// all requests together may hold `bound` (`max_buffered_bytes`). The gate opens the
/// backend's held bodies.
async fn behind_a_bound(bound: &str) -> (Proxy, watch::Sender<bool>) {
    let (backend, gate) = gated_backend().await;
    let server = format!("max_buffered_bytes = \"{bound}\"");
    let routes = route("/docs/", "max_tag_body = \"128KiB\"");
    let proxy = Proxy::start_with(&routes, &format!("http://{backend}"), &server).await;
    (proxy, gate)
}

/// GETs `url` in a task of its own: its response head is reported on `heads` as soon as it
/// arrives (with `index`); the task's output is the head and the whole body.
fn get_reporting_head(
    url: String,
    index: usize,
    heads: mpsc::UnboundedSender<usize>,
) -> tokio::task::JoinHandle<(HeaderMap, Bytes)> {
    get_with(http1(), url, index, heads)
}

/// `get_reporting_head` on `client`'s connections.
fn get_with(
    client: Http,
    url: String,
    index: usize,
    heads: mpsc::UnboundedSender<usize>,
) -> tokio::task::JoinHandle<(HeaderMap, Bytes)> {
    tokio::spawn(async move {
        let req = Request::get(url).body(Full::default()).unwrap();
        let rsp = client.request(req).await.unwrap();
        assert_eq!(rsp.status(), 200);
        let _ = heads.send(index);
        let (parts, body) = rsp.into_parts();
        (parts.headers, body.collect().await.unwrap().to_bytes())
    })
}

/// Two GETs of 64 KiB bodies the backend holds back at its gate, once the proxy holds both
/// (128 KiB of the bound).
async fn hold_two(proxy: &Proxy) -> Vec<tokio::task::JoinHandle<(HeaderMap, Bytes)>> {
    let (tx, _heads) = mpsc::unbounded_channel();
    let held = (0..2)
        .map(|i| get_reporting_head(proxy.url(&format!("/docs/held-{i}")), i, tx.clone()))
        .collect();
    let full = || proxy.state.budget.held() == 128 * KIB;
    assert!(eventually(Duration::from_secs(5), full).await, "both held");
    held
}

/// Opens the gate, lets the held GETs end, and sees the bound's bytes all given back.
async fn release(
    proxy: &Proxy,
    gate: &watch::Sender<bool>,
    held: Vec<tokio::task::JoinHandle<(HeaderMap, Bytes)>>,
) {
    gate.send(true).unwrap();
    for get in held {
        get.await.unwrap();
    }
    assert!(eventually(Duration::from_secs(2), || proxy.state.budget.held() == 0).await);
}

fn metrics(proxy: &Proxy) -> String {
    let s = &proxy.state;
    s.metrics.render(&s.tags, &s.memo, &s.budget)
}

/// Whether the budget's gauge reads `n` bytes now.
fn holds(proxy: &Proxy, n: usize) -> impl Fn() -> bool + '_ {
    move || metrics(proxy).contains(&format!("\nifmatch_buffered_bytes {n}\n"))
}

/// A raw connection that has sent a PUT's head declaring `len` bytes (and `Connection:
/// close`), none of the body yet.
async fn put_head(proxy: &Proxy, path: &str, len: usize) -> tokio::net::TcpStream {
    let mut s = tokio::net::TcpStream::connect(proxy.addr).await.unwrap();
    let head = format!(
        "PUT {path} HTTP/1.1\r\nHost: a\r\nContent-Length: {len}\r\nConnection: close\r\n\r\n"
    );
    s.write_all(head.as_bytes()).await.unwrap();
    s
}

/// Everything the proxy answers on `s` until it closes.
async fn answer(s: &mut tokio::net::TcpStream) -> String {
    let mut answer = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut answer))
        .await
        .expect("answered")
        .unwrap();
    String::from_utf8_lossy(&answer).into_owned()
}

async fn wait_for_heads(heads: &mut mpsc::UnboundedReceiver<usize>, n: usize) -> Vec<usize> {
    let mut seen = Vec::new();
    while seen.len() < n {
        let next = tokio::time::timeout(Duration::from_secs(5), heads.recv()).await;
        seen.push(
            next.expect("a streamed response's head comes before the gate opens")
                .unwrap(),
        );
    }
    seen
}

#[tokio::test]
async fn get_bodies_past_max_buffered_bytes_stream_through_whole_and_untagged() {
    let (proxy, gate) = behind_a_bound("160KiB").await;
    let key = proxy.state.tag_key();

    // Four 64 KiB bodies, each held back by the backend: two fit in 160 KiB, two do not.
    let (tx, mut heads) = mpsc::unbounded_channel();
    let paths: Vec<String> = (0..4).map(|i| format!("/docs/held-{i}")).collect();
    let gets: Vec<_> = paths
        .iter()
        .enumerate()
        .map(|(i, p)| get_reporting_head(proxy.url(p), i, tx.clone()))
        .collect();
    // Those without room stream at once: their heads arrive while the gate is shut.
    let streamed = wait_for_heads(&mut heads, 2).await;
    assert_eq!(
        proxy.state.budget.held(),
        128 * KIB,
        "the two tagged bodies hold their size"
    );

    gate.send(true).unwrap();
    for (i, get) in gets.into_iter().enumerate() {
        let (headers, body) = get.await.unwrap();
        assert_eq!(
            body,
            body_of(&paths[i], 64 * KIB),
            "{}: whole and unchanged",
            paths[i]
        );
        let etag = headers.get("etag").map(|v| v.to_str().unwrap().to_owned());
        match streamed.contains(&i) {
            true => assert_eq!(etag, None, "{}: streamed, so untagged", paths[i]),
            false => assert_eq!(etag, Some(key.tag_of(&body).to_string()), "{}", paths[i]),
        }
    }
    assert!(eventually(Duration::from_secs(2), || proxy.state.budget.held() == 0).await);
    let m = metrics(&proxy);
    assert!(
        m.contains("ifmatch_over_budget_bodies_total{route=\"/docs/\",body=\"response\"} 2"),
        "{m}"
    );
    assert!(m.contains("ifmatch_buffered_bytes_limit 163840"), "{m}");

    // With room again, the same document is tagged; a write's body read whole gives its
    // share back once the backend has answered.
    let again = Client::new().get(&proxy.url("/docs/held-0"), &[]).await;
    assert_eq!(again.etag(), key.tag_of(&again.body).to_string());
    let put = Client::new()
        .put(
            &proxy.url("/docs/held-0"),
            &[("if-match", &again.etag())],
            vec![7; 1024],
        )
        .await;
    assert_eq!(put.status, 204);
    assert_eq!(proxy.state.budget.held(), 0);
    assert!(
        !metrics(&proxy).contains("body=\"request\"} 1"),
        "it had room"
    );
}

#[tokio::test]
async fn a_get_judged_by_tags_is_judged_by_them_when_its_body_finds_no_room() {
    let (proxy, gate) = behind_a_bound("160KiB").await;
    let key = proxy.state.tag_key();
    let tag_of = |body: &[u8]| key.tag_of(body).to_string();
    let doc = "/docs/plain";
    let whole = body_of(doc, 64 * KIB);
    let current = Client::new().get(&proxy.url(doc), &[]).await.etag();
    assert_eq!(current, tag_of(&whole));

    // Two held bodies take 128 KiB of the 160: a 64 KiB body finds no room.
    let held = hold_two(&proxy).await;

    let get = async |path: &str, name: &str, value: &str| {
        Client::new().get(&proxy.url(path), &[(name, value)]).await
    };
    // Judged by the tag: 304, 412 and 200 as with room.
    let rsp = get(doc, "if-none-match", &current).await;
    assert_eq!(
        (rsp.status, rsp.etag()),
        (304, current.clone()),
        "current If-None-Match"
    );
    get(doc, "if-match", "\"stale\"").await.assert_problem(412);
    // A current If-Match gets the representation it names, under its tag.
    let rsp = get(doc, "if-match", &current).await;
    assert_eq!((rsp.status, rsp.etag()), (200, current.clone()));
    assert_eq!(rsp.body, whole, "whole");
    // A stale If-None-Match gets the current representation, untagged as any body without
    // room: whole, whatever happened between the two reads.
    let rsp = get(doc, "if-none-match", "\"stale\"").await;
    assert_eq!((rsp.status, rsp.header("etag")), (200, None));
    assert_eq!(rsp.body, whole, "whole");
    assert_eq!(
        proxy.state.budget.held(),
        128 * KIB,
        "none of them held its body"
    );

    // A representation that changes between the read judged and the one sent: cut short
    // for the If-Match that named the first, never sent whole under its tag...
    let next = body_of(&format!("/docs/fresh-0#{}", FRESH.load(SeqCst)), 64 * KIB);
    let req = Request::get(proxy.url("/docs/fresh-0"))
        .header("if-match", tag_of(&next))
        .body(Full::default())
        .unwrap();
    // The cut comes where the check fails, at the body's end: a body the backend sent at
    // once may be all in hand before the head was written, and then the head never is.
    match http1().request(req).await {
        Ok(rsp) => {
            assert_eq!(rsp.status(), 200);
            assert!(
                rsp.into_body().collect().await.is_err(),
                "cut before its end"
            );
        }
        Err(e) => assert!(format!("{e:?}").contains("IncompleteMessage"), "{e:?}"),
    }
    // ... and whole, untagged, for an If-None-Match (a backend whose bytes change on every
    // read still gets its 200s).
    let rsp = get("/docs/fresh-0", "if-none-match", "\"stale\"").await;
    assert_eq!(
        (rsp.status, rsp.header("etag"), rsp.body.len()),
        (200, None, 64 * KIB)
    );

    // Emptied in between: hyper would send no byte of it, so it is judged on its own tag.
    let emptied = body_of("/docs/emptied-0", 64 * KIB);
    get("/docs/emptied-0", "if-match", &tag_of(&emptied))
        .await
        .assert_problem(412);

    // A chunked representation, for an If-Match: checked under its tag where a cut shows
    // (HTTP/1.1 chunked), untagged for HTTP/1.0, whose close-delimited body hides a cut.
    let streamed = body_of("/docs/streamed-0", 64 * KIB);
    let rsp = get("/docs/streamed-0", "if-match", &tag_of(&streamed)).await;
    assert_eq!((rsp.status, rsp.etag()), (200, tag_of(&streamed)));
    assert_eq!(rsp.body, streamed);
    let http10 = format!(
        "GET /docs/streamed-0 HTTP/1.0\r\nHost: a\r\nIf-Match: {}\r\n\r\n",
        tag_of(&streamed)
    );
    let raw = common::raw_exchange(proxy.addr, http10.as_bytes()).await;
    assert!(
        raw.starts_with("HTTP/1.0 200"),
        "{}",
        &raw[..raw.len().min(200)]
    );
    let head = &raw[..raw.find("\r\n\r\n").unwrap()];
    assert!(!head.to_ascii_lowercase().contains("etag"), "{head}");

    // A variant whose tag is keyed by its metadata too is fetched again and checked under
    // that same tag: sent whole.
    let varied = body_of("/docs/varied-0", 64 * KIB);
    let tag = Client::new()
        .head(&proxy.url("/docs/varied-0"), &[])
        .await
        .etag();
    assert_ne!(tag, tag_of(&varied), "keyed by its Content-Type too");
    let rsp = get("/docs/varied-0", "if-match", &tag).await;
    assert_eq!((rsp.status, rsp.etag()), (200, tag));
    assert_eq!(rsp.body, varied);

    release(&proxy, &gate, held).await;
}

/// A GET judged by tags whose declared size cannot fit is hashed holding nothing: it does
/// not take the room left from bodies that fit, only to let it go at its end.
#[tokio::test]
async fn a_get_judged_by_tags_that_cannot_fit_holds_none_of_the_room_left() {
    let (proxy, gate) = behind_a_bound("180KiB").await;
    let held = hold_two(&proxy).await;
    // 52 KiB left; this one declares 64, sends 48 and waits at the gate.
    let url = proxy.url("/docs/held-2");
    let judged = tokio::spawn(async move {
        Client::new()
            .get(&url, &[("if-none-match", "\"stale\"")])
            .await
    });
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        proxy.state.budget.held(),
        128 * KIB,
        "it holds none of the 52 KiB left"
    );
    gate.send(true).unwrap();
    assert_eq!(
        judged.await.unwrap().body,
        body_of("/docs/held-2", 64 * KIB)
    );
    for get in held {
        get.await.unwrap();
    }
}

#[tokio::test]
async fn one_http2_clients_streams_share_the_bound_with_everyone_else() {
    let (proxy, gate) = behind_a_bound("160KiB").await;
    // One connection, prior knowledge (h2c): four streams on it.
    let h2: Http = HyperClient::builder(TokioExecutor::new())
        .http2_only(true)
        .build_http();
    let (tx, mut heads) = mpsc::unbounded_channel();
    let gets: Vec<_> = (0..4)
        .map(|i| {
            get_with(
                h2.clone(),
                proxy.url(&format!("/docs/held-{i}")),
                i,
                tx.clone(),
            )
        })
        .collect();
    let streamed = wait_for_heads(&mut heads, 2).await;
    assert_eq!(proxy.state.budget.held(), 128 * KIB);
    gate.send(true).unwrap();
    let mut tagged = 0;
    for (i, get) in gets.into_iter().enumerate() {
        let (headers, body) = get.await.unwrap();
        assert_eq!(body.len(), 64 * KIB);
        tagged += usize::from(headers.contains_key("etag"));
        assert_eq!(headers.contains_key("etag"), !streamed.contains(&i));
    }
    assert_eq!(tagged, 2);
    assert!(eventually(Duration::from_secs(2), || proxy.state.budget.held() == 0).await);
}

#[tokio::test]
async fn a_chunked_body_that_outgrows_the_budget_midway_is_sent_on_whole_and_untagged() {
    let (proxy, gate) = behind_a_bound("128KiB").await;
    let key = proxy.state.tag_key();

    let (tx, mut heads) = mpsc::unbounded_channel();
    let held = get_reporting_head(proxy.url("/docs/held-1"), 0, tx.clone());
    assert!(
        eventually(Duration::from_secs(5), || proxy.state.budget.held()
            == 64 * KIB)
        .await
    );
    // 16 KiB chunks: the fifth would take the total to 144 KiB, so it is not held, and the
    // 80 KiB read so far go out with the rest streamed behind them.
    let chunked = get_reporting_head(proxy.url("/docs/chunked-1"), 1, tx);
    assert_eq!(wait_for_heads(&mut heads, 1).await, [1]);
    // Its chunks' share goes back once they are handed to the client's connection.
    let back = eventually(Duration::from_secs(2), || {
        proxy.state.budget.held() == 64 * KIB
    });
    assert!(back.await, "held: {}", proxy.state.budget.held());

    gate.send(true).unwrap();
    let (headers, body) = chunked.await.unwrap();
    assert_eq!(body, body_of("/docs/chunked-1", 96 * KIB));
    assert!(headers.get("etag").is_none());
    let (headers, body) = held.await.unwrap();
    assert_eq!(headers["etag"], key.tag_of(&body).to_string());
    assert!(eventually(Duration::from_secs(2), || proxy.state.budget.held() == 0).await);
}

#[tokio::test]
async fn a_write_or_head_while_the_budget_is_full_is_judged_by_the_current_tag() {
    // `revalidate`: each conditional write reads the current body (64 KiB) to learn its tag.
    let (proxy, gate) = behind_a_bound("128KiB").await;
    let client = Client::new();
    let url = proxy.url("/docs/plain");
    let tag = client.get(&url, &[]).await.etag();

    let held = hold_two(&proxy).await;

    // A HEAD's body is read only for its tag: hashed without being held, it gets the tag.
    let head = client.head(&url, &[]).await;
    assert_eq!((head.status, head.etag()), (200, tag.clone()));
    assert!(head.body.is_empty());
    // Over `max_tag_body` (128 KiB), read with no room or with room: untagged either way.
    let big = client.head(&proxy.url("/docs/chunkedbig-1"), &[]).await;
    assert_eq!((big.status, big.header("etag")), (200, None));

    // The revalidation's body finds no room: it is hashed without being held, so the write
    // is still judged, neither refused for want of a tag nor let through unchecked.
    let fresh = client.put(&url, &[("if-match", &tag)], "new text").await;
    assert_eq!(fresh.status, 204, "{}", fresh.text());
    let stale = client
        .put(&url, &[("if-match", "\"stale\"")], "new text")
        .await;
    assert_eq!(stale.status, 412);
    assert_eq!(stale.etag(), tag, "the 412 names the current tag");
    // A URL never read before: its current body is hashed, and no copy of it is kept,
    // since its bytes were let go as they were hashed.
    let copies = proxy.state.memo.bytes();
    let other = client
        .put(&proxy.url("/docs/other"), &[("if-match", "\"x\"")], "b")
        .await;
    assert_eq!(other.status, 412);
    let current = proxy
        .state
        .tag_key()
        .tag_of(&body_of("/docs/other", 64 * KIB));
    assert_eq!(other.etag(), current.to_string());
    assert_eq!(
        proxy.state.memo.bytes(),
        copies,
        "no copy of a body not held"
    );
    let m = metrics(&proxy);
    assert!(
        m.contains("ifmatch_over_budget_bodies_total{route=\"/docs/\",body=\"request\"} 3"),
        "the write bodies streamed instead of being read whole: {m}"
    );
    assert_eq!(
        proxy.state.budget.held(),
        128 * KIB,
        "the writes hold nothing"
    );

    release(&proxy, &gate, held).await;
}

#[tokio::test]
async fn a_client_that_leaves_while_its_body_is_held_gives_the_share_back() {
    let (proxy, _gate) = behind_a_bound("128KiB").await;
    let (tx, _heads) = mpsc::unbounded_channel();
    let get = get_reporting_head(proxy.url("/docs/held-1"), 0, tx);
    assert!(
        eventually(Duration::from_secs(5), || proxy.state.budget.held()
            == 64 * KIB)
        .await
    );
    // The gate stays shut: the body is held, half read, when its client goes.
    get.abort();
    let back = eventually(Duration::from_secs(5), || proxy.state.budget.held() == 0);
    assert!(back.await, "held: {}", proxy.state.budget.held());
}

#[tokio::test]
async fn a_reload_applies_a_new_bound() {
    let routes = route("/", "");
    let proxy = Proxy::start_with(
        &routes,
        "http://127.0.0.1:9",
        "max_buffered_bytes = \"64MiB\"",
    )
    .await;
    assert_eq!(proxy.state.budget.limit(), 64 << 20);
    let text = format!(
        "[server]\nlisten = \"127.0.0.1:0\"\nmax_buffered_bytes = \"32MiB\"\n{}",
        routes.replace("{upstream}", "http://127.0.0.1:9")
    );
    proxy
        .state
        .reload(&ifmatch::config::Config::parse(&text, "t.toml").unwrap());
    assert_eq!(proxy.state.budget.limit(), 32 << 20);
}

/// A client that asks for tagged bodies and then reads nothing holds their bytes, and their
/// share of the bound, only until it has taken nothing for `header_read_timeout`: then its
/// connection is cut off, and GETs are tagged again. (Without this, a few such connections
/// kept every later GET untagged for as long as they stayed open.)
#[tokio::test]
async fn a_client_that_stops_reading_its_responses_is_cut_off_and_gives_its_share_back() {
    const DOC: usize = 7 << 20;
    let backend = common::ScriptedBackend::start(|_| async {
        common::backend::respond(200, &[], vec![b'd'; DOC])
    })
    .await;
    let proxy = Proxy::start_with(
        &route("/", "max_tag_body = \"8MiB\""),
        &backend.origin(),
        "max_buffered_bytes = \"32MiB\"\nheader_read_timeout = \"1s\"",
    )
    .await;
    let mut silent = Vec::new();
    for _ in 0..3 {
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket.set_recv_buffer_size(4 * KIB as u32).unwrap();
        let mut s = socket.connect(proxy.addr).await.unwrap();
        s.write_all(b"GET /doc HTTP/1.1\r\nHost: a\r\n\r\n")
            .await
            .unwrap();
        silent.push(s); // never read
    }
    assert!(
        eventually(Duration::from_secs(5), || proxy.state.budget.held() > DOC).await,
        "the silent clients' bodies are held: {}",
        proxy.state.budget.held()
    );
    assert!(
        eventually(Duration::from_secs(6), || proxy.state.budget.held() == 0).await,
        "still held: {}",
        proxy.state.budget.held()
    );
    let mut closed = 0;
    for s in &mut silent {
        let mut buf = vec![0u8; 1 << 20];
        loop {
            match tokio::time::timeout(Duration::from_secs(2), s.read(&mut buf)).await {
                Ok(Ok(0)) | Ok(Err(_)) => {
                    closed += 1;
                    break;
                }
                Ok(Ok(_)) => continue,
                Err(_) => break,
            }
        }
    }
    assert_eq!(closed, 3, "every silent connection was cut off");
    let r = Client::new().get(&proxy.url("/doc"), &[]).await;
    assert!(r.header("etag").is_some(), "tagged again");
}

/// A write's body read whole counts in the budget as its bytes arrive, not as its
/// `Content-Length` declares: two clients that declare 16 KiB and send 2 KiB hold 4 KiB,
/// not the whole bound, so a GET still finds room and is tagged (any client could once
/// strip every GET of its tag by declaring bodies it never sent). And a body that finds no
/// room halfway streams on to the backend, what was read first, whole.
#[tokio::test]
async fn a_write_body_counts_in_the_budget_as_it_arrives_not_as_declared() {
    let backend = common::Backend::start().await;
    backend.store.put("/docs/read", "r".repeat(8 * KIB));
    let proxy = Proxy::start_with(
        &route("/docs/", "max_tag_body = \"16KiB\""),
        &backend.origin(),
        "max_buffered_bytes = \"16KiB\"",
    )
    .await;
    let mut declared = Vec::new();
    for i in 0..2 {
        let mut s = put_head(&proxy, &format!("/docs/w{i}"), 16 * KIB).await;
        s.write_all(&vec![b'w'; 2 * KIB]).await.unwrap();
        declared.push(s);
    }
    assert!(
        eventually(Duration::from_secs(5), holds(&proxy, 4 * KIB)).await,
        "{}",
        metrics(&proxy)
    );

    let c = Client::new();
    let r = c.get(&proxy.url("/docs/read"), &[]).await;
    assert!(r.header("etag").is_some(), "the GET found room");

    // 14 KiB at once, with 12 KiB of room: the read stops, and the body streams on whole.
    let body: Vec<u8> = (0..14 * KIB).map(|i| (i % 251) as u8).collect();
    let r = c.put(&proxy.url("/docs/big"), &[], body.clone()).await;
    assert_eq!(r.status, 201);
    assert_eq!(backend.store.get("/docs/big").unwrap(), body);
    assert!(metrics(&proxy)
        .contains("ifmatch_over_budget_bodies_total{route=\"/docs/\",body=\"request\"} 1"));
    // Refused once read in part (a stale tag) with its last KiB still to come: the rest is
    // unread, and the answer says the connection closes (hyper says so itself for a body
    // still open). (One read to its end keeps it: see below.) The rest, sent once the answer
    // is decided, is read and dropped before the close, as nginx lingers.
    let mut s = tokio::net::TcpStream::connect(proxy.addr).await.unwrap();
    let head = format!(
        "PUT /docs/big HTTP/1.1\r\nHost: a\r\nIf-Match: \"stale\"\r\nContent-Length: {}\r\n\r\n",
        body.len()
    );
    s.write_all(head.as_bytes()).await.unwrap();
    s.write_all(&body[..13 * KIB]).await.unwrap();
    let mut first = [0u8; 12];
    s.read_exact(&mut first).await.unwrap();
    assert_eq!(&first, b"HTTP/1.1 412", "answered before the rest was sent");
    s.write_all(&body[13 * KIB..]).await.unwrap();
    let got = String::from_utf8_lossy(&first).to_ascii_lowercase()
        + &answer(&mut s).await.to_ascii_lowercase();
    assert!(got.starts_with("http/1.1 412"), "{got}");
    assert!(got.contains("\r\nconnection: close\r\n"), "{got}");
    drop(declared);
}

/// A document store behind a proxy whose bodies read whole (up to 16 KiB) must come chunk by
/// chunk within a second.
async fn with_a_one_second_idle_timeout() -> (common::Backend, Proxy) {
    let backend = common::Backend::start().await;
    let route = route(
        "/docs/",
        "upstream_timeout = \"1s\"\nmax_tag_body = \"16KiB\"",
    );
    let proxy = Proxy::start(&route, &backend.origin()).await;
    (backend, proxy)
}

/// A body read whole must arrive chunk by chunk within `upstream_timeout` of the one before
/// (nginx's `client_body_timeout`), as a streamed body must: a slow but steady upload of
/// a small body once got 408 while a larger one at the same rate streamed through.
#[tokio::test]
async fn a_slow_but_steady_upload_read_whole_is_not_timed_out() {
    let (backend, proxy) = with_a_one_second_idle_timeout().await;
    let mut s = put_head(&proxy, "/docs/slow", 8 * KIB).await;
    // 8 KiB in eight pieces 300 ms apart: 2.4 s in all, each within the second.
    for _ in 0..8 {
        tokio::time::sleep(Duration::from_millis(300)).await;
        s.write_all(&vec![b's'; KIB]).await.unwrap();
    }
    let answer = answer(&mut s).await;
    assert!(answer.starts_with("HTTP/1.1 201"), "{answer}");
    assert_eq!(backend.store.get("/docs/slow").unwrap().len(), 8 * KIB);
}

/// A body whose read-whole found no room streams on after what was read of it; until that
/// prefix has gone, it still counts in the budget (it waits for the URL's lock meanwhile),
/// else a client could hold up to `max_tag_body` uncounted per connection.
#[tokio::test]
async fn a_body_that_found_no_room_counts_what_was_read_until_it_goes() {
    let backend = common::Backend::start().await;
    let proxy = Proxy::start_with(
        &route("/docs/", "max_tag_body = \"16KiB\"\nlock_timeout = \"5s\""),
        &backend.origin(),
        "max_buffered_bytes = \"16KiB\"",
    )
    .await;
    // 4 KiB held by a client that declared more.
    let mut declared = put_head(&proxy, "/docs/other", 16 * KIB).await;
    declared.write_all(&vec![b'd'; 4 * KIB]).await.unwrap();
    assert!(
        eventually(Duration::from_secs(5), holds(&proxy, 4 * KIB)).await,
        "{}",
        metrics(&proxy)
    );
    // The URL's lock, held by a write over `max_tag_body` (so streamed) still uploading.
    let mut locker = put_head(&proxy, "/docs/big", 20 * KIB).await;
    locker.write_all(b"abc").await.unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    // 8 KiB fits, the next 6 KiB does not: the write waits for the lock with 8 KiB read.
    let mut big = put_head(&proxy, "/docs/big", 14 * KIB).await;
    big.write_all(&vec![b'b'; 8 * KIB]).await.unwrap();
    assert!(
        eventually(Duration::from_secs(5), holds(&proxy, 12 * KIB)).await,
        "{}",
        metrics(&proxy)
    );
    big.write_all(&vec![b'b'; 6 * KIB]).await.unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        holds(&proxy, 12 * KIB)(),
        "the 8 KiB read still count: {}",
        metrics(&proxy)
    );

    // The lock is let go; the big write streams on, whole, and its share goes.
    locker.write_all(&vec![b'l'; 20 * KIB - 3]).await.unwrap();
    let answer = answer(&mut big).await;
    assert!(answer.starts_with("HTTP/1.1 20"), "{answer}");
    assert_eq!(backend.store.get("/docs/big").unwrap().len(), 14 * KIB);
    assert!(
        eventually(Duration::from_secs(5), holds(&proxy, 4 * KIB)).await,
        "{}",
        metrics(&proxy)
    );
    drop(declared);
}

/// A body read whole that drips in (a byte per period, each within the idle timeout) once
/// held its share of the budget for as long as the client liked: sixteen such clients
/// could strip every GET of its tag for hours. Past the idle timeout, a body slower than
/// `MIN_READ_RATE` streams on instead, and its share goes as soon as what was read has gone
/// up; the write still succeeds, whole.
#[tokio::test]
async fn a_dripping_upload_read_whole_gives_its_share_back_and_still_goes_through() {
    let (backend, proxy) = with_a_one_second_idle_timeout().await;
    let len = 4 * KIB + 10;
    let mut s = put_head(&proxy, "/docs/drip", len).await;
    s.write_all(&vec![b'd'; 4 * KIB]).await.unwrap();
    assert!(
        eventually(Duration::from_secs(2), holds(&proxy, 4 * KIB)).await,
        "{}",
        metrics(&proxy)
    );
    let mut gave_back = false;
    for _ in 0..10 {
        tokio::time::sleep(Duration::from_millis(300)).await;
        s.write_all(b"x").await.unwrap();
        gave_back |= holds(&proxy, 0)();
    }
    assert!(
        gave_back,
        "the share was held to the end: {}",
        metrics(&proxy)
    );
    let answer = answer(&mut s).await;
    assert!(answer.starts_with("HTTP/1.1 201"), "{answer}");
    assert_eq!(backend.store.get("/docs/drip").unwrap().len(), len);
}

/// A GET judged by tags (`If-None-Match`) whose chunked body runs out of room and then
/// grows past `max_tag_body`: the chunks it let go when the room ran out are not there to
/// send, so it must not be sent from where the limit was crossed: it gets its whole body.
#[tokio::test]
async fn a_judged_get_whose_chunked_body_outgrows_the_budget_then_the_limit_is_sent_whole() {
    // Two held bodies take 128 KiB of the 160: 32 KiB of room for a 192 KiB chunked body,
    // whose tagging limit is 128 KiB.
    let (proxy, gate) = behind_a_bound("160KiB").await;
    let held = hold_two(&proxy).await;
    let doc = "/docs/chunkedbig-1";
    let rsp = Client::new()
        .get(&proxy.url(doc), &[("if-none-match", "\"stale\"")])
        .await;
    assert_eq!((rsp.status, rsp.header("etag")), (200, None));
    assert_eq!(
        rsp.body.len(),
        192 * KIB,
        "the whole body, not what came after the limit"
    );
    assert_eq!(rsp.body, body_of(doc, 192 * KIB));
    release(&proxy, &gate, held).await;
}

/// A write refused while the budget is full (its body, read to its end, then found no room
/// and was kept to stream): nothing of the body is left unread, so its HTTP/1.1 connection
/// stays open for the client's next request, as after any other 412.
#[tokio::test]
async fn a_write_refused_while_the_budget_is_full_keeps_its_connection() {
    let (proxy, gate) = behind_a_bound("128KiB").await;
    let url = proxy.url("/docs/plain");
    let tag = Client::new().get(&url, &[]).await.etag();
    assert!(!tag.is_empty());
    let held = hold_two(&proxy).await;

    let mut s = tokio::net::TcpStream::connect(proxy.addr).await.unwrap();
    let put = "PUT /docs/plain HTTP/1.1\r\nHost: a\r\nIf-Match: \"stale\"\r\n\
               Content-Length: 8\r\n\r\nnew text";
    s.write_all(put.as_bytes()).await.unwrap();
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    // The 412's head and its (short) problem body.
    while !String::from_utf8_lossy(&got).contains("\r\n\r\n") {
        let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf))
            .await
            .expect("answered")
            .unwrap();
        assert!(n > 0, "closed before an answer");
        got.extend_from_slice(&buf[..n]);
    }
    let first = String::from_utf8_lossy(&got).to_ascii_lowercase();
    assert!(first.starts_with("http/1.1 412"), "{first}");
    assert!(
        !first.contains("connection: close"),
        "a body read to its end closes nothing: {first}"
    );
    tokio::time::sleep(Duration::from_millis(100)).await;
    let get = "GET /docs/plain HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n";
    let _ = s.write_all(get.as_bytes()).await;
    let rest = answer(&mut s).await;
    assert_eq!(
        rest.matches("HTTP/1.1 200").count(),
        1,
        "the next request on the connection is answered: {rest}"
    );

    release(&proxy, &gate, held).await;
}
