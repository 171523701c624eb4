//! GET and HEAD: strong ETags from the body's SHA-256, 304 on If-None-Match, the upstream's own
//! tags, bodies over the tagging limit.

mod common;

use bytes::Bytes;
use common::backend::respond;
use common::proxy::route;
use common::{Backend, Client, Proxy, ScriptedBackend};

const DOC: &str = r#"{"title":"hello","body":"edit me"}"#;

async fn setup(extra: &str) -> (Backend, Proxy) {
    let backend = Backend::start().await;
    backend.store.put("/docs/a", DOC);
    let proxy = Proxy::start(&route("/docs/", extra), &backend.origin()).await;
    (backend, proxy)
}

#[tokio::test]
async fn get_gets_a_strong_etag_that_is_the_sha256_of_the_body() {
    let (_b, proxy) = setup("").await;
    let r = Client::new().get(&proxy.url("/docs/a"), &[]).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.body, DOC.as_bytes());
    let tag = r.etag();
    assert!(
        tag.starts_with('"') && tag.ends_with('"'),
        "strong and quoted: {tag}"
    );
    assert_eq!(tag, proxy.tag_of(DOC.as_bytes()));
}

#[tokio::test]
async fn identical_bytes_give_identical_tags_and_any_change_gives_a_new_one() {
    let (backend, proxy) = setup("").await;
    backend.store.put("/docs/b", DOC);
    let c = Client::new();
    let a = c.get(&proxy.url("/docs/a"), &[]).await.etag();
    let b = c.get(&proxy.url("/docs/b"), &[]).await.etag();
    assert_eq!(a, b, "same bytes at two URLs");
    assert_eq!(a, c.get(&proxy.url("/docs/a"), &[]).await.etag(), "stable");
    backend.store.put("/docs/a", DOC.replace("me", "Me"));
    assert_ne!(a, c.get(&proxy.url("/docs/a"), &[]).await.etag());
}

#[tokio::test]
async fn head_gets_the_etag_a_get_would_give_and_no_body() {
    let (_b, proxy) = setup("").await;
    let c = Client::new();
    let get = c.get(&proxy.url("/docs/a"), &[]).await;
    let head = c.head(&proxy.url("/docs/a"), &[]).await;
    assert_eq!(head.status, 200);
    assert_eq!(head.etag(), get.etag());
    assert!(head.body.is_empty());
    assert_eq!(head.header("content-length"), Some(&*DOC.len().to_string()));
}

#[tokio::test]
async fn if_none_match_with_the_current_tag_gives_304_with_etag_and_validators() {
    let (_b, proxy) = setup("").await;
    let c = Client::new();
    let tag = c.get(&proxy.url("/docs/a"), &[]).await.etag();
    let weak = format!("W/{tag}");
    for inm in [tag.as_str(), &weak, "*", &format!("\"other\", {tag}")] {
        let r = c
            .get(&proxy.url("/docs/a"), &[("if-none-match", inm)])
            .await;
        assert_eq!(r.status, 304, "If-None-Match: {inm}");
        assert_eq!(r.etag(), tag);
        assert!(r.body.is_empty());
        assert!(r.header("date").is_some(), "§15.4.5 asks for Date");
        assert!(r.header("last-modified").is_some());
        assert!(
            r.header("content-type").is_none(),
            "no representation metadata"
        );
    }
    let r = c
        .head(&proxy.url("/docs/a"), &[("if-none-match", &tag)])
        .await;
    assert_eq!(r.status, 304, "HEAD too");
}

#[tokio::test]
async fn if_none_match_with_another_tag_gives_the_full_200() {
    let (_b, proxy) = setup("").await;
    let r = Client::new()
        .get(
            &proxy.url("/docs/a"),
            &[("if-none-match", "\"old\", W/\"older\"")],
        )
        .await;
    assert_eq!(r.status, 200);
    assert_eq!(r.body, DOC.as_bytes());
}

#[tokio::test]
async fn get_with_a_stale_if_match_gets_412_and_a_false_if_match_wins_over_304() {
    let (_b, proxy) = setup("").await;
    let c = Client::new();
    let tag = c.get(&proxy.url("/docs/a"), &[]).await.etag();
    let r = c
        .get(&proxy.url("/docs/a"), &[("if-match", "\"stale\"")])
        .await;
    r.assert_problem(412);
    assert_eq!(r.etag(), tag);
    // §13.2.2: If-Match is evaluated before If-None-Match.
    let r = c
        .get(
            &proxy.url("/docs/a"),
            &[("if-match", "\"stale\""), ("if-none-match", &tag)],
        )
        .await;
    assert_eq!(r.status, 412);
    let r = c
        .get(
            &proxy.url("/docs/a"),
            &[("if-match", &tag), ("if-none-match", &tag)],
        )
        .await;
    assert_eq!(r.status, 304);
}

