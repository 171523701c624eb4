//! The body memo: an unchanged body is compared with the copy of the URL's last body instead
//! of hashed again. What a client sees must not change: every tag is the tag of the bytes it
//! came with, however the body was cut into chunks and however it differs from the copy.

mod common;

use std::collections::VecDeque;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use bytes::Bytes;
use common::proxy::route;
use common::{Client, Proxy};
use http::{Request, Response};
use http_body::{Body, Frame};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use proptest::prelude::*;
use tokio::net::TcpListener;

/// Counts the live heap blocks whose size lies in a window a test sets (`Blocks::watch`), so
/// that a test can count the copies of a URL's key the proxy holds: each key is one block
/// of its own length (plus the `Arc`'s counts), a size nothing else in this binary has.
struct Blocks;

static WATCH: [std::sync::atomic::AtomicUsize; 2] = [
    std::sync::atomic::AtomicUsize::new(usize::MAX),
    std::sync::atomic::AtomicUsize::new(0),
];
static WATCHED: std::sync::atomic::AtomicIsize = std::sync::atomic::AtomicIsize::new(0);

impl Blocks {
    fn watch(lo: usize, hi: usize) {
        WATCH[1].store(hi, Ordering::SeqCst);
        WATCH[0].store(lo, Ordering::SeqCst);
    }

    fn live() -> isize {
        WATCHED.load(Ordering::SeqCst)
    }

    fn watched(size: usize) -> bool {
        (WATCH[0].load(Ordering::Relaxed)..=WATCH[1].load(Ordering::Relaxed)).contains(&size)
    }
}

// SAFETY: every block comes from and goes back to `System`; the counts change nothing.
unsafe impl std::alloc::GlobalAlloc for Blocks {
    unsafe fn alloc(&self, layout: std::alloc::Layout) -> *mut u8 {
        let p = unsafe { std::alloc::System.alloc(layout) };
        if !p.is_null() && Self::watched(layout.size()) {
            WATCHED.fetch_add(1, Ordering::SeqCst);
        }
        p
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: std::alloc::Layout) {
        if Self::watched(layout.size()) {
            WATCHED.fetch_sub(1, Ordering::SeqCst);
        }
        unsafe { std::alloc::System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static ALLOCATOR: Blocks = Blocks;

/// A body sent as the given chunks (`Transfer-Encoding: chunked`, one chunk each), so that
/// the proxy reads it in pieces of the test's choosing.
struct Frames(VecDeque<Bytes>);

impl Body for Frames {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        _: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        Poll::Ready(self.0.pop_front().map(|c| Ok(Frame::data(c))))
    }
}

/// What the backend answers GETs with: bodies as chunks, taken in turn, and extra headers.
#[derive(Clone, Default)]
struct Answer {
    bodies: Vec<Vec<Bytes>>,
    headers: Vec<(&'static str, &'static str)>,
}

/// A backend on 127.0.0.1:0 that answers 200 with the current `Answer`.
struct ChunkedBackend {
    addr: SocketAddr,
    answer: Arc<Mutex<Answer>>,
}

impl ChunkedBackend {
    async fn start() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let answer = Arc::new(Mutex::new(Answer::default()));
        let shared = answer.clone();
        let served = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    return;
                };
                let (shared, served) = (shared.clone(), served.clone());
                let service = service_fn(move |_: Request<Incoming>| {
                    let a = shared.lock().unwrap().clone();
                    let n = served.fetch_add(1, Ordering::Relaxed);
                    async move {
                        let chunks = a.bodies[n % a.bodies.len()].clone();
                        let mut rsp = Response::new(Frames(chunks.into()));
                        for (k, v) in a.headers {
                            rsp.headers_mut().insert(k, v.parse().unwrap());
                        }
                        Ok::<_, Infallible>(rsp)
                    }
                });
                tokio::spawn(
                    hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service),
                );
            }
        });
        Self { addr, answer }
    }

    fn origin(&self) -> String {
        format!("http://{}", self.addr)
    }

    fn answer(&self, body: &[u8], cuts: &[usize], headers: &[(&'static str, &'static str)]) {
        *self.answer.lock().unwrap() = Answer {
            bodies: vec![chunked(body, cuts)],
            headers: headers.to_vec(),
        };
    }

    /// Answers each request with the next of `bodies`, round and round.
    fn take_turns(&self, bodies: &[&[u8]], cuts: &[usize]) {
        *self.answer.lock().unwrap() = Answer {
            bodies: bodies.iter().map(|b| chunked(b, cuts)).collect(),
            headers: Vec::new(),
        };
    }

    fn serve(&self, body: &[u8]) {
        self.answer(body, &[], &[]);
    }
}

