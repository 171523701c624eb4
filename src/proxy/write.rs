//! Every other method: the guarded write path. 428 where a precondition is required and
//! none came; the URL's write lock; the current state (remembered, or a revalidation GET);
//! 412 if a condition fails; otherwise the write goes up under the lock, and what it did to
//! the resource's tag is recorded when the backend answers.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::h1::UpBody;
use bytes::Bytes;
use http::header::{self, HeaderName, HeaderValue, ETAG};
use http::request::Parts;
use http::{Method, Request, Response, StatusCode};

use crate::body::{read_request, ProxyBody, Read};
use crate::budget::Share;
use crate::config::{Route, Validation};
use crate::error::Error;
use crate::etag::ETag;
use crate::key::{normalize_path, ResourceKey};
use crate::lock::WriteGuard;
use crate::metrics::Unheld;
use crate::precondition::{
    evaluate, failure, names_tags, Decision, HeaderError, Preconditions, Resource,
};
use crate::tags::Known;
use crate::upstream;

use super::{
    credentialed, declared_length, drop_replaced_tag, last_modified, other_keying, pass, pass_read,
    strip_evaluated, Exchange, Proxy, Routing,
};

/// What the proxy learnt of a resource before a write.
enum Current {
    Known(Resource),
    /// The revalidation GET got an answer that is neither 2xx nor 404/410: the writer gets it.
    Answer(Box<Response<UpBody>>),
}

/// A write's preconditions, evaluated: they hold (with the state they held against), or the
/// revalidation got an answer that goes to the writer as it is.
enum Checked {
    Holds(Resource),
    Answer(Box<Response<ProxyBody>>),
}

/// A write's body on its way upstream.
enum Outgoing {
    /// Streamed through as it arrives; `hashed` for `tag_puts`.
    Stream { hashed: bool },
    /// Read whole before the lock, holding its share of the budget until sent; with its
    /// tag for `tag_puts`.
    Whole(Bytes, Option<ETag>, Share),
}