#[tokio::test]
async fn if_modified_since_is_answered_from_last_modified() {
    let (_b, proxy) = setup("").await;
    let c = Client::new();
    let first = c.get(&proxy.url("/docs/a"), &[]).await;
    let lm = first.header("last-modified").unwrap().to_owned();
    let r = c
        .get(&proxy.url("/docs/a"), &[("if-modified-since", &lm)])
        .await;
    assert_eq!(r.status, 304);
    assert_eq!(r.etag(), first.etag());
    let r = c
        .get(
            &proxy.url("/docs/a"),
            &[("if-modified-since", "Sun, 06 Nov 1994 08:49:37 GMT")],
        )
        .await;
    assert_eq!(r.status, 200);
    // Ignored when If-None-Match is present (§13.1.3).
    let r = c
        .get(
            &proxy.url("/docs/a"),
            &[("if-modified-since", &lm), ("if-none-match", "\"other\"")],
        )
        .await;
    assert_eq!(r.status, 200);
}

#[tokio::test]
async fn non_200_answers_pass_through_untagged() {
    let (_b, proxy) = setup("").await;
    let c = Client::new();
    let r = c.get(&proxy.url("/docs/missing"), &[]).await;
    assert_eq!(r.status, 404);
    assert!(r.header("etag").is_none());
    assert_eq!(
        r.json()["error"],
        "no such document",
        "the backend's own body"
    );
    let r = c
        .get(&proxy.url("/docs/missing"), &[("if-none-match", "*")])
        .await;
    assert_eq!(
        r.status, 404,
        "preconditions are ignored for a non-2xx answer (§13.2.1)"
    );
}

#[tokio::test]
async fn tags_are_remembered_per_url_including_the_query() {
    let backend =
        ScriptedBackend::start(|r| async move { respond(200, &[], format!("body for {}", r.uri)) })
            .await;
    let proxy = Proxy::start(&route("/", ""), &backend.origin()).await;
    let c = Client::new();
    let a = c.get(&proxy.url("/x?v=1"), &[]).await.etag();
    let b = c.get(&proxy.url("/x?v=2"), &[]).await.etag();
    assert_ne!(a, b);
    assert_eq!(proxy.state.tags.len(), 2);
}

#[tokio::test]
async fn an_upstream_strong_etag_is_kept_and_a_weak_one_replaced() {
    let backend = ScriptedBackend::start(|r| async move {
        let strong = r.uri.path() == "/strong";
        match (r.method.as_str(), r.headers.contains_key("range")) {
            ("PUT", _) if strong => respond(204, &[("etag", "\"v8\"")], ""),
            ("PUT", _) => respond(201, &[("etag", "W/\"v8\"")], ""),
            (_, true) => respond(
                206,
                &[("etag", "W/\"v7\""), ("content-range", "bytes 0-0/9")],
                "w",
            ),
            _ if strong => respond(200, &[("etag", "\"v7\"")], "strong body"),
            _ => respond(200, &[("etag", "W/\"v7\"")], "weak body"),
        }
    })
    .await;
    let proxy = Proxy::start(&route("/", ""), &backend.origin()).await;
    let c = Client::new();
    let r = c.get(&proxy.url("/strong"), &[]).await;
    assert_eq!(r.etag(), "\"v7\"");
    let r = c
        .get(&proxy.url("/strong"), &[("if-none-match", "\"v7\"")])
        .await;
    assert_eq!(r.status, 304);
    let r = c.get(&proxy.url("/weak"), &[]).await;
    assert_eq!(r.etag(), proxy.tag_of(b"weak body"));
    // Where a GET's weak tag is replaced, one on an answer that passes through untagged (a
    // write's, a 206) means nothing here: a client that sent it in `If-Match` would get 412
    // every time. It is dropped; a strong one stays, as on a GET.
    let r = c.put(&proxy.url("/weak"), &[], "new weak body").await;
    assert_eq!((r.status, r.header("etag")), (201, None));
    let r = c.get(&proxy.url("/weak"), &[("range", "bytes=0-0")]).await;
    assert_eq!((r.status, r.header("etag")), (206, None));
    let r = c.put(&proxy.url("/strong"), &[], "new strong body").await;
    assert_eq!((r.status, r.etag()), (204, "\"v8\"".to_owned()));
}