/// `body` cut into pieces of the sizes in `cuts`, in turn, the last piece taking the rest.
fn chunked(body: &[u8], cuts: &[usize]) -> Vec<Bytes> {
    let mut out = Vec::new();
    let mut rest = body;
    for &n in cuts
        .iter()
        .cycle()
        .take(if cuts.is_empty() { 0 } else { 64 })
    {
        if rest.is_empty() {
            break;
        }
        let (piece, tail) = rest.split_at(n.min(rest.len()));
        out.push(Bytes::copy_from_slice(piece));
        rest = tail;
    }
    if !rest.is_empty() {
        out.push(Bytes::copy_from_slice(rest));
    }
    out
}

fn hits(proxy: &Proxy) -> u64 {
    proxy.state.memo.stats.hits.load(Ordering::Relaxed)
}

/// How the next body differs from the one before.
#[derive(Clone, Debug)]
enum Edit {
    Same,
    /// One byte changed (perhaps to itself).
    Set(usize, u8),
    Truncate(usize),
    Extend(Vec<u8>),
    Fresh(Vec<u8>),
}

fn edit() -> impl Strategy<Value = Edit> {
    prop_oneof![
        3 => Just(Edit::Same),
        3 => (any::<usize>(), any::<u8>()).prop_map(|(i, b)| Edit::Set(i, b)),
        1 => any::<usize>().prop_map(Edit::Truncate),
        1 => prop::collection::vec(any::<u8>(), 1..300).prop_map(Edit::Extend),
        1 => prop::collection::vec(any::<u8>(), 0..3000).prop_map(Edit::Fresh),
    ]
}

fn apply(body: &[u8], e: &Edit) -> Vec<u8> {
    let mut b = body.to_vec();
    match e {
        Edit::Same => {}
        Edit::Set(i, v) if !b.is_empty() => {
            let at = i % b.len();
            b[at] = *v;
        }
        Edit::Set(..) => b.push(0),
        Edit::Truncate(n) => b.truncate(n % (b.len() + 1)),
        Edit::Extend(more) => b.extend_from_slice(more),
        Edit::Fresh(new) => b = new.clone(),
    }
    b
}

/// Random bodies for one URL, each a small edit of the last, each cut into random chunks:
/// every response carries the tag of exactly its bytes, and the memo is used exactly when
/// the body equals the one before (the copy it kept).
#[test]
fn every_tag_is_the_tag_of_its_bytes_and_only_an_unchanged_body_skips_the_hash() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let backend = rt.block_on(ChunkedBackend::start());
    let proxy = rt.block_on(Proxy::start(&route("/", ""), &backend.origin()));
    let client = Client::new();
    let config = proptest::test_runner::Config {
        cases: 64,
        failure_persistence: None,
        ..Default::default()
    };
    let mut runner = proptest::test_runner::TestRunner::new(config);
    let case = (
        prop::collection::vec(any::<u8>(), 0..3000),
        prop::collection::vec((edit(), prop::collection::vec(1usize..700, 0..6)), 1..8),
    );
    let run = std::sync::atomic::AtomicUsize::new(0);
    let result = runner.run(&case, |(first, steps)| {
        // A URL of its own for each case: its first body has no copy yet.
        let n = run.fetch_add(1, Ordering::Relaxed);
        let url = proxy.url(&format!("/doc-{n}"));
        let mut body = first;
        let mut before: Option<Vec<u8>> = None;
        for (i, (e, cuts)) in steps.iter().enumerate() {
            body = apply(&body, e);
            backend.answer(&body, cuts, &[]);
            let hits_before = hits(&proxy);
            let r = rt.block_on(client.get(&url, &[]));
            prop_assert_eq!(r.status, 200);
            prop_assert_eq!(&r.body[..], &body[..], "step {}", i);
            prop_assert_eq!(r.etag(), proxy.tag_of(&body), "step {}: {:?}", i, e);
            let unchanged = before.as_deref() == Some(&body[..]);
            prop_assert_eq!(
                hits(&proxy) - hits_before,
                u64::from(unchanged),
                "step {}",
                i
            );
            before = Some(body.clone());
        }
        Ok(())
    });
    if let Err(e) = result {
        panic!("{e}");
    }
}

