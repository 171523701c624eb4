//! Writes: 412 before forwarding, 428, malformed headers, the `*` forms, date conditions, the
//! §13.2.2 order, revalidation with the writer's own headers, and what reaches the backend.

mod common;

use std::io::{Read, Write};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::backend::respond;
use common::proxy::route;
use common::{Backend, Client, Proxy, ScriptedBackend};

const DOC: &str = r#"{"title":"hello"}"#;

async fn setup(extra: &str) -> (Backend, Proxy) {
    let backend = Backend::start().await;
    backend.store.put("/docs/a", DOC);
    let proxy = Proxy::start(&route("/docs/", extra), &backend.origin()).await;
    (backend, proxy)
}

#[tokio::test]
async fn a_stale_if_match_gets_412_with_the_current_etag_and_the_backend_sees_no_write() {
    for validation in ["revalidate", "cached"] {
        let (backend, proxy) = setup(&format!("validation = \"{validation}\"")).await;
        let c = Client::new();
        let url = proxy.url("/docs/a");
        let tag = c.get(&url, &[]).await.etag();
        assert_eq!(c.put(&url, &[("if-match", &tag)], "v2").await.status, 204);
        let writes = backend.store.writes();
        let r = c.put(&url, &[("if-match", &tag)], "v3").await;
        r.assert_problem(412);
        assert_eq!(r.etag(), proxy.tag_of(b"v2"), "{validation}");
        assert_eq!(
            backend.store.writes(),
            writes,
            "{validation}: not forwarded"
        );
        assert_eq!(backend.store.get("/docs/a").unwrap(), "v2");
    }
}

#[tokio::test]
async fn a_fresh_if_match_write_reaches_the_backend_for_every_unsafe_method() {
    let (backend, proxy) = setup("").await;
    let c = Client::new();
    let url = proxy.url("/docs/a");
    let tag = c.get(&url, &[]).await.etag();
    let r = c.send("PATCH", &url, &[("if-match", &tag)], "+more").await;
    assert_eq!(r.status, 204);
    assert_eq!(backend.store.get("/docs/a").unwrap(), format!("{DOC}+more"));
    let tag = c.get(&url, &[]).await.etag();
    let r = c.delete(&url, &[("if-match", &tag)]).await;
    assert_eq!(r.status, 204);
    assert!(backend.store.get("/docs/a").is_none());
    assert_eq!(backend.store.writes(), 2);
}

#[tokio::test]
async fn a_weak_tag_in_if_match_never_matches() {
    let (backend, proxy) = setup("").await;
    let c = Client::new();
    let url = proxy.url("/docs/a");
    let tag = c.get(&url, &[]).await.etag();
    let r = c.put(&url, &[("if-match", &format!("W/{tag}"))], "x").await;
    let p = r.assert_problem(412);
    let detail = p["detail"].as_str().unwrap();
    assert!(
        detail.contains("compares strongly"),
        "not said to have changed: {detail}"
    );
    assert_eq!(backend.store.writes(), 0);
    // A list holding the right strong tag matches.
    let r = c
        .put(&url, &[("if-match", &format!("\"nope\", {tag}"))], "x")
        .await;
    assert_eq!(r.status, 204);
}

#[tokio::test]
async fn if_match_star_holds_only_when_the_resource_exists() {
    let (backend, proxy) = setup("").await;
    let c = Client::new();
    let r = c
        .put(&proxy.url("/docs/new"), &[("if-match", "*")], "x")
        .await;
    let p = r.assert_problem(412);
    assert!(p["detail"]
        .as_str()
        .unwrap()
        .contains("no current representation"));
    assert!(
        r.header("etag").is_none(),
        "nothing exists, so no current tag"
    );
    assert_eq!(backend.store.writes(), 0);
    let r = c
        .put(&proxy.url("/docs/a"), &[("if-match", "*")], "x")
        .await;
    assert_eq!(r.status, 204);
}

/// A document over `max_tag_body` exists but has no tag: a tag in `If-Match` cannot match
/// it (412), and the 412 says why, not that the document is gone; `*` still holds.
#[tokio::test]
async fn a_412_for_a_document_with_no_tag_says_why_and_star_holds() {
    let (backend, proxy) = setup("max_tag_body = \"4B\"").await;
    let c = Client::new();
    let url = proxy.url("/docs/a");
    let r = c.put(&url, &[("if-match", "\"some-tag\"")], "x").await;
    let p = r.assert_problem(412);
    let detail = p["detail"].as_str().unwrap();
    assert!(
        detail.contains("has no tag") && detail.contains("max_tag_body"),
        "{detail}"
    );
    // Other conditions that fail on it say what failed, not that it has no tag.
    let past = ("if-unmodified-since", "Sun, 06 Nov 1994 08:49:37 GMT");
    for (condition, says) in [
        (past, "after the date in If-Unmodified-Since"),
        (("if-none-match", "*"), "exists already"),
    ] {
        let p = c.put(&url, &[condition], "x").await.assert_problem(412);
        let detail = p["detail"].as_str().unwrap();
        assert!(detail.contains(says), "{condition:?}: {detail}");
    }
    assert_eq!(backend.store.writes(), 0);
    assert_eq!(c.put(&url, &[("if-match", "*")], "x").await.status, 204);
}

#[tokio::test]
async fn if_none_match_star_makes_a_create_only_put() {
    let (backend, proxy) = setup("").await;
    let c = Client::new();
    let url = proxy.url("/docs/fresh");
    let r = c.put(&url, &[("if-none-match", "*")], "first").await;
    assert_eq!(r.status, 201);
    let r = c.put(&url, &[("if-none-match", "*")], "second").await;
    r.assert_problem(412);
    assert_eq!(r.etag(), proxy.tag_of(b"first"));
    assert_eq!(backend.store.get("/docs/fresh").unwrap(), "first");
    assert_eq!(backend.store.writes(), 1);
}

#[tokio::test]
async fn if_none_match_with_tags_on_a_write_uses_the_weak_comparison() {
    let (backend, proxy) = setup("").await;
    let c = Client::new();
    let url = proxy.url("/docs/a");
    let tag = c.get(&url, &[]).await.etag();
    let r = c
        .put(&url, &[("if-none-match", &format!("W/{tag}"))], "x")
        .await;
    assert_eq!(r.status, 412, "a matching tag (weakly) fails If-None-Match");
    assert_eq!(backend.store.writes(), 0);
    let r = c.put(&url, &[("if-none-match", "\"other\"")], "x").await;
    assert_eq!(r.status, 204);
}

#[tokio::test]
async fn malformed_conditional_headers_get_400_and_are_not_forwarded() {
    let (backend, proxy) = setup("").await;
    let c = Client::new();
    let url = proxy.url("/docs/a");
    for (name, value) in [
        ("if-match", "abc"),
        ("if-match", "\"unterminated"),
        ("if-match", "*, \"a\""),
        ("if-none-match", "W/abc"),
        ("if-none-match", "\"a\" \"b\""),
    ] {
        let r = c.put(&url, &[(name, value)], "x").await;
        let p = r.assert_problem(400);
        assert!(p["detail"].as_str().unwrap().contains(name), "{p}");
        let r = c.get(&url, &[(name, value)]).await;
        assert_eq!(r.status, 400, "GET {name}: {value}");
    }
    assert_eq!(backend.store.writes(), 0);
    assert_eq!(backend.store.reads(), 0, "not even a revalidation GET");
}

#[tokio::test]
async fn a_route_that_requires_preconditions_answers_428_to_blind_writes() {
    let (backend, proxy) = setup("require_precondition = true").await;
    let c = Client::new();
    let url = proxy.url("/docs/a");
    // In any case: frameworks that upper-case the method (Werkzeug) run `put` as a PUT.
    for method in ["PUT", "PATCH", "DELETE", "put", "Patch", "delete"] {
        let r = c.send(method, &url, &[], "x").await;
        r.assert_problem(428);
    }
    assert_eq!(backend.store.writes(), 0);
    // Any one of the three conditions is enough.
    let tag = c.get(&url, &[]).await.etag();
    assert_eq!(c.put(&url, &[("if-match", &tag)], "x").await.status, 204);
    let r = c
        .put(
            &proxy.url("/docs/b"),
            &[("if-unmodified-since", "Fri, 01 Jan 2100 00:00:00 GMT")],
            "y",
        )
        .await;
    assert_eq!(r.status, 201);
    assert_eq!(
        c.put(&proxy.url("/docs/c"), &[("if-none-match", "*")], "z")
            .await
            .status,
        201
    );
    // POST creates new resources and is not refused.
    assert_eq!(
        c.send("POST", &proxy.url("/docs/"), &[], "new")
            .await
            .status,
        201
    );
    // Unless it asks a backend that honours method overrides to run it as a guarded method.
    let writes = backend.store.writes();
    for (name, method) in [
        ("x-http-method-override", "PUT"),
        ("x-http-method", "delete"),
        ("x-method-override", "PATCH"),
        ("x-http-method-override", "POST, PUT"),
    ] {
        let r = c.send("POST", &url, &[(name, method)], "x").await;
        let p = r.assert_problem(428);
        // Its detail says what the POST asked for, and where, not that POST needs one.
        let detail = p["detail"].as_str().unwrap();
        let to = method.rsplit(',').next().unwrap().trim();
        assert!(
            detail.starts_with(&format!("POST run as {to} by its {name} header")),
            "{detail}"
        );
    }
    // Or in a `_method` query parameter or form field (Laravel, Rails' forms).
    let r = c
        .send("POST", &format!("{url}?_method=DELETE"), &[], "x")
        .await;
    let p = r.assert_problem(428);
    let detail = p["detail"].as_str().unwrap();
    assert!(
        detail.starts_with("POST run as DELETE by its _method query parameter"),
        "{detail}"
    );
    let form = [("content-type", "application/x-www-form-urlencoded")];
    let r = c.send("POST", &url, &form, "title=x&_method=patch").await;
    let p = r.assert_problem(428);
    let detail = p["detail"].as_str().unwrap();
    assert!(
        detail.starts_with("POST run as patch by its form's _method field"),
        "{detail}"
    );
    let spelled = [(
        "content-type",
        "Application/X-WWW-Form-URLEncoded; charset=utf-8",
    )];
    let r = c.send("POST", &url, &spelled, "_method=PUT").await;
    r.assert_problem(428);
    // The frameworks that honour overrides upper-case the method first, take the last of
    // several `_method`s (PHP, Rack), and read a POST with no `Content-Type` as a form
    // (Rack): each of these would run as a guarded method.
    for (method, target, headers, body) in [
        (
            "post",
            url.clone(),
            vec![("x-http-method-override", "PUT")],
            "x",
        ),
        ("Post", format!("{url}?_method=PUT"), vec![], "x"),
        ("post", url.clone(), form.to_vec(), "_method=PUT"),
        (
            "POST",
            format!("{url}?_method=POST&_method=PUT"),
            vec![],
            "x",
        ),
        (
            "POST",
            url.clone(),
            form.to_vec(),
            "_method=POST&_method=DELETE",
        ),
        ("POST", url.clone(), vec![], "_method=PUT"),
    ] {
        let r = c.send(method, &target, &headers, body).await;
        assert_eq!(r.status, 428, "{method} {target} {headers:?} {body}");
    }
    assert_eq!(backend.store.writes(), writes, "none was forwarded");
    let r = c
        .send(
            "POST",
            &proxy.url("/docs/"),
            &[("x-http-method-override", "POST")],
            "new",
        )
        .await;
    assert_eq!(r.status, 201);
    let r = c.send("POST", &proxy.url("/docs/"), &form, "title=x").await;
    assert_eq!(r.status, 201);
}

