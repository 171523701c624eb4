//! The per-request pipeline. It orchestrates the steps and decides nothing itself:
//!
//! 1. route the request (404 without a route);
//! 2. parse its preconditions (400 when malformed);
//! 3. GET/HEAD: forward, tag a 200 body as it streams, remember the tag, answer 304/412 if
//!    the preconditions say so;
//! 4. any other method: 428 if the route demands a precondition and none came; take the URL's
//!    write lock; learn the current state (revalidate or cached); 412 if a precondition
//!    fails; otherwise forward and pass the backend's answer (409 included) through.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use arc_swap::ArcSwap;
use bytes::Bytes;
use std::time::{Duration, Instant, SystemTime};

use http::header::{self, HeaderMap, HeaderName, HeaderValue, ETAG};
use http::request::Parts;
use http::response;
use http::{Method, Request, Response, StatusCode, Version};
use http_body::Body as _;
use hyper::body::Incoming;
use tracing::{debug_span, Instrument};

use crate::body::{
    read_request, read_tagged, ClientBody, Collected, Keep, ProxyBody, Read, ReadError,
};
use crate::budget::{Budget, Share};
use crate::config::{Config, Route, UpstreamEtag, Validation};
use crate::error::{Blame, Error};
use crate::etag::{ETag, TagKey};
use crate::framing::Verdict;
use crate::key::{normalize_path, ResourceKey};
use crate::lock::{WriteGuard, WriteLocks};
use crate::max_forwards::{take_hop, Hop};
use crate::memo::BodyMemo;
use crate::metrics::{Metrics, Unheld};
use crate::precondition::{evaluate, names_tags, Decision, HeaderError, Preconditions, Resource};
use crate::router::Router;
use crate::tags::{Known, TagStore, Ticket};
use crate::upstream::{self, Peer, UpstreamClient};

/// Everything a request needs, shared by all connections.
#[derive(Debug)]
pub struct Proxy {
    /// Swapped whole on reload: a request keeps the snapshot it started with.
    routing: ArcSwap<Routing>,
    /// The key used when the config names none: made once, so reloads keep it.
    random_key: TagKey,
    /// Tags and locks outlive reloads: their keys name upstream resources, not routes.
    pub tags: TagStore,
    /// Copies of tagged bodies, so that an unchanged one is compared, not hashed.
    pub memo: BodyMemo,
    pub locks: WriteLocks,
    pub metrics: Metrics,
    /// The bound on body bytes held by all requests at once (`max_buffered_bytes`).
    pub budget: Arc<Budget>,
    /// Counts the tag keys the process has used (`Routing::key_generation` of the newest),
    /// so that a tag made under an older one is not left in the cache (`record`).
    key_generation: AtomicU64,
    /// The drain ended with requests in flight: those dropped now were cut off by the
    /// proxy, not left by their clients.
    cutting: AtomicBool,
}

/// The part of the proxy that a config reload replaces.
#[derive(Debug)]
struct Routing {
    router: Router,
    upstream: UpstreamClient,
    tag_key: TagKey,
    /// The listener's TLS config: swapped by a reload like the rest (new certificates).
    tls: Option<Arc<rustls::ServerConfig>>,
    max_header_bytes: u64,
    max_request_body: u64,
    /// Which tag key this is, counted from the first (see `Proxy::key_generation`).
    key_generation: u64,
}

impl Routing {
    /// `previous`: the routing a reload replaces, whose upstream pools are kept where the
    /// new config would make them again.
    fn new(config: &Config, random_key: &TagKey, previous: Option<&Routing>) -> Self {
        let s = &config.server;
        let router = Router::new(config.routes.iter().cloned());
        for (host_route, other) in router.shadowed_host_routes() {
            tracing::warn!(
                host = host_route.host.as_deref().unwrap_or_default(),
                host_route = %host_route.prefix,
                taken_by = %other.prefix,
                upstream = %other.upstream.origin,
                "the route for any host on {} takes this host's requests under it from the \
                 host's route on {} (the longest prefix wins); give the host a route of its \
                 own on {} if that is not meant",
                other.prefix,
                host_route.prefix,
                other.prefix,
            );
        }
        Self {
            router,
            tag_key: s.tag_key.clone().unwrap_or_else(|| random_key.clone()),
            upstream: match previous {
                Some(p) => p.upstream.reloaded(config),
                None => UpstreamClient::new(config),
            },
            tls: s.tls.clone(),
            max_header_bytes: s.max_header_bytes,
            max_request_body: s.max_request_body,
            key_generation: 0,
        }
    }

    /// Refuses a request over the size limits before any work is done for it.
    fn check_limits(&self, req: &Parts) -> Result<(), Error> {
        if head_size(req) > self.max_header_bytes {
            return Err(Error::HeadersTooLarge {
                limit: self.max_header_bytes,
            });
        }
        if declared_length(&req.headers).is_some_and(|n| n > self.max_request_body) {
            return Err(Error::BodyTooLarge {
                limit: self.max_request_body,
            });
        }
        Ok(())
    }
}

/// The size of a request head as sent: request line and header lines.
fn head_size(req: &Parts) -> u64 {
    let uri = &req.uri;
    let target = uri.scheme_str().map_or(0, |s| s.len() + 3)
        + uri.authority().map_or(0, |a| a.as_str().len())
        + uri.path_and_query().map_or(1, |pq| pq.as_str().len());
    let line = req.method.as_str().len() + target + 12;
    let fields: usize = req
        .headers
        .iter()
        .map(|(n, v)| n.as_str().len() + v.len() + 4)
        .sum();
    (line + fields) as u64
}

/// What the proxy learnt of a resource before a write.
enum Current {
    Known(Resource),
    /// The revalidation GET got an answer that is neither 2xx nor 404/410: the writer gets it.
    Answer(Response<Incoming>),
}

/// A write's preconditions, evaluated: they hold (with the state they held against), or the
/// revalidation got an answer that goes to the writer as it is.
enum Checked {
    Holds(Resource),
    Answer(Response<ProxyBody>),
}

/// A write's body on its way upstream.
enum Outgoing {
    /// Streamed through as it arrives; `hashed` for `tag_puts`.
    Stream { hashed: bool },
    /// Read whole before the lock, holding its share of the budget until sent; with its
    /// tag for `tag_puts`.
    Whole(Bytes, Option<ETag>, Share),
}

/// What the access log and span report about one request, and its body until forwarded.
#[derive(Default)]
struct Exchange {
    route: Option<Arc<Route>>,
    upstream_status: Option<StatusCode>,
    outcome: &'static str,
    /// The proxy made the response itself (an error, a 304), rather than pass one on.
    by_proxy: bool,
    /// The client's body, until a path forwards it.
    body: Option<Incoming>,
    /// The client's body after a read-whole found no room for it (`read_request`): what
    /// was read, then the rest. Taken instead of `body`.
    /// Boxed: rare, and every request's future carries this.
    resumed: Option<Box<ClientBody>>,
    /// A path took the body while some of it was still to come: should the exchange fail,
    /// the rest is unread, and an HTTP/1.1 connection cannot take another request.
    streamed: bool,
    /// The client sent `Expect: 100-continue` (a header not passed on).
    expects_continue: bool,
    /// The client's HTTP version (the upstream request's is always 1.1).
    client_version: Version,
    /// The origin the client addressed, on a `preserve_host = false` route: the backend's
    /// `Location` is pointed back at it (`upstream::point_back`).
    client_origin: Option<String>,
}

impl Exchange {
    /// The body, for the one path that forwards it.
    fn take_body(&mut self) -> ClientBody {
        if let Some(rest) = self.resumed.take() {
            self.streamed = !rest.is_end_stream();
            return *rest;
        }
        let body = self.body.take();
        let body = body.expect("dispatch stores the body and only one path forwards it");
        self.streamed = !body.is_end_stream();
        ClientBody::new(body, self.client_version)
    }
}

/// The request id header edge proxies (Envoy, nginx's `$request_id`, load balancers) set.
const X_REQUEST_ID: header::HeaderName = header::HeaderName::from_static("x-request-id");

/// The most of a request body the proxy reads and drops to keep a connection open.
const DISCARD_LIMIT: u64 = 1 << 20;
/// How long it waits for each chunk of that body, and for all of it: nginx's
/// `lingering_timeout` and `lingering_time`. A slow client's body still arrives whole
/// (20 KB/s sends a megabyte in time); one that stops is let go.
const DISCARD_IDLE: Duration = Duration::from_secs(5);
const DISCARD_TIME: Duration = Duration::from_secs(30);