#[tokio::test]
async fn a_body_over_the_limit_streams_through_whole_and_untagged() {
    let big = Bytes::from(vec![b'x'; 64 * 1024]);
    let body = big.clone();
    let backend = ScriptedBackend::start(move |r| {
        let body = body.clone();
        async move {
            match r.uri.path() {
                // No Content-Length: the limit is found while reading.
                "/chunked" => {
                    let mut rsp = respond(200, &[], body);
                    rsp.headers_mut().remove("content-length");
                    rsp
                }
                _ => respond(200, &[("content-length", "65536")], body),
            }
        }
    })
    .await;
    let proxy = Proxy::start(&route("/", "max_tag_body = \"16KiB\""), &backend.origin()).await;
    let c = Client::new();
    for path in ["/declared", "/chunked"] {
        let r = c.get(&proxy.url(path), &[]).await;
        assert_eq!(r.status, 200, "{path}");
        assert!(r.header("etag").is_none(), "{path} must not be tagged");
        assert_eq!(r.body, big, "{path} arrives whole");
        let r = c.head(&proxy.url(path), &[]).await;
        assert!(r.header("etag").is_none(), "HEAD {path}");
    }
    assert!(proxy.state.tags.is_empty());
}

#[tokio::test]
async fn if_range_with_a_tag_gets_the_whole_representation() {
    // This backend honours Range, so a forwarded Range would show as a 206.
    let backend = ScriptedBackend::start(|r| async move {
        match r.headers.get("range") {
            Some(_) => respond(206, &[("content-range", "bytes 0-3/34")], &DOC[..4]),
            None => respond(200, &[], DOC),
        }
    })
    .await;
    let proxy = Proxy::start(&route("/", ""), &backend.origin()).await;
    let c = Client::new();
    let r = c
        .get(
            &proxy.url("/a"),
            &[("range", "bytes=0-3"), ("if-range", "\"some-tag\"")],
        )
        .await;
    assert_eq!(r.status, 200);
    assert_eq!(r.body, DOC.as_bytes());
    assert!(backend.last().headers.get("range").is_none());
    // A weak tag is a tag too (one that never matches, §13.1.5): the whole 200, not a
    // part of a representation the client's tag may not be.
    let weak = [("range", "bytes=0-3"), ("if-range", "W/\"some-tag\"")];
    let r = c.get(&proxy.url("/a"), &weak).await;
    assert_eq!((r.status, r.body.as_ref()), (200, DOC.as_bytes()));
    assert!(backend.last().headers.get("range").is_none());
    // A value that is neither a tag nor a date matches nothing (§13.1.5): the whole 200,
    // rather than a part the backend would send if it ignored the value.
    for junk in ["yesterday", "some-tag", ""] {
        let r = c
            .get(
                &proxy.url("/a"),
                &[("range", "bytes=0-3"), ("if-range", junk)],
            )
            .await;
        assert_eq!(
            (r.status, r.body.as_ref()),
            (200, DOC.as_bytes()),
            "{junk:?}"
        );
        assert!(backend.last().headers.get("range").is_none(), "{junk:?}");
    }
    // A plain Range, or one with a date If-Range, is the backend's to judge.
    let r = c.get(&proxy.url("/a"), &[("range", "bytes=0-3")]).await;
    assert_eq!(r.status, 206);
    assert!(r.header("etag").is_none(), "only 200s are tagged");
    let date = [
        ("range", "bytes=0-3"),
        ("if-range", "Sun, 06 Nov 1994 08:49:37 GMT"),
    ];
    assert_eq!(c.get(&proxy.url("/a"), &date).await.status, 206);
    assert_eq!(
        backend.last().headers["if-range"],
        "Sun, 06 Nov 1994 08:49:37 GMT"
    );
}