#[tokio::test]
async fn if_unmodified_since_is_evaluated_unless_if_match_is_present() {
    let (backend, proxy) = setup("").await;
    let c = Client::new();
    let url = proxy.url("/docs/a");
    let past = "Sun, 06 Nov 1994 08:49:37 GMT";
    let r = c.put(&url, &[("if-unmodified-since", past)], "x").await;
    r.assert_problem(412);
    assert_eq!(backend.store.writes(), 0);
    // The grammar takes any day name with any date (§5.6.7), as nginx reads it: a date
    // under the wrong one is still that date, not an invalid one to ignore.
    for past in [
        "Mon, 06 Nov 1994 08:49:37 GMT",
        "Monday, 06-Nov-94 08:49:37 GMT",
        "Mon Nov  6 08:49:37 1994",
    ] {
        let r = c.put(&url, &[("if-unmodified-since", past)], "x").await;
        r.assert_problem(412);
    }
    assert_eq!(backend.store.writes(), 0);
    // An If-Match takes precedence (§13.2.2 step 1): the date is ignored.
    let tag = c.get(&url, &[]).await.etag();
    let r = c
        .put(
            &url,
            &[("if-match", &tag), ("if-unmodified-since", past)],
            "x",
        )
        .await;
    assert_eq!(r.status, 204);
    // A future date holds; an invalid date is ignored (§13.1.4).
    let future = "Fri, 01 Jan 2100 00:00:00 GMT";
    assert_eq!(
        c.put(&url, &[("if-unmodified-since", future)], "y")
            .await
            .status,
        204
    );
    assert_eq!(
        c.put(&url, &[("if-unmodified-since", "someday")], "z")
            .await
            .status,
        204
    );
}

/// An HTTP-date's year is any four digits (RFC 9110 §5.6.7): one before 1970 is a valid date,
/// earlier than any modification, so the write fails. Ignored as invalid, it went through.
#[tokio::test]
async fn an_if_unmodified_since_before_1970_is_a_date_and_fails() {
    let (backend, proxy) = setup("").await;
    let c = Client::new();
    let url = proxy.url("/docs/a");
    for past in [
        "Wed, 31 Dec 1969 23:59:59 GMT",
        "Sat, 01 Jan 1966 00:00:00 GMT",
        "Sat Jan  1 00:00:00 1966",
        "Mon, 01 Jan 0001 00:00:00 GMT",
    ] {
        let r = c.put(&url, &[("if-unmodified-since", past)], "x").await;
        assert_eq!(r.status, 412, "{past}");
    }
    assert_eq!(backend.store.writes(), 0, "none forwarded");
    // Not a date at all (no 30 February, 1900 no leap year): still ignored.
    for invalid in [
        "Mon, 30 Feb 1920 00:00:00 GMT",
        "Thu, 29 Feb 1900 00:00:00 GMT",
    ] {
        let r = c.put(&url, &[("if-unmodified-since", invalid)], "y").await;
        assert_eq!(r.status, 204, "{invalid}");
    }
}

#[tokio::test]
async fn evaluated_tag_conditions_are_not_forwarded_and_dates_follow_precedence() {
    let backend = ScriptedBackend::start(|r| async move {
        match r.method.as_str() {
            "GET" => respond(200, &[], "current"),
            _ => respond(204, &[], ""),
        }
    })
    .await;
    let proxy = Proxy::start(&route("/", ""), &backend.origin()).await;
    let c = Client::new();
    let tag = proxy.tag_of(b"current");
    let date = "Fri, 01 Jan 2100 00:00:00 GMT";

    let r = c
        .put(
            &proxy.url("/a"),
            &[("if-match", &tag), ("if-unmodified-since", date)],
            "x",
        )
        .await;
    assert_eq!(r.status, 204);
    let seen = backend.last();
    assert_eq!(seen.method, "PUT");
    assert!(seen.headers.get("if-match").is_none());
    assert!(
        seen.headers.get("if-unmodified-since").is_none(),
        "If-Match took precedence"
    );

    let r = c
        .put(
            &proxy.url("/a"),
            &[
                ("if-none-match", "\"other\""),
                ("if-unmodified-since", date),
            ],
            "x",
        )
        .await;
    assert_eq!(r.status, 204);
    let seen = backend.last();
    assert!(seen.headers.get("if-none-match").is_none());
    assert_eq!(
        seen.headers["if-unmodified-since"], date,
        "no If-Match: the date is left for the backend to judge too"
    );

    let r = c
        .get(&proxy.url("/a"), &[("if-none-match", "\"other\"")])
        .await;
    assert_eq!(r.status, 200);
    assert!(backend.last().headers.get("if-none-match").is_none());
}

#[tokio::test]
async fn a_change_behind_the_proxys_back_makes_an_old_tag_fail_under_revalidate() {
    let (backend, proxy) = setup("validation = \"revalidate\"").await;
    let c = Client::new();
    let url = proxy.url("/docs/a");
    let tag = c.get(&url, &[]).await.etag();
    backend
        .store
        .put("/docs/a", "changed directly at the backend");
    let r = c.put(&url, &[("if-match", &tag)], "mine").await;
    assert_eq!(r.status, 412);
    assert_eq!(r.etag(), proxy.tag_of(b"changed directly at the backend"));
    assert_eq!(backend.store.writes(), 0);
}

#[tokio::test]
async fn cached_validation_trusts_the_remembered_tag_and_revalidates_on_a_miss() {
    let (backend, proxy) = setup("validation = \"cached\"").await;
    let c = Client::new();
    let url = proxy.url("/docs/a");
    let tag = c.get(&url, &[]).await.etag();
    let reads = backend.store.reads();
    // A hit: no revalidation GET reaches the backend.
    assert_eq!(c.put(&url, &[("if-match", &tag)], "v2").await.status, 204);
    assert_eq!(backend.store.reads(), reads);
    // A miss (never read through the proxy): the proxy fetches the current state.
    backend.store.put("/docs/b", "b");
    let b_tag = proxy.tag_of(b"b");
    let r = c
        .put(&proxy.url("/docs/b"), &[("if-match", &b_tag)], "b2")
        .await;
    assert_eq!(r.status, 204);
    assert_eq!(backend.store.reads(), reads + 1);
}

#[tokio::test]
async fn the_remembered_tag_is_dropped_after_a_write_and_kept_after_a_409() {
    let (backend, proxy) = setup("validation = \"cached\"").await;
    backend.store.put("/docs/old", "archived doc");
    backend.store.archive("/docs/old");
    let c = Client::new();
    let key = |p: &str| common::proxy::key(&backend.origin(), p);
    let old_tag = c.get(&proxy.url("/docs/old"), &[]).await.etag();
    let r = c
        .put(&proxy.url("/docs/old"), &[("if-match", &old_tag)], "x")
        .await;
    assert_eq!(r.status, 409);
    assert!(
        proxy.state.tags.get(&key("/docs/old")).is_some(),
        "a 4xx changes nothing"
    );

    let tag = c.get(&proxy.url("/docs/a"), &[]).await.etag();
    assert!(proxy.state.tags.get(&key("/docs/a")).is_some());
    assert_eq!(
        c.put(&proxy.url("/docs/a"), &[("if-match", &tag)], "v2")
            .await
            .status,
        204
    );
    assert!(
        proxy.state.tags.get(&key("/docs/a")).is_none(),
        "a 2xx drops it"
    );
}

/// A backend that honours `X-HTTP-Method-Override` on any method, as CakePHP and several
/// PSR-7 request factories do, over one document (`None` once deleted).
async fn overriding_backend() -> (Arc<Mutex<Option<&'static str>>>, ScriptedBackend) {
    let store = Arc::new(Mutex::new(Some("v1")));
    let doc = store.clone();
    let backend = ScriptedBackend::start(move |r| {
        let doc = doc.clone();
        async move {
            let method = match r.headers.get("x-http-method-override") {
                Some(m) => m.to_str().unwrap().to_owned(),
                None => r.method.to_string(),
            };
            let mut doc = doc.lock().unwrap();
            match (method.as_str(), *doc) {
                ("GET", Some(body)) => respond(200, &[], body),
                ("DELETE", Some(_)) => {
                    *doc = None;
                    respond(204, &[], "")
                }
                _ => respond(404, &[], ""),
            }
        }
    })
    .await;
    (store, backend)
}