/// A request body the proxy answered without forwarding (412, 428, 400, 503…). An
/// HTTP/1.1 connection cannot take its next request until that body has been read, and
/// hyper would otherwise close it after the response without saying so, so a client that
/// reuses it races the close. A body of known size up to `DISCARD_LIMIT` is read and dropped
/// after the response and the connection stays open, as nginx does. A larger or chunked one,
/// or one the client sends only after a `100 Continue` (which must not follow a final
/// answer), closes the connection, and the response says `Connection: close`.
fn leave_unread(
    body: Incoming,
    version: Version,
    expects_continue: bool,
    rsp: &mut Response<ProxyBody>,
) {
    if version >= Version::HTTP_2 {
        return; // dropping it resets only this stream
    }
    let small = body.size_hint().upper().is_some_and(|n| n <= DISCARD_LIMIT);
    if expects_continue || !small {
        rsp.headers_mut()
            .insert(header::CONNECTION, HeaderValue::from_static("close"));
        return;
    }
    tokio::spawn(async move {
        use http_body_util::BodyExt;
        let mut body = body;
        let _ = tokio::time::timeout(DISCARD_TIME, async {
            while let Ok(Some(Ok(_))) = tokio::time::timeout(DISCARD_IDLE, body.frame()).await {}
        })
        .await;
    });
}

// === impl Proxy ===

impl Proxy {
    pub fn new(config: &Config) -> Self {
        let random_key = TagKey::random();
        if config.server.tag_key.is_none() {
            tracing::warn!(
                "no server.tag_key_file: tags use a random key, so they change on restart and \
                 differ between replicas; set a shared key in production"
            );
        }
        Self {
            routing: ArcSwap::from_pointee(Routing::new(config, &random_key, None)),
            random_key,
            tags: TagStore::new(config.server.tag_cache_entries),
            memo: BodyMemo::new(config.server.tag_memo_bytes),
            locks: WriteLocks::new(),
            metrics: Metrics::default(),
            budget: Budget::new(config.server.max_buffered_bytes),
            key_generation: AtomicU64::new(0),
            cutting: AtomicBool::new(false),
        }
    }

    /// The drain is over: requests still in flight are about to be dropped with their
    /// connections, and are logged as cut off by the shutdown.
    pub fn cut_off_in_flight(&self) {
        self.cutting.store(true, Ordering::Release);
    }

    /// The Prometheus text of `/metrics`: the counters, the caches' and budget's gauges,
    /// and those of `upstream_max_connections` when it is set.
    pub fn render_metrics(&self) -> String {
        let mut out = self.metrics.render(&self.tags, &self.memo, &self.budget);
        if let Some(cap) = self.routing.load().upstream.cap() {
            crate::metrics::write_connection_cap(&mut out, cap);
        }
        out
    }

    /// The TLS config for the next connection, when the listener is TLS.
    pub fn tls(&self) -> Option<Arc<rustls::ServerConfig>> {
        self.routing.load().tls.clone()
    }

    /// The key tags are made with now (tests compute expected tags with it).
    pub fn tag_key(&self) -> TagKey {
        self.routing.load().tag_key.clone()
    }

    /// Swaps in a new config's routes and upstream settings atomically. Requests in flight
    /// finish under the old ones. Locks are kept, and so is the tag cache (its size is not
    /// changed by a reload) unless the key changed or a route now trusts it where none did.
    pub fn reload(&self, config: &Config) {
        let current = self.routing.load_full();
        let mut new = Routing::new(config, &self.random_key, Some(&current));
        let changed = current.tag_key != new.tag_key;
        new.key_generation = self.key_generation.load(Ordering::SeqCst) + u64::from(changed);
        let new = Arc::new(new);
        // Judged before the swap, so that requests under the new routes meet the tags it
        // distrusts for as short a time as may be. (Reloads run one at a time.)
        let trusting = new.router.trusts_more_than(&current.router).cloned();
        let old = self.routing.swap(new.clone());
        self.budget.set_limit(config.server.max_buffered_bytes);
        if old.tag_key != new.tag_key {
            // Remembered tags were made with the old key; clients holding them get 412.
            // The count first, then the clear: see `record`.
            self.key_generation
                .store(new.key_generation, Ordering::SeqCst);
            self.tags.clear();
            self.memo.clear();
            tracing::info!(
                key = new.tag_key.fingerprint(),
                "tag key changed: tag cache cleared"
            );
        } else if let Some(route) = trusting {
            // Requests this route now takes were not all guarded before: writes may have
            // gone around the proxy, so what it remembers of them may be stale. The copies
            // stay; they vouch only for bytes compared in full.
            self.tags.clear();
            tracing::info!(
                prefix = %route.prefix,
                host = route.host.as_deref().unwrap_or("*"),
                upstream = %route.upstream.origin,
                "a route now trusts remembered tags where none did: tag cache cleared"
            );
        }
    }

    /// Answers one request. Never fails: errors become problem responses here. `framing` is
    /// the framing inspector's verdict on an HTTP/1 head: a refused one is answered (400 and
    /// close, since where the request ends is unknowable) and counted like any other.
    pub async fn handle(
        self: &Arc<Self>,
        req: Request<Incoming>,
        peer: Peer,
        framing: Verdict,
    ) -> Response<ProxyBody> {
        let start = Instant::now();
        // Context for what is logged while the request runs, at `debug` only: at `info` the
        // access line and a failure's line carry their own fields, and an entered span costs
        // more than the access line itself.
        let span = debug_span!("request", method = %req.method(), path = %req.uri().path());
        let version = req.version();
        // hyper's HTTP/2 server sends no `100 Continue`: an HTTP/2 client that asks for one
        // sends its body after its own timeout, so its write is read whole as any other.
        let expects_continue =
            version < Version::HTTP_2 && req.headers().contains_key(header::EXPECT);
        // The id an edge proxy or the client gave the request, to find its access line by;
        // looked up only when that line is written.
        let request_id = tracing::enabled!(target: "ifmatch::access", tracing::Level::INFO)
            .then(|| req.headers().get(X_REQUEST_ID).cloned())
            .flatten();
        // Counted and logged when the response head is ready, or, if hyper drops this future
        // first (the client closed its connection or reset its stream), when it is dropped.
        let mut pending = Pending {
            proxy: self,
            start,
            method: req.method().clone(),
            // A clone shares the URI's bytes, where a path `String` would be copied for
            // every request, logged or not.
            uri: req.uri().clone(),
            request_id,
            peer,
            ex: Exchange {
                expects_continue,
                client_version: version,
                ..Exchange::default()
            },
            done: false,
        };
        let Pending {
            ref peer,
            ref mut ex,
            ..
        } = pending;
        // A disabled span (logs at `info` or less) records nothing; its wrapper would still
        // cost a move of the whole request future. The future is made inside each branch: bound
        // to a name first, it would be kept twice in this one (rustc keeps a moved-from
        // local's space until its scope ends).
        let misframed = framing.is_err();
        let result = if let Err(e) = framing {
            Err(Error::BadFraming(e))
        } else if span.is_disabled() {
            self.dispatch(req, peer, ex).await
        } else {
            self.dispatch(req, peer, ex).instrument(span.clone()).await
        };
        let mut ends = misframed;
        let mut rsp = match result {
            Ok(rsp) => rsp,
            Err(e) => {
                // A body that failed on its way up (502, 504, 413 past the limit) is left
                // part-read: hyper would close the connection without a word, and a
                // request the client sent after it on the connection would go unanswered.
                ends |= (e.ends_connection() || ex.streamed) && version < Version::HTTP_2;
                ex.outcome = e.outcome();
                ex.by_proxy = true;
                let method = &pending.method;
                let (path, route) = (
                    pending.uri.path(),
                    ex.route.as_ref().map(|r| r.prefix.as_str()),
                );
                // A backend that fails or a proxy limit is worth an operator's look, as in
                // nginx's error log; a client's mistake is the client's to see.
                match e.blame() {
                    Blame::Proxy | Blame::Upstream => {
                        let route = route.unwrap_or("-");
                        tracing::warn!(parent: &span, route, %method, path, error = %e, "request failed")
                    }
                    Blame::Client => tracing::debug!(parent: &span, error = %e, "request refused"),
                }
                e.into_response_to(method)
            }
        };
        if let (Some(origin), Some(route)) = (&ex.client_origin, &ex.route) {
            upstream::point_back(rsp.headers_mut(), route, origin);
        }
        if ends {
            rsp.headers_mut()
                .insert(header::CONNECTION, HeaderValue::from_static("close"));
        } else if let Some(body) = ex.body.take().filter(|b| !b.is_end_stream()) {
            leave_unread(body, version, expects_continue, &mut rsp);
        }
        let bytes = http_body::Body::size_hint(rsp.body()).exact();
        pending.finish(rsp.status().as_u16(), bytes);
        rsp
    }

