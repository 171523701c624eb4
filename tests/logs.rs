//! Logs on the real binary: one JSON access line per request with the fields an operator
//! needs, and never a body, an Authorization or a Cookie value.

mod common;

use std::time::Duration;

use common::binary::Binary;
use common::{raw_exchange, Backend, Client};

/// The JSON access lines logged so far.
fn access_lines(bin: &Binary) -> Vec<serde_json::Value> {
    bin.log()
        .iter()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| v["target"] == "ifmatch::access")
        .collect()
}

/// A config with one `/docs/` route to `origin` (the listen address filled in by `Binary`).
fn docs_route(origin: &str) -> String {
    format!("[server]\nlisten = \"{{listen}}\"\n[[route]]\nprefix = \"/docs/\"\nupstream = \"{origin}\"\n")
}

#[tokio::test]
async fn json_access_lines_carry_the_fields_and_no_secret() {
    let store = Backend::start().await;
    store.store.put("/docs/a", "SECRET-DOC-BODY");
    let config = docs_route(&store.origin());
    let bin = Binary::start(&config, &["--log-format", "json"]).await;
    let c = Client::new();
    let secrets = [
        ("authorization", "Bearer SECRET-TOKEN"),
        ("cookie", "session=SECRET-COOKIE"),
    ];
    let id = ("x-request-id", "edge-7f3a-42");
    let tag = c
        .get(&bin.url("/docs/a"), &[secrets[0], secrets[1], id])
        .await
        .etag();
    let r = c
        .put(
            &bin.url("/docs/a"),
            &[secrets[0], secrets[1], ("if-match", &tag)],
            "SECRET-BODY",
        )
        .await;
    assert_eq!(r.status, 204);
    let r = c
        .put(
            &bin.url("/docs/a"),
            &[secrets[0], ("if-match", &tag)],
            "SECRET-BODY-2",
        )
        .await;
    assert_eq!(r.status, 412);
    // An id too long to be one is not written out.
    let long = "x".repeat(129);
    let r = c.get(&bin.url("/docs/a"), &[("x-request-id", &long)]).await;
    assert_eq!(r.status, 200);
    let lines = || {
        bin.log()
            .iter()
            .filter(|l| l.contains("ifmatch::access"))
            .count()
    };
    assert!(common::eventually(Duration::from_secs(5), || lines() == 4).await);

    let log = bin.log();
    for secret in [
        "SECRET-TOKEN",
        "SECRET-COOKIE",
        "SECRET-BODY",
        "SECRET-DOC-BODY",
    ] {
        assert!(
            !log.iter().any(|l| l.contains(secret)),
            "{secret} leaked into the log"
        );
    }
    let access: Vec<serde_json::Value> = log
        .iter()
        .map(|l| {
            serde_json::from_str::<serde_json::Value>(l)
                .unwrap_or_else(|e| panic!("not JSON ({e}): {l}"))
        })
        .filter(|v| v["target"] == "ifmatch::access")
        .collect();
    assert_eq!(access.len(), 4, "one access line per request: {access:#?}");
    let want = [
        ("GET", 200, "tagged"),
        ("PUT", 204, "forwarded"),
        ("PUT", 412, "precondition_failed"),
        ("GET", 200, "tagged"),
    ];
    for (line, (method, status, outcome)) in access.iter().zip(want) {
        assert_eq!(line["method"], method, "{line}");
        assert_eq!(line["status"], status, "{line}");
        assert_eq!(line["outcome"], outcome, "{line}");
        assert_eq!(line["route"], "/docs/");
        assert_eq!(line["path"], "/docs/a");
        assert!(line["duration_ms"].as_f64().is_some(), "{line}");
        assert!(line.get("bytes").is_some(), "{line}");
        assert_eq!(line["client"], "127.0.0.1", "{line}");
    }
    assert_eq!(access[0]["request_id"], "edge-7f3a-42");
    for line in &access[1..] {
        assert!(
            line.get("request_id").is_none(),
            "none sent, or too long: {line}"
        );
    }
    assert_eq!(access[0]["upstream_status"], 200);
    assert_eq!(access[0]["bytes"], "SECRET-DOC-BODY".len());
    assert_eq!(access[1]["upstream_status"], 204);
    assert_eq!(access[2]["upstream_status"], 200, "the revalidation GET");
    // Each write revalidated (the route's default); the GETs did not.
    for (line, revalidated) in access.iter().zip([None, Some(200), Some(200), None]) {
        assert_eq!(
            line.get("revalidation_status").and_then(|s| s.as_u64()),
            revalidated,
            "{line}"
        );
    }
}

