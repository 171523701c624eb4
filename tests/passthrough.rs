//! What the proxy forwards and what it passes back: methods, paths, headers, bodies, the
//! backend's 409 byte for byte, and the problem responses it makes itself (404, 502, 504).

mod common;

use std::time::Duration;

use bytes::Bytes;
use common::backend::respond;
use common::proxy::route;
use common::{Backend, Client, Proxy, ScriptedBackend};

#[tokio::test]
async fn a_backend_409_reaches_the_client_byte_for_byte() {
    let backend = Backend::start().await;
    backend.store.put("/docs/old", "kept forever");
    backend.store.archive("/docs/old");
    let proxy = Proxy::start(&route("/docs/", ""), &backend.origin()).await;
    let c = Client::new();
    let direct = c
        .put(
            &backend.url("/docs/old"),
            &[("content-type", "text/plain")],
            "x",
        )
        .await;
    let tag = c.get(&proxy.url("/docs/old"), &[]).await.etag();
    let via = c
        .put(
            &proxy.url("/docs/old"),
            &[("content-type", "text/plain"), ("if-match", &tag)],
            "x",
        )
        .await;
    assert_eq!(via.status, 409);
    assert_eq!(via.body, direct.body, "body bytes");
    let strip_date = |h: &http::HeaderMap| {
        let mut h = h.clone();
        h.remove("date");
        h
    };
    assert_eq!(
        strip_date(&via.headers),
        strip_date(&direct.headers),
        "headers"
    );
}

#[tokio::test]
async fn every_other_status_passes_through_with_its_headers_and_body() {
    let backend = ScriptedBackend::start(|r| async move {
        let status: u16 = r.uri.path()[1..].parse().unwrap();
        respond(
            status,
            &[("x-backend", "yes"), ("content-type", "text/plain")],
            format!("status {status}"),
        )
    })
    .await;
    let proxy = Proxy::start(&route("/", ""), &backend.origin()).await;
    let c = Client::new();
    for status in [201u16, 202, 301, 400, 401, 403, 409, 422, 500, 503] {
        let r = c.put(&proxy.url(&format!("/{status}")), &[], "x").await;
        assert_eq!(r.status, status);
        assert_eq!(r.header("x-backend"), Some("yes"));
        assert_eq!(r.text(), format!("status {status}"));
    }
}

#[tokio::test]
async fn method_path_query_headers_and_body_are_forwarded() {
    let backend = ScriptedBackend::start(|_| async { respond(201, &[], "") }).await;
    let proxy = Proxy::start(&route("/", ""), &backend.origin()).await;
    let c = Client::new();
    let body = Bytes::from((0..5 << 20).map(|i| i as u8).collect::<Vec<u8>>());
    for method in [
        "PUT",
        "POST",
        "PATCH",
        "MKCOL",
        "COPY",
        "MOVE",
        "PROPPATCH",
        "LOCK",
    ] {
        let r = c
            .send(
                method,
                &proxy.url("/dav/a%20b/c?x=1&y=%2F"),
                &[
                    ("x-custom", "kept"),
                    ("destination", "http://h/dav/z"),
                    ("content-type", "application/octet-stream"),
                ],
                body.clone(),
            )
            .await;
        assert_eq!(r.status, 201, "{method}");
        let seen = backend.last();
        assert_eq!(seen.method, method);
        assert_eq!(seen.uri.path_and_query().unwrap(), "/dav/a%20b/c?x=1&y=%2F");
        assert_eq!(seen.headers["x-custom"], "kept");
        assert_eq!(seen.headers["destination"], "http://h/dav/z");
        assert_eq!(seen.body, body, "{method}: body bytes");
    }
}

/// A `Connection` line with a token that is not ASCII still names its other fields, which
/// stay off the upstream request (RFC 9110 §7.6.1): before, the whole line was skipped.
#[tokio::test]
async fn a_connection_line_with_an_odd_byte_still_names_its_fields() {
    let backend = ScriptedBackend::start(|_| async { respond(200, &[], "body") }).await;
    let proxy = Proxy::start(&route("/", ""), &backend.origin()).await;
    let head = b"GET /x HTTP/1.1\r\nHost: a\r\nConnection: X-A, \xe9t\xe9\r\nConnection: close\r\nX-A: secret\r\n\r\n";
    let answer = common::raw_exchange(proxy.addr, head).await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert!(
        backend.last().headers.get("x-a").is_none(),
        "x-a reached the backend"
    );
}

#[tokio::test]
async fn hop_by_hop_headers_are_dropped_and_x_forwarded_headers_set() {
    let backend = ScriptedBackend::start(|_| async {
        respond(200, &[("keep-alive", "timeout=5"), ("x-ok", "1")], "body")
    })
    .await;
    let proxy = Proxy::start(&route("/", ""), &backend.origin()).await;
    let r = Client::new()
        .get(
            &proxy.url("/x"),
            &[
                ("connection", "x-private"),
                ("x-private", "secret"),
                ("te", "trailers"),
                ("proxy-authorization", "Basic cHJveHk6cHc="),
                ("upgrade", "websocket"),
                ("x-forwarded-for", "203.0.113.9"),
                ("host", "docs.example:8443"),
            ],
        )
        .await;
    assert_eq!(r.status, 200);
    assert!(
        r.header("keep-alive").is_none(),
        "response hop-by-hop dropped"
    );
    assert_eq!(r.header("x-ok"), Some("1"));
    let seen = backend.last();
    for h in [
        "x-private",
        "te",
        "proxy-authorization",
        "upgrade",
        "keep-alive",
    ] {
        assert!(seen.headers.get(h).is_none(), "{h} reached the backend");
    }
    assert_eq!(seen.headers["x-forwarded-for"], "203.0.113.9, 127.0.0.1");
    assert_eq!(seen.headers["x-forwarded-proto"], "http");
    assert_eq!(seen.headers["x-forwarded-host"], "docs.example:8443");
    assert_eq!(
        seen.headers["host"], "docs.example:8443",
        "Host is preserved by default"
    );
}

