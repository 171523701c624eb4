//! Memory: the tag cache's bound and the per-request body buffer, on the release binary.
//!
//!     cargo build --release && cargo bench --bench memory -- [--urls 1000000] [--big 2000]
//!         [--memo-bytes N] [--burst 1000] [--buffered-bytes N] [--read-buffer N]
//!
//! Phase 1 sends one GET to each of `--urls` distinct URLs through a proxy whose
//! `tag_cache_entries` is 100,000, and every 100,000 requests reads the proxy's RSS and its
//! `/metrics` (cache entries, evictions, bytes of body copies). `--memo-bytes` sets
//! `tag_memo_bytes` (unset: the default, 32 MiB; 0: no copies). Phase 2 sends `--big` GETs of a 4 MiB body through
//! a route with `max_tag_body = "1MiB"` (streamed untagged) and samples RSS meanwhile. Phase 3
//! sends `--burst` GETs of 4 MiB bodies that are tagged (`max_tag_body = "8MiB"`), from
//! `BURST_CLIENTS` clients at once, under `max_buffered_bytes` = `--buffered-bytes` (unset:
//! 16 MiB), sampling RSS and the `ifmatch_buffered_bytes` gauge. `--read-buffer` sets
//! `upstream_read_buffer` for all phases (unset: its default). The backend is a small hyper
//! server in this process; everything stays on 127.0.0.1. It fails (exit 1) if the cache ever
//! holds more entries than its bound, the copies or the held bodies more bytes than theirs,
//! or a request fails.

mod support;
use support::{free_port, rss_kib};

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Empty, Full};
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::client::legacy::{connect::HttpConnector, Client};
use hyper_util::rt::{TokioExecutor, TokioIo};

const ENTRIES: u64 = 100_000;
const CLIENTS: u64 = 16;
const BURST_CLIENTS: u64 = 64;
const BIG: usize = 4 << 20;

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let arg = |name: &str, default: u64| {
        args.iter()
            .position(|a| a == name)
            .map(|i| args[i + 1].parse().expect("a number"))
            .unwrap_or(default)
    };
    let (urls, big) = (arg("--urls", 1_000_000), arg("--big", 2_000));
    let memo = args
        .iter()
        .position(|a| a == "--memo-bytes")
        .map(|i| args[i + 1].parse::<u64>().expect("a number"));
    let burst = (
        arg("--burst", 1_000),
        arg("--buffered-bytes", 16 << 20),
        arg(
            "--read-buffer",
            ifmatch::config::DEFAULT_UPSTREAM_READ_BUFFER,
        ),
    );
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let ok = rt.block_on(run(urls, big, memo, burst));
    std::process::exit(if ok { 0 } else { 1 });
}

fn mib(kib: u64) -> f64 {
    kib as f64 / 1024.0
}