/// With no `RUST_LOG` the proxy logs at info, and a text line to a pipe reads as the default
/// format writes it, without colour: the target, the message, then `name=value` pairs.
/// Behind a trusted ingress every line's `client` is the ingress: the line also names the
/// client its `X-Forwarded-For` gives, the last address in it that is no trusted proxy's
/// (the ones before it are whatever that client wrote). From any other client the header is
/// the client's own word, and is not read.
#[tokio::test]
async fn an_access_line_behind_a_trusted_proxy_names_the_client_it_forwards_for() {
    let store = Backend::start().await;
    store.store.put("/docs/a", "doc");
    let trusting = |ranges: &str| {
        docs_route(&store.origin()).replace(
            "[[route]]",
            &format!("trusted_proxies = [{ranges}]\n[[route]]"),
        )
    };
    let xff = [("x-forwarded-for", "6.6.6.6, 203.0.113.9, 10.0.0.3")];
    for (ranges, named) in [
        ("\"10.0.0.0/8\", \"127.0.0.1\"", Some("203.0.113.9")),
        ("\"10.0.0.0/8\"", None),
    ] {
        let bin = Binary::start(&trusting(ranges), &["--log-format", "json"]).await;
        let r = Client::new().get(&bin.url("/docs/a"), &xff).await;
        assert_eq!(r.status, 200);
        assert!(common::eventually(Duration::from_secs(5), || access_lines(&bin).len() == 1).await);
        let line = &access_lines(&bin)[0];
        assert_eq!(line["client"], "127.0.0.1", "{line}");
        assert_eq!(
            line.get("forwarded_client").and_then(|c| c.as_str()),
            named,
            "{ranges}: {line}"
        );
    }
}

#[tokio::test]
async fn text_logs_to_a_pipe_are_plain_text_with_the_access_fields() {
    let store = Backend::start().await;
    store.store.put("/docs/a", "doc a");
    let config = docs_route(&store.origin());
    let bin = Binary::start_with(&config, &[], |c| {
        c.env_remove("RUST_LOG");
    })
    .await;
    assert_eq!(
        Client::new().get(&bin.url("/docs/a"), &[]).await.status,
        200
    );
    let line = bin
        .wait_for_log("ifmatch::access", Duration::from_secs(5))
        .await;
    assert!(
        line.contains("ifmatch::access: access route=\"/docs/\" method=GET"),
        "{line}"
    );
    assert!(
        line.contains(" status=200 ") && line.contains("path=\"/docs/a\""),
        "{line}"
    );
    let log = bin.log();
    assert!(
        !log.iter().any(|l| l.contains('\u{1b}')),
        "no terminal colour codes in a piped log: {log:?}"
    );
}

