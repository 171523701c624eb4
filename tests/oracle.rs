//! The tag must not become an oracle: tags are keyed (HMAC-SHA256), replicas sharing a key
//! agree, and a 412 only ever shows a tag to a client that could read the resource.

mod common;

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use common::backend::respond;
use common::proxy::route;
use common::{Backend, Client, Proxy, ScriptedBackend};
use hmac::{Hmac, Mac};
use sha2::{Digest, Sha256};

const KEY: &str = "7f3c9a1e5b2d8f4a6c0e1b3d5f7a9c2e";
const BALANCE: &str = r#"{"balance":100}"#;

fn keyed(extra: &str) -> String {
    format!("tag_key = \"{KEY}\"\n{extra}")
}

#[tokio::test]
async fn tags_are_hmac_sha256_under_the_configured_key_not_a_plain_hash() {
    let backend = Backend::start().await;
    backend.store.put("/acct/1", BALANCE);
    let proxy = Proxy::start_with(&route("/acct/", ""), &backend.origin(), &keyed("")).await;
    let c = Client::new();
    let tag = c.get(&proxy.url("/acct/1"), &[]).await.etag();

    let mut mac = Hmac::<Sha256>::new_from_slice(KEY.as_bytes()).unwrap();
    mac.update(BALANCE.as_bytes());
    let want = format!(
        "\"{}\"",
        URL_SAFE_NO_PAD.encode(mac.finalize().into_bytes())
    );
    assert_eq!(tag, want);

    // Someone who guesses the body cannot confirm the guess with a plain hash.
    let guess = format!(
        "\"{}\"",
        URL_SAFE_NO_PAD.encode(Sha256::digest(BALANCE.as_bytes()))
    );
    let r = c
        .put(&proxy.url("/acct/1"), &[("if-match", &guess)], "x")
        .await;
    assert_eq!(r.status, 412);
    assert_eq!(backend.store.writes(), 0);
}

#[tokio::test]
async fn replicas_sharing_a_key_accept_each_others_tags() {
    let backend = Backend::start().await;
    backend.store.put("/acct/1", BALANCE);
    let a = Proxy::start_with(&route("/acct/", ""), &backend.origin(), &keyed("")).await;
    let b = Proxy::start_with(&route("/acct/", ""), &backend.origin(), &keyed("")).await;
    let c = Client::new();
    let tag = c.get(&a.url("/acct/1"), &[]).await.etag();
    assert_eq!(c.get(&b.url("/acct/1"), &[]).await.etag(), tag);
    assert_eq!(
        c.put(&b.url("/acct/1"), &[("if-match", &tag)], "v2")
            .await
            .status,
        204
    );
}

#[tokio::test]
async fn without_a_configured_key_each_process_has_its_own() {
    let backend = Backend::start().await;
    backend.store.put("/acct/1", BALANCE);
    let a = Proxy::start(&route("/acct/", ""), &backend.origin()).await;
    let b = Proxy::start(&route("/acct/", ""), &backend.origin()).await;
    let c = Client::new();
    let ta = c.get(&a.url("/acct/1"), &[]).await.etag();
    assert_ne!(ta, c.get(&b.url("/acct/1"), &[]).await.etag());
    assert_eq!(
        c.put(&b.url("/acct/1"), &[("if-match", &ta)], "x")
            .await
            .status,
        412
    );
}

#[tokio::test]
async fn a_key_change_on_reload_makes_outstanding_tags_stale() {
    let backend = Backend::start().await;
    backend.store.put("/acct/1", BALANCE);
    let routes = route("/acct/", "validation = \"cached\"");
    let proxy = Proxy::start_with(&routes, &backend.origin(), &keyed("")).await;
    let c = Client::new();
    let old = c.get(&proxy.url("/acct/1"), &[]).await.etag();
    let text = format!(
        "[server]\nlisten = \"127.0.0.1:0\"\ntag_key = \"{}\"\n{}",
        "n".repeat(32),
        routes.replace("{upstream}", &backend.origin())
    );
    proxy
        .state
        .reload(&ifmatch::config::Config::parse(&text, "t.toml").unwrap());
    assert!(
        proxy.state.tags.is_empty(),
        "tags made under the old key are forgotten"
    );
    let r = c
        .put(&proxy.url("/acct/1"), &[("if-match", &old)], "x")
        .await;
    assert_eq!(r.status, 412, "an old-key tag never matches");
    assert_eq!(r.etag(), proxy.tag_of(BALANCE));
}