impl Proxy {
    /// Every other method: the guarded write path.
    #[allow(clippy::too_many_arguments)]
    pub(super) async fn write(
        self: &Arc<Self>,
        rt: &Arc<Routing>,
        route: &Arc<Route>,
        key: &ResourceKey,
        pre: &Preconditions,
        parts: Parts,
        ex: &mut Exchange,
    ) -> Result<Response<ProxyBody>, Error> {
        if route.require_precondition && !pre.guards_write() {
            if let Some(method) = requires_precondition(&parts) {
                return Err(required(&parts, method));
            }
        }
        let changes = changes_state(&parts.method);
        // Not for a resource the upstream tags itself (a GET would give its tag, not ours),
        // nor one served in several representations (`TagStore::takes_put_tags`).
        let tag_put = route.tag_puts && stores_verbatim(&parts) && self.tags.takes_put_tags(key);
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
        // A POST whose form's `_method` runs it as a COPY or MOVE (`destination_key`).
        let mut copies_by_form = false;
        let outgoing = if read_whole {
            let mut share = self.budget.share();
            let limits = (route.max_tag_body, rt.max_request_body);
            let body = ex.take_body();
            match read_request(body, route.upstream_timeout, limits, &mut share).await? {
                Read::Whole(body) => {
                    // Read to its end.
                    ex.streamed = false;
                    // Noted for a date-only guard too, which `check` refuses where the
                    // resource has no date to judge (see there).
                    ex.overridden = (route.require_precondition)
                        .then(|| form_overrides(&parts, &body))
                        .flatten();
                    copies_by_form = copies_by_form_of(&parts, &body);
                    if let Some(method) = ex.overridden.as_ref().filter(|_| !pre.guards_write()) {
                        return Err(required(&parts, method.clone()));
                    }
                    let tag = tag_put.then(|| self.put_tag(rt, key, &body));
                    Outgoing::Whole(body, tag, share)
                }
                Read::NoRoom(rest) => {
                    self.over_budget(route, Unheld::Request);
                    // Its last chunk may have been the one without room: then the client
                    // has sent it all, and a refusal need not close the connection.
                    ex.streamed = rest.unread();
                    ex.resumed = Some(rest);
                    Outgoing::Stream { hashed: tag_put }
                }
                Read::TooSlow(rest) | Read::TooLong(rest) => {
                    ex.streamed = rest.unread();
                    ex.resumed = Some(rest);
                    Outgoing::Stream { hashed: tag_put }
                }
            }
        } else {
            Outgoing::Stream { hashed: tag_put }
        };
        // After a reload that turned `ignore_query` on or off, a write begun under the old
        // routes may still be in flight under this URL's other key: this write waits for it
        // there too, and runs alone.
        let older = rt
            .rekeyed_in_flight()
            .then(|| other_keying(route, &parts.uri))
            .flatten();
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
            if pre.only_matches(tag) && older.is_none() {
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
                        return Ok(*rsp);
                    }
                    Err(e) => {
                        self.metrics.lock_wait(waited);
                        return Err(e);
                    }
                };
                if current.tag.as_ref().is_some_and(|c| c.strong_eq(tag)) {
                    self.metrics.lock_wait(waited);
                    self.metrics.unchanged_write(&route.metric_labels);
                    // A PUT sent as it is (`stores_verbatim`): no `Destination` to change.
                    let (guard, to) = (Some(guard), None);
                    let rsp =
                        self.forward(rt, route, key, pre, parts, outgoing, guard, to, true, ex);
                    return rsp.await;
                }
                drop(guard);
            }
        }
        // From here until the backend has answered, no other write to this URL runs, nor to
        // the destination of a COPY or MOVE, which the write changes too.
        let (guard, to) = match changes {
            true => {
                // What is left of the wait after a try at sharing the lock.
                let wait = route.lock_timeout.saturating_sub(started.elapsed());
                let to = destination_key(&parts, route, copies_by_form)?;
                let queued = Instant::now();
                let guard = match (&to, &older) {
                    (None, None) => self.locks.acquire(key, wait).await,
                    _ => {
                        let keys = [Some(key), to.as_ref(), older.as_ref()];
                        let keys: Vec<_> = keys.into_iter().flatten().collect();
                        self.locks.acquire_all(&keys, wait).await
                    }
                };
                self.metrics.lock_wait(waited + queued.elapsed());
                let guard = guard.map_err(|_| Error::LockTimeout(route.lock_timeout))?;
                (Some(guard), to)
            }
            false => (None, None),
        };
        // A method that neither selects nor modifies a representation (OPTIONS) has its
        // conditions ignored (RFC 9110 §13.2.1): no revalidation, no 412.
        if pre.guards_write() && parts.method != Method::OPTIONS {
            if let Checked::Answer(rsp) = self.check(rt, route, key, pre, &parts, ex).await? {
                return Ok(*rsp);
            }
        }
        self.forward(rt, route, key, pre, parts, outgoing, guard, to, false, ex)
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
        // A remembered tag is one any client could be given. A writer with credentials may
        // be given a representation of its own (its private document at a URL every user
        // writes, or more of a document than anonymous readers get), whose bytes, and so
        // whose tag, may equal another representation's at some other state: the
        // remembered tag cannot vouch for it, passing or failing. Such a writer is judged
        // by a revalidation with its own credentials, as on a `per_user` route.
        let mut remembered = (route.validation == Validation::Cached
            && !route.per_user
            && !credentialed(&parts.headers))
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
                        return Ok(Checked::Answer(Box::new(pass_read(*rsp, false, route))));
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
                Decision::Proceed => {
                    let unguarded = current.exists
                        && current.last_modified.is_none()
                        && pre.guards_only_by_date()
                        && route.require_precondition;
                    let blind = unguarded
                        .then(|| requires_precondition(parts).or_else(|| ex.overridden.clone()))
                        .flatten();
                    return match blind {
                        Some(method) => Err(Error::PreconditionUndated { method }),
                        None => Ok(Checked::Holds(current)),
                    };
                }
                // `remembered` is taken: the next turn revalidates.
                _ if negotiated => continue,
                _ => {
                    return Err(Error::PreconditionFailed {
                        why: failure(pre, &current),
                        current: current.tag,
                    })
                }
            }
        }
    }

    /// Sends a write upstream under its URL's lock (`guard`; none for a method that changes
    /// nothing), and records what it did to the resource's tag. The lock is let go when this
    /// returns, or, if the client leaves first, once the backend has answered (`InFlight`).
    /// `destination`: the COPY or MOVE's, whose lock `guard` holds too.
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
        destination: Option<ResourceKey>,
        shared: bool,
        ex: &mut Exchange,
    ) -> Result<Response<ProxyBody>, Error> {
        strip_evaluated(&mut parts.headers, pre, false);
        let credentialed = credentialed(&parts.headers);
        let changes = changes_state(&parts.method);
        // Forwarded unlocked and unjudged, as a read is, and for the same reason without a
        // method override (`Proxy::read`).
        if !changes {
            upstream::strip_method_overrides(&mut parts.headers);
        }
        // A write with a query forgets its URL's tag under the other key too, if routes
        // keyed that way are, or come, in force before it ends (`other_keying`).
        let rekey = changes && parts.uri.query().is_some();
        let older = (rekey && rt.rekeyed_in_flight())
            .then(|| other_keying(route, &parts.uri))
            .flatten();
        let invalidation = changes.then(|| Invalidation {
            proxy: self.clone(),
            keys: [Some(key.clone()), destination, older],
            rekey: rekey.then(|| Box::new((rt.clone(), route.clone(), parts.uri.clone()))),
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
                // Tagged only within `max_tag_body`, as a GET is: a GET of a larger body
                // streams untagged, so its tag could be neither confirmed nor used.
                let hasher = rt.tag_key.hasher();
                let most = route.max_tag_body;
                let (body, sent) = rt.upstream.limit_hashed(ex.take_body(), hasher, most);
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
        // A write sent whole that changes state: should the backend not answer within
        // `upstream_timeout`, its client is answered 504, and the exchange goes on for
        // `settle_timeout` more with the URL locked (`InFlight`): the write may still land,
        // and a writer let through meanwhile could be overwritten by it. (A body that
        // streams keeps the one timeout: it also measures the client's pauses, 408.)
        let within = route.upstream_timeout;
        let settles = (held.is_some() && invalidation.is_some() && !route.settle_timeout.is_zero())
            .then(|| within + route.settle_timeout);
        // A write whose client leaves before it is sent (while it waits for a turn under
        // `upstream_max_connections`, or for its connection to be made) is dropped unsent
        // (`InFlight`), settling or not. And under the cap, the 504's timer runs from the
        // request's turn, as the backend's does: not from before a wait that left it little
        // time. (One allocation per write that changes state; none for the rest.)
        let queued = invalidation
            .is_some()
            .then(|| Arc::new(crate::pool::Queued::default()));
        let (me, rt2, route2, queued2) = (self.clone(), rt.clone(), route.clone(), queued.clone());
        let mut in_flight = InFlight {
            answer: Some(Box::pin(async move {
                let timeout = settles.unwrap_or(route2.upstream_timeout);
                let queued = queued2.as_deref();
                me.send_within(&rt2, &route2, req, timeout, queued).await
            })),
            invalidation,
            guard,
            held,
            queued: queued.clone(),
        };
        // A revalidation's status is not this write's: should the client leave before the
        // answer, its line says the write's status is unknown.
        ex.upstream_status = None;
        ex.sent = true;
        let answered = {
            let mut answer = std::pin::pin!(in_flight.answer());
            match settles {
                Some(_) => {
                    let mut deadline = tokio::time::Instant::now() + within;
                    loop {
                        match tokio::time::timeout_at(deadline, answer.as_mut()).await {
                            Ok(answered) => break Some(answered),
                            Err(_) => match queued.as_ref().map(|q| q.deadline(deadline, within)) {
                                Some(later) if later > deadline => deadline = later,
                                _ => break None,
                            },
                        }
                    }
                }
                None => Some(answer.await),
            }
        };
        let Some(answered) = answered else {
            // Dropped with its answer to come, `in_flight` waits on for it in a task.
            return Err(Error::UpstreamTimeout {
                upstream: route.upstream.origin.clone(),
                after: within,
                connecting: false,
            });
        };
        let mut rsp = answered?;
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
        drop_replaced_tag(rsp.headers_mut(), route);
        // `tag_puts`: the backend stored the body that went up, so its tag is the new tag.
        // Only when the whole body went up, the backend says it is done, and it keeps no
        // validator of its own.
        let stored = matches!(
            rsp.status(),
            StatusCode::OK | StatusCode::CREATED | StatusCode::NO_CONTENT
        ) && !rsp.headers().contains_key(ETAG);
        // Nor once a GET has found the resource tagged by the backend or in several
        // representations (`takes_put_tags`): judged again now, since one may have landed
        // while the PUT waited for its lock or was on its way.
        let tagged = sent
            .and_then(|s| s.get().cloned())
            .filter(|_| stored && self.tags.takes_put_tags(key));
        if let Some(tag) = tagged {
            // Sent with credentials, the body may be its writer's own document
            // (`/me/settings`, one per user at one URL): remembered, its tag would judge
            // other users' writes (and a match tell them what the document holds). The
            // writer is still answered with it; the URL's tag is forgotten, as after any
            // write, and the next write revalidates with its own credentials.
            if !credentialed {
                // Its own key gets the new tag; its other key (a reload's, `rekey`) is still
                // forgotten.
                if let Some(i) = invalidation.as_mut() {
                    i.keys[0] = None;
                }
                // Recorded under the lock, with a ticket newer than any read in flight: a
                // read that fetched the old body cannot put its tag back. (A shared write's
                // ticket is the one taken before it was sent, above.)
                // Not known to be negotiated: the PUT's bytes are one representation, and
                // a GET that finds several records that when it comes.
                let known = Known {
                    tag: tag.clone(),
                    last_modified: last_modified(rsp.headers()),
                    from_upstream: false,
                    negotiated: false,
                };
                let ticket = sending.unwrap_or_else(|| self.tags.ticket());
                self.record(rt, key, known, ticket);
            }
            rsp.headers_mut().insert(ETAG, tag.to_header());
            ex.outcome = match shared {
                true => "forwarded_unchanged",
                false => "forwarded_tagged",
            };
        }
        Ok(pass(rsp, false, route))
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
        ex.sent = true;
        let rsp = self
            .send(rt, route, Box::new(upstream::revalidation_request(parts)))
            .await?;
        ex.upstream_status = Some(rsp.status());
        ex.revalidation_status = Some(rsp.status());
        let status = rsp.status();
        if matches!(status, StatusCode::NOT_FOUND | StatusCode::GONE) {
            return Ok(Current::Known(Resource::default()));
        }
        if !status.is_success() {
            return Ok(Current::Answer(Box::new(rsp)));
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
        let credentials = credentialed(&parts.headers);
        let read = self.tag(
            rt,
            route,
            key,
            ticket,
            &mut rparts,
            rbody,
            true,
            credentials,
        );
        let (current, _) = read.await?;
        Ok(Current::Known(current))
    }

    /// The tag of a `tag_puts` PUT's body. Equal to the URL's kept copy (a rewrite of the
    /// bytes last read, or a retried write), it is the copy's: a compare, where hashing a
    /// 256 KiB body takes ~155 µs. Counted as a GET's body is.
    fn put_tag(&self, rt: &Routing, key: &ResourceKey, body: &Bytes) -> ETag {
        if !self.memo.is_on() {
            return rt.tag_key.tag_of(body);
        }
        // A copy keyed by its metadata too holds another tag than its bytes': not this one.
        match self.memo.get(key, &rt.tag_key, None) {
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

/// The 428 for a write with no precondition that guards it. One that sent an
/// `If-Unmodified-Since` had it ignored as no valid date (`Preconditions::parse`): told so,
/// not that it sent none.
fn required(parts: &Parts, method: String) -> Error {
    match parts.headers.contains_key(header::IF_UNMODIFIED_SINCE) {
        true => Error::PreconditionDateIgnored { method },
        false => Error::PreconditionRequired { method },
    }
}

/// Drops the remembered tags of a write's targets when it ends, unless disarmed because the
/// backend refused the write. Being a guard, it also fires when the write fails or its client
/// leaves: the outcome is then unknown, so the tag must go. Once the write is sent, that is
/// when the backend has answered (`InFlight`), not when the client left.
struct Invalidation {
    proxy: Arc<Proxy>,
    keys: [Option<ResourceKey>; 3],
    /// A write with a query: its routes and URL. Should a reload that turns `ignore_query`
    /// on or off land while it runs, readers under the new routes remember the URL's tag
    /// under its other key, where a tag read before this write landed must not be left.
    rekey: Option<Box<Rekey>>,
}

/// What `Invalidation` needs to name a URL by its other key: the routes the write began
/// under, its route and its URL.
type Rekey = (Arc<Routing>, Arc<Route>, http::Uri);

impl Invalidation {
    fn disarm(mut self) {
        self.keys = [None, None, None];
        self.rekey = None;
    }
}

impl Drop for Invalidation {
    fn drop(&mut self) {
        for key in self.keys.iter().flatten() {
            self.proxy.tags.invalidate(key);
        }
        if let Some((routing, route, uri)) = self.rekey.as_deref() {
            if !Arc::ptr_eq(&self.proxy.routing.load(), routing) {
                if let Some(other) = other_keying(route, uri) {
                    self.proxy.tags.invalidate(&other);
                }
            }
        }
    }
}

/// The backend's answer to a write sent under its URL's lock.
type Answer = Pin<Box<dyn Future<Output = Result<Response<UpBody>, Error>> + Send>>;

/// A write on its way to the backend, with the URL's lock and the invalidation of its tags.
/// Once sent, the write is the backend's to carry out, whether or not its client stays: a
/// legacy backend does not stop a write because the connection closed. So if this is dropped
/// before the answer (the client left), the exchange runs on in a task of its own, and the
/// invalidation and the lock are let go only once the backend has answered (or
/// its timeout has passed: `upstream_timeout`, and `settle_timeout` more for a body sent
/// whole). Otherwise a later writer would be checked against a state this write may still
/// change, and both could land.
struct InFlight {
    answer: Option<Answer>,
    // Field order: the tags are dropped before the lock is let go.
    invalidation: Option<Invalidation>,
    guard: Option<WriteGuard>,
    /// The budget a body read whole holds while it is being sent.
    held: Option<Share>,
    /// Where a write that changes state stands: whether it has been sent yet.
    queued: Option<Arc<crate::pool::Queued>>,
}

impl InFlight {
    /// Waits for the backend's answer. From here, dropping `self` lets the lock go at once.
    async fn answer(&mut self) -> Result<Response<UpBody>, Error> {
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
        // Not handed to a connection yet (waiting for a turn at the backend, or for its
        // connection to be made), it has not been sent: like a writer that leaves while
        // waiting for the lock, it is dropped (the lock goes at once).
        if self.queued.as_ref().is_some_and(|q| q.unsent()) {
            return;
        }
        let (invalidation, guard) = (self.invalidation.take(), self.guard.take());
        if invalidation.is_none() && guard.is_none() {
            return; // a write that changes nothing: nothing to hold (nor a body read whole)
        }
        let held = self.held.take();
        // Without a runtime (the process is ending) there is nobody left to wait for.
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            let resource = invalidation.as_ref().and_then(|i| i.keys[0].clone());
            // Counted where a stop looks (`settling.rs`): the proxy's, which the
            // invalidation holds.
            let settling = (invalidation.as_ref().zip(resource.as_ref()))
                .map(|(i, r)| i.proxy.settling.begin(r.as_str()));
            rt.spawn(async move {
                let answered = answer.await;
                // What became of a write whose client was told 504 or had left: an
                // operator asked "did it go through?" finds it here.
                if let Some(resource) = resource.as_ref().map(ResourceKey::as_str) {
                    match &answered {
                        Ok(rsp) => tracing::info!(
                            resource,
                            status = rsp.status().as_u16(),
                            "the backend answered a write after its client stopped waiting; \
                             its URL was kept locked until now"
                        ),
                        Err(error) => tracing::info!(
                            resource,
                            %error,
                            "a write its client stopped waiting for got no answer; its URL \
                             was kept locked until now"
                        ),
                    }
                }
                // The tag is forgotten before the lock goes: in the other order, a writer
                // taking the lock on another worker could be judged by the old tag.
                drop((held, invalidation));
                // Settled before the lock goes: a writer let through finds it counted out.
                drop(settling);
                drop(guard);
            });
        }
    }
}

/// Whether a PUT's body is what the backend will serve: not a partial update
/// (`Content-Range`), not an encoding the backend may undo (`Content-Encoding`), and not
/// one that asks to be run as another method (a DELETE, a PATCH) by an override header,
/// which a backend that honours one on any method (CakePHP) does.
fn stores_verbatim(parts: &Parts) -> bool {
    let h = &parts.headers;
    parts.method == Method::PUT
        && !h.contains_key(header::CONTENT_RANGE)
        && !h.contains_key(header::CONTENT_ENCODING)
        && upstream::method_overrides(h).all(|(_, m)| m.eq_ignore_ascii_case("PUT"))
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
/// Google's APIs) runs it as that; so does any other method that goes up with its override
/// headers (PROPPATCH, MKCOL, an extension method), which CakePHP honours on any method.
/// (A `_method` form field is [`form_overrides`]'.) What the request is, as a 428's detail
/// names it: `PUT`, or `POST run as PUT by ...`.
fn requires_precondition(parts: &Parts) -> Option<String> {
    let method = parts.method.as_str();
    if guarded(method) {
        return Some(method.to_owned());
    }
    // One that changes nothing goes up without its override headers (`forward`).
    if !changes_state(&parts.method) {
        return None;
    }
    let as_run = |to: &str, by: &str| Some(format!("{method} run as {} by {by}", to.trim()));
    if let Some((h, to)) = upstream::method_overrides(&parts.headers).find(|(_, m)| guarded(m)) {
        return as_run(to, &format!("its {h} header"));
    }
    // In any case too: the frameworks that honour overrides upper-case the method first.
    // `_method` is read from a POST only.
    if !method.eq_ignore_ascii_case("POST") {
        return None;
    }
    let query = parts.uri.query().map(str::as_bytes).unwrap_or_default();
    let to = form_fields(query).find(|m| guarded(m))?;
    as_run(to, "its _method query parameter")
}

/// A POST whose form body (read whole) asks, in a `_method` field, to be run as a guarded
/// method, as Rails' and Laravel's forms do, and what it asks for. A body with no
/// `Content-Type` counts as a form, as Rack reads it.
fn form_overrides(parts: &Parts, body: &[u8]) -> Option<String> {
    let to = form_methods(parts, body).find(|m| guarded(m))?;
    Some(format!(
        "{} run as {} by its form's _method field",
        parts.method,
        to.trim()
    ))
}

/// A POST with a `Destination` whose form body (read whole) asks, in a `_method` field, to
/// be run as COPY or MOVE: Symfony (so Laravel) reads the field from the body first, and
/// takes any method there. Such a request changes its `Destination` (`destination_key`).
/// One look at the method for any other write; the body is scanned only for a POST that
/// names a destination.
fn copies_by_form_of(parts: &Parts, body: &[u8]) -> bool {
    parts.method.as_str().eq_ignore_ascii_case("POST")
        && parts.headers.contains_key("destination")
        && form_methods(parts, body).any(|m| copies(m.trim()))
}

/// The `_method` fields of a POST's URL-encoded form body, or of one with no
/// `Content-Type`, which Rack reads as a form.
fn form_methods<'a>(parts: &Parts, body: &'a [u8]) -> impl Iterator<Item = &'a str> {
    let form = parts.method.as_str().eq_ignore_ascii_case("POST")
        && parts.headers.get(header::CONTENT_TYPE).is_none_or(|t| {
            const FORM: &[u8] = b"application/x-www-form-urlencoded";
            t.as_bytes()
                .get(..FORM.len())
                .is_some_and(|m| m.eq_ignore_ascii_case(FORM))
        });
    form.then(|| form_fields(body)).into_iter().flatten()
}

/// COPY or MOVE, in any case.
fn copies(method: &str) -> bool {
    method.eq_ignore_ascii_case("COPY") || method.eq_ignore_ascii_case("MOVE")
}

/// The values of the `_method` fields of a URL-encoded form or query that a client may send
/// unencoded (letters): every one, since frameworks differ on which of several they take
/// (PHP and Rack the last).
fn form_fields(form: &[u8]) -> impl Iterator<Item = &str> {
    form.split(|&b| b == b'&')
        .filter_map(|pair| pair.strip_prefix(b"_method="))
        .filter_map(|v| std::str::from_utf8(v).ok())
}

/// PUT, PATCH or DELETE, in any case.
fn guarded(method: &str) -> bool {
    ["PUT", "PATCH", "DELETE"]
        .iter()
        .any(|g| method.trim().eq_ignore_ascii_case(g))
}

/// The key of a COPY or MOVE's `Destination` (RFC 4918 §10.3) on the same upstream: that
/// resource changes too, so its remembered tag must go as well.
/// One that cannot be read is refused (400): forwarded, its resource would change with
/// neither its lock held nor its tag forgotten. So is one with a query or a fragment:
/// backends read those their own ways (nginx writes `http://h?/b` and `/b?x` to `/b`, and
/// `/b#x` to a file named `b#x`), so which resource would change is not known here.
/// A missing one is the backend's to refuse.
/// `by_form`: a POST whose form asks to run as one (`copies_by_form_of`).
fn destination_key(
    parts: &Parts,
    route: &Route,
    by_form: bool,
) -> Result<Option<ResourceKey>, HeaderError> {
    // In any case, as `requires_precondition`: a backend that upper-cases methods (as
    // Werkzeug does) runs a `move` as a MOVE, which changes its destination all the same.
    // So does a write it runs as one by a method override, as `requires_precondition`
    // reads them (a method that changes nothing goes up without its override headers).
    // Methods are tokens and overrides come trimmed: no trimming (a tenth of a write's cost
    // here) but a form field's.
    let overridden = || {
        let by_header =
            by_form || upstream::method_overrides(&parts.headers).any(|(_, m)| copies(m));
        let post = parts.method.as_str().eq_ignore_ascii_case("POST");
        let query = parts.uri.query().map(str::as_bytes).unwrap_or_default();
        by_header || (post && form_fields(query).any(|m| copies(m.trim())))
    };
    if !copies(parts.method.as_str()) && !overridden() {
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
    if text.contains(['?', '#']) {
        return Err(malformed(
            "has a query or a fragment, which backends read differently: send a \
             destination that is a path only",
        ));
    }
    let dest: http::Uri = text.parse().map_err(|_| malformed("not a URI"))?;
    // RFC 4918 §10.3 takes an absolute URI or an absolute path. A relative reference
    // (`b`, which `Uri` reads as an authority with no path) would be keyed as `/`, where a
    // backend that resolves it against the request's URL changes `/dir/b`.
    if dest.scheme().is_none() && (dest.authority().is_some() || !dest.path().starts_with('/')) {
        return Err(malformed(
            "is not an absolute URI or an absolute path (RFC 4918 §10.3)",
        ));
    }
    let path = normalize_path(dest.path());
    Ok(Some(ResourceKey::new(
        &route.upstream,
        &crate::key::key_path(route, &path),
        None,
    )))
}
