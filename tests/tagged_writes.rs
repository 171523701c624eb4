//! Routes with `tag_puts = true`, for backends that store a PUT body byte for byte: a
//! successful PUT answers with the tag of the body it stored, the proxy remembers that tag,
//! and the next write holding it needs no revalidation GET. Whatever the proxy cannot vouch
//! for (a partial or encoded body, a backend that keeps its own validators, a refused or
//! unfinished write) is not remembered.

mod common;

use std::io::Write;
use std::time::{Duration, SystemTime};

use common::backend::respond;
use common::proxy::route;
use common::{Backend, Client, Proxy, ScriptedBackend};

const TAGGED: &str = "validation = \"cached\"\ntag_puts = true";

async fn setup(extra: &str) -> (Backend, Proxy) {
    let backend = Backend::start().await;
    backend.store.put("/docs/a", "v1");
    let proxy = Proxy::start(&route("/docs/", extra), &backend.origin()).await;
    (backend, proxy)
}

#[tokio::test]
async fn a_put_answers_with_the_tag_of_its_body_and_the_next_write_needs_no_revalidation() {
    let (backend, proxy) = setup(TAGGED).await;
    let c = Client::new();
    let url = proxy.url("/docs/a");
    let t1 = c.get(&url, &[]).await.etag();
    let reads = backend.store.reads();

    let r = c.put(&url, &[("if-match", &t1)], "v2").await;
    assert_eq!(r.status, 204);
    let t2 = r.etag();
    assert_eq!(t2, proxy.tag_of(b"v2"));

    // The tag from the PUT is good for the next write: no GET reaches the backend.
    let r = c.put(&url, &[("if-match", &t2)], "v3").await;
    assert_eq!(r.status, 204);
    assert_eq!(r.etag(), proxy.tag_of(b"v3"));
    assert_eq!(backend.store.reads(), reads, "no revalidation GET");

    // The writer that still holds t2 raced and lost: 412 with the current tag, not forwarded.
    let writes = backend.store.writes();
    let r = c.put(&url, &[("if-match", &t2)], "v4").await;
    r.assert_problem(412);
    assert_eq!(r.etag(), proxy.tag_of(b"v3"));
    assert_eq!(backend.store.writes(), writes);
    assert_eq!(
        backend.store.reads(),
        reads,
        "the 412 came from the remembered tag"
    );

    // And the tag a PUT gave is the tag a GET gives for what the backend stored.
    assert_eq!(c.get(&url, &[]).await.etag(), proxy.tag_of(b"v3"));

    // A create (201) is tagged too.
    let new = proxy.url("/docs/new");
    let r = c.put(&new, &[("if-none-match", "*")], "fresh").await;
    assert_eq!(r.status, 201);
    assert_eq!(r.etag(), proxy.tag_of(b"fresh"));
    let reads = backend.store.reads();
    let r = c
        .put(&new, &[("if-match", &proxy.tag_of(b"fresh"))], "fresher")
        .await;
    assert_eq!(r.status, 204);
    assert_eq!(backend.store.reads(), reads);
}

#[tokio::test]
async fn without_tag_puts_a_put_carries_no_etag_and_the_next_write_revalidates() {
    let (backend, proxy) = setup("validation = \"cached\"").await;
    let c = Client::new();
    let url = proxy.url("/docs/a");
    let t1 = c.get(&url, &[]).await.etag();
    let r = c.put(&url, &[("if-match", &t1)], "v2").await;
    assert_eq!(r.status, 204);
    assert_eq!(r.header("etag"), None);
    let reads = backend.store.reads();
    let r = c
        .put(&url, &[("if-match", &proxy.tag_of(b"v2"))], "v3")
        .await;
    assert_eq!(r.status, 204);
    assert_eq!(
        backend.store.reads(),
        reads + 1,
        "the write had to revalidate"
    );
}