/// A ranged GET's conditions are judged like a whole one's: the backend's 206 would carry
/// no tag to judge them by, so the proxy asks for the whole representation and answers 304,
/// 412 or the whole 200 (§13.2.2 puts them before Range; §14.2 lets Range be ignored).
#[tokio::test]
async fn a_ranged_get_with_conditions_is_judged_and_never_answered_with_an_unjudged_206() {
    let backend = ScriptedBackend::start(|r| async move {
        let lm = "Sun, 06 Nov 1994 08:49:37 GMT";
        match r.headers.get("range") {
            Some(_) => respond(
                206,
                &[("content-range", "bytes 0-3/34"), ("last-modified", lm)],
                &DOC[..4],
            ),
            None => respond(200, &[("last-modified", lm)], DOC),
        }
    })
    .await;
    let proxy = Proxy::start(&route("/", ""), &backend.origin()).await;
    let c = Client::new();
    let tag = c.get(&proxy.url("/a"), &[]).await.etag();
    let range = ("range", "bytes=0-3");

    let r = c
        .get(&proxy.url("/a"), &[range, ("if-none-match", &tag)])
        .await;
    assert_eq!(r.status, 304, "the client's copy is current");
    assert_eq!(r.etag(), tag);
    let r = c
        .get(&proxy.url("/a"), &[range, ("if-match", "\"stale\"")])
        .await;
    assert_eq!(r.status, 412, "a resumed download of another version");
    let since = ("if-modified-since", "Mon, 07 Nov 1994 08:49:37 GMT");
    assert_eq!(c.get(&proxy.url("/a"), &[range, since]).await.status, 304);
    for passing in [("if-match", tag.as_str()), ("if-none-match", "\"other\"")] {
        let r = c.get(&proxy.url("/a"), &[range, passing]).await;
        assert_eq!(r.status, 200, "{passing:?}: the whole representation");
        assert_eq!(r.body, DOC.as_bytes());
        assert_eq!(r.etag(), tag);
    }
    assert!(backend.requests()[1..]
        .iter()
        .all(|r| r.headers.get("range").is_none()));
    // Without a condition the proxy judges, Range is the backend's.
    let r = c.get(&proxy.url("/a"), &[range]).await;
    assert_eq!(r.status, 206);
    // Only a GET's: a HEAD gets the head of the whole 200, with its tag (§14.2).
    let since = ("if-unmodified-since", "Mon, 07 Nov 1994 08:49:37 GMT");
    for headers in [&[range][..], &[range, since]] {
        let r = c.head(&proxy.url("/a"), headers).await;
        assert_eq!((r.status, r.etag()), (200, tag.clone()), "{headers:?}");
    }
    // §13.1.4 names this use: a download resumed after the document changed. The date is
    // judged on the part's own head, so a resume that holds stays a part.
    let unmodified = ("if-unmodified-since", "Sat, 05 Nov 1994 08:49:37 GMT");
    let r = c.get(&proxy.url("/a"), &[range, unmodified]).await;
    let p = r.assert_problem(412);
    assert!(p["detail"]
        .as_str()
        .unwrap()
        .contains("If-Unmodified-Since"));
    let unmodified = ("if-unmodified-since", "Mon, 07 Nov 1994 08:49:37 GMT");
    let r = c.get(&proxy.url("/a"), &[range, unmodified]).await;
    assert_eq!(r.status, 206, "unchanged since: the part asked for");
    assert_eq!(r.body, DOC.as_bytes()[..4]);
}

#[tokio::test]
async fn if_modified_since_is_answered_by_the_proxy_so_its_304_carries_the_etag() {
    // A backend that would answer If-Modified-Since itself, without an ETag.
    let backend = ScriptedBackend::start(|r| async move {
        let lm = "Sun, 06 Nov 1994 08:49:37 GMT";
        match r.headers.get("if-modified-since") {
            Some(_) => respond(304, &[("last-modified", lm)], ""),
            None => respond(200, &[("last-modified", lm)], "doc"),
        }
    })
    .await;
    let proxy = Proxy::start(&route("/", ""), &backend.origin()).await;
    let r = Client::new()
        .get(
            &proxy.url("/a"),
            &[("if-modified-since", "Sun, 06 Nov 1994 08:49:37 GMT")],
        )
        .await;
    assert_eq!(r.status, 304);
    assert_eq!(r.etag(), proxy.tag_of(b"doc"));
    assert!(backend.last().headers.get("if-modified-since").is_none());
    // One that is not a date is ignored (§13.1.3), and not passed on either.
    let r = Client::new()
        .get(&proxy.url("/a"), &[("if-modified-since", "yesterday")])
        .await;
    assert_eq!(r.status, 200);
    assert!(backend.last().headers.get("if-modified-since").is_none());
}