/// [`overriding_backend`] behind a route that requires a precondition, and the URL of its
/// document through the proxy.
async fn behind_an_overriding_backend() -> (
    Arc<Mutex<Option<&'static str>>>,
    ScriptedBackend,
    Proxy,
    String,
) {
    let (store, backend) = overriding_backend().await;
    let proxy = Proxy::start(
        &route("/", "require_precondition = true"),
        &backend.origin(),
    )
    .await;
    let url = proxy.url("/doc");
    (store, backend, proxy, url)
}

/// A POST that asks, by a method-override header, to run as DELETE is revalidated with a GET
/// of its own head: that GET must not carry the override, or a backend that honours one on
/// any method runs the proxy's GET as the DELETE itself, a write no precondition guarded:
/// the document was gone before its stale `If-Match` got 412.
#[tokio::test]
async fn a_revalidation_get_does_not_carry_the_writers_method_override() {
    let (store, backend, _proxy, url) = behind_an_overriding_backend().await;
    let c = Client::new();
    let r = c
        .send(
            "POST",
            &url,
            &[
                ("x-http-method-override", "DELETE"),
                ("if-match", "\"stale\""),
            ],
            "",
        )
        .await;
    r.assert_problem(412);
    let reval = backend.last();
    assert_eq!(reval.method, "GET");
    assert_eq!(
        *store.lock().unwrap(),
        Some("v1"),
        "the revalidation GET ran as a DELETE: {:?}",
        reval.headers
    );
    assert_eq!(c.get(&url, &[]).await.status, 200);
}

/// A request forwarded unguarded, a read (GET, HEAD) or a method that changes nothing
/// (OPTIONS, PROPFIND: no lock, no precondition, no invalidation), that names a guarded
/// method in a method-override header goes up without the override: a backend that honours
/// one on any method (CakePHP) would run it as the DELETE it names, past
/// `require_precondition`'s 428 and the URL's lock (and a read's answer, the DELETE's, would
/// be tagged as the document).
#[tokio::test]
async fn a_request_forwarded_unguarded_does_not_carry_a_method_override_upstream() {
    let (store, backend, _proxy, url) = behind_an_overriding_backend().await;
    let c = Client::new();
    // The backend's own answers to each method.
    for (method, status) in [
        ("GET", 200),
        ("HEAD", 200),
        ("OPTIONS", 404),
        ("PROPFIND", 404),
    ] {
        let r = c
            .send(method, &url, &[("x-http-method-override", "DELETE")], "")
            .await;
        assert_eq!(r.status, status, "{method}");
        assert_eq!(
            *store.lock().unwrap(),
            Some("v1"),
            "the {method} ran as a DELETE: {:?}",
            backend.last().headers
        );
    }
}

/// Documents by path, as Laravel (Symfony's `getMethod`) and Express's `method-override`
/// serve them: a POST runs as the method its `_method` query parameter names, on the
/// resource its path names (every other query parameter ignored). One document at `/doc`,
/// whose writes take `delay`.
async fn query_overriding_backend(delay: Duration) -> (Docs, ScriptedBackend) {
    doc_store(&[("/doc", "v1")], delay, |r| {
        let query = r.uri.query().unwrap_or_default();
        let over = query.split('&').find_map(|p| p.strip_prefix("_method="));
        let method = match (r.method.as_str(), over) {
            ("POST", Some(m)) => m.to_ascii_uppercase(),
            (m, _) => m.to_owned(),
        };
        (method, r.uri.path().to_owned())
    })
    .await
}

/// Documents by path, shared with a test.
type Docs = Arc<Mutex<std::collections::HashMap<String, String>>>;

/// A store of the documents `seed`, that reads each request as `read` says: the method it
/// runs as and the path it names. GET, PUT (taking `delay`), DELETE, and COPY and MOVE to
/// the path of their `Destination`; anything else is a 405.
async fn doc_store(
    seed: &[(&str, &str)],
    delay: Duration,
    read: impl Fn(&common::Recorded) -> (String, String) + Send + Sync + 'static,
) -> (Docs, ScriptedBackend) {
    let docs = seed.iter().map(|&(p, d)| (p.to_owned(), d.to_owned()));
    let docs: Docs = Arc::new(Mutex::new(docs.collect()));
    let (d, read) = (docs.clone(), Arc::new(read));
    let backend = ScriptedBackend::start(move |r| {
        let (d, (method, path)) = (d.clone(), read(&r));
        async move {
            if method == "PUT" {
                tokio::time::sleep(delay).await;
            }
            let mut docs = d.lock().unwrap();
            let to = || {
                let v = r.headers["destination"].to_str().unwrap();
                v.parse::<http::Uri>().unwrap().path().to_owned()
            };
            match method.as_str() {
                "GET" => match docs.get(&path) {
                    Some(doc) => respond(200, &[], doc.clone()),
                    None => respond(404, &[], ""),
                },
                "PUT" => {
                    docs.insert(path, String::from_utf8_lossy(&r.body).into_owned());
                    respond(204, &[], "")
                }
                "DELETE" => {
                    docs.remove(&path);
                    respond(204, &[], "")
                }
                "MOVE" => {
                    let doc = docs.remove(&path).unwrap_or_default();
                    docs.insert(to(), doc);
                    respond(204, &[], "")
                }
                "COPY" => {
                    let doc = docs.get(&path).cloned().unwrap_or_default();
                    docs.insert(to(), doc);
                    respond(204, &[], "")
                }
                _ => respond(405, &[], ""),
            }
        }
    })
    .await;
    (docs, backend)
}

/// `POST /doc?_method=PUT` is a PUT of `/doc` to a backend that honours the parameter: the
/// proxy reads it so (428), and must key it so. Keyed as `/doc?_method=PUT`, it took another
/// lock than a `PUT /doc` (two writers holding one tag both won) and forgot another URL's
/// tag (under `cached`, `/doc`'s old tag passed a PUT after the override write).
#[tokio::test]
async fn a_write_run_as_put_by_its_method_query_parameter_is_keyed_as_its_path() {
    // Under `cached`: the override write must forget `/doc`'s remembered tag.
    let (store, backend) = query_overriding_backend(Duration::ZERO).await;
    let proxy = Proxy::start(&route("/", "validation = \"cached\""), &backend.origin()).await;
    let (c, url) = (Client::new(), proxy.url("/doc"));
    let tag = c.get(&url, &[]).await.etag();
    let over = format!("{url}?_method=PUT");
    let r = c.send("POST", &over, &[("if-match", &tag)], "v2").await;
    assert_eq!(r.status, 204);
    let r = c.put(&url, &[("if-match", &tag)], "v3").await;
    assert_eq!(
        (r.status, store.lock().unwrap().get("/doc").cloned()),
        (412, Some("v2".to_owned())),
        "a tag read before the override write passed after it"
    );

    // Under `revalidate`: the two spellings of one write wait for each other.
    let (store, backend) = query_overriding_backend(Duration::from_millis(300)).await;
    let proxy = Proxy::start(&route("/", ""), &backend.origin()).await;
    let url = proxy.url("/doc");
    let tag = c.get(&url, &[]).await.etag();
    let over = format!("{url}?_method=put");
    let guard = [("if-match", tag.as_str())];
    let (a, b) = tokio::join!(
        c.put(&url, &guard, "by PUT"),
        c.send("POST", &over, &guard, "by POST"),
    );
    let mut statuses = [a.status, b.status];
    statuses.sort_unstable();
    assert_eq!(
        statuses,
        [204, 412],
        "two writers holding one tag both won; the document is {:?}",
        store.lock().unwrap()
    );
}

/// A method that changes state but needs no precondition itself (WebDAV's PROPPATCH, MKCOL,
/// LOCK, an extension method) that names a guarded one in a method-override header is one
/// a backend that honours overrides on any method (CakePHP) runs as the DELETE: 428 where a
/// precondition is required, as for a POST, not forwarded.
#[tokio::test]
async fn a_write_of_another_method_that_overrides_to_a_guarded_one_needs_a_precondition() {
    let (store, _backend, _proxy, url) = behind_an_overriding_backend().await;
    let c = Client::new();
    for method in ["PROPPATCH", "MKCOL", "LOCK", "PURGE"] {
        let r = c
            .send(method, &url, &[("x-http-method-override", "DELETE")], "")
            .await;
        assert_eq!(
            (r.status, *store.lock().unwrap()),
            (428, Some("v1")),
            "{method} with X-HTTP-Method-Override: DELETE"
        );
    }
    // Without an override it is forwarded as itself.
    assert_eq!(c.send("MKCOL", &url, &[], "").await.status, 404);
}

#[tokio::test]
async fn revalidation_uses_the_writers_credentials_and_a_refusal_reaches_the_writer() {
    // A backend that only lets Alice read, and that varies the document by Accept-Language.
    let backend = ScriptedBackend::start(|r| async move {
        let authorized = r
            .headers
            .get("authorization")
            .is_some_and(|v| v == "Bearer alice");
        match (r.method.as_str(), authorized) {
            (_, false) => respond(401, &[("www-authenticate", "Bearer")], "who are you?"),
            ("GET", true) => {
                let lang = r
                    .headers
                    .get("accept-language")
                    .map(|v| v.to_str().unwrap().to_owned());
                respond(200, &[], format!("doc in {}", lang.unwrap_or_default()))
            }
            _ => respond(204, &[], ""),
        }
    })
    .await;
    let proxy = Proxy::start(&route("/", ""), &backend.origin()).await;
    let c = Client::new();
    let url = proxy.url("/doc");
    let alice = [("authorization", "Bearer alice"), ("accept-language", "fr")];
    let tag = c.get(&url, &alice).await.etag();

    let r = c
        .put(
            &url,
            &[
                ("authorization", "Bearer alice"),
                ("accept-language", "fr"),
                ("if-match", &tag),
                ("content-type", "text/plain"),
            ],
            "x",
        )
        .await;
    assert_eq!(r.status, 204);
    let reval = &backend.requests()[1];
    assert_eq!(reval.method, "GET");
    assert_eq!(reval.headers["authorization"], "Bearer alice");
    assert_eq!(reval.headers["accept-language"], "fr");
    assert!(reval.headers.get("if-match").is_none());
    assert!(reval.headers.get("content-type").is_none());
    assert!(reval.body.is_empty());

    let before = backend.requests().len();
    let r = c.put(&url, &[("if-match", &tag)], "x").await;
    assert_eq!(
        r.status, 401,
        "the revalidation GET's refusal is the answer"
    );
    assert_eq!(r.text(), "who are you?");
    assert!(r.header("etag").is_none(), "and it reveals no tag");
    let after = backend.requests();
    assert_eq!(
        after.len(),
        before + 1,
        "only the GET, the PUT was not forwarded"
    );
    assert_eq!(after[before].method, "GET");
}