#[tokio::test]
async fn encoded_partial_and_non_put_writes_and_refusals_are_not_remembered() {
    let (backend, proxy) = setup(TAGGED).await;
    backend.store.put("/docs/old", "archived");
    backend.store.archive("/docs/old");
    let c = Client::new();
    let key = |p: &str| common::proxy::key(&backend.origin(), p);
    let url = proxy.url("/docs/a");

    // The backend may store an encoded body decoded, or a range into a larger document.
    for extra in [
        ("content-encoding", "gzip"),
        ("content-range", "bytes 0-1/2"),
    ] {
        let tag = c.get(&url, &[]).await.etag();
        let r = c.put(&url, &[("if-match", &tag), extra], "v2").await;
        assert_eq!(r.status, 204, "{extra:?}");
        assert_eq!(r.header("etag"), None, "{extra:?}");
        assert!(proxy.state.tags.get(&key("/docs/a")).is_none(), "{extra:?}");
    }

    // PATCH and DELETE change the resource in ways the body does not describe.
    let tag = c.get(&url, &[]).await.etag();
    let r = c.send("PATCH", &url, &[("if-match", &tag)], "+more").await;
    assert_eq!(r.status, 204);
    assert_eq!(r.header("etag"), None);
    assert!(proxy.state.tags.get(&key("/docs/a")).is_none());

    // The backend's own refusal (409) leaves the remembered tag as it was.
    let old = proxy.url("/docs/old");
    let old_tag = c.get(&old, &[]).await.etag();
    let r = c.put(&old, &[("if-match", &old_tag)], "x").await;
    assert_eq!(r.status, 409);
    assert_eq!(r.header("etag"), None);
    let kept = proxy.state.tags.get(&key("/docs/old")).unwrap();
    assert_eq!(kept.tag.to_string(), old_tag);
}

#[tokio::test]
async fn a_backend_with_its_own_validators_or_an_unfinished_write_is_not_tagged() {
    // 202: accepted, not done. 200 with an ETag: the backend tags on its own.
    let backend = ScriptedBackend::start(|r| async move {
        match (r.method.as_str(), r.uri.path()) {
            ("GET", _) => respond(200, &[], "v1"),
            ("PUT", "/later") => respond(202, &[], ""),
            _ => respond(200, &[("etag", "\"backend-7\"")], ""),
        }
    })
    .await;
    let proxy = Proxy::start(&route("/", TAGGED), &backend.origin()).await;
    let c = Client::new();
    let key = |p: &str| common::proxy::key(&backend.origin(), p);
    for (path, status, etag) in [("/later", 202, None), ("/own", 200, Some("\"backend-7\""))] {
        let tag = c.get(&proxy.url(path), &[]).await.etag();
        let r = c.put(&proxy.url(path), &[("if-match", &tag)], "v2").await;
        assert_eq!(r.status, status, "{path}");
        assert_eq!(
            r.header("etag"),
            etag,
            "{path}: the backend's answer as it was"
        );
        assert!(proxy.state.tags.get(&key(path)).is_none(), "{path}");
    }
}

/// One document (revision, body) behind a backend that tags its GETs itself (`"rev-N"`)
/// and answers every other request by storing its body as the next revision, with no `ETag`
/// (nginx with `etag on` answers PUTs so).
async fn self_tagging_backend() -> (
    std::sync::Arc<std::sync::Mutex<(u32, String)>>,
    ScriptedBackend,
) {
    use std::sync::{Arc, Mutex};
    let doc = Arc::new(Mutex::new((1u32, String::from("v1"))));
    let backend = ScriptedBackend::start({
        let doc = doc.clone();
        move |r| {
            let doc = doc.clone();
            async move {
                let mut d = doc.lock().unwrap();
                match r.method.as_str() {
                    "GET" => respond(200, &[("etag", &format!("\"rev-{}\"", d.0))], d.1.clone()),
                    _ => {
                        *d = (d.0 + 1, String::from_utf8(r.body.to_vec()).unwrap());
                        respond(204, &[], "")
                    }
                }
            }
        }
    })
    .await;
    (doc, backend)
}

