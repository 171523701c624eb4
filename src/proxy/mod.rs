//! The per-request pipeline. It orchestrates the steps and decides nothing itself:
//!
//! 1. route the request (404 without a route);
//! 2. parse its preconditions (400 when malformed);
//! 3. GET/HEAD: forward, tag a 200 body as it streams, remember the tag, answer 304/412 if
//!    the preconditions say so;
//! 4. any other method: 428 if the route demands a precondition and none came; take the URL's
//!    write lock; learn the current state (revalidate or cached); 412 if a precondition
//!    fails; otherwise forward and pass the backend's answer (409 included) through.
//!
//! This module routes, checks limits and turns errors into responses (`handle`,
//! `dispatch`); the read path (3) is `read.rs` and the write path (4) `write.rs`.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant, SystemTime};

use crate::h1::UpBody;
use arc_swap::ArcSwap;
use http::header::{self, HeaderMap, HeaderValue, ETAG};
use http::request::Parts;
use http::{Method, Request, Response, StatusCode, Version};
use http_body::Body as _;
use hyper::body::Incoming;
use tracing::{debug_span, Instrument};

use crate::activity::AnsweredLocally;
use crate::body::{ClientBody, ProxyBody};
use crate::budget::Budget;
use crate::config::{Config, Route, UpstreamEtag};
use crate::error::{Blame, Error};
use crate::etag::{ETag, TagKey};
use crate::framing::Verdict;
use crate::key::{normalize_path, ResourceKey};
use crate::lock::WriteLocks;
use crate::max_forwards::{take_hop, Hop};
use crate::memo::BodyMemo;
use crate::metrics::{Metrics, Unheld};
use crate::precondition::Preconditions;
use crate::router::Router;
use crate::settling::Settling;
use crate::tags::TagStore;
use crate::upstream::{self, Peer, UpstreamClient};

mod read;
mod write;

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
    /// Writes the backend has not answered whose clients stopped waiting: a stop waits
    /// for them.
    pub settling: Arc<Settling>,
    /// Counts the tag keys the process has used (`Routing::key_generation` of the newest),
    /// so that a tag made under an older one is not left in the cache (`record`).
    key_generation: AtomicU64,
    /// The drain ended with requests in flight: those dropped now were cut off by the
    /// proxy, not left by their clients.
    cutting: AtomicBool,
    /// For the warning when upstream connects run out of file descriptors: they fail in
    /// floods, as accepts do then, and are logged as seldom.
    out_of_files: crate::telemetry::Every,
}

/// The part of the proxy that a config reload replaces.
#[derive(Debug)]
struct Routing {
    router: Router,
    upstream: UpstreamClient,
    tag_key: TagKey,
    /// The listener's TLS config: swapped by a reload like the rest (new certificates).
    /// Its ALPN offers h2 exactly when `http2` is on.
    tls: Option<Arc<rustls::ServerConfig>>,
    /// When its certificate may be used, if that could be read.
    certificate: Option<crate::tls::Validity>,
    /// Clients may speak HTTP/2 (`server.http2`).
    http2: bool,
    /// Whose forwarding headers are passed on (`server.trusted_proxies`).
    trusted_proxies: crate::trust::TrustedProxies,
    max_header_bytes: u64,
    max_request_body: u64,
    /// Which tag key this is, counted from the first (see `Proxy::key_generation`).
    key_generation: u64,
    /// Routings that reloads replaced, which key some URL with a query otherwise than this
    /// one does (`ignore_query` turned on or off): while one lives, requests begun under it
    /// (a write in flight among them) hold and forget tags under the other key
    /// (`other_keying`).
    rekeyed: Vec<Weak<Routing>>,
}