/// Raw socket: a client that sends only the head of an `Expect: 100-continue` write.
#[tokio::test]
async fn a_failing_write_with_expect_100_continue_is_answered_412_without_reading_the_body() {
    let (backend, proxy) = setup("").await;
    let addr = proxy.addr;
    let head = tokio::task::spawn_blocking(move || {
        let mut s = std::net::TcpStream::connect(addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        s.write_all(
            b"PUT /docs/a HTTP/1.1\r\nHost: x\r\nIf-Match: \"stale\"\r\nExpect: 100-continue\r\nContent-Length: 1000000\r\n\r\n",
        )
        .unwrap();
        let mut buf = [0u8; 4096];
        let n = s.read(&mut buf).unwrap();
        String::from_utf8_lossy(&buf[..n]).into_owned()
    })
    .await
    .unwrap();
    assert!(
        head.starts_with("HTTP/1.1 412"),
        "no 100 Continue first: {head}"
    );
    assert!(
        head.to_ascii_lowercase().contains("connection: close"),
        "the body will never be read: the client is told the connection ends: {head}"
    );
    assert_eq!(backend.store.writes(), 0);
}

/// Sends `first` (a head, then after a pause its body, as a slow client would), reads the
/// answer, then sends a GET on the same connection. Returns both answers' heads; the second
/// is empty if the proxy closed the connection.
fn two_on_one_connection(addr: std::net::SocketAddr, head: &str, body: &[u8]) -> (String, String) {
    let pieces = [(Duration::from_millis(50), body)];
    two_on_one_connection_in_pieces(addr, head, &pieces, false)
}

/// As [`two_on_one_connection`], the body sent in `pieces`, each after its pause; with
/// `answered_first`, only once the first answer has been read.
fn two_on_one_connection_in_pieces(
    addr: std::net::SocketAddr,
    head: &str,
    pieces: &[(Duration, &[u8])],
    answered_first: bool,
) -> (String, String) {
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    s.write_all(head.as_bytes()).unwrap();
    let send = |s: &mut std::net::TcpStream| {
        for (pause, piece) in pieces {
            std::thread::sleep(*pause);
            let _ = s.write_all(piece);
        }
    };
    if !answered_first {
        send(&mut s);
    }
    let read_head = |s: &mut std::net::TcpStream| {
        let mut got = Vec::new();
        let mut buf = [0u8; 4096];
        while !got.windows(4).any(|w| w == b"\r\n\r\n") {
            match s.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => got.extend_from_slice(&buf[..n]),
            }
        }
        String::from_utf8_lossy(&got).into_owned()
    };
    let first = read_head(&mut s);
    let len: usize = first
        .lines()
        .find_map(|l| {
            l.to_ascii_lowercase()
                .strip_prefix("content-length:")
                .map(|v| v.trim().parse().unwrap())
        })
        .unwrap_or(0);
    let body_start = first.find("\r\n\r\n").map_or(first.len(), |i| i + 4);
    let mut rest = len.saturating_sub(first.len() - body_start);
    let mut buf = [0u8; 4096];
    while rest > 0 {
        match s.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => rest = rest.saturating_sub(n),
        }
    }
    if answered_first {
        send(&mut s);
    }
    let second = match s.write_all(b"GET /docs/a HTTP/1.1\r\nHost: x\r\n\r\n") {
        Ok(()) => read_head(&mut s),
        Err(_) => String::new(),
    };
    (first, second)
}

/// A refused write whose body arrives after its head: the proxy reads and drops the body
/// after answering, so the client's next request on that connection is served (a keep-alive
/// client would otherwise race the proxy closing it); a body too large to drop is answered
/// with `Connection: close`.
#[tokio::test]
async fn a_refused_write_keeps_the_connection_usable_or_says_it_closes() {
    let (backend, proxy) = setup("").await;
    let addr = proxy.addr;
    // A stale-tag PUT declaring `declared` bytes, of which 1 KiB comes after a pause.
    let refused_put = |declared: usize| {
        tokio::task::spawn_blocking(move || {
            let head = format!(
                "PUT /docs/a HTTP/1.1\r\nHost: x\r\nIf-Match: \"stale\"\r\n\
                 Content-Length: {declared}\r\n\r\n"
            );
            two_on_one_connection(addr, &head, &[b'x'; 1024])
        })
    };
    let (first, second) = refused_put(1024).await.unwrap();
    assert!(first.starts_with("HTTP/1.1 412"), "{first}");
    assert!(
        !first.to_ascii_lowercase().contains("connection: close"),
        "{first}"
    );
    assert!(
        second.starts_with("HTTP/1.1 200"),
        "the next request was served: {second:?}"
    );

    let (first, _) = refused_put(10_000_000).await.unwrap();
    assert!(first.starts_with("HTTP/1.1 412"), "{first}");
    assert!(
        first.to_ascii_lowercase().contains("connection: close"),
        "{first}"
    );
    assert_eq!(backend.store.writes(), 0);
}

/// A refused write's body that comes slowly but steadily, for longer than one pause may
/// last, is still read and dropped whole (5 s at most between chunks, 30 s in all, as
/// nginx's `lingering_timeout` and `lingering_time`), and the connection's next request is
/// served. With 5 s for the whole body, a client on a slow link found its kept-alive
/// connection closed without a word.
#[tokio::test]
async fn a_refused_writes_body_that_trickles_in_is_dropped_whole_and_the_connection_kept() {
    let (backend, proxy) = setup("require_precondition = true").await;
    let addr = proxy.addr;
    let (first, second) = tokio::task::spawn_blocking(move || {
        let piece = [b'x'; 1000];
        let pieces: Vec<(Duration, &[u8])> = (0..14)
            .map(|_| (Duration::from_millis(500), &piece[..]))
            .collect();
        let head = "PUT /docs/a HTTP/1.1\r\nHost: x\r\nContent-Length: 14000\r\n\r\n";
        two_on_one_connection_in_pieces(addr, head, &pieces, true)
    })
    .await
    .unwrap();
    assert!(first.starts_with("HTTP/1.1 428"), "{first}");
    assert!(
        !first.to_ascii_lowercase().contains("connection: close"),
        "{first}"
    );
    assert!(
        second.starts_with("HTTP/1.1 200"),
        "the next request was served after 7 s of body: {second:?}"
    );
    assert_eq!(backend.store.writes(), 0);
}

#[tokio::test]
async fn writes_to_a_missing_resource_with_if_match_fail_but_without_conditions_pass() {
    let (backend, proxy) = setup("").await;
    let c = Client::new();
    let r = c
        .delete(&proxy.url("/docs/ghost"), &[("if-match", "\"x\"")])
        .await;
    assert_eq!(r.status, 412);
    let r = c.delete(&proxy.url("/docs/ghost"), &[]).await;
    assert_eq!(r.status, 404, "the backend's own answer");
    assert_eq!(backend.store.writes(), 1);
}

/// A backend that compresses for clients that accept it, as many do: two representations of
/// one state, each with its own tag.
async fn compressing_backend() -> ScriptedBackend {
    ScriptedBackend::start(|r| async move {
        let gzip = r
            .headers
            .get("accept-encoding")
            .is_some_and(|v| v.to_str().unwrap().contains("gzip"));
        match (r.method.as_str(), r.uri.path(), gzip) {
            ("GET", "/plain", _) => respond(200, &[], "one representation"),
            ("GET", _, true) => respond(
                200,
                &[("content-encoding", "gzip"), ("vary", "Accept-Encoding")],
                "pretend-gzip of the text",
            ),
            ("GET", _, false) => respond(200, &[("vary", "Accept-Encoding")], "the text"),
            _ => respond(204, &[], ""),
        }
    })
    .await
}

#[tokio::test]
async fn under_cached_a_tag_of_another_content_coding_of_the_current_state_is_not_a_conflict() {
    let backend = compressing_backend().await;
    let proxy = Proxy::start(&route("/", "validation = \"cached\""), &backend.origin()).await;
    let c = Client::new();
    let url = proxy.url("/doc");
    let gz = [("accept-encoding", "gzip")];
    let gzip_tag = c.get(&url, &gz).await.etag();
    let plain_tag = c.get(&url, &[]).await.etag();
    assert_ne!(gzip_tag, plain_tag, "two representations, two tags");
    let gets = |b: &ScriptedBackend| b.requests().iter().filter(|r| r.method == "GET").count();

    // The identity tag is remembered last; the gzip reader raced nobody. Its own
    // representation, fetched with its own head, decides.
    let w = c.put(&url, &[("if-match", &gzip_tag), gz[0]], "edit").await;
    assert_eq!(w.status, 204, "{}", w.text());
    // The write is done: both tags are stale now, whichever representation.
    let late = c.put(&url, &[("if-match", &plain_tag)], "edit").await;
    assert_eq!(
        late.status, 204,
        "the backend serves the same bytes: still current"
    );
    let before = gets(&backend);
    let stale = c.put(&url, &[("if-match", "\"old\""), gz[0]], "edit").await;
    assert_eq!(stale.status, 412);
    assert_eq!(
        stale.etag(),
        gzip_tag,
        "the 412 names the writer's representation's tag"
    );
    assert_eq!(gets(&backend), before + 1, "confirmed by one revalidation");
    let puts = backend
        .requests()
        .iter()
        .filter(|r| r.method == "PUT")
        .count();
    assert_eq!(puts, 2, "the stale write never reached the backend");

    // If-None-Match naming the identity writer's own current tag, while the gzip tag is
    // remembered: it differs from the remembered one, yet names the current state.
    let plain_tag = c.get(&url, &[]).await.etag();
    let _ = c.get(&url, &gz).await;
    let puts_before = backend
        .requests()
        .iter()
        .filter(|r| r.method == "PUT")
        .count();
    let w = c.put(&url, &[("if-none-match", &plain_tag)], "edit").await;
    assert_eq!(
        (w.status, w.etag()),
        (412, plain_tag.clone()),
        "{}",
        w.text()
    );
    let w = c.put(&url, &[("if-none-match", "\"other\"")], "edit").await;
    assert_eq!(
        w.status, 204,
        "a tag of no representation: the write goes ahead"
    );
    let puts = backend
        .requests()
        .iter()
        .filter(|r| r.method == "PUT")
        .count();
    assert_eq!(puts, puts_before + 1);

    // One representation only: the remembered tag decides, with no GET.
    let plain = proxy.url("/plain");
    let tag = c.get(&plain, &[]).await.etag();
    let before = gets(&backend);
    let stale = c.put(&plain, &[("if-match", "\"old\"")], "edit").await;
    assert_eq!((stale.status, stale.etag()), (412, tag));
    assert_eq!(gets(&backend), before, "no revalidation");
}