/// A backend that tags its GETs itself but sends no `ETag` with a PUT's answer (nginx with
/// `etag on` is one): answering the PUT with ifmatch's own tag would hand the writer a tag
/// that no GET gives, and its next write would get a 412 it did not earn.
#[tokio::test]
async fn a_resource_the_backend_tags_itself_gets_no_tag_from_a_put() {
    let (doc, backend) = self_tagging_backend().await;
    let proxy = Proxy::start(&route("/", TAGGED), &backend.origin()).await;
    let c = Client::new();
    let url = proxy.url("/doc");
    let key = common::proxy::key(&backend.origin(), "/doc");

    // Writer A reads and writes; the answer carries no tag of the proxy's making.
    let t1 = c.get(&url, &[]).await.etag();
    assert_eq!(t1, "\"rev-1\"");
    let r = c.put(&url, &[("if-match", &t1)], "v2").await;
    assert_eq!(r.status, 204);
    assert_eq!(r.header("etag"), None, "no tag a GET would not give");
    assert!(
        proxy.state.tags.get(&key).is_none(),
        "the old tag is dropped"
    );

    // Writer B reads the backend's new tag and writes with it: no 412.
    let t2 = c.get(&url, &[]).await.etag();
    assert_eq!(t2, "\"rev-2\"");
    let r = c.put(&url, &[("if-match", &t2)], "v3").await;
    assert_eq!(r.status, 204);
    assert_eq!(r.header("etag"), None);

    // Knowing that the backend tags this resource outlives the dropped tag: an
    // unconditional write is not tagged either.
    let r = c.put(&url, &[], "v4").await;
    assert_eq!(r.status, 204);
    assert_eq!(r.header("etag"), None);
    assert_eq!(c.get(&url, &[]).await.etag(), "\"rev-4\"");
    assert_eq!(doc.lock().unwrap().1, "v4");

    // A resource ifmatch has not seen tagged by the backend is still tagged by its PUT.
    let r = c.put(&proxy.url("/other"), &[], "x").await;
    assert_eq!(r.status, 204);
    assert_eq!(r.etag(), proxy.tag_of(b"x"));
}

#[tokio::test]
async fn a_chunked_put_is_tagged_once_its_last_chunk_went_up() {
    let (backend, proxy) = setup(TAGGED).await;
    let c = Client::new();
    let url = proxy.url("/docs/a");
    let tag = c.get(&url, &[]).await.etag();
    let addr = proxy.addr;
    let req = format!(
        "PUT /docs/a HTTP/1.1\r\nhost: x\r\nif-match: {tag}\r\nconnection: close\r\n\
         transfer-encoding: chunked\r\n\r\n3\r\nv2-\r\n4\r\nbody\r\n0\r\n\r\n"
    );
    let head = common::raw_exchange(addr, req.as_bytes()).await;
    assert!(head.starts_with("HTTP/1.1 204"), "{head}");
    let etag = head.lines().find_map(|l| {
        l.get(..5)
            .filter(|n| n.eq_ignore_ascii_case("etag:"))
            .map(|_| l[5..].trim())
    });
    assert_eq!(etag, Some(proxy.tag_of(b"v2-body").as_str()), "{head}");
    assert_eq!(backend.store.get("/docs/a").unwrap(), "v2-body");
}