#[tokio::test]
async fn refused_heads_leave_a_trace_in_the_log() {
    let store = Backend::start().await;
    let bin = Binary::start(&docs_route(&store.origin()), &["--log-format", "json"]).await;
    let twice =
        b"PUT /docs/a HTTP/1.1\r\nHost: a\r\nContent-Length: 1\r\nContent-Length: 1\r\n\r\nx";
    assert!(raw_exchange(bin.addr, twice)
        .await
        .starts_with("HTTP/1.1 400 "));
    let line = bin
        .wait_for_log("ifmatch::access", Duration::from_secs(5))
        .await;
    let line: serde_json::Value = serde_json::from_str(&line).unwrap();
    assert_eq!(line["status"], 400, "{line}");
    assert_eq!(line["outcome"], "bad_framing", "{line}");
    assert_eq!(line["method"], "PUT", "{line}");
    assert_eq!(line["path"], "/docs/a", "{line}");
    assert_eq!(store.store.writes(), 0, "not forwarded");
    // A head hyper's parser refuses never reaches a route: it gets a line of its own.
    let folded = b"GET /docs/a HTTP/1.1\r\nHost: a\r\nX-A: 1\r\n folded\r\n\r\n";
    assert!(raw_exchange(bin.addr, folded)
        .await
        .starts_with("HTTP/1.1 400 "));
    let line = bin
        .wait_for_log("malformed request head refused", Duration::from_secs(5))
        .await;
    assert!(line.contains("127.0.0.1"), "the client is named: {line}");
}

#[tokio::test]
async fn a_failed_request_logs_what_and_where_and_its_access_line_says_it_once() {
    // An upstream port nobody listens on: the request fails with 502.
    let dead = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap()
    };
    let bin = Binary::start(&docs_route(&format!("http://{dead}")), &[]).await;
    let r = Client::new().get(&bin.url("/docs/a?x=1"), &[]).await;
    r.assert_problem(502);
    let failed = bin
        .wait_for_log("request failed", Duration::from_secs(5))
        .await;
    for field in [
        "WARN",
        "route=\"/docs/\"",
        "method=GET",
        "path=\"/docs/a\"",
        "error=",
    ] {
        assert!(failed.contains(field), "{field} in {failed}");
    }
    let access = bin
        .wait_for_log("ifmatch::access", Duration::from_secs(5))
        .await;
    assert!(access.contains("status=502"), "{access}");
    assert_eq!(
        access.matches("status=").count(),
        1,
        "one set of fields, not the request span's again: {access}"
    );
}

/// A host's route that a longer host-less prefix takes requests from is named at start,
/// since nginx and Envoy would pick the host first; and the requests do go where it says.
#[tokio::test]
async fn a_host_route_shadowed_by_a_longer_prefix_is_named_at_start() {
    let admin = Backend::start().await;
    let docs = Backend::start().await;
    docs.store.put("/docs/x", "from the host-less route");
    let config = format!(
        "[server]\nlisten = \"{{listen}}\"\n[[route]]\nprefix = \"/\"\nhost = \"admin.example\"\nupstream = \"{}\"\n[[route]]\nprefix = \"/docs/\"\nupstream = \"{}\"\n",
        admin.origin(),
        docs.origin()
    );
    let bin = Binary::start(&config, &[]).await;
    let line = bin
        .wait_for_log("takes this host's requests", Duration::from_secs(5))
        .await;
    assert!(
        line.contains("admin.example") && line.contains("/docs/"),
        "{line}"
    );
    let r = Client::new()
        .get(&bin.url("/docs/x"), &[("host", "admin.example")])
        .await;
    assert_eq!(r.text(), "from the host-less route");
    // The access line names a host route's host: two routes may share a prefix.
    let r = Client::new()
        .get(&bin.url("/a"), &[("host", "admin.example")])
        .await;
    assert_eq!(r.status, 404);
    let line = bin
        .wait_for_log("path=\"/a\"", Duration::from_secs(5))
        .await;
    assert!(
        line.contains("route=\"/\" host=\"admin.example\""),
        "{line}"
    );
    let line = bin
        .wait_for_log("path=\"/docs/x\"", Duration::from_secs(5))
        .await;
    assert!(!line.contains("host="), "a route for any host: {line}");
}

