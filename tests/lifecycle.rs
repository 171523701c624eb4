//! The process lifecycle, on the real binary with real signals: graceful shutdown on SIGTERM
//! and SIGINT, and config reload on SIGHUP.

mod common;

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::binary::Binary;
use common::{Backend, Client, ScriptedBackend};

/// Puts `keys` at the head of a config's `[server]` table.
trait WithServer {
    fn with_server(self, keys: &str) -> String;
}

impl WithServer for String {
    fn with_server(self, keys: &str) -> String {
        self.replacen("[server]\n", &format!("[server]\n{keys}\n"), 1)
    }
}

fn config(routes: &[(&str, &str, &str)]) -> String {
    let mut s = String::from("[server]\nlisten = \"{listen}\"\nshutdown_timeout = \"10s\"\n");
    for (prefix, upstream, extra) in routes {
        s.push_str(&format!(
            "[[route]]\nprefix = \"{prefix}\"\nupstream = \"{upstream}\"\n{extra}\n"
        ));
    }
    s
}

/// A route whose writes are told 504 at 300 ms and then settle for up to 20 s.
const SETTLING: &str = "upstream_timeout = \"300ms\"\nsettle_timeout = \"20s\"";

/// The binary with `routes` and `shutdown_timeout`, once a PUT of `/doc` (on a `SETTLING`
/// route) has been told 504 and is left settling.
async fn with_a_settling_write(routes: &[(&str, &str, &str)], shutdown_timeout: &str) -> Binary {
    let text = config(routes).replace(
        "shutdown_timeout = \"10s\"",
        &format!("shutdown_timeout = \"{shutdown_timeout}\""),
    );
    let bin = Binary::start(&text, &[]).await;
    let r = Client::new().put(&bin.url("/doc"), &[], "new").await;
    assert_eq!(
        r.status, 504,
        "the client stops waiting at upstream_timeout"
    );
    bin
}

async fn slow_backend() -> ScriptedBackend {
    ScriptedBackend::slow(Duration::from_millis(800), "slow but sure").await
}