/// A COPY or MOVE changes its `Destination` too: one the proxy cannot read would go to the
/// backend with that resource neither locked nor its tag forgotten, so it is refused. So is
/// one with a query or a fragment, which backends read in ways the proxy cannot know: nginx
/// writes `http://h?/b` to `/b`, `/b?x` to `/b`, and `/b#x` to a file named `b#x`, where the
/// proxy would key `/?/b`, `/b?x` and `/b`, and another client's stale write to `/b` would
/// pass its `If-Match`.
#[tokio::test]
async fn a_copy_or_move_whose_destination_cannot_be_read_is_refused_with_a_400() {
    let backend = ScriptedBackend::start(|_| async { respond(201, &[], "") }).await;
    let proxy = Proxy::start(&route("/", ""), &backend.origin()).await;
    let c = Client::new();
    let unreadable = [
        "/b c".to_owned(),
        format!("{}?/b", proxy.url("")),
        format!("{}#/b", proxy.url("")),
        proxy.url("/b?x"),
        proxy.url("/b#x"),
        "/b?x".to_owned(),
        "/b#x".to_owned(),
    ];
    for method in ["COPY", "MOVE"] {
        for to in &unreadable {
            let r = c
                .send(method, &proxy.url("/a"), &[("destination", to)], "")
                .await;
            let p = r.assert_problem(400);
            let detail = p["detail"].as_str().unwrap().to_lowercase();
            assert!(detail.contains("destination"), "{method} to {to}: {detail}");
        }
    }
    assert!(backend.requests().is_empty(), "neither reached the backend");
    // A readable one goes ahead, and so does one the backend must judge (none at all).
    let to = proxy.url("/b");
    assert_eq!(
        c.send("MOVE", &proxy.url("/a"), &[("destination", &to)], "")
            .await
            .status,
        201
    );
    assert_eq!(c.send("COPY", &proxy.url("/a"), &[], "").await.status, 201);
    assert!(proxy.state.locks.is_empty());
}

/// A `Destination` is an absolute URI or an absolute path (RFC 4918 §10.3). A relative one
/// (`b`) was read as a URI with the authority `b` and no path, locked and forgotten as the
/// root `/`, and forwarded: a backend that resolves it against the request's URL (as
/// `new URL(destination, url)` does in Node) moves `/dir/a` onto `/dir/b`, whose tag then
/// stays remembered, and another client's stale write to `/dir/b` passes its `If-Match`.
#[tokio::test]
async fn a_copy_or_move_to_a_relative_destination_is_refused_not_keyed_as_the_root() {
    let backend = ScriptedBackend::start(|r| async move {
        match r.method.as_str() {
            "GET" => respond(200, &[], format!("at {}", r.uri.path())),
            _ => respond(204, &[], ""),
        }
    })
    .await;
    let proxy = Proxy::start(&route("/", "validation = \"cached\""), &backend.origin()).await;
    let c = Client::new();
    for method in ["COPY", "MOVE"] {
        for to in ["b", "*"] {
            let before = backend.requests().len();
            let r = c
                .send(method, &proxy.url("/dir/a"), &[("destination", to)], "")
                .await;
            assert_eq!(r.status, 400, "{method} to {to:?} went up: {}", r.status);
            let p = r.assert_problem(400);
            let detail = p["detail"].as_str().unwrap().to_lowercase();
            assert!(detail.contains("destination"), "{method} to {to}: {detail}");
            assert_eq!(backend.requests().len(), before, "{method} to {to:?}");
        }
    }
    assert!(proxy.state.locks.is_empty());
}

/// Documents `/a` ("A") and `/b` ("B") in a WebDAV-ish store that runs each request as the
/// method `run_as` reads from it (`doc_store`'s methods; COPY and MOVE to its `Destination`).
async fn copy_and_move_store(run_as: fn(&common::Recorded) -> String) -> (Docs, ScriptedBackend) {
    let seed = [("/a", "A"), ("/b", "B")];
    doc_store(&seed, Duration::ZERO, move |r| {
        (run_as(r), r.uri.path().to_owned())
    })
    .await
}

/// Methods are case-sensitive, but many frameworks upper-case them (as `requires_precondition`
/// and the TRACE refusal allow for): a `move` runs as a MOVE there, and changes its
/// `Destination` as much. It once went up with that resource neither locked nor its tag
/// forgotten, whatever its `Destination` said: on a `cached` route a stale write to the
/// destination then passed its `If-Match` and undid the move (a 204, not a 412), and an
/// unreadable `Destination` reached the backend (201, not a 400).
#[tokio::test]
async fn a_copy_or_move_in_any_case_locks_and_forgets_its_destination() {
    // A WebDAV-ish store that upper-cases the method, as Werkzeug does.
    let (docs, backend) = copy_and_move_store(|r| r.method.as_str().to_ascii_uppercase()).await;
    let proxy = Proxy::start(&route("/", "validation = \"cached\""), &backend.origin()).await;
    let c = Client::new();
    for method in ["copy", "Move"] {
        let b = proxy.url("/b");
        let tag_b = c.get(&b, &[]).await.etag();
        let r = c
            .send(method, &proxy.url("/a"), &[("destination", &b)], "")
            .await;
        assert_eq!(r.status, 204, "{method}");
        // /b is now what /a was: a writer holding /b's old tag must not overwrite it.
        let stale = c.put(&b, &[("if-match", &tag_b)], "stale edit").await;
        assert_eq!(
            stale.status, 412,
            "{method}: a stale write to its destination"
        );
        assert_eq!(docs.lock().unwrap()["/b"], "A", "{method}");
        docs.lock().unwrap().insert("/a".into(), "A".into());
        docs.lock().unwrap().insert("/b".into(), "B".into());
        // An unreadable Destination is refused as COPY's and MOVE's are.
        let before = backend.requests().len();
        let r = c
            .send(method, &proxy.url("/a"), &[("destination", "/b?x")], "")
            .await;
        let p = r.assert_problem(400);
        assert!(
            p["detail"]
                .as_str()
                .unwrap()
                .to_lowercase()
                .contains("destination"),
            "{method}: {p}"
        );
        assert_eq!(backend.requests().len(), before, "{method} went up");
    }
    assert!(proxy.state.locks.is_empty());
}

/// A POST that asks, by a method-override header, to run as COPY or MOVE changes its
/// `Destination` as a COPY or MOVE does, behind a backend that honours the header (CakePHP
/// on any method, Express's `method-override` on a POST). It went up with the destination
/// neither locked nor its tag forgotten: on a `cached` route a stale write to the
/// destination then passed its `If-Match` and undid the move.
#[tokio::test]
async fn a_post_run_as_copy_or_move_by_an_override_locks_and_forgets_its_destination() {
    let (docs, backend) = copy_and_move_store(|r| match r.headers.get("x-http-method-override") {
        Some(m) => m.to_str().unwrap().to_owned(),
        None => r.method.to_string(),
    })
    .await;
    let proxy = Proxy::start(&route("/", "validation = \"cached\""), &backend.origin()).await;
    let c = Client::new();
    for method in ["COPY", "MOVE"] {
        let b = proxy.url("/b");
        let tag_b = c.get(&b, &[]).await.etag();
        let over = ("x-http-method-override", method);
        let r = c
            .send("POST", &proxy.url("/a"), &[over, ("destination", &b)], "")
            .await;
        assert_eq!(r.status, 204, "{method}");
        // /b is now what /a was: a writer holding /b's old tag must not overwrite it.
        let stale = c.put(&b, &[("if-match", &tag_b)], "stale edit").await;
        assert_eq!(
            stale.status, 412,
            "POST run as {method}: a stale write to its destination"
        );
        assert_eq!(docs.lock().unwrap()["/b"], "A", "{method}");
        docs.lock().unwrap().insert("/a".into(), "A".into());
        docs.lock().unwrap().insert("/b".into(), "B".into());
    }
    assert!(proxy.state.locks.is_empty());
}

