//! `tag_puts` PUTs of known size are read whole before their URL's lock, and a PUT of the
//! very bytes whose tag it names (a save without edits, a retry, a sync agent pushing what is
//! there) shares the lock with others of its kind: they run side by side. A write that changes
//! the state still runs alone, and no rewrite of the old bytes can land after it and undo it.

mod common;

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use common::backend::respond;
use common::proxy::route;
use common::{Client, Proxy, ScriptedBackend};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const TAGGED: &str = "validation = \"cached\"\ntag_puts = true";

/// One PUT as the document store applied it.
#[derive(Clone, Debug)]
struct Applied {
    body: Bytes,
    /// Another PUT was at the store at some moment while this one was.
    overlapped: bool,
}

/// A document store that keeps one body per path and stores PUT bodies as sent, as nginx
/// WebDAV does. It logs each PUT as applied, and which of them overlapped another.
#[derive(Default)]
struct Store {
    docs: Mutex<HashMap<String, Bytes>>,
    /// PUTs at the store now: id → (overlapped so far).
    active: Mutex<HashMap<u64, bool>>,
    next: AtomicU64,
    log: Mutex<Vec<Applied>>,
}

impl Store {
    fn set(&self, path: &str, body: &str) {
        let body = Bytes::from(body.to_owned());
        self.docs.lock().unwrap().insert(path.to_owned(), body);
    }

    fn get(&self, path: &str) -> Bytes {
        self.docs.lock().unwrap()[path].clone()
    }

    fn take_log(&self) -> Vec<Applied> {
        std::mem::take(&mut *self.log.lock().unwrap())
    }

    /// `hold` decides how long a PUT stays at the store before it is applied.
    async fn start(hold: fn(u64) -> Duration) -> (ScriptedBackend, Arc<Store>) {
        let store = Arc::new(Store::default());
        let s = store.clone();
        let backend = ScriptedBackend::start(move |r| {
            let s = s.clone();
            async move {
                let path = r.uri.path().to_owned();
                if r.method == "GET" {
                    return match s.docs.lock().unwrap().get(&path) {
                        Some(body) => respond(200, &[], body.clone()),
                        None => respond(404, &[], ""),
                    };
                }
                let id = s.next.fetch_add(1, Ordering::SeqCst);
                {
                    let mut active = s.active.lock().unwrap();
                    let others = !active.is_empty();
                    active.values_mut().for_each(|o| *o = true);
                    active.insert(id, others);
                }
                tokio::time::sleep(hold(id)).await;
                // Applied and logged in one step, as the store sees it.
                let overlapped = s.active.lock().unwrap().remove(&id).unwrap();
                let mut log = s.log.lock().unwrap();
                s.docs.lock().unwrap().insert(path, r.body.clone());
                log.push(Applied {
                    body: r.body,
                    overlapped,
                });
                respond(204, &[], "")
            }
        })
        .await;
        (backend, store)
    }
}

async fn put(c: &Client, url: &str, tag: &str, body: String) -> (u16, Option<String>) {
    let r = c.put(url, &[("if-match", tag)], body).await;
    (r.status, r.header("etag").map(str::to_owned))
}

#[tokio::test]
async fn puts_of_the_current_bytes_run_side_by_side() {
    // Each PUT stays at the store for 300 ms: if the proxy sent them one at a time, none
    // would ever meet another.
    let (backend, store) = Store::start(|_| Duration::from_millis(300)).await;
    store.set("/docs/a", "the same bytes");
    let proxy = Proxy::start(&route("/docs/", TAGGED), &backend.origin()).await;
    let c = Client::new();
    let url = proxy.url("/docs/a");
    let tag = c.get(&url, &[]).await.etag();
    let writers: Vec<_> = (0..4)
        .map(|_| {
            let (c, url, tag) = (c.clone(), url.clone(), tag.clone());
            tokio::spawn(async move { put(&c, &url, &tag, "the same bytes".into()).await })
        })
        .collect();
    for w in writers {
        assert_eq!(w.await.unwrap(), (204, Some(tag.clone())));
    }
    let log = store.take_log();
    assert_eq!(log.len(), 4);
    assert!(
        log.iter().filter(|a| a.overlapped).count() >= 2,
        "the writes of the current bytes overlapped at the store: {log:?}"
    );
    let metrics = metrics_of(&proxy);
    assert!(
        metrics.contains("ifmatch_unchanged_writes_total{route=\"/docs/\"} 4"),
        "{metrics}"
    );
    assert!(proxy.state.locks.is_empty());
    // A rewrite of bytes that are no longer current waits for the lock like the rest, and
    // gets its 412 under it: its wait is counted too, once.
    let old = "older bytes";
    let r = c.put(&url, &[("if-match", &proxy.tag_of(old))], old).await;
    assert_eq!(r.status, 412);
    let metrics = metrics_of(&proxy);
    assert!(
        metrics.contains("ifmatch_lock_wait_seconds_count 5"),
        "{metrics}"
    );
}