/// A PUT over `max_tag_body` is stored but gets no tag, whether its size was declared or
/// it proved larger as it came, as a GET of it gets none: a tag the proxy could never give
/// again left its writer with a 412 carrying no tag on its next write (under `revalidate`),
/// or let it chain writes no reader could join (under `cached`). A PUT within it in a
/// stream of its own (behind `Expect: 100-continue`) is tagged as before.
#[tokio::test]
async fn a_put_over_max_tag_body_is_stored_untagged_as_a_get_of_it_would_be() {
    for validation in ["cached", "revalidate"] {
        let extra =
            format!("validation = \"{validation}\"\ntag_puts = true\nmax_tag_body = \"8B\"");
        let (backend, proxy) = setup(&extra).await;
        let c = Client::new();
        let url = proxy.url("/docs/a");
        let tag = c.get(&url, &[]).await.etag();
        let r = c.put(&url, &[("if-match", &tag)], "0123456789").await;
        assert_eq!(r.status, 204, "{validation}");
        assert_eq!(
            r.header("etag"),
            None,
            "{validation}: declared over the limit"
        );
        assert_eq!(backend.store.get("/docs/a").unwrap(), "0123456789");
        let r = c.get(&url, &[]).await;
        assert_eq!(
            r.header("etag"),
            None,
            "{validation}: nor does a GET give one"
        );

        // Of unknown length, proving longer than the limit as it comes.
        let req = "PUT /docs/b HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\
                   transfer-encoding: chunked\r\n\r\n5\r\n01234\r\n5\r\n56789\r\n0\r\n\r\n";
        let head = common::raw_exchange(proxy.addr, req.as_bytes()).await;
        assert!(head.starts_with("HTTP/1.1 201"), "{validation}: {head}");
        assert!(
            !head.to_ascii_lowercase().contains("etag:"),
            "{validation}: {head}"
        );
        assert_eq!(backend.store.get("/docs/b").unwrap(), "0123456789");

        // Within the limit, streamed behind `Expect: 100-continue`: tagged.
        let r = c
            .put(
                &proxy.url("/docs/c"),
                &[("expect", "100-continue")],
                "small",
            )
            .await;
        assert_eq!(r.status, 201, "{validation}");
        assert_eq!(r.etag(), proxy.tag_of(b"small"), "{validation}");
    }
}

/// A chunked PUT (size unknown) that proves longer than `max_tag_body` streams upstream
/// under the lock as it arrives; cut short, it leaves no tag: neither the old one nor one of
/// a partial body.
#[tokio::test]
async fn a_streamed_put_cut_short_by_its_client_leaves_no_tag() {
    let (backend, proxy) = setup(&format!("{TAGGED}\nmax_tag_body = \"8B\"")).await;
    let c = Client::new();
    let url = proxy.url("/docs/a");
    let tag = c.get(&url, &[]).await.etag();
    let key = common::proxy::key(&backend.origin(), "/docs/a");
    assert!(proxy.state.tags.get(&key).is_some());

    let addr = proxy.addr;
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    write!(
        s,
        "PUT /docs/a HTTP/1.1\r\nhost: x\r\nif-match: {tag}\r\ntransfer-encoding: chunked\r\n\r\na\r\n0123456789\r\n"
    )
    .unwrap();
    // Let the write pass its check and start upstream, then go away mid-body.
    let within = Duration::from_secs(5);
    assert!(
        common::eventually(within, || !proxy.state.locks.is_empty()).await,
        "the write never took its lock"
    );
    drop(s);
    assert!(
        common::eventually(within, || proxy.state.locks.is_empty()).await,
        "the lock was not released"
    );
    assert!(
        proxy.state.tags.get(&key).is_none(),
        "neither the old tag nor one of a partial body"
    );
    assert_eq!(backend.store.get("/docs/a").unwrap(), "v1");
}

/// A PUT of known size within `max_tag_body` is read whole before its lock; cut short, it
/// never takes the lock nor reaches the backend, so the tag stays as it was.
#[tokio::test]
async fn a_put_of_known_size_cut_short_is_never_sent_and_changes_nothing() {
    let (backend, proxy) = setup(TAGGED).await;
    let c = Client::new();
    let url = proxy.url("/docs/a");
    let tag = c.get(&url, &[]).await.etag();
    let key = common::proxy::key(&backend.origin(), "/docs/a");
    let writes = backend.store.writes();

    let addr = proxy.addr;
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    write!(
        s,
        "PUT /docs/a HTTP/1.1\r\nhost: x\r\nif-match: {tag}\r\ncontent-length: 100\r\n\r\n0123456789"
    )
    .unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(proxy.state.locks.is_empty(), "no lock while the body comes");
    drop(s);
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(backend.store.writes(), writes, "nothing was sent");
    assert_eq!(
        proxy.state.tags.get(&key).map(|k| k.tag.to_string()),
        Some(tag.clone())
    );
    // The tag still stands for what the backend holds: the next write with it succeeds.
    assert_eq!(c.put(&url, &[("if-match", &tag)], "v2").await.status, 204);
}