/// `X-Forwarded-For` on several field lines is one list (a proxy in front may add a line of
/// its own): every element reaches the backend in order, the client's address last.
#[tokio::test]
async fn every_x_forwarded_for_line_is_kept_in_order() {
    let backend = ScriptedBackend::start(|_| async { respond(200, &[], "") }).await;
    let proxy = Proxy::start(&route("/", ""), &backend.origin()).await;
    let lines = [
        ("x-forwarded-for", "6.6.6.6"),
        ("x-forwarded-for", "198.51.100.7, 203.0.113.9"),
    ];
    Client::new().get(&proxy.url("/x"), &lines).await;
    let seen = backend.last();
    let all: Vec<_> = seen.headers.get_all("x-forwarded-for").iter().collect();
    assert_eq!(
        all,
        ["6.6.6.6, 198.51.100.7, 203.0.113.9, 127.0.0.1"],
        "one line, every element"
    );
}

/// `X-Forwarded-Host` is the proxy's to set: an HTTP/1.0 request may come without `Host`,
/// and then the client's own `X-Forwarded-Host` went up as if the proxy vouched for it; a
/// backend that trusts the proxy builds its links (a password reset's among them) on it.
#[tokio::test]
async fn a_clients_x_forwarded_host_never_reaches_the_backend_as_the_proxys() {
    let backend = ScriptedBackend::start(|_| async { respond(200, &[], "") }).await;
    let proxy = Proxy::start(&route("/", ""), &backend.origin()).await;
    let head = b"GET /x HTTP/1.0\r\nX-Forwarded-Host: evil.example\r\n\r\n";
    let answer = common::raw_exchange(proxy.addr, head).await;
    assert!(answer.starts_with("HTTP/1.0 200"), "{answer}");
    let seen = backend.last();
    assert_eq!(
        seen.headers.get("x-forwarded-host"),
        None,
        "the client's X-Forwarded-Host went up"
    );
}

/// The values a backend that names headers as CGI does (WSGI, Rack, PHP:
/// `HTTP_X_FORWARDED_PROTO`) reads for `name`: `X_Forwarded_Proto` is `X-Forwarded-Proto`
/// to it.
fn as_cgi_reads(headers: &http::HeaderMap, name: &str) -> Vec<String> {
    headers
        .iter()
        .filter(|(n, _)| n.as_str().replace('_', "-") == name)
        .map(|(_, v)| v.to_str().unwrap().to_owned())
        .collect()
}

/// The headers the proxy sets (`X-Forwarded-*`) or judges by name (method overrides) are
/// its own: a client's spelling of one with underscores went up beside the proxy's, and a
/// backend that maps `-` and `_` alike (Puma before 6.4.3, CVE-2024-45614; any Rack, WSGI
/// or CGI server for a name the proxy does not set: `X_Forwarded_Host` without `Host`, a
/// `X_HTTP_Method_Override` that Rails runs a POST by) took the client's value for the
/// proxy's. They are dropped, as nginx drops every name with an underscore by default.
#[tokio::test]
async fn underscore_spellings_of_the_proxys_own_headers_never_reach_the_backend() {
    let backend = ScriptedBackend::start(|_| async { respond(200, &[], "") }).await;
    let proxy = Proxy::start(
        &route("/", "require_precondition = true"),
        &backend.origin(),
    )
    .await;
    let spoofs = [
        ("x_forwarded_proto", "https"),
        ("X-Forwarded_For", "6.6.6.6"),
        ("x_forwarded_host", "evil.example"),
        ("x_http_method_override", "DELETE"),
        ("X_HTTP_Method", "DELETE"),
        ("x_method_override", "DELETE"),
    ];
    let mut headers = spoofs.to_vec();
    headers.push(("host", "docs.example"));
    headers.push(("x_custom_field", "kept"));
    let r = Client::new().get(&proxy.url("/x"), &headers).await;
    assert_eq!(r.status, 200);
    let seen = backend.last().headers;
    assert_eq!(
        as_cgi_reads(&seen, "x-forwarded-proto"),
        ["http"],
        "{seen:?}"
    );
    assert_eq!(as_cgi_reads(&seen, "x-forwarded-for"), ["127.0.0.1"]);
    assert_eq!(as_cgi_reads(&seen, "x-forwarded-host"), ["docs.example"]);
    for name in METHOD_OVERRIDES {
        assert_eq!(as_cgi_reads(&seen, name), Vec::<String>::new(), "{name}");
    }
    assert_eq!(seen["x_custom_field"], "kept", "other names pass as sent");

    // A POST, which a guarded method's override header would have 428 (Rack's
    // `MethodOverride` runs a POST as the DELETE it names), goes up as a plain POST.
    let r = Client::new()
        .send(
            "POST",
            &proxy.url("/x"),
            &[("X_HTTP_Method_Override", "DELETE")],
            "x",
        )
        .await;
    assert_eq!(r.status, 200);
    let seen = backend.last();
    assert_eq!(seen.method, "POST");
    for name in METHOD_OVERRIDES {
        assert_eq!(
            as_cgi_reads(&seen.headers, name),
            Vec::<String>::new(),
            "{name}"
        );
    }

    // HTTP/1.0 without `Host`: no `X-Forwarded-Host` at all, however spelled.
    let head = b"GET /x HTTP/1.0\r\nX_Forwarded_Host: evil.example\r\n\r\n";
    let answer = common::raw_exchange(proxy.addr, head).await;
    assert!(answer.starts_with("HTTP/1.0 200"), "{answer}");
    let seen = backend.last().headers;
    assert_eq!(
        as_cgi_reads(&seen, "x-forwarded-host"),
        Vec::<String>::new(),
        "the client's X_Forwarded_Host went up as the proxy's"
    );
}