/// Paths with raw UTF-8 (which hyper lets through) are keyed by their percent-encoded form:
/// `//docs/é` is `/docs/%C3%A9`, one resource with its encoded spelling, and not `/docs/Ã©`,
/// which decoding it byte by byte would spell. Otherwise a writer could pass `If-Match` with
/// another document's tag, or two spellings of one document take two locks.
#[tokio::test]
async fn a_raw_utf8_path_shares_its_encoded_spelling_s_tag_and_no_other_document_s() {
    let backend = ScriptedBackend::start(|r| async move {
        match r.method.as_str() {
            "GET" => respond(200, &[], r.uri.path().to_owned()),
            _ => respond(204, &[], ""),
        }
    })
    .await;
    let proxy = Proxy::start(&route("/", "validation = \"cached\""), &backend.origin()).await;
    let c = Client::new();
    let other = c.get(&proxy.url("/docs/Ã©"), &[]).await.etag();
    let w = c
        .put(&proxy.url("//docs/é"), &[("if-match", &other)], "x")
        .await;
    assert_eq!(w.status, 412, "another document's tag");
    let mine = c.get(&proxy.url("/docs/%C3%A9"), &[]).await.etag();
    let puts = |b: &ScriptedBackend| b.requests().iter().filter(|r| r.method == "PUT").count();
    assert_eq!(puts(&backend), 0);
    let w = c
        .put(&proxy.url("/docs/é"), &[("if-match", &mine)], "x")
        .await;
    assert_eq!(
        w.status,
        204,
        "its own tag, by the other spelling: {}",
        w.text()
    );
    assert_eq!(puts(&backend), 1);
}

/// A response the backend marks `Cache-Control: private` (for one user) or `no-store` is not
/// remembered for other writers, nor copied: under `cached`, a write to it revalidates with
/// the writer's own head, as with `Vary: Cookie`. A public one is trusted.
#[tokio::test]
async fn under_cached_a_private_or_no_store_representation_is_not_trusted_for_other_writers() {
    const CASES: [(&str, bool); 4] = [
        ("max-age=60", true),
        ("private", false),
        ("no-store", false),
        ("private=\"set-cookie\", max-age=0", false),
    ];
    let backend = ScriptedBackend::start(|r| async move {
        let i: usize = r.uri.path()[1..].parse().unwrap();
        match r.method.as_str() {
            "GET" => respond(200, &[("cache-control", CASES[i].0)], "the text"),
            _ => respond(204, &[], ""),
        }
    })
    .await;
    let proxy = Proxy::start(&route("/", "validation = \"cached\""), &backend.origin()).await;
    let c = Client::new();
    let gets = |b: &ScriptedBackend| b.requests().iter().filter(|r| r.method == "GET").count();
    for (i, (cc, trusted)) in CASES.into_iter().enumerate() {
        let url = proxy.url(&format!("/{i}"));
        let tag = c.get(&url, &[]).await.etag();
        let before = gets(&backend);
        let w = c.put(&url, &[("if-match", &tag)], "edit").await;
        assert_eq!(w.status, 204, "{cc}: {}", w.text());
        let revalidated = gets(&backend) > before;
        assert_eq!(!revalidated, trusted, "{cc}");
    }
}

/// nginx's default `gzip_vary off`: the gzip answer has `Content-Encoding` and no `Vary`,
/// the identity answer neither. A URL once seen with more than one representation stays
/// so, even across a write: an identity read after a gzip one must not make the gzip
/// writer's current tag a 412 without the revalidation that confirms it.
#[tokio::test]
async fn under_cached_a_gzip_writer_is_not_refused_for_an_identity_read_without_vary() {
    let backend = ScriptedBackend::start(|r| async move {
        let gzip = r
            .headers
            .get("accept-encoding")
            .is_some_and(|v| v.to_str().unwrap().contains("gzip"));
        match (r.method.as_str(), gzip) {
            ("GET", true) => respond(200, &[("content-encoding", "gzip")], "pretend-gzip"),
            ("GET", false) => respond(200, &[], "the text"),
            _ => respond(204, &[], ""),
        }
    })
    .await;
    let proxy = Proxy::start(&route("/", "validation = \"cached\""), &backend.origin()).await;
    let c = Client::new();
    let url = proxy.url("/doc");
    let gz = ("accept-encoding", "gzip");
    let gzip_tag = c.get(&url, &[gz]).await.etag();
    c.get(&url, &[]).await;
    let w = c.put(&url, &[("if-match", &gzip_tag), gz], "edit").await;
    assert_eq!(w.status, 204);
    // After the write (the backend's answers do not change here), only an identity read.
    c.get(&url, &[]).await;
    let w = c.put(&url, &[("if-match", &gzip_tag), gz], "edit").await;
    assert_eq!(w.status, 204, "after a write too");
}

/// An empty tag list (`If-None-Match: `, as a client with no tag yet sends it) is a list no
/// tag is in (RFC 9110 §5.6.1.2), not a malformed header: a GET gets its 200, an `If-Match`
/// of nothing fails (412, not forwarded), and an empty `If-None-Match` guards no write, so a
/// route that requires a precondition still answers 428.
#[tokio::test]
async fn an_empty_tag_list_is_no_tag_not_a_malformed_header() {
    for validation in ["revalidate", "cached"] {
        let (backend, proxy) = setup(&format!(
            "validation = \"{validation}\"\nrequire_precondition = true"
        ))
        .await;
        let c = Client::new();
        let url = proxy.url("/docs/a");
        for empty in ["", ", ,"] {
            let r = c.get(&url, &[("if-none-match", empty)]).await;
            assert_eq!(r.status, 200, "{validation} {empty:?}");
            assert_eq!(r.etag(), proxy.tag_of(DOC));
            c.put(&url, &[("if-match", empty)], "v2")
                .await
                .assert_problem(412);
            c.put(&url, &[("if-none-match", empty)], "v2")
                .await
                .assert_problem(428);
        }
        assert_eq!(backend.store.writes(), 0, "{validation}: nothing forwarded");
    }
}

/// A backend whose strong `ETag` does not change with every write: nginx's default
/// (`etag on`) makes it from the modification time in whole seconds and the size, so a
/// document rewritten within a second at the same length keeps its tag. Kept (the default),
/// a writer holding the tag of the bytes before the last write would pass; with
/// `upstream_etag = "replace"` the proxy tags the bytes itself, and that writer gets 412.
#[tokio::test]
async fn with_upstream_etag_replace_a_tag_the_backend_never_changes_cannot_hide_a_write() {
    use std::sync::{Arc, Mutex};
    let doc = Arc::new(Mutex::new(String::from("aa")));
    let stored = doc.clone();
    let backend = ScriptedBackend::start(move |r| {
        let doc = stored.clone();
        async move {
            // The tag nginx would give every same-length body within one second.
            let tag = [("etag", "\"6b150583-2\"")];
            if r.headers.contains_key("range") {
                let part = [tag[0], ("content-range", "bytes 0-0/2")];
                return respond(206, &part, "a");
            }
            if r.method == http::Method::PUT {
                *doc.lock().unwrap() = String::from_utf8(r.body.to_vec()).unwrap();
                return respond(204, &tag, "");
            }
            let body = doc.lock().unwrap().clone();
            respond(200, &tag, body)
        }
    })
    .await;
    let proxy = Proxy::start(
        &route("/", "upstream_etag = \"replace\""),
        &backend.origin(),
    )
    .await;
    let c = Client::new();
    let url = proxy.url("/doc");

    let r = c.get(&url, &[]).await;
    assert_eq!(
        r.etag(),
        proxy.tag_of("aa"),
        "the proxy's tag, not the backend's"
    );
    // A part passes through untagged, and without the backend's tag either.
    let part = c.get(&url, &[("range", "bytes=0-0")]).await;
    assert_eq!((part.status, part.header("etag")), (206, None));
    let r = c.put(&url, &[("if-match", &r.etag())], "bb").await;
    assert_eq!(r.status, 204);
    assert_eq!(
        r.header("etag"),
        None,
        "the backend's tag means nothing here"
    );
    // Two writers read "bb"; the first one's write lands.
    let held = c.get(&url, &[]).await.etag();
    assert_eq!(held, proxy.tag_of("bb"));
    assert_eq!(c.put(&url, &[("if-match", &held)], "cc").await.status, 204);
    // The second still holds the tag of "bb": refused, "cc" stays.
    let r = c.put(&url, &[("if-match", &held)], "dd").await;
    assert_eq!(r.status, 412);
    assert_eq!(r.etag(), proxy.tag_of("cc"));
    assert_eq!(*doc.lock().unwrap(), "cc");
}

/// An `If-Unmodified-Since` that is not one valid HTTP-date is ignored (RFC 9110 §13.1.4),
/// so a blind write that sends one gets 428 where a precondition is required. Its detail
/// says the date was ignored and why, not that the write sent no `If-Unmodified-Since`.
#[tokio::test]
async fn a_428_for_an_ignored_date_says_the_date_was_ignored() {
    let (backend, proxy) = setup("require_precondition = true").await;
    let c = Client::new();
    let url = proxy.url("/docs/a");
    let d = "Sun, 06 Nov 1994 08:49:37 GMT";
    for since in [
        vec![("if-unmodified-since", "2024-01-01T00:00:00Z")],
        vec![("if-unmodified-since", d), ("if-unmodified-since", d)],
    ] {
        let p = c.put(&url, &since, "x").await.assert_problem(428);
        let detail = p["detail"].as_str().unwrap();
        assert!(
            detail.contains("If-Unmodified-Since is not one valid HTTP-date"),
            "{since:?}: {detail}"
        );
        let form = [
            since,
            vec![("content-type", "application/x-www-form-urlencoded")],
        ]
        .concat();
        let r = c.send("POST", &url, &form, "_method=PUT").await;
        let detail = r.assert_problem(428)["detail"].as_str().unwrap().to_owned();
        assert!(detail.contains("not one valid HTTP-date"), "{detail}");
        assert!(detail.starts_with("POST run as PUT"), "{detail}");
    }
    // A write that sent none is told what to send, as before.
    let p = c.put(&url, &[], "x").await.assert_problem(428);
    let detail = p["detail"].as_str().unwrap();
    assert!(!detail.contains("valid HTTP-date"), "{detail}");
    assert_eq!(backend.store.writes(), 0);
}

