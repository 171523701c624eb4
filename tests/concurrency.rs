//! No lost updates: one critical section per URL from the precondition check to the backend's
//! answer, bounded waiting, and no waiting across URLs.

mod common;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::backend::respond;
use common::proxy::route;
use common::{Backend, Client, Proxy, ScriptedBackend};

const WRITERS: usize = 32;
const ROUNDS: usize = 50;

async fn race(validation: &str) {
    let backend = Backend::start().await;
    backend.store.put("/docs/race", "v0");
    let proxy = Proxy::start(&route("/docs/", validation), &backend.origin()).await;
    let url = proxy.url("/docs/race");
    let client = Client::new();
    for round in 0..ROUNDS {
        let tag = client.get(&url, &[]).await.etag();
        let writes_before = backend.store.writes();
        let (won, lost) = common::client::race(&client, &url, &tag, WRITERS, round).await;
        assert_eq!((won, lost), (1, WRITERS - 1), "{validation} round {round}");
        assert_eq!(
            backend.store.writes(),
            writes_before + 1,
            "{validation} round {round}: the backend saw exactly one write"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thirty_two_writers_with_one_fresh_tag_exactly_one_wins_revalidate() {
    race("validation = \"revalidate\"").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thirty_two_writers_with_one_fresh_tag_exactly_one_wins_cached() {
    race("validation = \"cached\"").await;
}

/// With `tag_puts` the winner's own body tag is remembered while the lock is still held, so
/// the losers are refused from the cache, never from a stale read.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thirty_two_writers_with_one_fresh_tag_exactly_one_wins_tag_puts() {
    race("validation = \"cached\"\ntag_puts = true").await;
}

/// A backend that is slow to write and notes the most writes it ever had in flight at once.
async fn slow_counting_backend(delay: Duration) -> (ScriptedBackend, Arc<AtomicUsize>) {
    let in_flight = Arc::new(AtomicUsize::new(0));
    let max = Arc::new(AtomicUsize::new(0));
    let (f, m) = (in_flight.clone(), max.clone());
    let backend = ScriptedBackend::start(move |r| {
        let (f, m) = (f.clone(), m.clone());
        async move {
            if r.method == "GET" {
                return respond(200, &[], "doc");
            }
            let now = f.fetch_add(1, Ordering::SeqCst) + 1;
            m.fetch_max(now, Ordering::SeqCst);
            tokio::time::sleep(delay).await;
            f.fetch_sub(1, Ordering::SeqCst);
            respond(204, &[], "")
        }
    })
    .await;
    (backend, max)
}

#[tokio::test]
async fn an_unconditional_write_cannot_slip_between_a_check_and_its_write() {
    let (backend, max) = slow_counting_backend(Duration::from_millis(200)).await;
    let proxy = Proxy::start(&route("/", ""), &backend.origin()).await;
    let client = Client::new();
    let url = proxy.url("/doc");
    let tag = client.get(&url, &[]).await.etag();
    let conditional = {
        let (c, u) = (client.clone(), url.clone());
        tokio::spawn(async move { c.put(&u, &[("if-match", &tag)], "a").await.status })
    };
    // Started while the conditional write holds the lock.
    tokio::time::sleep(Duration::from_millis(50)).await;
    let blind = {
        let (c, u) = (client.clone(), url.clone());
        tokio::spawn(async move { c.put(&u, &[], "b").await.status })
    };
    assert_eq!(conditional.await.unwrap(), 204);
    assert_eq!(blind.await.unwrap(), 204);
    assert_eq!(
        max.load(Ordering::SeqCst),
        1,
        "writes to one URL never overlap"
    );
}

#[tokio::test]
async fn writes_to_different_urls_do_not_wait_for_each_other() {
    let (backend, max) = slow_counting_backend(Duration::from_millis(300)).await;
    let proxy = Proxy::start(&route("/", ""), &backend.origin()).await;
    let client = Client::new();
    let tasks: Vec<_> = ["/a", "/b"]
        .into_iter()
        .map(|p| {
            let (c, u) = (client.clone(), proxy.url(p));
            tokio::spawn(async move { c.put(&u, &[], "x").await.status })
        })
        .collect();
    for t in tasks {
        assert_eq!(t.await.unwrap(), 204);
    }
    assert_eq!(
        max.load(Ordering::SeqCst),
        2,
        "both writes were at the backend at once"
    );
}

#[tokio::test]
async fn waiting_for_a_busy_url_is_bounded_by_a_503_with_retry_after() {
    let (backend, _) = slow_counting_backend(Duration::from_millis(800)).await;
    let proxy = Proxy::start(&route("/", "lock_timeout = \"100ms\""), &backend.origin()).await;
    let client = Client::new();
    let first = {
        let (c, u) = (client.clone(), proxy.url("/doc"));
        tokio::spawn(async move { c.put(&u, &[], "slow").await.status })
    };
    // Once the first write holds the lock (a fixed sleep could let the second come first
    // on a loaded machine, and the first then wait out the 100 ms).
    let held = || !proxy.state.locks.is_empty();
    assert!(common::eventually(Duration::from_secs(5), held).await);
    let r = client.put(&proxy.url("/doc"), &[], "impatient").await;
    r.assert_problem(503);
    assert_eq!(r.header("retry-after"), Some("1"));
    assert_eq!(first.await.unwrap(), 204);
    assert!(proxy.state.locks.is_empty(), "no lock is left behind");
    // Both waits are in the histogram, the 503's the longest: past 100 ms, under 1 s.
    let s = &proxy.state;
    let text = s.metrics.render(&s.tags, &s.memo, &s.budget);
    let line = |name: &str| {
        let found = text.lines().find(|l| l.starts_with(name));
        found
            .unwrap_or_else(|| panic!("{name} in\n{text}"))
            .to_owned()
    };
    assert_eq!(
        line("ifmatch_lock_wait_seconds_count"),
        "ifmatch_lock_wait_seconds_count 2"
    );
    assert_eq!(
        line("ifmatch_lock_wait_seconds_bucket{le=\"0.1\"}"),
        "ifmatch_lock_wait_seconds_bucket{le=\"0.1\"} 1"
    );
    assert_eq!(
        line("ifmatch_lock_wait_seconds_bucket{le=\"1\"}"),
        "ifmatch_lock_wait_seconds_bucket{le=\"1\"} 2"
    );
}

/// A write's body of known size is read before the URL's lock is taken: a client that
/// stalls mid-body holds up no other writer (under its lock, the second write below would
/// wait past its `lock_timeout`: a 503), and gets a 408 itself, never forwarded. Whether it
/// holds a tag or none, on every kind of route.
#[tokio::test]
async fn a_client_slow_to_send_its_body_holds_up_no_other_writer() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    let cases = [
        ("", false),
        ("validation = \"cached\"", true),
        ("validation = \"cached\"\ntag_puts = true", true),
    ];
    for (extra, conditional) in cases {
        let backend = Backend::start().await;
        backend.store.put("/docs/a", "v1");
        let timeouts = "upstream_timeout = \"1500ms\"\nlock_timeout = \"300ms\"";
        let routes = route("/docs/", &format!("{extra}\n{timeouts}"));
        let proxy = Proxy::start(&routes, &backend.origin()).await;
        let c = Client::new();
        let url = proxy.url("/docs/a");
        let tag = c.get(&url, &[]).await.etag();

        // Three bytes of ten, then nothing.
        let mut slow = tokio::net::TcpStream::connect(proxy.addr).await.unwrap();
        let condition = match conditional {
            true => format!("If-Match: {tag}\r\n"),
            false => String::new(),
        };
        let head =
            format!("PUT /docs/a HTTP/1.1\r\nHost: x\r\n{condition}Content-Length: 10\r\n\r\nabc");
        slow.write_all(head.as_bytes()).await.unwrap();
        tokio::time::sleep(Duration::from_millis(100)).await;

        let r = c.put(&url, &[("if-match", &tag)], "v2").await;
        assert_eq!(r.status, 204, "{extra:?}");
        assert_eq!(backend.store.get("/docs/a").unwrap(), "v2");

        let mut answer = Vec::new();
        tokio::time::timeout(Duration::from_secs(5), slow.read_to_end(&mut answer))
            .await
            .expect("the proxy gives up on the body and closes")
            .unwrap();
        let answer = String::from_utf8_lossy(&answer).to_ascii_lowercase();
        assert!(answer.starts_with("http/1.1 408"), "{extra:?}: {answer}");
        assert!(answer.contains("connection: close"), "{answer}");
        assert!(answer.contains("application/problem+json"), "{answer}");
        assert!(answer.contains("did not arrive within 1.5s"), "{answer}");
        assert_eq!(
            backend.store.writes(),
            1,
            "{extra:?}: the slow PUT was never sent"
        );
        assert!(proxy.state.locks.is_empty());
    }
}

/// A legacy document store that, like a thread-per-request server, carries out a write it
/// has received even when its client (the proxy) goes away meanwhile. The first write takes
/// `first_write`, later ones none. It logs the body of each write as it is applied.
async fn store_that_finishes_what_it_started(
    first_write: Duration,
) -> (
    ScriptedBackend,
    Arc<std::sync::Mutex<(String, Vec<String>)>>,
) {
    let state = Arc::new(std::sync::Mutex::new(("v0".to_owned(), Vec::new())));
    let writes = Arc::new(AtomicUsize::new(0));
    let s = state.clone();
    let backend = ScriptedBackend::start(move |r| {
        let (s, writes) = (s.clone(), writes.clone());
        async move {
            if r.method == "GET" {
                return respond(200, &[], s.lock().unwrap().0.clone());
            }
            let hold = match writes.fetch_add(1, Ordering::SeqCst) {
                0 => first_write,
                _ => Duration::ZERO,
            };
            // Spawned: dropping this handler (the proxy closed the connection) does not
            // stop the write.
            let apply = tokio::spawn(async move {
                tokio::time::sleep(hold).await;
                let body = String::from_utf8(r.body.to_vec()).unwrap();
                let mut s = s.lock().unwrap();
                s.0 = body.clone();
                s.1.push(body);
            });
            apply.await.unwrap();
            respond(204, &[], "")
        }
    })
    .await;
    (backend, state)
}

#[tokio::test]
async fn a_write_whose_client_left_holds_its_url_until_the_backend_has_answered() {
    // Writer A sends its write with the fresh tag and leaves while the backend is still
    // carrying it out. Writer B holds the same tag. If B were checked before A's write was
    // done, both writes would land: B's answered 204, then overwritten by A's.
    for validation in ["", "validation = \"cached\""] {
        let (backend, state) =
            store_that_finishes_what_it_started(Duration::from_millis(800)).await;
        let proxy = Proxy::start(&route("/docs/", validation), &backend.origin()).await;
        let url = proxy.url("/docs/a");
        let c = Client::new();
        let tag = c.get(&url, &[]).await.etag();

        let abandoned = {
            let (url, tag) = (url.clone(), tag.clone());
            async move {
                let c = Client::new();
                let headers = [("if-match", tag.as_str())];
                let send = c.try_send("PUT", &url, &headers, "A");
                let r = tokio::time::timeout(Duration::from_millis(200), send).await;
                assert!(r.is_err(), "A was still waiting for its answer");
            }
        };
        abandoned.await;
        tokio::time::sleep(Duration::from_millis(100)).await; // the proxy has seen A leave
        assert_eq!(
            state.lock().unwrap().1,
            Vec::<String>::new(),
            "A not applied yet"
        );
        assert!(
            !proxy.state.locks.is_empty(),
            "{validation}: A's URL is still locked"
        );

        let r = c.put(&url, &[("if-match", &tag)], "B").await;
        assert_eq!(
            r.status, 412,
            "{validation}: B was checked after A's write landed"
        );
        assert_eq!(r.etag(), c.get(&url, &[]).await.etag());
        assert_eq!(
            state.lock().unwrap().1,
            ["A"],
            "{validation}: only A was applied"
        );
        assert!(
            common::eventually(Duration::from_secs(2), || proxy.state.locks.is_empty()).await,
            "{validation}: no lock left behind"
        );
    }
}

#[tokio::test]
async fn a_move_holds_its_destination_too() {
    // MOVE changes its Destination as much as its own URL: a write to the destination waits
    // for the move's answer, or the move could land on it after that write was answered.
    let events = Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
    let e = events.clone();
    let backend = ScriptedBackend::start(move |r| {
        let e = e.clone();
        async move {
            let what = format!("{} {}", r.method, r.uri.path());
            e.lock().unwrap().push(format!("start {what}"));
            if r.method == "MOVE" {
                tokio::time::sleep(Duration::from_millis(400)).await;
            }
            e.lock().unwrap().push(format!("end {what}"));
            respond(204, &[], "")
        }
    })
    .await;
    let proxy = Proxy::start(&route("/dav/", ""), &backend.origin()).await;
    let mv = {
        let url = proxy.url("/dav/a");
        let to = proxy.url("/dav/b");
        tokio::spawn(async move {
            let r = Client::new()
                .send("MOVE", &url, &[("destination", &to)], "")
                .await;
            r.status
        })
    };
    tokio::time::sleep(Duration::from_millis(100)).await;
    let r = Client::new().put(&proxy.url("/dav/b"), &[], "new b").await;
    assert_eq!((r.status, mv.await.unwrap()), (204, 204));
    assert_eq!(
        *events.lock().unwrap(),
        [
            "start MOVE /dav/a",
            "end MOVE /dav/a",
            "start PUT /dav/b",
            "end PUT /dav/b"
        ]
    );
    assert!(proxy.state.locks.is_empty());
}

/// One document that clients spell two ways, `a@b` and `a%40b` (JavaScript's `encodeURI`
/// keeps `@`, Python's `quote` encodes it), at a backend that decodes paths as nearly all do.
/// The two spellings once had two keys, so two locks: two writers holding the one current
/// tag both passed their check and both wrote, the second undoing the first. They share one
/// key now: one write wins, the other gets 412, whichever spelling each used.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writers_spelling_one_document_two_ways_still_cannot_both_win() {
    use std::collections::HashMap;
    use std::sync::Mutex;
    fn decode(path: &str) -> String {
        let b = path.as_bytes();
        let (mut out, mut i) = (Vec::new(), 0);
        while i < b.len() {
            if b[i] == b'%' && i + 3 <= b.len() {
                if let Ok(v) = u8::from_str_radix(&path[i + 1..i + 3], 16) {
                    out.push(v);
                    i += 3;
                    continue;
                }
            }
            out.push(b[i]);
            i += 1;
        }
        String::from_utf8(out).unwrap()
    }
    let docs = Arc::new(Mutex::new(HashMap::from([(
        "/docs/a@b".to_owned(),
        bytes::Bytes::from("v0"),
    )])));
    let applied = Arc::new(AtomicUsize::new(0));
    let (d, a) = (docs.clone(), applied.clone());
    let backend = ScriptedBackend::start(move |r| {
        let (docs, applied) = (d.clone(), a.clone());
        async move {
            let path = decode(r.uri.path());
            if r.method == http::Method::GET {
                return match docs.lock().unwrap().get(&path) {
                    Some(b) => respond(200, &[], b.clone()),
                    None => respond(404, &[], ""),
                };
            }
            // A slow write: a second writer arrives while the first is at the backend.
            tokio::time::sleep(Duration::from_millis(200)).await;
            docs.lock().unwrap().insert(path, r.body.clone());
            applied.fetch_add(1, Ordering::SeqCst);
            respond(204, &[], "")
        }
    })
    .await;
    let modes = [
        ("validation = \"revalidate\"", "A1", "B1"),
        ("validation = \"cached\"", "A2", "B2"),
    ];
    for (validation, a, b) in modes {
        let proxy = Proxy::start(&route("/docs/", validation), &backend.origin()).await;
        let c = Client::new();
        let (plain, encoded) = (proxy.url("/docs/a@b"), proxy.url("/docs/a%40b"));
        let tag = c.get(&plain, &[]).await.etag();
        assert_eq!(c.get(&encoded, &[]).await.etag(), tag, "one document");
        let before = applied.load(Ordering::SeqCst);
        let first = {
            let (c, url, tag) = (c.clone(), plain.clone(), tag.clone());
            tokio::spawn(async move { c.put(&url, &[("if-match", &tag)], a).await.status })
        };
        tokio::time::sleep(Duration::from_millis(50)).await;
        let second = c.put(&encoded, &[("if-match", &tag)], b).await.status;
        let first = first.await.unwrap();
        // The first is at the backend when the second comes (50 ms, of a 200 ms write): it
        // wins on any machine but one so loaded that the second overtakes it; then that one
        // wins. Either way exactly one, and its bytes stand.
        let winner = match (first, second) {
            (204, 412) => a,
            (412, 204) => b,
            other => panic!("{validation}: {other:?}, not one 204 and one 412"),
        };
        assert_eq!(applied.load(Ordering::SeqCst), before + 1, "{validation}");
        assert_eq!(docs.lock().unwrap()["/docs/a@b"], winner, "{validation}");
    }
}

/// hyper's HTTP/2 server sends no `100 Continue`, so an HTTP/2 client that asks for one
/// waits its own timeout (curl: 1 s) before it sends its body. Such a write went to the
/// path that streams its body under the URL's lock, and held every other writer of the URL
/// for that second; it is read whole before the lock, as any write of known size.
#[tokio::test]
async fn an_http2_write_waiting_for_100_continue_holds_up_no_other_writer() {
    let backend = Backend::start().await;
    backend.store.put("/docs/a", "v1");
    let proxy = Proxy::start(
        &route("/docs/", "lock_timeout = \"300ms\""),
        &backend.origin(),
    )
    .await;
    let mut client = common::h2_client(proxy.addr).await;
    let req = http::Request::put(proxy.url("/docs/a"))
        .header("expect", "100-continue")
        .header("content-length", "2")
        .body(())
        .unwrap();
    let (waiting, mut upload) = client.send_request(req, false).unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;

    let c = Client::new();
    let started = std::time::Instant::now();
    let r = c.put(&proxy.url("/docs/a"), &[], "v2").await;
    assert_eq!(r.status, 204, "not held past lock_timeout");
    assert!(started.elapsed() < Duration::from_millis(300));

    // The waiting client sends its body after all, as curl does after its timeout.
    upload.send_data(bytes::Bytes::from("v3"), true).unwrap();
    assert_eq!(waiting.await.unwrap().status(), 204);
    assert_eq!(backend.store.get("/docs/a").unwrap(), "v3");
}

/// Writer A's write reaches a backend slower than `upstream_timeout`: A is answered 504 at
/// the timeout, but the backend carries the write out all the same (a closed connection does
/// not stop a legacy handler). Writer B holds the same tag. Were B checked before A's write
/// landed, B would pass and be answered 204, then A's write would land on top of it: both
/// writers with one tag would have written. The exchange goes on for `settle_timeout` more
/// (by default as long as `upstream_timeout`) with A's URL locked, so B is checked after A
/// landed and gets 412.
#[tokio::test]
async fn a_write_that_timed_out_holds_its_url_until_the_backend_has_answered() {
    let cases = [
        // (route keys, how long the backend takes over A's write)
        ("settle_timeout = \"3s\"", Duration::from_millis(1200)),
        ("", Duration::from_millis(600)),
    ];
    for (settle, slow) in cases {
        for validation in ["validation = \"revalidate\"", "validation = \"cached\""] {
            let case = format!("{validation} {settle}");
            let (backend, state) = store_that_finishes_what_it_started(slow).await;
            let extra = format!("{validation}\nupstream_timeout = \"400ms\"\n{settle}");
            let proxy = Proxy::start(&route("/docs/", &extra), &backend.origin()).await;
            let url = proxy.url("/docs/a");
            let c = Client::new();
            let tag = c.get(&url, &[]).await.etag();

            let sent = std::time::Instant::now();
            let a = c.put(&url, &[("if-match", &tag)], "A").await;
            assert_eq!(a.status, 504, "{case}: A timed out");
            assert!(
                sent.elapsed() < Duration::from_millis(550),
                "{case}: A was answered at its timeout, not held for the settle"
            );
            assert_eq!(state.lock().unwrap().1, Vec::<String>::new(), "{case}");
            let settling = |n: usize| format!("\nifmatch_writes_settling {n}\n");
            let metrics = proxy.state.render_metrics();
            assert!(
                metrics.contains(&settling(1)),
                "{case}: A settles\n{metrics}"
            );
            let b = c.put(&url, &[("if-match", &tag)], "B").await;
            assert_eq!(
                b.status, 412,
                "{case}: B was checked after A's write landed"
            );
            assert_eq!(
                state.lock().unwrap().1,
                ["A"],
                "{case}: only A's write went up"
            );
            assert_eq!(b.etag(), proxy.tag_of("A"), "{case}");
            let metrics = proxy.state.render_metrics();
            assert!(
                metrics.contains(&settling(0)),
                "{case}: A settled\n{metrics}"
            );
        }
    }
}

/// A store of one document whatever the query (as static files and nginx's WebDAV are
/// served), "v0" at first, that keeps what is PUT and logs each PUT as applied. The first
/// PUT is held, received but not applied, until the test adds a permit to the gate.
async fn gated_store_ignoring_the_query() -> (
    ScriptedBackend,
    Arc<std::sync::Mutex<(String, Vec<String>)>>,
    Arc<tokio::sync::Semaphore>,
) {
    let state = Arc::new(std::sync::Mutex::new(("v0".to_owned(), Vec::new())));
    let gate = Arc::new(tokio::sync::Semaphore::new(0));
    let puts = Arc::new(AtomicUsize::new(0));
    let (s, g) = (state.clone(), gate.clone());
    let backend = ScriptedBackend::start(move |r| {
        let (s, g, puts) = (s.clone(), g.clone(), puts.clone());
        async move {
            if r.method == "GET" {
                return respond(200, &[], s.lock().unwrap().0.clone());
            }
            if puts.fetch_add(1, Ordering::SeqCst) == 0 {
                g.acquire().await.unwrap().forget();
            }
            let body = String::from_utf8(r.body.to_vec()).unwrap();
            let mut s = s.lock().unwrap();
            s.0 = body.clone();
            s.1.push(body);
            respond(204, &[], "")
        }
    })
    .await;
    (backend, state, gate)
}

/// A reload that turns a route's `ignore_query` on or off changes the key of a URL with a
/// query (`/docs/a?v=1` is `/docs/a` under one, itself under the other) while a write to it
/// may be in flight under the old key. Writer A's PUT, with the fresh tag, is held at the
/// backend across the reload; a reader then reads the old bytes (and, under `cached`, the
/// proxy may remember their tag under the new key); writer B sends the same tag to the
/// same URL. B must be checked after A's write landed, and get 412: before, B took the
/// new key's lock, which A did not hold, passed on the old bytes (or the tag remembered
/// under the new key, which A's write did not forget), and both writers got 204.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_that_rekeys_a_url_does_not_let_two_writers_with_one_tag_both_win() {
    let kinds = [
        "validation = \"revalidate\"",
        "validation = \"cached\"",
        "validation = \"cached\"\ntag_puts = true",
    ];
    for kind in kinds {
        for (before, after) in [(false, true), (true, false)] {
            let case = format!("{kind}, ignore_query {before} -> {after}");
            let (backend, state, gate) = gated_store_ignoring_the_query().await;
            let routes =
                |ignore: bool| route("/docs/", &format!("{kind}\nignore_query = {ignore}"));
            let proxy = Proxy::start(&routes(before), &backend.origin()).await;
            let url = proxy.url("/docs/a?v=1");
            let c = Client::new();
            let tag = c.get(&url, &[]).await.etag();

            let write = |body: &'static str| {
                let (url, tag) = (url.clone(), tag.clone());
                tokio::spawn(async move {
                    let headers = [("if-match", tag.as_str())];
                    Client::new().put(&url, &headers, body).await.status
                })
            };
            let a = write("A");
            let received = || backend.requests().iter().any(|r| r.method == "PUT");
            assert!(
                common::eventually(Duration::from_secs(5), received).await,
                "{case}: A reached the backend"
            );
            let text = format!(
                "[server]\nlisten = \"127.0.0.1:0\"\n{}",
                routes(after).replace("{upstream}", &backend.origin())
            );
            proxy
                .state
                .reload(&ifmatch::config::Config::parse(&text, "t.toml").unwrap());
            // A reader under the new routes, while A is held: the old bytes, the old tag.
            assert_eq!(c.get(&url, &[]).await.etag(), tag, "{case}");

            let mut b = write("B");
            // B may not go on while A is held; if it does (the defect), it ends on its own.
            let early = tokio::time::timeout(Duration::from_millis(1000), &mut b).await;
            gate.add_permits(1);
            let a = a.await.unwrap();
            let b = match early {
                Ok(b) => b.unwrap(),
                Err(_) => b.await.unwrap(),
            };
            let won = [a, b].iter().filter(|s| **s / 100 == 2).count();
            assert_eq!(
                (won, state.lock().unwrap().1.clone()),
                (1, vec!["A".to_owned()]),
                "{case}: A got {a}, B got {b}"
            );
            assert_eq!(b, 412, "{case}");
        }
    }
}
