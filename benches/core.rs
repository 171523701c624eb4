//! Micro-benchmarks of the pieces on the request path, each beside a reference measured in
//! the same run:
//!
//! - `hash/*`: tagging a body (HMAC-SHA256, chunked as bodies arrive, then encoded) against
//!   plain SHA-256 of the same bytes in one call, and the keyed hash alone between them: the
//!   cost of keying and chunking, and of the tag's encoding and allocation;
//! - `preconditions/*`: parsing conditional headers and evaluating them;
//! - `tag_store/*`: the tag cache, single-threaded and with 2 threads contending;
//! - `request/*`: a whole GET and a whole conditional PUT through the real proxy server
//!   to an in-process backend, against the same GET sent to the backend directly.
//!
//!     cargo bench --bench core

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use hmac::{Hmac, Mac};
use http::{HeaderMap, HeaderValue};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::{connect::HttpConnector, Client};
use hyper_util::rt::TokioExecutor;
use ifmatch::config::Config;
use ifmatch::etag::{ETag, TagKey};
use ifmatch::key::ResourceKey;
use ifmatch::precondition::{evaluate, Preconditions, Resource};
use ifmatch::tags::{Known, TagStore};
use sha2::{Digest, Sha256};

const SIZES: [(&str, usize); 4] = [
    ("1KiB", 1 << 10),
    ("16KiB", 16 << 10),
    ("256KiB", 256 << 10),
    ("4MiB", 4 << 20),
];

fn hashing(c: &mut Criterion) {
    let key = TagKey::new(&[7u8; 32]);
    let mut g = c.benchmark_group("hash");
    for (name, size) in SIZES {
        let body = vec![0x5au8; size];
        g.throughput(Throughput::Bytes(size as u64));
        g.bench_with_input(
            BenchmarkId::new("sha256_reference", name),
            &body,
            |b, body| b.iter(|| Sha256::digest(body)),
        );
        // The keyed hash alone, as the tag computes it (a keyed state cloned, the chunks fed,
        // finalised), without the tag's encoding and allocation: what the hashing costs.
        let keyed = <Hmac<Sha256> as Mac>::new_from_slice(&[7u8; 32]).unwrap();
        g.bench_with_input(BenchmarkId::new("hmac_only", name), &body, |b, body| {
            b.iter(|| {
                let mut mac = keyed.clone();
                for chunk in body.chunks(16 << 10) {
                    mac.update(chunk);
                }
                mac.finalize().into_bytes()
            })
        });
        // Bodies arrive in chunks of up to 16 KiB from hyper; the tag is fed chunk by chunk.
        g.bench_with_input(
            BenchmarkId::new("tag_hmac_chunked", name),
            &body,
            |b, body| {
                b.iter(|| {
                    let mut h = key.hasher();
                    for chunk in body.chunks(16 << 10) {
                        h.update(chunk);
                    }
                    h.finish()
                })
            },
        );
    }
    g.finish();
}

fn preconditions(c: &mut Criterion) {
    let mut headers = HeaderMap::new();
    headers.insert(
        "if-match",
        HeaderValue::from_static("\"a\", \"b\", \"uU0nuZNNPgilLlLX2n2r-sSE7-N6U4DukIj3rOLvzek\""),
    );
    headers.insert(
        "if-unmodified-since",
        HeaderValue::from_static("Sun, 06 Nov 1994 08:49:37 GMT"),
    );
    headers.insert("content-type", HeaderValue::from_static("application/json"));
    let current = Resource {
        exists: true,
        tag: Some(ETag::strong("uU0nuZNNPgilLlLX2n2r-sSE7-N6U4DukIj3rOLvzek").unwrap()),
        last_modified: None,
    };
    let mut g = c.benchmark_group("preconditions");
    g.bench_function("parse", |b| {
        b.iter(|| Preconditions::parse(&headers).unwrap())
    });
    let pre = Preconditions::parse(&headers).unwrap();
    g.bench_function("evaluate", |b| b.iter(|| evaluate(&pre, false, &current)));
    // What a client that read an ETag sends with its write: one tag, one line.
    let mut one = HeaderMap::new();
    one.insert(
        "if-match",
        HeaderValue::from_static("\"uU0nuZNNPgilLlLX2n2r-sSE7-N6U4DukIj3rOLvzek\""),
    );
    g.bench_function("parse_one_tag", |b| {
        b.iter(|| Preconditions::parse(&one).unwrap())
    });
    g.bench_function("parse_empty", |b| {
        b.iter(|| Preconditions::parse(&HeaderMap::new()).unwrap())
    });
    g.finish();
}