    async fn dispatch(
        self: &Arc<Self>,
        req: Request<Incoming>,
        peer: &Peer,
        ex: &mut Exchange,
    ) -> Result<Response<ProxyBody>, Error> {
        // The body waits in `ex` until a path forwards it; whatever is left is dealt with
        // once the response is known (`leave_unread`).
        let (mut parts, body) = req.into_parts();
        ex.body = Some(body);
        crate::framing::check_codings(&parts.headers)?;
        // A tunnel has no representation to tag, and a backend given `CONNECT /` (its
        // authority-form target turned origin-form) could only misread it. A backend that
        // answers TRACE echoes the request back, `Cookie` and `Authorization` included
        // (cross-site tracing): nginx refuses it too.
        // In any case, as `requires_precondition`: a backend that upper-cases methods would
        // run `trace` as TRACE.
        let m = parts.method.as_str();
        if m.eq_ignore_ascii_case("CONNECT") || m.eq_ignore_ascii_case("TRACE") {
            return Err(Error::MethodNotSupported {
                method: parts.method,
            });
        }
        let routing = self.routing.load_full();
        crate::host::check_target(&parts)?;
        let host = crate::host::check(&parts)?;
        let rt = &*routing;
        let path = normalize_path(parts.uri.path());
        // Routed before the limits are checked, so that a 413 or 431 is counted and logged
        // under its route.
        ex.route = routing
            .router
            .route(request_host(&parts, host.as_ref()), &path)
            .cloned();
        routing.check_limits(&parts)?;
        let route = ex.route.clone().ok_or_else(|| Error::NoRoute {
            path: parts.uri.path().to_owned(),
        })?;
        if parts.method == Method::OPTIONS && take_hop(&mut parts.headers)? == Hop::Answer {
            ex.outcome = "max_forwards";
            ex.by_proxy = true;
            return Ok(Response::new(ProxyBody::empty()));
        }
        let pre = Preconditions::parse(&parts.headers)?;
        let key = ResourceKey::new(&route.upstream, &path, parts.uri.query());
        if !route.preserve_host {
            ex.client_origin = upstream::client_origin(&parts, host.as_ref(), peer);
        }
        upstream::prepare(&mut parts, host, &route, peer);
        if matches!(parts.method, Method::GET | Method::HEAD) {
            self.read(rt, &route, &key, &pre, parts, ex).await
        } else {
            // Boxed: the write path's future (lock wait, revalidation, forward) is twice the
            // read path's, and every GET would otherwise carry and move that space.
            Box::pin(self.write(&routing, &route, &key, &pre, parts, ex)).await
        }
    }

    /// GET and HEAD: forward as a GET, tag a 200 body, then answer 200, 304 or 412.
    #[allow(clippy::too_many_arguments)]
    async fn read(
        &self,
        rt: &Routing,
        route: &Route,
        key: &ResourceKey,
        pre: &Preconditions,
        mut parts: Parts,
        ex: &mut Exchange,
    ) -> Result<Response<ProxyBody>, Error> {
        // HEAD is sent as a GET so that it gets the tag a GET would give.
        let head = parts.method == Method::HEAD;
        parts.method = Method::GET;
        strip_evaluated(&mut parts.headers, pre, true);
        let authorized = parts.headers.contains_key(header::AUTHORIZATION);
        let ticket = self.tags.ticket();
        let mut req = Box::new(Request::from_parts(
            parts,
            rt.upstream.limit(ex.take_body()),
        ));
        // hyper's client sends a GET body of unknown length (chunked, or HTTP/2 with no
        // `content-length`) as no body at all unless the head says chunked: it goes up
        // chunked, as any other method's does, not dropped.
        if !req.body().is_end_stream() && req.body().size_hint().exact().is_none() {
            req.headers_mut().insert(
                header::TRANSFER_ENCODING,
                HeaderValue::from_static("chunked"),
            );
        }
        // A GET whose answer turns on the tag (`If-Match`, `If-None-Match`) must be judged
        // by it even when its body finds no room in `max_buffered_bytes`: it is then hashed
        // without being held, and a 200 is sent from a second fetch (`send_again`), for
        // which its head is kept. Without a tag, a current `If-Match` would get a false 412
        // and a current `If-None-Match` a whole body instead of a 304.
        // Boxed: the read's future carries it across the exchange, and every GET moves that.
        let again = (!head && pre.compares_tags())
            .then(|| Box::new(crate::pool::head_only(&req)))
            .filter(|_| req.body().is_end_stream());
        let rsp = self.send(rt, route, req).await?;
        ex.upstream_status = Some(rsp.status());
        if !whole_representation(&rsp) {
            ex.outcome = "passthrough";
            return Ok(pass_read(rsp, head, route));
        }
        let (mut rparts, rbody) = rsp.into_parts();
        // A HEAD's body is read only for its tag: with no room in the budget it is hashed
        // and let go, and the HEAD still gets the tag a GET would.
        let tag_only = head || again.is_some();
        let read = self.tag(
            rt,
            route,
            key,
            ticket,
            &mut rparts,
            rbody,
            tag_only,
            authorized,
        );
        let (current, body) = read.await?;
        if body.is_none() && !head {
            self.over_budget(route, Unheld::Response);
        }
        match evaluate(pre, true, &current) {
            Decision::Proceed => {
                ex.outcome = if current.tag.is_some() {
                    "tagged"
                } else {
                    "untagged"
                };
                let body = if head {
                    // The length a GET's answer would have, known once the body was held
                    // whole (a chunked one's, whose head had none), as RFC 9110 §9.3.2 asks.
                    let held = body
                        .as_ref()
                        .and_then(|b| http_body::Body::size_hint(b).exact());
                    if let Some(n) =
                        held.filter(|_| !rparts.headers.contains_key(header::CONTENT_LENGTH))
                    {
                        rparts
                            .headers
                            .insert(header::CONTENT_LENGTH, HeaderValue::from(n));
                    }
                    ProxyBody::empty()
                } else if let Some(body) = body {
                    body
                } else {
                    // `tag` hashes without holding only when `again` is kept, and then
                    // always finds the tag.
                    let (Some(again), Some(tag)) = (again, current.tag) else {
                        unreachable!("a GET hashed without being held")
                    };
                    // Boxed: rare, and its future would otherwise grow every GET's.
                    return Box::pin(self.send_again(rt, route, again, tag, pre, ex)).await;
                };
                Ok(Response::from_parts(rparts, body))
            }
            Decision::NotModified => {
                ex.outcome = "not_modified";
                ex.by_proxy = true;
                Ok(not_modified(&rparts))
            }
            Decision::PreconditionFailed => Err(Error::PreconditionFailed {
                current: current.tag,
            }),
        }
    }