#[tokio::test]
async fn a_date_condition_after_a_tagged_put_asks_the_backend() {
    let (backend, proxy) = setup(TAGGED).await;
    let c = Client::new();
    let url = proxy.url("/docs/a");
    let tag = c.get(&url, &[]).await.etag();
    assert_eq!(c.put(&url, &[("if-match", &tag)], "v2").await.status, 204);
    // The backend dated v2 now; the PUT's answer did not say so, so the remembered tag has
    // no date. A writer who last saw the document an hour ago must not pass.
    let an_hour_ago = httpdate::fmt_http_date(SystemTime::now() - Duration::from_secs(3600));
    let (reads, writes) = (backend.store.reads(), backend.store.writes());
    let r = c
        .put(&url, &[("if-unmodified-since", &an_hour_ago)], "v3")
        .await;
    r.assert_problem(412);
    assert_eq!(backend.store.reads(), reads + 1, "revalidated for the date");
    assert_eq!(backend.store.writes(), writes);
    assert_eq!(backend.store.get("/docs/a").unwrap(), "v2");
}

/// A reload that changes the tag key clears the cache; a PUT in flight across it, whose
/// body was hashed under the old key, must not put an old-key tag back afterwards: under
/// `cached` that tag would refuse the writer holding the right tag (412) and let through
/// one holding an old-key tag.
#[tokio::test]
async fn a_put_in_flight_across_a_key_change_leaves_no_tag_of_the_old_key() {
    // The write of "v2" takes 400 ms, for the reload to land in.
    let (backend, doc) = slow_v2_store(Duration::from_millis(400)).await;
    let routes = route("/docs/", TAGGED);
    let proxy = Proxy::start_with(&routes, &backend.origin(), KEY_A).await;
    let (url, c) = (proxy.url("/docs/a"), Client::new());
    let t1 = c.get(&url, &[]).await.etag();
    let put = {
        let (c, url) = (c.clone(), url.clone());
        tokio::spawn(async move { c.put(&url, &[("if-match", &t1)], "v2").await })
    };
    tokio::time::sleep(Duration::from_millis(100)).await;
    reload_with_key_b(&proxy, &routes, &backend.origin());
    let old_key_v2 = put.await.unwrap();
    assert_eq!(old_key_v2.status, 204);
    // The writer that holds v2's tag under the key now in use goes through; one holding
    // the tag the PUT was answered with (the old key's) does not.
    let r = c.put(&url, &[("if-match", &old_key_v2.etag())], "v3").await;
    assert_eq!(r.status, 412, "a tag of the old key is refused");
    let r = c
        .put(&url, &[("if-match", &proxy.tag_of("v2"))], "v3")
        .await;
    assert_eq!(r.status, 204, "the current tag under the current key");
    assert_eq!(*doc.lock().unwrap(), "v3");
}

/// The same, on a plain `cached` route: the old-key tag would come from a write's
/// revalidation GET. The write took the routing (the old key) before the reload, waited for
/// the URL's lock across it, then revalidated the emptied cache with a fresh ticket.
#[tokio::test]
async fn a_revalidation_in_flight_across_a_key_change_leaves_no_tag_of_the_old_key() {
    let (backend, doc) = slow_v2_store(Duration::from_millis(600)).await;
    let routes = route("/docs/", "validation = \"cached\"");
    let proxy = Proxy::start_with(&routes, &backend.origin(), KEY_A).await;
    let (url, c) = (proxy.url("/docs/a"), Client::new());
    let t1 = c.get(&url, &[]).await.etag();
    let w1 = {
        let (c, url, t1) = (c.clone(), url.clone(), t1.clone());
        tokio::spawn(async move { c.put(&url, &[("if-match", &t1)], "v2").await })
    };
    tokio::time::sleep(Duration::from_millis(100)).await;
    // A stale writer (holds v1's tag), queued for the lock under the old key.
    let w2 = {
        let (c, url) = (c.clone(), url.clone());
        tokio::spawn(async move { c.put(&url, &[("if-match", &t1)], "v9").await })
    };
    tokio::time::sleep(Duration::from_millis(100)).await;
    reload_with_key_b(&proxy, &routes, &backend.origin());
    assert_eq!(w1.await.unwrap().status, 204);
    assert_eq!(w2.await.unwrap().status, 412);
    assert_eq!(*doc.lock().unwrap(), "v2");
    // v2's tag under the key in use must be current; the old key's must not.
    let r = c
        .put(&url, &[("if-match", &proxy.tag_of("v2"))], "v3")
        .await;
    assert_eq!(r.status, 204, "the current tag under the current key");
}