fn tag_store(c: &mut Criterion) {
    let upstream = Config::parse(
        "[server]\nlisten=\"127.0.0.1:1\"\n[[route]]\nprefix=\"/\"\nupstream=\"http://a:1\"",
        "b",
    )
    .unwrap()
    .routes[0]
        .upstream
        .clone();
    let keys: Vec<ResourceKey> = (0..10_000)
        .map(|i| ResourceKey::new(&upstream, &format!("/docs/{i}"), None))
        .collect();
    let known = Known {
        tag: ETag::strong("t").unwrap(),
        last_modified: None,
        from_upstream: false,
        negotiated: false,
    };
    let mut g = c.benchmark_group("tag_store");
    let store = Arc::new(TagStore::new(100_000));
    for k in &keys {
        store.record(k, known.clone(), store.ticket());
    }
    g.bench_function("get_hit", |b| {
        let mut i = 0;
        b.iter(|| {
            i = (i + 1) % keys.len();
            store.get(&keys[i])
        })
    });
    g.bench_function("record", |b| {
        let mut i = 0;
        b.iter(|| {
            i = (i + 1) % keys.len();
            store.record(&keys[i], known.clone(), store.ticket())
        })
    });
    // Two threads (this machine has two cores) doing get + record + invalidate on shared keys.
    g.bench_function("contended_2_threads", |b| {
        b.iter_custom(|iters| {
            let start = std::time::Instant::now();
            std::thread::scope(|s| {
                for t in 0..2 {
                    let (store, keys, known) = (&store, &keys, &known);
                    s.spawn(move || {
                        for i in 0..iters as usize {
                            let k = &keys[(i * 7 + t) % keys.len()];
                            if store.get(k).is_none() {
                                store.record(k, known.clone(), store.ticket());
                            }
                            if i % 8 == 0 {
                                store.invalidate(k);
                            }
                        }
                    });
                }
            });
            start.elapsed()
        })
    });
    g.finish();
}

fn request_path(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let (backend, proxy) = rt.block_on(async {
        let store = ifmatch::demo::LegacyStore::new();
        store.put("/docs/1k", vec![b'x'; 1024]);
        store.put("/docs/put", "doc");
        let bl = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let backend = bl.local_addr().unwrap();
        tokio::spawn(ifmatch::demo::serve(bl, store, std::future::pending()));
        let text = format!(
            "[server]\nlisten = \"127.0.0.1:0\"\n[[route]]\nprefix = \"/docs/\"\nupstream = \"http://{backend}\"\nvalidation = \"cached\"\n"
        );
        let config = Config::parse(&text, "bench").unwrap();
        let pl = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let proxy = pl.local_addr().unwrap();
        tokio::spawn(ifmatch::server::run(pl, config, std::future::pending()));
        (backend, proxy)
    });
    let client: Client<HttpConnector, Full<Bytes>> =
        Client::builder(TokioExecutor::new()).build(HttpConnector::new());
    let send = |method: &'static str, url: String, if_match: Option<String>| {
        let client = client.clone();
        async move {
            let mut req = http::Request::builder().method(method).uri(url);
            if let Some(t) = if_match {
                req = req.header("if-match", t);
            }
            let rsp = client
                .request(req.body(Full::new(Bytes::from_static(b"doc"))).unwrap())
                .await
                .unwrap();
            let tag = rsp
                .headers()
                .get("etag")
                .map(|v| v.to_str().unwrap().to_owned());
            rsp.into_body().collect().await.unwrap();
            tag
        }
    };
    let mut g = c.benchmark_group("request");
    g.measurement_time(Duration::from_secs(5));
    g.bench_function("get_1KiB_direct_reference", |b| {
        b.to_async(&rt)
            .iter(|| send("GET", format!("http://{backend}/docs/1k"), None))
    });
    g.bench_function("get_1KiB_through_ifmatch", |b| {
        b.to_async(&rt)
            .iter(|| send("GET", format!("http://{proxy}/docs/1k"), None))
    });
    // The body written is the body already there, so the tag stays right; each write drops
    // the remembered tag, so every PUT here pays for a revalidation GET.
    let tag = rt.block_on(send("GET", format!("http://{proxy}/docs/put"), None));
    g.bench_function("conditional_put_through_ifmatch", |b| {
        b.to_async(&rt)
            .iter(|| send("PUT", format!("http://{proxy}/docs/put"), tag.clone()))
    });
    g.finish();
}

criterion_group!(benches, hashing, preconditions, tag_store, request_path);
criterion_main!(benches);