    /// Sends a GET judged by tags again, its first body having been hashed without being
    /// held (see `read`), and sends the new body on. A response that is no longer a whole
    /// 200 passes through as it is; an empty one is whole already, and is judged again on
    /// its own tag.
    ///
    /// Under the judged `tag` only for an `If-Match` naming tags, whose client asked for that
    /// representation and no other, and only where a cut is visible (a declared length,
    /// chunked or HTTP/2; not HTTP/1.0's close-delimited body): it is checked on its way, and
    /// should the representation have changed in between it is cut before its end, never
    /// sent whole under a tag that does not name it. Any other is sent untagged, as a body
    /// with no room always was: a backend whose bytes differ on every read (a timestamp in
    /// the body) then still gets its whole 200s.
    async fn send_again(
        &self,
        rt: &Routing,
        route: &Route,
        req: Box<Request<upstream::UpstreamBody>>,
        tag: ETag,
        pre: &Preconditions,
        ex: &mut Exchange,
    ) -> Result<Response<ProxyBody>, Error> {
        let rsp = self.send(rt, route, req).await?;
        ex.upstream_status = Some(rsp.status());
        if !whole_representation(&rsp) {
            ex.outcome = "passthrough";
            return Ok(pass_read(rsp, false, route));
        }
        let (mut rparts, body) = rsp.into_parts();
        rparts.headers.remove(ETAG);
        if body.is_end_stream() {
            // hyper sends no byte of an empty body, so it would never be checked.
            let empty = rt.tag_key.hasher().finish();
            let current = Resource {
                exists: true,
                tag: Some(empty.clone()),
                last_modified: last_modified(&rparts.headers),
            };
            return match evaluate(pre, true, &current) {
                Decision::Proceed => {
                    rparts.headers.insert(ETAG, empty.to_header());
                    Ok(Response::from_parts(rparts, ProxyBody::empty()))
                }
                Decision::NotModified => {
                    rparts.headers.insert(ETAG, empty.to_header());
                    ex.outcome = "not_modified";
                    ex.by_proxy = true;
                    Ok(not_modified(&rparts))
                }
                Decision::PreconditionFailed => Err(Error::PreconditionFailed {
                    current: Some(empty),
                }),
            };
        }
        let cut_is_visible =
            body.size_hint().exact().is_some() || ex.client_version != Version::HTTP_10;
        let idle = route.upstream_timeout;
        if !(names_tags(&pre.if_match) && cut_is_visible) {
            ex.outcome = "untagged";
            return Ok(Response::from_parts(rparts, ProxyBody::stream(body, idle)));
        }
        // Its trailers are dropped with the check: none are announced.
        rparts.headers.remove(header::TRAILER);
        rparts.headers.insert(ETAG, tag.to_header());
        let hasher = rt.tag_key.hasher();
        let body = ProxyBody::checked(body, idle, hasher, tag);
        Ok(Response::from_parts(rparts, body))
    }

    /// Every other method: the guarded write path.
    #[allow(clippy::too_many_arguments)]
    async fn write(
        self: &Arc<Self>,
        rt: &Arc<Routing>,
        route: &Arc<Route>,
        key: &ResourceKey,
        pre: &Preconditions,
        parts: Parts,
        ex: &mut Exchange,
    ) -> Result<Response<ProxyBody>, Error> {
        if route.require_precondition && requires_precondition(&parts) && !pre.guards_write() {
            return Err(Error::PreconditionRequired {
                method: parts.method.clone(),
            });
        }
        let changes = changes_state(&parts.method);
        // Not for a resource the upstream tags itself: a GET would give its tag, not ours.
        let tag_put = route.tag_puts && stores_verbatim(&parts) && !self.tags.upstream_tags(key);
        // A write's body of known size within `max_tag_body` is read whole before the lock
        // (as nginx buffers request bodies): a client slow to send it then holds up no other
        // writer of the URL, and a `tag_puts` PUT's tag is known before the lock is chosen.
        // Not one that waits for `100 Continue`: it sends its body only once its
        // preconditions have passed, and a 412 spares it the upload.
        // Its bytes count in `max_buffered_bytes` as they arrive; past it, the rest streams
        // (after what was read) as a larger body does.
        // So is one of unknown length (chunked, or HTTP/2 without `content-length`) until it
        // proves longer: it then goes up with a `Content-Length`, as nginx sends bodies it
        // buffered, where many legacy backends mishandle a chunked request body or refuse it
        // (411). Past `max_tag_body` it streams on; past `max_request_body` it is a 413.
        // Not one that announces trailers (`Trailer`): a body read whole goes up without
        // them, so it streams, and they reach the backend.
        let read_whole = changes
            && !ex.expects_continue
            && !parts.headers.contains_key(header::TRAILER)
            && declared_length(&parts.headers).is_none_or(|n| n <= route.max_tag_body);
        let outgoing = if read_whole {
            let mut share = self.budget.share();
            let limits = (route.max_tag_body, rt.max_request_body);
            let body = ex.take_body();
            match read_request(body, route.upstream_timeout, limits, &mut share).await? {
                Read::Whole(body) => {
                    ex.streamed = false; // read to its end
                    if route.require_precondition
                        && !pre.guards_write()
                        && form_overrides(&parts, &body)
                    {
                        return Err(Error::PreconditionRequired {
                            method: parts.method.clone(),
                        });
                    }
                    let tag = tag_put.then(|| self.put_tag(rt, key, &body));
                    Outgoing::Whole(body, tag, share)
                }
                Read::NoRoom(rest) => {
                    self.over_budget(route, Unheld::Request);
                    ex.resumed = Some(rest);
                    Outgoing::Stream { hashed: tag_put }
                }
                Read::TooSlow(rest) | Read::TooLong(rest) => {
                    ex.resumed = Some(rest);
                    Outgoing::Stream { hashed: tag_put }
                }
            }
        } else {
            Outgoing::Stream { hashed: tag_put }
        };
        let started = Instant::now();
        // Time spent waiting for locks, not checking under them; observed once a write has
        // its lock or has given up on it (a 503 is the longest wait of all).
        let mut waited = Duration::ZERO;
        // A PUT of the very bytes whose tag it names leaves the state as it found it, so
        // such writes share the lock and run side by side: none can undo another, and a
        // write that changes the state still runs alone. Whether the bytes are the current
        // ones is known only under the lock; when they are not, the write queues to run
        // alone and is checked again.
        if let Outgoing::Whole(_, Some(tag), _) = &outgoing {
            if pre.only_matches(tag) {
                let shared = self.locks.acquire_shared(key, route.lock_timeout).await;
                waited += started.elapsed();
                let guard = match shared {
                    Ok(guard) => guard,
                    Err(timeout) => {
                        self.metrics.lock_wait(waited);
                        return Err(timeout);
                    }
                };
                let current = match self.check(rt, route, key, pre, &parts, ex).await {
                    Ok(Checked::Holds(current)) => current,
                    // The revalidation's own answer, or a 412 or a failure.
                    Ok(Checked::Answer(rsp)) => {
                        self.metrics.lock_wait(waited);
                        return Ok(rsp);
                    }
                    Err(e) => {
                        self.metrics.lock_wait(waited);
                        return Err(e);
                    }
                };
                if current.tag.as_ref().is_some_and(|c| c.strong_eq(tag)) {
                    self.metrics.lock_wait(waited);
                    self.metrics.unchanged_write(&route.metric_labels);
                    let guard = Some(guard);
                    let rsp = self.forward(rt, route, key, pre, parts, outgoing, guard, true, ex);
                    return rsp.await;
                }
                drop(guard);
            }
        }
        // From here until the backend has answered, no other write to this URL runs, nor to
        // the destination of a COPY or MOVE, which the write changes too.
        let guard = match changes {
            true => {
                // What is left of the wait after a try at sharing the lock.
                let wait = route.lock_timeout.saturating_sub(started.elapsed());
                let to = destination_key(&parts, route)?;
                let queued = Instant::now();
                let guard = match to {
                    Some(to) => self.locks.acquire_both(key, &to, wait).await,
                    None => self.locks.acquire(key, wait).await,
                };
                self.metrics.lock_wait(waited + queued.elapsed());
                Some(guard.map_err(|_| Error::LockTimeout(route.lock_timeout))?)
            }
            false => None,
        };
        if pre.guards_write() {
            if let Checked::Answer(rsp) = self.check(rt, route, key, pre, &parts, ex).await? {
                return Ok(rsp);
            }
        }
        self.forward(rt, route, key, pre, parts, outgoing, guard, false, ex)
            .await
    }