/// A backend that serves each user their own document and refuses strangers.
async fn per_user_backend(vary: bool) -> ScriptedBackend {
    ScriptedBackend::start(move |r| async move {
        let who = r
            .headers
            .get("authorization")
            .map(|v| v.to_str().unwrap().to_owned());
        let vary: &[(&str, &str)] = if vary {
            &[("vary", "Authorization")]
        } else {
            &[]
        };
        match (r.method.as_str(), who.as_deref()) {
            (_, None) => respond(401, &[("www-authenticate", "Bearer")], "log in"),
            ("GET", Some(user)) => respond(200, vary, format!("{user}'s balance: 100")),
            (_, Some(_)) => respond(204, &[], ""),
        }
    })
    .await
}

async fn stranger_learns_nothing(routes: &str, vary: bool) {
    let backend = per_user_backend(vary).await;
    let proxy = Proxy::start(routes, &backend.origin()).await;
    let c = Client::new();
    let alice = [("authorization", "Bearer alice")];
    let tag = c.get(&proxy.url("/acct"), &alice).await.etag();
    assert!(
        proxy.state.tags.is_empty(),
        "a per-user representation is not remembered"
    );
    // A stranger guessing with Alice's tag gets the backend's 401, not 412 + Alice's tag.
    let r = c.put(&proxy.url("/acct"), &[("if-match", &tag)], "x").await;
    assert_eq!(r.status, 401);
    assert!(r.header("etag").is_none());
    // Bob's tag differs and is checked against Bob's own representation.
    let bob = [("authorization", "Bearer bob")];
    let r = c
        .put(&proxy.url("/acct"), &[bob[0], ("if-match", &tag)], "x")
        .await;
    assert_eq!(r.status, 412);
    assert_eq!(r.etag(), proxy.tag_of("Bearer bob's balance: 100"));
    let r = c
        .put(&proxy.url("/acct"), &[alice[0], ("if-match", &tag)], "x")
        .await;
    assert_eq!(r.status, 204);
}

#[tokio::test]
async fn under_cached_validation_a_vary_authorization_response_falls_back_to_revalidation() {
    stranger_learns_nothing(&route("/", "validation = \"cached\""), true).await;
}

/// RFC 9111 §3.5: a shared cache does not reuse a response to a request with
/// `Authorization` unless it says it may. So under `cached`, with no `Vary` and no
/// `per_user`, one user's tag is not remembered for another: Bob's read does not make
/// Alice's write a 412 carrying Bob's tag.
#[tokio::test]
async fn under_cached_validation_an_authorized_response_falls_back_to_revalidation() {
    stranger_learns_nothing(&route("/", "validation = \"cached\""), false).await;
    let backend = per_user_backend(false).await;
    let proxy = Proxy::start(&route("/", "validation = \"cached\""), &backend.origin()).await;
    let c = Client::new();
    let (alice, bob) = (
        ("authorization", "Bearer alice"),
        ("authorization", "Bearer bob"),
    );
    let url = proxy.url("/me");
    let alice_tag = c.get(&url, &[alice]).await.etag();
    c.get(&url, &[bob]).await;
    let r = c
        .put(&url, &[alice, ("if-match", &alice_tag)], "edit")
        .await;
    assert_eq!(r.status, 204, "{}", r.text());
}