/// A backend without `Last-Modified` (most legacy ones): a write whose only precondition is
/// `If-Unmodified-Since` would be judged by nothing (the date is ignored, RFC 9110 §13.1.4)
/// and overwrite the document unguarded, though it met `require_precondition`. Such a write
/// gets 428, saying why; with `If-Match` it goes through, and without the requirement the
/// date condition is ignored as the RFC says.
#[tokio::test]
async fn if_unmodified_since_alone_does_not_meet_require_precondition_where_there_is_no_date() {
    let backend = ScriptedBackend::start(|r| async move {
        match r.method.as_str() {
            "GET" => respond(200, &[], "no date"),
            _ => respond(204, &[], ""),
        }
    })
    .await;
    let since = [("if-unmodified-since", "Sat, 01 Jan 2000 00:00:00 GMT")];
    for (required, want) in [(true, 428), (false, 204)] {
        let extra = format!("require_precondition = {required}");
        let proxy = Proxy::start(&route("/", &extra), &backend.origin()).await;
        let c = Client::new();
        let url = proxy.url("/doc");
        let r = c.put(&url, &since, "x").await;
        assert_eq!(r.status, want, "require_precondition = {required}");
        // Nor does an empty `If-None-Match` beside it, which holds whatever the state.
        let r = c.put(&url, &[since[0], ("if-none-match", "")], "x").await;
        assert_eq!(r.status, want, "with an empty If-None-Match");
        // So does a POST that asks, in its form body, to be run as a PUT.
        let form = [
            since[0],
            ("content-type", "application/x-www-form-urlencoded"),
        ];
        let r = c.send("POST", &url, &form, "_method=PUT").await;
        assert_eq!(r.status, want, "a form's _method");
        if required {
            let p = r.assert_problem(428);
            assert!(
                p["detail"].as_str().unwrap().contains("Last-Modified"),
                "{p}"
            );
            let tag = c.get(&url, &[]).await.etag();
            assert_eq!(c.put(&url, &[("if-match", &tag)], "x").await.status, 204);
        }
    }
    let writes = backend
        .requests()
        .iter()
        .filter(|r| r.method != "GET")
        .count();
    assert_eq!(writes, 4, "the refused writes never reached the backend");
}

/// A backend that serves a path whatever its query (static files, WebDAV, this store) has
/// one document at `/docs/a` and `/docs/a?v=2`. Keyed apart, a client reading and writing
/// at one of them overwrites a write made at the other with its stale tag; with
/// `ignore_query` they share one key (one lock, one tag), and the stale write gets 412.
#[tokio::test]
async fn ignore_query_keys_a_path_as_one_resource_whatever_its_query() {
    for (extra, stale_write) in [
        ("validation = \"cached\"", 204),
        ("validation = \"cached\"\nignore_query = true", 412),
        ("ignore_query = true", 412),
    ] {
        let (backend, proxy) = setup(extra).await;
        let c = Client::new();
        let (plain, queried) = (proxy.url("/docs/a"), proxy.url("/docs/a?v=2"));
        let tag = c.get(&plain, &[]).await.etag();
        assert_eq!(c.get(&queried, &[]).await.etag(), tag, "one document");
        assert_eq!(
            c.put(&plain, &[("if-match", &tag)], "A's").await.status,
            204
        );
        let r = c.put(&queried, &[("if-match", &tag)], "B's").await;
        assert_eq!(r.status, stale_write, "{extra}");
        let kept = if stale_write == 412 { "A's" } else { "B's" };
        assert_eq!(backend.store.get("/docs/a").unwrap(), kept, "{extra}");
    }
}

/// A write the backend answers 5xx may have been carried out (a handler that stored the
/// body, then failed): the URL's remembered tag is forgotten as after a 2xx, so a writer
/// still holding it is judged by a revalidation, not passed from the cache and let
/// overwrite. Only a 4xx (the backend refused: nothing changed) leaves the tag standing.
#[tokio::test]
async fn under_cached_a_write_answered_5xx_forgets_the_tag_and_a_4xx_keeps_it() {
    use std::sync::{Arc, Mutex};
    let doc = Arc::new(Mutex::new(String::from("v1")));
    let stored = doc.clone();
    let backend = ScriptedBackend::start(move |r| {
        let stored = stored.clone();
        async move {
            if r.method == "GET" {
                let body = stored.lock().unwrap().clone();
                return respond(200, &[], body);
            }
            if r.body.starts_with(b"refused") {
                return respond(409, &[], "no");
            }
            *stored.lock().unwrap() = String::from_utf8_lossy(&r.body).into_owned();
            respond(500, &[], "stored, then failed")
        }
    })
    .await;
    let proxy = Proxy::start(&route("/", "validation = \"cached\""), &backend.origin()).await;
    let c = Client::new();
    let url = proxy.url("/doc");
    let t1 = c.get(&url, &[]).await.etag();
    let gets = |b: &ScriptedBackend| b.requests().iter().filter(|r| r.method == "GET").count();
    assert_eq!(
        c.put(&url, &[("if-match", &t1)], "refused").await.status,
        409
    );
    let before = gets(&backend);
    // After the 409 the tag stands: this write is judged from the cache.
    assert_eq!(c.put(&url, &[("if-match", &t1)], "v2").await.status, 500);
    assert_eq!(gets(&backend), before, "judged by the remembered tag");
    // The backend stored v2: a writer still holding v1's tag is stale.
    let r = c.put(&url, &[("if-match", &t1)], "v3").await;
    r.assert_problem(412);
    assert_eq!(r.etag(), proxy.tag_of(b"v2"));
    assert_eq!(*doc.lock().unwrap(), "v2");
}

/// A 410 from the revalidation is a resource that does not exist, as a 404 is: a create
/// (`If-None-Match: *`) goes up, and `If-Match: *` gets 412.
#[tokio::test]
async fn a_gone_resource_does_not_exist_for_its_preconditions() {
    let backend = ScriptedBackend::start(|r| async move {
        match r.method.as_str() {
            "GET" => respond(410, &[], "gone"),
            _ => respond(201, &[], ""),
        }
    })
    .await;
    let proxy = Proxy::start(&route("/", ""), &backend.origin()).await;
    let c = Client::new();
    let url = proxy.url("/old");
    let r = c.put(&url, &[("if-none-match", "*")], "new").await;
    assert_eq!(r.status, 201, "{}", r.text());
    let writes = backend
        .requests()
        .iter()
        .filter(|r| r.method == "PUT")
        .count();
    c.put(&url, &[("if-match", "*")], "x")
        .await
        .assert_problem(412);
    let after = backend
        .requests()
        .iter()
        .filter(|r| r.method == "PUT")
        .count();
    assert_eq!(after, writes, "the 412 was not forwarded");
}

/// A reload that rotates `tag_key` forgets the tags remembered under the old key: on a
/// `validation = "cached"` route, a write carrying a tag handed out before the rotation is
/// judged against the resource's current tag under the new key (412, naming that tag), not
/// waved through by a cache entry made with a key the proxy no longer uses. Read again,
/// the resource's new tag guards writes as usual.
#[tokio::test]
async fn a_reload_that_changes_the_tag_key_forgets_the_tags_made_with_the_old_one() {
    let backend = Backend::start().await;
    backend.store.put("/docs/a", DOC);
    let key = |k: &str| format!("tag_key = \"{}\"", k.repeat(32));
    let routes = route("/docs/", "validation = \"cached\"");
    let proxy = Proxy::start_with(&routes, &backend.origin(), &key("a")).await;
    let c = Client::new();
    let url = proxy.url("/docs/a");
    let old = c.get(&url, &[]).await.etag();

    let text = format!(
        "[server]\nlisten = \"127.0.0.1:0\"\n{}\n{}",
        key("b"),
        routes.replace("{upstream}", &backend.origin())
    );
    proxy
        .state
        .reload(&ifmatch::config::Config::parse(&text, "t.toml").unwrap());
    let r = c.put(&url, &[("if-match", &old)], "v2").await;
    r.assert_problem(412);
    assert_eq!(
        r.etag(),
        proxy.tag_of(DOC),
        "the current tag, under the new key"
    );
    assert_ne!(r.etag(), old);
    assert_eq!(backend.store.writes(), 0, "not forwarded");

    let new = c.get(&url, &[]).await.etag();
    assert_eq!(c.put(&url, &[("if-match", &new)], "v2").await.status, 204);
    assert_eq!(backend.store.get("/docs/a").unwrap(), "v2");
}

/// RFC 9110 §13.2.1: a server MUST ignore the conditional header fields on a method that
/// neither selects nor modifies a representation, such as OPTIONS. An OPTIONS that carries
/// a stale `If-Match` (or an `If-None-Match: *` on an existing document) is forwarded and
/// gets the backend's answer, not a 412.
#[tokio::test]
async fn options_ignores_its_conditional_headers() {
    for validation in ["revalidate", "cached"] {
        let (_backend, proxy) = setup(&format!("validation = \"{validation}\"")).await;
        let c = Client::new();
        let url = proxy.url("/docs/a");
        c.get(&url, &[]).await;
        for cond in [("if-match", "\"stale\""), ("if-none-match", "*")] {
            let r = c.send("OPTIONS", &url, &[cond], "").await;
            assert_ne!(r.status, 412, "{validation}: OPTIONS with {cond:?}");
        }
        // Ignored, a malformed one is no 400 either: the backend's answer, as without it.
        let plain = c.send("OPTIONS", &url, &[], "").await;
        for cond in [("if-match", "abc"), ("if-none-match", "W/abc")] {
            let r = c.send("OPTIONS", &url, &[cond], "").await;
            assert_eq!(
                (r.status, r.body),
                (plain.status, plain.body.clone()),
                "{validation}: OPTIONS with {cond:?}"
            );
        }
    }
}

/// Under `upstream_max_connections`, a write that waits its turn has its whole
/// `upstream_timeout` from the turn (README), as a GET has: two PUTs (to two URLs) to a
/// capped backend that takes 600 ms each both get 204 under a 1 s timeout, the second at
/// ~1.2 s. The 504 a write sent whole gets while its exchange settles was timed from before
/// the wait: the second PUT got 504 at 1 s, and the backend stored it all the same.
#[tokio::test]
async fn a_write_that_waited_its_turn_has_its_whole_timeout_after_it() {
    let backend = ScriptedBackend::start(|_| async {
        tokio::time::sleep(Duration::from_millis(600)).await;
        respond(204, &[], "")
    })
    .await;
    let routes = route("/", "upstream_timeout = \"1s\"");
    let proxy = Proxy::start_with(&routes, &backend.origin(), "upstream_max_connections = 1").await;
    let c = Client::new();
    let (a, b) = (proxy.url("/a"), proxy.url("/b"));
    let started = std::time::Instant::now();
    let (first, second) = tokio::join!(c.put(&a, &[], "x"), c.put(&b, &[], "y"));
    let took = started.elapsed();
    assert_eq!(
        (first.status, second.status),
        (204, 204),
        "after {took:?}, both stored: {:?}",
        backend.requests().len()
    );
    assert!(took >= Duration::from_millis(1200), "{took:?}");
}