    /// Evaluates a write's preconditions against the resource's current state, under the
    /// caller's lock: the state, if they hold; a 412 if not; or the revalidation's own
    /// answer for the writer. The state is the remembered tag under `cached` (not per user),
    /// else what a revalidation GET finds.
    ///
    /// A remembered tag of one representation among several (`Known::negotiated`: gzip for
    /// one client, identity for another) that fails the preconditions does not decide: the
    /// writer may hold another representation's tag for the same state. A revalidation with
    /// the writer's own request head then fetches the representation it would be given,
    /// and that decides; a 412 names its tag. Nor does one that passes an `If-None-Match`
    /// naming tags: they may name the writer's representation of the current state.
    async fn check(
        &self,
        rt: &Routing,
        route: &Route,
        key: &ResourceKey,
        pre: &Preconditions,
        parts: &Parts,
        ex: &mut Exchange,
    ) -> Result<Checked, Error> {
        let mut remembered = (route.validation == Validation::Cached && !route.per_user)
            .then(|| {
                // A tag remembered from a PUT may come without the date the backend gave the
                // new representation: a date condition then needs the backend's answer.
                let usable = |k: &Known| k.last_modified.is_some() || !pre.compares_dates();
                self.tags.get(key).filter(usable)
            })
            .flatten();
        loop {
            let negotiated = remembered.as_ref().is_some_and(|k| k.negotiated);
            let current = match remembered.take() {
                Some(known) => Resource {
                    exists: true,
                    tag: Some(known.tag),
                    last_modified: known.last_modified,
                },
                None => match self.revalidate(rt, route, key, parts, ex).await? {
                    Current::Known(resource) => resource,
                    Current::Answer(rsp) => {
                        ex.upstream_status = Some(rsp.status());
                        ex.outcome = "revalidation_refused";
                        return Ok(Checked::Answer(pass_read(rsp, false, route)));
                    }
                },
            };
            match evaluate(pre, false, &current) {
                // An `If-None-Match` tag that differs from one representation's may still
                // be another's: a pass is confirmed too.
                Decision::Proceed if negotiated && names_tags(&pre.if_none_match) => continue,
                // A date condition is ignored when there is no date to judge (§13.1.4): on
                // a route that requires a precondition, that write would overwrite the
                // resource unguarded. (A create, with no resource to judge, goes on as the
                // condition asks: only `If-None-Match: *` guards it against another.)
                Decision::Proceed
                    if current.exists
                        && current.last_modified.is_none()
                        && pre.guards_only_by_date()
                        && route.require_precondition
                        && requires_precondition(parts) =>
                {
                    return Err(Error::PreconditionUndated {
                        method: parts.method.clone(),
                    })
                }
                Decision::Proceed => return Ok(Checked::Holds(current)),
                // `remembered` is taken: the next turn revalidates.
                _ if negotiated => continue,
                _ => {
                    return Err(Error::PreconditionFailed {
                        current: current.tag,
                    })
                }
            }
        }
    }

    /// Sends a write upstream under its URL's lock (`guard`; none for a method that changes
    /// nothing), and records what it did to the resource's tag. The lock is let go when this
    /// returns, or, if the client leaves first, once the backend has answered (`InFlight`).
    /// `shared`: the write holds the lock beside others that send the current bytes again.
    #[allow(clippy::too_many_arguments)]
    async fn forward(
        self: &Arc<Self>,
        rt: &Arc<Routing>,
        route: &Arc<Route>,
        key: &ResourceKey,
        pre: &Preconditions,
        mut parts: Parts,
        outgoing: Outgoing,
        guard: Option<WriteGuard>,
        shared: bool,
        ex: &mut Exchange,
    ) -> Result<Response<ProxyBody>, Error> {
        strip_evaluated(&mut parts.headers, pre, false);
        let changes = changes_state(&parts.method);
        let destination = destination_key(&parts, route)?;
        let invalidation = changes.then(|| Invalidation {
            proxy: self.clone(),
            keys: [Some(key.clone()), destination],
        });
        // A whole body's share of the budget is given back once the backend has answered:
        // by then it has been sent, or never will be.
        let (body, sent, held) = match outgoing {
            Outgoing::Whole(body, tag, share) => {
                // With its length, declared or not (see `dispatch`); an empty one only where
                // the method defines content (RFC 9110 §8.6): hyper's client sends neither
                // a length nor chunks for an empty PUT, which some backends answer 411.
                let defines_content =
                    [Method::POST, Method::PUT, Method::PATCH].contains(&parts.method);
                if !parts.headers.contains_key(header::CONTENT_LENGTH)
                    && (!body.is_empty() || defines_content)
                {
                    let length = HeaderValue::from(body.len());
                    parts.headers.insert(header::CONTENT_LENGTH, length);
                }
                let sent = tag.map(|t| Arc::new(t.into()));
                (upstream::whole(body), sent, Some(share))
            }
            Outgoing::Stream { hashed: true } => {
                let hasher = rt.tag_key.hasher();
                let (body, sent) = rt.upstream.limit_hashed(ex.take_body(), hasher);
                (body, Some(sent), None)
            }
            Outgoing::Stream { hashed: false } => (rt.upstream.limit(ex.take_body()), None, None),
        };
        // A shared write sends bytes equal to the current ones, so a read in flight records
        // the right tag whenever it lands. What must not be overwritten is a mark left by
        // another shared write that failed while this one was on its way: its effects may
        // have landed after this one's.
        let sending = shared.then(|| self.tags.ticket());
        let req = Box::new(Request::from_parts(parts, body));
        let (me, rt2, route2) = (self.clone(), rt.clone(), route.clone());
        let mut in_flight = InFlight {
            answer: Some(Box::pin(async move { me.send(&rt2, &route2, req).await })),
            invalidation,
            guard,
            held,
        };
        let mut rsp = in_flight.answer().await?;
        in_flight.held = None;
        // Declared after `in_flight`, so dropped before it lets the lock go.
        let mut invalidation = in_flight.invalidation.take();
        ex.upstream_status = Some(rsp.status());
        ex.outcome = "forwarded";
        // A 4xx (409 Conflict among them) means the backend refused: the state is unchanged.
        if rsp.status().is_client_error() {
            if let Some(i) = invalidation.take() {
                i.disarm();
            }
        }
        // A tag of the backend's that its GETs' would be replaced by means nothing here.
        if route.upstream_etag == UpstreamEtag::Replace {
            rsp.headers_mut().remove(ETAG);
        }
        // `tag_puts`: the backend stored the body that went up, so its tag is the new tag.
        // Only when the whole body went up, the backend says it is done, and it keeps no
        // validator of its own.
        let stored = matches!(
            rsp.status(),
            StatusCode::OK | StatusCode::CREATED | StatusCode::NO_CONTENT
        ) && !rsp.headers().contains_key(ETAG);
        if let Some(tag) = sent.and_then(|s| s.get().cloned()).filter(|_| stored) {
            if let Some(i) = invalidation.take() {
                i.disarm();
            }
            // Recorded under the lock, with a ticket newer than any read in flight: a read
            // that fetched the old body cannot put its tag back. (A shared write's ticket is
            // the one taken before it was sent, above.)
            // Not known to be negotiated: the PUT's bytes are one representation, and a GET
            // that finds several records that when it comes.
            let known = Known {
                tag: tag.clone(),
                last_modified: last_modified(rsp.headers()),
                from_upstream: false,
                negotiated: false,
            };
            let ticket = sending.unwrap_or_else(|| self.tags.ticket());
            self.record(rt, key, known, ticket);
            rsp.headers_mut().insert(ETAG, tag.to_header());
            ex.outcome = match shared {
                true => "forwarded_unchanged",
                false => "forwarded_tagged",
            };
        }
        Ok(pass(rsp, false, route))
    }

    /// Sends a request upstream, timing it to the response head.
    async fn send(
        &self,
        rt: &Routing,
        route: &Route,
        req: Box<Request<upstream::UpstreamBody>>,
    ) -> Result<Response<Incoming>, Error> {
        let start = Instant::now();
        let rsp = rt.upstream.send(route, req).await?;
        self.metrics
            .upstream_latency(&route.metric_labels, start.elapsed());
        Ok(rsp)
    }

    /// Fetches the current representation with the writer's own request head and tags it.
    async fn revalidate(
        &self,
        rt: &Routing,
        route: &Route,
        key: &ResourceKey,
        parts: &Parts,
        ex: &mut Exchange,
    ) -> Result<Current, Error> {
        let ticket = self.tags.ticket();
        self.metrics.revalidation(&route.metric_labels);
        let rsp = self
            .send(rt, route, Box::new(upstream::revalidation_request(parts)))
            .await?;
        ex.upstream_status = Some(rsp.status());
        let status = rsp.status();
        if matches!(status, StatusCode::NOT_FOUND | StatusCode::GONE) {
            return Ok(Current::Known(Resource::default()));
        }
        if !status.is_success() {
            return Ok(Current::Answer(rsp));
        }
        if status != StatusCode::OK {
            // Another 2xx: the resource exists, and its body is no representation to tag.
            return Ok(Current::Known(Resource {
                exists: true,
                tag: None,
                last_modified: last_modified(rsp.headers()),
            }));
        }
        let (mut rparts, rbody) = rsp.into_parts();
        let authorized = parts.headers.contains_key(header::AUTHORIZATION);
        let read = self.tag(rt, route, key, ticket, &mut rparts, rbody, true, authorized);
        let (current, _) = read.await?;
        Ok(Current::Known(current))
    }