/// Only what any client could be given is remembered: not a response to a request with
/// credentials, even one the backend marks as shared (`public`), which RFC 9111 §3.5 lets a
/// shared cache reuse but which would judge other writers (see
/// `a_response_to_a_request_with_a_cookie_is_not_remembered`); nor a response that sets a
/// cookie (nginx and Varnish do not cache one either), nor one with `Vary: *`.
#[tokio::test]
async fn under_cached_validation_only_responses_fit_for_all_are_remembered() {
    let backend = ScriptedBackend::start(|r| async move {
        match r.uri.path() {
            "/public" => respond(200, &[("cache-control", "public, max-age=0")], "for all"),
            "/cookie" => respond(200, &[("set-cookie", "session=1")], "for one"),
            // Varies on what no request header names: the user, for all the proxy knows.
            "/star" => respond(200, &[("vary", "*")], "for one"),
            _ => respond(200, &[], "plain"),
        }
    })
    .await;
    let proxy = Proxy::start(&route("/", "validation = \"cached\""), &backend.origin()).await;
    let c = Client::new();
    let auth = [("authorization", "Bearer alice")];
    c.get(&proxy.url("/public"), &auth).await;
    c.get(&proxy.url("/cookie"), &[]).await;
    c.get(&proxy.url("/star"), &[]).await;
    c.get(&proxy.url("/plain"), &auth).await;
    let origin = backend.origin();
    let tags = &proxy.state.tags;
    assert!(tags.get(&common::proxy::key(&origin, "/public")).is_none());
    assert!(tags.get(&common::proxy::key(&origin, "/cookie")).is_none());
    assert!(tags.get(&common::proxy::key(&origin, "/star")).is_none());
    assert!(tags.get(&common::proxy::key(&origin, "/plain")).is_none());
    // Fit for all: no credentials, and nothing that says it is one user's.
    c.get(&proxy.url("/public"), &[]).await;
    c.get(&proxy.url("/plain"), &[]).await;
    assert!(tags.get(&common::proxy::key(&origin, "/public")).is_some());
    assert!(tags.get(&common::proxy::key(&origin, "/plain")).is_some());
}

#[tokio::test]
async fn under_cached_validation_a_per_user_route_falls_back_to_revalidation() {
    stranger_learns_nothing(
        &route("/", "validation = \"cached\"\nper_user = true"),
        false,
    )
    .await;
}

/// A backend with one document per user at each URL (`/me/settings`), stored as PUT and
/// served `private`; a user's missing document is a 404, and strangers get 401.
async fn own_documents_backend() -> ScriptedBackend {
    type Docs = std::collections::HashMap<(http::HeaderValue, String), String>;
    let docs = std::sync::Arc::new(std::sync::Mutex::new(Docs::new()));
    ScriptedBackend::start(move |r| {
        let docs = docs.clone();
        async move {
            let Some(who) = r.headers.get("authorization").cloned() else {
                return respond(401, &[("www-authenticate", "Bearer")], "log in");
            };
            let doc = (who, r.uri.path().to_owned());
            let mut docs = docs.lock().unwrap();
            match r.method.as_str() {
                "GET" => match docs.get(&doc) {
                    Some(body) => respond(200, &[("cache-control", "private")], body.clone()),
                    None => respond(404, &[], ""),
                },
                _ => match docs.insert(doc, String::from_utf8(r.body.to_vec()).unwrap()) {
                    Some(_) => respond(204, &[], ""),
                    None => respond(201, &[], ""),
                },
            }
        }
    })
    .await
}