const KEY_A: &str = "tag_key = \"aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa\"";

/// A store of one document, "v1" at first, that keeps what is PUT; the write of "v2" takes
/// `slow` (for a reload to land in).
async fn slow_v2_store(
    slow: Duration,
) -> (ScriptedBackend, std::sync::Arc<std::sync::Mutex<String>>) {
    use std::sync::{Arc, Mutex};
    let doc = Arc::new(Mutex::new("v1".to_owned()));
    let d = doc.clone();
    let backend = ScriptedBackend::start(move |r| {
        let d = d.clone();
        async move {
            if r.method == "GET" {
                return respond(200, &[], d.lock().unwrap().clone());
            }
            if r.body.as_ref() == b"v2" {
                tokio::time::sleep(slow).await;
            }
            *d.lock().unwrap() = String::from_utf8(r.body.to_vec()).unwrap();
            respond(204, &[], "")
        }
    })
    .await;
    (backend, doc)
}

/// Reloads `proxy` with `routes` and another tag key.
fn reload_with_key_b(proxy: &Proxy, routes: &str, origin: &str) {
    let key_b = "tag_key = \"bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb\"";
    let text = format!(
        "[server]\nlisten = \"127.0.0.1:0\"\n{key_b}\n{}",
        routes.replace("{upstream}", origin)
    );
    proxy
        .state
        .reload(&ifmatch::config::Config::parse(&text, "t.toml").unwrap());
}

/// A store that keeps PUT bodies as sent, and serves them gzip-coded to clients that accept
/// it (`Vary: Accept-Encoding`), as nginx's `gzip on` does. The writer sends the same
/// `Accept-Encoding` on every request, as HTTP libraries do. Nothing changes the document
/// between its two PUTs, so the tag its first PUT was answered with (README: "A client can
/// then write again with the tag from its PUT") must not get a 412: under `revalidate` the
/// revalidation fetches the gzip representation, whose tag is not the PUT body's, and the
/// second PUT was refused though nobody raced it. Under `cached` the same happens once any
/// gzip reader has read the document between the two PUTs. (A PUT answered with no tag
/// passes: its writer reads again for the tag of its own representation.)
#[tokio::test]
async fn the_tag_a_put_was_answered_with_is_not_refused_when_the_backend_compresses() {
    let doc = std::sync::Arc::new(std::sync::Mutex::new("v1".to_owned()));
    let d = doc.clone();
    let backend = ScriptedBackend::start(move |r| {
        let d = d.clone();
        async move {
            let gzip = r
                .headers
                .get("accept-encoding")
                .is_some_and(|v| v.to_str().unwrap().contains("gzip"));
            if r.method == "GET" {
                let body = d.lock().unwrap().clone();
                return match gzip {
                    true => respond(
                        200,
                        &[("content-encoding", "gzip"), ("vary", "Accept-Encoding")],
                        format!("gz({body})"),
                    ),
                    false => respond(200, &[("vary", "Accept-Encoding")], body),
                };
            }
            *d.lock().unwrap() = String::from_utf8(r.body.to_vec()).unwrap();
            respond(204, &[], "")
        }
    })
    .await;
    let mut refused = Vec::new();
    for validation in ["revalidate", "cached"] {
        *doc.lock().unwrap() = "v1".into();
        let extra = format!("validation = \"{validation}\"\ntag_puts = true");
        let proxy = Proxy::start(&route("/docs/", &extra), &backend.origin()).await;
        let c = Client::new();
        let url = proxy.url("/docs/a");
        let gz = ("accept-encoding", "gzip");
        let t1 = c.get(&url, &[gz]).await.etag();
        let r = c.put(&url, &[("if-match", &t1), gz], "v2").await;
        assert_eq!(r.status, 204, "{validation}");
        // Either no tag (the writer reads again for its representation's), or one that
        // holds while nothing changes.
        let Some(t2) = r.header("etag").map(str::to_owned) else {
            continue;
        };
        assert_eq!(t2, proxy.tag_of(b"v2"), "{validation}");
        // Another client reads the document: it changes nothing.
        assert_eq!(c.get(&url, &[gz]).await.status, 200);
        let r = c.put(&url, &[("if-match", &t2), gz], "v3").await;
        if r.status != 204 {
            refused.push(format!("{validation}: {}", r.status));
        }
        assert_eq!(
            *doc.lock().unwrap(),
            if r.status == 204 { "v3" } else { "v2" }
        );
    }
    assert!(
        refused.is_empty(),
        "a PUT holding the tag its own last PUT was answered with, nothing written since: \
         {refused:?}"
    );
}

