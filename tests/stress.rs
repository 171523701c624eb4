//! Stress: 1,000 rounds of 32 concurrent writers holding one fresh tag, across 8 URLs,
//! through the proxy, against a backend that versions its documents and notices a lost
//! update itself. Ignored by a plain `cargo test` (about a minute in a debug build);
//! `.ci/run` runs it.

mod common;

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use common::backend::respond;
use common::proxy::route;
use common::{Client, Proxy, ScriptedBackend};

const ROUNDS: usize = 1000;
const URLS: usize = 8;
const WRITERS: usize = 32;

/// Each document is `v<N>`; a PUT says which version it was based on (`base=<N>`) and
/// becomes version N+1. A PUT based on anything but the current version would overwrite
/// someone else's write: the backend applies it (it is legacy) but counts a lost update.
async fn versioned_backend() -> (ScriptedBackend, Arc<AtomicU64>) {
    let docs: Arc<Mutex<HashMap<String, u64>>> = Arc::default();
    let lost = Arc::new(AtomicU64::new(0));
    let (d, l) = (docs.clone(), lost.clone());
    let backend = ScriptedBackend::start(move |r| {
        let (docs, lost) = (d.clone(), l.clone());
        async move {
            let path = r.uri.path().to_owned();
            let mut docs = docs.lock().unwrap();
            let current = *docs.entry(path).or_insert(0);
            match r.method.as_str() {
                "GET" => respond(200, &[], format!("v{current}")),
                "PUT" => {
                    let body = String::from_utf8_lossy(&r.body).into_owned();
                    let base: u64 = body.strip_prefix("base=").unwrap().parse().unwrap();
                    if base != current {
                        lost.fetch_add(1, Ordering::SeqCst);
                    }
                    *docs.get_mut(r.uri.path()).unwrap() = current + 1;
                    respond(204, &[], "")
                }
                _ => respond(405, &[], ""),
            }
        }
    })
    .await;
    (backend, lost)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "a minute of load; .ci/run runs it"]
async fn a_thousand_rounds_of_racing_writers_lose_no_update() {
    let (backend, lost) = versioned_backend().await;
    let proxy = Proxy::start(&route("/", "lock_timeout = \"30s\""), &backend.origin()).await;
    let client = Client::new();
    let mut statuses: HashMap<u16, usize> = HashMap::new();
    for round in 0..ROUNDS {
        let mut reads = Vec::new();
        for u in 0..URLS {
            let url = proxy.url(&format!("/doc/{u}"));
            let r = client.get(&url, &[]).await;
            let version: u64 = r.text().strip_prefix('v').unwrap().parse().unwrap();
            reads.push((url, r.etag(), version));
        }
        let tasks: Vec<_> = (0..WRITERS)
            .map(|w| {
                let (url, tag, version) = reads[w % URLS].clone();
                let client = client.clone();
                tokio::spawn(async move {
                    let body = format!("base={version}");
                    (
                        w % URLS,
                        client.put(&url, &[("if-match", &tag)], body).await.status,
                    )
                })
            })
            .collect();
        let mut wins = [0usize; URLS];
        for t in tasks {
            let (u, status) = t.await.unwrap();
            *statuses.entry(status).or_default() += 1;
            assert!(
                status == 204 || status == 412,
                "round {round}: status {status}"
            );
            if status == 204 {
                wins[u] += 1;
            }
        }
        assert_eq!(wins, [1; URLS], "round {round}: one writer per URL wins");
    }
    assert_eq!(lost.load(Ordering::SeqCst), 0, "lost updates");
    assert_eq!(statuses.get(&204), Some(&(ROUNDS * URLS)));
    assert_eq!(statuses.get(&412), Some(&(ROUNDS * (WRITERS - URLS))));
    assert!(proxy.state.locks.is_empty());
}