/// A representation that differs by user is never kept: how long a comparison takes would
/// tell one user how much of their body matched another's.
#[tokio::test]
async fn bodies_that_differ_by_user_are_never_kept() {
    let backend = ChunkedBackend::start().await;
    let routes = format!("{}{}", route("/mine/", "per_user = true"), route("/", ""));
    let proxy = Proxy::start(&routes, &backend.origin()).await;
    let c = Client::new();
    backend.serve(b"the same bytes");
    for _ in 0..3 {
        c.get(&proxy.url("/mine/doc"), &[]).await;
    }
    backend.answer(b"the same bytes", &[], &[("vary", "Accept, Cookie")]);
    for _ in 0..3 {
        c.get(&proxy.url("/shared/by-cookie"), &[]).await;
    }
    assert_eq!(hits(&proxy), 0);
    assert!(proxy.state.memo.is_empty());
    // The same body on a route shared by all users is kept and used.
    backend.serve(b"the same bytes");
    for _ in 0..3 {
        c.get(&proxy.url("/shared/doc"), &[]).await;
    }
    assert_eq!(hits(&proxy), 2);
}

#[tokio::test]
async fn the_budget_bounds_the_copies_and_zero_turns_the_memo_off() {
    let backend = ChunkedBackend::start().await;
    backend.serve(&[b'x'; 1024]);
    let c = Client::new();

    // 8 KiB: bodies up to 1 KiB are kept, five of them at a time (each is charged its key
    // and 384 bytes of overhead besides).
    let proxy = Proxy::start_with(
        &route("/", ""),
        &backend.origin(),
        "tag_memo_bytes = \"8KiB\"",
    )
    .await;
    for i in 0..20 {
        let r = c.get(&proxy.url(&format!("/{i}")), &[]).await;
        assert_eq!(r.etag(), proxy.tag_of([b'x'; 1024]));
        assert!(proxy.state.memo.bytes() <= 8 * 1024);
    }
    assert_eq!(proxy.state.memo.len(), 5);
    c.get(&proxy.url("/19"), &[]).await;
    assert_eq!(hits(&proxy), 1, "the newest copy is kept");
    c.get(&proxy.url("/0"), &[]).await;
    assert_eq!(hits(&proxy), 1, "the oldest went");
    backend.serve(&[b'y'; 1025]);
    c.get(&proxy.url("/big"), &[]).await;
    c.get(&proxy.url("/big"), &[]).await;
    assert_eq!(hits(&proxy), 1, "over an eighth of the budget: not kept");

    let off = Proxy::start_with(&route("/", ""), &backend.origin(), "tag_memo_bytes = 0").await;
    backend.serve(b"small");
    for _ in 0..3 {
        let r = c.get(&off.url("/a"), &[]).await;
        assert_eq!(r.etag(), off.tag_of("small"));
    }
    assert_eq!(hits(&off), 0);
    let misses = off.state.memo.stats.misses.load(Ordering::Relaxed);
    assert_eq!(misses, 0, "with copies off there is nothing to miss");
    assert_eq!(off.state.memo.bytes(), 0);
}

/// Clients choose URLs, and a key may be as long as a request head (a 50 KB query): each
/// copy is charged its key once, so the memo must hold one block of a URL's key however
/// often its copy is replaced (a body that changes on every read, a `Vary` by a header the
/// clients send in turns). The copies replaced must not each keep a key of their own: 40
/// URLs read 3 times each held 80 keys of 50 KB, 4 MB past what was charged.
#[tokio::test]
async fn a_copy_replaced_again_and_again_holds_its_long_key_once() {
    let backend = ChunkedBackend::start().await;
    backend.take_turns(&[b"one", b"two", b"three"], &[]);
    let proxy = Proxy::start_with(
        &route("/", ""),
        &backend.origin(),
        "tag_memo_bytes = \"8MiB\"",
    )
    .await;
    let c = Client::new();
    let query = "q".repeat(50_001);
    // The key is the origin, the path and the query; its block, `Arc<str>`'s counts besides.
    Blocks::watch(query.len(), query.len() + 100);
    let before = Blocks::live();
    let mut most = 0;
    for round in 0..3 {
        for i in 0..40 {
            let r = c.get(&proxy.url(&format!("/k{i}?{query}")), &[]).await;
            assert_eq!(r.status, 200);
            assert_eq!(r.etag(), proxy.tag_of(&r.body), "round {round}");
        }
        assert_eq!(proxy.state.memo.len(), 40, "every copy fits");
        most = most.max(Blocks::live() - before);
    }
    assert!(
        most <= 40 + 8,
        "{most} blocks of a key's size held for 40 copies, charged one key each"
    );
}