/// Whether a PUT may be answered with its body's tag is first judged before its lock and
/// its send; a GET may learn meanwhile that the backend tags the resource itself (or serves
/// it in several representations). The PUT's answer must then carry no tag of the proxy's
/// making either: its writer's next write would be judged by the backend's tag, and get a
/// 412 it did not earn. Nor may its record erase what the GET learnt, or every later PUT
/// would be tagged as well.
#[tokio::test]
async fn a_put_in_flight_when_a_get_finds_the_backends_own_tag_is_not_tagged() {
    use std::sync::{Arc, Mutex};
    let doc = Arc::new(Mutex::new((1u32, String::from("v1"))));
    let gate = Arc::new(tokio::sync::Semaphore::new(0));
    let backend = ScriptedBackend::start({
        let (doc, gate) = (doc.clone(), gate.clone());
        move |r| {
            let (doc, gate) = (doc.clone(), gate.clone());
            async move {
                if r.method == "GET" {
                    let d = doc.lock().unwrap();
                    return respond(200, &[("etag", &format!("\"rev-{}\"", d.0))], d.1.clone());
                }
                gate.acquire().await.unwrap().forget();
                let mut d = doc.lock().unwrap();
                *d = (d.0 + 1, String::from_utf8(r.body.to_vec()).unwrap());
                respond(204, &[], "")
            }
        }
    })
    .await;
    let proxy = Proxy::start(&route("/", "tag_puts = true"), &backend.origin()).await;
    let c = Client::new();
    let url = proxy.url("/doc");

    // A PUT to a URL not seen yet goes up and waits for the backend.
    let put = tokio::spawn({
        let (c, url) = (c.clone(), url.clone());
        async move { c.put(&url, &[], "v2").await }
    });
    let sent = || backend.requests().iter().any(|r| r.method == "PUT");
    assert!(common::eventually(Duration::from_secs(5), sent).await);
    // Meanwhile a GET comes back with the backend's own tag.
    assert_eq!(c.get(&url, &[]).await.etag(), "\"rev-1\"");
    gate.add_permits(1);
    let r = put.await.unwrap();
    assert_eq!(r.status, 204);
    assert_eq!(
        r.header("etag"),
        None,
        "a PUT answered with a tag no GET gives, once a GET found the backend's own"
    );

    // The next PUT knows that the backend tags this resource.
    gate.add_permits(1);
    let r = c.put(&url, &[], "v3").await;
    assert_eq!(r.status, 204);
    assert_eq!(
        r.header("etag"),
        None,
        "the backend's tagging was forgotten"
    );
    assert_eq!(c.get(&url, &[]).await.etag(), "\"rev-3\"");
}