/// Under `tag_puts`, a PUT's body becomes the remembered tag. Sent with credentials, it may
/// be its writer's own document (one per user at one URL): remembered, it judged other
/// users' writes. A failing one locked Bob out (412s carrying Alice's tag on every retry)
/// and showed her tag to anyone; a passing one let Bob's stale write through when his
/// document and Alice's held the same bytes, created Alice's document under an
/// `If-Match: *` her missing document fails, and told a guesser what another's document
/// holds. Its writer is answered with it; it is not remembered.
#[tokio::test]
async fn a_tag_puts_write_with_credentials_is_not_remembered_for_other_users() {
    let backend = own_documents_backend().await;
    let proxy = Proxy::start(
        &route("/", "validation = \"cached\"\ntag_puts = true"),
        &backend.origin(),
    )
    .await;
    let c = Client::new();
    let url = proxy.url("/me/settings");
    let (alice, bob) = (
        ("authorization", "Bearer alice"),
        ("authorization", "Bearer bob"),
    );
    for who in [alice, bob] {
        assert_eq!(c.put(&url, &[who], "{}").await.status, 201);
    }
    // Bob reads on one device, and writes on another.
    let stale = c.get(&url, &[bob]).await.etag();
    let r = c.put(&url, &[bob, ("if-match", &stale)], "dark").await;
    assert_eq!(r.status, 204);
    assert_eq!(r.etag(), proxy.tag_of("dark"), "its writer gets its tag");
    // Alice's document holds what Bob's held: her tag is his stale one.
    let a = c.get(&url, &[alice]).await.etag();
    assert_eq!(a, stale);
    let r = c.put(&url, &[alice, ("if-match", &a)], "{}").await;
    assert_eq!(r.status, 204, "{}", r.text());
    let r = c.put(&url, &[bob, ("if-match", &stale)], "fr").await;
    assert_eq!(r.status, 412, "Bob's first device is stale");
    assert_eq!(r.etag(), proxy.tag_of("dark"), "and is shown its own tag");
    // A stranger gets the backend's answer, and no one's tag.
    let r = c.put(&url, &[("if-match", "\"x\"")], "x").await;
    assert_eq!((r.status, r.header("etag")), (401, None));
    // Bob creates /me/doc2; Alice has none there, so `*` fails for her.
    let doc2 = proxy.url("/me/doc2");
    assert_eq!(c.put(&doc2, &[bob], "bob's").await.status, 201);
    let r = c.put(&doc2, &[alice, ("if-match", "*")], "alice's").await;
    assert_eq!(r.status, 412, "{}", r.text());
    // Bob's own next write needs no re-read: his tag holds for him.
    let r = c
        .put(
            &url,
            &[bob, ("if-match", &proxy.tag_of("dark"))],
            "dark, fr",
        )
        .await;
    assert_eq!(r.status, 204);
}

/// A document whose anonymous readers get a summary and whose users get it whole
/// (`private`, with `Vary: Authorization` or without): the remembered tag is the summary's.
/// A writer with credentials is judged on its own representation, as a revalidation with
/// them gives it: Alice's current tag passes `If-Match` (it was a 412 on every retry) and
/// fails `If-None-Match` (it went through).
#[tokio::test]
async fn a_writer_with_credentials_is_judged_on_its_own_representation_not_the_remembered_one() {
    for vary in [false, true] {
        let backend = ScriptedBackend::start(move |r| async move {
            let auth = r.headers.get("authorization").cloned();
            match (r.method.as_str(), auth) {
                ("GET", None) => respond(200, &[], "summary"),
                ("GET", Some(who)) => {
                    let mut headers = vec![("cache-control", "private")];
                    if vary {
                        headers.push(("vary", "Authorization"));
                    }
                    respond(
                        200,
                        &headers,
                        format!("whole, for {}", who.to_str().unwrap()),
                    )
                }
                _ => respond(204, &[], ""),
            }
        })
        .await;
        let proxy = Proxy::start(&route("/", "validation = \"cached\""), &backend.origin()).await;
        let c = Client::new();
        let url = proxy.url("/doc");
        let alice = ("authorization", "Bearer alice");
        c.get(&url, &[]).await;
        let a = c.get(&url, &[alice]).await.etag();
        let r = c.put(&url, &[alice, ("if-none-match", &a)], "x").await;
        assert_eq!(r.status, 412, "vary {vary}: Alice's tag is current for her");
        assert_eq!(r.etag(), a);
        let r = c.put(&url, &[alice, ("if-match", &a)], "edit").await;
        assert_eq!(r.status, 204, "vary {vary}: {}", r.text());
    }
}