/// A copy's tag was made with the key of its day: after a reload with a new key, the same
/// bytes get the new key's tag.
#[tokio::test]
async fn a_new_tag_key_is_never_answered_with_a_copy_made_under_the_old_one() {
    let backend = ChunkedBackend::start().await;
    backend.serve(b"document");
    let keyed = |k: &str| format!("tag_key = \"{k}\"");
    let old_key = "old-key-0123456789abcdef0123456789abcdef";
    let proxy = Proxy::start_with(&route("/", ""), &backend.origin(), &keyed(old_key)).await;
    let c = Client::new();
    let old = c.get(&proxy.url("/a"), &[]).await.etag();
    assert_eq!(c.get(&proxy.url("/a"), &[]).await.etag(), old);
    assert_eq!(hits(&proxy), 1);

    let toml = format!(
        "[server]\nlisten = \"127.0.0.1:0\"\n{}\n{}",
        keyed("new-key-0123456789abcdef0123456789abcdef"),
        route("/", "").replace("{upstream}", &backend.origin())
    );
    proxy
        .state
        .reload(&ifmatch::config::Config::parse(&toml, "new.toml").unwrap());
    let new = c.get(&proxy.url("/a"), &[]).await.etag();
    assert_ne!(new, old);
    assert_eq!(new, proxy.tag_of("document"));
    assert_eq!(c.get(&proxy.url("/a"), &[]).await.etag(), new);
    assert_eq!(hits(&proxy), 2, "kept again under the new key");
}

/// Eight clients read one URL at once while its body changes under them (three bodies in
/// turn, the first most often; one differs from it in its last byte only, one is a prefix
/// of it). Copies are compared and replaced concurrently, and every response must still
/// carry the tag of exactly the bytes it came with.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_reads_of_a_changing_body_each_get_the_tag_of_their_bytes() {
    let backend = ChunkedBackend::start().await;
    let a = vec![b'a'; 5000];
    let mut b = a.clone();
    b[4999] = b'b';
    let c = a[..4000].to_vec();
    backend.take_turns(&[&a, &a, &a, &b, &a, &c], &[1000, 700]);
    let proxy = Arc::new(Proxy::start(&route("/", ""), &backend.origin()).await);
    let tasks: Vec<_> = (0..8)
        .map(|_| {
            let proxy = proxy.clone();
            tokio::spawn(async move {
                let c = Client::new();
                for _ in 0..40 {
                    let r = c.get(&proxy.url("/shared"), &[]).await;
                    assert_eq!(r.status, 200);
                    assert_eq!(r.etag(), proxy.tag_of(&r.body), "{} bytes", r.body.len());
                }
            })
        })
        .collect();
    for t in tasks {
        t.await.unwrap();
    }
    let m = &proxy.state.memo.stats;
    let (hit, missed) = (
        m.hits.load(Ordering::Relaxed),
        m.misses.load(Ordering::Relaxed),
    );
    assert_eq!(hit + missed, 320);
    assert!(hit > 0 && missed > 0, "{hit} hits, {missed} misses");
}

#[tokio::test]
async fn a_tag_puts_write_of_the_kept_bytes_takes_their_tag_without_hashing_them() {
    let backend = ChunkedBackend::start().await;
    backend.serve(b"the current bytes");
    // `cached`: the write is checked against the tag the GET left, with no GET of its own.
    let extra = "tag_puts = true\nvalidation = \"cached\"";
    let proxy = Proxy::start(&route("/", extra), &backend.origin()).await;
    let misses = |p: &Proxy| p.state.memo.stats.misses.load(Ordering::Relaxed);
    let c = Client::new();
    let tag = c.get(&proxy.url("/doc"), &[]).await.etag();
    assert_eq!(tag, proxy.tag_of("the current bytes"));
    let (hits_before, misses_before) = (hits(&proxy), misses(&proxy));

    let r = c
        .put(
            &proxy.url("/doc"),
            &[("if-match", &tag)],
            "the current bytes",
        )
        .await;
    assert_eq!(r.status, 200);
    assert_eq!(r.etag(), tag, "the tag of the bytes stored");
    assert_eq!(hits(&proxy), hits_before + 1, "compared with the copy");

    // Other bytes are hashed, and get their own tag.
    let r = c
        .put(&proxy.url("/doc"), &[("if-match", &tag)], "new bytes")
        .await;
    assert_eq!(r.status, 200);
    assert_eq!(r.etag(), proxy.tag_of("new bytes"));
    assert_eq!(hits(&proxy), hits_before + 1);
    assert_eq!(misses(&proxy), misses_before + 1, "hashed");
}