/// The backend: `/small/N` answers a short body naming N, `/big/N` 4 MiB (one shared buffer).
async fn backend(listener: tokio::net::TcpListener) {
    let big = Bytes::from(vec![b'x'; BIG]);
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let big = big.clone();
        tokio::spawn(async move {
            let service = service_fn(move |req: Request<hyper::body::Incoming>| {
                let path = req.uri().path();
                let body = if path.starts_with("/big/") || path.starts_with("/burst/") {
                    big.clone()
                } else {
                    Bytes::from(format!("{{\"doc\":\"{}\"}}", req.uri().path()))
                };
                async move { Ok::<_, std::convert::Infallible>(Response::new(Full::new(body))) }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

/// One figure from the proxy's `/metrics`.
async fn metric(client: &Client<HttpConnector, Empty<Bytes>>, admin: u16, name: &str) -> u64 {
    let uri = format!("http://127.0.0.1:{admin}/metrics");
    let rsp = client.get(uri.parse().unwrap()).await.unwrap();
    let text = rsp.into_body().collect().await.unwrap().to_bytes();
    String::from_utf8_lossy(&text)
        .lines()
        .find_map(|l| l.strip_prefix(name)?.trim().parse().ok())
        .unwrap_or(0)
}

/// Sends GETs for `path(i)`, i in `from..to`, from `CLIENTS` tasks; returns the failures.
async fn load(
    client: &Client<HttpConnector, Empty<Bytes>>,
    base: &str,
    range: (u64, u64),
    path: fn(u64) -> String,
) -> u64 {
    load_from(CLIENTS, client, base, range, path).await
}

/// `load` from `clients` tasks.
async fn load_from(
    clients: u64,
    client: &Client<HttpConnector, Empty<Bytes>>,
    base: &str,
    (from, to): (u64, u64),
    path: fn(u64) -> String,
) -> u64 {
    let next = Arc::new(AtomicU64::new(from));
    let failed = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    for _ in 0..clients {
        let (client, next, failed, base) = (
            client.clone(),
            next.clone(),
            failed.clone(),
            base.to_owned(),
        );
        tasks.push(tokio::spawn(async move {
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= to {
                    break;
                }
                let uri = format!("{base}{}", path(i)).parse().unwrap();
                let ok = match client.get(uri).await {
                    Ok(rsp) if rsp.status() == 200 => rsp.into_body().collect().await.is_ok(),
                    _ => false,
                };
                if !ok {
                    failed.fetch_add(1, Ordering::Relaxed);
                }
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    failed.load(Ordering::Relaxed)
}

async fn run(
    urls: u64,
    big: u64,
    memo: Option<u64>,
    (burst, buffered, read_buffer): (u64, u64, u64),
) -> bool {
    let memo_budget = memo.unwrap_or(ifmatch::config::DEFAULT_TAG_MEMO_BYTES);
    let bin = support::BIN;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let backend_port = listener.local_addr().unwrap().port();
    tokio::spawn(backend(listener));
    let (proxy_port, admin_port) = (free_port(), free_port());
    let dir = std::env::temp_dir().join(format!("ifmatch-memory-{proxy_port}"));
    std::fs::create_dir_all(&dir).unwrap();
    let config = dir.join("ifmatch.toml");
    std::fs::write(
        &config,
        format!(
            "[server]\nlisten = \"127.0.0.1:{proxy_port}\"\ntag_cache_entries = {ENTRIES}\n\
             tag_memo_bytes = {memo_budget}\nmax_buffered_bytes = {buffered}\n\
             upstream_read_buffer = {read_buffer}\n\
             workers = 1\ntag_key = \"{key}\"\n[admin]\nlisten = \"127.0.0.1:{admin_port}\"\n\
             [[route]]\nprefix = \"/small/\"\nupstream = \"http://127.0.0.1:{backend_port}\"\n\
             validation = \"cached\"\n\
             [[route]]\nprefix = \"/big/\"\nupstream = \"http://127.0.0.1:{backend_port}\"\n\
             max_tag_body = \"1MiB\"\n\
             [[route]]\nprefix = \"/burst/\"\nupstream = \"http://127.0.0.1:{backend_port}\"\n\
             max_tag_body = \"8MiB\"\n",
            key = "m".repeat(32)
        ),
    )
    .unwrap();
    let mut proxy = support::start_proxy(&config, proxy_port).await;
    let pid = proxy.id();
    // The highest RSS seen since the last report, sampled every 50 ms while requests run.
    let peak = Arc::new(AtomicU64::new(0));
    let sampler = {
        let peak = peak.clone();
        tokio::spawn(async move {
            loop {
                peak.fetch_max(rss_kib(pid), Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        })
    };
    let client: Client<HttpConnector, Empty<Bytes>> =
        Client::builder(TokioExecutor::new()).build(HttpConnector::new());
    let base = format!("http://127.0.0.1:{proxy_port}");
    let mut ok = true;

    let start_rss = rss_kib(pid);
    println!(
        "memory: {bin} (pid {pid}), tag_cache_entries = {ENTRIES}, tag_memo_bytes = {memo_budget}, \
         RSS at start {:.1} MiB\n",
        mib(start_rss)
    );
    println!("| distinct URLs | cache entries | evictions | body copies MiB | peak RSS MiB | RSS growth per 100k entries |");
    println!("|---:|---:|---:|---:|---:|---:|");
    let started = Instant::now();
    let (mut over_bound, mut failed) = (false, 0);
    let step = 100_000;
    for from in (0..urls).step_by(step as usize) {
        let to = (from + step).min(urls);
        failed += load(&client, &base, (from, to), |i| format!("/small/{i}")).await;
        let entries = metric(&client, admin_port, "ifmatch_tag_cache_entries").await;
        let evictions = metric(&client, admin_port, "ifmatch_tag_cache_evictions_total").await;
        let copies = metric(&client, admin_port, "ifmatch_tag_memo_bytes").await;
        over_bound |= copies > memo_budget;
        let rss = peak.swap(0, Ordering::Relaxed).max(rss_kib(pid));
        over_bound |= entries > ENTRIES;
        let per_100k = mib(rss.saturating_sub(start_rss)) * 100_000.0 / entries.max(1) as f64;
        println!(
            "| {to} | {entries} | {evictions} | {:.1} | {:.1} | {per_100k:.1} MiB |",
            copies as f64 / (1 << 20) as f64,
            mib(rss)
        );
    }
    println!(
        "\n{urls} GETs in {:.0} s, {failed} failed; cache or copies over their bound: {over_bound}\n",
        started.elapsed().as_secs_f64()
    );
    ok &= failed == 0 && !over_bound;

    println!("| 4 MiB GETs (max_tag_body 1 MiB) | peak RSS MiB | untagged (metric) |");
    println!("|---:|---:|---:|");
    let step = (big / 8).max(1);
    let mut failed = 0;
    for from in (0..big).step_by(step as usize) {
        let to = (from + step).min(big);
        failed += load(&client, &base, (from, to), |i| format!("/big/{}", i % 64)).await;
        let untagged = metric(
            &client,
            admin_port,
            "ifmatch_untagged_large_bodies_total{route=\"/big/\"}",
        )
        .await;
        let rss = peak.swap(0, Ordering::Relaxed).max(rss_kib(pid));
        println!("| {to} | {:.1} | {untagged} |", mib(rss));
    }
    println!("\n{big} GETs of 4 MiB, {failed} failed");
    ok &= failed == 0;

    // The held bytes' gauge, sampled as RSS is.
    let held_peak = Arc::new(AtomicU64::new(0));
    let held_sampler = {
        let (held_peak, client) = (held_peak.clone(), client.clone());
        tokio::spawn(async move {
            loop {
                let held = metric(&client, admin_port, "ifmatch_buffered_bytes ").await;
                held_peak.fetch_max(held, Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
    };
    println!(
        "\n| 4 MiB GETs, tagged, {BURST_CLIENTS} at once (max_buffered_bytes {:.0} MiB, upstream_read_buffer {} KiB) | peak RSS MiB | peak held MiB (gauge) | streamed untagged (metric) |",
        buffered as f64 / (1 << 20) as f64,
        read_buffer >> 10
    );
    println!("|---:|---:|---:|---:|");
    let step = (burst / 4).max(1);
    let (mut failed, mut over_budget) = (0, false);
    for from in (0..burst).step_by(step as usize) {
        let to = (from + step).min(burst);
        failed += load_from(BURST_CLIENTS, &client, &base, (from, to), |i| {
            format!("/burst/{}", i % 64)
        })
        .await;
        let streamed = metric(
            &client,
            admin_port,
            "ifmatch_over_budget_bodies_total{route=\"/burst/\",body=\"response\"}",
        )
        .await;
        let rss = peak.swap(0, Ordering::Relaxed).max(rss_kib(pid));
        let held = held_peak.swap(0, Ordering::Relaxed);
        over_budget |= held > buffered;
        println!(
            "| {to} | {:.1} | {:.1} | {streamed} |",
            mib(rss),
            held as f64 / (1 << 20) as f64
        );
    }
    held_sampler.abort();
    println!(
        "\n{burst} GETs of 4 MiB, {failed} failed; held over max_buffered_bytes: {over_budget}"
    );
    ok &= failed == 0 && !over_budget;

    sampler.abort();
    let _ = proxy.kill();
    let _ = proxy.wait();
    let _ = std::fs::remove_dir_all(&dir);
    println!("memory: {}", if ok { "PASS" } else { "FAIL" });
    ok
}