/// `Forwarded` (RFC 7239) says what `X-Forwarded-*` say, and Rack 3 (`forwarded_priority`
/// `[:forwarded, :x_forwarded]`) and Spring's `ForwardedHeaderFilter` read it first: a
/// client's `Forwarded: host=evil.example;proto=https` went up unchanged and stood for the
/// `X-Forwarded-Host` and `-Proto` the proxy set. The proxy sets those, so the client's
/// `Forwarded` goes, as the `X-Forwarded-Host` of a request without `Host` does.
#[tokio::test]
async fn a_clients_forwarded_header_never_reaches_the_backend() {
    let backend = ScriptedBackend::start(|_| async { respond(200, &[], "") }).await;
    let proxy = Proxy::start(&route("/", ""), &backend.origin()).await;
    let r = Client::new()
        .get(
            &proxy.url("/x"),
            &[
                ("host", "docs.example"),
                ("forwarded", "for=6.6.6.6;host=evil.example;proto=https"),
                ("forwarded", "for=7.7.7.7"),
            ],
        )
        .await;
    assert_eq!(r.status, 200);
    let seen = backend.last().headers;
    assert_eq!(seen.get("forwarded"), None, "{seen:?}");
    assert_eq!(seen["x-forwarded-host"], "docs.example");
    assert_eq!(seen["x-forwarded-proto"], "http");
}

/// What a TLS-ending ingress in front says of its client: an `https` request for
/// `public.example`, from 203.0.113.9.
const FROM_AN_INGRESS: [(&str, &str); 6] = [
    ("host", "public.example"),
    ("x-forwarded-proto", "https"),
    ("x-forwarded-host", "public.example"),
    ("x-forwarded-for", "203.0.113.9"),
    (
        "forwarded",
        "for=203.0.113.9;proto=https;host=public.example",
    ),
    ("x_forwarded_proto", "gopher"),
];

/// Behind an ingress that ends TLS, ifmatch sees plain HTTP. Replaced, the ingress's
/// `X-Forwarded-Proto: https` would tell the backend its client came over `http`, and a
/// framework that sends such clients to `https` (Rails' `force_ssl`, Django's
/// `SECURE_SSL_REDIRECT`) would redirect every request for ever. From a client of
/// `trusted_proxies` they pass; what it left out is set; underscore spellings still go.
#[tokio::test]
async fn a_trusted_proxys_forwarding_headers_reach_the_backend() {
    let backend = ScriptedBackend::start(|_| async { respond(200, &[], "") }).await;
    let proxy = Proxy::start_with(
        &route("/", ""),
        &backend.origin(),
        "trusted_proxies = [\"10.0.0.0/8\", \"127.0.0.1\"]",
    )
    .await;
    let c = Client::new();
    assert_eq!(c.get(&proxy.url("/x"), &FROM_AN_INGRESS).await.status, 200);
    let seen = backend.last().headers;
    assert_eq!(seen["x-forwarded-proto"], "https", "{seen:?}");
    assert_eq!(seen["x-forwarded-host"], "public.example");
    assert_eq!(
        seen["forwarded"],
        "for=203.0.113.9;proto=https;host=public.example"
    );
    assert_eq!(seen["x-forwarded-for"], "203.0.113.9, 127.0.0.1");
    assert_eq!(seen.get("x_forwarded_proto"), None, "{seen:?}");

    // A trusted proxy that says nothing of them: set, as for any client.
    c.get(&proxy.url("/x"), &[("host", "docs.example")]).await;
    let seen = backend.last().headers;
    assert_eq!(seen["x-forwarded-proto"], "http");
    assert_eq!(seen["x-forwarded-host"], "docs.example");
    assert_eq!(seen["x-forwarded-for"], "127.0.0.1");
}

/// A client outside `trusted_proxies` gets the proxy's own values, as every client does when
/// none is trusted.
#[tokio::test]
async fn forwarding_headers_of_a_client_that_is_not_a_trusted_proxy_are_replaced() {
    let backend = ScriptedBackend::start(|_| async { respond(200, &[], "") }).await;
    let proxy = Proxy::start_with(
        &route("/", ""),
        &backend.origin(),
        "trusted_proxies = [\"10.0.0.0/8\", \"127.0.0.2\", \"::1\"]",
    )
    .await;
    let r = Client::new().get(&proxy.url("/x"), &FROM_AN_INGRESS).await;
    assert_eq!(r.status, 200);
    let seen = backend.last().headers;
    assert_eq!(seen["x-forwarded-proto"], "http", "{seen:?}");
    assert_eq!(seen["x-forwarded-host"], "public.example");
    assert_eq!(seen.get("forwarded"), None);
    assert_eq!(seen["x-forwarded-for"], "203.0.113.9, 127.0.0.1");
}

/// With `preserve_host = false`, a `Location` naming the backend is pointed back at the
/// origin the client used: behind a trusted ingress, the `https` one it names, not the plain
/// HTTP one ifmatch saw, which would send the client off TLS.
#[tokio::test]
async fn a_location_is_pointed_back_at_the_origin_a_trusted_proxy_names() {
    let backend = ScriptedBackend::start(|r| async move {
        let own = format!("http://{}", r.headers["host"].to_str().unwrap());
        respond(201, &[("location", &format!("{own}/docs/1"))], "")
    })
    .await;
    let routes = route("/", "preserve_host = false");
    let trusting = Proxy::start_with(
        &routes,
        &backend.origin(),
        "trusted_proxies = [\"127.0.0.0/8\"]",
    )
    .await;
    let c = Client::new();
    let r = c.put(&trusting.url("/docs/"), &FROM_AN_INGRESS, "x").await;
    assert_eq!(r.status, 201);
    assert_eq!(r.headers["location"], "https://public.example/docs/1");
    // Values that are no scheme or no host are not taken: the proxy's own view is.
    let odd = [
        ("host", "docs.example"),
        ("x-forwarded-proto", "wss"),
        ("x-forwarded-host", "a@b"),
    ];
    let r = c.put(&trusting.url("/docs/"), &odd, "x").await;
    assert_eq!(r.headers["location"], "http://docs.example/docs/1");
    // Of a list, the nearest proxy's say, the last: one before it may be a client's.
    let listed = [
        ("host", "docs.example"),
        ("x-forwarded-proto", "http, https"),
        ("x-forwarded-host", "evil.example, public.example:8443"),
    ];
    let r = c.put(&trusting.url("/docs/"), &listed, "x").await;
    assert_eq!(r.headers["location"], "https://public.example:8443/docs/1");

    let edge = Proxy::start(&routes, &backend.origin()).await;
    let r = c.put(&edge.url("/docs/"), &FROM_AN_INGRESS, "x").await;
    assert_eq!(r.headers["location"], "http://public.example/docs/1");
}