/// Rounds of writers all holding the same fresh tag, two in three sending the current bytes
/// again and one in three new ones, at a store that holds each PUT a little while so that
/// they interleave. In every round exactly one change wins, runs alone, and is the last
/// write applied: no rewrite of the old bytes lands after it.
async fn rounds_of_rewrites_and_changes(rounds: usize, writers: usize) {
    let (backend, store) = Store::start(|id| Duration::from_millis(id * 7 % 5)).await;
    let proxy = Proxy::start(&route("/docs/", TAGGED), &backend.origin()).await;
    let c = Client::new();
    let url = proxy.url("/docs/a");
    let mut overlapped = 0;
    for round in 0..rounds {
        let old = format!("round {round}");
        store.set("/docs/a", &old);
        let tag = c.get(&url, &[]).await.etag();
        let writers: Vec<_> = (0..writers)
            .map(|w| {
                let (c, url, tag) = (c.clone(), url.clone(), tag.clone());
                let body = match w % 3 {
                    2 => format!("round {round} change {w}"),
                    _ => old.clone(),
                };
                tokio::spawn(async move { (body.clone(), put(&c, &url, &tag, body).await) })
            })
            .collect();
        let mut changed = Vec::new();
        let mut rewrites = 0;
        for w in writers {
            let (body, (status, etag)) = w.await.unwrap();
            match (body == old, status) {
                (true, 204) => {
                    assert_eq!(etag.as_ref(), Some(&tag), "round {round}");
                    rewrites += 1;
                }
                (false, 204) => changed.push(body),
                (_, 412) => {}
                other => panic!("round {round}: {other:?}"),
            }
        }
        assert_eq!(changed.len(), 1, "round {round}: one change wins");
        assert_eq!(store.get("/docs/a"), changed[0], "round {round}");
        let log = store.take_log();
        assert_eq!(
            log.len(),
            rewrites + 1,
            "round {round}: only 204s were sent"
        );
        let at = log.iter().position(|a| a.body != old).unwrap();
        assert_eq!(at, log.len() - 1, "round {round}: nothing after the change");
        assert!(!log[at].overlapped, "round {round}: the change ran alone");
        overlapped += log.iter().filter(|a| a.overlapped).count();
    }
    assert!(proxy.state.locks.is_empty());
    // Not asserted (the interleaving is the scheduler's), but shown when the test fails.
    eprintln!("rewrites that overlapped another: {overlapped}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_change_runs_alone_and_no_rewrite_of_the_old_bytes_lands_after_it() {
    rounds_of_rewrites_and_changes(30, 6).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "500 rounds of 12 writers; .ci/run runs it"]
async fn five_hundred_rounds_of_rewrites_and_changes_lose_no_change() {
    rounds_of_rewrites_and_changes(500, 12).await;
}

/// `If-Match` may list several tags. A PUT whose body's tag is among them, but which finds
/// another of them current, changes the state: it must run alone, not beside a rewrite of
/// the current bytes that could land after it and undo it.
#[tokio::test]
async fn a_put_naming_its_own_tag_among_others_runs_alone_when_it_changes_the_state() {
    let (backend, store) = Store::start(|_| Duration::from_millis(200)).await;
    store.set("/docs/a", "current");
    let proxy = Proxy::start(&route("/docs/", TAGGED), &backend.origin()).await;
    let c = Client::new();
    let url = proxy.url("/docs/a");
    let current = c.get(&url, &[]).await.etag();
    let other = proxy.tag_of(b"other");
    for _ in 0..2 {
        store.set("/docs/a", "current");
        let both = format!("{other}, {current}");
        let (c1, u1, t1) = (c.clone(), url.clone(), current.clone());
        let rewrite = tokio::spawn(async move { put(&c1, &u1, &t1, "current".into()).await.0 });
        let (c2, u2) = (c.clone(), url.clone());
        let change = tokio::spawn(async move { put(&c2, &u2, &both, "other".into()).await.0 });
        assert_eq!(change.await.unwrap(), 204);
        let rewrite = rewrite.await.unwrap();
        let log = store.take_log();
        let change = log.iter().find(|a| a.body == "other").unwrap();
        assert!(!change.overlapped, "the change ran alone: {log:?}");
        // A rewrite that won went first: the change is what the store holds, and what the
        // proxy's remembered tag says.
        assert_eq!(store.get("/docs/a"), "other", "rewrite: {rewrite}");
        let key = common::proxy::key(&backend.origin(), "/docs/a");
        let remembered = proxy.state.tags.get(&key).map(|k| k.tag.to_string());
        assert_eq!(remembered, Some(other.clone()));
    }
}

/// A client that waits for `100 Continue` sends its body only once the preconditions pass:
/// the body is not read ahead for it, so a stale tag is answered 412 at once.
#[tokio::test]
async fn expect_100_continue_still_gets_its_412_before_sending_the_body() {
    let (backend, store) = Store::start(|_| Duration::ZERO).await;
    store.set("/docs/a", "v1");
    let proxy = Proxy::start(&route("/docs/", TAGGED), &backend.origin()).await;
    let c = Client::new();
    let url = proxy.url("/docs/a");
    let tag = c.get(&url, &[]).await.etag();
    assert_eq!(put(&c, &url, &tag, "v2".into()).await.0, 204);

    let mut s = tokio::net::TcpStream::connect(proxy.addr).await.unwrap();
    let head = format!(
        "PUT /docs/a HTTP/1.1\r\nHost: x\r\nIf-Match: {tag}\r\nExpect: 100-continue\r\nContent-Length: 2\r\n\r\n"
    );
    s.write_all(head.as_bytes()).await.unwrap();
    let mut buf = [0u8; 4096];
    let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf))
        .await
        .expect("answered without the body")
        .unwrap();
    let answer = String::from_utf8_lossy(&buf[..n]);
    assert!(answer.starts_with("HTTP/1.1 412"), "{answer}");
    assert_eq!(store.take_log().len(), 1, "only the first PUT");
}

fn metrics_of(proxy: &Proxy) -> String {
    let s = &proxy.state;
    s.metrics.render(&s.tags, &s.memo, &s.budget)
}