    /// Records what a GET (read or revalidation) learnt of a resource, if its response may
    /// be shared (`cacheable`), and returns its tag for evaluating the request.
    fn remember(
        &self,
        rt: &Routing,
        key: &ResourceKey,
        shared: bool,
        known: Option<Known>,
        ticket: Ticket,
    ) -> Option<ETag> {
        let known = known?;
        let tag = known.tag.clone();
        if shared {
            self.record(rt, key, known, ticket);
        }
        Some(tag)
    }

    /// Records a tag made with `rt`'s key. A request that began before a reload changed the
    /// key (a write waiting for its lock, a PUT in flight) makes its tags with the old one,
    /// under a ticket that may postdate the reload's clear: such a tag is dropped. The
    /// reload counts the new key before it clears, and the clear takes each entry's lock:
    /// a record the clear went past sees the new count here; one it did not, it removes.
    fn record(&self, rt: &Routing, key: &ResourceKey, known: Known, ticket: Ticket) {
        self.tags.record(key, known, ticket);
        if self.key_generation.load(Ordering::SeqCst) != rt.key_generation {
            self.tags.invalidate(key);
        }
    }

    /// Tags a 200 read from the upstream (a GET, or a revalidation) and records what it
    /// learnt (`remember`). The tag is the upstream's own strong tag if it sent one, else the
    /// hash of the body if it fits the route's limit; the `ETag` header is set to it (a weak
    /// upstream tag, which cannot stand for the proxy's validator, is removed). A response
    /// that may be shared (`cacheable`) is compared with the memo's copy, not hashed, when
    /// there is one; one that may not never is: how long the comparison takes would tell how
    /// much of it matched another user's body. Returns the resource as the response shows it,
    /// and the body to send on.
    ///
    /// A body held counts against `max_buffered_bytes`. One that finds no room there is
    /// sent on untagged, as a body over the limit is; one read only for its tag (`tag_only`:
    /// a revalidation, a HEAD, a GET judged by tags) is hashed without being held, and so
    /// is tagged all the same: its body is then `None`.
    #[allow(clippy::too_many_arguments)]
    async fn tag(
        &self,
        rt: &Routing,
        route: &Route,
        key: &ResourceKey,
        ticket: Ticket,
        rparts: &mut response::Parts,
        body: Incoming,
        tag_only: bool,
        authorized: bool,
    ) -> Result<(Resource, Option<ProxyBody>), Error> {
        let last_modified = last_modified(&rparts.headers);
        let (shared, negotiated) = cacheable(route, &rparts.headers, authorized);
        let idle = route.upstream_timeout;
        let (tag, from_upstream, body) = 'read: {
            let kept = route.upstream_etag == UpstreamEtag::Keep;
            if let Some(tag) = upstream_strong_tag(&rparts.headers).filter(|_| kept) {
                break 'read (Some(tag), true, Some(ProxyBody::stream(body, idle)));
            }
            rparts.headers.remove(ETAG);
            // The declared length, as hyper read it from `Content-Length` (parsing it again
            // was 230 instructions a GET).
            let declared = body.size_hint().exact();
            if declared.is_some_and(|n| n > route.max_tag_body) {
                self.metrics.untagged_large_body(&route.metric_labels);
                break 'read (None, false, Some(ProxyBody::stream(body, idle)));
            }
            // A body of known size takes its whole share now, so that one without room
            // streams from its first byte; any other grows its share chunk by chunk.
            let share = match declared {
                Some(n) => self.budget.take(usize::try_from(n).unwrap_or(usize::MAX)),
                None => Some(self.budget.share()),
            };
            // Read only for its tag, a body whose size is known not to fit is hashed
            // without holding any of it: growing its share chunk by chunk, it would take
            // the room left from bodies that fit, only to let it go at its end.
            let (share, keep) = match share {
                Some(share) if tag_only => (share, Keep::WhileRoom),
                Some(share) => (share, Keep::ToSend),
                None if tag_only => (self.budget.share(), Keep::Nothing),
                None => {
                    self.over_budget(route, Unheld::Response);
                    break 'read (None, false, Some(ProxyBody::stream(body, idle)));
                }
            };
            let upstream = || route.upstream.origin.clone();
            let hasher = rt.tag_key.hasher();
            let memo = shared.then(|| self.memo.get(key, &rt.tag_key)).flatten();
            let limit = route.max_tag_body;
            match read_tagged(body, hasher, memo, limit, idle, share, keep).await {
                Ok(Collected::Whole {
                    chunks,
                    held,
                    kept,
                    tag,
                    remembered,
                    dropped_trailers,
                }) => {
                    let header = if let Some(memo) = remembered {
                        self.memo.stats.hits.fetch_add(1, Ordering::Relaxed);
                        memo.header.clone()
                    } else {
                        let header = tag.to_header();
                        // Not a body that was hashed without being held: no copy to keep.
                        if shared && self.memo.is_on() && kept {
                            self.memo.stats.misses.fetch_add(1, Ordering::Relaxed);
                            let (t, h) = (tag.clone(), header.clone());
                            self.memo.put(key, &chunks, t, h, &rt.tag_key);
                        }
                        header
                    };
                    rparts.headers.insert(ETAG, header);
                    // Read whole, it goes out with a length, without its trailers: they are
                    // no longer announced.
                    if dropped_trailers {
                        rparts.headers.remove(header::TRAILER);
                    }
                    let body = kept.then(|| ProxyBody::chunks(chunks, Some(held), None, idle));
                    (Some(tag), false, body)
                }
                Ok(Collected::TooLarge { chunks, held, rest }) => {
                    let body = ProxyBody::chunks(chunks, Some(held), Some(rest), idle);
                    (None, false, Some(body))
                }
                Ok(Collected::OverBudget { chunks, held, rest }) => {
                    self.over_budget(route, Unheld::Response);
                    let body = ProxyBody::chunks(chunks, Some(held), Some(rest), idle);
                    (None, false, Some(body))
                }
                Err(ReadError::Stalled(after)) => {
                    return Err(Error::UpstreamTimeout {
                        upstream: upstream(),
                        after,
                    })
                }
                Err(ReadError::Failed(e)) => {
                    return Err(Error::Upstream {
                        upstream: upstream(),
                        reason: format!("the response body was cut short: {e}"),
                    })
                }
            }
        };
        let known = tag.map(|tag| Known {
            tag,
            last_modified,
            from_upstream,
            negotiated,
        });
        let resource = Resource {
            exists: true,
            last_modified,
            tag: self.remember(rt, key, shared, known, ticket),
        };
        Ok((resource, body))
    }

    /// A body found no room in `max_buffered_bytes`: counted, and logged now and then.
    fn over_budget(&self, route: &Route, body: Unheld) {
        self.metrics.over_budget(&route.metric_labels, body);
        if self.budget.warn_due() {
            tracing::warn!(
                route = %route.prefix,
                body = body.as_str(),
                held = self.budget.held(),
                limit = self.budget.limit(),
                "max_buffered_bytes reached: GET bodies stream through untagged and write \
                 bodies stream unbuffered until memory frees (ifmatch_over_budget_bodies_total \
                 counts them; this line comes at most once a minute)"
            );
        }
    }

    /// The tag of a `tag_puts` PUT's body. Equal to the URL's kept copy (a rewrite of the
    /// bytes last read, or a retried write), it is the copy's: a compare, where hashing a
    /// 256 KiB body takes ~155 µs. Counted as a GET's body is.
    fn put_tag(&self, rt: &Routing, key: &ResourceKey, body: &Bytes) -> ETag {
        if !self.memo.is_on() {
            return rt.tag_key.tag_of(body);
        }
        match self.memo.get(key, &rt.tag_key) {
            Some(m) if m.body == *body => {
                self.memo.stats.hits.fetch_add(1, Ordering::Relaxed);
                m.tag.clone()
            }
            _ => {
                self.memo.stats.misses.fetch_add(1, Ordering::Relaxed);
                rt.tag_key.tag_of(body)
            }
        }
    }
}

/// Drops the remembered tags of a write's targets when it ends, unless disarmed because the
/// backend refused the write. Being a guard, it also fires when the write fails or its client
/// leaves: the outcome is then unknown, so the tag must go. Once the write is sent, that is
/// when the backend has answered (`InFlight`), not when the client left.
struct Invalidation {
    proxy: Arc<Proxy>,
    keys: [Option<ResourceKey>; 2],
}