const METHOD_OVERRIDES: [&str; 3] = [
    "x-http-method-override",
    "x-http-method",
    "x-method-override",
];

#[tokio::test]
async fn preserve_host_false_sends_the_upstream_authority() {
    let backend = ScriptedBackend::start(|_| async { respond(200, &[], "") }).await;
    let proxy = Proxy::start(&route("/", "preserve_host = false"), &backend.origin()).await;
    Client::new()
        .get(&proxy.url("/x"), &[("host", "docs.example")])
        .await;
    let seen = backend.last();
    assert_eq!(seen.headers["host"], backend.addr.to_string().as_str());
    assert_eq!(seen.headers["x-forwarded-host"], "docs.example");
}

/// With `preserve_host = false` the backend makes its URLs from its own address, as a
/// framework's `url_for` does from `Host`. `Location` and `Content-Location` naming that
/// address are pointed back at the origin the client used (nginx's `proxy_redirect
/// default`); other values, and any value on a route that preserves `Host`, pass as sent.
#[tokio::test]
async fn a_location_naming_the_upstream_points_back_at_the_proxy_when_host_is_not_preserved() {
    let backend = ScriptedBackend::start(|r| async move {
        let own = format!("http://{}", r.headers["host"].to_str().unwrap());
        let (location, content_location) = match r.uri.path() {
            "/new" => (format!("{own}/docs/1"), format!("{own}?v=2")),
            "/upper" => (format!("{}/docs/1", own.to_uppercase()), own.clone()),
            // A longer port is another origin; a relative or foreign URL is left alone.
            "/near" => (format!("{own}0/x"), "/docs/1".to_owned()),
            _ => (
                "http://elsewhere.example/x".to_owned(),
                format!("{own}#top"),
            ),
        };
        let headers = [
            ("location", location.as_str()),
            ("content-location", content_location.as_str()),
        ];
        respond(201, &headers, "")
    })
    .await;
    let origin = backend.origin();
    let proxy = Proxy::start(&route("/", "preserve_host = false"), &origin).await;
    let c = Client::new();
    let put = |path: &'static str, host: &'static str| {
        let url = proxy.url(path);
        let c = c.clone();
        async move { c.put(&url, &[("host", host)], "x").await }
    };
    let both = |r: &common::Reply| {
        (
            r.header("location").unwrap().to_owned(),
            r.header("content-location").unwrap().to_owned(),
        )
    };
    let r = put("/new", "docs.example").await;
    assert_eq!(r.status, 201);
    assert_eq!(
        both(&r),
        (
            "http://docs.example/docs/1".into(),
            "http://docs.example?v=2".into()
        )
    );
    let r = put("/upper", "docs.example:8443").await;
    assert_eq!(
        both(&r),
        (
            "http://docs.example:8443/docs/1".into(),
            "http://docs.example:8443".into()
        )
    );
    let r = put("/near", "docs.example").await;
    assert_eq!(both(&r), (format!("{origin}0/x"), "/docs/1".into()));
    let r = put("/other", "docs.example").await;
    assert_eq!(
        both(&r),
        (
            "http://elsewhere.example/x".into(),
            "http://docs.example#top".into()
        )
    );

    // Host preserved: the backend made its URLs from the client's Host; nothing to undo.
    let kept = Proxy::start(&route("/", ""), &origin).await;
    let r = c
        .put(&kept.url("/new"), &[("host", "docs.example")], "x")
        .await;
    assert_eq!(r.header("location"), Some("http://docs.example/docs/1"));
}

#[tokio::test]
async fn a_host_that_connection_names_still_reaches_the_backend_once() {
    // `Connection` may name any header, `Host` too: it is dropped as hop-by-hop with the
    // rest, and the proxy sets the client's again, as it does for every request.
    let backend = ScriptedBackend::start(|_| async { respond(200, &[], "") }).await;
    let proxy = Proxy::start(&route("/", ""), &backend.origin()).await;
    let r = Client::new()
        .get(
            &proxy.url("/x"),
            &[("connection", "Host"), ("host", "docs.example")],
        )
        .await;
    assert_eq!(r.status, 200);
    let seen = backend.last();
    let hosts: Vec<_> = seen.headers.get_all("host").iter().collect();
    assert_eq!(hosts, ["docs.example"]);
    assert_eq!(seen.headers["x-forwarded-host"], "docs.example");
}