/// A backend that sends several `ETag` lines names no one tag: the proxy's replaces them
/// all (the client sees one). A 200 with `Content-Range` holds part of a representation:
/// it passes untagged, and its tag is not remembered.
#[tokio::test]
async fn several_upstream_etags_are_replaced_and_a_200_with_content_range_is_not_tagged() {
    let backend = ScriptedBackend::start(|r| async move {
        match r.uri.path() {
            "/two" => respond(200, &[("etag", "\"a\""), ("etag", "\"b\"")], DOC),
            _ => respond(200, &[("content-range", "bytes 0-3/34")], &DOC[..4]),
        }
    })
    .await;
    let proxy = Proxy::start(&route("/", ""), &backend.origin()).await;
    let c = Client::new();
    let r = c.get(&proxy.url("/two"), &[]).await;
    let tags: Vec<_> = r.headers.get_all("etag").iter().collect();
    assert_eq!(tags.len(), 1, "{tags:?}");
    assert_eq!(r.etag(), proxy.tag_of(DOC));
    let r = c.get(&proxy.url("/part"), &[]).await;
    assert_eq!(r.status, 200);
    assert!(r.header("etag").is_none());
    assert_eq!(r.body, &DOC.as_bytes()[..4]);
}

/// A backend that renews a session cookie on every read renews it on a revalidation too:
/// the 304 carries the `Set-Cookie` its 200 would have (as through nginx).
#[tokio::test]
async fn a_304_carries_the_cookie_the_200_sets() {
    let backend = ScriptedBackend::start(|_| async move {
        respond(200, &[("set-cookie", "session=renewed; Path=/")], "the doc")
    })
    .await;
    let proxy = Proxy::start(&route("/", ""), &backend.origin()).await;
    let c = Client::new();
    let tag = c.get(&proxy.url("/doc"), &[]).await.etag();
    let r = c.get(&proxy.url("/doc"), &[("if-none-match", &tag)]).await;
    assert_eq!(r.status, 304);
    assert_eq!(r.header("set-cookie"), Some("session=renewed; Path=/"));
}

/// A backend that sends its bodies chunked: the GET's answer, held whole to be tagged,
/// goes out with its length, and a HEAD says the same length (RFC 9110 §9.3.2: the fields
/// a GET would have), with the same tag, over HTTP/1.1 and HTTP/2.
#[tokio::test]
async fn a_head_of_a_chunked_body_has_the_length_and_tag_its_get_has() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let origin = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut buf = vec![0u8; 4096];
                while let Ok(n) = s.read(&mut buf).await {
                    if n == 0 {
                        return;
                    }
                    let answer = b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n\
                                   5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n";
                    if s.write_all(answer).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    let proxy = Proxy::start(&route("/", ""), &origin).await;
    for c in [Client::new(), Client::h2()] {
        let get = c.get(&proxy.url("/doc"), &[]).await;
        assert_eq!(get.body, "hello world");
        assert_eq!(get.header("content-length"), Some("11"));
        let head = c.head(&proxy.url("/doc"), &[]).await;
        assert_eq!(head.status, 200);
        assert!(head.body.is_empty());
        assert_eq!(head.header("content-length"), Some("11"), "{head:?}");
        assert_eq!(head.etag(), get.etag());
    }
}

/// `max_tag_body` is the largest body tagged: a 200 of exactly that many bytes gets its
/// strong ETag (so that writes to it can be guarded), declared or chunked, and only a
/// longer one streams through untagged.
#[tokio::test]
async fn a_body_of_exactly_max_tag_body_is_tagged() {
    const LIMIT: usize = 16 * 1024;
    let backend = ScriptedBackend::start(|r| async move {
        let n = if r.uri.path().ends_with("/over") {
            LIMIT + 1
        } else {
            LIMIT
        };
        let body = vec![b'x'; n];
        match r.uri.path().starts_with("/chunked") {
            true => {
                let mut rsp = respond(200, &[], body);
                rsp.headers_mut().remove("content-length");
                rsp
            }
            false => respond(200, &[], body),
        }
    })
    .await;
    let proxy = Proxy::start(&route("/", "max_tag_body = \"16KiB\""), &backend.origin()).await;
    let c = Client::new();
    for path in ["/declared/at", "/chunked/at"] {
        let r = c.get(&proxy.url(path), &[]).await;
        assert_eq!(r.status, 200, "{path}");
        assert_eq!(r.body.len(), LIMIT, "{path}");
        assert_eq!(
            r.header("etag"),
            Some(proxy.tag_of(vec![b'x'; LIMIT]).as_str()),
            "{path} is tagged"
        );
    }
    for path in ["/declared/over", "/chunked/over"] {
        let r = c.get(&proxy.url(path), &[]).await;
        assert_eq!(r.body.len(), LIMIT + 1, "{path}");
        assert!(r.header("etag").is_none(), "{path} is not tagged");
    }
}

