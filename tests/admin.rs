//! The admin listener on the real binary: health, readiness (including during a drain), and
//! metrics whose exact counts follow a known sequence of requests.

mod common;

use std::time::Duration;

use common::binary::{free_port, Binary};
use common::{raw_exchange, Backend, Client, ScriptedBackend};

fn metric(text: &str, series: &str) -> u64 {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or_else(|| panic!("no series {series} in\n{text}"))
}

#[tokio::test]
async fn metrics_count_a_known_sequence_exactly() {
    let store = Backend::start().await;
    store.store.put("/docs/a", "v1");
    store.store.put("/big/x", "a body longer than ten bytes");
    let dead = free_port();
    let slow = ScriptedBackend::slow(Duration::from_secs(5), "late").await;
    let o = store.origin();
    let config = format!(
        "[server]\nlisten = \"{{listen}}\"\n[admin]\nlisten = \"127.0.0.1:0\"\n\
         [[route]]\nprefix = \"/docs/\"\nupstream = \"{o}\"\nvalidation = \"cached\"\n\
         [[route]]\nprefix = \"/strict/\"\nupstream = \"{o}\"\nrequire_precondition = true\n\
         [[route]]\nprefix = \"/dead/\"\nupstream = \"http://127.0.0.1:{dead}\"\n\
         [[route]]\nprefix = \"/slow/\"\nupstream = \"{}\"\nupstream_timeout = \"300ms\"\n\
         [[route]]\nprefix = \"/big/\"\nupstream = \"{o}\"\nmax_tag_body = \"10B\"\n",
        slow.origin()
    );
    let bin = Binary::start(&config, &[]).await;
    let admin = bin.logged_addr("admin endpoints").await;
    let c = Client::new();
    let a = bin.url("/docs/a");
    let t1 = c.get(&a, &[]).await.etag();
    assert_eq!(c.get(&a, &[]).await.status, 200);
    assert_eq!(c.get(&a, &[("if-none-match", &t1)]).await.status, 304);
    assert_eq!(
        c.put(&a, &[("if-match", "\"stale\"")], "x").await.status,
        412
    ); // cache hit
    assert_eq!(c.put(&a, &[("if-match", &t1)], "v2").await.status, 204); // cache hit
    let t2 = c.get(&a, &[]).await.etag();
    store.store.put("/docs/a", "v2"); // same bytes, written behind the proxy's back
    assert_eq!(c.put(&a, &[("if-match", &t2)], "v3").await.status, 204); // hit again
    assert_eq!(c.put(&a, &[("if-match", &t2)], "v4").await.status, 412); // miss: revalidates
    assert_eq!(c.put(&bin.url("/strict/a"), &[], "x").await.status, 428);
    assert_eq!(c.put(&a, &[("if-match", "abc")], "x").await.status, 400);
    assert_eq!(c.get(&bin.url("/dead/x"), &[]).await.status, 502);
    assert_eq!(c.get(&bin.url("/slow/x"), &[]).await.status, 504);
    assert_eq!(c.get(&bin.url("/nowhere"), &[]).await.status, 404);
    let big = c.get(&bin.url("/big/x"), &[]).await;
    assert!(big.header("etag").is_none());
    // Refused by the framing checks, before routing: counted all the same.
    let twice =
        "PUT /docs/a HTTP/1.1\r\nHost: a\r\nContent-Length: 1\r\nContent-Length: 1\r\n\r\nx";
    assert!(raw_exchange(bin.addr, twice.as_bytes())
        .await
        .starts_with("HTTP/1.1 400 "));
    // Heads hyper's parser refuses itself: counted apart, having no route or method.
    let folded = "GET /docs/a HTTP/1.1\r\nHost: a\r\nX-A: 1\r\n folded\r\n\r\n";
    assert!(raw_exchange(bin.addr, folded.as_bytes())
        .await
        .starts_with("HTTP/1.1 400 "));
    let huge = format!(
        "GET /docs/a HTTP/1.1\r\nX-A: {}\r\n\r\n",
        "a".repeat(200_000)
    );
    assert!(raw_exchange(bin.addr, huge.as_bytes())
        .await
        .starts_with("HTTP/1.1 431 "));

    // A head hyper refuses is counted once its connection has ended, which the client may
    // see first: wait (2 s at most) for both such heads to be counted.
    let counted = |t: &str| {
        ["invalid", "too_large"].iter().all(|r| {
            t.contains(&format!(
                "ifmatch_malformed_requests_total{{reason=\"{r}\"}} 1"
            ))
        })
    };
    let mut m = c.get(&format!("http://{admin}/metrics"), &[]).await;
    for _ in 0..40 {
        if counted(&m.text()) {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        m = c.get(&format!("http://{admin}/metrics"), &[]).await;
    }
    assert_eq!(m.status, 200);
    assert!(m
        .header("content-type")
        .unwrap()
        .starts_with("text/plain; version=0.0.4"));
    let t = m.text();
    let r = |labels: &str| metric(&t, &format!("ifmatch_requests_total{{{labels}}}"));
    assert_eq!(r("route=\"/docs/\",method=\"GET\",status=\"200\""), 3);
    assert_eq!(r("route=\"/docs/\",method=\"GET\",status=\"304\""), 1);
    assert_eq!(r("route=\"/docs/\",method=\"PUT\",status=\"412\""), 2);
    assert_eq!(r("route=\"/docs/\",method=\"PUT\",status=\"204\""), 2);
    assert_eq!(r("route=\"/docs/\",method=\"PUT\",status=\"400\""), 1);
    assert_eq!(r("route=\"/strict/\",method=\"PUT\",status=\"428\""), 1);
    assert_eq!(r("route=\"/dead/\",method=\"GET\",status=\"502\""), 1);
    assert_eq!(r("route=\"none\",method=\"GET\",status=\"404\""), 1);
    assert_eq!(r("route=\"none\",method=\"PUT\",status=\"400\""), 1);
    assert_eq!(r("route=\"/big/\",method=\"GET\",status=\"200\""), 1);
    let p = |labels: &str| metric(&t, &format!("ifmatch_proxy_responses_total{{{labels}}}"));
    assert_eq!(p("route=\"/docs/\",status=\"304\""), 1);
    assert_eq!(p("route=\"/docs/\",status=\"412\""), 2);
    assert_eq!(p("route=\"/docs/\",status=\"400\""), 1);
    assert_eq!(p("route=\"/strict/\",status=\"428\""), 1);
    assert_eq!(p("route=\"/dead/\",status=\"502\""), 1);
    assert_eq!(p("route=\"none\",status=\"404\""), 1);
    assert_eq!(p("route=\"none\",status=\"400\""), 1);
    assert!(
        !t.contains("ifmatch_proxy_responses_total{route=\"/docs/\",status=\"204\"}"),
        "204s came from the backend"
    );
    assert_eq!(
        metric(&t, "ifmatch_revalidations_total{route=\"/docs/\"}"),
        1
    );
    let malformed = |reason: &str| {
        metric(
            &t,
            &format!("ifmatch_malformed_requests_total{{reason=\"{reason}\"}}"),
        )
    };
    assert_eq!(malformed("invalid"), 1);
    assert_eq!(malformed("too_large"), 1);
    assert_eq!(metric(&t, "ifmatch_tag_cache_hits_total"), 3);
    assert_eq!(metric(&t, "ifmatch_tag_cache_misses_total"), 1);
    assert_eq!(metric(&t, "ifmatch_tag_cache_evictions_total"), 0);
    // Bodies of /docs/a read: v1 (no copy yet), v1 and v1 (equal to the copy), v2, then v3
    // by the revalidation (each differing from the copy before).
    assert_eq!(metric(&t, "ifmatch_tag_memo_hits_total"), 2);
    assert_eq!(metric(&t, "ifmatch_tag_memo_misses_total"), 3);
    assert_eq!(metric(&t, "ifmatch_tag_memo_evictions_total"), 0);
    let copy = ifmatch::memo::BodyMemo::cost(&common::proxy::key(&o, "/docs/a"), 2);
    assert_eq!(
        metric(&t, "ifmatch_tag_memo_bytes"),
        copy as u64,
        "one copy, of \"v3\""
    );
    assert_eq!(
        metric(&t, "ifmatch_tag_cache_entries"),
        1,
        "/docs/a (a revalidated tag)"
    );
    assert_eq!(
        metric(&t, "ifmatch_lock_wait_seconds_count"),
        4,
        "the four writes that took the lock"
    );
    assert_eq!(
        metric(&t, "ifmatch_untagged_large_bodies_total{route=\"/big/\"}"),
        1
    );
    // GET x4 (the 304 too: it is answered from a fetched 200), PUT x2, revalidation GET x1.
    assert_eq!(
        metric(
            &t,
            "ifmatch_upstream_latency_seconds_count{route=\"/docs/\"}"
        ),
        7
    );
    // A timeout counts with the time it waited, so a backend slowing past it shows in the
    // quantiles; a refused connection has no latency to count.
    let slow = |le: &str| {
        metric(
            &t,
            &format!("ifmatch_upstream_latency_seconds_bucket{{route=\"/slow/\",le=\"{le}\"}}"),
        )
    };
    assert_eq!((slow("0.25"), slow("0.5"), slow("+Inf")), (0, 1, 1));
    assert!(
        !t.contains("ifmatch_upstream_latency_seconds_count{route=\"/dead/\"}"),
        "{t}"
    );
}

/// Two routes with one prefix, one of them for one host only, are two routes to an operator
/// too: each has its own series, the host-specific one labelled with its host.
#[tokio::test]
async fn routes_that_share_a_prefix_for_two_hosts_are_counted_apart() {
    let store = Backend::start().await;
    store.store.put("/docs/a", "v1");
    let o = store.origin();
    let config = format!(
        "[server]\nlisten = \"{{listen}}\"\n[admin]\nlisten = \"127.0.0.1:0\"\n\
         [[route]]\nprefix = \"/docs/\"\nhost = \"a.example\"\nupstream = \"{o}\"\n\
         require_precondition = true\n\
         [[route]]\nprefix = \"/docs/\"\nupstream = \"{o}\"\n"
    );
    let bin = Binary::start(&config, &[]).await;
    let admin = bin.logged_addr("admin endpoints").await;
    let c = Client::new();
    let a = bin.url("/docs/a");
    for _ in 0..2 {
        assert_eq!(c.get(&a, &[("host", "a.example")]).await.status, 200);
    }
    assert_eq!(c.put(&a, &[("host", "a.example")], "x").await.status, 428);
    assert_eq!(c.get(&a, &[("host", "b.example")]).await.status, 200);
    let t = c.get(&format!("http://{admin}/metrics"), &[]).await.text();
    let r = |labels: &str| metric(&t, &format!("ifmatch_requests_total{{{labels}}}"));
    assert_eq!(
        r("route=\"/docs/\",host=\"a.example\",method=\"GET\",status=\"200\""),
        2
    );
    assert_eq!(
        r("route=\"/docs/\",host=\"a.example\",method=\"PUT\",status=\"428\""),
        1
    );
    assert_eq!(r("route=\"/docs/\",method=\"GET\",status=\"200\""), 1);
    assert_eq!(
        metric(
            &t,
            "ifmatch_proxy_responses_total{route=\"/docs/\",host=\"a.example\",status=\"428\"}"
        ),
        1
    );
    assert!(
        !t.contains("ifmatch_proxy_responses_total{route=\"/docs/\",status=\"428\"}"),
        "the any-host route answered no 428:\n{t}"
    );
    let latency = |labels: &str| {
        metric(
            &t,
            &format!("ifmatch_upstream_latency_seconds_count{{{labels}}}"),
        )
    };
    assert_eq!(latency("route=\"/docs/\",host=\"a.example\""), 2);
    assert_eq!(latency("route=\"/docs/\""), 1);
}

#[tokio::test]
async fn health_and_readiness_including_during_a_drain() {
    let slow = ScriptedBackend::slow(Duration::from_millis(1500), "slow").await;
    let config = format!(
        "[server]\nlisten = \"{{listen}}\"\n[admin]\nlisten = \"127.0.0.1:0\"\n[[route]]\nprefix = \"/\"\nupstream = \"{}\"\n",
        slow.origin()
    );
    let bin = Binary::start(&config, &[]).await;
    let c = Client::new();
    let admin = bin.logged_addr("admin endpoints").await;
    let url = |p: &str| format!("http://{admin}{p}");
    assert_eq!(c.get(&url("/healthz"), &[]).await.status, 200);
    assert_eq!(c.get(&url("/readyz"), &[]).await.status, 200);
    // Anything but a read is refused, saying what is allowed (RFC 9110 §15.5.6).
    let put = c.put(&url("/healthz"), &[], "x").await;
    assert_eq!(put.status, 405);
    assert_eq!(put.header("allow"), Some("GET, HEAD"));
    // The body says what `Allow` says: a HEAD is answered too.
    assert_eq!(put.text(), "GET or HEAD only\n");
    let in_flight = {
        let u = bin.url("/x");
        tokio::spawn(async move { Client::new().get(&u, &[]).await.status })
    };
    tokio::time::sleep(Duration::from_millis(200)).await;
    bin.signal("TERM");
    tokio::time::sleep(Duration::from_millis(200)).await;
    // Draining: still alive, no longer ready.
    let fresh = Client::new();
    assert_eq!(fresh.get(&url("/readyz"), &[]).await.status, 503);
    assert_eq!(fresh.get(&url("/healthz"), &[]).await.status, 200);
    assert_eq!(in_flight.await.unwrap(), 200);
}

/// Out of file descriptors, an accept fails and the pending connection keeps the listener
/// readable: a loop that tried again at once would spin a core and write a warning per try,
/// just when an operator looks at the admin endpoints. Both listeners back off instead, and
/// serve again once descriptors are free. (The limit is lowered on the running process with
/// util-linux's `prlimit`.)
#[tokio::test]
async fn out_of_file_descriptors_the_listeners_back_off_and_recover() {
    let config = "[server]\nlisten = \"{listen}\"\n[admin]\nlisten = \"127.0.0.1:0\"\n\
                  [[route]]\nprefix = \"/\"\nupstream = \"http://127.0.0.1:9\"\n";
    let bin = Binary::start(config, &[]).await;
    let admin = bin.logged_addr("admin endpoints").await;
    let pid = bin.child.id();
    let open = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .count();
    let limit = format!("--nofile={}:{}", open + 2, open + 2);
    let status = std::process::Command::new("prlimit")
        .args(["--pid", &pid.to_string(), &limit])
        .status()
        .expect("prlimit (util-linux) runs");
    assert!(status.success());

    // Client connections take the last descriptors, until the proxy fails to accept one;
    // then an admin connection waits in its backlog with none left for it.
    let mut held = Vec::new();
    for _ in 0..4 {
        held.push(tokio::net::TcpStream::connect(bin.addr).await.unwrap());
    }
    bin.wait_for_log("accept failed", Duration::from_secs(5))
        .await;
    let warned = |what: &str| {
        let log = bin.log();
        log.iter().filter(|l| l.contains(what)).count()
    };
    let waiting = tokio::net::TcpStream::connect(admin).await.unwrap();
    let before = warned("accept failed");
    tokio::time::sleep(Duration::from_secs(1)).await;
    let admin_warnings = warned("admin accept failed");
    let warnings = warned("accept failed") - before;
    assert!(
        admin_warnings >= 1,
        "the admin accept failed: {:?}",
        bin.log()
    );
    // A pause of 50 ms between tries: about 20 a second for each listener, where a spin
    // writes thousands.
    assert!(
        warnings <= 80,
        "{warnings} warnings in a second: the accept loops spin"
    );

    // Descriptors free again: the waiting admin connection is served.
    drop(held);
    drop(waiting);
    let mut metrics = String::new();
    for _ in 0..50 {
        let c = Client::new();
        if let Ok(r) = c
            .try_send("GET", &format!("http://{admin}/metrics"), &[], "")
            .await
        {
            metrics = r.text();
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(metrics.contains("ifmatch_requests_total"), "{metrics}");
}

/// `shutdown_delay`: from the stop signal, /readyz says 503 while the listener still
/// serves new connections, so that a load balancer stops sending before any is refused;
/// then it stops accepting and drains. A second signal cuts the delay short.
#[tokio::test]
async fn with_a_shutdown_delay_the_listener_serves_on_while_readyz_says_503() {
    let backend =
        ScriptedBackend::start(|_| async { common::backend::respond(200, &[], "ok") }).await;
    let config = |delay: &str| {
        format!(
            "[server]\nlisten = \"{{listen}}\"\nshutdown_delay = \"{delay}\"\n[admin]\nlisten = \"127.0.0.1:0\"\n[[route]]\nprefix = \"/\"\nupstream = \"{}\"\n",
            backend.origin()
        )
    };
    let mut bin = Binary::start(&config("1500ms"), &[]).await;
    let admin = bin.logged_addr("admin endpoints").await;
    let signalled = std::time::Instant::now();
    bin.signal("TERM");
    tokio::time::sleep(Duration::from_millis(300)).await;
    let fresh = Client::new();
    assert_eq!(
        fresh
            .get(&format!("http://{admin}/readyz"), &[])
            .await
            .status,
        503
    );
    let served = Client::new().get(&bin.url("/doc"), &[]).await;
    assert_eq!(served.text(), "ok", "a new connection is still served");
    let mut refused = None;
    while signalled.elapsed() < Duration::from_secs(5) {
        if tokio::net::TcpStream::connect(bin.addr).await.is_err() {
            refused = Some(signalled.elapsed());
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let refused = refused.expect("connections are refused once the delay is over");
    assert!(
        refused >= Duration::from_millis(1400),
        "refused after {refused:?}"
    );
    assert_eq!(bin.wait_exit(Duration::from_secs(10)).await, Some(0));

    let mut bin = Binary::start(&config("30s"), &[]).await;
    bin.signal("TERM");
    tokio::time::sleep(Duration::from_millis(300)).await;
    bin.signal("TERM");
    assert_eq!(
        bin.wait_exit(Duration::from_secs(5)).await,
        Some(0),
        "cut short"
    );
}

/// Reads until the server closes `s` or `within` passes: whether it closed, and when.
async fn closed_within(s: &mut tokio::net::TcpStream, within: Duration) -> Option<Duration> {
    use tokio::io::AsyncReadExt;
    let started = std::time::Instant::now();
    let mut buf = [0u8; 1024];
    loop {
        match tokio::time::timeout_at(
            tokio::time::Instant::from_std(started + within),
            s.read(&mut buf),
        )
        .await
        {
            Ok(Ok(0)) | Ok(Err(_)) => return Some(started.elapsed()),
            Ok(Ok(_)) => continue,
            Err(_) => return None,
        }
    }
}

/// The admin port cannot be held: a connection that sends no head, or sits idle after its
/// answer, is closed after `header_read_timeout`, and past 64 at once more are closed at
/// once (the proxy's descriptors are the admin port's too).
#[tokio::test]
async fn admin_connections_are_bounded_in_time_and_number() {
    use tokio::io::AsyncWriteExt;
    use tokio::net::TcpStream;
    let (_backend, _bin, admin) = with_admin("header_read_timeout = \"500ms\"").await;

    let mut silent = TcpStream::connect(admin).await.unwrap();
    let mut idle = TcpStream::connect(admin).await.unwrap();
    idle.write_all(b"GET /healthz HTTP/1.1\r\nHost: a\r\n\r\n")
        .await
        .unwrap();
    for (name, s) in [
        ("silent", &mut silent),
        ("idle after its answer", &mut idle),
    ] {
        let took = closed_within(s, Duration::from_secs(3)).await;
        assert!(took.is_some(), "{name}: still open after 3 s");
    }

    // From eight addresses, eight each (one address holds at most eight).
    let mut held = Vec::new();
    for i in 0..64u8 {
        held.push(connect_from([127, 0, 0, 2 + i / 8], admin).await);
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
    let mut over = connect_from([127, 0, 0, 10], admin).await;
    let took = closed_within(&mut over, Duration::from_millis(400)).await;
    assert!(took.is_some(), "the 65th connection is closed at once");
    // Once they have timed out, the port serves again.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let health = Client::new()
        .get(&format!("http://{admin}/healthz"), &[])
        .await;
    assert_eq!(health.status, 200);
}

/// One client holding its admin connections open (reconnecting as each times out) takes
/// its share, not the port: the kubelet's probes, from another address, are answered.
#[tokio::test]
async fn one_client_cannot_take_every_admin_connection() {
    let (_backend, _bin, admin) = with_admin("").await;
    // The other client, from 127.0.0.2.
    let mut held = Vec::new();
    for _ in 0..64 {
        held.push(connect_from([127, 0, 0, 2], admin).await);
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
    let health = Client::new()
        .get(&format!("http://{admin}/healthz"), &[])
        .await;
    assert_eq!(health.status, 200, "a probe from elsewhere is answered");
    // Its share is 8: the rest of its connections were closed at once.
    let mut open = 0;
    for s in &mut held {
        if closed_within(s, Duration::from_millis(20)).await.is_none() {
            open += 1;
        }
    }
    assert_eq!(open, 8);
}

/// The binary with `server_keys` and an admin listener, in front of a backend that answers
/// "ok"; the admin listener's address.
async fn with_admin(server_keys: &str) -> (ScriptedBackend, Binary, std::net::SocketAddr) {
    let backend =
        ScriptedBackend::start(|_| async { common::backend::respond(200, &[], "ok") }).await;
    let config = format!(
        "[server]\nlisten = \"{{listen}}\"\n{server_keys}\n[admin]\nlisten = \"127.0.0.1:0\"\n[[route]]\nprefix = \"/\"\nupstream = \"{}\"\n",
        backend.origin()
    );
    let bin = Binary::start(&config, &[]).await;
    let admin = bin.logged_addr("admin endpoints").await;
    (backend, bin, admin)
}

/// A connection to `to` from `ip` (all of 127/8 is loopback), as another client would.
async fn connect_from(ip: [u8; 4], to: std::net::SocketAddr) -> tokio::net::TcpStream {
    let s = tokio::net::TcpSocket::new_v4().unwrap();
    s.bind((std::net::Ipv4Addr::from(ip), 0).into()).unwrap();
    s.connect(to).await.unwrap()
}

/// What an operator needs to see that `max_connections` is near, and that the file on disk
/// is not what runs: open client connections beside the limit, and reloads applied and
/// refused, with the last one's result.
#[tokio::test]
async fn open_connections_and_reload_results_are_gauged() {
    let store = Backend::start().await;
    let config = format!(
        "[server]\nlisten = \"{{listen}}\"\nmax_connections = 50\n[admin]\nlisten = \"127.0.0.1:0\"\n\
         [[route]]\nprefix = \"/\"\nupstream = \"{}\"\n",
        store.origin()
    );
    let bin = Binary::start(&config, &[]).await;
    let admin = bin.logged_addr("admin endpoints").await;
    let c = Client::new();
    let scrape = || async { c.get(&format!("http://{admin}/metrics"), &[]).await.text() };
    let t = scrape().await;
    assert_eq!(metric(&t, "ifmatch_connections_limit"), 50);
    assert_eq!(metric(&t, "ifmatch_config_last_reload_successful"), 1);
    // Each connection is counted once its task runs: wait for it (5 s at most).
    let open_reaches = |n: u64| {
        let scrape = &scrape;
        async move {
            for _ in 0..100 {
                if metric(&scrape().await, "ifmatch_connections_open") == n {
                    return true;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            false
        }
    };
    let mut idle = Vec::new();
    for _ in 0..3 {
        idle.push(tokio::net::TcpStream::connect(bin.addr).await.unwrap());
    }
    assert!(open_reaches(3).await);
    drop(idle);
    assert!(open_reaches(0).await);

    bin.write_config("[server]\nlisten = \"{listen}\"\nnot_a_key = 1\n");
    bin.signal("HUP");
    bin.wait_for_log("config reload refused", Duration::from_secs(5))
        .await;
    let t = scrape().await;
    assert_eq!(
        metric(&t, "ifmatch_config_reloads_total{result=\"refused\"}"),
        1
    );
    assert_eq!(
        metric(&t, "ifmatch_config_reloads_total{result=\"applied\"}"),
        0
    );
    assert_eq!(metric(&t, "ifmatch_config_last_reload_successful"), 0);
    bin.reload(&config).await;
    let t = scrape().await;
    assert_eq!(
        metric(&t, "ifmatch_config_reloads_total{result=\"applied\"}"),
        1
    );
    assert_eq!(metric(&t, "ifmatch_config_last_reload_successful"), 1);
}

/// A HEAD to an admin endpoint gets its GET's head and no body over HTTP/2 (h2c) as over
/// HTTP/1.1. hyper's HTTP/2 code sends whatever body the answer has, and a HEAD's with one
/// is malformed (RFC 9113 §8.1.1): the client reset the stream and never saw the status.
#[tokio::test]
async fn a_head_to_the_admin_endpoints_gets_no_body_over_http2_either() {
    let config = "[server]\nlisten = \"{listen}\"\n[admin]\nlisten = \"127.0.0.1:0\"\n\
         [[route]]\nprefix = \"/\"\nupstream = \"http://127.0.0.1:1\"\n";
    let bin = Binary::start(config, &[]).await;
    let admin = bin.logged_addr("admin endpoints").await;
    let url = |p: &str| format!("http://{admin}{p}");
    for (name, c) in [("http/1.1", Client::new()), ("h2c", Client::h2())] {
        for (path, status) in [("/healthz", 200), ("/metrics", 200), ("/nope", 404)] {
            let get = c.get(&url(path), &[]).await;
            let head = c
                .try_send("HEAD", &url(path), &[], bytes::Bytes::new())
                .await
                .unwrap_or_else(|e| panic!("{name}: HEAD {path}: {e}"));
            assert_eq!(head.status, status, "{name}: HEAD {path}");
            assert!(head.body.is_empty(), "{name}: HEAD {path}");
            assert_eq!(
                head.header("content-type"),
                get.header("content-type"),
                "{name}: HEAD {path}"
            );
            // The length the GET's body has (the metrics' text may have grown since).
            let length: usize = head.header("content-length").unwrap().parse().unwrap();
            assert!(length > 0, "{name}: HEAD {path}");
            if path != "/metrics" {
                assert_eq!(length, get.body.len(), "{name}: HEAD {path}");
            }
        }
    }
}