async fn refused_within(addr: std::net::SocketAddr, within: Duration) -> bool {
    let deadline = Instant::now() + within;
    while Instant::now() < deadline {
        if tokio::net::TcpStream::connect(addr).await.is_err() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    false
}

/// Stops the binary with `sig` while a request is in flight; `threads` is how many threads
/// the process must run meanwhile (main thread plus runtime workers).
async fn graceful_stop_on(sig: &str, server_extra: &str, threads: usize) {
    let backend = slow_backend().await;
    let text = config(&[("/", &backend.origin(), "")]).with_server(server_extra);
    let mut bin = Binary::start(&text, &[]).await;
    let in_flight = {
        let url = bin.url("/doc");
        tokio::spawn(async move { Client::new().get(&url, &[]).await })
    };
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(bin.threads(), threads, "threads with {server_extra:?}");
    bin.signal(sig);
    assert!(
        refused_within(bin.addr, Duration::from_secs(2)).await,
        "new connections are refused"
    );
    let r = in_flight.await.unwrap();
    assert_eq!(r.status, 200, "the in-flight request completed");
    assert_eq!(r.text(), "slow but sure");
    assert_eq!(bin.wait_exit(Duration::from_secs(10)).await, Some(0));
}

/// A signal sent the moment "ifmatch started" is logged is handled, not left to its default
/// action, which kills the process: SIGHUP reloads, SIGTERM drains and exits 0. With one
/// worker, before the fix, 15 SIGHUPs in 20 killed the process (and 17 SIGTERMs in 20).
#[test]
fn a_signal_sent_the_moment_the_start_is_logged_is_handled() {
    let dir = common::TempDir::new("signal-race");
    let path = dir.join("ifmatch.toml");
    let text = config(&[("/", "http://127.0.0.1:9", "")]).replace("{listen}", "127.0.0.1:0");
    std::fs::write(&path, text.with_server("workers = 1")).unwrap();
    for (sig, after) in [
        (libc::SIGHUP, "config reloaded"),
        (libc::SIGTERM, "stopped"),
    ] {
        for _ in 0..5 {
            // A process that logs nothing more fails the test in 10 s instead of hanging it.
            let (mut child, lines) = common::binary::spawn_logged(&path);
            let mut seen = Vec::new();
            let mut wait_for =
                |needle: &str| common::binary::wait_for_line(&lines, &mut seen, needle);
            wait_for("ifmatch started");
            let pid = i32::try_from(child.0.id()).unwrap();
            // SAFETY: a plain kill(2) of the child this test started.
            assert_eq!(unsafe { libc::kill(pid, sig) }, 0);
            wait_for(after);
            if sig == libc::SIGHUP {
                continue;
            }
            let status = child.exit_within(Duration::from_secs(10));
            assert_eq!(status.code(), Some(0), "{status}");
        }
    }
}

/// A SIGHUP sent while the process is still starting (reading its config, binding) is not
/// left to its default action, which kills the process: `systemctl reload` on a
/// `Type=simple` unit, or a sidecar that signals on every config change, may send one at any
/// moment after the exec. The config file is a FIFO here only to hold the start at a known
/// point, mid-read: before the fix the process died of the signal without a word.
#[test]
fn a_sighup_sent_while_the_process_starts_does_not_kill_it() {
    use std::io::Write;

    let dir = common::TempDir::new("sighup-at-start");
    let path = dir.join("ifmatch.toml");
    common::make_fifo(&path);
    let text = config(&[("/", "http://127.0.0.1:9", "")]).replace("{listen}", "127.0.0.1:0");
    let (mut child, lines) = common::binary::spawn_logged(&path);
    let pid = i32::try_from(child.0.id()).unwrap();
    // The process opens its config: the open waits for a writer.
    std::thread::sleep(Duration::from_millis(300));
    // SAFETY: a plain kill(2) of the child this test started.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGHUP) }, 0);
    std::thread::sleep(Duration::from_millis(200));
    assert!(
        child.0.try_wait().unwrap().is_none(),
        "killed by a SIGHUP sent during its start: {:?}",
        child.0.try_wait()
    );
    let open_fifo = || common::fifo_writer(&path);
    let mut fifo = open_fifo().expect("the process still reads its config");
    fifo.write_all(text.as_bytes()).unwrap();
    drop(fifo);
    let mut seen = Vec::new();
    let mut wait_for = |needle: &str| common::binary::wait_for_line(&lines, &mut seen, needle);
    wait_for("ifmatch started");
    // The signal came while the file was being read, so the file may have changed after:
    // it is read again once the proxy runs.
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut fifo = loop {
        match open_fifo() {
            Ok(fifo) => break fifo,
            Err(e) => assert!(Instant::now() < deadline, "the file is not read again: {e}"),
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    fifo.write_all(text.as_bytes()).unwrap();
    drop(fifo);
    wait_for("config reloaded");
    // SAFETY: as above.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGTERM) }, 0);
    wait_for("stopped");
    let status = child.exit_within(Duration::from_secs(10));
    assert_eq!(status.code(), Some(0), "{status}");
}

/// A reload reads its files aside from the connections: one that waits on its config (here
/// a FIFO with no writer yet; a slow network disk likewise) holds up no request, even on
/// one worker thread, and is applied once the file is there. Before, the reload read on
/// the only worker, and every connection stood still until the file came.
#[tokio::test]
async fn a_reload_waiting_on_its_file_holds_up_no_request_on_one_worker() {
    use std::io::Write;

    let backend = Backend::start().await;
    backend.store.put("/a", "v1");
    let text = config(&[("/", &backend.origin(), "")]).with_server("workers = 1");
    let bin = Binary::start(&text, &[]).await;
    let c = Client::new();
    assert_eq!(c.get(&bin.url("/a"), &[]).await.status, 200);
    // The config becomes a FIFO: the reload's open waits for a writer.
    let path = bin.config.clone();
    common::make_fifo(&path);
    bin.signal("HUP");
    tokio::time::sleep(Duration::from_millis(300)).await;
    let served = tokio::time::timeout(Duration::from_secs(3), c.get(&bin.url("/a"), &[])).await;
    assert_eq!(
        served.map(|r| r.status).ok(),
        Some(200),
        "a request while the reload waits for its file"
    );
    let mut fifo = common::fifo_writer(&path).expect("the reload still waits to read its config");
    let reloaded = text.replace("{listen}", "127.0.0.1:0");
    fifo.write_all(reloaded.as_bytes()).unwrap();
    drop(fifo);
    bin.wait_for_log("config reloaded", Duration::from_secs(5))
        .await;
    assert_eq!(c.get(&bin.url("/a"), &[]).await.status, 200);
}

/// A stop while a reload still waits on its file (a FIFO with no writer; a hung network
/// disk likewise) ends the process all the same, within `shutdown_timeout`: the reload's
/// thread is of no request, and nothing it could still read would be served.
#[tokio::test]
async fn a_stop_while_a_reload_waits_on_its_file_exits() {
    let backend = Backend::start().await;
    backend.store.put("/a", "v1");
    let text = config(&[("/", &backend.origin(), "")])
        .replace("shutdown_timeout = \"10s\"", "shutdown_timeout = \"1s\"");
    let mut bin = Binary::start(&text, &[]).await;
    common::make_fifo(&bin.config);
    bin.signal("HUP");
    tokio::time::sleep(Duration::from_millis(300)).await;
    bin.signal("TERM");
    bin.wait_for_log("stopped", Duration::from_secs(5)).await;
    assert_eq!(bin.wait_exit(Duration::from_secs(5)).await, Some(0));
}

#[tokio::test]
async fn sigterm_drains_in_flight_requests_refuses_new_ones_and_exits_0() {
    let cpus = std::thread::available_parallelism().unwrap().get();
    graceful_stop_on("TERM", "", 1 + cpus).await;
}

/// One worker thread does the work; the main thread only waits for the server to end.
#[tokio::test]
async fn one_worker_runs_one_worker_thread_and_still_drains_on_sigterm() {
    graceful_stop_on("TERM", "workers = 1", 2).await;
}

#[tokio::test]
async fn sigint_stops_gracefully_too() {
    graceful_stop_on("INT", "workers = 2", 3).await;
}

/// Connections with no request in flight when the proxy stops (a head half-sent, an HTTP/2
/// preface without its SETTINGS, a TLS handshake begun and not finished) get the second's
/// grace an idle connection gets. With the default `header_read_timeout` (30 s) they held
/// the drain to `shutdown_timeout`, which then warned of requests that never were.
#[tokio::test]
async fn connections_without_a_request_do_not_hold_the_drain() {
    use tokio::io::AsyncWriteExt;
    let backend =
        ScriptedBackend::start(|_| async { common::backend::respond(200, &[], "ok") }).await;
    let plain = config(&[("/", &backend.origin(), "")]);
    let pki = common::tls::Pki::new("drain", common::tls::KeyType::EcdsaP256);
    let tls = plain.replacen("[[route]]", &format!("{}[[route]]", pki.server_toml()), 1);
    let starts: [(&str, &[&[u8]]); 2] = [
        (
            &plain,
            &[
                b"GET /x HTTP/1.1\r\nHost: a\r\n",
                b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",
            ],
        ),
        // The first bytes of a ClientHello: a handshake begun.
        (&tls, &[b"\x16\x03\x01\x00\xc8\x01\x00"]),
    ];
    for (text, sends) in starts {
        let mut bin = Binary::start(text, &[]).await;
        let mut held = Vec::new();
        for bytes in sends {
            let mut s = tokio::net::TcpStream::connect(bin.addr).await.unwrap();
            s.write_all(bytes).await.unwrap();
            held.push(s);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        let stopped = Instant::now();
        bin.signal("TERM");
        assert_eq!(bin.wait_exit(Duration::from_secs(15)).await, Some(0));
        let took = stopped.elapsed();
        assert!(
            took < Duration::from_secs(4),
            "the drain took {took:?} (shutdown_timeout 10s)"
        );
        assert!(
            !bin.log()
                .iter()
                .any(|l| l.contains("did not finish in time")),
            "no request was in flight"
        );
    }
}

/// The drain ends, with a request still in flight, at `shutdown_timeout` or at once on a
/// second SIGTERM or SIGINT (a second Ctrl-C), with a WARN that says which. The request's
/// access line says the shutdown cut it off (503, `outcome="shutdown"`), not that its
/// client left.
#[tokio::test]
async fn a_drain_ends_at_its_deadline_or_a_second_signal_and_says_what_it_cut_off() {
    let slow = ScriptedBackend::slow(Duration::from_secs(8), "too late").await;
    let cases = [
        (
            "shutdown_timeout = \"10s\"",
            true,
            "another signal during the drain",
        ),
        ("shutdown_timeout = \"1s\"", false, "did not finish in time"),
    ];
    for (timeout, second_signal, warning) in cases {
        let text =
            config(&[("/", &slow.origin(), "")]).replace("shutdown_timeout = \"10s\"", timeout);
        let mut bin = Binary::start(&text, &[]).await;
        let in_flight = {
            let url = bin.url("/x");
            tokio::spawn(async move { Client::new().try_send("GET", &url, &[], "").await })
        };
        tokio::time::sleep(Duration::from_millis(200)).await;
        bin.signal("TERM");
        bin.wait_for_log("shutting down", Duration::from_secs(5))
            .await;
        let draining = Instant::now();
        if second_signal {
            bin.signal("INT");
        }
        assert_eq!(bin.wait_exit(Duration::from_secs(15)).await, Some(0));
        let took = draining.elapsed();
        assert!(
            took < Duration::from_secs(3),
            "{timeout}: exited {took:?} into the drain (the backend answers in 8 s)"
        );
        bin.wait_for_log(warning, Duration::from_secs(1)).await;
        assert!(in_flight.await.unwrap().is_err(), "the request was cut off");
        let line = bin
            .wait_for_log("ifmatch::access", Duration::from_secs(1))
            .await;
        assert!(
            line.contains("status=503") && line.contains("outcome=\"shutdown\""),
            "{timeout}: {line}"
        );
    }
}

/// A write told 504 at `upstream_timeout` settles (its URL locked) until the backend answers.
/// A stop waits for it, within `shutdown_timeout`: a process that exited first would let the
/// next one pass a writer the late write then overwrites. At the deadline it exits anyway,
/// and names the write it could not wait for. Before the wait, the process exited once the
/// client's idle connection closed, a second or less after the signal, with the backend's
/// answer still to come.
#[tokio::test]
async fn a_stop_waits_within_its_deadline_for_a_write_whose_client_was_told_504() {
    for (backend_takes, shutdown_timeout, waited) in [
        (Duration::from_millis(2500), "10s", true),
        (Duration::from_secs(8), "1s", false),
    ] {
        let answered = Arc::new(Mutex::new(None::<Instant>));
        let backend = {
            let answered = answered.clone();
            ScriptedBackend::start(move |r| {
                let answered = answered.clone();
                async move {
                    if r.method == "PUT" {
                        tokio::time::sleep(backend_takes).await;
                        *answered.lock().unwrap() = Some(Instant::now());
                        return common::backend::respond(204, &[], "");
                    }
                    common::backend::respond(200, &[], "doc")
                }
            })
            .await
        };
        let routes = [("/", &*backend.origin(), SETTLING)];
        let mut bin = with_a_settling_write(&routes, shutdown_timeout).await;
        bin.signal("TERM");
        bin.wait_for_log("shutting down", Duration::from_secs(5))
            .await;
        let draining = Instant::now();
        bin.wait_for_log("waiting for the backend to answer", Duration::from_secs(2))
            .await;
        assert_eq!(bin.wait_exit(Duration::from_secs(15)).await, Some(0));
        let exited = Instant::now();
        let took = exited - draining;
        if waited {
            let at = answered.lock().unwrap().expect("the backend had answered");
            assert!(at <= exited, "exited before the backend answered");
            bin.wait_for_log("the backend answered a write after", Duration::from_secs(1))
                .await;
        } else {
            assert!(
                took < Duration::from_secs(3),
                "exited {took:?} into the drain; its deadline was {shutdown_timeout}"
            );
            let line = bin
                .wait_for_log("had not answered these writes", Duration::from_secs(1))
                .await;
            assert!(line.contains("/doc"), "the write is named: {line}");
        }
    }
}

/// A drain ended early (at its deadline while a request still held a connection, or by a
/// second signal while it waited for the backend) still names the writes left to settle
/// whose outcome is unknown, as one ended at its deadline during that wait does: the
/// operator is told which URLs a late write may yet change.
#[tokio::test]
async fn a_drain_ended_early_names_the_writes_left_unanswered() {
    for (shutdown_timeout, second_signal) in [("1s", false), ("10s", true)] {
        let backend = ScriptedBackend::start(|r| async move {
            // The write answers late; the read holds its connection past the deadline.
            tokio::time::sleep(Duration::from_secs(8)).await;
            common::backend::respond(204, &[], if r.method == "PUT" { "" } else { "doc" })
        })
        .await;
        let origin = backend.origin();
        let routes = [("/doc", &*origin, SETTLING), ("/", &*origin, "")];
        let mut bin = with_a_settling_write(&routes, shutdown_timeout).await;
        let _read = (!second_signal).then(|| {
            let url = bin.url("/slow");
            tokio::spawn(async move { Client::new().try_send("GET", &url, &[], "").await })
        });
        tokio::time::sleep(Duration::from_millis(200)).await;
        bin.signal("TERM");
        if second_signal {
            bin.wait_for_log("waiting for the backend to answer", Duration::from_secs(5))
                .await;
            bin.signal("INT");
        }
        assert_eq!(bin.wait_exit(Duration::from_secs(15)).await, Some(0));
        let named = bin
            .log()
            .into_iter()
            .find(|l| l.contains("had not answered"));
        assert!(
            named.as_ref().is_some_and(|l| l.contains("/doc")),
            "second signal: {second_signal}: the unanswered write is not named: {:#?}",
            bin.log()
        );
    }
}

/// An HTTP/2 client that gives up on a write during the drain (resets its stream, or closes
/// its connection) leaves it to settle like any other: the stop waits for the backend's
/// answer. hyper runs an HTTP/2 request in a task of its own, which learns of the reset
/// only after the connection, done with its last stream, has ended and let the drain on.
#[tokio::test]
async fn a_stop_waits_for_an_http2_write_whose_client_gave_up_during_the_drain() {
    for close_connection in [false, true] {
        let answered = Arc::new(Mutex::new(None::<Instant>));
        let backend = {
            let answered = answered.clone();
            ScriptedBackend::start(move |r| {
                let answered = answered.clone();
                async move {
                    if r.method == "PUT" {
                        tokio::time::sleep(Duration::from_millis(1500)).await;
                        *answered.lock().unwrap() = Some(Instant::now());
                        return common::backend::respond(204, &[], "");
                    }
                    common::backend::respond(200, &[], "doc")
                }
            })
            .await
        };
        let mut bin = Binary::start(&config(&[("/", &backend.origin(), "")]), &[]).await;
        let tcp = tokio::net::TcpStream::connect(bin.addr).await.unwrap();
        let (client, conn) = h2::client::handshake(tcp).await.unwrap();
        let conn = tokio::spawn(conn);
        let mut client = client.ready().await.unwrap();
        let req = http::Request::put(bin.url("/doc")).body(()).unwrap();
        let (answer, mut body) = client.send_request(req, false).unwrap();
        body.send_data(bytes::Bytes::from_static(b"new"), true)
            .unwrap();
        let arrived = common::eventually(Duration::from_secs(5), || {
            backend.requests().iter().any(|r| r.method == "PUT")
        });
        assert!(arrived.await, "the write reached the backend");
        bin.signal("TERM");
        bin.wait_for_log("shutting down", Duration::from_secs(5))
            .await;
        match close_connection {
            false => body.send_reset(h2::Reason::CANCEL),
            true => conn.abort(),
        }
        drop((answer, body, client));
        assert_eq!(bin.wait_exit(Duration::from_secs(15)).await, Some(0));
        let exited = Instant::now();
        let at = *answered.lock().unwrap();
        assert!(
            at.is_some_and(|at| at <= exited),
            "exited before the backend answered the write (connection closed: \
             {close_connection}): {:?}",
            bin.log()
        );
    }
}

/// A response whose body hyper has taken whole but not yet flushed to a slow reader is not
/// done: a stop must not cut its connection as one with no request in flight. (Which sizes
/// end up so depends on the socket buffers: several are asked for at once, each from a
/// client that reads nothing until after the stop; on this project's machine 3.6–3.8 MB
/// were cut short before the fix.)
#[tokio::test]
async fn a_stop_does_not_cut_off_a_response_still_being_flushed() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let sizes: Vec<usize> = (0..12).map(|i| 3_400_000 + i * 50_000).collect();
    let backend = ScriptedBackend::start(|r| async move {
        let n: usize = r.uri.path()[1..].parse().unwrap();
        common::backend::respond(200, &[], vec![b'x'; n])
    })
    .await;
    let text = config(&[("/", &backend.origin(), "")]);
    let mut bin = Binary::start(&text, &[]).await;
    let mut clients = Vec::new();
    for n in &sizes {
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket.set_recv_buffer_size(16 * 1024).unwrap();
        let mut s = socket.connect(bin.addr).await.unwrap();
        let head = format!("GET /{n} HTTP/1.1\r\nHost: a\r\n\r\n");
        s.write_all(head.as_bytes()).await.unwrap();
        clients.push(s);
    }
    // Every response is on its way, none read.
    tokio::time::sleep(Duration::from_secs(1)).await;
    bin.signal("TERM");
    tokio::time::sleep(Duration::from_millis(1600)).await;
    for (mut s, n) in clients.into_iter().zip(sizes) {
        let mut got = Vec::new();
        tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut got))
            .await
            .expect("the response ends")
            .unwrap();
        let head_end = got.windows(4).position(|w| w == b"\r\n\r\n").unwrap() + 4;
        assert_eq!(got.len() - head_end, n, "the body of {n} bytes, whole");
    }
    assert_eq!(bin.wait_exit(Duration::from_secs(10)).await, Some(0));
}

/// The same over HTTP/2, for a stream whose end waits for the client's window (the client
/// has not read it all and given window back): a stop must not cut the connection; hyper
/// ends it once the stream is over. (hyper keeps the stream's body, so its request counts
/// as in flight, until h2 has sent it.)
#[tokio::test]
async fn a_stop_does_not_cut_off_an_http2_stream_waiting_for_its_window() {
    const LEN: usize = 16 * 1024;
    let backend =
        ScriptedBackend::start(|_| async { common::backend::respond(200, &[], vec![b'x'; LEN]) })
            .await;
    let mut bin = Binary::start(&config(&[("/", &backend.origin(), "")]), &[]).await;
    let tcp = tokio::net::TcpStream::connect(bin.addr).await.unwrap();
    // A 1 KiB window: the body, one chunk, is taken whole at its first byte of window.
    let (client, conn) = h2::client::Builder::new()
        .initial_window_size(1024)
        .handshake::<_, bytes::Bytes>(tcp)
        .await
        .unwrap();
    tokio::spawn(conn);
    let mut client = client.ready().await.unwrap();
    let req = http::Request::get(bin.url("/x")).body(()).unwrap();
    let (rsp, _) = client.send_request(req, true).unwrap();
    let mut body = rsp.await.unwrap().into_body();
    // The window is used up; the rest of the body waits in the proxy's h2 buffers.
    tokio::time::sleep(Duration::from_secs(1)).await;
    bin.signal("TERM");
    tokio::time::sleep(Duration::from_millis(1600)).await;
    let mut got = 0;
    while let Some(chunk) = body.data().await {
        let chunk = chunk.expect("the stream is not cut off");
        got += chunk.len();
        let _ = body.flow_control().release_capacity(chunk.len());
    }
    assert_eq!(got, LEN);
    assert_eq!(bin.wait_exit(Duration::from_secs(10)).await, Some(0));
}

#[tokio::test]
async fn sighup_swaps_in_a_valid_config_keeping_in_flight_requests_and_the_tag_cache() {
    let store = Backend::start().await;
    store.store.put("/docs/a", "doc a");
    let slow = slow_backend().await;
    let old = config(&[
        ("/docs/", &store.origin(), "validation = \"cached\""),
        ("/slow/", &slow.origin(), ""),
    ]);
    let bin = Binary::start(&old, &[]).await;
    let c = Client::new();
    let tag = c.get(&bin.url("/docs/a"), &[]).await.etag();

    // A request in flight on a route the new config removes.
    let in_flight = {
        let url = bin.url("/slow/x");
        tokio::spawn(async move { Client::new().get(&url, &[]).await })
    };
    tokio::time::sleep(Duration::from_millis(200)).await;
    // Also a change that only a restart can apply: the reload says so and goes on.
    let text = config(&[
        ("/docs/", &store.origin(), "validation = \"cached\""),
        ("/new/", &store.origin(), ""),
    ])
    .with_server("workers = 1");
    bin.write_config(&text);
    bin.signal("HUP");
    bin.wait_for_log("config reloaded", Duration::from_secs(5))
        .await;
    bin.wait_for_log(
        "server.workers changed: it takes effect after a restart",
        Duration::from_secs(1),
    )
    .await;

    assert_eq!(
        in_flight.await.unwrap().status,
        200,
        "finished under the old config"
    );
    let r = c.get(&bin.url("/slow/x"), &[]).await;
    r.assert_problem(404);
    let r = c.get(&bin.url("/new/none"), &[]).await;
    assert_eq!(
        r.json()["error"],
        "no such document",
        "the new route reaches the backend"
    );
    // The remembered tag survived: a cached-route write needs no revalidation GET.
    let reads = store.store.reads();
    let r = c
        .put(&bin.url("/docs/a"), &[("if-match", &tag)], "v2")
        .await;
    assert_eq!(r.status, 204);
    assert_eq!(
        store.store.reads(),
        reads,
        "no revalidation: the tag cache survived the reload"
    );
}

#[tokio::test]
async fn sighup_with_an_invalid_file_keeps_the_old_config_and_logs_why() {
    let store = Backend::start().await;
    store.store.put("/docs/a", "doc a");
    let bin = Binary::start(&config(&[("/docs/", &store.origin(), "")]), &[]).await;
    bin.write_config("[server]\nlisten = \"{listen}\"\n[[route]]\nprefix = \"/docs/\"\nupstream = \"not a url\"\nlock_timeout = \"soon\"\n");
    bin.signal("HUP");
    let line = bin
        .wait_for_log("config reload refused", Duration::from_secs(5))
        .await;
    assert!(line.contains("route.upstream"), "the log says why: {line}");
    // Each problem on a line of its own.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let refused: Vec<String> = bin
        .log()
        .into_iter()
        .filter(|l| l.contains("config reload refused"))
        .collect();
    assert_eq!(refused.len(), 2, "{refused:#?}");
    assert!(refused[1].contains("route.lock_timeout"), "{refused:#?}");
    let r = Client::new().get(&bin.url("/docs/a"), &[]).await;
    assert_eq!(r.status, 200, "the old config keeps serving");
}

/// A reload that changes routes only keeps the kept-alive backend connections: the next
/// request goes on the one open before it. One that changes an upstream setting opens anew.
#[tokio::test]
async fn sighup_keeps_backend_connections_unless_an_upstream_setting_changes() {
    let backend =
        ScriptedBackend::start(|_| async { common::backend::respond(200, &[], "ok") }).await;
    let origin = backend.origin();
    let routes = config(&[("/", &origin, "")]);
    let bin = Binary::start(&routes, &[]).await;
    let c = Client::new();
    for _ in 0..2 {
        assert_eq!(c.get(&bin.url("/x"), &[]).await.status, 200);
    }
    assert_eq!(backend.connections(), 1);

    bin.reload(&config(&[("/", &origin, ""), ("/other/", &origin, "")]))
        .await;
    assert_eq!(c.get(&bin.url("/x"), &[]).await.status, 200);
    assert_eq!(backend.connections(), 1, "kept across a reload of routes");

    let slower = config(&[("/", &origin, "")]).with_server("connect_timeout = \"4s\"");
    bin.reload(&slower).await;
    assert_eq!(c.get(&bin.url("/x"), &[]).await.status, 200);
    assert_eq!(backend.connections(), 2, "made anew with the new setting");
}

/// `trusted_proxies` is read when a connection is accepted: a reload that trusts the
/// ingress applies to its next connection, and one kept alive across it keeps its first say.
#[tokio::test]
async fn sighup_applies_trusted_proxies_to_new_connections() {
    let backend =
        ScriptedBackend::start(|_| async { common::backend::respond(200, &[], "ok") }).await;
    let routes = config(&[("/", &backend.origin(), "")]);
    let bin = Binary::start(&routes, &[]).await;
    let from_ingress = [("x-forwarded-proto", "https")];
    let url = bin.url("/x");
    let proto_seen = |c: Client| {
        let (url, backend) = (url.clone(), &backend);
        async move {
            assert_eq!(c.get(&url, &from_ingress).await.status, 200);
            backend.last().headers["x-forwarded-proto"].clone()
        }
    };
    let kept = Client::new();
    assert_eq!(proto_seen(kept.clone()).await, "http", "nobody is trusted");
    bin.reload(&routes.with_server("trusted_proxies = [\"127.0.0.1\"]"))
        .await;
    assert_eq!(proto_seen(Client::new()).await, "https", "a new connection");
    assert_eq!(proto_seen(kept).await, "http", "the connection from before");
}

#[tokio::test]
async fn sighup_applies_a_new_upstream_idle_timeout() {
    let backend =
        ScriptedBackend::start(|_| async { common::backend::respond(200, &[], "ok") }).await;
    let with_idle = |timeout: &str| {
        config(&[("/", &backend.origin(), "")])
            .with_server(&format!("upstream_idle_timeout = \"{timeout}\""))
    };
    let bin = Binary::start(&with_idle("60s"), &[]).await;
    let c = Client::new();
    let idle_get = || async {
        tokio::time::sleep(Duration::from_millis(400)).await;
        assert_eq!(c.get(&bin.url("/x"), &[]).await.status, 200);
        backend.connections()
    };
    assert_eq!(c.get(&bin.url("/x"), &[]).await.status, 200);
    assert_eq!(idle_get().await, 1, "60s: the idle connection is reused");

    bin.write_config(&with_idle("200ms"));
    bin.signal("HUP");
    bin.wait_for_log("config reloaded", Duration::from_secs(5))
        .await;
    assert_eq!(c.get(&bin.url("/x"), &[]).await.status, 200);
    let before = backend.connections();
    assert_eq!(
        idle_get().await,
        before + 1,
        "200ms after the reload: a connection idle for 400ms is not reused"
    );
}

/// The write of a client that read the document before somebody wrote it around the proxy:
/// it must get 412, and the document must stay as that somebody left it.
async fn assert_stale_write_refused(bin: &Binary, store: &Backend, path: &str, stale_tag: &str) {
    let c = Client::new();
    let writes = store.store.writes();
    let r = c
        .put(&bin.url(path), &[("if-match", stale_tag)], "lost update")
        .await;
    assert_eq!(
        r.status, 412,
        "a tag from before the write around the proxy"
    );
    assert_eq!(
        store.store.writes(),
        writes,
        "the backend never saw the write"
    );
    assert_eq!(store.store.get(path).unwrap(), "written around the proxy");
    let current = c.get(&bin.url(path), &[]).await.etag();
    assert_eq!(r.etag(), current, "the 412 names the current tag");
}

#[tokio::test]
async fn sighup_that_makes_a_route_cached_forgets_the_tags_read_before() {
    // The usual way to adopt `cached`: the last writer that went around the proxy is
    // retired, then the route is switched over. Tags read while that writer was still about
    // may be stale, and `cached` would trust them.
    let store = Backend::start().await;
    store.store.put("/docs/a", "v1");
    let bin = Binary::start(&config(&[("/docs/", &store.origin(), "")]), &[]).await;
    let tag = Client::new().get(&bin.url("/docs/a"), &[]).await.etag();
    store.store.put("/docs/a", "written around the proxy");

    let cached = config(&[("/docs/", &store.origin(), "validation = \"cached\"")]);
    bin.reload(&cached).await;
    bin.wait_for_log("tag cache cleared", Duration::from_secs(1))
        .await;
    assert_stale_write_refused(&bin, &store, "/docs/a", &tag).await;
}

#[tokio::test]
async fn sighup_that_brings_a_cached_route_back_forgets_the_tags_from_before_it_went() {
    let store = Backend::start().await;
    store.store.put("/docs/a", "v1");
    let other = ("/other/", store.origin(), String::new());
    let with_docs = config(&[
        ("/docs/", &store.origin(), "validation = \"cached\""),
        (other.0, &other.1, &other.2),
    ]);
    let bin = Binary::start(&with_docs, &[]).await;
    let tag = Client::new().get(&bin.url("/docs/a"), &[]).await.etag();

    // The route goes (the backend is written directly meanwhile), and comes back.
    bin.reload(&config(&[(other.0, &other.1, &other.2)])).await;
    store.store.put("/docs/a", "written around the proxy");
    bin.reload(&with_docs).await;
    assert_stale_write_refused(&bin, &store, "/docs/a", &tag).await;
}

#[tokio::test]
async fn sighup_that_drops_a_route_inside_a_cached_one_forgets_the_tags_read_through_it() {
    // `/docs/shared/` was revalidated (written by others too); once it is gone, `/docs/`,
    // cached, covers it.
    let store = Backend::start().await;
    store.store.put("/docs/shared/a", "v1");
    let cached = ("/docs/", store.origin(), "validation = \"cached\"");
    let both = config(&[
        (cached.0, &cached.1, cached.2),
        ("/docs/shared/", &store.origin(), ""),
    ]);
    let bin = Binary::start(&both, &[]).await;
    let tag = Client::new()
        .get(&bin.url("/docs/shared/a"), &[])
        .await
        .etag();
    store
        .store
        .put("/docs/shared/a", "written around the proxy");

    bin.reload(&config(&[(cached.0, &cached.1, cached.2)]))
        .await;
    assert_stale_write_refused(&bin, &store, "/docs/shared/a", &tag).await;
}

/// Settings read once at start (here the head limit, the connection bound and TLS on or
/// off) keep their running values after a reload that changes them, everywhere, and each
/// is named in the log; the rest of the file is applied.
#[tokio::test]
async fn sighup_keeps_the_settings_read_at_start_and_names_each_one() {
    let store = Backend::start().await;
    store.store.put("/docs/a", "doc a");
    let text =
        config(&[("/docs/", &store.origin(), "")]).with_server("max_header_bytes = \"16KiB\"");
    let bin = Binary::start(&text, &[]).await;
    let pki = common::tls::Pki::new("reload-kept", common::tls::KeyType::EcdsaP256);
    let new = config(&[
        ("/docs/", &store.origin(), ""),
        ("/new/", &store.origin(), ""),
    ])
    .with_server("max_header_bytes = \"256KiB\"\nmax_connections = 1")
    .replacen("[[route]]", &format!("{}[[route]]", pki.server_toml()), 1);
    bin.reload(&new).await;
    for key in [
        "server.max_header_bytes",
        "server.max_connections",
        "server.tls (on or off)",
    ] {
        let line = format!("{key} changed: it takes effect after a restart");
        bin.wait_for_log(&line, Duration::from_secs(1)).await;
    }

    // Still plain HTTP and the new route served; two clients, each keeping its connection
    // open, are both served (a bound of 1 would refuse the second with 503).
    let c = Client::new();
    assert_eq!(c.get(&bin.url("/docs/a"), &[]).await.status, 200);
    let other = Client::new().get(&bin.url("/new/none"), &[]).await;
    assert_eq!(
        other.json()["error"],
        "no such document",
        "the new route is applied"
    );
    // A 24 KiB head is over the running 16 KiB: the proxy's own 431, as before the reload
    // (before this change the proxy's check took the new limit while hyper's buffer kept
    // the old one).
    let big = "x".repeat(24 * 1024);
    let r = c.get(&bin.url("/docs/a"), &[("x-big", &big)]).await;
    r.assert_problem(431);
}

/// Starts the binary with an open-file limit of `soft`:`hard`.
async fn with_file_limit(config: &str, soft: u64, hard: u64) -> Binary {
    use std::os::unix::process::CommandExt;
    Binary::start_with(config, &[], move |c| {
        // SAFETY: setrlimit is async-signal-safe, and the closure touches nothing else.
        unsafe {
            c.pre_exec(move || {
                let lim = libc::rlimit {
                    rlim_cur: soft,
                    rlim_max: hard,
                };
                match libc::setrlimit(libc::RLIMIT_NOFILE, &lim) {
                    0 => Ok(()),
                    _ => Err(std::io::Error::last_os_error()),
                }
            });
        }
    })
    .await
}

/// A soft open-file limit below the hard one (what shells and service managers often give)
/// is raised to it at start. One still short of `max_connections` is logged; when it runs
/// out, the failed accepts are logged once, not twenty times a second, and the proxy
/// serves again as soon as connections close.
#[tokio::test]
async fn the_open_file_limit_is_raised_checked_and_running_out_is_survived() {
    let backend = Backend::start().await;
    backend.store.put("/a", "v1");
    let config = config(&[("/", &backend.origin(), "")]);
    let roomy = with_file_limit(&config, 64, 4096).await;
    let limits = std::fs::read_to_string(format!("/proc/{}/limits", roomy.child.id())).unwrap();
    let open_files = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .unwrap();
    assert_eq!(
        open_files.split_whitespace().collect::<Vec<_>>()[3..5],
        ["4096", "4096"],
        "{open_files}"
    );
    drop(roomy);

    let bin = with_file_limit(&config, 64, 64).await;
    bin.wait_for_log(
        "open-file limit is short of max_connections",
        Duration::from_secs(5),
    )
    .await;
    let mut idle = Vec::new();
    for _ in 0..100 {
        idle.push(tokio::net::TcpStream::connect(bin.addr).await.unwrap());
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    let failed = |b: &Binary| {
        b.log()
            .iter()
            .filter(|l| l.contains("accept failed"))
            .count()
    };
    assert_eq!(failed(&bin), 1, "{:?}", bin.log());
    drop(idle);
    let c = Client::new();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let r = tokio::time::timeout(Duration::from_secs(2), c.get(&bin.url("/a"), &[])).await;
        if matches!(r, Ok(ref r) if r.status == 200) {
            break;
        }
        assert!(Instant::now() < deadline, "does not serve again");
    }
}

/// The warning's rule: `max_connections` clients, each with an upstream connection, and 64
/// to spare. At 100 connections 264 descriptors are enough and 263 are not.
#[tokio::test]
async fn the_open_file_limit_warning_is_given_exactly_when_short() {
    let backend = Backend::start().await;
    let config = format!(
        "[server]\nlisten = \"{{listen}}\"\nmax_connections = 100\n[[route]]\nprefix = \"/\"\nupstream = \"{}\"\n",
        backend.origin()
    );
    let short = "open-file limit is short of max_connections";
    let enough = with_file_limit(&config, 264, 264).await;
    // The check comes before the line `Binary::start` waited for.
    assert!(
        !enough.log().iter().any(|l| l.contains(short)),
        "{:?}",
        enough.log()
    );
    drop(enough);
    let bin = with_file_limit(&config, 263, 263).await;
    let line = bin.wait_for_log(short, Duration::from_secs(5)).await;
    assert!(line.contains("needed=264"), "{line}");
}

/// One HTTP/1.1 request on `s`, and its response read whole (head and `Content-Length` body).
async fn exchange(s: &mut tokio::net::TcpStream, request: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    s.write_all(request.as_bytes()).await.unwrap();
    let mut out = Vec::new();
    let read = async {
        loop {
            let mut buf = [0; 4096];
            let n = s.read(&mut buf).await.unwrap();
            assert!(n > 0, "closed after {:?}", String::from_utf8_lossy(&out));
            out.extend_from_slice(&buf[..n]);
            let text = String::from_utf8_lossy(&out).into_owned();
            let Some(end) = text.find("\r\n\r\n") else {
                continue;
            };
            let length = text[..end]
                .lines()
                .find_map(|l| {
                    l.to_ascii_lowercase()
                        .strip_prefix("content-length: ")
                        .map(|v| v.parse::<usize>().unwrap())
                })
                .unwrap_or(0);
            if out.len() >= end + 4 + length {
                return text;
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(5), read)
        .await
        .expect("a response within 5 s")
}

/// The binary in front of `origin` with an open-file limit of 64, one client connection it
/// has accepted and answered (an OPTIONS it answers itself: no upstream connection made),
/// and idle clients holding every descriptor left (the failed accept logged).
async fn with_descriptors_used_up(
    origin: &str,
) -> (Binary, tokio::net::TcpStream, Vec<tokio::net::TcpStream>) {
    let bin = with_file_limit(&config(&[("/", origin, "")]), 64, 64).await;
    let mut first = tokio::net::TcpStream::connect(bin.addr).await.unwrap();
    let options = "OPTIONS /a HTTP/1.1\r\nHost: t\r\nMax-Forwards: 0\r\n\r\n";
    let r = exchange(&mut first, options).await;
    assert!(r.starts_with("HTTP/1.1 200"), "{r}");
    let mut idle = Vec::new();
    for _ in 0..100 {
        idle.push(tokio::net::TcpStream::connect(bin.addr).await.unwrap());
    }
    bin.wait_for_log("accept failed", Duration::from_secs(5))
        .await;
    (bin, first, idle)
}

/// So is an upstream named by host name (`http://localhost:PORT`, a compose service):
/// resolving it needs a descriptor too (`/etc/hosts`, a DNS socket), and a lookup that
/// fails for want of one is the proxy's limit, not a name the backend lacks.
#[tokio::test]
async fn out_of_file_descriptors_at_an_upstream_lookup_is_the_proxys_503() {
    let backend = Backend::start().await;
    backend.store.put("/a", "v1");
    let origin = backend.origin().replace("127.0.0.1", "localhost");
    let (_bin, mut first, idle) = with_descriptors_used_up(&origin).await;
    let r = exchange(&mut first, "GET /a HTTP/1.1\r\nHost: t\r\n\r\n").await;
    assert!(r.starts_with("HTTP/1.1 503"), "{r}");
    assert!(r.contains("file descriptors"), "{r}");
    drop(idle);
}

/// Out of file descriptors when it opens an upstream connection, the proxy answers 503 with
/// `Retry-After` and says its own open-file limit is short, as nginx blames itself (500):
/// not a 502 and a warning that send the operator to a backend that is fine. The warning
/// comes once a minute, as the failed accepts' does. Before the fix: a 502 "cannot connect
/// to upstream ...: Too many open files", outcome `upstream_connect`, on every request.
#[tokio::test]
async fn out_of_file_descriptors_at_the_upstream_connect_is_the_proxys_503() {
    let backend = Backend::start().await;
    backend.store.put("/a", "v1");
    let (bin, mut first, idle) = with_descriptors_used_up(&backend.origin()).await;

    let get = "GET /a HTTP/1.1\r\nHost: t\r\n\r\n";
    for _ in 0..2 {
        let r = exchange(&mut first, get).await;
        assert!(r.starts_with("HTTP/1.1 503"), "{r}");
        let head = r.to_ascii_lowercase();
        assert!(head.contains("\r\nretry-after: 1\r\n"), "{r}");
        assert!(head.contains("application/problem+json"), "{r}");
        assert!(r.contains("file descriptors"), "{r}");
        assert!(r.contains("LimitNOFILE") && r.contains("ulimit -n"), "{r}");
    }
    let lines_of_a = |log: &[String]| -> Vec<String> {
        let of_a = |l: &&String| l.contains("ifmatch::access") && l.contains("path=\"/a\"");
        log.iter().filter(of_a).cloned().collect()
    };
    // The lines come through a pipe: the last may trail its response.
    common::eventually(Duration::from_secs(2), || lines_of_a(&bin.log()).len() >= 3).await;
    let log = bin.log();
    let access = lines_of_a(&log);
    assert_eq!(access.len(), 3, "{log:#?}");
    assert!(
        access[1].contains("outcome=\"proxy_out_of_files\""),
        "{}",
        access[1]
    );
    let warned: Vec<_> = log
        .iter()
        .filter(|l| {
            l.contains("WARN") && l.contains("file descriptors") && !l.contains("accept failed")
        })
        .collect();
    assert_eq!(warned.len(), 1, "once a minute: {log:#?}");
    assert!(warned[0].contains("at most once a minute"), "{}", warned[0]);
    assert!(
        !warned[0].contains("cannot connect to upstream"),
        "{}",
        warned[0]
    );

    // Descriptors free, it connects again.
    drop(idle);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let r = exchange(&mut first, get).await;
        if r.starts_with("HTTP/1.1 200") {
            break;
        }
        assert!(Instant::now() < deadline, "does not connect again: {r}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