/// `tag_cache_entries` bounds the bytes the cache holds, not only its entries: a client
/// choosing long URLs cannot grow it past them, and neither can a backend choosing long tags.
/// An `ETag` a backend sends itself is kept as sent, and may be as long as a response head
/// (`upstream_read_buffer`, 256 KiB): counted as nothing, 100,000 of them held gigabytes in
/// a cache said to take some 25 MB.
#[tokio::test]
async fn long_tags_a_backend_sends_itself_count_in_the_tag_caches_bound() {
    let tag = format!("\"{}\"", "t".repeat(2000));
    let sent = tag.clone();
    let backend = ScriptedBackend::start(move |_| {
        let tag = sent.clone();
        async move { respond(200, &[("etag", tag.as_str())], "doc") }
    })
    .await;
    let proxy = Proxy::start_with(
        &route("/docs/", ""),
        &backend.origin(),
        "tag_cache_entries = 10",
    )
    .await;
    let c = Client::new();
    for i in 0..5 {
        let r = c.get(&proxy.url(&format!("/docs/{i}")), &[]).await;
        assert_eq!(r.etag(), tag, "the backend's own tag is used");
    }
    // Ten entries may hold 2,560 bytes of keys and tags on average: one 2 KB tag fits, not
    // five, and the one kept is the last read's.
    assert_eq!(proxy.state.tags.len(), 1, "entries held");
    let last = common::proxy::key(&backend.origin(), "/docs/4");
    assert_eq!(
        proxy.state.tags.get(&last).map(|k| k.tag.to_string()),
        Some(tag)
    );
}

/// Two representations of one state that differ only in their metadata (RFC 9110 §8.8.1's
/// own case: content negotiation over media types that share one data format) must not
/// share a strong tag: a cache that revalidates one with the other's tag would be told 304
/// and serve the JSON variant to a client that asked for `text/plain`. Each tag is still
/// the one a write with the same `Accept` is judged by, and a kept copy of one variant's
/// bytes never lends its tag to the other.
#[tokio::test]
async fn variants_with_the_same_bytes_and_another_content_type_get_other_tags() {
    let backend = ScriptedBackend::start(|r| async move {
        if r.method == http::Method::PUT {
            return respond(204, &[], "");
        }
        let json = r
            .headers
            .get("accept")
            .is_some_and(|a| a.as_bytes() == b"application/json");
        let ctype = if json {
            "application/json"
        } else {
            "text/plain"
        };
        respond(200, &[("content-type", ctype), ("vary", "Accept")], DOC)
    })
    .await;
    let proxy = Proxy::start(&route("/", ""), &backend.origin()).await;
    let c = Client::new();
    let (json, text) = ([("accept", "application/json")], [("accept", "text/plain")]);
    let j = c.get(&proxy.url("/doc"), &json).await;
    let t = c.get(&proxy.url("/doc"), &text).await;
    assert_eq!((j.body.clone(), t.body.clone()), (DOC.into(), DOC.into()));
    assert_ne!(j.etag(), t.etag(), "one strong tag for two representations");
    // Alternating, each read compared with the other's kept copy: each keeps its own tag.
    for _ in 0..2 {
        assert_eq!(c.get(&proxy.url("/doc"), &json).await.etag(), j.etag());
        assert_eq!(c.get(&proxy.url("/doc"), &text).await.etag(), t.etag());
    }
    let inm = [
        ("accept", "text/plain"),
        ("if-none-match", j.header("etag").unwrap()),
    ];
    let r = c.get(&proxy.url("/doc"), &inm).await;
    assert_eq!(
        r.status, 200,
        "the JSON variant's tag validates the text one"
    );
    let im = [
        ("accept", "application/json"),
        ("if-match", j.header("etag").unwrap()),
    ];
    let r = c.put(&proxy.url("/doc"), &im, DOC).await;
    assert_eq!(
        r.status, 204,
        "a write is judged by the tag its reader was given"
    );
}