/// A request whose client leaves before the answer (a slow backend's, typically: the client
/// timed out) is still counted and logged once, as nginx's 499, with its route. A write that
/// reached the backend so leaves a trace; before, hyper dropped the request and nothing did.
#[tokio::test]
async fn a_request_its_client_abandons_is_logged_and_counted_as_499() {
    use tokio::io::AsyncWriteExt;
    let slow = common::ScriptedBackend::slow(Duration::from_secs(3), "late").await;
    let config = format!(
        "{}[admin]\nlisten = \"127.0.0.1:0\"\n",
        docs_route(&slow.origin())
    );
    let bin = Binary::start(&config, &["--log-format", "json"]).await;
    let admin = bin.logged_addr("admin endpoints").await;
    for head in [
        "GET /docs/a HTTP/1.1\r\nHost: a\r\n\r\n",
        "PUT /docs/b HTTP/1.1\r\nHost: a\r\nContent-Length: 1\r\n\r\nx",
    ] {
        let mut s = tokio::net::TcpStream::connect(bin.addr).await.unwrap();
        s.write_all(head.as_bytes()).await.unwrap();
        // In flight at the backend, then the client gives up.
        tokio::time::sleep(Duration::from_millis(300)).await;
        drop(s);
    }
    let access = || access_lines(&bin);
    assert!(
        common::eventually(Duration::from_secs(2), || access().len() == 2).await,
        "one line each, well before the backend answers: {:#?}",
        access()
    );
    for (line, method) in access().iter().zip(["GET", "PUT"]) {
        assert_eq!(line["status"], 499, "{line}");
        assert_eq!(line["outcome"], "client_closed", "{line}");
        assert_eq!(line["route"], "/docs/", "{line}");
        assert_eq!(line["method"], method, "{line}");
    }
    let metrics = Client::new()
        .get(&format!("http://{admin}/metrics"), &[])
        .await
        .text();
    for method in ["GET", "PUT"] {
        let series = format!(
            "ifmatch_requests_total{{route=\"/docs/\",method=\"{method}\",status=\"499\"}} 1"
        );
        assert!(metrics.contains(&series), "{series} in:\n{metrics}");
    }
}

/// A write its client abandons after its revalidation: the line's `upstream_status` is the
/// write's, still unknown, not the revalidation GET's 200 (which would read as the write's).
#[tokio::test]
async fn an_abandoned_write_is_not_logged_with_its_revalidations_status() {
    use tokio::io::AsyncWriteExt;
    let backend = common::ScriptedBackend::start(|r| async move {
        if r.method == http::Method::PUT {
            tokio::time::sleep(Duration::from_secs(3)).await;
            return common::backend::respond(204, &[], "");
        }
        common::backend::respond(200, &[], "doc")
    })
    .await;
    let config = format!(
        "{}validation = \"revalidate\"\n",
        docs_route(&backend.origin())
    );
    let bin = Binary::start(&config, &["--log-format", "json"]).await;
    let tag = Client::new().get(&bin.url("/docs/a"), &[]).await.etag();
    let mut s = tokio::net::TcpStream::connect(bin.addr).await.unwrap();
    let head =
        format!("PUT /docs/a HTTP/1.1\r\nHost: a\r\nIf-Match: {tag}\r\nContent-Length: 1\r\n\r\nx");
    s.write_all(head.as_bytes()).await.unwrap();
    // Revalidated and in flight at the backend, then the client gives up.
    let sent = || {
        backend
            .requests()
            .iter()
            .any(|r| r.method == http::Method::PUT)
    };
    assert!(common::eventually(Duration::from_secs(2), sent).await);
    drop(s);
    let put = || {
        access_lines(&bin)
            .into_iter()
            .find(|l| l["method"] == "PUT")
    };
    assert!(common::eventually(Duration::from_secs(2), || put().is_some()).await);
    let line = put().unwrap();
    assert_eq!(line["status"], 499, "{line}");
    assert!(line.get("upstream_status").is_none(), "{line}");
}