impl Invalidation {
    fn disarm(mut self) {
        self.keys = [None, None];
    }
}

impl Drop for Invalidation {
    fn drop(&mut self) {
        for key in self.keys.iter().flatten() {
            self.proxy.tags.invalidate(key);
        }
    }
}

/// The backend's answer to a write sent under its URL's lock.
type Answer = Pin<Box<dyn Future<Output = Result<Response<Incoming>, Error>> + Send>>;

/// A write on its way to the backend, with the URL's lock and the invalidation of its tags.
/// Once sent, the write is the backend's to carry out, whether or not its client stays: a
/// legacy backend does not stop a write because the connection closed. So if this is dropped
/// before the answer (the client left), the exchange runs on in a task of its own, and the
/// invalidation and the lock are let go only once the backend has answered (or
/// `upstream_timeout` has passed). Otherwise a later writer would be checked against a state
/// this write may still change, and both could land.
struct InFlight {
    answer: Option<Answer>,
    // Field order: the tags are dropped before the lock is let go.
    invalidation: Option<Invalidation>,
    guard: Option<WriteGuard>,
    /// The budget a body read whole holds while it is being sent.
    held: Option<Share>,
}

impl InFlight {
    /// Waits for the backend's answer. From here, dropping `self` lets the lock go at once.
    async fn answer(&mut self) -> Result<Response<Incoming>, Error> {
        let answer = self.answer.as_mut().expect("answered once");
        let rsp = answer.await;
        self.answer = None;
        rsp
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        let Some(answer) = self.answer.take() else {
            return;
        };
        let (invalidation, guard) = (self.invalidation.take(), self.guard.take());
        if invalidation.is_none() && guard.is_none() {
            return; // a write that changes nothing: nothing to hold (nor a body read whole)
        }
        let held = self.held.take();
        // Without a runtime (the process is ending) there is nobody left to wait for.
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            rt.spawn(async move {
                let _ = answer.await;
                drop((held, invalidation));
                drop(guard);
            });
        }
    }
}

/// Whether a tag may be remembered and later trusted for any writer. A representation that
/// varies by user (`Vary: Authorization`, `Cookie` or `*`, `Cache-Control: private`, or a
/// `per_user` route) is not: a 412 would show one user's tag to another, so such writes
/// always revalidate with the writer's own credentials. Nor is one marked `no-store`: its
/// bytes must not be kept, as a copy would be. Nor, as a shared cache must not reuse it
/// (RFC 9111 §3.5), one answering a request with `Authorization`, unless it says it may be
/// shared (`public`, `s-maxage`, `must-revalidate`); nor one that sets a cookie, which nginx
/// and Varnish do not cache either. And whether it is one of several (`Known::negotiated`):
/// it varies on anything, or has a content coding. One pass over `Vary` for both.
fn cacheable(route: &Route, headers: &HeaderMap, authorized: bool) -> (bool, bool) {
    let vary = headers.get_all(header::VARY);
    let negotiated = vary.iter().next().is_some() || headers.contains_key(header::CONTENT_ENCODING);
    let varies_by_user = list_items(headers, header::VARY).any(|f| {
        f == "*" || f.eq_ignore_ascii_case("authorization") || f.eq_ignore_ascii_case("cookie")
    });
    let one_users = authorized && !shared_though_authorized(headers);
    (
        !route.per_user
            && !varies_by_user
            && !one_users
            && !headers.contains_key(header::SET_COOKIE)
            && !kept_from_others(headers),
        negotiated,
    )
}

/// A response to a request with `Authorization` that a shared cache may reuse all the same
/// (RFC 9111 §3.5).
fn shared_though_authorized(headers: &HeaderMap) -> bool {
    cache_directive(headers, &["public", "s-maxage", "must-revalidate"])
}

/// `Cache-Control: private` (for one user: RFC 9111 §5.2.2.7) or `no-store` (§5.2.2.5), in
/// any field line, qualified or not.
fn kept_from_others(headers: &HeaderMap) -> bool {
    cache_directive(headers, &["private", "no-store"])
}

/// Whether `Cache-Control` holds one of `names` (with an argument or not), in any line.
fn cache_directive(headers: &HeaderMap, names: &[&str]) -> bool {
    list_items(headers, header::CACHE_CONTROL)
        .map(|d| d.split('=').next().unwrap_or("").trim_end())
        .any(|d| names.iter().any(|n| d.eq_ignore_ascii_case(n)))
}

/// The items of a comma-separated list field, across all its lines, trimmed.
fn list_items(headers: &HeaderMap, name: header::HeaderName) -> impl Iterator<Item = &str> {
    headers
        .get_all(name)
        .into_iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim)
}

/// Whether a PUT's body is what the backend will serve: not a partial update
/// (`Content-Range`) and not an encoding the backend may undo (`Content-Encoding`).
fn stores_verbatim(parts: &Parts) -> bool {
    parts.method == Method::PUT
        && !parts.headers.contains_key(header::CONTENT_RANGE)
        && !parts.headers.contains_key(header::CONTENT_ENCODING)
}

/// Methods that never change state (RFC 9110 §9.2.1, RFC 4918 PROPFIND): no lock, no
/// invalidation. Every other method, extension methods included, is treated as a write.
fn changes_state(method: &Method) -> bool {
    !matches!(
        method.as_str(),
        "OPTIONS" | "TRACE" | "PROPFIND" | "REPORT" | "SEARCH"
    )
}

/// Requests a `require_precondition` route refuses without a precondition (RFC 6585 §3):
/// PUT, PATCH and DELETE. In any case: methods are case-sensitive (RFC 9110 §9.1), but many
/// frameworks (Werkzeug, so Flask) upper-case the method, so a blind `put` would run as a
/// PUT. And a POST that names one of them in a method-override header or a `_method` query
/// parameter: a backend that honours it (Express's `method-override`, Laravel, ASP.NET,
/// Google's APIs) runs it as that. (A `_method` form field is [`form_overrides`]'.)
fn requires_precondition(parts: &Parts) -> bool {
    if guarded(parts.method.as_str()) {
        return true;
    }
    if parts.method != Method::POST {
        return false;
    }
    let in_headers = METHOD_OVERRIDES.iter().any(|h| {
        let mut items = (parts.headers.get_all(*h).iter())
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','));
        items.any(guarded)
    });
    in_headers
        || parts
            .uri
            .query()
            .is_some_and(|q| form_field(q.as_bytes()).is_some_and(guarded))
}

/// A POST whose form body (read whole) asks, in a `_method` field, to be run as a guarded
/// method, as Rails' and Laravel's forms do.
fn form_overrides(parts: &Parts, body: &[u8]) -> bool {
    parts.method == Method::POST
        && parts.headers.get(header::CONTENT_TYPE).is_some_and(|t| {
            const FORM: &[u8] = b"application/x-www-form-urlencoded";
            t.as_bytes()
                .get(..FORM.len())
                .is_some_and(|m| m.eq_ignore_ascii_case(FORM))
        })
        && form_field(body).is_some_and(guarded)
}

/// The value of the `_method` field of a URL-encoded form or query, if it is one a client
/// may send unencoded (letters).
fn form_field(form: &[u8]) -> Option<&str> {
    form.split(|&b| b == b'&')
        .find_map(|pair| pair.strip_prefix(b"_method="))
        .and_then(|v| std::str::from_utf8(v).ok())
}

/// PUT, PATCH or DELETE, in any case.
fn guarded(method: &str) -> bool {
    ["PUT", "PATCH", "DELETE"]
        .iter()
        .any(|g| method.trim().eq_ignore_ascii_case(g))
}

/// The headers by which a POST asks a backend to run it as another method.
const METHOD_OVERRIDES: [&str; 3] = [
    "x-http-method-override",
    "x-http-method",
    "x-method-override",
];