/// HTTP/2 requests and HTTP/1.1 absolute-form ones carry scheme and authority; an origin
/// server gets origin-form (RFC 9112 §3.2.1), with the path and query as sent.
#[tokio::test]
async fn every_request_form_reaches_the_backend_in_origin_form() {
    let backend = ScriptedBackend::start(|_| async { respond(200, &[], "ok") }).await;
    let proxy = Proxy::start(&route("/", ""), &backend.origin()).await;
    let target = "/docs/a%20b?y=1&z";

    let r = Client::h2().get(&proxy.url(target), &[]).await;
    assert_eq!((r.status, r.version), (200, http::Version::HTTP_2));
    assert_eq!(backend.last().uri.to_string(), target, "h2c");

    let r = Client::new().get(&proxy.url(target), &[]).await;
    assert_eq!(r.status, 200);
    assert_eq!(
        backend.last().uri.to_string(),
        target,
        "HTTP/1.1 origin-form"
    );

    let absolute = format!(
        "GET {} HTTP/1.1\r\nHost: {}\r\nConnection: close\r\n\r\n",
        proxy.url(target),
        proxy.addr
    );
    let rsp = tokio::time::timeout(Duration::from_secs(5), async {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut s = tokio::net::TcpStream::connect(proxy.addr).await.unwrap();
        s.write_all(absolute.as_bytes()).await.unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).await.unwrap();
        out
    })
    .await
    .expect("the proxy answers and closes");
    assert!(rsp.starts_with("HTTP/1.1 200"), "{rsp}");
    let seen = backend.last();
    assert_eq!(seen.uri.to_string(), target, "HTTP/1.1 absolute-form");
    assert_eq!(seen.headers["host"], proxy.addr.to_string().as_str());
}

#[tokio::test]
async fn a_request_no_route_matches_gets_a_404_problem() {
    let backend = Backend::start().await;
    let proxy = Proxy::start(&route("/docs/", ""), &backend.origin()).await;
    let r = Client::new().get(&proxy.url("/elsewhere"), &[]).await;
    let p = r.assert_problem(404);
    assert!(p["detail"].as_str().unwrap().contains("/elsewhere"));
    assert_eq!(backend.store.reads(), 0);
}

#[tokio::test]
async fn an_unreachable_upstream_gives_a_502_problem() {
    // A port that was just free: nothing listens there.
    let dead = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap()
    };
    let proxy = Proxy::start(&route("/", ""), &format!("http://{dead}")).await;
    let c = Client::new();
    for r in [
        c.get(&proxy.url("/x"), &[]).await,
        c.put(&proxy.url("/x"), &[("if-match", "\"t\"")], "x").await,
        c.put(&proxy.url("/x"), &[], "x").await,
    ] {
        let p = r.assert_problem(502);
        let detail = p["detail"].as_str().unwrap();
        assert!(detail.contains(&dead.to_string()), "{detail}");
        assert!(detail.to_lowercase().contains("refused"), "{detail}");
    }
    assert!(proxy.state.locks.is_empty());
}

/// `upstream_read_buffer` bounds a backend's response head: one that fits passes whole, a
/// larger one is a 502 that says why, never a hang or a truncated head.
#[tokio::test]
async fn a_response_head_past_the_upstream_read_buffer_is_a_502_problem() {
    let backend = ScriptedBackend::start(|r| async move {
        let kib: usize = r.uri.path()[1..].parse().unwrap();
        respond(200, &[("x-big", &"v".repeat(kib << 10))], "body")
    })
    .await;
    let proxy = Proxy::start_with(
        &route("/", ""),
        &backend.origin(),
        "upstream_read_buffer = \"16KiB\"",
    )
    .await;
    let c = Client::new();
    let fits = c.get(&proxy.url("/12"), &[]).await;
    assert_eq!(fits.status, 200);
    assert_eq!(fits.header("x-big").map(str::len), Some(12 << 10));
    assert_eq!(fits.body, "body");

    let p = c.get(&proxy.url("/20"), &[]).await.assert_problem(502);
    let detail = p["detail"].as_str().unwrap();
    assert!(detail.contains(&backend.addr.to_string()), "{detail}");
    assert!(
        detail.contains("over upstream_read_buffer (16384 bytes)"),
        "{detail}"
    );
    // The proxy's own connection to the client is unharmed.
    assert_eq!(c.get(&proxy.url("/1"), &[]).await.status, 200);
}

/// `n` header fields `x-{prefix}0`.., for a head with that many.
fn fields(prefix: &str, n: usize) -> Vec<(String, String)> {
    (0..n)
        .map(|i| (format!("x-{prefix}{i}"), i.to_string()))
        .collect()
}

fn pairs(fields: &[(String, String)]) -> Vec<(&str, &str)> {
    fields
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .collect()
}

/// `max_header_fields` bounds both heads: 100 by default (hyper's, Envoy's), more on a
/// client's request is a 431 and on a backend's response a 502 that names the limit; raised,
/// both pass whole.
#[tokio::test]
async fn header_fields_past_max_header_fields_are_refused_and_a_raised_limit_passes_them() {
    let backend = ScriptedBackend::start(|r| async move {
        let n: usize = r.uri.path()[1..].parse().unwrap();
        respond(200, &pairs(&fields("b", n)), "body")
    })
    .await;
    let c = Client::new();
    let many = fields("c", 120);

    let default = Proxy::start(&route("/", ""), &backend.origin()).await;
    assert_eq!(c.get(&default.url("/90"), &[]).await.status, 200);
    let p = c.get(&default.url("/120"), &[]).await.assert_problem(502);
    let detail = p["detail"].as_str().unwrap();
    assert!(detail.contains("max_header_fields (100)"), "{detail}");
    let r = c
        .try_send("GET", &default.url("/1"), &pairs(&many), "")
        .await;
    assert_eq!(r.map(|r| r.status).ok(), Some(431));
    assert_eq!(
        backend.requests().len(),
        2,
        "the refused head never reached the backend"
    );

    let raised = Proxy::start_with(
        &route("/", ""),
        &backend.origin(),
        "max_header_fields = 200",
    )
    .await;
    // The test's own client stops at 100 fields too.
    let wide = Client::from_inner(
        hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
            .http1_max_headers(200)
            .build(common::client::plain()),
    );
    let r = wide.get(&raised.url("/120"), &[]).await;
    assert_eq!(r.status, 200);
    for (name, value) in fields("b", 120) {
        assert_eq!(r.header(&name), Some(value.as_str()), "{name}");
    }
    let r = wide.get(&raised.url("/1"), &pairs(&many)).await;
    assert_eq!(r.status, 200);
    let seen = backend.last();
    for (name, value) in &many {
        assert_eq!(seen.headers.get(name).unwrap(), value.as_str(), "{name}");
    }
}