/// A resource the backend tags itself gets no tag from a PUT: also when its every reader
/// sends credentials (a session `Cookie`, as browsers do, or `Authorization`), whose GETs'
/// tags are never remembered. That the backend tags the URL is still learnt from them;
/// else each PUT was answered with a tag of the proxy's making that no GET gives, and its
/// writer's next write, judged by a revalidation with its credentials, got a 412 it did not
/// earn.
#[tokio::test]
async fn a_resource_the_backend_tags_itself_gets_no_tag_from_a_put_with_credentials() {
    let (doc, backend) = self_tagging_backend().await;
    for (n, who) in [
        ("cookie", "session=alice"),
        ("authorization", "Bearer alice"),
    ]
    .into_iter()
    .enumerate()
    {
        *doc.lock().unwrap() = (1, "v1".into());
        let proxy = Proxy::start(&route("/", "tag_puts = true"), &backend.origin()).await;
        let c = Client::new();
        let url = proxy.url(&format!("/doc{n}"));
        let t1 = c.get(&url, &[who]).await.etag();
        let r = c.put(&url, &[who, ("if-match", &t1)], "v2").await;
        assert_eq!(r.status, 204);
        if let Some(t2) = r.header("etag").map(str::to_owned) {
            // Nothing was written since, yet the writer's own tag does not hold.
            let next = c.put(&url, &[who, ("if-match", &t2)], "v3").await;
            panic!(
                "{}: a PUT was answered with a tag no GET gives; the next write with it: {}",
                who.0, next.status
            );
        }
        let t2 = c.get(&url, &[who]).await.etag();
        assert_eq!(t2, "\"rev-2\"");
        let r = c.put(&url, &[who, ("if-match", &t2)], "v3").await;
        assert_eq!((r.status, r.header("etag")), (204, None), "{}", who.0);
    }
}

/// A PUT that asks, by a method-override header, to be run as another method (a DELETE, a
/// PATCH) is not stored verbatim by a backend that honours the header on any method
/// (CakePHP): its body's tag is no tag of what the backend holds, and must be neither
/// answered nor remembered. Remembered, it refused the create that followed the delete
/// (`If-None-Match: *`, 412) and let an `If-Match` naming it through to a resource no
/// longer there.
#[tokio::test]
async fn a_put_run_as_another_method_by_an_override_is_not_tagged() {
    use std::sync::{Arc, Mutex};
    let doc = Arc::new(Mutex::new(Some(String::from("v1"))));
    let backend = ScriptedBackend::start({
        let doc = doc.clone();
        move |r| {
            let doc = doc.clone();
            async move {
                let method = match r.headers.get("x-http-method-override") {
                    Some(m) => m.to_str().unwrap().to_owned(),
                    None => r.method.to_string(),
                };
                let mut d = doc.lock().unwrap();
                match (method.as_str(), d.clone()) {
                    ("GET", Some(body)) => respond(200, &[], body),
                    ("PUT", old) => {
                        *d = Some(String::from_utf8(r.body.to_vec()).unwrap());
                        respond(if old.is_some() { 204 } else { 201 }, &[], "")
                    }
                    ("DELETE", Some(_)) => {
                        *d = None;
                        respond(204, &[], "")
                    }
                    _ => respond(404, &[], ""),
                }
            }
        }
    })
    .await;
    let proxy = Proxy::start(&route("/", TAGGED), &backend.origin()).await;
    let c = Client::new();
    let url = proxy.url("/doc");
    let t1 = c.get(&url, &[]).await.etag();
    let r = c
        .put(
            &url,
            &[("if-match", &t1), ("x-http-method-override", "DELETE")],
            "ignored",
        )
        .await;
    assert_eq!(r.status, 204);
    assert_eq!(*doc.lock().unwrap(), None, "the backend ran it as a DELETE");
    let create = c.put(&url, &[("if-none-match", "*")], "fresh").await;
    assert_eq!(
        create.status,
        201,
        "a create after the delete: {}",
        create.text()
    );
    assert_eq!(
        r.header("etag"),
        None,
        "tagged as if it had stored its body"
    );
    assert_eq!(create.etag(), proxy.tag_of(b"fresh"));
}
