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
    tokio::time::sleep(Duration::from_millis(50)).await;
    let r = client.put(&proxy.url("/doc"), &[], "impatient").await;
    r.assert_problem(503);
    assert_eq!(r.header("retry-after"), Some("1"));
    assert_eq!(first.await.unwrap(), 204);
    assert!(proxy.state.locks.is_empty(), "no lock is left behind");
}