#[tokio::test]
async fn a_slow_upstream_gives_a_504_problem_in_bounded_time() {
    let backend = Backend::start().await;
    backend.store.put("/docs/a", "a");
    backend.store.set_delay(Duration::from_secs(5));
    let proxy = Proxy::start(
        &route("/docs/", "upstream_timeout = \"200ms\""),
        &backend.origin(),
    )
    .await;
    let c = Client::new();
    let started = std::time::Instant::now();
    let r = c.get(&proxy.url("/docs/a"), &[]).await;
    r.assert_problem(504);
    let r = c
        .put(&proxy.url("/docs/a"), &[("if-match", "\"t\"")], "x")
        .await;
    r.assert_problem(504);
    assert!(
        started.elapsed() < Duration::from_secs(4),
        "the timeout bounds the wait"
    );
    assert!(
        proxy.state.locks.is_empty(),
        "a timed-out write leaves no lock"
    );
}

/// Body-less GETs and HEADs go up through the proxy's own client (`h1.rs`), every other
/// request through hyper's: each keeps its connections alive, so requests one at a time
/// take one connection of each, however many there are.
#[tokio::test]
async fn upstream_connections_are_pooled_and_kept_alive() {
    let backend = ScriptedBackend::start(|_| async { respond(200, &[], "x") }).await;
    let proxy = Proxy::start(&route("/", ""), &backend.origin()).await;
    let c = Client::new();
    for _ in 0..10 {
        assert_eq!(c.get(&proxy.url("/x"), &[]).await.status, 200);
    }
    assert_eq!(
        backend.connections(),
        1,
        "one kept-alive connection for GETs"
    );
    for _ in 0..10 {
        assert_eq!(c.put(&proxy.url("/x"), &[], "y").await.status, 200);
    }
    assert_eq!(backend.connections(), 2, "and one for writes");
    for i in 0..20 {
        let r = if i % 2 == 0 {
            c.get(&proxy.url("/x"), &[]).await
        } else {
            c.put(&proxy.url("/x"), &[], "y").await
        };
        assert_eq!(r.status, 200);
    }
    assert_eq!(backend.connections(), 2, "both kept alive");
}

#[tokio::test]
async fn an_upstream_connection_idle_past_upstream_idle_timeout_is_not_reused() {
    let backend = ScriptedBackend::start(|_| async { respond(200, &[], "x") }).await;
    let proxy = Proxy::start_with(
        &route("/", ""),
        &backend.origin(),
        "upstream_idle_timeout = \"200ms\"",
    )
    .await;
    let c = Client::new();
    assert_eq!(c.get(&proxy.url("/x"), &[]).await.status, 200);
    assert_eq!(c.get(&proxy.url("/x"), &[]).await.status, 200);
    assert_eq!(backend.connections(), 1, "reused while fresh");
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert_eq!(c.get(&proxy.url("/x"), &[]).await.status, 200);
    assert_eq!(backend.connections(), 2, "closed once idle past 200 ms");
}