/// Removes the conditions the proxy evaluated (the backend does not know its tags), and the
/// date conditions that a tag condition takes precedence over (§13.2.2). A date condition
/// without such a tag condition stays for the backend to judge as well, with one exception:
/// on a read the proxy answers `If-Modified-Since` itself from the 200's `Last-Modified`,
/// because a 304 from the backend would not carry the proxy's ETag (§15.4.5).
/// A read the proxy judges loses its `Range`.
fn strip_evaluated(headers: &mut HeaderMap, pre: &Preconditions, read: bool) {
    if !pre.any_present {
        return;
    }
    if pre.if_match.is_some() {
        headers.remove(header::IF_MATCH);
        headers.remove(header::IF_UNMODIFIED_SINCE);
    }
    if pre.if_none_match.is_some() || read {
        headers.remove(header::IF_NONE_MATCH);
        headers.remove(header::IF_MODIFIED_SINCE);
    }
    // The proxy judges a read's conditions on a whole 200 only: a 206 would pass them
    // unjudged (a stale If-Match resuming a download, an If-None-Match that matches). So a
    // read it judges asks for the whole representation, as it does for an `If-Range` tag;
    // ignoring `Range` is allowed (§14.2).
    let judged_read = read
        && (pre.if_match.is_some()
            || pre.if_none_match.is_some()
            || pre.if_modified_since.is_some());
    if pre.if_range_tag || judged_read {
        headers.remove(header::IF_RANGE);
        headers.remove(header::RANGE);
    }
}

/// The key of a COPY or MOVE's `Destination` (RFC 4918 §10.3) on the same upstream: that
/// resource changes too, so its remembered tag must go as well.
/// One that cannot be read is refused (400): forwarded, its resource would change with
/// neither its lock held nor its tag forgotten. A missing one is the backend's to refuse.
fn destination_key(parts: &Parts, route: &Route) -> Result<Option<ResourceKey>, HeaderError> {
    if !matches!(parts.method.as_str(), "COPY" | "MOVE") {
        return Ok(None);
    }
    let Some(value) = parts.headers.get("destination") else {
        return Ok(None);
    };
    let malformed = |reason: &str| HeaderError {
        name: HeaderName::from_static("destination"),
        reason: reason.to_owned(),
    };
    let text = value
        .to_str()
        .map_err(|_| malformed("not visible ASCII (RFC 4918 §10.3: a URI)"))?;
    let dest: http::Uri = text.parse().map_err(|_| malformed("not a URI"))?;
    Ok(Some(ResourceKey::new(
        &route.upstream,
        &normalize_path(dest.path()),
        dest.query(),
    )))
}

/// The host a request was sent to: the URI's authority (HTTP/2, absolute-form) or `Host`.
fn request_host<'a>(req: &'a Parts, host: Option<&'a HeaderValue>) -> Option<&'a str> {
    req.uri.host().or_else(|| host?.to_str().ok())
}

/// The backend's own strong tag, if it sent exactly one: of several `ETag` lines none can
/// be told to be the representation's, and the proxy's own tag replaces them all.
fn upstream_strong_tag(headers: &HeaderMap) -> Option<ETag> {
    let mut lines = headers.get_all(ETAG).iter();
    let (Some(only), None) = (lines.next(), lines.next()) else {
        return None;
    };
    let tag = ETag::parse(only.as_bytes()).ok()?;
    (!tag.is_weak()).then_some(tag)
}

fn declared_length(headers: &HeaderMap) -> Option<u64> {
    headers
        .get(header::CONTENT_LENGTH)?
        .to_str()
        .ok()?
        .parse()
        .ok()
}

fn last_modified(headers: &HeaderMap) -> Option<SystemTime> {
    crate::date::parse(headers.get(header::LAST_MODIFIED)?.to_str().ok()?)
}

/// An upstream response passed through unchanged (`send` already dropped hop-by-hop headers).
/// A GET's answer is a whole representation, to tag: a 200 without `Content-Range` (one with
/// it, from a backend that misanswers a range, holds part of one: its tag would name bytes
/// that are not the whole).
fn whole_representation(rsp: &Response<Incoming>) -> bool {
    rsp.status() == StatusCode::OK && !rsp.headers().contains_key(header::CONTENT_RANGE)
}

/// [`pass`] for a read's answer that is not tagged (a 206, a 404, a revalidation's
/// refusal): under `upstream_etag = "replace"` without the backend's `ETag`, which no
/// request could use, as a write's answer is (`forward`).
fn pass_read(mut rsp: Response<Incoming>, head: bool, route: &Route) -> Response<ProxyBody> {
    if route.upstream_etag == UpstreamEtag::Replace {
        rsp.headers_mut().remove(ETAG);
    }
    pass(rsp, head, route)
}

fn pass(rsp: Response<Incoming>, head: bool, route: &Route) -> Response<ProxyBody> {
    let (parts, body) = rsp.into_parts();
    let body = if head {
        ProxyBody::empty()
    } else {
        ProxyBody::stream(body, route.upstream_timeout)
    };
    Response::from_parts(parts, body)
}

/// A 304 built from the 200 it replaces, with the fields §15.4.5 asks for.
fn not_modified(rparts: &response::Parts) -> Response<ProxyBody> {
    let mut rsp = Response::new(ProxyBody::empty());
    *rsp.status_mut() = StatusCode::NOT_MODIFIED;
    for name in [
        header::CACHE_CONTROL,
        header::CONTENT_LOCATION,
        header::DATE,
        ETAG,
        header::EXPIRES,
        header::VARY,
        header::LAST_MODIFIED,
        // Not in RFC 9110 §15.4.5's list, but a backend that renews a session on each read
        // renews it on a revalidation too, as it would through nginx.
        header::SET_COOKIE,
    ] {
        for value in rparts.headers.get_all(&name) {
            rsp.headers_mut().append(name.clone(), value.clone());
        }
    }
    rsp
}

/// A request until its response head is counted and logged (`finish`). hyper drops the
/// request's future when the client closes its connection or resets its stream before the
/// head is ready; dropped unfinished, it is counted and logged as nginx's 499, so that the
/// requests clients give up on (a slow backend's, above all) do not vanish from the logs and
/// metrics. A write already sent runs on upstream (`SentWrite`); the line says only that its
/// client left.
struct Pending<'a> {
    proxy: &'a Proxy,
    start: Instant,
    method: Method,
    uri: hyper::Uri,
    /// `X-Request-Id`, as the client (or an edge proxy) sent it; passed upstream unchanged.
    request_id: Option<HeaderValue>,
    peer: Peer,
    ex: Exchange,
    done: bool,
}

/// The status counted and logged for a request whose client left before its answer: nginx's
/// "client closed request", which no response carries.
const CLIENT_CLOSED: u16 = 499;
/// The status counted and logged for a request the end of the drain cut off (the client
/// gets no answer: its connection is closed).
const CUT_OFF: u16 = 503;

impl Pending<'_> {
    /// Counts the request and writes its access line: `bytes` is the response body's length
    /// when known up front.
    fn finish(&mut self, status: u16, bytes: Option<u64>) {
        self.done = true;
        let ex = &self.ex;
        let route = ex
            .route
            .as_ref()
            .map_or(crate::metrics::NO_ROUTE, |r| r.metric_labels.as_str());
        self.proxy
            .metrics
            .request(route, &self.method, status, ex.by_proxy);
        access_log(self, status, bytes);
    }
}

impl Drop for Pending<'_> {
    fn drop(&mut self) {
        if !self.done {
            if self.proxy.cutting.load(Ordering::Acquire) {
                self.ex.outcome = "shutdown";
                self.ex.by_proxy = true;
                self.finish(CUT_OFF, None);
            } else {
                self.ex.outcome = "client_closed";
                self.finish(CLIENT_CLOSED, None);
            }
        }
    }
}

/// The longest `X-Request-Id` written to the access line: ids are UUIDs or shorter, and a
/// client must not fill the log with its header.
const MAX_LOGGED_ID: usize = 128;

/// The access line, written when the response head is ready: `duration_ms` is the time to
/// it, and `bytes` is the body's length when known up front (buffered bodies, and upstream
/// bodies with a `Content-Length`), absent for a chunked stream.
fn access_log(req: &Pending<'_>, status: u16, bytes: Option<u64>) {
    let ex = &req.ex;
    let route = ex.route.as_ref().map_or("-", |r| r.prefix.as_str());
    let request_id = req
        .request_id
        .as_ref()
        .filter(|v| v.len() <= MAX_LOGGED_ID)
        .and_then(|v| v.to_str().ok());
    tracing::info!(
        target: "ifmatch::access",
        // Its own fields say it all; the request span would repeat them.
        parent: None,
        route,
        method = %req.method,
        path = req.uri.path(),
        client = %req.peer.addr.ip(),
        request_id,
        status,
        upstream_status = ex.upstream_status.map(|s| s.as_u16()),
        outcome = ex.outcome,
        duration_ms = req.start.elapsed().as_secs_f64() * 1000.0,
        bytes,
        "access"
    );
}