impl Routing {
    /// `previous`: the routing a reload replaces, whose upstream pools are kept where the
    /// new config would make them again.
    fn new(config: &Config, random_key: &TagKey, previous: Option<&Routing>) -> Self {
        let s = &config.server;
        let router = Router::new(config.routes.iter().cloned());
        warn_shadowed(&router);
        warn_certificate(s, SystemTime::now());
        Self {
            router,
            tag_key: s.tag_key.clone().unwrap_or_else(|| random_key.clone()),
            upstream: match previous {
                Some(p) => p.upstream.reloaded(config),
                None => UpstreamClient::new(config),
            },
            tls: s.tls.as_ref().map(|t| crate::tls::offering(t, s.http2)),
            certificate: s.tls_validity.filter(|_| s.tls.is_some()),
            http2: s.http2,
            trusted_proxies: s.trusted_proxies.clone(),
            max_header_bytes: s.max_header_bytes,
            max_request_body: s.max_request_body,
            key_generation: 0,
            rekeyed: Vec::new(),
        }
    }

    /// Whether a routing this one replaced keys URLs with a query otherwise, and requests
    /// begun under it may still be running (nothing, save after such a reload).
    fn rekeyed_in_flight(&self) -> bool {
        self.rekeyed.iter().any(|r| r.strong_count() > 0)
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

/// How a new client connection is served ([`Proxy::listening`]).
pub struct Listening {
    pub tls: Option<Arc<rustls::ServerConfig>>,
    pub http2: bool,
    pub trusted_proxies: crate::trust::TrustedProxies,
}

/// What the access log and span report about one request, and its body until forwarded.
#[derive(Default)]
struct Exchange {
    route: Option<Arc<Route>>,
    /// The backend's last answer for this request, a revalidation's included (as nginx's
    /// `$upstream_status`).
    upstream_status: Option<StatusCode>,
    /// The answer to the revalidation GET a write made, if it made one: so that a 412's
    /// line tells the backend's answer to that GET from one to the write.
    revalidation_status: Option<StatusCode>,
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
    /// A POST whose form body asks to run as PUT, PATCH or DELETE (`_method`), on a route
    /// that requires preconditions: what it asks for, as a 428 names it.
    overridden: Option<String>,
    /// The request, or a revalidation for it, went to the backend: it cost the backend a
    /// request, answered or not (for the rapid-reset guard: `AnsweredLocally`).
    sent: bool,
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
            self.streamed = rest.unread();
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

/// A request body the proxy answered without forwarding (412, 428, 400, 503…). An
/// HTTP/1.1 connection cannot take its next request until that body has been read, and
/// hyper would otherwise close it after the response without saying so, so a client that
/// reuses it races the close. A body of known size up to `DISCARD_LIMIT` is read and dropped
/// after the response and the connection stays open, as nginx does. A larger or chunked one,
/// or one the client sends only after a `100 Continue` (which must not follow a final
/// answer), closes the connection, and the response says `Connection: close`; the larger or
/// chunked one is still read and dropped until the close, within the same time.
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
    }
    if expects_continue {
        return;
    }
    // A larger body is read and dropped too before the close (`body::discard`).
    crate::body::discard(body);
}

// === impl Proxy ===

/// A host's route that a longer host-less prefix takes requests from: valid, and likely
/// not meant (nginx and Envoy would pick the host first).
fn warn_shadowed(router: &Router) {
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
}

fn warn_random_key(config: &Config) {
    if config.server.tag_key.is_none() {
        tracing::warn!(
            "no server.tag_key_file: tags use a random key, so they change on restart and \
             differ between replicas; set a shared key in production"
        );
    }
}

/// How long before its certificate expires the listener warns of it at each start and
/// reload: time for a renewal that failed to be done by hand.
const CERTIFICATE_WARN_BEFORE: Duration = Duration::from_secs(14 * 86_400);

/// A listener certificate that clients refuse now, or will within
/// [`CERTIFICATE_WARN_BEFORE`], is warned of: the proxy would start, and every TLS client
/// fail its handshake. (`ifmatch_tls_certificate_expiry_timestamp_seconds` is there to alert
/// on.)
fn warn_certificate(s: &crate::config::Server, now: SystemTime) {
    let Some(v) = s.tls_validity.filter(|_| s.tls.is_some()) else {
        return;
    };
    let at = |t: SystemTime| httpdate::fmt_http_date(t);
    if v.not_after <= now {
        tracing::warn!(
            not_after = %at(v.not_after),
            "the listener's certificate has expired: TLS clients will refuse it"
        );
    } else if v.not_before > now {
        tracing::warn!(
            not_before = %at(v.not_before),
            "the listener's certificate is not valid yet: TLS clients will refuse it until then"
        );
    } else if v.not_after.duration_since(now).unwrap_or_default() < CERTIFICATE_WARN_BEFORE {
        tracing::warn!(
            not_after = %at(v.not_after),
            "the listener's certificate expires within 14 days"
        );
    }
}

/// The warnings a valid config gets at start, for `--check` to show without starting.
pub fn warn_about(config: &Config) {
    warn_random_key(config);
    warn_shadowed(&Router::new(config.routes.iter().cloned()));
    warn_certificate(&config.server, SystemTime::now());
    // Warns where an https route would use them and there are none.
    upstream::platform_tls(config);
}

impl Proxy {
    pub fn new(config: &Config) -> Self {
        let random_key = TagKey::random();
        warn_random_key(config);
        Self {
            routing: ArcSwap::from_pointee(Routing::new(config, &random_key, None)),
            random_key,
            tags: TagStore::new(config.server.tag_cache_entries),
            memo: BodyMemo::new(config.server.tag_memo_bytes),
            locks: WriteLocks::new(),
            metrics: Metrics::default(),
            budget: Budget::new(config.server.max_buffered_bytes),
            settling: Arc::default(),
            key_generation: AtomicU64::new(0),
            cutting: AtomicBool::new(false),
            out_of_files: crate::telemetry::Every::new(Duration::from_secs(60)),
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
        crate::metrics::write_settling(&mut out, self.settling.count());
        crate::metrics::write_certificate(&mut out, self.certificate());
        out
    }

    /// The TLS config for the next connection, when the listener is TLS.
    pub fn tls(&self) -> Option<Arc<rustls::ServerConfig>> {
        self.routing.load().tls.clone()
    }

    /// When the listener's certificate in use may be used, if it is TLS and that was read.
    pub fn certificate(&self) -> Option<crate::tls::Validity> {
        self.routing.load().certificate
    }

    /// How the next connection is served: TLS or not, HTTP/2 or not, from one config (a
    /// reload between two looks could otherwise offer h2 by ALPN and then not speak it).
    pub fn listening(&self) -> Listening {
        let routing = self.routing.load();
        Listening {
            tls: routing.tls.clone(),
            http2: routing.http2,
            trusted_proxies: routing.trusted_proxies.clone(),
        }
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
        new.rekeyed = current
            .rekeyed
            .iter()
            .filter(|r| r.strong_count() > 0)
            .cloned()
            .collect();
        if new.router.keys_queries_unlike(&current.router) {
            new.rekeyed.push(Arc::downgrade(&current));
        }
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
        let logged = tracing::enabled!(target: "ifmatch::access", tracing::Level::INFO);
        let request_id = logged
            .then(|| req.headers().get(X_REQUEST_ID).cloned())
            .flatten();
        // Behind a trusted proxy, the client it names (its own address is `client`).
        let forwarded_client = match &peer.trusted {
            Some(trusted) if logged => {
                trusted.forwarded_client(req.headers().get_all(upstream::X_FORWARDED_FOR).iter())
            }
            _ => None,
        };
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
            forwarded_client,
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
                    Blame::Proxy if matches!(e, Error::OutOfFiles { .. }) => {
                        if self.out_of_files.due() {
                            let route = route.unwrap_or("-");
                            tracing::warn!(
                                parent: &span, route, %method, path, error = %e,
                                "request failed: ifmatch is out of file descriptors (503s with \
                                 outcome proxy_out_of_files; this line comes at most once a \
                                 minute)"
                            )
                        }
                    }
                    Blame::Proxy | Blame::Upstream => {
                        let route = route.unwrap_or("-");
                        tracing::warn!(parent: &span, route, %method, path, error = %e, "request failed")
                    }
                    Blame::Client => tracing::debug!(parent: &span, error = %e, "request refused"),
                }
                e.into_response_to(method)
            }
        };
        // A body part read before the lock and then never forwarded (a write given the
        // revalidation's own answer) is left part-read too, and hyper closes after the answer.
        // Not one read to its end before it found no room: nothing of it is left unread.
        // What is left of it is read and dropped until the close (`ClientBody::linger`).
        if let Some(rest) = ex
            .resumed
            .take_if(|r| r.unread() && version < Version::HTTP_2)
        {
            ends = true;
            rest.linger();
        }
        if let (Some(origin), Some(route)) = (&ex.client_origin, &ex.route) {
            upstream::point_back(rsp.headers_mut(), route, origin);
        }
        if ends {
            rsp.headers_mut()
                .insert(header::CONNECTION, HeaderValue::from_static("close"));
        } else if let Some(body) = ex.body.take().filter(|b| !b.is_end_stream()) {
            leave_unread(body, version, expects_continue, &mut rsp);
        }
        // hyper answers an HTTP/1.0 client that asked for keep-alive with `keep-alive` when
        // the head is HTTP/1.1 (as every answer is, `upstream::send_within`), even on one it
        // then closes: appended to a `close` set above, or on a body of unknown length, which
        // only the close can end in HTTP/1.0. Given as 1.0, such a head promises nothing and
        // hyper closes after it. (The only `Connection` an answer has here is that `close`.)
        if version == Version::HTTP_10
            && (rsp.headers().contains_key(header::CONNECTION)
                || http_body::Body::size_hint(rsp.body()).exact().is_none())
        {
            *rsp.version_mut() = Version::HTTP_10;
        }
        // For the rapid-reset guard's count; HTTP/1 has no streams to reset.
        if version >= Version::HTTP_2 && !ex.sent {
            rsp.extensions_mut().insert(AnsweredLocally);
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
        if parts.version == Version::HTTP_2 {
            crate::framing::check_http2_length(&parts.headers)?;
        }
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
        // OPTIONS has its conditions ignored (RFC 9110 §13.2.1, see `write`): a malformed
        // one too, rather than a 400. It goes up as sent, for the backend to ignore as well.
        let pre = match Preconditions::parse(&parts.headers) {
            Err(_) if parts.method == Method::OPTIONS => Preconditions::default(),
            pre => pre?,
        };
        let query = parts.uri.query().filter(|_| !route.ignore_query);
        let query = crate::key::resource_query(&parts.method, query);
        let key_path = crate::key::key_path(&route, &path);
        let key = ResourceKey::new(&route.upstream, &key_path, query.as_deref());
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

    /// Sends a request upstream, timing it to the response head. One that timed out counts
    /// with the time it waited: left out, a backend slowing past the timeout would show as
    /// a healthy latency.
    async fn send(
        &self,
        rt: &Routing,
        route: &Route,
        req: Box<Request<upstream::UpstreamBody>>,
    ) -> Result<Response<UpBody>, Error> {
        self.send_within(rt, route, req, route.upstream_timeout, None)
            .await
    }

    /// [`Proxy::send`], waiting up to `timeout` for the response head; `queued` is told of
    /// its wait for a turn.
    async fn send_within(
        &self,
        rt: &Routing,
        route: &Route,
        req: Box<Request<upstream::UpstreamBody>>,
        timeout: Duration,
        queued: Option<&crate::pool::Queued>,
    ) -> Result<Response<UpBody>, Error> {
        let start = Instant::now();
        let rsp = rt.upstream.send_within(route, req, timeout, queued).await;
        if matches!(rsp, Ok(_) | Err(Error::UpstreamTimeout { .. })) {
            self.metrics
                .upstream_latency(&route.metric_labels, start.elapsed());
        }
        rsp
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
}

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
    // The proxy judges a read's tag conditions on a whole 200 only: a 206 would pass them
    // unjudged (a stale If-Match resuming a download, an If-None-Match that matches). So a
    // read it judges asks for the whole representation, as it does for an `If-Range` that is
    // not a date; ignoring `Range` is allowed (§14.2). Not for `If-Unmodified-Since` alone:
    // the 206's `Last-Modified` judges it (`read`), and a resumed download stays a part.
    let judged_read = read
        && (pre.if_match.is_some()
            || pre.if_none_match.is_some()
            || pre.if_modified_since.is_some());
    if pre.if_range_not_a_date || judged_read {
        headers.remove(header::IF_RANGE);
        headers.remove(header::RANGE);
    }
}

/// A request with credentials (`Authorization`, or a `Cookie`, which may carry a session):
/// what it is given may be its user's own.
fn credentialed(headers: &HeaderMap) -> bool {
    headers.contains_key(header::AUTHORIZATION) || headers.contains_key(header::COOKIE)
}

/// The key `uri` (with a query) has under `route`'s upstream with `ignore_query` the other
/// way: what a routing before or after a reload that turned it on or off names its URL by.
/// `None` without a query, whose key is the same both ways.
fn other_keying(route: &Route, uri: &http::Uri) -> Option<ResourceKey> {
    let query = uri.query().filter(|q| !q.is_empty())?;
    let path = normalize_path(uri.path());
    let query = (route.ignore_query).then_some(query);
    let path = crate::key::key_path(route, &path);
    Some(ResourceKey::new(&route.upstream, &path, query))
}

/// The host a request was sent to: the URI's authority (HTTP/2, absolute-form) or `Host`.
fn request_host<'a>(req: &'a Parts, host: Option<&'a HeaderValue>) -> Option<&'a str> {
    req.uri.host().or_else(|| host?.to_str().ok())
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

/// [`pass`] for a read's answer that is not tagged (a 206, a 404, a revalidation's
/// refusal), without a backend `ETag` that no request could use ([`drop_replaced_tag`]), as
/// a write's answer is (`forward`).
fn pass_read(mut rsp: Response<UpBody>, head: bool, route: &Route) -> Response<ProxyBody> {
    drop_replaced_tag(rsp.headers_mut(), route);
    pass(rsp, head, route)
}

/// Drops the backend's `ETag` from an answer that passes through untagged where a GET's
/// would be replaced by the proxy's own: any under `upstream_etag = "replace"`, and a weak
/// one or several lines under `"keep"` (`upstream_strong_tag`). The proxy judges its own
/// tags for such a resource, so a client that sent this one in `If-Match` would get 412
/// every time.
fn drop_replaced_tag(headers: &mut HeaderMap, route: &Route) {
    let kept = route.upstream_etag == UpstreamEtag::Keep && upstream_strong_tag(headers).is_some();
    if !kept {
        headers.remove(ETAG);
    }
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

fn pass(rsp: Response<UpBody>, head: bool, route: &Route) -> Response<ProxyBody> {
    let (parts, body) = rsp.into_parts();
    let body = if head {
        ProxyBody::empty()
    } else {
        ProxyBody::stream(body, route.upstream_timeout)
    };
    Response::from_parts(parts, body)
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
    /// The client a trusted proxy's `X-Forwarded-For` names.
    forwarded_client: Option<std::net::IpAddr>,
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
    // A route for one host: two routes may share the prefix.
    let host = ex.route.as_ref().and_then(|r| r.host.as_deref());
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
        host,
        method = %req.method,
        path = req.uri.path(),
        client = %req.peer.addr.ip(),
        forwarded_client = req.forwarded_client.map(tracing::field::display),
        request_id,
        status,
        upstream_status = ex.upstream_status.map(|s| s.as_u16()),
        revalidation_status = ex.revalidation_status.map(|s| s.as_u16()),
        outcome = ex.outcome,
        duration_ms = req.start.elapsed().as_secs_f64() * 1000.0,
        bytes,
        "access"
    );
}