/// The limits are checked after routing: a 413 or a 431 is logged and counted under the
/// route the request was for, as a 413 found while streaming is, not as routeless.
#[tokio::test]
async fn a_request_over_a_limit_is_logged_under_its_route() {
    let store = Backend::start().await;
    let config = docs_route(&store.origin()).replace(
        "[[route]]",
        "max_request_body = \"1KiB\"\nmax_header_bytes = \"2KiB\"\n[[route]]",
    );
    let bin = Binary::start(&config, &["--log-format", "json"]).await;
    let c = Client::new();
    c.put(&bin.url("/docs/a"), &[], "x".repeat(2048))
        .await
        .assert_problem(413);
    let big = "y".repeat(3000);
    c.get(&bin.url("/docs/a"), &[("x-big", &big)])
        .await
        .assert_problem(431);
    let access = || access_lines(&bin);
    assert!(common::eventually(Duration::from_secs(5), || access().len() == 2).await);
    for (line, status) in access().iter().zip([413, 431]) {
        assert_eq!(line["status"], status, "{line}");
        assert_eq!(line["route"], "/docs/", "{line}");
    }
    assert_eq!(store.store.writes(), 0, "not forwarded");
}

/// A client whose chunked body breaks on its way to the backend (a chunk size hyper
/// refuses) made the exchange fail; that was taken for the backend's failure: a 502 and a
/// WARN blaming it, which any client could raise at will. It is the client's: a 400, logged
/// as such, and no "request failed" warning.
#[tokio::test]
async fn a_client_body_that_breaks_on_its_way_up_is_the_clients_400_not_a_502() {
    let store = Backend::start().await;
    let bin = Binary::start(&docs_route(&store.origin()), &["--log-format", "json"]).await;
    let put = "PUT /docs/a HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n\
               3\r\nabc\r\n+3\r\ndef\r\n0\r\n\r\n";
    let rsp = raw_exchange(bin.addr, put.as_bytes()).await;
    assert!(rsp.starts_with("HTTP/1.1 400 "), "{rsp}");
    assert!(rsp.contains("application/problem+json"), "{rsp}");
    assert!(rsp.contains("request body"), "{rsp}");
    let access = || access_lines(&bin);
    assert!(common::eventually(Duration::from_secs(5), || access().len() == 1).await);
    let line = &access()[0];
    assert_eq!(line["status"], 400, "{line}");
    assert_eq!(line["outcome"], "body_error", "{line}");
    assert!(
        !bin.log().iter().any(|l| l.contains("request failed")),
        "{:#?}",
        bin.log()
    );
    // It may have reached the backend, cut off before its last chunk: nothing is stored.
    assert_eq!(
        Client::new().get(&store.url("/docs/a"), &[]).await.status,
        404,
        "nothing stored"
    );
}

/// `--log-format json` promises log pipelines one JSON object per line, and the lines that
/// say why the process cannot start are the ones an operator needs most (a pod in a crash
/// loop): each of a bad config's problems, and a port already taken, is a JSON line of its
/// own at `ERROR`, as a refused reload's are.
#[test]
fn a_start_that_fails_says_why_in_json_lines() {
    let dir = common::TempDir::new("logs");
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let cases = [
        (
            "[server]\nlisten = \"127.0.0.1:0\"\nmax_connections = 0\n[[route]]\n\
             prefix = \"x\"\nupstream = \"ftp://x\"\n"
                .to_owned(),
            &["server.max_connections", "route.prefix", "route.upstream"][..],
        ),
        (
            format!(
                "[server]\nlisten = \"{}\"\n[[route]]\nprefix = \"/\"\n\
                 upstream = \"http://127.0.0.1:1\"\n",
                taken.local_addr().unwrap()
            ),
            &["cannot listen"][..],
        ),
    ];
    for (config, says) in cases {
        let path = dir.join("ifmatch.toml");
        std::fs::write(&path, config).unwrap();
        let out = std::process::Command::new(common::binary::BIN)
            .args(["--config", path.to_str().unwrap(), "--log-format", "json"])
            .env("RUST_LOG", "info")
            .output()
            .unwrap();
        assert!(!out.status.success());
        let stderr = String::from_utf8_lossy(&out.stderr);
        let lines: Vec<serde_json::Value> = stderr
            .lines()
            .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l:?}")))
            .collect();
        for needle in says {
            assert!(
                lines
                    .iter()
                    .any(|l| l["level"] == "ERROR" && l.to_string().contains(needle)),
                "an ERROR line names {needle}: {stderr}"
            );
        }
    }
}