/// `upstream_max_idle` bounds the backend connections kept open: four requests at once take
/// four connections, of which one stays, so the next four open three more (and with 0,
/// every request opens one). Each response still arrives whole.
#[tokio::test]
async fn upstream_max_idle_bounds_the_backend_connections_kept_open() {
    for (max_idle, want) in [(1, 7), (0, 8), (256, 4)] {
        let backend = ScriptedBackend::slow(Duration::from_millis(150), "whole body").await;
        let proxy = Proxy::start_with(
            &route("/", ""),
            &backend.origin(),
            &format!("upstream_max_idle = {max_idle}"),
        )
        .await;
        let c = Client::new();
        for _ in 0..2 {
            let mut at_once = tokio::task::JoinSet::new();
            for i in 0..4 {
                let (c, url) = (c.clone(), proxy.url(&format!("/{i}")));
                at_once.spawn(async move { c.get(&url, &[]).await });
            }
            while let Some(r) = at_once.join_next().await {
                let r = r.unwrap();
                assert_eq!((r.status, r.text()), (200, "whole body".into()));
            }
            // The kept connection is handed back as its body ends; let that land.
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert_eq!(
            backend.connections(),
            want,
            "upstream_max_idle = {max_idle}"
        );
    }
}

/// `upstream_max_connections` bounds the connections open to a backend at once: eight
/// requests at once, two connections allowed, take turns on two, and every one is answered
/// whole.
#[tokio::test]
async fn upstream_max_connections_bounds_the_connections_open_to_a_backend() {
    let backend = ScriptedBackend::slow(Duration::from_millis(100), "whole body").await;
    let proxy = Proxy::start_with(
        &route("/", ""),
        &backend.origin(),
        "upstream_max_connections = 2\nconnect_timeout = \"5s\"",
    )
    .await;
    let c = Client::new();
    let mut at_once = tokio::task::JoinSet::new();
    for i in 0..8 {
        let (c, url) = (c.clone(), proxy.url(&format!("/{i}")));
        at_once.spawn(async move { c.get(&url, &[]).await });
    }
    while let Some(r) = at_once.join_next().await {
        let r = r.unwrap();
        assert_eq!((r.status, r.text()), (200, "whole body".into()));
    }
    assert_eq!(backend.most_open(), 2, "never more than two open at once");
    assert_eq!(
        backend.connections(),
        2,
        "the two were taken in turn, not reopened"
    );
}

/// A request that finds every allowed connection busy for `connect_timeout` gets a 503
/// problem that says why, with `Retry-After`; the busy request is answered, and the next
/// request has the connection. Meanwhile the metrics show the one connection open and the
/// one request waiting.
#[tokio::test]
async fn a_request_finding_every_allowed_connection_busy_gets_503_after_connect_timeout() {
    let backend = ScriptedBackend::start(|r| async move {
        if r.uri.path() == "/slow" {
            tokio::time::sleep(Duration::from_millis(2500)).await;
        }
        respond(200, &[], "done")
    })
    .await;
    let proxy = Proxy::start_with(
        &route("/", ""),
        &backend.origin(),
        "upstream_max_connections = 1\nconnect_timeout = \"1s\"",
    )
    .await;
    let gauge = |name: &str, n: usize| {
        let line = format!("\n{name}{{upstream=\"{}\"}} {n}\n", backend.origin());
        proxy.state.render_metrics().contains(&line)
    };
    let c = Client::new();
    let slow = {
        let (c, url) = (c.clone(), proxy.url("/slow"));
        tokio::spawn(async move { c.get(&url, &[]).await })
    };
    let sent = || backend.requests().iter().any(|r| r.uri.path() == "/slow");
    assert!(common::eventually(Duration::from_secs(5), sent).await);
    let refused = {
        let (c, url) = (c.clone(), proxy.url("/fast"));
        tokio::spawn(async move { c.get(&url, &[]).await })
    };
    let waiting = || gauge("ifmatch_upstream_connections_waiting", 1);
    assert!(common::eventually(Duration::from_secs(1), waiting).await);
    assert!(gauge("ifmatch_upstream_connections_open", 1));
    assert!(gauge("ifmatch_upstream_connections_limit", 1));
    let refused = refused.await.unwrap();
    let problem = refused.assert_problem(503);
    let detail = problem["detail"].as_str().unwrap();
    assert!(detail.contains("upstream_max_connections"), "{detail}");
    assert_eq!(refused.header("retry-after"), Some("1"));
    assert_eq!(
        backend.requests().len(),
        1,
        "the refused request never reached the backend"
    );
    let slow = slow.await.unwrap();
    assert_eq!((slow.status, slow.text()), (200, "done".into()));
    assert_eq!(c.get(&proxy.url("/fast"), &[]).await.status, 200);
    assert_eq!(backend.connections(), 1);
    assert!(gauge("ifmatch_upstream_connections_waiting", 0));
}

#[tokio::test]
async fn aliases_of_one_path_share_one_tag() {
    let backend = Backend::start().await;
    backend.store.put("/docs/42", "answer");
    let proxy = Proxy::start(
        &route("/docs/", "validation = \"cached\""),
        &backend.origin(),
    )
    .await;
    let c = Client::new();
    // `%2F` as nginx reads it, before `..`: so it is routed by its decoded path too.
    for alias in [
        "/docs/42",
        "/docs/./42",
        "/docs/%34%32",
        "/docs//42",
        "/docs%2F42",
        "/x%2F..%2Fdocs/42",
    ] {
        let r = c.get(&proxy.url(alias), &[]).await;
        let problem = r.header("content-type") == Some("application/problem+json");
        assert!(
            !problem,
            "{alias}: routed to /docs/, not {} {}",
            r.status,
            r.text()
        );
    }
    assert_eq!(proxy.state.tags.len(), 1, "one resource, one cache entry");
}

/// A GET (or HEAD) with a chunked body: hyper's client sends a GET body of unknown length
/// as no body unless told, so the backend got the GET and not its body. It goes up whole
/// (chunked), as a GET with a `Content-Length` body always did.
#[tokio::test]
async fn a_chunked_get_body_reaches_the_backend() {
    let backend = ScriptedBackend::start(|_| async { respond(200, &[], "ok") }).await;
    let proxy = Proxy::start(&route("/", ""), &backend.origin()).await;
    let get = b"GET /search HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n\
                5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n\
                GET /after HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n";
    let rsp = common::raw_exchange(proxy.addr, get).await;
    assert_eq!(rsp.matches("HTTP/1.1 200 OK").count(), 2, "{rsp}");
    let seen = backend.requests();
    let bodies: Vec<(&str, &[u8])> = seen
        .iter()
        .map(|r| (r.uri.path(), r.body.as_ref()))
        .collect();
    assert_eq!(
        bodies,
        [("/search", &b"hello world"[..]), ("/after", &b""[..])]
    );
}

/// A write body of unknown length (HTTP/1.1 chunked, HTTP/2 without `content-length`) up
/// to `max_tag_body` is read whole and goes up with a `Content-Length`, as nginx sends the
/// bodies it buffers: many legacy backends mishandle a chunked request body, or answer 411.
/// An empty PUT says `Content-Length: 0`. A longer body streams on, chunked, whole, and so
/// does one that announces trailers, which a body read whole would go up without.
#[tokio::test]
async fn a_write_body_of_unknown_length_goes_up_with_its_length() {
    let backend = ScriptedBackend::start(|_| async { respond(204, &[], "") }).await;
    let proxy = Proxy::start(&route("/", "max_tag_body = \"16B\""), &backend.origin()).await;
    let framing = |r: &common::Recorded| {
        let h = |n: &str| r.headers.get(n).map(|v| v.to_str().unwrap().to_owned());
        (h("content-length"), h("transfer-encoding"), r.body.clone())
    };
    // HTTP/1.1, chunked: within the limit, and past it.
    let put = b"PUT /short HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n\
                5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n\
                PUT /long HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n\
                a\r\n0123456789\r\na\r\nabcdefghij\r\n0\r\n\r\n\
                PUT /empty HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n\
                0\r\n\r\n\
                PUT /summed HTTP/1.1\r\nHost: a\r\nConnection: close\r\nTransfer-Encoding: chunked\r\n\
                Trailer: X-Sum\r\n\r\n5\r\nhello\r\n0\r\nX-Sum: 42\r\n\r\n";
    let rsp = common::raw_exchange(proxy.addr, put).await;
    assert_eq!(rsp.matches("HTTP/1.1 204").count(), 4, "{rsp}");
    let seen: Vec<_> = backend.requests().iter().map(framing).collect();
    let length = |n: &str| (Some(n.to_owned()), None);
    assert_eq!((seen[0].0.clone(), seen[0].1.clone()), length("11"));
    assert_eq!(seen[0].2, "hello world");
    assert_eq!(seen[1].1.as_deref(), Some("chunked"), "past max_tag_body");
    assert_eq!(seen[1].2, "0123456789abcdefghij");
    assert_eq!((seen[2].0.clone(), seen[2].1.clone()), length("0"));
    // One that announces trailers streams, so that they reach the backend.
    assert_eq!(seen[3].1.as_deref(), Some("chunked"), "trailers announced");
    assert_eq!(seen[3].2, "hello");

    // HTTP/2 without content-length, its body in two frames; and an empty PUT.
    let mut client = common::h2_client(proxy.addr).await;
    let req = http::Request::put(proxy.url("/h2")).body(()).unwrap();
    let (answer, mut body) = client.send_request(req, false).unwrap();
    body.send_data(Bytes::from_static(b"hello"), false).unwrap();
    body.send_data(Bytes::from_static(b" h2"), true).unwrap();
    assert_eq!(answer.await.unwrap().status(), 204);
    let req = http::Request::put(proxy.url("/h2-empty")).body(()).unwrap();
    let (answer, _) = client.send_request(req, true).unwrap();
    assert_eq!(answer.await.unwrap().status(), 204);
    let seen: Vec<_> = backend.requests().iter().skip(4).map(framing).collect();
    assert_eq!((seen[0].0.clone(), seen[0].1.clone()), length("8"));
    assert_eq!(seen[0].2, "hello h2");
    assert_eq!((seen[1].0.clone(), seen[1].1.clone()), length("0"));
}

/// `Expect: 100-continue` is the client's exchange with the proxy, which answers it; it is
/// not sent on: a legacy backend may answer it 417, or send a 100 of its own.
#[tokio::test]
async fn expect_is_answered_here_and_not_forwarded() {
    let backend = ScriptedBackend::start(|_| async { respond(204, &[], "") }).await;
    let proxy = Proxy::start(&route("/", ""), &backend.origin()).await;
    let r = Client::new()
        .put(&proxy.url("/x"), &[("expect", "100-continue")], "body")
        .await;
    assert_eq!(r.status, 204);
    let seen = backend.last();
    assert!(
        seen.headers.get("expect").is_none(),
        "Expect reached the backend"
    );
    assert_eq!(seen.body, "body");
}

/// An HTTP/1.0 client that asks for keep-alive keeps its connection only for an answer of
/// known length: one that must end it (a body streamed with no length, which only the
/// close can end; a refusal with its body unread) says so, and says nothing else. hyper
/// added `keep-alive` to such answers (`Connection: close, keep-alive` on a refusal, a bare
/// `keep-alive` on a body framed by the close): a 1.0 client that believes it (ApacheBench's
/// `-k`) sends its next request on a connection about to close, or takes the end of the
/// head for the end of a body that has no length.
#[tokio::test]
async fn an_http_1_0_keep_alive_client_is_never_promised_a_connection_that_closes() {
    use tokio::io::AsyncWriteExt;
    let origin = common::backend::raw_backend(|mut s| async move {
        let mut head = Vec::new();
        while !head.ends_with(b"\r\n\r\n") {
            let mut byte = [0u8; 1];
            if tokio::io::AsyncReadExt::read(&mut s, &mut byte)
                .await
                .unwrap_or(0)
                == 0
            {
                return;
            }
            head.push(byte[0]);
        }
        let chunked =
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n";
        let _ = s.write_all(chunked).await;
    })
    .await;
    let routes =
        route("/doc", "max_tag_body = \"2B\"") + &route("/put", "require_precondition = true");
    let proxy = Proxy::start(&routes, &origin).await;
    let keep_alive = "Connection: keep-alive\r\n";
    // A body over `max_tag_body` streams on with no length: framed by the close.
    let streamed = format!("GET /doc HTTP/1.0\r\n{keep_alive}\r\n");
    // A refusal whose body (over 1 MiB) is left unread: the connection must close (after
    // the body, which the proxy reads and drops until then, as nginx lingers).
    let refused = format!(
        "PUT /put HTTP/1.0\r\n{keep_alive}Content-Length: 2000000\r\n\r\n{}",
        "x".repeat(2_000_000)
    );
    for (request, status, body) in [
        (streamed, "200", "hello"),
        (refused, "428", "\"status\":428"),
    ] {
        let answer = common::raw_exchange(proxy.addr, request.as_bytes()).await;
        let (head, rest) = answer.split_once("\r\n\r\n").expect("a whole head");
        assert!(head.starts_with(&format!("HTTP/1.0 {status}")), "{answer}");
        assert!(
            !head.to_ascii_lowercase().contains("keep-alive"),
            "a connection about to close is announced as kept: {head}"
        );
        assert!(rest.contains(body), "{answer}");
    }
    // One of known length keeps the connection it was asked to keep.
    let tagged = format!("GET /put HTTP/1.0\r\n{keep_alive}\r\n");
    let mut c = tokio::net::TcpStream::connect(proxy.addr).await.unwrap();
    c.write_all(tagged.as_bytes()).await.unwrap();
    let mut got = vec![0u8; 4096];
    let n = tokio::time::timeout(
        Duration::from_secs(5),
        tokio::io::AsyncReadExt::read(&mut c, &mut got),
    )
    .await
    .expect("answered")
    .unwrap();
    let head = String::from_utf8_lossy(&got[..n]).to_ascii_lowercase();
    assert!(head.contains("connection: keep-alive"), "{head}");
    assert!(head.contains("content-length: 5"), "{head}");
}