/// Users start from a default document that anonymous readers get too, and each has a
/// copy of their own once they write (`private`). Equal bytes are equal tags: Alice's old
/// tag is the default's, which an anonymous read remembers. A remembered tag cannot vouch
/// for a writer with credentials, passing or failing: Alice's stale device got a 204 and
/// overwrote her other device's write.
#[tokio::test]
async fn a_remembered_tag_never_judges_a_writer_with_credentials() {
    const DEFAULT: &str = r#"{"theme":"light"}"#;
    type Docs = std::collections::HashMap<http::HeaderValue, String>;
    let docs = std::sync::Arc::new(std::sync::Mutex::new(Docs::new()));
    let backend = ScriptedBackend::start(move |r| {
        let docs = docs.clone();
        async move {
            let mut docs = docs.lock().unwrap();
            let who = r
                .headers
                .get("authorization")
                .or(r.headers.get("cookie"))
                .cloned();
            match (r.method.as_str(), who) {
                ("GET", None) => respond(200, &[], DEFAULT),
                ("GET", Some(who)) => {
                    let doc = docs.get(&who).cloned().unwrap_or(DEFAULT.to_owned());
                    respond(200, &[("cache-control", "private")], doc)
                }
                (_, None) => respond(401, &[], "log in"),
                (_, Some(who)) => {
                    docs.insert(who, String::from_utf8(r.body.to_vec()).unwrap());
                    respond(204, &[], "")
                }
            }
        }
    })
    .await;
    for (who, routes) in [
        (("authorization", "Bearer alice"), "validation = \"cached\""),
        (("cookie", "session=alice"), "validation = \"cached\""),
        (
            ("authorization", "Bearer alice"),
            "validation = \"cached\"\ntag_puts = true",
        ),
    ] {
        let proxy = Proxy::start(&route("/", routes), &backend.origin()).await;
        let c = Client::new();
        let url = proxy.url(&format!("/prefs-{}", who.0));
        let stale = c.get(&url, &[who]).await.etag();
        let r = c.put(&url, &[who, ("if-match", &stale)], "dark").await;
        assert_eq!(r.status, 204, "{who:?}");
        assert_eq!(c.get(&url, &[]).await.etag(), stale, "the default's tag");
        let r = c.put(&url, &[who, ("if-match", &stale)], "big font").await;
        assert_eq!(r.status, 412, "{who:?} {routes}: the stale device");
        assert_eq!(r.etag(), proxy.tag_of("dark"), "shown its own current tag");
        // Reset for the next case.
        c.put(&url, &[who], DEFAULT).await;
    }
}

/// A response to a request with a `Cookie` may be that session's own, as one to a request
/// with `Authorization` may be its user's: it is not remembered, not even when the backend
/// says a cache may reuse it (`public`, `must-revalidate`, which WordPress sent logged-in
/// users before 6.3), so an anonymous 412 cannot show it and a guess about it cannot be
/// confirmed.
#[tokio::test]
async fn a_response_to_a_request_with_a_cookie_is_not_remembered() {
    let backend = ScriptedBackend::start(|r| async move {
        let reusable = [("cache-control", "no-cache, must-revalidate, max-age=0")];
        match (r.headers.get("cookie"), r.uri.path()) {
            (None, _) => respond(401, &[], "log in"),
            (Some(_), "/public") => respond(200, &[("cache-control", "public")], "for all"),
            (Some(c), "/wp") => respond(200, &reusable, format!("pin of {}", c.to_str().unwrap())),
            (Some(c), _) => respond(200, &[], format!("secret of {}", c.to_str().unwrap())),
        }
    })
    .await;
    let proxy = Proxy::start(&route("/", "validation = \"cached\""), &backend.origin()).await;
    let c = Client::new();
    let alice = ("cookie", "session=alice");
    let origin = backend.origin();
    for path in ["/me", "/public", "/wp"] {
        let tag = c.get(&proxy.url(path), &[alice]).await.etag();
        let key = common::proxy::key(&origin, path);
        assert!(proxy.state.tags.get(&key).is_none(), "{path}");
        let r = c
            .put(&proxy.url(path), &[("if-match", "\"nope\"")], "x")
            .await;
        assert_eq!(r.status, 401, "{path}: the backend's answer");
        assert_ne!(r.header("etag"), Some(tag.as_str()), "{path}");
    }
}