/// A POST whose URL-encoded form asks, in its `_method` field, to run as COPY or MOVE
/// (Symfony, so Laravel, reads the field from the body before the query, and takes any
/// method) changes its `Destination` as a COPY or MOVE does, as the README says of "a POST's
/// `_method`". Only the query's `_method` was read: the form's went up with the destination
/// neither locked nor its tag forgotten, so on a `cached` route a stale write to the
/// destination passed its `If-Match` (204, not 412) and undid the move.
#[tokio::test]
async fn a_post_run_as_copy_or_move_by_its_form_locks_and_forgets_its_destination() {
    let (docs, backend) = copy_and_move_store(|r| {
        let form = String::from_utf8_lossy(&r.body).into_owned();
        let field = form.split('&').find_map(|f| f.strip_prefix("_method="));
        match (r.method.as_str(), field) {
            ("POST", Some(m)) => m.to_ascii_uppercase(),
            (m, _) => m.to_owned(),
        }
    })
    .await;
    let proxy = Proxy::start(&route("/", "validation = \"cached\""), &backend.origin()).await;
    let c = Client::new();
    for method in ["COPY", "move"] {
        let b = proxy.url("/b");
        let tag_b = c.get(&b, &[]).await.etag();
        let form = ("content-type", "application/x-www-form-urlencoded");
        let body = format!("x=1&_method={method}");
        let r = c
            .send("POST", &proxy.url("/a"), &[form, ("destination", &b)], body)
            .await;
        assert_eq!(r.status, 204, "{method}");
        // /b is now what /a was: a writer holding /b's old tag must not overwrite it.
        let stale = c.put(&b, &[("if-match", &tag_b)], "stale edit").await;
        assert_eq!(
            stale.status, 412,
            "POST run as {method} by its form: a stale write to its destination"
        );
        assert_eq!(docs.lock().unwrap()["/b"], "A", "{method}");
        docs.lock().unwrap().insert("/a".into(), "A".into());
        docs.lock().unwrap().insert("/b".into(), "B".into());
        // An unreadable Destination is refused as COPY's and MOVE's are.
        let before = backend.requests().len();
        let body = format!("_method={method}");
        let r = c
            .send(
                "POST",
                &proxy.url("/a"),
                &[form, ("destination", "/b?x")],
                body,
            )
            .await;
        r.assert_problem(400);
        assert_eq!(backend.requests().len(), before, "{method} went up");
    }
    assert!(proxy.state.locks.is_empty());
}

/// A POST run as PUT or DELETE by a `_method` query parameter (Express's `method-override`,
/// Laravel) writes the document at its path, not one named by its query. It was keyed with
/// its query, `/doc?_method=PUT`, a lock and a tag apart from `/doc`'s: its write left `/doc`'s
/// remembered tag in place, so on a `cached` route a writer holding the tag it replaced
/// passed its `If-Match` (204, not 412) and the two writers with one tag both won.
#[tokio::test]
async fn a_post_run_as_another_method_by_its_query_writes_under_its_paths_lock_and_tag() {
    let (docs, backend) = query_overriding_backend(Duration::ZERO).await;
    let proxy = Proxy::start(&route("/", "validation = \"cached\""), &backend.origin()).await;
    let c = Client::new();
    let url = proxy.url("/doc");
    for (i, over) in ["PUT", "put", "DELETE"].into_iter().enumerate() {
        docs.lock().unwrap().insert("/doc".into(), format!("v{i}"));
        let tag = c.get(&url, &[]).await.etag();
        let form = proxy.url(&format!("/doc?_method={over}"));
        let r = c
            .send("POST", &form, &[("if-match", &tag)], "by the form")
            .await;
        assert_eq!(r.status, 204, "{over}");
        let after = docs.lock().unwrap().get("/doc").cloned();
        let stale = c.put(&url, &[("if-match", &tag)], "stale edit").await;
        assert_eq!(stale.status, 412, "a stale PUT after a POST run as {over}");
        assert_eq!(docs.lock().unwrap().get("/doc").cloned(), after, "{over}");
    }
    assert!(proxy.state.locks.is_empty());
}

/// The store as a Java servlet container reads paths: a segment's `;parameters` are no
/// part of its name (Tomcat serves `/d;jsessionid=A` as `/d`).
async fn servlet_store() -> (Docs, ScriptedBackend) {
    doc_store(&[("/d", "v1")], Duration::ZERO, |r| {
        let path: Vec<&str> = (r.uri.path().split('/'))
            .map(|s| s.split(';').next().unwrap_or_default())
            .collect();
        (r.method.to_string(), path.join("/"))
    })
    .await
}

/// A session id rewritten into a URL (`/d;jsessionid=A`) names the same document to a
/// servlet container. With `strip_path_params` the proxy keys it so too: a write through
/// the rewritten URL forgets `/d`'s tag, and a writer holding the tag it replaced gets 412.
/// Without it (the default: other servers read `;` as part of a name) the two URLs are two
/// keys, and both writers win, as README says.
#[tokio::test]
async fn a_route_that_strips_path_parameters_keys_a_session_rewritten_url_as_its_path() {
    for strip in [true, false] {
        let (docs, backend) = servlet_store().await;
        let extra = format!("validation = \"cached\"\nstrip_path_params = {strip}");
        let proxy = Proxy::start(&route("/", &extra), &backend.origin()).await;
        let c = Client::new();
        let tag = c.get(&proxy.url("/d"), &[]).await.etag();
        let rewritten = proxy.url("/d;jsessionid=A1B2");
        let r = c.put(&rewritten, &[("if-match", &tag)], "v2").await;
        assert_eq!(r.status, 204, "strip {strip}: the first writer");
        let stale = c
            .put(&proxy.url("/d"), &[("if-match", &tag)], "stale")
            .await;
        let left = docs.lock().unwrap().get("/d").cloned();
        match strip {
            true => assert_eq!(
                (stale.status, left.as_deref()),
                (412, Some("v2")),
                "the second writer with the same tag is refused"
            ),
            false => assert_eq!((stale.status, left.as_deref()), (204, Some("stale"))),
        }
        // The rewritten URL's GET gives the document's tag, under its one key.
        let via_session = c.get(&rewritten, &[]).await.etag();
        assert_eq!(via_session, c.get(&proxy.url("/d"), &[]).await.etag());
        assert!(proxy.state.locks.is_empty());
    }
}

/// A write refused before its body was read (412 on a body that streams, 428, 413 on a
/// declared length), whose body is larger than the proxy drops to keep the connection, is
/// still read while its client sends it, and the connection closed after (nginx's lingering
/// close). Closed at once with the body arriving, the socket reset the connection: a client
/// that sends its whole body before it reads the answer (Python's http.client, under
/// `requests`) failed with a broken pipe and never saw the answer.
#[tokio::test]
async fn a_refused_large_upload_gets_its_answer_not_a_reset_connection() {
    let (backend, proxy) = setup("max_tag_body = \"64KiB\"").await;
    let required = Proxy::start(
        &route("/docs/", "require_precondition = true"),
        &backend.origin(),
    )
    .await;
    let limited = Proxy::start_with(
        &route("/docs/", ""),
        &backend.origin(),
        "max_request_body = \"2MiB\"",
    )
    .await;
    // More than the two sockets' buffers hold, so that the upload outlasts the answer.
    const BODY: usize = 32 << 20;
    let asks = [
        (proxy.addr, "If-Match: \"stale\"\r\n", "412"),
        (required.addr, "", "428"),
        (limited.addr, "If-Match: \"stale\"\r\n", "413"),
    ];
    // Declared, and chunked: then part of the body is read before the answer (past
    // `max_tag_body` before the 412, up to `max_request_body` for the 413), and the rest is
    // still to come.
    for (chunked, (addr, condition, status)) in
        [false, true].into_iter().flat_map(|c| asks.map(|a| (c, a)))
    {
        let (sent, answer) = tokio::task::spawn_blocking(move || {
            let mut s = std::net::TcpStream::connect(addr).unwrap();
            s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
            s.set_write_timeout(Some(Duration::from_secs(20))).unwrap();
            let framing = match chunked {
                true => "Transfer-Encoding: chunked".to_owned(),
                false => format!("Content-Length: {BODY}"),
            };
            let head = format!("PUT /docs/a HTTP/1.1\r\nHost: x\r\n{condition}{framing}\r\n\r\n");
            s.write_all(head.as_bytes()).unwrap();
            let sent = match chunked {
                true => {
                    let chunk = [b"10000\r\n".as_slice(), &[b'x'; 1 << 16], b"\r\n"].concat();
                    (0..BODY >> 16)
                        .try_for_each(|_| s.write_all(&chunk))
                        .and_then(|()| s.write_all(b"0\r\n\r\n"))
                }
                false => s.write_all(&vec![b'x'; BODY]),
            };
            let mut answer = Vec::new();
            let _ = s.read_to_end(&mut answer);
            (sent, String::from_utf8_lossy(&answer).into_owned())
        })
        .await
        .unwrap();
        let what = format!("{status}, chunked {chunked}");
        assert!(sent.is_ok(), "{what}: the upload failed: {sent:?}");
        assert!(
            answer.starts_with(&format!("HTTP/1.1 {status}")),
            "{what}: {answer:?}"
        );
        assert!(
            answer.to_ascii_lowercase().contains("connection: close"),
            "{what}: {answer}"
        );
    }
    assert_eq!(backend.store.writes(), 0);
}
